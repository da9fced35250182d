//! Helpers shared by the integration tests (after tokio-rs/mio `tests/util/mod.rs`).
//!
//! Every test binary includes this module with `mod util;` and uses a different
//! subset of it, hence the `dead_code` allowance.
//!
//! Rules the helpers enforce so that no test can hang: every socket gets read and
//! write timeouts, every wait has a deadline, and an engine started here is
//! stopped and its thread joined (with a deadline) when its guard is dropped.

#![allow(dead_code, reason = "each test binary uses a different subset")]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test helpers fail the test loudly"
)]

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, ExitStatus};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use switchboard::config::EngineConfig;
use switchboard::{Config, Engine, EngineError, Handle, Role, RoleId, StatsSnapshot};

/// Read/write timeout put on every client socket by [`connect`].
pub(crate) const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long dropping a [`TestEngine`] waits for the engine thread to finish.
pub(crate) const JOIN_TIMEOUT: Duration = Duration::from_secs(15);

/// An engine running on its own thread. Dropping it stops the engine and joins
/// the thread (failing the test if that takes longer than [`JOIN_TIMEOUT`]).
pub(crate) struct TestEngine {
    /// The bound listener addresses, in role order (real ports).
    pub(crate) addrs: Vec<SocketAddr>,
    /// A handle to the running engine.
    pub(crate) handle: Handle,
    thread: Option<JoinHandle<Result<(), EngineError>>>,
}

impl TestEngine {
    /// Parse `toml`, start the engine (binding its listeners) and run it on a
    /// new thread.
    pub(crate) fn start(toml: &str) -> TestEngine {
        let config = Config::parse(toml).unwrap_or_else(|e| panic!("bad test config: {e}"));
        TestEngine::run(Engine::from_config(&config).expect("engine"))
    }

    /// Start an engine the test built itself (for example one that watches
    /// its config file, or with extra roles added) and run it on a new thread.
    pub(crate) fn from_engine(engine: Engine) -> TestEngine {
        TestEngine::run(engine)
    }

    /// Start `engine` (binding its listeners) and run it on a new thread.
    fn run(mut engine: Engine) -> TestEngine {
        engine.start().expect("engine start");
        let addrs = engine.listeners().iter().map(|l| l.addr).collect();
        let handle = engine.handle();
        let thread = thread::Builder::new()
            .name("engine".into())
            .spawn(move || engine.run())
            .expect("spawn engine thread");
        TestEngine {
            addrs,
            handle,
            thread: Some(thread),
        }
    }

    /// Start an engine built from `config` and `roles` rather than from TOML
    /// (for test roles), binding their listeners, and run it on a new thread.
    /// Returns the roles' ids, in order.
    pub(crate) fn with_roles(
        config: EngineConfig,
        roles: Vec<Box<dyn Role>>,
    ) -> (TestEngine, Vec<RoleId>) {
        let mut engine = Engine::new(config).expect("engine");
        let ids = roles.into_iter().map(|r| engine.add_role(r)).collect();
        (TestEngine::run(engine), ids)
    }

    /// The first listener's address.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// A snapshot of the engine's counters.
    pub(crate) fn stats(&self) -> StatsSnapshot {
        self.handle.stats()
    }

    /// Wait (bounded) for the engine thread to return, after a stop was asked
    /// for; fails the test if `run` returned an error or did not return in time.
    pub(crate) fn join(&mut self, timeout: Duration) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        let finished = wait_until(timeout, || thread.is_finished());
        assert!(finished, "engine thread did not return within {timeout:?}");
        match thread.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("engine run failed: {e}"),
            Err(_) => panic!("engine thread panicked"),
        }
    }

    /// Stop the engine and join its thread.
    pub(crate) fn stop(mut self) {
        self.handle.stop();
        self.join(JOIN_TIMEOUT);
    }
}

