//! A konnectivity client, as kube-apiserver's single-use gRPC tunnel
//! (konnectivity-client's `CreateSingleUseGrpcTunnel`) drives nodetunnel's
//! gRPC front door: a new Unix socket connection, cleartext HTTP/2, one
//! `POST /ProxyService/Proxy` stream, `DIAL_REQ{protocol "tcp", address,
//! random}`, then the `DIAL_RSP` with that `random`, `DATA` both ways (one
//! packet per write), and `CLOSE_REQ` answered by `CLOSE_RSP`.
//!
//! [`ProxyStream`] is the raw stream of packets (for the reusable mode and
//! for protocol tests); [`Tunnel`] is one dialled connection on a stream of
//! its own.

use std::convert::Infallible;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use bytes::Bytes;
use http::{header, Method, Request};
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use nodetunnel::proxy::grpc_proto::{MessageDecoder, Packet, Payload, PROXY_METHOD_PATH};

/// Bound on every wait of this client.
pub const GRPC_TIMEOUT: Duration = Duration::from_secs(20);

/// What a client `Write` sends at most in one DATA packet (what the
/// apiserver's io.Copy uses).
pub const CLIENT_WRITE_BYTES: usize = 32 * 1024;

/// A fresh `random` for each dial.
pub fn next_random() -> i64 {
    static NEXT: AtomicI64 = AtomicI64::new(0);
    let seed = i64::from(std::process::id()) << 32;
    // Negative values too: `random` is any int64.
    -(seed + NEXT.fetch_add(1, Ordering::Relaxed) + 1)
}

/// The request body: the packets queued by [`ProxyStream::send`].
struct ChannelBody(mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|b| b.map(|bytes| Ok(Frame::data(bytes))))
    }
}

/// A handle that sends packets on a [`ProxyStream`] from another task.
#[derive(Clone)]
pub struct PacketSink(mpsc::Sender<Bytes>);

impl PacketSink {
    /// Send one packet.
    pub async fn send(&self, packet: Packet) -> Result<()> {
        self.0
            .send(packet.to_grpc_frame())
            .await
            .map_err(|_| anyhow!("the request body is gone"))
    }

    /// Send `data` for `connect_id` as DATA packets of at most
    /// [`CLIENT_WRITE_BYTES`].
    pub async fn write(&self, connect_id: i64, data: &[u8]) -> Result<()> {
        for chunk in data.chunks(CLIENT_WRITE_BYTES) {
            self.send(Packet::data(connect_id, Bytes::copy_from_slice(chunk)))
                .await?;
        }
        Ok(())
    }
}

/// One `Proxy` stream on a connection of its own.
pub struct ProxyStream {
    send: Option<mpsc::Sender<Bytes>>,
    body: Incoming,
    decoder: MessageDecoder,
    /// `grpc-status` and `grpc-message` once the stream ended (from the
    /// trailers, or the headers of a trailers-only response).
    pub status: Option<(String, String)>,
    conn: JoinHandle<()>,
}

impl Drop for ProxyStream {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<(String, String)> {
    let status = headers.get("grpc-status")?.to_str().ok()?.to_string();
    let message = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    Some((status, message))
}

impl ProxyStream {
    /// Connect to `socket` and open a `Proxy` stream.
    pub async fn open(socket: &Path) -> Result<ProxyStream> {
        Self::open_method(socket, PROXY_METHOD_PATH).await
    }

