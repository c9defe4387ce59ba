//! SOCKS5 (RFC 1928) `CONNECT` without authentication.
//!
//! The wire format is parsed by pure functions over byte slices
//! ([`parse_greeting`], [`parse_request`]) that tell an incomplete message
//! from an invalid one, so they can be fuzzed. `serve` drives one
//! connection:
//!
//! 1. Greeting: version 5 and a method list. Only 0x00 (no authentication)
//!    is accepted; otherwise the reply is `05 FF` and the connection closes.
//! 2. Request: `CONNECT` only (others: reply 0x07), address type IPv4, IPv6
//!    or domain name (others: 0x08); a domain must be 1..=255 bytes
//!    naming a host: ASCII letters, digits, `-`, `.`, `_`, or an IP
//!    literal (else 0x01). The reserved byte is ignored.
//! 3. The dial: on failure the reply is [`DialError::socks5_reply`](crate::dial::DialError::socks5_reply), on
//!    success 0x00 with `BND.ADDR` 0.0.0.0:0, then the tunnel is spliced
//!    (`relay`: a tunnel that is cut resets the client connection).
//!    Bytes the client sent after the request are forwarded first.
//!
//! A wrong version byte closes the connection without a reply. Steps 1-2
//! are bounded by `header_read_timeout`. Over `max_connections`, a client
//! gets a normal negotiation and then reply 0x01 (general failure).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::audit_trail::Asker;
use super::relay::{relay, ClientIo};
use super::{conn_span, Context, ListenerKind};
use crate::dial::{Destination, Dialer, Host};

/// The protocol version byte.
pub const VERSION: u8 = 0x05;
/// Method "no authentication required".
pub const METHOD_NO_AUTH: u8 = 0x00;
/// Method reply "no acceptable methods".
pub const METHOD_NONE_ACCEPTABLE: u8 = 0xFF;
/// Command `CONNECT`.
pub const CMD_CONNECT: u8 = 0x01;
/// Address type IPv4.
pub const ATYP_IPV4: u8 = 0x01;
/// Address type domain name.
pub const ATYP_DOMAIN: u8 = 0x03;
/// Address type IPv6.
pub const ATYP_IPV6: u8 = 0x04;

/// Reply codes (the `REP` field).
pub mod reply {
    /// Succeeded.
    pub const SUCCEEDED: u8 = 0x00;
    /// General SOCKS server failure.
    pub const GENERAL_FAILURE: u8 = 0x01;
    /// Connection not allowed by ruleset.
    pub const NOT_ALLOWED: u8 = 0x02;
    /// Network unreachable.
    pub const NETWORK_UNREACHABLE: u8 = 0x03;
    /// Host unreachable.
    pub const HOST_UNREACHABLE: u8 = 0x04;
    /// Connection refused.
    pub const CONNECTION_REFUSED: u8 = 0x05;
    /// TTL expired.
    pub const TTL_EXPIRED: u8 = 0x06;
    /// Command not supported.
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x07;
    /// Address type not supported.
    pub const ADDRESS_TYPE_NOT_SUPPORTED: u8 = 0x08;
}

/// The outcome of parsing a message that may not have fully arrived.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed<T> {
    /// The message, and how many bytes of the input it took.
    Complete(T, usize),
    /// More bytes are needed.
    Incomplete,
}

/// The client's greeting: which authentication methods it offers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Greeting {
    /// Offered methods, in the client's order.
    pub methods: Vec<u8>,
}

impl Greeting {
    /// Whether the client offers "no authentication", the one method we
    /// accept.
    pub fn offers_no_auth(&self) -> bool {
        self.methods.contains(&METHOD_NO_AUTH)
    }
}

/// A `CONNECT` request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectRequest {
    /// Where to connect: IP literals in canonical form (IPv4-mapped IPv6 as
    /// IPv4), names in lower case.
    pub destination: Destination,
}

