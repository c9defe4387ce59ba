//! Reliability suite, part 1: faults. The real `nodetunnel serve` runs in
//! the control-plane namespace of a three-node testbed (network namespaces,
//! a real OpenSSH sshd on port 22 of every node) with short timers
//! (keepalive 1 s x 2, backoff 100 ms..1 s), while checksummed traffic
//! flows through its Unix-socket front door to Source, Sink and Echo
//! servers on every node. Faults are injected on one node (kill -9 of every
//! sshd process, a blackholed link, packet loss, latency with jitter, loss
//! and duplication, a replaced host key, a removed client key, flapping)
//! and on the process (SIGTERM, SIGHUP with a changed inventory), and the
//! tests assert on bytes (every byte checked against the sent pattern,
//! SHA-256 of the whole stream) and on states (log events, the admin API,
//! /metrics, /proc), never on elapsed time; the one timing asserted is a
//! lower bound the delay line enforces by construction (a round trip
//! through it cannot be shorter than two holds). Durations are printed as
//! `figure:` lines (run with `--nocapture`) for docs/reliability.md.
//!
//! Needs root, /usr/sbin/sshd, iproute2 (ip, tc), and python3 for the
//! delay line. Fails with a clear message, never skips, when one is
//! missing. The netem case needs a kernel with sch_netem and is
//! `#[ignore]`d with its reason (see docs/reliability.md); the same
//! latency, jitter, loss and duplication through a userspace delay line,
//! and random loss built from HTB, run everywhere.

mod support;

#[path = "reliability_faults/delayline.rs"]
mod delayline;
#[path = "reliability_faults/fixture.rs"]
mod fixture;
#[path = "reliability_faults/impair.rs"]
mod impair;
#[path = "reliability_faults/traffic.rs"]
mod traffic;

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;

use fixture::*;
use traffic::{Gate, Kind, Outcome, Pause, Transfer};

/// Bytes each paused transfer moves before it holds.
const HEAD: u64 = 1024 * 1024;
/// Bytes each upload sends.
const UPLOAD_LEN: u64 = 6 * 1024 * 1024;

fn figure(test: &str, what: &str, value: impl std::fmt::Display) {
    eprintln!("figure: {test}: {what}: {value}");
}

fn name(i: usize) -> String {
    format!("node-{i}")
}

fn u64_of(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// A download and an upload per node in `nodes`, each held after [`HEAD`]
/// bytes until `gate` opens. Returns once all of them hold.
async fn paused_traffic(
    c: &Cluster,
    uds: &Path,
    nodes: &[usize],
    gate: &Gate,
) -> Vec<(usize, Transfer)> {
    let mut all = Vec::new();
    for &i in nodes {
        all.push((
            i,
            traffic::start(
                format!("download from {}", name(i)),
                uds,
                c.target(i, SOURCE_PORT),
                Kind::Download,
                SOURCE_LEN,
                i as u64,
                Some(Pause { at: HEAD, gate }),
            ),
        ));
        all.push((
            i,
            traffic::start(
                format!("upload to {}", name(i)),
                uds,
                c.target(i, SINK_PORT),
                Kind::Upload,
                UPLOAD_LEN,
                100 + i as u64,
                Some(Pause { at: HEAD, gate }),
            ),
        ));
    }
    for (_, t) in &mut all {
        t.paused().await;
    }
    all
}

/// A download, an upload and an echo through node `i`, unpaused; all must
/// complete byte-exact. The longest duration.
async fn must_serve(c: &Cluster, uds: &Path, i: usize) -> Duration {
    let ts = [
        traffic::start(
            format!("download from {}", name(i)),
            uds,
            c.target(i, SOURCE_PORT),
            Kind::Download,
            SOURCE_LEN,
            i as u64,
            None,
        ),
        traffic::start(
            format!("upload to {}", name(i)),
            uds,
            c.target(i, SINK_PORT),
            Kind::Upload,
            UPLOAD_LEN,
            200 + i as u64,
            None,
        ),
        traffic::start(
            format!("echo through {}", name(i)),
            uds,
            c.target(i, ECHO_PORT),
            Kind::Echo,
            4 * 1024 * 1024,
            300 + i as u64,
            None,
        ),
    ];
    let mut longest = Duration::ZERO;
    for t in ts {
        longest = longest.max(t.complete().await);
    }
    longest
}

/// [`must_serve`] on the three nodes at once; how long each took.
async fn serve_all(c: &Cluster, uds: &Path) -> Vec<Duration> {
    futures::future::join_all((1..=3).map(|i| must_serve(c, uds, i))).await
}

/// The handshake count of each of `nodes`, from the admin API.
async fn handshakes(nt: &NodeTunnel, nodes: &[usize]) -> Vec<u64> {
    let mut out = Vec::new();
    for &i in nodes {
        out.push(u64_of(&nt.tunnel(&name(i)).await["handshakes"]));
    }
    out
}

/// The other nodes' sessions were never replaced: same handshake counts,
/// no stream reset.
async fn assert_untouched(nt: &NodeTunnel, nodes: &[usize], before: &[u64]) {
    for (k, &i) in nodes.iter().enumerate() {
        let v = nt.tunnel(&name(i)).await;
        assert_eq!(v["state"], "ready", "{}: {v}", name(i));
        assert_eq!(
            u64_of(&v["handshakes"]),
            before[k],
            "{} reconnected during a fault on another node: {v}",
            name(i)
        );
        assert_eq!(u64_of(&v["stream_resets"]), 0, "{}: {v}", name(i));
    }
}

/// Release `transfers`: those of `faulty` must end cut (short, never a
/// wrong byte, never a hang), all others complete byte-exact.
async fn settle(
    transfers: Vec<(usize, Transfer)>,
    faulty: Option<usize>,
) -> Vec<(String, u64, String)> {
    let mut cuts = Vec::new();
    for (i, t) in transfers {
        if Some(i) == faulty {
            let label = t.label.clone();
            let (bytes, error) = t.cut().await;
            cuts.push((label, bytes, error));
        } else {
            t.complete().await;
        }
    }
    cuts
}

/// kill -9 of every sshd process on node 3 while all three nodes carry
/// held streams; sshd restarted afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sshd_killed_mid_stream_ends_that_nodes_streams_and_the_node_comes_back() {
    const T: &str = "sshd_killed";
    let c = blocking(Cluster::up);
    let nt = blocking(|| NodeTunnel::start(&c, "kill", &ServeOptions::default()));
    let gate = Gate::new();
    let transfers = paused_traffic(&c, &nt.proxy, &[1, 2, 3], &gate).await;
    let others = handshakes(&nt, &[1, 2]).await;
    let resets_before = u64_of(&nt.tunnel("node-3").await["stream_resets"]);

    let mark = nt.log.len();
    let t0 = Instant::now();
    blocking(|| c.bed.stop_node(3)).expect("kill -9 of node-3's sshd");
    // The session ends at once (the node's TCP end is gone), without
    // waiting for the keepalive budget, and both held streams are reset.
    let lost = blocking(|| nt.expect_log(mark, STATE_TIMEOUT, "session lost", Some("node-3")));
    figure(
        T,
        "kill -9 -> \"session lost\"",
        format!("{:?}", t0.elapsed()),
    );
    figure(T, "session lost because", &nt.event(lost)["error"]);
    let v = nt
        .until_tunnel("node-3", "both held streams reset", |v| {
            u64_of(&v["stream_resets"]) >= resets_before + 2
        })
        .await;
    figure(T, "node-3 after the kill", &v["last_error"]);
    figure(
        T,
        "node-3 streams still counted open right after the resets",
        &v["streams"],
    );
    // Reconnects are refused while sshd is down: Backoff.
    nt.until_tunnel("node-3", "backoff after refused reconnects", |v| {
        v["state"] == "backoff" && u64_of(&v["failures"]["refused"]) >= 1
    })
    .await;
    // A CONNECT routed to it asks for an attempt, waits for it within the
    // dial timeout while sshd is still down, and is refused, naming the node.
    let t1 = Instant::now();
    let r = expect_refused(&nt.proxy, &c.target(3, SOURCE_PORT)).await;
    figure(
        T,
        "CONNECT to the dead node answered in",
        format!("{:?}", t1.elapsed()),
    );
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.body.contains("node-3"), "{r:?}");

    // The held streams: node-3's end short (no wrong byte), the others
    // finish byte-exact.
    gate.open();
    let cuts = settle(transfers, Some(3)).await;
    for (label, bytes, error) in &cuts {
        figure(
            T,
            &format!("{label} cut"),
            format!("after {bytes} bytes: {error}"),
        );
    }
    assert_untouched(&nt, &[1, 2], &others).await;
    // Once their clients let go, the dead node holds no stream.
    nt.until_tunnel("node-3", "no stream left", |v| v["streams"] == 0)
        .await;
    let m = nt.metrics().await;
    let resets = metric(
        &m,
        "nodetunnel_stream_resets_total",
        &[("reason", "session_lost")],
    );
    assert!(resets >= Some(2.0), "session_lost resets: {resets:?}\n{m}");

    // sshd back: Ready again, by itself, and it serves byte-exact.
    let mark = nt.log.len();
    blocking(|| c.bed.start_node(3)).expect("restarting node-3's sshd");
    blocking(|| nt.expect_log(mark, START_TIMEOUT, "tunnel ready", Some("node-3")));
    must_serve(&c, &nt.proxy, 3).await;
    blocking(|| nt.stop());
}

