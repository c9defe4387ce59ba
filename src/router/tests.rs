//! Unit tests of the router, including the property test that compares
//! it with a linear-scan reference.

use super::table::PrefixKey;
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
    let crate::field_error::FieldError { key, reason: why } = port0.validate().expect_err("port 0");
    assert_eq!(key, "allow_ports");
    assert!(why.contains("port 0"), "{why}");

    let host_bits = RoutingConfig {
        service_cidrs: vec![net("10.96.0.1/12")],
        ..RoutingConfig::default()
    };
    let crate::field_error::FieldError { key, reason: why } =
        host_bits.validate().expect_err("host bits");
    assert_eq!(key, "service_cidrs");
    assert!(why.contains("10.96.0.0/12"), "{why}");

    let both = RoutingConfig {
        deny_cidrs: vec![net("::ffff:10.0.0.0/104")],
        allow_cidrs: vec![net("10.0.0.0/8")],
        ..RoutingConfig::default()
    };
    assert_eq!(both.validate().expect_err("both").key, "allow_cidrs");
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
    // A pod /24 inside a service /12 is no pod CIDR: the service keeps it.
    assert_eq!(
        router.route_str("10.96.5.7", 80),
        any_node(RouteRule::ServiceCidr(net("10.96.0.0/12")))
    );
    assert_eq!(
        router.route_str("10.96.6.7", 80),
        any_node(RouteRule::ServiceCidr(net("10.96.0.0/12")))
    );
    // A pod CIDR around a service CIDR is no pod CIDR either (a's /16 and
    // b's /24 both hold the service /25): the service keeps its range, the
    // rest of them routes nowhere.
    assert_eq!(
        router.route_str("10.244.7.200", 80),
        any_node(RouteRule::ServiceCidr(net("10.244.7.128/25")))
    );
    for host in ["10.244.7.1", "10.244.8.1"] {
        assert_eq!(
            router.route_str(host, 80),
            Err(RouteError::NoRoute {
                dest: dest(host, 80)
            }),
            "{host}"
        );
    }
    // Without it, a node's /24 inside another node's /16: the overlapped
    // range goes to neither, the rest of the /16 to its node.
    let router = Router::new(&nodes, &config(&[], DefaultRoute::Deny));
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
    let router = Router::new(
        &nodes,
        &config(
            &["10.96.0.0/12", "10.244.7.128/25", "fd00:96::/108"],
            DefaultRoute::Deny,
        ),
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
    assert!(conflicts.contains(&Conflict::IgnoredPodCidr {
        node: Arc::from("mid"),
        cidr: net("10.244.20.0/24"),
        why: IgnoredPodWhy::ServiceCidr(net("10.244.20.0/24")),
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
    // A ClusterIP stays a service.
    assert_eq!(
        router.route_str("10.96.0.10", 443),
        any_node(RouteRule::ServiceCidr(net("10.96.0.0/12")))
    );
    // An address inside another node's pod CIDR: without
    // routing.cluster_cidrs nobody can tell which claim is forged, so the
    // address and the pod CIDR are both ignored (denial of service, never
    // capture); with it, the address is a pod address and only it goes.
    assert_eq!(
        router.route_str("10.244.1.5", 8080),
        Err(RouteError::NoRoute {
            dest: dest("10.244.1.5", 8080)
        })
    );
    let with_cluster = RoutingConfig {
        cluster_cidrs: vec![net("10.244.0.0/16")],
        ..cfg.clone()
    };
    let clustered = Router::new(&nodes, &with_cluster);
    assert_eq!(
        clustered.route_str("10.244.1.5", 8080),
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
    assert_eq!(
        clustered.route_str("10.244.2.9", 10250),
        to_node("evil", RouteRule::PodCidr(net("10.244.2.0/24")))
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

/// A compromised node may announce any pod CIDR on its Node object: a
/// pod CIDR that covers another node's address, a service range, a
/// refused range, or lies outside the cluster's pod ranges is no pod CIDR.
#[test]
fn a_node_cannot_claim_traffic_by_the_pod_cidrs_it_announces() {
    let good = node("good", &["10.0.0.1"], &["10.244.1.0/24"], 22);
    let evil = |cidrs: &[&str]| node("evil", &["10.0.0.2"], cidrs, 22);
    let cfg = config(&["10.96.0.0/12"], DefaultRoute::Deny);
    let ignored = |router: &Router| -> Vec<(IpNet, IgnoredPodWhy)> {
        router
            .conflicts()
            .iter()
            .filter_map(|c| match c {
                Conflict::IgnoredPodCidr { cidr, why, .. } => Some((*cidr, why.clone())),
                _ => None,
            })
            .collect()
    };

    // A pod CIDR over another node's address: neither the CIDR nor the
    // address routes (either could be the forged one) ...
    let router = Router::new(&[good.clone(), evil(&["10.0.0.0/24"])], &cfg);
    for host in ["10.0.0.1", "10.0.0.77"] {
        assert_eq!(
            router.route_str(host, 10250),
            Err(RouteError::NoRoute {
                dest: dest(host, 10250)
            }),
            "{host}"
        );
    }
    assert_eq!(
        ignored(&router),
        [(
            net("10.0.0.0/24"),
            IgnoredPodWhy::NodeAddress {
                node: Arc::from("good"),
                address: "10.0.0.1".parse().expect("IP"),
            }
        )]
    );
    // ... and with routing.cluster_cidrs, the forged CIDR is outside the
    // pod ranges: only it goes, the address stays its node's.
    let clustered = RoutingConfig {
        cluster_cidrs: vec![net("10.244.0.0/16")],
        ..cfg.clone()
    };
    let router = Router::new(&[good.clone(), evil(&["10.0.0.0/24"])], &clustered);
    assert_eq!(
        router.route_str("10.0.0.1", 10250),
        to_node("good", RouteRule::NodeAddress)
    );
    assert_eq!(
        router.route_str("good", 10250),
        to_node_at("good", RouteRule::NodeName, "10.0.0.1")
    );
    assert_eq!(
        ignored(&router),
        [(net("10.0.0.0/24"), IgnoredPodWhy::OutsideClusterCidrs)]
    );

    // A slice of the service range, or a CIDR around it: services stay
    // services.
    for cidr in ["10.96.5.0/24", "10.0.0.0/8"] {
        let router = Router::new(&[good.clone(), evil(&[cidr])], &cfg);
        assert_eq!(
            router.route_str("10.96.5.7", 443),
            any_node(RouteRule::ServiceCidr(net("10.96.0.0/12"))),
            "{cidr}"
        );
        assert_eq!(
            ignored(&router),
            [(net(cidr), IgnoredPodWhy::ServiceCidr(net("10.96.0.0/12")))],
            "{cidr}"
        );
    }

    // Everything: a /0 covers the built-in denials (and here nodes'
    // addresses), so it is no pod CIDR; what routing.default = "deny"
    // refuses stays refused.
    let router = Router::new(
        &[good.clone(), evil(&["0.0.0.0/0"])],
        &config(&[], DefaultRoute::Deny),
    );
    assert_eq!(
        router.route_str("192.0.2.1", 80),
        Err(RouteError::NoRoute {
            dest: dest("192.0.2.1", 80)
        })
    );
    assert!(matches!(
        ignored(&router).as_slice(),
        [(_, IgnoredPodWhy::Denied(_))]
    ));

    // routing.cluster_cidrs: only pod CIDRs inside the cluster's ranges.
    let cluster = RoutingConfig {
        cluster_cidrs: vec![net("10.244.0.0/16")],
        ..cfg.clone()
    };
    let router = Router::new(&[good.clone(), evil(&["192.168.7.0/24"])], &cluster);
    assert_eq!(
        router.route_str("192.168.7.9", 80),
        Err(RouteError::NoRoute {
            dest: dest("192.168.7.9", 80)
        })
    );
    assert_eq!(
        router.route_str("10.244.1.9", 80),
        to_node("good", RouteRule::PodCidr(net("10.244.1.0/24")))
    );
    assert_eq!(
        ignored(&router),
        [(net("192.168.7.0/24"), IgnoredPodWhy::OutsideClusterCidrs)]
    );
    let text = router
        .conflicts()
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>();
    assert_eq!(
        text,
        ["pod CIDR 192.168.7.0/24 of node evil is outside routing.cluster_cidrs; ignoring it"]
    );

    // An address announced inside another node's pod CIDR costs both: the
    // address is ignored and the CIDR (it covers another node's address) is
    // too; neither node gets the range.
    let router = Router::new(
        &[
            good.clone(),
            node("evil", &["10.0.0.2", "10.244.1.5"], &[], 22),
        ],
        &cfg,
    );
    assert_eq!(
        router.route_str("10.244.1.5", 80),
        Err(RouteError::NoRoute {
            dest: dest("10.244.1.5", 80)
        })
    );
    assert_eq!(router.conflicts().len(), 2, "{:?}", router.conflicts());
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
    use super::{net, RouteText};
    use ipnet::{Ipv4Net, Ipv6Net};
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
            prop::collection::vec(cluster_cidr(), 0..2),
        )
            .prop_map(
                |(service_cidrs, any_node, allow_ports, deny_cidrs, allow_cidrs, cluster_cidrs)| {
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
                        cluster_cidrs,
                    }
                },
            )
    }

    /// A wide range of the address space the tables draw from.
    fn cluster_cidr() -> impl Strategy<Value = IpNet> {
        prop::sample::select(vec![
            net("10.0.0.0/22"),
            net("10.0.0.0/23"),
            net("10.0.2.0/24"),
            net("fd00::/110"),
        ])
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

        let overlaps = |a: &IpNet, b: &IpNet| a.contains(&b.network()) || b.contains(&a.network());
        // Addresses that may be some node's, whatever the others claim.
        let candidate = |a: IpAddr| -> bool {
            !matches!(verdict(a), Some(Some(_)))
                && !cfg.service_cidrs.iter().any(|s| s.contains(&a))
                && !cfg.cluster_cidrs.iter().any(|c| c.contains(&a))
        };
        // Every node's candidate IP addresses (and names that are IPs).
        let node_ips: Vec<(IpAddr, usize)> = sorted
            .iter()
            .enumerate()
            .flat_map(|(i, n)| {
                n.addresses
                    .iter()
                    .chain(std::iter::once(&n.name))
                    .filter_map(move |a| Host::parse(a).ok()?.ip().map(|ip| (ip, i)))
            })
            .filter(|(ip, _)| candidate(*ip))
            .collect();
        let denied_nets: Vec<IpNet> = builtin
            .iter()
            .filter_map(|(n, _)| n.parse::<IpNet>().ok())
            .chain(cfg.deny_cidrs.iter().copied())
            .collect();
        // Pod CIDRs that may be some node's, whatever the others claim.
        let announced = |c: &IpNet| -> bool {
            if !cfg.cluster_cidrs.is_empty() && !cfg.cluster_cidrs.iter().any(|cc| cc.contains(c)) {
                return false;
            }
            if cfg.service_cidrs.iter().any(|s| overlaps(s, c)) {
                return false;
            }
            if matches!(verdict(c.network()), Some(Some(_))) {
                return false;
            }
            !denied_nets
                .iter()
                .any(|d| c.contains(&d.network()) && matches!(verdict(d.network()), Some(Some(_))))
        };
        // Whether pod CIDR `c` of node `i` is kept.
        let kept = |i: usize, c: &IpNet| -> bool {
            announced(c) && !node_ips.iter().any(|(ip, j)| *j != i && c.contains(ip))
        };
        // The best pod or service CIDR for an IP: (CIDR, None for a
        // service CIDR or the indexes of every node whose kept pod CIDRs
        // cover the IP).
        let cidr_route = |ip: IpAddr| -> Option<(IpNet, Option<Vec<usize>>)> {
            let mut best: Option<(IpNet, Option<Vec<usize>>)> = None;
            for (i, n) in sorted.iter().enumerate() {
                for c in n.pod_cidrs.iter().filter(|c| kept(i, c)) {
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
                    .filter(|(i, n)| n.pod_cidrs.iter().any(|c| kept(*i, c) && c.contains(&ip)))
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
        // Whether node `i` may have IP address `a` as a node address: a
        // candidate in no pod CIDR another node announced (kept or not).
        let usable = |i: usize, a: IpAddr| -> bool {
            candidate(a)
                && !sorted.iter().enumerate().any(|(j, n)| {
                    j != i && n.pod_cidrs.iter().any(|c| announced(c) && c.contains(&a))
                })
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
                let found = claimants(&|h: &Host| matches!(h, Host::Name(n) if n.as_str() == name));
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
