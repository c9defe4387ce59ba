//! Step 5: the presented host key against known_hosts and the host key
//! policy, decided as a session decides ([`decide`]), with the
//! fingerprints and lines to compare when it fails.

use std::fmt::Write as _;

use russh::keys::{PublicKey, PublicKeyOrCertificate};

use super::Target;
use super::{Checker, Failure};
use crate::keys::fingerprint;
use crate::known_hosts::{decide, lookup_name, HostKeyDecision, HostKeyStatus};

impl Checker {
    /// Step 5: judge the presented host key against known_hosts and the
    /// host key policy.
    pub(super) fn judge_host_key(
        &self,
        target: &Target,
        key: Option<PublicKeyOrCertificate>,
    ) -> Result<((), String), Failure> {
        let Some(key) = key else {
            return Err(Failure::new("the server presented no host key", None));
        };
        let path = self.known_hosts.path().display().to_string();
        let name = lookup_name(&target.host, target.port);
        let (presented, plain): (String, Option<&PublicKey>) = match &key {
            PublicKeyOrCertificate::PublicKey { key, .. } => (
                format!("{} {}", key.algorithm().as_str(), fingerprint(key)),
                Some(key),
            ),
            PublicKeyOrCertificate::Certificate(cert) => (
                format!(
                    "certificate for key {} signed by CA {}",
                    cert.public_key().fingerprint(russh::keys::HashAlg::Sha256),
                    cert.signature_key()
                        .fingerprint(russh::keys::HashAlg::Sha256)
                ),
                None,
            ),
        };
        // The known_hosts line for the presented key, as serve would write it.
        let new_line = plain.and_then(|k| k.to_openssh().ok()).map(|text| {
            let mut parts = text.split_whitespace();
            let kind = parts.next().unwrap_or_default();
            let blob = parts.next().unwrap_or_default();
            format!("{name} {kind} {blob}")
        });
        // The session's own decision (known_hosts::decide), so that this
        // step passes exactly when a session would accept the key.
        let policy = self.policy;
        match decide(&self.known_hosts, &target.host, target.port, &key, policy) {
            HostKeyDecision::Insecure(status) => Ok((
                (),
                format!(
                    "{presented}: {status}; accepted only because \
                     ssh.host_key_policy = \"insecure\""
                ),
            )),
            HostKeyDecision::Trusted => Ok(((), format!("{presented}, trusted by {path}"))),
            HostKeyDecision::Learn(_) => Ok((
                (),
                format!(
                    "{presented} is not in {path}; serve records it at the first connection \
                     (host_key_policy = \"accept-new\")"
                ),
            )),
            HostKeyDecision::Refuse(HostKeyStatus::Unknown | HostKeyStatus::Trusted) => {
                let mut hint = format!(
                    "check the fingerprint on the node's console \
                     (ssh-keygen -lf /etc/ssh/ssh_host_{}_key.pub), then add it to {path}",
                    key_file_kind(plain)
                );
                if let Some(line) = &new_line {
                    let _ = write!(hint, ":\n  {line}");
                }
                // Strict, or a certificate under accept-new (which records
                // plain keys only): the policy named is the one in force.
                Err(Failure::new(
                    format!(
                        "{presented} is not in {path} ({name}; host_key_policy = \"{policy}\")"
                    ),
                    hint,
                ))
            }
            HostKeyDecision::Refuse(HostKeyStatus::Changed { expected }) => {
                let mut hint = String::new();
                for k in &expected {
                    let place = if k.line == 0 {
                        format!("{} (learned at run time)", k.path.display())
                    } else {
                        format!("{}:{}", k.path.display(), k.line)
                    };
                    let _ = writeln!(
                        hint,
                        "known_hosts expects {} {} ({place}):\n  {}",
                        k.key_type, k.fingerprint, k.raw_line
                    );
                }
                hint.push_str(
                    "if the node was reinstalled, check the new fingerprint on its console \
                     and replace that line",
                );
                match &new_line {
                    Some(line) => {
                        let _ = write!(hint, " with:\n  {line}");
                    }
                    None => hint.push('.'),
                }
                hint.push_str(
                    "\notherwise someone may be intercepting the connection: do not trust it",
                );
                Err(Failure::new(
                    format!("HOST KEY MISMATCH for {name}: presented {presented}"),
                    hint,
                ))
            }
            HostKeyDecision::Refuse(HostKeyStatus::InvalidCertificate { problem }) => {
                Err(Failure::new(
                    format!("{presented} is not valid: {problem}"),
                    format!(
                        "{path} trusts the CA that signed it ({name}), so this is not an unknown \
                         host: the node's host certificate must be re-issued (ssh-keygen -s \
                         CA_KEY -h -n PRINCIPALS, listing {host}) or, if it looks valid, the \
                         clock of this host or of the CA is wrong",
                        host = target.host
                    ),
                ))
            }
            HostKeyDecision::Refuse(HostKeyStatus::Revoked { line }) => Err(Failure::new(
                format!("{presented} is revoked by {path}:{line}"),
                "the key was revoked on purpose (@revoked); the node needs a new host key",
            )),
        }
    }
}

/// The file name part of the node's host key for `ssh-keygen -lf`.
fn key_file_kind(key: Option<&PublicKey>) -> &'static str {
    match key.map(|k| k.algorithm().as_str().to_string()).as_deref() {
        Some("ssh-ed25519") => "ed25519",
        Some("ssh-rsa") => "rsa",
        Some(a) if a.starts_with("ecdsa") => "ecdsa",
        _ => "*",
    }
}