/// Node 3's sshd down for an outage with the backoff an hour away: its
/// session probes the SSH port instead; a CONNECT sent while sshd is still
/// down asks for an attempt (again each second while it waits) and waits
/// (dial timeout 30 s) instead of a 503; once sshd is back, that CONNECT
/// completes byte-exact and the node is Ready again, the other nodes
/// untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_back_from_an_outage_is_found_by_a_probe_and_a_waiting_connect_succeeds() {
    const T: &str = "outage";
    let c = blocking(Cluster::up);
    let opts = ServeOptions {
        dial_timeout: "30s",
        backoff: ("1h", "1h", "1ms"),
        ..ServeOptions::default()
    };
    let nt = blocking(|| NodeTunnel::start(&c, "back", &opts));
    let others = handshakes(&nt, &[1, 2]).await;

    blocking(|| c.bed.stop_node(3)).expect("kill -9 of node-3's sshd");
    let v = nt
        .until_tunnel("node-3", "probing its SSH port", |v| {
            v["state"] == "backoff" && v["retry_reason"] == "probe"
        })
        .await;
    figure(T, "node-3 while sshd is down", &v["last_error"]);
    // A CONNECT while sshd is down: it waits for the node.
    let waiting = traffic::start(
        "echo sent while node-3's sshd is down",
        &nt.proxy,
        c.target(3, ECHO_PORT),
        Kind::Echo,
        1024 * 1024,
        31,
        None,
    );
    nt.until(
        "the CONNECT asked for an attempt",
        STATE_TIMEOUT,
        || async {
            let m = nt.metrics().await;
            (metric(
                &m,
                "nodetunnel_reconnect_demands_total",
                &[("trigger", "dial")],
            ) >= Some(1.0))
            .then_some(())
        },
    )
    .await;
    let back = Instant::now();
    blocking(|| c.bed.start_node(3)).expect("restarting node-3's sshd");
    let took = waiting.complete().await;
    figure(
        T,
        "the waiting CONNECT completed (1 MiB echo), after sshd returned",
        format!("{:?} (the CONNECT itself waited {took:?})", back.elapsed()),
    );
    nt.until_tunnel("node-3", "Ready again", |v| v["state"] == "ready")
        .await;
    must_serve(&c, &nt.proxy, 3).await;
    assert_untouched(&nt, &[1, 2], &others).await;
    blocking(|| nt.stop());
}

