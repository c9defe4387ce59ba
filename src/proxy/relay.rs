//! An established tunnel: the splice between a client connection and its
//! tunnelled stream, and how the client connection is closed.
//!
//! A tunnel that ends cleanly (EOF both ways: the destination finished and
//! the client half-closed or closed) closes the client connection with a
//! FIN, as any TCP server does. A tunnel that ends any other way must not
//! look complete to the client, which may have no framing of its own to
//! tell a truncated response from a whole one. That covers a stream cut on
//! the tunnel side (its node's SSH session was lost, the node broke flow
//! control: [`TunnelIo::cut`], or a read error of the stream), a connection
//! task aborted at the shutdown drain deadline, and any I/O error. Its
//! client connection is closed abortively ([`ClientIo::abort_on_close`]):
//!
//! - **TCP** (HTTP CONNECT with or without mTLS, SOCKS5): `SO_LINGER` 0, so
//!   that the close sends RST. The client reads what had already reached
//!   it, then gets `ECONNRESET`; bytes still in nodetunnel's send buffer
//!   are dropped (they belong to a stream that is incomplete anyway). Over
//!   mTLS no `close_notify` is sent either.
//! - **Unix socket**: there is no reset. Linux reports `ECONNRESET` to the
//!   peer of a Unix stream socket closed with unread bytes in its receive
//!   queue, so a client that had sent bytes nodetunnel had not read yet
//!   gets `ECONNRESET`; otherwise it reads EOF, as after a clean end, and
//!   only its own framing (TLS, HTTP) can tell. Nodetunnel stops reading
//!   the client as soon as the tunnel is cut, and never drains it before
//!   closing, so whatever the client sent after that stays unread. A client
//!   that writes afterwards gets `EPIPE`.
//!
//! Every abortive close is logged by the connection's task (in its
//! `connection` span: listener, peer, dest, node, stream), with `cause`
//! and `reason`: `client connection reset` (or, on a Unix socket, `client
//! connection closed without a reset (Unix socket)`) at info level for
//! `cause` `tunnel_cut` (the reason is the stream's reset message or the
//! tunnel's I/O error) and `aborted` (the drain deadline); at debug level
//! for `client_error`, where the client broke the connection itself. Why the stream was cut is also
//! counted: `nodetunnel_stream_resets_total{reason}` (`session_lost`,
//! `window_exceeded` by the stream, `drain_deadline` by the listener).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::audit_trail::{clean_end, cut_end, OpenTunnel};
use crate::audit::End;
use crate::dial::TunnelIo;
use crate::splice::splice_until;

/// What an abortive close does to the client (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AbortiveClose {
    /// TCP: the close sends RST.
    Reset,
    /// Unix socket: a plain close (EOF, or `ECONNRESET` if the client's
    /// bytes were left unread).
    Close,
}

/// A client connection as a listener accepted it: the socket, or TLS over
/// it.
pub(crate) trait ClientIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Make the coming close abortive, as far as the socket type allows.
    fn abort_on_close(&self) -> io::Result<AbortiveClose>;
}

impl ClientIo for tokio::net::TcpStream {
    fn abort_on_close(&self) -> io::Result<AbortiveClose> {
        self.set_zero_linger()?;
        Ok(AbortiveClose::Reset)
    }
}

impl ClientIo for tokio::net::UnixStream {
    fn abort_on_close(&self) -> io::Result<AbortiveClose> {
        Ok(AbortiveClose::Close)
    }
}

impl<I: ClientIo> ClientIo for tokio_rustls::server::TlsStream<I> {
    fn abort_on_close(&self) -> io::Result<AbortiveClose> {
        self.get_ref().0.abort_on_close()
    }
}

/// hyper's upgraded connection when it could not be turned back into the
/// socket it was served on (not expected: see `http_connect::serve`).
impl ClientIo for hyper_util::rt::TokioIo<hyper::upgrade::Upgraded> {
    fn abort_on_close(&self) -> io::Result<AbortiveClose> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the upgraded connection does not expose its socket",
        ))
    }
}

/// Who ended a tunnel that did not end cleanly.
enum Ending {
    /// The tunnel side: the stream was cut, or its I/O failed.
    Tunnel(String),
    /// The client side's I/O failed.
    Client(String),
}

/// The client end of an established tunnel. Dropped without
/// [`finished_cleanly`](Self::finished_cleanly), it closes abortively and
/// logs why; that includes being dropped because its task was aborted.
struct ClientEnd<I: ClientIo> {
    io: I,
    clean: bool,
    ending: Option<Ending>,
}

impl<I: ClientIo> ClientEnd<I> {
    fn finished_cleanly(&mut self) {
        self.clean = true;
    }
}

