//! libFuzzer entry point; the property checked lives in fuzz/checks.rs,
//! which tests/fuzz_regressions.rs replays without a fuzzer.
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::client_dispatch(data));
