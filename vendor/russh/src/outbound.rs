//! (nodetunnel patch) The client session's outbound scheduler: channel
//! data is sent one packet per channel in turn, and a channel's writer may
//! queue only a bounded amount ahead of the wire.
//!
//! Upstream russh writes each channel message into the session's output as
//! it takes it from the one queue that every channel's writer shares, so a
//! small write (a keystroke) waits behind everything the busy channels
//! queued before it: up to `channel_buffer_size` messages of 32 KiB, plus
//! the output backlog. Here the session instead takes every message from
//! that queue at once into the channel's own queue (`pending_data`) and
//! lists the channel in a round ([`Outbound::queue`]); [`Outbound::serve`]
//! then moves data from the queues into the packet writer one packet per
//! listed channel in turn, as long as the output backlog allows, the way
//! OpenSSH's `channel_output_poll` and HTTP/2 and QUIC stacks serve
//! streams. A small write therefore waits behind at most one packet of
//! each busy channel (plus the output already in the packet writer and
//! the socket).
//!
//! Taking every message at once is bounded because each writer is: a
//! channel opened with a sink (`send_credit`) is given *send credit*
//! instead of the peer's window: at most [`SEND_QUEUE_CREDIT`] bytes,
//! and never more than the peer's window, may be granted and not yet sent
//! ([`grant`]); credit returns as its packets are sent. The peer's window
//! still bounds what is in flight on the network, so throughput over a
//! long link is unchanged; only the queue inside the session is short.
//! Other channels keep upstream's rule (their writer is bounded by the
//! peer's window).

use std::collections::VecDeque;

use bytes::Bytes;
use log::debug;

use crate::session::Encrypted;
use crate::sshbuffer::PacketWriter;
use crate::{ChannelId, ChannelParams};

/// The most a channel with send credit may have queued in the session or
/// granted to its writer and not yet sent: four packets of 32 KiB.
pub(crate) const SEND_QUEUE_CREDIT: u32 = 128 * 1024;

/// Channels with data to send, served in turn, and the send credit to hand
/// back to their writers.
#[derive(Debug, Default)]
pub(crate) struct Outbound {
    /// Channels with queued data and room in the peer's window, in the
    /// order they are served. A channel is listed at most once
    /// (`ChannelParams::scheduled`); an entry whose channel is gone is
    /// skipped.
    ready: VecDeque<ChannelId>,
    /// Credit granted by [`Outbound::serve`] or [`Outbound::window_adjusted`]
    /// and not yet added to the writers' windows (that takes an `.await`).
    owed: Vec<(ChannelId, u32)>,
}

/// What serving one channel did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Served {
    /// The channel is gone.
    Gone,
    /// `bytes` of data were sent; `again`: it has more to send and room in
    /// the peer's window.
    Sent { bytes: usize, again: bool },
}

impl Outbound {
    /// Queue `data` from the channel's writer behind what it queued before,
    /// and list the channel if it can send. Data for an unknown or
    /// unconfirmed channel is dropped, as upstream's `Encrypted::data`.
    pub(crate) fn queue(
        &mut self,
        enc: &mut Encrypted,
        id: ChannelId,
        data: Bytes,
        ext: Option<u32>,
    ) {
        let Some(channel) = enc.channels.get_mut(&id) else {
            debug!("{id:?} not saved for this session");
            return;
        };
        if !channel.confirmed {
            debug!("{id:?}: data before the open confirmation dropped");
            return;
        }
        if let Some(credit) = channel.send_credit.as_mut() {
            *credit = credit.saturating_sub(u32::try_from(data.len()).unwrap_or(u32::MAX));
        }
        channel.pending_data.push_back((data, ext, 0));
        self.list(id, channel);
    }

    /// The peer opened the channel's window: list it again if it has data,
    /// and return the send credit its writer may now be given (0 for a
    /// channel without send credit: its writer is given the peer's
    /// adjustment itself).
    pub(crate) fn window_adjusted(&mut self, channel: &mut ChannelParams, id: ChannelId) -> u32 {
        if !channel.pending_data.is_empty() {
            self.list(id, channel);
        }
        grant(channel)
    }

    fn list(&mut self, id: ChannelId, channel: &mut ChannelParams) {
        if !channel.scheduled && channel.recipient_window_size > 0 {
            channel.scheduled = true;
            self.ready.push_back(id);
        }
    }

