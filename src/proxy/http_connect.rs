//! HTTP `CONNECT`, as kube-apiserver's `HTTPConnect` egress speaks it.
//!
//! The apiserver opens a fresh connection per dial, writes
//! `CONNECT <host:port> HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n`, and requires
//! status 200 with nothing buffered after the response head. hyper serves
//! each connection (one request, headers bounded to
//! [`MAX_HEADER_BYTES`] and `header_read_timeout`); the answer is
//! `HTTP/1.1 200 Connection Established` with no other header, sent only
//! once the dial succeeded, after which the upgraded connection is spliced
//! with the tunnel (`relay`: a tunnel that is cut resets a TCP client).
//!
//! Answers: 405 (with `Allow: CONNECT`) to other methods, 400 to targets
//! that are not `host:port` ([`parse_connect_target`]), the dial error's
//! status ([`DialError::http_status`](crate::dial::DialError::http_status)) with its message as a one-line
//! `text/plain` body, 431 (by hyper) for oversized headers, and 503 "too
//! many connections" beyond `max_connections`.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::ext::ReasonPhrase;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use super::audit_trail::{Asker, OpenTunnel};
use super::relay::{relay, ClientIo};
use super::{conn_span, Context, HostError, ListenerKind};
use crate::dial::{Destination, Dialer, Host};

/// Largest request head accepted (hyper's read buffer); beyond it hyper
/// answers 431.
pub const MAX_HEADER_BYTES: usize = 8192;

/// Why a `CONNECT` request-target is not a usable `host:port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// Not in authority form (`host:port`): a path, a scheme, or nothing.
    #[error("target is not in authority form host:port")]
    NotAuthorityForm,
    /// No `:port`.
    #[error("target has no port")]
    MissingPort,
    /// The port is not a number in 1..=65535.
    #[error("target port is not a number in 1..=65535")]
    InvalidPort,
    /// An IPv6 address without brackets.
    #[error("IPv6 addresses must be in brackets: [addr]:port")]
    UnbracketedIpv6,
    /// Brackets around something that is not an IPv6 address.
    #[error("invalid IPv6 address in brackets")]
    InvalidIpv6,
    /// The host part is refused.
    #[error(transparent)]
    Host(#[from] HostError),
}

/// Parse a `CONNECT` request-target in authority form: `host:port` or
/// `[ipv6]:port`, port 1..=65535. Names come back in lower case, IP
/// literals in canonical form (IPv4-mapped IPv6 as IPv4), IPv6 without
/// brackets. No user info, no
/// zone ids.
pub fn parse_connect_target(target: &str) -> Result<Destination, TargetError> {
    if target.is_empty() {
        return Err(TargetError::NotAuthorityForm);
    }
    let (host, port) = if let Some(rest) = target.strip_prefix('[') {
        let (inside, after) = rest.split_once(']').ok_or(TargetError::InvalidIpv6)?;
        let ip: Ipv6Addr = inside.parse().map_err(|_| TargetError::InvalidIpv6)?;
        let port = match after.strip_prefix(':') {
            Some(port) => port,
            None if after.is_empty() => return Err(TargetError::MissingPort),
            None => return Err(TargetError::NotAuthorityForm),
        };
        (Host::from(IpAddr::V6(ip)), port)
    } else {
        let Some((host, port)) = target.rsplit_once(':') else {
            return Err(TargetError::MissingPort);
        };
        if host.contains(':') {
            return Err(TargetError::UnbracketedIpv6);
        }
        (Host::parse(host)?, port)
    };
    Ok(Destination {
        host,
        port: parse_port(port)?,
    })
}

fn parse_port(port: &str) -> Result<u16, TargetError> {
    if port.is_empty() {
        return Err(TargetError::MissingPort);
    }
    if port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TargetError::InvalidPort);
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err(TargetError::InvalidPort),
        Ok(port) => Ok(port),
    }
}

