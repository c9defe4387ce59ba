//! The subject of an mTLS client certificate, as an RFC 4514 string
//! (`CN=kube-apiserver,O=system:masters`), for audit records.
//!
//! Only the path to the subject is read from the DER (certificate,
//! tbsCertificate, past version, serial number, signature algorithm,
//! issuer and validity); rustls has already verified the certificate.
//! Anything unexpected gives `None`, never a panic: the input is the
//! client's.

/// The subject of the DER certificate `der`, or `None` if it cannot be
/// read.
pub(crate) fn subject(der: &[u8]) -> Option<String> {
    let (certificate, _) = element(der, SEQUENCE)?;
    let (mut tbs, _) = element(certificate, SEQUENCE)?;
    if tbs.first() == Some(&VERSION) {
        tbs = element(tbs, VERSION)?.1;
    }
    let (_, tbs) = element(tbs, INTEGER)?; // serial number
    let (_, tbs) = element(tbs, SEQUENCE)?; // signature algorithm
    let (_, tbs) = element(tbs, SEQUENCE)?; // issuer
    let (_, tbs) = element(tbs, SEQUENCE)?; // validity
    let (mut name, _) = element(tbs, SEQUENCE)?;
    let mut rdns = Vec::new();
    while !name.is_empty() {
        let (mut set, rest) = element(name, SET)?;
        name = rest;
        let mut attributes = Vec::new();
        while !set.is_empty() {
            let (attribute, rest) = element(set, SEQUENCE)?;
            set = rest;
            let (oid, value) = element(attribute, OID)?;
            let (&tag, _) = value.split_first()?;
            let (content, after) = element(value, tag)?;
            let whole = &value[..value.len() - after.len()];
            attributes.push(format!(
                "{}={}",
                attribute_name(oid),
                attribute_value(tag, content, whole)
            ));
        }
        rdns.push(attributes.join("+"));
    }
    // RFC 4514: the last RDN of the sequence first.
    rdns.reverse();
    Some(rdns.join(","))
}

const INTEGER: u8 = 0x02;
const OID: u8 = 0x06;
const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const VERSION: u8 = 0xa0;

/// The content of the element of `tag` at the start of `input`, and what
/// follows it.
fn element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&found, rest) = input.split_first()?;
    if found != tag {
        return None;
    }
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let octets = usize::from(first & 0x7f);
        if octets == 0 || octets > 4 || rest.len() < octets {
            return None;
        }
        let (bytes, after) = rest.split_at(octets);
        rest = after;
        bytes.iter().fold(0usize, |n, b| (n << 8) | usize::from(*b))
    };
    if rest.len() < len {
        return None;
    }
    Some(rest.split_at(len))
}

fn attribute_name(oid: &[u8]) -> String {
    match oid {
        [0x55, 0x04, 0x03] => "CN".into(),
        [0x55, 0x04, 0x06] => "C".into(),
        [0x55, 0x04, 0x07] => "L".into(),
        [0x55, 0x04, 0x08] => "ST".into(),
        [0x55, 0x04, 0x0a] => "O".into(),
        [0x55, 0x04, 0x0b] => "OU".into(),
        [0x55, 0x04, 0x05] => "serialNumber".into(),
        _ => dotted(oid),
    }
}

/// An OID's content as `1.2.840...`.
fn dotted(oid: &[u8]) -> String {
    let mut arcs: Vec<u64> = Vec::new();
    let mut value: u64 = 0;
    for &byte in oid {
        value = (value << 7) | u64::from(byte & 0x7f);
        if byte & 0x80 == 0 {
            if arcs.is_empty() {
                let first = (value / 40).min(2);
                arcs.push(first);
                arcs.push(value - first * 40);
            } else {
                arcs.push(value);
            }
            value = 0;
        }
    }
    arcs.iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(".")
}

/// A string value escaped as RFC 4514 says; other types as `#` and the
/// hex of the whole element.
fn attribute_value(tag: u8, content: &[u8], element: &[u8]) -> String {
    // UTF8String, PrintableString, TeletexString, IA5String.
    let text = match tag {
        0x0c | 0x13 | 0x14 | 0x16 => std::str::from_utf8(content).ok(),
        _ => None,
    };
    let Some(text) = text else {
        return std::iter::once("#".to_string())
            .chain(element.iter().map(|b| format!("{b:02x}")))
            .collect();
    };
    let mut out = String::with_capacity(text.len());
    let last = text.chars().count().saturating_sub(1);
    for (i, c) in text.chars().enumerate() {
        match c {
            ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=' => {
                out.push('\\');
                out.push(c);
            }
            ' ' if i == 0 || i == last => out.push_str("\\ "),
            '#' if i == 0 => out.push_str("\\#"),
            c if c.is_control() => {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.push_str(&format!("\\{b:02x}"));
                }
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate(names: &[(rcgen::DnType, &str)]) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        let mut dn = rcgen::DistinguishedName::new();
        for (kind, value) in names {
            dn.push(kind.clone(), *value);
        }
        params.distinguished_name = dn;
        let key = rcgen::KeyPair::generate().expect("key");
        params
            .self_signed(&key)
            .expect("certificate")
            .der()
            .to_vec()
    }

    #[test]
    fn reads_the_subject_as_rfc_4514() {
        let der = certificate(&[
            (rcgen::DnType::OrganizationName, "system:masters"),
            (rcgen::DnType::CommonName, "kube-apiserver"),
        ]);
        assert_eq!(
            subject(&der).as_deref(),
            Some("CN=kube-apiserver,O=system:masters")
        );
    }

    #[test]
    fn escapes_special_characters() {
        let der = certificate(&[(rcgen::DnType::CommonName, "a,b+c\n")]);
        assert_eq!(subject(&der).as_deref(), Some("CN=a\\,b\\+c\\0a"));
    }

    #[test]
    fn garbage_gives_none() {
        let der = certificate(&[(rcgen::DnType::CommonName, "x")]);
        for cut in 0..der.len() {
            // Truncations either fail or (past the subject) still read it.
            if let Some(s) = subject(&der[..cut]) {
                assert_eq!(s, "CN=x");
            }
        }
        assert_eq!(subject(&[]), None);
        assert_eq!(subject(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
    }
}
