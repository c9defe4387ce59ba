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
//! Rules, in order:
//!
//! 0. Policy: the host must be an IP literal or a valid DNS name; IP
//!    destinations are checked against the built-in denials, `deny_cidrs` and
//!    `allow_cidrs` (most specific prefix wins, `allow` wins ties); localhost
//!    and cloud-metadata names are denied; the port must be in `allow_ports`
//!    when that list is non-empty; a node's own SSH port on that node is
//!    denied.
//! 1. The host is one of a node's addresses or its name: that node.
//! 2. The host is an IP in a node's pod CIDR: that node.
//! 3. The host is an IP in a service CIDR: any Ready node. The longest prefix
//!    across pod and service CIDRs decides between rules 2 and 3; identical
//!    pod CIDRs of several nodes go to the first node by name.
//! 4. Otherwise `routing.default`: deny, or any Ready node (DNS names are
//!    passed to the node unresolved).
//!
//! IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are treated as their IPv4
//! address everywhere, and DNS-looking hosts that the node's resolver would
//! read as legacy IPv4 numbers (`127.1`, `0x7f000001`, `017700000001`) are
//! treated as those addresses, so neither form bypasses the policy. The IP
//! policy sees IP literals only: a DNS name that the node resolves to a denied
//! address is not caught here (only the well-known localhost and metadata
//! names are), so deployments that must rule that out keep
//! `routing.default = "deny"`.
//!
//! Lookups cost one hash probe per distinct prefix length present in a table
//! (at most 33 for IPv4, 129 for IPv6), independent of the number of nodes and
//! CIDRs.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

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
    /// Its addresses as configured: IP literals or DNS names.
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
            Route::Node { node, rule } => write!(f, "node {node} by {rule}"),
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
    /// A cloud metadata endpoint outside the link-local ranges: the AWS IPv6
    /// endpoint fd00:ec2::254, or a name such as `metadata.google.internal`
    /// that the node resolves to its metadata server.
    CloudMetadata,
    /// The destination is in this `routing.deny_cidrs` entry.
    DenyCidr(IpNet),
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
    /// The host is neither an IP literal nor a valid DNS name.
    InvalidHost,
}

impl DenyReason {
    /// A short, stable label for metrics (`nodetunnel_policy_denials_total`):
    /// `loopback`, `link_local`, `unspecified`, `multicast`,
    /// `cloud_metadata`, `deny_cidr`, `port`, `node_ssh_port`,
    /// `localhost_name` or `invalid_host`.
    pub fn label(&self) -> &'static str {
        match self {
            DenyReason::Loopback => "loopback",
            DenyReason::LinkLocal => "link_local",
            DenyReason::Unspecified => "unspecified",
            DenyReason::Multicast => "multicast",
            DenyReason::CloudMetadata => "cloud_metadata",
            DenyReason::DenyCidr(_) => "deny_cidr",
            DenyReason::Port(_) => "port",
            DenyReason::NodeSshPort { .. } => "node_ssh_port",
            DenyReason::LocalhostName => "localhost_name",
            DenyReason::InvalidHost => "invalid_host",
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
            DenyReason::Port(port) => write!(f, "port {port} not in routing.allow_ports"),
            DenyReason::NodeSshPort { node, port } => {
                write!(f, "SSH port {port} of node {node}")
            }
            DenyReason::LocalhostName => f.write_str("localhost name"),
            DenyReason::InvalidHost => f.write_str("invalid host"),
        }
    }
}

/// Why [`Router::route`] found no way to a destination.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The policy refuses the destination.
    #[error("{}", denied_message(.host, *.port, .reason))]
    Denied {
        /// The host as asked for (cut to 255 bytes when invalid).
        host: String,
        /// The port as asked for.
        port: u16,
        /// Why it is refused.
        reason: DenyReason,
    },
    /// No rule routes the destination and `routing.default` is `deny`.
    #[error(
        "no route to {host}: it is no node address or name and in no pod or service CIDR, \
         and routing.default is \"deny\""
    )]
    NoRoute {
        /// The host as asked for.
        host: String,
    },
}

impl RouteError {
    /// A short, stable label for metrics, the same as
    /// [`DialError::reason`](crate::dial::DialError::reason) of the dial error
    /// this becomes: `denied` or `no_route`. The finer reason of a denial is
    /// [`DenyReason::label`].
    pub fn label(&self) -> &'static str {
        match self {
            RouteError::Denied { .. } => "denied",
            RouteError::NoRoute { .. } => "no_route",
        }
    }

    /// The denial reason, if this is a denial.
    pub fn deny_reason(&self) -> Option<&DenyReason> {
        match self {
            RouteError::Denied { reason, .. } => Some(reason),
            RouteError::NoRoute { .. } => None,
        }
    }
}

