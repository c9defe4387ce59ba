//! Tunnel core against in-process russh SSH nodes: authentication and
//! host-key failures, a node killed mid-stream, an unreachable node, and
//! head-of-line isolation between streams of one session.

mod ssh_node;
mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nodetunnel::config::Config;
use nodetunnel::manager::TunnelManager;
use nodetunnel::metrics::Metrics;
use nodetunnel::tunnel::TunnelState;
use russh::keys::PublicKey;
use sha2::{Digest, Sha256};
use ssh_node::SshNode;
use support::inproc::{
    echo_server, echo_server_at, key_dir, pattern_chunk, source_server, wait_state,
    write_known_hosts, SSH_TOML,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Fixture {
    dir: tempfile::TempDir,
    client: PublicKey,
}

impl Fixture {
    fn new() -> Fixture {
        let (dir, client) = key_dir();
        Fixture { dir, client }
    }

    fn known_hosts(&self, lines: &[String]) {
        write_known_hosts(self.dir.path(), lines);
    }

    /// A config with `nodes` as (name, port) on 127.0.0.1 and extra [ssh] lines.
    fn config(&self, nodes: &[(&str, u16)], ssh_extra: &str) -> Config {
        self.config_with(nodes, ssh_extra, "")
    }

    /// As [`config`], with extra tables appended (e.g. `[routing]`).
    fn config_with(&self, nodes: &[(&str, u16)], ssh_extra: &str, tables: &str) -> Config {
        let mut text = format!("{SSH_TOML}{ssh_extra}\n");
        for (name, port) in nodes {
            text.push_str(&format!(
                "[[nodes]]\nname = \"{name}\"\naddresses = [\"127.0.0.1\"]\nssh_port = {port}\n"
            ));
        }
        text.push_str(tables);
        let path = self.dir.path().join("nodetunnel.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(&path).unwrap()
    }

    fn manager(&self, config: &Config) -> Arc<TunnelManager> {
        let manager =
            TunnelManager::new(config, config.routing.clone(), Arc::new(Metrics::new())).unwrap();
        manager.apply(config.nodes.clone());
        manager
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Read `stream` to EOF: (bytes, SHA-256).
async fn read_to_end_digest(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
) -> (usize, sha2::digest::Output<Sha256>) {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0usize;
    loop {
        let n = stream.read(&mut buf).await.unwrap();
        if n == 0 {
            return (total, hasher.finalize());
        }
        hasher.update(&buf[..n]);
        total += n;
    }
}

/// SHA-256 of what [`source_server`] sends for `len` bytes.
fn pattern_digest(len: usize) -> sha2::digest::Output<Sha256> {
    let mut expected = Sha256::new();
    let chunk = pattern_chunk();
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len());
        expected.update(&chunk[..n]);
        left -= n;
    }
    expected.finalize()
}

#[tokio::test]
async fn a_stream_carries_bytes_both_ways_with_half_close() {
    let fx = Fixture::new();
    let node = SshNode::start(&fx.client).await;
    fx.known_hosts(&[node.known_hosts_line()]);
    let config = fx.config(&[("node-a", node.addr().port())], "");
    let manager = fx.manager(&config);
    wait_state(&manager, "node-a", TunnelState::Ready).await;

    let echo = echo_server().await;
    let mut stream = manager
        .dial_node("node-a", "127.0.0.1", echo)
        .await
        .unwrap();
    stream.write_all(b"hello through the tunnel").await.unwrap();
    stream.shutdown().await.unwrap(); // EOF towards the node
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).await.unwrap(); // the reply still arrives
    assert_eq!(reply, b"hello through the tunnel");
    drop(stream);
    let status = manager.tunnel("node-a").unwrap().status();
    assert_eq!(status.bytes_to_node, 24);
    assert_eq!(status.bytes_from_node, 24);
    assert_eq!(status.handshakes, 1);
    manager.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn an_unauthorized_key_is_reported_as_auth_failure() {
    let fx = Fixture::new();
    let node = SshNode::start(&fx.client).await;
    node.unauthorize_all();
    fx.known_hosts(&[node.known_hosts_line()]);
    let config = fx.config(&[("node-a", node.addr().port())], "");
    let manager = fx.manager(&config);
    let status = wait_state(&manager, "node-a", TunnelState::Backoff).await;
    assert_eq!(status.failures.get("auth"), Some(&1), "{status:?}");
    let error = status.last_error.unwrap();
    assert!(error.contains("authentication as test"), "{error}");
    assert!(error.contains("SHA256:"), "names our key: {error}");

    // Restoring the key lets the tunnel recover on its own.
    node.authorize(&fx.client);
    wait_state(&manager, "node-a", TunnelState::Ready).await;
    manager.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_changed_host_key_is_refused_under_strict_with_both_fingerprints() {
    let fx = Fixture::new();
    let mut node = SshNode::start(&fx.client).await;
    let old_line = node.known_hosts_line();
    let old = nodetunnel::keys::fingerprint(&node.host_public_key());
    node.replace_host_key();
    node.restart().await;
    let new = nodetunnel::keys::fingerprint(&node.host_public_key());
    fx.known_hosts(&[old_line]);
    let config = fx.config(
        &[("node-a", node.addr().port())],
        "host_key_policy = \"strict\"",
    );
    let manager = fx.manager(&config);
    let status = wait_state(&manager, "node-a", TunnelState::Backoff).await;
    assert_eq!(status.failures.get("host_key"), Some(&1), "{status:?}");
    let error = status.last_error.unwrap();
    assert!(
        error.contains("HOST KEY CHANGED for node node-a"),
        "{error}"
    );
    assert!(
        error.contains(&old) && error.contains(&new),
        "both fingerprints: {error}"
    );
    manager.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_changed_host_key_is_refused_under_accept_new_too() {
    let fx = Fixture::new();
    let mut node = SshNode::start(&fx.client).await;
    let old_line = node.known_hosts_line();
    node.replace_host_key();
    node.restart().await;
    fx.known_hosts(&[old_line]);
    let config = fx.config(
        &[("node-a", node.addr().port())],
        "host_key_policy = \"accept-new\"",
    );
    let manager = fx.manager(&config);
    let status = wait_state(&manager, "node-a", TunnelState::Backoff).await;
    assert_eq!(status.failures.get("host_key"), Some(&1), "{status:?}");
    manager.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn an_unknown_host_key_is_refused_under_strict_and_learned_under_accept_new() {
    let fx = Fixture::new();
    let node = SshNode::start(&fx.client).await;
    fx.known_hosts(&[]);
    let strict = fx.config(&[("node-a", node.addr().port())], "");
    let manager = fx.manager(&strict);
    let status = wait_state(&manager, "node-a", TunnelState::Backoff).await;
    assert_eq!(status.failures.get("host_key"), Some(&1));
    assert!(status.last_error.unwrap().contains("is not in"));
    manager.shutdown(Duration::from_secs(1)).await;

    let learn = fx.config(
        &[("node-a", node.addr().port())],
        "host_key_policy = \"accept-new\"",
    );
    let manager = fx.manager(&learn);
    wait_state(&manager, "node-a", TunnelState::Ready).await;
    manager.shutdown(Duration::from_secs(1)).await;
    let recorded = std::fs::read_to_string(fx.path().join("known_hosts")).unwrap();
    let key = node.host_public_key().to_openssh().unwrap();
    assert!(
        recorded.contains(&format!("[127.0.0.1]:{} {key}", node.addr().port())),
        "{recorded}"
    );

    // Now strict trusts it.
    let manager = fx.manager(&strict);
    wait_state(&manager, "node-a", TunnelState::Ready).await;
    manager.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_node_killed_mid_stream_errors_its_streams_and_the_tunnel_reconnects() {
    let fx = Fixture::new();
    let mut node = SshNode::start(&fx.client).await;
    fx.known_hosts(&[node.known_hosts_line()]);
    let config = fx.config(&[("node-a", node.addr().port())], "");
    let manager = fx.manager(&config);
    wait_state(&manager, "node-a", TunnelState::Ready).await;

    let echo = echo_server().await;
    let mut streams = Vec::new();
    for _ in 0..4 {
        let mut s = manager
            .dial_node("node-a", "127.0.0.1", echo)
            .await
            .unwrap();
        s.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        streams.push(s);
    }
    node.kill().await;
    for mut s in streams {
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("a stream of a dead session must end, not hang");
        let err = read.expect_err("a stream of a dead session ends with an error, not EOF");
        assert!(err.to_string().contains("node-a"), "{err}");
    }
    wait_state(&manager, "node-a", TunnelState::Backoff).await;
    node.restart().await;
    wait_state(&manager, "node-a", TunnelState::Ready).await;
    let mut s = manager
        .dial_node("node-a", "127.0.0.1", echo)
        .await
        .unwrap();
    s.write_all(b"again").await.unwrap();
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"again");
    drop(s);
    manager.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn an_unreachable_node_is_probed_not_handshaked_again() {
    let fx = Fixture::new();
    // A port nothing listens on: bind, note, close.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    fx.known_hosts(&[]);
    let config = fx.config(&[("node-a", port)], "reconnect_probe_interval = \"20ms\"\n");
    let manager = fx.manager(&config);
    let tunnel = manager.tunnel("node-a").unwrap();
    let probes = |manager: &TunnelManager| {
        manager
            .metrics()
            .encode()
            .lines()
            .find_map(|l| {
                l.strip_prefix("nodetunnel_reconnect_probes_total{result=\"closed\"} ")?
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or(0.0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while probes(&manager) < 5.0 {
        assert!(std::time::Instant::now() < deadline, "too few probes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // One attempt found the port closed; since then only TCP probes, no
    // connection attempt (and no backoff) until sshd answers.
    let status = tunnel.status();
    assert_eq!(
        status.failures.get("refused").copied(),
        Some(1),
        "{status:?}"
    );
    assert_eq!(status.retry_reason, Some("probe"), "{status:?}");
    assert!(status
        .retry_in
        .is_some_and(|r| r <= Duration::from_millis(24)));
    manager.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn an_unreachable_node_backs_off_with_capped_delays_when_probes_are_off() {
    let fx = Fixture::new();
    // A port nothing listens on: bind, note, close.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    fx.known_hosts(&[]);
    let config = fx.config(&[("node-a", port)], "reconnect_probe_interval = \"0s\"\n");
    let manager = fx.manager(&config);
    let tunnel = manager.tunnel("node-a").unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let changed = tunnel.changed().notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let status = tunnel.status();
        if status.failures.get("refused").copied().unwrap_or(0) >= 6 {
            assert_eq!(status.handshakes, 0);
            let retry = status.retry_in.expect("a delay was drawn");
            assert!(
                retry <= Duration::from_millis(200),
                "capped at backoff_max: {retry:?}"
            );
            assert!(status.consecutive_failures >= 6, "{status:?}");
            assert!(status.last_error.unwrap().contains("tcp connect"));
            break;
        }
        assert!(
            tokio::time::timeout_at(deadline, changed).await.is_ok(),
            "too few attempts: {status:?}"
        );
    }
    assert!(!tunnel.is_ready());
    let err = manager
        .dial_node("node-a", "127.0.0.1", 1)
        .await
        .unwrap_err();
    assert_eq!(err.http_status(), 503, "{err}");
    manager.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_stalled_reader_neither_stalls_its_sibling_nor_loses_bytes() {
    const A_BYTES: usize = 64 * 1024 * 1024;
    const B_BYTES: usize = 50 * 1024 * 1024;
    let fx = Fixture::new();
    let node = SshNode::start(&fx.client).await;
    fx.known_hosts(&[node.known_hosts_line()]);
    let config = fx.config(&[("node-a", node.addr().port())], "");
    let manager = fx.manager(&config);
    wait_state(&manager, "node-a", TunnelState::Ready).await;

    // A: 64 MiB from the node that nobody reads for now.
    let endless = source_server(Some(A_BYTES)).await;
    let mut stalled = manager
        .dial_node("node-a", "127.0.0.1", endless)
        .await
        .unwrap();
    // B: 50 MB, read to the end on the same session.
    let source = source_server(Some(B_BYTES)).await;
    let mut moving = manager
        .dial_node("node-a", "127.0.0.1", source)
        .await
        .unwrap();
    let (total, digest) = read_to_end_digest(&mut moving).await;
    assert_eq!(total, B_BYTES);
    assert_eq!(digest, pattern_digest(B_BYTES), "B arrived byte-exact");

    // A held up nobody, and lost nothing: it resumes where it stopped and
    // delivers all its bytes, because flow control paused its sender.
    let held = manager.tunnel("node-a").unwrap().status();
    assert_eq!(held.stream_resets, 0, "{held:?}");
    let (a_total, a_digest) = read_to_end_digest(&mut stalled).await;
    assert_eq!(a_total, A_BYTES);
    assert_eq!(a_digest, pattern_digest(A_BYTES), "A arrived byte-exact");
    manager.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn apply_keeps_unchanged_nodes_streams_reconnects_changed_and_drains_removed() {
    let fx = Fixture::new();
    let a = SshNode::start(&fx.client).await;
    let b = SshNode::start(&fx.client).await;
    let c = SshNode::start(&fx.client).await;
    let b2 = SshNode::start(&fx.client).await;
    fx.known_hosts(&[
        a.known_hosts_line(),
        b.known_hosts_line(),
        c.known_hosts_line(),
        b2.known_hosts_line(),
    ]);
    let first = fx.config(
        &[
            ("node-a", a.addr().port()),
            ("node-b", b.addr().port()),
            ("node-c", c.addr().port()),
        ],
        "drain_timeout = \"30s\"",
    );
    let manager = fx.manager(&first);
    for node in ["node-a", "node-b", "node-c"] {
        wait_state(&manager, node, TunnelState::Ready).await;
    }
    let echo = echo_server().await;
    let mut on_a = manager
        .dial_node("node-a", "127.0.0.1", echo)
        .await
        .unwrap();
    let mut on_c = manager
        .dial_node("node-c", "127.0.0.1", echo)
        .await
        .unwrap();
    let tunnel_a = manager.tunnel("node-a").unwrap();
    let tunnel_c = manager.tunnel("node-c").unwrap();

    // node-a unchanged, node-b moves to another endpoint, node-c removed,
    // node-d added (it reuses b's server: only the name matters here).
    let mut nodes = first.nodes.clone();
    nodes.retain(|n| n.name != "node-c");
    nodes
        .iter_mut()
        .find(|n| n.name == "node-b")
        .unwrap()
        .ssh_port = Some(b2.addr().port());
    let mut d = nodes[0].clone();
    d.name = "node-d".into();
    d.ssh_port = Some(b.addr().port());
    nodes.push(d);
    let summary = manager.apply(nodes);
    assert_eq!(summary.added, vec!["node-d".to_string()]);
    assert_eq!(summary.changed, vec!["node-b".to_string()]);
    assert_eq!(summary.removed, vec!["node-c".to_string()]);
    assert_eq!(summary.unchanged, 1);

    // The unchanged node kept its tunnel, its session and its stream.
    assert!(Arc::ptr_eq(&tunnel_a, &manager.tunnel("node-a").unwrap()));
    assert_eq!(tunnel_a.status().handshakes, 1);
    on_a.write_all(b"still here").await.unwrap();
    let mut buf = [0u8; 10];
    on_a.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"still here");

    // The removed node drains: no new streams, the open one keeps working.
    assert_eq!(tunnel_c.state(), TunnelState::Draining);
    assert!(manager.tunnel("node-c").is_none());
    on_c.write_all(b"draining").await.unwrap();
    let mut buf = [0u8; 8];
    on_c.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"draining");
    assert_eq!(
        tunnel_c
            .open_stream("127.0.0.1", echo, Duration::from_secs(5))
            .await
            .unwrap_err()
            .http_status(),
        503
    );
    // Once its last stream closes, it closes.
    drop(on_c);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tunnel_c.state() != TunnelState::Closed {
        let changed = tunnel_c.changed().notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if tunnel_c.state() == TunnelState::Closed {
            break;
        }
        assert!(
            tokio::time::timeout_at(deadline, changed).await.is_ok(),
            "node-c never closed"
        );
    }

    // The changed node reconnects to its new endpoint; the new one comes up.
    let b_status = wait_state(&manager, "node-b", TunnelState::Ready).await;
    assert_eq!(
        b_status.ssh_endpoint,
        format!("127.0.0.1:{}", b2.addr().port())
    );
    wait_state(&manager, "node-d", TunnelState::Ready).await;
    drop(on_a);
    manager.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_service_destination_retries_once_on_another_node_when_the_first_refuses() {
    use nodetunnel::dial::{Destination, Dialer};
    let fx = Fixture::new();
    let refusing = SshNode::start(&fx.client).await;
    refusing.refuse_channels(true);
    let healthy = SshNode::start(&fx.client).await;
    fx.known_hosts(&[refusing.known_hosts_line(), healthy.known_hosts_line()]);
    // Loopback stands in for a service CIDR here; the built-in loopback
    // denial is lifted explicitly.
    let config = fx.config_with(
        &[
            ("node-a", refusing.addr().port()),
            ("node-b", healthy.addr().port()),
        ],
        "",
        "[routing]\nservice_cidrs = [\"127.0.0.0/8\"]\nallow_cidrs = [\"127.0.0.0/8\"]\n",
    );
    let manager = fx.manager(&config);
    wait_state(&manager, "node-a", TunnelState::Ready).await;
    wait_state(&manager, "node-b", TunnelState::Ready).await;
    // 127.0.0.2: a "service IP", not one of the nodes' addresses.
    let echo = echo_server_at("127.0.0.2").await;
    let dest = Destination {
        host: "127.0.0.2".parse().unwrap(),
        port: echo,
    };
    for _ in 0..20 {
        let mut stream = manager
            .dial(&dest)
            .await
            .expect("one retry on another node");
        assert_eq!(stream.node(), "node-b");
        stream.write_all(b"svc").await.unwrap();
        let mut buf = [0u8; 3];
        stream.read_exact(&mut buf).await.unwrap();
    }
    // With both nodes refusing, the refusal comes back (after one retry).
    healthy.refuse_channels(true);
    let err = manager.dial(&dest).await.unwrap_err();
    assert_eq!(err.http_status(), 502, "{err}");
    // A denied destination never reaches a node.
    let err = manager
        .dial(&Destination {
            host: "169.254.169.254".parse().unwrap(),
            port: 80,
        })
        .await
        .unwrap_err();
    assert_eq!(err.http_status(), 403, "{err}");
    // Counted once, by the front door that answers it (not by the dialer):
    // every policy-denial series is still at its initial 0.
    let text = manager.metrics().encode();
    let counted: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("nodetunnel_policy_denials_total{") && !l.ends_with(" 0"))
        .collect();
    assert!(counted.is_empty(), "{counted:?}");
    manager.shutdown(Duration::from_secs(1)).await;
}

type Halves = (
    tokio::net::tcp::OwnedReadHalf,
    tokio::net::tcp::OwnedWriteHalf,
);

/// A link's one connection: the client's, accepted on `listener`, and one
/// to `node`, each split.
async fn accept_one_to(
    listener: &tokio::net::TcpListener,
    node: std::net::SocketAddr,
) -> Option<(Halves, Halves)> {
    let (client, _) = listener.accept().await.ok()?;
    let node = tokio::net::TcpStream::connect(node).await.ok()?;
    Some((client.into_split(), node.into_split()))
}

/// A TCP link to a node whose node-to-client direction can be held: while
/// held, what the node sends is kept (and counted) instead of forwarded; on
/// release it is forwarded at once, then everything after it.
struct HoldableLink {
    port: u16,
    held: tokio::sync::watch::Sender<bool>,
    kept: Arc<std::sync::atomic::AtomicUsize>,
}

impl HoldableLink {
    async fn to(node: std::net::SocketAddr) -> HoldableLink {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (held, gate) = tokio::sync::watch::channel(false);
        let kept = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = kept.clone();
        tokio::spawn(async move {
            let Some(((mut client_rd, mut client_wr), (mut node_rd, mut node_wr))) =
                accept_one_to(&listener, node).await
            else {
                return;
            };
            tokio::spawn(async move { tokio::io::copy(&mut client_rd, &mut node_wr).await });
            let mut gate = gate;
            let mut queue = Vec::new();
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                tokio::select! {
                    read = node_rd.read(&mut buf) => match read {
                        Ok(0) | Err(_) => return,
                        Ok(n) => queue.extend_from_slice(&buf[..n]),
                    },
                    changed = gate.changed() => if changed.is_err() { return },
                }
                if *gate.borrow() {
                    counter.store(queue.len(), std::sync::atomic::Ordering::Release);
                } else if !queue.is_empty() {
                    if client_wr.write_all(&queue).await.is_err() {
                        return;
                    }
                    queue.clear();
                }
            }
        });
        HoldableLink { port, held, kept }
    }

    fn hold(&self, hold: bool) {
        self.held.send_replace(hold);
    }

    fn kept(&self) -> usize {
        self.kept.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// A server on 127.0.0.1 that waits for one byte on each connection, then
/// sends `len` bytes of the pattern and closes. Its port.
async fn source_on_request(len: usize) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = [0u8; 1];
                if socket.read_exact(&mut request).await.is_ok() {
                    support::inproc::send_pattern(&mut socket, Some(len)).await;
                }
            });
        }
    });
    port
}

#[tokio::test]
async fn a_rekey_while_many_streams_have_their_windows_in_flight_keeps_the_session() {
    // Eight streams, each sent a whole 2 MiB window by the node while the
    // link holds it back: 16 MiB in flight. On release nodetunnel reads
    // 1 MiB, reaches its rekey limit and sends KEXINIT; the node's KEXINIT
    // comes only after the other 15 MiB, all of it legal (within each
    // stream's window). The session must take it and stay up.
    const STREAMS: usize = 8;
    const WINDOW: usize = 2 * 1024 * 1024;
    support::russh_log::install();
    let rekeys_before = support::russh_log::count("rekey read limit reached");
    let fx = Fixture::new();
    let node = SshNode::start(&fx.client).await;
    let link = HoldableLink::to(node.addr()).await;
    fx.known_hosts(&[format!(
        "[127.0.0.1]:{} {}",
        link.port,
        node.host_public_key().to_openssh().unwrap()
    )]);
    let config = fx.config(
        &[("node-a", link.port)],
        // The held link holds the node's keepalive replies too. Every
        // stream gets the whole window though they share the session.
        &format!(
            "window_size = {WINDOW}\ndownload_window = {WINDOW}\nrekey_limit = 1048576\nkeepalive_max = 10\n"
        ),
    );
    let manager = fx.manager(&config);
    wait_state(&manager, "node-a", TunnelState::Ready).await;
    let source = source_on_request(WINDOW).await;
    let mut streams = Vec::new();
    for _ in 0..STREAMS {
        streams.push(
            manager
                .dial_node("node-a", "127.0.0.1", source)
                .await
                .unwrap(),
        );
    }

    link.hold(true);
    for stream in &mut streams {
        stream.write_all(b"?").await.unwrap();
    }
    // Every window is on its way: the node has sent it all into the link.
    support::poll::until(
        "the node to send every stream's window",
        support::inproc::DEADLINE,
        || format!("{} bytes held", link.kept()),
        || std::future::ready((link.kept() >= STREAMS * WINDOW).then_some(())),
    )
    .await;
    link.hold(false);

    for (i, stream) in streams.iter_mut().enumerate() {
        let (total, digest) = read_to_end_digest(stream).await;
        assert_eq!(total, WINDOW, "stream {i}");
        assert_eq!(digest, pattern_digest(WINDOW), "stream {i} byte-exact");
    }
    let status = manager.tunnel("node-a").unwrap().status();
    assert_eq!(status.stream_resets, 0, "{status:?}");
    assert_eq!(
        status.handshakes, 1,
        "the session was never lost: {status:?}"
    );
    assert_eq!(status.last_error, None, "{status:?}");
    assert!(
        support::russh_log::count("rekey read limit reached") > rekeys_before,
        "no rekey happened: the test proves nothing"
    );
    manager.shutdown(Duration::from_secs(1)).await;
}

/// A TCP link to a node that carries the client-to-node direction at `rate`
/// bytes per second through a small receive buffer (a slow network path
/// without bufferbloat); the node-to-client direction is not limited.
struct SlowLink {
    port: u16,
    /// Bytes forwarded to the node so far.
    forwarded: Arc<std::sync::atomic::AtomicU64>,
}

impl SlowLink {
    async fn to(node: std::net::SocketAddr, rate: u64) -> SlowLink {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(64 * 1024).unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(16).unwrap();
        let port = listener.local_addr().unwrap().port();
        let forwarded = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = forwarded.clone();
        tokio::spawn(async move {
            let Some(((mut client_rd, mut client_wr), (mut node_rd, mut node_wr))) =
                accept_one_to(&listener, node).await
            else {
                return;
            };
            tokio::spawn(async move { tokio::io::copy(&mut node_rd, &mut client_wr).await });
            let mut buf = vec![0u8; 8 * 1024];
            let start = tokio::time::Instant::now();
            let mut sent = 0u64;
            loop {
                let n = match client_rd.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if node_wr.write_all(&buf[..n]).await.is_err() {
                    return;
                }
                sent += n as u64;
                counter.store(sent, std::sync::atomic::Ordering::Release);
                // Pace: the next byte may leave once `sent` bytes took their time.
                tokio::time::sleep_until(
                    start + Duration::from_secs_f64(sent as f64 / rate as f64),
                )
                .await;
            }
        });
        SlowLink { port, forwarded }
    }

    fn forwarded(&self) -> u64 {
        self.forwarded.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// A server on 127.0.0.1 that reads and discards everything. Its port.
async fn sink_server() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = socket.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                }
            });
        }
    });
    port
}

#[tokio::test]
async fn a_channel_open_overtakes_the_bulk_data_queued_for_a_slow_link() {
    // Four uploads fill every queue on the way to a node behind a 1 MB/s
    // link: the streams' queue into the session, the session's output
    // backlog (256 KiB at most) and the kernel's send buffer. A new
    // stream's CHANNEL_OPEN skips the first (vendored russh: the session's
    // priority queue) and the kernel holds at most 128 KiB unsent
    // (TCP_NOTSENT_LOWAT), so at most backlog + unsent + what the link
    // holds (its 64 KiB receive buffer, doubled by the kernel) + slack
    // crosses the link before the open does: 768 KiB. Without either fix
    // it was 0.9 MB (priority only) to 4.3 MB (neither). Measured in bytes
    // that had crossed the link when the node connected to the open's
    // destination, not in time.
    const AHEAD_AT_MOST: u64 = 768 * 1024;
    const RATE: u64 = 1_000_000;
    const BULK: usize = 4;
    let fx = Fixture::new();
    let node = SshNode::start(&fx.client).await;
    let link = SlowLink::to(node.addr(), RATE).await;
    fx.known_hosts(&[format!(
        "[127.0.0.1]:{} {}",
        link.port,
        node.host_public_key().to_openssh().unwrap()
    )]);
    let config = fx.config(&[("node-a", link.port)], "keepalive_max = 10\n");
    let manager = fx.manager(&config);
    wait_state(&manager, "node-a", TunnelState::Ready).await;
    let sink = sink_server().await;
    // The open's destination: notes how much had crossed the link when the
    // node connected to it, then echoes.
    let crossed_at_open = Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
    let echo = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (forwarded, noted) = (link.forwarded.clone(), crossed_at_open.clone());
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            noted.store(
                forwarded.load(std::sync::atomic::Ordering::Acquire),
                std::sync::atomic::Ordering::Release,
            );
            let (mut rd, mut wr) = socket.split();
            let _ = tokio::io::copy(&mut rd, &mut wr).await;
        });
        port
    };

    let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut uploads = Vec::new();
    for _ in 0..BULK {
        let mut stream = manager
            .dial_node("node-a", "127.0.0.1", sink)
            .await
            .unwrap();
        let written = written.clone();
        uploads.push(tokio::spawn(async move {
            let chunk = vec![0x5au8; 64 * 1024];
            while stream.write_all(&chunk).await.is_ok() {
                written.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::AcqRel);
            }
        }));
    }
    let queued = || {
        written
            .load(std::sync::atomic::Ordering::Acquire)
            .saturating_sub(link.forwarded())
    };
    // Wait for the queues to fill: megabytes accepted and not yet across.
    support::poll::until(
        "the uploads to queue 400 kB",
        support::inproc::DEADLINE,
        || format!("{} bytes queued", queued()),
        || std::future::ready((queued() >= 400_000).then_some(())),
    )
    .await;

    let queued_before = queued();
    let crossed_before = link.forwarded();
    let started = std::time::Instant::now();
    let mut stream = manager
        .dial_node("node-a", "127.0.0.1", echo)
        .await
        .unwrap();
    let open_took = started.elapsed();
    // The echo noted its count before it echoed anything.
    support::inproc::ping(&mut stream, b"under load").await;
    let crossed_first = crossed_at_open.load(std::sync::atomic::Ordering::Acquire) - crossed_before;
    eprintln!(
        "open behind bulk uploads on a {RATE} B/s link: {queued_before} bytes queued, \
         {crossed_first} crossed before the open, confirmed after {open_took:?}"
    );
    assert!(
        crossed_first <= AHEAD_AT_MOST,
        "the open waited for {crossed_first} bytes to cross the link ({queued_before} were queued)"
    );
    for upload in uploads {
        upload.abort();
    }
    manager.shutdown(Duration::ZERO).await;
}

