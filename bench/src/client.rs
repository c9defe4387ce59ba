//! The client side: SOCKS5 (RFC 1928, no authentication, CONNECT, IPv4),
//! HTTP CONNECT (the bytes kube-apiserver's `HTTPConnect` egress writes),
//! over TCP or a Unix socket, and kube-apiserver's `GRPC` egress over a
//! Unix socket (konnectivity's single-use tunnel, [`crate::grpc`]); and the
//! three operations the benchmarks repeat: upload to the sink, download
//! from the source, one echo round trip.

use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use crate::args::Args;
use crate::grpc::GrpcConn;

/// Bytes per write and per read on bulk transfers.
pub const CHUNK: usize = 256 * 1024;

/// What kube-apiserver requires after its CONNECT, byte for byte.
const CONNECT_OK: &[u8] = b"HTTP/1.1 200 Connection Established\r\n\r\n";

/// How the load generator reaches a proxy.
#[derive(Clone, Debug)]
pub enum Proxy {
    /// SOCKS5 over TCP.
    Socks5(SocketAddr),
    /// HTTP CONNECT over TCP.
    HttpTcp(SocketAddr),
    /// HTTP CONNECT over a Unix socket (the apiserver's `transport.uds`).
    HttpUnix(PathBuf),
    /// konnectivity's gRPC `ProxyService` over a Unix socket (the
    /// apiserver's `proxyProtocol: GRPC`), one connection per tunnel.
    GrpcUnix(PathBuf),
}

impl Proxy {
    /// `socks5://127.0.0.1:1080`, `http://127.0.0.1:8001`, `http+unix:///path`,
    /// `grpc+unix:///path`.
    pub fn parse(s: &str) -> Result<Proxy, String> {
        if let Some(rest) = s.strip_prefix("socks5://") {
            return rest
                .parse()
                .map(Proxy::Socks5)
                .map_err(|e| format!("{s:?}: {e}"));
        }
        if let Some(rest) = s.strip_prefix("http+unix://") {
            return Ok(Proxy::HttpUnix(PathBuf::from(rest)));
        }
        if let Some(rest) = s.strip_prefix("grpc+unix://") {
            return Ok(Proxy::GrpcUnix(PathBuf::from(rest)));
        }
        if let Some(rest) = s.strip_prefix("http://") {
            return rest
                .parse()
                .map(Proxy::HttpTcp)
                .map_err(|e| format!("{s:?}: {e}"));
        }
        Err(format!(
            "{s:?}: expected socks5://IP:PORT, http://IP:PORT, http+unix:///PATH or grpc+unix:///PATH"
        ))
    }

    /// Whether a tunnel can be shut down for writing and still be read
    /// (TCP's half-close). The gRPC front door's cannot: its protocol has
    /// no half-close (`CLOSE_REQ` ends the connection both ways), so an
    /// upload through it goes to the counted sink ([`upload_counted`]).
    pub fn half_closes(&self) -> bool {
        !matches!(self, Proxy::GrpcUnix(_))
    }
}

