//! Learning keys (accept-new): trusting a key in memory, and appending it
//! to the file, once per process at a time.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::{Mutex, PoisonError};

use russh::keys::ssh_key::public::KeyData;
use russh::keys::{HashAlg, PublicKey};

use super::matching::{lookup_name, Hosts, Marker};
use super::parse::Entry;
#[cfg(doc)]
use super::KnownHostsError::NoLongerUnknown;
use super::{HostKeyStatus, KnownHosts, KnownHostsError};

/// Serialises appends made by this process, so that the "does the file end
/// with a newline" check and the append that follows cannot interleave with
/// another thread's, and so that [`KnownHosts::learn`]'s re-check of the
/// file and its append are one step for every learner in this process.
/// Other processes are covered by `O_APPEND`: each entry is written with a
/// single `write`, and the worst a cross-process race can do is add one
/// blank line, which readers ignore (two processes learning the same host
/// at the same instant can still both append: known limit, no file lock).
static APPEND_LOCK: Mutex<()> = Mutex::new(());

impl KnownHosts {
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
