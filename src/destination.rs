//! Where a client wants to go: [`Destination`] (`host:port`) and [`Host`]
//! (an IP address or a validated DNS name), parsed once at the front door
//! and consumed as is by the router, the dialer and the logs.
//!
//! This module owns the canonicalisation rules, so that every security
//! decision sees one form of an address:
//!
//! - IP literals are kept as [`IpAddr`]; an IPv4-mapped IPv6 address
//!   (`::ffff:a.b.c.d`) *is* its IPv4 address (a dual-stack socket connects
//!   to the IPv4 address), so it becomes [`Host::Ip`] of that IPv4 address.
//! - Other IPv6 forms that carry an IPv4 address ([`Host::embedded_ipv4`]):
//!   IPv4-compatible `::a.b.c.d`, NAT64 `64:ff9b::/96` and the local-use
//!   `64:ff9b:1::/48`, 6to4 `2002::/16`. They stay IPv6 (the node dials
//!   them as given) but the policy checks the IPv4 address they lead to as
//!   well.
//! - Names: ASCII letters, digits, `-` and `_`, labels of 1 to 63 bytes, at
//!   most 253 bytes; stored in lower case without the trailing dot (the dot
//!   is remembered: `name.` is dialled as `name.`, so the node's resolver
//!   does not apply its search list).
//! - Numeric-looking names are refused ([`HostError::AmbiguousNumeric`]):
//!   `127.1`, `0x7f000001` or `2130706433` are addresses to a resolver
//!   (`inet_aton`) but names to a naive policy, so neither reading is safe.
//! - IPv6 zone ids (`fe80::1%eth0`) are refused: a zone names an interface
//!   of the host that dials, which is the node, not us.
//!
//! It imports nothing from the rest of the crate.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A destination: a host and a TCP port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Destination {
    /// The host, canonical.
    pub host: Host,
    /// The TCP port. The front doors refuse port 0; the router sees
    /// whatever it is given.
    pub port: u16,
}

impl Destination {
    /// A destination from a host and a port.
    pub fn new(host: Host, port: u16) -> Destination {
        Destination { host, port }
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            host => write!(f, "{host}:{}", self.port),
        }
    }
}

/// A destination host.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    /// An IP address; never an IPv4-mapped IPv6 address (that is its IPv4
    /// address).
    Ip(IpAddr),
    /// A DNS name.
    Name(DnsName),
}

impl Host {
    /// Parse a host as a client or the inventory gives it: an IP literal
    /// (IPv6 without brackets) or a DNS name. See the [module
    /// documentation](self) for the rules.
    ///
    /// # Errors
    ///
    /// [`HostError`] says what is wrong with it.
    pub fn parse(text: &str) -> Result<Host, HostError> {
        if text.is_empty() {
            return Err(HostError::Empty);
        }
        if text.len() > 255 {
            return Err(HostError::TooLong);
        }
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Ok(Host::Ip(canonical_ip(ip)));
        }
        if text.contains('%') && text.contains(':') {
            return Err(HostError::ZoneId);
        }
        DnsName::parse(text).map(Host::Name)
    }

    /// The IP address, if this is one.
    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            Host::Ip(ip) => Some(*ip),
            Host::Name(_) => None,
        }
    }

    /// The IPv4 address an IPv6 destination leads to through one of the
    /// transition mechanisms: IPv4-compatible (`::a.b.c.d`, not `::` and
    /// `::1`), NAT64 (`64:ff9b::a.b.c.d`, and `64:ff9b:1::/48` with the
    /// address in the last 32 bits), 6to4 (`2002:aabb:ccdd::/48`: the
    /// 6to4 router at `a.b.c.d`). `None` for names, IPv4 and other IPv6.
    pub fn embedded_ipv4(&self) -> Option<Ipv4Addr> {
        match self {
            Host::Ip(IpAddr::V6(ip)) => embedded_ipv4(*ip),
            _ => None,
        }
    }
}

impl fmt::Display for Host {
    /// IP addresses as [`IpAddr`] prints them (IPv6 without brackets),
    /// names in lower case with their trailing dot if they had one.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(ip) => ip.fmt(f),
            Host::Name(name) => name.fmt(f),
        }
    }
}

