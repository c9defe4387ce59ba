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
//! It also owns writing to the file for the accept-new policy
//! ([`append_host_key`], [`KnownHosts::learn`]).
//!
//! Files are parsed once; each lookup is a linear scan over the parsed
//! entries, with hashed entries' salts already decoded and keyed into an
//! HMAC state, so a lookup costs one short HMAC per hashed line.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use russh::keys::ssh_key::public::KeyData;
use russh::keys::ssh_key::{Algorithm, Fingerprint};
use russh::keys::{Certificate, HashAlg, PublicKey, PublicKeyOrCertificate};
use sha1::Sha1;

type HmacSha1 = Hmac<Sha1>;

/// Length of a SHA-1 digest, which is also the salt length OpenSSH requires
/// in hashed host names.
const SHA1_LEN: usize = 20;

/// Magic prefix of hashed host names (the only hash type OpenSSH defines).
const HASH_MAGIC: &str = "|1|";

/// Suffix of OpenSSH certificate key types; certificates are not valid keys
/// in a known_hosts file (CAs are listed with `@cert-authority` instead).
const CERT_SUFFIX: &str = "-cert-v01@openssh.com";

/// Standard base64 as OpenSSH writes it, accepting a missing padding too.
const B64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Serialises appends made by this process, so that the "does the file end
/// with a newline" check and the append that follows cannot interleave with
/// another thread's, and so that [`KnownHosts::learn`]'s re-check of the
/// file and its append are one step for every learner in this process.
/// Other processes are covered by `O_APPEND`: each entry is written with a
/// single `write`, and the worst a cross-process race can do is add one
/// blank line, which readers ignore (two processes learning the same host
/// at the same instant can still both append: known limit, no file lock).
static APPEND_LOCK: Mutex<()> = Mutex::new(());

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

/// What a line's leading marker makes of its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Marker {
    /// A plain host key.
    None,
    /// `@cert-authority`: a CA trusted to sign host certificates.
    CertAuthority,
    /// `@revoked`: a key that must never be accepted.
    Revoked,
}

/// One `pattern` or `!pattern` of a comma-separated host pattern list.
#[derive(Debug, Clone)]
struct HostPattern {
    negated: bool,
    /// Lowercased glob (`*` and `?` wildcards).
    glob: String,
}

/// The host field of an entry, ready for matching.
#[derive(Clone)]
enum Hosts {
    /// Comma-separated patterns.
    Patterns(Vec<HostPattern>),
    /// `|1|salt|hash`: the HMAC is already keyed with the decoded salt.
    Hashed { mac: HmacSha1, hash: [u8; SHA1_LEN] },
    /// A lookup name learned at run time, compared literally (so a learned
    /// name is never taken as a wildcard pattern).
    Exact(String),
}

impl fmt::Debug for Hosts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hosts::Patterns(patterns) => f.debug_tuple("Patterns").field(patterns).finish(),
            Hosts::Hashed { .. } => f.write_str("Hashed"),
            Hosts::Exact(name) => f.debug_tuple("Exact").field(name).finish(),
        }
    }
}

impl Hosts {
    fn parse(field: &str) -> Result<Self, String> {
        if field.starts_with('|') {
            return Self::parse_hashed(field);
        }
        let patterns = field
            .split(',')
            .map(|pattern| match pattern.strip_prefix('!') {
                Some(glob) => HostPattern {
                    negated: true,
                    glob: glob.to_ascii_lowercase(),
                },
                None => HostPattern {
                    negated: false,
                    glob: pattern.to_ascii_lowercase(),
                },
            })
            .collect();
        Ok(Hosts::Patterns(patterns))
    }