/// `ip link set down` on node 3's bridge port: a pure blackhole (no RST,
/// no ICMP). Only keepalives can tell.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackholed_node_is_detected_by_keepalives_and_refused_meanwhile() {
    const T: &str = "blackhole";
    let c = blocking(Cluster::up);
    let nt = blocking(|| NodeTunnel::start(&c, "hole", &ServeOptions::default()));
    let gate = Gate::new();
    let transfers = paused_traffic(&c, &nt.proxy, &[1, 2, 3], &gate).await;
    let others = handshakes(&nt, &[1, 2]).await;

    let mark = nt.log.len();
    let t0 = Instant::now();
    blocking(|| c.bed.link_down(3)).expect("link down");
    // Before the death is noticed the tunnel still looks Ready: a CONNECT
    // now waits for a channel that cannot open, and must still be refused
    // (timeout 504, or 502 when the session is cut under it), not hang.
    let first = expect_refused(&nt.proxy, &c.target(3, ECHO_PORT)).await;
    figure(
        T,
        "CONNECT right after link down",
        format!(
            "{} after {:?}: {}",
            first.status,
            t0.elapsed(),
            first.body.trim()
        ),
    );
    assert!([502, 503, 504].contains(&first.status), "{first:?}");
    assert!(first.body.contains("node-3"), "{first:?}");

    // The keepalive verdict ends the session: detected by keepalives within
    // interval x (max + 1), not by TCP (which would retransmit for minutes).
    let lost = blocking(|| nt.expect_log(mark, STATE_TIMEOUT, "session lost", Some("node-3")));
    figure(
        T,
        "link down -> \"session lost\"",
        format!("{:?} (budget 1 s x (2 + 1) = 3 s)", t0.elapsed()),
    );
    let why = nt.event(lost)["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        why.contains("no keepalive reply"),
        "lost for another reason: {why}"
    );

    // Meanwhile: refused with 503 naming the node (after the dial timeout:
    // the node is away, so the dial waits for it).
    let t1 = Instant::now();
    let r = expect_refused(&nt.proxy, &c.target(3, ECHO_PORT)).await;
    figure(
        T,
        "CONNECT while detected down answered in",
        format!("{:?}", t1.elapsed()),
    );
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.body.contains("node-3"), "{r:?}");
    // Reconnects time out against the blackhole: Backoff.
    let v = nt
        .until_tunnel("node-3", "backoff after timed-out reconnects", |v| {
            v["state"] == "backoff" && u64_of(&v["failures"]["timeout"]) >= 1
        })
        .await;
    figure(T, "reconnect while blackholed", &v["last_error"]);

    gate.open();
    let cuts = settle(transfers, Some(3)).await;
    for (label, bytes, error) in &cuts {
        figure(
            T,
            &format!("{label} cut"),
            format!("after {bytes} bytes: {error}"),
        );
    }
    assert_untouched(&nt, &[1, 2], &others).await;

    let mark = nt.log.len();
    blocking(|| c.bed.link_up(3)).expect("link up");
    blocking(|| nt.expect_log(mark, START_TIMEOUT, "tunnel ready", Some("node-3")));
    must_serve(&c, &nt.proxy, 3).await;
    blocking(|| nt.stop());
}

/// TCP handshakes per RTT probe (about a second through a 20 ms delay line).
const RTT_PROBES: usize = 20;

/// Traffic on all three nodes over clean links, then again while node 2's
/// link is impaired (switched on between the two rounds, under the live
/// sessions): every stream completes byte-exact, node 2's session survives
/// (same session, no reset). `verify` gets the impairment (still in place)
/// and the TCP handshake RTTs from the control plane to node 2 measured
/// under it.
async fn impaired_link_case<G: impair::Impairment>(
    tag: &str,
    opts: &ServeOptions,
    impair: impl FnOnce(&Cluster) -> G,
    verify: impl FnOnce(&Cluster, &mut G, &impair::HandshakeRtts),
) {
    let c = blocking(Cluster::up);
    let nt = blocking(|| NodeTunnel::start(&c, tag, opts));
    let echo2 = std::net::SocketAddr::from((c.bed.node(2).ip, ECHO_PORT));
    let rtt = |c: &Cluster| {
        blocking(|| impair::handshake_rtts(c.bed.cp_ns(), echo2, RTT_PROBES))
            .unwrap_or_else(|e| panic!("measuring the RTT to node-2: {e:#}"))
    };
    let clean = serve_all(&c, &nt.proxy).await;
    figure(
        tag,
        "all three nodes at once, clean links (per node)",
        format!("{clean:?}"),
    );
    figure(tag, "TCP handshake RTT to node-2, clean", rtt(&c));
    let before = handshakes(&nt, &[1, 2, 3]).await;

    let mut impaired = blocking(|| impair(&c));
    figure(tag, "impairment", impaired.description());
    let impaired_rtt = rtt(&c);
    figure(tag, "TCP handshake RTT to node-2, impaired", &impaired_rtt);
    let took = serve_all(&c, &nt.proxy).await;
    figure(
        tag,
        "all three nodes at once, node-2 impaired (per node)",
        format!("{took:?}"),
    );
    figure(
        tag,
        "node-2 time / mean of node-1 and node-3 (impaired run; clean run)",
        format!(
            "{:.2}; {:.2}",
            took[1].as_secs_f64() * 2.0 / (took[0] + took[2]).as_secs_f64(),
            clean[1].as_secs_f64() * 2.0 / (clean[0] + clean[2]).as_secs_f64()
        ),
    );
    assert_untouched(&nt, &[1, 2, 3], &before).await;
    blocking(|| verify(&c, &mut impaired, &impaired_rtt));
    drop(impaired);
    blocking(|| nt.stop());
}

/// Random loss (5% of node 2's packets each way, dropped in the fabric)
/// built without netem, so that it runs on any kernel with HTB and the
/// BPF classifier. With nodetunnel's default keepalive (15 s x 3), as the
/// latency cases: burst losses can stall the TCP connection for seconds
/// (retransmission back-off), which the suite's 1 s x 2 may take for a
/// dead node (it did once, docs/reliability.md known gap 5); this case is
/// about bytes, not about how fast a silent node is detected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_packet_loss_slows_streams_but_loses_nothing() {
    const T: &str = "random_loss";
    impaired_link_case(
        T,
        &default_keepalive(),
        |c| {
            impair::random_loss(&c.bed, 2, 5)
                .unwrap_or_else(|e| panic!("setting up random loss on node-2's link: {e:#}"))
        },
        |c, _, _| {
            // The impairment really dropped packets of node 2.
            let dropped = impair::random_loss_drops(&c.bed, 2).expect("tc -s qdisc show");
            figure(T, "packets (GSO bursts) dropped on node-2's link", dropped);
            assert!(dropped > 0, "the loss impairment dropped nothing");
        },
    )
    .await;
}

/// The latency cases' figures: each direction holds every frame at least
/// DELAY - JITTER, so no round trip through the link can be shorter than
/// twice that.
const DELAY: Duration = Duration::from_millis(20);
const JITTER: Duration = Duration::from_millis(5);

