//! The client certificate: an OpenSSH user certificate for the identity
//! key (`ssh.certificate`), issued by someone else (Vault, step-ca, a cron
//! job running `ssh-keygen -s`).
//!
//! This module owns three things about it:
//! - loading and checking it locally ([`load`], [`check`]): a user
//!   certificate, signed (its CA signature verifies), valid now, for the
//!   identity's key. Each refusal is a [`CertificateError`] variant with a
//!   stable [`reason`](CertificateError::reason) label. Principals are not
//!   a reason to refuse: the node's `AuthorizedPrincipalsFile` may map
//!   other principals (`nodetunnel`) to the login user, so sshd decides;
//!   [`principal_warning`] says when none of them is the login user, for a
//!   warning at load.
//! - the place sessions read it from ([`CertificateSlot`]): each
//!   authentication takes the certificate in the slot at that moment, so a
//!   replacement installed there is used by new sessions at once while
//!   established sessions keep running (sshd checks a certificate only at
//!   authentication). Whoever produces certificates (the file watcher
//!   here, [`crate::issuer`]) installs them with [`CertificateSlot::install`].
//! - following the file on disk ([`watch`]): the file's directory is
//!   watched (notify), so issuers that replace it in place or rename a new
//!   file over it are both seen; the caller re-reads the file on each
//!   change (and on SIGHUP) and keeps the previous certificate when the
//!   new one is refused.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use notify::{EventKind, RecursiveMode, Watcher};
use russh::keys::ssh_key::certificate::CertType;
use russh::keys::{Certificate, PublicKey};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::keys::fingerprint;
use crate::shutdown::Shutdown;

/// Largest certificate file read (OpenSSH certificates are a few KiB; an
/// RSA 16384 one with many principals stays well below this).
const MAX_CERTIFICATE_BYTES: u64 = 256 * 1024;

/// After a change event, wait until the directory was quiet this long...
const DEBOUNCE_QUIET: Duration = Duration::from_millis(100);
/// ...but never longer than this after the first event.
const DEBOUNCE_MAX: Duration = Duration::from_secs(1);
/// A watch that failed is set up again after this long.
const WATCH_RETRY: Duration = Duration::from_secs(5);

/// Why a certificate is refused, locally, before it is offered to a node.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not an OpenSSH certificate, or its CA signature does not
    /// verify.
    #[error("{} is not a usable OpenSSH certificate: {reason}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What the decoder (or the signature check) said.
        reason: String,
    },
    /// A host certificate where a user certificate is needed.
    #[error("{} is a host certificate, not a user certificate (sign it with ssh-keygen -s without -h)", path.display())]
    NotUserCertificate {
        /// The file.
        path: PathBuf,
    },
    /// Its validity starts later than now.
    #[error("{} is not valid yet: valid from {valid_after} (now {now})", path.display())]
    NotYetValid {
        /// The file.
        path: PathBuf,
        /// Start of its validity, RFC 3339.
        valid_after: String,
        /// The local time it was checked at, RFC 3339.
        now: String,
    },
    /// Its validity ended.
    #[error("{} expired at {valid_before} (now {now})", path.display())]
    Expired {
        /// The file.
        path: PathBuf,
        /// End of its validity, RFC 3339.
        valid_before: String,
        /// The local time it was checked at, RFC 3339.
        now: String,
    },
    /// It certifies another key than the identity's.
    #[error("{} certifies key {certified}, not the identity's key {identity}", path.display())]
    KeyMismatch {
        /// The file.
        path: PathBuf,
        /// Fingerprint of the key the certificate is for.
        certified: String,
        /// Fingerprint of `ssh.identity`'s key.
        identity: String,
    },
}

impl CertificateError {
    /// Stable label for metrics: `read`, `malformed`, `not_user`,
    /// `not_yet_valid`, `expired` or `key_mismatch`.
    pub fn reason(&self) -> &'static str {
        match self {
            CertificateError::Read { .. } => "read",
            CertificateError::Malformed { .. } => "malformed",
            CertificateError::NotUserCertificate { .. } => "not_user",
            CertificateError::NotYetValid { .. } => "not_yet_valid",
            CertificateError::Expired { .. } => "expired",
            CertificateError::KeyMismatch { .. } => "key_mismatch",
        }
    }
}

/// A loaded user certificate and where it came from.
#[derive(Clone)]
pub struct ClientCertificate {
    /// Where it was read from.
    pub path: PathBuf,
    /// The certificate.
    pub certificate: Certificate,
}

