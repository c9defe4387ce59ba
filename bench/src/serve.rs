//! `serve`: the node side of the benchmarks (run inside the node's network
//! namespace, reached through the node's sshd).
//!
//! - sink: read to EOF, answer the count as a u64 big-endian, close;
//! - counted sink: read a u64 big-endian N, then N bytes; answer N (u64
//!   big-endian), then read to EOF and close. For the gRPC front door,
//!   whose protocol has no half-close: its client cannot send EOF and then
//!   read the count;
//! - source: read a u64 big-endian N, write N bytes, close;
//! - echo: write back what is read, until EOF.
//!
//! `--lifetime-secs` (default 3600) bounds the process: it exits by itself.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::args::Args;
use crate::client::{pattern, read_to_eof, write_n, CHUNK};

pub async fn run(args: &Args) -> Result<(), String> {
    let lifetime = Duration::from_secs(args.get_parse("lifetime-secs", 3600u64)?);
    let pattern = Arc::new(pattern());
    let mut tasks = Vec::new();
    for (kind, key) in [
        (Kind::Sink, "sink"),
        (Kind::CountedSink, "counted-sink"),
        (Kind::Source, "source"),
        (Kind::Echo, "echo"),
    ] {
        let Some(addr) = args.get(key) else { continue };
        let addr: SocketAddr = addr.parse().map_err(|e| format!("--{key}: {e}"))?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("binding the {key} server on {addr}: {e}"))?;
        eprintln!("nodetunnel-bench serve: {key} on {addr}");
        let pattern = pattern.clone();
        tasks.push(tokio::spawn(accept_loop(listener, kind, pattern)));
    }
    if tasks.is_empty() {
        return Err("nothing to serve: give --sink, --counted-sink, --source and/or --echo".into());
    }
    tokio::time::sleep(lifetime).await;
    eprintln!("nodetunnel-bench serve: lifetime of {lifetime:?} over, exiting");
    Ok(())
}

#[derive(Clone, Copy)]
enum Kind {
    Sink,
    CountedSink,
    Source,
    Echo,
}

async fn accept_loop(listener: TcpListener, kind: Kind, pattern: Arc<Vec<u8>>) {
    loop {
        let (s, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                eprintln!("nodetunnel-bench serve: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = s.set_nodelay(true);
        let pattern = pattern.clone();
        tokio::spawn(async move {
            let _ = match kind {
                Kind::Sink => sink(s).await,
                Kind::CountedSink => counted_sink(s).await,
                Kind::Source => source(s, &pattern).await,
                Kind::Echo => echo(s).await,
            };
        });
    }
}

async fn sink(mut s: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let n = read_to_eof(&mut s, &mut buf).await?;
    s.write_all(&n.to_be_bytes()).await?;
    s.shutdown().await?;
    Ok(())
}

async fn counted_sink(mut s: TcpStream) -> std::io::Result<()> {
    let mut n = [0u8; 8];
    s.read_exact(&mut n).await?;
    let n = u64::from_be_bytes(n);
    let mut buf = vec![0u8; CHUNK];
    let mut left = n;
    while left > 0 {
        let want = (CHUNK as u64).min(left) as usize;
        let got = s.read(&mut buf[..want]).await?;
        if got == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("counted sink: EOF after {} of {n} bytes", n - left),
            ));
        }
        left -= got as u64;
    }
    s.write_all(&n.to_be_bytes()).await?;
    read_to_eof(&mut s, &mut buf).await?;
    s.shutdown().await?;
    Ok(())
}

async fn source(mut s: TcpStream, pattern: &[u8]) -> std::io::Result<()> {
    let mut n = [0u8; 8];
    s.read_exact(&mut n).await?;
    write_n(&mut s, pattern, u64::from_be_bytes(n)).await?;
    s.shutdown().await?;
    let mut buf = [0u8; 4096];
    read_to_eof(&mut s, &mut buf).await?;
    Ok(())
}

async fn echo(mut s: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        s.write_all(&buf[..n]).await?;
    }
    s.shutdown().await?;
    Ok(())
}
