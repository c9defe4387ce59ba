//! The front door: the listeners kube-apiserver (or any client) dials to get
//! a tunnelled connection.
//!
//! This module owns the `[proxy]` configuration ([`ProxyConfig`]), binding
//! the listeners ([`FrontDoor::bind`]), the accept loops, the connection limit
//! and the graceful drain ([`FrontDoor::serve`]). The protocols live in one
//! file each:
//!
//! - [`http_connect`]: HTTP `CONNECT` as the apiserver's `HTTPConnect`
//!   egress speaks it, served by hyper, over the Unix socket and over TCP.
//! - [`socks5`]: RFC 1928 SOCKS5 `CONNECT`, no authentication.
//! - `grpc`: the apiserver's `GRPC` egress (the konnectivity
//!   `ProxyService`) over a Unix socket, HTTP/2 served by hyper; the
//!   messages and gRPC framing in [`grpc_proto`].
//! - `tls`: the mTLS material of the TCP listener.
//! - `uds`: the Unix socket file (permissions, stale files, removal).
//! - `audit_trail`: each connection's audit records (who asked, the
//!   tunnel's bytes and end), sent to [`crate::audit`]; `client_subject`:
//!   the mTLS client certificate's subject they name.
//! - `relay`: an established tunnel, spliced with its client; a tunnel
//!   that does not end cleanly (cut by a lost session or a reset, aborted
//!   at the drain deadline) closes its client connection abortively: RST
//!   on TCP, so that the client cannot take a truncated stream for a
//!   complete one.
//!
//! Every accepted connection is one task; it ends when its client or tunnel
//! ends. Each dial goes through the [`Dialer`]; its errors become an HTTP
//! status or a SOCKS5 reply code ([`DialError::http_status`],
//! [`DialError::socks5_reply`]).
//!
//! Connections beyond `max_connections` are still accepted, up to
//! [`OVERFLOW_CONNECTIONS`] more, and answered at once: HTTP with `503 too
//! many connections`, SOCKS5 with reply `0x01` (general failure) after a
//! normal negotiation. Beyond that they are closed right after accept.

mod audit_trail;
mod client_subject;
mod conn_span;
mod grpc;
pub mod grpc_proto;
pub mod http_connect;
mod refusal_log;
mod relay;
pub mod socks5;
mod tls;
mod uds;

#[cfg(test)]
mod tests;

use crate::field_error::FieldError;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use crate::audit::AuditSink;
use crate::descriptors::{AcceptFailures, ACCEPT_ERROR_BACKOFF};
use crate::dial::{Destination, DialError, Dialer};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use audit_trail::Asker;
use relay::ClientIo;

pub use http_connect::{parse_connect_target, TargetError};
pub use socks5::{parse_greeting, parse_request, ConnectRequest, Greeting, Parsed, Socks5Error};

/// Extra time given to [`Dialer::dial`] beyond `dial_timeout` before the
/// front door gives up on it itself (the dialer is expected to time out
/// first, with a better error).
pub const DIAL_TIMEOUT_MARGIN: Duration = Duration::from_secs(1);

/// How many connections beyond `max_connections` are accepted just to be
/// answered "too many connections"; more than that are closed at once.
pub const OVERFLOW_CONNECTIONS: usize = 256;

