//! The `[ssh]` table ([`SshConfig`]) and the host key policy: how sessions
//! to nodes are made and kept. Read by the tunnel manager (which builds the
//! session settings from it) and by the session (russh's configuration);
//! checked by [`crate::config`], which assembles the file.
//!
//! Ground floor: imports nothing from the crate.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// What to do with a host key that known_hosts does not vouch for.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum HostKeyPolicy {
    /// Refuse unknown and changed keys (the default).
    #[default]
    Strict,
    /// Record an unknown key in known_hosts (trust on first use); refuse a
    /// changed one.
    AcceptNew,
    /// Accept any key. Only for throwaway test clusters: warns at start-up.
    Insecure,
}

impl fmt::Display for HostKeyPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HostKeyPolicy::Strict => "strict",
            HostKeyPolicy::AcceptNew => "accept-new",
            HostKeyPolicy::Insecure => "insecure",
        })
    }
}

/// `[ssh.issuer]`: the user CA nodetunnel signs its own certificates with
/// and what they say. Checked by [`crate::issuer::validate`]; used by
/// [`crate::issuer`].
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// The CA's OpenSSH private key (unencrypted, mode 0600), relative to
    /// the config file; read at each issuance.
    pub ca_key: PathBuf,
    /// How long each certificate is valid (from now; its validity starts a
    /// minute in the past for clock skew). Renewed at two thirds of it.
    #[serde(with = "humantime_serde", default = "default_issuer_validity")]
    pub validity: Duration,
    /// The principals the certificate lists (sshd matches them against
    /// `AuthorizedPrincipalsFile`, else against the login user).
    pub principals: Vec<String>,
    /// CIDRs (or addresses) the nodes accept the certificate from: the
    /// `source-address` critical option. Empty: not set.
    #[serde(default)]
    pub source_address: Vec<String>,
    /// Test only: lower the floor of `validity` from 1 minute to 1 second,
    /// so renewal can be tested in seconds. Never in production.
    #[serde(default)]
    pub test_only_short_validity: bool,
}

fn default_issuer_validity() -> Duration {
    Duration::from_secs(3600)
}

