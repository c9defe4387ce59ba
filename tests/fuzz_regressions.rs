//! The fuzz targets' checks (fuzz/checks.rs) without a fuzzer:
//!
//! - every input kept under `fuzz/regressions/<target>/` (what fuzzing
//!   found, minimised, fixed) and `fuzz/seeds/<target>/` (the seed
//!   corpus) is replayed through the same function the libFuzzer binary
//!   calls, so CI checks them on the stable toolchain;
//! - a bounded proptest run per target (random bytes and structured
//!   inputs, a few thousand cases) keeps some exploration in every
//!   `cargo test`.
//!
//! Fuzzing proper is `bash fuzz/run.sh` (see docs/reliability.md).

#[path = "../fuzz/checks.rs"]
mod checks;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use proptest::prelude::*;

/// Every file under `fuzz/<kind>/<target>/`, sorted.
fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(kind)
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Replay the regressions and seeds of `target` through `check`; fails
/// naming every input that panics.
fn replay(target: &str, check: fn(&[u8])) {
    let mut failed = Vec::new();
    let mut count = 0;
    for kind in ["regressions", "seeds"] {
        for path in inputs(kind, target) {
            let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            count += 1;
            if catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
                failed.push(path.display().to_string());
            }
        }
    }
    assert!(count > 0, "no input kept for {target}");
    assert!(
        failed.is_empty(),
        "{target}: these inputs fail: {failed:#?}"
    );
    eprintln!("{target}: {count} kept inputs pass");
}

#[test]
fn connect_target_kept_inputs() {
    replay("connect_target", checks::connect_target);
}

#[test]
fn socks5_kept_inputs() {
    replay("socks5", checks::socks5);
}

#[test]
fn known_hosts_kept_inputs() {
    replay("known_hosts", checks::known_hosts);
}

#[test]
fn config_kept_inputs() {
    replay("config", checks::config);
}

#[test]
fn client_dispatch_kept_inputs() {
    replay("client_dispatch", checks::client_dispatch);
}

/// Packets as `client_dispatch` reads them: message types the client
/// handles after authentication (and some it does not), channel numbers
/// of its channels (1-3) and others, arbitrary bodies.
fn client_dispatch_packets() -> impl Strategy<Value = Vec<u8>> {
    let types = prop::sample::select(vec![
        1u8, 2, 3, 4, 7, 20, 21, 80, 81, 82, 90, 91, 92, 93, 94, 95, 96, 97, 98, 99, 100, 255,
    ]);
    let packet = (
        types,
        0u32..5,
        prop::collection::vec(any::<u8>(), 0..64),
        prop::option::of(0u32..70_000),
    )
        .prop_map(|(kind, channel, body, data_len)| {
            let mut p = vec![kind];
            p.extend(channel.to_be_bytes());
            match data_len {
                // A well-formed data-like body of that many bytes.
                Some(len) if kind == 94 || kind == 95 => {
                    if kind == 95 {
                        p.extend(1u32.to_be_bytes());
                    }
                    let len = len.min(40_000);
                    p.extend(len.to_be_bytes());
                    p.extend(std::iter::repeat_n(7u8, len as usize));
                }
                _ => p.extend(&body),
            }
            let mut framed = (p.len() as u16).to_be_bytes().to_vec();
            framed.extend(p);
            framed
        });
    prop::collection::vec(packet, 0..12).prop_map(|v| v.concat())
}

/// A SOCKS5 greeting followed by a request with arbitrary fields.
fn socks5_messages() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::vec(any::<u8>(), 0..4),
        0u8..6,
        0u8..6,
        prop::collection::vec(any::<u8>(), 0..40),
        any::<u16>(),
    )
        .prop_map(|(methods, cmd, atyp, address, port)| {
            let mut v = vec![5, methods.len() as u8];
            v.extend(&methods);
            v.extend([5, cmd, 0, atyp]);
            if atyp == 3 {
                v.push(address.len() as u8);
            }
            v.extend(&address);
            v.extend(port.to_be_bytes());
            v
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn connect_target_random(target in "(\\PC{0,12}|[a-zA-Z0-9.:\\[\\]_-]{0,24})(:[0-9]{0,6})?") {
        checks::connect_target(target.as_bytes());
    }

    #[test]
    fn client_dispatch_random(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        checks::client_dispatch(&bytes);
    }

    #[test]
    fn client_dispatch_structured(bytes in client_dispatch_packets()) {
        checks::client_dispatch(&bytes);
    }

    #[test]
    fn socks5_random(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        checks::socks5(&bytes);
    }

    #[test]
    fn socks5_structured(bytes in socks5_messages()) {
        checks::socks5(&bytes);
    }

    #[test]
    fn known_hosts_random(text in "(@revoked |@cert-authority |[|!*?,\\[\\]:a-z0-9 ]{0,30} )?\\PC{0,60}") {
        checks::known_hosts(text.as_bytes());
    }

    #[test]
    fn config_random(text in "(\\[[a-z]{0,10}\\]\n)?([a-z_]{1,20} = (\"\\PC{0,20}\"|[0-9]{1,6}|\\[\\]|true)\n){0,4}") {
        checks::config(text.as_bytes());
    }
}

/// The harness reaches the dispatch: the seed that sends one byte past a
/// channel's window has the window delivered and that byte refused.
#[test]
fn client_dispatch_reaches_the_channels() {
    use russh::client::fuzzing::{dispatch_authenticated, WINDOW};
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/client_dispatch/data-beyond-window");
    let data = std::fs::read(path).expect("seed");
    let report = dispatch_authenticated(&checks::split_packets(&data));
    assert_eq!(report.error, None, "{report:?}");
    assert_eq!(report.handled, 3, "{report:?}");
    assert_eq!(report.delivered[0], WINDOW as usize, "{report:?}");
    assert_eq!(report.window_exceeded[0], 1, "{report:?}");
}