impl ClientCertificate {
    /// Its key id (free text chosen by the issuer; sshd logs it).
    pub fn key_id(&self) -> &str {
        self.certificate.key_id()
    }

    /// Its serial (sshd logs it; a KRL can revoke it).
    pub fn serial(&self) -> u64 {
        self.certificate.serial()
    }

    /// End of its validity, Unix seconds (`u64::MAX`: forever).
    pub fn valid_before(&self) -> u64 {
        self.certificate.valid_before()
    }

    /// The principals it lists (empty: any).
    pub fn principals(&self) -> &[String] {
        self.certificate.valid_principals()
    }

    /// Start of its validity, Unix seconds.
    pub fn valid_after(&self) -> u64 {
        self.certificate.valid_after()
    }

    /// Whether its validity ended at `now` (OpenSSH: valid while now <
    /// valid_before).
    pub fn is_expired(&self, now: SystemTime) -> bool {
        let now = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        now >= self.valid_before()
    }
}

impl fmt::Debug for ClientCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCertificate")
            .field("path", &self.path)
            .field("key_id", &self.key_id())
            .field("serial", &self.serial())
            .field("valid_before", &rfc3339(self.valid_before()))
            .finish()
    }
}

/// Unix seconds as RFC 3339 (UTC, seconds); `forever` for OpenSSH's
/// "no end" (`u64::MAX`) and anything past year 9999.
pub fn rfc3339(unix: u64) -> String {
    if unix == u64::MAX {
        return "forever".into();
    }
    // humantime formats years up to 9999.
    if unix >= 253_402_300_800 {
        return "forever".into();
    }
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

/// Parse the OpenSSH certificate line in `text` (as `ssh-keygen -s`
/// writes it: `<algorithm>-cert-v01@openssh.com <base64> [comment]`) and
/// verify its CA signature. `path` names the file in errors.
pub fn parse(text: &str, path: &Path) -> Result<Certificate, CertificateError> {
    let malformed = |reason: String| CertificateError::Malformed {
        path: path.to_path_buf(),
        reason,
    };
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .ok_or_else(|| malformed("the file is empty".into()))?;
    let certificate = Certificate::from_openssh(line).map_err(|e| malformed(e.to_string()))?;
    certificate
        .verify_signature()
        .map_err(|e| malformed(format!("its CA signature does not verify ({e})")))?;
    Ok(certificate)
}

/// Check `certificate` (read from `path`) for use with the key `identity`
/// at `now`: see the module docs. The login user is not checked against
/// its principals (see [`principal_warning`]).
pub fn check(
    certificate: &Certificate,
    path: &Path,
    identity: &PublicKey,
    now: SystemTime,
) -> Result<(), CertificateError> {
    let path_buf = || path.to_path_buf();
    if certificate.cert_type() != CertType::User {
        return Err(CertificateError::NotUserCertificate { path: path_buf() });
    }
    let now = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if now < certificate.valid_after() {
        return Err(CertificateError::NotYetValid {
            path: path_buf(),
            valid_after: rfc3339(certificate.valid_after()),
            now: rfc3339(now),
        });
    }
    // OpenSSH: valid while now < valid_before.
    if now >= certificate.valid_before() {
        return Err(CertificateError::Expired {
            path: path_buf(),
            valid_before: rfc3339(certificate.valid_before()),
            now: rfc3339(now),
        });
    }
    if certificate.public_key() != identity.key_data() {
        return Err(CertificateError::KeyMismatch {
            path: path_buf(),
            certified: fingerprint(&PublicKey::from(certificate.public_key().clone())),
            identity: fingerprint(identity),
        });
    }
    Ok(())
}

/// When `certificate` lists principals and none of them is `user`: the
/// warning to log once at load (not a refusal: the node's
/// `AuthorizedPrincipalsFile` may map these principals to `user`, and
/// sshd's refusal, if it comes, is reported as `refused_by_node` naming
/// them). `None` when a principal is `user` or it lists none (any user).
pub fn principal_warning(certificate: &Certificate, user: &str) -> Option<String> {
    let principals = certificate.valid_principals();
    if principals.is_empty() || principals.iter().any(|p| p == user) {
        return None;
    }
    Some(format!(
        "the certificate's principals ({}) do not include the login user {user:?}: \
         the node accepts it only if its AuthorizedPrincipalsFile for {user:?} lists one of them \
         (TrustedUserCAKeys and AuthorizedPrincipalsFile on the node decide)",
        principals.join(", ")
    ))
}

/// Read the certificate at `path`, parse it and [`check`] it for the key
/// `identity` at `now`.
pub fn load(
    path: &Path,
    identity: &PublicKey,
    now: SystemTime,
) -> Result<ClientCertificate, CertificateError> {
    let read_error = |source| CertificateError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut std::io::Read::take(file, MAX_CERTIFICATE_BYTES + 1),
        &mut text,
    )
    .map_err(read_error)?;
    if text.len() as u64 > MAX_CERTIFICATE_BYTES {
        return Err(CertificateError::Malformed {
            path: path.to_path_buf(),
            reason: format!("larger than {MAX_CERTIFICATE_BYTES} bytes"),
        });
    }
    let certificate = parse(&text, path)?;
    check(&certificate, path, identity, now)?;
    Ok(ClientCertificate {
        path: path.to_path_buf(),
        certificate,
    })
}

