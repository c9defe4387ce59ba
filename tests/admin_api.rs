//! The admin API of a running `nodetunnel serve` (the real binary) with two
//! nodes, each a real OpenSSH sshd on loopback:
//!
//! - readiness turns 503 when every node's sshd stops and 200 when they
//!   return, and `nodetunnel status` shows the trouble;
//! - counters move when streams open, when a dial is refused and when the
//!   policy denies one; `/metrics` parses with a strict text-format parser;
//! - the JSON endpoints (tunnels, one tunnel, reconnect, route), over TCP
//!   and over the Unix socket, and `nodetunnel status` in every format.
//!
//! Needs root (sshd) and /usr/sbin/sshd. Waits on observable state with
//! bounded deadlines.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use support::*;

const NODETUNNEL: &str = env!("CARGO_BIN_EXE_nodetunnel");
/// Bound on anything the sidecar must reach (ready, a state change).
const DEADLINE: Duration = Duration::from_secs(30);
/// Pause between two polls of observable state.
const POLL: Duration = Duration::from_millis(50);

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// Two sshd "nodes", a client key and a config for `serve`.
struct Fixture {
    nodes: Vec<Sshd>,
    dir: tempfile::TempDir,
    config: PathBuf,
    admin: SocketAddr,
}

impl Fixture {
    fn new(per_node_metrics: bool) -> Fixture {
        let dir = tempfile::Builder::new()
            .prefix("nt-admin-")
            .tempdir()
            .expect("temp dir");
        let key = ClientKey::generate(dir.path()).expect("client key");
        let nodes: Vec<Sshd> = (0..2)
            .map(|_| {
                Sshd::start(SshdOptions {
                    authorized_keys: vec![key.public_line.clone()],
                    ..SshdOptions::default()
                })
                .unwrap_or_else(|e| panic!("starting sshd: {e:#}"))
            })
            .collect();
        let known_hosts = dir.path().join("known_hosts");
        let lines: Vec<String> = nodes.iter().map(Sshd::known_hosts_line).collect();
        std::fs::write(&known_hosts, lines.join("\n") + "\n").expect("known_hosts");
        let admin = SocketAddr::from(([127, 0, 0, 1], free_loopback_port().expect("port")));
        let mut text = format!(
            r#"[ssh]
user = {user:?}
identity = {identity:?}
known_hosts = {known_hosts:?}
connect_timeout = "2s"
keepalive_interval = "1s"
keepalive_max = 2
backoff_base = "50ms"
backoff_max = "200ms"
drain_timeout = "1s"

[routing]
allow_cidrs = ["127.0.0.0/8"]

[proxy]
uds = {proxy:?}
dial_timeout = "5s"

[admin]
listen = "{admin}"
uds = {admin_uds:?}
per_node_metrics = {per_node_metrics}
"#,
            user = Sshd::user(),
            identity = key.private_path,
            proxy = dir.path().join("proxy.sock"),
            admin_uds = dir.path().join("admin.sock"),
        );
        // Every sshd listens on 127.0.0.1; node-1 has that address, the
        // others addresses of their own (an address claimed by two nodes
        // routes to neither), and reach their sshd at 127.0.0.1.
        for (i, n) in nodes.iter().enumerate() {
            text.push_str(&format!(
                "\n[[nodes]]\nname = \"node-{}\"\naddresses = [\"127.0.0.{}\"]\nssh_address = \"127.0.0.1\"\nssh_port = {}\n",
                i + 1,
                i + 1,
                n.port()
            ));
        }
        let config = dir.path().join("nodetunnel.toml");
        std::fs::write(&config, text).expect("config");
        Fixture {
            nodes,
            dir,
            config,
            admin,
        }
    }

    fn proxy_socket(&self) -> PathBuf {
        self.dir.path().join("proxy.sock")
    }

    fn admin_socket(&self) -> PathBuf {
        self.dir.path().join("admin.sock")
    }

    fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }
}

/// A running `nodetunnel serve`; Drop stops it and prints its log if the
/// test failed.
struct Sidecar {
    child: Option<Child>,
    log: PathBuf,
}

