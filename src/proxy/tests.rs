//! End-to-end tests of the front door against an in-memory dialer: real
//! sockets on the client side, `tokio::io::duplex` echo streams as tunnels.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::net::{TcpStream, UnixStream};
use tokio::task::JoinHandle;

use super::http_connect::one_line;
use super::*;
use crate::dial::{ChannelRefusal, Destination, DialError, Dialer, LimitKind, NodeDownCause};
use crate::router::{DenyReason, RouteError};

/// Bound on every wait in these tests: a hang fails instead of blocking.
const GUARD: Duration = Duration::from_secs(20);

async fn guard<F: Future>(what: &str, future: F) -> F::Output {
    match tokio::time::timeout(GUARD, future).await {
        Ok(out) => out,
        Err(_) => panic!("timed out: {what}"),
    }
}

/// Dials succeed with an echo stream, except for scripted host names.
#[derive(Default)]
struct FakeDialer {
    dialed: Mutex<Vec<Destination>>,
    /// The cut switch of every stream dialled so far.
    cuts: Mutex<Vec<tokio::sync::watch::Sender<Option<String>>>>,
}

fn scripted_error(host: &str) -> Option<DialError> {
    let node = "node-a".to_string();
    let dest = |host: &str| Destination::new(host.parse().expect("test host"), 443);
    Some(match host {
        "denied.test" => DialError::Route(RouteError::Denied {
            dest: dest("10.0.0.1"),
            reason: DenyReason::DenyCidr("10.0.0.0/8".parse().expect("test CIDR")),
        }),
        "noroute.test" => DialError::Route(RouteError::NoRoute {
            dest: dest("noroute.test"),
        }),
        "down.test" => DialError::NodeDown {
            node: node.as_str().into(),
            cause: NodeDownCause::NoTunnel,
        },
        "limit.test" => DialError::Limit {
            node: node.as_str().into(),
            kind: LimitKind::StreamsPerNode { max: 1 },
        },
        "refused.test" => DialError::Refused {
            node,
            // The node's own words may carry anything, line breaks included.
            reason: ChannelRefusal(russh::ChannelOpenFailure::Other {
                code: 2,
                reason: "connect failed\r\nInjected: header".into(),
            }),
        },
        "closed.test" => DialError::Refused {
            node,
            reason: ChannelRefusal(russh::ChannelOpenFailure::ConnectFailed),
        },
        "timeout.test" => DialError::Timeout {
            node,
            after: Duration::from_secs(10),
        },
        "session.test" => DialError::Session {
            node,
            reason: "EOF".into(),
        },
        "shutdown.test" => DialError::ShuttingDown,
        _ => return None,
    })
}

const SCRIPTED_HOSTS: [&str; 9] = [
    "denied.test",
    "noroute.test",
    "down.test",
    "limit.test",
    "refused.test",
    "closed.test",
    "timeout.test",
    "session.test",
    "shutdown.test",
];

/// A stream whose far end echoes everything and then closes after EOF.
fn echo_stream() -> DuplexStream {
    let (near, far) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move {
        let (mut rd, mut wr) = tokio::io::split(far);
        let _ = tokio::io::copy(&mut rd, &mut wr).await;
        let _ = wr.shutdown().await;
    });
    near
}

/// What the far end of a `held.test` stream sends before it stalls.
const HELD_PREFIX: &[u8] = b"bytes before the cut";

/// Room in a `held.test` stream for bytes towards its far end, which never
/// reads them.
const HELD_CAPACITY: usize = 1024;

/// A stream whose far end sends [`HELD_PREFIX`] and then neither reads nor
/// closes: it ends only when the test cuts it (or the drain aborts it).
fn held_stream() -> DuplexStream {
    let (near, mut far) = tokio::io::duplex(HELD_CAPACITY);
    tokio::spawn(async move {
        let _ = far.write_all(HELD_PREFIX).await;
        std::future::pending::<()>().await;
        drop(far);
    });
    near
}

/// A dialled fake tunnel: a duplex stream and the switch that cuts it, as
/// a lost session cuts a real one ([`TunnelIo::cut`]).
struct FakeStream {
    io: DuplexStream,
    cut: tokio::sync::watch::Receiver<Option<String>>,
}

impl crate::dial::TunnelIo for FakeStream {
    fn reset_label(&self) -> Option<&'static str> {
        // The tests cut streams as a lost session does.
        self.cut.borrow().as_ref().map(|_| "session_lost")
    }

    fn cut(&self) -> std::pin::Pin<Box<dyn Future<Output = String> + Send + 'static>> {
        let mut cut = self.cut.clone();
        Box::pin(async move {
            let reason = match cut.wait_for(Option::is_some).await {
                Ok(reason) => reason.clone(),
                Err(_) => None,
            };
            match reason {
                Some(reason) => reason,
                None => std::future::pending().await,
            }
        })
    }
}

impl AsyncRead for FakeStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for FakeStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl Dialer for FakeDialer {
    type Stream = FakeStream;

    fn dial(
        &self,
        dest: &Destination,
    ) -> impl Future<Output = Result<Self::Stream, DialError>> + Send {
        self.dialed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(dest.clone());
        let (cut_tx, cut) = tokio::sync::watch::channel(None);
        self.cuts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(cut_tx);
        let dest = dest.clone();
        async move {
            let host = dest.host.to_string();
            if host == "hang.test" {
                std::future::pending::<()>().await;
            }
            if let Some(error) = scripted_error(&host) {
                return Err(error);
            }
            let io = match host.as_str() {
                "held.test" => held_stream(),
                _ => echo_stream(),
            };
            Ok(FakeStream { io, cut })
        }
    }
}

impl FakeDialer {
    fn dialed(&self) -> Vec<Destination> {
        self.dialed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Cut every stream dialled so far, as a lost session does.
    fn cut_all(&self, reason: &str) {
        for cut in self.cuts.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            cut.send_replace(Some(reason.to_string()));
        }
    }
}

struct Harness {
    task: JoinHandle<()>,
    shutdown: Shutdown,
    uds: PathBuf,
    tcp: Option<SocketAddr>,
    socks5: Option<SocketAddr>,
    metrics: Arc<Metrics>,
    dialer: Arc<FakeDialer>,
    _dir: tempfile::TempDir,
}

/// A front door with a Unix socket and SOCKS5 on loopback, after `adjust`.
async fn start(adjust: impl FnOnce(&mut ProxyConfig)) -> Harness {
    start_with_audit(adjust, AuditSink::off()).await
}

/// [`start`], sending audit records to `audit`.
async fn start_with_audit(adjust: impl FnOnce(&mut ProxyConfig), audit: AuditSink) -> Harness {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = ProxyConfig {
        uds: Some(dir.path().join("proxy.sock")),
        socks5: Some("127.0.0.1:0".parse().expect("addr")),
        ..ProxyConfig::default()
    };
    adjust(&mut config);
    let metrics = Arc::new(Metrics::new());
    let door = FrontDoor::bind(&config, metrics.clone())
        .await
        .expect("bind")
        .with_audit(audit);
    let uds = door.uds_path().map(PathBuf::from).unwrap_or_default();
    let (tcp, socks5) = (door.tcp_addr(), door.socks5_addr());
    let shutdown = Shutdown::new();
    let dialer = Arc::new(FakeDialer::default());
    let task =
        tokio::spawn(door.serve(dialer.clone(), shutdown.clone(), Duration::from_millis(200)));
    Harness {
        task,
        shutdown,
        uds,
        tcp,
        socks5,
        metrics,
        dialer,
        _dir: dir,
    }
}

