//! [`DevError`]: why `nodetunnel dev` could not start or keep its cluster.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::keys::KeyError;
use crate::manager::WaitReadyError;
use crate::serve::{SignalError, StartError};

/// Why `nodetunnel dev` failed. The text is what the command prints after
/// `nodetunnel dev: `.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    /// `--nodes` out of range.
    #[error("--nodes must be between 1 and 200, not {0}")]
    NodeCount(u8),
    /// `--fail-node` names no node of the cluster.
    #[error("--fail-node {name}: no such node (node-1 to node-{count})")]
    NoSuchNode {
        /// The name given.
        name: String,
        /// How many nodes there are.
        count: u8,
    },
    /// The temporary directory cannot be created.
    #[error("temporary directory: {0}")]
    TempDir(std::io::Error),
    /// A generated file cannot be written.
    #[error("{}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The write error.
        source: std::io::Error,
    },
    /// The client key cannot be generated or loaded.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A node's host key cannot be generated or encoded.
    #[error("host key: {0}")]
    HostKey(russh::keys::ssh_key::Error),
    /// A node's kubelet certificate cannot be generated.
    #[error("kubelet certificate: {0}")]
    KubeletCertificate(#[from] rcgen::Error),
    /// A node's kubelet TLS server cannot be built.
    #[error("kubelet TLS: {0}")]
    KubeletTls(#[from] rustls::Error),
    /// A node's listener cannot be bound.
    #[error("bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The bind error.
        source: std::io::Error,
    },
    /// The sidecar did not start.
    #[error(transparent)]
    Start(#[from] StartError),
    /// A node did not become Ready.
    #[error("{node}: {source}")]
    NotReady {
        /// The node.
        node: String,
        /// Why.
        source: WaitReadyError,
    },
    /// The signal handlers cannot be installed.
    #[error(transparent)]
    Signal(#[from] SignalError),
}
