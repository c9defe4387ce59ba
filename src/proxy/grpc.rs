//! The gRPC front door: kube-apiserver's `GRPC` egress mode (the
//! konnectivity `ProxyService`) over a Unix socket.
//!
//! Each accepted connection is cleartext HTTP/2 (h2c) served by hyper;
//! each `POST /ProxyService/Proxy` request is one bidirectional stream of
//! [`Packet`]s (messages in `grpc_proto`), run by one task that the
//! connection's task owns, so that the end of the connection (or its abort
//! at the drain deadline) ends every stream and every tunnel it carried.
//!
//! # Packets
//!
//! - `DIAL_REQ{protocol, address, random}`: `address` is parsed as a
//!   `CONNECT` target is ([`parse_connect_target`]) and dialled through the
//!   same [`Context::dial`] (router, policy, limits, dial timeout, metrics).
//!   The answer is a `DIAL_RSP` with the same `random`: on success a
//!   non-zero `connectID` unique for the life of the process, on refusal
//!   `error` = the refusal's text, as an HTTP CONNECT refusal's body says it
//!   ("denied by policy: ...", "no route: ...", "node unavailable: ...",
//!   "channel open to ... timed out ...").
//! - `DATA{connectID, data}` both ways. Towards the client a packet carries
//!   at most [`MAX_DATA_BYTES`].
//! - `CLOSE_REQ{connectID}`: the channel is closed (EOF, then CLOSE) and
//!   `CLOSE_RSP{connectID}` answers. A `CLOSE_REQ` for an unknown
//!   connection is answered with a `CLOSE_RSP` whose `error` says so, so
//!   that the client does not wait for nothing.
//! - The node's EOF or close ends the connection with `CLOSE_RSP` (the
//!   protocol has no half-close); a stream cut under it (its SSH session
//!   lost) with `CLOSE_RSP` whose `error` says why.
//! - `DIAL_CLS{random}`: the pending dial is cancelled. The dial itself runs
//!   to its end (it is bounded by the dial timeout) in a task of its own;
//!   if it succeeds anyway, its stream is dropped at once, which closes the
//!   channel: no channel is left behind (a known Konnectivity race).
//! - `DRAIN`, `DIAL_RSP`, `CLOSE_RSP` from a client, and `DATA` for a
//!   connection that is already closed, are ignored.
//!
//! Several dials may share one stream (konnectivity-client's reusable
//! tunnel); kube-apiserver opens one connection and one stream per dial
//! (its single-use tunnel). The end of a stream, or of its connection,
//! closes every tunnel the stream carried.
//!
//! # Flow control and memory
//!
//! Nothing is buffered without bound. Towards the client, a connection's
//! task reads at most [`MAX_DATA_BYTES`] from its tunnel and waits for room
//! in the stream's queue of [`OUT_QUEUE`] packets, which hyper drains only
//! as HTTP/2 flow control lets it send: a client that stops reading stops
//! the reads of the tunnels of its own stream, so their SSH channels'
//! windows are no longer re-opened, and nothing else (the session, other
//! streams, other connections) is slowed. From the client, the stream task
//! reads the request body only as each connection's queue of
//! [`UPLOAD_QUEUE`] packets has room, and HTTP/2 flow control (a
//! [`STREAM_WINDOW`] per stream) stops the client beyond that.
//!
//! # Limits
//!
//! A Unix socket connection takes a slot of `proxy.max_connections` like
//! any other client connection (beyond it, every request is answered with
//! `RESOURCE_EXHAUSTED`); each open tunnel also takes one of
//! `max_connections` slots of its own (so a reusable stream cannot carry
//! more tunnels than a fleet of single-use ones could). A connection may
//! carry [`MAX_STREAMS`] streams at once and stays open without any stream
//! for at most `header_read_timeout` (this also bounds the HTTP/2
//! handshake and the first request).
//!
//! # Drain
//!
//! On shutdown the connection sends GOAWAY (no new streams); new
//! `DIAL_REQ`s are answered with `DIAL_RSP{error: "shutting down"}`; open
//! tunnels go on until they end or the drain deadline aborts the
//! connection; a stream with nothing open left ends with `UNAVAILABLE`.
//!
//! # Metrics
//!
//! A dial's outcome is counted by [`Context::dial`] (stream opens, policy
//! denials); the answer in `nodetunnel_proxy_requests_total{listener="grpc",
//! code}` with `code` one of `dial_ok`, `dial_error` (a refused dial),
//! `bad_request` (a protocol other than tcp, an address that is not
//! `host:port`, a `random` already pending), `draining`, `overflow`
//! (beyond `max_connections`), `dial_cancelled` (`DIAL_CLS`) and
//! `unimplemented` (another method).

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Either, Empty};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::field::Empty as EmptyField;
use tracing::{Instrument, Span};

