//! Who may use the admin API from the host it runs on: the checks a request
//! passes before it is answered.
//!
//! - **Host** ([`host_allowed`]): only an IP literal, `localhost`, or a name
//!   listed in `admin.allowed_hosts`. A browser that a web page sends to the
//!   API through DNS rebinding puts the attacker's *name* in `Host`; the
//!   page can then neither read answers nor trigger a reconnect.
//! - **POST** needs the header [`REQUEST_HEADER`]: a browser cannot send a
//!   non-simple header cross-site without a CORS preflight, which the API
//!   never grants, so a cross-site form or `fetch` cannot reconnect a node.
//! - **Reconnect** is limited per node ([`ReconnectLimiter`]): one accepted
//!   `POST .../reconnect` per node per [`RECONNECT_INTERVAL`]; more get 429
//!   with `Retry-After`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The header every `POST` must carry (any non-empty value; the CLI sends
/// `1`).
pub const REQUEST_HEADER: &str = "x-nodetunnel-request";

/// At most one accepted reconnect per node in this interval.
pub const RECONNECT_INTERVAL: Duration = Duration::from_secs(5);

/// Whether the request's `Host` value (with or without port) is one the API
/// answers: an IP address literal, `localhost`, or one of `allowed` (names,
/// compared case-insensitively, without port). A missing `Host` is refused.
pub fn host_allowed(host: Option<&str>, allowed: &[String]) -> bool {
    let Some(host) = host.map(str::trim).filter(|h| !h.is_empty()) else {
        return false;
    };
    let name = host_without_port(host);
    if name.parse::<IpAddr>().is_ok() || name.eq_ignore_ascii_case("localhost") {
        return true;
    }
    allowed.iter().any(|a| a.eq_ignore_ascii_case(name))
}

/// `host` without `:port`; `[v6]` without its brackets.
fn host_without_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split_once(']').map_or(rest, |(inside, _)| inside);
    }
    match host.rsplit_once(':') {
        // One colon: name:port. More: a bare IPv6 address (no port).
        Some((name, _)) if !name.contains(':') => name,
        _ => host,
    }
}

/// The last accepted reconnect of each node.
#[derive(Debug)]
pub struct ReconnectLimiter {
    interval: Duration,
    last: Mutex<HashMap<String, Instant>>,
}

impl Default for ReconnectLimiter {
    fn default() -> Self {
        ReconnectLimiter::new(RECONNECT_INTERVAL)
    }
}

impl ReconnectLimiter {
    /// A limiter admitting one reconnect per node per `interval`.
    pub fn new(interval: Duration) -> Self {
        ReconnectLimiter {
            interval,
            last: Mutex::new(HashMap::new()),
        }
    }

    /// Admit a reconnect of `node` at `now`, or say how long until the next
    /// one is admitted. Entries older than the interval are dropped, so the
    /// table holds at most the nodes reconnected within one interval.
    pub fn admit(&self, node: &str, now: Instant) -> Result<(), Duration> {
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let interval = self.interval;
        last.retain(|_, at| now.saturating_duration_since(*at) < interval);
        if let Some(at) = last.get(node) {
            return Err(interval.saturating_sub(now.saturating_duration_since(*at)));
        }
        last.insert(node.to_string(), now);
        Ok(())
    }
}

/// `Retry-After` seconds for a wait: rounded up, at least 1.
pub fn retry_after_seconds(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_the_api_answers() {
        let allowed = vec!["nodetunnel.admin.internal".to_string()];
        for ok in [
            "127.0.0.1",
            "127.0.0.1:8133",
            "localhost",
            "LOCALHOST:8133",
            "[::1]:8133",
            "[::1]",
            "::1",
            "10.0.0.5:8133",
            "nodetunnel.admin.internal",
            "NodeTunnel.Admin.Internal:8133",
        ] {
            assert!(host_allowed(Some(ok), &allowed), "{ok} must be allowed");
        }
        for refused in [
            "evil.example",
            "evil.example:8133",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "",
            "[evil.example]:80",
        ] {
            assert!(
                !host_allowed(Some(refused), &allowed),
                "{refused:?} must be refused"
            );
        }
        assert!(!host_allowed(None, &allowed));
    }

    #[test]
    fn one_reconnect_per_node_per_interval() {
        let limiter = ReconnectLimiter::new(Duration::from_secs(5));
        let t0 = Instant::now();
        assert_eq!(limiter.admit("node-1", t0), Ok(()));
        assert_eq!(
            limiter.admit("node-1", t0 + Duration::from_millis(1500)),
            Err(Duration::from_millis(3500))
        );
        // Another node has its own budget.
        assert_eq!(limiter.admit("node-2", t0 + Duration::from_secs(1)), Ok(()));
        assert_eq!(limiter.admit("node-1", t0 + Duration::from_secs(5)), Ok(()));
        // Old entries are dropped: node-2 (1 s old) and node-1 (new) remain.
        assert_eq!(limiter.last.lock().unwrap().len(), 2);
        assert_eq!(retry_after_seconds(Duration::from_millis(3500)), 4);
        assert_eq!(retry_after_seconds(Duration::ZERO), 1);
    }
}
