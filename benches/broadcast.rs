//! Broadcast fan-out over real loopback sockets: one publisher, N subscribers
//! (N = 10, 100 and 1000), 100-byte line records, the engine in-process with
//! one `[[broadcast]]` role and a Rust load generator in the same process.
//!
//! For each N it measures
//! - throughput: the publisher sends a fixed number of records as fast as the
//!   subscribers take them while every subscriber reads concurrently; reported
//!   as delivered records/s in total (N x records / time until the last
//!   subscriber has the last record) and the server's CPU time per delivered
//!   record (the engine thread's run time from `/proc/<tid>/schedstat`, which
//!   on loopback includes the kernel's TCP send and receive processing done in
//!   its context), how busy the engine thread was and how many records it
//!   delivered per loop turn;
//! - latency: the publisher sends 1,000 records/s, each carrying its send time
//!   (nanoseconds since an `Instant` epoch shared by the whole process); every
//!   subscriber computes receive - send for every record. p50/p99/p99.9/max
//!   over all deliveries after a 100-record warm-up.
//!
//! The publisher stays at most `SWITCHBOARD_BENCH_WINDOW` records (default
//! 4096) ahead of the slowest subscriber, so the engine's per-subscriber
//! queues stay bounded (as a real deployment's `queue_records` would force)
//! instead of growing to the whole run; nobody is ever dropped (the role's
//! queue bounds are set far above the window, and the engine's
//! `queue_full_total` and `closed_total` are checked after every run).
//!
//! Subscribers are read by a few reader threads (`SWITCHBOARD_BENCH_READERS`,
//! default: CPUs - 1, between 1 and 4), each polling its share of the
//! non-blocking sockets with its own `mio::Poll`; their CPU time per delivery
//! is printed next to the engine's, to show the load generator is not what
//! limits the run. Throughput runs check every
//! record's newline and the sequence number of the first record of every read;
//! latency runs parse every record (newline, sequence number, timestamp).
//!
//! Memory: the process's VmRSS once the engine runs with no subscriber, and
//! the peak (VmHWM, reset per run through `/proc/self/clear_refs`) of each run,
//! which includes the load generator (reader buffers, latency samples).
//!
//! Targets (issue 3): <= 15 ns server CPU per delivered record at N = 100;
//! p99 <= 2 ms at 1,000 records/s with N = 100.
//!
//! `SWITCHBOARD_BENCH_QUICK=1` shrinks every volume (20,000 records for N = 10
//! and 100, 2,000 for N = 1000; 1 s of latency) so CI can run it in seconds.
//! Without `--bench` on the command line (`cargo test --benches`) the quick
//! mode is used too, as Criterion does; other arguments are ignored.
//! `SWITCHBOARD_BENCH_N=100` runs one subscriber count only, and
//! `SWITCHBOARD_BENCH_ONLY=throughput` (or `latency`) one kind of run only
//! (for profiling).

#[path = "support/harness.rs"]
mod harness;
use harness::{engine_cpu_ns, percentile, quick_mode, spawn_engine, task_cpu_ns, this_task};
use std::error::Error;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use switchboard::{Config, Engine, EngineError, Handle};

type BoxError = Box<dyn Error + Send + Sync>;
type Result<T> = std::result::Result<T, BoxError>;

/// Bytes per record, newline included.
const RECORD: usize = 100;
/// Record layout: `TTTTTTTTTTTTTTTTTTTT SSSSSSSSSS POS ...filler...\n`, the send
/// time in nanoseconds since [`EPOCH`] (20 digits) and the sequence number (10).
const TS_DIGITS: usize = 20;
const SEQ_AT: usize = 21;
const SEQ_DIGITS: usize = 10;
/// Records per publisher write in throughput runs (64,000 bytes).
const CHUNK_RECORDS: u64 = 640;
/// Bytes per subscriber read.
const READ_BUF: usize = 256 * 1024;
/// Records the publisher may be ahead of the slowest subscriber (default).
const DEFAULT_WINDOW: u64 = 4096;
/// Latency runs: records per second, and unmeasured records at the start.
const RATE: u64 = 1_000;
const WARMUP_RECORDS: u64 = 100;
/// No progress for this long means a stalled server: fail, don't hang.
const STALL: Duration = Duration::from_secs(30);
/// Subscriber counts.
const COUNTS: [usize; 3] = [10, 100, 1000];
/// The N the targets apply to.
const TARGET_N: usize = 100;
const TARGET_CPU_NS: f64 = 15.0;
const TARGET_P99_US: f64 = 2_000.0;

