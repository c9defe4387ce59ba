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
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use ipnet::IpNet;

use crate::destination::{Destination, Host};

mod config;
mod policy;
mod table;
#[cfg(test)]
mod tests;

pub use config::{DefaultRoute, RoutingConfig};
pub use policy::{DenyReason, BUILTIN_DENIALS, METADATA_NAMES};

use policy::{build_policy, denied_message, is_localhost_name, is_metadata_name, Policy};
use table::{canonical_net, FastMap, PrefixMap};

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
    /// A node's pod CIDR that cannot be its pod CIDR (outside
    /// `routing.cluster_cidrs`, overlapping a service CIDR or a denied
    /// range, or covering another node's address): ignored for routing, so
    /// that a node cannot claim a service's or another node's traffic, or
    /// every address no other rule owns, by the pod CIDRs it announces.
    IgnoredPodCidr {
        /// The node.
        node: Arc<str>,
        /// The CIDR.
        cidr: IpNet,
        /// Why it is ignored.
        why: IgnoredPodWhy,
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
    /// It is in this `routing.cluster_cidrs` entry: a pod address.
    ClusterCidr(IpNet),
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

/// Why a pod CIDR is [`Conflict::IgnoredPodCidr`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum IgnoredPodWhy {
    /// `routing.cluster_cidrs` is set and no entry contains it.
    OutsideClusterCidrs,
    /// It overlaps this service CIDR.
    ServiceCidr(IpNet),
    /// It overlaps a range the destination policy refuses, for this reason.
    Denied(DenyReason),
    /// It contains this address of another node.
    NodeAddress {
        /// The other node.
        node: Arc<str>,
        /// Its address.
        address: IpAddr,
    },
}

