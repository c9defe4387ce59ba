//! The destination policy: the built-in denials of loopback, link-local,
//! unspecified, multicast and cloud-metadata destinations
//! ([`BUILTIN_DENIALS`]), `routing.deny_cidrs` and `routing.allow_cidrs`,
//! `routing.allow_ports`, node SSH ports, and the localhost and
//! cloud-metadata names; why a destination is refused ([`DenyReason`]) and
//! how that refusal reads.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::table::{canonical_net, PrefixMap};
use super::{Router, RoutingConfig};
use crate::destination::{Destination, Host};

/// Why the policy refuses a destination.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum DenyReason {
    /// 127.0.0.0/8 or ::1.
    Loopback,
    /// 169.254.0.0/16 (including cloud metadata 169.254.169.254) or fe80::/10.
    LinkLocal,
    /// 0.0.0.0 or ::.
    Unspecified,
    /// 224.0.0.0/4 or ff00::/8.
    Multicast,
    /// A cloud metadata endpoint outside the link-local ranges (see
    /// [`BUILTIN_DENIALS`] and [`METADATA_NAMES`]), or a name such as
    /// `metadata.google.internal` that the node resolves to its metadata
    /// server.
    CloudMetadata,
    /// The destination is in this `routing.deny_cidrs` entry.
    DenyCidr(IpNet),
    /// An IPv6 destination that leads to this IPv4 address (IPv4-compatible,
    /// NAT64 or 6to4: [`Host::embedded_ipv4`]), which the policy refuses
    /// for the inner reason.
    EmbeddedIpv4 {
        /// The IPv4 address it leads to.
        ipv4: Ipv4Addr,
        /// Why that address is refused.
        reason: Box<DenyReason>,
    },
    /// The port is not in `routing.allow_ports`.
    Port(u16),
    /// The destination is this node's own sshd.
    NodeSshPort {
        /// The node.
        node: Arc<str>,
        /// Its SSH port.
        port: u16,
    },
    /// `localhost`, `*.localhost` or another name the node resolves to its
    /// own loopback.
    LocalhostName,
    /// The destination is a node's name (or a DNS name among its
    /// addresses), and that node has no IP address to connect to instead:
    /// the name is not handed to the node's resolver.
    NodeWithoutAddress {
        /// The node.
        node: Arc<str>,
    },
}

impl DenyReason {
    /// A short, stable label for metrics (`nodetunnel_policy_denials_total`):
    /// `loopback`, `link_local`, `unspecified`, `multicast`,
    /// `cloud_metadata`, `deny_cidr`, `port`, `node_ssh_port`,
    /// `localhost_name` or `node_without_address`; an embedded IPv4
    /// address has the label of its inner reason.
    pub fn label(&self) -> &'static str {
        match self {
            DenyReason::Loopback => "loopback",
            DenyReason::LinkLocal => "link_local",
            DenyReason::Unspecified => "unspecified",
            DenyReason::Multicast => "multicast",
            DenyReason::CloudMetadata => "cloud_metadata",
            DenyReason::DenyCidr(_) => "deny_cidr",
            DenyReason::EmbeddedIpv4 { reason, .. } => reason.label(),
            DenyReason::Port(_) => "port",
            DenyReason::NodeSshPort { .. } => "node_ssh_port",
            DenyReason::LocalhostName => "localhost_name",
            DenyReason::NodeWithoutAddress { .. } => "node_without_address",
        }
    }

    /// Every value [`label`](Self::label) gives, for the series exported
    /// at 0 from the start (keep in step with it).
    pub const LABELS: [&'static str; 10] = [
        "loopback",
        "link_local",
        "unspecified",
        "multicast",
        "cloud_metadata",
        "deny_cidr",
        "port",
        "node_ssh_port",
        "localhost_name",
        "node_without_address",
    ];
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DenyReason::Loopback => f.write_str("loopback address"),
            DenyReason::LinkLocal => f.write_str("link-local address"),
            DenyReason::Unspecified => f.write_str("unspecified address"),
            DenyReason::Multicast => f.write_str("multicast address"),
            DenyReason::CloudMetadata => f.write_str("cloud metadata endpoint"),
            DenyReason::DenyCidr(net) => write!(f, "in routing.deny_cidrs {net}"),
            DenyReason::EmbeddedIpv4 { ipv4, reason } => {
                write!(f, "leads to IPv4 {ipv4}: {reason}")
            }
            DenyReason::Port(port) => write!(f, "port {port} not in routing.allow_ports"),
            DenyReason::NodeSshPort { node, port } => {
                write!(f, "SSH port {port} of node {node}")
            }
            DenyReason::LocalhostName => f.write_str("localhost name"),
            DenyReason::NodeWithoutAddress { node } => {
                write!(f, "node {node} has no IP address to connect to")
            }
        }
    }
}

