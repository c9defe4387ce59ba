//! An inventory source (`nodetunnel::inventory::run`) running in the test
//! process, feeding a [`Recorder`] (optionally in front of a tunnel
//! manager), and the waits on its sync status. Used by `inventory_file` and
//! `inventory_kubernetes`.

use std::path::Path;
use std::sync::{Arc, Mutex};

use nodetunnel::config::{Config, NodeConfig};
use nodetunnel::inventory::{self, InventoryConfig, NodeSink, SyncStatus};
use nodetunnel::manager::{ApplySummary, TunnelManager};
use nodetunnel::metrics::Metrics;
use nodetunnel::shutdown::Shutdown;
use tokio::sync::Notify;

use super::inproc::{write_known_hosts, DEADLINE, SSH_TOML};

/// The tunnel manager (if any), recording what each apply changed.
pub struct Recorder {
    manager: Option<Arc<TunnelManager>>,
    applied: Mutex<Vec<(Vec<NodeConfig>, ApplySummary)>>,
}

impl Recorder {
    pub fn new(manager: Option<Arc<TunnelManager>>) -> Arc<Recorder> {
        Arc::new(Recorder {
            manager,
            applied: Mutex::new(Vec::new()),
        })
    }

    pub fn applies(&self) -> usize {
        self.applied.lock().unwrap().len()
    }

    /// The last apply: the nodes and what it changed.
    pub fn last(&self) -> (Vec<NodeConfig>, ApplySummary) {
        self.applied
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("an apply")
    }

    /// The names last applied, in the order applied (none before the first
    /// apply).
    pub fn names(&self) -> Vec<String> {
        self.applied
            .lock()
            .unwrap()
            .last()
            .map(|a| a.0.iter().map(|n| n.name.clone()).collect())
            .unwrap_or_default()
    }
}

impl NodeSink for Recorder {
    fn apply(&self, nodes: Vec<NodeConfig>) -> ApplySummary {
        let summary = match &self.manager {
            Some(m) => m.apply(nodes.clone()),
            None => ApplySummary::default(),
        };
        self.applied.lock().unwrap().push((nodes, summary.clone()));
        summary
    }
}

/// Wait (bounded) until `check` passes, re-checking after every sync or
/// failure the inventory records.
pub async fn wait_sync<T>(
    status: &SyncStatus,
    what: &str,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let changed = status.changed().notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if let Some(value) = check() {
            return value;
        }
        if tokio::time::timeout_at(deadline, changed).await.is_err() {
            panic!(
                "timed out waiting for {what}; syncs {}, failures {}, last error {:?}",
                status.syncs(),
                status.failures(),
                status.last_error()
            );
        }
    }
}

/// Write `known_hosts` (`known_hosts_lines`) and `nodetunnel.toml` in `dir`:
/// the suites' `[ssh]` table with `drain_timeout = "1s"`, then the
/// `[inventory]` table `inventory`; load it and build a tunnel manager
/// (with no nodes: the inventory brings them). The config and the manager.
pub fn inventory_manager(
    dir: &Path,
    known_hosts_lines: &[String],
    inventory: &str,
) -> (Config, Arc<TunnelManager>) {
    write_known_hosts(dir, known_hosts_lines);
    let text = format!("{SSH_TOML}drain_timeout = \"1s\"\n\n[inventory]\n{inventory}");
    let path = dir.join("nodetunnel.toml");
    std::fs::write(&path, text).unwrap();
    let config = Config::load(&path).unwrap();
    let manager =
        TunnelManager::new(&config, config.routing.clone(), Arc::new(Metrics::new())).unwrap();
    (config, manager)
}

/// A running inventory source.
pub struct Running {
    pub status: Arc<SyncStatus>,
    pub metrics: Arc<Metrics>,
    pub reload: Arc<Notify>,
    pub shutdown: Shutdown,
    task: tokio::task::JoinHandle<()>,
}

/// Run the inventory source `config`, applying to `sink`.
pub fn start(config: InventoryConfig, sink: Arc<Recorder>) -> Running {
    let status = Arc::new(SyncStatus::default());
    let metrics = Arc::new(Metrics::new());
    let reload = Arc::new(Notify::new());
    let shutdown = Shutdown::new();
    let task = tokio::spawn(inventory::run(
        config,
        sink,
        status.clone(),
        metrics.clone(),
        reload.clone(),
        shutdown.clone(),
    ));
    Running {
        status,
        metrics,
        reload,
        shutdown,
        task,
    }
}

impl Running {
    /// Shut it down; it must end (bounded) without a panic.
    pub async fn stop(self) {
        self.shutdown.trigger();
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("the inventory task ends on shutdown")
            .expect("the inventory task does not panic");
    }
}

/// `nodetunnel_inventory_sync_failures_total` in `metrics`.
pub fn failures_metric(metrics: &Metrics) -> u64 {
    let text = metrics.encode();
    text.lines()
        .find_map(|l| l.strip_prefix("nodetunnel_inventory_sync_failures_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no failure counter in\n{text}"))
}
