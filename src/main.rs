//! The `nodetunnel` binary: parses the command line and hands over to
//! [`nodetunnel::cli::run`].
#![forbid(unsafe_code)]

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = nodetunnel::cli::Cli::parse();
    nodetunnel::logging::init(cli.log_format, &cli.log_level);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all().thread_name("nodetunnel");
    builder.worker_threads(nodetunnel::cli::worker_threads(cli.worker_threads));
    let runtime = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nodetunnel: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(nodetunnel::cli::run(cli));
    // Blocking stdin readers (dial) must not keep the process alive.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}
