//! The tunnel agent: dials the server, asks for its service, and connects
//! each stream to the local service (or an allowed target).
//!
//! Invariant: at most one link at a time; while there is none, exactly one
//! reconnect is scheduled (a timer, or a name resolution on a helper thread
//! whose answer arrives as a message tagged with the attempt it belongs to).
//! A dial tries the server's addresses in order (at most `MAX_ADDRS`) before
//! it backs off; a link still in its handshake has exactly one deadline.

use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hashbrown::HashMap;
use log::{debug, info, warn};

use super::rng::Rng;
use super::{Links, link_keepalive};
use crate::codec::tunnel::ext;
use crate::codec::{Frame, Framing};
use crate::config::TunnelAgentConfig;
use crate::engine::{
    CloseReason, ConnKey, ConnectOptions, Ctx, EngineError, LogLimit, Message, Preview, Suppressed,
    TimerKey, View,
};
use crate::metrics::{CounterValue, bump};
use crate::proto::tunnel::{
    AgentHello, AgentState, Failure, Incoming, LinkEvent, Session, Settings, TunnelStats,
};
use crate::role::{Report, Role};

/// The public client of a stream, as the server named it (PEER_ADDR).
struct Client(Option<SocketAddr>);

impl fmt::Display for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(c) => write!(f, "client {c}"),
            None => f.write_str("a client"),
        }
    }
}

/// Resolves a `host:port` to its addresses, in the order to try them. It
/// runs on a helper thread, never on the event loop. The default asks the
/// system (`getaddrinfo`); [`TunnelAgent::set_resolver`] replaces it.
pub type Resolver = Arc<dyn Fn(&str) -> io::Result<Vec<SocketAddr>> + Send + Sync>;

/// At most this many addresses of one name are kept and tried.
const MAX_ADDRS: usize = 16;

/// A name resolution's answer, sent from the helper thread. `None`: that
/// name is an address and was not resolved.
struct Resolved {
    attempt: u64,
    server: Option<Result<Vec<SocketAddr>, String>>,
    local: Option<Result<Vec<SocketAddr>, String>>,
}

/// The system resolver, at most `MAX_ADDRS` addresses.
fn system_resolve(name: &str) -> io::Result<Vec<SocketAddr>> {
    Ok(name.to_socket_addrs()?.take(MAX_ADDRS).collect())
}

/// Resolve `name` with `resolve` (on the helper thread): at least one
/// address, at most `MAX_ADDRS`.
fn lookup(resolve: &Resolver, name: &str) -> Result<Vec<SocketAddr>, String> {
    match resolve(name) {
        Ok(mut addrs) if !addrs.is_empty() => {
            addrs.truncate(MAX_ADDRS);
            Ok(addrs)
        }
        Ok(_) => Err("no address".to_owned()),
        Err(e) => Err(e.to_string()),
    }
}

/// The `tunnel_agent` role.
pub struct TunnelAgent {
    config: TunnelAgentConfig,
    mux: Links<()>,
    /// How `server` and `local` are resolved when they are names.
    resolver: Resolver,
    /// `server` / `local` is a host name (resolved before each dial), not an address.
    server_is_name: bool,
    local_is_name: bool,
    /// The server's addresses (from the last resolution), in the order
    /// tried, and the index of the next one to try in this round.
    server_addrs: Vec<SocketAddr>,
    server_next: usize,
    /// The address of the link being dialled, or up.
    link_addr: Option<SocketAddr>,
    /// The local service's addresses; its streams go to `local_addrs[local_next]`.
    local_addrs: Vec<SocketAddr>,
    local_next: usize,
    /// While `local` has several addresses: local connects in progress and
    /// the index of the address each one tries (at most `max_streams`).
    local_pending: HashMap<ConnKey, usize>,
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
    /// Warnings the server can repeat: one line per kind per second.
    warn_refused: LogLimit,
    warn_local: LogLimit,
}

