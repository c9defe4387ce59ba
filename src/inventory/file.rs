//! The `file` inventory source: a nodes file, parsed and watched.
//!
//! The file holds either TOML `[[nodes]]` entries in the config's shape
//! (checked like the config: [`validate_node`], unique names) or the JSON
//! that `kubectl get nodes -o json` prints (a `List`/`NodeList` of `Node`s,
//! or one `Node`), converted by [`convert::node_config`]. A file whose first
//! non-blank character is `{` is JSON; anything else is TOML.
//!
//! The file's directory is watched (notify: inotify on Linux), so editors
//! that write a temporary file and rename it, and Kubernetes ConfigMap
//! volumes (which swap a `..data` symlink), are both seen. Events are
//! debounced until the directory has been quiet for a moment, then the file
//! is re-read; it is also re-read on SIGHUP and every minute (which confirms
//! the sync time and catches changes a watch cannot see, such as a symlink
//! target elsewhere).
//!
//! A file that cannot be read or parsed keeps the inventory in force; the
//! error names the file, the line and the key. So does an empty file: an
//! empty inventory must be written out (`nodes = []`), so a truncated write
//! never drains every node.

use crate::field_error::FieldError;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use notify::{EventKind, RecursiveMode, Watcher};
use serde::Deserialize;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use super::{convert, InventoryConfig, InventoryError, Publisher};
use super::{RESYNC_INTERVAL, RETRY_BASE, RETRY_MAX};
use crate::backoff::Backoff;
use crate::node::{validate_node, NodeConfig};
use crate::shutdown::Shutdown;

/// After a change event, wait until the directory was quiet this long...
const DEBOUNCE_QUIET: Duration = Duration::from_millis(100);
/// ...but never longer than this after the first event.
const DEBOUNCE_MAX: Duration = Duration::from_secs(1);

/// Parse a nodes file (see the module docs), converting kubectl JSON with
/// the default address preference (`InternalIP`, `ExternalIP`, `Hostname`).
/// `path` is only used in errors and logs.
pub fn parse_nodes_file(text: &str, path: &Path) -> Result<Vec<NodeConfig>, InventoryError> {
    parse_nodes_file_with(text, path, &InventoryConfig::default().address_types)
}

/// [`parse_nodes_file`] with an explicit address type preference for
/// kubectl JSON. A Node that cannot be converted (say, an invalid
/// `nodetunnel.dev/ssh-port` annotation) is left out with a logged warning;
/// the rest of the file is used.
pub fn parse_nodes_file_with(
    text: &str,
    path: &Path,
    address_types: &[String],
) -> Result<Vec<NodeConfig>, InventoryError> {
    let parsed = parse(text, path, address_types)?;
    for skipped in &parsed.skipped {
        tracing::warn!(source = "file", path = %path.display(), node = %skipped.name, reason = %skipped.reason, "node skipped");
    }
    Ok(parsed.nodes)
}

/// A Node left out of a kubectl JSON file.
#[derive(Debug)]
pub(crate) struct Skipped {
    /// Its name (empty when it has none).
    pub(crate) name: String,
    /// Why.
    pub(crate) reason: String,
}

/// A parsed file: the nodes, and the Nodes that were left out.
#[derive(Debug)]
pub(crate) struct Parsed {
    pub(crate) nodes: Vec<NodeConfig>,
    pub(crate) skipped: Vec<Skipped>,
}

fn parse(text: &str, path: &Path, address_types: &[String]) -> Result<Parsed, InventoryError> {
    let body = text.trim_start_matches('\u{feff}');
    if body.trim().is_empty() {
        return Err(parse_error(
            path,
            None,
            "",
            "the file is empty; write `nodes = []` (TOML) or an empty List (JSON) to remove every node",
        ));
    }
    if body.trim_start().starts_with('{') {
        parse_json(body, path, address_types)
    } else {
        parse_toml(body, path).map(|nodes| Parsed {
            nodes,
            skipped: Vec::new(),
        })
    }
}

