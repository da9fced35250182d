//! The admin endpoint under load (issue 11, item 4): does serving `/status`
//! and `/metrics` for a large configuration stall the data plane?
//!
//! One in-process engine (config written as TOML and parsed, as
//! `switchboard run -c` does) with an `[[echo]]` role, an `[admin]` endpoint
//! and a `[[router]]` of N connpts (20,000 in full mode; each `connect`s to
//! an unreachable upstream once its device comes online, so they hold no file
//! descriptor). An echo client does 64-byte round trips on the same engine
//! for a fixed time, first with nothing else going on (the baseline, in the
//! same run), then while 16 client threads fetch `/status` in a loop (one
//! request per connection, as curl does), then the same with `/metrics`.
//! Reported per phase: the echo round trips' p50, p99 and worst, the reports
//! served per second and their size. Target: the worst round trip under the
//! `/status` load stays <= 20 ms. `SWITCHBOARD_BENCH_QUICK=1` (or
//! `cargo test --benches`) runs 2,000 connpts for a fraction of a second.

#[path = "support/harness.rs"]
mod harness;
use harness::{connect, percentile, quick_mode, spawn_engine};
use std::error::Error;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use switchboard::{Config, Engine};

type Result<T> = std::result::Result<T, Box<dyn Error + Send + Sync>>;

const MSG: usize = 64;
const FETCHERS: usize = 16;
const STALL: Duration = Duration::from_secs(30);
/// The target for the worst echo round trip while `/status` is fetched.
const TARGET: Duration = Duration::from_millis(20);

fn config(connpts: usize) -> Result<Config> {
    let mut text = String::from(
        "[engine]\nmax_connections = 100000\n\
         [admin]\nlisten = \"127.0.0.1:0\"\nmax_clients = 16\n\
         [[echo]]\nlisten = \"127.0.0.1:0\"\n\
         [[router]]\nlisten = \"127.0.0.1:0\"\n\
         reconnect_min = \"1h\"\nreconnect_max = \"1h\"\n",
    );
    for i in 0..connpts {
        writeln!(
            text,
            "[[router.connpt]]\nname = \"c{i}\"\nid = \"d{i:06}\"\nconnect = \"255.255.255.255:9\""
        )?;
    }
    Ok(Config::parse(&text)?)
}

/// One request on a fresh connection, read to EOF; returns the bytes read.
fn fetch(addr: SocketAddr, path: &str, buf: &mut Vec<u8>) -> Result<usize> {
    let mut s = connect(addr, STALL)?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n")?;
    buf.clear();
    s.read_to_end(buf)?;
    if !buf.starts_with(b"HTTP/1.1 200") {
        let head = String::from_utf8_lossy(buf.get(..64.min(buf.len())).unwrap_or_default());
        return Err(format!("GET {path}: {head}").into());
    }
    Ok(buf.len())
}

struct Phase {
    name: &'static str,
    rtts: Vec<u64>,
    served: u64,
    bytes: u64,
    secs: f64,
}

