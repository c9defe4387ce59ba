//! Unit tests of known_hosts parsing, matching, certificates and learning.

use std::fs;

use base64::Engine as _;
use hmac::Mac;
use russh::keys::ssh_key::Algorithm;
use russh::keys::Certificate;

use super::certificates::unix_now;
use super::matching::{glob_match, HmacSha1, SHA1_LEN};
use super::*;
use russh::keys::key::safe_rng;
use russh::keys::ssh_key::certificate::{Builder, CertType};
use russh::keys::PrivateKey;

fn new_key() -> PrivateKey {
    PrivateKey::random(&mut safe_rng(), Algorithm::Ed25519).expect("generate ed25519 key")
}

/// `keytype base64` of a key.
fn key_text(key: &PublicKey) -> String {
    PublicKey::new(key.key_data().clone(), "")
        .to_openssh()
        .expect("encode key")
}

/// `|1|salt|hash` for `name` with a fixed salt.
fn hashed(name: &str, salt_byte: u8) -> String {
    let salt = [salt_byte; SHA1_LEN];
    let mut mac = HmacSha1::new_from_slice(&salt).expect("hmac key");
    mac.update(name.as_bytes());
    let hash = mac.finalize().into_bytes();
    format!(
        "|1|{}|{}",
        base64::engine::general_purpose::STANDARD.encode(salt),
        base64::engine::general_purpose::STANDARD.encode(hash)
    )
}

fn now() -> u64 {
    unix_now().expect("clock after 1970")
}

fn host_cert(
    ca: &PrivateKey,
    host_key: &PublicKey,
    cert_type: CertType,
    principals: &[&str],
    valid_after: u64,
    valid_before: u64,
) -> Certificate {
    let mut builder = Builder::new_with_random_nonce(
        &mut safe_rng(),
        host_key.key_data().clone(),
        valid_after,
        valid_before,
    )
    .expect("builder");
    builder.cert_type(cert_type).expect("cert type");
    builder.key_id("test").expect("key id");
    if principals.is_empty() {
        builder.all_principals_valid().expect("all principals");
    }
    for principal in principals {
        builder.valid_principal(*principal).expect("principal");
    }
    builder.sign(ca).expect("sign certificate")
}

fn single_host_file(hosts: &str, key: &PublicKey) -> KnownHosts {
    KnownHosts::parse(&format!("{hosts} {}\n", key_text(key)), "known_hosts")
}

#[test]
fn plain_name_ip_and_comma_list() {
    let key = new_key();
    let key = key.public_key();
    let kh = single_host_file("node-1.example.com,10.0.0.7,fd00::7", key);
    assert!(kh.warnings().is_empty(), "{:?}", kh.warnings());
    assert_eq!(
        kh.check_key("node-1.example.com", 22, key),
        HostKeyStatus::Trusted
    );
    assert_eq!(
        kh.check_key("NODE-1.Example.COM", 22, key),
        HostKeyStatus::Trusted
    );
    assert_eq!(kh.check_key("10.0.0.7", 22, key), HostKeyStatus::Trusted);
    assert_eq!(kh.check_key("fd00::7", 22, key), HostKeyStatus::Trusted);
    assert_eq!(kh.check_key("10.0.0.8", 22, key), HostKeyStatus::Unknown);
    assert_eq!(kh.check_key("node-1", 22, key), HostKeyStatus::Unknown);
    // A plain entry is for port 22 only.
    assert_eq!(kh.check_key("10.0.0.7", 2222, key), HostKeyStatus::Unknown);
    let either = PublicKeyOrCertificate::from(key.clone());
    assert_eq!(kh.check("10.0.0.7", 22, &either), HostKeyStatus::Trusted);
}

#[test]
fn bracketed_port_forms() {
    let key = new_key();
    let key = key.public_key();
    let kh = single_host_file("[10.0.0.7]:2222,[fd00::7]:2200,[node.example.com]:22", key);
    assert_eq!(kh.check_key("10.0.0.7", 2222, key), HostKeyStatus::Trusted);
    assert_eq!(kh.check_key("fd00::7", 2200, key), HostKeyStatus::Trusted);
    assert_eq!(kh.check_key("10.0.0.7", 22, key), HostKeyStatus::Unknown);
    assert_eq!(kh.check_key("10.0.0.7", 2223, key), HostKeyStatus::Unknown);
    // Port 22 is looked up under the plain name, as OpenSSH does, so a
    // `[host]:22` entry never matches.
    assert_eq!(
        kh.check_key("node.example.com", 22, key),
        HostKeyStatus::Unknown
    );
    assert_eq!(lookup_name("Node.Example.com", 22), "node.example.com");
    assert_eq!(lookup_name("fd00::7", 2200), "[fd00::7]:2200");
}

