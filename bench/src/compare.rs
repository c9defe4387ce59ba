//! `compare`: metrics 1-4 and 6-8, nodetunnel against `ssh -D`, in one run.
//!
//! Every measurement is repeated `--reps` times; within a repetition the
//! systems take turns (the order rotates from one repetition to the next),
//! so that drift in the machine's load hits all of them alike. The figure
//! reported is the median over the repetitions; the raw values go to the
//! results file too.
//!
//! With `--nt-grpc grpc+unix://PATH --counted-sink IP:PORT`, metrics 1 and 3
//! also run through the gRPC front door of the same nodetunnel process
//! (rows with `.grpc`, beside the `.http_connect` ones); its uploads go to
//! the counted sink, the gRPC protocol having no half-close.
//!
//! Results are appended to `--results FILE` (tab-separated: metric, unit,
//! nodetunnel, openssh, goal, raw) for `report` to print.

use std::io::Write;
use std::net::SocketAddrV4;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Barrier;

use crate::args::Args;
use crate::client::{self, close, open, pattern, read_to_eof, write_n, Proxy, CHUNK};
use crate::echo_load;
use crate::fairness;
use crate::procstat::{context_switches, cpu_seconds};
use crate::stats::{jain, median, percentile, sorted};

/// One system under test: a proxy and the process that does the work.
#[derive(Clone)]
struct System {
    /// Short label for logs: nt, nt-http, nt-grpc, nt-multi, ssh.
    label: &'static str,
    proxy: Proxy,
    pid: u32,
}

struct Ctx {
    nt: System,
    nt_http: System,
    /// The gRPC front door of the `nt` process (metrics 1 and 3 only).
    nt_grpc: Option<System>,
    nt_multi: Option<System>,
    ssh: System,
    sink: SocketAddrV4,
    /// The counted sink, for uploads through a proxy without half-close.
    counted_sink: Option<SocketAddrV4>,
    source: SocketAddrV4,
    echo: SocketAddrV4,
    reps: usize,
    clk_tck: f64,
    pattern: Arc<Vec<u8>>,
    results: std::path::PathBuf,
}

/// Bound on one bulk transfer of `n` bytes: 30 s plus 20 MB/s.
fn transfer_timeout(n: u64) -> Duration {
    Duration::from_secs(30) + Duration::from_secs_f64(n as f64 / 20e6)
}

async fn bounded<T>(
    what: &str,
    limit: Duration,
    f: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(limit, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: not done within {limit:?}")),
    }
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

/// The systems in turn order for repetition `rep` (rotated).
fn rotate<T: Clone>(v: &[T], rep: usize) -> Vec<T> {
    let mut v = v.to_vec();
    let len = v.len();
    v.rotate_left(rep % len.max(1));
    v
}

fn log(msg: impl AsRef<str>) {
    eprintln!("[bench] {}", msg.as_ref());
}

fn fmt_raw(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.1}"))
        .collect::<Vec<_>>()
        .join(",")
}

