//! End-to-end test of the front door: the real `nodetunnel serve` binary in
//! the control-plane namespace of a three-node testbed (network namespaces,
//! real OpenSSH sshd on port 22 of every node), driven the way kube-apiserver
//! (byte-exact `HTTPConnect` over the Unix socket) and curl (HTTP CONNECT
//! over TCP, mTLS, SOCKS5) drive it.
//!
//! Needs root, OpenSSH sshd (/usr/sbin/sshd), iproute2 and curl; fails with
//! a clear message (never skips) when one is missing.
//!
//! Every test builds its own testbed and its own `serve` process(es); the
//! process is stopped with SIGTERM at the end and must exit 0 (graceful
//! shutdown), and is stopped (SIGTERM, then SIGKILL) by a Drop guard when a
//! test fails, which also prints the process's log.

mod support;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use support::clients::tls_connect_ip;
use support::serve::{
    keyed_testbed, node_toml, on_every_node, preflight_root, server_in_ns, write_file, ServeProcess,
};
use support::*;

const CURL: &str = "/usr/bin/curl";

/// Ports of the proxy listeners inside the (fresh, private) control-plane
/// namespace of each bed: nothing else listens there.
const TCP_PORT: u16 = 8001;
const SOCKS5_PORT: u16 = 1080;
const TLS_PORT: u16 = 8443;
/// The pod server's port on node 2's pod IP.
const POD_PORT: u16 = 8080;
/// The kubelet stand-in's port on every node IP.
const KUBELET_PORT: u16 = 10250;

/// Bound on a `serve` process becoming ready (every node's tunnel up).
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on one request/response exchange through the proxy.
const IO_TIMEOUT: Duration = Duration::from_secs(15);
/// Bound on the graceful shutdown after SIGTERM.
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

/// What kube-apiserver requires after its CONNECT, byte for byte, with
/// nothing after it.
const CONNECT_OK: &[u8] = b"HTTP/1.1 200 Connection Established\r\n\r\n";

// ---------------------------------------------------------------------------
// Fixture: testbed, servers on the nodes, config files
// ---------------------------------------------------------------------------

/// Fail (never skip) with a clear message when the environment cannot run
/// these tests.
fn preflight() {
    preflight_root(
        "e2e_frontdoor",
        "network namespaces, sshd on port 22 of every node",
    );
    assert!(
        Path::new(CURL).exists(),
        "curl not found at {CURL}: apt-get install curl"
    );
}

/// A three-node testbed with servers on the nodes:
/// - a kubelet stand-in (HTTPS, self-signed) on every node IP :10250,
/// - an Http server on node 2's pod IP :8080 (label node-2),
/// - an Http server on the service IP 10.96.0.10:80 of every node (label =
///   node name, so a response says which node served it).
///
/// Fields drop in order: servers, then the bed, then the temp dir.
struct Cluster {
    kubelets: Vec<ServerHandle>,
    pod: ServerHandle,
    services: Vec<ServerHandle>,
    bed: Testbed,
    key: ClientKey,
    dir: tempfile::TempDir,
}

