//! Running code inside a named network namespace (`ip netns add NAME`)
//! without a separate binary: a dedicated thread calls setns(2) and builds its
//! own tokio runtime. Sockets keep the namespace they were created in, so a
//! socket made there can be handed back and used from any thread or runtime.

use std::fs::File;
use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use nix::sched::CloneFlags;

/// Where `ip netns` keeps its namespace files.
pub const NETNS_DIR: &str = "/var/run/netns";

pub fn netns_path(ns: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(ns)
}

/// Move the calling thread into network namespace `ns`. Only ever call this
/// on a thread you created and that dies afterwards.
pub fn enter_netns(ns: &str) -> Result<()> {
    let path = netns_path(ns);
    let f = File::open(&path).with_context(|| {
        format!(
            "opening network namespace {} (does it exist?)",
            path.display()
        )
    })?;
    nix::sched::setns(&f, CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("setns into {} (needs root)", path.display()))
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic".to_string()
    }
}

/// Run `f` on a fresh thread inside namespace `ns` (or in the current one
/// when `ns` is None) with its own current-thread runtime, blocking the
/// caller until it finishes. A panic in `f` becomes an error.
pub fn run_in_ns_blocking<F, Fut, T>(ns: Option<&str>, f: F) -> Result<T>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
    T: Send + 'static,
{
    let ns_owned = ns.map(str::to_owned);
    let label = ns.unwrap_or("current").to_owned();
    let h = std::thread::Builder::new()
        .name(format!("in-ns-{label}"))
        .spawn(move || run_here(ns_owned.as_deref(), f))
        .context("spawning namespace thread")?;
    h.join()
        .map_err(|p| anyhow!("namespace thread panicked: {}", panic_message(p)))?
}

/// Async form of [`run_in_ns_blocking`]: the caller's runtime keeps running
/// while `f` runs in `ns` (use this from `#[tokio::test]`s, where the code
/// under test may run on the caller's runtime).
pub async fn run_in_ns<F, Fut, T>(ns: &str, f: F) -> Result<T>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
    T: Send + 'static,
{
    let ns = ns.to_owned();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let label = ns.clone();
    let h = std::thread::Builder::new()
        .name(format!("in-ns-{label}"))
        .spawn(move || {
            let _ = tx.send(run_here(Some(&ns), f));
        })
        .context("spawning namespace thread")?;
    let res = rx.await;
    // The thread has sent its result (or died): joining is immediate.
    let joined = h.join();
    match (res, joined) {
        (Ok(r), _) => r,
        (Err(_), Err(p)) => Err(anyhow!("namespace thread panicked: {}", panic_message(p))),
        (Err(_), Ok(())) => Err(anyhow!("namespace thread ended without a result")),
    }
}