impl Harness {
    async fn uds(&self) -> UnixStream {
        UnixStream::connect(&self.uds).await.expect("connect uds")
    }

    async fn socks(&self) -> TcpStream {
        TcpStream::connect(self.socks5.expect("socks5 listener"))
            .await
            .expect("connect socks5")
    }

    async fn stop(self) {
        self.shutdown.trigger();
        guard("serve to return", self.task)
            .await
            .expect("serve task");
        assert!(!self.uds.exists(), "socket file removed on shutdown");
    }

    fn metric(&self, line: &str) -> bool {
        self.metrics.encode().lines().any(|l| l == line)
    }
}

/// Read a response head byte by byte, so nothing after it is consumed.
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match guard("response head", stream.read(&mut byte)).await {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Everything until EOF (or a reset, which ends it too).
async fn read_rest<S: AsyncRead + Unpin>(stream: &mut S) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match guard("read to EOF", stream.read(&mut buf)).await {
            Ok(0) | Err(_) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Send one request and split the whole answer into head and body.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    request: &str,
) -> (String, String) {
    stream
        .write_all(request.as_bytes())
        .await
        .expect("write request");
    let all = String::from_utf8_lossy(&read_rest(stream).await).into_owned();
    match all.split_once("\r\n\r\n") {
        Some((head, body)) => (head.to_string(), body.to_string()),
        None => (all, String::new()),
    }
}

fn connect_request(target: &str) -> String {
    format!("CONNECT {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
}

/// After a 200: echo works with half-close, and nothing but the echo
/// arrives (so no bytes were buffered after the head).
async fn assert_echo<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) {
    stream
        .write_all(b"ping through the tunnel")
        .await
        .expect("write");
    stream.shutdown().await.expect("half-close");
    assert_eq!(read_rest(stream).await, b"ping through the tunnel");
}

#[tokio::test]
async fn apiserver_connect_over_uds_gets_exactly_200_then_the_tunnel() {
    let h = start(|_| {}).await;
    let mut client = h.uds().await;
    client
        .write_all(b"CONNECT 10.0.0.1:10250 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .expect("write");
    let head = read_head(&mut client).await;
    // No Date (disabled), no Content-Length or Transfer-Encoding (hyper
    // omits them for a 2xx answer to CONNECT): the reference proxy's bytes.
    assert_eq!(head, "HTTP/1.1 200 Connection Established\r\n\r\n");
    assert_echo(&mut client).await;
    assert_eq!(
        h.dialer.dialed(),
        vec![Destination {
            host: "10.0.0.1".parse().expect("test host"),
            port: 10250
        }]
    );
    assert!(h.metric(r#"nodetunnel_proxy_requests_total{listener="uds",code="200"} 1"#));
    h.stop().await;
}

#[tokio::test]
async fn bytes_sent_right_after_the_request_reach_the_tunnel() {
    let h = start(|_| {}).await;
    let mut client = h.uds().await;
    let mut request = connect_request("[2001:db8::1]:443").into_bytes();
    request.extend_from_slice(b"early");
    client.write_all(&request).await.expect("write");
    let head = read_head(&mut client).await;
    assert!(
        head.starts_with("HTTP/1.1 200 Connection Established\r\n"),
        "{head:?}"
    );
    client.shutdown().await.expect("half-close");
    assert_eq!(read_rest(&mut client).await, b"early");
    assert_eq!(h.dialer.dialed()[0].host.to_string(), "2001:db8::1");
    h.stop().await;
}

#[tokio::test]
async fn every_dial_error_maps_to_its_status_and_a_one_line_body() {
    let h = start(|_| {}).await;
    for host in SCRIPTED_HOSTS {
        let error = scripted_error(host).expect("scripted");
        let mut client = h.uds().await;
        let (head, body) = exchange(&mut client, &connect_request(&format!("{host}:80"))).await;
        let status = error.http_status();
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status} ")),
            "{host}: {head:?}"
        );
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/plain"),
            "{head:?}"
        );
        assert_eq!(body, one_line(&error.to_string()), "{host}");
        assert_eq!(body.matches('\n').count(), 1, "{host}: {body:?}");
    }
    assert!(h.metric(r#"nodetunnel_proxy_requests_total{listener="uds",code="403"} 2"#));
    assert!(h.metric(r#"nodetunnel_proxy_requests_total{listener="uds",code="503"} 3"#));
    h.stop().await;
}

#[tokio::test]
async fn each_refusal_is_counted_once_where_it_is_answered() {
    let h = start(|_| {}).await;
    let mut denials = std::collections::BTreeMap::<String, u64>::new();
    let mut opens = std::collections::BTreeMap::<String, u64>::new();
    let mut faults = 0;
    for host in SCRIPTED_HOSTS {
        let error = scripted_error(host).expect("scripted");
        match &error {
            DialError::Route(e) => {
                let label = e.deny_reason().map_or(e.label(), DenyReason::label);
                *denials.entry(label.to_owned()).or_default() += 1;
            }
            other => *opens.entry(other.reason().to_owned()).or_default() += 1,
        }
        faults += u64::from(error.is_tunnel_fault());
        let mut client = h.uds().await;
        exchange(&mut client, &connect_request(&format!("{host}:80"))).await;
    }
    let mut client = h.uds().await;
    client
        .write_all(connect_request("ok.test:80").as_bytes())
        .await
        .expect("write");
    let head = read_head(&mut client).await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head:?}");
    assert_echo(&mut client).await;
    *opens.entry("ok".to_owned()).or_default() += 1;
    for (reason, n) in &denials {
        let line = format!(r#"nodetunnel_policy_denials_total{{reason="{reason}"}} {n}"#);
        assert!(h.metric(&line), "{line}\n{}", h.metrics.encode());
    }
    for (result, n) in &opens {
        let line = format!(r#"nodetunnel_stream_opens_total{{result="{result}"}} {n}"#);
        assert!(h.metric(&line), "{line}\n{}", h.metrics.encode());
    }
    // Series not counted stay at 0 (every known label value is exported).
    let exported = |family: &str| {
        h.metrics
            .encode()
            .lines()
            .filter(|l| l.starts_with(family) && !l.ends_with(" 0"))
            .count()
    };
    assert_eq!(exported("nodetunnel_policy_denials_total{"), denials.len());
    assert_eq!(exported("nodetunnel_stream_opens_total{"), opens.len());
    // A refused channel is the destination's failure, not the tunnels'.
    assert!(!scripted_error("closed.test")
        .expect("scripted")
        .is_tunnel_fault());
    assert_eq!(h.metrics.errors_last_minute(), faults);
    h.stop().await;
}

#[tokio::test]
async fn a_dial_that_never_resolves_gets_504() {
    let h = start(|c| c.dial_timeout = Duration::from_millis(50)).await;
    let mut client = h.uds().await;
    let (head, body) = exchange(&mut client, &connect_request("hang.test:80")).await;
    assert!(head.starts_with("HTTP/1.1 504 "), "{head:?}");
    assert!(body.contains("timed out"), "{body:?}");
    h.stop().await;
}

#[tokio::test]
async fn other_methods_get_405_with_allow() {
    let h = start(|_| {}).await;
    let mut client = h.uds().await;
    let (head, _) = exchange(&mut client, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 405 "), "{head:?}");
    assert!(
        head.to_ascii_lowercase().contains("allow: connect"),
        "{head:?}"
    );
    assert!(h.dialer.dialed().is_empty());
    h.stop().await;
}

#[tokio::test]
async fn malformed_targets_get_400_without_a_dial() {
    let h = start(|_| {}).await;
    for target in [
        "example.com",
        "example.com:0",
        "example.com:99999",
        ":80",
        "[::1]",
        "::1:80",
        "/path",
        "http://example.com:80/",
        "127.1:80",
        "user@host:80",
    ] {
        let mut client = h.uds().await;
        let (head, _) = exchange(&mut client, &connect_request(target)).await;
        assert!(head.starts_with("HTTP/1.1 400 "), "{target}: {head:?}");
    }
    assert!(h.dialer.dialed().is_empty());
    h.stop().await;
}

#[tokio::test]
async fn oversized_headers_get_431_or_a_close() {
    let h = start(|_| {}).await;
    let mut client = h.uds().await;
    let request = format!(
        "CONNECT a.test:1 HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(10 * 1024)
    );
    // The server may close before reading it all: ignore write errors.
    let _ = client.write_all(request.as_bytes()).await;
    let answer = String::from_utf8_lossy(&read_rest(&mut client).await).into_owned();
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431 "),
        "{answer:?}"
    );
    assert!(h.dialer.dialed().is_empty());
    h.stop().await;
}

// tokio's test-util (time pausing) is not enabled: a short real timeout.
#[tokio::test]
async fn a_slow_request_head_is_closed() {
    let h = start(|c| c.header_read_timeout = Duration::from_millis(200)).await;
    let mut client = h.uds().await;
    client
        .write_all(b"CONNECT a.test:1 HTTP/1.1\r\nHost: 127")
        .await
        .expect("write");
    let answer = read_rest(&mut client).await;
    assert!(!answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
    assert!(h.dialer.dialed().is_empty());
    h.stop().await;
}

#[tokio::test]
async fn over_max_connections_http_gets_503_at_once() {
    let h = start(|c| c.max_connections = 1).await;
    let mut first = h.uds().await;
    first
        .write_all(connect_request("a.test:80").as_bytes())
        .await
        .expect("write");
    assert!(read_head(&mut first).await.starts_with("HTTP/1.1 200 "));
    let mut second = h.uds().await;
    let (head, body) = exchange(&mut second, &connect_request("a.test:80")).await;
    assert!(head.starts_with("HTTP/1.1 503 "), "{head:?}");
    assert_eq!(body, "too many connections\n");
    // The same limit covers SOCKS5: negotiation, then general failure.
    let mut socks = h.socks().await;
    let reply = socks_exchange(&mut socks, &socks_domain_request("a.test", 80)).await;
    assert_eq!(reply[1], socks5::reply::GENERAL_FAILURE);
    // The admitted connection is unaffected.
    assert_echo(&mut first).await;
    assert_eq!(h.dialer.dialed().len(), 1);
    h.stop().await;
}

#[tokio::test]
async fn shutdown_aborts_tunnels_after_the_drain_and_removes_the_socket() {
    let h = start(|_| {}).await;
    let mut client = h.uds().await;
    client
        .write_all(connect_request("a.test:80").as_bytes())
        .await
        .expect("write");
    assert!(read_head(&mut client).await.starts_with("HTTP/1.1 200 "));
    // The tunnel stays idle and open; stop() must still return.
    h.stop().await;
    assert_eq!(read_rest(&mut client).await, b"");
}

// ---- SOCKS5 ----

fn socks_domain_request(host: &str, port: u16) -> Vec<u8> {
    let mut request = vec![5, 1, 0, 3, host.len() as u8];
    request.extend_from_slice(host.as_bytes());
    request.extend_from_slice(&port.to_be_bytes());
    request
}

fn socks_ip_request(ip: IpAddr, port: u16) -> Vec<u8> {
    let mut request = vec![5, 1, 0];
    match ip {
        IpAddr::V4(v4) => {
            request.push(1);
            request.extend_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            request.push(4);
            request.extend_from_slice(&v6.octets());
        }
    }
    request.extend_from_slice(&port.to_be_bytes());
    request
}

/// Greeting with no-auth, then `request`; returns the 10-byte reply.
async fn socks_exchange(stream: &mut TcpStream, request: &[u8]) -> [u8; 10] {
    stream.write_all(&[5, 1, 0]).await.expect("greeting");
    let mut method = [0u8; 2];
    guard("method reply", stream.read_exact(&mut method))
        .await
        .expect("method reply");
    assert_eq!(method, [5, 0]);
    stream.write_all(request).await.expect("request");
    let mut reply = [0u8; 10];
    guard("reply", stream.read_exact(&mut reply))
        .await
        .expect("reply");
    reply
}

#[tokio::test]
async fn socks5_connects_to_ipv4_ipv6_and_names() {
    let h = start(|_| {}).await;
    let cases = [
        (
            socks_ip_request("10.1.2.3".parse().expect("ip"), 10250),
            "10.1.2.3",
        ),
        (
            socks_ip_request("fd00::7".parse().expect("ip"), 10250),
            "fd00::7",
        ),
        (
            socks_domain_request("Node-1.Cluster.Local", 10250),
            "node-1.cluster.local",
        ),
    ];
    for (request, host) in cases {
        let mut client = h.socks().await;
        let reply = socks_exchange(&mut client, &request).await;
        assert_eq!(reply, [5, 0, 0, 1, 0, 0, 0, 0, 0, 0], "{host}");
        assert_echo(&mut client).await;
        let last = h.dialer.dialed().pop().expect("dialed");
        assert_eq!((last.host.to_string().as_str(), last.port), (host, 10250));
    }
    assert!(h.metric(r#"nodetunnel_proxy_requests_total{listener="socks5",code="socks5_0x00"} 3"#));
    h.stop().await;
}

#[tokio::test]
async fn socks5_pipelined_greeting_request_and_data() {
    let h = start(|_| {}).await;
    let mut client = h.socks().await;
    let mut all = vec![5, 1, 0];
    all.extend_from_slice(&socks_domain_request("a.test", 80));
    all.extend_from_slice(b"early");
    client.write_all(&all).await.expect("write");
    let mut answer = [0u8; 12];
    guard("answers", client.read_exact(&mut answer))
        .await
        .expect("answers");
    assert_eq!(answer, [5, 0, 5, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    client.shutdown().await.expect("half-close");
    assert_eq!(read_rest(&mut client).await, b"early");
    h.stop().await;
}

#[tokio::test]
async fn socks5_reply_code_for_every_dial_error() {
    let h = start(|_| {}).await;
    for host in SCRIPTED_HOSTS {
        let error = scripted_error(host).expect("scripted");
        let mut client = h.socks().await;
        let reply = socks_exchange(&mut client, &socks_domain_request(host, 80)).await;
        assert_eq!(reply[..2], [5, error.socks5_reply()], "{host}");
        assert_eq!(
            read_rest(&mut client).await,
            b"",
            "{host}: closed after the reply"
        );
    }
    assert!(h.metric(r#"nodetunnel_proxy_requests_total{listener="socks5",code="socks5_0x02"} 2"#));
    h.stop().await;
}

#[tokio::test]
async fn socks5_protocol_errors() {
    let h = start(|_| {}).await;

    // Wrong version: closed without a reply.
    let mut client = h.socks().await;
    client
        .write_all(&[4, 1, 0, 0, 80, 10, 0, 0, 1, 0])
        .await
        .expect("write");
    assert_eq!(read_rest(&mut client).await, b"");

    // No acceptable method: 05 FF, then closed.
    let mut client = h.socks().await;
    client.write_all(&[5, 1, 2]).await.expect("write");
    assert_eq!(read_rest(&mut client).await, [5, 0xFF]);

    // BIND and UDP ASSOCIATE: 0x07.
    for command in [2u8, 3] {
        let mut client = h.socks().await;
        let reply = socks_exchange(&mut client, &[5, command, 0, 1, 10, 0, 0, 1, 0, 80]).await;
        assert_eq!(reply[1], socks5::reply::COMMAND_NOT_SUPPORTED);
    }

    // Unknown address type: 0x08.
    let mut client = h.socks().await;
    let reply = socks_exchange(&mut client, &[5, 1, 0, 9, 10, 0, 0, 1, 0, 80]).await;
    assert_eq!(reply[1], socks5::reply::ADDRESS_TYPE_NOT_SUPPORTED);

    // Wrong version in the request: closed without a reply.
    let mut client = h.socks().await;
    client.write_all(&[5, 1, 0]).await.expect("greeting");
    let mut method = [0u8; 2];
    guard("method", client.read_exact(&mut method))
        .await
        .expect("method");
    client
        .write_all(&[4, 1, 0, 1, 10, 0, 0, 1, 0, 80])
        .await
        .expect("write");
    assert_eq!(read_rest(&mut client).await, b"");

    // Destination port 0: 0x02, as CONNECT refuses it with 400.
    for request in [
        socks_domain_request("example.com", 0),
        socks_ip_request("10.0.0.1".parse().expect("IP"), 0),
    ] {
        let mut client = h.socks().await;
        let reply = socks_exchange(&mut client, &request).await;
        assert_eq!(reply[1], socks5::reply::NOT_ALLOWED);
    }

    assert!(h.dialer.dialed().is_empty());
    h.stop().await;
}

#[tokio::test]
async fn a_connect_with_a_body_gets_400_without_a_dial() {
    let h = start(|_| {}).await;
    for extra in [
        "Content-Length: 5\r\n",
        "Content-Length: 0\r\n",
        "Transfer-Encoding: chunked\r\n",
    ] {
        let mut client = h.uds().await;
        let request =
            format!("CONNECT 10.0.0.1:10250 HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\nhello");
        let (head, body) = exchange(&mut client, &request).await;
        assert!(head.starts_with("HTTP/1.1 400 "), "{extra}: {head:?}");
        assert!(
            body.contains("a CONNECT request has no body"),
            "{extra}: {body:?}"
        );
    }
    assert!(h.dialer.dialed().is_empty());
    assert!(h.metric(r#"nodetunnel_proxy_requests_total{listener="uds",code="400"} 3"#));
    h.stop().await;
}

#[tokio::test]
async fn socks5_silent_client_is_closed() {
    let h = start(|c| c.header_read_timeout = Duration::from_millis(200)).await;
    let mut client = h.socks().await;
    client.write_all(&[5, 1]).await.expect("write");
    assert_eq!(read_rest(&mut client).await, b"");
    h.stop().await;
}

// ---- mTLS ----

struct Pki {
    ca: rcgen::Certificate,
    client: (rcgen::Certificate, rcgen::KeyPair),
    stranger: (rcgen::Certificate, rcgen::KeyPair),
}

fn ca(name: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.distinguished_name.push(DnType::CommonName, name);
    (params.self_signed(&key).expect("self-signed"), key)
}

fn leaf(
    name: &str,
    usage: rcgen::ExtendedKeyUsagePurpose,
    issuer: &(rcgen::Certificate, rcgen::KeyPair),
) -> (rcgen::Certificate, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).expect("params");
    params.extended_key_usages = vec![usage];
    let cert = params
        .signed_by(&key, &issuer.0, &issuer.1)
        .expect("signed");
    (cert, key)
}

/// Write server and CA files into `dir`; return the TLS config and the
/// client-side material.
fn write_pki(dir: &std::path::Path) -> (TlsConfig, Pki) {
    use rcgen::ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
    let server_ca = ca("server CA");
    let client_ca = ca("client CA");
    let other_ca = ca("other CA");
    let server = leaf("localhost", ServerAuth, &server_ca);
    let client = leaf("apiserver", ClientAuth, &client_ca);
    let stranger = leaf("apiserver", ClientAuth, &other_ca);
    let tls = TlsConfig {
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
        client_ca: dir.join("clients-ca.crt"),
    };
    std::fs::write(&tls.cert, server.0.pem()).expect("write cert");
    std::fs::write(&tls.key, server.1.serialize_pem()).expect("write key");
    // A private key others can read is refused (crate::keys::check_secret_file).
    std::fs::set_permissions(
        &tls.key,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("chmod key");
    std::fs::write(&tls.client_ca, client_ca.0.pem()).expect("write ca");
    let pki = Pki {
        ca: server_ca.0,
        client,
        stranger,
    };
    (tls, pki)
}

type TlsClient = tokio_rustls::client::TlsStream<TcpStream>;

async fn tls_connect(
    addr: SocketAddr,
    pki: &Pki,
    identity: Option<&(rcgen::Certificate, rcgen::KeyPair)>,
) -> std::io::Result<TlsClient> {
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.der().clone()).expect("root");
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .expect("client cert"),
        None => builder.with_no_client_auth(),
    };
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").expect("name");
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

/// Without a valid client certificate, either the handshake fails or (TLS
/// 1.3, where the client finishes first) the first read does; never a 200.
async fn assert_refused(connected: std::io::Result<TlsClient>) {
    let Ok(mut stream) = connected else { return };
    let _ = stream
        .write_all(connect_request("a.test:80").as_bytes())
        .await;
    let answer = read_rest(&mut stream).await;
    assert!(answer.is_empty(), "{:?}", String::from_utf8_lossy(&answer));
}

#[tokio::test]
async fn mtls_requires_a_client_certificate_from_the_client_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (tls, pki) = write_pki(dir.path());
    let h = start(|c| {
        c.tcp = Some("127.0.0.1:0".parse().expect("addr"));
        c.tls = Some(tls);
    })
    .await;
    let addr = h.tcp.expect("tcp listener");

    let mut good = guard("handshake", tls_connect(addr, &pki, Some(&pki.client)))
        .await
        .expect("handshake with a client cert");
    good.write_all(connect_request("a.test:80").as_bytes())
        .await
        .expect("write");
    let head = read_head(&mut good).await;
    assert!(
        head.starts_with("HTTP/1.1 200 Connection Established\r\n"),
        "{head:?}"
    );
    assert_echo(&mut good).await;

    assert_refused(guard("handshake", tls_connect(addr, &pki, None)).await).await;
    assert_refused(guard("handshake", tls_connect(addr, &pki, Some(&pki.stranger))).await).await;
    assert_eq!(h.dialer.dialed().len(), 1);
    h.stop().await;
}

#[tokio::test]
async fn tls_errors_name_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (tls, _) = write_pki(dir.path());
    let config = |tls: TlsConfig| ProxyConfig {
        tcp: Some("127.0.0.1:0".parse().expect("addr")),
        tls: Some(tls),
        ..ProxyConfig::default()
    };
    let metrics = Arc::new(Metrics::new());

    let missing = TlsConfig {
        key: dir.path().join("missing.key"),
        ..tls.clone()
    };
    match FrontDoor::bind(&config(missing.clone()), metrics.clone()).await {
        Err(FrontDoorError::Tls { file, .. }) => assert_eq!(file, missing.key),
        other => panic!("want a TLS error, got {other:?}"),
    }

    let garbage = dir.path().join("garbage.crt");
    std::fs::write(&garbage, "not a certificate").expect("write");
    let bad_ca = TlsConfig {
        client_ca: garbage.clone(),
        ..tls
    };
    match FrontDoor::bind(&config(bad_ca), metrics).await {
        Err(error @ FrontDoorError::Tls { .. }) => {
            assert!(error.to_string().contains("garbage.crt"), "{error}")
        }
        other => panic!("want a TLS error, got {other:?}"),
    }
}

// ---- Unix socket ----

#[tokio::test]
async fn unix_socket_mode_parent_directory_and_stale_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("run/nodetunnel/proxy.sock");
    let config = ProxyConfig {
        uds: Some(path.clone()),
        ..ProxyConfig::default()
    };
    let metrics = Arc::new(Metrics::new());

    // Missing parent created (0750 minus umask: never open to others).
    let door = FrontDoor::bind(&config, metrics.clone())
        .await
        .expect("bind");
    let parent_mode = std::fs::metadata(path.parent().expect("parent"))
        .expect("parent")
        .permissions()
        .mode();
    assert_eq!(parent_mode & 0o027, 0, "{parent_mode:o}");
    let mode = std::fs::metadata(&path)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660, "{mode:o}");

    // A live socket is not taken over.
    match FrontDoor::bind(&config, metrics.clone()).await {
        Err(FrontDoorError::SocketPath { path: p, .. }) => assert_eq!(p, path),
        other => panic!("want SocketPath, got {other:?}"),
    }

    // Dropping the front door removes its socket file.
    drop(door);
    assert!(!path.exists());

    // A stale socket file (its listener gone) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).expect("stale"));
    assert!(path.exists());
    let door = FrontDoor::bind(&config, metrics.clone())
        .await
        .expect("replace stale");
    UnixStream::connect(&path)
        .await
        .expect("connect to the new socket");
    drop(door);

    // A regular file is never removed.
    std::fs::write(&path, "precious").expect("write");
    match FrontDoor::bind(&config, metrics).await {
        Err(error @ FrontDoorError::SocketPath { .. }) => {
            assert!(error.to_string().contains("proxy.sock"), "{error}")
        }
        other => panic!("want SocketPath, got {other:?}"),
    }
    assert_eq!(
        std::fs::read_to_string(&path).expect("still there"),
        "precious"
    );
}

#[tokio::test]
async fn bind_errors_name_the_listener_and_address() {
    let taken = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = taken.local_addr().expect("addr");
    let config = ProxyConfig {
        socks5: Some(addr),
        ..ProxyConfig::default()
    };
    match FrontDoor::bind(&config, Arc::new(Metrics::new())).await {
        Err(error @ FrontDoorError::Bind { .. }) => {
            let text = error.to_string();
            assert!(
                text.contains("socks5") && text.contains(&addr.to_string()),
                "{text}"
            );
        }
        other => panic!("want a bind error, got {other:?}"),
    }
}

// ---- configuration ----

#[test]
fn validate_accepts_sane_configs() {
    let uds = ProxyConfig {
        uds: Some("/run/nodetunnel/proxy.sock".into()),
        ..ProxyConfig::default()
    };
    assert_eq!(uds.validate(), Ok(()));
    let loopback = ProxyConfig {
        tcp: Some("127.0.0.1:8131".parse().expect("addr")),
        socks5: Some("[::1]:1080".parse().expect("addr")),
        ..ProxyConfig::default()
    };
    assert_eq!(loopback.validate(), Ok(()));
    let mapped = ProxyConfig {
        socks5: Some("[::ffff:127.0.0.1]:1080".parse().expect("addr")),
        ..ProxyConfig::default()
    };
    assert_eq!(mapped.validate(), Ok(()));
    let mtls = ProxyConfig {
        tcp: Some("0.0.0.0:8131".parse().expect("addr")),
        tls: Some(TlsConfig {
            cert: "s.crt".into(),
            key: "s.key".into(),
            client_ca: "ca.crt".into(),
        }),
        ..ProxyConfig::default()
    };
    assert_eq!(mtls.validate(), Ok(()));
    let allowed = ProxyConfig {
        tcp: Some("10.0.0.5:8131".parse().expect("addr")),
        socks5: Some("10.0.0.5:1080".parse().expect("addr")),
        allow_non_loopback: true,
        ..ProxyConfig::default()
    };
    assert_eq!(allowed.validate(), Ok(()));
    let grpc_only = ProxyConfig {
        grpc_uds: Some("/run/nodetunnel/konnectivity-server.socket".into()),
        ..ProxyConfig::default()
    };
    assert_eq!(grpc_only.validate(), Ok(()));
}

#[test]
fn validate_refuses_unsafe_or_empty_configs() {
    let tls = TlsConfig {
        cert: "s.crt".into(),
        key: "s.key".into(),
        client_ca: "ca.crt".into(),
    };
    let uds = Some(PathBuf::from("/run/p.sock"));
    let cases: Vec<(ProxyConfig, &str)> = vec![
        (ProxyConfig::default(), "proxy"),
        (
            ProxyConfig {
                uds: uds.clone(),
                grpc_uds: uds.clone(),
                ..ProxyConfig::default()
            },
            "proxy.grpc_uds",
        ),
        (
            ProxyConfig {
                grpc_uds: Some(PathBuf::new()),
                ..ProxyConfig::default()
            },
            "proxy.grpc_uds",
        ),
        (
            ProxyConfig {
                grpc_uds: Some(PathBuf::from("/".repeat(108))),
                ..ProxyConfig::default()
            },
            "proxy.grpc_uds",
        ),
        (
            ProxyConfig {
                tcp: Some("0.0.0.0:8131".parse().expect("addr")),
                ..ProxyConfig::default()
            },
            "proxy.tcp",
        ),
        (
            ProxyConfig {
                tcp: Some("[::]:8131".parse().expect("addr")),
                ..ProxyConfig::default()
            },
            "proxy.tcp",
        ),
        (
            ProxyConfig {
                tcp: Some("127.0.0.1:8131".parse().expect("addr")),
                tls: Some(tls.clone()),
                socks5: Some("10.0.0.1:1080".parse().expect("addr")),
                ..ProxyConfig::default()
            },
            "proxy.socks5",
        ),
        (
            ProxyConfig {
                uds: uds.clone(),
                tls: Some(tls.clone()),
                ..ProxyConfig::default()
            },
            "proxy.tls",
        ),
        (
            ProxyConfig {
                tcp: Some("127.0.0.1:8131".parse().expect("addr")),
                tls: Some(TlsConfig {
                    key: PathBuf::new(),
                    ..tls
                }),
                ..ProxyConfig::default()
            },
            "proxy.tls.key",
        ),
        (
            ProxyConfig {
                uds: uds.clone(),
                max_connections: 0,
                ..ProxyConfig::default()
            },
            "proxy.max_connections",
        ),
        (
            ProxyConfig {
                uds: uds.clone(),
                dial_timeout: Duration::ZERO,
                ..ProxyConfig::default()
            },
            "proxy.dial_timeout",
        ),
        (
            ProxyConfig {
                uds: uds.clone(),
                header_read_timeout: Duration::ZERO,
                ..ProxyConfig::default()
            },
            "proxy.header_read_timeout",
        ),
        (
            ProxyConfig {
                uds: Some(PathBuf::from(format!("/{}", "x".repeat(120)))),
                ..ProxyConfig::default()
            },
            "proxy.uds",
        ),
        (
            ProxyConfig {
                tcp: Some("127.0.0.1:8131".parse().expect("addr")),
                socks5: Some("127.0.0.1:8131".parse().expect("addr")),
                ..ProxyConfig::default()
            },
            "proxy.socks5",
        ),
    ];
    for (config, key) in cases {
        match config.validate() {
            Err(crate::field_error::FieldError { key: got, reason }) => {
                assert_eq!(got, key, "{reason}");
                assert!(!reason.is_empty());
            }
            Ok(()) => panic!("{key}: accepted {config:?}"),
        }
    }
}

#[tokio::test]
async fn bind_refuses_an_invalid_config() {
    match FrontDoor::bind(&ProxyConfig::default(), Arc::new(Metrics::new())).await {
        Err(FrontDoorError::Config { key, .. }) => assert_eq!(key, "proxy"),
        other => panic!("want a config error, got {other:?}"),
    }
}

#[test]
fn config_from_toml_with_defaults_and_durations() {
    #[derive(serde::Deserialize)]
    struct File {
        proxy: ProxyConfig,
    }
    let file: File = toml::from_str(
        r#"
        [proxy]
        uds = "/run/nodetunnel/proxy.sock"
        tcp = "127.0.0.1:8131"
        header_read_timeout = "2s 500ms"
        [proxy.tls]
        cert = "server.crt"
        key = "server.key"
        client_ca = "clients-ca.crt"
        "#,
    )
    .expect("parse");
    let proxy = file.proxy;
    assert_eq!(proxy.header_read_timeout, Duration::from_millis(2500));
    assert_eq!(proxy.dial_timeout, Duration::from_secs(10));
    assert_eq!(proxy.max_connections, 10_000);
    assert!(!proxy.allow_non_loopback);
    assert_eq!(
        proxy.tls.map(|t| t.client_ca),
        Some(PathBuf::from("clients-ca.crt"))
    );
    assert!(toml::from_str::<File>("[proxy]\nudp = \"x\"\n").is_err());
    assert!(toml::from_str::<File>("[proxy.tls]\ncert = \"a\"\n").is_err());
}

// ---- Cut tunnels: an abort, never a clean end ----

/// Read until the stream ends: the bytes, and how it ended (`Ok`: EOF).
async fn read_until_end<S: AsyncRead + Unpin>(stream: &mut S) -> (Vec<u8>, std::io::Result<()>) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match guard("read to the end", stream.read(&mut buf)).await {
            Ok(0) => return (out, Ok(())),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(error) => return (out, Err(error)),
        }
    }
}

/// `end` is a reset (`ECONNRESET`), not EOF or another error.
fn assert_reset(what: &str, end: std::io::Result<()>) {
    match end {
        Err(error) => assert_eq!(
            error.kind(),
            std::io::ErrorKind::ConnectionReset,
            "{what}: {error}"
        ),
        Ok(()) => panic!("{what}: clean EOF where a reset was due"),
    }
}

/// CONNECT `target` over `stream`; panics unless the answer is 200.
async fn http_tunnel<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, target: &str) {
    stream
        .write_all(connect_request(target).as_bytes())
        .await
        .expect("write CONNECT");
    let head = read_head(stream).await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{target}: {head:?}");
}

/// One tunnel to `host`:80 through each listener: HTTP CONNECT over TCP,
/// SOCKS5, HTTP CONNECT over the Unix socket.
async fn tunnels_on_every_listener(h: &Harness, host: &str) -> (TcpStream, TcpStream, UnixStream) {
    let target = format!("{host}:80");
    let mut tcp = TcpStream::connect(h.tcp.expect("tcp listener"))
        .await
        .expect("connect tcp");
    http_tunnel(&mut tcp, &target).await;
    let mut socks = h.socks().await;
    let reply = socks_exchange(&mut socks, &socks_domain_request(host, 80)).await;
    assert_eq!(reply[1], socks5::reply::SUCCEEDED);
    let mut uds = h.uds().await;
    http_tunnel(&mut uds, &target).await;
    (tcp, socks, uds)
}

/// The far end's bytes that were sent before the cut arrive first.
async fn read_held_prefix<S: AsyncRead + Unpin>(stream: &mut S) {
    let mut prefix = vec![0u8; HELD_PREFIX.len()];
    guard("the bytes before the cut", stream.read_exact(&mut prefix))
        .await
        .expect("read the bytes before the cut");
    assert_eq!(prefix, HELD_PREFIX);
}

#[tokio::test]
async fn a_cut_tunnel_resets_tcp_and_socks5_clients_and_a_unix_socket_client_reads_eof() {
    let h = start(|c| c.tcp = Some("127.0.0.1:0".parse().expect("addr"))).await;
    let (mut tcp, mut socks, mut uds) = tunnels_on_every_listener(&h, "held.test").await;
    read_held_prefix(&mut tcp).await;
    read_held_prefix(&mut socks).await;
    read_held_prefix(&mut uds).await;

    h.dialer
        .cut_all("stream reset: the SSH session to node node-a was lost");
    let (rest, end) = read_until_end(&mut tcp).await;
    assert_eq!(rest, b"");
    assert_reset("HTTP CONNECT over TCP", end);
    let (rest, end) = read_until_end(&mut socks).await;
    assert_eq!(rest, b"");
    assert_reset("SOCKS5", end);
    // A Unix socket has no reset: with nothing of the client's left unread,
    // the client reads EOF.
    let (rest, end) = read_until_end(&mut uds).await;
    assert_eq!(rest, b"");
    assert!(end.is_ok(), "Unix socket: {end:?}");
    h.stop().await;
}

#[tokio::test]
async fn a_cut_tunnel_resets_an_mtls_client_and_a_clean_end_stays_a_clean_close() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (tls, pki) = write_pki(dir.path());
    let h = start(|c| {
        c.tcp = Some("127.0.0.1:0".parse().expect("addr"));
        c.tls = Some(tls);
    })
    .await;
    let addr = h.tcp.expect("tcp listener");
    let connect = || guard("handshake", tls_connect(addr, &pki, Some(&pki.client)));

    let mut clean = connect().await.expect("handshake");
    http_tunnel(&mut clean, "a.test:80").await;
    clean.write_all(b"echoed whole").await.expect("write");
    clean.shutdown().await.expect("close_notify and half-close");
    let (echoed, end) = read_until_end(&mut clean).await;
    assert_eq!(echoed, b"echoed whole");
    assert!(end.is_ok(), "clean end over mTLS: {end:?}");

    let mut cut = connect().await.expect("handshake");
    http_tunnel(&mut cut, "held.test:80").await;
    read_held_prefix(&mut cut).await;
    h.dialer.cut_all("stream reset: test");
    let (rest, end) = read_until_end(&mut cut).await;
    assert_eq!(rest, b"");
    assert_reset("HTTP CONNECT over mTLS", end);
    h.stop().await;
}

#[tokio::test]
async fn a_unix_socket_client_whose_bytes_were_left_unread_gets_econnreset_at_the_cut() {
    let h = start(|_| {}).await;
    let mut uds = h.uds().await;
    http_tunnel(&mut uds, "held.test:80").await;
    // The far end reads nothing: the front door takes at most one splice
    // buffer and what the stream holds; the rest stays in the socket's
    // receive queue.
    let upload = vec![0x5a; crate::splice::SPLICE_BUFFER + HELD_CAPACITY + 4096];
    guard("the upload to be queued", uds.write_all(&upload))
        .await
        .expect("write");
    read_held_prefix(&mut uds).await;
    h.dialer.cut_all("stream reset: test");
    let (rest, end) = read_until_end(&mut uds).await;
    assert_eq!(rest, b"");
    assert_reset("Unix socket with unread client bytes", end);
    h.stop().await;
}

#[tokio::test]
async fn tunnels_aborted_at_the_drain_deadline_reset_tcp_and_socks5_clients() {
    let h = start(|c| c.tcp = Some("127.0.0.1:0".parse().expect("addr"))).await;
    let (mut tcp, mut socks, mut uds) = tunnels_on_every_listener(&h, "held.test").await;
    for stream in [&mut tcp, &mut socks] {
        read_held_prefix(stream).await;
    }
    read_held_prefix(&mut uds).await;
    let metrics = h.metrics.clone();
    // The held tunnels never end: the drain deadline aborts them.
    h.stop().await;
    let (rest, end) = read_until_end(&mut tcp).await;
    assert_eq!(rest, b"");
    assert_reset("HTTP CONNECT over TCP", end);
    let (rest, end) = read_until_end(&mut socks).await;
    assert_eq!(rest, b"");
    assert_reset("SOCKS5", end);
    let (rest, end) = read_until_end(&mut uds).await;
    assert_eq!(rest, b"");
    assert!(end.is_ok(), "Unix socket: {end:?}");
    assert!(metrics
        .encode()
        .lines()
        .any(|l| l == r#"nodetunnel_stream_resets_total{reason="drain_deadline"} 3"#));
}

#[tokio::test]
async fn a_tunnel_that_ends_cleanly_closes_with_eof_on_every_listener() {
    let h = start(|c| c.tcp = Some("127.0.0.1:0".parse().expect("addr"))).await;
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let (mut tcp, mut socks, mut uds) = tunnels_on_every_listener(&h, "a.test").await;

    async fn echo_whole<S: AsyncRead + AsyncWrite + Unpin>(what: &str, s: &mut S, payload: &[u8]) {
        let (mut rd, mut wr) = tokio::io::split(s);
        let send = async {
            wr.write_all(payload).await.expect("write");
            wr.shutdown().await.expect("half-close");
        };
        let ((), (echoed, end)) = tokio::join!(send, read_until_end(&mut rd));
        assert!(echoed == payload, "{what}: {} bytes back", echoed.len());
        assert!(end.is_ok(), "{what}: {end:?}");
    }
    echo_whole("HTTP CONNECT over TCP", &mut tcp, &payload).await;
    echo_whole("SOCKS5", &mut socks, &payload).await;
    echo_whole("Unix socket", &mut uds, &payload).await;
    h.stop().await;
}

#[tokio::test]
async fn a_refused_connect_is_logged_with_its_connection_span_in_json() {
    let (log, _capture) = crate::logging::capture::JsonLog::capture();
    let h = start(|_| {}).await;
    let mut client = h.uds().await;
    let (head, _) = exchange(&mut client, &connect_request("noroute.test:80")).await;
    assert!(head.starts_with("HTTP/1.1 "), "{head:?}");
    let mut client = h.uds().await;
    exchange(&mut client, &connect_request("down.test:80")).await;
    let mut socks = h.socks().await;
    let peer = socks.local_addr().expect("local addr").to_string();
    socks_exchange(&mut socks, &socks_domain_request("denied.test", 443)).await;
    h.stop().await;

    let refused = log.with_message("CONNECT refused");
    assert_eq!(refused.len(), 2, "{refused:?}");
    let span = &refused[0]["span"];
    assert_eq!(span["name"], "connection", "{span}");
    assert_eq!(span["listener"], "uds", "{span}");
    assert!(span["peer"].is_string(), "{span}");
    assert_eq!(span["dest"], "noroute.test:80", "{span}");
    // The event itself no longer repeats the connection's fields.
    assert!(refused[0].get("listener").is_none(), "{}", refused[0]);
    assert!(refused[0].get("dest").is_none(), "{}", refused[0]);
    // A refusal that names a node records it into the span.
    assert_eq!(refused[1]["span"]["dest"], "down.test:80", "{}", refused[1]);
    assert_eq!(refused[1]["span"]["node"], "node-a", "{}", refused[1]);

    let refused = log.with_message("SOCKS5 CONNECT refused");
    assert_eq!(refused.len(), 1, "{refused:?}");
    let span = &refused[0]["span"];
    assert_eq!(span["listener"], "socks5", "{span}");
    assert_eq!(span["peer"], peer.as_str(), "{span}");
    assert_eq!(span["dest"], "denied.test:443", "{span}");
}

// ---- Audit records ----

/// A front door with every TCP listener whose audit records queue for the
/// test, `queue` at most (nothing writes them: the test reads the queue).
async fn start_audited(queue: usize) -> (Harness, crate::audit::AuditQueue) {
    let metrics = Arc::new(Metrics::new());
    let (sink, records) = crate::audit::channel(queue, metrics);
    let h = start_with_audit(|c| c.tcp = Some("127.0.0.1:0".parse().expect("addr")), sink).await;
    (h, records)
}

async fn next_record(records: &mut crate::audit::AuditQueue) -> serde_json::Value {
    let record = guard("an audit record", records.recv())
        .await
        .expect("a record");
    serde_json::from_str(&record.to_line()).expect("JSON line")
}

#[tokio::test]
async fn audit_records_a_tunnel_with_exact_bytes_on_every_listener() {
    let (h, mut records) = start_audited(16).await;
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    async fn echo_whole<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, payload: &[u8]) {
        let (mut rd, mut wr) = tokio::io::split(s);
        let send = async {
            wr.write_all(payload).await.expect("write");
            wr.shutdown().await.expect("half-close");
        };
        let ((), (echoed, end)) = tokio::join!(send, read_until_end(&mut rd));
        assert_eq!(echoed.len(), payload.len());
        assert!(end.is_ok(), "{end:?}");
    }

    // The Unix socket, with bytes sent right after the request (early
    // data) counted too.
    let mut uds = h.uds().await;
    let mut request = connect_request("a.test:80").into_bytes();
    request.extend_from_slice(b"early");
    uds.write_all(&request).await.expect("write");
    let head = read_head(&mut uds).await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    let mut early = [0u8; 5];
    uds.read_exact(&mut early).await.expect("early echoed");
    echo_whole(&mut uds, &payload).await;
    let record = next_record(&mut records).await;
    assert_eq!(record["event"], "connection");
    assert_eq!(record["listener"], "uds");
    assert_eq!(record["destination"], "a.test:80");
    assert_eq!(record["result"], "ok");
    assert_eq!(record["end"], "client_close");
    let bytes = payload.len() as u64 + 5;
    assert_eq!(record["bytes_to_node"], bytes);
    assert_eq!(record["bytes_from_node"], bytes);
    assert_eq!(record["client"]["uid"], nix::unistd::getuid().as_raw());
    assert_eq!(record["client"]["gid"], nix::unistd::getgid().as_raw());
    assert_eq!(record["client"]["pid"], std::process::id());
    assert!(
        record["time"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{record}"
    );

    // HTTP CONNECT over TCP and SOCKS5: the peer address.
    let (mut tcp, mut socks, uds) = tunnels_on_every_listener(&h, "b.test").await;
    drop(uds); // closed unused: a record with no bytes
    echo_whole(&mut tcp, &payload).await;
    echo_whole(&mut socks, &payload).await;
    let mut by_listener = std::collections::BTreeMap::new();
    for _ in 0..3 {
        let record = next_record(&mut records).await;
        let listener = record["listener"].as_str().expect("listener").to_string();
        by_listener.insert(listener, record);
    }
    assert_eq!(by_listener["uds"]["bytes_to_node"], 0);
    assert_eq!(by_listener["uds"]["end"], "client_close");
    for (listener, stream) in [("tcp", &tcp), ("socks5", &socks)] {
        let record = &by_listener[listener];
        assert_eq!(record["destination"], "b.test:80");
        assert_eq!(record["bytes_to_node"], payload.len() as u64);
        assert_eq!(record["bytes_from_node"], payload.len() as u64);
        let local = stream.local_addr().expect("local address").to_string();
        assert_eq!(record["client"]["address"], local.as_str());
    }
    h.stop().await;
}

#[tokio::test]
async fn audit_records_a_policy_refusal_with_its_reason() {
    let (h, mut records) = start_audited(16).await;
    let mut client = h.uds().await;
    let (head, _) = exchange(&mut client, &connect_request("denied.test:443")).await;
    assert!(head.starts_with("HTTP/1.1 403 "), "{head}");
    let record = next_record(&mut records).await;
    assert_eq!(record["event"], "refusal");
    assert_eq!(record["listener"], "uds");
    assert_eq!(record["destination"], "denied.test:443");
    assert_eq!(record["result"], "denied");
    assert_eq!(record["deny_reason"], "deny_cidr");
    assert!(record.get("end").is_none(), "{record}");

    let mut socks = h.socks().await;
    let reply = socks_exchange(&mut socks, &socks_domain_request("down.test", 80)).await;
    assert_eq!(reply[1], 0x03);
    let record = next_record(&mut records).await;
    assert_eq!(record["listener"], "socks5");
    assert_eq!(record["result"], "node_down");
    assert_eq!(record["node"], "node-a");
    h.stop().await;
}

#[tokio::test]
async fn audit_records_a_cut_tunnel_as_session_lost_with_the_bytes_that_moved() {
    let (h, mut records) = start_audited(16).await;
    let mut uds = h.uds().await;
    http_tunnel(&mut uds, "held.test:80").await;
    read_held_prefix(&mut uds).await;
    h.dialer
        .cut_all("stream reset: the SSH session to node node-a was lost");
    let (_, _) = read_until_end(&mut uds).await;
    let record = next_record(&mut records).await;
    assert_eq!(record["end"], "session_lost");
    assert_eq!(record["reset_reason"], "session_lost");
    assert_eq!(record["bytes_from_node"], HELD_PREFIX.len() as u64);
    assert_eq!(record["bytes_to_node"], 0);
    h.stop().await;
}

#[tokio::test]
async fn audit_records_tunnels_aborted_at_the_drain_deadline() {
    let (h, mut records) = start_audited(16).await;
    let (mut tcp, mut socks, mut uds) = tunnels_on_every_listener(&h, "held.test").await;
    read_held_prefix(&mut tcp).await;
    read_held_prefix(&mut socks).await;
    read_held_prefix(&mut uds).await;
    h.stop().await;
    let mut listeners = Vec::new();
    for _ in 0..3 {
        let record = next_record(&mut records).await;
        assert_eq!(record["end"], "drain_deadline", "{record}");
        assert_eq!(record["bytes_from_node"], HELD_PREFIX.len() as u64);
        listeners.push(record["listener"].as_str().expect("listener").to_string());
    }
    listeners.sort();
    assert_eq!(listeners, ["socks5", "tcp", "uds"]);
}

#[tokio::test]
async fn a_full_audit_queue_drops_and_counts_instead_of_slowing_streams() {
    let metrics = Arc::new(Metrics::new());
    // One record of room, and no writer: the queue stays full.
    let (sink, mut records) = crate::audit::channel(1, metrics.clone());
    let h = start_with_audit(|_| {}, sink).await;
    for _ in 0..3 {
        let mut uds = h.uds().await;
        http_tunnel(&mut uds, "a.test:80").await;
        // Every tunnel still works and ends while the queue is full.
        assert_echo(&mut uds).await;
    }
    h.stop().await;
    assert_eq!(metrics.audit_records_dropped.get(), 2);
    assert!(records.try_recv().is_some(), "the first record was queued");
    assert!(records.try_recv().is_none());
}

#[tokio::test]
async fn audit_names_the_mtls_client_certificate_subject() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (tls, pki) = write_pki(dir.path());
    let metrics = Arc::new(Metrics::new());
    let (sink, mut records) = crate::audit::channel(4, metrics);
    let h = start_with_audit(
        |c| {
            c.tcp = Some("127.0.0.1:0".parse().expect("addr"));
            c.tls = Some(tls);
        },
        sink,
    )
    .await;
    let addr = h.tcp.expect("tcp listener");
    let mut client = guard("handshake", tls_connect(addr, &pki, Some(&pki.client)))
        .await
        .expect("handshake");
    let (head, _) = exchange(&mut client, &connect_request("denied.test:443")).await;
    assert!(head.starts_with("HTTP/1.1 403 "), "{head}");
    let record = next_record(&mut records).await;
    assert_eq!(record["listener"], "tcp");
    // rcgen's default subject.
    assert_eq!(
        record["client"]["certificate_subject"],
        "CN=rcgen self signed cert"
    );
    assert!(record["client"]["address"].is_string());
    h.stop().await;
}