impl std::str::FromStr for Host {
    type Err = HostError;

    /// [`Host::parse`].
    fn from_str(text: &str) -> Result<Host, HostError> {
        Host::parse(text)
    }
}

impl From<IpAddr> for Host {
    fn from(ip: IpAddr) -> Host {
        Host::Ip(canonical_ip(ip))
    }
}

/// A validated DNS name: lower case, stored without its trailing dot.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DnsName {
    /// Lower case, no trailing dot.
    name: Box<str>,
    /// Whether it was written with a trailing dot (fully qualified).
    absolute: bool,
}

impl DnsName {
    /// Parse and validate a DNS name (see the [module documentation](self)).
    ///
    /// # Errors
    ///
    /// [`HostError`] says what is wrong with it.
    pub fn parse(text: &str) -> Result<DnsName, HostError> {
        if text.is_empty() {
            return Err(HostError::Empty);
        }
        // ASCII only: the node's resolver takes internationalised names in
        // their ASCII (punycode) form, and Unicode lower-casing could
        // lengthen a name or turn a letter into a combining mark.
        if !text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        {
            return Err(HostError::InvalidCharacter);
        }
        let (name, absolute) = match text.strip_suffix('.') {
            Some(name) => (name, true),
            None => (text, false),
        };
        if name.len() > 253 {
            return Err(HostError::TooLong);
        }
        if name
            .split('.')
            .any(|label| label.is_empty() || label.len() > 63)
        {
            return Err(HostError::InvalidLabel);
        }
        // No top-level domain starts with a digit; a name whose last label
        // does is a number to some resolvers (`127.1`, `0x7f.1`, `2130706433`).
        let last = name.rsplit('.').next().unwrap_or_default();
        if last.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(HostError::AmbiguousNumeric);
        }
        Ok(DnsName {
            name: name.to_ascii_lowercase().into_boxed_str(),
            absolute,
        })
    }

    /// The name in lower case, without a trailing dot: the form names are
    /// compared in.
    pub fn as_str(&self) -> &str {
        &self.name
    }

    /// Whether it was written with a trailing dot.
    pub fn is_absolute(&self) -> bool {
        self.absolute
    }
}

impl fmt::Display for DnsName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        if self.absolute {
            f.write_str(".")?;
        }
        Ok(())
    }
}

/// Why a host was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// The host is empty.
    #[error("empty host")]
    Empty,
    /// Longer than 255 bytes, or a name longer than 253.
    #[error("host too long")]
    TooLong,
    /// A character outside ASCII letters, digits, `-`, `.` and `_`.
    #[error("invalid character in host")]
    InvalidCharacter,
    /// An empty label (`a..b`, a leading dot) or one longer than 63 bytes.
    #[error("empty or over-long label in host name")]
    InvalidLabel,
    /// Numeric but not an IP address (`127.1`, `0x7f000001`,
    /// `2130706433`): resolvers read these as addresses, policies might
    /// not.
    #[error("numeric host that is not a dotted-quad IPv4 address")]
    AmbiguousNumeric,
    /// An IPv6 address with a zone id (`fe80::1%eth0`).
    #[error("IPv6 zone ids are not accepted")]
    ZoneId,
}

