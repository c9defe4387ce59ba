use std::sync::Arc;

use tokio::sync::mpsc::error::{SendError, TrySendError};
use tokio::sync::mpsc::Sender;

use super::WindowSizeRef;
use crate::ChannelMsg;

/// (nodetunnel patch) Receives a channel's messages inside the session task,
/// instead of the channel's bounded queue.
///
/// Once a channel opened with a sink is confirmed, every message for it
/// (data, EOF, close, window adjustments, requests) is handed to
/// [`ChannelSink::deliver`] by the task that runs the session, as the
/// packet is processed: no queue, no hand-off to another task, and the
/// session never waits on a slow consumer. `deliver` must therefore be
/// quick and must not block (append to a buffer, wake a reader).
/// [`ChannelSink::detached`] is called once when the session forgets the
/// channel: after a close, or because the session ended.
pub trait ChannelSink: Send + Sync + 'static {
    /// A message for the channel, in the order the peer sent them.
    fn deliver(&self, msg: ChannelMsg);
    /// The session dropped the channel (closed, or the session is gone).
    fn detached(&self);
    /// (nodetunnel patch) The receive window to offer the peer in the
    /// channel open, if smaller than `client::Config::window_size` (which
    /// stays the most the window is ever re-opened to). `None`: the
    /// configured window, as upstream.
    fn initial_window(&self) -> Option<u32> {
        None
    }
    /// (nodetunnel patch) The most of this channel's data that may be sent
    /// and not yet consumed by the peer (re-granted by its WINDOW_ADJUST),
    /// if less than the window the peer offers. Asked before every write,
    /// so it may change over the channel's life (e.g. bound only while
    /// other channels of the session are open). What the peer has not
    /// consumed queues in front of every other channel's data on the same
    /// connection (in its socket and in its single-threaded decryption when
    /// it is the bottleneck), so a smaller bound keeps small writes of other
    /// channels from waiting behind a bulk upload. It applies only to peers
    /// known to re-grant window after a few packets consumed
    /// ([`peer_regrants_early`]), and is never less than four of the peer's
    /// packets: a peer that re-grants only when half of the window it
    /// offered is consumed would never re-grant a bound below that half.
    /// `None`: the peer's whole window, as upstream.
    fn send_window_limit(&self) -> Option<u32> {
        None
    }
}

/// (nodetunnel patch) Whether the peer re-grants a channel's window once a
/// few packets of it are consumed, not only after half of it: OpenSSH does
/// (`channel_check_window`: once more than three of its packets are
/// consumed, or half the window), so a sender may keep less than half of the
/// window in flight without stalling. Other implementations are assumed to
/// re-grant at half the window only.
pub(crate) fn peer_regrants_early(remote_sshid: &[u8]) -> bool {
    remote_sshid.starts_with(b"SSH-2.0-OpenSSH_")
}

/// A handle to the [`super::Channel`]'s to be able to transmit messages
/// to it and update it's `window_size`.
pub struct ChannelRef {
    pub(super) sender: Sender<ChannelMsg>,
    pub(super) window_size: WindowSizeRef,
    /// (nodetunnel patch) Where messages go after the open confirmation.
    pub(super) sink: Option<Arc<dyn ChannelSink>>,
}

impl std::fmt::Debug for ChannelRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelRef")
            .field("window_size", &self.window_size)
            .field("sink", &self.sink.is_some())
            .finish()
    }
}

impl ChannelRef {
    pub fn new(sender: Sender<ChannelMsg>) -> Self {
        Self {
            sender,
            window_size: WindowSizeRef::new(0),
            sink: None,
        }
    }

    /// (nodetunnel patch) A channel whose messages after the open
    /// confirmation go to `sink`; the open confirmation or failure still
    /// goes to `sender`, for the opener.
    pub fn with_sink(sender: Sender<ChannelMsg>, sink: Arc<dyn ChannelSink>) -> Self {
        Self {
            sender,
            window_size: WindowSizeRef::new(0),
            sink: Some(sink),
        }
    }

    pub(crate) fn window_size(&self) -> &WindowSizeRef {
        &self.window_size
    }

