//! Step 8: `GET /healthz` over TLS through the channel, and the TLS client
//! it uses: the kubelet's certificate unverified (as kube-apiserver without
//! `--kubelet-certificate-authority`) or verified against `--kubelet-ca`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use http::Method;
use russh::client;
use russh::Channel;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio_rustls::TlsConnector;

use super::super::format;
use super::{human, Checker, Failure, Target};

/// Why the kubelet TLS client cannot be built. The text names the file.
#[derive(Debug, thiserror::Error)]
pub enum KubeletTlsError {
    /// rustls refused the protocol versions (a build without TLS 1.2/1.3).
    #[error("TLS setup: {0}")]
    Setup(rustls::Error),
    /// The `--kubelet-ca` file cannot be read.
    #[error("--kubelet-ca {}: {source}", path.display())]
    Read {
        /// The bundle.
        path: PathBuf,
        /// The read error.
        source: std::io::Error,
    },
    /// The bundle is not valid PEM.
    #[error("--kubelet-ca {}: invalid PEM: {source}", path.display())]
    Pem {
        /// The bundle.
        path: PathBuf,
        /// The parse error.
        source: std::io::Error,
    },
    /// A certificate of the bundle cannot be a trust anchor.
    #[error("--kubelet-ca {}: unusable CA certificate: {source}", path.display())]
    Unusable {
        /// The bundle.
        path: PathBuf,
        /// Why.
        source: rustls::Error,
    },
    /// The bundle has no `CERTIFICATE` block.
    #[error("--kubelet-ca {}: no CERTIFICATE found", path.display())]
    Empty {
        /// The bundle.
        path: PathBuf,
    },
}

/// The TLS client of step 8: verifying the kubelet's certificate against
/// the `kubelet_ca` bundle (PEM) if given, else accepting any certificate.
pub(super) fn connector(kubelet_ca: Option<&Path>) -> Result<TlsConnector, KubeletTlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(KubeletTlsError::Setup)?;
    let tls = match kubelet_ca {
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Unverified(provider)))
            .with_no_client_auth(),
        Some(path) => builder
            .with_root_certificates(load_ca_bundle(path)?)
            .with_no_client_auth(),
    };
    Ok(TlsConnector::from(Arc::new(tls)))
}

impl Checker {
    /// Step 8: `GET /healthz` over TLS through the channel.
    pub(super) async fn kubelet_healthz(
        &self,
        channel: Channel<client::Msg>,
        target: &Target,
    ) -> Result<((), String), Failure> {
        let kubelet = self.kubelet(target);
        let host = self.kubelet_host(target);
        let server_name = ServerName::try_from(host.to_owned())
            .map_err(|e| Failure::new(format!("{host:?} is not a TLS server name: {e}"), None))?;
        let probe = async {
            let tls = self
                .tls
                .connect(server_name, channel.into_stream())
                .await
                .map_err(|e| {
                    let certificate = e
                        .get_ref()
                        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                        .is_some_and(|tls| matches!(tls, rustls::Error::InvalidCertificate(_)));
                    let hint = match (&self.kubelet_ca, certificate) {
                        (Some(ca), true) => format!(
                            "the kubelet's certificate does not verify against {} for the name \
                             {host:?}: kube-apiserver with --kubelet-certificate-authority would \
                             refuse it too. Check that the bundle is the kubelet's CA and that \
                             {host:?} is the address the apiserver uses for this node (its \
                             certificate must name it; another one: --kubelet-host)",
                            ca.display(),
                        ),
                        _ => format!(
                            "{kubelet} does not speak TLS: is it the kubelet's port \
                             (--kubelet-port, default 10250)?"
                        ),
                    };
                    Failure::new(format!("TLS handshake failed: {e}"), hint)
                })?;
            let version = match tls.get_ref().1.protocol_version() {
                Some(rustls::ProtocolVersion::TLSv1_3) => "TLS 1.3",
                Some(rustls::ProtocolVersion::TLSv1_2) => "TLS 1.2",
                _ => "TLS",
            };
            let answer = super::super::client::exchange(tls, Method::GET, "/healthz", &kubelet)
                .await
                .map_err(|e| {
                    Failure::new(
                        e.to_string(),
                        "the kubelet closed the connection or answered something that is not HTTP",
                    )
                })?;
            Ok::<_, Failure>((version, answer))
        };
        let (version, (status, body)) =
            match tokio::time::timeout(self.channel_timeout, probe).await {
                Err(_) => {
                    return Err(Failure::new(
                        format!("no answer within {}", human(self.channel_timeout)),
                        format!(
                            "something accepts connections on {kubelet} but does not answer \
                             TLS/HTTP: is it the kubelet?"
                        ),
                    ))
                }
                Ok(result) => result?,
            };
        let text = String::from_utf8_lossy(&body);
        let excerpt = format::truncate(text.trim(), 60);
        let code = status.as_u16();
        let verified = match &self.kubelet_ca {
            None => "certificate not verified".to_string(),
            Some(ca) => format!("certificate verified against {}", ca.display()),
        };
        if status.is_success() {
            Ok((
                (),
                format!("HTTP {code} {excerpt:?} over {version} ({verified})"),
            ))
        } else if code == 401 || code == 403 {
            Ok((
                (),
                format!(
                    "HTTP {code} over {version}: the kubelet answers and wants the client \
                     certificate the apiserver presents ({verified})"
                ),
            ))
        } else {
            Err(Failure::new(
                format!("HTTP {code} {excerpt:?} over {version}"),
                "the kubelet is reachable but not healthy: see `journalctl -u kubelet` on the node",
            ))
        }
    }
}

/// Accepts any kubelet certificate (the signature over the handshake is
/// still verified), as kube-apiserver does without
/// `--kubelet-certificate-authority`.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

/// The certificates of a PEM bundle as trust anchors; errors name the file.
fn load_ca_bundle(path: &Path) -> Result<rustls::RootCertStore, KubeletTlsError> {
    let path_buf = || path.to_path_buf();
    let pem = std::fs::read(path).map_err(|source| KubeletTlsError::Read {
        path: path_buf(),
        source,
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.map_err(|source| KubeletTlsError::Pem {
            path: path_buf(),
            source,
        })?;
        roots
            .add(cert)
            .map_err(|source| KubeletTlsError::Unusable {
                path: path_buf(),
                source,
            })?;
    }
    if roots.is_empty() {
        return Err(KubeletTlsError::Empty { path: path_buf() });
    }
    Ok(roots)
}

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
