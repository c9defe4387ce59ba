//! The host-key decision: what a client does with the key (or certificate)
//! a node presented, from what known_hosts says about it and the host key
//! policy. Written once here and used by the session's `check_server_key`
//! and by `nodetunnel check`, so the check reports what a session would do.

use russh::keys::{PublicKey, PublicKeyOrCertificate};

use super::{HostKeyStatus, KnownHosts};
pub use crate::ssh_config::HostKeyPolicy;

/// What a client does with a presented host key or certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKeyDecision {
    /// known_hosts vouches for it: a matching line lists the key, or a
    /// matching `@cert-authority` line the CA of a valid host certificate.
    Trusted,
    /// An unknown plain key under `accept-new`: record it
    /// ([`KnownHosts::learn`], which checks again under its lock), then
    /// trust it.
    Learn(PublicKey),
    /// known_hosts does not vouch for it (the status says why: unknown,
    /// changed or revoked; never [`HostKeyStatus::Trusted`]), and it is
    /// accepted only because the policy is `insecure`.
    Insecure(HostKeyStatus),
    /// Refused. The status says why: [`HostKeyStatus::Revoked`],
    /// [`HostKeyStatus::Changed`], [`HostKeyStatus::InvalidCertificate`],
    /// or [`HostKeyStatus::Unknown`] under
    /// `strict` (and for a certificate under `accept-new`, which records
    /// plain keys only); never [`HostKeyStatus::Trusted`].
    Refuse(HostKeyStatus),
}

/// Decide what to do with `key`, presented by `host` on `port`, given
/// `known` and `policy`:
///
/// | known_hosts says     | strict  | accept-new                     | insecure |
/// |----------------------|---------|--------------------------------|----------|
/// | trusted (key or CA)  | Trusted | Trusted                        | Trusted  |
/// | unknown              | Refuse  | Learn (a certificate: Refuse)  | Insecure |
/// | changed              | Refuse  | Refuse                         | Insecure |
/// | revoked              | Refuse  | Refuse                         | Insecure |
/// | invalid certificate  | Refuse  | Refuse                         | Insecure |
pub fn decide(
    known: &KnownHosts,
    host: &str,
    port: u16,
    key: &PublicKeyOrCertificate,
    policy: HostKeyPolicy,
) -> HostKeyDecision {
    let status = known.check(host, port, key);
    match status {
        HostKeyStatus::Trusted => HostKeyDecision::Trusted,
        _ if policy == HostKeyPolicy::Insecure => HostKeyDecision::Insecure(status),
        HostKeyStatus::Unknown => match (policy, key) {
            (HostKeyPolicy::AcceptNew, PublicKeyOrCertificate::PublicKey { key, .. }) => {
                HostKeyDecision::Learn(key.clone())
            }
            _ => HostKeyDecision::Refuse(status),
        },
        HostKeyStatus::Changed { .. }
        | HostKeyStatus::Revoked { .. }
        | HostKeyStatus::InvalidCertificate { .. } => HostKeyDecision::Refuse(status),
    }
}
