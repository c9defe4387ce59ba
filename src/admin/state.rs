//! What an admin request is answered from: the live state the handlers
//! read ([`AdminState`]) and the lane its connection came on ([`Lane`]).
//! Shared by `server` (which accepts) and `handlers` (which answer).

use std::sync::Arc;

use super::guard::ReconnectLimiter;
use super::ReadinessConfig;
use crate::inventory::SyncStatus;
use crate::manager::TunnelManager;
use crate::metrics::Metrics;

/// What the handlers read, live, at every request.
pub struct AdminState {
    /// The tunnels.
    pub manager: Arc<TunnelManager>,
    /// The metrics registry.
    pub metrics: Arc<Metrics>,
    /// Inventory health.
    pub sync: Arc<SyncStatus>,
    /// The readiness rule's settings.
    pub readiness: ReadinessConfig,
    /// Export per-node series on `/metrics`.
    pub per_node_metrics: bool,
    /// `Host` names answered besides IP literals and `localhost`
    /// (`admin.allowed_hosts`).
    pub allowed_hosts: Vec<String>,
    /// The per-node rate of `POST .../reconnect`.
    pub reconnects: ReconnectLimiter,
}

/// Which connections a request came on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    /// One of the `MAX_CONNECTIONS` ordinary connections: every endpoint.
    General,
    /// A connection from the reserve kept for probes (the ordinary ones
    /// were all taken): `/healthz` and `/readyz` only.
    ProbesOnly,
}

/// Which listener a request came on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// `admin.listen`: reachable by a browser on the host, so the Host
    /// header is checked (DNS rebinding).
    Tcp,
    /// `admin.uds`: no browser can reach a Unix socket; the socket file's
    /// mode decides who may connect. The Host header is not checked.
    Unix,
}
