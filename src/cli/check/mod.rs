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
//! 7. a direct-tcpip channel to the kubelet port as seen from the node
//!    (`ssh.channel_open_timeout`);
//! 8. `GET /healthz` over TLS through that channel
//!    (`ssh.channel_open_timeout`). The certificate is not verified, as
//!    kube-apiserver does without `--kubelet-certificate-authority`; with
//!    `--kubelet-ca` it is verified against that bundle for the name
//!    `--kubelet-host`, as kube-apiserver does with it. A 401 or 403
//!    passes: the kubelet is there and wants the apiserver's client
//!    certificate.
//!
//! The exit status is 0 when every step passed, otherwise it names the
//! first failed step ([`Step::exit_code`], 3 to 10); 2 is a usage or
//! configuration error. With `--all`, every node is checked in parallel
//! (bounded), failed nodes are shown step by step, a summary table ends the
//! output, and the exit status is 0 when every node passed, 1 otherwise.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::StreamExt;
use http::Method;
use russh::client::{self, AuthResult, Handle};
use russh::keys::{PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::Channel;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::format::{self, paint, Colour};
use crate::config::{Config, HostKeyPolicy};
use crate::keys::{fingerprint, Identity};
use crate::known_hosts::{lookup_name, HostKeyStatus, KnownHosts};
use crate::session::bracket;

/// Exit status of a usage or configuration error.
pub const EXIT_USAGE: u8 = 2;
/// Exit status of `--all` when any node failed.
pub const EXIT_SOME_FAILED: u8 = 1;

/// The hint of a failed name lookup.
const RESOLVE_HINT: &str = "check the name and the resolver of this host (/etc/resolv.conf), \
     or set the node's address (or ssh_address) to its IP";

/// The hint of packets dropped on the way to sshd.
const DROPPED_HINT: &str = "the packets are dropped: a firewall or security group, a wrong \
     address, or the node is down";

/// Longest SSH identification exchange read (RFC 4253 allows lines before
/// the identification; this bounds them).
const MAX_BANNER_BYTES: usize = 8192;

/// One step of the check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// DNS (or the IP literal).
    Resolve,
    /// TCP connect to sshd.
    TcpConnect,
    /// The server's SSH identification line.
    Banner,
    /// Key exchange.
    KeyExchange,
    /// The host key against known_hosts.
    HostKey,
    /// Public-key authentication.
    Authentication,
    /// A direct-tcpip channel to the kubelet port.
    DirectTcpip,
    /// `GET /healthz` over TLS through the channel.
    KubeletHealthz,
}

impl Step {
    /// Every step, in order.
    pub const ALL: [Step; 8] = [
        Step::Resolve,
        Step::TcpConnect,
        Step::Banner,
        Step::KeyExchange,
        Step::HostKey,
        Step::Authentication,
        Step::DirectTcpip,
        Step::KubeletHealthz,
    ];

    /// The name printed for it.
    pub fn name(self) -> &'static str {
        match self {
            Step::Resolve => "resolve",
            Step::TcpConnect => "tcp connect",
            Step::Banner => "ssh banner",
            Step::KeyExchange => "key exchange",
            Step::HostKey => "host key",
            Step::Authentication => "authentication",
            Step::DirectTcpip => "direct-tcpip",
            Step::KubeletHealthz => "kubelet /healthz",
        }
    }

    /// The exit status when this is the first failed step: 3 (resolve) to
    /// 10 (kubelet /healthz).
    pub fn exit_code(self) -> u8 {
        match self {
            Step::Resolve => 3,
            Step::TcpConnect => 4,
            Step::Banner => 5,
            Step::KeyExchange => 6,
            Step::HostKey => 7,
            Step::Authentication => 8,
            Step::DirectTcpip => 9,
            Step::KubeletHealthz => 10,
        }
    }
}

/// How a step went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It worked.
    Passed,
    /// It failed; the steps after it are skipped.
    Failed,
    /// Not run because an earlier step failed.
    Skipped,
}

/// One step's result.
#[derive(Clone, Debug)]
pub struct StepResult {
    /// Which step.
    pub step: Step,
    /// How it went.
    pub outcome: Outcome,
    /// How long it took.
    pub duration: Duration,
    /// What was found (the address, banner, algorithms, fingerprint...) or
    /// what went wrong.
    pub detail: String,
    /// What to do about a failure (may span lines).
    pub hint: Option<String>,
}

/// Everything `check` found about one target.
#[derive(Clone, Debug)]
pub struct Report {
    /// The node name, or the address as given.
    pub label: String,
    /// `host:port` of the sshd.
    pub endpoint: String,
    /// The SSH user.
    pub user: String,
    /// One result per step, in order.
    pub steps: Vec<StepResult>,
    /// Wall time of the whole check.
    pub elapsed: Duration,
}

impl Report {
    /// The first failed step.
    pub fn failure(&self) -> Option<&StepResult> {
        self.steps.iter().find(|s| s.outcome == Outcome::Failed)
    }

    /// Whether every step passed.
    pub fn passed(&self) -> bool {
        self.failure().is_none()
    }

    /// 0, or the failed step's [`Step::exit_code`].
    pub fn exit_code(&self) -> u8 {
        self.failure().map(|s| s.step.exit_code()).unwrap_or(0)
    }

    /// The heading line.
    pub fn header(&self) -> String {
        if self.label == self.endpoint {
            format!("nodetunnel check {} as {}", self.endpoint, self.user)
        } else {
            format!(
                "nodetunnel check {}: {} as {}",
                self.label, self.endpoint, self.user
            )
        }
    }

