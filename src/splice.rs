//! The copy loop between a client connection and a tunnelled stream.
//!
//! [`splice`] moves bytes both ways until both directions are done. EOF in
//! one direction is forwarded as a half-close (TCP FIN, SSH CHANNEL_EOF) and
//! leaves the other direction open; an error in either direction ends both.
//!
//! The two directions are not copied alike:
//!
//! - **client to tunnel**: read into a [`SPLICE_BUFFER`], written into the
//!   stream (which frames it into channel data).
//! - **tunnel to client**: the stream hands over the chunks it received
//!   ([`TunnelIo::poll_read_chunks`]; for a tunnelled stream, the decrypted
//!   SSH packets themselves) and they go to the client in vectored writes,
//!   up to [`SPLICE_BUFFER`] at a time. No copy in between: on a download
//!   that is one 32 KiB copy per packet less than a read into a buffer
//!   (docs/benchmarks.md).

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::dial::TunnelIo;

/// Bytes in flight per direction: the client-to-tunnel buffer at its
/// largest, and the most taken from the stream before it was written to the
/// client. 64 KiB keeps syscalls per SSH packet (32 KiB) low while bounding
/// memory: 128 KiB per busy spliced connection.
pub const SPLICE_BUFFER: usize = 64 * 1024;

/// The client-to-tunnel buffer a connection reads into first. It grows (x4,
/// up to [`SPLICE_BUFFER`]) when a read fills it, so an upload reaches full
/// size after two reads. A connection that has not filled it (a `kubectl
/// logs -f`, an idle `exec`) holds it only while it reads: it is given back
/// whenever the client has nothing to send, so a quiet connection holds no
/// buffer at all.
pub const SPLICE_BUFFER_INITIAL: usize = 4 * 1024;

/// Chunks in one vectored write to the client, at most.
const MAX_SLICES: usize = 16;

/// Rounds a direction runs in one poll before it yields, so that a stream
/// whose both ends are always ready does not hold its worker thread.
const ROUNDS_PER_POLL: usize = 32;

/// Bytes a splice has moved so far. [`splice_counting`] adds to it as it
/// writes, so the counts hold what got through however the splice ends:
/// both ways done, an I/O error, a cut, or its future dropped (a
/// connection task aborted).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Spliced {
    /// Bytes read from the client and written into the tunnel.
    pub client_to_tunnel: u64,
    /// Bytes read from the tunnel and written to the client.
    pub tunnel_to_client: u64,
}

/// A side of the splice: which one reached its end of stream first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The client finished sending.
    Client,
    /// The tunnel finished sending.
    Tunnel,
}

/// [`splice_counting`], but give up as soon as `cut` resolves: the tunnel
/// side is gone, so the client connection is closed at once even if the
/// client stopped reading (the copy would otherwise wait on it forever).
/// `moved` keeps what got through before the cut.
pub async fn splice_until<C, T>(
    client: &mut C,
    tunnel: &mut T,
    cut: impl std::future::Future<Output = String>,
    moved: &mut Spliced,
) -> io::Result<Side>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    T: TunnelIo + ?Sized,
{
    tokio::select! {
        first = splice_counting(client, tunnel, moved) => first,
        reason = cut => Err(io::Error::new(io::ErrorKind::ConnectionAborted, reason)),
    }
}

/// Copy `client` <-> `tunnel` with half-close until both directions ended.
///
/// Returns the byte counts, or the first I/O error (both sides are dropped
/// by the caller, which closes them). A caller that needs the counts after
/// an error uses [`splice_counting`].
pub async fn splice<C, T>(client: &mut C, tunnel: &mut T) -> io::Result<Spliced>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    T: TunnelIo + ?Sized,
{
    let mut moved = Spliced::default();
    splice_counting(client, tunnel, &mut moved).await?;
    Ok(moved)
}

