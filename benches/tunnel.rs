//! The tunnel roles (`[[tunnel_server]]` and `[[tunnel_agent]]`) against their
//! targets. As deployed, the server and the agent run in two engines on two
//! loop threads; the local service is an `[[echo]]` role in a third engine
//! (third thread). A direct connection to that same echo engine, driven by the
//! same client code in the same run, is the reference: both paths end in the
//! same echo loop, so the ratio isolates what the tunnel adds (two engine
//! hops, four more loopback connections, framing, credit). Every config is
//! TOML text parsed as `switchboard run -c` does. The machine's load average
//! is printed at the start and the end: on a small shared VM other work moves
//! the throughput and latency figures a lot; the CPU figures move least.
//!
//! In-process parts (three engine threads in this process):
//! 1. Throughput. Each stream has a writer thread (64 KiB writes of a byte
//!    pattern) and a reader thread that reads the echo back and checks every
//!    byte. 1 and 8 concurrent streams, `bytes` in total per run (512 MiB full,
//!    16 MiB quick), split evenly over the streams. Paths: direct; tunnel,
//!    extended protocol with a token (every extension granted: auth,
//!    heartbeat, close-ack, credit, half-close, peer address); tunnel, base
//!    protocol (agent `extensions = false`, service without token), 1 stream.
//!    Runs alternate within each repeat (3 full, 1 quick); the best run of
//!    each kind and the median of the per-repeat ratios are printed. The clock
//!    starts when every stream is connected end to end (the echo engine holds
//!    its connection) and stops when the last reader has its last byte.
//!    Target: tunnel >= 0.35 x direct for 1 and for 8 streams (best vs best);
//!    extended >= base for 1 stream (best vs best; the extended link's
//!    receive windows grow by themselves, docs/PROTOCOL.md §4.4).
//! 6. CPU per GiB: each engine thread's CPU time over each run (from
//!    `/proc/<tid>/schedstat`; on loopback it includes the kernel's TCP work
//!    done in that thread), per GiB carried by the tunnel. An echoed byte
//!    crosses the tunnel twice (client -> service, service -> client) and is
//!    counted twice; the echo engine's CPU is per GiB echoed. Also the busy
//!    fraction of each loop thread and the CPUs used by the whole run
//!    (engines + client threads) / wall time.
//! 2. Latency: one connection per path, 64-byte messages, one at a time
//!    (write, read the echo back, check it); 1,000 unmeasured round trips per
//!    connection, then blocks alternating between the paths (20,000 round
//!    trips per path full, 2,000 quick). p50/p99 of each, the added RTT =
//!    tunnel - direct at p50 and at p99 (target <= 30 us, both), and each
//!    engine's CPU per round trip. Reference: two std relays in series
//!    (client -> relay -> relay -> echo, one blocking thread per relay and
//!    direction): the tunnel's thread hand-offs without its code.
//!
//! Parts in child processes (this binary re-executed with
//! `SWITCHBOARD_TUNNEL_CHILD` = a TOML config; it does what `switchboard run`
//! does: parse, build, start, drop the config, run the loop on its main
//! thread, plus a controller thread answering `stat` on stdin with its live
//! heap from a counting global allocator, a 1 ms heap-peak sampler, VmRSS and
//! VmHWM). One process per side, so each side is measured alone: the server
//! (two services `a` and `b` with tokens), the agent (two `[[tunnel_agent]]`
//! roles: a link carries at most 256 streams, so 500 streams need two
//! links), and the echo service.
//! 3. Heap per idle stream: N = 500 clients (250 per service) connect and stay
//!    idle; once the server, the agent and the echo each hold N, heap growth
//!    over the linked-but-idle state / N, per side and in total. Again after
//!    every stream has done one 64-byte round trip (one at a time). Target
//!    <= 4 KiB per idle stream for the tunnel (server + agent); the echo
//!    side's connection is printed too, and the total with it.
//! 5. Burst: 500 concurrent streams (4 client threads; every stream connects,
//!    writes 1 KiB, reads it back; then all are open at once: "during"; then
//!    all close: "after", once every side holds no stream), repeated (3 rounds
//!    full, 1 quick). Heap and VmRSS per side before, during, peak (heap
//!    sampled every 1 ms; VmHWM reset per round through
//!    `/proc/self/clear_refs`), after. "Back to baseline": heap after <= heap
//!    before + 64 KiB on every side.
//! 7. Link stress (a correctness check, no target): k = 8 .. 250 streams of
//!    one link each send 16 KiB (one DATA frame of the default `max_data`)
//!    while the server child is stopped (SIGSTOP), then it continues and
//!    finds all k streams readable in one poll; the same with the echo child
//!    stopped, so that the agent finds the k replies at once. The links must
//!    stay up and every stream get its bytes back.
//!
//! Part with the release binary (`CARGO_BIN_EXE_switchboard`, built by cargo
//! with the bench profile: the deployed code, no counting allocator;
//! `SWITCHBOARD_BENCH_BIN=<path>` measures another build instead):
//! 4. Idle RSS: `switchboard run -c server.toml` (one tunnel server, services
//!    `a` and `b`) and `switchboard agent --name a ...` as child processes,
//!    linked, no stream; VmRSS (its anonymous / file-backed split, resident
//!    KiB per mapping from `/proc/<pid>/smaps`, and PSS) of each process after
//!    1 s. Target <= 2 MiB per process. Then a second agent (`b`) links and
//!    the burst of part 5 runs against the binaries: VmRSS of each process
//!    before, during, VmHWM, and after (2.5 s after its fd count is back, so the
//!    buffer pool has freed what the burst left idle).
//!
//! `SWITCHBOARD_BENCH_QUICK=1` (or no `--bench` on the command line, as with
//! `cargo test --benches`) shrinks the volumes so a run takes seconds.
//! `SWITCHBOARD_BENCH_ONLY=throughput` (or `latency`, `memory`, `stress`,
//! `rss`) runs one part only. For experiments: `SWITCHBOARD_BENCH_ENGINE`
//! adds `[engine]` keys and `SWITCHBOARD_BENCH_TUNNEL` tunnel keys to every
//! config written (`;`-separated, e.g. `buffer_pool = 16` or
//! `window = 1048576; max_data = 65535`), and `SWITCHBOARD_TUNNEL_LOG=1` gives
//! the child processes an info log on stderr.

#[path = "support/harness.rs"]
mod harness;
use harness::{engine_cpu_ns, percentile, quick_mode, spawn_engine, task_cpu_ns, this_task};

#[path = "support/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::live;

use std::collections::HashMap;
use std::error::Error;
use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering};
use std::sync::{Arc, Barrier, OnceLock, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use switchboard::role::{AgentState, Echo, TunnelAgent, TunnelServer, TunnelStats};
use switchboard::{Config, Engine, EngineError, Handle};

type BoxError = Box<dyn Error + Send + Sync>;
type Result<T> = std::result::Result<T, BoxError>;

/// Env var that turns this binary into a one-side child (value: TOML config).
const CHILD_ENV: &str = "SWITCHBOARD_TUNNEL_CHILD";
/// The services' shared secret.
const TOKEN: &str = "bench-token-0123456789";
/// Size of one client write (and read) in throughput runs.
const CHUNK: usize = 64 * 1024;
/// Period of the throughput byte pattern (prime, so chunks do not line up).
const PERIOD: usize = 251;
/// Latency message size.
const MSG: usize = 64;
/// Unmeasured round trips per latency connection.
const RTT_WARMUP: usize = 1_000;
/// What each burst stream writes and reads back ("a little": a request).
const BURST_BYTES: usize = 1024;
/// What each stream of the link stress check writes at once: one DATA frame
/// of the default `max_data`.
const STRESS_BYTES: usize = 16 * 1024;
/// Streams per link of the link stress check, tried in this order until the
/// link goes down.
const STRESS_STEPS: [usize; 8] = [8, 16, 32, 48, 64, 128, 192, 250];
/// Client threads of the burst.
const CLIENT_THREADS: usize = 4;
/// "Back to baseline" tolerance per side.
const BASELINE_SLACK: f64 = 64.0 * 1024.0;
const KIB: f64 = 1024.0;
const MIB: f64 = 1024.0 * 1024.0;
const GIB: f64 = 1024.0 * MIB;
/// A read that waits this long means a stalled path: report, don't hang.
const STALL: Duration = Duration::from_secs(10);
/// How long anything may take to connect, link or close.
const DEADLINE: Duration = Duration::from_secs(30);
/// Pause before a memory reading, so the loops finish their turns.
const SETTLE: Duration = Duration::from_millis(300);
/// Long enough for the engine's buffer pool to free what a burst left idle.
const POOL_TRIMMED: Duration = Duration::from_millis(2500);
/// Targets.
const TARGET_RATIO: f64 = 0.35;
const TARGET_ADDED_US: f64 = 30.0;
const TARGET_HEAP_PER_STREAM: f64 = 4096.0;
const TARGET_IDLE_RSS: f64 = 2.0 * MIB;

// ===== plan =====

/// Volumes for one run of the bench.
#[derive(Debug, Clone)]
struct Plan {
    quick: bool,
    /// Bytes echoed per throughput run (over all its streams).
    bytes: usize,
    repeats: usize,
    /// Measured round trips per latency path, in `rtt_blocks` blocks.
    rtt_samples: usize,
    rtt_blocks: usize,
    /// Idle streams (part 3) and burst streams (part 5), over two links.
    idle_streams: usize,
    burst_streams: usize,
    burst_rounds: usize,
}

impl Plan {
    fn new() -> Plan {
        let quick = quick_mode();
        Plan {
            quick,
            bytes: if quick { 16 << 20 } else { 512 << 20 },
            repeats: if quick { 1 } else { 3 },
            rtt_samples: if quick { 2_000 } else { 20_000 },
            rtt_blocks: if quick { 2 } else { 10 },
            idle_streams: 500,
            burst_streams: 500,
            burst_rounds: if quick { 1 } else { 3 },
        }
    }
}

/// The 1, 5 and 15 minute load averages (other work on the machine).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "n/a".to_owned())
}

