//! A stream multiplexed over a node's SSH session: one direct-tcpip channel
//! seen as `AsyncRead + AsyncWrite`, isolated from its siblings.
//!
//! # Head-of-line isolation and flow control
//!
//! russh runs one task per session and, upstream, hands each channel's
//! messages to a bounded queue; if a queue fills, that task waits, and every
//! channel of the session stalls. Two things keep that from happening here:
//!
//! - Each channel is opened with a sink ([`StreamInbound`], the vendored
//!   russh's `ChannelSink`): the session task appends the channel's data to
//!   the stream's own buffer as each packet is decrypted and wakes the
//!   stream's reader. It never waits on a consumer, and no task sits in
//!   between (one wake-up per packet, not three).
//! - The channel's receive window is re-opened only when our consumer has
//!   read the bytes (the vendored russh's `adjust_window_on_consume`, see
//!   `vendor/russh/PATCHES.md`), not on arrival, reported in batches of a
//!   32nd of the window (64 KiB by default). So the node may have at most one window
//!   (`ssh.window_size`) of unread data in flight per stream: a consumer
//!   that reads slowly slows its own sender, exactly as with OpenSSH, and
//!   loses nothing; a consumer that stops reading stops only its own stream.
//!
//! A stream's buffer therefore never holds more than one window. A node that
//! sends beyond the window it was granted breaks the protocol: that stream
//! is reset ([`StreamResetReason::WindowExceeded`]) and counted. Memory
//! bound: `window_size` x open streams (packets under 2 KiB are coalesced,
//! so a node sending tiny packets does not multiply it by per-packet
//! overhead).

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use russh::client::Msg;
use russh::{ChannelMsg, ChannelWriteHalf};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

use crate::metrics::Metrics;

static NEXT_STREAM_ID: AtomicU64 = AtomicU64::new(1);

/// Buffering bounds of streams.
#[derive(Debug)]
pub struct StreamLimits {
    /// The receive window of every stream (`ssh.window_size`).
    pub window: usize,
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
            window,
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
    /// The node sent what a direct-tcpip channel never carries (extended
    /// data).
    ProtocolViolation,
}