impl Cluster {
    fn up() -> Cluster {
        preflight();
        let (dir, key, bed) = keyed_testbed("nt-e2e-", 3);
        let kubelets = on_every_node(&bed, |n| {
            ServerKind::kubelet(SocketAddr::from((n.ip, KUBELET_PORT)), &n.name)
        });
        let n2 = bed.node(2);
        let pod = server_in_ns(
            &bed,
            &n2.ns,
            ServerKind::http(SocketAddr::from((n2.pod_ip, POD_PORT)), &n2.name),
        );
        let services = on_every_node(&bed, |n| {
            ServerKind::http(SocketAddr::from((bed.service_ip(), 80)), &n.name)
        });
        Cluster {
            kubelets,
            pod,
            services,
            bed,
            key,
            dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `[proxy]` with all three plain listeners; the socket is `<tag>.sock`.
    fn plain_proxy(&self, tag: &str) -> String {
        format!(
            "[proxy]\nuds = {:?}\ntcp = \"127.0.0.1:{TCP_PORT}\"\nsocks5 = \"127.0.0.1:{SOCKS5_PORT}\"\n\
             dial_timeout = \"3s\"\n",
            self.path(&format!("{tag}.sock"))
        )
    }

    /// Write `<tag>.toml`: one `[[nodes]]` per testbed node, the given
    /// `[proxy]` section (with any sub-tables).
    fn write_config(&self, tag: &str, proxy: &str) -> PathBuf {
        let mut text = format!(
            r#"[ssh]
user = {user:?}
identity = {identity:?}
known_hosts = {known_hosts:?}
host_key_policy = "strict"
connect_timeout = "3s"
keepalive_interval = "2s"
keepalive_max = 2
backoff_base = "100ms"
backoff_max = "1s"
drain_timeout = "5s"

[routing]
service_cidrs = ["10.96.0.0/12"]

# Two `serve` processes share the namespace: no admin TCP port, one
# admin socket each.
[admin]
listen = ""
uds = {admin:?}

{proxy}
"#,
            user = self.bed.ssh_user(),
            identity = self.key.private_path,
            known_hosts = self.bed.known_hosts_path(),
            admin = self.path(&format!("{tag}-admin.sock")),
        );
        for n in self.bed.nodes() {
            text.push_str(&node_toml(n, &[]));
        }
        write_file(self.path(&format!("{tag}.toml")), &text)
    }

    /// `ip netns exec <cp> curl -sS --max-time 20 ARGS...`, bounded.
    async fn curl(&self, args: &[&str]) -> Output {
        let mut cmd = self.bed.command_in_cp(CURL);
        cmd.args(["-sS", "--max-time", "20"]).args(args);
        cmd.stdin(Stdio::null());
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.kill_on_drop(true);
        match tokio::time::timeout(Duration::from_secs(40), cmd.output()).await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => panic!("running curl {args:?}: {e}"),
            Err(_) => panic!("curl {args:?} did not finish within 40 s"),
        }
    }

    /// curl that must succeed; its stdout.
    async fn curl_ok(&self, args: &[&str]) -> String {
        let out = self.curl(args).await;
        assert!(
            out.status.success(),
            "curl {args:?} failed ({}): stdout {:?} stderr {:?}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// Run blocking code (testbed scripts, log waits) from a multi-thread
/// tokio test without stalling the runtime's other tasks.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

// ---------------------------------------------------------------------------
// The process under test and its log
// ---------------------------------------------------------------------------

/// A running `nodetunnel serve` inside the control-plane namespace
/// ([`ServeProcess`]: its log, graceful stop, and a Drop that stops it and
/// prints its log if the test failed).
struct NodeTunnel(ServeProcess);

impl std::ops::Deref for NodeTunnel {
    type Target = ServeProcess;

    fn deref(&self) -> &ServeProcess {
        &self.0
    }
}

impl NodeTunnel {
    /// Start `serve` with config `<tag>.toml` ([`Cluster::write_config`])
    /// and return once every node logged "tunnel ready".
    fn start(cluster: &Cluster, tag: &str, proxy: &str) -> NodeTunnel {
        let config = cluster.write_config(tag, proxy);
        let nt = NodeTunnel(ServeProcess::spawn(
            &cluster.bed,
            tag,
            &config,
            Duration::from_secs(5),
        ));
        let deadline = Instant::now() + START_TIMEOUT;
        nt.expect_log(0, deadline - Instant::now(), "front door listening", None);
        for n in cluster.bed.nodes() {
            let left = deadline.saturating_duration_since(Instant::now());
            nt.expect_log(0, left, "tunnel ready", Some(&n.name));
        }
        nt
    }

    /// Graceful shutdown: SIGTERM must make it drain and exit 0, logging
    /// "stopped" last.
    fn stop(self) {
        self.0.stop(EXIT_TIMEOUT);
    }
}

// ---------------------------------------------------------------------------
// An apiserver-like HTTPConnect client over the Unix socket
// ---------------------------------------------------------------------------

/// Exactly what kube-apiserver writes.
fn apiserver_connect(target: &str) -> String {
    format!("CONNECT {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Read until a full response head is in `buf` (and whatever came with it).
async fn read_head<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>) -> Result<()> {
    let mut chunk = [0u8; 4096];
    while find(buf, b"\r\n\r\n").is_none() {
        let n = s
            .read(&mut chunk)
            .await
            .context("reading the response head")?;
        if n == 0 {
            bail!(
                "connection closed before a complete response head; got {:?}",
                String::from_utf8_lossy(buf)
            );
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(())
}

/// Connect to the Unix socket and send the apiserver's CONNECT; the stream
/// and every byte read until the response head was complete.
async fn send_connect(uds: &Path, target: &str) -> Result<(UnixStream, Vec<u8>)> {
    let mut s = UnixStream::connect(uds)
        .await
        .with_context(|| format!("connecting to {}", uds.display()))?;
    s.write_all(apiserver_connect(target).as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(IO_TIMEOUT, read_head(&mut s, &mut buf))
        .await
        .map_err(|_| anyhow!("CONNECT {target}: no response head within {IO_TIMEOUT:?}"))??;
    Ok((s, buf))
}

/// A tunnel as the apiserver gets it: the answer must be exactly
/// [`CONNECT_OK`] with no byte after it.
async fn tunnel(uds: &Path, target: &str) -> Result<UnixStream> {
    let (s, buf) = send_connect(uds, target).await?;
    ensure!(
        buf == CONNECT_OK,
        "CONNECT {target}: expected exactly {:?} and nothing buffered after it, got {:?}",
        String::from_utf8_lossy(CONNECT_OK),
        String::from_utf8_lossy(&buf)
    );
    Ok(s)
}

/// A refused CONNECT: status, lower-cased head, body.
#[derive(Debug)]
struct Refusal {
    status: u16,
    head: String,
    body: String,
}

/// Send the apiserver's CONNECT and read a refusal to EOF (the proxy closes
/// after it); an error if the dial was accepted or the answer hangs.
async fn refused(uds: &Path, target: &str) -> Result<Refusal> {
    let (mut s, mut buf) = send_connect(uds, target).await?;
    ensure!(
        !buf.starts_with(b"HTTP/1.1 200"),
        "CONNECT {target}: expected a refusal, got {:?}",
        String::from_utf8_lossy(&buf)
    );
    tokio::time::timeout(IO_TIMEOUT, s.read_to_end(&mut buf))
        .await
        .map_err(|_| anyhow!("CONNECT {target}: the refusal did not end within {IO_TIMEOUT:?}"))?
        .context("reading the refusal")?;
    let end = find(&buf, b"\r\n\r\n").expect("head was complete") + 4;
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let body = String::from_utf8_lossy(&buf[end..]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad status line in {head:?}"))?;
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("refusal without content-length: {head:?}"))?;
    ensure!(
        length == body.len(),
        "content-length {length} but {} body bytes: {body:?}",
        body.len()
    );
    Ok(Refusal { status, head, body })
}

/// A refusal body is one non-empty line of text.
fn assert_one_line(r: &Refusal, what: &str) {
    assert!(
        r.head.contains("content-type: text/plain"),
        "{what}: refusal is not text/plain: {r:?}"
    );
    let line = r
        .body
        .strip_suffix('\n')
        .unwrap_or_else(|| panic!("{what}: refusal body does not end with a newline: {r:?}"));
    assert!(
        !line.trim().is_empty() && !line.contains(['\n', '\r']),
        "{what}: refusal body is not one non-empty line: {r:?}"
    );
}

/// GET `path` with TLS through an apiserver tunnel to `ip`:10250, trusting
/// only that kubelet's own certificate.
async fn kubelet_get(
    uds: &Path,
    kubelet: &ServerHandle,
    ip: Ipv4Addr,
    path: &str,
) -> Result<HttpResponse> {
    let target = format!("{ip}:{KUBELET_PORT}");
    let s = tunnel(uds, &target).await?;
    let connector = tls_connector(kubelet.tls_cert_der().expect("kubelet cert"))?;
    let mut tls = tokio::time::timeout(IO_TIMEOUT, tls_connect_ip(&connector, IpAddr::V4(ip), s))
        .await
        .map_err(|_| anyhow!("TLS handshake with {target} through the tunnel timed out"))??;
    tokio::time::timeout(IO_TIMEOUT, http_get(&mut tls, &ip.to_string(), path))
        .await
        .map_err(|_| anyhow!("GET {path} on {target} timed out"))?
}

/// Plain GET `path` through an apiserver tunnel to `target`.
async fn plain_get(uds: &Path, target: &str, path: &str) -> Result<HttpResponse> {
    let mut s = tunnel(uds, target).await?;
    let host = target.rsplit_once(':').map(|(h, _)| h).unwrap_or(target);
    tokio::time::timeout(IO_TIMEOUT, http_get(&mut s, host, path))
        .await
        .map_err(|_| anyhow!("GET {path} on {target} timed out"))?
}

/// The node a service response names ("pod node-N\n").
fn served_by(r: &HttpResponse) -> String {
    assert_eq!(
        r.status,
        200,
        "service answered {} {:?}",
        r.status,
        r.text()
    );
    r.text()
        .strip_prefix("pod ")
        .and_then(|t| t.strip_suffix('\n'))
        .unwrap_or_else(|| panic!("unexpected service answer {:?}", r.text()))
        .to_owned()
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// The apiserver's HTTPConnect over the Unix socket: byte-exact request and
/// 200, TLS to every node's kubelet, a pod by its pod IP, the service IP,
/// policy refusals (403) and a refused channel (502), while a 10 s streaming
/// response (`kubectl logs -f`-like) flows through a tunnel of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_http_connect_over_the_unix_socket() {
    let cluster = blocking(Cluster::up);
    let nt = blocking(|| NodeTunnel::start(&cluster, "uds", &cluster.plain_proxy("uds")));
    let uds = cluster.path("uds.sock");
    let pod_target = format!("{}:{POD_PORT}", cluster.bed.node(2).pod_ip);

    // A long streaming response, concurrently with everything below.
    let stream = {
        let (uds, target) = (uds.clone(), pod_target.clone());
        tokio::spawn(async move {
            let mut s = tunnel(&uds, &target).await?;
            tokio::time::timeout(
                Duration::from_secs(60),
                http_get(&mut s, "10.244.2.10", "/stream?seconds=10"),
            )
            .await
            .map_err(|_| anyhow!("the 10 s stream did not end within 60 s"))?
        })
    };

    // Every node's kubelet, TLS verified against that kubelet's own cert.
    for (n, kubelet) in cluster.bed.nodes().iter().zip(&cluster.kubelets) {
        let r = kubelet_get(&uds, kubelet, n.ip, "/healthz")
            .await
            .unwrap_or_else(|e| panic!("{} kubelet /healthz: {e:#}", n.name));
        assert_eq!(
            (r.status, r.text().as_str()),
            (200, "ok"),
            "{} /healthz",
            n.name
        );
        let r = kubelet_get(&uds, kubelet, n.ip, "/").await.unwrap();
        assert_eq!(r.text(), format!("kubelet {}\n", n.name));
    }

    // A pod on node 2 by its pod IP (only node 2 can reach it).
    let before = cluster.pod.accepted();
    let r = plain_get(&uds, &pod_target, "/").await.unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "pod node-2\n"));
    assert!(cluster.pod.accepted() > before);

    // The service IP: any node answers.
    let mut seen = BTreeSet::new();
    for _ in 0..6 {
        let r = plain_get(&uds, "10.96.0.10:80", "/").await.unwrap();
        seen.insert(served_by(&r));
    }
    let names: BTreeSet<String> = cluster.bed.node_names().into_iter().collect();
    assert!(seen.is_subset(&names), "service answered by {seen:?}");
    let total: u64 = cluster.services.iter().map(|s| s.accepted()).sum();
    assert_eq!(total, 6, "every service request reached exactly one node");

    // Policy: cloud metadata, loopback and a node's own sshd are refused
    // with 403 and a one-line reason, before any channel is opened.
    for target in ["169.254.169.254:80", "127.0.0.1:10250", "10.240.0.11:22"] {
        let r = refused(&uds, target)
            .await
            .unwrap_or_else(|e| panic!("CONNECT {target}: {e:#}"));
        assert_eq!(r.status, 403, "CONNECT {target}: {r:?}");
        assert_one_line(&r, target);
    }

    // Routed to node 1 by its pod CIDR, but nothing listens there: node 1's
    // sshd refuses the channel, which is a 502 naming the node.
    let r = refused(&uds, &format!("10.244.1.10:{POD_PORT}"))
        .await
        .unwrap();
    assert_eq!(r.status, 502, "{r:?}");
    assert_one_line(&r, "10.244.1.10");
    assert!(r.body.contains("node-1"), "{r:?}");

    // The stream: every line arrived, in order, and the body ended cleanly
    // (http_get only returns a chunked body after its last chunk).
    let r = stream
        .await
        .expect("stream task")
        .expect("streaming through the tunnel");
    assert!(r.chunked, "the stream must be chunked");
    let lines: Vec<String> = r.text().lines().map(str::to_owned).collect();
    let want: Vec<String> = (1..=100).map(|i| format!("node-2 tick {i}")).collect();
    assert_eq!(lines, want, "every line of the 10 s stream, in order");

    blocking(|| nt.stop());
    assert!(!uds.exists(), "the socket file is removed on shutdown");
}

/// curl through the TCP CONNECT listener and the SOCKS5 listener to a pod,
/// the service IP and a kubelet; and through a second `serve` whose TCP
/// listener requires mTLS: with a client certificate it tunnels, without
/// one (or with one from another CA) the handshake fails and nothing is
/// proxied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_over_tcp_connect_socks5_and_mtls() {
    let cluster = blocking(Cluster::up);
    let pki = blocking(|| Pki::write(cluster.dir.path()));
    let tls_proxy = format!(
        "[proxy]\ntcp = \"127.0.0.1:{TLS_PORT}\"\n\n[proxy.tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n",
        pki.server_cert, pki.server_key, pki.ca
    );
    let plain = blocking(|| NodeTunnel::start(&cluster, "plain", &cluster.plain_proxy("plain")));
    let mtls = blocking(|| NodeTunnel::start(&cluster, "mtls", &tls_proxy));

    let pod_url = format!("http://{}:{POD_PORT}/", cluster.bed.node(2).pod_ip);
    let kubelet_url = format!("https://{}:{KUBELET_PORT}/healthz", cluster.bed.node(2).ip);
    let http_proxy = format!("http://127.0.0.1:{TCP_PORT}");
    let socks = format!("127.0.0.1:{SOCKS5_PORT}");
    let names: BTreeSet<String> = cluster.bed.node_names().into_iter().collect();

    // HTTP CONNECT over TCP.
    let out = cluster
        .curl_ok(&["--fail", "--proxytunnel", "-x", &http_proxy, &pod_url])
        .await;
    assert_eq!(out, "pod node-2\n");
    let out = cluster
        .curl_ok(&[
            "--fail",
            "--proxytunnel",
            "-x",
            &http_proxy,
            "http://10.96.0.10/",
        ])
        .await;
    let node = out.strip_prefix("pod ").unwrap_or_default().trim_end();
    assert!(
        names.contains(node),
        "service via TCP CONNECT answered {out:?}"
    );
    // https through an HTTP proxy is always a CONNECT tunnel.
    let out = cluster
        .curl_ok(&["--fail", "-k", "-x", &http_proxy, &kubelet_url])
        .await;
    assert_eq!(out, "ok");
    // A refused CONNECT is a failed tunnel for curl (exit 56) with the 403.
    let out = cluster
        .curl(&[
            "--proxytunnel",
            "-x",
            &http_proxy,
            "http://169.254.169.254/",
        ])
        .await;
    assert_eq!(out.status.code(), Some(56), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("403"),
        "{out:?}"
    );

    // SOCKS5, names resolved by the proxy and by curl.
    let out = cluster
        .curl_ok(&["--fail", "--socks5-hostname", &socks, &pod_url])
        .await;
    assert_eq!(out, "pod node-2\n");
    let out = cluster
        .curl_ok(&["--fail", "--socks5", &socks, "http://10.96.0.10/"])
        .await;
    let node = out.strip_prefix("pod ").unwrap_or_default().trim_end();
    assert!(names.contains(node), "service via SOCKS5 answered {out:?}");
    let out = cluster
        .curl_ok(&["--fail", "-k", "--socks5-hostname", &socks, &kubelet_url])
        .await;
    assert_eq!(out, "ok");
    let out = cluster
        .curl(&["--socks5-hostname", &socks, "http://169.254.169.254/"])
        .await;
    assert!(
        !out.status.success(),
        "SOCKS5 to the metadata address must fail: {out:?}"
    );

    // mTLS: a client certificate of the configured CA gets through.
    let https_proxy = format!("https://127.0.0.1:{TLS_PORT}");
    let ca = pki.ca.to_str().unwrap();
    let with_cert = |cert: &Path, key: &Path| {
        vec![
            "--proxytunnel".to_owned(),
            "--proxy".to_owned(),
            https_proxy.clone(),
            "--proxy-cacert".to_owned(),
            ca.to_owned(),
            "--proxy-cert".to_owned(),
            cert.to_str().unwrap().to_owned(),
            "--proxy-key".to_owned(),
            key.to_str().unwrap().to_owned(),
            pod_url.clone(),
        ]
    };
    let args = with_cert(&pki.client_cert, &pki.client_key);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut fail_args = vec!["--fail"];
    fail_args.extend(args.iter().copied());
    assert_eq!(cluster.curl_ok(&fail_args).await, "pod node-2\n");

    // Without a client certificate, or with one of another CA: the TLS
    // handshake fails and nothing reaches the pod.
    let before = cluster.pod.accepted();
    let from = mtls.log.len();
    let out = cluster
        .curl(&[
            "--proxytunnel",
            "--proxy",
            &https_proxy,
            "--proxy-cacert",
            ca,
            &pod_url,
        ])
        .await;
    assert!(
        !out.status.success(),
        "mTLS without a client cert must fail: {out:?}"
    );
    blocking(|| mtls.expect_log(from, IO_TIMEOUT, "TLS handshake failed", None));
    let args = with_cert(&pki.rogue_cert, &pki.rogue_key);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let from = mtls.log.len();
    let out = cluster.curl(&args).await;
    assert!(
        !out.status.success(),
        "mTLS with a foreign client cert must fail: {out:?}"
    );
    blocking(|| mtls.expect_log(from, IO_TIMEOUT, "TLS handshake failed", None));
    assert_eq!(
        cluster.pod.accepted(),
        before,
        "nothing was proxied without a valid client cert"
    );

    blocking(|| {
        plain.stop();
        mtls.stop();
    });
}

/// A node whose sshd dies: its open stream ends (no hang), a CONNECT to it
/// is refused at once with a status naming it, the other nodes and the
/// service IP keep serving; once sshd is back the tunnel comes back and the
/// node serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_node_is_refused_without_hanging_and_comes_back() {
    let cluster = blocking(Cluster::up);
    let nt = blocking(|| NodeTunnel::start(&cluster, "stop", &cluster.plain_proxy("stop")));
    let uds = cluster.path("stop.sock");
    let n3 = cluster.bed.node(3).clone();
    let kubelet3 = &cluster.kubelets[2];
    let names_up: BTreeSet<String> = ["node-1", "node-2"].map(String::from).into();

    // A stream open through node 3 when its sshd dies.
    let s = tunnel(&uds, &format!("{}:{KUBELET_PORT}", n3.ip))
        .await
        .unwrap();
    let connector = tls_connector(kubelet3.tls_cert_der().unwrap()).unwrap();
    let mut tls = tls_connect_ip(&connector, IpAddr::V4(n3.ip), s)
        .await
        .unwrap();
    tls.write_all(b"GET /stream?seconds=60 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    while find(&got, b"node-3 tick 1\n").is_none() {
        let n = tokio::time::timeout(IO_TIMEOUT, tls.read(&mut chunk))
            .await
            .expect("first tick of the stream")
            .expect("reading the stream");
        assert!(n > 0, "stream ended before its first tick");
        got.extend_from_slice(&chunk[..n]);
    }

    let mark = nt.log.len();
    blocking(|| cluster.bed.stop_node(3)).expect("stopping node-3's sshd");

    // The open stream ends (EOF or error), bounded, without its last chunk.
    let ended = tokio::time::timeout(IO_TIMEOUT, async {
        loop {
            match tls.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "a stream through a dead node must end, not hang"
    );
    assert!(
        find(&got, b"node-3 tick 600\n").is_none(),
        "the stream cannot have completed"
    );
    drop(tls);

    // Right away (the death may not be noticed yet): refused, not hung.
    let target3 = format!("{}:{KUBELET_PORT}", n3.ip);
    let r = refused(&uds, &target3)
        .await
        .unwrap_or_else(|e| panic!("CONNECT to the stopped node: {e:#}"));
    assert!([502, 503, 504].contains(&r.status), "{r:?}");
    assert!(
        r.body.contains("node-3"),
        "the refusal must name the node: {r:?}"
    );
    assert_one_line(&r, "stopped node");

    // Once the session loss is noticed: 503, node unavailable.
    blocking(|| nt.expect_log(mark, IO_TIMEOUT, "session lost", Some("node-3")));
    let r = refused(&uds, &target3).await.unwrap();
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.body.contains("node-3"), "{r:?}");
    assert_one_line(&r, "node-3 down");

    // The other nodes keep serving; the service IP avoids node 3.
    for (n, kubelet) in cluster.bed.nodes()[..2].iter().zip(&cluster.kubelets) {
        let r = kubelet_get(&uds, kubelet, n.ip, "/healthz").await.unwrap();
        assert_eq!((r.status, r.text().as_str()), (200, "ok"), "{}", n.name);
    }
    let r = plain_get(
        &uds,
        &format!("{}:{POD_PORT}", cluster.bed.node(2).pod_ip),
        "/",
    )
    .await
    .unwrap();
    assert_eq!(r.text(), "pod node-2\n");
    for _ in 0..6 {
        let r = plain_get(&uds, "10.96.0.10:80", "/").await.unwrap();
        let by = served_by(&r);
        assert!(
            names_up.contains(&by),
            "service answered by {by} while node-3 is down"
        );
    }

    // sshd back: the tunnel reconnects by itself and node 3 serves again.
    blocking(|| cluster.bed.start_node(3)).expect("starting node-3's sshd");
    let ready = blocking(|| nt.expect_log(mark, START_TIMEOUT, "tunnel ready", Some("node-3")));
    assert_eq!(nt.event(ready)["span"]["endpoint"], format!("{}:22", n3.ip));
    let r = kubelet_get(&uds, kubelet3, n3.ip, "/healthz")
        .await
        .unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "ok"));

    blocking(|| nt.stop());
}

// ---------------------------------------------------------------------------
// mTLS material, generated per test
// ---------------------------------------------------------------------------

/// PEM files: a CA, a server cert for 127.0.0.1 and a client cert it
/// signed, and a client cert of an unrelated CA.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    rogue_cert: PathBuf,
    rogue_key: PathBuf,
}

fn ca(name: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let key = KeyPair::generate().expect("CA key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    (params.self_signed(&key).expect("CA cert"), key)
}

fn leaf(
    names: &[&str],
    cn: &str,
    usage: rcgen::ExtendedKeyUsagePurpose,
    issuer: &(rcgen::Certificate, rcgen::KeyPair),
) -> (String, String) {
    use rcgen::{CertificateParams, DnType, KeyPair, KeyUsagePurpose};
    let key = KeyPair::generate().expect("leaf key");
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let mut params = CertificateParams::new(names).expect("leaf params");
    params.distinguished_name.push(DnType::CommonName, cn);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    let cert = params
        .signed_by(&key, &issuer.0, &issuer.1)
        .expect("leaf cert");
    (cert.pem(), key.serialize_pem())
}

impl Pki {
    fn write(dir: &Path) -> Pki {
        use rcgen::ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
        let authority = ca("nodetunnel e2e CA");
        let rogue_ca = ca("someone else's CA");
        let (server_cert, server_key) = leaf(
            &["127.0.0.1", "localhost"],
            "nodetunnel",
            ServerAuth,
            &authority,
        );
        let (client_cert, client_key) = leaf(&[], "kube-apiserver", ClientAuth, &authority);
        let (rogue_cert, rogue_key) = leaf(&[], "kube-apiserver", ClientAuth, &rogue_ca);
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).expect("writing PEM");
            // Private keys others can read are refused; 0600 for every file.
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .expect("chmod PEM");
            path
        };
        Pki {
            ca: write("ca.pem", &authority.0.pem()),
            server_cert: write("server.pem", &server_cert),
            server_key: write("server-key.pem", &server_key),
            client_cert: write("client.pem", &client_cert),
            client_key: write("client-key.pem", &client_key),
            rogue_cert: write("rogue.pem", &rogue_cert),
            rogue_key: write("rogue-key.pem", &rogue_key),
        }
    }
}

/// kube-apiserver's `GRPC` egress over the Unix socket, as
/// konnectivity-client's single-use tunnel drives it (a connection, an
/// HTTP/2 stream and a DIAL_REQ per dial; `support::konnectivity`): TLS to
/// every node's kubelet through the tunnel, 8 MiB echoed byte-exact from a
/// pod, and refusals (policy, a channel the node refuses) as DIAL_RSP
/// errors with the refusal's text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_grpc_over_the_unix_socket() {
    use support::konnectivity::Tunnel;
    const ECHO_PORT: u16 = 9000;
    let cluster = blocking(Cluster::up);
    let n2 = cluster.bed.node(2);
    let _echo = server_in_ns(
        &cluster.bed,
        &n2.ns,
        ServerKind::echo(SocketAddr::from((n2.pod_ip, ECHO_PORT))),
    );
    let socket = cluster.path("grpc.sock");
    let proxy = format!("[proxy]\ngrpc_uds = {socket:?}\ndial_timeout = \"3s\"\n");
    let nt = blocking(|| NodeTunnel::start(&cluster, "grpc", &proxy));

