//! The JSON documents of the admin API, shared by the server and by the
//! CLI commands that read them (`status`, `top`).
//!
//! Durations are seconds as floating-point numbers, times are RFC 3339 in
//! UTC, byte counts are integers. Every document is built from live state
//! when it is requested.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::router::{Route, RouteError};
use crate::tunnel_status::{TunnelState, TunnelStatus};

/// Bytes carried through one tunnel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByteCounts {
    /// Sent to the node.
    pub to_node: u64,
    /// Received from the node.
    pub from_node: u64,
}

/// One node's tunnel: `GET /api/v1/tunnels/{node}` and the elements of
/// [`TunnelList::tunnels`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TunnelInfo {
    /// Node name.
    pub node: String,
    /// Node addresses.
    pub addresses: Vec<String>,
    /// The sshd endpoint dialled (`host:port`).
    pub ssh_endpoint: String,
    /// `connecting`, `ready`, `backoff`, `draining` or `closed`.
    pub state: String,
    /// When the tunnel entered its state (RFC 3339, UTC).
    pub since: String,
    /// Seconds in the current state.
    pub for_seconds: u64,
    /// The last failure (connect error or why the session ended).
    pub last_error: Option<String>,
    /// Round trip of the last answered keepalive, in seconds.
    pub rtt: Option<f64>,
    /// Open streams.
    pub streams: usize,
    /// Streams opened since the tunnel started.
    pub streams_total: u64,
    /// Streams cut by nodetunnel.
    pub stream_resets: u64,
    /// Bytes carried.
    pub bytes: ByteCounts,
    /// Sessions Ready.
    pub sessions_ready: usize,
    /// Sessions configured (`ssh.sessions_per_node`).
    pub sessions: usize,
    /// Successful handshakes.
    pub handshakes: u64,
    /// Failed handshakes by reason (`timeout`, `refused`, `auth`,
    /// `host_key`, `protocol`).
    pub failures: BTreeMap<String, u64>,
    /// Failed attempts since the last Ready session.
    pub consecutive_failures: u32,
    /// Seconds until the next attempt (backoff) or probe.
    pub retry_in: Option<f64>,
    /// What the next attempt waits for: `probe` or `backoff`.
    pub retry_reason: Option<String>,
}

impl TunnelInfo {
    /// The document of one tunnel snapshot, at time `now`.
    pub fn from_status(status: &TunnelStatus, now: SystemTime) -> TunnelInfo {
        TunnelInfo {
            node: status.node.clone(),
            addresses: status.addresses.clone(),
            ssh_endpoint: status.ssh_endpoint.clone(),
            state: status.state.as_str().to_string(),
            since: humantime::format_rfc3339_seconds(status.since).to_string(),
            for_seconds: now
                .duration_since(status.since)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            last_error: status.last_error.clone(),
            rtt: status.rtt.map(|d| d.as_secs_f64()),
            streams: status.streams,
            streams_total: status.streams_total,
            stream_resets: status.stream_resets,
            bytes: ByteCounts {
                to_node: status.bytes_to_node,
                from_node: status.bytes_from_node,
            },
            sessions_ready: status.sessions_ready,
            sessions: status.sessions,
            handshakes: status.handshakes,
            failures: status
                .failures
                .iter()
                .map(|(k, v)| ((*k).to_string(), *v))
                .collect(),
            consecutive_failures: status.consecutive_failures,
            retry_in: status.retry_in.map(|d| d.as_secs_f64()),
            retry_reason: status.retry_reason.map(str::to_owned),
        }
    }

    /// Whether the tunnel takes streams.
    pub fn is_ready(&self) -> bool {
        self.state == TunnelState::Ready.as_str()
    }

    /// Failed handshakes over all reasons.
    pub fn failures_total(&self) -> u64 {
        self.failures.values().sum()
    }
}

/// Order tunnels "trouble first": tunnels that are not Ready before Ready
/// ones (Backoff, then Connecting, Draining, Closed; more consecutive
/// failures first), then Ready tunnels by highest RTT (unmeasured last),
/// then by node name.
pub fn trouble_order(a: &TunnelInfo, b: &TunnelInfo) -> Ordering {
    fn rank(state: &str) -> u8 {
        match state {
            "backoff" => 0,
            "connecting" => 1,
            "draining" => 2,
            "closed" => 3,
            "ready" => 5,
            _ => 4,
        }
    }
    let by_state = rank(&a.state).cmp(&rank(&b.state));
    let by_failures = b.consecutive_failures.cmp(&a.consecutive_failures);
    let by_rtt = match (a.rtt, b.rtt) {
        (Some(x), Some(y)) => y.total_cmp(&x),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    };
    by_state
        .then(by_failures)
        .then(by_rtt)
        .then_with(|| a.node.cmp(&b.node))
}