/// The destination of a `CONNECT` request's URI, which hyper parsed from the
/// request-target.
fn connect_destination(uri: &Uri) -> Result<Destination, TargetError> {
    match (uri.scheme(), uri.authority(), uri.path_and_query()) {
        (None, Some(authority), None) => parse_connect_target(authority.as_str()),
        _ => Err(TargetError::NotAuthorityForm),
    }
}

/// A dial that succeeded; the connection task splices it once hyper handed
/// over the upgraded connection.
struct Established<S> {
    on_upgrade: OnUpgrade,
    tunnel: S,
    audit: OpenTunnel,
}

type Slot<S> = Arc<Mutex<Option<Established<S>>>>;

/// The hyper server settings of every connection. Keep-alive stays on so
/// the 200 carries no `Connection: close` (a tunnel follows it); every other
/// answer sets `Connection: close` itself, so one request is served per
/// connection either way.
fn builder(header_read_timeout: std::time::Duration) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        // A client may send CONNECT and shut down its write side at once
        // (socat, some tools): still answer, and forward the EOF.
        .half_close(true)
        .auto_date_header(false);
    builder
}

/// Serve one HTTP connection: one request, then (on success) the tunnel.
/// `admitted` false means over the connection limit: answer 503.
pub(crate) async fn serve<I, D>(
    io: I,
    ctx: &Arc<Context<D>>,
    listener: ListenerKind,
    admitted: bool,
    asker: Asker,
) where
    I: ClientIo,
    D: Dialer,
{
    let builder = builder(ctx.header_read_timeout);
    if !admitted {
        return serve_overflow(&builder, io, ctx, listener, asker).await;
    }
    let slot: Slot<D::Stream> = Arc::new(Mutex::new(None));
    let service = {
        let ctx = ctx.clone();
        let slot = slot.clone();
        service_fn(move |req| {
            let ctx = ctx.clone();
            let slot = slot.clone();
            let asker = asker.clone();
            async move { Ok::<_, Infallible>(answer(req, &ctx, &asker, &slot).await) }
        })
    };
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let served = tokio::select! {
        served = conn.as_mut() => served,
        () = ctx.shutdown.wait() => {
            // Closes an idle connection; lets a request in flight finish.
            conn.as_mut().graceful_shutdown();
            conn.as_mut().await
        }
    };
    if let Err(error) = served {
        log_connection_error(ctx, listener, &error);
    }
    let established = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
    let Some(Established {
        on_upgrade,
        tunnel,
        mut audit,
    }) = established
    else {
        return;
    };
    // The connection future resolved, so the upgrade is ready or failed:
    // the bound only guards against surprises.
    let upgraded = match tokio::time::timeout(ctx.header_read_timeout, on_upgrade).await {
        Ok(Ok(upgraded)) => upgraded,
        Ok(Err(error)) => {
            tracing::debug!(error = %error, "connection not upgraded after 200");
            audit.ended(crate::audit::End::ClientError, None);
            return;
        }
        Err(_) => {
            tracing::debug!("upgrade did not complete");
            audit.ended(crate::audit::End::ClientError, None);
            return;
        }
    };
    // Back to the socket hyper was given (and the bytes it read past the
    // request head), so that a cut tunnel can reset it.
    match upgraded.downcast::<TokioIo<I>>() {
        Ok(parts) => {
            let early = parts.read_buf;
            let io = parts.io.into_inner();
            relay(io, tunnel, &early, ctx.header_read_timeout, audit).await;
        }
        Err(upgraded) => {
            tracing::warn!(
                "upgraded connection is not the socket it was served on: a cut tunnel will not reset it"
            );
            let io = TokioIo::new(upgraded);
            relay(io, tunnel, &[], ctx.header_read_timeout, audit).await;
        }
    }
}

fn log_connection_error<D: Dialer>(ctx: &Context<D>, listener: ListenerKind, error: &hyper::Error) {
    if error.is_parse_too_large() {
        ctx.metrics.proxy_request(listener.as_str(), "431");
        ctx.log_refusal("431", || {
            tracing::info!("request head too large: 431");
        });
    } else if error.is_timeout() {
        tracing::debug!("request head read timed out");
    } else {
        tracing::debug!(error = %error, "HTTP connection error");
    }
}

