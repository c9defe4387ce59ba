//! The Unix socket listeners (HTTP CONNECT's and gRPC's): a [`SocketFile`] (directory,
//! stale socket, mode 0660, removal on drop) that reports its clients'
//! credentials.

use std::io;
use std::path::Path;

use tokio::net::UnixStream;

use super::{Accept, FrontDoorError, ListenerKind, Peer};
use crate::audit::Client;
use crate::socket_file::{SocketFile, SocketFileError};

/// The proxy's Unix socket (see [`crate::socket_file`]).
pub(crate) struct UdsListener {
    file: SocketFile,
}

impl UdsListener {
    /// Bind at `path` as [`SocketFile::bind`] does.
    pub(crate) async fn bind(path: &Path, kind: ListenerKind) -> Result<Self, FrontDoorError> {
        let file = SocketFile::bind(path).await.map_err(|e| match e {
            SocketFileError::Path { reason } => FrontDoorError::SocketPath {
                path: path.to_path_buf(),
                reason,
            },
            SocketFileError::Io(error) => FrontDoorError::Bind {
                listener: kind.as_str(),
                address: path.display().to_string(),
                error,
            },
        })?;
        tracing::info!(listener = kind.as_str(), path = %path.display(), "listening");
        Ok(UdsListener { file })
    }

    /// The socket path.
    pub(crate) fn path(&self) -> &Path {
        self.file.path()
    }
}

impl Accept for UdsListener {
    type Io = UnixStream;
    async fn next_conn(&self) -> io::Result<(Self::Io, Peer)> {
        let stream = self.file.accept().await?;
        let peer = match stream.peer_cred() {
            Ok(cred) => Peer {
                display: match cred.pid() {
                    Some(pid) => format!("pid={pid} uid={}", cred.uid()),
                    None => format!("uid={}", cred.uid()),
                },
                client: Client {
                    uid: Some(cred.uid()),
                    gid: Some(cred.gid()),
                    pid: cred.pid(),
                    ..Client::default()
                },
            },
            Err(_) => Peer {
                display: "unix".to_string(),
                client: Client::default(),
            },
        };
        Ok((stream, peer))
    }
}