/// The one-line message of [`RouteError::Denied`].
fn denied_message(host: &str, port: u16, reason: &DenyReason) -> String {
    const ALLOW_HINT: &str = "add it to routing.allow_cidrs to allow";
    match reason {
        DenyReason::Loopback => {
            format!("destination {host} is a loopback address; {ALLOW_HINT}")
        }
        DenyReason::LinkLocal => {
            let metadata = match parse_host(host) {
                Some(Host::Ip(ip)) if ip == IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)) => {
                    " (cloud metadata)"
                }
                _ => "",
            };
            format!("destination {host} is link-local{metadata}; {ALLOW_HINT}")
        }
        DenyReason::Unspecified => {
            format!("destination {host} is the unspecified address; {ALLOW_HINT}")
        }
        DenyReason::Multicast => {
            format!("destination {host} is a multicast address; {ALLOW_HINT}")
        }
        DenyReason::CloudMetadata => match parse_host(host) {
            Some(Host::Ip(_)) => {
                format!("destination {host} is a cloud metadata endpoint; {ALLOW_HINT}")
            }
            _ => format!(
                "destination {host} is a cloud metadata name, which the node would resolve to \
                 its metadata endpoint"
            ),
        },
        DenyReason::DenyCidr(net) => format!(
            "destination {host} is in routing.deny_cidrs ({net}); add a more specific \
             routing.allow_cidrs entry to allow"
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
        DenyReason::InvalidHost => format!(
            "destination host {host:?} (port {port}) is neither an IP address nor a valid DNS \
             name"
        ),
    }
}

/// Something in the inventory or the configuration the router resolved by a
/// deterministic choice or ignored; the caller should log it as a warning.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Conflict {
    /// Several nodes have the same pod CIDR; it routes to the first of
    /// `nodes` (sorted by name).
    PodCidr {
        /// The CIDR.
        cidr: IpNet,
        /// The nodes claiming it, sorted by name.
        nodes: Vec<Arc<str>>,
    },
    /// A node's pod CIDR is also a service CIDR; it routes to the node.
    PodAndServiceCidr {
        /// The CIDR.
        cidr: IpNet,
        /// The node it routes to (the first by name if several claim it).
        node: Arc<str>,
    },
    /// Several nodes have the same address or name; it routes to the first
    /// of `nodes` (sorted by name), and the SSH ports of all are denied.
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
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Conflict::PodCidr { cidr, nodes } => write!(
                f,
                "pod CIDR {cidr} is assigned to nodes {}; routing it to {}",
                join(nodes),
                first(nodes)
            ),
            Conflict::PodAndServiceCidr { cidr, node } => write!(
                f,
                "pod CIDR {cidr} of node {node} is also a service CIDR; routing it to node {node}"
            ),
            Conflict::SharedAddress { address, nodes } => write!(
                f,
                "address {address} belongs to nodes {}; routing it to {}",
                join(nodes),
                first(nodes)
            ),
            Conflict::UnusableAddress { node, address } => write!(
                f,
                "address {address:?} of node {node} is neither an IP address nor a valid DNS \
                 name; ignoring it"
            ),
        }
    }
}

fn join(nodes: &[Arc<str>]) -> String {
    nodes.iter().map(|n| &**n).collect::<Vec<&str>>().join(", ")
}

fn first(nodes: &[Arc<str>]) -> &str {
    nodes.first().map_or("", |n| n)
}

/// The routing and policy indexes built from one node inventory and one
/// [`RoutingConfig`]. Immutable, `Send + Sync`, cheap to query.
pub struct Router {
    /// Node names, sorted.
    names: Vec<Arc<str>>,
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
    /// How the winning node (the first by name) has it.
    rule: RouteRule,
    /// The winning node and its SSH port.
    first: (Arc<str>, u16),
    /// The other nodes that have it (name, SSH port), sorted by name.
    others: Vec<(Arc<str>, u16)>,
}

/// What a pod or service CIDR routes to.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    /// The node with this index in `Router::names`.
    Pod(usize),
    /// Any node.
    Service,
}

/// A policy entry.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Policy {
    Deny(DenyReason),
    Allow,
}

/// The built-in denials for IP destinations.
const BUILTIN_DENIALS: [(IpNet, DenyReason); 9] = [
    (
        IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(127, 0, 0, 0), 8)),
        DenyReason::Loopback,
    ),
    (
        IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::LOCALHOST, 128)),
        DenyReason::Loopback,
    ),
    (
        IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(169, 254, 0, 0), 16)),
        DenyReason::LinkLocal,
    ),
    (
        IpNet::V6(Ipv6Net::new_assert(
            Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0),
            10,
        )),
        DenyReason::LinkLocal,
    ),
    (
        IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::UNSPECIFIED, 32)),
        DenyReason::Unspecified,
    ),
    (
        IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::UNSPECIFIED, 128)),
        DenyReason::Unspecified,
    ),
    (
        IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(224, 0, 0, 0), 4)),
        DenyReason::Multicast,
    ),
    (
        IpNet::V6(Ipv6Net::new_assert(
            Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0),
            8,
        )),
        DenyReason::Multicast,
    ),
    (
        IpNet::V6(Ipv6Net::new_assert(
            Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254),
            128,
        )),
        DenyReason::CloudMetadata,
    ),
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

/// Names that resolve to the cloud metadata server on the node.
const METADATA_NAMES: [&str; 2] = ["metadata.google.internal", "metadata"];

