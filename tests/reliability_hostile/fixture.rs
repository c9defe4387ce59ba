//! The process under attack: the real `nodetunnel serve` binary, in a
//! process of its own so that /proc shows its descriptors, threads and
//! resident memory alone, with its front door on a Unix socket, TCP and
//! SOCKS5, its admin API on a Unix socket, and one node: an in-process SSH
//! node of the test process ([`super::node`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::node::{Echo, SshNode};

const NODETUNNEL: &str = env!("CARGO_BIN_EXE_nodetunnel");

/// Bound on anything the sidecar must reach (listening, node ready, a
/// gauge back at its baseline).
pub const DEADLINE: Duration = Duration::from_secs(30);
/// Pause between two polls of observable state.
pub const POLL: Duration = Duration::from_millis(50);

/// A destination no rule may reach: `routing.deny_cidrs` (TEST-NET-1).
pub const DENIED_CIDR: &str = "192.0.2.0/24";

/// What differs between the suite's sidecars.
#[derive(Clone, Debug)]
pub struct Options {
    /// `proxy.max_connections`.
    pub max_connections: usize,
    /// `proxy.header_read_timeout`, humantime.
    pub header_read_timeout: &'static str,
    /// `--log-level`.
    pub log_level: &'static str,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_connections: 10_000,
            header_read_timeout: "10s",
            log_level: "info",
        }
    }
}

/// /proc figures of a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcSample {
    pub fds: usize,
    pub threads: usize,
    pub rss_kib: u64,
}

impl std::fmt::Display for ProcSample {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} fds, {} threads, RSS {:.1} MiB",
            self.fds,
            self.threads,
            self.rss_kib as f64 / 1024.0
        )
    }
}

/// /proc/<pid>: open descriptors, threads, resident set.
pub fn sample(pid: i32) -> ProcSample {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/fd: {e}"))
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/status: {e}"));
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    ProcSample {
        fds,
        threads: field("Threads:") as usize,
        rss_kib: field("VmRSS:"),
    }
}

/// The soft and hard RLIMIT_NOFILE of this process (`None`: unlimited).
fn nofile_limits() -> (Option<u64>, Option<u64>) {
    let limits = std::fs::read_to_string("/proc/self/limits").expect("/proc/self/limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files in /proc/self/limits");
    let mut values = line["Max open files".len()..]
        .split_whitespace()
        .map(|v| v.parse::<u64>().ok());
    (values.next().flatten(), values.next().flatten())
}

/// Raise this process's soft RLIMIT_NOFILE to its hard limit if it is
/// below `needed` (with prlimit(1): the crate forbids unsafe code and nix's
/// resource feature is not enabled). Children (the sidecar) inherit it.
/// Panics with what to do when the hard limit is too low.
pub fn raise_nofile(needed: u64) {
    let (soft, hard) = nofile_limits();
    if soft.is_none_or(|s| s >= needed) {
        return;
    }
    let hard_text = hard.map_or("unlimited".to_string(), |h| h.to_string());
    let status = Command::new("prlimit")
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg(format!("--nofile={hard_text}:{hard_text}"))
        .status();
    let (soft, _) = nofile_limits();
    assert!(
        soft.is_none_or(|s| s >= needed),
        "this test needs RLIMIT_NOFILE >= {needed} (soft limit {soft:?}, hard {hard:?}; \
         prlimit: {status:?}): run it with `ulimit -n {needed}` or more"
    );
}

/// A running `nodetunnel serve` with its node and an echo server.
pub struct Sidecar {
    pub node: SshNode,
    pub echo: Echo,
    /// A loopback port where nothing listens.
    pub closed_port: u16,
    /// Holds `closed_port` (bound, never listening: a connect gets a
    /// reset) so that no other test's listener can take it meanwhile (a
    /// port bound and released again was taken by a parallel test's
    /// listener once, under load).
    _closed_port_holder: tokio::net::TcpSocket,
    pub tcp: SocketAddr,
    pub socks5: SocketAddr,
    pub uds: PathBuf,
    pub admin: PathBuf,
    pub pid: i32,
    log: PathBuf,
    child: Option<Child>,
    /// Keys, config, sockets and log; removed on drop.
    _dir: tempfile::TempDir,
}

