//! The Unix socket files nodetunnel listens on (the proxy's and the admin
//! API's): creating the parent directory, replacing a stale socket left by
//! a previous run, the file mode, and removal when the listener goes away.
//!
//! The socket is bound, then given its mode, and only then listens: until
//! `listen(2)`, a `connect(2)` to the file is refused (`ECONNREFUSED`), so no
//! client gets in while the file still has the mode the umask gave it.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use socket2::{Domain, SockAddr, Socket, Type};
use tokio::net::{UnixListener, UnixStream};

/// Mode of a socket file: its owner's user or group may connect.
pub const SOCKET_MODE: u32 = 0o660;
/// Mode of a parent directory we create.
pub const DIR_MODE: u32 = 0o750;
/// How long to try connecting to an existing socket file to tell a live
/// server from a stale file.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Pending connections the kernel queues before `accept`.
const LISTEN_BACKLOG: i32 = 1024;

/// Why a socket file could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum SocketFileError {
    /// The path cannot be used (its directory, or what already is there).
    #[error("{reason}")]
    Path {
        /// What is wrong with the path.
        reason: String,
    },
    /// Binding or setting the mode failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// A bound Unix socket. Dropping it removes the socket file, unless the
/// file was replaced by someone else meanwhile.
#[derive(Debug)]
pub struct SocketFile {
    listener: UnixListener,
    path: PathBuf,
    /// `(dev, ino)` of the socket file we created.
    identity: (u64, u64),
}

impl SocketFile {
    /// Bind at `path`: create the parent directory (mode 0750) if missing,
    /// replace a stale socket file (refuse any other kind of file, or a
    /// socket some process still serves), bind, set mode 0660, then listen.
    pub async fn bind(path: &Path) -> Result<SocketFile, SocketFileError> {
        Self::bind_observed(path, |_| {}).await
    }

    /// [`bind`](Self::bind), calling `before_listen` with the path once the
    /// file is bound and has its mode, right before `listen(2)` (the tests'
    /// window into the order of the steps).
    async fn bind_observed(
        path: &Path,
        before_listen: impl FnOnce(&Path),
    ) -> Result<SocketFile, SocketFileError> {
        let path_error = |reason: String| SocketFileError::Path { reason };
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
                    return Err(path_error("another process is serving this socket".into()));
                }
                tracing::info!(path = %path.display(), "removing stale socket file");
                std::fs::remove_file(path)
                    .map_err(|e| path_error(format!("cannot remove the stale socket: {e}")))?;
            }
            Ok(_) => {
                return Err(path_error(
                    "exists and is not a socket; refusing to replace it".into(),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        // Bound but not listening: the file exists (with the umask's mode)
        // and every connect to it is refused until `listen` below.
        let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
        socket.bind(&SockAddr::unix(path)?)?;
        let meta = std::fs::symlink_metadata(path)?;
        // From here on, dropping `unlisted` removes the file again on errors.
        let unlisted = BoundFile {
            path: path.to_path_buf(),
            identity: (meta.dev(), meta.ino()),
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))?;
        before_listen(path);
        socket.listen(LISTEN_BACKLOG)?;
        socket.set_nonblocking(true)?;
        let listener = UnixListener::from_std(std::os::unix::net::UnixListener::from(socket))?;
        Ok(SocketFile {
            listener,
            path: unlisted.keep(),
            identity: (meta.dev(), meta.ino()),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accept the next connection.
    pub async fn accept(&self) -> io::Result<UnixStream> {
        self.listener.accept().await.map(|(stream, _)| stream)
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        remove_if_ours(&self.path, self.identity);
    }
}

/// A socket file bound but not yet listening: removed on drop (an error
/// between `bind` and `listen`), unless [`keep`](BoundFile::keep) is called.
struct BoundFile {
    path: PathBuf,
    identity: (u64, u64),
}

impl BoundFile {
    /// The path; the file is no longer removed by this guard.
    fn keep(mut self) -> PathBuf {
        std::mem::take(&mut self.path)
    }
}

impl Drop for BoundFile {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            remove_if_ours(&self.path, self.identity);
        }
    }
}

/// Remove the socket file at `path` if it still is the file `(dev, ino)`.
fn remove_if_ours(path: &Path, identity: (u64, u64)) {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if (meta.dev(), meta.ino()) == identity => {
            if let Err(error) = std::fs::remove_file(path) {
                tracing::warn!(
                    path = %path.display(),
                    error = %error,
                    "cannot remove the socket file"
                );
            }
        }
        // Replaced or removed by someone else: leave it alone.
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// At the moment `listen(2)` is called the file already has mode 0660,
    /// and a connect made before that moment is refused: no client gets in
    /// while the mode is the umask's (0777 under `umask 0000`).
    #[tokio::test]
    async fn no_connection_is_accepted_before_the_mode_is_set() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.sock");
        let mut seen = None;
        let socket = SocketFile::bind_observed(&path, |p| {
            let mode = std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
            let early = std::os::unix::net::UnixStream::connect(p).map_err(|e| e.kind());
            seen = Some((mode, early));
        })
        .await
        .unwrap();
        let (mode, early) = seen.expect("before_listen was called");
        assert_eq!(mode, SOCKET_MODE, "mode at listen time: {mode:o}");
        assert_eq!(
            early.err(),
            Some(io::ErrorKind::ConnectionRefused),
            "a connect before listen must be refused"
        );
        // Once bound, the socket serves.
        let client = UnixStream::connect(&path);
        let (client, accepted) = tokio::join!(client, socket.accept());
        client.unwrap();
        accepted.unwrap();
        let mode = std::fs::symlink_metadata(&path)
            .unwrap()
            .permissions()
            .mode()
            & 0o7777;
        assert_eq!(mode, SOCKET_MODE);
        drop(socket);
        assert!(!path.exists(), "the file is removed on drop");
    }

    #[tokio::test]
    async fn a_failed_bind_leaves_no_file_and_a_live_socket_is_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.sock");
        let first = SocketFile::bind(&path).await.unwrap();
        let second = SocketFile::bind(&path).await.unwrap_err();
        assert!(
            second.to_string().contains("another process is serving"),
            "{second}"
        );
        drop(first);
        assert!(!path.exists());
        // A stale file (bound, never listening) is replaced.
        let stale = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
        stale.bind(&SockAddr::unix(&path).unwrap()).unwrap();
        drop(stale);
        let again = SocketFile::bind(&path).await.unwrap();
        assert_eq!(again.path(), path);
    }
}
