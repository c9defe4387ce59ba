//! Metric 9, many small streams: the `kubectl logs -f` shape. Thousands of
//! streams held open across many nodes, each moving a few bytes a second;
//! what each open stream costs the proxy in memory, and the echo latency on
//! one more stream meanwhile.
//!
//! `small --proxies URL[,URL...] --targets IP:PORT[,...] --streams N
//! --mem-pids PID[,PID...] --mem rss|pss`: stream `k` goes to
//! `targets[k % len]` through `proxies[k % len]` (or through the one proxy
//! when only one is given: nodetunnel; one `ssh -D` per node for OpenSSH).
//! Each stream writes `--msg-bytes` (16) every `--every-secs` (1), their
//! phases spread evenly over the period, and reads them back from the echo
//! server. Memory is the sum over `--mem-pids` of VmRSS (`rss`) or of PSS
//! (`pss`, for many `ssh` processes that share their code) before the
//! first stream is opened, and again `--settle-secs` after the last one
//! opened; the difference divided by the streams. Then one more stream
//! (to the first target, on a thread of its own) times `--echo-rounds`
//! one-byte echoes, one every
//! `--echo-every-ms`, while the others go on, for at most `--echo-max-secs`
//! (30). A stream that fails fails the run. Prints `key=value` lines on
//! stdout, among them the messages per second the chain actually echoed
//! against the offered load (`streams / every`): well under it, the chain
//! was overloaded and the latencies are queueing.

use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{watch, Semaphore};

use crate::args::Args;
use crate::client::{close, echo_open, open, Conn, Proxy};
use crate::procstat::{pss_kib, rss_kib};
use crate::stats::{percentile, sorted};

/// How a process's memory is counted.
#[derive(Clone, Copy)]
enum Mem {
    Rss,
    Pss,
}

fn mem_kib(pids: &[u32], how: Mem) -> Result<u64, String> {
    let mut sum = 0;
    for &p in pids {
        sum += match how {
            Mem::Rss => rss_kib(p)?,
            Mem::Pss => pss_kib(p)?,
        };
    }
    Ok(sum)
}

fn list<T: std::str::FromStr>(args: &Args, key: &str) -> Result<Vec<T>, String>
where
    T::Err: std::fmt::Display,
{
    args.require(key)?
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|e| format!("--{key} {s:?}: {e}")))
        .collect()
}

/// What the chattering streams share.
struct Chatter {
    msg: Vec<u8>,
    every: Duration,
    stop: watch::Receiver<bool>,
    /// Messages echoed back, over all streams.
    echoed: AtomicU64,
    failed: AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
    /// Round trips of the small messages while this is set (microseconds).
    recording: AtomicBool,
    rtts: std::sync::Mutex<Vec<f64>>,
}

impl Chatter {
    fn fail(&self, e: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut f) = self.first_error.lock() {
            f.get_or_insert(e);
        }
    }
}

