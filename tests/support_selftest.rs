//! Self-test of tests/support and tests/testbed/testbed.sh. Needs root and
//! OpenSSH (sshd at /usr/sbin/sshd, ssh, ssh-keygen); fails, never skips,
//! when they are missing.

mod support;

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use support::servers::ServerKind;
use support::sshd::ssh_banner;
use support::testbed::{namespaces_with_prefix, script_path};
use support::*;

/// OpenSSH client options for a non-interactive, strictly verified login.
fn ssh_args(key: &ClientKey, known_hosts: &std::path::Path) -> Vec<String> {
    [
        "-F",
        "/dev/null",
        "-i",
        key.private_path.to_str().unwrap(),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        &format!("UserKnownHostsFile={}", known_hosts.display()),
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "ConnectTimeout=10",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn run_with_input(mut cmd: Command, input: &[u8]) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning ssh")?;
    child.stdin.take().unwrap().write_all(input)?;
    Ok(child.wait_with_output()?)
}

fn must_succeed(what: &str, out: Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "{what} failed ({}): stdout {:?} stderr {:?}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_host_key_line(s: &str) -> bool {
    let mut p = s.split(' ');
    matches!((p.next(), p.next(), p.next()), (Some("ssh-ed25519"), Some(b), None)
        if b.starts_with("AAAAC3NzaC1lZDI1NTE5") && b.len() == 68)
}

#[test]
fn missing_sshd_is_a_clear_error() {
    let opts = SshdOptions {
        sshd_path: "/nonexistent/sshd".into(),
        ..Default::default()
    };
    let err = Sshd::start(opts)
        .err()
        .expect("start with a missing sshd must fail");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("OpenSSH sshd not found at /nonexistent/sshd: apt-get install openssh-server"),
        "{msg}"
    );
}

#[test]
fn pattern_helpers() -> Result<()> {
    let whole = pattern_bytes(7, 10_000);
    let mut gen = PatternGen::new(7);
    let mut pieces = Vec::new();
    for n in [1usize, 3, 8, 13, 64, 1000, 8911] {
        let mut b = vec![0u8; n];
        gen.fill(&mut b);
        pieces.extend_from_slice(&b);
    }
    assert_eq!(pieces, whole, "pattern must not depend on chunking");
    assert_ne!(pattern_bytes(8, 64), pattern_bytes(7, 64));
    assert_eq!(pattern_sha256_hex(7, 10_000), sha256_hex(&whole));
    let (n, h) = parse_sink_reply(&format!("10000 {}\n", sha256_hex(&whole)))?;
    assert_eq!((n, h), (10_000, sha256_hex(&whole)));
    assert!(parse_sink_reply("garbage").is_err());
    let env = support::testbed::parse_env("A='x y'\n# c\nB=z\n")?;
    assert_eq!(env["A"], "x y");
    assert_eq!(env["B"], "z");
    Ok(())
}

