//! The admin endpoint: `GET /status` (JSON), `GET /metrics` (Prometheus
//! text) and `GET /healthz`, served by the engine's own loop.
//!
//! Invariant: a client costs at most `MAX_HEAD` bytes of request buffer and
//! one response (at most `max_response` bytes); there are at most
//! `max_clients` of them (a new client when all are taken closes the oldest
//! one still sending its request, else the oldest still reading its answer,
//! so `/healthz` is always answered); each is closed `request_timeout` after
//! it connected if it has not sent a whole request, and a response that its
//! reader does not take is dropped by the stall timeout. Nothing a client
//! sends can make the loop wait.

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use hashbrown::HashMap;
use log::{debug, info, warn};

use crate::codec::{Frame, Framing};
use crate::config::AdminConfig;
use crate::engine::{
    CloseReason, ConnKey, Ctx, EngineError, ListenOptions, ListenerId, TimerKey, View,
};
use crate::proto::admin::{MAX_HEAD, Route, route};
use crate::role::{Report, ReportKind, Role};

struct Client {
    head: Vec<u8>,
    /// A request was read (the answer is on its way).
    answered: bool,
    since: Instant,
}

crate::counters! {
    /// What the endpoint counts (reported under the admin role).
    #[derive(Debug, Default)]
    pub(super) struct Counters {
        /// Requests answered 400, 405 or 431.
        bad_requests: u64 = counter {
            status: "bad_requests_total",
            metric: "switchboard_admin_bad_requests_total",
            help: "Requests answered 400, 405 or 431.",
        },
        /// Clients closed for not sending a whole request in time.
        timeouts: u64 = counter {
            status: "timeouts_total",
            metric: "switchboard_admin_timeouts_total",
            help: "Clients closed for not sending a whole request in time.",
        },
        /// Clients closed on accept: not on `allow`.
        refused: u64 = counter {
            status: "refused_total",
            metric: "switchboard_admin_refused_total",
            help: "Clients closed on accept: not on admin.allow.",
        },
        /// Clients closed to make room for a new one.
        evicted: u64 = counter {
            status: "evicted_total",
            metric: "switchboard_admin_evicted_total",
            help: "Clients closed to make room (max_clients reached).",
        },
    }
}

/// The `[admin]` role.
pub struct Admin {
    config: AdminConfig,
    listener: Option<ListenerId>,
    clients: HashMap<ConnKey, Client>,
    counters: Counters,
}

impl Admin {
    /// An admin endpoint for `config`.
    pub fn new(config: &AdminConfig) -> Admin {
        Admin {
            config: config.clone(),
            listener: None,
            clients: HashMap::new(),
            counters: Counters::default(),
        }
    }

    /// All `max_clients` are taken: close the oldest client still sending
    /// its request (idle or slow), else the oldest still taking its answer.
    /// Clients whose answer is complete (closed this turn, `on_closed` still
    /// to come) are dropped from the count first: under load, their clients
    /// reconnect within the same turn.
    fn make_room(&mut self, ctx: &mut Ctx<'_>) {
        self.clients.retain(|&k, _| ctx.peer_addr(k).is_some());
        if self.clients.len() < self.config.max_clients {
            return;
        }
        let oldest = |answered: bool| {
            self.clients
                .iter()
                .filter(|(_, c)| c.answered == answered)
                .min_by_key(|(_, c)| c.since)
                .map(|(k, _)| *k)
        };
        if let Some(victim) = oldest(false).or_else(|| oldest(true)) {
            debug!("{victim}: admin client closed to make room for a new one");
            self.counters.evicted += 1;
            self.clients.remove(&victim);
            ctx.abort(victim);
        }
    }

