//! Test servers: Echo, Sink, Source, Http and a Kubelet stand-in (HTTPS).
//! Each runs on its own thread with its own current-thread runtime, in a
//! network namespace ([`spawn_server`] with `Some(ns)`, or
//! [`super::testbed::spawn_in_ns`]) or in the current one ([`spawn_local`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use super::READY_TIMEOUT;

/// What to run, where to bind (port 0 picks a free port: see
/// [`ServerHandle::addr`]), and the label (node name) used in responses.
#[derive(Clone, Debug)]
pub enum ServerKind {
    /// Echoes everything; after the client's EOF finishes echoing and shuts
    /// down its write side (half-close aware).
    Echo { bind: SocketAddr },
    /// Reads to EOF, then writes `"<byte count> <sha256 hex>\n"` and closes.
    Sink { bind: SocketAddr },
    /// Writes `len` bytes of [`PatternGen`]`(seed)` then shuts down writing.
    Source {
        bind: SocketAddr,
        len: u64,
        seed: u64,
    },
    /// Plain HTTP/1.1: `GET /` → `"pod <label>\n"`;
    /// `GET /stream?seconds=N` → chunked, one line every 100 ms for N s;
    /// `GET /bytes?n=N` → N bytes of `PatternGen(0)`.
    Http { bind: SocketAddr, label: String },
    /// HTTPS with a self-signed cert ([`ServerHandle::tls_cert_der`]):
    /// `GET /healthz` → `"ok"`; `GET /containerLogs/{ns}/{pod}/{container}`
    /// → text lines naming the node; `GET /stream?seconds=N` as Http.
    Kubelet { bind: SocketAddr, label: String },
}

impl ServerKind {
    pub fn echo(bind: SocketAddr) -> Self {
        ServerKind::Echo { bind }
    }
    pub fn sink(bind: SocketAddr) -> Self {
        ServerKind::Sink { bind }
    }
    pub fn source(bind: SocketAddr, len: u64, seed: u64) -> Self {
        ServerKind::Source { bind, len, seed }
    }
    pub fn http(bind: SocketAddr, label: &str) -> Self {
        ServerKind::Http {
            bind,
            label: label.to_owned(),
        }
    }
    pub fn kubelet(bind: SocketAddr, label: &str) -> Self {
        ServerKind::Kubelet {
            bind,
            label: label.to_owned(),
        }
    }

    pub fn bind(&self) -> SocketAddr {
        match self {
            ServerKind::Echo { bind }
            | ServerKind::Sink { bind }
            | ServerKind::Source { bind, .. }
            | ServerKind::Http { bind, .. }
            | ServerKind::Kubelet { bind, .. } => *bind,
        }
    }

    pub fn label(&self) -> &str {
        match self {
            ServerKind::Http { label, .. } | ServerKind::Kubelet { label, .. } => label,
            ServerKind::Echo { .. } => "echo",
            ServerKind::Sink { .. } => "sink",
            ServerKind::Source { .. } => "source",
        }
    }
}

/// A running server. Dropping it (or [`ServerHandle::stop`]) stops it: the
/// listener closes and open connections are dropped.
pub struct ServerHandle {
    addr: SocketAddr,
    kind: ServerKind,
    ns: Option<String>,
    cert_der: Option<CertificateDer<'static>>,
    cert_pem: Option<String>,
    accepted: Arc<AtomicU64>,
    stop_tx: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl ServerHandle {
    /// The bound address (with the real port when bound to port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
    pub fn kind(&self) -> &ServerKind {
        &self.kind
    }
    pub fn label(&self) -> &str {
        self.kind.label()
    }
    /// The namespace it runs in (None: the test process's own).
    pub fn ns(&self) -> Option<&str> {
        self.ns.as_deref()
    }
    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
    /// Kubelet only: its self-signed certificate (trust anchor for clients).
    pub fn tls_cert_der(&self) -> Option<&CertificateDer<'static>> {
        self.cert_der.as_ref()
    }
    pub fn tls_cert_pem(&self) -> Option<&str> {
        self.cert_pem.as_deref()
    }

    /// Stop and join; returns the server loop's error, if it failed.
    pub fn stop(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        if let Some(tx) = self.stop_tx.take() {
            let _ = tx.send(());
        }
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow!("{} server thread panicked", self.label()))?,
            None => Ok(()),
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            eprintln!("server {} on {}: {e:#}", self.kind.label(), self.addr);
        }
    }
}

/// Run a server in the test process's own network namespace (loopback).
pub fn spawn_local(kind: ServerKind) -> Result<ServerHandle> {
    spawn_server(None, kind)
}

