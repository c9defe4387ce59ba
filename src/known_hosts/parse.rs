//! Reading known_hosts text into entries: one line at a time, a malformed
//! line skipped with a [`ParseWarning`] instead of failing the file.

use std::fs;
use std::io;
use std::path::Path;

use russh::keys::ssh_key::public::KeyData;
use russh::keys::{HashAlg, PublicKey};

use super::matching::{Hosts, Marker};
use super::{KnownHosts, KnownHostsError, KnownKey, ParseWarning};

/// Suffix of OpenSSH certificate key types; certificates are not valid keys
/// in a known_hosts file (CAs are listed with `@cert-authority` instead).
const CERT_SUFFIX: &str = "-cert-v01@openssh.com";

/// One usable known_hosts entry.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    /// 1-based line number, 0 for entries added with [`KnownHosts::add`].
    pub(super) line: usize,
    pub(super) marker: Marker,
    pub(super) hosts: Hosts,
    pub(super) key: KeyData,
    pub(super) raw: String,
}

impl Entry {
    pub(super) fn known_key(&self, path: &Path) -> KnownKey {
        KnownKey {
            fingerprint: self.key.fingerprint(HashAlg::Sha256).to_string(),
            key_type: self.key.algorithm().as_str().to_owned(),
            path: path.to_owned(),
            line: self.line,
            raw_line: self.raw.clone(),
        }
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
