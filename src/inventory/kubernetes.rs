//! The `kubernetes` inventory source: a list+watch of Node objects.
//!
//! kube-rs's [`watcher()`] does the list (paginated), the watch from the
//! list's resourceVersion, bookmarks, and the re-list when the apiserver
//! answers 410 Gone (the watch history was compacted). This module turns its
//! events into complete node lists for the sink:
//!
//! - A (re-)list (`Init` .. `InitDone`) replaces the whole set, so nodes that
//!   vanished while the watch was down are removed.
//! - `Apply` and `Delete` change one node; events that arrive together are
//!   applied in one go, and an event that does not change the node's
//!   [`NodeConfig`] (a status heartbeat) changes nothing.
//! - A Node that cannot be converted (an invalid annotation) is skipped with
//!   a warning; a node already in force keeps its previous entry, so a typo
//!   never drops a tunnel.
//! - The SSH endpoint annotations are written by the node itself: unless
//!   `inventory.kubernetes.trust_node_annotations` is set they are ignored,
//!   and said so once per node (at info).
//!
//! Any watch error is logged and counted, and the watch starts over with a
//! full re-list after a backoff; a 410 Gone re-lists at once. SIGHUP
//! re-reads the kubeconfig and re-lists. A live watch confirms the sync time
//! every minute, so readiness stays green in a quiet cluster.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher::{self, watcher, Event};
use kube::Api;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{convert, pause, InventoryConfig, InventoryError, Publisher};
use super::{RESYNC_INTERVAL, RETRY_BASE, RETRY_MAX};
use crate::backoff::Backoff;
use crate::node::NodeConfig;
use crate::shutdown::Shutdown;

/// Most events handled before the set is applied, when they keep coming.
const EVENT_BATCH: usize = 1024;

/// How one watch ended.
enum Outcome {
    /// Shutting down.
    Shutdown,
    /// SIGHUP: new client, re-list.
    Reload,
    /// The watch failed; `gone` for 410 (the watch history was compacted).
    Failed { error: String, gone: bool },
}

/// The kubernetes source's task; see [`super::run`].
pub(crate) async fn run(
    config: InventoryConfig,
    publisher: Publisher,
    reload: Arc<Notify>,
    shutdown: Shutdown,
) {
    let mut backoff = Backoff::new(RETRY_BASE, RETRY_MAX);
    let mut client: Option<kube::Client> = None;
    let mut nodes = NodeSet::new(config.kubernetes.node_annotations());
    // Consecutive 410s without a completed list: the first re-lists at
    // once, repeats back off.
    let mut gone_streak = 0u32;
    loop {
        if shutdown.is_triggered() {
            return;
        }
        let current = match &client {
            Some(c) => c.clone(),
            None => {
                let made = tokio::select! {
                    _ = shutdown.wait() => return,
                    made = make_client(&config) => made,
                };
                match made {
                    Ok(c) => {
                        client = Some(c.clone());
                        c
                    }
                    Err(e) => {
                        publisher.failed(&e);
                        match retry_after(backoff.next_delay(), &reload, &shutdown).await {
                            Retry::Stop => return,
                            Retry::Now | Retry::Reload => continue,
                        }
                    }
                }
            }
        };
        let outcome = watch_nodes(
            &config,
            current,
            &mut nodes,
            &publisher,
            &reload,
            &shutdown,
            &mut backoff,
            &mut gone_streak,
        )
        .await;
        match outcome {
            Outcome::Shutdown => return,
            Outcome::Reload => {
                tracing::info!(
                    source = "kubernetes",
                    "re-reading the kubeconfig and re-listing nodes"
                );
                client = None;
            }
            Outcome::Failed { error, gone } => {
                let delay = backoff.next_delay();
                let delay = if gone {
                    gone_streak += 1;
                    if gone_streak == 1 {
                        tracing::info!(source = "kubernetes", error = %error, "node watch expired: re-listing");
                        Duration::ZERO
                    } else {
                        publisher.failed(&InventoryError::KubeWatch(error));
                        delay
                    }
                } else {
                    publisher.failed(&InventoryError::KubeWatch(error));
                    delay
                };
                match retry_after(delay, &reload, &shutdown).await {
                    Retry::Stop => return,
                    Retry::Reload => client = None,
                    Retry::Now => {}
                }
            }
        }
    }
}

/// How a wait before a retry ended.
enum Retry {
    /// The delay passed.
    Now,
    /// SIGHUP cut it short: re-read the kubeconfig too.
    Reload,
    /// Shutting down.
    Stop,
}

