//! The tunnel session core (`proto::tunnel::Session`) driven directly: a
//! server session and an agent session joined by an in-memory link, with the
//! harness playing both adapters (`role::tunnel`): it carries each side's
//! `transmit()` bytes and the DATA frames it writes itself over the "wire",
//! decodes them on the other side (`TunnelDecoder` + `Frame::parse`), answers
//! the handshake as the roles do, opens, feeds, drains and closes stream
//! "sockets", and moves a clock. The input is a script of such operations,
//! hostile frames and raw bytes included.
//!
//! No sockets, threads, clocks or randomness: time is a fixed `Instant`
//! (taken once per process) plus the offsets the script adds, nonces come
//! from the input, and every input is run twice from scratch; the two runs
//! must give the same trace (a hash of every byte sent and every event), so
//! an artifact replays the same way every time.
//!
//! # Checks (a panic is a finding)
//!
//! - The session never panics (overflow checks are on in fuzz builds).
//! - `transmit()` is always whole, well-formed frames (payload <= 65 535)
//!   that follow docs/PROTOCOL.md as far as one side can tell: no DATA (the
//!   adapter writes it), each handshake frame only from its side and with
//!   id 0 and a well-formed payload, CONNECT only from the server, WINDOW /
//!   SHUTDOWN / PING only with CREDIT / HALF_CLOSE / HEARTBEAT, no unknown
//!   commands.
//! - Streams: the harness tracks the handles it opened and the `Event::End`s
//!   (and its own `stream_closed` calls) that release them. `open_streams()`
//!   and the `streams` gauge equal that count; every event names a handle
//!   the harness holds (only `Stall(h, false)` may name one released in the
//!   same step); `End` releases a handle exactly once; `data_sent` finds
//!   every held stream; `Chunk` is within 1..=`max_data`; `open_streams()` <=
//!   `max_streams`; a call for an id that is not open does nothing.
//! - Links: `links` gauge = `is_up()`; `Up` once per session with the flags
//!   in force (for an agent with a token: only after the server proved it,
//!   hostile server or not); `close_all` hands back exactly the held
//!   handles, once, and the `streams`, `links` and `window_grown_bytes`
//!   gauges return to 0;
//!   `poll_timeout()` is after `now` once `handle_timeout(now)` ran;
//!   `window_grown_bytes` <= `link_window`; the link is paused (`PauseLink`)
//!   exactly while some held stream is stalled (`Stall(h, true)`).
//! - While nothing hostile was injected on the link ("untainted"), the
//!   stream sockets only report full drains (as the engine does) and no
//!   held stream lost a delivery to a closed socket: both sides agree on
//!   the flags; a handshake fails only by REJECT or for a token the server
//!   does not have; no CREDIT violation, credit overflow, id reuse or
//!   unreleased id on a CLOSE_ACK link; no DATA after the peer's SHUTDOWN; a
//!   stream socket's queue never outgrows `Settings::stream_queue` (the
//!   window and the base rule bound it); and on a CLOSE_ACK link every
//!   stream's bytes arrive, in order, at the stream the peer opened for it
//!   (each payload byte encodes its sender and offset), with the CONNECT's
//!   client address the server's. CREDIT liveness: once both wires are
//!   empty and a stream's receiving socket has written everything, the
//!   sending stream has credit again (is read) unless the stream is ending.
//!
//! # Input
//!
//! Six setup bytes (missing bytes read as 0), then operations.
//!
//! | byte | meaning |
//! |------|---------|
//! | 0, 1 | server settings (see [`settings`]) |
//! | 2, 3 | agent settings |
//! | 4    | handshake: bit 0 the service has a token; bits 1-2 the agent's token (0 none, 1 and 3 the service's, 2 a wrong one); bit 3 the agent asks for the extensions; bits 4-5 the name it asks for (`svc`, empty, `other`, 65 bytes) |
//! | 5    | nonce seed |
//!
//! Each operation is one byte: bits 0-3 the opcode, bit 4 the side `x` (0
//! server, 1 agent), bits 5-7 `k` (a stream: the `k % n`-th stream the side
//! holds); arguments follow.
//!
//! | op | name | arguments | what |
//! |----|------|-----------|------|
//! | 0  | PUMP | n | move `n` bytes (0: all) of side `x`'s wire to the other side, which decodes and handles the whole frames (unless its link reading is paused; the agent only once started) |
//! | 1  | START | | agent: the TCP connection is up, `start` (LISTEN) |
//! | 2  | OPEN | p | server: public clients from addresses `p`, `p + 1`, ... (bit 0: IPv6), `open_stream` each: 1, 1, 2, 4, 16, 64, 128 or 256 of them (by `k`; enough to run out of ids), up to the first one refused |
//! | 3  | DATA | len, q | stream `k` of `x` (when the adapter would read it: reading, not at EOF, not closing) read `max(1, chunk * (len + 1) / 256)` bytes: DATA frame on the wire, `data_sent` with `link_queued` = the wire's length (q = 0) or `q` KiB |
//! | 4  | DRAIN | a | stream `k`'s socket wrote everything (a = 0; what the engine reports) or `64 a` bytes, then `stream_drained` |
//! | 5  | EOF | | stream `k`'s socket read EOF: `stream_eof` |
//! | 6  | CLOSED | | stream `k`'s socket is gone: `stream_closed` |
//! | 7  | TIME | t | advance the clock `t` ms (t < 200) or `(t - 199) * 250` ms; `handle_timeout` on each side that is due |
//! | 8  | DRAINED | | `link_drained` on side `x` (spurious; the harness also calls it when a watched wire empties) |
//! | 9  | MODE | m | side `x`'s adapter behaviour: bit 0 slow stream sockets (bytes stay queued until DRAIN); bit 1 `flush` writes nothing; bit 2 every delivery overflows the socket (Full: `stream_closed`); bit 3 every delivery finds the socket closed; bit 4 refuse (server: REJECT the LISTEN with code 1, 2, 4 or 77 by `m >> 6`; agent: refuse CONNECTs); bit 5 server: the public port cannot be opened after HELLO / READY. Kept for the next link |
//! | 10 | FRAME | c, id, ... | hostile: a frame to side `x` appended to the other side's wire: command `c & 15` (see [`COMMANDS`]); with bit 7 of `c` a typed payload (LISTEN / HELLO: flags u16, window u32, nonce byte, name byte; WINDOW u32; PING 8 bytes; CONNECT: address byte, target length, target; AUTH 32 bytes), else a length byte and the payload |
//! | 11 | RAW | n, bytes | hostile: `n` raw bytes to side `x` (may desynchronise the framing) |
//! | 12 | STALE | kind, id | a call for id `id` on side `x` if it is not open: `delivered`, `stream_drained`, `stream_eof`, `stream_closed`, `data_sent`; it must do nothing |
//! | 13 | DOWN | | the link is up: side `x` closes it (k bit 0: gracefully, its wire delivered first; else abort); the link is down: a new link (at most 4 per input) |
//! | 14 | TIMER | | `handle_timeout(now)` on side `x` whether due or not |
//! | 15 | SETTLE | | pump both ways until both wires are empty (at most 32 rounds) |
//!
//! At the end the link is closed and the close checks run.
//! `TUNNEL_SESSION_TRACE=1` prints the operations, frames and events, and
//! the trace hash (the same in every process for the same input).
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use switchboard::codec::Decoded;
use switchboard::codec::tunnel::{
    self, Command, HEADER_LEN, Hello, ListenRequest, MAC_LEN, MAX_PAYLOAD, NONCE_LEN,
    TunnelDecoder, ext, reject,
};
use switchboard::proto::tunnel::{
    AgentHello, Event, Failure, Frame, Incoming, LinkEvent, Listen, Problem, Session, Settings,
    TunnelStats,
};