fn verdict(met: bool) -> &'static str {
    if met { "MET" } else { "MISSED" }
}

/// Wait until `done` holds, polling every millisecond.
fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> Result<()> {
    let t0 = Instant::now();
    while !done() {
        if t0.elapsed() > limit {
            return Err(format!("timed out after {limit:?} waiting for {what}").into());
        }
        thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

fn connect(addr: SocketAddr) -> Result<TcpStream> {
    Ok(harness::connect(addr, STALL)?)
}

// ===== configurations =====

/// `[engine]` keys from `SWITCHBOARD_BENCH_ENGINE` (for experiments, e.g.
/// `buffer_pool = 16`), added to every config this bench writes.
fn engine_section() -> String {
    std::env::var("SWITCHBOARD_BENCH_ENGINE")
        .map(|keys| format!("[engine]\n{}\n", keys.replace(';', "\n")))
        .unwrap_or_default()
}

/// Keys from `SWITCHBOARD_BENCH_TUNNEL` (`;`-separated, e.g.
/// `window = 1048576; max_data = 65535`), added to every tunnel server and
/// agent this bench configures (for experiments).
fn tunnel_keys() -> String {
    std::env::var("SWITCHBOARD_BENCH_TUNNEL")
        .map(|keys| {
            keys.split(';')
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(|k| format!("{k}\n"))
                .collect()
        })
        .unwrap_or_default()
}

fn echo_toml() -> String {
    format!("{}[[echo]]\nlisten = \"127.0.0.1:0\"\n", engine_section())
}

/// A tunnel server on `listen` with services `(name, token)`, public ports 0.
fn server_toml(listen: &str, services: &[(&str, Option<&str>)]) -> String {
    let mut t = format!(
        "{}[[tunnel_server]]\nlisten = \"{listen}\"\n{}",
        engine_section(),
        tunnel_keys()
    );
    for (name, token) in services {
        t.push_str("[[tunnel_server.service]]\n");
        let _ = writeln!(t, "name = \"{name}\"\npublic = \"127.0.0.1:0\"");
        if let Some(token) = token {
            let _ = writeln!(t, "token = \"{token}\"");
        }
    }
    t
}

/// One agent role: name, token, extensions.
type AgentSpec<'a> = (&'a str, Option<&'a str>, bool);

/// Tunnel agents dialling `server`, streams to `local`.
fn agent_toml(server: SocketAddr, local: SocketAddr, agents: &[AgentSpec<'_>]) -> String {
    let mut t = engine_section();
    for (name, token, extensions) in agents {
        let _ = writeln!(
            t,
            "[[tunnel_agent]]\nname = \"{name}\"\nserver = \"{server}\"\nlocal = \"{local}\"\n\
             extensions = {extensions}\n{}",
            tunnel_keys()
        );
        if let Some(token) = token {
            let _ = writeln!(t, "token = \"{token}\"");
        }
    }
    t
}

// ===== in-process engines =====

/// A started engine on its own thread.
struct Loop {
    handle: Handle,
    thread: JoinHandle<std::result::Result<(), EngineError>>,
    task: Arc<OnceLock<PathBuf>>,
}

impl Loop {
    fn spawn(engine: Engine) -> Result<Loop> {
        let handle = engine.handle();
        let (thread, task) = spawn_engine(engine)?;
        Ok(Loop {
            handle,
            thread,
            task,
        })
    }

    /// CPU time of the loop thread so far.
    fn cpu_ns(&self) -> Option<u64> {
        engine_cpu_ns(&self.task)
    }

    fn stop(self) -> Result<()> {
        self.handle.stop();
        self.thread.join().map_err(|_| "engine thread panicked")??;
        Ok(())
    }
}

/// Server, agent and echo engines on three threads; the server has service
/// `ext` (token, extended) and `base` (no token); the agent engine has one
/// agent for each (the second with `extensions = false`).
struct Rig {
    server: Loop,
    agent: Loop,
    echo: Loop,
    server_stats: Arc<TunnelStats>,
    ext_stats: Arc<TunnelStats>,
    base_stats: Arc<TunnelStats>,
    echo_addr: SocketAddr,
    ext_addr: SocketAddr,
    base_addr: SocketAddr,
    /// Extension bits in force on each link.
    ext_flags: u16,
    base_flags: u16,
}

/// The local service: an echo engine on its own loop thread, and its address.
fn spawn_echo() -> Result<(SocketAddr, Loop)> {
    let config = Config::parse(&echo_toml())?;
    let mut engine = Engine::new(config.engine.clone())?;
    for e in &config.echo {
        engine.add_role(Box::new(Echo::new(e)));
    }
    engine.start()?;
    let echo_addr = engine
        .listeners()
        .first()
        .map(|l| l.addr)
        .ok_or("echo opened no listener")?;
    Ok((echo_addr, Loop::spawn(engine)?))
}

impl Rig {
    fn start() -> Result<Rig> {
        let (echo_addr, echo) = spawn_echo()?;

        let config = Config::parse(&server_toml(
            "127.0.0.1:0",
            &[("ext", Some(TOKEN)), ("base", None)],
        ))?;
        let server_role =
            TunnelServer::new(config.tunnel_server.first().ok_or("no tunnel server")?);
        let server_stats = server_role.stats();
        let mut engine = Engine::new(config.engine.clone())?;
        engine.add_role(Box::new(server_role));
        engine.start()?;
        let link_addr = engine
            .listeners()
            .first()
            .map(|l| l.addr)
            .ok_or("the server opened no listener")?;
        let server = Loop::spawn(engine)?;

        let config = Config::parse(&agent_toml(
            link_addr,
            echo_addr,
            &[("ext", Some(TOKEN), true), ("", None, false)],
        ))?;
        let mut engine = Engine::new(config.engine.clone())?;
        let mut stats = Vec::new();
        for a in &config.tunnel_agent {
            let role = TunnelAgent::new(a);
            stats.push(role.stats());
            engine.add_role(Box::new(role));
        }
        let [ext_stats, base_stats]: [Arc<TunnelStats>; 2] =
            stats.try_into().map_err(|_| "two agents expected")?;
        engine.start()?;
        let agent = Loop::spawn(engine)?;

        let up = |s: &TunnelStats| matches!(s.agent(), Some((AgentState::Up, _, _)));
        wait_until("both links", DEADLINE, || {
            up(&ext_stats)
                && up(&base_stats)
                && server_stats.public_addr("ext").is_some()
                && server_stats.public_addr("base").is_some()
        })?;
        let flags = |s: &TunnelStats| s.agent().map_or(0, |a| a.2);
        Ok(Rig {
            ext_addr: server_stats.public_addr("ext").ok_or("no ext port")?,
            base_addr: server_stats.public_addr("base").ok_or("no base port")?,
            ext_flags: flags(&ext_stats),
            base_flags: flags(&base_stats),
            server,
            agent,
            echo,
            server_stats,
            ext_stats,
            base_stats,
            echo_addr,
        })
    }

    /// CPU time of the server, agent and echo loop threads.
    fn cpu(&self) -> [Option<u64>; 3] {
        [
            self.server.cpu_ns(),
            self.agent.cpu_ns(),
            self.echo.cpu_ns(),
        ]
    }

    fn streams(&self) -> u64 {
        self.server_stats.streams.load(Ordering::Relaxed)
    }

    /// Problems the counters saw (must all be 0).
    fn anomalies(&self) -> String {
        let mut out = String::new();
        for (side, s) in [
            ("server", &self.server_stats),
            ("agent ext", &self.ext_stats),
            ("agent base", &self.base_stats),
        ] {
            for (what, c) in [
                ("refused", &s.refused_total),
                ("unknown", &s.unknown_total),
                ("malformed", &s.malformed_total),
                ("stale", &s.stale_total),
                ("credit violations", &s.credit_violations_total),
                ("stalled", &s.stalled_total),
                ("reconnects", &s.reconnects_total),
            ] {
                let v = c.load(Ordering::Relaxed);
                if v > 0 {
                    let _ = write!(out, " {side} {what} {v};");
                }
            }
        }
        for (side, l) in [
            ("server", &self.server),
            ("agent", &self.agent),
            ("echo", &self.echo),
        ] {
            let q = l.handle.stats().queue_full_total;
            if q > 0 {
                let _ = write!(out, " {side} engine queue-full {q};");
            }
        }
        out
    }

    fn stop(self) -> Result<()> {
        self.agent.stop()?;
        self.server.stop()?;
        self.echo.stop()
    }
}

// ===== part 1 and 6: throughput and CPU =====

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Direct,
    Extended,
    Base,
}

impl Route {
    fn label(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Extended => "tunnel extended",
            Route::Base => "tunnel base",
        }
    }

    fn addr(self, rig: &Rig) -> SocketAddr {
        match self {
            Route::Direct => rig.echo_addr,
            Route::Extended => rig.ext_addr,
            Route::Base => rig.base_addr,
        }
    }
}

/// One throughput run.
#[derive(Debug, Clone, Copy)]
struct Transfer {
    /// MiB/s echoed (payload that came back intact).
    mib_s: f64,
    secs: f64,
    got: usize,
    problem: Option<&'static str>,
    /// CPU ns of the server, agent and echo loops during the run.
    cpu: [Option<u64>; 3],
    /// CPU ns of the client threads (writers and readers).
    client_cpu: Option<u64>,
}

/// The byte pattern: `pattern[i] = i % PERIOD`, long enough for any chunk offset.
fn pattern() -> Vec<u8> {
    (0..CHUNK + PERIOD).map(|i| (i % PERIOD) as u8).collect()
}

/// `streams` connections to `path`, each echoing `bytes / streams` bytes
/// (writer and reader thread per stream, every byte checked).
fn echo_run(rig: &Rig, path: Route, streams: usize, bytes: usize) -> Result<Transfer> {
    let addr = path.addr(rig);
    let share = bytes / streams;
    let echo_held = rig.echo.handle.connections();
    let mut socks = Vec::with_capacity(streams);
    for _ in 0..streams {
        socks.push(connect(addr)?);
    }
    // Stream set-up is not timed: wait until every stream reached the echo.
    wait_until("the streams to reach the echo", DEADLINE, || {
        rig.echo.handle.connections() >= echo_held + streams as u64
    })?;
    let go = Arc::new(Barrier::new(2 * streams + 1));
    let mut writers = Vec::with_capacity(streams);
    let mut readers = Vec::with_capacity(streams);
    let mut unblock = Vec::with_capacity(streams);
    for sock in socks {
        let mut w = sock.try_clone()?;
        unblock.push(sock.try_clone()?);
        let mut r = sock;
        let w_go = Arc::clone(&go);
        writers.push(thread::Builder::new().name("writer".into()).spawn(
            move || -> io::Result<Option<u64>> {
                let pat = pattern();
                w_go.wait();
                let mut sent = 0;
                while sent < share {
                    let n = (share - sent).min(CHUNK);
                    let at = sent % PERIOD;
                    w.write_all(pat.get(at..at + n).unwrap_or_default())?;
                    sent += n;
                }
                Ok(this_task().as_deref().and_then(task_cpu_ns))
            },
        )?);
        let r_go = Arc::clone(&go);
        readers.push(thread::Builder::new().name("reader".into()).spawn(
            move || -> (usize, Option<&'static str>, Option<u64>) {
                let pat = pattern();
                let mut buf = vec![0u8; CHUNK];
                r_go.wait();
                let mut got = 0;
                let mut problem = None;
                while got < share {
                    let want = (share - got).min(CHUNK);
                    let n = match r.read(buf.get_mut(..want).unwrap_or_default()) {
                        Ok(0) => {
                            problem = Some("connection closed early");
                            break;
                        }
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(_) => {
                            problem = Some("stalled: bytes lost on the way");
                            break;
                        }
                    };
                    let at = got % PERIOD;
                    if buf.get(..n) != pat.get(at..at + n) {
                        problem = Some("bytes corrupted on the way");
                        break;
                    }
                    got += n;
                }
                (got, problem, this_task().as_deref().and_then(task_cpu_ns))
            },
        )?);
    }
    let cpu0 = rig.cpu();
    go.wait();
    let t0 = Instant::now();
    let mut got = 0;
    let mut problem = None;
    let mut client_cpu = Some(0);
    for r in readers {
        let (g, p, c) = r.join().map_err(|_| "reader thread panicked")?;
        got += g;
        problem = problem.or(p);
        client_cpu = client_cpu.zip(c).map(|(a, b)| a + b);
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu1 = rig.cpu();
    if problem.is_some() {
        for s in &unblock {
            s.shutdown(Shutdown::Both).ok();
        }
    }
    for w in writers {
        match w.join().map_err(|_| "writer thread panicked")? {
            Ok(c) => client_cpu = client_cpu.zip(c).map(|(a, b)| a + b),
            Err(_) => problem = problem.or(Some("a writer failed")),
        }
    }
    drop(unblock);
    wait_until("the streams to close", DEADLINE, || {
        rig.streams() == 0 && rig.echo.handle.connections() == echo_held
    })?;
    let mut cpu = [None; 3];
    for (c, (a, b)) in cpu.iter_mut().zip(cpu0.iter().zip(cpu1.iter())) {
        *c = a.zip(*b).map(|(a, b)| b.saturating_sub(a));
    }
    Ok(Transfer {
        mib_s: got as f64 / MIB / secs,
        secs,
        got,
        problem,
        cpu,
        client_cpu,
    })
}

/// The runs of one kind (path and stream count).
#[derive(Debug, Clone)]
struct Kind {
    path: Route,
    streams: usize,
    runs: Vec<Transfer>,
}

impl Kind {
    fn failed(&self) -> Option<&Transfer> {
        self.runs.iter().find(|t| t.problem.is_some())
    }

    fn best(&self) -> f64 {
        self.runs.iter().map(|t| t.mib_s).fold(f64::NAN, f64::max)
    }

    /// CPU seconds per GiB for loop `i` (0 server, 1 agent, 2 echo) over all
    /// runs; `per_byte` bytes counted per echoed byte.
    fn cpu_per_gib(&self, i: usize, per_byte: f64) -> Option<f64> {
        let mut ns = 0u64;
        let mut bytes = 0usize;
        for t in &self.runs {
            ns += (*t.cpu.get(i)?)?;
            bytes += t.got;
        }
        (bytes > 0).then(|| ns as f64 / 1e9 / (bytes as f64 * per_byte / GIB))
    }

    /// Busy fraction of loop `i` over all runs.
    fn busy(&self, i: usize) -> Option<f64> {
        let mut ns = 0u64;
        let mut secs = 0.0;
        for t in &self.runs {
            ns += (*t.cpu.get(i)?)?;
            secs += t.secs;
        }
        (secs > 0.0).then(|| ns as f64 / 1e9 / secs)
    }
}

fn opt(v: Option<f64>, digits: usize, unit: &str) -> String {
    v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.digits$}{unit}"))
}

struct ThroughputFigures {
    kinds: Vec<Kind>,
}

impl ThroughputFigures {
    fn kind(&self, path: Route, streams: usize) -> Option<&Kind> {
        self.kinds
            .iter()
            .find(|k| k.path == path && k.streams == streams)
    }

    /// Median over repeats of tunnel / direct for one stream count.
    fn median_ratio(&self, path: Route, streams: usize) -> f64 {
        let (Some(t), Some(d)) = (self.kind(path, streams), self.kind(Route::Direct, streams))
        else {
            return f64::NAN;
        };
        let mut r: Vec<f64> = t
            .runs
            .iter()
            .zip(&d.runs)
            .map(|(t, d)| t.mib_s / d.mib_s)
            .collect();
        r.sort_by(f64::total_cmp);
        r.get(r.len() / 2).copied().unwrap_or(f64::NAN)
    }
}

fn part_throughput(rig: &Rig, plan: &Plan) -> Result<ThroughputFigures> {
    let order = [
        (Route::Direct, 1),
        (Route::Extended, 1),
        (Route::Base, 1),
        (Route::Direct, 8),
        (Route::Extended, 8),
    ];
    let mut kinds: Vec<Kind> = order
        .iter()
        .map(|&(path, streams)| Kind {
            path,
            streams,
            runs: Vec::new(),
        })
        .collect();
    for rep in 1..=plan.repeats {
        for kind in &mut kinds {
            let t = echo_run(rig, kind.path, kind.streams, plan.bytes)?;
            let cpu = |i: usize| {
                t.cpu
                    .get(i)
                    .copied()
                    .flatten()
                    .map(|ns| ns as f64 / 1e9 / t.secs * 100.0)
            };
            let cores = t
                .cpu
                .iter()
                .try_fold(t.client_cpu.unwrap_or(0), |a, c| c.map(|c| a + c))
                .map(|ns| ns as f64 / 1e9 / t.secs);
            match t.problem {
                None => println!(
                    "  run {rep} {:<16} {} stream{} {:>8.1} MiB/s  ({:.2} s; loops busy: server {}, \
                     agent {}, echo {}; client threads {}; CPUs used {})",
                    kind.path.label(),
                    kind.streams,
                    if kind.streams == 1 { " " } else { "s" },
                    t.mib_s,
                    t.secs,
                    opt(cpu(0), 0, "%"),
                    opt(cpu(1), 0, "%"),
                    opt(cpu(2), 0, "%"),
                    opt(
                        t.client_cpu.map(|ns| ns as f64 / 1e9 / t.secs * 100.0),
                        0,
                        "%"
                    ),
                    opt(cores, 2, ""),
                ),
                Some(p) => println!(
                    "  run {rep} {:<16} {} streams FAILED after {} of {} bytes: {p}",
                    kind.path.label(),
                    kind.streams,
                    t.got,
                    plan.bytes
                ),
            }
            kind.runs.push(t);
        }
    }
    Ok(ThroughputFigures { kinds })
}

// ===== part 2: latency =====

#[derive(Debug, Clone, Copy)]
struct Rtt {
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

fn rtt_rounds(sock: &mut TcpStream, n: usize, samples: Option<&mut Vec<u64>>) -> Result<()> {
    let mut msg = [0u8; MSG];
    let mut got = [0u8; MSG];
    let mut samples = samples;
    for i in 0..n {
        msg[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let t0 = Instant::now();
        sock.write_all(&msg)?;
        sock.read_exact(&mut got)?;
        let ns = t0.elapsed().as_nanos();
        if got != msg {
            return Err("the echo came back different".into());
        }
        if let Some(s) = samples.as_deref_mut() {
            s.push(u64::try_from(ns).unwrap_or(u64::MAX));
        }
    }
    Ok(())
}

/// A std relay in front of `upstream` (the reference for the tunnel's hops):
/// accepts one connection, dials `upstream`, and copies each direction with
/// a blocking thread (read up to 64 KiB, write it all). Returns its address.
fn std_relay(upstream: SocketAddr) -> Result<SocketAddr> {
    fn pump(mut from: TcpStream, mut to: TcpStream) {
        let mut buf = vec![0u8; CHUNK];
        while let Ok(n @ 1..) = from.read(&mut buf) {
            if to.write_all(buf.get(..n).unwrap_or_default()).is_err() {
                break;
            }
        }
        to.shutdown(Shutdown::Write).ok();
    }
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    thread::Builder::new().name("relay".into()).spawn(move || {
        let Ok((down, _)) = listener.accept() else {
            return;
        };
        let Ok(up) = TcpStream::connect(upstream) else {
            return;
        };
        down.set_nodelay(true).ok();
        up.set_nodelay(true).ok();
        let (Ok(down2), Ok(up2)) = (down.try_clone(), up.try_clone()) else {
            return;
        };
        let other = thread::Builder::new()
            .name("relay".into())
            .spawn(move || pump(down2, up2));
        pump(up, down);
        if let Ok(t) = other {
            t.join().ok();
        }
    })?;
    Ok(addr)
}

/// One latency path's figures.
#[derive(Debug, Clone)]
struct LatencyRow {
    label: &'static str,
    rtt: Rtt,
    /// Engine CPU per round trip, microseconds: server, agent, echo.
    cpu_us: [Option<f64>; 3],
}

fn part_latency(rig: &Rig, plan: &Plan) -> Result<Vec<LatencyRow>> {
    let relay = std_relay(std_relay(rig.echo_addr)?)?;
    let paths = [
        (Route::Direct.label(), rig.echo_addr),
        (Route::Extended.label(), rig.ext_addr),
        (Route::Base.label(), rig.base_addr),
        ("2 std relays", relay),
    ];
    let mut socks = Vec::new();
    for (_, addr) in paths {
        let mut s = connect(addr)?;
        rtt_rounds(&mut s, RTT_WARMUP, None)?;
        socks.push(s);
    }
    let per_block = plan.rtt_samples / plan.rtt_blocks;
    let mut samples: Vec<Vec<u64>> = paths
        .iter()
        .map(|_| Vec::with_capacity(plan.rtt_samples))
        .collect();
    let mut cpu_ns: Vec<[Option<u64>; 3]> = paths.iter().map(|_| [Some(0); 3]).collect();
    for _ in 0..plan.rtt_blocks {
        for ((s, out), cpu) in socks
            .iter_mut()
            .zip(samples.iter_mut())
            .zip(cpu_ns.iter_mut())
        {
            let c0 = rig.cpu();
            rtt_rounds(s, per_block, Some(out))?;
            let c1 = rig.cpu();
            for ((acc, a), b) in cpu.iter_mut().zip(c0).zip(c1) {
                *acc = acc
                    .zip(a.zip(b))
                    .map(|(acc, (a, b))| acc + b.saturating_sub(a));
            }
        }
    }
    drop(socks);
    wait_until("the latency streams to close", DEADLINE, || {
        rig.streams() == 0
    })?;
    let mut out = Vec::new();
    for (((label, _), mut s), cpu) in paths.into_iter().zip(samples).zip(cpu_ns) {
        s.sort_unstable();
        let n = s.len().max(1) as f64;
        out.push(LatencyRow {
            label,
            rtt: Rtt {
                p50: percentile(&s, 0.50),
                p99: percentile(&s, 0.99),
                p999: percentile(&s, 0.999),
                max: percentile(&s, 1.0),
            },
            cpu_us: cpu.map(|c| c.map(|ns| ns as f64 / 1e3 / n)),
        });
    }
    Ok(out)
}

// ===== child processes =====

/// Highest live heap seen by the sampler since the last `reset`.
static PEAK: AtomicIsize = AtomicIsize::new(0);

/// A `/proc/<pid>/status` field in bytes (Linux; the kB fields).
fn status_bytes(pid: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Reset VmHWM of a process to its current RSS.
fn reset_hwm(pid: &str) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").ok();
}

/// Memory figures of a process: `rss=.. hwm=.. anon=.. file=..`.
fn rss_fields(pid: &str) -> String {
    let f = |k: &str| status_bytes(pid, k).map_or(-1, |v| v as i64);
    format!(
        "rss={} hwm={} anon={} file={} shmem={}",
        f("VmRSS:"),
        f("VmHWM:"),
        f("RssAnon:"),
        f("RssFile:"),
        f("RssShmem:")
    )
}

/// The child: run the roles of `toml` as `switchboard run` does (parse,
/// build, start, drop the config, loop on the main thread), answer `stat` and
/// `reset` on stdin, stop at EOF.
fn child_main(toml: &str) -> Result<()> {
    if std::env::var_os("SWITCHBOARD_TUNNEL_LOG").is_some() {
        simplelog::WriteLogger::init(
            log::LevelFilter::Info,
            simplelog::Config::default(),
            io::stderr(),
        )
        .ok();
    }
    let base = live();
    let config = Config::parse(toml)?;
    let mut engine = Engine::new(config.engine.clone())?;
    let mut tunnels: Vec<(Arc<TunnelStats>, Vec<String>)> = Vec::new();
    for e in &config.echo {
        engine.add_role(Box::new(Echo::new(e)));
    }
    for s in &config.tunnel_server {
        let role = TunnelServer::new(s);
        let names = s.service.iter().map(|x| x.name.clone()).collect();
        tunnels.push((role.stats(), names));
        engine.add_role(Box::new(role));
    }
    for a in &config.tunnel_agent {
        let role = TunnelAgent::new(a);
        tunnels.push((role.stats(), Vec::new()));
        engine.add_role(Box::new(role));
    }
    engine.start()?;
    let listeners = engine.listeners();
    drop(config);
    {
        let mut out = io::stdout().lock();
        for l in &listeners {
            writeln!(out, "listen {}", l.addr)?;
        }
        writeln!(out, "started")?;
        out.flush()?;
    }
    drop(listeners);
    let handle = engine.handle();
    let done = Arc::new(AtomicBool::new(false));
    let sampler_done = Arc::clone(&done);
    PEAK.store(live(), Ordering::Relaxed);
    let sampler = thread::Builder::new()
        .name("sampler".into())
        .spawn(move || {
            while !sampler_done.load(Ordering::Relaxed) {
                PEAK.fetch_max(live(), Ordering::Relaxed);
                thread::sleep(Duration::from_millis(1));
            }
        })?;
    let controller =
        thread::Builder::new()
            .name("controller".into())
            .spawn(move || -> Result<()> {
                let r = child_control(&handle, &tunnels, base);
                handle.stop();
                done.store(true, Ordering::Relaxed);
                r
            })?;
    let ran = engine.run();
    controller
        .join()
        .map_err(|_| "controller thread panicked")??;
    sampler.join().map_err(|_| "sampler thread panicked")?;
    ran?;
    Ok(())
}

fn child_control(
    handle: &Handle,
    tunnels: &[(Arc<TunnelStats>, Vec<String>)],
    base: isize,
) -> Result<()> {
    let stdin = io::stdin();
    let mut line = String::new();
    loop {
        line.clear();
        if stdin.lock().read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut out = io::stdout().lock();
        match line.trim() {
            "stat" => {
                let heap = live() - base;
                let peak = PEAK.load(Ordering::Relaxed).max(live()) - base;
                let e = handle.stats();
                let sum =
                    |f: fn(&TunnelStats) -> u64| tunnels.iter().map(|(s, _)| f(s)).sum::<u64>();
                let links = sum(|s| s.links.load(Ordering::Relaxed));
                let refused = sum(|s| s.refused_total.load(Ordering::Relaxed));
                let links_total = sum(|s| s.links_total.load(Ordering::Relaxed));
                let lost = sum(|s| s.reconnects_total.load(Ordering::Relaxed));
                let odd = sum(|s| {
                    s.stale_total.load(Ordering::Relaxed)
                        + s.malformed_total.load(Ordering::Relaxed)
                        + s.unknown_total.load(Ordering::Relaxed)
                        + s.credit_violations_total.load(Ordering::Relaxed)
                        + s.stalled_total.load(Ordering::Relaxed)
                });
                let streams = sum(|s| s.streams.load(Ordering::Relaxed));
                let mut public = String::new();
                for (s, names) in tunnels {
                    for n in names {
                        if let Some(a) = s.public_addr(n) {
                            let _ = write!(public, " public.{n}={a}");
                        }
                    }
                }
                writeln!(
                    out,
                    "heap={heap} peak={peak} {} conns={} lent={} links={links} streams={streams} refused={refused} odd={odd} links_total={links_total} lost={lost}{public}",
                    rss_fields("self"),
                    e.connections,
                    e.buffers_lent,
                )?;
            }
            "reset" => {
                PEAK.store(live(), Ordering::Relaxed);
                reset_hwm("self");
                writeln!(out, "ok")?;
            }
            other => writeln!(out, "error unknown command {other:?}")?,
        }
        out.flush()?;
    }
}

/// One reading of a child: `key=value` pairs.
#[derive(Debug, Clone, Default)]
struct Stat(HashMap<String, String>);

impl Stat {
    fn parse(line: &str) -> Stat {
        Stat(
            line.split_whitespace()
                .filter_map(|w| w.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        )
    }

    fn num(&self, k: &str) -> f64 {
        self.0
            .get(k)
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    }

    fn addr(&self, k: &str) -> Option<SocketAddr> {
        self.0.get(k)?.parse().ok()
    }
}

/// A child process of this binary (one side), talked to over stdin/stdout;
/// killed when dropped.
struct Side {
    name: &'static str,
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    listeners: Vec<SocketAddr>,
}

impl Side {
    fn spawn(name: &'static str, toml: &str) -> Result<Side> {
        let mut child = Command::new(std::env::current_exe()?)
            .env(CHILD_ENV, toml)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdin = child.stdin.take().ok_or("child stdin")?;
        let stdout = BufReader::new(child.stdout.take().ok_or("child stdout")?);
        let mut side = Side {
            name,
            child,
            stdin,
            stdout,
            listeners: Vec::new(),
        };
        loop {
            let line = side.line()?;
            if line == "started" {
                break;
            }
            if let Some(a) = line.strip_prefix("listen ") {
                side.listeners.push(a.parse()?);
            }
        }
        Ok(side)
    }

    fn line(&mut self) -> Result<String> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            return Err(format!("the {} child exited", self.name).into());
        }
        Ok(line.trim_end().to_owned())
    }

    fn ask(&mut self, cmd: &str) -> Result<String> {
        writeln!(self.stdin, "{cmd}")?;
        self.stdin.flush()?;
        self.line()
    }

    fn stat(&mut self) -> Result<Stat> {
        Ok(Stat::parse(&self.ask("stat")?))
    }

    fn reset(&mut self) -> Result<()> {
        match self.ask("reset")?.as_str() {
            "ok" => Ok(()),
            other => Err(format!("{} child: {other}", self.name).into()),
        }
    }

    fn first_listener(&self) -> Result<SocketAddr> {
        self.listeners
            .first()
            .copied()
            .ok_or_else(|| format!("the {} child opened no listener", self.name).into())
    }
}

impl Drop for Side {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

// ===== clients for the memory parts =====

/// Open `n` idle streams spread over `addrs` (round robin).
fn open_idle(addrs: &[SocketAddr], n: usize) -> Result<Vec<TcpStream>> {
    let mut socks = Vec::with_capacity(n);
    for i in 0..n {
        let addr = *addrs.get(i % addrs.len().max(1)).ok_or("no address")?;
        socks.push(connect(addr)?);
    }
    Ok(socks)
}

/// The burst: `n` streams over `addrs` from [`CLIENT_THREADS`] threads at
/// once; each thread connects its share, writes [`BURST_BYTES`] on each and
/// reads them back; with every stream open and done, `during` runs; then all
/// close. Returns what `during` returned and the seconds until it ran.
fn burst<T>(
    addrs: &[SocketAddr],
    n: usize,
    during: impl FnOnce() -> Result<T>,
) -> Result<(T, f64)> {
    let go = Arc::new(Barrier::new(CLIENT_THREADS + 1));
    let mut handles = Vec::with_capacity(CLIENT_THREADS);
    for t in 0..CLIENT_THREADS {
        let mine: Vec<SocketAddr> = (t..n)
            .step_by(CLIENT_THREADS)
            .filter_map(|i| addrs.get(i % addrs.len().max(1)).copied())
            .collect();
        let go = Arc::clone(&go);
        handles.push(thread::Builder::new().name("burst".into()).spawn(
            move || -> Result<Vec<TcpStream>> {
                let pat = pattern();
                let data = pat.get(..BURST_BYTES).unwrap_or_default();
                go.wait();
                let mut socks = Vec::with_capacity(mine.len());
                for a in mine {
                    socks.push(connect(a)?);
                }
                for s in &mut socks {
                    s.write_all(data)?;
                }
                let mut got = vec![0u8; BURST_BYTES];
                for (i, s) in socks.iter_mut().enumerate() {
                    s.read_exact(&mut got)
                        .map_err(|e| format!("burst stream {i} of thread {t}: {e}"))?;
                    if got != data {
                        return Err("a burst stream got different bytes back".into());
                    }
                }
                Ok(socks)
            },
        )?);
    }
    go.wait();
    let t0 = Instant::now();
    let mut socks = Vec::with_capacity(n);
    for h in handles {
        socks.extend(h.join().map_err(|_| "burst thread panicked")??);
    }
    let secs = t0.elapsed().as_secs_f64();
    let out = during()?;
    drop(socks);
    Ok((out, secs))
}

// ===== parts 3 and 5: heap per side =====

/// One reading of the three sides.
#[derive(Debug, Clone)]
struct Reading {
    label: String,
    sides: [Stat; 3],
}

fn read_all(sides: &mut [Side; 3], label: &str) -> Result<Reading> {
    let [a, b, c] = sides;
    Ok(Reading {
        label: label.to_owned(),
        sides: [a.stat()?, b.stat()?, c.stat()?],
    })
}

/// Wait until the server and agent children hold `streams` streams and the
/// echo child `conns` connections.
fn wait_sides(sides: &mut [Side; 3], streams: u64, conns: u64) -> Result<()> {
    let t0 = Instant::now();
    loop {
        let r = read_all(sides, "")?;
        let [s, a, e] = &r.sides;
        if s.num("streams") == streams as f64
            && a.num("streams") == streams as f64
            && e.num("conns") == conns as f64
        {
            return Ok(());
        }
        if t0.elapsed() > DEADLINE {
            return Err(format!(
                "timed out waiting for {streams} streams: server {:?}, agent {:?}, echo conns {}",
                s.0.get("streams"),
                a.0.get("streams"),
                e.num("conns")
            )
            .into());
        }
        thread::sleep(Duration::from_millis(5));
    }
}

struct MemoryFigures {
    readings: Vec<Reading>,
    idle_n: usize,
    /// Indexes into `readings`.
    linked: usize,
    idle: usize,
    exchanged: usize,
    /// (before, during, after) per burst round.
    rounds: Vec<(usize, usize, usize)>,
    burst_secs: Vec<f64>,
}

const SIDES: [&str; 3] = ["server", "agent", "echo"];

/// Echo, server (services `a` and `b`) and agent (two agents) children,
/// linked; returns them (server, agent, echo) and the public ports of a, b.
fn spawn_sides() -> Result<([Side; 3], [SocketAddr; 2])> {
    let echo = Side::spawn("echo", &echo_toml())?;
    let echo_addr = echo.first_listener()?;
    let server = Side::spawn(
        "server",
        &server_toml("127.0.0.1:0", &[("a", Some(TOKEN)), ("b", Some(TOKEN))]),
    )?;
    let link = server.first_listener()?;
    let agent = Side::spawn(
        "agent",
        &agent_toml(
            link,
            echo_addr,
            &[("a", Some(TOKEN), true), ("b", Some(TOKEN), true)],
        ),
    )?;
    let mut sides = [server, agent, echo];
    let t0 = Instant::now();
    let publics = loop {
        let [s, a, _] = &mut sides;
        let (s, a) = (s.stat()?, a.stat()?);
        if let (Some(pa), Some(pb)) = (s.addr("public.a"), s.addr("public.b"))
            && s.num("links") == 2.0
            && a.num("links") == 2.0
        {
            break [pa, pb];
        }
        if t0.elapsed() > DEADLINE {
            return Err("the agent child did not link both services".into());
        }
        thread::sleep(Duration::from_millis(5));
    };
    Ok((sides, publics))
}

fn part_memory(plan: &Plan) -> Result<MemoryFigures> {
    let (mut sides, publics) = spawn_sides()?;
    let mut readings = Vec::new();
    thread::sleep(SETTLE);
    readings.push(read_all(&mut sides, "linked, no stream")?);
    let linked = readings.len() - 1;

    // Part 3: idle streams.
    let n = plan.idle_streams;
    let mut socks = open_idle(&publics, n)?;
    wait_sides(&mut sides, n as u64, n as u64)?;
    thread::sleep(SETTLE);
    readings.push(read_all(&mut sides, &format!("{n} idle streams"))?);
    let idle = readings.len() - 1;
    for (i, s) in socks.iter_mut().enumerate() {
        if let Err(e) = rtt_rounds(s, 1, None) {
            let r = read_all(&mut sides, "")?;
            return Err(format!("idle stream {i}: {e}; sides {:?}", r.sides).into());
        }
    }
    thread::sleep(SETTLE);
    readings.push(read_all(
        &mut sides,
        &format!("{n} idle, after one 64 B round trip each"),
    )?);
    let exchanged = readings.len() - 1;
    drop(socks);
    wait_sides(&mut sides, 0, 0)?;
    thread::sleep(SETTLE);
    readings.push(read_all(&mut sides, "idle streams closed")?);

    // Part 5: bursts.
    let mut rounds = Vec::new();
    let mut burst_secs = Vec::new();
    let b = plan.burst_streams;
    for round in 1..=plan.burst_rounds {
        for s in &mut sides {
            s.reset()?;
        }
        readings.push(read_all(&mut sides, &format!("burst {round}: before"))?);
        let before = readings.len() - 1;
        let res = burst(&publics, b, || {
            read_all(&mut sides, &format!("burst {round}: {b} streams open"))
        });
        let (during, secs) = match res {
            Ok(x) => x,
            Err(e) => {
                thread::sleep(SETTLE);
                let r = read_all(&mut sides, "")?;
                return Err(format!("burst {round}: {e}; sides {:?}", r.sides).into());
            }
        };
        burst_secs.push(secs);
        readings.push(during);
        let during = readings.len() - 1;
        wait_sides(&mut sides, 0, 0)?;
        thread::sleep(SETTLE);
        readings.push(read_all(
            &mut sides,
            &format!("burst {round}: after (peak = since before)"),
        )?);
        rounds.push((before, during, readings.len() - 1));
    }
    Ok(MemoryFigures {
        readings,
        idle_n: n,
        linked,
        idle,
        exchanged,
        rounds,
        burst_secs,
    })
}

fn print_memory(m: &MemoryFigures, plan: &Plan, targets: &mut Vec<String>) {
    println!(
        "  {:<44} {:>25}   {:>25}   {:>8}",
        "state", "live heap KiB", "VmRSS KiB", "pool"
    );
    println!(
        "  {:<44} {:>7} {:>7} {:>7} {:>8} {:>8} {:>8}   {:>8}",
        "", "server", "agent", "echo", "server", "agent", "echo", "lent"
    );
    for r in &m.readings {
        let h = |i: usize| r.sides.get(i).map_or(f64::NAN, |s| s.num("heap") / KIB);
        let rss = |i: usize| r.sides.get(i).map_or(f64::NAN, |s| s.num("rss") / KIB);
        let lent: f64 = r.sides.iter().map(|s| s.num("lent")).sum();
        println!(
            "  {:<44} {:>7.1} {:>7.1} {:>7.1} {:>8.0} {:>8.0} {:>8.0}   {:>8.0}",
            r.label,
            h(0),
            h(1),
            h(2),
            rss(0),
            rss(1),
            rss(2),
            lent
        );
    }
    let per = |a: usize, b: usize, side: usize| -> f64 {
        let get = |r: usize| {
            m.readings
                .get(r)
                .and_then(|r| r.sides.get(side))
                .map_or(f64::NAN, |s| s.num("heap"))
        };
        (get(b) - get(a)) / m.idle_n as f64
    };
    for (label, at) in [
        ("idle streams", m.idle),
        ("idle streams after one round trip", m.exchanged),
    ] {
        let [s, a, e] = [
            per(m.linked, at, 0),
            per(m.linked, at, 1),
            per(m.linked, at, 2),
        ];
        println!(
            "  heap per stream, {label}: server {s:.0} B + agent {a:.0} B = tunnel {:.0} B; \
             echo {e:.0} B; total {:.0} B",
            s + a,
            s + a + e
        );
        targets.push(format!(
            "heap per {label} ({} streams over 2 links), tunnel (server + agent): {:.0} B \
             (server {s:.0} + agent {a:.0}); with the echo side's connection {:.0} B \
             (target <= {TARGET_HEAP_PER_STREAM:.0} B)  {}{}",
            m.idle_n,
            s + a,
            s + a + e,
            verdict(s + a <= TARGET_HEAP_PER_STREAM),
            if s + a + e <= TARGET_HEAP_PER_STREAM {
                " (total too)"
            } else {
                " (the total with the echo side exceeds it)"
            },
        ));
    }
    for (i, &(before, during, after)) in m.rounds.iter().enumerate() {
        let get = |r: usize, side: usize, k: &str| {
            m.readings
                .get(r)
                .and_then(|r| r.sides.get(side))
                .map_or(f64::NAN, |s| s.num(k))
        };
        let mut line = format!(
            "  burst {} ({} streams, {} B each way, all open after {:.3} s):",
            i + 1,
            plan.burst_streams,
            BURST_BYTES,
            m.burst_secs.get(i).copied().unwrap_or(f64::NAN)
        );
        let mut back = true;
        let mut worst = String::new();
        for (side, name) in SIDES.iter().enumerate() {
            let (b, d, a) = (
                get(before, side, "heap"),
                get(during, side, "heap"),
                get(after, side, "heap"),
            );
            let peak = get(after, side, "peak");
            let _ = write!(
                line,
                "\n     {name:<6} heap {:.1} -> during {:.1} (peak {:.1}) -> after {:.1} KiB ({:+.1}); \
                 VmRSS {:.0} -> {:.0} (VmHWM {:.0}) -> {:.0} KiB",
                b / KIB,
                d / KIB,
                peak / KIB,
                a / KIB,
                (a - b) / KIB,
                get(before, side, "rss") / KIB,
                get(during, side, "rss") / KIB,
                get(after, side, "hwm") / KIB,
                get(after, side, "rss") / KIB,
            );
            if a - b > BASELINE_SLACK {
                back = false;
                let _ = write!(worst, " {name} {:+.1} KiB", (a - b) / KIB);
            }
        }
        println!("{line}");
        targets.push(format!(
            "burst {} of {} streams: heap back to baseline on every side (within {:.0} KiB)  {}{}",
            i + 1,
            plan.burst_streams,
            BASELINE_SLACK / KIB,
            verdict(back),
            if back {
                String::new()
            } else {
                format!(" (after - before:{worst})")
            }
        ));
    }
}

// ===== part 4: the release binary =====

/// The `switchboard` binary part 4 runs: `SWITCHBOARD_BENCH_BIN` if set (to
/// compare another build, e.g. the `min-size` profile), else the one cargo
/// built for this bench.
fn binary() -> PathBuf {
    std::env::var_os("SWITCHBOARD_BENCH_BIN")
        .filter(|p| !p.is_empty())
        .map_or_else(
            || PathBuf::from(env!("CARGO_BIN_EXE_switchboard")),
            PathBuf::from,
        )
}

/// The release binary as a child process; its stderr (the log) is read by a
/// thread and handed over line by line. Killed when dropped.
struct Bin {
    name: String,
    child: Child,
    pid: String,
    lines: mpsc::Receiver<String>,
    /// Log lines seen so far (for error messages).
    seen: Vec<String>,
}

impl Bin {
    fn spawn(name: &str, args: &[&str]) -> Result<Bin> {
        let mut child = Command::new(binary())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child.stderr.take().ok_or("child stderr")?;
        let (tx, rx) = mpsc::channel();
        thread::Builder::new().name("log".into()).spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        })?;
        Ok(Bin {
            name: name.to_owned(),
            pid: child.id().to_string(),
            child,
            lines: rx,
            seen: Vec::new(),
        })
    }

    /// The first log line containing `needle`, within [`DEADLINE`].
    fn wait_log(&mut self, needle: &str) -> Result<String> {
        let t0 = Instant::now();
        loop {
            let left = DEADLINE.saturating_sub(t0.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.contains(needle);
                    self.seen.push(line.clone());
                    if hit {
                        return Ok(line);
                    }
                }
                Err(_) => {
                    return Err(format!(
                        "{}: no log line with {needle:?}; log so far: {:?}",
                        self.name, self.seen
                    )
                    .into());
                }
            }
        }
    }

    /// Drain the log without waiting.
    fn drain(&mut self) {
        while self.lines.try_recv().is_ok() {}
    }

    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid)).map_or(0, |d| d.count())
    }

    fn mem(&self) -> Stat {
        Stat::parse(&rss_fields(&self.pid))
    }
}

