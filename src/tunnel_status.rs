//! A tunnel's state ([`TunnelState`]) and its point-in-time view
//! ([`TunnelStatus`]): what the tunnel reports and the manager, the metrics
//! and the admin API read.
//!
//! Ground floor: imports nothing from the crate.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

/// Where a node's tunnel is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TunnelState {
    /// A handshake is under way (or waiting for a handshake slot).
    Connecting,
    /// At least one session is up and takes streams.
    Ready,
    /// The last attempt failed or the session died; waiting to retry.
    Backoff,
    /// Removed or shutting down: no new streams, open ones finish.
    Draining,
    /// Gone.
    Closed,
}

impl TunnelState {
    /// Lower-case name, as in metrics and the tunnel table.
    pub fn as_str(self) -> &'static str {
        match self {
            TunnelState::Connecting => "connecting",
            TunnelState::Ready => "ready",
            TunnelState::Backoff => "backoff",
            TunnelState::Draining => "draining",
            TunnelState::Closed => "closed",
        }
    }

    /// Every state, for the series exported at 0 from the start.
    pub const ALL: [TunnelState; 5] = [
        TunnelState::Connecting,
        TunnelState::Ready,
        TunnelState::Backoff,
        TunnelState::Draining,
        TunnelState::Closed,
    ];
}

impl std::fmt::Display for TunnelState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A point-in-time view of one tunnel, for status output.
#[derive(Clone, Debug)]
pub struct TunnelStatus {
    /// Node name.
    pub node: String,
    /// Node addresses (the first is the SSH address).
    pub addresses: Vec<String>,
    /// SSH endpoint dialled.
    pub ssh_endpoint: String,
    /// Current state.
    pub state: TunnelState,
    /// When the state was entered.
    pub since: SystemTime,
    /// The last failure, if any.
    pub last_error: Option<String>,
    /// Round trip of the last answered keepalive.
    pub rtt: Option<Duration>,
    /// Sessions Ready / configured.
    pub sessions_ready: usize,
    /// Sessions configured.
    pub sessions: usize,
    /// Open streams.
    pub streams: usize,
    /// Streams opened since start.
    pub streams_total: u64,
    /// Bytes sent to the node.
    pub bytes_to_node: u64,
    /// Bytes received from the node.
    pub bytes_from_node: u64,
    /// Streams reset by nodetunnel.
    pub stream_resets: u64,
    /// Successful handshakes.
    pub handshakes: u64,
    /// Failed handshakes by reason (timeout, refused, auth, host_key, protocol).
    pub failures: BTreeMap<&'static str, u64>,
    /// Failed attempts since the last Ready session.
    pub consecutive_failures: u32,
    /// Time until the next attempt (backoff) or probe after the last
    /// failure; zero once that time has passed (kept while Ready).
    pub retry_in: Option<Duration>,
    /// What the next attempt waits for: `probe` (the SSH port is closed or
    /// unreachable; an attempt follows the first probe that finds sshd) or
    /// `backoff` (a handshake failed against a port that answers).
    pub retry_reason: Option<&'static str>,
}
