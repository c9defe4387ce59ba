//! The contract between the front door and the tunnels: [`Dialer`] opens a
//! stream to `host:port` through whichever node the router picks, and
//! [`DialError`] says why it could not.
//!
//! The front door (`proxy`) only knows this trait, so its listeners are tested
//! against in-memory dialers and run in production against the
//! [`TunnelManager`](crate::manager::TunnelManager).

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};

pub use crate::destination::{Destination, Host};
use crate::metrics::Metrics;
use crate::router::{DenyReason, RouteError};

/// Why a node could not take a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeDownCause {
    /// The inventory has no tunnel for it (yet, or any more).
    NoTunnel,
    /// It is being removed, or the process is shutting down.
    Draining,
    /// None of its sessions is Ready.
    NotReady {
        /// The tunnel state (`connecting`, `backoff`, ...).
        state: &'static str,
        /// For how long it has been in that state.
        for_: Duration,
        /// The last error of its sessions, if any.
        last_error: Option<String>,
    },
}

impl std::fmt::Display for NodeDownCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodeDownCause::NoTunnel => f.write_str("has no tunnel"),
            NodeDownCause::Draining => f.write_str("is draining (removed or shutting down)"),
            NodeDownCause::NotReady {
                state,
                for_,
                last_error,
            } => {
                let for_ = Duration::from_secs(for_.as_secs());
                write!(
                    f,
                    "has no ready SSH session ({state} for {}",
                    humantime::format_duration(for_)
                )?;
                if let Some(e) = last_error {
                    write!(f, "; last error: {e}")?;
                }
                f.write_str(")")
            }
        }
    }
}

/// Why a node's sshd refused a direct-tcpip channel (RFC 4254 5.1), as the
/// sshd said it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelRefusal(pub russh::ChannelOpenFailure);

impl ChannelRefusal {
    /// The destination side failed (nothing listens there, or the node
    /// cannot reach it): the tunnel did its job, so this is not a tunnel
    /// error.
    pub fn is_destination_failure(&self) -> bool {
        self.0 == russh::ChannelOpenFailure::ConnectFailed
    }
}

impl std::fmt::Display for ChannelRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            russh::ChannelOpenFailure::AdministrativelyProhibited => f.write_str(
                "administratively prohibited (sshd forbids forwarding: AllowTcpForwarding, PermitOpen)",
            ),
            russh::ChannelOpenFailure::ConnectFailed => f.write_str(
                "connect failed (nothing listens at the destination, or it is unreachable from the node)",
            ),
            russh::ChannelOpenFailure::UnknownChannelType => f.write_str("unknown channel type"),
            russh::ChannelOpenFailure::ResourceShortage => f.write_str(
                "resource shortage (the node's sshd is out of channels or memory)",
            ),
            // The node's own words: shown escaped, never as raw text.
            russh::ChannelOpenFailure::Other { code, reason } => {
                write!(f, "code {code}: {}", reason.escape_debug())
            }
        }
    }
}

/// Which limit refused a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitKind {
    /// `ssh.max_streams_per_node` streams are open on the node.
    StreamsPerNode {
        /// The limit.
        max: usize,
    },
    /// Bytes from nodes that clients have not read exceed
    /// `ssh.max_buffered_bytes`.
    BufferedBytes {
        /// The limit.
        max: usize,
    },
}

