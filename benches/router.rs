//! Router lookups at cluster scale: 5,000 nodes (each with an address, a DNS
//! address and a pod CIDR) and 5,000 service CIDRs of eight different prefix
//! lengths, i.e. 10,000 CIDRs, queried for a pod IP, a service IP, a node
//! address, a node name and misses; plus building the router.

use std::hint::black_box;
use std::net::Ipv4Addr;

use criterion::{criterion_group, criterion_main, Criterion};
use ipnet::{IpNet, Ipv4Net};
use nodetunnel::destination::{Destination, Host};
use nodetunnel::router::{DefaultRoute, Route, RouteNode, Router, RoutingConfig};

const NODES: u32 = 5_000;
const SERVICE_CIDRS: u32 = 5_000;

fn v4net(addr: u32, len: u8) -> IpNet {
    match Ipv4Net::new(Ipv4Addr::from(addr), len) {
        Ok(net) => IpNet::V4(net.trunc()),
        Err(err) => panic!("bench table: {err}"),
    }
}

fn inventory() -> (Vec<RouteNode>, RoutingConfig) {
    let nodes = (0..NODES)
        .map(|i| RouteNode {
            name: format!("node-{i:05}"),
            addresses: vec![
                Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 0)) + i).to_string(),
                format!("node-{i:05}.cluster.example"),
            ],
            // 10.64.0.0/24, 10.64.1.0/24, ... one /24 per node.
            pod_cidrs: vec![v4net(u32::from(Ipv4Addr::new(10, 64, 0, 0)) + (i << 8), 24)],
            ssh_port: 22,
            ssh_address: None,
        })
        .collect();
    // One /10 beside the pod CIDRs (a pod CIDR may not overlap a service
    // CIDR), then 5,000 disjoint service CIDRs of lengths /21 to /28 in
    // 100.64.0.0/10.
    let mut service_cidrs = vec![v4net(u32::from(Ipv4Addr::new(10, 128, 0, 0)), 10)];
    service_cidrs.extend((1..SERVICE_CIDRS).map(|i| {
        let len = 21 + (i % 8) as u8;
        v4net(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + (i << 11), len)
    }));
    let config = RoutingConfig {
        service_cidrs,
        default: DefaultRoute::Deny,
        ..RoutingConfig::default()
    };
    (nodes, config)
}

/// `host:443`, parsed as the front door parses it (once per connection,
/// before routing).
fn dest(host: &str) -> Destination {
    match Host::parse(host) {
        Ok(host) => Destination::new(host, 443),
        Err(err) => panic!("bench host {host}: {err}"),
    }
}

fn expect_route(router: &Router, host: &str, want_node: bool) {
    match router.route(&dest(host)) {
        Ok(Route::Node { .. }) if want_node => {}
        Ok(Route::AnyNode { .. }) if !want_node => {}
        other => panic!("bench query {host}: unexpected {other:?}"),
    }
}

fn lookups(c: &mut Criterion) {
    let (nodes, config) = inventory();
    let router = Router::new(&nodes, &config);
    assert!(router.conflicts().is_empty());

    // node-01234's pod CIDR is 10.68.210.0/24.
    let pod_ip = "10.68.210.17";
    // Service CIDR number 1000: 100.64.0.0 + 1000 * 2048 = 100.95.64.0/21.
    let service_ip = "100.95.64.9";
    let node_address = "172.16.19.135";
    let node_name = "node-04999";
    let node_dns = "Node-02500.cluster.example.";
    expect_route(&router, pod_ip, true);
    expect_route(&router, service_ip, false);
    expect_route(&router, node_address, true);
    expect_route(&router, node_name, true);
    expect_route(&router, node_dns, true);
    assert!(router.route(&dest("192.0.2.1")).is_err());

    let mut group = c.benchmark_group("route");
    group.bench_function("pod_ip", |b| {
        let d = dest(pod_ip);
        b.iter(|| router.route(black_box(&d)))
    });
    group.bench_function("service_ip", |b| {
        let d = dest(service_ip);
        b.iter(|| router.route(black_box(&d)))
    });
    group.bench_function("node_address", |b| {
        let d = dest(node_address);
        b.iter(|| router.route(black_box(&d)))
    });
    group.bench_function("node_name", |b| {
        let d = dest(node_name);
        b.iter(|| router.route(black_box(&d)))
    });
    group.bench_function("node_dns_mixed_case", |b| {
        let d = dest(node_dns);
        b.iter(|| router.route(black_box(&d)))
    });
    group.bench_function("miss_ip", |b| {
        let d = dest("192.0.2.1");
        b.iter(|| router.route(black_box(&d)))
    });
    group.bench_function("miss_name", |b| {
        let d = dest("example.org");
        b.iter(|| router.route(black_box(&d)))
    });
    group.bench_function("denied_loopback", |b| {
        let d = dest("127.0.0.1");
        b.iter(|| router.route(black_box(&d)))
    });
    group.finish();
}

fn build(c: &mut Criterion) {
    let (nodes, config) = inventory();
    let mut group = c.benchmark_group("build");
    group.sample_size(10);
    group.bench_function("5000_nodes_10000_cidrs", |b| {
        b.iter(|| Router::new(black_box(&nodes), black_box(&config)))
    });
    group.finish();
}

criterion_group!(benches, lookups, build);
criterion_main!(benches);
