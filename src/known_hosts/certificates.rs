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
        let problem = match self.certificate_problem_at(host, &name, cert, now) {
            None => return HostKeyStatus::Trusted,
            Some(problem) => problem,
        };
        match self.check_plain(&name, cert.public_key()) {
            // A CA known_hosts trusts for this host signed it, but it is not
            // valid, and no plain line names the host: say why, rather than
            // calling the host unknown.
            HostKeyStatus::Unknown
                if !matches!(problem, CertificateProblem::NoAuthority { .. }) =>
            {
                HostKeyStatus::InvalidCertificate { problem }
            }
            status => status,
        }
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
    pub fn certificate_problem(
        &self,
        host: &str,
        port: u16,
        cert: &Certificate,
    ) -> Option<CertificateProblem> {
        self.certificate_problem_at(host, &lookup_name(host, port), cert, unix_now())
    }

    fn certificate_problem_at(
        &self,
        host: &str,
        name: &str,
        cert: &Certificate,
        now: Option<u64>,
    ) -> Option<CertificateProblem> {
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
            return Some(CertificateProblem::NoAuthority {
                name: name.to_owned(),
                ca: ca_key.fingerprint(HashAlg::Sha256).to_string(),
            });
        }
        host_certificate_problem(cert, host, now, &ca_fingerprints)
    }
}

/// Why a host certificate is not trusted through an `@cert-authority`
/// line. Each variant is one rule of OpenSSH's `check_host_cert`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertificateProblem {
    /// No `@cert-authority` line matching the host lists the CA key.
    NoAuthority {
        /// The lookup name (`host` or `[host]:port`).
        name: String,
        /// The CA key's fingerprint (`SHA256:...`).
        ca: String,
    },
    /// It is a user certificate.
    NotHostCertificate,
    /// The CA signed it with `ssh-rsa` (SHA-1).
    Sha1Signature,
    /// The local clock reads before 1970.
    ClockBefore1970,
    /// Its validity starts later.
    NotYetValid {
        /// `valid_after`, seconds since the epoch.
        valid_after: u64,
        /// The local clock, seconds since the epoch.
        now: u64,
    },
    /// Its validity ended.
    Expired {
        /// `valid_before`, seconds since the epoch.
        valid_before: u64,
        /// The local clock, seconds since the epoch.
        now: u64,
    },
    /// The CA signature does not verify.
    BadSignature,
    /// It lists no principals (host certificates must).
    NoPrincipals,
    /// The host is not among its principals.
    PrincipalNotListed {
        /// The host, lower case.
        host: String,
        /// The certificate's principals.
        principals: Vec<String>,
    },
    /// It carries critical options, which host certificates must not.
    CriticalOptions,
}

/// Seconds since the epoch as RFC 3339 (UTC), or the number when out of
/// range (OpenSSH's "forever" is `u64::MAX`).
pub(crate) fn rfc3339(secs: u64) -> String {
    if secs == u64::MAX {
        return "forever".to_owned();
    }
    UNIX_EPOCH
        .checked_add(std::time::Duration::from_secs(secs))
        .filter(|t| {
            t.duration_since(UNIX_EPOCH)
                .is_ok_and(|d| d.as_secs() < 253_402_300_800)
        })
        .map_or_else(
            || secs.to_string(),
            |t| humantime::format_rfc3339_seconds(t).to_string(),
        )
}

impl std::fmt::Display for CertificateProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CertificateProblem::NoAuthority { name, ca } => write!(
                f,
                "no @cert-authority line for {name} lists the certificate's CA key {ca}"
            ),
            CertificateProblem::NotHostCertificate => f.write_str("not a host certificate"),
            CertificateProblem::Sha1Signature => f.write_str(
                "the CA signed the certificate with ssh-rsa (SHA-1), which is not accepted",
            ),
            CertificateProblem::ClockBefore1970 => f.write_str("the system clock is before 1970"),
            CertificateProblem::NotYetValid { valid_after, now } => write!(
                f,
                "certificate is not valid yet: valid from {}, the local clock says {}",
                rfc3339(*valid_after),
                rfc3339(*now)
            ),
            CertificateProblem::Expired { valid_before, now } => write!(
                f,
                "certificate has expired: valid until {}, the local clock says {}",
                rfc3339(*valid_before),
                rfc3339(*now)
            ),
            CertificateProblem::BadSignature => {
                f.write_str("the certificate's CA signature does not verify")
            }
            CertificateProblem::NoPrincipals => f.write_str("certificate lists no principals"),
            CertificateProblem::PrincipalNotListed { host, principals } => write!(
                f,
                "{host} is not among the certificate's principals {principals:?}"
            ),
            CertificateProblem::CriticalOptions => f.write_str(
                "certificate has critical options, which host certificates must not have",
            ),
        }
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
) -> Option<CertificateProblem> {
    if !cert.cert_type().is_host() {
        return Some(CertificateProblem::NotHostCertificate);
    }
    if cert.signature().algorithm() == (Algorithm::Rsa { hash: None }) {
        return Some(CertificateProblem::Sha1Signature);
    }
    let Some(now) = now else {
        return Some(CertificateProblem::ClockBefore1970);
    };
    if now < cert.valid_after() {
        return Some(CertificateProblem::NotYetValid {
            valid_after: cert.valid_after(),
            now,
        });
    }
    if now >= cert.valid_before() {
        return Some(CertificateProblem::Expired {
            valid_before: cert.valid_before(),
            now,
        });
    }
    if cert.validate_at(now, ca_fingerprints).is_err() {
        return Some(CertificateProblem::BadSignature);
    }
    let principals = cert.valid_principals();
    if principals.is_empty() {
        return Some(CertificateProblem::NoPrincipals);
    }
    let host = host.to_ascii_lowercase();
    let listed = principals
        .iter()
        .any(|p| glob_match(p.to_ascii_lowercase().as_bytes(), host.as_bytes()));
    if !listed {
        return Some(CertificateProblem::PrincipalNotListed {
            host,
            principals: principals.to_vec(),
        });
    }
    if !cert.critical_options().is_empty() {
        return Some(CertificateProblem::CriticalOptions);
    }
    None
}

pub(super) fn unix_now() -> Option<u64> {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs())
}