/// Answer one request. On a successful dial, leaves the tunnel in `slot`
/// and answers 200.
async fn answer<D: Dialer>(
    mut req: Request<Incoming>,
    ctx: &Context<D>,
    asker: &Asker,
    slot: &Slot<D::Stream>,
) -> Response<Full<Bytes>> {
    let started = std::time::Instant::now();
    let listener = asker.listener;
    let label = listener.as_str();
    if req.method() != Method::CONNECT {
        asker.refusal(&ctx.audit, None, "method_not_allowed", started);
        ctx.metrics.proxy_request(label, "405");
        ctx.log_refusal("405", || {
            tracing::info!(method = %req.method(), "not CONNECT: 405");
        });
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "only CONNECT is supported");
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("CONNECT"));
        return response;
    }
    // A CONNECT request has no body (RFC 9110 9.3.6); one that announces
    // one is refused rather than having its "body" read as tunnel bytes or
    // silently eaten.
    if let Some(name) = [header::CONTENT_LENGTH, header::TRANSFER_ENCODING]
        .into_iter()
        .find(|name| req.headers().contains_key(name))
    {
        asker.refusal(&ctx.audit, None, "bad_request", started);
        ctx.metrics.proxy_request(label, "400");
        ctx.log_refusal("400", || {
            tracing::info!(header = %name, "CONNECT with a request body: 400");
        });
        return text(
            StatusCode::BAD_REQUEST,
            &format!("a CONNECT request has no body; {name} is not accepted"),
        );
    }
    let dest = match connect_destination(req.uri()) {
        Ok(dest) => dest,
        Err(error) => {
            asker.refusal(&ctx.audit, None, "bad_request", started);
            ctx.metrics.proxy_request(label, "400");
            ctx.log_refusal("400", || {
                tracing::info!(dest = ?req.uri().to_string(),
                    error = %error, "malformed CONNECT target: 400");
            });
            return text(StatusCode::BAD_REQUEST, &error.to_string());
        }
    };
    conn_span::record_dest(&dest);
    match ctx.dial(&dest).await {
        Ok(tunnel) => {
            conn_span::record_tunnel(&tunnel);
            let audit = asker.open_tunnel(&ctx.audit, &dest, &tunnel);
            let on_upgrade = hyper::upgrade::on(&mut req);
            *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(Established {
                on_upgrade,
                tunnel,
                audit,
            });
            ctx.metrics.proxy_request(label, "200");
            tracing::debug!("tunnel open");
            let mut response = Response::new(Full::new(Bytes::new()));
            response
                .extensions_mut()
                .insert(ReasonPhrase::from_static(b"Connection Established"));
            response
        }
        Err(error) => {
            asker.dial_refusal(&ctx.audit, &dest, &error, started);
            let status =
                StatusCode::from_u16(error.http_status()).unwrap_or(StatusCode::BAD_GATEWAY);
            ctx.count_refusal(listener, status.as_str());
            conn_span::record_refusal(&error);
            ctx.log_refusal(error.reason(), || {
                tracing::info!(error = %error, status = status.as_u16(), "CONNECT refused");
            });
            text(status, &error.to_string())
        }
    }
}

/// `message` as one line of text: control characters (line breaks
/// included) become spaces, and a final `\n` is added.
pub(crate) fn one_line(message: &str) -> String {
    let mut line: String = message
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    line.push('\n');
    line
}