/// Run a server on a dedicated thread inside network namespace `ns` (None:
/// the current one). Returns once the listener is bound.
pub fn spawn_server(ns: Option<&str>, kind: ServerKind) -> Result<ServerHandle> {
    let tls = match &kind {
        ServerKind::Kubelet { bind, label } => Some(self_signed(*bind, label)?),
        _ => None,
    };
    let (cert_der, cert_pem, tls_config) = match tls {
        Some((der, pem, cfg)) => (Some(der), Some(pem), Some(cfg)),
        None => (None, None, None),
    };
    let accepted = Arc::new(AtomicU64::new(0));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<SocketAddr>>();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let ns_owned = ns.map(str::to_owned);
    let kind2 = kind.clone();
    let accepted2 = accepted.clone();
    let thread = std::thread::Builder::new()
        .name(format!("srv-{}", kind.label()))
        .spawn(move || -> Result<()> {
            let setup = (|| -> Result<tokio::runtime::Runtime> {
                if let Some(ns) = &ns_owned {
                    super::netns::enter_netns(ns)?;
                }
                Ok(tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?)
            })();
            let rt = match setup {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(anyhow!("{e:#}")));
                    return Ok(());
                }
            };
            rt.block_on(async move {
                let bind = kind2.bind();
                let listener = match TcpListener::bind(bind).await {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow!(e).context(format!("binding {bind}"))));
                        return Ok(());
                    }
                };
                let _ = ready_tx.send(Ok(listener.local_addr()?));
                serve(kind2, listener, tls_config, accepted2, stop_rx).await
            })
        })
        .context("spawning server thread")?;
    let where_ = ns.map(|n| format!(" in namespace {n}")).unwrap_or_default();
    let addr = match ready_rx.recv_timeout(READY_TIMEOUT) {
        Ok(Ok(addr)) => addr,
        Ok(Err(e)) => {
            let _ = thread.join();
            return Err(e.context(format!("starting {} server{where_}", kind.label())));
        }
        Err(_) => bail!(
            "{} server{where_} did not start within {READY_TIMEOUT:?}",
            kind.label()
        ),
    };
    Ok(ServerHandle {
        addr,
        kind,
        ns: ns.map(str::to_owned),
        cert_der,
        cert_pem,
        accepted,
        stop_tx: Some(stop_tx),
        thread: Some(thread),
    })
}

async fn serve(
    kind: ServerKind,
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    accepted: Arc<AtomicU64>,
    mut stop: oneshot::Receiver<()>,
) -> Result<()> {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        let (stream, _peer) = tokio::select! {
            _ = &mut stop => return Ok(()),
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    eprintln!("{} server: accept: {e}", kind.label());
                    continue;
                }
            },
        };
        accepted.fetch_add(1, Ordering::SeqCst);
        let _ = stream.set_nodelay(true);
        let kind = kind.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let r = match kind {
                ServerKind::Echo { .. } => echo(stream).await,
                ServerKind::Sink { .. } => sink(stream).await,
                ServerKind::Source { len, seed, .. } => source(stream, len, seed).await,
                ServerKind::Http { label, .. } => serve_http(stream, label, false).await,
                ServerKind::Kubelet { label, .. } => match acceptor.unwrap().accept(stream).await {
                    Ok(tls) => serve_http(tls, label, true).await,
                    Err(e) => Err(anyhow!(e).context("TLS handshake")),
                },
            };
            // Peers vanishing mid-stream is normal in fault tests: stay quiet
            // about resets, report anything else.
            if let Err(e) = r {
                let reset = e.chain().any(|c| {
                    c.downcast_ref::<std::io::Error>().is_some_and(|io| {
                        matches!(
                            io.kind(),
                            std::io::ErrorKind::ConnectionReset
                                | std::io::ErrorKind::BrokenPipe
                                | std::io::ErrorKind::UnexpectedEof
                        )
                    })
                });
                if !reset {
                    eprintln!("test server connection error: {e:#}");
                }
            }
        });
    }
}

async fn echo(mut stream: TcpStream) -> Result<()> {
    let (mut r, mut w) = stream.split();
    tokio::io::copy(&mut r, &mut w).await?;
    w.shutdown().await?;
    Ok(())
}

async fn sink(mut stream: TcpStream) -> Result<()> {
    let mut hasher = Sha256::new();
    let mut count = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        count += n as u64;
    }
    let reply = format!("{count} {}\n", hex(&hasher.finalize()));
    stream.write_all(reply.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(())
}

async fn source(mut stream: TcpStream, len: u64, seed: u64) -> Result<()> {
    let mut gen = PatternGen::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        gen.fill(&mut buf[..n]);
        stream.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    stream.shutdown().await?;
    // Wait for the client to close, so that no unread input turns our close
    // into a reset that could cut off data still in flight.
    let mut sink = [0u8; 4096];
    while stream.read(&mut sink).await? > 0 {}
    Ok(())
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

fn text(status: StatusCode, body: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body)).boxed_unsync())
        .unwrap()
}

fn query_u64(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        if k == key {
            v.parse().ok()
        } else {
            None
        }
    })
}

/// A chunked body: one line every 100 ms for `seconds` seconds.
fn ticker(label: String, seconds: u64) -> Body {
    let lines = seconds * 10;
    let stream = futures::stream::unfold(0u64, move |i| {
        let label = label.clone();
        async move {
            if i >= lines {
                return None;
            }
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let line = format!("{label} tick {}\n", i + 1);
            Some((Ok::<_, Infallible>(Frame::data(Bytes::from(line))), i + 1))
        }
    });
    StreamBody::new(stream).boxed_unsync()
}