/// The latency cases run with nodetunnel's default keepalive (15 s x 3),
/// not the suite's 1 s x 2: with the short timers a slow link under load
/// is declared dead while it still delivers data (known gap 3 in
/// docs/reliability.md, pinned by
/// `latency_under_load_is_not_mistaken_for_a_dead_node_with_short_keepalives`).
fn default_keepalive() -> ServeOptions {
    ServeOptions {
        keepalive: ("15s", 3),
        ..ServeOptions::default()
    }
}

/// Handshakes through the impaired link took at least one delayed round
/// trip: the latency is really on the path the streams take.
fn assert_delayed_rtt(tag: &str, rtt: &impair::HandshakeRtts) {
    let floor = (DELAY - JITTER) * 2;
    assert!(
        rtt.samples.len() >= RTT_PROBES / 2,
        "{tag}: too many TCP handshakes to node-2 failed: {rtt}"
    );
    let min = rtt.min().expect("at least one RTT sample");
    assert!(
        min >= floor,
        "{tag}: a TCP handshake to node-2 took {min:?}, less than the {floor:?} the delay \
         alone must add (2 x (delay - jitter)): the link is not delayed ({rtt})"
    );
}

/// The delay line's checks: it acted on every frame of node 2's streams,
/// each way, and dropped and duplicated some of them.
fn assert_delay_line_acted(tag: &str, dl: &mut delayline::DelayLine, spec: &delayline::DelaySpec) {
    let [from_node, to_node] = dl
        .stats()
        .unwrap_or_else(|e| panic!("the delay line's counters: {e:#}"));
    figure(tag, "delay line, node-2 -> control plane", &from_node);
    figure(tag, "delay line, control plane -> node-2", &to_node);
    let queue_drops = dl
        .queue_drops()
        .unwrap_or_else(|e| panic!("the TAPs' drop counters: {e:#}"));
    figure(
        tag,
        "frames dropped by the TAP queues (delay line behind), from / to node-2",
        format!("{} / {}", queue_drops[0], queue_drops[1]),
    );
    // Every byte of node 2's streams crossed the delay line: each way at
    // least the payload of the impaired round (download 6 MiB + echo 4 MiB
    // from the node; upload 6 MiB + echo 4 MiB to it).
    let payload = SOURCE_LEN + 4 * 1024 * 1024;
    for d in [&from_node, &to_node] {
        assert!(
            d.sent_bytes >= payload,
            "{tag}: only {} bytes crossed the delay line on {}, less than the {payload} \
             bytes node-2's streams moved that way: traffic bypassed it ({d})",
            d.sent_bytes,
            d.tap
        );
        if spec.loss_percent > 0.0 {
            assert!(d.dropped > 0, "{tag}: the delay line dropped nothing ({d})");
        }
        if spec.duplicate_percent > 0.0 {
            assert!(
                d.duplicated > 0,
                "{tag}: the delay line duplicated nothing ({d})"
            );
        }
        assert!(
            d.hold_min_ms >= (spec.delay - spec.jitter).as_secs_f64() * 1000.0,
            "{tag}: a frame was held less than delay - jitter ({d})"
        );
    }
}

/// The netem case's spec (`delay 20ms 5ms loss 1% duplicate 0.5%`), built
/// without netem; like netem, frames may overtake each other within
/// 2 x jitter.
fn netem_like_spec() -> delayline::DelaySpec {
    delayline::DelaySpec {
        delay: DELAY,
        jitter: JITTER,
        loss_percent: 1.0,
        duplicate_percent: 0.5,
        reorder: true,
        seed: 2,
    }
}

/// The delay line on node 2's link with the netem case's spec.
async fn delay_line_case(tag: &'static str, opts: &ServeOptions) {
    // One delay line at a time: each is a Python process relaying every
    // frame of node 2's link, and two of them next to two testbeds' worth
    // of traffic on 2 cores starve each other.
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _turn = ONE_AT_A_TIME.lock().await;
    if let Err(e) = delayline::python3() {
        panic!("{e:#}");
    }
    let spec = netem_like_spec();
    let check = spec.clone();
    // On this link (about 0.4 MB/s while BBR still uses the clean link's
    // RTT) a channel open waits behind the megabytes the other streams
    // queued in both ends' send buffers, as it would with OpenSSH: one TCP
    // connection. With the suite's 3 s dial timeout, an echo's open was
    // refused with 504 in 1 of 12 whole-suite runs (and very likely in
    // case 3b's one earlier failure); the test is about bytes, not open
    // latency.
    let opts = ServeOptions {
        dial_timeout: "12s",
        ..opts.clone()
    };
    impaired_link_case(
        tag,
        &opts,
        move |c| {
            delayline::DelayLine::start(&c.bed, 2, &spec)
                .unwrap_or_else(|e| panic!("splicing the delay line into node-2's link: {e:#}"))
        },
        move |_, dl, rtt| {
            assert_delayed_rtt(tag, rtt);
            assert_delay_line_acted(tag, dl, &check);
        },
    )
    .await;
}

/// Latency, jitter, loss and duplication on node 2's link without netem:
/// a userspace delay line (tests/reliability_faults/delayline.py) spliced
/// into both directions of the link in the fabric, with the spec of the
/// netem case. Needs TUN/TAP, the ingress qdisc, u32 and mirred, and
/// python3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_jitter_loss_and_duplication_slow_streams_but_lose_nothing() {
    delay_line_case("delay_line", &default_keepalive()).await;
}

/// The same link with the suite's keepalive of 1 s x 2 (formerly known gap
/// 3 of docs/reliability.md). The session must survive: the node keeps
/// sending data, while each keepalive and its answer wait behind megabytes
/// queued in the send buffers of both ends. Needs both fixes: the vendored
/// russh session loop reads while its writes are blocked, and the keepalive
/// counts packets received (`Handle::received_packets`) as a sign of life.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_under_load_is_not_mistaken_for_a_dead_node_with_short_keepalives() {
    delay_line_case("short_keepalive", &ServeOptions::default()).await;
}

