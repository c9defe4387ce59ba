//! Destination routing and policy: which node a `host:port` is tunnelled
//! through, or why it may not be tunnelled at all.
//!
//! This module owns the `[routing]` table of the configuration
//! ([`RoutingConfig`]), the destination policy (built-in denials of loopback,
//! link-local, unspecified, multicast and cloud-metadata destinations,
//! `deny_cidrs`, `allow_cidrs`, `allow_ports`, node SSH ports, localhost
//! names) and the routing rules (node address or name, pod CIDR, service CIDR,
//! default). It is pure and synchronous: it knows no sockets, no DNS and no
//! tunnel states. The manager builds a [`Router`] from the node inventory with
//! [`Router::new`], swaps it atomically when the inventory changes, and asks
//! it [`Router::route`] for every stream.
//!
//! The destination arrives parsed ([`Destination`]): IP literals canonical,
//! names validated and lower case (see [`crate::destination`]). Rules, in
//! order:
//!
//! 0. Policy: IP destinations are checked against the built-in denials
//!    ([`BUILTIN_DENIALS`]), `deny_cidrs` and `allow_cidrs` (most specific
//!    prefix wins, `allow` wins ties); an IPv6 destination that leads to an
//!    IPv4 address (IPv4-compatible, NAT64, 6to4) is checked as that IPv4
//!    address too; localhost and cloud-metadata names are denied; the port
//!    must be in `allow_ports` when that list is non-empty; a node's own SSH
//!    port on that node is denied.
//! 1. The host is one of a node's addresses or its name: that node. A
//!    route chosen by a name connects to the node's first usable IP address
//!    that no other node claims, never to the name
//!    (`Route::Node::connect_to`).
//! 2. The host is an IP in a node's pod CIDR: that node.
//! 3. The host is an IP in a service CIDR: any Ready node. The longest prefix
//!    across pod and service CIDRs decides between rules 2 and 3.
//! 4. Otherwise `routing.default`: deny, or any Ready node (DNS names are
//!    then passed to that node unresolved).
//!
//! Ownership is exclusive, because a compromised node controls its own Node
//! object: an address or name that several nodes claim, and a pod CIDR
//! range that several nodes' CIDRs cover, route to none of them
//! ([`RouteError::Conflict`]) for as long as the conflict lasts; a node
//! address inside a service CIDR, inside another node's pod CIDR or refused
//! by the policy is no node address ([`Conflict::IgnoredAddress`]). The IP
//! policy sees IP literals only: a DNS name that the node resolves to a
//! denied address is not caught here (only the well-known localhost and
//! metadata names are), so deployments that must rule that out keep
//! `routing.default = "deny"`.
//!
//! Lookups cost one hash probe per distinct prefix length present in a table
//! (at most 33 for IPv4, 129 for IPv6), independent of the number of nodes and
//! CIDRs.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::destination::{Destination, Host};

/// The `[routing]` table of the configuration file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingConfig {
    /// Service CIDRs (ClusterIP ranges): reached through any Ready node.
    pub service_cidrs: Vec<IpNet>,
    /// What to do with a destination no other rule matches.
    pub default: DefaultRoute,
    /// Destination ports that may be reached; empty allows every port.
    pub allow_ports: Vec<u16>,
    /// CIDRs denied in addition to the built-in denials.
    pub deny_cidrs: Vec<IpNet>,
    /// Exceptions to the built-in denials and to `deny_cidrs`.
    pub allow_cidrs: Vec<IpNet>,
}

/// `routing.default`: the route of a destination no other rule matches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DefaultRoute {
    /// Refuse it ([`RouteError::NoRoute`]).
    #[default]
    Deny,
    /// Send it through any Ready node; DNS names are resolved by that node.
    AnyNode,
}

impl fmt::Display for DefaultRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DefaultRoute::Deny => "deny",
            DefaultRoute::AnyNode => "any-node",
        })
    }
}

impl RoutingConfig {
    /// Check the table for mistakes a [`Router`] would otherwise silently
    /// accept.
    ///
    /// # Errors
    ///
    /// The offending key (e.g. `"allow_ports"`, relative to `[routing]`) and
    /// a one-line reason: port 0 in `allow_ports`, a CIDR with host bits set,
    /// or a CIDR in both `allow_cidrs` and `deny_cidrs`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.allow_ports.contains(&0) {
            return Err((
                "allow_ports".to_owned(),
                "port 0 is not a valid destination port".to_owned(),
            ));
        }
        for (key, list) in [
            ("service_cidrs", &self.service_cidrs),
            ("deny_cidrs", &self.deny_cidrs),
            ("allow_cidrs", &self.allow_cidrs),
        ] {
            if let Some(net) = list.iter().find(|net| net.trunc() != **net) {
                return Err((
                    key.to_owned(),
                    format!("{net} has host bits set; did you mean {}?", net.trunc()),
                ));
            }
        }
        for net in &self.allow_cidrs {
            let canonical = canonical_net(*net);
            if self
                .deny_cidrs
                .iter()
                .any(|deny| canonical_net(*deny) == canonical)
            {
                return Err((
                    "allow_cidrs".to_owned(),
                    format!("{net} is also in deny_cidrs; keep it in one of the two lists"),
                ));
            }
        }
        Ok(())
    }
}

/// One node as the router sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteNode {
    /// The node's name (Kubernetes node name).
    pub name: String,
    /// Its addresses as configured, in order of preference: IP literals or
    /// DNS names. The first usable IP address is what a route chosen by
    /// the node's name dials.
    pub addresses: Vec<String>,
    /// The pod CIDRs assigned to it.
    pub pod_cidrs: Vec<IpNet>,
    /// The port its sshd listens on; tunnelling to it is denied.
    pub ssh_port: u16,
    /// Where its sshd is dialled when that is not one of `addresses`
    /// (`nodes[].ssh_address`): not routed to the node, but denied at
    /// `ssh_port` like the node's own addresses.
    pub ssh_address: Option<String>,
}

/// Where a destination goes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Route {
    /// Through this one node.
    Node {
        /// The node's name.
        node: Arc<str>,
        /// The rule that picked it.
        rule: RouteRule,
        /// The address the node connects to instead of the destination's
        /// host: set when the route was chosen by a name (the node's name,
        /// or a DNS name among its addresses), so that the node's own
        /// resolver never decides where a name goes (an image mapping its
        /// hostname to 127.0.1.1 would otherwise turn `node-1:10250` into
        /// the node's loopback).
        connect_to: Option<IpAddr>,
    },
    /// Through any Ready node.
    AnyNode {
        /// The rule that picked this route.
        rule: RouteRule,
    },
}

impl Route {
    /// The rule that picked this route.
    pub fn rule(&self) -> &RouteRule {
        match self {
            Route::Node { rule, .. } | Route::AnyNode { rule } => rule,
        }
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Route::Node {
                node,
                rule,
                connect_to: None,
            } => write!(f, "node {node} by {rule}"),
            Route::Node {
                node,
                rule,
                connect_to: Some(ip),
            } => write!(f, "node {node} by {rule}, connecting to {ip}"),
            Route::AnyNode { rule } => write!(f, "any node by {rule}"),
        }
    }
}

/// The rule that picked a [`Route`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RouteRule {
    /// The host is one of the node's addresses.
    NodeAddress,
    /// The host is the node's name.
    NodeName,
    /// The host is an IP in this pod CIDR of the node.
    PodCidr(IpNet),
    /// The host is an IP in this service CIDR.
    ServiceCidr(IpNet),
    /// No rule matched and `routing.default` is `any-node`.
    Default,
}

impl RouteRule {
    /// A short, stable label for metrics: `node_address`, `node_name`,
    /// `pod_cidr`, `service_cidr` or `default`.
    pub fn label(&self) -> &'static str {
        match self {
            RouteRule::NodeAddress => "node_address",
            RouteRule::NodeName => "node_name",
            RouteRule::PodCidr(_) => "pod_cidr",
            RouteRule::ServiceCidr(_) => "service_cidr",
            RouteRule::Default => "default",
        }
    }
}

impl fmt::Display for RouteRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteRule::NodeAddress => f.write_str("node-address"),
            RouteRule::NodeName => f.write_str("node-name"),
            RouteRule::PodCidr(net) => write!(f, "pod-cidr {net}"),
            RouteRule::ServiceCidr(net) => write!(f, "service-cidr {net}"),
            RouteRule::Default => f.write_str("default"),
        }
    }
}

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

/// Why [`Router::route`] found no way to a destination.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The policy refuses the destination.
    #[error("{}", denied_message(.dest, .reason))]
    Denied {
        /// The destination as asked for.
        dest: Destination,
        /// Why it is refused.
        reason: DenyReason,
    },
    /// No rule routes the destination and `routing.default` is `deny`.
    #[error(
        "no route to {}: it is no node address or name and in no pod or service CIDR, \
         and routing.default is \"deny\"", .dest.host
    )]
    NoRoute {
        /// The destination as asked for.
        dest: Destination,
    },
    /// More than one node claims the destination (the same address, or
    /// overlapping pod CIDRs): it goes to none of them while that lasts.
    #[error(
        "{} is claimed by nodes {} ({}); it is routed to none of them until the conflict is \
         resolved", .dest.host, join(.nodes), .claim
    )]
    Conflict {
        /// The destination as asked for.
        dest: Destination,
        /// What is claimed twice.
        claim: ClaimKind,
        /// The nodes claiming it, sorted by name.
        nodes: Vec<Arc<str>>,
    },
}

/// What several nodes claim in a [`RouteError::Conflict`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ClaimKind {
    /// The same address or name.
    Address,
    /// Overlapping or identical pod CIDRs; this is the overlapped range.
    PodCidr(IpNet),
}

impl fmt::Display for ClaimKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClaimKind::Address => f.write_str("as a node address or name"),
            ClaimKind::PodCidr(net) => write!(f, "by overlapping pod CIDRs on {net}"),
        }
    }
}

impl RouteError {
    /// A short, stable label for metrics, the same as
    /// [`DialError::reason`](crate::dial::DialError::reason) of the dial error
    /// this becomes: `denied`, `no_route` or `conflict`. The finer reason of
    /// a denial is [`DenyReason::label`].
    pub fn label(&self) -> &'static str {
        match self {
            RouteError::Denied { .. } => "denied",
            RouteError::NoRoute { .. } => "no_route",
            RouteError::Conflict { .. } => "conflict",
        }
    }

    /// The denial reason, if this is a denial.
    pub fn deny_reason(&self) -> Option<&DenyReason> {
        match self {
            RouteError::Denied { reason, .. } => Some(reason),
            RouteError::NoRoute { .. } | RouteError::Conflict { .. } => None,
        }
    }
}

/// The one-line message of [`RouteError::Denied`].
fn denied_message(dest: &Destination, reason: &DenyReason) -> String {
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

/// Something in the inventory or the configuration the router refused to
/// route or ignored; the caller logs each new one as a warning and exports
/// their count (`nodetunnel_route_conflicts`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Conflict {
    /// Several nodes' pod CIDRs cover this range (identical or nested
    /// CIDRs): it routes to none of them.
    PodCidr {
        /// The overlapped range (the narrower CIDR).
        cidr: IpNet,
        /// The nodes claiming it, sorted by name.
        nodes: Vec<Arc<str>>,
    },
    /// A node's pod CIDR is also a service CIDR; it routes to the node.
    PodAndServiceCidr {
        /// The CIDR.
        cidr: IpNet,
        /// The node it routes to.
        node: Arc<str>,
    },
    /// Several nodes have the same address or name; it routes to none of
    /// them, and the SSH ports of all are denied.
    SharedAddress {
        /// The address or name, normalised.
        address: String,
        /// The nodes claiming it, sorted by name.
        nodes: Vec<Arc<str>>,
    },
    /// A node's address (or name) is neither an IP literal nor a valid DNS
    /// name; it is not used for routing.
    UnusableAddress {
        /// The node.
        node: Arc<str>,
        /// The address as configured.
        address: String,
    },
    /// A node's IP address that cannot be a node address (it is in a
    /// service CIDR, in another node's pod CIDR, or denied by the policy):
    /// ignored for routing, so that a node cannot claim a service's or
    /// another node's traffic, or make a denied address reachable.
    IgnoredAddress {
        /// The node.
        node: Arc<str>,
        /// The address.
        address: IpAddr,
        /// Why it is ignored.
        why: IgnoredWhy,
    },
}

