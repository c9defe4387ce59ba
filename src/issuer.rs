//! The certificate issuer (`[ssh.issuer]`): nodetunnel signs its own
//! short-lived OpenSSH user certificates for its identity's key, with a
//! user CA whose private key it reads from a file.
//!
//! This module owns:
//! - checking the table ([`validate`]): a CA key path, principals (none
//!   empty), `source_address` entries that parse as CIDRs or addresses,
//!   `validity` between [`MIN_VALIDITY`] (or [`TEST_MIN_VALIDITY`] with
//!   `test_only_short_validity`) and [`MAX_VALIDITY`];
//! - one issuance ([`issue`]): the CA key is read from its file each time
//!   (so it can be rotated in place; mode and owner checked as for the
//!   identity, never logged or written anywhere), and a user certificate
//!   is signed with only the `permit-port-forwarding` extension, the
//!   configured principals, the `source-address` critical option when
//!   set, the key id `nodetunnel@<hostname>`, a serial that increases
//!   ([`next_serial`]) and a validity from a minute ago to `validity` from
//!   now;
//! - renewal ([`run`]): at two thirds of each certificate's life (and when
//!   asked, on SIGHUP) a new one is issued and installed in the manager's
//!   certificate slot; a failure is logged, counted
//!   (`nodetunnel_client_certificate_renewals_total{result}`) and retried
//!   with backoff, and the previous certificate stays in use until it
//!   expires.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use russh::keys::ssh_key::certificate::{Builder, CertType};
use russh::keys::{PrivateKey, PublicKey};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::client_certificate::{self, rfc3339, ClientCertificate};
use crate::field_error::FieldError;
use crate::keys::{self, KeyError};
use crate::manager::TunnelManager;
use crate::shutdown::Shutdown;
use crate::ssh_config::IssuerConfig;

/// Smallest `validity`: renewals every 40 seconds at most.
pub const MIN_VALIDITY: Duration = Duration::from_secs(60);
/// Smallest `validity` with `test_only_short_validity = true`.
pub const TEST_MIN_VALIDITY: Duration = Duration::from_secs(1);
/// Largest `validity`: a short-lived certificate is the point.
pub const MAX_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);
/// How far in the past the validity starts (clocks of nodes behind ours).
pub const CLOCK_SKEW: u64 = 60;
/// The one extension issued certificates carry.
pub const EXTENSION: &str = "permit-port-forwarding";
/// First retry delay bound after a failed renewal (doubles, full jitter).
const RETRY_BASE: Duration = Duration::from_secs(1);
/// Largest retry delay after failed renewals.
const RETRY_MAX: Duration = Duration::from_secs(60);

/// Why a certificate could not be issued.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// The CA key file could not be read, is exposed, or is not a key.
    #[error("CA key {0}")]
    CaKey(#[from] KeyError),
    /// The CA key is encrypted: nodetunnel has no passphrase for it.
    #[error("CA key {} is encrypted; nodetunnel needs the CA key unencrypted (protect it with mode 0600 in a Secret)", path.display())]
    CaKeyEncrypted {
        /// The file.
        path: PathBuf,
    },
    /// The signing library refused (a field too long, an unsupported CA
    /// key algorithm).
    #[error("signing with {}: {reason}", path.display())]
    Sign {
        /// The CA key file.
        path: PathBuf,
        /// What the library said.
        reason: String,
    },
    /// The certificate just signed does not pass the local check (the
    /// clock is before 1970, or a library bug).
    #[error("the issued certificate is not usable: {0}")]
    Check(#[from] client_certificate::CertificateError),
}

impl IssueError {
    /// Stable label for `nodetunnel_client_certificate_renewals_total`:
    /// `ca_key` or `sign`.
    pub fn reason(&self) -> &'static str {
        match self {
            IssueError::CaKey(_) | IssueError::CaKeyEncrypted { .. } => "ca_key",
            IssueError::Sign { .. } | IssueError::Check(_) => "sign",
        }
    }
}

