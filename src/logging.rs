//! Log output: `tracing` to stderr as text or JSON lines.
//!
//! russh logs through the `log` crate; `tracing-subscriber`'s log bridge
//! turns those records into tracing events, so they obey the same filter and
//! format. The default filter keeps russh at `warn`: its debug output names
//! every packet.
//!
//! Lines logged while serving a client connection or an SSH session carry
//! that context as a span instead of repeating its fields on every line:
//! `connection{listener, peer, dest, node, stream}` (proxy/conn_span.rs)
//! and `session{node, endpoint, session}` (tunnel.rs). Text lines show the
//! span as a prefix, `connection{listener="tcp" peer=127.0.0.1:5000
//! dest=10.0.0.1:10250}: CONNECT refused ...`. JSON lines carry it as a
//! `span` object next to the event's own fields: `{"message": "CONNECT
//! refused", "error": ..., "span": {"name": "connection", "listener":
//! "tcp", "peer": ..., "dest": ...}}` ([`json_format`]).

use tracing_subscriber::fmt::format::{Format, Json, JsonFields};
use tracing_subscriber::EnvFilter;

/// Log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line: the event's fields at the top level, the
    /// span it was logged in (if any) as a `span` object.
    Json,
}

/// Install the global subscriber. `level` is an `EnvFilter` directive
/// (`info`, `nodetunnel=debug,russh=info`); `RUST_LOG` wins when set.
pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(format!("russh=warn,{level}")))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none(),
        )
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .event_format(json_format())
            .fmt_fields(JsonFields::new())
            .try_init(),
    };
    if result.is_err() {
        // A subscriber is already installed (tests): keep it.
    }
    let _ = tracing_log::LogTracer::init();
}

/// The JSON line shape: the event's fields flattened to the top level, and
/// the current span (the innermost, with its fields) as `span`. Not the
/// span list: nodetunnel's spans are roots that never nest (a connection
/// and a session are separate tasks), so the list would only repeat the
/// current span inside an array, and `.span.node` is simpler to query
/// than `.spans[]`. Public so that tests format lines exactly as `serve`
/// does (with [`JsonFields`] as the field formatter).
pub fn json_format() -> Format<Json> {
    tracing_subscriber::fmt::format()
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(false)
        .with_target(false)
}

/// Capture of log lines in the production JSON format, for tests.
#[cfg(test)]
pub(crate) mod capture {
    use std::io;
    use std::sync::{Arc, Mutex, PoisonError};

    use tracing_subscriber::fmt::format::JsonFields;

    /// The lines written so far (shared with the subscriber's writer).
    #[derive(Clone, Default)]
    pub(crate) struct JsonLog(Arc<Mutex<Vec<u8>>>);

    impl io::Write for JsonLog {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl JsonLog {
        /// Capture this thread's events (debug and up) until the guard
        /// drops; `#[tokio::test]` runs every task on the test's thread.
        pub(crate) fn capture() -> (JsonLog, tracing::subscriber::DefaultGuard) {
            let log = JsonLog::default();
            let writer = log.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::DEBUG)
                .event_format(super::json_format())
                .fmt_fields(JsonFields::new())
                .with_writer(move || writer.clone())
                .finish();
            (log, tracing::subscriber::set_default(subscriber))
        }

        /// The events whose message is `message`.
        pub(crate) fn with_message(&self, message: &str) -> Vec<serde_json::Value> {
            let bytes = self
                .0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            String::from_utf8_lossy(&bytes)
                .lines()
                .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
                .filter(|event| event["message"] == message)
                .collect()
        }
    }
}
