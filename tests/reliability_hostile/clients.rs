//! Well-behaved and hostile clients of the front door, speaking raw bytes
//! (no HTTP or SOCKS library between the test and the wire).

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::fixture::Sidecar;

/// What kube-apiserver requires after its CONNECT, byte for byte.
pub const CONNECT_OK: &[u8] = b"HTTP/1.1 200 Connection Established\r\n\r\n";

/// Bound on one answer from the sidecar.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A client connection over any listener.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
pub type Conn = Box<dyn Io>;

/// The listeners of the front door.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Door {
    /// HTTP CONNECT over the Unix socket.
    Uds,
    /// HTTP CONNECT over TCP.
    Tcp,
    /// SOCKS5.
    Socks5,
}

impl Door {
    pub const HTTP: [Door; 2] = [Door::Uds, Door::Tcp];
    pub const ALL: [Door; 3] = [Door::Uds, Door::Tcp, Door::Socks5];
}

/// A fresh connection to `door`.
pub async fn dial(sc: &Sidecar, door: Door) -> io::Result<Conn> {
    Ok(match door {
        Door::Uds => Box::new(UnixStream::connect(&sc.uds).await?),
        Door::Tcp => Box::new(TcpStream::connect(sc.tcp).await?),
        Door::Socks5 => Box::new(TcpStream::connect(sc.socks5).await?),
    })
}

/// How a connection ended from the client's side.
#[derive(Debug)]
pub struct Ended {
    /// Everything received before the end.
    pub bytes: Vec<u8>,
    /// EOF (false: the peer reset the connection).
    pub eof: bool,
}

impl Ended {
    /// The HTTP status of what was received, if it is an HTTP response.
    pub fn status(&self) -> Option<u16> {
        status_of(&self.bytes)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

/// The status code of an HTTP/1.x response head.
pub fn status_of(bytes: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(bytes.get(..12)?).ok()?;
    let rest = text.strip_prefix("HTTP/1.")?;
    rest.get(2..5)?.parse().ok()
}

/// Read until the sidecar closes the connection (EOF or reset), keeping
/// at most `keep` bytes; `None` if it is still open after `timeout`.
pub async fn until_closed<S: AsyncRead + Unpin + ?Sized>(
    s: &mut S,
    timeout: Duration,
    keep: usize,
) -> Option<Ended> {
    let read = async {
        let mut bytes = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return Ended { bytes, eof: true },
                Ok(n) => {
                    let room = keep.saturating_sub(bytes.len()).min(n);
                    bytes.extend_from_slice(&buf[..room]);
                }
                Err(_) => return Ended { bytes, eof: false },
            }
        }
    };
    tokio::time::timeout(timeout, read).await.ok()
}

/// Read a response head (through the blank line); stops early at EOF.
pub async fn read_head<S: AsyncRead + Unpin + ?Sized>(s: &mut S) -> io::Result<Vec<u8>> {
    let read = async {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match s.read(&mut byte).await? {
                0 => break,
                _ => head.push(byte[0]),
            }
        }
        Ok(head)
    };
    tokio::time::timeout(IO_TIMEOUT, read)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no response head"))?
}

/// The answer to a CONNECT.
#[derive(Debug)]
pub enum Answer {
    /// 200 with exactly [`CONNECT_OK`]; the tunnel is open.
    Open,
    /// Anything else: the response (head and body) up to the close.
    Refused { status: Option<u16>, text: String },
}

/// Send `CONNECT target` the way kube-apiserver does and read the answer.
/// A refusal must be followed by the close of the connection.
pub async fn connect(s: &mut Conn, target: &str) -> io::Result<Answer> {
    let request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    s.write_all(request.as_bytes()).await?;
    let head = read_head(s).await?;
    if head == CONNECT_OK {
        return Ok(Answer::Open);
    }
    let rest = until_closed(s, IO_TIMEOUT, 64 * 1024)
        .await
        .ok_or_else(|| io::Error::other("refusal not followed by a close"))?;
    let mut all = head;
    all.extend_from_slice(&rest.bytes);
    Ok(Answer::Refused {
        status: status_of(&all),
        text: String::from_utf8_lossy(&all).into_owned(),
    })
}

