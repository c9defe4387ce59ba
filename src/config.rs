//! The configuration file: its TOML shape, defaults, and validation.
//!
//! [`Config::load`] reads one TOML file and either returns a fully checked
//! [`Config`] (identity key loaded, limits non-zero, node names unique) or a
//! [`ConfigError`] that names the file, the key path and the reason on one
//! line, e.g. `nodetunnel.toml: ssh.connect_timeout: invalid duration "10 parsecs"`.
//!
//! Relative paths in the file are resolved against the file's directory, so a
//! config works the same whatever the working directory of the process.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::admin::{AdminConfig, ReadinessConfig};
use crate::inventory::InventoryConfig;
use crate::keys::{self, Identity};
use crate::proxy::ProxyConfig;
use crate::router::RoutingConfig;

/// `ssh.host_key_policy`, owned by known_hosts (with the decision it feeds).
pub use crate::known_hosts::HostKeyPolicy;

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
    /// session on the node) and spread streams over them.
    pub sessions_per_node: usize,
    /// Open streams per node, over all its sessions.
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
    /// ever buffers.
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
}

/// Smallest `ssh.rekey_limit`: below it sessions would spend their time in
/// key exchanges.
const MIN_REKEY_LIMIT: u64 = 64 * 1024;
/// Largest (and default) `ssh.rekey_limit`: russh refuses more between key
/// exchanges.
const MAX_REKEY_LIMIT: u64 = 1024 * 1024 * 1024;

impl Default for SshConfig {
    fn default() -> Self {
        SshConfig {
            user: "root".into(),
            identity: PathBuf::from("keys/id_ed25519"),
            passphrase_file: None,
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
        }
    }
}

/// One `[[nodes]]` entry: a node and how to reach its sshd.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Unique node name (the Kubernetes Node name).
    pub name: String,
    /// The node's addresses (destinations that route to this node); the
    /// first is dialled for SSH unless `ssh_address` is set.
    pub addresses: Vec<String>,
    /// Where the node's sshd is reached, when not at the first address
    /// (a bastion-facing address, a port-forward, a loopback in dev mode).
    #[serde(default)]
    pub ssh_address: Option<String>,
    /// Pod CIDRs assigned to the node.
    #[serde(default)]
    pub pod_cidrs: Vec<IpNet>,
    /// SSH port of this node, overriding `ssh.port`.
    #[serde(default)]
    pub ssh_port: Option<u16>,
    /// SSH user of this node, overriding `ssh.user`.
    #[serde(default)]
    pub ssh_user: Option<String>,
    /// Kubernetes says the node is not Ready (condition False or Unknown):
    /// its tunnel is kept, but any-node routes choose it last. Set by the
    /// kubernetes inventory; not a config file key.
    #[serde(skip)]
    pub not_ready: bool,
}

impl NodeConfig {
    /// The address dialled for SSH: `ssh_address`, else the first address.
    pub fn ssh_address(&self) -> &str {
        self.ssh_address
            .as_deref()
            .or_else(|| self.addresses.first().map(String::as_str))
            .unwrap_or("")
    }
}

/// The whole file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[ssh]`.
    #[serde(default)]
    pub ssh: SshConfig,
    /// `[[nodes]]`.
    #[serde(default)]
    pub nodes: Vec<NodeConfig>,
    /// `[proxy]`: the front door. Absent: no listener.
    #[serde(default)]
    pub proxy: Option<ProxyConfig>,
    /// `[routing]`: destination rules and policy.
    #[serde(default)]
    pub routing: RoutingConfig,
    /// `[inventory]`: where nodes come from.
    #[serde(default)]
    pub inventory: InventoryConfig,
    /// `[admin]`: the admin API.
    #[serde(default)]
    pub admin: AdminConfig,
    /// `[readiness]`: when /readyz says ready.
    #[serde(default)]
    pub readiness: ReadinessConfig,
    /// Where the file was read from.
    #[serde(skip)]
    pub path: PathBuf,
    /// The loaded identity (filled by [`Config::load`]).
    #[serde(skip)]
    pub identity: Option<Arc<Identity>>,
}

/// A configuration that cannot be used: the file, the key path inside it
/// (`ssh.identity`, `nodes[2].pod_cidrs[0]`) and why.
#[derive(Debug, thiserror::Error)]
#[error("{}: {key}: {reason}", file.display())]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// Dotted key path; empty when the whole file is at fault.
    pub key: String,
    /// One line saying what is wrong.
    pub reason: String,
}

impl ConfigError {
    /// Control characters in the key and reason are escaped, so that the
    /// error stays on one line: a quoted TOML key or string may hold any
    /// character.
    fn new(file: &Path, key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_path_buf(),
            key: escape_controls(&key.into()),
            reason: escape_controls(&reason.into()),
        }
    }
}