fn parse_error(path: &Path, line: Option<usize>, field: &str, reason: &str) -> InventoryError {
    InventoryError::Parse {
        path: path.to_path_buf(),
        line,
        field: field.to_string(),
        reason: reason.to_string(),
    }
}

/// 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlFile {
    nodes: Option<Vec<NodeConfig>>,
}

/// The same file again, with the position of every node and key (only
/// read to place a validation error).
#[derive(Deserialize)]
struct TomlSpans {
    #[serde(default)]
    nodes: Vec<toml::Spanned<BTreeMap<String, toml::Spanned<toml::Value>>>>,
}

fn parse_toml(text: &str, path: &Path) -> Result<Vec<NodeConfig>, InventoryError> {
    let deserializer = toml::Deserializer::new(text);
    let file: TomlFile = serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        let line = inner.span().map(|span| line_of(text, span.start));
        let field = if field == "." { String::new() } else { field };
        // toml's messages can span lines ("invalid table header\nexpected
        // ..."): keep the error on one.
        let message = inner
            .message()
            .trim()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        parse_error(path, line, &field, &message)
    })?;
    let Some(nodes) = file.nodes else {
        return Err(parse_error(
            path,
            None,
            "nodes",
            "missing; write `nodes = []` to remove every node",
        ));
    };
    // Where node `i`'s `key` is, for errors found after parsing.
    let locate = |i: usize, key: &str| -> Option<usize> {
        let spans: TomlSpans = toml::from_str(text).ok()?;
        let node = spans.nodes.get(i)?;
        let base = key.split(['[', '.']).next().unwrap_or(key);
        let offset = node
            .get_ref()
            .get(base)
            .map(|v| v.span().start)
            .unwrap_or(node.span().start);
        Some(line_of(text, offset))
    };
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, node) in nodes.iter().enumerate() {
        validate_node(node).map_err(|FieldError { key, reason }| {
            parse_error(path, locate(i, &key), &format!("nodes[{i}].{key}"), &reason)
        })?;
        if let Some(first) = seen.insert(node.name.as_str(), i) {
            return Err(parse_error(
                path,
                locate(i, "name"),
                &format!("nodes[{i}].name"),
                &format!("duplicate node name {:?} (also nodes[{first}])", node.name),
            ));
        }
    }
    Ok(nodes)
}

/// Just enough of a JSON document to tell a list from a node.
#[derive(Deserialize)]
struct JsonProbe {
    kind: Option<String>,
}

#[derive(Deserialize)]
struct JsonList {
    items: Vec<Node>,
}

/// serde_json's message without its " at line L column C" suffix, and the line.
fn json_message(e: &serde_json::Error) -> (Option<usize>, String) {
    let text = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    let message = text.strip_suffix(&suffix).unwrap_or(&text).to_string();
    if e.line() == 0 {
        (None, message)
    } else {
        (Some(e.line()), format!("{message} (column {})", e.column()))
    }
}

fn json_error(path: &Path, e: serde_path_to_error::Error<serde_json::Error>) -> InventoryError {
    let field = e.path().to_string();
    let field = if field == "." { String::new() } else { field };
    let (line, message) = json_message(e.inner());
    parse_error(path, line, &field, &message)
}