use super::audit_trail::{cut_end, Asker, OpenTunnel};
use super::grpc_proto::{
    CloseDial, CloseRequest, Data, DialRequest, MessageDecoder, Packet, Payload, PROXY_METHOD_PATH,
};
use super::relay::ClientIo;
use super::{conn_span, parse_connect_target, Context, ListenerKind};
use crate::audit::End;
use crate::dial::{Destination, DialError, Dialer};

/// Most bytes in one `DATA` packet towards the client.
pub const MAX_DATA_BYTES: usize = 32 * 1024;
/// Packets queued towards the client per stream (beyond them, the
/// connections of the stream wait).
pub const OUT_QUEUE: usize = 4;
/// `DATA` packets from the client queued per connection (beyond them, the
/// stream stops reading the client).
pub const UPLOAD_QUEUE: usize = 8;
/// Streams one HTTP/2 connection may carry at once.
pub const MAX_STREAMS: u32 = 64;
/// HTTP/2 receive window of a stream: what a client may send before the
/// stream task reads it.
pub const STREAM_WINDOW: u32 = 256 * 1024;
/// HTTP/2 receive window of a connection.
const CONNECTION_WINDOW: u32 = 1024 * 1024;
/// Largest header list a client may send.
const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
/// Bytes hyper may hold per stream towards the client beyond the queue.
const MAX_SEND_BUFFER: usize = 2 * MAX_DATA_BYTES;
/// Bound on closing a tunnel's write side when the client closes it.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// gRPC status codes used here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GrpcStatus {
    Ok = 0,
    ResourceExhausted = 8,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
}

static NEXT_CONNECT_ID: AtomicI64 = AtomicI64::new(1);

/// A connectID never handed out before in this process (never 0).
fn next_connect_id() -> i64 {
    NEXT_CONNECT_ID.fetch_add(1, Ordering::Relaxed)
}

/// The body of a `Proxy` response: the frames the stream task queues.
struct OutBody {
    rx: mpsc::Receiver<Frame<Bytes>>,
}

impl http_body::Body for OutBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|frame| frame.map(Ok))
    }
}

type ResponseBody = Either<Empty<Bytes>, OutBody>;

/// The sending side of a stream's response.
#[derive(Clone)]
struct PacketSender(mpsc::Sender<Frame<Bytes>>);

/// The client's side of the stream is gone.
#[derive(Debug)]
struct Gone;

impl PacketSender {
    async fn send(&self, packet: Packet) -> Result<(), Gone> {
        self.0
            .send(Frame::data(packet.to_grpc_frame()))
            .await
            .map_err(|_| Gone)
    }

    /// End the response with `grpc-status` (and `grpc-message`).
    async fn finish(&self, status: GrpcStatus, message: &str) {
        let _ = self
            .0
            .send(Frame::trailers(status_headers(status, message)))
            .await;
    }
}

/// `grpc-status` and, if not empty, `grpc-message` (percent-encoded as
/// gRPC requires).
fn status_headers(status: GrpcStatus, message: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("grpc-status", HeaderValue::from(status as u16));
    if !message.is_empty() {
        let mut encoded = String::with_capacity(message.len());
        for byte in message.bytes() {
            if (0x20..0x7f).contains(&byte) && byte != b'%' {
                encoded.push(byte as char);
            } else {
                encoded.push_str(&format!("%{byte:02X}"));
            }
        }
        if let Ok(value) = HeaderValue::from_str(&encoded) {
            headers.insert("grpc-message", value);
        }
    }
    headers
}

