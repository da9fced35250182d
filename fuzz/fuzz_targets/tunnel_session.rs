//! The tunnel roles over real loopback sockets: a fuzzed sequence of link
//! frames played at a running `TunnelServer` (as if from an agent) or at a
//! running `TunnelAgent` (as if from a server), with public clients and the
//! agent's local echo service taking part. One engine runs for the whole
//! fuzzing process; every input is one link session. Any panic on the engine
//! thread aborts the process (libfuzzer-sys installs an aborting panic hook),
//! so libFuzzer reports it with the input that was being played; the target
//! also fails if the engine thread has returned, stops answering, or keeps
//! connections or file descriptors after the sessions are over, and on any
//! frame from the engine that breaks a rule of docs/PROTOCOL.md the harness
//! can check (see [`Checker`]).
//!
//! # Input
//!
//! Byte 0 picks the session, the rest is a stream of tunnel frames
//! (`[size: u16][command][id][payload]`, exactly the wire format; a trailing
//! partial frame is written as is at the end).
//!
//! | byte 0 bits | server session (bit 0 = 0)           | agent session (bit 0 = 1) |
//! |-------------|--------------------------------------|---------------------------|
//! | 1-2         | preamble: 0 none, 1 empty LISTEN, 2 extension request for `open`, 3 extension request for `secure` + AUTH | agent: 0 base (`extensions = false`), 1 extended `open`, 2 extended `secure` with a token, 3 as 1 |
//! | 3           | -                                    | preamble: HELLO + READY (both filled in, see below) |
//!
//! Frames are sent as they are, except:
//!
//! - server session: an AUTH with an empty payload carries the correct tag
//!   for the HELLO the server sent (token `secret-0123456789`); the first LISTEN with a
//!   payload waits (briefly) for the server's HELLO or REJECT.
//! - agent session: a HELLO with an empty payload is a valid HELLO granting
//!   every extension the agent asked for (a 2-byte payload: those flags, as
//!   far as asked for); a READY with an empty payload after a HELLO that
//!   granted AUTH carries the correct server tag; a CONNECT whose target
//!   (after the PEER_ADDR prefix, when granted) is `@e` names the echo
//!   service, `@d` a closed port, `@s` the tunnel server's own link port
//!   (all three on the agent's allowlist).
//! - commands 0xF0..=0xF8 are harness actions, not sent (see the table).
//!
//! Waits for answers the engine owes (HELLO after a request, CONNECT after
//! OPEN, a public port) give up after 20 ms, and after 30 ms in all per
//! input; at the end the harness half-closes the link and reads until the
//! engine closes it (at most 200 ms, else the echo probe). The base agent's
//! links have a small receive buffer. `TUNNEL_SESSION_TRACE=1` prints the
//! frames each way, `=debug` / `=trace` the engine's log as well.
//!
//!
//! | command | action |
//! |---------|--------|
//! | 0xF0 OPEN    | server: connect a public client to service `open` (id bit 0 clear) or `secure` (set) and wait for its CONNECT; id bit 1: the client has a small receive buffer |
//! | 0xF1 SEND    | server: public client `id % n` writes the payload |
//! | 0xF2 SHUT    | server: public client `id % n` shuts down its sending side |
//! | 0xF3 DROP    | server: public client `id % n` closes |
//! | 0xF4 SYNC    | read the link for `1 + id % 20` ms |
//! | 0xF5 PAUSE   | sleep `id % 21` ms (at most 40 ms per input) |
//! | 0xF6 RAW     | write the payload to the link as raw bytes |
//! | 0xF7 REPEAT  | write the previous frame again `id` times (at most 1 MiB written to the link per input) |
//! | 0xF8 READ    | server: read what public client `id % n` has (1 ms) |
#![no_main]

use std::borrow::Cow;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use libfuzzer_sys::fuzz_target;
use sha2::Sha256;
use switchboard::codec::Decoded;
use switchboard::codec::tunnel::{
    self, Command, Hello, ListenRequest, MAC_LEN, MAX_PAYLOAD, NONCE_LEN, TunnelDecoder,
    TunnelFrame, ext,
};
use switchboard::role::{Echo, TunnelAgent, TunnelServer, TunnelStats};
use switchboard::{Config, Engine, EngineError, Handle};

// Harness actions (see the module docs).
const OPEN: u8 = 0xF0;
const SEND: u8 = 0xF1;
const SHUT: u8 = 0xF2;
const DROP: u8 = 0xF3;
const SYNC: u8 = 0xF4;
const PAUSE: u8 = 0xF5;
const RAW: u8 = 0xF6;
const REPEAT: u8 = 0xF7;
const READ: u8 = 0xF8;

/// The token of service `secure` (and of the `secure` agent).
const TOKEN: &[u8] = b"secret-0123456789";
/// What the harness waits for an answer the engine owes at once.
const WAIT: Duration = Duration::from_millis(20);
/// What one session may spend in such waits that time out (a session whose
/// link is not up would otherwise wait `WAIT` for every OPEN).
const WAIT_BUDGET: Duration = Duration::from_millis(30);
/// What the harness waits at the end of a session for the link to close.
const END_WAIT: Duration = Duration::from_millis(200);
/// An agent reconnects within `reconnect_max` (5 ms); this much is a hang.
const AGENT_WAIT: Duration = Duration::from_secs(5);
/// How long the engine may take to answer the echo probe before it counts as stuck.
const PROBE_WAIT: Duration = Duration::from_secs(5);
/// Bytes the harness writes to a link per input (REPEAT), which bounds the
/// time an input takes. (Not enough to outgrow the kernel's socket buffers,
/// which grow to 4 MiB on loopback: the base-mode stall timeout is out of reach.)
const MAX_LINK_BYTES: usize = 1 << 20;
/// Public clients per server session.
const MAX_CLIENTS: usize = 8;
/// Total sleep per input (PAUSE).
const MAX_PAUSE: Duration = Duration::from_millis(40);
/// Connections the engine may hold between sessions (agent links in their
/// handshake, connections lingering); far more is a leak.
const MAX_IDLE_CONNECTIONS: u64 = 256;
/// Open file descriptors the process may have between sessions.
const MAX_FDS: usize = 1024;
/// `SO_RCVBUF` of a "slow" public client (OPEN id bit 1) and of the links the
/// base agent dials in (it has no credit: its send queues can fill).
const SMALL_RCVBUF: usize = 4096;
/// The window the harness grants in its HELLO, and its nonce.
const HARNESS_WINDOW: u32 = 2048;
const HARNESS_NONCE: [u8; NONCE_LEN] = *b"harness-nonce-16";