/// The `[proxy]` section: which listeners to open and their limits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// HTTP CONNECT over a Unix socket (mode 0660, parent directory created
    /// with mode 0750 if missing, a stale socket file replaced).
    pub uds: Option<PathBuf>,
    /// HTTP CONNECT over TCP; TLS with required client certificates when
    /// [`tls`](Self::tls) is set.
    pub tcp: Option<SocketAddr>,
    /// SOCKS5 (RFC 1928) `CONNECT`, no authentication.
    pub socks5: Option<SocketAddr>,
    /// kube-apiserver's `GRPC` egress (the konnectivity `ProxyService`,
    /// h2c) over a Unix socket; mode and directory as for [`uds`](Self::uds).
    pub grpc_uds: Option<PathBuf>,
    /// How long a dial may take (the dialer's own bound; the front door
    /// gives up [`DIAL_TIMEOUT_MARGIN`] later).
    #[serde(with = "humantime_serde")]
    pub dial_timeout: Duration,
    /// Client connections open at once over all listeners. Memory: each
    /// tunnelled connection holds up to 128 KiB in its splice (a 64 KiB
    /// buffer towards the node, up to 64 KiB of received packets on their
    /// way to the client) plus its stream's window (`ssh.window_size`,
    /// within `ssh.max_buffered_bytes`), and one file descriptor: 10,000 x
    /// 128 KiB is about 1.2 GiB of splices.
    pub max_connections: usize,
    /// Bound on receiving a request's headers, the TLS handshake and the
    /// SOCKS5 negotiation (slowloris protection).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// mTLS for the `tcp` listener.
    pub tls: Option<TlsConfig>,
    /// Allow the `tcp` (without TLS) and `socks5` listeners on non-loopback
    /// addresses. Off by default: they have no authentication.
    pub allow_non_loopback: bool,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            uds: None,
            tcp: None,
            socks5: None,
            grpc_uds: None,
            dial_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(10),
            tls: None,
            allow_non_loopback: false,
        }
    }
}

/// The `[proxy.tls]` section: PEM files of the TCP listener's mTLS. Relative
/// paths are resolved by the config loader.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Server certificate chain, leaf first.
    pub cert: PathBuf,
    /// Server private key: PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
    pub key: PathBuf,
    /// CA bundle client certificates must chain to.
    pub client_ca: PathBuf,
}

/// Longest Unix socket path `bind(2)` takes (`sun_path` minus the NUL).
const MAX_UDS_PATH: usize = 107;

impl ProxyConfig {
    /// Check the section. On error, returns the offending key (like
    /// `proxy.tcp`) and why.
    pub fn validate(&self) -> Result<(), FieldError> {
        let err = |key: &str, reason: String| Err(FieldError::new(key.to_string(), reason));
        if self.uds.is_none()
            && self.tcp.is_none()
            && self.socks5.is_none()
            && self.grpc_uds.is_none()
        {
            return err(
                "proxy",
                "no listener configured: set at least one of uds, tcp, socks5, grpc_uds".into(),
            );
        }
        for (key, path) in [("proxy.uds", &self.uds), ("proxy.grpc_uds", &self.grpc_uds)] {
            let Some(path) = path else { continue };
            let len = path.as_os_str().len();
            if len == 0 {
                return err(key, "empty path".into());
            }
            if len > MAX_UDS_PATH {
                return err(
                    key,
                    format!("path is {len} bytes, Unix sockets take at most {MAX_UDS_PATH}"),
                );
            }
        }
        if let (Some(uds), Some(grpc)) = (&self.uds, &self.grpc_uds) {
            if uds == grpc {
                return err(
                    "proxy.grpc_uds",
                    format!("{} is also proxy.uds", grpc.display()),
                );
            }
        }
        if self.max_connections == 0 {
            return err("proxy.max_connections", "must be greater than 0".into());
        }
        if self.dial_timeout.is_zero() {
            return err("proxy.dial_timeout", "must be greater than 0".into());
        }
        if self.header_read_timeout.is_zero() {
            return err("proxy.header_read_timeout", "must be greater than 0".into());
        }
        if let Some(tls) = &self.tls {
            if self.tcp.is_none() {
                return err(
                    "proxy.tls",
                    "set but proxy.tcp is not: TLS applies to the tcp listener only".into(),
                );
            }
            for (key, path) in [
                ("proxy.tls.cert", &tls.cert),
                ("proxy.tls.key", &tls.key),
                ("proxy.tls.client_ca", &tls.client_ca),
            ] {
                if path.as_os_str().is_empty() {
                    return err(key, "empty path".into());
                }
            }
        }
        if !self.allow_non_loopback {
            if let Some(addr) = self.tcp {
                if self.tls.is_none() && !is_loopback(addr) {
                    return err(
                        "proxy.tcp",
                        format!(
                            "{addr} is not a loopback address and [proxy.tls] is not set: anyone \
                             who reaches it could tunnel into every node; use a loopback address, \
                             configure mTLS, or set proxy.allow_non_loopback = true"
                        ),
                    );
                }
            }
            if let Some(addr) = self.socks5 {
                if !is_loopback(addr) {
                    return err(
                        "proxy.socks5",
                        format!(
                            "{addr} is not a loopback address and SOCKS5 has no authentication: \
                             anyone who reaches it could tunnel into every node; use a loopback \
                             address or set proxy.allow_non_loopback = true"
                        ),
                    );
                }
            }
        }
        if let (Some(tcp), Some(socks5)) = (self.tcp, self.socks5) {
            if tcp == socks5 && tcp.port() != 0 {
                return err("proxy.socks5", format!("{socks5} is also proxy.tcp"));
            }
        }
        Ok(())
    }