#[test]
fn hashed_entries() {
    let key = new_key();
    let key = key.public_key();
    let text = format!(
        "{} {k}\n{} {k}\n",
        hashed("node-1.example.com", 1),
        hashed("[10.0.0.7]:2222", 2),
        k = key_text(key)
    );
    let kh = KnownHosts::parse(&text, "known_hosts");
    assert!(kh.warnings().is_empty(), "{:?}", kh.warnings());
    assert_eq!(
        kh.check_key("node-1.example.com", 22, key),
        HostKeyStatus::Trusted
    );
    assert_eq!(
        kh.check_key("Node-1.example.com", 22, key),
        HostKeyStatus::Trusted
    );
    assert_eq!(
        kh.check_key("node-2.example.com", 22, key),
        HostKeyStatus::Unknown
    );
    assert_eq!(
        kh.check_key("node-1.example.com", 2222, key),
        HostKeyStatus::Unknown
    );
    assert_eq!(kh.check_key("10.0.0.7", 2222, key), HostKeyStatus::Trusted);
    assert_eq!(kh.check_key("10.0.0.7", 22, key), HostKeyStatus::Unknown);
}

#[test]
fn hashed_entries_written_by_ssh_keygen() {
    // Host fields produced by OpenSSH 9.2 `ssh-keygen -H` for
    // `node-1.example.com` and `[10.0.0.7]:2222`.
    let key = new_key();
    let key = key.public_key();
    let text = format!(
        "|1|Rrif4OLsngQ980cxdOrdvQ1HkZU=|iOtXDNqXsCxAK8ohTN6xhWW1l1E= {k}\n\
         |1|e+4zaXxq/GZ0Vjq8iWLKqqTFW74=|uMq2rD/xC7JFM1vLNlfVQRyd5Rs= {k}\n",
        k = key_text(key)
    );
    let kh = KnownHosts::parse(&text, "known_hosts");
    assert!(kh.warnings().is_empty(), "{:?}", kh.warnings());
    assert_eq!(
        kh.check_key("node-1.example.com", 22, key),
        HostKeyStatus::Trusted
    );
    assert_eq!(kh.check_key("10.0.0.7", 2222, key), HostKeyStatus::Trusted);
    assert_eq!(kh.check_key("10.0.0.7", 22, key), HostKeyStatus::Unknown);
}

#[test]
fn bad_hashes_are_warnings() {
    let key = new_key();
    let k = key_text(key.public_key());
    let text = format!(
        "|1|AAAA|AAAA {k}\n|2|abc|def {k}\n|1|nodelimiter {k}\n{},other {k}\n",
        hashed("a", 3)
    );
    let kh = KnownHosts::parse(&text, "known_hosts");
    let lines: Vec<usize> = kh.warnings().iter().map(|w| w.line).collect();
    assert_eq!(lines, vec![1, 2, 3, 4]);
    assert!(kh.is_empty());
}

#[test]
fn wildcards() {
    let key = new_key();
    let key = key.public_key();
    let kh = single_host_file("*.pool.example.com,10.0.?.7,[10.1.*]:2222", key);
    assert_eq!(
        kh.check_key("a.pool.example.com", 22, key),
        HostKeyStatus::Trusted
    );
    assert_eq!(
        kh.check_key("a.b.pool.example.com", 22, key),
        HostKeyStatus::Trusted
    );
    assert_eq!(
        kh.check_key("pool.example.com", 22, key),
        HostKeyStatus::Unknown
    );
    assert_eq!(kh.check_key("10.0.3.7", 22, key), HostKeyStatus::Trusted);
    assert_eq!(kh.check_key("10.0.33.7", 22, key), HostKeyStatus::Unknown);
    assert_eq!(kh.check_key("10.1.2.3", 2222, key), HostKeyStatus::Trusted);
    assert_eq!(kh.check_key("10.1.2.3", 22, key), HostKeyStatus::Unknown);

    let star = single_host_file("*", key);
    assert_eq!(star.check_key("anything", 22, key), HostKeyStatus::Trusted);
    assert_eq!(
        star.check_key("anything", 2222, key),
        HostKeyStatus::Trusted
    );

    assert!(glob_match(b"a*b*c", b"axxbyyc"));
    assert!(glob_match(b"a*b*c", b"abc"));
    assert!(!glob_match(b"a*b*c", b"acb"));
    assert!(glob_match(b"**", b""));
    assert!(!glob_match(b"?", b""));
    assert!(glob_match(b"*a", b"aaa"));
}

