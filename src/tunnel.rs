//! One node's tunnel: its SSH session(s), their lifecycle as an explicit
//! state machine, keepalives, reconnects with backoff, and stream opens.
//!
//! ```text
//!            +------------+  handshake ok   +-------+
//!  start --> | Connecting | --------------> | Ready |
//!            +------------+                 +-------+
//!               ^     | failure                 | keepalive misses, disconnect,
//!               |     v                         | reconnect request
//!            +---------+ <----------------------+
//!            | Backoff |  (full-jitter delay)
//!            +---------+
//!  removed from the inventory or shutdown: Draining (no new streams, open
//!  ones get a grace period) --> Closed
//! ```
//!
//! With `sessions_per_node > 1` every session runs this machine on its own;
//! the node's state is Ready when any session is Ready.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{Notify, Semaphore};

use crate::backoff::Backoff;
use crate::dial::{DialError, LimitKind, NodeDownCause};
use crate::keepalive;
use crate::metrics::{Metrics, StateLabel};
use crate::node::NodeConfig;
use crate::session::{self, ConnectError, SessionSettings, Target};
use crate::shutdown::Shutdown;
use crate::stream::{StreamCounters, StreamLimits, StreamSlot, TunnelStream};

pub use crate::tunnel_status::{TunnelState, TunnelStatus};

/// What every tunnel shares: settings, limits, the handshake budget.
pub struct TunnelContext {
    /// Session settings (identity, known_hosts, timeouts, russh config).
    pub session: Arc<SessionSettings>,
    /// Handshakes in flight over all nodes.
    pub handshakes: Arc<Semaphore>,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// Stream buffering bounds.
    pub limits: Arc<StreamLimits>,
    /// Default SSH user and port.
    pub default_user: String,
    /// Default SSH port.
    pub default_port: u16,
    /// Sessions per node.
    pub sessions_per_node: usize,
    /// Streams per node.
    pub max_streams_per_node: usize,
    /// Keepalive interval.
    pub keepalive_interval: Duration,
    /// Unanswered keepalives that end a session.
    pub keepalive_max: u32,
    /// Backoff base.
    pub backoff_base: Duration,
    /// Backoff cap.
    pub backoff_max: Duration,
    /// Ready this long resets the backoff.
    pub backoff_reset_after: Duration,
}

/// One session slot of the tunnel: where its supervisor is in the state
/// machine, and the live session while it has one. Only a Ready slot holds a
/// session, so a Ready slot without one (or a session kept by a slot that
/// is no longer Ready) cannot be written down.
enum Slot {
    /// Waiting for a handshake permit or handshaking.
    Connecting,
    /// Handshake done: streams may be opened on this session.
    Ready(Arc<LiveSession>),
    /// The handshake failed or the session was lost; waiting out the delay
    /// (the node-wide `retry_in` and `last_error` say which and how long).
    Backoff,
    /// The supervisor has ended.
    Stopped,
}

/// A slot's phase without its data: what the node state is derived from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Connecting,
    Ready,
    Backoff,
    Stopped,
}

impl Slot {
    fn phase(&self) -> Phase {
        match self {
            Slot::Connecting => Phase::Connecting,
            Slot::Ready(_) => Phase::Ready,
            Slot::Backoff => Phase::Backoff,
            Slot::Stopped => Phase::Stopped,
        }
    }

    /// The session of a Ready slot.
    fn session(&self) -> Option<&Arc<LiveSession>> {
        match self {
            Slot::Ready(live) => Some(live),
            _ => None,
        }
    }
}

struct LiveSession {
    session: session::Session,
    streams: Arc<AtomicUsize>,
}

struct Status {
    state: TunnelState,
    since: SystemTime,
    last_error: Option<String>,
    rtt: Option<Duration>,
    handshakes: u64,
    failures: BTreeMap<&'static str, u64>,
    consecutive_failures: u32,
    retry_in: Option<Duration>,
    /// One per session (`sessions_per_node`).
    slots: Vec<Slot>,
}

