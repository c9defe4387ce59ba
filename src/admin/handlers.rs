//! Routing an admin request to its answer, after the checks of [`guard`]
//! (Host, the POST header, the reconnect rate). Every answer is computed
//! from live state; none takes long enough to need its own task.

use std::time::SystemTime;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;

use super::api::{
    ApiError, CertificateInfo, ConflictInfo, DescriptorInfo, ReconnectAnswer, RouteAnswer, Summary,
    TunnelInfo, TunnelList,
};
use super::guard::{self, REQUEST_HEADER};
use super::readiness::{self, Inputs};
use super::state::{AdminState, Lane, Transport};
use crate::metrics::{per_node_registry, Format};

const ENDPOINTS: &str = "GET /healthz, GET /readyz, GET /metrics, GET /api/v1/tunnels, \
     GET /api/v1/tunnels/{node}, POST /api/v1/tunnels/{node}/reconnect, \
     GET /api/v1/route?dest=HOST:PORT";

type Answer = Response<Full<Bytes>>;

/// The answer to one request.
pub(super) fn answer<B>(
    state: &AdminState,
    req: &Request<B>,
    lane: Lane,
    transport: Transport,
) -> Answer {
    let path = req.uri().path();
    let method = req.method();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let get = method == Method::GET || method == Method::HEAD;
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    if transport == Transport::Tcp && !guard::host_allowed(host, &state.allowed_hosts) {
        tracing::warn!(
            host = host.unwrap_or(""),
            path,
            "admin request refused: Host not allowed"
        );
        return json(
            StatusCode::FORBIDDEN,
            &ApiError {
                error: format!(
                    "Host {:?} is not allowed: the admin API answers only Host values that are \
                     IP addresses, localhost, or listed in admin.allowed_hosts (DNS rebinding \
                     protection)",
                    host.unwrap_or("")
                ),
            },
        );
    }
    if lane == Lane::ProbesOnly && !(get && matches!(segments.as_slice(), ["healthz"] | ["readyz"]))
    {
        return json(
            StatusCode::SERVICE_UNAVAILABLE,
            &ApiError {
                error: "the admin API's connections are all taken; this connection, from the \
                        reserve kept for probes, answers only /healthz and /readyz"
                    .to_string(),
            },
        );
    }
    if method == Method::POST
        && req
            .headers()
            .get(REQUEST_HEADER)
            .is_none_or(|v| v.as_bytes().is_empty())
    {
        return json(
            StatusCode::FORBIDDEN,
            &ApiError {
                error: "a POST to the admin API must carry the header X-Nodetunnel-Request \
                        (any value, e.g. 1): cross-site requests from a browser cannot send it"
                    .to_string(),
            },
        );
    }
    match segments.as_slice() {
        ["healthz"] if get => text(StatusCode::OK, "ok\n".into()),
        ["readyz"] if get => readyz(state),
        ["metrics"] if get => metrics(
            state,
            Format::negotiate(
                req.headers()
                    .get(header::ACCEPT)
                    .and_then(|a| a.to_str().ok()),
            ),
        ),
        ["api", "v1", "tunnels"] if get => tunnels(state),
        ["api", "v1", "tunnels", node] if get => match percent_decode(node) {
            Some(node) => tunnel(state, &node),
            None => bad_request("the node name is not valid percent-encoded UTF-8"),
        },
        ["api", "v1", "tunnels", node, "reconnect"] if method == Method::POST => {
            match percent_decode(node) {
                Some(node) => reconnect(state, &node),
                None => bad_request("the node name is not valid percent-encoded UTF-8"),
            }
        }
        ["api", "v1", "route"] if get => route(state, req.uri().query()),
        ["healthz"]
        | ["readyz"]
        | ["metrics"]
        | ["api", "v1", "tunnels"]
        | ["api", "v1", "tunnels", _]
        | ["api", "v1", "route"] => method_not_allowed("GET, HEAD"),
        ["api", "v1", "tunnels", _, "reconnect"] => method_not_allowed("POST"),
        _ => json(
            StatusCode::NOT_FOUND,
            &ApiError {
                error: format!("no endpoint {path}; the admin API has {ENDPOINTS}"),
            },
        ),
    }
}

fn readyz(state: &AdminState) -> Answer {
    let (ready, total) = state.manager.count_ready();
    let sync_error = state.sync.last_error();
    let verdict = readiness::evaluate(
        &state.readiness,
        &Inputs {
            last_sync_unix: state.sync.last_sync_unix(),
            sync_error: sync_error.as_deref(),
            now_unix: unix_now(),
            ready,
            total,
        },
    );
    let status = if verdict.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    text(status, format!("{}\n", verdict.reason))
}

/// `/metrics` in `format` (OpenMetrics when the scraper asks for it, the
/// classic text format otherwise).
fn metrics(state: &AdminState, format: Format) -> Answer {
    if let Some(at) = state.sync.last_sync_unix() {
        state.metrics.inventory_last_sync.set(at);
    }
    state
        .metrics
        .stream_buffered_bytes
        .set(i64::try_from(state.manager.buffered_bytes()).unwrap_or(i64::MAX));
    let extra = state
        .per_node_metrics
        .then(|| per_node_registry(&state.manager.status()));
    let body = state.metrics.encode_as(format, extra.as_ref());
    respond(StatusCode::OK, format.content_type(), body.into())
}

