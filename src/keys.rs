//! The client identity: loading the private key nodetunnel authenticates
//! with, and generating a fresh one (`nodetunnel keys generate`).
//!
//! Private key material never reaches a log line: [`Identity`]'s `Debug`
//! shows only the path, algorithm and fingerprint.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use russh::keys::{Algorithm, HashAlg, PrivateKey, PublicKey};

/// A loaded private key and what identifies it.
pub struct Identity {
    /// Where it was read from.
    pub path: PathBuf,
    /// The key.
    pub key: Arc<PrivateKey>,
}

impl Identity {
    /// The public half.
    pub fn public_key(&self) -> &PublicKey {
        self.key.public_key()
    }

    /// `SHA256:...` fingerprint of the public key.
    pub fn fingerprint(&self) -> String {
        fingerprint(self.public_key())
    }

    /// The key's algorithm name, e.g. `ssh-ed25519`.
    pub fn algorithm(&self) -> String {
        self.key.algorithm().as_str().to_string()
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("path", &self.path)
            .field("algorithm", &self.algorithm())
            .field("fingerprint", &self.fingerprint())
            .finish()
    }
}

/// Why a key could not be loaded or generated.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a private key we can use.
    #[error("{} is not a usable private key: {reason}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What the decoder said.
        reason: String,
    },
    /// The key is encrypted and no (or a wrong) passphrase was given.
    #[error("{} is encrypted: set ssh.passphrase_file to a file holding its passphrase ({reason})", path.display())]
    Encrypted {
        /// The file.
        path: PathBuf,
        /// What the decoder said.
        reason: String,
    },
    /// The key file is writable by group or others.
    #[error("{} is writable by group or others (mode {mode:o}); chmod 600 it", path.display())]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
    /// `keys generate` found an existing key and refuses to overwrite it.
    #[error("{} already exists; refusing to overwrite a key (remove it first to replace it)", path.display())]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// Writing a generated key failed.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Key generation itself failed.
    #[error("key generation failed: {0}")]
    Generate(String),
}

/// `SHA256:<base64>` fingerprint, as `ssh-keygen -l` prints it.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// Load the OpenSSH (or PEM) private key at `path`; `passphrase_file`, when
/// given, holds the passphrase on its first line.
///
/// A key readable by group or others is accepted with a warning (Kubernetes
/// mounts secrets 0644 unless told otherwise); one writable by them is refused.
pub fn load_identity(path: &Path, passphrase_file: Option<&Path>) -> Result<Identity, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o022 != 0 {
            return Err(KeyError::Permissions {
                path: path.to_path_buf(),
                mode,
            });
        }
        if mode & 0o044 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "private key is readable by group or others; chmod 600 it");
        }
    }
    let passphrase = match passphrase_file {
        None => None,
        Some(file) => {
            let text = std::fs::read_to_string(file).map_err(|source| KeyError::Read {
                path: file.to_path_buf(),
                source,
            })?;
            Some(text.lines().next().unwrap_or("").to_string())
        }
    };
    let key = russh::keys::decode_secret_key(&text, passphrase.as_deref()).map_err(|e| {
        let reason = e.to_string();
        let encrypted = text.contains("ENCRYPTED")
            || matches!(e, russh::keys::Error::KeyIsEncrypted)
            || reason.to_ascii_lowercase().contains("encrypt")
            || reason.to_ascii_lowercase().contains("decrypt");
        if encrypted {
            KeyError::Encrypted {
                path: path.to_path_buf(),
                reason,
            }
        } else {
            KeyError::Malformed {
                path: path.to_path_buf(),
                reason,
            }
        }
    })?;
    Ok(Identity {
        path: path.to_path_buf(),
        key: Arc::new(key),
    })
}

/// A key written by [`generate`].
#[derive(Debug)]
pub struct GeneratedKey {
    /// The private key file (mode 0600).
    pub private_path: PathBuf,
    /// The public key file (`.pub`, mode 0644).
    pub public_path: PathBuf,
    /// The line to put in a node's authorized_keys.
    pub authorized_keys_line: String,
    /// `SHA256:...` fingerprint.
    pub fingerprint: String,
}