impl Drop for TestEngine {
    fn drop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.handle.stop();
        if wait_until(JOIN_TIMEOUT, || thread.is_finished()) {
            let result = thread.join();
            if !thread::panicking() {
                assert!(
                    matches!(result, Ok(Ok(()))),
                    "engine thread failed: {result:?}"
                );
            }
        } else if thread::panicking() {
            // Already failing: leak the thread rather than abort on a double panic.
            eprintln!("engine thread did not stop within {JOIN_TIMEOUT:?}; leaking it");
        } else {
            panic!("engine thread did not stop within {JOIN_TIMEOUT:?}");
        }
    }
}

/// Poll `cond` every millisecond or so until it holds or `timeout` passes;
/// returns whether it held.
pub(crate) fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_micros(200);
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return cond();
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(10));
    }
}

/// [`wait_until`], failing the test with `what` and `detail()` on timeout.
pub(crate) fn wait_for<D: std::fmt::Debug>(
    what: &str,
    timeout: Duration,
    cond: impl FnMut() -> bool,
    detail: impl FnOnce() -> D,
) {
    if !wait_until(timeout, cond) {
        panic!(
            "timed out after {timeout:?} waiting for {what}: {:?}",
            detail()
        );
    }
}

/// Connect to `addr` with [`IO_TIMEOUT`] on connect, reads and writes.
pub(crate) fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// `GET path` from an admin endpoint at `addr`; the body of its `200`
/// answer (the test fails on any other status).
pub(crate) fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = connect(addr);
    s.write_all(format!("GET {path} HTTP/1.1\r\n\r\n").as_bytes())
        .unwrap();
    let raw = read_to_eof(&mut s, 16 * 1024 * 1024);
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    body.to_owned()
}

/// Connect to `to` from the loopback address `src` (all of 127.0.0.0/8 is
/// local), with [`IO_TIMEOUT`] on connect, reads and writes.
pub(crate) fn connect_from(src: std::net::Ipv4Addr, to: SocketAddr) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from((src, 0)).into())
        .unwrap_or_else(|e| panic!("bind {src}: {e}"));
    s.connect_timeout(&to.into(), IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect from {src} to {to}: {e}"));
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Connect to `addr` from a socket whose receive buffer is set to `bytes`
/// before connecting (so the kernel cannot absorb much of what the engine
/// sends), with [`IO_TIMEOUT`] on connect, reads and writes.
pub(crate) fn connect_with_recv_buffer(addr: SocketAddr, bytes: usize) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
    s.set_recv_buffer_size(bytes).unwrap();
    s.connect_timeout(&addr.into(), IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Accept one connection on `listener` within `timeout` (std's `accept` has no
/// timeout of its own); the stream gets [`IO_TIMEOUT`] on reads and writes.
pub(crate) fn accept_within(listener: &std::net::TcpListener, timeout: Duration) -> TcpStream {
    listener.set_nonblocking(true).unwrap();
    let mut accepted = None;
    let ok = wait_until(timeout, || match listener.accept() {
        Ok((s, _)) => {
            accepted = Some(s);
            true
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
        Err(e) => panic!("accept failed: {e}"),
    });
    assert!(ok, "nothing connected within {timeout:?}");
    let s = accepted.unwrap();
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

/// The most a loopback socket's send buffer can grow to (`tcp_wmem` max), so
/// a test can send more than the kernel can absorb; 4 MiB where unreadable.
pub(crate) fn kernel_send_buffer_max() -> u64 {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|s| s.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(4 * 1024 * 1024)
}

/// Whether `e` is what a blocking socket returns when its timeout expires.
pub(crate) fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Bytes as readable ASCII (escapes for the rest), for assertion messages.
pub(crate) fn show(b: &[u8]) -> String {
    b.escape_ascii().to_string()
}

/// Read exactly `want.len()` bytes from `s` and compare.
pub(crate) fn expect_bytes(s: &mut TcpStream, want: &[u8]) {
    let mut got = vec![0u8; want.len()];
    s.read_exact(&mut got)
        .unwrap_or_else(|e| panic!("expecting {:?}: {e}", show(want)));
    assert_eq!(show(&got), show(want));
}

/// Nothing arrives on `s` for `quiet`, and it stays open. The socket's read
/// timeout is restored after.
pub(crate) fn expect_quiet(s: &mut TcpStream, quiet: Duration) {
    let before = s.read_timeout().unwrap();
    s.set_read_timeout(Some(quiet)).unwrap();
    let mut buf = [0u8; 256];
    match s.read(&mut buf) {
        Err(e) if is_timeout(&e) => {}
        Ok(0) => panic!("expected silence, got a close"),
        Ok(n) => panic!("expected silence, got {:?}", show(&buf[..n])),
        Err(e) => panic!("expected silence: {e}"),
    }
    s.set_read_timeout(before).unwrap();
}

/// The peer closes `s` within `limit` (EOF or reset), with nothing before the
/// close; returns when the close was seen. The socket's read timeout is
/// restored after.
pub(crate) fn closed_within(s: &mut TcpStream, limit: Duration) -> Instant {
    let before = s.read_timeout().unwrap();
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 256];
    let at = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "connection not closed within {limit:?}");
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => break Instant::now(),
            Ok(n) => panic!(
                "expected the connection to be closed, read {:?}",
                show(&buf[..n])
            ),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break Instant::now(),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => panic!("connection not closed within {limit:?}"),
            Err(e) => panic!("expected the connection to be closed: {e}"),
        }
    };
    s.set_read_timeout(before).unwrap();
    at
}

/// Read until EOF (bounded by the socket's read timeout); returns everything
/// read. Fails the test on a timeout or error.
pub(crate) fn read_to_eof(s: &mut TcpStream, limit: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                assert!(out.len() <= limit, "read more than {limit} bytes");
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("read failed after {} bytes: {e}", out.len()),
        }
    }
}