    /// Listeners that are reachable from other hosts without client
    /// authentication (allowed only with `allow_non_loopback`).
    fn exposed_listeners(&self) -> Vec<(&'static str, SocketAddr)> {
        let mut exposed = Vec::new();
        if let Some(addr) = self.tcp {
            if self.tls.is_none() && !is_loopback(addr) {
                exposed.push(("tcp", addr));
            }
        }
        if let Some(addr) = self.socks5 {
            if !is_loopback(addr) {
                exposed.push(("socks5", addr));
            }
        }
        exposed
    }
}

fn is_loopback(addr: SocketAddr) -> bool {
    addr.ip().to_canonical().is_loopback()
}

/// Why the front door could not start.
#[derive(Debug, thiserror::Error)]
pub enum FrontDoorError {
    /// The `[proxy]` section is invalid.
    #[error("invalid configuration: {key}: {reason}")]
    Config {
        /// The offending key, like `proxy.tcp`.
        key: String,
        /// Why it is refused.
        reason: String,
    },
    /// A listener could not be bound.
    #[error("cannot bind the {listener} listener on {address}: {error}")]
    Bind {
        /// `uds`, `tcp` or `socks5`.
        listener: &'static str,
        /// The address or socket path.
        address: String,
        /// The system error.
        error: io::Error,
    },
    /// The Unix socket path is taken by something we must not remove.
    #[error("unix socket {}: {reason}", path.display())]
    SocketPath {
        /// The configured socket path.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// TLS material could not be loaded.
    #[error("TLS file {}: {reason}", file.display())]
    Tls {
        /// The certificate, key or CA file at fault.
        file: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// The kind of listener a connection came in on (Unix socket, TCP, SOCKS5);
/// the `listener` label and log field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ListenerKind {
    Uds,
    Tcp,
    Socks5,
    Grpc,
}

impl ListenerKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ListenerKind::Uds => "uds",
            ListenerKind::Tcp => "tcp",
            ListenerKind::Socks5 => "socks5",
            ListenerKind::Grpc => "grpc",
        }
    }
}

/// Everything a connection task needs, shared by all of them.
pub(crate) struct Context<D> {
    pub(crate) dialer: Arc<D>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) dial_timeout: Duration,
    pub(crate) header_read_timeout: Duration,
    pub(crate) shutdown: Shutdown,
    /// The per-reason budget of refusal log lines.
    pub(crate) refusals: refusal_log::RefusalLog,
    /// Where audit records go (off unless `[audit]` is on).
    pub(crate) audit: AuditSink,
}

impl<D: Dialer> Context<D> {
    /// Dial through the dialer, bounded by `dial_timeout` plus
    /// [`DIAL_TIMEOUT_MARGIN`] in case the dialer does not bound itself.
    /// The outcome is counted here, once: the front door is the edge that
    /// answers it.
    pub(crate) async fn dial(&self, dest: &Destination) -> Result<D::Stream, DialError> {
        // Boxed: the dial's future (the channel open and its timers) is
        // needed only until the tunnel is open, and would otherwise take
        // its size in every connection's future for the connection's life.
        Box::pin(self.dial_bounded(dest)).await
    }

