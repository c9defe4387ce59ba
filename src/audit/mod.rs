//! The audit trail: one record per tunnelled connection when it ends, and
//! one per refused request (who asked, which destination, which node and
//! rule, the result, bytes each way, how long, how it ended).
//!
//! This module owns the `[audit]` table ([`AuditConfig`]), the record
//! ([`AuditRecord`]), the handle connections send records through
//! ([`AuditSink`]), the writer task ([`run_writer`]) and the file
//! ([`AuditFile`]: mode 0600, size bound with rotation, logrotate).
//!
//! Writing never blocks the data path: [`AuditSink::record`] puts the
//! record in a bounded queue (`audit.queue`) with `try_send` and returns.
//! When the queue is full the record is dropped and counted
//! (`nodetunnel_audit_records_dropped_total`); once the writer has emptied
//! the queue it writes a summary line `{"time", "dropped": N, "since"}`.
//! One writer task takes records off the queue in batches and writes them
//! (blocking file I/O on the blocking pool); it ends after the
//! [`Shutdown`] signal, once every sender is gone (the front door drained)
//! or `linger` has passed, whichever is first, writing what is queued.

mod config;
mod file;
mod record;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, Notify};

use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

pub use config::{AuditConfig, AuditMode, MAX_KEEP_FILES, MAX_QUEUE, MIN_FILE_BYTES};
pub use file::{rotation, AuditFile, AuditFileError};
pub use record::{AuditRecord, Client, DroppedSummary, End, Event};

/// The log target of `mode = "log"` records.
pub const LOG_TARGET: &str = "nodetunnel::audit";

/// Records the writer takes off the queue at once.
const BATCH: usize = 256;

/// Where connections send their records: cheap to clone; off (records are
/// not even built) when `[audit]` is off.
#[derive(Clone, Debug, Default)]
pub struct AuditSink {
    shared: Option<(mpsc::Sender<AuditRecord>, Arc<Shared>)>,
}

/// The drop counters a sink and its queue share (the queue must not hold
/// a sender: the writer ends when every sink is gone).
struct Shared {
    /// Dropped since the last summary.
    dropped: AtomicU64,
    /// When the first of them was dropped.
    dropped_since: Mutex<Option<SystemTime>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("dropped", &self.dropped)
            .finish_non_exhaustive()
    }
}

impl AuditSink {
    /// A sink that records nothing.
    pub fn off() -> Self {
        AuditSink { shared: None }
    }

    /// Whether records are kept: build one only then.
    pub fn is_on(&self) -> bool {
        self.shared.is_some()
    }

    /// Queue `record` for the writer, or drop and count it if the queue is
    /// full. Never waits.
    pub fn record(&self, record: AuditRecord) {
        let Some((tx, shared)) = &self.shared else {
            return;
        };
        if tx.try_send(record).is_err() {
            shared.metrics.audit_records_dropped.inc();
            if shared.dropped.fetch_add(1, Ordering::AcqRel) == 0 {
                let mut since = shared
                    .dropped_since
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                since.get_or_insert_with(SystemTime::now);
            }
        }
    }
}

/// The receiving end of an [`AuditSink`], for [`run_writer`].
#[derive(Debug)]
pub struct AuditQueue {
    rx: mpsc::Receiver<AuditRecord>,
    shared: Arc<Shared>,
}

impl AuditQueue {
    /// The next record, waiting for one; `None` once every sink is gone
    /// (for callers that take records themselves instead of
    /// [`run_writer`], as tests do).
    pub async fn recv(&mut self) -> Option<AuditRecord> {
        self.rx.recv().await
    }

    /// The next record if one is queued.
    pub fn try_recv(&mut self) -> Option<AuditRecord> {
        self.rx.try_recv().ok()
    }

    /// The records dropped since the last summary, as a summary line.
    fn take_dropped(&self) -> Option<DroppedSummary> {
        let mut since = self
            .shared
            .dropped_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let dropped = self.shared.dropped.swap(0, Ordering::AcqRel);
        let first = since.take();
        (dropped > 0).then(|| DroppedSummary {
            time: SystemTime::now(),
            dropped,
            since: first.unwrap_or_else(SystemTime::now),
        })
    }
}

/// A sink and its queue of `queue` records.
pub fn channel(queue: usize, metrics: Arc<Metrics>) -> (AuditSink, AuditQueue) {
    let (tx, rx) = mpsc::channel(queue.max(1));
    let shared = Arc::new(Shared {
        dropped: AtomicU64::new(0),
        dropped_since: Mutex::new(None),
        metrics,
    });
    (
        AuditSink {
            shared: Some((tx, shared.clone())),
        },
        AuditQueue { rx, shared },
    )
}

/// Where the writer puts records.
#[derive(Debug)]
pub enum Output {
    /// One log event per record, target [`LOG_TARGET`].
    Log,
    /// The JSON-lines file.
    File(AuditFile),
}

