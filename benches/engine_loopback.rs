//! Loopback echo: the switchboard engine against a plain std thread-per-connection
//! echo server, in the same run, on the same machine.
//!
//! For each server it measures
//! - throughput: C client connections (C = 1 and C = 8) each writing 64 KiB
//!   chunks for a fixed total while a reader thread per connection counts the
//!   echoed bytes (MiB/s of payload echoed, one direction);
//! - latency: one connection, 64-byte round trips (write 64, read 64 back),
//!   after a warm-up; p50, p99 and p99.9.
//!
//! On Linux it also reports the server's CPU time per GiB echoed (from
//! `/proc/<tid>/schedstat`: the engine thread; the sum of the std server's
//! per-connection threads), which tells a slow server from a starved one.
//!
//! The servers run alternately (engine, std, engine, std); the best repeat of
//! each is compared with the targets: engine throughput >= 0.8 x std and engine
//! p50 <= std p50 + 10 us. Criterion cannot report percentiles, hence this
//! plain `main`. `SWITCHBOARD_BENCH_QUICK=1` shrinks every volume (~16 MiB per
//! throughput run, 5,000 round trips) so CI can run it in seconds. Without
//! `--bench` on the command line (`cargo test --benches`) the quick mode is
//! used too, as Criterion does; other arguments are ignored.
//! `SWITCHBOARD_BENCH_ONLY=engine` (or `std`) runs one server only, for profiling.

#[path = "support/harness.rs"]
mod harness;
use harness::{engine_cpu_ns, percentile, quick_mode, spawn_engine, task_cpu_ns, this_task};
use std::error::Error;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use switchboard::{Config, Engine, EngineError, Handle};

type BoxError = Box<dyn Error + Send + Sync>;
type Result<T> = std::result::Result<T, BoxError>;

/// Size of one client write (and of the std server's read buffer).
const CHUNK: usize = 64 * 1024;
/// Size of one latency message.
const MSG: usize = 64;
const MIB: f64 = 1024.0 * 1024.0;
/// Runs per server, alternating engine and std.
const REPEATS: usize = 2;
/// A client read that waits this long means a stalled server: fail, don't hang.
const STALL: Duration = Duration::from_secs(30);
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// Volumes for one run of the bench.
#[derive(Debug, Clone, Copy)]
struct Plan {
    quick: bool,
    /// Bytes per connection for C = 1.
    single_bytes: usize,
    /// Bytes per connection for C = 8.
    multi_bytes: usize,
    warmup: usize,
    round_trips: usize,
}

impl Plan {
    fn from_env() -> Plan {
        let quick = quick_mode();
        if quick {
            Plan {
                quick,
                single_bytes: 16 << 20,
                multi_bytes: 2 << 20,
                warmup: 2_000,
                round_trips: 5_000,
            }
        } else {
            Plan {
                quick,
                single_bytes: 256 << 20,
                multi_bytes: 64 << 20,
                warmup: 2_000,
                round_trips: 50_000,
            }
        }
    }
}

/// Latency percentiles of one run, in microseconds.
#[derive(Debug, Clone, Copy)]
struct Latency {
    p50: f64,
    p99: f64,
    p999: f64,
}

/// One throughput run.
#[derive(Debug, Clone, Copy)]
struct Throughput {
    /// MiB/s echoed, over all connections.
    mib_s: f64,
    /// Server CPU seconds per GiB echoed (Linux only).
    cpu_s_per_gib: Option<f64>,
}

/// Everything measured against one server in one repeat.
#[derive(Debug, Clone, Copy)]
struct Figures {
    single: Throughput,
    multi: Throughput,
    latency: Latency,
}

/// Which server a run is against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Engine,
    Std,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Engine => "switchboard",
            Kind::Std => "std threads",
        }
    }
}

/// A running server under test.
enum Server {
    Engine {
        addr: SocketAddr,
        handle: Handle,
        thread: JoinHandle<std::result::Result<(), EngineError>>,
        /// `/proc/<pid>/task/<tid>` of the engine thread, once it has started.
        task: Arc<OnceLock<PathBuf>>,
    },
    Std {
        addr: SocketAddr,
        stop: Arc<AtomicBool>,
        thread: JoinHandle<()>,
        cpu: Arc<StdCpu>,
    },
}

