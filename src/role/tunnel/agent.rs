//! The tunnel agent: dials the server, asks for its service, and connects
//! each stream to the local service (or an allowed target).
//!
//! Invariant: at most one link at a time; while there is none, exactly one
//! reconnect is scheduled (a timer, or a name resolution on a helper thread
//! whose answer arrives as a message tagged with the attempt it belongs to).

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use super::auth::{self, Rng, Transcript};
use super::{Mux, Settings, Slot, TunnelStats, bump, heartbeat, link_keepalive, send_frame, token};
use crate::codec::tunnel::{
    self, Command, Hello, ListenRequest, NONCE_LEN, TunnelFrame, ext, reject,
};
use crate::codec::{Frame, Framing};
use crate::config::TunnelAgentConfig;
use crate::engine::{
    CloseReason, ConnKey, ConnectOptions, Ctx, EngineError, Message, TimerKey, View,
};
use crate::role::{Report, Role};

/// Where the agent's link is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentState {
    /// Waiting to reconnect (or resolving the server's name).
    Waiting,
    /// TCP connect in progress.
    Connecting,
    /// LISTEN sent; waiting for HELLO (or, from a base server, a CONNECT).
    Handshake,
    /// Streams flow.
    Up,
}

impl fmt::Display for AgentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AgentState::Waiting => "waiting",
            AgentState::Connecting => "connecting",
            AgentState::Handshake => "handshake",
            AgentState::Up => "up",
        })
    }
}

/// A name resolution's answer, sent from the helper thread.
struct Resolved {
    attempt: u64,
    result: Result<SocketAddr, String>,
}

struct AgentLink {
    /// Extension bits asked for, then granted.
    flags: u16,
    nonce: [u8; NONCE_LEN],
    server_nonce: [u8; NONCE_LEN],
    peer_window: u32,
    /// HELLO seen (an extended server); READY expected next.
    hello: bool,
}

/// The `tunnel_agent` role.
pub struct TunnelAgent {
    config: TunnelAgentConfig,
    mux: Mux<AgentLink>,
    allow: Vec<SocketAddr>,
    link: Option<usize>,
    link_conn: Option<ConnKey>,
    state: AgentState,
    backoff: Duration,
    attempt: u64,
    rng: Rng,
    /// Set when the link came up (for the back-off reset).
    up_since: Option<Instant>,
    /// The engine is stopping: no more dialling.
    stopping: bool,
    /// Why the agent itself closed the link (kept for the status).
    fail_reason: Option<String>,
}

impl TunnelAgent {
    /// An agent for `config` (nothing is dialled before [`Role::start`]).
    pub fn new(config: &TunnelAgentConfig) -> TunnelAgent {
        let allow = if config.allow.is_empty() {
            vec![config.local]
        } else {
            config.allow.clone()
        };
        TunnelAgent {
            mux: Mux::new(
                Settings {
                    window: config.window,
                    max_window: config.max_window,
                    link_window: config.link_window,
                    max_data: config.max_data,
                    max_streams: config.max_streams,
                    stall_timeout: config.stall_timeout,
                    quarantine: None,
                },
                Arc::new(TunnelStats::default()),
            ),
            allow,
            link: None,
            link_conn: None,
            state: AgentState::Waiting,
            backoff: config.reconnect_min,
            attempt: 0,
            rng: Rng::from_os(),
            up_since: None,
            stopping: false,
            fail_reason: None,
            config: config.clone(),
        }
    }

    /// Counters and link state, readable from any thread.
    pub fn stats(&self) -> Arc<TunnelStats> {
        Arc::clone(&self.mux.stats)
    }

    fn label(&self) -> &str {
        if self.config.name.is_empty() {
            "agent"
        } else {
            &self.config.name
        }
    }

    fn set_state(&mut self, state: AgentState, error: Option<String>, flags: u16) {
        self.state = state;
        if let Ok(mut st) = self.mux.stats.status.lock() {
            let last = match (error, st.agent.take()) {
                (Some(e), _) => e,
                (None, Some((_, e, _))) => e,
                (None, None) => String::new(),
            };
            st.agent = Some((state, last, flags));
        }
    }

