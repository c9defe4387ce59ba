//! Metric 7, echo under load: the keystroke of a `kubectl exec` while a
//! `kubectl cp` runs each way through the same proxy to the same node.
//!
//! One stream to the echo server stays open; a one-byte echo is timed on it
//! (send one byte, time until it comes back) at a fixed pace, first with
//! nothing else on the proxy, then while a bulk upload to the sink and a bulk
//! download from the source run on two other streams of the same proxy.
//!
//! The bulk streams run on a thread of their own (with a current-thread
//! runtime), as `kubectl cp` is a process of its own: on the load
//! generator's single thread a 256 KiB read of the bulk download would sit
//! between the echo's byte arriving and its timestamp. (`--echo-bulk
//! shared` runs them on that one thread anyway: less CPU for the load
//! generator, see [`BulkOn`].) They are open-ended
//! (the upload writes until told to stop, the download asks the source for
//! 1 TiB), run from before the first timed echo until after the last, and
//! stop when the echo run is done; a bulk stream that ends or fails before
//! that is an error, not a lighter load.

use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;

use crate::client::{close, open, pump_down, pump_up, Conn, Proxy};

/// What the download asks the source for: far more than the echo run lasts.
const DOWNLOAD_ASK: u64 = 1 << 40;

/// One echo run: the latencies in microseconds, idle and under load, and
/// the bulk throughput while the loaded echoes ran.
pub struct EchoRun {
    pub idle_us: Vec<f64>,
    pub load_us: Vec<f64>,
    pub upload_mbps: f64,
    pub download_mbps: f64,
}

/// Pace and count of the echoes, and where the bulk streams run.
#[derive(Clone, Copy)]
pub struct Pace {
    /// Where the bulk streams run in the load generator.
    pub bulk_on: BulkOn,
    /// Timed echoes per series (idle, loaded).
    pub rounds: usize,
    /// One echo starts every `every` (later if the previous one is not back).
    pub every: Duration,
}

/// Bytes moved by the bulk streams so far.
#[derive(Default)]
struct Moved {
    up: AtomicU64,
    down: AtomicU64,
}

/// Where the bulk streams run in the load generator.
#[derive(Clone, Copy, Debug)]
pub enum BulkOn {
    /// A thread of their own (the default): like `kubectl cp`, a process of
    /// its own, so the echo's thread only waits for its own byte.
    OwnThread,
    /// The echo's own single-threaded runtime: the bulk streams take at
    /// most that one thread, so less of the machine, but the echo's wake-up
    /// waits behind their reads and writes on the client side.
    Shared,
}

impl std::str::FromStr for BulkOn {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "own-thread" => Ok(BulkOn::OwnThread),
            "shared" => Ok(BulkOn::Shared),
            _ => Err(format!("{s:?}: own-thread or shared")),
        }
    }
}

/// The running bulk load.
enum Runner {
    Thread(JoinHandle<Result<(), String>>),
    Task(tokio::task::JoinHandle<Result<(), String>>),
}

/// The bulk upload and download, running until [`Load::stop`].
struct Load {
    moved: Arc<Moved>,
    stop: watch::Sender<bool>,
    runner: Option<Runner>,
}

impl Load {
    fn start(
        proxy: &Proxy,
        sink: SocketAddrV4,
        source: SocketAddrV4,
        pattern: Arc<Vec<u8>>,
        on: BulkOn,
    ) -> Result<Load, String> {
        let moved = Arc::new(Moved::default());
        let (stop, stopped) = watch::channel(false);
        let proxy = proxy.clone();
        let m = moved.clone();
        let runner = match on {
            BulkOn::OwnThread => Runner::Thread(
                std::thread::Builder::new()
                    .name("bulk-load".into())
                    .spawn(move || {
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .map_err(|e| format!("bulk load runtime: {e}"))?;
                        rt.block_on(bulk(proxy, sink, source, pattern, m, stopped))
                    })
                    .map_err(|e| format!("starting the bulk load thread: {e}"))?,
            ),
            BulkOn::Shared => {
                Runner::Task(tokio::spawn(bulk(proxy, sink, source, pattern, m, stopped)))
            }
        };
        Ok(Load {
            moved,
            stop,
            runner: Some(runner),
        })
    }

    fn bytes(&self) -> (u64, u64) {
        (
            self.moved.up.load(Ordering::Relaxed),
            self.moved.down.load(Ordering::Relaxed),
        )
    }

    fn finished(&self) -> bool {
        match &self.runner {
            None => true,
            Some(Runner::Thread(t)) => t.is_finished(),
            Some(Runner::Task(t)) => t.is_finished(),
        }
    }

