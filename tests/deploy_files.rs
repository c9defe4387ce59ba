//! The files an operator installs (deploy/) and loads into Prometheus and
//! Grafana (monitoring/), each checked by what consumes it:
//!
//! - every YAML document in deploy/ parses into its Kubernetes type
//!   (k8s-openapi's Pod, ClusterRole, ClusterRoleBinding, ServiceAccount) and
//!   serializes back to the same value, so an unknown or misspelt field
//!   (which k8s-openapi would drop silently) fails; EgressSelectorConfiguration
//!   and kubeadm's ClusterConfiguration parse into structs of this file that
//!   refuse unknown fields;
//! - deploy's configuration files pass nodetunnel's own validation, the
//!   egress files name only the sockets and ports they listen on, and the
//!   host paths, user ids, grace periods and descriptor limits agree across
//!   the files;
//! - the systemd unit passes `systemd-analyze verify`;
//! - `promtool check rules` accepts every rules file and the dashboard's
//!   queries, and `promtool test rules` fires and clears every alert;
//! - every metric the rules and the dashboard name is one the sidecar
//!   exports, every recorded series they read is recorded, and every
//!   runbook link reaches a heading.
//!
//! systemd-analyze and promtool come from Debian's `systemd` and
//! `prometheus` packages (.ci/run installs them). Without them a test says
//! so and passes, except under CI (`CI` set), where it fails.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use nodetunnel::config::Config;
#[path = "support/exported_metrics.rs"]
mod exported_metrics;
use exported_metrics::{anchors, exported_families, family_of, metric_names};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

const NODETUNNEL: &str = env!("CARGO_BIN_EXE_nodetunnel");

/// The one metric the rules may name before the sidecar exports it
/// (being added with client certificates), and only in this rules file.
const PENDING_METRIC: &str = "nodetunnel_client_certificate_expiry_timestamp_seconds";
const PENDING_METRIC_FILE: &str = "monitoring/rules/nodetunnel-certificates.rules.yml";

/// The number of nodes the deploy files are sized for.
const SIZED_FOR_NODES: u64 = 5_000;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(root().join(relative))
        .unwrap_or_else(|e| panic!("cannot read {relative}: {e}"))
}

/// Files under `dir` (relative to the repository) whose name ends in one
/// of `suffixes`, as paths relative to the repository, sorted.
fn files(dir: &str, suffixes: &[&str]) -> Vec<String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else {
                out.push(path);
            }
        }
    }
    let mut found = Vec::new();
    walk(&root().join(dir), &mut found);
    let mut out: Vec<String> = found
        .into_iter()
        .filter_map(|p| {
            let relative = p.strip_prefix(root()).ok()?.to_str()?.to_owned();
            suffixes
                .iter()
                .any(|s| relative.ends_with(s))
                .then_some(relative)
        })
        .collect();
    out.sort();
    out
}

/// Each YAML document of a file, as a JSON value.
fn yaml_documents(relative: &str) -> Vec<Value> {
    let text = read(relative);
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{relative}: not YAML: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

/// The first place where `a` and `b` differ, as a JSON path.
fn first_difference(a: &Value, b: &Value, path: &str) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|k| {
                let here = format!("{path}.{k}");
                match (x.get(k), y.get(k)) {
                    (Some(p), Some(q)) => first_difference(p, q, &here),
                    (Some(_), None) => Some(format!("{here} (in the file, unknown to the type)")),
                    (None, Some(_)) => Some(format!("{here} (added by the type)")),
                    (None, None) => None,
                }
            })
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (p, q))| first_difference(p, q, &format!("{path}[{i}]"))),
        _ if a == b => None,
        _ => Some(format!("{path}: {a} in the file, {b} from the type")),
    }
}

/// `value` as `T`, and `T` back to exactly `value`: k8s-openapi ignores
/// fields it does not know, so a misspelt field shows only as a difference.
fn round_trip<T: DeserializeOwned + Serialize>(value: &Value, at: &str) -> Result<T, String> {
    let typed: T = serde_json::from_value(value.clone()).map_err(|e| format!("{at}: {e}"))?;
    let back = serde_json::to_value(&typed).map_err(|e| format!("{at}: {e}"))?;
    match first_difference(value, &back, "") {
        None => Ok(typed),
        Some(difference) => Err(format!("{at}: {difference}")),
    }
}

