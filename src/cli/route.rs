//! `nodetunnel route DEST`: the routing decision for a destination, offline,
//! from the configuration file's `[routing]` and its nodes: `[[nodes]]`, or
//! with `inventory.source = "file"` the nodes file (no sidecar, no SSH, no
//! key needed). With the `kubernetes` source only `[[nodes]]` is known
//! offline, and the command says so.
//!
//! ```text
//! 10.244.1.7:8080 -> node node-a (rule pod-cidr 10.244.1.0/24)
//! ```
//!
//! Exit 0 when the destination is routed, 1 when it is denied or has no
//! route, 2 when the destination or the file cannot be read. A running
//! sidecar answers the same question about its live inventory at
//! `GET /api/v1/route?dest=HOST:PORT`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::admin::api::RouteAnswer;
use crate::config::{Config, NodeConfig};
use crate::inventory::{InventoryError, InventorySource};
use crate::proxy::TargetError;
use crate::router::{RouteNode, Router};

/// Why [`offline_nodes`] could not list the nodes.
#[derive(Debug, thiserror::Error)]
pub enum OfflineNodesError {
    /// `inventory.source = "file"` without `inventory.path`.
    #[error("inventory.source is \"file\" but inventory.path is not set")]
    NoPath,
    /// The nodes file could not be read.
    #[error("inventory file {}: {source}", path.display())]
    Read {
        /// The nodes file.
        path: PathBuf,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
    /// The nodes file could not be parsed (the sidecar's own message).
    #[error(transparent)]
    Parse(#[from] InventoryError),
}

/// Why [`decide`] or [`decide_with`] could not decide: the destination is
/// not `host:port`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{dest:?}: {error}")]
pub struct DestinationError {
    /// The destination as given.
    pub dest: String,
    /// What is wrong with it.
    #[source]
    pub error: TargetError,
}

/// Decide and print.
pub fn run(config_path: &Path, dest: &str, json: bool) -> ExitCode {
    let config = match Config::parse_file(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nodetunnel route: {e}");
            return ExitCode::from(2);
        }
    };
    let nodes = match offline_nodes(&config) {
        Ok(nodes) => nodes,
        Err(e) => {
            eprintln!("nodetunnel route: {e}");
            return ExitCode::from(2);
        }
    };
    let answer = match decide_with(&config, &nodes, dest) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("nodetunnel route: {e}");
            return ExitCode::from(2);
        }
    };
    if config.inventory.source == InventorySource::Kubernetes {
        eprintln!(
            "note: inventory.source is \"kubernetes\": only the [[nodes]] of {} are known offline; \
             ask the running sidecar (GET /api/v1/route?dest=...) for its live inventory",
            config_path.display()
        );
    }
    if json {
        match serde_json::to_string_pretty(&answer) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("nodetunnel route: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        println!("{}", render(&answer));
    }
    if answer.is_routed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The nodes a sidecar with `config` would route over, as far as they are
/// known offline: the nodes file for the `file` source (read and parsed as
/// the sidecar does), `[[nodes]]` otherwise.
pub fn offline_nodes(config: &Config) -> Result<Vec<NodeConfig>, OfflineNodesError> {
    if config.inventory.source != InventorySource::File {
        return Ok(config.nodes.clone());
    }
    let Some(path) = &config.inventory.path else {
        return Err(OfflineNodesError::NoPath);
    };
    let text = std::fs::read_to_string(path).map_err(|source| OfflineNodesError::Read {
        path: path.clone(),
        source,
    })?;
    Ok(crate::inventory::file::parse_nodes_file_with(
        &text,
        path,
        &config.inventory.address_types,
    )?)
}

/// The decision for `dest` (`host:port`, `[v6]:port`) under `config` and
/// its `[[nodes]]`; conflicts found while building the router are printed
/// to stderr.
pub fn decide(config: &Config, dest: &str) -> Result<RouteAnswer, DestinationError> {
    decide_with(config, &config.nodes, dest)
}

/// [`decide`] over `nodes` instead of the config's `[[nodes]]`.
pub fn decide_with(
    config: &Config,
    nodes: &[NodeConfig],
    dest: &str,
) -> Result<RouteAnswer, DestinationError> {
    let dest = crate::proxy::parse_connect_target(dest).map_err(|error| DestinationError {
        dest: dest.to_owned(),
        error,
    })?;
    let nodes: Vec<RouteNode> = nodes
        .iter()
        .map(|n| RouteNode {
            name: n.name.clone(),
            addresses: n.addresses.clone(),
            pod_cidrs: n.pod_cidrs.clone(),
            ssh_port: n.ssh_port.unwrap_or(config.ssh.port),
            ssh_address: n.ssh_address.clone(),
        })
        .collect();
    let router = Router::new(&nodes, &config.routing);
    for conflict in router.conflicts() {
        eprintln!("warning: routing conflict: {conflict}");
    }
    Ok(RouteAnswer::new(dest.to_string(), &router.route(&dest)))
}

/// One line: `DEST -> node N (rule R)`, `DEST -> any Ready node (rule R)`,
/// `DEST -> denied: ...`.
pub fn render(answer: &RouteAnswer) -> String {
    let rule = answer.rule.as_deref().unwrap_or("-");
    match answer.decision.as_str() {
        "node" => match &answer.connect_to {
            Some(ip) => format!(
                "{} -> node {}, connecting to {ip} (rule {rule})",
                answer.dest,
                answer.node.as_deref().unwrap_or("?")
            ),
            None => format!(
                "{} -> node {} (rule {rule})",
                answer.dest,
                answer.node.as_deref().unwrap_or("?")
            ),
        },
        "conflict" => format!(
            "{} -> conflict, routed to no node: {}",
            answer.dest, answer.message
        ),
        "any-node" => format!("{} -> any Ready node (rule {rule})", answer.dest),
        "denied" => format!(
            "{} -> denied ({}): {}",
            answer.dest,
            answer.reason.as_deref().unwrap_or("policy"),
            answer.message
        ),
        _ => format!("{} -> no route: {}", answer.dest, answer.message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::parse_str(
            r#"
[routing]
service_cidrs = ["10.96.0.0/12"]

[[nodes]]
name = "node-a"
addresses = ["10.240.0.11"]
pod_cidrs = ["10.244.1.0/24"]
"#,
            Path::new("/etc/nodetunnel/nodetunnel.toml"),
        )
        .unwrap()
    }

    #[test]
    fn the_file_source_routes_over_the_nodes_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("nodes.toml"),
            "[[nodes]]\nname = \"node-f\"\naddresses = [\"10.240.0.21\"]\npod_cidrs = [\"10.244.9.0/24\"]\n",
        )
        .unwrap();
        let config_path = dir.path().join("nodetunnel.toml");
        let c = Config::parse_str(
            "[inventory]\nsource = \"file\"\npath = \"nodes.toml\"\n",
            &config_path,
        )
        .unwrap();
        let nodes = offline_nodes(&c).unwrap();
        let pod = decide_with(&c, &nodes, "10.244.9.7:8080").unwrap();
        assert_eq!(
            render(&pod),
            "10.244.9.7:8080 -> node node-f (rule pod-cidr 10.244.9.0/24)"
        );
        std::fs::remove_file(dir.path().join("nodes.toml")).unwrap();
        let e = offline_nodes(&c).unwrap_err().to_string();
        assert!(e.contains("nodes.toml"), "{e}");
    }

    #[test]
    fn decisions_render_on_one_line() {
        let c = config();
        let pod = decide(&c, "10.244.1.7:8080").unwrap();
        assert_eq!(
            render(&pod),
            "10.244.1.7:8080 -> node node-a (rule pod-cidr 10.244.1.0/24)"
        );
        let svc = decide(&c, "10.96.0.10:443").unwrap();
        assert_eq!(
            render(&svc),
            "10.96.0.10:443 -> any Ready node (rule service-cidr 10.96.0.0/12)"
        );
        let kubelet = decide(&c, "10.240.0.11:10250").unwrap();
        assert_eq!(kubelet.rule_label.as_deref(), Some("node_address"));
        let meta = decide(&c, "169.254.169.254:80").unwrap();
        assert!(!meta.is_routed());
        assert!(render(&meta).starts_with("169.254.169.254:80 -> denied (link_local): "));
        let other = decide(&c, "192.0.2.1:80").unwrap();
        assert_eq!(other.decision, "no-route");
        assert!(decide(&c, "no-port").is_err());
    }

    #[test]
    fn conflicts_and_routes_by_name_are_shown() {
        let c = Config::parse_str(
            r#"
[[nodes]]
name = "node-a"
addresses = ["10.240.0.11", "node-a.internal"]

[[nodes]]
name = "node-b"
addresses = ["10.240.0.11"]
"#,
            Path::new("/etc/nodetunnel/nodetunnel.toml"),
        )
        .unwrap();
        let nodes = offline_nodes(&c).unwrap();
        let shared = decide_with(&c, &nodes, "10.240.0.11:10250").unwrap();
        assert_eq!(shared.decision, "conflict");
        assert_eq!(
            shared.conflict_nodes,
            Some(vec!["node-a".to_string(), "node-b".to_string()])
        );
        assert!(!shared.is_routed());
        assert!(render(&shared).starts_with("10.240.0.11:10250 -> conflict, routed to no node:"));
        // node-a's only IP is the shared one: a route by name does not
        // connect to an address another node claims.
        let by_name = decide_with(&c, &nodes, "node-a:10250").unwrap();
        assert_eq!(by_name.decision, "denied");
        assert_eq!(by_name.reason.as_deref(), Some("node_without_address"));
        let c = Config::parse_str(
            "[[nodes]]\nname = \"node-a\"\naddresses = [\"node-a.internal\", \"10.240.0.11\"]\n",
            Path::new("/etc/nodetunnel/nodetunnel.toml"),
        )
        .unwrap();
        let nodes = offline_nodes(&c).unwrap();
        let by_name = decide_with(&c, &nodes, "node-a:10250").unwrap();
        assert_eq!(by_name.connect_to.as_deref(), Some("10.240.0.11"));
        assert_eq!(
            render(&by_name),
            "node-a:10250 -> node node-a, connecting to 10.240.0.11 (rule node-name)"
        );
    }
}
