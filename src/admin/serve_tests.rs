//! The admin server in process, on loopback, against a tunnel manager whose
//! two nodes point at a closed loopback port: what a local attacker meets
//! (foreign `Host`, a `POST` without the request header, a reconnect flood,
//! idle connections filling the limit).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::guard::ReconnectLimiter;
use super::server::MAX_CONNECTIONS;
use super::{AdminConfig, AdminServer, AdminState, ReadinessConfig};
use crate::descriptors::DescriptorBudget;
use crate::inventory::SyncStatus;
use crate::manager::{ManagerConfig, TunnelManager};
use crate::metrics::Metrics;
use crate::node::NodeConfig;
use crate::router::RoutingConfig;
use crate::shutdown::Shutdown;
use crate::ssh_config::SshConfig;

/// Bound on one request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

struct Admin {
    addr: SocketAddr,
    shutdown: Shutdown,
    _dir: tempfile::TempDir,
}

impl Drop for Admin {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

/// An admin server (TCP on 127.0.0.1, port chosen by the kernel) over two
/// nodes, `extra` appended to `[admin]`.
async fn start(extra: &str) -> Admin {
    start_with(extra, DescriptorBudget::default()).await
}

/// [`start`] with a manager checking `descriptors` against the limit.
async fn start_with(extra: &str, descriptors: DescriptorBudget) -> Admin {
    let dir = tempfile::tempdir().unwrap();
    crate::keys::generate(dir.path(), "id_ed25519", "admin-test").unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // The tables themselves, not the whole file: the admin module sits
    // below the config file that assembles its table.
    let admin: AdminConfig =
        toml::from_str(&format!("listen = \"127.0.0.1:0\"\n{extra}\n")).unwrap();
    admin.validate().unwrap();
    let readiness = ReadinessConfig::default();
    let ssh = SshConfig {
        user: "test".into(),
        identity: dir.path().join("id_ed25519"),
        known_hosts: dir.path().join("known_hosts"),
        backoff_base: Duration::from_secs(1),
        backoff_max: Duration::from_secs(10),
        ..SshConfig::default()
    };
    let identity = crate::keys::load_identity(&ssh.identity, None).unwrap();
    let node = |name: &str, address: &str| NodeConfig {
        name: name.into(),
        addresses: vec![address.into()],
        ssh_address: None,
        pod_cidrs: Vec::new(),
        ssh_port: Some(closed),
        ssh_user: None,
        not_ready: false,
    };
    let metrics = Arc::new(Metrics::new());
    let manager = TunnelManager::new(
        ManagerConfig {
            ssh: &ssh,
            identity: Some(Arc::new(identity)),
            client_certificate: None,
            dial_timeout: ssh.channel_open_timeout,
            descriptors,
        },
        RoutingConfig::default(),
        metrics.clone(),
    )
    .unwrap();
    manager.apply(vec![
        node("node-1", "127.0.0.1"),
        node("node-2", "127.0.0.2"),
    ]);
    let server = AdminServer::bind(&admin, &readiness).await.unwrap();
    let addr = server.tcp_addr().unwrap();
    let state = Arc::new(AdminState {
        manager,
        metrics,
        sync: Arc::new(SyncStatus::default()),
        readiness,
        per_node_metrics: false,
        allowed_hosts: admin.allowed_hosts.clone(),
        reconnects: ReconnectLimiter::default(),
    });
    let shutdown = Shutdown::new();
    tokio::spawn(server.serve(state, shutdown.clone()));
    Admin {
        addr,
        shutdown,
        _dir: dir,
    }
}

/// One request with `Connection: close`: (status, head, body).
async fn request(stream: &mut TcpStream, head: &str) -> (u16, String, String) {
    let exchange = async {
        stream
            .write_all(format!("{head}Content-Length: 0\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await.unwrap();
        buf
    };
    let buf = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .expect("answer in time");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (status, head.to_string(), body.to_string())
}

async fn send(addr: SocketAddr, head: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    request(&mut stream, head).await
}

#[tokio::test]
async fn a_host_that_is_not_an_ip_localhost_or_allowed_is_refused() {
    let admin = start("allowed_hosts = [\"nodetunnel.admin.internal\"]").await;
    let port = admin.addr.port();
    // DNS rebinding: the browser sends the attacker's name.
    for host in [
        "rebind.attacker.example",
        &format!("rebind.attacker.example:{port}"),
    ] {
        let (status, _, body) = send(
            admin.addr,
            &format!("GET /api/v1/tunnels HTTP/1.1\r\nHost: {host}\r\n"),
        )
        .await;
        assert_eq!(status, 403, "{host}: {body}");
        assert!(body.contains("admin.allowed_hosts"), "{body}");
    }
    let (status, _, body) = send(admin.addr, "GET /healthz HTTP/1.0\r\n").await;
    assert_eq!(status, 403, "no Host at all: {body}");
    for host in [
        format!("127.0.0.1:{port}"),
        "localhost".to_string(),
        format!("[::1]:{port}"),
        "nodetunnel.admin.internal".to_string(),
    ] {
        let (status, _, body) = send(
            admin.addr,
            &format!("GET /api/v1/tunnels HTTP/1.1\r\nHost: {host}\r\n"),
        )
        .await;
        assert_eq!(status, 200, "{host}: {body}");
    }
}

#[tokio::test]
async fn a_post_without_the_request_header_is_refused() {
    let admin = start("").await;
    // What a cross-site form can send: a simple POST.
    let (status, _, body) = send(
        admin.addr,
        "POST /api/v1/tunnels/node-1/reconnect HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Content-Type: application/x-www-form-urlencoded\r\n",
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("X-Nodetunnel-Request"), "{body}");
    let (status, _, body) = send(
        admin.addr,
        "POST /api/v1/tunnels/node-1/reconnect HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         X-Nodetunnel-Request: 1\r\n",
    )
    .await;
    assert_eq!(status, 202, "{body}");
}

#[tokio::test]
async fn reconnect_is_rate_limited_per_node_with_retry_after() {
    let admin = start("").await;
    let post = |node: &str| {
        format!(
            "POST /api/v1/tunnels/{node}/reconnect HTTP/1.1\r\nHost: 127.0.0.1\r\n\
             X-Nodetunnel-Request: 1\r\n"
        )
    };
    let (status, _, body) = send(admin.addr, &post("node-1")).await;
    assert_eq!(status, 202, "{body}");
    // A flood right after: every one refused, none reaches the tunnel.
    for _ in 0..20 {
        let (status, head, body) = send(admin.addr, &post("node-1")).await;
        assert_eq!(status, 429, "{body}");
        let retry_after: u64 = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("retry-after: ")
                    .map(str::to_string)
            })
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no Retry-After in {head}"));
        assert!((1..=5).contains(&retry_after), "{head}");
    }
    // Another node has its own budget.
    let (status, _, body) = send(admin.addr, &post("node-2")).await;
    assert_eq!(status, 202, "{body}");
}

#[tokio::test]
async fn idle_connections_do_not_starve_the_probes() {
    let admin = start("").await;
    // Fill every ordinary connection with a client that never sends.
    let mut idle = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        idle.push(TcpStream::connect(admin.addr).await.unwrap());
    }
    // The server accepts in order: these come after the idle ones, on the
    // reserve.
    let (status, _, body) = send(admin.addr, "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n").await;
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = send(admin.addr, "GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n").await;
    assert!(status == 200 || status == 503, "{status} {body}");
    assert!(!body.contains("connections are all taken"), "{body}");
    // The reserve answers probes only.
    let (status, _, body) = send(
        admin.addr,
        "GET /api/v1/tunnels HTTP/1.1\r\nHost: 127.0.0.1\r\n",
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("answers only /healthz and /readyz"), "{body}");
    // Freed ordinary connections serve everything again.
    drop(idle);
    let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
    loop {
        let (status, _, _) = send(
            admin.addr,
            "GET /api/v1/tunnels HTTP/1.1\r\nHost: 127.0.0.1\r\n",
        )
        .await;
        if status == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "ordinary connections never freed"
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn a_configuration_beyond_the_descriptor_limit_shows_in_status_and_metrics() {
    // The limit injected through the budget: connections alone one more
    // than the soft limit allows.
    let limit = crate::descriptors::soft_limit().expect("a finite RLIMIT_NOFILE");
    let budget = DescriptorBudget {
        connections: limit + 1,
        ..DescriptorBudget::default()
    };
    let admin = start_with("", budget).await;
    let (status, _, body) = send(
        admin.addr,
        "GET /api/v1/tunnels HTTP/1.1\r\nHost: 127.0.0.1\r\n",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let list: super::api::TunnelList = serde_json::from_str(&body).expect("the tunnel table");
    let descriptors = list.descriptors.expect("the descriptor check in the table");
    assert!(!descriptors.fits, "{descriptors:?}");
    assert_eq!(descriptors.nodes, 2, "{descriptors:?}");
    assert_eq!(descriptors.limit, Some(limit));
    assert_eq!(descriptors.needed, budget.needed(2));
    assert!(descriptors.suggested_limit >= descriptors.needed);

    let (status, _, body) = send(admin.addr, "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n").await;
    assert_eq!(status, 200, "{body}");
    let value = |name: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{name} missing:\n{body}"))
    };
    assert_eq!(value("nodetunnel_descriptors_needed"), budget.needed(2));
    assert_eq!(value("nodetunnel_descriptors_limit"), limit);
}

#[tokio::test]
async fn a_configuration_within_the_descriptor_limit_shows_its_need() {
    let admin = start("").await;
    let (status, _, body) = send(
        admin.addr,
        "GET /api/v1/tunnels HTTP/1.1\r\nHost: 127.0.0.1\r\n",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let list: super::api::TunnelList = serde_json::from_str(&body).expect("the tunnel table");
    let descriptors = list.descriptors.expect("the descriptor check in the table");
    assert!(descriptors.fits, "{descriptors:?}");
    assert_eq!(descriptors.needed, DescriptorBudget::default().needed(2));
}