/// CPU accounting of the std server's per-connection threads: each adds its
/// own CPU time when it ends.
#[derive(Debug, Default)]
struct StdCpu {
    live: AtomicUsize,
    ended_ns: AtomicU64,
    unknown: AtomicBool,
}

// ===== impl Server =====

impl Server {
    fn start(kind: Kind) -> Result<Server> {
        match kind {
            Kind::Engine => {
                let config = Config::parse("[[echo]]\nlisten = \"127.0.0.1:0\"\n")?;
                let mut engine = Engine::from_config(&config)?;
                engine.start()?;
                let addr = engine
                    .listeners()
                    .first()
                    .map(|l| l.addr)
                    .ok_or("the engine opened no listener")?;
                let handle = engine.handle();
                let (thread, task) = spawn_engine(engine)?;
                Ok(Server::Engine {
                    addr,
                    handle,
                    thread,
                    task,
                })
            }
            Kind::Std => {
                let listener = TcpListener::bind("127.0.0.1:0")?;
                let addr = listener.local_addr()?;
                let stop = Arc::new(AtomicBool::new(false));
                let cpu = Arc::new(StdCpu::default());
                let (flag, acct) = (Arc::clone(&stop), Arc::clone(&cpu));
                let thread = thread::Builder::new()
                    .name("std-accept".into())
                    .spawn(move || std_accept_loop(&listener, &flag, &acct))?;
                Ok(Server::Std {
                    addr,
                    stop,
                    thread,
                    cpu,
                })
            }
        }
    }

    fn addr(&self) -> SocketAddr {
        match self {
            Server::Engine { addr, .. } | Server::Std { addr, .. } => *addr,
        }
    }

    /// CPU time the server has used so far, or `None` where it cannot be read.
    /// For the std server this waits until its connection threads have ended.
    fn cpu_ns(&self) -> Option<u64> {
        let deadline = Instant::now() + Duration::from_secs(5);
        match self {
            Server::Engine { task, .. } => engine_cpu_ns(task),
            Server::Std { cpu, .. } => {
                while cpu.live.load(Ordering::SeqCst) > 0 {
                    if Instant::now() >= deadline {
                        return None;
                    }
                    thread::sleep(Duration::from_millis(1));
                }
                if cpu.unknown.load(Ordering::SeqCst) {
                    return None;
                }
                Some(cpu.ended_ns.load(Ordering::SeqCst))
            }
        }
    }

    fn stop(self) -> Result<()> {
        match self {
            Server::Engine { handle, thread, .. } => {
                handle.stop();
                thread.join().map_err(|_| "engine thread panicked")??;
            }
            Server::Std {
                addr, stop, thread, ..
            } => {
                stop.store(true, Ordering::SeqCst);
                // Wake the blocking accept.
                drop(TcpStream::connect(addr));
                thread.join().map_err(|_| "std accept thread panicked")?;
            }
        }
        Ok(())
    }
}

/// The reference server: one thread per connection, read 64 KiB, write it all back.
fn std_accept_loop(listener: &TcpListener, stop: &AtomicBool, cpu: &Arc<StdCpu>) {
    for sock in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(mut sock) = sock else { continue };
        // Same socket options as the engine's echo role (TCP_NODELAY on accept).
        sock.set_nodelay(true).ok();
        cpu.live.fetch_add(1, Ordering::SeqCst);
        let acct = Arc::clone(cpu);
        let spawned = thread::Builder::new()
            .name("std-conn".into())
            .spawn(move || {
                let mut buf = vec![0u8; CHUNK];
                while let Ok(n @ 1..) = sock.read(&mut buf) {
                    if sock.write_all(buf.get(..n).unwrap_or_default()).is_err() {
                        break;
                    }
                }
                if let Some(ns) = this_task().and_then(|t| task_cpu_ns(&t)) {
                    acct.ended_ns.fetch_add(ns, Ordering::SeqCst);
                } else {
                    acct.unknown.store(true, Ordering::SeqCst);
                }
                acct.live.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            cpu.live.fetch_sub(1, Ordering::SeqCst);
            eprintln!("std server: cannot spawn a connection thread: {e}");
        }
    }
}

fn connect(addr: SocketAddr) -> Result<TcpStream> {
    Ok(harness::connect(addr, STALL)?)
}

