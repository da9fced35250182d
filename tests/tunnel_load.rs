//! Load and failure tests for the tunnel roles (docs/PROTOCOL.md): many
//! streams at once, a client that stops reading, the link cut under load, id
//! reuse under churn, and memory across many reconnects.
//!
//! Topology, as deployed: the server and the agent run in separate engines
//! (two loop threads), the local service is an `[[echo]]` role in a third, and
//! the clients are std sockets on loopback:
//!
//!     client ──► server (public port) ══ link ══► agent ──► echo
//!
//! Tests that cut the link put [`Proxy`], a small std-thread TCP relay, on
//! the link; [`Proxy::cut`] shuts down every socket it relays.
//!
//! Two tests measure (timing against a baseline, and the process's VmRSS),
//! so they take [`exclusive`] and run alone; the others take [`shared`] and
//! may run alongside each other. Every wait has a deadline.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly"
)]

mod util;

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use switchboard::Config;
use switchboard::config::EngineConfig;
use switchboard::role::{AgentState, TunnelAgent, TunnelServer, TunnelStats};

use util::{
    IO_TIMEOUT, Pattern, TestEngine, connect, connect_with_recv_buffer, is_timeout, wait_for,
    wait_until,
};

/// Bound on waiting for a counter or an event.
const WAIT: Duration = Duration::from_secs(10);
/// The service's token in extended mode.
const TOKEN: &str = "load-test-token-0123";
const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

// ----- isolation -----

/// Measuring tests hold the write side; the rest share the read side.
static EXCLUSIVE: RwLock<()> = RwLock::new(());

/// For tests that only need correctness: may run alongside each other.
fn shared() -> RwLockReadGuard<'static, ()> {
    EXCLUSIVE.read().unwrap_or_else(|e| e.into_inner())
}

/// For tests that compare timings or sample VmRSS: nothing else runs.
fn exclusive() -> RwLockWriteGuard<'static, ()> {
    EXCLUSIVE.write().unwrap_or_else(|e| e.into_inner())
}

// ----- memory -----

