//! Tunnel core against real OpenSSH sshd on loopback: many parallel streams
//! with byte-exact checksums (also across dozens of key exchanges started by
//! either end), half-close, and `nodetunnel dial` as `ssh -W`.

mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use nodetunnel::config::Config;
use nodetunnel::manager::TunnelManager;
use nodetunnel::metrics::Metrics;
use sha2::{Digest, Sha256};
use support::{parse_sink_reply, spawn_local, ClientKey, ServerKind, Sshd, SshdOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Bed {
    _dir: tempfile::TempDir,
    sshd: Sshd,
    config_path: std::path::PathBuf,
}

fn bed() -> Bed {
    bed_with(&[], "")
}

/// A bed whose sshd has `sshd_extra` config lines and whose nodetunnel
/// config has `ssh_extra` lines in its `[ssh]` table.
fn bed_with(sshd_extra: &[&str], ssh_extra: &str) -> Bed {
    let dir = tempfile::tempdir().unwrap();
    let key = ClientKey::generate(dir.path()).unwrap();
    let sshd = Sshd::start(SshdOptions {
        authorized_keys: vec![key.public_line.clone()],
        extra_config: sshd_extra.iter().map(|l| (*l).to_string()).collect(),
        ..SshdOptions::default()
    })
    .expect("start OpenSSH sshd (bash .ci/run installs openssh-server)");
    let config_path = dir.path().join("nodetunnel.toml");
    std::fs::write(
        &config_path,
        format!(
            "[ssh]\nuser = \"{user}\"\nidentity = \"{identity}\"\nknown_hosts = \"{kh}\"\n\
             keepalive_interval = \"5s\"\n{ssh_extra}\n[[nodes]]\nname = \"local\"\naddresses = [\"127.0.0.1\"]\nssh_port = {port}\n",
            user = Sshd::user(),
            identity = key.private_path.display(),
            kh = sshd.known_hosts_path().display(),
            port = sshd.port(),
        ),
    )
    .unwrap();
    Bed {
        _dir: dir,
        sshd,
        config_path,
    }
}

async fn ready_manager(bed: &Bed) -> Arc<TunnelManager> {
    let config = Config::load(&bed.config_path).unwrap();
    let manager =
        TunnelManager::new(&config, config.routing.clone(), Arc::new(Metrics::new())).unwrap();
    manager.apply(config.nodes.clone());
    if let Err(e) = manager.wait_ready("local", Duration::from_secs(20)).await {
        panic!(
            "tunnel to sshd not ready: {e}\nsshd log:\n{}",
            bed.sshd.log()
        );
    }
    manager
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// `streams` streams of `len` bytes each through `manager`'s node: every
/// fourth to an echo server (checked on the way back), the rest to a sink
/// (which reports count and checksum). Panics on any difference; the bytes
/// sent.
async fn move_byte_exact(manager: &Arc<TunnelManager>, streams: usize, len: usize) -> usize {
    let sink = spawn_local(ServerKind::sink(local(0))).unwrap();
    let echo = spawn_local(ServerKind::echo(local(0))).unwrap();
    let mut tasks = Vec::new();
    for i in 0..streams {
        let manager = manager.clone();
        let (port, is_echo) = if i % 4 == 0 {
            (echo.port(), true)
        } else {
            (sink.port(), false)
        };
        tasks.push(tokio::spawn(async move {
            let data = support::pattern_bytes(i as u64, len);
            let expected = hex(&Sha256::digest(&data));
            let stream = manager.dial_node("local", "127.0.0.1", port).await.unwrap();
            let (mut rx, mut tx) = tokio::io::split(stream);
            let writer = tokio::spawn(async move {
                for chunk in data.chunks(100_000) {
                    tx.write_all(chunk).await.unwrap();
                }
                tx.shutdown().await.unwrap();
                tx
            });
            let mut reply = Vec::new();
            rx.read_to_end(&mut reply).await.unwrap();
            let _tx = writer.await.unwrap();
            if is_echo {
                assert_eq!(reply.len(), len, "stream {i}: echo length");
                assert_eq!(
                    hex(&Sha256::digest(&reply)),
                    expected,
                    "stream {i}: echo bytes"
                );
            } else {
                let (count, digest) = parse_sink_reply(&String::from_utf8_lossy(&reply)).unwrap();
                assert_eq!(count as usize, len, "stream {i}: sink count");
                assert_eq!(digest, expected, "stream {i}: sink checksum");
            }
            len
        }));
    }
    let mut moved = 0;
    for t in tasks {
        moved += t.await.unwrap();
    }
    moved
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_parallel_streams_move_100_mb_byte_exact() {
    const STREAMS: usize = 32;
    const TOTAL: usize = 100 * 1000 * 1000;
    let bed = bed();
    let manager = ready_manager(&bed).await;
    let moved = move_byte_exact(&manager, STREAMS, TOTAL / STREAMS).await;
    assert_eq!(moved, TOTAL / STREAMS * STREAMS);
    let status = manager.tunnel("local").unwrap().status();
    assert_eq!(status.streams_total, STREAMS as u64);
    assert!(status.bytes_to_node >= moved as u64);
    assert_eq!(status.stream_resets, 0);
    manager.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_cross_key_exchanges_started_by_either_end_byte_exact() {
    // Eight streams move 4 MB each while keys are renegotiated over and
    // over: first sshd starts them (RekeyLimit 256K), then nodetunnel
    // (ssh.rekey_limit = 512 KiB). Nothing may be lost, no stream reset,
    // the session never re-established.
    support::russh_log::install();
    for (sshd_extra, ssh_extra, by) in [
        (&["RekeyLimit 256K"][..], "", "sshd"),
        (&[][..], "rekey_limit = 524288\n", "nodetunnel"),
    ] {
        let by_server = support::russh_log::count("server has initiated re-key");
        let began = support::russh_log::count("beginning re-key");
        let bed = bed_with(sshd_extra, ssh_extra);
        let manager = ready_manager(&bed).await;
        let moved = move_byte_exact(&manager, 8, 4 * 1000 * 1000).await;
        assert_eq!(moved, 8 * 4 * 1000 * 1000);
        let status = manager.tunnel("local").unwrap().status();
        assert_eq!(status.stream_resets, 0, "rekeys by {by}: {status:?}");
        assert_eq!(
            status.handshakes, 1,
            "rekeys by {by}: the session was never lost: {status:?}"
        );
        let by_server = support::russh_log::count("server has initiated re-key") - by_server;
        // Other tests of this binary add their sessions' first key
        // exchange (a handful) to this count; ours add dozens.
        let began = support::russh_log::count("beginning re-key") - began;
        eprintln!("rekeys by {by}: {began} key exchanges began, {by_server} started by sshd");
        match by {
            "sshd" => assert!(by_server >= 10, "only {by_server} rekeys started by sshd"),
            _ => assert!(began >= 20, "only {began} key exchanges began"),
        }
        manager.shutdown(Duration::from_secs(2)).await;
    }
}

#[tokio::test]
async fn half_close_reaches_the_destination_and_the_reply_still_arrives() {
    let bed = bed();
    let manager = ready_manager(&bed).await;
    let sink = spawn_local(ServerKind::sink(local(0))).unwrap();
    let mut stream = manager
        .dial_node("local", "127.0.0.1", sink.port())
        .await
        .unwrap();
    stream.write_all(b"request body").await.unwrap();
    // The sink answers only once it saw EOF: the half-close must cross sshd.
    stream.shutdown().await.unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).await.unwrap();
    let (count, digest) = parse_sink_reply(&reply).unwrap();
    assert_eq!(count, 12);
    assert_eq!(digest, hex(&Sha256::digest(b"request body")));
    drop(stream);
    manager.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn a_refused_channel_names_the_node_and_the_reason() {
    let bed = bed();
    let manager = ready_manager(&bed).await;
    let closed = support::free_loopback_port().unwrap();
    let err = manager
        .dial_node("local", "127.0.0.1", closed)
        .await
        .unwrap_err();
    assert_eq!(err.http_status(), 502, "{err}");
    assert!(
        err.to_string().contains("node local refused the channel"),
        "{err}"
    );
    // The session is unharmed.
    let echo = spawn_local(ServerKind::echo(local(0))).unwrap();
    let mut s = manager
        .dial_node("local", "127.0.0.1", echo.port())
        .await
        .unwrap();
    s.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
    // The session task handled the refusal before that echo: the refused
    // channel was never a stream, so nothing was reset or lost.
    let metrics = manager.metrics().encode();
    // Every reset reason is exported from the start, at 0.
    assert!(
        metrics
            .lines()
            .filter(|l| l.starts_with("nodetunnel_stream_resets_total{"))
            .all(|l| l.ends_with(" 0")),
        "{metrics}"
    );
    assert_eq!(manager.metrics().errors_last_minute(), 0, "{metrics}");
    let status = manager.status();
    assert_eq!(status[0].stream_resets, 0, "{status:?}");
    drop(s);
    manager.shutdown(Duration::from_secs(2)).await;
}

#[test]
fn nodetunnel_dial_pipes_stdin_and_stdout_like_ssh_w() {
    let bed = bed();
    let echo = spawn_local(ServerKind::echo(local(0))).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_nodetunnel"))
        .args(["dial", "--config"])
        .arg(&bed.config_path)
        .args(["local", &format!("127.0.0.1:{}", echo.port())])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let payload = support::pattern_bytes(7, 3 * 1024 * 1024);
    let mut stdin = child.stdin.take().unwrap();
    let writer = {
        let payload = payload.clone();
        std::thread::spawn(move || {
            stdin.write_all(&payload).unwrap();
            // Dropping stdin is EOF: dial half-closes, echo finishes, dial exits.
        })
    };
    let output = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(
        output.status.success(),
        "dial failed: {}\nsshd log:\n{}",
        String::from_utf8_lossy(&output.stderr),
        bed.sshd.log()
    );
    assert_eq!(output.stdout.len(), payload.len());
    assert!(
        output.stdout == payload,
        "dial output differs from its input"
    );
}

#[test]
fn nodetunnel_dial_to_an_unknown_node_fails_with_a_clear_message() {
    let bed = bed();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_nodetunnel"))
        .args(["dial", "--config"])
        .arg(&bed.config_path)
        .args(["nope", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no node named \"nope\""), "{stderr}");
    assert!(stderr.contains("local"), "lists the known nodes: {stderr}");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
