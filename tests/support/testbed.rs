//! A multi-node cluster in network namespaces, built by
//! `tests/testbed/testbed.sh` (see the script's header for the layout).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context, Result};

use super::servers::{spawn_server, ServerHandle, ServerKind};

/// The testbed script.
pub fn script_path() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/testbed/testbed.sh"
    ))
}

/// One node of the bed. Indices are 1-based everywhere (node-1 is index 1).
#[derive(Clone, Debug)]
pub struct Node {
    pub index: usize,
    /// `node-I`
    pub name: String,
    /// Its network namespace.
    pub ns: String,
    /// 10.240.0.(10+I); sshd listens on port 22 there.
    pub ip: Ipv4Addr,
    /// 10.244.I.0/24
    pub pod_cidr: String,
    /// 10.244.I.10 (on the node's lo).
    pub pod_ip: Ipv4Addr,
    /// `ssh-ed25519 AAAA...` of the node's sshd.
    pub host_key: String,
    pub sshd_log: PathBuf,
    /// The node's authorized_keys file (sshd rereads it on each login).
    pub authorized_keys: PathBuf,
}

impl Node {
    /// ip:22
    pub fn ssh_addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip, 22))
    }
}

/// A running testbed; `down` runs on Drop (also when the test panics).
pub struct Testbed {
    dir: tempfile::TempDir,
    env: BTreeMap<String, String>,
    nodes: Vec<Node>,
    down_done: bool,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn require_root() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the namespace testbed needs root (network namespaces, sshd on port 22); run the tests as root, as CI does");
    }
    Ok(())
}

fn run_script(args: &[&str], envs: &[(&str, String)]) -> Result<String> {
    let script = script_path();
    let mut cmd = Command::new("bash");
    cmd.arg(&script).args(args).stdin(Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .with_context(|| format!("running bash {} {}", script.display(), args.join(" ")))?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        let stdout = String::from_utf8_lossy(&out.stdout);
        let said = if stdout.trim().is_empty() && stderr.trim().is_empty() {
            "(it printed nothing)".to_owned()
        } else {
            format!("{stdout}{stderr}")
        };
        bail!(
            "testbed.sh {} failed ({}):\n{said}",
            args.join(" "),
            out.status,
        );
    }
    Ok(stderr)
}

/// Parse `KEY='VALUE'` (or `KEY=VALUE`) lines.
pub fn parse_env(text: &str) -> Result<BTreeMap<String, String>> {
    let mut map = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .with_context(|| format!("testbed.env line {}: no '=' in {line:?}", n + 1))?;
        let v = v
            .strip_prefix('\'')
            .and_then(|v| v.strip_suffix('\''))
            .unwrap_or(v);
        map.insert(k.to_owned(), v.to_owned());
    }
    Ok(map)
}