/// Check `[ssh.issuer]` (keys relative to the table).
pub fn validate(config: &IssuerConfig) -> Result<(), FieldError> {
    let err = |key: &str, reason: String| Err(FieldError::new(key.to_string(), reason));
    if config.ca_key.as_os_str().is_empty() {
        return err("ca_key", "must name the CA's private key file".into());
    }
    let floor = if config.test_only_short_validity {
        TEST_MIN_VALIDITY
    } else {
        MIN_VALIDITY
    };
    if config.validity < floor {
        return err(
            "validity",
            format!(
                "must be at least {} (renewed at two thirds of it)",
                humantime::format_duration(floor)
            ),
        );
    }
    if config.validity > MAX_VALIDITY {
        return err(
            "validity",
            format!(
                "must be at most {} (a short-lived certificate is the point)",
                humantime::format_duration(MAX_VALIDITY)
            ),
        );
    }
    if config.principals.is_empty() {
        return err(
            "principals",
            "must list at least one principal (an empty list would be valid for every user)".into(),
        );
    }
    for (i, principal) in config.principals.iter().enumerate() {
        if principal.is_empty()
            || principal.contains(',')
            || principal
                .chars()
                .any(|c| c.is_control() || c.is_whitespace())
        {
            return err(
                &format!("principals[{i}]"),
                format!("{principal:?} is not a principal (non-empty, no comma, space or control character)"),
            );
        }
    }
    for (i, entry) in config.source_address.iter().enumerate() {
        if parse_source(entry).is_none() {
            return err(
                &format!("source_address[{i}]"),
                format!("{entry:?} is not a CIDR (10.0.0.0/8) or an address"),
            );
        }
    }
    Ok(())
}

/// A `source_address` entry as the CIDR written in the certificate.
fn parse_source(entry: &str) -> Option<IpNet> {
    entry
        .parse::<IpNet>()
        .ok()
        .or_else(|| entry.parse::<IpAddr>().ok().map(IpNet::from))
}

/// The last serial handed out by [`next_serial`] in this process.
static LAST_SERIAL: AtomicU64 = AtomicU64::new(0);

/// A serial larger than every one issued before in this process: Unix
/// milliseconds at `now` (so serials also increase across restarts), or
/// the last one plus one when that is not larger.
pub fn next_serial(now: SystemTime) -> u64 {
    let millis = now
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX / 2))
        .unwrap_or(0);
    let previous = LAST_SERIAL
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| {
            Some(millis.max(last.saturating_add(1)))
        })
        .unwrap_or(0);
    millis.max(previous.saturating_add(1))
}

/// `nodetunnel@<hostname>` (the kernel's host name; `unknown` without it).
pub fn key_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into());
    format!("nodetunnel@{host}")
}

/// Read the CA private key at `path` (mode and owner checked).
fn load_ca_key(path: &Path) -> Result<PrivateKey, IssueError> {
    let bytes = keys::read_secret_file(path)?;
    let text = String::from_utf8(bytes).map_err(|_| KeyError::Malformed {
        path: path.to_path_buf(),
        reason: "not valid UTF-8 text".into(),
    })?;
    russh::keys::decode_secret_key(&text, None).map_err(|e| {
        if text.contains("ENCRYPTED") || matches!(e, russh::keys::Error::KeyIsEncrypted) {
            IssueError::CaKeyEncrypted {
                path: path.to_path_buf(),
            }
        } else {
            IssueError::CaKey(KeyError::Malformed {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })
        }
    })
}

/// What names an issued certificate where a file path would (in errors
/// and the admin API).
pub fn source_label(config: &IssuerConfig) -> PathBuf {
    PathBuf::from(format!(
        "certificate issued by ssh.issuer (CA {})",
        config.ca_key.display()
    ))
}

/// Sign a user certificate for `subject` with the CA key read from
/// `config.ca_key` now: see the module docs.
pub fn issue(
    config: &IssuerConfig,
    subject: &PublicKey,
    now: SystemTime,
) -> Result<ClientCertificate, IssueError> {
    let ca = load_ca_key(&config.ca_key)?;
    let sign_error = |e: russh::keys::ssh_key::Error| IssueError::Sign {
        path: config.ca_key.clone(),
        reason: e.to_string(),
    };
    let unix = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let valid_after = unix.saturating_sub(CLOCK_SKEW);
    let valid_before = unix.saturating_add(config.validity.as_secs().max(1));
    let mut builder = Builder::new_with_random_nonce(
        &mut rand::rng(),
        subject.clone(),
        valid_after,
        valid_before,
    )
    .map_err(sign_error)?;
    builder
        .serial(next_serial(now))
        .map_err(sign_error)?
        .key_id(key_id())
        .map_err(sign_error)?
        .cert_type(CertType::User)
        .map_err(sign_error)?
        .extension(EXTENSION, "")
        .map_err(sign_error)?;
    for principal in &config.principals {
        builder
            .valid_principal(principal.clone())
            .map_err(sign_error)?;
    }
    let sources: Vec<String> = config
        .source_address
        .iter()
        .filter_map(|s| parse_source(s))
        .map(|n| n.to_string())
        .collect();
    if !sources.is_empty() {
        builder
            .critical_option("source-address", sources.join(","))
            .map_err(sign_error)?;
    }
    let certificate = builder.sign(&ca).map_err(sign_error)?;
    let path = source_label(config);
    client_certificate::check(&certificate, &path, subject, now)?;
    Ok(ClientCertificate { path, certificate })
}

