//! The client identity: loading the private key nodetunnel authenticates
//! with, and generating a fresh one (`nodetunnel keys generate`).
//!
//! Private key material never reaches a log line: [`Identity`]'s `Debug`
//! shows only the path, algorithm and fingerprint.
//!
//! It also owns the rule for files that hold secrets (the identity, its
//! passphrase file, the front door's TLS key): [`read_secret_file`] checks
//! the mode and owner on the handle it reads (`fstat`, so a file swapped
//! after the check is not read), with [`check_secret_file`].

use std::fmt;
use std::fs::Metadata;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
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
    /// A secret file (the key or its passphrase file) is open to other
    /// users: its mode or its owner.
    #[error("{} {problem}", path.display())]
    Permissions {
        /// The file.
        path: PathBuf,
        /// What exposes it.
        problem: ExposedSecret,
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

/// Why a file holding a secret is refused: who else can read or replace it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExposedSecret {
    /// Not a regular file (a FIFO, a device, a directory).
    #[error("is not a regular file")]
    NotAFile,
    /// Any permission for others.
    #[error("is readable or writable by others (mode {mode:04o}); chmod 600 it")]
    Others {
        /// The permission bits.
        mode: u32,
    },
    /// Writable by the file's group.
    #[error("is writable by its group (mode {mode:04o}); chmod 600 it")]
    GroupWritable {
        /// The permission bits.
        mode: u32,
    },
    /// Readable by the group of a file not owned by root.
    #[error(
        "is readable by its group (mode {mode:04o}, owner uid {owner}); chmod 600 it \
         (only a root-owned file may be group-readable, as a Kubernetes Secret mounted with fsGroup is)"
    )]
    GroupReadable {
        /// The permission bits.
        mode: u32,
        /// The owner's uid.
        owner: u32,
    },
    /// Owned by a user who is neither root nor the one nodetunnel runs as:
    /// that user can rewrite it.
    #[error(
        "is owned by uid {owner}, neither root nor the user nodetunnel runs as (uid {process}); \
         chown it to one of them"
    )]
    ForeignOwner {
        /// The owner's uid.
        owner: u32,
        /// The uid nodetunnel runs as.
        process: u32,
    },
}

/// The rule for files holding secrets, on their `fstat`: a regular file, no
/// permission for others, not group-writable, group-readable only when
/// root owns it (0640 or 0440; a Kubernetes Secret mounted with `fsGroup`
/// is), and owned by root or by `process_uid` (the user nodetunnel runs
/// as; `None` when unknown, then any owner passes this part). This is the
/// rule PostgreSQL applies to its TLS key.
pub fn check_secret_file(meta: &Metadata, process_uid: Option<u32>) -> Result<(), ExposedSecret> {
    check_secret_mode(
        meta.is_file(),
        meta.mode() & 0o7777,
        meta.uid(),
        process_uid,
    )
}

fn check_secret_mode(
    is_file: bool,
    mode: u32,
    owner: u32,
    process_uid: Option<u32>,
) -> Result<(), ExposedSecret> {
    if !is_file {
        return Err(ExposedSecret::NotAFile);
    }
    if mode & 0o007 != 0 {
        return Err(ExposedSecret::Others { mode });
    }
    if mode & 0o020 != 0 {
        return Err(ExposedSecret::GroupWritable { mode });
    }
    if mode & 0o070 != 0 && owner != 0 {
        return Err(ExposedSecret::GroupReadable { mode, owner });
    }
    match process_uid {
        Some(process) if owner != 0 && owner != process => {
            Err(ExposedSecret::ForeignOwner { owner, process })
        }
        _ => Ok(()),
    }
}