/// Copy `client` <-> `tunnel` with half-close until both directions ended,
/// adding the bytes written each way to `moved` as they go (so they are
/// there after an error too, or if this future is dropped).
///
/// Returns the side whose end of stream came first, or the first I/O
/// error (both sides are dropped by the caller, which closes them).
pub async fn splice_counting<C, T>(
    client: &mut C,
    tunnel: &mut T,
    moved: &mut Spliced,
) -> io::Result<Side>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    T: TunnelIo + ?Sized,
{
    let mut up = Direction::new(Buffered {
        buf: Box::default(),
        pos: 0,
        filled: 0,
    });
    let mut down = Direction::new(Chunks::default());
    let mut first_eof = None;
    std::future::poll_fn(|cx| {
        if !up.done {
            let poll = up.poll_copy(cx, client, tunnel, &mut moved.client_to_tunnel);
            if up.read_done {
                first_eof.get_or_insert(Side::Client);
            }
            if let Poll::Ready(Err(e)) = poll {
                return Poll::Ready(Err(e));
            }
        }
        if !down.done {
            let poll = down.poll_copy(cx, tunnel, client, &mut moved.tunnel_to_client);
            if down.read_done {
                first_eof.get_or_insert(Side::Tunnel);
            }
            if let Poll::Ready(Err(e)) = poll {
                return Poll::Ready(Err(e));
            }
        }
        match first_eof {
            Some(first) if up.done && down.done => Poll::Ready(Ok(first)),
            _ => Poll::Pending,
        }
    })
    .await
}