impl Conflict {
    /// A short, stable label for metrics: `pod_cidr`, `ignored_pod_cidr`,
    /// `shared_address`, `unusable_address` or `ignored_address`.
    pub fn label(&self) -> &'static str {
        match self {
            Conflict::PodCidr { .. } => "pod_cidr",
            Conflict::IgnoredPodCidr { .. } => "ignored_pod_cidr",
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
            Conflict::IgnoredPodCidr { node, cidr, why } => {
                write!(f, "pod CIDR {cidr} of node {node} ")?;
                match why {
                    IgnoredPodWhy::OutsideClusterCidrs => {
                        f.write_str("is outside routing.cluster_cidrs")?
                    }
                    IgnoredPodWhy::ServiceCidr(net) => write!(f, "overlaps service CIDR {net}")?,
                    IgnoredPodWhy::Denied(reason) => {
                        write!(f, "overlaps a range refused by policy ({reason})")?
                    }
                    IgnoredPodWhy::NodeAddress { node, address } => {
                        write!(f, "contains address {address} of node {node}")?
                    }
                }
                f.write_str("; ignoring it")
            }
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
                    IgnoredWhy::ClusterCidr(net) => {
                        write!(f, "is in routing.cluster_cidrs {net} (a pod address)")?
                    }
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

        let services = ServiceCidrs::new(&config.service_cidrs);
        let cluster: Vec<IpNet> = config
            .cluster_cidrs
            .iter()
            .map(|c| canonical_net(*c))
            .collect();
        // Ownership between nodes is decided among the claims that pass
        // the checks that involve no other node: addresses not refused, not
        // in a service CIDR, not in routing.cluster_cidrs (`node_ips`), and
        // pod CIDRs inside routing.cluster_cidrs (when set), overlapping no
        // service CIDR and no refused range (`announced`). Among those, a
        // pod CIDR that covers another node's address and the address
        // itself are both ignored: either could be the forgery, and
        // refusing both turns a capture into a visible denial of service.
        let mut node_ips: Vec<(IpAddr, usize)> = sorted
            .iter()
            .enumerate()
            .flat_map(|(index, node)| {
                node.addresses
                    .iter()
                    .chain(std::iter::once(&node.name))
                    .filter_map(move |a| Host::parse(a).ok()?.ip().map(|ip| (ip, index)))
            })
            .filter(|(ip, _)| {
                node_independent_address_check(*ip, &services, &cluster, &policy).is_none()
            })
            .collect();
        node_ips.sort_unstable();

        let mut announced: BTreeMap<IpNet, Vec<usize>> = BTreeMap::new();
        let mut pod_owners: BTreeMap<IpNet, Vec<usize>> = BTreeMap::new();
        let ignore_pod = |conflicts: &mut Vec<Conflict>, index: usize, net, why| {
            conflicts.push(Conflict::IgnoredPodCidr {
                node: names.get(index).cloned().unwrap_or_default(),
                cidr: net,
                why,
            });
        };
        for (index, node) in sorted.iter().enumerate() {
            // A CIDR a node lists twice (or in two spellings) counts once.
            let mut nets: Vec<IpNet> = node.pod_cidrs.iter().map(|c| canonical_net(*c)).collect();
            nets.sort_unstable();
            nets.dedup();
            for net in nets {
                if let Some(why) = node_independent_pod_check(net, &cluster, &services, &policy) {
                    ignore_pod(&mut conflicts, index, net, why);
                    continue;
                }
                let owners = announced.entry(net).or_default();
                if !owners.contains(&index) {
                    owners.push(index);
                }
                if let Some(why) = covered_address(net, index, &node_ips, &names) {
                    ignore_pod(&mut conflicts, index, net, why);
                    continue;
                }
                let owners = pod_owners.entry(net).or_default();
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
        // Kept pod CIDRs never overlap a service CIDR.
        for cidr in &config.service_cidrs {
            let net = canonical_net(*cidr);
            if routes.get(net).is_none() {
                routes.insert(net, Target::Service);
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
                        let ignored =
                            node_independent_address_check(ip, &services, &cluster, &policy)
                                .or_else(|| in_announced_pod_cidr(ip, index, &announced, &names));
                        if let Some(why) = ignored {
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

    fn default_route_for(&self, dest: &Destination) -> Result<Route, RouteError> {
        match self.default {
            DefaultRoute::Deny => Err(RouteError::NoRoute { dest: dest.clone() }),
            DefaultRoute::AnyNode => Ok(Route::AnyNode {
                rule: RouteRule::Default,
            }),
        }
    }
}

/// Why `ip` cannot be any node's address, whatever the other nodes claim:
/// the policy refuses it, it is in a service CIDR, or it is in
/// `routing.cluster_cidrs` (a pod address).
fn node_independent_address_check(
    ip: IpAddr,
    services: &ServiceCidrs,
    cluster: &[IpNet],
    policy: &PrefixMap<Policy>,
) -> Option<IgnoredWhy> {
    if let Some((_, Policy::Deny(reason))) = policy.longest(ip) {
        return Some(IgnoredWhy::Denied(reason.clone()));
    }
    if let Some(net) = services.containing(ip) {
        return Some(IgnoredWhy::ServiceCidr(net));
    }
    cluster
        .iter()
        .find(|c| c.contains(&ip))
        .map(|c| IgnoredWhy::ClusterCidr(*c))
}

/// The announced pod CIDR of another node than `index` that contains `ip`,
/// the most specific first.
fn in_announced_pod_cidr(
    ip: IpAddr,
    index: usize,
    announced: &BTreeMap<IpNet, Vec<usize>>,
    names: &[Arc<str>],
) -> Option<IgnoredWhy> {
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (0..=max).rev().find_map(|len| {
        let net = IpNet::new(ip, len).ok()?.trunc();
        let other = announced.get(&net)?.iter().find(|o| **o != index)?;
        Some(IgnoredWhy::PodCidr {
            cidr: net,
            node: names.get(*other).cloned().unwrap_or_default(),
        })
    })
}

/// Why `net` cannot be any node's pod CIDR, whatever the other nodes
/// claim: outside `routing.cluster_cidrs` (when set), overlapping a service
/// CIDR, or overlapping a range the policy refuses (its first address is
/// refused, or it contains the first address of a denied range that is
/// still refused).
fn node_independent_pod_check(
    net: IpNet,
    cluster: &[IpNet],
    services: &ServiceCidrs,
    policy: &PrefixMap<Policy>,
) -> Option<IgnoredPodWhy> {
    if !cluster.is_empty() && !cluster.iter().any(|c| c.contains(&net)) {
        return Some(IgnoredPodWhy::OutsideClusterCidrs);
    }
    if let Some(service) = services.overlapping(net) {
        return Some(IgnoredPodWhy::ServiceCidr(service));
    }
    if let Some((_, Policy::Deny(reason))) = policy.longest(net.network()) {
        return Some(IgnoredPodWhy::Denied(reason.clone()));
    }
    policy
        .iter()
        .filter(|(denied, p)| matches!(p, Policy::Deny(_)) && net.contains(&denied.network()))
        .find_map(|(denied, _)| match policy.longest(denied.network()) {
            Some((_, Policy::Deny(reason))) => Some(IgnoredPodWhy::Denied(reason.clone())),
            _ => None,
        })
}

/// An address of another node than `index` inside `net` (`node_ips`:
/// sorted, the addresses that pass the node-independent checks).
fn covered_address(
    net: IpNet,
    index: usize,
    node_ips: &[(IpAddr, usize)],
    names: &[Arc<str>],
) -> Option<IgnoredPodWhy> {
    let start = node_ips.partition_point(|(ip, _)| *ip < net.network());
    node_ips
        .get(start..)
        .unwrap_or_default()
        .iter()
        .take_while(|(ip, _)| net.contains(ip))
        .find(|(_, owner)| *owner != index)
        .map(|&(address, node)| IgnoredPodWhy::NodeAddress {
            node: names.get(node).cloned().unwrap_or_default(),
            address,
        })
}

/// The service CIDRs, for the ownership checks: which one contains an
/// address, and which one overlaps a CIDR.
struct ServiceCidrs {
    /// By prefix, for containment.
    map: PrefixMap<()>,
    /// Sorted by first address, for the ones inside a CIDR.
    sorted: Vec<IpNet>,
}

impl ServiceCidrs {
    fn new(cidrs: &[IpNet]) -> ServiceCidrs {
        let mut map = PrefixMap::default();
        let mut sorted: Vec<IpNet> = cidrs.iter().map(|c| canonical_net(*c)).collect();
        sorted.sort_unstable_by_key(|n| (n.network(), n.prefix_len()));
        sorted.dedup();
        for net in &sorted {
            map.insert(*net, ());
        }
        map.finish();
        ServiceCidrs { map, sorted }
    }

    /// The most specific service CIDR containing `ip`.
    fn containing(&self, ip: IpAddr) -> Option<IpNet> {
        self.map.longest(ip).map(|(net, ())| *net)
    }

    /// A service CIDR that overlaps `net`: one containing its first address
    /// (it contains `net`, or `net` contains it), or one that starts inside
    /// `net`.
    fn overlapping(&self, net: IpNet) -> Option<IpNet> {
        if let Some(service) = self.containing(net.network()) {
            return Some(service);
        }
        let start = self.sorted.partition_point(|s| s.network() < net.network());
        self.sorted
            .get(start)
            .filter(|s| net.contains(&s.network()))
            .copied()
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