/// Wait `delay` before the next attempt; SIGHUP cuts it short (the operator
/// fixed something).
async fn retry_after(delay: Duration, reload: &Notify, shutdown: &Shutdown) -> Retry {
    if shutdown.is_triggered() {
        return Retry::Stop;
    }
    if delay.is_zero() {
        return Retry::Now;
    }
    tokio::select! {
        _ = reload.notified() => Retry::Reload,
        stop = pause(delay, shutdown) => if stop { Retry::Stop } else { Retry::Now },
    }
}

/// A client from the configured kubeconfig, or the in-cluster configuration
/// (service account token and CA) when none is set.
async fn make_client(config: &InventoryConfig) -> Result<kube::Client, InventoryError> {
    let kube_config = match &config.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .map_err(|e| InventoryError::KubeClient(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|e| InventoryError::KubeClient(format!("{}: {e}", path.display())))?
        }
        None => kube::Config::incluster().map_err(|e| {
            InventoryError::KubeClient(format!(
                "in-cluster configuration (set inventory.kubeconfig outside a pod): {e}"
            ))
        })?,
    };
    kube::Client::try_from(kube_config).map_err(|e| InventoryError::KubeClient(e.to_string()))
}

/// One watcher from a fresh list until it fails, SIGHUP, or shutdown.
#[allow(clippy::too_many_arguments)]
async fn watch_nodes(
    config: &InventoryConfig,
    client: kube::Client,
    nodes: &mut NodeSet,
    publisher: &Publisher,
    reload: &Notify,
    shutdown: &Shutdown,
    backoff: &mut Backoff,
    gone_streak: &mut u32,
) -> Outcome {
    let api: Api<Node> = Api::all(client);
    let mut wc = watcher::Config::default();
    if let Some(selector) = config
        .label_selector
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        wc = wc.labels(selector);
    }
    let mut stream = watcher(api, wc).boxed();
    let mut healthy = false;
    let mut resync = tokio::time::interval_at(Instant::now() + RESYNC_INTERVAL, RESYNC_INTERVAL);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = tokio::select! {
            _ = shutdown.wait() => return Outcome::Shutdown,
            _ = reload.notified() => return Outcome::Reload,
            _ = resync.tick() => {
                if healthy {
                    publisher.synced();
                }
                continue;
            }
            event = stream.next() => event,
        };
        // Take whatever else is ready, then apply once.
        let mut next = Some(first);
        let mut handled = 0;
        let mut failure = None;
        while let Some(event) = next.take() {
            match event {
                None => {
                    failure = Some(Outcome::Failed {
                        error: "the watch stream ended".into(),
                        gone: false,
                    });
                }
                Some(Err(e)) => {
                    failure = Some(Outcome::Failed {
                        gone: is_gone(&e),
                        error: e.to_string(),
                    });
                }
                Some(Ok(event)) => {
                    if nodes.handle(event, &config.address_types) {
                        healthy = true;
                        backoff.reset();
                        *gone_streak = 0;
                    }
                }
            }
            handled += 1;
            if failure.is_none() && handled < EVENT_BATCH {
                next = stream.next().now_or_never();
            }
        }
        if nodes.dirty && nodes.init.is_none() {
            nodes.dirty = false;
            publisher.apply(nodes.in_force.values().cloned().collect());
        }
        if let Some(failure) = failure {
            return failure;
        }
    }
}

/// 410 Gone in any of the forms the watcher reports it.
fn is_gone(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::WatchError(status) => status.code == 410,
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => status.code == 410,
        _ => false,
    }
}

/// The node set the watch has built.
#[derive(Default)]
struct NodeSet {
    /// Whether the SSH endpoint annotations count.
    annotations: convert::NodeAnnotations,
    /// Nodes whose ignored annotations were already logged.
    annotations_logged: HashSet<String>,
    /// The nodes as last handed to the sink (or about to be, when dirty).
    in_force: BTreeMap<String, NodeConfig>,
    /// A list in progress (between `Init` and `InitDone`).
    init: Option<BTreeMap<String, NodeConfig>>,
    /// Nodes skipped, with the reason last logged (to log each reason once).
    skipped: HashMap<String, String>,
    /// `in_force` changed since it was last applied.
    dirty: bool,
}

impl NodeSet {
    fn new(annotations: convert::NodeAnnotations) -> NodeSet {
        NodeSet {
            annotations,
            ..NodeSet::default()
        }
    }

