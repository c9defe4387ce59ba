//! The fixture of the fault-injection suite: a three-node namespace
//! testbed with checksum servers on every node, `nodetunnel serve` (the
//! real binary) in the control-plane namespace with short timers, its JSON
//! log, its admin API over a Unix socket, and /proc sampling of the process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

pub use crate::support::serve::is_event;
use crate::support::serve::{
    keyed_testbed, node_toml, preflight_root, server_in_ns, write_file, ServeProcess,
};
use crate::support::*;

/// Where the checksum servers listen on every node IP.
pub const SOURCE_PORT: u16 = 7001;
pub const SINK_PORT: u16 = 7002;
pub const ECHO_PORT: u16 = 7003;
/// What each node's Source sends. A client paused after 1 MiB can hold at
/// most ~3.5 MiB (its socket buffer, the 64 KiB splice buffer, one 2 MiB
/// SSH window), so a paused download is really mid-stream.
pub const SOURCE_LEN: u64 = 6 * 1024 * 1024;

/// Bound on `serve` getting every node Ready.
pub const START_TIMEOUT: Duration = Duration::from_secs(40);
/// Bound on any state the sidecar must reach (a log line, an admin state).
pub const STATE_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on the answer to a CONNECT. dial_timeout is 3 s (12 s on the
/// delay line) and the front door adds 1 s: anything slower is a hang.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Bound on the exit after SIGTERM (drain_timeout is at most 15 s here).
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(40);

/// What kube-apiserver requires after its CONNECT, with nothing after it.
pub const CONNECT_OK: &[u8] = b"HTTP/1.1 200 Connection Established\r\n\r\n";

/// Fail (never skip) when the machine cannot run the suite.
pub fn preflight() {
    preflight_root(
        "reliability_faults",
        "network namespaces, sshd on port 22 of every node, tc",
    );
}

/// Run blocking code (testbed scripts, log waits) from a multi-thread
/// tokio test without stalling the runtime's other tasks.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// A three-node bed; on every node IP a Source (sends [`SOURCE_LEN`] bytes
/// of `PatternGen(seed = node index)`), a Sink (answers count and SHA-256)
/// and an Echo. Fields drop in order: servers, bed, key, temp dir.
pub struct Cluster {
    /// Kept running until the cluster drops.
    _servers: Vec<ServerHandle>,
    pub bed: Testbed,
    pub key: ClientKey,
    pub dir: tempfile::TempDir,
}

/// Knobs of one `serve` configuration (everything else is the suite's
/// standard short-timer config).
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub host_key_policy: &'static str,
    /// known_hosts; default: the bed's.
    pub known_hosts: Option<PathBuf>,
    pub drain_timeout: &'static str,
    /// `ssh.keepalive_interval` and `ssh.keepalive_max`: the suite's short
    /// `1s` x 2 unless a test needs nodetunnel's defaults.
    pub keepalive: (&'static str, u32),
    /// `proxy.dial_timeout`: the suite's `3s` unless a test's link is so
    /// slow that a channel open waits seconds behind queued data.
    pub dial_timeout: &'static str,
    /// `[[nodes]]` entries: (node index, extra pod CIDRs).
    pub nodes: Vec<(usize, Vec<String>)>,
    /// `ssh.backoff_base`, `ssh.backoff_max`, `ssh.backoff_reset_after`:
    /// the suite's `100ms`..`1s` (reset after `30s`) unless a test needs
    /// the backoff out of the way.
    pub backoff: (&'static str, &'static str, &'static str),
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            host_key_policy: "strict",
            known_hosts: None,
            drain_timeout: "5s",
            keepalive: ("1s", 2),
            dial_timeout: "3s",
            nodes: vec![(1, vec![]), (2, vec![]), (3, vec![])],
            backoff: ("100ms", "1s", "30s"),
        }
    }
}