/// Why a node address is [`Conflict::IgnoredAddress`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum IgnoredWhy {
    /// It is in this service CIDR.
    ServiceCidr(IpNet),
    /// It is in this pod CIDR of another node.
    PodCidr {
        /// The CIDR.
        cidr: IpNet,
        /// Its node.
        node: Arc<str>,
    },
    /// The destination policy refuses it.
    Denied(DenyReason),
}

impl Conflict {
    /// A short, stable label for metrics: `pod_cidr`,
    /// `pod_and_service_cidr`, `shared_address`, `unusable_address` or
    /// `ignored_address`.
    pub fn label(&self) -> &'static str {
        match self {
            Conflict::PodCidr { .. } => "pod_cidr",
            Conflict::PodAndServiceCidr { .. } => "pod_and_service_cidr",
            Conflict::SharedAddress { .. } => "shared_address",
            Conflict::UnusableAddress { .. } => "unusable_address",
            Conflict::IgnoredAddress { .. } => "ignored_address",
        }
    }
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Conflict::PodCidr { cidr, nodes } => write!(
                f,
                "pod CIDR range {cidr} is claimed by nodes {}; routing it to none of them",
                join(nodes),
            ),
            Conflict::PodAndServiceCidr { cidr, node } => write!(
                f,
                "pod CIDR {cidr} of node {node} is also a service CIDR; routing it to node {node}"
            ),
            Conflict::SharedAddress { address, nodes } => write!(
                f,
                "address {address} is claimed by nodes {}; routing it to none of them",
                join(nodes),
            ),
            Conflict::UnusableAddress { node, address } => write!(
                f,
                "address {address:?} of node {node} is neither an IP address nor a valid DNS \
                 name; ignoring it"
            ),
            Conflict::IgnoredAddress { node, address, why } => {
                write!(f, "address {address} of node {node} ")?;
                match why {
                    IgnoredWhy::ServiceCidr(net) => write!(f, "is in service CIDR {net}")?,
                    IgnoredWhy::PodCidr { cidr, node } => {
                        write!(f, "is in pod CIDR {cidr} of node {node}")?
                    }
                    IgnoredWhy::Denied(reason) => write!(f, "is refused by policy ({reason})")?,
                }
                f.write_str("; it is not a node address: ignoring it")
            }
        }
    }
}

fn join(nodes: &[Arc<str>]) -> String {
    nodes.iter().map(|n| &**n).collect::<Vec<&str>>().join(", ")
}

/// The routing and policy indexes built from one node inventory and one
/// [`RoutingConfig`]. Immutable, `Send + Sync`, cheap to query.
pub struct Router {
    /// Node names, sorted.
    names: Vec<Arc<str>>,
    /// The address a route by name connects to, by index in `names`: the
    /// node's first usable IP address.
    dial_ips: Vec<Option<IpAddr>>,
    /// Node addresses and names that are IPv4 literals.
    claims_v4: FastMap<u32, Claim>,
    /// Node addresses and names that are IPv6 literals.
    claims_v6: FastMap<u128, Claim>,
    /// Node addresses and names that are DNS names, lowercase, no trailing dot.
    claims_name: HashMap<Box<str>, Claim>,
    /// SSH addresses that are not among their node's addresses (canonical:
    /// IPs as [`IpAddr`] prints them, names lowercase without a trailing
    /// dot), with (node, SSH port): denied at that port, never routed.
    ssh_only: HashMap<Box<str>, Vec<(Arc<str>, u16)>>,
    /// Pod and service CIDRs.
    routes: PrefixMap<Target>,
    /// Built-in denials, `deny_cidrs` and `allow_cidrs`.
    policy: PrefixMap<Policy>,
    /// `allow_ports`, sorted and deduplicated; empty allows every port.
    allow_ports: Box<[u16]>,
    /// `routing.default`.
    default: DefaultRoute,
    /// What [`Router::conflicts`] reports.
    conflicts: Vec<Conflict>,
}

/// The nodes that have one address or name.
#[derive(Debug)]
struct Claim {
    /// How the first node (by name) has it.
    rule: RouteRule,
    /// Every node that has it (index in `Router::names`, SSH port), sorted
    /// by name. More than one is a conflict: it routes to none.
    nodes: Vec<(usize, u16)>,
}

/// What a pod or service CIDR routes to.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    /// The node with this index in `Router::names`.
    Pod(usize),
    /// Several nodes' pod CIDRs cover this range (indexes in
    /// `Router::names`, sorted): routed to none.
    Contested(Vec<usize>),
    /// Any node.
    Service,
}

/// A policy entry.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Policy {
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
fn is_metadata_name(name: &str) -> bool {
    METADATA_NAMES
        .iter()
        .any(|m| name == *m || name.strip_suffix(m).is_some_and(|p| p.ends_with('.')))
        || (name.starts_with("instance-data.") && name.ends_with(".compute.internal"))
}

impl Router {
    /// Build the indexes for `nodes` and `config`. Never fails: addresses
    /// and pod CIDR ranges that several nodes claim route to none of them,
    /// and unusable or ignored addresses are skipped; all are reported by
    /// [`Router::conflicts`]. CIDRs with host bits set are truncated, and
    /// IPv4-mapped IPv6 CIDRs are treated as their IPv4 CIDR.
    pub fn new(nodes: &[RouteNode], config: &RoutingConfig) -> Router {
        let mut sorted: Vec<&RouteNode> = nodes.iter().collect();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        let names: Vec<Arc<str>> = sorted.iter().map(|n| Arc::from(n.name.as_str())).collect();
        let mut conflicts = Vec::new();

        let policy = build_policy(config);

        // Pod CIDRs: every range claimed by more than one node (identical
        // or nested CIDRs) is contested and routes to none of them.
        let mut pod_owners: BTreeMap<IpNet, Vec<usize>> = BTreeMap::new();
        for (index, node) in sorted.iter().enumerate() {
            for cidr in &node.pod_cidrs {
                let owners = pod_owners.entry(canonical_net(*cidr)).or_default();
                if !owners.contains(&index) {
                    owners.push(index);
                }
            }
        }
        let mut routes: PrefixMap<Target> = PrefixMap::default();
        for (net, owners) in &pod_owners {
            let mut claimants = owners.clone();
            for len in 0..net.prefix_len() {
                let wider = IpNet::new(net.addr(), len).map(|n| n.trunc());
                if let Some(wider_owners) = wider.ok().and_then(|w| pod_owners.get(&w)) {
                    for owner in wider_owners {
                        if !claimants.contains(owner) {
                            claimants.push(*owner);
                        }
                    }
                }
            }
            if claimants.len() == 1 {
                routes.insert(*net, Target::Pod(claimants[0]));
            } else {
                claimants.sort_unstable();
                conflicts.push(Conflict::PodCidr {
                    cidr: *net,
                    nodes: claimants
                        .iter()
                        .filter_map(|i| names.get(*i).cloned())
                        .collect(),
                });
                routes.insert(*net, Target::Contested(claimants));
            }
        }
        for cidr in &config.service_cidrs {
            let net = canonical_net(*cidr);
            match routes.get(net) {
                None => routes.insert(net, Target::Service),
                Some(Target::Pod(owner)) => {
                    if let Some(node) = names.get(*owner) {
                        let conflict = Conflict::PodAndServiceCidr {
                            cidr: net,
                            node: node.clone(),
                        };
                        if !conflicts.contains(&conflict) {
                            conflicts.push(conflict);
                        }
                    }
                }
                Some(Target::Contested(_) | Target::Service) => {}
            }
        }
        routes.finish();

        // Addresses and names. An IP address is a node address only if no
        // other rule owns it: not in a service CIDR, not in another node's
        // pod CIDR, not refused by the policy.
        let mut claims_v4: FastMap<u32, Claim> = FastMap::default();
        let mut claims_v6: FastMap<u128, Claim> = FastMap::default();
        let mut claims_name: HashMap<Box<str>, Claim> = HashMap::new();
        let mut ssh_only: HashMap<Box<str>, Vec<(Arc<str>, u16)>> = HashMap::new();
        // Each node's usable IP addresses in order: the first that no other
        // node claims is what a route by name connects to.
        let mut candidates: Vec<Vec<IpAddr>> = vec![Vec::new(); names.len()];
        for (index, (node, name)) in sorted.iter().zip(&names).enumerate() {
            let keys = node
                .addresses
                .iter()
                .map(|a| (a.as_str(), RouteRule::NodeAddress))
                .chain(std::iter::once((node.name.as_str(), RouteRule::NodeName)));
            for (key, rule) in keys {
                let claim = match Host::parse(key) {
                    Ok(Host::Ip(ip)) => {
                        if let Some(why) = ignored_address(ip, index, &routes, &policy, &names) {
                            conflicts.push(Conflict::IgnoredAddress {
                                node: name.clone(),
                                address: ip,
                                why,
                            });
                            continue;
                        }
                        if let Some(list) = candidates.get_mut(index) {
                            list.push(ip);
                        }
                        match ip {
                            IpAddr::V4(v4) => claims_v4
                                .entry(u32::from(v4))
                                .or_insert_with(|| Claim::new(rule)),
                            IpAddr::V6(v6) => claims_v6
                                .entry(u128::from(v6))
                                .or_insert_with(|| Claim::new(rule)),
                        }
                    }
                    Ok(Host::Name(n)) => claims_name
                        .entry(Box::from(n.as_str()))
                        .or_insert_with(|| Claim::new(rule)),
                    Err(_) => {
                        conflicts.push(Conflict::UnusableAddress {
                            node: name.clone(),
                            address: key.to_owned(),
                        });
                        continue;
                    }
                };
                claim.add(index, node.ssh_port);
            }

            if let Some(ssh_address) = &node.ssh_address {
                let key = host_key(ssh_address);
                let among_addresses = node
                    .addresses
                    .iter()
                    .any(|a| key.is_some() && host_key(a) == key);
                if let (Some(key), false) = (key, among_addresses) {
                    let entry = ssh_only.entry(key).or_default();
                    if !entry.iter().any(|(n, _)| Arc::ptr_eq(n, name)) {
                        entry.push((name.clone(), node.ssh_port));
                    }
                }
            }
        }

        let dial_ips: Vec<Option<IpAddr>> = candidates
            .iter()
            .map(|ips| {
                ips.iter().copied().find(|ip| {
                    let claim = match ip {
                        IpAddr::V4(v4) => claims_v4.get(&u32::from(*v4)),
                        IpAddr::V6(v6) => claims_v6.get(&u128::from(*v6)),
                    };
                    claim.is_some_and(|c| c.nodes.len() == 1)
                })
            })
            .collect();
        let mut shared: Vec<(String, &Claim)> = claims_v4
            .iter()
            .map(|(ip, claim)| (IpAddr::V4(Ipv4Addr::from(*ip)).to_string(), claim))
            .chain(
                claims_v6
                    .iter()
                    .map(|(ip, claim)| (IpAddr::V6(Ipv6Addr::from(*ip)).to_string(), claim)),
            )
            .chain(claims_name.iter().map(|(n, claim)| (n.to_string(), claim)))
            .filter(|(_, claim)| claim.nodes.len() > 1)
            .collect();
        shared.sort_by(|a, b| a.0.cmp(&b.0));
        conflicts.extend(shared.into_iter().map(|(address, claim)| {
            Conflict::SharedAddress {
                address,
                nodes: claim
                    .nodes
                    .iter()
                    .filter_map(|(i, _)| names.get(*i).cloned())
                    .collect(),
            }
        }));

        let mut allow_ports = config.allow_ports.clone();
        allow_ports.sort_unstable();
        allow_ports.dedup();

        claims_v4.shrink_to_fit();
        claims_v6.shrink_to_fit();
        claims_name.shrink_to_fit();
        ssh_only.shrink_to_fit();

        Router {
            names,
            dial_ips,
            claims_v4,
            claims_v6,
            claims_name,
            ssh_only,
            routes,
            policy,
            allow_ports: allow_ports.into_boxed_slice(),
            default: config.default,
            conflicts,
        }
    }

