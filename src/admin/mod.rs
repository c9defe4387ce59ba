//! The admin API: health, readiness, Prometheus metrics and the tunnel
//! table over HTTP, on a loopback TCP port or a Unix socket.
//!
//! This module owns the `[admin]` and `[readiness]` tables
//! ([`AdminConfig`], [`ReadinessConfig`]) and the admin HTTP server. Every
//! answer is computed from live state (the tunnel manager, the inventory's
//! [`SyncStatus`], the metrics registry) when
//! the request arrives; nothing is cached.
//!
//! - `GET /healthz`: 200 while the process runs.
//! - `GET /readyz`: 200 or 503 with the reason ([`readiness`]).
//! - `GET /metrics`: OpenMetrics text when the `Accept` header asks for it, the classic Prometheus text format otherwise.
//! - `GET /api/v1/tunnels`, `GET /api/v1/tunnels/{node}`,
//!   `POST /api/v1/tunnels/{node}/reconnect`, `GET /api/v1/route?dest=HOST:PORT`:
//!   JSON ([`api`]).
//!
//! Every request must carry a `Host` that is an IP literal, `localhost` or
//! listed in `admin.allowed_hosts`; every `POST` the header
//! `X-Nodetunnel-Request`; reconnects are limited per node ([`guard`]).
//!
//! Files: [`api`] (the JSON types, shared with the CLI), [`readiness`] (the
//! readiness rule), [`guard`] (the checks before an answer), `server`
//! (listeners, connection limits, hyper), `handlers` (routing a request
//! to its answer) and `state` (what both share: the live state, the lane).

pub mod api;
pub mod guard;
mod handlers;
pub mod readiness;
#[cfg(test)]
mod serve_tests;
mod server;
mod state;

pub use server::{AdminError, AdminServer};

/// Connections the admin API holds open at most, one descriptor each:
/// its connection limit and the probe reserve beyond it.
pub const MAX_ADMIN_CONNECTIONS: usize = server::MAX_CONNECTIONS + server::PROBE_RESERVE;
pub use state::AdminState;

use crate::field_error::FieldError;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use tokio::task::JoinHandle;

use crate::inventory::SyncStatus;
use crate::manager::TunnelManager;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// A started admin API: its task and where it listens.
#[derive(Debug)]
pub struct AdminHandle {
    /// The server task; it ends after shutdown.
    pub task: JoinHandle<()>,
    /// The bound TCP address (the real port when 0 was configured).
    pub tcp_addr: Option<SocketAddr>,
    /// The Unix socket path.
    pub uds_path: Option<PathBuf>,
}

/// Bind the admin API configured in `admin` and serve it in a task until
/// `shutdown` fires, answering `/readyz` by `readiness`. `None` when
/// `[admin]` configures no listener.
pub async fn start(
    admin: &AdminConfig,
    readiness: &ReadinessConfig,
    manager: Arc<TunnelManager>,
    metrics: Arc<Metrics>,
    sync: Arc<SyncStatus>,
    shutdown: Shutdown,
) -> Result<Option<AdminHandle>, AdminError> {
    if !admin.enabled() {
        tracing::info!("[admin] configures no listener: no admin API, no /readyz, no /metrics");
        return Ok(None);
    }
    let server = AdminServer::bind(admin, readiness).await?;
    let tcp_addr = server.tcp_addr();
    let uds_path = server.uds_path().map(PathBuf::from);
    let listeners = [
        tcp_addr.map(|a| format!("tcp={a}")),
        uds_path.as_ref().map(|p| format!("uds={}", p.display())),
    ]
    .into_iter()
    .flatten()
    .collect::<Vec<_>>()
    .join(" ");
    tracing::info!(listeners = %listeners, "admin API listening");
    let state = Arc::new(AdminState {
        manager,
        metrics,
        sync,
        readiness: readiness.clone(),
        per_node_metrics: admin.per_node_metrics,
        allowed_hosts: admin.allowed_hosts.clone(),
        reconnects: guard::ReconnectLimiter::default(),
    });
    Ok(Some(AdminHandle {
        task: tokio::spawn(server.serve(state, shutdown)),
        tcp_addr,
        uds_path,
    }))
}

