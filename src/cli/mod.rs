//! The command line: argument definitions and one function per subcommand.
//! `main.rs` only parses arguments and calls [`run`].
//!
//! The operator's commands live in their own files: [`status`] and [`top`]
//! read a running sidecar's admin API (through [`client`]), [`check`] and
//! [`route`] work offline from the configuration file; [`inspect`] shows a
//! certificate; [`format`](mod@format) holds
//! the human formats they share; [`shell`] writes the completion scripts
//! and manual pages generated from these definitions.

pub mod check;
pub mod client;
pub mod format;
pub mod inspect;
pub mod route;
pub mod shell;
pub mod status;
pub mod top;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::Config;
use crate::logging::LogFormat;
use crate::manager::TunnelManager;
use crate::metrics::Metrics;
use crate::serve;

/// nodetunnel: SSH tunnels from the Kubernetes control plane to every node.
#[derive(Debug, Parser)]
#[command(name = "nodetunnel", version, about, long_about = None)]
pub struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax); RUST_LOG overrides it.
    #[arg(long, default_value = "info", global = true)]
    pub log_level: String,
    /// Threads of the async runtime (default: half the CPUs, at least one).
    /// Each SSH session is one task, so one busy stream never uses more than
    /// about one thread; more threads let many busy sessions use more cores,
    /// at the price of cross-thread wake-ups on every forwarded packet (see
    /// docs/benchmarks.md, "Runtime threads").
    #[arg(long, env = "NODETUNNEL_WORKER_THREADS", global = true,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The runtime's worker threads: `requested`, or half the CPUs (at least