/// netem loss, delay and jitter on node 2's link (the same case as the
/// delay line's, with netem). Blocked where the kernel has no sch_netem
/// (the machine this suite was written on: kernel built with
/// CONFIG_NET_SCH_NETEM unset and no module support); run it with
/// `cargo test --test reliability_faults -- --ignored netem` where netem
/// exists. Fails with the reason when netem is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "blocked on kernels without sch_netem (see docs/reliability.md); run with --ignored where tc netem works"]
async fn netem_loss_and_latency_slow_streams_but_lose_nothing() {
    if let Some(why) = impair::netem_unavailable() {
        panic!("BLOCKED: netem is not available: {why}");
    }
    impaired_link_case(
        "netem",
        &default_keepalive(),
        |c| {
            impair::netem(&c.bed, 2, "delay 20ms 5ms loss 1% duplicate 0.5%")
                .unwrap_or_else(|e| panic!("netem on node-2's link: {e:#}"))
        },
        |_, _, rtt| assert_delayed_rtt("netem", rtt),
    )
    .await;
}

/// Generate a fresh ed25519 host key at `path` (the node is "reinstalled").
fn regenerate_host_key(path: &Path) -> String {
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(path.with_extension("pub"));
    let out = std::process::Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "node-3-reinstalled",
            "-f",
        ])
        .arg(path)
        .output()
        .expect("running ssh-keygen");
    assert!(out.status.success(), "ssh-keygen: {out:?}");
    let public = std::fs::read_to_string(path.with_extension("pub")).expect("new .pub");
    let mut parts = public.split_whitespace();
    format!("{} {}", parts.next().unwrap(), parts.next().unwrap())
}

/// node 3's host key replaced (sshd restarted with a new key): strict and
/// accept-new both refuse it and say so; the other nodes carry on; a
/// corrected known_hosts and SIGHUP bring node 3 back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_host_key_is_refused_under_strict_and_accept_new() {
    const T: &str = "host_key";
    let c = blocking(Cluster::up);
    let original = std::fs::read_to_string(c.bed.known_hosts_path()).expect("known_hosts");
    let strict_kh = c.path("strict_known_hosts");
    let tofu_kh = c.path("tofu_known_hosts");
    std::fs::write(&strict_kh, &original).unwrap();
    std::fs::write(&tofu_kh, &original).unwrap();
    let (strict, tofu) = blocking(|| {
        let strict = NodeTunnel::start(
            &c,
            "strict",
            &ServeOptions {
                known_hosts: Some(strict_kh.clone()),
                ..ServeOptions::default()
            },
        );
        let tofu = NodeTunnel::start(
            &c,
            "tofu",
            &ServeOptions {
                host_key_policy: "accept-new",
                known_hosts: Some(tofu_kh.clone()),
                ..ServeOptions::default()
            },
        );
        (strict, tofu)
    });
    let gate = Gate::new();
    let transfers = paused_traffic(&c, &strict.proxy, &[1, 2], &gate).await;
    let others = [
        handshakes(&strict, &[1, 2]).await,
        handshakes(&tofu, &[1, 2]).await,
    ];

    // Reinstall node 3: sshd killed, a new host key, sshd started again.
    let marks = [strict.log.len(), tofu.log.len()];
    let key_file = c.host_key_file(3);
    let new_key = blocking(|| {
        c.bed.stop_node(3).expect("stopping node-3");
        let k = regenerate_host_key(&key_file);
        c.bed
            .start_node(3)
            .expect("starting node-3 with its new key");
        k
    });
    assert!(!original.contains(&new_key));

    for (nt, mark) in [(&strict, marks[0]), (&tofu, marks[1])] {
        let i = blocking(|| {
            nt.expect(
                mark,
                STATE_TIMEOUT,
                "ssh connect failed (host_key) for node-3",
                |v| is_event(v, "ssh connect failed", Some("node-3")) && v["reason"] == "host_key",
            )
        });
        figure(T, &format!("{} reports", nt.name), &nt.event(i)["error"]);
        let v = nt
            .until_tunnel("node-3", "backoff on a host key failure", |v| {
                v["state"] == "backoff" && u64_of(&v["failures"]["host_key"]) >= 1
            })
            .await;
        let last = v["last_error"].as_str().unwrap_or_default();
        assert!(last.contains("HOST KEY CHANGED"), "{}: {v}", nt.name);
        // A CONNECT to node 3 is refused and says why.
        let r = expect_refused(&nt.proxy, &c.target(3, SOURCE_PORT)).await;
        assert_eq!(r.status, 503, "{}: {r:?}", nt.name);
        assert!(
            r.body.contains("node-3") && r.body.contains("HOST KEY CHANGED"),
            "{}: {r:?}",
            nt.name
        );
        let m = nt.metrics().await;
        let n = metric(
            &m,
            "nodetunnel_ssh_handshakes_total",
            &[("result", "host_key")],
        );
        assert!(n >= Some(1.0), "{}: host_key handshakes {n:?}", nt.name);
    }
    // accept-new learns unknown keys only: a changed key is not recorded.
    assert_eq!(
        std::fs::read_to_string(&tofu_kh).unwrap(),
        original,
        "accept-new must not touch known_hosts for a changed key"
    );

    // The other nodes: held streams finish byte-exact, sessions untouched.
    gate.open();
    settle(transfers, None).await;
    assert_untouched(&strict, &[1, 2], &others[0]).await;
    assert_untouched(&tofu, &[1, 2], &others[1]).await;

    // Recovery: strict gets the new line, accept-new loses the stale one
    // (and learns the key); SIGHUP re-reads known_hosts.
    let node3 = c.bed.node(3).ip.to_string();
    let without: String = original
        .lines()
        .filter(|l| l.split_whitespace().next() != Some(node3.as_str()))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&strict_kh, format!("{without}{node3} {new_key}\n")).unwrap();
    std::fs::write(&tofu_kh, &without).unwrap();
    let marks = [strict.log.len(), tofu.log.len()];
    strict.signal(Signal::SIGHUP);
    tofu.signal(Signal::SIGHUP);
    blocking(|| {
        strict.expect_log(marks[0], START_TIMEOUT, "tunnel ready", Some("node-3"));
        tofu.expect_log(
            marks[1],
            START_TIMEOUT,
            "learned new host key (accept-new)",
            Some("node-3"),
        );
        tofu.expect_log(marks[1], START_TIMEOUT, "tunnel ready", Some("node-3"));
    });
    let learned = std::fs::read_to_string(&tofu_kh).unwrap();
    assert!(
        learned.contains(&new_key),
        "accept-new recorded the key: {learned}"
    );
    must_serve(&c, &strict.proxy, 3).await;
    blocking(|| {
        strict.stop();
        tofu.stop();
    });
}