// ---- EgressSelectorConfiguration (apiserver.k8s.io), as kube-apiserver reads it ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct EgressSelectorConfiguration {
    api_version: String,
    kind: String,
    egress_selections: Vec<EgressSelection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EgressSelection {
    name: String,
    connection: EgressConnection,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct EgressConnection {
    proxy_protocol: String,
    transport: Option<EgressTransport>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EgressTransport {
    tcp: Option<EgressTcp>,
    uds: Option<EgressUds>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct EgressTcp {
    url: String,
    tls_config: Option<EgressTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct EgressTls {
    ca_bundle: Option<String>,
    client_key: Option<String>,
    client_cert: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct EgressUds {
    uds_name: String,
}

// ---- kubeadm's ClusterConfiguration: the part deploy/ sets ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ClusterConfiguration {
    api_version: String,
    kind: String,
    api_server: KubeadmApiServer,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct KubeadmApiServer {
    #[serde(default)]
    extra_args: Vec<KubeadmArg>,
    #[serde(default)]
    extra_volumes: Vec<KubeadmVolume>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KubeadmArg {
    name: String,
    value: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct KubeadmVolume {
    name: String,
    host_path: String,
    mount_path: String,
    #[serde(default)]
    read_only: bool,
    path_type: Option<String>,
}

/// Every document of deploy/, typed.
#[derive(Default)]
struct Deploy {
    pods: Vec<(String, Pod)>,
    cluster_roles: Vec<(String, ClusterRole)>,
    bindings: Vec<(String, ClusterRoleBinding)>,
    service_accounts: Vec<(String, ServiceAccount)>,
    egress: Vec<(String, EgressSelectorConfiguration)>,
    kubeadm: Vec<(String, ClusterConfiguration)>,
}

fn load_deploy() -> Result<Deploy, Vec<String>> {
    let mut deploy = Deploy::default();
    let mut errors = Vec::new();
    let yaml = files("deploy", &[".yaml", ".yml"]);
    assert!(yaml.len() >= 5, "only {yaml:?} in deploy/");
    for file in yaml {
        for (i, doc) in yaml_documents(&file).into_iter().enumerate() {
            let at = format!("{file} (document {})", i + 1);
            let api_version = doc["apiVersion"].as_str().unwrap_or("").to_owned();
            let kind = doc["kind"].as_str().unwrap_or("").to_owned();
            let result = match (api_version.as_str(), kind.as_str()) {
                ("v1", "Pod") => round_trip(&doc, &at).map(|t| deploy.pods.push((at.clone(), t))),
                ("v1", "ServiceAccount") => {
                    round_trip(&doc, &at).map(|t| deploy.service_accounts.push((at.clone(), t)))
                }
                ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                    round_trip(&doc, &at).map(|t| deploy.cluster_roles.push((at.clone(), t)))
                }
                ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                    round_trip(&doc, &at).map(|t| deploy.bindings.push((at.clone(), t)))
                }
                (
                    "apiserver.k8s.io/v1beta1" | "apiserver.k8s.io/v1",
                    "EgressSelectorConfiguration",
                ) => serde_json::from_value(doc)
                    .map(|t| deploy.egress.push((file.clone(), t)))
                    .map_err(|e| format!("{at}: {e}")),
                ("kubeadm.k8s.io/v1beta4", "ClusterConfiguration") => serde_json::from_value(doc)
                    .map(|t| deploy.kubeadm.push((file.clone(), t)))
                    .map_err(|e| format!("{at}: {e}")),
                _ => Err(format!(
                    "{at}: no test knows apiVersion {api_version:?} kind {kind:?}"
                )),
            };
            if let Err(e) = result {
                errors.push(e);
            }
        }
    }
    if errors.is_empty() {
        Ok(deploy)
    } else {
        Err(errors)
    }
}

fn deploy() -> Deploy {
    load_deploy().unwrap_or_else(|errors| panic!("{}", errors.join("\n")))
}

/// deploy's configuration files, validated by nodetunnel itself.
fn configs() -> Vec<(String, Config)> {
    let tomls = files("deploy", &[".toml"]);
    assert!(!tomls.is_empty(), "no configuration in deploy/");
    tomls
        .into_iter()
        .map(|file| {
            let config = Config::parse_str(&read(&file), &root().join(&file))
                .unwrap_or_else(|e| panic!("{e}"));
            (file, config)
        })
        .collect()
}

#[test]
fn every_yaml_document_in_deploy_parses_into_its_type_with_no_unknown_field() {
    let deploy = deploy();
    assert_eq!(deploy.pods.len(), 1, "one static pod");
    assert!(!deploy.cluster_roles.is_empty() && !deploy.bindings.is_empty());
    assert!(deploy.egress.len() >= 2, "UDS and TCP+mTLS egress files");
    assert_eq!(deploy.kubeadm.len(), 1);
}

#[test]
fn a_misspelt_field_is_caught_by_the_round_trip() {
    let mut doc = yaml_documents("deploy/kubeadm/nodetunnel.yaml").remove(0);
    doc["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = Value::Bool(true);
    let error = round_trip::<Pod>(&doc, "planted").expect_err("a misspelt field passes");
    assert!(error.contains("readOnlyRootFileSystem"), "{error}");
}

#[test]
fn the_rbac_grants_list_and_watch_on_nodes_and_nothing_else() {
    let deploy = deploy();
    for (at, role) in &deploy.cluster_roles {
        let rules = role.rules.as_deref().unwrap_or_default();
        assert!(!rules.is_empty(), "{at}: no rules");
        for rule in rules {
            assert_eq!(
                rule.api_groups.as_deref(),
                Some(&[String::new()][..]),
                "{at}"
            );
            assert_eq!(
                rule.resources.as_deref(),
                Some(&["nodes".to_owned()][..]),
                "{at}"
            );
            let verbs: BTreeSet<&str> = rule.verbs.iter().map(String::as_str).collect();
            assert_eq!(verbs, BTreeSet::from(["list", "watch"]), "{at}");
            assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
        }
        assert!(role.aggregation_rule.is_none(), "{at}");
    }
    let roles: BTreeSet<&str> = deploy
        .cluster_roles
        .iter()
        .filter_map(|(_, r)| r.metadata.name.as_deref())
        .collect();
    for (at, binding) in &deploy.bindings {
        assert_eq!(binding.role_ref.kind, "ClusterRole", "{at}");
        assert!(
            roles.contains(binding.role_ref.name.as_str()),
            "{at}: binds an unknown role"
        );
        assert!(
            !binding.subjects.as_deref().unwrap_or_default().is_empty(),
            "{at}"
        );
    }
}

#[test]
fn the_configuration_files_pass_nodetunnels_validation_and_differ_only_in_proxy() {
    let configs = configs();
    assert!(configs.len() >= 2);
    let without_proxy = |file: &str| {
        let mut table: toml::Table = toml::from_str(&read(file)).expect("TOML");
        table.remove("proxy");
        table
    };
    let first = without_proxy(&configs[0].0);
    for (file, _) in &configs[1..] {
        assert_eq!(
            without_proxy(file),
            first,
            "{file} and {} differ outside [proxy]",
            configs[0].0
        );
    }
}

/// `https://127.0.0.1:8131` as its address and whether it is TLS.
fn url_address(url: &str) -> (SocketAddr, bool) {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("http://") {
        (false, rest)
    } else {
        panic!("{url}: neither http:// nor https://")
    };
    let address = rest.trim_end_matches('/');
    (
        address.parse().unwrap_or_else(|e| panic!("{url}: {e}")),
        tls,
    )
}

#[test]
fn the_egress_files_name_only_sockets_and_ports_a_deploy_configuration_listens_on() {
    let deploy = deploy();
    let configs = configs();
    for (file, egress) in &deploy.egress {
        assert_eq!(egress.kind, "EgressSelectorConfiguration");
        assert!(egress.api_version.starts_with("apiserver.k8s.io/"));
        let names: BTreeSet<&str> = egress
            .egress_selections
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(
            names,
            BTreeSet::from(["cluster"]),
            "{file}: nodetunnel serves the cluster class"
        );
        for selection in &egress.egress_selections {
            let connection = &selection.connection;
            let grpc = match connection.proxy_protocol.as_str() {
                "HTTPConnect" => false,
                "GRPC" => true,
                other => panic!("{file}: proxyProtocol {other}"),
            };
            let transport = connection.transport.as_ref().expect("a transport");
            let listened = match (&transport.uds, &transport.tcp) {
                (Some(uds), None) => configs
                    .iter()
                    .filter(|(_, c)| {
                        let socket = c.proxy.as_ref().and_then(|p| {
                            if grpc {
                                p.grpc_uds.as_deref()
                            } else {
                                p.uds.as_deref()
                            }
                        });
                        socket == Some(Path::new(&uds.uds_name))
                    })
                    .map(|(f, _)| f.clone())
                    .collect::<Vec<_>>(),
                (None, Some(_)) if grpc => {
                    panic!("{file}: the apiserver allows GRPC over a Unix socket only")
                }
                (None, Some(tcp)) => {
                    let (address, tls) = url_address(&tcp.url);
                    if tls {
                        let t = tcp.tls_config.as_ref().expect("https needs tlsConfig");
                        assert!(
                            t.ca_bundle.is_some()
                                && t.client_cert.is_some()
                                && t.client_key.is_some(),
                            "{file}: nodetunnel's TLS listener requires a client certificate"
                        );
                    }
                    configs
                        .iter()
                        .filter(|(_, c)| {
                            c.proxy
                                .as_ref()
                                .is_some_and(|p| p.tcp == Some(address) && p.tls.is_some() == tls)
                        })
                        .map(|(f, _)| f.clone())
                        .collect()
                }
                _ => panic!("{file}: exactly one of uds and tcp"),
            };
            assert!(
                !listened.is_empty(),
                "{file}: no configuration in deploy/ listens where it points"
            );
        }
    }
}

fn pod_volume_host_path(pod: &Pod, mount_path: &str) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    let container = spec.containers.iter().find(|c| c.name == "nodetunnel")?;
    let mount = container
        .volume_mounts
        .as_deref()?
        .iter()
        .find(|m| m.mount_path == mount_path)?;
    let volume = spec
        .volumes
        .as_deref()?
        .iter()
        .find(|v| v.name == mount.name)?;
    Some(volume.host_path.as_ref()?.path.clone())
}

/// The `LimitNOFILE` the deploy configuration needs at `SIZED_FOR_NODES`
/// nodes, as the sidecar itself computes it at start
/// (`nodetunnel_descriptors_needed`): a descriptor per SSH session and per
/// client connection, plus listeners and spare.
fn descriptors_needed(config: &Config) -> u64 {
    let budget = nodetunnel::manager::ManagerConfig::from(config).descriptors;
    budget.needed(SIZED_FOR_NODES as usize)
}

#[test]
fn the_static_pod_the_kubeadm_snippet_and_the_host_directory_agree() {
    let deploy = deploy();
    let (at, pod) = &deploy.pods[0];
    let (_, config) = configs()
        .into_iter()
        .find(|(f, _)| f == "deploy/nodetunnel.toml")
        .expect("deploy/nodetunnel.toml");
    let spec = pod.spec.as_ref().expect("spec");
    assert_eq!(
        spec.host_network,
        Some(true),
        "{at}: hostNetwork, as kube-apiserver"
    );
    let container = spec
        .containers
        .iter()
        .find(|c| c.name == "nodetunnel")
        .expect("container");

    // Hardened: non-root, no privilege escalation, no capabilities, read-only root.
    let pod_security = spec.security_context.as_ref().expect("pod securityContext");
    let security = container
        .security_context
        .as_ref()
        .expect("securityContext");
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.run_as_non_root, Some(true));
    let drop = security.capabilities.as_ref().and_then(|c| c.drop.clone());
    assert_eq!(drop, Some(vec!["ALL".to_owned()]));
    let uid = pod_security.run_as_user.expect("runAsUser");
    let gid = pod_security.run_as_group.expect("runAsGroup");
    assert!(uid != 0 && gid != 0);

    // Probes on the admin port.
    let admin = config.admin.listen.expect("admin.listen");
    for (probe, path) in [
        (&container.liveness_probe, "/healthz"),
        (&container.readiness_probe, "/readyz"),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("httpGet probe");
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(get.host.as_deref(), Some(admin.ip().to_string().as_str()));
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i32::from(admin.port()))
        );
    }
    assert!(container
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        .is_some());
    let grace = spec.termination_grace_period_seconds.expect("grace period");
    assert!(
        grace as u64 > config.ssh.drain_timeout.as_secs() + 1,
        "{at}: terminationGracePeriodSeconds must exceed ssh.drain_timeout"
    );

    // The --config path is in the mounted configuration directory.
    let command = container.command.as_deref().unwrap_or_default();
    let config_flag = command
        .iter()
        .find_map(|a| a.strip_prefix("--config="))
        .expect("--config=");
    let config_dir = Path::new(config_flag).parent().expect("a directory");
    assert!(pod_volume_host_path(pod, config_dir.to_str().unwrap_or("")).is_some());

    // The socket directory: the pod's mount, the host directory, the
    // apiserver's mount and the tmpfiles.d line are one directory.
    let uds = config
        .proxy
        .as_ref()
        .and_then(|p| p.uds.clone())
        .expect("proxy.uds");
    let socket_dir = uds
        .parent()
        .expect("socket directory")
        .to_str()
        .expect("UTF-8");
    let host_dir = pod_volume_host_path(pod, socket_dir).expect("socket directory mounted");
    let (_, kubeadm) = &deploy.kubeadm[0];
    let apiserver_mount = kubeadm
        .api_server
        .extra_volumes
        .iter()
        .find(|v| v.host_path == host_dir)
        .expect("kube-apiserver mounts the socket directory");
    assert_eq!(apiserver_mount.mount_path, socket_dir);
    assert_eq!(apiserver_mount.path_type.as_deref(), Some("Directory"));
    let tmpfiles = read("deploy/kubeadm/nodetunnel.tmpfiles.conf");
    let line: Vec<&str> = tmpfiles
        .lines()
        .find(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .expect("a tmpfiles.d line")
        .split_whitespace()
        .collect();
    assert_eq!(
        line[..5],
        [
            "d",
            host_dir.as_str(),
            "0750",
            &uid.to_string(),
            &gid.to_string()
        ],
        "the tmpfiles.d line makes the socket directory for the pod's user"
    );

    // The egress file the flag names is mounted, and the socket it names
    // is in the shared directory.
    let flag = kubeadm
        .api_server
        .extra_args
        .iter()
        .find(|a| a.name == "egress-selector-config-file")
        .expect("--egress-selector-config-file");
    let egress_mount = kubeadm
        .api_server
        .extra_volumes
        .iter()
        .find(|v| v.mount_path == flag.value)
        .expect("the egress file is mounted");
    assert!(egress_mount.read_only && egress_mount.path_type.as_deref() == Some("File"));
    for (file, _) in &deploy.egress {
        assert!(
            read(file).contains(&format!("# {}:", egress_mount.host_path)),
            "{file}: its header names where it is installed ({})",
            egress_mount.host_path
        );
    }
    assert!(
        kubeadm.api_version.starts_with("kubeadm.k8s.io/")
            && kubeadm.kind == "ClusterConfiguration"
    );
    assert!(apiserver_mount.name != egress_mount.name);
}

/// Whether a tool is there; without it, a test passes with a message,
/// except under CI, where it fails.
fn tool(name: &str, package: &str) -> bool {
    let found = Command::new(name).arg("--version").output().is_ok();
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{name} is missing (Debian's {package} package): .ci/run installs it"
        );
        eprintln!("SKIPPED: {name} is not installed (Debian's {package} package)");
    }
    found
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify_and_fits_5000_nodes() {
    let unit = read("deploy/systemd/nodetunnel.service");
    let (_, config) = configs()
        .into_iter()
        .find(|(f, _)| f == "deploy/nodetunnel.toml")
        .expect("deploy/nodetunnel.toml");
    let value = |key: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key}= in the unit"))
            .to_owned()
    };
    let limit: u64 = value("LimitNOFILE").parse().expect("a number");
    let needed = descriptors_needed(&config);
    assert!(
        limit >= needed * 3 / 2,
        "LimitNOFILE={limit} leaves less than 50% headroom over the {needed} descriptors {SIZED_FOR_NODES} nodes need"
    );
    let uds = config
        .proxy
        .as_ref()
        .and_then(|p| p.uds.clone())
        .expect("proxy.uds");
    assert_eq!(
        uds.parent(),
        Some(Path::new("/run").join(value("RuntimeDirectory")).as_path())
    );
    let stop: u64 = value("TimeoutStopSec").parse().expect("seconds");
    assert!(stop > config.ssh.drain_timeout.as_secs() + 1);
    for required in [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "Restart=on-failure",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ] {
        assert!(unit.lines().any(|l| l == required), "no {required}");
    }
    assert!(value("ExecStart").contains("--config /etc/nodetunnel/nodetunnel.toml"));

    if !tool("systemd-analyze", "systemd") {
        return;
    }
    // verify checks that ExecStart's binary exists: point it at this build's.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nodetunnel.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/nodetunnel", NODETUNNEL)).expect("write");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // An unknown key or a bad value is only a warning: none is accepted.
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );
}

