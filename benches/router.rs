//! The router role (issue 4, item 8): identification rate and latency,
//! device <-> application bridging throughput against a direct connection, and
//! the cost of idle identified devices. One `[[router]]` role (config written
//! as TOML and parsed, as `switchboard run -c` does) in an in-process engine;
//! std blocking sockets on loopback as devices and applications.
//!
//! Part A, identification: N_A connpts, each with an application port; ids
//! `c00000`, `c00001`, ... (six bytes, none a prefix of another, so each id is
//! decided on its last byte). Repeated (2 runs in full mode, each printed; the
//! best rates and the latency run with the lowest p99 are summarised):
//! - connect + id in batches of 100: 4 client threads connect their share of
//!   100 devices at once, each writing its id right after connecting; the next
//!   batch starts when the router's `identified_total` has counted the batch.
//!   Identifications per second over all N_A (handshake, accept, identify).
//!   Batches stay below the listen backlog the engine's listeners get (128,
//!   mio's and std's default): the accept queue never overflows by design.
//! - connect + id in one burst: the same with all N_A at once. The kernel
//!   drops SYNs once 128 connections wait in the accept queue and the client
//!   retries after 1 s, 3 s, ...: the figure shows what a mass reconnect meets
//!   (`TcpExt ListenOverflows` from /proc/net/netstat is printed; it is
//!   system-wide).
//! - id only: N_A devices connected and waiting unidentified, then the 4
//!   threads write every id; time until `identified_total` has grown by N_A.
//! - the engine thread's CPU time per identification for each (from
//!   `/proc/<tid>/schedstat`; on loopback it includes the kernel's TCP work
//!   done in its context);
//! - latency: an application is attached to each of L connpts first; then, one
//!   device at a time, the device connects, the bench waits until the engine
//!   has accepted it, and times one write of `id + payload` (16 bytes) until
//!   the application has read the payload, byte-exact (p50/p99/max over L
//!   devices). The target (< 1 ms, IOT-Tree needs >= 1 s) is checked on p99.
//!   For reference, in the same run: the device's whole experience (connect,
//!   write, until the application has the payload) on L other connpts; a std
//!   relay thread in the router's place (same hops and thread wake-ups); the
//!   payload written and read on one direct connection in one thread (floor).
//!
//! Part B, bridging throughput: one device identified on a connpt with one
//! application attached (a fresh pair per run); a writer thread writes 64 KiB
//! chunks for a fixed total on one side while a reader thread reads the other
//! side and checks every byte against the pattern. Device -> application and
//! application -> device are measured separately (one direction at a time),
//! and the same writer/reader code runs over a direct std TCP connection in the
//! same run; runs alternate and the best of the repeats is compared (target:
//! router >= 0.5 x direct in each direction); the median of the per-repeat
//! ratios is printed too. For reference, a std relay thread in the router's
//! place (read 64 KiB, write it) runs the same transfer: what any user-space
//! bridge costs on this machine (two loopback hops, one more thread). A run that loses or corrupts
//! bytes is reported as such (the reader gives up after 10 s without
//! progress), as is a pair the router still holds 2 s after both ends closed.
//!
//! Part C, idle identified devices, each measured in a fresh child process
//! (this binary re-executed) that does what `switchboard run` does: parse the
//! TOML, build and start the engine, keep the `Config` alive, and run the loop
//! on its main thread; a controller thread measures with a counting global
//! allocator as in `benches/idle_memory.rs` and reads VmRSS. The device
//! sockets are held by grandchildren (this binary again), at most 10,000 each
//! (19,000 connections to one listener fit in the 28,232 ephemeral ports).
//! RLIMIT_NOFILE (20,000 here, hard limit too) decides what fits in the
//! engine's process: every online device is one fd, and every connpt with a
//! `listen` port one more.
//! - C1, connpts with `listen` (the DTU example's shape): the largest N <=
//!   10,000 with 2 N fds under the limit (9,900 at 20,000).
//! - C2, 50,000 connpts configured with `connect` (no listener fd): devices
//!   come online in steps of 10,000, 16,000 and 19,000 (what fits). A
//!   `connect` connpt dials its upstream when its device comes online; the
//!   bench points them at 255.255.255.255:9, which fails synchronously
//!   (ENETUNREACH) and leaves no connection, with `reconnect_min =
//!   reconnect_max = "1h"`, so each device also holds one re-dial timer.
//!
//! Reported: live heap per configured connpt before any device connects (and
//! the parsed Config's share of it), heap per idle identified device (growth
//! / devices; the engine's connection slab and timer containers start at
//! 1,024 slots, counted as configured heap, and grow by doubling, whose slack
//! is included), VmRSS, and for 50,000 devices a projection, labelled
//! EXTRAPOLATED: 10,000 and 16,000 devices share the containers' capacities,
//! so their difference is a device's heap besides its slots; 16,000 -> 19,000
//! doubles every container once (cost D), and 19,000 -> 50,000 doubles each
//! once more (2 D). VmRSS is projected as start-up RSS + configured heap +
//! projected device heap (the verdict), with a range: low if the containers'
//! never-written capacity stays non-resident, high if no free memory is
//! reused (measured RSS + all further growth). Targets: <= 1 KiB heap per idle
//! device; 50,000 devices in <= 64 MiB RSS.
//!
//! `SWITCHBOARD_BENCH_QUICK=1` shrinks every volume (1,000 devices, 16 MiB
//! transfers, 2,000 listen devices, 1,100/2,000/3,000 devices of 5,000
//! connect connpts, projected to 5,000) so CI can run it in seconds. Without
//! `--bench` on the command line (`cargo test --benches`) the quick mode is
//! used too, as Criterion does; other arguments are ignored.
//! `SWITCHBOARD_BENCH_ONLY=ident` (or `bridge`, `memory`) runs one part only.

#[path = "support/harness.rs"]
mod harness;
use harness::{engine_cpu_ns, quick_mode, spawn_engine};
use std::collections::HashMap;
use std::error::Error;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Barrier, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use switchboard::role::Router;
use switchboard::role::router::RouterStats;
use switchboard::{Config, Engine, EngineError, Handle};

type BoxError = Box<dyn Error + Send + Sync>;
type Result<T> = std::result::Result<T, BoxError>;

/// Env var that turns this binary into a device holder (value: the router's
/// device address); see [`hold_devices`].
const HOLDER_ENV: &str = "SWITCHBOARD_ROUTER_HOLDER";
const HOLDER_FIRST_ENV: &str = "SWITCHBOARD_ROUTER_HOLDER_FIRST";
const HOLDER_COUNT_ENV: &str = "SWITCHBOARD_ROUTER_HOLDER_COUNT";
/// Env var that turns this binary into a memory measurer (value: `listen` or
/// `connect`); see [`memory_child`].
const MEMORY_ENV: &str = "SWITCHBOARD_ROUTER_MEMORY";
const MEMORY_CONNPTS_ENV: &str = "SWITCHBOARD_ROUTER_MEMORY_CONNPTS";
const MEMORY_STEPS_ENV: &str = "SWITCHBOARD_ROUTER_MEMORY_STEPS";