    /// The closing line.
    pub fn footer(&self, colour: bool) -> String {
        match self.failure() {
            None => paint(
                &format!(
                    "all {} steps passed in {}",
                    self.steps.len(),
                    format::elapsed(self.elapsed)
                ),
                Colour::Green,
                colour,
            ),
            Some(f) => paint(
                &format!(
                    "FAILED at {} (exit {}) after {}",
                    f.step.name(),
                    f.step.exit_code(),
                    format::elapsed(self.elapsed)
                ),
                Colour::Red,
                colour,
            ),
        }
    }

    /// The report for `--json`: `target`, `endpoint`, `user`, `passed`,
    /// `exit_code`, `failed_step` (its name or null), `elapsed_ms` and
    /// `steps` (each `step`, `outcome` = passed, failed or skipped,
    /// `duration_ms` (null when skipped), `detail`, `hint` or null).
    pub fn to_json(&self) -> serde_json::Value {
        let millis = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        let steps: Vec<serde_json::Value> = self
            .steps
            .iter()
            .map(|s| {
                serde_json::json!({
                    "step": s.step.name(),
                    "outcome": match s.outcome {
                        Outcome::Passed => "passed",
                        Outcome::Failed => "failed",
                        Outcome::Skipped => "skipped",
                    },
                    "duration_ms": (s.outcome != Outcome::Skipped).then(|| millis(s.duration)),
                    "detail": s.detail,
                    "hint": s.hint,
                })
            })
            .collect();
        serde_json::json!({
            "target": self.label,
            "endpoint": self.endpoint,
            "user": self.user,
            "passed": self.passed(),
            "exit_code": self.exit_code(),
            "failed_step": self.failure().map(|f| f.step.name()),
            "elapsed_ms": millis(self.elapsed),
            "steps": steps,
        })
    }

    /// Heading, every step and the closing line.
    pub fn render(&self, colour: bool) -> String {
        let mut out = self.header();
        out.push('\n');
        for step in &self.steps {
            out.push_str(&render_step(step, colour));
        }
        out.push_str(&self.footer(colour));
        out.push('\n');
        out
    }
}

/// One step as printed: `  ✓ tcp connect        0.3ms  127.0.0.1:22`,
/// and the hint under a failure.
pub fn render_step(step: &StepResult, colour: bool) -> String {
    let (mark, mark_colour) = match step.outcome {
        Outcome::Passed => ("✓", Colour::Green),
        Outcome::Failed => ("✗", Colour::Red),
        Outcome::Skipped => ("-", Colour::Dim),
    };
    let time = match step.outcome {
        Outcome::Skipped => String::new(),
        _ => format::elapsed(step.duration),
    };
    let mut out = format!(
        "  {} {:<16} {:>8}  {}\n",
        paint(mark, mark_colour, colour),
        step.step.name(),
        time,
        step.detail
    );
    if let Some(hint) = &step.hint {
        for (i, line) in hint.lines().enumerate() {
            let prefix = if i == 0 { "hint: " } else { "      " };
            let _ = writeln!(out, "      {}{line}", paint(prefix, Colour::Yellow, colour));
        }
    }
    out
}

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
}

/// The target for `NODE|ADDRESS`: a node of the config by name, else a
/// node one of whose addresses it is, else an address (`host`,
/// `host:port`, `[v6]:port` or a bare IPv6 address) with `[ssh]` defaults.
pub fn resolve_target(config: &Config, what: &str) -> Result<Target, String> {
    let node_target = |n: &crate::config::NodeConfig| Target {
        label: n.name.clone(),
        host: n.ssh_address().to_string(),
        port: n.ssh_port.unwrap_or(config.ssh.port),
        user: n
            .ssh_user
            .clone()
            .unwrap_or_else(|| config.ssh.user.clone()),
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
        host,
        port,
        user: config.ssh.user.clone(),
    })
}