const SERVER: usize = 0;
const AGENT: usize = 1;
const SIDE: [&str; 2] = ["server", "agent"];
/// The service the server offers.
const SERVICE: &[u8] = b"svc";
const TOKEN: &[u8] = b"fuzz-token-0123456789";
const WRONG_TOKEN: &[u8] = b"fuzz-token-9876543210";
/// Links per input (the first and up to three reconnects).
const MAX_LINKS: u32 = 4;
/// Command bytes for FRAME (`c & 15`).
const COMMANDS: [u8; 16] = [1, 2, 3, 4, 16, 17, 18, 19, 20, 21, 22, 23, 0, 5, 24, 255];

fuzz_target!(|data: &[u8]| {
    let first = run(data, trace_on());
    let again = run(data, false);
    assert_eq!(first, again, "the same input replayed differently");
    if trace_on() {
        // Compare across processes: the same input prints the same hash.
        eprintln!("trace hash {first:016x}");
    }
});

fn trace_on() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("TUNNEL_SESSION_TRACE").is_some_and(|v| v != "0"))
}

/// The clock's origin: one `Instant` per process; only offsets from it
/// reach the sessions, and they use time only relative to earlier `now`s.
fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// Run one script from scratch; returns the trace hash.
fn run(data: &[u8], verbose: bool) -> u64 {
    let mut inp = Input { data, pos: 0 };
    let cfg = Cfg::read(&mut inp);
    let mut w = World::new(cfg, verbose);
    while !inp.done() {
        let op = inp.byte();
        w.step(op, &mut inp);
        w.check();
    }
    w.link_down(None, "end of input");
    w.hash.0
}

struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Input<'_> {
    fn done(&self) -> bool {
        self.pos >= self.data.len()
    }
    fn byte(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.byte(), self.byte()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }
}

/// FNV-1a over everything observable: the determinism check compares it.
struct Hash(u64);

impl Hash {
    fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 = (self.0 ^ u64::from(x)).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn num(&mut self, n: u64) {
        self.bytes(&n.to_le_bytes());
    }
}

/// One side's settings from two bytes (always a configuration the config
/// validation accepts: `max_data` <= `window` <= `max_window`, `link_window`).
///
/// Byte a: bits 0-1 `window` (64, 1000, 4096, 65 536); bits 2-3 `max_data`
/// (1, 64, 512, 16 384; at most `window`); bits 4-5 `max_window` (`window`
/// times 1, 2, 4, 16); bits 6-7 `link_window` (`window` times 1, 2, 8, 64).
/// Byte b: bits 0-2 `max_streams` (1, 2, 3, 4, 8, 16, 64, 256); bits 3-4 the
/// server's id quarantine (0, 10, 100, 2000 ms; the agent has none); bit 5
/// `heartbeat_interval` (10 ms, 1 s); bit 6 `handshake_timeout` (50 ms,
/// 10 s); bit 7 the link's largest accepted frame (65 535, 4096).
fn settings(a: u8, b: u8, server: bool) -> (Settings, usize) {
    let a = usize::from(a);
    let b = usize::from(b);
    let window = [64u32, 1000, 4096, 65_536][a & 3];
    let max_data = [1usize, 64, 512, 16_384][(a >> 2) & 3].min(window as usize);
    let max_window = window * [1, 2, 4, 16][(a >> 4) & 3];
    let link_window = window * [1, 2, 8, 64][(a >> 6) & 3];
    let ms = Duration::from_millis;
    let s = Settings {
        window,
        max_window,
        link_window,
        max_data,
        max_streams: [1, 2, 3, 4, 8, 16, 64, 256][b & 7],
        quarantine: server.then(|| ms([0, 10, 100, 2000][(b >> 3) & 3])),
        heartbeat_interval: ms([10, 1000][(b >> 5) & 1]),
        handshake_timeout: ms([50, 10_000][(b >> 6) & 1]),
    };
    (s, [MAX_PAYLOAD, 4096][(b >> 7) & 1])
}

struct Cfg {
    settings: [Settings; 2],
    max_frame: [usize; 2],
    server_token: Option<&'static [u8]>,
    agent_token: Option<&'static [u8]>,
    extensions: bool,
    name: Vec<u8>,
    seed: u8,
}

impl Cfg {
    fn read(inp: &mut Input<'_>) -> Cfg {
        let (s0, s1, a0, a1, hs, seed) = (
            inp.byte(),
            inp.byte(),
            inp.byte(),
            inp.byte(),
            inp.byte(),
            inp.byte(),
        );
        let (ss, sf) = settings(s0, s1, true);
        let (as_, af) = settings(a0, a1, false);
        Cfg {
            settings: [ss, as_],
            max_frame: [sf, af],
            server_token: (hs & 1 != 0).then_some(TOKEN),
            agent_token: [None, Some(TOKEN), Some(WRONG_TOKEN), Some(TOKEN)]
                [usize::from(hs >> 1) & 3],
            extensions: hs & 8 != 0,
            name: name(hs >> 4),
            seed,
        }
    }
}

fn name(k: u8) -> Vec<u8> {
    match k & 3 {
        0 => SERVICE.to_vec(),
        1 => Vec::new(),
        2 => b"other".to_vec(),
        _ => vec![b'n'; 65],
    }
}

fn nonce(seed: u8, link: u32, salt: u8) -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    for (i, b) in n.iter_mut().enumerate() {
        *b = seed ^ salt ^ (link as u8).wrapping_mul(31) ^ (i as u8).wrapping_mul(17);
    }
    n
}

/// Byte `k` of the stream the harness calls `h`: a misrouted or reordered
/// byte shows.
fn pattern(h: u32, k: u64) -> u8 {
    let x = (k as u32).wrapping_mul(0x9E37_79B1) ^ h.wrapping_mul(0x85EB_CA6B);
    (x >> 24) as u8 ^ (k as u8) ^ ((k >> 8) as u8)
}