/// Totals over every tunnel.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Nodes with a Ready session.
    pub ready: usize,
    /// Nodes in the inventory.
    pub total: usize,
    /// Open streams over all nodes.
    pub streams: usize,
    /// Failed handshakes, failed stream opens and stream resets in the last
    /// 60 seconds.
    pub errors_last_minute: u64,
    /// Nodes per state.
    pub by_state: BTreeMap<String, usize>,
}

impl Summary {
    /// Totals of `tunnels`.
    pub fn of(tunnels: &[TunnelInfo], errors_last_minute: u64) -> Summary {
        let mut by_state = BTreeMap::new();
        for t in tunnels {
            *by_state.entry(t.state.clone()).or_insert(0) += 1;
        }
        Summary {
            ready: tunnels.iter().filter(|t| t.is_ready()).count(),
            total: tunnels.len(),
            streams: tunnels.iter().map(|t| t.streams).sum(),
            errors_last_minute,
            by_state,
        }
    }
}

/// `GET /api/v1/tunnels`: every tunnel, sorted by node name, and totals.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TunnelList {
    /// Totals.
    pub summary: Summary,
    /// One entry per node.
    pub tunnels: Vec<TunnelInfo>,
    /// Routing conflicts in the current inventory, one line each
    /// (addresses or pod CIDR ranges several nodes claim, which route to
    /// none of them; node addresses ignored).
    #[serde(default)]
    pub conflicts: Vec<ConflictInfo>,
    /// The user certificate new sessions authenticate with
    /// (`ssh.certificate` or `[ssh.issuer]`); absent with a plain key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertificateInfo>,
    /// The file descriptors the configuration needs against the limit
    /// (absent from an older sidecar).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub descriptors: Option<DescriptorInfo>,
}

/// What the configuration needs in file descriptors against the soft
/// `RLIMIT_NOFILE`, as `GET /api/v1/tunnels` shows it (see
/// [`crate::descriptors`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DescriptorInfo {
    /// Descriptors needed: nodes x `ssh.sessions_per_node`, client
    /// connections, listeners and spare.
    pub needed: u64,
    /// The soft limit (absent: unlimited).
    pub limit: Option<u64>,
    /// Nodes counted (draining ones included).
    pub nodes: usize,
    /// `needed` is within `limit`.
    pub fits: bool,
    /// A limit that fits with headroom, for `LimitNOFILE=` or the
    /// container's `nofile` ulimit.
    pub suggested_limit: u64,
}

impl DescriptorInfo {
    /// The document of `fit`.
    pub fn of(fit: &crate::descriptors::DescriptorFit) -> Self {
        DescriptorInfo {
            needed: fit.needed,
            limit: fit.limit,
            nodes: fit.nodes,
            fits: fit.fits(),
            suggested_limit: fit.suggested_limit(),
        }
    }
}

/// The user certificate in use, as `GET /api/v1/tunnels` shows it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CertificateInfo {
    /// Where it came from: the `ssh.certificate` file, or
    /// `certificate issued by ssh.issuer (CA <path>)`.
    pub source: String,
    /// Its key id.
    pub key_id: String,
    /// Its serial.
    pub serial: u64,
    /// The principals it lists (empty: any user).
    pub principals: Vec<String>,
    /// Start of its validity (RFC 3339, UTC).
    pub valid_after: String,
    /// End of its validity (RFC 3339, UTC; `forever`).
    pub valid_before: String,
    /// Seconds until it expires (negative: expired that long ago).
    pub expires_in_seconds: i64,
    /// It has expired and nothing replaced it: new sessions cannot
    /// authenticate.
    pub expired: bool,
}

impl CertificateInfo {
    /// The document of `certificate` at time `now`.
    pub fn of(certificate: &crate::client_certificate::ClientCertificate, now: SystemTime) -> Self {
        let now_unix = now
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let before = certificate.valid_before();
        let expires_in = i64::try_from(before)
            .unwrap_or(i64::MAX)
            .saturating_sub(i64::try_from(now_unix).unwrap_or(i64::MAX));
        CertificateInfo {
            source: certificate.path.display().to_string(),
            key_id: certificate.key_id().to_string(),
            serial: certificate.serial(),
            principals: certificate.principals().to_vec(),
            valid_after: crate::client_certificate::rfc3339(certificate.valid_after()),
            valid_before: crate::client_certificate::rfc3339(before),
            expires_in_seconds: expires_in,
            expired: certificate.is_expired(now),
        }
    }
}

/// One routing conflict, as `GET /api/v1/tunnels` lists it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ConflictInfo {
    /// The stable kind (`shared_address`, `pod_cidr`, `ignored_address`,
    /// ...), as in `nodetunnel_route_conflicts{kind}`.
    pub kind: String,
    /// One line for humans.
    pub message: String,
}

/// `POST /api/v1/tunnels/{node}/reconnect`: the request was accepted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReconnectAnswer {
    /// The node.
    pub node: String,
    /// Its state when the request arrived.
    pub state: String,
    /// What happens next.
    pub message: String,
}