impl Sidecar {
    fn start(fx: &Fixture) -> Sidecar {
        let log = fx.dir.path().join("serve.log");
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(NODETUNNEL)
            .args(support::serve::SERVE_ARGS)
            .arg(&fx.config)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawning nodetunnel serve");
        Sidecar {
            child: Some(child),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM; the exit status must be success.
    fn stop(mut self) {
        let mut child = self.child.take().expect("running");
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = child.try_wait().expect("waiting for serve") {
                assert!(
                    status.success(),
                    "serve exited {status}; log:\n{}",
                    self.log()
                );
                return;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                panic!("serve did not exit after SIGTERM; log:\n{}", self.log());
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- nodetunnel serve log ---\n{}\n--- end ---", self.log());
        }
    }
}

/// GET (or another method) on the admin API over TCP, with the tests' own
/// HTTP client (not the CLI's).
async fn admin(addr: SocketAddr, path: &str) -> Result<HttpResponse> {
    let mut s = TcpStream::connect(addr).await?;
    tokio::time::timeout(Duration::from_secs(10), http_get(&mut s, "127.0.0.1", path))
        .await
        .context("admin request timed out")?
}

/// `GET /metrics` asking for OpenMetrics, as Prometheus does (without the
/// `Accept` header the answer is the classic text format:
/// tests/prometheus_scrape.rs).
async fn openmetrics(addr: SocketAddr) -> Result<HttpResponse> {
    let mut s = TcpStream::connect(addr).await?;
    let accept = [("Accept", "application/openmetrics-text;version=1.0.0")];
    tokio::time::timeout(
        Duration::from_secs(10),
        http_get_with(&mut s, "127.0.0.1", "/metrics", &accept),
    )
    .await
    .context("admin request timed out")?
}

/// Any method over any stream, `Connection: close`; (status, body).
async fn raw_request<S>(mut s: S, method: &str, path: &str) -> Result<(u16, String)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    // The admin API answers only IP/localhost Host values, and a POST only
    // with X-Nodetunnel-Request (src/admin/guard.rs).
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Nodetunnel-Request: 1\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .context("request timed out")??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status line in {text:?}"))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok((status, body.to_string()))
}

async fn json(addr: SocketAddr, path: &str) -> Value {
    let r = admin(addr, path).await.expect(path);
    assert_eq!(r.header("content-type"), Some("application/json"), "{path}");
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{path}: {e}: {}", r.text()))
}

/// Poll `probe` until it returns `Some`, within [`DEADLINE`].
async fn until<T, F, Fut>(what: &str, sidecar: &Sidecar, probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    support::poll::until(
        what,
        DEADLINE,
        || format!("serve log:\n{}", sidecar.log()),
        probe,
    )
    .await
}

async fn readyz(addr: SocketAddr) -> Option<(u16, String)> {
    admin(addr, "/readyz")
        .await
        .ok()
        .map(|r| (r.status, r.text()))
}

/// `nodetunnel status ARGS...`: (exit code, stdout, stderr).
fn status_cmd(args: &[&str]) -> (i32, String, String) {
    let out = assert_cmd::Command::new(NODETUNNEL)
        .arg("status")
        .args(args)
        .env_remove("NODETUNNEL_ADMIN")
        .env_remove("NODETUNNEL_ADMIN_UDS")
        .timeout(Duration::from_secs(30))
        .output()
        .expect("running nodetunnel status");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_nodes_and_status_shows_the_trouble() {
    let mut fx = blocking(|| Fixture::new(true));
    let sidecar = blocking(|| Sidecar::start(&fx));
    let addr = fx.admin;

    // Alive at once; ready once a node has a Ready session.
    until("healthz 200", &sidecar, move || async move {
        admin(addr, "/healthz")
            .await
            .ok()
            .filter(|r| r.status == 200)
    })
    .await;
    let (_, body) = until("readyz 200", &sidecar, move || async move {
        readyz(addr).await.filter(|(s, _)| *s == 200)
    })
    .await;
    assert!(body.starts_with("ready: "), "{body}");
    until("both nodes ready", &sidecar, move || async move {
        let v = json(addr, "/api/v1/tunnels").await;
        (v["summary"]["ready"] == 2).then_some(())
    })
    .await;

    // Per-node series are on in this fixture.
    let metrics = openmetrics(addr).await.unwrap().text();
    let families = parse_exposition(&metrics).unwrap_or_else(|e| panic!("{e}\n{metrics}"));
    assert_eq!(
        value(&families, "nodetunnel_node_up", &[("node", "node-1")]),
        Some(1.0)
    );

    // Every node down: 503 with the reason.
    blocking(|| fx.nodes.iter_mut().for_each(Sshd::stop));
    let (_, body) = until("readyz 503", &sidecar, move || async move {
        readyz(addr).await.filter(|(s, _)| *s == 503)
    })
    .await;
    assert!(
        body.contains("0/2 nodes have a Ready SSH session"),
        "{body}"
    );

    // `status` shows both nodes in trouble, with the connect error.
    let url = fx.admin_url();
    let (code, stdout, stderr) = blocking(|| status_cmd(&["--admin", &url]));
    assert_eq!(code, 0, "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with("NODE"), "{stdout}");
    for line in &lines[1..3] {
        assert!(
            line.contains("backoff") || line.contains("connecting"),
            "{stdout}"
        );
    }
    assert!(
        lines[3].starts_with("0/2 nodes ready, 0 streams open, "),
        "{stdout}"
    );
    assert!(!stdout.contains('\x1b'), "no colour without a terminal");
    // Each row in trouble carries its last error (more than the 5 fixed columns).
    for line in &lines[1..3] {
        assert!(line.split_whitespace().count() > 5, "{stdout}");
    }
    // Reconnect attempts are refused, and counted per reason.
    let v = until("a refused reconnect", &sidecar, move || async move {
        let v = json(addr, "/api/v1/tunnels/node-1").await;
        (v["failures"]["refused"].as_u64() >= Some(1)).then_some(v)
    })
    .await;
    assert!(
        v["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("tcp connect") && e.contains("refused")),
        "{v}"
    );
    let metrics = openmetrics(addr).await.unwrap().text();
    let families = parse_exposition(&metrics).unwrap_or_else(|e| panic!("{e}\n{metrics}"));
    assert_eq!(
        value(&families, "nodetunnel_node_up", &[("node", "node-1")]),
        Some(0.0)
    );
    let refused = value(
        &families,
        "nodetunnel_ssh_handshakes_total",
        &[("result", "refused")],
    );
    assert!(refused >= Some(1.0), "{metrics}");
    assert!(
        value(
            &families,
            "nodetunnel_node_handshake_failures_total",
            &[("node", "node-1"), ("reason", "refused")]
        ) >= Some(1.0),
        "{metrics}"
    );

    // Back: 200 again.
    blocking(|| {
        fx.nodes
            .iter_mut()
            .for_each(|n| n.restart().expect("restarting sshd"))
    });
    let (_, body) = until("readyz 200 again", &sidecar, move || async move {
        readyz(addr).await.filter(|(s, _)| *s == 200)
    })
    .await;
    assert!(body.starts_with("ready: "), "{body}");

    let socket = fx.admin_socket();
    assert!(socket.exists());
    blocking(|| sidecar.stop());
    assert!(!socket.exists(), "the admin socket is removed at shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_and_the_json_endpoints_answer() {
    let fx = blocking(|| Fixture::new(false));
    let echo = blocking(|| spawn_local(ServerKind::echo(SocketAddr::from(([127, 0, 0, 1], 0)))))
        .expect("echo server");
    let closed = blocking(free_loopback_port).expect("a closed port");
    let sidecar = blocking(|| Sidecar::start(&fx));
    let addr = fx.admin;
    until("both nodes ready", &sidecar, move || async move {
        let r = admin(addr, "/api/v1/tunnels").await.ok()?;
        let v: Value = serde_json::from_slice(&r.body).ok()?;
        (v["summary"]["ready"] == 2).then_some(())
    })
    .await;

    let scrape = move || async move {
        let r = openmetrics(addr).await.expect("/metrics");
        assert_eq!(r.status, 200);
        assert!(
            r.header("content-type")
                .is_some_and(|c| c.starts_with("application/openmetrics-text")),
            "{:?}",
            r.headers
        );
        let text = r.text();
        parse_exposition(&text).unwrap_or_else(|e| panic!("/metrics does not parse: {e}\n{text}"))
    };
    let before = scrape().await;
    for family in [
        "nodetunnel_tunnels",
        "nodetunnel_ssh_handshakes",
        "nodetunnel_keepalive_rtt_seconds",
        "nodetunnel_streams_open",
        "nodetunnel_stream_open_duration_seconds",
        "nodetunnel_inventory_last_sync_timestamp_seconds",
    ] {
        assert!(before.contains_key(family), "family {family} missing");
    }
    assert_eq!(before["nodetunnel_keepalive_rtt_seconds"].kind, "histogram");
    assert!(
        value(
            &before,
            "nodetunnel_inventory_last_sync_timestamp_seconds",
            &[]
        )
        .unwrap_or(0.0)
            > 1.6e9
    );
    assert_eq!(
        value(&before, "nodetunnel_tunnels", &[("state", "ready")]),
        Some(2.0)
    );
    assert!(
        !before.keys().any(|k| k.starts_with("nodetunnel_node_")),
        "per-node series are off by default"
    );
    let get = |f: &BTreeMap<String, Family>, name: &str, labels: &[(&str, &str)]| {
        value(f, name, labels).unwrap_or(0.0)
    };

    // A stream through node-1 (127.0.0.1 is its address): counters move.
    let proxy = fx.proxy_socket();
    let mut stream = connect(&proxy, &format!("127.0.0.1:{}", echo.port()))
        .await
        .expect("CONNECT to the echo server");
    stream.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut back))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(&back, b"ping");
    let open = scrape().await;
    assert_eq!(value(&open, "nodetunnel_streams_open", &[]), Some(1.0));
    assert_eq!(
        get(&open, "nodetunnel_stream_opens_total", &[("result", "ok")]),
        get(
            &before,
            "nodetunnel_stream_opens_total",
            &[("result", "ok")]
        ) + 1.0
    );
    assert_eq!(
        get(
            &open,
            "nodetunnel_proxy_requests_total",
            &[("listener", "uds"), ("code", "200")]
        ),
        get(
            &before,
            "nodetunnel_proxy_requests_total",
            &[("listener", "uds"), ("code", "200")]
        ) + 1.0
    );
    assert!(
        get(&open, "nodetunnel_stream_open_duration_seconds_count", &[])
            > get(
                &before,
                "nodetunnel_stream_open_duration_seconds_count",
                &[]
            )
    );
    let node1 = json(addr, "/api/v1/tunnels/node-1").await;
    assert_eq!(node1["streams"], 1, "{node1}");
    assert_eq!(node1["state"], "ready");
    assert!(node1["rtt"].is_number() || node1["rtt"].is_null());

    let errors_before = json(addr, "/api/v1/tunnels").await["summary"]["errors_last_minute"]
        .as_u64()
        .unwrap_or(0);
    // A dial the node refuses (nothing listens): 502, counted.
    let refused = connect(&proxy, &format!("127.0.0.1:{closed}")).await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("502")),
        "{:?}",
        refused.map(|_| ())
    );
    // A destination the policy denies: 403, counted by reason.
    let denied = connect(&proxy, "169.254.169.254:80").await;
    assert!(
        denied
            .as_ref()
            .is_err_and(|e| e.to_string().contains("403")),
        "{:?}",
        denied.map(|_| ())
    );
    let after = scrape().await;
    assert_eq!(
        get(
            &after,
            "nodetunnel_stream_opens_total",
            &[("result", "refused")]
        ),
        get(
            &before,
            "nodetunnel_stream_opens_total",
            &[("result", "refused")]
        ) + 1.0
    );
    assert_eq!(
        get(
            &after,
            "nodetunnel_proxy_requests_total",
            &[("listener", "uds"), ("code", "502")]
        ),
        get(
            &before,
            "nodetunnel_proxy_requests_total",
            &[("listener", "uds"), ("code", "502")]
        ) + 1.0
    );
    assert_eq!(
        get(
            &after,
            "nodetunnel_policy_denials_total",
            &[("reason", "link_local")]
        ),
        get(
            &before,
            "nodetunnel_policy_denials_total",
            &[("reason", "link_local")]
        ) + 1.0
    );
    // Nothing listening is the destination's failure: not a reset, not a
    // lost session, not a recent error of the tunnels.
    assert_eq!(
        get(
            &after,
            "nodetunnel_stream_resets_total",
            &[("reason", "session_lost")]
        ),
        get(
            &before,
            "nodetunnel_stream_resets_total",
            &[("reason", "session_lost")]
        )
    );
    let list = json(addr, "/api/v1/tunnels").await;
    assert_eq!(
        list["summary"]["errors_last_minute"].as_u64().unwrap_or(0),
        errors_before,
        "{list}"
    );
    assert_eq!(list["summary"]["streams"], 1);

    // Bytes are counted both ways once the stream is done.
    drop(stream);
    let done = until("stream closed", &sidecar, move || async move {
        let r = openmetrics(addr).await.ok()?;
        let f = parse_exposition(&r.text()).ok()?;
        (value(&f, "nodetunnel_streams_open", &[]) == Some(0.0)).then_some(f)
    })
    .await;
    for direction in ["to_node", "from_node"] {
        assert!(
            get(&done, "nodetunnel_bytes_total", &[("direction", direction)]) >= 4.0,
            "{direction}"
        );
    }

    // The route endpoint decides without dialling.
    let route = json(
        addr,
        &format!("/api/v1/route?dest=127.0.0.1:{}", echo.port()),
    )
    .await;
    assert_eq!(route["decision"], "node", "{route}");
    assert_eq!(route["node"], "node-1");
    assert_eq!(route["rule_label"], "node_address");
    assert_eq!(route["node_state"], "ready");
    let route = json(addr, "/api/v1/route?dest=169.254.169.254%3A80").await;
    assert_eq!(route["decision"], "denied", "{route}");
    assert_eq!(route["reason"], "link_local");
    let bad = admin(addr, "/api/v1/route?dest=no-port").await.unwrap();
    assert_eq!(bad.status, 400, "{}", bad.text());
    let missing = admin(addr, "/api/v1/tunnels/nope").await.unwrap();
    assert_eq!(missing.status, 404);
    let error: Value = serde_json::from_slice(&missing.body).expect("a JSON error");
    assert_eq!(error["error"], "no node named \"nope\"");
    let unknown = admin(addr, "/nothing").await.unwrap();
    assert_eq!(unknown.status, 404);

    // Reconnect: 202 and a second handshake; GET is not allowed there.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (code, _) = raw_request(tcp, "GET", "/api/v1/tunnels/node-2/reconnect")
        .await
        .unwrap();
    assert_eq!(code, 405);
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (code, body) = raw_request(tcp, "POST", "/api/v1/tunnels/node-2/reconnect")
        .await
        .unwrap();
    assert_eq!(code, 202, "{body}");
    until("node-2 reconnected", &sidecar, move || async move {
        let v = json(addr, "/api/v1/tunnels/node-2").await;
        (v["handshakes"].as_u64() == Some(2) && v["state"] == "ready").then_some(())
    })
    .await;

    // The Unix socket serves the same API.
    let uds = UnixStream::connect(fx.admin_socket()).await.unwrap();
    let (code, body) = raw_request(uds, "GET", "/readyz").await.unwrap();
    assert_eq!(code, 200, "{body}");

    // `nodetunnel status` over TCP and over the socket, every format.
    let url = fx.admin_url();
    let (code, stdout, stderr) = blocking(|| status_cmd(&["--admin", &url]));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("2/2 nodes ready, 0 streams open"),
        "{stdout}"
    );
    let socket = fx.admin_socket();
    let socket = socket.to_str().unwrap();
    let (code, stdout, stderr) = blocking(|| status_cmd(&["--admin-uds", socket, "-o", "wide"]));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("ENDPOINT") && stdout.contains("node-2"),
        "{stdout}"
    );
    let (code, stdout, stderr) = blocking(|| status_cmd(&["--admin-uds", socket, "-o", "json"]));
    assert_eq!(code, 0, "{stderr}");
    let v: Value = serde_json::from_str(&stdout).expect("status -o json is JSON");
    assert_eq!(v["tunnels"].as_array().map(Vec::len), Some(2));
    // Nothing listening: exit 1 with a message.
    let dead = format!("http://127.0.0.1:{closed}");
    let (code, _, stderr) = blocking(|| status_cmd(&["--admin", &dead]));
    assert_eq!(code, 1);
    assert!(
        stderr.contains("cannot connect to the admin API"),
        "{stderr}"
    );

    blocking(|| sidecar.stop());
}

