//! `farm` (feature `farm`): the node farm of the scale benchmark.
//!
//! One russh SSH server on `--listen` (0.0.0.0:2222 inside a private network
//! namespace): every address of 127.0.0.0/8 is local, so each "node"
//! 127.100.x.y of the scale config reaches it, and each session is one
//! separate TCP connection and SSH session, as to a real node. It accepts
//! public-key authentication with the one key in `--authorized-key` (an
//! OpenSSH public key file), any user, and nothing else; it opens and
//! accepts no channels. Sessions are only kept: this measures idle
//! sessions, not sshd.
//!
//! `--lifetime-secs` (default 1800) bounds the process.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use russh::keys::{PrivateKey, PublicKey};
use russh::server::{self, Auth, VerifiedPublicKey};
use tokio::net::TcpListener;

use crate::args::Args;

struct Node {
    authorized: Arc<PublicKey>,
    authenticated: Arc<AtomicU64>,
}

impl server::Handler for Node {
    type Error = russh::Error;

    async fn auth_publickey(
        &mut self,
        _user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        if key.public_key.key_data() == self.authorized.key_data() {
            self.authenticated.fetch_add(1, Ordering::Relaxed);
            Ok(Auth::Accept)
        } else {
            Ok(Auth::reject())
        }
    }
}

pub async fn run(args: &Args) -> Result<(), String> {
    let listen = args.get("listen").unwrap_or("0.0.0.0:2222");
    let host_key_path = args.require("host-key")?;
    let authorized_path = args.require("authorized-key")?;
    let lifetime = Duration::from_secs(args.get_parse("lifetime-secs", 1800u64)?);

    let host_key: PrivateKey = russh::keys::load_secret_key(host_key_path, None)
        .map_err(|e| format!("--host-key {host_key_path}: {e}"))?;
    let line = std::fs::read_to_string(authorized_path)
        .map_err(|e| format!("--authorized-key {authorized_path}: {e}"))?;
    let authorized = PublicKey::from_openssh(line.trim())
        .map_err(|e| format!("--authorized-key {authorized_path}: {e}"))?;

    let config = Arc::new(server::Config {
        keys: vec![host_key],
        auth_rejection_time: Duration::from_millis(10),
        auth_rejection_time_initial: Some(Duration::from_millis(0)),
        inactivity_timeout: None,
        nodelay: true,
        ..server::Config::default()
    });
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("binding {listen}: {e}"))?;
    eprintln!("nodetunnel-bench farm: SSH on {listen}");
    let authorized = Arc::new(authorized);
    let authenticated = Arc::new(AtomicU64::new(0));
    let accepted = Arc::new(AtomicU64::new(0));

    let accept = {
        let authenticated = authenticated.clone();
        let accepted = accepted.clone();
        async move {
            loop {
                let (s, _) = match listener.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        eprintln!("nodetunnel-bench farm: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                accepted.fetch_add(1, Ordering::Relaxed);
                let config = config.clone();
                let handler = Node {
                    authorized: authorized.clone(),
                    authenticated: authenticated.clone(),
                };
                tokio::spawn(async move {
                    if let Ok(session) = server::run_stream(config, s, handler).await {
                        let _ = session.await;
                    }
                });
            }
        }
    };
    let report = async {
        loop {
            tokio::time::sleep(Duration::from_secs(10)).await;
            eprintln!(
                "nodetunnel-bench farm: {} connections accepted, {} authenticated",
                accepted.load(Ordering::Relaxed),
                authenticated.load(Ordering::Relaxed)
            );
        }
    };
    tokio::select! {
        _ = accept => {}
        _ = report => {}
        _ = tokio::time::sleep(lifetime) => {
            eprintln!("nodetunnel-bench farm: lifetime of {lifetime:?} over, exiting");
        }
    }
    Ok(())
}
