//! OpenSSH `known_hosts` files: parsing, host key verification and learning.
//!
//! This module owns the decision "do we trust the host key (or host
//! certificate) this node presented?". It parses known_hosts files itself,
//! following the format documented in sshd(8) under "SSH_KNOWN_HOSTS FILE
//! FORMAT" and the matching rules of the OpenSSH client:
//!
//! - lines are `[marker] hostpatterns keytype base64-key [comment]`, fields
//!   separated by any run of spaces or tabs; blank lines and `#` comments are
//!   ignored, and a malformed line is skipped with a warning (see
//!   [`KnownHosts::warnings`]) instead of failing the whole file;
//! - a node is looked up by its *lookup name*: `host` when the SSH port is
//!   22, `[host]:port` otherwise (see [`lookup_name`]), compared
//!   case-insensitively against comma-separated patterns that may use `*`
//!   and `?` wildcards and `!` negation, or against hashed
//!   `|1|salt|HMAC-SHA1(salt, name)` entries;
//! - `@revoked` lines always win, `@cert-authority` lines let a CA vouch for
//!   host certificates, and a certificate that does not validate falls back
//!   to its plain public key, as OpenSSH does.
//!
//! It also owns the host key policy and the decision made from a verdict
//! ([`HostKeyPolicy`], [`decide`]: used by the session and by `check`), and
//! writing to the file for the accept-new policy ([`append_host_key`],
//! [`KnownHosts::learn`]).
//!
//! The parts: `parse` reads lines into entries, `matching`
//! matches a lookup name against an entry's host field (patterns,
//! wildcards, hashed names) and knows the markers, `certificates` checks
//! host certificates against `@cert-authority` lines, `append` writes
//! learned keys.
//!
//! Files are parsed once; each lookup is a linear scan over the parsed
//! entries, with hashed entries' salts already decoded and keyed into an
//! HMAC state, so a lookup costs one short HMAC per hashed line.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use russh::keys::ssh_key::public::KeyData;
use russh::keys::{HashAlg, PublicKey, PublicKeyOrCertificate};

mod append;
mod certificates;
mod decision;
mod matching;
mod parse;
#[cfg(test)]
mod tests;

pub use append::append_host_key;
pub use certificates::CertificateProblem;
pub use decision::{decide, HostKeyDecision, HostKeyPolicy};
pub use matching::lookup_name;

use matching::Marker;
use parse::Entry;

/// Errors from reading or writing known_hosts files.
///
/// Parsing never fails: malformed lines become [`ParseWarning`]s.
#[derive(Debug, thiserror::Error)]
pub enum KnownHostsError {
    /// The file exists but could not be read.
    #[error("cannot read known_hosts file {}: {error}", path.display())]
    Read {
        /// The file that could not be read.
        path: PathBuf,
        /// The underlying I/O error.
        error: io::Error,
    },
    /// The directory that should hold the file could not be created.
    #[error("cannot create directory {} for the known_hosts file: {error}", path.display())]
    CreateDir {
        /// The directory that could not be created.
        path: PathBuf,
        /// The underlying I/O error.
        error: io::Error,
    },
    /// The file could not be opened, inspected or appended to.
    #[error("cannot append to known_hosts file {}: {error}", path.display())]
    Write {
        /// The file that could not be written.
        path: PathBuf,
        /// The underlying I/O error.
        error: io::Error,
    },
    /// The host name cannot be recorded safely as a known_hosts entry.
    #[error(
        "cannot record host {host:?} in a known_hosts file: a host must be a non-empty \
         name or IP address made of letters, digits and . - _ : %"
    )]
    InvalidHost {
        /// The rejected host name.
        host: String,
    },
    /// accept-new found the host no longer unknown when it came to record
    /// the key: another session (or process) recorded a different key for
    /// it meanwhile, or the key is revoked. The key is not recorded.
    #[error("host {name} is no longer unknown: {status}")]
    NoLongerUnknown {
        /// The lookup name (see [`lookup_name`]).
        name: String,
        /// What the re-check found ([`HostKeyStatus::Changed`] or
        /// [`HostKeyStatus::Revoked`]).
        status: HostKeyStatus,
    },
    /// The key could not be encoded in OpenSSH format.
    #[error("cannot encode {algorithm} host key for a known_hosts file: {error}")]
    EncodeKey {
        /// The key's algorithm name.
        algorithm: String,
        /// The encoder's error.
        error: russh::keys::ssh_key::Error,
    },
}