#[tokio::test]
async fn a_spent_buffer_budget_slows_streams_and_never_holds_more_than_it_allows() {
    // Sixteen streams of a 256 KiB window could hold 4 MiB for readers that
    // are slow; the budget is 1 MiB. Granting window only while the budget
    // lasts (every stream keeps one packet of window whatever the budget,
    // so none can starve) holds at most the budget plus one packet per
    // stream, resets nothing and delivers every byte.
    const STREAMS: usize = 16;
    const WINDOW: usize = 256 * 1024;
    const BUDGET: usize = 1024 * 1024;
    const PACKET: usize = 32 * 1024;
    const BYTES: usize = 1024 * 1024 + 12_345;
    const READ: usize = 16 * 1024;
    let fx = Fixture::new();
    let node = SshNode::start(&fx.client).await;
    fx.known_hosts(&[node.known_hosts_line()]);
    let config = fx.config(
        &[("node-a", node.addr().port())],
        &format!("window_size = {WINDOW}\nmax_buffered_bytes = {BUDGET}\n"),
    );
    let manager = fx.manager(&config);
    wait_state(&manager, "node-a", TunnelState::Ready).await;
    let limits = manager.tunnel("node-a").unwrap().stream_limits();

    // Every stream is open before any byte flows (admission is not what
    // this test is about), then every source starts at once.
    let source = source_on_request(BYTES).await;
    let mut streams = Vec::new();
    for _ in 0..STREAMS {
        streams.push(
            manager
                .dial_node("node-a", "127.0.0.1", source)
                .await
                .unwrap(),
        );
    }
    for stream in &mut streams {
        stream.write_all(b"?").await.unwrap();
    }
    // Nobody reads until the nodes have filled what they may send: the
    // budget is spent.
    support::poll::until(
        "the node to fill the buffer budget",
        support::inproc::DEADLINE,
        || format!("{} bytes held", manager.buffered_bytes()),
        || std::future::ready((manager.buffered_bytes() >= BUDGET).then_some(())),
    )
    .await;

    // Slow readers: a small read per stream per round, round-robin.
    let mut hashers: Vec<Sha256> = (0..STREAMS).map(|_| Sha256::new()).collect();
    let mut totals = [0usize; STREAMS];
    let mut done = [false; STREAMS];
    let mut buf = vec![0u8; READ];
    while done.iter().any(|d| !d) {
        for (i, stream) in streams.iter_mut().enumerate() {
            if done[i] {
                continue;
            }
            let n = stream.read(&mut buf).await.unwrap();
            if n == 0 {
                done[i] = true;
            }
            hashers[i].update(&buf[..n]);
            totals[i] += n;
        }
    }
    for (i, hasher) in hashers.into_iter().enumerate() {
        assert_eq!(totals[i], BYTES, "stream {i}");
        assert_eq!(
            hasher.finalize(),
            pattern_digest(BYTES),
            "stream {i} byte-exact"
        );
    }
    let bound = BUDGET + STREAMS * PACKET;
    println!(
        "held at most {} bytes (budget {BUDGET}, bound {bound})",
        limits.peak_in_use()
    );
    assert!(
        limits.peak_in_use() >= BUDGET,
        "the budget was never spent: the test proves nothing"
    );
    assert!(
        limits.peak_in_use() <= bound,
        "held up to {} bytes, over the budget of {BUDGET} plus one packet per stream ({bound})",
        limits.peak_in_use()
    );
    let status = manager.tunnel("node-a").unwrap().status();
    assert_eq!(status.stream_resets, 0, "{status:?}");
    assert_eq!(manager.buffered_bytes(), 0);
    assert_eq!(limits.committed(), 0, "every stream's budget came back");
    manager.shutdown(Duration::from_secs(1)).await;
}