    fn parse_hashed(field: &str) -> Result<Self, String> {
        let rest = field
            .strip_prefix(HASH_MAGIC)
            .ok_or_else(|| "unsupported hashed host name (expected |1|salt|hash)".to_owned())?;
        let (salt, hash) = rest
            .split_once('|')
            .ok_or_else(|| "malformed hashed host name (expected |1|salt|hash)".to_owned())?;
        let salt = B64
            .decode(salt)
            .map_err(|e| format!("bad salt in hashed host name: {e}"))?;
        if salt.len() != SHA1_LEN {
            return Err(format!(
                "bad salt in hashed host name: {} bytes instead of {SHA1_LEN}",
                salt.len()
            ));
        }
        let hash = B64
            .decode(hash)
            .map_err(|e| format!("bad hash in hashed host name: {e}"))?;
        let hash: [u8; SHA1_LEN] = hash.try_into().map_err(|hash: Vec<u8>| {
            format!(
                "bad hash in hashed host name: {} bytes instead of {SHA1_LEN}",
                hash.len()
            )
        })?;
        let mac = HmacSha1::new_from_slice(&salt)
            .map_err(|e| format!("bad salt in hashed host name: {e}"))?;
        Ok(Hosts::Hashed { mac, hash })
    }

    /// Whether this field matches a lowercased lookup name.
    ///
    /// For pattern lists this is OpenSSH's `match_pattern_list`: any matching
    /// negated pattern rejects, otherwise at least one positive pattern must
    /// match.
    fn matches(&self, name: &str) -> bool {
        match self {
            Hosts::Patterns(patterns) => {
                let mut positive = false;
                for pattern in patterns {
                    if glob_match(pattern.glob.as_bytes(), name.as_bytes()) {
                        if pattern.negated {
                            return false;
                        }
                        positive = true;
                    }
                }
                positive
            }
            Hosts::Hashed { mac, hash } => {
                let mut mac = mac.clone();
                mac.update(name.as_bytes());
                mac.verify_slice(hash).is_ok()
            }
            Hosts::Exact(exact) => exact == name,
        }
    }
}

/// One usable known_hosts entry.
#[derive(Debug, Clone)]
struct Entry {
    /// 1-based line number, 0 for entries added with [`KnownHosts::add`].
    line: usize,
    marker: Marker,
    hosts: Hosts,
    key: KeyData,
    raw: String,
}