/// One node's tunnel. Created and owned by the
/// [`TunnelManager`](crate::manager::TunnelManager).
pub struct Tunnel {
    node: RwLock<NodeConfig>,
    name: Arc<str>,
    target: Target,
    ctx: Arc<TunnelContext>,
    status: Mutex<Status>,
    counters: Arc<StreamCounters>,
    draining: AtomicBool,
    stop: Shutdown,
    reconnect: Notify,
    stopped: Notify,
    changed: Notify,
}

enum SessionEnd {
    Stopped,
    Reconnect,
    Dead(String),
}

impl Tunnel {
    /// A tunnel for `node`, not yet started.
    pub fn new(node: NodeConfig, ctx: Arc<TunnelContext>) -> Arc<Tunnel> {
        let target = Target {
            node: node.name.clone(),
            host: node.ssh_address().to_string(),
            port: node.ssh_port.unwrap_or(ctx.default_port),
            user: node
                .ssh_user
                .clone()
                .unwrap_or_else(|| ctx.default_user.clone()),
        };
        let sessions = ctx.sessions_per_node;
        ctx.metrics
            .tunnels
            .get_or_create(&StateLabel {
                state: TunnelState::Connecting.as_str().into(),
            })
            .inc();
        Arc::new(Tunnel {
            name: Arc::from(node.name.as_str()),
            node: RwLock::new(node),
            target,
            ctx,
            status: Mutex::new(Status {
                state: TunnelState::Connecting,
                since: SystemTime::now(),
                last_error: None,
                rtt: None,
                handshakes: 0,
                failures: BTreeMap::new(),
                consecutive_failures: 0,
                retry_in: None,
                slots: std::iter::repeat_with(|| Slot::Connecting)
                    .take(sessions)
                    .collect(),
            }),
            counters: Arc::new(StreamCounters::default()),
            draining: AtomicBool::new(false),
            stop: Shutdown::new(),
            reconnect: Notify::new(),
            stopped: Notify::new(),
            changed: Notify::new(),
        })
    }

    /// Spawn one supervisor task per session.
    pub fn start(self: &Arc<Self>) {
        for slot in 0..self.ctx.sessions_per_node {
            let tunnel = self.clone();
            tokio::spawn(async move { tunnel.supervise(slot).await });
        }
    }

