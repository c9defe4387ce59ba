//! `nodetunnel check NODE|ADDRESS`: walk one node through every step a
//! tunnel needs, standalone (no running sidecar), with the configuration's
//! key, known_hosts and timeouts, and say which step fails and what to do.
//!
//! The steps, each timed and bounded:
//!
//! 1. resolve the SSH address (`ssh.connect_timeout`);
//! 2. TCP connect to it (`ssh.connect_timeout`);
//! 3. read the SSH identification line (`ssh.handshake_timeout`);
//! 4. key exchange, reporting the negotiated algorithms
//!    (`ssh.handshake_timeout`);
//! 5. the host key against known_hosts (fingerprint; on a mismatch both
//!    fingerprints and the known_hosts line). The key exchange accepts any
//!    key so that this step can name it; nothing is sent to an untrusted
//!    host: a failure here stops before authentication;
//! 6. public-key authentication (`ssh.auth_timeout`);
//! 7. a direct-tcpip channel to the kubelet port on the node's preferred
//!    address (its first `addresses` entry), which is what kube-apiserver
//!    dials through the tunnel, or on `--kubelet-host`
//!    (`ssh.channel_open_timeout`);
//! 8. `GET /healthz` over TLS through that channel
//!    (`ssh.channel_open_timeout`). The certificate is not verified, as
//!    kube-apiserver does without `--kubelet-certificate-authority`; with
//!    `--kubelet-ca` it is verified against that bundle for the kubelet
//!    host of step 7, as kube-apiserver does with it. A 401 or 403
//!    passes: the kubelet is there and wants the apiserver's client
//!    certificate.
//!
//! The exit status is 0 when every step passed, otherwise it names the
//! first failed step ([`Step::exit_code`], 3 to 10); 2 is a usage or
//! configuration error. With `--all`, every node is checked in parallel
//! (bounded), failed nodes are shown step by step, a summary table ends the
//! output, and the exit status is 0 when every node passed, 1 otherwise.
//!
//! The parts: `steps` walks the steps in order and times them, `probes`
//! does the network work of steps 1-4, 6 and 7, `host_key` judges step 5,
//! `kubelet_tls` does step 8, and `report` renders the results as text or
//! JSON.

use std::net::IpAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use russh::client;

use super::format;
use crate::config::{Config, HostKeyPolicy};
use crate::keys::Identity;
use crate::known_hosts::KnownHosts;
use crate::session::bracket;

mod host_key;
mod kubelet_tls;
mod probes;
mod report;
mod steps;
#[cfg(test)]
mod tests;

pub use kubelet_tls::KubeletTlsError;
pub use report::{render_all, render_step, Outcome, Report, StepResult};
pub use steps::Step;

/// Exit status of a usage or configuration error.
pub const EXIT_USAGE: u8 = 2;
/// Exit status of `--all` when any node failed.
pub const EXIT_SOME_FAILED: u8 = 1;

/// Where and as whom to check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Node name, or the address as given.
    pub label: String,
    /// SSH host (name or IP, no brackets).
    pub host: String,
    /// SSH port.
    pub port: u16,
    /// SSH user.
    pub user: String,
    /// The kubelet's host as kube-apiserver dials it: the node's preferred
    /// address (its first), or the address given when it names no node.
    pub kubelet_host: String,
}

/// Why `NODE|ADDRESS` names no target. The text names what was given.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TargetError {
    /// Nothing was given.
    #[error("empty node name or address")]
    Empty,
    /// The port is not in 1..=65535.
    #[error("{0:?}: the port is not a number in 1..=65535")]
    BadPort(String),
    /// `[` without its `]`.
    #[error("{0:?}: missing ]")]
    MissingBracket(String),
    /// Something other than `:port` after `[address]`.
    #[error("{0:?}: expected [address]:port")]
    AfterBracket(String),
    /// An IPv6 address and a port without brackets.
    #[error("{0:?}: an IPv6 address with a port is written [address]:port")]
    UnbracketedIpv6(String),
}

