//! [`FieldError`]: what a config table's `validate` returns when one of
//! its fields is wrong, the key path and the reason. The configuration
//! file's loader (and the inventory sources) add the file or the node's
//! place to it. This module imports nothing from the crate, so any table
//! can use it.

/// One field of a configuration table that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct FieldError {
    /// Key path inside the table's parent (`admin.listen`,
    /// `allowed_hosts[2]`, `ssh_port`).
    pub key: String,
    /// One line saying what is wrong.
    pub reason: String,
}

impl FieldError {
    /// The error for `key`, because of `reason`.
    pub fn new(key: String, reason: String) -> Self {
        FieldError { key, reason }
    }
}