fn parse_json(text: &str, path: &Path, address_types: &[String]) -> Result<Parsed, InventoryError> {
    let probe: JsonProbe = serde_json::from_str(text).map_err(|e| {
        let (line, message) = json_message(&e);
        parse_error(path, line, "", &message)
    })?;
    let items: Vec<Node> = match probe.kind.as_deref() {
        Some("List") | Some("NodeList") => {
            let mut de = serde_json::Deserializer::from_str(text);
            let list: JsonList =
                serde_path_to_error::deserialize(&mut de).map_err(|e| json_error(path, e))?;
            list.items
        }
        Some("Node") => {
            let mut de = serde_json::Deserializer::from_str(text);
            let node: Node =
                serde_path_to_error::deserialize(&mut de).map_err(|e| json_error(path, e))?;
            vec![node]
        }
        Some(other) => {
            return Err(parse_error(
                path,
                None,
                "kind",
                &format!("{other:?}: expected \"List\", \"NodeList\" or \"Node\" (kubectl get nodes -o json)"),
            ))
        }
        None => {
            return Err(parse_error(
                path,
                None,
                "kind",
                "missing: expected the output of kubectl get nodes -o json",
            ))
        }
    };
    let mut parsed = Parsed {
        nodes: Vec::with_capacity(items.len()),
        skipped: Vec::new(),
    };
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, node) in items.iter().enumerate() {
        // The operator's own file: its annotations are taken as written
        // (`inventory.kubernetes.trust_node_annotations` is about the watch).
        match convert::node_config(node, address_types, convert::NodeAnnotations::Trusted) {
            Ok(config) => {
                if let Some(first) = seen.insert(config.name.clone(), i) {
                    return Err(parse_error(
                        path,
                        None,
                        &format!("items[{i}].metadata.name"),
                        &format!(
                            "duplicate node name {:?} (also items[{first}])",
                            config.name
                        ),
                    ));
                }
                parsed.nodes.push(config);
            }
            Err(error) => parsed.skipped.push(Skipped {
                name: node.metadata.name.clone().unwrap_or_default(),
                reason: error.to_string(),
            }),
        }
    }
    Ok(parsed)
}

/// The outcome of the last read, to tell a change from a repeat.
enum LastRead {
    /// Nothing read yet.
    Nothing,
    /// This text was applied.
    Applied(String),
    /// This text was refused and counted.
    RefusedText(String),
    /// Reading failed with this message, counted.
    ReadFailed(String),
}

/// The file source's task; see [`super::run`].
pub(crate) async fn run(
    config: InventoryConfig,
    publisher: Publisher,
    reload: Arc<Notify>,
    shutdown: Shutdown,
) {
    let Some(path) = config.path.clone() else {
        publisher.failed(&InventoryError::Watch {
            path: PathBuf::new(),
            reason: "inventory.path is not set".into(),
        });
        shutdown.wait().await;
        return;
    };
    let mut source = FileSource {
        dir: match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        },
        file_name: path.file_name().map(|n| n.to_os_string()),
        path,
        address_types: config.address_types,
        publisher,
        last: LastRead::Nothing,
        in_force: BTreeMap::new(),
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut watcher: Option<notify::RecommendedWatcher> = None;
    let mut watch_backoff = Backoff::new(RETRY_BASE, RETRY_MAX);
    let mut watch_retry = Instant::now();
    let mut resync = tokio::time::interval_at(Instant::now() + RESYNC_INTERVAL, RESYNC_INTERVAL);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut first = true;
    loop {
        if watcher.is_none() && Instant::now() >= watch_retry {
            // Watch before reading, so no change between the two is missed.
            match source.watch(tx.clone()) {
                Ok(w) => {
                    watcher = Some(w);
                    watch_backoff.reset();
                    if !first {
                        // Watching again after a gap: catch up.
                        source.read(false).await;
                    }
                }
                Err(e) => {
                    source.publisher.failed(&e);
                    watch_retry = Instant::now() + watch_backoff.next_delay();
                }
            }
        }
        if first {
            first = false;
            source.read(false).await;
        }
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = reload.notified() => {
                tracing::info!(source = "file", path = %source.path.display(), "re-reading the nodes file");
                source.read(true).await;
            }
            event = rx.recv() => match event {
                Some(Ok(event)) if source.relevant(&event) => {
                    let burst = debounce(&event, &mut rx, &source).await;
                    source.read(false).await;
                    if let Some(e) = &burst.error {
                        source.publisher.failed(&InventoryError::Watch {
                            path: source.path.clone(),
                            reason: e.to_string(),
                        });
                    }
                    if burst.error.is_some() || burst.lost_directory {
                        // Watch again from scratch: the watch went with the
                        // directory, or broke.
                        watcher = None;
                        watch_retry = Instant::now() + watch_backoff.next_delay();
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    source.publisher.failed(&InventoryError::Watch {
                        path: source.path.clone(),
                        reason: e.to_string(),
                    });
                    // Watch again from scratch (the directory may have been
                    // replaced); the periodic re-read covers the gap.
                    watcher = None;
                    watch_retry = Instant::now() + watch_backoff.next_delay();
                    source.read(false).await;
                }
                // The sender lives in this task: cannot happen.
                None => {}
            },
            _ = resync.tick() => source.read(false).await,
            _ = tokio::time::sleep_until(watch_retry), if watcher.is_none() => {}
        }
    }
}

