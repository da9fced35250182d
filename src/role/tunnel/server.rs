//! The tunnel server: agents dial in and LISTEN; each service's public port
//! is open while an agent is linked to it, and its clients become streams.
//!
//! Invariant: a service has at most one link; a link serves at most one
//! service; the public listener belongs to the service and is closed when
//! its link goes down (a takeover hands it to the new link without closing).

use std::any::Any;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use hashbrown::HashMap;
use log::{debug, error, info, warn};

use super::rng::Rng;
use super::{Links, link_keepalive};
use crate::codec::Frame;
use crate::codec::Framing;
use crate::codec::tunnel::{ext, reject};
use crate::config::TunnelServerConfig;
use crate::engine::{
    CloseReason, ConnKey, Ctx, EngineError, ListenOptions, ListenerId, LogLimit, Preview,
    Suppressed, TimerKey, View,
};
use crate::metrics::bump;
use crate::proto::tunnel::{Failure, Incoming, LinkEvent, Listen, Session, Settings, TunnelStats};
use crate::role::admission::{Admit, PER_IP_GRACE, Pending, PendingId, Throttle};
use crate::role::{Reconfigure, Report, Role};

/// What the server keeps per link besides its session.
struct ServerLink {
    peer: SocketAddr,
    /// The service asked for (from LISTEN on).
    service: Option<usize>,
    /// Its place in the pending table until the handshake is done.
    pending: Option<PendingId>,
}

/// Warnings a peer can repeat: one line per kind per second
/// ([`LogLimit`]).
#[derive(Debug, Default)]
struct Warnings {
    /// A handshake refused (unknown service, failed authentication, ...).
    rejected: LogLimit,
    /// A public client refused (no free id).
    refused: LogLimit,
    /// A link closed on accept, or evicted, by the pending limits.
    admission: LogLimit,
    /// A handshake that did not finish in time.
    timeout: LogLimit,
}

struct Service {
    /// Taken out of service by a reload (kept so indices stay valid).
    removed: bool,
    name: String,
    public: SocketAddr,
    token: Option<Vec<u8>>,
    listener: Option<ListenerId>,
    link: Option<usize>,
}

/// The `tunnel_server` role.
pub struct TunnelServer {
    config: TunnelServerConfig,
    mux: Links<ServerLink>,
    services: Vec<Service>,
    link_listener: Option<ListenerId>,
    links_by_conn: HashMap<ConnKey, usize>,
    by_listener: HashMap<ListenerId, usize>,
    /// Links in their handshake (bounded; the oldest makes room).
    pending: Pending<ConnKey>,
    /// Addresses refused for failing their handshakes.
    throttle: Throttle,
    warnings: Warnings,
    rng: Rng,
}

impl TunnelServer {
    /// A server for `config` (nothing is opened before [`Role::start`]).
    pub fn new(config: &TunnelServerConfig) -> TunnelServer {
        let mux = Links::new(
            Settings {
                window: config.window,
                max_window: config.max_window,
                link_window: config.link_window,
                max_data: config.max_data,
                max_streams: config.max_streams,
                quarantine: Some(config.id_quarantine),
                handshake_timeout: config.handshake_timeout,
                heartbeat_interval: config.heartbeat_interval,
            },
            config.stall_timeout,
        );
        let services: Vec<Service> = config
            .service
            .iter()
            .map(|s| Service {
                removed: false,
                name: s.name.clone(),
                public: s.public,
                token: s.token.as_ref().map(|t| t.as_bytes().to_vec()),
                listener: None,
                link: None,
            })
            .collect();
        if let Ok(mut st) = mux.stats.status.lock() {
            st.services = services
                .iter()
                .map(|s| (s.name.clone(), None, None))
                .collect();
        }
        TunnelServer {
            mux,
            services,
            link_listener: None,
            links_by_conn: HashMap::new(),
            by_listener: HashMap::new(),
            pending: Pending::new(config.max_pending, config.max_pending_per_ip, PER_IP_GRACE),
            throttle: Throttle::new(),
            warnings: Warnings::default(),
            rng: Rng::from_os(),
            config: config.clone(),
        }
    }

    /// Counters and per-service state, readable from any thread.
    pub fn stats(&self) -> Arc<TunnelStats> {
        Arc::clone(&self.mux.stats)
    }