fn promtool(args: &[&str], dir: &Path) -> (bool, String) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn rules_files() -> Vec<String> {
    let rules = files("monitoring/rules", &[".yml", ".yaml"]);
    assert!(rules.len() >= 2, "{rules:?}");
    rules
}

#[test]
fn promtool_check_rules_accepts_every_rules_file() {
    if !tool("promtool", "prometheus") {
        return;
    }
    for file in rules_files() {
        let (ok, out) = promtool(&["check", "rules", &file], root());
        assert!(ok, "{file}:\n{out}");
    }
}

/// Every alert of the rules files: name -> the file.
fn alerts() -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for file in rules_files() {
        for doc in yaml_documents(&file) {
            for group in doc["groups"].as_array().expect("groups") {
                for rule in group["rules"].as_array().expect("rules") {
                    if let Some(name) = rule["alert"].as_str() {
                        out.insert(name.to_owned(), file.clone());
                    }
                }
            }
        }
    }
    out
}

#[test]
fn promtool_test_rules_fires_and_clears_every_alert() {
    let tests = files("monitoring/tests", &[".test.yml"]);
    // Every alert is expected firing at one evaluation and silent at another.
    let mut fired = BTreeSet::new();
    let mut cleared = BTreeSet::new();
    for file in &tests {
        for doc in yaml_documents(file) {
            for test in doc["tests"].as_array().expect("tests") {
                for check in test["alert_rule_test"].as_array().into_iter().flatten() {
                    let name = check["alertname"].as_str().expect("alertname").to_owned();
                    match check["exp_alerts"].as_array().map(Vec::len) {
                        Some(n) if n > 0 => fired.insert(name),
                        _ => cleared.insert(name),
                    };
                }
            }
        }
    }
    for name in alerts().keys() {
        assert!(fired.contains(name), "no promtool test fires {name}");
        assert!(cleared.contains(name), "no promtool test clears {name}");
    }
    if !tool("promtool", "prometheus") {
        return;
    }
    let dir = root().join("monitoring/tests");
    for file in &tests {
        let name = Path::new(file)
            .file_name()
            .and_then(|n| n.to_str())
            .expect("name");
        let (ok, out) = promtool(&["test", "rules", name], &dir);
        assert!(ok, "{file}:\n{out}");
    }
}