/// `text` with control characters (line breaks included) escaped as `\n`,
/// `\u{1b}` and so on.
fn escape_controls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A multi-line message (toml's syntax errors: "invalid table header" and
/// "expected ..." on two lines) as one line: its non-blank lines, trimmed,
/// joined with `; `.
fn join_lines(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect();
    lines.join("; ")
}

impl Config {
    /// Read, parse and check the file at `path`, and load the identity key.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let mut config = Self::parse_file(path)?;
        let identity =
            keys::load_identity(&config.ssh.identity, config.ssh.passphrase_file.as_deref())
                .map_err(|e| ConfigError::new(path, "ssh.identity", e.to_string()))?;
        config.identity = Some(Arc::new(identity));
        Ok(config)
    }

    /// Read, parse and check the file without loading key material (for
    /// commands that only need the node list, such as `route`).
    pub fn parse_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(path, "", format!("cannot read: {e}")))?;
        Self::parse_str(&text, path)
    }

    /// Parse and check TOML text as if read from `path`.
    pub fn parse_str(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let deserializer = toml::Deserializer::new(text);
        let mut config: Config = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let mut reason = join_lines(inner.message());
            if let Some(span) = inner.span() {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                reason = format!("{reason} (line {line})");
            }
            let key = if key == "." { String::new() } else { key };
            ConfigError::new(path, key, reason)
        })?;
        config.path = path.to_path_buf();
        let base = path.parent().unwrap_or(Path::new("."));
        config.ssh.identity = resolve(base, &config.ssh.identity);
        config.ssh.known_hosts = resolve(base, &config.ssh.known_hosts);
        config.ssh.passphrase_file = config
            .ssh
            .passphrase_file
            .as_ref()
            .map(|p| resolve(base, p));
        config.inventory.path = config.inventory.path.as_ref().map(|p| resolve(base, p));
        config.inventory.kubeconfig = config
            .inventory
            .kubeconfig
            .as_ref()
            .map(|p| resolve(base, p));
        config.admin.uds = config.admin.uds.as_ref().map(|p| resolve(base, p));
        if let Some(proxy) = config.proxy.as_mut() {
            proxy.uds = proxy.uds.as_ref().map(|p| resolve(base, p));
            if let Some(tls) = proxy.tls.as_mut() {
                tls.cert = resolve(base, &tls.cert);
                tls.key = resolve(base, &tls.key);
                tls.client_ca = resolve(base, &tls.client_ca);
            }
        }
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let err = |key: &str, reason: &str| Err(ConfigError::new(&self.path, key, reason));
        let ssh = &self.ssh;
        if ssh.user.is_empty() {
            return err("ssh.user", "must not be empty");
        }
        if ssh.port == 0 {
            return err("ssh.port", "must be between 1 and 65535");
        }
        for (key, value) in [
            ("ssh.connect_timeout", ssh.connect_timeout),
            ("ssh.handshake_timeout", ssh.handshake_timeout),
            ("ssh.auth_timeout", ssh.auth_timeout),
            ("ssh.channel_open_timeout", ssh.channel_open_timeout),
            ("ssh.keepalive_interval", ssh.keepalive_interval),
            ("ssh.backoff_base", ssh.backoff_base),
            ("ssh.backoff_max", ssh.backoff_max),
            ("ssh.rekey_interval", ssh.rekey_interval),
        ] {
            if value.is_zero() {
                return err(key, "must be greater than zero");
            }
        }
        if ssh.backoff_max < ssh.backoff_base {
            return err(
                "ssh.backoff_max",
                "must not be smaller than ssh.backoff_base",
            );
        }
        for (key, value) in [
            ("ssh.keepalive_max", ssh.keepalive_max as usize),
            ("ssh.sessions_per_node", ssh.sessions_per_node),
            ("ssh.max_streams_per_node", ssh.max_streams_per_node),
            ("ssh.max_handshakes_in_flight", ssh.max_handshakes_in_flight),
        ] {
            if value == 0 {
                return err(key, "must be greater than zero");
            }
        }
        if ssh.sessions_per_node > 64 {
            return err("ssh.sessions_per_node", "must be at most 64");
        }
        if ssh.window_size < 32 * 1024 {
            return err("ssh.window_size", "must be at least 32768 bytes");
        }
        if ssh.max_buffered_bytes < ssh.window_size as usize {
            return err("ssh.max_buffered_bytes", "must be at least ssh.window_size");
        }
        if ssh.window_size > 64 * 1024 * 1024 {
            return err("ssh.window_size", "must be at most 67108864 bytes (64 MiB)");
        }
        if !(MIN_REKEY_LIMIT..=MAX_REKEY_LIMIT).contains(&ssh.rekey_limit) {
            return err(
                "ssh.rekey_limit",
                "must be between 65536 bytes (64 KiB) and 1073741824 bytes (1 GiB, the most russh allows between key exchanges)",
            );
        }
        if let Some(proxy) = &self.proxy {
            proxy
                .validate()
                .map_err(|(key, reason)| ConfigError::new(&self.path, key, reason))?;
        }
        for check in [
            self.inventory.validate(),
            self.admin.validate(),
            self.readiness.validate(),
        ] {
            check.map_err(|(key, reason)| ConfigError::new(&self.path, key, reason))?;
        }
        self.routing.validate().map_err(|(key, reason)| {
            ConfigError::new(&self.path, format!("routing.{key}"), reason)
        })?;
        let mut seen = std::collections::HashMap::new();
        for (i, node) in self.nodes.iter().enumerate() {
            validate_node(node).map_err(|(key, reason)| {
                ConfigError::new(&self.path, format!("nodes[{i}].{key}"), reason)
            })?;
            if let Some(first) = seen.insert(node.name.as_str(), i) {
                return err(
                    &format!("nodes[{i}].name"),
                    &format!("duplicate node name {:?} (also nodes[{first}])", node.name),
                );
            }
        }
        Ok(())
    }
}