#[test]
fn negation() {
    let key = new_key();
    let key = key.public_key();
    let kh = single_host_file("*.example.com,!bad.example.com", key);
    assert_eq!(
        kh.check_key("good.example.com", 22, key),
        HostKeyStatus::Trusted
    );
    assert_eq!(
        kh.check_key("bad.example.com", 22, key),
        HostKeyStatus::Unknown
    );
    assert_eq!(
        kh.check_key("BAD.example.com", 22, key),
        HostKeyStatus::Unknown
    );
    // A negated pattern alone matches nothing.
    let only_negated = single_host_file("!bad.example.com", key);
    assert_eq!(
        only_negated.check_key("good.example.com", 22, key),
        HostKeyStatus::Unknown
    );
}

#[test]
fn tabs_comments_blank_and_malformed_lines() {
    let key = new_key();
    let key = key.public_key();
    let other = new_key();
    let (kt, kb) = key_text(key)
        .split_once(' ')
        .map(|(t, b)| (t.to_owned(), b.to_owned()))
        .expect("key text");
    let text = format!(
        "# a comment\n\
         \n\
         \t  \n\
         \t# indented comment\n\
         node-1\t{kt}  \t{kb}\tcomment with  spaces\r\n\
         node-2 {kt}\n\
         node-3 ssh-ed25519 AAAAnotbase64!!\n\
         node-4 {kt} {kb_other}\n\
         @bogus node-5 {kt} {kb}\n\
         node-6\n\
         \x20 node-7 {kt} {kb}\n\
         node-8 ssh-ed25519-cert-v01@openssh.com {kb}\n\
         node-9 ssh-rsa {kb}\n",
        kb_other = key_text(other.public_key())
            .split_once(' ')
            .map(|(_, b)| b.to_owned())
            .expect("other key text")
    );
    let kh = KnownHosts::parse(&text, "known_hosts");
    let lines: Vec<usize> = kh.warnings().iter().map(|w| w.line).collect();
    assert_eq!(lines, vec![6, 7, 9, 10, 12, 13], "{:?}", kh.warnings());
    assert_eq!(kh.check_key("node-1", 22, key), HostKeyStatus::Trusted);
    assert_eq!(kh.check_key("node-7", 22, key), HostKeyStatus::Trusted);
    assert!(matches!(
        kh.check_key("node-4", 22, key),
        HostKeyStatus::Changed { .. }
    ));
    assert_eq!(kh.check_key("node-2", 22, key), HostKeyStatus::Unknown);
    assert_eq!(kh.check_key("node-5", 22, key), HostKeyStatus::Unknown);
    assert_eq!(kh.len(), 3);
}

#[test]
fn changed_reports_expected_keys() {
    let old = new_key();
    let old = old.public_key();
    let also = new_key();
    let also = also.public_key();
    let presented = new_key();
    let presented = presented.public_key();
    let text = format!(
        "other {o}\nnode-1,node-2 {o}\n# gap\nnode-* {a}\n",
        o = key_text(old),
        a = key_text(also)
    );
    let kh = KnownHosts::parse(&text, "/etc/nodetunnel/known_hosts");
    let HostKeyStatus::Changed { expected } = kh.check_key("node-1", 22, presented) else {
        panic!("expected Changed");
    };
    assert_eq!(expected.len(), 2);
    assert_eq!(expected[0].fingerprint, fingerprint(old));
    assert!(expected[0].fingerprint.starts_with("SHA256:"));
    assert_eq!(expected[0].line, 2);
    assert_eq!(expected[0].key_type, "ssh-ed25519");
    assert_eq!(expected[0].path, Path::new("/etc/nodetunnel/known_hosts"));
    assert_eq!(
        expected[0].raw_line,
        format!("node-1,node-2 {}", key_text(old))
    );
    assert_eq!(expected[1].fingerprint, fingerprint(also));
    assert_eq!(expected[1].line, 4);
    let message = HostKeyStatus::Changed { expected }.to_string();
    assert!(
        message.contains("/etc/nodetunnel/known_hosts:2"),
        "{message}"
    );
    assert!(message.contains(&fingerprint(also)), "{message}");
}

#[test]
fn fingerprint_matches_openssh_format() {
    let key = new_key();
    let fp = fingerprint(key.public_key());
    let b64 = fp.strip_prefix("SHA256:").expect("SHA256 prefix");
    assert_eq!(b64.len(), 43);
    assert!(!b64.ends_with('='));
}

