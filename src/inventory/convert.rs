//! Kubernetes `Node` object to [`NodeConfig`]: the one conversion shared by
//! the Kubernetes watch and the `kubectl get nodes -o json` file format.
//!
//! - Addresses come from `status.addresses`, grouped by type in the
//!   configured preference order (`InternalIP`, `ExternalIP`, `Hostname` by
//!   default), each kept once. The first one is dialled for SSH, unless the
//!   `nodetunnel.dev/ssh-address` annotation names another
//!   ([`NodeConfig::ssh_address`]; it is dialled but not routed to).
//! - Pod CIDRs come from `spec.podCIDRs` (or the older single `spec.podCIDR`).
//! - `nodetunnel.dev/ssh-port` and `nodetunnel.dev/ssh-user` override the
//!   `[ssh]` defaults for that node.
//! - Those three SSH endpoint annotations are written by whoever may edit
//!   the Node object, which includes the node itself (its kubelet): they are
//!   honoured only when the caller says so ([`NodeAnnotations::Trusted`]),
//!   else left out, values unread.
//! - A `Ready` condition of `False` or `Unknown` sets
//!   [`NodeConfig::not_ready`]: the tunnel is kept, but any-node routes choose
//!   the node last. A node without a `Ready` condition is not marked.
//!
//! The result passes [`validate_node`], so a node from Kubernetes is held to
//! the same rules as a `[[nodes]]` entry.

use crate::field_error::FieldError;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;

use crate::node::{validate_node, NodeConfig};

/// Annotation: the address to dial for SSH, instead of the first address of
/// the preferred type.
pub const ANNOTATION_SSH_ADDRESS: &str = "nodetunnel.dev/ssh-address";
/// Annotation: the node's SSH port (1 to 65535).
pub const ANNOTATION_SSH_PORT: &str = "nodetunnel.dev/ssh-port";
/// Annotation: the node's SSH user.
pub const ANNOTATION_SSH_USER: &str = "nodetunnel.dev/ssh-user";
/// The SSH endpoint annotations.
pub const SSH_ENDPOINT_ANNOTATIONS: [&str; 3] = [
    ANNOTATION_SSH_ADDRESS,
    ANNOTATION_SSH_PORT,
    ANNOTATION_SSH_USER,
];

/// Whether a Node's SSH endpoint annotations are honoured. A node can write
/// its own Node object, so a compromised node could point its tunnel (and
/// the host key checked for it) elsewhere: the Kubernetes source honours
/// them only when `inventory.kubernetes.trust_node_annotations` is set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NodeAnnotations {
    /// Ignored: the node is dialled at its first address of the preferred
    /// type, with the `[ssh]` port and user.
    #[default]
    Ignored,
    /// Honoured (and an invalid one skips the node).
    Trusted,
}

/// The SSH endpoint annotations `node` carries, whatever their values.
pub fn ssh_endpoint_annotations(node: &Node) -> Vec<&'static str> {
    let Some(present) = node.metadata.annotations.as_ref() else {
        return Vec::new();
    };
    SSH_ENDPOINT_ANNOTATIONS
        .into_iter()
        .filter(|key| present.contains_key(*key))
        .collect()
}