/// The dashboard's queries, with Grafana's variables replaced by what
/// Prometheus would get.
fn dashboard_queries() -> Vec<String> {
    let dashboard: Value = serde_json::from_str(&read("monitoring/grafana/nodetunnel.json"))
        .expect("the dashboard is JSON");
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            queries.push(target["expr"].as_str().expect("expr").to_owned());
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
    {
        if let Some(query) = variable["query"]["query"].as_str() {
            queries.push(query.to_owned());
        }
    }
    queries
        .into_iter()
        .map(|q| q.replace("$instance", ".*").replace("$node", ".*"))
        .collect()
}

#[test]
fn the_dashboard_shows_the_panels_on_call_looks_at_and_its_queries_parse() {
    let dashboard: Value =
        serde_json::from_str(&read("monitoring/grafana/nodetunnel.json")).expect("JSON");
    let titles: Vec<&str> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .filter_map(|p| p["title"].as_str())
        .collect();
    for wanted in [
        "Tunnels by state",
        "Refusals by reason",
        "Stream open latency",
        "Bytes per second",
        "Streams and connections open",
        "Per-node keepalive RTT",
    ] {
        assert!(
            titles.iter().any(|t| t.starts_with(wanted)),
            "no panel {wanted:?}"
        );
    }
    if !tool("promtool", "prometheus") {
        return;
    }
    // promtool has no offline query check: each query, as a recording
    // rule, goes through `check rules` (label_values() is Grafana's).
    let mut rules = String::from("groups:\n- name: dashboard\n  rules:\n");
    for (i, query) in dashboard_queries().iter().enumerate() {
        let query = query
            .strip_prefix("label_values(")
            .and_then(|q| q.rsplit_once(',').map(|(selector, _)| selector.to_owned()))
            .unwrap_or_else(|| query.clone());
        rules.push_str(&format!(
            "  - record: dashboard:query_{i}:check\n    expr: {}\n",
            serde_json::to_string(&query).expect("string")
        ));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("dashboard.yml"), rules).expect("write");
    let (ok, out) = promtool(&["check", "rules", "dashboard.yml"], dir.path());
    assert!(ok, "a dashboard query does not parse:\n{out}");
}

