//! Latency, jitter, loss and duplication on one node's link without netem:
//! a userspace delay line (`delayline.py`, next to this file) spliced into
//! the link inside the fabric namespace with tc ingress filters, so it
//! needs only TUN/TAP, the ingress qdisc, the u32 classifier and the
//! mirred action (no sch_netem).
//!
//! Node I's IPv4 frames are taken off the bridge and steered, frame by
//! frame, through two TAP devices the delay line owns:
//!
//! ```text
//!  node I eth0 -> v-nI ingress --mirred--> dl-nI-tx -> delayline.py (hold, drop, duplicate)
//!                                          dl-nI-tx ingress --mirred--> v-cp -> cp eth0
//!  cp eth0 -> v-cp ingress (IPv4 to node I) --mirred--> dl-nI-rx -> delayline.py
//!                                          dl-nI-rx ingress --mirred--> v-nI -> node I eth0
//! ```
//!
//! Frames keep their Ethernet headers (the bed's neighbour entries are
//! permanent, so MAC addresses are already right) and skip the bridge;
//! nothing of the bed's addressing or routing changes, and the other nodes'
//! frames are not touched. The TAPs advertise no offloads, so the kernel
//! segments GSO packets and fills in checksums before handing them to the
//! delay line: it sees real, MTU-sized frames, and drops and duplicates
//! single packets.
//!
//! The TAPs belong to the Python process and vanish with it; [`DelayLine`]
//! removes the filters first (the link is bridged again), then closes the
//! process's stdin (it exits on EOF, also if the test process dies) and
//! kills it if it has not exited within a bound.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::impair::{tc, Impairment};
use crate::support::Testbed;

/// The script, run with python3 inside the fabric namespace.
pub fn script_path() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/reliability_faults/delayline.py"
    ))
}

/// Bound on the script creating its TAPs and on each answer to `stats`.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on the script exiting once its stdin is closed.
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);
/// Queue length of the TAPs (frames waiting for the script to read them):
/// large enough that a descheduled script does not add drops of its own.
const TAP_QUEUE: &str = "10000";

/// python3: the system one first (a pyenv shim would work too, but adds a
/// process layer), then whatever PATH has.
pub fn python3() -> Result<PathBuf> {
    for p in ["/usr/bin/python3", "/usr/local/bin/python3"] {
        if Path::new(p).exists() {
            return Ok(PathBuf::from(p));
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("python3");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    bail!(
        "python3 not found (looked in /usr/bin, /usr/local/bin and PATH): the delay line that \
         stands in for netem is a Python script (standard library only); apt-get install python3"
    )
}

/// What the delay line does to every frame of the node, each way.
#[derive(Clone, Debug)]
pub struct DelaySpec {
    /// Every frame is held `delay` +/- `jitter` (uniform).
    pub delay: Duration,
    pub jitter: Duration,
    /// Share of frames dropped, in percent.
    pub loss_percent: f64,
    /// Share of frames sent twice (the copy with its own delay), in percent.
    pub duplicate_percent: f64,
    /// true: every frame leaves at its own time, as with netem, so frames
    /// arriving less than 2 x jitter apart may swap (bounded reordering);
    /// false: FIFO per direction.
    pub reorder: bool,
    /// Seed of the script's random choices.
    pub seed: u64,
}

impl DelaySpec {
    pub fn describe(&self) -> String {
        format!(
            "delay {}ms +/- {}ms ({}), loss {}%, duplicate {}%",
            self.delay.as_millis(),
            self.jitter.as_millis(),
            if self.reorder {
                "reordering within 2 x jitter"
            } else {
                "FIFO"
            },
            self.loss_percent,
            self.duplicate_percent
        )
    }
}

/// Counters of one direction, from the script.
#[derive(Clone, Debug, Default)]
pub struct DirectionStats {
    pub tap: String,
    pub received: u64,
    pub received_bytes: u64,
    pub dropped: u64,
    pub duplicated: u64,
    /// Frames written back (received - dropped + duplicated, once drained).
    pub sent: u64,
    pub sent_bytes: u64,
    /// Frames written back after a frame that arrived later.
    pub reordered: u64,
    pub write_errors: u64,
    /// How long frames were held (read to written back), in ms.
    pub hold_min_ms: f64,
    pub hold_mean_ms: f64,
    pub hold_max_ms: f64,
}

impl DirectionStats {
    fn from_json(v: &Value) -> DirectionStats {
        let n = |k: &str| v[k].as_u64().unwrap_or(0);
        let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
        DirectionStats {
            tap: v["tap"].as_str().unwrap_or_default().to_owned(),
            received: n("received"),
            received_bytes: n("received_bytes"),
            dropped: n("dropped"),
            duplicated: n("duplicated"),
            sent: n("sent"),
            sent_bytes: n("sent_bytes"),
            reordered: n("reordered"),
            write_errors: n("write_errors"),
            hold_min_ms: f("hold_min_ms"),
            hold_mean_ms: f("hold_mean_ms"),
            hold_max_ms: f("hold_max_ms"),
        }
    }
}

impl std::fmt::Display for DirectionStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} frames ({:.1} MiB) in, {} dropped, {} duplicated, {} out ({:.1} MiB), \
             {} reordered, {} write errors; held {:.1}/{:.1}/{:.1} ms (min/mean/max)",
            self.tap,
            self.received,
            self.received_bytes as f64 / 1048576.0,
            self.dropped,
            self.duplicated,
            self.sent,
            self.sent_bytes as f64 / 1048576.0,
            self.reordered,
            self.write_errors,
            self.hold_min_ms,
            self.hold_mean_ms,
            self.hold_max_ms
        )
    }
}