/// Why a dial failed. Every variant maps to one HTTP status and one SOCKS5
/// reply code, and to one `reason` label in metrics and logs. The text is
/// rendered where it is shown (HTTP body, SOCKS reply log, admin API).
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The router refused: the policy denies the destination (HTTP 403,
    /// SOCKS5 0x02 "connection not allowed by ruleset"), no rule routes it
    /// and the default is deny (HTTP 403, SOCKS5 0x02), or several nodes
    /// claim it (HTTP 503, SOCKS5 0x02).
    #[error("{}", route_message(.0))]
    Route(#[from] RouteError),
    /// No node has this name (`nodetunnel dial --node`; HTTP 403, SOCKS5
    /// 0x02).
    #[error("no route: no node named {node:?}")]
    UnknownNode {
        /// The name asked for.
        node: String,
    },
    /// The route's node cannot take a stream (HTTP 503, SOCKS5 0x03
    /// "network unreachable").
    #[error("node unavailable: node {node} {cause}")]
    NodeDown {
        /// The node.
        node: Arc<str>,
        /// Why.
        cause: NodeDownCause,
    },
    /// The destination may go through any Ready node and none is (HTTP 503,
    /// SOCKS5 0x03).
    #[error("node unavailable: {dest} ({rule}) needs a Ready node and none is")]
    NoReadyNode {
        /// The destination.
        dest: Destination,
        /// The rule that sent it to any node.
        rule: crate::router::RouteRule,
    },
    /// A limit was reached (HTTP 503, SOCKS5 0x01 "general failure").
    #[error("{}", limit_message(.node, .kind))]
    Limit {
        /// The node the stream was for.
        node: Arc<str>,
        /// Which limit.
        kind: LimitKind,
    },
    /// The node's sshd refused the direct-tcpip channel, usually because
    /// nothing listens at the destination or its policy forbids forwarding
    /// (HTTP 502, SOCKS5 0x05 "connection refused").
    #[error("node {node} refused the channel: {reason}")]
    Refused {
        /// The node whose sshd refused.
        node: String,
        /// The channel-open failure reason the sshd gave.
        reason: ChannelRefusal,
    },
    /// The channel did not open within the dial timeout (HTTP 504, SOCKS5
    /// 0x06 "TTL expired", the closest code RFC 1928 has).
    #[error("channel open to {node} timed out after {}", humantime::format_duration(*.after))]
    Timeout {
        /// The node the channel was opened on.
        node: String,
        /// How long we waited.
        after: Duration,
    },
    /// The SSH session died while the channel was being opened (HTTP 502,
    /// SOCKS5 0x01).
    #[error("session to {node} failed: {reason}")]
    Session {
        /// The node.
        node: String,
        /// What happened to the session.
        reason: String,
    },
    /// The process is shutting down and takes no new streams (HTTP 503,
    /// SOCKS5 0x01).
    #[error("shutting down")]
    ShuttingDown,
}

fn route_message(e: &RouteError) -> String {
    match e {
        RouteError::Denied { .. } => format!("denied by policy: {e}"),
        RouteError::NoRoute { .. } => format!("no route: {e}"),
        RouteError::Conflict { .. } => format!("address conflict: {e}"),
    }
}

fn limit_message(node: &str, kind: &LimitKind) -> String {
    match kind {
        LimitKind::StreamsPerNode { max } => {
            format!("limit reached: node {node} has {max} streams open (ssh.max_streams_per_node)")
        }
        LimitKind::BufferedBytes { max } => format!(
            "limit reached: more than {max} bytes from nodes are waiting for clients to read \
             them (ssh.max_buffered_bytes)"
        ),
    }
}

impl DialError {
    /// The HTTP status a CONNECT refused with this error answers with.
    pub fn http_status(&self) -> u16 {
        match self {
            DialError::Route(RouteError::Conflict { .. }) => 503,
            DialError::Route(_) | DialError::UnknownNode { .. } => 403,
            DialError::Refused { .. } | DialError::Session { .. } => 502,
            DialError::NodeDown { .. }
            | DialError::NoReadyNode { .. }
            | DialError::Limit { .. }
            | DialError::ShuttingDown => 503,
            DialError::Timeout { .. } => 504,
        }
    }

    /// The RFC 1928 reply code (the REP field) for a SOCKS5 CONNECT refused
    /// with this error.
    pub fn socks5_reply(&self) -> u8 {
        match self {
            DialError::Route(_) | DialError::UnknownNode { .. } => 0x02,
            DialError::NodeDown { .. } | DialError::NoReadyNode { .. } => 0x03,
            DialError::Refused { .. } => 0x05,
            DialError::Timeout { .. } => 0x06,
            DialError::Limit { .. } | DialError::Session { .. } | DialError::ShuttingDown => 0x01,
        }
    }

    /// A short, stable label for metrics (`reason` / `result`).
    pub fn reason(&self) -> &'static str {
        match self {
            DialError::Route(e) => e.label(),
            DialError::UnknownNode { .. } => "no_route",
            DialError::NodeDown { .. } | DialError::NoReadyNode { .. } => "node_down",
            DialError::Limit { .. } => "limit",
            DialError::Refused { .. } => "refused",
            DialError::Timeout { .. } => "timeout",
            DialError::Session { .. } => "session",
            DialError::ShuttingDown => "shutting_down",
        }
    }

    /// Whether this outcome is a fault of the tunnels (it counts as a recent
    /// error in `status`): a destination nothing listens at, a policy
    /// refusal or a shutdown is not.
    pub fn is_tunnel_fault(&self) -> bool {
        match self {
            DialError::Refused { reason, .. } => !reason.is_destination_failure(),
            DialError::Route(_) | DialError::UnknownNode { .. } | DialError::ShuttingDown => false,
            DialError::NodeDown { .. }
            | DialError::NoReadyNode { .. }
            | DialError::Limit { .. }
            | DialError::Timeout { .. }
            | DialError::Session { .. } => true,
        }
    }

    /// Count this refusal once, where it is answered: policy and routing
    /// refusals in `nodetunnel_policy_denials_total{reason}`, every other
    /// one in `nodetunnel_stream_opens_total{result}`. The answer itself
    /// (HTTP status, SOCKS5 reply) is counted by the front door.
    pub fn count(&self, metrics: &Metrics) {
        match self {
            DialError::Route(e) => {
                metrics.policy_denial(e.deny_reason().map_or(e.label(), DenyReason::label));
            }
            other => metrics.stream_open(other.reason(), other.is_tunnel_fault()),
        }
    }

    /// The node this error is about, for the `node` log field.
    pub fn node(&self) -> Option<&str> {
        match self {
            DialError::Refused { node, .. }
            | DialError::Timeout { node, .. }
            | DialError::Session { node, .. } => Some(node),
            DialError::NodeDown { node, .. } | DialError::Limit { node, .. } => Some(node),
            _ => None,
        }
    }
}

