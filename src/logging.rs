//! Log output: `tracing` to stderr as text or JSON lines.
//!
//! russh logs through the `log` crate; `tracing-subscriber`'s log bridge
//! turns those records into tracing events, so they obey the same filter and
//! format. The default filter keeps russh at `warn`: its debug output names
//! every packet.

use tracing_subscriber::EnvFilter;

/// Log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, fields at the top level.
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
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
    if result.is_err() {
        // A subscriber is already installed (tests): keep it.
    }
    let _ = tracing_log::LogTracer::init();
}