    /// Take one watcher event; true when a list completed.
    fn handle(&mut self, event: Event<Node>, address_types: &[String]) -> bool {
        match event {
            Event::Init => {
                self.init = Some(BTreeMap::new());
                self.skipped.clear();
                false
            }
            Event::InitApply(node) => {
                if let Some((name, config)) = self.convert(&node, address_types) {
                    self.init
                        .get_or_insert_with(BTreeMap::new)
                        .insert(name, config);
                }
                false
            }
            Event::InitDone => {
                self.in_force = self.init.take().unwrap_or_default();
                // Always apply after a list: it confirms the sync, and the
                // sink leaves unchanged nodes alone.
                self.dirty = true;
                true
            }
            Event::Apply(node) => {
                if let Some((name, config)) = self.convert(&node, address_types) {
                    if self.in_force.get(&name) != Some(&config) {
                        self.in_force.insert(name, config);
                        self.dirty = true;
                    }
                }
                false
            }
            Event::Delete(node) => {
                if let Some(name) = node.metadata.name.as_deref() {
                    self.skipped.remove(name);
                    self.annotations_logged.remove(name);
                    if self.in_force.remove(name).is_some() {
                        self.dirty = true;
                    }
                }
                false
            }
        }
    }

    /// The entry for `node`: converted, or (when it cannot be) its entry in
    /// force, if any.
    fn convert(&mut self, node: &Node, address_types: &[String]) -> Option<(String, NodeConfig)> {
        let name = node.metadata.name.clone().unwrap_or_default();
        if self.annotations == convert::NodeAnnotations::Ignored {
            self.log_ignored_annotations(&name, node);
        }
        match convert::node_config(node, address_types, self.annotations) {
            Ok(config) => {
                self.skipped.remove(&name);
                Some((name, config))
            }
            Err(error) => {
                let reason = error.to_string();
                let previous = self.in_force.get(&name).cloned();
                if self.skipped.get(&name) != Some(&reason) {
                    tracing::warn!(
                        source = "kubernetes",
                        node = %name,
                        reason = %reason,
                        kept = previous.is_some(),
                        "node skipped; a node in force keeps its previous entry"
                    );
                    self.skipped.insert(name.clone(), reason);
                }
                previous.map(|p| (name, p))
            }
        }
    }