/// VmRSS of this process (both engines, the echo engine and the clients).
fn rss() -> u64 {
    let text = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let line = text
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS line");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("VmRSS value");
    kib * KIB
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

/// The largest value `sample` returns, sampled on a thread until [`Peak::finish`].
struct Peak {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<u64>>,
}

impl Peak {
    fn start(every: Duration, sample: impl Fn() -> u64 + Send + 'static) -> Peak {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            let mut peak = sample();
            while !flag.load(Ordering::Relaxed) {
                thread::sleep(every);
                peak = peak.max(sample());
            }
            peak.max(sample())
        });
        Peak {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Peak {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

// ----- a cuttable link -----

struct ProxyShared {
    stop: AtomicBool,
    /// The sockets of every relayed connection (both ends), for [`Proxy::cut`].
    pairs: Mutex<HashMap<u64, [TcpStream; 2]>>,
    accepted: AtomicU64,
}

impl ProxyShared {
    fn close_pair(&self, id: u64) {
        if let Some(pair) = self.pairs.lock().unwrap().remove(&id) {
            for s in &pair {
                s.shutdown(Shutdown::Both).ok();
            }
        }
    }
}

/// A TCP relay on std threads between the agent and the server: one acceptor,
/// two pump threads per connection.
struct Proxy {
    addr: SocketAddr,
    shared: Arc<ProxyShared>,
    acceptor: Option<JoinHandle<()>>,
}

impl Proxy {
    fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(ProxyShared {
            stop: AtomicBool::new(false),
            pairs: Mutex::new(HashMap::new()),
            accepted: AtomicU64::new(0),
        });
        let sh = Arc::clone(&shared);
        let acceptor = thread::Builder::new()
            .name("proxy".into())
            .spawn(move || {
                let mut next_id = 0u64;
                for down in listener.incoming() {
                    if sh.stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let Ok(down) = down else { continue };
                    let Ok(up) = TcpStream::connect_timeout(&upstream, IO_TIMEOUT) else {
                        continue;
                    };
                    down.set_nodelay(true).ok();
                    up.set_nodelay(true).ok();
                    next_id += 1;
                    let id = next_id;
                    sh.pairs
                        .lock()
                        .unwrap()
                        .insert(id, [down.try_clone().unwrap(), up.try_clone().unwrap()]);
                    sh.accepted.fetch_add(1, Ordering::Relaxed);
                    let (down2, up2) = (down.try_clone().unwrap(), up.try_clone().unwrap());
                    for (from, to) in [(down, up), (up2, down2)] {
                        let sh = Arc::clone(&sh);
                        thread::Builder::new()
                            .name("proxy-pump".into())
                            .spawn(move || pump(from, to, &sh, id))
                            .unwrap();
                    }
                }
            })
            .unwrap();
        Proxy {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// Shut down every relayed socket, both ways (the agent and the server
    /// each read EOF); returns how many connections were cut.
    fn cut(&self) -> usize {
        let pairs: Vec<_> = self.shared.pairs.lock().unwrap().drain().collect();
        for (_, pair) in &pairs {
            for s in pair {
                s.shutdown(Shutdown::Both).ok();
            }
        }
        pairs.len()
    }
}

/// Copy `from` to `to` until either end fails or closes, then close both.
fn pump(mut from: TcpStream, mut to: TcpStream, sh: &ProxyShared, id: u64) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    sh.close_pair(id);
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        // Wake the acceptor.
        TcpStream::connect_timeout(&self.addr, IO_TIMEOUT).ok();
        if let Some(t) = self.acceptor.take() {
            t.join().ok();
        }
        self.cut();
    }
}

// ----- the three engines -----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Every extension (CREDIT, CLOSE_ACK, HALF_CLOSE...), service with a token.
    Extended,
    /// The agent has `extensions = false`; the service has no token.
    Base,
}

/// Echo service, server and agent, each on its own engine thread. Fields drop
/// in order: the agent stops first, so it does not redial a stopped server.
struct Tunnel {
    agent: TestEngine,
    server: TestEngine,
    echo: TestEngine,
    proxy: Option<Proxy>,
    /// Server and agent counters.
    s: Arc<TunnelStats>,
    a: Arc<TunnelStats>,
}

impl Tunnel {
    /// Start the three engines; `server_keys` and `agent_keys` are extra TOML
    /// lines for the role tables. With `proxy`, the agent dials a [`Proxy`].
    /// Returns once the link is up.
    fn start(mode: Mode, server_keys: &str, agent_keys: &str, proxy: bool) -> Tunnel {
        Tunnel::start_with(
            EngineConfig::default(),
            mode,
            server_keys,
            agent_keys,
            proxy,
        )
    }

    /// [`Tunnel::start`] with `engine` for the server's and the agent's engines.
    fn start_with(
        engine: EngineConfig,
        mode: Mode,
        server_keys: &str,
        agent_keys: &str,
        proxy: bool,
    ) -> Tunnel {
        let echo = TestEngine::start("[[echo]]\nlisten = \"127.0.0.1:0\"\n");
        let token_line = match mode {
            Mode::Extended => format!("token = \"{TOKEN}\"\n"),
            Mode::Base => String::new(),
        };
        let server_toml = format!(
            "[[tunnel_server]]\nlisten = \"127.0.0.1:0\"\n{server_keys}\
             [[tunnel_server.service]]\nname = \"svc\"\npublic = \"127.0.0.1:0\"\n{token_line}"
        );
        let server_cfg = Config::parse(&server_toml)
            .unwrap_or_else(|e| panic!("bad server config: {e}\n{server_toml}"))
            .tunnel_server
            .remove(0);
        let server_role = TunnelServer::new(&server_cfg);
        let s = server_role.stats();
        let (server, _) = TestEngine::with_roles(engine.clone(), vec![Box::new(server_role)]);
        let proxy = proxy.then(|| Proxy::start(server.addr()));
        let dial = proxy.as_ref().map_or(server.addr(), |p| p.addr);
        let mode_line = match mode {
            Mode::Extended => token_line,
            Mode::Base => "extensions = false\n".to_owned(),
        };
        let agent_toml = format!(
            "[[tunnel_agent]]\nname = \"svc\"\nserver = \"{dial}\"\nlocal = \"{}\"\n{mode_line}{agent_keys}",
            echo.addr()
        );
        let agent_cfg = Config::parse(&agent_toml)
            .unwrap_or_else(|e| panic!("bad agent config: {e}\n{agent_toml}"))
            .tunnel_agent
            .remove(0);
        let agent_role = TunnelAgent::new(&agent_cfg);
        let a = agent_role.stats();
        let (agent, _) = TestEngine::with_roles(engine, vec![Box::new(agent_role)]);
        let t = Tunnel {
            agent,
            server,
            echo,
            proxy,
            s,
            a,
        };
        wait_for("the link to come up", WAIT, || t.linked(), || t.describe());
        let flags = t.a.agent().unwrap().2;
        match mode {
            Mode::Extended => assert_ne!(flags, 0, "extended mode expected"),
            Mode::Base => assert_eq!(flags, 0, "base mode expected"),
        }
        t
    }

    /// A link is up on both sides and the public port is open.
    fn linked(&self) -> bool {
        self.s.public_addr("svc").is_some()
            && get(&self.s.links) == 1
            && get(&self.a.links) == 1
            && self
                .a
                .agent()
                .is_some_and(|(st, _, _)| st == AgentState::Up)
    }

    fn public(&self) -> SocketAddr {
        let mut addr = None;
        wait_for(
            "the public port",
            WAIT,
            || {
                addr = self.s.public_addr("svc");
                addr.is_some()
            },
            || self.describe(),
        );
        addr.unwrap()
    }

    fn proxy(&self) -> &Proxy {
        self.proxy.as_ref().expect("started with a proxy")
    }

    /// No stream left on either side, and no connection left at the service.
    fn wait_idle(&self, what: &str, timeout: Duration) {
        wait_for(
            what,
            timeout,
            || {
                get(&self.s.streams) == 0
                    && get(&self.a.streams) == 0
                    && self.echo.stats().connections == 0
            },
            || self.describe(),
        );
    }

    fn describe(&self) -> String {
        format!(
            "\nserver {:?}\nagent {:?}\nagent engine {:?}\nserver engine {:?}\necho engine connections {}",
            self.s,
            self.a,
            util::brief(&self.agent.stats()),
            util::brief(&self.server.stats()),
            self.echo.stats().connections
        )
    }
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

// ----- clients -----

/// Read exactly `total` bytes of `pat` from `s`, checking each; with
/// `expect_eof`, EOF must follow the last byte.
fn read_pattern(
    s: &mut TcpStream,
    pat: Pattern,
    total: u64,
    expect_eof: bool,
) -> Result<(), String> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut received = 0u64;
    while received < total {
        let want = ((total - received) as usize).min(buf.len());
        match s.read(&mut buf[..want]) {
            Ok(0) => return Err(format!("EOF after {received} of {total} bytes")),
            Ok(n) => {
                if let Err(at) = pat.check(received, &buf[..n]) {
                    return Err(format!("stream differs at byte {at}"));
                }
                received += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(format!(
                    "read failed after {received} of {total} bytes: {e}"
                ));
            }
        }
    }
    if expect_eof {
        match s.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => return Err(format!("{n} bytes more than the {total} sent")),
            Err(e) => return Err(format!("no EOF after the {total} bytes: {e}")),
        }
    }
    Ok(())
}

