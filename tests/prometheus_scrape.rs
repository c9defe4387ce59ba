//! `/metrics` as Prometheus's own tools see it, against a running sidecar
//! (`nodetunnel dev`: the real serve path, no root):
//!
//! - the classic text format (no `Accept`) passes `promtool check metrics`
//!   with nothing printed; OpenMetrics is served when asked for, with its
//!   own content type and counter families named without `_total`;
//! - a real Prometheus server (Debian's `prometheus` package) scrapes the
//!   admin API every second (asking for OpenMetrics, as Prometheus does) and
//!   answers a counter, a gauge and a histogram quantile through its HTTP
//!   API.
//!
//! promtool and prometheus come from Debian's `prometheus` package (.ci/run
//! installs it). Without them a test says so and passes, except under CI
//! (`CI` set), where it fails.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

/// A child process killed when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running `nodetunnel dev`: its admin address and the commands it printed.
struct Dev {
    _child: Killed,
    admin: SocketAddr,
    commands: Vec<String>,
}

impl Dev {
    fn start() -> Dev {
        let mut child = Command::new(env!("CARGO_BIN_EXE_nodetunnel"))
            .args(["--log-level", "warn", "dev", "--nodes", "3"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start nodetunnel dev");
        let stdout = child.stdout.take().expect("stdout");
        let child = Killed(child);
        let lines = lines_of(stdout);
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut banner = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no complete banner; got {banner:#?}"));
            let done = line.starts_with("Ctrl-C stops everything");
            banner.push(line);
            if done {
                break;
            }
        }
        let commands: Vec<String> = banner.iter().map(|l| l.trim().to_owned()).collect();
        let admin = commands
            .iter()
            .find_map(|l| l.strip_prefix("curl -s http://")?.strip_suffix("/metrics"))
            .unwrap_or_else(|| panic!("no /metrics command in {banner:#?}"))
            .parse()
            .expect("admin address");
        Dev {
            _child: child,
            admin,
            commands,
        }
    }

    /// The printed command that starts with `prefix`.
    fn command(&self, prefix: &str) -> &str {
        self.commands
            .iter()
            .find(|c| c.starts_with(prefix))
            .unwrap_or_else(|| panic!("no command {prefix}... in {:#?}", self.commands))
    }
}

fn lines_of(stdout: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// `GET path` with `Connection: close`: (status, headers in lower case, body).
fn get(addr: SocketAddr, path: &str, accept: Option<&str>) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let accept = accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{accept}Connection: close\r\n\r\n"
    )
    .expect("send");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read the answer");
    let (head, body) = answer.split_once("\r\n\r\n").expect("a complete answer");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (status, head.to_ascii_lowercase(), body.to_owned())
}

/// Whether a tool is there; without it, a test passes with a message,
/// except under CI, where it fails.
fn tool(name: &str) -> bool {
    let found = Command::new(name).arg("--version").output().is_ok();
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{name} is missing (Debian's prometheus package): .ci/run installs it"
        );
        eprintln!("SKIPPED: {name} is not installed (Debian's prometheus package)");
    }
    found
}

/// What Prometheus 2.x sends when it scrapes.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,\
     application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

#[test]
fn classic_metrics_pass_promtool_check_metrics_and_openmetrics_is_served_when_asked() {
    let dev = Dev::start();

    let (status, head, classic) = get(dev.admin, "/metrics", None);
    assert_eq!(status, 200);
    assert!(
        head.contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    assert!(!classic.contains("# EOF"), "{classic}");
    for line in [
        "# TYPE nodetunnel_ssh_handshakes_total counter",
        "# TYPE process_cpu_seconds_total counter",
        "# TYPE process_open_fds gauge",
        "# TYPE process_max_fds gauge",
        "# TYPE process_resident_memory_bytes gauge",
        "# TYPE process_start_time_seconds gauge",
        "# TYPE nodetunnel_runtime_workers gauge",
    ] {
        assert!(
            classic.lines().any(|l| l == line),
            "{line} missing:\n{classic}"
        );
    }

    let (status, head, openmetrics) = get(dev.admin, "/metrics", Some(PROMETHEUS_ACCEPT));
    assert_eq!(status, 200);
    assert!(
        head.contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    assert!(openmetrics.ends_with("# EOF\n"), "{openmetrics}");
    assert!(
        openmetrics
            .lines()
            .any(|l| l == "# TYPE nodetunnel_ssh_handshakes counter"),
        "{openmetrics}"
    );

    if !tool("promtool") {
        return;
    }
    // promtool lints the classic format only (its parser reads an
    // OpenMetrics counter's family as a sample-less family): the
    // OpenMetrics answer is checked by a real Prometheus scrape below.
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(classic.as_bytes())
        .expect("write to promtool");
    let out = promtool.wait_with_output().expect("promtool");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && printed.is_empty(),
        "promtool check metrics: {}\n{printed}\n{classic}",
        out.status
    );
}

/// A loopback port nothing listens on (now).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// `s` percent-encoded for a query string.
fn query_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus server in a temporary directory, killed on drop.
struct Prometheus {
    _child: Killed,
    _dir: tempfile::TempDir,
    addr: SocketAddr,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: nodetunnel\n    static_configs:\n\
                 \x20     - targets: ['{target}']\n"
            ),
        )
        .expect("write prometheus.yml");
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start prometheus");
        Prometheus {
            _child: Killed(child),
            _dir: dir,
            addr,
        }
    }

    /// The value of the single series `query` gives now, if it gives one.
    fn value(&self, query: &str) -> Option<f64> {
        let path = format!("/api/v1/query?query={}", query_encode(query));
        let mut s = TcpStream::connect(self.addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.addr
        )
        .ok()?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).ok()?;
        let (_, body) = answer.split_once("\r\n\r\n")?;
        let v: serde_json::Value = serde_json::from_str(body).ok()?;
        let result = v["data"]["result"].as_array()?;
        match result.as_slice() {
            [one] => one["value"][1].as_str()?.parse().ok(),
            _ => None,
        }
    }

    /// Poll `query` until its value satisfies `ok`, within a minute.
    fn until(&self, query: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = None;
        while Instant::now() < deadline {
            last = self.value(query);
            if let Some(v) = last.filter(|v| ok(*v)) {
                return v;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("Prometheus never answered {query} as expected; last: {last:?}");
    }
}

#[test]
fn prometheus_scrapes_the_sidecar_and_answers_a_counter_a_gauge_and_a_quantile() {
    if !tool("prometheus") {
        return;
    }
    let dev = Dev::start();
    // One stream through the tunnels, so the open-duration histogram has
    // an observation (the command as `nodetunnel dev` prints it).
    let dial = dev.command("curl -s --proxytunnel -x http://");
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("{dial} -o /dev/null -w '%{{http_code}}'"))
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "{dial}");

    let prometheus = Prometheus::start(dev.admin);
    prometheus.until("up{job=\"nodetunnel\"}", |v| v == 1.0);
    let handshakes = prometheus.until("nodetunnel_ssh_handshakes_total{result=\"ok\"}", |v| {
        v >= 3.0
    });
    assert!(handshakes >= 3.0);
    prometheus.until("nodetunnel_tunnels{state=\"ready\"}", |v| v == 3.0);
    prometheus.until("process_open_fds", |v| v > 0.0);
    let quantile = prometheus.until(
        "histogram_quantile(0.5, nodetunnel_stream_open_duration_seconds_bucket)",
        f64::is_finite,
    );
    assert!(quantile > 0.0, "{quantile}");
}
