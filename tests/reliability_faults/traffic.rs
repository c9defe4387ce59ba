//! Checksummed traffic through the proxy: downloads from a node's Source,
//! uploads to its Sink, round trips through its Echo. Every byte is checked
//! against the deterministic pattern as it arrives, and the SHA-256 of the
//! whole stream against the pattern's. A transfer may pause at a given
//! offset until a gate opens, so that a fault hits it mid-stream.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use super::fixture::{dial, Dialled, Refusal};
use crate::support::{parse_sink_reply, pattern_sha256_hex, PatternGen};

/// No byte moving for this long is a hang (a fault must end a stream, not
/// freeze it).
pub const STALL_TIMEOUT: Duration = Duration::from_secs(30);

const CHUNK: usize = 64 * 1024;

/// How a transfer ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every byte arrived, in order, and the SHA-256 matched.
    Complete { bytes: u64, sha256: String },
    /// The stream ended early with an error or an EOF, after `bytes`
    /// correct bytes. What a fault may do to a stream: end it, visibly
    /// short.
    Cut { bytes: u64, error: String },
    /// Wrong bytes, or a peer that reported a different count or checksum
    /// after a clean close (silent truncation). Never acceptable.
    Corrupt { detail: String },
    /// The CONNECT was refused.
    Refused(Refusal),
    /// Nothing moved for [`STALL_TIMEOUT`]. Never acceptable.
    Hung { bytes: u64, during: String },
    /// The CONNECT itself failed (no answer, socket gone).
    DialFailed(String),
}

impl Outcome {
    pub fn is_complete(&self) -> bool {
        matches!(self, Outcome::Complete { .. })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Read the node's Source ([`super::fixture::SOURCE_LEN`] bytes, seed =
    /// node index).
    Download,
    /// Write `len` bytes of the pattern to the node's Sink, half-close,
    /// check its "count sha256" answer.
    Upload,
    /// Write `len` bytes to the node's Echo while reading them back.
    Echo,
}

/// A transfer in progress.
pub struct Transfer {
    pub label: String,
    pub len: u64,
    handle: JoinHandle<Outcome>,
    paused: Option<oneshot::Receiver<u64>>,
    pub started: Instant,
}

impl Transfer {
    /// Wait until the transfer reached its pause point (it holds there
    /// until its gate opens); the bytes moved so far.
    pub async fn paused(&mut self) -> u64 {
        let rx = self.paused.take().expect("a pausing transfer");
        match tokio::time::timeout(STALL_TIMEOUT, rx).await {
            Ok(Ok(at)) => at,
            Ok(Err(_)) => {
                let outcome = (&mut self.handle).await;
                panic!("{}: ended before its pause point: {outcome:?}", self.label)
            }
            Err(_) => panic!(
                "{}: did not reach its pause point within {STALL_TIMEOUT:?}",
                self.label
            ),
        }
    }

    /// The outcome (and how long the transfer took in all).
    pub async fn outcome(self) -> (Outcome, Duration) {
        let out = self.handle.await.unwrap_or_else(|e| Outcome::Corrupt {
            detail: format!("transfer task failed: {e}"),
        });
        (out, self.started.elapsed())
    }

    /// The outcome, which must be Complete with the right size.
    pub async fn complete(self) -> Duration {
        let label = self.label.clone();
        let len = self.len;
        let (out, took) = self.outcome().await;
        match &out {
            Outcome::Complete { bytes, .. } if *bytes == len => took,
            _ => panic!("{label}: expected all {len} bytes byte-exact, got {out:?}"),
        }
    }

    /// The outcome, which must be Cut (ended early, no wrong byte).
    pub async fn cut(self) -> (u64, String) {
        let label = self.label.clone();
        let (out, _) = self.outcome().await;
        match out {
            Outcome::Cut { bytes, error } => (bytes, error),
            other => panic!("{label}: expected the stream to be cut, got {other:?}"),
        }
    }
}

/// Opens every gate at once.
pub struct Gate {
    tx: watch::Sender<bool>,
}

impl Gate {
    pub fn new() -> Gate {
        Gate {
            tx: watch::channel(false).0,
        }
    }
    pub fn open(&self) {
        let _ = self.tx.send(true);
    }
    fn receiver(&self) -> watch::Receiver<bool> {
        self.tx.subscribe()
    }
}

/// Where to hold a transfer: after `at` bytes, until `gate` opens.
pub struct Pause<'g> {
    pub at: u64,
    pub gate: &'g Gate,
}

