//! A stream multiplexed over a node's SSH session: one direct-tcpip channel
//! seen as `AsyncRead + AsyncWrite`, isolated from its siblings.
//!
//! # Head-of-line isolation and flow control
//!
//! russh runs one task per session and hands each channel's messages to a
//! bounded queue; if a queue fills, that task waits, and every channel of
//! the session stalls. Two things keep that from happening here:
//!
//! - Each channel gets a small pump task that takes every message off
//!   russh's queue as soon as it arrives and parks the bytes in the stream's
//!   own buffer, so the session task never waits on a slow consumer.
//! - The channel's receive window is re-opened only when our consumer has
//!   read the bytes (the vendored russh's `adjust_window_on_consume`, see
//!   `vendor/russh/PATCHES.md`), not on arrival. So the node may have at
//!   most one window (`ssh.window_size`) of unread data in flight per
//!   stream: a consumer that reads slowly slows its own sender, exactly as
//!   with OpenSSH, and loses nothing; a consumer that stops reading stops
//!   only its own stream.
//!
//! A stream's buffer therefore never holds more than one window. A node that
//! sends beyond the window it was granted breaks the protocol: that stream
//! is reset ([`StreamResetReason::WindowExceeded`]) and counted. Memory
//! bound: `window_size` x open streams.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes};
use russh::client::Msg;
use russh::{ChannelMsg, ChannelReadHalf, ChannelWriteHalf};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

use crate::metrics::Metrics;

static NEXT_STREAM_ID: AtomicU64 = AtomicU64::new(1);

/// Buffering bounds of streams.
#[derive(Debug)]
pub struct StreamLimits {
    /// Bytes one stream may hold for its consumer: the receive window plus
    /// one packet of slack. More means the node ignored flow control.
    pub stream_buffer: usize,
    /// Bytes held right now by all streams.
    pub in_use: AtomicUsize,
    /// Above this many bytes held, new streams are refused.
    pub max_in_use: usize,
}

impl StreamLimits {
    /// Limits for streams whose receive window is `window` bytes, refusing
    /// new streams while more than `max_in_use` bytes wait for readers.
    pub fn new(window: usize, max_in_use: usize) -> Self {
        StreamLimits {
            stream_buffer: window + 64 * 1024,
            in_use: AtomicUsize::new(0),
            max_in_use,
        }
    }

    /// Whether buffered bytes are over the budget.
    pub fn over_budget(&self) -> bool {
        self.in_use.load(Ordering::Acquire) > self.max_in_use
    }
}

/// Why nodetunnel cut a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamResetReason {
    /// The node sent more than the window it was granted.
    WindowExceeded,
    /// The SSH session carrying the stream ended.
    SessionLost,
}

impl StreamResetReason {
    /// Stable label for `nodetunnel_stream_resets_total{reason}`.
    pub fn label(self) -> &'static str {
        match self {
            StreamResetReason::WindowExceeded => "window_exceeded",
            StreamResetReason::SessionLost => "session_lost",
        }
    }
}

/// Per-node byte and stream counters, shared by the node's streams.
#[derive(Debug, Default)]
pub struct StreamCounters {
    /// Streams open now.
    pub open: AtomicUsize,
    /// Streams opened since start.
    pub opened: AtomicU64,
    /// Bytes written towards the node.
    pub bytes_to_node: AtomicU64,
    /// Bytes read from the node.
    pub bytes_from_node: AtomicU64,
    /// Streams reset by nodetunnel.
    pub resets: AtomicU64,
    /// Notified whenever the last open stream closes.
    pub drained: Notify,
}

struct Inbound {
    queue: VecDeque<Bytes>,
    buffered: usize,
    eof: bool,
    reset: Option<(StreamResetReason, String)>,
    waker: Option<Waker>,
}

struct Shared {
    inbound: Mutex<Inbound>,
    consumer_gone: AtomicBool,
    consumer_dropped: Notify,
    /// Bytes the consumer read that the pump has not yet reported to the
    /// session (which re-opens the window by as much).
    unreported: AtomicUsize,
    consumed: Notify,
    /// Fired (all waiters, and a flag for late ones) when the stream is reset.
    cut: Notify,
    cut_fired: AtomicBool,
}

impl Shared {
    fn wake(inbound: &mut Inbound) {
        if let Some(w) = inbound.waker.take() {
            w.wake();
        }
    }
}

/// Decrements counters when the stream goes away, however it goes.
struct OpenGuard {
    node_counters: Arc<StreamCounters>,
    session_streams: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        if self.node_counters.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.node_counters.drained.notify_waiters();
        }
        self.session_streams.fetch_sub(1, Ordering::AcqRel);
        self.metrics.streams_open.dec();
    }
}

/// Reserves a stream slot on a node and a session before the channel opens;
/// dropping it (failed open) releases both.
pub struct StreamSlot {
    guard: OpenGuard,
}