    // Every node's kubelet: /healthz over TLS through a gRPC tunnel.
    for (n, kubelet) in cluster.bed.nodes().iter().zip(&cluster.kubelets) {
        let target = format!("{}:{KUBELET_PORT}", n.ip);
        let tunnel = Tunnel::dial(&socket, &target)
            .await
            .expect("gRPC stream")
            .unwrap_or_else(|e| panic!("DIAL {target} refused: {e}"));
        let connector = tls_connector(kubelet.tls_cert_der().expect("kubelet cert")).unwrap();
        let mut tls = tokio::time::timeout(
            IO_TIMEOUT,
            tls_connect_ip(&connector, IpAddr::V4(n.ip), tunnel.into_io()),
        )
        .await
        .expect("TLS handshake in time")
        .expect("TLS handshake");
        let r = tokio::time::timeout(
            IO_TIMEOUT,
            http_get(&mut tls, &n.ip.to_string(), "/healthz"),
        )
        .await
        .expect("GET in time")
        .expect("GET /healthz");
        assert_eq!(
            (r.status, r.text().as_str()),
            (200, "ok"),
            "{} /healthz",
            n.name
        );
    }

    // 8 MiB through a pod's echo server, byte-exact, written as the
    // apiserver writes (32 KiB DATA packets) while it is read back.
    let target = format!("{}:{ECHO_PORT}", n2.pod_ip);
    let mut tunnel = Tunnel::dial(&socket, &target)
        .await
        .expect("gRPC stream")
        .expect("echo dial");
    let payload = pattern_bytes(17, 8 * 1024 * 1024);
    let writer = {
        let sink = tunnel.stream.sink();
        let (id, payload) = (tunnel.connect_id, payload.clone());
        tokio::spawn(async move { sink.write(id, &payload).await })
    };
    let back = tokio::time::timeout(Duration::from_secs(60), tunnel.read_exact(payload.len()))
        .await
        .expect("echo in time")
        .expect("echo");
    writer.await.expect("writer").expect("write");
    assert!(back == payload, "8 MiB echoed byte-exact");
    let error = tokio::time::timeout(IO_TIMEOUT, tunnel.close())
        .await
        .expect("CLOSE_RSP in time")
        .expect("CLOSE_RSP");
    assert_eq!(error, "");

