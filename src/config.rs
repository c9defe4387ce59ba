//! The configuration file: its TOML shape, defaults, and validation.
//!
//! This module assembles the file from the tables their feature modules
//! own ([`SshConfig`] in [`crate::ssh_config`], [`NodeConfig`] in
//! [`crate::node`], `[proxy]`, `[routing]`, `[inventory]`, `[admin]`,
//! `[readiness]` and `[audit]` in theirs) and checks it as a whole; no feature module
//! imports [`Config`] back (the manager takes a [`ManagerConfig`]).
//!
//! [`Config::load`] reads one TOML file and either returns a fully checked
//! [`Config`] (identity key loaded, limits non-zero, node names unique) or a
//! [`ConfigError`] that names the file, the key path and the reason on one
//! line, e.g. `nodetunnel.toml: ssh.connect_timeout: invalid duration "10 parsecs"`.
//!
//! Relative paths in the file are resolved against the file's directory, so a
//! config works the same whatever the working directory of the process.

use crate::field_error::FieldError;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::admin::{AdminConfig, ReadinessConfig};
use crate::audit::AuditConfig;
use crate::client_certificate::{self, ClientCertificate};
use crate::inventory::InventoryConfig;
use crate::keys::{self, Identity};
use crate::manager::ManagerConfig;
use crate::proxy::ProxyConfig;
use crate::router::RoutingConfig;
use crate::ssh_config::{MAX_REKEY_LIMIT, MIN_REKEY_LIMIT};

// The tables and types the file is made of, at the paths they always had.
pub use crate::node::{validate_node, NodeConfig};
pub use crate::ssh_config::{HostKeyPolicy, SshConfig};

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
    /// `[audit]`: the audit trail.
    #[serde(default)]
    pub audit: AuditConfig,
    /// Where the file was read from.
    #[serde(skip)]
    pub path: PathBuf,
    /// The loaded identity (filled by [`Config::load`]).
    #[serde(skip)]
    pub identity: Option<Arc<Identity>>,
    /// The loaded and checked `ssh.certificate` (filled by
    /// [`Config::load`] when the key is set).
    #[serde(skip)]
    pub client_certificate: Option<Arc<ClientCertificate>>,
}

impl<'a> From<&'a Config> for ManagerConfig<'a> {
    fn from(config: &'a Config) -> Self {
        ManagerConfig {
            ssh: &config.ssh,
            identity: config.identity.clone(),
            client_certificate: config.client_certificate.clone(),
            dial_timeout: config
                .proxy
                .as_ref()
                .map(|p| p.dial_timeout)
                .unwrap_or(config.ssh.channel_open_timeout),
            descriptors: descriptor_budget(config),
        }
    }
}