#[test]
fn revoked_wins() {
    let key = new_key();
    let key = key.public_key();
    let text = format!("node-1 {k}\n@revoked * {k}\n", k = key_text(key));
    let kh = KnownHosts::parse(&text, "known_hosts");
    assert_eq!(
        kh.check_key("node-1", 22, key),
        HostKeyStatus::Revoked { line: 2 }
    );
    assert_eq!(
        kh.check_key("node-9", 2222, key),
        HostKeyStatus::Revoked { line: 2 }
    );

    // A revocation scoped to other hosts does not apply.
    let scoped = KnownHosts::parse(
        &format!("node-1 {k}\n@revoked node-2 {k}\n", k = key_text(key)),
        "known_hosts",
    );
    assert_eq!(scoped.check_key("node-1", 22, key), HostKeyStatus::Trusted);
    assert_eq!(
        scoped.check_key("node-2", 22, key),
        HostKeyStatus::Revoked { line: 2 }
    );

    // Learning the key does not undo the revocation.
    let mut learned = kh.clone();
    learned.add("node-3", 22, key);
    assert_eq!(
        learned.check_key("node-3", 22, key),
        HostKeyStatus::Revoked { line: 2 }
    );
}

#[test]
fn certificate_authority() {
    let ca = new_key();
    let host_key = new_key();
    let host_pub = host_key.public_key();
    let ca_line = format!(
        "@cert-authority *.example.com,10.0.0.* {}\n",
        key_text(ca.public_key())
    );
    let kh = KnownHosts::parse(&ca_line, "known_hosts");
    let t = now();

    let cert = host_cert(
        &ca,
        host_pub,
        CertType::Host,
        &["node-1.example.com", "10.0.0.7"],
        t - 60,
        t + 3600,
    );
    assert_eq!(
        kh.check_certificate("node-1.example.com", 22, &cert),
        HostKeyStatus::Trusted
    );
    assert_eq!(
        kh.check_certificate("10.0.0.7", 22, &cert),
        HostKeyStatus::Trusted
    );
    assert_eq!(kh.certificate_problem("10.0.0.7", 22, &cert), None);
    let either = PublicKeyOrCertificate::from(cert.clone());
    assert_eq!(
        kh.check("node-1.example.com", 22, &either),
        HostKeyStatus::Trusted
    );
    // Non-22 port: the CA line's patterns are matched against
    // `[host]:port`, which `*.example.com` does not match.
    assert_eq!(
        kh.check_certificate("node-1.example.com", 2222, &cert),
        HostKeyStatus::Unknown
    );
    let port_ca = KnownHosts::parse(
        &format!(
            "@cert-authority [*.example.com]:2222 {}\n",
            key_text(ca.public_key())
        ),
        "known_hosts",
    );
    assert_eq!(
        port_ca.check_certificate("node-1.example.com", 2222, &cert),
        HostKeyStatus::Trusted
    );

    // Wrong principal: the CA is trusted for the host, so the verdict
    // says why the certificate is not valid instead of "unknown".
    let wrong_principal = CertificateProblem::PrincipalNotListed {
        host: "node-2.example.com".into(),
        principals: vec!["node-1.example.com".into(), "10.0.0.7".into()],
    };
    assert_eq!(
        kh.check_certificate("node-2.example.com", 22, &cert),
        HostKeyStatus::InvalidCertificate {
            problem: wrong_principal.clone()
        }
    );
    assert_eq!(
        kh.certificate_problem("node-2.example.com", 22, &cert),
        Some(wrong_principal)
    );

    // Wildcard principal, as OpenSSH accepts for host certificates.
    let wild = host_cert(
        &ca,
        host_pub,
        CertType::Host,
        &["*.example.com"],
        t - 60,
        t + 3600,
    );
    assert_eq!(
        kh.check_certificate("node-2.example.com", 22, &wild),
        HostKeyStatus::Trusted
    );

    // Empty principal list is rejected for host certificates.
    let any = host_cert(&ca, host_pub, CertType::Host, &[], t - 60, t + 3600);
    assert_eq!(
        kh.check_certificate("node-1.example.com", 22, &any),
        HostKeyStatus::InvalidCertificate {
            problem: CertificateProblem::NoPrincipals
        }
    );

    // Expired and not yet valid.
    let expired = host_cert(
        &ca,
        host_pub,
        CertType::Host,
        &["node-1.example.com"],
        t - 7200,
        t - 3600,
    );
    let status = kh.check_certificate("node-1.example.com", 22, &expired);
    assert!(
        matches!(
            status,
            HostKeyStatus::InvalidCertificate {
                problem: CertificateProblem::Expired { valid_before, .. }
            } if valid_before == t - 3600
        ),
        "{status:?}"
    );
    assert!(
        status
            .to_string()
            .contains("certificate has expired: valid until 20"),
        "{status}"
    );
    let future = host_cert(
        &ca,
        host_pub,
        CertType::Host,
        &["node-1.example.com"],
        t + 3600,
        t + 7200,
    );
    assert!(matches!(
        kh.check_certificate("node-1.example.com", 22, &future),
        HostKeyStatus::InvalidCertificate {
            problem: CertificateProblem::NotYetValid { valid_after, .. }
        } if valid_after == t + 3600
    ));
    // Validity bounds: valid_after <= now < valid_before.
    assert_eq!(
        kh.check_certificate_at("node-1.example.com", 22, &expired, Some(t - 7200)),
        HostKeyStatus::Trusted
    );
    assert_eq!(
        kh.check_certificate_at("node-1.example.com", 22, &expired, Some(t - 3600)),
        HostKeyStatus::InvalidCertificate {
            problem: CertificateProblem::Expired {
                valid_before: t - 3600,
                now: t - 3600
            }
        }
    );

    // A user certificate is not a host certificate.
    let user = host_cert(
        &ca,
        host_pub,
        CertType::User,
        &["node-1.example.com"],
        t - 60,
        t + 3600,
    );
    assert_eq!(
        kh.check_certificate("node-1.example.com", 22, &user),
        HostKeyStatus::InvalidCertificate {
            problem: CertificateProblem::NotHostCertificate
        }
    );

    // Signed by a CA that is not listed.
    let rogue = new_key();
    let rogue_cert = host_cert(
        &rogue,
        host_pub,
        CertType::Host,
        &["node-1.example.com"],
        t - 60,
        t + 3600,
    );
    // Signed by a CA nobody trusts: an unknown host, as before.
    assert_eq!(
        kh.check_certificate("node-1.example.com", 22, &rogue_cert),
        HostKeyStatus::Unknown
    );

    // CA line whose patterns do not match the host.
    assert_eq!(
        kh.check_certificate("node-1.other.org", 22, &cert),
        HostKeyStatus::Unknown
    );
    let cert_other = host_cert(
        &ca,
        host_pub,
        CertType::Host,
        &["node-1.other.org"],
        t - 60,
        t + 3600,
    );
    assert_eq!(
        kh.check_certificate("node-1.other.org", 22, &cert_other),
        HostKeyStatus::Unknown
    );
}