fn route(req: &Request<Incoming>, label: &str, kubelet: bool) -> Response<Body> {
    if req.method() != http::Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    let path = req.uri().path();
    if path == "/stream" {
        let seconds = query_u64(req, "seconds").unwrap_or(1);
        return Response::builder()
            .header("content-type", "text/plain; charset=utf-8")
            .body(ticker(label.to_owned(), seconds))
            .unwrap();
    }
    if kubelet {
        if path == "/healthz" {
            return text(StatusCode::OK, "ok".into());
        }
        if path == "/" {
            return text(StatusCode::OK, format!("kubelet {label}\n"));
        }
        if let Some(rest) = path.strip_prefix("/containerLogs/") {
            let parts: Vec<&str> = rest.split('/').collect();
            if parts.len() == 3 && parts.iter().all(|p| !p.is_empty()) {
                let (ns, pod, container) = (parts[0], parts[1], parts[2]);
                let mut body = String::new();
                for i in 1..=5 {
                    body.push_str(&format!(
                        "log line {i} of {ns}/{pod}/{container} on node {label}\n"
                    ));
                }
                return text(StatusCode::OK, body);
            }
        }
    } else {
        if path == "/" {
            return text(StatusCode::OK, format!("pod {label}\n"));
        }
        if path == "/bytes" {
            let n = query_u64(req, "n").unwrap_or(0).min(1 << 30);
            return Response::builder()
                .header("content-type", "application/octet-stream")
                .body(Full::new(Bytes::from(pattern_bytes(0, n as usize))).boxed_unsync())
                .unwrap();
        }
    }
    text(StatusCode::NOT_FOUND, format!("not found: {path}\n"))
}

async fn serve_http<S>(stream: S, label: String, kubelet: bool) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let resp = route(&req, &label, kubelet);
        async move { Ok::<_, Infallible>(resp) }
    });
    // half_close: a client (or a tunnel) may shut down its write side
    // right after the request and still expect the response.
    hyper::server::conn::http1::Builder::new()
        .half_close(true)
        .serve_connection(TokioIo::new(stream), svc)
        .await
        .context("serving HTTP/1.1")
}

/// A self-signed cert for the kubelet stand-in, valid for the bind IP,
/// 127.0.0.1, localhost and the label; and a rustls server config using it.
fn self_signed(
    bind: SocketAddr,
    label: &str,
) -> Result<(CertificateDer<'static>, String, Arc<rustls::ServerConfig>)> {
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    if !bind.ip().is_unspecified() {
        names.push(bind.ip().to_string());
    }
    names.push(label.to_owned());
    names.sort();
    names.dedup();
    let ck = rcgen::generate_simple_self_signed(names).context("generating kubelet cert")?;
    let der = CertificateDer::from(ck.cert.der().to_vec());
    let pem = ck.cert.pem();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.key_pair.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("rustls protocol versions")?
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .context("rustls server cert")?;
    Ok((der, pem, Arc::new(cfg)))
}

/// Deterministic pseudo-random bytes (splitmix64, little-endian words):
/// what [`ServerKind::Source`] sends, so tests can check what they got.
#[derive(Clone, Debug)]
pub struct PatternGen {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl PatternGen {
    pub fn new(seed: u64) -> Self {
        PatternGen {
            state: seed,
            word: [0; 8],
            used: 8,
        }
    }

    fn next_word(&mut self) -> [u8; 8] {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)).to_le_bytes()
    }

    /// Fill `out` with the next bytes of the pattern.
    pub fn fill(&mut self, out: &mut [u8]) {
        let mut i = 0;
        while i < out.len() && self.used < 8 {
            out[i] = self.word[self.used];
            self.used += 1;
            i += 1;
        }
        while out.len() - i >= 8 {
            out[i..i + 8].copy_from_slice(&self.next_word());
            i += 8;
        }
        while i < out.len() {
            if self.used == 8 {
                self.word = self.next_word();
                self.used = 0;
            }
            out[i] = self.word[self.used];
            self.used += 1;
            i += 1;
        }
    }
}

/// The first `len` bytes of the pattern for `seed`.
pub fn pattern_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    PatternGen::new(seed).fill(&mut v);
    v
}

/// SHA-256 (hex) of the first `len` bytes of the pattern, without holding them.
pub fn pattern_sha256_hex(seed: u64, len: u64) -> String {
    let mut gen = PatternGen::new(seed);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        gen.fill(&mut buf[..n]);
        h.update(&buf[..n]);
        left -= n as u64;
    }
    hex(&h.finalize())
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Parse a [`ServerKind::Sink`] reply: (byte count, sha256 hex).
pub fn parse_sink_reply(reply: &str) -> Result<(u64, String)> {
    let mut it = reply.split_whitespace();
    match (it.next(), it.next(), it.next()) {
        (Some(n), Some(h), None) if h.len() == 64 => Ok((
            n.parse()
                .with_context(|| format!("sink reply count {n:?}"))?,
            h.to_owned(),
        )),
        _ => bail!("malformed sink reply {reply:?}"),
    }
}