impl Entry {
    fn known_key(&self, path: &Path) -> KnownKey {
        KnownKey {
            fingerprint: self.key.fingerprint(HashAlg::Sha256).to_string(),
            key_type: self.key.algorithm().as_str().to_owned(),
            path: path.to_owned(),
            line: self.line,
            raw_line: self.raw.clone(),
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
    /// Reads and parses a known_hosts file.
    ///
    /// A missing file is an empty set of known hosts. Malformed lines are
    /// skipped and reported by [`KnownHosts::warnings`].
    ///
    /// # Errors
    /// [`KnownHostsError::Read`] if the file exists but cannot be read.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, KnownHostsError> {
        let path = path.as_ref();
        let mut known = KnownHosts::empty(path);
        let bytes = match fs::read(path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(known),
            Err(error) => {
                return Err(KnownHostsError::Read {
                    path: path.to_owned(),
                    error,
                })
            }
        };
        for (index, line) in bytes.split(|&b| b == b'\n').enumerate() {
            let number = index + 1;
            match std::str::from_utf8(line) {
                Ok(line) => known.parse_line(number, line),
                Err(_) => known.warn(number, "line is not valid UTF-8".to_owned()),
            }
        }
        Ok(known)
    }

    /// Parses known_hosts text; `path` is only used in messages and
    /// [`KnownKey::path`]. Malformed lines are skipped and reported by
    /// [`KnownHosts::warnings`].
    pub fn parse(text: &str, path: impl AsRef<Path>) -> Self {
        let mut known = KnownHosts::empty(path.as_ref());
        for (index, line) in text.split('\n').enumerate() {
            known.parse_line(index + 1, line);
        }
        known
    }

    fn empty(path: &Path) -> Self {
        KnownHosts {
            path: path.to_owned(),
            entries: Vec::new(),
            warnings: Vec::new(),
        }
    }

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

    /// Whether any `@cert-authority` line exists: only then does a client
    /// ask servers for host certificates.
    pub fn has_cert_authorities(&self) -> bool {
        self.entries
            .iter()
            .any(|e| e.marker == Marker::CertAuthority)
    }

    fn warn(&mut self, line: usize, reason: String) {
        self.warnings.push(ParseWarning { line, reason });
    }

    fn parse_line(&mut self, number: usize, line: &str) {
        let line = line.strip_suffix('\r').unwrap_or(line);
        match parse_entry(number, line) {
            Ok(Some(entry)) => self.entries.push(entry),
            Ok(None) => {}
            Err(reason) => self.warn(number, reason),
        }
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

    fn check_certificate_at(
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

    /// The line of the first matching `@revoked` entry listing one of `keys`.
    fn revoked_line(&self, name: &str, keys: &[&KeyData]) -> Option<usize> {
        self.entries
            .iter()
            .find(|e| {
                e.marker == Marker::Revoked && keys.contains(&&e.key) && e.hosts.matches(name)
            })
            .map(|e| e.line)
    }

    /// The plain-key verdict, revocation already ruled out.
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

    /// Trusts `key` for `host` on `port` from now on, in memory only (see
    /// [`KnownHosts::learn`] to also record it in the file).
    ///
    /// The name is matched literally, never as a pattern. This does not
    /// override revocation: a key listed by a matching `@revoked` line stays
    /// revoked. Adding a key that is already trusted for the host is a no-op.
    pub fn add(&mut self, host: &str, port: u16, key: &PublicKey) {
        let name = lookup_name(host, port);
        let key = key.key_data();
        let known = self
            .entries
            .iter()
            .any(|e| e.marker == Marker::None && e.key == *key && e.hosts.matches(&name));
        if known {
            return;
        }
        let raw = match entry_line(&name, key) {
            Ok(line) => line,
            Err(_) => format!(
                "{name} {} {}",
                key.algorithm().as_str(),
                key.fingerprint(HashAlg::Sha256)
            ),
        };
        self.entries.push(Entry {
            line: 0,
            marker: Marker::None,
            hosts: Hosts::Exact(name),
            key: key.clone(),
            raw,
        });
    }

    /// accept-new: records `key` for `host` on `port` in this set's file
    /// and trusts it in memory with [`KnownHosts::add`], but only if the
    /// host is still unknown when checked again under the process-wide
    /// append lock, against this set *and* the file as it is now (another
    /// session or process may have learned a key since the caller's check).
    ///
    /// - still unknown: the entry is appended (as [`append_host_key`]);
    /// - the same key is now trusted (by this set or the file): nothing is
    ///   appended, the key is trusted in memory, `Ok`;
    /// - a different key is now recorded, or the key is revoked:
    ///   [`KnownHostsError::NoLongerUnknown`] with the verdict, nothing is
    ///   appended (a changed key, as for any other check).
    ///
    /// This does blocking file I/O; call it from a blocking context.
    ///
    /// # Errors
    /// [`KnownHostsError::NoLongerUnknown`] as above; otherwise as
    /// [`append_host_key`] and [`KnownHosts::load`]. On error nothing is
    /// added in memory.
    pub fn learn(&mut self, host: &str, port: u16, key: &PublicKey) -> Result<(), KnownHostsError> {
        let line = entry_for(host, port, key)?;
        let _guard = APPEND_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
        let on_disk = KnownHosts::load(&self.path)?;
        let verdicts = [
            self.check_key(host, port, key),
            on_disk.check_key(host, port, key),
        ];
        let refusal = |status: &HostKeyStatus| KnownHostsError::NoLongerUnknown {
            name: lookup_name(host, port),
            status: status.clone(),
        };
        if let Some(revoked) = verdicts
            .iter()
            .find(|v| matches!(v, HostKeyStatus::Revoked { .. }))
        {
            return Err(refusal(revoked));
        }
        if !verdicts.iter().any(HostKeyStatus::is_trusted) {
            if let Some(changed) = verdicts
                .iter()
                .find(|v| matches!(v, HostKeyStatus::Changed { .. }))
            {
                return Err(refusal(changed));
            }
            create_parent(&self.path)?;
            append_line(&self.path, &line)?;
        }
        self.add(host, port, key);
        Ok(())
    }
}

/// Parses one line (without its line terminator). `Ok(None)` for blank and
/// comment lines, `Err(reason)` for malformed ones.
fn parse_entry(number: usize, line: &str) -> Result<Option<Entry>, String> {
    let mut fields = line.split([' ', '\t']).filter(|field| !field.is_empty());
    let Some(first) = fields.next() else {
        return Ok(None);
    };
    if first.starts_with('#') {
        return Ok(None);
    }
    let (marker, hosts) = match first {
        "@cert-authority" => (Marker::CertAuthority, fields.next()),
        "@revoked" => (Marker::Revoked, fields.next()),
        other if other.starts_with('@') => return Err(format!("unknown marker {other:?}")),
        other => (Marker::None, Some(other)),
    };
    let hosts = hosts.ok_or_else(|| "missing host patterns after marker".to_owned())?;
    if hosts.starts_with('@') {
        return Err("more than one marker".to_owned());
    }
    let key_type = fields
        .next()
        .filter(|field| !field.starts_with('#'))
        .ok_or_else(|| "missing key type".to_owned())?;
    let base64 = fields
        .next()
        .filter(|field| !field.starts_with('#'))
        .ok_or_else(|| format!("missing {key_type} key data"))?;
    if key_type.ends_with(CERT_SUFFIX) {
        return Err(format!(
            "{key_type} is a certificate type; list the CA with @cert-authority instead"
        ));
    }
    let hosts = Hosts::parse(hosts)?;
    let key = PublicKey::from_openssh(&format!("{key_type} {base64}"))
        .map_err(|e| format!("invalid {key_type} key: {e}"))?;
    Ok(Some(Entry {
        line: number,
        marker,
        hosts,
        key: key.key_data().clone(),
        raw: line.to_owned(),
    }))
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

fn unix_now() -> Option<u64> {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs())
}

/// OpenSSH's `match_pattern`: `*` matches any run of bytes (including
/// none), `?` exactly one byte, anything else itself.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    // Position of the last `*` seen and the text position it is tried at.
    let mut star: Option<(usize, usize)> = None;
    while let Some(&c) = text.get(t) {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&pc) if pc == b'?' || pc == c => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((star_p, star_t)) => {
                    p = star_p + 1;
                    t = star_t + 1;
                    star = Some((star_p, star_t + 1));
                }
                None => return false,
            },
        }
    }
    pattern.iter().skip(p).all(|&c| c == b'*')
}

