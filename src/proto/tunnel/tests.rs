//! The tunnel session on a virtual clock (docs/PROTOCOL.md is the contract).
//!
//! A [`Pair`] is a server [`Session`] and an agent [`Session`] wired together
//! in memory, in the manner of quinn-proto's test pair: what one side
//! transmits is decoded ([`TunnelDecoder`], then [`Frame::parse`]) and fed to
//! the other; the clock moves only when a test advances it
//! ([`Pair::advance`]), and every deadline fires at exactly its time.
//!
//! Each [`Side`] does what the adapter in `role/tunnel/mod.rs` does
//! (`Links::drive`, `on_frame`, `deliver`, `on_stream_data`) to in-memory
//! stream sockets ([`Socket`]: a public client on the server, the local
//! service on the agent), and what its role decides, cut down to one service
//! ([`Role`]). A test plays the applications at the sockets' far ends
//! ([`Side::write`], [`Side::eof`], [`Side::close`], [`Side::app_reads`]),
//! can mute a side and speak for it with hand-made frames ([`Pair::mute`],
//! [`Pair::inject`]), and reads back exactly what each side sent
//! ([`Side::sent`]), the events it applied ([`Side::events`]), the link
//! events ([`Side::link_events`]), what it asked its role ([`Side::asked`])
//! and its counters ([`Side::stats`]).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly"
)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::auth::{self, Transcript};
use super::{
    AgentHello, End, Event, Failure, Frame, IDS, Incoming, LINK_HIGH, LinkEvent, Listen, NoId,
    Problem, Session, Settings, TunnelStats,
};
use crate::codec::Decoded;
use crate::codec::tunnel::{
    Command, Hello, ListenRequest, NONCE_LEN, TunnelDecoder, encode_peer, ext, header, reject,
};

// ===== the harness =====

const SECOND: Duration = Duration::from_secs(1);
const TOKEN: &[u8] = b"s3cret-0123456789";
const SERVICE: &[u8] = b"svc";
const SERVER_NONCE: [u8; NONCE_LEN] = [0x5e; NONCE_LEN];
const AGENT_NONCE: [u8; NONCE_LEN] = [0xa9; NONCE_LEN];
/// Every extension an agent without a token asks for.
const NO_AUTH: u16 = ext::ALL & !ext::AUTH;

/// The defaults of `[[tunnel_agent]]`; the server's add the id quarantine.
fn settings() -> Settings {
    Settings {
        window: 256 * 1024,
        max_window: 4 << 20,
        link_window: 16 << 20,
        max_data: 16 * 1024,
        max_streams: IDS,
        quarantine: None,
        handshake_timeout: 10 * SECOND,
        heartbeat_interval: 10 * SECOND,
    }
}

fn server_settings() -> Settings {
    Settings {
        quarantine: Some(2 * SECOND),
        ..settings()
    }
}

fn count(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// The address of the public client whose socket is `h`.
fn client_addr(h: u32) -> SocketAddr {
    SocketAddr::from(([198, 51, 100, 7], 40_000 + h as u16))
}

/// One frame as it went onto the link, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sent {
    command: Command,
    id: u8,
    payload: Vec<u8>,
}

fn frame(command: Command, id: u8, payload: &[u8]) -> Sent {
    Sent {
        command,
        id,
        payload: payload.to_vec(),
    }
}

impl Sent {
    /// The frame's bytes on the wire.
    fn raw(&self) -> Vec<u8> {
        let mut v = header(self.command, self.id, self.payload.len())
            .expect("a payload a frame can carry")
            .to_vec();
        v.extend_from_slice(&self.payload);
        v
    }
}

/// The whole frames in `bytes` (a session's transmit holds only whole frames).
fn decode_all(bytes: &[u8]) -> Vec<Sent> {
    let mut decoder = TunnelDecoder::new(usize::MAX);
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        match decoder.decode(rest) {
            Ok(Decoded::Frame(f, used)) => {
                let parsed = crate::codec::tunnel::TunnelFrame::parse(f.raw).expect("one frame");
                out.push(frame(parsed.command, parsed.id, parsed.payload));
                rest = &rest[used..];
            }
            other => panic!("not whole frames: {other:?} in {bytes:?}"),
        }
    }
    out
}

fn window_frame(id: u8, increment: u32) -> Sent {
    frame(Command::Window, id, &increment.to_be_bytes())
}

/// A PING or PONG payload: milliseconds since the link came up.
fn ms(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

/// A frame's direction on a side's link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    In,
    Out,
}

/// Which side of the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Server,
    Agent,
}

/// What a frame asked of a side's role ([`Incoming`], owned).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Asked {
    BaseListen,
    Request {
        flags: u16,
        window: u32,
        name: Vec<u8>,
    },
    MalformedListen,
    Authenticated {
        flags: u16,
        peer_window: u32,
    },
    AuthFailed,
    Connect {
        id: u8,
        client: Option<SocketAddr>,
        target: Vec<u8>,
    },
}

/// What a side's role decides (server.rs and agent.rs, cut down).
enum Role {
    /// One service, [`SERVICE`], with this token; HELLO carries this nonce.
    /// An empty LISTEN is served unless the service has a token; a failed
    /// handshake is refused with REJECT (the code server.rs uses) and the
    /// link closed.
    Server {
        token: Option<Vec<u8>>,
        nonce: [u8; NONCE_LEN],
    },
    /// Dials with this LISTEN; accepts every CONNECT (local connects
    /// succeed at once), or refuses every one with CLOSE.
    Agent { hello: AgentHello, accept: bool },
}

/// Where a side's link is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Open,
    /// The role closes it: with what is queued (graceful) or at once (abort).
    Closing {
        abort: bool,
    },
    /// Gone: the session's streams were reset (`close_all`).
    Down,
}

/// A stream socket as the adapter sees it, and the application at its far
/// end (a public client, or the agent's local service).
#[derive(Debug)]
struct Socket {
    /// Bytes the application wrote that the adapter has not read.
    unread: Vec<u8>,
    /// The application shut down its sending side (read EOF after `unread`).
    eof: bool,
    /// The adapter read that EOF and reported it.
    eof_seen: bool,
    /// Bytes from the link queued for the application.
    queue: Vec<u8>,
    /// Bytes the application read.
    received: Vec<u8>,
    /// The application reads what comes at once (else `queue` grows).
    app_reads: bool,
    /// The application closed its socket.
    app_closed: bool,
    /// The adapter reads the socket (`Event::Reading`, `AfterSend`).
    reading: bool,
    /// Its read chunk (`Event::Chunk`, `AfterSend`).
    chunk: usize,
    /// Base rule: its stall timeout is armed (`Event::Stall`).
    stall: bool,
    /// Its write side is shut down (`Event::ShutdownWrite`).
    write_shut: bool,
    /// Closing gracefully: gone once `queue` is written.
    closing: bool,
    /// Closed: flushed, aborted, reset, or closed by its application.
    gone: bool,
    /// How the session let go of it (`Event::End`, or `close_all`'s reset).
    end: Option<End>,
}

impl Socket {
    fn new(chunk: usize) -> Socket {
        Socket {
            unread: Vec::new(),
            eof: false,
            eof_seen: false,
            queue: Vec::new(),
            received: Vec::new(),
            app_reads: true,
            app_closed: false,
            reading: true,
            chunk,
            stall: false,
            write_shut: false,
            closing: false,
            gone: false,
            end: None,
        }
    }

    /// Write the queue to the application, as far as it reads; what is left.
    fn flush(&mut self) -> usize {
        if self.app_reads {
            self.received.append(&mut self.queue);
        }
        self.queue.len()
    }

    fn end(&mut self, how: End) {
        self.end = Some(how);
        match how {
            End::Close => self.closing = true,
            End::Abort | End::Reset => {
                self.queue.clear();
                self.gone = true;
            }
        }
    }
}

/// One end of the link: a session, its adapter, its role and its sockets.
struct Side {
    who: Who,
    session: Session<u32>,
    stats: Arc<TunnelStats>,
    role: Role,
    link: Link,
    /// The sockets made so far, by handle.
    sockets: BTreeMap<u32, Socket>,
    /// The sockets the session holds open, and their ids (`Links::streams`).
    streams: BTreeMap<u32, u8>,
    next_handle: u32,
    /// Link bytes written and not yet carried to the peer (the send queue).
    link_out: Vec<u8>,
    /// The network holds `link_out` (the peer is slow): nothing is carried.
    hold: bool,
    /// The test speaks for this side: `link_out` is dropped, not carried.
    muted: bool,
    /// A DATA frame found the link over [`LINK_HIGH`]: tell the session
    /// when `link_out` drains.
    watch_link: bool,
    /// Link bytes from the peer not yet read, and the decoder reading them.
    inbox: Vec<u8>,
    decoder: TunnelDecoder,
    /// The session stopped reading the link (`Event::PauseLink`).
    link_paused: bool,
    /// The peer closed the link (`true`: with a reset, unread bytes lost).
    peer_gone: Option<bool>,
    // What happened, in order, for the test to read.
    sent: Vec<Sent>,
    /// Every frame out and in, in the order this side saw them.
    wire: Vec<(Dir, Sent)>,
    events: Vec<Event<u32>>,
    link_events: Vec<LinkEvent>,
    asked: Vec<Asked>,
}

impl Side {
    fn new(who: Who, session: Session<u32>, stats: Arc<TunnelStats>, role: Role) -> Side {
        Side {
            who,
            session,
            stats,
            role,
            link: Link::Open,
            sockets: BTreeMap::new(),
            streams: BTreeMap::new(),
            next_handle: if who == Who::Server { 100 } else { 500 },
            link_out: Vec::new(),
            hold: false,
            muted: false,
            watch_link: false,
            inbox: Vec::new(),
            decoder: TunnelDecoder::new(usize::MAX),
            link_paused: false,
            peer_gone: None,
            sent: Vec::new(),
            wire: Vec::new(),
            events: Vec::new(),
            link_events: Vec::new(),
            asked: Vec::new(),
        }
    }

    // ----- what the test reads -----

    fn stats(&self) -> &TunnelStats {
        &self.stats
    }

    fn take_sent(&mut self) -> Vec<Sent> {
        std::mem::take(&mut self.sent)
    }

    fn take_events(&mut self) -> Vec<Event<u32>> {
        std::mem::take(&mut self.events)
    }

    fn take_link_events(&mut self) -> Vec<LinkEvent> {
        std::mem::take(&mut self.link_events)
    }

    fn take_asked(&mut self) -> Vec<Asked> {
        std::mem::take(&mut self.asked)
    }

    fn socket(&self, h: u32) -> &Socket {
        self.sockets.get(&h).expect("a socket of this side")
    }

    fn socket_mut(&mut self, h: u32) -> &mut Socket {
        self.sockets.get_mut(&h).expect("a socket of this side")
    }

    /// What the application at socket `h` has read.
    fn received(&self, h: u32) -> &[u8] {
        &self.socket(h).received
    }

    /// The socket the session holds as stream `id`.
    fn handle_of(&self, id: u8) -> Option<u32> {
        self.streams
            .iter()
            .find(|&(_, &i)| i == id)
            .map(|(&h, _)| h)
    }

    /// The most credit this side's peer could hold on stream `id` (as a
    /// receiver sees it: granted, from `window` on, minus received).
    fn most_credit_granted(&self, id: u8) -> u64 {
        let mut granted = u64::from(self.session.settings().window);
        let mut received = 0;
        let mut most = granted;
        for (dir, f) in &self.wire {
            match (dir, f.command) {
                (Dir::In, Command::Data) if f.id == id => received += f.payload.len() as u64,
                (Dir::Out, Command::Window) if f.id == id => {
                    let inc: [u8; 4] = f.payload[..].try_into().expect("a u32");
                    granted += u64::from(u32::from_be_bytes(inc));
                }
                _ => {}
            }
            most = most.max(granted.saturating_sub(received));
        }
        most
    }