    fn publish_status(&self, si: usize, agent: Option<SocketAddr>, public: Option<SocketAddr>) {
        if let Ok(mut st) = self.mux.stats.status.lock()
            && let Some(entry) = st.services.get_mut(si)
        {
            entry.1 = public;
            entry.2 = agent;
        }
    }

    /// REJECT (extended agents) and close the link after it is written.
    fn refuse(&mut self, ctx: &mut Ctx<'_>, li: usize, code: Option<u8>, why: &str) {
        let Some(link) = self.mux.links.get(li) else {
            return;
        };
        if let Some(n) = self.warnings.rejected.check(ctx.now()) {
            warn!(
                "{}: agent {} refused: {why}{}",
                self.config.name,
                link.extra.peer,
                Suppressed(n)
            );
        }
        bump(&self.mux.stats.rejected_total);
        let conn = link.conn;
        if let Some(link) = self.mux.links.get_mut(li) {
            link.session.reject(code, why);
        }
        self.mux.drive(ctx, li);
        ctx.close(conn);
    }

    /// A handshake that failed for what the agent sent (unknown service,
    /// missing or wrong authentication, malformed request): counted against
    /// its address ([`Throttle`]), and refused.
    fn refuse_failed(&mut self, ctx: &mut Ctx<'_>, li: usize, code: Option<u8>, why: &str) {
        if let Some(link) = self.mux.links.get(li) {
            let ip = link.extra.peer.ip();
            if self.throttle.failure(ip, ctx.now()) {
                warn!(
                    "{}: {ip}: {} failed handshakes within {:?}; refusing its links for {:?}",
                    self.config.name,
                    Throttle::FAILURES,
                    Throttle::WINDOW,
                    Throttle::BLOCK
                );
            }
        }
        self.refuse(ctx, li, code, why);
    }

    /// An empty LISTEN (or an empty name): the first service without a
    /// token that has no link, else the first service without a token.
    fn tokenless_service(&self) -> Option<usize> {
        let open = |s: &Service| s.token.is_none() && !s.removed;
        let free = self
            .services
            .iter()
            .position(|s| open(s) && s.link.is_none());
        free.or_else(|| self.services.iter().position(open))
    }

    fn on_listen(&mut self, ctx: &mut Ctx<'_>, li: usize, listen: Listen<'_>) {
        let req = match listen {
            Listen::Base => {
                match self.tokenless_service() {
                    Some(si) => self.activate(ctx, li, si, 0, 0),
                    None => self.refuse_failed(
                        ctx,
                        li,
                        None,
                        "empty LISTEN, and every service needs a token",
                    ),
                }
                return;
            }
            Listen::Malformed => {
                self.refuse_failed(ctx, li, Some(reject::MALFORMED), "malformed LISTEN request");
                return;
            }
            Listen::Request(req) => req,
        };
        let si = if req.name.is_empty() {
            self.tokenless_service()
        } else {
            // Never an entry a reload took out of service: its token is
            // revoked and its port must stay closed.
            self.services
                .iter()
                .position(|s| !s.removed && s.name.as_bytes() == req.name)
        };
        let Some(si) = si else {
            let why = format!("no service '{}'", Preview(req.name));
            self.refuse_failed(ctx, li, Some(reject::UNKNOWN_SERVICE), &why);
            return;
        };
        let needs_auth = self.services[si].token.is_some();
        if needs_auth && req.flags & ext::AUTH == 0 {
            let why = format!(
                "service '{}' needs a token and AUTH was not asked for",
                self.services[si].name
            );
            self.refuse_failed(ctx, li, Some(reject::AUTH_REQUIRED), &why);
            return;
        }
        let nonce = self.rng.nonce();
        let svc = &self.services[si];
        let Some(link) = self.mux.links.get_mut(li) else {
            return;
        };
        link.extra.service = Some(si);
        let offer = link
            .session
            .offer(&req, svc.name.as_bytes(), svc.token.as_deref(), nonce);
        if !self.mux.drive(ctx, li) {
            return;
        }
        if let Some((flags, window)) = offer {
            self.activate(ctx, li, si, flags, window);
        }
    }

