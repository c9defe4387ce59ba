//! The `kubernetes` inventory source against a fake kube-apiserver that
//! speaks the real list/watch wire format for Node objects (serialised from
//! k8s-openapi types): a list with a resourceVersion, `?watch=true` answered
//! with chunked ADDED/MODIFIED/DELETED/BOOKMARK lines, label selectors, and
//! 410 Gone (both as an ERROR event after history compaction and as an HTTP
//! status) forcing a re-list. The nodes are in-process SSH servers reached
//! through the `nodetunnel.dev/ssh-port` annotation, so every change is
//! checked on real tunnels.
//!
//! Nothing here sleeps to synchronise: every wait is on a notification
//! (`SyncStatus::changed`, `Tunnel::changed`, the fake server's request log)
//! with a bounded deadline.

mod ssh_node;
mod support;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeCondition, NodeSpec, NodeStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use nodetunnel::config::Config;
use nodetunnel::inventory::{InventoryConfig, InventorySource};
use nodetunnel::manager::TunnelManager;
use ssh_node::SshNode;
use support::inproc::{echo_server, key_dir, ping, wait_ready, DEADLINE};
use support::inventory::{failures_metric, inventory_manager, start, wait_sync, Recorder};
use tokio::net::TcpListener;
use tokio::sync::Notify;

const SELECTOR_LABEL: &str = "nodetunnel.dev/tunnel";

// ---------------------------------------------------------------------------
// The fake kube-apiserver.

type Body = BoxBody<Bytes, Infallible>;

/// One request the fake apiserver answered.
#[derive(Clone, Debug)]
struct Seen {
    watch: bool,
    resource_version: Option<String>,
    label_selector: Option<String>,
    status: u16,
    /// Answered with an ERROR 410 event (resourceVersion compacted away).
    expired: bool,
}

struct Watch {
    selector: Option<String>,
    bookmarks: bool,
    tx: futures::channel::mpsc::UnboundedSender<Bytes>,
}

#[derive(Default)]
struct Cluster {
    rv: u64,
    nodes: BTreeMap<String, Node>,
    /// (resourceVersion, event type, object) since `compacted`.
    history: Vec<(u64, &'static str, Node)>,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted: u64,
    watches: Vec<Watch>,
    seen: Vec<Seen>,
    /// HTTP status codes for the next list requests.
    fail_lists: Vec<u16>,
    /// HTTP status codes for the next watch requests.
    fail_watches: Vec<u16>,
}

impl Cluster {
    fn event_line(kind: &str, node: &Node) -> Bytes {
        let line = serde_json::json!({ "type": kind, "object": node });
        Bytes::from(serde_json::to_string(&line).unwrap() + "\n")
    }

    fn record(&mut self, kind: &'static str, node: Node) {
        for w in &self.watches {
            if matches(w.selector.as_deref(), &node) {
                let _ = w.tx.unbounded_send(Self::event_line(kind, &node));
            }
        }
        self.watches.retain(|w| !w.tx.is_closed());
        self.history.push((self.rv, kind, node));
    }

    /// Create or update a node; ADDED or MODIFIED goes to the watches.
    fn apply(&mut self, mut node: Node) {
        self.rv += 1;
        node.metadata.resource_version = Some(self.rv.to_string());
        let name = node.metadata.name.clone().unwrap();
        let kind = if self.nodes.contains_key(&name) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.nodes.insert(name, node.clone());
        self.record(kind, node);
    }

    /// Delete a node; DELETED goes to the watches.
    fn delete(&mut self, name: &str) {
        let mut node = self.nodes.remove(name).expect("node exists");
        self.rv += 1;
        node.metadata.resource_version = Some(self.rv.to_string());
        self.record("DELETED", node);
    }

    /// End every open watch (as an apiserver restart or a watch timeout
    /// would).
    fn break_watches(&mut self) {
        self.watches.clear();
    }

    /// Forget the event history: older resourceVersions are Gone.
    fn compact(&mut self) {
        self.compacted = self.rv;
        self.history.clear();
    }

