//! One tunnel link as a state machine (docs/PROTOCOL.md): the handshake of
//! either side, the stream multiplexer, credit and window growth, half-close,
//! close-ack and the server's id quarantine, and the heartbeat schedule.
//!
//! Sans-IO: the session never touches a socket, an engine or a clock. The
//! adapter (the tunnel roles; the unit tests' in-memory pair; the fuzz
//! target) feeds it parsed frames ([`Session::handle`]), what happened to the
//! stream sockets (`stream_*`, `delivered`, `data_sent`) and the time, and
//! carries out what it asks for:
//! - bytes for the link: [`Session::transmit`], then [`Session::transmitted`];
//! - stream and link events: [`Session::poll_event`], [`Session::poll_link_event`];
//! - its next deadline: [`Session::poll_timeout`], then [`Session::handle_timeout`].
//!
//! DATA goes out without passing through the session's buffer: the adapter
//! writes the frame itself and reports it ([`Session::data_sent`]), after
//! sending whatever [`Session::transmit`] held, so frames keep their order.
//!
//! A stream socket is named by `S`, the adapter's handle for it (the
//! engine's connection key; a number in tests), so every event names the
//! socket it concerns without a lookup.
//!
//! Invariants: a stream is one `Slot::Open` of the link's 256 ids; it leaves
//! the slot exactly once, with an [`Event::End`] unless the adapter reported
//! the socket gone ([`Session::stream_closed`]). Bytes queued for a stream
//! socket are bounded by its window (credit, or the base rule that pauses
//! the link); the link's own queue by [`LINK_HIGH`] plus a frame per stream.

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, trace};

use super::auth::{self, Transcript};
use super::frame::{self, Frame, Listen};
use super::stats::TunnelStats;
use crate::codec::tunnel::{
    Command, HEADER_LEN, Hello, ListenRequest, MAX_PAYLOAD, NONCE_LEN, ext,
};
use crate::metrics::{add, bump, sub};

/// Streams stop reading while the link holds more than this many unsent
/// bytes, and take turns when it drains (one frame each per round).
pub const LINK_HIGH: usize = 64 * 1024;
/// Ids on one link.
pub const IDS: usize = 256;

/// A session's stream and link settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Our receive window per stream (credit we grant; base-mode queue bound).
    pub window: u32,
    /// CREDIT links: the most a stream's receive window grows to.
    pub max_window: u32,
    /// CREDIT links: the most growth above `window` a link's streams hold together.
    pub link_window: u32,
    /// Largest DATA payload we send.
    pub max_data: usize,
    /// Streams at once per link.
    pub max_streams: usize,
    /// Server, base mode: ids it closed stay unused this long.
    pub quarantine: Option<Duration>,
    /// The handshake must finish within this.
    pub handshake_timeout: Duration,
    /// HEARTBEAT links: a PING this often.
    pub heartbeat_interval: Duration,
}

impl Settings {
    /// The send-queue bound of a link: [`LINK_HIGH`], plus one DATA frame
    /// from every stream (each may send one before it sees the link is full,
    /// and all resume together when it drains), plus room for control frames
    /// (WINDOW, CLOSE, SHUTDOWN, PONG) for every stream.
    pub fn link_queue(&self) -> usize {
        LINK_HIGH + self.max_streams * (self.max_data + HEADER_LEN + 64) + 4096
    }

    /// The send-queue bound of a stream socket: the largest window (a grown
    /// one on a CREDIT link), plus one frame the base-mode rule lets through
    /// before it pauses the link. Base mode still pauses at `window`.
    pub fn stream_queue(&self) -> usize {
        self.window.max(self.max_window) as usize + MAX_PAYLOAD + HEADER_LEN
    }
}

/// How a stream socket the session let go of is to be closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Flush, then close (the peer closed the stream).
    Close,
    /// Close at once, dropping what is queued (the stream broke a rule).
    Abort,
    /// Reset, so the client sees the stream was cut (its link went down).
    Reset,
}

/// What the adapter does to a stream socket, or to the link's reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<S> {
    /// The session no longer holds this stream: close its socket.
    End(S, End),
    /// Close the socket gracefully; the stream stays until
    /// [`Session::stream_closed`].
    Close(S),
    /// The peer will send no more: shut the socket's write side down.
    ShutdownWrite(S),
    /// Read the socket (`true`) or stop reading it.
    Reading(S, bool),
    /// Read at most this many bytes at a time from the socket.
    Chunk(S, usize),
    /// Base rule: the socket holds more than a window; arm (`true`) or
    /// disarm its stall timeout.
    Stall(S, bool),
    /// Stop reading the link (a stream socket is over its window) ...
    PauseLink,
    /// ... and read it again.
    ResumeLink,
    /// A stream broke a rule: a warning the adapter rate-limits.
    Problem(Problem),
}

/// A stream-level fault worth a (rate-limited) warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    /// DATA beyond the stream's credit: the stream was closed.
    CreditExceeded {
        /// The stream.
        id: u8,
        /// The DATA's length.
        len: usize,
    },
    /// Agent: a CONNECT for an id still open; the old stream was closed.
    IdReused {
        /// The stream.
        id: u8,
    },
    /// Agent: a CONNECT for an id whose CLOSE is not acknowledged; ignored.
    IdNotReleased {
        /// The stream.
        id: u8,
    },
}

/// What happened to the link as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// The handshake is done: streams may open, with these extensions.
    Up {
        /// The extension bits in force (0: base protocol).
        flags: u16,
    },
    /// The handshake did not finish in time: drop the link.
    HandshakeTimeout,
    /// The peer broke the protocol: drop the link.
    Failed(Failure),
}