/// The uid this process runs as: the owner of `/proc/self` (Linux gives it
/// the process's effective uid). `None` without procfs.
pub fn process_uid() -> Option<u32> {
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

/// Open `path`, check the opened file with [`check_secret_file`] (on the
/// handle, not the path) and read it whole.
pub fn read_secret_file(path: &Path) -> Result<Vec<u8>, KeyError> {
    let read_error = |source| KeyError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(read_error)?;
    let meta = file.metadata().map_err(read_error)?;
    check_secret_file(&meta, process_uid()).map_err(|problem| KeyError::Permissions {
        path: path.to_path_buf(),
        problem,
    })?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(read_error)?;
    Ok(bytes)
}

/// `SHA256:<base64>` fingerprint, as `ssh-keygen -l` prints it.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// Load the OpenSSH (or PEM) private key at `path`; `passphrase_file`, when
/// given, holds the passphrase on its first line.
///
/// Both files are read with [`read_secret_file`]: a key (or passphrase
/// file) that others can read or replace is refused, naming the file, its
/// mode and what to change.
pub fn load_identity(path: &Path, passphrase_file: Option<&Path>) -> Result<Identity, KeyError> {
    let text = utf8(path, read_secret_file(path)?)?;
    let passphrase = match passphrase_file {
        None => None,
        Some(file) => {
            let text = utf8(file, read_secret_file(file)?)?;
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

fn utf8(path: &Path, bytes: Vec<u8>) -> Result<String, KeyError> {
    String::from_utf8(bytes).map_err(|_| KeyError::Read {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not valid UTF-8 text"),
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
    use std::os::unix::fs::PermissionsExt;

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

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
        chmod(&generated.private_path, 0o666);
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
        write_new(&pass, b"secret\n", 0o600).unwrap();
        let identity = load_identity(&path, Some(&pass)).unwrap();
        assert_eq!(identity.fingerprint(), fingerprint(key.public_key()));

        // The passphrase file follows the key's rule.
        chmod(&pass, 0o644);
        let e = load_identity(&path, Some(&pass)).unwrap_err();
        assert!(
            matches!(&e, KeyError::Permissions { path, problem: ExposedSecret::Others { mode: 0o644 } } if *path == pass),
            "{e}"
        );
        assert!(
            e.to_string()
                .starts_with(&format!("{} is readable", pass.display())),
            "{e}"
        );
    }

    #[test]
    fn a_world_readable_key_is_refused_naming_the_file_and_the_mode() {
        let dir = tempfile::tempdir().unwrap();
        let generated = generate(dir.path(), "k", "t").unwrap();
        chmod(&generated.private_path, 0o644);
        let e = load_identity(&generated.private_path, None).unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with(&generated.private_path.display().to_string())
                && text.contains("mode 0644")
                && text.contains("chmod 600"),
            "{text}"
        );
    }

    #[test]
    fn a_key_owned_by_another_non_root_user_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let generated = generate(dir.path(), "k", "t").unwrap();
        if std::os::unix::fs::chown(&generated.private_path, Some(65534), None).is_err() {
            eprintln!("skipped: chown needs root");
            return;
        }
        let e = load_identity(&generated.private_path, None).unwrap_err();
        assert!(
            matches!(
                &e,
                KeyError::Permissions {
                    problem: ExposedSecret::ForeignOwner { owner: 65534, .. },
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("owned by uid 65534"), "{e}");
    }

    #[test]
    fn a_root_owned_key_may_be_group_readable_for_fs_group_mounts() {
        let dir = tempfile::tempdir().unwrap();
        let generated = generate(dir.path(), "k", "t").unwrap();
        chmod(&generated.private_path, 0o440);
        let loaded = load_identity(&generated.private_path, None);
        if process_uid() == Some(0) {
            loaded.unwrap();
        } else {
            // Not root: the file is ours, and group-readable is refused.
            assert!(matches!(
                loaded.unwrap_err(),
                KeyError::Permissions {
                    problem: ExposedSecret::GroupReadable { .. },
                    ..
                }
            ));
        }
    }

    #[test]
    fn the_secret_file_rule() {
        let me = Some(1000);
        let ok = |mode, owner| check_secret_mode(true, mode, owner, me);
        assert_eq!(ok(0o600, 1000), Ok(()));
        assert_eq!(ok(0o400, 1000), Ok(()));
        assert_eq!(ok(0o600, 0), Ok(()));
        assert_eq!(ok(0o640, 0), Ok(()));
        assert_eq!(ok(0o440, 0), Ok(()));
        assert_eq!(ok(0o604, 0), Err(ExposedSecret::Others { mode: 0o604 }));
        assert_eq!(ok(0o644, 1000), Err(ExposedSecret::Others { mode: 0o644 }));
        assert_eq!(ok(0o601, 1000), Err(ExposedSecret::Others { mode: 0o601 }));
        assert_eq!(
            ok(0o660, 0),
            Err(ExposedSecret::GroupWritable { mode: 0o660 })
        );
        assert_eq!(
            ok(0o640, 1000),
            Err(ExposedSecret::GroupReadable {
                mode: 0o640,
                owner: 1000
            })
        );
        assert_eq!(
            ok(0o600, 1001),
            Err(ExposedSecret::ForeignOwner {
                owner: 1001,
                process: 1000
            })
        );
        assert_eq!(check_secret_mode(true, 0o600, 1001, None), Ok(()));
        assert_eq!(
            check_secret_mode(false, 0o600, 1000, me),
            Err(ExposedSecret::NotAFile)
        );
    }
}