    /// The node this tunnel serves.
    pub fn node(&self) -> NodeConfig {
        self.node
            .read()
            .map(|n| n.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Whether Kubernetes reports the node not Ready.
    pub fn reported_not_ready(&self) -> bool {
        self.node.read().map(|n| n.not_ready).unwrap_or(false)
    }

    /// Update the node's routing data (addresses after the first, pod
    /// CIDRs). The SSH endpoint must be unchanged: sessions are kept.
    pub fn set_node(&self, node: NodeConfig) {
        if let Ok(mut slot) = self.node.write() {
            *slot = node;
        }
    }

    /// Notified at every state change.
    pub fn changed(&self) -> &Notify {
        &self.changed
    }

    /// The node's name.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// Current state.
    pub fn state(&self) -> TunnelState {
        self.status
            .lock()
            .map(|s| s.state)
            .unwrap_or(TunnelState::Closed)
    }

    /// Open streams.
    pub fn open_streams(&self) -> usize {
        self.counters.open.load(Ordering::Acquire)
    }

    /// The stream buffering bounds and counters shared by every tunnel
    /// (`ssh.window_size`, `ssh.max_buffered_bytes`).
    pub fn stream_limits(&self) -> Arc<StreamLimits> {
        self.ctx.limits.clone()
    }

    /// Whether new streams can be opened now.
    pub fn is_ready(&self) -> bool {
        self.state() == TunnelState::Ready
    }

    /// Drop the current sessions and reconnect at once (skipping backoff).
    pub fn reconnect_now(&self) {
        self.reconnect.notify_waiters();
    }

    /// A snapshot for status output.
    pub fn status(&self) -> TunnelStatus {
        let guard = self.status.lock();
        let Ok(s) = guard else {
            return self.poisoned_status();
        };
        let (state, since, last_error, rtt, handshakes, failures, ready) = (
            s.state,
            s.since,
            s.last_error.clone(),
            s.rtt,
            s.handshakes,
            s.failures.clone(),
            s.slots
                .iter()
                .filter(|slot| slot.session().is_some())
                .count(),
        );
        let (consecutive_failures, retry_in) = (s.consecutive_failures, s.retry_in);
        drop(s);
        let c = &self.counters;
        TunnelStatus {
            node: self.name.to_string(),
            addresses: self.node().addresses,
            ssh_endpoint: format!(
                "{}:{}",
                session::bracket(&self.target.host),
                self.target.port
            ),
            state,
            since,
            last_error,
            rtt,
            sessions_ready: ready,
            sessions: self.ctx.sessions_per_node,
            streams: c.open.load(Ordering::Acquire),
            streams_total: c.opened.load(Ordering::Relaxed),
            bytes_to_node: c.bytes_to_node.load(Ordering::Relaxed),
            bytes_from_node: c.bytes_from_node.load(Ordering::Relaxed),
            stream_resets: c.resets.load(Ordering::Relaxed),
            handshakes,
            failures,
            consecutive_failures,
            retry_in,
        }
    }

    fn poisoned_status(&self) -> TunnelStatus {
        TunnelStatus {
            node: self.name.to_string(),
            addresses: Vec::new(),
            ssh_endpoint: String::new(),
            state: TunnelState::Closed,
            since: SystemTime::now(),
            last_error: Some("status lock poisoned".into()),
            rtt: None,
            sessions_ready: 0,
            sessions: 0,
            streams: 0,
            streams_total: 0,
            bytes_to_node: 0,
            bytes_from_node: 0,
            stream_resets: 0,
            handshakes: 0,
            failures: BTreeMap::new(),
            consecutive_failures: 0,
            retry_in: None,
        }
    }

    /// Open a direct-tcpip channel to `host:port` as seen from the node,
    /// on the session with the fewest open streams, waiting at most
    /// `timeout` for the node to confirm it. Every outcome, refusals before
    /// any channel was asked for included, is counted in
    /// `nodetunnel_stream_opens_total{result}`.
    pub async fn open_stream(
        &self,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<TunnelStream, DialError> {
        let result = self.try_open_stream(host, port, timeout).await;
        self.ctx.metrics.stream_open(match &result {
            Ok(_) => "ok",
            Err(e) => e.reason(),
        });
        result
    }

    async fn try_open_stream(
        &self,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<TunnelStream, DialError> {
        if self.draining.load(Ordering::Acquire) {
            return Err(DialError::NodeDown {
                node: self.name.clone(),
                cause: NodeDownCause::Draining,
            });
        }
        let live = self
            .least_loaded_session()
            .ok_or_else(|| self.not_ready_error())?;
        if self.ctx.limits.over_budget() {
            return Err(DialError::Limit {
                node: self.name.clone(),
                kind: LimitKind::BufferedBytes {
                    max: self.ctx.limits.max_in_use,
                },
            });
        }
        let metrics = &self.ctx.metrics;
        let slot = StreamSlot::try_take(
            self.counters.clone(),
            self.ctx.max_streams_per_node,
            live.streams.clone(),
            metrics.clone(),
        )
        .ok_or_else(|| DialError::Limit {
            node: self.name.clone(),
            kind: LimitKind::StreamsPerNode {
                max: self.ctx.max_streams_per_node,
            },
        })?;
        let started = Instant::now();
        let inbound = slot.inbound(self.name.clone(), self.ctx.limits.clone());
        let open = live.session.handle.channel_open_direct_tcpip_with_sink(
            host,
            u32::from(port),
            "127.0.0.1",
            0,
            inbound.clone(),
        );
        let result = match tokio::time::timeout(timeout, open).await {
            Err(_) => Err(DialError::Timeout {
                node: self.name.to_string(),
                after: timeout,
            }),
            Ok(Err(russh::Error::ChannelOpenFailure(reason))) => Err(DialError::Refused {
                node: self.name.to_string(),
                reason: describe_open_failure(&reason),
            }),
            Ok(Err(e)) => Err(DialError::Session {
                node: self.name.to_string(),
                reason: e.to_string(),
            }),
            Ok(Ok(channel)) => Ok(channel),
        };
        metrics
            .stream_open_duration
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(channel) => Ok(TunnelStream::new(channel, slot, inbound)),
            Err(e) => {
                // A confirmation may still come after a timeout: its data
                // must not be kept for a reader that does not exist.
                inbound.abandon();
                Err(e)
            }
        }
    }

    fn least_loaded_session(&self) -> Option<Arc<LiveSession>> {
        let status = self.status.lock().ok()?;
        status
            .slots
            .iter()
            .filter_map(Slot::session)
            .filter(|s| !s.session.handle.is_closed())
            .min_by_key(|s| s.streams.load(Ordering::Acquire))
            .cloned()
    }

    fn not_ready_error(&self) -> DialError {
        let status = self.status();
        DialError::NodeDown {
            node: self.name.clone(),
            cause: NodeDownCause::NotReady {
                state: status.state.as_str(),
                for_: status.since.elapsed().unwrap_or_default(),
                last_error: status.last_error,
            },
        }
    }

    /// Stop taking streams, give open ones up to `grace`, then close the
    /// sessions. Resolves when every supervisor has stopped.
    pub async fn drain(&self, grace: Duration) {
        self.start_draining();
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let drained = self.counters.drained.notified();
            if self.open_streams() == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, drained).await.is_err() {
                tracing::warn!(node = %self.name, streams = self.open_streams(), "drain deadline reached; closing open streams");
                break;
            }
        }
        self.close().await;
    }

    /// Refuse new streams from now on (state Draining); open ones go on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
        self.update(|_| {});
    }