impl StreamResetReason {
    /// Stable label for `nodetunnel_stream_resets_total{reason}`.
    pub fn label(self) -> &'static str {
        match self {
            StreamResetReason::WindowExceeded => "window_exceeded",
            StreamResetReason::SessionLost => "session_lost",
            StreamResetReason::ProtocolViolation => "protocol_violation",
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

/// Packets smaller than this are copied into one growing buffer instead of
/// being queued one by one, so a node that sends tiny packets costs about
/// as much memory per byte as one that sends full ones.
const COALESCE_BELOW: usize = 2048;

struct Inbound {
    /// Full packets, in arrival order, before `tail`.
    queue: VecDeque<Bytes>,
    /// Small packets coalesced, after `queue`.
    tail: BytesMut,
    /// Bytes in `queue` and `tail`.
    buffered: usize,
    eof: bool,
    reset: Option<(StreamResetReason, String)>,
    consumer_gone: bool,
    waker: Option<Waker>,
}

impl Inbound {
    fn wake(&mut self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Copy up to `buf.remaining()` bytes out; returns how many.
    fn take_into(&mut self, buf: &mut ReadBuf<'_>) -> usize {
        let mut taken = 0;
        while buf.remaining() > 0 {
            let Some(front) = self.queue.front_mut() else {
                break;
            };
            let n = front.len().min(buf.remaining());
            buf.put_slice(&front[..n]);
            front.advance(n);
            if front.is_empty() {
                self.queue.pop_front();
            }
            taken += n;
        }
        if self.queue.is_empty() && buf.remaining() > 0 && !self.tail.is_empty() {
            let n = self.tail.len().min(buf.remaining());
            buf.put_slice(&self.tail[..n]);
            self.tail.advance(n);
            taken += n;
        }
        self.buffered -= taken;
        taken
    }

    /// Move up to `max` bytes out as chunks, without copying; returns how
    /// many.
    fn take_chunks(&mut self, out: &mut VecDeque<Bytes>, max: usize) -> usize {
        let mut taken = 0;
        while taken < max {
            let Some(front) = self.queue.front_mut() else {
                break;
            };
            let room = max - taken;
            if front.len() <= room {
                taken += front.len();
                if let Some(chunk) = self.queue.pop_front() {
                    out.push_back(chunk);
                }
            } else {
                out.push_back(front.split_to(room));
                taken += room;
            }
        }
        if self.queue.is_empty() && taken < max && !self.tail.is_empty() {
            let n = self.tail.len().min(max - taken);
            out.push_back(self.tail.split_to(n).freeze());
            taken += n;
        }
        self.buffered -= taken;
        taken
    }

    /// Forget every queued byte; returns how many there were.
    fn clear(&mut self) -> usize {
        let held = self.buffered;
        self.queue.clear();
        self.tail = BytesMut::new();
        self.buffered = 0;
        held
    }
}

/// A stream's receiving side, shared by the session task (which delivers
/// the channel's messages to it as packets arrive, see
/// [`russh::ChannelSink`]) and the [`TunnelStream`] (which reads).
pub struct StreamInbound {
    id: u64,
    node: Arc<str>,
    inbound: Mutex<Inbound>,
    limits: Arc<StreamLimits>,
    counters: Arc<StreamCounters>,
    metrics: Arc<Metrics>,
    /// Fired (all waiters, and a flag for late ones) when the stream is reset.
    cut: Notify,
    cut_fired: AtomicBool,
}

impl std::fmt::Debug for StreamInbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamInbound")
            .field("id", &self.id)
            .field("node", &self.node)
            .finish()
    }
}

impl russh::ChannelSink for StreamInbound {
    fn deliver(&self, msg: ChannelMsg) {
        match msg {
            ChannelMsg::Data { data } => self.accept(data),
            ChannelMsg::Eof | ChannelMsg::Close => self.finish(),
            // russh dropped a packet beyond the window it was granted.
            ChannelMsg::WindowExceeded { window, received } => self.reset(
                StreamResetReason::WindowExceeded,
                format!("it sent {received} bytes with {window} bytes of window left"),
            ),
            // direct-tcpip has no extended data (RFC 4254 7.2): it would
            // take window that no reader ever gives back.
            ChannelMsg::ExtendedData { ext, data } => self.reset(
                StreamResetReason::ProtocolViolation,
                format!(
                    "it sent {} bytes of extended data (type {ext}) on a direct-tcpip channel",
                    data.len()
                ),
            ),
            // Window adjustments are tracked by russh's writer; requests
            // are not ours to answer (russh refuses those that want a reply).
            _ => {}
        }
    }

    fn detached(&self) {
        self.lost();
    }
}

impl StreamInbound {
    /// Queue `data` for the consumer, or reset the stream if the node sent
    /// more than its window. Runs on the session task: never waits.
    fn accept(&self, data: Bytes) {
        let len = data.len();
        if len == 0 {
            return;
        }
        let Ok(mut inbound) = self.inbound.lock() else {
            return;
        };
        if inbound.consumer_gone || inbound.reset.is_some() {
            return; // nobody will read it: drop on the floor
        }
        let mine = inbound.buffered + len;
        if mine > self.limits.stream_buffer {
            drop(inbound);
            self.reset(
                StreamResetReason::WindowExceeded,
                format!(
                    "it had {} bytes unread, more than the {} bytes of window it was granted",
                    mine, self.limits.stream_buffer
                ),
            );
            return;
        }
        inbound.buffered = mine;
        self.limits.in_use.fetch_add(len, Ordering::AcqRel);
        if len < COALESCE_BELOW {
            inbound.tail.extend_from_slice(&data);
        } else {
            if !inbound.tail.is_empty() {
                let small = inbound.tail.split().freeze();
                inbound.queue.push_back(small);
            }
            inbound.queue.push_back(data);
        }
        inbound.wake();
    }