impl StreamSlot {
    /// Take a slot unless the node already has `max` streams open.
    pub fn try_take(
        node_counters: Arc<StreamCounters>,
        max: usize,
        session_streams: Arc<AtomicUsize>,
        metrics: Arc<Metrics>,
    ) -> Option<StreamSlot> {
        if node_counters.open.fetch_add(1, Ordering::AcqRel) >= max {
            if node_counters.open.fetch_sub(1, Ordering::AcqRel) == 1 {
                node_counters.drained.notify_waiters();
            }
            return None;
        }
        session_streams.fetch_add(1, Ordering::AcqRel);
        metrics.streams_open.inc();
        Some(StreamSlot {
            guard: OpenGuard {
                node_counters,
                session_streams,
                metrics,
            },
        })
    }
}

/// One tunnelled TCP stream. Reading gives the bytes the node's destination
/// sent; writing sends towards it; `shutdown` sends EOF (a half-close);
/// dropping closes the channel.
pub struct TunnelStream {
    id: u64,
    node: Arc<str>,
    shared: Arc<Shared>,
    tx: Pin<Box<dyn AsyncWrite + Send + Sync>>,
    limits: Arc<StreamLimits>,
    _guard: OpenGuard,
}

impl std::fmt::Debug for TunnelStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelStream")
            .field("id", &self.id)
            .field("node", &self.node)
            .finish()
    }
}

impl TunnelStream {
    /// Wrap an open channel; spawns its pump task.
    pub fn new(
        node: Arc<str>,
        channel: russh::Channel<Msg>,
        slot: StreamSlot,
        limits: Arc<StreamLimits>,
    ) -> TunnelStream {
        let id = NEXT_STREAM_ID.fetch_add(1, Ordering::Relaxed);
        let guard = slot.guard;
        guard.node_counters.opened.fetch_add(1, Ordering::Relaxed);
        let (read, write) = channel.split();
        let tx = Box::pin(write.make_writer());
        let shared = Arc::new(Shared {
            inbound: Mutex::new(Inbound {
                queue: VecDeque::new(),
                buffered: 0,
                eof: false,
                reset: None,
                waker: None,
            }),
            consumer_gone: AtomicBool::new(false),
            consumer_dropped: Notify::new(),
            unreported: AtomicUsize::new(0),
            consumed: Notify::new(),
            cut: Notify::new(),
            cut_fired: AtomicBool::new(false),
        });
        let pump = Pump {
            id,
            node: node.clone(),
            shared: shared.clone(),
            limits: limits.clone(),
            counters: guard.node_counters.clone(),
            metrics: guard.metrics.clone(),
        };
        tokio::spawn(pump.run(read, write));
        TunnelStream {
            id,
            node,
            shared,
            tx,
            limits,
            _guard: guard,
        }
    }

    /// Process-unique stream id (the `stream` field of log lines).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The node carrying the stream.
    pub fn node(&self) -> &str {
        &self.node
    }
}

impl crate::dial::TunnelIo for TunnelStream {
    fn cut(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = String> + Send + 'static>> {
        let shared = self.shared.clone();
        Box::pin(async move {
            loop {
                let notified = shared.cut.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if shared.cut_fired.load(Ordering::Acquire) {
                    let reason = shared
                        .inbound
                        .lock()
                        .ok()
                        .and_then(|i| i.reset.as_ref().map(|(_, m)| m.clone()));
                    return reason.unwrap_or_else(|| "stream reset".into());
                }
                notified.await;
            }
        })
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Ok(mut inbound) = this.shared.inbound.lock() else {
            return Poll::Ready(Err(io::Error::other("stream state poisoned")));
        };
        let mut taken = 0;
        while buf.remaining() > 0 {
            let Some(front) = inbound.queue.front_mut() else {
                break;
            };
            let n = front.len().min(buf.remaining());
            buf.put_slice(&front[..n]);
            front.advance(n);
            if front.is_empty() {
                inbound.queue.pop_front();
            }
            taken += n;
        }
        if taken > 0 {
            inbound.buffered -= taken;
            drop(inbound);
            this.limits.in_use.fetch_sub(taken, Ordering::AcqRel);
            this.shared.unreported.fetch_add(taken, Ordering::AcqRel);
            this.shared.consumed.notify_one();
            this._guard
                .node_counters
                .bytes_from_node
                .fetch_add(taken as u64, Ordering::Relaxed);
            this._guard
                .metrics
                .bytes
                .get_or_create(&crate::metrics::DirectionLabel {
                    direction: "from_node".into(),
                })
                .inc_by(taken as u64);
            return Poll::Ready(Ok(()));
        }
        if let Some((reason, message)) = &inbound.reset {
            let kind = match reason {
                StreamResetReason::WindowExceeded => io::ErrorKind::ConnectionReset,
                StreamResetReason::SessionLost => io::ErrorKind::ConnectionAborted,
            };
            return Poll::Ready(Err(io::Error::new(kind, message.clone())));
        }
        if inbound.eof {
            return Poll::Ready(Ok(()));
        }
        inbound.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Ok(inbound) = this.shared.inbound.lock() {
            if let Some((_, message)) = &inbound.reset {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    message.clone(),
                )));
            }
        }
        let result = this.tx.as_mut().poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &result {
            this._guard
                .node_counters
                .bytes_to_node
                .fetch_add(*n as u64, Ordering::Relaxed);
            this._guard
                .metrics
                .bytes
                .get_or_create(&crate::metrics::DirectionLabel {
                    direction: "to_node".into(),
                })
                .inc_by(*n as u64);
        }
        result
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().tx.as_mut().poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().tx.as_mut().poll_shutdown(cx)
    }
}