fn split_host_port(what: &str) -> Result<(String, Option<u16>), String> {
    let bad_port = || format!("{what:?}: the port is not a number in 1..=65535");
    let parse_port = |p: &str| match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(bad_port()),
        Ok(p) => Ok(p),
    };
    if what.is_empty() {
        return Err("empty node name or address".into());
    }
    if let Some(rest) = what.strip_prefix('[') {
        let (inside, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("{what:?}: missing ]"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(parse_port(p)?),
            None if after.is_empty() => None,
            None => return Err(format!("{what:?}: expected [address]:port")),
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
        Some(_) => Err(format!(
            "{what:?}: an IPv6 address with a port is written [address]:port"
        )),
        None => Ok((what.to_string(), None)),
    }
}

/// Runs checks with one configuration's key, known_hosts and timeouts.
pub struct Checker {
    identity: Arc<Identity>,
    known_hosts: KnownHosts,
    policy: HostKeyPolicy,
    russh: Arc<client::Config>,
    connect_timeout: Duration,
    handshake_timeout: Duration,
    auth_timeout: Duration,
    channel_timeout: Duration,
    kubelet_host: String,
    kubelet_port: u16,
    tls: TlsConnector,
    /// The `--kubelet-ca` bundle the kubelet's certificate is verified
    /// against, if any.
    kubelet_ca: Option<std::path::PathBuf>,
}

impl Checker {
    /// A checker for `config` (loaded with its identity) probing the
    /// kubelet at `kubelet_host:kubelet_port` as seen from the node,
    /// verifying its certificate against `kubelet_ca` (PEM) if given.
    pub fn new(
        config: &Config,
        kubelet_host: &str,
        kubelet_port: u16,
        kubelet_ca: Option<&Path>,
    ) -> Result<Self, String> {
        let identity = config
            .identity
            .clone()
            .ok_or_else(|| "no identity loaded".to_string())?;
        let known_hosts = KnownHosts::load(&config.ssh.known_hosts).map_err(|e| e.to_string())?;
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
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?;
        let tls = match kubelet_ca {
            None => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Unverified(provider)))
                .with_no_client_auth(),
            Some(path) => builder
                .with_root_certificates(load_ca_bundle(path)?)
                .with_no_client_auth(),
        };
        Ok(Checker {
            identity,
            known_hosts,
            policy: config.ssh.host_key_policy,
            russh: Arc::new(russh),
            connect_timeout: config.ssh.connect_timeout,
            handshake_timeout: config.ssh.handshake_timeout,
            auth_timeout: config.ssh.auth_timeout,
            channel_timeout: config.ssh.channel_open_timeout,
            kubelet_host: kubelet_host.to_string(),
            kubelet_port,
            tls: TlsConnector::from(Arc::new(tls)),
            kubelet_ca: kubelet_ca.map(Path::to_path_buf),
        })
    }

    /// Check `target`; `progress` sees each step as it completes.
    pub async fn check(
        &self,
        target: &Target,
        progress: &mut (dyn FnMut(&StepResult) + Send),
    ) -> Report {
        let started = Instant::now();
        let mut run = Run {
            results: Vec::new(),
            progress,
        };
        let mut handle = None;
        self.steps(target, &mut run, &mut handle).await;
        if let Some(handle) = handle {
            let bye = handle.disconnect(russh::Disconnect::ByApplication, "check done", "en");
            let _ = tokio::time::timeout(Duration::from_secs(1), bye).await;
        }
        for step in Step::ALL.iter().skip(run.results.len()) {
            let skipped = StepResult {
                step: *step,
                outcome: Outcome::Skipped,
                duration: Duration::ZERO,
                detail: "skipped".into(),
                hint: None,
            };
            (run.progress)(&skipped);
            run.results.push(skipped);
        }
        Report {
            label: target.label.clone(),
            endpoint: format!("{}:{}", bracket(&target.host), target.port),
            user: target.user.clone(),
            steps: run.results,
            elapsed: started.elapsed(),
        }
    }

    /// Run the steps until one fails (its result recorded); the session
    /// handle, once there is one, is left in `handle` for the caller to
    /// close.
    async fn steps(
        &self,
        target: &Target,
        run: &mut Run<'_>,
        handle: &mut Option<Handle<Recorder>>,
    ) -> Option<()> {
        let addrs = run.step(Step::Resolve, self.resolve(target)).await?;
        let mut tcp = run
            .step(Step::TcpConnect, self.tcp_connect(target, &addrs))
            .await?;
        let replay = run
            .step(Step::Banner, self.banner(&mut tcp, target.port))
            .await?;
        let (session, key) = run
            .step(Step::KeyExchange, self.key_exchange(target, tcp, replay))
            .await?;
        *handle = Some(session);
        run.step(Step::HostKey, async { self.judge_host_key(target, key) })
            .await?;
        let session = handle.as_mut()?;
        run.step(
            Step::Authentication,
            self.authenticate(session, &target.user),
        )
        .await?;
        let channel = run
            .step(Step::DirectTcpip, self.open_kubelet(session))
            .await?;
        run.step(Step::KubeletHealthz, self.kubelet_healthz(channel))
            .await
    }

    /// Step 1: the SSH host's addresses.
    async fn resolve(&self, target: &Target) -> Result<(Vec<SocketAddr>, String), Failure> {
        if let Ok(ip) = target.host.parse::<IpAddr>() {
            let addrs = vec![SocketAddr::new(ip, target.port)];
            return Ok((addrs, format!("{ip} (IP address, no lookup)")));
        }
        let lookup = tokio::net::lookup_host((target.host.as_str(), target.port));
        let found: Vec<SocketAddr> = match tokio::time::timeout(self.connect_timeout, lookup).await
        {
            Err(_) => {
                return Err(Failure::new(
                    format!(
                        "{} did not resolve within {}",
                        target.host,
                        human(self.connect_timeout)
                    ),
                    RESOLVE_HINT,
                ))
            }
            Ok(Err(e)) => return Err(Failure::new(format!("{}: {e}", target.host), RESOLVE_HINT)),
            Ok(Ok(found)) => found.collect(),
        };
        if found.is_empty() {
            return Err(Failure::new(
                format!("{} resolved to no address", target.host),
                RESOLVE_HINT,
            ));
        }
        let shown: Vec<String> = found.iter().take(4).map(|a| a.ip().to_string()).collect();
        Ok((found, shown.join(", ")))
    }

    /// Step 2: a TCP connection to the first address that answers.
    async fn tcp_connect(
        &self,
        target: &Target,
        addrs: &[SocketAddr],
    ) -> Result<(TcpStream, String), Failure> {
        let deadline = tokio::time::Instant::now() + self.connect_timeout;
        let mut last: Option<(SocketAddr, std::io::Error)> = None;
        for addr in addrs {
            match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
                Ok(Ok(tcp)) => {
                    let _ = tcp.set_nodelay(true);
                    return Ok((tcp, addr.to_string()));
                }
                Ok(Err(e)) => last = Some((*addr, e)),
                Err(_) => break,
            }
        }
        Err(match last {
            Some((addr, e)) => connect_failure(addr, &e),
            None => Failure::new(
                format!(
                    "no answer from {}:{} within {}",
                    bracket(&target.host),
                    target.port,
                    human(self.connect_timeout)
                ),
                DROPPED_HINT,
            ),
        })
    }

    /// Step 3: the server's identification line; every byte read, to be
    /// replayed to the SSH client.
    async fn banner(&self, tcp: &mut TcpStream, port: u16) -> Result<(Vec<u8>, String), Failure> {
        let read = tokio::time::timeout(self.handshake_timeout, read_banner(tcp)).await;
        let (banner, replay) = match read {
            Err(_) => {
                return Err(Failure::new(
                    format!(
                        "no SSH identification within {}",
                        human(self.handshake_timeout)
                    ),
                    format!(
                        "port {port} accepted the connection but said nothing: it is not sshd \
                         (another service, a TLS port), or sshd is overloaded (LoginGraceTime, \
                         MaxStartups)"
                    ),
                ))
            }
            Ok(Err(BannerError::Closed)) => {
                return Err(Failure::new(
                    "the server closed the connection before identifying itself",
                    "sshd dropped the connection at once: MaxStartups reached, TCP wrappers \
                     (/etc/hosts.deny), a per-source connection limit, or a proxy in the way; \
                     see the node's sshd log (journalctl -u ssh)",
                ))
            }
            Ok(Err(BannerError::Io(e))) => {
                return Err(Failure::new(format!("reading failed: {e}"), None))
            }
            Ok(Err(BannerError::NotSsh(line))) => {
                return Err(Failure::new(
                    format!(
                        "answered {:?}, not an SSH identification",
                        format::truncate(&line, 80)
                    ),
                    format!(
                        "something other than sshd listens on port {port}; check the port \
                         (ssh.port, nodes[].ssh_port)"
                    ),
                ))
            }
            Ok(Ok(found)) => found,
        };
        if banner.starts_with("SSH-1.") && !banner.starts_with("SSH-1.99-") {
            return Err(Failure::new(
                banner,
                "the server speaks only SSH protocol 1, which nodetunnel (like any current \
                 client) refuses",
            ));
        }
        Ok((replay, banner))
    }

    /// Step 4: the key exchange over the connection whose first bytes
    /// (`replay`) were already read. Any host key is accepted here and
    /// returned for step 5.
    async fn key_exchange(
        &self,
        target: &Target,
        tcp: TcpStream,
        replay: Vec<u8>,
    ) -> Result<((Handle<Recorder>, Option<PublicKeyOrCertificate>), String), Failure> {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let transport = Replay {
            prefix: replay,
            pos: 0,
            inner: tcp,
        };
        // Offer first the host key algorithms known_hosts has for this node,
        // exactly as `serve` does.
        let russh = crate::session::config_for_host(
            &self.russh,
            &self.known_hosts,
            &target.host,
            target.port,
        )
        .map(Arc::new)
        .unwrap_or_else(|| self.russh.clone());
        let kex = client::connect_stream(russh, transport, Recorder(seen.clone()));
        let session = match tokio::time::timeout(self.handshake_timeout, kex).await {
            Err(_) => {
                return Err(Failure::new(
                    format!("not finished within {}", human(self.handshake_timeout)),
                    "the node or the network is very slow, or a middlebox stalls the \
                     connection; raise ssh.handshake_timeout if the node is just slow",
                ))
            }
            Ok(Err(e)) => {
                let hint = match &e {
                    russh::Error::NoCommonAlgo { kind, .. } => format!(
                        "no {kind:?} algorithm in common: compare with \
                         `sshd -T | grep -Ei '^(kexalgorithms|ciphers|macs|hostkeyalgorithms)'` \
                         on the node; nodetunnel offers kex {}; ciphers {}; host keys {}",
                        offered(self.russh.preferred.kex.iter().map(|n| n.as_ref())),
                        offered(self.russh.preferred.cipher.iter().map(|n| n.as_ref())),
                        offered(self.russh.preferred.key.iter().map(|k| k.as_str())),
                    ),
                    _ => "see the node's sshd log (journalctl -u ssh) for why it ended the key \
                          exchange"
                        .to_string(),
                };
                return Err(Failure::new(e.to_string(), hint));
            }
            Ok(Ok(session)) => session,
        };
        let (key, algorithms) = match seen.lock() {
            Ok(mut s) => (s.key.take(), s.algorithms.take()),
            Err(_) => (None, None),
        };
        let detail = algorithms.unwrap_or_else(|| "completed".into());
        Ok(((session, key), detail))
    }

    /// Step 6: public-key authentication with the configured identity.
    async fn authenticate(
        &self,
        session: &mut Handle<Recorder>,
        user: &str,
    ) -> Result<((), String), Failure> {
        let key_text = format!(
            "{} {} ({})",
            self.identity.algorithm(),
            self.identity.fingerprint(),
            self.identity.path.display()
        );
        let identity = self.identity.clone();
        let auth = async {
            let hash = if identity.key.algorithm().is_rsa() {
                session.best_supported_rsa_hash().await?.flatten()
            } else {
                None
            };
            let key = PrivateKeyWithHashAlg::new(identity.key.clone(), hash);
            session.authenticate_publickey(user, key).await
        };
        let remaining = match tokio::time::timeout(self.auth_timeout, auth).await {
            Err(_) => {
                return Err(Failure::new(
                    format!("no answer within {}", human(self.auth_timeout)),
                    "sshd may be slow to look up the user (UseDNS, LDAP/NSS); see its log",
                ))
            }
            Ok(Err(e)) => return Err(Failure::new(format!("failed: {e}"), None)),
            Ok(Ok(AuthResult::Success)) => return Ok(((), format!("{user} with {key_text}"))),
            Ok(Ok(AuthResult::Failure {
                remaining_methods, ..
            })) => remaining_methods,
        };
        let methods: Vec<String> = remaining
            .iter()
            .map(|m| String::from(<&str>::from(m)))
            .collect();
        let accepts = if methods.is_empty() {
            String::new()
        } else {
            format!(" (server accepts: {})", methods.join(", "))
        };
        let line = self
            .identity
            .public_key()
            .to_openssh()
            .map(|k| format!("{k} nodetunnel"))
            .unwrap_or_else(|_| "(cannot encode the public key)".into());
        Err(Failure::new(
            format!("{user} with key {key_text} was refused{accepts}"),
            format!(
                "add the public key to ~{user}/.ssh/authorized_keys on the node:\n  {line}\n\
                 if it is there, the node's sshd log says why it was refused (permissions of \
                 ~/.ssh, AllowUsers, PermitRootLogin)"
            ),
        ))
    }

    /// `host:port` of the kubelet as seen from the node.
    fn kubelet(&self) -> String {
        format!("{}:{}", bracket(&self.kubelet_host), self.kubelet_port)
    }

    /// Step 7: a direct-tcpip channel to the kubelet.
    async fn open_kubelet(
        &self,
        session: &Handle<Recorder>,
    ) -> Result<(Channel<client::Msg>, String), Failure> {
        let kubelet = self.kubelet();
        let open = session.channel_open_direct_tcpip(
            self.kubelet_host.clone(),
            u32::from(self.kubelet_port),
            "127.0.0.1",
            0,
        );
        match tokio::time::timeout(self.channel_timeout, open).await {
            Err(_) => Err(Failure::new(
                format!(
                    "the node did not confirm a channel to {kubelet} within {}",
                    human(self.channel_timeout)
                ),
                "the connect from the node to the kubelet hangs: a firewall on the node drops it?",
            )),
            Ok(Err(russh::Error::ChannelOpenFailure(reason))) => {
                Err(open_failure(&reason, &kubelet, self.kubelet_port))
            }
            Ok(Err(e)) => Err(Failure::new(format!("failed: {e}"), None)),
            Ok(Ok(channel)) => Ok((channel, format!("{kubelet} from the node"))),
        }
    }

    /// Step 8: `GET /healthz` over TLS through the channel.
    async fn kubelet_healthz(
        &self,
        channel: Channel<client::Msg>,
    ) -> Result<((), String), Failure> {
        let kubelet = self.kubelet();
        let server_name = ServerName::try_from(self.kubelet_host.clone()).map_err(|e| {
            Failure::new(
                format!("{:?} is not a TLS server name: {e}", self.kubelet_host),
                None,
            )
        })?;
        let probe = async {
            let tls = self
                .tls
                .connect(server_name, channel.into_stream())
                .await
                .map_err(|e| {
                    let certificate = e
                        .get_ref()
                        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                        .is_some_and(|tls| matches!(tls, rustls::Error::InvalidCertificate(_)));
                    let hint = match (&self.kubelet_ca, certificate) {
                        (Some(ca), true) => format!(
                            "the kubelet's certificate does not verify against {} for the name \
                             {:?}: kube-apiserver with --kubelet-certificate-authority would \
                             refuse it too. Check that the bundle is the kubelet's CA and that \
                             --kubelet-host is the address the apiserver uses for this node \
                             (its certificate must name it)",
                            ca.display(),
                            self.kubelet_host
                        ),
                        _ => format!(
                            "{kubelet} does not speak TLS: is it the kubelet's port \
                             (--kubelet-port, default 10250)?"
                        ),
                    };
                    Failure::new(format!("TLS handshake failed: {e}"), hint)
                })?;
            let version = match tls.get_ref().1.protocol_version() {
                Some(rustls::ProtocolVersion::TLSv1_3) => "TLS 1.3",
                Some(rustls::ProtocolVersion::TLSv1_2) => "TLS 1.2",
                _ => "TLS",
            };
            let answer = super::client::exchange(tls, Method::GET, "/healthz", &kubelet)
                .await
                .map_err(|e| {
                    Failure::new(
                        e,
                        "the kubelet closed the connection or answered something that is not HTTP",
                    )
                })?;
            Ok::<_, Failure>((version, answer))
        };
        let (version, (status, body)) =
            match tokio::time::timeout(self.channel_timeout, probe).await {
                Err(_) => {
                    return Err(Failure::new(
                        format!("no answer within {}", human(self.channel_timeout)),
                        format!(
                            "something accepts connections on {kubelet} but does not answer \
                             TLS/HTTP: is it the kubelet?"
                        ),
                    ))
                }
                Ok(result) => result?,
            };
        let text = String::from_utf8_lossy(&body);
        let excerpt = format::truncate(text.trim(), 60);
        let code = status.as_u16();
        let verified = match &self.kubelet_ca {
            None => "certificate not verified".to_string(),
            Some(ca) => format!("certificate verified against {}", ca.display()),
        };
        if status.is_success() {
            Ok((
                (),
                format!("HTTP {code} {excerpt:?} over {version} ({verified})"),
            ))
        } else if code == 401 || code == 403 {
            Ok((
                (),
                format!(
                    "HTTP {code} over {version}: the kubelet answers and wants the client \
                     certificate the apiserver presents ({verified})"
                ),
            ))
        } else {
            Err(Failure::new(
                format!("HTTP {code} {excerpt:?} over {version}"),
                "the kubelet is reachable but not healthy: see `journalctl -u kubelet` on the node",
            ))
        }
    }

    /// Step 5: judge the presented host key against known_hosts and the
    /// host key policy.
    fn judge_host_key(
        &self,
        target: &Target,
        key: Option<PublicKeyOrCertificate>,
    ) -> Result<((), String), Failure> {
        let Some(key) = key else {
            return Err(Failure::new("the server presented no host key", None));
        };
        let path = self.known_hosts.path().display().to_string();
        let name = lookup_name(&target.host, target.port);
        let (presented, plain): (String, Option<&PublicKey>) = match &key {
            PublicKeyOrCertificate::PublicKey { key, .. } => (
                format!("{} {}", key.algorithm().as_str(), fingerprint(key)),
                Some(key),
            ),
            PublicKeyOrCertificate::Certificate(cert) => (
                format!(
                    "certificate for key {} signed by CA {}",
                    cert.public_key().fingerprint(russh::keys::HashAlg::Sha256),
                    cert.signature_key()
                        .fingerprint(russh::keys::HashAlg::Sha256)
                ),
                None,
            ),
        };
        // The known_hosts line for the presented key, as serve would write it.
        let new_line = plain.and_then(|k| k.to_openssh().ok()).map(|text| {
            let mut parts = text.split_whitespace();
            let kind = parts.next().unwrap_or_default();
            let blob = parts.next().unwrap_or_default();
            format!("{name} {kind} {blob}")
        });
        let status = self.known_hosts.check(&target.host, target.port, &key);
        if self.policy == HostKeyPolicy::Insecure && !status.is_trusted() {
            return Ok((
                (),
                format!(
                    "{presented}: {status}; accepted only because \
                     ssh.host_key_policy = \"insecure\""
                ),
            ));
        }
        match status {
            HostKeyStatus::Trusted => Ok(((), format!("{presented}, trusted by {path}"))),
            HostKeyStatus::Unknown if self.policy == HostKeyPolicy::AcceptNew => Ok((
                (),
                format!(
                    "{presented} is not in {path}; serve records it at the first connection \
                     (host_key_policy = \"accept-new\")"
                ),
            )),
            HostKeyStatus::Unknown => {
                let mut hint = format!(
                    "check the fingerprint on the node's console \
                     (ssh-keygen -lf /etc/ssh/ssh_host_{}_key.pub), then add it to {path}",
                    key_file_kind(plain)
                );
                if let Some(line) = &new_line {
                    let _ = write!(hint, ":\n  {line}");
                }
                Err(Failure::new(
                    format!("{presented} is not in {path} ({name}; host_key_policy = \"strict\")"),
                    hint,
                ))
            }
            HostKeyStatus::Changed { expected } => {
                let mut hint = String::new();
                for k in &expected {
                    let place = if k.line == 0 {
                        format!("{} (learned at run time)", k.path.display())
                    } else {
                        format!("{}:{}", k.path.display(), k.line)
                    };
                    let _ = writeln!(
                        hint,
                        "known_hosts expects {} {} ({place}):\n  {}",
                        k.key_type, k.fingerprint, k.raw_line
                    );
                }
                hint.push_str(
                    "if the node was reinstalled, check the new fingerprint on its console \
                     and replace that line",
                );
                match &new_line {
                    Some(line) => {
                        let _ = write!(hint, " with:\n  {line}");
                    }
                    None => hint.push('.'),
                }
                hint.push_str(
                    "\notherwise someone may be intercepting the connection: do not trust it",
                );
                Err(Failure::new(
                    format!("HOST KEY MISMATCH for {name}: presented {presented}"),
                    hint,
                ))
            }
            HostKeyStatus::Revoked { line } => Err(Failure::new(
                format!("{presented} is revoked by {path}:{line}"),
                "the key was revoked on purpose (@revoked); the node needs a new host key",
            )),
        }
    }
}