    // Refusals: the policy, then a channel node 1's sshd refuses.
    for target in ["169.254.169.254:80", "10.240.0.11:22"] {
        let error = Tunnel::dial(&socket, target)
            .await
            .expect("gRPC stream")
            .err()
            .unwrap_or_else(|| panic!("{target}: dial accepted"));
        assert!(error.starts_with("denied by policy: "), "{target}: {error}");
    }
    let target = format!("10.244.1.10:{POD_PORT}");
    let error = Tunnel::dial(&socket, &target)
        .await
        .expect("gRPC stream")
        .err()
        .expect("refused");
    assert!(
        error.starts_with("node node-1 refused the channel: connect failed"),
        "{error}"
    );

    blocking(|| nt.stop());
    assert!(!socket.exists(), "the socket file is removed on shutdown");
}

/// A gRPC tunnel through a node whose sshd dies ends with a CLOSE_RSP
/// whose error says the session was lost (not a clean close, not a hang);
/// a new dial to that node is a DIAL_RSP error naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_tunnel_through_a_stopped_node_ends_with_close_rsp_carrying_an_error() {
    use support::konnectivity::{Read, Tunnel};
    let cluster = blocking(Cluster::up);
    let socket = cluster.path("grpcstop.sock");
    let proxy = format!("[proxy]\ngrpc_uds = {socket:?}\ndial_timeout = \"3s\"\n");
    let nt = blocking(|| NodeTunnel::start(&cluster, "grpcstop", &proxy));
    let n3 = cluster.bed.node(3).clone();
    let target3 = format!("{}:{KUBELET_PORT}", n3.ip);
    let mut tunnel = Tunnel::dial(&socket, &target3)
        .await
        .expect("gRPC stream")
        .expect("dial node-3");

    blocking(|| cluster.bed.stop_node(3)).expect("stopping node-3's sshd");
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match tunnel
                .read()
                .await
                .expect("a packet, not the end of the stream")
            {
                Read::Data(_) => continue,
                Read::Closed(error) => break error,
            }
        }
    })
    .await
    .expect("CLOSE_RSP once the session is lost");
    assert!(!closed.is_empty(), "CLOSE_RSP must carry an error");

    let error = Tunnel::dial(&socket, &target3)
        .await
        .expect("gRPC stream")
        .err()
        .expect("a dial to the stopped node is refused");
    assert!(error.contains("node-3"), "{error}");
    blocking(|| nt.stop());
}

