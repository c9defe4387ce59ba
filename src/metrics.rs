//! Process metrics, in one [`Metrics`] registry shared by every component.
//!
//! Families follow the `nodetunnel_` prefix. Label values are small fixed
//! sets (reasons, listeners, states); per-node series are not kept here, so
//! cardinality stays flat at thousands of nodes. When the operator asks for
//! them (`admin.per_node_metrics`), the admin API builds per-node series from
//! the live tunnel table at every scrape ([`per_node_registry`]) and encodes
//! them after the process families ([`Metrics::encode_with`]); removed nodes
//! therefore never linger as stale series.
//!
//! `/metrics` answers in OpenMetrics or the classic text format, as the
//! scraper asks ([`exposition`]); the standard `process_*` families and the
//! runtime's worker count are read at each scrape ([`process`]).
//!
//! The registry also keeps a one-minute window of error events (failed
//! handshakes, failed stream opens, stream resets) for the "errors in the
//! last minute" of `nodetunnel status` ([`Metrics::errors_last_minute`]).

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::tunnel_status::{TunnelState, TunnelStatus};

pub mod exposition;
pub mod process;

pub use exposition::Format;

/// `{result}` label: `ok` or a failure reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `ok`, or why it failed.
    pub result: String,
}

/// `{reason}` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why.
    pub reason: String,
}

/// `{kind}` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// What kind of thing.
    pub kind: String,
}

/// `{state}` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// A tunnel state in lower case.
    pub state: String,
}

/// `{direction}` label: `to_node` or `from_node`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    /// `to_node` or `from_node`.
    pub direction: String,
}

/// `nodetunnel_stream_resets_total{reason}` of streams cut when the drain
/// deadline passed (the proxy's, not a [`StreamResetReason`](crate::stream::StreamResetReason)).
pub const DRAIN_DEADLINE: &str = "drain_deadline";

/// `{listener,code}` labels of proxy requests.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProxyLabel {
    /// `uds`, `tcp` or `socks5`.
    pub listener: String,
    /// HTTP status code, or the SOCKS5 reply code as `socks5_0xNN`.
    pub code: String,
}

/// `{node}` label of the per-node series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabel {
    /// Node name.
    pub node: String,
}

/// `{node,direction}` labels of the per-node byte counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeDirectionLabel {
    /// Node name.
    pub node: String,
    /// `to_node` or `from_node`.
    pub direction: String,
}

/// `{node,reason}` labels of the per-node handshake failures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeReasonLabel {
    /// Node name.
    pub node: String,
    /// Failure reason.
    pub reason: String,
}

/// Seconds of history kept by [`RecentErrors`].
const ERROR_WINDOW_SECONDS: u64 = 60;

/// Error events per second over the last minute: a ring of one-second
/// buckets, each tagged with the second it counts.
#[derive(Debug)]
struct RecentErrors {
    buckets: Mutex<[(u64, u64); ERROR_WINDOW_SECONDS as usize]>,
}

impl Default for RecentErrors {
    fn default() -> Self {
        RecentErrors {
            buckets: Mutex::new([(0, 0); ERROR_WINDOW_SECONDS as usize]),
        }
    }
}

impl RecentErrors {
    fn record_at(&self, second: u64) {
        let Ok(mut buckets) = self.buckets.lock() else {
            return;
        };
        let slot = &mut buckets[(second % ERROR_WINDOW_SECONDS) as usize];
        if slot.0 == second {
            slot.1 += 1;
        } else {
            *slot = (second, 1);
        }
    }