fn grpc_response(body: ResponseBody) -> Response<ResponseBody> {
    let mut response = Response::new(body);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    response
}

/// A response that is only headers: the status, no message.
fn trailers_only(status: GrpcStatus, message: &str) -> Response<ResponseBody> {
    let mut response = grpc_response(Either::Left(Empty::new()));
    response
        .headers_mut()
        .extend(status_headers(status, message));
    response
}

fn http_error(status: StatusCode) -> Response<ResponseBody> {
    let mut response = Response::new(Either::Left(Empty::new()));
    *response.status_mut() = status;
    response
}

/// A `Proxy` request accepted by hyper, for the connection's task to run.
struct NewStream {
    body: Incoming,
    out: PacketSender,
}

/// Serve one Unix socket connection: HTTP/2, `Proxy` streams.
/// `admitted` false means over `max_connections`: every request gets
/// `RESOURCE_EXHAUSTED`. `dials` bounds the open tunnels.
pub(crate) async fn serve<I, D>(
    io: I,
    ctx: &Arc<Context<D>>,
    admitted: bool,
    dials: Arc<Semaphore>,
    asker: Asker,
) where
    I: ClientIo,
    D: Dialer,
{
    let (streams_tx, mut streams_rx) = mpsc::channel::<NewStream>(MAX_STREAMS as usize);
    let service = {
        let metrics = ctx.metrics.clone();
        service_fn(move |req: Request<Incoming>| {
            let response = route(req, admitted, &streams_tx, &metrics);
            async move { Ok::<_, Infallible>(response) }
        })
    };
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST_BYTES)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_send_buf_size(MAX_SEND_BUFFER);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let mut streams = JoinSet::new();
    let idle = tokio::time::sleep(ctx.header_read_timeout);
    let mut idle = std::pin::pin!(idle);
    let mut idle_closed = false;
    let mut shutting_down = false;
    loop {
        tokio::select! {
            served = conn.as_mut() => {
                if let Err(error) = served {
                    tracing::debug!(error = %error, "HTTP/2 connection error");
                }
                break;
            }
            Some(new) = streams_rx.recv() => {
                let stream = run_stream(new, ctx.clone(), dials.clone(), asker.clone());
                streams.spawn(stream.instrument(Span::current()));
            }
            Some(_) = streams.join_next(), if !streams.is_empty() => {
                if streams.is_empty() {
                    idle.as_mut().reset(tokio::time::Instant::now() + ctx.header_read_timeout);
                }
            }
            () = idle.as_mut(), if streams.is_empty() && !idle_closed => {
                tracing::debug!("no gRPC stream within header_read_timeout: closing");
                idle_closed = true;
                conn.as_mut().graceful_shutdown();
            }
            () = ctx.shutdown.wait(), if !shutting_down => {
                shutting_down = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
    // The connection is gone: whatever a stream still carried is closed.
    streams.shutdown().await;
}

/// Answer a request: the `Proxy` method gets a streaming response and its
/// stream is handed to the connection's task; anything else an error.
fn route(
    req: Request<Incoming>,
    admitted: bool,
    streams: &mpsc::Sender<NewStream>,
    metrics: &crate::metrics::Metrics,
) -> Response<ResponseBody> {
    let label = ListenerKind::Grpc.as_str();
    if req.method() != Method::POST {
        return http_error(StatusCode::METHOD_NOT_ALLOWED);
    }
    let is_grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if !is_grpc {
        return http_error(StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }
    if req.uri().path() != PROXY_METHOD_PATH {
        metrics.proxy_request(label, "unimplemented");
        tracing::info!(path = req.uri().path(), "unknown gRPC method");
        return trailers_only(
            GrpcStatus::Unimplemented,
            &format!(
                "unknown method {}: nodetunnel serves {PROXY_METHOD_PATH}",
                req.uri().path()
            ),
        );
    }
    if !admitted {
        metrics.proxy_request(label, "overflow");
        tracing::warn!("max_connections reached: RESOURCE_EXHAUSTED");
        return trailers_only(
            GrpcStatus::ResourceExhausted,
            "too many connections (proxy.max_connections)",
        );
    }
    let (tx, rx) = mpsc::channel(OUT_QUEUE);
    let new = NewStream {
        body: req.into_body(),
        out: PacketSender(tx),
    };
    if streams.try_send(new).is_err() {
        return trailers_only(GrpcStatus::Unavailable, "connection is closing");
    }
    grpc_response(Either::Right(OutBody { rx }))
}

/// A dial that finished, for its stream's task.
struct DialDone<S> {
    random: i64,
    dest: Destination,
    started: std::time::Instant,
    result: Result<S, DialError>,
    permit: OwnedSemaphorePermit,
    span: Span,
}

/// One `Proxy` stream: its pending dials and open tunnels.
struct ProxyStream<D: Dialer> {
    ctx: Arc<Context<D>>,
    dials: Arc<Semaphore>,
    out: PacketSender,
    /// Pending dials by `random`, with their span.
    pending: HashMap<i64, Span>,
    /// Open tunnels by connectID: the queue of the client's bytes.
    open: HashMap<i64, mpsc::Sender<Bytes>>,
    tunnels: JoinSet<i64>,
    dialed_tx: mpsc::Sender<DialDone<D::Stream>>,
    draining: bool,
    /// The connection's client, for audit records.
    asker: Asker,
}

/// Why a stream ends.
enum StreamEnd {
    /// The client ended its side.
    ClientDone,
    /// The client's side broke (connection reset, stream reset).
    ClientGone(String),
    /// The client sent something that is not a `Packet` stream.
    Protocol(String),
    /// Shutting down and nothing is left open.
    Drained,
}

async fn run_stream<D: Dialer>(
    new: NewStream,
    ctx: Arc<Context<D>>,
    dials: Arc<Semaphore>,
    asker: Asker,
) {
    let NewStream { mut body, out } = new;
    let (dialed_tx, mut dialed_rx) = mpsc::channel(MAX_STREAMS as usize);
    let mut stream = ProxyStream {
        ctx: ctx.clone(),
        dials,
        out: out.clone(),
        pending: HashMap::new(),
        open: HashMap::new(),
        tunnels: JoinSet::new(),
        dialed_tx,
        draining: ctx.shutdown.is_triggered(),
        asker,
    };
    let mut decoder = MessageDecoder::default();
    let end = loop {
        if stream.draining && stream.tunnels.is_empty() && stream.pending.is_empty() {
            break StreamEnd::Drained;
        }
        tokio::select! {
            frame = body.frame() => match frame {
                None => match decoder.finish() {
                    Ok(()) => break StreamEnd::ClientDone,
                    Err(e) => break StreamEnd::Protocol(e.to_string()),
                },
                Some(Err(error)) => break StreamEnd::ClientGone(error.to_string()),
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else { continue };
                    decoder.push(&data);
                    let mut failed = None;
                    loop {
                        match decoder.next_packet() {
                            Ok(Some(packet)) => {
                                if stream.on_packet(packet).await.is_err() {
                                    failed = Some(StreamEnd::ClientGone("response closed".into()));
                                    break;
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                failed = Some(StreamEnd::Protocol(e.to_string()));
                                break;
                            }
                        }
                    }
                    if let Some(end) = failed {
                        break end;
                    }
                }
            },
            Some(done) = dialed_rx.recv() => {
                if stream.on_dialed(done).await.is_err() {
                    break StreamEnd::ClientGone("response closed".into());
                }
            }
            Some(joined) = stream.tunnels.join_next(), if !stream.tunnels.is_empty() => {
                if let Ok(connect_id) = joined {
                    stream.open.remove(&connect_id);
                }
            }
            () = ctx.shutdown.wait(), if !stream.draining => stream.draining = true,
        }
    };
    // Every tunnel of the stream ends with it (dropping a tunnel closes
    // its channel); dials still pending drop their stream when they end.
    stream.tunnels.shutdown().await;
    let carried = stream.open.len() + stream.pending.len();
    match end {
        StreamEnd::ClientDone => {
            tracing::debug!(closed = carried, "gRPC stream ended by the client");
            out.finish(GrpcStatus::Ok, "").await;
        }
        StreamEnd::ClientGone(reason) => {
            tracing::debug!(closed = carried, reason = %reason, "gRPC stream broken by the client");
        }
        StreamEnd::Protocol(reason) => {
            ctx.metrics
                .proxy_request(ListenerKind::Grpc.as_str(), "bad_request");
            tracing::info!(closed = carried, reason = %reason, "gRPC stream refused: protocol error");
            let status = if reason.contains("exceeds") {
                GrpcStatus::ResourceExhausted
            } else if reason.contains("compressed") {
                GrpcStatus::Unimplemented
            } else {
                GrpcStatus::Internal
            };
            out.finish(status, &reason).await;
        }
        StreamEnd::Drained => {
            out.finish(GrpcStatus::Unavailable, "nodetunnel is shutting down")
                .await;
        }
    }
}

impl<D: Dialer> ProxyStream<D> {
    fn count(&self, code: &str) {
        self.ctx
            .metrics
            .proxy_request(ListenerKind::Grpc.as_str(), code);
    }

    async fn on_packet(&mut self, packet: Packet) -> Result<(), Gone> {
        match packet.payload {
            Some(Payload::DialRequest(req)) => self.on_dial_request(req).await,
            Some(Payload::CloseDial(CloseDial { random })) => {
                if let Some(span) = self.pending.remove(&random) {
                    self.count("dial_cancelled");
                    span.in_scope(|| tracing::debug!("dial cancelled by the client (DIAL_CLS)"));
                }
                Ok(())
            }
            Some(Payload::Data(Data {
                connect_id, data, ..
            })) => {
                match self.open.get(&connect_id) {
                    // A tunnel that ended meanwhile: its bytes go nowhere.
                    Some(queue) => {
                        let _ = queue.send(data).await;
                    }
                    None => tracing::debug!(connect_id, "DATA for a closed connection ignored"),
                }
                Ok(())
            }
            Some(Payload::CloseRequest(CloseRequest { connect_id })) => {
                // Dropping the queue tells the tunnel's task to close; it
                // answers CLOSE_RSP itself, after its last DATA.
                if self.open.remove(&connect_id).is_none() {
                    self.out
                        .send(Packet::close_response(
                            connect_id,
                            format!("unknown connectID {connect_id}"),
                        ))
                        .await?;
                }
                Ok(())
            }
            _ => {
                tracing::debug!(packet_type = packet.r#type, "packet ignored");
                Ok(())
            }
        }
    }

    async fn refuse_dial(
        &self,
        random: i64,
        code: &str,
        refusal: (&'static str, Option<&Destination>),
        error: String,
    ) -> Result<(), Gone> {
        self.count(code);
        let (result, dest) = refusal;
        self.asker
            .refusal(&self.ctx.audit, dest, result, std::time::Instant::now());
        self.out.send(Packet::dial_response(random, 0, error)).await
    }

    async fn on_dial_request(&mut self, req: DialRequest) -> Result<(), Gone> {
        let DialRequest {
            protocol,
            address,
            random,
        } = req;
        let started = std::time::Instant::now();
        let span = tracing::error_span!(
            "tunnel",
            random,
            connect_id = EmptyField,
            dest = EmptyField,
            node = EmptyField,
            stream = EmptyField
        );
        if self.draining {
            span.in_scope(|| tracing::info!("dial refused: shutting down"));
            return self
                .refuse_dial(
                    random,
                    "draining",
                    (DialError::ShuttingDown.reason(), None),
                    DialError::ShuttingDown.to_string(),
                )
                .await;
        }
        if protocol != "tcp" {
            span.in_scope(|| tracing::info!(protocol = %protocol, "dial refused: not tcp"));
            return self
                .refuse_dial(
                    random,
                    "bad_request",
                    ("bad_request", None),
                    format!("unsupported protocol {protocol:?}: only \"tcp\" is served"),
                )
                .await;
        }
        let dest = match parse_connect_target(&address) {
            Ok(dest) => dest,
            Err(error) => {
                span.in_scope(|| tracing::info!(address = ?address, error = %error, "dial refused: bad address"));
                return self
                    .refuse_dial(
                        random,
                        "bad_request",
                        ("bad_request", None),
                        format!("invalid address {address:?}: {error}"),
                    )
                    .await;
            }
        };
        if self.pending.contains_key(&random) {
            return self
                .refuse_dial(
                    random,
                    "bad_request",
                    ("bad_request", Some(&dest)),
                    format!("a dial with random {random} is already pending on this stream"),
                )
                .await;
        }
        let Ok(permit) = self.dials.clone().try_acquire_owned() else {
            self.ctx.log_refusal("overflow", || {
                span.in_scope(|| tracing::warn!("max_connections reached: dial refused"));
            });
            return self
                .refuse_dial(
                    random,
                    "overflow",
                    ("max_connections", Some(&dest)),
                    "too many connections (proxy.max_connections)".to_string(),
                )
                .await;
        };
        self.pending.insert(random, span.clone());
        let ctx = self.ctx.clone();
        let dialed = self.dialed_tx.clone();
        let task_span = span.clone();
        // Not owned by the stream: a dial runs to its (bounded) end, so
        // that a stream it delivers to no one is dropped, closing its
        // channel, rather than abandoned half-open.
        tokio::spawn(
            async move {
                conn_span::record_dest(&dest);
                let result = ctx.dial(&dest).await;
                let done = DialDone {
                    random,
                    dest,
                    started,
                    result,
                    permit,
                    span: task_span,
                };
                if let Err(mpsc::error::SendError(done)) = dialed.send(done).await {
                    if done.result.is_ok() {
                        tracing::debug!("stream gone before the dial completed: channel closed");
                    }
                }
            }
            .instrument(span),
        );
        Ok(())
    }

    async fn on_dialed(&mut self, done: DialDone<D::Stream>) -> Result<(), Gone> {
        let DialDone {
            random,
            dest,
            started,
            result,
            permit,
            span,
        } = done;
        if self.pending.remove(&random).is_none() {
            // Cancelled by DIAL_CLS: a stream that opened anyway is closed.
            if result.is_ok() {
                span.in_scope(|| tracing::debug!("dial completed after DIAL_CLS: channel closed"));
            }
            return Ok(());
        }
        match result {
            Ok(tunnel) => {
                let connect_id = next_connect_id();
                span.record("connect_id", connect_id);
                span.in_scope(|| conn_span::record_tunnel(&tunnel));
                let audit = self
                    .asker
                    .open_tunnel(&self.ctx.audit, &dest, &tunnel)
                    .aborted_unless_draining(self.ctx.shutdown.clone());
                self.count("dial_ok");
                self.out
                    .send(Packet::dial_response(random, connect_id, String::new()))
                    .await?;
                span.in_scope(|| tracing::debug!("tunnel open"));
                let (queue, uploads) = mpsc::channel(UPLOAD_QUEUE);
                self.open.insert(connect_id, queue);
                let out = self.out.clone();
                self.tunnels.spawn(
                    async move {
                        run_tunnel(connect_id, tunnel, uploads, out, audit).await;
                        drop(permit);
                        connect_id
                    }
                    .instrument(span),
                );
                Ok(())
            }
            Err(error) => {
                self.count("dial_error");
                self.asker
                    .dial_refusal(&self.ctx.audit, &dest, &error, started);
                span.in_scope(|| {
                    conn_span::record_refusal(&error);
                    self.ctx.log_refusal(error.reason(), || {
                        tracing::info!(error = %error, "gRPC dial refused");
                    });
                });
                self.out
                    .send(Packet::dial_response(random, 0, error.to_string()))
                    .await
            }
        }
    }
}

/// How a tunnel ended.
enum TunnelEnd {
    /// The node closed (EOF).
    NodeClosed,
    /// The client sent CLOSE_REQ (or its stream is ending).
    ClientClosed,
    /// The tunnel broke: cut under it, or an I/O error.
    Failed(String),
    /// The client no longer reads the stream.
    ClientGone,
}

/// Splice one tunnel with its connection's packets until either side ends
/// it; then close the tunnel and answer `CLOSE_RSP`.
async fn run_tunnel<S: crate::dial::TunnelIo>(
    connect_id: i64,
    tunnel: S,
    mut uploads: mpsc::Receiver<Bytes>,
    out: PacketSender,
    mut audit: OpenTunnel,
) {
    // Counted into the audit record per packet, each way into its own
    // count: what got through is there however the tunnel ends, also when
    // this task is aborted with its stream.
    let crate::splice::Spliced {
        client_to_tunnel: to_node,
        tunnel_to_client: from_node,
    } = audit.moved();
    let cut = tunnel.cut();
    let (mut reader, mut writer) = tokio::io::split(tunnel);
    let down = async {
        loop {
            let mut buf = BytesMut::with_capacity(MAX_DATA_BYTES);
            match reader.read_buf(&mut buf).await {
                Ok(0) => return TunnelEnd::NodeClosed,
                Ok(n) => {
                    *from_node += n as u64;
                    if out
                        .send(Packet::data(connect_id, buf.freeze()))
                        .await
                        .is_err()
                    {
                        return TunnelEnd::ClientGone;
                    }
                }
                Err(error) => return TunnelEnd::Failed(error.to_string()),
            }
        }
    };
    let up = async {
        while let Some(data) = uploads.recv().await {
            if let Err(error) = writer.write_all(&data).await {
                return Err(TunnelEnd::Failed(error.to_string()));
            }
            *to_node += data.len() as u64;
        }
        Ok(())
    };
    let end = tokio::select! {
        end = down => end,
        closed = up => match closed {
            Ok(()) => TunnelEnd::ClientClosed,
            Err(end) => end,
        },
        reason = cut => TunnelEnd::Failed(reason),
    };
    if matches!(end, TunnelEnd::ClientClosed | TunnelEnd::NodeClosed) {
        // As OpenSSH closes: EOF first, then the channel's CLOSE.
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, writer.shutdown()).await;
    }
    if matches!(end, TunnelEnd::ClientClosed) {
        // The client is answered at once. Then, as OpenSSH closes a
        // channel, the node's side is read to its EOF (bounded, discarded:
        // the client asked for no more) before the channel is dropped: a
        // CLOSE sent right behind our EOF made sshd's next small reply on
        // the session wait for a delayed ACK, 40 ms on about 1% of the
        // opens that followed (docs/benchmarks.md, the gRPC rows). That
        // read runs on its own, bounded by CLOSE_TIMEOUT: kube-apiserver
        // ends the whole connection as soon as it has the CLOSE_RSP, which
        // ends this task.
        let _ = out
            .send(Packet::close_response(connect_id, String::new()))
            .await;
        let mut tunnel = reader.unsplit(writer);
        let reset = tunnel.reset_label();
        audit.ended(End::ClientClose, reset);
        drop(audit);
        tracing::debug!("tunnel closed by the client");
        tokio::spawn(async move {
            let mut discard = [0u8; 8 * 1024];
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
                while let Ok(n) = tunnel.read(&mut discard).await {
                    if n == 0 {
                        break;
                    }
                }
            })
            .await;
        });
        return;
    }
    let tunnel = reader.unsplit(writer);
    let reset = tunnel.reset_label();
    drop(tunnel);
    audit.ended(
        match &end {
            TunnelEnd::NodeClosed => End::NodeClose,
            TunnelEnd::ClientClosed => End::ClientClose,
            TunnelEnd::Failed(_) => cut_end(reset),
            TunnelEnd::ClientGone => End::ClientError,
        },
        reset,
    );
    drop(audit);
    let error = match end {
        TunnelEnd::NodeClosed => {
            tracing::debug!("tunnel closed by the node");
            String::new()
        }
        // Answered above.
        TunnelEnd::ClientClosed => return,
        TunnelEnd::Failed(reason) => {
            tracing::info!(reason = %reason, "tunnel cut");
            reason
        }
        TunnelEnd::ClientGone => return,
    };
    let _ = out.send(Packet::close_response(connect_id, error)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_messages_are_percent_encoded() {
        let headers = status_headers(GrpcStatus::Unavailable, "50% down\nnode é");
        assert_eq!(headers["grpc-status"], "14");
        assert_eq!(headers["grpc-message"], "50%25 down%0Anode %C3%A9");
        assert!(!status_headers(GrpcStatus::Ok, "").contains_key("grpc-message"));
    }

    #[test]
    fn connect_ids_are_non_zero_and_distinct() {
        let a = next_connect_id();
        let b = next_connect_id();
        assert!(a > 0 && b > a);
    }
}