/// DIAL_CLS right behind DIAL_REQ (one HTTP/2 DATA frame, so the cancel
/// always arrives while the channel open is in flight), on a real node:
/// the open completes anyway and its channel is closed, none is left
/// behind (`nodetunnel_streams_open` back to 0 while every gRPC stream is
/// still open, so the end of the streams cannot be what closed them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dial_cls_racing_the_open_leaves_no_channel_behind() {
    use nodetunnel::proxy::grpc_proto::Packet;
    use support::konnectivity::{next_random, ProxyStream};
    let cluster = blocking(Cluster::up);
    let socket = cluster.path("grpccls.sock");
    let proxy = format!("[proxy]\ngrpc_uds = {socket:?}\ndial_timeout = \"3s\"\n");
    let nt = blocking(|| NodeTunnel::start(&cluster, "grpccls", &proxy));
    let target = format!("{}:{POD_PORT}", cluster.bed.node(2).pod_ip);
    let mut streams = Vec::new();
    for _ in 0..20 {
        let stream = ProxyStream::open(&socket).await.expect("gRPC stream");
        let random = next_random();
        stream
            .send_together(&[
                Packet::dial_request(&target, random),
                Packet::close_dial(random),
            ])
            .await
            .expect("DIAL_REQ and DIAL_CLS");
        streams.push(stream);
    }
    let admin = cluster.path("grpccls-admin.sock");
    support::poll::until(
        "nodetunnel_streams_open back to 0",
        IO_TIMEOUT,
        || nt.log.dump(),
        || async {
            let text = admin_metrics(&admin).await.ok()?;
            (metric_value(&text, "nodetunnel_streams_open") == Some(0.0)).then_some(())
        },
    )
    .await;
    // Every cancelled dial was counted, and none was answered.
    let metrics = admin_metrics(&admin).await.expect("metrics");
    assert_eq!(
        metric_value(
            &metrics,
            "nodetunnel_proxy_requests_total{listener=\"grpc\",code=\"dial_cancelled\"}"
        ),
        Some(20.0),
        "{metrics}"
    );
    drop(streams);
    blocking(|| nt.stop());
}

