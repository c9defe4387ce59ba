//! The far side of the tunnel for the hostile-client suite, all inside the
//! test process: an in-process SSH node (russh server on 127.0.0.1) that
//! answers direct-tcpip by connecting to the destination itself, as sshd
//! does, and an echo server to connect to.
//!
//! Unlike tests/ssh_node, every channel is a plain detached task, so the
//! node keeps nothing per finished channel (the leak check opens 100,000),
//! and it counts its live channels and the echo server its live
//! connections, so a test can tell that the far side let go too.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use russh::keys::{Algorithm, PrivateKey, PublicKey};
use russh::server::{self, Auth, Msg, Session};
use russh::{Channel, ChannelOpenFailure};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Live and total counts of one kind of connection.
#[derive(Default)]
pub struct Counter {
    live: AtomicUsize,
    total: AtomicU64,
}

impl Counter {
    /// Connections open now.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    /// Connections ever opened.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::SeqCst)
    }

    fn open(self: &Arc<Self>) -> Live {
        self.live.fetch_add(1, Ordering::SeqCst);
        self.total.fetch_add(1, Ordering::SeqCst);
        Live(self.clone())
    }
}

/// One live connection of a [`Counter`]; counted down on drop.
struct Live(Arc<Counter>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::SeqCst);
    }
}

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

/// An in-process SSH node: public-key auth for one client key,
/// direct-tcpip by TCP connect from the test process.
pub struct SshNode {
    pub addr: SocketAddr,
    pub channels: Arc<Counter>,
    host_key: PrivateKey,
    accept: JoinHandle<()>,
}

impl SshNode {
    pub async fn start(client: PublicKey) -> SshNode {
        let host_key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).expect("host key");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind node");
        let addr = listener.local_addr().expect("node addr");
        let config = Arc::new(server::Config {
            keys: vec![host_key.clone()],
            auth_rejection_time: std::time::Duration::from_millis(1),
            auth_rejection_time_initial: Some(std::time::Duration::ZERO),
            nodelay: true,
            // No inactivity timeout: the suite idles for a while.
            inactivity_timeout: None,
            ..Default::default()
        });
        let channels = Arc::new(Counter::default());
        let handler = NodeHandler {
            client,
            channels: channels.clone(),
        };
        let accept = tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let _ = socket.set_nodelay(true);
                let config = config.clone();
                let handler = handler.clone();
                tokio::spawn(async move {
                    if let Ok(session) = server::run_stream(config, socket, handler).await {
                        let _ = session.await;
                    }
                });
            }
        });
        SshNode {
            addr,
            channels,
            host_key,
            accept,
        }
    }

    /// A known_hosts line for this node.
    pub fn known_hosts_line(&self) -> String {
        format!(
            "[127.0.0.1]:{} {}",
            self.addr.port(),
            self.host_key
                .public_key()
                .to_openssh()
                .expect("encode host key")
        )
    }
}

impl Drop for SshNode {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

#[derive(Clone)]
struct NodeHandler {
    client: PublicKey,
    channels: Arc<Counter>,
}

impl server::Handler for NodeHandler {
    type Error = russh::Error;

    async fn auth_publickey(
        &mut self,
        _user: &str,
        key: server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(if key.public_key.key_data() == self.client.key_data() {
            Auth::Accept
        } else {
            Auth::reject()
        })
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Connect in a task of its own, as sshd does with a non-blocking
        // connect: the session keeps serving its other channels meanwhile.
        let target = format!("{host_to_connect}:{port_to_connect}");
        let channels = self.channels.clone();
        tokio::spawn(async move {
            let tcp = match TcpStream::connect(&target).await {
                Ok(tcp) => tcp,
                Err(_) => {
                    reply.reject(ChannelOpenFailure::ConnectFailed).await;
                    return;
                }
            };
            let _live = channels.open();
            reply.accept().await;
            let _ = tcp.set_nodelay(true);
            pump(channel, tcp).await;
        });
        Ok(())
    }
}

/// Like sshd: EOF each way is forwarded as a half-close, CLOSE once both
/// directions are done.
async fn pump(channel: Channel<Msg>, mut tcp: TcpStream) {
    let (mut from_client, to_client) = channel.split();
    let (mut tcp_read, mut tcp_write) = tcp.split();
    let upstream = async {
        while let Some(msg) = from_client.wait().await {
            match msg {
                // The guard writes; a failed write ends the direction.
                russh::ChannelMsg::Data { data } if tcp_write.write_all(&data).await.is_err() => {
                    break
                }
                russh::ChannelMsg::Eof | russh::ChannelMsg::Close => break,
                _ => {}
            }
        }
        let _ = tcp_write.shutdown().await;
    };
    let downstream = async {
        let mut writer = to_client.make_writer();
        let _ = tokio::io::copy(&mut tcp_read, &mut writer).await;
        let _ = to_client.eof().await;
    };
    tokio::join!(upstream, downstream);
    let _ = to_client.close().await;
}