/// CONNECT through the front door's Unix socket; the tunnel, or an error
/// naming the status.
async fn connect(socket: &Path, target: &str) -> Result<UnixStream> {
    let mut s = UnixStream::connect(socket).await?;
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    let read_head = async {
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut byte).await? == 0 {
                bail!("closed before the response head");
            }
            head.push(byte[0]);
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(15), read_head)
        .await
        .context("CONNECT answer timed out")??;
    let head = String::from_utf8_lossy(&head).into_owned();
    if head.starts_with("HTTP/1.1 200 ") {
        Ok(s)
    } else {
        bail!(
            "CONNECT {target} answered {}",
            head.lines().next().unwrap_or("")
        )
    }
}

// ---------------------------------------------------------------------------
// A strict parser of the Prometheus / OpenMetrics text format
// ---------------------------------------------------------------------------

/// (le, cumulative count) of each histogram series, by its other labels.
type Buckets = BTreeMap<Vec<(String, String)>, Vec<(f64, f64)>>;

/// One sample line.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// One metric family: `# HELP`, `# TYPE` and its samples.
#[derive(Debug)]
struct Family {
    kind: String,
    samples: Vec<Sample>,
}

/// The value of the sample `name` with exactly `labels` (the family is the
/// name without its type suffix).
fn value(families: &BTreeMap<String, Family>, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let wanted: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    families
        .values()
        .flat_map(|f| &f.samples)
        .find(|s| s.name == name && s.labels == wanted)
        .map(|s| s.value)
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_value(text: &str) -> Result<f64, String> {
    match text {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        t => t.parse::<f64>().map_err(|_| format!("bad value {t:?}")),
    }
}

/// `{a="x",b="y\"z"}` at the start of `text`; the labels and the rest.
fn parse_labels(text: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = text.strip_prefix('{').ok_or("expected {")?;
    if let Some(after) = rest.strip_prefix('}') {
        return Ok((labels, after));
    }
    loop {
        let eq = rest.find('=').ok_or("label without =")?;
        let name = &rest[..eq];
        if !valid_name(name) || name.starts_with("__") {
            return Err(format!("bad label name {name:?}"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("unterminated label value".into()),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("bad escape {other:?}")),
                },
                Some((_, '\n')) => return Err("newline in label value".into()),
                Some((_, c)) => value.push(c),
            }
        };
        if labels.insert(name.to_string(), value).is_some() {
            return Err(format!("duplicate label {name}"));
        }
        rest = &rest[end + 1..];
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        rest = rest.strip_prefix(',').ok_or("expected , or }")?;
    }
}

