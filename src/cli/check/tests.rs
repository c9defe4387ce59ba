//! Unit tests of `check`: targets, exit codes and rendering.

use std::time::Duration;

use super::*;

fn config() -> Config {
    Config::parse_str(
        r#"
[ssh]
user = "core"
port = 2222

[[nodes]]
name = "node-a"
addresses = ["10.240.0.11", "node-a.internal"]

[[nodes]]
name = "node-b"
addresses = ["10.240.0.12"]
ssh_port = 22
ssh_user = "root"
"#,
        Path::new("/etc/nodetunnel/nodetunnel.toml"),
    )
    .unwrap()
}

#[test]
fn targets_by_name_by_node_address_and_by_address() {
    let c = config();
    let a = resolve_target(&c, "node-a").unwrap();
    assert_eq!(
        (a.label.as_str(), a.host.as_str(), a.port, a.user.as_str()),
        ("node-a", "10.240.0.11", 2222, "core")
    );
    let b = resolve_target(&c, "10.240.0.12").unwrap();
    assert_eq!((b.port, b.user.as_str()), (22, "root"));
    assert_eq!(b.label, "10.240.0.12 (node node-b)");
    let by_name = resolve_target(&c, "node-a.internal").unwrap();
    assert_eq!(by_name.host, "node-a.internal");
    let other = resolve_target(&c, "192.0.2.7:2200").unwrap();
    assert_eq!(
        (
            other.label.as_str(),
            other.host.as_str(),
            other.port,
            other.user.as_str()
        ),
        ("192.0.2.7:2200", "192.0.2.7", 2200, "core")
    );
    let v6 = resolve_target(&c, "[fd00::1]:22").unwrap();
    assert_eq!(
        (v6.host.as_str(), v6.port, v6.label.as_str()),
        ("fd00::1", 22, "[fd00::1]:22")
    );
    let bare_v6 = resolve_target(&c, "fd00::2").unwrap();
    assert_eq!((bare_v6.host.as_str(), bare_v6.port), ("fd00::2", 2222));
    assert_eq!(
        resolve_target(&c, "host:0"),
        Err(TargetError::BadPort("host:0".into()))
    );
    assert_eq!(resolve_target(&c, ""), Err(TargetError::Empty));
    assert_eq!(
        resolve_target(&c, "[fd00::1"),
        Err(TargetError::MissingBracket("[fd00::1".into()))
    );
    assert_eq!(
        resolve_target(&c, "[fd00::1]x"),
        Err(TargetError::AfterBracket("[fd00::1]x".into()))
    );
    assert_eq!(
        resolve_target(&c, "fd00::1x:22").map_err(|e| e.to_string()),
        Err("\"fd00::1x:22\": an IPv6 address with a port is written [address]:port".into())
    );
}

#[test]
fn exit_codes_name_the_step() {
    let codes: Vec<u8> = Step::ALL.iter().map(|s| s.exit_code()).collect();
    assert_eq!(codes, [3, 4, 5, 6, 7, 8, 9, 10]);
}

fn report(label: &str, failed: Option<Step>) -> Report {
    let mut steps = Vec::new();
    let mut after_failure = false;
    for s in Step::ALL {
        let outcome = if after_failure {
            Outcome::Skipped
        } else if Some(s) == failed {
            after_failure = true;
            Outcome::Failed
        } else {
            Outcome::Passed
        };
        steps.push(StepResult {
            step: s,
            outcome,
            duration: Duration::from_micros(300),
            detail: if outcome == Outcome::Failed {
                "it broke".into()
            } else {
                "fine".into()
            },
            hint: (outcome == Outcome::Failed).then(|| "do this\nthen that".into()),
        });
    }
    Report {
        label: label.into(),
        endpoint: "10.0.0.1:22".into(),
        user: "root".into(),
        steps,
        elapsed: Duration::from_millis(12),
    }
}

#[test]
fn a_report_marks_steps_and_hints() {
    let r = report("node-a", Some(Step::HostKey));
    assert_eq!(r.exit_code(), 7);
    let text = r.render(false);
    assert!(
        text.starts_with("nodetunnel check node-a: 10.0.0.1:22 as root\n"),
        "{text}"
    );
    assert!(
        text.contains("  ✓ key exchange       0.30ms  fine\n"),
        "{text}"
    );
    let failed =
        "  ✗ host key           0.30ms  it broke\n      hint: do this\n            then that\n";
    assert!(text.contains(failed), "{text}");
    assert!(
        text.contains("  - authentication              skipped")
            || text.contains("  - authentication"),
        "{text}"
    );
    assert!(
        text.ends_with("FAILED at host key (exit 7) after 12.0ms\n"),
        "{text}"
    );
    assert_eq!(report("x", None).exit_code(), 0);
}

#[test]
fn the_all_summary_lists_failures_first() {
    let reports = vec![
        report("node-a", None),
        report("node-b", Some(Step::TcpConnect)),
    ];
    let text = render_all(&reports, false);
    let table_start = text.find("NODE").unwrap();
    let table = &text[table_start..];
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[1].starts_with("node-b  FAILED  tcp connect"),
        "{table}"
    );
    assert!(lines[2].starts_with("node-a  ok"), "{table}");
    assert_eq!(lines[3], "1/2 nodes passed every step");
    // The failed node is shown step by step before the table.
    assert!(
        text[..table_start].contains("nodetunnel check node-b"),
        "{text}"
    );
    assert!(
        !text[..table_start].contains("nodetunnel check node-a"),
        "{text}"
    );
}