/// Log lines in `serve`'s JSON format, captured for this thread.
#[derive(Clone, Default)]
struct JsonLog(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for JsonLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn session_lines_carry_the_session_span_in_json() {
    let log = JsonLog::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .event_format(nodetunnel::logging::json_format())
        .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
        .with_writer(move || writer.clone())
        .finish();
    // `#[tokio::test]` runs every task on this thread.
    let _capture = tracing::subscriber::set_default(subscriber);

    let fx = Fixture::new();
    let node = SshNode::start(&fx.client).await;
    fx.known_hosts(&[node.known_hosts_line()]);
    let config = fx.config(&[("node-a", node.addr().port())], "");
    let manager = fx.manager(&config);
    wait_state(&manager, "node-a", TunnelState::Ready).await;
    manager.shutdown(Duration::from_secs(1)).await;

    let bytes = log.0.lock().expect("log").clone();
    let ready: Vec<serde_json::Value> = String::from_utf8_lossy(&bytes)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|event| event["message"] == "tunnel ready")
        .collect();
    assert_eq!(ready.len(), 1, "{ready:?}");
    let span = &ready[0]["span"];
    assert_eq!(span["name"], "session", "{span}");
    assert_eq!(span["node"], "node-a", "{span}");
    assert_eq!(
        span["endpoint"],
        format!("127.0.0.1:{}", node.addr().port()),
        "{span}"
    );
    assert_eq!(span["session"], 0, "{span}");
    assert!(ready[0].get("node").is_none(), "{}", ready[0]);
}

