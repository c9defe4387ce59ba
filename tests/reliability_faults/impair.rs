//! Link impairments with iproute2's `tc` on one node's link of the testbed:
//! `netem` (loss, delay, jitter) where the kernel has it, and random loss
//! built from qdiscs every kernel with HTB has (a classic-BPF classifier
//! sending a random share of the node's packets to a `pfifo limit 0`
//! class, which drops everything it is given). Latency without netem is
//! the delay line's job (`delayline.rs`).
//!
//! Both act on the bridge ports in the fabric namespace and, for netem, on
//! the node's own interface: a packet dropped there is lost on the wire as
//! far as both TCP endpoints can tell (a drop in the sender's own qdisc
//! would instead be reported to the sender's TCP as local congestion).

use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::support::Testbed;

const TC: &str = "/usr/sbin/tc";

fn tc_path() -> Result<&'static str> {
    for p in [TC, "/sbin/tc", "/usr/bin/tc"] {
        if std::path::Path::new(p).exists() {
            return Ok(p);
        }
    }
    bail!("tc not found (looked in /usr/sbin, /sbin, /usr/bin): apt-get install iproute2 (bash .ci/run installs it)")
}

/// `ip netns exec NS tc ARGS`; the error carries tc's stderr.
pub fn tc(ns: &str, args: &[&str]) -> Result<()> {
    let out = Testbed::command_in_ns(ns, tc_path()?)
        .args(args)
        .output()
        .with_context(|| format!("running tc {} in {ns}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "tc {} (in {ns}) failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Why netem cannot be used here, in words an operator can act on; None
/// when a netem qdisc can be created.
pub fn netem_unavailable() -> Option<String> {
    let tc = match tc_path() {
        Ok(t) => t,
        Err(e) => return Some(format!("{e:#}")),
    };
    // A throwaway namespace with a veth pair (every kernel that runs the
    // testbed has veth): nothing of a bed is touched.
    let ns = format!("ntnetemprobe{}", std::process::id());
    let run = |args: &[&str]| Command::new("ip").args(args).output();
    let _ = run(&["netns", "add", &ns]);
    let _ = run(&[
        "-n", &ns, "link", "add", "dev", "probe0", "type", "veth", "peer", "name", "probe1",
    ]);
    let _ = run(&["-n", &ns, "link", "set", "probe0", "up"]);
    let out = Testbed::command_in_ns(&ns, tc)
        .args([
            "qdisc", "add", "dev", "probe0", "root", "netem", "delay", "1ms",
        ])
        .output();
    let _ = run(&["netns", "del", &ns]);
    let stderr = match out {
        Ok(o) if o.status.success() => return None,
        Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_owned(),
        Err(e) => e.to_string(),
    };
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let config = kernel_config();
    let unset = |key: &str| {
        config
            .as_deref()
            .is_some_and(|c| c.lines().any(|l| l.trim() == format!("# {key} is not set")))
    };
    Some(
        if unset("CONFIG_NET_SCH_NETEM") && unset("CONFIG_MODULES") {
            format!(
                "kernel {release} was built without sch_netem (CONFIG_NET_SCH_NETEM is not set) \
             and without module support (CONFIG_MODULES is not set): netem cannot run on \
             this machine (tc said: {stderr})"
            )
        } else {
            format!(
                "tc cannot create a netem qdisc on kernel {release} (tc said: {stderr}); \
             load the module with `modprobe sch_netem` (Debian/Ubuntu: it is in \
             linux-modules-extra-{release} on some images)"
            )
        },
    )
}

/// The running kernel's configuration (/proc/config.gz), if exposed.
fn kernel_config() -> Option<String> {
    let out = Command::new("sh")
        .args(["-c", "zcat /proc/config.gz 2>/dev/null"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (!text.is_empty()).then_some(text)
}

/// An impairment in place; removed on Drop (the bed's namespaces go away
/// at teardown anyway).
pub struct Impaired {
    undo: Vec<(String, String)>,
    pub description: String,
}

/// Something done to a link for the length of a test; undone on Drop.
pub trait Impairment {
    /// What was done, for the `figure:` lines.
    fn description(&self) -> &str;
}

impl Impairment for Impaired {
    fn description(&self) -> &str {
        &self.description
    }
}

impl Drop for Impaired {
    fn drop(&mut self) {
        for (ns, dev) in &self.undo {
            let _ = tc(ns, &["qdisc", "del", "dev", dev, "root"]);
        }
    }
}

/// netem with `spec` (e.g. `delay 20ms 5ms loss 1%`) on both directions of
/// node `i`'s link: the node's eth0 (node -> control plane) and its bridge
/// port in the fabric (control plane -> node).
pub fn netem(bed: &Testbed, i: usize, spec: &str) -> Result<Impaired> {
    if let Some(why) = netem_unavailable() {
        bail!("netem unavailable: {why}");
    }
    let node_ns = bed.node(i).ns.clone();
    let fab = bed.fabric_ns().to_owned();
    let port = bed.var(&format!("NT_NODE_{i}_VETH"))?;
    let words: Vec<&str> = spec.split_whitespace().collect();
    let mut undo = Vec::new();
    for (ns, dev) in [(node_ns, "eth0".to_owned()), (fab, port)] {
        let mut args = vec!["qdisc", "add", "dev", &dev, "root", "netem"];
        args.extend(&words);
        tc(&ns, &args)?;
        undo.push((ns.clone(), dev.clone()));
    }
    Ok(Impaired {
        undo,
        description: format!("netem {spec} on both directions of node-{i}'s link"),
    })
}

/// A classic BPF program for `tc filter ... bpf bytecode`: IPv4 frames
/// whose address at byte `ip_offset` of the Ethernet frame (26: source, 30:
/// destination) is `ip` go, with probability `percent`/100, to class 1:20;
/// everything else is unclassified (the default class).
fn random_drop_bytecode(ip: Ipv4Addr, ip_offset: u32, percent: u32) -> String {
    // SKF_AD_OFF + SKF_AD_RANDOM: a random u32 per packet.
    const LD_RANDOM: u32 = 0xffff_f000 + 56;
    let threshold = ((u64::from(percent) << 32) / 100) as u32;
    let ops: [(u16, u8, u8, u32); 8] = [
        (0x28, 0, 0, 12),            // ldh [12]        ethertype
        (0x15, 0, 5, 0x0800),        // jeq #IPv4, else pass
        (0x20, 0, 0, ip_offset),     // ld [offset]     address
        (0x15, 0, 3, u32::from(ip)), // jeq #ip, else pass
        (0x20, 0, 0, LD_RANDOM),     // ld rand
        (0x25, 1, 0, threshold),     // jgt #threshold -> pass
        (0x06, 0, 0, 0x0001_0020),   // ret #1:20       (dropped)
        (0x06, 0, 0, 0),             // pass: ret #0    (default class)
    ];
    let mut s = ops.len().to_string();
    for (code, jt, jf, k) in ops {
        s.push_str(&format!(",{code} {jt} {jf} {k}"));
    }
    s
}

/// Drop `percent`% of node `i`'s packets in each direction, at random, in
/// the fabric: on its bridge port (towards the node) and on the control
/// plane's bridge port (from the node), where only its packets are picked.
/// Needs only HTB, pfifo and the BPF classifier (no netem).
pub fn random_loss(bed: &Testbed, i: usize, percent: u32) -> Result<Impaired> {
    let fab = bed.fabric_ns().to_owned();
    let node_port = bed.var(&format!("NT_NODE_{i}_VETH"))?;
    let ip = bed.node(i).ip;
    let mut undo = Vec::new();
    // (port, offset of the node's address in frames leaving that port)
    for (port, offset) in [(node_port.as_str(), 30u32), ("v-cp", 26u32)] {
        tc(
            &fab,
            &[
                "qdisc", "add", "dev", port, "root", "handle", "1:", "htb", "default", "10", "r2q",
                "10000",
            ],
        )
        .context("HTB qdisc (CONFIG_NET_SCH_HTB)")?;
        undo.push((fab.clone(), port.to_owned()));
        for class in ["1:10", "1:20"] {
            tc(
                &fab,
                &[
                    "class", "add", "dev", port, "parent", "1:", "classid", class, "htb", "rate",
                    "10gbit",
                ],
            )?;
        }
        tc(
            &fab,
            &[
                "qdisc", "add", "dev", port, "parent", "1:20", "handle", "20:", "pfifo", "limit",
                "0",
            ],
        )?;
        let code = random_drop_bytecode(ip, offset, percent);
        tc(
            &fab,
            &[
                "filter", "add", "dev", port, "parent", "1:", "protocol", "all", "prio", "1",
                "bpf", "bytecode", &code,
            ],
        )
        .context("BPF classifier (CONFIG_NET_CLS_BPF)")?;
    }
    Ok(Impaired {
        undo,
        description: format!(
            "{percent}% random loss each way on node-{i}'s link (HTB + BPF classifier + pfifo limit 0)"
        ),
    })
}

/// Packets dropped so far by [`random_loss`]'s drop classes (`tc -s`).
pub fn random_loss_drops(bed: &Testbed, i: usize) -> Result<u64> {
    let fab = bed.fabric_ns();
    let node_port = bed.var(&format!("NT_NODE_{i}_VETH"))?;
    let mut total = 0;
    for port in [node_port.as_str(), "v-cp"] {
        let out = Testbed::command_in_ns(fab, tc_path()?)
            .args(["-s", "qdisc", "show", "dev", port])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        // qdisc pfifo 20: parent 1:20 limit 0p
        //  Sent 0 bytes 0 pkt (dropped 33, overlimits 0 requeues 0)
        let mut lines = text.lines();
        while let Some(l) = lines.next() {
            if l.starts_with("qdisc pfifo 20:") {
                let stats = lines.next().unwrap_or_default();
                let dropped = stats
                    .split("dropped ")
                    .nth(1)
                    .and_then(|r| r.split(',').next())
                    .and_then(|n| n.trim().parse::<u64>().ok())
                    .with_context(|| format!("no drop count in {stats:?}"))?;
                total += dropped;
            }
        }
    }
    Ok(total)
}

/// Round-trip times measured by TCP handshakes: `connect()` returns when
/// the SYN-ACK is back, so each sample is one round trip through whatever
/// the link does (plus scheduling), with no tool in the namespaces.
#[derive(Clone, Debug, Default)]
pub struct HandshakeRtts {
    pub samples: Vec<std::time::Duration>,
    /// Handshakes that failed (a SYN or SYN-ACK lost on every retry).
    pub failures: usize,
}

impl HandshakeRtts {
    pub fn min(&self) -> Option<std::time::Duration> {
        self.samples.iter().min().copied()
    }

    pub fn median(&self) -> Option<std::time::Duration> {
        let mut s = self.samples.clone();
        s.sort();
        s.get(s.len() / 2).copied()
    }

    pub fn max(&self) -> Option<std::time::Duration> {
        self.samples.iter().max().copied()
    }
}

impl std::fmt::Display for HandshakeRtts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Option<std::time::Duration>| {
            d.map_or("-".to_owned(), |d| {
                format!("{:.1}", d.as_secs_f64() * 1000.0)
            })
        };
        write!(
            f,
            "{}/{}/{} ms (min/median/max of {}, {} failed)",
            ms(self.min()),
            ms(self.median()),
            ms(self.max()),
            self.samples.len(),
            self.failures
        )
    }
}

/// `n` TCP handshakes, one after the other, from namespace `ns` to `addr`
/// (something must listen there); each connection is closed at once.
pub fn handshake_rtts(ns: &str, addr: std::net::SocketAddr, n: usize) -> Result<HandshakeRtts> {
    // 1 + 2 + 4 s of SYN retransmissions: three losses of one handshake in
    // a row count as a failure, not a hang.
    const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(8);
    let ns_owned = ns.to_owned();
    std::thread::Builder::new()
        .name(format!("rtt-{ns}"))
        .spawn(move || -> Result<HandshakeRtts> {
            crate::support::netns::enter_netns(&ns_owned)?;
            let mut out = HandshakeRtts::default();
            for _ in 0..n {
                let start = std::time::Instant::now();
                match std::net::TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                    Ok(s) => {
                        out.samples.push(start.elapsed());
                        drop(s);
                    }
                    Err(_) => out.failures += 1,
                }
            }
            Ok(out)
        })
        .context("spawning the RTT probe thread")?
        .join()
        .map_err(|_| anyhow::anyhow!("the RTT probe thread panicked"))?
}