/// `conns` connections each send `per_conn` bytes in 64 KiB writes; a reader per
/// connection counts the echo. Measures MiB/s of echoed bytes over all
/// connections and the server's CPU time for them.
fn throughput(server: &Server, conns: usize, per_conn: usize) -> Result<Throughput> {
    let addr = server.addr();
    let cpu_before = server.cpu_ns();
    let start = Arc::new(Barrier::new(2 * conns + 1));
    let mut threads: Vec<JoinHandle<Result<usize>>> = Vec::with_capacity(2 * conns);
    for _ in 0..conns {
        let mut writer = connect(addr)?;
        let mut reader = writer.try_clone()?;
        let go = Arc::clone(&start);
        threads.push(thread::Builder::new().name("writer".into()).spawn(
            move || -> Result<usize> {
                let chunk: Vec<u8> = (0..CHUNK).map(|i| (i % 251) as u8).collect();
                go.wait();
                let mut left = per_conn;
                while left > 0 {
                    let n = left.min(CHUNK);
                    writer.write_all(chunk.get(..n).unwrap_or_default())?;
                    left -= n;
                }
                Ok(0)
            },
        )?);
        let go = Arc::clone(&start);
        threads.push(thread::Builder::new().name("reader".into()).spawn(
            move || -> Result<usize> {
                let mut buf = vec![0u8; CHUNK];
                go.wait();
                let mut got = 0;
                while got < per_conn {
                    match reader.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => got += n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(format!("echo read after {got} bytes: {e}").into()),
                    }
                }
                // Close both directions; the server sees EOF and closes its side.
                reader.shutdown(Shutdown::Both).ok();
                Ok(got)
            },
        )?);
    }
    start.wait();
    let t0 = Instant::now();
    let mut echoed = 0;
    for t in threads {
        echoed += t.join().map_err(|_| "client thread panicked")??;
    }
    let secs = t0.elapsed().as_secs_f64();
    let want = conns * per_conn;
    if echoed != want {
        return Err(format!("echoed {echoed} bytes, sent {want}").into());
    }
    let cpu_s = match (cpu_before, server.cpu_ns()) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / 1e9),
        _ => None,
    };
    Ok(Throughput {
        mib_s: echoed as f64 / MIB / secs,
        cpu_s_per_gib: cpu_s.map(|c| c / (echoed as f64 / GIB)),
    })
}

/// One connection, 64-byte round trips: `warmup` unmeasured, then `n` measured.
fn latency(addr: SocketAddr, warmup: usize, n: usize) -> Result<Latency> {
    let mut sock = connect(addr)?;
    let msg = [0x5au8; MSG];
    let mut back = [0u8; MSG];
    let mut samples = Vec::with_capacity(n);
    for i in 0..warmup + n {
        let t0 = Instant::now();
        sock.write_all(&msg)?;
        sock.read_exact(&mut back)?;
        let ns = t0.elapsed().as_nanos();
        if back != msg {
            return Err("latency: the echo differs from the message".into());
        }
        if i >= warmup {
            samples.push(u64::try_from(ns).unwrap_or(u64::MAX));
        }
    }
    samples.sort_unstable();
    Ok(Latency {
        p50: percentile(&samples, 0.50),
        p99: percentile(&samples, 0.99),
        p999: percentile(&samples, 0.999),
    })
}

fn run_one(kind: Kind, plan: &Plan) -> Result<Figures> {
    let server = Server::start(kind)?;
    let single = throughput(&server, 1, plan.single_bytes)?;
    let multi = throughput(&server, 8, plan.multi_bytes)?;
    let latency = latency(server.addr(), plan.warmup, plan.round_trips)?;
    server.stop()?;
    Ok(Figures {
        single,
        multi,
        latency,
    })
}

/// The faster run, with the lower CPU cost of the two.
fn best_throughput(a: Throughput, b: Throughput) -> Throughput {
    let cpu = match (a.cpu_s_per_gib, b.cpu_s_per_gib) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    };
    Throughput {
        mib_s: a.mib_s.max(b.mib_s),
        cpu_s_per_gib: cpu,
    }
}

/// Best throughputs (and lowest CPU cost) over the repeats; latency from the
/// repeat with the lowest p50.
fn best(runs: &[Figures]) -> Option<Figures> {
    let first = *runs.first()?;
    Some(runs.iter().fold(first, |b, r| Figures {
        single: best_throughput(b.single, r.single),
        multi: best_throughput(b.multi, r.multi),
        latency: if r.latency.p50 < b.latency.p50 {
            r.latency
        } else {
            b.latency
        },
    }))
}