/// Echo round trips for `time` while `FETCHERS` threads fetch `path` (none
/// if `path` is `None`).
fn phase(
    name: &'static str,
    echo: SocketAddr,
    admin: SocketAddr,
    path: Option<&'static str>,
    time: Duration,
) -> Result<Phase> {
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let fetchers: Vec<_> = path
        .map(|path| {
            (0..FETCHERS)
                .map(|_| {
                    let (stop, served, bytes) =
                        (Arc::clone(&stop), Arc::clone(&served), Arc::clone(&bytes));
                    thread::spawn(move || -> Result<()> {
                        let mut buf = Vec::new();
                        while !stop.load(Ordering::Relaxed) {
                            match fetch(admin, path, &mut buf) {
                                Ok(n) => {
                                    served.fetch_add(1, Ordering::Relaxed);
                                    bytes.fetch_add(n as u64, Ordering::Relaxed);
                                }
                                Err(e) => eprintln!("fetch failed: {e}"),
                            }
                        }
                        Ok(())
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    // Let the load get going before measuring.
    thread::sleep(time / 10);
    let mut c = connect(echo, STALL)?;
    let msg = [0x5au8; MSG];
    let mut back = [0u8; MSG];
    let mut rtts = Vec::new();
    let (served0, bytes0) = (
        served.load(Ordering::Relaxed),
        bytes.load(Ordering::Relaxed),
    );
    let start = Instant::now();
    while start.elapsed() < time {
        let t = Instant::now();
        c.write_all(&msg)?;
        c.read_exact(&mut back)?;
        rtts.push(t.elapsed().as_nanos() as u64);
    }
    let secs = start.elapsed().as_secs_f64();
    let served = served.load(Ordering::Relaxed) - served0;
    let bytes = bytes.load(Ordering::Relaxed) - bytes0;
    stop.store(true, Ordering::Relaxed);
    for f in fetchers {
        f.join().map_err(|_| "fetcher panicked")??;
    }
    rtts.sort_unstable();
    Ok(Phase {
        name,
        rtts,
        served,
        bytes,
        secs,
    })
}

fn main() -> Result<()> {
    let quick = quick_mode();
    let (connpts, time) = if quick {
        (2_000, Duration::from_millis(500))
    } else {
        (20_000, Duration::from_secs(5))
    };
    let mut engine = Engine::from_config(&config(connpts)?)?;
    engine.start()?;
    let addr = |role: &str| {
        engine
            .listeners()
            .iter()
            .find(|l| l.role == role)
            .map(|l| l.addr)
            .ok_or(format!("no {role} listener"))
    };
    let (echo, admin) = (addr("echo")?, addr("admin")?);
    let handle = engine.handle();
    let (thread, _) = spawn_engine(engine)?;

    println!(
        "admin under load: {connpts} connpts, {FETCHERS} clients fetching, echo 64-byte round trips for {time:?} per phase{}",
        if quick { " (quick)" } else { "" }
    );
    // One request at a time on an otherwise idle engine: what one report
    // costs to build and fetch.
    let mut buf = Vec::new();
    for path in ["/status", "/metrics"] {
        let mut best = Duration::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            fetch(admin, path, &mut buf)?;
            best = best.min(t.elapsed());
        }
        println!(
            "one {path} alone: {:.2} ms ({} KiB), best of 5",
            best.as_secs_f64() * 1e3,
            buf.len() / 1024
        );
    }
    let phases = [
        phase("idle (baseline)", echo, admin, None, time)?,
        phase("/status load", echo, admin, Some("/status"), time)?,
        phase("/metrics load", echo, admin, Some("/metrics"), time)?,
    ];
    println!(
        "{:<18} {:>9} {:>9} {:>9} {:>10} {:>10} {:>10}",
        "phase", "p50 us", "p99 us", "max us", "trips", "reports/s", "KiB each"
    );
    for p in &phases {
        println!(
            "{:<18} {:>9.0} {:>9.0} {:>9.0} {:>10} {:>10.0} {:>10.0}",
            p.name,
            percentile(&p.rtts, 0.50),
            percentile(&p.rtts, 0.99),
            percentile(&p.rtts, 1.0),
            p.rtts.len(),
            p.served as f64 / p.secs,
            if p.served == 0 {
                0.0
            } else {
                p.bytes as f64 / p.served as f64 / 1024.0
            },
        );
    }
    let worst = Duration::from_nanos(phases[1].rtts.last().copied().unwrap_or_default());
    println!(
        "target: worst echo round trip under /status load {:.1} ms <= {} ms: {}",
        worst.as_secs_f64() * 1e3,
        TARGET.as_millis(),
        if worst <= TARGET { "met" } else { "MISSED" }
    );
    fetch(admin, "/metrics", &mut buf)?;
    for line in String::from_utf8_lossy(&buf).lines() {
        if line.starts_with("switchboard_admin_") || line.starts_with("switchboard_draining") {
            println!("{line}");
        }
    }
    handle.stop();
    thread.join().map_err(|_| "engine panicked")??;
    Ok(())
}