// ----- deterministic pseudo-random payloads -----

/// Length of the shared pattern table: a prime, so that no buffer or window
/// size lines up with its period and a reordered, repeated or dropped chunk
/// shows up as a mismatch.
const PATTERN_LEN: usize = 1_048_573;

fn pattern_table() -> &'static [u8] {
    static TABLE: OnceLock<Box<[u8]>> = OnceLock::new();
    TABLE.get_or_init(|| {
        // xorshift64*: fixed seed, so every run sends the same bytes.
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        (0..PATTERN_LEN)
            .map(|_| {
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
            })
            .collect()
    })
}

/// An endless deterministic pseudo-random byte stream; `Pattern::new(seed)`
/// gives each connection its own stream. Byte `i` of the stream is a pure
/// function of `(seed, i)`, so writer and reader need no shared state.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Pattern {
    start: usize,
}

impl Pattern {
    pub(crate) fn new(seed: u64) -> Pattern {
        let start = (seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) % PATTERN_LEN as u64;
        Pattern {
            start: start as usize,
        }
    }

    /// A contiguous piece of the stream starting at `offset`, at most `max`
    /// bytes (possibly fewer: it ends at the table's wrap-around). Zero-copy.
    pub(crate) fn chunk(&self, offset: u64, max: usize) -> &'static [u8] {
        let table = pattern_table();
        let at = ((self.start as u64 + offset) % PATTERN_LEN as u64) as usize;
        let end = at + max.min(PATTERN_LEN - at);
        &table[at..end]
    }

    /// Fill `buf` with the stream from `offset`.
    pub(crate) fn fill(&self, mut offset: u64, mut buf: &mut [u8]) {
        while !buf.is_empty() {
            let c = self.chunk(offset, buf.len());
            let (head, rest) = buf.split_at_mut(c.len());
            head.copy_from_slice(c);
            buf = rest;
            offset += c.len() as u64;
        }
    }

    /// Check `data` against the stream from `offset`; `Err(i)` names the
    /// stream offset of the first wrong byte.
    pub(crate) fn check(&self, mut offset: u64, mut data: &[u8]) -> Result<(), u64> {
        while !data.is_empty() {
            let c = self.chunk(offset, data.len());
            let (head, rest) = data.split_at(c.len());
            if head != c {
                let i = head.iter().zip(c).position(|(a, b)| a != b).unwrap_or(0);
                return Err(offset + i as u64);
            }
            data = rest;
            offset += c.len() as u64;
        }
        Ok(())
    }
}