fn verdict(met: bool) -> &'static str {
    if met { "MET" } else { "MISSED" }
}

/// `1.23 s/GiB`, or `n/a` where the CPU time could not be read.
fn cpu_text(t: Throughput) -> String {
    t.cpu_s_per_gib
        .map_or_else(|| "n/a".to_owned(), |c| format!("{c:.2} s/GiB"))
}

fn main() -> Result<()> {
    let plan = Plan::from_env();
    println!(
        "engine_loopback ({} mode): throughput C=1 {} MiB, C=8 {} x {} MiB, {} KiB writes; \
         latency {} x {} B round trips after {} warm-up; {} repeats per server, alternating",
        if plan.quick { "quick" } else { "full" },
        plan.single_bytes >> 20,
        8,
        plan.multi_bytes >> 20,
        CHUNK >> 10,
        plan.round_trips,
        MSG,
        plan.warmup,
        REPEATS,
    );
    // SWITCHBOARD_BENCH_ONLY=engine|std runs one server only (for profiling).
    let only = std::env::var("SWITCHBOARD_BENCH_ONLY").unwrap_or_default();
    let kinds: Vec<Kind> = [Kind::Engine, Kind::Std]
        .into_iter()
        .filter(|k| match only.as_str() {
            "engine" => *k == Kind::Engine,
            "std" => *k == Kind::Std,
            _ => true,
        })
        .collect();
    let mut engine_runs = Vec::with_capacity(REPEATS);
    let mut std_runs = Vec::with_capacity(REPEATS);
    for rep in 1..=REPEATS {
        for &kind in &kinds {
            let f = run_one(kind, &plan)?;
            println!(
                "  run {rep} {:<12} C=1 {:>7.1} MiB/s ({})  C=8 {:>7.1} MiB/s ({})  \
                 p50 {:.1} us  p99 {:.1} us  p99.9 {:.1} us",
                kind.name(),
                f.single.mib_s,
                cpu_text(f.single),
                f.multi.mib_s,
                cpu_text(f.multi),
                f.latency.p50,
                f.latency.p99,
                f.latency.p999,
            );
            match kind {
                Kind::Engine => engine_runs.push(f),
                Kind::Std => std_runs.push(f),
            }
        }
    }
    let (Some(e), Some(s)) = (best(&engine_runs), best(&std_runs)) else {
        println!("one server only: no comparison");
        return Ok(());
    };
    println!();
    println!("best of {REPEATS} (server CPU per GiB echoed in brackets, lower is better):");
    println!(
        "  {:<12} {:>26} {:>26} {:>8} {:>8} {:>9}",
        "server", "C=1 MiB/s", "C=8 MiB/s", "p50 us", "p99 us", "p99.9 us"
    );
    for (kind, f) in [(Kind::Engine, e), (Kind::Std, s)] {
        println!(
            "  {:<12} {:>26} {:>26} {:>8.1} {:>8.1} {:>9.1}",
            kind.name(),
            format!("{:.1} ({})", f.single.mib_s, cpu_text(f.single)),
            format!("{:.1} ({})", f.multi.mib_s, cpu_text(f.multi)),
            f.latency.p50,
            f.latency.p99,
            f.latency.p999,
        );
    }
    println!();
    println!("targets:");
    for (label, eng, std) in [("C=1", e.single, s.single), ("C=8", e.multi, s.multi)] {
        let ratio = eng.mib_s / std.mib_s;
        let cpu_ratio = match (eng.cpu_s_per_gib, std.cpu_s_per_gib) {
            (Some(a), Some(b)) if b > 0.0 => format!("; CPU per byte engine/std = {:.2}", a / b),
            _ => String::new(),
        };
        println!(
            "  throughput {label}: engine/std = {ratio:.2} (target >= 0.80)  {}{cpu_ratio}",
            verdict(ratio >= 0.8)
        );
    }
    let delta = e.latency.p50 - s.latency.p50;
    println!(
        "  latency p50: engine - std = {delta:+.1} us (target <= +10.0 us)  {}",
        verdict(delta <= 10.0)
    );
    println!(
        "  (for reference: p99 engine - std = {:+.1} us, p99.9 engine - std = {:+.1} us)",
        e.latency.p99 - s.latency.p99,
        e.latency.p999 - s.latency.p999,
    );
    Ok(())
}
