//! One audit record: who reached which node, when, how, and how much.
//!
//! A record is written when a tunnelled connection ends (`event =
//! "connection"`) and when a request is refused (`event = "refusal"`). Its
//! labels are the ones metrics and logs already use: `result` is `ok` or
//! the refusal's [`DialError::reason`](crate::dial::DialError::reason)
//! (`denied`, `no_route`, `node_down`, ...) with the policy's
//! [`DenyReason`](crate::router::DenyReason) label in `deny_reason`;
//! `reset_reason` is the stream reset's label
//! ([`StreamResetReason`](crate::stream::StreamResetReason)).

use std::time::{Duration, SystemTime};

use serde::Serialize;

/// Who asked, as far as the listener can tell.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Client {
    /// Unix socket peer's user id (`SO_PEERCRED`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Unix socket peer's group id (`SO_PEERCRED`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    /// Unix socket peer's process id (`SO_PEERCRED`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    /// TCP peer address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Subject of the mTLS client certificate, as an RFC 4514 string
    /// (`CN=kube-apiserver,O=system:masters`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate_subject: Option<String>,
}

/// What a record is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// A tunnelled connection that ended.
    Connection,
    /// A request refused before any tunnel was open.
    Refusal,
}

/// How a tunnelled connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum End {
    /// Both ways ended cleanly, the client's side first.
    ClientClose,
    /// Both ways ended cleanly, the node's side first.
    NodeClose,
    /// The client's connection failed (reset, broken pipe).
    ClientError,
    /// The stream's I/O towards the node failed.
    TunnelError,
    /// The SSH session carrying the stream was lost.
    SessionLost,
    /// nodetunnel reset the stream because the node broke flow control or
    /// the protocol (`reset_reason` says which).
    Reset,
    /// Aborted at the shutdown drain deadline.
    DrainDeadline,
}

impl End {
    /// The record's label.
    pub fn as_str(self) -> &'static str {
        match self {
            End::ClientClose => "client_close",
            End::NodeClose => "node_close",
            End::ClientError => "client_error",
            End::TunnelError => "tunnel_error",
            End::SessionLost => "session_lost",
            End::Reset => "reset",
            End::DrainDeadline => "drain_deadline",
        }
    }
}

/// One audit record (one JSON line).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AuditRecord {
    /// When the connection ended or the refusal was answered (RFC 3339,
    /// UTC, milliseconds).
    #[serde(serialize_with = "rfc3339")]
    pub time: SystemTime,
    /// `connection` or `refusal`.
    pub event: Event,
    /// The listener: `uds`, `tcp`, `socks5`, `grpc`.
    pub listener: &'static str,
    /// Who asked.
    pub client: Client,
    /// The destination as asked (`host:port`), once parsed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    /// The node the stream ran to (or the refusal names).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The routing rule that chose the node (`node_address`, `node_name`,
    /// `pod_cidr`, `service_cidr`, `default`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<&'static str>,
    /// The SSH session's index on its node (0..`ssh.sessions_per_node`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<usize>,
    /// The stream id (the `stream` field of log lines).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream: Option<u64>,
    /// `ok`, or why the request was refused.
    pub result: &'static str,
    /// The policy's reason, for `result = "denied"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deny_reason: Option<&'static str>,
    /// Bytes from the client into the tunnel.
    pub bytes_to_node: u64,
    /// Bytes from the tunnel to the client.
    pub bytes_from_node: u64,
    /// From the tunnel's open (or the request) to the end, milliseconds.
    pub duration_ms: u64,
    /// How the connection ended (connections only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end: Option<End>,
    /// The stream reset's label, for `end = "reset"` and `"session_lost"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reset_reason: Option<&'static str>,
}

impl AuditRecord {
    /// A record of `event` on `listener` for `client`, stamped now, with
    /// nothing else known yet.
    pub fn new(event: Event, listener: &'static str, client: Client) -> Self {
        AuditRecord {
            time: SystemTime::now(),
            event,
            listener,
            client,
            destination: None,
            node: None,
            rule: None,
            session: None,
            stream: None,
            result: "ok",
            deny_reason: None,
            bytes_to_node: 0,
            bytes_from_node: 0,
            duration_ms: 0,
            end: None,
            reset_reason: None,
        }
    }

    /// Set the duration (whole milliseconds).
    pub fn set_duration(&mut self, duration: Duration) {
        self.duration_ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    }

    /// The record as one JSON line, with its `\n`.
    pub fn to_line(&self) -> String {
        // Serializing this struct cannot fail: no map keys, no
        // non-finite floats.
        let mut line = serde_json::to_string(self).unwrap_or_else(|error| {
            format!("{{\"error\":\"audit record not serializable: {error}\"}}")
        });
        line.push('\n');
        line
    }
}

/// The summary of records dropped while the queue was full: written once
/// the queue has room again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DroppedSummary {
    /// When the summary was written.
    #[serde(serialize_with = "rfc3339")]
    pub time: SystemTime,
    /// Records dropped.
    pub dropped: u64,
    /// When the first of them was dropped.
    #[serde(serialize_with = "rfc3339")]
    pub since: SystemTime,
}

impl DroppedSummary {
    /// The summary as one JSON line, with its `\n`.
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self).unwrap_or_else(|error| {
            format!("{{\"error\":\"audit summary not serializable: {error}\"}}")
        });
        line.push('\n');
        line
    }
}

fn rfc3339<S: serde::Serializer>(time: &SystemTime, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&humantime::format_rfc3339_millis(*time))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_one_json_line_with_utc_time() {
        let mut record = AuditRecord::new(
            Event::Connection,
            "uds",
            Client {
                uid: Some(0),
                gid: Some(0),
                pid: Some(42),
                ..Client::default()
            },
        );
        record.time = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        record.destination = Some("10.0.0.1:10250".into());
        record.end = Some(End::ClientClose);
        let line = record.to_line();
        assert!(line.ends_with('\n'));
        assert_eq!(line.matches('\n').count(), 1);
        let value: serde_json::Value = serde_json::from_str(&line).expect("JSON");
        assert_eq!(value["time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(value["client"]["pid"], 42);
        assert_eq!(value["end"], "client_close");
        assert!(value.get("node").is_none());
        assert!(value["client"].get("address").is_none());
    }

    #[test]
    fn end_labels_match_serde() {
        for end in [
            End::ClientClose,
            End::NodeClose,
            End::ClientError,
            End::TunnelError,
            End::SessionLost,
            End::Reset,
            End::DrainDeadline,
        ] {
            assert_eq!(
                serde_json::to_value(end).expect("JSON"),
                serde_json::Value::from(end.as_str())
            );
        }
    }
}