/// A refusal's status and one-line body, checking its shape: a
/// `text/plain` body of one line ending in `\n`, `Connection: close`.
pub fn refusal_parts(text: &str) -> (u16, String) {
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no blank line in {text:?}"));
    let status = status_of(head.as_bytes()).unwrap_or_else(|| panic!("no status in {text:?}"));
    // nodetunnel's own refusals: text/plain, one line, Connection: close.
    // hyper's (a request line it cannot parse: 400; an oversized head:
    // 431) have no body.
    if !body.is_empty() {
        let head_lower = head.to_ascii_lowercase();
        assert!(
            head_lower.contains("connection: close"),
            "no Connection: close in {head:?}"
        );
        assert!(
            head_lower.contains("content-type: text/plain"),
            "not text/plain: {head:?}"
        );
        assert!(
            body.ends_with('\n') && body.matches('\n').count() == 1,
            "body is not one line: {body:?}"
        );
    }
    (status, body.trim_end().to_string())
}

/// SOCKS5: greeting (no authentication) and a CONNECT request for
/// `address` (ATYP and address bytes) and `port`; the reply code.
pub async fn socks5_connect(s: &mut Conn, address: &[u8], port: u16) -> io::Result<u8> {
    s.write_all(&[5, 1, 0]).await?;
    let mut method = [0u8; 2];
    tokio::time::timeout(IO_TIMEOUT, s.read_exact(&mut method))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no method selection"))??;
    if method != [5, 0] {
        return Err(io::Error::other(format!("method selection {method:?}")));
    }
    let mut request = vec![5, 1, 0];
    request.extend_from_slice(address);
    request.extend_from_slice(&port.to_be_bytes());
    s.write_all(&request).await?;
    socks5_reply(s).await
}

/// Read a 10-byte SOCKS5 reply (IPv4 BND.ADDR); its REP code.
pub async fn socks5_reply<S: AsyncRead + Unpin + ?Sized>(s: &mut S) -> io::Result<u8> {
    let mut reply = [0u8; 10];
    tokio::time::timeout(IO_TIMEOUT, s.read_exact(&mut reply))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no SOCKS5 reply"))??;
    if reply[0] != 5 || reply[2] != 0 || reply[3] != 1 {
        return Err(io::Error::other(format!("malformed reply {reply:?}")));
    }
    Ok(reply[1])
}

/// SOCKS5 address bytes of an IPv4 address.
pub fn ipv4(octets: [u8; 4]) -> Vec<u8> {
    let mut v = vec![1];
    v.extend_from_slice(&octets);
    v
}

/// SOCKS5 address bytes of a domain name.
pub fn domain(name: &[u8]) -> Vec<u8> {
    let mut v = vec![3, name.len() as u8];
    v.extend_from_slice(name);
    v
}

/// Open a tunnel to the echo server through `door`.
pub async fn tunnel(sc: &Sidecar, door: Door) -> io::Result<Conn> {
    let mut s = dial(sc, door).await?;
    let port = sc.echo.addr.port();
    match door {
        Door::Socks5 => match socks5_connect(&mut s, &ipv4([127, 0, 0, 1]), port).await? {
            0 => Ok(s),
            rep => Err(io::Error::other(format!("SOCKS5 reply {rep:#04x}"))),
        },
        _ => match connect(&mut s, &format!("127.0.0.1:{port}")).await? {
            Answer::Open => Ok(s),
            Answer::Refused { text, .. } => Err(io::Error::other(format!("refused: {text:?}"))),
        },
    }
}

/// Send `payload` and read it back.
pub async fn echo(s: &mut Conn, payload: &[u8]) -> io::Result<()> {
    let exchange = async {
        s.write_all(payload).await?;
        let mut back = vec![0u8; payload.len()];
        s.read_exact(&mut back).await?;
        if back != payload {
            return Err(io::Error::other("echo returned other bytes"));
        }
        Ok(())
    };
    tokio::time::timeout(IO_TIMEOUT, exchange)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "echo timed out"))?
}

/// A well-behaved client through every listener: tunnel, echo, close.
/// Panics (with the sidecar's log) if any fails.
pub async fn well_behaved(sc: &Sidecar, what: &str) {
    for door in Door::ALL {
        let result = async {
            let mut s = tunnel(sc, door).await?;
            echo(&mut s, format!("{what} via {door:?}").as_bytes()).await
        }
        .await;
        if let Err(e) = result {
            panic!(
                "a well-behaved client via {door:?} failed {what}: {e}\n{}",
                sc.tail()
            );
        }
    }
}

/// A small deterministic PRNG (xorshift64*) for garbage.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}
