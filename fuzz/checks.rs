//! The properties the fuzz targets check, one function per target. Each
//! takes arbitrary bytes and panics when a property fails. The same file is
//! compiled into the libFuzzer binaries (fuzz/fuzz_targets/*.rs) and into
//! tests/fuzz_regressions.rs, which replays the kept inputs
//! (fuzz/regressions/<target>/ and fuzz/seeds/<target>/) without a fuzzer.
//!
//! Beyond "never panics", each parser must agree with itself and with its
//! neighbours:
//!
//! - `connect_target`: an accepted target has a non-empty host and a port
//!   in 1..=65535, and its normalised form parses back to itself (so what
//!   the router and logs see is what a client could have sent).
//! - `socks5`: a complete message never uses more bytes than it was given,
//!   parses the same without the bytes after it, and every strict prefix of
//!   it is "incomplete" (never an error): the server reads messages in
//!   pieces. A request's destination, written as a CONNECT target, parses
//!   to the same destination on the HTTP listener.
//! - `known_hosts`: parsing never fails; every line is an entry, a warning
//!   or blank/comment, with warnings in line order; lookups of any host
//!   never panic, and a key added at run time is trusted unless revoked.
//! - `config`: a refusal is one line (`file: key: reason`); an accepted
//!   configuration builds a router that routes without panicking.
//! - `client_dispatch`: the vendored russh client's handling of decrypted
//!   packets after authentication (what a hostile node can send once the
//!   transport is up), configured as nodetunnel configures it: never
//!   panics, and no channel is ever handed more data than its window (the
//!   fuzzed session consumes nothing, so the window never re-opens).
//!   Input: packets as `u16 big-endian length, payload`, payload first
//!   byte the message type.
#![allow(dead_code)]

use std::path::Path;

use nodetunnel::config::Config;
use nodetunnel::dial::{Destination, Host};
use nodetunnel::known_hosts::{HostKeyStatus, KnownHosts};
use nodetunnel::proxy::{parse_connect_target, parse_greeting, parse_request, Parsed, Socks5Error};
use nodetunnel::router::{RouteNode, Router, RoutingConfig};
use russh::keys::PublicKey;

/// A fixed host key for known_hosts lookups.
const HOST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPLMpw7UTFJ1WWU6V/mqtCLxEtrEcuikHhOniMjSWmuP fuzz";

/// A router with one node, a pod CIDR and a service CIDR, as a front door
/// would ask it about a parsed destination.
fn router() -> Router {
    let node = RouteNode {
        name: "node-1".into(),
        addresses: vec!["10.240.0.11".into(), "node-1.example".into()],
        pod_cidrs: vec!["10.244.1.0/24".parse().expect("cidr")],
        ssh_port: 22,
        ssh_address: Some("192.168.5.11".into()),
    };
    let config = RoutingConfig {
        service_cidrs: vec!["10.96.0.0/12".parse().expect("cidr")],
        ..RoutingConfig::default()
    };
    Router::new(&[node], &config)
}

/// Route `dest`; the answer does not matter, only that it is given.
fn route(dest: &Destination) {
    match router().route(dest) {
        Ok(route) => {
            let _ = route.to_string();
        }
        Err(error) => {
            let _ = error.to_string();
        }
    }
}

/// The HTTP CONNECT request-target parser.
pub fn connect_target(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_connect_target(text) {
        Ok(dest) => {
            assert!(
                !dest.host.to_string().is_empty(),
                "{text:?}: empty host accepted"
            );
            assert_ne!(dest.port, 0, "{text:?}: port 0 accepted");
            let normalised = dest.to_string();
            assert_eq!(
                parse_connect_target(&normalised),
                Ok(dest.clone()),
                "{text:?} was accepted as {normalised:?}, which does not parse back to itself"
            );
            route(&dest);
        }
        Err(error) => {
            let _ = error.to_string();
        }
    }
}

/// Checks shared by both SOCKS5 parsers: bounds, prefix and suffix
/// behaviour of a complete message.
fn socks5_message<T, F>(data: &[u8], parse: F) -> Option<T>
where
    T: PartialEq + std::fmt::Debug + Clone,
    F: Fn(&[u8]) -> Result<Parsed<T>, Socks5Error>,
{
    match parse(data) {
        Ok(Parsed::Complete(message, used)) => {
            assert!(used <= data.len(), "used {used} of {} bytes", data.len());
            assert!(used >= 2, "a message of {used} bytes");
            assert_eq!(
                parse(&data[..used]),
                Ok(Parsed::Complete(message.clone(), used)),
                "trailing bytes changed the message"
            );
            for end in 0..used {
                assert_eq!(
                    parse(&data[..end]),
                    Ok(Parsed::Incomplete),
                    "a {end}-byte prefix of a complete {used}-byte message is not incomplete"
                );
            }
            Some(message)
        }
        Ok(Parsed::Incomplete) => {
            assert!(
                data.len() < 262 + 2,
                "{} bytes still incomplete",
                data.len()
            );
            None
        }
        Err(error) => {
            let _ = error.to_string();
            match error {
                Socks5Error::BadVersion(v) => {
                    assert_eq!(Some(&v), data.first());
                    assert_ne!(v, 5);
                    assert_eq!(error.reply_code(), None);
                }
                _ => assert!(error.reply_code().is_some(), "{error:?} has no reply"),
            }
            None
        }
    }
}