/// Send `total` bytes of the pattern `seed` through the echo at `addr` (one
/// writer thread) and read them back on this thread, every byte checked. With
/// `half_close` the writer shuts down its side after the last byte and EOF
/// must come back after the echo. Returns the time taken.
fn echo_round_trip(
    addr: SocketAddr,
    seed: u64,
    total: u64,
    half_close: bool,
) -> Result<Duration, String> {
    let t0 = Instant::now();
    let mut s = connect(addr);
    let pat = Pattern::new(seed);
    let mut w = s.try_clone().unwrap();
    let writer = thread::spawn(move || -> io::Result<()> {
        let mut sent = 0;
        while sent < total {
            let chunk = pat.chunk(sent, (total - sent).min(64 * KIB) as usize);
            w.write_all(chunk)?;
            sent += chunk.len() as u64;
        }
        if half_close {
            w.shutdown(Shutdown::Write)?;
        }
        Ok(())
    });
    let read = read_pattern(&mut s, pat, total, half_close);
    if read.is_err() {
        // Unblock the writer.
        s.shutdown(Shutdown::Both).ok();
    }
    let written = writer.join().unwrap();
    read.map_err(|e| format!("stream {seed}: {e}"))?;
    written.map_err(|e| format!("stream {seed}: write failed: {e}"))?;
    Ok(t0.elapsed())
}

/// `n` concurrent [`echo_round_trip`]s of `total` bytes (seeds from
/// `first_seed`); returns the wall time for all, or every failure.
fn round_trips(
    addr: SocketAddr,
    first_seed: u64,
    n: u64,
    total: u64,
    half_close: bool,
) -> Result<Duration, Vec<String>> {
    let t0 = Instant::now();
    let handles: Vec<_> = (first_seed..first_seed + n)
        .map(|seed| thread::spawn(move || echo_round_trip(addr, seed, total, half_close)))
        .collect();
    let failures: Vec<String> = handles
        .into_iter()
        .filter_map(|h| h.join().unwrap().err())
        .collect();
    if failures.is_empty() {
        Ok(t0.elapsed())
    } else {
        Err(failures)
    }
}

/// A client that writes up to `cap` bytes and never reads.
struct Frozen {
    written: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    /// The write error that ended it (None: stopped or `cap` reached).
    thread: Option<JoinHandle<Option<io::Error>>>,
    sock: TcpStream,
}