/// Why a greeting or request is invalid.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Socks5Error {
    /// The version byte is not 5 (no reply is possible).
    #[error("unsupported SOCKS version {0:#04x}")]
    BadVersion(u8),
    /// `BIND`, `UDP ASSOCIATE` or an unknown command.
    #[error("unsupported command {0:#04x}")]
    UnsupportedCommand(u8),
    /// An unknown address type.
    #[error("unsupported address type {0:#04x}")]
    UnsupportedAddressType(u8),
    /// A domain name that is empty, not UTF-8, or not a host name.
    #[error("invalid domain name: {0}")]
    InvalidDomain(&'static str),
    /// Destination port 0, which no TCP connection can reach (HTTP CONNECT
    /// refuses it too).
    #[error("destination port 0")]
    ZeroPort,
}

impl Socks5Error {
    /// The reply code to answer with, if any.
    pub fn reply_code(&self) -> Option<u8> {
        match self {
            Socks5Error::BadVersion(_) => None,
            Socks5Error::UnsupportedCommand(_) => Some(reply::COMMAND_NOT_SUPPORTED),
            Socks5Error::UnsupportedAddressType(_) => Some(reply::ADDRESS_TYPE_NOT_SUPPORTED),
            Socks5Error::InvalidDomain(_) => Some(reply::GENERAL_FAILURE),
            Socks5Error::ZeroPort => Some(reply::NOT_ALLOWED),
        }
    }
}

/// Parse the greeting `VER NMETHODS METHODS...` at the start of `buf`.
pub fn parse_greeting(buf: &[u8]) -> Result<Parsed<Greeting>, Socks5Error> {
    let Some(&version) = buf.first() else {
        return Ok(Parsed::Incomplete);
    };
    if version != VERSION {
        return Err(Socks5Error::BadVersion(version));
    }
    let Some(&count) = buf.get(1) else {
        return Ok(Parsed::Incomplete);
    };
    let end = 2 + usize::from(count);
    match buf.get(2..end) {
        Some(methods) => Ok(Parsed::Complete(
            Greeting {
                methods: methods.to_vec(),
            },
            end,
        )),
        None => Ok(Parsed::Incomplete),
    }
}

/// Parse the request `VER CMD RSV ATYP DST.ADDR DST.PORT` at the start of
/// `buf`. Only `CONNECT` parses; the other commands are errors.
pub fn parse_request(buf: &[u8]) -> Result<Parsed<ConnectRequest>, Socks5Error> {
    let Some(&version) = buf.first() else {
        return Ok(Parsed::Incomplete);
    };
    if version != VERSION {
        return Err(Socks5Error::BadVersion(version));
    }
    let Some(&command) = buf.get(1) else {
        return Ok(Parsed::Incomplete);
    };
    if command != CMD_CONNECT {
        return Err(Socks5Error::UnsupportedCommand(command));
    }
    // buf[2] is RSV, ignored.
    let Some(&atyp) = buf.get(3) else {
        return Ok(Parsed::Incomplete);
    };
    let (host, port_at) = match atyp {
        ATYP_IPV4 => match buf.get(4..8).and_then(|b| <[u8; 4]>::try_from(b).ok()) {
            Some(octets) => (Host::from(IpAddr::from(Ipv4Addr::from(octets))), 8),
            None => return Ok(Parsed::Incomplete),
        },
        ATYP_IPV6 => match buf.get(4..20).and_then(|b| <[u8; 16]>::try_from(b).ok()) {
            Some(octets) => (Host::from(IpAddr::from(Ipv6Addr::from(octets))), 20),
            None => return Ok(Parsed::Incomplete),
        },
        ATYP_DOMAIN => {
            let Some(&len) = buf.get(4) else {
                return Ok(Parsed::Incomplete);
            };
            if len == 0 {
                return Err(Socks5Error::InvalidDomain("empty"));
            }
            let end = 5 + usize::from(len);
            let Some(raw) = buf.get(5..end) else {
                return Ok(Parsed::Incomplete);
            };
            let name =
                std::str::from_utf8(raw).map_err(|_| Socks5Error::InvalidDomain("not UTF-8"))?;
            // Some clients send IP literals as names; `Host::parse` turns
            // those into canonical IP addresses.
            let host = Host::parse(name)
                .map_err(|_| Socks5Error::InvalidDomain("not a host name or IP address"))?;
            (host, end)
        }
        other => return Err(Socks5Error::UnsupportedAddressType(other)),
    };
    let Some(port) = buf.get(port_at..port_at + 2) else {
        return Ok(Parsed::Incomplete);
    };
    let port = u16::from_be_bytes([port[0], port[1]]);
    if port == 0 {
        return Err(Socks5Error::ZeroPort);
    }
    Ok(Parsed::Complete(
        ConnectRequest {
            destination: Destination { host, port },
        },
        port_at + 2,
    ))
}

