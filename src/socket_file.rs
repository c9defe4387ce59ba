//! The Unix socket files nodetunnel listens on (the proxy's and the admin
//! API's): creating the parent directory, replacing a stale socket left by
//! a previous run, the file mode, and removal when the listener goes away.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};

/// Mode of a socket file: its owner's user or group may connect.
pub const SOCKET_MODE: u32 = 0o660;
/// Mode of a parent directory we create.
pub const DIR_MODE: u32 = 0o750;
/// How long to try connecting to an existing socket file to tell a live
/// server from a stale file.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

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
    /// socket some process still serves), bind and set mode 0660.
    pub async fn bind(path: &Path) -> Result<SocketFile, SocketFileError> {
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
        let listener = UnixListener::bind(path)?;
        // From here on, dropping `bound` removes the file again on errors.
        let meta = std::fs::symlink_metadata(path)?;
        let bound = SocketFile {
            listener,
            path: path.to_path_buf(),
            identity: (meta.dev(), meta.ino()),
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))?;
        Ok(bound)
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
        match std::fs::symlink_metadata(&self.path) {
            Ok(meta) if (meta.dev(), meta.ino()) == self.identity => {
                if let Err(error) = std::fs::remove_file(&self.path) {
                    tracing::warn!(
                        path = %self.path.display(),
                        error = %error,
                        "cannot remove the socket file"
                    );
                }
            }
            // Replaced or removed by someone else: leave it alone.
            _ => {}
        }
    }
}