    /// [`Context::dial`], unboxed.
    async fn dial_bounded(&self, dest: &Destination) -> Result<D::Stream, DialError> {
        let limit = self.dial_timeout + DIAL_TIMEOUT_MARGIN;
        let result = match tokio::time::timeout(limit, self.dialer.dial(dest)).await {
            Ok(result) => result,
            Err(_) => Err(DialError::Timeout {
                node: "unknown".to_string(),
                after: limit,
            }),
        };
        match &result {
            Ok(_) => self.metrics.stream_open("ok", false),
            Err(e) => e.count(&self.metrics),
        }
        result
    }

    /// Log one refusal of `reason` with `line`, within the per-reason
    /// budget ([`refusal_log::RefusalLog`]): a flood of refusals writes a
    /// few lines and a summary, not one line each.
    pub(crate) fn log_refusal(&self, reason: &'static str, line: impl FnOnce()) {
        if let refusal_log::Admit::Log { suppressed } = self.refusals.admit(reason) {
            if suppressed > 0 {
                tracing::warn!(
                    reason,
                    suppressed,
                    "{suppressed} more refusals ({reason}) were not logged; the metrics count them all"
                );
            }
            line();
        }
    }

    /// Count a refused dial's answer by its code (the refusal's cause is
    /// counted by [`Context::dial`]).
    pub(crate) fn count_refusal(&self, listener: ListenerKind, code: &str) {
        self.metrics.proxy_request(listener.as_str(), code);
    }
}

/// The node a dial error names, for the `node` log field.
pub(crate) fn error_node(err: &DialError) -> Option<&str> {
    err.node()
}

pub use crate::destination::HostError;

/// A connection's client as its listener saw it.
struct Peer {
    /// For the `peer` field of the connection's log span.
    display: String,
    /// For its audit records.
    client: crate::audit::Client,
}

/// A client connection of any listener.
trait Accept: Send + 'static {
    type Io: ClientIo;
    /// The next connection and its client.
    fn next_conn(&self) -> impl Future<Output = io::Result<(Self::Io, Peer)>> + Send;
}

impl Accept for TcpListener {
    type Io = tokio::net::TcpStream;
    async fn next_conn(&self) -> io::Result<(Self::Io, Peer)> {
        let (stream, peer) = self.accept().await?;
        // Latency matters more than packet count for proxied requests.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(client = %peer, error = %error, "cannot set TCP_NODELAY");
        }
        let display = peer.to_string();
        let client = crate::audit::Client {
            address: Some(display.clone()),
            ..crate::audit::Client::default()
        };
        Ok((stream, Peer { display, client }))
    }
}

/// What a listener speaks.
#[derive(Clone)]
enum Protocol {
    Http,
    Https(TlsAcceptor),
    Socks5,
    /// gRPC; the semaphore bounds the tunnels open over all its streams.
    Grpc(Arc<Semaphore>),
}

/// A connection's slot: within `max_connections` (`admitted`), or one of
/// the overflow connections that only get a refusal. Held for the
/// connection's life.
struct Admission {
    admitted: bool,
    _permit: OwnedSemaphorePermit,
}

/// Keeps `proxy_connections_open` up to date.
struct OpenConnection(Arc<Metrics>);