impl Ctx {
    /// Append one row to the results file.
    fn row(&self, metric: &str, unit: &str, nt: f64, ssh: f64, goal: &str, raw: &str) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.results)
            .expect("opening the results file");
        writeln!(f, "{metric}\t{unit}\t{nt}\t{ssh}\t{goal}\t{raw}").expect("writing results");
        let ratio = nt / ssh;
        log(format!(
            "metric={metric} nodetunnel={nt:.2} openssh={ssh:.2} ratio={ratio:.2}"
        ));
    }

    fn cpu(&self, s: &System) -> Result<f64, String> {
        cpu_seconds(s.pid, self.clk_tck)
    }

    /// Upload `n` bytes on one stream; (MB/s, CPU seconds of the system's process).
    async fn single_upload(&self, s: &System, n: u64) -> Result<(f64, f64), String> {
        let c0 = self.cpu(s)?;
        let x0 = context_switches(s.pid)?;
        let what = format!("{} upload {n} B", s.label);
        let upload = async {
            if s.proxy.half_closes() {
                client::upload(&s.proxy, self.sink, &self.pattern, n).await
            } else {
                let sink = self.counted_sink.ok_or_else(|| {
                    std::io::Error::other("no --counted-sink for a proxy without half-close")
                })?;
                client::upload_counted(&s.proxy, sink, &self.pattern, n).await
            }
        };
        let d = bounded(&what, transfer_timeout(n), upload).await?;
        let c1 = self.cpu(s)?;
        let x1 = context_switches(s.pid)?;
        log(format!(
            "{what}: {:.0} context switches per GB in the {} process",
            (x1 - x0) as f64 / (n as f64 / 1e9),
            s.label
        ));
        Ok((mbps(n, d), c1 - c0))
    }

    async fn single_download(&self, s: &System, n: u64) -> Result<(f64, f64), String> {
        let c0 = self.cpu(s)?;
        let x0 = context_switches(s.pid)?;
        let what = format!("{} download {n} B", s.label);
        let d = bounded(
            &what,
            transfer_timeout(n),
            client::download(&s.proxy, self.source, n),
        )
        .await?;
        let c1 = self.cpu(s)?;
        let x1 = context_switches(s.pid)?;
        log(format!(
            "{what}: {:.0} context switches per GB in the {} process",
            (x1 - x0) as f64 / (n as f64 / 1e9),
            s.label
        ));
        Ok((mbps(n, d), c1 - c0))
    }

    /// `streams` concurrent streams, each moving `per` bytes, all opened
    /// first and started together; (aggregate MB/s, CPU seconds).
    async fn aggregate(
        &self,
        s: &System,
        streams: usize,
        per: u64,
        upload: bool,
    ) -> Result<(f64, f64), String> {
        let c0 = self.cpu(s)?;
        let barrier = Arc::new(Barrier::new(streams + 1));
        let mut tasks = tokio::task::JoinSet::new();
        let limit = transfer_timeout(per * streams as u64);
        for _ in 0..streams {
            let proxy = s.proxy.clone();
            let barrier = barrier.clone();
            let pattern = self.pattern.clone();
            let dst = if upload { self.sink } else { self.source };
            tasks.spawn(async move {
                let opened = tokio::time::timeout(Duration::from_secs(20), open(&proxy, dst)).await;
                // Wait at the barrier whatever happened, so no one waits forever.
                barrier.wait().await;
                let mut c = match opened {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => return Err(format!("open: {e}")),
                    Err(_) => return Err("open: timed out".to_string()),
                };
                let io = async {
                    if upload {
                        write_n(&mut c, &pattern, per).await?;
                        c.shutdown().await?;
                        let mut count = [0u8; 8];
                        c.read_exact(&mut count).await?;
                        let got = u64::from_be_bytes(count);
                        if got != per {
                            return Err(std::io::Error::other(format!("sink got {got} of {per}")));
                        }
                        close(c).await;
                    } else {
                        c.write_all(&per.to_be_bytes()).await?;
                        let mut buf = vec![0u8; CHUNK];
                        let got = read_to_eof(&mut c, &mut buf).await?;
                        if got != per {
                            return Err(std::io::Error::other(format!("got {got} of {per}")));
                        }
                        let _ = c.shutdown().await;
                    }
                    Ok::<(), std::io::Error>(())
                };
                match tokio::time::timeout(limit, io).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("not done within {limit:?}")),
                }
            });
        }
        barrier.wait().await;
        let t0 = Instant::now();
        let mut errors = Vec::new();
        while let Some(r) = tasks.join_next().await {
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => errors.push(e),
                Err(e) => errors.push(e.to_string()),
            }
        }
        let d = t0.elapsed();
        if !errors.is_empty() {
            return Err(format!(
                "{} aggregate: {} of {streams} streams failed, first: {}",
                s.label,
                errors.len(),
                errors[0]
            ));
        }
        let c1 = self.cpu(s)?;
        Ok((mbps(per * streams as u64, d), c1 - c0))
    }

    /// `n` sequential opens; the latencies in microseconds, to the echoed
    /// byte and to the proxy's reply.
    async fn sequential_opens(&self, s: &System, n: usize) -> Result<(Vec<f64>, Vec<f64>), String> {
        let mut lat = Vec::with_capacity(n);
        let mut reply = Vec::with_capacity(n);
        for i in 0..n {
            let (r, d) = bounded(
                &format!("{} open {i}", s.label),
                Duration::from_secs(10),
                client::echo_open_timed(&s.proxy, self.echo),
            )
            .await?;
            lat.push(d.as_secs_f64() * 1e6);
            reply.push(r.as_secs_f64() * 1e6);
        }
        Ok((lat, reply))
    }

    /// `clients` concurrent clients opening (open + echo + close) in a loop
    /// for `dur`; (successful opens per second, failed opens). A client
    /// whose open fails goes on with the next one.
    async fn concurrent_opens(
        &self,
        s: &System,
        clients: usize,
        dur: Duration,
    ) -> Result<(f64, u64), String> {
        let deadline = Instant::now() + dur;
        let t0 = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..clients {
            let proxy = s.proxy.clone();
            let echo = self.echo;
            tasks.spawn(async move {
                let mut ok = 0u64;
                let mut failed = 0u64;
                let mut first: Option<String> = None;
                while Instant::now() < deadline {
                    match tokio::time::timeout(
                        Duration::from_secs(10),
                        client::echo_open(&proxy, echo),
                    )
                    .await
                    {
                        Ok(Ok(_)) => ok += 1,
                        Ok(Err(e)) => {
                            failed += 1;
                            first.get_or_insert(e.to_string());
                        }
                        Err(_) => {
                            failed += 1;
                            first.get_or_insert("open timed out".into());
                        }
                    }
                }
                (ok, failed, first)
            });
        }
        let mut total = 0u64;
        let mut failed = 0u64;
        let mut first = None;
        while let Some(r) = tasks.join_next().await {
            match r {
                Ok((ok, f, e)) => {
                    total += ok;
                    failed += f;
                    if first.is_none() {
                        first = e;
                    }
                }
                Err(e) => return Err(format!("{} concurrent opens: {e}", s.label)),
            }
        }
        let d = t0.elapsed();
        if let Some(e) = first {
            log(format!(
                "{}: {failed} opens failed with {clients} clients; first: {e}",
                s.label
            ));
        }
        if total == 0 {
            return Err(format!("{} concurrent opens: none succeeded", s.label));
        }
        Ok((total as f64 / d.as_secs_f64(), failed))
    }

    /// Head-of-line: one download alone, then the same download while another
    /// stream of the same proxy (same node, same session for nodetunnel with
    /// sessions_per_node = 1) has a reader that never reads.
    /// (unimpeded MB/s, impeded MB/s).
    async fn hol(&self, s: &System, n: u64) -> Result<(f64, f64), String> {
        let alone = bounded(
            &format!("{} HOL baseline", s.label),
            transfer_timeout(n),
            client::download(&s.proxy, self.source, n),
        )
        .await?;
        // The stalled stream: ask for far more than will ever be read.
        let mut stalled = bounded(
            &format!("{} HOL stalled open", s.label),
            Duration::from_secs(10),
            open(&s.proxy, self.source),
        )
        .await?;
        stalled
            .write_all(&(1u64 << 40).to_be_bytes())
            .await
            .map_err(|e| format!("{} HOL stalled request: {e}", s.label))?;
        // Let every buffer between the source and the stalled client fill.
        tokio::time::sleep(Duration::from_secs(1)).await;
        // A bounded impeded transfer: a full stall counts as 0 MB/s.
        let limit = Duration::from_secs(60).min(transfer_timeout(n));
        let impeded =
            match tokio::time::timeout(limit, client::download(&s.proxy, self.source, n)).await {
                Ok(Ok(d)) => mbps(n, d),
                Ok(Err(e)) => {
                    drop(stalled);
                    return Err(format!("{} HOL healthy stream: {e}", s.label));
                }
                Err(_) => {
                    log(format!(
                        "{}: healthy stream did not finish within {limit:?}: counted as 0",
                        s.label
                    ));
                    0.0
                }
            };
        drop(stalled);
        // Give the proxy a moment to tear the stalled stream down.
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok((mbps(n, alone), impeded))
    }
}