    fn is_down(&self) -> bool {
        self.link == Link::Down
    }

    // ----- what the applications do (carried out by the next drive) -----

    /// The application at socket `h` writes `bytes`.
    fn write(&mut self, h: u32, bytes: &[u8]) {
        self.socket_mut(h).unread.extend_from_slice(bytes);
    }

    /// The application at socket `h` shuts down its sending side.
    fn eof(&mut self, h: u32) {
        self.socket_mut(h).eof = true;
    }

    /// The application at socket `h` closes it.
    fn close(&mut self, h: u32) {
        self.socket_mut(h).app_closed = true;
    }

    /// The application at socket `h` reads what comes (`true`), or stops.
    fn app_reads(&mut self, h: u32, on: bool) {
        self.socket_mut(h).app_reads = on;
    }

    /// The application at socket `h`, which does not keep up, reads what
    /// is queued now, once: the socket drains (`on_stream_writable`).
    fn app_reads_once(&mut self, h: u32) {
        let sock = self.socket_mut(h);
        let mut queue = std::mem::take(&mut sock.queue);
        sock.received.append(&mut queue);
        if let Some(&id) = self.streams.get(&h) {
            self.session.stream_drained(id, 0, || 0);
        }
    }

    /// The agent's role refuses every CONNECT from now on (a target off
    /// its allowlist, or a local connect that fails).
    fn refuse_connects(&mut self) {
        let Role::Agent { accept, .. } = &mut self.role else {
            panic!("{:?}: only the agent's role takes CONNECTs", self.who);
        };
        *accept = false;
    }

    // ----- the adapter -----

    fn new_socket(&mut self) -> u32 {
        let h = self.next_handle;
        self.next_handle += 1;
        let chunk = self.session.settings().max_data;
        self.sockets.insert(h, Socket::new(chunk));
        h
    }

    /// Read the link as far as the session lets us (`Links::on_frame`).
    fn read_link(&mut self, now: Instant) -> bool {
        let mut did = false;
        while self.link != Link::Down && !self.link_paused {
            let (raw, used) = match self.decoder.decode(&self.inbox) {
                Ok(Decoded::Frame(f, used)) => (f.raw.to_vec(), used),
                Ok(Decoded::NeedMore) => break,
                other => panic!("{:?}: undecodable link bytes: {other:?}", self.who),
            };
            self.inbox.drain(..used);
            self.receive(&raw, now);
            did = true;
        }
        did
    }

    /// One frame from the link: the session handles it, the adapter drives
    /// it, delivers DATA, and the role answers what is left. Stream sockets
    /// are written after the whole batch of frames the link read, as the
    /// engine does later in its turn ([`Side::pump`]).
    fn receive(&mut self, raw: &[u8], now: Instant) {
        self.wire.push((Dir::In, decode_all(raw).remove(0)));
        let f = Frame::parse(raw).expect("the decoder delimits whole frames");
        let incoming = self.session.handle(f, now);
        self.drive_session();
        match incoming {
            Incoming::Nothing => {}
            Incoming::Deliver {
                stream,
                id,
                payload,
            } => self.deliver(stream, id, payload),
            Incoming::Listen(l) => {
                self.asked.push(match l {
                    Listen::Base => Asked::BaseListen,
                    Listen::Malformed => Asked::MalformedListen,
                    Listen::Request(r) => Asked::Request {
                        flags: r.flags,
                        window: r.window,
                        name: r.name.to_vec(),
                    },
                });
                self.role_listen(l, now);
            }
            Incoming::Authenticated { flags, peer_window } => {
                self.asked.push(Asked::Authenticated { flags, peer_window });
                self.session.link_up(flags, peer_window, now);
            }
            Incoming::AuthFailed => {
                self.asked.push(Asked::AuthFailed);
                self.refuse(Some(reject::AUTH_FAILED), "authentication failed");
            }
            Incoming::Connect { id, client, target } => {
                self.asked.push(Asked::Connect {
                    id,
                    client,
                    target: target.to_vec(),
                });
                self.role_connect(id, now);
            }
        }
        self.drive_session();
    }

    /// DATA for stream `id`: queue it on its socket (`Links::deliver`).
    fn deliver(&mut self, h: u32, id: u8, payload: &[u8]) {
        let sock = self.sockets.get_mut(&h).expect("DATA for a socket we made");
        if sock.closing || sock.gone || sock.write_shut {
            // The engine queues nothing on a socket closing or shut down.
            self.stats.stale_total.fetch_add(1, Ordering::Relaxed);
            return;
        }
        sock.queue.extend_from_slice(payload);
        let queued = sock.queue.len();
        self.session
            .delivered(id, payload.len(), queued, || sock.flush());
    }

    /// Carry out what the session asks for, and what the applications did,
    /// until nothing is left to do (`Links::drive` and the socket callbacks).
    fn pump(&mut self, now: Instant) -> bool {
        if self.link == Link::Down {
            return false;
        }
        let mut any = false;
        loop {
            let did = self.drive_session() | self.write_sockets(now) | self.read_sockets();
            if !did {
                return any;
            }
            any = true;
        }
    }

    /// What `Links::drive` does: the session's bytes onto the link, its
    /// events applied.
    fn drive_session(&mut self) -> bool {
        self.flush_transmit() | self.apply_events()
    }

    fn flush_transmit(&mut self) -> bool {
        let out = self.session.transmit();
        if out.is_empty() {
            return false;
        }
        for f in decode_all(out) {
            self.wire.push((Dir::Out, f.clone()));
            self.sent.push(f);
        }
        self.link_out.extend_from_slice(out);
        self.session.transmitted();
        true
    }

    fn apply_events(&mut self) -> bool {
        let mut did = false;
        while let Some(e) = self.session.poll_event() {
            did = true;
            self.events.push(e);
            match e {
                Event::End(s, how) => {
                    assert!(
                        self.streams.remove(&s).is_some(),
                        "{:?}: {e:?} for a socket the session does not hold",
                        self.who
                    );
                    self.socket_mut(s).end(how);
                }
                Event::Close(s) => self.socket_mut(s).closing = true,
                Event::ShutdownWrite(s) => self.socket_mut(s).write_shut = true,
                Event::Reading(s, on) => self.socket_mut(s).reading = on,
                Event::Chunk(s, max) => self.socket_mut(s).chunk = max,
                Event::Stall(s, on) => self.socket_mut(s).stall = on,
                Event::PauseLink => self.link_paused = true,
                Event::ResumeLink => self.link_paused = false,
                Event::Problem(_) => {}
            }
        }
        while let Some(e) = self.session.poll_link_event() {
            did = true;
            match e {
                LinkEvent::Up { .. } => {}
                LinkEvent::Failed(Failure::CreditOverflow { .. }) => {
                    self.link = Link::Closing { abort: true };
                }
                LinkEvent::HandshakeTimeout | LinkEvent::Failed(_) => {
                    self.link = Link::Closing { abort: false };
                }
            }
            self.link_events.push(e);
        }
        did
    }

    /// Sockets write their queues to applications that read, and close:
    /// `stream_drained` (`on_stream_writable`), `stream_closed` (`on_stream_closed`).
    fn write_sockets(&mut self, now: Instant) -> bool {
        let mut did = false;
        let handles: Vec<u32> = self.sockets.keys().copied().collect();
        for h in handles {
            let id = self.streams.get(&h).copied();
            let sock = self.sockets.get_mut(&h).expect("listed");
            if sock.gone {
                continue;
            }
            if sock.app_reads && !sock.queue.is_empty() {
                let left = sock.flush();
                did = true;
                if let Some(id) = id {
                    self.session.stream_drained(id, left, || left);
                }
            }
            let sock = self.sockets.get_mut(&h).expect("listed");
            if (sock.closing && sock.queue.is_empty()) || sock.app_closed {
                sock.gone = true;
                did = true;
                if let Some(id) = id {
                    self.streams.remove(&h);
                    self.session.stream_closed(id, now);
                }
            }
        }
        did
    }

    /// The adapter reads one chunk from every socket that has bytes, and
    /// writes it as a DATA frame (`Links::on_stream_data`); a socket that
    /// has read EOF is reported (`on_stream_eof`).
    fn read_sockets(&mut self) -> bool {
        if self.link != Link::Open {
            return false;
        }
        let mut did = false;
        let streams: Vec<(u32, u8)> = self.streams.iter().map(|(&h, &id)| (h, id)).collect();
        for (h, id) in streams {
            let sock = self.sockets.get_mut(&h).expect("a stream's socket");
            if !sock.reading || sock.closing || sock.gone || sock.eof_seen {
                continue;
            }
            if sock.unread.is_empty() {
                if sock.eof {
                    sock.eof_seen = true;
                    self.session.stream_eof(id);
                    did = true;
                }
                continue;
            }
            let n = sock.chunk.min(sock.unread.len());
            let data: Vec<u8> = sock.unread.drain(..n).collect();
            // Whatever the session holds goes first, so frames keep their order.
            self.flush_transmit();
            let data_frame = frame(Command::Data, id, &data);
            self.link_out.extend_from_slice(&data_frame.raw());
            self.wire.push((Dir::Out, data_frame.clone()));
            self.sent.push(data_frame);
            did = true;
            let Some(after) = self.session.data_sent(id, n, self.link_out.len()) else {
                continue;
            };
            let sock = self.socket_mut(h);
            if let Some(max) = after.chunk {
                sock.chunk = max;
            }
            sock.reading = after.reading;
            self.watch_link |= after.watch_link;
        }
        did
    }

    /// The link is gone: every stream socket still open is reset (`Links::remove`).
    fn down(&mut self) {
        self.link = Link::Down;
        self.link_out.clear();
        self.inbox.clear();
        let (streams, sockets) = (&mut self.streams, &mut self.sockets);
        self.session.close_all(|s| {
            streams.remove(&s);
            sockets
                .get_mut(&s)
                .expect("a stream's socket")
                .end(End::Reset);
        });
        assert!(self.streams.is_empty(), "close_all left streams behind");
    }

    // ----- the role -----

    fn role_listen(&mut self, l: Listen<'_>, now: Instant) {
        let Role::Server { token, nonce } = &self.role else {
            panic!("{:?}: a LISTEN reached the agent's role", self.who);
        };
        let (token, nonce) = (token.clone(), *nonce);
        let req = match l {
            Listen::Base if token.is_some() => return self.refuse(None, "needs a token"),
            Listen::Base => return self.session.link_up(0, 0, now),
            Listen::Malformed => return self.refuse(Some(reject::MALFORMED), "malformed"),
            Listen::Request(req) => req,
        };
        if !req.name.is_empty() && req.name != SERVICE {
            return self.refuse(Some(reject::UNKNOWN_SERVICE), "no such service");
        }
        if token.is_some() && req.flags & ext::AUTH == 0 {
            return self.refuse(Some(reject::AUTH_REQUIRED), "needs a token");
        }
        if let Some((flags, window)) = self.session.offer(&req, SERVICE, token.as_deref(), nonce) {
            self.session.link_up(flags, window, now);
        }
    }

    fn refuse(&mut self, code: Option<u8>, why: &str) {
        self.session.reject(code, why);
        self.link = Link::Closing { abort: false };
    }

    fn role_connect(&mut self, id: u8, now: Instant) {
        let Role::Agent { accept, .. } = self.role else {
            panic!("{:?}: a CONNECT reached the server's role", self.who);
        };
        if accept {
            let h = self.new_socket();
            self.streams.insert(h, id);
            self.session.accept_stream(id, h);
        } else {
            self.session.refuse_stream(id, now);
        }
    }
}

