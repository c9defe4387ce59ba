//! The node inventory: where the list of nodes comes from (the config file,
//! a watched file, or a Kubernetes Node watch) and how changes reach the
//! tunnel manager.

use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use crate::config::NodeConfig;
use crate::manager::ApplySummary;

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
}

impl Default for InventoryConfig {
    fn default() -> Self {
        InventoryConfig {
            source: InventorySource::Static,
            path: None,
            kubeconfig: None,
            label_selector: None,
            address_types: vec!["InternalIP".into(), "ExternalIP".into(), "Hostname".into()],
        }
    }
}

impl InventoryConfig {
    /// Check the table; the error is (key path, reason).
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.source == InventorySource::File && self.path.is_none() {
            return Err((
                "inventory.path".into(),
                "is required with source = \"file\"".into(),
            ));
        }
        if self.address_types.is_empty() {
            return Err((
                "inventory.address_types".into(),
                "needs at least one address type".into(),
            ));
        }
        Ok(())
    }
}

/// Receives complete node lists. The tunnel manager is the production sink.
pub trait NodeSink: Send + Sync + 'static {
    /// Make the running set match `nodes`.
    fn apply(&self, nodes: Vec<NodeConfig>) -> ApplySummary;
}

/// Health of the inventory: when it last synced and how often it failed.
/// Readiness reads it.
#[derive(Debug, Default)]
pub struct SyncStatus {
    last_sync_unix: AtomicI64,
    failures: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl SyncStatus {
    /// Record a successful sync now.
    pub fn synced(&self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        self.last_sync_unix.store(now, Ordering::Release);
        if let Ok(mut e) = self.last_error.lock() {
            *e = None;
        }
    }

    /// Record a failed sync (the previous inventory stays in force).
    pub fn failed(&self, error: String) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut e) = self.last_error.lock() {
            *e = Some(error);
        }
    }

    /// Unix time of the last successful sync, if any.
    pub fn last_sync_unix(&self) -> Option<i64> {
        match self.last_sync_unix.load(Ordering::Acquire) {
            0 => None,
            t => Some(t),
        }
    }

    /// Failed syncs since start.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// The error of the last sync, if it failed.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }
}
