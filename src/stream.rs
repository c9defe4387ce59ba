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
//! is reset ([`StreamResetReason::WindowExceeded`]) and counted. Packets
//! under 2 KiB are coalesced, so a node sending tiny packets does not
//! multiply memory by per-packet overhead.
//!
//! # The buffer budget (`ssh.max_buffered_bytes`)
//!
//! What a node may send us is what we hold plus the window we granted and
//! it has not used yet: a stream's *commitment*. Nothing bounds the bytes
//! held but the commitments, so the budget is a bound on them
//! ([`StreamLimits`]):
//!
//! - Every stream may always have one packet ([`MIN_WINDOW`], 32 KiB) of
//!   commitment, free of the budget: no stream ever stops for good, however
//!   spent the budget is.
//! - Above that, window is granted (at the open, and as the client reads)
//!   only as far as the budget has room; when it is spent, streams wait with
//!   what they have (they slow down: nothing is reset or dropped) and are
//!   woken in turn as clients read and commitments shrink.
//! - A commitment shrinks as the client reads, when the node ends the
//!   stream (its unused window will never be used), and when the stream
//!   closes.
//!
//! So bytes held from nodes stay below `max_buffered_bytes` + 32 KiB x open
//! streams, and below `window_size` x open streams.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use russh::client::Msg;
use russh::{ChannelMsg, ChannelWriteHalf};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

use crate::metrics::Metrics;

static NEXT_STREAM_ID: AtomicU64 = AtomicU64::new(1);

/// The window every stream may always have, whatever the buffer budget:
/// one packet (the maximum packet size nodetunnel asks nodes for).
pub const MIN_WINDOW: usize = 32 * 1024;

/// What one stream is held to while its session carries other streams
/// (`ssh.upload_window` and `ssh.download_window`, resolved for the
/// session's round trip): what of its bytes may queue in front of a
/// sibling's. A stream alone on its session is not bounded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SharedBounds {
    /// The most of the stream's upload the node may hold unconsumed
    /// (`None`: the node's whole window).
    pub upload: Option<u32>,
    /// The most window granted to the node for the stream's download:
    /// bytes it may have sent and we not yet handed to the client
    /// (`None`: `ssh.window_size`).
    pub download: Option<usize>,
}

/// Buffering bounds of streams, and the buffer budget they share (see the
/// module docs).
pub struct StreamLimits {
    /// The receive window of every stream (`ssh.window_size`).
    pub window: usize,
    /// Bytes one stream may hold for its consumer: the receive window plus
    /// one packet of slack. More means the node ignored flow control.
    pub stream_buffer: usize,
    /// Bytes held right now by all streams.
    pub in_use: AtomicUsize,
    /// The most `in_use` has been since start.
    peak_in_use: AtomicUsize,
    /// The buffer budget (`ssh.max_buffered_bytes`): commitments above each
    /// stream's free [`MIN_WINDOW`] stay within it; new streams are refused
    /// while more than this many bytes are held.
    pub max_in_use: usize,
    /// Commitment free of the budget per stream: [`MIN_WINDOW`], at most
    /// the window.
    floor: usize,
    /// Window is granted in batches of at least this many bytes (a 32nd of
    /// the window: 64 KiB of the default 2 MiB, about two packets; OpenSSH
    /// re-opens after three). Rarer grants (an eighth) let the node's window
    /// run low and cost single-stream downloads 15-20% of their throughput
    /// (docs/benchmarks.md).
    grant_batch: usize,
    /// Sum over streams of their commitment above the floor.
    charged: AtomicUsize,
    /// Streams waiting for budget to grant window, in the order they asked.
    waiters: Mutex<VecDeque<Weak<StreamInbound>>>,
    /// `waiters.len()`, read without the lock.
    waiting: AtomicUsize,
}

impl std::fmt::Debug for StreamLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamLimits")
            .field("window", &self.window)
            .field("max_in_use", &self.max_in_use)
            .field("in_use", &self.in_use)
            .field("charged", &self.charged)
            .finish()
    }
}

