//! A node that comes back is usable at once, against real OpenSSH sshd on
//! loopback: its sessions probe its SSH port while it is away and connect
//! as soon as sshd answers (not after the backoff), a dial for a node away
//! asks for an attempt now and waits for it within the dial timeout, and a
//! node that refuses our key is refused at once rather than waited for.
//!
//! The backoff is set to an hour in every test, so a node that comes back
//! within the test did so by a probe or on demand, never by the backoff.
//! Nothing asserts a duration; each wait is a poll with a deadline.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use nodetunnel::config::Config;
use nodetunnel::dial::{DialError, NodeDownCause};
use nodetunnel::manager::TunnelManager;
use nodetunnel::metrics::Metrics;
use support::poll::until;
use support::{spawn_local, ClientKey, ServerKind, Sshd, SshdOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(30);

struct Bed {
    _dir: tempfile::TempDir,
    sshd: Sshd,
    key: ClientKey,
    manager: Arc<TunnelManager>,
}

/// One node (sshd on loopback) with `[ssh]` lines `ssh_extra`, Ready.
async fn bed(ssh_extra: &str) -> Bed {
    let dir = tempfile::tempdir().unwrap();
    let key = ClientKey::generate(dir.path()).unwrap();
    let sshd = Sshd::start(SshdOptions {
        authorized_keys: vec![key.public_line.clone()],
        ..SshdOptions::default()
    })
    .expect("start OpenSSH sshd (bash .ci/run installs openssh-server)");
    let config_path = dir.path().join("nodetunnel.toml");
    std::fs::write(
        &config_path,
        format!(
            "[ssh]\nuser = \"{user}\"\nidentity = \"{identity}\"\nknown_hosts = \"{kh}\"\n\
             {backoff}{ssh_extra}\n\
             [[nodes]]\nname = \"local\"\naddresses = [\"127.0.0.1\"]\nssh_port = {port}\n",
            user = Sshd::user(),
            // An hour of backoff unless the test sets its own.
            backoff = if ssh_extra.contains("backoff_base") {
                ""
            } else {
                "backoff_base = \"1h\"\nbackoff_max = \"1h\"\nbackoff_reset_after = \"1ms\"\n"
            },
            identity = key.private_path.display(),
            kh = sshd.known_hosts_path().display(),
            port = sshd.port(),
        ),
    )
    .unwrap();
    let config = Config::load(&config_path).unwrap();
    let manager =
        TunnelManager::new(&config, config.routing.clone(), Arc::new(Metrics::new())).unwrap();
    manager.apply(config.nodes.clone());
    if let Err(e) = manager.wait_ready("local", WAIT).await {
        panic!("tunnel not ready: {e}\nsshd log:\n{}", sshd.log());
    }
    Bed {
        _dir: dir,
        sshd,
        key,
        manager,
    }
}

impl Bed {
    /// The value of the metric line starting with `prefix`, 0 if absent.
    fn metric(&self, prefix: &str) -> f64 {
        self.manager
            .metrics()
            .encode()
            .lines()
            .find_map(|l| l.strip_prefix(prefix)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// Wait until the node has a Ready session again.
    async fn until_ready(&self, what: &str) {
        let manager = self.manager.clone();
        until(
            what,
            WAIT,
            || format!("{:?}", self.manager.status()),
            || {
                let ready = manager
                    .status()
                    .pop()
                    .is_some_and(|s| s.sessions_ready == 1);
                async move { ready.then_some(()) }
            },
        )
        .await;
    }

    /// Kill sshd and wait until the node is waiting to retry with `reason`.
    async fn take_sshd_down(&mut self, reason: &'static str) {
        self.sshd.stop();
        let manager = self.manager.clone();
        until(
            &format!("the node waiting to retry ({reason})"),
            WAIT,
            || format!("{:?}", self.manager.status()),
            || {
                let manager = manager.clone();
                async move {
                    let s = manager.status().pop()?;
                    (s.retry_reason == Some(reason)).then_some(())
                }
            },
        )
        .await;
    }
}

async fn echo_once(manager: &TunnelManager, port: u16) -> Result<(), DialError> {
    let mut stream = manager.dial_node("local", "127.0.0.1", port).await?;
    stream.write_all(b"x").await.expect("write");
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte).await.expect("echo");
    assert_eq!(&byte, b"x");
    Ok(())
}

#[tokio::test]
async fn a_node_whose_sshd_returns_is_found_by_a_probe_not_the_backoff() {
    let mut bed = bed("reconnect_probe_interval = \"200ms\"").await;
    bed.take_sshd_down("probe").await;
    let manager = bed.manager.clone();
    until("a probe finding the port closed", WAIT, String::new, || {
        let closed = bed.metric("nodetunnel_reconnect_probes_total{result=\"closed\"}");
        async move { (closed >= 1.0).then_some(()) }
    })
    .await;
    bed.sshd.restart().expect("restart sshd");
    // The backoff is an hour: only a probe brings the node back now.
    bed.until_ready("Ready after sshd returned").await;
    assert!(bed.metric("nodetunnel_reconnect_probes_total{result=\"open\"}") >= 1.0);
    assert_eq!(
        bed.metric("nodetunnel_reconnect_probe_to_ready_seconds_count"),
        1.0
    );
    assert_eq!(
        bed.metric("nodetunnel_reconnect_demands_total{trigger=\"dial\"}"),
        0.0
    );
    manager.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn a_dial_while_sshd_is_down_waits_and_succeeds_when_it_returns() {
    // The dial may wait up to the channel-open timeout (no [proxy]).
    let mut bed = bed("reconnect_probe_interval = \"200ms\"\nchannel_open_timeout = \"60s\"").await;
    let echo = spawn_local(ServerKind::echo(SocketAddr::from(([127, 0, 0, 1], 0)))).unwrap();
    bed.take_sshd_down("probe").await;
    let manager = bed.manager.clone();
    let port = echo.port();
    let dial = tokio::spawn(async move { echo_once(&manager, port).await });
    // The dial asked for an attempt, which found the port closed.
    until("the dial's attempt", WAIT, String::new, || {
        let asked = bed.metric("nodetunnel_reconnect_demands_total{trigger=\"dial\"}");
        async move { (asked >= 1.0).then_some(()) }
    })
    .await;
    assert!(!dial.is_finished(), "the dial must wait for the node");
    bed.sshd.restart().expect("restart sshd");
    match tokio::time::timeout(WAIT * 2, dial).await {
        Ok(Ok(Ok(()))) => {}
        other => panic!("the waiting dial: {other:?}"),
    }
    bed.manager.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn a_dial_brings_back_a_node_that_no_probe_would_find_for_an_hour() {
    let mut bed = bed("reconnect_probe_interval = \"1h\"").await;
    let echo = spawn_local(ServerKind::echo(SocketAddr::from(([127, 0, 0, 1], 0)))).unwrap();
    bed.take_sshd_down("probe").await;
    bed.sshd.restart().expect("restart sshd");
    // Next probe in about an hour, backoff an hour: the dial's own attempt
    // is what connects.
    echo_once(&bed.manager, echo.port())
        .await
        .expect("a dial on demand");
    assert_eq!(
        bed.metric("nodetunnel_reconnect_demands_total{trigger=\"dial\"}"),
        1.0
    );
    bed.manager.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn a_dial_to_a_node_refusing_our_key_is_refused_once_its_attempt_failed() {
    // Were the dial to wait for the node, it would wait the whole hour.
    let mut bed = bed("reconnect_probe_interval = \"200ms\"\nchannel_open_timeout = \"1h\"").await;
    bed.sshd.unauthorize_all().expect("unauthorize");
    bed.sshd.restart().expect("restart sshd");
    // The probe finds sshd, the handshake fails on authentication: backoff.
    let manager = bed.manager.clone();
    until(
        "authentication refused, backing off",
        WAIT,
        String::new,
        || {
            let manager = manager.clone();
            async move {
                let s = manager.status().pop()?;
                (s.retry_reason == Some("backoff")).then_some(())
            }
        },
    )
    .await;
    let err = tokio::time::timeout(WAIT, echo_once(&manager, 9))
        .await
        .expect("the dial must not wait for a node that refuses our key")
        .expect_err("no session");
    match &err {
        DialError::NodeDown {
            cause: NodeDownCause::NotReady { last_error, .. },
            ..
        } => assert!(
            last_error
                .as_deref()
                .unwrap_or("")
                .contains("authentication"),
            "{err}"
        ),
        other => panic!("{other}"),
    }
    assert_eq!(err.http_status(), 503);
    let _ = &bed.key;
    manager.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn a_node_ready_again_in_the_inventory_is_tried_at_once() {
    let mut bed = bed("reconnect_probe_interval = \"1h\"").await;
    let config = Config::load(&bed._dir.path().join("nodetunnel.toml")).unwrap();
    let node = |not_ready: bool| {
        let mut n = config.nodes[0].clone();
        n.not_ready = not_ready;
        n
    };
    let (down, up) = (node(true), node(false));
    bed.manager.apply(vec![down]);
    bed.take_sshd_down("probe").await;
    bed.sshd.restart().expect("restart sshd");
    // Kubernetes reports the Node Ready again: no probe for an hour, no
    // dial, yet the node connects.
    bed.manager.apply(vec![up]);
    bed.until_ready("Ready after the inventory said so").await;
    let manager = bed.manager.clone();
    assert_eq!(
        bed.metric("nodetunnel_reconnect_demands_total{trigger=\"inventory\"}"),
        1.0
    );
    assert_eq!(
        bed.metric("nodetunnel_reconnect_demands_total{trigger=\"dial\"}"),
        0.0
    );
    manager.shutdown(Duration::from_secs(2)).await;
}

/// The recovery table of docs/reliability.md: sshd down for each outage
/// (seconds, `NODETUNNEL_OUTAGES`, default `5,20,60,300`), then restarted;
/// measured: the time from its return until the node is Ready by itself
/// (probes only, no dial), and, in a second round, until a dial issued the
/// moment sshd returns succeeds. Default configuration (probes every 2 s,
/// backoff 1 s to 60 s). Prints a table; asserts only that every round
/// recovers. Long: `cargo test --test reconnect -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "long (minutes): run by hand for the recovery table"]
async fn recovery_times_after_outages() {
    let outages: Vec<u64> = std::env::var("NODETUNNEL_OUTAGES")
        .unwrap_or_else(|_| "5,20,60,300".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let echo = spawn_local(ServerKind::echo(SocketAddr::from(([127, 0, 0, 1], 0)))).unwrap();
    let mut rows = Vec::new();
    for outage in outages {
        let mut measured = Vec::new();
        for with_dial in [false, true] {
            let mut bed =
                bed("backoff_base = \"1s\"\nbackoff_max = \"60s\"\nbackoff_reset_after = \"30s\"")
                    .await;
            bed.sshd.stop();
            tokio::time::sleep(Duration::from_secs(outage)).await;
            bed.sshd.restart().expect("restart sshd");
            let back = std::time::Instant::now();
            if with_dial {
                echo_once(&bed.manager, echo.port())
                    .await
                    .expect("the first dial after sshd returned");
            } else {
                let manager = bed.manager.clone();
                until("Ready again", Duration::from_secs(120), String::new, || {
                    let ready = manager
                        .status()
                        .pop()
                        .is_some_and(|s| s.sessions_ready == 1);
                    async move { ready.then_some(()) }
                })
                .await;
            }
            measured.push(back.elapsed());
            bed.manager.shutdown(Duration::from_secs(2)).await;
        }
        rows.push(format!(
            "| {outage} s | {:.2} s | {:.2} s |",
            measured[0].as_secs_f64(),
            measured[1].as_secs_f64()
        ));
    }
    println!("| outage | Ready again (probes) | first dial succeeds after |");
    println!("|---:|---:|---:|");
    for row in rows {
        println!("{row}");
    }
}
