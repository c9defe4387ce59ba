//! mTLS material of the TCP listener: the server certificate chain and key,
//! and the CA that client certificates must chain to. Client certificates
//! are required; a client without one fails the handshake.

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

async fn load_key(file: &Path) -> Result<PrivateKeyDer<'static>, FrontDoorError> {
    let pem = read(file).await?;
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
