//! The readiness rule behind `GET /readyz`.
//!
//! Ready means both:
//!
//! 1. the inventory synced within `readiness.max_sync_age` (the check the
//!    apiserver's old SSH tunneler made: a sidecar whose node list is stale
//!    routes to nodes that may be gone), and
//! 2. enough nodes have a Ready SSH session: at least one, or
//!    `readiness.min_ready_fraction` of them (rounded up) when that is set.
//!
//! [`evaluate`] is a pure function of those inputs, so the rule is tested
//! without a clock or a cluster; the server feeds it live values at every
//! request.

use std::time::Duration;

use super::ReadinessConfig;

/// The readiness inputs, read live at each request.
#[derive(Clone, Debug, PartialEq)]
pub struct Inputs<'a> {
    /// Unix time of the last successful inventory sync.
    pub last_sync_unix: Option<i64>,
    /// The inventory's last sync error, if its last sync failed.
    pub sync_error: Option<&'a str>,
    /// Now, in Unix seconds.
    pub now_unix: i64,
    /// Nodes with a Ready session.
    pub ready: usize,
    /// Nodes in the inventory.
    pub total: usize,
}

/// The outcome: ready or not, and a one-line reason either way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Whether `/readyz` answers 200.
    pub ready: bool,
    /// Why, for the response body and logs.
    pub reason: String,
}

/// How many Ready nodes `config` asks for out of `total`.
pub fn required_ready(config: &ReadinessConfig, total: usize) -> usize {
    if config.min_ready_fraction <= 0.0 {
        return 1;
    }
    // total is at most a few thousand: exact in f64.
    let needed = (config.min_ready_fraction * total as f64).ceil() as usize;
    needed.clamp(1, total.max(1))
}

/// Apply the rule (see the module docs).
pub fn evaluate(config: &ReadinessConfig, inputs: &Inputs<'_>) -> Verdict {
    let mut problems = Vec::new();
    let sync = match inputs.last_sync_unix {
        None => {
            problems.push(match inputs.sync_error {
                Some(e) => format!("the inventory has not synced yet (last error: {e})"),
                None => "the inventory has not synced yet".to_string(),
            });
            None
        }
        Some(at) => {
            let age = Duration::from_secs(u64::try_from(inputs.now_unix - at).unwrap_or(0));
            if age > config.max_sync_age {
                let mut p = format!(
                    "the inventory last synced {} ago, longer than readiness.max_sync_age ({})",
                    humantime::format_duration(age),
                    humantime::format_duration(config.max_sync_age)
                );
                if let Some(e) = inputs.sync_error {
                    p.push_str(&format!("; last error: {e}"));
                }
                problems.push(p);
            }
            Some(age)
        }
    };
    let needed = required_ready(config, inputs.total);
    let nodes = format!(
        "{}/{} nodes have a Ready SSH session",
        inputs.ready, inputs.total
    );
    if inputs.total == 0 {
        problems.push("the inventory lists no nodes".to_string());
    } else if inputs.ready < needed {
        let rule = if config.min_ready_fraction > 0.0 {
            format!(
                "readiness.min_ready_fraction = {} needs {needed}",
                config.min_ready_fraction
            )
        } else {
            "at least one is needed".to_string()
        };
        problems.push(format!("{nodes} ({rule})"));
    }
    if problems.is_empty() {
        let age = sync
            .map(|a| format!("; inventory synced {} ago", humantime::format_duration(a)))
            .unwrap_or_default();
        Verdict {
            ready: true,
            reason: format!("ready: {nodes}{age}"),
        }
    } else {
        Verdict {
            ready: false,
            reason: format!("not ready: {}", problems.join("; ")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(ready: usize, total: usize) -> Inputs<'static> {
        Inputs {
            last_sync_unix: Some(1_000),
            sync_error: None,
            now_unix: 1_010,
            ready,
            total,
        }
    }

    #[test]
    fn one_ready_node_is_enough_by_default() {
        let config = ReadinessConfig::default();
        let v = evaluate(&config, &inputs(1, 3));
        assert!(v.ready, "{v:?}");
        assert_eq!(
            v.reason,
            "ready: 1/3 nodes have a Ready SSH session; inventory synced 10s ago"
        );
        let v = evaluate(&config, &inputs(0, 3));
        assert!(!v.ready);
        assert_eq!(
            v.reason,
            "not ready: 0/3 nodes have a Ready SSH session (at least one is needed)"
        );
    }

    #[test]
    fn the_fraction_is_rounded_up() {
        let config = ReadinessConfig {
            min_ready_fraction: 0.5,
            ..ReadinessConfig::default()
        };
        assert_eq!(required_ready(&config, 3), 2);
        assert_eq!(required_ready(&config, 4), 2);
        assert_eq!(required_ready(&config, 1), 1);
        assert!(!evaluate(&config, &inputs(1, 3)).ready);
        assert!(evaluate(&config, &inputs(2, 3)).ready);
        let all = ReadinessConfig {
            min_ready_fraction: 1.0,
            ..ReadinessConfig::default()
        };
        assert!(!evaluate(&all, &inputs(4, 5)).ready);
        assert!(evaluate(&all, &inputs(5, 5)).ready);
    }

    #[test]
    fn a_stale_or_missing_sync_is_not_ready_whatever_the_nodes() {
        let config = ReadinessConfig {
            max_sync_age: Duration::from_secs(600),
            ..ReadinessConfig::default()
        };
        let stale = Inputs {
            last_sync_unix: Some(1_000),
            sync_error: Some("watch failed: 403"),
            now_unix: 1_601,
            ready: 3,
            total: 3,
        };
        let v = evaluate(&config, &stale);
        assert!(!v.ready);
        assert!(v.reason.contains("last synced 10m 1s ago"), "{}", v.reason);
        assert!(v.reason.contains("watch failed: 403"), "{}", v.reason);
        // Exactly max_sync_age old is still fresh.
        let edge = Inputs {
            now_unix: 1_600,
            ..stale.clone()
        };
        assert!(evaluate(&config, &edge).ready);
        let never = Inputs {
            last_sync_unix: None,
            sync_error: None,
            ..stale
        };
        let v = evaluate(&config, &never);
        assert!(!v.ready);
        assert!(v.reason.contains("has not synced yet"), "{}", v.reason);
    }

    #[test]
    fn no_nodes_is_not_ready() {
        let v = evaluate(&ReadinessConfig::default(), &inputs(0, 0));
        assert!(!v.ready);
        assert!(v.reason.contains("lists no nodes"), "{}", v.reason);
    }
}
