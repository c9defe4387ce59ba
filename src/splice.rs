//! The copy loop between a client connection and a tunnelled stream.
//!
//! [`splice`] moves bytes both ways until both directions are done. EOF in
//! one direction is forwarded as a half-close (TCP FIN, SSH CHANNEL_EOF) and
//! leaves the other direction open; an error in either direction ends both.

use tokio::io::{AsyncRead, AsyncWrite};

/// Buffer per direction. 64 KiB keeps syscalls per SSH packet (32 KiB) low
/// while bounding memory: 128 KiB per spliced connection.
pub const SPLICE_BUFFER: usize = 64 * 1024;

/// Bytes moved by a finished [`splice`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Spliced {
    /// Bytes read from the client and written into the tunnel.
    pub client_to_tunnel: u64,
    /// Bytes read from the tunnel and written to the client.
    pub tunnel_to_client: u64,
}

/// [`splice`], but give up as soon as `cut` resolves: the tunnel side is
/// gone, so the client connection is closed at once even if the client
/// stopped reading (the copy would otherwise wait on it forever).
pub async fn splice_until<C, T>(
    client: &mut C,
    tunnel: &mut T,
    cut: impl std::future::Future<Output = String>,
) -> std::io::Result<Spliced>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    T: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    tokio::select! {
        moved = splice(client, tunnel) => moved,
        reason = cut => Err(std::io::Error::new(std::io::ErrorKind::ConnectionAborted, reason)),
    }
}

/// Copy `client` <-> `tunnel` with half-close until both directions ended.
///
/// Returns the byte counts, or the first I/O error (both sides are dropped
/// by the caller, which closes them).
pub async fn splice<C, T>(client: &mut C, tunnel: &mut T) -> std::io::Result<Spliced>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    T: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (up, down) =
        tokio::io::copy_bidirectional_with_sizes(client, tunnel, SPLICE_BUFFER, SPLICE_BUFFER)
            .await?;
    Ok(Spliced {
        client_to_tunnel: up,
        tunnel_to_client: down,
    })
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

    #[tokio::test]
    async fn a_cut_ends_the_splice_even_when_the_client_stopped_reading() {
        // A client that never reads, a tunnel with more to send than the
        // client connection can hold: the copy blocks writing to the client.
        let (_client, mut client_end) = tokio::io::duplex(16);
        let (mut tunnel, mut tunnel_end) = tokio::io::duplex(1 << 20);
        tunnel.write_all(&[7u8; 4096]).await.unwrap();
        let (cut_tx, cut_rx) = tokio::sync::oneshot::channel::<String>();
        let task = tokio::spawn(async move {
            splice_until(&mut client_end, &mut tunnel_end, async {
                cut_rx.await.unwrap_or_default()
            })
            .await
        });
        cut_tx.send("session lost".into()).unwrap();
        let err = task.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionAborted);
        assert_eq!(err.to_string(), "session lost");
    }
}