    /// Events in the minute ending at `second` (inclusive).
    fn count_at(&self, second: u64) -> u64 {
        let Ok(buckets) = self.buckets.lock() else {
            return 0;
        };
        buckets
            .iter()
            .filter(|(at, _)| *at + ERROR_WINDOW_SECONDS > second && *at <= second)
            .map(|(_, n)| n)
            .sum()
    }
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Every `result` of `nodetunnel_stream_opens_total`: `ok` and the
/// [`DialError::reason`](crate::dial::DialError::reason) of every refusal
/// that is not the router's (a test in dial.rs keeps the two in step).
pub const STREAM_OPEN_RESULTS: [&str; 7] = [
    "ok",
    "node_down",
    "limit",
    "refused",
    "timeout",
    "session",
    "shutting_down",
];

/// Every `reason` of `nodetunnel_stream_resets_total`: the labels of
/// [`StreamResetReason`](crate::stream::StreamResetReason) (a test in
/// stream.rs keeps the two in step) and the drain deadline's.
pub const STREAM_RESET_REASONS: [&str; 4] = [
    "window_exceeded",
    "session_lost",
    "protocol_violation",
    DRAIN_DEADLINE,
];

/// Every `{listener,code}` pair of `nodetunnel_proxy_requests_total` the
/// front door answers with: HTTP statuses on the HTTP CONNECT listeners
/// (the [`DialError::http_status`](crate::dial::DialError::http_status) of
/// every refusal, and the request errors), RFC 1928 reply codes (and
/// `0xff`, no acceptable method) on SOCKS5, the gRPC answers on `grpc`.
pub const PROXY_REQUEST_CODES: [(&str, &[&str]); 4] = [
    ("uds", &HTTP_CODES),
    ("tcp", &HTTP_CODES),
    (
        "socks5",
        &[
            "socks5_0x00",
            "socks5_0x01",
            "socks5_0x02",
            "socks5_0x03",
            "socks5_0x05",
            "socks5_0x06",
            "socks5_0x07",
            "socks5_0x08",
            "socks5_0xff",
        ],
    ),
    (
        "grpc",
        &[
            "dial_ok",
            "dial_error",
            "bad_request",
            "draining",
            "overflow",
            "dial_cancelled",
            "unimplemented",
        ],
    ),
];

const HTTP_CODES: [&str; 8] = ["200", "400", "403", "405", "431", "502", "503", "504"];

/// Every `reason` of `nodetunnel_client_certificate_auth_refusals_total`:
/// refused locally (a [`CertificateError::reason`](crate::client_certificate::CertificateError::reason)
/// an authentication can meet) or by the node.
pub const CERTIFICATE_AUTH_REFUSAL_REASONS: [&str; 4] = [
    "expired",
    "not_yet_valid",
    "key_mismatch",
    "refused_by_node",
];

/// Every `result` of `nodetunnel_client_certificate_reloads_total`: `ok`
/// and every [`CertificateError::reason`](crate::client_certificate::CertificateError::reason).
pub const CERTIFICATE_RELOAD_RESULTS: [&str; 7] = [
    "ok",
    "read",
    "malformed",
    "not_user",
    "not_yet_valid",
    "expired",
    "key_mismatch",
];

/// Every `result` of `nodetunnel_client_certificate_renewals_total`: `ok`
/// and every [`IssueError::reason`](crate::issuer::IssueError::reason).
pub const CERTIFICATE_RENEWAL_RESULTS: [&str; 3] = ["ok", "ca_key", "sign"];

/// Every `reason` of `nodetunnel_accept_failures_total`: out of file
/// descriptors (`EMFILE`, `ENFILE`: a local resource failure) or anything
/// else.
pub const ACCEPT_FAILURE_REASONS: [&str; 2] = ["local_resources", "other"];

/// Every `listener` of `nodetunnel_accept_failures_total`: the front
/// door's and the admin API's.
pub const ACCEPT_LISTENERS: [&str; 5] = ["uds", "tcp", "socks5", "grpc", "admin"];

/// `{listener,reason}` labels of failed accepts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerReasonLabel {
    /// `uds`, `tcp`, `socks5`, `grpc` or `admin`.
    pub listener: String,
    /// `local_resources` (out of file descriptors) or `other`.
    pub reason: String,
}

