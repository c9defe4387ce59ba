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
//!            | Backoff |  port closed: probe it every ssh.reconnect_probe_interval,
//!            +---------+  attempt when sshd answers; handshake failed: full-jitter
//!                         delay; a dial or the inventory may ask for an attempt now
//!  removed from the inventory or shutdown: Draining (no new streams, open
//!  ones get a grace period) --> Closed
//! ```
//!
//! With `sessions_per_node > 1` every session runs this machine on its own;
//! the node's state is Ready when any session is Ready.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{Notify, Semaphore};
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::dial::{ChannelRefusal, DialError, LimitKind, NodeDownCause};
use crate::keepalive;
use crate::metrics::{Metrics, StateLabel};
use crate::node::NodeConfig;
use crate::reconnect::{jittered, Demand, ProbeResult, Prober, Retry, DEMAND_INTERVAL};
use crate::session::{self, ConnectError, SessionSettings, Target};
use crate::shutdown::Shutdown;
use crate::ssh_config::SharedWindow;
use crate::stream::{SharedBounds, StreamCounters, StreamLimits, StreamSlot, TunnelStream};

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
    /// How much of a stream's upload a node may hold unconsumed
    /// (`ssh.upload_window`), resolved per session from its round trip.
    pub upload_window: SharedWindow,
    /// The download bound of a stream on a shared session
    /// (`ssh.download_window`), resolved per session from its round trip.
    pub download_window: SharedWindow,
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
    /// How often a node away is probed (`ZERO`: never; always back off).
    pub probe_interval: Duration,
    /// The process-wide bound on probes.
    pub prober: Arc<Prober>,
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
    /// Its slot index (0..`ssh.sessions_per_node`).
    index: usize,
    /// The shortest round trip seen, in microseconds: its TCP connect, then
    /// any shorter keepalive reply (a connect made while the process was
    /// busy took longer than the path does). `u64::MAX`: none measured.
    rtt_floor_us: AtomicU64,
}

impl LiveSession {
    fn new(session: session::Session, index: usize) -> LiveSession {
        let connect_us = session.connect_rtt.map_or(u64::MAX, duration_us);
        LiveSession {
            session,
            streams: Arc::new(AtomicUsize::new(0)),
            index,
            rtt_floor_us: AtomicU64::new(connect_us),
        }
    }

    /// A round trip measured on this session (a keepalive reply).
    fn observe_rtt(&self, rtt: Duration) {
        self.rtt_floor_us
            .fetch_min(duration_us(rtt), Ordering::Relaxed);
    }

    /// The shortest round trip seen, if any.
    fn rtt_floor(&self) -> Option<Duration> {
        match self.rtt_floor_us.load(Ordering::Relaxed) {
            u64::MAX => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// What a stream opened now is held to while the session carries other
    /// streams (`ssh.upload_window`, `ssh.download_window` at the shortest
    /// round trip seen).
    fn shared_bounds(&self, ctx: &TunnelContext) -> SharedBounds {
        let rtt = self.rtt_floor();
        SharedBounds {
            upload: ctx.upload_window.limit(rtt),
            download: ctx.download_window.limit(rtt).map(|n| n as usize),
        }
    }
}

/// When a new session's first round trips are measured (see
/// [`Tunnel::watch`]), and how many.
const FIRST_RTTS_AFTER: Duration = Duration::from_secs(1);
const FIRST_RTTS: u32 = 3;

fn duration_us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX - 1)
}

struct Status {
    state: TunnelState,
    since: SystemTime,
    last_error: Option<String>,
    rtt: Option<Duration>,
    handshakes: u64,
    failures: BTreeMap<&'static str, u64>,
    consecutive_failures: u32,
    /// When the next attempt (or probe) is due.
    retry_due: Option<Instant>,
    /// What the next attempt waits for.
    retry_reason: Option<Retry>,
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
    /// Early attempts asked for by dials and the inventory.
    demand: Demand,
    /// Connection attempts finished (either way), for dials waiting on one.
    attempts_finished: AtomicU64,
}

enum SessionEnd {
    Stopped,
    Reconnect,
    Dead(String),
}

/// How a wait before the next attempt ended.
enum WaitEnd {
    /// Attempt now; `probe_open`: because a probe found sshd.
    Attempt { probe_open: bool },
    /// The tunnel stops.
    Stop,
}

