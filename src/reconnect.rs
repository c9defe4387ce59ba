//! How a node session waits before its next connection attempt: cheap
//! probes while the node's SSH port is closed, the exponential backoff only
//! after a handshake failed against a port that accepts, and early attempts
//! on demand.
//!
//! - [`Retry::after`] classifies a failure. A TCP connect that was refused
//!   or timed out, or a session lost after it had been Ready for a while,
//!   means the node (or its sshd) is away: the session **probes** its port
//!   with a plain TCP connect and banner read every `probe_interval`
//!   (jittered), and attempts the handshake as soon as a probe finds an SSH
//!   banner. A handshake that failed against a port that answers (host key,
//!   authentication, protocol, a handshake timeout), or a session lost soon
//!   after it came up, waits out the **backoff** delay as before: that is
//!   what protects sshd from a storm of handshakes.
//! - [`Prober`] bounds the probes of the whole process: at most
//!   `max_per_second` start per second and as many are in flight, so a mass
//!   outage of thousands of nodes costs a steady trickle of TCP connects.
//!   Handshakes stay bounded by `ssh.max_handshakes_in_flight` elsewhere.
//! - [`Demand`] lets a dial for a node that has no Ready session ask for an
//!   attempt now (at most one per node per `DEMAND_INTERVAL`), and lets the
//!   inventory say a node came back (its Kubernetes Ready condition turned
//!   True), which also resets the backoff.

use std::sync::Arc;
use std::time::Duration;

use rand::RngExt;
use tokio::io::AsyncReadExt;
use tokio::sync::{watch, Mutex, Semaphore};
use tokio::time::Instant;

/// At most one demand-driven attempt per node this often.
pub const DEMAND_INTERVAL: Duration = Duration::from_secs(1);

/// What the next attempt waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    /// The node's port is closed or unreachable: probe it every interval,
    /// attempt as soon as it answers.
    Probe,
    /// A handshake failed against a port that answers: wait the backoff.
    Backoff,
}

impl Retry {
    /// The wait after a failed attempt. `unreachable`: the TCP connect
    /// itself failed (refused, unreachable, timed out).
    pub fn after_attempt(unreachable: bool) -> Retry {
        if unreachable {
            Retry::Probe
        } else {
            Retry::Backoff
        }
    }

    /// The wait after a Ready session was lost, having been Ready for
    /// `lived`: a node that went away is probed; one whose sessions die soon
    /// after they come up is backed off, as handshake failures are.
    pub fn after_lost(lived: Duration, backoff_reset_after: Duration) -> Retry {
        if lived >= backoff_reset_after {
            Retry::Probe
        } else {
            Retry::Backoff
        }
    }

    /// Label for logs and the tunnel table.
    pub fn as_str(self) -> &'static str {
        match self {
            Retry::Probe => "probe",
            Retry::Backoff => "backoff",
        }
    }
}

/// What one probe found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeResult {
    /// A TCP connection, and an SSH identification line began.
    Open,
    /// Connection refused, unreachable, reset, or closed without a banner.
    Closed,
    /// No answer within the probe's timeout.
    Timeout,
}

impl ProbeResult {
    /// Label for `nodetunnel_reconnect_probes_total{result}`.
    pub fn as_str(self) -> &'static str {
        match self {
            ProbeResult::Open => "open",
            ProbeResult::Closed => "closed",
            ProbeResult::Timeout => "timeout",
        }
    }

    /// Every result, for the series exported at 0 from the start.
    pub const ALL: [ProbeResult; 3] =
        [ProbeResult::Open, ProbeResult::Closed, ProbeResult::Timeout];
}

