//! The front door's side of the audit trail: who a connection's client is
//! ([`Asker`]), the record of a refusal, and the record of a tunnel that
//! is written when it ends, however it ends ([`OpenTunnel`]: its `Drop`
//! writes it, so a connection aborted at the drain deadline still leaves
//! its record, with `end = "drain_deadline"`).
//!
//! Bytes are counted where the front door moves them, into the record's
//! own counts ([`OpenTunnel::moved`]: the relay's splice adds to them as it
//! writes, the gRPC tunnel per packet), so a tunnel cut in the middle, or
//! its connection aborted, still reports what got through each way.

use std::time::Instant;

use super::ListenerKind;
use crate::audit::{AuditRecord, AuditSink, Client, End, Event};
use crate::dial::{Destination, DialError, TunnelIo};
use crate::splice::{Side, Spliced};

/// A connection's listener and client, as its audit records name them.
#[derive(Clone, Debug)]
pub(crate) struct Asker {
    pub(crate) listener: ListenerKind,
    pub(crate) client: Client,
}

impl Asker {
    /// Record a refused request: `result` is the refusal's label.
    pub(crate) fn refusal(
        &self,
        sink: &AuditSink,
        dest: Option<&Destination>,
        result: &'static str,
        started: Instant,
    ) {
        if !sink.is_on() {
            return;
        }
        let mut record = self.record(Event::Refusal, dest);
        record.result = result;
        record.set_duration(started.elapsed());
        sink.record(record);
    }

    /// Record a dial refused with `error` (its reason label, the policy's
    /// deny reason, the node it names).
    pub(crate) fn dial_refusal(
        &self,
        sink: &AuditSink,
        dest: &Destination,
        error: &DialError,
        started: Instant,
    ) {
        if !sink.is_on() {
            return;
        }
        let mut record = self.record(Event::Refusal, Some(dest));
        record.result = error.reason();
        if let DialError::Route(route) = error {
            record.deny_reason = route.deny_reason().map(|r| r.label());
        }
        record.node = error.node().map(str::to_string);
        record.set_duration(started.elapsed());
        sink.record(record);
    }

    /// The record of `tunnel`, open now, written when the returned guard
    /// is dropped.
    pub(crate) fn open_tunnel<T: TunnelIo>(
        &self,
        sink: &AuditSink,
        dest: &Destination,
        tunnel: &T,
    ) -> OpenTunnel {
        let record = sink.is_on().then(|| {
            let mut record = self.record(Event::Connection, Some(dest));
            let facts = tunnel.facts();
            record.node = facts.node;
            record.stream = facts.stream;
            record.session = facts.session;
            record.rule = facts.rule;
            record
        });
        OpenTunnel {
            sink: sink.clone(),
            record,
            opened: Instant::now(),
            moved: Spliced::default(),
            end: None,
            shutdown: None,
        }
    }

    fn record(&self, event: Event, dest: Option<&Destination>) -> AuditRecord {
        let mut record = AuditRecord::new(event, self.listener.as_str(), self.client.clone());
        record.destination = dest.map(ToString::to_string);
        record
    }
}

/// How a clean end (both ways finished) is named: by the side whose end
/// of stream came first.
pub(crate) fn clean_end(first: Side) -> End {
    match first {
        Side::Client => End::ClientClose,
        Side::Tunnel => End::NodeClose,
    }
}

/// An open tunnel's record, written when this is dropped: with the end
/// given to [`OpenTunnel::ended`], or `drain_deadline` if the connection
/// was aborted before it said.
#[derive(Debug)]
pub(crate) struct OpenTunnel {
    sink: AuditSink,
    /// `None` when audit is off.
    record: Option<AuditRecord>,
    opened: Instant,
    /// Bytes to the node (`client_to_tunnel`) and from it.
    moved: Spliced,
    end: Option<(End, Option<&'static str>)>,
    /// With it, a tunnel dropped before it ended is `client_close` unless
    /// `shutdown` fired (a gRPC stream's tunnels end with the stream).
    shutdown: Option<crate::shutdown::Shutdown>,
}

impl OpenTunnel {
    /// The byte counts of this tunnel, for the code that moves its bytes
    /// to add to as it goes: the record takes them as they are when it is
    /// written.
    pub(crate) fn moved(&mut self) -> &mut Spliced {
        &mut self.moved
    }

    /// A tunnel dropped before it ended was closed with its client's
    /// stream (`client_close`), unless `shutdown` fired (`drain_deadline`).
    pub(crate) fn aborted_unless_draining(mut self, shutdown: crate::shutdown::Shutdown) -> Self {
        self.shutdown = Some(shutdown);
        self
    }

    /// How the tunnel ended; `reset` is the stream reset's label, if any.
    pub(crate) fn ended(&mut self, end: End, reset: Option<&'static str>) {
        self.end = Some((end, reset));
    }
}

/// The end of a tunnel that was cut on its side: the stream reset's label
/// names it (`session_lost`, or another reset), else an I/O error.
pub(crate) fn cut_end(reset: Option<&'static str>) -> End {
    match reset {
        Some(label) if label == crate::stream::StreamResetReason::SessionLost.label() => {
            End::SessionLost
        }
        Some(_) => End::Reset,
        None => End::TunnelError,
    }
}

impl Drop for OpenTunnel {
    fn drop(&mut self) {
        let Some(mut record) = self.record.take() else {
            return;
        };
        let aborted = match &self.shutdown {
            Some(shutdown) if !shutdown.is_triggered() => End::ClientClose,
            _ => End::DrainDeadline,
        };
        let (end, reset) = self.end.unwrap_or((aborted, None));
        record.time = std::time::SystemTime::now();
        record.end = Some(end);
        record.reset_reason = reset;
        record.bytes_to_node = self.moved.client_to_tunnel;
        record.bytes_from_node = self.moved.tunnel_to_client;
        record.set_duration(self.opened.elapsed());
        self.sink.record(record);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::StreamResetReason;

    #[test]
    fn a_cut_is_named_by_the_stream_reset_label() {
        assert_eq!(
            cut_end(Some(StreamResetReason::SessionLost.label())),
            End::SessionLost
        );
        assert_eq!(
            cut_end(Some(StreamResetReason::WindowExceeded.label())),
            End::Reset
        );
        assert_eq!(
            cut_end(Some(StreamResetReason::ProtocolViolation.label())),
            End::Reset
        );
        assert_eq!(cut_end(None), End::TunnelError);
    }

    #[test]
    fn a_clean_end_is_named_by_the_side_that_finished_first() {
        assert_eq!(clean_end(Side::Tunnel), End::NodeClose);
        assert_eq!(clean_end(Side::Client), End::ClientClose);
    }
}
