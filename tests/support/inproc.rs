//! The tunnel manager against in-process SSH nodes (tests/ssh_node), all in
//! the test process: a client key, the `[ssh]` table those suites share, a
//! known_hosts file, waits on a tunnel's state, and an echo destination.
//! Used by `tunnel_inprocess`, `inventory_file` and `inventory_kubernetes`.

use std::path::Path;
use std::time::Duration;

use nodetunnel::manager::TunnelManager;
use nodetunnel::tunnel::{TunnelState, TunnelStatus};
use russh::keys::PublicKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Bound on every wait.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// The `[ssh]` table of these suites (user `test`, `id_ed25519` and
/// `known_hosts` in the config's directory, 5 s connect/handshake/auth
/// bounds, backoff 20..200 ms, keepalive 1 s), without a trailing blank
/// line so that a suite can add keys.
pub const SSH_TOML: &str =
    "[ssh]\nuser = \"test\"\nidentity = \"id_ed25519\"\nknown_hosts = \"known_hosts\"\n\
     connect_timeout = \"5s\"\nhandshake_timeout = \"5s\"\nauth_timeout = \"5s\"\n\
     backoff_base = \"20ms\"\nbackoff_max = \"200ms\"\nkeepalive_interval = \"1s\"\n";

/// A fresh temp dir with a new client key `id_ed25519` in it; the dir and
/// the key's public half.
pub fn key_dir() -> (tempfile::TempDir, PublicKey) {
    let dir = tempfile::tempdir().unwrap();
    let key = nodetunnel::keys::generate(dir.path(), "id_ed25519", "test").unwrap();
    let client = nodetunnel::keys::load_identity(&key.private_path, None)
        .unwrap()
        .public_key()
        .clone();
    (dir, client)
}

/// Write `dir/known_hosts` with `lines`.
pub fn write_known_hosts(dir: &Path, lines: &[String]) {
    std::fs::write(dir.join("known_hosts"), lines.join("\n") + "\n").unwrap();
}

/// Wait (bounded) until `node` reaches `want`; returns its last status.
pub async fn wait_state(manager: &TunnelManager, node: &str, want: TunnelState) -> TunnelStatus {
    let tunnel = manager.tunnel(node).expect("tunnel exists");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let changed = tunnel.changed().notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let status = tunnel.status();
        if status.state == want {
            return status;
        }
        if tokio::time::timeout_at(deadline, changed).await.is_err() {
            panic!("node {node} never reached {want:?}; last status {status:?}");
        }
    }
}

/// Wait (bounded) until `node`'s tunnel is Ready.
pub async fn wait_ready(manager: &TunnelManager, node: &str) {
    wait_state(manager, node, TunnelState::Ready).await;
}

/// An echo server on 127.0.0.1 that echoes until EOF, then half-closes;
/// its port.
pub async fn echo_server() -> u16 {
    echo_server_at("127.0.0.1").await
}

/// [`echo_server`] on another loopback address.
pub async fn echo_server_at(ip: &str) -> u16 {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = socket.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    port
}

/// The period of [`source_server`]'s pattern: byte `i` of every stream is
/// `i % PATTERN_PERIOD` (a prime, so that a lost or repeated chunk shows).
pub const PATTERN_PERIOD: usize = 251;

/// One period-aligned chunk of the pattern.
pub fn pattern_chunk() -> Vec<u8> {
    (0..PATTERN_PERIOD * 256)
        .map(|i| (i % PATTERN_PERIOD) as u8)
        .collect()
}

/// A server on 127.0.0.1 that sends the pattern to every connection: `len`
/// bytes then a close, or without end (`None`) until the connection
/// breaks. It never reads. Its port.
pub async fn source_server(len: Option<usize>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move { send_pattern(&mut socket, len).await });
        }
    });
    port
}

/// Send `len` bytes of the pattern (without end: `None`) to `socket`, then
/// half-close it; stops quietly when the peer goes away.
pub async fn send_pattern(socket: &mut tokio::net::TcpStream, len: Option<usize>) {
    let chunk = pattern_chunk();
    let mut left = len.unwrap_or(usize::MAX);
    while left > 0 {
        let n = left.min(chunk.len());
        if socket.write_all(&chunk[..n]).await.is_err() {
            return;
        }
        left -= n;
    }
    let _ = socket.shutdown().await;
}

/// Send `word` through `stream` (to an echo server) and expect it back.
pub async fn ping<S: AsyncReadExt + AsyncWriteExt + Unpin>(stream: &mut S, word: &[u8]) {
    stream.write_all(word).await.expect("write through tunnel");
    let mut buf = vec![0u8; word.len()];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut buf))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(buf, word);
}
