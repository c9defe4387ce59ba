//! The `file` inventory source against in-process SSH nodes: nodes are
//! added, re-addressed and removed by editing the file, a broken file keeps
//! the inventory in force (and is counted), SIGHUP re-reads, and a node that
//! does not change keeps its session and its open stream throughout.
//!
//! Nothing here sleeps to synchronise: every wait is on a notification
//! (`SyncStatus::changed`, `Tunnel::changed`) with a bounded deadline.

mod ssh_node;
mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeCondition, NodeSpec, NodeStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use nodetunnel::inventory::{parse_nodes_file, InventoryConfig, InventoryError, InventorySource};
use nodetunnel::manager::TunnelManager;
use russh::keys::PublicKey;
use ssh_node::SshNode;
use support::inproc::{echo_server, key_dir, ping, wait_ready};
use support::inventory::{failures_metric, inventory_manager, start, wait_sync, Recorder, Running};

/// Replace the file the way editors do: write a temporary file, rename it.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Rewrite the file in place in several writes (truncate, then pieces).
fn rewrite_in_place(path: &Path, text: &str) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    let bytes = text.as_bytes();
    let mid = bytes.len() / 2;
    file.write_all(&bytes[..mid]).unwrap();
    file.flush().unwrap();
    file.write_all(&bytes[mid..]).unwrap();
    file.sync_all().unwrap();
}

fn toml_node(name: &str, port: u16) -> String {
    format!("[[nodes]]\nname = \"{name}\"\naddresses = [\"127.0.0.1\"]\nssh_port = {port}\n\n")
}

struct Fixture {
    dir: tempfile::TempDir,
    client: PublicKey,
}

impl Fixture {
    fn new() -> Fixture {
        let (dir, client) = key_dir();
        Fixture { dir, client }
    }

    fn manager(&self, nodes: &[&SshNode]) -> Arc<TunnelManager> {
        let lines: Vec<String> = nodes.iter().map(|n| n.known_hosts_line()).collect();
        let (config, manager) = inventory_manager(
            self.dir.path(),
            &lines,
            "source = \"file\"\npath = \"nodes.toml\"\n",
        );
        assert_eq!(config.inventory.source, InventorySource::File);
        assert_eq!(
            config.inventory.path.as_deref(),
            Some(self.nodes_path().as_path())
        );
        manager
    }

    fn nodes_path(&self) -> PathBuf {
        self.dir.path().join("nodes.toml")
    }
}

/// A running file inventory of `path`.
fn start_file(path: &Path, sink: Arc<Recorder>) -> Running {
    let config = InventoryConfig {
        source: InventorySource::File,
        path: Some(path.to_path_buf()),
        ..Default::default()
    };
    start(config, sink)
}