/// Step 5 as a session decides it ([`crate::known_hosts::decide`]).
mod host_key_step {
    use std::sync::Arc;
    use std::time::Duration;

    use russh::keys::key::safe_rng;
    use russh::keys::ssh_key::certificate::{Builder, CertType};
    use russh::keys::ssh_key::Algorithm;
    use russh::keys::{PrivateKey, PublicKey, PublicKeyOrCertificate};

    use super::super::kubelet_tls;
    use super::super::{Checker, Target};
    use crate::config::HostKeyPolicy;
    use crate::keys::Identity;
    use crate::known_hosts::KnownHosts;

    fn new_key() -> PrivateKey {
        PrivateKey::random(&mut safe_rng(), Algorithm::Ed25519).expect("generate ed25519 key")
    }

    fn key_text(key: &PublicKey) -> String {
        key.to_openssh().expect("encode key")
    }

    /// A checker whose known_hosts is `known_hosts` (text), under `policy`.
    fn checker(known_hosts: &str, policy: HostKeyPolicy) -> Checker {
        let identity = Identity {
            path: "id_ed25519".into(),
            key: Arc::new(new_key()),
        };
        Checker {
            identity: Arc::new(identity),
            certificate: None,
            known_hosts: KnownHosts::parse(known_hosts, "known_hosts"),
            policy,
            russh: Arc::new(russh::client::Config::default()),
            connect_timeout: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(1),
            auth_timeout: Duration::from_secs(1),
            channel_timeout: Duration::from_secs(1),
            kubelet_host: None,
            kubelet_port: 10250,
            tls: kubelet_tls::connector(None).expect("TLS client"),
            kubelet_ca: None,
        }
    }

    fn target(host: &str) -> Target {
        Target {
            label: host.into(),
            host: host.into(),
            port: 22,
            user: "core".into(),
            kubelet_host: host.into(),
        }
    }

    #[test]
    fn an_unknown_plain_key_passes_under_accept_new() {
        let key = new_key().public_key().clone();
        let checker = checker("", HostKeyPolicy::AcceptNew);
        let presented = PublicKeyOrCertificate::PublicKey {
            key,
            hash_alg: None,
        };
        let (_, detail) = checker
            .judge_host_key(&target("node-1"), Some(presented))
            .expect("accept-new passes an unknown plain key");
        assert!(
            detail.ends_with(
                "is not in known_hosts; serve records it at the first connection \
                 (host_key_policy = \"accept-new\")"
            ),
            "{detail}"
        );
    }

    /// A session under accept-new refuses an unknown certificate (it
    /// records plain keys only); the step used to pass it.
    #[test]
    fn an_unknown_certificate_fails_under_accept_new_as_in_a_session() {
        let ca = new_key();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs();
        let mut builder = Builder::new_with_random_nonce(
            &mut safe_rng(),
            new_key().public_key().key_data().clone(),
            now - 7200,
            now - 3600,
        )
        .expect("builder");
        builder.cert_type(CertType::Host).expect("cert type");
        builder.key_id("test").expect("key id");
        builder
            .valid_principal("node-1.example.com")
            .expect("principal");
        let expired = builder.sign(&ca).expect("sign certificate");
        let checker = checker(
            &format!(
                "@cert-authority *.example.com {}\n",
                key_text(ca.public_key())
            ),
            HostKeyPolicy::AcceptNew,
        );
        // Expired, from a CA known_hosts trusts: not an unknown host, and
        // the check says so (no hint to compare fingerprints).
        let Err(failure) = checker.judge_host_key(
            &target("node-1.example.com"),
            Some(PublicKeyOrCertificate::from(expired)),
        ) else {
            panic!("an expired certificate passed under accept-new");
        };
        assert!(
            failure
                .detail
                .contains("is not valid: certificate has expired: valid until "),
            "{}",
            failure.detail
        );
        let hint = failure.hint.unwrap_or_default();
        assert!(hint.contains("must be re-issued"), "{hint}");
        assert!(!hint.contains("fingerprint"), "{hint}");
        // Signed by a CA nobody trusts: an unknown host under accept-new.
        let mut builder = Builder::new_with_random_nonce(
            &mut safe_rng(),
            new_key().public_key().key_data().clone(),
            now - 60,
            now + 3600,
        )
        .expect("builder");
        builder.cert_type(CertType::Host).expect("cert type");
        builder.key_id("test").expect("key id");
        builder
            .valid_principal("node-1.example.com")
            .expect("principal");
        let rogue = builder.sign(&new_key()).expect("sign certificate");
        let Err(failure) = checker.judge_host_key(
            &target("node-1.example.com"),
            Some(PublicKeyOrCertificate::from(rogue)),
        ) else {
            panic!("an unknown certificate passed under accept-new");
        };
        assert!(
            failure.detail.ends_with(
                "is not in known_hosts (node-1.example.com; host_key_policy = \"accept-new\")"
            ),
            "{}",
            failure.detail
        );
    }
}
