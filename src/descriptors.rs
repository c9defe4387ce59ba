//! The process's file descriptor limit: at start the soft `RLIMIT_NOFILE`
//! is raised to the hard limit, since every SSH session and every client
//! connection holds a descriptor and the default soft limit (often 1024)
//! is far below what a few thousand nodes need.
//!
//! Running out anyway is classified as a local failure where it happens
//! ([`ConnectError::LocalResources`](crate::session::ConnectError::LocalResources)),
//! never as a node's refusal, and at the listeners' `accept`
//! ([`AcceptFailures`]: counted, logged once per burst, retried after
//! [`ACCEPT_ERROR_BACKOFF`] instead of spinning).
//!
//! The module also checks that the configuration fits the limit
//! ([`DescriptorWatch`]): what it needs ([`DescriptorBudget`]: nodes x
//! `ssh.sessions_per_node`, the client connections the front door and the
//! admin API may hold, their listeners and a margin) against the soft
//! limit, at start and at every inventory change, saying so once when it
//! stops fitting (the log, `nodetunnel_descriptors_needed` /
//! `nodetunnel_descriptors_limit`, `nodetunnel status`).

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// The soft and hard descriptor limits, before and after [`raise_soft_limit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Raised {
    /// The soft limit found at start (`None`: unlimited).
    pub before: Option<u64>,
    /// The soft limit now.
    pub now: Option<u64>,
    /// The hard limit.
    pub hard: Option<u64>,
}

/// Raise the soft `RLIMIT_NOFILE` to the hard limit, and log what it is.
/// A refusal (a sandbox forbidding it) is logged and leaves the limit as
/// it was.
pub fn raise_soft_limit() -> Raised {
    let limit = getrlimit(Resource::Nofile);
    let mut raised = Raised {
        before: limit.current,
        now: limit.current,
        hard: limit.maximum,
    };
    if limit.current != limit.maximum {
        let wanted = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, wanted) {
            Ok(()) => raised.now = getrlimit(Resource::Nofile).current,
            Err(error) => tracing::warn!(
                soft = ?limit.current,
                hard = ?limit.maximum,
                %error,
                "cannot raise the soft file descriptor limit to the hard limit"
            ),
        }
    }
    tracing::info!(
        before = ?raised.before,
        soft = ?raised.now,
        hard = ?raised.hard,
        "file descriptor limit (each SSH session and client connection takes one; \
         raise it with systemd LimitNOFILE= or the container's nofile ulimit)"
    );
    raised
}

/// The soft `RLIMIT_NOFILE` now (`None`: unlimited).
pub fn soft_limit() -> Option<u64> {
    getrlimit(Resource::Nofile).current
}

/// Descriptors kept for what the configuration does not size: standard
/// streams, the runtime's epoll and wake-up descriptors, the inventory
/// (the Kubernetes API connections or the watched file), files re-read at
/// run time (keys, known_hosts, certificates, the config) and log files.
pub const DESCRIPTOR_MARGIN: u64 = 64;

/// What the configuration holds open besides the node sessions, from the
/// configuration file: built by `From<&Config> for ManagerConfig`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DescriptorBudget {
    /// `ssh.sessions_per_node`: one TCP socket each.
    pub sessions_per_node: u64,
    /// Client connections the front door and the admin API hold at most:
    /// one socket each (a tunnel is a channel inside a node's session and
    /// holds none; TLS runs on the client's socket): `proxy.max_connections`
    /// plus the overflow connections accepted only to be refused
    /// ([`OVERFLOW_CONNECTIONS`](crate::proxy::OVERFLOW_CONNECTIONS)), plus
    /// the admin API's connections and probe reserve.
    pub connections: u64,
    /// Listening sockets (front door and admin API).
    pub listeners: u64,
    /// [`DESCRIPTOR_MARGIN`].
    pub margin: u64,
}

impl Default for DescriptorBudget {
    /// One session per node, no front door, no admin API.
    fn default() -> Self {
        DescriptorBudget {
            sessions_per_node: 1,
            connections: 0,
            listeners: 0,
            margin: DESCRIPTOR_MARGIN,
        }
    }
}

impl DescriptorBudget {
    /// The budget of `sessions_per_node`, `connections` client
    /// connections at most (the front door's with its overflow, the admin
    /// API's) and `listeners` listening sockets in all.
    pub fn new(sessions_per_node: usize, connections: usize, listeners: usize) -> Self {
        DescriptorBudget {
            sessions_per_node: sessions_per_node as u64,
            connections: connections as u64,
            listeners: listeners as u64,
            margin: DESCRIPTOR_MARGIN,
        }
    }