/// A manager for `node` (as "node-a", `ssh_extra` in `[ssh]`), Ready; an
/// echo server's port; and, if `beside`, an idle stream to it open on the
/// node's session.
async fn ready_beside(
    fx: &Fixture,
    node: &SshNode,
    ssh_extra: &str,
    beside: bool,
) -> (
    Arc<TunnelManager>,
    u16,
    Option<nodetunnel::stream::TunnelStream>,
) {
    fx.known_hosts(&[node.known_hosts_line()]);
    let config = fx.config(&[("node-a", node.addr().port())], ssh_extra);
    let manager = fx.manager(&config);
    wait_state(&manager, "node-a", TunnelState::Ready).await;
    let echo = echo_server().await;
    let idle = if beside {
        Some(
            manager
                .dial_node("node-a", "127.0.0.1", echo)
                .await
                .unwrap(),
        )
    } else {
        None
    };
    (manager, echo, idle)
}

/// A destination that counts the bytes it reads and never writes.
async fn counting_sink() -> (u16, Arc<std::sync::atomic::AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let arrived = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = arrived.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = socket.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    counted.fetch_add(n as u64, std::sync::atomic::Ordering::AcqRel);
                }
            });
        }
    });
    (port, arrived)
}

/// Upload 1 MiB on one stream to a counting sink behind a node that
/// identifies itself as `ident` (`beside`: with another stream of the
/// session open, idle); once `expect` bytes have arrived, one round trip on
/// a further stream of the same session (everything sent before it has
/// reached the node), then: (bytes arrived, whether the upload is done).
async fn upload_behind(ident: &str, ssh_extra: &str, beside: bool, expect: u64) -> (u64, bool) {
    let fx = Fixture::new();
    let node = SshNode::start_as(&fx.client, ident).await;
    let (manager, echo, _idle) = ready_beside(&fx, &node, ssh_extra, beside).await;
    let (sink, arrived) = counting_sink().await;
    let mut upload = manager
        .dial_node("node-a", "127.0.0.1", sink)
        .await
        .unwrap();
    let writer = tokio::spawn(async move {
        upload.write_all(&vec![0x5a; 1 << 20]).await.unwrap();
        upload
    });
    let seen = arrived.clone();
    support::poll::until(
        "the upload's first bytes at the sink",
        support::inproc::DEADLINE,
        || {
            format!(
                "{} bytes arrived",
                seen.load(std::sync::atomic::Ordering::Acquire)
            )
        },
        || {
            let n = seen.load(std::sync::atomic::Ordering::Acquire);
            std::future::ready((n >= expect).then_some(()))
        },
    )
    .await;
    let mut probe = manager
        .dial_node("node-a", "127.0.0.1", echo)
        .await
        .unwrap();
    support::inproc::ping(&mut probe, b"after the upload").await;
    let result = (
        arrived.load(std::sync::atomic::Ordering::Acquire),
        writer.is_finished(),
    );
    writer.abort();
    manager.shutdown(Duration::from_secs(1)).await;
    result
}