impl Drop for Bin {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// Resident KiB of a process by mapping (file name, `[heap]`, `[stack]`,
/// `[anon]` ...), largest first, from `/proc/<pid>/smaps`; and its PSS in KiB.
fn smaps(pid: &str) -> (Vec<(String, u64)>, Option<u64>) {
    let mut by: HashMap<String, u64> = HashMap::new();
    if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) {
        let mut current = String::new();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            let Some(first) = words.next() else { continue };
            if first.contains('-') && !first.ends_with(':') {
                // A mapping header: address perms offset dev inode [path].
                let path = line.split_whitespace().nth(5).unwrap_or("[anon]");
                current = Path::new(path)
                    .file_name()
                    .and_then(|n| n.to_str())
                    .map_or_else(|| path.to_owned(), str::to_owned);
                if path.starts_with('[') {
                    current = path.to_owned();
                }
            } else if first == "Rss:" {
                let kib: u64 = words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                *by.entry(current.clone()).or_default() += kib;
            }
        }
    }
    let mut v: Vec<(String, u64)> = by.into_iter().filter(|(_, k)| *k > 0).collect();
    v.sort_by_key(|e| std::cmp::Reverse(e.1));
    let pss = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|t| {
            let line = t.lines().find(|l| l.starts_with("Pss:"))?;
            line.split_whitespace().nth(1)?.parse().ok()
        });
    (v, pss)
}

