//! `nodetunnel serve`: the long-running sidecar. [`Server`] wires the
//! tunnel manager, the inventory, the front door and the admin API
//! together; [`Server::run_until_signal`] reloads on SIGHUP and drains on
//! SIGTERM/SIGINT. `nodetunnel dev` runs the same [`Server`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::admin::AdminError;
use crate::config::{Config, ConfigError};
use crate::inventory::{InventorySource, SyncStatus};
use crate::manager::{ManagerError, TunnelManager};
use crate::metrics::Metrics;
use crate::proxy::{FrontDoor, FrontDoorError};
use crate::shutdown::Shutdown;

/// How long the audit writer waits, beyond the drain, for the records of
/// the last connections before it stops.
const AUDIT_LINGER: Duration = Duration::from_secs(5);

/// Run until SIGTERM or SIGINT; exit 0 after draining.
pub async fn run(config_path: &Path) -> ExitCode {
    let result = match Server::start(config_path).await {
        Ok(server) => server.run_until_signal().await.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("nodetunnel serve: {message}");
            tracing::error!(error = %message, "nodetunnel serve failed");
            ExitCode::FAILURE
        }
    }
}

/// Why [`Server::start`] did not start. Each variant shows its cause's
/// own message.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration file could not be loaded.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The tunnel manager could not be built (identity, known_hosts).
    #[error(transparent)]
    Manager(#[from] ManagerError),
    /// The front door could not bind its listeners.
    #[error(transparent)]
    FrontDoor(#[from] FrontDoorError),
    /// The admin API could not bind its listeners.
    #[error(transparent)]
    Admin(#[from] AdminError),
    /// The audit file could not be opened.
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditFileError),
}

/// Why [`Server::run_until_signal`] could not serve: a signal handler
/// could not be installed.
#[derive(Debug, thiserror::Error)]
#[error("{signal} handler: {source}")]
pub struct SignalError {
    /// The signal's name (`SIGTERM`, `SIGINT`, `SIGHUP`).
    pub signal: &'static str,
    /// The operating system's error.
    #[source]
    pub source: std::io::Error,
}

fn handler(
    kind: SignalKind,
    name: &'static str,
) -> Result<tokio::signal::unix::Signal, SignalError> {
    signal(kind).map_err(|source| SignalError {
        signal: name,
        source,
    })
}

/// Where a running [`Server`] listens (the real ports when 0 was
/// configured).
#[derive(Clone, Debug, Default)]
pub struct Listeners {
    /// HTTP CONNECT over a Unix socket.
    pub proxy_uds: Option<PathBuf>,
    /// HTTP CONNECT over TCP (with mTLS when configured).
    pub proxy_tcp: Option<SocketAddr>,
    /// SOCKS5.
    pub socks5: Option<SocketAddr>,
    /// Admin API over TCP.
    pub admin_tcp: Option<SocketAddr>,
    /// Admin API over a Unix socket.
    pub admin_uds: Option<PathBuf>,
}

/// A running sidecar. See the module docs.
pub struct Server {
    config_path: PathBuf,
    config: Config,
    manager: Arc<TunnelManager>,
    sync: Arc<SyncStatus>,
    shutdown: Shutdown,
    inventory_reload: Arc<Notify>,
    /// Asks the `[ssh.issuer]` renewal task for a new certificate now.
    certificate_reissue: Arc<Notify>,
    /// Asks the audit writer to reopen its file (SIGHUP).
    audit_reopen: Arc<Notify>,
    listeners: Listeners,
    tasks: Vec<JoinHandle<()>>,
    drain: Duration,
}

impl Server {
    /// Load `config_path`, bind every listener, start the tunnels, the
    /// inventory and the admin API.
    pub async fn start(config_path: &Path) -> Result<Server, StartError> {
        let config = Config::load(config_path)?;
        crate::descriptors::raise_soft_limit();
        let metrics = Arc::new(Metrics::new());
        let manager = TunnelManager::new(&config, config.routing.clone(), metrics.clone())?;
        let shutdown = Shutdown::new();
        let drain = config.ssh.drain_timeout;
        let mut listeners = Listeners::default();
        let mut tasks = Vec::new();

        // [audit]: the file is opened before any listener, so that a path
        // that cannot be written stops the start. The writer outlives the
        // front door's drain to write the records of drained connections.
        let audit_reopen = Arc::new(Notify::new());
        let audit = match crate::audit::Output::open(&config.audit)? {
            Some(output) => {
                let (sink, queue) = crate::audit::channel(config.audit.queue, metrics.clone());
                tasks.push(tokio::spawn(crate::audit::run_writer(
                    queue,
                    output,
                    audit_reopen.clone(),
                    shutdown.clone(),
                    drain + AUDIT_LINGER,
                )));
                tracing::info!(mode = ?config.audit.mode, path = ?config.audit.path, "audit trail on");
                sink
            }
            None => crate::audit::AuditSink::off(),
        };

        match &config.proxy {
            Some(proxy) => {
                let door = FrontDoor::bind(proxy, metrics.clone())
                    .await?
                    .with_audit(audit);
                listeners.proxy_uds = door.uds_path().map(PathBuf::from);
                listeners.proxy_tcp = door.tcp_addr();
                listeners.socks5 = door.socks5_addr();
                let described = [
                    door.uds_path().map(|p| format!("uds={}", p.display())),
                    door.tcp_addr().map(|a| format!("tcp={a}")),
                    door.socks5_addr().map(|a| format!("socks5={a}")),
                    door.grpc_uds_path()
                        .map(|p| format!("grpc_uds={}", p.display())),
                ]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(" ");
                tasks.push(tokio::spawn(door.serve(
                    manager.clone(),
                    shutdown.clone(),
                    drain,
                )));
                tracing::info!(listeners = %described, "front door listening");
            }
            None => {
                tracing::warn!(
                    "no [proxy] table: tunnels are kept but nothing accepts connections"
                );
            }
        }

        // The certificate file: replacements on disk are used by new
        // sessions at once (SIGHUP re-reads it too).
        if let Some(path) = config.ssh.certificate.clone() {
            let reloader = manager.clone();
            tasks.push(tokio::spawn(crate::client_certificate::watch(
                path,
                move || {
                    // A refused replacement is logged by the manager.
                    let _ = reloader.reload_certificate();
                },
                shutdown.clone(),
            )));
        }

        // [ssh.issuer]: the first certificate was issued by Config::load;
        // renew it at two thirds of its life (and on SIGHUP).
        let certificate_reissue = Arc::new(Notify::new());
        if let Some(issuer) = config.ssh.issuer.clone() {
            tasks.push(tokio::spawn(crate::issuer::run(
                issuer,
                manager.clone(),
                tokio::time::Instant::now(),
                certificate_reissue.clone(),
                shutdown.clone(),
            )));
        }
        if config.client_certificate.is_some() {
            let current = manager.clone();
            tasks.push(tokio::spawn(crate::client_certificate::report_while_expired(
                move || current.current_certificate(),
                |certificate| {
                    tracing::warn!(
                        source = %certificate.path.display(),
                        key_id = certificate.key_id(),
                        serial = certificate.serial(),
                        expired_at = %crate::client_certificate::rfc3339(certificate.valid_before()),
                        "the certificate in use has expired and nothing replaced it: new sessions cannot authenticate (sessions up keep running)"
                    );
                },
                shutdown.clone(),
            )));
        }

        // Inventory health, read by readiness.
        let sync = Arc::new(SyncStatus::default());
        if config.inventory.source == InventorySource::Static {
            manager.apply(config.nodes.clone());
            sync.set_always_current();
            sync.synced();
            metrics
                .inventory_last_sync
                .set(sync.last_sync_unix().unwrap_or(0));
        }
        // The file and kubernetes sources follow their nodes in a task of
        // their own; SIGHUP pokes it through `inventory_reload`.
        let inventory_reload = Arc::new(Notify::new());
        if config.inventory.source != InventorySource::Static {
            if !config.nodes.is_empty() {
                tracing::warn!(
                    "[[nodes]] of the config file are ignored: the inventory comes from inventory.source"
                );
            }
            tasks.push(tokio::spawn(crate::inventory::run(
                config.inventory.clone(),
                manager.clone(),
                sync.clone(),
                metrics.clone(),
                inventory_reload.clone(),
                shutdown.clone(),
            )));
        }

        // The admin API: health, readiness, metrics and the tunnel table,
        // read live from the manager and the inventory's sync status.
        let admin = crate::admin::start(
            &config.admin,
            &config.readiness,
            manager.clone(),
            metrics.clone(),
            sync.clone(),
            shutdown.clone(),
        )
        .await?;
        if let Some(admin) = admin {
            listeners.admin_tcp = admin.tcp_addr;
            listeners.admin_uds = admin.uds_path;
            tasks.push(admin.task);
        }
        tracing::info!(
            source = ?config.inventory.source,
            config = %config_path.display(),
            "nodetunnel serving"
        );
        Ok(Server {
            config_path: config_path.to_path_buf(),
            config,
            manager,
            sync,
            shutdown,
            inventory_reload,
            certificate_reissue,
            audit_reopen,
            listeners,
            tasks,
            drain,
        })
    }

    /// Where it listens.
    pub fn listeners(&self) -> &Listeners {
        &self.listeners
    }

    /// The tunnel manager.
    pub fn manager(&self) -> &Arc<TunnelManager> {
        &self.manager
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Serve until SIGTERM or SIGINT (reloading on SIGHUP), then drain and
    /// stop.
    pub async fn run_until_signal(self) -> Result<(), SignalError> {
        let mut terminate = handler(SignalKind::terminate(), "SIGTERM")?;
        let mut interrupt = handler(SignalKind::interrupt(), "SIGINT")?;
        let mut hangup = handler(SignalKind::hangup(), "SIGHUP")?;
        loop {
            tokio::select! {
                _ = terminate.recv() => { tracing::info!("SIGTERM: draining"); break; }
                _ = interrupt.recv() => { tracing::info!("SIGINT: draining"); break; }
                _ = hangup.recv() => self.reload(),
            }
        }
        self.stop().await;
        Ok(())
    }

    /// Stop taking work, let open streams drain up to `ssh.drain_timeout`,
    /// then close everything.
    pub async fn stop(self) {
        self.shutdown.trigger();
        for task in self.tasks {
            let _ = task.await;
        }
        self.manager.shutdown(self.drain).await;
        tracing::info!("stopped");
    }

    /// SIGHUP: re-read the file; apply its nodes, identity, certificate and
    /// known_hosts.
    /// A broken file keeps everything as it was. The file and kubernetes
    /// inventory sources re-read their nodes file or re-list their nodes.
    fn reload(&self) {
        let running = &self.config;
        let manager = &self.manager;
        // logrotate's postrotate: whatever the file says.
        self.audit_reopen.notify_one();
        if running.inventory.source != InventorySource::Static {
            self.inventory_reload.notify_one();
        }
        let fresh = match Config::load_for_reload(&self.config_path) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: configuration not reloaded; keeping the running one");
                return;
            }
        };
        if let Err(e) =
            manager.reload_identity(&fresh.ssh.identity, fresh.ssh.passphrase_file.as_deref())
        {
            tracing::error!(error = %e, "SIGHUP: identity not reloaded");
        }
        // After the identity: the certificate must be for the key in use.
        // A refused one is logged by the manager; an issuer signs a new
        // one for the identity in use (and re-reads its CA key).
        if running.ssh.issuer.is_some() {
            self.certificate_reissue.notify_one();
        } else {
            let _ = manager.reload_certificate();
        }
        if let Err(e) = manager.reload_known_hosts() {
            tracing::error!(error = %e, "SIGHUP: known_hosts not reloaded");
        }
        let static_now = fresh.inventory.source == InventorySource::Static;
        if running.inventory.source == InventorySource::Static && !static_now {
            tracing::warn!(
                "SIGHUP: inventory.source changed; keeping the running nodes until the restart"
            );
        } else if running.inventory.source == InventorySource::Static
            && fresh.nodes.is_empty()
            && !manager.status().is_empty()
        {
            tracing::error!("SIGHUP: the configuration has no [[nodes]]; keeping the running nodes (an empty inventory is applied only at start)");
        } else if running.inventory.source == InventorySource::Static {
            let summary = manager.apply(fresh.nodes.clone());
            self.sync.synced();
            manager
                .metrics()
                .inventory_last_sync
                .set(self.sync.last_sync_unix().unwrap_or(0));
            tracing::info!(?summary, "SIGHUP: reloaded");
        }
        let mut restart_needed = Vec::new();
        if fresh.inventory != running.inventory {
            restart_needed.push("[inventory]");
        }
        if fresh.proxy != running.proxy {
            restart_needed.push("[proxy]");
        }
        if fresh.routing != running.routing {
            restart_needed.push("[routing]");
        }
        if fresh.admin != running.admin || fresh.readiness != running.readiness {
            restart_needed.push("[admin]/[readiness]");
        }
        if fresh.audit != running.audit {
            restart_needed.push("[audit]");
        }
        let mut ssh_then = running.ssh.clone();
        ssh_then.identity = fresh.ssh.identity.clone();
        ssh_then.passphrase_file = fresh.ssh.passphrase_file.clone();
        if ssh_then != fresh.ssh {
            restart_needed.push("[ssh] (other than identity and passphrase_file)");
        }
        if !restart_needed.is_empty() {
            tracing::warn!(
                tables = %restart_needed.join(", "),
                "SIGHUP: these changes take effect at the next restart"
            );
        }
    }
}