#[tokio::test]
async fn nodes_follow_the_file_and_an_unchanged_node_keeps_its_stream() {
    let fx = Fixture::new();
    let n1 = SshNode::start(&fx.client).await;
    let n2 = SshNode::start(&fx.client).await;
    let n3 = SshNode::start(&fx.client).await;
    let manager = fx.manager(&[&n1, &n2, &n3]);
    let path = fx.nodes_path();
    let (p1, p2, p3) = (n1.addr().port(), n2.addr().port(), n3.addr().port());
    replace(&path, &toml_node("node-a", p1));

    let sink = Recorder::new(Some(manager.clone()));
    let inv = start_file(&path, sink.clone());
    let status = inv.status.clone();

    // Start: node-a from the file.
    wait_sync(&status, "node-a applied", || manager.tunnel("node-a")).await;
    assert!(status.last_sync_unix().is_some());
    assert!(inv
        .metrics
        .encode()
        .contains("nodetunnel_inventory_last_sync_timestamp_seconds "));
    wait_ready(&manager, "node-a").await;
    let node_a = manager.tunnel("node-a").unwrap();
    let echo = echo_server().await;
    let mut stream = manager
        .dial_node("node-a", "127.0.0.1", echo)
        .await
        .unwrap();
    ping(&mut stream, b"start").await;

    // Add node-b (editor-style replace).
    replace(&path, &(toml_node("node-a", p1) + &toml_node("node-b", p2)));
    wait_sync(&status, "node-b added", || manager.tunnel("node-b")).await;
    assert_eq!(sink.last().1.added, ["node-b"]);
    assert_eq!(sink.last().1.unchanged, 1);
    wait_ready(&manager, "node-b").await;

    // Change node-b's SSH endpoint (in-place rewrite in pieces): it
    // reconnects to the new node.
    rewrite_in_place(&path, &(toml_node("node-a", p1) + &toml_node("node-b", p3)));
    let moved = wait_sync(&status, "node-b re-addressed", || {
        manager
            .tunnel("node-b")
            .filter(|t| t.node().ssh_port == Some(p3))
    })
    .await;
    assert!(sink.last().1.changed.contains(&"node-b".to_string()));
    wait_ready(&manager, "node-b").await;
    assert!(
        moved.status().ssh_endpoint.contains(&p3.to_string()),
        "{:?}",
        moved.status()
    );

    // Remove node-b: it is gone, node-a stays.
    replace(&path, &toml_node("node-a", p1));
    wait_sync(&status, "node-b removed", || {
        manager.tunnel("node-b").is_none().then_some(())
    })
    .await;
    assert_eq!(sink.last().1.removed, ["node-b"]);

    // Garbage: refused with the file, line and field; counted; nothing
    // changes.
    let failures = status.failures();
    let applies = sink.applies();
    replace(
        &path,
        &format!("{}[[nodes]\nname = ", toml_node("node-a", p1)),
    );
    wait_sync(&status, "garbage refused", || {
        (status.failures() > failures).then_some(())
    })
    .await;
    let error = status.last_error().expect("an error is recorded");
    assert!(error.contains(&path.display().to_string()), "{error}");
    assert!(error.contains("line 6"), "{error}");
    assert_eq!(failures_metric(&inv.metrics), status.failures());
    assert_eq!(sink.applies(), applies, "a broken file is not applied");

    // A file that parses but breaks a rule: also refused, with line and key.
    let failures = status.failures();
    replace(
        &path,
        &format!(
            "{}[[nodes]]\nname = \"node-c\"\naddresses = [\"bad address\"]\n",
            toml_node("node-a", p1)
        ),
    );
    wait_sync(&status, "invalid node refused", || {
        (status.failures() > failures).then_some(())
    })
    .await;
    let error = status.last_error().unwrap();
    assert!(error.contains("line 8: nodes[1].addresses[0]"), "{error}");

    // An emptied file is refused too: a truncated write never drains.
    let failures = status.failures();
    replace(&path, "");
    wait_sync(&status, "empty file refused", || {
        (status.failures() > failures).then_some(())
    })
    .await;
    assert_eq!(sink.applies(), applies);
    assert!(Arc::ptr_eq(&manager.tunnel("node-a").unwrap(), &node_a));
    ping(&mut stream, b"still here").await;

    // Fixed: applied again, the error cleared.
    replace(&path, &(toml_node("node-a", p1) + &toml_node("node-c", p2)));
    wait_sync(&status, "fixed file applied", || manager.tunnel("node-c")).await;
    assert_eq!(status.last_error(), None);
    assert_eq!(sink.last().1.added, ["node-c"]);
    wait_ready(&manager, "node-c").await;

    // SIGHUP re-reads (and re-applies) the unchanged file.
    let applies = sink.applies();
    let syncs = status.syncs();
    inv.reload.notify_one();
    wait_sync(&status, "SIGHUP re-read", || {
        (status.syncs() > syncs && sink.applies() > applies).then_some(())
    })
    .await;
    assert_eq!(sink.last().1.unchanged, 2);

    // Switching the file to kubectl JSON: node-a keeps its SSH endpoint and
    // gains routing data (Hostname address, pod CIDRs), so it is updated in
    // place (same sessions); node-c is gone.
    let json = kubectl_json(&[KubeNode {
        name: "node-a",
        ip: "127.0.0.1",
        ssh_port: Some(p1),
        ready: "True",
    }]);
    replace(&path, &json);
    wait_sync(&status, "JSON applied", || {
        manager.tunnel("node-c").is_none().then_some(())
    })
    .await;
    assert_eq!(sink.last().1.changed, ["node-a"]);
    assert_eq!(sink.last().1.removed, ["node-c"]);
    assert_eq!(
        manager.tunnel("node-a").unwrap().node().pod_cidrs.len(),
        2,
        "the pod CIDRs came from spec.podCIDRs"
    );

    // node-a was never reconnected: same tunnel, one handshake, the stream
    // opened at the start still works.
    assert!(Arc::ptr_eq(&manager.tunnel("node-a").unwrap(), &node_a));
    assert_eq!(node_a.status().handshakes, 1);
    ping(&mut stream, b"end").await;
    drop(stream);

    inv.stop().await;
    manager.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_missing_file_is_counted_and_picked_up_once_it_appears() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nodes.toml");
    let sink = Recorder::new(None);
    let inv = start_file(&path, sink.clone());
    let status = inv.status.clone();
    wait_sync(&status, "missing file reported", || {
        (status.failures() > 0).then_some(())
    })
    .await;
    let error = status.last_error().unwrap();
    assert!(error.contains("cannot read"), "{error}");
    assert_eq!(status.last_sync_unix(), None);
    assert_eq!(sink.applies(), 0);

    replace(&path, "nodes = []\n");
    wait_sync(&status, "empty inventory applied", || {
        (sink.applies() > 0).then_some(())
    })
    .await;
    assert!(sink.names().is_empty());
    replace(&path, &toml_node("node-a", 2222));
    wait_sync(&status, "node-a applied", || {
        (sink.names() == ["node-a"]).then_some(())
    })
    .await;

    // SIGHUP with a broken file re-reads it and counts the failure again.
    replace(&path, "nodes = [");
    let failures = wait_sync(&status, "broken file", || {
        (status.last_error().is_some()).then(|| status.failures())
    })
    .await;
    inv.reload.notify_one();
    wait_sync(&status, "SIGHUP re-read the broken file", || {
        (status.failures() > failures).then_some(())
    })
    .await;
    assert_eq!(sink.names(), ["node-a"]);
    inv.stop().await;
}