impl Router {
    /// Build the indexes for `nodes` and `config`. Never fails: duplicate pod
    /// CIDRs or addresses are resolved deterministically (the first node by
    /// name wins) and unusable addresses are skipped; both are reported by
    /// [`Router::conflicts`]. CIDRs with host bits set are truncated, and
    /// IPv4-mapped IPv6 CIDRs are treated as their IPv4 CIDR.
    pub fn new(nodes: &[RouteNode], config: &RoutingConfig) -> Router {
        let mut sorted: Vec<&RouteNode> = nodes.iter().collect();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        let names: Vec<Arc<str>> = sorted.iter().map(|n| Arc::from(n.name.as_str())).collect();

        let mut conflicts = Vec::new();
        let mut claims_v4: FastMap<u32, Claim> = FastMap::default();
        let mut claims_v6: FastMap<u128, Claim> = FastMap::default();
        let mut claims_name: HashMap<Box<str>, Claim> = HashMap::new();
        let mut ssh_only: HashMap<Box<str>, Vec<(Arc<str>, u16)>> = HashMap::new();
        let mut routes: PrefixMap<Target> = PrefixMap::default();
        let mut pod_conflicts: BTreeMap<IpNet, Vec<usize>> = BTreeMap::new();

        for (index, (node, name)) in sorted.iter().zip(&names).enumerate() {
            let keys = node
                .addresses
                .iter()
                .map(|a| (a.as_str(), RouteRule::NodeAddress))
                .chain(std::iter::once((node.name.as_str(), RouteRule::NodeName)));
            for (key, rule) in keys {
                let new_claim = || Claim {
                    rule,
                    first: (name.clone(), node.ssh_port),
                    others: Vec::new(),
                };
                let claim = match parse_host(key) {
                    Some(Host::Ip(IpAddr::V4(ip))) => {
                        claims_v4.entry(u32::from(ip)).or_insert_with(new_claim)
                    }
                    Some(Host::Ip(IpAddr::V6(ip))) => {
                        claims_v6.entry(u128::from(ip)).or_insert_with(new_claim)
                    }
                    Some(Host::Name(n)) => claims_name
                        .entry(n.into_owned().into_boxed_str())
                        .or_insert_with(new_claim),
                    None => {
                        conflicts.push(Conflict::UnusableAddress {
                            node: name.clone(),
                            address: key.to_owned(),
                        });
                        continue;
                    }
                };
                claim.add(name, node.ssh_port);
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

            for cidr in &node.pod_cidrs {
                let net = canonical_net(*cidr);
                match routes.get(net) {
                    None => routes.insert(net, Target::Pod(index)),
                    Some(Target::Pod(owner)) if *owner == index => {}
                    Some(Target::Pod(owner)) => {
                        let owner = *owner;
                        let claimants = pod_conflicts.entry(net).or_insert_with(|| vec![owner]);
                        if !claimants.contains(&index) {
                            claimants.push(index);
                        }
                    }
                    Some(Target::Service) => {}
                }
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
                Some(Target::Service) => {}
            }
        }
        routes.finish();

        for (cidr, claimants) in pod_conflicts {
            conflicts.push(Conflict::PodCidr {
                cidr,
                nodes: claimants
                    .iter()
                    .filter_map(|i| names.get(*i).cloned())
                    .collect(),
            });
        }
        let mut shared: Vec<(String, &Claim)> = claims_v4
            .iter()
            .map(|(ip, claim)| (IpAddr::V4(Ipv4Addr::from(*ip)).to_string(), claim))
            .chain(
                claims_v6
                    .iter()
                    .map(|(ip, claim)| (IpAddr::V6(Ipv6Addr::from(*ip)).to_string(), claim)),
            )
            .chain(claims_name.iter().map(|(n, claim)| (n.to_string(), claim)))
            .filter(|(_, claim)| !claim.others.is_empty())
            .collect();
        shared.sort_by(|a, b| a.0.cmp(&b.0));
        conflicts.extend(
            shared
                .into_iter()
                .map(|(address, claim)| Conflict::SharedAddress {
                    address,
                    nodes: claim.nodes().map(|(n, _)| n.clone()).collect(),
                }),
        );

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
            // On equal prefix length allow wins: it replaces any denial.
            policy.insert(canonical_net(*cidr), Policy::Allow);
        }
        policy.finish();

        let mut allow_ports = config.allow_ports.clone();
        allow_ports.sort_unstable();
        allow_ports.dedup();

        claims_v4.shrink_to_fit();
        claims_v6.shrink_to_fit();
        claims_name.shrink_to_fit();
        ssh_only.shrink_to_fit();

        Router {
            names,
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

    /// Route `host:port`. `host` is an IP literal (IPv6 without brackets,
    /// optionally with a `%zone`) or a DNS name (case-insensitive, a trailing
    /// dot ignored). See the [module documentation](self) for the rules.
    ///
    /// # Errors
    ///
    /// [`RouteError::Denied`] when the policy refuses the destination (an
    /// invalid host included), [`RouteError::NoRoute`] when no rule matches
    /// and `routing.default` is `deny`.
    pub fn route(&self, host: &str, port: u16) -> Result<Route, RouteError> {
        let deny = |reason: DenyReason| RouteError::Denied {
            host: host.to_owned(),
            port,
            reason,
        };
        let Some(parsed) = parse_host(host) else {
            return Err(RouteError::Denied {
                host: truncate(host, 255).to_owned(),
                port,
                reason: DenyReason::InvalidHost,
            });
        };
        match parsed {
            Host::Ip(ip) => {
                if let Some((_, Policy::Deny(reason))) = self.policy.longest(ip) {
                    return Err(deny(reason.clone()));
                }
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
                    return claim.route(port).map_err(deny);
                }
                match self.routes.longest(ip) {
                    Some((net, Target::Pod(index))) => match self.names.get(*index) {
                        Some(node) => Ok(Route::Node {
                            node: node.clone(),
                            rule: RouteRule::PodCidr(*net),
                        }),
                        None => self.default_route_for(host),
                    },
                    Some((net, Target::Service)) => Ok(Route::AnyNode {
                        rule: RouteRule::ServiceCidr(*net),
                    }),
                    None => self.default_route_for(host),
                }
            }
            Host::Name(name) => {
                if is_localhost_name(&name) {
                    return Err(deny(DenyReason::LocalhostName));
                }
                if METADATA_NAMES.contains(&&*name) {
                    return Err(deny(DenyReason::CloudMetadata));
                }
                if !self.port_allowed(port) {
                    return Err(deny(DenyReason::Port(port)));
                }
                self.deny_ssh_only(&name, port).map_err(deny)?;
                match self.claims_name.get(&*name) {
                    Some(claim) => claim.route(port).map_err(deny),
                    None => self.default_route_for(host),
                }
            }
        }
    }

    /// Deterministic choices and ignored entries made while building, to be
    /// logged as warnings: identical pod CIDRs of several nodes, pod CIDRs
    /// that are also service CIDRs, addresses shared by several nodes,
    /// unusable addresses.
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

    fn default_route_for(&self, host: &str) -> Result<Route, RouteError> {
        match self.default {
            DefaultRoute::Deny => Err(RouteError::NoRoute {
                host: host.to_owned(),
            }),
            DefaultRoute::AnyNode => Ok(Route::AnyNode {
                rule: RouteRule::Default,
            }),
        }
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
    /// Record that `node` has this address too (nodes come sorted by name).
    fn add(&mut self, node: &Arc<str>, ssh_port: u16) {
        if !self.nodes().any(|(n, _)| Arc::ptr_eq(n, node)) {
            self.others.push((node.clone(), ssh_port));
        }
    }

    /// Every node that has it, the winner first.
    fn nodes(&self) -> impl Iterator<Item = &(Arc<str>, u16)> {
        std::iter::once(&self.first).chain(&self.others)
    }

    /// The route to this address at `port`, or the denial if `port` is the
    /// SSH port of a node that has it.
    fn route(&self, port: u16) -> Result<Route, DenyReason> {
        if let Some((node, _)) = self.nodes().find(|(_, ssh_port)| *ssh_port == port) {
            return Err(DenyReason::NodeSshPort {
                node: node.clone(),
                port,
            });
        }
        Ok(Route::Node {
            node: self.first.0.clone(),
            rule: self.rule.clone(),
        })
    }
}

/// A host as the router understands it.
#[derive(Debug, PartialEq, Eq)]
enum Host<'a> {
    /// An IP address, IPv4-mapped IPv6 turned into IPv4.
    Ip(IpAddr),
    /// A DNS name, lowercase, without a trailing dot.
    Name(Cow<'a, str>),
}

/// Parse a host: an IP literal (IPv6 optionally with a `%zone`), a legacy
/// IPv4 number the node's resolver would accept (`127.1`, `0x7f.1`), or a
/// DNS name. `None` if it is none of these.
/// `host` in the canonical form `ssh_only` is keyed by, if it is a host.
fn host_key(host: &str) -> Option<Box<str>> {
    match parse_host(host)? {
        Host::Ip(ip) => Some(ip.to_string().into_boxed_str()),
        Host::Name(name) => Some(name.into_owned().into_boxed_str()),
    }
}

fn parse_host(host: &str) -> Option<Host<'_>> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Some(Host::Ip(canonical_ip(ip)));
    }
    if host.contains(':') {
        let (addr, zone) = host.split_once('%')?;
        let zone_ok = !zone.is_empty()
            && zone
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !zone_ok {
            return None;
        }
        let ip = addr.parse::<Ipv6Addr>().ok()?;
        return Some(Host::Ip(canonical_ip(IpAddr::V6(ip))));
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
        });
    if !valid {
        return None;
    }
    if let Some(ip) = parse_legacy_ipv4(name) {
        return Some(Host::Ip(IpAddr::V4(ip)));
    }
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        Some(Host::Name(Cow::Owned(name.to_ascii_lowercase())))
    } else {
        Some(Host::Name(Cow::Borrowed(name)))
    }
}