/// Where a dialled stream runs, as its audit record names it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamFacts {
    /// The node.
    pub node: Option<String>,
    /// The stream's process-unique id.
    pub stream: Option<u64>,
    /// The index of the node's SSH session carrying it.
    pub session: Option<usize>,
    /// The label of the routing rule that chose the node
    /// ([`RouteRule::label`](crate::router::RouteRule::label)).
    pub rule: Option<&'static str>,
}

/// A dialled stream as the front door sees it.
pub trait TunnelIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Resolves, with the reason, once the stream was cut on the tunnel
    /// side (its session died, or the node broke flow control): no more
    /// bytes will come. The front door then closes the client connection
    /// even when the client has stopped reading, so that nothing stays
    /// open (and counted) for a stream that is gone, and closes it
    /// abortively (RST on TCP), so that the client cannot take the
    /// truncated stream for a complete one. The default never resolves: a
    /// stream that ends only by EOF or I/O error.
    fn cut(&self) -> Pin<Box<dyn Future<Output = String> + Send + 'static>> {
        Box::pin(std::future::pending())
    }

    /// The node this stream runs to and the stream's id, for the `node`
    /// and `stream` fields of its connection's log span. The default has
    /// neither.
    fn log_context(&self) -> (Option<&str>, Option<u64>) {
        (None, None)
    }

    /// Where the stream runs, for its audit record. The default has the
    /// node and stream of [`log_context`](Self::log_context) and nothing
    /// else.
    fn facts(&self) -> StreamFacts {
        let (node, stream) = self.log_context();
        StreamFacts {
            node: node.map(str::to_string),
            stream,
            ..StreamFacts::default()
        }
    }

    /// Once the stream was reset by nodetunnel, the reset's label
    /// (`nodetunnel_stream_resets_total{reason}`: `session_lost`,
    /// `window_exceeded`, ...); `None` before, or for a stream that is not
    /// reset that way (the default).
    fn reset_label(&self) -> Option<&'static str> {
        None
    }

    /// Move up to `max` bytes the stream has received onto `out`, as
    /// chunks; `Ready(Ok(0))` is the end of the stream. The splice writes
    /// these chunks to the client with vectored writes, so a stream that
    /// already holds its data as [`Bytes`] (a
    /// [`TunnelStream`](crate::stream::TunnelStream) holds the decrypted
    /// packets) hands them over without a copy. The default reads into a
    /// fresh buffer of at most `max` bytes (allocated on every call: for
    /// streams off the hot path). `max` is greater than zero.
    fn poll_read_chunks(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut VecDeque<Bytes>,
        max: usize,
    ) -> Poll<io::Result<usize>> {
        let mut buf = BytesMut::with_capacity(max);
        let n = std::task::ready!(tokio_util::io::poll_read_buf(Pin::new(self), cx, &mut buf))?;
        if n > 0 {
            out.push_back(buf.freeze());
        }
        Poll::Ready(Ok(n))
    }
}