/// Why a session gave up on its link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Agent: a HELLO that does not parse.
    MalformedHello,
    /// Agent: HELLO granted bits that were not asked for.
    UnaskedExtensions,
    /// Agent: the server asks for a token and none is configured.
    NoToken,
    /// Agent: READY's tag is wrong.
    ServerNotProven,
    /// Agent: a token is configured and the server did not ask for it.
    TokenNotAsked,
    /// Agent: a base server (CONNECT before HELLO) cannot check the token.
    BaseServer,
    /// Agent: REJECT, with its code and text.
    Rejected {
        /// The code (`codec::tunnel::reject`).
        code: u8,
        /// The text, at most 96 bytes kept.
        text: Vec<u8>,
    },
    /// A WINDOW took a stream's credit above 2^32 - 1 (the link is aborted).
    CreditOverflow {
        /// The stream.
        id: u8,
    },
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::MalformedHello => f.write_str("malformed HELLO"),
            Failure::UnaskedExtensions => {
                f.write_str("the server granted extensions that were not asked for")
            }
            Failure::NoToken => f.write_str("the server asks for a token and none is configured"),
            Failure::ServerNotProven => {
                f.write_str("the server could not prove it knows the token")
            }
            Failure::TokenNotAsked => f.write_str("the server did not ask for the token"),
            Failure::BaseServer => {
                f.write_str("the server speaks the base protocol and cannot check the token")
            }
            Failure::Rejected { code, .. } => {
                let why = match *code {
                    crate::codec::tunnel::reject::UNKNOWN_SERVICE => "unknown service",
                    crate::codec::tunnel::reject::AUTH_FAILED => "authentication failed",
                    crate::codec::tunnel::reject::AUTH_REQUIRED => "a token is required",
                    crate::codec::tunnel::reject::MALFORMED => "malformed request",
                    crate::codec::tunnel::reject::LISTEN_FAILED => {
                        "the public port could not be opened"
                    }
                    _ => "unknown reason",
                };
                write!(f, "server rejected the LISTEN: {why}")
            }
            Failure::CreditOverflow { id } => {
                write!(f, "credit for stream {id} above 2^32 - 1")
            }
        }
    }
}

/// What a frame asks of the adapter beyond the events.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming<'a, S> {
    /// Nothing more.
    Nothing,
    /// Queue these DATA bytes on stream `id`'s socket, then report the
    /// outcome ([`Session::delivered`] or [`Session::stream_closed`]).
    Deliver {
        /// The stream's socket.
        stream: S,
        /// The stream.
        id: u8,
        /// The bytes.
        payload: &'a [u8],
    },
    /// Server: an agent asks for a service. Answer with [`Session::offer`]
    /// (an extension request), [`Session::link_up`] (base) or
    /// [`Session::reject`].
    Listen(Listen<'a>),
    /// Server: the agent's tag is right and READY is queued; the link is
    /// up once the adapter calls [`Session::link_up`].
    Authenticated {
        /// Granted extensions.
        flags: u16,
        /// The agent's window.
        peer_window: u32,
    },
    /// Server: the agent's tag is wrong (counted); refuse the link.
    AuthFailed,
    /// Agent: the server asks for stream `id`. Answer with
    /// [`Session::accept_stream`] or [`Session::refuse_stream`].
    Connect {
        /// The stream.
        id: u8,
        /// The public client, on a `PEER_ADDR` link.
        client: Option<SocketAddr>,
        /// Where to connect (empty: the local service).
        target: &'a [u8],
    },
}

/// Why [`Session::open_stream`] found no id: of the 256, how many are open,
/// quarantined (server, base) and waiting for the peer's CLOSE (CLOSE_ACK).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoId {
    /// Streams open.
    pub open: usize,
    /// Ids in quarantine now.
    pub quarantined: usize,
    /// Ids waiting for the peer's CLOSE.
    pub closing: usize,
    /// The link is at `max_streams` (and not out of ids).
    pub at_max: bool,
}

/// What the agent asks for in its LISTEN.
#[derive(Clone)]
pub struct AgentHello {
    /// Ask for the extensions (`false`: the base protocol's empty LISTEN).
    pub extensions: bool,
    /// The shared secret, if the service needs one.
    pub token: Option<Vec<u8>>,
    /// The service name.
    pub name: Vec<u8>,
    /// The agent's nonce for this link.
    pub nonce: [u8; NONCE_LEN],
}

/// Where the handshake is.
enum Handshake {
    /// Server: waiting for LISTEN.
    AwaitListen,
    /// Server: HELLO asked for AUTH; waiting for the agent's tag.
    AwaitAuth(Box<AuthState>),
    /// Server: READY sent; up once the adapter has opened the service.
    Offered,
    /// Agent: the TCP connection is not up yet.
    NotStarted,
    /// Agent: LISTEN sent; waiting for HELLO (or, from a base server, a CONNECT).
    AwaitHello(Box<AgentHello>, u16),
    /// Agent: HELLO seen; waiting for READY.
    AwaitReady(Box<AuthState>),
    /// Streams flow.
    Up,
}

/// What the tags of one handshake cover, and the token they are keyed with.
struct AuthState {
    token: Option<Vec<u8>>,
    name: Vec<u8>,
    agent_nonce: [u8; NONCE_LEN],
    server_nonce: [u8; NONCE_LEN],
    flags: u16,
    peer_window: u32,
}

impl AuthState {
    fn transcript(&self) -> Transcript<'_> {
        Transcript {
            agent_nonce: &self.agent_nonce,
            server_nonce: &self.server_nonce,
            flags: self.flags,
            name: &self.name,
        }
    }
}

/// One client id on a link.
enum Slot<S> {
    Free,
    Open(Stream<S>),
    /// Our CLOSE went out: waiting for the peer's CLOSE (`until` = None,
    /// CLOSE_ACK) or quarantined until `until` (server, base).
    Closing {
        until: Option<Instant>,
    },
}