    /// Send queued data, one packet per listed channel in turn, until about
    /// `budget` bytes went out or nothing is left to send. While a key
    /// exchange runs, packets are staged as upstream stages them (see
    /// `Encrypted::flush`). Returns the bytes of data sent.
    pub(crate) fn serve(
        &mut self,
        enc: &mut Encrypted,
        writer: &mut PacketWriter,
        is_rekeying: bool,
        budget: usize,
    ) -> Result<usize, crate::Error> {
        let mut sent = 0usize;
        while sent < budget {
            let Some(id) = self.ready.pop_front() else {
                break;
            };
            match enc.send_queued_packet(writer, id, is_rekeying)? {
                Served::Gone => {}
                Served::Sent { bytes, again } => {
                    sent = sent.saturating_add(bytes);
                    if let Some(channel) = enc.channels.get_mut(&id) {
                        channel.scheduled = again;
                        if again {
                            self.ready.push_back(id);
                        }
                        let credit = grant(channel);
                        if credit > 0 {
                            self.owed.push((id, credit));
                        }
                    }
                }
            }
        }
        Ok(sent)
    }

    /// Credit to add to writers' windows, taken once.
    pub(crate) fn take_owed(&mut self) -> Vec<(ChannelId, u32)> {
        std::mem::take(&mut self.owed)
    }

    /// Hand back the (emptied) vector of [`Outbound::take_owed`], so that
    /// serving does not allocate.
    pub(crate) fn return_owed(&mut self, mut owed: Vec<(ChannelId, u32)>) {
        if self.owed.is_empty() {
            owed.clear();
            self.owed = owed;
        }
    }

    /// Channels listed to send (for tests and debugging).
    #[cfg(test)]
    pub(crate) fn listed(&self) -> usize {
        self.ready.len()
    }
}