    /// Cut the stream for `reason`; `detail` says what the node did.
    fn reset(&self, reason: StreamResetReason, detail: String) {
        if self
            .inbound
            .lock()
            .map(|i| i.reset.is_some())
            .unwrap_or(true)
        {
            return; // cut once, counted once
        }
        let message = match reason {
            StreamResetReason::WindowExceeded => format!(
                "stream reset: node {} broke flow control: {detail}",
                self.node
            ),
            StreamResetReason::ProtocolViolation => format!(
                "stream reset: node {} broke the protocol: {detail}",
                self.node
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
        if let Ok(mut inbound) = self.inbound.lock() {
            let held = inbound.clear();
            self.limits.in_use.fetch_sub(held, Ordering::AcqRel);
            inbound.reset = Some((reason, message));
            inbound.wake();
        }
        self.cut_fired.store(true, Ordering::Release);
        self.cut.notify_waiters();
    }

    fn finish(&self) {
        if let Ok(mut inbound) = self.inbound.lock() {
            inbound.eof = true;
            inbound.wake();
        }
    }

    /// The session forgot the channel: if the node had not ended the stream
    /// and someone still reads it, the stream was cut short.
    fn lost(&self) {
        let lost = self
            .inbound
            .lock()
            .map(|i| !i.eof && i.reset.is_none() && !i.consumer_gone)
            .unwrap_or(false);
        if lost {
            self.reset(StreamResetReason::SessionLost, String::new());
        }
    }

    /// Nobody will read this stream any more (its consumer was dropped, or
    /// the opener gave up before the channel was confirmed): what is queued
    /// and whatever the node still sends for it is dropped, not held
    /// against the buffer budget.
    pub fn abandon(&self) {
        if let Ok(mut inbound) = self.inbound.lock() {
            inbound.consumer_gone = true;
            let held = inbound.clear();
            self.limits.in_use.fetch_sub(held, Ordering::AcqRel);
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

    /// The receiving side of the stream this slot will carry: hand it to
    /// the channel open as its sink (russh delivers the channel's data to
    /// it from the session task), then to [`TunnelStream::new`].
    pub fn inbound(&self, node: Arc<str>, limits: Arc<StreamLimits>) -> Arc<StreamInbound> {
        Arc::new(StreamInbound {
            id: NEXT_STREAM_ID.fetch_add(1, Ordering::Relaxed),
            node,
            inbound: Mutex::new(Inbound {
                queue: VecDeque::new(),
                tail: BytesMut::new(),
                buffered: 0,
                eof: false,
                reset: None,
                consumer_gone: false,
                waker: None,
            }),
            limits,
            counters: self.guard.node_counters.clone(),
            metrics: self.guard.metrics.clone(),
            cut: Notify::new(),
            cut_fired: AtomicBool::new(false),
        })
    }
}

/// One tunnelled TCP stream. Reading gives the bytes the node's destination
/// sent; writing sends towards it; `shutdown` sends EOF (a half-close);
/// dropping closes the channel.
pub struct TunnelStream {
    shared: Arc<StreamInbound>,
    write: ChannelWriteHalf<Msg>,
    tx: Pin<Box<dyn AsyncWrite + Send + Sync>>,
    /// Bytes read since the last consumption report to the session.
    unreported: usize,
    /// Report consumption once this many bytes were read: a 32nd of the
    /// window (64 KiB of the default 2 MiB, about two packets; OpenSSH
    /// re-opens after three). Rarer reports (an eighth) let the node's
    /// window run low and cost single-stream downloads 15-20% of their
    /// throughput (docs/benchmarks.md).
    report_every: usize,
    _guard: OpenGuard,
}

impl std::fmt::Debug for TunnelStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelStream")
            .field("id", &self.shared.id)
            .field("node", &self.shared.node)
            .finish()
    }
}

impl TunnelStream {
    /// Wrap a channel opened with `inbound` as its sink (see
    /// [`StreamSlot::inbound`]).
    pub fn new(
        channel: russh::Channel<Msg>,
        slot: StreamSlot,
        inbound: Arc<StreamInbound>,
    ) -> TunnelStream {
        let guard = slot.guard;
        guard.node_counters.opened.fetch_add(1, Ordering::Relaxed);
        // The read half receives nothing once the sink is in place.
        let (_read, write) = channel.split();
        let tx = Box::pin(write.make_writer());
        let report_every = (inbound.limits.window / 32).max(1);
        TunnelStream {
            shared: inbound,
            write,
            tx,
            unreported: 0,
            report_every,
            _guard: guard,
        }
    }

    /// Process-unique stream id (the `stream` field of log lines).
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// The node carrying the stream.
    pub fn node(&self) -> &str {
        &self.shared.node
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

    fn poll_read_chunks(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut VecDeque<Bytes>,
        max: usize,
    ) -> Poll<io::Result<usize>> {
        if max == 0 {
            return Poll::Ready(Ok(0));
        }
        self.poll_take(cx, |inbound| inbound.take_chunks(out, max))
    }
}

impl TunnelStream {
    /// Take what the node sent with `take` (which returns the bytes it
    /// took), account for it, and give the window back in batches;
    /// `Ready(Ok(0))` at the end of the stream.
    fn poll_take(
        &mut self,
        cx: &mut Context<'_>,
        take: impl FnOnce(&mut Inbound) -> usize,
    ) -> Poll<io::Result<usize>> {
        let Ok(mut inbound) = self.shared.inbound.lock() else {
            return Poll::Ready(Err(io::Error::other("stream state poisoned")));
        };
        let taken = take(&mut inbound);
        if taken > 0 {
            drop(inbound);
            self.shared.limits.in_use.fetch_sub(taken, Ordering::AcqRel);
            // Give the window back in batches: the node may send as much again.
            self.unreported += taken;
            if self.unreported >= self.report_every {
                let amount = u32::try_from(self.unreported).unwrap_or(u32::MAX);
                self.unreported = 0;
                self.write.consumed_now(amount);
            }
            self._guard
                .node_counters
                .bytes_from_node
                .fetch_add(taken as u64, Ordering::Relaxed);
            self._guard
                .metrics
                .bytes
                .get_or_create(&crate::metrics::DirectionLabel {
                    direction: "from_node".into(),
                })
                .inc_by(taken as u64);
            return Poll::Ready(Ok(taken));
        }
        if let Some((reason, message)) = &inbound.reset {
            let kind = match reason {
                StreamResetReason::WindowExceeded | StreamResetReason::ProtocolViolation => {
                    io::ErrorKind::ConnectionReset
                }
                StreamResetReason::SessionLost => io::ErrorKind::ConnectionAborted,
            };
            return Poll::Ready(Err(io::Error::new(kind, message.clone())));
        }
        if inbound.eof {
            return Poll::Ready(Ok(0));
        }
        inbound.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        self.get_mut()
            .poll_take(cx, |inbound| inbound.take_into(buf))
            .map_ok(|_| ())
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
        self.shared.abandon();
        // Closing a channel the node already closed is answered by russh
        // as a no-op; one the node still has open is closed.
        self.write.close_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use russh::ChannelSink;

    fn inbound(window: usize) -> (Arc<StreamInbound>, Arc<StreamLimits>, Arc<StreamCounters>) {
        let limits = Arc::new(StreamLimits::new(window, usize::MAX));
        let counters = Arc::new(StreamCounters::default());
        let slot = StreamSlot::try_take(
            counters.clone(),
            10,
            Arc::new(AtomicUsize::new(0)),
            Arc::new(Metrics::new()),
        )
        .expect("a slot");
        (
            slot.inbound("node-a".into(), limits.clone()),
            limits,
            counters,
        )
    }

    fn read_all(inbound: &StreamInbound) -> Vec<u8> {
        let mut out = Vec::new();
        let mut chunk = [0u8; 1000];
        loop {
            let mut buf = ReadBuf::new(&mut chunk);
            let n = inbound.inbound.lock().unwrap().take_into(&mut buf);
            if n == 0 {
                return out;
            }
            out.extend_from_slice(buf.filled());
        }
    }

    #[test]
    fn small_and_large_packets_come_out_in_order() {
        let (s, limits, _) = inbound(1 << 20);
        let mut sent = Vec::new();
        for (i, len) in [1usize, 10, 3000, 5, 2047, 2048, 1, 40_000, 7]
            .into_iter()
            .enumerate()
        {
            let data: Vec<u8> = (0..len).map(|j| (i * 31 + j) as u8).collect();
            sent.extend_from_slice(&data);
            s.deliver(ChannelMsg::Data { data: data.into() });
        }
        assert_eq!(limits.in_use.load(Ordering::Acquire), sent.len());
        assert_eq!(read_all(&s), sent);
        assert_eq!(s.inbound.lock().unwrap().buffered, 0);
    }

    #[test]
    fn chunks_are_handed_out_in_order_and_never_more_than_asked() {
        let (s, limits, _) = inbound(1 << 20);
        let mut sent = Vec::new();
        for (i, len) in [40_000usize, 3, 2047, 70_000, 9, 32_768]
            .into_iter()
            .enumerate()
        {
            let data: Vec<u8> = (0..len).map(|j| (i * 17 + j) as u8).collect();
            sent.extend_from_slice(&data);
            s.deliver(ChannelMsg::Data { data: data.into() });
        }
        let mut got = Vec::new();
        loop {
            let mut out = VecDeque::new();
            let n = s.inbound.lock().unwrap().take_chunks(&mut out, 25_000);
            if n == 0 {
                break;
            }
            assert!(n <= 25_000, "took {n}");
            assert_eq!(out.iter().map(Bytes::len).sum::<usize>(), n);
            assert!(out.iter().all(|c| !c.is_empty()));
            out.iter().for_each(|c| got.extend_from_slice(c));
        }
        assert_eq!(got, sent);
        assert_eq!(s.inbound.lock().unwrap().buffered, 0);
        // The stream's reader accounts for what it takes, not the buffer.
        assert_eq!(limits.in_use.load(Ordering::Acquire), sent.len());
    }

    #[test]
    fn tiny_packets_are_coalesced_not_queued_one_by_one() {
        let (s, _, _) = inbound(1 << 20);
        for _ in 0..10_000 {
            s.deliver(ChannelMsg::Data {
                data: Bytes::from_static(b"x"),
            });
        }
        let inbound = s.inbound.lock().unwrap();
        assert!(
            inbound.queue.is_empty(),
            "{} queued chunks",
            inbound.queue.len()
        );
        assert_eq!(inbound.tail.len(), 10_000);
    }

    #[test]
    fn more_than_the_window_resets_the_stream_and_frees_its_buffer() {
        let (s, limits, counters) = inbound(32 * 1024);
        // The window plus 64 KiB of slack is 96 KiB: the fourth packet is over.
        let packet = Bytes::from(vec![7u8; 32 * 1024]);
        for _ in 0..4 {
            s.deliver(ChannelMsg::Data {
                data: packet.clone(),
            });
        }
        let inbound = s.inbound.lock().unwrap();
        assert!(matches!(
            inbound.reset,
            Some((StreamResetReason::WindowExceeded, _))
        ));
        assert_eq!(inbound.buffered, 0);
        assert_eq!(limits.in_use.load(Ordering::Acquire), 0);
        assert_eq!(counters.resets.load(Ordering::Acquire), 1);
        assert!(s.cut_fired.load(Ordering::Acquire));
    }

    #[test]
    fn detached_before_eof_is_a_lost_session_after_eof_is_not() {
        let (cut_short, _, _) = inbound(1 << 20);
        cut_short.deliver(ChannelMsg::Data {
            data: Bytes::from_static(b"partial"),
        });
        cut_short.detached();
        assert!(matches!(
            cut_short.inbound.lock().unwrap().reset,
            Some((StreamResetReason::SessionLost, _))
        ));

        let (complete, _, counters) = inbound(1 << 20);
        complete.deliver(ChannelMsg::Data {
            data: Bytes::from_static(b"all of it"),
        });
        complete.deliver(ChannelMsg::Eof);
        complete.deliver(ChannelMsg::Close);
        complete.detached();
        assert!(complete.inbound.lock().unwrap().reset.is_none());
        assert_eq!(counters.resets.load(Ordering::Acquire), 0);
        assert_eq!(read_all(&complete), b"all of it");
    }

    #[test]
    fn an_abandoned_open_keeps_nothing_the_node_sends_late() {
        let (s, limits, counters) = inbound(1 << 20);
        s.abandon(); // the dial timed out before the confirmation
        s.deliver(ChannelMsg::Data {
            data: Bytes::from(vec![1u8; 40_000]),
        });
        s.detached();
        assert_eq!(limits.in_use.load(Ordering::Acquire), 0);
        assert_eq!(s.inbound.lock().unwrap().buffered, 0);
        assert_eq!(counters.resets.load(Ordering::Acquire), 0);
    }

    #[test]
    fn data_for_a_consumer_that_left_is_dropped_and_not_counted() {
        let (s, limits, _) = inbound(1 << 20);
        s.deliver(ChannelMsg::Data {
            data: Bytes::from(vec![1u8; 5000]),
        });
        s.abandon();
        s.deliver(ChannelMsg::Data {
            data: Bytes::from(vec![1u8; 5000]),
        });
        assert_eq!(limits.in_use.load(Ordering::Acquire), 0);
        s.detached(); // not a reset: nobody reads any more
        assert!(s.inbound.lock().unwrap().reset.is_none());
    }
}