/// Parse the IPv4 forms of `inet_aton(3)` as glibc accepts them: one to four
/// dot-separated parts, each decimal, octal (leading `0`) or hexadecimal
/// (`0x`), the last part filling the remaining bytes.
fn parse_legacy_ipv4(s: &str) -> Option<Ipv4Addr> {
    let mut parts = [0u32; 4];
    let mut count = 0;
    for part in s.split('.') {
        let slot = parts.get_mut(count)?;
        *slot = parse_legacy_ipv4_part(part)?;
        count += 1;
    }
    let (last, init) = parts.get(..count)?.split_last()?;
    if init.iter().any(|p| *p > 0xff) {
        return None;
    }
    let max = match init.len() {
        0 => u32::MAX,
        1 => 0x00ff_ffff,
        2 => 0xffff,
        _ => 0xff,
    };
    if *last > max {
        return None;
    }
    let mut value = *last;
    for (i, part) in init.iter().enumerate() {
        value |= part << (24 - 8 * i);
    }
    Some(Ipv4Addr::from(value))
}

/// One part of [`parse_legacy_ipv4`].
fn parse_legacy_ipv4_part(part: &str) -> Option<u32> {
    if !part.as_bytes().first()?.is_ascii_digit() {
        return None;
    }
    let (digits, radix) =
        if let Some(hex) = part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
            (hex, 16)
        } else if let Some(octal) = part.strip_prefix('0').filter(|rest| !rest.is_empty()) {
            (octal, 8)
        } else {
            (part, 10)
        };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(digits, radix).ok()
}

