//! What a dev node serves behind its SSH session: a kubelet stand-in
//! (HTTPS), one pod and a share of one service (plain HTTP). They run inside
//! the process on the SSH channel itself; no socket exists for them, so they
//! are reachable only through the node's tunnel.

use super::DevError;
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncRead, AsyncWrite};

/// Which in-process service a direct-tcpip destination reaches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Service {
    /// The node's kubelet, HTTPS.
    Kubelet,
    /// A pod on the node, HTTP.
    Pod {
        /// The pod's name.
        name: String,
    },
    /// The cluster service, HTTP; every node serves it.
    ClusterService,
}

/// A kubelet's TLS identity: a fresh self-signed certificate (the
/// apiserver does not verify kubelet certificates by default, and neither
/// do the printed curl commands: `-k`).
pub fn kubelet_tls(node: &str, ip: &str) -> Result<Arc<rustls::ServerConfig>, DevError> {
    let cert = rcgen::generate_simple_self_signed(vec![node.to_string(), ip.to_string()])?;
    let der = CertificateDer::from(cert.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_pair.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![der], key)?;
    Ok(Arc::new(config))
}

/// Serve one connection of `service` on `stream` until the client is done.
pub async fn serve<S>(service: Service, node: Arc<str>, tls: Arc<rustls::ServerConfig>, stream: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let result = match service {
        Service::Kubelet => match tokio_rustls::TlsAcceptor::from(tls).accept(stream).await {
            Ok(tls_stream) => http(tls_stream, Service::Kubelet, node).await,
            Err(e) => Err(ServiceError::Handshake(e)),
        },
        other => http(stream, other, node).await,
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "dev service connection ended");
    }
}

/// Why a service connection ended early (logged at debug: the client's
/// business).
#[derive(Debug, thiserror::Error)]
enum ServiceError {
    #[error("kubelet TLS handshake: {0}")]
    Handshake(std::io::Error),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
}

async fn http<S>(stream: S, service: Service, node: Arc<str>) -> Result<(), ServiceError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let handler = hyper::service::service_fn(move |req: Request<Incoming>| {
        let response = answer(&service, &node, &req);
        async move { Ok::<_, Infallible>(response) }
    });
    hyper::server::conn::http1::Builder::new()
        .half_close(true)
        .serve_connection(TokioIo::new(stream), handler)
        .await
        .map_err(ServiceError::from)
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// The answer of `service` on `node` to `req`.
pub fn answer<B>(service: &Service, node: &str, req: &Request<B>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    match service {
        Service::Kubelet => {
            if path == "/healthz" {
                return text(StatusCode::OK, "ok".into());
            }
            if let Some(rest) = path.strip_prefix("/containerLogs/") {
                let parts: Vec<&str> = rest.split('/').collect();
                if let [ns, pod, container] = parts.as_slice() {
                    if !ns.is_empty() && !pod.is_empty() && !container.is_empty() {
                        let body = (1..=3)
                            .map(|i| {
                                format!("{ns}/{pod}/{container} log line {i} (kubelet of {node})\n")
                            })
                            .collect::<String>();
                        return text(StatusCode::OK, body);
                    }
                }
            }
            text(
                StatusCode::NOT_FOUND,
                format!("kubelet of {node}: no such path {path}; try /healthz or /containerLogs/NAMESPACE/POD/CONTAINER\n"),
            )
        }
        Service::Pod { name } => text(StatusCode::OK, format!("hello from pod {name} on {node}\n")),
        Service::ClusterService => text(
            StatusCode::OK,
            format!("service answered by a pod on {node}\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str) -> Request<()> {
        Request::builder().uri(path).body(()).unwrap()
    }

    #[test]
    fn the_kubelet_answers_healthz_and_container_logs() {
        let ok = answer(&Service::Kubelet, "node-1", &get("/healthz"));
        assert_eq!(ok.status(), StatusCode::OK);
        let logs = answer(
            &Service::Kubelet,
            "node-1",
            &get("/containerLogs/default/web/nginx"),
        );
        assert_eq!(logs.status(), StatusCode::OK);
        let missing = answer(&Service::Kubelet, "node-1", &get("/containerLogs/x"));
        assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn a_kubelet_certificate_can_be_made() {
        kubelet_tls("node-1", "10.240.0.11").unwrap();
    }
}