/// The running engine and what the sessions need to reach it.
struct Harness {
    thread: Mutex<Option<JoinHandle<Result<(), EngineError>>>>,
    handle: Handle,
    /// The server's link listener.
    link: SocketAddr,
    server: Arc<TunnelStats>,
    agents: Vec<AgentSlot>,
    echo: SocketAddr,
    dead: SocketAddr,
    last_report: Mutex<(Instant, u64)>,
}

/// One agent role and the listener it dials (the harness is its server).
struct AgentSlot {
    listener: TcpListener,
    stats: Arc<TunnelStats>,
    name: &'static str,
    extensions: bool,
    token: Option<&'static [u8]>,
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(start_engine)
}

/// A loopback address nobody listens on (bound, then released).
fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr")
}

fn start_engine() -> Harness {
    // What a Rust `main` does before it runs, and the switchboard binary
    // relies on: the engine writes with writev(2), which raises SIGPIPE on a
    // connection the peer has reset. libFuzzer's C++ `main` leaves SIGPIPE's
    // default action (terminate), so without this the first such write kills
    // the fuzzer silently (exit status 141, no crash report).
    // SAFETY: setting a signal disposition to SIG_IGN before other threads exist.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    trace(); // installs the logger first, if asked for
    let echo = free_addr();
    let dead = free_addr();
    let link = free_addr();
    let specs: [(&str, bool, Option<&[u8]>); 3] = [
        ("", false, None),
        ("open", true, None),
        ("secure", true, Some(TOKEN)),
    ];
    let listeners: Vec<TcpListener> = specs
        .iter()
        .map(|&(_, extensions, _)| {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .expect("socket");
            if !extensions {
                // Inherited by the accepted links: the agent's link queue can fill.
                s.set_recv_buffer_size(SMALL_RCVBUF).expect("SO_RCVBUF");
            }
            let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
            s.bind(&any.into()).expect("bind agent server");
            s.listen(16).expect("listen");
            let l: TcpListener = s.into();
            l.set_nonblocking(true).expect("nonblocking");
            l
        })
        .collect();
    let mut toml = format!(
        r#"
[engine]
max_connections = 1024
linger = "100ms"
connect_timeout = "1s"

[[echo]]
name = "echo"
listen = "{echo}"

[[tunnel_server]]
name = "server"
listen = "{link}"
max_streams = 4
window = 2048
max_data = 1024
max_frame = 65535
heartbeat_interval = "10ms"
heartbeat_timeout = "50ms"
handshake_timeout = "20ms"
max_pending = 8
id_quarantine = "5ms"
stall_timeout = "20ms"

[[tunnel_server.service]]
name = "open"
public = "127.0.0.1:0"

[[tunnel_server.service]]
name = "secure"
public = "127.0.0.1:0"
token = "{token}"
"#,
        token = std::str::from_utf8(TOKEN).expect("utf-8 token"),
    );
    for ((name, extensions, token), l) in specs.iter().zip(&listeners) {
        let server = l.local_addr().expect("local_addr");
        let token_line = token.map_or_else(String::new, |t| {
            format!("token = \"{}\"\n", std::str::from_utf8(t).expect("utf-8"))
        });
        toml.push_str(&format!(
            r#"
[[tunnel_agent]]
name = "{name}"
server = "{server}"
local = "{echo}"
allow = ["{echo}", "{dead}", "{link}"]
extensions = {extensions}
{token_line}max_streams = 4
window = 2048
max_data = 1024
max_frame = 65535
heartbeat_interval = "10ms"
heartbeat_timeout = "50ms"
connect_timeout = "100ms"
reconnect_min = "1ms"
reconnect_max = "5ms"
stall_timeout = "20ms"
"#
        ));
    }
    let config = Config::parse(&toml).unwrap_or_else(|e| panic!("harness config: {e}"));
    let mut engine = Engine::new(config.engine.clone()).expect("engine");
    engine.add_role(Box::new(Echo::new(&config.echo[0])));
    let server = TunnelServer::new(&config.tunnel_server[0]);
    let server_stats = server.stats();
    engine.add_role(Box::new(server));
    let mut agents = Vec::new();
    for ((cfg, (name, extensions, token)), listener) in
        config.tunnel_agent.iter().zip(specs).zip(listeners)
    {
        let agent = TunnelAgent::new(cfg);
        agents.push(AgentSlot {
            listener,
            stats: agent.stats(),
            name,
            extensions,
            token,
        });
        engine.add_role(Box::new(agent));
    }
    engine.start().expect("engine start");
    let handle = engine.handle();
    let thread = thread::Builder::new()
        .name("engine".into())
        .spawn(move || engine.run())
        .expect("spawn the engine thread");
    Harness {
        thread: Mutex::new(Some(thread)),
        handle,
        link,
        server: server_stats,
        agents,
        echo,
        dead,
        last_report: Mutex::new((Instant::now(), 0)),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, stream)) = data.split_first() else {
        return;
    };
    let h = harness();
    let started = Instant::now();
    if trace() {
        eprintln!("  {:>10.3?} session {mode:#04x}", stamp());
    }
    if mode & 1 == 0 {
        server_session(h, (mode >> 1) & 3, stream);
    } else {
        agent_session(h, usize::from((mode >> 1) & 3) % 3, mode & 8 != 0, stream);
    }
    if trace() {
        eprintln!("tunnel_session: mode {mode:#04x}: {:?}", started.elapsed());
    }
    after_session(h);
});

// ===== checks =====