impl OpenConnection {
    fn new(metrics: &Arc<Metrics>) -> Self {
        metrics.proxy_connections_open.inc();
        OpenConnection(metrics.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.proxy_connections_open.dec();
    }
}

/// The bound listeners, ready to [`serve`](FrontDoor::serve).
pub struct FrontDoor {
    uds: Option<uds::UdsListener>,
    tcp: Option<(TcpListener, SocketAddr, Option<TlsAcceptor>)>,
    socks5: Option<(TcpListener, SocketAddr)>,
    grpc: Option<uds::UdsListener>,
    metrics: Arc<Metrics>,
    dial_timeout: Duration,
    header_read_timeout: Duration,
    max_connections: usize,
    audit: AuditSink,
}

impl std::fmt::Debug for FrontDoor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrontDoor")
            .field("uds", &self.uds_path())
            .field("tcp", &self.tcp_addr())
            .field("tls", &self.tcp.as_ref().is_some_and(|t| t.2.is_some()))
            .field("socks5", &self.socks5_addr())
            .field("grpc_uds", &self.grpc_uds_path())
            .field("max_connections", &self.max_connections)
            .finish_non_exhaustive()
    }
}

impl FrontDoor {
    /// Bind every configured listener (errors name the listener and
    /// address/path) and load TLS material (errors name the file).
    pub async fn bind(
        config: &ProxyConfig,
        metrics: Arc<Metrics>,
    ) -> Result<FrontDoor, FrontDoorError> {
        config
            .validate()
            .map_err(|FieldError { key, reason }| FrontDoorError::Config { key, reason })?;
        for (listener, addr) in config.exposed_listeners() {
            tracing::warn!(
                listener,
                address = %addr,
                "listening on a non-loopback address without client authentication \
                 (proxy.allow_non_loopback = true)"
            );
        }
        // TLS first: a broken file must not leave a socket file behind.
        let acceptor = match &config.tls {
            Some(tls) => Some(tls::acceptor(tls).await?),
            None => None,
        };
        let tcp = match config.tcp {
            Some(addr) => {
                let (listener, local) = bind_tcp(ListenerKind::Tcp, addr).await?;
                Some((listener, local, acceptor))
            }
            None => None,
        };
        let socks5 = match config.socks5 {
            Some(addr) => Some(bind_tcp(ListenerKind::Socks5, addr).await?),
            None => None,
        };
        let uds = match &config.uds {
            Some(path) => Some(uds::UdsListener::bind(path, ListenerKind::Uds).await?),
            None => None,
        };
        let grpc = match &config.grpc_uds {
            Some(path) => Some(uds::UdsListener::bind(path, ListenerKind::Grpc).await?),
            None => None,
        };
        Ok(FrontDoor {
            uds,
            tcp,
            socks5,
            grpc,
            metrics,
            dial_timeout: config.dial_timeout,
            header_read_timeout: config.header_read_timeout,
            max_connections: config.max_connections,
            audit: AuditSink::off(),
        })
    }

    /// Send an audit record of every tunnelled connection and refusal to
    /// `audit` (see [`crate::audit`]).
    pub fn with_audit(mut self, audit: AuditSink) -> Self {
        self.audit = audit;
        self
    }