    /// A BOOKMARK at the current resourceVersion to every watch that asked.
    fn bookmark(&mut self) -> u64 {
        let line = serde_json::json!({
            "type": "BOOKMARK",
            "object": {
                "kind": "Node",
                "apiVersion": "v1",
                "metadata": { "resourceVersion": self.rv.to_string() }
            }
        });
        let line = Bytes::from(serde_json::to_string(&line).unwrap() + "\n");
        for w in self.watches.iter().filter(|w| w.bookmarks) {
            let _ = w.tx.unbounded_send(line.clone());
        }
        self.rv
    }

    fn lists(&self) -> usize {
        self.seen.iter().filter(|s| !s.watch).count()
    }
}

/// Equality-based label selectors (`k=v,k2=v2`, `k`), which is all the
/// tests use.
fn matches(selector: Option<&str>, node: &Node) -> bool {
    let Some(selector) = selector else {
        return true;
    };
    let labels = node.metadata.labels.clone().unwrap_or_default();
    selector
        .split(',')
        .filter(|t| !t.is_empty())
        .all(|term| match term.split_once('=') {
            Some((k, v)) => {
                labels.get(k.trim()).map(String::as_str) == Some(v.trim_start_matches('=').trim())
            }
            None => labels.contains_key(term.trim()),
        })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

fn status_body(code: u16, reason: &str, message: &str) -> String {
    serde_json::to_string(&serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code
    }))
    .unwrap()
}

fn full(code: u16, body: String) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)).boxed())
        .unwrap()
}

struct FakeApiServer {
    addr: SocketAddr,
    cluster: Arc<Mutex<Cluster>>,
    /// Notified after every request.
    requests: Arc<Notify>,
    accept: tokio::task::JoinHandle<()>,
}

impl FakeApiServer {
    async fn start() -> FakeApiServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cluster = Arc::new(Mutex::new(Cluster::default()));
        let requests = Arc::new(Notify::new());
        let (c, r) = (cluster.clone(), requests.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                let (c, r) = (c.clone(), r.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let (c, r) = (c.clone(), r.clone());
                        async move { Ok::<_, Infallible>(handle(&c, &r, req)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(socket), service)
                        .await;
                });
            }
        });
        FakeApiServer {
            addr,
            cluster,
            requests,
            accept,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Cluster) -> T) -> T {
        f(&mut self.cluster.lock().unwrap())
    }

    fn kubeconfig(&self, dir: &Path) -> std::path::PathBuf {
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\n\
                 contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
                 current-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
                self.addr
            ),
        )
        .unwrap();
        path
    }

    /// Wait (bounded) until the request log satisfies `check`.
    async fn wait_seen<T>(&self, what: &str, mut check: impl FnMut(&[Seen]) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let notified = self.requests.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(v) = check(&self.cluster.lock().unwrap().seen) {
                return v;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!(
                    "timed out waiting for {what}; requests {:?}",
                    self.cluster.lock().unwrap().seen
                );
            }
        }
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.accept.abort();
        self.cluster.lock().unwrap().break_watches();
    }
}

fn handle(
    cluster: &Mutex<Cluster>,
    requests: &Notify,
    req: Request<hyper::body::Incoming>,
) -> Response<Body> {
    let response = answer(cluster, &req);
    requests.notify_waiters();
    response
}

