//! `nodetunnel status`: the tunnel table of a running sidecar, read from its
//! admin API (`GET /api/v1/tunnels`), trouble first, with a summary line.
//!
//! ```text
//! NODE    STATE    FOR    RTT     STREAMS  NEXT      LAST ERROR
//! node-3  backoff  2m10s  -       0        probe 2s  tcp connect to 10.0.0.3:22 failed: Connection refused (os error 111)
//! node-1  ready    3h05m  12.3ms  4        -
//! node-2  ready    3h05m  0.42ms  1        -
//! 2/3 nodes ready, 5 streams open, 3 errors in the last minute (1 backoff)
//! file descriptors: 10,399 needed, limit 1,048,576
//! ```
//!
//! `-o wide` adds the SSH endpoint, sessions, stream and byte totals and
//! failure counts; `-o json` prints the API's document as is.

use std::process::ExitCode;

use super::client::AdminClient;
use super::format::{self, paint, Colour};
use crate::admin::api::{
    trouble_order, CertificateInfo, DescriptorInfo, Summary, TunnelInfo, TunnelList,
};

/// Output formats of `status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns.
    Table,
    /// More columns.
    Wide,
    /// The admin API's JSON document.
    Json,
}

/// Longest LAST ERROR shown by the table format.
const TABLE_ERROR_WIDTH: usize = 100;

/// Fetch and print; exit 1 when the admin API cannot be read.
pub async fn run(client: &AdminClient, output: Output) -> ExitCode {
    let list: TunnelList = match client.get_json("/api/v1/tunnels").await {
        Ok(list) => list,
        Err(e) => {
            eprintln!("nodetunnel status: {e}");
            return ExitCode::FAILURE;
        }
    };
    match output {
        Output::Json => match serde_json::to_string_pretty(&list) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("nodetunnel status: {e}");
                return ExitCode::FAILURE;
            }
        },
        Output::Table | Output::Wide => {
            print!(
                "{}",
                render(&list, output == Output::Wide, format::stdout_colour())
            );
        }
    }
    ExitCode::SUCCESS
}

/// When and why a tunnel without a Ready session tries again: `probe 2s`
/// (its SSH port is closed: the next probe; an attempt follows the first
/// that finds sshd), `backoff 37s` (a handshake failed), `-` otherwise.
fn next_attempt(t: &TunnelInfo) -> String {
    match (&t.retry_reason, t.retry_in) {
        (Some(why), Some(secs)) if !t.is_ready() => {
            format!("{why} {}", format::age(secs.ceil() as u64))
        }
        _ => "-".into(),
    }
}

