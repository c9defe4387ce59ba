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
