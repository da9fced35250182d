//! Soak: every role at once in one engine, under mixed load with random
//! resets, for a bounded time. `SWITCHBOARD_SOAK_SECS` sets the load phase
//! (default 60 s; 5 for a quick look, 600 for a long run);
//! `SWITCHBOARD_SOAK_SEED` replays the random choices of a run (the seed is
//! printed at the start and in every failure).
//!
//! One engine holds an echo (the tunnel's local service), a broadcast feed
//! (line framing, `slow = "drop-oldest"`), a router (`identity = "id"`) with
//! [`CONNPTS`] application ports, a tunnel server and an agent linked to it
//! (token, extended protocol) and the admin endpoint. The ports are reserved
//! first (bound to port 0, noted, released) because the roles name each
//! other. The roles are built from parsed TOML so the test keeps their
//! counters.
//!
//! Load, on its own threads, all at once:
//! - router: devices come and go on random connpts (one worker per connpt at
//!   a time). A probe handshake proves the device online and its application
//!   attached (the application sends `p` until the device answers `A`, then
//!   `G`); then both sides exchange tagged, checksummed messages (direction,
//!   connpt, session, sequence) and every byte is checked in order: a message
//!   of another connpt or session fails at once. Sessions end normally (the
//!   application is sometimes kept for the next device, and sometimes the
//!   device too, which the next device then takes over: the router must
//!   close the old one), or with a device
//!   RST, a device FIN in the middle of a message (every byte written must
//!   still arrive), or an application RST; after a reset the receiver must
//!   hold a prefix of what was sent. Some devices send an unknown id.
//! - tunnel: streams through the public port to the echo, random sizes up to
//!   4 MiB, completed (half-close, or read back and close), closed early, or
//!   reset; the echo must be a prefix of what was sent, and all of it for a
//!   completed stream.
//! - broadcast: a publisher writes numbered, checksummed lines (and now and
//!   then reconnects); subscribers join, stall (with a small receive buffer,
//!   so their queue overflows), quit (after catching up, or at once with a
//!   RST); every record must be whole and in order, gaps are allowed only on
//!   a connection that stalled, and their sum is compared with the role's
//!   dropped counter.
//! - admin: `/healthz`, `/status` and `/metrics` in turn, each answered 200
//!   within [`ADMIN_BOUND`].
//!
//! The process's VmRSS is sampled every second. At the end: no worker saw a
//! wrong byte; the engine is back to its baseline connections (the tunnel
//! link) within seconds, no device is online and no stream open; the admin
//! counters equal what the test did (router identifications, tunnel streams
//! on both sides, broadcast records, and drops equal to the gaps seen); RSS
//! stayed under [`RSS_MAX`] and did not grow from the first third of the run
//! to the last by more than 25 % plus [`RSS_GROWTH`].

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly"
)]

mod util;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use socket2::SockRef;
use switchboard::role::broadcast::BroadcastStats;
use switchboard::role::{Admin, AgentState, Broadcast, Echo, Router, TunnelAgent, TunnelServer};
use switchboard::{Config, Role};

use util::{
    Pattern, TestEngine, brief, connect, connect_with_recv_buffer, is_timeout, wait_for, wait_until,
};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// Router connection points (each with its own application port).
const CONNPTS: usize = 8;
/// Threads running router sessions (fewer than [`CONNPTS`], so they also
/// move between connpts).
const ROUTER_WORKERS: usize = 4;
/// Threads opening tunnel streams, one stream at a time each.
const TUNNEL_WORKERS: usize = 3;
/// Broadcast subscriber threads, one connection at a time each.
const SUBSCRIBERS: usize = 3;
/// The tunnel service and its token.
const SERVICE: &str = "svc";
const TOKEN: &str = "soak-token-0123456789";
/// Bound on any one router session, tunnel stream or wait.
const LIMIT: Duration = Duration::from_secs(30);
/// Every admin request must be answered within this.
const ADMIN_BOUND: Duration = Duration::from_secs(3);
/// Ceiling on the process's VmRSS (engine and every client together).
const RSS_MAX: u64 = 200 * MIB;
/// Allowed growth of VmRSS from the first third of the load to the last,
/// besides 25 %: a leak of a few KiB per session or stream shows.
const RSS_GROWTH: u64 = 16 * MIB;
/// Connections the engine holds with no client: the tunnel link, counted at
/// both ends (the agent's outbound connection and the server's accepted one).
const BASELINE_CONNECTIONS: u64 = 2;
/// Broadcast queue bound per subscriber, in records (see the config).
const QUEUE_RECORDS: usize = 2000;

// ----- random choices -----

/// xorshift64*, seeded through splitmix64: tiny and reproducible.
#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(splitmix(seed) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }

    /// Uniform in `lo..=hi`.
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.between(lo, hi))
    }

    /// An independent generator for one worker.
    fn fork(&mut self) -> Rng {
        Rng::new(self.next())
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn fnv1a(data: &[u8]) -> u32 {
    data.iter().fold(0x811C_9DC5_u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

// ----- run settings -----

fn soak_secs() -> u64 {
    match std::env::var("SWITCHBOARD_SOAK_SECS") {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("SWITCHBOARD_SOAK_SECS={v:?}: not a number of seconds")),
        Err(_) => 60,
    }
}

fn soak_seed() -> u64 {
    match std::env::var("SWITCHBOARD_SOAK_SEED") {
        Ok(v) => {
            let v = v.trim();
            let parsed = match v.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16).ok(),
                None => v.parse().ok(),
            };
            parsed.unwrap_or_else(|| panic!("SWITCHBOARD_SOAK_SEED={v:?}: not a number"))
        }
        Err(_) => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            splitmix(t.as_nanos() as u64 ^ u64::from(std::process::id()))
        }
    }
}

// ----- what every worker shares -----

/// The stop flag and the failures; the first failure stops every worker.
struct Shared {
    stop: AtomicBool,
    failures: Mutex<Vec<String>>,
    seed: u64,
}

impl Shared {
    fn running(&self) -> bool {
        !self.stop.load(Ordering::Relaxed)
    }

    fn failed(&self) -> bool {
        !self.failures.lock().unwrap().is_empty()
    }