/// `GET /api/v1/route?dest=HOST:PORT`: what the router decides for a
/// destination, without dialling.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouteAnswer {
    /// The destination as normalised (`host:port`, IPv6 in brackets).
    pub dest: String,
    /// `node`, `any-node`, `denied`, `no-route` or `conflict`.
    pub decision: String,
    /// The node, for `node`.
    pub node: Option<String>,
    /// The address the node connects to instead of the destination host,
    /// for a `node` route chosen by a name.
    #[serde(default)]
    pub connect_to: Option<String>,
    /// The nodes that claim the destination, for `conflict`.
    #[serde(default)]
    pub conflict_nodes: Option<Vec<String>>,
    /// That node's tunnel state, when a running sidecar answers.
    pub node_state: Option<String>,
    /// The rule that matched (`pod-cidr 10.244.1.0/24`), for routed
    /// destinations.
    pub rule: Option<String>,
    /// The rule's stable label (`pod_cidr`).
    pub rule_label: Option<String>,
    /// The denial reason's stable label (`loopback`, `port`, ...), for
    /// `denied`.
    pub reason: Option<String>,
    /// Ready nodes an `any-node` route can pick from, when a running
    /// sidecar answers.
    pub ready_candidates: Option<usize>,
    /// One line for humans.
    pub message: String,
}

impl RouteAnswer {
    /// The answer for `dest` given the router's result.
    pub fn new(dest: String, result: &Result<Route, RouteError>) -> RouteAnswer {
        let mut answer = RouteAnswer {
            dest,
            decision: String::new(),
            node: None,
            connect_to: None,
            conflict_nodes: None,
            node_state: None,
            rule: None,
            rule_label: None,
            reason: None,
            ready_candidates: None,
            message: String::new(),
        };
        match result {
            Ok(route) => {
                answer.rule = Some(route.rule().to_string());
                answer.rule_label = Some(route.rule().label().to_string());
                match route {
                    Route::Node {
                        node,
                        rule,
                        connect_to,
                    } => {
                        answer.decision = "node".into();
                        answer.node = Some(node.to_string());
                        answer.connect_to = connect_to.map(|ip| ip.to_string());
                        answer.message = match connect_to {
                            Some(ip) => {
                                format!("through node {node} to {ip}, its address (rule {rule})")
                            }
                            None => format!("through node {node} (rule {rule})"),
                        };
                    }
                    Route::AnyNode { rule } => {
                        answer.decision = "any-node".into();
                        answer.message = format!(
                            "through any Ready node, the one with fewer open streams of two \
                             picked at random (rule {rule})"
                        );
                    }
                }
            }
            Err(e) => {
                answer.decision = match e {
                    RouteError::Denied { .. } => "denied".into(),
                    RouteError::NoRoute { .. } => "no-route".into(),
                    RouteError::Conflict { nodes, .. } => {
                        answer.conflict_nodes = Some(nodes.iter().map(|n| n.to_string()).collect());
                        "conflict".into()
                    }
                };
                answer.reason = e.deny_reason().map(|r| r.label().to_string());
                answer.message = e.to_string();
            }
        }
        answer
    }

    /// Whether the destination would be tunnelled.
    pub fn is_routed(&self) -> bool {
        self.decision == "node" || self.decision == "any-node"
    }
}

/// The body of every 4xx/5xx answer of the JSON endpoints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// What went wrong, one line.
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(node: &str, state: &str, rtt: Option<f64>, failures: u32) -> TunnelInfo {
        TunnelInfo {
            node: node.into(),
            addresses: vec![],
            ssh_endpoint: String::new(),
            state: state.into(),
            since: String::new(),
            for_seconds: 0,
            last_error: None,
            rtt,
            streams: 0,
            streams_total: 0,
            stream_resets: 0,
            bytes: ByteCounts::default(),
            sessions_ready: 0,
            sessions: 1,
            handshakes: 0,
            failures: BTreeMap::new(),
            consecutive_failures: failures,
            retry_in: None,
            retry_reason: None,
        }
    }

    #[test]
    fn trouble_comes_first_then_the_slowest_ready_nodes() {
        let mut all = [
            info("a", "ready", Some(0.001), 0),
            info("b", "ready", Some(0.2), 0),
            info("c", "connecting", None, 0),
            info("d", "backoff", None, 1),
            info("e", "backoff", None, 7),
            info("f", "ready", None, 0),
        ];
        all.sort_by(trouble_order);
        let order: Vec<&str> = all.iter().map(|t| t.node.as_str()).collect();
        assert_eq!(order, ["e", "d", "c", "b", "a", "f"]);
    }

    #[test]
    fn summary_counts_states_and_streams() {
        let mut a = info("a", "ready", None, 0);
        a.streams = 3;
        let b = info("b", "backoff", None, 2);
        let s = Summary::of(&[a, b], 4);
        assert_eq!(
            (s.ready, s.total, s.streams, s.errors_last_minute),
            (1, 2, 3, 4)
        );
        assert_eq!(s.by_state.get("backoff"), Some(&1));
    }
}