/// How a [`Pair`] is made.
#[derive(Clone)]
struct Setup {
    server: Settings,
    agent: Settings,
    /// The service's token (server).
    service_token: Option<&'static [u8]>,
    /// The agent's token.
    agent_token: Option<&'static [u8]>,
    /// The agent asks for extensions (`false`: it speaks the base protocol).
    extensions: bool,
    server_nonce: [u8; NONCE_LEN],
}

impl Default for Setup {
    fn default() -> Setup {
        Setup {
            server: server_settings(),
            agent: settings(),
            service_token: None,
            agent_token: None,
            extensions: true,
            server_nonce: SERVER_NONCE,
        }
    }
}

impl Setup {
    /// Both with `TOKEN`.
    fn tokens() -> Setup {
        Setup {
            service_token: Some(TOKEN),
            agent_token: Some(TOKEN),
            ..Setup::default()
        }
    }

    /// A base-protocol agent.
    fn base() -> Setup {
        Setup {
            extensions: false,
            ..Setup::default()
        }
    }

    /// Both sessions, made now; the agent has not dialled yet ([`Pair::start`]).
    fn pair(self) -> Pair {
        let now = Instant::now();
        let stats = Arc::new(TunnelStats::default());
        let server = Side::new(
            Who::Server,
            Session::server(self.server, Arc::clone(&stats), now),
            stats,
            Role::Server {
                token: self.service_token.map(<[u8]>::to_vec),
                nonce: self.server_nonce,
            },
        );
        let stats = Arc::new(TunnelStats::default());
        let hello = AgentHello {
            extensions: self.extensions,
            token: self.agent_token.map(<[u8]>::to_vec),
            name: SERVICE.to_vec(),
            nonce: AGENT_NONCE,
        };
        let agent = Side::new(
            Who::Agent,
            Session::agent(self.agent, Arc::clone(&stats), now),
            stats,
            Role::Agent {
                hello,
                accept: true,
            },
        );
        Pair { now, server, agent }
    }

    /// The pair once the agent has dialled and both are up, with the
    /// handshake's frames and events cleared from the logs.
    fn up(self) -> Pair {
        let mut p = self.pair();
        p.start();
        assert!(p.server.session.is_up() && p.agent.session.is_up());
        p.clear();
        p
    }
}

/// A server session and an agent session on one link, in memory.
struct Pair {
    now: Instant,
    server: Side,
    agent: Side,
}

/// Both ends of one stream.
#[derive(Debug, Clone, Copy)]
struct Stream {
    id: u8,
    /// The public client's socket (server).
    client: u32,
    /// The local service's socket (agent).
    service: u32,
}

impl Pair {
    fn side(&mut self, who: Who) -> &mut Side {
        match who {
            Who::Server => &mut self.server,
            Who::Agent => &mut self.agent,
        }
    }

    /// `who` and its peer.
    fn both(&mut self, who: Who) -> (&mut Side, &mut Side) {
        match who {
            Who::Server => (&mut self.server, &mut self.agent),
            Who::Agent => (&mut self.agent, &mut self.server),
        }
    }

    /// The agent's TCP connection is up: it sends its LISTEN.
    fn start(&mut self) {
        let Role::Agent { hello, .. } = &self.agent.role else {
            unreachable!()
        };
        self.agent.session.start(hello.clone(), self.now);
        self.drive();
    }

    /// Empty every log of both sides.
    fn clear(&mut self) {
        for side in [&mut self.server, &mut self.agent] {
            side.sent.clear();
            side.wire.clear();
            side.events.clear();
            side.link_events.clear();
            side.asked.clear();
        }
    }

    /// The test speaks for `who`: what its session sends is dropped (still
    /// logged in [`Side::sent`]).
    fn mute(&mut self, who: Who) {
        self.side(who).muted = true;
    }

    /// A frame arrives at `to` from its peer (after what is in flight).
    fn inject(&mut self, to: Who, f: &Sent) {
        self.side(to).inbox.extend_from_slice(&f.raw());
        self.drive();
    }

    /// A public client connects: the server opens a stream and the agent
    /// accepts it.
    fn open(&mut self) -> Stream {
        let (client, id) = self.try_open().expect("an id for the client");
        self.drive();
        let service = self.agent.handle_of(id).expect("the agent took the stream");
        Stream {
            id,
            client,
            service,
        }
    }

    /// The server's side of [`Pair::open`] (nothing is carried yet).
    fn try_open(&mut self) -> Result<(u32, u8), NoId> {
        let h = self.server.new_socket();
        match self.server.session.open_stream(h, client_addr(h), self.now) {
            Ok(id) => {
                self.server.streams.insert(h, id);
                self.server.pump(self.now);
                Ok((h, id))
            }
            Err(no) => {
                self.server.sockets.remove(&h);
                Err(no)
            }
        }
    }

    /// Run both sides until neither has anything left to do at `now`.
    fn drive(&mut self) {
        for _ in 0..1_000_000 {
            let now = self.now;
            let did = self.server.pump(now)
                | self.agent.pump(now)
                | self.carry(Who::Server)
                | self.carry(Who::Agent)
                | self.server.read_link(now)
                | self.agent.read_link(now)
                | self.settle_closes(Who::Server)
                | self.settle_closes(Who::Agent);
            if !did {
                return;
            }
        }
        panic!("the pair does not settle");
    }

    /// `from`'s link bytes reach its peer, unless the network holds them.
    fn carry(&mut self, from: Who) -> bool {
        let (src, dst) = self.both(from);
        if src.hold || src.link_out.is_empty() || src.link != Link::Open {
            return false;
        }
        if src.muted || dst.link == Link::Down {
            src.link_out.clear();
        } else {
            dst.inbox.append(&mut src.link_out);
        }
        if std::mem::take(&mut src.watch_link) {
            src.session.link_drained();
        }
        true
    }

    /// A side whose role closed its link goes down (after sending what it
    /// had, unless it aborts); its peer goes down once it has read the rest.
    fn settle_closes(&mut self, who: Who) -> bool {
        let (me, peer) = self.both(who);
        if let Link::Closing { abort } = me.link {
            if !abort && !me.muted && peer.link != Link::Down {
                peer.inbox.append(&mut me.link_out);
            }
            me.down();
            if peer.link != Link::Down {
                peer.peer_gone = Some(abort);
            }
            return true;
        }
        match me.peer_gone {
            Some(abort) if me.link == Link::Open => {
                if abort || me.inbox.is_empty() || me.link_paused {
                    me.down();
                    return true;
                }
                false
            }
            _ => false,
        }
    }

    /// Move the clock on by `d`, firing each side's deadlines at their
    /// exact times on the way.
    fn advance(&mut self, d: Duration) {
        let until = self.now + d;
        self.drive();
        for _ in 0..1_000_000 {
            let next = [&self.server, &self.agent]
                .into_iter()
                .filter(|s| s.link == Link::Open)
                .filter_map(|s| s.session.poll_timeout())
                .min();
            let Some(at) = next.filter(|&at| at <= until) else {
                self.now = until;
                self.drive();
                return;
            };
            self.now = self.now.max(at);
            let now = self.now;
            for side in [&mut self.server, &mut self.agent] {
                if side.link == Link::Open && side.session.poll_timeout().is_some_and(|t| t <= now)
                {
                    side.session.handle_timeout(now);
                }
            }
            self.drive();
        }
        panic!("deadlines keep firing");
    }
}

/// A pair whose agent is up with `flags` against a server the test speaks
/// for (muted; its HELLO grants `flags` with a window of `window`).
fn hand_server(setup: Setup, flags: u16, window: u32) -> Pair {
    let mut p = setup.pair();
    p.mute(Who::Server);
    p.start();
    let hello = Hello {
        flags,
        window,
        nonce: SERVER_NONCE,
    };
    p.inject(Who::Agent, &frame(Command::Hello, 0, &hello.encode()));
    p.inject(Who::Agent, &frame(Command::Ready, 0, &[]));
    assert_eq!(p.agent.take_link_events(), [LinkEvent::Up { flags }]);
    p.clear();
    p
}

/// A pair whose server is up after a LISTEN asking for `flags` (window
/// `window`) that the test sent for the agent (muted).
fn hand_agent(setup: Setup, flags: u16, window: u32) -> Pair {
    let mut p = setup.pair();
    p.mute(Who::Agent);
    p.inject(
        Who::Server,
        &listen_frame(flags, window, AGENT_NONCE, SERVICE),
    );
    assert!(p.server.session.is_up());
    p.clear();
    p
}

fn listen_frame(flags: u16, window: u32, nonce: [u8; NONCE_LEN], name: &[u8]) -> Sent {
    let mut payload = Vec::new();
    ListenRequest {
        flags,
        window,
        nonce,
        name,
    }
    .encode(&mut payload)
    .expect("a request");
    frame(Command::Listen, 0, &payload)
}

/// The AUTH and READY tags of a handshake with the default nonces.
fn tags(token: &[u8], flags: u16) -> ([u8; 32], [u8; 32]) {
    let t = Transcript {
        agent_nonce: &AGENT_NONCE,
        server_nonce: &SERVER_NONCE,
        flags,
        name: SERVICE,
    };
    (auth::agent_tag(token, &t), auth::server_tag(token, &t))
}

// ===== handshake =====

/// LISTEN asks for every extension but AUTH (no token); the server grants
/// them in HELLO and sends an empty READY; both sides are up and ping.
#[test]
fn handshake_grants_what_the_agent_asks_for() {
    let mut p = Setup::default().pair();
    p.start();
    let listen = listen_frame(NO_AUTH, settings().window, AGENT_NONCE, SERVICE);
    let hello = Hello {
        flags: NO_AUTH,
        window: server_settings().window,
        nonce: SERVER_NONCE,
    };
    assert_eq!(
        p.agent.take_sent(),
        [
            listen,
            frame(Command::Ping, 0, &ms(0)),
            frame(Command::Pong, 0, &ms(0))
        ]
    );
    assert_eq!(
        p.server.take_sent(),
        [
            frame(Command::Hello, 0, &hello.encode()),
            frame(Command::Ready, 0, &[]),
            frame(Command::Ping, 0, &ms(0)),
            frame(Command::Pong, 0, &ms(0)),
        ]
    );
    assert_eq!(
        p.server.take_asked(),
        [Asked::Request {
            flags: NO_AUTH,
            window: settings().window,
            name: SERVICE.to_vec()
        }]
    );
    for side in [&mut p.server, &mut p.agent] {
        assert_eq!(side.take_link_events(), [LinkEvent::Up { flags: NO_AUTH }]);
        assert_eq!(side.session.flags(), NO_AUTH);
        assert_eq!(count(&side.stats().links), 1);
        assert_eq!(count(&side.stats().links_total), 1);
        assert_eq!(count(&side.stats().malformed_total), 0);
    }
}

/// The server grants a subset of what is asked: HALF_CLOSE only with
/// CLOSE_ACK, unknown bits never. HELLO carries the server's window; the
/// agent's LISTEN window is the server's credit on each stream (CREDIT).
#[test]
fn server_grants_a_subset_of_what_is_asked() {
    let mut p = Setup::default().pair();
    p.mute(Who::Agent);
    let asked = ext::HALF_CLOSE | ext::PEER_ADDR | 0x8000;
    p.inject(
        Who::Server,
        &listen_frame(asked, 4096, AGENT_NONCE, SERVICE),
    );
    let hello = Hello {
        flags: ext::PEER_ADDR,
        window: server_settings().window,
        nonce: SERVER_NONCE,
    };
    assert_eq!(
        p.server.take_sent(),
        [
            frame(Command::Hello, 0, &hello.encode()),
            frame(Command::Ready, 0, &[]),
        ]
    );
    assert_eq!(
        p.server.take_link_events(),
        [LinkEvent::Up {
            flags: ext::PEER_ADDR
        }]
    );
    // No CREDIT: the agent's window does not limit the server's reads.
    p.try_open().unwrap();
    assert_eq!(p.server.take_events(), []);

    let asked = ext::CREDIT | ext::CLOSE_ACK | ext::HALF_CLOSE;
    let mut p = hand_agent(Setup::default(), asked, 4096);
    assert_eq!(p.server.session.flags(), asked);
    let (client, _) = p.try_open().unwrap();
    assert_eq!(p.server.take_events(), [Event::Chunk(client, 4096)]);
}