struct KubeNode<'a> {
    name: &'a str,
    ip: &'a str,
    ssh_port: Option<u16>,
    ready: &'a str,
}

/// What `kubectl get nodes -o json` prints, built from k8s-openapi types.
fn kubectl_json(nodes: &[KubeNode<'_>]) -> String {
    let items: Vec<serde_json::Value> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let node = Node {
                metadata: ObjectMeta {
                    name: Some(n.name.to_string()),
                    uid: Some(format!("00000000-0000-0000-0000-00000000000{i}")),
                    resource_version: Some(format!("{}", 1000 + i)),
                    labels: Some(
                        [("kubernetes.io/hostname".to_string(), n.name.to_string())].into(),
                    ),
                    annotations: n
                        .ssh_port
                        .map(|p| [("nodetunnel.dev/ssh-port".to_string(), p.to_string())].into()),
                    ..Default::default()
                },
                spec: Some(NodeSpec {
                    pod_cidr: Some(format!("10.244.{i}.0/24")),
                    pod_cidrs: Some(vec![format!("10.244.{i}.0/24"), format!("fd00:{i}::/64")]),
                    provider_id: Some(format!("fake://{}", n.name)),
                    ..Default::default()
                }),
                status: Some(NodeStatus {
                    addresses: Some(vec![
                        NodeAddress {
                            type_: "Hostname".into(),
                            address: n.name.to_string(),
                        },
                        NodeAddress {
                            type_: "InternalIP".into(),
                            address: n.ip.to_string(),
                        },
                    ]),
                    conditions: Some(vec![
                        NodeCondition {
                            type_: "MemoryPressure".into(),
                            status: "False".into(),
                            reason: Some("KubeletHasSufficientMemory".into()),
                            ..Default::default()
                        },
                        NodeCondition {
                            type_: "Ready".into(),
                            status: n.ready.to_string(),
                            reason: Some("KubeletReady".into()),
                            message: Some("kubelet is posting ready status".into()),
                            ..Default::default()
                        },
                    ]),
                    ..Default::default()
                }),
            };
            serde_json::to_value(&node).unwrap()
        })
        .collect();
    let list = serde_json::json!({
        "apiVersion": "v1",
        "items": items,
        "kind": "List",
        "metadata": { "resourceVersion": "" }
    });
    serde_json::to_string_pretty(&list).unwrap() + "\n"
}

