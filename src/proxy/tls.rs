//! mTLS material of the TCP listener: the server certificate chain and key,
//! and the CA that client certificates must chain to. Client certificates
//! are required; a client without one fails the handshake. The key file is
//! refused when other users can read or replace it (see
//! [`crate::keys::check_secret_file`]).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

use super::{FrontDoorError, TlsConfig};

fn tls_error(file: &Path, reason: impl std::fmt::Display) -> FrontDoorError {
    FrontDoorError::Tls {
        file: file.to_path_buf(),
        reason: reason.to_string(),
    }
}

async fn read(file: &Path) -> Result<Vec<u8>, FrontDoorError> {
    tokio::fs::read(file)
        .await
        .map_err(|e| tls_error(file, format!("cannot read: {e}")))
}

async fn load_certs(file: &Path) -> Result<Vec<CertificateDer<'static>>, FrontDoorError> {
    let pem = read(file).await?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_error(file, format!("invalid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(tls_error(file, "no CERTIFICATE found"));
    }
    Ok(certs)
}

/// The key is read as [`crate::keys::read_secret_file`] reads the SSH key:
/// mode and owner checked on the opened file, refused when others can read
/// or replace it.
async fn load_key(file: &Path) -> Result<PrivateKeyDer<'static>, FrontDoorError> {
    let path = file.to_path_buf();
    let pem = tokio::task::spawn_blocking(move || crate::keys::read_secret_file(&path))
        .await
        .map_err(|e| tls_error(file, format!("cannot read: {e}")))?
        .map_err(|e| match e {
            crate::keys::KeyError::Permissions { problem, .. } => tls_error(file, problem),
            crate::keys::KeyError::Read { source, .. } => {
                tls_error(file, format!("cannot read: {source}"))
            }
            other => tls_error(file, other),
        })?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| tls_error(file, format!("invalid PEM: {e}")))?
        .ok_or_else(|| tls_error(file, "no PKCS#8, PKCS#1 or SEC1 private key found"))
}

/// Build the acceptor of the TCP listener from `config`.
pub(crate) async fn acceptor(config: &TlsConfig) -> Result<TlsAcceptor, FrontDoorError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = load_certs(&config.cert).await?;
    let key = load_key(&config.key).await?;
    let mut roots = RootCertStore::empty();
    for ca in load_certs(&config.client_ca).await? {
        roots
            .add(ca)
            .map_err(|e| tls_error(&config.client_ca, format!("unusable CA certificate: {e}")))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| tls_error(&config.client_ca, e))?;
    let server = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error(&config.cert, e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| tls_error(&config.key, format!("does not fit the certificate: {e}")))?;
    Ok(TlsAcceptor::from(Arc::new(server)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn a_world_readable_tls_key_is_refused_naming_the_file_and_the_mode() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let path = dir.path().join("server.key");
        std::fs::write(&path, key.serialize_pem()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_key(&path).await.unwrap_err().to_string();
        assert!(
            e.contains(&path.display().to_string()) && e.contains("mode 0644"),
            "{e}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        load_key(&path).await.unwrap();
    }
}
