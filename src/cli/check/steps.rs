//! The walk: the steps in order, each timed and bounded, stopping at the
//! first failure; the [`Checker`] that holds what every step needs.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use russh::client::{self, Handle};
use tokio_rustls::TlsConnector;

use super::probes::Recorder;
use super::report::{Outcome, Report, StepResult};
use super::Target;
use crate::config::{Config, HostKeyPolicy};
use crate::keys::Identity;
use crate::known_hosts::KnownHosts;
use crate::session::bracket;

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

/// Runs checks with one configuration's key, known_hosts and timeouts.
pub struct Checker {
    pub(super) identity: Arc<Identity>,
    pub(super) known_hosts: KnownHosts,
    pub(super) policy: HostKeyPolicy,
    pub(super) russh: Arc<client::Config>,
    pub(super) connect_timeout: Duration,
    pub(super) handshake_timeout: Duration,
    pub(super) auth_timeout: Duration,
    pub(super) channel_timeout: Duration,
    pub(super) kubelet_host: String,
    pub(super) kubelet_port: u16,
    pub(super) tls: TlsConnector,
    /// The `--kubelet-ca` bundle the kubelet's certificate is verified
    /// against, if any.
    pub(super) kubelet_ca: Option<std::path::PathBuf>,
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
        let tls = super::kubelet_tls::connector(kubelet_ca)?;
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
            tls,
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
}

/// A failed step: what went wrong and what to do about it.
#[derive(Debug)]
pub(super) struct Failure {
    pub(super) detail: String,
    pub(super) hint: Option<String>,
}

impl Failure {
    pub(super) fn new(detail: impl Into<String>, hint: impl Into<Hint>) -> Failure {
        Failure {
            detail: detail.into(),
            hint: hint.into().0,
        }
    }
}

/// An optional hint: a `&str`, a `String`, or `None`.
pub(super) struct Hint(Option<String>);

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

pub(super) fn human(d: Duration) -> String {
    humantime::format_duration(d).to_string()
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