/// The shared time origin of record timestamps.
static EPOCH: OnceLock<Instant> = OnceLock::new();

fn epoch() -> Instant {
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since [`EPOCH`].
fn now_ns() -> u64 {
    u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// Volumes for one run of the bench.
#[derive(Debug, Clone)]
struct Plan {
    quick: bool,
    counts: Vec<usize>,
    /// Throughput records for N <= 100, and for N = 1000.
    records_small: u64,
    records_large: u64,
    latency: Duration,
    repeats: usize,
    window: u64,
    readers: usize,
    throughput: bool,
    latency_runs: bool,
}

impl Plan {
    fn from_env() -> Plan {
        let quick = quick_mode();
        let counts = match env_u64("SWITCHBOARD_BENCH_N") {
            Some(n) => vec![usize::try_from(n).unwrap_or(TARGET_N).max(1)],
            None => COUNTS.to_vec(),
        };
        let cpus = thread::available_parallelism().map_or(2, |n| n.get());
        let readers = env_u64("SWITCHBOARD_BENCH_READERS")
            .and_then(|r| usize::try_from(r).ok())
            .unwrap_or_else(|| cpus.saturating_sub(1).clamp(1, 4))
            .max(1);
        let window = env_u64("SWITCHBOARD_BENCH_WINDOW")
            .unwrap_or(DEFAULT_WINDOW)
            .max(1);
        let only = std::env::var("SWITCHBOARD_BENCH_ONLY").unwrap_or_default();
        let throughput = only != "latency";
        let latency_runs = only != "throughput";
        if quick {
            Plan {
                quick,
                counts,
                records_small: 20_000,
                records_large: 2_000,
                latency: Duration::from_secs(1),
                repeats: 1,
                window,
                readers,
                throughput,
                latency_runs,
            }
        } else {
            Plan {
                quick,
                counts,
                records_small: 200_000,
                records_large: 20_000,
                latency: Duration::from_secs(3),
                repeats: 2,
                window,
                readers,
                throughput,
                latency_runs,
            }
        }
    }

    fn records(&self, n: usize) -> u64 {
        if n >= 1000 {
            self.records_large
        } else {
            self.records_small
        }
    }
}

// ===== the server =====

/// The engine under test, on its own thread.
struct Server {
    subs: SocketAddr,
    ingest: SocketAddr,
    handle: Handle,
    thread: JoinHandle<std::result::Result<(), EngineError>>,
    /// `/proc/<pid>/task/<tid>` of the engine thread, once it has started.
    task: Arc<OnceLock<PathBuf>>,
}

/// Queue bounds far above anything the window lets build up: nobody is dropped.
const CONFIG: &str = r#"
[engine]
max_connections = 4096

[[broadcast]]
name = "bench"
listen = "127.0.0.1:0"
ingest = "127.0.0.1:0"
framing = "line"
queue_bytes = 268435456
queue_records = 4194304
max_subscribers = 2000
stall_timeout = "10m"
"#;

impl Server {
    fn start() -> Result<Server> {
        let config = Config::parse(CONFIG)?;
        let mut engine = Engine::from_config(&config)?;
        engine.start()?;
        // The broadcast role opens its subscriber listener first, then ingest.
        let listeners = engine.listeners();
        let (Some(subs), Some(ingest)) = (listeners.first(), listeners.get(1)) else {
            return Err("the broadcast role opened fewer than two listeners".into());
        };
        if subs.role != "bench" || ingest.role != "bench" {
            return Err(format!("unexpected listeners: {listeners:?}").into());
        }
        let (subs, ingest) = (subs.addr, ingest.addr);
        let handle = engine.handle();
        let (thread, task) = spawn_engine(engine)?;
        Ok(Server {
            subs,
            ingest,
            handle,
            thread,
            task,
        })
    }

    /// Engine thread CPU time so far, or `None` where it cannot be read.
    fn cpu_ns(&self) -> Option<u64> {
        engine_cpu_ns(&self.task)
    }

    /// Wait until the engine holds `n` connections.
    fn wait_connections(&self, n: u64) -> Result<()> {
        let deadline = Instant::now() + STALL;
        while self.handle.connections() != n {
            if Instant::now() >= deadline {
                return Err(format!(
                    "the engine holds {} connections, expected {n}",
                    self.handle.connections()
                )
                .into());
            }
            thread::sleep(Duration::from_millis(1));
        }
        // Accepting and the role's on_accept run in the same loop step; give
        // that step time to finish after the counter moved.
        thread::sleep(Duration::from_millis(20));
        Ok(())
    }

    fn stop(self) -> Result<()> {
        self.handle.stop();
        self.thread.join().map_err(|_| "engine thread panicked")??;
        Ok(())
    }
}

// ===== records =====

/// Write `v` as `dst.len()` decimal digits, zero-padded.
fn put_digits(dst: &mut [u8], mut v: u64) {
    for d in dst.iter_mut().rev() {
        *d = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

/// Parse zero-padded decimal digits.
fn parse_digits(src: &[u8]) -> Option<u64> {
    src.iter().try_fold(0u64, |acc, &c| {
        c.is_ascii_digit()
            .then(|| acc.wrapping_mul(10).wrapping_add(u64::from(c - b'0')))
    })
}

/// One record with timestamp and sequence number 0: a POS-like text line.
fn template() -> [u8; RECORD] {
    let mut r = [b' '; RECORD];
    put_digits(&mut r[..TS_DIGITS], 0);
    put_digits(&mut r[SEQ_AT..SEQ_AT + SEQ_DIGITS], 0);
    let text = b"POS 0042 SALE 3x COFFEE 2.40 TOTAL 7.20 EUR CARD ****1234";
    let at = SEQ_AT + SEQ_DIGITS + 1;
    r[at..at + text.len()].copy_from_slice(text);
    r[RECORD - 1] = b'\n';
    r
}

// ===== subscribers =====

/// What the readers check and record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Throughput,
    Latency,
}

/// One subscriber connection on a reader thread.
struct Sub {
    id: usize,
    sock: mio::net::TcpStream,
    /// Bytes received.
    got: u64,
    /// A record split across reads (latency mode).
    carry: [u8; RECORD],
    carry_len: usize,
}

/// What a reader thread hands back.
struct ReaderOut {
    /// When its last subscriber received the last byte.
    last: Instant,
    /// Latency samples in nanoseconds (latency mode).
    samples: Vec<u64>,
    /// CPU time this reader thread used from the start signal to the end.
    cpu_ns: Option<u64>,
    /// The connections, kept open until the engine's counters are checked.
    _subs: Vec<Sub>,
}

/// Check a throughput read: every record ends with a newline, and the first
/// record that starts in `data` has the sequence number its offset implies.
fn check_stream(sub: &Sub, data: &[u8]) -> Result<()> {
    let rec = RECORD as u64;
    let mut k = usize::try_from(rec - 1 - sub.got % rec).unwrap_or(usize::MAX);
    while let Some(&b) = data.get(k) {
        if b != b'\n' {
            return Err(format!(
                "subscriber {}: no newline at byte {}",
                sub.id,
                sub.got + k as u64
            )
            .into());
        }
        k += RECORD;
    }
    let off = usize::try_from((rec - sub.got % rec) % rec).unwrap_or(0);
    if let Some(seq) = data
        .get(off + SEQ_AT..off + SEQ_AT + SEQ_DIGITS)
        .and_then(parse_digits)
    {
        let want = (sub.got + off as u64) / rec;
        if seq != want {
            return Err(format!("subscriber {}: record {seq} where {want} was due", sub.id).into());
        }
    }
    Ok(())
}

/// Handle one whole record in latency mode.
fn latency_record(sub: &Sub, r: &[u8], now: u64, samples: &mut Vec<u64>) -> Result<()> {
    let want = sub.got / RECORD as u64;
    let seq = r.get(SEQ_AT..SEQ_AT + SEQ_DIGITS).and_then(parse_digits);
    let ts = r.get(..TS_DIGITS).and_then(parse_digits);
    match (seq, ts, r.last()) {
        (Some(seq), Some(ts), Some(b'\n')) if seq == want => {
            if seq >= WARMUP_RECORDS {
                samples.push(now.saturating_sub(ts));
            }
            Ok(())
        }
        _ => Err(format!(
            "subscriber {}: bad record where {want} was due: {:?}",
            sub.id,
            String::from_utf8_lossy(r)
        )
        .into()),
    }
}

/// Parse every whole record in `data` (plus the carried partial one).
fn latency_read(sub: &mut Sub, mut data: &[u8], samples: &mut Vec<u64>) -> Result<()> {
    let now = now_ns();
    if sub.carry_len > 0 {
        let take = (RECORD - sub.carry_len).min(data.len());
        let (head, rest) = data.split_at(take);
        sub.carry[sub.carry_len..sub.carry_len + take].copy_from_slice(head);
        sub.carry_len += take;
        data = rest;
        if sub.carry_len == RECORD {
            let rec = sub.carry;
            latency_record(sub, &rec, now, samples)?;
            sub.got += RECORD as u64;
            sub.carry_len = 0;
        }
    }
    while data.len() >= RECORD {
        let (rec, rest) = data.split_at(RECORD);
        latency_record(sub, rec, now, samples)?;
        sub.got += RECORD as u64;
        data = rest;
    }
    if !data.is_empty() {
        sub.carry[..data.len()].copy_from_slice(data);
        sub.carry_len = data.len();
    }
    Ok(())
}

/// Read every subscriber of this thread until each has `total` bytes.
fn reader(
    mut subs: Vec<Sub>,
    mode: Mode,
    total: u64,
    progress: &[AtomicU64],
    go: &Barrier,
) -> Result<ReaderOut> {
    let mut poll = Poll::new()?;
    for (j, sub) in subs.iter_mut().enumerate() {
        poll.registry()
            .register(&mut sub.sock, Token(j), Interest::READABLE)?;
    }
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; READ_BUF];
    let mut samples = Vec::new();
    if mode == Mode::Latency {
        samples.reserve(subs.len() * usize::try_from(total / RECORD as u64).unwrap_or(0));
    }
    let mut left = subs.len();
    let mut last = Instant::now();
    let task = this_task();
    go.wait();
    let cpu0 = task.as_deref().and_then(task_cpu_ns);
    while left > 0 {
        poll.poll(&mut events, Some(Duration::from_millis(100)))?;
        if events.is_empty() && last.elapsed() > STALL {
            return Err(format!("readers: no data for {STALL:?}; {left} subscribers short").into());
        }
        for ev in &events {
            let Some(sub) = subs.get_mut(ev.token().0) else {
                continue;
            };
            let before = sub.got + sub.carry_len as u64;
            loop {
                match sub.sock.read(&mut buf) {
                    Ok(0) => {
                        return Err(format!(
                            "subscriber {} closed by the server after {} bytes",
                            sub.id, sub.got
                        )
                        .into());
                    }
                    Ok(n) => {
                        let data = buf.get(..n).unwrap_or_default();
                        match mode {
                            Mode::Throughput => {
                                check_stream(sub, data)?;
                                sub.got += n as u64;
                            }
                            Mode::Latency => latency_read(sub, data, &mut samples)?,
                        }
                        // Edge-triggered: a short read drained the socket.
                        if n < buf.len() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(format!("subscriber {}: {e}", sub.id).into()),
                }
            }
            let got = sub.got + sub.carry_len as u64;
            if got == before {
                continue;
            }
            last = Instant::now();
            if let Some(p) = progress.get(sub.id) {
                p.store(sub.got / RECORD as u64, Ordering::Relaxed);
            }
            if got > total {
                return Err(format!("subscriber {} got {got} bytes of {total}", sub.id).into());
            }
            if got == total && before < total {
                left -= 1;
            }
        }
    }
    let cpu_ns = match (cpu0, task.as_deref().and_then(task_cpu_ns)) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    Ok(ReaderOut {
        last,
        samples,
        cpu_ns,
        _subs: subs,
    })
}

/// N subscribers connected to the engine, split over reader threads.
fn connect_subscribers(addr: SocketAddr, n: usize, readers: usize) -> Result<Vec<Vec<Sub>>> {
    let mut groups: Vec<Vec<Sub>> = (0..readers).map(|_| Vec::new()).collect();
    for id in 0..n {
        let sock = TcpStream::connect(addr)?;
        sock.set_nodelay(true)?;
        sock.set_nonblocking(true)?;
        let sub = Sub {
            id,
            sock: mio::net::TcpStream::from_std(sock),
            got: 0,
            carry: [0; RECORD],
            carry_len: 0,
        };
        if let Some(g) = groups.get_mut(id % readers) {
            g.push(sub);
        }
    }
    Ok(groups)
}

// ===== publishers =====

/// Send `records` records as fast as the window allows.
fn publish_flat_out(
    mut sock: TcpStream,
    records: u64,
    window: u64,
    progress: &[AtomicU64],
    go: &Barrier,
) -> Result<TcpStream> {
    let rec = template();
    let mut chunk: Vec<u8> = (0..CHUNK_RECORDS).flat_map(|_| rec).collect();
    go.wait();
    let mut sent = 0u64;
    let mut waiting_since: Option<Instant> = None;
    while sent < records {
        let slowest = progress
            .iter()
            .map(|p| p.load(Ordering::Relaxed))
            .min()
            .unwrap_or(sent);
        let room = (slowest + window).saturating_sub(sent);
        if room == 0 {
            let since = *waiting_since.get_or_insert_with(Instant::now);
            if since.elapsed() > STALL {
                return Err("publisher: subscribers made no progress".into());
            }
            thread::sleep(Duration::from_micros(50));
            continue;
        }
        waiting_since = None;
        let k = room.min(CHUNK_RECORDS).min(records - sent);
        for (i, r) in chunk.chunks_exact_mut(RECORD).take(k as usize).enumerate() {
            put_digits(&mut r[SEQ_AT..SEQ_AT + SEQ_DIGITS], sent + i as u64);
        }
        sock.write_all(chunk.get(..k as usize * RECORD).unwrap_or_default())?;
        sent += k;
    }
    Ok(sock)
}

/// Send `records` records at `RATE` per second, each stamped when it is sent.
fn publish_paced(mut sock: TcpStream, records: u64, go: &Barrier) -> Result<TcpStream> {
    let mut rec = template();
    go.wait();
    let t0 = Instant::now();
    let step = 1_000_000_000 / RATE;
    for seq in 0..records {
        let due = t0 + Duration::from_nanos(seq * step);
        let now = Instant::now();
        if due > now {
            thread::sleep(due - now);
        }
        put_digits(&mut rec[SEQ_AT..SEQ_AT + SEQ_DIGITS], seq);
        put_digits(&mut rec[..TS_DIGITS], now_ns());
        sock.write_all(&rec)?;
    }
    Ok(sock)
}

// ===== runs =====

/// Process memory from `/proc/self/status` (`VmRSS`, `VmHWM`), in KiB.
fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Reset the process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0).
fn reset_peak_rss() {
    std::fs::write("/proc/self/clear_refs", "5").ok();
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or_else(
        || "n/a".to_owned(),
        |k| format!("{:.1} MiB", k as f64 / 1024.0),
    )
}

/// One throughput run.
#[derive(Debug, Clone, Copy)]
struct Throughput {
    records: u64,
    /// Delivered records per second, over all subscribers.
    rate: f64,
    /// Engine CPU nanoseconds per delivered record.
    cpu_ns: Option<f64>,
    /// Engine CPU time / wall time.
    busy: Option<f64>,
    /// Reader threads' CPU nanoseconds per delivered record.
    reader_ns: Option<f64>,
    /// Deliveries per engine loop turn.
    per_turn: f64,
    peak_rss_kib: Option<u64>,
}

/// One latency run, in microseconds.
#[derive(Debug, Clone, Copy)]
struct Latency {
    samples: usize,
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
    /// Engine CPU nanoseconds per delivered record, and CPU time / wall time.
    cpu_ns: Option<f64>,
    busy: Option<f64>,
    /// Reader threads' CPU nanoseconds per delivered record.
    reader_ns: Option<f64>,
    peak_rss_kib: Option<u64>,
}

/// A server with N subscribers and one publisher connected, readers ready.
struct Setup {
    server: Server,
    publisher: TcpStream,
    groups: Vec<Vec<Sub>>,
}

fn setup(n: usize, readers: usize) -> Result<Setup> {
    let server = Server::start()?;
    let groups = connect_subscribers(server.subs, n, readers.min(n))?;
    let publisher = TcpStream::connect(server.ingest)?;
    publisher.set_nodelay(true)?;
    server.wait_connections(n as u64 + 1)?;
    Ok(Setup {
        server,
        publisher,
        groups,
    })
}

/// What a finished run hands back; every connection is still open.
struct Finished {
    server: Server,
    outs: Vec<ReaderOut>,
    /// When the publisher was released.
    t0: Instant,
    _publisher: TcpStream,
}

/// Start the reader threads and the publisher; returns when every subscriber
/// has everything.
fn drive(setup: Setup, mode: Mode, n: usize, records: u64, window: u64) -> Result<Finished> {
    let Setup {
        server,
        publisher,
        groups,
    } = setup;
    let progress: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let go = Arc::new(Barrier::new(groups.len() + 2));
    let total = records * RECORD as u64;
    let mut readers = Vec::with_capacity(groups.len());
    for group in groups {
        let (p, g) = (Arc::clone(&progress), Arc::clone(&go));
        readers.push(
            thread::Builder::new()
                .name("reader".into())
                .spawn(move || reader(group, mode, total, &p, &g))?,
        );
    }
    let (p, g) = (Arc::clone(&progress), Arc::clone(&go));
    let publisher = thread::Builder::new()
        .name("publisher".into())
        .spawn(move || match mode {
            Mode::Throughput => publish_flat_out(publisher, records, window, &p, &g),
            Mode::Latency => publish_paced(publisher, records, &g),
        })?;
    go.wait();
    let t0 = Instant::now();
    let mut outs = Vec::with_capacity(readers.len());
    let mut failure: Option<BoxError> = None;
    for r in readers {
        match r.join().map_err(|_| "reader thread panicked")? {
            Ok(o) => outs.push(o),
            Err(e) => failure = failure.or(Some(e)),
        }
    }
    let published = publisher.join().map_err(|_| "publisher thread panicked")?;
    if let Some(e) = failure {
        return Err(e);
    }
    Ok(Finished {
        server,
        outs,
        t0,
        _publisher: published?,
    })
}

/// CPU nanoseconds all reader threads used per delivered record.
fn reader_cpu(outs: &[ReaderOut], deliveries: f64) -> Option<f64> {
    outs.iter()
        .map(|o| o.cpu_ns)
        .sum::<Option<u64>>()
        .map(|c| c as f64 / deliveries)
}

/// The engine dropped or closed nobody during the run.
fn check_clean(server: &Server, n: usize) -> Result<()> {
    let s = server.handle.stats();
    if s.queue_full_total != 0 || s.closed_total != 0 || s.connections != n as u64 + 1 {
        return Err(format!(
            "the engine refused or closed connections: queue_full_total {}, closed_total {}, \
             connections {} (expected {})",
            s.queue_full_total,
            s.closed_total,
            s.connections,
            n + 1
        )
        .into());
    }
    Ok(())
}

fn run_throughput(n: usize, plan: &Plan) -> Result<Throughput> {
    let records = plan.records(n);
    let setup = setup(n, plan.readers)?;
    reset_peak_rss();
    let cpu0 = setup.server.cpu_ns();
    let turns0 = setup.server.handle.stats().turns_total;
    let run = drive(setup, Mode::Throughput, n, records, plan.window)?;
    let (server, outs, t0) = (&run.server, &run.outs, run.t0);
    let cpu1 = server.cpu_ns();
    let turns = server.handle.stats().turns_total.saturating_sub(turns0);
    let peak_rss_kib = status_kib("VmHWM:");
    let end = outs.iter().map(|o| o.last).max().unwrap_or(t0);
    let secs = end.saturating_duration_since(t0).as_secs_f64().max(1e-9);
    let deliveries = n as f64 * records as f64;
    let cpu = match (cpu0, cpu1) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64),
        _ => None,
    };
    check_clean(server, n)?;
    run.server.stop()?;
    Ok(Throughput {
        records,
        rate: deliveries / secs,
        cpu_ns: cpu.map(|c| c / deliveries),
        busy: cpu.map(|c| c / 1e9 / secs),
        reader_ns: reader_cpu(outs, deliveries),
        per_turn: deliveries / turns.max(1) as f64,
        peak_rss_kib,
    })
}

