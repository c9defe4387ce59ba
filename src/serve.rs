//! `nodetunnel serve`: the long-running sidecar. Wires the tunnel manager
//! and the front door together, reloads on SIGHUP and drains on
//! SIGTERM/SIGINT.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use tokio::signal::unix::{signal, SignalKind};

use crate::config::Config;
use crate::inventory::{InventorySource, SyncStatus};
use crate::manager::TunnelManager;
use crate::metrics::Metrics;
use crate::proxy::FrontDoor;
use crate::shutdown::Shutdown;

/// Run until SIGTERM or SIGINT; exit 0 after draining.
pub async fn run(config_path: &Path) -> ExitCode {
    match serve(config_path).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("nodetunnel serve: {message}");
            tracing::error!(error = %message, "nodetunnel serve failed");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config_path: &Path) -> Result<(), String> {
    let config = Config::load(config_path).map_err(|e| e.to_string())?;
    let metrics = Arc::new(Metrics::new());
    let manager = TunnelManager::new(&config, config.routing.clone(), metrics.clone())
        .map_err(|e| e.to_string())?;
    let mut terminate =
        signal(SignalKind::terminate()).map_err(|e| format!("SIGTERM handler: {e}"))?;
    let mut interrupt =
        signal(SignalKind::interrupt()).map_err(|e| format!("SIGINT handler: {e}"))?;
    let mut hangup = signal(SignalKind::hangup()).map_err(|e| format!("SIGHUP handler: {e}"))?;

    let shutdown = Shutdown::new();
    let drain = config.ssh.drain_timeout;
    let front_door = match &config.proxy {
        Some(proxy) => {
            let door = FrontDoor::bind(proxy, metrics.clone())
                .await
                .map_err(|e| e.to_string())?;
            let listeners = [
                door.uds_path().map(|p| format!("uds={}", p.display())),
                door.tcp_addr().map(|a| format!("tcp={a}")),
                door.socks5_addr().map(|a| format!("socks5={a}")),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(" ");
            let task = tokio::spawn(door.serve(manager.clone(), shutdown.clone(), drain));
            tracing::info!(listeners = %listeners, "front door listening");
            Some(task)
        }
        None => {
            tracing::warn!("no [proxy] table: tunnels are kept but nothing accepts connections");
            None
        }
    };
    // Inventory health, read by readiness.
    let sync = Arc::new(SyncStatus::default());
    if config.inventory.source == InventorySource::Static {
        manager.apply(config.nodes.clone());
        sync.synced();
        metrics
            .inventory_last_sync
            .set(sync.last_sync_unix().unwrap_or(0));
    }
    // The file and kubernetes sources follow their nodes in a task of their
    // own; SIGHUP pokes it through `inventory_reload`.
    let inventory_reload = Arc::new(tokio::sync::Notify::new());
    if config.inventory.source != InventorySource::Static && !config.nodes.is_empty() {
        tracing::warn!(
            "[[nodes]] of the config file are ignored: the inventory comes from inventory.source"
        );
    }
    let inventory = (config.inventory.source != InventorySource::Static).then(|| {
        tokio::spawn(crate::inventory::run(
            config.inventory.clone(),
            manager.clone(),
            sync.clone(),
            metrics.clone(),
            inventory_reload.clone(),
            shutdown.clone(),
        ))
    });
    tracing::info!(nodes = config.nodes.len(), config = %config_path.display(), "nodetunnel serving");

    // The admin API: health, readiness, metrics and the tunnel table, read
    // live from the manager and the inventory's sync status.
    let admin = crate::admin::start(
        &config,
        manager.clone(),
        metrics.clone(),
        sync.clone(),
        shutdown.clone(),
    )
    .await
    .map_err(|e| e.to_string())?;

    loop {
        tokio::select! {
            _ = terminate.recv() => { tracing::info!("SIGTERM: draining"); break; }
            _ = interrupt.recv() => { tracing::info!("SIGINT: draining"); break; }
            _ = hangup.recv() => reload(config_path, &config, &manager, &sync, &inventory_reload),
        }
    }
    shutdown.trigger();
    if let Some(task) = inventory {
        let _ = task.await;
    }
    if let Some(task) = front_door {
        let _ = task.await;
    }
    if let Some(task) = admin {
        let _ = task.await;
    }
    manager.shutdown(drain).await;
    tracing::info!("stopped");
    Ok(())
}

/// SIGHUP: re-read the file; apply its nodes, identity and known_hosts. A
/// broken file keeps everything as it was. The file and kubernetes
/// inventory sources re-read their nodes file or re-list their nodes.
fn reload(
    path: &Path,
    running: &Config,
    manager: &TunnelManager,
    sync: &SyncStatus,
    inventory_reload: &tokio::sync::Notify,
) {
    if running.inventory.source != InventorySource::Static {
        inventory_reload.notify_one();
    }
    let fresh = match Config::load(path) {
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
    if let Err(e) = manager.reload_known_hosts() {
        tracing::error!(error = %e, "SIGHUP: known_hosts not reloaded");
    }
    if running.inventory.source == InventorySource::Static {
        let summary = manager.apply(fresh.nodes.clone());
        sync.synced();
        manager
            .metrics()
            .inventory_last_sync
            .set(sync.last_sync_unix().unwrap_or(0));
        tracing::info!(?summary, "SIGHUP: reloaded");
    }
    if fresh.inventory != running.inventory {
        tracing::warn!("SIGHUP: [inventory] changes take effect at the next restart");
    }
    if fresh.proxy.is_some() != running.proxy.is_some() || fresh.routing != running.routing {
        tracing::warn!("SIGHUP: [proxy] and [routing] changes take effect at the next restart");
    }
}