    /// Dial now if the server is an address; otherwise resolve it on a helper
    /// thread (never on the loop) and dial when the answer comes.
    fn dial(&mut self, ctx: &mut Ctx<'_>) {
        self.attempt += 1;
        if let Ok(addr) = self.config.server.parse::<SocketAddr>() {
            self.connect(ctx, addr);
            return;
        }
        self.set_state(AgentState::Waiting, None, 0);
        let (server, attempt, handle, role) = (
            self.config.server.clone(),
            self.attempt,
            ctx.handle(),
            ctx.role_id(),
        );
        let spawned = std::thread::Builder::new()
            .name("resolve".into())
            .spawn(move || {
                let result = server
                    .to_socket_addrs()
                    .map_err(|e| e.to_string())
                    .and_then(|mut a| a.next().ok_or_else(|| "no address".to_owned()));
                let msg: Message = Box::new(Resolved { attempt, result });
                // The engine may be stopping: then nobody needs the answer.
                let _ = handle.send(role, msg);
            });
        if let Err(e) = spawned {
            warn!("{}: cannot start a resolver thread: {e}", self.label());
            self.retry_later(ctx, format!("resolver thread: {e}"));
        }
    }

    fn connect(&mut self, ctx: &mut Ctx<'_>, addr: SocketAddr) {
        let opts = ConnectOptions {
            framing: Framing::Tunnel {
                max: self.config.max_frame,
            },
            queue_bytes: Some(self.mux.settings.link_queue()),
            timeout: Some(self.config.connect_timeout),
            ..ConnectOptions::default()
        };
        match ctx.connect(addr, opts) {
            Ok(conn) => {
                let now = ctx.now();
                let li = self.mux.add_link(
                    conn,
                    now,
                    AgentLink {
                        flags: 0,
                        nonce: [0; NONCE_LEN],
                        server_nonce: [0; NONCE_LEN],
                        peer_window: 0,
                        hello: false,
                    },
                );
                self.link = Some(li);
                self.link_conn = Some(conn);
                self.set_state(AgentState::Connecting, None, 0);
                debug!("{}: dialling {addr}", self.label());
            }
            Err(e) => self.retry_later(ctx, format!("connect to {addr}: {e}")),
        }
    }

    /// Schedule the next dial: exponential back-off with jitter (half to all
    /// of the current delay), reset after a link that stayed up `reconnect_max`.
    fn retry_later(&mut self, ctx: &mut Ctx<'_>, why: String) {
        let now = ctx.now();
        if self
            .up_since
            .take()
            .is_some_and(|t| now.duration_since(t) >= self.config.reconnect_max)
        {
            self.backoff = self.config.reconnect_min;
        }
        let half = self.backoff / 2;
        let jitter = Duration::from_millis(self.rng.below(half.as_millis() as u64 + 1));
        let wait = half + jitter;
        self.backoff = (self.backoff * 2).min(self.config.reconnect_max);
        info!("{}: {why}; reconnecting in {wait:?}", self.label());
        self.set_state(AgentState::Waiting, Some(why), 0);
        ctx.set_timer(now + wait, token::RECONNECT);
    }

    fn send_listen(&mut self, ctx: &mut Ctx<'_>, li: usize) {
        let Some(link) = self.mux.links.get_mut(li) else {
            return;
        };
        let conn = link.conn;
        if !self.config.extensions {
            if send_frame(ctx, conn, Command::Listen, 0, &[]) {
                self.link_up(ctx, li, 0, 0);
            }
            return;
        }
        let mut flags = ext::ALL;
        if self.config.token.is_none() {
            flags &= !ext::AUTH;
        }
        let nonce = self.rng.nonce();
        link.extra.flags = flags;
        link.extra.nonce = nonce;
        let req = ListenRequest {
            flags,
            window: self.config.window,
            nonce,
            name: self.config.name.as_bytes(),
        };
        let mut payload = Vec::with_capacity(ListenRequest::encoded_len(req.name.len()));
        if req.encode(&mut payload).is_some() && send_frame(ctx, conn, Command::Listen, 0, &payload)
        {
            self.set_state(AgentState::Handshake, None, 0);
        }
    }

    fn link_up(&mut self, ctx: &mut Ctx<'_>, li: usize, flags: u16, peer_window: u32) {
        let now = ctx.now();
        self.mux.link_up(li, flags, peer_window, now);
        self.up_since = Some(now);
        self.set_state(AgentState::Up, None, flags);
        let Some(link) = self.mux.links.get_mut(li) else {
            return;
        };
        if flags & ext::HEARTBEAT != 0 {
            ctx.set_idle_timeout(link.conn, Some(self.config.heartbeat_timeout));
            heartbeat(ctx, link, li, self.config.heartbeat_interval);
        }
        let mode = if flags == 0 {
            "base protocol"
        } else {
            "extended"
        };
        info!(
            "{}: linked to {} ({mode}, flags {flags:#06x}); streams go to {}",
            self.label(),
            self.config.server,
            self.config.local
        );
    }