fn run_latency(n: usize, plan: &Plan) -> Result<Latency> {
    let records = WARMUP_RECORDS + plan.latency.as_secs() * RATE;
    let setup = setup(n, plan.readers)?;
    reset_peak_rss();
    let cpu0 = setup.server.cpu_ns();
    let run = drive(setup, Mode::Latency, n, records, records)?;
    let cpu1 = run.server.cpu_ns();
    let end = run.outs.iter().map(|o| o.last).max().unwrap_or(run.t0);
    let secs = end
        .saturating_duration_since(run.t0)
        .as_secs_f64()
        .max(1e-9);
    let cpu = match (cpu0, cpu1) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64),
        _ => None,
    };
    let deliveries = n as f64 * records as f64;
    let reader_ns = reader_cpu(&run.outs, deliveries);
    let peak_rss_kib = status_kib("VmHWM:");
    check_clean(&run.server, n)?;
    run.server.stop()?;
    let mut samples: Vec<u64> = run.outs.into_iter().flat_map(|o| o.samples).collect();
    samples.sort_unstable();
    Ok(Latency {
        samples: samples.len(),
        p50: percentile(&samples, 0.50),
        p99: percentile(&samples, 0.99),
        p999: percentile(&samples, 0.999),
        max: percentile(&samples, 1.0),
        cpu_ns: cpu.map(|c| c / deliveries),
        busy: cpu.map(|c| c / 1e9 / secs),
        reader_ns,
        peak_rss_kib,
    })
}

