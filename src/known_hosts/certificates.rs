//! Host certificates: `@cert-authority` lines, and whether a presented
//! certificate is valid for the host (OpenSSH's `check_host_cert`).

use std::time::{SystemTime, UNIX_EPOCH};

use russh::keys::ssh_key::{Algorithm, Fingerprint};
use russh::keys::{Certificate, HashAlg};

use super::matching::{glob_match, lookup_name, Marker};
use super::{HostKeyStatus, KnownHosts};

impl KnownHosts {
    /// Whether any `@cert-authority` line exists: only then does a client
    /// ask servers for host certificates.
    pub fn has_cert_authorities(&self) -> bool {
        self.entries
            .iter()
            .any(|e| e.marker == Marker::CertAuthority)
    }

    /// Checks a host certificate presented by `host` on `port`.
    ///
    /// [`HostKeyStatus::Revoked`] if a matching `@revoked` line lists the
    /// certificate's key or its CA key. [`HostKeyStatus::Trusted`] if a
    /// matching `@cert-authority` line lists the CA and the certificate is
    /// valid for this host (see [`KnownHosts::certificate_problem`]).
    /// Otherwise the certificate's own public key is checked as a plain key,
    /// like OpenSSH does.
    pub fn check_certificate(&self, host: &str, port: u16, cert: &Certificate) -> HostKeyStatus {
        self.check_certificate_at(host, port, cert, unix_now())
    }

    pub(super) fn check_certificate_at(
        &self,
        host: &str,
        port: u16,
        cert: &Certificate,
        now: Option<u64>,
    ) -> HostKeyStatus {
        let name = lookup_name(host, port);
        if let Some(line) = self.revoked_line(&name, &[cert.public_key(), cert.signature_key()]) {
            return HostKeyStatus::Revoked { line };
        }
        if self
            .certificate_problem_at(host, &name, cert, now)
            .is_none()
        {
            return HostKeyStatus::Trusted;
        }
        self.check_plain(&name, cert.public_key())
    }

    /// Explains why `cert` is not trusted through an `@cert-authority` line
    /// for `host` on `port`, or returns `None` if it is.
    ///
    /// A certificate is trusted through a CA when it is a host certificate,
    /// its CA key is listed by an `@cert-authority` line matching the host,
    /// the CA signature verifies and is not `ssh-rsa` (SHA-1), the current
    /// time is within its validity window, its principals (which may use
    /// `*` and `?` wildcards) include `host`, and it carries no critical
    /// options. Revocation is not considered here; [`KnownHosts::check`]
    /// handles it.
    pub fn certificate_problem(&self, host: &str, port: u16, cert: &Certificate) -> Option<String> {
        self.certificate_problem_at(host, &lookup_name(host, port), cert, unix_now())
    }

    fn certificate_problem_at(
        &self,
        host: &str,
        name: &str,
        cert: &Certificate,
        now: Option<u64>,
    ) -> Option<String> {
        let ca_key = cert.signature_key();
        let ca_fingerprints: Vec<Fingerprint> = self
            .entries
            .iter()
            .filter(|e| {
                e.marker == Marker::CertAuthority && e.key == *ca_key && e.hosts.matches(name)
            })
            .map(|e| e.key.fingerprint(HashAlg::Sha256))
            .collect();
        if ca_fingerprints.is_empty() {
            return Some(format!(
                "no @cert-authority line for {name} lists the certificate's CA key {}",
                ca_key.fingerprint(HashAlg::Sha256)
            ));
        }
        host_certificate_problem(cert, host, now, &ca_fingerprints)
    }
}

/// Why a certificate signed by a trusted CA (fingerprints in
/// `ca_fingerprints`) is not valid for `host` at `now`, or `None` if it is.
/// Mirrors OpenSSH's `check_host_cert`.
fn host_certificate_problem(
    cert: &Certificate,
    host: &str,
    now: Option<u64>,
    ca_fingerprints: &[Fingerprint],
) -> Option<String> {
    if !cert.cert_type().is_host() {
        return Some("not a host certificate".to_owned());
    }
    if cert.signature().algorithm() == (Algorithm::Rsa { hash: None }) {
        return Some(
            "the CA signed the certificate with ssh-rsa (SHA-1), which is not accepted".to_owned(),
        );
    }
    let Some(now) = now else {
        return Some("the system clock is before 1970".to_owned());
    };
    if now < cert.valid_after() {
        return Some(format!(
            "certificate is not valid yet (valid after {})",
            cert.valid_after()
        ));
    }
    if now >= cert.valid_before() {
        return Some(format!(
            "certificate has expired (valid before {})",
            cert.valid_before()
        ));
    }
    if cert.validate_at(now, ca_fingerprints).is_err() {
        return Some("the certificate's CA signature does not verify".to_owned());
    }
    let principals = cert.valid_principals();
    if principals.is_empty() {
        return Some("certificate lists no principals".to_owned());
    }
    let host = host.to_ascii_lowercase();
    let listed = principals
        .iter()
        .any(|p| glob_match(p.to_ascii_lowercase().as_bytes(), host.as_bytes()));
    if !listed {
        return Some(format!(
            "{host} is not among the certificate's principals {principals:?}"
        ));
    }
    if !cert.critical_options().is_empty() {
        return Some(
            "certificate has critical options, which host certificates must not have".to_owned(),
        );
    }
    None
}

pub(super) fn unix_now() -> Option<u64> {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs())
}