    /// Drop the link (and its streams) after a protocol failure.
    fn fail(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey, why: &str) {
        warn!("{}: {why}; closing the link", self.label());
        self.fail_reason = Some(why.to_owned());
        ctx.close(conn);
    }

    fn on_hello(&mut self, ctx: &mut Ctx<'_>, li: usize, conn: ConnKey, payload: &[u8]) {
        let Some(link) = self.mux.links.get_mut(li) else {
            return;
        };
        let Some(hello) = Hello::parse(payload) else {
            bump(&self.mux.stats.malformed_total);
            self.fail(ctx, conn, "malformed HELLO");
            return;
        };
        if hello.flags & !link.extra.flags != 0 {
            self.fail(
                ctx,
                conn,
                "the server granted extensions that were not asked for",
            );
            return;
        }
        link.extra.hello = true;
        link.extra.flags = hello.flags;
        link.extra.server_nonce = hello.nonce;
        link.extra.peer_window = hello.window;
        if hello.flags & ext::AUTH == 0 {
            return; // READY (empty) follows.
        }
        let Some(token) = self.config.token.as_deref() else {
            self.fail(
                ctx,
                conn,
                "the server asks for a token and none is configured",
            );
            return;
        };
        let t = Transcript {
            agent_nonce: &link.extra.nonce,
            server_nonce: &hello.nonce,
            flags: hello.flags,
            name: self.config.name.as_bytes(),
        };
        let tag = auth::agent_tag(token.as_bytes(), &t);
        send_frame(ctx, conn, Command::Auth, 0, &tag);
    }

    fn on_ready(&mut self, ctx: &mut Ctx<'_>, li: usize, conn: ConnKey, payload: &[u8]) {
        let Some(link) = self.mux.links.get(li) else {
            return;
        };
        let x = &link.extra;
        if !x.hello {
            bump(&self.mux.stats.malformed_total);
            return;
        }
        if x.flags & ext::AUTH != 0 {
            let token = self.config.token.as_deref().unwrap_or_default();
            let t = Transcript {
                agent_nonce: &x.nonce,
                server_nonce: &x.server_nonce,
                flags: x.flags,
                name: self.config.name.as_bytes(),
            };
            if !auth::verify_server(token.as_bytes(), &t, payload) {
                bump(&self.mux.stats.auth_failed_total);
                self.fail(ctx, conn, "the server could not prove it knows the token");
                return;
            }
        } else if self.config.token.is_some() {
            self.fail(ctx, conn, "the server did not ask for the token");
            return;
        }
        let (flags, window) = (x.flags, x.peer_window);
        self.link_up(ctx, li, flags, window);
    }

    fn on_connect(&mut self, ctx: &mut Ctx<'_>, li: usize, id: u8, payload: &[u8]) {
        let Some(link) = self.mux.links.get(li) else {
            return;
        };
        let link_conn = link.conn;
        let (client, target) = if link.has(ext::PEER_ADDR) {
            match tunnel::parse_peer(payload) {
                Some((peer, target)) => (Some(peer), target),
                None => {
                    bump(&self.mux.stats.malformed_total);
                    (None, payload)
                }
            }
        } else {
            (None, payload)
        };
        match self.mux.id_state(li, id) {
            Some(Slot::Free) => {}
            Some(Slot::Open(s)) => {
                // A base server that reused an id we still hold: its CLOSE
                // must have been lost; the old stream cannot continue.
                let old = s.conn;
                warn!(
                    "{}: CONNECT for id {id}, still open; closing the old stream",
                    self.label()
                );
                ctx.abort(old);
                self.mux.on_stream_closed(ctx, old);
            }
            _ => {
                bump(&self.mux.stats.malformed_total);
                warn!(
                    "{}: CONNECT for id {id} before its CLOSE was acknowledged; ignored",
                    self.label()
                );
                return;
            }
        }
        let from = client.map_or_else(|| "a client".to_owned(), |c| format!("client {c}"));
        let addr = if target.is_empty() {
            Some(self.config.local)
        } else {
            std::str::from_utf8(target)
                .ok()
                .and_then(|t| t.parse::<SocketAddr>().ok())
                .filter(|a| self.allow.contains(a))
        };
        let Some(addr) = addr else {
            bump(&self.mux.stats.refused_total);
            warn!(
                "{}: CONNECT id {id} from {from} to '{}' refused: not on the allowlist",
                self.label(),
                String::from_utf8_lossy(target).escape_debug()
            );
            self.refuse_stream(ctx, li, id, link_conn);
            return;
        };
        if self
            .mux
            .links
            .get(li)
            .is_some_and(|l| l.open_streams() >= self.config.max_streams)
        {
            bump(&self.mux.stats.refused_total);
            warn!(
                "{}: CONNECT id {id} refused: max_streams reached",
                self.label()
            );
            self.refuse_stream(ctx, li, id, link_conn);
            return;
        }
        let opts = ConnectOptions {
            framing: Framing::Chunk {
                max: self.config.max_data,
            },
            queue_bytes: Some(self.mux.settings.stream_queue()),
            timeout: Some(self.config.connect_timeout),
            ..ConnectOptions::default()
        };
        match ctx.connect(addr, opts) {
            Ok(conn) => {
                info!(
                    "{}: stream {id} from {from} → {addr} ({conn})",
                    self.label()
                );
                self.mux.open_stream(ctx, li, id, conn);
            }
            Err(e) => {
                bump(&self.mux.stats.refused_total);
                warn!(
                    "{}: stream {id}: cannot connect to {addr}: {e}",
                    self.label()
                );
                self.refuse_stream(ctx, li, id, link_conn);
            }
        }
    }