/// With a token on both sides: AUTH carries the agent's tag, READY the
/// server's, and every extension is in force.
#[test]
fn token_handshake_proves_both_sides() {
    let mut p = Setup::tokens().pair();
    p.start();
    let (agent_tag, server_tag) = tags(TOKEN, ext::ALL);
    let sent = p.agent.take_sent();
    assert_eq!(
        sent[..2],
        [
            listen_frame(ext::ALL, settings().window, AGENT_NONCE, SERVICE),
            frame(Command::Auth, 0, &agent_tag),
        ]
    );
    let sent = p.server.take_sent();
    assert_eq!(sent[1], frame(Command::Ready, 0, &server_tag));
    assert_eq!(
        p.server.take_asked(),
        [
            Asked::Request {
                flags: ext::ALL,
                window: settings().window,
                name: SERVICE.to_vec()
            },
            Asked::Authenticated {
                flags: ext::ALL,
                peer_window: settings().window
            }
        ]
    );
    assert_eq!(
        p.agent.take_link_events(),
        [LinkEvent::Up { flags: ext::ALL }]
    );
    assert_eq!(
        p.server.take_link_events(),
        [LinkEvent::Up { flags: ext::ALL }]
    );
    assert_eq!(count(&p.server.stats().auth_failed_total), 0);
}

/// An AUTH recorded on one link is worthless on the next: the new server
/// nonce changes the tag, so the replay fails and no READY is sent. A
/// malformed AUTH (31 bytes) fails the same way.
#[test]
fn replayed_auth_fails_against_a_new_server_nonce() {
    let mut first = Setup::tokens().pair();
    first.start();
    let recorded = first.agent.take_sent();
    let (listen, auth) = (&recorded[0], &recorded[1]);
    assert_eq!(auth.command, Command::Auth);
    assert!(first.server.session.is_up());

    for bad_auth in [auth.clone(), frame(Command::Auth, 0, &[7; 31])] {
        let mut replay = Setup {
            server_nonce: [0x77; NONCE_LEN],
            ..Setup::tokens()
        }
        .pair();
        replay.mute(Who::Agent);
        replay.inject(Who::Server, listen);
        let hello = Hello::parse(&replay.server.take_sent()[0].payload).unwrap();
        assert_eq!(hello.nonce, [0x77; NONCE_LEN], "a fresh challenge");
        replay.inject(Who::Server, &bad_auth);
        assert_eq!(
            replay.server.take_asked()[1..],
            [Asked::AuthFailed],
            "{bad_auth:?}"
        );
        assert_eq!(count(&replay.server.stats().auth_failed_total), 1);
        // The role refuses: REJECT, and no READY ever.
        let mut reject_payload = vec![reject::AUTH_FAILED];
        reject_payload.extend_from_slice(b"authentication failed");
        assert_eq!(
            replay.server.take_sent(),
            [frame(Command::Reject, 0, &reject_payload)]
        );
        assert!(!replay.server.session.is_up());
        assert_eq!(count(&replay.server.stats().links), 0);
        assert_eq!(count(&replay.server.stats().links_total), 0);
    }
    // The genuine link is unaffected.
    assert!(first.server.session.is_up());
}

/// A wrong token: the server counts the failure and refuses; the agent
/// reports REJECT AUTH_FAILED and counts it; no link comes up.
#[test]
fn wrong_token_is_refused_and_the_agent_reports_the_rejection() {
    let mut p = Setup {
        agent_token: Some(b"wrong-0123456789"),
        ..Setup::tokens()
    }
    .pair();
    p.start();
    assert_eq!(p.server.take_asked()[1..], [Asked::AuthFailed]);
    assert_eq!(
        p.agent.take_link_events(),
        [LinkEvent::Failed(Failure::Rejected {
            code: reject::AUTH_FAILED,
            text: b"authentication failed".to_vec()
        })]
    );
    assert!(p.server.is_down() && p.agent.is_down());
    for side in [&p.server, &p.agent] {
        assert_eq!(count(&side.stats().auth_failed_total), 1);
        assert_eq!(count(&side.stats().links_total), 0);
        assert_eq!(count(&side.stats().links), 0);
    }
    assert_eq!(count(&p.agent.stats().rejected_total), 1);
}

/// The agent checks READY's tag: a wrong one fails the link.
#[test]
fn agent_refuses_a_server_that_cannot_prove_the_token() {
    let mut p = Setup::tokens().pair();
    p.mute(Who::Server);
    p.start();
    let hello = Hello {
        flags: ext::ALL,
        window: 65536,
        nonce: SERVER_NONCE,
    };
    p.inject(Who::Agent, &frame(Command::Hello, 0, &hello.encode()));
    let (agent_tag, server_tag) = tags(TOKEN, ext::ALL);
    assert_eq!(p.agent.sent[1], frame(Command::Auth, 0, &agent_tag));
    let mut forged = server_tag;
    forged[0] ^= 1;
    p.inject(Who::Agent, &frame(Command::Ready, 0, &forged));
    assert_eq!(
        p.agent.take_link_events(),
        [LinkEvent::Failed(Failure::ServerNotProven)]
    );
    assert_eq!(count(&p.agent.stats().auth_failed_total), 1);
    assert_eq!(count(&p.agent.stats().links_total), 0);
}

/// HELLO must grant a subset of what was asked: AUTH, not asked by an
/// agent without a token, fails the link; so does a malformed HELLO.
#[test]
fn agent_refuses_unasked_extensions_and_malformed_hello() {
    let cases = [
        (
            Hello {
                flags: NO_AUTH | ext::AUTH,
                window: 65536,
                nonce: SERVER_NONCE,
            }
            .encode()
            .to_vec(),
            Failure::UnaskedExtensions,
            0,
        ),
        (b"SBT1\0".to_vec(), Failure::MalformedHello, 1),
    ];
    for (payload, failure, malformed) in cases {
        let mut p = Setup::default().pair();
        p.mute(Who::Server);
        p.start();
        p.inject(Who::Agent, &frame(Command::Hello, 0, &payload));
        assert_eq!(p.agent.take_link_events(), [LinkEvent::Failed(failure)]);
        assert_eq!(p.agent.sent.len(), 1, "nothing after LISTEN");
        assert_eq!(count(&p.agent.stats().malformed_total), malformed);
        assert!(p.agent.is_down());
    }
}

/// An agent with a token refuses a server that does not ask for it.
#[test]
fn agent_with_a_token_refuses_a_server_that_does_not_ask_for_it() {
    let mut p = Setup {
        agent_token: Some(TOKEN),
        ..Setup::default()
    }
    .pair();
    p.start();
    let hello = Hello::parse(&p.server.sent[0].payload).unwrap();
    assert_eq!(
        hello.flags, NO_AUTH,
        "a service without a token grants no AUTH"
    );
    assert_eq!(
        p.agent.take_link_events(),
        [LinkEvent::Failed(Failure::TokenNotAsked)]
    );
    assert_eq!(count(&p.agent.stats().links_total), 0);
    assert!(p.agent.is_down() && p.server.is_down());
    assert_eq!(
        count(&p.server.stats().links),
        0,
        "the server's link went down"
    );
}

/// REJECT reaches the agent with its code and at most 96 bytes of text;
/// AUTH_FAILED is also counted as an authentication failure. The server
/// sends REJECT only to an extended agent.
#[test]
fn reject_codes_and_text_reach_the_agent() {
    let codes = [
        reject::UNKNOWN_SERVICE,
        reject::AUTH_FAILED,
        reject::AUTH_REQUIRED,
        reject::MALFORMED,
        reject::LISTEN_FAILED,
    ];
    let long = "x".repeat(200);
    for code in codes {
        let mut server = Session::<u32>::server(
            server_settings(),
            Arc::new(TunnelStats::default()),
            Instant::now(),
        );
        server.reject(Some(code), &long);
        let rejected = decode_all(server.transmit());
        let mut want = vec![code];
        want.extend_from_slice(&long.as_bytes()[..96]);
        assert_eq!(rejected, [frame(Command::Reject, 0, &want)]);

        // The agent keeps 96 bytes of a longer text.
        let mut p = Setup::default().pair();
        p.mute(Who::Server);
        p.start();
        let mut longer = vec![code];
        longer.extend_from_slice(long.as_bytes());
        p.inject(Who::Agent, &frame(Command::Reject, 0, &longer));
        let text = long.as_bytes()[..96].to_vec();
        assert_eq!(
            p.agent.take_link_events(),
            [LinkEvent::Failed(Failure::Rejected { code, text })]
        );
        assert_eq!(count(&p.agent.stats().rejected_total), 1);
        let auth_failed = u64::from(code == reject::AUTH_FAILED);
        assert_eq!(count(&p.agent.stats().auth_failed_total), auth_failed);
    }
    // A base agent gets no REJECT: the link is just closed.
    let mut server = Session::<u32>::server(
        server_settings(),
        Arc::new(TunnelStats::default()),
        Instant::now(),
    );
    server.reject(None, "needs a token");
    assert!(server.transmit().is_empty());
    // The reason names the code.
    let why = Failure::Rejected {
        code: reject::AUTH_REQUIRED,
        text: Vec::new(),
    };
    assert_eq!(
        why.to_string(),
        "server rejected the LISTEN: a token is required"
    );
}

/// An empty LISTEN is a base agent, a garbage one is malformed; the base
/// link is up without HELLO, and carries streams without any extension.
#[test]
fn empty_listen_is_a_base_agent() {
    let mut server = Session::<u32>::server(
        server_settings(),
        Arc::new(TunnelStats::default()),
        Instant::now(),
    );
    let empty = frame(Command::Listen, 0, &[]).raw();
    let now = Instant::now();
    assert_eq!(
        server.handle(Frame::parse(&empty).unwrap(), now),
        Incoming::Listen(Listen::Base)
    );
    let garbage = frame(Command::Listen, 0, b"garbage that is no request").raw();
    assert_eq!(
        server.handle(Frame::parse(&garbage).unwrap(), now),
        Incoming::Listen(Listen::Malformed)
    );

    let mut p = Setup::base().pair();
    p.start();
    assert_eq!(p.agent.take_sent(), [frame(Command::Listen, 0, &[])]);
    assert_eq!(p.server.take_sent(), [], "no HELLO to a base agent");
    assert_eq!(p.server.take_asked(), [Asked::BaseListen]);
    assert_eq!(p.server.take_link_events(), [LinkEvent::Up { flags: 0 }]);
    assert_eq!(p.agent.take_link_events(), [LinkEvent::Up { flags: 0 }]);
    assert_eq!(p.server.session.poll_timeout(), None, "no heartbeat");
    assert_eq!(
        p.agent.session.poll_timeout(),
        None,
        "no handshake deadline"
    );
    let s = p.open();
    assert_eq!(p.server.take_sent(), [frame(Command::Connect, s.id, &[])]);
    p.server.write(s.client, b"GET /");
    p.agent.write(s.service, b"200 OK");
    p.drive();
    assert_eq!(p.agent.received(s.service), b"GET /");
    assert_eq!(p.server.received(s.client), b"200 OK");
}