impl Sidecar {
    /// Write keys, known_hosts and the config, start `serve`, and return
    /// once every listener is bound and the node's tunnel is ready.
    pub async fn start(opts: Options) -> Sidecar {
        let dir = tempfile::Builder::new()
            .prefix("nt-hostile-")
            .tempdir()
            .expect("temp dir");
        let key = nodetunnel::keys::generate(dir.path(), "id_ed25519", "hostile").expect("key");
        let identity = nodetunnel::keys::load_identity(&key.private_path, None).expect("identity");
        let node = SshNode::start(identity.public_key().clone()).await;
        let echo = Echo::start().await;
        let closed_port_holder = tokio::net::TcpSocket::new_v4().expect("socket");
        closed_port_holder
            .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("bind");
        let closed_port = closed_port_holder.local_addr().expect("addr").port();
        std::fs::write(
            dir.path().join("known_hosts"),
            format!("{}\n", node.known_hosts_line()),
        )
        .expect("known_hosts");
        let uds = dir.path().join("proxy.sock");
        let admin = dir.path().join("admin.sock");
        let config = format!(
            r#"[ssh]
user = "hostile"
identity = "id_ed25519"
known_hosts = "known_hosts"
connect_timeout = "5s"
keepalive_interval = "5s"
backoff_base = "50ms"
backoff_max = "500ms"
drain_timeout = "1s"

[routing]
# The echo server and the closed port are on 127.0.0.1, the node's address.
allow_cidrs = ["127.0.0.0/8"]
deny_cidrs = ["{DENIED_CIDR}"]

[proxy]
uds = {uds:?}
tcp = "127.0.0.1:0"
socks5 = "127.0.0.1:0"
dial_timeout = "5s"
max_connections = {max}
header_read_timeout = "{hrt}"

[admin]
listen = ""
uds = {admin:?}

[[nodes]]
name = "node-a"
addresses = ["127.0.0.1"]
ssh_port = {port}
"#,
            max = opts.max_connections,
            hrt = opts.header_read_timeout,
            port = node.addr.port(),
        );
        let config_path = dir.path().join("nodetunnel.toml");
        std::fs::write(&config_path, config).expect("config");
        let log = dir.path().join("serve.log");
        let child = Command::new(NODETUNNEL)
            .args(["--log-format", "json", "--log-level", opts.log_level])
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawning nodetunnel serve");
        let pid = child.id() as i32;
        let mut sidecar = Sidecar {
            node,
            echo,
            closed_port,
            _closed_port_holder: closed_port_holder,
            tcp: SocketAddr::from(([0, 0, 0, 0], 0)),
            socks5: SocketAddr::from(([0, 0, 0, 0], 0)),
            uds,
            admin,
            pid,
            log,
            child: Some(child),
            _dir: dir,
        };
        let s = &sidecar;
        let (tcp, socks5) = s
            .until("the front door listens", || async move {
                let (mut tcp, mut socks5) = (None, None);
                for v in s.events() {
                    if v["message"] == "listening" {
                        let addr = v["address"].as_str().and_then(|a| a.parse().ok());
                        match v["listener"].as_str() {
                            Some("tcp") => tcp = addr,
                            Some("socks5") => socks5 = addr,
                            _ => {}
                        }
                    }
                }
                Some((tcp?, socks5?))
            })
            .await;
        s.until("node-a is ready", || async move {
            let (status, body) = s.admin_get("/api/v1/tunnels/node-a").await.ok()?;
            let v: Value = serde_json::from_str(&body).ok()?;
            (status == 200 && v["state"] == "ready").then_some(())
        })
        .await;
        sidecar.tcp = tcp;
        sidecar.socks5 = socks5;
        sidecar
    }