/// Fail if the engine thread has returned or panicked.
fn check_engine_alive(h: &Harness) {
    let mut slot = h.thread.lock().unwrap_or_else(|e| e.into_inner());
    if slot.as_ref().is_some_and(JoinHandle::is_finished) {
        let thread = slot.take().expect("checked");
        match thread.join() {
            Ok(Ok(())) => panic!("the engine thread returned (stopped) during fuzzing"),
            Ok(Err(e)) => panic!("the engine thread failed: {e}"),
            Err(_) => panic!("the engine thread panicked"),
        }
    }
    assert!(slot.is_some(), "the engine thread is gone");
}

/// Fail unless the engine answers on its echo port within `PROBE_WAIT`.
fn check_engine_responsive(h: &Harness) {
    check_engine_alive(h);
    let probe = || -> std::io::Result<()> {
        let mut s = TcpStream::connect_timeout(&h.echo, PROBE_WAIT)?;
        s.set_read_timeout(Some(PROBE_WAIT))?;
        s.set_write_timeout(Some(PROBE_WAIT))?;
        s.write_all(b"?")?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        Ok(())
    };
    if let Err(e) = probe() {
        check_engine_alive(h);
        panic!("the engine does not answer its echo port within {PROBE_WAIT:?}: {e}");
    }
}

/// `TUNNEL_SESSION_TRACE=1`: print every frame each way and the counters
/// after every session (for checking what a seed does); `=debug` or
/// `=trace`: the engine's and the roles' log at that level too.
fn trace() -> bool {
    static T: OnceLock<bool> = OnceLock::new();
    *T.get_or_init(|| {
        let Some(v) = std::env::var_os("TUNNEL_SESSION_TRACE") else {
            return false;
        };
        let level = match v.to_str() {
            Some("debug") => Some(log::LevelFilter::Debug),
            Some("trace") => Some(log::LevelFilter::Trace),
            _ => None,
        };
        if let Some(level) = level {
            let config = simplelog::ConfigBuilder::new()
                .set_time_level(log::LevelFilter::Off)
                .build();
            let _ = simplelog::WriteLogger::init(level, config, std::io::stderr());
        }
        v != "0"
    })
}

/// Time since the process started, for trace lines.
fn stamp() -> Duration {
    static T0: OnceLock<Instant> = OnceLock::new();
    T0.get_or_init(Instant::now).elapsed()
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count)
}

/// Between sessions: the engine is alive and holds no pile of connections.
fn after_session(h: &Harness) {
    check_engine_alive(h);
    let idle = || h.handle.connections() <= MAX_IDLE_CONNECTIONS && open_fds() <= MAX_FDS;
    if !idle() && !wait_until(Duration::from_secs(2), idle) {
        panic!(
            "after the session the engine holds {} connections and the process {} fds (limits {MAX_IDLE_CONNECTIONS}, {MAX_FDS}): leak?",
            h.handle.connections(),
            open_fds()
        );
    }
    let mut last = h.last_report.lock().unwrap_or_else(|e| e.into_inner());
    last.1 += 1;
    if trace() || last.0.elapsed() >= Duration::from_secs(10) {
        *last = (Instant::now(), last.1);
        report(h, last.1);
    }
}

/// A line of counters on stderr, so a run shows which paths the sessions reach.
fn report(h: &Harness, inputs: u64) {
    let c = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let s = &h.server;
    eprintln!(
        "tunnel_session: {inputs} sessions; engine conns {} fds {}; server links_total {} streams_total {} refused {} rejected {} auth_failed {} unknown {} malformed {} stale {} credit_viol {} stalled {}",
        h.handle.connections(),
        open_fds(),
        c(&s.links_total),
        c(&s.streams_total),
        c(&s.refused_total),
        c(&s.rejected_total),
        c(&s.auth_failed_total),
        c(&s.unknown_total),
        c(&s.malformed_total),
        c(&s.stale_total),
        c(&s.credit_violations_total),
        c(&s.stalled_total),
    );
    for a in &h.agents {
        let s = &a.stats;
        eprintln!(
            "tunnel_session:   agent '{}': links_total {} reconnects {} streams_total {} refused {} rejected {} auth_failed {} unknown {} malformed {} stale {} credit_viol {}",
            a.name,
            c(&s.links_total),
            c(&s.reconnects_total),
            c(&s.streams_total),
            c(&s.refused_total),
            c(&s.rejected_total),
            c(&s.auth_failed_total),
            c(&s.unknown_total),
            c(&s.malformed_total),
            c(&s.stale_total),
            c(&s.credit_violations_total),
        );
    }
}

fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_micros(50);
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return cond();
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(2));
    }
}

// ===== frames =====

fn frame(command: u8, id: u8, payload: &[u8]) -> Vec<u8> {
    let head = tunnel::header(Command::from_u8(command), id, payload.len())
        .expect("payloads come from the tunnel decoder: at most 65 535 bytes");
    let mut v = Vec::with_capacity(head.len() + payload.len());
    v.extend_from_slice(&head);
    v.extend_from_slice(payload);
    v
}

/// Call `f(command, id, payload)` for each whole frame of `stream`; returns
/// the trailing partial frame.
fn for_each_frame<'a>(mut stream: &'a [u8], mut f: impl FnMut(u8, u8, &[u8])) -> &'a [u8] {
    let mut decoder = TunnelDecoder::new(MAX_PAYLOAD);
    while let Ok(Decoded::Frame(fr, used)) = decoder.decode(stream) {
        let t = TunnelFrame::parse(fr.raw).expect("decoded frames parse");
        f(t.command.to_u8(), t.id, t.payload);
        stream = &stream[used..];
    }
    stream
}

fn hmac(label: &[u8], first: &[u8], second: &[u8], flags: u16, name: &[u8]) -> [u8; MAC_LEN] {
    let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(TOKEN).expect("any key length");
    m.update(label);
    m.update(first);
    m.update(second);
    m.update(&flags.to_be_bytes());
    m.update(name);
    m.finalize().into_bytes().into()
}

/// The agent's AUTH tag (docs/PROTOCOL.md §4.1).
fn agent_tag(agent_nonce: &[u8], server_nonce: &[u8], flags: u16, name: &[u8]) -> [u8; MAC_LEN] {
    hmac(
        b"switchboard-tunnel-v1 agent",
        agent_nonce,
        server_nonce,
        flags,
        name,
    )
}