/// Where sessions find the certificate to authenticate with (see the
/// module docs). Empty: authenticate with the plain key.
#[derive(Debug, Default)]
pub struct CertificateSlot {
    current: RwLock<Option<Arc<ClientCertificate>>>,
}

impl CertificateSlot {
    /// A slot holding `certificate`.
    pub fn new(certificate: Option<Arc<ClientCertificate>>) -> Self {
        CertificateSlot {
            current: RwLock::new(certificate),
        }
    }

    /// The certificate in use now.
    pub fn current(&self) -> Option<Arc<ClientCertificate>> {
        self.current.read().map(|c| c.clone()).unwrap_or(None)
    }

    /// Use `certificate` from the next authentication on.
    pub fn install(&self, certificate: Arc<ClientCertificate>) {
        if let Ok(mut slot) = self.current.write() {
            *slot = Some(certificate);
        }
    }
}

/// How often an expired certificate with no replacement is reported.
pub const EXPIRED_REPORT_INTERVAL: Duration = Duration::from_secs(60);

/// Until `shutdown`, every [`EXPIRED_REPORT_INTERVAL`] (the first check
/// at once): when the certificate `current` returns has expired (nothing
/// replaced it), call `report` with it (the server logs a warning: new
/// sessions cannot authenticate; sessions up keep running, readiness is
/// unchanged).
pub async fn report_while_expired(
    current: impl Fn() -> Option<Arc<ClientCertificate>>,
    report: impl Fn(&ClientCertificate),
    shutdown: Shutdown,
) {
    let mut every = tokio::time::interval(EXPIRED_REPORT_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = every.tick() => {}
        }
        if let Some(certificate) = current() {
            if certificate.is_expired(SystemTime::now()) {
                report(&certificate);
            }
        }
    }
}