    /// Say once per node that its SSH endpoint annotations are ignored, and
    /// how to honour them.
    fn log_ignored_annotations(&mut self, name: &str, node: &Node) {
        let present = convert::ssh_endpoint_annotations(node);
        if present.is_empty() || self.annotations_logged.contains(name) {
            return;
        }
        tracing::info!(
            source = "kubernetes",
            node = %name,
            annotations = %present.join(", "),
            "SSH endpoint annotations ignored: the node can write them itself; \
             set inventory.kubernetes.trust_node_annotations = true to honour them"
        );
        self.annotations_logged.insert(name.to_string());
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::{NodeAddress, NodeStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn types() -> Vec<String> {
        vec!["InternalIP".into()]
    }

    fn node(name: &str, ip: &str, port: Option<&str>) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                annotations: port.map(|p| {
                    BTreeMap::from([(convert::ANNOTATION_SSH_PORT.to_string(), p.to_string())])
                }),
                ..Default::default()
            },
            status: Some(NodeStatus {
                addresses: Some(vec![NodeAddress {
                    type_: "InternalIP".into(),
                    address: ip.into(),
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn names(set: &NodeSet) -> Vec<&str> {
        set.in_force.keys().map(String::as_str).collect()
    }

    #[test]
    fn a_relist_replaces_the_set_and_removes_vanished_nodes() {
        let mut set = NodeSet::default();
        let t = types();
        assert!(!set.handle(Event::Init, &t));
        set.handle(Event::InitApply(node("a", "10.0.0.1", None)), &t);
        set.handle(Event::InitApply(node("b", "10.0.0.2", None)), &t);
        assert!(names(&set).is_empty(), "nothing in force before InitDone");
        assert!(set.handle(Event::InitDone, &t));
        assert_eq!(names(&set), ["a", "b"]);
        set.dirty = false;

        set.handle(Event::Init, &t);
        set.handle(Event::InitApply(node("b", "10.0.0.2", None)), &t);
        assert_eq!(names(&set), ["a", "b"], "the old set stays during a list");
        set.handle(Event::InitDone, &t);
        assert_eq!(names(&set), ["b"]);
        assert!(set.dirty);
    }

    #[test]
    fn unchanged_nodes_do_not_dirty_the_set_and_deletes_do() {
        let mut set = NodeSet::default();
        let t = types();
        set.handle(Event::Init, &t);
        set.handle(Event::InitDone, &t);
        set.dirty = false;
        set.handle(Event::Apply(node("a", "10.0.0.1", None)), &t);
        assert!(set.dirty);
        set.dirty = false;
        set.handle(Event::Apply(node("a", "10.0.0.1", None)), &t);
        assert!(!set.dirty, "a heartbeat changes nothing");
        set.handle(Event::Delete(node("zz", "10.0.0.9", None)), &t);
        assert!(!set.dirty, "deleting an unknown node changes nothing");
        set.handle(Event::Delete(node("a", "10.0.0.1", None)), &t);
        assert!(set.dirty);
        assert!(names(&set).is_empty());
    }

    /// Log lines written while `f` runs (this thread only).
    fn logged(f: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Buffer(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(data);
                Ok(data.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let bytes = buffer.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn untrusted_annotations_are_ignored_and_said_once_per_node() {
        let mut set = NodeSet::new(convert::NodeAnnotations::Ignored);
        let t = types();
        let log = logged(|| {
            set.handle(Event::Init, &t);
            set.handle(Event::InitApply(node("a", "10.0.0.1", Some("2222"))), &t);
            set.handle(Event::InitApply(node("b", "10.0.0.2", None)), &t);
            set.handle(Event::InitDone, &t);
            // A heartbeat, a re-list, and an invalid value: nothing new to say.
            set.handle(Event::Apply(node("a", "10.0.0.1", Some("2222"))), &t);
            set.handle(Event::Init, &t);
            set.handle(Event::InitApply(node("a", "10.0.0.1", Some("22x"))), &t);
            set.handle(Event::InitDone, &t);
        });
        assert_eq!(set.in_force["a"].ssh_port, None, "the [ssh] port");
        assert_eq!(set.in_force["a"].ssh_address(), "10.0.0.1");
        assert!(set.skipped.is_empty(), "an ignored value is never read");
        let lines: Vec<&str> = log.lines().filter(|l| l.contains("ignored")).collect();
        assert_eq!(lines.len(), 1, "{log}");
        assert!(lines[0].contains("node=a"), "{log}");
        assert!(lines[0].contains(convert::ANNOTATION_SSH_PORT), "{log}");
        assert!(
            lines[0].contains("inventory.kubernetes.trust_node_annotations = true"),
            "{log}"
        );
        // A node deleted and created again is a new node: said again.
        let log = logged(|| {
            set.handle(Event::Delete(node("a", "10.0.0.1", None)), &t);
            set.handle(Event::Apply(node("a", "10.0.0.1", Some("2222"))), &t);
        });
        assert_eq!(
            log.lines().filter(|l| l.contains("ignored")).count(),
            1,
            "{log}"
        );
    }

    #[test]
    fn trusted_annotations_set_the_port() {
        let mut set = NodeSet::new(convert::NodeAnnotations::Trusted);
        let t = types();
        let log = logged(|| {
            set.handle(Event::Apply(node("a", "10.0.0.1", Some("2222"))), &t);
        });
        assert_eq!(set.in_force["a"].ssh_port, Some(2222));
        assert!(!log.contains("ignored"), "{log}");
    }

    #[test]
    fn an_invalid_annotation_keeps_the_node_in_force_and_skips_a_new_one() {
        let mut set = NodeSet::new(convert::NodeAnnotations::Trusted);
        let t = types();
        set.handle(Event::Init, &t);
        set.handle(Event::InitApply(node("a", "10.0.0.1", Some("2222"))), &t);
        set.handle(Event::InitDone, &t);
        set.handle(Event::Apply(node("a", "10.0.0.5", Some("22x"))), &t);
        assert_eq!(set.in_force["a"].ssh_port, Some(2222));
        assert_eq!(set.in_force["a"].ssh_address(), "10.0.0.1");
        set.handle(Event::Apply(node("b", "10.0.0.2", Some("0"))), &t);
        assert_eq!(names(&set), ["a"]);
        // Also across a re-list.
        set.handle(Event::Init, &t);
        set.handle(Event::InitApply(node("a", "10.0.0.5", Some("22x"))), &t);
        set.handle(Event::InitDone, &t);
        assert_eq!(set.in_force["a"].ssh_port, Some(2222));
    }
}