    /// Connect to `socket` and call `path` (tests of other methods).
    pub async fn open_method(socket: &Path, path: &str) -> Result<ProxyStream> {
        let io = UnixStream::connect(socket)
            .await
            .with_context(|| format!("connecting to {}", socket.display()))?;
        let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(io))
            .await
            .context("HTTP/2 handshake")?;
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        let (tx, rx) = mpsc::channel(16);
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("http://localhost{path}"))
            .header(header::CONTENT_TYPE, "application/grpc")
            .header("te", "trailers")
            .header(header::USER_AGENT, "grpc-go/1.72.0 (nodetunnel test)")
            .body(ChannelBody(rx))
            .context("request")?;
        let response = tokio::time::timeout(GRPC_TIMEOUT, sender.send_request(request))
            .await
            .map_err(|_| anyhow!("no response headers within {GRPC_TIMEOUT:?}"))?
            .context("sending the Proxy request")?;
        if response.status() != http::StatusCode::OK {
            bail!("HTTP status {}", response.status());
        }
        let status = grpc_status(response.headers());
        Ok(ProxyStream {
            send: Some(tx),
            body: response.into_body(),
            decoder: MessageDecoder::default(),
            status,
            conn,
        })
    }

    /// Send one packet.
    pub async fn send(&self, packet: Packet) -> Result<()> {
        let send = self.send.as_ref().context("send side closed")?;
        send.send(packet.to_grpc_frame())
            .await
            .map_err(|_| anyhow!("the request body is gone"))
    }

    /// Send `packets` in one HTTP/2 DATA frame (so that the server reads
    /// them at once).
    pub async fn send_together(&self, packets: &[Packet]) -> Result<()> {
        let send = self.send.as_ref().context("send side closed")?;
        let mut all = Vec::new();
        for p in packets {
            all.extend_from_slice(&p.to_grpc_frame());
        }
        send.send(Bytes::from(all))
            .await
            .map_err(|_| anyhow!("the request body is gone"))
    }

    /// A sender for another task.
    pub fn sink(&self) -> PacketSink {
        PacketSink(self.send.clone().expect("send side open"))
    }

    /// End the client's side of the stream (gRPC CloseSend).
    pub fn close_send(&mut self) {
        self.send = None;
    }

    /// The next packet; `None` once the stream ended (see
    /// [`status`](Self::status)).
    pub async fn recv(&mut self) -> Result<Option<Packet>> {
        tokio::time::timeout(GRPC_TIMEOUT, self.recv_unbounded())
            .await
            .map_err(|_| anyhow!("no packet within {GRPC_TIMEOUT:?}"))?
    }

    async fn recv_unbounded(&mut self) -> Result<Option<Packet>> {
        loop {
            if let Some(packet) = self.decoder.next_packet()? {
                return Ok(Some(packet));
            }
            if self.status.is_some() {
                return Ok(None);
            }
            match self.body.frame().await {
                None => {
                    self.decoder.finish()?;
                    return Ok(None);
                }
                Some(Err(e)) => bail!("response body: {e}"),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.decoder.push(&data),
                    Err(frame) => {
                        if let Some(trailers) = frame.trailers_ref() {
                            self.status = grpc_status(trailers);
                        }
                    }
                },
            }
        }
    }

    /// Dial `address` on this stream: the `DIAL_RSP` with our `random`
    /// (packets of other dials before it are an error here).
    pub async fn dial(&mut self, address: &str) -> Result<Result<i64, String>> {
        let random = next_random();
        self.send(Packet::dial_request(address, random)).await?;
        self.dial_response(random).await
    }

    /// Wait for the `DIAL_RSP` of `random`: its connectID or its error.
    pub async fn dial_response(&mut self, random: i64) -> Result<Result<i64, String>> {
        let packet = self
            .recv()
            .await?
            .with_context(|| format!("stream ended before DIAL_RSP ({:?})", self.status))?;
        let Some(Payload::DialResponse(rsp)) = packet.payload else {
            bail!("expected DIAL_RSP, got {packet:?}");
        };
        if rsp.random != random {
            bail!("DIAL_RSP for random {} instead of {random}", rsp.random);
        }
        if !rsp.error.is_empty() {
            return Ok(Err(rsp.error));
        }
        if rsp.connect_id == 0 {
            bail!("DIAL_RSP without error and with connectID 0");
        }
        Ok(Ok(rsp.connect_id))
    }
}