// ----- child processes (the `switchboard` binary) -----

/// Path of the `switchboard` binary built for these tests.
pub(crate) fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_switchboard")
}

/// A `Command` for a program built for the target: under user-mode
/// emulation the kernel cannot exec it, so it runs through the same runner
/// cargo used for this test (`CARGO_TARGET_<TRIPLE>_RUNNER`, e.g.
/// `qemu-aarch64-static -L /usr/aarch64-linux-gnu`), which the test
/// process inherits from cargo's environment.
pub(crate) fn target_command(program: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
    let runner = emulated().and_then(|_| {
        std::env::vars()
            .find(|(k, _)| k.starts_with("CARGO_TARGET_") && k.ends_with("_RUNNER"))
            .map(|(_, v)| v)
    });
    match runner {
        Some(r) => {
            let mut parts = r.split_whitespace();
            let mut cmd = std::process::Command::new(parts.next().unwrap_or("env"));
            cmd.args(parts).arg(program);
            cmd
        }
        None => std::process::Command::new(program),
    }
}

/// Write `text` to a fresh file under the target's test scratch directory.
pub(crate) fn temp_file(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join(format!("{}-{name}", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

/// A child process that is killed (by its own pid) and reaped if the test
/// fails before it exits, so a failed test leaves no server running.
pub(crate) struct ChildGuard(pub(crate) Child);

impl ChildGuard {
    /// The child's pid.
    pub(crate) fn id(&self) -> u32 {
        self.0.id()
    }

    /// [`wait_child`] on the guarded child.
    pub(crate) fn wait(&mut self, timeout: Duration) -> ExitStatus {
        wait_child(&mut self.0, timeout)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            self.0.kill().ok();
            self.0.wait().ok();
        }
    }
}

/// Wait for `child` to exit, at most `timeout`; on timeout kill it (by its own
/// pid) and fail the test.
pub(crate) fn wait_child(child: &mut Child, timeout: Duration) -> ExitStatus {
    let mut status = None;
    let exited = wait_until(timeout, || {
        status = child.try_wait().expect("try_wait");
        status.is_some()
    });
    if !exited {
        child.kill().ok();
        child.wait().ok();
        panic!("child {} did not exit within {timeout:?}", child.id());
    }
    status.expect("exit status")
}

/// Collects a child's stderr on a thread so the pipe never fills up.
pub(crate) struct Captured {
    text: Arc<Mutex<String>>,
    thread: Option<JoinHandle<()>>,
}

impl Captured {
    pub(crate) fn new(mut pipe: impl Read + Send + 'static) -> Captured {
        let text = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&text);
        let thread = thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => sink
                        .lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n])),
                }
            }
        });
        Captured {
            text,
            thread: Some(thread),
        }
    }

    /// Everything captured so far.
    pub(crate) fn text(&self) -> String {
        self.text.lock().unwrap().clone()
    }

    /// Wait until the captured text satisfies `cond`; returns whether it did.
    pub(crate) fn wait_for(&self, timeout: Duration, cond: impl Fn(&str) -> bool) -> bool {
        wait_until(timeout, || cond(&self.text.lock().unwrap()))
    }

    /// Everything, after the writer closed the pipe (call after the child exited).
    pub(crate) fn finish(mut self) -> String {
        if let Some(t) = self.thread.take() {
            // The child has exited, so the pipe is at EOF (unless a grandchild
            // kept it open: then give up after a bound rather than hang).
            if wait_until(Duration::from_secs(5), || t.is_finished()) {
                t.join().ok();
            }
        }
        self.text()
    }
}