/// An extended agent that hears a CONNECT, DATA or CLOSE before any HELLO is
/// talking to a base server: it carries on in base mode.
#[test]
fn extended_agent_carries_on_with_a_base_server() {
    // A CONNECT first: the stream opens on the base link.
    let mut p = Setup::default().pair();
    p.mute(Who::Server);
    p.start();
    p.inject(Who::Agent, &frame(Command::Connect, 7, &[]));
    assert_eq!(p.agent.take_link_events(), [LinkEvent::Up { flags: 0 }]);
    assert_eq!(
        p.agent.take_asked(),
        [Asked::Connect {
            id: 7,
            client: None,
            target: Vec::new()
        }]
    );
    let service = p.agent.handle_of(7).unwrap();
    p.inject(Who::Agent, &frame(Command::Data, 7, b"ping"));
    assert_eq!(p.agent.received(service), b"ping");
    p.agent.write(service, b"pong");
    p.drive();
    assert_eq!(p.agent.sent[1..], [frame(Command::Data, 7, b"pong")]);
    // The server's CLOSE closes the socket after its bytes; no CLOSE back.
    p.inject(Who::Agent, &frame(Command::Close, 7, &[]));
    assert_eq!(p.agent.take_events(), [Event::End(service, End::Close)]);
    assert_eq!(p.agent.sent.len(), 2);
    assert_eq!(count(&p.agent.stats().streams), 0);
    // The service closes: CLOSE, and the id is free at once.
    p.inject(Who::Agent, &frame(Command::Connect, 8, &[]));
    let service = p.agent.handle_of(8).unwrap();
    p.agent.close(service);
    p.drive();
    assert_eq!(p.agent.sent[2..], [frame(Command::Close, 8, &[])]);
    p.inject(Who::Agent, &frame(Command::Connect, 8, &[]));
    assert!(p.agent.handle_of(8).is_some(), "id 8 served again");
    assert_eq!(p.agent.take_events(), [], "no problem reported");
    assert_eq!(count(&p.agent.stats().streams_total), 3);
    assert_eq!(count(&p.agent.stats().malformed_total), 0);

    // DATA or CLOSE first: up in base mode, the frame counted as stale.
    for first in [frame(Command::Data, 3, b"x"), frame(Command::Close, 3, &[])] {
        let mut p = Setup::default().pair();
        p.mute(Who::Server);
        p.start();
        p.inject(Who::Agent, &first);
        assert_eq!(p.agent.take_link_events(), [LinkEvent::Up { flags: 0 }]);
        assert_eq!(count(&p.agent.stats().stale_total), 1);
    }
}

/// An agent with a token never runs a base link: a base server cannot
/// check the token.
#[test]
fn agent_with_a_token_refuses_a_base_server() {
    let mut p = Setup::tokens().pair();
    p.mute(Who::Server);
    p.start();
    let listen = ListenRequest::parse(&p.agent.sent[0].payload).unwrap();
    assert_eq!(listen.flags, ext::ALL, "a token: AUTH asked for");
    p.inject(Who::Agent, &frame(Command::Connect, 1, &[]));
    assert_eq!(
        p.agent.take_link_events(),
        [LinkEvent::Failed(Failure::BaseServer)]
    );
    assert_eq!(p.agent.take_asked(), [], "no stream");
    assert!(p.agent.sockets.is_empty());
    assert_eq!(p.agent.sent.len(), 1, "nothing after LISTEN");
    assert_eq!(count(&p.agent.stats().links_total), 0);
    assert_eq!(count(&p.agent.stats().streams_total), 0);
    assert!(p.agent.is_down());
}

/// The server gives an agent `handshake_timeout` from TCP accept: the
/// deadline fires at exactly that time, in any handshake state, and never
/// on a link that came up.
#[test]
fn server_handshake_times_out_at_its_deadline() {
    let timeout = server_settings().handshake_timeout;
    let nano = Duration::from_nanos(1);
    // A silent agent, and one that never sends its AUTH.
    for listen in [
        None,
        Some(listen_frame(ext::AUTH, 65536, AGENT_NONCE, SERVICE)),
    ] {
        let mut p = Setup::tokens().pair();
        let t0 = p.now;
        p.mute(Who::Agent);
        if let Some(l) = &listen {
            p.advance(SECOND);
            p.inject(Who::Server, l);
            assert_eq!(p.server.sent[0].command, Command::Hello);
        }
        assert_eq!(p.server.session.poll_timeout(), Some(t0 + timeout));
        p.advance(t0 + timeout - nano - p.now);
        assert_eq!(p.server.take_link_events(), []);
        p.advance(nano);
        assert_eq!(p.server.take_link_events(), [LinkEvent::HandshakeTimeout]);
        assert!(p.server.is_down());
    }
    // Up in time: no timeout.
    let mut p = Setup::default().pair();
    p.advance(timeout - nano);
    p.start();
    p.advance(10 * timeout);
    assert_eq!(
        p.server.take_link_events(),
        [LinkEvent::Up { flags: NO_AUTH }]
    );
    assert!(p.server.session.is_up());
}

/// The agent gives the server `handshake_timeout` from its LISTEN: a
/// silent server, or one that sends HELLO and no READY, is dropped at
/// exactly that time. A base agent has no deadline.
#[test]
fn agent_handshake_times_out_at_its_deadline() {
    let timeout = settings().handshake_timeout;
    let nano = Duration::from_nanos(1);
    for hello in [false, true] {
        let mut p = Setup::default().pair();
        p.mute(Who::Server);
        p.advance(3 * SECOND); // dialling took a while
        let t0 = p.now;
        p.start();
        if hello {
            let h = Hello {
                flags: NO_AUTH,
                window: 65536,
                nonce: SERVER_NONCE,
            };
            p.advance(SECOND);
            p.inject(Who::Agent, &frame(Command::Hello, 0, &h.encode()));
        }
        assert_eq!(p.agent.session.poll_timeout(), Some(t0 + timeout));
        p.advance(t0 + timeout - nano - p.now);
        assert_eq!(p.agent.take_link_events(), []);
        p.advance(nano);
        assert_eq!(p.agent.take_link_events(), [LinkEvent::HandshakeTimeout]);
        assert_eq!(count(&p.agent.stats().links_total), 0);
    }
    let mut p = Setup::base().pair();
    p.mute(Who::Server);
    p.start();
    assert_eq!(p.agent.take_link_events(), [LinkEvent::Up { flags: 0 }]);
    assert_eq!(p.agent.session.poll_timeout(), None);
    p.advance(10 * timeout);
    assert_eq!(p.agent.take_link_events(), []);
}

/// Frames out of place before the handshake is done are ignored and
/// counted: unknown commands apart.
#[test]
fn frames_before_the_handshake_are_counted() {
    let mut p = Setup::default().pair();
    p.mute(Who::Agent);
    for f in [
        frame(Command::Data, 0, b"early"),
        frame(Command::Auth, 0, &[0; 32]),
        frame(Command::Ping, 0, &ms(1)),
        frame(Command::Unknown(99), 0, b"?"),
    ] {
        p.inject(Who::Server, &f);
    }
    assert_eq!(count(&p.server.stats().malformed_total), 3);
    assert_eq!(count(&p.server.stats().unknown_total), 1);
    assert_eq!(p.server.take_sent(), []);
    assert_eq!(p.server.take_asked(), []);

    let mut p = Setup::default().pair();
    p.mute(Who::Server);
    p.start();
    let hello = Hello {
        flags: NO_AUTH,
        window: 65536,
        nonce: SERVER_NONCE,
    };
    for f in [
        frame(Command::Ping, 0, &ms(1)),
        frame(Command::Ready, 0, &[]), // before HELLO
        frame(Command::Hello, 0, &hello.encode()),
        frame(Command::Hello, 0, &hello.encode()), // a second HELLO
        frame(Command::Connect, 1, &[]),           // after HELLO: no base server
        frame(Command::Unknown(77), 0, &[]),
    ] {
        p.inject(Who::Agent, &f);
    }
    assert_eq!(count(&p.agent.stats().malformed_total), 4);
    assert_eq!(count(&p.agent.stats().unknown_total), 1);
    assert_eq!(p.agent.take_link_events(), []);
    assert_eq!(p.agent.take_asked(), []);
    assert!(!p.agent.session.is_up());
}

// ===== streams =====

/// Bytes flow both ways; the CONNECT names the client (PEER_ADDR); the
/// byte counters count payload.
#[test]
fn streams_carry_bytes_both_ways() {
    let mut p = Setup::default().up();
    let s = p.open();
    assert_eq!(
        p.server.take_sent(),
        [connect_frame(s.id, client_addr(s.client))]
    );
    assert_eq!(
        p.agent.take_asked(),
        [Asked::Connect {
            id: s.id,
            client: Some(client_addr(s.client)),
            target: Vec::new()
        }]
    );
    p.server.write(s.client, b"GET /");
    p.drive();
    p.agent.write(s.service, b"200 OK");
    p.drive();
    assert_eq!(p.agent.received(s.service), b"GET /");
    assert_eq!(p.server.received(s.client), b"200 OK");
    assert_eq!(p.server.take_sent(), [frame(Command::Data, s.id, b"GET /")]);
    assert_eq!(p.agent.take_sent(), [frame(Command::Data, s.id, b"200 OK")]);
    assert_eq!(count(&p.server.stats().bytes_to_link_total), 5);
    assert_eq!(count(&p.server.stats().bytes_from_link_total), 6);
    assert_eq!(count(&p.agent.stats().bytes_to_link_total), 6);
    assert_eq!(count(&p.agent.stats().bytes_from_link_total), 5);
    for side in [&p.server, &p.agent] {
        assert_eq!(count(&side.stats().streams), 1);
        assert_eq!(count(&side.stats().streams_total), 1);
    }
    // A large write is cut into max_data frames.
    p.server.write(s.client, &[b'z'; 40_000]);
    p.drive();
    let sizes: Vec<usize> = p
        .server
        .take_sent()
        .iter()
        .map(|f| f.payload.len())
        .collect();
    assert_eq!(sizes, [16 * 1024, 16 * 1024, 40_000 - 32 * 1024]);
    assert_eq!(p.agent.received(s.service).len(), 5 + 40_000);
}

/// CLOSE_ACK: the server's CLOSE is answered; until the answer comes the id
/// is not given to a new client, and late DATA for it is dropped and
/// counted. The answer frees it and is not answered itself.
#[test]
fn close_ack_holds_the_id_until_the_peers_close() {
    let mut p = Setup::default().up();
    let s = p.open();
    p.agent.hold = true; // the agent's answer is slow to come
    p.server.close(s.client);
    p.drive();
    assert_eq!(
        p.server.take_sent()[1..],
        [frame(Command::Close, s.id, &[])]
    );
    assert_eq!(p.agent.take_events(), [Event::End(s.service, End::Close)]);
    assert_eq!(p.agent.take_sent(), [frame(Command::Close, s.id, &[])]);
    for _ in 1..IDS {
        p.open();
    }
    assert_eq!(
        p.try_open(),
        Err(NoId {
            open: 255,
            quarantined: 0,
            closing: 1,
            at_max: false
        })
    );
    // DATA the agent sent before it read our CLOSE: dropped, counted.
    p.inject(Who::Server, &frame(Command::Data, s.id, b"late"));
    assert_eq!(count(&p.server.stats().stale_total), 1);
    assert_eq!(p.server.take_events(), []);
    assert!(p.try_open().is_err());
    // The answer frees the id, and is not answered.
    p.server.take_sent();
    p.agent.hold = false;
    p.drive();
    assert_eq!(p.server.take_sent(), []);
    assert_eq!(
        p.try_open().map(|(_, id)| id),
        Ok(s.id),
        "free once acknowledged"
    );
    assert_eq!(count(&p.server.stats().malformed_total), 0);
}