    fn fail(&self, who: &str, what: &str) {
        eprintln!("soak: {who} FAILED (seed {}): {what}", self.seed);
        self.failures.lock().unwrap().push(format!("{who}: {what}"));
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// What the workers did, summed at the end.
#[derive(Debug, Default, Clone)]
struct Counts {
    router_identified: u64,
    router_normal: u64,
    router_device_resets: u64,
    router_device_fins: u64,
    router_app_resets: u64,
    router_unknown: u64,
    router_takeovers: u64,
    router_apps: u64,
    router_apps_reused: u64,
    router_probes: u64,
    router_msgs: u64,
    router_bytes: u64,
    router_reset_unarrived: u64,
    tunnel_streams: u64,
    tunnel_half_closed: u64,
    tunnel_read_back: u64,
    tunnel_early: u64,
    tunnel_resets: u64,
    tunnel_bytes_sent: u64,
    tunnel_bytes_echoed: u64,
    tunnel_largest: u64,
    feed_published: u64,
    feed_publisher_conns: u64,
    feed_subscriber_conns: u64,
    feed_stalls: u64,
    feed_received: u64,
    feed_gaps: u64,
    feed_gappy_conns: u64,
    feed_abrupt: u64,
    admin_requests: u64,
    admin_max_latency: Duration,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.router_identified += o.router_identified;
        self.router_normal += o.router_normal;
        self.router_device_resets += o.router_device_resets;
        self.router_device_fins += o.router_device_fins;
        self.router_app_resets += o.router_app_resets;
        self.router_unknown += o.router_unknown;
        self.router_takeovers += o.router_takeovers;
        self.router_apps += o.router_apps;
        self.router_apps_reused += o.router_apps_reused;
        self.router_probes += o.router_probes;
        self.router_msgs += o.router_msgs;
        self.router_bytes += o.router_bytes;
        self.router_reset_unarrived += o.router_reset_unarrived;
        self.tunnel_streams += o.tunnel_streams;
        self.tunnel_half_closed += o.tunnel_half_closed;
        self.tunnel_read_back += o.tunnel_read_back;
        self.tunnel_early += o.tunnel_early;
        self.tunnel_resets += o.tunnel_resets;
        self.tunnel_bytes_sent += o.tunnel_bytes_sent;
        self.tunnel_bytes_echoed += o.tunnel_bytes_echoed;
        self.tunnel_largest = self.tunnel_largest.max(o.tunnel_largest);
        self.feed_published += o.feed_published;
        self.feed_publisher_conns += o.feed_publisher_conns;
        self.feed_subscriber_conns += o.feed_subscriber_conns;
        self.feed_stalls += o.feed_stalls;
        self.feed_received += o.feed_received;
        self.feed_gaps += o.feed_gaps;
        self.feed_gappy_conns += o.feed_gappy_conns;
        self.feed_abrupt += o.feed_abrupt;
        self.admin_requests += o.admin_requests;
        self.admin_max_latency = self.admin_max_latency.max(o.admin_max_latency);
    }
}

// ----- addresses and the engine -----

/// Fixed loopback addresses, reserved before the engine starts.
#[derive(Clone, Copy, Debug)]
struct Ports {
    echo: SocketAddr,
    feed: SocketAddr,
    ingest: SocketAddr,
    device: SocketAddr,
    apps: [SocketAddr; CONNPTS],
    tunnel: SocketAddr,
    public: SocketAddr,
    admin: SocketAddr,
}

impl Ports {
    /// Bind every port at once (so they differ), note them, release them.
    fn reserve() -> Ports {
        let listeners: Vec<TcpListener> = (0..7 + CONNPTS)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let a: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        drop(listeners);
        Ports {
            echo: a[0],
            feed: a[1],
            ingest: a[2],
            device: a[3],
            tunnel: a[4],
            public: a[5],
            admin: a[6],
            apps: std::array::from_fn(|i| a[7 + i]),
        }
    }
}

fn connpt_id(i: usize) -> String {
    format!("dev-{i:02}")
}

fn config_toml(p: &Ports) -> String {
    let Ports {
        echo,
        feed,
        ingest,
        device,
        tunnel,
        public,
        admin,
        ..
    } = p;
    let mut toml = format!(
        r#"
[[echo]]
name = "local-echo"
listen = "{echo}"

[[broadcast]]
name = "feed"
listen = "{feed}"
ingest = "{ingest}"
framing = "line"
max_record = 1024
slow = "drop-oldest"
queue_bytes = 1048576
queue_records = {QUEUE_RECORDS}
replay = 16

[[tunnel_server]]
name = "tun"
listen = "{tunnel}"
  [[tunnel_server.service]]
  name = "{SERVICE}"
  public = "{public}"
  token = "{TOKEN}"

[[tunnel_agent]]
name = "{SERVICE}"
server = "{tunnel}"
local = "{echo}"
token = "{TOKEN}"

[admin]
listen = "{admin}"

[[router]]
name = "dtu"
listen = "{device}"
identity = "id"
"#
    );
    for (i, app) in p.apps.iter().enumerate() {
        toml += &format!(
            "  [[router.connpt]]\n  name = \"cp{i}\"\n  id = \"{}\"\n  listen = \"{app}\"\n",
            connpt_id(i)
        );
    }
    toml
}

// ----- sockets -----

fn nonblocking(s: TcpStream) -> TcpStream {
    s.set_nonblocking(true).unwrap();
    s
}

/// Close with a RST (SO_LINGER 0).
fn reset(s: TcpStream) {
    SockRef::from(&s).set_linger(Some(Duration::ZERO)).ok();
    drop(s);
}

/// A short pause for a polling loop that made no progress.
fn idle() {
    thread::sleep(Duration::from_micros(300));
}

/// Write what a non-blocking socket takes now.
fn try_write(s: &mut TcpStream, data: &[u8]) -> Result<usize, String> {
    match s.write(data) {
        Ok(n) => Ok(n),
        Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => Ok(0),
        Err(e) => Err(format!("write: {e}")),
    }
}

enum Got {
    Data(usize),
    Nothing,
    Eof,
}

/// Read what a non-blocking (or short-timeout) socket has now.
fn try_read(s: &mut TcpStream, buf: &mut [u8]) -> Result<Got, String> {
    match s.read(buf) {
        Ok(0) => Ok(Got::Eof),
        Ok(n) => Ok(Got::Data(n)),
        Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => Ok(Got::Nothing),
        Err(e) => Err(format!("read: {e}")),
    }
}

fn rss() -> u64 {
    let text = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = text.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * KIB
}

// ----- router: tagged messages -----

const MAGIC: u8 = 0xA5;
/// magic, direction, connpt, 0, session u32, sequence u32, length u32.
const HEAD: usize = 16;
/// FNV-1a of header and payload.
const TAIL: usize = 4;
const UP: u8 = b'u';
const DOWN: u8 = b'd';
const MAX_MSG: usize = 32 * 1024;

/// Message `seq` of `session` on `connpt` in direction `dir`: its payload is
/// a pure function of those, so the receiver rebuilds it to compare.
fn message(dir: u8, connpt: u8, session: u32, seq: u32, len: usize) -> Vec<u8> {
    let mut m = Vec::with_capacity(HEAD + len + TAIL);
    m.extend_from_slice(&[MAGIC, dir, connpt, 0]);
    m.extend_from_slice(&session.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(&(len as u32).to_be_bytes());
    let key = ((u64::from(session) << 32) | u64::from(seq))
        ^ (u64::from(dir) << 56)
        ^ (u64::from(connpt) << 48);
    let mut r = Rng::new(key);
    while m.len() < HEAD + len {
        let word = r.next().to_le_bytes();
        let take = (HEAD + len - m.len()).min(word.len());
        m.extend_from_slice(&word[..take]);
    }
    let sum = fnv1a(&m);
    m.extend_from_slice(&sum.to_be_bytes());
    m
}

fn message_len(rng: &mut Rng) -> usize {
    let len = match rng.below(100) {
        0..70 => rng.between(1, 256),
        70..95 => rng.between(257, 4096),
        _ => rng.between(4097, MAX_MSG as u64),
    };
    len as usize
}

/// One direction's sender: a one-byte mark once armed, then the messages,
/// up to `limit` message bytes (all of them unless the session is cut).
struct Tx {
    dir: u8,
    connpt: u8,
    session: u32,
    mark: u8,
    armed: bool,
    mark_sent: bool,
    lens: Vec<usize>,
    next: usize,
    cur: Vec<u8>,
    off: usize,
    written: u64,
    limit: u64,
    total: u64,
}

impl Tx {
    fn new(dir: u8, connpt: u8, session: u32, mark: u8, lens: Vec<usize>) -> Tx {
        let total = lens.iter().map(|&l| (HEAD + l + TAIL) as u64).sum();
        Tx {
            dir,
            connpt,
            session,
            mark,
            armed: false,
            mark_sent: false,
            lens,
            next: 0,
            cur: Vec::new(),
            off: 0,
            written: 0,
            limit: total,
            total,
        }
    }

    fn pump(&mut self, s: &mut TcpStream) -> Result<bool, String> {
        if !self.armed {
            return Ok(false);
        }
        let mut progress = false;
        if !self.mark_sent {
            if try_write(s, &[self.mark])? == 0 {
                return Ok(false);
            }
            self.mark_sent = true;
            progress = true;
        }
        while self.written < self.limit {
            if self.off == self.cur.len() {
                let Some(&len) = self.lens.get(self.next) else {
                    break;
                };
                self.cur = message(self.dir, self.connpt, self.session, self.next as u32, len);
                self.off = 0;
                self.next += 1;
            }
            let room = (self.limit - self.written).min((self.cur.len() - self.off) as u64) as usize;
            let n = try_write(s, &self.cur[self.off..self.off + room])?;
            if n == 0 {
                break;
            }
            self.off += n;
            self.written += n as u64;
            progress = true;
        }
        Ok(progress)
    }

    fn done(&self) -> bool {
        self.mark_sent && self.written == self.limit
    }
}

/// What comes before the first message.
#[derive(Clone, Copy, Debug)]
enum Sync {
    /// Exactly this byte.
    Mark(u8),
    /// Any number of `p` probes, then this byte.
    ProbesThen(u8),
    Done,
}

/// One direction's receiver: checks every byte against what the sender of
/// this connpt and session must have sent, in order.
struct Rx {
    dir: u8,
    connpt: u8,
    session: u32,
    sync: Sync,
    probes: u64,
    expect: usize,
    buf: Vec<u8>,
    msgs: usize,
    /// Message bytes received (after the mark).
    msg_bytes: u64,
}

impl Rx {
    fn new(dir: u8, connpt: u8, session: u32, sync: Sync, expect: usize) -> Rx {
        Rx {
            dir,
            connpt,
            session,
            sync,
            probes: 0,
            expect,
            buf: Vec::new(),
            msgs: 0,
            msg_bytes: 0,
        }
    }

    fn synced(&self) -> bool {
        matches!(self.sync, Sync::Done)
    }

    fn complete(&self) -> bool {
        self.msgs == self.expect && self.buf.is_empty()
    }

    /// Read what the socket has; an EOF is a failure (the router closes
    /// neither devices nor applications in this test).
    fn pump(&mut self, s: &mut TcpStream, scratch: &mut [u8]) -> Result<bool, String> {
        let mut progress = false;
        for _ in 0..32 {
            match try_read(s, scratch)? {
                Got::Data(n) => {
                    self.feed(&scratch[..n])?;
                    progress = true;
                }
                Got::Nothing => break,
                Got::Eof => {
                    return Err(format!(
                        "closed by the engine after {} of {} messages",
                        self.msgs, self.expect
                    ));
                }
            }
        }
        Ok(progress)
    }

    fn feed(&mut self, mut data: &[u8]) -> Result<(), String> {
        while !self.synced() {
            let Some((&b, rest)) = data.split_first() else {
                return Ok(());
            };
            data = rest;
            self.sync = match self.sync {
                Sync::Mark(m) if b == m => Sync::Done,
                Sync::ProbesThen(_) if b == b'p' => {
                    self.probes += 1;
                    self.sync
                }
                Sync::ProbesThen(m) if b == m => Sync::Done,
                other => {
                    return Err(format!(
                        "unexpected byte {b:#04x} before the first message (waiting for {other:?})"
                    ));
                }
            };
        }
        self.msg_bytes += data.len() as u64;
        self.buf.extend_from_slice(data);
        let mut at = 0;
        loop {
            let rest = &self.buf[at..];
            if rest.is_empty() {
                break;
            }
            if self.msgs == self.expect {
                return Err(format!(
                    "{} bytes after the last message ({})",
                    rest.len(),
                    self.expect
                ));
            }
            if rest.len() < HEAD {
                break;
            }
            let word = |i: usize| u32::from_be_bytes(rest[i..i + 4].try_into().unwrap());
            let (session, seq, len) = (word(4), word(8), word(12) as usize);
            if rest[0] != MAGIC {
                return Err(format!(
                    "message {}: bad magic {:#04x}, the stream is corrupt",
                    self.msgs, rest[0]
                ));
            }
            if rest[1] != self.dir || rest[2] != self.connpt || session != self.session {
                return Err(format!(
                    "MISROUTED: message {seq} of direction {:?}, connpt {}, session {session} \
                     arrived on direction {:?}, connpt {}, session {}",
                    rest[1] as char, rest[2], self.dir as char, self.connpt, self.session
                ));
            }
            if seq as usize != self.msgs {
                return Err(format!(
                    "message {seq} arrived where message {} was due",
                    self.msgs
                ));
            }
            if len == 0 || len > MAX_MSG {
                return Err(format!("message {seq}: impossible length {len}"));
            }
            if rest.len() < HEAD + len + TAIL {
                break;
            }
            let want = message(self.dir, self.connpt, self.session, seq, len);
            if rest[..want.len()] != want[..] {
                let i = rest
                    .iter()
                    .zip(&want)
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                return Err(format!(
                    "message {seq} ({len} bytes) is corrupt at byte {i}"
                ));
            }
            at += want.len();
            self.msgs += 1;
        }
        self.buf.drain(..at);
        Ok(())
    }

    /// Read until `want` message bytes have arrived or nothing has come for
    /// `quiet`.
    fn settle(
        &mut self,
        s: &mut TcpStream,
        want: u64,
        quiet: Duration,
        scratch: &mut [u8],
    ) -> Result<(), String> {
        let start = Instant::now();
        let mut last = Instant::now();
        while self.msg_bytes < want {
            if self.pump(s, scratch)? {
                last = Instant::now();
            } else if last.elapsed() >= quiet {
                break;
            } else {
                idle();
            }
            if start.elapsed() > LIMIT {
                return Err(format!(
                    "{} of {want} bytes after {LIMIT:?}",
                    self.msg_bytes
                ));
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ending {
    /// Every message both ways, then the device closes.
    Normal,
    /// The device sends a RST part-way through.
    DeviceReset,
    /// The device closes cleanly in the middle of a message.
    DeviceFin,
    /// The application sends a RST part-way through.
    AppReset,
}

/// A connpt waiting for a worker, with what its last session left connected.
struct Parked {
    connpt: usize,
    /// The application, kept for the next device.
    app: Option<TcpStream>,
    /// The device, still online: the next device takes its place.
    device: Option<TcpStream>,
}

impl Parked {
    fn empty(connpt: usize) -> Parked {
        Parked {
            connpt,
            app: None,
            device: None,
        }
    }
}

fn router_worker(
    shared: &Shared,
    ports: &Ports,
    pool: &Mutex<Vec<Parked>>,
    sessions: &AtomicU32,
    mut rng: Rng,
) -> Result<Counts, String> {
    let mut c = Counts::default();
    let mut scratch = vec![0u8; 64 * 1024];
    while shared.running() {
        if rng.percent(3) {
            unknown_device(ports)?;
            c.router_unknown += 1;
            continue;
        }
        let parked = {
            let mut free = pool.lock().unwrap();
            let n = free.len() as u64;
            (n > 0).then(|| free.swap_remove(rng.below(n) as usize))
        };
        let Some(parked) = parked else {
            thread::sleep(Duration::from_millis(1));
            continue;
        };
        let session = sessions.fetch_add(1, Ordering::Relaxed);
        let connpt = parked.connpt;
        match router_session(&mut rng, ports, parked, session, &mut c, &mut scratch) {
            Ok(next) => pool.lock().unwrap().push(next),
            Err(e) => {
                pool.lock().unwrap().push(Parked::empty(connpt));
                return Err(format!(
                    "connpt {connpt} ({}), session {session}: {e}",
                    connpt_id(connpt)
                ));
            }
        }
        thread::sleep(rng.millis(0, 20));
    }
    Ok(c)
}

/// Wait until `/status` shows connpt `i` offline.
fn wait_offline(admin: SocketAddr, i: usize) -> Result<(), String> {
    let key = format!("\"name\":\"cp{i}\",");
    let start = Instant::now();
    loop {
        let (code, body) = http_get(admin, "/status")?;
        let text = String::from_utf8_lossy(&body);
        let entry = text
            .split_once(&key)
            .and_then(|(_, rest)| rest.split('}').next())
            .ok_or_else(|| format!("connpt cp{i} not in /status ({code})"))?;
        if entry.contains("\"online\":false") {
            return Ok(());
        }
        if start.elapsed() > LIMIT {
            return Err(format!("the device still online after {LIMIT:?}: {entry}"));
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// A device that sends an id no connpt has: closed at once, nothing sent.
fn unknown_device(ports: &Ports) -> Result<(), String> {
    let mut s = connect(ports.device);
    s.write_all(b"bogus!")
        .map_err(|e| format!("unknown id: write: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(()),
        Ok(n) => Err(format!("a device with an unknown id got {n} bytes")),
        Err(e) => Err(format!("a device with an unknown id was not closed: {e}")),
    }
}

/// The router closes a device that another device with its id replaced;
/// until then it may still get probes meant for the new one.
fn expect_replaced(mut old: TcpStream) -> Result<(), String> {
    old.set_nonblocking(false).unwrap();
    old.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match old.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) if buf[..n].iter().all(|&b| b == b'p') => {}
            Ok(n) => {
                return Err(format!(
                    "the replaced device got {:?}",
                    buf[..n].escape_ascii().to_string()
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(()),
            Err(e) => return Err(format!("the replaced device was not closed: {e}")),
        }
    }
}

/// One device session on a connpt; returns what the next session gets.
fn router_session(
    rng: &mut Rng,
    ports: &Ports,
    parked: Parked,
    session: u32,
    c: &mut Counts,
    scratch: &mut [u8],
) -> Result<Parked, String> {
    let Parked {
        connpt,
        app,
        device: old_device,
    } = parked;
    let cp = connpt as u8;
    let mut app = match app {
        Some(a) => {
            c.router_apps_reused += 1;
            a
        }
        None => {
            c.router_apps += 1;
            nonblocking(connect(ports.apps[connpt]))
        }
    };
    let mut old_device = old_device;
    let mut dev = connect(ports.device);
    dev.write_all(connpt_id(connpt).as_bytes())
        .map_err(|e| format!("device: sending its id: {e}"))?;
    let mut dev = nonblocking(dev);
    c.router_identified += 1;

    let up: Vec<usize> = (0..rng.between(1, 40)).map(|_| message_len(rng)).collect();
    let down: Vec<usize> = (0..rng.between(1, 40)).map(|_| message_len(rng)).collect();
    let (n_up, n_down) = (up.len(), down.len());
    let ending = match rng.below(100) {
        0..70 => Ending::Normal,
        70..80 => Ending::DeviceReset,
        80..90 => Ending::DeviceFin,
        _ => Ending::AppReset,
    };
    let mut dev_tx = Tx::new(UP, cp, session, b'A', up);
    let mut app_tx = Tx::new(DOWN, cp, session, b'G', down);
    let mut dev_rx = Rx::new(DOWN, cp, session, Sync::ProbesThen(b'G'), n_down);
    let mut app_rx = Rx::new(UP, cp, session, Sync::Mark(b'A'), n_up);
    let cut = rng.between(1, dev_tx.total - 1);
    if matches!(ending, Ending::DeviceReset | Ending::DeviceFin) {
        dev_tx.limit = cut;
    }
    let state = |dev_tx: &Tx, dev_rx: &Rx, app_tx: &Tx, app_rx: &Rx| {
        format!(
            "{ending:?}: device sent {}/{} bytes (armed {}), got {}/{n_down} messages after {} probes; \
             application sent {}/{} bytes (armed {}), got {}/{n_up} messages (synced {})",
            dev_tx.written,
            dev_tx.limit,
            dev_tx.armed,
            dev_rx.msgs,
            dev_rx.probes,
            app_tx.written,
            app_tx.limit,
            app_tx.armed,
            app_rx.msgs,
            app_rx.synced()
        )
    };

    let start = Instant::now();
    let mut next_probe = start;
    loop {
        let now = Instant::now();
        if now - start > LIMIT {
            return Err(format!(
                "stuck for {LIMIT:?}: {}",
                state(&dev_tx, &dev_rx, &app_tx, &app_rx)
            ));
        }
        // The handshake: probes until the device has answered.
        if !app_tx.armed {
            if app_rx.synced() {
                app_tx.armed = true;
            } else if now >= next_probe {
                try_write(&mut app, b"p").map_err(|e| format!("application: {e}"))?;
                c.router_probes += 1;
                next_probe = now + Duration::from_millis(5);
            }
        }
        if !dev_tx.armed && dev_rx.probes > 0 {
            dev_tx.armed = true;
            // This device is online: the one it took over from is closed.
            if let Some(old) = old_device.take() {
                expect_replaced(old).map_err(|e| format!("takeover: {e}"))?;
                c.router_takeovers += 1;
            }
        }
        let pumped = [
            ("device", dev_tx.pump(&mut dev)),
            ("application", app_tx.pump(&mut app)),
            ("device", dev_rx.pump(&mut dev, scratch)),
            ("application", app_rx.pump(&mut app, scratch)),
        ];
        let mut progress = false;
        for (who, r) in pumped {
            progress |= r.map_err(|e| {
                format!("{who}: {e} ({})", state(&dev_tx, &dev_rx, &app_tx, &app_rx))
            })?;
        }
        let finished = match ending {
            Ending::Normal => {
                dev_tx.done() && app_tx.done() && dev_rx.complete() && app_rx.complete()
            }
            Ending::DeviceReset | Ending::DeviceFin => dev_tx.done(),
            Ending::AppReset => app_rx.msg_bytes >= cut,
        };
        if finished {
            break;
        }
        if !progress {
            idle();
        }
    }
    let mut next = Parked::empty(connpt);
    match ending {
        Ending::Normal => {
            c.router_normal += 1;
            if rng.percent(50) {
                next.app = Some(app);
                // Sometimes the device stays online too, for the next one
                // to take over.
                if rng.percent(40) {
                    next.device = Some(dev);
                }
            }
        }
        Ending::DeviceReset => {
            reset(dev);
            // The application holds a prefix of what the device wrote (checked
            // as it arrives); bytes the reset overtook do not count.
            app_rx
                .settle(
                    &mut app,
                    dev_tx.written,
                    Duration::from_millis(300),
                    scratch,
                )
                .map_err(|e| format!("application after the device's reset: {e}"))?;
            c.router_reset_unarrived += dev_tx.written - app_rx.msg_bytes;
            c.router_device_resets += 1;
        }
        Ending::DeviceFin => {
            dev.shutdown(Shutdown::Write)
                .map_err(|e| format!("device: shutdown: {e}"))?;
            // A clean close: every byte written before it must arrive.
            app_rx
                .settle(&mut app, dev_tx.written, LIMIT, scratch)
                .map_err(|e| format!("application after the device's FIN: {e}"))?;
            if app_rx.msg_bytes != dev_tx.written {
                return Err(format!(
                    "the device closed cleanly after {} bytes, the application got {}",
                    dev_tx.written, app_rx.msg_bytes
                ));
            }
            drop(dev);
            c.router_device_fins += 1;
        }
        Ending::AppReset => {
            reset(app);
            dev_rx
                .settle(
                    &mut dev,
                    app_tx.written,
                    Duration::from_millis(100),
                    scratch,
                )
                .map_err(|e| format!("device after the application's reset: {e}"))?;
            drop(dev);
            c.router_app_resets += 1;
        }
    }
    c.router_msgs += (dev_rx.msgs + app_rx.msgs) as u64;
    c.router_bytes += dev_rx.msg_bytes + app_rx.msg_bytes;
    if ending != Ending::Normal {
        // Bytes of this device still in the engine would reach the next
        // session's application: the connpt is handed on once the router
        // has seen this device leave.
        wait_offline(ports.admin, connpt)
            .map_err(|e| format!("{e} ({})", state(&dev_tx, &dev_rx, &app_tx, &app_rx)))?;
    }
    Ok(next)
}

// ----- tunnel -----

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StreamEnd {
    /// Send everything, shut down the sending side, read the echo to EOF.
    HalfClose,
    /// Send everything, read all of it back, close.
    ReadBack,
    /// Send part, read part back, close (a RST if echo is unread).
    EarlyClose,
    /// Send part, read part back, reset.
    Reset,
}

fn stream_size(rng: &mut Rng) -> u64 {
    match rng.below(100) {
        0..45 => rng.between(1, 16 * KIB),
        45..80 => rng.between(16 * KIB + 1, 256 * KIB),
        80..95 => rng.between(256 * KIB + 1, MIB),
        _ => rng.between(MIB + 1, 4 * MIB),
    }
}

fn tunnel_worker(shared: &Shared, public: SocketAddr, mut rng: Rng) -> Result<Counts, String> {
    let mut c = Counts::default();
    let mut buf = vec![0u8; 64 * 1024];
    while shared.running() {
        let n = c.tunnel_streams;
        tunnel_stream(&mut rng, public, &mut c, &mut buf)
            .map_err(|e| format!("stream {n}: {e}"))?;
        thread::sleep(rng.millis(0, 10));
    }
    Ok(c)
}

fn tunnel_stream(
    rng: &mut Rng,
    public: SocketAddr,
    c: &mut Counts,
    buf: &mut [u8],
) -> Result<(), String> {
    let size = stream_size(rng);
    let end = match rng.below(100) {
        0..55 => StreamEnd::HalfClose,
        55..75 => StreamEnd::ReadBack,
        75..88 => StreamEnd::EarlyClose,
        _ => StreamEnd::Reset,
    };
    // Bytes to send, and echoed bytes to wait for before closing.
    let (send, wait_for_echo) = match end {
        StreamEnd::HalfClose | StreamEnd::ReadBack => (size, size),
        StreamEnd::EarlyClose | StreamEnd::Reset => {
            let send = rng.below(size + 1);
            (send, rng.below(send + 1))
        }
    };
    let pattern = Pattern::new(rng.next());
    let mut s = nonblocking(connect(public));
    c.tunnel_streams += 1;
    c.tunnel_largest = c.tunnel_largest.max(size);
    let (mut sent, mut got, mut shut) = (0u64, 0u64, false);
    let start = Instant::now();
    let what =
        |sent: u64, got: u64| format!("{end:?} stream of {size} bytes: sent {sent}, echo {got}");
    loop {
        if start.elapsed() > LIMIT {
            return Err(format!("stuck for {LIMIT:?}: {}", what(sent, got)));
        }
        let mut progress = false;
        if sent < send {
            let chunk = pattern.chunk(sent, (send - sent).min(64 * KIB) as usize);
            let n = try_write(&mut s, chunk).map_err(|e| format!("{e} ({})", what(sent, got)))?;
            sent += n as u64;
            progress |= n > 0;
        } else if end == StreamEnd::HalfClose && !shut {
            s.shutdown(Shutdown::Write)
                .map_err(|e| format!("shutdown: {e} ({})", what(sent, got)))?;
            shut = true;
        }
        let mut eof = false;
        for _ in 0..16 {
            match try_read(&mut s, buf).map_err(|e| format!("{e} ({})", what(sent, got)))? {
                Got::Data(n) => {
                    pattern
                        .check(got, &buf[..n])
                        .map_err(|at| format!("echo differs at byte {at} ({})", what(sent, got)))?;
                    got += n as u64;
                    if got > sent {
                        return Err(format!("more echo than sent ({})", what(sent, got)));
                    }
                    progress = true;
                }
                Got::Nothing => break,
                Got::Eof => {
                    eof = true;
                    break;
                }
            }
        }
        if eof {
            if end == StreamEnd::HalfClose && shut && got == size {
                c.tunnel_half_closed += 1;
                break;
            }
            return Err(format!("closed by the tunnel ({})", what(sent, got)));
        }
        match end {
            StreamEnd::ReadBack if got == size => {
                c.tunnel_read_back += 1;
                break;
            }
            StreamEnd::EarlyClose | StreamEnd::Reset if sent == send && got >= wait_for_echo => {
                break;
            }
            _ => {}
        }
        if !progress {
            idle();
        }
    }
    match end {
        StreamEnd::Reset => {
            reset(s);
            c.tunnel_resets += 1;
        }
        StreamEnd::EarlyClose => {
            drop(s);
            c.tunnel_early += 1;
        }
        StreamEnd::HalfClose | StreamEnd::ReadBack => drop(s),
    }
    c.tunnel_bytes_sent += sent;
    c.tunnel_bytes_echoed += got;
    Ok(())
}

// ----- broadcast -----

/// The publisher's progress, for the subscribers.
struct Feed {
    /// Records written to the ingest socket so far (record `n` has seq `n`).
    published: AtomicU64,
    /// Records published in all, once the publisher is done (`u64::MAX` until then).
    final_count: AtomicU64,
    /// Subscribers reading without stalling until the end.
    in_final: AtomicUsize,
    /// A busy phase (large records, megabytes a second) is on.
    busy: AtomicBool,
}

/// Record `seq`: `R<seq><s|b>:<letters>:<fnv1a>\n`, a pure function of `seq`
/// and its size class (`b`ig records are written in busy phases).
fn record(seq: u64, big: bool) -> Vec<u8> {
    let mut r = Rng::new(seq ^ 0x00B0_ADCA_5700);
    let len = if big {
        400 + r.below(500)
    } else {
        8 + r.below(100)
    } as usize;
    let mut line = format!("R{seq:010}{}:", if big { 'b' } else { 's' }).into_bytes();
    line.extend((0..len).map(|_| b'a' + (r.next() % 26) as u8));
    let sum = fnv1a(&line);
    line.extend_from_slice(format!(":{sum:08x}\n").as_bytes());
    line
}

/// The publisher's cycle: [`BUSY`] of large records at about 3 MB/s (more
/// than a stalled subscriber's socket buffers and queue hold), then quiet
/// small records, about 1000 a second.
const CYCLE: Duration = Duration::from_secs(5);
const BUSY: Duration = Duration::from_secs(2);

fn publisher(
    shared: &Shared,
    ports: &Ports,
    feed: &Feed,
    stats: &BroadcastStats,
    mut rng: Rng,
) -> Result<Counts, String> {
    let mut c = Counts::default();
    let mut s = connect(ports.ingest);
    c.feed_publisher_conns += 1;
    let mut seq = 0u64;
    let mut batch = Vec::new();
    let read_all = |seq: u64| {
        wait_until(LIMIT, || stats.records_in.load(Ordering::Relaxed) == seq)
            .then_some(())
            .ok_or_else(|| {
                format!(
                    "the role read {} records, {seq} were written",
                    stats.records_in.load(Ordering::Relaxed)
                )
            })
    };
    let mut publish = |s: &mut TcpStream, seq: &mut u64, n: u64, big: bool| {
        batch.clear();
        for k in *seq..*seq + n {
            batch.extend_from_slice(&record(k, big));
        }
        s.write_all(&batch)
            .map_err(|e| format!("publisher: write after {seq} records: {e}"))?;
        *seq += n;
        feed.published.store(*seq, Ordering::Release);
        Ok::<(), String>(())
    };
    let cycle_start = Instant::now();
    while shared.running() {
        let in_cycle = cycle_start.elapsed().as_nanos() % CYCLE.as_nanos();
        let busy = in_cycle < BUSY.as_nanos();
        feed.busy.store(busy, Ordering::Relaxed);
        if busy {
            publish(&mut s, &mut seq, 45, true)?;
            thread::sleep(Duration::from_millis(10));
            continue;
        }
        let n = rng.between(1, 20);
        publish(&mut s, &mut seq, n, false)?;
        thread::sleep(Duration::from_millis(n));
        if rng.percent(1) {
            // A clean close after whole records; the next connection's
            // records come after these once the role has read them all
            // (order is promised per publisher only).
            drop(s);
            read_all(seq)?;
            s = connect(ports.ingest);
            c.feed_publisher_conns += 1;
        }
    }
    feed.busy.store(false, Ordering::Relaxed);
    // The last records, once every subscriber reads without stalling.
    let all_in = wait_until(LIMIT, || {
        feed.in_final.load(Ordering::Relaxed) == SUBSCRIBERS || shared.failed()
    });
    if shared.failed() {
        return Ok(c);
    }
    if !all_in {
        return Err(format!(
            "only {} of {SUBSCRIBERS} subscribers reached the end",
            feed.in_final.load(Ordering::Relaxed)
        ));
    }
    thread::sleep(Duration::from_millis(300));
    for _ in 0..5 {
        publish(&mut s, &mut seq, 10, false)?;
        thread::sleep(Duration::from_millis(20));
    }
    drop(s);
    read_all(seq)?;
    c.feed_published = seq;
    feed.final_count.store(seq, Ordering::Release);
    Ok(c)
}

/// One subscriber connection's view of the feed.
#[derive(Default)]
struct SubConn {
    buf: Vec<u8>,
    last: Option<u64>,
    received: u64,
    /// Records missing between records received.
    gaps: u64,
    stalled: bool,
}

impl SubConn {
    /// The seq after the last one received.
    fn next(&self) -> u64 {
        self.last.map_or(0, |l| l + 1)
    }

    fn feed(&mut self, data: &[u8]) -> Result<(), String> {
        self.buf.extend_from_slice(data);
        let mut at = 0;
        while let Some(nl) = self.buf[at..].iter().position(|&b| b == b'\n') {
            let line = &self.buf[at..at + nl + 1];
            let parsed = line
                .get(1..11)
                .filter(|_| line[0] == b'R')
                .and_then(|d| std::str::from_utf8(d).ok())
                .and_then(|d| d.parse::<u64>().ok())
                .zip(line.get(11).copied());
            let Some((seq, class)) = parsed else {
                return Err(format!(
                    "not a record (after seq {:?}): {:?}",
                    self.last,
                    line.escape_ascii().to_string()
                ));
            };
            if line != record(seq, class == b'b').as_slice() {
                return Err(format!(
                    "record {seq} is not whole or corrupt: {:?}",
                    line.escape_ascii().to_string()
                ));
            }
            if let Some(last) = self.last {
                if seq <= last {
                    return Err(format!("record {seq} arrived after record {last}"));
                }
                self.gaps += seq - last - 1;
            }
            self.last = Some(seq);
            self.received += 1;
            at += line.len();
        }
        self.buf.drain(..at);
        Ok(())
    }

    fn read(&mut self, s: &mut TcpStream, buf: &mut [u8]) -> Result<(), String> {
        match try_read(s, buf)? {
            Got::Data(n) => self.feed(&buf[..n]),
            Got::Nothing => Ok(()),
            Got::Eof => Err(format!(
                "closed by the engine after {} records (drop-oldest never disconnects)",
                self.received
            )),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Quit {
    /// Catch up with the publisher, then close.
    Drained,
    /// Close with a RST at once (only a connection that never stalled).
    Abrupt,
    /// The run is over: read until the publisher's last record.
    Final,
}

fn subscriber(shared: &Shared, ports: &Ports, feed: &Feed, mut rng: Rng) -> Result<Counts, String> {
    let mut c = Counts::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // A staller stops reading when a busy phase starts; its receive
        // buffer is small, so its queue in the engine overflows and
        // drop-oldest drops records for it.
        let staller = shared.running() && rng.percent(40);
        let mut s = if staller {
            connect_with_recv_buffer(ports.feed, 2048)
        } else {
            connect(ports.feed)
        };
        s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        c.feed_subscriber_conns += 1;
        let conn_no = c.feed_subscriber_conns;
        let mut conn = SubConn::default();
        let born = Instant::now();
        let mut life_end = born
            + if staller {
                LIMIT
            } else {
                rng.millis(1000, 6000)
            };
        let what = |conn: &SubConn, e: String| {
            format!(
                "connection {conn_no} (staller {staller}, stalled {}): {e}",
                conn.stalled
            )
        };
        let mut quit = loop {
            if !shared.running() {
                break Quit::Final;
            }
            if staller
                && !conn.stalled
                && born.elapsed() >= Duration::from_millis(100)
                && feed.busy.load(Ordering::Relaxed)
            {
                conn.stalled = true;
                c.feed_stalls += 1;
                let until = Instant::now() + rng.millis(2500, 4000);
                while Instant::now() < until && shared.running() {
                    thread::sleep(Duration::from_millis(20));
                }
                life_end = Instant::now() + rng.millis(500, 2000);
                continue;
            }
            if Instant::now() >= life_end {
                break if !conn.stalled && rng.percent(30) {
                    Quit::Abrupt
                } else {
                    Quit::Drained
                };
            }
            conn.read(&mut s, &mut buf).map_err(|e| what(&conn, e))?;
        };
        if quit == Quit::Drained {
            let target = feed.published.load(Ordering::Acquire);
            let start = Instant::now();
            while conn.next() < target {
                if !shared.running() {
                    quit = Quit::Final;
                    break;
                }
                if start.elapsed() > LIMIT {
                    return Err(what(
                        &conn,
                        format!("not caught up with record {target} in {LIMIT:?}"),
                    ));
                }
                conn.read(&mut s, &mut buf).map_err(|e| what(&conn, e))?;
            }
        }
        if quit == Quit::Final {
            feed.in_final.fetch_add(1, Ordering::Relaxed);
            let start = Instant::now();
            loop {
                if shared.failed() {
                    return Ok(c);
                }
                let end = feed.final_count.load(Ordering::Acquire);
                if end != u64::MAX && conn.next() >= end {
                    break;
                }
                if start.elapsed() > LIMIT {
                    return Err(what(
                        &conn,
                        format!(
                            "the last records did not arrive in {LIMIT:?} (next {})",
                            conn.next()
                        ),
                    ));
                }
                conn.read(&mut s, &mut buf).map_err(|e| what(&conn, e))?;
            }
        }
        // The policy drops records only for a subscriber whose queue is full.
        if !conn.stalled && conn.gaps > 0 {
            return Err(what(
                &conn,
                format!(
                    "a subscriber that never stalled missed {} records (last {:?})",
                    conn.gaps, conn.last
                ),
            ));
        }
        c.feed_received += conn.received;
        c.feed_gaps += conn.gaps;
        c.feed_gappy_conns += u64::from(conn.gaps > 0);
        if quit == Quit::Abrupt {
            reset(s);
            c.feed_abrupt += 1;
        } else {
            drop(s);
        }
        if quit == Quit::Final {
            return Ok(c);
        }
        thread::sleep(rng.millis(0, 200));
    }
}

// ----- admin -----

/// `GET path`; returns the status code and the body (checked against
/// Content-Length).
fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, Vec<u8>), String> {
    let bound = Duration::from_secs(10);
    let mut s = TcpStream::connect_timeout(&addr, bound).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(bound)).unwrap();
    s.set_write_timeout(Some(bound)).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: soak\r\n\r\n").as_bytes())
        .map_err(|e| format!("GET {path}: write: {e}"))?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)
        .map_err(|e| format!("GET {path}: read: {e}"))?;
    let head_end = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("GET {path}: no header end in {} bytes", resp.len()))?;
    let head = String::from_utf8_lossy(&resp[..head_end]).into_owned();
    let body = resp[head_end + 4..].to_vec();
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("GET {path}: bad status line in {head:?}"))?;
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .ok_or_else(|| format!("GET {path}: no Content-Length in {head:?}"))?;
    if body.len() != length {
        return Err(format!(
            "GET {path}: Content-Length {length}, body {} bytes",
            body.len()
        ));
    }
    Ok((code, body))
}

fn check_admin_body(path: &str, body: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(body).map_err(|e| format!("{path}: not UTF-8: {e}"))?;
    let ok = match path {
        "/healthz" => text == "ok\n",
        "/status" => {
            let count = |c: char| text.matches(c).count();
            text.starts_with('{')
                && text.ends_with("}\n")
                && count('{') == count('}')
                && count('[') == count(']')
                && [
                    "router",
                    "broadcast",
                    "tunnel_server",
                    "tunnel_agent",
                    "echo",
                    "admin",
                ]
                .iter()
                .all(|r| text.contains(&format!("\"role\":\"{r}\"")))
        }
        _ => {
            text.lines()
                .any(|l| l.starts_with("switchboard_connections "))
                && text.contains("switchboard_router_identified_total{")
                && text.contains("switchboard_tunnel_streams_opened_total{")
                && text.contains("switchboard_broadcast_records_total{")
        }
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{path}: unexpected body: {:?}",
            &text[..text.len().min(400)]
        ))
    }
}

fn admin_poller(shared: &Shared, admin: SocketAddr, mut rng: Rng) -> Result<Counts, String> {
    let mut c = Counts::default();
    let paths = ["/healthz", "/status", "/metrics"];
    let mut i = 0;
    while shared.running() {
        let path = paths[i % paths.len()];
        i += 1;
        let t = Instant::now();
        let (code, body) = http_get(admin, path)?;
        let took = t.elapsed();
        if code != 200 {
            return Err(format!("GET {path}: {code}"));
        }
        check_admin_body(path, &body)?;
        if took > ADMIN_BOUND {
            return Err(format!("GET {path} took {took:?} (bound {ADMIN_BOUND:?})"));
        }
        c.admin_requests += 1;
        c.admin_max_latency = c.admin_max_latency.max(took);
        thread::sleep(rng.millis(50, 150));
    }
    Ok(c)
}

/// The value of the one sample of `name` whose labels start with `labels`
/// (`""` for a sample without labels).
fn metric(text: &str, name: &str, labels: &str) -> u64 {
    let prefix = if labels.is_empty() {
        format!("{name} ")
    } else {
        format!("{name}{{{labels}")
    };
    let found: Vec<&str> = text.lines().filter(|l| l.starts_with(&prefix)).collect();
    assert_eq!(
        found.len(),
        1,
        "one sample {prefix}… in /metrics: {found:?}"
    );
    found[0]
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("bad sample {:?}", found[0]))
}

// ----- the test -----

type Worker = (String, JoinHandle<Counts>);

/// Run `f` on a named thread; an error or a panic is recorded as a failure
/// (which stops every other worker).
fn spawn(
    workers: &mut Vec<Worker>,
    shared: &Arc<Shared>,
    name: String,
    f: impl FnOnce() -> Result<Counts, String> + Send + 'static,
) {
    let sh = Arc::clone(shared);
    let who = name.clone();
    let handle = thread::Builder::new()
        .name(name.clone())
        .spawn(move || match catch_unwind(AssertUnwindSafe(f)) {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                sh.fail(&who, &e);
                Counts::default()
            }
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default();
                sh.fail(&who, &format!("panicked: {msg}"));
                Counts::default()
            }
        })
        .unwrap();
    workers.push((name, handle));
}

fn mib(b: u64) -> f64 {
    b as f64 / MIB as f64
}

#[test]
fn every_role_at_once_under_mixed_load() {
    let secs = soak_secs();
    let seed = soak_seed();
    eprintln!(
        "soak: {secs} s of load, seed {seed} (replay with SWITCHBOARD_SOAK_SEED={seed}; \
         set the length with SWITCHBOARD_SOAK_SECS)"
    );
    let began = Instant::now();

    // ----- the engine: every role, one loop -----
    let ports = Ports::reserve();
    let config = Config::parse(&config_toml(&ports)).unwrap_or_else(|e| panic!("config: {e}"));
    let broadcast = Broadcast::new(&config.broadcast[0]);
    let feed_stats = broadcast.stats();
    let router = Router::new(&config.router[0]);
    let router_stats = router.stats();
    let server = TunnelServer::new(&config.tunnel_server[0]);
    let server_stats = server.stats();
    let agent = TunnelAgent::new(&config.tunnel_agent[0]);
    let agent_stats = agent.stats();
    let roles: Vec<Box<dyn Role>> = vec![
        Box::new(Echo::new(&config.echo[0])),
        Box::new(broadcast),
        Box::new(router),
        Box::new(server),
        Box::new(agent),
        Box::new(Admin::new(config.admin.as_ref().unwrap())),
    ];
    let (engine, _) = TestEngine::with_roles(config.engine.clone(), roles);
    let mut expected = vec![ports.echo, ports.feed, ports.ingest, ports.device];
    expected.extend(ports.apps);
    expected.extend([ports.tunnel, ports.admin]);
    assert_eq!(engine.addrs, expected, "the listeners, in role order");
    wait_for(
        "the tunnel link and its public port",
        LIMIT,
        || {
            matches!(agent_stats.agent(), Some((AgentState::Up, _, _)))
                && server_stats.public_addr(SERVICE) == Some(ports.public)
        },
        || (agent_stats.agent(), server_stats.public_addr(SERVICE)),
    );
    wait_for(
        "the baseline connections",
        LIMIT,
        || engine.stats().connections == BASELINE_CONNECTIONS,
        || brief(&engine.stats()),
    );

    // ----- load -----
    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        failures: Mutex::new(Vec::new()),
        seed,
    });
    let feed = Arc::new(Feed {
        published: AtomicU64::new(0),
        final_count: AtomicU64::new(u64::MAX),
        in_final: AtomicUsize::new(0),
        busy: AtomicBool::new(false),
    });
    let pool: Arc<Mutex<Vec<Parked>>> =
        Arc::new(Mutex::new((0..CONNPTS).map(Parked::empty).collect()));
    let sessions = Arc::new(AtomicU32::new(1));
    let mut master = Rng::new(seed);
    let mut workers = Vec::new();
    for w in 0..ROUTER_WORKERS {
        let (sh, pool, sessions, rng) = (
            Arc::clone(&shared),
            Arc::clone(&pool),
            Arc::clone(&sessions),
            master.fork(),
        );
        spawn(&mut workers, &shared, format!("router-{w}"), move || {
            router_worker(&sh, &ports, &pool, &sessions, rng)
        });
    }
    for w in 0..TUNNEL_WORKERS {
        let (sh, rng) = (Arc::clone(&shared), master.fork());
        spawn(&mut workers, &shared, format!("tunnel-{w}"), move || {
            tunnel_worker(&sh, ports.public, rng)
        });
    }
    {
        let (sh, feed, stats, rng) = (
            Arc::clone(&shared),
            Arc::clone(&feed),
            Arc::clone(&feed_stats),
            master.fork(),
        );
        spawn(&mut workers, &shared, "publisher".into(), move || {
            publisher(&sh, &ports, &feed, &stats, rng)
        });
    }
    for w in 0..SUBSCRIBERS {
        let (sh, feed, rng) = (Arc::clone(&shared), Arc::clone(&feed), master.fork());
        spawn(
            &mut workers,
            &shared,
            format!("subscriber-{w}"),
            move || subscriber(&sh, &ports, &feed, rng),
        );
    }
    {
        let (sh, rng) = (Arc::clone(&shared), master.fork());
        spawn(&mut workers, &shared, "admin".into(), move || {
            admin_poller(&sh, ports.admin, rng)
        });
    }