    /// Route `dest`. See the [module documentation](self) for the rules.
    ///
    /// # Errors
    ///
    /// [`RouteError::Denied`] when the policy refuses the destination,
    /// [`RouteError::Conflict`] when several nodes claim it,
    /// [`RouteError::NoRoute`] when no rule matches and `routing.default`
    /// is `deny`.
    pub fn route(&self, dest: &Destination) -> Result<Route, RouteError> {
        let port = dest.port;
        let deny = |reason: DenyReason| RouteError::Denied {
            dest: dest.clone(),
            reason,
        };
        match &dest.host {
            Host::Ip(ip) => {
                let ip = *ip;
                self.check_ip_policy(ip, dest.host.embedded_ipv4())
                    .map_err(deny)?;
                if !self.port_allowed(port) {
                    return Err(deny(DenyReason::Port(port)));
                }
                if !self.ssh_only.is_empty() {
                    self.deny_ssh_only(&ip.to_string(), port).map_err(deny)?;
                }
                let claim = match ip {
                    IpAddr::V4(v4) => self.claims_v4.get(&u32::from(v4)),
                    IpAddr::V6(v6) => self.claims_v6.get(&u128::from(v6)),
                };
                if let Some(claim) = claim {
                    return self.route_claim(claim, dest, false);
                }
                match self.routes.longest(ip) {
                    Some((net, Target::Pod(index))) => match self.names.get(*index) {
                        Some(node) => Ok(Route::Node {
                            node: node.clone(),
                            rule: RouteRule::PodCidr(*net),
                            connect_to: None,
                        }),
                        None => self.default_route_for(dest),
                    },
                    Some((net, Target::Contested(nodes))) => Err(RouteError::Conflict {
                        dest: dest.clone(),
                        claim: ClaimKind::PodCidr(*net),
                        nodes: self.names_of(nodes.iter().copied()),
                    }),
                    Some((net, Target::Service)) => Ok(Route::AnyNode {
                        rule: RouteRule::ServiceCidr(*net),
                    }),
                    None => self.default_route_for(dest),
                }
            }
            Host::Name(name) => {
                let name = name.as_str();
                if is_localhost_name(name) {
                    return Err(deny(DenyReason::LocalhostName));
                }
                if is_metadata_name(name) {
                    return Err(deny(DenyReason::CloudMetadata));
                }
                if !self.port_allowed(port) {
                    return Err(deny(DenyReason::Port(port)));
                }
                self.deny_ssh_only(name, port).map_err(deny)?;
                match self.claims_name.get(name) {
                    Some(claim) => self.route_claim(claim, dest, true),
                    None => self.default_route_for(dest),
                }
            }
        }
    }

    /// Deterministic choices and ignored entries made while building, to be
    /// logged as warnings: contested pod CIDR ranges, pod CIDRs that are
    /// also service CIDRs, addresses shared by several nodes, unusable and
    /// ignored addresses.
    pub fn conflicts(&self) -> &[Conflict] {
        &self.conflicts
    }

    /// The names of the nodes, sorted.
    pub fn node_names(&self) -> impl ExactSizeIterator<Item = &Arc<str>> + '_ {
        self.names.iter()
    }

    /// `routing.default` as configured.
    pub fn default_route(&self) -> DefaultRoute {
        self.default
    }

    /// The built-in denials, `deny_cidrs` and `allow_cidrs` for an IP
    /// destination, and for the IPv4 address an IPv6 destination leads to
    /// (unless `allow_cidrs` allows the IPv6 address itself).
    fn check_ip_policy(&self, ip: IpAddr, embedded: Option<Ipv4Addr>) -> Result<(), DenyReason> {
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

    /// The route for an address or name the nodes claim.
    fn route_claim(
        &self,
        claim: &Claim,
        dest: &Destination,
        by_name: bool,
    ) -> Result<Route, RouteError> {
        let port = dest.port;
        if let Some((index, _)) = claim.nodes.iter().find(|(_, ssh_port)| *ssh_port == port) {
            return Err(RouteError::Denied {
                dest: dest.clone(),
                reason: DenyReason::NodeSshPort {
                    node: self.names.get(*index).cloned().unwrap_or_default(),
                    port,
                },
            });
        }
        let [(index, _)] = claim.nodes[..] else {
            return Err(RouteError::Conflict {
                dest: dest.clone(),
                claim: ClaimKind::Address,
                nodes: self.names_of(claim.nodes.iter().map(|(i, _)| *i)),
            });
        };
        let node = self.names.get(index).cloned().unwrap_or_default();
        let connect_to = if by_name {
            match self.dial_ips.get(index).copied().flatten() {
                Some(ip) => Some(ip),
                None => {
                    return Err(RouteError::Denied {
                        dest: dest.clone(),
                        reason: DenyReason::NodeWithoutAddress { node },
                    })
                }
            }
        } else {
            None
        };
        Ok(Route::Node {
            node,
            rule: claim.rule.clone(),
            connect_to,
        })
    }

    fn names_of(&self, indexes: impl Iterator<Item = usize>) -> Vec<Arc<str>> {
        indexes.filter_map(|i| self.names.get(i).cloned()).collect()
    }

    /// The denial if `key` (canonical, see `ssh_only`) is a node's SSH
    /// address outside its addresses and `port` that node's SSH port.
    fn deny_ssh_only(&self, key: &str, port: u16) -> Result<(), DenyReason> {
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

    fn port_allowed(&self, port: u16) -> bool {
        self.allow_ports.is_empty() || self.allow_ports.binary_search(&port).is_ok()
    }

    fn default_route_for(&self, dest: &Destination) -> Result<Route, RouteError> {
        match self.default {
            DefaultRoute::Deny => Err(RouteError::NoRoute { dest: dest.clone() }),
            DefaultRoute::AnyNode => Ok(Route::AnyNode {
                rule: RouteRule::Default,
            }),
        }
    }
}

/// Built-in denials, then `deny_cidrs`, then `allow_cidrs` (on equal
/// prefix length allow wins).
fn build_policy(config: &RoutingConfig) -> PrefixMap<Policy> {
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

/// Why node `index`'s address `ip` cannot be a node address, if it cannot.
fn ignored_address(
    ip: IpAddr,
    index: usize,
    routes: &PrefixMap<Target>,
    policy: &PrefixMap<Policy>,
    names: &[Arc<str>],
) -> Option<IgnoredWhy> {
    if let Some((_, Policy::Deny(reason))) = policy.longest(ip) {
        return Some(IgnoredWhy::Denied(reason.clone()));
    }
    match routes.longest(ip) {
        Some((net, Target::Service)) => Some(IgnoredWhy::ServiceCidr(*net)),
        Some((net, Target::Pod(owner))) if *owner != index => Some(IgnoredWhy::PodCidr {
            cidr: *net,
            node: names.get(*owner).cloned().unwrap_or_default(),
        }),
        Some((net, Target::Contested(owners))) => {
            let other = owners.iter().find(|o| **o != index)?;
            Some(IgnoredWhy::PodCidr {
                cidr: *net,
                node: names.get(*other).cloned().unwrap_or_default(),
            })
        }
        _ => None,
    }
}

impl Default for Router {
    /// A router with no nodes and the default configuration: it denies
    /// everything.
    fn default() -> Router {
        Router::new(&[], &RoutingConfig::default())
    }
}

impl fmt::Debug for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Router")
            .field("nodes", &self.names.len())
            .field(
                "addresses",
                &(self.claims_v4.len() + self.claims_v6.len() + self.claims_name.len()),
            )
            .field("cidrs", &self.routes.len())
            .field("policy_cidrs", &self.policy.len())
            .field("allow_ports", &self.allow_ports)
            .field("default", &self.default)
            .field("conflicts", &self.conflicts.len())
            .finish()
    }
}

impl Claim {
    fn new(rule: RouteRule) -> Claim {
        Claim {
            rule,
            nodes: Vec::new(),
        }
    }

    /// Record that node `index` has this address too (nodes come sorted
    /// by name).
    fn add(&mut self, index: usize, ssh_port: u16) {
        if !self.nodes.iter().any(|(i, _)| *i == index) {
            self.nodes.push((index, ssh_port));
        }
    }
}

/// `host` in the canonical form `ssh_only` is keyed by, if it is a host.
fn host_key(host: &str) -> Option<Box<str>> {
    match Host::parse(host).ok()? {
        Host::Ip(ip) => Some(ip.to_string().into_boxed_str()),
        Host::Name(name) => Some(Box::from(name.as_str())),
    }
}

/// `localhost`, `*.localhost` and the other names [`LOCALHOST_NAMES`] lists;
/// `name` is already lowercase without a trailing dot.
fn is_localhost_name(name: &str) -> bool {
    name == "localhost" || name.ends_with(".localhost") || LOCALHOST_NAMES.contains(&name)
}

/// Host bits cleared; an IPv4-mapped IPv6 CIDR (`::ffff:10.0.0.0/104`)
/// becomes its IPv4 CIDR.
fn canonical_net(net: IpNet) -> IpNet {
    let net = net.trunc();
    if let IpNet::V6(v6) = net {
        if let Some(len) = v6.prefix_len().checked_sub(96) {
            if let Some(v4) = v6.network().to_ipv4_mapped() {
                if let Ok(v4net) = Ipv4Net::new(v4, len) {
                    return IpNet::V4(v4net);
                }
            }
        }
    }
    net
}

/// A hash map with [`FastHasher`].
type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;

/// A multiply-rotate hasher for the integer keys of the router's maps. The
/// keys come from the inventory and the configuration, never from clients,
/// so it needs no protection against chosen collisions; it folds the high
/// bits into the low ones so that keys differing only in their upper bytes
/// (network prefixes) spread over the buckets.
#[derive(Clone, Copy, Debug, Default)]
struct FastHasher(u64);

impl FastHasher {
    const MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;

    fn mix(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(26) ^ word).wrapping_mul(Self::MULTIPLIER);
    }
}

impl Hasher for FastHasher {
    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 32)
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            for (dst, src) in word.iter_mut().zip(chunk) {
                *dst = *src;
            }
            self.mix(u64::from_le_bytes(word));
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.mix(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.mix(n);
    }

    fn write_u128(&mut self, n: u128) {
        // Low 64 bits, then high 64 bits.
        self.mix(n as u64);
        self.mix((n >> 64) as u64);
    }
}