    fn on_auth_failed(&mut self, ctx: &mut Ctx<'_>, li: usize) {
        let Some(si) = self.mux.links.get(li).and_then(|l| l.extra.service) else {
            return;
        };
        let why = format!(
            "authentication failed for service '{}'",
            self.services[si].name
        );
        self.refuse_failed(ctx, li, Some(reject::AUTH_FAILED), &why);
    }

    /// The handshake is done: take over the service, open its public port.
    fn activate(&mut self, ctx: &mut Ctx<'_>, li: usize, si: usize, flags: u16, peer_window: u32) {
        if self.services.get(si).is_none_or(|s| s.removed) {
            let code = (flags != 0).then_some(reject::UNKNOWN_SERVICE);
            self.refuse(ctx, li, code, "the service was removed");
            return;
        }
        let Some(link) = self.mux.links.get_mut(li) else {
            return;
        };
        link.extra.service = Some(si);
        let (conn, peer) = (link.conn, link.extra.peer);
        if let Some(id) = link.extra.pending.take() {
            self.pending.remove(id, conn);
        }
        if let Some(old) = self.services[si].link.take()
            && let Some(old_link) = self.mux.remove(ctx, old)
        {
            info!(
                "{}: service '{}' taken over by {peer}; closing the link from {}",
                self.config.name, self.services[si].name, old_link.extra.peer
            );
            self.links_by_conn.remove(&old_link.conn);
            ctx.close(old_link.conn);
        }
        if self.services[si].listener.is_none() {
            let opts = ListenOptions {
                framing: Framing::Chunk {
                    max: self.config.max_data,
                },
                queue_bytes: Some(self.mux.settings.stream_queue()),
                nodelay: true,
                ..ListenOptions::default()
            };
            match ctx.listen(self.services[si].public, opts) {
                Ok(id) => {
                    self.services[si].listener = Some(id);
                    self.by_listener.insert(id, si);
                }
                Err(e) => {
                    error!(
                        "{}: service '{}': {e}",
                        self.config.name, self.services[si].name
                    );
                    let code = (flags != 0).then_some(reject::LISTEN_FAILED);
                    self.refuse(ctx, li, code, "the public port could not be opened");
                    return;
                }
            }
        }
        self.services[si].link = Some(li);
        let now = ctx.now();
        if let Some(link) = self.mux.links.get_mut(li) {
            link.session.link_up(flags, peer_window, now);
        }
        self.mux.drive(ctx, li);
        if flags & ext::HEARTBEAT != 0 {
            ctx.set_idle_timeout(conn, Some(self.config.heartbeat_timeout));
        }
        let public = self.services[si]
            .listener
            .and_then(|l| ctx.listener_addr(l));
        self.publish_status(si, Some(peer), public);
        let mode = if flags == 0 {
            "base protocol"
        } else {
            "extended"
        };
        info!(
            "{}: service '{}' linked to agent {peer} ({mode}, flags {flags:#06x}); clients on {}",
            self.config.name,
            self.services[si].name,
            public.map_or_else(|| "?".to_owned(), |a| a.to_string())
        );
    }

    fn on_public_accept(&mut self, ctx: &mut Ctx<'_>, si: usize, conn: ConnKey, peer: SocketAddr) {
        let Some(li) = self.services[si].link else {
            ctx.abort(conn);
            return;
        };
        let id = match self.mux.open_stream(ctx, li, conn, peer) {
            Ok(id) => id,
            Err(no) => {
                self.refuse_client(ctx, si, li, conn, peer, no);
                return;
            }
        };
        debug!("{conn}: client {peer} is stream {id} of link {li}");
    }

    /// A public client with no id for it: counted, logged (rate-limited), closed.
    fn refuse_client(
        &mut self,
        ctx: &mut Ctx<'_>,
        si: usize,
        li: usize,
        conn: ConnKey,
        peer: SocketAddr,
        no: crate::proto::tunnel::NoId,
    ) {
        let now = ctx.now();
        bump(&self.mux.stats.refused_total);
        let (open, quarantined, closing) = (no.open, no.quarantined, no.closing);
        let max = self.mux.settings.max_streams;
        let streams = self
            .mux
            .links
            .get(li)
            .map_or(0, |l| l.session.open_streams());
        if !no.at_max && quarantined > 0 {
            bump(&self.mux.stats.quarantine_refused_total);
        }
        if let Some(n) = self.warnings.refused.check(now) {
            let (name, service) = (&self.config.name, &self.services[si].name);
            if no.at_max {
                warn!(
                    "{name}: service '{service}': client {peer} refused, all {streams} \
                     streams in use (max_streams {max}){}",
                    Suppressed(n)
                );
            } else {
                warn!(
                    "{name}: service '{service}': client {peer} refused, no free id; 256 ids: \
                     {open} in use, {quarantined} in quarantine, {closing} waiting for the \
                     agent's CLOSE{}",
                    Suppressed(n)
                );
            }
        }
        ctx.close(conn);
    }