    /// Close every session now and wait for the supervisors to stop.
    pub async fn close(&self) {
        self.draining.store(true, Ordering::Release);
        self.stop.trigger();
        loop {
            let stopped = self.stopped.notified();
            let all_stopped = self
                .status
                .lock()
                .map(|s| s.slots.iter().all(|slot| matches!(slot, Slot::Stopped)))
                .unwrap_or(true);
            if all_stopped {
                break;
            }
            stopped.await;
        }
        self.update(|_| {});
    }

    async fn supervise(self: Arc<Self>, slot: usize) {
        let ctx = self.ctx.clone();
        let mut backoff = Backoff::new(ctx.backoff_base, ctx.backoff_max);
        loop {
            self.set_slot(slot, Slot::Connecting);
            let permit = tokio::select! {
                p = ctx.handshakes.clone().acquire_owned() => p,
                _ = self.stop.wait() => break,
            };
            let attempt = tokio::select! {
                r = session::connect(ctx.session.clone(), self.target.clone()) => r,
                _ = self.stop.wait() => break,
            };
            drop(permit);
            // Reached only after a failure: every other outcome breaks or
            // continues. `Some` carries the reason a Ready session was lost.
            let lost: Option<String> = match attempt {
                Err(e) => {
                    self.record_failure(&e);
                    None
                }
                Ok(session) => {
                    ctx.metrics.handshake("ok");
                    let live = Arc::new(LiveSession {
                        session,
                        streams: Arc::new(AtomicUsize::new(0)),
                    });
                    self.update(|s| {
                        s.handshakes += 1;
                        s.consecutive_failures = 0;
                        if let Some(entry) = s.slots.get_mut(slot) {
                            *entry = Slot::Ready(live.clone());
                        }
                    });
                    tracing::info!(node = %self.name, session = slot, endpoint = %format!("{}:{}", self.target.host, self.target.port), "tunnel ready");
                    let ready_at = Instant::now();
                    let end = self.watch(&live).await;
                    if ready_at.elapsed() >= ctx.backoff_reset_after {
                        backoff.reset();
                    }
                    match end {
                        SessionEnd::Stopped => {
                            // The slot stays Ready until the session is closed
                            // (the tunnel is Draining, so no stream is opened
                            // on it): `close` waits for every slot to stop.
                            close_session(&live).await;
                            break;
                        }
                        SessionEnd::Reconnect => {
                            tracing::info!(node = %self.name, session = slot, "reconnecting on request");
                            self.set_slot(slot, Slot::Connecting);
                            close_session(&live).await;
                            backoff.reset();
                            continue;
                        }
                        SessionEnd::Dead(reason) => {
                            // Sever the transport so that every stream on the
                            // session ends now, even if the peer is a blackhole.
                            live.session.cut.sever();
                            tracing::warn!(node = %self.name, session = slot, error = %reason, "session lost");
                            Some(reason)
                        }
                    }
                }
            };
            let delay = backoff.next_delay();
            // One change: the slot leaves Ready (dropping its session) as
            // the reason and the delay are recorded.
            self.update(|s| {
                if let Some(reason) = lost {
                    s.last_error = Some(reason);
                    s.rtt = None;
                }
                s.consecutive_failures = s.consecutive_failures.saturating_add(1);
                s.retry_in = Some(delay);
                if let Some(entry) = s.slots.get_mut(slot) {
                    *entry = Slot::Backoff;
                }
            });
            tracing::debug!(node = %self.name, session = slot, delay = ?delay, "backing off");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.reconnect.notified() => backoff.reset(),
                _ = self.stop.wait() => break,
            }
        }
        self.set_slot(slot, Slot::Stopped);
        self.stopped.notify_waiters();
    }

    /// Keep one Ready session alive with keepalives until it dies, a
    /// reconnect is requested, or the tunnel stops.
    async fn watch(&self, live: &Arc<LiveSession>) -> SessionEnd {
        let probe = SessionProbe(live.clone());
        let keepalive = keepalive::run(
            &probe,
            self.ctx.keepalive_interval,
            self.ctx.keepalive_max,
            |rtt| {
                self.ctx.metrics.keepalive_rtt.observe(rtt.as_secs_f64());
                self.update(|s| s.rtt = Some(rtt));
            },
        );
        tokio::select! {
            _ = self.stop.wait() => SessionEnd::Stopped,
            _ = self.reconnect.notified() => SessionEnd::Reconnect,
            _ = live.session.ended.wait() => SessionEnd::Dead(
                live.session.ended.reason().unwrap_or_else(|| "session ended".into()),
            ),
            verdict = keepalive => SessionEnd::Dead(match verdict {
                keepalive::Verdict::Silent { misses } => format!(
                    "no keepalive reply for {misses} x {} (ssh.keepalive_interval x ssh.keepalive_max)",
                    humantime::format_duration(self.ctx.keepalive_interval)
                ),
                keepalive::Verdict::Gone(why) => why,
            }),
        }
    }

    fn record_failure(&self, e: &ConnectError) {
        self.ctx.metrics.handshake(e.reason());
        if let Some(reason) = e.certificate_refusal() {
            self.ctx.metrics.client_certificate_refused(reason);
        }
        tracing::warn!(node = %self.name, reason = e.reason(), error = %e, "ssh connect failed");
        self.update(|s| {
            *s.failures.entry(e.reason()).or_insert(0) += 1;
            s.last_error = Some(e.to_string());
        });
    }

    fn set_slot(&self, slot: usize, next: Slot) {
        self.update(|s| {
            if let Some(entry) = s.slots.get_mut(slot) {
                *entry = next;
            }
        });
    }

    /// Apply `change` and recompute the node state from the slots' phases.
    fn update(&self, change: impl FnOnce(&mut Status)) {
        let Ok(mut s) = self.status.lock() else {
            return;
        };
        change(&mut s);
        let next = derive_state(
            s.slots.iter().map(Slot::phase),
            self.draining.load(Ordering::Acquire),
            self.stop.is_triggered(),
        );
        if next != s.state {
            let gauge = &self.ctx.metrics.tunnels;
            gauge
                .get_or_create(&StateLabel {
                    state: s.state.as_str().into(),
                })
                .dec();
            if next != TunnelState::Closed {
                gauge
                    .get_or_create(&StateLabel {
                        state: next.as_str().into(),
                    })
                    .inc();
            }
            tracing::debug!(node = %self.name, from = %s.state, to = %next, "tunnel state");
            s.state = next;
            s.since = SystemTime::now();
            self.changed.notify_waiters();
        }
    }
}

