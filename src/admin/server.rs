//! The admin HTTP server: binding its listeners (loopback TCP and/or a Unix
//! socket), accepting with a bounded number of connections, serving each
//! with hyper (HTTP/1.1, headers bounded in size and time) and stopping on
//! shutdown.
//!
//! [`MAX_CONNECTIONS`] ordinary connections are served at once. When they
//! are all taken (idle clients holding them, for instance), up to
//! [`PROBE_RESERVE`] more are accepted for probes only: they answer
//! `/healthz` and `/readyz` (503 for the rest), must send their request
//! within [`PROBE_HEADER_TIMEOUT`] and are closed after one request.
//!
//! The Unix socket follows the front door's rules: the parent directory is
//! created (0750) if missing, a stale socket file from an earlier run is
//! replaced, any other file is refused, the socket is mode 0660 and its
//! file is removed when the server stops.

use crate::field_error::FieldError;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::state::{AdminState, Lane, Transport};
use super::{AdminConfig, ReadinessConfig};
use crate::descriptors::{AcceptFailures, ACCEPT_ERROR_BACKOFF};
use crate::shutdown::Shutdown;
use crate::socket_file::{SocketFile, SocketFileError};

/// Ordinary admin connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Connections accepted beyond [`MAX_CONNECTIONS`] for `/healthz` and
/// `/readyz` only; more still are closed right after accept.
pub const PROBE_RESERVE: usize = 8;
/// Bound on receiving the request head on a connection of the probe
/// reserve.
pub const PROBE_HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on receiving a request head (slowloris protection); also closes
/// idle keep-alive connections.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head accepted.
pub const MAX_HEADER_BYTES: usize = 8192;
/// How long open admin connections may finish after shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Why the admin server could not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// `[admin]` or `[readiness]` is invalid.
    #[error("invalid configuration: {key}: {reason}")]
    Config {
        /// The offending key, like `admin.listen`.
        key: String,
        /// Why it is refused.
        reason: String,
    },
    /// A listener could not be bound.
    #[error("cannot bind the admin {listener} listener on {address}: {error}")]
    Bind {
        /// `tcp` or `uds`.
        listener: &'static str,
        /// The address or socket path.
        address: String,
        /// The system error.
        error: io::Error,
    },
    /// The Unix socket path is taken by something we must not remove.
    #[error("admin unix socket {}: {reason}", path.display())]
    SocketPath {
        /// The configured path.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// The bound admin listeners, ready to [`serve`](AdminServer::serve).
pub struct AdminServer {
    tcp: Option<(TcpListener, SocketAddr)>,
    uds: Option<SocketFile>,
}

impl std::fmt::Debug for AdminServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminServer")
            .field("tcp", &self.tcp_addr())
            .field("uds", &self.uds_path())
            .finish()
    }
}

impl AdminServer {
    /// Check `config` and `readiness`, and bind every configured listener
    /// (errors name the listener and its address or path).
    pub async fn bind(
        config: &AdminConfig,
        readiness: &ReadinessConfig,
    ) -> Result<AdminServer, AdminError> {
        config
            .validate()
            .and_then(|()| readiness.validate())
            .map_err(|FieldError { key, reason }| AdminError::Config { key, reason })?;
        if let Some(addr) = config.listen {
            if !addr.ip().is_loopback() {
                tracing::warn!(address = %addr, "admin API on a non-loopback address without authentication (admin.allow_non_loopback = true)");
            }
        }
        let tcp = match config.listen {
            Some(addr) => {
                let bind_error = |error| AdminError::Bind {
                    listener: "tcp",
                    address: addr.to_string(),
                    error,
                };
                let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
                let local = listener.local_addr().map_err(bind_error)?;
                Some((listener, local))
            }
            None => None,
        };
        let uds = match &config.uds {
            Some(path) => Some(SocketFile::bind(path).await.map_err(|e| match e {
                SocketFileError::Path { reason } => AdminError::SocketPath {
                    path: path.to_path_buf(),
                    reason,
                },
                SocketFileError::Io(error) => AdminError::Bind {
                    listener: "uds",
                    address: path.display().to_string(),
                    error,
                },
            })?),
            None => None,
        };
        Ok(AdminServer { tcp, uds })
    }

