//! The `[audit]` table: where audit records go and the bounds of the file
//! and the queue.

use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::field_error::FieldError;

/// Where audit records go.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditMode {
    /// No records (the default).
    #[default]
    Off,
    /// Each record is one log event with target `nodetunnel::audit`.
    Log,
    /// Each record is one JSON line appended to `audit.path`.
    File,
}

/// Smallest `max_file_bytes` accepted: a file must hold a few records.
pub const MIN_FILE_BYTES: u64 = 64 * 1024;

/// Most rotated files `keep_files` may keep.
pub const MAX_KEEP_FILES: u32 = 100;

/// Largest `queue` accepted (records are about 500 bytes each).
pub const MAX_QUEUE: usize = 1_000_000;

/// The `[audit]` section.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// `off`, `log` or `file`.
    pub mode: AuditMode,
    /// The JSON-lines file (`mode = "file"`); relative paths are resolved
    /// against the config file's directory. Created with mode 0600.
    pub path: Option<PathBuf>,
    /// Size bound of the file: a record that would take it past this size
    /// rotates it first (`path` becomes `path.1`, `path.1` becomes
    /// `path.2`, ..., the oldest beyond `keep_files` is removed).
    pub max_file_bytes: u64,
    /// Rotated files kept beside `path` (`path.1` .. `path.N`).
    pub keep_files: u32,
    /// Records waiting for the writer, at most; beyond it records are
    /// dropped (counted, and summarised in the file) rather than slowing
    /// a connection.
    pub queue: usize,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            mode: AuditMode::Off,
            path: None,
            max_file_bytes: 100 * 1024 * 1024,
            keep_files: 5,
            queue: 4096,
        }
    }
}

impl AuditConfig {
    /// Check the section. On error, returns the offending key (like
    /// `audit.path`) and why.
    pub fn validate(&self) -> Result<(), FieldError> {
        let err = |key: &str, reason: String| Err(FieldError::new(key.to_string(), reason));
        match (&self.mode, &self.path) {
            (AuditMode::File, None) => {
                return err("audit.path", "mode = \"file\" needs a path".into())
            }
            (AuditMode::File, Some(path)) if path.as_os_str().is_empty() => {
                return err("audit.path", "empty path".into())
            }
            (AuditMode::File, Some(path))
                if path.file_name().is_none() || path.as_os_str().as_bytes().ends_with(b"/") =>
            {
                return err(
                    "audit.path",
                    format!("{} does not name a file", path.display()),
                )
            }
            (AuditMode::Off | AuditMode::Log, Some(_)) => {
                return err(
                    "audit.path",
                    "set but audit.mode is not \"file\": the path would be ignored".into(),
                )
            }
            _ => {}
        }
        if self.max_file_bytes < MIN_FILE_BYTES {
            return err(
                "audit.max_file_bytes",
                format!(
                    "{} is below the minimum of {MIN_FILE_BYTES}",
                    self.max_file_bytes
                ),
            );
        }
        if self.keep_files == 0 || self.keep_files > MAX_KEEP_FILES {
            return err(
                "audit.keep_files",
                format!("{} is not in 1..={MAX_KEEP_FILES}", self.keep_files),
            );
        }
        if self.queue == 0 || self.queue > MAX_QUEUE {
            return err(
                "audit.queue",
                format!("{} is not in 1..={MAX_QUEUE}", self.queue),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> AuditConfig {
        toml::from_str(text).expect("valid [audit] table")
    }

    #[test]
    fn default_is_off_and_valid() {
        let config = AuditConfig::default();
        assert_eq!(config.mode, AuditMode::Off);
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(parse(""), config);
    }

    #[test]
    fn validation_errors_name_the_field() {
        let cases = [
            ("mode = \"file\"", "audit.path"),
            ("mode = \"file\"\npath = \"\"", "audit.path"),
            ("mode = \"file\"\npath = \"/var/log/\"", "audit.path"),
            ("mode = \"log\"\npath = \"/tmp/a.jsonl\"", "audit.path"),
            ("max_file_bytes = 100", "audit.max_file_bytes"),
            ("keep_files = 0", "audit.keep_files"),
            ("keep_files = 101", "audit.keep_files"),
            ("queue = 0", "audit.queue"),
            ("queue = 1000001", "audit.queue"),
        ];
        for (text, key) in cases {
            let error = parse(text).validate().expect_err(text);
            assert_eq!(error.key, key, "{text}: {error}");
        }
        let ok = parse("mode = \"file\"\npath = \"/var/log/nodetunnel/audit.jsonl\"");
        assert_eq!(ok.validate(), Ok(()));
    }

    #[test]
    fn unknown_modes_and_keys_are_refused() {
        assert!(toml::from_str::<AuditConfig>("mode = \"syslog\"").is_err());
        assert!(toml::from_str::<AuditConfig>("max_bytes = 1").is_err());
    }
}
