//! The standard process metrics every Prometheus exporter has
//! (`process_open_fds`, `process_max_fds`, `process_resident_memory_bytes`,
//! `process_cpu_seconds_total`, `process_start_time_seconds`), read from
//! `/proc/self` at each scrape, and the tokio runtime's worker count
//! (`nodetunnel_runtime_workers`).
//!
//! A value that cannot be read (not Linux, `/proc` not mounted) is left out
//! of the scrape rather than exported as a false zero.

use std::fs;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// One reading of the process's resources.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcessSample {
    /// Open file descriptors.
    pub open_fds: Option<u64>,
    /// The soft limit on open file descriptors (RLIMIT_NOFILE).
    pub max_fds: Option<u64>,
    /// Resident memory in bytes.
    pub resident_memory_bytes: Option<u64>,
    /// User and system CPU time in seconds.
    pub cpu_seconds: Option<f64>,
    /// When the process started, in Unix seconds.
    pub start_time_seconds: Option<f64>,
}

impl ProcessSample {
    /// Read `/proc/self` now.
    pub fn read() -> ProcessSample {
        let ticks = rustix::param::clock_ticks_per_second() as f64;
        let stat = fs::read_to_string("/proc/self/stat").ok();
        // Fields after the command name, which is in parentheses and may
        // itself hold spaces or parentheses: field 3 (state) is index 0.
        let fields: Vec<&str> = stat
            .as_deref()
            .and_then(|s| s.rsplit_once(") "))
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
        let cpu_seconds = match (field(14), field(15)) {
            (Some(utime), Some(stime)) if ticks > 0.0 => Some((utime + stime) as f64 / ticks),
            _ => None,
        };
        let boot_time = fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<u64>().ok())
        });
        let start_time_seconds = match (boot_time, field(22)) {
            (Some(boot), Some(start)) if ticks > 0.0 => Some(boot as f64 + start as f64 / ticks),
            _ => None,
        };
        let resident_memory_bytes = fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map(|pages| pages.saturating_mul(rustix::param::page_size() as u64));
        let open_fds = fs::read_dir("/proc/self/fd")
            .ok()
            .map(|dir| dir.count() as u64);
        let max_fds = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
        ProcessSample {
            open_fds,
            max_fds,
            resident_memory_bytes,
            cpu_seconds,
            start_time_seconds,
        }
    }
}

/// The `process_*` families, read at each scrape.
#[derive(Debug, Default)]
pub struct ProcessCollector;

fn gauge<N>(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: N) -> std::fmt::Result
where
    ConstGauge<N>: EncodeMetric,
{
    let gauge = ConstGauge::new(value);
    let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
    gauge.encode(metric)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let sample = ProcessSample::read();
        if let Some(cpu) = sample.cpu_seconds {
            let counter = ConstCounter::new(cpu);
            let metric = encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                counter.metric_type(),
            )?;
            counter.encode(metric)?;
        }
        if let Some(n) = sample.open_fds {
            let n = i64::try_from(n).unwrap_or(i64::MAX);
            gauge(
                &mut encoder,
                "process_open_fds",
                "Number of open file descriptors",
                n,
            )?;
        }
        if let Some(n) = sample.max_fds {
            let n = i64::try_from(n).unwrap_or(i64::MAX);
            gauge(
                &mut encoder,
                "process_max_fds",
                "Maximum number of open file descriptors (the soft RLIMIT_NOFILE)",
                n,
            )?;
        }
        if let Some(n) = sample.resident_memory_bytes {
            let n = i64::try_from(n).unwrap_or(i64::MAX);
            gauge(
                &mut encoder,
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                n,
            )?;
        }
        if let Some(t) = sample.start_time_seconds {
            gauge(
                &mut encoder,
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                t,
            )?;
        }
        Ok(())
    }
}

/// `nodetunnel_runtime_workers`: the worker threads of the tokio runtime
/// that answers the scrape (absent outside a runtime).
#[derive(Debug, Default)]
pub struct RuntimeCollector;

impl Collector for RuntimeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return Ok(());
        };
        let workers = i64::try_from(handle.metrics().num_workers()).unwrap_or(i64::MAX);
        gauge(
            &mut encoder,
            "runtime_workers",
            "Worker threads of the tokio runtime",
            workers,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn proc_self_gives_every_process_value() {
        let after = ProcessSample::read();
        // Other tests open and close files concurrently: no exact count.
        assert!(after.open_fds.is_some_and(|n| n >= 1), "{after:?}");
        assert!(after.max_fds >= after.open_fds, "{after:?}");
        assert!(after.resident_memory_bytes.is_some_and(|b| b > 1 << 20));
        assert!(after.cpu_seconds.is_some_and(|s| s >= 0.0));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs_f64();
        assert!(
            after
                .start_time_seconds
                .is_some_and(|t| t <= now + 1.0 && t > now - 86_400.0 * 365.0),
            "{after:?}"
        );
    }
}