/// The process-wide bound on probes: a token bucket of `max_per_second`
/// (burst of the same size) and as many probes in flight.
pub struct Prober {
    per_second: u32,
    bucket: Mutex<Bucket>,
    in_flight: Arc<Semaphore>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Prober {
    /// At most `max_per_second` probes start per second (at least 1).
    pub fn new(max_per_second: u32) -> Prober {
        let per_second = max_per_second.max(1);
        Prober {
            per_second,
            bucket: Mutex::new(Bucket {
                tokens: f64::from(per_second),
                at: Instant::now(),
            }),
            in_flight: Arc::new(Semaphore::new(per_second as usize)),
        }
    }

    /// Wait for the right to start one probe.
    async fn admit(&self) {
        loop {
            let wait = {
                let mut bucket = self.bucket.lock().await;
                let now = Instant::now();
                let rate = f64::from(self.per_second);
                let refill = now.duration_since(bucket.at).as_secs_f64() * rate;
                bucket.tokens = (bucket.tokens + refill).min(rate);
                bucket.at = now;
                if bucket.tokens >= 1.0 {
                    bucket.tokens -= 1.0;
                    return;
                }
                Duration::from_secs_f64((1.0 - bucket.tokens) / rate)
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// Probe `host:port`: a TCP connect and the first bytes of an SSH
    /// identification line, each within `timeout`. Waits its turn first.
    pub async fn probe(&self, host: &str, port: u16, timeout: Duration) -> ProbeResult {
        self.admit().await;
        let Ok(_permit) = self.in_flight.clone().acquire_owned().await else {
            return ProbeResult::Closed;
        };
        let attempt = async {
            let mut tcp = match crate::session::tcp_connect(host, port).await {
                Ok(tcp) => tcp,
                Err(_) => return ProbeResult::Closed,
            };
            // The identification line may follow other lines (RFC 4253
            // 4.2); "SSH-" within the first bytes is enough to try.
            let mut seen = Vec::with_capacity(256);
            let mut buf = [0u8; 256];
            while seen.len() < 1024 {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => return ProbeResult::Closed,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
                if seen.windows(4).any(|w| w == b"SSH-") {
                    return ProbeResult::Open;
                }
            }
            ProbeResult::Closed
        };
        tokio::time::timeout(timeout, attempt)
            .await
            .unwrap_or(ProbeResult::Timeout)
    }
}

/// `interval` jittered by up to ±20%, so nodes that went away together do
/// not probe in lockstep.
pub fn jittered(interval: Duration) -> Duration {
    let nanos = interval.as_nanos().min(u64::MAX as u128) as u64;
    if nanos < 5 {
        return interval;
    }
    let spread = nanos / 5;
    Duration::from_nanos(rand::rng().random_range(nanos - spread..=nanos + spread))
}

/// A request for an attempt now, as the node's session supervisors see it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DemandSignal {
    /// Bumped by every request.
    pub generation: u64,
    /// The last request also resets the backoff (the node came back).
    pub reset_backoff: bool,
}

/// Early attempts for one node: asked for by dials (rate-limited) and by
/// the inventory (a node that came back), heard by every session slot
/// waiting to retry.
pub struct Demand {
    tx: watch::Sender<DemandSignal>,
    last: std::sync::Mutex<Option<Instant>>,
}

impl Default for Demand {
    fn default() -> Self {
        Demand::new()
    }
}

impl Demand {
    /// No demand yet.
    pub fn new() -> Demand {
        Demand {
            tx: watch::Sender::new(DemandSignal::default()),
            last: std::sync::Mutex::new(None),
        }
    }

    /// What a supervisor waits on.
    pub fn subscribe(&self) -> watch::Receiver<DemandSignal> {
        self.tx.subscribe()
    }

    /// A dial wants the node: ask for an attempt unless one was asked for
    /// within [`DEMAND_INTERVAL`]. Returns whether it asked.
    pub fn from_dial(&self) -> bool {
        let now = Instant::now();
        let Ok(mut last) = self.last.lock() else {
            return false;
        };
        if last.is_some_and(|at| now.duration_since(at) < DEMAND_INTERVAL) {
            return false;
        }
        *last = Some(now);
        drop(last);
        self.send(false);
        true
    }

    /// The inventory says the node came back: attempt now, backoff reset.
    pub fn node_returned(&self) {
        if let Ok(mut last) = self.last.lock() {
            *last = Some(Instant::now());
        }
        self.send(true);
    }

    fn send(&self, reset_backoff: bool) {
        self.tx.send_modify(|s| {
            s.generation = s.generation.wrapping_add(1);
            s.reset_backoff = reset_backoff;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_ports_are_probed_and_failed_handshakes_backed_off() {
        assert_eq!(Retry::after_attempt(true), Retry::Probe);
        assert_eq!(Retry::after_attempt(false), Retry::Backoff);
        let reset_after = Duration::from_secs(30);
        assert_eq!(
            Retry::after_lost(Duration::from_secs(600), reset_after),
            Retry::Probe
        );
        assert_eq!(
            Retry::after_lost(Duration::from_secs(2), reset_after),
            Retry::Backoff
        );
    }

    #[test]
    fn jitter_stays_within_a_fifth() {
        let interval = Duration::from_secs(2);
        for _ in 0..1000 {
            let d = jittered(interval);
            assert!(d >= Duration::from_millis(1600) && d <= Duration::from_millis(2400));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_probe_rate_is_bounded() {
        let prober = Prober::new(10);
        let start = Instant::now();
        // The burst (10), then one every 100 ms.
        for _ in 0..30 {
            prober.admit().await;
        }
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(1990), "{took:?}");
        assert!(took <= Duration::from_millis(2100), "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn dial_demands_are_rate_limited_per_node_and_returns_reset_backoff() {
        let demand = Demand::new();
        let mut rx = demand.subscribe();
        assert!(demand.from_dial());
        assert!(rx.has_changed().unwrap());
        assert_eq!(
            *rx.borrow_and_update(),
            DemandSignal {
                generation: 1,
                reset_backoff: false
            }
        );
        // A second dial within the interval asks for nothing.
        assert!(!demand.from_dial());
        assert!(!rx.has_changed().unwrap());
        tokio::time::advance(DEMAND_INTERVAL).await;
        assert!(demand.from_dial());
        assert_eq!(rx.borrow_and_update().generation, 2);
        demand.node_returned();
        assert_eq!(
            *rx.borrow_and_update(),
            DemandSignal {
                generation: 3,
                reset_backoff: true
            }
        );
    }

    #[tokio::test]
    async fn a_probe_tells_sshd_from_a_closed_port_and_a_silent_one() {
        use tokio::io::AsyncWriteExt;
        let prober = Prober::new(100);
        let ssh = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ssh_port = ssh.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = ssh.accept().await {
                let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").await;
            }
        });
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent_port = silent.local_addr().unwrap().port();
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let t = Duration::from_millis(300);
        assert_eq!(
            prober.probe("127.0.0.1", ssh_port, t).await,
            ProbeResult::Open
        );
        assert_eq!(
            prober.probe("127.0.0.1", closed, t).await,
            ProbeResult::Closed
        );
        assert_eq!(
            prober.probe("127.0.0.1", silent_port, t).await,
            ProbeResult::Timeout
        );
        drop(silent);
    }
}
