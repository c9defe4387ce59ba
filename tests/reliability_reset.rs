//! A stream that nodetunnel cuts reaches the client as an abort, never as a
//! clean end (issue 8): on the TCP listeners (HTTP CONNECT, SOCKS5) the
//! client connection is reset (RST, the client's read fails with
//! `ECONNRESET`); on the Unix socket, which has no reset, the client reads
//! EOF (documented in docs/reliability.md, "Cut streams reach the client as
//! an abort"). A stream that ends normally still ends with a clean EOF,
//! byte-exact.
//!
//! The real `serve` code path ([`nodetunnel::serve::Server`]) runs in the
//! test process with all three listeners on loopback, in front of an
//! in-process SSH node (tests/ssh_node) that connects to the destination
//! itself, as sshd does. The node is killed mid-stream (every connection
//! cut at once, as with `kill -9` of sshd), or the server is stopped with
//! streams that never end (the drain deadline aborts them). The sidecar's
//! log is captured (JSON) to check what the connection handler says.
//!
//! Waits are bounded polls of observable state; no sleep synchronises
//! anything and no elapsed time is asserted.

mod ssh_node;
mod support;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nodetunnel::metrics::Metrics;
use nodetunnel::serve::Server;
use nodetunnel::tunnel::TunnelState;
use serde_json::Value;
use ssh_node::SshNode;
use support::inproc::{source_server, PATTERN_PERIOD};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

/// Bound on every wait: a hang fails the test instead of blocking it.
const DEADLINE: Duration = Duration::from_secs(30);
/// Pause between two polls of observable state.
const POLL: Duration = Duration::from_millis(20);
/// The destination pattern ([`source_server`]) repeats every 251 bytes (a
/// prime, so that a lost or repeated chunk shows); byte `i` of a stream is
/// `i % 251`.
const PERIOD: usize = PATTERN_PERIOD;
/// What each client reads before the fault: well into the stream.
const BEFORE_FAULT: usize = 256 * 1024;
/// Length of a finite download: more than one SSH window (2 MiB).
const FINITE: usize = 5 * 1024 * 1024 / 2 + 17;

async fn bounded<F: Future>(what: &str, future: F) -> F::Output {
    match tokio::time::timeout(DEADLINE, future).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {DEADLINE:?}: {what}"),
    }
}

// ---- The log ----

/// The sidecar's log events (JSON lines), captured in memory.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl io::Write for Log {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().expect("log").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Log {
    /// Capture nodetunnel's events (debug and up) of this thread, which
    /// runs the whole test: `#[tokio::test]` is a current-thread runtime.
    fn capture() -> (Log, tracing::subscriber::DefaultGuard) {
        let log = Log::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_env_filter("nodetunnel=debug")
            .with_writer(move || writer.clone())
            .finish();
        (log, tracing::subscriber::set_default(subscriber))
    }

    fn events(&self) -> Vec<Value> {
        let bytes = self.0.lock().expect("log").clone();
        String::from_utf8_lossy(&bytes)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Events with `message`.
    fn with_message(&self, message: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|v| v["message"] == message)
            .collect()
    }
}

// ---- The sidecar ----

struct Sidecar {
    server: Option<Server>,
    node: SshNode,
    metrics: Arc<Metrics>,
    tcp: SocketAddr,
    socks5: SocketAddr,
    uds: PathBuf,
    _dir: tempfile::TempDir,
}