fn verdict(met: bool) -> &'static str {
    if met { "MET" } else { "MISSED" }
}

fn opt(v: Option<f64>, digits: usize, unit: &str) -> String {
    v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.digits$}{unit}"))
}

/// The faster run, with the lower CPU cost of the two.
fn best(a: Throughput, b: Throughput) -> Throughput {
    let cpu = match (a.cpu_ns, b.cpu_ns) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    };
    Throughput {
        rate: a.rate.max(b.rate),
        cpu_ns: cpu,
        busy: a.busy.or(b.busy),
        reader_ns: a.reader_ns.or(b.reader_ns),
        per_turn: a.per_turn.max(b.per_turn),
        peak_rss_kib: a.peak_rss_kib.max(b.peak_rss_kib),
        ..a
    }
}

fn main() -> Result<()> {
    let plan = Plan::from_env();
    epoch();
    println!(
        "broadcast ({} mode): 1 publisher, N = {:?} subscribers, {RECORD}-byte line records; \
         throughput {} records (N = 1000: {}), window {} records, {} repeat(s); \
         latency {RATE} records/s for {:?} after {WARMUP_RECORDS} warm-up records; \
         {} reader thread(s), {} CPUs",
        if plan.quick { "quick" } else { "full" },
        plan.counts,
        plan.records_small,
        plan.records_large,
        plan.window,
        plan.repeats,
        plan.latency,
        plan.readers,
        thread::available_parallelism().map_or(0, |n| n.get()),
    );

    // Idle memory: the engine running, no subscriber yet.
    let idle = Server::start()?;
    idle.wait_connections(0)?;
    let idle_rss = status_kib("VmRSS:");
    idle.stop()?;
    println!(
        "VmRSS idle (engine running, no subscriber): {}",
        mib(idle_rss)
    );

    let mut tput: Vec<(usize, Throughput)> = Vec::new();
    for &n in plan.counts.iter().filter(|_| plan.throughput) {
        let mut best_run: Option<Throughput> = None;
        for rep in 1..=plan.repeats {
            let t = run_throughput(n, &plan)?;
            println!(
                "  throughput N={n:<4} run {rep}: {:>10.0} deliveries/s  {:>6} ns engine CPU/delivery \
                 (busy {:>4}, {:>7.0} deliveries/turn)  readers {} ns/delivery  peak VmRSS {}",
                t.rate,
                opt(t.cpu_ns, 1, ""),
                opt(t.busy.map(|b| b * 100.0), 0, "%"),
                t.per_turn,
                opt(t.reader_ns, 1, ""),
                mib(t.peak_rss_kib),
            );
            best_run = Some(best_run.map_or(t, |b| best(b, t)));
        }
        if let Some(b) = best_run {
            tput.push((n, b));
        }
    }
    let mut lat: Vec<(usize, Latency)> = Vec::new();
    for &n in plan.counts.iter().filter(|_| plan.latency_runs) {
        let l = run_latency(n, &plan)?;
        println!(
            "  latency    N={n:<4}: {} deliveries  p50 {:.0} us  p99 {:.0} us  p99.9 {:.0} us  \
             max {:.0} us  (engine {} ns CPU/delivery, busy {}; readers {} ns/delivery)  \
             peak VmRSS {}",
            l.samples,
            l.p50,
            l.p99,
            l.p999,
            l.max,
            opt(l.cpu_ns, 0, ""),
            opt(l.busy.map(|b| b * 100.0), 0, "%"),
            opt(l.reader_ns, 0, ""),
            mib(l.peak_rss_kib),
        );
        lat.push((n, l));
    }

    println!();
    println!("summary (throughput: best of {} run(s)):", plan.repeats);
    println!(
        "  {:>5} {:>9} {:>16} {:>14} {:>9} {:>9} {:>9} {:>12}",
        "N", "records", "deliveries/s", "CPU ns/deliv", "p50 us", "p99 us", "max us", "peak VmRSS"
    );
    for &n in &plan.counts {
        let t = tput.iter().find(|(m, _)| *m == n).map(|(_, t)| *t);
        let l = lat.iter().find(|(m, _)| *m == n).map(|(_, l)| *l);
        let peak = [
            t.and_then(|t| t.peak_rss_kib),
            l.and_then(|l| l.peak_rss_kib),
        ]
        .into_iter()
        .flatten()
        .max();
        println!(
            "  {:>5} {:>9} {:>16} {:>14} {:>9} {:>9} {:>9} {:>12}",
            n,
            t.map_or(0, |t| t.records),
            t.map_or_else(|| "n/a".to_owned(), |t| format!("{:.0}", t.rate)),
            opt(t.and_then(|t| t.cpu_ns), 1, ""),
            opt(l.map(|l| l.p50), 0, ""),
            opt(l.map(|l| l.p99), 0, ""),
            opt(l.map(|l| l.max), 0, ""),
            mib(peak),
        );
    }
    println!("  VmRSS idle (engine, no subscriber): {}", mib(idle_rss));

    println!();
    println!("targets (N = {TARGET_N}):");
    match tput.iter().find(|(m, _)| *m == TARGET_N) {
        Some((_, t)) => match t.cpu_ns {
            Some(c) => println!(
                "  server CPU per delivered record: {c:.1} ns (target <= {TARGET_CPU_NS:.0} ns)  {}",
                verdict(c <= TARGET_CPU_NS)
            ),
            None => println!("  server CPU per delivered record: n/a (no /proc schedstat)  MISSED"),
        },
        None => println!(
            "  server CPU per delivered record: not run (SWITCHBOARD_BENCH_N / SWITCHBOARD_BENCH_ONLY)"
        ),
    }
    match lat.iter().find(|(m, _)| *m == TARGET_N) {
        Some((_, l)) => println!(
            "  p99 latency at {RATE} records/s: {:.0} us (target <= {TARGET_P99_US:.0} us)  {}",
            l.p99,
            verdict(l.p99 <= TARGET_P99_US)
        ),
        None => println!("  p99 latency: not run (SWITCHBOARD_BENCH_N / SWITCHBOARD_BENCH_ONLY)"),
    }
    Ok(())
}