    /// Answer a CONNECT we cannot serve with CLOSE (and hold the id until the
    /// server acknowledges, with CLOSE_ACK).
    fn refuse_stream(&mut self, ctx: &mut Ctx<'_>, li: usize, id: u8, link_conn: ConnKey) {
        self.mux.refuse_id(li, id, ctx.now());
        send_frame(ctx, link_conn, Command::Close, id, &[]);
    }

    fn on_link_frame(&mut self, ctx: &mut Ctx<'_>, li: usize, conn: ConnKey, raw: &[u8]) {
        let Some(f) = TunnelFrame::parse(raw) else {
            return;
        };
        let Some(link) = self.mux.links.get(li) else {
            return;
        };
        if link.up {
            match f.command {
                Command::Connect => self.on_connect(ctx, li, f.id, f.payload),
                Command::Hello | Command::Ready | Command::Reject => {
                    bump(&self.mux.stats.malformed_total);
                }
                _ => self.mux.on_link_frame(ctx, li, f),
            }
            return;
        }
        match f.command {
            Command::Hello if !link.extra.hello => self.on_hello(ctx, li, conn, f.payload),
            Command::Ready => self.on_ready(ctx, li, conn, f.payload),
            Command::Reject => {
                bump(&self.mux.stats.rejected_total);
                let (code, text) = f.payload.split_first().unwrap_or((&0, &[]));
                let why = match *code {
                    reject::UNKNOWN_SERVICE => "unknown service",
                    reject::AUTH_FAILED => {
                        bump(&self.mux.stats.auth_failed_total);
                        "authentication failed"
                    }
                    reject::AUTH_REQUIRED => "a token is required",
                    reject::MALFORMED => "malformed request",
                    reject::LISTEN_FAILED => "the public port could not be opened",
                    _ => "unknown reason",
                };
                let msg = format!(
                    "server rejected the LISTEN: {why} ({})",
                    String::from_utf8_lossy(text).escape_debug()
                );
                self.fail(ctx, conn, &msg);
            }
            Command::Connect | Command::Data | Command::Close if !link.extra.hello => {
                // No HELLO first: a base server (docs/PROTOCOL.md §3).
                if self.config.token.is_some() {
                    self.fail(
                        ctx,
                        conn,
                        "the server speaks the base protocol and cannot check the token",
                    );
                    return;
                }
                self.link_up(ctx, li, 0, 0);
                self.on_link_frame(ctx, li, conn, raw);
            }
            Command::Unknown(_) => bump(&self.mux.stats.unknown_total),
            _ => bump(&self.mux.stats.malformed_total),
        }
    }
}

impl Role for TunnelAgent {
    fn name(&self) -> &str {
        self.label()
    }

    fn kind(&self) -> &str {
        "tunnel_agent"
    }

