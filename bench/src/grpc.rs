//! The client side of the gRPC front door: konnectivity-client's single-use
//! tunnel (`CreateSingleUseGrpcTunnel`), as kube-apiserver's `GRPC` egress
//! drives it, as a byte pipe for the benchmarks.
//!
//! Per tunnel: a new Unix socket connection, a new cleartext HTTP/2
//! connection (the `h2` crate), one `POST /ProxyService/Proxy` stream
//! (`content-type: application/grpc`, `te: trailers`), `DIAL_REQ{protocol
//! "tcp", address, random}`, then the `DIAL_RSP` with that `random` (30 s
//! backstop, as the client's). Then each write is one `DATA` packet of at
//! most [`MAX_WRITE_BYTES`]; a `DATA` packet from the server is read out
//! as bytes; `CLOSE_RSP` is the end of the stream (EOF, or an error when
//! it carries one). Shutting down the write side sends `CLOSE_REQ`: the
//! protocol has no half-close, so a shutdown ends the connection both ways
//! and the server answers with `CLOSE_RSP`.
//!
//! The `Packet` messages (`proto/konnectivity-client.proto` in the main
//! repository) are encoded and decoded by hand: only the fields this client
//! sends and reads, proto3 style (default values not written), checked
//! against bytes the server's own prost types produce.

use std::fmt;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tokio::task::JoinHandle;

/// The method kube-apiserver calls (the service has no proto package).
pub const METHOD_PATH: &str = "/ProxyService/Proxy";
/// Most bytes of one client write, sent as one `DATA` packet (what the
/// apiserver's `io.Copy` writes at most).
pub const MAX_WRITE_BYTES: usize = 32 * 1024;
/// How long the client waits for its `DIAL_RSP` (konnectivity-client's
/// backstop).
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest gRPC message accepted from the server (gRPC's default limit
/// is 4 MiB; the server's DATA packets are at most 32 KiB).
const MAX_MESSAGE_BYTES: usize = 4 << 20;
/// HTTP/2 receive window of the stream and of the connection. grpc-go
/// (kube-apiserver's gRPC) starts at 64 KiB and grows its windows by
/// bandwidth-delay estimation, up to 16 MiB; the `h2` crate has no such
/// estimation, so a fixed window stands in for the grown one.
const STREAM_WINDOW: u32 = 1 << 20;
const CONNECTION_WINDOW: u32 = 2 << 20;

// `PacketType` numbers.
const DIAL_REQ: u64 = 0;
const DIAL_RSP: u64 = 1;
const CLOSE_REQ: u64 = 2;
const CLOSE_RSP: u64 = 3;
const DATA: u64 = 4;
const DIAL_CLS: u64 = 5;

// `Packet.payload` field numbers.
const FIELD_DIAL_REQUEST: u32 = 2;
const FIELD_DIAL_RESPONSE: u32 = 3;
const FIELD_DATA: u32 = 4;
const FIELD_CLOSE_REQUEST: u32 = 5;
const FIELD_CLOSE_RESPONSE: u32 = 6;
const FIELD_CLOSE_DIAL: u32 = 7;

// Protobuf wire types.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

/// A packet from the server, as far as this client reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Packet {
    /// `DIAL_RSP`.
    DialResponse {
        error: String,
        connect_id: i64,
        random: i64,
    },
    /// `DATA`.
    Data {
        connect_id: i64,
        error: String,
        data: Bytes,
    },
    /// `CLOSE_RSP`.
    CloseResponse { error: String, connect_id: i64 },
    /// Any other type (ignored by this client).
    Other { packet_type: u64 },
}

/// Why bytes from the server are not a gRPC message holding a `Packet`.
#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The gRPC compressed flag is set (none was negotiated).
    Compressed(u8),
    /// A message beyond [`MAX_MESSAGE_BYTES`].
    TooLarge(usize),
    /// The message ends inside a field.
    Truncated(&'static str),
    /// A wire type protobuf does not have (or a group).
    WireType(u8),
    /// A string field that is not UTF-8.
    NotUtf8(&'static str),
    /// The stream ended inside a gRPC message.
    StreamEndedInMessage(usize),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Compressed(flag) => {
                write!(f, "compressed gRPC message (flag {flag}), none negotiated")
            }
            DecodeError::TooLarge(len) => write!(
                f,
                "gRPC message of {len} bytes, over the limit of {MAX_MESSAGE_BYTES}"
            ),
            DecodeError::Truncated(what) => write!(f, "malformed Packet: truncated {what}"),
            DecodeError::WireType(t) => write!(f, "malformed Packet: wire type {t}"),
            DecodeError::NotUtf8(what) => write!(f, "malformed Packet: {what} is not UTF-8"),
            DecodeError::StreamEndedInMessage(n) => write!(
                f,
                "the stream ended inside a gRPC message ({n} bytes left over)"
            ),
        }
    }
}