impl Frozen {
    fn start(addr: SocketAddr, cap: u64) -> Frozen {
        // A small receive buffer: the kernel absorbs little of the echo.
        let sock = connect_with_recv_buffer(addr, 4096);
        let mut w = sock.try_clone().unwrap();
        w.set_write_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let written = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (wr, st) = (Arc::clone(&written), Arc::clone(&stop));
        let pat = Pattern::new(7);
        let thread = thread::spawn(move || {
            let mut sent = 0u64;
            while sent < cap && !st.load(Ordering::Relaxed) {
                let chunk = pat.chunk(sent, (cap - sent).min(64 * KIB) as usize);
                match w.write(chunk) {
                    Ok(n) => {
                        sent += n as u64;
                        wr.store(sent, Ordering::Relaxed);
                    }
                    Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Some(e),
                }
            }
            None
        });
        Frozen {
            written,
            stop,
            thread: Some(thread),
            sock,
        }
    }

    fn written(&self) -> u64 {
        get(&self.written)
    }

    /// Wait until the writer made no progress for `quiet`; returns the bytes
    /// written by then.
    fn wait_held_back(&self, quiet: Duration, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        let mut last = (self.written(), Instant::now());
        loop {
            thread::sleep(Duration::from_millis(20));
            let now = self.written();
            if now != last.0 {
                last = (now, Instant::now());
            } else if last.1.elapsed() >= quiet {
                return now;
            }
            assert!(
                Instant::now() < deadline,
                "the frozen client was never held back ({now} bytes written)"
            );
        }
    }

