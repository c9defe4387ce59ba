//! The metric names `/metrics` exports, the `nodetunnel_*` names a text
//! mentions, and the anchors of a Markdown page's headings: shared by the
//! tests that keep docs, rules and dashboards in step with the code
//! (tests/docs_drift.rs, tests/deploy_files.rs), which include this file
//! alone (`#[path]`), not the whole support module.

use std::collections::BTreeSet;
use std::time::SystemTime;

use nodetunnel::metrics::{per_node_registry, Metrics};
use nodetunnel::tunnel_status::{TunnelState, TunnelStatus};

/// Every metric family `/metrics` encodes: the process-wide registry and
/// the per-node series (`admin.per_node_metrics`), for one node. Every
/// family of the process-wide registry has its label values known in
/// advance and is exported at 0 from the start, so a fresh registry shows
/// them all; a new family whose values are not known in advance must be
/// given a series here (the docs check fails for a documented family that
/// is not exported).
pub fn exported_families() -> BTreeSet<String> {
    let metrics = Metrics::new();
    let node = TunnelStatus {
        node: "node-a".into(),
        addresses: vec!["10.0.0.1".into()],
        ssh_endpoint: "10.0.0.1:22".into(),
        state: TunnelState::Ready,
        since: SystemTime::now(),
        last_error: None,
        rtt: Some(std::time::Duration::from_millis(1)),
        sessions_ready: 1,
        sessions: 1,
        streams: 0,
        streams_total: 0,
        bytes_to_node: 0,
        bytes_from_node: 0,
        stream_resets: 0,
        handshakes: 1,
        failures: [("timeout", 1)].into_iter().collect(),
        consecutive_failures: 0,
        retry_in: None,
        retry_reason: None,
    };
    // Inside a runtime, as at a scrape: `nodetunnel_runtime_workers` reads it.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a tokio runtime");
    let _inside = runtime.enter();
    let text = metrics.encode_with(Some(&per_node_registry(&[node])));
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// `name` as the family it is a series of (`_total` of a counter,
/// `_bucket`/`_count`/`_sum` of a histogram), if it is one; a TYPE line
/// may name a counter's family with `_total` (classic text format) or
/// without (OpenMetrics).
pub fn family_of(name: &str, families: &BTreeSet<String>) -> Option<String> {
    let base = ["_total", "_bucket", "_count", "_sum", "_created"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix));
    [Some(name), base].into_iter().flatten().find_map(|n| {
        [n.to_owned(), format!("{n}_total")]
            .into_iter()
            .find(|f| families.contains(f))
    })
}

/// The `nodetunnel_*` and standard `process_*` names in `text` (alone, or
/// inside a recorded name such as `instance:nodetunnel_bytes:rate5m`); a
/// name ending in `_` is a prefix mentioned in prose.
pub fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = names_with_prefix(text, "nodetunnel_");
    names.append(&mut names_with_prefix(text, "process_"));
    names
}

fn names_with_prefix(text: &str, prefix: &str) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    let mut names = BTreeSet::new();
    let mut from = 0;
    while let Some(at) = text[from..].find(prefix) {
        let start = from + at;
        // Part of a longer word, or a file name (`/etc/ssh/nodetunnel_user_ca.pub`).
        let preceded = start > 0
            && (bytes[start - 1].is_ascii_alphanumeric() || b"_/.-".contains(&bytes[start - 1]));
        let mut end = start;
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase()
                || bytes[end].is_ascii_digit()
                || bytes[end] == b'_')
        {
            end += 1;
        }
        if !preceded {
            names.insert(text[start..end].to_owned());
        }
        from = end.max(start + 1);
    }
    names
}

/// GitHub's anchor for a heading: lower case, spaces to `-`, punctuation
/// other than `-` and `_` dropped.
pub fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors of a Markdown page's headings (outside code blocks).
pub fn anchors(text: &str) -> BTreeSet<String> {
    let mut in_code = false;
    let mut out = BTreeSet::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
        } else if !in_code && line.starts_with('#') {
            out.insert(slug(line.trim_start_matches('#')));
        }
    }
    out
}