impl StreamLimits {
    /// Limits for streams whose receive window is `window` bytes, sharing a
    /// buffer budget of `max_in_use` bytes.
    pub fn new(window: usize, max_in_use: usize) -> Self {
        StreamLimits {
            window,
            stream_buffer: window + 64 * 1024,
            in_use: AtomicUsize::new(0),
            peak_in_use: AtomicUsize::new(0),
            max_in_use,
            floor: MIN_WINDOW.min(window),
            grant_batch: (window / 32).max(1),
            charged: AtomicUsize::new(0),
            waiters: Mutex::new(VecDeque::new()),
            waiting: AtomicUsize::new(0),
        }
    }

    /// Bytes of the budget promised to nodes now: held, or granted as
    /// window and not yet used, above each stream's free [`MIN_WINDOW`].
    pub fn committed(&self) -> usize {
        self.charged.load(Ordering::Acquire)
    }

    /// The part of a stream's commitment that the budget pays for.
    fn charge(&self, commitment: usize) -> usize {
        commitment.saturating_sub(self.floor)
    }

    /// Take up to `max` bytes of budget, or nothing if fewer than `min`
    /// are left; returns how many were taken.
    fn try_reserve(&self, max: usize, min: usize) -> usize {
        let mut charged = self.charged.load(Ordering::Acquire);
        loop {
            let take = self.max_in_use.saturating_sub(charged).min(max);
            if take == 0 || take < min {
                return 0;
            }
            match self.charged.compare_exchange_weak(
                charged,
                charged + take,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return take,
                Err(now) => charged = now,
            }
        }
    }

    /// Give `amount` bytes of budget back (without waking anyone: see
    /// [`Self::wake_waiters`]).
    fn release(&self, amount: usize) {
        if amount > 0 {
            self.charged.fetch_sub(amount, Ordering::AcqRel);
        }
    }

    /// Queue `stream` to be woken when budget frees up.
    fn wait_for_budget(&self, stream: Weak<StreamInbound>) {
        if let Ok(mut waiters) = self.waiters.lock() {
            waiters.push_back(stream);
            self.waiting.store(waiters.len(), Ordering::Release);
        }
    }

    /// If a grant's worth of budget is free, wake the stream that has
    /// waited longest (it takes what it can when its reader runs, and wakes
    /// the next one if budget is left). Never called with a stream's lock
    /// held.
    fn wake_waiters(&self) {
        if self.waiting.load(Ordering::Acquire) == 0
            || self.max_in_use.saturating_sub(self.committed()) < self.grant_batch
        {
            return;
        }
        loop {
            let next = match self.waiters.lock() {
                Ok(mut waiters) => {
                    let next = waiters.pop_front();
                    self.waiting.store(waiters.len(), Ordering::Release);
                    next
                }
                Err(_) => return,
            };
            let Some(next) = next else { return };
            if next.upgrade().is_some_and(|s| s.wake_for_budget()) {
                return;
            }
        }
    }

    /// The most bytes all streams held at once since start.
    pub fn peak_in_use(&self) -> usize {
        self.peak_in_use.load(Ordering::Acquire)
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

    /// Every reason, for the series exported at 0 from the start.
    pub const ALL: [StreamResetReason; 3] = [
        StreamResetReason::WindowExceeded,
        StreamResetReason::SessionLost,
        StreamResetReason::ProtocolViolation,
    ];
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
    /// What the node may have sent us: `buffered`, plus the window granted
    /// (or reported to russh for granting) and not yet used. Never below
    /// `buffered`.
    committed: usize,
    /// In the budget's waiting line.
    awaiting_budget: bool,
    /// Where the channel open stands: a channel russh forgets before its
    /// opener saw the confirmation is a refused open, not a lost stream.
    open: OpenPhase,
    eof: bool,
    reset: Option<(StreamResetReason, String)>,
    consumer_gone: bool,
    waker: Option<Waker>,
}

/// The channel open, as the stream's inbound side knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OpenPhase {
    /// Asked for; the opener has not seen the node's answer yet.
    Pending,
    /// The session dropped the channel before the opener saw the answer:
    /// the node refused it (the usual case: nothing listens at the
    /// destination), or confirmed it and the session died at once. The
    /// opener decides which: [`StreamInbound::confirm`] after a
    /// confirmation, [`StreamInbound::abandon`] after a refusal.
    DetachedWhilePending,
    /// Confirmed, and the opener saw it: from here on a dropped channel
    /// that the node had not ended is a lost stream.
    Confirmed,
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
    /// The window offered in the channel open.
    initial_window: u32,
    /// What the stream is held to while its session carries others.
    shared: SharedBounds,
    /// Open streams on the stream's session, this one included.
    session_streams: Arc<AtomicUsize>,
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