/// A port that was free a moment ago on 127.0.0.1.
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A process's resident KiB by mapping, largest first, and its PSS in KiB.
type Smaps = (Vec<(String, u64)>, Option<u64>);

struct RssFigures {
    /// Idle, linked: (process, memory stat, smaps breakdown).
    idle: Vec<(String, Stat, Smaps)>,
    /// Per burst round, per process: before, during, after (hwm in after).
    rounds: Vec<Vec<(String, Stat, Stat, Stat)>>,
}

fn part_rss(plan: &Plan) -> Result<RssFigures> {
    // The local service: an echo engine in this process.
    let (echo_addr, echo) = spawn_echo()?;

    let link = format!("127.0.0.1:{}", free_port()?);
    let path = std::env::temp_dir().join(format!(
        "switchboard-tunnel-bench-{}.toml",
        std::process::id()
    ));
    std::fs::write(
        &path,
        server_toml(&link, &[("a", Some(TOKEN)), ("b", Some(TOKEN))]),
    )?;
    let result = rss_with_binaries(plan, &path, &link, echo_addr);
    std::fs::remove_file(&path).ok();
    echo.stop()?;
    result
}

fn rss_with_binaries(
    plan: &Plan,
    config: &Path,
    link: &str,
    echo_addr: SocketAddr,
) -> Result<RssFigures> {
    let config = config.to_str().ok_or("temp path not UTF-8")?;
    let mut server = Bin::spawn("server", &["run", "-c", config])?;
    server.wait_log("agents on")?;
    let local = echo_addr.to_string();
    let agent = |name: &str| {
        Bin::spawn(
            &format!("agent {name}"),
            &[
                "agent", "--server", link, "--local", &local, "--name", name, "--token", TOKEN,
            ],
        )
    };
    let public = |line: &str| -> Result<SocketAddr> {
        Ok(line
            .rsplit_once("clients on ")
            .ok_or("no public address in the log")?
            .1
            .trim()
            .parse()?)
    };
    let mut agent_a = agent("a")?;
    let pa = public(&server.wait_log("service 'a' linked")?)?;
    agent_a.wait_log("linked to")?;
    thread::sleep(Duration::from_secs(1));
    let idle = vec![
        (
            "server (`switchboard run -c`)".to_owned(),
            server.mem(),
            smaps(&server.pid),
        ),
        (
            "agent (`switchboard agent`)".to_owned(),
            agent_a.mem(),
            smaps(&agent_a.pid),
        ),
    ];

    let mut agent_b = agent("b")?;
    let pb = public(&server.wait_log("service 'b' linked")?)?;
    agent_b.wait_log("linked to")?;
    thread::sleep(SETTLE);
    let mut bins = [server, agent_a, agent_b];
    let fds: Vec<usize> = bins.iter().map(Bin::fds).collect();
    let mut rounds = Vec::new();
    for _ in 0..plan.burst_rounds {
        for b in &bins {
            reset_hwm(&b.pid);
        }
        let before: Vec<Stat> = bins.iter().map(Bin::mem).collect();
        let (during, _) = burst(&[pa, pb], plan.burst_streams, || {
            Ok(bins.iter().map(Bin::mem).collect::<Vec<Stat>>())
        })?;
        wait_until("the binaries to close every stream", DEADLINE, || {
            bins.iter().zip(&fds).all(|(b, &n)| b.fds() <= n)
        })?;
        // The engine frees pooled buffers that stayed idle for 1-2 s.
        thread::sleep(POOL_TRIMMED);
        for b in &mut bins {
            b.drain();
        }
        let after: Vec<Stat> = bins.iter().map(Bin::mem).collect();
        rounds.push(
            bins.iter()
                .zip(before)
                .zip(during)
                .zip(after)
                .map(|(((b, x), y), z)| (b.name.clone(), x, y, z))
                .collect(),
        );
    }
    Ok(RssFigures { idle, rounds })
}