#[tokio::test]
async fn an_openssh_node_holds_at_most_the_upload_window_of_a_stream_beside_another() {
    // The node (russh) re-grants window only once half of what it offered
    // (2 MiB) is consumed, so with the stream held to `ssh.upload_window`
    // ("auto": 256 KiB on loopback) while another stream of the session is
    // open, it never does: exactly 256 KiB arrive and the rest of the 1 MiB
    // waits. (Real OpenSSH re-grants after three packets; nodetunnel bounds
    // only nodes that say they are OpenSSH, as this one does.) With the
    // node's whole window the 1 MiB would have been sent before the round
    // trip that ends the wait.
    let (arrived, done) = upload_behind("SSH-2.0-OpenSSH_9.2p1", "", true, 256 * 1024).await;
    assert_eq!(
        arrived,
        256 * 1024,
        "bytes past the upload window reached the node"
    );
    assert!(!done, "the upload finished without a window grant");
}

#[tokio::test]
async fn an_explicit_upload_window_is_what_the_node_may_hold() {
    let (arrived, done) = upload_behind(
        "SSH-2.0-OpenSSH_9.2p1",
        "upload_window = 163840",
        true,
        160 * 1024,
    )
    .await;
    assert_eq!(arrived, 160 * 1024);
    assert!(!done);
}