/// Keepalives over a russh session.
struct SessionProbe(Arc<LiveSession>);

impl keepalive::Probe for SessionProbe {
    fn activity(&self) -> u64 {
        self.0.session.handle.received_packets()
    }

    fn probe(
        &self,
    ) -> Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + 'static>> {
        let live = self.0.clone();
        Box::pin(async move {
            if live.session.handle.is_closed() {
                return Err("session closed".into());
            }
            live.session
                .handle
                .send_ping()
                .await
                .map_err(|e| format!("keepalive failed: {e}"))?;
            if live.session.handle.is_closed() {
                return Err("session closed while waiting for a keepalive reply".into());
            }
            Ok(())
        })
    }
}

/// The node's state from its sessions' phases: Closed once stopped and
/// every session ended, Draining while removed or shutting down, otherwise
/// Ready if any session is, Connecting if any is connecting, else Backoff.
fn derive_state(
    phases: impl Iterator<Item = Phase> + Clone,
    draining: bool,
    stopped: bool,
) -> TunnelState {
    let any = |phase| phases.clone().any(|p| p == phase);
    if stopped && phases.clone().all(|p| p == Phase::Stopped) {
        TunnelState::Closed
    } else if draining {
        TunnelState::Draining
    } else if any(Phase::Ready) {
        TunnelState::Ready
    } else if any(Phase::Connecting) {
        TunnelState::Connecting
    } else {
        TunnelState::Backoff
    }
}

