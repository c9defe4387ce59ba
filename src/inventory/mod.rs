//! The node inventory: where the list of nodes comes from (the config file,
//! a watched file, or a Kubernetes Node watch) and how changes reach the
//! tunnel manager.
//!
//! This module owns the `[inventory]` table ([`InventoryConfig`]), the
//! [`NodeSink`] every change goes through (the tunnel manager in
//! production), the sync health readiness reads ([`SyncStatus`]), and
//! [`run`], the long-lived task of the `file` and `kubernetes` sources:
//!
//! - [`file`](mod@file): parsing a nodes file (TOML `[[nodes]]` or `kubectl get nodes
//!   -o json`) and watching it for changes.
//! - [`kubernetes`]: the Node list+watch.
//! - [`convert`]: Node object to [`NodeConfig`], shared by both.
//!
//! Every source hands the sink complete node lists; a failure (a broken file,
//! an unreachable apiserver) is logged, counted and recorded in
//! [`SyncStatus`], and never clears the inventory in force.

pub mod convert;
pub mod file;
pub mod kubernetes;

pub use file::{parse_nodes_file, parse_nodes_file_with};

use crate::field_error::FieldError;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use tokio::sync::Notify;

use crate::metrics::Metrics;
use crate::node::NodeConfig;
use crate::shutdown::Shutdown;

/// Where the nodes come from.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum InventorySource {
    /// The `[[nodes]]` of the config file (re-read on SIGHUP).
    #[default]
    Static,
    /// A separate file, watched and re-read on change and on SIGHUP.
    File,
    /// A watch on Kubernetes Node objects.
    Kubernetes,
}

/// The `[inventory]` table.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct InventoryConfig {
    /// static | file | kubernetes.
    pub source: InventorySource,
    /// For `file`: `[[nodes]]` in the config's shape, or the JSON that
    /// `kubectl get nodes -o json` prints. Relative to the config file.
    pub path: Option<PathBuf>,
    /// For `kubernetes`: a kubeconfig; in-cluster config when unset.
    pub kubeconfig: Option<PathBuf>,
    /// For `kubernetes`: only nodes matching this label selector.
    pub label_selector: Option<String>,
    /// Node address types in order of preference (the first is dialled).
    pub address_types: Vec<String>,
    /// `[inventory.kubernetes]`: settings of the `kubernetes` source only.
    pub kubernetes: KubernetesSourceConfig,
}

/// The `[inventory.kubernetes]` table.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesSourceConfig {
    /// Honour the SSH endpoint annotations of Node objects
    /// (`nodetunnel.dev/ssh-address`, `-port`, `-user`). Off by default: a
    /// node may edit its own Node object, so a compromised node could send
    /// its tunnel to another address, port or user. When off, a node that
    /// has them is dialled at its first address of the preferred type with
    /// the `[ssh]` port and user, and the annotations are logged as ignored
    /// once per node.
    pub trust_node_annotations: bool,
}

impl KubernetesSourceConfig {
    /// How the source treats the SSH endpoint annotations.
    pub fn node_annotations(&self) -> convert::NodeAnnotations {
        if self.trust_node_annotations {
            convert::NodeAnnotations::Trusted
        } else {
            convert::NodeAnnotations::Ignored
        }
    }
}

impl Default for InventoryConfig {
    fn default() -> Self {
        InventoryConfig {
            source: InventorySource::Static,
            path: None,
            kubeconfig: None,
            label_selector: None,
            address_types: vec!["InternalIP".into(), "ExternalIP".into(), "Hostname".into()],
            kubernetes: KubernetesSourceConfig::default(),
        }
    }
}

impl InventoryConfig {
    /// Check the table; the error is (key path, reason).
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.source == InventorySource::File && self.path.is_none() {
            return Err(FieldError::new(
                "inventory.path".into(),
                "is required with source = \"file\"".into(),
            ));
        }
        if self.address_types.is_empty() {
            return Err(FieldError::new(
                "inventory.address_types".into(),
                "needs at least one address type".into(),
            ));
        }
        if self.kubernetes.trust_node_annotations && self.source != InventorySource::Kubernetes {
            return Err(FieldError::new(
                "inventory.kubernetes.trust_node_annotations".into(),
                "applies only with source = \"kubernetes\" (the nodes file's annotations are always taken as written)".into(),
            ));
        }
        Ok(())
    }
}