/// 100 MB byte-exact through a gRPC tunnel from a real node, both ways: a
/// source's 100 MB down (then its close as CLOSE_RSP), and 100 MB echoed
/// (up and down at once). The same transfers through an HTTP CONNECT
/// tunnel of the same process, for comparison: rates are printed, never
/// asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_moves_100_mb_byte_exact_both_ways() {
    use support::konnectivity::{Read, Tunnel};
    const LEN: usize = 100 * 1000 * 1000;
    const SOURCE_PORT: u16 = 9001;
    const ECHO_PORT: u16 = 9002;
    let cluster = blocking(Cluster::up);
    let n2 = cluster.bed.node(2).clone();
    let _source = server_in_ns(
        &cluster.bed,
        &n2.ns,
        ServerKind::source(SocketAddr::from((n2.pod_ip, SOURCE_PORT)), LEN as u64, 5),
    );
    let _echo = server_in_ns(
        &cluster.bed,
        &n2.ns,
        ServerKind::echo(SocketAddr::from((n2.pod_ip, ECHO_PORT))),
    );
    let socket = cluster.path("grpcbig.sock");
    let uds = cluster.path("connectbig.sock");
    let proxy = format!("[proxy]\ngrpc_uds = {socket:?}\nuds = {uds:?}\ndial_timeout = \"3s\"\n");
    let nt = blocking(|| NodeTunnel::start(&cluster, "grpcbig", &proxy));
    let want = pattern_sha256_hex(5, LEN as u64);
    let rate = |started: Instant| LEN as f64 / started.elapsed().as_secs_f64() / 1e6;

    // Down: the source's bytes, then CLOSE_RSP without error.
    let started = Instant::now();
    let mut tunnel = Tunnel::dial(&socket, &format!("{}:{SOURCE_PORT}", n2.pod_ip))
        .await
        .expect("gRPC stream")
        .expect("dial the source");
    let mut got = Vec::with_capacity(LEN);
    let closed = tokio::time::timeout(Duration::from_secs(300), async {
        loop {
            match tunnel.read().await.expect("packet") {
                Read::Data(d) => got.extend_from_slice(&d),
                Read::Closed(error) => break error,
            }
        }
    })
    .await
    .expect("100 MB down within 300 s");
    let grpc_down = rate(started);
    assert_eq!(closed, "", "the source's close is a clean CLOSE_RSP");
    assert_eq!(got.len(), LEN);
    assert!(sha256_hex(&got) == want, "100 MB down byte-exact");
    drop(got);

    // Both ways: 100 MB echoed.
    let started = Instant::now();
    let mut tunnel = Tunnel::dial(&socket, &format!("{}:{ECHO_PORT}", n2.pod_ip))
        .await
        .expect("gRPC stream")
        .expect("dial the echo server");
    let payload = pattern_bytes(9, LEN);
    let writer = {
        let sink = tunnel.stream.sink();
        let (id, payload) = (tunnel.connect_id, payload.clone());
        tokio::spawn(async move { sink.write(id, &payload).await })
    };
    let back = tokio::time::timeout(Duration::from_secs(300), tunnel.read_exact(LEN))
        .await
        .expect("100 MB echoed within 300 s")
        .expect("echo");
    writer.await.expect("writer").expect("write");
    let grpc_echo = rate(started);
    assert!(back == payload, "100 MB echoed byte-exact");
    drop((back, payload));

    // The same through HTTP CONNECT, for the ratio.
    let started = Instant::now();
    // (The source sends at once: bytes may come with the 200.)
    let (mut s, head) = send_connect(&uds, &format!("{}:{SOURCE_PORT}", n2.pod_ip))
        .await
        .expect("CONNECT");
    assert!(head.starts_with(CONNECT_OK));
    let mut got = Vec::with_capacity(LEN);
    got.extend_from_slice(&head[CONNECT_OK.len()..]);
    s.read_to_end(&mut got).await.expect("CONNECT download");
    let connect_down = rate(started);
    assert_eq!(got.len(), LEN);
    eprintln!(
        "100 MB through the same process (debug build unless --release): gRPC down {grpc_down:.0} MB/s, \
         gRPC echo (both ways at once) {grpc_echo:.0} MB/s, HTTP CONNECT down {connect_down:.0} MB/s"
    );
    blocking(|| nt.stop());
}

/// A refused gRPC dial on the testbed: the DIAL_RSP's error text.
async fn grpc_refusal(socket: &Path, target: &str) -> String {
    support::konnectivity::Tunnel::dial(socket, target)
        .await
        .unwrap_or_else(|e| panic!("DIAL {target}: the gRPC stream failed: {e:#}"))
        .err()
        .unwrap_or_else(|| panic!("DIAL {target}: accepted, expected a DIAL_RSP error"))
}