async fn close_session(live: &LiveSession) {
    let bye = live.session.handle.disconnect(
        russh::Disconnect::ByApplication,
        "nodetunnel closing",
        "en",
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), bye).await;
    live.session.cut.sever();
}

fn describe_open_failure(reason: &russh::ChannelOpenFailure) -> String {
    match reason {
        russh::ChannelOpenFailure::AdministrativelyProhibited => {
            "administratively prohibited (sshd forbids forwarding: AllowTcpForwarding, PermitOpen)".into()
        }
        russh::ChannelOpenFailure::ConnectFailed => {
            "connect failed (nothing listens at the destination, or it is unreachable from the node)".into()
        }
        russh::ChannelOpenFailure::UnknownChannelType => "unknown channel type".into(),
        russh::ChannelOpenFailure::ResourceShortage => "resource shortage (the node's sshd is out of channels or memory)".into(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Phase::*;

    fn state(phases: &[Phase], draining: bool, stopped: bool) -> TunnelState {
        derive_state(phases.iter().copied(), draining, stopped)
    }

    #[test]
    fn node_state_follows_its_sessions() {
        assert_eq!(state(&[Connecting], false, false), TunnelState::Connecting);
        assert_eq!(state(&[Ready], false, false), TunnelState::Ready);
        assert_eq!(state(&[Backoff], false, false), TunnelState::Backoff);
        // One Ready session of several makes the node Ready.
        assert_eq!(
            state(&[Backoff, Ready, Connecting], false, false),
            TunnelState::Ready
        );
        assert_eq!(
            state(&[Backoff, Connecting], false, false),
            TunnelState::Connecting
        );
        assert_eq!(
            state(&[Backoff, Backoff], false, false),
            TunnelState::Backoff
        );
    }

    #[test]
    fn draining_wins_until_every_session_stopped() {
        assert_eq!(state(&[Ready], true, false), TunnelState::Draining);
        assert_eq!(state(&[Ready, Stopped], true, true), TunnelState::Draining);
        assert_eq!(state(&[Stopped, Stopped], true, true), TunnelState::Closed);
        // Stopped slots without a stop request (not yet started) are not Closed.
        assert_eq!(state(&[Stopped], false, false), TunnelState::Backoff);
    }
}
