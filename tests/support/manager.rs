//! For the suites that drive a [`TunnelManager`] in the test process against
//! real sshd: an echo stream checked byte for byte, a metric's value, the
//! wall clock in Unix seconds, and `ssh-keygen` (certificates are made at
//! test time).

use std::process::Command;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use nodetunnel::manager::TunnelManager;
use nodetunnel::metrics::Metrics;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One echo stream through `node`: `len` bytes of pattern `seed` sent in
/// two halves, `between` run after the first; the bytes must come back
/// exactly.
pub async fn echo_stream<F: std::future::Future<Output = ()>>(
    manager: &Arc<TunnelManager>,
    node: &str,
    echo_port: u16,
    seed: u64,
    len: usize,
    between: F,
) {
    let data = super::pattern_bytes(seed, len);
    let stream = manager
        .dial_node(node, "127.0.0.1", echo_port)
        .await
        .unwrap();
    let (mut rx, mut tx) = tokio::io::split(stream);
    let reader = tokio::spawn(async move {
        let mut back = Vec::new();
        rx.read_to_end(&mut back).await.unwrap();
        back
    });
    tx.write_all(&data[..len / 2]).await.unwrap();
    between.await;
    tx.write_all(&data[len / 2..]).await.unwrap();
    tx.shutdown().await.unwrap();
    let back = reader.await.unwrap();
    assert_eq!(back.len(), len, "{node}: echo length");
    assert!(back == data, "{node}: echo bytes differ");
}

/// The value of one metric series (`name{labels}`), 0 if absent.
pub fn metric(metrics: &Metrics, series: &str) -> f64 {
    metrics
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Now, in Unix seconds.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// `ssh-keygen ARGS` (times in UTC), which must succeed; its stdout.
pub fn ssh_keygen(args: &[&str]) -> String {
    let out = Command::new("ssh-keygen")
        .args(args)
        .env("TZ", "UTC")
        .output()
        .expect("ssh-keygen (openssh-client) runs");
    assert!(
        out.status.success(),
        "ssh-keygen {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