impl Drop for TunnelStream {
    fn drop(&mut self) {
        self.shared.consumer_gone.store(true, Ordering::Release);
        release(&self.shared, &self.limits);
        // notify_one keeps a permit if the pump is not waiting right now.
        self.shared.consumer_dropped.notify_one();
    }
}

/// Moves a channel's messages from russh's queue into the stream's buffer.
struct Pump {
    id: u64,
    node: Arc<str>,
    shared: Arc<Shared>,
    limits: Arc<StreamLimits>,
    counters: Arc<StreamCounters>,
    metrics: Arc<Metrics>,
}

impl Pump {
    async fn run(self, mut read: ChannelReadHalf, write: ChannelWriteHalf<Msg>) {
        let mut close_sent = false;
        loop {
            tokio::select! {
                msg = read.wait() => match msg {
                    Some(ChannelMsg::Data { data }) => {
                        if let Some(reason) = self.accept(data) {
                            self.reset(reason);
                            if !close_sent {
                                close_sent = true;
                                let _ = write.close().await;
                            }
                        }
                    }
                    Some(ChannelMsg::Eof) | Some(ChannelMsg::Close) => self.finish(),
                    Some(_) => {}
                    None => {
                        self.lost();
                        break;
                    }
                },
                _ = self.shared.consumed.notified(), if !close_sent => {
                    // Give the window back: the node may send as much again.
                    let read = self.shared.unreported.swap(0, Ordering::AcqRel);
                    if read > 0 {
                        let _ = write.consumed(u32::try_from(read).unwrap_or(u32::MAX)).await;
                    }
                }
                _ = self.shared.consumer_dropped.notified(), if !close_sent => {
                    close_sent = true;
                    self.discard();
                    let _ = write.close().await;
                }
            }
        }
        // What is still queued stays for the consumer; it is released when
        // the consumer reads it or drops the stream.
        tracing::trace!(node = %self.node, stream = self.id, "stream pump ended");
    }

    /// Queue `data`; on overflow return why the stream must be reset.
    fn accept(&self, data: Bytes) -> Option<StreamResetReason> {
        let len = data.len();
        let Ok(mut inbound) = self.shared.inbound.lock() else {
            return None;
        };
        if self.shared.consumer_gone.load(Ordering::Acquire) || inbound.reset.is_some() {
            return None; // nobody will read it: drop on the floor
        }
        let mine = inbound.buffered + len;
        if mine > self.limits.stream_buffer {
            return Some(StreamResetReason::WindowExceeded);
        }
        inbound.buffered = mine;
        self.limits.in_use.fetch_add(len, Ordering::AcqRel);
        inbound.queue.push_back(data);
        Shared::wake(&mut inbound);
        None
    }

    fn reset(&self, reason: StreamResetReason) {
        let message = match reason {
            StreamResetReason::WindowExceeded => format!(
                "stream reset: node {} sent more than the {} bytes of window it was granted",
                self.node, self.limits.stream_buffer
            ),
            StreamResetReason::SessionLost => {
                format!(
                    "stream reset: the SSH session to node {} was lost",
                    self.node
                )
            }
        };
        tracing::warn!(node = %self.node, stream = self.id, reason = reason.label(), "{message}");
        self.counters.resets.fetch_add(1, Ordering::Relaxed);
        self.metrics.stream_reset(reason.label());
        if let Ok(mut inbound) = self.shared.inbound.lock() {
            let held = inbound.buffered;
            inbound.queue.clear();
            inbound.buffered = 0;
            self.limits.in_use.fetch_sub(held, Ordering::AcqRel);
            inbound.reset = Some((reason, message));
            Shared::wake(&mut inbound);
        }
        self.shared.cut_fired.store(true, Ordering::Release);
        self.shared.cut.notify_waiters();
    }

    fn finish(&self) {
        if let Ok(mut inbound) = self.shared.inbound.lock() {
            inbound.eof = true;
            Shared::wake(&mut inbound);
        }
    }

    fn lost(&self) {
        let lost = self
            .shared
            .inbound
            .lock()
            .map(|i| !i.eof && i.reset.is_none())
            .unwrap_or(false);
        if lost && !self.shared.consumer_gone.load(Ordering::Acquire) {
            self.reset(StreamResetReason::SessionLost);
        }
    }

    fn discard(&self) {
        release(&self.shared, &self.limits);
    }
}

/// Drop every queued byte of a stream and return it to the total budget.
fn release(shared: &Shared, limits: &StreamLimits) {
    if let Ok(mut inbound) = shared.inbound.lock() {
        let held = inbound.buffered;
        inbound.queue.clear();
        inbound.buffered = 0;
        limits.in_use.fetch_sub(held, Ordering::AcqRel);
    }
}