/// Both sides close a stream at once: each CLOSE acknowledges the other,
/// and nobody sends a third.
#[test]
fn closes_that_cross_acknowledge_each_other() {
    let mut p = Setup::default().up();
    let s = p.open();
    p.clear();
    p.server.hold = true;
    p.agent.hold = true;
    p.server.close(s.client);
    p.agent.close(s.service);
    p.drive();
    p.server.hold = false;
    p.agent.hold = false;
    p.drive();
    assert_eq!(p.server.take_sent(), [frame(Command::Close, s.id, &[])]);
    assert_eq!(p.agent.take_sent(), [frame(Command::Close, s.id, &[])]);
    assert_eq!(p.server.take_events(), []);
    assert_eq!(p.agent.take_events(), []);
    for side in [&p.server, &p.agent] {
        assert_eq!(count(&side.stats().streams), 0);
        assert_eq!(count(&side.stats().stale_total), 0);
    }
    // The agent holds the id no longer: a CONNECT for it is served.
    p.inject(Who::Agent, &connect_frame(s.id, client_addr(1)));
    assert!(p.agent.handle_of(s.id).is_some());
    assert_eq!(count(&p.agent.stats().malformed_total), 0);
}

/// Base mode: ids are given in rotation, each once; an id the server closed
/// stays out of rotation for `id_quarantine`. With all 256 quarantined a
/// client is refused; at exactly the end of the quarantine ids are given
/// again. DATA for a quarantined id is dropped and counted.
#[test]
fn base_server_quarantines_the_ids_it_closed() {
    let mut p = Setup::base().up();
    let t0 = p.now;
    for k in 0..IDS {
        let s = p.open();
        assert_eq!(usize::from(s.id), k, "ids in rotation");
        p.server.close(s.client);
        p.drive();
        assert_eq!(p.agent.take_events(), [Event::End(s.service, End::Close)]);
        p.advance(Duration::from_millis(1));
    }
    assert_eq!(
        p.server
            .take_sent()
            .iter()
            .filter(|f| f.command == Command::Close)
            .count(),
        IDS
    );
    assert_eq!(
        p.agent.take_sent(),
        [],
        "a base agent does not answer CLOSE"
    );
    let all_quarantined = Err(NoId {
        open: 0,
        quarantined: IDS,
        closing: 0,
        at_max: false,
    });
    assert_eq!(p.try_open(), all_quarantined);
    // Late DATA for a quarantined id.
    p.inject(Who::Server, &frame(Command::Data, 9, b"late"));
    assert_eq!(count(&p.server.stats().stale_total), 1);
    // Id 0 was closed at t0: free at t0 + 2 s, not a nanosecond before.
    let quarantine = server_settings().quarantine.unwrap();
    p.advance(t0 + quarantine - Duration::from_nanos(1) - p.now);
    assert_eq!(p.try_open(), all_quarantined);
    p.advance(Duration::from_nanos(1));
    assert_eq!(p.try_open().map(|(_, id)| id), Ok(0));
    let quarantined = IDS - 1;
    assert_eq!(
        p.try_open(),
        Err(NoId {
            open: 1,
            quarantined,
            closing: 0,
            at_max: false
        })
    );
}

/// Base mode: the agent's CLOSE frees the id at once (no quarantine, no
/// answer); the next client may get it.
#[test]
fn base_agent_close_frees_the_id_at_once() {
    let mut p = Setup::base().up();
    let streams: Vec<Stream> = (0..IDS).map(|_| p.open()).collect();
    let s = streams[40];
    p.agent.close(s.service);
    p.drive();
    assert_eq!(
        p.agent.take_sent().last(),
        Some(&frame(Command::Close, 40, &[]))
    );
    assert_eq!(p.server.take_events(), [Event::End(s.client, End::Close)]);
    assert!(!p.server.sent.iter().any(|f| f.command == Command::Close));
    assert_eq!(p.try_open().map(|(_, id)| id), Ok(40));
}

/// `max_streams` refuses the extra client (`at_max`); closing a stream
/// makes room.
#[test]
fn max_streams_refuses_the_extra_client() {
    let mut p = Setup {
        server: Settings {
            max_streams: 2,
            ..server_settings()
        },
        ..Setup::default()
    }
    .up();
    let a = p.open();
    let b = p.open();
    assert_eq!(
        p.try_open(),
        Err(NoId {
            open: 2,
            quarantined: 0,
            closing: 0,
            at_max: true
        })
    );
    assert_eq!(count(&p.server.stats().streams_total), 2);
    p.server.close(a.client);
    p.drive();
    let c = p.open();
    assert_eq!(c.id, 2);
    p.server.write(b.client, b"b still works");
    p.drive();
    assert_eq!(p.agent.received(b.service), b"b still works");
    assert_eq!(count(&p.server.stats().streams), 2);
}

/// A stream accepted on a link that is not up (gone meanwhile) is ended at
/// once.
#[test]
fn a_stream_accepted_before_the_link_is_up_is_aborted() {
    let mut agent =
        Session::<u32>::agent(settings(), Arc::new(TunnelStats::default()), Instant::now());
    agent.accept_stream(3, 77);
    assert_eq!(agent.poll_event(), Some(Event::End(77, End::Abort)));
    assert_eq!(agent.poll_event(), None);
    assert_eq!(agent.open_streams(), 0);
    assert_eq!(count(&agent.stats().streams_total), 0);
}

/// A base server that reuses an id the agent still holds: its CLOSE was
/// lost; the old stream is aborted and CLOSEd, and the new one served.
#[test]
fn agent_closes_the_old_stream_when_an_open_id_is_reused() {
    let mut p = Setup::base().pair();
    p.mute(Who::Server);
    p.start();
    p.inject(Who::Agent, &frame(Command::Connect, 4, &[]));
    let old = p.agent.handle_of(4).unwrap();
    p.clear();
    p.inject(Who::Agent, &frame(Command::Connect, 4, &[]));
    let new = p.agent.handle_of(4).unwrap();
    assert_ne!(old, new);
    assert_eq!(
        p.agent.take_events(),
        [
            Event::Problem(Problem::IdReused { id: 4 }),
            Event::End(old, End::Abort)
        ]
    );
    assert_eq!(p.agent.take_sent(), [frame(Command::Close, 4, &[])]);
    assert_eq!(p.agent.take_asked().len(), 1, "the new CONNECT is served");
    assert_eq!(count(&p.agent.stats().streams), 1);
    assert_eq!(count(&p.agent.stats().streams_total), 2);
}

/// CLOSE_ACK: a CONNECT for an id whose CLOSE the server has not answered
/// is ignored and counted, whether the agent closed or refused the stream;
/// the server's answer frees the id.
#[test]
fn agent_ignores_a_connect_for_an_id_not_yet_released() {
    let mut p = hand_server(Setup::default(), ext::CLOSE_ACK, 65536);
    p.inject(Who::Agent, &frame(Command::Connect, 5, &[]));
    let service = p.agent.handle_of(5).unwrap();
    p.agent.close(service);
    p.drive();
    assert_eq!(p.agent.take_sent(), [frame(Command::Close, 5, &[])]);
    p.clear();
    p.inject(Who::Agent, &frame(Command::Connect, 5, &[]));
    assert_eq!(
        p.agent.take_events(),
        [Event::Problem(Problem::IdNotReleased { id: 5 })]
    );
    assert_eq!(p.agent.take_asked(), []);
    assert_eq!(count(&p.agent.stats().malformed_total), 1);
    // The server's CLOSE acknowledges ours: not answered, the id is free.
    p.inject(Who::Agent, &frame(Command::Close, 5, &[]));
    assert_eq!(p.agent.take_sent(), []);
    p.inject(Who::Agent, &frame(Command::Connect, 5, &[]));
    assert_eq!(p.agent.take_asked().len(), 1);

    // A refused CONNECT holds its id the same way.
    let mut p = hand_server(Setup::default(), ext::CLOSE_ACK, 65536);
    p.agent.refuse_connects();
    p.inject(Who::Agent, &frame(Command::Connect, 6, &[]));
    assert_eq!(p.agent.take_sent(), [frame(Command::Close, 6, &[])]);
    p.inject(Who::Agent, &frame(Command::Connect, 6, &[]));
    assert_eq!(
        p.agent.take_events(),
        [Event::Problem(Problem::IdNotReleased { id: 6 })]
    );
    assert_eq!(p.agent.take_asked().len(), 1, "only the first CONNECT");
}

// ===== credit =====

/// Credit may reach 2^32 - 1 but not exceed it: a WINDOW beyond that fails
/// the link, which is aborted; both sides reset their streams.
#[test]
fn credit_above_u32_fails_the_link() {
    let mut p = Setup::default().up();
    let s = p.open();
    let window = settings().window; // the agent's: the server's credit
    p.inject(Who::Server, &window_frame(s.id, u32::MAX - window));
    assert_eq!(p.server.take_link_events(), []);
    p.inject(Who::Server, &window_frame(s.id, 1));
    assert_eq!(
        p.server.take_link_events(),
        [LinkEvent::Failed(Failure::CreditOverflow { id: s.id })]
    );
    assert!(p.server.is_down() && p.agent.is_down());
    assert_eq!(p.server.socket(s.client).end, Some(End::Reset));
    assert_eq!(p.agent.socket(s.service).end, Some(End::Reset));
    for side in [&p.server, &p.agent] {
        assert_eq!(count(&side.stats().streams), 0);
        assert_eq!(count(&side.stats().links), 0);
    }
}

/// DATA beyond the credit granted ends the stream: dropped, the socket
/// aborted, CLOSE sent, counted. Up to the credit exactly is fine.
#[test]
fn data_beyond_credit_ends_the_stream() {
    let mut p = hand_agent(
        Setup {
            server: Settings {
                window: 1024,
                ..server_settings()
            },
            ..Setup::default()
        },
        ext::CREDIT | ext::CLOSE_ACK,
        65536,
    );
    let (client, id) = p.try_open().unwrap();
    p.server.app_reads(client, false); // no WINDOW: the credit stays 1024
    p.inject(Who::Server, &frame(Command::Data, id, &[1; 1000]));
    p.inject(Who::Server, &frame(Command::Data, id, &[2; 24]));
    assert_eq!(p.server.take_events(), []);
    p.inject(Who::Server, &frame(Command::Data, id, &[3]));
    assert_eq!(
        p.server.take_events(),
        [
            Event::Problem(Problem::CreditExceeded { id, len: 1 }),
            Event::End(client, End::Abort)
        ]
    );
    assert_eq!(p.server.take_sent()[1..], [frame(Command::Close, id, &[])]);
    assert_eq!(count(&p.server.stats().credit_violations_total), 1);
    assert_eq!(p.server.socket(client).received, b"", "nothing delivered");
    assert!(
        p.server.socket(client).queue.is_empty(),
        "dropped with the socket"
    );
    assert_eq!(count(&p.server.stats().streams), 0);
    // More DATA for it: the id is closing, so dropped and counted.
    p.inject(Who::Server, &frame(Command::Data, id, &[4]));
    assert_eq!(count(&p.server.stats().stale_total), 1);
}

/// A sender reads a stream no further than its credit: at zero it stops
/// reading that socket, and a WINDOW resumes it.
#[test]
fn sender_stops_at_zero_credit_and_resumes_on_window() {
    let small = Settings {
        window: 4096,
        max_window: 4096,
        ..server_settings()
    };
    let mut p = Setup {
        server: small,
        ..Setup::default()
    }
    .up();
    let s = p.open();
    assert_eq!(p.agent.take_events(), [Event::Chunk(s.service, 4096)]);
    p.clear();
    p.server.app_reads(s.client, false);
    p.agent.write(s.service, &[7; 10_000]);
    p.drive();
    assert_eq!(
        p.agent.take_sent(),
        [frame(Command::Data, s.id, &[7; 4096])]
    );
    assert!(!p.agent.socket(s.service).reading, "out of credit");
    assert_eq!(p.agent.socket(s.service).unread.len(), 10_000 - 4096);
    assert_eq!(p.server.take_sent(), [], "nothing written: no WINDOW");
    // The client reads: half a window and more is owed, WINDOW 4096.
    p.server.app_reads(s.client, true);
    p.drive();
    assert_eq!(p.server.take_sent()[0], window_frame(s.id, 4096));
    assert_eq!(p.agent.take_events()[0], Event::Reading(s.service, true));
    assert_eq!(p.server.received(s.client), [7; 10_000]);
    assert_eq!(count(&p.server.stats().credit_violations_total), 0);
}