/// one). nodetunnel runs beside kube-apiserver and leaves it the other half.
pub fn worker_threads(requested: Option<u16>) -> usize {
    match requested {
        Some(n) => usize::from(n).max(1),
        None => std::thread::available_parallelism()
            .map(|n| (n.get() / 2).max(1))
            .unwrap_or(1),
    }
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// A throwaway cluster in this process: in-process SSH nodes with a
    /// kubelet, a pod and a service each, and the real serve path in front
    /// of them. No root, no sshd, no config file. Runs until Ctrl-C.
    Dev {
        /// How many nodes.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=200))]
        nodes: u8,
        /// Take this node down after a few seconds and bring it back,
        /// every 30 s, to watch recovery in `status`.
        #[arg(long, value_name = "NODE")]
        fail_node: Option<String>,
    },
    /// Keep tunnels to every node and serve the front door until SIGTERM/SIGINT.
    Serve {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Pipe stdin/stdout through one direct-tcpip channel of NODE's session
    /// (like `ssh -W HOST:PORT`).
    Dial {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
        /// Node name from the configuration.
        node: String,
        /// Destination as seen from the node.
        target: String,
    },
    /// Show the tunnels of a running sidecar (from its admin API): trouble
    /// first, then a summary line.
    Status {
        /// Where the admin API is.
        #[command(flatten)]
        admin: AdminArgs,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = status::Output::Table)]
        output: status::Output,
    },
    /// Check one node step by step (resolve, TCP, SSH banner, key exchange,
    /// host key, authentication, direct-tcpip, kubelet /healthz), without a
    /// running sidecar. Exit 0 only when every step passes; otherwise 3-10
    /// names the failed step.
    Check {
        /// Configuration file (TOML): key, known_hosts, timeouts, nodes.
        #[arg(long, short, env = "NODETUNNEL_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Node name from the configuration, or an address (`host`, `host:port`, `[v6]:port`).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        target: Option<String>,
        /// Check every node of the configuration, in parallel, and end with a summary table.
        #[arg(long)]
        all: bool,
        /// Nodes checked at once with --all.
        #[arg(long, default_value_t = 16)]
        parallel: usize,
        /// Kubelet host as seen from the node [default: the node's
        /// preferred address (its first address), which is what
        /// kube-apiserver dials through the tunnel].
        #[arg(long)]
        kubelet_host: Option<String>,
        /// Kubelet port.
        #[arg(long, default_value_t = 10250)]
        kubelet_port: u16,
        /// Verify the kubelet's serving certificate against this CA bundle
        /// (PEM), for the name --kubelet-host, as kube-apiserver does with
        /// --kubelet-certificate-authority; without it the certificate is
        /// not verified.
        #[arg(long, value_name = "FILE")]
        kubelet_ca: Option<PathBuf>,
        /// Print one JSON document (the steps, or with --all every node and
        /// the count) when done, instead of the steps as they run; same
        /// exit status.
        #[arg(long)]
        json: bool,
    },
    /// Show where a destination would be tunnelled (rule and node), offline
    /// from the configuration file. Exit 0 when routed, 1 when refused.
    Route {
        /// Configuration file (TOML).
        #[arg(long, short, env = "NODETUNNEL_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Destination: `host:port` or `[v6]:port`.
        dest: String,
        /// Print JSON instead of one line.
        #[arg(long)]
        json: bool,
    },
    /// A live terminal view of the tunnels of a running sidecar; q quits.
    Top {
        /// Where the admin API is.
        #[command(flatten)]
        admin: AdminArgs,
        /// Refresh interval.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        interval: Duration,
    },
    /// Manage the client key.
    Keys {
        /// What to do with keys.
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Print the shell completion script for SHELL to stdout, for example
    /// `nodetunnel completions bash > /usr/share/bash-completion/completions/nodetunnel`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: shell::CompletionShell,
    },
    /// Print the manual page nodetunnel(1) (roff) to stdout, for example
    /// `nodetunnel man > /usr/share/man/man1/nodetunnel.1`; with --dir, write
    /// it and one page per subcommand there.
    Man {
        /// Write nodetunnel.1 and nodetunnel-SUBCOMMAND.1 pages into this
        /// directory instead.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// Where the configuration file is by default.
pub const DEFAULT_CONFIG: &str = "/etc/nodetunnel/nodetunnel.toml";

/// How to reach a running sidecar's admin API.
#[derive(Clone, Debug, Args)]
pub struct AdminArgs {
    /// Admin API URL (`[admin] listen`).
    #[arg(long, env = "NODETUNNEL_ADMIN", default_value = client::DEFAULT_ADMIN_URL)]
    pub admin: String,
    /// Admin API Unix socket (`[admin] uds`), instead of --admin.
    #[arg(long, env = "NODETUNNEL_ADMIN_UDS")]
    pub admin_uds: Option<PathBuf>,
    /// How long to wait for an answer.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

impl AdminArgs {
    fn client(&self, command: &str) -> Result<client::AdminClient, ExitCode> {
        client::AdminClient::new(&self.admin, self.admin_uds.as_deref(), self.timeout).map_err(
            |e| {
                eprintln!("nodetunnel {command}: {e}");
                ExitCode::from(2)
            },
        )
    }
}

/// `keys` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Generate an ed25519 key pair (private key mode 0600); print the
    /// authorized_keys line and fingerprint. Never overwrites a key.
    Generate {
        /// Directory for the key files.
        #[arg(long, default_value = "keys")]
        dir: PathBuf,
        /// File name of the private key (`.pub` is added for the public key).
        #[arg(long, default_value = "id_ed25519")]
        name: String,
        /// Comment stored in the key.
        #[arg(long, default_value = "nodetunnel")]
        comment: String,
    },
    /// Show what an OpenSSH certificate (`*-cert.pub`) says, as
    /// `ssh-keygen -L` does: type, key id, serial, validity, principals,
    /// critical options, extensions and the signing CA's fingerprint.
    Inspect {
        /// The certificate file.
        file: PathBuf,
    },
}

/// Run a parsed command line; the exit code says how it went.
pub async fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Dev { nodes, fail_node } => {
            crate::dev::run(crate::dev::DevOptions { nodes, fail_node }).await
        }
        Command::Serve { config } => serve::run(&config).await,
        Command::Dial {
            config,
            node,
            target,
        } => dial(&config, &node, &target).await,
        Command::Keys {
            command: KeysCommand::Generate { dir, name, comment },
        } => keys_generate(&dir, &name, &comment),
        Command::Keys {
            command: KeysCommand::Inspect { file },
        } => inspect::run(&file),
        Command::Status { admin, output } => match admin.client("status") {
            Ok(client) => status::run(&client, output).await,
            Err(code) => code,
        },
        Command::Check {
            config,
            target,
            all,
            parallel,
            kubelet_host,
            kubelet_port,
            kubelet_ca,
            json,
        } => {
            let options = check::CheckOptions {
                json,
                kubelet_ca,
                target,
                all,
                parallel,
                kubelet_host,
                kubelet_port,
            };
            check::run(&config, options).await
        }
        Command::Route { config, dest, json } => route::run(&config, &dest, json),
        Command::Top { admin, interval } => match admin.client("top") {
            Ok(client) => top::run(client, interval).await,
            Err(code) => code,
        },
        Command::Completions { shell } => shell::run_completions(shell),
        Command::Man { dir } => shell::run_man(dir.as_deref()),
    }
}

