//! Small clients for tests: a minimal HTTP/1.1 GET over any stream (plain,
//! TLS, or a tunnel), with chunked decoding, a TLS connector that trusts
//! one certificate, and `/metrics` read from a `serve` process's admin
//! Unix socket.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

#[derive(Clone, Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    /// The decoded body.
    pub body: Vec<u8>,
    /// Whether the body came chunked.
    pub chunked: bool,
    /// The data chunks as they were framed (chunked bodies only).
    pub chunks: Vec<Vec<u8>>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `GET path` with `Connection: close` over `stream`, reading the whole
/// response (Content-Length, chunked, or until EOF).
pub async fn http_get<S>(stream: &mut S, host: &str, path: &str) -> Result<HttpResponse>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    http_get_with(stream, host, path, &[]).await
}

/// [`http_get`] with extra request headers (`(name, value)`).
pub async fn http_get_with<S>(
    stream: &mut S,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<HttpResponse>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let extra: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: nodetunnel-tests\r\n{extra}Connection: close\r\n\r\n"
    );
    stream
        .write_all(req.as_bytes())
        .await
        .context("sending HTTP request")?;
    stream.flush().await?;
    let mut buf = Vec::new();
    let mut eof = false;
    loop {
        if let Some(resp) = parse_response(&buf, eof)? {
            return Ok(resp);
        }
        if eof {
            bail!(
                "connection closed before a complete HTTP response; got {:?}",
                String::from_utf8_lossy(&buf)
            );
        }
        let mut chunk = [0u8; 16 * 1024];
        match stream.read(&mut chunk).await {
            Ok(0) => eof = true,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            // A TLS peer that closes without close_notify: treat as EOF.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => eof = true,
            Err(e) => return Err(e).context("reading HTTP response"),
        }
    }
}

/// Parse a complete response from `buf`, or None if more bytes are needed.
fn parse_response(buf: &[u8], eof: bool) -> Result<Option<HttpResponse>> {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_end]).context("response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        bail!("bad status line {status_line:?}");
    };
    if !version.starts_with("HTTP/1.") {
        bail!("bad status line {status_line:?}");
    }
    let status: u16 = code
        .parse()
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let mut headers = Vec::new();
    for l in lines {
        let (k, v) = l
            .split_once(':')
            .with_context(|| format!("bad header line {l:?}"))?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
    }
    let rest = &buf[head_end + 4..];
    let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let chunked = get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    let mut resp = HttpResponse {
        status,
        headers: headers.clone(),
        body: Vec::new(),
        chunked,
        chunks: Vec::new(),
    };
    if chunked {
        let mut pos = 0;
        loop {
            let Some(le) = find(&rest[pos..], b"\r\n") else {
                return Ok(None);
            };
            let size_str = std::str::from_utf8(&rest[pos..pos + le])?;
            let size_str = size_str.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_str, 16)
                .with_context(|| format!("bad chunk size {size_str:?}"))?;
            pos += le + 2;
            if size == 0 {
                // Trailers (none expected) end with an empty line.
                return Ok(find(&rest[pos..], b"\r\n").map(|_| resp));
            }
            if rest.len() < pos + size + 2 {
                return Ok(None);
            }
            resp.body.extend_from_slice(&rest[pos..pos + size]);
            resp.chunks.push(rest[pos..pos + size].to_vec());
            pos += size + 2;
        }
    } else if let Some(cl) = get("content-length") {
        let cl: usize = cl
            .parse()
            .with_context(|| format!("bad content-length {cl:?}"))?;
        if rest.len() < cl {
            return Ok(None);
        }
        resp.body = rest[..cl].to_vec();
        Ok(Some(resp))
    } else if eof {
        resp.body = rest.to_vec();
        Ok(Some(resp))
    } else {
        Ok(None)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A TLS connector (ring provider) that trusts exactly `cert` (e.g. a
/// kubelet stand-in's self-signed certificate).
pub fn tls_connector(cert: &CertificateDer<'static>) -> Result<tokio_rustls::TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).context("adding trust anchor")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
}

/// TLS handshake over `stream` to a server identified by IP address.
pub async fn tls_connect_ip<S>(
    connector: &tokio_rustls::TlsConnector,
    ip: IpAddr,
    stream: S,
) -> Result<tokio_rustls::client::TlsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    connector
        .connect(ServerName::IpAddress(ip.into()), stream)
        .await
        .with_context(|| format!("TLS handshake with {ip}"))
}

/// Bound on one `/metrics` read from an admin socket.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

/// `GET /metrics` on a `serve` process's admin Unix socket (`[admin] uds`):
/// the exposition text; an error if it is not a 200 within
/// [`ADMIN_TIMEOUT`].
pub async fn admin_metrics(socket: &Path) -> Result<String> {
    let get = async {
        let mut s = tokio::net::UnixStream::connect(socket)
            .await
            .with_context(|| format!("connecting to {}", socket.display()))?;
        http_get(&mut s, "localhost", "/metrics").await
    };
    let r = tokio::time::timeout(ADMIN_TIMEOUT, get)
        .await
        .with_context(|| format!("GET /metrics on {}: no answer", socket.display()))??;
    if r.status != 200 {
        bail!("GET /metrics on {}: status {}", socket.display(), r.status);
    }
    Ok(r.text())
}

/// The value of `series` (its name and labels exactly as exported, e.g.
/// `nodetunnel_proxy_requests_total{listener="grpc",code="dial_ok"}`) in a
/// `/metrics` text; `None` if it is not there.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}