impl TunnelAgent {
    /// An agent for `config` (nothing is dialled before [`Role::start`]).
    pub fn new(config: &TunnelAgentConfig) -> TunnelAgent {
        let server_addrs: Vec<SocketAddr> = config.server.parse().ok().into_iter().collect();
        let local_addrs: Vec<SocketAddr> = config.local.parse().ok().into_iter().collect();
        TunnelAgent {
            mux: Links::new(
                Settings {
                    window: config.window,
                    max_window: config.max_window,
                    link_window: config.link_window,
                    max_data: config.max_data,
                    max_streams: config.max_streams,
                    quarantine: None,
                    handshake_timeout: config.handshake_timeout,
                    heartbeat_interval: config.heartbeat_interval,
                },
                config.stall_timeout,
            ),
            resolver: Arc::new(system_resolve),
            server_is_name: server_addrs.is_empty(),
            local_is_name: local_addrs.is_empty(),
            server_addrs,
            server_next: 0,
            link_addr: None,
            local_addrs,
            local_next: 0,
            local_pending: HashMap::new(),
            link: None,
            link_conn: None,
            state: AgentState::Waiting,
            backoff: config.reconnect_min,
            attempt: 0,
            rng: Rng::from_os(),
            up_since: None,
            stopping: false,
            fail_reason: None,
            warn_refused: LogLimit::default(),
            warn_local: LogLimit::default(),
            config: config.clone(),
        }
    }