/// An address as an unsigned integer that can be masked to a prefix.
trait PrefixKey: Copy + Eq + Hash {
    /// Address length in bits.
    const BITS: u8;
    /// The first `len` bits, the rest cleared.
    fn masked(self, len: u8) -> Self;
}

impl PrefixKey for u32 {
    const BITS: u8 = 32;
    fn masked(self, len: u8) -> u32 {
        self & u32::MAX
            .checked_shl(u32::from(<Self as PrefixKey>::BITS.saturating_sub(len)))
            .unwrap_or(0)
    }
}

impl PrefixKey for u128 {
    const BITS: u8 = 128;
    fn masked(self, len: u8) -> u128 {
        self & u128::MAX
            .checked_shl(u32::from(<Self as PrefixKey>::BITS.saturating_sub(len)))
            .unwrap_or(0)
    }
}

/// Prefixes of one address family: one hash map per prefix length, probed
/// from the longest length present to the shortest.
struct LenTable<K, V> {
    /// Indexed by prefix length; keys are masked network addresses.
    maps: Vec<FastMap<K, (IpNet, V)>>,
    /// The lengths whose map is not empty, longest first.
    lens: Vec<u8>,
}

impl<K: PrefixKey, V> Default for LenTable<K, V> {
    fn default() -> Self {
        LenTable {
            maps: (0..=K::BITS).map(|_| FastMap::default()).collect(),
            lens: Vec::new(),
        }
    }
}

impl<K: PrefixKey, V> LenTable<K, V> {
    fn get(&self, key: K, len: u8) -> Option<&V> {
        self.maps
            .get(usize::from(len))?
            .get(&key.masked(len))
            .map(|(_, v)| v)
    }

    fn insert(&mut self, key: K, len: u8, net: IpNet, value: V) {
        if let Some(map) = self.maps.get_mut(usize::from(len)) {
            map.insert(key.masked(len), (net, value));
        }
    }

    fn finish(&mut self) {
        for map in &mut self.maps {
            map.shrink_to_fit();
        }
        self.lens = (0..=K::BITS)
            .rev()
            .filter(|len| {
                self.maps
                    .get(usize::from(*len))
                    .is_some_and(|map| !map.is_empty())
            })
            .collect();
    }

    fn longest(&self, addr: K) -> Option<(&IpNet, &V)> {
        self.lens.iter().find_map(|len| {
            self.maps
                .get(usize::from(*len))?
                .get(&addr.masked(*len))
                .map(|(net, v)| (net, v))
        })
    }

    fn len(&self) -> usize {
        self.maps.iter().map(HashMap::len).sum()
    }
}

/// A longest-prefix-match table over both address families. Insert canonical
/// networks (see [`canonical_net`]), then call [`PrefixMap::finish`] before
/// looking up.
struct PrefixMap<V> {
    v4: LenTable<u32, V>,
    v6: LenTable<u128, V>,
}

impl<V> Default for PrefixMap<V> {
    fn default() -> Self {
        PrefixMap {
            v4: LenTable::default(),
            v6: LenTable::default(),
        }
    }
}

impl<V> PrefixMap<V> {
    /// The value stored for exactly `net`.
    fn get(&self, net: IpNet) -> Option<&V> {
        match net {
            IpNet::V4(n) => self.v4.get(u32::from(n.network()), n.prefix_len()),
            IpNet::V6(n) => self.v6.get(u128::from(n.network()), n.prefix_len()),
        }
    }

    /// Store `value` for `net`, replacing what was there.
    fn insert(&mut self, net: IpNet, value: V) {
        match net {
            IpNet::V4(n) => self
                .v4
                .insert(u32::from(n.network()), n.prefix_len(), net, value),
            IpNet::V6(n) => self
                .v6
                .insert(u128::from(n.network()), n.prefix_len(), net, value),
        }
    }

    /// Index the prefix lengths present; call after the last insert.
    fn finish(&mut self) {
        self.v4.finish();
        self.v6.finish();
    }

    /// The longest prefix containing `ip`, and its value.
    fn longest(&self, ip: IpAddr) -> Option<(&IpNet, &V)> {
        match ip {
            IpAddr::V4(a) => self.v4.longest(u32::from(a)),
            IpAddr::V6(a) => self.v6.longest(u128::from(a)),
        }
    }

    /// How many prefixes it holds.
    fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tests write destinations as text; the front door parses them the
    /// same way ([`Host::parse`]).
    trait RouteText {
        fn route_str(&self, host: &str, port: u16) -> Result<Route, RouteError>;
    }

    impl RouteText for Router {
        fn route_str(&self, host: &str, port: u16) -> Result<Route, RouteError> {
            let host = Host::parse(host).unwrap_or_else(|e| panic!("test host {host:?}: {e}"));
            self.route(&Destination::new(host, port))
        }
    }

    fn dest(host: &str, port: u16) -> Destination {
        Destination::new(Host::parse(host).expect("test host"), port)
    }

    fn net(s: &str) -> IpNet {
        s.parse().expect("test CIDR")
    }

    fn node(name: &str, addresses: &[&str], pod_cidrs: &[&str], ssh_port: u16) -> RouteNode {
        RouteNode {
            name: name.to_owned(),
            addresses: addresses.iter().map(|a| (*a).to_owned()).collect(),
            pod_cidrs: pod_cidrs.iter().map(|c| net(c)).collect(),
            ssh_port,
            ssh_address: None,
        }
    }

    fn config(service_cidrs: &[&str], default: DefaultRoute) -> RoutingConfig {
        RoutingConfig {
            service_cidrs: service_cidrs.iter().map(|c| net(c)).collect(),
            default,
            ..RoutingConfig::default()
        }
    }

    fn to_node(node: &str, rule: RouteRule) -> Result<Route, RouteError> {
        Ok(Route::Node {
            node: Arc::from(node),
            rule,
            connect_to: None,
        })
    }

    /// A route chosen by a name, connecting to the node's address `ip`.
    fn to_node_at(node: &str, rule: RouteRule, ip: &str) -> Result<Route, RouteError> {
        Ok(Route::Node {
            node: Arc::from(node),
            rule,
            connect_to: Some(ip.parse().expect("test IP")),
        })
    }

    fn any_node(rule: RouteRule) -> Result<Route, RouteError> {
        Ok(Route::AnyNode { rule })
    }

    fn reason(result: Result<Route, RouteError>) -> Option<DenyReason> {
        result.err().and_then(|e| e.deny_reason().cloned())
    }

    /// An open router: default any-node, no nodes.
    fn open() -> Router {
        Router::new(&[], &config(&[], DefaultRoute::AnyNode))
    }

    fn cluster() -> Router {
        let nodes = [
            node(
                "w2",
                &["10.0.0.2", "w2.example.com"],
                &["10.244.2.0/24"],
                22,
            ),
            node(
                "w1",
                &["10.0.0.1", "W1.Example.COM.", "2001:DB8::0:1"],
                &["10.244.1.0/24", "fd00:10:244:1::/64"],
                22,
            ),
            node("w3", &["10.0.0.3"], &["10.244.3.0/24"], 2222),
        ];
        Router::new(&nodes, &config(&["10.96.0.0/12"], DefaultRoute::Deny))
    }