/// The table (trouble first) and the summary line.
pub fn render(list: &TunnelList, wide: bool, colour: bool) -> String {
    let mut tunnels: Vec<&TunnelInfo> = list.tunnels.iter().collect();
    tunnels.sort_by(|a, b| trouble_order(a, b));
    let header: Vec<&str> = if wide {
        vec![
            "NODE",
            "STATE",
            "FOR",
            "ENDPOINT",
            "SESSIONS",
            "RTT",
            "STREAMS",
            "OPENED",
            "TO NODE",
            "FROM NODE",
            "RESETS",
            "FAILURES",
            "NEXT",
            "LAST ERROR",
        ]
    } else {
        vec![
            "NODE",
            "STATE",
            "FOR",
            "RTT",
            "STREAMS",
            "NEXT",
            "LAST ERROR",
        ]
    };
    let mut rows = vec![header.iter().map(|h| h.to_string()).collect::<Vec<_>>()];
    for t in &tunnels {
        let error = t.last_error.clone().unwrap_or_default();
        if wide {
            let failures = t
                .failures
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",");
            rows.push(vec![
                t.node.clone(),
                t.state.clone(),
                format::age(t.for_seconds),
                t.ssh_endpoint.clone(),
                format!("{}/{}", t.sessions_ready, t.sessions),
                format::seconds(t.rtt),
                t.streams.to_string(),
                t.streams_total.to_string(),
                format::bytes(t.bytes.to_node),
                format::bytes(t.bytes.from_node),
                t.stream_resets.to_string(),
                if failures.is_empty() {
                    "-".into()
                } else {
                    failures
                },
                next_attempt(t),
                error,
            ]);
        } else {
            // A Ready tunnel's last error is history; show only current trouble.
            let error = if t.is_ready() {
                String::new()
            } else {
                format::truncate(&error, TABLE_ERROR_WIDTH)
            };
            rows.push(vec![
                t.node.clone(),
                t.state.clone(),
                format::age(t.for_seconds),
                format::seconds(t.rtt),
                t.streams.to_string(),
                next_attempt(t),
                error,
            ]);
        }
    }
    let mut out = if tunnels.is_empty() {
        String::new()
    } else {
        format::columns(&rows, |r, c, text| {
            if r == 0 {
                paint(text, Colour::Bold, colour)
            } else if c == 1 {
                paint(text, format::state_colour(text.trim()), colour)
            } else {
                text.to_string()
            }
        })
    };
    out.push_str(&summary_line(&list.summary, colour));
    out.push('\n');
    if let Some(certificate) = &list.certificate {
        out.push_str(&certificate_line(certificate, colour));
        out.push('\n');
    }
    if let Some(descriptors) = &list.descriptors {
        out.push_str(&descriptors_line(descriptors, colour));
        out.push('\n');
    }
    if !list.conflicts.is_empty() {
        out.push_str(&paint(
            &format!("{} routing conflict(s):", list.conflicts.len()),
            Colour::Bold,
            colour,
        ));
        out.push('\n');
        for c in &list.conflicts {
            out.push_str(&format!("  {} ({})\n", c.message, c.kind));
        }
    }
    out
}

/// The certificate in use: `certificate "nodetunnel@cp-1" serial 42,
/// principals nodetunnel, expires 2026-12-07T01:40:37Z (in 40m)`; when it
/// expired with no replacement, a warning instead.
pub fn certificate_line(c: &CertificateInfo, colour: bool) -> String {
    let principals = if c.principals.is_empty() {
        "any".to_string()
    } else {
        c.principals.join(",")
    };
    if c.expired {
        return paint(
            &format!(
                "WARNING: certificate {:?} serial {} expired at {} ({} ago) and nothing replaced it: \
                 new sessions cannot authenticate ({})",
                c.key_id,
                c.serial,
                c.valid_before,
                format::age(c.expires_in_seconds.unsigned_abs()),
                c.source
            ),
            Colour::Red,
            colour,
        );
    }
    let expires = if c.valid_before == "forever" {
        "never expires".to_string()
    } else {
        format!(
            "expires {} (in {})",
            c.valid_before,
            format::age(c.expires_in_seconds.max(0).unsigned_abs())
        )
    };
    format!(
        "certificate {:?} serial {}, principals {principals}, {expires}",
        c.key_id, c.serial
    )
}

/// `file descriptors: 10,399 needed, limit 1,048,576`; when the
/// configuration does not fit, a warning with the fix instead.
pub fn descriptors_line(d: &DescriptorInfo, colour: bool) -> String {
    let limit = d
        .limit
        .map_or_else(|| "unlimited".to_string(), format::thousands);
    let suggested = d.suggested_limit;
    if d.fits {
        return format!(
            "file descriptors: {} needed, limit {limit}",
            format::thousands(d.needed)
        );
    }
    paint(
        &format!(
            "WARNING: file descriptors: {} needed ({} nodes) but the limit is {limit}: \
             sessions and connections beyond it fail (local_resources); raise it: \
             systemd LimitNOFILE={suggested}, container --ulimit nofile={suggested}:{suggested}",
            format::thousands(d.needed),
            format::thousands(d.nodes as u64),
        ),
        Colour::Red,
        colour,
    )
}

