//! Tunnel roles: [`TunnelServer`] and [`TunnelAgent`], the adapters between
//! the engine and the sans-IO tunnel session (`crate::proto::tunnel`). The
//! wire protocol is docs/PROTOCOL.md.
//!
//! `Links` is what both roles share: their links, each a connection and a
//! [`Session`], and the stream sockets' owners. It feeds a session what
//! happens to its sockets and carries out what the session asks for
//! (`Links::drive`): bytes for the link, stream socket operations, the
//! session's next deadline as one engine timer per link.
//!
//! Invariant: a stream socket is in `Links::streams` exactly while its
//! session holds it open; the session names it in the event that lets it go
//! (`Event::End`), or the socket was reported gone first. So a socket event
//! for a stream that is gone finds nothing and does nothing.

mod agent;
mod rng;
mod server;

pub use crate::proto::tunnel::{AgentState, TunnelStats};
pub use agent::{Resolver, TunnelAgent};
pub use server::TunnelServer;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hashbrown::HashMap;
use log::{debug, warn};
use slab::Slab;

use crate::codec::Framing;
use crate::codec::tunnel::{self, Command};
use crate::engine::{ConnKey, Ctx, Keepalive, LogLimit, SendError, Suppressed, TimerKey};
use crate::metrics::bump;
use crate::proto::tunnel::{End, Event, Frame, Incoming, NoId, Problem, Session, Settings};

/// A link: its connection, its session, the engine timer armed for the
/// session's deadline, and what the role keeps per link (`X`).
pub(crate) struct Link<X> {
    pub(crate) conn: ConnKey,
    pub(crate) session: Session<ConnKey>,
    timer: Option<(Instant, TimerKey)>,
    pub(crate) extra: X,
}

/// The links of a role and the owners of their stream sockets.
pub(crate) struct Links<X> {
    pub(crate) settings: Settings,
    /// Base mode: close a stream that keeps the link paused this long.
    stall_timeout: Duration,
    pub(crate) links: Slab<Link<X>>,
    /// Stream socket → (link index, client id).
    streams: HashMap<ConnKey, (usize, u8)>,
    pub(crate) stats: Arc<TunnelStats>,
    /// A stream the peer broke (credit, overflow, id reuse): one line a second.
    warn_stream: LogLimit,
}

impl<X> Links<X> {
    pub(crate) fn new(settings: Settings, stall_timeout: Duration) -> Links<X> {
        Links {
            settings,
            stall_timeout,
            links: Slab::new(),
            streams: HashMap::new(),
            stats: Arc::new(TunnelStats::default()),
            warn_stream: LogLimit::default(),
        }
    }

    /// A new link on `conn`, driven once (a server's session arms its
    /// handshake deadline).
    pub(crate) fn add(
        &mut self,
        ctx: &mut Ctx<'_>,
        conn: ConnKey,
        session: Session<ConnKey>,
        extra: X,
    ) -> usize {
        let li = self.links.insert(Link {
            conn,
            session,
            timer: None,
            extra,
        });
        self.drive(ctx, li);
        li
    }

    /// Forget a link, resetting every stream socket it carried: a stream
    /// that ends with its link is cut short, and its client must see a reset
    /// (`ECONNRESET`), not the FIN of a complete transfer.
    pub(crate) fn remove(&mut self, ctx: &mut Ctx<'_>, li: usize) -> Option<Link<X>> {
        let mut link = self.links.try_remove(li)?;
        // Its timer goes with its connection (closed by the caller, or gone).
        if let Some((_, t)) = link.timer.take() {
            ctx.cancel_timer(t);
        }
        let open = link.session.open_streams();
        let streams = &mut self.streams;
        link.session.close_all(|s| {
            streams.remove(&s);
            ctx.reset(s);
        });
        if open > 0 {
            debug!("{}: link down, closed {open} streams", link.conn);
        }
        Some(link)
    }

    /// The link and id of a stream socket.
    pub(crate) fn stream_of(&self, conn: ConnKey) -> Option<(usize, u8)> {
        self.streams.get(&conn).copied()
    }