/// The server's READY tag.
fn server_tag(agent_nonce: &[u8], server_nonce: &[u8], flags: u16, name: &[u8]) -> [u8; MAC_LEN] {
    hmac(
        b"switchboard-tunnel-v1 server",
        server_nonce,
        agent_nonce,
        flags,
        name,
    )
}

fn listen_request(flags: u16, name: &str) -> Vec<u8> {
    let req = ListenRequest {
        flags,
        window: 4096,
        nonce: *b"agent-nonce-0016",
        name: name.as_bytes(),
    };
    let mut v = Vec::new();
    req.encode(&mut v).expect("a short name encodes");
    v
}

// ===== the harness end of a link =====

struct Link {
    sock: TcpStream,
    rx: Vec<u8>,
    decoder: TunnelDecoder,
    scratch: Vec<u8>,
    /// Read EOF (or an error): the engine closed the link.
    eof: bool,
    /// A write failed or timed out: nothing more is written.
    broken: bool,
    /// Bytes written so far (at most `MAX_LINK_BYTES`).
    written: usize,
    /// The protocol rules every frame from the engine must keep.
    check: Checker,
}

impl Link {
    fn new(sock: TcpStream, check: Checker) -> Link {
        let _ = sock.set_nodelay(true);
        let _ = sock.set_nonblocking(false);
        let _ = sock.set_write_timeout(Some(Duration::from_millis(50)));
        Link {
            sock,
            rx: Vec::new(),
            decoder: TunnelDecoder::new(MAX_PAYLOAD),
            scratch: vec![0; 64 * 1024],
            eof: false,
            broken: false,
            written: 0,
            check,
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        if self.broken || bytes.is_empty() || self.written + bytes.len() > MAX_LINK_BYTES {
            return;
        }
        self.written += bytes.len();
        if self.sock.write_all(bytes).is_err() {
            self.broken = true;
        }
    }

    /// Read frames until `want` accepts one (true), EOF or `timeout` (false).
    fn read_until(
        &mut self,
        timeout: Duration,
        mut want: impl FnMut(&TunnelFrame<'_>) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            loop {
                match self.decoder.decode(&self.rx) {
                    Ok(Decoded::Frame(f, used)) => {
                        let hit = TunnelFrame::parse(f.raw).is_some_and(|t| {
                            if trace() {
                                eprintln!(
                                    "  {:>10.3?} <- {:?} id {} {:02x?}",
                                    stamp(),
                                    t.command,
                                    t.id,
                                    t.payload.get(..32).unwrap_or(t.payload)
                                );
                            }
                            self.check.received(&t);
                            want(&t)
                        });
                        self.rx.drain(..used);
                        if hit {
                            return true;
                        }
                    }
                    Ok(_) => break,
                    Err(e) => panic!("the engine sent a frame the decoder refuses: {e}"),
                }
            }
            if self.eof || !readable(&self.sock, deadline) {
                return false;
            }
            match self.sock.read(&mut self.scratch) {
                Ok(0) => self.eof = true,
                Ok(n) => self.rx.extend_from_slice(&self.scratch[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(_) => self.eof = true,
            }
        }
    }

    /// End of the session: half-close, then read until the engine closes.
    fn finish(&mut self) -> bool {
        if trace() {
            eprintln!("  {:>10.3?} finish", stamp());
        }
        let _ = self.sock.shutdown(Shutdown::Write);
        self.read_until(END_WAIT, |_| false);
        if trace() {
            eprintln!("  {:>10.3?} finish: eof {}", stamp(), self.eof);
        }
        self.eof
    }
}

/// Wait until `sock` has something to read (data, EOF or an error) or
/// `deadline` passes. poll(2) sleeps on a high-resolution timer; socket
/// read timeouts (`SO_RCVTIMEO`) are rounded up to whole jiffies (4-10 ms),
/// which would dominate every short wait.
fn readable(sock: &TcpStream, deadline: Instant) -> bool {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ts = libc::timespec {
            tv_sec: left.as_secs() as libc::time_t,
            tv_nsec: libc::c_long::from(left.subsec_nanos() as i32),
        };
        let mut fd = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, a valid timespec, no signal mask.
        let n = unsafe { libc::ppoll(&mut fd, 1, &ts, std::ptr::null()) };
        match n {
            1.. => return true,
            0 => return false,
            _ if std::io::Error::last_os_error().kind() == ErrorKind::Interrupted => {}
            _ => return true, // let the read report it
        }
    }
}

/// Harness actions both sessions share; returns true if `command` was one.
struct Common {
    link: Link,
    last: Vec<u8>,
    paused: Duration,
    /// What is left of `WAIT_BUDGET`.
    budget: Duration,
}

impl Common {
    fn new(sock: TcpStream, check: Checker) -> Common {
        Common {
            link: Link::new(sock, check),
            last: Vec::new(),
            paused: Duration::ZERO,
            budget: WAIT_BUDGET,
        }
    }

    /// Wait (within the budget) for something the engine owes; `f` gets the
    /// time it may take and says whether it came.
    fn owed(&mut self, f: impl FnOnce(&mut Link, Duration) -> bool) -> bool {
        let started = Instant::now();
        let came = f(&mut self.link, WAIT.min(self.budget));
        if !came {
            self.budget = self.budget.saturating_sub(started.elapsed());
            if trace() {
                eprintln!(
                    "  {:>10.3?} (not owed after all; budget left {:?})",
                    stamp(),
                    self.budget
                );
            }
        }
        came
    }

    fn action(&mut self, command: u8, id: u8, payload: &[u8]) -> bool {
        if trace() && command >= OPEN && command <= READ {
            eprintln!("  {:>10.3?} action {command:#04x} id {id}", stamp());
        }
        match command {
            SYNC => {
                let ms = 1 + u64::from(id % 20);
                self.link.read_until(Duration::from_millis(ms), |_| false);
            }
            PAUSE => {
                let want = Duration::from_millis(u64::from(id % 21));
                let d = want.min(MAX_PAUSE.saturating_sub(self.paused));
                self.paused += d;
                thread::sleep(d);
            }
            RAW => {
                // Raw bytes may hold frames, or shift the framing: what the
                // engine reads is no longer known frame by frame.
                self.link.check.exact = false;
                self.link.write(payload);
            }
            REPEAT => {
                let last = std::mem::take(&mut self.last);
                if let Some(f) = TunnelFrame::parse(&last) {
                    for _ in 0..id {
                        self.link.check.sent(f.command, f.id, f.payload);
                        self.link.write(&last);
                    }
                }
                self.last = last;
            }
            _ => return false,
        }
        true
    }