fn tunnels(state: &AdminState) -> Answer {
    let now = SystemTime::now();
    let tunnels: Vec<TunnelInfo> = state
        .manager
        .status()
        .iter()
        .map(|s| TunnelInfo::from_status(s, now))
        .collect();
    let summary = Summary::of(&tunnels, state.metrics.errors_last_minute());
    let conflicts = state
        .manager
        .router()
        .conflicts()
        .iter()
        .map(|c| ConflictInfo {
            kind: c.label().to_string(),
            message: c.to_string(),
        })
        .collect();
    json(
        StatusCode::OK,
        &TunnelList {
            summary,
            tunnels,
            conflicts,
            certificate: state
                .manager
                .current_certificate()
                .map(|c| CertificateInfo::of(&c, now)),
            descriptors: Some(DescriptorInfo::of(&state.manager.descriptor_fit())),
        },
    )
}

fn tunnel(state: &AdminState, node: &str) -> Answer {
    match state.manager.tunnel(node) {
        Some(t) => json(
            StatusCode::OK,
            &TunnelInfo::from_status(&t.status(), SystemTime::now()),
        ),
        None => no_such_node(node),
    }
}

fn reconnect(state: &AdminState, node: &str) -> Answer {
    let Some(t) = state.manager.tunnel(node) else {
        return no_such_node(node);
    };
    if let Err(wait) = state.reconnects.admit(node, tokio::time::Instant::now()) {
        let seconds = guard::retry_after_seconds(wait);
        let mut answer = json(
            StatusCode::TOO_MANY_REQUESTS,
            &ApiError {
                error: format!(
                    "node {node} was reconnected less than {}s ago; retry in {seconds}s",
                    guard::RECONNECT_INTERVAL.as_secs()
                ),
            },
        );
        answer
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        return answer;
    }
    let before = t.state();
    t.reconnect_now();
    tracing::info!(node, state = %before, "reconnect requested through the admin API");
    json(
        StatusCode::ACCEPTED,
        &ReconnectAnswer {
            node: node.to_string(),
            state: before.as_str().to_string(),
            message: format!(
                "node {node} was {before}: a Ready session is closed and reconnected at once \
                 (its open streams end), a node in backoff retries now, a handshake in \
                 progress is left to finish"
            ),
        },
    )
}

fn route(state: &AdminState, query: Option<&str>) -> Answer {
    let Some(raw) = query_param(query.unwrap_or(""), "dest") else {
        return bad_request("missing query parameter dest=HOST:PORT");
    };
    let Some(text) = percent_decode(raw) else {
        return bad_request("dest is not valid percent-encoded UTF-8");
    };
    let dest = match crate::proxy::parse_connect_target(&text) {
        Ok(d) => d,
        Err(e) => return bad_request(&format!("dest {text:?}: {e}")),
    };
    let result = state.manager.router().route(&dest);
    let mut answer = RouteAnswer::new(dest.to_string(), &result);
    if let Some(node) = &answer.node {
        answer.node_state = Some(match state.manager.tunnel(node) {
            Some(t) => t.state().as_str().to_string(),
            None => "unknown".to_string(),
        });
    }
    if answer.decision == "any-node" {
        answer.ready_candidates = Some(state.manager.count_ready().0);
    }
    json(StatusCode::OK, &answer)
}

/// The value of `name` in a query string (not decoded).
fn query_param<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Decode `%XX` escapes and `+` (as a space); `None` for a bad escape or
/// invalid UTF-8.
pub(crate) fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn no_such_node(node: &str) -> Answer {
    json(
        StatusCode::NOT_FOUND,
        &ApiError {
            error: format!("no node named {node:?}"),
        },
    )
}

fn bad_request(message: &str) -> Answer {
    json(
        StatusCode::BAD_REQUEST,
        &ApiError {
            error: message.to_string(),
        },
    )
}

fn method_not_allowed(allow: &'static str) -> Answer {
    let mut answer = json(
        StatusCode::METHOD_NOT_ALLOWED,
        &ApiError {
            error: format!("method not allowed; allowed: {allow}"),
        },
    );
    answer
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    answer
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Answer {
    match serde_json::to_vec_pretty(value) {
        Ok(mut body) => {
            body.push(b'\n');
            respond(status, "application/json", body.into())
        }
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the answer: {e}\n"),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Answer {
    respond(status, "text/plain; charset=utf-8", body.into())
}

fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> Answer {
    let mut answer = Response::new(Full::new(body));
    *answer.status_mut() = status;
    let headers = answer.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(
            percent_decode("%5Bfd00%3A%3A1%5D:443").as_deref(),
            Some("[fd00::1]:443")
        );
        assert_eq!(percent_decode("a+b").as_deref(), Some("a b"));
        assert_eq!(
            percent_decode("10.0.0.1:80").as_deref(),
            Some("10.0.0.1:80")
        );
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%ff"), None);
    }

    #[test]
    fn query_parameters() {
        assert_eq!(query_param("dest=a:1", "dest"), Some("a:1"));
        assert_eq!(query_param("x=1&dest=b:2", "dest"), Some("b:2"));
        assert_eq!(query_param("destination=b:2", "dest"), None);
        assert_eq!(query_param("dest", "dest"), Some(""));
    }
}