/// What a burst of events said, beyond "the file may have changed".
#[derive(Default)]
struct Burst {
    /// The watch reported an error.
    error: Option<notify::Error>,
    /// The watched directory itself was removed or moved away.
    lost_directory: bool,
}

/// Swallow the events of one burst of writes, starting with `first`: return
/// once no relevant event came for [`DEBOUNCE_QUIET`], or [`DEBOUNCE_MAX`]
/// after the start. A watch error ends the burst.
async fn debounce(
    first: &notify::Event,
    rx: &mut mpsc::UnboundedReceiver<notify::Result<notify::Event>>,
    source: &FileSource,
) -> Burst {
    let mut burst = Burst {
        lost_directory: source.lost_directory(first),
        ..Burst::default()
    };
    let deadline = Instant::now() + DEBOUNCE_MAX;
    let mut quiet = (Instant::now() + DEBOUNCE_QUIET).min(deadline);
    loop {
        tokio::select! {
            event = rx.recv() => match event {
                Some(Ok(event)) if source.relevant(&event) => {
                    burst.lost_directory |= source.lost_directory(&event);
                    quiet = (Instant::now() + DEBOUNCE_QUIET).min(deadline);
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    burst.error = Some(e);
                    return burst;
                }
                None => return burst,
            },
            _ = tokio::time::sleep_until(quiet) => return burst,
        }
    }
}

struct FileSource {
    path: PathBuf,
    dir: PathBuf,
    file_name: Option<std::ffi::OsString>,
    address_types: Vec<String>,
    publisher: Publisher,
    last: LastRead,
    /// The nodes applied last, by name (kept for Nodes a later read skips).
    in_force: BTreeMap<String, NodeConfig>,
}

impl FileSource {
    fn watch(
        &self,
        tx: mpsc::UnboundedSender<notify::Result<notify::Event>>,
    ) -> Result<notify::RecommendedWatcher, InventoryError> {
        let fail = |e: notify::Error| InventoryError::Watch {
            path: self.path.clone(),
            reason: format!("{}: {e}", self.dir.display()),
        };
        let mut watcher = notify::recommended_watcher(move |event| {
            // The receiver only goes away when the task ends.
            let _ = tx.send(event);
        })
        .map_err(fail)?;
        watcher
            .watch(&self.dir, RecursiveMode::NonRecursive)
            .map_err(fail)?;
        Ok(watcher)
    }

    /// Whether `event` says the watched directory itself was removed or
    /// moved away (its watch is gone with it).
    fn lost_directory(&self, event: &notify::Event) -> bool {
        matches!(
            event.kind,
            EventKind::Remove(_) | EventKind::Modify(notify::event::ModifyKind::Name(_))
        ) && event.paths.iter().any(|p| p == &self.dir)
    }

    /// Whether `event` may have changed the file: not a mere access, and on
    /// the file itself, the directory, or a ConfigMap's `..data` swap.
    fn relevant(&self, event: &notify::Event) -> bool {
        if matches!(event.kind, EventKind::Access(_)) {
            return false;
        }
        event.paths.is_empty()
            || event.paths.iter().any(|p| {
                p == &self.dir
                    || match p.file_name() {
                        Some(name) => {
                            Some(name) == self.file_name.as_deref()
                                || name.to_string_lossy().starts_with("..")
                        }
                        None => true,
                    }
            })
    }