    fn respond(
        &mut self,
        ctx: &mut Ctx<'_>,
        conn: ConnKey,
        status: &str,
        ctype: &str,
        body: Bytes,
    ) {
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n{}\r\n",
            body.len(),
            if status.starts_with("405") {
                "Allow: GET\r\n"
            } else {
                ""
            }
        );
        let sent = ctx
            .send(conn, head.as_bytes())
            .and_then(|()| ctx.send_bytes(conn, body));
        if sent.is_err() {
            debug!("{conn}: admin response dropped");
            ctx.abort(conn);
            return;
        }
        if let Some(c) = self.clients.get_mut(&conn) {
            c.answered = true;
        }
        ctx.pause_reading(conn);
        ctx.set_stall_timeout(conn, Some(self.config.request_timeout));
        ctx.close(conn);
    }

    fn error(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey, status: &str) {
        if !status.starts_with('5') && !status.starts_with("404") {
            self.counters.bad_requests += 1;
        }
        let body = format!("{status}\n");
        self.respond(
            ctx,
            conn,
            status,
            "text/plain; charset=utf-8",
            Bytes::from(body),
        );
    }

    /// Judge what has arrived; answer once the head is complete.
    fn on_head(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey) {
        let Some(c) = self.clients.get(&conn) else {
            return;
        };
        let route = route(&c.head);
        if route != Route::Incomplete {
            debug!("{conn}: admin request: {route:?}");
        }
        match route {
            Route::Incomplete => {}
            Route::Healthz => self.respond(
                ctx,
                conn,
                "200 OK",
                "text/plain; charset=utf-8",
                Bytes::from_static(b"ok\n"),
            ),
            Route::Status => self.ask(ctx, conn, ReportKind::Status),
            Route::Metrics => self.ask(ctx, conn, ReportKind::Metrics),
            Route::Refused(why) => self.error(ctx, conn, why.status()),
        }
    }

    fn ask(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey, kind: ReportKind) {
        if let Some(c) = self.clients.get_mut(&conn) {
            c.answered = true;
            c.head = Vec::new();
        }
        ctx.pause_reading(conn);
        ctx.request_report(conn, kind);
    }
}

impl Role for Admin {
    fn name(&self) -> &str {
        "admin"
    }

    fn kind(&self) -> &str {
        "admin"
    }

    fn report(&self, view: &View<'_>, out: &mut Report) {
        out.addr("listen", self.listener.and_then(|l| view.listener_addr(l)));
        out.num("clients", self.clients.len() as u64);
        out.counters(&self.counters);
    }

    fn start(&mut self, ctx: &mut Ctx<'_>) -> Result<(), EngineError> {
        let opts = ListenOptions {
            framing: Framing::Raw,
            queue_bytes: Some(self.config.max_response + 1024),
            nodelay: true,
            ..ListenOptions::default()
        };
        self.listener = Some(ctx.listen(self.config.listen, opts)?);
        info!(
            "admin: /status /metrics /healthz on http://{}",
            self.config.listen
        );
        Ok(())
    }

    fn on_accept(&mut self, ctx: &mut Ctx<'_>, _l: ListenerId, conn: ConnKey, peer: SocketAddr) {
        let allow = &self.config.allow;
        if !allow.is_empty() && !allow.iter().any(|c| c.contains(peer.ip())) {
            debug!("{conn}: admin client {peer} not on admin.allow; closed");
            self.counters.refused += 1;
            ctx.abort(conn);
            return;
        }
        if self.clients.len() >= self.config.max_clients {
            self.make_room(ctx);
        }
        let at = ctx.now() + self.config.request_timeout;
        ctx.set_conn_timer(conn, at, 0);
        self.clients.insert(
            conn,
            Client {
                head: Vec::new(),
                answered: false,
                since: ctx.now(),
            },
        );
    }

    fn on_frame(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey, frame: Frame<'_>) {
        let Some(c) = self.clients.get_mut(&conn) else {
            return;
        };
        if c.answered {
            return;
        }
        let room = MAX_HEAD.saturating_sub(c.head.len());
        let take = frame.payload.len().min(room);
        c.head
            .extend_from_slice(frame.payload.get(..take).unwrap_or_default());
        self.on_head(ctx, conn);
    }

    fn on_read_closed(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey) {
        // A client that half-closes after its request still gets the answer.
        if !self.clients.get(&conn).is_some_and(|c| c.answered) {
            ctx.close(conn);
        }
    }

    fn on_closed(&mut self, _ctx: &mut Ctx<'_>, conn: ConnKey, _reason: CloseReason) {
        self.clients.remove(&conn);
    }

    fn on_conn_timer(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey, _: TimerKey, _: u64) {
        if let Some(c) = self.clients.get(&conn)
            && !c.answered
        {
            debug!(
                "{conn}: admin request not complete in {:?}; closing",
                self.config.request_timeout
            );
            self.counters.timeouts += 1;
            ctx.abort(conn);
        }
    }

    fn on_report(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey, kind: ReportKind, body: Bytes) {
        if body.len() > self.config.max_response {
            warn!(
                "admin: report of {} bytes exceeds max_response ({}); answering 503",
                body.len(),
                self.config.max_response
            );
            self.error(ctx, conn, "503 Service Unavailable");
            return;
        }
        let ctype = match kind {
            ReportKind::Status => "application/json",
            ReportKind::Metrics => "text/plain; version=0.0.4; charset=utf-8",
        };
        self.respond(ctx, conn, "200 OK", ctype, body);
    }

    fn on_shutdown(&mut self, ctx: &mut Ctx<'_>) {
        if let Some(l) = self.listener.take() {
            ctx.close_listener(l);
        }
    }
}