    /// Descriptors needed with `nodes` nodes (each with
    /// `sessions_per_node` sessions).
    pub fn needed(&self, nodes: usize) -> u64 {
        (nodes as u64)
            .saturating_mul(self.sessions_per_node)
            .saturating_add(self.connections)
            .saturating_add(self.listeners)
            .saturating_add(self.margin)
    }
}

/// What the configuration needs against the limit, at one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DescriptorFit {
    /// Nodes counted (tunnels, with those still draining).
    pub nodes: usize,
    /// Descriptors needed ([`DescriptorBudget::needed`]).
    pub needed: u64,
    /// The soft limit (`None`: unlimited).
    pub limit: Option<u64>,
}

impl DescriptorFit {
    /// The configuration fits under the limit.
    pub fn fits(&self) -> bool {
        self.limit.is_none_or(|limit| self.needed <= limit)
    }

    /// A limit to set that fits with a quarter of headroom, rounded up to
    /// a multiple of 1024.
    pub fn suggested_limit(&self) -> u64 {
        let with_headroom = self.needed.saturating_add(self.needed / 4);
        with_headroom.div_ceil(1024).saturating_mul(1024)
    }
}

/// A change of [`DescriptorWatch`]'s verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FitChange {
    /// It fitted (or this is the first check) and no longer does.
    NoLongerFits,
    /// It did not fit and now does.
    FitsAgain,
}

/// Checks the configuration's needs against the descriptor limit at start
/// and at every inventory change, and reports a change of verdict once:
/// a warning when the configuration stops fitting (with the fix), a note
/// when it fits again, never the same verdict twice in a row.
#[derive(Debug)]
pub struct DescriptorWatch {
    budget: DescriptorBudget,
    last: std::sync::Mutex<Option<DescriptorFit>>,
}

impl DescriptorWatch {
    /// A watch that has checked nothing yet (its first check counts as a
    /// change only when it does not fit).
    pub fn new(budget: DescriptorBudget) -> Self {
        DescriptorWatch {
            budget,
            last: std::sync::Mutex::new(None),
        }
    }

    /// The budget checked against.
    pub fn budget(&self) -> DescriptorBudget {
        self.budget
    }

    /// The last check, if any.
    pub fn last(&self) -> Option<DescriptorFit> {
        self.last
            .lock()
            .map(|l| *l)
            .unwrap_or_else(|p| *p.into_inner())
    }

    /// Check `nodes` nodes against `limit`: the fit, and the change of
    /// verdict since the previous check, if any.
    pub fn check(&self, nodes: usize, limit: Option<u64>) -> (DescriptorFit, Option<FitChange>) {
        let fit = DescriptorFit {
            nodes,
            needed: self.budget.needed(nodes),
            limit,
        };
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let fitted = last.as_ref().is_none_or(DescriptorFit::fits);
        *last = Some(fit);
        let change = match (fitted, fit.fits()) {
            (true, false) => Some(FitChange::NoLongerFits),
            (false, true) => Some(FitChange::FitsAgain),
            _ => None,
        };
        (fit, change)
    }

    /// [`check`](Self::check) against the soft limit now, logging a change
    /// of verdict (see the type's docs) and returning the fit.
    pub fn check_and_report(&self, nodes: usize) -> DescriptorFit {
        let (fit, change) = self.check(nodes, soft_limit());
        report(&self.budget, &fit, change);
        fit
    }
}

/// Log a change of verdict.
fn report(budget: &DescriptorBudget, fit: &DescriptorFit, change: Option<FitChange>) {
    match change {
        Some(FitChange::NoLongerFits) => {
            let suggested = fit.suggested_limit();
            tracing::warn!(
                needed = fit.needed,
                limit = ?fit.limit,
                nodes = fit.nodes,
                sessions_per_node = budget.sessions_per_node,
                connections = budget.connections,
                listeners = budget.listeners,
                margin = budget.margin,
                "the file descriptor limit is too low for this configuration: {} needed \
                 ({} nodes x {} sessions + {} client connections + {} listeners + {} spare), \
                 limit {}; sessions or connections beyond it fail with local_resources. \
                 Raise it: systemd LimitNOFILE={suggested}, docker/podman \
                 --ulimit nofile={suggested}:{suggested}, compose ulimits: nofile: {suggested} \
                 (or lower proxy.max_connections / ssh.sessions_per_node)",
                fit.needed,
                fit.nodes,
                budget.sessions_per_node,
                budget.connections,
                budget.listeners,
                budget.margin,
                fit.limit.map_or("unlimited".to_string(), |l| l.to_string()),
            );
        }
        Some(FitChange::FitsAgain) => tracing::info!(
            needed = fit.needed,
            limit = ?fit.limit,
            nodes = fit.nodes,
            "the configuration fits the file descriptor limit again"
        ),
        None => {}
    }
}