impl Cluster {
    pub fn up() -> Cluster {
        preflight();
        let (dir, key, bed) = keyed_testbed("nt-rf-", 3);
        let mut servers = Vec::new();
        for n in bed.nodes() {
            servers.push(server_in_ns(
                &bed,
                &n.ns,
                ServerKind::source(
                    SocketAddr::from((n.ip, SOURCE_PORT)),
                    SOURCE_LEN,
                    n.index as u64,
                ),
            ));
            servers.push(server_in_ns(
                &bed,
                &n.ns,
                ServerKind::sink(SocketAddr::from((n.ip, SINK_PORT))),
            ));
            servers.push(server_in_ns(
                &bed,
                &n.ns,
                ServerKind::echo(SocketAddr::from((n.ip, ECHO_PORT))),
            ));
        }
        Cluster {
            _servers: servers,
            bed,
            key,
            dir,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `10.240.0.1I:port`
    pub fn target(&self, node: usize, port: u16) -> String {
        format!("{}:{port}", self.bed.node(node).ip)
    }

    /// Write `<tag>.toml` and return its path. Timers: keepalive 1 s x 2
    /// (a silent node is dead within 3 s; `opts.keepalive` may say
    /// otherwise), backoff 100 ms..1 s, TCP connect
    /// bound 1 s, dial bound 3 s. Proxy and admin API on Unix sockets
    /// `<tag>.sock`, `<tag>-admin.sock`; no TCP listener, so several
    /// `serve` can share the namespace.
    pub fn write_config(&self, tag: &str, opts: &ServeOptions) -> PathBuf {
        let known_hosts = opts
            .known_hosts
            .clone()
            .unwrap_or_else(|| self.bed.known_hosts_path());
        let mut text = format!(
            r#"[ssh]
user = {user:?}
identity = {identity:?}
known_hosts = {known_hosts:?}
host_key_policy = "{policy}"
connect_timeout = "1s"
handshake_timeout = "5s"
auth_timeout = "5s"
keepalive_interval = "{keepalive_interval}"
keepalive_max = {keepalive_max}
backoff_base = "{backoff_base}"
backoff_max = "{backoff_max}"
backoff_reset_after = "{backoff_reset_after}"
drain_timeout = "{drain}"

[proxy]
uds = {proxy:?}
dial_timeout = "{dial_timeout}"

[admin]
listen = ""
uds = {admin:?}
"#,
            user = self.bed.ssh_user(),
            identity = self.key.private_path,
            policy = opts.host_key_policy,
            drain = opts.drain_timeout,
            dial_timeout = opts.dial_timeout,
            backoff_base = opts.backoff.0,
            backoff_max = opts.backoff.1,
            backoff_reset_after = opts.backoff.2,
            keepalive_interval = opts.keepalive.0,
            keepalive_max = opts.keepalive.1,
            proxy = self.path(&format!("{tag}.sock")),
            admin = self.path(&format!("{tag}-admin.sock")),
        );
        for (i, extra) in &opts.nodes {
            text.push_str(&node_toml(self.bed.node(*i), extra));
        }
        write_file(self.path(&format!("{tag}.toml")), &text)
    }

    /// The directory of node `i`'s sshd (config, host key, pid file).
    pub fn node_dir(&self, i: usize) -> PathBuf {
        let pid_file = self
            .bed
            .var(&format!("NT_NODE_{i}_SSHD_PID_FILE"))
            .expect("testbed.env names the sshd pid file");
        Path::new(&pid_file)
            .parent()
            .expect("pid file has a directory")
            .to_path_buf()
    }

    /// The host key file node `i`'s sshd uses (its `HostKey` line).
    pub fn host_key_file(&self, i: usize) -> PathBuf {
        let config = self.node_dir(i).join("sshd_config");
        let text = std::fs::read_to_string(&config)
            .unwrap_or_else(|e| panic!("reading {}: {e}", config.display()));
        text.lines()
            .find_map(|l| l.strip_prefix("HostKey "))
            .map(|p| PathBuf::from(p.trim()))
            .unwrap_or_else(|| panic!("no HostKey line in {}", config.display()))
    }
}

// ---------------------------------------------------------------------------
// The process under test
// ---------------------------------------------------------------------------

/// A running `nodetunnel serve` in the control-plane namespace
/// ([`ServeProcess`]: its log, signals, graceful stop, Drop) with its proxy
/// and admin sockets.
pub struct NodeTunnel {
    pub proxy: PathBuf,
    pub admin: PathBuf,
    serve: ServeProcess,
}

impl std::ops::Deref for NodeTunnel {
    type Target = ServeProcess;

    fn deref(&self) -> &ServeProcess {
        &self.serve
    }
}

impl std::ops::DerefMut for NodeTunnel {
    fn deref_mut(&mut self) -> &mut ServeProcess {
        &mut self.serve
    }
}

/// /proc figures of a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcSample {
    pub fds: usize,
    pub threads: usize,
    pub rss_kib: u64,
}

impl NodeTunnel {
    /// Start `serve --config <tag>.toml` (written with `opts`) and return
    /// once the front door listens and every configured node logged
    /// "tunnel ready".
    pub fn start(cluster: &Cluster, tag: &str, opts: &ServeOptions) -> NodeTunnel {
        let config = cluster.write_config(tag, opts);
        let serve = ServeProcess::spawn(&cluster.bed, tag, &config, Duration::from_secs(10));
        let pid = serve.pid();
        let nt = NodeTunnel {
            proxy: cluster.path(&format!("{tag}.sock")),
            admin: cluster.path(&format!("{tag}-admin.sock")),
            serve,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        nt.expect_log(0, START_TIMEOUT, "front door listening", None);
        nt.expect_log(0, START_TIMEOUT, "admin API listening", None);
        for (i, _) in &opts.nodes {
            let left = deadline.saturating_duration_since(Instant::now());
            nt.expect_log(0, left, "tunnel ready", Some(&cluster.bed.node(*i).name));
        }
        // `ip netns exec` execs the program: the child is nodetunnel itself.
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        assert_eq!(comm.trim(), "nodetunnel", "pid {pid} is not the sidecar");
        nt
    }

    /// /proc/<pid>: open descriptors, threads, resident set.
    pub fn sample(&self) -> ProcSample {
        let pid = self.pid();
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or_else(|e| panic!("reading /proc/{pid}/fd: {e}"));
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

    /// Graceful shutdown: SIGTERM must make it drain and exit 0, logging
    /// "stopped" last.
    pub fn stop(self) {
        self.serve.stop(EXIT_TIMEOUT);
    }

    // -- admin API over its Unix socket --------------------------------

    /// GET `path` on the admin API.
    pub async fn admin_get(&self, path: &str) -> Result<HttpResponse> {
        let mut s = UnixStream::connect(&self.admin)
            .await
            .with_context(|| format!("connecting to {}", self.admin.display()))?;
        tokio::time::timeout(Duration::from_secs(10), http_get(&mut s, "localhost", path))
            .await
            .map_err(|_| anyhow!("admin GET {path} timed out"))?
    }

    /// POST `path` (no body); (status, body).
    pub async fn admin_post(&self, path: &str) -> Result<(u16, String)> {
        let mut s = UnixStream::connect(&self.admin).await?;
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nX-Nodetunnel-Request: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
            .await
            .map_err(|_| anyhow!("admin POST {path} timed out"))??;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("no status line in {text:?}"))?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        Ok((status, body.to_owned()))
    }

    /// `GET /api/v1/tunnels`.
    pub async fn tunnels(&self) -> Value {
        let r = self
            .admin_get("/api/v1/tunnels")
            .await
            .unwrap_or_else(|e| panic!("GET /api/v1/tunnels: {e:#}"));
        assert_eq!(r.status, 200, "GET /api/v1/tunnels: {}", r.text());
        serde_json::from_slice(&r.body).expect("tunnel list JSON")
    }

    /// `GET /api/v1/tunnels/{node}`.
    pub async fn tunnel(&self, node: &str) -> Value {
        let path = format!("/api/v1/tunnels/{node}");
        let r = self
            .admin_get(&path)
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e:#}"));
        assert_eq!(r.status, 200, "GET {path}: {}", r.text());
        serde_json::from_slice(&r.body).expect("tunnel JSON")
    }

    /// `GET /metrics`.
    pub async fn metrics(&self) -> String {
        let r = self
            .admin_get("/metrics")
            .await
            .unwrap_or_else(|e| panic!("GET /metrics: {e:#}"));
        assert_eq!(r.status, 200);
        r.text()
    }

    /// Poll `probe` until it returns `Some`, within `timeout`; panics with
    /// `what` and the log.
    pub async fn until<T, F, Fut>(&self, what: &str, timeout: Duration, probe: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let context = || format!("nodetunnel {}: its log:\n{}", self.name, self.log.dump());
        crate::support::poll::until(what, timeout, context, probe).await
    }

    /// Wait until `node`'s tunnel document satisfies `pred`; returns it.
    pub async fn until_tunnel(
        &self,
        node: &str,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        self.until(&format!("{node}: {what}"), STATE_TIMEOUT, || async {
            let v = self.tunnel(node).await;
            pred(&v).then_some(v)
        })
        .await
    }
}

// ---------------------------------------------------------------------------
// Metrics text
// ---------------------------------------------------------------------------

/// The value of the sample `name{labels...}` (labels given must all match;
/// others may be present). None when absent.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.strip_suffix('}')?),
            None => (series, ""),
        };
        if n != name {
            return None;
        }
        let ok = labels
            .iter()
            .all(|(k, v)| rest.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
        ok.then(|| value.parse().ok()).flatten()
    })
}