impl Sidecar {
    /// Keys, known_hosts, config; `Server::start`; returns once node-a is
    /// Ready.
    async fn start() -> Sidecar {
        let dir = tempfile::Builder::new()
            .prefix("nt-reset-")
            .tempdir()
            .expect("temp dir");
        let key = nodetunnel::keys::generate(dir.path(), "id_ed25519", "reset").expect("key");
        let identity = nodetunnel::keys::load_identity(&key.private_path, None).expect("identity");
        let node = SshNode::start(identity.public_key()).await;
        std::fs::write(
            dir.path().join("known_hosts"),
            format!("{}\n", node.known_hosts_line()),
        )
        .expect("known_hosts");
        let uds = dir.path().join("proxy.sock");
        let config = format!(
            r#"[ssh]
user = "reset"
identity = "id_ed25519"
known_hosts = "known_hosts"
connect_timeout = "5s"
keepalive_interval = "5s"
backoff_base = "50ms"
backoff_max = "500ms"
drain_timeout = "1s"

[routing]
# The destinations are on 127.0.0.1, the node's address.
allow_cidrs = ["127.0.0.0/8"]

[proxy]
uds = {uds:?}
tcp = "127.0.0.1:0"
socks5 = "127.0.0.1:0"
dial_timeout = "5s"

[admin]
listen = ""

[[nodes]]
name = "node-a"
addresses = ["127.0.0.1"]
ssh_port = {port}
"#,
            port = node.addr().port(),
        );
        let path = dir.path().join("nodetunnel.toml");
        std::fs::write(&path, config).expect("config");
        let server = Server::start(&path).await.expect("serve starts");
        let listeners = server.listeners().clone();
        let metrics = server.manager().metrics().clone();
        let tunnel = server.manager().tunnel("node-a").expect("node-a");
        bounded("node-a to be ready", async {
            loop {
                let changed = tunnel.changed().notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if tunnel.status().state == TunnelState::Ready {
                    return;
                }
                changed.await;
            }
        })
        .await;
        Sidecar {
            server: Some(server),
            node,
            metrics,
            tcp: listeners.proxy_tcp.expect("tcp listener"),
            socks5: listeners.socks5.expect("socks5 listener"),
            uds: listeners.proxy_uds.expect("uds listener"),
            _dir: dir,
        }
    }

    /// The value of one metric line (`name{labels}`), 0 if absent.
    fn metric(&self, series: &str) -> f64 {
        self.metrics
            .encode()
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    /// One client of each listener, each with its tunnel open to
    /// 127.0.0.1:`port`.
    async fn clients(&self, port: u16) -> Clients {
        let target = format!("127.0.0.1:{port}");
        let mut tcp = TcpStream::connect(self.tcp).await.expect("connect tcp");
        http_connect(&mut tcp, &target).await;
        let mut socks5 = TcpStream::connect(self.socks5)
            .await
            .expect("connect socks5");
        socks5_connect(&mut socks5, port).await;
        let mut uds = UnixStream::connect(&self.uds).await.expect("connect uds");
        http_connect(&mut uds, &target).await;
        Clients { tcp, socks5, uds }
    }
}

struct Clients {
    tcp: TcpStream,
    socks5: TcpStream,
    uds: UnixStream,
}

/// `CONNECT target`; panics unless the answer is exactly the 200 head.
async fn http_connect<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, target: &str) {
    stream
        .write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await
        .expect("write CONNECT");
    let want = b"HTTP/1.1 200 Connection Established\r\n\r\n";
    let mut head = vec![0u8; want.len()];
    bounded("the CONNECT answer", stream.read_exact(&mut head))
        .await
        .expect("read the CONNECT answer");
    assert_eq!(
        String::from_utf8_lossy(&head),
        String::from_utf8_lossy(want)
    );
}