    /// The bound address of the HTTP CONNECT TCP listener.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().map(|(_, addr, _)| *addr)
    }

    /// The bound address of the SOCKS5 listener.
    pub fn socks5_addr(&self) -> Option<SocketAddr> {
        self.socks5.as_ref().map(|(_, addr)| *addr)
    }

    /// The path of the HTTP CONNECT Unix socket.
    pub fn uds_path(&self) -> Option<&Path> {
        self.uds.as_ref().map(|u| u.path())
    }

    /// The path of the gRPC Unix socket.
    pub fn grpc_uds_path(&self) -> Option<&Path> {
        self.grpc.as_ref().map(|u| u.path())
    }

    /// Serve until `shutdown` fires; then stop accepting (the socket file is
    /// removed), let in-flight connections finish for up to `drain` and
    /// abort the rest.
    pub async fn serve<D: Dialer>(self, dialer: Arc<D>, shutdown: Shutdown, drain: Duration) {
        let ctx = Arc::new(Context {
            dialer,
            metrics: self.metrics.clone(),
            dial_timeout: self.dial_timeout,
            header_read_timeout: self.header_read_timeout,
            shutdown,
            refusals: refusal_log::RefusalLog::default(),
            audit: self.audit,
        });
        let limits = Limits {
            admitted: Arc::new(Semaphore::new(self.max_connections)),
            overflow: Arc::new(Semaphore::new(OVERFLOW_CONNECTIONS)),
        };
        let uds = async {
            if let Some(listener) = self.uds {
                run_listener(
                    listener,
                    ListenerKind::Uds,
                    Protocol::Http,
                    &ctx,
                    &limits,
                    drain,
                )
                .await;
            }
        };
        let tcp = async {
            if let Some((listener, _, tls)) = self.tcp {
                let protocol = match tls {
                    Some(acceptor) => Protocol::Https(acceptor),
                    None => Protocol::Http,
                };
                run_listener(listener, ListenerKind::Tcp, protocol, &ctx, &limits, drain).await;
            }
        };
        let socks5 = async {
            if let Some((listener, _)) = self.socks5 {
                let protocol = Protocol::Socks5;
                run_listener(
                    listener,
                    ListenerKind::Socks5,
                    protocol,
                    &ctx,
                    &limits,
                    drain,
                )
                .await;
            }
        };
        let grpc = async {
            if let Some(listener) = self.grpc {
                let tunnels = Arc::new(Semaphore::new(self.max_connections));
                let protocol = Protocol::Grpc(tunnels);
                run_listener(listener, ListenerKind::Grpc, protocol, &ctx, &limits, drain).await;
            }
        };
        tokio::join!(uds, tcp, socks5, grpc);
        tracing::info!("front door stopped");
    }
}

async fn bind_tcp(
    listener: ListenerKind,
    addr: SocketAddr,
) -> Result<(TcpListener, SocketAddr), FrontDoorError> {
    let bind_error = |error| FrontDoorError::Bind {
        listener: listener.as_str(),
        address: addr.to_string(),
        error,
    };
    let bound = TcpListener::bind(addr).await.map_err(bind_error)?;
    let local = bound.local_addr().map_err(bind_error)?;
    tracing::info!(listener = listener.as_str(), address = %local, "listening");
    Ok((bound, local))
}

/// The connection limit shared by every listener.
struct Limits {
    admitted: Arc<Semaphore>,
    overflow: Arc<Semaphore>,
}

impl Limits {
    fn admit(&self) -> Option<Admission> {
        if let Ok(permit) = self.admitted.clone().try_acquire_owned() {
            Some(Admission {
                admitted: true,
                _permit: permit,
            })
        } else if let Ok(permit) = self.overflow.clone().try_acquire_owned() {
            Some(Admission {
                admitted: false,
                _permit: permit,
            })
        } else {
            None
        }
    }
}

/// Accept on one listener until shutdown, then drain its connections.
async fn run_listener<L: Accept, D: Dialer>(
    listener: L,
    kind: ListenerKind,
    protocol: Protocol,
    ctx: &Arc<Context<D>>,
    limits: &Limits,
    drain: Duration,
) {
    let mut tasks = JoinSet::new();
    let mut failures = AcceptFailures::new(kind.as_str());
    loop {
        tokio::select! {
            biased;
            () = ctx.shutdown.wait() => break,
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => log_join(kind, joined),
            accepted = listener.next_conn() => match accepted {
                Ok((io, peer)) => {
                    failures.succeeded();
                    let span = conn_span::new(kind, &peer.display);
                    let Some(admission) = limits.admit() else {
                        ctx.log_refusal("overflow_exhausted", || {
                            span.in_scope(|| tracing::warn!(
                                "connection limit and overflow allowance exhausted: closing at once"
                            ));
                        });
                        continue;
                    };
                    let asker = Asker { listener: kind, client: peer.client };
                    let task = handle(io, kind, protocol.clone(), ctx.clone(), admission, asker);
                    tasks.spawn(task.instrument(span));
                }
                Err(error) => {
                    // Out of descriptors, the connection stays in the
                    // backlog and accept fails again at once: wait.
                    failures.failed(&error, &ctx.metrics);
                    tokio::select! {
                        () = ctx.shutdown.wait() => break,
                        () = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => {}
                    }
                }
            },
        }
    }
    // Stop accepting: closes the socket (and removes the socket file).
    drop(listener);
    let open = tasks.len();
    if open > 0 {
        tracing::info!(listener = kind.as_str(), open, drain = ?drain, "draining connections");
    }
    let deadline = tokio::time::Instant::now() + drain;
    while !tasks.is_empty() {
        match tokio::time::timeout_at(deadline, tasks.join_next()).await {
            Ok(Some(joined)) => log_join(kind, joined),
            Ok(None) => break,
            Err(_) => {
                tracing::warn!(
                    listener = kind.as_str(),
                    aborted = tasks.len(),
                    "drain deadline reached: aborting the remaining connections"
                );
                for _ in 0..tasks.len() {
                    ctx.metrics.stream_reset(crate::metrics::DRAIN_DEADLINE);
                }
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
                break;
            }
        }
    }
}