/// Why [`node_config`] skipped a Node object: one line naming the node
/// and the offending field or annotation.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NodeConfigError {
    /// The object has no (or an empty) `metadata.name`.
    #[error("node without metadata.name")]
    Unnamed,
    /// A field or annotation of the named node cannot be used.
    #[error("node {node:?}: {field}: {reason}")]
    Field {
        /// The node's `metadata.name`.
        node: String,
        /// The field (`spec.podCIDRs[0]`) or annotation
        /// (`annotation nodetunnel.io/ssh-port`) at fault.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Convert one Node object. `address_types` is the preference order of
/// `status.addresses[].type`; other types are ignored. `annotations` says
/// whether the SSH endpoint annotations count.
///
/// The error is one line naming the node and the offending field or
/// annotation; the caller skips that node (keeping its previous entry, if
/// any) rather than refusing the whole list.
pub fn node_config(
    node: &Node,
    address_types: &[String],
    annotations: NodeAnnotations,
) -> Result<NodeConfig, NodeConfigError> {
    let name = node
        .metadata
        .name
        .as_deref()
        .filter(|n| !n.is_empty())
        .ok_or(NodeConfigError::Unnamed)?;
    let fail = |field: &str, reason: String| NodeConfigError::Field {
        node: name.to_owned(),
        field: field.to_owned(),
        reason,
    };
    let annotation = |key: &str| {
        if annotations == NodeAnnotations::Ignored {
            return None;
        }
        node.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(key))
            .map(|v| v.trim())
    };

    let ssh_address = match annotation(ANNOTATION_SSH_ADDRESS) {
        None => None,
        Some(value)
            if value.is_empty() || value.contains(char::is_whitespace) || value.contains('/') =>
        {
            return Err(fail(
                &format!("annotation {ANNOTATION_SSH_ADDRESS}"),
                format!("{value:?} is not an IP address or host name"),
            ))
        }
        Some(value) => Some(value.to_string()),
    };
    let mut addresses: Vec<String> = Vec::new();
    let mut push = |address: &str| {
        if !address.is_empty() && !addresses.iter().any(|a| a == address) {
            addresses.push(address.to_string());
        }
    };
    let status_addresses = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_deref())
        .unwrap_or_default();
    for wanted in address_types {
        for a in status_addresses.iter().filter(|a| &a.type_ == wanted) {
            push(a.address.trim());
        }
    }

    if addresses.is_empty() {
        // No status address of a wanted type: the SSH address is the only
        // thing known to reach the node.
        if let Some(a) = &ssh_address {
            addresses.push(a.clone());
        }
    }

    let spec = node.spec.as_ref();
    let mut cidr_texts: Vec<&str> = spec
        .and_then(|s| s.pod_cidrs.as_deref())
        .unwrap_or_default()
        .iter()
        .map(String::as_str)
        .collect();
    if cidr_texts.is_empty() {
        cidr_texts.extend(spec.and_then(|s| s.pod_cidr.as_deref()));
    }
    let mut pod_cidrs: Vec<IpNet> = Vec::with_capacity(cidr_texts.len());
    for (i, text) in cidr_texts.iter().enumerate() {
        let cidr: IpNet = text
            .trim()
            .parse()
            .map_err(|e| fail(&format!("spec.podCIDRs[{i}]"), format!("{text:?}: {e}")))?;
        if !pod_cidrs.contains(&cidr) {
            pod_cidrs.push(cidr);
        }
    }

    let ssh_port = match annotation(ANNOTATION_SSH_PORT) {
        None => None,
        Some(value) => match value.parse::<u16>() {
            Ok(port) if port != 0 => Some(port),
            _ => {
                return Err(fail(
                    &format!("annotation {ANNOTATION_SSH_PORT}"),
                    format!("{value:?} is not a port between 1 and 65535"),
                ))
            }
        },
    };
    let ssh_user = match annotation(ANNOTATION_SSH_USER) {
        None => None,
        Some("") => {
            return Err(fail(
                &format!("annotation {ANNOTATION_SSH_USER}"),
                "must not be empty".into(),
            ))
        }
        Some(value) if value.contains(char::is_whitespace) => {
            return Err(fail(
                &format!("annotation {ANNOTATION_SSH_USER}"),
                format!("{value:?} contains white space"),
            ))
        }
        Some(value) => Some(value.to_string()),
    };

    let not_ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_deref())
        .unwrap_or_default()
        .iter()
        .find(|c| c.type_ == "Ready")
        .is_some_and(|c| c.status != "True");

    let config = NodeConfig {
        name: name.to_string(),
        addresses,
        ssh_address,
        pod_cidrs,
        ssh_port,
        ssh_user,
        not_ready,
    };
    validate_node(&config).map_err(|FieldError { key: field, reason }| {
        let field = match field.as_str() {
            "addresses" => format!("status.addresses (types {})", address_types.join(", ")),
            _ => field,
        };
        fail(&field, reason)
    })?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::{NodeAddress, NodeCondition, NodeSpec, NodeStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn types() -> Vec<String> {
        vec!["InternalIP".into(), "ExternalIP".into(), "Hostname".into()]
    }

    fn node(name: &str, addresses: &[(&str, &str)], annotations: &[(&str, &str)]) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect::<BTreeMap<_, _>>(),
                ),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                pod_cidrs: Some(vec!["10.244.1.0/24".into(), "fd00:1::/64".into()]),
                pod_cidr: Some("10.244.1.0/24".into()),
                ..Default::default()
            }),
            status: Some(NodeStatus {
                addresses: Some(
                    addresses
                        .iter()
                        .map(|(t, a)| NodeAddress {
                            type_: t.to_string(),
                            address: a.to_string(),
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
        }
    }

    fn with_ready(mut n: Node, status: &str) -> Node {
        n.status.get_or_insert_with(Default::default).conditions = Some(vec![
            NodeCondition {
                type_: "MemoryPressure".into(),
                status: "False".into(),
                ..Default::default()
            },
            NodeCondition {
                type_: "Ready".into(),
                status: status.into(),
                ..Default::default()
            },
        ]);
        n
    }

    #[test]
    fn addresses_follow_the_preference_order_and_are_deduplicated() {
        let n = node(
            "a",
            &[
                ("Hostname", "node-a"),
                ("ExternalIP", "203.0.113.7"),
                ("InternalIP", "10.0.0.1"),
                ("InternalIP", "10.0.0.1"),
                ("InternalDNS", "node-a.internal"),
            ],
            &[],
        );
        let c = node_config(&n, &types(), NodeAnnotations::Trusted).unwrap();
        assert_eq!(c.addresses, ["10.0.0.1", "203.0.113.7", "node-a"]);
        assert_eq!(c.ssh_address(), "10.0.0.1");
        assert_eq!(
            c.pod_cidrs,
            vec![
                "10.244.1.0/24".parse::<IpNet>().unwrap(),
                "fd00:1::/64".parse().unwrap()
            ]
        );
        assert!(!c.not_ready);
        let c = node_config(&n, &["ExternalIP".to_string()], NodeAnnotations::Trusted).unwrap();
        assert_eq!(c.addresses, ["203.0.113.7"]);
    }

    #[test]
    fn annotations_override_address_port_and_user() {
        let n = node(
            "a",
            &[("InternalIP", "10.0.0.1"), ("ExternalIP", "203.0.113.7")],
            &[
                (ANNOTATION_SSH_ADDRESS, "203.0.113.7"),
                (ANNOTATION_SSH_PORT, "2222"),
                (ANNOTATION_SSH_USER, "tunnel"),
            ],
        );
        let c = node_config(&n, &types(), NodeAnnotations::Trusted).unwrap();
        assert_eq!(c.addresses, ["10.0.0.1", "203.0.113.7"]);
        assert_eq!(c.ssh_address(), "203.0.113.7");
        assert_eq!(c.ssh_port, Some(2222));
        assert_eq!(c.ssh_user.as_deref(), Some("tunnel"));
    }

    #[test]
    fn untrusted_annotations_are_ignored_values_unread() {
        let annotated = |value: &str| {
            node(
                "a",
                &[("InternalIP", "10.0.0.1"), ("ExternalIP", "203.0.113.7")],
                &[
                    (ANNOTATION_SSH_ADDRESS, "203.0.113.66"),
                    (ANNOTATION_SSH_PORT, value),
                    (ANNOTATION_SSH_USER, "root"),
                ],
            )
        };
        for n in [annotated("2222"), annotated("not a port")] {
            assert_eq!(
                ssh_endpoint_annotations(&n),
                [
                    ANNOTATION_SSH_ADDRESS,
                    ANNOTATION_SSH_PORT,
                    ANNOTATION_SSH_USER
                ]
            );
            let c = node_config(&n, &types(), NodeAnnotations::Ignored).unwrap();
            assert_eq!(c.ssh_address(), "10.0.0.1", "the first InternalIP");
            assert_eq!(c.ssh_address, None);
            assert_eq!(c.ssh_port, None, "the [ssh] port");
            assert_eq!(c.ssh_user, None, "the [ssh] user");
            assert_eq!(c.addresses, ["10.0.0.1", "203.0.113.7"]);
        }
        assert_eq!(
            NodeAnnotations::default(),
            NodeAnnotations::Ignored,
            "ignored unless the operator opts in"
        );
        let plain = node("a", &[("InternalIP", "10.0.0.1")], &[("other", "x")]);
        assert!(ssh_endpoint_annotations(&plain).is_empty());
    }

    #[test]
    fn invalid_annotations_name_the_node_and_annotation() {
        for (key, value) in [
            (ANNOTATION_SSH_PORT, "0"),
            (ANNOTATION_SSH_PORT, "22x"),
            (ANNOTATION_SSH_PORT, "70000"),
            (ANNOTATION_SSH_USER, ""),
            (ANNOTATION_SSH_ADDRESS, "10.0.0.0/8"),
            (ANNOTATION_SSH_ADDRESS, ""),
        ] {
            let n = node("a", &[("InternalIP", "10.0.0.1")], &[(key, value)]);
            let e = node_config(&n, &types(), NodeAnnotations::Trusted)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("node \"a\": annotation "), "{e}");
            assert!(e.contains(key), "{e}");
        }
    }

    #[test]
    fn ready_condition_false_or_unknown_marks_not_ready() {
        let base = node("a", &[("InternalIP", "10.0.0.1")], &[]);
        assert!(
            !node_config(
                &with_ready(base.clone(), "True"),
                &types(),
                NodeAnnotations::Trusted
            )
            .unwrap()
            .not_ready
        );
        assert!(
            node_config(
                &with_ready(base.clone(), "False"),
                &types(),
                NodeAnnotations::Trusted
            )
            .unwrap()
            .not_ready
        );
        assert!(
            node_config(
                &with_ready(base.clone(), "Unknown"),
                &types(),
                NodeAnnotations::Trusted
            )
            .unwrap()
            .not_ready
        );
        assert!(
            !node_config(&base, &types(), NodeAnnotations::Trusted)
                .unwrap()
                .not_ready
        );
    }

    #[test]
    fn a_node_without_a_usable_address_is_refused() {
        let n = node("a", &[("InternalDNS", "a.internal")], &[]);
        let e = node_config(&n, &types(), NodeAnnotations::Trusted)
            .unwrap_err()
            .to_string();
        assert!(e.contains("node \"a\": status.addresses"), "{e}");
        let mut n = node("a", &[], &[]);
        n.status = None;
        assert!(node_config(&n, &types(), NodeAnnotations::Trusted).is_err());
        let mut n = node("", &[("InternalIP", "10.0.0.1")], &[]);
        n.metadata.name = None;
        assert_eq!(
            node_config(&n, &types(), NodeAnnotations::Trusted),
            Err(NodeConfigError::Unnamed)
        );
    }

    #[test]
    fn the_single_pod_cidr_is_used_when_pod_cidrs_is_absent_and_bad_cidrs_are_refused() {
        let mut n = node("a", &[("InternalIP", "10.0.0.1")], &[]);
        n.spec = Some(NodeSpec {
            pod_cidr: Some("10.244.9.0/24".into()),
            ..Default::default()
        });
        let c = node_config(&n, &types(), NodeAnnotations::Trusted).unwrap();
        assert_eq!(c.pod_cidrs, vec!["10.244.9.0/24".parse::<IpNet>().unwrap()]);
        n.spec = Some(NodeSpec {
            pod_cidrs: Some(vec!["10.244.9.0/33".into()]),
            ..Default::default()
        });
        let e = node_config(&n, &types(), NodeAnnotations::Trusted).unwrap_err();
        assert!(
            matches!(&e, NodeConfigError::Field { field, .. } if field == "spec.podCIDRs[0]"),
            "{e}"
        );
    }
}