/// Check one node entry; the error is (key within the node, reason).
pub fn validate_node(node: &NodeConfig) -> Result<(), (String, String)> {
    if node.name.is_empty() {
        return Err(("name".into(), "must not be empty".into()));
    }
    if node.addresses.is_empty() {
        return Err(("addresses".into(), "needs at least one address".into()));
    }
    for (j, address) in node.addresses.iter().enumerate() {
        if address.is_empty() || address.contains(char::is_whitespace) || address.contains('/') {
            return Err((
                format!("addresses[{j}]"),
                format!("{address:?} is not an IP address or host name"),
            ));
        }
    }
    if let Some(address) = &node.ssh_address {
        if address.is_empty() || address.contains(char::is_whitespace) || address.contains('/') {
            return Err((
                "ssh_address".into(),
                format!("{address:?} is not an IP address or host name"),
            ));
        }
    }
    if node.ssh_port == Some(0) {
        return Err(("ssh_port".into(), "must be between 1 and 65535".into()));
    }
    if let Some(user) = &node.ssh_user {
        if user.is_empty() {
            return Err(("ssh_user".into(), "must not be empty".into()));
        }
    }
    Ok(())
}

fn resolve(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse_str(text, Path::new("/etc/nodetunnel/nodetunnel.toml"))
    }

    fn error(text: &str) -> String {
        parse(text)
            .expect_err("config should be refused")
            .to_string()
    }

    #[test]
    fn the_documented_example_parses_with_its_values() {
        let config = parse(
            r#"
[ssh]
user = "root"
identity = "keys/id_ed25519"
known_hosts = "keys/known_hosts"
host_key_policy = "strict"
port = 22
connect_timeout = "10s"
keepalive_interval = "15s"
keepalive_max = 3
sessions_per_node = 1
max_streams_per_node = 1024

[[nodes]]
name = "node-a"
addresses = ["10.240.0.11"]
pod_cidrs = ["10.244.1.0/24"]
"#,
        )
        .unwrap();
        assert_eq!(config.ssh.keepalive_interval, Duration::from_secs(15));
        assert_eq!(
            config.ssh.identity,
            PathBuf::from("/etc/nodetunnel/keys/id_ed25519")
        );
        assert_eq!(config.nodes[0].ssh_address(), "10.240.0.11");
        assert_eq!(
            config.nodes[0].pod_cidrs,
            vec!["10.244.1.0/24".parse::<IpNet>().unwrap()]
        );
    }

    #[test]
    fn an_unknown_key_names_the_file_and_key() {
        let e = error("[ssh]\nusr = \"root\"\n");
        assert!(
            e.starts_with("/etc/nodetunnel/nodetunnel.toml: ssh.usr: unknown field `usr`"),
            "{e}"
        );
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn a_wrong_type_names_the_key_path() {
        let e = error("[ssh]\nkeepalive_max = \"three\"\n");
        assert!(e.contains(": ssh.keepalive_max: "), "{e}");
    }

    #[test]
    fn a_bad_duration_names_the_key_path() {
        let e = error("[ssh]\nconnect_timeout = \"10 parsecs\"\n");
        assert!(e.contains(": ssh.connect_timeout: "), "{e}");
    }

    #[test]
    fn a_bad_cidr_names_the_node_and_index() {
        let e = error("[[nodes]]\nname = \"a\"\naddresses = [\"10.0.0.1\"]\npod_cidrs = [\"10.244.1.0/33\"]\n");
        assert!(e.contains(": nodes[0].pod_cidrs[0]: "), "{e}");
    }

    #[test]
    fn duplicate_node_names_are_refused() {
        let e = error(
            "[[nodes]]\nname = \"a\"\naddresses = [\"10.0.0.1\"]\n[[nodes]]\nname = \"a\"\naddresses = [\"10.0.0.2\"]\n",
        );
        assert!(
            e.contains(": nodes[1].name: duplicate node name \"a\""),
            "{e}"
        );
    }

    #[test]
    fn zero_limits_are_refused() {
        for (key, line) in [
            ("ssh.max_streams_per_node", "max_streams_per_node = 0"),
            ("ssh.sessions_per_node", "sessions_per_node = 0"),
            ("ssh.keepalive_max", "keepalive_max = 0"),
            ("ssh.keepalive_interval", "keepalive_interval = \"0s\""),
            ("ssh.port", "port = 0"),
        ] {
            let e = error(&format!("[ssh]\n{line}\n"));
            assert!(e.contains(&format!(": {key}: ")), "{key}: {e}");
        }
    }

    #[test]
    fn rekey_limits_out_of_range_are_refused_with_the_range() {
        for line in [
            "rekey_limit = 65535",
            "rekey_limit = 1073741825",
            "rekey_interval = \"0s\"",
        ] {
            let e = error(&format!("[ssh]\n{line}\n"));
            let key = line.split(' ').next().unwrap_or_default();
            assert!(e.contains(&format!(": ssh.{key}: ")), "{line}: {e}");
        }
        let e = error("[ssh]\nrekey_limit = 1024\n");
        assert!(
            e.contains("between 65536 bytes (64 KiB) and 1073741824"),
            "{e}"
        );
    }

    #[test]
    fn node_annotations_are_untrusted_unless_the_kubernetes_source_opts_in() {
        let config = parse("[inventory]\nsource = \"kubernetes\"\n").unwrap();
        assert!(!config.inventory.kubernetes.trust_node_annotations);
        let config = parse(
            "[inventory]\nsource = \"kubernetes\"\n\n[inventory.kubernetes]\ntrust_node_annotations = true\n",
        )
        .unwrap();
        assert!(config.inventory.kubernetes.trust_node_annotations);
        let e = error("[inventory.kubernetes]\ntrust_node_annotations = true\n");
        assert!(
            e.contains(": inventory.kubernetes.trust_node_annotations: applies only with source = \"kubernetes\""),
            "{e}"
        );
        let e = error("[inventory]\nsource = \"kubernetes\"\nkubernetes = { trust_node_annotations = \"yes\" }\n");
        assert!(e.contains("trust_node_annotations"), "{e}");
        let e = error("[inventory.kubernetes]\ntrust_annotations = true\n");
        assert!(e.contains("trust_annotations"), "{e}");
    }

    #[test]
    fn inventory_admin_and_readiness_tables_are_checked_at_load() {
        let e = error("[inventory]\nsource = \"file\"\n");
        assert!(e.contains(": inventory.path: "), "{e}");
        let e = error("[inventory]\naddress_types = []\n");
        assert!(e.contains(": inventory.address_types: "), "{e}");
        let e = error("[admin]\nlisten = \"0.0.0.0:8133\"\n");
        assert!(e.contains(": admin.listen: "), "{e}");
        let e = error("[readiness]\nmin_ready_fraction = 1.5\n");
        assert!(e.contains(": readiness.min_ready_fraction: "), "{e}");
    }

    #[test]
    fn a_node_without_addresses_is_refused() {
        let e = error("[[nodes]]\nname = \"a\"\naddresses = []\n");
        assert!(e.contains(": nodes[0].addresses: "), "{e}");
    }

    #[test]
    fn malformed_toml_gives_the_line() {
        let e = error("[ssh\nuser = 1\n");
        assert!(e.contains("line 1"), "{e}");
        // toml's message has two lines; the error stays one (found by the
        // config fuzz target, fuzz/regressions/config/).
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(e.contains("invalid table header; expected"), "{e}");
    }

    #[test]
    fn control_characters_in_keys_and_values_stay_on_one_line() {
        let e = error("[ssh]\n\"us\\ner\" = 1\n");
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(e.contains("ssh.us\\ner: "), "{e}");
    }

    #[test]
    fn an_unreadable_identity_is_a_config_error_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[ssh]\nidentity = \"missing_key\"\n").unwrap();
        let e = Config::load(&path).unwrap_err().to_string();
        assert!(e.contains(": ssh.identity: "), "{e}");
        assert!(e.contains("missing_key"), "{e}");
    }

    #[test]
    fn a_malformed_identity_is_a_config_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(dir.path().join("bad_key"), "not a key\n").unwrap();
        std::fs::write(&path, "[ssh]\nidentity = \"bad_key\"\n").unwrap();
        let e = Config::load(&path).unwrap_err().to_string();
        assert!(e.contains(": ssh.identity: "), "{e}");
    }
}