/// The one-line message of [`RouteError::Denied`].
pub(super) fn denied_message(dest: &Destination, reason: &DenyReason) -> String {
    const ALLOW_HINT: &str = "add it to routing.allow_cidrs to allow";
    let host = &dest.host;
    let port = dest.port;
    match reason {
        DenyReason::Loopback => {
            format!("destination {host} is a loopback address; {ALLOW_HINT}")
        }
        DenyReason::LinkLocal => {
            let metadata = if host.ip() == Some(IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254))) {
                " (cloud metadata)"
            } else {
                ""
            };
            format!("destination {host} is link-local{metadata}; {ALLOW_HINT}")
        }
        DenyReason::Unspecified => {
            format!("destination {host} is the unspecified address; {ALLOW_HINT}")
        }
        DenyReason::Multicast => {
            format!("destination {host} is a multicast address; {ALLOW_HINT}")
        }
        DenyReason::CloudMetadata => match host {
            Host::Ip(_) => {
                format!("destination {host} is a cloud metadata endpoint; {ALLOW_HINT}")
            }
            Host::Name(_) => format!(
                "destination {host} is a cloud metadata name, which the node would resolve to \
                 its metadata endpoint"
            ),
        },
        DenyReason::DenyCidr(net) => format!(
            "destination {host} is in routing.deny_cidrs ({net}); add a more specific \
             routing.allow_cidrs entry to allow"
        ),
        DenyReason::EmbeddedIpv4 { ipv4, reason } => format!(
            "destination {host} leads to IPv4 address {ipv4} (IPv4-compatible, NAT64 or 6to4), \
             which is refused: {reason}; add the IPv6 address to routing.allow_cidrs to allow"
        ),
        DenyReason::Port(port) => {
            format!("destination {host} port {port} is not in routing.allow_ports")
        }
        DenyReason::NodeSshPort { node, port } => format!(
            "destination {host} port {port} is the SSH port of node {node}; tunnelling into a \
             node's own sshd is not allowed"
        ),
        DenyReason::LocalhostName => format!(
            "destination {host} is a localhost name, which the node would resolve to its own \
             loopback"
        ),
        DenyReason::NodeWithoutAddress { node } => format!(
            "destination {host} (port {port}) names node {node}, which has no usable IP \
             address; names are not handed to the node's resolver"
        ),
    }
}

/// A policy entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Policy {
    Deny(DenyReason),
    Allow,
}

const fn v4net(a: u8, b: u8, c: u8, d: u8, len: u8) -> IpNet {
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), len))
}

const fn v6net(segments: [u16; 8], len: u8) -> IpNet {
    let [a, b, c, d, e, f, g, h] = segments;
    IpNet::V6(Ipv6Net::new_assert(
        Ipv6Addr::new(a, b, c, d, e, f, g, h),
        len,
    ))
}