/// The name a host is looked up (and recorded) under: the lowercased host
/// for port 22, `[host]:port` otherwise, as the OpenSSH client does.
pub fn lookup_name(host: &str, port: u16) -> String {
    let host = host.to_ascii_lowercase();
    if port == 22 {
        host
    } else {
        format!("[{host}]:{port}")
    }
}

/// The SHA256 fingerprint of a key in OpenSSH format (`SHA256:` followed by
/// unpadded base64), as `ssh-keygen -l` prints it.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// `<name> <keytype> <base64>`, without comment or newline.
fn entry_line(name: &str, key: &KeyData) -> Result<String, KnownHostsError> {
    let text = PublicKey::new(key.clone(), "")
        .to_openssh()
        .map_err(|error| KnownHostsError::EncodeKey {
            algorithm: key.algorithm().as_str().to_owned(),
            error,
        })?;
    Ok(format!("{name} {text}"))
}

/// Whether `host` can be written as a known_hosts host name as is: it must
/// not be able to inject fields, lines, patterns or markers.
fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':' | b'%'))
}

/// Appends `<lookup-name> <keytype> <base64>` for `host` on `port` to the
/// known_hosts file at `path` (plain, not hashed; see [`lookup_name`]).
///
/// The file is created with mode 0600, and its parent directories with mode
/// 0700, if missing. The entry is written with a single write to a file
/// opened with `O_APPEND`, preceded by a newline if the file does not end
/// with one, so concurrent appenders in this and other processes do not
/// corrupt each other's lines. The data is not fsynced: after a crash the
/// worst case is learning the key again.
///
/// This does blocking file I/O; call it from a blocking context.
///
/// # Errors
/// [`KnownHostsError::InvalidHost`] if `host` is not a plain name or IP
/// address, [`KnownHostsError::EncodeKey`] if the key cannot be encoded,
/// [`KnownHostsError::CreateDir`] or [`KnownHostsError::Write`] on I/O
/// failure.
pub fn append_host_key(
    path: &Path,
    host: &str,
    port: u16,
    key: &PublicKey,
) -> Result<(), KnownHostsError> {
    let line = entry_for(host, port, key)?;
    create_parent(path)?;
    let _guard = APPEND_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    append_line(path, &line)
}