/// Parse the whole exposition, checking: HELP/TYPE before samples, one
/// block per family, sample names matching their family's type, label
/// syntax, values, non-negative counters, cumulative histogram buckets
/// ending in `+Inf` equal to `_count`, and a single final `# EOF`.
fn parse_exposition(text: &str) -> Result<BTreeMap<String, Family>, String> {
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    let mut current: Option<String> = None;
    let lines: Vec<&str> = text
        .strip_suffix('\n')
        .ok_or("no final newline")?
        .split('\n')
        .collect();
    if lines.last() != Some(&"# EOF") {
        return Err("does not end with # EOF".into());
    }
    for (i, line) in lines[..lines.len() - 1].iter().enumerate() {
        let err = |m: String| format!("line {}: {m}: {line:?}", i + 1);
        if line.is_empty() {
            return Err(err("empty line".into()));
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (keyword, name) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let arg = parts.next().unwrap_or("");
            if !valid_name(name) {
                return Err(err(format!("bad metric name {name:?}")));
            }
            match keyword {
                "HELP" => {
                    if current.as_deref() != Some(name) {
                        if families.contains_key(name) {
                            return Err(err("family appears twice".into()));
                        }
                        families.insert(
                            name.to_string(),
                            Family {
                                kind: String::new(),
                                samples: Vec::new(),
                            },
                        );
                        current = Some(name.to_string());
                    }
                }
                "TYPE" => {
                    if ![
                        "counter",
                        "gauge",
                        "histogram",
                        "summary",
                        "info",
                        "stateset",
                        "unknown",
                        "gaugehistogram",
                    ]
                    .contains(&arg)
                    {
                        return Err(err(format!("unknown type {arg:?}")));
                    }
                    if current.as_deref() != Some(name) {
                        if families.contains_key(name) {
                            return Err(err("family appears twice".into()));
                        }
                        families.insert(
                            name.to_string(),
                            Family {
                                kind: String::new(),
                                samples: Vec::new(),
                            },
                        );
                        current = Some(name.to_string());
                    }
                    let family = families
                        .get_mut(name)
                        .ok_or_else(|| err("no family".into()))?;
                    if !family.samples.is_empty() || !family.kind.is_empty() {
                        return Err(err("TYPE after samples or twice".into()));
                    }
                    family.kind = arg.to_string();
                }
                "UNIT" => {}
                other => return Err(err(format!("unknown comment keyword {other:?}"))),
            }
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .ok_or_else(|| err("no value".into()))?;
        let name = &line[..name_end];
        if !valid_name(name) {
            return Err(err(format!("bad sample name {name:?}")));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(err)?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let mut fields = rest
            .strip_prefix(' ')
            .ok_or_else(|| err("no space before value".into()))?
            .split(' ');
        let value = parse_value(fields.next().unwrap_or("")).map_err(err)?;
        if let Some(ts) = fields.next() {
            ts.parse::<f64>()
                .map_err(|_| err(format!("bad timestamp {ts:?}")))?;
        }
        if fields.next().is_some() {
            return Err(err("trailing fields".into()));
        }
        let family_name = current
            .clone()
            .ok_or_else(|| err("sample before any TYPE".into()))?;
        let family = families
            .get_mut(&family_name)
            .ok_or_else(|| err("no family".into()))?;
        let suffixes: &[&str] = match family.kind.as_str() {
            "counter" => &["_total", "_created"],
            "gauge" => &[""],
            "histogram" => &["_bucket", "_count", "_sum", "_created"],
            "" => return Err(err("sample of a family without TYPE".into())),
            _ => &[
                "", "_total", "_bucket", "_count", "_sum", "_created", "_info",
            ],
        };
        if !suffixes.iter().any(|s| format!("{family_name}{s}") == name) {
            return Err(err(format!(
                "sample {name} does not belong to {} family {family_name}",
                family.kind
            )));
        }
        if family.kind == "counter" && (value.is_nan() || value < 0.0) {
            return Err(err("negative or NaN counter".into()));
        }
        family.samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    // Histograms: cumulative buckets per label set, +Inf == _count.
    for (name, family) in families.iter().filter(|(_, f)| f.kind == "histogram") {
        let mut series: Buckets = BTreeMap::new();
        for s in family
            .samples
            .iter()
            .filter(|s| s.name.ends_with("_bucket"))
        {
            let le = s
                .labels
                .get("le")
                .ok_or(format!("{name}: bucket without le"))?;
            let key: Vec<(String, String)> = s
                .labels
                .iter()
                .filter(|(k, _)| *k != "le")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            series
                .entry(key)
                .or_default()
                .push((parse_value(le)?, s.value));
        }
        for (key, buckets) in series {
            for w in buckets.windows(2) {
                if !(w[0].0 < w[1].0 && w[0].1 <= w[1].1) {
                    return Err(format!("{name}: buckets not increasing: {buckets:?}"));
                }
            }
            let last = buckets.last().ok_or(format!("{name}: no buckets"))?;
            if last.0 != f64::INFINITY {
                return Err(format!("{name}: no +Inf bucket"));
            }
            let labels: BTreeMap<String, String> = key.into_iter().collect();
            let count = family
                .samples
                .iter()
                .find(|s| s.name == format!("{name}_count") && s.labels == labels)
                .ok_or(format!("{name}: no _count"))?;
            if count.value != last.1 {
                return Err(format!(
                    "{name}: +Inf bucket {} != _count {}",
                    last.1, count.value
                ));
            }
        }
    }
    Ok(families)
}

#[test]
fn the_parser_refuses_broken_expositions() {
    // OpenMetrics counters: the family `a`, its sample `a_total`.
    let good = "# HELP a A.\n# TYPE a counter\na_total{x=\"1\"} 3\n# EOF\n";
    assert!(parse_exposition(good).is_ok());
    for bad in [
        "# TYPE a counter\na_total 1\n",                       // no EOF
        "# TYPE a counter\na_total -1\n# EOF\n",               // negative counter
        "# TYPE a gauge\na_total 1\n# EOF\n",                  // wrong suffix
        "# TYPE a gauge\na{x=\"1} 1\n# EOF\n",                 // unterminated label
        "# TYPE a gauge\na{x=\"1\",x=\"2\"} 1\n# EOF\n",       // duplicate label
        "# TYPE a gauge\na one\n# EOF\n",                      // bad value
        "a 1\n# EOF\n",                                        // no TYPE
        "# TYPE a gauge\na 1\n# TYPE b gauge\nb 1\n# TYPE a gauge\na 2\n# EOF\n", // a twice
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\nh_sum 1\n# EOF\n",
        "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_count 1\nh_sum 1\n# EOF\n", // no +Inf
    ] {
        assert!(parse_exposition(bad).is_err(), "accepted: {bad:?}");
    }
}