impl Testbed {
    /// Build a bed with `nodes` nodes whose sshd authorize `authorized_key`
    /// for root. Removes beds left by crashed runs first (`testbed.sh gc`).
    pub fn up(nodes: usize, authorized_key: &str) -> Result<Testbed> {
        require_root()?;
        super::require_sshd(Path::new(super::sshd::SSHD_PATH))?;
        run_script(&["gc"], &[]).context("collecting leftover testbeds")?;
        let dir = tempfile::Builder::new()
            .prefix("nt-testbed-")
            .tempdir()
            .context("creating testbed dir")?;
        let prefix = format!(
            "nt{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let dir_str = dir
            .path()
            .to_str()
            .context("temp dir path is not UTF-8")?
            .to_owned();
        run_script(
            &["up", &dir_str],
            &[
                ("NT_PREFIX", prefix.clone()),
                ("NT_NODES", nodes.to_string()),
                ("NT_AUTHORIZED_KEY", authorized_key.trim().to_owned()),
                ("NT_OWNER_PID", std::process::id().to_string()),
            ],
        )
        .with_context(|| format!("bringing up testbed {prefix} with {nodes} node(s)"))?;
        // From here on, Drop tears the bed down even if parsing fails.
        let mut bed = Testbed {
            dir,
            env: BTreeMap::new(),
            nodes: Vec::new(),
            down_done: false,
        };
        let env_path = bed.dir.path().join("testbed.env");
        let text = std::fs::read_to_string(&env_path)
            .with_context(|| format!("reading {}", env_path.display()))?;
        bed.env = parse_env(&text)?;
        for i in 1..=nodes {
            let get = |k: &str| bed.var(&format!("NT_NODE_{i}_{k}"));
            bed.nodes.push(Node {
                index: i,
                name: get("NAME")?,
                ns: get("NS")?,
                ip: get("IP")?.parse().context("node IP")?,
                pod_cidr: get("POD_CIDR")?,
                pod_ip: get("POD_IP")?.parse().context("pod IP")?,
                host_key: get("HOST_KEY")?,
                sshd_log: get("SSHD_LOG")?.into(),
                authorized_keys: get("AUTHORIZED_KEYS")?.into(),
            });
        }
        Ok(bed)
    }

    /// A value from testbed.env (e.g. "NT_CP_NS").
    pub fn var(&self, key: &str) -> Result<String> {
        self.env
            .get(key)
            .cloned()
            .with_context(|| format!("testbed.env has no {key}"))
    }

    pub fn env(&self) -> &BTreeMap<String, String> {
        &self.env
    }

    /// The state directory (keys, configs, logs, testbed.env).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn prefix(&self) -> &str {
        &self.env["NT_PREFIX"]
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Node `i`, 1-based. Panics when out of range.
    pub fn node(&self, i: usize) -> &Node {
        assert!(
            (1..=self.nodes.len()).contains(&i),
            "node index {i} out of 1..={}",
            self.nodes.len()
        );
        &self.nodes[i - 1]
    }

    pub fn node_names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name.clone()).collect()
    }

    pub fn node_ips(&self) -> Vec<Ipv4Addr> {
        self.nodes.iter().map(|n| n.ip).collect()
    }

    pub fn pod_ips(&self) -> Vec<Ipv4Addr> {
        self.nodes.iter().map(|n| n.pod_ip).collect()
    }

    /// 10.96.0.10, on every node's lo.
    pub fn service_ip(&self) -> Ipv4Addr {
        self.env["NT_SERVICE_IP"].parse().expect("NT_SERVICE_IP")
    }

    /// The control-plane namespace (where the proxy under test runs).
    pub fn cp_ns(&self) -> &str {
        &self.env["NT_CP_NS"]
    }

    /// 10.240.0.1
    pub fn cp_ip(&self) -> Ipv4Addr {
        self.env["NT_CP_IP"].parse().expect("NT_CP_IP")
    }

    pub fn fabric_ns(&self) -> &str {
        &self.env["NT_FABRIC_NS"]
    }

    /// known_hosts with one `10.240.0.1I ssh-ed25519 AAAA...` line per node.
    pub fn known_hosts_path(&self) -> PathBuf {
        PathBuf::from(&self.env["NT_KNOWN_HOSTS"])
    }

    /// The SSH user on the nodes (root).
    pub fn ssh_user(&self) -> &str {
        &self.env["NT_SSH_USER"]
    }

    /// Node `i`'s sshd log (LogLevel VERBOSE).
    pub fn sshd_log(&self, i: usize) -> String {
        std::fs::read(&self.node(i).sshd_log)
            .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
            .unwrap_or_default()
    }

    /// Replace node `i`'s authorized_keys (empty string: nobody gets in).
    pub fn set_authorized_keys(&self, i: usize, keys: &str) -> Result<()> {
        super::sshd::write_atomic(&self.node(i).authorized_keys, keys.as_bytes())
    }

    fn node_cmd(&self, cmd: &str, i: usize) -> Result<()> {
        self.node(i);
        let dir = self.dir.path().to_str().unwrap().to_owned();
        run_script(&[cmd, &dir, &i.to_string()], &[])
            .with_context(|| format!("{cmd} node-{i} of testbed {}", self.prefix()))?;
        Ok(())
    }

    /// kill -9 node `i`'s sshd and its sessions.
    pub fn stop_node(&self, i: usize) -> Result<()> {
        self.node_cmd("stop-node", i)
    }

    /// Start node `i`'s sshd again (same host key); returns once it answers.
    pub fn start_node(&self, i: usize) -> Result<()> {
        self.node_cmd("start-node", i)
    }

    /// Take node `i`'s link down: a blackhole (packets vanish, no errors).
    pub fn link_down(&self, i: usize) -> Result<()> {
        self.node_cmd("link-down", i)
    }

    pub fn link_up(&self, i: usize) -> Result<()> {
        self.node_cmd("link-up", i)
    }

    /// `ip netns exec <ns> program`.
    pub fn command_in_ns(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.arg("netns").arg("exec").arg(ns).arg(program);
        c
    }

    /// `ip netns exec <cp> program`.
    pub fn command_in_cp(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        Self::command_in_ns(self.cp_ns(), program)
    }

    /// `ip netns exec <node i> program`.
    pub fn command_in_node(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        Self::command_in_ns(&self.node(i).ns, program)
    }

    /// Run a server inside namespace `ns` (see [`spawn_in_ns`]).
    pub fn spawn_in_ns(&self, ns: &str, server: ServerKind) -> Result<ServerHandle> {
        spawn_in_ns(ns, server)
    }

    /// Names of the namespaces of this bed that exist now.
    pub fn existing_namespaces(&self) -> Result<Vec<String>> {
        namespaces_with_prefix(self.prefix())
    }

    /// Tear down now (Drop does it too); idempotent.
    pub fn down(&mut self) -> Result<()> {
        let dir = self.dir.path().to_str().unwrap().to_owned();
        run_script(&["down", &dir], &[])?;
        self.down_done = true;
        Ok(())
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for n in &self.nodes {
                let log = std::fs::read_to_string(&n.sshd_log)
                    .unwrap_or_default()
                    .replace('\r', "");
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                eprintln!("--- {} sshd log (last lines), test failed ---", n.name);
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        if !self.down_done {
            if let Err(e) = self.down() {
                eprintln!("testbed teardown failed: {e:#}");
            }
        }
    }
}

/// Namespaces (from `ip netns list`) named `PREFIX-...`.
pub fn namespaces_with_prefix(prefix: &str) -> Result<Vec<String>> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .context("running ip netns list")?;
    let want = format!("{prefix}-");
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&want))
        .map(str::to_owned)
        .collect())
}

/// Run a server of `kind` on a dedicated thread inside network namespace
/// `ns`: the thread setns()es, builds a current-thread runtime and binds
/// there; this returns once the listener is bound. Dropping the handle stops
/// the server and joins the thread.
pub fn spawn_in_ns(ns: &str, server: ServerKind) -> Result<ServerHandle> {
    spawn_server(Some(ns), server)
}

pub use super::netns::{run_in_ns, run_in_ns_blocking};