#[tokio::test]
async fn a_lone_upload_keeps_the_nodes_whole_window() {
    // Nothing else on the session to delay: the 1 MiB goes out within the
    // node's 2 MiB window, no grant needed.
    let (arrived, done) = upload_behind("SSH-2.0-OpenSSH_9.2p1", "", false, 1 << 20).await;
    assert_eq!(arrived, 1 << 20);
    assert!(done, "the upload is not done though all of it arrived");
}

#[tokio::test]
async fn a_node_not_known_to_regrant_early_keeps_its_whole_window() {
    // Not OpenSSH (russh's own identification): a bound below half its
    // window would never be re-granted, so the stream gets the node's whole
    // 2 MiB window and the 1 MiB upload arrives in full.
    let (arrived, done) = upload_behind("SSH-2.0-russh_0.65.1", "", true, 1 << 20).await;
    assert_eq!(arrived, 1 << 20);
    assert!(done, "the upload is not done though all of it arrived");
}

/// Open a stream to a source of 4 MiB and never read it (`beside`: with
/// another stream of the session open, idle); once `expect` bytes are held
/// for it, one round trip on a further stream of the same session (what
/// the node sent before its reply has arrived): the bytes held then, and
/// whether the stream was reset.
async fn download_beside(ssh_extra: &str, beside: bool, expect: usize) -> (usize, bool) {
    let fx = Fixture::new();
    let node = SshNode::start(&fx.client).await;
    let (manager, echo, _idle) = ready_beside(&fx, &node, ssh_extra, beside).await;
    let source = source_server(Some(4 << 20)).await;
    let _unread = manager
        .dial_node("node-a", "127.0.0.1", source)
        .await
        .unwrap();
    support::poll::until(
        "the download's bytes held",
        support::inproc::DEADLINE,
        || format!("{} bytes held", manager.buffered_bytes()),
        || std::future::ready((manager.buffered_bytes() >= expect).then_some(())),
    )
    .await;
    let mut probe = manager
        .dial_node("node-a", "127.0.0.1", echo)
        .await
        .unwrap();
    support::inproc::ping(&mut probe, b"after the download").await;
    let held = manager.buffered_bytes();
    let reset = manager
        .tunnel("node-a")
        .map_or(0, |t| t.status().stream_resets)
        > 0;
    manager.shutdown(Duration::from_secs(1)).await;
    (held, reset)
}

#[tokio::test]
async fn a_download_beside_another_stream_is_granted_at_most_the_download_window() {
    // Nobody reads the stream, so what is held for it is what the node was
    // allowed to send: `ssh.download_window` ("auto": 256 KiB on loopback)
    // while another stream of the session is open.
    let (held, reset) = download_beside("download_window = \"auto\"", true, 256 * 1024).await;
    assert_eq!(held, 256 * 1024, "bytes held past the download window");
    assert!(!reset);
}

#[tokio::test]
async fn an_explicit_download_window_is_what_the_node_may_send() {
    let (held, reset) = download_beside("download_window = 131072", true, 128 * 1024).await;
    assert_eq!(held, 128 * 1024);
    assert!(!reset);
}

#[tokio::test]
async fn by_default_a_download_beside_another_stream_keeps_the_whole_window() {
    let (held, reset) = download_beside("", true, 2 << 20).await;
    assert_eq!(held, 2 << 20);
    assert!(!reset);
}

#[tokio::test]
async fn a_lone_download_keeps_the_whole_window() {
    let (held, reset) = download_beside("download_window = \"auto\"", false, 2 << 20).await;
    assert_eq!(held, 2 << 20);
    assert!(!reset);
}