/// Watch the directory of `path` until `shutdown`, calling `changed` after
/// each burst of writes that may have touched the file (debounced: once
/// the directory was quiet for 100 ms, at most 1 s after the first event).
/// A watch that cannot be set up or breaks is logged and set up again
/// every 5 seconds (SIGHUP still re-reads the file meanwhile).
pub async fn watch(path: PathBuf, changed: impl Fn() + Send + 'static, shutdown: Shutdown) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path.file_name().map(|n| n.to_os_string());
    let relevant = |event: &notify::Event| {
        !matches!(event.kind, EventKind::Access(_))
            && (event.paths.is_empty()
                || event.paths.iter().any(|p| {
                    p == &dir
                        || match p.file_name() {
                            // The file itself, or a Kubernetes Secret
                            // volume's `..data` swap.
                            Some(name) => {
                                Some(name) == file_name.as_deref()
                                    || name.to_string_lossy().starts_with("..")
                            }
                            None => true,
                        }
                }))
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<notify::Result<notify::Event>>();
    let mut watcher: Option<notify::RecommendedWatcher> = None;
    let mut retry_at = Instant::now();
    loop {
        if watcher.is_none() && Instant::now() >= retry_at {
            let sender = tx.clone();
            let made = notify::recommended_watcher(move |event| {
                // The receiver lives as long as this task.
                let _ = sender.send(event);
            })
            .and_then(|mut w| w.watch(&dir, RecursiveMode::NonRecursive).map(|()| w));
            match made {
                Ok(w) => {
                    watcher = Some(w);
                    // Catch up with what changed while not watching.
                    changed();
                }
                Err(error) => {
                    tracing::error!(path = %path.display(), %error, "cannot watch the certificate's directory; retrying (SIGHUP re-reads it)");
                    retry_at = Instant::now() + WATCH_RETRY;
                }
            }
        }
        tokio::select! {
            _ = shutdown.wait() => return,
            event = rx.recv() => match event {
                Some(Ok(event)) if relevant(&event) => {
                    let deadline = Instant::now() + DEBOUNCE_MAX;
                    let mut quiet = (Instant::now() + DEBOUNCE_QUIET).min(deadline);
                    loop {
                        tokio::select! {
                            more = rx.recv() => match more {
                                Some(Ok(e)) if relevant(&e) => {
                                    quiet = (Instant::now() + DEBOUNCE_QUIET).min(deadline);
                                }
                                Some(Ok(_)) => {}
                                Some(Err(_)) | None => break,
                            },
                            _ = tokio::time::sleep_until(quiet) => break,
                        }
                    }
                    changed();
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => {
                    tracing::error!(path = %path.display(), %error, "certificate watch failed; watching again");
                    watcher = None;
                    retry_at = Instant::now() + WATCH_RETRY;
                }
                // The sender lives in this task: cannot happen.
                None => {}
            },
            _ = tokio::time::sleep_until(retry_at), if watcher.is_none() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use russh::keys::ssh_key::certificate::Builder;
    use russh::keys::{Algorithm, PrivateKey};

    const NOW: u64 = 1_800_000_000;

    fn key() -> PrivateKey {
        PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).unwrap()
    }

    /// A certificate for `subject` signed by a fresh CA.
    fn cert(
        subject: &PrivateKey,
        kind: CertType,
        after: u64,
        before: u64,
        principals: &[&str],
    ) -> Certificate {
        let ca = key();
        let mut builder =
            Builder::new_with_random_nonce(&mut rand::rng(), subject.public_key(), after, before)
                .unwrap();
        builder.serial(7).unwrap();
        builder.key_id("test-id").unwrap();
        builder.cert_type(kind).unwrap();
        if principals.is_empty() {
            builder.all_principals_valid().unwrap();
        }
        for p in principals {
            builder.valid_principal(*p).unwrap();
        }
        builder.extension("permit-port-forwarding", "").unwrap();
        builder.sign(&ca).unwrap()
    }

    fn at(unix: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(unix)
    }

    fn path() -> &'static Path {
        Path::new("/etc/nodetunnel/id_ed25519-cert.pub")
    }

    #[test]
    fn a_valid_user_certificate_for_the_identity_passes() {
        let identity = key();
        let c = cert(&identity, CertType::User, NOW - 60, NOW + 3600, &["root"]);
        check(&c, path(), identity.public_key(), at(NOW)).unwrap();
        // No principals: valid for any user.
        let any = cert(&identity, CertType::User, NOW - 60, NOW + 3600, &[]);
        check(&any, path(), identity.public_key(), at(NOW)).unwrap();
    }

    #[test]
    fn a_host_certificate_is_refused() {
        let identity = key();
        let c = cert(&identity, CertType::Host, NOW - 60, NOW + 3600, &["root"]);
        let e = check(&c, path(), identity.public_key(), at(NOW)).unwrap_err();
        assert!(
            matches!(e, CertificateError::NotUserCertificate { .. }),
            "{e}"
        );
        assert_eq!(e.reason(), "not_user");
    }

    #[test]
    fn expired_and_not_yet_valid_certificates_are_refused_with_their_times() {
        let identity = key();
        let c = cert(&identity, CertType::User, NOW - 3600, NOW, &[]);
        let e = check(&c, path(), identity.public_key(), at(NOW)).unwrap_err();
        assert_eq!(e.reason(), "expired");
        let text = e.to_string();
        assert!(
            text.contains("expired at 2027-01-15T08:00:00Z (now 2027-01-15T08:00:00Z)"),
            "{text}"
        );
        let c = cert(&identity, CertType::User, NOW + 60, NOW + 3600, &[]);
        let e = check(&c, path(), identity.public_key(), at(NOW)).unwrap_err();
        assert_eq!(e.reason(), "not_yet_valid");
        assert!(
            e.to_string()
                .contains("valid from 2027-01-15T08:01:00Z (now 2027-01-15T08:00:00Z)"),
            "{e}"
        );
    }

    #[test]
    fn a_certificate_for_another_key_is_refused_naming_both_fingerprints() {
        let identity = key();
        let other = key();
        let c = cert(&other, CertType::User, NOW - 60, NOW + 3600, &[]);
        let e = check(&c, path(), identity.public_key(), at(NOW)).unwrap_err();
        assert_eq!(e.reason(), "key_mismatch");
        let text = e.to_string();
        assert!(
            text.contains(&fingerprint(other.public_key()))
                && text.contains(&fingerprint(identity.public_key())),
            "{text}"
        );
    }

    #[test]
    fn a_certificate_without_the_login_user_among_its_principals_passes_with_a_warning() {
        // sshd's AuthorizedPrincipalsFile may map `alice` to root: the node
        // decides, nodetunnel only warns.
        let identity = key();
        let c = cert(
            &identity,
            CertType::User,
            NOW - 60,
            NOW + 3600,
            &["alice", "bob"],
        );
        check(&c, path(), identity.public_key(), at(NOW)).unwrap();
        let warning = principal_warning(&c, "root").expect("a warning");
        assert!(
            warning.starts_with(
                "the certificate's principals (alice, bob) do not include the login user \"root\""
            ) && warning.contains("AuthorizedPrincipalsFile"),
            "{warning}"
        );
        assert_eq!(principal_warning(&c, "alice"), None);
        let any = cert(&identity, CertType::User, NOW - 60, NOW + 3600, &[]);
        assert_eq!(principal_warning(&any, "root"), None);
    }

    #[test]
    fn garbage_a_private_key_and_a_forged_signature_are_malformed() {
        for text in ["", "not a certificate", "ssh-ed25519 AAAA test"] {
            let e = parse(text, path()).unwrap_err();
            assert_eq!(e.reason(), "malformed", "{text:?}: {e}");
        }
        // A certificate whose body was changed after signing.
        let identity = key();
        let c = cert(&identity, CertType::User, NOW - 60, NOW + 3600, &["root"]);
        let mut bytes = c.to_bytes().unwrap();
        let at = bytes
            .windows(4)
            .position(|w| w == b"root")
            .expect("principal in the encoding");
        bytes[at] = b'R';
        let forged = Certificate::from_bytes(&bytes).unwrap();
        let e = parse(&forged.to_openssh().unwrap(), path()).unwrap_err();
        assert!(
            e.to_string().contains("CA signature does not verify"),
            "{e}"
        );
    }

    #[test]
    fn load_reads_parses_and_checks_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let identity = key();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let c = cert(&identity, CertType::User, now - 60, now + 3600, &["root"]);
        let file = dir.path().join("id-cert.pub");
        std::fs::write(&file, format!("{}\n", c.to_openssh().unwrap())).unwrap();
        let loaded = load(&file, identity.public_key(), SystemTime::now()).unwrap();
        assert_eq!((loaded.key_id(), loaded.serial()), ("test-id", 7));
        let e = load(&dir.path().join("missing"), identity.public_key(), at(now)).unwrap_err();
        assert_eq!(e.reason(), "read");
    }

    #[test]
    fn the_slot_hands_out_what_was_installed_last() {
        let identity = key();
        let slot = CertificateSlot::default();
        assert!(slot.current().is_none());
        let first = cert(&identity, CertType::User, NOW - 60, NOW + 3600, &[]);
        slot.install(Arc::new(ClientCertificate {
            path: path().into(),
            certificate: first,
        }));
        let held = slot.current().unwrap();
        let second = cert(&identity, CertType::User, NOW - 60, NOW + 7200, &[]);
        slot.install(Arc::new(ClientCertificate {
            path: path().into(),
            certificate: second,
        }));
        assert_eq!(slot.current().unwrap().valid_before(), NOW + 7200);
        // What a session took before stays as it was.
        assert_eq!(held.valid_before(), NOW + 3600);
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_certificate_is_reported_every_minute_until_replaced() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let identity = key();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let expired = cert(&identity, CertType::User, now - 3600, now - 1, &[]);
        let slot = Arc::new(CertificateSlot::new(Some(Arc::new(ClientCertificate {
            path: path().into(),
            certificate: expired,
        }))));
        let reports = Arc::new(AtomicUsize::new(0));
        let shutdown = Shutdown::new();
        let task = tokio::spawn(report_while_expired(
            {
                let slot = slot.clone();
                move || slot.current()
            },
            {
                let reports = reports.clone();
                move |_: &ClientCertificate| {
                    reports.fetch_add(1, Ordering::SeqCst);
                }
            },
            shutdown.clone(),
        ));
        // At once, then once a minute.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(reports.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert_eq!(reports.load(Ordering::SeqCst), 3);
        // Replaced by a valid one: no more reports.
        slot.install(Arc::new(ClientCertificate {
            path: path().into(),
            certificate: cert(&identity, CertType::User, now - 60, now + 7200, &[]),
        }));
        tokio::time::sleep(Duration::from_secs(180)).await;
        assert_eq!(reports.load(Ordering::SeqCst), 3);
        shutdown.trigger();
        task.await.unwrap();
    }

    #[test]
    fn rfc3339_says_forever_for_no_end() {
        assert_eq!(rfc3339(u64::MAX), "forever");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    }
}