/// Client threads of the identification-rate runs.
const CLIENT_THREADS: usize = 4;
/// Payload written after the id in latency runs.
const PAYLOAD: &[u8; 16] = b"\x01\x03\x00\x00\x00\x0a\xc5\xcdPAYLOAD!";
/// Size of one write (and read) in throughput runs.
const CHUNK: usize = 64 * 1024;
/// Period of the throughput byte pattern (prime, so chunks do not line up).
const PERIOD: usize = 251;
const MIB: f64 = 1024.0 * 1024.0;
/// A read that waits this long means a stalled or lossy path: report, don't hang.
const STALL: Duration = Duration::from_secs(10);
/// How long the engine may take to accept or identify everything.
const DEADLINE: Duration = Duration::from_secs(120);
/// Fds kept free for everything but devices and connpt listeners.
const FD_RESERVE: usize = 200;
/// Most device sockets one holder process connects.
const HOLDER_MAX: usize = 10_000;
/// `connect` connpts dial this: fails at once with ENETUNREACH on Linux.
const UNREACHABLE: &str = "255.255.255.255:9";
/// Targets.
const TARGET_LATENCY_US: f64 = 1_000.0;
const TARGET_BRIDGE_RATIO: f64 = 0.5;
const TARGET_HEAP_PER_DEVICE: f64 = 1024.0;
const TARGET_RSS_DEVICES: usize = 50_000;
const TARGET_RSS_BYTES: f64 = 64.0 * MIB;

#[path = "support/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::live;

// ===== plan =====

/// Volumes for one run of the bench.
#[derive(Debug, Clone)]
struct Plan {
    quick: bool,
    /// Devices (and connpts) of the identification-rate runs.
    ident_devices: usize,
    /// Devices of each latency run.
    latency_devices: usize,
    /// Runs of part A.
    ident_repeats: usize,
    /// Bytes per throughput run.
    bridge_bytes: usize,
    bridge_repeats: usize,
    /// C1: listen connpts and devices.
    listen_devices: usize,
    /// C2: connect connpts configured, and the online counts measured.
    connect_connpts: usize,
    connect_steps: Vec<usize>,
    /// RLIMIT_NOFILE (soft) of this process.
    nofile: usize,
}

impl Plan {
    fn new() -> Plan {
        let quick = quick_mode();
        let nofile = nofile_limit().unwrap_or(1024);
        // C1: a listener and a device per connpt.
        let listen_fit = (nofile.saturating_sub(FD_RESERVE) / 2) / 100 * 100;
        // C2: one fd per device.
        let connect_fit = nofile.saturating_sub(FD_RESERVE) / 1000 * 1000;
        if quick {
            Plan {
                quick,
                ident_devices: 1_000,
                latency_devices: 200,
                ident_repeats: 1,
                bridge_bytes: 16 << 20,
                bridge_repeats: 2,
                listen_devices: listen_fit.min(2_000),
                connect_connpts: 5_000,
                connect_steps: steps(&[1_100, 2_000, 3_000], connect_fit),
                nofile,
            }
        } else {
            Plan {
                quick,
                ident_devices: 5_000,
                latency_devices: 1_000,
                ident_repeats: 2,
                bridge_bytes: 256 << 20,
                bridge_repeats: 5,
                listen_devices: listen_fit.min(10_000),
                connect_connpts: TARGET_RSS_DEVICES,
                connect_steps: steps(&[10_000, 16_000, 19_000, TARGET_RSS_DEVICES], connect_fit),
                nofile,
            }
        }
    }
}

/// The wanted counts capped at what fits, without duplicates or zeros.
fn steps(want: &[usize], fit: usize) -> Vec<usize> {
    let mut out: Vec<usize> = want
        .iter()
        .map(|&w| w.min(fit))
        .filter(|&n| n > 0)
        .collect();
    out.dedup();
    out
}

/// RLIMIT_NOFILE (soft) from `/proc/self/limits` (Linux).
fn nofile_limit() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// VmRSS of this process in bytes (Linux).
fn rss_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn verdict(met: bool) -> &'static str {
    if met { "MET" } else { "MISSED" }
}

/// The id of device `i`: `c00042`.
fn device_id(i: usize) -> String {
    format!("c{i:05}")
}

// ===== the router under test =====

/// How the connpts of a test router reach their applications.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Style {
    /// `listen = "127.0.0.1:0"`: one listener (fd) per connpt.
    Listen,
    /// `connect` to an unreachable upstream: no fd per connpt.
    Connect,
}

/// A configuration with one router of `n` connpts, written as TOML text and
/// parsed as `switchboard run -c` does.
fn router_config(n: usize, style: Style) -> Result<Config> {
    use std::fmt::Write as _;
    let mut text = String::with_capacity(200 + n * 80);
    text.push_str(
        "[engine]\nmax_connections = 100000\n\
         [[router]]\nlisten = \"127.0.0.1:0\"\n\
         max_pending = 100000\nmax_pending_per_ip = 100000\n\
         reconnect_min = \"1h\"\nreconnect_max = \"1h\"\n",
    );
    for i in 0..n {
        let side = match style {
            Style::Listen => "listen = \"127.0.0.1:0\"".to_owned(),
            Style::Connect => format!("connect = \"{UNREACHABLE}\""),
        };
        writeln!(
            text,
            "[[router.connpt]]\nname = \"c{i}\"\nid = \"{}\"\n{side}",
            device_id(i)
        )?;
    }
    Ok(Config::parse(&text)?)
}

/// An engine with one router, running on its own thread.
struct Running {
    handle: Handle,
    stats: Arc<RouterStats>,
    /// Where devices connect.
    device_addr: SocketAddr,
    /// The connpts' application ports, in connpt order (listen style).
    connpt_addrs: Vec<SocketAddr>,
    thread: JoinHandle<std::result::Result<(), EngineError>>,
    /// `/proc/<pid>/task/<tid>` of the engine thread, once it has started.
    task: Arc<OnceLock<PathBuf>>,
}

impl Running {
    fn start(config: &Config) -> Result<Running> {
        let router_config = config.router.first().ok_or("no router configured")?;
        let router = Router::new(router_config);
        let stats = router.stats();
        let mut engine = Engine::new(config.engine.clone())?;
        engine.add_role(Box::new(router));
        engine.start()?;
        // The device listener opens first, then each connpt's, in order.
        let mut addrs = engine.listeners().into_iter().map(|l| l.addr);
        let device_addr = addrs.next().ok_or("the router opened no listener")?;
        let connpt_addrs = addrs.collect();
        let handle = engine.handle();
        let (thread, task) = spawn_engine(engine)?;
        Ok(Running {
            handle,
            stats,
            device_addr,
            connpt_addrs,
            thread,
            task,
        })
    }

    fn identified(&self) -> u64 {
        self.stats.identified_total.load(Ordering::Relaxed)
    }

    fn online(&self) -> u64 {
        self.stats.online.load(Ordering::Relaxed)
    }

    /// CPU time of the engine thread so far.
    fn cpu_ns(&self) -> Option<u64> {
        engine_cpu_ns(&self.task)
    }