/// One small stream: `msg` every `every` from `start`, read back, until stop.
async fn chatter(mut c: Conn, start: tokio::time::Instant, ch: Arc<Chatter>, k: usize) {
    let mut next = start;
    let mut back = vec![0u8; ch.msg.len()];
    let mut stop = ch.stop.clone();
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            _ = tokio::time::sleep_until(next) => {}
        }
        let t0 = Instant::now();
        let round = async {
            c.write_all(&ch.msg).await?;
            c.read_exact(&mut back).await?;
            Ok::<(), std::io::Error>(())
        };
        match tokio::time::timeout(Duration::from_secs(10), round).await {
            Ok(Ok(())) if back == ch.msg => {}
            Ok(Ok(())) => return ch.fail(format!("stream {k}: other bytes came back")),
            Ok(Err(e)) => return ch.fail(format!("stream {k}: {e}")),
            Err(_) => return ch.fail(format!("stream {k}: message not back within 10 s")),
        }
        ch.echoed.fetch_add(1, Ordering::Relaxed);
        if ch.recording.load(Ordering::Relaxed) {
            if let Ok(mut r) = ch.rtts.lock() {
                r.push(t0.elapsed().as_secs_f64() * 1e6);
            }
        }
        // A late message does not make the next ones catch up in a burst:
        // the stream goes on at its pace from now (the offered load is at
        // most one message per period per stream, and `small_msgs_per_s`
        // says when the chain could not carry even that).
        next += ch.every;
        let now = tokio::time::Instant::now();
        if next < now {
            next = now + ch.every;
        }
    }
    // Close as OpenSSH does (see client::close), bounded.
    let _ = c.shutdown().await;
    let mut buf = [0u8; 256];
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while matches!(c.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// The timed echo: `rounds` one-byte echoes, one every `every`, for at
/// most `max`, after 20 untimed ones (first-use costs on every hop).
struct EchoSeries {
    rounds: usize,
    every: Duration,
    max: Duration,
}

impl EchoSeries {
    /// The latencies in microseconds; `recording` is set while they are
    /// timed (the chatter records its own round trips meanwhile).
    async fn run(
        &self,
        proxy: &Proxy,
        target: SocketAddrV4,
        recording: &AtomicBool,
    ) -> Result<Vec<f64>, String> {
        let mut c = match tokio::time::timeout(Duration::from_secs(20), open(proxy, target)).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(format!("open: {e}")),
            Err(_) => return Err("open timed out".into()),
        };
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut lat = Vec::with_capacity(self.rounds);
        let mut b = [0u8; 1];
        let mut deadline = Instant::now() + self.max;
        for i in 0..self.rounds + 20 {
            // Bounded in time too: on an overloaded chain each echo can take
            // seconds; what was timed by then is reported (`echo_rounds`).
            if i > 20 && Instant::now() > deadline {
                break;
            }
            tick.tick().await;
            if i == 20 {
                recording.store(true, Ordering::Relaxed);
                deadline = Instant::now() + self.max;
            }
            let t = Instant::now();
            let round = async {
                c.write_all(b"k").await?;
                c.read_exact(&mut b).await?;
                Ok::<(), std::io::Error>(())
            };
            match tokio::time::timeout(Duration::from_secs(10), round).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(format!("echo {i}: {e}")),
                Err(_) => return Err(format!("echo {i}: not back within 10 s")),
            }
            if i >= 20 {
                lat.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        recording.store(false, Ordering::Relaxed);
        close(c).await;
        Ok(lat)
    }
}

pub async fn run(args: &Args) -> Result<(), String> {
    let proxies: Vec<Proxy> = args
        .require("proxies")?
        .split(',')
        .map(Proxy::parse)
        .collect::<Result<_, _>>()?;
    let targets: Vec<SocketAddrV4> = list(args, "targets")?;
    if targets.is_empty() || (proxies.len() != 1 && proxies.len() != targets.len()) {
        return Err(format!(
            "{} proxies for {} targets: give one proxy, or one per target",
            proxies.len(),
            targets.len()
        ));
    }
    let streams: usize = args.get_parse("streams", 10_000usize)?;
    let mem_pids: Vec<u32> = list(args, "mem-pids")?;
    let how = match args.get("mem").unwrap_or("rss") {
        "rss" => Mem::Rss,
        "pss" => Mem::Pss,
        m => return Err(format!("--mem {m:?}: rss or pss")),
    };
    let msg_bytes: usize = args.get_parse("msg-bytes", 16usize)?.max(1);
    let every = Duration::from_secs_f64(args.get_parse("every-secs", 1.0f64)?);
    let settle = Duration::from_secs_f64(args.get_parse("settle-secs", 5.0f64)?);
    let rounds: usize = args.get_parse("echo-rounds", 1000usize)?.max(1);
    let echo_every = Duration::from_secs_f64(args.get_parse("echo-every-ms", 2.0f64)? / 1e3);
    let echo_max = Duration::from_secs_f64(args.get_parse("echo-max-secs", 30.0f64)?);
    let concurrency: usize = args.get_parse("open-concurrency", 64usize)?.max(1);
    let ready_timeout = Duration::from_secs(args.get_parse("ready-timeout-secs", 60u64)?);
    let route = |k: usize| {
        let t = k % targets.len();
        (&proxies[if proxies.len() == 1 { 0 } else { t }], targets[t])
    };

    // Every proxy carries an echo to every target before anything is counted.
    let deadline = Instant::now() + ready_timeout;
    for k in 0..targets.len() {
        let (proxy, target) = route(k);
        loop {
            match tokio::time::timeout(Duration::from_secs(5), echo_open(proxy, target)).await {
                Ok(Ok(_)) => break,
                Ok(Err(e)) if Instant::now() > deadline => {
                    return Err(format!("{proxy:?} -> {target}: not ready: {e}"))
                }
                Err(_) if Instant::now() > deadline => {
                    return Err(format!("{proxy:?} -> {target}: not ready: timed out"))
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = mem_kib(&mem_pids, how)?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let msg: Vec<u8> = (0..msg_bytes).map(|i| b'a' + (i % 26) as u8).collect();
    let ch = Arc::new(Chatter {
        msg,
        every,
        stop: stop_rx,
        echoed: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        first_error: std::sync::Mutex::new(None),
        recording: AtomicBool::new(false),
        rtts: std::sync::Mutex::new(Vec::new()),
    });
    // Open them all, `concurrency` at a time; each starts chattering at its
    // phase once open.
    let t0 = Instant::now();
    let epoch = tokio::time::Instant::now();
    let gate = Arc::new(Semaphore::new(concurrency));
    let mut opens = tokio::task::JoinSet::new();
    let mut chatters = tokio::task::JoinSet::new();
    for k in 0..streams {
        let (proxy, target) = route(k);
        let proxy = proxy.clone();
        let gate = gate.clone();
        opens.spawn(async move {
            let _permit = gate.acquire_owned().await;
            match tokio::time::timeout(Duration::from_secs(20), open(&proxy, target)).await {
                Ok(Ok(c)) => Ok((k, c)),
                Ok(Err(e)) => Err(format!("stream {k} to {target}: open: {e}")),
                Err(_) => Err(format!("stream {k} to {target}: open not done within 20 s")),
            }
        });
    }
    let mut open_errors = Vec::new();
    while let Some(r) = opens.join_next().await {
        match r {
            Ok(Ok((k, c))) => {
                let phase = every.mul_f64(k as f64 / streams as f64);
                let mut start = epoch + phase;
                while start < tokio::time::Instant::now() {
                    start += every;
                }
                chatters.spawn(chatter(c, start, ch.clone(), k));
            }
            Ok(Err(e)) => open_errors.push(e),
            Err(e) => open_errors.push(e.to_string()),
        }
    }
    let opened_s = t0.elapsed().as_secs_f64();
    let stop_all = |why: String| {
        let _ = stop_tx.send(true);
        why
    };
    if let Some(e) = open_errors.first() {
        return Err(stop_all(format!(
            "{} of {streams} opens failed; first: {e}",
            open_errors.len()
        )));
    }
    eprintln!("[small] {streams} streams open in {opened_s:.1} s");
    let (m0, s0) = (ch.echoed.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(settle).await;
    let after = mem_kib(&mem_pids, how)?;
    let msgs_per_s = (ch.echoed.load(Ordering::Relaxed) - m0) as f64 / s0.elapsed().as_secs_f64();
    let offered = streams as f64 / every.as_secs_f64();
    eprintln!(
        "[small] {msgs_per_s:.0} messages/s echoed of {offered:.0} offered; memory {before} -> {after} KiB"
    );

    // The echo on one more stream, while the others chatter, on a thread of
    // its own: on this one, the echoed byte would wait for the chatter's
    // ready sockets to be served first, and the load generator's own queue
    // would be measured.
    let (proxy, target) = route(0);
    let (proxy, echo_ch) = (proxy.clone(), ch.clone());
    let echo = EchoSeries {
        rounds,
        every: echo_every,
        max: echo_max,
    };
    let thread = std::thread::Builder::new()
        .name("echo".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("echo runtime: {e}"))?;
            rt.block_on(echo.run(&proxy, target, &echo_ch.recording))
        })
        .map_err(|e| stop_all(format!("starting the echo thread: {e}")))?;
    let lat = match tokio::task::spawn_blocking(move || thread.join()).await {
        Ok(Ok(Ok(lat))) => lat,
        Ok(Ok(Err(e))) => return Err(stop_all(format!("the echo stream: {e}"))),
        Ok(Err(_)) => return Err(stop_all("the echo thread panicked".into())),
        Err(e) => return Err(stop_all(format!("joining the echo thread: {e}"))),
    };
    ch.recording.store(false, Ordering::Relaxed);
    let failed = ch.failed.load(Ordering::Relaxed);
    let echoed = ch.echoed.load(Ordering::Relaxed);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(Duration::from_secs(60), async {
        while chatters.join_next().await.is_some() {}
    })
    .await
    .is_ok();
    let lat = sorted(lat);
    let rtts = sorted(ch.rtts.lock().map(|r| r.clone()).unwrap_or_default());
    println!("streams={streams}");
    println!("opened_s={opened_s:.3}");
    println!("mem_before_kib={before}");
    println!("mem_after_kib={after}");
    println!(
        "kib_per_stream={:.2}",
        (after as f64 - before as f64) / streams as f64
    );
    println!("small_msgs_per_s={msgs_per_s:.0}");
    println!("small_msgs_offered_per_s={offered:.0}");
    println!("echo_rounds={}", lat.len());
    println!("echo_p50_us={:.1}", percentile(&lat, 50.0));
    println!("echo_p99_us={:.1}", percentile(&lat, 99.0));
    println!("small_msgs_echoed={echoed}");
    println!("small_msg_p50_us={:.1}", percentile(&rtts, 50.0));
    println!("small_msg_p99_us={:.1}", percentile(&rtts, 99.0));
    println!("failed={failed}");
    if failed > 0 {
        let first = ch
            .first_error
            .lock()
            .ok()
            .and_then(|f| f.clone())
            .unwrap_or_default();
        return Err(format!(
            "{failed} of {streams} streams failed; first: {first}"
        ));
    }
    if !drained {
        eprintln!("[small] the streams did not all close within 60 s");
    }
    Ok(())
}
