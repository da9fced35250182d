//! Heap cost of an idle connection: the engine holds N = 10,000 connections
//! that send nothing; a counting global allocator measures the live heap before
//! and after, and the difference per connection is compared with the target
//! (<= 1024 bytes). Idle connections must hold no pooled buffer
//! (`buffers_lent` = 0).
//!
//! RLIMIT_NOFILE is often 20,000: the engine's 10,000 sockets and the clients'
//! 10,000 would not fit in one process, so the client sockets live in a child:
//! this same binary, re-executed with `SWITCHBOARD_IDLE_HOLDER` set to the
//! engine's address. The child waits for a line on stdin, connects N sockets,
//! prints `ready`, and holds them until its stdin closes. Only the engine's side
//! is counted: the child is another process.
//!
//! The slab of connections grows by doubling, so the figure includes its slack
//! (10,000 connections sit in 16,384 slots). `SWITCHBOARD_BENCH_QUICK=1` uses
//! 2,000 connections, and so does a run without `--bench` on the command line
//! (`cargo test --benches`), as Criterion does; other arguments are ignored.

use std::error::Error;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use switchboard::{Config, Engine};

type Result<T> = std::result::Result<T, Box<dyn Error + Send + Sync>>;

/// Env var that turns this binary into the client holder; its value is the
/// address to connect to.
const HOLDER_ENV: &str = "SWITCHBOARD_IDLE_HOLDER";
/// Env var carrying the number of connections to the holder.
const HOLDER_COUNT_ENV: &str = "SWITCHBOARD_IDLE_HOLDER_COUNT";
/// Idle connections held (full mode).
const N_FULL: usize = 10_000;
/// Idle connections held (quick mode).
/// Above the engine's initial slab capacity (1024), so growth is measured.
const N_QUICK: usize = 2_000;
/// Target: live heap bytes per idle connection.
const TARGET_BYTES: f64 = 1024.0;
/// How long the engine may take to accept everything.
const ACCEPT_DEADLINE: Duration = Duration::from_secs(120);

#[path = "support/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::live;

/// The child: connect `n` sockets to `addr` once told to, report, hold them.
fn hold_clients(addr: &str) -> Result<()> {
    let addr: SocketAddr = addr.parse()?;
    let n: usize = std::env::var(HOLDER_COUNT_ENV)?.parse()?;
    let mut stdin = std::io::stdin().lock();
    let mut go = String::new();
    stdin.read_line(&mut go)?;
    let mut socks = Vec::with_capacity(n);
    for i in 0..n {
        let sock = TcpStream::connect(addr).map_err(|e| format!("connect #{i}: {e}"))?;
        socks.push(sock);
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready")?;
    out.flush()?;
    // Hold until the parent closes our stdin (or dies).
    let mut sink = [0u8; 64];
    while stdin.read(&mut sink)? > 0 {}
    drop(socks);
    Ok(())
}

fn main() -> Result<()> {
    if let Ok(addr) = std::env::var(HOLDER_ENV) {
        return hold_clients(&addr);
    }
    // `cargo bench` passes `--bench`; `cargo test --benches` does not. Other
    // arguments are ignored.
    let quick = std::env::var_os("SWITCHBOARD_BENCH_QUICK").is_some_and(|v| v != "0")
        || !std::env::args().skip(1).any(|a| a == "--bench");
    let n = if quick { N_QUICK } else { N_FULL };

    let baseline = live();
    let config =
        Config::parse("[engine]\nmax_connections = 20000\n[[echo]]\nlisten = \"127.0.0.1:0\"\n")?;
    let mut engine = Engine::from_config(&config)?;
    engine.start()?;
    let addr = engine
        .listeners()
        .first()
        .map(|l| l.addr)
        .ok_or("the engine opened no listener")?;
    let handle = engine.handle();
    let engine_thread = thread::Builder::new()
        .name("engine".into())
        .spawn(move || engine.run())?;

    // Everything the parent needs is allocated before the first measurement.
    let mut child = Command::new(std::env::current_exe()?)
        .env(HOLDER_ENV, addr.to_string())
        .env(HOLDER_COUNT_ENV, n.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut child_in = child.stdin.take().ok_or("child stdin")?;
    let mut child_out = BufReader::new(child.stdout.take().ok_or("child stdout")?);
    let mut line = String::with_capacity(64);
    // Let the engine thread reach its first poll.
    thread::sleep(Duration::from_millis(100));

    let before = live();
    child_in.write_all(b"go\n")?;
    child_in.flush()?;
    child_out.read_line(&mut line)?;
    if line.trim() != "ready" {
        return Err(format!("client holder said {line:?}, not \"ready\"").into());
    }
    let t0 = Instant::now();
    while handle.connections() < n as u64 {
        if t0.elapsed() > ACCEPT_DEADLINE {
            return Err(format!(
                "the engine holds {} of {n} connections after {ACCEPT_DEADLINE:?}",
                handle.connections()
            )
            .into());
        }
        thread::sleep(Duration::from_millis(10));
    }
    // Let the loop finish the turn that accepted the last one.
    thread::sleep(Duration::from_millis(200));
    let after = live();
    let stats = handle.stats();

    drop(child_in);
    let status = child.wait()?;
    handle.stop();
    engine_thread
        .join()
        .map_err(|_| "engine thread panicked")??;
    if !status.success() {
        return Err(format!("client holder exited with {status}").into());
    }

    let held = stats.connections;
    let grown = after - before;
    let per_conn = grown as f64 / held as f64;
    println!(
        "idle_memory ({} mode): {held} idle connections held by the engine",
        if quick { "quick" } else { "full" }
    );
    println!(
        "  heap of the engine and bench setup, no connections: {} B",
        before - baseline
    );
    println!("  live heap before: {before} B, after: {after} B, grown: {grown} B");
    println!(
        "  bytes per idle connection: {per_conn:.1} B (target <= {TARGET_BYTES:.0} B)  {}",
        if per_conn <= TARGET_BYTES {
            "MET"
        } else {
            "MISSED"
        }
    );
    println!(
        "  buffers_lent: {} (must be 0)  {}",
        stats.buffers_lent,
        if stats.buffers_lent == 0 {
            "MET"
        } else {
            "MISSED"
        }
    );
    Ok(())
}