/// The `[admin]` table.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// TCP listener (loopback unless `allow_non_loopback`). `None` (written
    /// `listen = ""` in the file) with no `uds`: no admin API.
    #[serde(deserialize_with = "optional_socket_addr")]
    pub listen: Option<SocketAddr>,
    /// Unix socket listener (mode 0660).
    pub uds: Option<PathBuf>,
    /// Export per-node series (`node` label). Off by default: at thousands
    /// of nodes they multiply the series count.
    pub per_node_metrics: bool,
    /// Allow `listen` on a non-loopback address (the API has no
    /// authentication; `reconnect` changes state).
    pub allow_non_loopback: bool,
    /// Names accepted in the `Host` header besides IP literals and
    /// `localhost` (e.g. a Service name the API is reached by); any other
    /// name gets 403 (DNS rebinding protection).
    pub allowed_hosts: Vec<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 8133))),
            uds: None,
            per_node_metrics: false,
            allow_non_loopback: false,
            allowed_hosts: Vec::new(),
        }
    }
}

/// `"host:port"`, or `""` for none.
fn optional_socket_addr<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(deserializer)?;
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| {
        serde::de::Error::custom(format!(
            "{text:?} is not an IP address and port (e.g. \"127.0.0.1:8133\"); \
             \"\" disables the TCP listener"
        ))
    })
}

impl AdminConfig {
    /// Whether any admin listener is configured.
    pub fn enabled(&self) -> bool {
        self.listen.is_some() || self.uds.is_some()
    }

    /// Check the table; the error is (key path, reason).
    pub fn validate(&self) -> Result<(), FieldError> {
        if let Some(addr) = self.listen {
            if !addr.ip().is_loopback() && !self.allow_non_loopback {
                return Err(FieldError::new(
                    "admin.listen".into(),
                    format!("{addr} is not a loopback address; the admin API has no authentication (set admin.allow_non_loopback = true to insist)"),
                ));
            }
        }
        if let Some(path) = &self.uds {
            if path.as_os_str().is_empty() {
                return Err(FieldError::new(
                    "admin.uds".into(),
                    "must not be empty".into(),
                ));
            }
        }
        for (i, host) in self.allowed_hosts.iter().enumerate() {
            let valid = !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
            if !valid {
                return Err(FieldError::new(
                    format!("admin.allowed_hosts[{i}]"),
                    format!(
                        "{host:?} is not a host name (letters, digits, '.', '-', '_'; no port)"
                    ),
                ));
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
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.max_sync_age.is_zero() {
            return Err(FieldError::new(
                "readiness.max_sync_age".into(),
                "must be greater than zero".into(),
            ));
        }
        if !(0.0..=1.0).contains(&self.min_ready_fraction) {
            return Err(FieldError::new(
                "readiness.min_ready_fraction".into(),
                "must be between 0.0 and 1.0".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admin(text: &str) -> Result<AdminConfig, toml::de::Error> {
        toml::from_str(text)
    }

    #[test]
    fn listen_defaults_to_loopback_8133_and_empty_disables_it() {
        let default = admin("").unwrap();
        assert_eq!(
            default.listen,
            Some(SocketAddr::from(([127, 0, 0, 1], 8133)))
        );
        assert!(default.enabled());
        let off = admin("listen = \"\"").unwrap();
        assert_eq!(off.listen, None);
        assert!(!off.enabled());
        let uds_only = admin("listen = \"\"\nuds = \"/run/nt/admin.sock\"").unwrap();
        assert!(uds_only.enabled());
        let e = admin("listen = \"localhost\"").unwrap_err();
        assert!(e.to_string().contains("not an IP address and port"), "{e}");
    }

    #[test]
    fn non_loopback_listen_needs_the_switch() {
        let exposed = admin("listen = \"0.0.0.0:8133\"").unwrap();
        assert_eq!(exposed.validate().unwrap_err().key, "admin.listen");
        let allowed = admin("listen = \"0.0.0.0:8133\"\nallow_non_loopback = true").unwrap();
        assert!(allowed.validate().is_ok());
    }
}