/// Send `signal` (like "TERM") to process `pid`, from Rust (kill(2) through
/// rustix): the tests need no `kill` program, which minimal images lack.
pub(crate) fn send_signal(pid: u32, signal: &str) {
    use rustix::process::{Pid, Signal, kill_process};
    let sig = match signal {
        "TERM" => Signal::TERM,
        "INT" => Signal::INT,
        "HUP" => Signal::HUP,
        "KILL" => Signal::KILL,
        "STOP" => Signal::STOP,
        "CONT" => Signal::CONT,
        other => panic!("send_signal: unknown signal {other}"),
    };
    let pid = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .unwrap_or_else(|| panic!("send_signal: bad pid {pid}"));
    kill_process(pid, sig).unwrap_or_else(|e| panic!("kill -{signal} {pid:?}: {e}"));
}

/// A port on 127.0.0.1 that was free a moment ago (bind port 0, read it, drop).
pub(crate) fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A loopback port below the kernel's ephemeral range, free a moment ago.
/// No `connect` or port-0 bind anywhere on the machine picks such a port, so
/// unlike one from [`free_port`] it stays free until the engine binds
/// it even while other tests make thousands of connections. Falls back to
/// [`free_port`] where the range cannot be read.
pub(crate) fn fixed_port() -> u16 {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU32, Ordering};
    static LOW: OnceLock<Option<u16>> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let Some(low) = *LOW.get_or_init(|| {
        let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
        range.split_whitespace().next()?.parse().ok()
    }) else {
        return free_port();
    };
    // Downwards from below the range; test binaries that run at the same
    // time start at different places.
    let start = u32::from(low).saturating_sub(1 + (std::process::id() % 8) * 1000);
    if start <= 2048 {
        return free_port();
    }
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(start - n % (start - 1024)).unwrap();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// `engine.stats()` differences are easier to read as one line.
pub(crate) fn brief(s: &StatsSnapshot) -> String {
    format!(
        "conns={} accepted={} closed={} in={} out={} lent={} paused_limit={} paused_fd={} idle={} turns={}",
        s.connections,
        s.accepted_total,
        s.closed_total,
        s.bytes_in_total,
        s.bytes_out_total,
        s.buffers_lent,
        s.accept_paused_limit_total,
        s.accept_paused_fd_total,
        s.idle_timeouts_total,
        s.turns_total,
    )
}

/// Why this test process runs under user-mode emulation (qemu-user, as
/// `../shared/arm-check` runs the ARM suite), or `None` on real hardware.
/// qemu-user reports the guest architecture from `uname`, but not from
/// `/proc/sys/kernel/arch`, which still names the host's.
pub(crate) fn emulated() -> Option<String> {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/arch").ok()?;
    let kernel = kernel.trim();
    let ours = std::env::consts::ARCH;
    let native = kernel == ours || (ours == "arm" && kernel.starts_with("arm"));
    (!native).then(|| format!("{ours} code on a {kernel} kernel (user-mode emulation)"))
}

/// Skip the rest of a test under user-mode emulation, saying why (the
/// message shows with `--nocapture` and in the test's captured output).
#[allow(unused_macros, reason = "each test binary uses a different subset")]
macro_rules! skip_if_emulated {
    ($why:expr) => {
        if let Some(how) = crate::util::emulated() {
            eprintln!("SKIPPED under {how}: {}", $why);
            return;
        }
    };
}
#[allow(unused_imports, reason = "each test binary uses a different subset")]
pub(crate) use skip_if_emulated;

/// A workload size: `n` on real hardware, `n / div` (at least 1) under
/// user-mode emulation, where everything runs several times slower.
pub(crate) fn scaled(n: usize, div: usize) -> usize {
    if emulated().is_some() {
        (n / div.max(1)).max(1)
    } else {
        n
    }
}