/// A stream socket as the harness sees it.
struct Strm {
    handle: u32,
    id: u8,
    /// The adapter reads the socket.
    reading: bool,
    /// The most it reads at a time.
    chunk: usize,
    /// The socket read EOF (reported).
    eof: bool,
    /// `Event::Close`: the socket is closing; no more reads.
    closing: bool,
    /// `Event::ShutdownWrite`.
    shut_write: bool,
    /// `Event::Stall(_, true)` and no `Stall(_, false)` since.
    stalled: bool,
    /// Bytes in its send queue.
    queued: usize,
    /// Bytes read from it and sent / received for it.
    sent: u64,
    recv: u64,
    /// The peer side's handle for the same stream (CLOSE_ACK links).
    peer: Option<u32>,
    /// Server: the client's address.
    client: Option<SocketAddr>,
}

impl Strm {
    fn new(handle: u32, id: u8, max_data: usize) -> Strm {
        Strm {
            handle,
            id,
            reading: true,
            chunk: max_data,
            eof: false,
            closing: false,
            shut_write: false,
            stalled: false,
            queued: 0,
            sent: 0,
            recv: 0,
            peer: None,
            client: None,
        }
    }
}

// Adapter behaviour bits (MODE).
const SLOW: u8 = 1;
const NO_FLUSH: u8 = 2;
const FULL: u8 = 4;
const CLOSED: u8 = 8;
const REFUSE: u8 = 16;
const LISTEN_FAILED: u8 = 32;

struct Side {
    session: Session<u32>,
    stats: Arc<TunnelStats>,
    settings: Settings,
    /// Streams the harness holds, in the order they opened.
    streams: Vec<Strm>,
    /// The handle holding each id (0: none).
    by_id: [u32; 256],
    /// Bytes written to the link and not yet taken by the peer.
    wire: Vec<u8>,
    /// Bytes received and not yet handled.
    rx: Vec<u8>,
    decoder: TunnelDecoder,
    /// `PauseLink`: the adapter stopped reading the link.
    paused: bool,
    /// `AfterSend::watch_link`: call `link_drained` when the wire empties.
    watch_link: bool,
    /// Agent: `start` was called.
    started: bool,
    up_seen: bool,
    mode: u8,
    /// Handles released during the current step.
    released: Vec<u32>,
    next_handle: u32,
}

impl Side {
    fn new(x: usize, cfg: &Cfg, stats: &Arc<TunnelStats>, now: Instant) -> Side {
        let settings = cfg.settings[x];
        let stats = Arc::clone(stats);
        let session = if x == SERVER {
            Session::server(settings, Arc::clone(&stats), now)
        } else {
            Session::agent(settings, Arc::clone(&stats), now)
        };
        Side {
            session,
            stats,
            settings,
            streams: Vec::new(),
            by_id: [0; 256],
            wire: Vec::new(),
            rx: Vec::new(),
            decoder: TunnelDecoder::new(cfg.max_frame[x]),
            paused: false,
            watch_link: false,
            started: x == SERVER,
            up_seen: false,
            mode: 0,
            released: Vec::new(),
            next_handle: (x as u32 + 1) * 1_000_000,
        }
    }

    /// Where stream `h` is in `streams` (ordered by handle: handles grow
    /// and streams are pushed as they open).
    fn pos(&self, h: u32) -> Option<usize> {
        self.streams.binary_search_by_key(&h, |s| s.handle).ok()
    }

    /// The stream `h` an event names: it must be held.
    fn held(&mut self, h: u32, what: &str) -> &mut Strm {
        match self.pos(h) {
            Some(i) => &mut self.streams[i],
            None => panic!("{what} names stream {h}, which the adapter does not hold"),
        }
    }

    fn pick(&self, k: usize) -> Option<usize> {
        (!self.streams.is_empty()).then(|| k % self.streams.len())
    }

    fn id_open(&self, id: u8) -> bool {
        self.by_id[usize::from(id)] != 0
    }

    /// Where the stream holding `id` is in `streams`.
    fn pos_of_id(&self, id: u8) -> Option<usize> {
        match self.by_id[usize::from(id)] {
            0 => None,
            h => self.pos(h),
        }
    }

    fn add(&mut self, st: Strm) {
        self.by_id[usize::from(st.id)] = st.handle;
        self.streams.push(st);
    }

    fn take(&mut self, i: usize) -> Strm {
        let st = self.streams.remove(i);
        self.by_id[usize::from(st.id)] = 0;
        st
    }
}