    /// Whether `done` holds within `limit` (polled every millisecond).
    fn wait_for(&self, limit: Duration, mut done: impl FnMut(&Running) -> bool) -> bool {
        let t0 = Instant::now();
        while !done(self) {
            if t0.elapsed() > limit {
                return false;
            }
            thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// Wait until `done` holds, polling every `step`.
    fn wait(
        &self,
        what: &str,
        step: Duration,
        mut done: impl FnMut(&Running) -> bool,
    ) -> Result<()> {
        let t0 = Instant::now();
        while !done(self) {
            if t0.elapsed() > DEADLINE {
                return Err(format!(
                    "timed out waiting for {what}: engine {:?}, router online {} identified {}",
                    self.handle.stats(),
                    self.online(),
                    self.identified()
                )
                .into());
            }
            if step.is_zero() {
                thread::yield_now();
            } else {
                thread::sleep(step);
            }
        }
        Ok(())
    }

    fn stop(self) -> Result<()> {
        self.handle.stop();
        self.thread.join().map_err(|_| "engine thread panicked")??;
        Ok(())
    }
}

fn connect(addr: SocketAddr) -> Result<TcpStream> {
    Ok(harness::connect(addr, STALL)?)
}

// ===== part A: identification =====

/// One identification-rate run.
#[derive(Debug, Clone, Copy)]
struct Rate {
    per_s: f64,
    secs: f64,
    /// Engine thread CPU per identification, microseconds.
    cpu_us: Option<f64>,
}

/// Latency percentiles, microseconds.
#[derive(Debug, Clone, Copy)]
struct Percentiles {
    p50: f64,
    p99: f64,
    max: f64,
}

fn percentiles(samples: &mut [u64]) -> Percentiles {
    samples.sort_unstable();
    let at = |p: f64| {
        let rank = (p * samples.len() as f64).ceil() as usize;
        let i = rank.clamp(1, samples.len().max(1)) - 1;
        samples.get(i).copied().unwrap_or_default() as f64 / 1_000.0
    };
    Percentiles {
        p50: at(0.50),
        p99: at(0.99),
        max: at(1.0),
    }
}

#[derive(Debug, Clone, Copy)]
struct IdentRates {
    /// Connect + id, in batches of [`BATCH`].
    batched: Rate,
    /// Connect + id, all at once.
    burst: Rate,
    /// Accept-queue overflows during the burst (system-wide counter).
    burst_overflows: Option<u64>,
    /// Ids written by devices already connected.
    ident_only: Rate,
}

#[derive(Debug, Clone, Copy)]
struct IdentFigures {
    rates: IdentRates,
    latency: Percentiles,
    connect_latency: Percentiles,
    direct: Percentiles,
    relay: Percentiles,
}

/// Devices connected per batch: below the listen backlog the engine's
/// listeners get (128, mio's and std's default), so a batch never overflows
/// the accept queue.
const BATCH: usize = 100;

/// Connect devices `0..n` from [`CLIENT_THREADS`] threads in batches of
/// `batch` (the threads connect their shares of a batch at once, writing each
/// id right after connecting if `send_id`); the next batch starts once
/// `done(r, devices so far)` holds. Returns the sockets in device order.
fn connect_batched(
    r: &Running,
    n: usize,
    batch: usize,
    send_id: bool,
    done: impl Fn(&Running, usize) -> bool,
) -> Result<Vec<TcpStream>> {
    let addr = r.device_addr;
    let go = Arc::new(Barrier::new(CLIENT_THREADS + 1));
    let mut handles = Vec::with_capacity(CLIENT_THREADS);
    for t in 0..CLIENT_THREADS {
        let go = Arc::clone(&go);
        handles.push(thread::Builder::new().name("client".into()).spawn(
            move || -> Result<Vec<(usize, TcpStream)>> {
                let mut mine = Vec::new();
                let mut failed = None;
                for start in (0..n).step_by(batch) {
                    go.wait();
                    for i in (start + t..(start + batch).min(n)).step_by(CLIENT_THREADS) {
                        if failed.is_some() {
                            break;
                        }
                        let d = connect(addr).and_then(|mut d| {
                            if send_id {
                                d.write_all(device_id(i).as_bytes())?;
                            }
                            Ok(d)
                        });
                        match d {
                            Ok(d) => mine.push((i, d)),
                            Err(e) => failed = Some(e),
                        }
                    }
                    go.wait();
                }
                match failed {
                    Some(e) => Err(e),
                    None => Ok(mine),
                }
            },
        )?);
    }
    for start in (0..n).step_by(batch) {
        go.wait();
        go.wait();
        let end = (start + batch).min(n);
        r.wait("a batch of devices", Duration::from_micros(100), |r| {
            done(r, end)
        })?;
    }
    let mut all = Vec::with_capacity(n);
    for h in handles {
        all.extend(h.join().map_err(|_| "client thread panicked")??);
    }
    all.sort_unstable_by_key(|(i, _)| *i);
    Ok(all.into_iter().map(|(_, d)| d).collect())
}

/// Close every device and wait until the router and engine hold none.
fn drop_devices(r: &Running, devices: Vec<TcpStream>, keep: u64) -> Result<()> {
    drop(devices);
    r.wait("devices to go offline", Duration::from_millis(1), |r| {
        r.online() == 0 && r.handle.connections() == keep
    })
}

/// `TcpExt: ListenOverflows` from `/proc/net/netstat` (Linux): connections
/// the kernel dropped because a listener's accept queue was full.
fn listen_overflows() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let names = lines.next()?;
    let values = lines.next()?;
    let at = names
        .split_whitespace()
        .position(|w| w == "ListenOverflows")?;
    values.split_whitespace().nth(at)?.parse().ok()
}

/// Connect and identify `n` devices in batches of `batch`; the rate over the
/// whole run, and the accept-queue overflows seen meanwhile.
fn connect_rate(r: &Running, n: usize, batch: usize) -> Result<(Rate, Option<u64>)> {
    let base = r.identified();
    let cpu0 = r.cpu_ns();
    let over0 = listen_overflows();
    let t0 = Instant::now();
    let devices = connect_batched(r, n, batch, true, |r, end| {
        r.identified() >= base + end as u64
    })?;
    let secs = t0.elapsed().as_secs_f64();
    let cpu = r.cpu_ns().zip(cpu0).map(|(b, a)| b.saturating_sub(a));
    let overflows = listen_overflows()
        .zip(over0)
        .map(|(b, a)| b.saturating_sub(a));
    drop_devices(r, devices, 0)?;
    Ok((
        Rate {
            per_s: n as f64 / secs,
            secs,
            cpu_us: cpu.map(|c| c as f64 / 1e3 / n as f64),
        },
        overflows,
    ))
}

/// Identification rates: batched connect + id, one unpaced burst of connect +
/// id, and ids written by already connected devices.
fn ident_rates(r: &Running, n: usize) -> Result<IdentRates> {
    let (batched, _) = connect_rate(r, n, BATCH)?;
    let (burst, burst_overflows) = connect_rate(r, n, n)?;

    // Identification only: everyone connected and pending, then the ids.
    let mut devices = connect_batched(r, n, BATCH, false, |r, end| {
        r.handle.connections() >= end as u64
    })?;
    let writers: Vec<Vec<(usize, TcpStream)>> = {
        let mut shares: Vec<Vec<(usize, TcpStream)>> =
            (0..CLIENT_THREADS).map(|_| Vec::new()).collect();
        for (i, d) in devices.drain(..).enumerate() {
            if let Some(s) = shares.get_mut(i % CLIENT_THREADS) {
                s.push((i, d));
            }
        }
        shares
    };
    let base = r.identified();
    let go = Arc::new(Barrier::new(CLIENT_THREADS + 1));
    let mut handles = Vec::with_capacity(CLIENT_THREADS);
    for mut share in writers {
        let go = Arc::clone(&go);
        handles.push(thread::Builder::new().name("client".into()).spawn(
            move || -> Result<Vec<(usize, TcpStream)>> {
                go.wait();
                for (i, d) in &mut share {
                    d.write_all(device_id(*i).as_bytes())?;
                }
                Ok(share)
            },
        )?);
    }
    let cpu0 = r.cpu_ns();
    go.wait();
    let t0 = Instant::now();
    r.wait("identifications", Duration::from_micros(200), |r| {
        r.identified() >= base + n as u64
    })?;
    let secs = t0.elapsed().as_secs_f64();
    let cpu = r.cpu_ns().zip(cpu0).map(|(b, a)| b.saturating_sub(a));
    for h in handles {
        devices.extend(
            h.join()
                .map_err(|_| "client thread panicked")??
                .into_iter()
                .map(|(_, d)| d),
        );
    }
    let ident_only = Rate {
        per_s: n as f64 / secs,
        secs,
        cpu_us: cpu.map(|c| c as f64 / 1e3 / n as f64),
    };
    drop_devices(r, devices, 0)?;
    Ok(IdentRates {
        batched,
        burst,
        burst_overflows,
        ident_only,
    })
}

/// Latency from the device's write of `id + payload` (after the engine has
/// accepted it) until the application has the payload, over connpts
/// `first..first + n`; with `include_connect` the clock starts before the
/// device connects instead.
fn ident_latency(
    r: &Running,
    first: usize,
    n: usize,
    include_connect: bool,
) -> Result<Percentiles> {
    let held = r.handle.connections();
    let mut apps = Vec::with_capacity(n);
    for i in first..first + n {
        let addr = *r.connpt_addrs.get(i).ok_or("fewer connpts than devices")?;
        apps.push(connect(addr)?);
    }
    let expect = held + n as u64;
    r.wait("applications to attach", Duration::from_millis(1), |r| {
        r.handle.connections() == expect
    })?;
    let mut devices = Vec::with_capacity(n);
    let mut samples = Vec::with_capacity(n);
    let mut got = [0u8; PAYLOAD.len()];
    for (k, app) in apps.iter_mut().enumerate() {
        let mut msg = device_id(first + k).into_bytes();
        msg.extend_from_slice(PAYLOAD);
        let t0 = Instant::now();
        let mut device = connect(r.device_addr)?;
        let t0 = if include_connect {
            t0
        } else {
            let accepted = expect + k as u64 + 1;
            r.wait("the device to be accepted", Duration::ZERO, |r| {
                r.handle.connections() >= accepted
            })?;
            Instant::now()
        };
        device.write_all(&msg)?;
        app.read_exact(&mut got)
            .map_err(|e| format!("device {}: the application got no payload: {e}", first + k))?;
        let ns = t0.elapsed().as_nanos();
        if &got != PAYLOAD {
            return Err(format!("device {}: the application got {got:?}", first + k).into());
        }
        samples.push(u64::try_from(ns).unwrap_or(u64::MAX));
        devices.push(device);
    }
    drop(apps);
    drop_devices(r, devices, held)?;
    Ok(percentiles(&mut samples))
}

/// The floor: the same payload written and read on a direct loopback
/// connection, in one thread (no wake-up on the way).
fn direct_latency(n: usize) -> Result<Percentiles> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let mut a = connect(listener.local_addr()?)?;
    let (mut b, _) = listener.accept()?;
    b.set_nodelay(true)?;
    let mut got = [0u8; PAYLOAD.len()];
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        a.write_all(PAYLOAD)?;
        b.read_exact(&mut got)?;
        samples.push(u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX));
    }
    Ok(percentiles(&mut samples))
}