/// Why `check` cannot start: the checker's own setup failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckerError {
    /// The config was loaded without its identity.
    #[error("no identity loaded")]
    NoIdentity,
    /// The known_hosts file cannot be read or parsed.
    #[error(transparent)]
    KnownHosts(#[from] crate::known_hosts::KnownHostsError),
    /// The kubelet TLS client cannot be built.
    #[error(transparent)]
    KubeletTls(#[from] KubeletTlsError),
}

/// The target for `NODE|ADDRESS`: a node of the config by name, else a
/// node one of whose addresses it is, else an address (`host`,
/// `host:port`, `[v6]:port` or a bare IPv6 address) with `[ssh]` defaults.
pub fn resolve_target(config: &Config, what: &str) -> Result<Target, TargetError> {
    let node_target = |n: &crate::config::NodeConfig| Target {
        label: n.name.clone(),
        host: n.ssh_address().to_string(),
        port: n.ssh_port.unwrap_or(config.ssh.port),
        user: n
            .ssh_user
            .clone()
            .unwrap_or_else(|| config.ssh.user.clone()),
        kubelet_host: n
            .addresses
            .first()
            .cloned()
            .unwrap_or_else(|| n.ssh_address().to_string()),
    };
    if let Some(n) = config.nodes.iter().find(|n| n.name == what) {
        return Ok(node_target(n));
    }
    let (host, port) = split_host_port(what)?;
    if let Some(n) = config
        .nodes
        .iter()
        .find(|n| n.addresses.iter().any(|a| a == &host) || n.ssh_address() == host)
    {
        let mut t = node_target(n);
        t.host = host;
        if let Some(p) = port {
            t.port = p;
        }
        t.label = format!("{what} (node {})", n.name);
        return Ok(t);
    }
    let port = port.unwrap_or(config.ssh.port);
    Ok(Target {
        label: format!("{}:{port}", bracket(&host)),
        kubelet_host: host.clone(),
        host,
        port,
        user: config.ssh.user.clone(),
    })
}

fn split_host_port(what: &str) -> Result<(String, Option<u16>), TargetError> {
    let parse_port = |p: &str| match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(TargetError::BadPort(what.to_owned())),
        Ok(p) => Ok(p),
    };
    if what.is_empty() {
        return Err(TargetError::Empty);
    }
    if let Some(rest) = what.strip_prefix('[') {
        let (inside, after) = rest
            .split_once(']')
            .ok_or_else(|| TargetError::MissingBracket(what.to_owned()))?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(parse_port(p)?),
            None if after.is_empty() => None,
            None => return Err(TargetError::AfterBracket(what.to_owned())),
        };
        return Ok((inside.to_string(), port));
    }
    if what.parse::<IpAddr>().is_ok() {
        return Ok((what.to_string(), None));
    }
    match what.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => {
            Ok((host.to_string(), Some(parse_port(port)?)))
        }
        Some(_) => Err(TargetError::UnbracketedIpv6(what.to_owned())),
        None => Ok((what.to_string(), None)),
    }
}

/// Options of `nodetunnel check`.
#[derive(Clone, Debug)]
pub struct CheckOptions {
    /// Node name or address; `None` with `all`.
    pub target: Option<String>,
    /// Check every node of the config.
    pub all: bool,
    /// Nodes checked at once with `all`.
    pub parallel: usize,
    /// Kubelet host as seen from the node; `None`: the node's preferred
    /// address ([`Target::kubelet_host`]), as kube-apiserver dials it.
    pub kubelet_host: Option<String>,
    /// Kubelet port.
    pub kubelet_port: u16,
    /// Print one JSON document at the end instead of the steps as they run.
    pub json: bool,
    /// Verify the kubelet's certificate against this PEM bundle.
    pub kubelet_ca: Option<std::path::PathBuf>,
}

/// Run `check` as the command line asked; the exit status as documented
/// in the module docs.
pub async fn run(config_path: &Path, options: CheckOptions) -> ExitCode {
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nodetunnel check: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let checker = match Checker::new(
        &config,
        options.kubelet_host.as_deref(),
        options.kubelet_port,
        options.kubelet_ca.as_deref(),
    ) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nodetunnel check: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let colour = format::stdout_colour();
    if options.all {
        return run_all(
            &config,
            &checker,
            options.parallel.max(1),
            colour,
            options.json,
        )
        .await;
    }
    let Some(what) = options.target.as_deref() else {
        eprintln!("nodetunnel check: name a node or an address, or use --all");
        return ExitCode::from(EXIT_USAGE);
    };
    let target = match resolve_target(&config, what) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("nodetunnel check: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if options.json {
        let report = checker.check(&target, &mut |_| {}).await;
        return print_json(&report.to_json(), report.exit_code());
    }
    let endpoint = format!("{}:{}", bracket(&target.host), target.port);
    if target.label == endpoint {
        println!("nodetunnel check {endpoint} as {}", target.user);
    } else {
        println!(
            "nodetunnel check {}: {endpoint} as {}",
            target.label, target.user
        );
    }
    let mut print_step = |s: &StepResult| print!("{}", render_step(s, colour));
    let report = checker.check(&target, &mut print_step).await;
    println!("{}", report.footer(colour));
    ExitCode::from(report.exit_code())
}

