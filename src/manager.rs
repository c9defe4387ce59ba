//! The tunnel manager: every node's [`Tunnel`], kept in a `DashMap` by node
//! name, changed at run time with [`TunnelManager::apply`], and the
//! [`Dialer`] the front door uses.
//!
//! The manager owns what tunnels share: session settings (identity and
//! known_hosts, both reloadable), the global limit on handshakes in flight,
//! stream buffer bounds and the metrics registry.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use dashmap::DashMap;
use rand::RngExt;
use tokio::sync::Semaphore;

use crate::client_certificate::{CertificateSlot, ClientCertificate};
use crate::descriptors::{DescriptorBudget, DescriptorFit, DescriptorWatch};
use crate::dial::{Destination, DialError, Dialer, NodeDownCause};
use crate::inventory::NodeSink;
use crate::keys::Identity;
use crate::known_hosts::KnownHosts;
use crate::metrics::Metrics;
use crate::node::NodeConfig;
use crate::reconnect::Prober;
use crate::router::{Conflict, Route, RouteNode, Router, RoutingConfig};
use crate::session::{self, SessionSettings};
use crate::ssh_config::{HostKeyPolicy, SshConfig};
use crate::stream::{StreamLimits, TunnelStream};
use crate::tunnel::{Tunnel, TunnelContext};
use crate::tunnel_status::{TunnelState, TunnelStatus};

// The sink's answer, at the path it always had.
pub use crate::inventory::ApplySummary;

/// Why the manager could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// The config was loaded without its identity.
    #[error("no identity loaded (use Config::load)")]
    NoIdentity,
    /// known_hosts could not be read.
    #[error("known_hosts: {0}")]
    KnownHosts(String),
}

/// Why [`TunnelManager::wait_ready`] returned without the node Ready.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WaitReadyError {
    /// The manager has no tunnel for this node name.
    #[error("no node named {node:?}")]
    UnknownNode {
        /// The name asked for.
        node: String,
    },
    /// The node's handshake failed and it went to backoff: the tunnel's
    /// last error as its status shows it ("connection failed" if none was
    /// recorded).
    #[error("{last_error}")]
    Failed {
        /// The tunnel status's `last_error` text.
        last_error: String,
    },
    /// The node was neither Ready nor failed when the wait ran out.
    #[error("not ready after {}", humantime::format_duration(*.waited))]
    Timeout {
        /// How long the caller waited.
        waited: Duration,
    },
}