fn gauge(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

struct World {
    cfg: Cfg,
    now: Instant,
    stats: [Arc<TunnelStats>; 2],
    sides: [Side; 2],
    /// The link is gone (both sessions closed); only DOWN (a new link) acts.
    down: bool,
    /// A close is in progress (its flush is being handled).
    closing: bool,
    /// Hostile bytes went over this link: cross-session checks are off.
    tainted: bool,
    /// A socket reported a partial drain (the engine never does), or a held
    /// stream lost a delivery to a closed socket: the socket-queue bound and
    /// the credit liveness check are off.
    relaxed: bool,
    links: u32,
    hash: Hash,
    verbose: bool,
}

impl World {
    fn new(cfg: Cfg, verbose: bool) -> World {
        let now = base();
        let stats = [
            Arc::new(TunnelStats::default()),
            Arc::new(TunnelStats::default()),
        ];
        let sides = [
            Side::new(SERVER, &cfg, &stats[SERVER], now),
            Side::new(AGENT, &cfg, &stats[AGENT], now),
        ];
        if verbose {
            eprintln!(
                "link 1: server {:?} max_frame {}\n        agent {:?} max_frame {}\n        \
                 service token {}, agent token {}, extensions {}, name {:?}",
                cfg.settings[SERVER],
                cfg.max_frame[SERVER],
                cfg.settings[AGENT],
                cfg.max_frame[AGENT],
                cfg.server_token.is_some(),
                match cfg.agent_token {
                    None => "none",
                    Some(t) if t == TOKEN => "right",
                    Some(_) => "wrong",
                },
                cfg.extensions,
                String::from_utf8_lossy(&cfg.name),
            );
        }
        World {
            cfg,
            now,
            stats,
            sides,
            down: false,
            closing: false,
            tainted: false,
            relaxed: false,
            links: 1,
            hash: Hash(0xcbf2_9ce4_8422_2325),
            verbose,
        }
    }

    fn ms(&self) -> u128 {
        self.now.duration_since(base()).as_millis()
    }

    // ----- operations -----

    fn step(&mut self, op: u8, inp: &mut Input<'_>) {
        for s in &mut self.sides {
            s.released.clear();
        }
        let x = usize::from((op >> 4) & 1);
        let k = usize::from(op >> 5);
        let code = op & 15;
        self.hash.num(u64::from(op));
        if self.verbose {
            eprintln!("[{} ms] op {code} side {} k {k}", self.ms(), SIDE[x]);
        }
        match code {
            0 => {
                let n = inp.byte();
                let n = if n == 0 { usize::MAX } else { usize::from(n) };
                if !self.down {
                    self.pump(x, n);
                }
            }
            1 => {
                if !self.down {
                    self.start();
                }
            }
            2 => {
                let p = inp.byte();
                for i in 0..[1u16, 1, 2, 4, 16, 64, 128, 256][k] {
                    // The rest would be refused the same way.
                    if self.down || !self.open(p.wrapping_add(i as u8)) {
                        break;
                    }
                }
            }
            3 => {
                let (len, q) = (inp.byte(), inp.byte());
                if !self.down {
                    self.data(x, k, len, q);
                }
            }
            4 => {
                let a = inp.byte();
                if !self.down {
                    self.drain(x, k, a);
                }
            }
            5 => {
                if !self.down {
                    self.eof(x, k);
                }
            }
            6 => {
                if !self.down {
                    self.closed(x, k);
                }
            }
            7 => {
                let t = u64::from(inp.byte());
                let ms = if t < 200 { t } else { (t - 199) * 250 };
                self.now += Duration::from_millis(ms);
                if !self.down {
                    for side in [SERVER, AGENT] {
                        let due = self.sides[side]
                            .session
                            .poll_timeout()
                            .is_some_and(|at| at <= self.now);
                        if due {
                            self.timeout(side);
                        }
                    }
                }
            }
            8 => {
                if !self.down {
                    self.sides[x].session.link_drained();
                    self.drive(x);
                }
            }
            9 => {
                let m = inp.byte();
                self.sides[x].mode = m;
            }
            10 => {
                let frame = hostile_frame(inp);
                if !self.down {
                    self.inject(x, &frame);
                }
            }
            11 => {
                let n = usize::from(inp.byte());
                let bytes = inp.bytes(n);
                if !self.down {
                    self.inject(x, &bytes);
                }
            }
            12 => {
                let (kind, id) = (inp.byte(), inp.byte());
                if !self.down {
                    self.stale(x, kind, id);
                }
            }
            13 => {
                if self.down {
                    self.reconnect();
                } else {
                    let graceful = (k & 1 == 1).then_some(x);
                    self.link_down(graceful, "DOWN");
                }
            }
            14 => {
                if !self.down {
                    self.timeout(x);
                }
            }
            _ => {
                if !self.down {
                    self.settle();
                }
            }
        }
        self.writable();
    }

    /// Move up to `n` bytes of side `from`'s wire to the other side, which
    /// handles what it can.
    fn pump(&mut self, from: usize, n: usize) {
        let to = 1 - from;
        let wire = &mut self.sides[from].wire;
        let n = n.min(wire.len());
        let moved: Vec<u8> = wire.drain(..n).collect();
        self.sides[to].rx.extend_from_slice(&moved);
        self.writable();
        self.process_rx(to);
    }

    /// Pump both ways until the wires are empty or nothing moves.
    fn settle(&mut self) {
        for _ in 0..32 {
            if self.down
                || (self.sides[SERVER].wire.is_empty() && self.sides[AGENT].wire.is_empty())
            {
                break;
            }
            self.pump(SERVER, usize::MAX);
            if self.down {
                break;
            }
            self.pump(AGENT, usize::MAX);
        }
    }

    /// The engine's `on_writable` for a link: its queue is empty and a
    /// stream asked to hear of it.
    fn writable(&mut self) {
        for x in [SERVER, AGENT] {
            if self.down {
                return;
            }
            let side = &mut self.sides[x];
            if side.watch_link && side.wire.is_empty() {
                side.watch_link = false;
                side.session.link_drained();
                self.drive(x);
            }
        }
    }

    /// Hostile bytes for side `to`, as if its peer sent them.
    fn inject(&mut self, to: usize, bytes: &[u8]) {
        self.tainted = true;
        self.sides[1 - to].wire.extend_from_slice(bytes);
    }

    fn start(&mut self) {
        if self.sides[AGENT].started {
            return;
        }
        let hello = AgentHello {
            extensions: self.cfg.extensions,
            token: self.cfg.agent_token.map(<[u8]>::to_vec),
            name: self.cfg.name.clone(),
            nonce: nonce(self.cfg.seed, self.links, 0xA5),
        };
        self.sides[AGENT].started = true;
        self.sides[AGENT].session.start(hello, self.now);
        self.drive(AGENT);
        self.link_events(AGENT);
        self.process_rx(AGENT);
    }

    /// Server: a public client; whether it became a stream.
    fn open(&mut self, p: u8) -> bool {
        let peer = if p & 1 == 0 {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, p)), 1000 + u16::from(p))
        } else {
            SocketAddr::new(
                IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, u16::from(p))),
                2000 + u16::from(p),
            )
        };
        let now = self.now;
        let side = &mut self.sides[SERVER];
        let h = side.next_handle;
        side.next_handle += 1;
        let up = side.session.is_up();
        match side.session.open_stream(h, peer, now) {
            Ok(id) => {
                assert!(up, "open_stream gave id {id} before the link is up");
                assert!(!side.id_open(id), "open_stream gave id {id}, which is open");
                let mut st = Strm::new(h, id, side.settings.max_data);
                st.client = Some(peer);
                side.add(st);
                self.hash.num(u64::from(id));
                self.drive(SERVER);
                true
            }
            Err(no) => {
                if up {
                    let open = side.session.open_streams();
                    assert_eq!(no.open, open, "NoId counts the open streams wrong");
                    assert_eq!(no.at_max, open >= side.settings.max_streams);
                    if !no.at_max {
                        assert_eq!(
                            no.open + no.quarantined + no.closing,
                            tunnel_ids(),
                            "open_stream found no id though some are free: {no:?}"
                        );
                    }
                }
                self.drive(SERVER);
                false
            }
        }
    }

    /// A stream socket gave the adapter bytes: one DATA frame.
    fn data(&mut self, x: usize, k: usize, len: u8, q: u8) {
        let side = &mut self.sides[x];
        let Some(i) = side.pick(k) else { return };
        let st = &side.streams[i];
        if !st.reading || st.eof || st.closing {
            return;
        }
        let n = (st.chunk * (usize::from(len) + 1) / 256).max(1);
        let (h, id, from) = (st.handle, st.id, st.sent);
        let Some(head) = tunnel::header(Command::Data, id, n) else {
            panic!("a chunk of {n} bytes does not fit a frame");
        };
        if side.wire.len() + HEADER_LEN + n > side.settings.link_queue() {
            // The engine refuses the send: the adapter aborts the link.
            self.link_down(None, "link queue full");
            return;
        }
        side.wire.extend_from_slice(&head);
        side.wire
            .extend((0..n as u64).map(|j| pattern(h, from + j)));
        side.streams[i].sent += n as u64;
        let link_queued = if q == 0 {
            side.wire.len()
        } else {
            usize::from(q) * 1024
        };
        let Some(after) = side.session.data_sent(id, n, link_queued) else {
            panic!("data_sent: stream {h} (id {id}) is not open in the session");
        };
        let st = &mut side.streams[i];
        if let Some(c) = after.chunk {
            assert!(
                (1..=side.settings.max_data).contains(&c),
                "AfterSend chunk {c} out of range"
            );
            st.chunk = c;
        }
        st.reading = after.reading;
        if after.watch_link {
            side.watch_link = true;
        }
        self.hash.num(n as u64);
        self.hash.num(u64::from(after.reading));
        if self.verbose {
            eprintln!(
                "  {} stream {h}: DATA id {id} {n} bytes, {after:?}",
                SIDE[x]
            );
        }
        self.drive(x);
    }

    fn drain(&mut self, x: usize, k: usize, a: u8) {
        let side = &mut self.sides[x];
        let Some(i) = side.pick(k) else { return };
        let Side {
            session,
            streams,
            mode,
            ..
        } = side;
        let st = &mut streams[i];
        if a == 0 {
            st.queued = 0;
        } else {
            st.queued -= st.queued.min(usize::from(a) * 64);
            if st.queued > 0 {
                self.relaxed = true;
            }
        }
        let no_flush = *mode & NO_FLUSH != 0;
        let (id, queued) = (st.id, st.queued);
        session.stream_drained(id, queued, || {
            if !no_flush {
                st.queued = 0;
            }
            st.queued
        });
        self.drive(x);
    }

    fn eof(&mut self, x: usize, k: usize) {
        let side = &mut self.sides[x];
        let Some(i) = side.pick(k) else { return };
        let st = &mut side.streams[i];
        if st.eof || st.closing {
            return;
        }
        st.eof = true;
        let id = st.id;
        side.session.stream_eof(id);
        self.drive(x);
    }

    fn closed(&mut self, x: usize, k: usize) {
        let side = &mut self.sides[x];
        let Some(i) = side.pick(k) else { return };
        let st = side.take(i);
        side.released.push(st.handle);
        side.session.stream_closed(st.id, self.now);
        self.drive(x);
    }

    fn timeout(&mut self, x: usize) {
        let now = self.now;
        self.sides[x].session.handle_timeout(now);
        if let Some(at) = self.sides[x].session.poll_timeout() {
            assert!(
                at > now,
                "{}: poll_timeout is not after handle_timeout",
                SIDE[x]
            );
        }
        self.drive(x);
        self.link_events(x);
    }

    /// A call for an id the session does not hold: it must change nothing.
    fn stale(&mut self, x: usize, kind: u8, id: u8) {
        let now = self.now;
        let side = &mut self.sides[x];
        if side.id_open(id) {
            return;
        }
        let s = &mut side.session;
        match kind % 5 {
            0 => s.delivered(id, usize::from(kind), 7, || panic!("flush for a stale id")),
            1 => s.stream_drained(id, usize::from(kind), || panic!("flush for a stale id")),
            2 => s.stream_eof(id),
            3 => s.stream_closed(id, now),
            _ => assert!(
                s.data_sent(id, 1, usize::from(kind) * 1024).is_none(),
                "data_sent found stale id {id}"
            ),
        }
        assert!(
            s.transmit().is_empty(),
            "a call for stale id {id} sent a frame"
        );
        assert!(
            s.poll_event().is_none(),
            "a call for stale id {id} made an event"
        );
    }

    fn reconnect(&mut self) {
        if self.links >= MAX_LINKS {
            return;
        }
        self.links += 1;
        let now = self.now;
        for x in [SERVER, AGENT] {
            let mode = self.sides[x].mode;
            self.sides[x] = Side::new(x, &self.cfg, &self.stats[x], now);
            self.sides[x].mode = mode;
        }
        self.down = false;
        self.tainted = false;
        self.relaxed = false;
        if self.verbose {
            eprintln!("link {}", self.links);
        }
    }

    // ----- the adapter -----

    /// What `Links::drive` does: the session's bytes to the wire (checked),
    /// its stream events applied.
    fn drive(&mut self, x: usize) {
        if self.down {
            return;
        }
        let World {
            sides,
            hash,
            verbose,
            tainted,
            ..
        } = self;
        let side = &mut sides[x];
        let mut full = false;
        let out = side.session.transmit();
        if !out.is_empty() {
            check_transmit(x, &side.session, out, *verbose);
            hash.bytes(out);
            full = side.wire.len() + out.len() > side.settings.link_queue();
            side.wire.extend_from_slice(out);
            side.session.transmitted();
        }
        let close_ack = side.session.has(ext::CLOSE_ACK);
        while let Some(ev) = side.session.poll_event() {
            if *verbose {
                eprintln!("  {} event {ev:?}", SIDE[x]);
            }
            match ev {
                Event::End(h, how) => {
                    hash.num(1);
                    hash.num(u64::from(h));
                    hash.num(how as u64);
                    let Some(i) = side.pos(h) else {
                        panic!("End({h}, {how:?}) for a stream the adapter does not hold");
                    };
                    side.take(i);
                    side.released.push(h);
                }
                Event::Close(h) => {
                    hash.num(2);
                    hash.num(u64::from(h));
                    side.held(h, "Close").closing = true;
                }
                Event::ShutdownWrite(h) => {
                    hash.num(3);
                    hash.num(u64::from(h));
                    side.held(h, "ShutdownWrite").shut_write = true;
                }
                Event::Reading(h, on) => {
                    hash.num(4);
                    hash.num(u64::from(h) << 1 | u64::from(on));
                    side.held(h, "Reading").reading = on;
                }
                Event::Chunk(h, n) => {
                    hash.num(5);
                    hash.num(u64::from(h));
                    hash.num(n as u64);
                    assert!(
                        (1..=side.settings.max_data).contains(&n),
                        "Chunk({h}, {n}) out of 1..=max_data"
                    );
                    side.held(h, "Chunk").chunk = n;
                }
                Event::Stall(h, on) => {
                    hash.num(6);
                    hash.num(u64::from(h) << 1 | u64::from(on));
                    if on || !side.released.contains(&h) {
                        side.held(h, "Stall").stalled = on;
                    }
                }
                Event::PauseLink => {
                    hash.num(7);
                    side.paused = true;
                }
                Event::ResumeLink => {
                    hash.num(8);
                    assert!(side.paused, "ResumeLink for a link that is not paused");
                    side.paused = false;
                }
                Event::Problem(p) => {
                    hash.num(9);
                    match p {
                        Problem::CreditExceeded { id, len } => {
                            assert!(
                                *tainted,
                                "{}: stream {id} got {len} bytes beyond its credit from a real peer",
                                SIDE[x]
                            );
                        }
                        Problem::IdReused { id } | Problem::IdNotReleased { id } => {
                            assert!(
                                *tainted || !close_ack,
                                "{}: {p:?} on a CLOSE_ACK link between real sessions (id {id})",
                                SIDE[x]
                            );
                        }
                    }
                }
            }
        }
        if full {
            self.link_down(None, "link queue full");
        }
    }

    /// Decode and handle side `x`'s received bytes while it reads the link.
    fn process_rx(&mut self, x: usize) {
        let mut rx = std::mem::take(&mut self.sides[x].rx);
        let mut pos = 0;
        while !self.down && !self.sides[x].paused && self.sides[x].started {
            let Some(rest) = rx.get(pos..) else { break };
            match self.sides[x].decoder.decode(rest) {
                Ok(Decoded::Frame(f, n)) => {
                    pos += n;
                    self.on_frame(x, f.raw);
                }
                Ok(Decoded::NeedMore) => break,
                Ok(Decoded::Skipped(n)) => pos += n,
                Err(e) => {
                    if self.verbose {
                        eprintln!("  {}: {e}", SIDE[x]);
                    }
                    self.link_down(None, "framing error");
                    break;
                }
            }
        }
        if !self.down {
            let arrived = std::mem::take(&mut self.sides[x].rx);
            rx.drain(..pos.min(rx.len()));
            rx.extend_from_slice(&arrived);
            self.sides[x].rx = rx;
        }
    }

    /// `Links::on_frame` and the roles' answers.
    fn on_frame(&mut self, x: usize, raw: &[u8]) {
        let Some(frame) = Frame::parse(raw) else {
            panic!("a decoded frame does not parse: {raw:?}");
        };
        if self.verbose {
            eprintln!(
                "  -> {} {} id {} ({} bytes)",
                SIDE[x],
                frame.name(),
                raw[3],
                raw.len()
            );
        }
        let now = self.now;
        let incoming = self.sides[x].session.handle(frame, now);
        self.drive(x);
        if self.down {
            return;
        }
        match incoming {
            Incoming::Nothing => {}
            Incoming::Deliver {
                stream,
                id,
                payload,
            } => self.deliver(x, stream, id, payload),
            Incoming::Listen(l) => {
                assert_eq!(x, SERVER, "Incoming::Listen on the agent");
                self.on_listen(l);
            }
            Incoming::Authenticated { flags, peer_window } => {
                assert_eq!(x, SERVER, "Incoming::Authenticated on the agent");
                self.activate(flags, peer_window);
            }
            Incoming::AuthFailed => {
                assert_eq!(x, SERVER, "Incoming::AuthFailed on the agent");
                self.refuse(Some(reject::AUTH_FAILED));
            }
            Incoming::Connect { id, client, target } => {
                assert_eq!(x, AGENT, "Incoming::Connect on the server");
                self.on_connect(id, client, target);
            }
        }
        self.link_events(x);
    }

    /// `Links::deliver`: DATA onto a stream socket.
    fn deliver(&mut self, x: usize, h: u32, id: u8, payload: &[u8]) {
        let len = payload.len();
        self.hash.num(u64::from(h));
        self.hash.num(len as u64);
        let (tainted, relaxed) = (self.tainted, self.relaxed);
        let side = &mut self.sides[x];
        let Some(i) = side.pos(h) else {
            panic!("Deliver to stream {h}, which the adapter does not hold");
        };
        let stream_queue = side.settings.stream_queue();
        let Side {
            session,
            streams,
            by_id,
            mode,
            released,
            ..
        } = side;
        let st = &mut streams[i];
        assert_eq!(st.id, id, "Deliver names stream {h} with id {id}");
        assert!(len > 0, "Deliver of an empty payload");
        if !tainted {
            assert!(
                !st.shut_write,
                "{}: DATA on id {id} after the peer's SHUTDOWN",
                SIDE[x]
            );
            if let Some(p) = st.peer {
                for (j, &b) in payload.iter().enumerate() {
                    assert_eq!(
                        b,
                        pattern(p, st.recv + j as u64),
                        "{}: stream {h} (id {id}) byte {} is not stream {p}'s",
                        SIDE[x],
                        st.recv + j as u64
                    );
                }
            }
        }
        st.recv += len as u64;
        if *mode & CLOSED != 0 || st.closing {
            // SendError::Closed: the socket is going; counted as stale.
            if !st.closing {
                // Bytes lost on a stream that stays: its credit is not given back.
                self.relaxed = true;
            }
            return;
        }
        if *mode & FULL != 0 || st.queued + len > stream_queue {
            assert!(
                *mode & FULL != 0 || tainted || relaxed,
                "{}: stream {h} (id {id}) queue would hold {} bytes, over stream_queue {stream_queue}",
                SIDE[x],
                st.queued + len
            );
            // SendError::Full: abort the socket, report it gone.
            let h = st.handle;
            streams.remove(i);
            by_id[usize::from(id)] = 0;
            released.push(h);
            session.stream_closed(id, self.now);
        } else {
            if *mode & SLOW != 0 {
                st.queued += len;
            }
            let no_flush = *mode & NO_FLUSH != 0;
            session.delivered(id, len, st.queued, || {
                if !no_flush {
                    st.queued = 0;
                }
                st.queued
            });
        }
        self.drive(x);
    }

    /// Server: the role's answer to a LISTEN (`TunnelServer::on_listen`).
    fn on_listen(&mut self, l: Listen<'_>) {
        let token = self.cfg.server_token;
        let refuse_all = self.sides[SERVER].mode & REFUSE != 0;
        let code = [
            reject::UNKNOWN_SERVICE,
            reject::AUTH_FAILED,
            reject::MALFORMED,
            77,
        ][usize::from(self.sides[SERVER].mode >> 6)];
        let req = match l {
            Listen::Base => {
                if token.is_none() && !refuse_all {
                    self.activate(0, 0);
                } else {
                    self.refuse(None);
                }
                return;
            }
            Listen::Malformed => return self.refuse(Some(reject::MALFORMED)),
            Listen::Request(req) => req,
        };
        let known = req.name == SERVICE || (req.name.is_empty() && token.is_none());
        if !known {
            return self.refuse(Some(reject::UNKNOWN_SERVICE));
        }
        if token.is_some() && req.flags & ext::AUTH == 0 {
            return self.refuse(Some(reject::AUTH_REQUIRED));
        }
        if refuse_all {
            return self.refuse(Some(code));
        }
        let n = nonce(self.cfg.seed, self.links, 0x5A);
        let offer = self.sides[SERVER].session.offer(&req, SERVICE, token, n);
        self.drive(SERVER);
        if let Some((flags, window)) = offer {
            assert_eq!(
                token, None,
                "offer brought the link up though AUTH is pending"
            );
            self.activate(flags, window);
        }
    }

    /// Server: `TunnelServer::activate`.
    fn activate(&mut self, flags: u16, peer_window: u32) {
        if self.down {
            return;
        }
        if self.sides[SERVER].mode & LISTEN_FAILED != 0 {
            return self.refuse((flags != 0).then_some(reject::LISTEN_FAILED));
        }
        let now = self.now;
        self.sides[SERVER].session.link_up(flags, peer_window, now);
        self.drive(SERVER);
    }

    /// Server: REJECT (extended agents) and close the link once it is written.
    fn refuse(&mut self, code: Option<u8>) {
        if self.down {
            return;
        }
        self.sides[SERVER]
            .session
            .reject(code, "refused by the fuzz harness");
        self.drive(SERVER);
        self.link_down(Some(SERVER), "refused");
    }

    /// Agent: `TunnelAgent::on_connect` (the target is always allowed
    /// unless the mode refuses).
    fn on_connect(&mut self, id: u8, client: Option<SocketAddr>, target: &[u8]) {
        let now = self.now;
        let tainted = self.tainted;
        let [server, agent] = &mut self.sides;
        let full = agent.session.open_streams() >= agent.settings.max_streams;
        if agent.mode & REFUSE != 0 || full {
            agent.session.refuse_stream(id, now);
            self.drive(AGENT);
            return;
        }
        assert!(
            !agent.id_open(id),
            "Incoming::Connect for id {id}, which is open"
        );
        let h = agent.next_handle;
        agent.next_handle += 1;
        let mut st = Strm::new(h, id, agent.settings.max_data);
        if !tainted && agent.session.has(ext::CLOSE_ACK) {
            // The server's stream with this id sent this CONNECT: with
            // CLOSE_ACK it cannot have reused the id meanwhile.
            if let Some(i) = server.pos_of_id(id) {
                let s = &mut server.streams[i];
                assert!(target.is_empty(), "CONNECT from the server with a target");
                if agent.session.has(ext::PEER_ADDR) {
                    assert_eq!(client, s.client, "CONNECT carries another client address");
                } else {
                    assert_eq!(client, None);
                }
                s.peer = Some(h);
                st.peer = Some(s.handle);
            }
        }
        agent.add(st);
        agent.session.accept_stream(id, h);
        self.drive(AGENT);
    }

    /// What the roles do with link events.
    fn link_events(&mut self, x: usize) {
        while !self.down {
            let Some(ev) = self.sides[x].session.poll_link_event() else {
                return;
            };
            if self.verbose {
                eprintln!("  {} link event {ev:?}", SIDE[x]);
            }
            let side = &mut self.sides[x];
            match ev {
                LinkEvent::Up { flags } => {
                    self.hash.num(10);
                    self.hash.num(u64::from(flags));
                    assert!(side.session.is_up(), "Up while the session is not up");
                    assert_eq!(flags, side.session.flags(), "Up names other flags");
                    assert!(!side.up_seen, "a second Up");
                    side.up_seen = true;
                    if x == AGENT && self.cfg.extensions && self.cfg.agent_token.is_some() {
                        // Even against a hostile server: it must have proven the token.
                        assert_ne!(
                            flags & ext::AUTH,
                            0,
                            "an agent with a token came up without the server proving it"
                        );
                    }
                }
                LinkEvent::HandshakeTimeout => {
                    self.hash.num(11);
                    assert!(!side.session.is_up(), "HandshakeTimeout on an up link");
                    self.link_down(Some(x), "handshake timeout");
                }
                LinkEvent::Failed(why) => {
                    self.hash.num(12);
                    let abort = matches!(why, Failure::CreditOverflow { .. });
                    // Between real sessions a handshake fails only as the
                    // server decided (REJECT) or for a token it has not got.
                    let legit = matches!(why, Failure::Rejected { .. } | Failure::TokenNotAsked);
                    assert!(
                        legit || self.tainted,
                        "{}: {why} between real sessions",
                        SIDE[x]
                    );
                    self.link_down((!abort).then_some(x), "failed");
                }
            }
        }
    }

    /// The link is gone: side `graceful` (if any) had its wire delivered
    /// first; both adapters reset their streams (`Links::remove`).
    fn link_down(&mut self, graceful: Option<usize>, why: &str) {
        if self.down || self.closing {
            return;
        }
        if self.verbose {
            eprintln!(
                "  link down ({why}; graceful from {:?})",
                graceful.map(|x| SIDE[x])
            );
        }
        self.closing = true;
        if let Some(x) = graceful {
            self.pump(x, usize::MAX);
        }
        self.closing = false;
        self.down = true;
        self.hash.num(13);
        for x in [SERVER, AGENT] {
            let side = &mut self.sides[x];
            let mut got = Vec::new();
            side.session.close_all(|h| got.push(h));
            got.sort_unstable();
            let mut want: Vec<u32> = side.streams.iter().map(|s| s.handle).collect();
            want.sort_unstable();
            assert_eq!(
                got, want,
                "{}: close_all and the adapter disagree on the streams",
                SIDE[x]
            );
            side.streams.clear();
            side.by_id = [0; 256];
            let st = &side.stats;
            for _ in 0..2 {
                assert_eq!(
                    gauge(&st.streams),
                    0,
                    "{}: streams gauge after close_all",
                    SIDE[x]
                );
                assert_eq!(
                    gauge(&st.links),
                    0,
                    "{}: links gauge after close_all",
                    SIDE[x]
                );
                assert_eq!(
                    gauge(&st.window_grown_bytes),
                    0,
                    "{}: window_grown_bytes after close_all",
                    SIDE[x]
                );
                side.session
                    .close_all(|h| panic!("{}: a second close_all yields {h}", SIDE[x]));
            }
        }
    }

    /// After every step.
    fn check(&self) {
        if self.down {
            return;
        }
        for (x, side) in self.sides.iter().enumerate() {
            let s = &side.session;
            let open = s.open_streams();
            assert!(s.transmit().is_empty());
            assert_eq!(
                side.streams.len(),
                open,
                "{}: open_streams() and the adapter's streams differ",
                SIDE[x]
            );
            assert_eq!(
                gauge(&side.stats.streams),
                open as u64,
                "{}: streams gauge",
                SIDE[x]
            );
            assert_eq!(
                gauge(&side.stats.links),
                u64::from(s.is_up()),
                "{}: links gauge",
                SIDE[x]
            );
            assert!(
                open <= side.settings.max_streams,
                "{}: over max_streams",
                SIDE[x]
            );
            assert!(
                gauge(&side.stats.window_grown_bytes) <= u64::from(side.settings.link_window),
                "{}: window growth over link_window",
                SIDE[x]
            );
            if !s.is_up() {
                assert_eq!(open, 0);
            }
            assert_eq!(
                side.paused,
                side.streams.iter().any(|s| s.stalled),
                "{}: the link is paused iff a stream socket is over its window (stalled)",
                SIDE[x]
            );
        }
        let [a, b] = &self.sides;
        if !self.tainted && a.session.is_up() && b.session.is_up() {
            assert_eq!(
                a.session.flags(),
                b.session.flags(),
                "the sessions disagree on the extensions"
            );
            self.check_credit_liveness();
        }
    }

    /// CREDIT liveness: once everything sent has arrived and the receiving
    /// socket has written it all, the sender has credit again (a WINDOW
    /// went out), unless that stream is ending.
    fn check_credit_liveness(&self) {
        let quiet = self
            .sides
            .iter()
            .all(|s| s.wire.is_empty() && s.rx.is_empty() && !s.paused);
        if self.relaxed || !quiet || !self.sides[SERVER].session.has(ext::CREDIT) {
            return;
        }
        for x in [SERVER, AGENT] {
            let other = &self.sides[1 - x];
            for st in &self.sides[x].streams {
                if st.eof || st.closing {
                    continue;
                }
                let Some(p) = st
                    .peer
                    .and_then(|p| other.pos(p))
                    .map(|i| &other.streams[i])
                else {
                    continue;
                };
                if p.closing || p.queued > 0 {
                    continue;
                }
                assert!(
                    st.reading,
                    "{}: stream {} (id {}) has no credit though stream {} drained everything",
                    SIDE[x], st.handle, st.id, p.handle
                );
            }
        }
    }
}

