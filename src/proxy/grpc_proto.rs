//! The konnectivity client protocol's messages and gRPC's message framing,
//! as the gRPC front door ([`super::grpc`]) and its test client use them.
//!
//! The messages are those of `proto/konnectivity-client.proto` (the
//! konnectivity-client's `client.proto`), written by hand with prost's
//! derive macros so that the build needs no `protoc`; a test checks every
//! field number and wire type against that file.
//!
//! gRPC frames each message with 5 bytes: a compression flag (0: nodetunnel
//! neither sends nor accepts compressed messages) and the message length
//! (u32, big-endian). [`MessageDecoder`] reassembles messages from the
//! HTTP/2 DATA frames they arrive in, bounded by [`MAX_MESSAGE_BYTES`].

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;

/// The gRPC method kube-apiserver calls (no proto package).
pub const PROXY_METHOD_PATH: &str = "/ProxyService/Proxy";

/// Largest message accepted from a client (gRPC's own default receive
/// limit is 4 MiB; kube-apiserver's DATA packets are one `Write` each,
/// tens of KiB).
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// `PacketType`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum PacketType {
    /// Dial a destination (`DialRequest`).
    DialReq = 0,
    /// The dial's answer (`DialResponse`).
    DialRsp = 1,
    /// Close a connection (`CloseRequest`).
    CloseReq = 2,
    /// A connection is closed (`CloseResponse`).
    CloseRsp = 3,
    /// Bytes of a connection (`Data`).
    Data = 4,
    /// Cancel a pending dial (`CloseDial`).
    DialCls = 5,
    /// The agent is draining (`Drain`; agent to server only, ignored).
    Drain = 6,
}

/// `Packet`: one message of the `Proxy` stream.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Packet {
    /// The packet's [`PacketType`].
    #[prost(enumeration = "PacketType", tag = "1")]
    pub r#type: i32,
    /// The payload matching the type.
    #[prost(oneof = "Payload", tags = "2, 3, 4, 5, 6, 7, 8")]
    pub payload: Option<Payload>,
}

/// `Packet.payload`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Payload {
    /// `dialRequest = 2`.
    #[prost(message, tag = "2")]
    DialRequest(DialRequest),
    /// `dialResponse = 3`.
    #[prost(message, tag = "3")]
    DialResponse(DialResponse),
    /// `data = 4`.
    #[prost(message, tag = "4")]
    Data(Data),
    /// `closeRequest = 5`.
    #[prost(message, tag = "5")]
    CloseRequest(CloseRequest),
    /// `closeResponse = 6`.
    #[prost(message, tag = "6")]
    CloseResponse(CloseResponse),
    /// `closeDial = 7`.
    #[prost(message, tag = "7")]
    CloseDial(CloseDial),
    /// `drain = 8`.
    #[prost(message, tag = "8")]
    Drain(Drain),
}

/// `DialRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DialRequest {
    /// `protocol = 1`: "tcp".
    #[prost(string, tag = "1")]
    pub protocol: String,
    /// `address = 2`: `host:port`.
    #[prost(string, tag = "2")]
    pub address: String,
    /// `random = 3`: the client's id of the dial.
    #[prost(int64, tag = "3")]
    pub random: i64,
}

/// `DialResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DialResponse {
    /// `error = 1`: why the dial failed (empty on success).
    #[prost(string, tag = "1")]
    pub error: String,
    /// `connectID = 2`: the connection's id (non-zero on success).
    #[prost(int64, tag = "2")]
    pub connect_id: i64,
    /// `random = 3`: the dial's `random`.
    #[prost(int64, tag = "3")]
    pub random: i64,
}

/// `CloseRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CloseRequest {
    /// `connectID = 1`.
    #[prost(int64, tag = "1")]
    pub connect_id: i64,
}

/// `CloseResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CloseResponse {
    /// `error = 1`: why the connection ended, if not cleanly.
    #[prost(string, tag = "1")]
    pub error: String,
    /// `connectID = 2`.
    #[prost(int64, tag = "2")]
    pub connect_id: i64,
}

/// `CloseDial`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CloseDial {
    /// `random = 1`: the dial to cancel.
    #[prost(int64, tag = "1")]
    pub random: i64,
}