impl<I: ClientIo> Drop for ClientEnd<I> {
    fn drop(&mut self) {
        if self.clean {
            return;
        }
        let ending = self.ending.take();
        let client_side = matches!(ending, Some(Ending::Client(_)));
        let (cause, reason) = match ending {
            Some(Ending::Tunnel(reason)) => ("tunnel_cut", reason),
            Some(Ending::Client(reason)) => ("client_error", reason),
            None => (
                "aborted",
                "the connection was aborted before its tunnel ended (shutdown drain deadline)"
                    .to_string(),
            ),
        };
        match self.io.abort_on_close() {
            // The client broke its own connection: not news.
            Ok(_) if client_side => tracing::debug!(
                cause,
                reason = %reason,
                "client connection closed after a client-side error"
            ),
            Ok(AbortiveClose::Reset) => tracing::info!(
                cause,
                reason = %reason,
                "client connection reset"
            ),
            Ok(AbortiveClose::Close) => tracing::info!(
                cause,
                reason = %reason,
                "client connection closed without a reset (Unix socket)"
            ),
            Err(error) => tracing::warn!(
                cause,
                reason = %reason,
                error = %error,
                "client connection closed without a reset: cannot reset it"
            ),
        }
    }
}

/// The tunnel side of the splice, remembering whether its I/O failed (so
/// that an error can be told from one of the client's).
struct TunnelSide<T> {
    inner: T,
    failed: bool,
}

impl<T> TunnelSide<T> {
    fn note<R>(&mut self, poll: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        if let Poll::Ready(Err(_)) = &poll {
            self.failed = true;
        }
        poll
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for TunnelSide<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.note(poll)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TunnelSide<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.note(poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.note(poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_flush(cx);
        this.note(poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.note(poll)
    }
}

impl<T: TunnelIo> TunnelIo for TunnelSide<T> {
    fn cut(&self) -> Pin<Box<dyn std::future::Future<Output = String> + Send + 'static>> {
        self.inner.cut()
    }

    fn poll_read_chunks(
        &mut self,
        cx: &mut TaskContext<'_>,
        out: &mut std::collections::VecDeque<bytes::Bytes>,
        max: usize,
    ) -> Poll<io::Result<usize>> {
        let poll = self.inner.poll_read_chunks(cx, out, max);
        self.note(poll)
    }
}

/// Run an established tunnel to its end: forward `early` (bytes the client
/// sent with its request, bounded by `early_timeout`), then splice `io`
/// with `tunnel` until both directions ended or the tunnel is cut. Closes
/// `io` with a FIN after a clean end, abortively otherwise (module docs).
/// `audit` is the tunnel's record: told how the tunnel ended, and written
/// when it is dropped (also when this future is, at the drain deadline).
pub(crate) async fn relay<I, T>(
    io: I,
    tunnel: T,
    early: &[u8],
    early_timeout: Duration,
    mut audit: OpenTunnel,
) where
    I: ClientIo,
    T: TunnelIo,
{
    let mut client_end = ClientEnd {
        io,
        clean: false,
        ending: None,
    };
    let cut_fired = AtomicBool::new(false);
    let cut = tunnel.cut();
    let mut cut = std::pin::pin!(async {
        let reason = cut.await;
        cut_fired.store(true, Ordering::Release);
        reason
    });
    let mut tunnel = TunnelSide {
        inner: tunnel,
        failed: false,
    };
    if !early.is_empty() {
        let forward = tokio::time::timeout(early_timeout, tunnel.inner.write_all(early));
        let failed = tokio::select! {
            forwarded = forward => match forwarded {
                Ok(Ok(())) => None,
                Ok(Err(error)) => Some(format!(
                    "cannot forward the client's early data into the tunnel: {error}"
                )),
                Err(_) => Some(format!(
                    "cannot forward the client's early data into the tunnel: no room within {}",
                    humantime::format_duration(early_timeout)
                )),
            },
            reason = &mut cut => Some(reason),
        };
        if let Some(reason) = failed {
            client_end.ending = Some(Ending::Tunnel(reason));
            audit.ended(
                cut_end(tunnel.inner.reset_label()),
                tunnel.inner.reset_label(),
            );
            return;
        }
        audit.moved().client_to_tunnel += early.len() as u64;
    }
    // The splice counts into the audit record as it goes: what got through
    // is there however the tunnel ends, also when this future is dropped.
    match splice_until(&mut client_end.io, &mut tunnel, &mut cut, audit.moved()).await {
        Ok(first_eof) => {
            client_end.finished_cleanly();
            audit.ended(clean_end(first_eof), None);
            let moved = *audit.moved();
            tracing::debug!(
                client_to_tunnel = moved.client_to_tunnel,
                tunnel_to_client = moved.tunnel_to_client,
                "tunnel closed"
            );
        }
        Err(error) => {
            let reset = tunnel.inner.reset_label();
            client_end.ending = Some(if cut_fired.load(Ordering::Acquire) || tunnel.failed {
                audit.ended(cut_end(reset), reset);
                Ending::Tunnel(error.to_string())
            } else {
                audit.ended(End::ClientError, None);
                Ending::Client(error.to_string())
            });
        }
    }
}