/// `error` is the process (`EMFILE`) or the system (`ENFILE`) out of file
/// descriptors: a local resource failure, never the peer's doing.
pub fn is_out_of_descriptors(error: &std::io::Error) -> bool {
    [rustix::io::Errno::MFILE, rustix::io::Errno::NFILE]
        .iter()
        .any(|errno| error.raw_os_error() == Some(errno.raw_os_error()))
}

/// Pause after a failed `accept` before the next one, so that a
/// persistent failure (out of descriptors: the pending connection stays
/// in the backlog and accept fails again at once) does not spin a core.
pub const ACCEPT_ERROR_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);

/// The failed accepts of one listener since its last successful one: every
/// failure is counted (`nodetunnel_accept_failures_total{listener,reason}`),
/// only the first of a burst is logged, and the first success after a
/// burst says how many there were.
#[derive(Debug)]
pub struct AcceptFailures {
    listener: &'static str,
    in_burst: u64,
}

impl AcceptFailures {
    /// No failure yet on `listener` (one of
    /// [`ACCEPT_LISTENERS`](crate::metrics::ACCEPT_LISTENERS)).
    pub fn new(listener: &'static str) -> Self {
        AcceptFailures {
            listener,
            in_burst: 0,
        }
    }

    /// Failures since the last successful accept.
    pub fn in_burst(&self) -> u64 {
        self.in_burst
    }

    /// Count a failed accept, and log it when it starts a burst; the
    /// caller then waits [`ACCEPT_ERROR_BACKOFF`]. Returns whether it was
    /// logged.
    pub fn failed(&mut self, error: &std::io::Error, metrics: &crate::metrics::Metrics) -> bool {
        let local = is_out_of_descriptors(error);
        let reason = crate::metrics::ACCEPT_FAILURE_REASONS[usize::from(!local)];
        metrics.accept_failure(self.listener, reason);
        self.in_burst += 1;
        if self.in_burst > 1 {
            return false;
        }
        if local {
            tracing::error!(
                listener = self.listener,
                reason,
                %error,
                limit = ?soft_limit(),
                "accept failed: out of file descriptors (a local resource failure: \
                 raise LimitNOFILE= / the container's nofile ulimit, or lower \
                 proxy.max_connections); retrying every {}ms, logged once per burst",
                ACCEPT_ERROR_BACKOFF.as_millis()
            );
        } else {
            tracing::warn!(
                listener = self.listener,
                reason,
                %error,
                "accept failed; retrying every {}ms, logged once per burst",
                ACCEPT_ERROR_BACKOFF.as_millis()
            );
        }
        true
    }

