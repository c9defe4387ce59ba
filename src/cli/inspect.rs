//! `nodetunnel keys inspect FILE`: what an OpenSSH certificate says, in
//! the fields and order of `ssh-keygen -L` (type, certified key, signing
//! CA, key id, serial, validity, principals, critical options,
//! extensions), with times in RFC 3339 UTC. The CA signature is verified
//! first: a certificate whose signature does not verify is refused.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use russh::keys::ssh_key::certificate::CertType;
use russh::keys::ssh_key::public::KeyData;
use russh::keys::{Certificate, PublicKey};

use crate::client_certificate::{self, rfc3339};
use crate::keys::fingerprint;

/// Run `keys inspect`: print the description of the certificate at `path`.
pub fn run(path: &Path) -> ExitCode {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => {
            eprintln!(
                "nodetunnel keys inspect: cannot read {}: {e}",
                path.display()
            );
            return ExitCode::FAILURE;
        }
    };
    match client_certificate::parse(&text, path) {
        Ok(certificate) => {
            print!("{}", describe(&certificate, &path.display().to_string()));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("nodetunnel keys inspect: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `ssh-keygen`'s short name of a key type (`ED25519`, `ECDSA`, `RSA`).
fn key_type(key: &KeyData) -> String {
    match key {
        KeyData::Ed25519(_) => "ED25519".into(),
        KeyData::Ecdsa(_) => "ECDSA".into(),
        KeyData::Rsa(_) => "RSA".into(),
        KeyData::SkEd25519(_) => "ED25519-SK".into(),
        KeyData::SkEcdsaSha2NistP256(_) => "ECDSA-SK".into(),
        other => other.algorithm().as_str().to_uppercase(),
    }
}

/// `ssh-keygen -L`'s validity line (`forever`, `after X`, `before Y`,
/// `from X to Y`).
fn validity(after: u64, before: u64) -> String {
    match (after, before) {
        (0, u64::MAX) => "forever".into(),
        (0, before) => format!("before {}", rfc3339(before)),
        (after, u64::MAX) => format!("after {}", rfc3339(after)),
        (after, before) => format!("from {} to {}", rfc3339(after), rfc3339(before)),
    }
}

/// The certificate described as `ssh-keygen -L` does, under the heading
/// `name:`.
pub fn describe(certificate: &Certificate, name: &str) -> String {
    let mut out = String::new();
    let kind = match certificate.cert_type() {
        CertType::User => "user",
        CertType::Host => "host",
    };
    let subject = PublicKey::from(certificate.public_key().clone());
    let ca = PublicKey::from(certificate.signature_key().clone());
    let _ = writeln!(out, "{name}:");
    let _ = writeln!(
        out,
        "        Type: {} {kind} certificate",
        certificate.algorithm().to_certificate_type()
    );
    let _ = writeln!(
        out,
        "        Public key: {}-CERT {}",
        key_type(certificate.public_key()),
        fingerprint(&subject)
    );
    let _ = writeln!(
        out,
        "        Signing CA: {} {} (using {})",
        key_type(certificate.signature_key()),
        fingerprint(&ca),
        certificate.signature().algorithm()
    );
    let _ = writeln!(out, "        Key ID: {:?}", certificate.key_id());
    let _ = writeln!(out, "        Serial: {}", certificate.serial());
    let _ = writeln!(
        out,
        "        Valid: {}",
        validity(certificate.valid_after(), certificate.valid_before())
    );
    let list = |out: &mut String, title: &str, items: Vec<String>| {
        if items.is_empty() {
            let _ = writeln!(out, "        {title}: (none)");
        } else {
            let _ = writeln!(out, "        {title}: ");
            for item in items {
                let _ = writeln!(out, "                {item}");
            }
        }
    };
    list(
        &mut out,
        "Principals",
        certificate.valid_principals().to_vec(),
    );
    let options = |map: &russh::keys::ssh_key::certificate::OptionsMap| {
        map.iter()
            .map(|(k, v)| {
                if v.is_empty() {
                    k.clone()
                } else {
                    format!("{k} {v}")
                }
            })
            .collect::<Vec<_>>()
    };
    list(
        &mut out,
        "Critical Options",
        options(certificate.critical_options()),
    );
    list(&mut out, "Extensions", options(certificate.extensions()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validity_reads_like_ssh_keygen() {
        assert_eq!(validity(0, u64::MAX), "forever");
        assert_eq!(validity(0, 60), "before 1970-01-01T00:01:00Z");
        assert_eq!(validity(60, u64::MAX), "after 1970-01-01T00:01:00Z");
        assert_eq!(
            validity(60, 120),
            "from 1970-01-01T00:01:00Z to 1970-01-01T00:02:00Z"
        );
    }
}