    /// A frame from a link: the session handles it; the handshake's
    /// decisions (which service, its token) are made here.
    fn on_link_frame(&mut self, ctx: &mut Ctx<'_>, li: usize, raw: &[u8]) {
        match self.mux.on_frame(ctx, li, raw) {
            Incoming::Listen(l) => self.on_listen(ctx, li, l),
            Incoming::Authenticated { flags, peer_window } => {
                if let Some(si) = self.mux.links.get(li).and_then(|l| l.extra.service) {
                    self.activate(ctx, li, si, flags, peer_window);
                }
            }
            Incoming::AuthFailed => self.on_auth_failed(ctx, li),
            Incoming::Nothing | Incoming::Deliver { .. } | Incoming::Connect { .. } => {}
        }
        self.link_events(ctx, li);
    }

    /// What the session reports about the link as a whole.
    fn link_events(&mut self, ctx: &mut Ctx<'_>, li: usize) {
        let Some(link) = self.mux.links.get_mut(li) else {
            return;
        };
        while let Some(event) = link.session.poll_link_event() {
            match event {
                LinkEvent::Up { .. } => {}
                LinkEvent::HandshakeTimeout => {
                    if let Some(n) = self.warnings.timeout.check(ctx.now()) {
                        warn!(
                            "{}: agent {} did not finish its handshake in {:?}; closing{}",
                            self.config.name,
                            link.extra.peer,
                            self.config.handshake_timeout,
                            Suppressed(n)
                        );
                    }
                    ctx.close(link.conn);
                }
                LinkEvent::Failed(why @ Failure::CreditOverflow { .. }) => {
                    warn!("{}: {why}; closing the link", link.conn);
                    ctx.abort(link.conn);
                }
                LinkEvent::Failed(why) => {
                    warn!("{}: {why}; closing the link", link.conn);
                    ctx.close(link.conn);
                }
            }
        }
    }

    fn link_closed(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey, reason: CloseReason) {
        let Some(li) = self.links_by_conn.remove(&conn) else {
            return;
        };
        let Some(link) = self.mux.remove(ctx, li) else {
            return;
        };
        if !link.session.is_up() {
            if let Some(id) = link.extra.pending {
                self.pending.remove(id, conn);
            }
            debug!(
                "{conn}: agent {} left during the handshake ({reason})",
                link.extra.peer
            );
            return;
        }
        let Some(si) = link.extra.service else { return };
        if self.services[si].link != Some(li) {
            return;
        }
        self.services[si].link = None;
        if let Some(l) = self.services[si].listener.take() {
            self.by_listener.remove(&l);
            ctx.close_listener(l);
        }
        self.publish_status(si, None, None);
        info!(
            "{}: service '{}': link from {} down ({reason}); public port closed",
            self.config.name, self.services[si].name, link.extra.peer
        );
    }
}