/// The SOCKS5 greeting and request parsers.
pub fn socks5(data: &[u8]) {
    if let Some(greeting) = socks5_message(data, parse_greeting) {
        assert_eq!(
            greeting.offers_no_auth(),
            greeting.methods.contains(&0),
            "{greeting:?}"
        );
    }
    // The request may follow the greeting in the same read, or come alone.
    let mut requests = vec![data];
    if let Ok(Parsed::Complete(_, used)) = parse_greeting(data) {
        requests.push(&data[used..]);
    }
    for bytes in requests {
        if let Some(request) = socks5_message(bytes, parse_request) {
            let dest = request.destination;
            assert!(!dest.host.to_string().is_empty(), "empty host accepted");
            if dest.port != 0 {
                let target = dest.to_string();
                assert_eq!(
                    parse_connect_target(&target),
                    Ok(dest.clone()),
                    "SOCKS5 accepted {dest:?}; the same destination as a CONNECT target \
                     {target:?} parses differently"
                );
            }
            route(&dest);
        }
    }
}

/// Host names to look up in a fuzzed known_hosts file: fixed ones, and the
/// patterns of its first line taken literally.
fn lookup_hosts(text: &str) -> Vec<(String, u16)> {
    let mut hosts: Vec<(String, u16)> = vec![
        ("node-1".into(), 22),
        ("10.0.0.7".into(), 2222),
        ("fd00::7".into(), 22),
        ("".into(), 22),
    ];
    let first = text.lines().next().unwrap_or("");
    let field = first
        .split([' ', '\t'])
        .find(|f| !f.is_empty() && !f.starts_with('@'))
        .unwrap_or("");
    for pattern in field.split(',').take(4) {
        let pattern = pattern.trim_start_matches('!');
        match pattern
            .strip_prefix('[')
            .and_then(|rest| rest.split_once("]:"))
        {
            Some((host, port)) => hosts.push((host.into(), port.parse().unwrap_or(22))),
            None => hosts.push((pattern.into(), 22)),
        }
    }
    hosts
}

/// The known_hosts parser and lookups.
pub fn known_hosts(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let known = KnownHosts::parse(text, "/fuzz/known_hosts");
    let lines = text.split('\n').count();
    assert!(
        known.len() + known.warnings().len() <= lines,
        "{} entries and {} warnings from {lines} lines",
        known.len(),
        known.warnings().len()
    );
    let mut last = 0;
    for warning in known.warnings() {
        assert!(
            warning.line > last && warning.line <= lines,
            "warning {warning} after line {last} of {lines}"
        );
        last = warning.line;
        let _ = warning.to_string();
    }
    let _ = known.has_cert_authorities();
    let key = PublicKey::from_openssh(HOST_KEY).expect("fixed key");
    for (host, port) in lookup_hosts(text) {
        let _ = known.key_algorithms_for(&host, port);
        let status = known.check_key(&host, port, &key);
        let _ = status.to_string();
        let mut learned = known.clone();
        learned.add(&host, port, &key);
        let after = learned.check_key(&host, port, &key);
        match status {
            HostKeyStatus::Revoked { .. } => assert_eq!(after, status, "{host}:{port}"),
            _ => assert_eq!(after, HostKeyStatus::Trusted, "{host}:{port}: {after}"),
        }
    }
}

/// The configuration loader (without key material).
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse_str(text, Path::new("/fuzz/nodetunnel.toml")) {
        Ok(config) => {
            let nodes: Vec<RouteNode> = config
                .nodes
                .iter()
                .map(|node| RouteNode {
                    name: node.name.clone(),
                    addresses: node.addresses.clone(),
                    pod_cidrs: node.pod_cidrs.clone(),
                    ssh_port: node.ssh_port.unwrap_or(config.ssh.port),
                    ssh_address: node.ssh_address.clone(),
                })
                .collect();
            let router = Router::new(&nodes, &config.routing);
            for conflict in router.conflicts() {
                let _ = conflict.to_string();
            }
            let hosts = ["10.244.1.10", "10.96.0.1", "node-1"]
                .into_iter()
                .chain(config.nodes.iter().map(|node| node.ssh_address()));
            for host in hosts {
                if let Ok(host) = Host::parse(host) {
                    let _ = router.route(&Destination::new(host, 10250));
                }
            }
        }
        Err(error) => {
            let message = error.to_string();
            assert!(
                !message.contains(['\n', '\r']),
                "a configuration error is not one line: {message:?}"
            );
        }
    }
}

/// Split `data` into packets: `u16` big-endian length, then that many bytes
/// (the last one takes what is left).
pub fn split_packets(data: &[u8]) -> Vec<&[u8]> {
    let mut packets = Vec::new();
    let mut rest = data;
    while rest.len() >= 2 {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        let body = &rest[2..];
        let take = len.min(body.len());
        packets.push(&body[..take]);
        rest = &body[take..];
    }
    packets
}

/// Target `client_dispatch` (see the module docs).
pub fn client_dispatch(data: &[u8]) {
    use russh::client::fuzzing::{dispatch_authenticated, WINDOW};
    let packets = split_packets(data);
    let report = dispatch_authenticated(&packets);
    assert!(report.handled <= packets.len(), "{report:?}");
    for delivered in report.delivered {
        assert!(
            delivered <= WINDOW as usize,
            "a channel was handed {delivered} bytes with a window of {WINDOW}: {report:?}"
        );
    }
}