struct Hold {
    at: u64,
    gate: watch::Receiver<bool>,
    reached: Option<oneshot::Sender<u64>>,
}

impl Hold {
    /// Pause here if `moved` reached the pause point (once).
    async fn check(hold: &mut Option<Hold>, moved: u64) {
        let Some(h) = hold.as_mut() else { return };
        if moved < h.at {
            return;
        }
        if let Some(tx) = h.reached.take() {
            let _ = tx.send(moved);
        }
        let _ = h.gate.wait_for(|open| *open).await;
        *hold = None;
    }
}

/// Start a transfer of `kind` through the proxy socket `uds` to `target`.
/// Downloads always read the Source's [`super::fixture::SOURCE_LEN`] bytes of
/// pattern `seed`; uploads and echoes send `len` bytes of pattern `seed`.
pub fn start(
    label: impl Into<String>,
    uds: &Path,
    target: String,
    kind: Kind,
    len: u64,
    seed: u64,
    pause: Option<Pause<'_>>,
) -> Transfer {
    let label = label.into();
    let (hold, paused) = match pause {
        Some(p) => {
            let (tx, rx) = oneshot::channel();
            (
                Some(Hold {
                    at: p.at,
                    gate: p.gate.receiver(),
                    reached: Some(tx),
                }),
                Some(rx),
            )
        }
        None => (None, None),
    };
    let uds: PathBuf = uds.to_path_buf();
    let handle = tokio::spawn(async move {
        let stream = match dial(&uds, &target).await {
            Ok(Dialled::Open(s)) => s,
            Ok(Dialled::Refused(r)) => return Outcome::Refused(r),
            Err(e) => return Outcome::DialFailed(format!("{e:#}")),
        };
        match kind {
            Kind::Download => download(stream, len, seed, hold).await,
            Kind::Upload => upload(stream, len, seed, hold).await,
            Kind::Echo => echo(stream, len, seed).await,
        }
    });
    Transfer {
        label,
        len,
        handle,
        paused,
        started: Instant::now(),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

async fn download(
    mut s: tokio::net::UnixStream,
    len: u64,
    seed: u64,
    mut hold: Option<Hold>,
) -> Outcome {
    use sha2::{Digest, Sha256};
    let mut gen = PatternGen::new(seed);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut want = vec![0u8; CHUNK];
    let mut got = 0u64;
    loop {
        Hold::check(&mut hold, got).await;
        let n = match tokio::time::timeout(STALL_TIMEOUT, s.read(&mut buf)).await {
            Err(_) => {
                return Outcome::Hung {
                    bytes: got,
                    during: "download read".into(),
                }
            }
            Ok(Err(e)) => {
                return Outcome::Cut {
                    bytes: got,
                    error: format!("read error: {e} ({:?})", e.kind()),
                }
            }
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => n,
        };
        if got + n as u64 > len {
            return Outcome::Corrupt {
                detail: format!("more than {len} bytes (got {})", got + n as u64),
            };
        }
        gen.fill(&mut want[..n]);
        if buf[..n] != want[..n] {
            let at = got
                + buf[..n]
                    .iter()
                    .zip(&want[..n])
                    .position(|(a, b)| a != b)
                    .unwrap() as u64;
            return Outcome::Corrupt {
                detail: format!("byte {at} differs from what the node sent"),
            };
        }
        hasher.update(&buf[..n]);
        got += n as u64;
    }
    if got < len {
        return Outcome::Cut {
            bytes: got,
            error: format!("EOF after {got} of {len} bytes"),
        };
    }
    let sha256 = hex(&hasher.finalize());
    let expected = pattern_sha256_hex(seed, len);
    if sha256 != expected {
        return Outcome::Corrupt {
            detail: format!("SHA-256 {sha256}, the node sent {expected}"),
        };
    }
    Outcome::Complete { bytes: got, sha256 }
}

async fn upload(
    mut s: tokio::net::UnixStream,
    len: u64,
    seed: u64,
    mut hold: Option<Hold>,
) -> Outcome {
    let mut gen = PatternGen::new(seed);
    let mut buf = vec![0u8; CHUNK];
    let mut sent = 0u64;
    while sent < len {
        Hold::check(&mut hold, sent).await;
        let n = (len - sent).min(CHUNK as u64) as usize;
        gen.fill(&mut buf[..n]);
        match tokio::time::timeout(STALL_TIMEOUT, s.write_all(&buf[..n])).await {
            Err(_) => {
                return Outcome::Hung {
                    bytes: sent,
                    during: "upload write".into(),
                }
            }
            Ok(Err(e)) => {
                return Outcome::Cut {
                    bytes: sent,
                    error: format!("write error: {e} ({:?})", e.kind()),
                }
            }
            Ok(Ok(())) => sent += n as u64,
        }
    }
    if let Err(e) = s.shutdown().await {
        return Outcome::Cut {
            bytes: sent,
            error: format!("half-close failed: {e}"),
        };
    }
    let mut reply = Vec::new();
    match tokio::time::timeout(STALL_TIMEOUT, s.read_to_end(&mut reply)).await {
        Err(_) => {
            return Outcome::Hung {
                bytes: sent,
                during: "waiting for the sink's checksum".into(),
            }
        }
        Ok(Err(e)) => {
            return Outcome::Cut {
                bytes: sent,
                error: format!("reading the sink's answer: {e} ({:?})", e.kind()),
            }
        }
        Ok(Ok(_)) => {}
    }
    let text = String::from_utf8_lossy(&reply).into_owned();
    if text.is_empty() {
        return Outcome::Cut {
            bytes: sent,
            error: "EOF without the sink's answer".into(),
        };
    }
    let (count, sha256) = match parse_sink_reply(&text) {
        Ok(x) => x,
        Err(e) => {
            return Outcome::Corrupt {
                detail: format!("{e:#}"),
            }
        }
    };
    let expected = pattern_sha256_hex(seed, len);
    if count != len || sha256 != expected {
        return Outcome::Corrupt {
            detail: format!(
                "the sink received {count} bytes with SHA-256 {sha256}; {len} bytes with {expected} were sent"
            ),
        };
    }
    Outcome::Complete {
        bytes: count,
        sha256,
    }
}

async fn echo(s: tokio::net::UnixStream, len: u64, seed: u64) -> Outcome {
    use sha2::{Digest, Sha256};
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        let mut gen = PatternGen::new(seed);
        let mut buf = vec![0u8; CHUNK];
        let mut sent = 0u64;
        while sent < len {
            let n = (len - sent).min(CHUNK as u64) as usize;
            gen.fill(&mut buf[..n]);
            match tokio::time::timeout(STALL_TIMEOUT, w.write_all(&buf[..n])).await {
                Err(_) => return Err(format!("echo write stalled after {sent} bytes")),
                Ok(Err(e)) => return Err(format!("echo write error after {sent} bytes: {e}")),
                Ok(Ok(())) => sent += n as u64,
            }
        }
        w.shutdown()
            .await
            .map_err(|e| format!("echo half-close: {e}"))?;
        Ok(())
    });
    let mut gen = PatternGen::new(seed);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut want = vec![0u8; CHUNK];
    let mut got = 0u64;
    let ended = loop {
        let n = match tokio::time::timeout(STALL_TIMEOUT, r.read(&mut buf)).await {
            Err(_) => {
                writer.abort();
                return Outcome::Hung {
                    bytes: got,
                    during: "echo read".into(),
                };
            }
            Ok(Err(e)) => break Some(format!("read error: {e} ({:?})", e.kind())),
            Ok(Ok(0)) => break None,
            Ok(Ok(n)) => n,
        };
        if got + n as u64 > len {
            writer.abort();
            return Outcome::Corrupt {
                detail: format!("echo returned more than {len} bytes"),
            };
        }
        gen.fill(&mut want[..n]);
        if buf[..n] != want[..n] {
            writer.abort();
            return Outcome::Corrupt {
                detail: format!("echoed bytes differ near offset {got}"),
            };
        }
        hasher.update(&buf[..n]);
        got += n as u64;
    };
    let wrote = writer.await.unwrap_or_else(|e| Err(e.to_string()));
    if let Some(error) = ended {
        return Outcome::Cut { bytes: got, error };
    }
    if got < len {
        return Outcome::Cut {
            bytes: got,
            error: format!(
                "EOF after {got} of {len} echoed bytes{}",
                wrote.err().map(|e| format!("; {e}")).unwrap_or_default()
            ),
        };
    }
    let sha256 = hex(&hasher.finalize());
    if sha256 != pattern_sha256_hex(seed, len) {
        return Outcome::Corrupt {
            detail: "echo SHA-256 differs".into(),
        };
    }
    Outcome::Complete { bytes: got, sha256 }
}
