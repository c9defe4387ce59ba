//! (nodetunnel patch, feature `hostile-peer`, test-only) The client's
//! dispatch of decrypted packets after authentication, driven without a
//! network, for fuzzing: what a hostile server can make the client do once
//! the transport is up.

use std::collections::HashMap;
use std::num::Wrapping;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc::{channel, unbounded_channel};

use super::{Config, Handler, Session, reply};
use crate::cert::PublicKeyOrCertificate;
use crate::channels::{ChannelMsg, ChannelRef, ChannelSink};
use crate::compression::{Compression, Decompress};
use crate::kex::{KEXES, NONE};
use crate::session::{CommonSession, Encrypted, EncryptedState, Exchange};
use crate::sshbuffer::{IncomingSshPacket, PacketWriter};
use crate::{ChannelId, ChannelParams, CryptoVec, cipher, mac};

/// The receive window of the fuzzed session's channels.
pub const WINDOW: u32 = 64 * 1024;

/// The channels the fuzzed session has: 1 and 2 confirmed, 3 opened but not
/// confirmed yet; each with a sink.
pub const CHANNELS: [u32; 3] = [1, 2, 3];

/// What [`dispatch_authenticated`] saw.
#[derive(Debug, Default, Clone)]
pub struct DispatchReport {
    /// Packets handled before the session ended (all, if it did not).
    pub handled: usize,
    /// The error that ended the session, if one did.
    pub error: Option<String>,
    /// Bytes of data (and extended data) delivered to each channel of
    /// [`CHANNELS`]; nothing is consumed, so each must stay within
    /// [`WINDOW`].
    pub delivered: [usize; 3],
    /// `ChannelMsg::WindowExceeded` seen by each channel.
    pub window_exceeded: [usize; 3],
}

struct CountingSink {
    index: usize,
    report: Arc<Mutex<DispatchReport>>,
}

impl ChannelSink for CountingSink {
    fn deliver(&self, msg: ChannelMsg) {
        let Ok(mut report) = self.report.lock() else {
            return;
        };
        match msg {
            ChannelMsg::Data { data } | ChannelMsg::ExtendedData { data, .. } => {
                report.delivered[self.index] += data.len();
            }
            ChannelMsg::WindowExceeded { .. } => report.window_exceeded[self.index] += 1,
            _ => {}
        }
    }

    fn detached(&self) {}
}

struct FuzzHandler;

impl Handler for FuzzHandler {
    type Error = crate::Error;

    async fn check_server_key(&mut self, _: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

/// Feed `packets` (decrypted payloads: message type first) to an
/// authenticated client session, configured as nodetunnel configures it
/// (windows re-opened on consumption), one after the other, as its session
/// loop does, until one ends the session.
pub fn dispatch_authenticated(packets: &[&[u8]]) -> DispatchReport {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return DispatchReport::default();
    };
    runtime.block_on(run(packets))
}

async fn run(packets: &[&[u8]]) -> DispatchReport {
    let config = Arc::new(Config {
        window_size: WINDOW,
        adjust_window_on_consume: true,
        ..Config::default()
    });
    let (_sender, receiver) = channel(config.channel_buffer_size);
    let (reply_sender, _replies) = unbounded_channel();
    let mut channels = HashMap::new();
    let report = Arc::new(Mutex::new(DispatchReport::default()));
    let mut refs = HashMap::new();
    let mut queues = Vec::new();
    for (index, number) in CHANNELS.into_iter().enumerate() {
        let id = ChannelId(number);
        channels.insert(
            id,
            ChannelParams {
                recipient_channel: 100 + number,
                sender_channel: id,
                recipient_window_size: WINDOW,
                sender_window_size: WINDOW,
                recipient_maximum_packet_size: 32768,
                sender_maximum_packet_size: 32768,
                confirmed: number != 3,
                wants_reply: false,
                pending_data: std::collections::VecDeque::new(),
                pending_eof: false,
                pending_close: false,
                consumed: 0,
            },
        );
        let (queue, rx) = channel(16);
        queues.push(rx);
        let sink = Arc::new(CountingSink {
            index,
            report: report.clone(),
        });
        refs.insert(id, ChannelRef::with_sink(queue, sink));
    }
    let mut session = Session::new(
        config.window_size,
        CommonSession {
            auth_user: "fuzz".to_owned(),
            auth_attempts: 0,
            auth_method: None,
            remote_to_local: Box::new(cipher::clear::Key),
            encrypted: Some(Encrypted {
                state: EncryptedState::Authenticated,
                exchange: Some(Exchange::default()),
                kex: match KEXES.get(&NONE) {
                    Some(kex) => kex.make(),
                    None => return DispatchReport::default(),
                },
                key: 0,
                client_mac: mac::NONE,
                server_mac: mac::NONE,
                session_id: CryptoVec::from(&b"fuzz-session-id"[..]),
                channels,
                last_channel_id: Wrapping(3),
                write: Vec::new(),
                write_cursor: 0,
                last_rekey: russh_util::time::Instant::now(),
                server_compression: Compression::None,
                client_compression: Compression::None,
                decompress: Decompress::None,
                rekey_wanted: false,
                received_extensions: Vec::new(),
                extension_info_awaiters: HashMap::new(),
            }),
            config,
            wants_reply: false,
            disconnected: false,
            buffer: Vec::new(),
            strict_kex: true,
            alive_timeouts: 0,
            received_data: false,
            remote_sshid: b"SSH-2.0-fuzz".to_vec(),
            packet_writer: PacketWriter::clear(),
        },
        receiver,
        reply_sender,
    );
    session.channels = refs;
    let mut handler = FuzzHandler;
    let mut handled = 0;
    let mut error = None;
    for (seqn, payload) in packets.iter().enumerate() {
        if payload.is_empty() {
            continue;
        }
        let mut pkt = IncomingSshPacket {
            buffer: bytes::Bytes::copy_from_slice(payload),
            seqn: Wrapping(seqn as u32 + 10),
        };
        let result = if payload.first() == Some(&crate::msg::DISCONNECT) {
            session.process_disconnect(&pkt).map(|_| ())
        } else {
            reply(&mut session, &mut handler, &mut None, &mut pkt).await
        };
        if let Err(e) = result.and_then(|()| session.flush()) {
            error = Some(e.to_string());
            break;
        }
        // What the session wrote goes nowhere (as to a peer that reads).
        session.common.packet_writer = PacketWriter::clear();
        handled += 1;
        if session.common.disconnected {
            break;
        }
    }
    drop(queues);
    let mut out = report.lock().map(|r| r.clone()).unwrap_or_default();
    out.handled = handled;
    out.error = error;
    out
}
