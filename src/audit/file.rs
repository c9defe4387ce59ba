//! The audit file: JSON lines appended to `audit.path`, created with mode
//! 0600, bounded in size, and following logrotate.
//!
//! - **Size bound**: a batch that would take the file past
//!   `max_file_bytes` rotates it first: `path.{N-1}` becomes `path.N`, ...,
//!   `path` becomes `path.1`, and the oldest beyond `keep_files` is
//!   overwritten. A single record larger than the bound is still written,
//!   alone in its file.
//! - **logrotate**: before each batch the file at `path` is compared with
//!   the one open (device and inode); if it was renamed away or removed,
//!   the new `path` is created and written to. [`AuditFile::reopen`] (on
//!   SIGHUP) does the same unconditionally. Either way a `create`-mode
//!   logrotate works without `copytruncate`.
//!
//! Blocking I/O: the writer task calls it through `spawn_blocking`.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why the audit file cannot be written.
#[derive(Debug, thiserror::Error)]
#[error("audit file {}: {action}: {error}", path.display())]
pub struct AuditFileError {
    /// The file at fault (`path` or one of its rotations).
    pub path: PathBuf,
    /// What was being done: `open`, `write`, `rotate`.
    pub action: &'static str,
    /// The system error.
    pub error: io::Error,
}

/// The open audit file. See the module docs.
#[derive(Debug)]
pub struct AuditFile {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    file: File,
    size: u64,
    /// Device and inode of the open file.
    identity: (u64, u64),
}

impl AuditFile {
    /// Open (or create, mode 0600) `path` for appending.
    pub fn open(path: &Path, max_bytes: u64, keep: u32) -> Result<AuditFile, AuditFileError> {
        let (file, size, identity) = open_append(path)?;
        Ok(AuditFile {
            path: path.to_path_buf(),
            max_bytes,
            keep,
            file,
            size,
            identity,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Close the open file and open `path` again (SIGHUP).
    pub fn reopen(&mut self) -> Result<(), AuditFileError> {
        let (file, size, identity) = open_append(&self.path)?;
        self.file = file;
        self.size = size;
        self.identity = identity;
        Ok(())
    }

    /// Whether `path` no longer names the open file (renamed away or
    /// removed by logrotate).
    pub fn rotated_away(&self) -> bool {
        match std::fs::metadata(&self.path) {
            Ok(meta) => (meta.dev(), meta.ino()) != self.identity,
            Err(_) => true,
        }
    }

    /// Append `lines` (each a JSON line with its `\n`), reopening first if
    /// the file was rotated away and rotating as the size bound requires.
    pub fn write_lines(&mut self, lines: &[String]) -> Result<(), AuditFileError> {
        if self.rotated_away() {
            self.reopen()?;
        }
        let mut buf = Vec::new();
        for line in lines {
            let len = line.len() as u64;
            let pending = buf.len() as u64;
            if self.size + pending > 0 && self.size + pending + len > self.max_bytes {
                self.append(&buf)?;
                buf.clear();
                self.rotate()?;
            }
            buf.extend_from_slice(line.as_bytes());
        }
        self.append(&buf)
    }

    /// Push what was written to the disk (at shutdown).
    pub fn sync(&self) -> Result<(), AuditFileError> {
        self.file.sync_data().map_err(|error| AuditFileError {
            path: self.path.clone(),
            action: "sync",
            error,
        })
    }

    fn append(&mut self, bytes: &[u8]) -> Result<(), AuditFileError> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.file.write_all(bytes).map_err(|error| AuditFileError {
            path: self.path.clone(),
            action: "write",
            error,
        })?;
        self.size += bytes.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> Result<(), AuditFileError> {
        for i in (1..self.keep).rev() {
            let from = rotation(&self.path, i);
            match std::fs::rename(&from, rotation(&self.path, i + 1)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(error) => {
                    return Err(AuditFileError {
                        path: from,
                        action: "rotate",
                        error,
                    })
                }
            }
        }
        std::fs::rename(&self.path, rotation(&self.path, 1)).map_err(|error| AuditFileError {
            path: self.path.clone(),
            action: "rotate",
            error,
        })?;
        self.reopen()
    }
}

/// `path.N`.
pub fn rotation(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

fn open_append(path: &Path) -> Result<(File, u64, (u64, u64)), AuditFileError> {
    let error = |error| AuditFileError {
        path: path.to_path_buf(),
        action: "open",
        error,
    };
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(error)?;
    let meta = file.metadata().map_err(error)?;
    if !meta.is_file() {
        return Err(error(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{mode:o}"),
            "the audit file is readable or writable by others than its owner (nodetunnel creates it 0600)"
        );
    }
    Ok((file, meta.len(), (meta.dev(), meta.ino())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(n: usize) -> String {
        format!("{{\"n\":{n:08}}}\n") // 15 bytes
    }

    #[test]
    fn creates_the_file_0600_and_appends() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let mut file = AuditFile::open(&path, 1 << 20, 2).expect("open");
        file.write_lines(&[line(1), line(2)]).expect("write");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        drop(file);
        let mut file = AuditFile::open(&path, 1 << 20, 2).expect("reopen");
        file.write_lines(&[line(3)]).expect("write");
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text, format!("{}{}{}", line(1), line(2), line(3)));
    }

    #[test]
    fn renamed_away_file_is_followed_by_a_new_one_at_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let mut file = AuditFile::open(&path, 1 << 20, 2).expect("open");
        file.write_lines(&[line(1)]).expect("write");
        // logrotate without copytruncate: rename, no signal.
        let moved = dir.path().join("audit.jsonl-20261207");
        std::fs::rename(&path, &moved).expect("rename");
        assert!(file.rotated_away());
        file.write_lines(&[line(2)]).expect("write");
        assert_eq!(std::fs::read_to_string(&moved).expect("old"), line(1));
        assert_eq!(std::fs::read_to_string(&path).expect("new"), line(2));
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Removed outright: created again.
        std::fs::remove_file(&path).expect("remove");
        file.write_lines(&[line(3)]).expect("write");
        assert_eq!(std::fs::read_to_string(&path).expect("new"), line(3));
    }

    #[test]
    fn reopen_switches_to_the_file_now_at_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let mut file = AuditFile::open(&path, 1 << 20, 2).expect("open");
        file.write_lines(&[line(1)]).expect("write");
        let moved = dir.path().join("old");
        std::fs::rename(&path, &moved).expect("rename");
        file.reopen().expect("reopen");
        assert!(!file.rotated_away());
        file.write_lines(&[line(2)]).expect("write");
        assert_eq!(std::fs::read_to_string(&path).expect("new"), line(2));
        assert_eq!(std::fs::read_to_string(&moved).expect("old"), line(1));
    }

    #[test]
    fn the_size_bound_rotates_and_keeps_n_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        // Two lines per file.
        let mut file = AuditFile::open(&path, 30, 2).expect("open");
        let lines: Vec<String> = (1..=7).map(line).collect();
        file.write_lines(&lines[..3]).expect("write");
        file.write_lines(&lines[3..]).expect("write");
        let read = |p: &Path| std::fs::read_to_string(p).expect("read");
        assert_eq!(read(&path), line(7));
        assert_eq!(read(&rotation(&path, 1)), format!("{}{}", line(5), line(6)));
        assert_eq!(read(&rotation(&path, 2)), format!("{}{}", line(3), line(4)));
        assert!(!rotation(&path, 3).exists(), "only keep_files rotations");
        for p in [path.clone(), rotation(&path, 1), rotation(&path, 2)] {
            assert!(std::fs::metadata(&p).expect("meta").len() <= 30);
        }
    }
}