    fn ended(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stop writing; returns the bytes written and the error that ended it.
    fn finish(mut self) -> (u64, Option<io::Error>) {
        self.stop.store(true, Ordering::Relaxed);
        let err = self.thread.take().unwrap().join().unwrap();
        self.sock.shutdown(Shutdown::Both).ok();
        (self.written(), err)
    }
}

/// How a [`Streamer`]'s reader ended.
#[derive(Debug)]
enum End {
    Eof,
    Reset,
    Failed(String),
}

/// A client that writes its pattern without end and reads the echo back,
/// checking every byte, until the connection ends.
struct Streamer {
    received: Arc<AtomicU64>,
    reader: JoinHandle<(End, Instant)>,
    writer: JoinHandle<()>,
}

impl Streamer {
    fn start(addr: SocketAddr, seed: u64, read_timeout: Duration) -> Streamer {
        let mut s = connect(addr);
        s.set_read_timeout(Some(read_timeout)).unwrap();
        let mut w = s.try_clone().unwrap();
        let pat = Pattern::new(seed);
        let writer = thread::spawn(move || {
            let mut sent = 0u64;
            loop {
                let chunk = pat.chunk(sent, 16 * KIB as usize);
                if w.write_all(chunk).is_err() {
                    return;
                }
                sent += chunk.len() as u64;
            }
        });
        let received = Arc::new(AtomicU64::new(0));
        let rx = Arc::clone(&received);
        let reader = thread::spawn(move || {
            let mut buf = vec![0u8; 64 * KIB as usize];
            let mut got = 0u64;
            let end = loop {
                match s.read(&mut buf) {
                    Ok(0) => break End::Eof,
                    Ok(n) => {
                        if let Err(at) = pat.check(got, &buf[..n]) {
                            break End::Failed(format!("stream {seed} differs at byte {at}"));
                        }
                        got += n as u64;
                        rx.store(got, Ordering::Relaxed);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break End::Reset,
                    Err(e) => {
                        break End::Failed(format!("stream {seed}: read after {got} bytes: {e}"));
                    }
                }
            };
            let at = Instant::now();
            // Unblock the writer.
            s.shutdown(Shutdown::Both).ok();
            (end, at)
        });
        Streamer {
            received,
            reader,
            writer,
        }
    }

    fn received(&self) -> u64 {
        get(&self.received)
    }

    fn finish(self) -> (End, Instant) {
        let r = self.reader.join().unwrap();
        self.writer.join().unwrap();
        r
    }
}

// ----- 1. many streams at once -----

/// 100 streams of 10 MiB each, at once, through the echo and back, every byte
/// checked; `engine` is the server's and the agent's engine configuration.
fn hundred_streams(engine: EngineConfig) {
    const STREAMS: u64 = 100;
    const EACH: u64 = 10 * MIB;
    let t = Tunnel::start_with(engine, Mode::Extended, "", "", false);
    let public = t.public();
    let s = Arc::clone(&t.s);
    let peak = Peak::start(Duration::from_millis(5), move || get(&s.streams));
    let elapsed = round_trips(public, 1000, STREAMS, EACH, true).unwrap_or_else(|f| {
        panic!(
            "{} of {STREAMS} streams failed: {f:#?}{}",
            f.len(),
            t.describe()
        )
    });
    let peak = peak.finish();
    eprintln!(
        "{STREAMS} streams x {} MiB echoed in {elapsed:.2?}: {:.0} MiB/s each way",
        EACH / MIB,
        mib(STREAMS * EACH) / elapsed.as_secs_f64()
    );
    if util::emulated().is_some() {
        // Emulated, the first streams may finish before the last one opens.
        assert!(peak >= STREAMS * 3 / 4, "only {peak} streams open at once");
    } else {
        assert_eq!(peak, STREAMS, "streams open at once");
    }
    assert_eq!(get(&t.s.streams_total), STREAMS);
    assert_eq!(get(&t.a.streams_total), STREAMS);
    assert_eq!(get(&t.s.bytes_to_link_total), STREAMS * EACH);
    assert_eq!(get(&t.s.bytes_from_link_total), STREAMS * EACH);
    assert_eq!(get(&t.a.reconnects_total), 0, "the link went down");
    assert_eq!(
        get(&t.s.credit_violations_total) + get(&t.a.credit_violations_total),
        0
    );
    t.wait_idle("every stream to close", WAIT);
}

/// With the default engine configuration. Streams pause once the link holds
/// more than 64 KiB (`LINK_HIGH`), but only after the DATA frame that crossed
/// it, so the link queue must hold 64 KiB plus one frame per busy stream
/// (`Settings::link_queue`). Regression: the link once got `engine.queue_bytes`
/// (1 MiB), so about 60 busy streams overflowed it and the link was aborted.
#[test]
fn hundred_streams_of_10_mib_each_are_byte_exact() {
    let _g = shared();
    hundred_streams(EngineConfig::default());
}

// ----- 2. a client that stops reading -----

/// Normal clients and what each echoes.
const NORMALS: u64 = 4;
const NORMAL_BYTES: u64 = 20 * MIB;
/// What the frozen client tries to write.
const FROZEN_CAP: u64 = 50 * MIB;
/// In base mode: what it may write before the stall rule must have closed it.
const FROZEN_BASE_CAP: u64 = 1 << 40;

#[test]
fn frozen_client_does_not_slow_the_others_with_credit() {
    let _g = exclusive();
    // A short linger: see the end of the test.
    let engine = EngineConfig {
        linger: LINGER,
        ..EngineConfig::default()
    };
    let t = Tunnel::start_with(engine, Mode::Extended, "", "", false);
    let public = t.public();

    let baseline = round_trips(public, 100, NORMALS, NORMAL_BYTES, true)
        .unwrap_or_else(|f| panic!("baseline failed: {f:#?}{}", t.describe()));

    let frozen = Frozen::start(public, FROZEN_CAP);
    let held = frozen.wait_held_back(Duration::from_millis(500), Duration::from_secs(30));
    let with_frozen = round_trips(public, 200, NORMALS, NORMAL_BYTES, true)
        .unwrap_or_else(|f| panic!("with a frozen client: {f:#?}{}", t.describe()));
    eprintln!(
        "{NORMALS} x {} MiB echo: {baseline:.2?} alone, {with_frozen:.2?} beside a frozen client \
         (held back after {:.1} MiB)",
        NORMAL_BYTES / MIB,
        mib(held)
    );
    let limit = baseline * 3 + Duration::from_secs(3);
    assert!(
        with_frozen <= limit,
        "the frozen client slowed the others: {with_frozen:?} against {baseline:?} alone{}",
        t.describe()
    );
    // The frozen stream is still open and still held back: credit, not a close.
    assert!(!frozen.ended(), "the frozen client's connection was closed");
    assert_eq!(get(&t.s.streams), 1, "{}", t.describe());
    assert_eq!(frozen.written(), held, "the frozen client moved again");
    assert_eq!(get(&t.s.stalled_total) + get(&t.a.stalled_total), 0);
    let (_, err) = frozen.finish();
    assert!(err.is_none(), "frozen client: {err:?}");
    // The agent closes the frozen stream's local connection after flushing
    // what it holds for it, but it no longer reads it, and the echo does not
    // read while its replies are unread: the connection goes at
    // `engine.linger` (10 s by default, [`LINGER`] here), not at once.
    let closed_at = Instant::now();
    wait_for(
        "the streams to close",
        WAIT,
        || get(&t.s.streams) == 0 && get(&t.a.streams) == 0,
        || t.describe(),
    );
    t.wait_idle(
        "the frozen stream's local connection to close",
        LINGER + WAIT,
    );
    eprintln!(
        "frozen stream's local connection closed {:.2?} after the client left",
        closed_at.elapsed()
    );
}

/// `engine.linger` in [`frozen_client_does_not_slow_the_others_with_credit`].
const LINGER: Duration = Duration::from_secs(2);

#[test]
fn frozen_client_in_base_mode_is_closed_at_stall_timeout_and_memory_stays_bounded() {
    let _g = exclusive();
    // The agent waits longer than the server, as PROTOCOL.md advises: while
    // the server holds the link for the frozen client, the echo replies of
    // the normal streams back up on the agent too, and an agent timer that
    // ran out first would close one of them.
    let t = Tunnel::start(
        Mode::Base,
        "stall_timeout = \"1s\"\n",
        "stall_timeout = \"5s\"\n",
        false,
    );
    let public = t.public();
    let rss0 = rss();
    let peak = Peak::start(Duration::from_millis(10), rss);

    // No cap that matters: only the close may end the writer. The sockets
    // around the loop (client, server, agent, echo and back) absorb tens of
    // MiB before the server's stall rule closes the stream, so a
    // `FROZEN_CAP` writer could finish first and never see the close.
    let frozen = Frozen::start(public, FROZEN_BASE_CAP);
    let normals = round_trips(public, 300, NORMALS, NORMAL_BYTES, false);
    let stalled = || get(&t.s.stalled_total) + get(&t.a.stalled_total);
    wait_for(
        "the frozen stream to be closed as stalled",
        WAIT,
        || stalled() >= 1,
        || t.describe(),
    );
    wait_for(
        "the frozen client's connection to fail",
        WAIT,
        || frozen.ended(),
        || (frozen.written(), t.describe()),
    );
    let peak = peak.finish();
    let (written, err) = frozen.finish();
    let elapsed = normals.unwrap_or_else(|f| {
        panic!(
            "normal clients failed beside a frozen one: {f:#?}\nfrozen wrote {written} bytes{}",
            t.describe()
        )
    });
    eprintln!(
        "base mode: {NORMALS} x {} MiB echo beside a frozen client in {elapsed:.2?}; frozen client \
         wrote {:.1} MiB, ended by {err:?}; stalled_total server {} agent {}; VmRSS {:.1} MiB at \
         start, peak {:.1} MiB (+{:.1} MiB)",
        NORMAL_BYTES / MIB,
        mib(written),
        get(&t.s.stalled_total),
        get(&t.a.stalled_total),
        mib(rss0),
        mib(peak),
        mib(peak.saturating_sub(rss0)),
    );
    assert!(err.is_some(), "the frozen client was never closed");
    // Only the frozen stream may have been closed as stalled: the normal
    // streams all completed (checked above), and no other stream existed.
    assert!(
        stalled() <= 2,
        "more than the frozen stream stalled{}",
        t.describe()
    );
    assert!(
        peak.saturating_sub(rss0) < 64 * MIB,
        "VmRSS grew by {:.1} MiB",
        mib(peak - rss0)
    );
    t.wait_idle("every stream to close", WAIT);
}

// ----- 3. the link cut under load -----

fn link_cut_mid_transfer(mode: Mode) {
    const STREAMS: u64 = 10;
    /// Every client must see its connection end within this after the cut.
    const END_WITHIN: Duration = Duration::from_secs(5);
    let _g = shared();
    let t = Tunnel::start(
        mode,
        "",
        "reconnect_min = \"10ms\"\nreconnect_max = \"100ms\"\n",
        true,
    );
    let public = t.public();
    let links_before = get(&t.s.links_total);
    let streamers: Vec<Streamer> = (0..STREAMS)
        .map(|i| Streamer::start(public, 500 + i, END_WITHIN))
        .collect();
    wait_for(
        "every stream to be moving",
        WAIT,
        || streamers.iter().all(|s| s.received() >= 256 * KIB),
        || {
            (
                streamers.iter().map(Streamer::received).collect::<Vec<_>>(),
                t.describe(),
            )
        },
    );
    assert_eq!(get(&t.s.streams), STREAMS);

    let cut_at = Instant::now();
    assert_eq!(t.proxy().cut(), 1, "one link relayed");
    let mut latest = Duration::ZERO;
    let mut failures = Vec::new();
    for (i, s) in streamers.into_iter().enumerate() {
        let received = s.received();
        let (end, at) = s.finish();
        let after = at.saturating_duration_since(cut_at);
        latest = latest.max(after);
        match end {
            End::Eof | End::Reset if after <= END_WITHIN => {}
            End::Failed(why) => failures.push(format!("client {i}: {why}")),
            other => failures.push(format!(
                "client {i}: {other:?} only {after:?} after the cut ({received} bytes)"
            )),
        }
    }
    assert!(failures.is_empty(), "{failures:#?}{}", t.describe());
    t.wait_idle("every stream and local connection to close", WAIT);
    let idle_after = cut_at.elapsed();
    wait_for(
        "the agent to relink",
        WAIT,
        || get(&t.a.reconnects_total) >= 1 && get(&t.s.links_total) > links_before && t.linked(),
        || t.describe(),
    );
    let relinked_after = cut_at.elapsed();
    eprintln!(
        "{mode:?}: clients saw the cut within {latest:.2?}; streams and local connections gone \
         after {idle_after:.2?}; relinked after {relinked_after:.2?}"
    );
    let public = t.public();
    round_trips(public, 600, 3, MIB, mode == Mode::Extended)
        .unwrap_or_else(|f| panic!("new clients after the relink: {f:#?}{}", t.describe()));
}

#[test]
fn link_cut_mid_transfer_ends_every_stream_and_the_agent_relinks_extended() {
    link_cut_mid_transfer(Mode::Extended);
}

#[test]
fn link_cut_mid_transfer_ends_every_stream_and_the_agent_relinks_base() {
    link_cut_mid_transfer(Mode::Base);
}

// ----- 4. id reuse under churn -----

/// Client `n`'s payload: its tag `[nnnnn]` repeated 9 to 63 times.
fn churn_payload(n: u64) -> Vec<u8> {
    let tag = format!("[{n:05}]");
    tag.repeat(9 * (n as usize % 7 + 1)).into_bytes()
}

/// What one churn client saw, if it was refused (zero bytes and a close)
/// rather than served.
enum Churn {
    Done,
    Refused,
}

/// One short-lived client: send the payload, expect exactly it back. Every
/// fourth client sends its payload a second time and closes without reading
/// the echo, which is then in flight when its id is released.
fn churn_client(addr: SocketAddr, n: u64, mode: Mode) -> Result<Churn, String> {
    let payload = churn_payload(n);
    let mut c = connect(addr);
    // A refused client may find the connection closed before or after writing.
    let wrote = c.write_all(&payload);
    let mut got = Vec::with_capacity(payload.len());
    let mut buf = [0u8; 1024];
    let early_close = n % 4 == 3;
    let want_eof = mode == Mode::Extended && !early_close;
    if want_eof && wrote.is_ok() {
        c.shutdown(Shutdown::Write).ok();
    }
    loop {
        if !want_eof && got.len() >= payload.len() {
            break;
        }
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => {
                got.extend_from_slice(&buf[..k]);
                if got.len() > payload.len() || !payload.starts_with(&got) {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset && got.is_empty() => break,
            Err(e) => return Err(format!("client {n}: read after {} bytes: {e}", got.len())),
        }
    }
    if got.is_empty() {
        return Ok(Churn::Refused);
    }
    if got != payload {
        return Err(format!(
            "client {n}: got {:?}, want {:?}",
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&payload)
        ));
    }
    if early_close {
        c.write_all(&payload).ok();
    }
    Ok(Churn::Done)
}

/// `clients` short-lived clients, [`churn_client`], 8 at a time, with the
/// server's `max_streams = 8`; a refused client (all streams in use, or in
/// base mode every free id in quarantine) retries. Every refusal must show in
/// the server's `refused_total`, so a lost stream cannot pass as one.
///
/// Base mode runs at about 128 clients a second whatever the machine: the
/// server keeps each id it closed out of rotation for `id_quarantine` (2 s),
/// so at most 256 ids free up per 2 s (3,000 clients: about 23 s).
fn churn(mode: Mode, clients: u64) {
    const PARALLEL: u64 = 8;
    let _g = shared();
    let t = Tunnel::start(mode, "max_streams = 8\n", "", false);
    let public = t.public();
    let t0 = Instant::now();
    let refused = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..PARALLEL)
        .map(|w| {
            let refused = Arc::clone(&refused);
            thread::spawn(move || -> Result<(), String> {
                for n in (w..clients).step_by(PARALLEL as usize) {
                    let deadline = Instant::now() + WAIT;
                    let mut pause = Duration::from_millis(1);
                    loop {
                        match churn_client(public, n, mode)? {
                            Churn::Done => break,
                            Churn::Refused => {
                                refused.fetch_add(1, Ordering::Relaxed);
                                if Instant::now() > deadline {
                                    return Err(format!("client {n}: refused for {WAIT:?}"));
                                }
                                thread::sleep(pause);
                                pause = (pause * 2).min(Duration::from_millis(16));
                            }
                        }
                    }
                }
                Ok(())
            })
        })
        .collect();
    let failures: Vec<String> = workers
        .into_iter()
        .filter_map(|h| h.join().unwrap().err())
        .collect();
    let elapsed = t0.elapsed();
    assert!(failures.is_empty(), "{failures:#?}{}", t.describe());
    let refused = get(&refused);
    eprintln!(
        "{mode:?}: {clients} clients, {PARALLEL} at a time, in {elapsed:.2?} ({:.0}/s); {refused} \
         refusals retried; server stale_total {} refused_total {}; agent stale_total {}",
        clients as f64 / elapsed.as_secs_f64(),
        get(&t.s.stale_total),
        get(&t.s.refused_total),
        get(&t.a.stale_total),
    );
    assert_eq!(get(&t.s.streams_total), clients, "{}", t.describe());
    assert_eq!(
        get(&t.s.refused_total),
        refused,
        "every empty answer was a refusal"
    );
    t.wait_idle("every stream to close", WAIT);
}

#[test]
fn id_reuse_under_churn_never_crosses_clients_extended() {
    churn(Mode::Extended, 3000);
}

#[test]
fn id_reuse_under_churn_never_crosses_clients_base() {
    churn(Mode::Base, 3000);
}

// ----- 5. memory across reconnects -----

/// Link cuts in [`reconnect_cycles_leave_memory_flat`]: about 8 ms a cycle
/// (8 s in all) in the test profile as in release, on 2 cores.
const CYCLES: u64 = 1000;
/// VmRSS is taken after this many cycles and again at the end.
const WARM_CYCLES: u64 = 100;

#[test]
fn reconnect_cycles_leave_memory_flat() {
    let _g = exclusive();
    let t = Tunnel::start(
        Mode::Extended,
        "",
        "reconnect_min = \"1ms\"\nreconnect_max = \"5ms\"\n",
        true,
    );
    let t0 = Instant::now();
    let mut rss_warm = 0;
    for cycle in 1..=CYCLES {
        let before = get(&t.s.links_total);
        let cut = t.proxy().cut();
        assert_eq!(cut, 1, "cycle {cycle}: one link relayed");
        wait_for(
            &format!("the relink in cycle {cycle}"),
            WAIT,
            || get(&t.s.links_total) > before && t.linked(),
            || t.describe(),
        );
        let tag = format!("cycle {cycle:05}");
        let mut c = connect(t.public());
        c.write_all(tag.as_bytes()).unwrap();
        let mut got = vec![0u8; tag.len()];
        c.read_exact(&mut got)
            .unwrap_or_else(|e| panic!("cycle {cycle}: echo: {e}{}", t.describe()));
        assert_eq!(got, tag.as_bytes(), "cycle {cycle}");
        drop(c);
        if cycle == WARM_CYCLES {
            wait_until(WAIT, || get(&t.s.streams) == 0 && get(&t.a.streams) == 0);
            rss_warm = rss();
        }
    }
    wait_until(WAIT, || get(&t.s.streams) == 0 && get(&t.a.streams) == 0);
    let rss_end = rss();
    let elapsed = t0.elapsed();
    eprintln!(
        "{CYCLES} link cuts and relinks in {elapsed:.2?} ({:.1} ms each); VmRSS {:.2} MiB after \
         {WARM_CYCLES}, {:.2} MiB after {CYCLES} ({:+.2} MiB); agent reconnects_total {}, server \
         links_total {}, proxy accepted {}",
        elapsed.as_secs_f64() * 1000.0 / CYCLES as f64,
        mib(rss_warm),
        mib(rss_end),
        (rss_end as f64 - rss_warm as f64) / MIB as f64,
        get(&t.a.reconnects_total),
        get(&t.s.links_total),
        get(&t.proxy().shared.accepted),
    );
    assert!(get(&t.a.reconnects_total) >= CYCLES);
    if let Some(how) = util::emulated() {
        // qemu-user keeps state for every guest thread that ever ran (the
        // proxy here starts two per cycle), so VmRSS measures qemu's own
        // growth, not switchboard's.
        eprintln!("memory check SKIPPED under {how}: VmRSS includes qemu's per-thread state");
        return;
    }
    assert!(
        rss_end < rss_warm + 4 * MIB,
        "VmRSS grew from {:.2} MiB to {:.2} MiB over {} cycles",
        mib(rss_warm),
        mib(rss_end),
        CYCLES - WARM_CYCLES
    );
}