    fn initial_window(&self) -> Option<u32> {
        Some(self.initial_window)
    }

    /// Bounded only while the session carries another stream: a lone
    /// upload delays nobody's bytes and keeps the node's whole window (a
    /// bound costs it throughput, docs/benchmarks.md "Upload window").
    fn send_window_limit(&self) -> Option<u32> {
        if self.is_shared() {
            self.shared.upload
        } else {
            None
        }
    }
}

impl StreamInbound {
    /// The stream's session carries other streams now.
    fn is_shared(&self) -> bool {
        self.session_streams.load(Ordering::Relaxed) > 1
    }

    /// The window the node may have for this stream now: the whole
    /// `ssh.window_size`, or the download bound while the session carries
    /// other streams. Lowering it takes nothing back (SSH cannot): grants
    /// stop until the client has read the stream below it.
    fn window_target(&self) -> usize {
        window_target(&self.limits, self.shared.download, self.is_shared())
    }

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
        if mine > inbound.committed {
            // More than we granted (a node ignoring flow control, within
            // the slack): count it, so that the books never go negative.
            let over = self.limits.charge(mine) - self.limits.charge(inbound.committed);
            inbound.committed = mine;
            self.limits.charged.fetch_add(over, Ordering::AcqRel);
        }
        let in_use = self.limits.in_use.fetch_add(len, Ordering::AcqRel) + len;
        self.limits.peak_in_use.fetch_max(in_use, Ordering::AcqRel);
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
            let freed = self.lower_commitment(&mut inbound, 0);
            self.limits.release(freed);
            inbound.reset = Some((reason, message));
            inbound.wake();
        }
        self.limits.wake_waiters();
        self.cut_fired.store(true, Ordering::Release);
        self.cut.notify_waiters();
    }

    fn finish(&self) {
        if let Ok(mut inbound) = self.inbound.lock() {
            inbound.eof = true;
            // The node sends nothing more: its unused window is free.
            let held = inbound.buffered;
            let freed = self.lower_commitment(&mut inbound, held);
            self.limits.release(freed);
            inbound.wake();
        }
        self.limits.wake_waiters();
    }

    /// The session forgot the channel: if the node had not ended the stream
    /// and someone still reads it, the stream was cut short. Before the
    /// opener saw the open confirmed this is only noted: a refused open
    /// also ends this way, and it is the opener's to count.
    fn lost(&self) {
        let lost = self
            .inbound
            .lock()
            .map(|mut i| {
                if i.open == OpenPhase::Pending {
                    i.open = OpenPhase::DetachedWhilePending;
                    return false;
                }
                !i.eof && i.reset.is_none() && !i.consumer_gone
            })
            .unwrap_or(false);
        if lost {
            self.reset(StreamResetReason::SessionLost, String::new());
        }
    }

    /// The opener saw the node confirm the channel. If the session dropped
    /// the channel in between (it died right after confirming), the stream
    /// is lost now, and counted as such.
    pub fn confirm(&self) {
        let detached = self
            .inbound
            .lock()
            .map(|mut i| {
                let detached = i.open == OpenPhase::DetachedWhilePending;
                i.open = OpenPhase::Confirmed;
                detached
            })
            .unwrap_or(false);
        if detached {
            self.lost();
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
            let freed = self.lower_commitment(&mut inbound, 0);
            self.limits.release(freed);
        }
        self.limits.wake_waiters();
    }

    /// Lower the stream's commitment to `to` bytes (never raises it);
    /// returns the budget that frees, for [`StreamLimits::release`].
    fn lower_commitment(&self, inbound: &mut Inbound, to: usize) -> usize {
        let before = self.limits.charge(inbound.committed);
        inbound.committed = inbound.committed.min(to);
        before - self.limits.charge(inbound.committed)
    }

    /// The reader took `taken` bytes: lower the commitment by as much, then
    /// grant the node whatever window the budget allows, in batches, up to
    /// a whole window. Returns the bytes to grant (report to russh as
    /// consumed). A stream the budget cannot serve now joins the waiting
    /// line.
    fn settle(self: &Arc<Self>, inbound: &mut Inbound, taken: usize) -> usize {
        let lowered = inbound.committed.saturating_sub(taken);
        let freed = self.lower_commitment(inbound, lowered);
        // Released before reserving: a stream whose reader keeps up keeps
        // the window it had.
        self.limits.release(freed);
        if inbound.eof || inbound.reset.is_some() || inbound.consumer_gone {
            return 0;
        }
        let limits = &self.limits;
        let target = self.window_target();
        let batch = grant_batch(limits, target);
        let want = target.saturating_sub(inbound.committed);
        if want < batch {
            return 0;
        }
        let free = limits.floor.saturating_sub(inbound.committed).min(want);
        let paid = limits.try_reserve(want - free, batch.saturating_sub(free));
        if free + paid < want && !inbound.awaiting_budget {
            inbound.awaiting_budget = true;
            limits.wait_for_budget(Arc::downgrade(self));
        }
        inbound.committed += free + paid;
        free + paid
    }

    /// Budget freed up while the stream waited: have its reader grant what
    /// it can. False if the stream no longer needs it (served meanwhile,
    /// ended, reset or abandoned), so the next in line gets the turn.
    fn wake_for_budget(&self) -> bool {
        let Ok(mut inbound) = self.inbound.lock() else {
            return false;
        };
        inbound.awaiting_budget = false;
        let target = self.window_target();
        let wants = target.saturating_sub(inbound.committed) >= grant_batch(&self.limits, target);
        if !wants || inbound.eof || inbound.reset.is_some() || inbound.consumer_gone {
            return false;
        }
        inbound.wake();
        true
    }
}