/// A std relay thread in the router's place ([`relay_path`]): the same hops
/// and thread wake-ups as the router's path, without identification.
fn relay_latency(n: usize) -> Result<Percentiles> {
    let (mut device, mut app, relay) = relay_path()?;
    let mut got = [0u8; PAYLOAD.len()];
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        device.write_all(PAYLOAD)?;
        app.read_exact(&mut got)?;
        samples.push(u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX));
    }
    drop(device);
    relay.join().map_err(|_| "relay thread panicked")?;
    Ok(percentiles(&mut samples))
}

/// Two fresh loopback connections joined by a std relay thread (blocking
/// read of up to 64 KiB, write it all): the writer's end, the reader's end,
/// and the thread, which ends when the writer's end closes.
fn relay_path() -> Result<(TcpStream, TcpStream, JoinHandle<()>)> {
    let in_side = TcpListener::bind("127.0.0.1:0")?;
    let out_side = TcpListener::bind("127.0.0.1:0")?;
    let writer = connect(in_side.local_addr()?)?;
    let reader = connect(out_side.local_addr()?)?;
    let (mut from, _) = in_side.accept()?;
    let (mut to, _) = out_side.accept()?;
    from.set_nodelay(true)?;
    to.set_nodelay(true)?;
    let relay = thread::Builder::new().name("relay".into()).spawn(move || {
        let mut buf = vec![0u8; CHUNK];
        while let Ok(n @ 1..) = from.read(&mut buf) {
            if to.write_all(buf.get(..n).unwrap_or_default()).is_err() {
                break;
            }
        }
        to.shutdown(Shutdown::Both).ok();
    })?;
    Ok((writer, reader, relay))
}

fn print_rates(rep: usize, n: usize, rates: &IdentRates) {
    for (label, rate) in [
        ("connect + id, batches of 100", rates.batched),
        ("connect + id, one burst", rates.burst),
        ("id only (already connected)", rates.ident_only),
    ] {
        println!(
            "  run {rep} {label:<30} {:>9.0} identifications/s ({n} in {:.3} s; engine CPU {})",
            rate.per_s,
            rate.secs,
            rate.cpu_us
                .map_or_else(|| "n/a".to_owned(), |c| format!("{c:.1} us each")),
        );
    }
    if let Some(o) = rates.burst_overflows {
        println!(
            "        (during the burst the kernel dropped {o} connection attempts on full \
             accept queues; each retries after >= 1 s)"
        );
    }
}

fn print_latencies(rep: usize, l: usize, f: &IdentFigures) {
    for (label, p) in [
        ("id+payload -> application", f.latency),
        ("connect+id+payload -> app", f.connect_latency),
        ("std relay thread (reference)", f.relay),
        ("direct, one thread (floor)", f.direct),
    ] {
        println!(
            "  run {rep} {label:<30} p50 {:>7.1} us  p99 {:>7.1} us  max {:>8.1} us  ({l} samples)",
            p.p50, p.p99, p.max
        );
    }
}

fn faster(a: Rate, b: Rate) -> Rate {
    if b.per_s > a.per_s { b } else { a }
}

/// Runs part A `plan.ident_repeats` times on one router and prints each run;
/// returns the best rates and the latency run with the lowest p99.
fn part_ident(plan: &Plan) -> Result<IdentFigures> {
    let n = plan.ident_devices;
    let l = plan.latency_devices.min(n / 2);
    let config = router_config(n, Style::Listen)?;
    let r = Running::start(&config)?;
    drop(config);
    let mut best: Option<IdentFigures> = None;
    for rep in 1..=plan.ident_repeats {
        let rates = ident_rates(&r, n)?;
        print_rates(rep, n, &rates);
        let f = IdentFigures {
            rates,
            latency: ident_latency(&r, 0, l, false)?,
            connect_latency: ident_latency(&r, l, l, true)?,
            direct: direct_latency(l)?,
            relay: relay_latency(l)?,
        };
        print_latencies(rep, l, &f);
        best = Some(match best {
            None => f,
            Some(b) => IdentFigures {
                rates: IdentRates {
                    batched: faster(b.rates.batched, f.rates.batched),
                    burst: faster(b.rates.burst, f.rates.burst),
                    burst_overflows: b.rates.burst_overflows,
                    ident_only: faster(b.rates.ident_only, f.rates.ident_only),
                },
                ..if f.latency.p99 < b.latency.p99 { f } else { b }
            },
        });
    }
    let unknown = r.stats.unknown_total.load(Ordering::Relaxed);
    r.stop()?;
    if unknown > 0 {
        return Err(format!("{unknown} devices were taken for unknown ids").into());
    }
    best.ok_or_else(|| "no identification run".into())
}

// ===== part B: bridging throughput =====