    /// Read the file and apply it. Unless `force`, content seen before is
    /// not applied again: applied content only confirms the sync, refused
    /// content is not counted twice.
    async fn read(&mut self, force: bool) {
        let outcome =
            tokio::fs::read_to_string(&self.path)
                .await
                .map_err(|e| InventoryError::Read {
                    path: self.path.clone(),
                    source: e,
                });
        if !force {
            match (&self.last, &outcome) {
                (LastRead::Applied(previous), Ok(text)) if previous == text => {
                    self.publisher.synced();
                    return;
                }
                (LastRead::RefusedText(previous), Ok(text)) if previous == text => return,
                (LastRead::ReadFailed(previous), Err(e)) if *previous == e.to_string() => return,
                _ => {}
            }
        }
        let text = match outcome {
            Ok(text) => text,
            Err(e) => {
                self.publisher.failed(&e);
                self.last = LastRead::ReadFailed(e.to_string());
                return;
            }
        };
        match parse(&text, &self.path, &self.address_types) {
            Ok(parsed) => {
                let mut nodes = parsed.nodes;
                let listed: HashSet<String> = nodes.iter().map(|n| n.name.clone()).collect();
                for skipped in parsed.skipped {
                    let kept = self
                        .in_force
                        .get(&skipped.name)
                        .filter(|_| !listed.contains(&skipped.name));
                    tracing::warn!(
                        source = self.publisher.source(),
                        path = %self.path.display(),
                        node = %skipped.name,
                        reason = %skipped.reason,
                        kept = kept.is_some(),
                        "node skipped; a node in force keeps its previous entry"
                    );
                    if let Some(previous) = kept {
                        nodes.push(previous.clone());
                    }
                }
                self.in_force = nodes.iter().map(|n| (n.name.clone(), n.clone())).collect();
                self.publisher.apply(nodes);
                self.last = LastRead::Applied(text);
            }
            Err(e) => {
                self.publisher.failed(&e);
                self.last = LastRead::RefusedText(text);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path() -> PathBuf {
        PathBuf::from("/etc/nodetunnel/nodes.toml")
    }

    fn error(text: &str) -> (Option<usize>, String, String) {
        match parse_nodes_file(text, &path()) {
            Err(InventoryError::Parse {
                line,
                field,
                reason,
                ..
            }) => (line, field, reason),
            other => panic!("expected a parse error, got {other:?}"),
        }
    }

    #[test]
    fn toml_nodes_parse_in_the_config_shape() {
        let nodes = parse_nodes_file(
            "[[nodes]]\nname = \"a\"\naddresses = [\"10.0.0.1\", \"a.internal\"]\npod_cidrs = [\"10.244.1.0/24\"]\nssh_port = 2222\nssh_user = \"tunnel\"\n\n[[nodes]]\nname = \"b\"\naddresses = [\"10.0.0.2\"]\n",
            &path(),
        )
        .unwrap();
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[0].name, "a");
        assert_eq!(nodes[0].ssh_port, Some(2222));
        assert_eq!(nodes[0].ssh_user.as_deref(), Some("tunnel"));
        assert_eq!(nodes[1].ssh_address(), "10.0.0.2");
        assert!(parse_nodes_file("nodes = []\n", &path())
            .unwrap()
            .is_empty());
    }

    #[test]
    fn toml_errors_name_the_file_line_and_field() {
        let text = "[[nodes]]\nname = \"a\"\naddresses = [\"10.0.0.1\"]\n\n[[nodes]]\nname = \"b\"\naddresses = [\"10.0.0.2\"]\npod_cidrs = [\"10.244.1.0/33\"]\n";
        let (line, field, _) = error(text);
        assert_eq!(field, "nodes[1].pod_cidrs[0]");
        assert_eq!(line, Some(8));

        // A validation error (after parsing) is placed on its key's line.
        let text = "[[nodes]]\nname = \"a\"\naddresses = [\"10.0.0.1\"]\n[[nodes]]\nname = \"b\"\n\naddresses = [\"10.0.0.2\", \"bad address\"]\n";
        let (line, field, reason) = error(text);
        assert_eq!(field, "nodes[1].addresses[1]");
        assert_eq!(line, Some(7));
        assert!(reason.contains("bad address"), "{reason}");

        let text = "[[nodes]]\nname = \"a\"\naddresses = [\"10.0.0.1\"]\n[[nodes]]\nname = \"a\"\naddresses = [\"10.0.0.2\"]\n";
        let (line, field, reason) = error(text);
        assert_eq!(field, "nodes[1].name");
        assert_eq!(line, Some(5));
        assert!(reason.contains("duplicate node name \"a\""), "{reason}");

        let (line, field, _) =
            error("[[nodes]]\nname = \"a\"\naddresses = [\"10.0.0.1\"]\nsssh_port = 22\n");
        assert_eq!(field, "nodes[0].sssh_port");
        assert_eq!(line, Some(4));

        let (line, _, reason) = error("[[nodes]\nname = 1\n");
        assert_eq!(line, Some(1));
        assert!(!reason.contains('\n'), "one line: {reason:?}");

        let e = parse_nodes_file("[[node]]\nname = \"a\"\n", &path()).unwrap_err();
        let e = e.to_string();
        assert!(e.starts_with("/etc/nodetunnel/nodes.toml: line 1: "), "{e}");
        assert!(e.contains("unknown field `node`"), "{e}");
    }

    #[test]
    fn empty_files_are_refused_so_a_truncated_write_never_drains_every_node() {
        for text in ["", "\n  \n", "# only a comment\n"] {
            assert!(parse_nodes_file(text, &path()).is_err(), "{text:?}");
        }
    }

    #[test]
    fn json_syntax_and_type_errors_give_the_line_and_field() {
        let (line, field, _) = error(
            "{\n  \"kind\": \"List\",\n  \"items\": [\n    {\"metadata\": {\"name\": 5}}\n  ]\n}\n",
        );
        assert_eq!(field, "items[0].metadata.name");
        assert_eq!(line, Some(4));
        let (line, _, reason) = error("{\n  \"kind\": \"List\",\n  \"items\": [,]\n}\n");
        assert_eq!(line, Some(3));
        assert!(reason.contains("column"), "{reason}");
        let (_, field, _) = error("{\"kind\": \"PodList\", \"items\": []}");
        assert_eq!(field, "kind");
        // k8s-openapi checks `kind` itself: the path ends at the item.
        let (_, field, reason) = error("{\"kind\": \"List\", \"items\": [{\"kind\": \"Pod\", \"metadata\": {\"name\": \"x\"}}]}");
        assert_eq!(field, "items[0]");
        assert!(reason.contains("\"Pod\""), "{reason}");
    }

    #[test]
    fn json_list_and_single_node_parse_and_bad_nodes_are_skipped() {
        let list = r#"{
  "apiVersion": "v1",
  "kind": "List",
  "items": [
    {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "a"},
     "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]},
     "status": {"addresses": [{"type": "Hostname", "address": "a"}, {"type": "InternalIP", "address": "10.0.0.1"}]}},
    {"apiVersion": "v1", "kind": "Node",
     "metadata": {"name": "b", "annotations": {"nodetunnel.dev/ssh-port": "none"}},
     "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.2"}]}}
  ],
  "metadata": {"resourceVersion": ""}
}"#;
        let nodes = parse_nodes_file(list, &path()).unwrap();
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].addresses, ["10.0.0.1", "a"]);
        let parsed = parse(list, &path(), &["InternalIP".to_string()]).unwrap();
        assert_eq!(parsed.skipped.len(), 1);
        assert_eq!(parsed.skipped[0].name, "b");
        assert!(parsed.skipped[0].reason.contains("ssh-port"));

        let single = r#"{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "c"},
            "status": {"addresses": [{"type": "ExternalIP", "address": "203.0.113.9"}]}}"#;
        let nodes = parse_nodes_file(single, &path()).unwrap();
        assert_eq!(nodes[0].ssh_address(), "203.0.113.9");

        let dup = r#"{"kind": "NodeList", "items": [
            {"metadata": {"name": "a"}, "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.1"}]}},
            {"metadata": {"name": "a"}, "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.2"}]}}]}"#;
        let (_, field, _) = error(dup);
        assert_eq!(field, "items[1].metadata.name");
    }
}