#[test]
fn certificate_falls_back_to_plain_key() {
    let ca = new_key();
    let host_key = new_key();
    let host_pub = host_key.public_key();
    let t = now();
    let expired = host_cert(
        &ca,
        host_pub,
        CertType::Host,
        &["node-1"],
        t - 7200,
        t - 3600,
    );
    let text = format!(
        "@cert-authority * {}\nnode-1 {}\n",
        key_text(ca.public_key()),
        key_text(host_pub)
    );
    let kh = KnownHosts::parse(&text, "known_hosts");
    assert_eq!(
        kh.check_certificate("node-1", 22, &expired),
        HostKeyStatus::Trusted
    );

    let other = new_key();
    let other_cert = host_cert(
        &ca,
        other.public_key(),
        CertType::Host,
        &["node-2"],
        t - 7200,
        t - 3600,
    );
    assert!(matches!(
        kh.check_certificate("node-1", 22, &other_cert),
        HostKeyStatus::Changed { .. }
    ));
}

#[test]
fn revoked_certificate_authority_and_certificate_key() {
    let ca = new_key();
    let host_key = new_key();
    let host_pub = host_key.public_key();
    let t = now();
    let cert = host_cert(&ca, host_pub, CertType::Host, &["node-1"], t - 60, t + 3600);

    let revoked_ca = KnownHosts::parse(
        &format!(
            "@cert-authority * {k}\n@revoked * {k}\n",
            k = key_text(ca.public_key())
        ),
        "known_hosts",
    );
    assert_eq!(
        revoked_ca.check_certificate("node-1", 22, &cert),
        HostKeyStatus::Revoked { line: 2 }
    );

    let revoked_key = KnownHosts::parse(
        &format!(
            "@cert-authority * {}\nnode-1 {h}\n@revoked node-* {h}\n",
            key_text(ca.public_key()),
            h = key_text(host_pub)
        ),
        "known_hosts",
    );
    assert_eq!(
        revoked_key.check_certificate("node-1", 22, &cert),
        HostKeyStatus::Revoked { line: 3 }
    );
}

#[test]
fn hashed_certificate_authority_line() {
    let ca = new_key();
    let host_key = new_key();
    let t = now();
    let cert = host_cert(
        &ca,
        host_key.public_key(),
        CertType::Host,
        &["node-1"],
        t - 60,
        t + 3600,
    );
    let kh = KnownHosts::parse(
        &format!(
            "@cert-authority {} {}\n",
            hashed("node-1", 9),
            key_text(ca.public_key())
        ),
        "known_hosts",
    );
    assert_eq!(
        kh.check_certificate("node-1", 22, &cert),
        HostKeyStatus::Trusted
    );
}