#[test]
fn loopback_sshd() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let key = ClientKey::generate(tmp.path())?;
    assert!(
        key.public_line.starts_with("ssh-ed25519 AAAA"),
        "{}",
        key.public_line
    );
    let mode = std::fs::metadata(&key.private_path)?.permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    key.load().context("russh loads the generated key")?;

    let mut sshd = Sshd::start(SshdOptions {
        authorized_keys: vec![key.public_line.clone()],
        ..Default::default()
    })?;
    let port = sshd.port();
    assert!(
        is_host_key_line(sshd.host_key_public_line()),
        "{}",
        sshd.host_key_public_line()
    );
    assert_eq!(
        sshd.known_hosts_line(),
        format!("[127.0.0.1]:{port} {}", sshd.host_key_public_line())
    );
    assert!(ssh_banner(sshd.addr(), Duration::from_secs(5))?.starts_with("SSH-2.0-OpenSSH"));
    assert!(!Sshd::user().is_empty());

    // The real OpenSSH client logs in, verifying the host key strictly.
    let login = |sshd: &Sshd| -> Result<Output> {
        let mut c = Command::new("ssh");
        c.args(ssh_args(&key, sshd.known_hosts_path()))
            .args(["-p", &sshd.port().to_string()])
            .arg(format!("{}@127.0.0.1", Sshd::user()))
            .arg("echo logged-in");
        Ok(c.stdin(Stdio::null()).output()?)
    };
    let out = must_succeed("ssh login", login(&sshd)?)?;
    assert_eq!(out.trim(), "logged-in");
    assert!(sshd.log().contains("Accepted publickey"), "{}", sshd.log());

    // direct-tcpip through the real sshd to a loopback echo server.
    let echo = spawn_local(ServerKind::echo("127.0.0.1:0".parse()?))?;
    let mut c = Command::new("ssh");
    c.args(ssh_args(&key, sshd.known_hosts_path()))
        .args(["-p", &port.to_string(), "-W", &echo.addr().to_string()])
        .arg(format!("{}@127.0.0.1", Sshd::user()));
    let out = must_succeed(
        "ssh -W to echo",
        run_with_input(c, b"through the tunnel\n")?,
    )?;
    assert_eq!(out, "through the tunnel\n");
    assert_eq!(echo.accepted(), 1);

    sshd.unauthorize_all()?;
    assert!(
        !login(&sshd)?.status.success(),
        "login must fail once unauthorized"
    );
    sshd.authorize(&key.public_line)?;
    must_succeed("ssh login after re-authorize", login(&sshd)?)?;

    // stop: the port refuses; restart: same port, same host key.
    let host_key = sshd.host_key_public_line().to_owned();
    sshd.stop();
    assert!(!sshd.is_running());
    let err = std::net::TcpStream::connect(sshd.addr()).expect_err("stopped sshd must refuse");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    sshd.restart()?;
    assert_eq!(sshd.port(), port);
    assert_eq!(sshd.host_key_public_line(), host_key);
    must_succeed("ssh login after restart", login(&sshd)?)?;

    let dir = sshd.dir().to_owned();
    let pid_file = dir.join("sshd.pid");
    let pid: i32 = std::fs::read_to_string(&pid_file)?.trim().parse()?;
    drop(sshd);
    assert!(!dir.exists(), "temp dir removed on drop");
    assert!(!support::procs::alive(pid), "sshd {pid} killed on drop");
    Ok(())
}

