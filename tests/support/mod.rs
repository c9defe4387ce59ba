#![allow(dead_code)]
#![allow(unused_imports)]
//! Test support for nodetunnel's end-to-end tests: a real OpenSSH sshd on
//! loopback ([`sshd`]), a multi-node cluster in network namespaces
//! ([`testbed`], driven by `tests/testbed/testbed.sh`), the real
//! `nodetunnel serve` in that cluster ([`serve`]), test servers
//! ([`servers`]), small clients ([`clients`], and the konnectivity gRPC
//! client of [`konnectivity`]), and for the suites that
//! run the tunnel manager in the test process against in-process SSH nodes
//! ([`inproc`], [`inventory`]).
//!
//! Include it from an integration test with `mod support;`.
//!
//! Everything that starts a process or a namespace cleans up on `Drop`,
//! including when a test panics. Nothing here sleeps to synchronise: readiness
//! is polled with bounded deadlines.

pub mod clients;
pub mod inproc;
pub mod inventory;
pub mod konnectivity;
pub mod manager;
pub mod netns;
pub mod poll;
pub mod procs;
pub mod russh_log;
pub mod serve;
pub mod servers;
pub mod sshd;
pub mod testbed;

pub use clients::{
    admin_metrics, http_get, http_get_with, metric_value, tls_connector, HttpResponse,
};
pub use netns::{
    run_in_ns, run_in_ns_blocking, spawn_task_in_ns, tcp_connect_in_ns, tcp_connect_in_ns_std,
    tcp_listener_in_ns, NsTask,
};
pub use servers::{
    parse_sink_reply, pattern_bytes, pattern_sha256_hex, sha256_hex, spawn_local, spawn_server,
    PatternGen, ServerHandle, ServerKind,
};
pub use sshd::{free_loopback_port, ClientKey, Sshd, SshdOptions, SSHD_PATH};
pub use testbed::{spawn_in_ns, Node, Testbed};

use std::time::Duration;

/// Default deadline for anything that waits for readiness.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// The error for a missing sshd binary (used by [`Sshd`] and [`Testbed`]).
pub(crate) fn require_sshd(path: &std::path::Path) -> anyhow::Result<()> {
    if !path.exists() {
        anyhow::bail!(
            "OpenSSH sshd not found at {}: apt-get install openssh-server (bash .ci/run does this)",
            path.display()
        );
    }
    Ok(())
}