    fn send(&mut self, command: u8, id: u8, payload: &[u8]) {
        let bytes = frame(command, id, payload);
        if trace() {
            let shown = payload.get(..32).unwrap_or(payload);
            eprintln!(
                "  {:>10.3?} -> {:?} id {id} {shown:02x?}",
                stamp(),
                Command::from_u8(command)
            );
        }
        self.link.check.sent(Command::from_u8(command), id, payload);
        self.link.write(&bytes);
        self.last = bytes;
    }
}

// ===== protocol rules (docs/PROTOCOL.md) checked on what the engine sends =====

/// Largest DATA payload either role sends (`max_data` in the harness config).
const MAX_DATA: usize = 1024;

/// Which role the harness talks to.
enum Peer {
    /// The tunnel server (the harness is its agent).
    Server,
    /// A tunnel agent (the harness is its server); its counters tell the
    /// extension bits in force once its link is up.
    Agent(Arc<TunnelStats>),
}

/// What the harness knows of one client id.
#[derive(Default, Clone, Copy)]
struct Id {
    /// CONNECTs for the id: received (server session) or sent (agent session).
    connects: u32,
    /// Agent session: CLOSEs the agent sent for the id.
    closes: u32,
    /// Server session: the server's stream is open (CONNECT seen; neither
    /// side's CLOSE since).
    open: bool,
    /// Server session: the server sent CLOSE since its last CONNECT.
    closed_by_peer: bool,
    /// With CLOSE_ACK: the server's CLOSE is not acknowledged yet.
    unacked: bool,
    /// The peer sent SHUTDOWN (no more DATA until its CLOSE / a new CONNECT).
    shut_by_peer: bool,
    /// DATA payload bytes the peer sent for the id (all streams it had).
    data: u64,
    /// WINDOW increments the harness sent for the id.
    window_sent: u64,
}

/// Checks every frame the engine sends on the link against the rules of
/// docs/PROTOCOL.md, as far as the harness can know them: a breach panics
/// with the rule. Rules that depend on what the engine has read from the
/// harness are only checked while the harness knows that exactly (no RAW
/// bytes sent), and are upper bounds that in-flight frames cannot break.
struct Checker {
    peer: Peer,
    /// Every frame the harness sent is known (no RAW bytes).
    exact: bool,
    /// Server session: the flags asked for in the first LISTEN (a request).
    asked: Option<u16>,
    /// Server session: the service asked for needs a token.
    wants_auth: bool,
    /// The window the peer was given for its DATA on each new stream
    /// (server session: the LISTEN request's; agent session: the HELLO's).
    peer_window: Option<u32>,
    /// The HELLO seen (server session: received; agent session: the first sent).
    hello: Option<Hello>,
    /// Per client id.
    ids: Vec<Id>,
}

impl Checker {
    fn new(peer: Peer) -> Checker {
        Checker {
            peer,
            exact: true,
            asked: None,
            wants_auth: false,
            peer_window: None,
            hello: None,
            ids: vec![Id::default(); 256],
        }
    }

    /// The extension bits in force, if the link is known to be up with them.
    fn flags(&self) -> Option<u16> {
        match &self.peer {
            // The server's flags are what its HELLO granted; without a HELLO
            // (an empty LISTEN) the link is base.
            Peer::Server => Some(self.hello.map_or(0, |h| h.flags)),
            Peer::Agent(stats) => match stats.agent() {
                Some((switchboard::role::AgentState::Up, _, flags)) => Some(flags),
                _ => None,
            },
        }
    }

    fn violation(&self, rule: &str, f: &TunnelFrame<'_>) -> ! {
        let who = match self.peer {
            Peer::Server => "the tunnel server",
            Peer::Agent(_) => "the tunnel agent",
        };
        panic!(
            "protocol violation by {who}: {rule} (frame {:?} id {} payload {} bytes {:02x?})",
            f.command,
            f.id,
            f.payload.len(),
            f.payload.get(..32).unwrap_or(f.payload)
        );
    }

    /// A frame the harness wrote to the link.
    fn sent(&mut self, command: Command, id: u8, payload: &[u8]) {
        let st = &mut self.ids[usize::from(id)];
        match (&self.peer, command) {
            (Peer::Server, Command::Listen) if self.asked.is_none() && self.hello.is_none() => {
                if let Some(req) = ListenRequest::parse(payload) {
                    self.asked = Some(req.flags);
                    self.wants_auth = req.name == b"secure";
                    self.peer_window = Some(req.window);
                }
            }
            (Peer::Server, Command::Close) => {
                st.open = false;
                st.unacked = false;
            }
            (Peer::Agent(_), Command::Connect) => st.connects += 1,
            (Peer::Agent(_), Command::Hello) if self.hello.is_none() => {
                self.hello = Hello::parse(payload);
                self.peer_window = self.hello.map(|h| h.window);
            }
            (_, Command::Window) => {
                if let Some(inc) = tunnel::parse_window(payload) {
                    st.window_sent += u64::from(inc);
                }
            }
            _ => {}
        }
    }