impl std::error::Error for DecodeError {}

impl From<DecodeError> for io::Error {
    fn from(e: DecodeError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

// --- encoding -------------------------------------------------------------

fn varint_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

fn put_varint(buf: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        buf.put_u8((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    buf.put_u8(v as u8);
}

fn key(field: u32, wire: u8) -> u64 {
    (u64::from(field) << 3) | u64::from(wire)
}

/// An int64 field (not written when 0, as proto3 encoders do).
fn int64_field_len(field: u32, v: i64) -> usize {
    if v == 0 {
        0
    } else {
        varint_len(key(field, VARINT)) + varint_len(v as u64)
    }
}

fn put_int64_field(buf: &mut BytesMut, field: u32, v: i64) {
    if v != 0 {
        put_varint(buf, key(field, VARINT));
        // A negative int64 is its two's complement as a 10-byte varint.
        put_varint(buf, v as u64);
    }
}

/// A string or bytes field (not written when empty).
fn bytes_field_len(field: u32, b: &[u8]) -> usize {
    if b.is_empty() {
        0
    } else {
        varint_len(key(field, LEN)) + varint_len(b.len() as u64) + b.len()
    }
}

fn put_bytes_field(buf: &mut BytesMut, field: u32, b: &[u8]) {
    if !b.is_empty() {
        put_varint(buf, key(field, LEN));
        put_varint(buf, b.len() as u64);
        buf.put_slice(b);
    }
}

/// One gRPC message (5-byte prefix: not compressed, u32 big-endian length)
/// holding `Packet{type, <payload_field>: <payload>}`; `payload` writes the
/// payload message's `payload_len` bytes.
fn frame_packet(
    packet_type: u64,
    payload_field: u32,
    payload_len: usize,
    payload: impl FnOnce(&mut BytesMut),
) -> Bytes {
    let type_len = if packet_type == 0 {
        0
    } else {
        varint_len(key(1, VARINT)) + varint_len(packet_type)
    };
    let message_len = type_len
        + varint_len(key(payload_field, LEN))
        + varint_len(payload_len as u64)
        + payload_len;
    let mut buf = BytesMut::with_capacity(5 + message_len);
    buf.put_u8(0);
    // A packet is one write of at most 32 KiB plus a few bytes.
    buf.put_u32(message_len as u32);
    if packet_type != 0 {
        put_varint(&mut buf, key(1, VARINT));
        put_varint(&mut buf, packet_type);
    }
    put_varint(&mut buf, key(payload_field, LEN));
    put_varint(&mut buf, payload_len as u64);
    let before = buf.len();
    payload(&mut buf);
    debug_assert_eq!(buf.len() - before, payload_len);
    buf.freeze()
}

/// `DIAL_REQ{protocol "tcp", address, random}`, framed.
pub fn dial_request(address: &str, random: i64) -> Bytes {
    let len = bytes_field_len(1, b"tcp")
        + bytes_field_len(2, address.as_bytes())
        + int64_field_len(3, random);
    frame_packet(DIAL_REQ, FIELD_DIAL_REQUEST, len, |b| {
        put_bytes_field(b, 1, b"tcp");
        put_bytes_field(b, 2, address.as_bytes());
        put_int64_field(b, 3, random);
    })
}

/// `DATA{connectID, data}`, framed.
pub fn data(connect_id: i64, data: &[u8]) -> Bytes {
    let len = int64_field_len(1, connect_id) + bytes_field_len(3, data);
    frame_packet(DATA, FIELD_DATA, len, |b| {
        put_int64_field(b, 1, connect_id);
        put_bytes_field(b, 3, data);
    })
}

/// `CLOSE_REQ{connectID}`, framed.
pub fn close_request(connect_id: i64) -> Bytes {
    let len = int64_field_len(1, connect_id);
    frame_packet(CLOSE_REQ, FIELD_CLOSE_REQUEST, len, |b| {
        put_int64_field(b, 1, connect_id)
    })
}

/// `DIAL_CLS{random}`, framed.
pub fn close_dial(random: i64) -> Bytes {
    let len = int64_field_len(1, random);
    frame_packet(DIAL_CLS, FIELD_CLOSE_DIAL, len, |b| {
        put_int64_field(b, 1, random)
    })
}

// --- decoding -------------------------------------------------------------

fn get_varint(buf: &mut Bytes, what: &'static str) -> Result<u64, DecodeError> {
    let mut v = 0u64;
    for shift in (0..70).step_by(7) {
        if !buf.has_remaining() {
            return Err(DecodeError::Truncated(what));
        }
        let b = buf.get_u8();
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(DecodeError::Truncated(what))
}

/// A field's value: a varint, the bytes of a length-delimited field, or
/// nothing for a fixed-size field (skipped: a Packet has none).
enum Value {
    Varint(u64),
    Len(Bytes),
    Skipped,
}

fn next_field(buf: &mut Bytes) -> Result<(u32, Value), DecodeError> {
    let k = get_varint(buf, "field key")?;
    let field = (k >> 3) as u32;
    let value = match (k & 7) as u8 {
        VARINT => Value::Varint(get_varint(buf, "varint")?),
        LEN => {
            let len = get_varint(buf, "length")?;
            if len > buf.remaining() as u64 {
                return Err(DecodeError::Truncated("length-delimited field"));
            }
            Value::Len(buf.split_to(len as usize))
        }
        w @ (FIXED64 | FIXED32) => {
            let n = if w == FIXED64 { 8 } else { 4 };
            if buf.remaining() < n {
                return Err(DecodeError::Truncated("fixed-size field"));
            }
            buf.advance(n);
            Value::Skipped
        }
        w => return Err(DecodeError::WireType(w)),
    };
    Ok((field, value))
}

fn string(b: Bytes, what: &'static str) -> Result<String, DecodeError> {
    String::from_utf8(b.to_vec()).map_err(|_| DecodeError::NotUtf8(what))
}

/// Decode one `Packet` message (without the gRPC prefix).
pub fn decode_packet(mut message: Bytes) -> Result<Packet, DecodeError> {
    let mut packet_type = 0u64;
    let mut payload: Option<(u32, Bytes)> = None;
    while message.has_remaining() {
        match next_field(&mut message)? {
            (1, Value::Varint(t)) => packet_type = t,
            (f @ 2..=8, Value::Len(b)) => payload = Some((f, b)),
            _ => {}
        }
    }
    let (mut error, mut connect_id, mut random, mut bytes) =
        (String::new(), 0i64, 0i64, Bytes::new());
    if let Some((f, mut b)) = payload {
        while b.has_remaining() {
            match (f, next_field(&mut b)?) {
                (FIELD_DIAL_RESPONSE, (1, Value::Len(s))) => error = string(s, "error")?,
                (FIELD_DIAL_RESPONSE, (2, Value::Varint(v))) => connect_id = v as i64,
                (FIELD_DIAL_RESPONSE, (3, Value::Varint(v))) => random = v as i64,
                (FIELD_DATA, (1, Value::Varint(v))) => connect_id = v as i64,
                (FIELD_DATA, (2, Value::Len(s))) => error = string(s, "error")?,
                (FIELD_DATA, (3, Value::Len(d))) => bytes = d,
                (FIELD_CLOSE_RESPONSE, (1, Value::Len(s))) => error = string(s, "error")?,
                (FIELD_CLOSE_RESPONSE, (2, Value::Varint(v))) => connect_id = v as i64,
                _ => {}
            }
        }
    }
    // The type says what the packet is; a payload of another kind (or none)
    // reads as its defaults, as protobuf's generated code would.
    Ok(match packet_type {
        DIAL_RSP => Packet::DialResponse {
            error,
            connect_id,
            random,
        },
        DATA => Packet::Data {
            connect_id,
            error,
            data: bytes,
        },
        CLOSE_RSP => Packet::CloseResponse { error, connect_id },
        t => Packet::Other { packet_type: t },
    })
}

/// Take the next complete gRPC message off `inbox` and decode it.
pub fn take_packet(inbox: &mut BytesMut) -> Result<Option<Packet>, DecodeError> {
    if inbox.len() < 5 {
        return Ok(None);
    }
    if inbox[0] != 0 {
        return Err(DecodeError::Compressed(inbox[0]));
    }
    let len = u32::from_be_bytes([inbox[1], inbox[2], inbox[3], inbox[4]]) as usize;
    if len > MAX_MESSAGE_BYTES {
        return Err(DecodeError::TooLarge(len));
    }
    if inbox.len() < 5 + len {
        inbox.reserve(5 + len - inbox.len());
        return Ok(None);
    }
    inbox.advance(5);
    decode_packet(inbox.split_to(len).freeze()).map(Some)
}

// --- the tunnel -----------------------------------------------------------

fn h2_error(what: &str, e: h2::Error) -> io::Error {
    io::Error::other(format!("gRPC {what}: {e}"))
}

/// A fresh `random` for each dial (any int64; distinct within the process).
fn next_random() -> i64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let seed = u64::from(std::process::id()) << 40;
    // An odd multiplier is a bijection: distinct counters, distinct values.
    ((seed ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15)) as i64
}

/// The response body of the `Proxy` stream, as packets.
struct PacketReader {
    recv: RecvStream,
    inbox: BytesMut,
}

impl PacketReader {
    /// The next packet; `None` once the response body ended.
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Packet>>> {
        loop {
            if let Some(p) = take_packet(&mut self.inbox)? {
                return Poll::Ready(Ok(Some(p)));
            }
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(chunk)) => {
                    // Consumed into our buffer, which holds at most one
                    // packet plus one HTTP/2 frame: let the server send more.
                    let _ = self.recv.flow_control().release_capacity(chunk.len());
                    self.inbox.extend_from_slice(&chunk);
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_error("response body", e))),
                None if self.inbox.is_empty() => return Poll::Ready(Ok(None)),
                None => {
                    return Poll::Ready(Err(
                        DecodeError::StreamEndedInMessage(self.inbox.len()).into()
                    ))
                }
            }
        }
    }

    async fn next(&mut self) -> io::Result<Option<Packet>> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }
}

