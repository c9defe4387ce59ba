//! The real `nodetunnel serve` binary in the control-plane namespace of a
//! [`Testbed`]: its JSON log (stderr, read by a thread), graceful stop
//! (SIGTERM, exit 0, "stopped" last) and a Drop that stops it (SIGTERM, then
//! SIGKILL) and prints its log when the test failed. Used by the suites
//! that drive the binary in a namespace testbed (`e2e_frontdoor`,
//! `reliability_faults`); each waits for its own readiness events.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use super::{ClientKey, ServerHandle, ServerKind, Testbed, SSHD_PATH};

/// `nodetunnel` arguments of a sidecar the suites run: JSON log lines at
/// info level, `serve --config` (the config path follows).
pub const SERVE_ARGS: [&str; 6] = [
    "--log-format",
    "json",
    "--log-level",
    "info",
    "serve",
    "--config",
];

/// The binary under test.
pub const NODETUNNEL: &str = env!("CARGO_BIN_EXE_nodetunnel");

/// Fail (never skip) when the machine cannot run a namespace suite: it must
/// run as root and have OpenSSH's sshd. `needs` says what root is for.
pub fn preflight_root(suite: &str, needs: &str) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "{suite} needs root ({needs}); \
         run `cargo test --test {suite}` as root, as CI does"
    );
    assert!(
        Path::new(SSHD_PATH).exists(),
        "OpenSSH sshd not found at {SSHD_PATH}: apt-get install openssh-server (bash .ci/run does this)"
    );
}

/// A fresh temp dir (`<prefix>XXXX`), a client key in it, and an `nodes`
/// node testbed that trusts the key.
pub fn keyed_testbed(prefix: &str, nodes: usize) -> (tempfile::TempDir, ClientKey, Testbed) {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("creating a temp dir");
    let key = ClientKey::generate(dir.path()).expect("generating the client key");
    let bed = Testbed::up(nodes, &key.public_line)
        .unwrap_or_else(|e| panic!("bringing up the testbed: {e:#}"));
    (dir, key, bed)
}

/// Start a test server in namespace `ns` of `bed`; panics on failure.
pub fn server_in_ns(bed: &Testbed, ns: &str, kind: ServerKind) -> ServerHandle {
    let what = format!("{kind:?} in {ns}");
    bed.spawn_in_ns(ns, kind)
        .unwrap_or_else(|e| panic!("starting {what}: {e:#}"))
}

/// One test server on every node of `bed`, each in its node's namespace:
/// `kind(node)`.
pub fn on_every_node(
    bed: &Testbed,
    kind: impl Fn(&super::Node) -> ServerKind,
) -> Vec<ServerHandle> {
    bed.nodes()
        .iter()
        .map(|n| server_in_ns(bed, &n.ns, kind(n)))
        .collect()
}

/// The `[[nodes]]` entry of testbed node `n`: its name, its IP, its pod
/// CIDR and `extra_pod_cidrs`.
pub fn node_toml(n: &super::Node, extra_pod_cidrs: &[String]) -> String {
    let mut cidrs = vec![n.pod_cidr.clone()];
    cidrs.extend(extra_pod_cidrs.iter().cloned());
    format!(
        "\n[[nodes]]\nname = {:?}\naddresses = [\"{}\"]\npod_cidrs = {:?}\n",
        n.name, n.ip, cidrs
    )
}

/// Write `text` to `path` (a config file); returns `path`.
pub fn write_file(path: PathBuf, text: &str) -> PathBuf {
    std::fs::write(&path, text).expect("writing the config file");
    path
}

// ---------------------------------------------------------------------------
// The JSON log of a `serve` process
// ---------------------------------------------------------------------------

#[derive(Default)]
struct LogState {
    lines: Vec<String>,
    eof: bool,
}

/// The stderr lines of a `serve` process (JSON, one event per line), filled
/// by a reader thread; waiters are woken on every line and at EOF.
#[derive(Clone, Default)]
pub struct Log(Arc<(Mutex<LogState>, Condvar)>);