    /// A successful accept: ends a burst (logging its size). Returns the
    /// burst's failures (0: there was none).
    pub fn succeeded(&mut self) -> u64 {
        let burst = std::mem::take(&mut self.in_burst);
        if burst > 0 {
            tracing::info!(
                listener = self.listener,
                failures = burst,
                "accepting again after failed accepts"
            );
        }
        burst
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_ends_at_the_hard_limit() {
        // Start below the hard limit (lowering the soft limit needs no
        // privilege; one below keeps the other tests' descriptors).
        let limit = getrlimit(Resource::Nofile);
        if let Some(hard) = limit.maximum {
            let lower = Rlimit {
                current: Some(hard - 1),
                maximum: Some(hard),
            };
            setrlimit(Resource::Nofile, lower).expect("lower the soft limit");
        }
        let raised = raise_soft_limit();
        if let Some(hard) = limit.maximum {
            assert_eq!(raised.before, Some(hard - 1), "{raised:?}");
        }
        assert_eq!(raised.now, raised.hard, "{raised:?}");
        assert_eq!(getrlimit(Resource::Nofile).current, raised.hard);
    }

    #[test]
    fn the_need_adds_sessions_connections_listeners_and_the_margin() {
        // 5,000 nodes x 2 sessions, a front door of 10,000 connections on
        // two listeners, the admin API on one.
        let budget = DescriptorBudget::new(2, 10_000 + 256 + 72, 3);
        assert_eq!(budget.sessions_per_node, 2);
        assert_eq!(budget.connections, 10_328);
        assert_eq!(budget.listeners, 3);
        assert_eq!(
            budget.needed(5_000),
            10_000 + 10_000 + 256 + 72 + 3 + DESCRIPTOR_MARGIN
        );
        // No front door, no admin API: no client connections.
        let budget = DescriptorBudget::new(1, 0, 0);
        assert_eq!(budget.needed(20_000), 20_000 + DESCRIPTOR_MARGIN);
        // Never overflows.
        let budget = DescriptorBudget::new(usize::MAX, usize::MAX, 0);
        assert_eq!(budget.needed(usize::MAX), u64::MAX);
    }

    #[test]
    fn the_issue_s_20000_nodes_do_not_fit_a_limit_of_20000() {
        let budget = DescriptorBudget::new(1, 10_000 + 256 + 72, 2);
        let watch = DescriptorWatch::new(budget);
        let (fit, change) = watch.check(20_000, Some(20_000));
        assert!(!fit.fits(), "{fit:?}");
        assert_eq!(change, Some(FitChange::NoLongerFits));
        assert!(fit.suggested_limit() >= fit.needed + fit.needed / 4);
        assert_eq!(fit.suggested_limit() % 1024, 0);
        // Unlimited always fits.
        let (fit, _) = watch.check(20_000, None);
        assert!(fit.fits());
    }

    #[test]
    fn a_verdict_is_reported_once_per_transition() {
        let budget = DescriptorBudget::new(1, 0, 0);
        let watch = DescriptorWatch::new(budget);
        let limit = Some(100 + DESCRIPTOR_MARGIN);
        // The first check reports only a configuration that does not fit.
        assert_eq!(watch.check(10, limit).1, None);
        assert_eq!(watch.check(100, limit).1, None, "exactly at the limit fits");
        assert_eq!(watch.check(101, limit).1, Some(FitChange::NoLongerFits));
        // Growing further, or shrinking but still too big: said already.
        assert_eq!(watch.check(500, limit).1, None);
        assert_eq!(watch.check(200, limit).1, None);
        assert_eq!(watch.check(50, limit).1, Some(FitChange::FitsAgain));
        assert_eq!(watch.check(60, limit).1, None);
        assert_eq!(watch.check(101, limit).1, Some(FitChange::NoLongerFits));
        assert_eq!(watch.last().map(|f| f.nodes), Some(101));

        let fresh = DescriptorWatch::new(budget);
        assert_eq!(fresh.last(), None);
        assert_eq!(fresh.check(101, limit).1, Some(FitChange::NoLongerFits));
    }

    #[test]
    fn emfile_and_enfile_are_out_of_descriptors_and_refused_is_not() {
        for errno in [rustix::io::Errno::MFILE, rustix::io::Errno::NFILE] {
            let error = std::io::Error::from_raw_os_error(errno.raw_os_error());
            assert!(is_out_of_descriptors(&error), "{error}");
        }
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(!is_out_of_descriptors(&refused));
    }

    #[test]
    fn accept_failures_are_all_counted_and_logged_once_per_burst() {
        let metrics = crate::metrics::Metrics::new();
        let emfile = std::io::Error::from_raw_os_error(rustix::io::Errno::MFILE.raw_os_error());
        let other = std::io::Error::from(std::io::ErrorKind::ConnectionAborted);
        let mut failures = AcceptFailures::new("socks5");
        assert!(failures.failed(&emfile, &metrics), "the first is logged");
        assert!(!failures.failed(&emfile, &metrics));
        assert!(!failures.failed(&other, &metrics));
        assert_eq!(failures.in_burst(), 3);
        assert_eq!(failures.succeeded(), 3);
        assert_eq!(failures.succeeded(), 0);
        assert!(failures.failed(&emfile, &metrics), "a new burst is logged");
        let count = |reason: &str| {
            metrics
                .accept_failures
                .get_or_create(&crate::metrics::ListenerReasonLabel {
                    listener: "socks5".into(),
                    reason: reason.into(),
                })
                .get()
        };
        assert_eq!(count("local_resources"), 3);
        assert_eq!(count("other"), 1);
    }
}