/// A client connection: TCP, Unix, or a gRPC tunnel.
pub enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
    Grpc(Box<GrpcConn>),
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Grpc(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Grpc(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_flush(cx),
            Conn::Unix(s) => Pin::new(s).poll_flush(cx),
            Conn::Grpc(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Grpc(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

fn err(what: impl std::fmt::Display) -> io::Error {
    io::Error::other(what.to_string())
}

/// Open a tunnelled connection to `dst` through `proxy`: when this returns,
/// the proxy has confirmed the connection and the stream is a byte pipe.
pub async fn open(proxy: &Proxy, dst: SocketAddrV4) -> io::Result<Conn> {
    match proxy {
        Proxy::Socks5(addr) => {
            let s = TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            let mut c = Conn::Tcp(s);
            socks5_connect(&mut c, dst).await?;
            Ok(c)
        }
        Proxy::HttpTcp(addr) => {
            let s = TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            let mut c = Conn::Tcp(s);
            http_connect(&mut c, dst).await?;
            Ok(c)
        }
        Proxy::HttpUnix(path) => {
            let mut c = Conn::Unix(UnixStream::connect(path).await?);
            http_connect(&mut c, dst).await?;
            Ok(c)
        }
        Proxy::GrpcUnix(path) => Ok(Conn::Grpc(Box::new(
            GrpcConn::open(path, &dst.to_string()).await?,
        ))),
    }
}

async fn socks5_connect(c: &mut Conn, dst: SocketAddrV4) -> io::Result<()> {
    // Greeting: version 5, one method, "no authentication".
    c.write_all(&[5, 1, 0]).await?;
    let mut sel = [0u8; 2];
    c.read_exact(&mut sel).await?;
    if sel != [5, 0] {
        return Err(err(format!("SOCKS5 method selection {sel:?}")));
    }
    let mut req = [0u8; 10];
    req[..4].copy_from_slice(&[5, 1, 0, 1]);
    req[4..8].copy_from_slice(&dst.ip().octets());
    req[8..].copy_from_slice(&dst.port().to_be_bytes());
    c.write_all(&req).await?;
    let mut head = [0u8; 4];
    c.read_exact(&mut head).await?;
    if head[0] != 5 || head[1] != 0 {
        return Err(err(format!("SOCKS5 CONNECT {dst}: reply {}", head[1])));
    }
    let rest = match head[3] {
        1 => 4 + 2,
        4 => 16 + 2,
        3 => {
            let mut len = [0u8; 1];
            c.read_exact(&mut len).await?;
            len[0] as usize + 2
        }
        t => return Err(err(format!("SOCKS5 reply address type {t}"))),
    };
    let mut skip = [0u8; 258];
    c.read_exact(&mut skip[..rest]).await?;
    Ok(())
}

async fn http_connect(c: &mut Conn, dst: SocketAddrV4) -> io::Result<()> {
    // Exactly what kube-apiserver writes.
    let req = format!("CONNECT {dst} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    c.write_all(req.as_bytes()).await?;
    // Nothing comes after the head until we send: reading in chunks cannot
    // swallow tunnelled bytes.
    let mut head = Vec::with_capacity(64);
    let mut chunk = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = c.read(&mut chunk).await?;
        if n == 0 {
            return Err(err(format!(
                "HTTP CONNECT {dst}: closed after {:?}",
                String::from_utf8_lossy(&head)
            )));
        }
        head.extend_from_slice(&chunk[..n]);
        if head.len() > 8192 {
            return Err(err("HTTP CONNECT: response head over 8 KiB"));
        }
    }
    if head != CONNECT_OK {
        return Err(err(format!(
            "HTTP CONNECT {dst}: {:?}",
            String::from_utf8_lossy(&head)
        )));
    }
    Ok(())
}

/// 1 MiB of pseudo-random bytes (xorshift), so that no compression
/// anywhere could flatter a result.
pub fn pattern() -> Vec<u8> {
    let mut v = vec![0u8; 1 << 20];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for chunk in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    v
}

/// Write `n` bytes of `pattern` to `w`, in [`CHUNK`] writes.
pub async fn write_n<W: AsyncWrite + Unpin>(w: &mut W, pattern: &[u8], n: u64) -> io::Result<()> {
    let mut left = n;
    let mut off = 0usize;
    while left > 0 {
        let len = (CHUNK as u64).min(left).min((pattern.len() - off) as u64) as usize;
        w.write_all(&pattern[off..off + len]).await?;
        off = (off + len) % pattern.len();
        left -= len as u64;
    }
    Ok(())
}

/// Write `pattern` to `up` over and over, adding each write to `moved`,
/// until an error (an open-ended upload: the caller drops it to stop).
pub async fn pump_up(up: &mut Conn, pattern: &[u8], moved: &AtomicU64) -> io::Result<()> {
    let mut off = 0usize;
    loop {
        let len = CHUNK.min(pattern.len() - off);
        up.write_all(&pattern[off..off + len]).await?;
        off = (off + len) % pattern.len();
        moved.fetch_add(len as u64, Ordering::Relaxed);
    }
}

/// Ask the source for `ask` bytes and read them, adding each read to
/// `moved`; EOF is an error (the caller stops the download by dropping it,
/// long before `ask` bytes).
pub async fn pump_down(down: &mut Conn, ask: u64, moved: &AtomicU64) -> io::Result<()> {
    down.write_all(&ask.to_be_bytes()).await?;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = down.read(&mut buf).await?;
        if n == 0 {
            return Err(err("the source's stream ended early"));
        }
        moved.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Read to EOF; the byte count.
pub async fn read_to_eof<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        let n = r.read(buf).await?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}

/// Close as OpenSSH does: shut down writing, read to EOF, drop. (Dropping
/// with unread data or before the peer's EOF makes sshd's next small reply
/// wait for a delayed ACK: see REFERENCE section 5.)
pub async fn close(mut c: Conn) {
    let _ = c.shutdown().await;
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(5), read_to_eof(&mut c, &mut buf)).await;
}

/// Upload `n` bytes to the sink; the time from the first byte written to
/// the sink's count arriving (all bytes received by the sink).
pub async fn upload(
    proxy: &Proxy,
    sink: SocketAddrV4,
    pattern: &[u8],
    n: u64,
) -> io::Result<Duration> {
    let mut c = open(proxy, sink).await?;
    let t0 = Instant::now();
    write_n(&mut c, pattern, n).await?;
    c.shutdown().await?;
    let mut count = [0u8; 8];
    c.read_exact(&mut count).await?;
    let elapsed = t0.elapsed();
    let got = u64::from_be_bytes(count);
    if got != n {
        return Err(err(format!("sink counted {got} bytes, sent {n}")));
    }
    close(c).await;
    Ok(elapsed)
}

/// Upload `n` bytes to the counted sink (which reads a u64 big-endian N,
/// then N bytes, and answers the count without waiting for EOF): for a
/// proxy without half-close ([`Proxy::half_closes`]). The time from the
/// first byte written (the count) to the sink's count arriving.
pub async fn upload_counted(
    proxy: &Proxy,
    counted_sink: SocketAddrV4,
    pattern: &[u8],
    n: u64,
) -> io::Result<Duration> {
    let mut c = open(proxy, counted_sink).await?;
    let t0 = Instant::now();
    c.write_all(&n.to_be_bytes()).await?;
    write_n(&mut c, pattern, n).await?;
    c.flush().await?;
    let mut count = [0u8; 8];
    c.read_exact(&mut count).await?;
    let elapsed = t0.elapsed();
    let got = u64::from_be_bytes(count);
    if got != n {
        return Err(err(format!("counted sink counted {got} bytes, sent {n}")));
    }
    close(c).await;
    Ok(elapsed)
}

/// Ask the source for `n` bytes and read them; the time from the request
/// to EOF.
pub async fn download(proxy: &Proxy, source: SocketAddrV4, n: u64) -> io::Result<Duration> {
    let mut c = open(proxy, source).await?;
    let mut buf = vec![0u8; CHUNK];
    let t0 = Instant::now();
    c.write_all(&n.to_be_bytes()).await?;
    let got = read_to_eof(&mut c, &mut buf).await?;
    let elapsed = t0.elapsed();
    if got != n {
        return Err(err(format!("source sent {got} bytes, asked for {n}")));
    }
    let _ = c.shutdown().await;
    Ok(elapsed)
}

/// One open: connect, negotiate, send one byte, get it back. The time from
/// the connect to the echoed byte; the connection is then closed cleanly.
pub async fn echo_open(proxy: &Proxy, echo: SocketAddrV4) -> io::Result<Duration> {
    echo_open_timed(proxy, echo).await.map(|(_, d)| d)
}

/// [`echo_open`], also giving the time from the connect to the proxy's
/// success reply (`ssh -D` replies before its channel is even opened;
/// nodetunnel only once the node's sshd confirmed it).
pub async fn echo_open_timed(
    proxy: &Proxy,
    echo: SocketAddrV4,
) -> io::Result<(Duration, Duration)> {
    let t0 = Instant::now();
    let mut c = open(proxy, echo).await?;
    let reply = t0.elapsed();
    c.write_all(b"*").await?;
    let mut b = [0u8; 1];
    c.read_exact(&mut b).await?;
    let elapsed = t0.elapsed();
    if b != *b"*" {
        return Err(err("echo returned another byte"));
    }
    close(c).await;
    Ok((reply, elapsed))
}

/// `wait --proxy URL --echo IP:PORT [--timeout-secs 30]`: retry an echo
/// round trip until it works.
pub async fn wait(args: &Args) -> Result<(), String> {
    let proxy = Proxy::parse(args.require("proxy")?)?;
    let echo: SocketAddrV4 = args
        .require("echo")?
        .parse()
        .map_err(|e| format!("--echo: {e}"))?;
    let timeout = Duration::from_secs(args.get_parse("timeout-secs", 30u64)?);
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), echo_open(&proxy, echo)).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "timed out".into(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!(
        "{proxy:?} -> {echo}: no echo within {timeout:?}; last error: {last}"
    ))
}

/// `transfer --proxy URL --direction up|down --to IP:PORT --bytes N`: one
/// stream to the sink (up) or from the source (down), by hand (profiling).
/// Up through a `grpc+unix://` proxy, `--to` is a counted sink.
pub async fn transfer(args: &Args) -> Result<(), String> {
    let proxy = Proxy::parse(args.require("proxy")?)?;
    let to: SocketAddrV4 = args
        .require("to")?
        .parse()
        .map_err(|e| format!("--to: {e}"))?;
    let n: u64 = args.get_parse("bytes", 1u64 << 30)?;
    let limit = Duration::from_secs(30) + Duration::from_secs_f64(n as f64 / 20e6);
    let up = match args.get("direction").unwrap_or("down") {
        "up" => true,
        "down" => false,
        d => return Err(format!("--direction {d:?}: up or down")),
    };
    let pattern = pattern();
    let f = async {
        if up && proxy.half_closes() {
            upload(&proxy, to, &pattern, n).await
        } else if up {
            upload_counted(&proxy, to, &pattern, n).await
        } else {
            download(&proxy, to, n).await
        }
    };
    let d = tokio::time::timeout(limit, f)
        .await
        .map_err(|_| format!("not done within {limit:?}"))?
        .map_err(|e| e.to_string())?;
    println!(
        "{} {n} bytes in {:.3} s: {:.1} MB/s",
        if up { "upload" } else { "download" },
        d.as_secs_f64(),
        n as f64 / 1e6 / d.as_secs_f64()
    );
    Ok(())
}