/// Run `ip ARGS` inside node `i`'s namespace; it must succeed.
fn ip_in_node(bed: &Testbed, i: usize, args: &[&str]) {
    let out = bed
        .command_in_node(i, "ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running ip {args:?} in node-{i}: {e}"));
    assert!(
        out.status.success(),
        "ip {args:?} in node-{i}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Refusals over the real testbed arrive as DIAL_RSP errors that say what
/// the HTTP status would have said: each is the body of the same refusal
/// to an HTTP CONNECT on the same process (its `uds` listener), whose
/// status is checked: denied by policy (cloud metadata, 403), no route
/// (an address in no node's range, 403), a dial timeout (a destination
/// node 1 black-holes, with `dial_timeout = "1s"`, 504), a node that is
/// down (its sshd stopped, 503). Each gRPC refusal is counted as
/// `dial_error` under `listener="grpc"`, and under its reason in
/// `nodetunnel_policy_denials_total` / `nodetunnel_stream_opens_total`
/// (once per front door).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_refusals_are_dial_rsp_errors_saying_what_the_http_status_would() {
    /// In node 1's pod CIDR. Node 1 sends it on its link to a MAC address
    /// that nothing on the bridge has (a permanent neighbour entry, so no
    /// ARP failure either): the SYN vanishes without an error and the
    /// channel open never completes.
    const BLACK_HOLE: &str = "10.244.1.99";
    let cluster = blocking(Cluster::up);
    blocking(|| {
        let host = format!("{BLACK_HOLE}/32");
        ip_in_node(&cluster.bed, 1, &["route", "add", &host, "dev", "eth0"]);
        ip_in_node(
            &cluster.bed,
            1,
            &[
                "neigh",
                "add",
                BLACK_HOLE,
                "lladdr",
                "02:00:00:00:01:99",
                "dev",
                "eth0",
                "nud",
                "permanent",
            ],
        );
    });
    let socket = cluster.path("grpcrefuse.sock");
    let uds = cluster.path("connectrefuse.sock");
    let proxy = format!("[proxy]\ngrpc_uds = {socket:?}\nuds = {uds:?}\ndial_timeout = \"1s\"\n");
    let nt = blocking(|| NodeTunnel::start(&cluster, "grpcrefuse", &proxy));
    let admin = cluster.path("grpcrefuse-admin.sock");

    // (destination, HTTP status, the whole refusal text)
    let exact = [
        (
            "169.254.169.254:80".to_owned(),
            403,
            "denied by policy: destination 169.254.169.254 is link-local (cloud metadata); \
             add it to routing.allow_cidrs to allow"
                .to_owned(),
        ),
        (
            "10.250.0.5:80".to_owned(),
            403,
            "no route: no route to 10.250.0.5: it is no node address or name and in no pod or \
             service CIDR, and routing.default is \"deny\""
                .to_owned(),
        ),
        (
            format!("{BLACK_HOLE}:80"),
            504,
            "channel open to node-1 timed out after 1s".to_owned(),
        ),
    ];
    for (target, status, text) in &exact {
        let error = grpc_refusal(&socket, target).await;
        assert_eq!(&error, text, "DIAL {target}");
        let r = refused(&uds, target)
            .await
            .unwrap_or_else(|e| panic!("CONNECT {target}: {e:#}"));
        assert_eq!(r.status, *status, "CONNECT {target}: {r:?}");
        assert_eq!(r.body, format!("{error}\n"), "CONNECT {target}: {r:?}");
    }

    // A node that is down, once its session loss is noticed. The text
    // goes on with the tunnel's state and for how long: only its start is
    // stable from one refusal to the next.
    let mark = nt.log.len();
    blocking(|| cluster.bed.stop_node(3)).expect("stopping node-3's sshd");
    blocking(|| nt.expect_log(mark, IO_TIMEOUT, "session lost", Some("node-3")));
    let target3 = format!("{}:{KUBELET_PORT}", cluster.bed.node(3).ip);
    let down = "node unavailable: node node-3 has no ready SSH session (";
    let error = grpc_refusal(&socket, &target3).await;
    assert!(error.starts_with(down), "DIAL {target3}: {error}");
    let r = refused(&uds, &target3).await.unwrap();
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.body.starts_with(down), "{r:?}");
    assert_one_line(&r, "node-3 down");

    let metrics = admin_metrics(&admin).await.expect("metrics");
    for (series, want) in [
        (
            "nodetunnel_proxy_requests_total{listener=\"grpc\",code=\"dial_error\"}",
            4.0,
        ),
        (
            "nodetunnel_proxy_requests_total{listener=\"grpc\",code=\"dial_ok\"}",
            0.0,
        ),
        (
            "nodetunnel_policy_denials_total{reason=\"link_local\"}",
            2.0,
        ),
        ("nodetunnel_policy_denials_total{reason=\"no_route\"}", 2.0),
        ("nodetunnel_stream_opens_total{result=\"timeout\"}", 2.0),
        ("nodetunnel_stream_opens_total{result=\"node_down\"}", 2.0),
    ] {
        assert_eq!(
            metric_value(&metrics, series),
            Some(want),
            "{series}:\n{metrics}"
        );
    }
    blocking(|| nt.stop());
}

/// The service IP through gRPC tunnels (`routing.service_cidrs`, as for
/// HTTP CONNECT): every dial reaches one node's backend of the service,
/// each exactly once, and a GET through it is answered by that backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_dials_a_service_ip_and_reaches_its_backend() {
    use support::konnectivity::Tunnel;
    let cluster = blocking(Cluster::up);
    let socket = cluster.path("grpcsvc.sock");
    let proxy = format!("[proxy]\ngrpc_uds = {socket:?}\ndial_timeout = \"3s\"\n");
    let nt = blocking(|| NodeTunnel::start(&cluster, "grpcsvc", &proxy));
    let target = format!("{}:80", cluster.bed.service_ip());
    let names: BTreeSet<String> = cluster.bed.node_names().into_iter().collect();
    let mut ids = BTreeSet::new();
    for _ in 0..6 {
        let tunnel = Tunnel::dial(&socket, &target)
            .await
            .expect("gRPC stream")
            .unwrap_or_else(|e| panic!("DIAL {target} refused: {e}"));
        assert!(ids.insert(tunnel.connect_id), "connectID reused");
        let mut io = tunnel.into_io();
        let r = tokio::time::timeout(
            IO_TIMEOUT,
            http_get(&mut io, &cluster.bed.service_ip().to_string(), "/"),
        )
        .await
        .expect("GET in time")
        .expect("GET / on the service");
        let by = served_by(&r);
        assert!(names.contains(&by), "service answered by {by:?}");
    }
    let total: u64 = cluster.services.iter().map(|s| s.accepted()).sum();
    assert_eq!(total, 6, "every service dial reached exactly one backend");
    blocking(|| nt.stop());
}

