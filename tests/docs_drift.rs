//! The docs kept true by tests: each test fails when a page and the code
//! drift apart.
//!
//! - every TOML block in docs/ and the README parses and validates as what
//!   it shows (a configuration file, or a nodes file when its first line
//!   names `nodes.toml`), unless the line before the block is
//!   `<!-- error: MESSAGE -->`, in which case loading it must fail with
//!   exactly MESSAGE;
//! - every metric name the docs mention is exported, and every family the
//!   sidecar exports (the registry `/metrics` encodes, per-node series
//!   included) is in docs/architecture.md;
//! - every `nodetunnel ...` command line in the docs names a real
//!   subcommand and only flags its `--help` lists;
//! - the exit statuses of `check` in docs/troubleshooting.md are the code's;
//! - the quick reference of docs/configuration.md shows the code's defaults.
//!
//! No network, no root: the binary is only asked for `--help`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use nodetunnel::cli::check::Step;
use nodetunnel::config::Config;

#[path = "support/exported_metrics.rs"]
mod exported_metrics;
use exported_metrics::{anchors, exported_families, family_of, metric_names};

const NODETUNNEL: &str = env!("CARGO_BIN_EXE_nodetunnel");

/// The user-facing pages: docs/*.md and the README.
fn pages() -> Vec<(PathBuf, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut paths: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    paths.push(root.join("README.md"));
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("read page");
            let name = p.strip_prefix(root).unwrap_or(&p).to_path_buf();
            (name, text)
        })
        .collect()
}

/// A fenced code block: its language, first line number (1-based, of the
/// first line inside the fence), its text, and the line before the fence.
struct Block {
    lang: String,
    line: usize,
    text: String,
    before: String,
}

fn blocks(text: &str) -> Vec<Block> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let Some(lang) = lines[i].trim_start().strip_prefix("```") else {
            i += 1;
            continue;
        };
        let before = if i > 0 { lines[i - 1].trim() } else { "" };
        let start = i + 1;
        let mut end = start;
        while end < lines.len() && !lines[end].trim_start().starts_with("```") {
            end += 1;
        }
        out.push(Block {
            lang: lang.trim().to_owned(),
            line: start + 1,
            text: lines[start..end.min(lines.len())].join("\n") + "\n",
            before: before.to_owned(),
        });
        i = end + 1;
    }
    out
}

#[test]
fn every_toml_block_in_the_docs_parses_and_validates() {
    let mut checked = 0;
    let mut failures = Vec::new();
    for (page, text) in pages() {
        for block in blocks(&text).into_iter().filter(|b| b.lang == "toml") {
            let at = format!("{}:{}", page.display(), block.line);
            let first = block.text.lines().next().unwrap_or("");
            let expected_error = block
                .before
                .strip_prefix("<!-- error:")
                .and_then(|rest| rest.strip_suffix("-->"))
                .map(str::trim);
            let result = if first.contains("nodes.toml") {
                nodetunnel::inventory::parse_nodes_file(&block.text, Path::new("nodes.toml"))
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            } else {
                Config::parse_str(&block.text, Path::new("nodetunnel.toml"))
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            };
            checked += 1;
            match (expected_error, result) {
                (None, Ok(())) => {}
                (None, Err(e)) => failures.push(format!("{at}: {e}")),
                (Some(want), Err(e)) if e == want => {}
                (Some(want), Err(e)) => {
                    failures.push(format!("{at}: expected the error {want:?}, got {e:?}"))
                }
                (Some(want), Ok(())) => {
                    failures.push(format!("{at}: expected the error {want:?}, but it loads"))
                }
            }
        }
    }
    assert!(
        checked >= 10,
        "only {checked} TOML blocks found: is docs/ there?"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The quick reference at the top of docs/configuration.md claims to show
/// every key with its default. Loading it must give the same configuration
/// as a file that sets only what has no default (its node and its proxy
/// listener): a default that changes in the code, or a value mistyped in
/// the block, makes the two differ.
#[test]
fn the_configuration_quick_reference_shows_the_defaults() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md"),
    )
    .expect("docs/configuration.md");
    let section = text
        .split("\n## Quick reference\n")
        .nth(1)
        .expect("a `## Quick reference` section in docs/configuration.md");
    let block = blocks(section)
        .into_iter()
        .find(|b| b.lang == "toml")
        .expect("a TOML block in the quick reference");
    let path = Path::new("nodetunnel.toml");
    let shown = Config::parse_str(&block.text, path).expect("the quick reference loads");
    let minimal = Config::parse_str(
        "[[nodes]]\nname = \"node-a\"\naddresses = [\"10.240.0.11\"]\n\n\
         [proxy]\nuds = \"/run/nodetunnel/proxy.sock\"\n",
        path,
    )
    .expect("the minimal file loads");
    let (shown, minimal) = (format!("{shown:#?}"), format!("{minimal:#?}"));
    let differ: Vec<String> = shown
        .lines()
        .zip(minimal.lines())
        .filter(|(s, m)| s != m)
        .map(|(s, m)| {
            format!(
                "the quick reference says {}, the code {}",
                s.trim(),
                m.trim()
            )
        })
        .collect();
    assert!(differ.is_empty(), "{}", differ.join("\n"));
    assert_eq!(shown.lines().count(), minimal.lines().count());
}