/// A `text/plain` response whose body is `message` on one line; the
/// connection closes after it.
fn text(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(one_line(message))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Answer whatever request arrives with 503 "too many connections".
async fn serve_overflow<I, D>(
    builder: &http1::Builder,
    io: I,
    ctx: &Context<D>,
    listener: ListenerKind,
    asker: Asker,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    D: Dialer,
{
    let metrics = ctx.metrics.clone();
    let audit = ctx.audit.clone();
    let service = service_fn(move |_req: Request<Incoming>| {
        let started = std::time::Instant::now();
        asker.refusal(&audit, None, "max_connections", started);
        metrics.proxy_request(listener.as_str(), "503");
        tracing::warn!("max_connections reached: 503");
        async {
            Ok::<_, Infallible>(text(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many connections",
            ))
        }
    });
    if let Err(error) = builder.serve_connection(TokioIo::new(io), service).await {
        log_connection_error(ctx, listener, &error);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest(host: &str, port: u16) -> Destination {
        Destination {
            host: host.parse().expect("test host"),
            port,
        }
    }

    #[test]
    fn parses_names_ipv4_and_bracketed_ipv6() {
        assert_eq!(
            parse_connect_target("10.0.0.1:10250"),
            Ok(dest("10.0.0.1", 10250))
        );
        assert_eq!(
            parse_connect_target("Node-1.Example.com:443"),
            Ok(dest("node-1.example.com", 443))
        );
        assert_eq!(parse_connect_target("[::1]:80"), Ok(dest("::1", 80)));
        assert_eq!(
            parse_connect_target("[2001:DB8:0:0::1]:65535"),
            Ok(dest("2001:db8::1", 65535))
        );
        assert_eq!(
            parse_connect_target("svc_name.ns:1"),
            Ok(dest("svc_name.ns", 1))
        );
    }

    #[test]
    fn refuses_malformed_targets() {
        use TargetError::*;
        let cases: &[(&str, TargetError)] = &[
            ("", NotAuthorityForm),
            ("example.com", MissingPort),
            ("example.com:", MissingPort),
            (":80", Host(HostError::Empty)),
            ("example.com:0", InvalidPort),
            ("example.com:65536", InvalidPort),
            ("example.com:+80", InvalidPort),
            ("example.com:080080", InvalidPort),
            ("::1:80", UnbracketedIpv6),
            ("[::1]", MissingPort),
            ("[::1]x:80", NotAuthorityForm),
            ("[1.2.3.4]:80", InvalidIpv6),
            ("[fe80::1%eth0]:80", InvalidIpv6),
            ("[::1:80", InvalidIpv6),
            ("user@host:80", Host(HostError::InvalidCharacter)),
            ("host/path:80", Host(HostError::InvalidCharacter)),
            // Unicode letters: "İ" lower-cases to "i" and a combining dot,
            // "Ⱥ" (2 bytes) to "ⱥ" (3 bytes). Found by the connect_target
            // fuzz target (fuzz/regressions/connect_target/).
            ("bücher.example:80", Host(HostError::InvalidCharacter)),
            ("\u{130}:80", Host(HostError::InvalidCharacter)),
            ("127.1:80", Host(HostError::AmbiguousNumeric)),
            ("2130706433:80", Host(HostError::AmbiguousNumeric)),
            ("0x7f000001:80", Host(HostError::AmbiguousNumeric)),
        ];
        for (target, want) in cases {
            assert_eq!(parse_connect_target(target), Err(*want), "{target:?}");
        }
        let long = format!("{}:80", "a".repeat(256));
        assert_eq!(parse_connect_target(&long), Err(Host(HostError::TooLong)));
    }

    #[test]
    fn uri_forms_other_than_authority_are_refused() {
        for uri in ["http://example.com:80/", "/path", "*"] {
            let uri: Uri = uri.parse().expect("valid uri");
            assert_eq!(
                connect_destination(&uri),
                Err(TargetError::NotAuthorityForm),
                "{uri}"
            );
        }
        let uri: Uri = "example.com:80".parse().expect("valid uri");
        assert_eq!(connect_destination(&uri), Ok(dest("example.com", 80)));
    }

    #[test]
    fn bodies_are_one_line() {
        assert_eq!(one_line("a\r\nb\tc"), "a  b c\n");
    }
}