    /// Carry out what link `li`'s session asks for: write its bytes on the
    /// link, apply its stream events, keep one timer at its deadline.
    /// Returns false if the link is gone (its queue was full: the peer has
    /// stopped reading, and the link is closed).
    pub(crate) fn drive(&mut self, ctx: &mut Ctx<'_>, li: usize) -> bool {
        let Some(link) = self.links.get_mut(li) else {
            return false;
        };
        let mut alive = true;
        let out = link.session.transmit();
        if !out.is_empty() {
            alive = send_on_link(ctx, link.conn, &[out]);
            link.session.transmitted();
        }
        while let Some(event) = link.session.poll_event() {
            match event {
                Event::End(s, how) => {
                    self.streams.remove(&s);
                    match how {
                        End::Close => ctx.close(s),
                        End::Abort => ctx.abort(s),
                        End::Reset => ctx.reset(s),
                    }
                }
                Event::Close(s) => ctx.close(s),
                Event::ShutdownWrite(s) => ctx.shutdown_write(s),
                Event::Reading(s, true) => ctx.resume_reading(s),
                Event::Reading(s, false) => ctx.pause_reading(s),
                Event::Chunk(s, max) => ctx.set_framing(s, Framing::Chunk { max }),
                Event::Stall(s, on) => ctx.set_stall_timeout(s, on.then_some(self.stall_timeout)),
                Event::PauseLink => ctx.pause_reading(link.conn),
                Event::ResumeLink => ctx.resume_reading(link.conn),
                Event::Problem(p) => {
                    if let Some(n) = self.warn_stream.check(ctx.now()) {
                        let conn = link.conn;
                        match p {
                            Problem::CreditExceeded { id, len } => warn!(
                                "{conn}: stream {id} sent {len} bytes beyond its credit; closing the stream{}",
                                Suppressed(n)
                            ),
                            Problem::IdReused { id } => warn!(
                                "{conn}: CONNECT for id {id}, still open; closing the old stream{}",
                                Suppressed(n)
                            ),
                            Problem::IdNotReleased { id } => warn!(
                                "{conn}: CONNECT for id {id} before its CLOSE was acknowledged; ignored{}",
                                Suppressed(n)
                            ),
                        }
                    }
                }
            }
        }
        let want = link.session.poll_timeout();
        if want != link.timer.map(|(at, _)| at) {
            if let Some((_, t)) = link.timer.take() {
                ctx.cancel_timer(t);
            }
            if let Some(at) = want {
                link.timer = ctx.set_conn_timer(link.conn, at, 0).map(|t| (at, t));
            }
        }
        alive
    }