/// Aborts the HTTP/2 connection's task when dropped.
struct ConnectionTask(JoinHandle<()>);

impl Drop for ConnectionTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One dialled connection through the gRPC front door, as a byte pipe.
pub struct GrpcConn {
    send: SendStream<Bytes>,
    reader: PacketReader,
    connect_id: i64,
    /// Bytes of the last DATA packet not yet read.
    unread: Bytes,
    /// The encoded packet being sent (at most one).
    outbox: Bytes,
    close_sent: bool,
    /// CLOSE_RSP arrived (or the stream ended): reads are at EOF.
    closed: bool,
    _connection: ConnectionTask,
}

impl GrpcConn {
    /// Connect to `socket`, open a `Proxy` stream and dial `address`
    /// (`host:port`): the connection once `DIAL_RSP` gave its connectID.
    pub async fn open(socket: &Path, address: &str) -> io::Result<GrpcConn> {
        let io = UnixStream::connect(socket)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", socket.display())))?;
        let (client, connection) = h2::client::Builder::new()
            .enable_push(false)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|e| h2_error("HTTP/2 handshake", e))?;
        let connection = ConnectionTask(tokio::spawn(async move {
            let _ = connection.await;
        }));
        let mut client = client
            .ready()
            .await
            .map_err(|e| h2_error("connection", e))?;
        let request = http::Request::builder()
            .method(http::Method::POST)
            .uri(format!("http://localhost{METHOD_PATH}"))
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers")
            .header(http::header::USER_AGENT, "grpc-go (nodetunnel-bench)")
            .body(())
            .map_err(io::Error::other)?;
        let (response, mut send) = client
            .send_request(request, false)
            .map_err(|e| h2_error("request", e))?;
        let random = next_random();
        send.send_data(dial_request(address, random), false)
            .map_err(|e| h2_error("DIAL_REQ", e))?;
        let dialled = async {
            let response = response.await.map_err(|e| h2_error("response", e))?;
            let headers = response.headers();
            if response.status() != http::StatusCode::OK {
                return Err(io::Error::other(format!(
                    "gRPC dial {address}: HTTP status {}",
                    response.status()
                )));
            }
            if let Some(status) = headers.get("grpc-status") {
                // A trailers-only response: the call failed at once.
                return Err(io::Error::other(format!(
                    "gRPC dial {address}: grpc-status {status:?} {:?}",
                    headers.get("grpc-message")
                )));
            }
            let mut reader = PacketReader {
                recv: response.into_body(),
                inbox: BytesMut::new(),
            };
            loop {
                match reader.next().await? {
                    None => {
                        return Err(io::Error::other(format!(
                            "gRPC dial {address}: the stream ended before DIAL_RSP"
                        )))
                    }
                    Some(Packet::DialResponse {
                        error,
                        connect_id,
                        random: r,
                    }) if r == random => {
                        if !error.is_empty() {
                            return Err(io::Error::other(format!("gRPC dial {address}: {error}")));
                        }
                        if connect_id == 0 {
                            return Err(io::Error::other(format!(
                                "gRPC dial {address}: DIAL_RSP without error and with connectID 0"
                            )));
                        }
                        return Ok((reader, connect_id));
                    }
                    // Nothing else belongs on a single-use stream before
                    // its DIAL_RSP; konnectivity-client ignores it too.
                    Some(_) => {}
                }
            }
        };
        let (reader, connect_id) = match tokio::time::timeout(DIAL_TIMEOUT, dialled).await {
            Ok(r) => r?,
            Err(_) => {
                // As the client does on its backstop: cancel the dial.
                let _ = send.send_data(close_dial(random), false);
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("gRPC dial {address}: no DIAL_RSP within {DIAL_TIMEOUT:?}"),
                ));
            }
        };
        Ok(GrpcConn {
            send,
            reader,
            connect_id,
            unread: Bytes::new(),
            outbox: Bytes::new(),
            close_sent: false,
            closed: false,
            _connection: connection,
        })
    }

    /// Hand the packet in `outbox` to HTTP/2 as flow control allows.
    fn poll_send_outbox(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.outbox.is_empty() {
            self.send.reserve_capacity(self.outbox.len());
            let capacity = self.send.capacity();
            if capacity == 0 {
                match ready!(self.send.poll_capacity(cx)) {
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Poll::Ready(Err(h2_error("send", e))),
                    None => {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::BrokenPipe,
                            "gRPC stream closed",
                        )))
                    }
                }
            }
            let chunk = self.outbox.split_to(capacity.min(self.outbox.len()));
            self.send
                .send_data(chunk, false)
                .map_err(|e| h2_error("send", e))?;
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for GrpcConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.unread.is_empty() {
                let n = this.unread.len().min(buf.remaining());
                buf.put_slice(&this.unread[..n]);
                this.unread.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.closed {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.reader.poll_next(cx))? {
                Some(Packet::Data {
                    connect_id, data, ..
                }) if connect_id == this.connect_id => this.unread = data,
                Some(Packet::CloseResponse { error, connect_id })
                    if connect_id == this.connect_id =>
                {
                    this.closed = true;
                    if !error.is_empty() {
                        return Poll::Ready(Err(io::Error::other(format!(
                            "CLOSE_RSP with error: {error}"
                        ))));
                    }
                }
                Some(_) => {}
                None => {
                    this.closed = true;
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the Proxy stream ended without CLOSE_RSP",
                    )));
                }
            }
        }
    }
}