fn log_join(kind: ListenerKind, joined: Result<(), tokio::task::JoinError>) {
    if let Err(error) = joined {
        if error.is_panic() {
            tracing::error!(listener = kind.as_str(), error = %error, "connection task panicked");
        }
    }
}

/// One client connection, from accept to close (run in its
/// [`conn_span`], which names the listener and the client).
async fn handle<I, D>(
    io: I,
    listener: ListenerKind,
    protocol: Protocol,
    ctx: Arc<Context<D>>,
    admission: Admission,
    asker: Asker,
) where
    I: ClientIo,
    D: Dialer,
{
    let _open = OpenConnection::new(&ctx.metrics);
    // `admission` (and its permit) lives until this function returns.
    let admitted = admission.admitted;
    // Each protocol's future is boxed: a task is as large as the largest
    // future it may hold, and the gRPC server's and TLS's are several times
    // a SOCKS5 connection's, which would otherwise pay for them.
    match protocol {
        Protocol::Http => Box::pin(http_connect::serve(io, &ctx, listener, admitted, asker)).await,
        Protocol::Https(acceptor) => {
            Box::pin(serve_tls(io, acceptor, &ctx, listener, admitted, asker)).await
        }
        Protocol::Socks5 => Box::pin(socks5::serve(io, &ctx, admitted, asker)).await,
        Protocol::Grpc(tunnels) => Box::pin(grpc::serve(io, &ctx, admitted, tunnels, asker)).await,
    }
}

/// HTTP CONNECT over TLS: the handshake (with the client's certificate
/// subject for its audit records), bounded by the header read timeout, then
/// [`http_connect::serve`].
async fn serve_tls<I, D>(
    io: I,
    acceptor: TlsAcceptor,
    ctx: &Arc<Context<D>>,
    listener: ListenerKind,
    admitted: bool,
    mut asker: Asker,
) where
    I: ClientIo,
    D: Dialer,
{
    let handshake = acceptor.accept(io);
    let tls = match tokio::time::timeout(ctx.header_read_timeout, handshake).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => return tracing::info!(error = %error, "TLS handshake failed"),
        Err(_) => return tracing::info!("TLS handshake timed out"),
    };
    asker.client.certificate_subject = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| client_subject::subject(leaf.as_ref()));
    http_connect::serve(tls, ctx, listener, admitted, asker).await
}