#[test]
fn add_trusts_in_memory_literally() {
    let key = new_key();
    let key = key.public_key();
    let mut kh = KnownHosts::parse("", "known_hosts");
    assert_eq!(kh.check_key("node-1", 2222, key), HostKeyStatus::Unknown);
    kh.add("Node-1", 2222, key);
    kh.add("node-1", 2222, key);
    assert_eq!(kh.len(), 1);
    assert_eq!(kh.check_key("node-1", 2222, key), HostKeyStatus::Trusted);
    assert_eq!(kh.check_key("node-1", 22, key), HostKeyStatus::Unknown);
    let other = new_key();
    let HostKeyStatus::Changed { expected } = kh.check_key("node-1", 2222, other.public_key())
    else {
        panic!("expected Changed");
    };
    assert_eq!(expected[0].line, 0);
    assert_eq!(
        expected[0].raw_line,
        format!("[node-1]:2222 {}", key_text(key))
    );

    // A learned name is never a pattern.
    kh.add("*", 22, key);
    assert_eq!(kh.check_key("node-2", 22, key), HostKeyStatus::Unknown);
}

#[cfg(unix)]
#[test]
fn append_creates_file_0600_and_reloads_trusted() {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sub/dir/known_hosts");
    let key = new_key();
    let key = key.public_key();
    let other = new_key();
    let other = other.public_key();

    assert!(KnownHosts::load(&path)
        .expect("missing file is empty")
        .is_empty());
    append_host_key(&path, "10.0.0.7", 22, key).expect("append");
    append_host_key(&path, "Node-2.Example.com", 2222, other).expect("append");
    let mode = fs::metadata(&path).expect("metadata").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    let text = fs::read_to_string(&path).expect("read back");
    assert_eq!(
        text,
        format!(
            "10.0.0.7 {}\n[node-2.example.com]:2222 {}\n",
            key_text(key),
            key_text(other)
        )
    );
    let kh = KnownHosts::load(&path).expect("load");
    assert!(kh.warnings().is_empty());
    assert_eq!(kh.check_key("10.0.0.7", 22, key), HostKeyStatus::Trusted);
    assert_eq!(
        kh.check_key("node-2.example.com", 2222, other),
        HostKeyStatus::Trusted
    );
    assert_eq!(
        kh.check_key("node-2.example.com", 22, other),
        HostKeyStatus::Unknown
    );
}

#[test]
fn append_to_file_without_trailing_newline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("known_hosts");
    let first = new_key();
    let first = first.public_key();
    let second = new_key();
    let second = second.public_key();
    fs::write(&path, format!("node-1 {}", key_text(first))).expect("write");

    append_host_key(&path, "node-2", 22, second).expect("append");
    let kh = KnownHosts::load(&path).expect("load");
    assert!(kh.warnings().is_empty(), "{:?}", kh.warnings());
    assert_eq!(kh.check_key("node-1", 22, first), HostKeyStatus::Trusted);
    assert_eq!(kh.check_key("node-2", 22, second), HostKeyStatus::Trusted);
    let text = fs::read_to_string(&path).expect("read back");
    assert!(text.ends_with('\n') && !text.contains("\n\n"), "{text:?}");
}

#[test]
fn learn_appends_and_trusts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("known_hosts");
    let key = new_key();
    let key = key.public_key();
    let mut kh = KnownHosts::load(&path).expect("load");
    kh.learn("node-1", 22, key).expect("learn");
    assert_eq!(kh.check_key("node-1", 22, key), HostKeyStatus::Trusted);
    let reloaded = KnownHosts::load(&path).expect("reload");
    assert_eq!(
        reloaded.check_key("node-1", 22, key),
        HostKeyStatus::Trusted
    );
}

/// accept-new with two sessions to one host and an empty known_hosts:
/// both learners saw "unknown" and race to record different keys. One
/// records its key; the other is refused as a changed key, and the file
/// holds one key for the host.
#[test]
fn two_concurrent_learners_record_one_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("known_hosts");
    let keys = [
        new_key().public_key().clone(),
        new_key().public_key().clone(),
    ];
    let start = std::sync::Barrier::new(2);
    let results: Vec<Result<(), KnownHostsError>> = std::thread::scope(|scope| {
        let learners: Vec<_> = keys
            .iter()
            .map(|key| {
                let (path, start) = (&path, &start);
                scope.spawn(move || {
                    let mut kh = KnownHosts::load(path).expect("load");
                    assert_eq!(kh.check_key("10.0.0.7", 22, key), HostKeyStatus::Unknown);
                    start.wait();
                    kh.learn("10.0.0.7", 22, key)
                })
            })
            .collect();
        learners
            .into_iter()
            .map(|l| l.join().expect("learner"))
            .collect()
    });
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "{results:?}"
    );
    let winner = results.iter().position(Result::is_ok).expect("a winner");
    match &results[1 - winner] {
        Err(KnownHostsError::NoLongerUnknown {
            status: HostKeyStatus::Changed { expected },
            ..
        }) => assert_eq!(expected.len(), 1),
        other => panic!("the loser must be refused as a changed key: {other:?}"),
    }
    let file = KnownHosts::load(&path).expect("reload");
    assert_eq!(file.len(), 1, "one key recorded for the host");
    assert!(file.check_key("10.0.0.7", 22, &keys[winner]).is_trusted());
}