    /// (nodetunnel patch) The opener has been sent the open confirmation:
    /// a channel with a sink sends nothing more to its queue (everything
    /// after the confirmation goes to the sink), so its sender is swapped
    /// for one of a queue that is already closed. Once the opener drops its
    /// receiver, the channel's queue (a block of 32 messages, about 2.7 KiB
    /// with its state) is freed instead of living as long as the channel.
    pub(crate) fn opener_answered(&mut self) {
        if self.sink.is_some() {
            self.sender = closed_sender();
        }
    }

    /// (nodetunnel patch) At the open confirmation (the peer offered
    /// `offered` bytes of window, packets of at most `max_packet`): if the channel has a sink and the peer re-grants
    /// early, its writers send within the sink's
    /// [`ChannelSink::send_window_limit`] from now on, never below four of
    /// the peer's packets. The session keeps its own account of the peer's
    /// real window; this only holds the writers below it.
    pub(crate) fn bound_sends(&self, offered: u32, max_packet: u32, peer_regrants_early: bool) {
        if let (Some(sink), true) = (&self.sink, peer_regrants_early) {
            self.window_size
                .bound
                .bound_by(sink.clone(), max_packet.saturating_mul(4), offered);
        }
    }

    /// (nodetunnel patch) The receive window to offer in the channel open:
    /// the sink's [`ChannelSink::initial_window`], at most `configured`.
    pub(crate) fn initial_window(&self, configured: u32) -> u32 {
        self.sink
            .as_ref()
            .and_then(|sink| sink.initial_window())
            .map_or(configured, |w| w.min(configured))
    }

    /// (nodetunnel patch) Send `msg` to the channel: to its sink if it has
    /// one (never waits), else to its queue. Shadows `Sender::send`, so every
    /// call site of the session goes through here.
    pub async fn send(&self, msg: ChannelMsg) -> Result<(), SendError<ChannelMsg>> {
        match (&self.sink, msg) {
            (Some(_), msg @ (ChannelMsg::Open { .. } | ChannelMsg::OpenFailure(_))) => {
                self.sender.send(msg).await
            }
            (Some(sink), msg) => {
                sink.deliver(msg);
                Ok(())
            }
            (None, msg) => self.sender.send(msg).await,
        }
    }

    /// (nodetunnel patch) As [`ChannelRef::send`], without waiting.
    pub fn try_send(&self, msg: ChannelMsg) -> Result<(), TrySendError<ChannelMsg>> {
        match (&self.sink, msg) {
            (Some(_), msg @ (ChannelMsg::Open { .. } | ChannelMsg::OpenFailure(_))) => {
                self.sender.try_send(msg)
            }
            (Some(sink), msg) => {
                sink.deliver(msg);
                Ok(())
            }
            (None, msg) => self.sender.try_send(msg),
        }
    }
}

/// (nodetunnel patch) A sender whose receiver is gone, shared by every
/// answered sink channel: sending to it fails at once.
fn closed_sender() -> Sender<ChannelMsg> {
    static CLOSED: std::sync::OnceLock<Sender<ChannelMsg>> = std::sync::OnceLock::new();
    CLOSED
        .get_or_init(|| tokio::sync::mpsc::channel(1).0)
        .clone()
}

impl Drop for ChannelRef {
    fn drop(&mut self) {
        if let Some(sink) = &self.sink {
            sink.detached();
        }
    }
}

impl std::ops::Deref for ChannelRef {
    type Target = Sender<ChannelMsg>;