    /// A frame the engine sent.
    fn received(&mut self, f: &TunnelFrame<'_>) {
        let link_level = matches!(
            f.command,
            Command::Listen
                | Command::Hello
                | Command::Auth
                | Command::Ready
                | Command::Reject
                | Command::Ping
                | Command::Pong
        );
        if link_level && f.id != 0 {
            self.violation("link-level commands carry client id 0", f);
        }
        if let Command::Unknown(_) = f.command {
            self.violation("only known commands are sent", f);
        }
        let flags = self.flags();
        let granted = |bit: u16| flags.is_none_or(|fl| fl & bit != 0);
        match f.command {
            Command::Window if !granted(ext::CREDIT) => self.violation("WINDOW without CREDIT", f),
            Command::Window if tunnel::parse_window(f.payload).is_none() => {
                self.violation("WINDOW payload is a u32 >= 1", f)
            }
            Command::Shutdown if !granted(ext::HALF_CLOSE) => {
                self.violation("SHUTDOWN without HALF_CLOSE", f)
            }
            Command::Ping if !granted(ext::HEARTBEAT) => {
                self.violation("PING without HEARTBEAT", f)
            }
            Command::Ping | Command::Pong if f.payload.len() != tunnel::PING_LEN => {
                self.violation("PING / PONG carry 8 bytes", f)
            }
            Command::Data if f.payload.is_empty() || f.payload.len() > MAX_DATA => {
                self.violation("DATA carries 1..=max_data (1024) bytes", f)
            }
            _ => {}
        }
        match self.peer {
            Peer::Server => self.from_server(f, flags.unwrap_or(0)),
            Peer::Agent(_) => self.from_agent(f, flags),
        }
    }

    fn from_server(&mut self, f: &TunnelFrame<'_>, flags: u16) {
        let exact = self.exact;
        let close_ack = flags & ext::CLOSE_ACK != 0;
        let credit = flags & ext::CREDIT != 0;
        let window = self.peer_window;
        match f.command {
            Command::Listen | Command::Auth => self.violation("the server never sends this", f),
            Command::Hello => {
                if self.hello.is_some() {
                    self.violation("one HELLO per link", f);
                }
                let Some(h) = Hello::parse(f.payload) else {
                    self.violation("HELLO is well-formed", f)
                };
                if h.flags & !ext::ALL != 0 {
                    self.violation("HELLO grants only known extensions", f);
                }
                if exact && let Some(asked) = self.asked {
                    let asked = asked | ext::AUTH; // AUTH follows the service, not the request
                    if h.flags & !asked != 0 {
                        self.violation("HELLO grants a subset of what was asked for", f);
                    }
                    if (h.flags & ext::AUTH != 0) != self.wants_auth {
                        self.violation("AUTH is granted iff the service has a token", f);
                    }
                }
                if h.flags & ext::HALF_CLOSE != 0 && h.flags & ext::CLOSE_ACK == 0 {
                    self.violation("HALF_CLOSE only together with CLOSE_ACK", f);
                }
                self.hello = Some(h);
            }
            Command::Connect => {
                let st = self.ids[usize::from(f.id)];
                if exact && st.open {
                    self.violation("CONNECT for an id whose stream is open", f);
                }
                if exact && close_ack && st.unacked {
                    self.violation("CONNECT for an id whose CLOSE is not acknowledged", f);
                }
                let payload_ok = if flags & ext::PEER_ADDR != 0 {
                    tunnel::parse_peer(f.payload).is_some_and(|(_, target)| target.is_empty())
                } else {
                    f.payload.is_empty()
                };
                if !payload_ok {
                    self.violation("CONNECT carries the client address iff PEER_ADDR", f);
                }
                let st = &mut self.ids[usize::from(f.id)];
                st.connects += 1;
                st.open = true;
                st.closed_by_peer = false;
                st.unacked = false;
                st.shut_by_peer = false;
            }
            Command::Close => {
                let st = self.ids[usize::from(f.id)];
                if st.connects == 0 {
                    self.violation("CLOSE for an id that never had a stream", f);
                }
                let st = &mut self.ids[usize::from(f.id)];
                st.unacked = close_ack && st.open;
                st.open = false;
                st.closed_by_peer = true;
            }
            Command::Data => {
                let st = self.ids[usize::from(f.id)];
                if st.connects == 0 {
                    self.violation("DATA for an id that never had a stream", f);
                }
                if st.closed_by_peer {
                    self.violation("DATA after the server's own CLOSE", f);
                }
                if st.shut_by_peer {
                    self.violation("DATA after the server's own SHUTDOWN", f);
                }
                let st = &mut self.ids[usize::from(f.id)];
                st.data += f.payload.len() as u64;
                if exact
                    && credit
                    && let Some(w) = window
                {
                    let bound = u64::from(w) * u64::from(st.connects) + st.window_sent;
                    if st.data > bound {
                        let rule = format!(
                            "DATA beyond the credit given ({} bytes sent, window {w} x {} streams + {} in WINDOW)",
                            st.data, st.connects, st.window_sent
                        );
                        self.violation(&rule, f);
                    }
                }
            }
            Command::Shutdown => {
                let st = self.ids[usize::from(f.id)];
                if st.connects == 0 || st.closed_by_peer {
                    self.violation("SHUTDOWN for a stream the server does not have", f);
                }
                self.ids[usize::from(f.id)].shut_by_peer = true;
            }
            _ => {}
        }
    }

    fn from_agent(&mut self, f: &TunnelFrame<'_>, flags: Option<u16>) {
        let exact = self.exact;
        match f.command {
            Command::Connect | Command::Hello | Command::Ready | Command::Reject => {
                self.violation("the agent never sends this", f)
            }
            Command::Close => {
                let st = &mut self.ids[usize::from(f.id)];
                st.closes += 1;
                st.shut_by_peer = false;
                if exact && st.closes > st.connects {
                    self.violation("more CLOSEs than CONNECTs for an id", f);
                }
            }
            Command::Data => {
                let st = self.ids[usize::from(f.id)];
                if exact && st.connects <= st.closes {
                    self.violation(
                        "DATA for an id with no stream (closed, or never CONNECTed)",
                        f,
                    );
                }
                if st.shut_by_peer {
                    self.violation("DATA after the agent's own SHUTDOWN", f);
                }
                let st = &mut self.ids[usize::from(f.id)];
                st.data += f.payload.len() as u64;
                let credit = flags.is_some_and(|fl| fl & ext::CREDIT != 0);
                if exact
                    && credit
                    && let Some(w) = self.peer_window
                {
                    let st = self.ids[usize::from(f.id)];
                    let bound = u64::from(w) * u64::from(st.connects) + st.window_sent;
                    if st.data > bound {
                        let rule = format!(
                            "DATA beyond the credit given ({} bytes sent, window {w} x {} streams + {} in WINDOW)",
                            st.data, st.connects, st.window_sent
                        );
                        self.violation(&rule, f);
                    }
                }
            }
            Command::Shutdown => self.ids[usize::from(f.id)].shut_by_peer = true,
            _ => {}
        }
    }
}

// ===== server session: the harness is the agent =====

struct ServerSide<'h> {
    h: &'h Harness,
    c: Common,
    /// A LISTEN went out (the server answers only the first).
    listened: bool,
    /// The extension request sent: agent nonce and name.
    request: Option<([u8; NONCE_LEN], Vec<u8>)>,
    /// The server's HELLO.
    hello: Option<Hello>,
    clients: Vec<TcpStream>,
}