/// The client key removed from node 3's authorized_keys, then a reconnect:
/// authentication fails, the tunnel backs off and keeps retrying; once the
/// key is back it recovers by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_client_key_fails_auth_backs_off_and_recovers() {
    const T: &str = "auth";
    let c = blocking(Cluster::up);
    let nt = blocking(|| NodeTunnel::start(&c, "auth", &ServeOptions::default()));
    let gate = Gate::new();
    let transfers = paused_traffic(&c, &nt.proxy, &[1, 2], &gate).await;
    let others = handshakes(&nt, &[1, 2]).await;

    c.bed
        .set_authorized_keys(3, "")
        .expect("emptying authorized_keys");
    let mark = nt.log.len();
    // sshd checks keys at login only: make nodetunnel log in again.
    let (status, body) = nt
        .admin_post("/api/v1/tunnels/node-3/reconnect")
        .await
        .expect("POST reconnect");
    assert_eq!(status, 202, "{body}");
    let i = blocking(|| {
        nt.expect(
            mark,
            STATE_TIMEOUT,
            "ssh connect failed (auth) for node-3",
            |v| is_event(v, "ssh connect failed", Some("node-3")) && v["reason"] == "auth",
        )
    });
    figure(T, "reported", &nt.event(i)["error"]);
    // It keeps retrying, with backoff: several failures in a row, each
    // followed by a delay drawn below backoff_max.
    let v = nt
        .until_tunnel("node-3", "backoff after 3 auth failures in a row", |v| {
            v["state"] == "backoff"
                && u64_of(&v["failures"]["auth"]) >= 3
                && u64_of(&v["consecutive_failures"]) >= 3
        })
        .await;
    let retry_in = v["retry_in"].as_f64().expect("retry_in while in backoff");
    assert!(retry_in <= 1.0, "delay above backoff_max: {v}");
    let last = v["last_error"].as_str().unwrap_or_default();
    assert!(
        last.contains("authentication") && last.contains("refused"),
        "{v}"
    );
    let r = expect_refused(&nt.proxy, &c.target(3, SOURCE_PORT)).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert!(
        r.body.contains("node-3") && r.body.contains("authentication"),
        "{r:?}"
    );
    let m = nt.metrics().await;
    let n = metric(&m, "nodetunnel_ssh_handshakes_total", &[("result", "auth")]);
    assert!(n >= Some(3.0), "auth handshakes {n:?}");

    gate.open();
    settle(transfers, None).await;
    assert_untouched(&nt, &[1, 2], &others).await;

    // The key restored: the next retry logs in, without any poke.
    let mark = nt.log.len();
    c.bed
        .set_authorized_keys(3, &c.key.public_line)
        .expect("restoring authorized_keys");
    blocking(|| nt.expect_log(mark, START_TIMEOUT, "tunnel ready", Some("node-3")));
    let v = nt.tunnel("node-3").await;
    assert_eq!(v["consecutive_failures"], 0, "{v}");
    figure(T, "auth failures before recovery", &v["failures"]["auth"]);
    must_serve(&c, &nt.proxy, 3).await;
    blocking(|| nt.stop());
}

/// Wait until nothing is in flight: no stream on any node, no proxy
/// connection open.
async fn quiescent(nt: &NodeTunnel) {
    nt.until(
        "no stream and no proxy connection open",
        STATE_TIMEOUT,
        || async {
            let list = nt.tunnels().await;
            let m = nt.metrics().await;
            let conns = metric(&m, "nodetunnel_proxy_connections_open", &[]);
            let streams = metric(&m, "nodetunnel_streams_open", &[]);
            (list["summary"]["streams"] == 0 && conns == Some(0.0) && streams == Some(0.0))
                .then_some(())
        },
    )
    .await;
}