/// A known_hosts line that was skipped because it could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseWarning {
    /// 1-based line number in the file.
    pub line: usize,
    /// Why the line was skipped.
    pub reason: String,
}

impl fmt::Display for ParseWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.reason)
    }
}

/// A key the known_hosts file expects for a host, reported when the host
/// presented a different one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownKey {
    /// SHA256 fingerprint of the expected key (`SHA256:...`).
    pub fingerprint: String,
    /// The expected key's type, e.g. `ssh-ed25519`.
    pub key_type: String,
    /// The file the entry comes from.
    pub path: PathBuf,
    /// 1-based line number of the entry, or 0 for a key learned at run time
    /// with [`KnownHosts::add`] (it is not in the file as loaded).
    pub line: usize,
    /// The entry's text as written in the file (for a learned key, the line
    /// that [`append_host_key`] writes for it).
    pub raw_line: String,
}

impl fmt::Display for KnownKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(
                f,
                "{} {} (learned at run time, {})",
                self.key_type,
                self.fingerprint,
                self.path.display()
            )
        } else {
            write!(
                f,
                "{} {} ({}:{})",
                self.key_type,
                self.fingerprint,
                self.path.display(),
                self.line
            )
        }
    }
}

/// The verdict on a host key or host certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKeyStatus {
    /// A matching line lists this key, or a matching `@cert-authority` line
    /// lists the CA of a valid host certificate for this host.
    Trusted,
    /// No line matches the host at all.
    Unknown,
    /// Lines match the host, but none of them lists this key: the host key
    /// changed, or someone is impersonating the host.
    Changed {
        /// Every key the file lists for this host.
        expected: Vec<KnownKey>,
    },
    /// A matching `@revoked` line lists this key (or, for a certificate, its
    /// key or its CA key). Revocation wins over everything else.
    Revoked {
        /// 1-based line number of the `@revoked` entry.
        line: usize,
    },
    /// A host certificate signed by a CA that a matching `@cert-authority`
    /// line lists, but not valid (expired, not yet valid, wrong principal,
    /// ...), and no plain line matches the host: refused as an unknown host
    /// would be, with the reason.
    InvalidCertificate {
        /// Why it is not valid.
        problem: CertificateProblem,
    },
}

impl HostKeyStatus {
    /// Whether the key is trusted.
    pub fn is_trusted(&self) -> bool {
        matches!(self, HostKeyStatus::Trusted)
    }
}

impl fmt::Display for HostKeyStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostKeyStatus::Trusted => f.write_str("host key is trusted"),
            HostKeyStatus::Unknown => f.write_str("host is not in known_hosts"),
            HostKeyStatus::InvalidCertificate { problem } => {
                write!(
                    f,
                    "host certificate from a trusted CA is not valid: {problem}"
                )
            }
            HostKeyStatus::Changed { expected } => {
                f.write_str("host key does not match known_hosts, which expects ")?;
                for (i, key) in expected.iter().enumerate() {
                    if i > 0 {
                        f.write_str(" or ")?;
                    }
                    write!(f, "{key}")?;
                }
                Ok(())
            }
            HostKeyStatus::Revoked { line } => {
                write!(f, "host key is revoked by known_hosts line {line}")
            }
        }
    }
}

/// A parsed known_hosts file.
#[derive(Clone)]
pub struct KnownHosts {
    path: PathBuf,
    entries: Vec<Entry>,
    warnings: Vec<ParseWarning>,
}

impl fmt::Debug for KnownHosts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KnownHosts")
            .field("path", &self.path)
            .field("entries", &self.entries.len())
            .field("warnings", &self.warnings)
            .finish()
    }
}