/// A failed step: what went wrong and what to do about it.
#[derive(Debug)]
struct Failure {
    detail: String,
    hint: Option<String>,
}

impl Failure {
    fn new(detail: impl Into<String>, hint: impl Into<Hint>) -> Failure {
        Failure {
            detail: detail.into(),
            hint: hint.into().0,
        }
    }
}

/// An optional hint: a `&str`, a `String`, or `None`.
struct Hint(Option<String>);

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

/// The file name part of the node's host key for `ssh-keygen -lf`.
fn key_file_kind(key: Option<&PublicKey>) -> &'static str {
    match key.map(|k| k.algorithm().as_str().to_string()).as_deref() {
        Some("ssh-ed25519") => "ed25519",
        Some("ssh-rsa") => "rsa",
        Some(a) if a.starts_with("ecdsa") => "ecdsa",
        _ => "*",
    }
}

fn offered<'a>(names: impl Iterator<Item = &'a str>) -> String {
    names
        .filter(|n| !n.starts_with("ext-info") && !n.starts_with("kex-strict"))
        .collect::<Vec<_>>()
        .join(",")
}

fn human(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn connect_failure(addr: SocketAddr, e: &std::io::Error) -> Failure {
    use std::io::ErrorKind;
    let hint = match e.kind() {
        ErrorKind::ConnectionRefused => format!(
            "nothing listens on {addr}: is sshd running on the node, on this port \
             (ssh.port, nodes[].ssh_port)? A firewall may also reject it"
        ),
        ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => format!(
            "no route from this host to {}: check the address and the routing between the \
             control plane and the nodes",
            addr.ip()
        ),
        ErrorKind::TimedOut => DROPPED_HINT.to_string(),
        _ => "check the address and that the node is up".to_string(),
    };
    Failure::new(format!("{addr}: {e}"), hint)
}

fn open_failure(reason: &russh::ChannelOpenFailure, kubelet: &str, port: u16) -> Failure {
    match reason {
        russh::ChannelOpenFailure::AdministrativelyProhibited => Failure::new(
            format!("channel to {kubelet} administratively prohibited"),
            format!(
                "sshd forbids forwarding for this user: set AllowTcpForwarding yes (or local) \
                 and check DisableForwarding, PermitOpen, and authorized_keys options (restrict \
                 needs port-forwarding; permitopen must allow {kubelet})"
            ),
        ),
        russh::ChannelOpenFailure::ConnectFailed => Failure::new(
            format!("the node could not connect to {kubelet}"),
            format!(
                "nothing listens on {kubelet} as seen from the node: is the kubelet running \
                 (systemctl status kubelet)? If it listens only on the node's IP, use \
                 --kubelet-host <node IP>; another port: --kubelet-port (now {port})"
            ),
        ),
        russh::ChannelOpenFailure::ResourceShortage => Failure::new(
            format!("channel to {kubelet}: resource shortage"),
            "sshd refused another channel (MaxSessions?)",
        ),
        other => Failure::new(
            format!("channel to {kubelet} refused: {other:?}"),
            "see the node's sshd log",
        ),
    }
}

/// The results so far and the progress callback.
struct Run<'a> {
    results: Vec<StepResult>,
    progress: &'a mut (dyn FnMut(&StepResult) + Send),
}