/// Print `value` as pretty JSON and exit with `code` (2 if it cannot be
/// written).
fn print_json(value: &serde_json::Value, code: u8) -> ExitCode {
    match serde_json::to_string_pretty(value) {
        Ok(text) => {
            println!("{text}");
            ExitCode::from(code)
        }
        Err(e) => {
            eprintln!("nodetunnel check: {e}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

async fn run_all(
    config: &Config,
    checker: &Checker,
    parallel: usize,
    colour: bool,
    json: bool,
) -> ExitCode {
    if config.nodes.is_empty() {
        eprintln!(
            "nodetunnel check --all: {} lists no [[nodes]] (with inventory.source = kubernetes \
             or file, check nodes by address)",
            config.path.display()
        );
        return ExitCode::from(EXIT_USAGE);
    }
    let targets: Vec<Target> = config
        .nodes
        .iter()
        .filter_map(|n| resolve_target(config, &n.name).ok())
        .collect();
    let mut reports: Vec<Report> = futures::stream::iter(targets.iter())
        .map(|t| async move { checker.check(t, &mut |_| {}).await })
        .buffer_unordered(parallel)
        .collect()
        .await;
    reports.sort_by(|a, b| a.label.cmp(&b.label));
    let code = if reports.iter().all(Report::passed) {
        0
    } else {
        EXIT_SOME_FAILED
    };
    if json {
        let passed = reports.iter().filter(|r| r.passed()).count();
        let value = serde_json::json!({
            "passed": passed,
            "total": reports.len(),
            "nodes": reports.iter().map(Report::to_json).collect::<Vec<_>>(),
        });
        return print_json(&value, code);
    }
    print!("{}", render_all(&reports, colour));
    ExitCode::from(code)
}

/// Runs checks with one configuration's key, known_hosts and timeouts.
pub struct Checker {
    pub(super) identity: Arc<Identity>,
    /// `ssh.certificate`, loaded: authentication offers it when set.
    pub(super) certificate: Option<Arc<crate::client_certificate::ClientCertificate>>,
    pub(super) known_hosts: KnownHosts,
    pub(super) policy: HostKeyPolicy,
    pub(super) russh: Arc<client::Config>,
    pub(super) connect_timeout: Duration,
    pub(super) handshake_timeout: Duration,
    pub(super) auth_timeout: Duration,
    pub(super) channel_timeout: Duration,
    /// `--kubelet-host`: the same kubelet host for every node, instead of
    /// each node's preferred address.
    pub(super) kubelet_host: Option<String>,
    pub(super) kubelet_port: u16,
    pub(super) tls: tokio_rustls::TlsConnector,
    /// The `--kubelet-ca` bundle the kubelet's certificate is verified
    /// against, if any.
    pub(super) kubelet_ca: Option<std::path::PathBuf>,
}

impl Checker {
    /// A checker for `config` (loaded with its identity) probing the
    /// kubelet at `kubelet_port` on the node's preferred address, or on
    /// `kubelet_host` if given, as seen from the node,
    /// verifying its certificate against `kubelet_ca` (PEM) if given.
    pub fn new(
        config: &Config,
        kubelet_host: Option<&str>,
        kubelet_port: u16,
        kubelet_ca: Option<&Path>,
    ) -> Result<Self, CheckerError> {
        let identity = config.identity.clone().ok_or(CheckerError::NoIdentity)?;
        let known_hosts = KnownHosts::load(&config.ssh.known_hosts)?;
        for w in known_hosts.warnings() {
            eprintln!(
                "warning: {} line {} skipped: {}",
                config.ssh.known_hosts.display(),
                w.line,
                w.reason
            );
        }
        let mut russh =
            crate::session::russh_config(&config.ssh, known_hosts.has_cert_authorities());
        // The check reads its one channel directly, not through the
        // stream layer that reports consumption.
        russh.adjust_window_on_consume = false;
        let tls = kubelet_tls::connector(kubelet_ca)?;
        Ok(Checker {
            identity,
            certificate: config.client_certificate.clone(),
            known_hosts,
            policy: config.ssh.host_key_policy,
            russh: Arc::new(russh),
            connect_timeout: config.ssh.connect_timeout,
            handshake_timeout: config.ssh.handshake_timeout,
            auth_timeout: config.ssh.auth_timeout,
            channel_timeout: config.ssh.channel_open_timeout,
            kubelet_host: kubelet_host.map(str::to_owned),
            kubelet_port,
            tls,
            kubelet_ca: kubelet_ca.map(Path::to_path_buf),
        })
    }
}

/// A failed step: what went wrong and what to do about it.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(super) detail: String,
    pub(super) hint: Option<String>,
}

impl Failure {
    pub(crate) fn new(detail: impl Into<String>, hint: impl Into<Hint>) -> Failure {
        Failure {
            detail: detail.into(),
            hint: hint.into().0,
        }
    }
}

/// An optional hint: a `&str`, a `String`, or `None`.
pub(crate) struct Hint(Option<String>);

impl From<&str> for Hint {
    fn from(text: &str) -> Hint {
        Hint(Some(text.to_string()))
    }
}

impl From<String> for Hint {
    fn from(text: String) -> Hint {
        Hint(Some(text))
    }
}

impl From<Option<String>> for Hint {
    fn from(text: Option<String>) -> Hint {
        Hint(text)
    }
}

pub(crate) fn human(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}
