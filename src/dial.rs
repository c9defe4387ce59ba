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
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};

/// A destination as a client asked for it: a host name or IP literal (IPv6
/// without brackets) and a port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Destination {
    /// Host name or IP address literal, IPv6 without brackets.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Why a dial failed. Every variant maps to one HTTP status and one SOCKS5
/// reply code, and to one `reason` label in metrics and logs.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The destination policy refuses this destination (HTTP 403, SOCKS5
    /// 0x02 "connection not allowed by ruleset").
    #[error("denied by policy: {0}")]
    Denied(String),
    /// No rule routes this destination and the default is deny (HTTP 403,
    /// SOCKS5 0x02).
    #[error("no route: {0}")]
    NoRoute(String),
    /// The route's node (or every candidate node) has no Ready session
    /// (HTTP 503, SOCKS5 0x03 "network unreachable").
    #[error("node unavailable: {0}")]
    NodeDown(String),
    /// A limit was reached: streams per node, connections in flight (HTTP
    /// 503, SOCKS5 0x01 "general failure").
    #[error("limit reached: {0}")]
    Limit(String),
    /// The node's sshd refused the direct-tcpip channel, usually because
    /// nothing listens at the destination or its policy forbids forwarding
    /// (HTTP 502, SOCKS5 0x05 "connection refused").
    #[error("node {node} refused the channel: {reason}")]
    Refused {
        /// The node whose sshd refused.
        node: String,
        /// The channel-open failure reason the sshd gave.
        reason: String,
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

impl DialError {
    /// The HTTP status a CONNECT refused with this error answers with.
    pub fn http_status(&self) -> u16 {
        match self {
            DialError::Denied(_) | DialError::NoRoute(_) => 403,
            DialError::Refused { .. } | DialError::Session { .. } => 502,
            DialError::NodeDown(_) | DialError::Limit(_) | DialError::ShuttingDown => 503,
            DialError::Timeout { .. } => 504,
        }
    }

    /// The RFC 1928 reply code (the REP field) for a SOCKS5 CONNECT refused
    /// with this error.
    pub fn socks5_reply(&self) -> u8 {
        match self {
            DialError::Denied(_) | DialError::NoRoute(_) => 0x02,
            DialError::NodeDown(_) => 0x03,
            DialError::Refused { .. } => 0x05,
            DialError::Timeout { .. } => 0x06,
            DialError::Limit(_) | DialError::Session { .. } | DialError::ShuttingDown => 0x01,
        }
    }

    /// A short, stable label for metrics (`reason` / `result`).
    pub fn reason(&self) -> &'static str {
        match self {
            DialError::Denied(_) => "denied",
            DialError::NoRoute(_) => "no_route",
            DialError::NodeDown(_) => "node_down",
            DialError::Limit(_) => "limit",
            DialError::Refused { .. } => "refused",
            DialError::Timeout { .. } => "timeout",
            DialError::Session { .. } => "session",
            DialError::ShuttingDown => "shutting_down",
        }
    }
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