impl KnownHosts {
    /// The file this set was loaded from (or named after, for
    /// [`KnownHosts::parse`]).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Lines that were skipped because they could not be parsed, in file
    /// order.
    pub fn warnings(&self) -> &[ParseWarning] {
        &self.warnings
    }

    /// Number of usable entries (all markers, including learned keys).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no usable entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Checks a host key or host certificate presented by `host` on `port`.
    ///
    /// `host` is the address used to reach the node (a name or a bare IP
    /// address, without brackets).
    pub fn check(&self, host: &str, port: u16, key: &PublicKeyOrCertificate) -> HostKeyStatus {
        match key {
            PublicKeyOrCertificate::PublicKey { key, .. } => self.check_key(host, port, key),
            PublicKeyOrCertificate::Certificate(cert) => self.check_certificate(host, port, cert),
        }
    }

    /// Checks a plain host key presented by `host` on `port`.
    ///
    /// [`HostKeyStatus::Revoked`] if a matching `@revoked` line lists the
    /// key; otherwise [`HostKeyStatus::Trusted`] if a matching plain line
    /// lists it, [`HostKeyStatus::Changed`] if matching plain lines list only
    /// other keys, and [`HostKeyStatus::Unknown`] if no plain line matches.
    pub fn check_key(&self, host: &str, port: u16, key: &PublicKey) -> HostKeyStatus {
        let name = lookup_name(host, port);
        if let Some(line) = self.revoked_line(&name, &[key.key_data()]) {
            return HostKeyStatus::Revoked { line };
        }
        self.check_plain(&name, key.key_data())
    }

    /// The line of the first matching `@revoked` entry listing one of `keys`.
    fn revoked_line(&self, name: &str, keys: &[&KeyData]) -> Option<usize> {
        self.entries
            .iter()
            .find(|e| {
                e.marker == Marker::Revoked && keys.contains(&&e.key) && e.hosts.matches(name)
            })
            .map(|e| e.line)
    }

    /// The algorithms of the plain keys listed for `host` on `port`, in
    /// file order, without duplicates. A client offers these first, as
    /// OpenSSH does, so a host known by (say) its ECDSA key is not asked for
    /// its ed25519 key and refused as changed.
    pub fn key_algorithms_for(&self, host: &str, port: u16) -> Vec<russh::keys::Algorithm> {
        let name = lookup_name(host, port);
        let mut found: Vec<russh::keys::Algorithm> = Vec::new();
        for entry in &self.entries {
            if entry.marker == Marker::None && entry.hosts.matches(&name) {
                let algorithms = match entry.key.algorithm() {
                    // An RSA key is offered as rsa-sha2-512/256: OpenSSH
                    // 8.8+ no longer signs with SHA-1 (ssh-rsa).
                    russh::keys::Algorithm::Rsa { .. } => vec![
                        russh::keys::Algorithm::Rsa {
                            hash: Some(HashAlg::Sha512),
                        },
                        russh::keys::Algorithm::Rsa {
                            hash: Some(HashAlg::Sha256),
                        },
                    ],
                    other => vec![other],
                };
                for algorithm in algorithms {
                    if !found.contains(&algorithm) {
                        found.push(algorithm);
                    }
                }
            }
        }
        found
    }

    /// The plain-key verdict, revocation already ruled out.
    fn check_plain(&self, name: &str, key: &KeyData) -> HostKeyStatus {
        let mut expected = Vec::new();
        for entry in &self.entries {
            if entry.marker != Marker::None || !entry.hosts.matches(name) {
                continue;
            }
            if entry.key == *key {
                return HostKeyStatus::Trusted;
            }
            expected.push(entry.known_key(&self.path));
        }
        if expected.is_empty() {
            HostKeyStatus::Unknown
        } else {
            HostKeyStatus::Changed { expected }
        }
    }
}

/// The SHA256 fingerprint of a key in OpenSSH format (`SHA256:` followed by
/// unpadded base64), as `ssh-keygen -l` prints it.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}