fn system(
    args: &Args,
    label: &'static str,
    url_key: &str,
    pid_key: &str,
) -> Result<System, String> {
    Ok(System {
        label,
        proxy: Proxy::parse(args.require(url_key)?)?,
        pid: args
            .require(pid_key)?
            .parse()
            .map_err(|e| format!("--{pid_key}: {e}"))?,
    })
}

fn addr(args: &Args, key: &str) -> Result<SocketAddrV4, String> {
    args.require(key)?
        .parse()
        .map_err(|e| format!("--{key}: {e}"))
}

pub async fn run(args: &Args) -> Result<(), String> {
    let nt = system(args, "nt", "nt-socks5", "nt-pid")?;
    let nt_http = System {
        label: "nt-http",
        proxy: Proxy::parse(args.require("nt-http")?)?,
        pid: nt.pid,
    };
    let nt_grpc = match args.get("nt-grpc") {
        Some(url) => Some(System {
            label: "nt-grpc",
            proxy: Proxy::parse(url)?,
            pid: nt.pid,
        }),
        None => None,
    };
    let counted_sink = match args.get("counted-sink") {
        Some(_) => Some(addr(args, "counted-sink")?),
        None if nt_grpc.is_some() => {
            return Err("--nt-grpc needs --counted-sink (gRPC has no half-close)".into())
        }
        None => None,
    };
    let nt_multi = match args.get("nt-multi-socks5") {
        Some(_) => Some(system(args, "nt-multi", "nt-multi-socks5", "nt-multi-pid")?),
        None => None,
    };
    let multi_sessions: usize = args.get_parse("nt-multi-sessions", 0)?;
    let ssh = system(args, "ssh", "ssh-socks5", "ssh-pid")?;
    let ctx = Ctx {
        nt,
        nt_http,
        nt_grpc,
        nt_multi,
        ssh,
        sink: addr(args, "sink")?,
        counted_sink,
        source: addr(args, "source")?,
        echo: addr(args, "echo")?,
        reps: args.get_parse("reps", 3usize)?.max(1),
        clk_tck: args.get_parse("clk-tck", 100f64)?,
        pattern: Arc::new(pattern()),
        results: args.require("results")?.into(),
    };
    let only: Vec<String> = args
        .get("only")
        .unwrap_or("single,aggregate,latency,hol,echo,fairness")
        .split(',')
        .map(str::to_string)
        .collect();
    let want = |m: &str| only.iter().any(|o| o == m);
    let single_bytes: u64 = args.get_parse("single-bytes", 1u64 << 30)?;
    let streams: usize = args.get_parse("streams", 64usize)?;
    let per_stream: u64 = args.get_parse("aggregate-bytes-per-stream", 16u64 << 20)?;
    let opens: usize = args.get_parse("opens", 2000usize)?;
    let clients: usize = args.get_parse("clients", 64usize)?;
    let opens_secs: f64 = args.get_parse("opens-secs", 5.0f64)?;
    let hol_bytes: u64 = args.get_parse("hol-bytes", 256u64 << 20)?;
    let echo_pace = echo_load::Pace {
        bulk_on: args.get_parse("echo-bulk", echo_load::BulkOn::OwnThread)?,
        rounds: args.get_parse("echo-rounds", 1000usize)?.max(1),
        every: Duration::from_secs_f64(args.get_parse("echo-every-ms", 2.0f64)? / 1e3),
    };
    let fair_streams: usize = args.get_parse("fairness-streams", 8usize)?.max(1);
    let fair_secs: f64 = args.get_parse("fairness-secs", 5.0f64)?;
    let reps = ctx.reps;

    // Warm-up: a few opens and a small transfer through each system.
    for s in [&ctx.nt, &ctx.nt_http, &ctx.ssh]
        .into_iter()
        .chain(ctx.nt_grpc.as_ref())
        .chain(ctx.nt_multi.as_ref())
    {
        ctx.sequential_opens(s, 20).await?;
        ctx.single_download(s, 16 << 20).await?;
    }

    if want("single") || want("single_upload") || want("single_download") {
        // Metrics 1 and 6: single stream, each way; CPU of the process.
        // Index 3: the gRPC front door, when given.
        let systems: Vec<System> = [ctx.nt.clone(), ctx.nt_http.clone(), ctx.ssh.clone()]
            .into_iter()
            .chain(ctx.nt_grpc.clone())
            .collect();
        let idx: Vec<usize> = (0..systems.len()).collect();
        for upload in [true, false] {
            let dir = if upload { "upload" } else { "download" };
            if !want(&format!("single_{dir}")) && !want("single") {
                continue;
            }
            let mut mb: [Vec<f64>; 4] = Default::default();
            let mut cpu: [Vec<f64>; 4] = Default::default();
            for rep in 0..reps {
                for (i, s) in rotate(&idx, rep).into_iter().map(|i| (i, &systems[i])) {
                    let (m, c) = if upload {
                        ctx.single_upload(s, single_bytes).await?
                    } else {
                        ctx.single_download(s, single_bytes).await?
                    };
                    log(format!(
                        "single {dir} {} rep {rep}: {m:.1} MB/s, {c:.2} CPU-s",
                        s.label
                    ));
                    mb[i].push(m);
                    cpu[i].push(c / (single_bytes as f64 / 1e9));
                }
            }
            let goal = "ratio>=1.0";
            ctx.row(
                &format!("single_{dir}_MBps"),
                "MB/s",
                median(&mb[0]),
                median(&mb[2]),
                goal,
                &format!("nt {} / ssh {}", fmt_raw(&mb[0]), fmt_raw(&mb[2])),
            );
            ctx.row(
                &format!("single_{dir}_MBps.http_connect"),
                "MB/s",
                median(&mb[1]),
                median(&mb[2]),
                "-",
                &format!("nt-http {} / ssh {}", fmt_raw(&mb[1]), fmt_raw(&mb[2])),
            );
            if systems.len() > 3 {
                ctx.row(
                    &format!("single_{dir}_MBps.grpc"),
                    "MB/s",
                    median(&mb[3]),
                    median(&mb[2]),
                    "-",
                    &format!("nt-grpc {} / ssh {}", fmt_raw(&mb[3]), fmt_raw(&mb[2])),
                );
            }
            ctx.row(
                &format!("cpu_s_per_GB_single_{dir}"),
                "CPU-s/GB",
                median(&cpu[0]),
                median(&cpu[2]),
                "-",
                &format!("nt {} / ssh {}", fmt_raw2(&cpu[0]), fmt_raw2(&cpu[2])),
            );
        }
    }

    if want("aggregate") {
        // Metric 2: 64 concurrent streams to one node.
        let mut systems = vec![ctx.nt.clone(), ctx.ssh.clone()];
        if let Some(m) = &ctx.nt_multi {
            systems.push(m.clone());
        }
        for upload in [false, true] {
            let dir = if upload { "upload" } else { "download" };
            let mut mb: Vec<Vec<f64>> = vec![Vec::new(); systems.len()];
            let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); systems.len()];
            let idx: Vec<usize> = (0..systems.len()).collect();
            for rep in 0..reps {
                for i in rotate(&idx, rep) {
                    let s = &systems[i];
                    let (m, c) = ctx.aggregate(s, streams, per_stream, upload).await?;
                    log(format!(
                        "aggregate {dir} x{streams} {} rep {rep}: {m:.1} MB/s, {c:.2} CPU-s",
                        s.label
                    ));
                    mb[i].push(m);
                    cpu[i].push(c / (per_stream as f64 * streams as f64 / 1e9));
                }
            }
            let ssh_mb = median(&mb[1]);
            if ctx.nt_multi.is_some() {
                ctx.row(
                    &format!("aggregate{streams}_{dir}_MBps"),
                    "MB/s",
                    median(&mb[2]),
                    ssh_mb,
                    "ratio>=1.5",
                    &format!(
                        "nt sessions_per_node={multi_sessions} {} / ssh {}",
                        fmt_raw(&mb[2]),
                        fmt_raw(&mb[1])
                    ),
                );
            }
            ctx.row(
                &format!("aggregate{streams}_{dir}_MBps.spn1"),
                "MB/s",
                median(&mb[0]),
                ssh_mb,
                "-",
                &format!(
                    "nt sessions_per_node=1 {} / ssh {}",
                    fmt_raw(&mb[0]),
                    fmt_raw(&mb[1])
                ),
            );
            let (nt_cpu, label) = if ctx.nt_multi.is_some() {
                (
                    median(&cpu[2]),
                    format!("nt sessions_per_node={multi_sessions}"),
                )
            } else {
                (median(&cpu[0]), "nt sessions_per_node=1".to_string())
            };
            ctx.row(
                &format!("cpu_s_per_GB_aggregate{streams}_{dir}"),
                "CPU-s/GB",
                nt_cpu,
                median(&cpu[1]),
                "-",
                &format!(
                    "{label} {} / ssh {}",
                    fmt_raw2(if ctx.nt_multi.is_some() {
                        &cpu[2]
                    } else {
                        &cpu[0]
                    }),
                    fmt_raw2(&cpu[1])
                ),
            );
        }
    }

    if want("latency") {
        // Metric 3: sequential open latency, then opens/s with many clients.
        // Index 3: the gRPC front door, when given.
        let systems: Vec<System> = [ctx.nt.clone(), ctx.nt_http.clone(), ctx.ssh.clone()]
            .into_iter()
            .chain(ctx.nt_grpc.clone())
            .collect();
        let idx: Vec<usize> = (0..systems.len()).collect();
        let mut suffixes = vec![("", 0usize), (".http_connect", 1)];
        if systems.len() > 3 {
            suffixes.push((".grpc", 3));
        }
        let mut p50s: [Vec<f64>; 4] = Default::default();
        let mut p99s: [Vec<f64>; 4] = Default::default();
        let mut reply50s: [Vec<f64>; 4] = Default::default();
        for rep in 0..reps {
            for i in rotate(&idx, rep) {
                let s = &systems[i];
                let (lat, reply) = ctx.sequential_opens(s, opens).await?;
                let (lat, reply) = (sorted(lat), sorted(reply));
                let (p50, p99) = (percentile(&lat, 50.0), percentile(&lat, 99.0));
                log(format!(
                    "opens x{opens} {} rep {rep}: p50 {p50:.0} us, p90 {:.0} us, p99 {p99:.0} us, \
                     p99.9 {:.0} us, max {:.0} us; proxy reply p50 {:.0} us; over 1 ms: {}, over 10 ms: {}",
                    s.label,
                    percentile(&lat, 90.0),
                    percentile(&lat, 99.9),
                    lat.last().copied().unwrap_or(f64::NAN),
                    percentile(&reply, 50.0),
                    lat.iter().filter(|&&x| x > 1000.0).count(),
                    lat.iter().filter(|&&x| x > 10000.0).count(),
                ));
                p50s[i].push(p50);
                p99s[i].push(p99);
                reply50s[i].push(percentile(&reply, 50.0));
            }
        }
        for &(suffix, i) in &suffixes {
            let goal50 = if suffix.is_empty() { "ratio<=1.0" } else { "-" };
            ctx.row(
                &format!("open_p50_us{suffix}"),
                "us",
                median(&p50s[i]),
                median(&p50s[2]),
                goal50,
                &format!(
                    "{} {} / ssh {}",
                    systems[i].label,
                    fmt_raw(&p50s[i]),
                    fmt_raw(&p50s[2])
                ),
            );
            ctx.row(
                &format!("open_p99_us{suffix}"),
                "us",
                median(&p99s[i]),
                median(&p99s[2]),
                "-",
                &format!(
                    "{} {} / ssh {}",
                    systems[i].label,
                    fmt_raw(&p99s[i]),
                    fmt_raw(&p99s[2])
                ),
            );
        }
        ctx.row(
            "open_reply_p50_us",
            "us",
            median(&reply50s[0]),
            median(&reply50s[2]),
            "-",
            &format!(
                "connect to the proxy's SOCKS5 success reply; nt {} / ssh {}",
                fmt_raw(&reply50s[0]),
                fmt_raw(&reply50s[2])
            ),
        );
        let dur = Duration::from_secs_f64(opens_secs);
        let mut rate: [Vec<f64>; 4] = Default::default();
        let mut failed = [0u64; 4];
        for rep in 0..reps {
            for i in rotate(&idx, rep) {
                let s = &systems[i];
                let (r, f) = ctx.concurrent_opens(s, clients, dur).await?;
                log(format!(
                    "opens/s with {clients} clients {} rep {rep}: {r:.0} ({f} failed)",
                    s.label
                ));
                rate[i].push(r);
                failed[i] += f;
            }
        }
        for &(suffix, i) in &suffixes {
            ctx.row(
                &format!("opens_per_s_c{clients}{suffix}"),
                "opens/s",
                median(&rate[i]),
                median(&rate[2]),
                "-",
                &format!(
                    "{} {} ({} failed) / ssh {} ({} failed)",
                    systems[i].label,
                    fmt_raw(&rate[i]),
                    failed[i],
                    fmt_raw(&rate[2]),
                    failed[2]
                ),
            );
        }
    }

    if want("hol") {
        // Metric 4: a healthy stream beside a stalled one, same node.
        let systems = [ctx.nt.clone(), ctx.ssh.clone()];
        let mut alone: [Vec<f64>; 2] = Default::default();
        let mut impeded: [Vec<f64>; 2] = Default::default();
        for rep in 0..reps {
            for i in rotate(&[0usize, 1], rep) {
                let s = &systems[i];
                let (a, b) = ctx.hol(s, hol_bytes).await?;
                log(format!(
                    "HOL {} rep {rep}: alone {a:.1} MB/s, beside a stalled stream {b:.1} MB/s",
                    s.label
                ));
                alone[i].push(a);
                impeded[i].push(b);
            }
        }
        ctx.row(
            "hol_unimpeded_MBps",
            "MB/s",
            median(&alone[0]),
            median(&alone[1]),
            "-",
            &format!("nt {} / ssh {}", fmt_raw(&alone[0]), fmt_raw(&alone[1])),
        );
        ctx.row(
            "hol_beside_stalled_MBps",
            "MB/s",
            median(&impeded[0]),
            median(&impeded[1]),
            "-",
            &format!("nt {} / ssh {}", fmt_raw(&impeded[0]), fmt_raw(&impeded[1])),
        );
        let kept = |i: usize| {
            let v: Vec<f64> = alone[i]
                .iter()
                .zip(&impeded[i])
                .map(|(a, b)| 100.0 * b / a)
                .collect();
            v
        };
        let (k0, k1) = (kept(0), kept(1));
        ctx.row(
            "hol_kept_pct",
            "%",
            median(&k0),
            median(&k1),
            "nt>=90",
            &format!("nt {} / ssh {}", fmt_raw(&k0), fmt_raw(&k1)),
        );
    }

    if want("echo") {
        // Metric 7: a one-byte echo on an open stream, idle and beside a
        // bulk upload and a bulk download on the same proxy and node.
        let systems = [ctx.nt.clone(), ctx.nt_http.clone(), ctx.ssh.clone()];
        let mut idle50: [Vec<f64>; 3] = Default::default();
        let mut load50: [Vec<f64>; 3] = Default::default();
        let mut load99: [Vec<f64>; 3] = Default::default();
        let mut bulk: [Vec<String>; 3] = Default::default();
        for rep in 0..reps {
            for i in rotate(&[0usize, 1, 2], rep) {
                let s = &systems[i];
                let r = echo_load::run(
                    &s.proxy,
                    ctx.echo,
                    ctx.sink,
                    ctx.source,
                    ctx.pattern.clone(),
                    echo_pace,
                )
                .await
                .map_err(|e| format!("{} echo under load: {e}", s.label))?;
                let (idle, load) = (sorted(r.idle_us), sorted(r.load_us));
                log(format!(
                    "echo x{} every {:?} (bulk: {:?}) {} rep {rep}: idle p50 {:.0} us, p99 {:.0} us; \
                     under load p50 {:.0} us, p90 {:.0} us, p99 {:.0} us, max {:.0} us; \
                     bulk meanwhile {:.1} MB/s up, {:.1} MB/s down",
                    echo_pace.rounds,
                    echo_pace.every,
                    echo_pace.bulk_on,
                    s.label,
                    percentile(&idle, 50.0),
                    percentile(&idle, 99.0),
                    percentile(&load, 50.0),
                    percentile(&load, 90.0),
                    percentile(&load, 99.0),
                    load.last().copied().unwrap_or(f64::NAN),
                    r.upload_mbps,
                    r.download_mbps,
                ));
                idle50[i].push(percentile(&idle, 50.0));
                load50[i].push(percentile(&load, 50.0));
                load99[i].push(percentile(&load, 99.0));
                bulk[i].push(format!("{:.0}/{:.0}", r.upload_mbps, r.download_mbps));
                // Let the proxy tear the two bulk streams down.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        for (suffix, i) in [("", 0usize), (".http_connect", 1)] {
            let goal = if suffix.is_empty() { "ratio<=1.0" } else { "-" };
            let raw = |v: &[Vec<f64>; 3]| {
                format!(
                    "{} {} / ssh {}",
                    systems[i].label,
                    fmt_raw(&v[i]),
                    fmt_raw(&v[2])
                )
            };
            ctx.row(
                &format!("echo_idle_p50_us{suffix}"),
                "us",
                median(&idle50[i]),
                median(&idle50[2]),
                "-",
                &raw(&idle50),
            );
            ctx.row(
                &format!("echo_load_p50_us{suffix}"),
                "us",
                median(&load50[i]),
                median(&load50[2]),
                goal,
                &format!(
                    "{}; bulk MB/s up/down meanwhile: {} {} / ssh {}",
                    raw(&load50),
                    systems[i].label,
                    bulk[i].join(","),
                    bulk[2].join(",")
                ),
            );
            ctx.row(
                &format!("echo_load_p99_us{suffix}"),
                "us",
                median(&load99[i]),
                median(&load99[2]),
                goal,
                &raw(&load99),
            );
        }
    }

    if want("fairness") {
        // Metric 8: `fair_streams` bulk streams at once on one session.
        let systems = [ctx.nt.clone(), ctx.ssh.clone()];
        let window = Duration::from_secs_f64(fair_secs);
        for upload in [false, true] {
            let dir = if upload { "upload" } else { "download" };
            let dst = if upload { ctx.sink } else { ctx.source };
            let mut jains: [Vec<f64>; 2] = Default::default();
            let mut totals: [Vec<f64>; 2] = Default::default();
            let mut shares: [Vec<String>; 2] = Default::default();
            for rep in 0..reps {
                for i in rotate(&[0usize, 1], rep) {
                    let s = &systems[i];
                    let per = fairness::run(
                        &s.proxy,
                        dst,
                        upload,
                        fair_streams,
                        Duration::from_secs(1),
                        window,
                        ctx.pattern.clone(),
                    )
                    .await
                    .map_err(|e| format!("{} fairness {dir}: {e}", s.label))?;
                    let total: f64 = per.iter().sum();
                    let mean = total / per.len() as f64;
                    let min = per.iter().copied().fold(f64::INFINITY, f64::min) / mean;
                    let max = per.iter().copied().fold(0.0, f64::max) / mean;
                    let j = jain(&per);
                    log(format!(
                        "fairness {dir} x{fair_streams} {} rep {rep}: Jain {j:.3}, {total:.1} MB/s in all, \
                         min {min:.2} / max {max:.2} of an equal share; per stream MB/s {}",
                        s.label,
                        fmt_raw(&per)
                    ));
                    jains[i].push(j);
                    totals[i].push(total);
                    shares[i].push(format!("{min:.2}-{max:.2}"));
                    // Let the proxy tear the streams down.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            ctx.row(
                &format!("fairness{fair_streams}_{dir}_jain"),
                "index",
                median(&jains[0]),
                median(&jains[1]),
                "nt>=0.95",
                &format!(
                    "nt {} / ssh {}; min-max of an equal share: nt {} / ssh {}",
                    fmt_raw3(&jains[0]),
                    fmt_raw3(&jains[1]),
                    shares[0].join(","),
                    shares[1].join(",")
                ),
            );
            ctx.row(
                &format!("fairness{fair_streams}_{dir}_MBps"),
                "MB/s",
                median(&totals[0]),
                median(&totals[1]),
                "-",
                &format!(
                    "all {fair_streams} streams over {fair_secs} s after 1 s of warm-up; nt {} / ssh {}",
                    fmt_raw(&totals[0]),
                    fmt_raw(&totals[1])
                ),
            );
        }
    }
    Ok(())
}

fn fmt_raw3(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.3}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn fmt_raw2(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.2}"))
        .collect::<Vec<_>>()
        .join(",")
}