/// A reply with code `rep` and `BND.ADDR` 0.0.0.0:0.
pub fn reply_bytes(rep: u8) -> [u8; 10] {
    [VERSION, rep, 0x00, ATYP_IPV4, 0, 0, 0, 0, 0, 0]
}

/// The metrics `code` label of a reply.
fn code_label(rep: u8) -> String {
    format!("socks5_{rep:#04x}")
}

/// Room for the longest greeting (257 bytes) or request (262 bytes), plus
/// anything the client sends early.
const NEGOTIATION_BUFFER: usize = 1024;

/// Why the negotiation ended without a destination.
#[derive(Debug)]
enum NegotiationError {
    Io(std::io::Error),
    Eof,
    Protocol(Socks5Error),
    /// Already answered `05 FF`.
    NoAcceptableMethod,
    /// The buffer filled up without a complete message (cannot happen with
    /// valid parsers; guards against looping).
    Overflow,
}

impl From<std::io::Error> for NegotiationError {
    fn from(error: std::io::Error) -> Self {
        NegotiationError::Io(error)
    }
}

/// Buffered input of one negotiation.
struct Input {
    buf: Vec<u8>,
    len: usize,
}

impl Input {
    /// Parse the next message with `parse`, reading more as needed.
    async fn next<I, T>(
        &mut self,
        io: &mut I,
        parse: fn(&[u8]) -> Result<Parsed<T>, Socks5Error>,
    ) -> Result<T, NegotiationError>
    where
        I: AsyncRead + Unpin,
    {
        loop {
            match parse(&self.buf[..self.len]).map_err(NegotiationError::Protocol)? {
                Parsed::Complete(message, used) => {
                    self.buf.copy_within(used..self.len, 0);
                    self.len -= used;
                    return Ok(message);
                }
                Parsed::Incomplete => {
                    // Messages are shorter than the buffer, so a full buffer
                    // always parses; this guard keeps a bug from looping.
                    let free = self.buf.get_mut(self.len..).filter(|b| !b.is_empty());
                    let Some(free) = free else {
                        return Err(NegotiationError::Overflow);
                    };
                    match io.read(free).await? {
                        0 => return Err(NegotiationError::Eof),
                        n => self.len += n,
                    }
                }
            }
        }
    }
}

/// Greeting, method selection and request. Returns the destination and any
/// bytes the client sent after the request.
async fn negotiate<I>(io: &mut I) -> Result<(Destination, Vec<u8>), NegotiationError>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let mut input = Input {
        buf: vec![0; NEGOTIATION_BUFFER],
        len: 0,
    };
    let greeting = input.next(io, parse_greeting).await?;
    if !greeting.offers_no_auth() {
        io.write_all(&[VERSION, METHOD_NONE_ACCEPTABLE]).await?;
        io.flush().await?;
        return Err(NegotiationError::NoAcceptableMethod);
    }
    io.write_all(&[VERSION, METHOD_NO_AUTH]).await?;
    io.flush().await?;
    let request = input.next(io, parse_request).await?;
    // Only the bytes sent after the request are kept (usually none: no
    // allocation), not the negotiation buffer, which would otherwise live
    // as long as the connection.
    let early = input.buf[..input.len].to_vec();
    Ok((request.destination, early))
}

/// Send a reply, bounded by `ctx.header_read_timeout`. False if it could
/// not be sent.
async fn send_reply<I, D>(io: &mut I, ctx: &Context<D>, rep: u8) -> bool
where
    I: AsyncWrite + Unpin,
{
    let write = async {
        io.write_all(&reply_bytes(rep)).await?;
        io.flush().await
    };
    matches!(
        tokio::time::timeout(ctx.header_read_timeout, write).await,
        Ok(Ok(()))
    )
}