impl TunnelServer {
    /// Whether a new connection on the link port may start a handshake:
    /// not from an address that keeps failing, not beyond
    /// `max_pending_per_ip`; a full table closes its oldest handshake to
    /// make room.
    fn admit_link(
        &mut self,
        ctx: &mut Ctx<'_>,
        conn: ConnKey,
        peer: SocketAddr,
        now: Instant,
    ) -> bool {
        let stats = &self.mux.stats;
        if self.throttle.is_blocked(peer.ip(), now) {
            bump(&stats.throttled_total);
            debug!("{conn}: agent {peer} closed: its address failed too many handshakes");
            return false;
        }
        let limit = &mut self.warnings.admission;
        match self.pending.admit(peer.ip(), now) {
            Admit::Yes => true,
            Admit::TooManyFromAddress => {
                bump(&stats.pending_refused_total);
                if let Some(n) = limit.check(now) {
                    warn!(
                        "{}: agent {peer} closed: {} handshakes from its address already{}",
                        self.config.name,
                        self.config.max_pending_per_ip,
                        Suppressed(n)
                    );
                }
                false
            }
            Admit::Evicted(old) => {
                bump(&stats.pending_evicted_total);
                if let Some(n) = limit.check(now) {
                    let from = self
                        .links_by_conn
                        .get(&old)
                        .and_then(|&li| self.mux.links.get(li))
                        .map(|l| l.extra.peer);
                    warn!(
                        "{}: {} handshakes pending; closed the oldest (from {}) to admit agent {peer}{}",
                        self.config.name,
                        self.config.max_pending,
                        from.map_or_else(|| "?".to_owned(), |a| a.to_string()),
                        Suppressed(n)
                    );
                }
                ctx.abort(old);
                true
            }
        }
    }

    /// Live reload: close service `si`'s link (and its streams) and public port.
    fn remove_service(&mut self, ctx: &mut Ctx<'_>, si: usize) {
        let Some(s) = self.services.get_mut(si) else {
            return;
        };
        s.removed = true;
        if let Some(l) = s.listener.take() {
            self.by_listener.remove(&l);
            ctx.close_listener(l);
        }
        if let Some(li) = s.link.take()
            && let Some(link) = self.mux.remove(ctx, li)
        {
            self.links_by_conn.remove(&link.conn);
            ctx.close(link.conn);
        }
        // Links still in their handshake for this service would finish it
        // with the revoked token (or reopen the port): close them too.
        let half_done: Vec<usize> = self
            .mux
            .links
            .iter()
            .filter(|(_, l)| !l.session.is_up() && l.extra.service == Some(si))
            .map(|(li, _)| li)
            .collect();
        for li in half_done {
            if let Some(link) = self.mux.links.get(li) {
                ctx.close(link.conn);
            }
        }
        let s = &self.services[si];
        info!("{}: service '{}' removed", self.config.name, s.name);
        self.publish_status(si, None, None);
    }
}

impl Role for TunnelServer {
    fn name(&self) -> &str {
        &self.config.name
    }

    fn kind(&self) -> &str {
        "tunnel_server"
    }

    fn reconfigure(&mut self, ctx: &mut Ctx<'_>, new: &dyn Any) -> Reconfigure {
        let Some(new) = new.downcast_ref::<TunnelServerConfig>() else {
            return Reconfigure::Restart;
        };
        let mut old_settings = self.config.clone();
        old_settings.service = new.service.clone();
        if old_settings != *new {
            // Link or stream settings: every link would need renegotiating.
            return Reconfigure::Restart;
        }
        for si in 0..self.services.len() {
            let Some(s) = self.services.get(si) else {
                continue;
            };
            if s.removed {
                continue;
            }
            let keep = new.service.iter().any(|c| {
                c.name == s.name
                    && c.public == s.public
                    && c.token.as_deref().map(str::as_bytes) == s.token.as_deref()
            });
            if !keep {
                self.remove_service(ctx, si);
            }
        }
        for c in &new.service {
            if self.services.iter().any(|s| !s.removed && s.name == c.name) {
                continue;
            }
            self.services.push(Service {
                removed: false,
                name: c.name.clone(),
                public: c.public,
                token: c.token.as_ref().map(|t| t.as_bytes().to_vec()),
                listener: None,
                link: None,
            });
            if let Ok(mut st) = self.mux.stats.status.lock() {
                st.services.push((c.name.clone(), None, None));
            }
            info!("{}: service '{}' added", self.config.name, c.name);
        }
        self.config = new.clone();
        Reconfigure::Applied
    }