/// Whether `name` is a series of an exported family.
fn is_exported(name: &str, families: &BTreeSet<String>) -> bool {
    family_of(name, families).is_some()
}

/// Recorded series named in `text` (`level:metric:operations`).
fn recorded_names(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.matches(':').count() == 2 && !w.starts_with(':') && !w.ends_with(':'))
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_metric_the_rules_and_the_dashboard_name_is_exported_or_recorded() {
    let families = exported_families();
    assert!(families.len() >= 15, "{families:?}");
    let mut sources: Vec<(String, String)> =
        rules_files().into_iter().map(|f| (read(&f), f)).collect();
    sources.push((
        read("monitoring/grafana/nodetunnel.json"),
        "monitoring/grafana/nodetunnel.json".into(),
    ));
    let mut recorded = BTreeSet::new();
    let mut missing = Vec::new();
    for (text, file) in &sources {
        for name in metric_names(text) {
            let pending = name == PENDING_METRIC && file == PENDING_METRIC_FILE;
            if !pending && !is_exported(&name, &families) {
                missing.push(format!("{file}: {name} is not exported"));
            }
        }
        for doc in yaml_documents_or_none(file) {
            for group in doc["groups"].as_array().into_iter().flatten() {
                for rule in group["rules"].as_array().into_iter().flatten() {
                    if let Some(record) = rule["record"].as_str() {
                        recorded.insert(record.to_owned());
                    }
                }
            }
        }
    }
    for (text, file) in &sources {
        for name in recorded_names(text) {
            if !recorded.contains(&name) {
                missing.push(format!("{file}: {name} is not recorded by any rule"));
            }
        }
    }
    assert!(missing.is_empty(), "{}", missing.join("\n"));
}