impl TunnelIo for tokio::io::DuplexStream {}

/// Something that opens byte streams to destinations: in production the
/// [`TunnelManager`](crate::manager::TunnelManager) behind the router.
pub trait Dialer: Send + Sync + 'static {
    /// The stream a successful dial gives back.
    type Stream: TunnelIo;

    /// Open a stream to `dest`. Resolves only once the far end confirmed the
    /// channel (so a proxy may answer 200 right after), or with the reason
    /// it could not. Implementations bound the wait themselves.
    fn dial(
        &self,
        dest: &Destination,
    ) -> impl Future<Output = Result<Self::Stream, DialError>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_the_front_door_counts_is_exported_from_the_start() {
        let node: Arc<str> = "node-a".into();
        let refusals = [
            DialError::NodeDown {
                node: node.clone(),
                cause: NodeDownCause::NoTunnel,
            },
            DialError::Limit {
                node,
                kind: LimitKind::StreamsPerNode { max: 1 },
            },
            DialError::Refused {
                node: "node-a".into(),
                reason: ChannelRefusal(russh::ChannelOpenFailure::ConnectFailed),
            },
            DialError::Timeout {
                node: "node-a".into(),
                after: Duration::from_secs(1),
            },
            DialError::Session {
                node: "node-a".into(),
                reason: "EOF".into(),
            },
            DialError::ShuttingDown,
        ];
        let codes = |listener: &str| {
            crate::metrics::PROXY_REQUEST_CODES
                .iter()
                .find(|(l, _)| *l == listener)
                .map(|(_, codes)| codes.to_vec())
                .unwrap_or_default()
        };
        for e in &refusals {
            assert!(
                crate::metrics::STREAM_OPEN_RESULTS.contains(&e.reason()),
                "{} is not in metrics::STREAM_OPEN_RESULTS",
                e.reason()
            );
            // Its answer, on each listener, is a proxy_requests series
            // exported from the start.
            let status = e.http_status().to_string();
            let reply = format!("socks5_{:#04x}", e.socks5_reply());
            for listener in ["uds", "tcp"] {
                assert!(
                    codes(listener).contains(&status.as_str()),
                    "{status} on {listener}"
                );
            }
            assert!(codes("socks5").contains(&reply.as_str()), "{reply}");
        }
    }
}