fn run_here<F, Fut, T>(ns: Option<&str>, f: F) -> Result<T>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = T>,
{
    if let Some(ns) = ns {
        enter_netns(ns)?;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building runtime")?;
    std::panic::catch_unwind(AssertUnwindSafe(|| rt.block_on(f()))).map_err(|p| {
        anyhow!(
            "closure run in namespace {ns:?} panicked: {}",
            panic_message(p)
        )
    })
}

/// Blocking TCP connect from inside `ns`; the returned socket lives in `ns`
/// and can be used from anywhere.
pub fn tcp_connect_in_ns_std(
    ns: &str,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<std::net::TcpStream> {
    let ns_owned = ns.to_owned();
    std::thread::spawn(move || -> Result<std::net::TcpStream> {
        enter_netns(&ns_owned)?;
        Ok(std::net::TcpStream::connect_timeout(&addr, timeout)?)
    })
    .join()
    .map_err(|p| anyhow!("connect thread panicked: {}", panic_message(p)))?
    .with_context(|| format!("TCP connect to {addr} from namespace {ns}"))
}

/// TCP connect from inside `ns`, as a tokio stream on the caller's runtime.
/// The underlying error is kept as the root cause (`e.root_cause()
/// .downcast_ref::<std::io::Error>()` gives its kind).
pub async fn tcp_connect_in_ns(
    ns: &str,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<tokio::net::TcpStream> {
    let ns_owned = ns.to_owned();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let r = enter_netns(&ns_owned)
            .and_then(|()| Ok(std::net::TcpStream::connect_timeout(&addr, timeout)?));
        let _ = tx.send(r);
    });
    let s = rx
        .await
        .map_err(|_| anyhow!("connect thread died"))?
        .with_context(|| format!("TCP connect to {addr} from namespace {ns}"))?;
    s.set_nonblocking(true)?;
    Ok(tokio::net::TcpStream::from_std(s)?)
}

/// A std listener bound to `addr` inside `ns` (usable from any runtime via
/// `tokio::net::TcpListener::from_std` after `set_nonblocking(true)`).
pub fn tcp_listener_in_ns(ns: &str, addr: SocketAddr) -> Result<std::net::TcpListener> {
    let ns_owned = ns.to_owned();
    std::thread::spawn(move || -> Result<std::net::TcpListener> {
        enter_netns(&ns_owned)?;
        Ok(std::net::TcpListener::bind(addr)?)
    })
    .join()
    .map_err(|p| anyhow!("bind thread panicked: {}", panic_message(p)))?
    .with_context(|| format!("binding {addr} in namespace {ns}"))
}

/// A long-running future on its own thread inside a namespace (e.g. the
/// proxy under test inside the control-plane namespace). Dropping it (or
/// [`NsTask::stop`]) cancels the future (its runtime is dropped) and joins.
pub struct NsTask {
    name: String,
    stop_tx: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

/// Start `f()` on a fresh thread inside `ns` (None: the current namespace),
/// on a current-thread runtime. Returns once the thread is inside the
/// namespace and the runtime is built (so setup errors surface here).
pub fn spawn_task_in_ns<F, Fut>(ns: Option<&str>, f: F) -> Result<NsTask>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<()>>,
{
    let name = ns.unwrap_or("current").to_owned();
    let ns_owned = ns.map(str::to_owned);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
    let thread = std::thread::Builder::new()
        .name(format!("task-in-{name}"))
        .spawn(move || -> Result<()> {
            let setup = (|| -> Result<tokio::runtime::Runtime> {
                if let Some(ns) = &ns_owned {
                    enter_netns(ns)?;
                }
                Ok(tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?)
            })();
            let rt = match setup {
                Ok(rt) => {
                    let _ = ready_tx.send(Ok(()));
                    rt
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return Ok(());
                }
            };
            rt.block_on(async move {
                tokio::select! {
                    r = f() => r,
                    _ = stop_rx => Ok(()),
                }
            })
        })
        .context("spawning namespace task thread")?;
    match ready_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let _ = thread.join();
            return Err(e.context(format!("starting task in namespace {name}")));
        }
        Err(_) => {
            let r = bail_thread(thread.join(), &name);
            return Err(r
                .err()
                .unwrap_or_else(|| anyhow!("task thread in {name} died during setup")));
        }
    }
    Ok(NsTask {
        name,
        stop_tx: Some(stop_tx),
        thread: Some(thread),
    })
}

fn bail_thread(r: std::thread::Result<Result<()>>, name: &str) -> Result<()> {
    match r {
        Ok(r) => r,
        Err(p) => Err(anyhow!(
            "task in namespace {name} panicked: {}",
            panic_message(p)
        )),
    }
}

impl NsTask {
    /// Whether the future already returned (or panicked).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Cancel (if still running) and join; the future's error or panic if
    /// it had already failed.
    pub fn stop(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        if let Some(tx) = self.stop_tx.take() {
            let _ = tx.send(());
        }
        match self.thread.take() {
            Some(t) => bail_thread(t.join(), &self.name),
            None => Ok(()),
        }
    }
}

impl Drop for NsTask {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            if !std::thread::panicking() {
                eprintln!("{e:#}");
            }
        }
    }
}