    fn deref(&self) -> &Self::Target {
        &self.sender
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    /// A sink whose limit the test sets (0: none).
    #[derive(Default)]
    struct Bounded(AtomicU32);

    impl ChannelSink for Bounded {
        fn deliver(&self, _: ChannelMsg) {}
        fn detached(&self) {}
        fn send_window_limit(&self) -> Option<u32> {
            match self.0.load(Ordering::Relaxed) {
                0 => None,
                limit => Some(limit),
            }
        }
    }

    const MIB2: u32 = 2 << 20;
    const PACKET: u32 = 32 * 1024;

    /// A confirmed channel whose peer offered 2 MiB: its ref, its sink.
    async fn confirmed(regrants_early: bool) -> (ChannelRef, Arc<Bounded>) {
        let (sender, _) = tokio::sync::mpsc::channel(1);
        let sink = Arc::new(Bounded::default());
        let channel = ChannelRef::with_sink(sender, sink.clone());
        channel.window_size().grow(MIB2).await;
        channel.bound_sends(MIB2, PACKET, regrants_early);
        (channel, sink)
    }

    #[tokio::test]
    async fn an_answered_sink_channel_lets_go_of_its_queue() {
        let (sender, mut opener) = tokio::sync::mpsc::channel(2);
        let mut channel = ChannelRef::with_sink(sender, Arc::new(Bounded::default()));
        channel
            .send(ChannelMsg::Open {
                id: crate::ChannelId(0),
                max_packet_size: PACKET,
                window_size: MIB2,
            })
            .await
            .expect("the opener listens");
        channel.opener_answered();
        assert!(matches!(opener.recv().await, Some(ChannelMsg::Open { .. })));
        // No sender of the opener's queue is left: it is freed with the
        // receiver.
        assert!(opener.recv().await.is_none());
        assert!(channel
            .try_send(ChannelMsg::OpenFailure(
                crate::ChannelOpenFailure::ConnectFailed
            ))
            .is_err());
        // Data still goes to the sink.
        assert!(channel.try_send(ChannelMsg::Eof).is_ok());
    }

    #[tokio::test]
    async fn a_channel_without_a_sink_keeps_its_queue() {
        let (sender, mut opener) = tokio::sync::mpsc::channel(2);
        let mut channel = ChannelRef::new(sender);
        channel.opener_answered();
        channel
            .send(ChannelMsg::Eof)
            .await
            .expect("the queue is kept");
        assert!(matches!(opener.recv().await, Some(ChannelMsg::Eof)));
    }

    fn room(channel: &ChannelRef, left: u32) -> u32 {
        channel.window_size().bound.room(left)
    }

    #[tokio::test]
    async fn an_openssh_peer_gets_what_is_left_of_the_sinks_limit() {
        let (channel, sink) = confirmed(true).await;
        sink.0.store(256 * 1024, Ordering::Relaxed);
        assert_eq!(room(&channel, MIB2), 256 * 1024, "nothing in flight");
        // 200 KiB sent, none consumed: 56 KiB of room.
        assert_eq!(room(&channel, MIB2 - 200 * 1024), 56 * 1024);
        assert_eq!(room(&channel, MIB2 - 300 * 1024), 0, "beyond the limit");
        // 300 KiB sent; the peer consumed and re-granted 100 KiB of it: 200
        // KiB in flight, 1.8 MiB of window left.
        assert_eq!(room(&channel, MIB2 - 300 * 1024 + 100 * 1024), 56 * 1024);
    }

    #[tokio::test]
    async fn the_limit_follows_the_sink_and_none_is_the_whole_window() {
        let (channel, sink) = confirmed(true).await;
        assert_eq!(room(&channel, MIB2 - 300 * 1024), MIB2 - 300 * 1024);
        sink.0.store(256 * 1024, Ordering::Relaxed);
        assert_eq!(room(&channel, MIB2 - 300 * 1024), 0);
        sink.0.store(0, Ordering::Relaxed);
        assert_eq!(room(&channel, MIB2 - 300 * 1024), MIB2 - 300 * 1024);
    }

    #[tokio::test]
    async fn the_limit_is_never_below_four_of_the_peers_packets() {
        let (channel, sink) = confirmed(true).await;
        sink.0.store(1, Ordering::Relaxed);
        assert_eq!(room(&channel, MIB2), 4 * PACKET);
    }

    #[tokio::test]
    async fn the_room_is_never_more_than_the_window() {
        let (channel, sink) = confirmed(true).await;
        sink.0.store(64 << 20, Ordering::Relaxed);
        assert_eq!(room(&channel, MIB2 - 1024), MIB2 - 1024);
    }

    #[tokio::test]
    async fn a_peer_not_known_to_regrant_early_gets_its_whole_window() {
        let (channel, sink) = confirmed(false).await;
        sink.0.store(256 * 1024, Ordering::Relaxed);
        assert_eq!(room(&channel, MIB2 - 300 * 1024), MIB2 - 300 * 1024);
    }

    #[test]
    fn only_openssh_identifications_regrant_early() {
        assert!(peer_regrants_early(
            b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3"
        ));
        assert!(!peer_regrants_early(b"SSH-2.0-dropbear_2022.83"));
        assert!(!peer_regrants_early(b"SSH-2.0-russh_0.65.1"));
        assert!(!peer_regrants_early(b"SSH-2.0-OpenSSH"));
    }
}