/// Generate an ed25519 key as `dir/name` (private, 0600) and `dir/name.pub`.
/// Refuses to overwrite either file.
pub fn generate(dir: &Path, name: &str, comment: &str) -> Result<GeneratedKey, KeyError> {
    let private_path = dir.join(name);
    let public_path = dir.join(format!("{name}.pub"));
    for path in [&private_path, &public_path] {
        if path.exists() {
            return Err(KeyError::Exists { path: path.clone() });
        }
    }
    std::fs::create_dir_all(dir).map_err(|source| KeyError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519)
        .map_err(|e| KeyError::Generate(e.to_string()))?;
    key.set_comment(comment);
    let private_text = key
        .to_openssh(russh::keys::ssh_key::LineEnding::LF)
        .map_err(|e| KeyError::Generate(e.to_string()))?;
    let public_line = key
        .public_key()
        .to_openssh()
        .map_err(|e| KeyError::Generate(e.to_string()))?;
    write_new(&private_path, private_text.as_bytes(), 0o600)?;
    write_new(&public_path, format!("{public_line}\n").as_bytes(), 0o644)?;
    Ok(GeneratedKey {
        private_path,
        public_path,
        fingerprint: fingerprint(key.public_key()),
        authorized_keys_line: public_line,
    })
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), KeyError> {
    let err = |source| KeyError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                KeyError::Exists {
                    path: path.to_path_buf(),
                }
            } else {
                err(e)
            }
        })?;
    file.write_all(bytes).map_err(err)?;
    file.sync_all().map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_0600_load_back_and_are_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let generated = generate(dir.path(), "id_ed25519", "test").unwrap();
        let mode = std::fs::metadata(&generated.private_path)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(generated.authorized_keys_line.starts_with("ssh-ed25519 "));
        assert!(generated.fingerprint.starts_with("SHA256:"));

        let identity = load_identity(&generated.private_path, None).unwrap();
        assert_eq!(identity.fingerprint(), generated.fingerprint);
        let debug = format!("{identity:?}");
        assert!(!debug.contains("PRIVATE"), "{debug}");

        let again = generate(dir.path(), "id_ed25519", "test").unwrap_err();
        assert!(matches!(again, KeyError::Exists { .. }), "{again}");
    }

    #[test]
    fn a_pkcs8_pem_key_loads_too() {
        // The vendored russh reads PEM framing by label (PATCHES.md): a
        // key written as PKCS#8 PEM at test time loads back.
        let dir = tempfile::tempdir().unwrap();
        let key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).unwrap();
        let mut pem = Vec::new();
        russh::keys::encode_pkcs8_pem(&key, &mut pem).unwrap();
        let path = dir.path().join("pkcs8");
        write_new(&path, &pem, 0o600).unwrap();
        let identity = load_identity(&path, None).unwrap();
        assert_eq!(identity.fingerprint(), fingerprint(key.public_key()));
    }

    #[test]
    fn a_world_writable_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let generated = generate(dir.path(), "k", "t").unwrap();
        std::fs::set_permissions(
            &generated.private_path,
            std::fs::Permissions::from_mode(0o666),
        )
        .unwrap();
        let e = load_identity(&generated.private_path, None).unwrap_err();
        assert!(matches!(e, KeyError::Permissions { .. }), "{e}");
    }

    #[test]
    fn an_encrypted_key_without_passphrase_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).unwrap();
        let encrypted = key.encrypt(&mut rand::rng(), "secret").unwrap();
        let path = dir.path().join("enc");
        write_new(
            &path,
            encrypted
                .to_openssh(russh::keys::ssh_key::LineEnding::LF)
                .unwrap()
                .as_bytes(),
            0o600,
        )
        .unwrap();
        let e = load_identity(&path, None).unwrap_err();
        assert!(matches!(e, KeyError::Encrypted { .. }), "{e}");

        let pass = dir.path().join("pass");
        std::fs::write(&pass, "secret\n").unwrap();
        let identity = load_identity(&path, Some(&pass)).unwrap();
        assert_eq!(identity.fingerprint(), fingerprint(key.public_key()));
    }
}