    /// Stop both bulk streams (they are dropped mid-transfer) and wait for
    /// the thread; its error if a stream failed before the stop.
    async fn stop(mut self) -> Result<(), String> {
        let _ = self.stop.send(true);
        match self.runner.take() {
            None => Ok(()),
            Some(Runner::Thread(t)) => match tokio::task::spawn_blocking(move || t.join()).await {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => Err("the bulk load thread panicked".into()),
                Err(e) => Err(format!("joining the bulk load thread: {e}")),
            },
            Some(Runner::Task(t)) => match t.await {
                Ok(r) => r,
                Err(e) => Err(format!("the bulk load task: {e}")),
            },
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        // An early return (an echo error) still stops the bulk streams.
        let _ = self.stop.send(true);
    }
}

/// The bulk load: both streams until `stopped` turns true.
async fn bulk(
    proxy: Proxy,
    sink: SocketAddrV4,
    source: SocketAddrV4,
    pattern: Arc<Vec<u8>>,
    moved: Arc<Moved>,
    mut stopped: watch::Receiver<bool>,
) -> Result<(), String> {
    let opened = async {
        let up = open(&proxy, sink).await?;
        let down = open(&proxy, source).await?;
        Ok::<_, std::io::Error>((up, down))
    };
    let (mut up, mut down) = match tokio::time::timeout(Duration::from_secs(20), opened).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(format!("opening the bulk streams: {e}")),
        Err(_) => return Err("opening the bulk streams: not done within 20 s".into()),
    };
    let upload = pump_up(&mut up, &pattern, &moved.up);
    let download = pump_down(&mut down, DOWNLOAD_ASK, &moved.down);
    tokio::select! {
        _ = stopped.wait_for(|s| *s) => Ok(()),
        r = upload => Err(format!("bulk upload: {}", r.err().map_or("ended".into(), |e| e.to_string()))),
        r = download => Err(format!("bulk download: {}", r.err().map_or("ended".into(), |e| e.to_string()))),
    }
    // `up` and `down` are dropped here: the proxy sees both streams close.
}

/// `rounds` one-byte echoes on `c`, one every `every`; microseconds each.
async fn echo_series(c: &mut Conn, pace: Pace) -> Result<Vec<f64>, String> {
    let mut tick = tokio::time::interval(pace.every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut lat = Vec::with_capacity(pace.rounds);
    let mut b = [0u8; 1];
    for i in 0..pace.rounds {
        tick.tick().await;
        let t0 = Instant::now();
        let round = async {
            c.write_all(b"k").await?;
            c.read_exact(&mut b).await?;
            Ok::<(), std::io::Error>(())
        };
        match tokio::time::timeout(Duration::from_secs(10), round).await {
            Ok(Ok(())) if b == *b"k" => {}
            Ok(Ok(())) => return Err(format!("echo {i}: another byte came back")),
            Ok(Err(e)) => return Err(format!("echo {i}: {e}")),
            Err(_) => return Err(format!("echo {i}: not back within 10 s")),
        }
        lat.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    Ok(lat)
}

/// One run through `proxy`: the idle series, then the loaded series.
pub async fn run(
    proxy: &Proxy,
    echo: SocketAddrV4,
    sink: SocketAddrV4,
    source: SocketAddrV4,
    pattern: Arc<Vec<u8>>,
    pace: Pace,
) -> Result<EchoRun, String> {
    let mut c = match tokio::time::timeout(Duration::from_secs(10), open(proxy, echo)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(format!("opening the echo stream: {e}")),
        Err(_) => return Err("opening the echo stream: not done within 10 s".into()),
    };
    // A few untimed echoes first (first-use costs on every hop).
    echo_series(&mut c, Pace { rounds: 20, ..pace }).await?;
    let idle_us = echo_series(&mut c, pace).await?;

    let load = Load::start(proxy, sink, source, pattern, pace.bulk_on)?;
    // Both bulk streams moving, then half a second for the windows and
    // socket buffers on the way to fill: the echoes see the steady state.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if load.finished() {
            return Err(load.stop().await.err().unwrap_or("bulk load ended".into()));
        }
        let (u, d) = load.bytes();
        if u >= 1 << 20 && d >= 1 << 20 {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "bulk load: {u} B up, {d} B down after 20 s (want 1 MiB each)"
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (u0, d0) = load.bytes();
    let t0 = Instant::now();
    let load_us = echo_series(&mut c, pace).await;
    let (u1, d1) = load.bytes();
    let dt = t0.elapsed().as_secs_f64();
    let still_running = !load.finished();
    let stopped = load.stop().await;
    let load_us = load_us?;
    stopped?;
    if !still_running {
        return Err("the bulk load ended before the echo run did".into());
    }
    close(c).await;
    Ok(EchoRun {
        idle_us,
        load_us,
        upload_mbps: (u1 - u0) as f64 / 1e6 / dt,
        download_mbps: (d1 - d0) as f64 / 1e6 / dt,
    })
}