fn print_rss(f: &RssFigures, plan: &Plan, targets: &mut Vec<String>) {
    for (name, s, (maps, pss)) in &f.idle {
        let rss = s.num("rss");
        println!(
            "  {name:<32} idle, linked: VmRSS {:.0} KiB ({:.2} MiB) = anon {:.0} + file {:.0} + shmem {:.0} KiB; VmHWM {:.0} KiB",
            rss / KIB,
            rss / MIB,
            s.num("anon") / KIB,
            s.num("file") / KIB,
            s.num("shmem") / KIB,
            s.num("hwm") / KIB,
        );
        let top: Vec<String> = maps
            .iter()
            .take(8)
            .map(|(m, k)| format!("{m} {k}"))
            .collect();
        println!(
            "  {:<32} resident KiB by mapping: {}; PSS {} KiB",
            "",
            top.join(", "),
            pss.map_or_else(|| "n/a".to_owned(), |p| p.to_string())
        );
        targets.push(format!(
            "idle RSS, {name}, linked, no stream: {:.0} KiB = {:.2} MiB (target <= {:.0} MiB)  {}",
            rss / KIB,
            rss / MIB,
            TARGET_IDLE_RSS / MIB,
            verdict(rss <= TARGET_IDLE_RSS)
        ));
    }
    for (i, round) in f.rounds.iter().enumerate() {
        println!(
            "  burst {} against the binaries ({} streams over agents a and b):",
            i + 1,
            plan.burst_streams
        );
        for (name, b, d, a) in round {
            println!(
                "     {name:<10} VmRSS {:.0} KiB -> during {:.0} KiB (VmHWM {:.0} KiB) -> after {:.0} KiB ({:+.0} KiB; anon {:+.0} KiB)",
                b.num("rss") / KIB,
                d.num("rss") / KIB,
                a.num("hwm") / KIB,
                a.num("rss") / KIB,
                (a.num("rss") - b.num("rss")) / KIB,
                (a.num("anon") - b.num("anon")) / KIB,
            );
        }
    }
}