/// The send credit a channel's writer may be given now: what keeps queued
/// plus granted data at most [`SEND_QUEUE_CREDIT`] and within the peer's
/// window. Records the grant; 0 for a channel without send credit.
pub(crate) fn grant(channel: &mut ChannelParams) -> u32 {
    let queued = channel.queued_len();
    let window = channel.recipient_window_size;
    let Some(outstanding) = channel.send_credit.as_mut() else {
        return 0;
    };
    let claimed = (queued as u64).saturating_add(u64::from(*outstanding));
    let cap = u64::from(window.min(SEND_QUEUE_CREDIT));
    let more = u32::try_from(cap.saturating_sub(claimed)).unwrap_or(0);
    *outstanding = outstanding.saturating_add(more);
    more
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::tests::{clear_packets, test_encrypted, test_ready_channel};

    fn credited(id: u32, window: u32) -> ChannelParams {
        let mut channel = test_ready_channel(ChannelId(id), 100 + id);
        channel.recipient_window_size = window;
        channel.recipient_maximum_packet_size = 32 * 1024;
        channel.send_credit = Some(0);
        channel
    }

    /// The recipient channel of each CHANNEL_DATA packet written, with its
    /// payload length.
    fn data_packets(writer: &mut PacketWriter) -> Vec<(u32, usize)> {
        clear_packets(&writer.buffer().buffer)
            .into_iter()
            .filter(|p| p.first() == Some(&crate::msg::CHANNEL_DATA))
            .map(|p| {
                let recipient = u32::from_be_bytes([p[1], p[2], p[3], p[4]]);
                let len = u32::from_be_bytes([p[5], p[6], p[7], p[8]]) as usize;
                (recipient, len)
            })
            .collect()
    }

    #[test]
    fn a_small_write_goes_out_after_at_most_one_packet_of_a_busy_channel() {
        let mut enc = test_encrypted();
        let bulk = ChannelId(1);
        let small = ChannelId(2);
        enc.channels.insert(bulk, credited(1, 2 << 20));
        enc.channels.insert(small, credited(2, 2 << 20));
        let mut out = Outbound::default();
        // The bulk channel's writer queued four packets' worth first.
        for _ in 0..4 {
            out.queue(&mut enc, bulk, Bytes::from(vec![7u8; 32 * 1024]), None);
        }
        out.queue(&mut enc, small, Bytes::from_static(b"k"), None);
        let mut writer = PacketWriter::clear();
        let sent = out
            .serve(&mut enc, &mut writer, false, usize::MAX)
            .unwrap();
        assert_eq!(sent, 4 * 32 * 1024 + 1);
        assert_eq!(
            data_packets(&mut writer),
            vec![(101, 32768), (102, 1), (101, 32768), (101, 32768), (101, 32768)],
        );
    }

    #[test]
    fn busy_channels_take_turns_one_packet_each() {
        let mut enc = test_encrypted();
        let mut out = Outbound::default();
        for id in 1..=3 {
            enc.channels.insert(ChannelId(id), credited(id, 2 << 20));
        }
        for id in 1..=3 {
            out.queue(
                &mut enc,
                ChannelId(id),
                Bytes::from(vec![1u8; 70 * 1024]),
                None,
            );
        }
        let mut writer = PacketWriter::clear();
        out.serve(&mut enc, &mut writer, false, usize::MAX)
            .unwrap();
        let order: Vec<u32> = data_packets(&mut writer).iter().map(|p| p.0).collect();
        assert_eq!(order, vec![101, 102, 103, 101, 102, 103, 101, 102, 103]);
        assert_eq!(out.listed(), 0);
    }

    #[test]
    fn serving_stops_at_the_budget_and_resumes_where_it_stopped() {
        let mut enc = test_encrypted();
        let mut out = Outbound::default();
        for id in 1..=2 {
            enc.channels.insert(ChannelId(id), credited(id, 2 << 20));
            out.queue(
                &mut enc,
                ChannelId(id),
                Bytes::from(vec![1u8; 64 * 1024]),
                None,
            );
        }
        let mut writer = PacketWriter::clear();
        // One packet fills the budget.
        assert_eq!(out.serve(&mut enc, &mut writer, false, 1).unwrap(), 32768);
        assert_eq!(out.serve(&mut enc, &mut writer, false, 1).unwrap(), 32768);
        out.serve(&mut enc, &mut writer, false, usize::MAX)
            .unwrap();
        let order: Vec<u32> = data_packets(&mut writer).iter().map(|p| p.0).collect();
        assert_eq!(order, vec![101, 102, 101, 102]);
    }

    #[test]
    fn a_channel_without_window_waits_for_the_adjustment() {
        let mut enc = test_encrypted();
        let mut out = Outbound::default();
        let id = ChannelId(1);
        enc.channels.insert(id, credited(1, 1000));
        out.queue(&mut enc, id, Bytes::from(vec![1u8; 3000]), None);
        let mut writer = PacketWriter::clear();
        assert_eq!(
            out.serve(&mut enc, &mut writer, false, usize::MAX)
                .unwrap(),
            1000
        );
        assert_eq!(out.listed(), 0, "no window: not listed");
        let channel = enc.channels.get_mut(&id).unwrap();
        channel.recipient_window_size += 5000;
        out.window_adjusted(channel, id);
        assert_eq!(
            out.serve(&mut enc, &mut writer, false, usize::MAX)
                .unwrap(),
            2000
        );
        assert_eq!(data_packets(&mut writer), vec![(101, 1000), (101, 2000)]);
    }

    #[test]
    fn send_credit_keeps_queued_and_granted_data_within_the_bound_and_the_window() {
        let mut enc = test_encrypted();
        let mut out = Outbound::default();
        let id = ChannelId(1);
        enc.channels.insert(id, credited(1, 2 << 20));
        // At the open: the bound, not the peer's 2 MiB window.
        let first = grant(enc.channels.get_mut(&id).unwrap());
        assert_eq!(first, SEND_QUEUE_CREDIT);
        // The writer uses it all: nothing more until some of it is sent.
        out.queue(
            &mut enc,
            id,
            Bytes::from(vec![1u8; SEND_QUEUE_CREDIT as usize]),
            None,
        );
        assert_eq!(grant(enc.channels.get_mut(&id).unwrap()), 0);
        // One packet sent: one packet's worth of credit back.
        let mut writer = PacketWriter::clear();
        out.serve(&mut enc, &mut writer, false, 1).unwrap();
        assert_eq!(out.take_owed(), vec![(id, 32768)]);
        // A small peer window caps the credit below the bound.
        let small = ChannelId(2);
        enc.channels.insert(small, credited(2, 5000));
        assert_eq!(grant(enc.channels.get_mut(&small).unwrap()), 5000);
    }

    #[test]
    fn eof_and_close_follow_the_last_queued_packet() {
        let mut enc = test_encrypted();
        let mut out = Outbound::default();
        let id = ChannelId(1);
        enc.channels.insert(id, credited(1, 2 << 20));
        out.queue(&mut enc, id, Bytes::from(vec![1u8; 40_000]), None);
        enc.eof(id).unwrap();
        enc.close(id).unwrap();
        assert!(enc.write.is_empty(), "EOF and CLOSE wait behind the data");
        let mut writer = PacketWriter::clear();
        out.serve(&mut enc, &mut writer, false, usize::MAX)
            .unwrap();
        enc.flush(&crate::Limits::default(), &mut writer, false)
            .unwrap();
        let types: Vec<u8> = clear_packets(&writer.buffer().buffer)
            .iter()
            .map(|p| p[0])
            .collect();
        assert_eq!(
            types,
            vec![
                crate::msg::CHANNEL_DATA,
                crate::msg::CHANNEL_DATA,
                crate::msg::CHANNEL_EOF,
                crate::msg::CHANNEL_CLOSE
            ]
        );
        assert!(!enc.channels.contains_key(&id));
    }
}