/// What one direction holds between taking it from its source (`R`) and
/// writing it to its destination (`W`).
trait Held<R: ?Sized, W: ?Sized> {
    /// Nothing is left to write.
    fn is_empty(&self) -> bool;
    /// Take more from `reader` (only called when empty); `Ready(Ok(0))` at
    /// its end.
    fn poll_fill(&mut self, cx: &mut Context<'_>, reader: &mut R) -> Poll<io::Result<usize>>;
    /// Write some of what is held to `writer`; the bytes written.
    fn poll_drain(&mut self, cx: &mut Context<'_>, writer: &mut W) -> Poll<io::Result<usize>>;
}

/// One direction of the splice: what it holds, and the copy loop around
/// it (tokio's copy: flush while the source has nothing, half-close at its
/// end).
struct Direction<H> {
    held: H,
    read_done: bool,
    need_flush: bool,
    done: bool,
}

impl<H> Direction<H> {
    fn new(held: H) -> Self {
        Direction {
            held,
            read_done: false,
            need_flush: false,
            done: false,
        }
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
        moved: &mut u64,
    ) -> Poll<io::Result<()>>
    where
        H: Held<R, W>,
        R: ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        for _ in 0..ROUNDS_PER_POLL {
            if self.held.is_empty() && !self.read_done {
                match self.held.poll_fill(cx, reader) {
                    Poll::Ready(Ok(n)) => self.read_done = n == 0,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        if self.need_flush {
                            ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            while !self.held.is_empty() {
                let n = ready!(self.held.poll_drain(cx, writer))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                *moved += n as u64;
                self.need_flush = true;
            }
            if self.read_done {
                if self.need_flush {
                    ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                    self.need_flush = false;
                }
                ready!(Pin::new(&mut *writer).poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// Client to tunnel: through a buffer; `buf[pos..filled]` is still to be
/// written. Empty (no allocation) while a quiet client has nothing to send.
struct Buffered {
    buf: Box<[u8]>,
    pos: usize,
    filled: usize,
}

impl<R, W> Held<R, W> for Buffered
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    fn is_empty(&self) -> bool {
        self.pos == self.filled
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>, reader: &mut R) -> Poll<io::Result<usize>> {
        if self.buf.is_empty() {
            self.buf = vec![0; SPLICE_BUFFER_INITIAL].into_boxed_slice();
        }
        let mut read = ReadBuf::new(&mut self.buf);
        if Pin::new(&mut *reader)
            .poll_read(cx, &mut read)?
            .is_pending()
        {
            // Nothing to read, and nothing held (only an empty buffer is
            // filled): a client that never filled the first buffer gives it
            // back until it sends again. A grown one is kept: its client
            // sends in bulk and will soon again.
            if self.buf.len() == SPLICE_BUFFER_INITIAL {
                self.buf = Box::default();
            }
            return Poll::Pending;
        }
        let n = read.filled().len();
        if n == self.buf.len() && n < SPLICE_BUFFER {
            // Full: the client sends more than a few bytes. The bytes just
            // read move into the larger buffer (once or twice per
            // connection).
            let mut larger = vec![0; (n * 4).min(SPLICE_BUFFER)].into_boxed_slice();
            larger[..n].copy_from_slice(&self.buf[..n]);
            self.buf = larger;
        }
        self.pos = 0;
        self.filled = n;
        Poll::Ready(Ok(n))
    }

    fn poll_drain(&mut self, cx: &mut Context<'_>, writer: &mut W) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut *writer).poll_write(cx, &self.buf[self.pos..self.filled]))?;
        self.pos += n;
        Poll::Ready(Ok(n))
    }
}

/// Tunnel to client: the stream's own chunks, at most [`SPLICE_BUFFER`],
/// in vectored writes.
#[derive(Default)]
struct Chunks {
    pending: VecDeque<Bytes>,
}

impl<T, W> Held<T, W> for Chunks
where
    T: TunnelIo + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>, tunnel: &mut T) -> Poll<io::Result<usize>> {
        let n = ready!(tunnel.poll_read_chunks(cx, &mut self.pending, SPLICE_BUFFER))?;
        // Empty chunks would make an empty vectored write.
        self.pending.retain(|chunk| !chunk.is_empty());
        Poll::Ready(Ok(n))
    }

    fn poll_drain(&mut self, cx: &mut Context<'_>, writer: &mut W) -> Poll<io::Result<usize>> {
        let mut slices = [IoSlice::new(&[]); MAX_SLICES];
        let used = slices
            .iter_mut()
            .zip(&self.pending)
            .map(|(slot, chunk)| *slot = IoSlice::new(chunk))
            .count();
        let n = ready!(Pin::new(&mut *writer).poll_write_vectored(cx, &slices[..used]))?;
        // Drop the written bytes from the front.
        let mut left = n;
        while left > 0 {
            let Some(front) = self.pending.front_mut() else {
                break;
            };
            if front.len() <= left {
                left -= front.len();
                self.pending.pop_front();
            } else {
                front.advance(left);
                left = 0;
            }
        }
        Poll::Ready(Ok(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn half_close_forwards_eof_and_keeps_the_other_direction_open() {
        let (mut client, mut client_end) = tokio::io::duplex(1024);
        let (mut tunnel, mut tunnel_end) = tokio::io::duplex(1024);
        let task = tokio::spawn(async move { splice(&mut client_end, &mut tunnel_end).await });

        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        tunnel.read_to_end(&mut got).await.unwrap(); // EOF forwarded
        assert_eq!(got, b"request");

        // The reply direction still works after the request side closed.
        tunnel.write_all(b"reply").await.unwrap();
        tunnel.shutdown().await.unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"reply");

        let moved = task.await.unwrap().unwrap();
        assert_eq!(
            moved,
            Spliced {
                client_to_tunnel: 7,
                tunnel_to_client: 5
            }
        );
    }

    /// Fill `held` once from `reader`, which has data ready.
    fn fill(held: &mut Buffered, reader: &mut &[u8]) -> usize {
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        match Held::<&[u8], Vec<u8>>::poll_fill(held, &mut cx, reader) {
            Poll::Ready(Ok(n)) => n,
            other => panic!("a ready reader gave {other:?}"),
        }
    }

    fn initial_buffer() -> Buffered {
        Buffered {
            buf: vec![0; SPLICE_BUFFER_INITIAL].into_boxed_slice(),
            pos: 0,
            filled: 0,
        }
    }

    #[test]
    fn a_client_that_sends_a_few_bytes_keeps_the_small_buffer() {
        let mut held = initial_buffer();
        for _ in 0..10 {
            let mut reader: &[u8] = b"0123456789abcdef";
            assert_eq!(fill(&mut held, &mut reader), 16);
            held.pos = held.filled;
        }
        assert_eq!(held.buf.len(), SPLICE_BUFFER_INITIAL);
    }

    /// A reader with nothing to read yet.
    struct Quiet;
    impl AsyncRead for Quiet {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    #[test]
    fn a_quiet_client_holds_no_buffer_and_gets_one_when_it_sends() {
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        let mut held = Buffered {
            buf: Box::default(),
            pos: 0,
            filled: 0,
        };
        let waiting = Held::<Quiet, Vec<u8>>::poll_fill(&mut held, &mut cx, &mut Quiet);
        assert!(waiting.is_pending());
        assert!(held.buf.is_empty(), "a buffer held while nothing came");
        let mut reader: &[u8] = b"a line";
        assert_eq!(fill(&mut held, &mut reader), 6);
        assert_eq!(&held.buf[..6], b"a line");
        held.pos = held.filled;
        let waiting = Held::<Quiet, Vec<u8>>::poll_fill(&mut held, &mut cx, &mut Quiet);
        assert!(waiting.is_pending());
        assert!(
            held.buf.is_empty(),
            "given back once written and quiet again"
        );
    }

    #[test]
    fn a_grown_buffer_is_kept_while_its_client_pauses() {
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        let mut held = initial_buffer();
        let full = vec![7u8; SPLICE_BUFFER_INITIAL];
        assert_eq!(fill(&mut held, &mut &full[..]), SPLICE_BUFFER_INITIAL);
        held.pos = held.filled;
        let waiting = Held::<Quiet, Vec<u8>>::poll_fill(&mut held, &mut cx, &mut Quiet);
        assert!(waiting.is_pending());
        assert_eq!(held.buf.len(), 4 * SPLICE_BUFFER_INITIAL);
    }

    #[test]
    fn the_buffer_grows_to_the_full_size_when_reads_fill_it_and_keeps_the_bytes() {
        let payload: Vec<u8> = (0..SPLICE_BUFFER * 2).map(|i| (i % 251) as u8).collect();
        let mut reader: &[u8] = &payload;
        let mut held = initial_buffer();
        let mut sizes = Vec::new();
        let mut got = Vec::new();
        while !reader.is_empty() {
            let n = fill(&mut held, &mut reader);
            got.extend_from_slice(&held.buf[..n]);
            held.pos = held.filled;
            sizes.push(held.buf.len());
        }
        assert_eq!(got, payload);
        assert_eq!(&sizes[..3], &[16 * 1024, SPLICE_BUFFER, SPLICE_BUFFER]);
    }

    #[tokio::test]
    async fn an_upload_larger_than_the_buffer_arrives_whole_and_in_order() {
        let payload: Vec<u8> = (0..(5 * SPLICE_BUFFER + 123))
            .map(|i| (i % 253) as u8)
            .collect();
        let (mut client, mut client_end) = tokio::io::duplex(8 * 1024);
        let (mut tunnel, mut tunnel_end) = tokio::io::duplex(8 * 1024);
        let task = tokio::spawn(async move { splice(&mut client_end, &mut tunnel_end).await });
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let mut got = Vec::new();
        tunnel.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, payload);
        drop(tunnel);
        drop(writer.await.unwrap());
        let moved = task.await.unwrap().unwrap();
        assert_eq!(moved.client_to_tunnel, payload.len() as u64);
    }

    #[tokio::test]
    async fn a_download_larger_than_the_buffer_arrives_whole_and_in_order() {
        let payload: Vec<u8> = (0..(5 * SPLICE_BUFFER + 123))
            .map(|i| (i % 251) as u8)
            .collect();
        let (mut client, mut client_end) = tokio::io::duplex(4096);
        let (mut tunnel, mut tunnel_end) = tokio::io::duplex(8192);
        let task = tokio::spawn(async move { splice(&mut client_end, &mut tunnel_end).await });
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            tunnel.write_all(&sent).await.unwrap();
            tunnel.shutdown().await.unwrap();
            tunnel
        });
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert!(got == payload, "{} of {} bytes", got.len(), payload.len());
        let moved = task.await.unwrap().unwrap();
        assert_eq!(moved.tunnel_to_client, payload.len() as u64);
        drop(writer.await.unwrap());
    }

    /// A tunnel that hands out its data in chunks of the given sizes, and
    /// takes nothing.
    struct Chunked {
        chunks: VecDeque<Bytes>,
    }

    impl AsyncRead for Chunked {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            unreachable!("the splice reads chunks")
        }
    }

    impl AsyncWrite for Chunked {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl TunnelIo for Chunked {
        fn poll_read_chunks(
            &mut self,
            _: &mut Context<'_>,
            out: &mut VecDeque<Bytes>,
            max: usize,
        ) -> Poll<io::Result<usize>> {
            // As TunnelStream: whole chunks while they fit, the last one
            // split at `max`.
            let mut taken = 0;
            while taken < max {
                let Some(mut chunk) = self.chunks.pop_front() else {
                    break;
                };
                if chunk.len() > max - taken {
                    self.chunks.push_front(chunk.split_off(max - taken));
                }
                taken += chunk.len();
                out.push_back(chunk);
            }
            Poll::Ready(Ok(taken))
        }
    }

    /// A client that takes at most `per_write` bytes per write, from
    /// however many slices, and records what it got.
    struct Trickle {
        got: Vec<u8>,
        per_write: usize,
        vectored_writes: usize,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(())) // EOF at once: nothing goes up
        }
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            let n = buf.len().min(this.per_write);
            this.got.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            this.vectored_writes += 1;
            let mut left = this.per_write;
            for buf in bufs {
                let n = buf.len().min(left);
                this.got.extend_from_slice(&buf[..n]);
                left -= n;
                if left == 0 {
                    break;
                }
            }
            Poll::Ready(Ok(this.per_write - left))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn chunks_written_partially_across_slices_arrive_whole_and_in_order() {
        // Chunks of odd sizes (some empty), a client that takes 1,000
        // bytes per write: writes end inside chunks and span several.
        let mut sent = Vec::new();
        let mut chunks = VecDeque::new();
        for (i, len) in [1usize, 0, 4096, 33, 32_768, 7, 0, 65_536, 999, 20_000]
            .into_iter()
            .enumerate()
        {
            let data: Vec<u8> = (0..len).map(|j| (i * 41 + j) as u8).collect();
            sent.extend_from_slice(&data);
            chunks.push_back(Bytes::from(data));
        }
        let mut tunnel = Chunked { chunks };
        let mut client = Trickle {
            got: Vec::new(),
            per_write: 1000,
            vectored_writes: 0,
        };
        let moved = splice(&mut client, &mut tunnel).await.unwrap();
        assert!(
            client.got == sent,
            "{} of {} bytes",
            client.got.len(),
            sent.len()
        );
        assert_eq!(moved.tunnel_to_client, sent.len() as u64);
        assert!(client.vectored_writes >= sent.len() / 1000);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Whatever the chunk sizes and however little the client takes per
        /// write, every byte arrives once and in order.
        #[test]
        fn any_chunks_through_any_writes_arrive_whole_and_in_order(
            sizes in proptest::collection::vec(0usize..70_000, 0..24),
            per_write in 1usize..100_000,
        ) {
            let mut sent = Vec::new();
            let mut chunks = VecDeque::new();
            for (i, len) in sizes.iter().enumerate() {
                let data: Vec<u8> = (0..*len).map(|j| (i * 7 + j * 13) as u8).collect();
                sent.extend_from_slice(&data);
                chunks.push_back(Bytes::from(data));
            }
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let (got, moved) = runtime.block_on(async {
                let mut tunnel = Chunked { chunks };
                let mut client = Trickle { got: Vec::new(), per_write, vectored_writes: 0 };
                let moved = splice(&mut client, &mut tunnel).await.unwrap();
                (client.got, moved)
            });
            proptest::prop_assert!(got == sent, "{} of {} bytes", got.len(), sent.len());
            proptest::prop_assert_eq!(moved.tunnel_to_client, sent.len() as u64);
        }
    }

    #[tokio::test]
    async fn a_cut_ends_the_splice_even_when_the_client_stopped_reading() {
        // A client that never reads, a tunnel with more to send than the
        // client connection can hold: the copy blocks writing to the client.
        let (_client, mut client_end) = tokio::io::duplex(16);
        let (mut tunnel, mut tunnel_end) = tokio::io::duplex(1 << 20);
        tunnel.write_all(&[7u8; 4096]).await.unwrap();
        let (cut_tx, cut_rx) = tokio::sync::oneshot::channel::<String>();
        let task = tokio::spawn(async move {
            let mut moved = Spliced::default();
            splice_until(
                &mut client_end,
                &mut tunnel_end,
                async { cut_rx.await.unwrap_or_default() },
                &mut moved,
            )
            .await
        });
        cut_tx.send("session lost".into()).unwrap();
        let err = task.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionAborted);
        assert_eq!(err.to_string(), "session lost");
    }

    /// A tunnel that takes every write, hands out its chunks, then fails.
    struct FailsAfterChunks {
        chunks: VecDeque<Bytes>,
        written: usize,
    }

    impl AsyncRead for FailsAfterChunks {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            unreachable!("the splice reads chunks")
        }
    }

    impl AsyncWrite for FailsAfterChunks {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.get_mut().written += b.len();
            Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl TunnelIo for FailsAfterChunks {
        fn poll_read_chunks(
            &mut self,
            _: &mut Context<'_>,
            out: &mut VecDeque<Bytes>,
            _: usize,
        ) -> Poll<io::Result<usize>> {
            match self.chunks.pop_front() {
                Some(chunk) => {
                    let n = chunk.len();
                    out.push_back(chunk);
                    Poll::Ready(Ok(n))
                }
                None => Poll::Ready(Err(io::ErrorKind::ConnectionReset.into())),
            }
        }
    }

    #[tokio::test]
    async fn a_splice_ending_in_an_error_reports_the_bytes_moved_before_the_error() {
        // The client has sent a request and waits; the tunnel answers part
        // of it, then its read fails.
        let (mut client, mut client_end) = tokio::io::duplex(1024);
        client.write_all(b"request").await.unwrap();
        let mut tunnel = FailsAfterChunks {
            chunks: VecDeque::from([Bytes::from_static(b"reply, "), Bytes::from_static(b"part")]),
            written: 0,
        };
        let mut moved = Spliced::default();
        let err = splice_counting(&mut client_end, &mut tunnel, &mut moved)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(tunnel.written, 7);
        assert_eq!(
            moved,
            Spliced {
                client_to_tunnel: 7,
                tunnel_to_client: 11
            }
        );
        let mut got = [0u8; 11];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"reply, part");
    }

    #[tokio::test]
    async fn the_side_whose_end_of_stream_came_first_is_reported() {
        for first in [Side::Client, Side::Tunnel] {
            let (mut client, mut client_end) = tokio::io::duplex(1024);
            let (mut tunnel, mut tunnel_end) = tokio::io::duplex(1024);
            let task = tokio::spawn(async move {
                let mut moved = Spliced::default();
                splice_counting(&mut client_end, &mut tunnel_end, &mut moved).await
            });
            // The first side finishes, and the splice forwards its EOF to
            // the other before that one finishes too.
            let (first_end, second_end) = match first {
                Side::Client => (&mut client, &mut tunnel),
                Side::Tunnel => (&mut tunnel, &mut client),
            };
            first_end.shutdown().await.unwrap();
            let mut rest = Vec::new();
            second_end.read_to_end(&mut rest).await.unwrap();
            second_end.shutdown().await.unwrap();
            assert_eq!(task.await.unwrap().unwrap(), first);
        }
    }
}
