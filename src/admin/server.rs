//! The admin HTTP server: binding its listeners (loopback TCP and/or a Unix
//! socket), accepting with a bounded number of connections, serving each
//! with hyper (HTTP/1.1, headers bounded in size and time) and stopping on
//! shutdown.
//!
//! The Unix socket follows the front door's rules: the parent directory is
//! created (0750) if missing, a stale socket file from an earlier run is
//! replaced, any other file is refused, the socket is mode 0660 and its
//! file is removed when the server stops.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::{AdminConfig, ReadinessConfig};
use crate::inventory::SyncStatus;
use crate::manager::TunnelManager;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// Admin connections served at once; more are closed right after accept.
pub const MAX_CONNECTIONS: usize = 64;
/// Bound on receiving a request head (slowloris protection); also closes
/// idle keep-alive connections.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head accepted.
pub const MAX_HEADER_BYTES: usize = 8192;
/// How long open admin connections may finish after shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Pause after a failed accept (EMFILE), so it does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);
/// Mode of the Unix socket.
const SOCKET_MODE: u32 = 0o660;
/// Mode of a socket directory we create.
const DIR_MODE: u32 = 0o750;
/// Bound on probing an existing socket file for a live server.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

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
}

/// A bound Unix socket; dropping it removes the file (unless someone
/// replaced it meanwhile).
struct AdminSocket {
    listener: UnixListener,
    path: PathBuf,
    identity: (u64, u64),
}

impl Drop for AdminSocket {
    fn drop(&mut self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.identity {
                if let Err(error) = std::fs::remove_file(&self.path) {
                    tracing::warn!(path = %self.path.display(), error = %error, "cannot remove the admin socket file");
                }
            }
        }
    }
}

/// The bound admin listeners, ready to [`serve`](AdminServer::serve).
pub struct AdminServer {
    tcp: Option<(TcpListener, SocketAddr)>,
    uds: Option<AdminSocket>,
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
            .map_err(|(key, reason)| AdminError::Config { key, reason })?;
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
            Some(path) => Some(bind_socket(path).await?),
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
        self.uds.as_ref().map(|s| s.path.as_path())
    }

    /// Serve until `shutdown` fires; then stop accepting (the socket file is
    /// removed) and give open connections a short grace period.
    pub async fn serve(self, state: Arc<AdminState>, shutdown: Shutdown) {
        let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let mut tasks = JoinSet::new();
        let AdminServer { tcp, uds } = self;
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
                    let Ok(permit) = limit.clone().try_acquire_owned() else {
                        tracing::debug!("admin connection limit reached: closing a new connection");
                        continue;
                    };
                    let state = state.clone();
                    let shutdown = shutdown.clone();
                    tasks.spawn(async move {
                        match conn {
                            Conn::Tcp(s) => serve_connection(s, state, shutdown, permit).await,
                            Conn::Unix(s) => serve_connection(s, state, shutdown, permit).await,
                        }
                    });
                }
                Err(error) => {
                    tracing::warn!(error = %error, "admin accept failed");
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

async fn accept_uds(socket: Option<&AdminSocket>) -> io::Result<UnixStream> {
    match socket {
        Some(s) => s.listener.accept().await.map(|(stream, _)| stream),
        None => std::future::pending().await,
    }
}

async fn serve_connection<I>(
    io: I,
    state: Arc<AdminState>,
    shutdown: Shutdown,
    _permit: OwnedSemaphorePermit,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(super::handlers::answer(&state, &req)) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(true);
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

/// Bind the admin Unix socket (see the module docs).
async fn bind_socket(path: &Path) -> Result<AdminSocket, AdminError> {
    let bind_error = |error| AdminError::Bind {
        listener: "uds",
        address: path.display().to_string(),
        error,
    };
    let path_error = |reason: String| AdminError::SocketPath {
        path: path.to_path_buf(),
        reason,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(DIR_MODE)
                .create(parent)
                .map_err(|e| path_error(format!("cannot create the parent directory: {e}")))?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            let probe = tokio::time::timeout(PROBE_TIMEOUT, UnixStream::connect(path)).await;
            if let Ok(Ok(_)) = probe {
                return Err(path_error(
                    "another process is serving this socket".to_string(),
                ));
            }
            tracing::info!(path = %path.display(), "removing stale admin socket file");
            std::fs::remove_file(path)
                .map_err(|e| path_error(format!("cannot remove the stale socket: {e}")))?;
        }
        Ok(_) => {
            return Err(path_error(
                "exists and is not a socket; refusing to replace it".to_string(),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind_error(e)),
    }
    let listener = UnixListener::bind(path).map_err(bind_error)?;
    let meta = std::fs::symlink_metadata(path).map_err(bind_error)?;
    let socket = AdminSocket {
        listener,
        path: path.to_path_buf(),
        identity: (meta.dev(), meta.ino()),
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(bind_error)?;
    Ok(socket)
}
