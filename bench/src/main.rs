//! nodetunnel-bench: the load generator of nodetunnel's benchmarks.
//!
//! Subcommands:
//!
//! - `serve`: the node side. Sink (read to EOF, answer the byte count as a
//!   u64 big-endian, close), counted sink (read a u64 big-endian N, then N
//!   bytes, answer N: for the gRPC front door, which has no half-close),
//!   source (read a u64 big-endian N, write N bytes, close) and echo servers.
//! - `wait`: retry one echo round trip through a proxy until it works (a
//!   readiness probe for `nodetunnel serve` and `ssh -D`).
//! - `transfer`: one upload or download through a proxy, by hand.
//! - `compare`: metrics 1-4 and 6-8 through nodetunnel (SOCKS5, HTTP
//!   CONNECT, and gRPC for metrics 1 and 3) and through `ssh -D` (SOCKS5);
//!   prints one
//!   `metric=... nodetunnel=... openssh=... ratio=...` line per metric and
//!   writes a markdown table.
//! - `report`: the metric lines and the markdown table from a results file.
//! - `scale-config`, `scale-nt`, `scale-ssh`: metric 5, idle sessions at
//!   scale against the farm (see `scale.rs`).
//! - `small`: metric 9, many small streams held open across many nodes
//!   (see `small.rs`).
//! - `farm` (feature `farm`): an SSH server accepting sessions on every
//!   address of 127.0.0.0/8 at one port, for the scale benchmark.
//!
//! Everything is bounded in time: each transfer, open and wait has a
//! deadline, and a missed deadline is an error, never a hang.

mod args;
mod client;
mod compare;
mod echo_load;
mod fairness;
#[cfg(feature = "farm")]
mod farm;
mod grpc;
mod procstat;
mod report;
mod scale;
mod serve;
mod small;
mod stats;

use std::process::ExitCode;

fn usage() -> &'static str {
    "usage: nodetunnel-bench serve|wait|transfer|compare|report|scale-config|scale-nt|scale-ssh|small|farm [--key value ...]\n\
     see bench/README.md"
}

fn main() -> ExitCode {
    let mut argv = std::env::args().skip(1);
    let Some(cmd) = argv.next() else {
        eprintln!("{}", usage());
        return ExitCode::from(2);
    };
    let args = match args::Args::parse(argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("nodetunnel-bench {cmd}: {e}");
            return ExitCode::from(2);
        }
    };
    // One thread for the load generator by default: the machine under test
    // has few cores, and the client must take as little of them as it can.
    let threads: usize = match args.get_parse("threads", 1) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("nodetunnel-bench {cmd}: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nodetunnel-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: Result<(), String> = rt.block_on(async move {
        match cmd.as_str() {
            "serve" => serve::run(&args).await,
            "wait" => client::wait(&args).await,
            "transfer" => client::transfer(&args).await,
            "compare" => compare::run(&args).await,
            "scale-config" => scale::config(&args).await,
            "scale-nt" => scale::nt(&args).await,
            "scale-ssh" => scale::ssh(&args).await,
            "small" => small::run(&args).await,
            "report" => report::run(&args),
            #[cfg(feature = "farm")]
            "farm" => farm::run(&args).await,
            #[cfg(not(feature = "farm"))]
            "farm" => Err(
                "built without the `farm` feature: cargo build --release --features farm".into(),
            ),
            _ => Err(format!("unknown subcommand {cmd:?}\n{}", usage())),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nodetunnel-bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}
