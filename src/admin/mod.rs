//! The admin API: health, readiness, Prometheus metrics and the tunnel
//! table over HTTP, on a loopback TCP port or a Unix socket.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// The `[admin]` table.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// TCP listener (loopback unless `allow_non_loopback`). `None` with no
    /// `uds`: no admin API.
    pub listen: Option<SocketAddr>,
    /// Unix socket listener (mode 0660).
    pub uds: Option<PathBuf>,
    /// Export per-node series (`node` label). Off by default: at thousands
    /// of nodes they multiply the series count.
    pub per_node_metrics: bool,
    /// Allow `listen` on a non-loopback address (the API has no
    /// authentication; `reconnect` changes state).
    pub allow_non_loopback: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 8133))),
            uds: None,
            per_node_metrics: false,
            allow_non_loopback: false,
        }
    }
}

impl AdminConfig {
    /// Check the table; the error is (key path, reason).
    pub fn validate(&self) -> Result<(), (String, String)> {
        if let Some(addr) = self.listen {
            if !addr.ip().is_loopback() && !self.allow_non_loopback {
                return Err((
                    "admin.listen".into(),
                    format!("{addr} is not a loopback address; the admin API has no authentication (set admin.allow_non_loopback = true to insist)"),
                ));
            }
        }
        if let Some(path) = &self.uds {
            if path.as_os_str().is_empty() {
                return Err(("admin.uds".into(), "must not be empty".into()));
            }
        }
        Ok(())
    }
}

/// The `[readiness]` table: when `/readyz` answers 200.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ReadinessConfig {
    /// The inventory must have synced within this age (the old SSH
    /// tunneler's 600 s check).
    #[serde(with = "humantime_serde")]
    pub max_sync_age: Duration,
    /// Fraction of nodes (0.0 to 1.0) that must have a Ready session; 0
    /// means at least one node.
    pub min_ready_fraction: f64,
}

impl Default for ReadinessConfig {
    fn default() -> Self {
        ReadinessConfig {
            max_sync_age: Duration::from_secs(600),
            min_ready_fraction: 0.0,
        }
    }
}

impl ReadinessConfig {
    /// Check the table; the error is (key path, reason).
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.max_sync_age.is_zero() {
            return Err((
                "readiness.max_sync_age".into(),
                "must be greater than zero".into(),
            ));
        }
        if !(0.0..=1.0).contains(&self.min_ready_fraction) {
            return Err((
                "readiness.min_ready_fraction".into(),
                "must be between 0.0 and 1.0".into(),
            ));
        }
        Ok(())
    }
}