fn tunnel_ids() -> usize {
    switchboard::proto::tunnel::IDS
}

/// Check the bytes side `x`'s session asks to send.
fn check_transmit(x: usize, s: &Session<u32>, out: &[u8], verbose: bool) {
    let mut dec = TunnelDecoder::new(MAX_PAYLOAD);
    let mut rest = out;
    let up = s.is_up();
    while !rest.is_empty() {
        let (raw, n) = match dec.decode(rest) {
            Ok(Decoded::Frame(f, n)) => (f.raw, n),
            Ok(other) => panic!("{}: transmit ends in a partial frame ({other:?})", SIDE[x]),
            Err(e) => panic!("{}: transmit holds a frame over 65 535 bytes: {e}", SIDE[x]),
        };
        rest = &rest[n..];
        let Some(f) = Frame::parse(raw) else {
            panic!("{}: transmit holds a frame that does not parse", SIDE[x]);
        };
        if verbose {
            eprintln!(
                "  {} sends {} id {} ({} bytes)",
                SIDE[x],
                f.name(),
                raw[3],
                raw.len()
            );
        }
        let id = raw[3];
        let from = |side: usize| assert_eq!(x, side, "{} sent {}", SIDE[x], f.name());
        let link_level = || assert_eq!(id, 0, "{} sent {} with id {id}", SIDE[x], f.name());
        match f {
            Frame::Data { .. } => panic!("{}: DATA in transmit (the adapter writes DATA)", SIDE[x]),
            Frame::Connect { payload, .. } => {
                from(SERVER);
                assert!(up, "CONNECT before the link is up");
                if s.has(ext::PEER_ADDR) {
                    let (_, target) = tunnel::parse_peer(payload).expect("CONNECT address");
                    assert!(target.is_empty());
                } else {
                    assert!(payload.is_empty(), "CONNECT payload without PEER_ADDR");
                }
            }
            Frame::Close { .. } => assert!(up, "{}: CLOSE before the link is up", SIDE[x]),
            Frame::Window { increment, .. } => {
                assert!(s.has(ext::CREDIT), "{}: WINDOW without CREDIT", SIDE[x]);
                assert!(increment.is_some(), "{}: malformed WINDOW", SIDE[x]);
            }
            Frame::Shutdown { .. } => {
                assert!(
                    s.has(ext::HALF_CLOSE),
                    "{}: SHUTDOWN without HALF_CLOSE",
                    SIDE[x]
                );
            }
            Frame::Listen(l) => {
                from(AGENT);
                link_level();
                assert!(
                    !matches!(l, Listen::Malformed),
                    "agent sent a malformed LISTEN"
                );
            }
            Frame::Hello(h) => {
                from(SERVER);
                link_level();
                let h = h.expect("server sent a malformed HELLO");
                assert_eq!(h.flags & !ext::ALL, 0, "HELLO grants unknown bits");
            }
            Frame::Auth(tag) => {
                from(AGENT);
                link_level();
                assert!(tag.is_some(), "agent sent a malformed AUTH");
            }
            Frame::Ready(tag) => {
                from(SERVER);
                link_level();
                assert!(
                    tag.is_empty() || tag.len() == MAC_LEN,
                    "READY tag of {} bytes",
                    tag.len()
                );
            }
            Frame::Reject { text, .. } => {
                from(SERVER);
                link_level();
                assert!(text.len() <= 96, "REJECT text of {} bytes", text.len());
            }
            Frame::Ping(p) => {
                link_level();
                assert!(p.is_some(), "{}: malformed PING", SIDE[x]);
                assert!(s.has(ext::HEARTBEAT), "{}: PING without HEARTBEAT", SIDE[x]);
            }
            Frame::Pong => link_level(),
            Frame::Unknown(c) => panic!("{}: sent unknown command {c}", SIDE[x]),
        }
    }
}