/// The accept loop under failing accepts (an injected listener).
#[cfg(test)]
mod accept_tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    /// A listener whose every accept fails with `errno`, counting calls.
    struct Failing {
        errno: rustix::io::Errno,
        calls: Arc<AtomicU64>,
    }

    impl Accept for Failing {
        type Io = tokio::net::UnixStream;
        async fn next_conn(&self) -> io::Result<(Self::Io, Peer)> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            Err(io::Error::from_raw_os_error(self.errno.raw_os_error()))
        }
    }

    /// Never asked: no connection is ever accepted.
    struct NoDialer;

    impl Dialer for NoDialer {
        type Stream = tokio::io::DuplexStream;
        async fn dial(&self, _: &Destination) -> Result<Self::Stream, DialError> {
            Err(DialError::ShuttingDown)
        }
    }

    /// What a connection's task holds from its accept to its end (its
    /// future; tokio adds a header of about 100 bytes): a few hundred bytes
    /// (240 here; about 11 KiB with the protocols inline), whatever the
    /// protocol, because each protocol's own future is boxed, so a SOCKS5
    /// connection does not pay for the gRPC server's or a TLS handshake's.
    #[tokio::test]
    async fn a_connection_task_is_small_whatever_its_protocol() {
        let ctx = Arc::new(Context {
            dialer: Arc::new(NoDialer),
            metrics: Arc::new(Metrics::new()),
            dial_timeout: Duration::from_secs(1),
            header_read_timeout: Duration::from_secs(1),
            shutdown: Shutdown::new(),
            refusals: refusal_log::RefusalLog::default(),
            audit: AuditSink::off(),
        });
        let limits = Limits {
            admitted: Arc::new(Semaphore::new(1)),
            overflow: Arc::new(Semaphore::new(1)),
        };
        let (io, _peer) = tokio::net::UnixStream::pair().expect("socket pair");
        let admission = limits.admit().expect("a slot");
        let asker = Asker {
            listener: ListenerKind::Socks5,
            client: crate::audit::Client::default(),
        };
        let task = handle(
            io,
            ListenerKind::Socks5,
            Protocol::Socks5,
            ctx,
            admission,
            asker,
        );
        let size = std::mem::size_of_val(&task);
        assert!(size <= 512, "a connection's future is {size} bytes");
    }

    #[tokio::test(start_paused = true)]
    async fn out_of_descriptors_at_accept_backs_off_and_counts_local_resources() {
        let metrics = Arc::new(Metrics::new());
        let shutdown = Shutdown::new();
        let ctx = Arc::new(Context {
            dialer: Arc::new(NoDialer),
            metrics: metrics.clone(),
            dial_timeout: Duration::from_secs(1),
            header_read_timeout: Duration::from_secs(1),
            shutdown: shutdown.clone(),
            refusals: refusal_log::RefusalLog::default(),
            audit: AuditSink::off(),
        });
        let limits = Limits {
            admitted: Arc::new(Semaphore::new(1)),
            overflow: Arc::new(Semaphore::new(1)),
        };
        let calls = Arc::new(AtomicU64::new(0));
        let listener = Failing {
            errno: rustix::io::Errno::MFILE,
            calls: calls.clone(),
        };
        let started = tokio::time::Instant::now();
        let run = async {
            run_listener(
                listener,
                ListenerKind::Socks5,
                Protocol::Socks5,
                &ctx,
                &limits,
                Duration::ZERO,
            )
            .await;
        };
        let stop = async {
            // One second of (virtual) failing accepts, then shutdown.
            tokio::time::sleep(Duration::from_secs(1)).await;
            shutdown.trigger();
        };
        tokio::join!(run, stop);
        assert!(started.elapsed() >= Duration::from_secs(1));
        // One accept per backoff, not a spin: 1 s / 100 ms, plus the first.
        let calls = calls.load(Ordering::Relaxed);
        let most = 1 + Duration::from_secs(1).as_millis() / ACCEPT_ERROR_BACKOFF.as_millis();
        assert!(calls >= 2 && u128::from(calls) <= most, "{calls} accepts");
        let counted = |reason: &str| {
            metrics
                .accept_failures
                .get_or_create(&crate::metrics::ListenerReasonLabel {
                    listener: "socks5".into(),
                    reason: reason.into(),
                })
                .get()
        };
        assert_eq!(counted("local_resources"), calls);
        assert_eq!(counted("other"), 0);
    }
}