/// What `config` holds open besides the node sessions: the front door's
/// and the admin API's connections and listeners.
fn descriptor_budget(config: &Config) -> crate::descriptors::DescriptorBudget {
    let proxy = config.proxy.as_ref();
    let proxy_listeners = proxy.map_or(0, |p| {
        [
            p.uds.is_some(),
            p.tcp.is_some(),
            p.socks5.is_some(),
            p.grpc_uds.is_some(),
        ]
        .into_iter()
        .filter(|on| *on)
        .count()
    });
    let admin_listeners =
        usize::from(config.admin.listen.is_some()) + usize::from(config.admin.uds.is_some());
    let admin_connections = if admin_listeners > 0 {
        crate::admin::MAX_ADMIN_CONNECTIONS
    } else {
        0
    };
    // Beyond proxy.max_connections, the overflow connections accepted
    // only to be refused hold a socket too.
    let front_door = proxy.map_or(0, |p| {
        p.max_connections
            .saturating_add(crate::proxy::OVERFLOW_CONNECTIONS)
    });
    crate::descriptors::DescriptorBudget::new(
        config.ssh.sessions_per_node,
        front_door.saturating_add(admin_connections),
        proxy_listeners + admin_listeners,
    )
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
    /// Read, parse and check the file at `path`, and load the identity key;
    /// with `[ssh.issuer]`, sign the first certificate (a CA key that cannot
    /// be used stops the start).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_keys(path, true)
    }

    /// [`Config::load`] for SIGHUP: the identity key and `ssh.certificate`
    /// are loaded (one that cannot be fails the reload), but with
    /// `[ssh.issuer]` nothing is signed here (`client_certificate` stays
    /// `None`): the running renewal task signs one for the identity in
    /// use, so a reload signs once, not twice.
    pub fn load_for_reload(path: &Path) -> Result<Config, ConfigError> {
        Self::load_keys(path, false)
    }

    fn load_keys(path: &Path, sign: bool) -> Result<Config, ConfigError> {
        let mut config = Self::parse_file(path)?;
        let identity =
            keys::load_identity(&config.ssh.identity, config.ssh.passphrase_file.as_deref())
                .map_err(|e| ConfigError::new(path, "ssh.identity", e.to_string()))?;
        if let Some(cert_path) = &config.ssh.certificate {
            let certificate = client_certificate::load(
                cert_path,
                identity.public_key(),
                std::time::SystemTime::now(),
            )
            .map_err(|e| ConfigError::new(path, "ssh.certificate", e.to_string()))?;
            config.client_certificate = Some(Arc::new(certificate));
        }
        if let Some(issuer) = config.ssh.issuer.as_ref().filter(|_| sign) {
            // The first certificate, issued now: a CA key that cannot be
            // used stops the start (a renewal failure later only logs).
            let certificate =
                crate::issuer::issue(issuer, identity.public_key(), std::time::SystemTime::now())
                    .map_err(|e| {
                    let key = match e {
                        crate::issuer::IssueError::CaKey(_)
                        | crate::issuer::IssueError::CaKeyEncrypted { .. } => "ssh.issuer.ca_key",
                        _ => "ssh.issuer",
                    };
                    ConfigError::new(path, key, e.to_string())
                })?;
            config.client_certificate = Some(Arc::new(certificate));
        }
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
        config.ssh.certificate = config.ssh.certificate.as_ref().map(|p| resolve(base, p));
        if let Some(issuer) = config.ssh.issuer.as_mut() {
            issuer.ca_key = resolve(base, &issuer.ca_key);
        }
        config.inventory.path = config.inventory.path.as_ref().map(|p| resolve(base, p));
        config.inventory.kubeconfig = config
            .inventory
            .kubeconfig
            .as_ref()
            .map(|p| resolve(base, p));
        config.admin.uds = config.admin.uds.as_ref().map(|p| resolve(base, p));
        config.audit.path = config.audit.path.as_ref().map(|p| resolve(base, p));
        if let Some(proxy) = config.proxy.as_mut() {
            proxy.uds = proxy.uds.as_ref().map(|p| resolve(base, p));
            proxy.grpc_uds = proxy.grpc_uds.as_ref().map(|p| resolve(base, p));
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
            (
                "ssh.max_probes_per_second",
                ssh.max_probes_per_second as usize,
            ),
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
        for (key, bound) in [
            ("ssh.upload_window", ssh.upload_window),
            ("ssh.download_window", ssh.download_window),
        ] {
            if let crate::ssh_config::SharedWindow::Bytes(n) = bound {
                if !(crate::ssh_config::SharedWindow::MIN_BYTES..=64 * 1024 * 1024).contains(&n) {
                    return err(key, "must be \"auto\", \"off\" or 32768-67108864 bytes");
                }
            }
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
        if let Some(issuer) = &ssh.issuer {
            if ssh.certificate.is_some() {
                return err(
                    "ssh.issuer",
                    "ssh.certificate and [ssh.issuer] are mutually exclusive: set ssh.certificate for a certificate issued elsewhere, or [ssh.issuer] for nodetunnel to sign its own",
                );
            }
            crate::issuer::validate(issuer).map_err(|FieldError { key, reason }| {
                ConfigError::new(&self.path, format!("ssh.issuer.{key}"), reason)
            })?;
        }
        if let Some(proxy) = &self.proxy {
            proxy
                .validate()
                .map_err(|FieldError { key, reason }| ConfigError::new(&self.path, key, reason))?;
        }
        for check in [
            self.inventory.validate(),
            self.admin.validate(),
            self.readiness.validate(),
            self.audit.validate(),
        ] {
            check
                .map_err(|FieldError { key, reason }| ConfigError::new(&self.path, key, reason))?;
        }
        self.routing
            .validate()
            .map_err(|FieldError { key, reason }| {
                ConfigError::new(&self.path, format!("routing.{key}"), reason)
            })?;
        let mut seen = std::collections::HashMap::new();
        for (i, node) in self.nodes.iter().enumerate() {
            validate_node(node).map_err(|FieldError { key, reason }| {
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

fn resolve(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ipnet::IpNet;

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
    fn the_audit_table_is_checked_and_its_path_resolved() {
        let config = parse("[audit]\nmode = \"file\"\npath = \"audit/audit.jsonl\"\n")
            .expect("valid [audit]");
        assert_eq!(
            config.audit.path.as_deref(),
            Some(Path::new("/etc/nodetunnel/audit/audit.jsonl"))
        );
        let e = parse("[audit]\nmode = \"file\"\n").expect_err("no path");
        assert_eq!(e.key, "audit.path", "{e}");
        let e = parse("[audit]\nqueue = 0\n").expect_err("empty queue");
        assert_eq!(e.key, "audit.queue", "{e}");
        let e = parse("[audit]\nmode = \"syslog\"\n").expect_err("unknown mode");
        assert_eq!(e.key, "audit.mode", "{e}");
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
    fn the_shared_windows_are_auto_or_a_bounded_byte_count() {
        use crate::ssh_config::SharedWindow;
        let defaults = parse("").unwrap().ssh;
        assert_eq!(defaults.upload_window, SharedWindow::Auto);
        assert_eq!(defaults.download_window, SharedWindow::Off);
        for key in ["upload_window", "download_window"] {
            let set = |v: &str| parse(&format!("[ssh]\n{key} = {v}\n"));
            let get = |c: Config| match key {
                "upload_window" => c.ssh.upload_window,
                _ => c.ssh.download_window,
            };
            assert_eq!(get(set("\"auto\"").unwrap()), SharedWindow::Auto);
            assert_eq!(get(set("\"off\"").unwrap()), SharedWindow::Off);
            assert_eq!(get(set("524288").unwrap()), SharedWindow::Bytes(524_288));
            for bad in ["\"fast\"", "-1", "4294967296", "1.5"] {
                let e = set(bad).expect_err(bad).to_string();
                assert!(e.contains(&format!(": ssh.{key}: ")), "{bad}: {e}");
                assert!(
                    e.contains("\"auto\", \"off\" or a number of bytes"),
                    "{bad}: {e}"
                );
            }
            for out_of_range in ["32767", "67108865"] {
                let e = set(out_of_range).expect_err(out_of_range).to_string();
                assert!(
                    e.contains(&format!(
                        ": ssh.{key}: must be \"auto\", \"off\" or 32768-67108864 bytes"
                    )),
                    "{out_of_range}: {e}"
                );
            }
        }
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
    fn the_issuer_table_is_checked_and_its_ca_key_resolved() {
        let c = parse("[ssh.issuer]\nca_key = \"ca/user_ca\"\nprincipals = [\"nodetunnel\"]\n")
            .unwrap();
        let issuer = c.ssh.issuer.unwrap();
        assert_eq!(issuer.ca_key, Path::new("/etc/nodetunnel/ca/user_ca"));
        assert_eq!(issuer.validity, Duration::from_secs(3600));
        assert!(issuer.source_address.is_empty() && !issuer.test_only_short_validity);
        let e = error("[ssh.issuer]\nca_key = \"ca\"\nprincipals = []\n");
        assert!(
            e.contains(": ssh.issuer.principals: must list at least one"),
            "{e}"
        );
        let e = error("[ssh.issuer]\nprincipals = [\"nodetunnel\"]\n");
        assert!(e.contains("ca_key"), "{e}");
        let e = error(
            "[ssh]\ncertificate = \"c\"\n[ssh.issuer]\nca_key = \"ca\"\nprincipals = [\"n\"]\n",
        );
        assert!(
            e.contains(": ssh.issuer: ssh.certificate and [ssh.issuer] are mutually exclusive"),
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
    fn a_reload_loads_the_identity_but_signs_nothing_for_the_issuer() {
        let dir = tempfile::tempdir().unwrap();
        crate::keys::generate(dir.path(), "id", "test").unwrap();
        crate::keys::generate(dir.path(), "user_ca", "test ca").unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[ssh]\nidentity = \"id\"\n[ssh.issuer]\nca_key = \"user_ca\"\nprincipals = [\"nodetunnel\"]\n",
        )
        .unwrap();
        let started = Config::load(&path).unwrap();
        assert!(started.client_certificate.is_some(), "the start signs");
        let reloaded = Config::load_for_reload(&path).unwrap();
        assert!(reloaded.identity.is_some());
        assert!(
            reloaded.client_certificate.is_none(),
            "the renewal task signs on SIGHUP, not the reload's load"
        );
        // Without a usable CA key the start fails; the reload leaves that
        // to the renewal task (which logs it) and applies the rest.
        std::fs::remove_file(dir.path().join("user_ca")).unwrap();
        let e = Config::load(&path).unwrap_err().to_string();
        assert!(e.contains(": ssh.issuer.ca_key: "), "{e}");
        assert!(Config::load_for_reload(&path).is_ok());
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