/// The line recorded for `host` on `port`, after checking the host name.
fn entry_for(host: &str, port: u16, key: &PublicKey) -> Result<String, KnownHostsError> {
    if !valid_host(host) {
        return Err(KnownHostsError::InvalidHost {
            host: host.to_owned(),
        });
    }
    entry_line(&lookup_name(host, port), key.key_data())
}

/// Create the file's parent directories (mode 0700) if missing.
fn create_parent(path: &Path) -> Result<(), KnownHostsError> {
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        let mut builder = fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder
            .create(dir)
            .map_err(|error| KnownHostsError::CreateDir {
                path: dir.to_owned(),
                error,
            })?;
    }
    Ok(())
}

/// Append `line` with one `write` (see [`append_host_key`]); the caller
/// holds [`APPEND_LOCK`].
fn append_line(path: &Path, line: &str) -> Result<(), KnownHostsError> {
    let write_error = |error| KnownHostsError::Write {
        path: path.to_owned(),
        error,
    };
    let mut options = OpenOptions::new();
    options.read(true).append(true).create(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(write_error)?;

    let mut buf = Vec::with_capacity(line.len() + 2);
    if lacks_final_newline(&mut file).map_err(write_error)? {
        buf.push(b'\n');
    }
    buf.extend_from_slice(line.as_bytes());
    buf.push(b'\n');
    file.write_all(&buf).map_err(write_error)
}

/// Whether a non-empty file's last byte is not a newline.
fn lacks_final_newline(file: &mut File) -> io::Result<bool> {
    let len = file.metadata()?.len();
    let Some(last) = len.checked_sub(1) else {
        return Ok(false);
    };
    file.seek(SeekFrom::Start(last))?;
    let mut byte = [0u8; 1];
    match file.read(&mut byte)? {
        0 => Ok(false), // truncated meanwhile
        _ => Ok(byte != [b'\n']),
    }
}

#[cfg(test)]
mod tests {
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

        // Wrong principal.
        assert_eq!(
            kh.check_certificate("node-2.example.com", 22, &cert),
            HostKeyStatus::Unknown
        );
        assert!(kh
            .certificate_problem("node-2.example.com", 22, &cert)
            .is_some_and(|p| p.contains("principals")));

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
            HostKeyStatus::Unknown
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
        assert_eq!(
            kh.check_certificate("node-1.example.com", 22, &expired),
            HostKeyStatus::Unknown
        );
        let future = host_cert(
            &ca,
            host_pub,
            CertType::Host,
            &["node-1.example.com"],
            t + 3600,
            t + 7200,
        );
        assert_eq!(
            kh.check_certificate("node-1.example.com", 22, &future),
            HostKeyStatus::Unknown
        );
        // Validity bounds: valid_after <= now < valid_before.
        assert_eq!(
            kh.check_certificate_at("node-1.example.com", 22, &expired, Some(t - 7200)),
            HostKeyStatus::Trusted
        );
        assert_eq!(
            kh.check_certificate_at("node-1.example.com", 22, &expired, Some(t - 3600)),
            HostKeyStatus::Unknown
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
            HostKeyStatus::Unknown
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
}