impl Log {
    fn push(&self, line: Option<String>) {
        let (m, cv) = &*self.0;
        let mut s = m.lock().unwrap_or_else(|p| p.into_inner());
        match line {
            Some(l) => s.lines.push(l),
            None => s.eof = true,
        }
        cv.notify_all();
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LogState> {
        self.0 .0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn len(&self) -> usize {
        self.state().lines.len()
    }

    pub fn dump(&self) -> String {
        self.state().lines.join("\n")
    }

    /// Line `i`, parsed.
    pub fn event(&self, i: usize) -> Value {
        serde_json::from_str(&self.state().lines[i]).expect("a JSON log line")
    }

    /// Parsed JSON lines from `from` on.
    pub fn events(&self, from: usize) -> Vec<Value> {
        let s = self.state();
        s.lines[from.min(s.lines.len())..]
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Index of the first JSON line at or after `from` that `pred` accepts;
    /// an error when the deadline passes or the process's stderr closed.
    pub fn wait(
        &self,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<usize> {
        let (m, cv) = &*self.0;
        let deadline = Instant::now() + timeout;
        let mut s = m.lock().unwrap_or_else(|p| p.into_inner());
        let mut i = from;
        loop {
            while i < s.lines.len() {
                if serde_json::from_str::<Value>(&s.lines[i]).is_ok_and(|v| pred(&v)) {
                    return Ok(i);
                }
                i += 1;
            }
            if s.eof {
                bail!("the process exited (stderr closed)");
            }
            let now = Instant::now();
            if now >= deadline {
                bail!("not seen within {timeout:?}");
            }
            s = cv
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// Whether a JSON log event is `message` (about `node`, if given: a field
/// of the event or of its span).
pub fn is_event(v: &Value, message: &str, node: Option<&str>) -> bool {
    v["message"] == message && node.is_none_or(|n| v["node"] == n || v["span"]["node"] == n)
}

// ---------------------------------------------------------------------------
// The process
// ---------------------------------------------------------------------------

/// A running `nodetunnel serve` in the control-plane namespace. Drop stops
/// it (SIGTERM, then SIGKILL after its drop timeout) and prints its log if
/// the test failed.
pub struct ServeProcess {
    pub name: String,
    child: Option<Child>,
    pid: i32,
    pub log: Log,
    drop_timeout: Duration,
}

impl ServeProcess {
    /// `nodetunnel --log-format json --log-level info serve --config
    /// <config>` in `bed`'s control-plane namespace, its stderr read into
    /// [`ServeProcess::log`]. Returns at once: the caller waits for the
    /// events that make it ready.
    pub fn spawn(bed: &Testbed, name: &str, config: &Path, drop_timeout: Duration) -> ServeProcess {
        let what = format!("{NODETUNNEL} in {}", bed.cp_ns());
        Self::spawn_command(
            bed.command_in_cp(NODETUNNEL),
            &what,
            name,
            config,
            drop_timeout,
        )
    }

    /// As [`ServeProcess::spawn`], on the host (no namespace): for suites
    /// whose nodes are sshd on loopback.
    pub fn spawn_on_host(name: &str, config: &Path, drop_timeout: Duration) -> ServeProcess {
        let cmd = std::process::Command::new(NODETUNNEL);
        Self::spawn_command(cmd, NODETUNNEL, name, config, drop_timeout)
    }

    fn spawn_command(
        mut cmd: std::process::Command,
        what: &str,
        name: &str,
        config: &Path,
        drop_timeout: Duration,
    ) -> ServeProcess {
        cmd.args(SERVE_ARGS)
            .arg(config)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {what}: {e}"));
        let log = Log::default();
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = log.clone();
        std::thread::Builder::new()
            .name(format!("log-{name}"))
            .spawn(move || {
                let mut reader = std::io::BufReader::new(stderr);
                let mut line = Vec::new();
                loop {
                    line.clear();
                    match reader.read_until(b'\n', &mut line) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            sink.push(Some(String::from_utf8_lossy(&line).trim_end().to_owned()))
                        }
                    }
                }
                sink.push(None);
            })
            .expect("spawning the log reader");
        ServeProcess {
            name: name.to_owned(),
            pid: child.id() as i32,
            child: Some(child),
            log,
            drop_timeout,
        }
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Wait for an event (from line `from` on); panics with the whole log.
    pub fn expect_log(
        &self,
        from: usize,
        timeout: Duration,
        message: &str,
        node: Option<&str>,
    ) -> usize {
        let what = match node {
            Some(n) => format!("{message} for {n}"),
            None => message.to_owned(),
        };
        self.expect(from, timeout, &what, |v| is_event(v, message, node))
    }

    /// Wait for an event `pred` accepts; panics with `what` and the log.
    pub fn expect(
        &self,
        from: usize,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> usize {
        match self.log.wait(from, timeout, pred) {
            Ok(i) => i,
            Err(e) => panic!(
                "nodetunnel {}: log event {what:?}: {e}; its log:\n{}",
                self.name,
                self.log.dump()
            ),
        }
    }

    /// Log line `i`, parsed.
    pub fn event(&self, i: usize) -> Value {
        self.log.event(i)
    }

    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid), sig)
            .unwrap_or_else(|e| panic!("kill -{sig} {}: {e}", self.pid));
    }

    /// SIGTERM and wait (bounded) for the exit; the exit status and the
    /// complete log.
    pub fn terminate_and_wait(&mut self, timeout: Duration) -> (Result<ExitStatus>, String) {
        let child = self.child.take().expect("running");
        let status = terminate(child, timeout);
        // The reader thread sees EOF right after the exit: wait for it, so
        // that the log is complete.
        let _ = self.log.wait(0, Duration::from_secs(5), |_| false);
        (status, self.log.dump())
    }

    /// Graceful shutdown: SIGTERM must make it drain and exit 0 within
    /// `timeout`, logging "stopped" last.
    pub fn stop(mut self, timeout: Duration) {
        let (status, log) = self.terminate_and_wait(timeout);
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!(
                "nodetunnel {} exited with {s} after SIGTERM; log:\n{log}",
                self.name
            ),
            Err(e) => panic!("nodetunnel {}: {e:#}; log:\n{log}", self.name),
        }
        let last = log.lines().last().unwrap_or_default();
        assert!(
            serde_json::from_str::<Value>(last).is_ok_and(|v| is_event(&v, "stopped", None)),
            "nodetunnel {}: last log line after SIGTERM is {last:?}, not \"stopped\"",
            self.name
        );
    }
}

/// SIGTERM, then the exit status (SIGKILL after `timeout`).
pub fn terminate(child: Child, timeout: Duration) -> Result<ExitStatus> {
    let pid = Pid::from_raw(child.id() as i32);
    let _ = kill(pid, Signal::SIGTERM);
    let (tx, rx) = std::sync::mpsc::channel();
    let mut child = child;
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    match rx.recv_timeout(timeout) {
        Ok(status) => Ok(status?),
        Err(_) => {
            let _ = kill(pid, Signal::SIGKILL);
            let _ = rx.recv_timeout(Duration::from_secs(10));
            Err(anyhow!(
                "did not exit within {timeout:?} of SIGTERM (killed)"
            ))
        }
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            if let Err(e) = terminate(child, self.drop_timeout) {
                eprintln!("nodetunnel {}: {e:#}", self.name);
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "--- nodetunnel {} log (test failed) ---\n{}\n--- end ---",
                self.name,
                self.log.dump()
            );
        }
    }
}
