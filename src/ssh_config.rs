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

/// `ssh.upload_window` and `ssh.download_window`: how many of one stream's
/// bytes may queue in front of its siblings' on a shared session.
///
/// A session carries its streams' bytes in one order, so what one stream
/// has in flight waits in front of every other stream's bytes: its upload
/// in the node's socket and, when the node's sshd is the bottleneck (one
/// process decrypts a session), in its decryption; its download in sshd's
/// socket and ours. A keystroke of `kubectl exec` then waits behind up to a
/// whole channel window (2 MiB) of a `kubectl cp` upload on its way to the
/// node, and behind up to `ssh.window_size` of a `kubectl logs -f` or a
/// download on its way back. Holding a stream below that while its session
/// carries other streams keeps the wait short; the cost is that stream's
/// throughput then, at most about `bound / RTT`. A stream alone on its
/// session is not bounded.
///
/// - Upload (`upload_window`): what the node may hold that its sshd has
///   not consumed (the send side of the channel's window, which the node
///   offers and re-grants as it consumes). Applied to OpenSSH nodes only,
///   and never below four of the node's packets (128 KiB with OpenSSH):
///   OpenSSH re-grants window after three packets consumed; other servers
///   may re-grant only when half of the window they offered is consumed,
///   which a smaller bound never reaches, so they keep their whole window.
/// - Download (`download_window`): the window nodetunnel grants the node
///   for the stream (at most `ssh.window_size`). Lowering it takes nothing
///   back: grants pause until the client has read below it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SharedWindow {
    /// `"off"`: no bound; the stream keeps its whole window shared or not
    /// (the default of `download_window`).
    Off,
    /// `"auto"` (the default): what [`SharedWindow::AUTO_RATE`] needs at
    /// the session's round-trip time (the shortest of its TCP connect and
    /// its round trips measured since), at least
    /// [`SharedWindow::AUTO_FLOOR`]. On a LAN that is 256 KiB; from about
    /// 8 ms of RTT on it is the node's whole window, as OpenSSH's `ssh`.
    #[default]
    Auto,
    /// At most this many bytes (at most the node's window).
    Bytes(u32),
}

impl SharedWindow {
    /// The least `"auto"` gives a stream: on the benchmark machine it kept
    /// a keystroke beside a bulk transfer near OpenSSH's latency; a lone
    /// stream is not bounded (docs/benchmarks.md, "Upload window" and
    /// "Download window").
    pub const AUTO_FLOOR: u32 = 256 * 1024;
    /// Bytes per second per stream that `"auto"` leaves room for at the
    /// session's round-trip time.
    pub const AUTO_RATE: f64 = 256.0 * 1024.0 * 1024.0;
    /// Smallest number accepted.
    pub const MIN_BYTES: u32 = 32 * 1024;

    /// The bound for a stream on a session whose shortest round trip is
    /// `rtt` (`None`: not measured, the floor); `None`: not bounded.
    pub fn limit(self, rtt: Option<Duration>) -> Option<u32> {
        match self {
            SharedWindow::Off => None,
            SharedWindow::Bytes(n) => Some(n),
            SharedWindow::Auto => {
                let needed = rtt.map_or(0.0, |rtt| rtt.as_secs_f64() * Self::AUTO_RATE);
                // A float to integer `as` saturates; NaN is 0.
                Some((needed as u32).max(Self::AUTO_FLOOR))
            }
        }
    }
}

impl fmt::Display for SharedWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SharedWindow::Off => f.write_str("off"),
            SharedWindow::Auto => f.write_str("auto"),
            SharedWindow::Bytes(n) => write!(f, "{n}"),
        }
    }
}

impl<'de> Deserialize<'de> for SharedWindow {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl serde::de::Visitor<'_> for Visit {
            type Value = SharedWindow;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"auto\", \"off\" or a number of bytes")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<SharedWindow, E> {
                match v {
                    "auto" => Ok(SharedWindow::Auto),
                    "off" => Ok(SharedWindow::Off),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)),
                }
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<SharedWindow, E> {
                u32::try_from(v)
                    .map(SharedWindow::Bytes)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<SharedWindow, E> {
                u32::try_from(v)
                    .map(SharedWindow::Bytes)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
            }
        }
        d.deserialize_any(Visit)
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
    /// The most of one stream's upload a node may hold unconsumed: `"auto"`
    /// or bytes ([`SharedWindow`]). Memory: none here (it bounds what the
    /// node holds); per-stream upload throughput at most this / RTT.
    pub upload_window: SharedWindow,
    /// The most window granted to a node for one stream's download while
    /// the session carries other streams: `"auto"` or bytes
    /// ([`SharedWindow`]). Memory: lowers what such a stream holds, from
    /// `window_size` to this; per-stream download throughput then at most
    /// this / RTT.
    pub download_window: SharedWindow,
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
            upload_window: SharedWindow::Auto,
            download_window: SharedWindow::Off,
            max_buffered_bytes: 1024 * 1024 * 1024,
            drain_timeout: Duration::from_secs(30),
            rekey_limit: MAX_REKEY_LIMIT,
            rekey_interval: Duration::from_secs(3600),
            reconnect_probe_interval: Duration::from_secs(2),
            max_probes_per_second: 500,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_gives_the_floor_on_a_lan_and_what_the_rate_needs_on_a_long_link() {
        let auto = SharedWindow::Auto;
        assert_eq!(auto.limit(None), Some(SharedWindow::AUTO_FLOOR));
        assert_eq!(
            auto.limit(Some(Duration::from_micros(150))),
            Some(256 * 1024)
        );
        // 256 MiB/s for 4 ms: just over 1 MiB.
        assert_eq!(auto.limit(Some(Duration::from_millis(4))), Some(1_073_741));
        // Past about 8 ms it exceeds OpenSSH's 2 MiB window: no bound left.
        assert!(auto.limit(Some(Duration::from_millis(9))) > Some(2 << 20));
        assert_eq!(
            auto.limit(Some(Duration::from_secs(1 << 20))),
            Some(u32::MAX)
        );
    }

    #[test]
    fn a_byte_count_is_the_limit_whatever_the_round_trip() {
        let fixed = SharedWindow::Bytes(196_608);
        assert_eq!(fixed.limit(None), Some(196_608));
        assert_eq!(fixed.limit(Some(Duration::from_millis(50))), Some(196_608));
    }

    #[test]
    fn off_is_no_bound() {
        assert_eq!(SharedWindow::Off.limit(None), None);
        assert_eq!(
            SharedWindow::Off.limit(Some(Duration::from_micros(50))),
            None
        );
    }
}