fn yaml_documents_or_none(file: &str) -> Vec<Value> {
    if file.ends_with(".yml") || file.ends_with(".yaml") {
        yaml_documents(file)
    } else {
        Vec::new()
    }
}

#[test]
fn a_renamed_metric_is_caught() {
    let families = exported_families();
    assert!(is_exported("nodetunnel_stream_opens_total", &families));
    assert!(is_exported(
        "nodetunnel_stream_open_duration_seconds_bucket",
        &families
    ));
    assert!(!is_exported("nodetunnel_stream_open_total", &families));
    let names =
        metric_names("sum(rate(nodetunnel_bytes_total[5m])) instance:nodetunnel_tunnels:sum");
    assert_eq!(
        names,
        BTreeSet::from([
            "nodetunnel_bytes_total".to_owned(),
            "nodetunnel_tunnels".to_owned()
        ])
    );
}

#[test]
fn the_buffered_bytes_alert_holds_deploys_budget() {
    let (_, config) = configs()
        .into_iter()
        .find(|(f, _)| f == "deploy/nodetunnel.toml")
        .expect("deploy/nodetunnel.toml");
    let rules = read("monitoring/rules/nodetunnel.rules.yml");
    let wanted = format!(
        "nodetunnel_stream_buffered_bytes > 0.8 * {}",
        config.ssh.max_buffered_bytes
    );
    assert!(rules.contains(&wanted), "no `{wanted}` in the rules");
}