#[tokio::test]
async fn servers_on_loopback() -> Result<()> {
    let any: SocketAddr = "127.0.0.1:0".parse()?;

    // Echo, half-close aware.
    let echo = spawn_local(ServerKind::echo(any))?;
    let mut s = tokio::net::TcpStream::connect(echo.addr()).await?;
    s.write_all(b"hello ").await?;
    s.write_all(b"world").await?;
    s.shutdown().await?;
    let mut got = Vec::new();
    s.read_to_end(&mut got).await?;
    assert_eq!(got, b"hello world");

    // Sink.
    let sink = spawn_local(ServerKind::sink(any))?;
    let data = pattern_bytes(3, 300_000);
    let mut s = tokio::net::TcpStream::connect(sink.addr()).await?;
    s.write_all(&data).await?;
    s.shutdown().await?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).await?;
    assert_eq!(parse_sink_reply(&reply)?, (300_000, sha256_hex(&data)));

    // Source.
    let src = spawn_local(ServerKind::source(any, 1_000_003, 9))?;
    let mut s = tokio::net::TcpStream::connect(src.addr()).await?;
    let mut got = Vec::new();
    s.read_to_end(&mut got).await?;
    assert_eq!(got.len(), 1_000_003);
    assert_eq!(sha256_hex(&got), pattern_sha256_hex(9, 1_000_003));

    // Http.
    let web = spawn_local(ServerKind::http(any, "loop"))?;
    let mut s = tokio::net::TcpStream::connect(web.addr()).await?;
    let r = http_get(&mut s, "x", "/").await?;
    assert_eq!((r.status, r.text().as_str()), (200, "pod loop\n"));
    let mut s = tokio::net::TcpStream::connect(web.addr()).await?;
    let r = http_get(&mut s, "x", "/stream?seconds=1").await?;
    assert!(r.chunked, "stream must be chunked");
    let lines: Vec<&str> = r
        .body
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| std::str::from_utf8(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 10, "{lines:?}");
    assert_eq!(lines[9], "loop tick 10");
    let mut s = tokio::net::TcpStream::connect(web.addr()).await?;
    let r = http_get(&mut s, "x", "/bytes?n=5000").await?;
    assert_eq!(r.body, pattern_bytes(0, 5000));
    let mut s = tokio::net::TcpStream::connect(web.addr()).await?;
    assert_eq!(http_get(&mut s, "x", "/nope").await?.status, 404);
    assert_eq!(web.accepted(), 4);

    // Kubelet (HTTPS).
    let kubelet = spawn_local(ServerKind::kubelet(any, "node-x"))?;
    let tls = tls_connector(kubelet.tls_cert_der().expect("kubelet has a cert"))?;
    assert!(kubelet
        .tls_cert_pem()
        .unwrap()
        .starts_with("-----BEGIN CERTIFICATE-----"));
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let tcp = tokio::net::TcpStream::connect(kubelet.addr()).await?;
    let mut s = support::clients::tls_connect_ip(&tls, ip, tcp).await?;
    let r = http_get(&mut s, "x", "/healthz").await?;
    assert_eq!((r.status, r.text().as_str()), (200, "ok"));
    let tcp = tokio::net::TcpStream::connect(kubelet.addr()).await?;
    let mut s = support::clients::tls_connect_ip(&tls, ip, tcp).await?;
    let r = http_get(&mut s, "x", "/containerLogs/kube-system/coredns-1/coredns").await?;
    assert_eq!(r.status, 200);
    assert!(
        r.text()
            .contains("kube-system/coredns-1/coredns on node node-x"),
        "{}",
        r.text()
    );

    // Stop: the port is closed afterwards.
    let addr = echo.addr();
    echo.stop()?;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());

    // run_in_ns_blocking without a namespace, and panics becoming errors.
    assert_eq!(run_in_ns_blocking(None, || async { 41 + 1 })?, 42);
    let err = run_in_ns_blocking(None, || async { panic!("boom") }).unwrap_err();
    assert!(format!("{err:#}").contains("boom"), "{err:#}");
    Ok(())
}

/// Read an SSH banner from `addr`, connecting from inside `ns`.
async fn banner_from(ns: &str, addr: SocketAddr) -> Result<String> {
    let mut s = tcp_connect_in_ns(ns, addr, Duration::from_secs(2)).await?;
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await??;
    let line = String::from_utf8_lossy(&buf[..n]).into_owned();
    ensure!(line.starts_with("SSH-2.0-"), "not an SSH banner: {line:?}");
    Ok(line)
}