/// What one [`NodeSink::apply`] changed (the tunnel manager's answer).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplySummary {
    /// Nodes that got a new tunnel.
    pub added: Vec<String>,
    /// Nodes whose address or SSH settings changed: reconnected.
    pub changed: Vec<String>,
    /// Nodes removed: draining.
    pub removed: Vec<String>,
    /// Nodes left untouched.
    pub unchanged: usize,
}

/// Receives complete node lists. The tunnel manager is the production sink.
pub trait NodeSink: Send + Sync + 'static {
    /// Make the running set match `nodes`.
    fn apply(&self, nodes: Vec<NodeConfig>) -> ApplySummary;
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Health of the inventory: when it last synced and how often it failed.
/// Readiness reads it.
#[derive(Debug, Default)]
pub struct SyncStatus {
    last_sync_unix: AtomicI64,
    failures: AtomicU64,
    syncs: AtomicU64,
    last_error: Mutex<Option<String>>,
    changed: Notify,
    /// The inventory is the config file itself (source = "static"): once
    /// applied it cannot go stale, so it counts as synced at every read.
    always_current: std::sync::atomic::AtomicBool,
}

impl SyncStatus {
    /// Record a successful sync now.
    pub fn synced(&self) {
        self.last_sync_unix.store(unix_now(), Ordering::Release);
        if let Ok(mut e) = self.last_error.lock() {
            *e = None;
        }
        self.syncs.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_waiters();
    }

    /// Record a failed sync (the previous inventory stays in force).
    pub fn failed(&self, error: String) {
        if let Ok(mut e) = self.last_error.lock() {
            *e = Some(error);
        }
        self.failures.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_waiters();
    }

    /// Successful syncs since start (a source that confirms an unchanged
    /// inventory counts too).
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Acquire)
    }

    /// Notified (all waiters) after every [`synced`](Self::synced) and
    /// [`failed`](Self::failed). Enable the `Notified` before reading the
    /// counters to miss nothing.
    pub fn changed(&self) -> &Notify {
        &self.changed
    }

    /// Mark the inventory as the static one from the config file: after its
    /// first sync it is current at every read (readiness never finds it
    /// stale; SIGHUP re-applies it).
    pub fn set_always_current(&self) {
        self.always_current.store(true, Ordering::Release);
    }

    /// Unix time of the last successful sync, if any (now, for a static
    /// inventory that was applied).
    pub fn last_sync_unix(&self) -> Option<i64> {
        match self.last_sync_unix.load(Ordering::Acquire) {
            0 => None,
            _ if self.always_current.load(Ordering::Acquire) => Some(unix_now()),
            t => Some(t),
        }
    }

    /// Failed syncs since start.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Acquire)
    }

    /// The error of the last sync, if it failed.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }
}

/// Why a sync failed. The inventory in force is kept.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    /// The nodes file could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The nodes file is refused: where and why.
    #[error("{}: {}", path.display(), describe(*line, field, reason))]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line of the fault, when known.
        line: Option<usize>,
        /// Key path of the fault (`nodes[1].addresses[0]`,
        /// `items[2].metadata.name`); empty when the whole file is at fault.
        field: String,
        /// One line saying what is wrong.
        reason: String,
    },
    /// The nodes file cannot be watched for changes (it is still re-read
    /// periodically and on SIGHUP).
    #[error("{}: cannot watch for changes: {reason}", path.display())]
    Watch {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// No Kubernetes client: kubeconfig or in-cluster configuration failed.
    #[error("kubernetes client: {0}")]
    KubeClient(String),
    /// The Node list or watch failed.
    #[error("kubernetes node watch: {0}")]
    KubeWatch(String),
}

fn describe(line: Option<usize>, field: &str, reason: &str) -> String {
    let mut out = String::new();
    if let Some(line) = line {
        out.push_str(&format!("line {line}: "));
    }
    if !field.is_empty() {
        out.push_str(field);
        out.push_str(": ");
    }
    out.push_str(reason);
    out
}

/// First delay bound after a failure (doubles per failure, full jitter).
const RETRY_BASE: Duration = Duration::from_millis(500);
/// Largest delay between retries.
const RETRY_MAX: Duration = Duration::from_secs(30);
/// How often a healthy source confirms its inventory (the file is re-read,
/// a live watch counts as synced), so readiness sees a fresh sync time in a
/// quiet cluster.
const RESYNC_INTERVAL: Duration = Duration::from_secs(60);