/// Every metric of the process. Cheap to share behind an `Arc`.
pub struct Metrics {
    registry: Registry,
    /// The unprefixed `process_*` families.
    process_registry: Registry,
    recent_errors: RecentErrors,
    /// `nodetunnel_tunnels{state}`: node tunnels per state.
    pub tunnels: Family<StateLabel, Gauge>,
    /// `nodetunnel_ssh_handshakes_total{result}`.
    pub ssh_handshakes: Family<ResultLabel, Counter>,
    /// `nodetunnel_keepalive_rtt_seconds`.
    pub keepalive_rtt: Histogram,
    /// `nodetunnel_streams_open`.
    pub streams_open: Gauge,
    /// `nodetunnel_stream_buffered_bytes`: bytes from nodes waiting for
    /// clients to read them (set at each scrape).
    pub stream_buffered_bytes: Gauge,
    /// `nodetunnel_stream_opens_total{result}`.
    pub stream_opens: Family<ResultLabel, Counter>,
    /// `nodetunnel_stream_open_duration_seconds`.
    pub stream_open_duration: Histogram,
    /// `nodetunnel_bytes_total{direction}`.
    pub bytes: Family<DirectionLabel, Counter>,
    /// `bytes{direction="to_node"}`, resolved once: a stream counts its
    /// writes without building a label, hashing it and locking the family.
    pub bytes_to_node: Counter,
    /// `bytes{direction="from_node"}`, resolved once, as `bytes_to_node`.
    pub bytes_from_node: Counter,
    /// `nodetunnel_proxy_requests_total{listener,code}`.
    pub proxy_requests: Family<ProxyLabel, Counter>,
    /// `nodetunnel_proxy_connections_open`.
    pub proxy_connections_open: Gauge,
    /// `nodetunnel_policy_denials_total{reason}`.
    pub policy_denials: Family<ReasonLabel, Counter>,
    /// `nodetunnel_audit_records_written_total`.
    pub audit_records_written: Counter,
    /// `nodetunnel_audit_records_dropped_total`.
    pub audit_records_dropped: Counter,
    /// `nodetunnel_stream_resets_total{reason}`.
    pub stream_resets: Family<ReasonLabel, Counter>,
    /// `nodetunnel_route_conflicts{kind}`: routing conflicts in the current
    /// inventory (addresses or pod CIDR ranges several nodes claim, which
    /// route to none of them; node addresses ignored), by kind.
    pub route_conflicts: Family<KindLabel, Gauge>,
    /// `nodetunnel_inventory_last_sync_timestamp_seconds`.
    pub inventory_last_sync: Gauge,
    /// `nodetunnel_inventory_sync_failures_total`: inventory syncs that
    /// failed (broken file, watch error); the previous inventory was kept.
    pub inventory_sync_failures: Counter,
    /// `nodetunnel_client_certificate_expiry_timestamp_seconds`: when the
    /// user certificate in use expires (Unix seconds; 0 without
    /// `ssh.certificate`).
    pub client_certificate_expiry: Gauge,
    /// `nodetunnel_client_certificate_auth_refusals_total{reason}`:
    /// authentications with the certificate refused, locally (`expired`,
    /// `not_yet_valid`, `key_mismatch`) or by the node
    /// (`refused_by_node`).
    pub client_certificate_refusals: Family<ReasonLabel, Counter>,
    /// `nodetunnel_client_certificate_reloads_total{result}`: re-reads of
    /// `ssh.certificate` that installed a new certificate (`ok`) or were
    /// refused (a [`CertificateError`](crate::client_certificate::CertificateError)
    /// reason; the previous certificate stayed in use).
    pub client_certificate_reloads: Family<ResultLabel, Counter>,
    /// `nodetunnel_client_certificate_renewals_total{result}`: renewals
    /// by `[ssh.issuer]` that installed a new certificate (`ok`) or failed
    /// (`ca_key`, `sign`; retried with backoff, the previous certificate
    /// stayed in use).
    pub client_certificate_renewals: Family<ResultLabel, Counter>,
    /// `nodetunnel_reconnect_probes_total{result}`: TCP probes of the SSH
    /// port of nodes away (`open`, `closed`, `timeout`).
    pub reconnect_probes: Family<ResultLabel, Counter>,
    /// `nodetunnel_reconnect_demands_total{trigger}`: attempts started
    /// early, by a dial (`dial`) or by the inventory (`inventory`: the node
    /// is Ready again in Kubernetes).
    pub reconnect_demands: Family<TriggerLabel, Counter>,
    /// `nodetunnel_reconnect_probe_to_ready_seconds`: from the probe that
    /// found sshd again to the session Ready.
    pub reconnect_probe_to_ready: Histogram,
    /// `nodetunnel_descriptors_needed`: file descriptors the configuration
    /// needs with the current inventory (see [`crate::descriptors`]).
    pub descriptors_needed: Gauge,
    /// `nodetunnel_descriptors_limit`: the soft `RLIMIT_NOFILE` it was
    /// checked against (`i64::MAX`: unlimited).
    pub descriptors_limit: Gauge,
    /// `nodetunnel_accept_failures_total{listener,reason}`: failed
    /// `accept`s, `local_resources` when out of file descriptors.
    pub accept_failures: Family<ListenerReasonLabel, Counter>,
}

/// `{trigger}` label: what asked for an early attempt.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TriggerLabel {
    /// `dial` or `inventory`.
    pub trigger: String,
}

