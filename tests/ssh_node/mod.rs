//! An in-process SSH node for unit-level and fault tests: a russh server on
//! 127.0.0.1 that authenticates public keys and serves direct-tcpip by
//! connecting to the destination itself, like sshd. It can be killed (every
//! connection dropped at once) and restarted on the same port with the same
//! host key. End-to-end tests use real OpenSSH instead (tests/support).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use nodetunnel::session::{Severable, Severance};
use russh::keys::{Algorithm, PrivateKey, PublicKey};
use russh::server::{self, Auth, Msg, Session};
use russh::{Channel, ChannelOpenFailure};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// A running (or killed) in-process SSH node.
pub struct SshNode {
    addr: SocketAddr,
    host_key: PrivateKey,
    authorized: Arc<Mutex<Vec<PublicKey>>>,
    refuse_channels: Arc<std::sync::atomic::AtomicBool>,
    tasks: Option<Arc<Mutex<JoinSet<()>>>>,
    accept: Option<tokio::task::JoinHandle<()>>,
    /// One switch per accepted connection: russh runs server sessions in
    /// tasks of its own, so killing means cutting their sockets.
    cuts: Arc<Mutex<Vec<Arc<Severance>>>>,
}

impl SshNode {
    /// Start on an ephemeral loopback port with a fresh ed25519 host key,
    /// authorizing `client`.
    pub async fn start(client: &PublicKey) -> SshNode {
        let host_key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).expect("host key");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut node = SshNode {
            addr,
            host_key,
            authorized: Arc::new(Mutex::new(vec![client.clone()])),
            refuse_channels: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            tasks: None,
            accept: None,
            cuts: Arc::new(Mutex::new(Vec::new())),
        };
        node.serve(listener);
        node
    }

    /// The address sshd would listen on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The host key's public half.
    pub fn host_public_key(&self) -> PublicKey {
        self.host_key.public_key().clone()
    }

    /// A known_hosts line for this node.
    pub fn known_hosts_line(&self) -> String {
        format!(
            "[127.0.0.1]:{} {}",
            self.addr.port(),
            self.host_public_key().to_openssh().expect("encode")
        )
    }

    /// Replace the host key (takes effect for new connections after restart).
    pub fn replace_host_key(&mut self) {
        self.host_key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).expect("host key");
    }

    /// Refuse (ConnectFailed) every direct-tcpip channel from now on, as an
    /// sshd whose node cannot reach the destination would.
    pub fn refuse_channels(&self, refuse: bool) {
        self.refuse_channels
            .store(refuse, std::sync::atomic::Ordering::SeqCst);
    }

    /// Drop every authorized key.
    pub fn unauthorize_all(&self) {
        self.authorized.lock().unwrap().clear();
    }

    /// Authorize `key`.
    pub fn authorize(&self, key: &PublicKey) {
        self.authorized.lock().unwrap().push(key.clone());
    }

    /// Kill the server and every connection at once (like kill -9 of sshd);
    /// resolves once the port and all sockets are released.
    pub async fn kill(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
            let _ = accept.await;
        }
        for cut in self.cuts.lock().unwrap().drain(..) {
            cut.sever();
        }
        if let Some(tasks) = self.tasks.take() {
            let mut set = std::mem::take(&mut *tasks.lock().unwrap());
            set.shutdown().await;
        }
    }

    /// Listen again on the same port.
    pub async fn restart(&mut self) {
        self.kill().await;
        let listener = TcpListener::bind(self.addr)
            .await
            .expect("rebind same port");
        self.serve(listener);
    }

    fn serve(&mut self, listener: TcpListener) {
        let config = Arc::new(server::Config {
            keys: vec![self.host_key.clone()],
            auth_rejection_time: std::time::Duration::from_millis(1),
            auth_rejection_time_initial: Some(std::time::Duration::ZERO),
            nodelay: true,
            ..Default::default()
        });
        let tasks = Arc::new(Mutex::new(JoinSet::new()));
        let authorized = self.authorized.clone();
        let refuse = self.refuse_channels.clone();
        let conn_tasks = tasks.clone();
        let cuts = self.cuts.clone();
        self.accept = Some(tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                let _ = socket.set_nodelay(true);
                let (socket, cut) = Severable::new(socket);
                cuts.lock().unwrap().push(cut);
                let handler = NodeHandler {
                    authorized: authorized.clone(),
                    refuse: refuse.clone(),
                    tasks: conn_tasks.clone(),
                };
                let config = config.clone();
                conn_tasks.lock().unwrap().spawn(async move {
                    if let Ok(session) = server::run_stream(config, socket, handler).await {
                        let _ = session.await;
                    }
                });
            }
        }));
        self.tasks = Some(tasks);
    }
}

impl Drop for SshNode {
    fn drop(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
        }
        for cut in self.cuts.lock().unwrap().drain(..) {
            cut.sever();
        }
        if let Some(tasks) = self.tasks.take() {
            tasks.lock().unwrap().abort_all();
        }
    }
}

struct NodeHandler {
    authorized: Arc<Mutex<Vec<PublicKey>>>,
    refuse: Arc<std::sync::atomic::AtomicBool>,
    tasks: Arc<Mutex<JoinSet<()>>>,
}

impl server::Handler for NodeHandler {
    type Error = russh::Error;

    async fn auth_publickey(
        &mut self,
        _user: &str,
        key: server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        let ok = self
            .authorized
            .lock()
            .unwrap()
            .iter()
            .any(|k| k.key_data() == key.public_key.key_data());
        Ok(if ok { Auth::Accept } else { Auth::reject() })
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
        let target = format!("{host_to_connect}:{port_to_connect}");
        if self.refuse.load(std::sync::atomic::Ordering::SeqCst) {
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            return Ok(());
        }
        match TcpStream::connect(&target).await {
            Err(_) => reply.reject(ChannelOpenFailure::ConnectFailed).await,
            Ok(mut tcp) => {
                reply.accept().await;
                self.tasks.lock().unwrap().spawn(async move {
                    // Like sshd: EOF each way is forwarded as a half-close,
                    // CLOSE once both directions are done.
                    let (mut from_client, to_client) = channel.split();
                    let (mut tcp_read, mut tcp_write) = tcp.split();
                    let upstream = async {
                        while let Some(msg) = from_client.wait().await {
                            match msg {
                                russh::ChannelMsg::Data { data }
                                    if tcp_write.write_all(&data).await.is_err() =>
                                {
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
                });
            }
        }
        Ok(())
    }
}