impl Run<'_> {
    fn record(&mut self, result: StepResult) {
        (self.progress)(&result);
        self.results.push(result);
    }

    /// Time `work` as `step` and record how it went; its value on success.
    async fn step<T>(
        &mut self,
        step: Step,
        work: impl std::future::Future<Output = Result<(T, String), Failure>>,
    ) -> Option<T> {
        let started = Instant::now();
        let result = work.await;
        let duration = started.elapsed();
        match result {
            Ok((value, detail)) => {
                self.record(StepResult {
                    step,
                    outcome: Outcome::Passed,
                    duration,
                    detail,
                    hint: None,
                });
                Some(value)
            }
            Err(failure) => {
                self.record(StepResult {
                    step,
                    outcome: Outcome::Failed,
                    duration,
                    detail: failure.detail,
                    hint: failure.hint,
                });
                None
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum BannerError {
    #[error("closed")]
    Closed,
    #[error("{0}")]
    Io(std::io::Error),
    #[error("not ssh: {0}")]
    NotSsh(String),
}

/// Read up to and including the SSH identification line; the line
/// (printable characters only) and every byte read, for replay.
async fn read_banner(tcp: &mut TcpStream) -> Result<(String, Vec<u8>), BannerError> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let mut line_start = 0;
    let mut first_line: Option<String> = None;
    loop {
        let n = tcp.read(&mut chunk).await.map_err(BannerError::Io)?;
        if n == 0 {
            return Err(match first_line {
                Some(line) => BannerError::NotSsh(line),
                None => BannerError::Closed,
            });
        }
        buf.extend_from_slice(&chunk[..n]);
        while let Some(end) = buf[line_start..].iter().position(|b| *b == b'\n') {
            let line = &buf[line_start..line_start + end];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let text: String = String::from_utf8_lossy(line)
                .chars()
                .map(|c| if c.is_control() { '?' } else { c })
                .collect();
            if text.starts_with("SSH-") {
                return Ok((format::truncate(&text, 255), buf));
            }
            first_line.get_or_insert(text);
            line_start += end + 1;
        }
        if buf.len() > MAX_BANNER_BYTES {
            let line = first_line
                .unwrap_or_else(|| String::from_utf8_lossy(&buf[..80.min(buf.len())]).into_owned());
            return Err(BannerError::NotSsh(line));
        }
    }
}

/// A transport that first replays bytes already read from `inner`.
struct Replay<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.prefix.len() {
            let n = (this.prefix.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.prefix[this.pos..this.pos + n]);
            this.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// What the key exchange showed.
#[derive(Default)]
struct Seen {
    key: Option<PublicKeyOrCertificate>,
    algorithms: Option<String>,
}

/// A russh handler that accepts any host key and records it and the
/// negotiated algorithms (the host key step judges the key before anything
/// is sent to the server).
struct Recorder(Arc<Mutex<Seen>>);

impl client::Handler for Recorder {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let copy = match key {
            PublicKeyOrCertificate::PublicKey { key, hash_alg } => {
                PublicKeyOrCertificate::PublicKey {
                    key: key.clone(),
                    hash_alg: *hash_alg,
                }
            }
            PublicKeyOrCertificate::Certificate(cert) => {
                PublicKeyOrCertificate::Certificate(cert.clone())
            }
        };
        if let Ok(mut seen) = self.0.lock() {
            seen.key = Some(copy);
        }
        Ok(true)
    }

    async fn kex_done(
        &mut self,
        _shared_secret: Option<&[u8]>,
        names: &russh::Names,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        let mut text = format!(
            "kex {}, host key {}, cipher {}",
            names.kex.as_ref(),
            names.key.as_str(),
            names.cipher.as_ref()
        );
        if names.client_mac.as_ref() != "none" {
            let _ = write!(text, ", mac {}", names.client_mac.as_ref());
        }
        if let Ok(mut seen) = self.0.lock() {
            seen.algorithms.get_or_insert(text);
        }
        Ok(())
    }
}

/// Accepts any kubelet certificate (the signature over the handshake is
/// still verified), as kube-apiserver does without
/// `--kubelet-certificate-authority`.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

/// The certificates of a PEM bundle as trust anchors; errors name the file.
fn load_ca_bundle(path: &Path) -> Result<rustls::RootCertStore, String> {
    let pem = std::fs::read(path).map_err(|e| format!("--kubelet-ca {}: {e}", path.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert =
            cert.map_err(|e| format!("--kubelet-ca {}: invalid PEM: {e}", path.display()))?;
        roots.add(cert).map_err(|e| {
            format!(
                "--kubelet-ca {}: unusable CA certificate: {e}",
                path.display()
            )
        })?;
    }
    if roots.is_empty() {
        return Err(format!(
            "--kubelet-ca {}: no CERTIFICATE found",
            path.display()
        ));
    }
    Ok(roots)
}

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
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
    /// Kubelet host as seen from the node.
    pub kubelet_host: String,
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
        &options.kubelet_host,
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

/// `--all` output: every failed node step by step, then the summary table
/// (failures first) and a count.
pub fn render_all(reports: &[Report], colour: bool) -> String {
    let mut out = String::new();
    for r in reports.iter().filter(|r| !r.passed()) {
        out.push_str(&r.render(colour));
        out.push('\n');
    }
    let mut sorted: Vec<&Report> = reports.iter().collect();
    sorted.sort_by_key(|r| (r.passed(), r.label.clone()));
    let mut rows = vec![vec![
        "NODE".to_string(),
        "RESULT".to_string(),
        "FAILED STEP".to_string(),
        "TIME".to_string(),
        "DETAIL".to_string(),
    ]];
    for r in &sorted {
        let (result, step, detail) = match r.failure() {
            None => ("ok".to_string(), "-".to_string(), String::new()),
            Some(f) => (
                "FAILED".to_string(),
                f.step.name().to_string(),
                format::truncate(&f.detail, 100),
            ),
        };
        rows.push(vec![
            r.label.clone(),
            result,
            step,
            format::elapsed(r.elapsed),
            detail,
        ]);
    }
    out.push_str(&format::columns(&rows, |row, c, text| {
        if row == 0 {
            paint(text, Colour::Bold, colour)
        } else if c == 1 {
            let c = if text.trim() == "ok" {
                Colour::Green
            } else {
                Colour::Red
            };
            paint(text, c, colour)
        } else {
            text.to_string()
        }
    }));
    let passed = reports.iter().filter(|r| r.passed()).count();
    let line = format!("{passed}/{} nodes passed every step", reports.len());
    let c = if passed == reports.len() {
        Colour::Green
    } else {
        Colour::Red
    };
    out.push_str(&paint(&line, c, colour));
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::parse_str(
            r#"
[ssh]
user = "core"
port = 2222

[[nodes]]
name = "node-a"
addresses = ["10.240.0.11", "node-a.internal"]

[[nodes]]
name = "node-b"
addresses = ["10.240.0.12"]
ssh_port = 22
ssh_user = "root"
"#,
            Path::new("/etc/nodetunnel/nodetunnel.toml"),
        )
        .unwrap()
    }

    #[test]
    fn targets_by_name_by_node_address_and_by_address() {
        let c = config();
        let a = resolve_target(&c, "node-a").unwrap();
        assert_eq!(
            (a.label.as_str(), a.host.as_str(), a.port, a.user.as_str()),
            ("node-a", "10.240.0.11", 2222, "core")
        );
        let b = resolve_target(&c, "10.240.0.12").unwrap();
        assert_eq!((b.port, b.user.as_str()), (22, "root"));
        assert_eq!(b.label, "10.240.0.12 (node node-b)");
        let by_name = resolve_target(&c, "node-a.internal").unwrap();
        assert_eq!(by_name.host, "node-a.internal");
        let other = resolve_target(&c, "192.0.2.7:2200").unwrap();
        assert_eq!(
            (
                other.label.as_str(),
                other.host.as_str(),
                other.port,
                other.user.as_str()
            ),
            ("192.0.2.7:2200", "192.0.2.7", 2200, "core")
        );
        let v6 = resolve_target(&c, "[fd00::1]:22").unwrap();
        assert_eq!(
            (v6.host.as_str(), v6.port, v6.label.as_str()),
            ("fd00::1", 22, "[fd00::1]:22")
        );
        let bare_v6 = resolve_target(&c, "fd00::2").unwrap();
        assert_eq!((bare_v6.host.as_str(), bare_v6.port), ("fd00::2", 2222));
        assert!(resolve_target(&c, "host:0").is_err());
        assert!(resolve_target(&c, "").is_err());
    }

    #[test]
    fn exit_codes_name_the_step() {
        let codes: Vec<u8> = Step::ALL.iter().map(|s| s.exit_code()).collect();
        assert_eq!(codes, [3, 4, 5, 6, 7, 8, 9, 10]);
    }

    fn report(label: &str, failed: Option<Step>) -> Report {
        let mut steps = Vec::new();
        let mut after_failure = false;
        for s in Step::ALL {
            let outcome = if after_failure {
                Outcome::Skipped
            } else if Some(s) == failed {
                after_failure = true;
                Outcome::Failed
            } else {
                Outcome::Passed
            };
            steps.push(StepResult {
                step: s,
                outcome,
                duration: Duration::from_micros(300),
                detail: if outcome == Outcome::Failed {
                    "it broke".into()
                } else {
                    "fine".into()
                },
                hint: (outcome == Outcome::Failed).then(|| "do this\nthen that".into()),
            });
        }
        Report {
            label: label.into(),
            endpoint: "10.0.0.1:22".into(),
            user: "root".into(),
            steps,
            elapsed: Duration::from_millis(12),
        }
    }

    #[test]
    fn a_report_marks_steps_and_hints() {
        let r = report("node-a", Some(Step::HostKey));
        assert_eq!(r.exit_code(), 7);
        let text = r.render(false);
        assert!(
            text.starts_with("nodetunnel check node-a: 10.0.0.1:22 as root\n"),
            "{text}"
        );
        assert!(
            text.contains("  ✓ key exchange       0.30ms  fine\n"),
            "{text}"
        );
        let failed =
            "  ✗ host key           0.30ms  it broke\n      hint: do this\n            then that\n";
        assert!(text.contains(failed), "{text}");
        assert!(
            text.contains("  - authentication              skipped")
                || text.contains("  - authentication"),
            "{text}"
        );
        assert!(
            text.ends_with("FAILED at host key (exit 7) after 12.0ms\n"),
            "{text}"
        );
        assert_eq!(report("x", None).exit_code(), 0);
    }

    #[test]
    fn the_all_summary_lists_failures_first() {
        let reports = vec![
            report("node-a", None),
            report("node-b", Some(Step::TcpConnect)),
        ];
        let text = render_all(&reports, false);
        let table_start = text.find("NODE").unwrap();
        let table = &text[table_start..];
        let lines: Vec<&str> = table.lines().collect();
        assert!(
            lines[1].starts_with("node-b  FAILED  tcp connect"),
            "{table}"
        );
        assert!(lines[2].starts_with("node-a  ok"), "{table}");
        assert_eq!(lines[3], "1/2 nodes passed every step");
        // The failed node is shown step by step before the table.
        assert!(
            text[..table_start].contains("nodetunnel check node-b"),
            "{text}"
        );
        assert!(
            !text[..table_start].contains("nodetunnel check node-a"),
            "{text}"
        );
    }
}