    fn report(&self, view: &View<'_>, out: &mut Report) {
        out.addr(
            "listen",
            self.link_listener.and_then(|l| view.listener_addr(l)),
        );
        out.num("pending_links", self.pending.len() as u64);
        out.open_array(Some("services"));
        for s in self.services.iter().filter(|s| !s.removed) {
            let link = s.link.and_then(|li| self.mux.links.get(li));
            out.open_object(None);
            out.str("name", &s.name);
            out.bool("token", s.token.is_some());
            out.str("link", if link.is_some() { "up" } else { "down" });
            out.addr("public", s.listener.and_then(|l| view.listener_addr(l)));
            out.addr("agent", link.map(|l| l.extra.peer));
            out.age("linked_seconds", link.map(|l| l.session.since()));
            out.num(
                "extensions",
                link.map_or(0, |l| u64::from(l.session.flags())),
            );
            out.num(
                "streams",
                link.map_or(0, |l| l.session.open_streams() as u64),
            );
            out.close_object();
            let state = if link.is_some() { 1 } else { 0 };
            out.gauge(
                "switchboard_tunnel_link_up",
                "1 while an agent is linked to the service.",
                &[("service", &s.name)],
                state,
            );
            out.gauge(
                "switchboard_tunnel_streams",
                "Streams open now.",
                &[("service", &s.name)],
                link.map_or(0, |l| l.session.open_streams() as u64),
            );
        }
        out.close_array();
        out.counters(&*self.mux.stats);
    }

    fn start(&mut self, ctx: &mut Ctx<'_>) -> Result<(), EngineError> {
        let opts = ListenOptions {
            framing: Framing::Tunnel {
                max: self.config.max_frame,
            },
            queue_bytes: Some(self.mux.settings.link_queue()),
            nodelay: true,
            ..ListenOptions::default()
        };
        self.link_listener = Some(ctx.listen(self.config.listen, opts)?);
        info!(
            "{}: agents on {} ({} services)",
            self.config.name,
            self.config.listen,
            self.services.len()
        );
        Ok(())
    }

    fn on_accept(
        &mut self,
        ctx: &mut Ctx<'_>,
        listener: ListenerId,
        conn: ConnKey,
        peer: SocketAddr,
    ) {
        if Some(listener) != self.link_listener {
            match self.by_listener.get(&listener) {
                Some(&si) => self.on_public_accept(ctx, si, conn, peer),
                None => ctx.abort(conn),
            }
            return;
        }
        let now = ctx.now();
        if !self.admit_link(ctx, conn, peer, now) {
            ctx.abort(conn);
            return;
        }
        let pending = self.pending.insert(conn, peer.ip(), now);
        link_keepalive(ctx, conn, self.config.heartbeat_timeout);
        let session = Session::server(self.mux.settings, Arc::clone(&self.mux.stats), now);
        let li = self.mux.add(
            ctx,
            conn,
            session,
            ServerLink {
                peer,
                service: None,
                pending: Some(pending),
            },
        );
        self.links_by_conn.insert(conn, li);
        debug!("{conn}: agent {peer} connected");
    }

    fn on_frame(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey, frame: Frame<'_>) {
        if let Some(&li) = self.links_by_conn.get(&conn) {
            self.on_link_frame(ctx, li, frame.raw);
        } else {
            self.mux.on_stream_data(ctx, conn, frame.payload);
        }
    }

    fn on_read_closed(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey) {
        if self.links_by_conn.contains_key(&conn) {
            ctx.close(conn);
        } else {
            self.mux.on_stream_eof(ctx, conn);
        }
    }

    fn on_writable(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey) {
        match self.links_by_conn.get(&conn) {
            Some(&li) => self.mux.on_link_writable(ctx, li),
            None => self.mux.on_stream_writable(ctx, conn),
        }
    }

    fn on_closed(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey, reason: CloseReason) {
        if self.links_by_conn.contains_key(&conn) {
            self.link_closed(ctx, conn, reason);
            return;
        }
        if reason == CloseReason::Stalled {
            bump(&self.mux.stats.stalled_total);
        }
        if let Some((_, id)) = self.mux.on_stream_closed(ctx, conn) {
            debug!("{conn}: client of stream {id} gone ({reason})");
        }
    }

    /// A link's session deadline (the role's only timers).
    fn on_conn_timer(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey, timer: TimerKey, _: u64) {
        if let Some(&li) = self.links_by_conn.get(&conn) {
            self.mux.on_timer(ctx, li, timer);
            self.link_events(ctx, li);
        }
    }

    fn on_shutdown(&mut self, ctx: &mut Ctx<'_>) {
        for s in &mut self.services {
            if let Some(l) = s.listener.take() {
                ctx.close_listener(l);
            }
        }
    }
}