impl AsyncWrite for GrpcConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_send_outbox(cx))?;
        if this.close_sent || this.closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "gRPC connection closed",
            )));
        }
        let n = buf.len().min(MAX_WRITE_BYTES);
        this.outbox = data(this.connect_id, &buf[..n]);
        // The bytes are taken; what flow control does not let out now goes
        // on the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_send_outbox(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_send_outbox(cx)
    }

    /// Sends `CLOSE_REQ` (the end of the connection both ways: the protocol
    /// has no half-close); reads then end at the server's `CLOSE_RSP`.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_outbox(cx))?;
        if !this.close_sent && !this.closed {
            this.close_sent = true;
            this.outbox = close_request(this.connect_id);
        }
        this.poll_send_outbox(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The expected bytes below are what the server's own types produce
    // (src/proxy/grpc_proto.rs of the main repository, prost 0.13:
    // `Packet::dial_request(..).to_grpc_frame()` and so on), printed by a
    // throwaway program that included that file.

    #[test]
    fn a_dial_request_matches_the_server_types_bytes() {
        let want: &[u8] = &[
            0x00, 0x00, 0x00, 0x00, 0x21, 0x12, 0x1f, 0x0a, 0x03, 0x74, 0x63, 0x70, 0x12, 0x0d,
            0x31, 0x30, 0x2e, 0x30, 0x2e, 0x30, 0x2e, 0x31, 0x3a, 0x39, 0x30, 0x30, 0x33, 0x18,
            0xfb, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
        ];
        assert_eq!(&dial_request("10.0.0.1:9003", -5)[..], want);
    }

    #[test]
    fn data_close_request_and_close_dial_match_the_server_types_bytes() {
        assert_eq!(
            &data(7, b"hi")[..],
            &[
                0x00, 0x00, 0x00, 0x00, 0x0a, 0x08, 0x04, 0x22, 0x06, 0x08, 0x07, 0x1a, 0x02, 0x68,
                0x69
            ]
        );
        // Multi-byte varints: connectID 300, 200 bytes of data.
        let mut want = vec![
            0x00, 0x00, 0x00, 0x00, 0xd3, 0x08, 0x04, 0x22, 0xce, 0x01, 0x08, 0xac, 0x02, 0x1a,
            0xc8, 0x01,
        ];
        want.extend_from_slice(&[0xab; 200]);
        assert_eq!(&data(300, &[0xab; 200])[..], &want[..]);
        assert_eq!(
            &close_request(7)[..],
            &[0x00, 0x00, 0x00, 0x00, 0x06, 0x08, 0x02, 0x2a, 0x02, 0x08, 0x07]
        );
        assert_eq!(
            &close_dial(-5)[..],
            &[
                0x00, 0x00, 0x00, 0x00, 0x0f, 0x08, 0x05, 0x3a, 0x0b, 0x08, 0xfb, 0xff, 0xff, 0xff,
                0xff, 0xff, 0xff, 0xff, 0xff, 0x01
            ]
        );
    }

    fn decode_framed(bytes: &[u8]) -> Packet {
        let mut inbox = BytesMut::from(bytes);
        let p = take_packet(&mut inbox).unwrap().unwrap();
        assert!(inbox.is_empty());
        p
    }

    #[test]
    fn server_packets_decode() {
        // Packet::dial_response(-5, 7, "")
        assert_eq!(
            decode_framed(&[
                0x00, 0x00, 0x00, 0x00, 0x11, 0x08, 0x01, 0x1a, 0x0d, 0x10, 0x07, 0x18, 0xfb, 0xff,
                0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01
            ]),
            Packet::DialResponse {
                error: String::new(),
                connect_id: 7,
                random: -5
            }
        );
        // Packet::dial_response(3, 0, "no route: x")
        assert_eq!(
            decode_framed(&[
                0x00, 0x00, 0x00, 0x00, 0x13, 0x08, 0x01, 0x1a, 0x0f, 0x0a, 0x0b, 0x6e, 0x6f, 0x20,
                0x72, 0x6f, 0x75, 0x74, 0x65, 0x3a, 0x20, 0x78, 0x18, 0x03
            ]),
            Packet::DialResponse {
                error: "no route: x".into(),
                connect_id: 0,
                random: 3
            }
        );
        // Packet::data(7, "hi")
        assert_eq!(
            decode_framed(&[
                0x00, 0x00, 0x00, 0x00, 0x0a, 0x08, 0x04, 0x22, 0x06, 0x08, 0x07, 0x1a, 0x02, 0x68,
                0x69
            ]),
            Packet::Data {
                connect_id: 7,
                error: String::new(),
                data: Bytes::from_static(b"hi")
            }
        );
        // Packet::close_response(7, "") and (7, "cut")
        assert_eq!(
            decode_framed(&[0x00, 0x00, 0x00, 0x00, 0x06, 0x08, 0x03, 0x32, 0x02, 0x10, 0x07]),
            Packet::CloseResponse {
                error: String::new(),
                connect_id: 7
            }
        );
        assert_eq!(
            decode_framed(&[
                0x00, 0x00, 0x00, 0x00, 0x0b, 0x08, 0x03, 0x32, 0x07, 0x0a, 0x03, 0x63, 0x75, 0x74,
                0x10, 0x07
            ]),
            Packet::CloseResponse {
                error: "cut".into(),
                connect_id: 7
            }
        );
    }

    #[test]
    fn messages_split_across_frames_are_reassembled() {
        let mut all = BytesMut::new();
        all.extend_from_slice(&data(9, &[1u8; 40_000]));
        all.extend_from_slice(&data(9, b"tail"));
        let bytes = all.freeze();
        let mut inbox = BytesMut::new();
        let mut got = Vec::new();
        for piece in bytes.chunks(16_384) {
            inbox.extend_from_slice(piece);
            while let Some(p) = take_packet(&mut inbox).unwrap() {
                got.push(p);
            }
        }
        assert_eq!(got.len(), 2);
        assert!(
            matches!(&got[0], Packet::Data { connect_id: 9, data, .. } if data.len() == 40_000)
        );
        assert!(matches!(&got[1], Packet::Data { data, .. } if &data[..] == b"tail"));
    }

    #[test]
    fn bad_server_bytes_are_named_errors() {
        let mut compressed = BytesMut::from(&[1u8, 0, 0, 0, 0][..]);
        assert_eq!(
            take_packet(&mut compressed),
            Err(DecodeError::Compressed(1))
        );
        let mut huge = BytesMut::from(&[0u8, 0xff, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            take_packet(&mut huge),
            Err(DecodeError::TooLarge(_))
        ));
        // A length-delimited payload that claims more than is there.
        assert_eq!(
            decode_packet(Bytes::from_static(&[0x08, 0x04, 0x22, 0x09, 0x08])),
            Err(DecodeError::Truncated("length-delimited field"))
        );
        // Wire type 3 (a group): not something a Packet has.
        assert_eq!(
            decode_packet(Bytes::from_static(&[0x0b])),
            Err(DecodeError::WireType(3))
        );
        // A CLOSE_RSP error that is not UTF-8.
        assert_eq!(
            decode_packet(Bytes::from_static(&[
                0x08, 0x03, 0x32, 0x04, 0x0a, 0x02, 0xff, 0xfe
            ])),
            Err(DecodeError::NotUtf8("error"))
        );
    }

    // --- a tunnel against an in-process HTTP/2 server ------------------------

    /// A client packet as the test server reads it: type and the payload's
    /// fields (number, varint or bytes).
    #[derive(Debug)]
    struct Seen {
        packet_type: u64,
        varints: Vec<(u32, u64)>,
        bytes: Vec<(u32, Bytes)>,
    }

    fn parse_client_packet(mut message: Bytes) -> Seen {
        let mut seen = Seen {
            packet_type: 0,
            varints: Vec::new(),
            bytes: Vec::new(),
        };
        let mut payload = Bytes::new();
        while message.has_remaining() {
            match next_field(&mut message).unwrap() {
                (1, Value::Varint(t)) => seen.packet_type = t,
                (_, Value::Len(b)) => payload = b,
                _ => {}
            }
        }
        while payload.has_remaining() {
            match next_field(&mut payload).unwrap() {
                (f, Value::Varint(v)) => seen.varints.push((f, v)),
                (f, Value::Len(b)) => seen.bytes.push((f, b)),
                (_, Value::Skipped) => {}
            }
        }
        seen
    }

    fn varint(seen: &Seen, field: u32) -> i64 {
        seen.varints
            .iter()
            .find(|(f, _)| *f == field)
            .map_or(0, |(_, v)| *v as i64)
    }

    fn server_packet(
        packet_type: u64,
        payload_field: u32,
        ints: &[(u32, i64)],
        strs: &[(u32, &[u8])],
    ) -> Bytes {
        let len: usize = ints
            .iter()
            .map(|&(f, v)| int64_field_len(f, v))
            .sum::<usize>()
            + strs
                .iter()
                .map(|&(f, b)| bytes_field_len(f, b))
                .sum::<usize>();
        frame_packet(packet_type, payload_field, len, |buf| {
            for &(f, b) in strs {
                put_bytes_field(buf, f, b);
            }
            for &(f, v) in ints {
                put_int64_field(buf, f, v);
            }
        })
    }

    /// The request body as client packets.
    struct ServerReader {
        body: RecvStream,
        inbox: BytesMut,
    }

    impl ServerReader {
        async fn next(&mut self) -> Option<Seen> {
            loop {
                if self.inbox.len() >= 5 {
                    let len = u32::from_be_bytes([
                        self.inbox[1],
                        self.inbox[2],
                        self.inbox[3],
                        self.inbox[4],
                    ]) as usize;
                    if self.inbox.len() >= 5 + len {
                        self.inbox.advance(5);
                        return Some(parse_client_packet(self.inbox.split_to(len).freeze()));
                    }
                }
                // The end of the body, or of the connection: no more packets.
                let chunk = self.body.data().await?.ok()?;
                let _ = self.body.flow_control().release_capacity(chunk.len());
                self.inbox.extend_from_slice(&chunk);
            }
        }
    }

    /// Every test of a tunnel is bounded: a missed packet fails it.
    async fn within(test: impl std::future::Future<Output = ()>) {
        tokio::time::timeout(Duration::from_secs(10), test)
            .await
            .expect("the test did not finish within 10 s");
    }

    fn socket_path(name: &str) -> std::path::PathBuf {
        let p =
            std::env::temp_dir().join(format!("ntbench-grpc-{}-{name}.sock", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    /// Serve one connection and one `Proxy` stream: check the request's
    /// shape, read DIAL_REQ and hand the stream to `script`.
    async fn serve_one<F, Fut>(listener: tokio::net::UnixListener, script: F)
    where
        F: FnOnce(i64, ServerReader, SendStream<Bytes>) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let (io, _) = listener.accept().await.unwrap();
        let mut conn = h2::server::handshake(io).await.unwrap();
        let (request, mut respond) = conn.accept().await.unwrap().unwrap();
        let driver = tokio::spawn(async move { while conn.accept().await.is_some() {} });
        assert_eq!(request.method(), http::Method::POST);
        assert_eq!(request.uri().path(), METHOD_PATH);
        assert_eq!(request.headers()["content-type"], "application/grpc");
        assert_eq!(request.headers()["te"], "trailers");
        let response = http::Response::builder()
            .header("content-type", "application/grpc")
            .body(())
            .unwrap();
        let send = respond.send_response(response, false).unwrap();
        let mut reader = ServerReader {
            body: request.into_body(),
            inbox: BytesMut::new(),
        };
        let dial = reader.next().await.unwrap();
        assert_eq!(dial.packet_type, DIAL_REQ);
        assert_eq!(dial.bytes[0], (1, Bytes::from_static(b"tcp")));
        assert_eq!(dial.bytes[1], (2, Bytes::from_static(b"10.0.0.1:9003")));
        script(varint(&dial, 3), reader, send).await;
        driver.abort();
    }

    #[tokio::test]
    async fn a_tunnel_sends_packets_of_at_most_32_kib_and_closes_with_close_req() {
        within(async {
            let path = socket_path("tunnel");
            let listener = tokio::net::UnixListener::bind(&path).unwrap();
            let server = tokio::spawn(serve_one(
                listener,
                |random, mut reader, mut send| async move {
                    send.send_data(
                        server_packet(DIAL_RSP, FIELD_DIAL_RESPONSE, &[(2, 42), (3, random)], &[]),
                        false,
                    )
                    .unwrap();
                    // 100,000 bytes written at once arrive as DATA packets of at most 32 KiB.
                    let mut got = Vec::new();
                    let mut packets = 0;
                    while got.len() < 100_000 {
                        let p = reader.next().await.unwrap();
                        assert_eq!(p.packet_type, DATA);
                        assert_eq!(varint(&p, 1), 42);
                        let data = &p.bytes.iter().find(|(f, _)| *f == 3).unwrap().1;
                        assert!(
                            data.len() <= MAX_WRITE_BYTES,
                            "a DATA packet of {} bytes",
                            data.len()
                        );
                        got.extend_from_slice(data);
                        packets += 1;
                    }
                    assert_eq!(packets, 4);
                    assert!(got.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
                    send.send_data(
                        server_packet(DATA, FIELD_DATA, &[(1, 42)], &[(3, b"pong")]),
                        false,
                    )
                    .unwrap();
                    let close = reader.next().await.unwrap();
                    assert_eq!(close.packet_type, CLOSE_REQ);
                    assert_eq!(varint(&close, 1), 42);
                    send.send_data(
                        server_packet(CLOSE_RSP, FIELD_CLOSE_RESPONSE, &[(2, 42)], &[]),
                        false,
                    )
                    .unwrap();
                    // Hold the stream until the client is done with it.
                    let _ = reader.next().await;
                },
            ));
            let mut conn = GrpcConn::open(&path, "10.0.0.1:9003").await.unwrap();
            let payload: Vec<u8> = (0..100_000).map(|i| (i % 251) as u8).collect();
            tokio::io::AsyncWriteExt::write_all(&mut conn, &payload)
                .await
                .unwrap();
            tokio::io::AsyncWriteExt::flush(&mut conn).await.unwrap();
            let mut pong = [0u8; 4];
            tokio::io::AsyncReadExt::read_exact(&mut conn, &mut pong)
                .await
                .unwrap();
            assert_eq!(&pong, b"pong");
            tokio::io::AsyncWriteExt::shutdown(&mut conn).await.unwrap();
            let mut rest = Vec::new();
            let n = tokio::io::AsyncReadExt::read_to_end(&mut conn, &mut rest)
                .await
                .unwrap();
            assert_eq!(n, 0, "CLOSE_RSP reads as EOF");
            drop(conn);
            server.await.unwrap();
            let _ = std::fs::remove_file(&path);
        })
        .await;
    }

    #[tokio::test]
    async fn a_refused_dial_gives_the_dial_rsp_error_text() {
        within(async {
            let path = socket_path("refused");
            let listener = tokio::net::UnixListener::bind(&path).unwrap();
            let server = tokio::spawn(serve_one(
                listener,
                |random, mut reader, mut send| async move {
                    send.send_data(
                        server_packet(
                            DIAL_RSP,
                            FIELD_DIAL_RESPONSE,
                            &[(3, random)],
                            &[(1, b"denied by policy: x")],
                        ),
                        false,
                    )
                    .unwrap();
                    let _ = reader.next().await;
                },
            ));
            let error = match GrpcConn::open(&path, "10.0.0.1:9003").await {
                Ok(_) => panic!("the dial was refused"),
                Err(e) => e.to_string(),
            };
            assert!(error.contains("denied by policy: x"), "{error}");
            server.await.unwrap();
            let _ = std::fs::remove_file(&path);
        })
        .await;
    }

    #[tokio::test]
    async fn a_close_rsp_with_an_error_is_a_read_error() {
        within(async {
            let path = socket_path("cut");
            let listener = tokio::net::UnixListener::bind(&path).unwrap();
            let server = tokio::spawn(serve_one(
                listener,
                |random, mut reader, mut send| async move {
                    send.send_data(
                        server_packet(DIAL_RSP, FIELD_DIAL_RESPONSE, &[(2, 7), (3, random)], &[]),
                        false,
                    )
                    .unwrap();
                    send.send_data(
                        server_packet(
                            CLOSE_RSP,
                            FIELD_CLOSE_RESPONSE,
                            &[(2, 7)],
                            &[(1, b"session lost")],
                        ),
                        false,
                    )
                    .unwrap();
                    let _ = reader.next().await;
                },
            ));
            let mut conn = GrpcConn::open(&path, "10.0.0.1:9003").await.unwrap();
            let mut buf = [0u8; 16];
            let error = tokio::io::AsyncReadExt::read(&mut conn, &mut buf)
                .await
                .unwrap_err();
            assert!(error.to_string().contains("session lost"), "{error}");
            drop(conn);
            server.await.unwrap();
            let _ = std::fs::remove_file(&path);
        })
        .await;
    }

    #[test]
    fn unknown_fields_and_types_are_ignored() {
        // DRAIN (type 6, empty Drain payload) and an unknown field 15.
        assert_eq!(
            decode_packet(Bytes::from_static(&[0x08, 0x06, 0x42, 0x00, 0x78, 0x01])),
            Ok(Packet::Other { packet_type: 6 })
        );
    }
}
