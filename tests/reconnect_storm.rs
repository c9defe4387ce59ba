//! A mass return: many in-process SSH nodes killed together, then back
//! together. What must hold whatever the timing: every node is Ready again
//! (by probes: the backoff is an hour), the handshakes running at once,
//! counted by the nodes themselves from the client's first byte to its
//! authentication (a probe, which only reads the banner, is not counted),
//! never exceed `ssh.max_handshakes_in_flight`, and the probes stay within
//! the token bucket's bound (`max_probes_per_second` at start plus as many
//! per second since).
//!
//! 200 nodes by default; `NODETUNNEL_STORM_NODES=1000` for the figure in
//! the notes. Prints the time from the return to all Ready, the peak of
//! handshakes and the probes (not asserted).

mod ssh_node;
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use nodetunnel::config::Config;
use nodetunnel::manager::TunnelManager;
use nodetunnel::metrics::Metrics;
use ssh_node::{Counter, SshNode};
use support::inproc::{key_dir, write_known_hosts, SSH_TOML};
use support::poll::until;

const HANDSHAKES: usize = 16;
const PROBES_PER_SECOND: f64 = 200.0;

fn probes(manager: &TunnelManager) -> f64 {
    ["open", "closed", "timeout"]
        .iter()
        .map(|r| {
            support::manager::metric(
                manager.metrics(),
                &format!("nodetunnel_reconnect_probes_total{{result=\"{r}\"}}"),
            )
        })
        .sum()
}

async fn until_ready(manager: &Arc<TunnelManager>, total: usize, what: &str) {
    let manager = manager.clone();
    until(what, Duration::from_secs(300), String::new, || {
        let (ready, _) = manager.count_ready();
        async move { (ready == total).then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mass_return_stays_within_the_handshake_and_probe_bounds() {
    let count: usize = std::env::var("NODETUNNEL_STORM_NODES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(200);
    let (dir, client) = key_dir();
    let handshakes = Arc::new(Counter::default());
    let mut nodes = Vec::with_capacity(count);
    for _ in 0..count {
        let mut node = SshNode::start(&client).await;
        node.count_handshakes_in(handshakes.clone());
        node.restart().await; // counted from here on
        nodes.push(node);
    }
    write_known_hosts(
        dir.path(),
        &nodes
            .iter()
            .map(SshNode::known_hosts_line)
            .collect::<Vec<_>>(),
    );
    let mut text = format!(
        "{SSH_TOML}max_handshakes_in_flight = {HANDSHAKES}\nreconnect_probe_interval = \"100ms\"\n\
         max_probes_per_second = {PROBES_PER_SECOND}\n"
    )
    .replace(
        "backoff_base = \"20ms\"\nbackoff_max = \"200ms\"\n",
        "backoff_base = \"1h\"\nbackoff_max = \"1h\"\nbackoff_reset_after = \"1ms\"\n",
    )
    .replace(
        "keepalive_interval = \"1s\"\n",
        "keepalive_interval = \"1h\"\n",
    );
    for (i, node) in nodes.iter().enumerate() {
        text.push_str(&format!(
            "[[nodes]]\nname = \"node-{i}\"\naddresses = [\"127.0.0.1\"]\nssh_port = {}\n",
            node.addr().port()
        ));
    }
    let path = dir.path().join("nodetunnel.toml");
    std::fs::write(&path, text).unwrap();
    let config = Config::load(&path).unwrap();
    let started = Instant::now();
    let manager =
        TunnelManager::new(&config, config.routing.clone(), Arc::new(Metrics::new())).unwrap();
    manager.apply(config.nodes.clone());
    until_ready(&manager, count, "every node Ready at start").await;

    // All away at once: every session ends, every node is probed.
    for node in &mut nodes {
        node.kill().await;
    }
    let away = manager.clone();
    until(
        "every node probed",
        Duration::from_secs(120),
        String::new,
        || {
            let waiting = away
                .status()
                .iter()
                .filter(|s| s.sessions_ready == 0 && s.retry_reason == Some("probe"))
                .count();
            async move { (waiting == count).then_some(()) }
        },
    )
    .await;

    // All back at once.
    for node in &mut nodes {
        node.restart().await;
    }
    let back = Instant::now();
    until_ready(&manager, count, "every node Ready again by probes").await;
    let took = back.elapsed();
    let probed = probes(&manager);
    let bound = PROBES_PER_SECOND * (1.0 + started.elapsed().as_secs_f64());
    println!(
        "{count} nodes: all Ready {took:.2?} after their return; at most {} handshakes at once \
         (limit {HANDSHAKES}); {probed} probes in {:.1?} (bound {bound:.0})",
        handshakes.peak(),
        started.elapsed()
    );
    assert!(
        handshakes.peak() <= HANDSHAKES,
        "{} handshakes at once, above ssh.max_handshakes_in_flight = {HANDSHAKES}",
        handshakes.peak()
    );
    assert!(handshakes.peak() >= 1, "no handshake was observed");
    assert!(probed <= bound, "{probed} probes, above the bound {bound}");
    // Every node came back by a probe (the backoff is an hour).
    let s = manager.metrics().encode();
    assert!(
        support::manager::metric(
            manager.metrics(),
            "nodetunnel_reconnect_probe_to_ready_seconds_count"
        ) >= count as f64,
        "{s}"
    );
    manager.shutdown(Duration::from_secs(5)).await;
}