/// Which directions of a stream are finished (HALF_CLOSE links).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Halves {
    /// Both flow.
    Open,
    /// Our socket read EOF and SHUTDOWN went out.
    SentEof,
    /// The peer's SHUTDOWN came in.
    ReceivedEof,
    /// Both: the socket is closing.
    Done,
}

struct Stream<S> {
    socket: S,
    /// Bytes we may still send (u64::MAX without CREDIT).
    credit: u64,
    /// Credit granted to the peer so far, and payload received.
    granted: u64,
    received: u64,
    /// Our receive window: `window`, grown on a CREDIT link (`grant`).
    window: u32,
    /// Current read chunk of the socket (≤ max_data, ≤ credit).
    chunk: usize,
    paused_credit: bool,
    paused_link: bool,
    /// Base rule: this stream's socket is over `window`; the link is paused.
    blocking: bool,
    halves: Halves,
}

impl<S> Stream<S> {
    fn reading(&self) -> bool {
        !(self.paused_credit || self.paused_link)
    }
}

/// What the adapter does after sending a DATA frame for a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AfterSend {
    /// Keep reading the stream's socket (`false`: pause it).
    pub reading: bool,
    /// A smaller read chunk for the socket (the credit left).
    pub chunk: Option<usize>,
    /// The link is over [`LINK_HIGH`]: ask to hear when it drains
    /// ([`Session::link_drained`]).
    pub watch_link: bool,
}

/// One tunnel link, either side.
pub struct Session<S> {
    /// The agent's side (else the server's).
    agent: bool,
    settings: Settings,
    stats: Arc<TunnelStats>,
    handshake: Handshake,
    /// Extension bits in force (0: base protocol).
    flags: u16,
    /// Initial credit for our DATA on each stream (the peer's window).
    peer_window: u32,
    /// When the link was made, then when it came up.
    since: Instant,
    /// 256 slots once up; empty before.
    slots: Vec<Slot<S>>,
    open: usize,
    /// Window growth its streams hold (at most `link_window`).
    grown: u64,
    /// Streams paused until the link drains, in the order they paused.
    waiting: VecDeque<u8>,
    /// Streams whose socket is over its window (base rule).
    blocking: usize,
    next_id: u8,
    deadline: Option<Instant>,
    next_ping: Option<Instant>,
    transmit: Vec<u8>,
    events: VecDeque<Event<S>>,
    link_events: VecDeque<LinkEvent>,
}

impl<S: Copy + fmt::Display> Session<S> {
    fn new(settings: Settings, stats: Arc<TunnelStats>, now: Instant, hs: Handshake) -> Self {
        Session {
            agent: matches!(hs, Handshake::NotStarted),
            settings,
            stats,
            handshake: hs,
            flags: 0,
            peer_window: 0,
            since: now,
            slots: Vec::new(),
            open: 0,
            grown: 0,
            waiting: VecDeque::new(),
            blocking: 0,
            next_id: 0,
            deadline: None,
            next_ping: None,
            transmit: Vec::new(),
            events: VecDeque::new(),
            link_events: VecDeque::new(),
        }
    }

    /// The server's side of a link an agent just made at `now`; the
    /// handshake must finish by `now + handshake_timeout`.
    pub fn server(settings: Settings, stats: Arc<TunnelStats>, now: Instant) -> Self {
        let mut s = Session::new(settings, stats, now, Handshake::AwaitListen);
        s.deadline = Some(now + settings.handshake_timeout);
        s
    }

    /// The agent's side of a link being dialled; [`Session::start`] once
    /// the TCP connection is up.
    pub fn agent(settings: Settings, stats: Arc<TunnelStats>, now: Instant) -> Self {
        Session::new(settings, stats, now, Handshake::NotStarted)
    }

    // ----- state -----

    /// The handshake is done.
    pub fn is_up(&self) -> bool {
        matches!(self.handshake, Handshake::Up)
    }

    /// Extension bits in force (0: base protocol, or not up yet).
    pub fn flags(&self) -> u16 {
        self.flags
    }

    /// Whether an extension is in force.
    pub fn has(&self, bit: u16) -> bool {
        self.flags & bit != 0
    }

    /// When the link was made, or came up.
    pub fn since(&self) -> Instant {
        self.since
    }