/// Whether `target` (`path#anchor`, relative to `dir`) reaches a file and,
/// for a Markdown page, a heading.
fn reaches(dir: &Path, target: &str) -> Result<(), String> {
    let (path, anchor) = target.split_once('#').unwrap_or((target, ""));
    let file = dir.join(path);
    if !file.exists() {
        return Err(format!("{target}: no file {}", file.display()));
    }
    if !anchor.is_empty() {
        let text = std::fs::read_to_string(&file).map_err(|e| format!("{target}: {e}"))?;
        if !anchors(&text).contains(anchor) {
            return Err(format!("{target}: no heading #{anchor}"));
        }
    }
    Ok(())
}

#[test]
fn every_alert_has_a_runbook_link_that_reaches_a_heading() {
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in rules_files() {
        for doc in yaml_documents(&file) {
            for group in doc["groups"].as_array().expect("groups") {
                for rule in group["rules"].as_array().expect("rules") {
                    let Some(name) = rule["alert"].as_str() else {
                        continue;
                    };
                    let annotations = &rule["annotations"];
                    for key in ["summary", "description"] {
                        if annotations[key].as_str().is_none_or(str::is_empty) {
                            broken.push(format!("{file}: {name}: no {key}"));
                        }
                    }
                    match annotations["runbook_url"].as_str() {
                        Some(url) if url.contains('#') => {
                            if let Err(e) = reaches(root(), url) {
                                broken.push(format!("{file}: {name}: {e}"));
                            }
                            checked += 1;
                        }
                        _ => broken.push(format!("{file}: {name}: no runbook_url to a section")),
                    }
                }
            }
        }
    }
    assert!(checked >= 10, "only {checked} alerts");
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

#[test]
fn the_links_of_deploy_and_monitoring_readmes_reach_their_targets() {
    let mut broken = Vec::new();
    for page in ["deploy/README.md", "monitoring/README.md"] {
        let text = read(page);
        let dir = root().join(page);
        let dir = dir.parent().expect("dir");
        let mut rest = text.as_str();
        while let Some(at) = rest.find("](") {
            rest = &rest[at + 2..];
            let Some(end) = rest.find(')') else { break };
            let target = &rest[..end];
            if !target.contains("://") {
                if let Err(e) = reaches(dir, target) {
                    broken.push(format!("{page}: {e}"));
                }
            }
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

/// A line as a file and its excerpt in the docs compare: without its
/// trailing comment and indentation.
fn bare(line: &str) -> &str {
    line.split(" #").next().unwrap_or("").trim()
}

#[test]
fn the_excerpts_in_operations_md_are_lines_of_the_deploy_files() {
    let page = read("docs/operations.md");
    let lines: Vec<&str> = page.lines().collect();
    let mut checked = 0;
    let mut drifted = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(file) = line
            .strip_prefix("<!-- excerpt: ")
            .and_then(|rest| rest.strip_suffix(" -->"))
        else {
            continue;
        };
        let source = read(file);
        let source: BTreeSet<&str> = source.lines().map(bare).collect();
        assert!(
            lines.get(i + 1).is_some_and(|l| l.starts_with("```")),
            "docs/operations.md:{}: the excerpt comment must precede a code block",
            i + 1
        );
        for (j, excerpt) in lines[i + 2..]
            .iter()
            .take_while(|l| !l.starts_with("```"))
            .enumerate()
        {
            let excerpt = bare(excerpt);
            if excerpt.is_empty() || excerpt == "..." {
                continue;
            }
            if !source.contains(excerpt) {
                drifted.push(format!(
                    "docs/operations.md:{}: `{excerpt}` is not in {file}",
                    i + 3 + j
                ));
            }
        }
        checked += 1;
    }
    assert!(checked >= 4, "only {checked} excerpts marked");
    assert!(drifted.is_empty(), "{}", drifted.join("\n"));
}