fn answer(cluster: &Mutex<Cluster>, req: &Request<hyper::body::Incoming>) -> Response<Body> {
    if req.uri().path() != "/api/v1/nodes" {
        return full(
            404,
            status_body(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        );
    }
    let query: HashMap<String, String> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (percent_decode(k), percent_decode(v)))
        .collect();
    let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let selector = query.get("labelSelector").cloned();
    let mut c = cluster.lock().unwrap();
    let failure = if watch {
        c.fail_watches.pop()
    } else {
        c.fail_lists.pop()
    };
    let code = failure.unwrap_or(200);
    c.seen.push(Seen {
        watch,
        resource_version: query.get("resourceVersion").cloned(),
        label_selector: selector.clone(),
        status: code,
        expired: false,
    });
    if let Some(code) = failure {
        let reason = if code == 410 {
            "Expired"
        } else {
            "InternalError"
        };
        return full(code, status_body(code, reason, "injected by the test"));
    }
    if !watch {
        let items: Vec<&Node> = c
            .nodes
            .values()
            .filter(|n| matches(selector.as_deref(), n))
            .collect();
        let list = serde_json::json!({
            "kind": "NodeList",
            "apiVersion": "v1",
            "metadata": { "resourceVersion": c.rv.to_string() },
            "items": items,
        });
        return full(200, serde_json::to_string(&list).unwrap());
    }
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if from < c.compacted {
        if let Some(last) = c.seen.last_mut() {
            last.expired = true;
        }
        // What kube-apiserver does: 200, then one ERROR event, then the end.
        let line = serde_json::json!({
            "type": "ERROR",
            "object": serde_json::from_str::<serde_json::Value>(&status_body(
                410,
                "Expired",
                &format!("too old resource version: {from} ({})", c.compacted),
            ))
            .unwrap()
        });
        return full(200, serde_json::to_string(&line).unwrap() + "\n");
    }
    let (tx, rx) = futures::channel::mpsc::unbounded();
    for (rv, kind, node) in &c.history {
        if *rv > from && matches(selector.as_deref(), node) {
            let _ = tx.unbounded_send(Cluster::event_line(kind, node));
        }
    }
    c.watches.push(Watch {
        selector,
        bookmarks: query.get("allowWatchBookmarks").map(String::as_str) == Some("true"),
        tx,
    });
    let body = StreamBody::new(rx.map(|b| Ok::<_, Infallible>(Frame::data(b))));
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(body))
        .unwrap()
}

// ---------------------------------------------------------------------------
// Nodes, the sink, waits.

/// A Node as the kubelet registers it, at 127.0.0.1, with its sshd's port in
/// the ssh-port annotation.
fn kube_node(name: &str, ssh_port: u16, labelled: bool) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(if labelled {
                BTreeMap::from([(SELECTOR_LABEL.to_string(), "true".to_string())])
            } else {
                BTreeMap::new()
            }),
            annotations: Some(BTreeMap::from([(
                "nodetunnel.dev/ssh-port".to_string(),
                ssh_port.to_string(),
            )])),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            pod_cidrs: Some(vec![format!("10.244.{}.0/24", ssh_port % 200)]),
            ..Default::default()
        }),
        status: Some(NodeStatus {
            addresses: Some(vec![
                NodeAddress {
                    type_: "Hostname".into(),
                    address: name.into(),
                },
                NodeAddress {
                    type_: "InternalIP".into(),
                    address: "127.0.0.1".into(),
                },
            ]),
            conditions: Some(vec![ready_condition("True", 0)]),
            ..Default::default()
        }),
    }
}

fn ready_condition(status: &str, heartbeat: i64) -> NodeCondition {
    NodeCondition {
        type_: "Ready".into(),
        status: status.into(),
        reason: Some("KubeletReady".into()),
        last_heartbeat_time: Some(Time(
            k8s_openapi::chrono::DateTime::from_timestamp(1_700_000_000 + heartbeat, 0).unwrap(),
        )),
        ..Default::default()
    }
}

fn with_ready(mut node: Node, status: &str, heartbeat: i64) -> Node {
    if let Some(s) = node.status.as_mut() {
        s.conditions = Some(vec![ready_condition(status, heartbeat)]);
    }
    node
}

fn with_annotation(mut node: Node, key: &str, value: &str) -> Node {
    node.metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(key.into(), value.into());
    node
}