/// A client that stops reading one gRPC tunnel (single-use, as the
/// apiserver's) with a 64 MB download pending holds only that tunnel: a
/// second tunnel to the same node moves 32 MB to completion meanwhile,
/// what nodetunnel took from the stalled channel stays within its windows
/// (the node is not let push on), and once the client reads again the
/// stalled download completes byte-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_client_that_stops_reading_holds_one_window_and_a_second_tunnel_moves_32_mb() {
    use support::konnectivity::{Read, Tunnel};
    const STALLED_LEN: usize = 64 * 1000 * 1000;
    const SECOND_LEN: usize = 32 * 1000 * 1000;
    const STALLED_PORT: u16 = 9003;
    const SECOND_PORT: u16 = 9004;
    /// ssh.window_size's default, one channel's receive window.
    const WINDOW: f64 = 2.0 * 1024.0 * 1024.0;
    let cluster = blocking(Cluster::up);
    let n2 = cluster.bed.node(2).clone();
    let _stalled_source = server_in_ns(
        &cluster.bed,
        &n2.ns,
        ServerKind::source(
            SocketAddr::from((n2.pod_ip, STALLED_PORT)),
            STALLED_LEN as u64,
            3,
        ),
    );
    let _second_source = server_in_ns(
        &cluster.bed,
        &n2.ns,
        ServerKind::source(
            SocketAddr::from((n2.pod_ip, SECOND_PORT)),
            SECOND_LEN as u64,
            4,
        ),
    );
    let socket = cluster.path("grpcstall.sock");
    let proxy = format!("[proxy]\ngrpc_uds = {socket:?}\ndial_timeout = \"3s\"\n");
    let nt = blocking(|| NodeTunnel::start(&cluster, "grpcstall", &proxy));
    let admin = cluster.path("grpcstall-admin.sock");

    // The first tunnel flows (one DATA packet read), then is not read.
    let mut stalled = Tunnel::dial(&socket, &format!("{}:{STALLED_PORT}", n2.pod_ip))
        .await
        .expect("gRPC stream")
        .expect("dial the first source");
    let mut first = match stalled.read().await.expect("first packet") {
        Read::Data(d) => d.to_vec(),
        Read::Closed(e) => panic!("the first tunnel closed at once: {e:?}"),
    };

    // The second tunnel, to the same node, runs to its CLOSE_RSP.
    let mut second = Tunnel::dial(&socket, &format!("{}:{SECOND_PORT}", n2.pod_ip))
        .await
        .expect("gRPC stream")
        .expect("dial the second source");
    let mut got = Vec::with_capacity(SECOND_LEN);
    let closed = tokio::time::timeout(Duration::from_secs(300), async {
        loop {
            match second.read().await.expect("packet") {
                Read::Data(d) => got.extend_from_slice(&d),
                Read::Closed(error) => break error,
            }
        }
    })
    .await
    .expect("32 MB through the second tunnel within 300 s");
    assert_eq!(closed, "", "the second source's close is a clean CLOSE_RSP");
    assert_eq!(got.len(), SECOND_LEN);
    assert!(
        sha256_hex(&got) == pattern_sha256_hex(4, SECOND_LEN as u64),
        "32 MB byte-exact"
    );
    drop((got, second));

    // The stalled tunnel is still open, and nodetunnel took from its
    // channel only what its windows and queues hold: the node could not
    // push the 64 MB.
    let metrics = admin_metrics(&admin).await.expect("metrics");
    let value = |series: &str| {
        metric_value(&metrics, series).unwrap_or_else(|| panic!("no {series} in:\n{metrics}"))
    };
    let from_stalled = value("nodetunnel_bytes_total{direction=\"from_node\"}") - SECOND_LEN as f64;
    assert!(
        from_stalled < 8.0 * 1024.0 * 1024.0,
        "{from_stalled} bytes taken from the stalled channel: nodetunnel read on without bound"
    );
    let buffered = value("nodetunnel_stream_buffered_bytes");
    eprintln!(
        "while stalled: {from_stalled} bytes taken from the stalled channel, {buffered} bytes \
         held from nodes"
    );
    assert!(
        buffered <= WINDOW + 32.0 * 1024.0,
        "{buffered} bytes held from nodes: more than the stalled channel's window"
    );

    // Reading again: the rest of the 64 MB, byte-exact, then CLOSE_RSP.
    first.reserve(STALLED_LEN);
    let closed = tokio::time::timeout(Duration::from_secs(300), async {
        loop {
            match stalled.read().await.expect("packet") {
                Read::Data(d) => first.extend_from_slice(&d),
                Read::Closed(error) => break error,
            }
        }
    })
    .await
    .expect("the stalled download completes within 300 s");
    assert_eq!(closed, "", "the first source's close is a clean CLOSE_RSP");
    assert_eq!(first.len(), STALLED_LEN);
    assert!(
        sha256_hex(&first) == pattern_sha256_hex(3, STALLED_LEN as u64),
        "64 MB byte-exact after the stall"
    );
    blocking(|| nt.stop());
}

/// `[audit] mode = "file"` against real sshd: the apiserver's CONNECT over
/// the Unix socket leaves a record naming the node, the routing rule, the
/// asking process and the exact bytes each way; curl's CONNECT over TCP
/// one naming its address and node; a policy refusal one with its reason.
/// The file is 0600 and the records are flushed by the graceful stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_file_records_real_tunnels_and_refusals() {
    use std::os::unix::fs::PermissionsExt;
    let cluster = blocking(Cluster::up);
    let audit = cluster.path("audit.jsonl");
    let proxy = format!(
        "{}\n[audit]\nmode = \"file\"\npath = {audit:?}\n",
        cluster.plain_proxy("audit")
    );
    let nt = blocking(|| NodeTunnel::start(&cluster, "audit", &proxy));
    let uds = cluster.path("audit.sock");
    let pod_ip = cluster.bed.node(2).pod_ip;
    let pod_target = format!("{pod_ip}:{POD_PORT}");

    // One request, the response read to its end: exact byte counts.
    let mut s = tunnel(&uds, &pod_target).await.expect("tunnel to the pod");
    let request = format!("GET / HTTP/1.1\r\nHost: {pod_ip}\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    tokio::time::timeout(IO_TIMEOUT, s.read_to_end(&mut response))
        .await
        .expect("the response within IO_TIMEOUT")
        .expect("read the response");
    assert!(response.ends_with(b"pod node-2\n"), "{response:?}");
    drop(s);

    let out = cluster
        .curl_ok(&[
            "--fail",
            "--proxytunnel",
            "-x",
            &format!("http://127.0.0.1:{TCP_PORT}"),
            &format!("http://{pod_target}/"),
        ])
        .await;
    assert_eq!(out, "pod node-2\n");
    let read_records = |path: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("one JSON record per line"))
            .collect()
    };
    // Both records are written (the writer does not wait for more).
    support::poll::until(
        "two records in the audit file",
        IO_TIMEOUT,
        || nt.log.dump(),
        || async { (read_records(&audit).len() == 2).then_some(()) },
    )
    .await;
    // logrotate's create mode: rename, then SIGHUP from postrotate.
    let rotated = cluster.path("audit.jsonl.1");
    std::fs::rename(&audit, &rotated).expect("rotate the audit file");
    nt.signal(nix::sys::signal::Signal::SIGHUP);
    let refusal = refused(&uds, "169.254.169.254:80")
        .await
        .expect("a refusal");
    assert_eq!(refusal.status, 403);
    // SIGTERM: the writer writes what is queued before the exit.
    blocking(|| nt.stop());

    let mode = std::fs::metadata(&audit)
        .expect("audit file")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "the file created after the rotation");
    let after = read_records(&audit);
    assert_eq!(after.len(), 1, "{after:#?}");
    let records = read_records(&rotated);
    let find = |listener: &str, event: &str| {
        records
            .iter()
            .find(|r| r["listener"] == listener && r["event"] == event)
            .unwrap_or_else(|| panic!("no {listener} {event} record in {records:#?}"))
    };
    let apiserver = find("uds", "connection");
    assert_eq!(apiserver["destination"], pod_target.as_str());
    assert_eq!(apiserver["node"], "node-2");
    assert_eq!(apiserver["rule"], "pod_cidr");
    assert_eq!(apiserver["result"], "ok");
    assert_eq!(apiserver["bytes_to_node"], request.len() as u64);
    assert_eq!(apiserver["bytes_from_node"], response.len() as u64);
    assert_eq!(apiserver["end"], "node_close");
    assert_eq!(apiserver["session"], 0);
    assert_eq!(apiserver["client"]["pid"], std::process::id());
    assert_eq!(apiserver["client"]["uid"], nix::unistd::getuid().as_raw());

    let curl = find("tcp", "connection");
    assert_eq!(curl["node"], "node-2");
    assert!(
        curl["client"]["address"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:")),
        "{curl}"
    );
    assert!(
        curl["bytes_from_node"].as_u64() > Some(out.len() as u64),
        "{curl}"
    );
    assert!(curl["bytes_to_node"].as_u64() > Some(0), "{curl}");

    let denied = &after[0];
    assert_eq!(denied["event"], "refusal");
    assert_eq!(denied["destination"], "169.254.169.254:80");
    assert_eq!(denied["result"], "denied");
    assert_eq!(denied["deny_reason"], "link_local");
}