#[test]
fn kubectl_json_converts_addresses_cidrs_overrides_and_readiness() {
    let json = kubectl_json(&[
        KubeNode {
            name: "node-a",
            ip: "10.240.0.11",
            ssh_port: Some(2222),
            ready: "True",
        },
        KubeNode {
            name: "node-b",
            ip: "10.240.0.12",
            ssh_port: None,
            ready: "Unknown",
        },
    ]);
    assert!(
        json.contains("\"kind\": \"Node\""),
        "items carry their kind: {json}"
    );
    let nodes = parse_nodes_file(&json, Path::new("nodes.json")).unwrap();
    assert_eq!(nodes.len(), 2);
    let a = &nodes[0];
    assert_eq!(a.name, "node-a");
    assert_eq!(
        a.addresses,
        ["10.240.0.11", "node-a"],
        "InternalIP before Hostname"
    );
    assert_eq!(a.ssh_address(), "10.240.0.11");
    assert_eq!(a.ssh_port, Some(2222));
    assert_eq!(
        a.pod_cidrs,
        vec![
            "10.244.0.0/24".parse().unwrap(),
            "fd00:0::/64".parse().unwrap()
        ]
    );
    assert!(!a.not_ready);
    let b = &nodes[1];
    assert_eq!(b.ssh_port, None);
    assert!(b.not_ready, "Ready=Unknown is chosen last");

    // A syntax error gives the line.
    let broken = json.replacen("\"kind\": \"List\"", "\"kind\": \"List\",,", 1);
    match parse_nodes_file(&broken, Path::new("nodes.json")) {
        Err(InventoryError::Parse { line: Some(_), .. }) => {}
        other => panic!("expected a parse error with a line, got {other:?}"),
    }
}

#[tokio::test]
async fn a_replaced_directory_is_watched_again() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("nodetunnel");
    std::fs::create_dir(&dir).unwrap();
    let path = dir.join("nodes.toml");
    replace(&path, &toml_node("node-a", 2222));
    let sink = Recorder::new(None);
    let inv = start_file(&path, sink.clone());
    let status = inv.status.clone();
    wait_sync(&status, "node-a applied", || {
        (sink.names() == ["node-a"]).then_some(())
    })
    .await;

    // The directory goes away (a volume unmounted, a deploy replacing it):
    // reported, the inventory kept.
    let failures = status.failures();
    std::fs::remove_dir_all(&dir).unwrap();
    wait_sync(&status, "the vanished file reported", || {
        (status.failures() > failures).then_some(())
    })
    .await;
    assert_eq!(sink.names(), ["node-a"]);

    // It comes back with new content: watched and read again.
    let staging = root.path().join("staging");
    std::fs::create_dir(&staging).unwrap();
    std::fs::write(staging.join("nodes.toml"), toml_node("node-b", 2222)).unwrap();
    std::fs::rename(&staging, &dir).unwrap();
    wait_sync(&status, "node-b from the new directory", || {
        (sink.names() == ["node-b"]).then_some(())
    })
    .await;
    assert_eq!(status.last_error(), None);

    // And changes in it are seen.
    replace(&path, &toml_node("node-c", 2222));
    wait_sync(&status, "node-c", || {
        (sink.names() == ["node-c"]).then_some(())
    })
    .await;
    inv.stop().await;
}