/// Why [`TunnelManager::reload_identity`] or
/// [`TunnelManager::reload_known_hosts`] kept the running value.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The identity key could not be loaded.
    #[error(transparent)]
    Identity(#[from] crate::keys::KeyError),
    /// known_hosts could not be read.
    #[error(transparent)]
    KnownHosts(#[from] crate::known_hosts::KnownHostsError),
    /// The certificate file was refused (the previous one stays in use).
    #[error(transparent)]
    Certificate(#[from] crate::client_certificate::CertificateError),
}

/// What the manager takes from the configuration file: the `[ssh]` table,
/// the loaded identity and the bound on one dial. `From<&Config>` (in
/// [`crate::config`], which assembles the file) builds it, so the manager
/// does not depend on the whole file.
#[derive(Clone, Debug)]
pub struct ManagerConfig<'a> {
    /// The `[ssh]` table.
    pub ssh: &'a SshConfig,
    /// The identity key, loaded (`None` is refused with
    /// [`ManagerError::NoIdentity`]).
    pub identity: Option<Arc<Identity>>,
    /// The loaded `ssh.certificate`, if any (the manager re-reads
    /// `ssh.certificate` itself on [`TunnelManager::reload_certificate`]).
    pub client_certificate: Option<Arc<ClientCertificate>>,
    /// Bound on one dial (route, stream open): `proxy.dial_timeout`, else
    /// `ssh.channel_open_timeout`.
    pub dial_timeout: Duration,
    /// What the configuration holds open besides the node sessions
    /// (`proxy.max_connections`, the listeners): checked against the file
    /// descriptor limit at start and at every inventory change.
    pub descriptors: DescriptorBudget,
}

/// Log, once per certificate loaded, that none of its principals is the
/// login user (see [`crate::client_certificate::principal_warning`]).
pub(crate) fn warn_about_principals(certificate: &ClientCertificate, user: &str) {
    if let Some(warning) =
        crate::client_certificate::principal_warning(&certificate.certificate, user)
    {
        tracing::warn!(
            key_id = certificate.key_id(),
            serial = certificate.serial(),
            principals = %certificate.principals().join(","),
            user,
            "{warning}"
        );
    }
}

/// All tunnels. See the module docs.
pub struct TunnelManager {
    ctx: Arc<TunnelContext>,
    /// `ssh.certificate`, re-read by [`TunnelManager::reload_certificate`].
    certificate_path: Option<std::path::PathBuf>,
    tunnels: DashMap<Arc<str>, Arc<Tunnel>>,
    /// Removed or replaced tunnels still draining: shown in status until
    /// they are closed, never dialled.
    retiring: Arc<std::sync::Mutex<Vec<Arc<Tunnel>>>>,
    /// Every tunnel, for random sampling (rebuilt by apply).
    sample: RwLock<Arc<Vec<Arc<Tunnel>>>>,
    router: RwLock<Arc<Router>>,
    routing: RoutingConfig,
    drain_timeout: Duration,
    dial_timeout: Duration,
    /// The configuration's descriptor needs against the limit.
    descriptors: DescriptorWatch,
}

impl TunnelManager {
    /// A manager with no tunnels yet: call [`apply`](Self::apply).
    /// `config` is usually `&Config` (see [`ManagerConfig`]).
    pub fn new<'a>(
        config: impl Into<ManagerConfig<'a>>,
        routing: RoutingConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<TunnelManager>, ManagerError> {
        let config = config.into();
        let ssh = config.ssh;
        let identity: Arc<Identity> = config.identity.ok_or(ManagerError::NoIdentity)?;
        let known_hosts = KnownHosts::load(&ssh.known_hosts)
            .map_err(|e| ManagerError::KnownHosts(e.to_string()))?;
        for warning in known_hosts.warnings() {
            tracing::warn!(path = %ssh.known_hosts.display(), line = warning.line, "known_hosts line skipped: {}", warning.reason);
        }
        if ssh.host_key_policy == HostKeyPolicy::Insecure {
            tracing::warn!("ssh.host_key_policy = insecure: node host keys are NOT verified; anyone on the path can impersonate a node");
        }
        let settings = Arc::new(SessionSettings {
            russh: Arc::new(session::russh_config(
                ssh,
                known_hosts.has_cert_authorities(),
            )),
            identity: RwLock::new(identity),
            certificate: Arc::new(CertificateSlot::new(config.client_certificate.clone())),
            known_hosts: RwLock::new(known_hosts),
            known_hosts_path: ssh.known_hosts.clone(),
            host_key_policy: ssh.host_key_policy,
            connect_timeout: ssh.connect_timeout,
            handshake_timeout: ssh.handshake_timeout,
            auth_timeout: ssh.auth_timeout,
        });
        let ctx = Arc::new(TunnelContext {
            session: settings,
            handshakes: Arc::new(Semaphore::new(ssh.max_handshakes_in_flight)),
            limits: Arc::new(StreamLimits::new(
                ssh.window_size as usize,
                ssh.max_buffered_bytes,
            )),
            metrics,
            default_user: ssh.user.clone(),
            default_port: ssh.port,
            sessions_per_node: ssh.sessions_per_node,
            max_streams_per_node: ssh.max_streams_per_node,
            upload_window: ssh.upload_window,
            download_window: ssh.download_window,
            keepalive_interval: ssh.keepalive_interval,
            keepalive_max: ssh.keepalive_max,
            backoff_base: ssh.backoff_base,
            backoff_max: ssh.backoff_max,
            backoff_reset_after: ssh.backoff_reset_after,
            probe_interval: ssh.reconnect_probe_interval,
            prober: Arc::new(Prober::new(ssh.max_probes_per_second)),
        });
        if let Some(certificate) = &config.client_certificate {
            ctx.metrics
                .client_certificate_in_use(certificate.valid_before());
            tracing::info!(path = %certificate.path.display(), key_id = certificate.key_id(), serial = certificate.serial(), valid_before = %crate::client_certificate::rfc3339(certificate.valid_before()), "authenticating with a user certificate");
            warn_about_principals(certificate, &ssh.user);
        }
        let router = Router::new(&[], &routing);
        let manager = Arc::new(TunnelManager {
            ctx,
            certificate_path: ssh.certificate.clone(),
            tunnels: DashMap::new(),
            retiring: Arc::new(std::sync::Mutex::new(Vec::new())),
            sample: RwLock::new(Arc::new(Vec::new())),
            router: RwLock::new(Arc::new(router)),
            routing,
            drain_timeout: ssh.drain_timeout,
            dial_timeout: config.dial_timeout,
            descriptors: DescriptorWatch::new(config.descriptors),
        });
        // At start: the listeners and connections alone may not fit.
        manager.check_descriptors();
        Ok(manager)
    }

    /// Check what the configuration needs with the current inventory
    /// (draining tunnels still hold their sessions) against the soft
    /// descriptor limit, export it and log a change of verdict once.
    fn check_descriptors(&self) -> DescriptorFit {
        let retiring = self.retiring.lock().map(|l| l.len()).unwrap_or(0);
        let fit = self
            .descriptors
            .check_and_report(self.tunnels.len() + retiring);
        self.ctx.metrics.set_descriptors(fit.needed, fit.limit);
        fit
    }

    /// The last descriptor check (at start or at the last inventory
    /// change).
    pub fn descriptor_fit(&self) -> DescriptorFit {
        self.descriptors
            .last()
            .unwrap_or_else(|| self.check_descriptors())
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.ctx.metrics
    }

    /// Make the set of tunnels match `nodes`: new nodes get a tunnel,
    /// unchanged nodes keep their sessions and streams, nodes whose SSH
    /// endpoint changed reconnect, removed nodes drain (no new streams,
    /// `ssh.drain_timeout` for open ones) in the background.
    pub fn apply(&self, nodes: Vec<NodeConfig>) -> ApplySummary {
        let mut summary = ApplySummary::default();
        let wanted: std::collections::HashSet<&str> =
            nodes.iter().map(|n| n.name.as_str()).collect();
        let removed: Vec<Arc<Tunnel>> = self
            .tunnels
            .iter()
            .filter(|e| !wanted.contains(e.key().as_ref()))
            .map(|e| e.value().clone())
            .collect();
        for tunnel in removed {
            self.tunnels.remove(tunnel.name());
            summary.removed.push(tunnel.name().to_string());
            self.retire(tunnel);
        }
        for node in nodes {
            let existing = self.tunnels.get(node.name.as_str()).map(|t| t.clone());
            match existing {
                Some(tunnel) if tunnel.node() == node => summary.unchanged += 1,
                Some(tunnel) if same_endpoint(&tunnel.node(), &node) => {
                    // Only routing data (other addresses, pod CIDRs) changed:
                    // keep the sessions and streams, update the description.
                    tunnel.set_node(node.clone());
                    summary.changed.push(node.name.clone());
                }
                Some(tunnel) => {
                    let fresh = Tunnel::new(node.clone(), self.ctx.clone());
                    fresh.start();
                    self.tunnels.insert(fresh.name().clone(), fresh);
                    summary.changed.push(node.name.clone());
                    self.retire(tunnel);
                }
                None => {
                    let fresh = Tunnel::new(node.clone(), self.ctx.clone());
                    fresh.start();
                    self.tunnels.insert(fresh.name().clone(), fresh);
                    summary.added.push(node.name.clone());
                }
            }
        }
        self.rebuild_indexes();
        self.check_descriptors();
        tracing::info!(
            added = summary.added.len(),
            changed = summary.changed.len(),
            removed = summary.removed.len(),
            unchanged = summary.unchanged,
            "inventory applied"
        );
        summary
    }

    fn retire(&self, tunnel: Arc<Tunnel>) {
        let grace = self.drain_timeout;
        let retiring = self.retiring.clone();
        // Draining from now on, before apply() returns: no stream can be
        // opened on it and status shows it as draining.
        tunnel.start_draining();
        if let Ok(mut list) = retiring.lock() {
            list.push(tunnel.clone());
        }
        tokio::spawn(async move {
            tunnel.drain(grace).await;
            if let Ok(mut list) = retiring.lock() {
                list.retain(|t| !Arc::ptr_eq(t, &tunnel));
            }
        });
    }

    fn rebuild_indexes(&self) {
        let mut all: Vec<Arc<Tunnel>> = self.tunnels.iter().map(|e| e.value().clone()).collect();
        all.sort_by(|a, b| a.name().cmp(b.name()));
        let route_nodes: Vec<RouteNode> = all
            .iter()
            .map(|t| {
                let n = t.node();
                RouteNode {
                    name: n.name.clone(),
                    addresses: n.addresses.clone(),
                    pod_cidrs: n.pod_cidrs.clone(),
                    ssh_port: n.ssh_port.unwrap_or(self.ctx.default_port),
                    ssh_address: n.ssh_address.clone(),
                }
            })
            .collect();
        let router = Router::new(&route_nodes, &self.routing);
        // Warn once per change: a conflict that the previous router had
        // already reported is not logged again on every inventory update.
        // (Sets: an inventory can carry thousands of conflicts.)
        let previous = self.router();
        let before: HashSet<&Conflict> = previous.conflicts().iter().collect();
        let now: HashSet<&Conflict> = router.conflicts().iter().collect();
        for conflict in router.conflicts() {
            if !before.contains(conflict) {
                tracing::warn!(kind = conflict.label(), "routing conflict: {conflict}");
            }
        }
        for conflict in previous.conflicts() {
            if !now.contains(conflict) {
                tracing::info!(
                    kind = conflict.label(),
                    "routing conflict resolved: {conflict}"
                );
            }
        }
        self.ctx
            .metrics
            .set_route_conflicts(router.conflicts().iter().map(Conflict::label));
        if let Ok(mut slot) = self.router.write() {
            *slot = Arc::new(router);
        }
        if let Ok(mut slot) = self.sample.write() {
            *slot = Arc::new(all);
        }
    }

    /// The current router (rebuilt on every apply).
    pub fn router(&self) -> Arc<Router> {
        self.router
            .read()
            .map(|r| r.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// The tunnel of `node`.
    pub fn tunnel(&self, node: &str) -> Option<Arc<Tunnel>> {
        self.tunnels.get(node).map(|t| t.clone())
    }

    /// A status snapshot of every tunnel, sorted by node name.
    /// Tunnels still draining after being removed or replaced are included
    /// (state `draining`) until they close.
    pub fn status(&self) -> Vec<TunnelStatus> {
        let mut all: Vec<TunnelStatus> = self.tunnels.iter().map(|t| t.status()).collect();
        if let Ok(list) = self.retiring.lock() {
            all.extend(list.iter().map(|t| t.status()));
        }
        all.sort_by(|a, b| a.node.cmp(&b.node).then(a.state.cmp(&b.state)));
        all
    }

    /// Bytes received from nodes that clients have not read yet.
    pub fn buffered_bytes(&self) -> usize {
        self.ctx
            .limits
            .in_use
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Tunnels by state.
    pub fn count_ready(&self) -> (usize, usize) {
        let total = self.tunnels.len();
        let ready = self.tunnels.iter().filter(|t| t.is_ready()).count();
        (ready, total)
    }

    /// Open a stream to `host:port` through `node` (no routing, no policy:
    /// the caller chose the node, as `nodetunnel dial` does).
    pub async fn dial_node(
        &self,
        node: &str,
        host: &str,
        port: u16,
    ) -> Result<TunnelStream, DialError> {
        let tunnel = self.tunnel(node).ok_or_else(|| DialError::UnknownNode {
            node: node.to_owned(),
        })?;
        tunnel.open_stream(host, port, self.dial_timeout).await
    }

    /// Wait until `node` is Ready, or its first handshake failed (returning
    /// that error), or `timeout` passed.
    pub async fn wait_ready(&self, node: &str, timeout: Duration) -> Result<(), WaitReadyError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let Some(tunnel) = self.tunnel(node) else {
                return Err(WaitReadyError::UnknownNode {
                    node: node.to_owned(),
                });
            };
            let changed = tunnel.changed().notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let status = tunnel.status();
            match status.state {
                TunnelState::Ready => return Ok(()),
                TunnelState::Backoff => {
                    return Err(WaitReadyError::Failed {
                        last_error: status
                            .last_error
                            .unwrap_or_else(|| "connection failed".into()),
                    })
                }
                _ => {}
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Err(WaitReadyError::Timeout { waited: timeout });
            }
        }
    }

    /// Re-read the identity key (key rotation): new sessions use it, open
    /// sessions and their streams are untouched.
    pub fn reload_identity(
        &self,
        path: &Path,
        passphrase_file: Option<&Path>,
    ) -> Result<(), ReloadError> {
        let identity = crate::keys::load_identity(path, passphrase_file)?;
        tracing::info!(fingerprint = %identity.fingerprint(), "identity reloaded");
        if let Ok(mut slot) = self.ctx.session.identity.write() {
            *slot = Arc::new(identity);
        }
        Ok(())
    }

    /// Re-read `ssh.certificate` (it changed on disk, or SIGHUP) and check
    /// it against the identity in use and `ssh.user`: a good one is used
    /// by new sessions at once (established sessions keep running); a
    /// refused one is logged as an error and the previous certificate
    /// stays in use. Nothing to do without `ssh.certificate`, or when the
    /// file holds the certificate in use already.
    pub fn reload_certificate(&self) -> Result<(), ReloadError> {
        let Some(path) = &self.certificate_path else {
            return Ok(());
        };
        let session = &self.ctx.session;
        let Ok(identity) = session.identity.read().map(|i| i.clone()) else {
            return Ok(());
        };
        let loaded = crate::client_certificate::load(
            path,
            identity.public_key(),
            std::time::SystemTime::now(),
        );
        let fresh = match loaded {
            Ok(fresh) => fresh,
            Err(error) => {
                self.ctx.metrics.client_certificate_reload(error.reason());
                let previous = session.certificate.current();
                tracing::error!(
                    %error,
                    reason = error.reason(),
                    previous_serial = previous.as_ref().map(|c| c.serial()),
                    "certificate replacement refused; the previous certificate stays in use"
                );
                return Err(error.into());
            }
        };
        if let Some(previous) = session.certificate.current() {
            if previous.certificate == fresh.certificate {
                return Ok(());
            }
        }
        tracing::info!(
            path = %path.display(),
            key_id = fresh.key_id(),
            serial = fresh.serial(),
            valid_before = %crate::client_certificate::rfc3339(fresh.valid_before()),
            "certificate reloaded; new sessions use it"
        );
        warn_about_principals(&fresh, &self.ctx.default_user);
        self.ctx
            .metrics
            .client_certificate_in_use(fresh.valid_before());
        self.ctx.metrics.client_certificate_reload("ok");
        session.certificate.install(Arc::new(fresh));
        Ok(())
    }

    /// Use `certificate` (issued by [`crate::issuer`]) from the next
    /// authentication on, and export its expiry.
    pub fn install_certificate(&self, certificate: ClientCertificate) {
        self.ctx
            .metrics
            .client_certificate_in_use(certificate.valid_before());
        self.ctx.session.certificate.install(Arc::new(certificate));
    }

    /// The certificate new sessions authenticate with, if any.
    pub fn current_certificate(&self) -> Option<Arc<ClientCertificate>> {
        self.ctx.session.certificate.current()
    }

    /// The identity new sessions authenticate with.
    pub fn identity(&self) -> Option<Arc<Identity>> {
        self.ctx.session.identity.read().ok().map(|i| i.clone())
    }

    /// `ssh.user`, the login user of nodes that do not set their own.
    pub fn default_user(&self) -> &str {
        &self.ctx.default_user
    }

    /// `ssh.certificate`, when set.
    pub fn certificate_path(&self) -> Option<&Path> {
        self.certificate_path.as_deref()
    }

    /// Re-read known_hosts.
    pub fn reload_known_hosts(&self) -> Result<(), ReloadError> {
        let path = &self.ctx.session.known_hosts_path;
        let fresh = KnownHosts::load(path)?;
        for warning in fresh.warnings() {
            tracing::warn!(path = %path.display(), line = warning.line, "known_hosts line skipped: {}", warning.reason);
        }
        if let Ok(mut slot) = self.ctx.session.known_hosts.write() {
            *slot = fresh;
        }
        Ok(())
    }

    /// Stop taking streams everywhere, let open ones finish up to `grace`,
    /// then close every session.
    pub async fn shutdown(&self, grace: Duration) {
        let all: Vec<Arc<Tunnel>> = self.tunnels.iter().map(|t| t.value().clone()).collect();
        let drains = all.iter().map(|t| t.drain(grace));
        futures::future::join_all(drains).await;
    }

    /// Pick a Ready node by the power of two choices on open streams,
    /// excluding `except`. Nodes Kubernetes reports not Ready are chosen
    /// only when no other node is usable.
    fn pick_any_node(&self, except: Option<&str>) -> Option<Arc<Tunnel>> {
        let all = self.sample.read().ok()?.clone();
        let usable = |t: &Arc<Tunnel>| t.is_ready() && Some(t.name().as_ref()) != except;
        p2c(&all, |t| usable(t) && !t.reported_not_ready()).or_else(|| p2c(&all, usable))
    }
}

/// Power of two choices among the tunnels `eligible` accepts: two random
/// picks (sampled, so O(1) when most are eligible; a scan otherwise), the
/// one with fewer open streams wins.
fn p2c(all: &[Arc<Tunnel>], eligible: impl Fn(&Arc<Tunnel>) -> bool) -> Option<Arc<Tunnel>> {
    if all.is_empty() {
        return None;
    }
    let mut rng = rand::rng();
    let mut picks: Vec<&Arc<Tunnel>> = Vec::with_capacity(2);
    for _ in 0..16 {
        let t = &all[rng.random_range(0..all.len())];
        if eligible(t) && !picks.iter().any(|p| Arc::ptr_eq(p, t)) {
            picks.push(t);
            if picks.len() == 2 {
                break;
            }
        }
    }
    if picks.is_empty() {
        let candidates: Vec<&Arc<Tunnel>> = all.iter().filter(|t| eligible(t)).collect();
        if candidates.is_empty() {
            return None;
        }
        picks.push(candidates[rng.random_range(0..candidates.len())]);
        let other = candidates[rng.random_range(0..candidates.len())];
        if !Arc::ptr_eq(other, picks[0]) {
            picks.push(other);
        }
    }
    picks.into_iter().min_by_key(|t| t.open_streams()).cloned()
}

impl NodeSink for TunnelManager {
    fn apply(&self, nodes: Vec<NodeConfig>) -> ApplySummary {
        TunnelManager::apply(self, nodes)
    }
}

fn same_endpoint(a: &NodeConfig, b: &NodeConfig) -> bool {
    a.ssh_address() == b.ssh_address() && a.ssh_port == b.ssh_port && a.ssh_user == b.ssh_user
}

impl Dialer for TunnelManager {
    type Stream = TunnelStream;

    async fn dial(&self, dest: &Destination) -> Result<TunnelStream, DialError> {
        let router = self.router();
        let route = router.route(dest)?;
        let host = dest.host.to_string();
        match route {
            Route::Node {
                node,
                rule,
                connect_to,
            } => {
                let tunnel = self.tunnel(&node).ok_or_else(|| DialError::NodeDown {
                    node: node.clone(),
                    cause: NodeDownCause::NoTunnel,
                })?;
                // A route chosen by a name connects to the node's address:
                // the node's resolver never decides where the name goes.
                let host = connect_to.map_or(host, |ip| ip.to_string());
                tracing::debug!(dest = %dest, node = %node, rule = %rule, connect_to = %host, "route");
                let mut stream = tunnel
                    .open_stream(&host, dest.port, self.dial_timeout)
                    .await?;
                stream.set_rule(rule.label());
                Ok(stream)
            }
            Route::AnyNode { rule } => {
                let first = self
                    .pick_any_node(None)
                    .ok_or_else(|| DialError::NoReadyNode {
                        dest: dest.clone(),
                        rule: rule.clone(),
                    })?;
                tracing::debug!(dest = %dest, node = %first.name(), rule = %rule, "route");
                let started = tokio::time::Instant::now();
                let opened = match first.open_stream(&host, dest.port, self.dial_timeout).await {
                    Ok(stream) => Ok(stream),
                    Err(e @ (DialError::Route(_) | DialError::ShuttingDown)) => Err(e),
                    Err(e) => {
                        // Nothing flowed yet: one other node gets a chance,
                        // within what is left of the same dial timeout.
                        let left = self.dial_timeout.saturating_sub(started.elapsed());
                        if left < Duration::from_millis(50) {
                            return Err(e);
                        }
                        let Some(second) = self.pick_any_node(Some(first.name())) else {
                            return Err(e);
                        };
                        tracing::info!(dest = %dest, node = %first.name(), retry = %second.name(), error = %e, "dial failed; trying another node");
                        second.open_stream(&host, dest.port, left).await
                    }
                };
                let mut stream = opened?;
                stream.set_rule(rule.label());
                Ok(stream)
            }
        }
    }
}