/// SOCKS5 greeting and CONNECT to 127.0.0.1:`port`; panics unless both
/// succeed.
async fn socks5_connect(stream: &mut TcpStream, port: u16) {
    let mut request = vec![5, 1, 0, 5, 1, 0, 1, 127, 0, 0, 1];
    request.extend_from_slice(&port.to_be_bytes());
    stream.write_all(&request).await.expect("write SOCKS5");
    let mut answer = [0u8; 12];
    bounded("the SOCKS5 answers", stream.read_exact(&mut answer))
        .await
        .expect("read the SOCKS5 answers");
    assert_eq!(answer, [5, 0, 5, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
}

/// A client's download: bytes read so far, each checked against the
/// pattern as it arrives.
struct Download {
    what: &'static str,
    read: usize,
}

impl Download {
    fn new(what: &'static str) -> Download {
        Download { what, read: 0 }
    }

    /// Read until at least `total` bytes arrived.
    async fn read_at_least<S: AsyncRead + Unpin>(&mut self, stream: &mut S, total: usize) {
        let mut buf = vec![0u8; 64 * 1024];
        while self.read < total {
            let n = bounded(self.what, stream.read(&mut buf))
                .await
                .unwrap_or_else(|e| panic!("{}: read failed early: {e}", self.what));
            assert!(n > 0, "{}: EOF after {} bytes", self.what, self.read);
            self.check(&buf[..n]);
        }
    }

    /// Read until the stream ends; how it ended (`Ok`: EOF).
    async fn read_to_end<S: AsyncRead + Unpin>(&mut self, stream: &mut S) -> io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match bounded(self.what, stream.read(&mut buf)).await {
                Ok(0) => return Ok(()),
                Ok(n) => self.check(&buf[..n]),
                Err(error) => return Err(error),
            }
        }
    }

    fn check(&mut self, bytes: &[u8]) {
        for (i, &b) in bytes.iter().enumerate() {
            let at = self.read + i;
            assert_eq!(
                b as usize,
                at % PERIOD,
                "{}: wrong byte at offset {at}",
                self.what
            );
        }
        self.read += bytes.len();
    }
}

/// `end` is `ECONNRESET`, not EOF nor another error.
fn assert_reset(what: &str, end: &io::Result<()>) {
    match end {
        Err(error) => assert_eq!(
            error.kind(),
            io::ErrorKind::ConnectionReset,
            "{what}: the stream ended with {error}, not a reset"
        ),
        Ok(()) => panic!("{what}: clean EOF: a truncated stream looks complete"),
    }
}

/// The handler's events for the abortive closes of one listener.
fn abortive_closes(log: &Log, listener: &str) -> Vec<Value> {
    let mut events = log.with_message("client connection reset");
    events.extend(log.with_message("client connection closed without a reset (Unix socket)"));
    events.retain(|v| v["span"]["listener"] == listener);
    events
}