/// The same race inside one shared set (what two sessions of one node
/// share): the second learner finds the first one's key in memory.
#[test]
fn a_learner_after_another_in_the_same_set_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("known_hosts");
    let (first, second) = (new_key(), new_key());
    let mut kh = KnownHosts::load(&path).expect("load");
    kh.learn("node-1", 2222, first.public_key()).expect("first");
    // Learning the same key again is a no-op, not a second line.
    kh.learn("node-1", 2222, first.public_key()).expect("again");
    let e = kh.learn("node-1", 2222, second.public_key()).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("host [node-1]:2222 is no longer unknown: host key does not match"),
        "{e}"
    );
    assert_eq!(KnownHosts::load(&path).expect("reload").len(), 1);
    assert!(!kh
        .check_key("node-1", 2222, second.public_key())
        .is_trusted());
}

#[test]
fn concurrent_appends_keep_lines_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("known_hosts");
    let keys: Vec<PublicKey> = (0..8).map(|_| new_key().public_key().clone()).collect();
    std::thread::scope(|scope| {
        for (i, key) in keys.iter().enumerate() {
            let path = &path;
            scope.spawn(move || {
                append_host_key(path, &format!("node-{i}"), 22, key).expect("append");
            });
        }
    });
    let kh = KnownHosts::load(&path).expect("load");
    assert!(kh.warnings().is_empty(), "{:?}", kh.warnings());
    for (i, key) in keys.iter().enumerate() {
        assert_eq!(
            kh.check_key(&format!("node-{i}"), 22, key),
            HostKeyStatus::Trusted
        );
    }
}

#[test]
fn append_rejects_unsafe_host_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("known_hosts");
    let key = new_key();
    for host in [
        "", "a b", "a\nb", "a,b", "*", "!a", "|1|x", "@revoked", "[a]:2",
    ] {
        assert!(matches!(
            append_host_key(&path, host, 22, key.public_key()),
            Err(KnownHostsError::InvalidHost { .. })
        ));
    }
    assert!(!path.exists());
}

#[cfg(unix)]
#[test]
fn unreadable_file_is_an_error_naming_the_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A directory cannot be read as a file, even by root.
    let err = KnownHosts::load(dir.path()).expect_err("directory is not a file");
    assert!(matches!(err, KnownHostsError::Read { .. }));
    assert!(
        err.to_string().contains(&dir.path().display().to_string()),
        "{err}"
    );
}

#[test]
fn invalid_utf8_line_is_a_warning() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("known_hosts");
    let key = new_key();
    let mut bytes = b"node-\xff ssh-ed25519 AAAA\n".to_vec();
    bytes.extend_from_slice(format!("node-1 {}\n", key_text(key.public_key())).as_bytes());
    fs::write(&path, bytes).expect("write");
    let kh = KnownHosts::load(&path).expect("load");
    assert_eq!(kh.warnings().len(), 1);
    assert_eq!(kh.warnings()[0].line, 1);
    assert_eq!(
        kh.check_key("node-1", 22, key.public_key()),
        HostKeyStatus::Trusted
    );
}

/// The host-key decision, every row of the table in [`decide`]'s doc: a
/// known_hosts file with a plain key for `node-1`, a revoked key for
/// `node-1`, and a CA for `*.example.com`.
mod decision {
    use super::*;

    const POLICIES: [HostKeyPolicy; 3] = [
        HostKeyPolicy::Strict,
        HostKeyPolicy::AcceptNew,
        HostKeyPolicy::Insecure,
    ];

    struct Fixture {
        kh: KnownHosts,
        known: PublicKey,
        other: PublicKey,
        revoked: PublicKey,
        ca: PrivateKey,
    }

    fn fixture() -> Fixture {
        let known = new_key().public_key().clone();
        let other = new_key().public_key().clone();
        let revoked = new_key().public_key().clone();
        let ca = new_key();
        let text = format!(
            "node-1 {}\n@revoked node-1 {}\n@cert-authority *.example.com {}\n",
            key_text(&known),
            key_text(&revoked),
            key_text(ca.public_key())
        );
        Fixture {
            kh: KnownHosts::parse(&text, "known_hosts"),
            known,
            other,
            revoked,
            ca,
        }
    }

    fn plain(key: &PublicKey) -> PublicKeyOrCertificate {
        PublicKeyOrCertificate::PublicKey {
            key: key.clone(),
            hash_alg: None,
        }
    }