impl Output {
    /// The output `config` asks for: `None` when audit is off. The file is
    /// opened (created 0600) here, so that a path that cannot be written
    /// stops the start.
    pub fn open(config: &AuditConfig) -> Result<Option<Output>, AuditFileError> {
        match (config.mode, &config.path) {
            (AuditMode::Off, _) => Ok(None),
            (AuditMode::Log, _) => Ok(Some(Output::Log)),
            (AuditMode::File, Some(path)) => Ok(Some(Output::File(AuditFile::open(
                path,
                config.max_file_bytes,
                config.keep_files,
            )?))),
            (AuditMode::File, None) => Err(AuditFileError {
                path: Default::default(),
                action: "open",
                error: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "audit.mode = \"file\" without audit.path",
                ),
            }),
        }
    }
}

/// Write what arrives on `queue` to `output` until the end described in
/// the module docs. `reopen` (SIGHUP) reopens the file before the next
/// batch.
pub async fn run_writer(
    mut queue: AuditQueue,
    output: Output,
    reopen: Arc<Notify>,
    shutdown: Shutdown,
    linger: Duration,
) {
    let metrics = queue.shared.metrics.clone();
    let mut writer = Writer {
        output: Some(output),
        reopen_asked: false,
        failing: false,
        metrics,
    };
    let mut batch = Vec::with_capacity(BATCH);
    let mut stop_at: Option<tokio::time::Instant> = None;
    loop {
        let received = tokio::select! {
            biased;
            () = reopen.notified() => {
                writer.reopen_asked = true;
                continue;
            }
            n = queue.rx.recv_many(&mut batch, BATCH) => n,
            () = shutdown.wait(), if stop_at.is_none() => {
                stop_at = Some(tokio::time::Instant::now() + linger);
                continue;
            }
            () = sleep_until(stop_at), if stop_at.is_some() => break,
        };
        if received == 0 {
            break; // every sender is gone
        }
        let dropped = queue.take_dropped();
        writer.write(std::mem::take(&mut batch), dropped).await;
    }
    // What is still queued (senders that outlived the linger).
    while let Ok(record) = queue.rx.try_recv() {
        batch.push(record);
    }
    let dropped = queue.take_dropped();
    writer.write(batch, dropped).await;
    writer.finish().await;
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

struct Writer {
    /// `None` only while a blocking write holds it.
    output: Option<Output>,
    reopen_asked: bool,
    /// The last write failed (logged once until one succeeds).
    failing: bool,
    metrics: Arc<Metrics>,
}

impl Writer {
    async fn write(&mut self, records: Vec<AuditRecord>, dropped: Option<DroppedSummary>) {
        if records.is_empty() && dropped.is_none() {
            return;
        }
        let count = records.len() as u64;
        let mut lines: Vec<String> = records.iter().map(AuditRecord::to_line).collect();
        if let Some(summary) = &dropped {
            tracing::warn!(
                dropped = summary.dropped,
                "audit records were dropped: the audit queue was full (audit.queue)"
            );
            lines.push(summary.to_line());
        }
        match self.output.take() {
            Some(Output::Log) => {
                for line in &lines {
                    tracing::info!(target: LOG_TARGET, record = %line.trim_end(), "audit");
                }
                self.output = Some(Output::Log);
                self.metrics.audit_records_written.inc_by(count);
            }
            Some(Output::File(mut file)) => {
                let reopen = std::mem::take(&mut self.reopen_asked);
                let joined = tokio::task::spawn_blocking(move || {
                    let reopened = if reopen { file.reopen() } else { Ok(()) };
                    let written = reopened.and_then(|()| file.write_lines(&lines));
                    (file, written)
                })
                .await;
                match joined {
                    Ok((file, written)) => {
                        self.output = Some(Output::File(file));
                        self.settle(written, count);
                    }
                    Err(error) => {
                        tracing::error!(error = %error, "audit writer failed: audit records are no longer written");
                        self.metrics.audit_records_dropped.inc_by(count);
                    }
                }
            }
            None => {
                self.metrics.audit_records_dropped.inc_by(count);
            }
        }
    }

    fn settle(&mut self, written: Result<(), AuditFileError>, count: u64) {
        match written {
            Ok(()) => {
                self.metrics.audit_records_written.inc_by(count);
                if std::mem::take(&mut self.failing) {
                    tracing::info!("audit file writable again");
                }
            }
            Err(error) => {
                self.metrics.audit_records_dropped.inc_by(count);
                if !std::mem::replace(&mut self.failing, true) {
                    tracing::error!(error = %error, "cannot write audit records: they are dropped and counted until the file is writable");
                }
            }
        }
    }

    async fn finish(&mut self) {
        if let Some(Output::File(file)) = self.output.take() {
            let synced = tokio::task::spawn_blocking(move || file.sync()).await;
            if let Ok(Err(error)) = synced {
                tracing::warn!(error = %error, "audit file not synced at exit");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u64) -> AuditRecord {
        let mut record = AuditRecord::new(Event::Connection, "uds", Client::default());
        record.bytes_to_node = n;
        record
    }

    fn lines(path: &std::path::Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .expect("audit file")
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_then_summarises() {
        let metrics = Arc::new(Metrics::new());
        let (sink, queue) = channel(2, metrics.clone());
        // Nothing drains the queue yet: the writer is stalled.
        for n in 0..5 {
            sink.record(record(n));
        }
        assert_eq!(metrics.audit_records_dropped.get(), 3);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let output = Output::File(AuditFile::open(&path, 1 << 20, 1).expect("open"));
        let shutdown = Shutdown::new();
        let writer = tokio::spawn(run_writer(
            queue,
            output,
            Arc::new(Notify::new()),
            shutdown.clone(),
            Duration::from_secs(5),
        ));
        drop(sink);
        writer.await.expect("writer");
        let written = lines(&path);
        assert_eq!(written.len(), 3, "{written:?}");
        assert_eq!(written[0]["bytes_to_node"], 0);
        assert_eq!(written[1]["bytes_to_node"], 1);
        assert_eq!(written[2]["dropped"], 3);
        assert!(written[2]["since"].is_string());
        assert_eq!(metrics.audit_records_written.get(), 2);
    }

    #[tokio::test]
    async fn the_writer_ends_after_shutdown_and_writes_what_is_queued() {
        tokio::time::pause();
        let metrics = Arc::new(Metrics::new());
        let (sink, queue) = channel(8, metrics.clone());
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let output = Output::File(AuditFile::open(&path, 1 << 20, 1).expect("open"));
        let shutdown = Shutdown::new();
        let writer = tokio::spawn(run_writer(
            queue,
            output,
            Arc::new(Notify::new()),
            shutdown.clone(),
            Duration::from_secs(5),
        ));
        sink.record(record(1));
        shutdown.trigger();
        sink.record(record(2));
        // The sink is still held (a leaked sender): the linger ends it.
        writer.await.expect("writer");
        let written = lines(&path);
        assert_eq!(written.len(), 2, "{written:?}");
        drop(sink);
    }

    #[tokio::test]
    async fn sighup_reopen_writes_to_the_new_file_at_the_path() {
        let metrics = Arc::new(Metrics::new());
        let (sink, queue) = channel(8, metrics.clone());
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let output = Output::File(AuditFile::open(&path, 1 << 20, 1).expect("open"));
        let reopen = Arc::new(Notify::new());
        let shutdown = Shutdown::new();
        let writer = tokio::spawn(run_writer(
            queue,
            output,
            reopen.clone(),
            shutdown.clone(),
            Duration::from_secs(5),
        ));
        sink.record(record(1));
        // Wait until the first record is on disk (written, not timed).
        while metrics.audit_records_written.get() < 1 {
            tokio::task::yield_now().await;
        }
        let moved = dir.path().join("audit.jsonl.old");
        std::fs::rename(&path, &moved).expect("rename");
        // A file put at the path by someone else (logrotate's create):
        // only a reopen switches to it, the inode check would too.
        std::fs::write(&path, "").expect("create");
        reopen.notify_one();
        sink.record(record(2));
        drop(sink);
        writer.await.expect("writer");
        assert_eq!(lines(&moved).len(), 1);
        let new = lines(&path);
        assert_eq!(new.len(), 1);
        assert_eq!(new[0]["bytes_to_node"], 2);
    }

    #[tokio::test]
    async fn log_mode_writes_each_record_as_one_audit_event() {
        let (log, _capture) = crate::logging::capture::JsonLog::capture();
        let metrics = Arc::new(Metrics::new());
        let (sink, queue) = channel(4, metrics.clone());
        let writer = tokio::spawn(run_writer(
            queue,
            Output::Log,
            Arc::new(Notify::new()),
            Shutdown::new(),
            Duration::from_secs(5),
        ));
        sink.record(record(7));
        drop(sink);
        writer.await.expect("writer");
        let events = log.with_message("audit");
        assert_eq!(events.len(), 1, "{events:?}");
        // The JSON format leaves targets out: the message says what it is
        // (the target, LOG_TARGET, is for log filters).
        assert_eq!(events[0]["level"], "INFO", "{}", events[0]);
        let record: serde_json::Value =
            serde_json::from_str(events[0]["record"].as_str().expect("record field"))
                .expect("the record as JSON");
        assert_eq!(record["bytes_to_node"], 7);
        assert_eq!(metrics.audit_records_written.get(), 1);
    }

    #[tokio::test]
    async fn an_off_sink_records_nothing() {
        let sink = AuditSink::off();
        assert!(!sink.is_on());
        sink.record(record(1));
    }
}