/// A peer that advertises a window of 0 gives no credit: streams start
/// paused, and the first WINDOW lets them send that much.
#[test]
fn a_zero_window_starts_streams_paused() {
    let mut p = hand_agent(Setup::default(), ext::CREDIT | ext::CLOSE_ACK, 0);
    let (client, id) = p.try_open().unwrap();
    assert_eq!(
        p.server.take_events(),
        [Event::Chunk(client, 1), Event::Reading(client, false)]
    );
    p.server.write(client, b"waiting for credit");
    p.drive();
    assert_eq!(p.server.take_sent(), [frame(Command::Connect, id, &[])]);
    p.inject(Who::Server, &window_frame(id, 7));
    assert_eq!(
        p.server.take_events(),
        [Event::Chunk(client, 7), Event::Reading(client, true)]
    );
    assert_eq!(p.server.take_sent(), [frame(Command::Data, id, b"waiting")]);
}

/// The receiver grants what its socket has written once it is owed at
/// least half a window, and not before.
#[test]
fn window_is_granted_once_half_a_window_is_written() {
    let mut p = Setup {
        server: Settings {
            window: 1024,
            max_window: 1024,
            ..server_settings()
        },
        ..Setup::default()
    }
    .up();
    let s = p.open();
    p.agent.write(s.service, &[1; 511]);
    p.drive();
    assert_eq!(p.server.received(s.client).len(), 511);
    assert_eq!(
        p.server.take_sent(),
        [connect_frame(s.id, client_addr(s.client))]
    );
    p.agent.write(s.service, &[2]);
    p.drive();
    assert_eq!(p.server.take_sent(), [window_frame(s.id, 512)]);
    assert_eq!(p.agent.take_sent().len(), 2, "two DATA");
    // The agent's credit: 1024 - 512 + 512.
    p.agent.write(s.service, &[3; 2000]);
    p.drive();
    assert_eq!(
        p.agent.take_sent()[0],
        frame(Command::Data, s.id, &[3; 1024]),
        "one frame, the whole credit"
    );
}

/// A CONNECT from `client` on a PEER_ADDR link.
fn connect_frame(id: u8, client: SocketAddr) -> Sent {
    let (peer, n) = encode_peer(client);
    frame(Command::Connect, id, &peer[..n])
}

/// A stream whose socket keeps up and whose sender runs dry on credit gets
/// a larger window: it doubles, up to `max_window`, and the growth goes
/// back to the link's budget when the stream closes.
#[test]
fn window_doubles_on_a_fast_stream_up_to_max_window() {
    let (window, max_window) = (1024u32, 8192u32);
    let mut p = Setup {
        server: Settings {
            window,
            max_window,
            ..server_settings()
        },
        agent: Settings {
            max_data: 1024,
            ..settings()
        },
        ..Setup::default()
    }
    .up();
    let s = p.open();
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    p.agent.write(s.service, &data);
    p.drive();
    assert_eq!(p.server.received(s.client), data);
    let stats = p.server.stats();
    assert_eq!(
        count(&stats.window_grown_bytes),
        u64::from(max_window - window)
    );
    assert_eq!(
        count(&stats.window_grown_total),
        3,
        "1024 → 2048 → 4096 → 8192"
    );
    assert_eq!(count(&stats.credit_violations_total), 0);
    // What the agent may send, as the server saw it: never above max_window.
    assert_eq!(p.server.most_credit_granted(s.id), u64::from(max_window));
    p.server.close(s.client);
    p.drive();
    assert_eq!(count(&p.server.stats().window_grown_bytes), 0);
}

/// The streams of a link grow their windows together by at most
/// `link_window`; a stream that finds no budget left keeps its window. The
/// link going down gives the growth back.
#[test]
fn window_growth_of_a_link_stays_within_link_window() {
    let (window, link_window) = (1024u32, 4096u32);
    let mut p = Setup {
        server: Settings {
            window,
            max_window: 8192,
            link_window,
            ..server_settings()
        },
        agent: Settings {
            max_data: 1024,
            ..settings()
        },
        ..Setup::default()
    }
    .up();
    let streams: Vec<Stream> = (0..4).map(|_| p.open()).collect();
    for s in &streams {
        p.agent.write(s.service, &[9; 100_000]);
    }
    p.drive();
    for s in &streams {
        assert_eq!(p.server.received(s.client).len(), 100_000);
    }
    assert_eq!(
        count(&p.server.stats().window_grown_bytes),
        u64::from(link_window)
    );
    // What the agent could hold on all streams together: at most
    // 4 × window + link_window.
    let held: u64 = streams
        .iter()
        .map(|s| p.server.most_credit_granted(s.id))
        .sum();
    assert!(held > 4 * u64::from(window), "no growth: {held}");
    assert!(
        held <= 4 * u64::from(window) + u64::from(link_window),
        "{held}"
    );
    // Closing the streams gives their growth back to the link: a new
    // stream grows by the whole budget.
    for s in &streams {
        p.server.close(s.client);
    }
    p.drive();
    assert_eq!(count(&p.server.stats().window_grown_bytes), 0);
    let s = p.open();
    p.agent.write(s.service, &[9; 100_000]);
    p.drive();
    assert_eq!(
        count(&p.server.stats().window_grown_bytes),
        u64::from(link_window)
    );
    assert_eq!(
        p.server.most_credit_granted(s.id),
        u64::from(window + link_window)
    );
    // So does the link going down.
    p.server.link = Link::Closing { abort: false };
    p.drive();
    assert_eq!(count(&p.server.stats().window_grown_bytes), 0);
    assert_eq!(count(&p.server.stats().streams), 0);
}

/// The window grows only when a DATA frame leaves the sender with less
/// than an eighth of the window as credit: 127 bytes of 1024 left, not 128.
#[test]
fn window_grows_when_the_sender_has_less_than_an_eighth_left() {
    for (sent, grown) in [(896, 0), (897, 1)] {
        let mut p = Setup {
            server: Settings {
                window: 1024,
                max_window: 8192,
                ..server_settings()
            },
            agent: Settings {
                max_data: sent,
                ..settings()
            },
            ..Setup::default()
        }
        .up();
        let s = p.open();
        p.agent.write(s.service, &vec![1; sent]);
        p.drive();
        assert_eq!(p.agent.sent.len(), 1, "one DATA frame");
        assert_eq!(
            count(&p.server.stats().window_grown_total),
            grown,
            "{} bytes of credit left",
            1024 - sent
        );
    }
}

/// A stream whose socket does not keep up keeps its window, and a CREDIT
/// link never pauses: the sender stops at the window instead.
#[test]
fn a_slow_socket_keeps_its_window() {
    let mut p = Setup {
        server: Settings {
            window: 1024,
            max_window: 8192,
            ..server_settings()
        },
        ..Setup::default()
    }
    .up();
    let s = p.open();
    p.server.app_reads(s.client, false);
    p.agent.write(s.service, &[5; 10_000]);
    p.drive();
    assert_eq!(p.server.socket(s.client).queue.len(), 1024, "one window");
    assert_eq!(p.server.take_events(), [], "no PauseLink, no Stall");
    assert_eq!(count(&p.server.stats().window_grown_total), 0);
    // It reads now and then: whenever DATA comes, its socket is behind.
    for _ in 0..8 {
        p.server.app_reads_once(s.client);
        p.drive();
        assert_eq!(p.server.socket(s.client).queue.len(), 1024);
    }
    assert_eq!(count(&p.server.stats().window_grown_total), 0);
    assert_eq!(p.server.most_credit_granted(s.id), 1024);
    p.server.app_reads(s.client, true);
    p.drive();
    assert_eq!(p.server.received(s.client), [5; 10_000]);
}

/// Base mode: a socket more than `window` behind pauses the link (and arms
/// its stall timeout); frames behind it wait on the link. When the socket
/// drains, the link resumes and they are delivered.
#[test]
fn base_link_pauses_while_a_socket_is_over_its_window() {
    let mut p = Setup {
        server: Settings {
            window: 1024,
            ..server_settings()
        },
        agent: Settings {
            max_data: 1024,
            ..settings()
        },
        ..Setup::base()
    }
    .up();
    let slow = p.open();
    let other = p.open();
    p.server.app_reads(slow.client, false);
    p.agent.write(slow.service, &[1; 3000]);
    p.drive();
    p.agent.write(other.service, b"behind");
    p.drive();
    // 1024 queued is not over the window; 2048 is.
    assert_eq!(
        p.server.take_events(),
        [Event::PauseLink, Event::Stall(slow.client, true)]
    );
    assert_eq!(p.server.socket(slow.client).queue.len(), 2048);
    assert!(p.server.socket(slow.client).stall);
    assert_eq!(p.server.received(other.client), b"", "waiting on the link");
    assert!(!p.server.inbox.is_empty());
    p.server.app_reads(slow.client, true);
    p.drive();
    assert_eq!(
        p.server.take_events(),
        [Event::Stall(slow.client, false), Event::ResumeLink]
    );
    assert!(!p.server.socket(slow.client).stall);
    assert_eq!(p.server.received(slow.client), [1; 3000]);
    assert_eq!(p.server.received(other.client), b"behind");
}

/// Base mode: the stall timeout closes the socket that holds the link; the
/// link resumes, the peer gets CLOSE, and the DATA still coming for the
/// stream is dropped and counted.
#[test]
fn base_stall_close_resumes_the_link() {
    let mut p = Setup {
        server: Settings {
            window: 1024,
            ..server_settings()
        },
        agent: Settings {
            max_data: 1024,
            ..settings()
        },
        ..Setup::base()
    }
    .up();
    let slow = p.open();
    let other = p.open();
    p.server.app_reads(slow.client, false);
    p.agent.write(slow.service, &[1; 4096]);
    p.agent.write(other.service, b"behind");
    p.drive();
    assert!(p.server.link_paused);
    p.clear();
    // The engine's stall timeout: the socket is closed.
    p.server.close(slow.client);
    p.drive();
    assert_eq!(
        p.server.take_events(),
        [Event::Stall(slow.client, false), Event::ResumeLink]
    );
    assert_eq!(p.server.take_sent(), [frame(Command::Close, slow.id, &[])]);
    assert_eq!(
        p.agent.take_events(),
        [Event::End(slow.service, End::Close)]
    );
    // DATA behind on the link for the closed id (1024 + 1024 of it).
    assert_eq!(count(&p.server.stats().stale_total), 2);
    assert_eq!(p.server.received(other.client), b"behind");
    assert_eq!(count(&p.server.stats().streams), 1);
}

/// Streams stop reading while the link holds more than `LINK_HIGH`; when it
/// drains they resume in the order they stopped.
#[test]
fn link_high_pauses_streams_and_drained_resumes_them_in_order() {
    let mut p = Setup::default().up();
    let [a, b, c] = [p.open(), p.open(), p.open()];
    p.clear();
    p.server.hold = true; // the agent reads slowly
    p.server.write(c.client, &[3; 80_000]);
    p.drive();
    // Four 16 KiB frames take the queue over LINK_HIGH.
    assert_eq!(p.server.take_sent().len(), 4);
    assert!(p.server.link_out.len() > LINK_HIGH);
    assert!(!p.server.socket(c.client).reading);
    p.server.write(a.client, b"a");
    p.server.write(b.client, b"b");
    p.drive();
    assert_eq!(
        p.server.take_sent(),
        [
            frame(Command::Data, a.id, b"a"),
            frame(Command::Data, b.id, b"b")
        ],
        "each sends the frame it had read, then stops"
    );
    assert!(!p.server.socket(a.client).reading && !p.server.socket(b.client).reading);
    assert_eq!(p.server.take_events(), []);
    p.server.hold = false;
    p.drive();
    assert_eq!(
        p.server.take_events()[..3],
        [
            Event::Reading(c.client, true),
            Event::Reading(a.client, true),
            Event::Reading(b.client, true)
        ]
    );
    assert_eq!(p.agent.received(c.service), [3; 80_000]);
}