fn keys_generate(dir: &std::path::Path, name: &str, comment: &str) -> ExitCode {
    match crate::keys::generate(dir, name, comment) {
        Ok(key) => {
            println!("{}", key.authorized_keys_line);
            eprintln!("private key: {}", key.private_path.display());
            eprintln!("public key:  {}", key.public_path.display());
            eprintln!("fingerprint: {}", key.fingerprint);
            eprintln!("add the line above to ~/.ssh/authorized_keys of ssh.user on every node");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("nodetunnel keys generate: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn dial(config_path: &std::path::Path, node: &str, target: &str) -> ExitCode {
    let fail = |message: String| {
        eprintln!("nodetunnel dial: {message}");
        ExitCode::FAILURE
    };
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => return fail(e.to_string()),
    };
    let dest = match crate::proxy::parse_connect_target(target) {
        Ok(d) => d,
        Err(e) => return fail(format!("{target:?}: {e}")),
    };
    let Some(spec) = config.nodes.iter().find(|n| n.name == node).cloned() else {
        let known: Vec<&str> = config.nodes.iter().map(|n| n.name.as_str()).collect();
        return fail(format!(
            "no node named {node:?} in {} (nodes: {})",
            config_path.display(),
            known.join(", ")
        ));
    };
    // One node, no front door: the serve-time descriptor check (listeners,
    // proxy.max_connections) does not apply to a dial.
    let manager_config = crate::manager::ManagerConfig {
        descriptors: crate::descriptors::DescriptorBudget::default(),
        ..crate::manager::ManagerConfig::from(&config)
    };
    let manager = match TunnelManager::new(
        manager_config,
        config.routing.clone(),
        Arc::new(Metrics::new()),
    ) {
        Ok(m) => m,
        Err(e) => return fail(e.to_string()),
    };
    manager.apply(vec![spec]);
    let ssh = &config.ssh;
    let budget =
        ssh.connect_timeout + ssh.handshake_timeout + ssh.auth_timeout + Duration::from_secs(1);
    if let Err(e) = manager.wait_ready(node, budget).await {
        manager.shutdown(Duration::ZERO).await;
        return fail(format!("node {node}: {e}"));
    }
    let mut stream = match manager
        .dial_node(node, &dest.host.to_string(), dest.port)
        .await
    {
        Ok(s) => s,
        Err(e) => {
            manager.shutdown(Duration::ZERO).await;
            return fail(e.to_string());
        }
    };
    let mut stdio = tokio::io::join(tokio::io::stdin(), tokio::io::stdout());
    let result = crate::splice::splice(&mut stdio, &mut stream).await;
    drop(stream);
    manager.shutdown(Duration::from_secs(1)).await;
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => fail(e.to_string()),
    }
}