/// `2/3 nodes ready, 5 streams open, 3 errors in the last minute (1 backoff)`.
pub fn summary_line(s: &Summary, colour: bool) -> String {
    let ready = format!("{}/{} nodes ready", s.ready, s.total);
    let ready = if s.total > 0 && s.ready == s.total {
        paint(&ready, Colour::Green, colour)
    } else if s.ready == 0 {
        paint(&ready, Colour::Red, colour)
    } else {
        paint(&ready, Colour::Yellow, colour)
    };
    let errors = format!(
        "{} error{} in the last minute",
        s.errors_last_minute,
        if s.errors_last_minute == 1 { "" } else { "s" }
    );
    let errors = if s.errors_last_minute > 0 {
        paint(&errors, Colour::Yellow, colour)
    } else {
        errors
    };
    let others: Vec<String> = s
        .by_state
        .iter()
        .filter(|(state, n)| state.as_str() != "ready" && **n > 0)
        .map(|(state, n)| format!("{n} {state}"))
        .collect();
    let others = if others.is_empty() {
        String::new()
    } else {
        format!(" ({})", others.join(", "))
    };
    format!(
        "{ready}, {} stream{} open, {errors}{others}",
        s.streams,
        if s.streams == 1 { "" } else { "s" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::api::ByteCounts;
    use crate::admin::api::ConflictInfo;
    use std::collections::BTreeMap;

    fn info(node: &str, state: &str, rtt: Option<f64>, error: Option<&str>) -> TunnelInfo {
        TunnelInfo {
            node: node.into(),
            addresses: vec!["10.0.0.1".into()],
            ssh_endpoint: "10.0.0.1:22".into(),
            state: state.into(),
            since: "2025-01-01T00:00:00Z".into(),
            for_seconds: 130,
            last_error: error.map(String::from),
            rtt,
            streams: 2,
            streams_total: 9,
            stream_resets: 0,
            bytes: ByteCounts {
                to_node: 2048,
                from_node: 10,
            },
            sessions_ready: usize::from(state == "ready"),
            sessions: 1,
            handshakes: 1,
            failures: BTreeMap::from([("refused".to_string(), 3)]),
            consecutive_failures: 0,
            retry_in: None,
            retry_reason: None,
        }
    }

    fn list() -> TunnelList {
        let tunnels = vec![
            info("node-1", "ready", Some(0.0004), Some("old trouble")),
            info("node-2", "ready", Some(0.02), None),
            TunnelInfo {
                retry_in: Some(1.2),
                retry_reason: Some("probe".into()),
                ..info("node-3", "backoff", None, Some("tcp connect failed"))
            },
        ];
        TunnelList {
            conflicts: Vec::new(),
            summary: Summary::of(&tunnels, 1),
            tunnels,
            certificate: None,
            descriptors: None,
        }
    }

    fn certificate(expires_in_seconds: i64) -> CertificateInfo {
        CertificateInfo {
            source: "certificate issued by ssh.issuer (CA /etc/nodetunnel/user_ca)".into(),
            key_id: "nodetunnel@cp-1".into(),
            serial: 1_765_068_037_000,
            principals: vec!["nodetunnel".into()],
            valid_after: "2026-12-07T00:39:37Z".into(),
            valid_before: "2026-12-07T01:40:37Z".into(),
            expires_in_seconds,
            expired: expires_in_seconds <= 0,
        }
    }

    #[test]
    fn the_descriptor_need_follows_the_summary_and_warns_when_it_does_not_fit() {
        let mut table = list();
        table.descriptors = Some(DescriptorInfo {
            needed: 10_399,
            limit: Some(1_048_576),
            nodes: 3,
            fits: true,
            suggested_limit: 13_312,
        });
        let out = render(&table, false, false);
        assert!(
            out.lines()
                .any(|l| l == "file descriptors: 10,399 needed, limit 1,048,576"),
            "{out}"
        );
        table.descriptors = Some(DescriptorInfo {
            needed: 30_399,
            limit: Some(20_000),
            nodes: 20_000,
            fits: false,
            suggested_limit: 38_912,
        });
        let out = render(&table, false, false);
        let line = out
            .lines()
            .find(|l| l.starts_with("WARNING: file descriptors"))
            .unwrap_or_else(|| panic!("no warning in:\n{out}"));
        for part in [
            "30,399 needed",
            "20,000 nodes",
            "limit is 20,000",
            "LimitNOFILE=38912",
            "--ulimit nofile=38912:38912",
        ] {
            assert!(line.contains(part), "{part} missing: {line}");
        }
        // Red when colours are on.
        assert!(render(&table, false, true).contains("\x1b[31mWARNING: file descriptors"));
    }

    #[test]
    fn the_certificate_in_use_follows_the_summary() {
        let mut l = list();
        l.certificate = Some(certificate(2400));
        let text = render(&l, false, false);
        assert_eq!(
            text.lines().last().unwrap(),
            "certificate \"nodetunnel@cp-1\" serial 1765068037000, principals nodetunnel, \
             expires 2026-12-07T01:40:37Z (in 40m00s)"
        );
    }

    #[test]
    fn an_expired_certificate_is_a_warning() {
        let mut l = list();
        l.certificate = Some(certificate(-300));
        let text = render(&l, false, false);
        let last = text.lines().last().unwrap();
        assert!(
            last.starts_with(
                "WARNING: certificate \"nodetunnel@cp-1\" serial 1765068037000 expired at \
                 2026-12-07T01:40:37Z (5m00s ago) and nothing replaced it: new sessions cannot authenticate"
            ),
            "{last}"
        );
    }

    #[test]
    fn trouble_first_then_highest_rtt_with_a_summary() {
        let out = render(&list(), false, false);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[0],
            "NODE    STATE    FOR    RTT     STREAMS  NEXT      LAST ERROR"
        );
        assert_eq!(
            lines[1],
            "node-3  backoff  2m10s  -       2        probe 2s  tcp connect failed"
        );
        assert_eq!(lines[2], "node-2  ready    2m10s  20.0ms  2        -");
        assert_eq!(lines[3], "node-1  ready    2m10s  0.40ms  2        -");
        assert_eq!(
            lines[4],
            "2/3 nodes ready, 6 streams open, 1 error in the last minute (1 backoff)"
        );
        assert!(!out.contains('\x1b'), "no colour when not asked: {out:?}");
    }

    #[test]
    fn wide_shows_totals_and_every_error() {
        let out = render(&list(), true, false);
        assert!(out.contains("ENDPOINT"), "{out}");
        assert!(out.contains("10.0.0.1:22"), "{out}");
        assert!(out.contains("2.0KiB"), "{out}");
        assert!(out.contains("refused=3"), "{out}");
        assert!(out.contains("old trouble"), "{out}");
    }

    #[test]
    fn colour_only_when_asked() {
        let out = render(&list(), false, true);
        assert!(out.contains("\x1b[31mbackoff"), "{out:?}");
        assert!(out.contains("\x1b[33m2/3 nodes ready"), "{out:?}");
    }

    #[test]
    fn an_empty_inventory_prints_only_the_summary() {
        let out = render(&TunnelList::default(), false, false);
        assert_eq!(
            out,
            "0/0 nodes ready, 0 streams open, 0 errors in the last minute\n"
        );
    }

    #[test]
    fn routing_conflicts_follow_the_summary() {
        let mut l = list();
        l.conflicts = vec![ConflictInfo {
            kind: "shared_address".into(),
            message: "address 10.0.0.1 is claimed by nodes a, b; routing it to none of them".into(),
        }];
        let text = render(&l, false, false);
        let tail: Vec<&str> = text.lines().rev().take(2).collect();
        assert_eq!(
            tail,
            [
                "  address 10.0.0.1 is claimed by nodes a, b; routing it to none of them (shared_address)",
                "1 routing conflict(s):",
            ]
        );
        assert!(!render(&list(), false, false).contains("conflict"));
    }
}