    /// Streams open now.
    pub fn open_streams(&self) -> usize {
        self.open
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The counters it updates.
    pub fn stats(&self) -> &Arc<TunnelStats> {
        &self.stats
    }

    // ----- output -----

    /// Bytes to write on the link, in order, before any DATA the adapter
    /// writes itself.
    pub fn transmit(&self) -> &[u8] {
        &self.transmit
    }

    /// [`Session::transmit`] was written.
    pub fn transmitted(&mut self) {
        self.transmit.clear();
    }

    /// The next stream event.
    pub fn poll_event(&mut self) -> Option<Event<S>> {
        self.events.pop_front()
    }

    /// The next link event.
    pub fn poll_link_event(&mut self) -> Option<LinkEvent> {
        self.link_events.pop_front()
    }

    /// When [`Session::handle_timeout`] is due next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match (self.deadline, self.next_ping) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Time has reached `now`: the handshake deadline, the next PING.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.deadline.is_some_and(|d| d <= now) {
            self.deadline = None;
            if !self.is_up() {
                self.link_events.push_back(LinkEvent::HandshakeTimeout);
            }
        }
        if self.next_ping.is_some_and(|t| t <= now) {
            self.ping(now);
        }
    }

    fn send(&mut self, command: Command, id: u8, payload: &[u8]) {
        frame::encode(&mut self.transmit, command, id, payload);
    }

    fn ping(&mut self, now: Instant) {
        let ms = now.saturating_duration_since(self.since).as_millis() as u64;
        self.send(Command::Ping, 0, &ms.to_be_bytes());
        self.next_ping = Some(now + self.settings.heartbeat_interval);
    }

    // ----- handshake -----

    /// Agent: the TCP connection is up; send LISTEN. With `extensions` off
    /// the link is up at once (the base protocol has no answer).
    pub fn start(&mut self, hello: AgentHello, now: Instant) {
        self.deadline = Some(now + self.settings.handshake_timeout);
        if !hello.extensions {
            self.send(Command::Listen, 0, &[]);
            self.link_up(0, 0, now);
            return;
        }
        let mut flags = ext::ALL;
        if hello.token.is_none() {
            flags &= !ext::AUTH;
        }
        let req = ListenRequest {
            flags,
            window: self.settings.window,
            nonce: hello.nonce,
            name: &hello.name,
        };
        let mut payload = Vec::with_capacity(ListenRequest::encoded_len(req.name.len()));
        if req.encode(&mut payload).is_some() {
            self.send(Command::Listen, 0, &payload);
            self.handshake = Handshake::AwaitHello(Box::new(hello), flags);
        }
    }

    /// Server: answer an extension request for a service named `name`
    /// (with its `token`, if it has one): HELLO with the extensions granted,
    /// then READY unless a token must be proven first. Returns the granted
    /// flags and the agent's window when the link can come up now
    /// ([`Session::link_up`]); `None` while AUTH is awaited.
    pub fn offer(
        &mut self,
        req: &ListenRequest<'_>,
        name: &[u8],
        token: Option<&[u8]>,
        nonce: [u8; NONCE_LEN],
    ) -> Option<(u16, u32)> {
        let mut flags = req.flags & ext::ALL & !ext::AUTH;
        if flags & ext::CLOSE_ACK == 0 {
            flags &= !ext::HALF_CLOSE;
        }
        if token.is_some() {
            flags |= ext::AUTH;
        }
        let hello = Hello {
            flags,
            window: self.settings.window,
            nonce,
        };
        self.send(Command::Hello, 0, &hello.encode());
        match token {
            Some(token) => {
                self.handshake = Handshake::AwaitAuth(Box::new(AuthState {
                    token: Some(token.to_vec()),
                    name: name.to_vec(),
                    agent_nonce: req.nonce,
                    server_nonce: nonce,
                    flags,
                    peer_window: req.window,
                }));
                None
            }
            None => {
                self.send(Command::Ready, 0, &[]);
                self.handshake = Handshake::Offered;
                Some((flags, req.window))
            }
        }
    }

    /// Server: refuse the LISTEN. An extended agent (`code` given) gets a
    /// REJECT with the code and up to 96 bytes of `why`; the adapter closes
    /// the link once it is written.
    pub fn reject(&mut self, code: Option<u8>, why: &str) {
        if let Some(code) = code {
            let mut payload = [0u8; 1 + 96];
            payload[0] = code;
            let text = why.as_bytes();
            let n = text.len().min(96);
            payload[1..1 + n].copy_from_slice(&text[..n]);
            self.send(Command::Reject, 0, &payload[..1 + n]);
        }
    }

    /// The handshake is done: streams may open. Starts the heartbeat (a PING
    /// now, then every `heartbeat_interval`) on a HEARTBEAT link.
    pub fn link_up(&mut self, flags: u16, peer_window: u32, now: Instant) {
        self.handshake = Handshake::Up;
        self.deadline = None;
        self.flags = flags;
        self.peer_window = peer_window;
        self.since = now;
        self.slots = (0..IDS).map(|_| Slot::Free).collect();
        self.waiting = VecDeque::with_capacity(IDS);
        bump(&self.stats.links);
        bump(&self.stats.links_total);
        if flags & ext::HEARTBEAT != 0 {
            self.ping(now);
        }
        self.link_events.push_back(LinkEvent::Up { flags });
    }

    // ----- frames from the link -----

    /// A frame from the link.
    pub fn handle<'a>(&mut self, f: Frame<'a>, now: Instant) -> Incoming<'a, S> {
        match &self.handshake {
            Handshake::Up => self.handle_up(f, now),
            Handshake::AwaitListen | Handshake::AwaitAuth(_) | Handshake::Offered => {
                self.handle_server_handshake(f)
            }
            Handshake::NotStarted | Handshake::AwaitHello(..) | Handshake::AwaitReady(_) => {
                self.handle_agent_handshake(f, now)
            }
        }
    }

    fn handle_server_handshake<'a>(&mut self, f: Frame<'a>) -> Incoming<'a, S> {
        match (&self.handshake, f) {
            (Handshake::AwaitListen, Frame::Listen(l)) => Incoming::Listen(l),
            (Handshake::AwaitAuth(st), Frame::Auth(tag)) => {
                let token = st.token.as_deref().unwrap_or_default();
                let ok = tag.is_some_and(|t| auth::verify_agent(token, &st.transcript(), t));
                if !ok {
                    bump(&self.stats.auth_failed_total);
                    return Incoming::AuthFailed;
                }
                let proof = auth::server_tag(token, &st.transcript());
                let (flags, peer_window) = (st.flags, st.peer_window);
                self.send(Command::Ready, 0, &proof);
                self.handshake = Handshake::Offered;
                Incoming::Authenticated { flags, peer_window }
            }
            (_, Frame::Unknown(_)) => {
                bump(&self.stats.unknown_total);
                Incoming::Nothing
            }
            (_, f) => {
                bump(&self.stats.malformed_total);
                debug!("{} before the handshake is done; ignored", f.name());
                Incoming::Nothing
            }
        }
    }

    fn handle_agent_handshake<'a>(&mut self, f: Frame<'a>, now: Instant) -> Incoming<'a, S> {
        let hello_seen = matches!(self.handshake, Handshake::AwaitReady(_));
        match f {
            Frame::Hello(h) if !hello_seen => return self.on_hello(h),
            Frame::Ready(tag) => return self.on_ready(tag, now),
            Frame::Reject { code, text } => {
                bump(&self.stats.rejected_total);
                if code == crate::codec::tunnel::reject::AUTH_FAILED {
                    bump(&self.stats.auth_failed_total);
                }
                let text = text.get(..96).unwrap_or(text).to_vec();
                self.fail(Failure::Rejected { code, text });
            }
            Frame::Connect { .. } | Frame::Data { .. } | Frame::Close { .. } if !hello_seen => {
                // No HELLO first: a base server (docs/PROTOCOL.md §3), if our
                // LISTEN went out. Before that (`start` not called, or its
                // request did not encode) the frame answers nothing: out of
                // place, and it must not bring the link up past the token
                // check.
                let Handshake::AwaitHello(hello, _) = &self.handshake else {
                    bump(&self.stats.malformed_total);
                    return Incoming::Nothing;
                };
                if hello.token.is_some() {
                    self.fail(Failure::BaseServer);
                    return Incoming::Nothing;
                }
                self.link_up(0, 0, now);
                return self.handle_up(f, now);
            }
            Frame::Unknown(_) => bump(&self.stats.unknown_total),
            _ => bump(&self.stats.malformed_total),
        }
        Incoming::Nothing
    }

    fn fail(&mut self, why: Failure) {
        self.link_events.push_back(LinkEvent::Failed(why));
    }

    fn on_hello<'a>(&mut self, hello: Option<Hello>) -> Incoming<'a, S> {
        let Handshake::AwaitHello(asked, asked_flags) = &self.handshake else {
            bump(&self.stats.malformed_total);
            return Incoming::Nothing;
        };
        let Some(hello) = hello else {
            bump(&self.stats.malformed_total);
            self.fail(Failure::MalformedHello);
            return Incoming::Nothing;
        };
        if hello.flags & !asked_flags != 0 {
            self.fail(Failure::UnaskedExtensions);
            return Incoming::Nothing;
        }
        let st = AuthState {
            token: asked.token.clone(),
            name: asked.name.clone(),
            agent_nonce: asked.nonce,
            server_nonce: hello.nonce,
            flags: hello.flags,
            peer_window: hello.window,
        };
        let tag = if hello.flags & ext::AUTH != 0 {
            let Some(token) = st.token.as_deref() else {
                self.fail(Failure::NoToken);
                return Incoming::Nothing;
            };
            Some(auth::agent_tag(token, &st.transcript()))
        } else {
            None // READY (empty) follows.
        };
        self.handshake = Handshake::AwaitReady(Box::new(st));
        if let Some(tag) = tag {
            self.send(Command::Auth, 0, &tag);
        }
        Incoming::Nothing
    }

    fn on_ready<'a>(&mut self, tag: &[u8], now: Instant) -> Incoming<'a, S> {
        let Handshake::AwaitReady(st) = &self.handshake else {
            bump(&self.stats.malformed_total);
            return Incoming::Nothing;
        };
        if st.flags & ext::AUTH != 0 {
            let token = st.token.as_deref().unwrap_or_default();
            if !auth::verify_server(token, &st.transcript(), tag) {
                bump(&self.stats.auth_failed_total);
                self.fail(Failure::ServerNotProven);
                return Incoming::Nothing;
            }
        } else if st.token.is_some() {
            self.fail(Failure::TokenNotAsked);
            return Incoming::Nothing;
        }
        let (flags, window) = (st.flags, st.peer_window);
        self.link_up(flags, window, now);
        Incoming::Nothing
    }

    fn handle_up<'a>(&mut self, f: Frame<'a>, now: Instant) -> Incoming<'a, S> {
        match f {
            Frame::Data { id, payload } => return self.link_data(id, payload, now),
            Frame::Close { id } => self.remote_close(id),
            Frame::Window { id, increment } => self.window(id, increment),
            Frame::Shutdown { id } => self.remote_shutdown(id),
            Frame::Ping(Some(p)) => self.send(Command::Pong, 0, p),
            Frame::Pong => {}
            Frame::Connect { id, payload } if self.agent => {
                return self.connect(id, payload, now);
            }
            Frame::Unknown(c) => {
                bump(&self.stats.unknown_total);
                debug!("unknown command {c} ignored");
            }
            other => {
                bump(&self.stats.malformed_total);
                debug!("{} out of place; ignored", other.name());
            }
        }
        Incoming::Nothing
    }

    /// Agent: a CONNECT on an up link.
    fn connect<'a>(&mut self, id: u8, payload: &'a [u8], now: Instant) -> Incoming<'a, S> {
        let (client, target) = if self.has(ext::PEER_ADDR) {
            match crate::codec::tunnel::parse_peer(payload) {
                Some((peer, target)) => (Some(peer), target),
                None => {
                    bump(&self.stats.malformed_total);
                    (None, payload)
                }
            }
        } else {
            (None, payload)
        };
        match self.slots.get(usize::from(id)) {
            Some(Slot::Free) => {}
            Some(Slot::Open(s)) => {
                // A base server that reused an id we still hold: its CLOSE
                // must have been lost; the old stream cannot continue.
                let old = s.socket;
                self.events
                    .push_back(Event::Problem(Problem::IdReused { id }));
                self.events.push_back(Event::End(old, End::Abort));
                self.local_close(id, now);
            }
            _ => {
                bump(&self.stats.malformed_total);
                self.events
                    .push_back(Event::Problem(Problem::IdNotReleased { id }));
                return Incoming::Nothing;
            }
        }
        Incoming::Connect { id, client, target }
    }

    fn link_data<'a>(&mut self, id: u8, payload: &'a [u8], now: Instant) -> Incoming<'a, S> {
        let credit_on = self.has(ext::CREDIT);
        let Some(s) = open_mut(&mut self.slots, id) else {
            bump(&self.stats.stale_total);
            return Incoming::Nothing;
        };
        if payload.is_empty() {
            bump(&self.stats.malformed_total);
            return Incoming::Nothing;
        }
        let len = payload.len() as u64;
        if credit_on && s.received + len > s.granted {
            bump(&self.stats.credit_violations_total);
            let socket = s.socket;
            self.events
                .push_back(Event::Problem(Problem::CreditExceeded {
                    id,
                    len: payload.len(),
                }));
            self.events.push_back(Event::End(socket, End::Abort));
            self.local_close(id, now);
            return Incoming::Nothing;
        }
        Incoming::Deliver {
            stream: s.socket,
            id,
            payload,
        }
    }

    fn window(&mut self, id: u8, increment: Option<u32>) {
        let max_data = self.settings.max_data;
        if !self.has(ext::CREDIT) {
            bump(&self.stats.malformed_total);
            return;
        }
        let Some(inc) = increment else {
            bump(&self.stats.malformed_total);
            return;
        };
        let Some(s) = open_mut(&mut self.slots, id) else {
            bump(&self.stats.stale_total);
            return;
        };
        s.credit = s.credit.saturating_add(u64::from(inc));
        if s.credit > u64::from(u32::MAX) {
            self.fail(Failure::CreditOverflow { id });
            return;
        }
        let chunk = (s.credit as usize).min(max_data);
        if chunk != s.chunk {
            s.chunk = chunk;
            self.events.push_back(Event::Chunk(s.socket, chunk));
        }
        s.paused_credit = false;
        self.events.push_back(Event::Reading(s.socket, s.reading()));
    }

    fn remote_shutdown(&mut self, id: u8) {
        if !self.has(ext::HALF_CLOSE) {
            bump(&self.stats.malformed_total);
            return;
        }
        let Some(s) = open_mut(&mut self.slots, id) else {
            bump(&self.stats.stale_total);
            return;
        };
        match s.halves {
            Halves::Open => {
                s.halves = Halves::ReceivedEof;
                self.events.push_back(Event::ShutdownWrite(s.socket));
            }
            Halves::SentEof => {
                s.halves = Halves::Done;
                self.events.push_back(Event::ShutdownWrite(s.socket));
                self.events.push_back(Event::Close(s.socket));
            }
            Halves::ReceivedEof | Halves::Done => {}
        }
    }

    /// The peer's CLOSE: close our socket; answer it (CLOSE_ACK) unless it
    /// answers ours.
    fn remote_close(&mut self, id: u8) {
        let ack = self.has(ext::CLOSE_ACK);
        let Some(slot) = self.slots.get_mut(usize::from(id)) else {
            bump(&self.stats.stale_total);
            return;
        };
        match std::mem::replace(slot, Slot::Free) {
            Slot::Open(s) => {
                debug!("{}: CLOSE for id {id} from the peer", s.socket);
                self.events.push_back(Event::End(s.socket, End::Close));
                self.forget(&s);
                if ack {
                    self.send(Command::Close, id, &[]);
                }
            }
            Slot::Closing { .. } => {}
            Slot::Free => bump(&self.stats.stale_total),
        }
    }

    /// Our side of stream `id` is gone: tell the peer, and hold the id until
    /// the peer's CLOSE (CLOSE_ACK) or for the quarantine (server, base).
    fn local_close(&mut self, id: u8, now: Instant) {
        let next = self.closed_slot(now);
        let Some(slot) = self.slots.get_mut(usize::from(id)) else {
            return;
        };
        if !matches!(slot, Slot::Open(_)) {
            return;
        }
        if let Slot::Open(s) = std::mem::replace(slot, next) {
            self.forget(&s);
            debug!("{}: stream {id} closed; CLOSE to the peer", s.socket);
            self.send(Command::Close, id, &[]);
        }
    }

    /// A stream left its slot: counters, its window growth, its pause.
    fn forget(&mut self, s: &Stream<S>) {
        sub(&self.stats.streams, 1);
        self.open -= 1;
        let grown = u64::from(s.window.saturating_sub(self.settings.window));
        self.grown = self.grown.saturating_sub(grown);
        sub(&self.stats.window_grown_bytes, grown);
        if s.blocking {
            self.unblock(s.socket);
        }
    }

    fn unblock(&mut self, socket: S) {
        self.events.push_back(Event::Stall(socket, false));
        self.blocking = self.blocking.saturating_sub(1);
        if self.blocking == 0 {
            self.events.push_back(Event::ResumeLink);
        }
    }

    /// What an id becomes once our CLOSE for it is sent.
    fn closed_slot(&self, now: Instant) -> Slot<S> {
        if self.has(ext::CLOSE_ACK) {
            Slot::Closing { until: None }
        } else if let Some(q) = self.settings.quarantine {
            Slot::Closing {
                until: Some(now + q),
            }
        } else {
            Slot::Free
        }
    }

    // ----- streams -----

    /// Server: make `socket` (a public client from `peer`) a stream: the
    /// next free id after the last one given, if `max_streams` allows;
    /// quarantined ids whose time has passed are free. CONNECT is queued.
    pub fn open_stream(&mut self, socket: S, peer: SocketAddr, now: Instant) -> Result<u8, NoId> {
        let Some(id) = self.alloc_id(now) else {
            let (open, quarantined, closing) = self.ids_taken(now);
            return Err(NoId {
                open,
                quarantined,
                closing,
                at_max: self.open >= self.settings.max_streams,
            });
        };
        let (addr, n) = crate::codec::tunnel::encode_peer(peer);
        let payload = if self.has(ext::PEER_ADDR) {
            addr.get(..n).unwrap_or_default()
        } else {
            &[]
        };
        self.send(Command::Connect, id, payload);
        self.open_slot(id, socket);
        Ok(id)
    }

    fn alloc_id(&mut self, now: Instant) -> Option<u8> {
        if !self.is_up() || self.open >= self.settings.max_streams {
            return None;
        }
        let start = self.next_id;
        for k in 0..IDS {
            let id = start.wrapping_add(k as u8);
            let free = match self.slots.get(usize::from(id)) {
                Some(Slot::Free) => true,
                Some(Slot::Closing { until: Some(t) }) => *t <= now,
                _ => false,
            };
            if free {
                self.next_id = id.wrapping_add(1);
                return Some(id);
            }
        }
        None
    }

    fn ids_taken(&self, now: Instant) -> (usize, usize, usize) {
        let (mut open, mut quarantined, mut closing) = (0, 0, 0);
        for slot in &self.slots {
            match slot {
                Slot::Open(_) => open += 1,
                Slot::Closing { until: Some(t) } if *t > now => quarantined += 1,
                Slot::Closing { until: None } => closing += 1,
                _ => {}
            }
        }
        (open, quarantined, closing)
    }

    /// Agent: `socket` (connecting to the target) is stream `id`, which a
    /// CONNECT asked for.
    pub fn accept_stream(&mut self, id: u8, socket: S) {
        if self.is_up() {
            self.open_slot(id, socket);
        } else {
            self.events.push_back(Event::End(socket, End::Abort));
        }
    }

    /// Agent: answer a CONNECT it cannot serve with CLOSE (and hold the id
    /// until the server acknowledges, with CLOSE_ACK).
    pub fn refuse_stream(&mut self, id: u8, now: Instant) {
        let next = self.closed_slot(now);
        if let Some(slot) = self.slots.get_mut(usize::from(id)) {
            *slot = next;
        }
        self.send(Command::Close, id, &[]);
    }

    fn open_slot(&mut self, id: u8, socket: S) {
        let settings = self.settings;
        let credit = if self.has(ext::CREDIT) {
            u64::from(self.peer_window)
        } else {
            u64::MAX
        };
        let chunk = credit.min(settings.max_data as u64) as usize;
        let Some(slot) = self.slots.get_mut(usize::from(id)) else {
            self.events.push_back(Event::End(socket, End::Abort));
            return;
        };
        *slot = Slot::Open(Stream {
            socket,
            credit,
            granted: u64::from(settings.window),
            received: 0,
            window: settings.window,
            chunk,
            paused_credit: credit == 0,
            paused_link: false,
            blocking: false,
            halves: Halves::Open,
        });
        self.open += 1;
        bump(&self.stats.streams);
        bump(&self.stats.streams_total);
        if chunk != settings.max_data {
            self.events.push_back(Event::Chunk(socket, chunk.max(1)));
        }
        if credit == 0 {
            self.events.push_back(Event::Reading(socket, false));
        }
    }

    /// The adapter wrote a DATA frame of `len` bytes for stream `id` (read
    /// from its socket); the link now holds `link_queued` unsent bytes.
    /// `None` if the stream is not open.
    pub fn data_sent(&mut self, id: u8, len: usize, link_queued: usize) -> Option<AfterSend> {
        add(&self.stats.bytes_to_link_total, len as u64);
        let over = link_queued > LINK_HIGH;
        let credit_on = self.has(ext::CREDIT);
        let max_data = self.settings.max_data;
        let s = open_mut(&mut self.slots, id)?;
        trace!("{}: {len} bytes to the link as id {id}", s.socket);
        let mut chunk = None;
        if credit_on {
            s.credit = s.credit.saturating_sub(len as u64);
            if s.credit == 0 {
                s.paused_credit = true;
            } else if (s.credit as usize) < s.chunk {
                s.chunk = (s.credit as usize).min(max_data);
                chunk = Some(s.chunk);
            }
        }
        let mut watch_link = false;
        if over && !s.paused_link {
            s.paused_link = true;
            self.waiting.push_back(id);
            watch_link = true;
        }
        Some(AfterSend {
            reading: s.reading(),
            chunk,
            watch_link,
        })
    }

    /// Stream `id`'s socket took the `len` bytes of [`Incoming::Deliver`]
    /// and now holds `queued` unsent bytes. `flush` writes the socket's queue
    /// at once and returns what is still queued (window growth asks it).
    pub fn delivered(&mut self, id: u8, len: usize, queued: usize, flush: impl FnOnce() -> usize) {
        let Some(s) = open_mut(&mut self.slots, id) else {
            return;
        };
        s.received += len as u64;
        add(&self.stats.bytes_from_link_total, len as u64);
        if queued > s.window as usize && !s.blocking {
            // Base rule (docs/PROTOCOL.md §2): pause the link until this socket drains.
            debug!(
                "{}: {queued} bytes queued for stream {id}; pausing the link",
                s.socket
            );
            s.blocking = true;
            let socket = s.socket;
            self.blocking += 1;
            self.events.push_back(Event::PauseLink);
            self.events.push_back(Event::Stall(socket, true));
        }
        if self.has(ext::CREDIT) {
            self.grant(id, queued, flush);
        }
    }

    /// Stream `id`'s socket drained to `queued` bytes: grant credit, and
    /// lift the base-mode pause.
    pub fn stream_drained(&mut self, id: u8, queued: usize, flush: impl FnOnce() -> usize) {
        self.grant(id, queued, flush);
        let Some(s) = open_mut(&mut self.slots, id) else {
            return;
        };
        if s.blocking {
            s.blocking = false;
            let socket = s.socket;
            self.unblock(socket);
        }
    }

    /// Send WINDOW for what the stream's socket has written, once at least
    /// half a window is owed.
    ///
    /// Auto-tuning (docs/PROTOCOL.md §4.4): when DATA leaves the peer with
    /// less than an eighth of the window as credit, the window is what holds
    /// the stream back, unless our own socket is. The socket's queue is
    /// written at once to find out (`flush`): if it takes everything (we are
    /// not the bottleneck), the window doubles, up to `max_window` and as far
    /// as the link's `link_window` budget allows; otherwise it stays. Only a
    /// call that finds bytes queued can grow the window.
    fn grant(&mut self, id: u8, queued: usize, flush: impl FnOnce() -> usize) {
        let settings = self.settings;
        if !self.has(ext::CREDIT) {
            return;
        }
        let grown = self.grown;
        let Some(s) = open_mut(&mut self.slots, id) else {
            return;
        };
        let mut window = u64::from(s.window);
        let mut queued = queued as u64;
        let starved = s.granted.saturating_sub(s.received) < window / 8;
        // Doubling, capped by `max_window` and by what the link has left.
        let step = window
            .min(u64::from(settings.max_window).saturating_sub(window))
            .min(u64::from(settings.link_window).saturating_sub(grown));
        if starved && queued > 0 && step > 0 {
            queued = flush() as u64;
            if queued == 0 {
                window += step;
                s.window = window as u32;
                self.grown += step;
                add(&self.stats.window_grown_bytes, step);
                bump(&self.stats.window_grown_total);
                trace!("{}: stream {id} window {window}", s.socket);
            }
        }
        let written = s.received.saturating_sub(queued);
        let target = written + window;
        let owed = target.saturating_sub(s.granted);
        if owed >= window / 2 {
            let Ok(inc) = u32::try_from(owed) else { return };
            s.granted = target;
            self.send(Command::Window, id, &inc.to_be_bytes());
        }
    }

    /// The link drained: streams waiting for it take their turn.
    pub fn link_drained(&mut self) {
        while let Some(id) = self.waiting.pop_front() {
            if let Some(s) = open_mut(&mut self.slots, id)
                && s.paused_link
            {
                s.paused_link = false;
                self.events.push_back(Event::Reading(s.socket, s.reading()));
            }
        }
    }

    /// Stream `id`'s socket read EOF: SHUTDOWN on a HALF_CLOSE link (the
    /// socket closes once both directions are done), else close it.
    pub fn stream_eof(&mut self, id: u8) {
        let half_close = self.has(ext::HALF_CLOSE);
        let Some(s) = open_mut(&mut self.slots, id) else {
            return;
        };
        let socket = s.socket;
        if !half_close {
            self.events.push_back(Event::Close(socket));
            return;
        }
        let done = match s.halves {
            Halves::Open => false,
            Halves::ReceivedEof => true,
            Halves::SentEof | Halves::Done => return,
        };
        s.halves = if done { Halves::Done } else { Halves::SentEof };
        debug!("{socket}: EOF, SHUTDOWN id {id}");
        self.send(Command::Shutdown, id, &[]);
        if done {
            self.events.push_back(Event::Close(socket));
        }
    }

    /// Stream `id`'s socket is gone (closed by either end, failed to connect,
    /// or a delivery did not fit): CLOSE to the peer.
    pub fn stream_closed(&mut self, id: u8, now: Instant) {
        self.local_close(id, now);
    }

    /// The link is gone: every stream socket still open, for the adapter to
    /// reset (a stream that ends with its link is cut short).
    /// Once only counts: a second call finds nothing.
    pub fn close_all(&mut self, mut each: impl FnMut(S)) {
        if self.slots.is_empty() {
            return; // Never up, or closed already.
        }
        for slot in std::mem::take(&mut self.slots) {
            if let Slot::Open(s) = slot {
                sub(&self.stats.streams, 1);
                each(s.socket);
            }
        }
        sub(&self.stats.links, 1);
        sub(&self.stats.window_grown_bytes, self.grown);
        self.grown = 0;
        self.open = 0;
    }
}