    fn report(&self, _view: &View<'_>, out: &mut Report) {
        let link = self.link.and_then(|li| self.mux.links.get(li));
        out.str("server", &self.config.server);
        out.addr("local", Some(self.config.local));
        out.str("state", &self.state.to_string());
        out.age(
            "linked_seconds",
            self.up_since.filter(|_| self.state == AgentState::Up),
        );
        out.num("extensions", link.map_or(0, |l| u64::from(l.flags)));
        out.num("streams", link.map_or(0, |l| l.open_streams() as u64));
        let st = &self.mux.stats;
        out.num(
            "reconnects_total",
            st.reconnects_total
                .load(std::sync::atomic::Ordering::Relaxed),
        );
        let last = st.agent().map(|a| a.1).unwrap_or_default();
        out.str("last_error", &last);
        out.gauge(
            "switchboard_tunnel_link_up",
            "1 while the agent is linked.",
            &[],
            u64::from(self.state == AgentState::Up),
        );
        out.gauge(
            "switchboard_tunnel_streams",
            "Streams open now.",
            &[],
            link.map_or(0, |l| l.open_streams() as u64),
        );
        st.report(out);
    }

    fn start(&mut self, ctx: &mut Ctx<'_>) -> Result<(), EngineError> {
        info!(
            "{}: serving {} through {}",
            self.label(),
            self.config.local,
            self.config.server
        );
        self.dial(ctx);
        Ok(())
    }

    fn on_connected(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey) {
        if self.link_conn != Some(conn) {
            return;
        }
        link_keepalive(ctx, conn, self.config.heartbeat_timeout);
        if let Some(li) = self.link {
            self.send_listen(ctx, li);
        }
    }

    fn on_connect_failed(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey, reason: CloseReason) {
        if self.link_conn != Some(conn) {
            // The local service did not answer: the CONNECT is refused (CLOSE).
            bump(&self.mux.stats.refused_total);
            warn!("{}: local connection failed ({reason})", self.label());
        }
        self.on_closed(ctx, conn, reason);
    }

    fn on_frame(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey, frame: Frame<'_>) {
        match self.link {
            Some(li) if self.link_conn == Some(conn) => {
                self.on_link_frame(ctx, li, conn, frame.raw)
            }
            _ => self.mux.on_stream_data(ctx, conn, frame.payload),
        }
    }

    fn on_read_closed(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey) {
        if self.link_conn == Some(conn) {
            ctx.close(conn);
        } else {
            self.mux.on_stream_eof(ctx, conn);
        }
    }

    fn on_writable(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey) {
        match self.link {
            Some(li) if self.link_conn == Some(conn) => self.mux.on_link_writable(ctx, li),
            _ => self.mux.on_stream_writable(ctx, conn),
        }
    }

    fn on_closed(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey, reason: CloseReason) {
        if self.link_conn != Some(conn) {
            if reason == CloseReason::Stalled {
                bump(&self.mux.stats.stalled_total);
            }
            if let Some((_, id)) = self.mux.on_stream_closed(ctx, conn) {
                debug!("{conn}: local side of stream {id} gone ({reason})");
            }
            return;
        }
        self.link_conn = None;
        let was_up = self.state == AgentState::Up;
        if let Some(li) = self.link.take() {
            self.mux.remove_link(ctx, li);
        }
        if was_up {
            bump(&self.mux.stats.reconnects_total);
        }
        let what = if was_up { "link lost" } else { "link failed" };
        let why = self
            .fail_reason
            .take()
            .unwrap_or_else(|| format!("{what} ({reason})"));
        if self.stopping {
            self.set_state(AgentState::Waiting, Some(why), 0);
        } else {
            self.retry_later(ctx, why);
        }
    }

    fn on_timer(&mut self, ctx: &mut Ctx<'_>, _timer: TimerKey, tok: u64) {
        let (kind, li) = token::split(tok);
        match kind {
            token::RECONNECT if !self.stopping => self.dial(ctx),
            token::HEARTBEAT => {
                if let Some(link) = self.mux.links.get_mut(li) {
                    heartbeat(ctx, link, li, self.config.heartbeat_interval);
                }
            }
            _ => {}
        }
    }

    fn on_shutdown(&mut self, _ctx: &mut Ctx<'_>) {
        self.stopping = true;
    }

    fn on_message(&mut self, ctx: &mut Ctx<'_>, msg: Message) {
        let Ok(resolved) = msg.downcast::<Resolved>() else {
            return;
        };
        if resolved.attempt != self.attempt || self.link.is_some() {
            return;
        }
        match resolved.result {
            Ok(addr) => self.connect(ctx, addr),
            Err(e) => self.retry_later(ctx, format!("cannot resolve {}: {e}", self.config.server)),
        }
    }
}
