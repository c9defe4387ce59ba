//! An in-process SSH node for unit-level, fault and hostile-client tests: a
//! russh server on 127.0.0.1 that authenticates public keys and serves
//! direct-tcpip by connecting to the destination itself, like sshd (in a
//! task of its own, as sshd's non-blocking connect: the session keeps
//! serving its other channels meanwhile). It can be killed (every
//! connection dropped at once) and restarted on the same port with the same
//! host key. It keeps nothing per finished connection or channel (the
//! hostile suite's leak check opens 100,000) and counts its channels
//! ([`SshNode::channels`]). End-to-end tests use real OpenSSH instead
//! (tests/support).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use nodetunnel::session::{Severable, Severance};
use russh::keys::{Algorithm, PrivateKey, PublicKey};
use russh::server::{self, Auth, Msg, Session};
use russh::{Channel, ChannelOpenFailure};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// Live, peak and total counts of one kind of connection.
#[derive(Default)]
pub struct Counter {
    live: AtomicUsize,
    peak: AtomicUsize,
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

    /// The most open at once.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }

    /// Count one connection open until the returned guard drops.
    pub fn open(self: &Arc<Self>) -> Live {
        let live = self.live.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(live, Ordering::SeqCst);
        self.total.fetch_add(1, Ordering::SeqCst);
        Live(self.clone())
    }
}

/// One live connection of a [`Counter`]; counted down on drop.
pub struct Live(Arc<Counter>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A running (or killed) in-process SSH node.
pub struct SshNode {
    addr: SocketAddr,
    host_key: PrivateKey,
    authorized: Arc<Mutex<Vec<PublicKey>>>,
    refuse_channels: Arc<AtomicBool>,
    channels: Arc<Counter>,
    tasks: Option<Arc<Mutex<JoinSet<()>>>>,
    accept: Option<tokio::task::JoinHandle<()>>,
    /// One switch per accepted connection: russh runs server sessions in
    /// tasks of its own, so killing means cutting their sockets.
    cuts: Arc<Mutex<Vec<Arc<Severance>>>>,
    /// The identification string it sends (`None`: russh's own).
    ident: Option<String>,
    /// Connections in their handshake: from the client's first byte (a TCP
    /// probe that only reads the banner never sends one) to a successful
    /// authentication or the end of the connection. Shared between nodes
    /// by [`SshNode::count_handshakes_in`].
    handshakes: Arc<Counter>,
}

impl SshNode {
    /// Start on an ephemeral loopback port with a fresh ed25519 host key,
    /// authorizing `client`.
    pub async fn start(client: &PublicKey) -> SshNode {
        SshNode::start_identified(client, None).await
    }

    /// As [`SshNode::start`], identifying itself as `ident` (e.g.
    /// `SSH-2.0-OpenSSH_9.2p1`) instead of as russh.
    pub async fn start_as(client: &PublicKey, ident: &str) -> SshNode {
        SshNode::start_identified(client, Some(ident.to_string())).await
    }

    async fn start_identified(client: &PublicKey, ident: Option<String>) -> SshNode {
        let host_key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).expect("host key");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut node = SshNode {
            addr,
            host_key,
            authorized: Arc::new(Mutex::new(vec![client.clone()])),
            refuse_channels: Arc::new(AtomicBool::new(false)),
            channels: Arc::new(Counter::default()),
            tasks: None,
            accept: None,
            cuts: Arc::new(Mutex::new(Vec::new())),
            ident,
            handshakes: Arc::new(Counter::default()),
        };
        node.serve(listener);
        node
    }

    /// Count this node's handshakes in `counter` (shared by several nodes
    /// to see how many run at once across them), from the next (re)start.
    pub fn count_handshakes_in(&mut self, counter: Arc<Counter>) {
        self.handshakes = counter;
    }

    /// The address sshd would listen on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its accepted direct-tcpip channels (connected to the destination).
    pub fn channels(&self) -> Arc<Counter> {
        self.channels.clone()
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
        self.refuse_channels.store(refuse, Ordering::SeqCst);
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
            // No inactivity timeout: the hostile suite idles for a while.
            inactivity_timeout: None,
            server_id: match &self.ident {
                Some(ident) => russh::SshId::Standard(ident.clone().into()),
                None => server::Config::default().server_id,
            },
            ..Default::default()
        });
        let tasks = Arc::new(Mutex::new(JoinSet::new()));
        let handler = NodeHandler {
            authorized: self.authorized.clone(),
            refuse: self.refuse_channels.clone(),
            channels: self.channels.clone(),
            tasks: tasks.clone(),
            handshaking: Arc::new(Mutex::new(None)),
        };
        let handshakes = self.handshakes.clone();
        let cuts = self.cuts.clone();
        let sessions = tasks.clone();
        self.accept = Some(tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let _ = socket.set_nodelay(true);
                let handshaking = Arc::new(Mutex::new(None));
                let socket = FirstByte {
                    inner: socket,
                    counter: handshakes.clone(),
                    slot: handshaking.clone(),
                    seen: false,
                };
                let (socket, cut) = Severable::new(socket);
                {
                    let mut cuts = cuts.lock().unwrap();
                    // Forget sessions that ended (only this list holds their switch).
                    cuts.retain(|c| Arc::strong_count(c) > 1);
                    cuts.push(cut);
                }
                let config = config.clone();
                let mut handler = handler.clone();
                handler.handshaking = handshaking;
                spawn_in(&sessions, async move {
                    if let Ok(session) = server::run_stream(config, socket, handler).await {
                        let _ = session.await;
                    }
                });
            }
        }));
        self.tasks = Some(tasks);
    }
}

/// Spawn `task` in `tasks` (so that a kill aborts it), first reaping the
/// tasks that finished: the set keeps nothing per finished task.
fn spawn_in(
    tasks: &Mutex<JoinSet<()>>,
    task: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let mut set = tasks.lock().unwrap();
    while set.try_join_next().is_some() {}
    set.spawn(task);
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

#[derive(Clone)]
struct NodeHandler {
    authorized: Arc<Mutex<Vec<PublicKey>>>,
    refuse: Arc<AtomicBool>,
    channels: Arc<Counter>,
    tasks: Arc<Mutex<JoinSet<()>>>,
    /// This connection's place among the handshakes, until authenticated.
    handshaking: Arc<Mutex<Option<Live>>>,
}

/// A server socket that joins the handshake count when the client sends
/// its first byte (its identification line; a probe sends nothing).
struct FirstByte {
    inner: TcpStream,
    counter: Arc<Counter>,
    slot: Arc<Mutex<Option<Live>>>,
    seen: bool,
}

impl tokio::io::AsyncRead for FirstByte {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if !self.seen && buf.filled().len() > before {
            self.seen = true;
            *self.slot.lock().unwrap() = Some(self.counter.open());
        }
        polled
    }
}

impl tokio::io::AsyncWrite for FirstByte {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Drop for FirstByte {
    fn drop(&mut self) {
        // The connection ended: it is no longer handshaking.
        self.slot.lock().unwrap().take();
    }
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
        if ok {
            self.handshaking.lock().unwrap().take();
        }
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
        if self.refuse.load(Ordering::SeqCst) {
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            return Ok(());
        }
        // Connect in a task of its own, as sshd does with a non-blocking
        // connect: the session keeps serving its other channels meanwhile.
        let target = format!("{host_to_connect}:{port_to_connect}");
        let channels = self.channels.clone();
        spawn_in(&self.tasks, async move {
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
