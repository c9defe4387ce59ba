//! The far side of the tunnel for the hostile-client suite, all inside the
//! test process: the in-process SSH node of tests/ssh_node (which answers
//! direct-tcpip by connecting to the destination itself, as sshd does, and
//! counts its channels), and an echo server to connect to that counts its
//! live connections, so a test can tell that the far side let go too.

use std::net::SocketAddr;
use std::sync::Arc;

use russh::keys::PublicKey;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::ssh_node::Counter;

/// An echo server on 127.0.0.1: echoes until EOF, then half-closes.
pub struct Echo {
    pub addr: SocketAddr,
    pub connections: Arc<Counter>,
    accept: JoinHandle<()>,
}

impl Echo {
    pub async fn start() -> Echo {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
        let addr = listener.local_addr().expect("echo addr");
        let connections = Arc::new(Counter::default());
        let counter = connections.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let live = counter.open();
                tokio::spawn(async move {
                    let _live = live;
                    let _ = socket.set_nodelay(true);
                    let (mut r, mut w) = socket.into_split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        Echo {
            addr,
            connections,
            accept,
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// An in-process SSH node ([`crate::ssh_node::SshNode`]) that authorizes
/// one client key, with its address and channel count at hand.
pub struct SshNode {
    pub addr: SocketAddr,
    pub channels: Arc<Counter>,
    node: crate::ssh_node::SshNode,
}

impl SshNode {
    pub async fn start(client: PublicKey) -> SshNode {
        let node = crate::ssh_node::SshNode::start(&client).await;
        SshNode {
            addr: node.addr(),
            channels: node.channels(),
            node,
        }
    }

    /// A known_hosts line for this node.
    pub fn known_hosts_line(&self) -> String {
        self.node.known_hosts_line()
    }
}