/// Serve one SOCKS5 connection. `admitted` false means over the connection
/// limit: negotiate, then reply 0x01.
pub(crate) async fn serve<I, D>(mut io: I, ctx: &Context<D>, admitted: bool, asker: Asker)
where
    I: ClientIo,
    D: Dialer,
{
    let started = std::time::Instant::now();
    let listener = ListenerKind::Socks5;
    let label = listener.as_str();
    let negotiated = tokio::time::timeout(ctx.header_read_timeout, negotiate(&mut io)).await;
    let (dest, early) = match negotiated {
        Ok(Ok(negotiated)) => negotiated,
        Err(_) => {
            tracing::debug!("SOCKS5 negotiation timed out");
            return;
        }
        Ok(Err(NegotiationError::Eof)) => {
            tracing::debug!("client closed during SOCKS5 negotiation");
            return;
        }
        Ok(Err(NegotiationError::Overflow)) => {
            ctx.log_refusal("socks5_overflow", || {
                tracing::warn!("SOCKS5 negotiation buffer overflow");
            });
            return;
        }
        Ok(Err(NegotiationError::Io(error))) => {
            tracing::debug!(error = %error, "SOCKS5 negotiation failed");
            return;
        }
        Ok(Err(NegotiationError::NoAcceptableMethod)) => {
            ctx.metrics
                .proxy_request(label, &code_label(METHOD_NONE_ACCEPTABLE));
            ctx.log_refusal("socks5_no_method", || {
                tracing::info!("client offers no acceptable SOCKS5 method");
            });
            return;
        }
        Ok(Err(NegotiationError::Protocol(error))) => {
            asker.refusal(&ctx.audit, None, "bad_request", started);
            if let Some(rep) = error.reply_code() {
                send_reply(&mut io, ctx, rep).await;
                ctx.metrics.proxy_request(label, &code_label(rep));
            }
            ctx.log_refusal("socks5_invalid", || {
                tracing::info!(error = %error, "invalid SOCKS5 request");
            });
            return;
        }
    };
    conn_span::record_dest(&dest);
    if !admitted {
        asker.refusal(&ctx.audit, Some(&dest), "max_connections", started);
        send_reply(&mut io, ctx, reply::GENERAL_FAILURE).await;
        ctx.metrics
            .proxy_request(label, &code_label(reply::GENERAL_FAILURE));
        ctx.log_refusal("max_connections", || {
            tracing::warn!("max_connections reached: refused");
        });
        return;
    }
    let tunnel = match ctx.dial(&dest).await {
        Ok(tunnel) => {
            conn_span::record_tunnel(&tunnel);
            tunnel
        }
        Err(error) => {
            asker.dial_refusal(&ctx.audit, &dest, &error, started);
            conn_span::record_refusal(&error);
            let rep = error.socks5_reply();
            send_reply(&mut io, ctx, rep).await;
            ctx.count_refusal(listener, &code_label(rep));
            ctx.log_refusal(error.reason(), || {
                tracing::info!(error = %error, reply = rep, "SOCKS5 CONNECT refused");
            });
            return;
        }
    };
    let mut audit = asker.open_tunnel(&ctx.audit, &dest, &tunnel);
    if !send_reply(&mut io, ctx, reply::SUCCEEDED).await {
        tracing::debug!("cannot send the SOCKS5 reply");
        audit.ended(crate::audit::End::ClientError, None);
        return;
    }
    ctx.metrics
        .proxy_request(label, &code_label(reply::SUCCEEDED));
    tracing::debug!("tunnel open");
    relay(io, tunnel, &early, ctx.header_read_timeout, audit).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn greeting_incomplete_then_complete() {
        assert_eq!(parse_greeting(&[]), Ok(Parsed::Incomplete));
        assert_eq!(parse_greeting(&[5]), Ok(Parsed::Incomplete));
        assert_eq!(parse_greeting(&[5, 2, 0]), Ok(Parsed::Incomplete));
        let parsed = parse_greeting(&[5, 2, 2, 0, 9]);
        assert_eq!(
            parsed,
            Ok(Parsed::Complete(
                Greeting {
                    methods: vec![2, 0]
                },
                4
            ))
        );
        assert_eq!(
            parse_greeting(&[5, 0]),
            Ok(Parsed::Complete(Greeting { methods: vec![] }, 2))
        );
        assert_eq!(parse_greeting(&[4, 1, 0]), Err(Socks5Error::BadVersion(4)));
    }

    #[test]
    fn requests_of_every_address_type() {
        let v4 = [5, 1, 0, 1, 10, 0, 0, 1, 0x27, 0x1a];
        let parsed = parse_request(&v4);
        let dest = |host: &str, port| Destination {
            host: host.parse().expect("test host"),
            port,
        };
        assert_eq!(
            parsed,
            Ok(Parsed::Complete(
                ConnectRequest {
                    destination: dest("10.0.0.1", 10010)
                },
                10
            ))
        );
        let mut v6 = vec![5, 1, 0, 4];
        v6.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        v6.extend_from_slice(&[0, 80]);
        assert_eq!(
            parse_request(&v6),
            Ok(Parsed::Complete(
                ConnectRequest {
                    destination: dest("::1", 80)
                },
                22
            ))
        );
        let mut name = vec![5, 1, 0, 3, 11];
        name.extend_from_slice(b"Example.COM");
        name.extend_from_slice(&[1, 0]);
        assert_eq!(
            parse_request(&name),
            Ok(Parsed::Complete(
                ConnectRequest {
                    destination: dest("example.com", 256)
                },
                18
            ))
        );
        // Every strict prefix is incomplete.
        for msg in [&v4[..], &v6[..], &name[..]] {
            for end in 0..msg.len() {
                assert_eq!(parse_request(&msg[..end]), Ok(Parsed::Incomplete), "{end}");
            }
        }
    }

    #[test]
    fn invalid_requests() {
        assert_eq!(parse_request(&[4, 1]), Err(Socks5Error::BadVersion(4)));
        assert_eq!(
            parse_request(&[5, 2]),
            Err(Socks5Error::UnsupportedCommand(2))
        );
        assert_eq!(
            parse_request(&[5, 3]),
            Err(Socks5Error::UnsupportedCommand(3))
        );
        assert_eq!(
            parse_request(&[5, 1, 0, 2]),
            Err(Socks5Error::UnsupportedAddressType(2))
        );
        assert_eq!(
            parse_request(&[5, 1, 0, 3, 0, 0, 80]),
            Err(Socks5Error::InvalidDomain("empty"))
        );
        assert!(matches!(
            parse_request(&[5, 1, 0, 3, 2, 0xff, 0xfe, 0, 80]),
            Err(Socks5Error::InvalidDomain(_))
        ));
        assert!(matches!(
            parse_request(&[5, 1, 0, 3, 3, b'a', b':', b'b', 0, 80]),
            Err(Socks5Error::InvalidDomain(_))
        ));
        // Not ASCII (fuzz/regressions/socks5/).
        let mut name = vec![5, 1, 0, 3, 2];
        name.extend_from_slice("\u{23a}".as_bytes());
        name.extend_from_slice(&[0, 80]);
        assert!(matches!(
            parse_request(&name),
            Err(Socks5Error::InvalidDomain(_))
        ));
        assert_eq!(Socks5Error::BadVersion(4).reply_code(), None);
        assert_eq!(Socks5Error::UnsupportedCommand(2).reply_code(), Some(7));
        assert_eq!(Socks5Error::UnsupportedAddressType(9).reply_code(), Some(8));
    }

    proptest! {
        #[test]
        fn parsers_never_panic_and_stay_in_bounds(buf in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(Parsed::Complete(_, used)) = parse_greeting(&buf) {
                prop_assert!(used <= buf.len());
            }
            if let Ok(Parsed::Complete(_, used)) = parse_request(&buf) {
                prop_assert!(used <= buf.len());
            }
        }
    }
}