/// One throughput run.
#[derive(Debug, Clone, Copy)]
struct Transfer {
    /// MiB/s of payload delivered (if everything arrived intact).
    mib_s: f64,
    /// Bytes the reader got intact before the end or a problem.
    got: usize,
    /// What went wrong, if anything.
    problem: Option<&'static str>,
}

/// The byte pattern: `pattern[i] = i % PERIOD`, long enough for any chunk offset.
fn pattern() -> Vec<u8> {
    (0..CHUNK + PERIOD).map(|i| (i % PERIOD) as u8).collect()
}

/// `writer` writes `total` bytes in 64 KiB chunks; a reader thread reads them
/// from `reader` and checks each byte. Returns MiB/s from start to last byte.
fn transfer(mut writer: TcpStream, mut reader: TcpStream, total: usize) -> Result<Transfer> {
    let unblock = writer.try_clone()?;
    let go = Arc::new(Barrier::new(3));
    let w_go = Arc::clone(&go);
    let w =
        thread::Builder::new()
            .name("writer".into())
            .spawn(move || -> io::Result<TcpStream> {
                let pat = pattern();
                w_go.wait();
                let mut sent = 0;
                while sent < total {
                    let n = (total - sent).min(CHUNK);
                    let at = sent % PERIOD;
                    writer.write_all(pat.get(at..at + n).unwrap_or_default())?;
                    sent += n;
                }
                Ok(writer)
            })?;
    let r_go = Arc::clone(&go);
    let r = thread::Builder::new().name("reader".into()).spawn(
        move || -> (TcpStream, usize, Option<&'static str>) {
            let pat = pattern();
            let mut buf = vec![0u8; CHUNK];
            r_go.wait();
            let mut got = 0;
            while got < total {
                let want = (total - got).min(CHUNK);
                let n = match reader.read(buf.get_mut(..want).unwrap_or_default()) {
                    Ok(0) => return (reader, got, Some("connection closed early")),
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => return (reader, got, Some("stalled: bytes lost on the way")),
                };
                let at = got % PERIOD;
                if buf.get(..n) != pat.get(at..at + n) {
                    return (reader, got, Some("bytes lost or corrupted on the way"));
                }
                got += n;
            }
            (reader, got, None)
        },
    )?;
    go.wait();
    let t0 = Instant::now();
    let (reader, got, problem) = r.join().map_err(|_| "reader thread panicked")?;
    let secs = t0.elapsed().as_secs_f64();
    if problem.is_some() {
        // The writer may be blocked on a path that stopped: let it fail.
        unblock.shutdown(Shutdown::Both).ok();
    }
    let writer = w.join().map_err(|_| "writer thread panicked")?;
    let problem = problem.or_else(|| writer.is_err().then_some("the writer failed"));
    drop((reader, writer));
    Ok(Transfer {
        mib_s: got as f64 / MIB / secs,
        got,
        problem,
    })
}

#[derive(Debug, Clone)]
struct BridgeFigures {
    to_app: Transfer,
    to_device: Transfer,
    direct: Transfer,
    /// A std relay thread in the router's place.
    relay: Transfer,
    /// Per repeat: device->app, app->device, relay and direct MiB/s.
    paired: Vec<[f64; 4]>,
    /// Engine CPU seconds per GiB bridged (both directions, best runs).
    cpu_s_per_gib: Option<f64>,
    /// Sends the engine refused for a full queue, and bytes the router could
    /// not route, over all runs.
    queue_full: u64,
    unrouted: u64,
    /// Runs after which the router still held the device 2 s after both
    /// ends had closed.
    stuck: usize,
}

fn better(a: Option<Transfer>, b: Transfer) -> Transfer {
    match a {
        None => b,
        Some(a) if a.problem.is_some() => a,
        Some(_) if b.problem.is_some() => b,
        Some(a) => {
            if b.mib_s > a.mib_s {
                b
            } else {
                a
            }
        }
    }
}

/// A fresh application attached to connpt 0 and a fresh device identified on it.
fn bridge_pair(r: &Running) -> Result<(TcpStream, TcpStream)> {
    let app_addr = *r.connpt_addrs.first().ok_or("no connpt port")?;
    let accepted = r.handle.stats().accepted_total;
    let app = connect(app_addr)?;
    r.wait("the application to attach", Duration::from_millis(1), |r| {
        r.handle.stats().accepted_total > accepted
    })?;
    let identified = r.identified();
    let mut device = connect(r.device_addr)?;
    device.write_all(device_id(0).as_bytes())?;
    r.wait("the device to identify", Duration::from_millis(1), |r| {
        r.identified() > identified && r.online() == 1
    })?;
    Ok((device, app))
}

fn part_bridge(plan: &Plan) -> Result<BridgeFigures> {
    let config = router_config(1, Style::Listen)?;
    let r = Running::start(&config)?;
    let total = plan.bridge_bytes;
    let (mut to_app, mut to_device, mut direct, mut relay) = (None, None, None, None);
    // Per repeat: device->app, app->device, relay and direct MiB/s.
    let mut paired: Vec<[f64; 4]> = Vec::new();
    let mut cpu_s = 0.0;
    let mut cpu_known = true;
    let mut bridged = 0usize;
    let mut stuck = 0;
    for rep in 1..=plan.bridge_repeats {
        let mut this = [f64::NAN; 4];
        for to_app_side in [true, false] {
            let (device, app) = bridge_pair(&r)?;
            let (label, w, rd) = if to_app_side {
                ("router device->app", device, app)
            } else {
                ("router app->device", app, device)
            };
            let cpu0 = r.cpu_ns();
            let t = transfer(w, rd, total)?;
            match (cpu0, r.cpu_ns()) {
                (Some(a), Some(b)) => cpu_s += b.saturating_sub(a) as f64 / 1e9,
                _ => cpu_known = false,
            }
            bridged += t.got;
            println!("{}", describe_run(rep, label, &t));
            if let Some(m) = this.get_mut(usize::from(!to_app_side)) {
                *m = t.mib_s;
            }
            let slot = if to_app_side {
                &mut to_app
            } else {
                &mut to_device
            };
            *slot = Some(better(*slot, t));
            // Both ends are closed: the router should let them go. (If it
            // does not, the next device takes the id over.)
            if !r.wait_for(Duration::from_secs(2), |r| {
                r.online() == 0 && r.handle.connections() == 0
            }) {
                stuck += 1;
            }
        }
        let (w, rd, thread) = relay_path()?;
        let t = transfer(w, rd, total)?;
        thread.join().map_err(|_| "relay thread panicked")?;
        println!("{}", describe_run(rep, "std relay thread", &t));
        this[2] = t.mib_s;
        relay = Some(better(relay, t));
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let w = connect(listener.local_addr()?)?;
        let (rd, _) = listener.accept()?;
        rd.set_nodelay(true)?;
        rd.set_read_timeout(Some(STALL))?;
        let t = transfer(w, rd, total)?;
        println!("{}", describe_run(rep, "direct", &t));
        this[3] = t.mib_s;
        direct = Some(better(direct, t));
        paired.push(this);
    }
    let stats = r.handle.stats();
    let unrouted = r.stats.unrouted_bytes.load(Ordering::Relaxed)
        + r.stats.offline_discarded_bytes.load(Ordering::Relaxed);
    r.stop()?;
    Ok(BridgeFigures {
        to_app: to_app.ok_or("no device->app run")?,
        to_device: to_device.ok_or("no app->device run")?,
        direct: direct.ok_or("no direct run")?,
        relay: relay.ok_or("no relay run")?,
        paired,
        cpu_s_per_gib: (cpu_known && bridged > 0)
            .then(|| cpu_s / (bridged as f64 / (1024.0 * MIB))),
        queue_full: stats.queue_full_total,
        unrouted,
        stuck,
    })
}

