//! A small HTTP/1.1 client for the admin API (over TCP or a Unix socket)
//! and for one-off requests over an already connected stream (the kubelet
//! check of `nodetunnel check`). hyper's client connection, no pooling:
//! one connection per request.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};

use crate::admin::api::ApiError;
use crate::admin::guard::REQUEST_HEADER;

/// The default admin API address (the `[admin] listen` default).
pub const DEFAULT_ADMIN_URL: &str = "http://127.0.0.1:8133";

/// Largest response body read.
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

/// Why a request to the admin API failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// `--admin` is not an `http://host:port` URL.
    #[error("--admin {url:?}: {reason}")]
    Url {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The connection could not be made.
    #[error("cannot connect to the admin API at {endpoint}: {error} (is `nodetunnel serve` running with [admin] enabled?)")]
    Connect {
        /// Where.
        endpoint: String,
        /// The system error.
        error: std::io::Error,
    },
    /// HTTP failed (connection closed, malformed answer).
    #[error("admin API at {endpoint}: {error}")]
    Http {
        /// Where.
        endpoint: String,
        /// What happened.
        #[source]
        error: ExchangeError,
    },
    /// No answer in time.
    #[error("admin API at {endpoint} did not answer within {}", humantime::format_duration(*.after))]
    Timeout {
        /// Where.
        endpoint: String,
        /// The bound.
        after: Duration,
    },
    /// The API answered with an error status.
    #[error("admin API answered {status}: {message}")]
    Status {
        /// The status.
        status: StatusCode,
        /// The error message from the body.
        message: String,
    },
    /// The answer is not the expected JSON document.
    #[error("admin API answer is not the expected JSON: {0}")]
    Decode(String),
}

#[derive(Clone, Debug)]
enum Endpoint {
    Tcp { authority: String, base: String },
    Unix(PathBuf),
}

/// Where the admin API is and how long to wait for it.
#[derive(Clone, Debug)]
pub struct AdminClient {
    endpoint: Endpoint,
    timeout: Duration,
}

impl AdminClient {
    /// A client for `--admin URL` (`http://host:port[/prefix]`, or just
    /// `host:port`), or for the Unix socket `uds` when given.
    pub fn new(url: &str, uds: Option<&Path>, timeout: Duration) -> Result<Self, ClientError> {
        if let Some(path) = uds {
            return Ok(AdminClient {
                endpoint: Endpoint::Unix(path.to_path_buf()),
                timeout,
            });
        }
        let url_error = |reason: &str| ClientError::Url {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let with_scheme = if url.contains("://") {
            url.to_string()
        } else {
            format!("http://{url}")
        };
        let uri: Uri = with_scheme
            .parse()
            .map_err(|_| url_error("not a URL like http://127.0.0.1:8133"))?;
        if uri.scheme_str() != Some("http") {
            return Err(url_error(
                "only http:// is supported (the admin API has no TLS; use a loopback address \
                 or --admin-uds)",
            ));
        }
        let authority = uri.authority().ok_or_else(|| url_error("no host:port"))?;
        let host_port = if authority.port().is_some() {
            authority.as_str().to_string()
        } else {
            format!("{}:80", authority.host())
        };
        Ok(AdminClient {
            endpoint: Endpoint::Tcp {
                authority: host_port,
                base: uri.path().trim_end_matches('/').to_string(),
            },
            timeout,
        })
    }

    /// Where requests go, for messages.
    pub fn describe(&self) -> String {
        match &self.endpoint {
            Endpoint::Tcp { authority, base } => format!("http://{authority}{base}"),
            Endpoint::Unix(path) => format!("unix:{}", path.display()),
        }
    }

    /// Send one request; the status and body of the answer, whatever the
    /// status.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let endpoint = self.describe();
        let exchange = async {
            match &self.endpoint {
                Endpoint::Tcp { authority, base } => {
                    let io = TcpStream::connect(authority.as_str())
                        .await
                        .map_err(|error| ClientError::Connect {
                            endpoint: endpoint.clone(),
                            error,
                        })?;
                    let _ = io.set_nodelay(true);
                    let path = format!("{base}{path}");
                    exchange_with_headers(io, method, &path, authority, ADMIN_HEADERS)
                        .await
                        .map_err(|error| ClientError::Http {
                            endpoint: endpoint.clone(),
                            error,
                        })
                }
                Endpoint::Unix(socket) => {
                    let io = UnixStream::connect(socket).await.map_err(|error| {
                        ClientError::Connect {
                            endpoint: endpoint.clone(),
                            error,
                        }
                    })?;
                    exchange_with_headers(io, method, path, "localhost", ADMIN_HEADERS)
                        .await
                        .map_err(|error| ClientError::Http {
                            endpoint: endpoint.clone(),
                            error,
                        })
                }
            }
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(ClientError::Timeout {
                endpoint,
                after: self.timeout,
            }),
        }
    }