    #[test]
    fn a_trusted_key_is_trusted_under_every_policy() {
        let f = fixture();
        for policy in POLICIES {
            assert_eq!(
                decide(&f.kh, "node-1", 22, &plain(&f.known), policy),
                HostKeyDecision::Trusted,
                "{policy}"
            );
        }
    }

    #[test]
    fn an_unknown_key_is_refused_under_strict() {
        let f = fixture();
        assert_eq!(
            decide(&f.kh, "node-2", 22, &plain(&f.other), HostKeyPolicy::Strict),
            HostKeyDecision::Refuse(HostKeyStatus::Unknown)
        );
    }

    #[test]
    fn an_unknown_key_is_learned_under_accept_new() {
        let f = fixture();
        assert_eq!(
            decide(
                &f.kh,
                "node-2",
                22,
                &plain(&f.other),
                HostKeyPolicy::AcceptNew
            ),
            HostKeyDecision::Learn(f.other.clone())
        );
    }

    #[test]
    fn a_changed_key_is_refused_under_strict_and_accept_new() {
        let f = fixture();
        for policy in [HostKeyPolicy::Strict, HostKeyPolicy::AcceptNew] {
            match decide(&f.kh, "node-1", 22, &plain(&f.other), policy) {
                HostKeyDecision::Refuse(HostKeyStatus::Changed { expected }) => {
                    assert_eq!(expected.len(), 1, "{policy}");
                    assert_eq!(expected[0].fingerprint, fingerprint(&f.known), "{policy}");
                }
                other => panic!("{policy}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_revoked_key_is_refused_under_strict_and_accept_new() {
        let f = fixture();
        for policy in [HostKeyPolicy::Strict, HostKeyPolicy::AcceptNew] {
            assert_eq!(
                decide(&f.kh, "node-1", 22, &plain(&f.revoked), policy),
                HostKeyDecision::Refuse(HostKeyStatus::Revoked { line: 2 }),
                "{policy}"
            );
        }
    }

    #[test]
    fn a_ca_signed_certificate_is_trusted_under_every_policy() {
        let f = fixture();
        let t = now();
        let cert = host_cert(
            &f.ca,
            &f.other,
            CertType::Host,
            &["node-3.example.com"],
            t - 60,
            t + 3600,
        );
        for policy in POLICIES {
            assert_eq!(
                decide(
                    &f.kh,
                    "node-3.example.com",
                    22,
                    &PublicKeyOrCertificate::from(cert.clone()),
                    policy
                ),
                HostKeyDecision::Trusted,
                "{policy}"
            );
        }
    }

    /// accept-new records plain keys only: a certificate no CA vouches for
    /// (here: expired) from an unknown host is refused, as the session
    /// always did (`check` used to pass it as "recorded at the first
    /// connection").
    #[test]
    fn an_unknown_certificate_is_refused_under_accept_new() {
        let f = fixture();
        let t = now();
        let expired = host_cert(
            &f.ca,
            &f.other,
            CertType::Host,
            &["node-3.example.com"],
            t - 7200,
            t - 3600,
        );
        let decision = decide(
            &f.kh,
            "node-3.example.com",
            22,
            &PublicKeyOrCertificate::from(expired),
            HostKeyPolicy::AcceptNew,
        );
        assert!(
            matches!(
                decision,
                HostKeyDecision::Refuse(HostKeyStatus::InvalidCertificate {
                    problem: CertificateProblem::Expired { valid_before, .. }
                }) if valid_before == t - 3600
            ),
            "{decision:?}"
        );
        // Signed by a CA nobody trusts: unknown, and refused all the same.
        let rogue = host_cert(
            &new_key(),
            &f.other,
            CertType::Host,
            &["node-3.example.com"],
            t - 60,
            t + 3600,
        );
        assert_eq!(
            decide(
                &f.kh,
                "node-3.example.com",
                22,
                &PublicKeyOrCertificate::from(rogue),
                HostKeyPolicy::AcceptNew
            ),
            HostKeyDecision::Refuse(HostKeyStatus::Unknown)
        );
    }

    #[test]
    fn insecure_accepts_unknown_changed_and_revoked_keys_and_says_why() {
        let f = fixture();
        let insecure = |host: &str, key: &PublicKey| {
            decide(&f.kh, host, 22, &plain(key), HostKeyPolicy::Insecure)
        };
        assert_eq!(
            insecure("node-2", &f.other),
            HostKeyDecision::Insecure(HostKeyStatus::Unknown)
        );
        assert!(matches!(
            insecure("node-1", &f.other),
            HostKeyDecision::Insecure(HostKeyStatus::Changed { .. })
        ));
        assert_eq!(
            insecure("node-1", &f.revoked),
            HostKeyDecision::Insecure(HostKeyStatus::Revoked { line: 2 })
        );
    }
}