    #[test]
    fn router_is_send_sync_and_default_denies() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Router>();
        let router = Router::default();
        assert_eq!(
            router.route_str("10.0.0.1", 80),
            Err(RouteError::NoRoute {
                dest: dest("10.0.0.1", 80),
            })
        );
        assert_eq!(router.default_route(), DefaultRoute::Deny);
        assert!(format!("{router:?}").starts_with("Router"));
    }

    #[test]
    fn config_deserializes_with_defaults_and_rejects_unknown_keys() {
        let empty: RoutingConfig = toml::from_str("").expect("empty table");
        assert_eq!(empty, RoutingConfig::default());
        assert_eq!(empty.default, DefaultRoute::Deny);
        let full: RoutingConfig = toml::from_str(
            r#"
            service_cidrs = ["10.96.0.0/12", "fd00:96::/108"]
            default = "any-node"
            allow_ports = [443, 10250]
            deny_cidrs = ["10.0.0.0/8"]
            allow_cidrs = ["169.254.169.254/32"]
            "#,
        )
        .expect("full table");
        assert_eq!(full.default, DefaultRoute::AnyNode);
        assert_eq!(full.allow_ports, vec![443, 10250]);
        assert_eq!(full.service_cidrs.len(), 2);
        assert!(toml::from_str::<RoutingConfig>("defualt = \"deny\"").is_err());
        assert!(toml::from_str::<RoutingConfig>("default = \"any_node\"").is_err());
        assert_eq!(DefaultRoute::AnyNode.to_string(), "any-node");
        assert_eq!(DefaultRoute::Deny.to_string(), "deny");
    }

    #[test]
    fn validate_reports_key_and_reason() {
        assert_eq!(RoutingConfig::default().validate(), Ok(()));
        let port0 = RoutingConfig {
            allow_ports: vec![443, 0],
            ..RoutingConfig::default()
        };
        let (key, why) = port0.validate().expect_err("port 0");
        assert_eq!(key, "allow_ports");
        assert!(why.contains("port 0"), "{why}");

        let host_bits = RoutingConfig {
            service_cidrs: vec![net("10.96.0.1/12")],
            ..RoutingConfig::default()
        };
        let (key, why) = host_bits.validate().expect_err("host bits");
        assert_eq!(key, "service_cidrs");
        assert!(why.contains("10.96.0.0/12"), "{why}");

        let both = RoutingConfig {
            deny_cidrs: vec![net("::ffff:10.0.0.0/104")],
            allow_cidrs: vec![net("10.0.0.0/8")],
            ..RoutingConfig::default()
        };
        assert_eq!(both.validate().expect_err("both").0, "allow_cidrs");
    }

    #[test]
    fn builtin_denials_ipv4_ipv6_and_mapped() {
        let router = open();
        let cases: &[(&str, DenyReason)] = &[
            ("127.0.0.1", DenyReason::Loopback),
            ("127.255.255.254", DenyReason::Loopback),
            ("::1", DenyReason::Loopback),
            ("0:0:0:0:0:0:0:1", DenyReason::Loopback),
            ("::ffff:127.0.0.1", DenyReason::Loopback),
            ("::FFFF:7f00:1", DenyReason::Loopback),
            ("169.254.169.254", DenyReason::LinkLocal),
            ("169.254.0.1", DenyReason::LinkLocal),
            ("::ffff:169.254.169.254", DenyReason::LinkLocal),
            ("fe80::1", DenyReason::LinkLocal),
            ("febf:ffff::1", DenyReason::LinkLocal),
            ("0.0.0.0", DenyReason::Unspecified),
            ("::", DenyReason::Unspecified),
            ("::ffff:0.0.0.0", DenyReason::Unspecified),
            ("224.0.0.1", DenyReason::Multicast),
            ("239.255.255.250", DenyReason::Multicast),
            ("ff02::1", DenyReason::Multicast),
            ("fd00:ec2::254", DenyReason::CloudMetadata),
        ];
        for (host, want) in cases {
            assert_eq!(
                reason(router.route_str(host, 80)).as_ref(),
                Some(want),
                "{host}"
            );
        }
        // Neighbours of the denied ranges are routed.
        for host in [
            "126.255.255.255",
            "128.0.0.0",
            "169.253.255.255",
            "169.255.0.0",
            "0.0.0.1",
            "223.255.255.255",
            "240.0.0.1",
            "fec0::1",
            "::2",
            "fd00:ec2::253",
            "2001:db8::1",
        ] {
            assert_eq!(
                router.route_str(host, 80),
                any_node(RouteRule::Default),
                "{host}"
            );
        }
    }

    #[test]
    fn cidrs_are_canonicalised() {
        let nodes = [RouteNode {
            name: "n".to_owned(),
            addresses: Vec::new(),
            pod_cidrs: vec![net("10.244.1.77/24"), net("::ffff:10.245.0.0/112")],
            ssh_port: 22,
            ssh_address: None,
        }];
        let router = Router::new(&nodes, &RoutingConfig::default());
        assert_eq!(
            router.route_str("10.244.1.1", 80),
            to_node("n", RouteRule::PodCidr(net("10.244.1.0/24")))
        );
        assert_eq!(
            router.route_str("10.245.0.1", 80),
            to_node("n", RouteRule::PodCidr(net("10.245.0.0/16")))
        );
        assert_eq!(canonical_net(net("::ffff:0:0/96")), net("0.0.0.0/0"));
        assert_eq!(canonical_net(net("::ffff:0:0/95")), net("::fffe:0:0/95"));
    }

    #[test]
    fn legacy_ipv4_numbers_never_reach_the_router() {
        // The node's resolver reads these as addresses (inet_aton); the
        // front door refuses them, so the router never has to guess.
        for host in [
            "127.1",
            "127.0.1",
            "2130706433",
            "0x7f000001",
            "0X7F000001",
            "017700000001",
            "0177.0.0.1",
            "0x7f.0x0.0x0.0x1",
            "127.0.0.1.",
            "127.1.",
            "0",
            "0xa9fea9fe",
        ] {
            assert_eq!(
                Host::parse(host),
                Err(crate::destination::HostError::AmbiguousNumeric),
                "{host}"
            );
        }
        // A node address written that way is unusable, not a claim.
        let router = Router::new(
            &[node("n1", &["10.1"], &[], 22)],
            &config(&[], DefaultRoute::Deny),
        );
        assert_eq!(
            router.conflicts(),
            &[Conflict::UnusableAddress {
                node: Arc::from("n1"),
                address: "10.1".into()
            }]
        );
    }

    #[test]
    fn localhost_and_metadata_names_are_denied() {
        let router = open();
        for host in [
            "localhost",
            "LOCALHOST",
            "localhost.",
            "foo.localhost",
            "a.b.LocalHost.",
            "localhost.localdomain",
            "ip6-localhost",
            "localhost6",
        ] {
            assert_eq!(
                reason(router.route_str(host, 80)),
                Some(DenyReason::LocalhostName),
                "{host}"
            );
        }
        for host in [
            "metadata.google.internal",
            "Metadata.Google.Internal.",
            "metadata",
        ] {
            assert_eq!(
                reason(router.route_str(host, 80)),
                Some(DenyReason::CloudMetadata),
                "{host}"
            );
        }
        for host in [
            "localhostx",
            "notlocalhost",
            "localhost.example.com",
            "metadata.example",
        ] {
            assert_eq!(
                router.route_str(host, 80),
                any_node(RouteRule::Default),
                "{host}"
            );
        }
        // allow_cidrs cannot re-allow a name.
        let allow_all = RoutingConfig {
            allow_cidrs: vec![net("0.0.0.0/0"), net("::/0")],
            default: DefaultRoute::AnyNode,
            ..RoutingConfig::default()
        };
        let router = Router::new(&[], &allow_all);
        assert_eq!(
            reason(router.route_str("localhost", 80)),
            Some(DenyReason::LocalhostName)
        );
        // ... nor does a /0 override the more specific built-in denials.
        assert_eq!(
            reason(router.route_str("127.0.0.1", 80)),
            Some(DenyReason::Loopback)
        );
    }

    #[test]
    fn invalid_hosts_never_reach_the_router() {
        let long = "a".repeat(300);
        for host in [
            "",
            ".",
            "a..b",
            ".a",
            "[::1]",
            "foo bar",
            "foo/bar",
            "::1%",
            "fe80::1%eth 0",
            "x:y",
            "1.2.3.4:80",
            "ex\u{e4}mple.com",
            "evil\r\nhost",
            long.as_str(),
        ] {
            assert!(Host::parse(host).is_err(), "{host:?}");
        }
        let label = format!("{}.example", "a".repeat(64));
        assert!(Host::parse(&label).is_err());
        assert_eq!(
            open().route_str("under_score.example", 80),
            any_node(RouteRule::Default)
        );
    }

    #[test]
    fn deny_and_allow_cidrs_most_specific_wins_and_allow_wins_ties() {
        let cfg = RoutingConfig {
            default: DefaultRoute::AnyNode,
            deny_cidrs: vec![
                net("10.0.0.0/8"),
                net("10.1.2.0/24"),
                net("::ffff:192.168.0.0/112"),
                net("fd00::/8"),
                net("127.0.0.0/8"),
            ],
            allow_cidrs: vec![
                net("10.1.0.0/16"),
                net("169.254.169.254/32"),
                net("127.0.0.0/8"),
                net("fd00:1::/32"),
            ],
            ..RoutingConfig::default()
        };
        let router = Router::new(&[], &cfg);
        assert_eq!(
            reason(router.route_str("10.2.0.1", 80)),
            Some(DenyReason::DenyCidr(net("10.0.0.0/8")))
        );
        assert_eq!(
            router.route_str("10.1.3.4", 80),
            any_node(RouteRule::Default)
        );
        assert_eq!(
            reason(router.route_str("10.1.2.3", 80)),
            Some(DenyReason::DenyCidr(net("10.1.2.0/24")))
        );
        assert_eq!(
            reason(router.route_str("::ffff:10.9.9.9", 80)),
            Some(DenyReason::DenyCidr(net("10.0.0.0/8")))
        );
        // A mapped deny CIDR is its IPv4 CIDR.
        assert_eq!(
            reason(router.route_str("192.168.3.4", 80)),
            Some(DenyReason::DenyCidr(net("192.168.0.0/16")))
        );
        assert_eq!(
            router.route_str("169.254.169.254", 80),
            any_node(RouteRule::Default)
        );
        assert_eq!(
            reason(router.route_str("169.254.169.253", 80)),
            Some(DenyReason::LinkLocal)
        );
        // Equal length: allow wins over built-in and deny_cidrs alike.
        assert_eq!(
            router.route_str("127.0.0.1", 80),
            any_node(RouteRule::Default)
        );
        assert_eq!(
            reason(router.route_str("fd00::1", 80)),
            Some(DenyReason::DenyCidr(net("fd00::/8")))
        );
        assert_eq!(
            router.route_str("fd00:1::1", 80),
            any_node(RouteRule::Default)
        );
        // Policy comes before node routing.
        let nodes = [node("n1", &["10.2.0.1"], &[], 22)];
        let router = Router::new(&nodes, &cfg);
        assert_eq!(
            reason(router.route_str("10.2.0.1", 80)),
            Some(DenyReason::DenyCidr(net("10.0.0.0/8")))
        );
        assert_eq!(
            reason(router.route_str("n1", 22)),
            Some(DenyReason::NodeSshPort {
                node: Arc::from("n1"),
                port: 22
            })
        );
    }

    #[test]
    fn allow_ports() {
        let cfg = RoutingConfig {
            default: DefaultRoute::AnyNode,
            allow_ports: vec![10250, 443, 443],
            ..RoutingConfig::default()
        };
        let nodes = [node("n1", &["10.0.0.1"], &["10.244.0.0/24"], 22)];
        let router = Router::new(&nodes, &cfg);
        assert_eq!(
            router.route_str("10.0.0.1", 10250),
            to_node("n1", RouteRule::NodeAddress)
        );
        assert_eq!(
            router.route_str("example.com", 443),
            any_node(RouteRule::Default)
        );
        for host in ["10.0.0.1", "n1", "10.244.0.5", "example.com", "192.0.2.1"] {
            assert_eq!(
                reason(router.route_str(host, 80)),
                Some(DenyReason::Port(80)),
                "{host}"
            );
        }
        // The port denial of the SSH port comes first when 22 is not allowed.
        assert_eq!(
            reason(router.route_str("n1", 22)),
            Some(DenyReason::Port(22))
        );
        // Empty allows every port.
        let router = open();
        for port in [1, 22, 80, 65535] {
            assert!(router.route_str("192.0.2.1", port).is_ok());
        }
    }

    #[test]
    fn node_ssh_port_is_denied_by_address_and_name_only() {
        let router = cluster();
        let ssh = |node: &str, port| {
            Some(DenyReason::NodeSshPort {
                node: Arc::from(node),
                port,
            })
        };
        assert_eq!(reason(router.route_str("10.0.0.1", 22)), ssh("w1", 22));
        assert_eq!(reason(router.route_str("w1", 22)), ssh("w1", 22));
        assert_eq!(
            reason(router.route_str("W1.example.com.", 22)),
            ssh("w1", 22)
        );
        assert_eq!(reason(router.route_str("2001:db8::1", 22)), ssh("w1", 22));
        assert_eq!(
            reason(router.route_str("::ffff:10.0.0.1", 22)),
            ssh("w1", 22)
        );
        assert_eq!(reason(router.route_str("10.0.0.3", 2222)), ssh("w3", 2222));
        assert_eq!(
            router.route_str("10.0.0.3", 22),
            to_node("w3", RouteRule::NodeAddress)
        );
        // A pod or service IP at port 22 is not a node's sshd.
        assert_eq!(
            router.route_str("10.244.1.9", 22),
            to_node("w1", RouteRule::PodCidr(net("10.244.1.0/24")))
        );
        assert!(router.route_str("10.96.0.1", 22).is_ok());
    }

    #[test]
    fn node_addresses_and_names() {
        let router = cluster();
        assert_eq!(
            router.route_str("10.0.0.1", 10250),
            to_node("w1", RouteRule::NodeAddress)
        );
        assert_eq!(
            router.route_str("::ffff:10.0.0.2", 10250),
            to_node("w2", RouteRule::NodeAddress)
        );
        assert_eq!(
            router.route_str("2001:0db8:0:0::1", 10250),
            to_node("w1", RouteRule::NodeAddress)
        );
        // Routes chosen by a name connect to the node's first address.
        assert_eq!(
            router.route_str("w1.example.com", 10250),
            to_node_at("w1", RouteRule::NodeAddress, "10.0.0.1")
        );
        assert_eq!(
            router.route_str("W2.EXAMPLE.COM.", 10250),
            to_node_at("w2", RouteRule::NodeAddress, "10.0.0.2")
        );
        assert_eq!(
            router.route_str("w3", 10250),
            to_node_at("w3", RouteRule::NodeName, "10.0.0.3")
        );
        assert_eq!(
            router.route_str("W3.", 10250),
            to_node_at("w3", RouteRule::NodeName, "10.0.0.3")
        );
        assert_eq!(
            router.route_str("w4", 10250),
            Err(RouteError::NoRoute {
                dest: dest("w4", 10250),
            })
        );
        let names: Vec<&str> = router.node_names().map(|n| &**n).collect();
        assert_eq!(names, ["w1", "w2", "w3"]);
        assert!(router.conflicts().is_empty(), "{:?}", router.conflicts());

        // A node named by its IP.
        let router = Router::new(&[node("10.0.0.9", &[], &[], 22)], &RoutingConfig::default());
        assert_eq!(
            router.route_str("10.0.0.9", 80),
            to_node("10.0.0.9", RouteRule::NodeName)
        );
    }

    #[test]
    fn pod_and_service_cidrs_longest_prefix_both_ways() {
        let nodes = [
            node("a", &[], &["10.96.5.0/24", "10.244.0.0/16"], 22),
            node("b", &[], &["10.244.7.0/24", "fd00:244::/64"], 22),
        ];
        let router = Router::new(
            &nodes,
            &config(
                &["10.96.0.0/12", "10.244.7.128/25", "fd00:96::/108"],
                DefaultRoute::Deny,
            ),
        );
        // A pod /24 inside a service /12 goes to the node.
        assert_eq!(
            router.route_str("10.96.5.7", 80),
            to_node("a", RouteRule::PodCidr(net("10.96.5.0/24")))
        );
        assert_eq!(
            router.route_str("10.96.6.7", 80),
            any_node(RouteRule::ServiceCidr(net("10.96.0.0/12")))
        );
        // A node's /24 inside another node's /16: the overlapped range
        // goes to neither, the rest of the /16 to its node.
        assert_eq!(
            router.route_str("10.244.7.1", 80),
            Err(RouteError::Conflict {
                dest: dest("10.244.7.1", 80),
                claim: ClaimKind::PodCidr(net("10.244.7.0/24")),
                nodes: vec![Arc::from("a"), Arc::from("b")],
            })
        );
        assert_eq!(
            router.route_str("10.244.8.1", 80),
            to_node("a", RouteRule::PodCidr(net("10.244.0.0/16")))
        );
        // A more specific service CIDR inside a pod CIDR goes to any node.
        assert_eq!(
            router.route_str("10.244.7.200", 80),
            any_node(RouteRule::ServiceCidr(net("10.244.7.128/25")))
        );
        assert_eq!(
            router.route_str("fd00:244::5", 80),
            to_node("b", RouteRule::PodCidr(net("fd00:244::/64")))
        );
        assert_eq!(
            router.route_str("fd00:96::1", 80),
            any_node(RouteRule::ServiceCidr(net("fd00:96::/108")))
        );
        assert_eq!(
            router.route_str("::ffff:10.96.6.7", 80),
            any_node(RouteRule::ServiceCidr(net("10.96.0.0/12")))
        );
        assert_eq!(
            router.route_str("fd00:245::1", 80),
            Err(RouteError::NoRoute {
                dest: dest("fd00:245::1", 80),
            })
        );
        // DNS names never match CIDRs.
        assert_eq!(
            router.route_str("svc.ns.svc.cluster.local", 80),
            Err(RouteError::NoRoute {
                dest: dest("svc.ns.svc.cluster.local", 80),
            })
        );
    }

    #[test]
    fn claimed_twice_routes_to_none_and_is_reported() {
        let nodes = [
            node("zeta", &["10.0.0.1"], &["10.244.1.0/24"], 22),
            node(
                "alpha",
                &["10.0.0.1"],
                &["10.244.1.7/24", "10.244.9.0/24"],
                2222,
            ),
            node(
                "mid",
                &["bad host"],
                &["10.244.1.0/24", "10.244.9.0/24", "10.244.20.0/24"],
                22,
            ),
        ];
        let router = Router::new(&nodes, &config(&["10.244.20.0/24"], DefaultRoute::Deny));
        let names = |list: &[&str]| list.iter().map(|n| Arc::from(*n)).collect::<Vec<_>>();
        assert_eq!(
            router.route_str("10.244.1.1", 80),
            Err(RouteError::Conflict {
                dest: dest("10.244.1.1", 80),
                claim: ClaimKind::PodCidr(net("10.244.1.0/24")),
                nodes: names(&["alpha", "mid", "zeta"]),
            })
        );
        assert_eq!(
            router.route_str("10.244.9.1", 80),
            Err(RouteError::Conflict {
                dest: dest("10.244.9.1", 80),
                claim: ClaimKind::PodCidr(net("10.244.9.0/24")),
                nodes: names(&["alpha", "mid"]),
            })
        );
        let err = router.route_str("10.0.0.1", 80).expect_err("conflict");
        assert_eq!(
            err,
            RouteError::Conflict {
                dest: dest("10.0.0.1", 80),
                claim: ClaimKind::Address,
                nodes: names(&["alpha", "zeta"]),
            }
        );
        assert_eq!(
            err.to_string(),
            "10.0.0.1 is claimed by nodes alpha, zeta (as a node address or name); it is routed \
             to none of them until the conflict is resolved"
        );
        assert_eq!(err.label(), "conflict");
        // Every claimant's SSH port is still denied.
        for port in [22, 2222] {
            assert!(matches!(
                reason(router.route_str("10.0.0.1", port)),
                Some(DenyReason::NodeSshPort { .. })
            ));
        }
        let conflicts = router.conflicts();
        assert!(conflicts.contains(&Conflict::PodCidr {
            cidr: net("10.244.1.0/24"),
            nodes: names(&["alpha", "mid", "zeta"]),
        }));
        assert!(conflicts.contains(&Conflict::PodCidr {
            cidr: net("10.244.9.0/24"),
            nodes: names(&["alpha", "mid"]),
        }));
        assert!(conflicts.contains(&Conflict::PodAndServiceCidr {
            cidr: net("10.244.20.0/24"),
            node: Arc::from("mid"),
        }));
        assert!(conflicts.contains(&Conflict::SharedAddress {
            address: "10.0.0.1".to_owned(),
            nodes: names(&["alpha", "zeta"]),
        }));
        assert!(conflicts.contains(&Conflict::UnusableAddress {
            node: Arc::from("mid"),
            address: "bad host".to_owned(),
        }));
        assert_eq!(conflicts.len(), 5, "{conflicts:?}");
        for conflict in conflicts {
            let text = conflict.to_string();
            assert!(!text.contains('\n'), "{text}");
        }
        assert_eq!(
            conflicts
                .iter()
                .find(|c| c.label() == "shared_address")
                .map(ToString::to_string)
                .as_deref(),
            Some("address 10.0.0.1 is claimed by nodes alpha, zeta; routing it to none of them")
        );
    }

    /// A compromised node controls its own Node object: whatever it adds
    /// to its addresses, it gets no traffic that another rule owns.
    #[test]
    fn a_node_cannot_claim_services_other_nodes_or_denied_addresses() {
        let nodes = [
            node("good", &["10.0.0.1"], &["10.244.1.0/24"], 22),
            node(
                "evil",
                &[
                    "10.0.0.2",
                    "10.96.0.10",
                    "10.244.1.5",
                    "127.0.0.1",
                    "169.254.169.254",
                    "100.100.100.200",
                    "10.99.0.1",
                    "10.244.2.9",
                ],
                &["10.244.2.0/24"],
                22,
            ),
        ];
        let cfg = RoutingConfig {
            deny_cidrs: vec![net("10.99.0.0/16")],
            ..config(&["10.96.0.0/12"], DefaultRoute::Deny)
        };
        let router = Router::new(&nodes, &cfg);
        // A ClusterIP stays a service, another node's pod stays its pod.
        assert_eq!(
            router.route_str("10.96.0.10", 443),
            any_node(RouteRule::ServiceCidr(net("10.96.0.0/12")))
        );
        assert_eq!(
            router.route_str("10.244.1.5", 8080),
            to_node("good", RouteRule::PodCidr(net("10.244.1.0/24")))
        );
        // Denied addresses stay denied.
        assert_eq!(
            reason(router.route_str("127.0.0.1", 10250)),
            Some(DenyReason::Loopback)
        );
        assert_eq!(
            reason(router.route_str("169.254.169.254", 80)),
            Some(DenyReason::LinkLocal)
        );
        assert_eq!(
            reason(router.route_str("100.100.100.200", 80)),
            Some(DenyReason::CloudMetadata)
        );
        assert_eq!(
            reason(router.route_str("10.99.0.1", 80)),
            Some(DenyReason::DenyCidr(net("10.99.0.0/16")))
        );
        // Its own address and its own pod CIDR are still its own.
        assert_eq!(
            router.route_str("10.0.0.2", 10250),
            to_node("evil", RouteRule::NodeAddress)
        );
        assert_eq!(
            router.route_str("10.244.2.9", 10250),
            to_node("evil", RouteRule::NodeAddress)
        );
        let ignored: Vec<String> = router
            .conflicts()
            .iter()
            .filter(|c| c.label() == "ignored_address")
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            ignored,
            [
                "address 10.96.0.10 of node evil is in service CIDR 10.96.0.0/12; it is not a node \
                 address: ignoring it",
                "address 10.244.1.5 of node evil is in pod CIDR 10.244.1.0/24 of node good; it is \
                 not a node address: ignoring it",
                "address 127.0.0.1 of node evil is refused by policy (loopback address); it is not \
                 a node address: ignoring it",
                "address 169.254.169.254 of node evil is refused by policy (link-local address); \
                 it is not a node address: ignoring it",
                "address 100.100.100.200 of node evil is refused by policy (cloud metadata \
                 endpoint); it is not a node address: ignoring it",
                "address 10.99.0.1 of node evil is refused by policy (in routing.deny_cidrs \
                 10.99.0.0/16); it is not a node address: ignoring it",
            ]
        );
        // An ignored address is not the address a name connects to either.
        let first_ignored = node("n", &["127.0.0.1", "10.0.0.7"], &[], 22);
        let router = Router::new(&[first_ignored], &config(&[], DefaultRoute::Deny));
        assert_eq!(
            router.route_str("n", 10250),
            to_node_at("n", RouteRule::NodeName, "10.0.0.7")
        );
    }

    /// The node's resolver never sees a name chosen for routing: an image
    /// that maps its hostname to 127.0.1.1 would turn `node:10250` into
    /// its own loopback.
    #[test]
    fn a_route_by_name_connects_to_the_address_not_the_name() {
        let nodes = [
            node(
                "node-1",
                &["node-1.internal", "10.0.0.1", "fd00::1"],
                &[],
                22,
            ),
            node("node-2", &["node-2.internal"], &[], 22),
        ];
        let router = Router::new(&nodes, &config(&[], DefaultRoute::AnyNode));
        assert_eq!(
            router.route_str("node-1", 10250),
            to_node_at("node-1", RouteRule::NodeName, "10.0.0.1")
        );
        assert_eq!(
            router.route_str("NODE-1.internal.", 10250),
            to_node_at("node-1", RouteRule::NodeAddress, "10.0.0.1")
        );
        // An address another node claims too is not connected to by name.
        let mut with_claimant = nodes.to_vec();
        with_claimant.push(node("node-3", &["10.0.0.1", "10.0.0.3"], &[], 22));
        let contested = Router::new(&with_claimant, &config(&[], DefaultRoute::AnyNode));
        assert_eq!(
            contested.route_str("node-1", 10250),
            to_node_at("node-1", RouteRule::NodeName, "fd00::1")
        );
        assert_eq!(
            contested.route_str("node-3", 10250),
            to_node_at("node-3", RouteRule::NodeName, "10.0.0.3")
        );
        // An address routes as itself.
        assert_eq!(
            router.route_str("fd00::1", 10250),
            to_node("node-1", RouteRule::NodeAddress)
        );
        // A node with no IP address is not reached by name at all.
        let err = router.route_str("node-2", 10250).expect_err("no address");
        assert_eq!(
            err.deny_reason(),
            Some(&DenyReason::NodeWithoutAddress {
                node: Arc::from("node-2")
            })
        );
        assert!(
            err.to_string()
                .contains("not handed to the node's resolver"),
            "{err}"
        );
        // Names nobody owns go to any node, unresolved (routing.default).
        assert_eq!(
            router.route_str("example.org", 443),
            any_node(RouteRule::Default)
        );
    }

    #[test]
    fn ipv4_inside_ipv6_gets_the_ipv4_policy() {
        let router = open();
        for (host, ipv4, inner) in [
            ("::127.0.0.1", "127.0.0.1", DenyReason::Loopback),
            ("::a9fe:a9fe", "169.254.169.254", DenyReason::LinkLocal),
            (
                "64:ff9b::a9fe:a9fe",
                "169.254.169.254",
                DenyReason::LinkLocal,
            ),
            ("64:ff9b::7f00:1", "127.0.0.1", DenyReason::Loopback),
            (
                "64:ff9b:1:2::a9fe:a9fe",
                "169.254.169.254",
                DenyReason::LinkLocal,
            ),
            (
                "2002:a9fe:a9fe::1",
                "169.254.169.254",
                DenyReason::LinkLocal,
            ),
            ("2002:7f00:1::", "127.0.0.1", DenyReason::Loopback),
            (
                "64:ff9b::6464:64c8",
                "100.100.100.200",
                DenyReason::CloudMetadata,
            ),
        ] {
            let err = router.route_str(host, 80).expect_err(host);
            assert_eq!(
                err.deny_reason(),
                Some(&DenyReason::EmbeddedIpv4 {
                    ipv4: ipv4.parse().expect("IPv4"),
                    reason: Box::new(inner.clone()),
                }),
                "{host}"
            );
            assert_eq!(
                err.deny_reason().map(DenyReason::label),
                Some(inner.label())
            );
            assert!(err.to_string().contains(ipv4), "{err}");
        }
        // The same forms around an allowed address go through, and an
        // explicit allow of the IPv6 address wins.
        for host in ["::a00:1", "64:ff9b::a00:1", "2002:a00:1::1"] {
            assert_eq!(
                router.route_str(host, 80),
                any_node(RouteRule::Default),
                "{host}"
            );
        }
        let cfg = RoutingConfig {
            allow_cidrs: vec![net("64:ff9b::/96")],
            ..config(&[], DefaultRoute::AnyNode)
        };
        assert_eq!(
            Router::new(&[], &cfg).route_str("64:ff9b::7f00:1", 80),
            any_node(RouteRule::Default)
        );
    }

    #[test]
    fn cloud_metadata_endpoints_of_every_provider_are_denied() {
        let router = open();
        for host in [
            "100.100.100.200",
            "168.63.129.16",
            "fd00:ec2::254",
            "::ffff:168.63.129.16",
        ] {
            assert_eq!(
                reason(router.route_str(host, 80)),
                Some(DenyReason::CloudMetadata),
                "{host}"
            );
        }
        for host in [
            "metadata",
            "metadata.google.internal",
            "METADATA.google.internal.",
            "instance-data",
            "instance-data.ec2.internal",
            "instance-data.eu-west-1.compute.internal",
            "metadata.azure.com",
        ] {
            assert_eq!(
                reason(router.route_str(host, 80)),
                Some(DenyReason::CloudMetadata),
                "{host}"
            );
        }
        for host in [
            "mymetadata.example",
            "instance-data-x.example",
            "metadata.example",
        ] {
            assert_eq!(
                router.route_str(host, 80),
                any_node(RouteRule::Default),
                "{host}"
            );
        }
    }

    #[test]
    fn default_route() {
        let deny = Router::new(&[], &config(&[], DefaultRoute::Deny));
        let err = deny.route_str("example.com", 443).expect_err("deny");
        assert_eq!(err.label(), "no_route");
        assert_eq!(err.deny_reason(), None);
        assert!(err.to_string().starts_with("no route to example.com"));
        let open = open();
        assert_eq!(
            open.route_str("Example.COM.", 443),
            any_node(RouteRule::Default)
        );
        assert_eq!(
            open.route_str("192.0.2.1", 443),
            any_node(RouteRule::Default)
        );
    }

    #[test]
    fn messages_and_labels() {
        let router = open();
        let err = router
            .route_str("169.254.169.254", 80)
            .expect_err("metadata");
        assert_eq!(
            err.to_string(),
            "destination 169.254.169.254 is link-local (cloud metadata); add it to \
             routing.allow_cidrs to allow"
        );
        assert_eq!(err.label(), "denied");
        assert_eq!(
            router
                .route_str("169.254.1.1", 80)
                .expect_err("ll")
                .to_string(),
            "destination 169.254.1.1 is link-local; add it to routing.allow_cidrs to allow"
        );
        let labels = [
            (DenyReason::Loopback, "loopback"),
            (DenyReason::LinkLocal, "link_local"),
            (DenyReason::Unspecified, "unspecified"),
            (DenyReason::Multicast, "multicast"),
            (DenyReason::CloudMetadata, "cloud_metadata"),
            (DenyReason::DenyCidr(net("10.0.0.0/8")), "deny_cidr"),
            (DenyReason::Port(25), "port"),
            (
                DenyReason::NodeSshPort {
                    node: Arc::from("n"),
                    port: 22,
                },
                "node_ssh_port",
            ),
            (DenyReason::LocalhostName, "localhost_name"),
            (
                DenyReason::NodeWithoutAddress {
                    node: Arc::from("n"),
                },
                "node_without_address",
            ),
            (
                DenyReason::EmbeddedIpv4 {
                    ipv4: Ipv4Addr::LOCALHOST,
                    reason: Box::new(DenyReason::Loopback),
                },
                "loopback",
            ),
        ];
        for (reason, label) in labels {
            assert_eq!(reason.label(), label);
            assert!(!reason.to_string().is_empty());
            for host in ["10.1.2.3", "fd00:ec2::254", "metadata", "a.example"] {
                let err = RouteError::Denied {
                    dest: dest(host, 22),
                    reason: reason.clone(),
                };
                let message = err.to_string();
                assert!(message.contains(host), "{message}");
                assert!(!message.contains('\n'), "{message}");
            }
        }
        assert_eq!(
            RouteRule::PodCidr(net("10.244.1.0/24")).to_string(),
            "pod-cidr 10.244.1.0/24"
        );
        assert_eq!(
            RouteRule::ServiceCidr(net("10.96.0.0/12")).to_string(),
            "service-cidr 10.96.0.0/12"
        );
        assert_eq!(RouteRule::NodeAddress.to_string(), "node-address");
        assert_eq!(RouteRule::NodeName.to_string(), "node-name");
        assert_eq!(RouteRule::Default.to_string(), "default");
        assert_eq!(RouteRule::PodCidr(net("10.0.0.0/8")).label(), "pod_cidr");
        let route = Route::Node {
            node: Arc::from("w1"),
            rule: RouteRule::NodeName,
            connect_to: None,
        };
        assert_eq!(route.to_string(), "node w1 by node-name");
        let route = Route::Node {
            node: Arc::from("w1"),
            rule: RouteRule::NodeName,
            connect_to: Some("10.0.0.1".parse().expect("IP")),
        };
        assert_eq!(
            route.to_string(),
            "node w1 by node-name, connecting to 10.0.0.1"
        );
        assert_eq!(route.rule(), &RouteRule::NodeName);
        assert_eq!(
            Route::AnyNode {
                rule: RouteRule::Default
            }
            .to_string(),
            "any node by default"
        );
    }

    #[test]
    fn an_ssh_address_outside_the_addresses_is_denied_at_the_ssh_port_and_not_routed() {
        let mut by_ip = node("a", &["10.240.0.11"], &[], 2222);
        by_ip.ssh_address = Some("192.168.5.11".into());
        let mut by_name = node("b", &["10.240.0.12"], &[], 22);
        by_name.ssh_address = Some("b-mgmt.example.".into());
        let mut among = node("c", &["10.240.0.13"], &[], 22);
        among.ssh_address = Some("10.240.0.13".into());
        let router = Router::new(
            &[by_ip, by_name, among],
            &config(&[], DefaultRoute::AnyNode),
        );
        let ssh_port = |node: &str, port| {
            Err(DenyReason::NodeSshPort {
                node: node.into(),
                port,
            })
        };
        let without_host = |r: Result<Route, RouteError>| match r {
            Err(RouteError::Denied { reason, .. }) => Err(reason),
            Ok(route) => Ok(route),
            Err(other) => panic!("{other}"),
        };
        assert_eq!(
            without_host(router.route_str("192.168.5.11", 2222)),
            ssh_port("a", 2222)
        );
        assert_eq!(
            without_host(router.route_str("::ffff:192.168.5.11", 2222)),
            ssh_port("a", 2222)
        );
        assert_eq!(
            without_host(router.route_str("B-MGMT.example", 22)),
            ssh_port("b", 22)
        );
        // Other ports of an SSH address are not the node's: the default.
        assert_eq!(
            router.route_str("192.168.5.11", 22),
            Ok(Route::AnyNode {
                rule: RouteRule::Default
            })
        );
        // An SSH address among the addresses is covered as an address.
        assert_eq!(
            without_host(router.route_str("10.240.0.13", 22)),
            ssh_port("c", 22)
        );
        assert_eq!(
            router.route_str("10.240.0.13", 80),
            to_node("c", RouteRule::NodeAddress)
        );
    }

    #[test]
    fn prefix_keys_mask() {
        assert_eq!(0xffff_ffffu32.masked(0), 0);
        assert_eq!(0xffff_ffffu32.masked(8), 0xff00_0000);
        assert_eq!(0xffff_ffffu32.masked(32), 0xffff_ffff);
        assert_eq!(u128::MAX.masked(0), 0);
        assert_eq!(u128::MAX.masked(128), u128::MAX);
        assert_eq!(u128::MAX.masked(1), 1u128 << 127);
    }

    mod prop {
        use super::super::*;
        use super::RouteText;
        use proptest::prelude::*;

        /// Ports the tables and queries draw from.
        const PORTS: [u16; 4] = [22, 80, 443, 2222];
        /// Names nodes are called by and queried with.
        const NAMES: [&str; 6] = ["n0", "n1", "n2", "a.example", "localhost", "metadata"];

        fn v4_in_space() -> impl Strategy<Value = Ipv4Addr> {
            prop_oneof![
                8 => (0u8..4, any::<u8>()).prop_map(|(c, d)| Ipv4Addr::new(10, 0, c, d)),
                1 => any::<u8>().prop_map(|d| Ipv4Addr::new(127, 0, 0, d)),
                1 => Just(Ipv4Addr::new(169, 254, 169, 254)),
                1 => Just(Ipv4Addr::UNSPECIFIED),
            ]
        }

        fn v6_in_space() -> impl Strategy<Value = Ipv6Addr> {
            prop_oneof![
                8 => (0u16..4, any::<u8>())
                    .prop_map(|(g, d)| Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, g, u16::from(d))),
                1 => Just(Ipv6Addr::LOCALHOST),
                1 => Just(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1)),
            ]
        }

        fn ip() -> impl Strategy<Value = IpAddr> {
            prop_oneof![
                3 => v4_in_space().prop_map(IpAddr::V4),
                1 => v6_in_space().prop_map(IpAddr::V6),
            ]
        }

        fn cidr() -> impl Strategy<Value = IpNet> {
            prop_oneof![
                3 => (v4_in_space(), 20u8..=32).prop_map(|(a, len)| {
                    IpNet::V4(Ipv4Net::new(a, len).map_or_else(|_| Ipv4Net::default(), |n| n.trunc()))
                }),
                1 => (v6_in_space(), 110u8..=128).prop_map(|(a, len)| {
                    IpNet::V6(Ipv6Net::new(a, len).map_or_else(|_| Ipv6Net::default(), |n| n.trunc()))
                }),
            ]
        }

        /// A host string for `ip`, in one of its textual forms.
        fn ip_text(ip: IpAddr, form: u8) -> String {
            match (ip, form % 3) {
                (IpAddr::V4(v4), 1) => format!("::ffff:{v4}"),
                (IpAddr::V4(v4), 2) => v4.to_ipv6_mapped().to_string().to_uppercase(),
                _ => ip.to_string(),
            }
        }

        fn address() -> impl Strategy<Value = String> {
            prop_oneof![
                3 => (ip(), any::<u8>()).prop_map(|(ip, form)| ip_text(ip, form)),
                1 => prop::sample::select(NAMES.to_vec()).prop_map(str::to_owned),
            ]
        }

        fn route_node() -> impl Strategy<Value = RouteNode> {
            (
                prop::sample::select(NAMES.to_vec()),
                prop::collection::vec(address(), 0..3),
                prop::collection::vec(cidr(), 0..3),
                prop::sample::select(PORTS.to_vec()),
            )
                .prop_map(|(name, addresses, pod_cidrs, ssh_port)| RouteNode {
                    name: name.to_owned(),
                    addresses,
                    pod_cidrs,
                    ssh_port,
                    ssh_address: None,
                })
        }

        fn routing_config() -> impl Strategy<Value = RoutingConfig> {
            (
                prop::collection::vec(cidr(), 0..4),
                any::<bool>(),
                prop::collection::vec(prop::sample::select(PORTS.to_vec()), 0..3),
                prop::collection::vec(cidr(), 0..3),
                prop::collection::vec(cidr(), 0..3),
            )
                .prop_map(
                    |(service_cidrs, any_node, allow_ports, deny_cidrs, allow_cidrs)| {
                        RoutingConfig {
                            service_cidrs,
                            default: if any_node {
                                DefaultRoute::AnyNode
                            } else {
                                DefaultRoute::Deny
                            },
                            allow_ports,
                            deny_cidrs,
                            allow_cidrs,
                        }
                    },
                )
        }

        fn query() -> impl Strategy<Value = (String, u16)> {
            (
                prop_oneof![
                    4 => (ip(), any::<u8>()).prop_map(|(ip, form)| ip_text(ip, form)),
                    1 => (prop::sample::select(NAMES.to_vec()), any::<bool>(), any::<bool>())
                        .prop_map(|(n, upper, dot)| {
                            let n = if upper { n.to_uppercase() } else { n.to_owned() };
                            if dot { format!("{n}.") } else { n }
                        }),
                ],
                prop::sample::select(PORTS.to_vec()),
            )
        }

        /// The reference: every rule as a linear scan over the raw tables.
        fn reference(
            nodes: &[RouteNode],
            cfg: &RoutingConfig,
            host: &str,
            port: u16,
        ) -> Result<Route, RouteError> {
            let dest = Destination::new(Host::parse(host).expect("queries are valid hosts"), port);
            let deny = |reason| {
                Err(RouteError::Denied {
                    dest: dest.clone(),
                    reason,
                })
            };
            let mut sorted: Vec<&RouteNode> = nodes.iter().collect();
            sorted.sort_by(|a, b| a.name.cmp(&b.name));
            let port_ok = cfg.allow_ports.is_empty() || cfg.allow_ports.contains(&port);
            let canonical = |ip: IpAddr| match ip {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
                IpAddr::V4(_) => ip,
            };
            let names_of = |idx: &[usize]| -> Vec<Arc<str>> {
                idx.iter()
                    .map(|i| Arc::from(sorted[*i].name.as_str()))
                    .collect()
            };

            // The policy: Some(Some(reason)) denies, Some(None) allows,
            // None: no entry.
            let builtin = [
                ("127.0.0.0/8", DenyReason::Loopback),
                ("::1/128", DenyReason::Loopback),
                ("169.254.0.0/16", DenyReason::LinkLocal),
                ("fe80::/10", DenyReason::LinkLocal),
                ("0.0.0.0/32", DenyReason::Unspecified),
                ("::/128", DenyReason::Unspecified),
                ("224.0.0.0/4", DenyReason::Multicast),
                ("ff00::/8", DenyReason::Multicast),
                ("fd00:ec2::254/128", DenyReason::CloudMetadata),
                ("100.100.100.200/32", DenyReason::CloudMetadata),
                ("168.63.129.16/32", DenyReason::CloudMetadata),
            ];
            let verdict = |ip: IpAddr| -> Option<Option<DenyReason>> {
                let mut best: Option<(u8, Option<DenyReason>)> = None;
                let candidates = builtin
                    .iter()
                    .filter_map(|(n, r)| n.parse::<IpNet>().ok().map(|n| (n, Some(r.clone()))))
                    .chain(
                        cfg.deny_cidrs
                            .iter()
                            .map(|n| (*n, Some(DenyReason::DenyCidr(*n)))),
                    )
                    .chain(cfg.allow_cidrs.iter().map(|n| (*n, None)));
                for (n, v) in candidates {
                    if !n.contains(&ip) {
                        continue;
                    }
                    let better = match &best {
                        None => true,
                        Some((len, current)) => {
                            n.prefix_len() > *len
                                || (n.prefix_len() == *len && v.is_none() && current.is_some())
                        }
                    };
                    if better {
                        best = Some((n.prefix_len(), v));
                    }
                }
                best.map(|(_, v)| v)
            };

            // The best pod or service CIDR for an IP: (CIDR, None for a
            // service CIDR or the indexes of every node whose pod CIDRs
            // cover the IP).
            let cidr_route = |ip: IpAddr| -> Option<(IpNet, Option<Vec<usize>>)> {
                let mut best: Option<(IpNet, Option<Vec<usize>>)> = None;
                for (i, n) in sorted.iter().enumerate() {
                    for c in &n.pod_cidrs {
                        if c.contains(&ip)
                            && best
                                .as_ref()
                                .is_none_or(|(b, _)| c.prefix_len() > b.prefix_len())
                        {
                            best = Some((*c, Some(vec![i])));
                        }
                    }
                }
                if let Some((_, Some(owners))) = &mut best {
                    *owners = sorted
                        .iter()
                        .enumerate()
                        .filter(|(_, n)| n.pod_cidrs.iter().any(|c| c.contains(&ip)))
                        .map(|(i, _)| i)
                        .collect();
                }
                for c in &cfg.service_cidrs {
                    if c.contains(&ip)
                        && best
                            .as_ref()
                            .is_none_or(|(b, _)| c.prefix_len() > b.prefix_len())
                    {
                        best = Some((*c, None));
                    }
                }
                best
            };
            // Whether node `i` may have IP address `a` as a node address.
            let usable = |i: usize, a: IpAddr| -> bool {
                if matches!(verdict(a), Some(Some(_))) {
                    return false;
                }
                match cidr_route(a) {
                    Some((_, None)) => false,
                    Some((_, Some(owners))) => owners == [i],
                    None => true,
                }
            };
            // (node index, via address?) for every node that has `matches`.
            let claimants = |matches: &dyn Fn(&Host) -> bool| -> Vec<(usize, bool)> {
                let has = |i: usize, text: &str| match Host::parse(text) {
                    Ok(Host::Ip(ip)) => usable(i, ip) && matches(&Host::Ip(ip)),
                    Ok(h) => matches(&h),
                    Err(_) => false,
                };
                (0..sorted.len())
                    .filter_map(|i| {
                        if sorted[i].addresses.iter().any(|a| has(i, a)) {
                            Some((i, true))
                        } else if has(i, &sorted[i].name) {
                            Some((i, false))
                        } else {
                            None
                        }
                    })
                    .collect()
            };
            // The first usable address of node `i` that no other node claims.
            let dial_ip = |i: usize| -> Option<IpAddr> {
                sorted[i]
                    .addresses
                    .iter()
                    .find_map(|a| match Host::parse(a) {
                        Ok(Host::Ip(ip))
                            if usable(i, ip)
                                && claimants(&|h: &Host| *h == Host::Ip(ip)).len() == 1 =>
                        {
                            Some(ip)
                        }
                        _ => None,
                    })
            };
            let node_route = |claimants: Vec<(usize, bool)>, by_name: bool| {
                let (first, by_address) = *claimants.first()?;
                if let Some((i, _)) = claimants.iter().find(|(i, _)| sorted[*i].ssh_port == port) {
                    return Some(deny(DenyReason::NodeSshPort {
                        node: Arc::from(sorted[*i].name.as_str()),
                        port,
                    }));
                }
                if claimants.len() > 1 {
                    let idx: Vec<usize> = claimants.iter().map(|(i, _)| *i).collect();
                    return Some(Err(RouteError::Conflict {
                        dest: dest.clone(),
                        claim: ClaimKind::Address,
                        nodes: names_of(&idx),
                    }));
                }
                let node: Arc<str> = Arc::from(sorted[first].name.as_str());
                let connect_to = if by_name {
                    match dial_ip(first) {
                        Some(ip) => Some(ip),
                        None => return Some(deny(DenyReason::NodeWithoutAddress { node })),
                    }
                } else {
                    None
                };
                Some(Ok(Route::Node {
                    node,
                    rule: if by_address {
                        RouteRule::NodeAddress
                    } else {
                        RouteRule::NodeName
                    },
                    connect_to,
                }))
            };
            let default = || match cfg.default {
                DefaultRoute::Deny => Err(RouteError::NoRoute { dest: dest.clone() }),
                DefaultRoute::AnyNode => Ok(Route::AnyNode {
                    rule: RouteRule::Default,
                }),
            };

            let ip = match &dest.host {
                Host::Name(name) => {
                    let name = name.as_str();
                    if name == "localhost" {
                        return deny(DenyReason::LocalhostName);
                    }
                    if name == "metadata" {
                        return deny(DenyReason::CloudMetadata);
                    }
                    if !port_ok {
                        return deny(DenyReason::Port(port));
                    }
                    let found =
                        claimants(&|h: &Host| matches!(h, Host::Name(n) if n.as_str() == name));
                    return node_route(found, true).unwrap_or_else(default);
                }
                Host::Ip(ip) => canonical(*ip),
            };
            if let Some(Some(reason)) = verdict(ip) {
                return deny(reason);
            }
            if !port_ok {
                return deny(DenyReason::Port(port));
            }
            let found = claimants(&|h: &Host| *h == Host::Ip(ip));
            if let Some(result) = node_route(found, false) {
                return result;
            }
            match cidr_route(ip) {
                Some((c, None)) => Ok(Route::AnyNode {
                    rule: RouteRule::ServiceCidr(c),
                }),
                Some((c, Some(owners))) if owners.len() == 1 => Ok(Route::Node {
                    node: Arc::from(sorted[owners[0]].name.as_str()),
                    rule: RouteRule::PodCidr(c),
                    connect_to: None,
                }),
                Some((c, Some(owners))) => Err(RouteError::Conflict {
                    dest: dest.clone(),
                    claim: ClaimKind::PodCidr(c),
                    nodes: names_of(&owners),
                }),
                None => default(),
            }
        }

        proptest! {
            // No regression file: this module owns no file beside its source.
            #![proptest_config(ProptestConfig {
                cases: 512,
                failure_persistence: None,
                ..ProptestConfig::default()
            })]

            #[test]
            fn router_agrees_with_linear_scan(
                nodes in prop::collection::vec(route_node(), 0..6),
                cfg in routing_config(),
                queries in prop::collection::vec(query(), 1..40),
            ) {
                let router = Router::new(&nodes, &cfg);
                for (host, port) in &queries {
                    let got = router.route_str(host, *port);
                    let want = reference(&nodes, &cfg, host, *port);
                    prop_assert_eq!(got, want, "host {} port {}", host, port);
                }
            }
        }
    }
}