/// The built-in denials for IP destinations, one entry per range, each
/// with why it is there. `routing.allow_cidrs` lifts any of them.
pub const BUILTIN_DENIALS: [(IpNet, DenyReason); 11] = [
    // The node's own loopback: its kubelet's read-only and debug ports,
    // local admin sockets, anything bound to 127.0.0.1.
    (v4net(127, 0, 0, 0, 8), DenyReason::Loopback),
    (v6net([0, 0, 0, 0, 0, 0, 0, 1], 128), DenyReason::Loopback),
    // Link-local, which includes the cloud metadata endpoint
    // 169.254.169.254 (AWS, GCP, Azure IMDS, OpenStack, ...): node
    // credentials.
    (v4net(169, 254, 0, 0, 16), DenyReason::LinkLocal),
    (
        v6net([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10),
        DenyReason::LinkLocal,
    ),
    // "This host": connects to the node itself on Linux.
    (v4net(0, 0, 0, 0, 32), DenyReason::Unspecified),
    (
        v6net([0, 0, 0, 0, 0, 0, 0, 0], 128),
        DenyReason::Unspecified,
    ),
    // Multicast: never a TCP destination.
    (v4net(224, 0, 0, 0, 4), DenyReason::Multicast),
    (
        v6net([0xff00, 0, 0, 0, 0, 0, 0, 0], 8),
        DenyReason::Multicast,
    ),
    // AWS IMDS over IPv6 (Nitro instances).
    (
        v6net([0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254], 128),
        DenyReason::CloudMetadata,
    ),
    // Alibaba Cloud metadata service.
    (v4net(100, 100, 100, 200, 32), DenyReason::CloudMetadata),
    // Azure WireServer (VM agent, extensions and their settings).
    (v4net(168, 63, 129, 16, 32), DenyReason::CloudMetadata),
];

/// Names the node resolves to its own loopback (besides `*.localhost`):
/// the usual `/etc/hosts` entries of Debian and Red Hat systems.
const LOCALHOST_NAMES: [&str; 7] = [
    "localhost.localdomain",
    "localhost4",
    "localhost4.localdomain4",
    "localhost6",
    "localhost6.localdomain6",
    "ip6-localhost",
    "ip6-loopback",
];

/// Names that resolve to a cloud metadata server on the node. A name that
/// is one of these or ends in one (`x.metadata.google.internal`) is denied,
/// see [`is_metadata_name`].
pub const METADATA_NAMES: [&str; 5] = [
    // GCP: metadata.google.internal, and the short name in its search path.
    "metadata.google.internal",
    "metadata",
    // AWS: the instance metadata service by name, in EC2's own domain and
    // by the short name the VPC resolver answers.
    "instance-data",
    "instance-data.ec2.internal",
    // Azure: the name of its Instance Metadata Service.
    "metadata.azure.com",
];

/// A name that is, or ends in, a [`METADATA_NAMES`] entry, or is
/// `instance-data.<region>.compute.internal` (AWS outside us-east-1).
pub(super) fn is_metadata_name(name: &str) -> bool {
    METADATA_NAMES
        .iter()
        .any(|m| name == *m || name.strip_suffix(m).is_some_and(|p| p.ends_with('.')))
        || (name.starts_with("instance-data.") && name.ends_with(".compute.internal"))
}

impl Router {
    /// The built-in denials, `deny_cidrs` and `allow_cidrs` for an IP
    /// destination, and for the IPv4 address an IPv6 destination leads to
    /// (unless `allow_cidrs` allows the IPv6 address itself).
    pub(super) fn check_ip_policy(
        &self,
        ip: IpAddr,
        embedded: Option<Ipv4Addr>,
    ) -> Result<(), DenyReason> {
        match self.policy.longest(ip) {
            Some((_, Policy::Deny(reason))) => return Err(reason.clone()),
            Some((_, Policy::Allow)) => return Ok(()),
            None => {}
        }
        if let Some(ipv4) = embedded {
            if let Some((_, Policy::Deny(reason))) = self.policy.longest(IpAddr::V4(ipv4)) {
                return Err(DenyReason::EmbeddedIpv4 {
                    ipv4,
                    reason: Box::new(reason.clone()),
                });
            }
        }
        Ok(())
    }

    /// The denial if `key` (canonical, see `ssh_only`) is a node's SSH
    /// address outside its addresses and `port` that node's SSH port.
    pub(super) fn deny_ssh_only(&self, key: &str, port: u16) -> Result<(), DenyReason> {
        match self
            .ssh_only
            .get(key)
            .and_then(|nodes| nodes.iter().find(|(_, ssh_port)| *ssh_port == port))
        {
            Some((node, _)) => Err(DenyReason::NodeSshPort {
                node: node.clone(),
                port,
            }),
            None => Ok(()),
        }
    }

    pub(super) fn port_allowed(&self, port: u16) -> bool {
        self.allow_ports.is_empty() || self.allow_ports.binary_search(&port).is_ok()
    }
}

/// Built-in denials, then `deny_cidrs`, then `allow_cidrs` (on equal
/// prefix length allow wins).
pub(super) fn build_policy(config: &RoutingConfig) -> PrefixMap<Policy> {
    let mut policy: PrefixMap<Policy> = PrefixMap::default();
    for (net, reason) in BUILTIN_DENIALS {
        policy.insert(net, Policy::Deny(reason));
    }
    for cidr in &config.deny_cidrs {
        let net = canonical_net(*cidr);
        if policy.get(net).is_none() {
            policy.insert(net, Policy::Deny(DenyReason::DenyCidr(net)));
        }
    }
    for cidr in &config.allow_cidrs {
        policy.insert(canonical_net(*cidr), Policy::Allow);
    }
    policy.finish();
    policy
}

/// `localhost`, `*.localhost` and the other names [`LOCALHOST_NAMES`] lists;
/// `name` is already lowercase without a trailing dot.
pub(super) fn is_localhost_name(name: &str) -> bool {
    name == "localhost" || name.ends_with(".localhost") || LOCALHOST_NAMES.contains(&name)
}