/// The window of a stream whose session carries other streams (`shared`) or
/// not: `ssh.window_size`, or the download bound while shared (never below
/// the one packet every stream may have).
fn window_target(limits: &StreamLimits, download: Option<usize>, shared: bool) -> usize {
    match download {
        Some(bound) if shared => bound.min(limits.window).max(limits.floor),
        _ => limits.window,
    }
}

/// The least window worth a grant for a stream whose window is `target`:
/// the limits' batch, or a quarter of a smaller (bounded) window, so that a
/// bounded stream is re-granted before it runs dry.
fn grant_batch(limits: &StreamLimits, target: usize) -> usize {
    limits.grant_batch.min(target / 4).max(1)
}

impl Drop for StreamInbound {
    fn drop(&mut self) {
        // Normally zero by now (abandoned or reset); whatever is left goes
        // back, so the budget never leaks.
        if let Ok(inbound) = self.inbound.get_mut() {
            let held = inbound.buffered;
            let charge = self.limits.charge(inbound.committed);
            self.limits.in_use.fetch_sub(held, Ordering::AcqRel);
            self.limits.release(charge);
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
    ///
    /// The stream's first window is a whole window (or, if the session
    /// already carries another stream, the download bound) if the buffer
    /// budget has room for it, else what it has room for, and at least
    /// [`MIN_WINDOW`]. `shared` is what the stream is held to while its
    /// session carries other streams (see [`crate::ssh_config::SharedWindow`]).
    pub fn inbound(
        &self,
        node: Arc<str>,
        limits: Arc<StreamLimits>,
        shared: SharedBounds,
    ) -> Arc<StreamInbound> {
        // This slot is counted already: more than one is a sibling.
        let siblings = self.guard.session_streams.load(Ordering::Relaxed) > 1;
        let window = window_target(&limits, shared.download, siblings);
        let paid = limits.try_reserve(window - limits.floor, 0);
        let first_window = limits.floor + paid;
        Arc::new(StreamInbound {
            id: NEXT_STREAM_ID.fetch_add(1, Ordering::Relaxed),
            node,
            initial_window: u32::try_from(first_window).unwrap_or(u32::MAX),
            shared,
            session_streams: self.guard.session_streams.clone(),
            inbound: Mutex::new(Inbound {
                queue: VecDeque::new(),
                tail: BytesMut::new(),
                buffered: 0,
                committed: first_window,
                awaiting_budget: false,
                open: OpenPhase::Pending,
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
    _guard: OpenGuard,
    /// The index of the node's session carrying it, once known.
    session: Option<usize>,
    /// The label of the routing rule that chose the node, once known.
    rule: Option<&'static str>,
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
        TunnelStream {
            shared: inbound,
            write,
            tx,
            _guard: guard,
            session: None,
            rule: None,
        }
    }

    /// Note the index of the node's SSH session carrying the stream (its
    /// audit record names it).
    pub fn set_session(&mut self, index: usize) {
        self.session = Some(index);
    }

    /// Note the routing rule that chose the node (its
    /// [`RouteRule::label`](crate::router::RouteRule::label)).
    pub fn set_rule(&mut self, rule: &'static str) {
        self.rule = Some(rule);
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
    fn log_context(&self) -> (Option<&str>, Option<u64>) {
        (Some(&self.shared.node), Some(self.shared.id))
    }

    fn facts(&self) -> crate::dial::StreamFacts {
        crate::dial::StreamFacts {
            node: Some(self.shared.node.to_string()),
            stream: Some(self.shared.id),
            session: self.session,
            rule: self.rule,
        }
    }

    fn reset_label(&self) -> Option<&'static str> {
        let inbound = self.shared.inbound.lock().ok()?;
        inbound.reset.as_ref().map(|(reason, _)| reason.label())
    }

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
    /// took), account for it, and grant the node window as the budget
    /// allows (also when woken by the budget with nothing to take);
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
        let grant = self.shared.settle(&mut inbound, taken);
        let idle = if taken > 0 {
            Poll::Ready(Ok(taken))
        } else if let Some((reason, message)) = &inbound.reset {
            let kind = match reason {
                StreamResetReason::WindowExceeded | StreamResetReason::ProtocolViolation => {
                    io::ErrorKind::ConnectionReset
                }
                StreamResetReason::SessionLost => io::ErrorKind::ConnectionAborted,
            };
            Poll::Ready(Err(io::Error::new(kind, message.clone())))
        } else if inbound.eof {
            Poll::Ready(Ok(0))
        } else {
            inbound.waker = Some(cx.waker().clone());
            Poll::Pending
        };
        drop(inbound);
        if grant > 0 {
            // At most one window: fits a u32, as ssh.window_size does.
            self.write
                .consumed_now(u32::try_from(grant).unwrap_or(u32::MAX));
        }
        if taken > 0 {
            self.shared.limits.in_use.fetch_sub(taken, Ordering::AcqRel);
            self.shared.limits.wake_waiters();
            self._guard
                .node_counters
                .bytes_from_node
                .fetch_add(taken as u64, Ordering::Relaxed);
            self._guard.metrics.bytes_from_node.inc_by(taken as u64);
        } else if grant > 0 {
            // Woken by the budget: pass the turn on if budget is left.
            self.shared.limits.wake_waiters();
        }
        idle
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
            this._guard.metrics.bytes_to_node.inc_by(*n as u64);
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

    #[test]
    fn every_reset_reason_is_exported_from_the_start() {
        for reason in StreamResetReason::ALL {
            assert!(
                crate::metrics::STREAM_RESET_REASONS.contains(&reason.label()),
                "{} is not in metrics::STREAM_RESET_REASONS",
                reason.label()
            );
        }
    }

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
        let s = slot.inbound("node-a".into(), limits.clone(), SharedBounds::default());
        s.confirm(); // the opener saw the channel open
        (s, limits, counters)
    }

    /// As [`inbound`], with the channel open still unanswered.
    fn pending(window: usize) -> (Arc<StreamInbound>, Arc<StreamCounters>, Arc<Metrics>) {
        let limits = Arc::new(StreamLimits::new(window, usize::MAX));
        let counters = Arc::new(StreamCounters::default());
        let metrics = Arc::new(Metrics::new());
        let slot = StreamSlot::try_take(
            counters.clone(),
            10,
            Arc::new(AtomicUsize::new(0)),
            metrics.clone(),
        )
        .expect("a slot");
        (
            slot.inbound("node-a".into(), limits, SharedBounds::default()),
            counters,
            metrics,
        )
    }

    fn budgeted(limits: &Arc<StreamLimits>) -> Arc<StreamInbound> {
        let slot = StreamSlot::try_take(
            Arc::new(StreamCounters::default()),
            10,
            Arc::new(AtomicUsize::new(0)),
            Arc::new(Metrics::new()),
        )
        .expect("a slot");
        slot.inbound("node-a".into(), limits.clone(), SharedBounds::default())
    }

    /// A stream held to `download` while its session carries others, on a
    /// session whose stream count the test moves; open while its slot is
    /// kept (a [`TunnelStream`] keeps it).
    fn shared(
        window: usize,
        download: usize,
        session_streams: &Arc<AtomicUsize>,
    ) -> (Arc<StreamInbound>, StreamSlot) {
        let slot = StreamSlot::try_take(
            Arc::new(StreamCounters::default()),
            10,
            session_streams.clone(),
            Arc::new(Metrics::new()),
        )
        .expect("a slot");
        let bounds = SharedBounds {
            upload: None,
            download: Some(download),
        };
        let limits = Arc::new(StreamLimits::new(window, usize::MAX));
        let s = slot.inbound("node-a".into(), limits, bounds);
        s.confirm();
        (s, slot)
    }

    /// The node sends `len` bytes and the reader takes them all: the window
    /// granted back.
    fn send_and_read(s: &Arc<StreamInbound>, len: usize) -> usize {
        s.deliver(ChannelMsg::Data {
            data: Bytes::from(vec![3u8; len]),
        });
        let mut out = VecDeque::new();
        let mut inbound = s.inbound.lock().unwrap();
        let taken = inbound.take_chunks(&mut out, usize::MAX);
        s.limits.in_use.fetch_sub(taken, Ordering::AcqRel);
        s.settle(&mut inbound, taken)
    }

    struct Flag(AtomicBool);
    impl std::task::Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::Release);
        }
    }

    #[test]
    fn a_lone_stream_gets_the_whole_window_and_the_download_bound_applies_only_while_shared() {
        const K: usize = 1024;
        let session = Arc::new(AtomicUsize::new(0));
        let (a, _a_slot) = shared(2048 * K, 256 * K, &session);
        assert_eq!(a.initial_window, 2048 * K as u32, "alone at its open");
        assert_eq!(send_and_read(&a, 2048 * K), 2048 * K, "alone: all back");

        // A sibling opens: it starts at the bound; a, which has its whole
        // window out, gets nothing back until it is below the bound.
        let (b, b_slot) = shared(2048 * K, 256 * K, &session);
        assert_eq!(b.initial_window, 256 * K as u32, "a sibling's first window");
        assert_eq!(send_and_read(&a, 1024 * K), 0, "1 MiB still granted");
        assert_eq!(
            send_and_read(&a, 1024 * K - 224 * K),
            0,
            "224 KiB granted: less than a batch below the bound"
        );
        assert_eq!(
            send_and_read(&a, 64 * K),
            96 * K,
            "160 KiB granted: topped up to the bound"
        );
        assert_eq!(send_and_read(&a, 64 * K), 64 * K, "a quarter of the bound");
        assert_eq!(
            send_and_read(&b, 256 * K),
            256 * K,
            "b is held to the bound"
        );

        // The sibling closes: a is alone again and gets its whole window.
        drop((b, b_slot));
        assert_eq!(session.load(Ordering::Relaxed), 1);
        assert_eq!(send_and_read(&a, 64 * K), 1856 * K, "back to 2 MiB");
        assert_eq!(a.inbound.lock().unwrap().committed, 2048 * K);
    }

    #[test]
    fn a_download_bound_below_the_grant_batch_still_regrants() {
        // The limits' batch is a 32nd of the window (64 KiB of 2 MiB); a
        // bound of 32 KiB is re-granted in quarters of it, never starved.
        const K: usize = 1024;
        let session = Arc::new(AtomicUsize::new(1));
        let (s, _slot) = shared(2048 * K, 32 * K, &session);
        assert_eq!(s.initial_window, 32 * K as u32);
        for _ in 0..4 {
            assert_eq!(send_and_read(&s, 8 * K), 8 * K);
        }
        assert_eq!(s.inbound.lock().unwrap().committed, 32 * K);
    }

    #[test]
    fn first_windows_come_out_of_the_budget_and_never_below_one_packet() {
        const K: usize = 1024;
        let limits = Arc::new(StreamLimits::new(256 * K, 300 * K));
        let a = budgeted(&limits);
        let b = budgeted(&limits);
        let c = budgeted(&limits);
        assert_eq!(a.initial_window, 256 * K as u32, "a whole window");
        assert_eq!(
            b.initial_window,
            (32 + 76) * K as u32,
            "what the budget had left"
        );
        assert_eq!(c.initial_window, 32 * K as u32, "one packet, free");
        assert_eq!(limits.committed(), 300 * K);
        drop((a, b));
        assert_eq!(
            limits.committed(),
            0,
            "closed streams give their budget back"
        );
        drop(c);
    }

    #[test]
    fn a_spent_budget_grants_one_packet_and_wakes_the_waiters_when_it_frees() {
        const K: usize = 1024;
        let limits = Arc::new(StreamLimits::new(256 * K, 256 * K));
        let a = budgeted(&limits);
        let b = budgeted(&limits);
        let c = budgeted(&limits);
        assert_eq!(b.initial_window, 64 * K as u32, "what the budget had left");
        assert_eq!(c.initial_window, 32 * K as u32, "one packet, free");
        assert_eq!(limits.committed(), 256 * K, "spent by the first windows");
        // A reader that keeps up keeps its whole window.
        assert_eq!(send_and_read(&a, 256 * K), 256 * K);
        // b's reader read half its window: it gets back what that freed and
        // no more, and waits in line for the rest.
        assert_eq!(send_and_read(&b, 32 * K), 32 * K);
        assert!(b.inbound.lock().unwrap().awaiting_budget);
        // c's reader read its packet: the packet comes back, free.
        assert_eq!(send_and_read(&c, 32 * K), 32 * K);
        assert!(c.inbound.lock().unwrap().awaiting_budget);
        assert_eq!(limits.committed(), 256 * K, "never above the budget");
        let b_woken = Arc::new(Flag(AtomicBool::new(false)));
        b.inbound.lock().unwrap().waker = Some(b_woken.clone().into());
        let c_woken = Arc::new(Flag(AtomicBool::new(false)));
        c.inbound.lock().unwrap().waker = Some(c_woken.clone().into());

        // a's node ends the stream: its unused window frees; b, first in
        // line, is woken and takes what it lacks when its reader runs, then
        // passes the turn on (as `poll_take` does).
        a.deliver(ChannelMsg::Eof);
        assert_eq!(limits.committed(), 32 * K, "b's share only");
        assert!(b_woken.0.load(Ordering::Acquire), "b was woken");
        assert!(!c_woken.0.load(Ordering::Acquire), "one at a time");
        let granted = b.settle(&mut b.inbound.lock().unwrap(), 0);
        assert_eq!(granted, 192 * K, "the rest of b's window");
        limits.wake_waiters();
        assert!(c_woken.0.load(Ordering::Acquire), "then c");
        let granted = c.settle(&mut c.inbound.lock().unwrap(), 0);
        assert_eq!(granted, 32 * K, "what was left");
        assert_eq!(limits.committed(), 256 * K);
        drop((a, b, c));
        assert_eq!(
            limits.committed(),
            0,
            "closed streams give their budget back"
        );
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
    fn a_refused_open_is_not_a_reset() {
        // russh drops the channel as it hands the refusal to the opener,
        // who gives the stream up.
        let (s, counters, metrics) = pending(1 << 20);
        s.detached();
        s.abandon();
        assert!(s.inbound.lock().unwrap().reset.is_none());
        assert_eq!(counters.resets.load(Ordering::Acquire), 0);
        let text = metrics.encode();
        let resets = text
            .lines()
            .filter(|l| l.starts_with("nodetunnel_stream_resets_total{"));
        assert!(resets.clone().count() > 0, "{text}");
        assert!(resets.clone().all(|l| l.ends_with(" 0")), "{text}");
        assert_eq!(metrics.errors_last_minute(), 0);
    }

    #[test]
    fn a_channel_dropped_between_its_confirmation_and_the_opener_is_lost_once() {
        // The node confirmed, then the session died before the opener ran.
        let (s, counters, metrics) = pending(1 << 20);
        s.detached();
        s.confirm();
        assert!(matches!(
            s.inbound.lock().unwrap().reset,
            Some((StreamResetReason::SessionLost, _))
        ));
        assert_eq!(counters.resets.load(Ordering::Acquire), 1);
        assert!(metrics
            .encode()
            .contains("nodetunnel_stream_resets_total{reason=\"session_lost\"} 1"));
        // The same, but the node had ended the stream first: nothing lost.
        let (s, counters, _) = pending(1 << 20);
        s.deliver(ChannelMsg::Data {
            data: Bytes::from_static(b"short answer"),
        });
        s.deliver(ChannelMsg::Eof);
        s.detached();
        s.confirm();
        assert!(s.inbound.lock().unwrap().reset.is_none());
        assert_eq!(counters.resets.load(Ordering::Acquire), 0);
        assert_eq!(read_all(&s), b"short answer");
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