    // ----- memory, every second, while the load runs -----
    let load_start = Instant::now();
    let deadline = load_start + Duration::from_secs(secs);
    let mut samples = vec![rss()];
    let mut next_sample = load_start + Duration::from_secs(1);
    while Instant::now() < deadline && shared.running() {
        thread::sleep(Duration::from_millis(50));
        if Instant::now() >= next_sample {
            samples.push(rss());
            next_sample += Duration::from_secs(1);
        }
    }
    let load_time = load_start.elapsed();
    shared.stop.store(true, Ordering::Relaxed);

    // ----- wind down -----
    let finished = wait_until(Duration::from_secs(90), || {
        workers.iter().all(|(_, h)| h.is_finished())
    });
    if !finished {
        let stuck: Vec<&str> = workers
            .iter()
            .filter(|(_, h)| !h.is_finished())
            .map(|(n, _)| n.as_str())
            .collect();
        panic!("workers did not finish within 90 s: {stuck:?} (seed {seed})");
    }
    let mut total = Counts::default();
    for (_, h) in workers {
        total.add(&h.join().unwrap());
    }
    let failures = shared.failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "soak failed (seed {seed}, SWITCHBOARD_SOAK_SEED={seed} to replay):\n{}",
        failures.join("\n")
    );
    // Applications and devices parked for a next session leave too.
    pool.lock().unwrap().clear();

    // ----- every connection gone -----
    let closing = Instant::now();
    wait_for(
        "the engine back to its baseline connections",
        Duration::from_secs(10),
        || engine.stats().connections == BASELINE_CONNECTIONS,
        || {
            format!(
                "{}; router online {}, tunnel streams {}/{}, subscribers {}",
                brief(&engine.stats()),
                router_stats.online.load(Ordering::Relaxed),
                server_stats.streams.load(Ordering::Relaxed),
                agent_stats.streams.load(Ordering::Relaxed),
                feed_stats.subscribers.load(Ordering::Relaxed),
            )
        },
    );
    let settled_in = closing.elapsed();
    assert_eq!(
        router_stats.online.load(Ordering::Relaxed),
        0,
        "router online"
    );
    assert_eq!(
        server_stats.streams.load(Ordering::Relaxed),
        0,
        "server streams"
    );
    assert_eq!(
        agent_stats.streams.load(Ordering::Relaxed),
        0,
        "agent streams"
    );
    assert_eq!(
        feed_stats.subscribers.load(Ordering::Relaxed),
        0,
        "subscribers"
    );

    // ----- the admin counters agree with what the test did -----
    let (code, body) = http_get(ports.admin, "/metrics").unwrap();
    assert_eq!(code, 200);
    let m = String::from_utf8(body).unwrap();
    let router_l = "role=\"router\"";
    let server_l = "role=\"tunnel_server\"";
    let agent_l = "role=\"tunnel_agent\"";
    let feed_l = "role=\"broadcast\"";
    // The request being answered is the only client.
    assert_eq!(
        metric(&m, "switchboard_connections", ""),
        BASELINE_CONNECTIONS + 1,
        "connections while /metrics is answered"
    );
    assert_eq!(
        metric(&m, "switchboard_router_identified_total", router_l),
        total.router_identified,
        "identifications: the router's count and the devices the test identified"
    );
    assert_eq!(
        metric(&m, "switchboard_router_unknown_total", router_l),
        total.router_unknown,
        "unknown ids"
    );
    assert_eq!(metric(&m, "switchboard_router_online_devices", router_l), 0);
    assert_eq!(
        metric(&m, "switchboard_router_pending_connections", router_l),
        0
    );
    for l in [server_l, agent_l] {
        assert_eq!(
            metric(&m, "switchboard_tunnel_streams_opened_total", l),
            total.tunnel_streams,
            "{l}: streams opened, and the streams the test opened"
        );
        assert_eq!(
            metric(&m, "switchboard_tunnel_streams", l),
            0,
            "{l}: open streams"
        );
        assert_eq!(
            metric(&m, "switchboard_tunnel_refused_streams_total", l),
            0,
            "{l}"
        );
        assert_eq!(
            metric(&m, "switchboard_tunnel_links_total", l),
            1,
            "{l}: one link throughout"
        );
        assert_eq!(
            metric(&m, "switchboard_tunnel_link_up", l),
            1,
            "{l}: still linked"
        );
        assert_eq!(
            metric(&m, "switchboard_tunnel_malformed_frames_total", l),
            0,
            "{l}"
        );
        assert_eq!(
            metric(&m, "switchboard_tunnel_unknown_frames_total", l),
            0,
            "{l}"
        );
    }
    assert_eq!(
        metric(&m, "switchboard_tunnel_reconnects_total", agent_l),
        0
    );
    let dropped = metric(&m, "switchboard_broadcast_dropped_records_total", feed_l);
    assert_eq!(
        metric(&m, "switchboard_broadcast_records_total", feed_l),
        total.feed_published,
        "records: the role's count and the records the test published"
    );
    assert_eq!(metric(&m, "switchboard_broadcast_subscribers", feed_l), 0);
    assert_eq!(metric(&m, "switchboard_broadcast_publishers", feed_l), 0);
    assert_eq!(
        metric(&m, "switchboard_broadcast_slow_disconnects_total", feed_l),
        0
    );
    assert_eq!(
        metric(&m, "switchboard_broadcast_oversized_records_total", feed_l),
        0
    );
    // drop-oldest drops a record only to queue a later one, so a drop is a
    // gap for a subscriber that reads on; every connection that stalled
    // reads past its stall before it closes, and one that never stalled had
    // nothing dropped (checked by the subscribers): the gaps seen are exactly
    // the role's drops.
    assert_eq!(
        total.feed_gaps, dropped,
        "records the subscribers saw missing, and records the role dropped"
    );
    let replaced = metric(&m, "switchboard_router_replaced_total", router_l);
    let router_dropped = metric(&m, "switchboard_router_dropped_bytes_total", router_l);
    // Deliberate takeovers, and a next device that identified before the
    // router read the previous one's FIN.
    assert!(
        replaced >= total.router_takeovers,
        "the router replaced {replaced} devices, the test took over {}",
        total.router_takeovers
    );
    wait_for(
        "the admin client gone",
        Duration::from_secs(10),
        || engine.stats().connections == BASELINE_CONNECTIONS,
        || brief(&engine.stats()),
    );

    // ----- memory -----
    samples.push(rss());
    let max = *samples.iter().max().unwrap();
    // The thirds are of the samples taken under load (not the one before it).
    let loaded = &samples[1..samples.len() - 1];
    let third = (loaded.len() / 3).max(1);
    let avg = |s: &[u64]| s.iter().sum::<u64>() / s.len().max(1) as u64;
    let first = avg(&loaded[..third.min(loaded.len())]);
    let last = avg(&loaded[loaded.len().saturating_sub(third)..]);
    let shown: Vec<String> = samples.iter().map(|&b| format!("{:.1}", mib(b))).collect();

    // ----- report -----
    let t = &total;
    let per_s = |n: u64| n as f64 / load_time.as_secs_f64();
    eprintln!(
        "soak: seed {seed}, load {load_time:.1?}, whole test {:.1?}\n\
         router: {} sessions ({:.1}/s): {} normal, {} device RST, {} device FIN mid-message, \
         {} application RST; {} unknown ids; {} applications opened, {} reused; {} probes; \
         {} messages, {:.1} MiB checked; {} bytes overtaken by resets; \
         {} takeovers ({replaced} replacements in all); \
         {router_dropped} bytes dropped by the router (device or application gone)\n\
         tunnel: {} streams ({:.1}/s): {} half-closed, {} read back, {} closed early, {} reset; \
         {:.1} MiB sent, {:.1} MiB echoed and checked; largest {:.1} MiB\n\
         broadcast: {} records published ({:.0}/s) over {} publisher connections; \
         {} subscriber connections, {} stalls, {} abrupt quits; {} records received and checked; \
         {} seen missing (on {} connections), {dropped} dropped by the role\n\
         admin: {} requests, slowest {:.1?}\n\
         connections back to baseline {settled_in:.1?} after the clients left\n\
         VmRSS MiB (1/s): [{}]\n\
         VmRSS max {:.1} MiB, first third avg {:.1} MiB, last third avg {:.1} MiB",
        began.elapsed(),
        t.router_identified,
        per_s(t.router_identified),
        t.router_normal,
        t.router_device_resets,
        t.router_device_fins,
        t.router_app_resets,
        t.router_unknown,
        t.router_apps,
        t.router_apps_reused,
        t.router_probes,
        t.router_msgs,
        mib(t.router_bytes),
        t.router_reset_unarrived,
        t.router_takeovers,
        t.tunnel_streams,
        per_s(t.tunnel_streams),
        t.tunnel_half_closed,
        t.tunnel_read_back,
        t.tunnel_early,
        t.tunnel_resets,
        mib(t.tunnel_bytes_sent),
        mib(t.tunnel_bytes_echoed),
        mib(t.tunnel_largest),
        t.feed_published,
        per_s(t.feed_published),
        t.feed_publisher_conns,
        t.feed_subscriber_conns,
        t.feed_stalls,
        t.feed_abrupt,
        t.feed_received,
        t.feed_gaps,
        t.feed_gappy_conns,
        t.admin_requests,
        t.admin_max_latency,
        shown.join(" "),
        mib(max),
        mib(first),
        mib(last),
    );

    assert!(
        t.router_identified > 0 && t.router_normal > 0,
        "router sessions ran"
    );
    assert!(
        t.tunnel_streams > 0 && t.tunnel_half_closed > 0,
        "tunnel streams ran"
    );
    assert!(
        t.feed_published > 0 && t.feed_received > 0,
        "records flowed"
    );
    assert!(t.admin_requests > 0, "admin answered");
    assert!(
        max < RSS_MAX,
        "VmRSS peaked at {:.1} MiB (bound {:.0} MiB)",
        mib(max),
        mib(RSS_MAX)
    );
    assert!(
        last <= first + first / 4 + RSS_GROWTH,
        "VmRSS grew: first third {:.1} MiB, last third {:.1} MiB",
        mib(first),
        mib(last)
    );
    engine.stop();
}