/// `localhost`, `*.localhost` and the other names [`LOCALHOST_NAMES`] lists;
/// `name` is already lowercase without a trailing dot.
fn is_localhost_name(name: &str) -> bool {
    name == "localhost" || name.ends_with(".localhost") || LOCALHOST_NAMES.contains(&name)
}

/// An IPv4-mapped IPv6 address becomes its IPv4 address.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
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

/// `s` cut to at most `max` bytes on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
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
            router.route("10.0.0.1", 80),
            Err(RouteError::NoRoute {
                host: "10.0.0.1".to_owned()
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
            ("fe80::1%eth0", DenyReason::LinkLocal),
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
                reason(router.route(host, 80)).as_ref(),
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
                router.route(host, 80),
                any_node(RouteRule::Default),
                "{host}"
            );
        }
    }

    #[test]
    fn legacy_ipv4_numbers_are_addresses_not_names() {
        let router = open();
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
        ] {
            assert_eq!(
                reason(router.route(host, 80)),
                Some(DenyReason::Loopback),
                "{host}"
            );
        }
        assert_eq!(reason(router.route("0", 80)), Some(DenyReason::Unspecified));
        assert_eq!(
            reason(router.route("0xa9fea9fe", 80)),
            Some(DenyReason::LinkLocal)
        );
        assert_eq!(parse_legacy_ipv4("1.2.3"), Some(Ipv4Addr::new(1, 2, 0, 3)));
        assert_eq!(
            parse_legacy_ipv4("10.65535"),
            Some(Ipv4Addr::new(10, 0, 255, 255))
        );
        // Forms inet_aton rejects stay names (the node would look them up).
        for name in [
            "0x",
            "08",
            "1.2.3.4.5",
            "256.1.1.1",
            "1.16777216",
            "4294967296",
            "1a",
        ] {
            assert_eq!(parse_legacy_ipv4(name), None, "{name}");
            assert!(matches!(parse_host(name), Some(Host::Name(_))), "{name}");
        }
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
                reason(router.route(host, 80)),
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
                reason(router.route(host, 80)),
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
                router.route(host, 80),
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
            reason(router.route("localhost", 80)),
            Some(DenyReason::LocalhostName)
        );
        // ... nor does a /0 override the more specific built-in denials.
        assert_eq!(
            reason(router.route("127.0.0.1", 80)),
            Some(DenyReason::Loopback)
        );
    }

    #[test]
    fn invalid_hosts_are_denied() {
        let router = open();
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
            let err = router.route(host, 80).expect_err(host);
            assert_eq!(
                err.deny_reason(),
                Some(&DenyReason::InvalidHost),
                "{host:?}"
            );
            let message = err.to_string();
            assert!(
                !message.contains('\n') && !message.contains('\r'),
                "{message}"
            );
            assert!(message.len() < 400, "{message}");
        }
        let label = format!("{}.example", "a".repeat(64));
        assert!(router.route(&label, 80).is_err());
        assert_eq!(
            router.route("under_score.example", 80),
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
            reason(router.route("10.2.0.1", 80)),
            Some(DenyReason::DenyCidr(net("10.0.0.0/8")))
        );
        assert_eq!(router.route("10.1.3.4", 80), any_node(RouteRule::Default));
        assert_eq!(
            reason(router.route("10.1.2.3", 80)),
            Some(DenyReason::DenyCidr(net("10.1.2.0/24")))
        );
        assert_eq!(
            reason(router.route("::ffff:10.9.9.9", 80)),
            Some(DenyReason::DenyCidr(net("10.0.0.0/8")))
        );
        // A mapped deny CIDR is its IPv4 CIDR.
        assert_eq!(
            reason(router.route("192.168.3.4", 80)),
            Some(DenyReason::DenyCidr(net("192.168.0.0/16")))
        );
        assert_eq!(
            router.route("169.254.169.254", 80),
            any_node(RouteRule::Default)
        );
        assert_eq!(
            reason(router.route("169.254.169.253", 80)),
            Some(DenyReason::LinkLocal)
        );
        // Equal length: allow wins over built-in and deny_cidrs alike.
        assert_eq!(router.route("127.0.0.1", 80), any_node(RouteRule::Default));
        assert_eq!(
            reason(router.route("fd00::1", 80)),
            Some(DenyReason::DenyCidr(net("fd00::/8")))
        );
        assert_eq!(router.route("fd00:1::1", 80), any_node(RouteRule::Default));
        // Policy comes before node routing.
        let nodes = [node("n1", &["10.2.0.1"], &[], 22)];
        let router = Router::new(&nodes, &cfg);
        assert_eq!(
            reason(router.route("10.2.0.1", 80)),
            Some(DenyReason::DenyCidr(net("10.0.0.0/8")))
        );
        assert_eq!(
            reason(router.route("n1", 22)),
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
            router.route("10.0.0.1", 10250),
            to_node("n1", RouteRule::NodeAddress)
        );
        assert_eq!(
            router.route("example.com", 443),
            any_node(RouteRule::Default)
        );
        for host in ["10.0.0.1", "n1", "10.244.0.5", "example.com", "192.0.2.1"] {
            assert_eq!(
                reason(router.route(host, 80)),
                Some(DenyReason::Port(80)),
                "{host}"
            );
        }
        // The port denial of the SSH port comes first when 22 is not allowed.
        assert_eq!(reason(router.route("n1", 22)), Some(DenyReason::Port(22)));
        // Empty allows every port.
        let router = open();
        for port in [1, 22, 80, 65535] {
            assert!(router.route("192.0.2.1", port).is_ok());
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
        assert_eq!(reason(router.route("10.0.0.1", 22)), ssh("w1", 22));
        assert_eq!(reason(router.route("w1", 22)), ssh("w1", 22));
        assert_eq!(reason(router.route("W1.example.com.", 22)), ssh("w1", 22));
        assert_eq!(reason(router.route("2001:db8::1", 22)), ssh("w1", 22));
        assert_eq!(reason(router.route("::ffff:10.0.0.1", 22)), ssh("w1", 22));
        assert_eq!(reason(router.route("10.0.0.3", 2222)), ssh("w3", 2222));
        assert_eq!(
            router.route("10.0.0.3", 22),
            to_node("w3", RouteRule::NodeAddress)
        );
        // A pod or service IP at port 22 is not a node's sshd.
        assert_eq!(
            router.route("10.244.1.9", 22),
            to_node("w1", RouteRule::PodCidr(net("10.244.1.0/24")))
        );
        assert!(router.route("10.96.0.1", 22).is_ok());
    }

    #[test]
    fn node_addresses_and_names() {
        let router = cluster();
        assert_eq!(
            router.route("10.0.0.1", 10250),
            to_node("w1", RouteRule::NodeAddress)
        );
        assert_eq!(
            router.route("::ffff:10.0.0.2", 10250),
            to_node("w2", RouteRule::NodeAddress)
        );
        assert_eq!(
            router.route("2001:0db8:0:0::1", 10250),
            to_node("w1", RouteRule::NodeAddress)
        );
        assert_eq!(
            router.route("w1.example.com", 10250),
            to_node("w1", RouteRule::NodeAddress)
        );
        assert_eq!(
            router.route("W2.EXAMPLE.COM.", 10250),
            to_node("w2", RouteRule::NodeAddress)
        );
        assert_eq!(
            router.route("w3", 10250),
            to_node("w3", RouteRule::NodeName)
        );
        assert_eq!(
            router.route("W3.", 10250),
            to_node("w3", RouteRule::NodeName)
        );
        assert_eq!(
            router.route("w4", 10250),
            Err(RouteError::NoRoute {
                host: "w4".to_owned()
            })
        );
        let names: Vec<&str> = router.node_names().map(|n| &**n).collect();
        assert_eq!(names, ["w1", "w2", "w3"]);
        assert!(router.conflicts().is_empty(), "{:?}", router.conflicts());

        // A node named by its IP.
        let router = Router::new(&[node("10.0.0.9", &[], &[], 22)], &RoutingConfig::default());
        assert_eq!(
            router.route("10.0.0.9", 80),
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
            router.route("10.96.5.7", 80),
            to_node("a", RouteRule::PodCidr(net("10.96.5.0/24")))
        );
        assert_eq!(
            router.route("10.96.6.7", 80),
            any_node(RouteRule::ServiceCidr(net("10.96.0.0/12")))
        );
        // A node's /24 inside another node's /16.
        assert_eq!(
            router.route("10.244.7.1", 80),
            to_node("b", RouteRule::PodCidr(net("10.244.7.0/24")))
        );
        assert_eq!(
            router.route("10.244.8.1", 80),
            to_node("a", RouteRule::PodCidr(net("10.244.0.0/16")))
        );
        // A more specific service CIDR inside a pod CIDR goes to any node.
        assert_eq!(
            router.route("10.244.7.200", 80),
            any_node(RouteRule::ServiceCidr(net("10.244.7.128/25")))
        );
        assert_eq!(
            router.route("fd00:244::5", 80),
            to_node("b", RouteRule::PodCidr(net("fd00:244::/64")))
        );
        assert_eq!(
            router.route("fd00:96::1", 80),
            any_node(RouteRule::ServiceCidr(net("fd00:96::/108")))
        );
        assert_eq!(
            router.route("::ffff:10.96.6.7", 80),
            any_node(RouteRule::ServiceCidr(net("10.96.0.0/12")))
        );
        assert_eq!(
            router.route("fd00:245::1", 80),
            Err(RouteError::NoRoute {
                host: "fd00:245::1".to_owned()
            })
        );
        // DNS names never match CIDRs.
        assert_eq!(
            router.route("svc.ns.svc.cluster.local", 80),
            Err(RouteError::NoRoute {
                host: "svc.ns.svc.cluster.local".to_owned()
            })
        );
    }

    #[test]
    fn identical_cidrs_pick_first_node_by_name_and_are_reported() {
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
                &["10.244.1.0/24", "10.244.9.0/24"],
                22,
            ),
        ];
        let router = Router::new(&nodes, &config(&["10.244.9.0/24"], DefaultRoute::Deny));
        assert_eq!(
            router.route("10.244.1.1", 80),
            to_node("alpha", RouteRule::PodCidr(net("10.244.1.0/24")))
        );
        assert_eq!(
            router.route("10.244.9.1", 80),
            to_node("alpha", RouteRule::PodCidr(net("10.244.9.0/24")))
        );
        assert_eq!(
            router.route("10.0.0.1", 80),
            to_node("alpha", RouteRule::NodeAddress)
        );
        // Every claimant's SSH port is denied.
        for port in [22, 2222] {
            assert!(matches!(
                reason(router.route("10.0.0.1", port)),
                Some(DenyReason::NodeSshPort { .. })
            ));
        }
        let conflicts = router.conflicts();
        let names = |list: &[&str]| list.iter().map(|n| Arc::from(*n)).collect::<Vec<_>>();
        assert!(conflicts.contains(&Conflict::PodCidr {
            cidr: net("10.244.1.0/24"),
            nodes: names(&["alpha", "mid", "zeta"]),
        }));
        assert!(conflicts.contains(&Conflict::PodCidr {
            cidr: net("10.244.9.0/24"),
            nodes: names(&["alpha", "mid"]),
        }));
        assert!(conflicts.contains(&Conflict::PodAndServiceCidr {
            cidr: net("10.244.9.0/24"),
            node: Arc::from("alpha"),
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
            Conflict::PodAndServiceCidr {
                cidr: net("10.244.9.0/24"),
                node: Arc::from("alpha"),
            }
            .to_string(),
            "pod CIDR 10.244.9.0/24 of node alpha is also a service CIDR; routing it to node alpha"
        );
    }

    #[test]
    fn default_route() {
        let deny = Router::new(&[], &config(&[], DefaultRoute::Deny));
        let err = deny.route("example.com", 443).expect_err("deny");
        assert_eq!(err.label(), "no_route");
        assert_eq!(err.deny_reason(), None);
        assert!(err.to_string().starts_with("no route to example.com"));
        let open = open();
        assert_eq!(
            open.route("Example.COM.", 443),
            any_node(RouteRule::Default)
        );
        assert_eq!(open.route("192.0.2.1", 443), any_node(RouteRule::Default));
    }

    #[test]
    fn messages_and_labels() {
        let router = open();
        let err = router.route("169.254.169.254", 80).expect_err("metadata");
        assert_eq!(
            err.to_string(),
            "destination 169.254.169.254 is link-local (cloud metadata); add it to \
             routing.allow_cidrs to allow"
        );
        assert_eq!(err.label(), "denied");
        assert_eq!(
            router.route("169.254.1.1", 80).expect_err("ll").to_string(),
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
            (DenyReason::InvalidHost, "invalid_host"),
        ];
        for (reason, label) in labels {
            assert_eq!(reason.label(), label);
            assert!(!reason.to_string().is_empty());
            for host in ["10.1.2.3", "fd00:ec2::254", "metadata", "a.example"] {
                let err = RouteError::Denied {
                    host: host.to_owned(),
                    port: 22,
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
        };
        assert_eq!(route.to_string(), "node w1 by node-name");
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
            Err(RouteError::Denied {
                host: String::new(),
                port,
                reason: DenyReason::NodeSshPort {
                    node: node.into(),
                    port,
                },
            })
        };
        let without_host = |r: Result<Route, RouteError>| match r {
            Err(RouteError::Denied { port, reason, .. }) => Err(RouteError::Denied {
                host: String::new(),
                port,
                reason,
            }),
            other => other,
        };
        assert_eq!(
            without_host(router.route("192.168.5.11", 2222)),
            ssh_port("a", 2222)
        );
        assert_eq!(
            without_host(router.route("::ffff:192.168.5.11", 2222)),
            ssh_port("a", 2222)
        );
        assert_eq!(
            without_host(router.route("B-MGMT.example", 22)),
            ssh_port("b", 22)
        );
        // Other ports of an SSH address are not the node's: the default.
        assert_eq!(
            router.route("192.168.5.11", 22),
            Ok(Route::AnyNode {
                rule: RouteRule::Default
            })
        );
        // An SSH address among the addresses is covered as an address.
        assert_eq!(
            without_host(router.route("10.240.0.13", 22)),
            ssh_port("c", 22)
        );
        assert_eq!(
            router.route("10.240.0.13", 80),
            to_node("c", RouteRule::NodeAddress)
        );
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
            router.route("10.244.1.1", 80),
            to_node("n", RouteRule::PodCidr(net("10.244.1.0/24")))
        );
        assert_eq!(
            router.route("10.245.0.1", 80),
            to_node("n", RouteRule::PodCidr(net("10.245.0.0/16")))
        );
        assert_eq!(canonical_net(net("::ffff:0:0/96")), net("0.0.0.0/0"));
        assert_eq!(canonical_net(net("::ffff:0:0/95")), net("::fffe:0:0/95"));
        assert_eq!(truncate("h\u{e9}llo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
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
            let deny = |reason| {
                Err(RouteError::Denied {
                    host: host.to_owned(),
                    port,
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
            // (node, via address?) for every node that has `matches`.
            let claimants = |matches: &dyn Fn(&str) -> bool| -> Vec<(&RouteNode, bool)> {
                sorted
                    .iter()
                    .filter_map(|n| {
                        if n.addresses.iter().any(|a| matches(a)) {
                            Some((*n, true))
                        } else if matches(&n.name) {
                            Some((*n, false))
                        } else {
                            None
                        }
                    })
                    .collect()
            };
            let node_route = |claimants: Vec<(&RouteNode, bool)>| {
                let (first, by_address) = claimants.first()?;
                if let Some((n, _)) = claimants.iter().find(|(n, _)| n.ssh_port == port) {
                    return Some(deny(DenyReason::NodeSshPort {
                        node: Arc::from(n.name.as_str()),
                        port,
                    }));
                }
                Some(Ok(Route::Node {
                    node: Arc::from(first.name.as_str()),
                    rule: if *by_address {
                        RouteRule::NodeAddress
                    } else {
                        RouteRule::NodeName
                    },
                }))
            };
            let default = || match cfg.default {
                DefaultRoute::Deny => Err(RouteError::NoRoute {
                    host: host.to_owned(),
                }),
                DefaultRoute::AnyNode => Ok(Route::AnyNode {
                    rule: RouteRule::Default,
                }),
            };

            let Ok(ip) = host.parse::<IpAddr>() else {
                let name = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
                if name == "localhost" {
                    return deny(DenyReason::LocalhostName);
                }
                if name == "metadata" {
                    return deny(DenyReason::CloudMetadata);
                }
                if !port_ok {
                    return deny(DenyReason::Port(port));
                }
                let found = claimants(&|a: &str| {
                    a.strip_suffix('.').unwrap_or(a).eq_ignore_ascii_case(&name)
                });
                return node_route(found).unwrap_or_else(default);
            };
            let ip = canonical(ip);

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
            ];
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
            for (n, verdict) in candidates {
                if !n.contains(&ip) {
                    continue;
                }
                let better = match &best {
                    None => true,
                    Some((len, current)) => {
                        n.prefix_len() > *len
                            || (n.prefix_len() == *len && verdict.is_none() && current.is_some())
                    }
                };
                if better {
                    best = Some((n.prefix_len(), verdict));
                }
            }
            if let Some((_, Some(reason))) = best {
                return deny(reason);
            }
            if !port_ok {
                return deny(DenyReason::Port(port));
            }
            let found = claimants(&|a: &str| a.parse::<IpAddr>().is_ok_and(|a| canonical(a) == ip));
            if let Some(result) = node_route(found) {
                return result;
            }
            // (prefix length, is service, node) of the best CIDR.
            let mut best: Option<(u8, Route)> = None;
            let pods = sorted.iter().flat_map(|n| {
                n.pod_cidrs.iter().map(move |c| {
                    (
                        *c,
                        Route::Node {
                            node: Arc::from(n.name.as_str()),
                            rule: RouteRule::PodCidr(*c),
                        },
                    )
                })
            });
            let services = cfg.service_cidrs.iter().map(|c| {
                (
                    *c,
                    Route::AnyNode {
                        rule: RouteRule::ServiceCidr(*c),
                    },
                )
            });
            for (c, route) in pods.chain(services) {
                if c.contains(&ip) && best.as_ref().is_none_or(|(len, _)| c.prefix_len() > *len) {
                    best = Some((c.prefix_len(), route));
                }
            }
            match best {
                Some((_, route)) => Ok(route),
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
                    let got = router.route(host, *port);
                    let want = reference(&nodes, &cfg, host, *port);
                    prop_assert_eq!(got, want, "host {} port {}", host, port);
                }
            }
        }
    }
}
