//! A node's description ([`NodeConfig`]): its name, addresses, pod CIDRs
//! and how its sshd is reached, as the config file's `[[nodes]]` and every
//! inventory source give it, and its check ([`validate_node`]). Shared by
//! the inventory, the tunnel manager, the tunnels and the config file.
//!
//! Ground floor: imports nothing from the crate.

use crate::field_error::FieldError;
use ipnet::IpNet;
use serde::Deserialize;

/// One `[[nodes]]` entry: a node and how to reach its sshd.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Unique node name (the Kubernetes Node name).
    pub name: String,
    /// The node's addresses (destinations that route to this node); the
    /// first is dialled for SSH unless `ssh_address` is set.
    pub addresses: Vec<String>,
    /// Where the node's sshd is reached, when not at the first address
    /// (a bastion-facing address, a port-forward, a loopback in dev mode).
    #[serde(default)]
    pub ssh_address: Option<String>,
    /// Pod CIDRs assigned to the node.
    #[serde(default)]
    pub pod_cidrs: Vec<IpNet>,
    /// SSH port of this node, overriding `ssh.port`.
    #[serde(default)]
    pub ssh_port: Option<u16>,
    /// SSH user of this node, overriding `ssh.user`.
    #[serde(default)]
    pub ssh_user: Option<String>,
    /// Kubernetes says the node is not Ready (condition False or Unknown):
    /// its tunnel is kept, but any-node routes choose it last. Set by the
    /// kubernetes inventory; not a config file key.
    #[serde(skip)]
    pub not_ready: bool,
}

impl NodeConfig {
    /// The address dialled for SSH: `ssh_address`, else the first address.
    pub fn ssh_address(&self) -> &str {
        self.ssh_address
            .as_deref()
            .or_else(|| self.addresses.first().map(String::as_str))
            .unwrap_or("")
    }
}

/// Check one node entry; the error is (key within the node, reason).
pub fn validate_node(node: &NodeConfig) -> Result<(), FieldError> {
    if node.name.is_empty() {
        return Err(FieldError::new("name".into(), "must not be empty".into()));
    }
    if node.addresses.is_empty() {
        return Err(FieldError::new(
            "addresses".into(),
            "needs at least one address".into(),
        ));
    }
    for (j, address) in node.addresses.iter().enumerate() {
        if address.is_empty() || address.contains(char::is_whitespace) || address.contains('/') {
            return Err(FieldError::new(
                format!("addresses[{j}]"),
                format!("{address:?} is not an IP address or host name"),
            ));
        }
    }
    if let Some(address) = &node.ssh_address {
        if address.is_empty() || address.contains(char::is_whitespace) || address.contains('/') {
            return Err(FieldError::new(
                "ssh_address".into(),
                format!("{address:?} is not an IP address or host name"),
            ));
        }
    }
    if node.ssh_port == Some(0) {
        return Err(FieldError::new(
            "ssh_port".into(),
            "must be between 1 and 65535".into(),
        ));
    }
    if let Some(user) = &node.ssh_user {
        if user.is_empty() {
            return Err(FieldError::new(
                "ssh_user".into(),
                "must not be empty".into(),
            ));
        }
    }
    Ok(())
}