    /// A frame from link `li`: parsed once, handled by the session, DATA
    /// delivered. What is left is the role's to answer.
    pub(crate) fn on_frame<'a>(
        &mut self,
        ctx: &mut Ctx<'_>,
        li: usize,
        raw: &'a [u8],
    ) -> Incoming<'a, ConnKey> {
        let Some(frame) = Frame::parse(raw) else {
            return Incoming::Nothing;
        };
        let now = ctx.now();
        let Some(link) = self.links.get_mut(li) else {
            return Incoming::Nothing;
        };
        match link.session.handle(frame, now) {
            // DATA leaves nothing for the link: `deliver` drives once, after.
            Incoming::Deliver {
                stream,
                id,
                payload,
            } => {
                self.deliver(ctx, li, stream, id, payload);
                Incoming::Nothing
            }
            other => {
                self.drive(ctx, li);
                other
            }
        }
    }

    /// Queue DATA from the link on its stream's socket.
    fn deliver(&mut self, ctx: &mut Ctx<'_>, li: usize, conn: ConnKey, id: u8, payload: &[u8]) {
        let Some(link) = self.links.get_mut(li) else {
            return;
        };
        match ctx.send(conn, payload) {
            Ok(()) => {
                let queued = ctx.queued(conn).unwrap_or(0);
                link.session.delivered(id, payload.len(), queued, || {
                    ctx.flush(conn);
                    ctx.queued(conn).unwrap_or(0)
                });
                ctx.notify_writable(conn);
            }
            Err(SendError::Full) => {
                if let Some(n) = self.warn_stream.check(ctx.now()) {
                    warn!(
                        "{conn}: stream {id} queue overflow; closing the stream{}",
                        Suppressed(n)
                    );
                }
                ctx.abort(conn);
                self.streams.remove(&conn);
                link.session.stream_closed(id, ctx.now());
            }
            Err(SendError::Closed) => bump(&self.stats.stale_total),
        }
        self.drive(ctx, li);
    }

    /// Server: make `conn`, a public client from `peer`, a stream of link `li`.
    pub(crate) fn open_stream(
        &mut self,
        ctx: &mut Ctx<'_>,
        li: usize,
        conn: ConnKey,
        peer: SocketAddr,
    ) -> Result<u8, NoId> {
        let now = ctx.now();
        let Some(link) = self.links.get_mut(li) else {
            return Err(NoId {
                open: 0,
                quarantined: 0,
                closing: 0,
                at_max: false,
            });
        };
        let id = link.session.open_stream(conn, peer, now)?;
        self.streams.insert(conn, (li, id));
        self.drive(ctx, li);
        Ok(id)
    }

    /// Agent: `conn` (connecting) is stream `id` of link `li`.
    pub(crate) fn accept_stream(&mut self, ctx: &mut Ctx<'_>, li: usize, id: u8, conn: ConnKey) {
        let Some(link) = self.links.get_mut(li) else {
            ctx.abort(conn);
            return;
        };
        self.streams.insert(conn, (li, id));
        link.session.accept_stream(id, conn);
        self.drive(ctx, li);
    }

    /// Agent: refuse the CONNECT for `id` (CLOSE).
    pub(crate) fn refuse_stream(&mut self, ctx: &mut Ctx<'_>, li: usize, id: u8) {
        let now = ctx.now();
        if let Some(link) = self.links.get_mut(li) {
            link.session.refuse_stream(id, now);
            self.drive(ctx, li);
        }
    }

    /// Bytes read from a stream socket (at most one chunk): one DATA frame,
    /// written straight to the link.
    pub(crate) fn on_stream_data(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey, data: &[u8]) {
        let Some((li, id)) = self.stream_of(conn) else {
            return;
        };
        let Some(link) = self.links.get_mut(li) else {
            return;
        };
        debug_assert!(link.session.transmit().is_empty());
        let Some(head) = tunnel::header(Command::Data, id, data.len()) else {
            return;
        };
        if !send_on_link(ctx, link.conn, &[&head, data]) {
            return;
        }
        let link_queued = ctx.queued(link.conn).unwrap_or(0);
        let Some(after) = link.session.data_sent(id, data.len(), link_queued) else {
            return;
        };
        if let Some(max) = after.chunk {
            ctx.set_framing(conn, Framing::Chunk { max });
        }
        if after.watch_link {
            ctx.notify_writable(link.conn);
        }
        if after.reading {
            ctx.resume_reading(conn);
        } else {
            ctx.pause_reading(conn);
        }
    }

    /// A stream socket read EOF.
    pub(crate) fn on_stream_eof(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey) {
        let Some((li, id)) = self.stream_of(conn) else {
            ctx.close(conn);
            return;
        };
        if let Some(link) = self.links.get_mut(li) {
            link.session.stream_eof(id);
            self.drive(ctx, li);
        }
    }

    /// A stream socket is gone (closed by either end, failed to connect).
    /// Returns the link and id it was, if it was still a stream.
    pub(crate) fn on_stream_closed(
        &mut self,
        ctx: &mut Ctx<'_>,
        conn: ConnKey,
    ) -> Option<(usize, u8)> {
        let (li, id) = self.streams.remove(&conn)?;
        let now = ctx.now();
        if let Some(link) = self.links.get_mut(li) {
            link.session.stream_closed(id, now);
            self.drive(ctx, li);
        }
        Some((li, id))
    }

    /// The stream socket drained: grant credit, and lift the base-mode pause.
    pub(crate) fn on_stream_writable(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey) {
        let Some((li, id)) = self.stream_of(conn) else {
            return;
        };
        let Some(link) = self.links.get_mut(li) else {
            return;
        };
        let queued = ctx.queued(conn).unwrap_or(0);
        link.session.stream_drained(id, queued, || {
            ctx.flush(conn);
            ctx.queued(conn).unwrap_or(0)
        });
        self.drive(ctx, li);
    }

    /// The link drained: streams waiting for it take their turn.
    pub(crate) fn on_link_writable(&mut self, ctx: &mut Ctx<'_>, li: usize) {
        if let Some(link) = self.links.get_mut(li) {
            link.session.link_drained();
            self.drive(ctx, li);
        }
    }

    /// The engine timer of link `li` fired: the session's deadline.
    pub(crate) fn on_timer(&mut self, ctx: &mut Ctx<'_>, li: usize, timer: TimerKey) {
        let now = ctx.now();
        let Some(link) = self.links.get_mut(li) else {
            return;
        };
        if link.timer.map(|(_, t)| t) != Some(timer) {
            return;
        }
        link.timer = None;
        link.session.handle_timeout(now);
        self.drive(ctx, li);
    }
}

/// Queue `parts` on a link, all or nothing. A link whose queue is full has
/// a peer that stopped reading: it is aborted. Returns whether the link
/// took them.
fn send_on_link(ctx: &mut Ctx<'_>, link: ConnKey, parts: &[&[u8]]) -> bool {
    match ctx.send_parts(link, parts) {
        Ok(()) => true,
        Err(SendError::Full) => {
            warn!("{link}: link send queue full (the peer is not reading); closing the link");
            ctx.abort(link);
            false
        }
        Err(SendError::Closed) => false,
    }
}

/// TCP keepalive and `TCP_USER_TIMEOUT` on a link, both modes (all a base
/// link has to notice a dead peer).
pub(crate) fn link_keepalive(ctx: &mut Ctx<'_>, conn: ConnKey, user_timeout: Duration) {
    let keepalive = Keepalive {
        idle: Duration::from_secs(15),
        interval: Duration::from_secs(5),
        user_timeout: Some(user_timeout),
    };
    if let Err(e) = ctx.set_keepalive(conn, keepalive) {
        debug!("{conn}: keepalive: {e}");
    }
}