#[test]
fn every_metric_the_docs_name_is_exported_and_every_exported_one_is_documented() {
    let families = exported_families();
    assert!(families.len() >= 15, "{families:?}");
    let mut unknown = Vec::new();
    for (page, text) in pages() {
        for name in metric_names(&text) {
            // A prefix in prose (`nodetunnel_node_` series), not a name.
            if name.ends_with('_') {
                let prefix_used = families.iter().any(|f| f.starts_with(&name));
                if !prefix_used {
                    unknown.push(format!("{}: prefix {name}", page.display()));
                }
                continue;
            }
            if family_of(&name, &families).is_none() {
                unknown.push(format!("{}: {name}", page.display()));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "the docs name metrics the sidecar does not export:\n{}\nexported: {families:?}",
        unknown.join("\n")
    );
    let reference =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/architecture.md"))
            .expect("docs/architecture.md");
    let documented: BTreeSet<String> = metric_names(&reference)
        .iter()
        .filter_map(|n| family_of(n, &families))
        .collect();
    let missing: Vec<&String> = families.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "exported but not in docs/architecture.md's metrics reference: {missing:?}"
    );
}

/// `nodetunnel ARGS --help`: its output, or `None` if that is no command.
fn help(args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(NODETUNNEL)
        .args(args)
        .arg("--help")
        .output()
        .expect("run nodetunnel --help");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The subcommands listed under `Commands:` in a help text.
fn commands(help: &str) -> BTreeSet<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_owned)
        .collect()
}

/// The command lines of a page: lines of code blocks, and inline code
/// spans, that start with `nodetunnel ` (after an optional `$ ` or `sudo `,
/// or a path ending in `/nodetunnel`).
fn command_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut in_code = false;
    for (n, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        let mut candidates: Vec<&str> = Vec::new();
        if in_code {
            candidates.push(line.trim());
        } else {
            candidates.extend(line.split('`').skip(1).step_by(2));
        }
        for c in candidates {
            let c = c.trim_start_matches("$ ").trim_start_matches("sudo ");
            let Some(first) = c.split_whitespace().next() else {
                continue;
            };
            if first == "nodetunnel" || first.ends_with("/nodetunnel") {
                out.push((n + 1, c.to_owned()));
            }
        }
    }
    out
}

#[test]
fn every_command_line_in_the_docs_matches_the_cli() {
    let top = help(&[]).expect("nodetunnel --help");
    let subcommands = commands(&top);
    assert!(subcommands.contains("check"), "{subcommands:?}");
    let mut checked = 0;
    let mut wrong = Vec::new();
    for (page, text) in pages() {
        for (line, command) in command_lines(&text) {
            let tokens: Vec<&str> = command.split_whitespace().skip(1).collect();
            let Some(at) = tokens.iter().position(|t| subcommands.contains(*t)) else {
                // `nodetunnel` alone, or prose such as "nodetunnel asks".
                continue;
            };
            let mut path = vec![tokens[at]];
            let mut text = help(&path).expect("subcommand help");
            if let Some(next) = tokens.get(at + 1) {
                if commands(&text).contains(*next) {
                    path.push(next);
                    text = help(&path).expect("sub-subcommand help");
                }
            }
            checked += 1;
            for flag in tokens.iter().filter(|t| t.starts_with("--")) {
                let flag = flag
                    .trim_matches(|c: char| "[]|(),`".contains(c))
                    .split('=')
                    .next()
                    .unwrap_or("");
                if flag.len() > 2
                    && !text.contains(&format!("{flag} "))
                    && !text.contains(&format!("{flag}\n"))
                    && !text.contains(&format!("{flag},"))
                {
                    wrong.push(format!(
                        "{}:{line}: `nodetunnel {}` has no {flag} ({command})",
                        page.display(),
                        path.join(" ")
                    ));
                }
            }
        }
    }
    assert!(checked >= 20, "only {checked} command lines found");
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn checks_exit_statuses_in_the_docs_are_the_codes() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/troubleshooting.md"),
    )
    .expect("docs/troubleshooting.md");
    // | # | Step | Bound | Exit status |
    let rows: Vec<(String, u8)> = text
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            // ["", "#", "step", "bound", "exit", ""]
            if cells.len() != 6 || cells[1].parse::<u8>().is_err() {
                return None;
            }
            Some((cells[2].to_owned(), cells[4].parse::<u8>().ok()?))
        })
        .collect();
    assert_eq!(rows.len(), Step::ALL.len(), "{rows:?}");
    for (step, (doc_name, doc_code)) in Step::ALL.iter().zip(&rows) {
        assert!(
            doc_name.starts_with(step.name()),
            "docs say step {doc_name:?}, the code {:?}",
            step.name()
        );
        assert_eq!(*doc_code, step.exit_code(), "{doc_name}");
    }
}

#[test]
fn every_link_between_pages_reaches_a_page_and_a_heading() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut broken = Vec::new();
    let mut checked = 0;
    for (page, text) in pages() {
        let dir = root.join(&page);
        let dir = dir.parent().unwrap_or(root);
        let mut rest = text.as_str();
        while let Some(at) = rest.find("](") {
            rest = &rest[at + 2..];
            let Some(end) = rest.find(')') else { break };
            let target = &rest[..end];
            if target.starts_with("http") || target.contains(' ') {
                continue;
            }
            let (file, anchor) = match target.split_once('#') {
                Some((file, anchor)) => (file, Some(anchor)),
                None => (target, None),
            };
            let path = if file.is_empty() {
                root.join(&page)
            } else {
                dir.join(file)
            };
            checked += 1;
            let Ok(linked) = std::fs::read_to_string(&path) else {
                if !path.exists() {
                    broken.push(format!("{}: no file {target}", page.display()));
                }
                continue;
            };
            if let Some(anchor) = anchor {
                if path.extension().is_some_and(|x| x == "md") && !anchors(&linked).contains(anchor)
                {
                    broken.push(format!("{}: no heading for {target}", page.display()));
                }
            }
        }
    }
    assert!(checked >= 30, "only {checked} links found");
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}