// ===== half-close =====

/// The client ends its request: SHUTDOWN, the service reads EOF and still
/// answers; its EOF makes both halves done and the stream closes with a
/// CLOSE each way. (The agent's CLOSE comes before the client's socket has
/// closed: the server's CLOSE answers it, and is not answered.)
#[test]
fn half_close_the_client_ends_first() {
    let mut p = Setup::default().up();
    let s = p.open();
    p.clear();
    p.server.write(s.client, b"request");
    p.server.eof(s.client);
    p.drive();
    assert_eq!(
        p.server.take_sent(),
        [
            frame(Command::Data, s.id, b"request"),
            frame(Command::Shutdown, s.id, &[])
        ]
    );
    assert_eq!(p.agent.take_events(), [Event::ShutdownWrite(s.service)]);
    assert!(p.agent.socket(s.service).write_shut);
    assert_eq!(p.agent.received(s.service), b"request");
    assert_eq!(p.server.take_events(), [], "the client's socket stays open");
    p.agent.write(s.service, b"reply");
    p.agent.eof(s.service);
    p.drive();
    assert_eq!(
        p.agent.take_sent(),
        [
            frame(Command::Data, s.id, b"reply"),
            frame(Command::Shutdown, s.id, &[]),
            frame(Command::Close, s.id, &[])
        ]
    );
    assert_eq!(p.agent.take_events(), [Event::Close(s.service)]);
    assert_eq!(
        p.server.take_events(),
        [
            Event::ShutdownWrite(s.client),
            Event::Close(s.client),
            Event::End(s.client, End::Close)
        ]
    );
    assert_eq!(p.server.take_sent(), [frame(Command::Close, s.id, &[])]);
    assert_eq!(p.agent.take_sent(), [], "the answer is not answered");
    assert_eq!(p.server.received(s.client), b"reply");
    for side in [&p.server, &p.agent] {
        assert_eq!(count(&side.stats().streams), 0);
        assert_eq!(count(&side.stats().stale_total), 0);
        assert_eq!(count(&side.stats().malformed_total), 0);
    }
}

/// The service ends first (a banner, then EOF): the client reads EOF and
/// can still send; its EOF closes the stream.
#[test]
fn half_close_the_service_ends_first() {
    let mut p = Setup::default().up();
    let s = p.open();
    p.clear();
    p.agent.write(s.service, b"banner");
    p.agent.eof(s.service);
    p.drive();
    assert_eq!(p.server.take_events(), [Event::ShutdownWrite(s.client)]);
    assert_eq!(p.server.received(s.client), b"banner");
    p.server.write(s.client, b"late request");
    p.server.eof(s.client);
    p.drive();
    assert_eq!(p.agent.received(s.service), b"late request");
    assert_eq!(
        p.agent.take_events(),
        [
            Event::ShutdownWrite(s.service),
            Event::Close(s.service),
            Event::End(s.service, End::Close)
        ]
    );
    assert_eq!(p.server.take_events(), [Event::Close(s.client)]);
    assert_eq!(
        p.server.take_sent(),
        [
            frame(Command::Data, s.id, b"late request"),
            frame(Command::Shutdown, s.id, &[]),
            frame(Command::Close, s.id, &[])
        ]
    );
    assert_eq!(
        p.agent.take_sent(),
        [
            frame(Command::Data, s.id, b"banner"),
            frame(Command::Shutdown, s.id, &[]),
            frame(Command::Close, s.id, &[]), // the answer
        ]
    );
    for side in [&p.server, &p.agent] {
        assert_eq!(count(&side.stats().streams), 0);
        assert_eq!(count(&side.stats().stale_total), 0);
    }
}

/// Without HALF_CLOSE an EOF closes the stream, and SHUTDOWN from the peer
/// is out of place.
#[test]
fn without_half_close_eof_closes_the_stream() {
    let mut p = hand_agent(Setup::default(), ext::CLOSE_ACK, 65536);
    let (client, id) = p.try_open().unwrap();
    p.inject(Who::Server, &frame(Command::Shutdown, id, &[]));
    assert_eq!(count(&p.server.stats().malformed_total), 1);
    assert_eq!(p.server.take_events(), []);
    p.server.eof(client);
    p.drive();
    assert_eq!(p.server.take_events(), [Event::Close(client)]);
    assert_eq!(p.server.take_sent()[1..], [frame(Command::Close, id, &[])]);
}

// ===== heartbeat =====

/// A HEARTBEAT link pings when it comes up and every `heartbeat_interval`
/// after, at exactly that time; a PING is answered with its bytes.
#[test]
fn heartbeat_pings_on_schedule_and_pongs_every_ping() {
    let mut p = Setup::default().up();
    let interval = settings().heartbeat_interval;
    let up = p.now;
    assert_eq!(p.server.session.poll_timeout(), Some(up + interval));
    p.advance(interval - Duration::from_nanos(1));
    assert_eq!(p.server.take_sent(), []);
    assert_eq!(p.agent.take_sent(), []);
    p.advance(Duration::from_nanos(1));
    let ping = frame(Command::Ping, 0, &ms(10_000));
    let pong = frame(Command::Pong, 0, &ms(10_000));
    assert_eq!(p.server.take_sent(), [ping.clone(), pong.clone()]);
    assert_eq!(p.agent.take_sent(), [ping, pong]);
    p.advance(interval * 3);
    let pings = |sent: &[Sent]| -> Vec<Vec<u8>> {
        sent.iter()
            .filter(|f| f.command == Command::Ping)
            .map(|f| f.payload.clone())
            .collect()
    };
    let want = [
        ms(20_000).to_vec(),
        ms(30_000).to_vec(),
        ms(40_000).to_vec(),
    ];
    assert_eq!(pings(&p.server.take_sent()), want);
    assert_eq!(pings(&p.agent.take_sent()), want);
    p.inject(Who::Server, &frame(Command::Ping, 0, b"12345678"));
    assert_eq!(p.server.take_sent(), [frame(Command::Pong, 0, b"12345678")]);
    // A PONG is taken silently; a PING of the wrong size is malformed.
    p.inject(Who::Server, &frame(Command::Pong, 0, b"whatever"));
    p.inject(Who::Server, &frame(Command::Ping, 0, b"1234567"));
    assert_eq!(p.server.take_sent(), []);
    assert_eq!(count(&p.server.stats().malformed_total), 1);
    assert_eq!(p.server.take_link_events(), []);
    // No heartbeat without the extension.
    let mut p = hand_agent(Setup::default(), ext::CLOSE_ACK, 65536);
    assert_eq!(p.server.session.poll_timeout(), None);
    p.advance(interval * 5);
    assert_eq!(p.server.take_sent(), []);
}

// ===== malformed and stale frames =====

/// On an up link, every frame out of place or malformed is ignored and
/// counted (unknown commands apart, frames for ids with no stream apart);
/// nothing is sent back and the link stays up.
#[test]
fn malformed_and_stale_frames_are_counted_and_ignored() {
    let mut p = Setup::default().up();
    let s = p.open();
    p.clear();
    let hello = Hello {
        flags: 0,
        window: 1,
        nonce: [0; NONCE_LEN],
    };
    let malformed = [
        frame(Command::Listen, 0, &[]), // a second LISTEN
        listen_frame(0, 1, AGENT_NONCE, SERVICE),
        frame(Command::Hello, 0, &hello.encode()),
        frame(Command::Auth, 0, &[0; 32]),
        frame(Command::Ready, 0, &[]),
        frame(Command::Reject, 0, b"\x01no"),
        frame(Command::Connect, 9, &[]), // to the server
        frame(Command::Ping, 0, b"short"),
        frame(Command::Window, s.id, &0u32.to_be_bytes()),
        frame(Command::Window, s.id, &[0, 1]),
        frame(Command::Data, s.id, &[]),
    ];
    let stale = [
        frame(Command::Data, 42, b"nobody"),
        frame(Command::Close, 42, &[]),
        window_frame(42, 10),
        frame(Command::Shutdown, 42, &[]),
    ];
    for f in malformed.iter().chain(&stale) {
        p.inject(Who::Server, f);
    }
    p.inject(Who::Server, &frame(Command::Unknown(99), 0, b"whatever"));
    let st = p.server.stats();
    assert_eq!(count(&st.malformed_total), malformed.len() as u64);
    assert_eq!(count(&st.stale_total), stale.len() as u64);
    assert_eq!(count(&st.unknown_total), 1);
    assert_eq!(p.server.take_sent(), []);
    assert_eq!(p.server.take_events(), []);
    assert_eq!(p.server.take_link_events(), []);
    assert_eq!(p.server.take_asked(), []);
    // The stream still works.
    p.agent.write(s.service, b"alive");
    p.drive();
    assert_eq!(p.server.received(s.client), b"alive");

    // The agent: a PEER_ADDR CONNECT without a valid address is counted and
    // its payload taken as the target; WINDOW and SHUTDOWN need their
    // extensions.
    let mut p = hand_server(Setup::default(), ext::PEER_ADDR, 65536);
    p.inject(Who::Agent, &frame(Command::Connect, 1, b"\x09junk"));
    assert_eq!(
        p.agent.take_asked(),
        [Asked::Connect {
            id: 1,
            client: None,
            target: b"\x09junk".to_vec()
        }]
    );
    p.inject(Who::Agent, &window_frame(1, 100));
    p.inject(Who::Agent, &frame(Command::Shutdown, 1, &[]));
    p.inject(Who::Agent, &frame(Command::Listen, 0, &[]));
    assert_eq!(count(&p.agent.stats().malformed_total), 4);
    assert_eq!(count(&p.agent.stats().stale_total), 0);
}

// ===== counters =====

/// The gauges (links, streams, window growth) go back to 0 when the link
/// goes down, on both sides; the streams are reset; totals stay; a second
/// `close_all` changes nothing.
#[test]
fn gauges_return_to_zero_when_the_link_goes_down() {
    let mut p = Setup {
        server: Settings {
            window: 1024,
            max_window: 8192,
            ..server_settings()
        },
        ..Setup::default()
    }
    .up();
    let streams: Vec<Stream> = (0..3).map(|_| p.open()).collect();
    p.agent.write(streams[0].service, &[1; 50_000]);
    p.drive();
    assert!(count(&p.server.stats().window_grown_bytes) > 0);
    for side in [&p.server, &p.agent] {
        assert_eq!(count(&side.stats().links), 1);
        assert_eq!(count(&side.stats().streams), 3);
    }
    p.agent.link = Link::Closing { abort: false };
    p.drive();
    for side in [&mut p.server, &mut p.agent] {
        assert!(side.is_down());
        let st = side.stats();
        assert_eq!(count(&st.links), 0);
        assert_eq!(count(&st.streams), 0);
        assert_eq!(count(&st.window_grown_bytes), 0);
        assert_eq!(count(&st.links_total), 1);
        assert_eq!(count(&st.streams_total), 3);
        side.session.close_all(|s| panic!("{s} reset twice"));
        assert_eq!(count(&side.stats().links), 0, "no second decrement");
    }
    for s in &streams {
        assert_eq!(p.server.socket(s.client).end, Some(End::Reset));
        assert_eq!(p.agent.socket(s.service).end, Some(End::Reset));
    }
}