/// `Drain` (no fields).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Drain {}

/// `Data`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Data {
    /// `connectID = 1`.
    #[prost(int64, tag = "1")]
    pub connect_id: i64,
    /// `error = 2`.
    #[prost(string, tag = "2")]
    pub error: String,
    /// `data = 3`.
    #[prost(bytes = "bytes", tag = "3")]
    pub data: Bytes,
}

impl Packet {
    /// A `DIAL_REQ`.
    pub fn dial_request(address: &str, random: i64) -> Packet {
        Packet {
            r#type: PacketType::DialReq as i32,
            payload: Some(Payload::DialRequest(DialRequest {
                protocol: "tcp".to_string(),
                address: address.to_string(),
                random,
            })),
        }
    }

    /// A `DIAL_RSP`: `connect_id` on success, `error` on failure.
    pub fn dial_response(random: i64, connect_id: i64, error: String) -> Packet {
        Packet {
            r#type: PacketType::DialRsp as i32,
            payload: Some(Payload::DialResponse(DialResponse {
                error,
                connect_id,
                random,
            })),
        }
    }

    /// A `DATA` packet.
    pub fn data(connect_id: i64, data: Bytes) -> Packet {
        Packet {
            r#type: PacketType::Data as i32,
            payload: Some(Payload::Data(Data {
                connect_id,
                error: String::new(),
                data,
            })),
        }
    }

    /// A `CLOSE_REQ`.
    pub fn close_request(connect_id: i64) -> Packet {
        Packet {
            r#type: PacketType::CloseReq as i32,
            payload: Some(Payload::CloseRequest(CloseRequest { connect_id })),
        }
    }

    /// A `CLOSE_RSP`, with `error` when the connection did not end cleanly.
    pub fn close_response(connect_id: i64, error: String) -> Packet {
        Packet {
            r#type: PacketType::CloseRsp as i32,
            payload: Some(Payload::CloseResponse(CloseResponse { error, connect_id })),
        }
    }

    /// A `DIAL_CLS`.
    pub fn close_dial(random: i64) -> Packet {
        Packet {
            r#type: PacketType::DialCls as i32,
            payload: Some(Payload::CloseDial(CloseDial { random })),
        }
    }

    /// The packet as one gRPC length-prefixed message.
    pub fn to_grpc_frame(&self) -> Bytes {
        let len = self.encoded_len();
        let mut buf = BytesMut::with_capacity(5 + len);
        buf.put_u8(0);
        // A packet is at most a DATA chunk plus a few bytes: far below 4 GiB.
        buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
        self.encode_raw(&mut buf);
        buf.freeze()
    }
}

/// Why the stream of gRPC messages from a client is unusable.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The compressed flag is set; no compression was negotiated.
    #[error("compressed gRPC messages are not supported (flag {0})")]
    Compressed(u8),
    /// A message beyond [`MAX_MESSAGE_BYTES`].
    #[error("gRPC message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Its announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The message is not a `Packet`.
    #[error("malformed Packet: {0}")]
    Malformed(String),
    /// The stream ended inside a message.
    #[error("the stream ended inside a gRPC message ({0} bytes left over)")]
    Truncated(usize),
}

/// Reassembles gRPC messages from the bytes of a request body.
#[derive(Debug, Default)]
pub struct MessageDecoder {
    buf: BytesMut,
}

