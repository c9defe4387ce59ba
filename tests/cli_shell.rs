//! `nodetunnel completions bash|zsh|fish` and `nodetunnel man`, run as the
//! built binary: every script names every subcommand, the manual page is
//! roff that `man` renders (checked for structure where `man` is not
//! installed).

use std::collections::BTreeSet;
use std::process::Command;

use clap::CommandFactory;

const NODETUNNEL: &str = env!("CARGO_BIN_EXE_nodetunnel");

/// stdout of `nodetunnel ARGS`, which must succeed.
fn run(args: &[&str]) -> String {
    let out = Command::new(NODETUNNEL)
        .args(args)
        .output()
        .expect("run nodetunnel");
    assert!(
        out.status.success(),
        "nodetunnel {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// Every subcommand, nested ones too (`keys generate` as `generate`).
fn subcommands() -> BTreeSet<String> {
    fn walk(cmd: &clap::Command, into: &mut BTreeSet<String>) {
        for sub in cmd.get_subcommands() {
            into.insert(sub.get_name().to_string());
            walk(sub, into);
        }
    }
    let mut names = BTreeSet::new();
    walk(&nodetunnel::cli::Cli::command(), &mut names);
    names
}

#[test]
fn every_shell_s_completions_name_every_subcommand() {
    let names = subcommands();
    for expected in ["serve", "status", "check", "completions", "man", "generate"] {
        assert!(names.contains(expected), "{expected} not in {names:?}");
    }
    for shell in ["bash", "zsh", "fish"] {
        let script = run(&["completions", shell]);
        assert!(!script.trim().is_empty(), "{shell}: empty script");
        let missing: Vec<&String> = names
            .iter()
            .filter(|name| !script.contains(name.as_str()))
            .collect();
        assert!(missing.is_empty(), "{shell} script misses {missing:?}");
    }
}

#[test]
fn an_unknown_shell_is_refused_naming_the_ones_there_are() {
    let out = Command::new(NODETUNNEL)
        .args(["completions", "tcsh"])
        .output()
        .expect("run nodetunnel");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    for shell in ["bash", "zsh", "fish"] {
        assert!(stderr.contains(shell), "{stderr}");
    }
}

#[test]
fn the_man_page_is_roff_that_man_renders() {
    let page = run(&["man"]);
    for macro_line in [
        ".TH nodetunnel 1",
        ".SH NAME",
        ".SH SYNOPSIS",
        ".SH SUBCOMMANDS",
    ] {
        assert!(
            page.lines().any(|l| l.starts_with(macro_line)),
            "{macro_line} missing:\n{page}"
        );
    }
    let dir = tempfile::tempdir().expect("a temporary directory");
    let file = dir.path().join("nodetunnel.1");
    std::fs::write(&file, &page).expect("write the page");
    // `man -l` where it is installed (Debian's man-db): the page renders
    // without a warning and shows the subcommands.
    let rendered = Command::new("man")
        .arg("-l")
        .arg(&file)
        .env("MANWIDTH", "100")
        .env("MAN_KEEP_FORMATTING", "0")
        .env("MANROFFOPT", "-ww")
        .env("PAGER", "cat")
        .output();
    match rendered {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            let warnings = String::from_utf8_lossy(&out.stderr);
            assert!(warnings.trim().is_empty(), "man warned: {warnings}");
            for name in [
                "nodetunnel-serve(1)",
                "nodetunnel-completions(1)",
                "nodetunnel-man(1)",
            ] {
                assert!(text.contains(name), "{name} missing:\n{text}");
            }
        }
        Ok(out) => panic!(
            "man -l failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(error) => eprintln!("man not installed ({error}): roff structure checked only"),
    }
}

#[test]
fn man_dir_writes_one_page_per_subcommand() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().to_str().expect("a UTF-8 path");
    run(&["man", "--dir", path]);
    for page in [
        "nodetunnel.1",
        "nodetunnel-serve.1",
        "nodetunnel-status.1",
        "nodetunnel-keys-generate.1",
        "nodetunnel-completions.1",
    ] {
        let text = std::fs::read_to_string(dir.path().join(page))
            .unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(
            text.starts_with(".ie") || text.contains(".TH "),
            "{page}:\n{text}"
        );
    }
}