/// Connect to the server's link port from the next of 65,536 loopback
/// source addresses (127.1.0.0/16): the server throttles an address whose
/// handshakes keep failing (as fuzzed ones do), and each session must reach
/// the handshake code.
fn connect_link(link: SocketAddr) -> std::io::Result<TcpStream> {
    use std::sync::atomic::AtomicU32;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let [_, _, hi, lo] = n.to_be_bytes();
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.bind(&SocketAddr::from(([127, 1, hi, lo], 0)).into())?;
    s.connect_timeout(&link.into(), Duration::from_secs(2))?;
    Ok(s.into())
}

fn server_session(h: &Harness, preamble: u8, stream: &[u8]) {
    let sock = match connect_link(h.link) {
        Ok(s) => s,
        Err(e) => {
            check_engine_alive(h);
            panic!(
                "cannot connect to the tunnel server's link port {}: {e}",
                h.link
            );
        }
    };
    let mut s = ServerSide {
        h,
        c: Common::new(sock, Checker::new(Peer::Server)),
        listened: false,
        request: None,
        hello: None,
        clients: Vec::new(),
    };
    let listen = Command::Listen.to_u8();
    match preamble {
        1 => s.frame(listen, 0, &[]),
        2 => s.frame(listen, 0, &listen_request(ext::ALL & !ext::AUTH, "open")),
        3 => {
            s.frame(listen, 0, &listen_request(ext::ALL, "secure"));
            s.frame(Command::Auth.to_u8(), 0, &[]);
        }
        _ => {}
    }
    let tail = for_each_frame(stream, |cmd, id, payload| s.frame(cmd, id, payload));
    s.c.link.write(tail);
    // Clients first: a client that is not read can hold the link paused.
    s.clients.clear();
    let closed = s.c.link.finish();
    drop(s);
    let server = &h.server;
    let settled = wait_until(END_WAIT, || {
        server.links.load(Ordering::Relaxed) == 0 && server.streams.load(Ordering::Relaxed) == 0
    });
    if trace() {
        eprintln!("  {:>10.3?} settled {settled}", stamp());
    }
    if !closed || !settled {
        check_engine_responsive(h);
    }
}

impl ServerSide<'_> {
    fn frame(&mut self, command: u8, id: u8, payload: &[u8]) {
        if self.c.action(command, id, payload) {
            return;
        }
        match command {
            OPEN => self.open(id),
            SEND => {
                if let Some(c) = self.client(id) {
                    let _ = c.write_all(payload);
                }
            }
            SHUT => {
                if let Some(c) = self.client(id) {
                    let _ = c.shutdown(Shutdown::Write);
                }
            }
            DROP => {
                if !self.clients.is_empty() {
                    let i = usize::from(id) % self.clients.len();
                    self.clients.remove(i);
                }
            }
            READ => {
                if let Some(c) = self.client(id) {
                    let deadline = Instant::now() + Duration::from_millis(1);
                    let mut buf = [0u8; 16 * 1024];
                    while readable(c, deadline) && matches!(c.read(&mut buf), Ok(n) if n > 0) {}
                }
            }
            _ => self.send(command, id, payload),
        }
    }

    fn client(&mut self, id: u8) -> Option<&mut TcpStream> {
        let n = self.clients.len();
        (n > 0).then(|| &mut self.clients[usize::from(id) % n])
    }

    fn send(&mut self, command: u8, id: u8, payload: &[u8]) {
        let mut payload = Cow::Borrowed(payload);
        if command == Command::Auth.to_u8()
            && payload.is_empty()
            && let (Some((nonce, name)), Some(hello)) = (&self.request, &self.hello)
            && hello.flags & ext::AUTH != 0
        {
            payload = Cow::Owned(agent_tag(nonce, &hello.nonce, hello.flags, name).to_vec());
        }
        self.c.send(command, id, &payload);
        if command == Command::Listen.to_u8() && !self.listened {
            self.listened = true;
            if !payload.is_empty() {
                self.request = ListenRequest::parse(&payload).map(|r| (r.nonce, r.name.to_vec()));
                // The server answers a request at once: HELLO, or REJECT and close.
                let mut hello = None;
                self.c.owed(|link, wait| {
                    link.read_until(wait, |f| match f.command {
                        Command::Hello => {
                            hello = Hello::parse(f.payload);
                            true
                        }
                        Command::Reject => true,
                        _ => false,
                    }) || link.eof
                });
                self.hello = hello;
            }
        }
    }

    /// A public client for the service, once the service's port is open;
    /// waits for its CONNECT so that later frames find the stream.
    fn open(&mut self, id: u8) {
        if self.clients.len() >= MAX_CLIENTS || self.c.link.eof {
            return;
        }
        let service = if id & 1 == 0 { "open" } else { "secure" };
        let mut addr = None;
        let server = &self.h.server;
        self.c.owed(|_, wait| {
            wait_until(wait, || {
                addr = server.public_addr(service);
                addr.is_some()
            })
        });
        let Some(addr) = addr else { return };
        let Ok(c) = connect_client(addr, id & 2 != 0) else {
            return;
        };
        let _ = c.set_nodelay(true);
        let _ = c.set_write_timeout(Some(WAIT));
        self.clients.push(c);
        self.c.owed(|link, wait| {
            link.read_until(wait, |f| f.command == Command::Connect) || link.eof
        });
    }
}

/// A public client; `slow`: with a small receive buffer.
fn connect_client(addr: SocketAddr, slow: bool) -> std::io::Result<TcpStream> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    if slow {
        s.set_recv_buffer_size(SMALL_RCVBUF)?;
    }
    s.connect_timeout(&addr.into(), WAIT)?;
    Ok(s.into())
}

