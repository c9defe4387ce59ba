//! The walk: the steps in order, each timed and bounded, stopping at the
//! first failure ([`Checker::check`]).

use std::time::{Duration, Instant};

use russh::client::Handle;

use super::probes::Recorder;
use super::report::{Outcome, Report, StepResult};
use super::{Checker, Failure, Target};
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

impl Checker {
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
            .step(Step::DirectTcpip, self.open_kubelet(session, target))
            .await?;
        run.step(Step::KubeletHealthz, self.kubelet_healthz(channel, target))
            .await
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
