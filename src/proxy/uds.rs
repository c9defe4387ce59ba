//! The HTTP CONNECT Unix socket file: creating its directory, replacing a
//! stale socket left by a previous run, permissions, and removal when the
//! listener is dropped.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};

use super::{Accept, FrontDoorError, Listener};

/// Mode of the socket file: the apiserver's user or group may connect.
pub(crate) const SOCKET_MODE: u32 = 0o660;
/// Mode of a parent directory we create.
pub(crate) const DIR_MODE: u32 = 0o750;
/// How long to try connecting to an existing socket file to tell a live
/// server from a stale file.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// A bound Unix socket. Dropping it removes the socket file, unless the
/// file was replaced by someone else meanwhile.
pub(crate) struct UdsListener {
    listener: UnixListener,
    path: PathBuf,
    /// `(dev, ino)` of the socket file we created.
    identity: (u64, u64),
}

impl UdsListener {
    /// Bind at `path`: create the parent directory (mode 0750) if missing,
    /// replace a stale socket file (refuse any other kind of file, or a
    /// socket some process still serves), bind and set mode 0660.
    pub(crate) async fn bind(path: &Path) -> Result<Self, FrontDoorError> {
        let bind_error = |error| FrontDoorError::Bind {
            listener: Listener::Uds.as_str(),
            address: path.display().to_string(),
            error,
        };
        let path_error = |reason: String| FrontDoorError::SocketPath {
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
                tracing::info!(path = %path.display(), "removing stale socket file");
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
        // From here on, dropping `bound` removes the file again on errors.
        let meta = std::fs::symlink_metadata(path).map_err(bind_error)?;
        let bound = UdsListener {
            listener,
            path: path.to_path_buf(),
            identity: (meta.dev(), meta.ino()),
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
            .map_err(bind_error)?;
        tracing::info!(listener = "uds", path = %path.display(), "listening");
        Ok(bound)
    }

    /// The socket path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for UdsListener {
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

impl Accept for UdsListener {
    type Io = UnixStream;
    async fn next_conn(&self) -> io::Result<(Self::Io, String)> {
        let (stream, _) = self.listener.accept().await?;
        let client = match stream.peer_cred() {
            Ok(cred) => match cred.pid() {
                Some(pid) => format!("pid={pid} uid={}", cred.uid()),
                None => format!("uid={}", cred.uid()),
            },
            Err(_) => "unix".to_string(),
        };
        Ok((stream, client))
    }
}