fn describe_run(rep: usize, label: &str, t: &Transfer) -> String {
    match t.problem {
        None => format!("  run {rep} {label:<20} {:>8.1} MiB/s", t.mib_s),
        Some(p) => format!(
            "  run {rep} {label:<20} FAILED after {} of the bytes: {p}",
            t.got
        ),
    }
}

// ===== part C: idle identified devices =====

/// The holder: connect `count` devices (ids `first..`) to `addr` once told
/// to, write each id, report, and hold them until stdin closes.
fn hold_devices(addr: &str) -> Result<()> {
    let addr: SocketAddr = addr.parse()?;
    let first: usize = std::env::var(HOLDER_FIRST_ENV)?.parse()?;
    let count: usize = std::env::var(HOLDER_COUNT_ENV)?.parse()?;
    let mut stdin = io::stdin().lock();
    let mut go = String::new();
    stdin.read_line(&mut go)?;
    let mut socks = Vec::with_capacity(count);
    for i in first..first + count {
        let mut sock = TcpStream::connect(addr).map_err(|e| format!("device {i}: connect: {e}"))?;
        sock.write_all(device_id(i).as_bytes())?;
        socks.push(sock);
    }
    let mut out = io::stdout().lock();
    writeln!(out, "ready")?;
    out.flush()?;
    // Hold until the parent closes our stdin (or dies).
    let mut sink = [0u8; 64];
    while stdin.read(&mut sink)? > 0 {}
    drop(socks);
    Ok(())
}

/// A child process of this binary, talked to over stdin/stdout.
struct Helper {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Helper {
    fn spawn(envs: &[(&str, String)]) -> Result<Helper> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn()?;
        let stdin = child.stdin.take().ok_or("child stdin")?;
        let stdout = BufReader::new(child.stdout.take().ok_or("child stdout")?);
        Ok(Helper {
            child,
            stdin: Some(stdin),
            stdout,
        })
    }

    fn say(&mut self, line: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().ok_or("child stdin closed")?;
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        Ok(())
    }

    /// The next line, or `None` at EOF.
    fn line(&mut self) -> Result<Option<String>> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        Ok(Some(line.trim_end().to_owned()))
    }

    /// Close its stdin and wait for it.
    fn finish(mut self) -> Result<()> {
        drop(self.stdin.take());
        let status = self.child.wait()?;
        if !status.success() {
            return Err(format!("helper process exited with {status}").into());
        }
        Ok(())
    }
}

/// The memory child: a router with `SWITCHBOARD_ROUTER_MEMORY_CONNPTS`
/// connpts of the given style; devices come online in the steps of
/// `SWITCHBOARD_ROUTER_MEMORY_STEPS` (cumulative counts), each step's
/// devices from new holders. Prints `key=value` lines for the parent.
fn memory_child(style: &str) -> Result<()> {
    let style = match style {
        "listen" => Style::Listen,
        "connect" => Style::Connect,
        other => return Err(format!("unknown memory style {other:?}").into()),
    };
    let connpts: usize = std::env::var(MEMORY_CONNPTS_ENV)?.parse()?;
    let steps: Vec<usize> = std::env::var(MEMORY_STEPS_ENV)?
        .split(',')
        .map(str::parse)
        .collect::<std::result::Result<_, _>>()?;

    // As `switchboard run` does: parse, build and start on the main thread,
    // and run the loop on the main thread (same malloc arena as the parse).
    // Unlike the binary (which drops the parsed Config after start-up), the
    // Config stays alive here, so the heap figures are an upper bound. A controller thread drives the holders and measures.
    let rss_start = rss_bytes().unwrap_or(0);
    let baseline = live();
    let config = router_config(connpts, style)?;
    let router = Router::new(config.router.first().ok_or("no router configured")?);
    let stats = router.stats();
    let mut engine = Engine::new(config.engine.clone())?;
    engine.add_role(Box::new(router));
    engine.start()?;
    let device_addr = engine
        .listeners()
        .first()
        .map(|l| l.addr)
        .ok_or("the router opened no listener")?;
    let handle = engine.handle();
    let stopper = handle.clone();
    let controller =
        thread::Builder::new()
            .name("controller".into())
            .spawn(move || -> Result<()> {
                let r = memory_steps(
                    &handle,
                    &stats,
                    device_addr,
                    &steps,
                    rss_start,
                    baseline,
                    config,
                );
                handle.stop();
                r
            })?;
    let ran = engine.run();
    // If the controller failed early, the engine is stopped already; if the
    // engine failed, the controller's waits time out.
    stopper.stop();
    controller
        .join()
        .map_err(|_| "controller thread panicked")??;
    ran?;
    Ok(())
}

/// The controller of [`memory_child`]: brings the devices online in steps,
/// prints `key=value` lines for the parent, and finally measures the
/// Config's share of the heap (what dropping it frees).
#[allow(clippy::too_many_arguments, reason = "one call site, plain values")]
fn memory_steps(
    handle: &Handle,
    stats: &RouterStats,
    device_addr: SocketAddr,
    steps: &[usize],
    rss_start: u64,
    baseline: isize,
    config: Config,
) -> Result<()> {
    let mut out = io::stdout().lock();
    // Let the engine thread reach its first poll.
    thread::sleep(Duration::from_millis(200));
    let heap0 = live();
    let rss0 = rss_bytes().unwrap_or(0);
    writeln!(out, "configured_heap={}", heap0 - baseline)?;
    writeln!(out, "rss0={rss0} rss_start={rss_start}")?;
    let mut holders: Vec<Helper> = Vec::new();
    let mut online = 0;
    for &step in steps {
        // Spawn this step's holders (at most HOLDER_MAX devices each), then
        // let them all connect at once.
        let mut batch = Vec::new();
        while online < step {
            let count = (step - online).min(HOLDER_MAX);
            let envs = [
                (HOLDER_ENV, device_addr.to_string()),
                (HOLDER_FIRST_ENV, online.to_string()),
                (HOLDER_COUNT_ENV, count.to_string()),
            ];
            batch.push(Helper::spawn(&envs)?);
            online += count;
        }
        let t0 = Instant::now();
        let over0 = listen_overflows();
        for h in &mut batch {
            h.say("go")?;
        }
        for h in &mut batch {
            if h.line()?.as_deref() != Some("ready") {
                return Err("a device holder did not get ready".into());
            }
        }
        while stats.online.load(Ordering::Relaxed) < step as u64 {
            if t0.elapsed() > DEADLINE {
                return Err(format!(
                    "{} of {step} devices online after {DEADLINE:?}",
                    stats.online.load(Ordering::Relaxed)
                )
                .into());
            }
            thread::sleep(Duration::from_millis(10));
        }
        let secs = t0.elapsed().as_secs_f64();
        let overflows = listen_overflows()
            .zip(over0)
            .map_or(-1, |(b, a)| i128::from(b.saturating_sub(a)));
        holders.extend(batch);
        // Let the loop finish the turn that identified the last one.
        thread::sleep(Duration::from_millis(300));
        let heap = live();
        let rss = rss_bytes().unwrap_or(0);
        let engine = handle.stats();
        writeln!(
            out,
            "step devices={step} heap={} rss={rss} connections={} buffers_lent={} secs={secs:.3} \
             overflows={overflows}",
            heap - heap0,
            engine.connections,
            engine.buffers_lent,
        )?;
        out.flush()?;
    }
    let before = live();
    drop(config);
    writeln!(out, "config_heap={}", before - live())?;
    for h in holders {
        h.finish()?;
    }
    Ok(())
}