// ===== agent session: the harness is the server =====

struct AgentSide<'h> {
    h: &'h Harness,
    agent: &'h AgentSlot,
    c: Common,
    /// The agent's LISTEN request: flags asked for and its nonce.
    request: Option<(u16, [u8; NONCE_LEN])>,
    /// The first HELLO sent.
    hello: Option<Hello>,
}

/// Accept one connection within `timeout` (the listener is non-blocking).
fn accept_within(l: &TcpListener, timeout: Duration) -> Option<TcpStream> {
    let mut got = None;
    wait_until(timeout, || match l.accept() {
        Ok((s, _)) => {
            got = Some(s);
            true
        }
        Err(_) => false,
    });
    got
}

fn agent_session(h: &Harness, which: usize, handshake: bool, stream: &[u8]) {
    let agent = &h.agents[which];
    let Some(sock) = accept_within(&agent.listener, AGENT_WAIT) else {
        check_engine_responsive(h);
        panic!(
            "agent '{}' did not dial within {AGENT_WAIT:?} (reconnect_max is 5ms)",
            agent.name
        );
    };
    if trace() {
        eprintln!("  {:>10.3?} accepted", stamp());
    }
    let mut s = AgentSide {
        h,
        agent,
        c: Common::new(sock, Checker::new(Peer::Agent(Arc::clone(&agent.stats)))),
        request: None,
        hello: None,
    };
    let mut listen = None;
    s.c.link.read_until(Duration::from_secs(1), |f| {
        let hit = f.command == Command::Listen;
        if hit {
            listen = Some(f.payload.to_vec());
        }
        hit
    });
    let Some(listen) = listen else {
        check_engine_responsive(h);
        panic!(
            "agent '{}' connected but sent no LISTEN within 1 s (eof: {})",
            agent.name, s.c.link.eof
        );
    };
    // docs/PROTOCOL.md §2-3: a base agent sends an empty LISTEN, an extended
    // one a request for its name with every extension it can use.
    if agent.extensions {
        let req = ListenRequest::parse(&listen).unwrap_or_else(|| {
            panic!(
                "agent '{}' sent a malformed LISTEN request {listen:02x?}",
                agent.name
            )
        });
        assert_eq!(req.name, agent.name.as_bytes(), "LISTEN names the service");
        let want = if agent.token.is_some() {
            ext::ALL
        } else {
            ext::ALL & !ext::AUTH
        };
        assert_eq!(req.flags, want, "LISTEN flags of agent '{}'", agent.name);
        s.request = Some((req.flags, req.nonce));
    } else {
        assert!(listen.is_empty(), "a base agent's LISTEN is empty");
    }
    // A base agent's next link is up as soon as it has dialled again, so
    // "this link is gone" is "no link, or a newer one".
    let links_before = agent.stats.links_total.load(Ordering::Relaxed);
    if handshake {
        s.frame(Command::Hello.to_u8(), 0, &[]);
        s.frame(Command::Ready.to_u8(), 0, &[]);
    }
    let tail = for_each_frame(stream, |cmd, id, payload| s.frame(cmd, id, payload));
    s.c.link.write(tail);
    let closed = s.c.link.finish();
    drop(s);
    let stats = &agent.stats;
    let settled = wait_until(END_WAIT, || {
        let gone = stats.links.load(Ordering::Relaxed) == 0
            || stats.links_total.load(Ordering::Relaxed) > links_before;
        gone && stats.streams.load(Ordering::Relaxed) == 0
    });
    if trace() {
        eprintln!("  {:>10.3?} settled {settled}", stamp());
    }
    if !closed || !settled {
        check_engine_responsive(h);
    }
}

impl AgentSide<'_> {
    fn frame(&mut self, command: u8, id: u8, payload: &[u8]) {
        if self.c.action(command, id, payload) {
            return;
        }
        if matches!(command, OPEN | SEND | SHUT | DROP | READ) {
            return; // server-session actions
        }
        let payload = self.fill_in(command, payload);
        self.c.send(command, id, &payload);
    }

    /// The harness's substitutions (see the module docs).
    fn fill_in<'p>(&mut self, command: u8, payload: &'p [u8]) -> Cow<'p, [u8]> {
        match Command::from_u8(command) {
            Command::Hello => {
                let built = match (self.request, payload.len()) {
                    (Some((asked, _)), 0) => Some(asked),
                    (Some((asked, _)), 2) => {
                        Some(asked & u16::from_be_bytes([payload[0], payload[1]]))
                    }
                    _ => None,
                };
                let hello = match built {
                    Some(flags) => Some(Hello {
                        flags,
                        window: HARNESS_WINDOW,
                        nonce: HARNESS_NONCE,
                    }),
                    None => Hello::parse(payload),
                };
                if self.hello.is_none() {
                    self.hello = hello;
                }
                match built.and(hello) {
                    Some(h) => Cow::Owned(h.encode().to_vec()),
                    None => Cow::Borrowed(payload),
                }
            }
            Command::Ready if payload.is_empty() => {
                match (self.request, self.hello, self.agent.token) {
                    (Some((_, nonce)), Some(hello), Some(_)) if hello.flags & ext::AUTH != 0 => {
                        let name = self.agent.name.as_bytes();
                        Cow::Owned(server_tag(&nonce, &hello.nonce, hello.flags, name).to_vec())
                    }
                    _ => Cow::Borrowed(payload),
                }
            }
            Command::Connect => {
                let peer = self.hello.is_some_and(|h| h.flags & ext::PEER_ADDR != 0);
                let target = match tunnel::parse_peer(payload) {
                    Some((_, target)) if peer => target,
                    _ => payload,
                };
                let addr = match target {
                    b"@e" => self.h.echo,
                    b"@d" => self.h.dead,
                    b"@s" => self.h.link,
                    _ => return Cow::Borrowed(payload),
                };
                let mut out = payload[..payload.len() - target.len()].to_vec();
                out.extend_from_slice(addr.to_string().as_bytes());
                Cow::Owned(out)
            }
            _ => Cow::Borrowed(payload),
        }
    }
}