/// An IPv4-mapped IPv6 address becomes its IPv4 address.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// See [`Host::embedded_ipv4`].
fn embedded_ipv4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let low32 = || Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    match s {
        // IPv4-compatible ::a.b.c.d (deprecated), but not :: and ::1.
        [0, 0, 0, 0, 0, 0, hi, lo] if hi != 0 || lo > 1 => Some(low32()),
        // NAT64 well-known prefix 64:ff9b::/96.
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(low32()),
        // Local-use NAT64 64:ff9b:1::/48, as a /96 translation prefix.
        [0x64, 0xff9b, 1, ..] => Some(low32()),
        // 6to4 2002:aabb:ccdd::/48.
        [0x2002, hi, lo, ..] => Some(Ipv4Addr::new(
            (hi >> 8) as u8,
            hi as u8,
            (lo >> 8) as u8,
            lo as u8,
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(s: &str) -> Host {
        Host::parse(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    #[test]
    fn ip_literals_are_canonical() {
        assert_eq!(host("10.0.0.1"), Host::Ip("10.0.0.1".parse().unwrap()));
        assert_eq!(
            host("::ffff:127.0.0.1"),
            Host::Ip("127.0.0.1".parse().unwrap())
        );
        assert_eq!(host("::FFFF:7f00:1").to_string(), "127.0.0.1");
        assert_eq!(host("2001:DB8::1").to_string(), "2001:db8::1");
        assert_eq!(Host::parse("fe80::1%eth0"), Err(HostError::ZoneId));
    }

    #[test]
    fn names_are_lower_case_and_keep_their_dot_for_dialling() {
        let h = host("Node-1.Example.COM.");
        let Host::Name(name) = &h else {
            panic!("{h:?}")
        };
        assert_eq!(name.as_str(), "node-1.example.com");
        assert!(name.is_absolute());
        assert_eq!(h.to_string(), "node-1.example.com.");
        assert_eq!(host("a_b").to_string(), "a_b");
    }

    #[test]
    fn bad_names_are_refused() {
        assert_eq!(Host::parse(""), Err(HostError::Empty));
        assert_eq!(Host::parse("a..b"), Err(HostError::InvalidLabel));
        assert_eq!(Host::parse(".a"), Err(HostError::InvalidLabel));
        assert_eq!(Host::parse("."), Err(HostError::InvalidLabel));
        assert_eq!(Host::parse(&"a".repeat(64)), Err(HostError::InvalidLabel));
        assert_eq!(
            Host::parse(&["a"; 128].join(".")),
            Err(HostError::TooLong),
            "255 bytes of labels is over the 253 a name may have"
        );
        assert_eq!(Host::parse(&"a".repeat(256)), Err(HostError::TooLong));
        assert_eq!(Host::parse("a b"), Err(HostError::InvalidCharacter));
        assert_eq!(
            Host::parse("ex\u{e4}mple"),
            Err(HostError::InvalidCharacter)
        );
        assert_eq!(Host::parse("a:b"), Err(HostError::InvalidCharacter));
        for numeric in [
            "127.1",
            "0x7f000001",
            "2130706433",
            "017700000001",
            "1.2.3.4.",
            "a.1b",
        ] {
            assert_eq!(
                Host::parse(numeric),
                Err(HostError::AmbiguousNumeric),
                "{numeric}"
            );
        }
    }

    #[test]
    fn embedded_ipv4_forms() {
        let v4 = |s: &str| Some(s.parse::<Ipv4Addr>().unwrap());
        assert_eq!(
            host("::169.254.169.254").embedded_ipv4(),
            v4("169.254.169.254")
        );
        assert_eq!(host("::7f00:1").embedded_ipv4(), v4("127.0.0.1"));
        assert_eq!(
            host("64:ff9b::a9fe:a9fe").embedded_ipv4(),
            v4("169.254.169.254")
        );
        assert_eq!(host("64:ff9b:1:2::7f00:1").embedded_ipv4(), v4("127.0.0.1"));
        assert_eq!(host("2002:7f00:1::1").embedded_ipv4(), v4("127.0.0.1"));
        assert_eq!(host("::").embedded_ipv4(), None);
        assert_eq!(host("::1").embedded_ipv4(), None);
        assert_eq!(host("2001:db8::1").embedded_ipv4(), None);
        assert_eq!(host("10.0.0.1").embedded_ipv4(), None);
        assert_eq!(host("example.com").embedded_ipv4(), None);
    }

    #[test]
    fn display_brackets_ipv6() {
        assert_eq!(Destination::new(host("::1"), 80).to_string(), "[::1]:80");
        assert_eq!(Destination::new(host("a.b"), 80).to_string(), "a.b:80");
        assert_eq!(
            Destination::new(host("1.2.3.4"), 80).to_string(),
            "1.2.3.4:80"
        );
    }
}