/// One step of a memory run.
#[derive(Debug, Clone, Copy)]
struct Step {
    devices: usize,
    heap: f64,
    rss: f64,
    connections: u64,
    buffers_lent: u64,
    secs: f64,
    /// SYNs dropped on a full accept queue meanwhile (-1: unknown).
    overflows: f64,
}

#[derive(Debug, Clone)]
struct MemoryRun {
    style: Style,
    connpts: usize,
    configured_heap: f64,
    /// The parsed Config's share of `configured_heap`.
    config_heap: f64,
    rss0: f64,
    /// VmRSS when the child started, before the config was parsed.
    rss_start: f64,
    steps: Vec<Step>,
}

fn run_memory(style: Style, connpts: usize, steps: &[usize]) -> Result<MemoryRun> {
    let steps_text: Vec<String> = steps.iter().map(usize::to_string).collect();
    let envs = [
        (
            MEMORY_ENV,
            match style {
                Style::Listen => "listen",
                Style::Connect => "connect",
            }
            .to_owned(),
        ),
        (MEMORY_CONNPTS_ENV, connpts.to_string()),
        (MEMORY_STEPS_ENV, steps_text.join(",")),
    ];
    let mut child = Helper::spawn(&envs)?;
    let mut values: HashMap<String, f64> = HashMap::new();
    let mut out = Vec::new();
    while let Some(line) = child.line()? {
        let kv: HashMap<&str, f64> = line
            .split_whitespace()
            .filter_map(|w| w.split_once('='))
            .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
            .collect();
        if line.starts_with("step ") {
            let get = |k: &str| kv.get(k).copied().unwrap_or(f64::NAN);
            out.push(Step {
                devices: get("devices") as usize,
                heap: get("heap"),
                rss: get("rss"),
                connections: get("connections") as u64,
                buffers_lent: get("buffers_lent") as u64,
                secs: get("secs"),
                overflows: get("overflows"),
            });
        } else {
            values.extend(kv.into_iter().map(|(k, v)| (k.to_owned(), v)));
        }
    }
    child.finish()?;
    Ok(MemoryRun {
        style,
        connpts,
        configured_heap: values.get("configured_heap").copied().unwrap_or(f64::NAN),
        config_heap: values.get("config_heap").copied().unwrap_or(f64::NAN),
        rss0: values.get("rss0").copied().unwrap_or(f64::NAN),
        rss_start: values.get("rss_start").copied().unwrap_or(f64::NAN),
        steps: out,
    })
}

/// Capacity of a container that starts at 1,024 slots and doubles.
fn capacity(n: usize) -> usize {
    n.next_power_of_two().max(1024)
}

/// Heap and VmRSS projected for `target` devices from three steps `a < b < c`
/// of a `connect` run, under a stated model. Between `a` and `b` no container
/// grows (the connection slab, one slot per device, and the timer slab and
/// heap, two timers per device: idle and re-dial, keep their power-of-two
/// capacities), so `(h_b - h_a) / (b - a)` is the marginal heap of one device
/// besides its slots; between `b` and `c` each container doubles once,
/// costing `D = h_c - h_b - (c - b) x marginal`; between `c` and `target` each
/// doubles once more, costing `2 D`. `None` if the steps do not fit the model.
///
/// VmRSS cannot follow from the heap exactly (free memory the allocator
/// keeps, pages of a container's capacity never written), so three figures:
/// the start-up RSS plus every live byte (central, the verdict), the measured
/// RSS at `c` plus all further heap growth (no reuse of free memory: high),
/// and the central figure without the never-written capacity of the
/// containers (low).
#[derive(Debug, Clone, Copy)]
struct Projection {
    marginal: f64,
    doubling: f64,
    /// Device heap (over the configured heap) at `target` devices.
    heap: f64,
    rss_central: f64,
    rss_high: f64,
    rss_low: f64,
}

fn project(run: &MemoryRun, target: usize) -> Option<Projection> {
    let [a, b, c] = run.steps.get(run.steps.len().checked_sub(3)?..)? else {
        return None;
    };
    let fits = |k: usize| {
        capacity(a.devices * k) == capacity(b.devices * k)
            && capacity(c.devices * k) == 2 * capacity(b.devices * k)
            && capacity(target * k) == 2 * capacity(c.devices * k)
    };
    if !(fits(1) && fits(2)) || target <= c.devices {
        return None;
    }
    let marginal = (b.heap - a.heap) / (b.devices - a.devices) as f64;
    let doubling = c.heap - b.heap - (c.devices - b.devices) as f64 * marginal;
    let heap = c.heap + (target - c.devices) as f64 * marginal + 2.0 * doubling;
    // The containers' share of `heap` covers capacity(target) slots; only
    // `target` of them are ever written.
    let slots = heap - target as f64 * marginal;
    let unwritten = slots * (1.0 - target as f64 / capacity(target) as f64);
    let central = run.rss_start + run.configured_heap + heap;
    Some(Projection {
        marginal,
        doubling,
        heap,
        rss_central: central,
        rss_high: c.rss + (heap - c.heap),
        rss_low: central - unwritten,
    })
}

/// Print the RSS figure for `TARGET_RSS_DEVICES` idle devices: measured if
/// they fit, else projected (and labelled so).
fn report_projection(run: &MemoryRun, plan: &Plan, targets: &mut Vec<String>) {
    let Some(last) = run.steps.last() else {
        return;
    };
    if last.devices >= TARGET_RSS_DEVICES {
        targets.push(format!(
            "{} idle devices: VmRSS {:.1} MiB, measured (target <= {:.0} MiB)  {}",
            last.devices,
            last.rss / MIB,
            TARGET_RSS_BYTES / MIB,
            verdict(last.rss <= TARGET_RSS_BYTES)
        ));
        return;
    }
    let target = run.connpts;
    let Some(p) = project(run, target) else {
        println!(
            "     no projection to {target} devices: the steps do not fit the model (see the docs)"
        );
        return;
    };
    println!(
        "     EXTRAPOLATION to {target} devices ({}; model in the docs): marginal heap {:.0} B per \
         device besides its container slots; the containers' last doubling cost {:.2} MiB, the \
         next one 2x that",
        if plan.quick {
            "quick mode".to_owned()
        } else {
            format!("they do not fit under RLIMIT_NOFILE {}", plan.nofile)
        },
        p.marginal,
        p.doubling / MIB,
    );
    println!(
        "       live heap {:.1} MiB = {:.1} MiB configured connpts + {:.1} MiB devices ({:.0} B per device)",
        (run.configured_heap + p.heap) / MIB,
        run.configured_heap / MIB,
        p.heap / MIB,
        p.heap / target as f64,
    );
    println!(
        "       VmRSS {:.1} MiB (start-up {:.1} MiB + live heap); between {:.1} MiB (container capacity \
         never written is not resident) and {:.1} MiB (measured {:.1} MiB at {} devices + all \
         further heap growth)",
        p.rss_central / MIB,
        run.rss_start / MIB,
        p.rss_low / MIB,
        p.rss_high / MIB,
        last.rss / MIB,
        last.devices,
    );
    targets.push(format!(
        "heap per idle identified device, {target} devices: {:.0} B EXTRAPOLATED \
         (target <= {TARGET_HEAP_PER_DEVICE:.0} B)  {}",
        p.heap / target as f64,
        verdict(p.heap / target as f64 <= TARGET_HEAP_PER_DEVICE)
    ));
    if target >= TARGET_RSS_DEVICES {
        targets.push(format!(
            "{target} idle devices: VmRSS {:.1} MiB EXTRAPOLATED (range {:.1} to {:.1} MiB; \
             {:.1} MiB measured at {} devices) (target <= {:.0} MiB)  {}",
            p.rss_central / MIB,
            p.rss_low / MIB,
            p.rss_high / MIB,
            last.rss / MIB,
            last.devices,
            TARGET_RSS_BYTES / MIB,
            verdict(p.rss_central <= TARGET_RSS_BYTES)
        ));
    } else {
        targets.push(format!(
            "{TARGET_RSS_DEVICES} idle devices: VmRSS not projected in quick mode \
             ({target} connpts configured; the full mode configures {TARGET_RSS_DEVICES})"
        ));
    }
}