/// Node 3's link flaps (down and up on a fixed schedule, 0.5 to 4 s down)
/// for ~24 s while traffic runs through every node. Afterwards the process
/// has as many descriptors and threads as before and its memory did not
/// grow beyond allocator noise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flapping_node_leaks_no_descriptors_threads_or_memory() {
    const T: &str = "flapping";
    /// How long the flapping lasts (the issue says a minute; 24 s keeps the
    /// suite short and still gives ~8 outages, most longer than the
    /// keepalive budget).
    const FLAP_FOR: Duration = Duration::from_secs(24);
    /// Down, then up, per cycle (fault timing, not synchronisation).
    const SCHEDULE: [(u64, u64); 3] = [(4000, 1000), (500, 1000), (2000, 1500)];
    /// Descriptors and threads may differ by this much: a reconnect
    /// attempt's socket or a blocking-pool thread that is just ending.
    const SLACK: usize = 2;
    /// Resident set growth allowed: glibc keeps freed stream buffers
    /// (up to one 2 MiB window per stream) in its arenas.
    const RSS_SLACK_KIB: u64 = 16 * 1024;

    let c = blocking(Cluster::up);
    let nt = blocking(|| NodeTunnel::start(&c, "flap", &ServeOptions::default()));
    // Warm-up: traffic on every node and one outage of node 3, so that
    // lazily built state (metric series, allocator arenas, the blocking
    // pool) exists before the baseline.
    for i in 1..=3 {
        must_serve(&c, &nt.proxy, i).await;
    }
    let mark = nt.log.len();
    blocking(|| c.bed.stop_node(3)).unwrap();
    blocking(|| nt.expect_log(mark, STATE_TIMEOUT, "session lost", Some("node-3")));
    blocking(|| c.bed.start_node(3)).unwrap();
    blocking(|| nt.expect_log(mark, START_TIMEOUT, "tunnel ready", Some("node-3")));
    quiescent(&nt).await;
    let base = nt.sample();
    figure(T, "baseline /proc", format!("{base:?}"));
    let others = handshakes(&nt, &[1, 2]).await;
    let hs3 = u64_of(&nt.tunnel("node-3").await["handshakes"]);

    // Traffic during the flapping: node 1 must always serve byte-exact;
    // node 3 may refuse or cut, never corrupt or hang.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let runner = |node: usize| {
        let stop = stop.clone();
        let uds = nt.proxy.clone();
        let target = c.target(node, SOURCE_PORT);
        tokio::spawn(async move {
            let mut outcomes = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let t = traffic::start(
                    format!("download from node-{node}"),
                    &uds,
                    target.clone(),
                    Kind::Download,
                    SOURCE_LEN,
                    node as u64,
                    None,
                );
                let (out, _) = t.outcome().await;
                let refused = matches!(out, Outcome::Refused(_));
                outcomes.push(out);
                if refused {
                    // Do not spin on instant 503s.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            outcomes
        })
    };
    let steady = runner(1);
    let flappy = runner(3);
    let started = Instant::now();
    let mut cycles = 0;
    while started.elapsed() < FLAP_FOR {
        let (down, up) = SCHEDULE[cycles % SCHEDULE.len()];
        blocking(|| c.bed.link_down(3)).unwrap();
        tokio::time::sleep(Duration::from_millis(down)).await;
        blocking(|| c.bed.link_up(3)).unwrap();
        tokio::time::sleep(Duration::from_millis(up)).await;
        cycles += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let steady = steady.await.unwrap();
    let flappy = flappy.await.unwrap();
    let losses = nt
        .log
        .events(mark)
        .iter()
        .filter(|v| is_event(v, "session lost", Some("node-3")))
        .count();
    figure(
        T,
        "flap cycles",
        format!("{cycles} in {:?}", started.elapsed()),
    );
    figure(T, "node-3 sessions lost (incl. warm-up)", losses);
    for out in &steady {
        assert!(out.is_complete(), "node-1 during the flapping: {out:?}");
    }
    let (mut done, mut cut, mut refused) = (0, 0, 0);
    for out in &flappy {
        match out {
            Outcome::Complete { .. } => done += 1,
            Outcome::Cut { .. } => cut += 1,
            Outcome::Refused(r) if [502, 503, 504].contains(&r.status) => refused += 1,
            other => panic!("node-3 during the flapping: {other:?}"),
        }
    }
    figure(T, "node-1 downloads, all byte-exact", steady.len());
    figure(
        T,
        "node-3 downloads complete/cut/refused",
        format!("{done}/{cut}/{refused}"),
    );
    assert!(losses >= 2, "the flapping never took node-3's session down");

    // Settle: node 3 back, nothing in flight, the other nodes untouched.
    nt.until_tunnel("node-3", "ready after the flapping", |v| {
        v["state"] == "ready"
    })
    .await;
    quiescent(&nt).await;
    assert_untouched(&nt, &[1, 2], &others).await;
    let hs3_after = u64_of(&nt.tunnel("node-3").await["handshakes"]);
    figure(T, "node-3 reconnects during the flapping", hs3_after - hs3);
    must_serve(&c, &nt.proxy, 3).await;
    quiescent(&nt).await;

    // Descriptors close asynchronously (a severed transport is dropped by
    // its task): wait, bounded, for the count to come back.
    let after = nt
        .until(
            "descriptors back to the baseline",
            STATE_TIMEOUT,
            || async {
                let s = nt.sample();
                (s.fds <= base.fds + SLACK).then_some(s)
            },
        )
        .await;
    figure(T, "after /proc", format!("{after:?}"));
    figure(
        T,
        "RSS growth",
        format!("{} KiB", after.rss_kib as i64 - base.rss_kib as i64),
    );
    assert!(
        after.threads <= base.threads + SLACK,
        "threads {base:?} -> {after:?}"
    );
    assert!(
        after.rss_kib <= base.rss_kib + RSS_SLACK_KIB,
        "RSS grew by more than {RSS_SLACK_KIB} KiB: {base:?} -> {after:?}"
    );
    blocking(|| nt.stop());
}

/// SIGTERM while streams on every node are in flight and one client has
/// stopped reading: the socket stops accepting, the in-flight streams
/// finish byte-exact during the drain, the stalled one is cut at the
/// deadline (and that is logged), and the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_traffic_drains_in_flight_streams_and_exits_0() {
    const T: &str = "sigterm";
    let c = blocking(Cluster::up);
    let mut nt = blocking(|| {
        NodeTunnel::start(
            &c,
            "term",
            &ServeOptions {
                drain_timeout: "15s",
                ..ServeOptions::default()
            },
        )
    });
    let gate = Gate::new();
    let transfers = paused_traffic(&c, &nt.proxy, &[1, 2, 3], &gate).await;
    let stalled_gate = Gate::new();
    let mut stalled = traffic::start(
        "stalled download from node-1",
        &nt.proxy,
        c.target(1, SOURCE_PORT),
        Kind::Download,
        SOURCE_LEN,
        1,
        Some(Pause {
            at: HEAD,
            gate: &stalled_gate,
        }),
    );
    stalled.paused().await;

    let mark = nt.log.len();
    let t0 = Instant::now();
    nt.signal(Signal::SIGTERM);
    blocking(|| nt.expect_log(mark, STATE_TIMEOUT, "SIGTERM: draining", None));
    let i = blocking(|| nt.expect_log(mark, STATE_TIMEOUT, "draining connections", None));
    assert_eq!(nt.event(i)["open"], 7, "{}", nt.event(i));
    // No new connection is accepted (the socket file is gone).
    assert!(
        tokio::net::UnixStream::connect(&nt.proxy).await.is_err(),
        "the proxy socket still accepts after SIGTERM"
    );
    // The in-flight streams finish, byte-exact, during the drain.
    gate.open();
    settle(transfers, None).await;
    figure(
        T,
        "6 held streams finished after SIGTERM in",
        format!("{:?}", t0.elapsed()),
    );
    // The stalled one is cut at the deadline, and the cut is logged.
    let i = blocking(|| {
        nt.expect_log(
            mark,
            Duration::from_secs(30),
            "drain deadline reached: aborting the remaining connections",
            None,
        )
    });
    assert_eq!(nt.event(i)["aborted"], 1, "{}", nt.event(i));
    figure(
        T,
        "drain deadline (15 s) reached after",
        format!("{:?}", t0.elapsed()),
    );
    stalled_gate.open();
    let (bytes, how) = stalled.cut().await;
    figure(
        T,
        "stalled client saw",
        format!("{bytes} of {SOURCE_LEN} bytes, then {how}"),
    );
    assert!(bytes < SOURCE_LEN);

    let (status, log) = nt.terminate_and_wait(EXIT_TIMEOUT);
    let status = status.unwrap_or_else(|e| panic!("{e:#}; log:\n{log}"));
    assert!(status.success(), "exit {status} after SIGTERM; log:\n{log}");
    figure(
        T,
        "exit after SIGTERM",
        format!("{status} after {:?}", t0.elapsed()),
    );
    let last = log.lines().last().unwrap_or_default();
    assert!(
        last.contains("\"message\":\"stopped\""),
        "last line {last:?}"
    );
}