/// FRAME's bytes: a whole frame (typed or raw payload).
fn hostile_frame(inp: &mut Input<'_>) -> Vec<u8> {
    let c = inp.byte();
    let command = COMMANDS[usize::from(c & 15)];
    let id = inp.byte();
    let mut payload = Vec::new();
    let typed = c & 0x80 != 0;
    match (typed, command) {
        (true, 4 | 16) => {
            let flags = inp.u16();
            let window = inp.u32();
            let nonce = [inp.byte(); NONCE_LEN];
            let name = name(inp.byte());
            if command == 4 {
                let req = ListenRequest {
                    flags,
                    window,
                    nonce,
                    name: &name,
                };
                if req.encode(&mut payload).is_none() {
                    payload.clear();
                }
            } else {
                payload.extend_from_slice(
                    &Hello {
                        flags,
                        window,
                        nonce,
                    }
                    .encode(),
                );
            }
        }
        (true, 22) => payload.extend_from_slice(&inp.u32().to_be_bytes()),
        (true, 20) => payload = inp.bytes(8),
        (true, 17) => payload = vec![inp.byte(); MAC_LEN],
        (true, 1) => {
            let p = inp.byte();
            let ip = if p & 1 == 0 {
                IpAddr::V4(Ipv4Addr::new(192, 0, 2, p))
            } else {
                IpAddr::V6(Ipv6Addr::LOCALHOST)
            };
            let (addr, n) = tunnel::encode_peer(SocketAddr::new(ip, u16::from(p)));
            payload.extend_from_slice(&addr[..n]);
            let t = usize::from(inp.byte() % 16);
            payload.extend(inp.bytes(t));
        }
        _ => {
            let n = usize::from(inp.byte());
            payload = inp.bytes(n);
        }
    }
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    let len = u16::try_from(payload.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.push(command);
    out.push(id);
    out.extend_from_slice(&payload);
    out
}