// ===== main =====

fn main() -> Result<()> {
    if let Ok(addr) = std::env::var(HOLDER_ENV) {
        return hold_devices(&addr);
    }
    if let Ok(style) = std::env::var(MEMORY_ENV) {
        return memory_child(&style);
    }
    let plan = Plan::new();
    let only = std::env::var("SWITCHBOARD_BENCH_ONLY").unwrap_or_default();
    let part = |p: &str| only.is_empty() || only == p;
    println!(
        "router ({} mode): RLIMIT_NOFILE {}; {} CPUs",
        if plan.quick { "quick" } else { "full" },
        plan.nofile,
        thread::available_parallelism().map_or(0, |n| n.get()),
    );
    let mut targets: Vec<String> = Vec::new();

    if part("ident") {
        let n = plan.ident_devices;
        let l = plan.latency_devices.min(n / 2);
        println!();
        println!(
            "A. identification: {n} connpts with application ports, ids c00000.., \
             {CLIENT_THREADS} client threads; latency over {l} devices; {} runs",
            plan.ident_repeats
        );
        let f = part_ident(&plan)?;
        println!(
            "  best of {}: {:.0} identifications/s in batches of 100, {:.0}/s id only; \
             id+payload -> application p50 {:.1} us, p99 {:.1} us",
            plan.ident_repeats,
            f.rates.batched.per_s,
            f.rates.ident_only.per_s,
            f.latency.p50,
            f.latency.p99
        );
        targets.push(format!(
            "identification latency (write of id+payload -> application has the payload): \
             p99 {:.1} us, p50 {:.1} us (target < {TARGET_LATENCY_US:.0} us)  {}",
            f.latency.p99,
            f.latency.p50,
            verdict(f.latency.p99 < TARGET_LATENCY_US)
        ));
    }

    if part("bridge") {
        println!();
        println!(
            "B. bridging throughput: one device, one application, {} MiB per run in {} KiB writes, \
             each byte checked; one direction at a time; {} repeats, alternating router, std relay \
             thread (reference), direct",
            plan.bridge_bytes >> 20,
            CHUNK >> 10,
            plan.bridge_repeats
        );
        let f = part_bridge(&plan)?;
        println!(
            "  best: device->app {:.1} MiB/s, app->device {:.1} MiB/s, std relay thread {:.1} MiB/s, \
             direct {:.1} MiB/s; engine CPU {}; queue-full refusals {}, unrouted/discarded bytes {}",
            f.to_app.mib_s,
            f.to_device.mib_s,
            f.relay.mib_s,
            f.direct.mib_s,
            f.cpu_s_per_gib
                .map_or_else(|| "n/a".to_owned(), |c| format!("{c:.2} s/GiB bridged")),
            f.queue_full,
            f.unrouted,
        );
        if f.stuck > 0 {
            println!(
                "  after {} runs the router still held the device 2 s after both ends had closed",
                f.stuck
            );
        }
        let median = |k: usize| {
            let mut r: Vec<f64> = f
                .paired
                .iter()
                .filter_map(|p| Some(p.get(k)? / p.get(3)?))
                .collect();
            r.sort_by(f64::total_cmp);
            r.get(r.len() / 2).copied().unwrap_or(f64::NAN)
        };
        println!(
            "  x direct, median of the per-repeat ratios: device->app {:.2}, app->device {:.2}, \
             std relay thread {:.2}; best relay / best direct {:.2}",
            median(0),
            median(1),
            median(2),
            f.relay.mib_s / f.direct.mib_s,
        );
        for (label, t) in [("device->app", f.to_app), ("app->device", f.to_device)] {
            match t.problem {
                None => {
                    let ratio = t.mib_s / f.direct.mib_s;
                    targets.push(format!(
                        "bridging {label}: router/direct = {ratio:.2} (target >= {TARGET_BRIDGE_RATIO:.2})  {}",
                        verdict(ratio >= TARGET_BRIDGE_RATIO)
                    ));
                }
                Some(p) => targets.push(format!(
                    "bridging {label}: {p} ({} of {} bytes arrived intact)  MISSED",
                    t.got, plan.bridge_bytes
                )),
            }
        }
    }

    if part("memory") {
        println!();
        println!(
            "C. idle identified devices (each run in a fresh process; live heap and VmRSS of that process)"
        );
        let mut runs = Vec::new();
        if plan.listen_devices > 0 {
            runs.push(run_memory(
                Style::Listen,
                plan.listen_devices,
                &[plan.listen_devices],
            )?);
        }
        if !plan.connect_steps.is_empty() {
            runs.push(run_memory(
                Style::Connect,
                plan.connect_connpts,
                &plan.connect_steps,
            )?);
        }
        for run in &runs {
            let what = match run.style {
                Style::Listen => "listen connpts (2 fds per device)",
                Style::Connect => "connect connpts, upstream unreachable (1 fd per device)",
            };
            println!(
                "  C{} {} {what}: heap per configured connpt {:.0} B ({:.0} B of it the parsed \
                 Config, which this bench keeps alive; the binary drops it after start-up); VmRSS with no \
                 device {:.1} MiB",
                if run.style == Style::Listen { 1 } else { 2 },
                run.connpts,
                run.configured_heap / run.connpts as f64,
                run.config_heap / run.connpts as f64,
                run.rss0 / MIB,
            );
            for s in &run.steps {
                let per = s.heap / s.devices as f64;
                println!(
                    "     {:>6} devices online: heap +{:.2} MiB = {per:.0} B per device; \
                     VmRSS {:.1} MiB (+{:.0} B per device); engine connections {}, buffers lent {}",
                    s.devices,
                    s.heap / MIB,
                    s.rss / MIB,
                    (s.rss - run.rss0) / s.devices as f64,
                    s.connections,
                    s.buffers_lent,
                );
                if s.overflows >= 0.0 {
                    println!(
                        "            (all online {:.2} s after the holders started; {:.0} SYNs were \
                         dropped on the full accept queue and retried after >= 1 s)",
                        s.secs, s.overflows
                    );
                }
                targets.push(format!(
                    "heap per idle identified device, {} devices ({}): {per:.0} B (target <= {TARGET_HEAP_PER_DEVICE:.0} B)  {}",
                    s.devices,
                    if run.style == Style::Listen { "listen connpts" } else { "connect connpts" },
                    verdict(per <= TARGET_HEAP_PER_DEVICE)
                ));
                if s.buffers_lent != 0 {
                    targets.push(format!(
                        "idle devices hold {} pooled buffers (must be 0)  MISSED",
                        s.buffers_lent
                    ));
                }
            }
            if run.style == Style::Connect {
                report_projection(run, &plan, &mut targets);
            }
        }
    }

    println!();
    println!("targets:");
    for t in &targets {
        println!("  {t}");
    }
    Ok(())
}
