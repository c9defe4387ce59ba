//! russh's own debug log, as far as the suites need it: the key exchanges
//! the russh client in this test process began, and why. Install it before
//! the sessions start; it keeps only those lines, from every test of the
//! binary (count what is specific to one test, or compare before/after).

use std::sync::{Mutex, Once};

/// The lines kept (prefixes of russh client debug messages).
const KEPT: [&str; 4] = [
    "beginning re-key",
    "rekey read limit reached",
    "rekey time limit reached",
    "server has initiated re-key",
];

static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.target().starts_with("russh::client") && metadata.level() <= log::Level::Debug
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = record.args().to_string();
        if KEPT.iter().any(|kept| line.starts_with(kept)) {
            if let Ok(mut lines) = LINES.lock() {
                lines.push(line);
            }
        }
    }

    fn flush(&self) {}
}

/// Start keeping the lines (once per process; later calls do nothing).
pub fn install() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        if log::set_logger(&Capture).is_ok() {
            log::set_max_level(log::LevelFilter::Debug);
        }
    });
}

/// Kept lines that start with `prefix` so far.
pub fn count(prefix: &str) -> usize {
    LINES
        .lock()
        .map(|lines| lines.iter().filter(|l| l.starts_with(prefix)).count())
        .unwrap_or(0)
}