impl TriggerLabel {
    /// Every trigger.
    pub const VALUES: [&'static str; 2] = ["dial", "inventory"];
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every family registered at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("nodetunnel");
        let tunnels = Family::<StateLabel, Gauge>::default();
        registry.register("tunnels", "Node tunnels by state", tunnels.clone());
        let ssh_handshakes = Family::<ResultLabel, Counter>::default();
        registry.register(
            "ssh_handshakes",
            "SSH connection attempts by result (ok, timeout, refused, local_resources, auth, host_key, protocol)",
            ssh_handshakes.clone(),
        );
        let keepalive_rtt = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "keepalive_rtt_seconds",
            "Round trip time of SSH keepalives",
            keepalive_rtt.clone(),
        );
        let streams_open = Gauge::default();
        registry.register(
            "streams_open",
            "Open tunnelled streams",
            streams_open.clone(),
        );
        let stream_buffered_bytes = Gauge::default();
        registry.register(
            "stream_buffered_bytes",
            "Bytes received from nodes that clients have not read yet (at most ssh.max_buffered_bytes plus 32 KiB per open stream)",
            stream_buffered_bytes.clone(),
        );
        let stream_opens = Family::<ResultLabel, Counter>::default();
        registry.register(
            "stream_opens",
            "direct-tcpip channel opens by result",
            stream_opens.clone(),
        );
        let stream_open_duration = Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        registry.register(
            "stream_open_duration_seconds",
            "Time to open a direct-tcpip channel",
            stream_open_duration.clone(),
        );
        let bytes = Family::<DirectionLabel, Counter>::default();
        registry.register("bytes", "Bytes carried through tunnels", bytes.clone());
        let direction = |d: &str| {
            bytes
                .get_or_create(&DirectionLabel {
                    direction: d.to_string(),
                })
                .clone()
        };
        let bytes_to_node = direction("to_node");
        let bytes_from_node = direction("from_node");
        let proxy_requests = Family::<ProxyLabel, Counter>::default();
        registry.register(
            "proxy_requests",
            "Front-door requests by listener and answer code",
            proxy_requests.clone(),
        );
        let proxy_connections_open = Gauge::default();
        registry.register(
            "proxy_connections_open",
            "Client connections open at the front door",
            proxy_connections_open.clone(),
        );
        let policy_denials = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "policy_denials",
            "Destinations refused by policy, by reason",
            policy_denials.clone(),
        );
        let audit_records_written = Counter::default();
        registry.register(
            "audit_records_written",
            "Audit records written to the audit file or log",
            audit_records_written.clone(),
        );
        let audit_records_dropped = Counter::default();
        registry.register(
            "audit_records_dropped",
            "Audit records dropped: the audit queue was full (audit.queue) or the file could not be written",
            audit_records_dropped.clone(),
        );
        let route_conflicts = Family::<KindLabel, Gauge>::default();
        registry.register(
            "route_conflicts",
            "Routing conflicts in the current inventory, by kind (claimed twice: routed to none; ignored node addresses)",
            route_conflicts.clone(),
        );
        let stream_resets = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "stream_resets",
            "Streams cut by nodetunnel, by reason",
            stream_resets.clone(),
        );
        let inventory_last_sync = Gauge::default();
        registry.register(
            "inventory_last_sync_timestamp_seconds",
            "Unix time of the last successful inventory sync",
            inventory_last_sync.clone(),
        );
        let inventory_sync_failures = Counter::default();
        registry.register(
            "inventory_sync_failures",
            "Inventory syncs that failed (the previous inventory was kept)",
            inventory_sync_failures.clone(),
        );
        let reconnect_probes = Family::<ResultLabel, Counter>::default();
        registry.register(
            "reconnect_probes",
            "TCP probes of the SSH port of nodes away, by result",
            reconnect_probes.clone(),
        );
        let reconnect_demands = Family::<TriggerLabel, Counter>::default();
        registry.register(
            "reconnect_demands",
            "Connection attempts started early, by what asked (dial, inventory)",
            reconnect_demands.clone(),
        );
        let reconnect_probe_to_ready = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "reconnect_probe_to_ready_seconds",
            "Time from the probe that found sshd again to the session Ready",
            reconnect_probe_to_ready.clone(),
        );
        let client_certificate_expiry = Gauge::default();
        registry.register(
            "client_certificate_expiry_timestamp_seconds",
            "Unix time the user certificate in use expires (0: no ssh.certificate)",
            client_certificate_expiry.clone(),
        );
        let client_certificate_refusals = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "client_certificate_auth_refusals",
            "Authentications with the user certificate refused, by reason (expired, not_yet_valid, key_mismatch: locally; refused_by_node)",
            client_certificate_refusals.clone(),
        );
        let client_certificate_reloads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "client_certificate_reloads",
            "Re-reads of ssh.certificate that installed a new certificate (ok) or were refused (the reason; the previous one stays in use)",
            client_certificate_reloads.clone(),
        );
        let client_certificate_renewals = Family::<ResultLabel, Counter>::default();
        registry.register(
            "client_certificate_renewals",
            "Renewals by ssh.issuer that installed a new certificate (ok) or failed (ca_key, sign; retried, the previous one stays in use)",
            client_certificate_renewals.clone(),
        );
        let descriptors_needed = Gauge::default();
        registry.register(
            "descriptors_needed",
            "File descriptors the configuration needs with the current inventory (nodes x ssh.sessions_per_node + client connections + listeners + spare)",
            descriptors_needed.clone(),
        );
        let descriptors_limit = Gauge::default();
        registry.register(
            "descriptors_limit",
            "The soft RLIMIT_NOFILE the need was checked against",
            descriptors_limit.clone(),
        );
        let accept_failures = Family::<ListenerReasonLabel, Counter>::default();
        registry.register(
            "accept_failures",
            "Failed accepts by listener and reason (local_resources: out of file descriptors)",
            accept_failures.clone(),
        );
        registry.register_collector(Box::new(process::RuntimeCollector));
        let mut process_registry = Registry::default();
        process_registry.register_collector(Box::new(process::ProcessCollector));
        let metrics = Metrics {
            registry,
            process_registry,
            recent_errors: RecentErrors::default(),
            tunnels,
            ssh_handshakes,
            keepalive_rtt,
            streams_open,
            stream_buffered_bytes,
            stream_opens,
            stream_open_duration,
            bytes,
            bytes_to_node,
            bytes_from_node,
            proxy_requests,
            proxy_connections_open,
            policy_denials,
            audit_records_written,
            audit_records_dropped,
            stream_resets,
            route_conflicts,
            inventory_last_sync,
            inventory_sync_failures,
            reconnect_probes,
            reconnect_demands,
            reconnect_probe_to_ready,
            client_certificate_expiry,
            client_certificate_refusals,
            client_certificate_reloads,
            client_certificate_renewals,
            descriptors_needed,
            descriptors_limit,
            accept_failures,
        };
        metrics.export_known_series();
        metrics
    }

    /// Create at 0 every series whose label values are known in advance,
    /// so `rate()` and `increase()` work from the first scrape and an
    /// absent series means a missing target, not a quiet one.
    fn export_known_series(&self) {
        for state in TunnelState::ALL {
            let _ = self.tunnels.get_or_create(&StateLabel {
                state: state.as_str().to_string(),
            });
        }
        let result = |r: &str| ResultLabel {
            result: r.to_string(),
        };
        for r in std::iter::once("ok").chain(crate::session::ConnectError::REASONS) {
            let _ = self.ssh_handshakes.get_or_create(&result(r));
        }
        for r in STREAM_OPEN_RESULTS {
            let _ = self.stream_opens.get_or_create(&result(r));
        }
        for r in crate::reconnect::ProbeResult::ALL {
            let _ = self.reconnect_probes.get_or_create(&result(r.as_str()));
        }
        // `bytes{direction}`: both series exist from `new` (`bytes_to_node`,
        // `bytes_from_node`).
        for trigger in TriggerLabel::VALUES {
            let _ = self.reconnect_demands.get_or_create(&TriggerLabel {
                trigger: trigger.to_string(),
            });
        }
        let reason = |r: &str| ReasonLabel {
            reason: r.to_string(),
        };
        for r in crate::router::DenyReason::LABELS {
            let _ = self.policy_denials.get_or_create(&reason(r));
        }
        for r in STREAM_RESET_REASONS {
            let _ = self.stream_resets.get_or_create(&reason(r));
        }
        for r in CERTIFICATE_AUTH_REFUSAL_REASONS {
            let _ = self.client_certificate_refusals.get_or_create(&reason(r));
        }
        for r in CERTIFICATE_RELOAD_RESULTS {
            let _ = self.client_certificate_reloads.get_or_create(&result(r));
        }
        for r in CERTIFICATE_RENEWAL_RESULTS {
            let _ = self.client_certificate_renewals.get_or_create(&result(r));
        }
        for (listener, codes) in PROXY_REQUEST_CODES {
            for code in codes {
                let _ = self.proxy_requests.get_or_create(&ProxyLabel {
                    listener: listener.to_string(),
                    code: code.to_string(),
                });
            }
        }
        for listener in ACCEPT_LISTENERS {
            for r in ACCEPT_FAILURE_REASONS {
                let _ = self.accept_failures.get_or_create(&ListenerReasonLabel {
                    listener: listener.to_string(),
                    reason: r.to_string(),
                });
            }
        }
        self.set_route_conflicts(std::iter::empty());
    }

    /// Count one reconnect probe by `{result}`.
    pub fn reconnect_probe(&self, result: &str) {
        self.reconnect_probes
            .get_or_create(&ResultLabel {
                result: result.to_string(),
            })
            .inc();
    }

    /// Count one early attempt asked for by `trigger`.
    pub fn reconnect_demand(&self, trigger: &str) {
        self.reconnect_demands
            .get_or_create(&TriggerLabel {
                trigger: trigger.to_string(),
            })
            .inc();
    }

    /// Count one SSH connection attempt by `{result}` (`ok` or a failure
    /// reason; failures also count as recent errors).
    pub fn handshake(&self, result: &str) {
        if result != "ok" {
            self.note_error();
        }
        self.ssh_handshakes
            .get_or_create(&ResultLabel {
                result: result.to_string(),
            })
            .inc();
    }

    /// Count a stream reset (also a recent error).
    pub fn stream_reset(&self, reason: &str) {
        self.note_error();
        self.stream_resets
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Set `nodetunnel_route_conflicts` from the labels of the current
    /// router's conflicts: every kind seen so far is exported, at zero when
    /// it no longer occurs.
    pub fn set_route_conflicts<'a>(&self, kinds: impl Iterator<Item = &'a str>) {
        let mut counts: std::collections::BTreeMap<&str, i64> = [
            "pod_cidr",
            "ignored_pod_cidr",
            "shared_address",
            "unusable_address",
            "ignored_address",
        ]
        .into_iter()
        .map(|k| (k, 0))
        .collect();
        for kind in kinds {
            *counts.entry(kind).or_default() += 1;
        }
        for (kind, n) in counts {
            self.route_conflicts
                .get_or_create(&KindLabel {
                    kind: kind.to_string(),
                })
                .set(n);
        }
    }

    /// Count a failed accept on `listener` by `reason`.
    pub fn accept_failure(&self, listener: &str, reason: &str) {
        self.accept_failures
            .get_or_create(&ListenerReasonLabel {
                listener: listener.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Set `nodetunnel_descriptors_needed` and `nodetunnel_descriptors_limit`
    /// (`None`: unlimited, exported as `i64::MAX`).
    pub fn set_descriptors(&self, needed: u64, limit: Option<u64>) {
        self.descriptors_needed
            .set(i64::try_from(needed).unwrap_or(i64::MAX));
        self.descriptors_limit
            .set(limit.map_or(i64::MAX, |l| i64::try_from(l).unwrap_or(i64::MAX)));
    }

    /// Count a policy denial.
    pub fn policy_denial(&self, reason: &str) {
        self.policy_denials
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Count a front-door answer.
    pub fn proxy_request(&self, listener: &str, code: &str) {
        self.proxy_requests
            .get_or_create(&ProxyLabel {
                listener: listener.to_string(),
                code: code.to_string(),
            })
            .inc();
    }

    /// Count a dial's outcome by `{result}` (`ok` or a refusal reason);
    /// `tunnel_fault`: the refusal was the tunnels' fault, and counts as a
    /// recent error.
    pub fn stream_open(&self, result: &str, tunnel_fault: bool) {
        if tunnel_fault {
            self.note_error();
        }
        self.stream_opens
            .get_or_create(&ResultLabel {
                result: result.to_string(),
            })
            .inc();
    }

    /// Record one error event now (for [`errors_last_minute`](Self::errors_last_minute)).
    pub fn note_error(&self) {
        self.recent_errors.record_at(unix_seconds());
    }

    /// Failed handshakes, failed stream opens and stream resets in the last
    /// 60 seconds.
    pub fn errors_last_minute(&self) -> u64 {
        self.recent_errors.count_at(unix_seconds())
    }

    /// Render every family in OpenMetrics text (ending in `# EOF`).
    pub fn encode(&self) -> String {
        self.encode_with(None)
    }

    /// Like [`encode`](Self::encode), with the families of `extra` (for
    /// example [`per_node_registry`]) after the process families.
    pub fn encode_with(&self, extra: Option<&Registry>) -> String {
        self.encode_as(Format::OpenMetrics, extra)
    }

    /// Render every family, and those of `extra`, in `format`.
    pub fn encode_as(&self, format: Format, extra: Option<&Registry>) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode_registry(&mut out, &self.registry);
        let _ = encode_registry(&mut out, &self.process_registry);
        if let Some(extra) = extra {
            let _ = encode_registry(&mut out, extra);
        }
        let _ = encode_eof(&mut out);
        match format {
            Format::OpenMetrics => out,
            Format::Classic => exposition::to_classic(&out),
        }
    }

    /// Count one re-read of `ssh.certificate` by `result` (`ok` or why it
    /// was refused).
    pub fn client_certificate_reload(&self, result: &str) {
        self.client_certificate_reloads
            .get_or_create(&ResultLabel {
                result: result.to_string(),
            })
            .inc();
    }

    /// Count one renewal by `[ssh.issuer]` by `result` (`ok` or why it
    /// failed).
    pub fn client_certificate_renewal(&self, result: &str) {
        self.client_certificate_renewals
            .get_or_create(&ResultLabel {
                result: result.to_string(),
            })
            .inc();
    }

    /// A user certificate expiring at `valid_before` (Unix seconds) is in
    /// use: sets `nodetunnel_client_certificate_expiry_timestamp_seconds`.
    pub fn client_certificate_in_use(&self, valid_before: u64) {
        self.client_certificate_expiry
            .set(i64::try_from(valid_before).unwrap_or(i64::MAX));
    }

    /// Count one certificate authentication refused, by `reason`.
    pub fn client_certificate_refused(&self, reason: &str) {
        self.client_certificate_refusals
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }
}

/// Per-node series built from a tunnel table snapshot, for one scrape:
/// `nodetunnel_node_up{node}` (1 when Ready), `nodetunnel_node_streams_open{node}`,
/// `nodetunnel_node_keepalive_rtt_seconds{node}` (nodes with a measured RTT),
/// `nodetunnel_node_bytes_total{node,direction}`,
/// `nodetunnel_node_stream_resets_total{node}` and
/// `nodetunnel_node_handshake_failures_total{node,reason}`.
///
/// Several series per node: enable only where the monitoring system can
/// afford it (`admin.per_node_metrics`).
pub fn per_node_registry(tunnels: &[TunnelStatus]) -> Registry {
    let mut registry = Registry::with_prefix("nodetunnel_node");
    let up = Family::<NodeLabel, Gauge>::default();
    let streams = Family::<NodeLabel, Gauge>::default();
    let rtt = Family::<NodeLabel, Gauge<f64, AtomicU64>>::default();
    let bytes = Family::<NodeDirectionLabel, Counter>::default();
    let resets = Family::<NodeLabel, Counter>::default();
    let failures = Family::<NodeReasonLabel, Counter>::default();
    for t in tunnels {
        let node = NodeLabel {
            node: t.node.clone(),
        };
        up.get_or_create(&node)
            .set(i64::from(t.state == TunnelState::Ready));
        streams
            .get_or_create(&node)
            .set(i64::try_from(t.streams).unwrap_or(i64::MAX));
        if let Some(measured) = t.rtt {
            rtt.get_or_create(&node).set(measured.as_secs_f64());
        }
        for (direction, value) in [
            ("to_node", t.bytes_to_node),
            ("from_node", t.bytes_from_node),
        ] {
            bytes
                .get_or_create(&NodeDirectionLabel {
                    node: t.node.clone(),
                    direction: direction.to_string(),
                })
                .inc_by(value);
        }
        resets.get_or_create(&node).inc_by(t.stream_resets);
        for (reason, count) in &t.failures {
            failures
                .get_or_create(&NodeReasonLabel {
                    node: t.node.clone(),
                    reason: (*reason).to_string(),
                })
                .inc_by(*count);
        }
    }
    registry.register("up", "1 when the node has a Ready SSH session", up);
    registry.register(
        "streams_open",
        "Open tunnelled streams of the node",
        streams,
    );
    registry.register(
        "keepalive_rtt_seconds",
        "Round trip of the node's last answered keepalive",
        rtt,
    );
    registry.register("bytes", "Bytes carried through the node's tunnel", bytes);
    registry.register(
        "stream_resets",
        "Streams of the node cut by nodetunnel",
        resets,
    );
    registry.register(
        "handshake_failures",
        "Failed SSH connection attempts to the node by reason",
        failures,
    );
    registry
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resolved_byte_counters_are_the_exported_bytes_series() {
        let metrics = Metrics::new();
        metrics.bytes_to_node.inc_by(7);
        metrics.bytes_from_node.inc_by(11);
        let text = metrics.encode_as(Format::Classic, None);
        for line in [
            "nodetunnel_bytes_total{direction=\"to_node\"} 7",
            "nodetunnel_bytes_total{direction=\"from_node\"} 11",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in:\n{text}");
        }
    }

    #[test]
    fn a_fresh_registry_exports_every_known_label_value_at_zero() {
        let text = Metrics::new().encode_as(Format::Classic, None);
        let mut expected = vec![
            "nodetunnel_tunnels{state=\"backoff\"} 0".to_string(),
            "nodetunnel_ssh_handshakes_total{result=\"ok\"} 0".into(),
            "nodetunnel_ssh_handshakes_total{result=\"host_key\"} 0".into(),
            "nodetunnel_stream_opens_total{result=\"ok\"} 0".into(),
            "nodetunnel_stream_opens_total{result=\"shutting_down\"} 0".into(),
            "nodetunnel_bytes_total{direction=\"to_node\"} 0".into(),
            "nodetunnel_bytes_total{direction=\"from_node\"} 0".into(),
            "nodetunnel_reconnect_probes_total{result=\"timeout\"} 0".into(),
            "nodetunnel_reconnect_demands_total{trigger=\"inventory\"} 0".into(),
            "nodetunnel_stream_resets_total{reason=\"drain_deadline\"} 0".into(),
            "nodetunnel_route_conflicts{kind=\"pod_cidr\"} 0".into(),
            "nodetunnel_proxy_requests_total{listener=\"uds\",code=\"200\"} 0".into(),
            "nodetunnel_proxy_requests_total{listener=\"socks5\",code=\"socks5_0x05\"} 0".into(),
            "nodetunnel_proxy_requests_total{listener=\"grpc\",code=\"dial_ok\"} 0".into(),
            "nodetunnel_accept_failures_total{listener=\"admin\",reason=\"local_resources\"} 0"
                .into(),
        ];
        for (listener, codes) in PROXY_REQUEST_CODES {
            for code in codes {
                expected.push(format!(
                    "nodetunnel_proxy_requests_total{{listener=\"{listener}\",code=\"{code}\"}} 0"
                ));
            }
        }
        for reason in CERTIFICATE_AUTH_REFUSAL_REASONS {
            expected.push(format!(
                "nodetunnel_client_certificate_auth_refusals_total{{reason=\"{reason}\"}} 0"
            ));
        }
        for result in CERTIFICATE_RELOAD_RESULTS {
            expected.push(format!(
                "nodetunnel_client_certificate_reloads_total{{result=\"{result}\"}} 0"
            ));
        }
        for result in CERTIFICATE_RENEWAL_RESULTS {
            expected.push(format!(
                "nodetunnel_client_certificate_renewals_total{{result=\"{result}\"}} 0"
            ));
        }
        for state in TunnelState::ALL {
            expected.push(format!("nodetunnel_tunnels{{state=\"{state}\"}} 0"));
        }
        for reason in crate::router::DenyReason::LABELS {
            expected.push(format!(
                "nodetunnel_policy_denials_total{{reason=\"{reason}\"}} 0"
            ));
        }
        for reason in STREAM_RESET_REASONS {
            expected.push(format!(
                "nodetunnel_stream_resets_total{{reason=\"{reason}\"}} 0"
            ));
        }
        for result in STREAM_OPEN_RESULTS {
            expected.push(format!(
                "nodetunnel_stream_opens_total{{result=\"{result}\"}} 0"
            ));
        }
        for line in expected {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
    }

    #[test]
    fn recent_errors_count_only_the_last_minute() {
        let errors = RecentErrors::default();
        errors.record_at(1_000);
        errors.record_at(1_000);
        errors.record_at(1_030);
        assert_eq!(errors.count_at(1_030), 3);
        assert_eq!(errors.count_at(1_059), 3);
        // 1_000 is out of the window ending at 1_060.
        assert_eq!(errors.count_at(1_060), 1);
        // A bucket reused a minute later starts from zero.
        // (1_090 shares the bucket of 1_030.)
        errors.record_at(1_090);
        errors.record_at(1_090);
        assert_eq!(errors.count_at(1_090), 2);
        assert_eq!(errors.count_at(1_200), 0);
    }

    #[test]
    fn failures_are_recent_errors_and_successes_are_not() {
        let metrics = Metrics::new();
        metrics.handshake("ok");
        metrics.stream_open("ok", false);
        assert_eq!(metrics.errors_last_minute(), 0);
        metrics.handshake("refused");
        metrics.stream_open("timeout", true);
        metrics.stream_reset("session_lost");
        assert_eq!(metrics.errors_last_minute(), 3);
    }

    #[test]
    fn extra_families_come_before_the_single_eof() {
        let metrics = Metrics::new();
        let status = TunnelStatus {
            node: "node-a".into(),
            addresses: vec!["10.0.0.1".into()],
            ssh_endpoint: "10.0.0.1:22".into(),
            state: TunnelState::Ready,
            since: SystemTime::now(),
            last_error: None,
            rtt: Some(std::time::Duration::from_millis(2)),
            sessions_ready: 1,
            sessions: 1,
            streams: 3,
            streams_total: 7,
            bytes_to_node: 100,
            bytes_from_node: 200,
            stream_resets: 1,
            handshakes: 1,
            failures: std::collections::BTreeMap::from([("refused", 2)]),
            consecutive_failures: 0,
            retry_in: None,
            retry_reason: None,
        };
        let extra = per_node_registry(&[status]);
        let text = metrics.encode_with(Some(&extra));
        assert_eq!(text.matches("# EOF").count(), 1);
        assert!(text.trim_end().ends_with("# EOF"));
        for line in [
            "nodetunnel_node_up{node=\"node-a\"} 1",
            "nodetunnel_node_streams_open{node=\"node-a\"} 3",
            "nodetunnel_node_keepalive_rtt_seconds{node=\"node-a\"} 0.002",
            "nodetunnel_node_bytes_total{node=\"node-a\",direction=\"from_node\"} 200",
            "nodetunnel_node_stream_resets_total{node=\"node-a\"} 1",
            "nodetunnel_node_handshake_failures_total{node=\"node-a\",reason=\"refused\"} 2",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }
}
