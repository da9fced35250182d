//! What the custom-harness benches share: quick mode, per-thread CPU time
//! from /proc, running an engine on its own thread, percentiles. Included with
//! `#[path]`; each bench uses what it needs.
#![allow(dead_code, reason = "each bench uses a different subset")]

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use switchboard::{Engine, EngineError};

/// `SWITCHBOARD_BENCH_QUICK=1`, or not run by `cargo bench` (which passes
/// `--bench`; `cargo test --benches` does not). Other arguments are ignored.
pub(crate) fn quick_mode() -> bool {
    std::env::var_os("SWITCHBOARD_BENCH_QUICK").is_some_and(|v| v != "0")
        || !std::env::args().skip(1).any(|a| a == "--bench")
}

/// CPU time a thread has run, from `<task>/schedstat` (Linux).
pub(crate) fn task_cpu_ns(task: &Path) -> Option<u64> {
    let stat = std::fs::read_to_string(task.join("schedstat")).ok()?;
    stat.split_whitespace().next()?.parse().ok()
}

/// `/proc/<pid>/task/<tid>` of the calling thread (Linux).
pub(crate) fn this_task() -> Option<PathBuf> {
    std::fs::read_link("/proc/thread-self")
        .ok()
        .map(|p| Path::new("/proc").join(p))
}

/// A started engine running on a thread named "engine", and that thread's
/// /proc task (set once the thread runs), for its CPU time.
pub(crate) type EngineThread = (JoinHandle<Result<(), EngineError>>, Arc<OnceLock<PathBuf>>);

/// Run `engine` (already started) on its own thread.
pub(crate) fn spawn_engine(mut engine: Engine) -> io::Result<EngineThread> {
    let task = Arc::new(OnceLock::new());
    let me = Arc::clone(&task);
    let thread = thread::Builder::new()
        .name("engine".into())
        .spawn(move || {
            if let Some(t) = this_task() {
                me.set(t).ok();
            }
            engine.run()
        })?;
    Ok((thread, task))
}

/// CPU time of a thread from [`spawn_engine`] so far: waits (up to 5 s) for
/// the thread to publish its task, `None` where it cannot be read.
pub(crate) fn engine_cpu_ns(task: &OnceLock<PathBuf>) -> Option<u64> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while task.get().is_none() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(1));
    }
    task_cpu_ns(task.get()?)
}

/// Nearest-rank percentile of sorted samples (nanoseconds), in microseconds.
pub(crate) fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    let i = rank.clamp(1, sorted.len()) - 1;
    sorted.get(i).copied().unwrap_or_default() as f64 / 1_000.0
}

/// A client connection with no Nagle delay whose reads and writes fail after
/// `stall` without progress (so a stuck run ends with an error, not a hang).
pub(crate) fn connect(addr: SocketAddr, stall: Duration) -> io::Result<TcpStream> {
    let sock = TcpStream::connect(addr)
        .map_err(|e| io::Error::new(e.kind(), format!("connect {addr}: {e}")))?;
    sock.set_nodelay(true)?;
    sock.set_read_timeout(Some(stall))?;
    sock.set_write_timeout(Some(stall))?;
    Ok(sock)
}