/// When to renew a certificate issued at `issued` for `validity`: at two
/// thirds of its life.
pub fn renew_at(issued: Instant, validity: Duration) -> Instant {
    issued + validity * 2 / 3
}

/// Log a newly issued certificate (never the CA key).
pub fn log_issued(certificate: &ClientCertificate, what: &str) {
    tracing::info!(
        key_id = certificate.key_id(),
        serial = certificate.serial(),
        principals = %certificate.principals().join(","),
        valid_before = %rfc3339(certificate.valid_before()),
        "{what}"
    );
}

/// Renew the manager's certificate until `shutdown`: see the module docs.
/// `issued` is when the certificate in use was issued; `reissue` asks for
/// a new certificate now (SIGHUP: the identity or the CA key may have
/// changed).
pub async fn run(
    config: IssuerConfig,
    manager: Arc<TunnelManager>,
    issued: Instant,
    reissue: Arc<Notify>,
    shutdown: Shutdown,
) {
    let mut next = renew_at(issued, config.validity);
    let mut retries = Backoff::new(RETRY_BASE, RETRY_MAX);
    loop {
        let asked = tokio::select! {
            _ = shutdown.wait() => return,
            _ = tokio::time::sleep_until(next) => false,
            _ = reissue.notified() => true,
        };
        let Some(identity) = manager.identity() else {
            return;
        };
        let started = Instant::now();
        match issue(&config, identity.public_key(), SystemTime::now()) {
            Ok(certificate) => {
                log_issued(
                    &certificate,
                    if asked {
                        "certificate issued (SIGHUP); new sessions use it"
                    } else {
                        "certificate renewed; new sessions use it"
                    },
                );
                manager.install_certificate(certificate);
                manager.metrics().client_certificate_renewal("ok");
                retries.reset();
                next = renew_at(started, config.validity);
            }
            Err(error) => {
                manager.metrics().client_certificate_renewal(error.reason());
                let delay = retries.next_delay().max(Duration::from_millis(100));
                let previous = manager.current_certificate();
                tracing::error!(
                    %error,
                    reason = error.reason(),
                    retry_in = %humantime::format_duration(Duration::from_millis(delay.as_millis() as u64)),
                    previous_serial = previous.as_ref().map(|c| c.serial()),
                    previous_valid_before = %previous.as_ref().map(|c| rfc3339(c.valid_before())).unwrap_or_default(),
                    "certificate renewal failed; the previous certificate stays in use until it expires"
                );
                next = Instant::now() + delay;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use russh::keys::Algorithm;
    use std::os::unix::fs::PermissionsExt;

    fn key() -> PrivateKey {
        PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).unwrap()
    }

    /// A CA key written (mode 0600) in `dir`, and the table using it.
    fn setup(dir: &Path) -> (PrivateKey, IssuerConfig) {
        let ca = key();
        let path = dir.join("user_ca");
        let text = ca.to_openssh(russh::keys::ssh_key::LineEnding::LF).unwrap();
        std::fs::write(&path, text.as_bytes()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let config = IssuerConfig {
            ca_key: path,
            validity: Duration::from_secs(3600),
            principals: vec!["nodetunnel".into(), "tunnel".into()],
            source_address: vec!["10.0.0.0/8".into(), "192.168.1.7".into()],
            test_only_short_validity: false,
        };
        (ca, config)
    }

    const NOW: u64 = 1_800_000_000;

    fn at(unix: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(unix)
    }

    #[test]
    fn an_issued_certificate_says_exactly_what_is_configured() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, config) = setup(dir.path());
        let subject = key();
        let issued = issue(&config, subject.public_key(), at(NOW)).unwrap();
        let c = &issued.certificate;
        c.verify_signature().unwrap();
        assert_eq!(c.cert_type(), CertType::User);
        assert_eq!(c.public_key(), subject.public_key().key_data());
        assert_eq!(c.signature_key(), ca.public_key().key_data());
        assert_eq!(c.valid_principals(), ["nodetunnel", "tunnel"]);
        let extensions: Vec<(&String, &String)> = c.extensions().iter().collect();
        assert_eq!(extensions.len(), 1, "{extensions:?}");
        assert_eq!(extensions[0].0, "permit-port-forwarding");
        assert_eq!(extensions[0].1, "");
        let options: Vec<(&String, &String)> = c.critical_options().iter().collect();
        assert_eq!(options.len(), 1, "{options:?}");
        assert_eq!(options[0].0, "source-address");
        assert_eq!(options[0].1, "10.0.0.0/8,192.168.1.7/32");
        assert_eq!(c.valid_after(), NOW - 60);
        assert_eq!(c.valid_before(), NOW + 3600);
        assert!(c.key_id().starts_with("nodetunnel@"), "{}", c.key_id());
    }

    #[test]
    fn without_source_address_there_is_no_critical_option() {
        let dir = tempfile::tempdir().unwrap();
        let (_, mut config) = setup(dir.path());
        config.source_address.clear();
        let issued = issue(&config, key().public_key(), at(NOW)).unwrap();
        assert!(issued.certificate.critical_options().is_empty());
    }

    #[test]
    fn serials_increase_even_within_one_millisecond() {
        let dir = tempfile::tempdir().unwrap();
        let (_, config) = setup(dir.path());
        let subject = key();
        let serials: Vec<u64> = (0..5)
            .map(|_| {
                issue(&config, subject.public_key(), at(NOW))
                    .unwrap()
                    .serial()
            })
            .collect();
        for pair in serials.windows(2) {
            assert!(pair[1] > pair[0], "{serials:?}");
        }
        // Unix milliseconds (or just above, when ahead of the clock).
        assert!(serials[0] >= NOW * 1000, "{serials:?}");
        let later = next_serial(at(NOW + 10));
        assert!(later > serials[4], "{later} after {serials:?}");
    }

    #[test]
    fn a_ca_key_others_can_read_is_refused_naming_the_file_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let (_, config) = setup(dir.path());
        std::fs::set_permissions(&config.ca_key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = issue(&config, key().public_key(), at(NOW)).unwrap_err();
        assert_eq!(e.reason(), "ca_key");
        let text = e.to_string();
        assert!(
            text.starts_with("CA key ")
                && text.contains(&config.ca_key.display().to_string())
                && text.contains("0644"),
            "{text}"
        );
    }

    #[test]
    fn a_missing_or_garbage_ca_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_, mut config) = setup(dir.path());
        std::fs::write(&config.ca_key, "not a key").unwrap();
        let e = issue(&config, key().public_key(), at(NOW)).unwrap_err();
        assert!(e.to_string().contains("not a usable private key"), "{e}");
        config.ca_key = dir.path().join("missing");
        let e = issue(&config, key().public_key(), at(NOW)).unwrap_err();
        assert!(e.to_string().contains("cannot read"), "{e}");
    }

    #[test]
    fn the_ca_key_is_read_at_each_issuance() {
        let dir = tempfile::tempdir().unwrap();
        let (first_ca, config) = setup(dir.path());
        let subject = key();
        let one = issue(&config, subject.public_key(), at(NOW)).unwrap();
        // Rotated in place.
        let (second_ca, _) = setup(dir.path());
        let two = issue(&config, subject.public_key(), at(NOW)).unwrap();
        assert_eq!(
            one.certificate.signature_key(),
            first_ca.public_key().key_data()
        );
        assert_eq!(
            two.certificate.signature_key(),
            second_ca.public_key().key_data()
        );
    }

    #[test]
    fn the_table_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let (_, good) = setup(dir.path());
        validate(&good).unwrap();
        let refused = |change: &dyn Fn(&mut IssuerConfig)| {
            let mut c = good.clone();
            change(&mut c);
            validate(&c).unwrap_err().to_string()
        };
        let e = refused(&|c| c.validity = Duration::from_secs(59));
        assert!(e.starts_with("validity: must be at least 1m"), "{e}");
        let e = refused(&|c| c.validity = Duration::from_secs(31 * 24 * 3600));
        assert!(e.starts_with("validity: must be at most"), "{e}");
        let e = refused(&|c| c.principals.clear());
        assert!(e.starts_with("principals: must list at least one"), "{e}");
        let e = refused(&|c| c.principals.push(String::new()));
        assert!(e.starts_with("principals[2]: "), "{e}");
        let e = refused(&|c| c.source_address.push("10.0.0.0/33".into()));
        assert!(e.starts_with("source_address[2]: \"10.0.0.0/33\""), "{e}");
        // The test floor: 1 second, only when asked for by name.
        let mut short = good.clone();
        short.validity = Duration::from_secs(3);
        assert!(validate(&short).is_err());
        short.test_only_short_validity = true;
        validate(&short).unwrap();
    }

    #[test]
    fn renewal_is_at_two_thirds_of_the_life() {
        let start = Instant::now();
        assert_eq!(
            renew_at(start, Duration::from_secs(3600)),
            start + Duration::from_secs(2400)
        );
    }
}