// ---------------------------------------------------------------------------
// The apiserver-like CONNECT client over the proxy's Unix socket
// ---------------------------------------------------------------------------

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Read exactly the response head, byte by byte: after a 200 the node may
/// speak first (a Source does), and its bytes belong to the stream.
async fn read_head<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>) -> Result<()> {
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = s
            .read(&mut byte)
            .await
            .context("reading the response head")?;
        if n == 0 {
            bail!(
                "connection closed before a complete response head; got {:?}",
                String::from_utf8_lossy(buf)
            );
        }
        buf.push(byte[0]);
    }
    Ok(())
}

/// A refused CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub body: String,
}

/// The answer to one CONNECT.
#[derive(Debug)]
pub enum Dialled {
    Open(UnixStream),
    Refused(Refusal),
}

/// Send kube-apiserver's CONNECT over `uds`; the tunnel (after exactly
/// [`CONNECT_OK`]) or the refusal (read to EOF). An error when the answer
/// does not come within [`CONNECT_TIMEOUT`] (a hang) or is malformed.
pub async fn dial(uds: &Path, target: &str) -> Result<Dialled> {
    let mut s = UnixStream::connect(uds)
        .await
        .with_context(|| format!("connecting to {}", uds.display()))?;
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(CONNECT_TIMEOUT, read_head(&mut s, &mut buf))
        .await
        .map_err(|_| anyhow!("CONNECT {target}: no answer within {CONNECT_TIMEOUT:?} (hung)"))??;
    if buf.starts_with(b"HTTP/1.1 200") {
        anyhow::ensure!(
            buf == CONNECT_OK,
            "CONNECT {target}: expected exactly {:?}, got {:?}",
            String::from_utf8_lossy(CONNECT_OK),
            String::from_utf8_lossy(&buf)
        );
        return Ok(Dialled::Open(s));
    }
    tokio::time::timeout(CONNECT_TIMEOUT, s.read_to_end(&mut buf))
        .await
        .map_err(|_| anyhow!("CONNECT {target}: the refusal did not end (hung)"))?
        .context("reading the refusal")?;
    let end = find(&buf, b"\r\n\r\n").expect("head was complete") + 4;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad status line in {head:?}"))?;
    Ok(Dialled::Refused(Refusal {
        status,
        body: String::from_utf8_lossy(&buf[end..]).into_owned(),
    }))
}

/// A CONNECT that must be refused; the refusal.
pub async fn expect_refused(uds: &Path, target: &str) -> Refusal {
    match dial(uds, target).await {
        Ok(Dialled::Refused(r)) => r,
        Ok(Dialled::Open(_)) => panic!("CONNECT {target}: expected a refusal, got a tunnel"),
        Err(e) => panic!("CONNECT {target}: {e:#}"),
    }
}