/// (node, state) of every tunnel in a `/api/v1/tunnels` document.
fn node_states(list: &Value) -> Vec<(String, String)> {
    list["tunnels"]
        .as_array()
        .expect("tunnels array")
        .iter()
        .map(|t| {
            (
                t["node"].as_str().unwrap_or_default().to_owned(),
                t["state"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// SIGHUP with a changed inventory while streams on every node are in
/// flight: node-1 unchanged, node-2 gains a pod CIDR (routing data only),
/// node-3 removed. Node 1's and 2's streams and sessions are untouched,
/// node 3's stream finishes within the drain, new dials to node 3 have no
/// route; a second SIGHUP adds node 3 back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_inventory_change_leaves_unchanged_nodes_streams_alone() {
    const T: &str = "sighup";
    let c = blocking(Cluster::up);
    let full = ServeOptions {
        drain_timeout: "20s",
        ..ServeOptions::default()
    };
    let nt = blocking(|| NodeTunnel::start(&c, "hup", &full));
    let gate = Gate::new();
    let transfers = paused_traffic(&c, &nt.proxy, &[1, 2, 3], &gate).await;
    let before = handshakes(&nt, &[1, 2]).await;

    let changed = ServeOptions {
        nodes: vec![(1, vec![]), (2, vec!["10.244.22.0/24".into()])],
        ..full.clone()
    };
    c.write_config("hup", &changed);
    let mark = nt.log.len();
    nt.signal(Signal::SIGHUP);
    let i = blocking(|| nt.expect_log(mark, STATE_TIMEOUT, "inventory applied", None));
    let e = nt.event(i);
    assert_eq!(
        (&e["added"], &e["changed"], &e["removed"], &e["unchanged"]),
        (
            &Value::from(0),
            &Value::from(1),
            &Value::from(1),
            &Value::from(1)
        ),
        "{e}"
    );
    blocking(|| nt.expect_log(mark, STATE_TIMEOUT, "SIGHUP: reloaded", None));
    // node-3 is gone from the inventory; while its held streams run it is
    // listed as draining (never dialled), the others Ready.
    let list = nt.tunnels().await;
    let now = node_states(&list);
    assert_eq!(
        now.iter()
            .filter(|(n, _)| n != "node-3")
            .cloned()
            .collect::<Vec<_>>(),
        [
            ("node-1".to_owned(), "ready".to_owned()),
            ("node-2".to_owned(), "ready".to_owned())
        ],
        "{list}"
    );
    assert!(
        now.iter()
            .filter(|(n, _)| n == "node-3")
            .all(|(_, s)| s == "draining"),
        "node-3 after its removal: {list}"
    );
    // The new pod CIDR routes to node 2; node 3's address routes nowhere.
    let r = nt
        .admin_get("/api/v1/route?dest=10.244.22.5:80")
        .await
        .unwrap();
    let route: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        (&route["decision"], &route["node"]),
        (&Value::from("node"), &Value::from("node-2")),
        "{route}"
    );
    let r = expect_refused(&nt.proxy, &c.target(3, SOURCE_PORT)).await;
    assert_eq!(r.status, 403, "{r:?}");

    // Every held stream finishes byte-exact: nodes 1 and 2 were not
    // touched, node 3 drains.
    gate.open();
    settle(transfers, None).await;
    assert_untouched(&nt, &[1, 2], &before).await;
    // Its streams done, node 3's old tunnel closes and leaves the list.
    nt.until("node-3 drained and closed", STATE_TIMEOUT, || async {
        let list = nt.tunnels().await;
        (!node_states(&list).iter().any(|(n, _)| n == "node-3")).then_some(())
    })
    .await;
    figure(
        T,
        "node-1/node-2 handshakes across the reload",
        format!("{before:?} (unchanged)"),
    );

    // Node 3 back.
    c.write_config("hup", &full);
    let mark = nt.log.len();
    nt.signal(Signal::SIGHUP);
    blocking(|| nt.expect_log(mark, START_TIMEOUT, "tunnel ready", Some("node-3")));
    must_serve(&c, &nt.proxy, 3).await;
    assert_untouched(&nt, &[1, 2], &before).await;
    blocking(|| nt.stop());
}

/// When a node's session dies, a stream whose client has stopped reading is
/// reset and its client connection closed at once (the front door's splice
/// races the stream's cut signal), so it stops counting as open. Found by
/// this suite; fixed with `TunnelIo::cut` and `splice_until`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_clients_stream_is_closed_when_its_nodes_session_dies() {
    let c = blocking(Cluster::up);
    let nt = blocking(|| NodeTunnel::start(&c, "stall", &ServeOptions::default()));
    let gate = Gate::new();
    let mut stalled = traffic::start(
        "stalled download from node-3",
        &nt.proxy,
        c.target(3, SOURCE_PORT),
        Kind::Download,
        SOURCE_LEN,
        3,
        Some(Pause {
            at: HEAD,
            gate: &gate,
        }),
    );
    stalled.paused().await;
    let mark = nt.log.len();
    blocking(|| c.bed.stop_node(3)).expect("kill -9 of node-3's sshd");
    blocking(|| {
        nt.expect(mark, STATE_TIMEOUT, "the stalled stream reset", |v| {
            v["node"] == "node-3" && v["reason"] == "session_lost"
        })
    });
    // The client still has not read: nodetunnel must let go by itself.
    nt.until_tunnel("node-3", "the reset stream no longer counted open", |v| {
        v["streams"] == 0
    })
    .await;
    let m = nt.metrics().await;
    assert_eq!(metric(&m, "nodetunnel_streams_open", &[]), Some(0.0));
    assert_eq!(
        metric(&m, "nodetunnel_proxy_connections_open", &[]),
        Some(0.0)
    );
    gate.open();
    stalled.cut().await;
    blocking(|| nt.stop());
}