    /// GET `path` and decode a JSON answer; an error status becomes
    /// [`ClientError::Status`] with the API's message.
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.json(Method::GET, path).await
    }

    /// Like [`get_json`](Self::get_json) with any method.
    pub async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
    ) -> Result<T, ClientError> {
        let (status, body) = self.request(method, path).await?;
        if !status.is_success() {
            let message = serde_json::from_slice::<ApiError>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).trim().to_string());
            return Err(ClientError::Status { status, message });
        }
        serde_json::from_slice(&body).map_err(|e| ClientError::Decode(e.to_string()))
    }
}

/// Why one HTTP/1.1 [`exchange`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// The HTTP/1.1 connection could not be set up.
    #[error("HTTP handshake failed: {0}")]
    Handshake(#[source] hyper::Error),
    /// The request could not be built (a header name or value that HTTP
    /// does not allow).
    #[error("cannot build the request: {0}")]
    Build(#[source] hyper::http::Error),
    /// Sending the request or reading the answer's head failed.
    #[error("request failed: {0}")]
    Send(#[source] hyper::Error),
    /// Reading the body failed, or it was larger than 64 MiB.
    #[error("reading the answer failed: {0}")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Headers of every admin API request: the API refuses a `POST` without
/// [`REQUEST_HEADER`] (a browser cannot send it cross-site).
const ADMIN_HEADERS: &[(&str, &str)] = &[(REQUEST_HEADER, "1")];

/// One HTTP/1.1 request over `io` (already connected, TLS or not); the
/// answer's status and body (at most 64 MiB). The caller bounds the time.
pub async fn exchange<I>(
    io: I,
    method: Method,
    path: &str,
    host: &str,
) -> Result<(StatusCode, Bytes), ExchangeError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    exchange_with_headers(io, method, path, host, &[]).await
}

/// [`exchange`] with extra request headers.
pub async fn exchange_with_headers<I>(
    io: I,
    method: Method,
    path: &str,
    host: &str,
    headers: &[(&str, &str)],
) -> Result<(StatusCode, Bytes), ExchangeError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(ExchangeError::Handshake)?;
    let driver = tokio::spawn(conn);
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, host)
        .header(
            header::USER_AGENT,
            concat!("nodetunnel/", env!("CARGO_PKG_VERSION")),
        );
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .map_err(ExchangeError::Build)?;
    let result = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(ExchangeError::Send)?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
            .map_err(ExchangeError::Body)?
            .to_bytes();
        Ok((status, body))
    }
    .await;
    driver.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn describe(url: &str) -> String {
        AdminClient::new(url, None, Duration::from_secs(1))
            .map(|c| c.describe())
            .unwrap_or_else(|e| e.to_string())
    }

    #[test]
    fn admin_urls() {
        assert_eq!(describe("http://127.0.0.1:8133"), "http://127.0.0.1:8133");
        assert_eq!(describe("127.0.0.1:9000/"), "http://127.0.0.1:9000");
        assert_eq!(describe("http://[::1]:8133/nt"), "http://[::1]:8133/nt");
        assert_eq!(describe("http://localhost"), "http://localhost:80");
        assert!(describe("https://127.0.0.1:8133").contains("only http://"));
        let uds = AdminClient::new("ignored", Some(Path::new("/run/a.sock")), Duration::ZERO);
        assert_eq!(uds.unwrap().describe(), "unix:/run/a.sock");
    }
}