/// One probe of the node's SSH endpoint, within the process-wide bounds.
async fn probe(prober: &Prober, target: &Target, timeout: Duration) -> ProbeResult {
    prober.probe(&target.host, target.port, timeout).await
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
                retry_due: None,
                retry_reason: None,
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
            demand: Demand::new(),
            attempts_finished: AtomicU64::new(0),
        })
    }

    /// Spawn one supervisor task per session, each in its own
    /// [`session_span`]: the connect, the keepalives and the session's end
    /// are logged in it.
    pub fn start(self: &Arc<Self>) {
        for slot in 0..self.ctx.sessions_per_node {
            let tunnel = self.clone();
            let span = session_span(&self.name, &self.target, slot);
            tokio::spawn(async move { tunnel.supervise(slot).await }.instrument(span));
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
            let returned = slot.not_ready && !node.not_ready;
            *slot = node;
            drop(slot);
            if returned && !self.is_ready() {
                // Kubernetes says the node is Ready again: try it now,
                // backoff reset, instead of waiting out the delay.
                tracing::info!(node = %self.name, "node Ready again in the inventory: reconnecting now");
                self.ctx.metrics.reconnect_demand("inventory");
                self.demand.node_returned();
            }
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
        let (consecutive_failures, retry_in, retry_reason) = (
            s.consecutive_failures,
            s.retry_due
                .map(|due| due.saturating_duration_since(Instant::now())),
            s.retry_reason.map(Retry::as_str),
        );
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
            retry_reason,
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
            retry_reason: None,
        }
    }

    /// Open a direct-tcpip channel to `host:port` as seen from the node,
    /// on the session with the fewest open streams, waiting at most
    /// `timeout` for the node to confirm it. The outcome is counted by
    /// whoever answers the client ([`DialError::count`]), once.
    pub async fn open_stream(
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
        let deadline = tokio::time::Instant::now() + timeout;
        let live = match self.least_loaded_session() {
            Some(live) => live,
            None => self.wait_for_session(deadline).await?,
        };
        // What is left of `timeout` after waiting for a session; a timeout
        // is reported as `timeout` (the configured dial timeout), which is
        // how long the dial waited in all.
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
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
        let inbound = slot.inbound(
            self.name.clone(),
            self.ctx.limits.clone(),
            live.shared_bounds(&self.ctx),
        );
        let open = live.session.handle.channel_open_direct_tcpip_with_sink(
            host,
            u32::from(port),
            "127.0.0.1",
            0,
            inbound.clone(),
        );
        let result = match tokio::time::timeout(left, open).await {
            Err(_) => Err(DialError::Timeout {
                node: self.name.to_string(),
                after: timeout,
            }),
            Ok(Err(russh::Error::ChannelOpenFailure(reason))) => Err(DialError::Refused {
                node: self.name.to_string(),
                reason: ChannelRefusal(reason),
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
            Ok(channel) => {
                inbound.confirm();
                let mut stream = TunnelStream::new(channel, slot, inbound);
                stream.set_session(live.index);
                Ok(stream)
            }
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

    /// No session is Ready: ask for an attempt now (at most one per node
    /// per second, [`Demand::from_dial`]) and wait until a session is Ready
    /// or `deadline`. While the node's port is closed its sessions keep
    /// probing it, so a node whose sshd returns within the dial timeout
    /// serves the dial. A node whose handshakes fail against a port that
    /// answers (host key, authentication, protocol) will not recover by
    /// itself in seconds: the dial is refused as soon as the attempt it
    /// asked for (or, rate-limited, the one under way) has failed.
    async fn wait_for_session(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<Arc<LiveSession>, DialError> {
        let finished_before = self.attempts_finished.load(Ordering::Acquire);
        let asked = self.demand.from_dial();
        if asked {
            self.ctx.metrics.reconnect_demand("dial");
            tracing::debug!(node = %self.name, "no Ready session: asked for an attempt now");
        }
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.draining.load(Ordering::Acquire) {
                return Err(DialError::NodeDown {
                    node: self.name.clone(),
                    cause: NodeDownCause::Draining,
                });
            }
            if let Some(live) = self.least_loaded_session() {
                return Ok(live);
            }
            let attempted =
                !asked || self.attempts_finished.load(Ordering::Acquire) > finished_before;
            if attempted && self.backing_off() && !self.any_slot_connecting() {
                return Err(self.not_ready_error());
            }
            // While dials wait for a node that is away, it is tried once
            // per DEMAND_INTERVAL (the demand's own rate limit), so a dial
            // is served within about a second of sshd's return.
            let next_ask = tokio::time::Instant::now() + DEMAND_INTERVAL;
            match tokio::time::timeout_at(deadline.min(next_ask), changed).await {
                Ok(()) => {}
                Err(_) if next_ask < deadline => {
                    if self.demand.from_dial() {
                        self.ctx.metrics.reconnect_demand("dial");
                    }
                }
                Err(_) => return Err(self.not_ready_error()),
            }
        }
    }

    /// The last failure was a handshake against a port that answers.
    fn backing_off(&self) -> bool {
        self.status
            .lock()
            .map(|s| s.retry_reason != Some(Retry::Probe))
            .unwrap_or(true)
    }

    fn any_slot_connecting(&self) -> bool {
        self.status
            .lock()
            .map(|s| s.slots.iter().any(|slot| matches!(slot, Slot::Connecting)))
            .unwrap_or(false)
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
        let mut demand = self.demand.subscribe();
        // When a probe found sshd again, for the probe-to-Ready histogram.
        let mut probe_open_at: Option<Instant> = None;
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
            self.attempts_finished.fetch_add(1, Ordering::AcqRel);
            self.changed.notify_waiters();
            // Reached only after a failure: every other outcome breaks or
            // continues. `Some` carries the reason a Ready session was lost.
            let (lost, retry): (Option<String>, Retry) = match attempt {
                Err(e) => {
                    self.record_failure(&e);
                    (None, Retry::after_attempt(e.is_unreachable()))
                }
                Ok(session) => {
                    ctx.metrics.handshake("ok");
                    if let Some(at) = probe_open_at.take() {
                        ctx.metrics
                            .reconnect_probe_to_ready
                            .observe(at.elapsed().as_secs_f64());
                    }
                    let live = Arc::new(LiveSession::new(session, slot));
                    self.update(|s| {
                        s.handshakes += 1;
                        s.consecutive_failures = 0;
                        if let Some(entry) = s.slots.get_mut(slot) {
                            *entry = Slot::Ready(live.clone());
                        }
                    });
                    let bounds = live.shared_bounds(&self.ctx);
                    tracing::info!(
                        connect_rtt_us = live.session.connect_rtt.map(duration_us),
                        upload_window = bounds.upload,
                        download_window = bounds.download,
                        "tunnel ready"
                    );
                    let ready_at = Instant::now();
                    let end = self.watch(&live).await;
                    let lived = ready_at.elapsed();
                    if lived >= ctx.backoff_reset_after {
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
                            tracing::info!("reconnecting on request");
                            self.set_slot(slot, Slot::Connecting);
                            close_session(&live).await;
                            backoff.reset();
                            continue;
                        }
                        SessionEnd::Dead(reason) => {
                            // Sever the transport so that every stream on the
                            // session ends now, even if the peer is a blackhole.
                            live.session.cut.sever();
                            tracing::warn!(error = %reason, "session lost");
                            (
                                Some(reason),
                                Retry::after_lost(lived, ctx.backoff_reset_after),
                            )
                        }
                    }
                }
            };
            let retry = if ctx.probe_interval.is_zero() {
                Retry::Backoff
            } else {
                retry
            };
            let delay = match retry {
                Retry::Backoff => backoff.next_delay(),
                Retry::Probe => jittered(ctx.probe_interval),
            };
            // One change: the slot leaves Ready (dropping its session) as
            // the reason and the delay are recorded.
            self.update(|s| {
                if let Some(reason) = lost {
                    s.last_error = Some(reason);
                    s.rtt = None;
                }
                s.consecutive_failures = s.consecutive_failures.saturating_add(1);
                s.retry_due = Some(Instant::now() + delay);
                s.retry_reason = Some(retry);
                if let Some(entry) = s.slots.get_mut(slot) {
                    *entry = Slot::Backoff;
                }
            });
            tracing::debug!(delay = ?delay, wait = retry.as_str(), "backing off");
            match self
                .wait_to_retry(retry, delay, &mut demand, &mut backoff)
                .await
            {
                WaitEnd::Attempt { probe_open } => {
                    probe_open_at = probe_open.then(Instant::now);
                }
                WaitEnd::Stop => break,
            }
        }
        self.set_slot(slot, Slot::Stopped);
        self.stopped.notify_waiters();
    }

    /// Wait before the next attempt: `delay` of backoff, or (`Retry::Probe`)
    /// probes every `ssh.reconnect_probe_interval` until sshd answers; cut
    /// short by a demand (a dial, the inventory), a reconnect request, or
    /// the stop.
    async fn wait_to_retry(
        &self,
        retry: Retry,
        mut delay: Duration,
        demand: &mut tokio::sync::watch::Receiver<crate::reconnect::DemandSignal>,
        backoff: &mut Backoff,
    ) -> WaitEnd {
        let ctx = &self.ctx;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                changed = demand.changed() => {
                    if changed.is_ok() {
                        if demand.borrow_and_update().reset_backoff {
                            backoff.reset();
                        }
                        tracing::debug!("attempt on demand");
                        return WaitEnd::Attempt { probe_open: false };
                    }
                    // The sender lives as long as the tunnel: not reached.
                    tokio::time::sleep(delay).await;
                }
                _ = self.reconnect.notified() => {
                    backoff.reset();
                    return WaitEnd::Attempt { probe_open: false };
                }
                _ = self.stop.wait() => return WaitEnd::Stop,
            }
            if retry == Retry::Backoff {
                return WaitEnd::Attempt { probe_open: false };
            }
            let result = tokio::select! {
                r = probe(&ctx.prober, &self.target, ctx.session.connect_timeout) => r,
                _ = self.stop.wait() => return WaitEnd::Stop,
            };
            ctx.metrics.reconnect_probe(result.as_str());
            if result == ProbeResult::Open {
                tracing::debug!("probe: sshd answers; attempting now");
                return WaitEnd::Attempt { probe_open: true };
            }
            delay = jittered(ctx.probe_interval);
            self.update(|s| s.retry_due = Some(Instant::now() + delay));
        }
    }

    /// Keep one Ready session alive with keepalives until it dies, a
    /// reconnect is requested, or the tunnel stops.
    async fn watch(&self, live: &Arc<LiveSession>) -> SessionEnd {
        let probe = SessionProbe(live.clone());
        // Besides the keepalives (every interval), a few round trips soon:
        // `"auto"` shared windows size streams by the shortest round trip
        // seen, and neither the TCP connect (0.06-2 ms on the benchmark's
        // veth, slowed by whatever else the process was doing) nor a
        // request right after authentication (1.5-45 ms: sshd still setting
        // the session up) measures the path alone.
        let early = keepalive::EarlyRoundTrips {
            after: FIRST_RTTS_AFTER,
            count: FIRST_RTTS,
        };
        let keepalive = keepalive::run(
            &probe,
            self.ctx.keepalive_interval,
            self.ctx.keepalive_max,
            early,
            |rtt, kind| {
                live.observe_rtt(rtt);
                self.update(|s| s.rtt = Some(rtt));
                match kind {
                    keepalive::RoundTripKind::Keepalive => {
                        self.ctx.metrics.keepalive_rtt.observe(rtt.as_secs_f64());
                    }
                    keepalive::RoundTripKind::Early { left: 0 } => {
                        let bounds = live.shared_bounds(&self.ctx);
                        tracing::debug!(
                            rtt_floor_us = live.rtt_floor().map(duration_us),
                            upload_window = bounds.upload,
                            download_window = bounds.download,
                            "round trips measured"
                        );
                    }
                    keepalive::RoundTripKind::Early { .. } => {}
                }
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
                keepalive::Verdict::Gone(why) => why.to_string(),
            }),
        }
    }

    fn record_failure(&self, e: &ConnectError) {
        self.ctx.metrics.handshake(e.reason());
        if let Some(reason) = e.certificate_refusal() {
            self.ctx.metrics.client_certificate_refused(reason);
        }
        tracing::warn!(reason = e.reason(), error = %e, "ssh connect failed");
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

/// The log span of one SSH session of a node: `session{node, endpoint,
/// session}` (`session` is the slot index, 0..`ssh.sessions_per_node`).
/// A root span, so that it never inherits the span of whatever started the
/// tunnel; at `error` level, so that it is enabled whenever any of its
/// lines is.
fn session_span(node: &str, target: &Target, slot: usize) -> tracing::Span {
    tracing::error_span!(
        parent: None,
        "session",
        node = %node,
        endpoint = %format_args!("{}:{}", target.host, target.port),
        session = slot,
    )
}

/// Keepalives over a russh session.
struct SessionProbe(Arc<LiveSession>);

impl keepalive::Probe for SessionProbe {
    fn activity(&self) -> u64 {
        self.0.session.handle.received_packets()
    }

    fn probe(&self) -> keepalive::ProbeFuture {
        let live = self.0.clone();
        Box::pin(async move {
            if live.session.handle.is_closed() {
                return Err(keepalive::SessionGone::Closed);
            }
            live.session
                .handle
                .send_ping()
                .await
                .map_err(|e| keepalive::SessionGone::SendFailed(Arc::new(e)))?;
            if live.session.handle.is_closed() {
                return Err(keepalive::SessionGone::ClosedWhileWaiting);
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