    /// The sidecar's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its JSON log events so far.
    pub fn events(&self) -> Vec<Value> {
        self.log()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// How many log events have `message`.
    pub fn count_events(&self, message: &str) -> usize {
        self.events()
            .iter()
            .filter(|v| v["message"] == message)
            .count()
    }

    /// /proc figures of the sidecar.
    pub fn sample(&self) -> ProcSample {
        sample(self.pid)
    }

    /// GET on the admin API's Unix socket (HTTP/1.0: no chunking, the
    /// server closes); (status, body).
    pub async fn admin_get(&self, path: &str) -> std::io::Result<(u16, String)> {
        let exchange = async {
            let mut s = UnixStream::connect(&self.admin).await?;
            s.write_all(format!("GET {path} HTTP/1.0\r\nHost: admin\r\n\r\n").as_bytes())
                .await?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await?;
            Ok::<_, std::io::Error>(buf)
        };
        let buf = tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .map_err(|_| std::io::Error::other("admin request timed out"))??;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("no status line in {text:?}")))?;
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        Ok((status, body.to_string()))
    }

    /// `/metrics`.
    pub async fn metrics(&self) -> String {
        let (status, body) = self.admin_get("/metrics").await.expect("GET /metrics");
        assert_eq!(status, 200, "GET /metrics: {body}");
        body
    }

    /// One sample of `/metrics` (0 when the series does not exist yet).
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric(&self.metrics().await, name, labels).unwrap_or(0.0)
    }

    /// Poll `probe` until it returns `Some`, within [`DEADLINE`]; panics
    /// with the sidecar's log otherwise.
    pub async fn until<T, F, Fut>(&self, what: &str, probe: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let context = || format!("serve log:\n{}", self.tail());
        crate::poll::until(what, DEADLINE, context, probe).await
    }

    /// Wait until no client connection and no stream is open.
    pub async fn until_idle(&self) {
        self.until("no proxy connection and no stream open", || async move {
            let m = self.metrics().await;
            let conns = metric(&m, "nodetunnel_proxy_connections_open", &[])?;
            let streams = metric(&m, "nodetunnel_streams_open", &[])?;
            (conns == 0.0 && streams == 0.0).then_some(())
        })
        .await;
    }

    /// The last lines of the log (the whole log can be megabytes).
    pub fn tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// SIGTERM; the exit status must be success (a graceful drain), within
    /// [`DEADLINE`].
    pub fn stop(mut self) {
        let mut child = self.child.take().expect("running");
        let _ = kill(Pid::from_raw(self.pid), Signal::SIGTERM);
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = child.try_wait().expect("waiting for serve") {
                assert!(status.success(), "serve exited {status}:\n{}", self.tail());
                return;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("serve did not exit after SIGTERM:\n{}", self.tail());
            }
            std::thread::sleep(POLL);
        }
    }

    /// Whether the sidecar process is still running (not gone, not a
    /// zombie).
    pub fn alive(&self) -> bool {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) else {
            return false;
        };
        // The state follows the command name, which is in parentheses.
        let state = stat
            .rfind(')')
            .and_then(|end| stat[end + 1..].split_whitespace().next());
        !matches!(state, None | Some("Z") | Some("X"))
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            if std::thread::panicking() {
                eprintln!(
                    "--- nodetunnel serve log (tail) ---\n{}\n--- end ---",
                    self.tail()
                );
            }
        }
    }
}

/// The value of the series `name{labels}` in a Prometheus text exposition
/// (labels compared as a set; `None` if absent).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (label_text, value) = if let Some(inner) = rest.strip_prefix('{') {
            let Some((inner, value)) = inner.split_once('}') else {
                continue;
            };
            (inner, value)
        } else if rest.starts_with(' ') {
            ("", rest)
        } else {
            continue;
        };
        let mut found: Vec<(String, String)> = label_text
            .split(',')
            .filter(|p| !p.is_empty())
            .filter_map(|p| {
                let (k, v) = p.split_once('=')?;
                Some((k.to_string(), v.trim_matches('"').to_string()))
            })
            .collect();
        let mut want: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        found.sort();
        want.sort();
        if found == want {
            return value.trim().parse().ok();
        }
    }
    None
}

/// Print a measured figure for docs/reliability.md (`--nocapture`).
pub fn figure(test: &str, what: &str, value: impl std::fmt::Display) {
    eprintln!("figure: {test}: {what}: {value}");
}