/// Poll (bounded) until a server at `addr` accepts from `ns`; read to EOF or
/// the first line.
async fn wait_read_from(ns: &str, addr: SocketAddr) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut s = loop {
        match tcp_connect_in_ns(ns, addr, Duration::from_secs(2)).await {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    };
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await??;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Poll (bounded) until sshd at `addr` answers from `ns`.
async fn wait_banner_from(ns: &str, addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match banner_from(ns, addr).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e.context("sshd never answered")),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

fn io_kind(e: &anyhow::Error) -> Option<std::io::ErrorKind> {
    e.chain()
        .find_map(|c| c.downcast_ref::<std::io::Error>())
        .map(|io| io.kind())
}

#[tokio::test]
async fn testbed_three_nodes() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let key = ClientKey::generate(tmp.path())?;
    let mut bed = Testbed::up(3, &key.public_line)?;
    let prefix = bed.prefix().to_owned();

    // The parsed description.
    assert_eq!(bed.node_names(), ["node-1", "node-2", "node-3"]);
    assert_eq!(
        bed.node_ips(),
        ["10.240.0.11", "10.240.0.12", "10.240.0.13"].map(|s| s.parse::<Ipv4Addr>().unwrap())
    );
    assert_eq!(
        bed.pod_ips(),
        ["10.244.1.10", "10.244.2.10", "10.244.3.10"].map(|s| s.parse::<Ipv4Addr>().unwrap())
    );
    assert_eq!(bed.node(2).pod_cidr, "10.244.2.0/24");
    assert_eq!(bed.service_ip(), Ipv4Addr::new(10, 96, 0, 10));
    assert_eq!(bed.cp_ns(), format!("{prefix}-cp"));
    assert_eq!(bed.node(3).ns, format!("{prefix}-n3"));
    let kh = std::fs::read_to_string(bed.known_hosts_path())?;
    let expected: Vec<String> = bed
        .nodes()
        .iter()
        .map(|n| format!("{} {}", n.ip, n.host_key))
        .collect();
    assert_eq!(kh.lines().collect::<Vec<_>>(), expected);
    for n in bed.nodes() {
        assert!(is_host_key_line(&n.host_key), "{}", n.host_key);
    }
    let mut ns = bed.existing_namespaces()?;
    ns.sort();
    let mut want: Vec<String> = ["fab", "cp", "n1", "n2", "n3"]
        .iter()
        .map(|s| format!("{prefix}-{s}"))
        .collect();
    want.sort();
    assert_eq!(ns, want);

    // sshd answers on every node IP, from the control plane.
    let cp = bed.cp_ns().to_owned();
    for n in bed.nodes() {
        banner_from(&cp, n.ssh_addr()).await?;
    }
    // The same check with a client closure run inside cp.
    let addr = bed.node(1).ssh_addr();
    let banner = run_in_ns(&cp, move || async move {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let mut buf = [0u8; 8];
        s.read_exact(&mut buf).await?;
        anyhow::Ok(buf)
    })
    .await??;
    assert_eq!(&banner, b"SSH-2.0-");

    // A pod is reachable from its node, not from cp.
    let n2 = bed.node(2).clone();
    let pod_web = bed.spawn_in_ns(
        &n2.ns,
        ServerKind::http(SocketAddr::from((n2.pod_ip, 8080)), &n2.name),
    )?;
    let err = tcp_connect_in_ns(&cp, pod_web.addr(), Duration::from_secs(2))
        .await
        .unwrap_err();
    assert_eq!(
        io_kind(&err),
        Some(std::io::ErrorKind::NetworkUnreachable),
        "{err:#}"
    );
    let mut s = tcp_connect_in_ns(&n2.ns, pod_web.addr(), Duration::from_secs(2)).await?;
    let r = http_get(&mut s, "pod", "/").await?;
    assert_eq!(r.text(), "pod node-2\n");
    let err = run_in_ns(&cp, || async { panic!("boom in cp") })
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("boom in cp"), "{err:#}");

    // A long-running task inside cp (as the proxy under test would run),
    // reached from node-1; and a listener bound in cp, used from here.
    let task = spawn_task_in_ns(Some(&cp), || async {
        let l = tokio::net::TcpListener::bind("10.240.0.1:9000").await?;
        loop {
            let (mut s, peer) = l.accept().await?;
            s.write_all(format!("hello {}\n", peer.ip()).as_bytes())
                .await?;
        }
    })?;
    let n1_ip = bed.node(1).ip;
    let greeting = wait_read_from(&bed.node(1).ns, "10.240.0.1:9000".parse()?).await?;
    assert_eq!(greeting, format!("hello {n1_ip}\n"));
    assert!(!task.is_finished());
    task.stop()?;
    let failing = spawn_task_in_ns(Some(&cp), || async {
        anyhow::bail!("task failed on purpose")
    })?;
    let err = loop {
        if failing.is_finished() {
            break failing.stop().unwrap_err();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert!(format!("{err:#}").contains("on purpose"), "{err:#}");
    let l = tcp_listener_in_ns(&cp, "10.240.0.1:0".parse()?)?;
    let laddr = l.local_addr()?;
    let mut c = tcp_connect_in_ns_std(&bed.node(3).ns, laddr, Duration::from_secs(2))?;
    let (mut accepted, peer) = l.accept()?;
    assert_eq!(peer.ip(), IpAddr::V4(bed.node(3).ip));
    std::io::Write::write_all(&mut accepted, b"x")?;
    let mut one = [0u8; 1];
    std::io::Read::read_exact(&mut c, &mut one)?;
    assert_eq!(&one, b"x");

    // The real OpenSSH client, from cp, through node-2's sshd to the pod.
    let mut c = bed.command_in_cp("ssh");
    c.args(ssh_args(&key, &bed.known_hosts_path()))
        .args(["-W", &pod_web.addr().to_string()])
        .arg(format!("root@{}", n2.ip));
    let out = run_with_input(
        c,
        b"GET / HTTP/1.1\r\nHost: pod\r\nConnection: close\r\n\r\n",
    )?;
    let out = must_succeed("ssh -W from cp via node-2 to its pod", out)?;
    assert!(out.ends_with("pod node-2\n"), "{out:?}");
    assert!(
        bed.sshd_log(2).contains("Accepted publickey for root"),
        "{}",
        bed.sshd_log(2)
    );

    // Servers of every kind, in node namespaces, answering from inside.
    let n1 = bed.node(1).clone();
    let n3 = bed.node(3).clone();
    let svc = bed.service_ip();
    let echo = bed.spawn_in_ns(
        &n1.ns,
        ServerKind::echo(SocketAddr::from((n1.pod_ip, 7000))),
    )?;
    let echo_addr = echo.addr();
    let got = run_in_ns(&n1.ns, move || async move {
        let mut s = tokio::net::TcpStream::connect(echo_addr).await?;
        s.write_all(b"ping").await?;
        s.shutdown().await?;
        let mut v = Vec::new();
        s.read_to_end(&mut v).await?;
        anyhow::Ok(v)
    })
    .await??;
    assert_eq!(got, b"ping");

    let sink = bed.spawn_in_ns(&n3.ns, ServerKind::sink(SocketAddr::from((svc, 7001))))?;
    let mut s = tcp_connect_in_ns(&n3.ns, sink.addr(), Duration::from_secs(2)).await?;
    s.write_all(&pattern_bytes(5, 100_000)).await?;
    s.shutdown().await?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).await?;
    assert_eq!(
        parse_sink_reply(&reply)?,
        (100_000, pattern_sha256_hex(5, 100_000))
    );

    let source = bed.spawn_in_ns(
        &n2.ns,
        ServerKind::source(SocketAddr::from((svc, 7002)), 200_000, 11),
    )?;
    let mut s = tcp_connect_in_ns(&n2.ns, source.addr(), Duration::from_secs(2)).await?;
    let mut got = Vec::new();
    s.read_to_end(&mut got).await?;
    assert_eq!(sha256_hex(&got), pattern_sha256_hex(11, 200_000));

    let kubelet = bed.spawn_in_ns(
        &n2.ns,
        ServerKind::kubelet(SocketAddr::from((n2.ip, 10250)), &n2.name),
    )?;
    let tls = tls_connector(kubelet.tls_cert_der().unwrap())?;
    let tcp = tcp_connect_in_ns(&n2.ns, kubelet.addr(), Duration::from_secs(2)).await?;
    let mut s = support::clients::tls_connect_ip(&tls, IpAddr::V4(n2.ip), tcp).await?;
    assert_eq!(http_get(&mut s, "kubelet", "/healthz").await?.text(), "ok");
    let tcp = tcp_connect_in_ns(&n2.ns, kubelet.addr(), Duration::from_secs(2)).await?;
    let mut s = support::clients::tls_connect_ip(&tls, IpAddr::V4(n2.ip), tcp).await?;
    let logs = http_get(&mut s, "kubelet", "/containerLogs/default/web/app")
        .await?
        .text();
    assert!(logs.contains("on node node-2"), "{logs}");

    // The service IP is node-local: each node's own server answers there.
    let mut webs = Vec::new();
    for n in bed.nodes() {
        webs.push(bed.spawn_in_ns(
            &n.ns,
            ServerKind::http(SocketAddr::from((svc, 80)), &n.name),
        )?);
    }
    for n in bed.nodes() {
        let mut s =
            tcp_connect_in_ns(&n.ns, SocketAddr::from((svc, 80)), Duration::from_secs(2)).await?;
        let r = http_get(&mut s, "svc", "/stream?seconds=1").await?;
        assert_eq!(r.text().lines().count(), 10);
        assert!(
            r.text().starts_with(&format!("{} tick 1\n", n.name)),
            "{}",
            r.text()
        );
    }
    drop(webs);

    // stop-node / start-node.
    bed.stop_node(2)?;
    let err = tcp_connect_in_ns(&cp, n2.ssh_addr(), Duration::from_secs(2))
        .await
        .unwrap_err();
    assert_eq!(
        io_kind(&err),
        Some(std::io::ErrorKind::ConnectionRefused),
        "{err:#}"
    );
    bed.start_node(2)?;
    banner_from(&cp, n2.ssh_addr()).await?;
    assert!(
        bed.start_node(2).is_err(),
        "starting a running node must fail"
    );

    // link-down is a blackhole: the connect times out. link-up restores.
    let n3_ssh = n3.ssh_addr();
    bed.link_down(3)?;
    let err = tcp_connect_in_ns(&cp, n3_ssh, Duration::from_millis(500))
        .await
        .unwrap_err();
    assert_eq!(io_kind(&err), Some(std::io::ErrorKind::TimedOut), "{err:#}");
    bed.link_up(3)?;
    wait_banner_from(&cp, n3_ssh).await?;

    // down removes every namespace; it is idempotent.
    drop((pod_web, echo, sink, source, kubelet));
    bed.down()?;
    assert!(namespaces_with_prefix(&prefix)?.is_empty());
    bed.down()?;
    let dir = bed.dir().to_owned();
    drop(bed);
    assert!(!dir.exists());
    Ok(())
}