/// The open stream `id` in `slots`.
fn open_mut<S>(slots: &mut [Slot<S>], id: u8) -> Option<&mut Stream<S>> {
    match slots.get_mut(usize::from(id)) {
        Some(Slot::Open(s)) => Some(s),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::expect_used, reason = "tests")]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            window: 4096,
            max_window: 4096,
            link_window: 4096,
            max_data: 1024,
            max_streams: 4,
            quarantine: None,
            handshake_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(10),
        }
    }

    /// Found by the `tunnel_session` fuzz target: an agent whose LISTEN
    /// request did not encode (a name over 64 bytes, which the config
    /// refuses) sent nothing and stayed `NotStarted`, and a CONNECT then
    /// brought its link up in base mode although a token is configured.
    #[test]
    fn agent_without_a_listen_sent_ignores_stream_frames() {
        let now = Instant::now();
        let mut s = Session::<u32>::agent(settings(), Arc::default(), now);
        s.start(
            AgentHello {
                extensions: true,
                token: Some(b"secret-0123456789".to_vec()),
                name: vec![b'n'; 65],
                nonce: [0; NONCE_LEN],
            },
            now,
        );
        assert!(s.transmit().is_empty(), "no request to send");
        let mut raw = Vec::new();
        frame::encode(&mut raw, Command::Connect, 0, &[]);
        let f = Frame::parse(&raw).expect("a whole frame");
        assert_eq!(s.handle(f, now), Incoming::Nothing);
        assert!(!s.is_up());
        assert_eq!(s.poll_link_event(), None);
        s.handle_timeout(now + Duration::from_secs(10));
        assert_eq!(s.poll_link_event(), Some(LinkEvent::HandshakeTimeout));
    }
}