/// The delay line in place on node I's link; Drop takes it out (filters
/// first, then the process).
pub struct DelayLine {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
    fab: String,
    /// Bridge ports with our ingress qdisc (removed on Drop).
    diverted: Vec<String>,
    /// Frames from the node (node -> control plane), to the node.
    pub tx_tap: String,
    pub rx_tap: String,
    pub description: String,
}

impl DelayLine {
    /// Start the script in the fabric namespace, wait until its TAPs exist,
    /// then splice it into both directions of node `i`'s link.
    pub fn start(bed: &Testbed, i: usize, spec: &DelaySpec) -> Result<DelayLine> {
        let python = python3()?;
        let fab = bed.fabric_ns().to_owned();
        let node_port = bed.var(&format!("NT_NODE_{i}_VETH"))?;
        let node_ip = bed.node(i).ip;
        let tx_tap = format!("dl-n{i}-tx");
        let rx_tap = format!("dl-n{i}-rx");
        let mut child = Testbed::command_in_ns(&fab, &python)
            .arg(script_path())
            .args(["--tap", &tx_tap, "--tap", &rx_tap])
            .args(["--delay-ms", &spec.delay.as_millis().to_string()])
            .args(["--jitter-ms", &spec.jitter.as_millis().to_string()])
            .args(["--loss", &(spec.loss_percent / 100.0).to_string()])
            .args(["--duplicate", &(spec.duplicate_percent / 100.0).to_string()])
            .args(["--seed", &spec.seed.to_string()])
            .args(spec.reorder.then_some("--reorder"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| {
                format!("starting {} {}", python.display(), script_path().display())
            })?;
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().context("piped stdout")?;
        std::thread::Builder::new()
            .name(format!("delayline-n{i}-out"))
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            })
            .context("spawning the delay line's stdout reader")?;
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err_pipe = child.stderr.take().context("piped stderr")?;
        let sink = stderr.clone();
        std::thread::Builder::new()
            .name(format!("delayline-n{i}-err"))
            .spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = err_pipe.read(&mut buf) {
                    sink.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            })
            .context("spawning the delay line's stderr reader")?;
        let stdin = child.stdin.take();
        // From here on, Drop cleans up whatever was set up.
        let mut dl = DelayLine {
            child: Some(child),
            stdin,
            lines,
            stderr,
            fab: fab.clone(),
            diverted: Vec::new(),
            tx_tap: tx_tap.clone(),
            rx_tap: rx_tap.clone(),
            description: format!(
                "userspace delay line ({}) on both directions of node-{i}'s link",
                spec.describe()
            ),
        };
        let ready = dl.answer("creating its TAP devices")?;
        if ready.get("ready").is_none() {
            bail!("the delay line said {ready} instead of ready");
        }

        // The way back first: a frame the script writes into a TAP goes on
        // to where it was heading.
        let ip = |args: &[&str]| -> Result<()> {
            let out = std::process::Command::new("ip")
                .args(["-n", &fab])
                .args(args)
                .output()
                .with_context(|| format!("running ip {}", args.join(" ")))?;
            if !out.status.success() {
                bail!(
                    "ip -n {fab} {} failed: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            Ok(())
        };
        for (tap, onward) in [(tx_tap.as_str(), "v-cp"), (rx_tap.as_str(), &node_port)] {
            ip(&["link", "set", tap, "txqueuelen", TAP_QUEUE, "up"])?;
            tc(&fab, &["qdisc", "add", "dev", tap, "ingress"])
                .context("ingress qdisc (CONFIG_NET_SCH_INGRESS)")?;
            tc(
                &fab,
                &[
                    "filter", "add", "dev", tap, "parent", "ffff:", "protocol", "all", "prio", "1",
                    "u32", "match", "u32", "0", "0", "action", "mirred", "egress", "redirect",
                    "dev", onward,
                ],
            )
            .context(
                "u32 classifier and mirred action (CONFIG_NET_CLS_U32, CONFIG_NET_ACT_MIRRED)",
            )?;
        }
        // Then the detour: the node's IPv4 frames, each way, into a TAP.
        let node_dst = format!("{node_ip}/32");
        let diversions: [(&str, Vec<&str>, &str); 2] = [
            (&node_port, vec!["match", "u32", "0", "0"], &tx_tap),
            ("v-cp", vec!["match", "ip", "dst", &node_dst], &rx_tap),
        ];
        for (port, selector, tap) in diversions {
            tc(&fab, &["qdisc", "add", "dev", port, "ingress"])?;
            dl.diverted.push(port.to_owned());
            let mut args = vec![
                "filter", "add", "dev", port, "parent", "ffff:", "protocol", "ip", "prio", "1",
                "u32",
            ];
            args.extend(selector);
            args.extend(["action", "mirred", "egress", "redirect", "dev", tap]);
            tc(&fab, &args)?;
        }
        Ok(dl)
    }

    /// The next line from the script, as JSON (bounded wait).
    fn answer(&mut self, what: &str) -> Result<Value> {
        match self.lines.recv_timeout(ANSWER_TIMEOUT) {
            Ok(line) => serde_json::from_str(&line)
                .with_context(|| format!("the delay line answered {line:?} while {what}")),
            Err(e) => {
                let status = self
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten())
                    .map_or("still running".to_owned(), |s| s.to_string());
                bail!(
                    "the delay line did not answer within {ANSWER_TIMEOUT:?} while {what} ({e}; \
                     process {status}); its stderr: {}",
                    self.stderr.lock().unwrap().trim()
                )
            }
        }
    }

    /// Frames each TAP's queue dropped because the script fell behind
    /// (`ip -s link`, TX dropped): [from the node, to the node].
    pub fn queue_drops(&self) -> Result<[u64; 2]> {
        let one = |tap: &str| -> Result<u64> {
            let out = std::process::Command::new("ip")
                .args(["-n", &self.fab, "-s", "-j", "link", "show", "dev", tap])
                .output()
                .with_context(|| format!("ip -s link show dev {tap}"))?;
            let v: Value = serde_json::from_slice(&out.stdout)
                .with_context(|| format!("ip -j -s link show dev {tap}: not JSON"))?;
            v[0]["stats64"]["tx"]["dropped"]
                .as_u64()
                .with_context(|| format!("no TX dropped count for {tap} in {v}"))
        };
        Ok([one(&self.tx_tap)?, one(&self.rx_tap)?])
    }

    /// Both directions' counters: [from the node, to the node].
    pub fn stats(&mut self) -> Result<[DirectionStats; 2]> {
        let stdin = self.stdin.as_mut().context("delay line already stopped")?;
        stdin
            .write_all(b"stats\n")
            .and_then(|()| stdin.flush())
            .context("asking the delay line for its counters")?;
        let v = self.answer("reporting its counters")?;
        let dirs = v["directions"]
            .as_array()
            .with_context(|| format!("no directions in {v}"))?;
        let find = |tap: &str| {
            dirs.iter()
                .find(|d| d["tap"] == tap)
                .map(DirectionStats::from_json)
                .with_context(|| format!("no counters for {tap} in {v}"))
        };
        Ok([find(&self.tx_tap)?, find(&self.rx_tap)?])
    }
}

impl Impairment for DelayLine {
    fn description(&self) -> &str {
        &self.description
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- delay line ({}, {}) stderr, test failed ---\n{}",
                self.tx_tap,
                self.rx_tap,
                self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
            );
        }
        // The link is bridged again once the detours are gone.
        for port in self.diverted.drain(..) {
            if let Err(e) = tc(&self.fab, &["qdisc", "del", "dev", &port, "ingress"]) {
                eprintln!("removing the delay line's filter on {port}: {e:#}");
            }
        }
        // EOF on stdin: the script exits, and its TAPs go with it.
        drop(self.stdin.take());
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + EXIT_TIMEOUT;
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        eprintln!(
                            "the delay line did not exit within {EXIT_TIMEOUT:?}: killing it"
                        );
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
    }
}