/// Runs `testbed.sh down DIR` on drop.
struct DownOnDrop(std::path::PathBuf);

impl Drop for DownOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script_path())
            .arg("down")
            .arg(&self.0)
            .output();
    }
}

#[test]
fn testbed_gc_removes_orphans() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let key = ClientKey::generate(tmp.path())?;
    let bed_dir = tmp.path().join("bed");
    let _down = DownOnDrop(bed_dir.clone());
    let prefix = format!("nt{}gc", std::process::id());
    // A bed owned by a process that then dies, as after a crashed test run.
    let mut owner = Command::new("sleep").arg("600").spawn()?;
    let out = Command::new("bash")
        .arg(script_path())
        .arg("up")
        .arg(&bed_dir)
        .env("NT_PREFIX", &prefix)
        .env("NT_NODES", "1")
        .env("NT_AUTHORIZED_KEY", &key.public_line)
        .env("NT_OWNER_PID", owner.id().to_string())
        .output()?;
    let gc = Command::new("bash").arg(script_path()).arg("gc").output();
    let kept = namespaces_with_prefix(&prefix);
    owner.kill()?;
    owner.wait()?;
    must_succeed("testbed.sh up", out)?;
    must_succeed("testbed.sh gc", gc?)?;
    assert_eq!(kept?.len(), 3, "gc must keep a bed whose owner lives");

    must_succeed(
        "testbed.sh gc",
        Command::new("bash").arg(script_path()).arg("gc").output()?,
    )?;
    let left = namespaces_with_prefix(&prefix)?;
    assert!(left.is_empty(), "gc left {left:?}");
    Ok(())
}