/// Run the inventory source of `config` until `shutdown`: watch the file
/// (`file`) or the Node objects (`kubernetes`) and hand every change to
/// `sink`. `reload` (SIGHUP) re-reads the file, or re-lists the nodes and
/// re-reads the kubeconfig.
///
/// Never panics and never returns early: errors are logged (fields
/// `source`, `path`, `error`), counted in
/// `nodetunnel_inventory_sync_failures_total` and [`SyncStatus::failed`],
/// and retried with backoff; the inventory in force is kept meanwhile.
/// Every success sets [`SyncStatus::synced`] and
/// `nodetunnel_inventory_last_sync_timestamp_seconds`. With the `static`
/// source there is nothing to watch (serve applies `[[nodes]]` itself) and
/// this only waits for `shutdown`.
pub async fn run(
    config: InventoryConfig,
    sink: Arc<dyn NodeSink>,
    status: Arc<SyncStatus>,
    metrics: Arc<Metrics>,
    reload: Arc<Notify>,
    shutdown: Shutdown,
) {
    match config.source {
        InventorySource::Static => shutdown.wait().await,
        InventorySource::File => {
            let path = config.path.as_deref().map(Path::display);
            let path = path.map(|p| p.to_string()).unwrap_or_default();
            let publisher = Publisher::new("file", path, sink, status, metrics);
            file::run(config, publisher, reload, shutdown).await
        }
        InventorySource::Kubernetes => {
            let path = config.kubeconfig.as_deref().map(Path::display);
            let path = path.map_or_else(|| "in-cluster".to_string(), |p| p.to_string());
            let publisher = Publisher::new("kubernetes", path, sink, status, metrics);
            kubernetes::run(config, publisher, reload, shutdown).await
        }
    }
}

/// Hands node lists to the sink and records the outcome: the one place that
/// touches [`SyncStatus`] and the inventory metrics.
pub(crate) struct Publisher {
    source: &'static str,
    path: String,
    sink: Arc<dyn NodeSink>,
    status: Arc<SyncStatus>,
    metrics: Arc<Metrics>,
}

impl Publisher {
    /// `path` is what logs name: the nodes file, the kubeconfig, or
    /// `in-cluster`.
    fn new(
        source: &'static str,
        path: String,
        sink: Arc<dyn NodeSink>,
        status: Arc<SyncStatus>,
        metrics: Arc<Metrics>,
    ) -> Publisher {
        Publisher {
            source,
            path,
            sink,
            status,
            metrics,
        }
    }

    /// Make the sink's set match `nodes` and record a successful sync.
    pub(crate) fn apply(&self, nodes: Vec<NodeConfig>) -> ApplySummary {
        let total = nodes.len();
        let summary = self.sink.apply(nodes);
        if !summary.added.is_empty() || !summary.changed.is_empty() || !summary.removed.is_empty() {
            tracing::info!(
                source = self.source,
                path = %self.path,
                nodes = total,
                added = ?summary.added,
                changed = ?summary.changed,
                removed = ?summary.removed,
                "inventory synced"
            );
        }
        self.synced();
        summary
    }

    /// Record that the inventory in force is current.
    pub(crate) fn synced(&self) {
        self.status.synced();
        self.metrics
            .inventory_last_sync
            .set(self.status.last_sync_unix().unwrap_or(0));
    }

    /// Record a failed sync; the inventory in force stays.
    pub(crate) fn failed(&self, error: &InventoryError) {
        tracing::error!(
            source = self.source,
            path = %self.path,
            error = %error,
            "inventory sync failed; keeping the previous inventory"
        );
        self.metrics.inventory_sync_failures.inc();
        self.status.failed(error.to_string());
    }

    /// The source name, for logs.
    pub(crate) fn source(&self) -> &'static str {
        self.source
    }
}

/// Wait `delay`, or less if `shutdown` fires; true when shutting down.
async fn pause(delay: Duration, shutdown: &Shutdown) -> bool {
    tokio::select! {
        _ = shutdown.wait() => true,
        _ = tokio::time::sleep(delay) => shutdown.is_triggered(),
    }
}