// ===== link stress =====

/// Send a signal ("STOP", "CONT", ...) to a child process (by its id), from
/// Rust (kill(2) through rustix).
fn signal(pid: u32, sig: &str) -> Result<()> {
    use rustix::process::{Pid, Signal, kill_process};
    let s = match sig {
        "STOP" => Signal::STOP,
        "CONT" => Signal::CONT,
        "TERM" => Signal::TERM,
        "KILL" => Signal::KILL,
        other => return Err(format!("unknown signal {other}").into()),
    };
    let p = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| format!("bad pid {pid}"))?;
    kill_process(p, s).map_err(|e| format!("kill -{sig} {pid}: {e}"))?;
    Ok(())
}

/// One stress step: `k` streams on service `a`; the child `freeze` (0 the
/// server, 2 the echo) is stopped (SIGSTOP) while every client writes
/// [`STRESS_BYTES`], then continued, so that it finds all `k` streams
/// readable in one poll. Returns whether both links stayed up and how many
/// streams got their bytes back intact.
fn stress_step(
    sides: &mut [Side; 3],
    public: SocketAddr,
    k: usize,
    freeze: usize,
) -> Result<(bool, usize)> {
    let mut socks = open_idle(&[public], k)?;
    for s in &socks {
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
    }
    wait_sides(sides, k as u64, k as u64)?;
    let before = read_all(sides, "")?;
    let pid = sides.get(freeze).ok_or("no such side")?.child.id();
    signal(pid, "STOP")?;
    let pat = pattern();
    let data = pat.get(..STRESS_BYTES).unwrap_or_default();
    let mut wrote = Ok(());
    for s in &mut socks {
        wrote = wrote.and(s.write_all(data));
    }
    // Let the bytes reach the stopped process's sockets.
    thread::sleep(Duration::from_millis(100));
    signal(pid, "CONT")?;
    wrote?;
    let mut got = vec![0u8; STRESS_BYTES];
    let mut intact = 0;
    for s in &mut socks {
        if s.read_exact(&mut got).is_ok() && got == data {
            intact += 1;
        }
    }
    thread::sleep(SETTLE);
    let after = read_all(sides, "")?;
    let same = |side: usize, key: &str| {
        let get = |r: &Reading| r.sides.get(side).map_or(f64::NAN, |s| s.num(key));
        get(&before) == get(&after)
    };
    let survived = same(0, "links_total")
        && same(1, "lost")
        && after.sides.iter().take(2).all(|s| s.num("links") == 2.0);
    drop(socks);
    if !survived {
        // The agent re-dials after its back-off.
        let t0 = Instant::now();
        while read_all(sides, "")?
            .sides
            .iter()
            .take(2)
            .any(|s| s.num("links") != 2.0)
        {
            if t0.elapsed() > DEADLINE {
                return Err("the links did not come back".into());
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
    wait_sides(sides, 0, 0)?;
    Ok((survived, intact))
}

/// Per direction: the steps tried (streams, survived, intact).
type StressSteps = Vec<(usize, bool, usize)>;

/// With the server stopped, then with the echo stopped: [`stress_step`] for
/// each of [`STRESS_STEPS`] until a link goes down.
fn part_stress() -> Result<[(&'static str, StressSteps); 2]> {
    let (mut sides, _) = spawn_sides()?;
    let mut out = [
        (
            "client -> server (server stopped while clients wrote)",
            Vec::new(),
        ),
        (
            "service -> agent (echo stopped while clients wrote)",
            Vec::new(),
        ),
    ];
    for ((label, steps), freeze) in out.iter_mut().zip([0, 2]) {
        println!("  {label}:");
        // A link that went down and came back listens on a new port 0.
        let [server, ..] = &mut sides;
        let public = server
            .stat()?
            .addr("public.a")
            .ok_or("service a has no public port")?;
        for k in STRESS_STEPS {
            let (survived, intact) = stress_step(&mut sides, public, k, freeze)?;
            println!(
                "    {k:>3} streams x {} KiB: links {}, {intact} of {k} streams got their bytes back",
                STRESS_BYTES >> 10,
                if survived { "stayed up" } else { "WENT DOWN" },
            );
            steps.push((k, survived, intact));
            if !survived {
                break;
            }
        }
    }
    Ok(out)
}

// ===== main =====

fn main() -> Result<()> {
    if let Ok(toml) = std::env::var(CHILD_ENV) {
        return child_main(&toml);
    }
    let plan = Plan::new();
    let only = std::env::var("SWITCHBOARD_BENCH_ONLY").unwrap_or_default();
    let part = |p: &str| only.is_empty() || only == p;
    println!(
        "tunnel ({} mode): {} CPUs, load average {}; server, agent and echo are three engines \
         (three loop threads)",
        if plan.quick { "quick" } else { "full" },
        thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg(),
    );
    let mut targets: Vec<String> = Vec::new();

    if part("throughput") || part("latency") {
        let rig = Rig::start()?;
        println!(
            "  links up: extended flags {:#06x}, base flags {:#06x}",
            rig.ext_flags, rig.base_flags
        );
        if part("throughput") {
            println!();
            println!(
                "1. throughput: client -> (tunnel) -> echo -> (tunnel) -> client, {} MiB echoed per run \
                 in {} KiB writes, every byte checked; {} repeats, alternating",
                plan.bytes >> 20,
                CHUNK >> 10,
                plan.repeats
            );
            let f = part_throughput(&rig, &plan)?;
            println!();
            println!(
                "  {:<16} {:>7} {:>10} {:>9} {:>8}   {:>28}   {:>10}",
                "path",
                "streams",
                "best MiB/s",
                "x direct",
                "median x",
                "CPU s/GiB tunnelled srv+agt",
                "echo s/GiB"
            );
            for k in &f.kinds {
                let direct = f
                    .kind(Route::Direct, k.streams)
                    .map_or(f64::NAN, Kind::best);
                let tunnel = k.path != Route::Direct;
                let cpu = if tunnel {
                    let s = k.cpu_per_gib(0, 2.0);
                    let a = k.cpu_per_gib(1, 2.0);
                    format!(
                        "{} + {} = {}",
                        opt(s, 2, ""),
                        opt(a, 2, ""),
                        opt(s.zip(a).map(|(s, a)| s + a), 2, "")
                    )
                } else {
                    "-".to_owned()
                };
                println!(
                    "  {:<16} {:>7} {:>10.1} {:>9} {:>8}   {:>28}   {:>10}",
                    k.path.label(),
                    k.streams,
                    k.best(),
                    if tunnel {
                        format!("{:.2}", k.best() / direct)
                    } else {
                        "1".to_owned()
                    },
                    if tunnel {
                        format!("{:.2}", f.median_ratio(k.path, k.streams))
                    } else {
                        "-".to_owned()
                    },
                    cpu,
                    opt(k.cpu_per_gib(2, 1.0), 2, ""),
                );
                println!(
                    "  {:<16} {:>7} loops busy: server {}, agent {}, echo {}",
                    "",
                    "",
                    opt(k.busy(0).map(|b| b * 100.0), 0, "%"),
                    opt(k.busy(1).map(|b| b * 100.0), 0, "%"),
                    opt(k.busy(2).map(|b| b * 100.0), 0, "%"),
                );
            }
            println!(
                "  (CPU: engine thread time from /proc, kernel TCP work in the thread included; \
                 tunnelled GiB count each echoed byte twice, once per direction)"
            );
            println!(
                "  receive windows grown (CREDIT auto-tuning, all runs): server {} times, agent {} \
                 times",
                rig.server_stats.window_grown_total.load(Ordering::Relaxed),
                rig.ext_stats.window_grown_total.load(Ordering::Relaxed),
            );
            if let (Some(e), Some(b)) = (f.kind(Route::Extended, 1), f.kind(Route::Base, 1))
                && e.failed().is_none()
                && b.failed().is_none()
            {
                let mut per_repeat: Vec<f64> = e
                    .runs
                    .iter()
                    .zip(&b.runs)
                    .map(|(e, b)| e.mib_s / b.mib_s)
                    .collect();
                per_repeat.sort_by(f64::total_cmp);
                targets.push(format!(
                    "throughput, 1 stream, extended vs base protocol in this run: {:.0} vs {:.0} \
                     MiB/s = {:.2} x (median of repeats {:.2}) (target >= 1)  {}",
                    e.best(),
                    b.best(),
                    e.best() / b.best(),
                    per_repeat
                        .get(per_repeat.len() / 2)
                        .copied()
                        .unwrap_or(f64::NAN),
                    verdict(e.best() >= b.best())
                ));
            }
            for (path, streams) in [(Route::Extended, 1), (Route::Extended, 8), (Route::Base, 1)] {
                let Some(k) = f.kind(path, streams) else {
                    continue;
                };
                let direct = f.kind(Route::Direct, streams).map_or(f64::NAN, Kind::best);
                let ratio = k.best() / direct;
                let line = match k.failed() {
                    Some(t) => format!(
                        "throughput {}, {streams} stream(s): FAILED ({}; {} of the bytes)  MISSED",
                        path.label(),
                        t.problem.unwrap_or_default(),
                        t.got
                    ),
                    None if path == Route::Base => format!(
                        "throughput tunnel base protocol, 1 stream: {:.0} MiB/s = {ratio:.2} x direct \
                         (reported; the target is for the extended protocol)",
                        k.best()
                    ),
                    None => format!(
                        "throughput {}, {streams} stream(s): {:.0} MiB/s = {ratio:.2} x direct \
                         (median of repeats {:.2}) (target >= {TARGET_RATIO:.2})  {}",
                        path.label(),
                        k.best(),
                        f.median_ratio(path, streams),
                        verdict(ratio >= TARGET_RATIO)
                    ),
                };
                targets.push(line);
            }
            for streams in [1, 8] {
                if let Some(k) = f.kind(Route::Extended, streams) {
                    let s = k.cpu_per_gib(0, 2.0);
                    let a = k.cpu_per_gib(1, 2.0);
                    targets.push(format!(
                        "CPU per GiB through the tunnel, extended, {streams} stream(s): server {} + \
                         agent {} = {} s/GiB (no target; reported)",
                        opt(s, 2, ""),
                        opt(a, 2, ""),
                        opt(s.zip(a).map(|(s, a)| s + a), 2, ""),
                    ));
                }
            }
        }
        if part("latency") {
            println!();
            println!(
                "2. latency: {MSG}-byte round trips, one at a time, {} per path after {RTT_WARMUP} \
                 unmeasured, in {} alternating blocks",
                plan.rtt_samples, plan.rtt_blocks
            );
            let l = part_latency(&rig, &plan)?;
            let direct = l.first().map(|x| x.rtt);
            for (i, row) in l.iter().enumerate() {
                let r = row.rtt;
                let added = direct
                    .filter(|_| i > 0)
                    .map(|d| {
                        format!(
                            "  added: p50 {:+.1} us, p99 {:+.1} us",
                            r.p50 - d.p50,
                            r.p99 - d.p99
                        )
                    })
                    .unwrap_or_default();
                println!(
                    "  {:<16} p50 {:>7.1} us  p99 {:>7.1} us  p99.9 {:>7.1} us  max {:>8.1} us{added}",
                    row.label, r.p50, r.p99, r.p999, r.max
                );
                let [sv, ag, ec] = row.cpu_us;
                if i < 3 {
                    println!(
                        "  {:<16} engine CPU per round trip: server {}, agent {}, echo {}",
                        "",
                        opt(sv, 1, " us"),
                        opt(ag, 1, " us"),
                        opt(ec, 1, " us"),
                    );
                }
            }
            println!(
                "  (2 std relays: client -> relay -> relay -> echo and back, one blocking thread \
                 per relay and direction: the tunnel's thread hand-offs without its code)"
            );
            if let (Some(d), Some(t)) = (l.first(), l.get(1)) {
                let (a50, a99) = (t.rtt.p50 - d.rtt.p50, t.rtt.p99 - d.rtt.p99);
                let relay = l
                    .get(3)
                    .map(|r| {
                        format!(
                            "; 2 std relays add p50 {:+.1} / p99 {:+.1} us",
                            r.rtt.p50 - d.rtt.p50,
                            r.rtt.p99 - d.rtt.p99
                        )
                    })
                    .unwrap_or_default();
                targets.push(format!(
                    "RTT added by the tunnel (extended), {MSG} B: p50 {a50:+.1} us, p99 {a99:+.1} us \
                     (direct p50 {:.1} / p99 {:.1} us{relay}) (target <= {TARGET_ADDED_US:.0} us)  {}",
                    d.rtt.p50,
                    d.rtt.p99,
                    verdict(a50 <= TARGET_ADDED_US && a99 <= TARGET_ADDED_US)
                ));
            }
        }
        let anomalies = rig.anomalies();
        if !anomalies.is_empty() {
            println!("  counters that should be 0:{anomalies}");
        }
        rig.stop()?;
    }

    if part("memory") {
        println!();
        println!(
            "3+5. heap per side (each side a child process of this binary with a counting allocator; \
             heap = live bytes since before the config was parsed; two links, services a and b)"
        );
        let m = part_memory(&plan)?;
        print_memory(&m, &plan, &mut targets);
    }

    if part("stress") {
        println!();
        println!(
            "7. link stress (correctness; no target given): k streams of one extended link each \
             send {} KiB (one DATA frame of the default max_data) while one process is stopped, \
             then read it back; child processes as in 3+5",
            STRESS_BYTES >> 10
        );
        for (label, steps) in part_stress()? {
            let last_ok = steps.iter().filter(|s| s.1).map(|s| s.0).max().unwrap_or(0);
            targets.push(match steps.iter().find(|s| !s.1) {
                None => format!(
                    "link stress, {label}: the links carried up to {last_ok} streams  {}",
                    if steps.iter().all(|s| s.2 == s.0) {
                        "OK"
                    } else {
                        "BYTES LOST"
                    }
                ),
                Some((k, _, intact)) => format!(
                    "link stress, {label}: the link WENT DOWN at k = {k} ({intact} of {k} got \
                     their bytes back; every stream of the link was closed); k = {last_ok} was \
                     fine  FAILED"
                ),
            });
        }
    }

    if part("rss") {
        println!();
        println!(
            "4. the release binary ({}, {} bytes): VmRSS of each process",
            binary().display(),
            std::fs::metadata(binary()).map_or(0, |m| m.len())
        );
        let f = part_rss(&plan)?;
        print_rss(&f, &plan, &mut targets);
    }

    println!();
    println!("targets (load average at the end {}):", loadavg());
    for t in &targets {
        println!("  {t}");
    }
    Ok(())
}
