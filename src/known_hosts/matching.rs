//! Which entries apply to a host: the lookup name (`[host]:port`), host
//! pattern lists with `*`/`?` wildcards and `!` negation, hashed
//! `|1|salt|hash` names, and the line markers (`@cert-authority`,
//! `@revoked`).

use std::fmt;

use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha1::Sha1;

pub(super) type HmacSha1 = Hmac<Sha1>;

/// Length of a SHA-1 digest, which is also the salt length OpenSSH requires
/// in hashed host names.
pub(super) const SHA1_LEN: usize = 20;

/// Magic prefix of hashed host names (the only hash type OpenSSH defines).
const HASH_MAGIC: &str = "|1|";

/// Standard base64 as OpenSSH writes it, accepting a missing padding too.
const B64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// What a line's leading marker makes of its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Marker {
    /// A plain host key.
    None,
    /// `@cert-authority`: a CA trusted to sign host certificates.
    CertAuthority,
    /// `@revoked`: a key that must never be accepted.
    Revoked,
}

/// One `pattern` or `!pattern` of a comma-separated host pattern list.
#[derive(Debug, Clone)]
pub(super) struct HostPattern {
    negated: bool,
    /// Lowercased glob (`*` and `?` wildcards).
    glob: String,
}

/// The host field of an entry, ready for matching.
#[derive(Clone)]
pub(super) enum Hosts {
    /// Comma-separated patterns.
    Patterns(Vec<HostPattern>),
    /// `|1|salt|hash`: the HMAC is already keyed with the decoded salt.
    Hashed { mac: HmacSha1, hash: [u8; SHA1_LEN] },
    /// A lookup name learned at run time, compared literally (so a learned
    /// name is never taken as a wildcard pattern).
    Exact(String),
}

impl fmt::Debug for Hosts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hosts::Patterns(patterns) => f.debug_tuple("Patterns").field(patterns).finish(),
            Hosts::Hashed { .. } => f.write_str("Hashed"),
            Hosts::Exact(name) => f.debug_tuple("Exact").field(name).finish(),
        }
    }
}

impl Hosts {
    pub(super) fn parse(field: &str) -> Result<Self, String> {
        if field.starts_with('|') {
            return Self::parse_hashed(field);
        }
        let patterns = field
            .split(',')
            .map(|pattern| match pattern.strip_prefix('!') {
                Some(glob) => HostPattern {
                    negated: true,
                    glob: glob.to_ascii_lowercase(),
                },
                None => HostPattern {
                    negated: false,
                    glob: pattern.to_ascii_lowercase(),
                },
            })
            .collect();
        Ok(Hosts::Patterns(patterns))
    }

    fn parse_hashed(field: &str) -> Result<Self, String> {
        let rest = field
            .strip_prefix(HASH_MAGIC)
            .ok_or_else(|| "unsupported hashed host name (expected |1|salt|hash)".to_owned())?;
        let (salt, hash) = rest
            .split_once('|')
            .ok_or_else(|| "malformed hashed host name (expected |1|salt|hash)".to_owned())?;
        let salt = B64
            .decode(salt)
            .map_err(|e| format!("bad salt in hashed host name: {e}"))?;
        if salt.len() != SHA1_LEN {
            return Err(format!(
                "bad salt in hashed host name: {} bytes instead of {SHA1_LEN}",
                salt.len()
            ));
        }
        let hash = B64
            .decode(hash)
            .map_err(|e| format!("bad hash in hashed host name: {e}"))?;
        let hash: [u8; SHA1_LEN] = hash.try_into().map_err(|hash: Vec<u8>| {
            format!(
                "bad hash in hashed host name: {} bytes instead of {SHA1_LEN}",
                hash.len()
            )
        })?;
        let mac = HmacSha1::new_from_slice(&salt)
            .map_err(|e| format!("bad salt in hashed host name: {e}"))?;
        Ok(Hosts::Hashed { mac, hash })
    }

    /// Whether this field matches a lowercased lookup name.
    ///
    /// For pattern lists this is OpenSSH's `match_pattern_list`: any matching
    /// negated pattern rejects, otherwise at least one positive pattern must
    /// match.
    pub(super) fn matches(&self, name: &str) -> bool {
        match self {
            Hosts::Patterns(patterns) => {
                let mut positive = false;
                for pattern in patterns {
                    if glob_match(pattern.glob.as_bytes(), name.as_bytes()) {
                        if pattern.negated {
                            return false;
                        }
                        positive = true;
                    }
                }
                positive
            }
            Hosts::Hashed { mac, hash } => {
                let mut mac = mac.clone();
                mac.update(name.as_bytes());
                mac.verify_slice(hash).is_ok()
            }
            Hosts::Exact(exact) => exact == name,
        }
    }
}

/// OpenSSH's `match_pattern`: `*` matches any run of bytes (including
/// none), `?` exactly one byte, anything else itself.
pub(super) fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    // Position of the last `*` seen and the text position it is tried at.
    let mut star: Option<(usize, usize)> = None;
    while let Some(&c) = text.get(t) {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&pc) if pc == b'?' || pc == c => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((star_p, star_t)) => {
                    p = star_p + 1;
                    t = star_t + 1;
                    star = Some((star_p, star_t + 1));
                }
                None => return false,
            },
        }
    }
    pattern.iter().skip(p).all(|&c| c == b'*')
}

/// The name a host is looked up (and recorded) under: the lowercased host
/// for port 22, `[host]:port` otherwise, as the OpenSSH client does.
pub fn lookup_name(host: &str, port: u16) -> String {
    let host = host.to_ascii_lowercase();
    if port == 22 {
        host
    } else {
        format!("[{host}]:{port}")
    }
}