/// The `[ssh]` table: how sessions to nodes are made and kept.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SshConfig {
    /// Remote user for every node (a node may override it).
    pub user: String,
    /// OpenSSH private key (ed25519, ecdsa or rsa), relative to the config file.
    pub identity: PathBuf,
    /// File holding the passphrase of an encrypted identity (first line).
    pub passphrase_file: Option<PathBuf>,
    /// OpenSSH user certificate for `identity` (`ssh-keygen -s` output,
    /// `*-cert.pub`), relative to the config file. When set, sessions
    /// authenticate with it instead of the plain key; the file is watched
    /// and re-read on change and on SIGHUP.
    pub certificate: Option<PathBuf>,
    /// `[ssh.issuer]`: nodetunnel signs its own short-lived user
    /// certificates for `identity` (exclusive with `certificate`).
    pub issuer: Option<IssuerConfig>,
    /// OpenSSH known_hosts file used to verify node host keys.
    pub known_hosts: PathBuf,
    /// strict | accept-new | insecure.
    pub host_key_policy: HostKeyPolicy,
    /// Default SSH port of the nodes.
    pub port: u16,
    /// Bound on the TCP connect to a node.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Bound on the SSH key exchange (banner to host-key check).
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Bound on public-key authentication.
    #[serde(with = "humantime_serde")]
    pub auth_timeout: Duration,
    /// Bound on opening one direct-tcpip channel (the front door has its own
    /// `proxy.dial_timeout`).
    #[serde(with = "humantime_serde")]
    pub channel_open_timeout: Duration,
    /// Interval between SSH keepalives on every session.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// Keepalives left unanswered before a session is declared dead: a
    /// blackholed node is detected within interval x (max + 1).
    pub keepalive_max: u32,
    /// SSH sessions per node. More sessions use more sshd processes (one per
    /// session on the node) and spread streams over them. Memory: about
    /// 53 KiB per idle session in nodetunnel (measured at 1,000 and 5,000
    /// sessions, docs/benchmarks.md), so `nodes x sessions_per_node x 53
    /// KiB` (5,000 nodes x 1: about 260 MiB); on each node, one sshd
    /// connection per session and apiserver replica.
    pub sessions_per_node: usize,
    /// Open streams per node, over all its sessions. Memory: each open
    /// stream may hold up to `window_size` from its node (so one node's
    /// streams up to `max_streams_per_node x window_size`, 2 GiB with the
    /// defaults; all nodes' together within `max_buffered_bytes` + 32 KiB
    /// per stream), and its client connection a 128 KiB splice (see
    /// `proxy.max_connections`).
    pub max_streams_per_node: usize,
    /// SSH handshakes in flight at once, over all nodes.
    pub max_handshakes_in_flight: usize,
    /// First reconnect delay bound; doubles per failure (full jitter).
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    /// Largest reconnect delay.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// A session Ready this long resets the backoff.
    #[serde(with = "humantime_serde")]
    pub backoff_reset_after: Duration,
    /// SSH channel receive window in bytes, per stream: how much a node may
    /// send ahead of what the client has read. It is re-opened as the client
    /// reads (within `max_buffered_bytes`), so it is also the most a stream
    /// ever buffers. Memory: up to `window_size x open streams` held from
    /// nodes, all streams together within `max_buffered_bytes` + 32 KiB per
    /// stream; per-stream throughput at most `window_size / RTT`.
    pub window_size: u32,
    /// The buffer budget: bytes from nodes not yet read by clients, over all
    /// streams. Window beyond one packet (32 KiB) per stream is granted, at
    /// the open and as clients read, only while what nodes may send (bytes
    /// held plus window granted and unused) fits in it; when it is spent,
    /// streams slow down (none is reset, no byte is lost) until clients
    /// read. Memory bound on bytes held from nodes:
    /// `min(window_size x open streams, max_buffered_bytes + 32 KiB x open
    /// streams)`. While more than this is held, new streams are also
    /// refused (503).
    pub max_buffered_bytes: usize,
    /// Grace period for open streams when a node is removed or the process
    /// shuts down.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Bytes sent, or received, on one session before nodetunnel renegotiates
    /// its keys (OpenSSH's `RekeyLimit`); 64 KiB to 1 GiB. Cost: one key
    /// exchange (about a millisecond of CPU) and one round trip during which
    /// the session's streams send nothing.
    pub rekey_limit: u64,
    /// Time after which a session's keys are renegotiated whatever it moved.
    #[serde(with = "humantime_serde")]
    pub rekey_interval: Duration,
    /// While a node's SSH port is closed or unreachable, how often its
    /// sessions probe it (a TCP connect and banner read, jittered by ±20%);
    /// the handshake starts as soon as a probe finds sshd. The exponential
    /// backoff then applies only to handshakes that fail against a port
    /// that answers. `0s`: no probes, every failure waits the backoff.
    /// Cost: one TCP connect per probe, `nodes away x sessions_per_node /
    /// interval` per second, within `max_probes_per_second`.
    #[serde(with = "humantime_serde")]
    pub reconnect_probe_interval: Duration,
    /// Probes started per second over all nodes (and the most in flight),
    /// so that a mass outage costs a bounded trickle of TCP connects.
    pub max_probes_per_second: u32,
}

/// Smallest `ssh.rekey_limit`: below it sessions would spend their time in
/// key exchanges.
pub const MIN_REKEY_LIMIT: u64 = 64 * 1024;
/// Largest (and default) `ssh.rekey_limit`: russh refuses more between key
/// exchanges.
pub const MAX_REKEY_LIMIT: u64 = 1024 * 1024 * 1024;

impl Default for SshConfig {
    fn default() -> Self {
        SshConfig {
            user: "root".into(),
            identity: PathBuf::from("keys/id_ed25519"),
            passphrase_file: None,
            certificate: None,
            issuer: None,
            known_hosts: PathBuf::from("keys/known_hosts"),
            host_key_policy: HostKeyPolicy::Strict,
            port: 22,
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            auth_timeout: Duration::from_secs(10),
            channel_open_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(15),
            keepalive_max: 3,
            sessions_per_node: 1,
            max_streams_per_node: 1024,
            max_handshakes_in_flight: 32,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            backoff_reset_after: Duration::from_secs(30),
            window_size: 2 * 1024 * 1024,
            max_buffered_bytes: 1024 * 1024 * 1024,
            drain_timeout: Duration::from_secs(30),
            rekey_limit: MAX_REKEY_LIMIT,
            rekey_interval: Duration::from_secs(3600),
            reconnect_probe_interval: Duration::from_secs(2),
            max_probes_per_second: 500,
        }
    }
}