/// Write `known_hosts` for `nodes` and `nodetunnel.toml` (the kubernetes
/// source, kubeconfig `kubeconfig`, selector `nodetunnel.dev/tunnel=true`,
/// node annotations trusted: the suite reaches its nodes by their ssh-port
/// annotation) in `dir`; the tunnel manager.
fn manager(dir: &Path, nodes: &[&SshNode]) -> Arc<TunnelManager> {
    let lines: Vec<String> = nodes.iter().map(|n| n.known_hosts_line()).collect();
    let inventory = "source = \"kubernetes\"\nkubeconfig = \"kubeconfig\"\n\
         label_selector = \"nodetunnel.dev/tunnel=true\"\n\
         kubernetes = { trust_node_annotations = true }\n";
    inventory_manager(dir, &lines, inventory).1
}

// ---------------------------------------------------------------------------

#[tokio::test]
async fn tunnels_follow_node_objects_through_watch_errors_and_relists() {
    let (dir, client) = key_dir();
    let n1 = SshNode::start(&client).await;
    let n2 = SshNode::start(&client).await;
    let n3 = SshNode::start(&client).await;
    let (p1, p2, p3) = (n1.addr().port(), n2.addr().port(), n3.addr().port());
    let manager = manager(dir.path(), &[&n1, &n2, &n3]);

    let api = FakeApiServer::start().await;
    let kubeconfig = api.kubeconfig(dir.path());
    api.with(|c| {
        c.apply(kube_node("node-a", p1, true));
        c.apply(kube_node("node-b", p2, true));
        // Not selected: never reaches the inventory.
        c.apply(kube_node("node-x", p3, false));
    });
    let config = Config::load(&dir.path().join("nodetunnel.toml"))
        .unwrap()
        .inventory;
    assert_eq!(config.source, InventorySource::Kubernetes);
    assert_eq!(config.kubeconfig.as_deref(), Some(kubeconfig.as_path()));
    let sink = Recorder::new(Some(manager.clone()));
    let inv = start(config, sink.clone());
    let status = inv.status.clone();

    // The first list: node-a and node-b, with Ready sessions.
    wait_sync(&status, "first list", || (sink.applies() > 0).then_some(())).await;
    assert_eq!(sink.names(), ["node-a", "node-b"]);
    let first = api.with(|c| c.seen[0].clone());
    assert!(!first.watch);
    assert_eq!(
        first.label_selector.as_deref(),
        Some("nodetunnel.dev/tunnel=true")
    );
    wait_ready(&manager, "node-a").await;
    wait_ready(&manager, "node-b").await;
    let node_a = manager.tunnel("node-a").unwrap();
    let a = node_a.node();
    assert_eq!(
        a.addresses,
        ["127.0.0.1", "node-a"],
        "InternalIP, then Hostname"
    );
    assert_eq!(a.ssh_port, Some(p1));
    assert_eq!(a.pod_cidrs.len(), 1);
    let echo = echo_server().await;
    let mut stream = manager
        .dial_node("node-a", "127.0.0.1", echo)
        .await
        .unwrap();
    ping(&mut stream, b"start").await;

    // MODIFIED: node-b's SSH port moves to another sshd: it reconnects.
    api.with(|c| c.apply(kube_node("node-b", p3, true)));
    let moved = wait_sync(&status, "node-b moved", || {
        manager
            .tunnel("node-b")
            .filter(|t| t.node().ssh_port == Some(p3))
    })
    .await;
    assert_eq!(sink.last().1.changed, ["node-b"]);
    wait_ready(&manager, "node-b").await;
    assert!(moved.status().ssh_endpoint.contains(&p3.to_string()));

    // A heartbeat (status only) changes nothing; ADDED node-c not Ready:
    // one apply, which only adds node-c, marked to be chosen last.
    let applies = sink.applies();
    api.with(|c| {
        c.apply(with_ready(kube_node("node-a", p1, true), "True", 60));
        c.apply(with_ready(kube_node("node-c", p1, true), "False", 0));
    });
    wait_sync(&status, "node-c added", || manager.tunnel("node-c")).await;
    let summary = sink.last().1;
    assert_eq!(summary.added, ["node-c"]);
    assert!(summary.changed.is_empty(), "{summary:?}");
    assert_eq!(summary.unchanged, 2);
    assert!(sink.applies() <= applies + 2);
    assert!(manager.tunnel("node-c").unwrap().reported_not_ready());
    assert!(!node_a.reported_not_ready());

    // node-c turns Ready.
    api.with(|c| c.apply(with_ready(kube_node("node-c", p1, true), "True", 1)));
    wait_sync(&status, "node-c Ready", || {
        (!manager.tunnel("node-c")?.reported_not_ready()).then_some(())
    })
    .await;

    // An invalid annotation on node-a keeps its entry (no reconnect); then
    // DELETED node-c removes it.
    api.with(|c| {
        c.apply(with_annotation(
            kube_node("node-a", p2, true),
            "nodetunnel.dev/ssh-port",
            "22x",
        ));
        c.delete("node-c");
    });
    wait_sync(&status, "node-c deleted", || {
        manager.tunnel("node-c").is_none().then_some(())
    })
    .await;
    assert_eq!(sink.last().1.removed, ["node-c"]);
    assert_eq!(manager.tunnel("node-a").unwrap().node().ssh_port, Some(p1));

    // 410 Gone after compaction: node-d is deleted while the watch is down
    // and its DELETED event compacted away; the re-watch gets an ERROR 410
    // event, and the re-list removes node-d.
    api.with(|c| c.apply(kube_node("node-d", p2, true)));
    wait_sync(&status, "node-d added", || manager.tunnel("node-d")).await;
    let lists = api.with(|c| c.lists());
    api.with(|c| {
        c.break_watches();
        c.delete("node-d");
        c.compact();
    });
    wait_sync(&status, "node-d gone after the re-list", || {
        manager.tunnel("node-d").is_none().then_some(())
    })
    .await;
    assert!(api.with(|c| c.lists()) > lists, "a re-list happened");
    assert!(
        api.with(|c| c.seen.iter().any(|s| s.expired)),
        "the re-watch was answered with 410"
    );
    assert_eq!(sink.last().1.removed, ["node-d"]);

    // 410 as an HTTP status on the watch request: node-e vanished without
    // an event; only a re-list can tell.
    api.with(|c| c.apply(kube_node("node-e", p2, true)));
    wait_sync(&status, "node-e added", || manager.tunnel("node-e")).await;
    let lists = api.with(|c| c.lists());
    api.with(|c| {
        c.fail_watches.push(410);
        c.nodes.remove("node-e");
        c.rv += 1;
        c.break_watches();
    });
    wait_sync(&status, "node-e gone after the re-list", || {
        manager.tunnel("node-e").is_none().then_some(())
    })
    .await;
    assert!(api.with(|c| c.lists()) > lists, "a re-list happened");
    assert!(api.with(|c| c.seen.iter().any(|s| s.watch && s.status == 410)));

    // BOOKMARK: changes to an unselected node move the resourceVersion on;
    // the bookmark tells the watcher, so after the history is compacted
    // the re-watch starts at the bookmark and needs no re-list.
    api.wait_seen("a live watch", |seen| {
        seen.last()
            .filter(|s| s.watch && s.status == 200)
            .map(|_| ())
    })
    .await;
    let lists = api.with(|c| c.lists());
    let mark = api.with(|c| {
        c.apply(with_ready(kube_node("node-x", p3, false), "True", 5));
        c.apply(with_ready(kube_node("node-x", p3, false), "True", 6));
        let mark = c.bookmark();
        c.compact();
        c.break_watches();
        mark
    });
    let rewatch = api
        .wait_seen("the re-watch after the bookmark", |seen| {
            seen.iter()
                .rev()
                .find(|s| s.watch && s.resource_version.as_deref() == Some(&mark.to_string()))
                .cloned()
        })
        .await;
    assert_eq!(rewatch.status, 200);
    assert_eq!(
        api.with(|c| c.lists()),
        lists,
        "no re-list after a bookmark"
    );

    // A failing list (SIGHUP forces a re-list): counted, retried, recovered.
    let failures = status.failures();
    api.with(|c| c.fail_lists.push(500));
    inv.reload.notify_one();
    wait_sync(&status, "the failed list is counted", || {
        (status.failures() > failures).then_some(())
    })
    .await;
    let error = status.last_error().unwrap();
    assert!(error.contains("kubernetes node watch"), "{error}");
    assert_eq!(failures_metric(&inv.metrics), status.failures());
    wait_sync(&status, "recovered", || {
        status.last_error().is_none().then_some(())
    })
    .await;
    assert_eq!(sink.names(), ["node-a", "node-b"]);

    // node-a was never reconnected: same tunnel, one handshake, and the
    // stream opened at the start still carries bytes.
    assert!(Arc::ptr_eq(&manager.tunnel("node-a").unwrap(), &node_a));
    assert_eq!(node_a.status().handshakes, 1);
    ping(&mut stream, b"end").await;
    drop(stream);

    assert!(status.last_sync_unix().is_some());
    if std::env::var_os("INVENTORY_TEST_DUMP").is_some() {
        for seen in api.with(|c| c.seen.clone()) {
            eprintln!("{seen:?}");
        }
    }
    inv.stop().await;
    manager.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn ssh_endpoint_annotations_count_only_when_the_operator_trusts_them() {
    let dir = tempfile::tempdir().unwrap();
    let api = FakeApiServer::start().await;
    let kubeconfig = api.kubeconfig(dir.path());
    // What a compromised node can write on its own Node object.
    api.with(|c| {
        let node = with_annotation(
            with_annotation(
                kube_node("node-a", 2222, true),
                "nodetunnel.dev/ssh-user",
                "root",
            ),
            "nodetunnel.dev/ssh-address",
            "192.0.2.66",
        );
        c.apply(node);
    });
    for trust in [false, true] {
        let mut config = InventoryConfig {
            source: InventorySource::Kubernetes,
            kubeconfig: Some(kubeconfig.clone()),
            ..Default::default()
        };
        config.kubernetes.trust_node_annotations = trust;
        let sink = Recorder::new(None);
        let inv = start(config, sink.clone());
        let status = inv.status.clone();
        wait_sync(&status, "the first list", || {
            (sink.applies() > 0).then_some(())
        })
        .await;
        let (nodes, _) = sink.last();
        assert_eq!(nodes.len(), 1);
        let a = &nodes[0];
        if trust {
            assert_eq!(a.ssh_address(), "192.0.2.66");
            assert_eq!(a.ssh_port, Some(2222));
            assert_eq!(a.ssh_user.as_deref(), Some("root"));
        } else {
            assert_eq!(a.ssh_address(), "127.0.0.1", "its InternalIP");
            assert_eq!(a.ssh_port, None, "the [ssh] port");
            assert_eq!(a.ssh_user, None, "the [ssh] user");
        }
        inv.stop().await;
    }
}

#[tokio::test]
async fn an_unreadable_kubeconfig_is_retried_until_it_works() {
    let dir = tempfile::tempdir().unwrap();
    let api = FakeApiServer::start().await;
    api.with(|c| c.apply(kube_node("node-a", 2222, false)));
    let config = InventoryConfig {
        source: InventorySource::Kubernetes,
        kubeconfig: Some(dir.path().join("kubeconfig")),
        ..Default::default()
    };
    let sink = Recorder::new(None);
    let inv = start(config, sink.clone());
    let status = inv.status.clone();
    wait_sync(&status, "the missing kubeconfig is reported", || {
        (status.failures() > 0).then_some(())
    })
    .await;
    let error = status.last_error().unwrap();
    assert!(error.starts_with("kubernetes client: "), "{error}");
    assert!(error.contains("kubeconfig"), "{error}");
    assert_eq!(sink.applies(), 0);

    // Written, and SIGHUP cuts the backoff short.
    api.kubeconfig(dir.path());
    inv.reload.notify_one();
    wait_sync(&status, "the list after the kubeconfig appeared", || {
        (sink.applies() > 0).then_some(())
    })
    .await;
    assert_eq!(sink.names(), ["node-a"]);
    assert_eq!(status.last_error(), None);
    inv.stop().await;
}