    /// The bound TCP address.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().map(|(_, a)| *a)
    }

    /// The Unix socket path.
    pub fn uds_path(&self) -> Option<&Path> {
        self.uds.as_ref().map(|s| s.path())
    }

    /// Serve until `shutdown` fires; then stop accepting (the socket file is
    /// removed) and give open connections a short grace period.
    pub async fn serve(self, state: Arc<AdminState>, shutdown: Shutdown) {
        let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let reserve = Arc::new(Semaphore::new(PROBE_RESERVE));
        let mut tasks = JoinSet::new();
        let AdminServer { tcp, uds } = self;
        let mut failures = AcceptFailures::new("admin");
        loop {
            let accepted = tokio::select! {
                biased;
                () = shutdown.wait() => break,
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                    if let Err(e) = joined {
                        if e.is_panic() {
                            tracing::error!(error = %e, "admin connection task panicked");
                        }
                    }
                    continue;
                }
                a = accept_tcp(tcp.as_ref()) => a.map(|(s, _)| Conn::Tcp(s)),
                a = accept_uds(uds.as_ref()) => a.map(Conn::Unix),
            };
            match accepted {
                Ok(conn) => {
                    failures.succeeded();
                    let (permit, lane) = match limit.clone().try_acquire_owned() {
                        Ok(permit) => (permit, Lane::General),
                        Err(_) => match reserve.clone().try_acquire_owned() {
                            Ok(permit) => (permit, Lane::ProbesOnly),
                            Err(_) => {
                                tracing::debug!("admin connection limit reached, probe reserve too: closing a new connection");
                                continue;
                            }
                        },
                    };
                    let state = state.clone();
                    let shutdown = shutdown.clone();
                    tasks.spawn(async move {
                        match conn {
                            Conn::Tcp(s) => {
                                serve_connection(s, state, shutdown, permit, lane, Transport::Tcp)
                                    .await
                            }
                            Conn::Unix(s) => {
                                serve_connection(s, state, shutdown, permit, lane, Transport::Unix)
                                    .await
                            }
                        }
                    });
                }
                Err(error) => {
                    failures.failed(&error, &state.metrics);
                    tokio::select! {
                        () = shutdown.wait() => break,
                        () = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => {}
                    }
                }
            }
        }
        drop(tcp);
        drop(uds);
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        while !tasks.is_empty() {
            match tokio::time::timeout_at(deadline, tasks.join_next()).await {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => {
                    tasks.abort_all();
                    while tasks.join_next().await.is_some() {}
                    break;
                }
            }
        }
        tracing::info!("admin API stopped");
    }
}

enum Conn {
    Tcp(tokio::net::TcpStream),
    Unix(UnixStream),
}

async fn accept_tcp(
    listener: Option<&(TcpListener, SocketAddr)>,
) -> io::Result<(tokio::net::TcpStream, SocketAddr)> {
    match listener {
        Some((l, _)) => l.accept().await,
        None => std::future::pending().await,
    }
}

async fn accept_uds(socket: Option<&SocketFile>) -> io::Result<UnixStream> {
    match socket {
        Some(s) => s.accept().await,
        None => std::future::pending().await,
    }
}

async fn serve_connection<I>(
    io: I,
    state: Arc<AdminState>,
    shutdown: Shutdown,
    _permit: OwnedSemaphorePermit,
    lane: Lane,
    transport: Transport,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(super::handlers::answer(&state, &req, lane, transport)) }
    });
    let probes_only = lane == Lane::ProbesOnly;
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(if probes_only {
            PROBE_HEADER_TIMEOUT
        } else {
            HEADER_READ_TIMEOUT
        })
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(!probes_only);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let served = tokio::select! {
        served = conn.as_mut() => served,
        () = shutdown.wait() => {
            conn.as_mut().graceful_shutdown();
            conn.as_mut().await
        }
    };
    if let Err(error) = served {
        tracing::debug!(error = %error, "admin connection ended with an error");
    }
}