#[tokio::test]
async fn a_lost_session_resets_tcp_and_socks5_clients_mid_stream() {
    let (log, _capture) = Log::capture();
    let mut sidecar = Sidecar::start().await;
    let endless = source_server(None).await;
    let mut c = sidecar.clients(endless).await;
    let mut downloads = [
        Download::new("HTTP CONNECT over TCP"),
        Download::new("SOCKS5"),
        Download::new("HTTP CONNECT over the Unix socket"),
    ];
    downloads[0].read_at_least(&mut c.tcp, BEFORE_FAULT).await;
    downloads[1]
        .read_at_least(&mut c.socks5, BEFORE_FAULT)
        .await;
    downloads[2].read_at_least(&mut c.uds, BEFORE_FAULT).await;

    // kill -9 of sshd: every connection of the node cut at once.
    sidecar.node.kill().await;

    let [tcp, socks5, uds] = &mut downloads;
    let (tcp_end, socks5_end, uds_end) = tokio::join!(
        tcp.read_to_end(&mut c.tcp),
        socks5.read_to_end(&mut c.socks5),
        uds.read_to_end(&mut c.uds),
    );
    assert_reset(tcp.what, &tcp_end);
    assert_reset(socks5.what, &socks5_end);
    // The Unix socket has no reset: EOF after correct bytes (the client had
    // nothing unsent, so nothing was left unread for an ECONNRESET).
    assert!(uds_end.is_ok(), "{}: {uds_end:?}", uds.what);

    // Counted by why, and logged by the handler with the why.
    assert_eq!(
        sidecar.metric(r#"nodetunnel_stream_resets_total{reason="session_lost"}"#),
        3.0
    );
    for (listener, message) in [
        ("tcp", "client connection reset"),
        ("socks5", "client connection reset"),
        (
            "uds",
            "client connection closed without a reset (Unix socket)",
        ),
    ] {
        let events = abortive_closes(&log, listener);
        assert_eq!(events.len(), 1, "{listener}: {events:?}");
        let event = &events[0];
        assert_eq!(event["message"], message, "{event}");
        assert_eq!(event["cause"], "tunnel_cut", "{event}");
        assert_eq!(event["level"], "INFO", "{event}");
        let reason = event["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("the SSH session to node node-a was lost"),
            "{listener}: reason {reason:?}"
        );
    }
}

#[tokio::test]
async fn streams_that_end_normally_close_with_a_clean_eof_byte_exact() {
    let (log, _capture) = Log::capture();
    let sidecar = Sidecar::start().await;
    let finite = source_server(Some(FINITE)).await;
    // Two ways a client ends: half-close first, then read to EOF (as
    // curl does with a request body), or read to EOF and then close.
    for half_close_first in [true, false] {
        let mut c = sidecar.clients(finite).await;
        if half_close_first {
            c.tcp.shutdown().await.expect("half-close tcp");
            c.socks5.shutdown().await.expect("half-close socks5");
            c.uds.shutdown().await.expect("half-close uds");
        }
        let mut tcp = Download::new("HTTP CONNECT over TCP");
        let mut socks5 = Download::new("SOCKS5");
        let mut uds = Download::new("HTTP CONNECT over the Unix socket");
        let (tcp_end, socks5_end, uds_end) = tokio::join!(
            tcp.read_to_end(&mut c.tcp),
            socks5.read_to_end(&mut c.socks5),
            uds.read_to_end(&mut c.uds),
        );
        for (d, end) in [(&tcp, tcp_end), (&socks5, socks5_end), (&uds, uds_end)] {
            assert!(end.is_ok(), "{}: {end:?}", d.what);
            assert_eq!(d.read, FINITE, "{}: byte count", d.what);
        }
    }
    // The front door saw six clean ends (polled: it notices the client's
    // close after the client saw EOF), and reset nothing.
    bounded("six `tunnel closed` events", async {
        while log.with_message("tunnel closed").len() < 6 {
            tokio::time::sleep(POLL).await;
        }
    })
    .await;
    for listener in ["tcp", "socks5", "uds"] {
        let events = abortive_closes(&log, listener);
        assert!(events.is_empty(), "{listener}: {events:?}");
    }
    for reason in ["session_lost", "window_exceeded", "drain_deadline"] {
        let series = format!(r#"nodetunnel_stream_resets_total{{reason="{reason}"}}"#);
        assert_eq!(sidecar.metric(&series), 0.0, "{series}");
    }
}

#[tokio::test]
async fn streams_still_open_at_the_drain_deadline_are_reset() {
    let (log, _capture) = Log::capture();
    let mut sidecar = Sidecar::start().await;
    let endless = source_server(None).await;
    let mut c = sidecar.clients(endless).await;
    let mut tcp = Download::new("HTTP CONNECT over TCP");
    let mut socks5 = Download::new("SOCKS5");
    let mut uds = Download::new("HTTP CONNECT over the Unix socket");
    tcp.read_at_least(&mut c.tcp, BEFORE_FAULT).await;
    socks5.read_at_least(&mut c.socks5, BEFORE_FAULT).await;
    uds.read_at_least(&mut c.uds, BEFORE_FAULT).await;

    // SIGTERM's path: stop taking work, drain (1 s), abort what is left.
    // The downloads never end by themselves, so the deadline cuts all
    // three while their clients keep reading.
    let server = sidecar.server.take().expect("server");
    let (_, tcp_end, socks5_end, uds_end) = tokio::join!(
        bounded("the server to stop", server.stop()),
        tcp.read_to_end(&mut c.tcp),
        socks5.read_to_end(&mut c.socks5),
        uds.read_to_end(&mut c.uds),
    );
    assert_reset(tcp.what, &tcp_end);
    assert_reset(socks5.what, &socks5_end);
    assert!(uds_end.is_ok(), "{}: {uds_end:?}", uds.what);

    assert_eq!(
        sidecar.metric(r#"nodetunnel_stream_resets_total{reason="drain_deadline"}"#),
        3.0
    );
    for listener in ["tcp", "socks5", "uds"] {
        let events = abortive_closes(&log, listener);
        assert_eq!(events.len(), 1, "{listener}: {events:?}");
        assert_eq!(events[0]["cause"], "aborted", "{}", events[0]);
    }
}