/// What a [`Tunnel`] read returns.
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    /// Bytes of the connection.
    Data(Bytes),
    /// `CLOSE_RSP` with its `error` (empty: a clean close).
    Closed(String),
}

/// One connection dialled the single-use way.
pub struct Tunnel {
    pub stream: ProxyStream,
    pub connect_id: i64,
}

impl Tunnel {
    /// New connection, new stream, one dial: the tunnel, or the DIAL_RSP's
    /// error text.
    pub async fn dial(socket: &Path, address: &str) -> Result<Result<Tunnel, String>> {
        let mut stream = ProxyStream::open(socket).await?;
        Ok(stream
            .dial(address)
            .await?
            .map(|connect_id| Tunnel { stream, connect_id }))
    }

    /// Send `data` as DATA packets of at most [`CLIENT_WRITE_BYTES`].
    pub async fn write(&self, data: &[u8]) -> Result<()> {
        self.stream.sink().write(self.connect_id, data).await
    }

    /// The next DATA or CLOSE_RSP of this connection.
    pub async fn read(&mut self) -> Result<Read> {
        let packet = self
            .stream
            .recv()
            .await?
            .with_context(|| format!("stream ended ({:?})", self.stream.status))?;
        match packet.payload {
            Some(Payload::Data(d)) if d.connect_id == self.connect_id => Ok(Read::Data(d.data)),
            Some(Payload::CloseResponse(c)) if c.connect_id == self.connect_id => {
                Ok(Read::Closed(c.error))
            }
            _ => bail!("unexpected packet {packet:?}"),
        }
    }

    /// Read until `len` bytes arrived.
    pub async fn read_exact(&mut self, len: usize) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            match self.read().await? {
                Read::Data(d) => out.extend_from_slice(&d),
                Read::Closed(e) => bail!("closed after {} of {len} bytes: {e:?}", out.len()),
            }
        }
        Ok(out)
    }

    /// `CLOSE_REQ`, then the `CLOSE_RSP` (DATA before it is dropped); its
    /// error text.
    pub async fn close(mut self) -> Result<String> {
        self.stream
            .send(Packet::close_request(self.connect_id))
            .await?;
        loop {
            match self.read().await? {
                Read::Data(_) => continue,
                Read::Closed(error) => return Ok(error),
            }
        }
    }

    /// The connection as a byte stream (for TLS on top): a duplex whose
    /// far end is pumped into DATA packets and out of them. The tunnel's
    /// CLOSE_RSP shuts the duplex down; the duplex's EOF sends CLOSE_REQ.
    pub fn into_io(self) -> DuplexStream {
        let (near, far) = tokio::io::duplex(256 * 1024);
        tokio::spawn(async move {
            let Tunnel {
                mut stream,
                connect_id,
            } = self;
            let (mut rd, mut wr) = tokio::io::split(far);
            let mut buf = vec![0u8; CLIENT_WRITE_BYTES];
            let mut sent_close = false;
            loop {
                tokio::select! {
                    n = rd.read(&mut buf), if !sent_close => match n {
                        Ok(0) | Err(_) => {
                            sent_close = true;
                            if stream.send(Packet::close_request(connect_id)).await.is_err() {
                                return;
                            }
                        }
                        Ok(n) => {
                            let data = Bytes::copy_from_slice(&buf[..n]);
                            if stream.send(Packet::data(connect_id, data)).await.is_err() {
                                return;
                            }
                        }
                    },
                    packet = stream.recv_unbounded() => match packet {
                        Ok(Some(p)) => match p.payload {
                            Some(Payload::Data(d)) if wr.write_all(&d.data).await.is_err() => {
                                return;
                            }
                            Some(Payload::CloseResponse(_)) => {
                                let _ = wr.shutdown().await;
                                return;
                            }
                            _ => {}
                        },
                        _ => return,
                    },
                }
            }
        });
        near
    }
}
