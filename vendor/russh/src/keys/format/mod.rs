use std::io::Write;

use data_encoding::{BASE64_MIME, HEXLOWER_PERMISSIVE};
use ssh_key::PrivateKey;

use super::is_base64_char;
use crate::keys::Error;

pub mod openssh;


pub use self::openssh::*;

pub mod pkcs5;
pub use self::pkcs5::*;

pub mod pkcs8;

const AES_128_CBC: &str = "DEK-Info: AES-128-CBC,";

#[derive(Clone, Copy, Debug)]
/// AES encryption key.
pub enum Encryption {
    /// Key for AES128
    Aes128Cbc([u8; 16]),
    /// Key for AES256
    Aes256Cbc([u8; 16]),
}

#[derive(Clone, Debug)]
enum Format {
    #[cfg(feature = "rsa")]
    Rsa,
    Openssh,
    Pkcs5Encrypted(Encryption),
    Pkcs8Encrypted,
    Pkcs8,
}

/// Decode a secret key, possibly deciphering it with the supplied
/// password.
pub fn decode_secret_key(secret: &str, password: Option<&str>) -> Result<PrivateKey, Error> {
    if secret.trim().starts_with("PuTTY-User-Key-File-") {
        return Ok(PrivateKey::from_ppk(secret, password.map(Into::into))?);
    }
    let mut format = None;
    let secret = {
        let mut started = false;
        let mut sec = String::new();
        for l in secret.lines() {
            if started {
                if l.starts_with(PEM_END) {
                    break;
                }
                if l.chars().all(is_base64_char) {
                    sec.push_str(l)
                } else if l.starts_with(AES_128_CBC) {
                    let iv_: Vec<u8> =
                        HEXLOWER_PERMISSIVE.decode(l.split_at(AES_128_CBC.len()).1.as_bytes())?;
                    if iv_.len() != 16 {
                        return Err(Error::CouldNotReadKey);
                    }
                    let mut iv = [0; 16];
                    iv.clone_from_slice(&iv_);
                    format = Some(Format::Pkcs5Encrypted(Encryption::Aes128Cbc(iv)))
                }
            }
            // (nodetunnel patch) The PEM framing is parsed once, by label
            // (see `PEM_BEGIN`), instead of comparing whole marker lines.
            match pem_begin_label(l) {
                Some(LABEL_OPENSSH) => {
                    started = true;
                    format = Some(Format::Openssh);
                }
                Some(LABEL_RSA) => {
                    #[cfg(feature = "rsa")]
                    {
                        started = true;
                        format = Some(Format::Rsa);
                    }
                    #[cfg(not(feature = "rsa"))]
                    {
                        return Err(Error::UnsupportedKeyType {
                            key_type_string: "RSA".to_string(),
                            key_type_raw: vec![],
                        });
                    }
                }
                Some(LABEL_PKCS8_ENCRYPTED) => {
                    started = true;
                    format = Some(Format::Pkcs8Encrypted);
                }
                Some(LABEL_PKCS8 | LABEL_EC) => {
                    started = true;
                    format = Some(Format::Pkcs8);
                }
                _ => {}
            }
        }
        sec
    };

    let secret = BASE64_MIME.decode(secret.as_bytes())?;
    match format {
        Some(Format::Openssh) => decode_openssh(&secret, password),
        #[cfg(feature = "rsa")]
        Some(Format::Rsa) => Ok(decode_rsa_pkcs1_der(&secret)?.into()),
        Some(Format::Pkcs5Encrypted(enc)) => decode_pkcs5(&secret, password, enc),
        Some(Format::Pkcs8Encrypted) | Some(Format::Pkcs8) => {
            self::pkcs8::decode_pkcs8(&secret, password.map(|x| x.as_bytes()))
        }
        None => Err(Error::CouldNotReadKey),
    }
}

/// (nodetunnel patch) PEM framing, by label: a block is
/// `PEM_BEGIN` label `PEM_DASHES`, the base64 body, then `PEM_END` label
/// `PEM_DASHES`.
const PEM_BEGIN: &str = "-----BEGIN ";
const PEM_END: &str = "-----END ";
const PEM_DASHES: &str = "-----";
const PRIVATE_KEY: &str = "PRIVATE KEY";
const LABEL_OPENSSH: &str = "OPENSSH PRIVATE KEY";
const LABEL_RSA: &str = "RSA PRIVATE KEY";
const LABEL_EC: &str = "EC PRIVATE KEY";
const LABEL_PKCS8: &str = PRIVATE_KEY;
const LABEL_PKCS8_ENCRYPTED: &str = "ENCRYPTED PRIVATE KEY";

/// The label of a PEM begin line, if `line` is one.
fn pem_begin_label(line: &str) -> Option<&str> {
    line.strip_prefix(PEM_BEGIN)?.strip_suffix(PEM_DASHES)
}

/// `der` as a PEM block labelled `label`.
fn write_pem<W: Write>(mut w: W, label: &str, der: &[u8]) -> Result<(), Error> {
    w.write_all(format!("{PEM_BEGIN}{label}{PEM_DASHES}\n").as_bytes())?;
    w.write_all(BASE64_MIME.encode(der).as_bytes())?;
    w.write_all(format!("\n{PEM_END}{label}{PEM_DASHES}\n").as_bytes())?;
    Ok(())
}

pub fn encode_pkcs8_pem<W: Write>(key: &PrivateKey, w: W) -> Result<(), Error> {
    let x = self::pkcs8::encode_pkcs8(key)?;
    write_pem(w, LABEL_PKCS8, &x)
}

pub fn encode_pkcs8_pem_encrypted<W: Write>(
    key: &PrivateKey,
    pass: &[u8],
    rounds: u32,
    w: W,
) -> Result<(), Error> {
    let x = self::pkcs8::encode_pkcs8_encrypted(pass, rounds, key)?;
    write_pem(w, LABEL_PKCS8_ENCRYPTED, &x)
}

#[cfg(feature = "rsa")]
fn decode_rsa_pkcs1_der(secret: &[u8]) -> Result<ssh_key::private::RsaKeypair, Error> {
    use std::convert::TryInto;

    use pkcs1::DecodeRsaPrivateKey;

    Ok(rsa::RsaPrivateKey::from_pkcs1_der(secret)?.try_into()?)
}
