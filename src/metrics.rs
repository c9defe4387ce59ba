//! Process metrics, in one [`Metrics`] registry shared by every component.
//!
//! Families follow the `nodetunnel_` prefix. Label values are small fixed
//! sets (reasons, listeners, states); per-node series are not kept here, so
//! cardinality stays flat at thousands of nodes.

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

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

/// `{listener,code}` labels of proxy requests.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProxyLabel {
    /// `uds`, `tcp` or `socks5`.
    pub listener: String,
    /// HTTP status code, or the SOCKS5 reply code as `socks5_0xNN`.
    pub code: String,
}

/// Every metric of the process. Cheap to share behind an `Arc`.
pub struct Metrics {
    registry: Registry,
    /// `nodetunnel_tunnels{state}`: node tunnels per state.
    pub tunnels: Family<StateLabel, Gauge>,
    /// `nodetunnel_ssh_handshakes_total{result}`.
    pub ssh_handshakes: Family<ResultLabel, Counter>,
    /// `nodetunnel_keepalive_rtt_seconds`.
    pub keepalive_rtt: Histogram,
    /// `nodetunnel_streams_open`.
    pub streams_open: Gauge,
    /// `nodetunnel_stream_opens_total{result}`.
    pub stream_opens: Family<ResultLabel, Counter>,
    /// `nodetunnel_stream_open_duration_seconds`.
    pub stream_open_duration: Histogram,
    /// `nodetunnel_bytes_total{direction}`.
    pub bytes: Family<DirectionLabel, Counter>,
    /// `nodetunnel_proxy_requests_total{listener,code}`.
    pub proxy_requests: Family<ProxyLabel, Counter>,
    /// `nodetunnel_proxy_connections_open`.
    pub proxy_connections_open: Gauge,
    /// `nodetunnel_policy_denials_total{reason}`.
    pub policy_denials: Family<ReasonLabel, Counter>,
    /// `nodetunnel_stream_resets_total{reason}`.
    pub stream_resets: Family<ReasonLabel, Counter>,
    /// `nodetunnel_inventory_last_sync_timestamp_seconds`.
    pub inventory_last_sync: Gauge,
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
            "SSH connection attempts by result (ok, timeout, refused, auth, host_key, protocol)",
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
        Metrics {
            registry,
            tunnels,
            ssh_handshakes,
            keepalive_rtt,
            streams_open,
            stream_opens,
            stream_open_duration,
            bytes,
            proxy_requests,
            proxy_connections_open,
            policy_denials,
            stream_resets,
            inventory_last_sync,
        }
    }

    /// Count one `{result}` event.
    pub fn handshake(&self, result: &str) {
        self.ssh_handshakes
            .get_or_create(&ResultLabel {
                result: result.to_string(),
            })
            .inc();
    }

    /// Count a stream reset.
    pub fn stream_reset(&self, reason: &str) {
        self.stream_resets
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
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

    /// Count a stream open.
    pub fn stream_open(&self, result: &str) {
        self.stream_opens
            .get_or_create(&ResultLabel {
                result: result.to_string(),
            })
            .inc();
    }

    /// Render the Prometheus text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
