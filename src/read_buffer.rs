//! The read buffer between an SSH session and its TCP socket.
//!
//! russh reads a packet's length, then its body: unbuffered, that is two
//! `recv` calls per 32 KiB packet. A big buffer halves the syscalls of a busy
//! session but would cost its size on every idle one (thousands of nodes).
//! [`ElasticReader`] grows while reads keep filling it (up to
//! [`MAX_BUFFER`]) and falls back to [`MIN_BUFFER`] once the session has been
//! quiet for [`SHRINK_AFTER`], so idle sessions stay small and busy ones get
//! large reads. Writes pass straight through.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Buffer of a quiet session.
pub const MIN_BUFFER: usize = 4 * 1024;
/// Largest buffer of a busy session.
pub const MAX_BUFFER: usize = 256 * 1024;
/// A session whose reads have not filled its buffer for this long goes back
/// to [`MIN_BUFFER`] at its next empty read.
pub const SHRINK_AFTER: Duration = Duration::from_secs(1);

/// A read buffer that grows under load and shrinks when idle. See the
/// module docs.
#[derive(Debug)]
pub struct ElasticReader<S> {
    inner: S,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    last_full: Instant,
}

impl<S> ElasticReader<S> {
    /// Wrap `inner` with a [`MIN_BUFFER`] buffer.
    pub fn new(inner: S) -> Self {
        ElasticReader {
            inner,
            buf: vec![0; MIN_BUFFER],
            start: 0,
            end: 0,
            last_full: Instant::now(),
        }
    }

    /// The current buffer size (for tests and status).
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ElasticReader<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.start == this.end {
            this.start = 0;
            this.end = 0;
            // A read as large as a fully grown buffer goes straight to the
            // caller (smaller ones are buffered, so the buffer can grow).
            if this.buf.len() == MAX_BUFFER && out.remaining() >= MAX_BUFFER {
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            let mut fill = ReadBuf::new(&mut this.buf);
            match Pin::new(&mut this.inner).poll_read(cx, &mut fill) {
                Poll::Pending => {
                    if this.buf.len() > MIN_BUFFER && this.last_full.elapsed() >= SHRINK_AFTER {
                        this.buf = vec![0; MIN_BUFFER];
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            let n = fill.filled().len();
            this.end = n;
            if n == this.buf.len() {
                this.last_full = Instant::now();
                if this.buf.len() < MAX_BUFFER {
                    // Reads fill the buffer: the session is busy. The data
                    // stays where it is; the buffer grows behind it.
                    let bigger = (this.buf.len() * 2).min(MAX_BUFFER);
                    this.buf.resize(bigger, 0);
                }
            }
            if n == 0 {
                return Poll::Ready(Ok(()));
            }
        }
        let n = (this.end - this.start).min(out.remaining());
        out.put_slice(&this.buf[this.start..this.start + n]);
        this.start += n;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ElasticReader<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn bytes_arrive_in_order_through_small_and_large_reads() {
        let (mut far, near) = tokio::io::duplex(1 << 20);
        let mut reader = ElasticReader::new(near);
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            far.write_all(&sent).await.unwrap();
            far.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        let mut small = [0u8; 5];
        // Small reads (as russh reads packet lengths), then bulk.
        for _ in 0..100 {
            reader.read_exact(&mut small).await.unwrap();
            got.extend_from_slice(&small);
        }
        reader.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert_eq!(got, data);
    }

    #[tokio::test]
    async fn the_buffer_grows_while_reads_fill_it() {
        let (mut far, near) = tokio::io::duplex(1 << 20);
        let mut reader = ElasticReader::new(near);
        far.write_all(&vec![1u8; 1 << 20]).await.unwrap();
        let mut byte = [0u8; 1];
        let mut total = 0;
        while total < (1 << 20) {
            reader.read_exact(&mut byte).await.unwrap();
            total += 1;
        }
        assert_eq!(reader.capacity(), MAX_BUFFER);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_session_falls_back_to_the_small_buffer() {
        let (mut far, near) = tokio::io::duplex(1 << 20);
        let mut reader = ElasticReader::new(near);
        far.write_all(&vec![1u8; 64 * 1024]).await.unwrap();
        let mut sink = vec![0u8; 64 * 1024];
        let mut byte = [0u8; 1];
        for _ in 0..(64 * 1024) {
            reader.read_exact(&mut byte).await.unwrap();
        }
        assert!(reader.capacity() > MIN_BUFFER);
        // Quiet for longer than SHRINK_AFTER (virtual time).
        tokio::time::advance(SHRINK_AFTER + Duration::from_millis(1)).await;
        let pending = tokio::time::timeout(Duration::from_millis(10), reader.read(&mut sink)).await;
        assert!(pending.is_err(), "nothing to read");
        assert_eq!(reader.capacity(), MIN_BUFFER);
        far.write_all(b"after").await.unwrap();
        let n = reader.read(&mut sink).await.unwrap();
        assert_eq!(&sink[..n], b"after");
    }
}
