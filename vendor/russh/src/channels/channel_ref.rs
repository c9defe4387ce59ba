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
    /// if less than the window the peer offers in its open confirmation.
    /// What the peer has not consumed queues in front of every other
    /// channel's data on the same connection (in its socket and in its
    /// single-threaded decryption when it is the bottleneck), so a smaller
    /// bound keeps small writes of other channels from waiting behind a
    /// bulk upload. It applies only to peers known to re-grant window after
    /// a few packets consumed ([`peer_regrants_early`]), and is never less
    /// than four of the peer's packets: a peer that re-grants only when half
    /// of the window it offered is consumed would never re-grant a bound
    /// below that half. `None`: the peer's whole window, as upstream.
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

    /// (nodetunnel patch) The send window the channel's writers get when
    /// the peer confirms the open offering `offered` bytes with packets of
    /// at most `max_packet`: the sink's [`ChannelSink::send_window_limit`]
    /// (at least four packets) if the peer re-grants early, else `offered`.
    /// The session keeps its own account of the peer's real window; this
    /// only holds the writers below it, and each WINDOW_ADJUST adds to both.
    pub(crate) fn send_window(&self, offered: u32, max_packet: u32, peer_regrants_early: bool) -> u32 {
        match self.sink.as_ref().and_then(|sink| sink.send_window_limit()) {
            Some(limit) if peer_regrants_early => {
                offered.min(limit.max(max_packet.saturating_mul(4)))
            }
            _ => offered,
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
    use super::*;

    struct Bounded(Option<u32>);

    impl ChannelSink for Bounded {
        fn deliver(&self, _: ChannelMsg) {}
        fn detached(&self) {}
        fn send_window_limit(&self) -> Option<u32> {
            self.0
        }
    }

    fn with(limit: Option<u32>) -> ChannelRef {
        let (sender, _) = tokio::sync::mpsc::channel(1);
        ChannelRef::with_sink(sender, Arc::new(Bounded(limit)))
    }

    const MIB2: u32 = 2 << 20;
    const PACKET: u32 = 32 * 1024;

    #[test]
    fn an_openssh_peer_gets_the_sinks_limit() {
        assert_eq!(with(Some(256 * 1024)).send_window(MIB2, PACKET, true), 256 * 1024);
    }

    #[test]
    fn the_limit_is_never_below_four_of_the_peers_packets() {
        assert_eq!(with(Some(1)).send_window(MIB2, PACKET, true), 4 * PACKET);
    }

    #[test]
    fn a_peer_offering_less_than_the_limit_keeps_its_window() {
        assert_eq!(with(Some(256 * 1024)).send_window(64 * 1024, PACKET, true), 64 * 1024);
    }

    #[test]
    fn a_peer_not_known_to_regrant_early_gets_its_whole_window() {
        assert_eq!(with(Some(256 * 1024)).send_window(MIB2, PACKET, false), MIB2);
        assert_eq!(with(None).send_window(MIB2, PACKET, true), MIB2);
        let (sender, _) = tokio::sync::mpsc::channel(1);
        assert_eq!(ChannelRef::new(sender).send_window(MIB2, PACKET, true), MIB2);
    }

    #[test]
    fn only_openssh_identifications_regrant_early() {
        assert!(peer_regrants_early(b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3"));
        assert!(!peer_regrants_early(b"SSH-2.0-dropbear_2022.83"));
        assert!(!peer_regrants_early(b"SSH-2.0-russh_0.65.1"));
        assert!(!peer_regrants_early(b"SSH-2.0-OpenSSH"));
    }
}
