//! Metric 8, fairness: `n` bulk streams through one proxy to one node at
//! once (for nodetunnel one SSH session), all downloads or all uploads;
//! how evenly the throughput is shared.
//!
//! The streams are opened first, started together and are open-ended (the
//! uploads write until stopped, the downloads ask the source for 1 TiB).
//! After a warm-up each stream's bytes are counted over a fixed window; a
//! stream that ends or fails before the window closes fails the run. Bytes
//! are counted where the load generator writes (uploads) or reads
//! (downloads): in the steady state what sits in buffers on the way is the
//! same at both ends of the window, so the difference is what went through.

use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Barrier};

use crate::client::{open, pump_down, pump_up, Proxy};

/// What each download asks the source for: far more than the window.
const DOWNLOAD_ASK: u64 = 1 << 40;

/// Run `streams` bulk streams to `dst` (the sink when `upload`, else the
/// source) for `warmup` then `window`; each stream's MB/s over the window.
pub async fn run(
    proxy: &Proxy,
    dst: SocketAddrV4,
    upload: bool,
    streams: usize,
    warmup: Duration,
    window: Duration,
    pattern: Arc<Vec<u8>>,
) -> Result<Vec<f64>, String> {
    let counters: Vec<Arc<AtomicU64>> = (0..streams).map(|_| Arc::default()).collect();
    let (stop, stopped) = watch::channel(false);
    let barrier = Arc::new(Barrier::new(streams + 1));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, moved) in counters.iter().enumerate() {
        let (proxy, moved, pattern, barrier) = (
            proxy.clone(),
            moved.clone(),
            pattern.clone(),
            barrier.clone(),
        );
        let mut stopped = stopped.clone();
        tasks.spawn(async move {
            let opened = tokio::time::timeout(Duration::from_secs(20), open(&proxy, dst)).await;
            // Wait at the barrier whatever happened, so no one waits forever.
            barrier.wait().await;
            let mut c = match opened {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return Err(format!("stream {i}: open: {e}")),
                Err(_) => return Err(format!("stream {i}: open: not done within 20 s")),
            };
            let pump = async {
                if upload {
                    pump_up(&mut c, &pattern, &moved).await
                } else {
                    pump_down(&mut c, DOWNLOAD_ASK, &moved).await
                }
            };
            tokio::select! {
                _ = stopped.wait_for(|s| *s) => Ok(()),
                r = pump => Err(format!(
                    "stream {i} ended before the window did: {}",
                    r.err().map_or("no error".into(), |e| e.to_string())
                )),
            }
            // `c` is dropped here, mid-transfer.
        });
    }
    barrier.wait().await;
    let snapshot = || -> Vec<u64> { counters.iter().map(|c| c.load(Ordering::Relaxed)).collect() };
    let early_end = |tasks: &mut tokio::task::JoinSet<Result<(), String>>| {
        // A task that is done before the stop has an error to tell.
        match tasks.try_join_next() {
            Some(Ok(Err(e))) => Some(e),
            Some(Ok(Ok(()))) => Some("a stream stopped early".to_string()),
            Some(Err(e)) => Some(format!("a stream task failed: {e}")),
            None => None,
        }
    };
    tokio::time::sleep(warmup).await;
    if let Some(e) = early_end(&mut tasks) {
        let _ = stop.send(true);
        return Err(e);
    }
    let b0 = snapshot();
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let b1 = snapshot();
    let dt = t0.elapsed().as_secs_f64();
    let failed = early_end(&mut tasks);
    let _ = stop.send(true);
    let mut errors: Vec<String> = failed.into_iter().collect();
    let drain = async {
        while let Some(r) = tasks.join_next().await {
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => errors.push(e),
                Err(e) => errors.push(e.to_string()),
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(20), drain)
        .await
        .is_err()
    {
        return Err("the streams did not stop within 20 s".into());
    }
    if let Some(e) = errors.first() {
        return Err(format!("{} of {streams} streams failed: {e}", errors.len()));
    }
    Ok(b0
        .iter()
        .zip(&b1)
        .map(|(a, b)| (b - a) as f64 / 1e6 / dt)
        .collect())
}