    /// Resolve host names with `resolver` instead of the system's resolver
    /// (an embedder's own name service; tests). Call before [`Role::start`].
    pub fn set_resolver(&mut self, resolver: Resolver) {
        self.resolver = resolver;
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

    /// Start a round of dialling. A name (`server`, and `local` if it is one)
    /// is resolved again before every round, on a helper thread (never on the
    /// loop); the round starts when the answer comes ([`Role::on_message`]).
    fn dial(&mut self, ctx: &mut Ctx<'_>) {
        self.attempt += 1;
        self.server_next = 0;
        if !self.server_is_name && !self.local_is_name {
            self.dial_next(ctx, None);
            return;
        }
        self.set_state(AgentState::Waiting, None, 0);
        let server = self.server_is_name.then(|| self.config.server.clone());
        let local = self.local_is_name.then(|| self.config.local.clone());
        let (resolve, attempt, handle, role) = (
            Arc::clone(&self.resolver),
            self.attempt,
            ctx.handle(),
            ctx.role_id(),
        );
        let spawned = std::thread::Builder::new()
            .name("resolve".into())
            .spawn(move || {
                let server = server.map(|n| lookup(&resolve, &n));
                let local = local.map(|n| lookup(&resolve, &n));
                let msg: Message = Box::new(Resolved {
                    attempt,
                    server,
                    local,
                });
                // The engine may be stopping: then nobody needs the answer.
                let _ = handle.send(role, msg);
            });
        if let Err(e) = spawned {
            warn!("{}: cannot start a resolver thread: {e}", self.label());
            self.retry_later(ctx, format!("resolver thread: {e}"));
        }
    }

    /// Connect to the next server address of this round; once every address
    /// has failed, back off (`why`: the last failure).
    fn dial_next(&mut self, ctx: &mut Ctx<'_>, mut why: Option<String>) {
        while let Some(&addr) = self.server_addrs.get(self.server_next) {
            if let Some(w) = &why {
                info!("{}: {w}; trying the next address", self.label());
            }
            self.server_next += 1;
            match self.connect(ctx, addr) {
                Ok(()) => return,
                Err(e) => why = Some(format!("connect to {addr}: {e}")),
            }
        }
        let why = why.unwrap_or_else(|| format!("no address for {}", self.config.server));
        self.retry_later(ctx, why);
    }

    fn connect(&mut self, ctx: &mut Ctx<'_>, addr: SocketAddr) -> io::Result<()> {
        let opts = ConnectOptions {
            framing: Framing::Tunnel {
                max: self.config.max_frame,
            },
            queue_bytes: Some(self.mux.settings.link_queue()),
            timeout: Some(self.config.connect_timeout),
            ..ConnectOptions::default()
        };
        let conn = ctx.connect(addr, opts)?;
        let now = ctx.now();
        let session = Session::agent(self.mux.settings, Arc::clone(&self.mux.stats), now);
        let li = self.mux.add(ctx, conn, session, ());
        self.link = Some(li);
        self.link_conn = Some(conn);
        self.link_addr = Some(addr);
        self.set_state(AgentState::Connecting, None, 0);
        let n = self.server_addrs.len();
        if !self.server_is_name {
            info!("{}: dialling {addr}", self.label());
        } else if n > 1 {
            let i = self.server_next;
            let server = &self.config.server;
            info!(
                "{}: dialling {server} at {addr} (address {i} of {n})",
                self.label()
            );
        } else {
            info!(
                "{}: dialling {} at {addr}",
                self.label(),
                self.config.server
            );
        }
        Ok(())
    }

    /// Schedule the next dial: exponential back-off with jitter (half to all
    /// of the current delay). A link that completed its handshake and stayed
    /// up `reconnect_reset` starts the back-off over from `reconnect_min`.
    fn retry_later(&mut self, ctx: &mut Ctx<'_>, why: String) {
        let now = ctx.now();
        if self
            .up_since
            .take()
            .is_some_and(|t| now.duration_since(t) >= self.config.reconnect_reset)
        {
            self.backoff = self.config.reconnect_min;
        }
        let half = self.backoff / 2;
        let jitter = Duration::from_millis(self.rng.below(half.as_millis() as u64 + 1));
        let wait = half + jitter;
        self.backoff = (self.backoff * 2).min(self.config.reconnect_max);
        info!("{}: {why}; reconnecting in {wait:?}", self.label());
        self.set_state(AgentState::Waiting, Some(why), 0);
        ctx.set_timer(now + wait, 0);
    }

    /// New addresses for `local`: streams start again at the first one.
    fn set_local(&mut self, addrs: Vec<SocketAddr>) {
        if addrs != self.local_addrs {
            info!("{}: local {} is {addrs:?}", self.label(), self.config.local);
            self.local_addrs = addrs;
            self.local_next = 0;
        }
    }

    /// Where a CONNECT for `target` goes, and whether it is the local service
    /// (an empty target, or `local` as configured): the local service's
    /// current address, or an allowed address (`allow`; by default the
    /// addresses `local` resolves to). `None`: refused.
    fn target(&self, target: &[u8]) -> Option<(SocketAddr, bool)> {
        if target.is_empty() || target == self.config.local.as_bytes() {
            return self.local_addrs.get(self.local_next).map(|&a| (a, true));
        }
        let addr = std::str::from_utf8(target)
            .ok()?
            .parse::<SocketAddr>()
            .ok()?;
        let allowed = if self.config.allow.is_empty() {
            self.local_addrs.contains(&addr)
        } else {
            self.config.allow.contains(&addr)
        };
        allowed.then_some((addr, false))
    }

    /// A local connect failed: if it tried the current local address and
    /// there are others, the next stream tries the next one. (The stream
    /// itself is refused; bytes queued for it are not moved.)
    fn local_failed(&mut self, index: usize, reason: CloseReason) {
        let failed = matches!(reason, CloseReason::Io(_) | CloseReason::ConnectTimeout);
        if !failed || index != self.local_next || self.local_addrs.len() < 2 {
            return;
        }
        self.local_next = (self.local_next + 1) % self.local_addrs.len();
        if let (Some(from), Some(to)) = (
            self.local_addrs.get(index),
            self.local_addrs.get(self.local_next),
        ) {
            info!(
                "{}: local {} at {from} failed ({reason}); the next streams go to {to}",
                self.label(),
                self.config.local
            );
        }
    }

    /// The server has not finished the handshake within `handshake_timeout`:
    /// drop the link (counted); [`Role::on_closed`] redials with back-off.
    fn handshake_expired(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey) {
        bump(&self.mux.stats.handshake_timeouts_total);
        let at = self
            .link_addr
            .map_or_else(String::new, |a| format!(" at {a}"));
        let why = format!(
            "the server{at} did not finish the handshake within handshake_timeout ({:?})",
            self.config.handshake_timeout
        );
        warn!("{}: {why}; closing the link", self.label());
        self.fail_reason = Some(why);
        ctx.abort(conn);
    }

    /// The TCP connection is up: LISTEN (the session starts its deadline).
    fn send_listen(&mut self, ctx: &mut Ctx<'_>, li: usize) {
        let hello = AgentHello {
            extensions: self.config.extensions,
            token: self.config.token.as_ref().map(|t| t.as_bytes().to_vec()),
            name: self.config.name.as_bytes().to_vec(),
            nonce: self.rng.nonce(),
        };
        let now = ctx.now();
        let Some(link) = self.mux.links.get_mut(li) else {
            return;
        };
        link.session.start(hello, now);
        let up = link.session.is_up();
        if self.mux.drive(ctx, li) && !up {
            self.set_state(AgentState::Handshake, None, 0);
        }
        self.link_events(ctx, li);
    }

    /// The session reports the link up, or lost.
    fn link_events(&mut self, ctx: &mut Ctx<'_>, li: usize) {
        while let Some(event) = self
            .mux
            .links
            .get_mut(li)
            .and_then(|l| l.session.poll_link_event())
        {
            let Some(conn) = self.mux.links.get(li).map(|l| l.conn) else {
                return;
            };
            match event {
                LinkEvent::Up { flags } => self.link_up(ctx, conn, flags),
                LinkEvent::HandshakeTimeout => self.handshake_expired(ctx, conn),
                LinkEvent::Failed(why @ Failure::CreditOverflow { .. }) => {
                    warn!("{conn}: {why}; closing the link");
                    ctx.abort(conn);
                }
                LinkEvent::Failed(Failure::Rejected { code, text }) => {
                    let why = Failure::Rejected {
                        code,
                        text: Vec::new(),
                    };
                    let msg = format!("{why} ({})", Preview(&text));
                    self.fail(ctx, conn, &msg);
                }
                LinkEvent::Failed(why) => self.fail(ctx, conn, &why.to_string()),
            }
        }
    }

    fn link_up(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey, flags: u16) {
        let now = ctx.now();
        self.up_since = Some(now);
        self.set_state(AgentState::Up, None, flags);
        if flags & ext::HEARTBEAT != 0 {
            ctx.set_idle_timeout(conn, Some(self.config.heartbeat_timeout));
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

    /// A CONNECT the session accepted the id of: connect to the target, if
    /// it is allowed and `max_streams` leaves room; else refuse (CLOSE).
    fn on_connect(
        &mut self,
        ctx: &mut Ctx<'_>,
        li: usize,
        id: u8,
        client: Option<SocketAddr>,
        target: &[u8],
    ) {
        let from = Client(client);
        let target_addr = self.target(target);
        let Some((addr, is_local)) = target_addr else {
            bump(&self.mux.stats.refused_total);
            if let Some(n) = self.warn_refused.check(ctx.now()) {
                warn!(
                    "{}: CONNECT id {id} from {from} to '{}' refused: not on the allowlist{}",
                    self.label(),
                    Preview(target),
                    Suppressed(n)
                );
            }
            self.mux.refuse_stream(ctx, li, id);
            return;
        };
        if self
            .mux
            .links
            .get(li)
            .is_some_and(|l| l.session.open_streams() >= self.config.max_streams)
        {
            bump(&self.mux.stats.refused_total);
            if let Some(n) = self.warn_refused.check(ctx.now()) {
                warn!(
                    "{}: CONNECT id {id} refused: max_streams reached{}",
                    self.label(),
                    Suppressed(n)
                );
            }
            self.mux.refuse_stream(ctx, li, id);
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
                self.mux.accept_stream(ctx, li, id, conn);
                if is_local && self.local_addrs.len() > 1 {
                    self.local_pending.insert(conn, self.local_next);
                }
            }
            Err(e) => {
                bump(&self.mux.stats.refused_total);
                if let Some(n) = self.warn_local.check(ctx.now()) {
                    warn!(
                        "{}: stream {id}: cannot connect to {addr}: {e}{}",
                        self.label(),
                        Suppressed(n)
                    );
                }
                self.mux.refuse_stream(ctx, li, id);
            }
        }
    }

    fn on_link_frame(&mut self, ctx: &mut Ctx<'_>, li: usize, raw: &[u8]) {
        if let Incoming::Connect { id, client, target } = self.mux.on_frame(ctx, li, raw) {
            self.on_connect(ctx, li, id, client, target);
        }
        self.link_events(ctx, li);
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
        out.str("local", &self.config.local);
        out.str("state", &self.state.to_string());
        out.age(
            "linked_seconds",
            self.up_since.filter(|_| self.state == AgentState::Up),
        );
        out.num(
            "extensions",
            link.map_or(0, |l| u64::from(l.session.flags())),
        );
        out.num(
            "streams",
            link.map_or(0, |l| l.session.open_streams() as u64),
        );
        // The agent's own figures; the counters both tunnel roles report
        // follow, as `TunnelStats` declares them.
        let st = &self.mux.stats;
        out.num("reconnects_total", st.reconnects_total.value());
        let handshake_timeouts = st.handshake_timeouts_total.value();
        out.num("handshake_timeouts_total", handshake_timeouts);
        out.counter(
            "switchboard_tunnel_handshake_timeouts_total",
            "Agent links dropped because the server did not finish the handshake in time.",
            &[],
            handshake_timeouts,
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
            link.map_or(0, |l| l.session.open_streams() as u64),
        );
        out.counters(&**st);
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
            self.local_pending.remove(&conn);
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
            if let Some(n) = self.warn_local.check(ctx.now()) {
                warn!(
                    "{}: local connection failed ({reason}){}",
                    self.label(),
                    Suppressed(n)
                );
            }
        }
        self.on_closed(ctx, conn, reason);
    }

    fn on_frame(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey, frame: Frame<'_>) {
        match self.link {
            Some(li) if self.link_conn == Some(conn) => self.on_link_frame(ctx, li, frame.raw),
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
            if let Some(index) = self.local_pending.remove(&conn) {
                self.local_failed(index, reason);
            }
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
        let connecting = self.state == AgentState::Connecting;
        if let Some(li) = self.link.take() {
            self.mux.remove(ctx, li);
        }
        if was_up {
            bump(&self.mux.stats.reconnects_total);
        }
        let what = if was_up {
            "link lost"
        } else if connecting {
            "cannot connect"
        } else {
            "link failed"
        };
        let at = self
            .link_addr
            .take()
            .map_or_else(String::new, |a| format!(" to {a}"));
        let why = self
            .fail_reason
            .take()
            .unwrap_or_else(|| format!("{what}{at} ({reason})"));
        if self.stopping {
            self.set_state(AgentState::Waiting, Some(why), 0);
        } else if connecting {
            // TCP never connected: the next address, if any, before backing off.
            self.dial_next(ctx, Some(why));
        } else {
            self.retry_later(ctx, why);
        }
    }

    /// The next dial (the role's only own timer).
    fn on_timer(&mut self, ctx: &mut Ctx<'_>, _: TimerKey, _: u64) {
        if !self.stopping {
            self.dial(ctx);
        }
    }

    /// The link's session deadline (its only connection timer).
    fn on_conn_timer(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey, timer: TimerKey, _: u64) {
        if let Some(li) = self.link.filter(|_| self.link_conn == Some(conn)) {
            self.mux.on_timer(ctx, li, timer);
            self.link_events(ctx, li);
        }
    }

    fn on_shutdown(&mut self, _ctx: &mut Ctx<'_>) {
        self.stopping = true;
    }

    fn on_message(&mut self, ctx: &mut Ctx<'_>, msg: Message) {
        let Ok(resolved) = msg.downcast::<Resolved>() else {
            return;
        };
        if resolved.attempt != self.attempt || self.link.is_some() || self.stopping {
            return;
        }
        let Resolved { server, local, .. } = *resolved;
        match local {
            Some(Ok(addrs)) => self.set_local(addrs),
            Some(Err(e)) if self.local_addrs.is_empty() => {
                let why = format!("cannot resolve local {}: {e}", self.config.local);
                self.retry_later(ctx, why);
                return;
            }
            Some(Err(e)) => warn!(
                "{}: cannot resolve local {}: {e}; keeping {:?}",
                self.label(),
                self.config.local,
                self.local_addrs
            ),
            None => {}
        }
        match server {
            Some(Ok(addrs)) => self.server_addrs = addrs,
            Some(Err(e)) => {
                self.retry_later(ctx, format!("cannot resolve {}: {e}", self.config.server));
                return;
            }
            None => {}
        }
        self.dial_next(ctx, None);
    }
}