impl MessageDecoder {
    /// Append received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete packet, `Ok(None)` if more bytes are needed.
    pub fn next_packet(&mut self) -> Result<Option<Packet>, FrameError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let flag = self.buf[0];
        if flag != 0 {
            return Err(FrameError::Compressed(flag));
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > MAX_MESSAGE_BYTES {
            return Err(FrameError::TooLarge {
                len,
                max: MAX_MESSAGE_BYTES,
            });
        }
        if self.buf.len() < 5 + len {
            self.buf.reserve(5 + len - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(5);
        let message = self.buf.split_to(len).freeze();
        Packet::decode(message)
            .map(Some)
            .map_err(|e| FrameError::Malformed(e.to_string()))
    }

    /// Check that the stream did not end inside a message.
    pub fn finish(&self) -> Result<(), FrameError> {
        match self.buf.len() {
            0 => Ok(()),
            n => Err(FrameError::Truncated(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const PROTO: &str = include_str!("../../proto/konnectivity-client.proto");

    /// `message -> field name -> (number, type)` from the .proto file
    /// (the subset of the grammar it uses).
    fn proto_fields() -> BTreeMap<String, BTreeMap<String, (u32, String)>> {
        let mut out = BTreeMap::new();
        let mut current: Option<String> = None;
        for line in PROTO.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("message ") {
                let name = rest.trim_end_matches('{').trim().to_string();
                out.insert(name.clone(), BTreeMap::new());
                current = Some(name);
                continue;
            }
            if line.starts_with("enum ") || line.starts_with("service ") {
                current = None;
                continue;
            }
            let Some(message) = &current else { continue };
            let Some((decl, number)) = line.trim_end_matches(';').split_once('=') else {
                continue;
            };
            let words: Vec<&str> = decl.split_whitespace().collect();
            if let [ty, name] = words[..] {
                let number: u32 = number.trim().parse().expect("field number");
                out.get_mut(message)
                    .expect("message")
                    .insert(name.to_string(), (number, ty.to_string()));
            }
        }
        out
    }

    /// `(field number, wire type)` of every top-level field of `bytes`.
    fn tags(mut bytes: &[u8]) -> Vec<(u32, u8)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let key = prost::encoding::decode_varint(&mut bytes).expect("key");
            let wire = (key & 7) as u8;
            out.push(((key >> 3) as u32, wire));
            match wire {
                0 => {
                    prost::encoding::decode_varint(&mut bytes).expect("varint");
                }
                2 => {
                    let len = prost::encoding::decode_varint(&mut bytes).expect("len") as usize;
                    bytes = &bytes[len..];
                }
                other => panic!("unexpected wire type {other}"),
            }
        }
        out
    }

    fn wire_type(proto_type: &str) -> u8 {
        match proto_type {
            "int64" | "PacketType" => 0,
            _ => 2,
        }
    }

    /// Every field of `message` in the .proto, with every field set in
    /// `encoded`: same numbers, same wire types.
    fn assert_matches_proto(message: &str, encoded: &[u8]) {
        let fields = proto_fields();
        let want: Vec<(u32, u8)> = fields[message]
            .values()
            .map(|(n, ty)| (*n, wire_type(ty)))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut got = tags(encoded);
        got.sort_unstable();
        assert_eq!(got, want, "{message}: field numbers and wire types");
    }

    #[test]
    fn hand_written_messages_match_the_proto_file() {
        let dial = DialRequest {
            protocol: "tcp".into(),
            address: "10.0.0.1:10250".into(),
            random: 7,
        };
        assert_matches_proto("DialRequest", &dial.encode_to_vec());
        let rsp = DialResponse {
            error: "e".into(),
            connect_id: 1,
            random: 2,
        };
        assert_matches_proto("DialResponse", &rsp.encode_to_vec());
        assert_matches_proto(
            "CloseRequest",
            &CloseRequest { connect_id: 3 }.encode_to_vec(),
        );
        let close = CloseResponse {
            error: "e".into(),
            connect_id: 3,
        };
        assert_matches_proto("CloseResponse", &close.encode_to_vec());
        assert_matches_proto("CloseDial", &CloseDial { random: 4 }.encode_to_vec());
        assert_matches_proto("Drain", &Drain {}.encode_to_vec());
        let data = Data {
            connect_id: 5,
            error: "e".into(),
            data: Bytes::from_static(b"x"),
        };
        assert_matches_proto("Data", &data.encode_to_vec());

        // Packet: `type` and each member of the oneof by its number.
        let fields = proto_fields();
        let packet = &fields["Packet"];
        assert_eq!(packet["type"], (1, "PacketType".to_string()));
        let members: [(&str, Payload); 7] = [
            ("dialRequest", Payload::DialRequest(dial)),
            ("dialResponse", Payload::DialResponse(rsp)),
            ("data", Payload::Data(data)),
            (
                "closeRequest",
                Payload::CloseRequest(CloseRequest { connect_id: 3 }),
            ),
            ("closeResponse", Payload::CloseResponse(close)),
            ("closeDial", Payload::CloseDial(CloseDial { random: 4 })),
            ("drain", Payload::Drain(Drain {})),
        ];
        for (name, payload) in members {
            let p = Packet {
                r#type: PacketType::Drain as i32,
                payload: Some(payload),
            };
            let (number, ty) = &packet[name];
            assert_eq!(wire_type(ty), 2);
            assert_eq!(
                tags(&p.encode_to_vec()),
                vec![(1, 0), (*number, 2)],
                "{name}"
            );
        }
    }

    #[test]
    fn packet_type_numbers_match_the_proto_file() {
        let body = PROTO
            .split("enum PacketType {")
            .nth(1)
            .and_then(|rest| rest.split('}').next())
            .expect("enum PacketType in the proto file");
        let ours = [
            ("DIAL_REQ", PacketType::DialReq),
            ("DIAL_RSP", PacketType::DialRsp),
            ("CLOSE_REQ", PacketType::CloseReq),
            ("CLOSE_RSP", PacketType::CloseRsp),
            ("DATA", PacketType::Data),
            ("DIAL_CLS", PacketType::DialCls),
            ("DRAIN", PacketType::Drain),
        ];
        let mut seen = 0;
        for line in body.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let (name, number) = line
                .trim_end_matches(';')
                .split_once('=')
                .expect("NAME = N;");
            let number: i32 = number.trim().parse().expect("number");
            let (_, ty) = ours
                .iter()
                .find(|(n, _)| *n == name.trim())
                .unwrap_or_else(|| panic!("{name} has no PacketType variant"));
            assert_eq!(*ty as i32, number, "{name}");
            seen += 1;
        }
        assert_eq!(seen, ours.len());
    }

    /// Known bytes, worked out by hand from the protobuf encoding rules: a
    /// DIAL_REQ as konnectivity-client sends it, framed.
    #[test]
    fn a_dial_request_encodes_to_known_bytes() {
        let frame = Packet::dial_request("a:1", 1).to_grpc_frame();
        let message: &[u8] = &[
            0x12, 0x0c, // field 2 (dialRequest), length 12
            0x0a, 0x03, b't', b'c', b'p', // protocol = "tcp"
            0x12, 0x03, b'a', b':', b'1', // address = "a:1"
            0x18, 0x01, // random = 1
        ];
        let mut want = vec![0u8, 0, 0, 0, message.len() as u8];
        want.extend_from_slice(message);
        assert_eq!(&frame[..], &want[..]);
        // A negative int64 takes 10 bytes (two's complement varint).
        let rsp = Packet::dial_response(-1, 0, String::new()).encode_to_vec();
        assert_eq!(
            rsp,
            [
                0x08, 0x01, 0x1a, 0x0b, 0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                0x01
            ]
        );
    }

    #[test]
    fn the_decoder_reassembles_split_messages_and_bounds_them() {
        let a = Packet::data(1, Bytes::from_static(b"hello")).to_grpc_frame();
        let b = Packet::close_request(1).to_grpc_frame();
        let mut all = a.to_vec();
        all.extend_from_slice(&b);
        let mut decoder = MessageDecoder::default();
        let mut got = Vec::new();
        for byte in all {
            decoder.push(&[byte]);
            while let Some(p) = decoder.next_packet().expect("valid") {
                got.push(p);
            }
        }
        assert_eq!(
            got,
            vec![
                Packet::data(1, Bytes::from_static(b"hello")),
                Packet::close_request(1)
            ]
        );
        decoder.finish().expect("nothing left over");

        let mut big = MessageDecoder::default();
        big.push(&[0, 0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(
            big.next_packet(),
            Err(FrameError::TooLarge { .. })
        ));
        let mut compressed = MessageDecoder::default();
        compressed.push(&[1, 0, 0, 0, 0]);
        assert_eq!(compressed.next_packet(), Err(FrameError::Compressed(1)));
        let mut cut = MessageDecoder::default();
        cut.push(&[0, 0, 0, 0, 9, 1]);
        assert_eq!(cut.next_packet(), Ok(None));
        assert_eq!(cut.finish(), Err(FrameError::Truncated(6)));
    }
}
