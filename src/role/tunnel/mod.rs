//! Tunnel roles: [`TunnelServer`] and [`TunnelAgent`], and the stream
//! multiplexer (`Mux`) they share. The wire protocol is docs/PROTOCOL.md.
//!
//! Invariant: a stream exists on a link as one `Slot` per client id and one
//! entry in `Mux::streams` (socket → link, id); both are removed together, so
//! a socket event for a stream that is gone finds nothing and does nothing.
//! Every byte queued for a stream socket is bounded by the stream's window
//! (credit, or the base-mode rule that pauses the link): `window`, grown on a
//! CREDIT link up to `max_window` from the link's `link_window` budget (see
//! `Mux::grant`); every byte queued for the link by `LINK_HIGH` plus one frame
//! per stream (streams pause above it), and the tables by the 256 ids of a link.

mod agent;
mod auth;
mod server;

pub use agent::{AgentState, Resolver, TunnelAgent};
pub use server::TunnelServer;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hashbrown::HashMap;
use log::{debug, trace, warn};
use slab::Slab;

use crate::codec::Framing;
use crate::codec::tunnel::{self, Command, HEADER_LEN, MAX_PAYLOAD, TunnelFrame, ext};
use crate::engine::{ConnKey, Ctx, Keepalive, LogLimit, SendError, Suppressed, TimerKey};

/// Streams stop reading while the link holds more than this many unsent bytes,
/// and take turns when it drains (one frame each per round). The link's queue
/// bound ([`Settings::link_queue`]) leaves room for every stream's frame above it.
const LINK_HIGH: usize = 64 * 1024;
/// Ids on one link.
const IDS: usize = 256;

/// Counters shared with whoever holds [`TunnelServer::stats`] or
/// [`TunnelAgent::stats`] (relaxed atomics; read from any thread).
#[derive(Debug, Default)]
pub struct TunnelStats {
    /// Links up now (handshake done).
    pub links: AtomicU64,
    /// Streams open now.
    pub streams: AtomicU64,
    /// Streams opened since start.
    pub streams_total: AtomicU64,
    /// Server: clients refused because every id (or `max_streams`) was in use.
    /// Agent: CONNECTs refused (target not allowed, or no local connection).
    pub refused_total: AtomicU64,
    /// Server, base mode: of `refused_total`, clients refused while some ids
    /// were only held by the id quarantine (`id_quarantine`).
    pub quarantine_refused_total: AtomicU64,
    /// Frames with an unknown command (ignored).
    pub unknown_total: AtomicU64,
    /// Frames of a known command that were malformed or out of place (ignored).
    pub malformed_total: AtomicU64,
    /// Frames for an id with no open stream (dropped).
    pub stale_total: AtomicU64,
    /// Streams closed because the peer sent DATA beyond its credit.
    pub credit_violations_total: AtomicU64,
    /// Base mode: streams closed for keeping the link paused `stall_timeout`.
    pub stalled_total: AtomicU64,
    /// Handshakes refused (unknown service, token required, malformed).
    pub rejected_total: AtomicU64,
    /// AUTH failures (server: wrong tag; agent: the server's tag was wrong).
    pub auth_failed_total: AtomicU64,
    /// Links that came up (server: handshakes completed; agent: links established).
    pub links_total: AtomicU64,
    /// Agent: links lost (each is followed by a reconnect).
    pub reconnects_total: AtomicU64,
    /// Server: links closed on accept because their address failed too many
    /// handshakes lately.
    pub throttled_total: AtomicU64,
    /// Server: links closed on accept because their address had
    /// `max_pending_per_ip` handshakes in progress.
    pub pending_refused_total: AtomicU64,
    /// Server: handshakes closed to make room when `max_pending` were in progress.
    pub pending_evicted_total: AtomicU64,
    /// Agent: links dropped because the server did not finish the handshake
    /// within `handshake_timeout`.
    pub handshake_timeouts_total: AtomicU64,
    /// Stream payload bytes received from the link and queued for sockets.
    pub bytes_from_link_total: AtomicU64,
    /// Stream payload bytes read from sockets and sent on the link.
    pub bytes_to_link_total: AtomicU64,
    /// CREDIT links: receive-window bytes granted above `window` now, summed
    /// over open streams (auto-tuning; at most `link_window` per link).
    pub window_grown_bytes: AtomicU64,
    /// CREDIT links: times a stream's receive window grew.
    pub window_grown_total: AtomicU64,
    /// Server: services and their public addresses; agent: state and last error.
    pub(crate) status: Mutex<Status>,
}

/// What [`TunnelStats::service`] and [`TunnelStats::agent`] report.
#[derive(Debug, Default, Clone)]
pub(crate) struct Status {
    /// Server: (service name, bound public address while linked, agent address).
    pub(crate) services: Vec<(String, Option<SocketAddr>, Option<SocketAddr>)>,
    /// Agent: where the link is, and why it last went down.
    pub(crate) agent: Option<(AgentState, String, u16)>,
}

impl TunnelStats {
    /// The bound public address of `service` while an agent is linked to it.
    pub fn public_addr(&self, service: &str) -> Option<SocketAddr> {
        let st = self.status.lock().ok()?;
        st.services
            .iter()
            .rev()
            .find(|(n, _, _)| n == service)
            .and_then(|(_, a, _)| *a)
    }

    /// The address of the agent linked to `service`.
    pub fn agent_addr(&self, service: &str) -> Option<SocketAddr> {
        let st = self.status.lock().ok()?;
        st.services
            .iter()
            .rev()
            .find(|(n, _, _)| n == service)
            .and_then(|(_, _, a)| *a)
    }

    /// Counters and totals as metric samples and status fields.
    pub(crate) fn report(&self, out: &mut crate::role::Report) {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        out.num("streams_total", load(&self.streams_total));
        out.num("refused_total", load(&self.refused_total));
        out.num(
            "quarantine_refused_total",
            load(&self.quarantine_refused_total),
        );
        out.num("rejected_total", load(&self.rejected_total));
        out.num("auth_failed_total", load(&self.auth_failed_total));
        out.num("unknown_frames_total", load(&self.unknown_total));
        out.num("malformed_frames_total", load(&self.malformed_total));
        out.num("bytes_from_link_total", load(&self.bytes_from_link_total));
        out.num("bytes_to_link_total", load(&self.bytes_to_link_total));
        out.num("window_grown_bytes", load(&self.window_grown_bytes));
        out.num("window_grown_total", load(&self.window_grown_total));
        out.gauge(
            "switchboard_tunnel_window_grown_bytes",
            "Receive-window bytes granted above `window` now (auto-tuning).",
            &[],
            load(&self.window_grown_bytes),
        );
        let counters = [
            (
                "switchboard_tunnel_streams_opened_total",
                "Streams opened.",
                &self.streams_total,
            ),
            (
                "switchboard_tunnel_refused_streams_total",
                "Streams refused (ids exhausted, target not allowed).",
                &self.refused_total,
            ),
            (
                "switchboard_tunnel_quarantine_refused_streams_total",
                "Clients refused while ids were held by the base-mode id quarantine.",
                &self.quarantine_refused_total,
            ),
            (
                "switchboard_tunnel_links_total",
                "Links that completed their handshake.",
                &self.links_total,
            ),
            (
                "switchboard_tunnel_rejected_links_total",
                "Handshakes refused.",
                &self.rejected_total,
            ),
            (
                "switchboard_tunnel_auth_failures_total",
                "Authentication failures.",
                &self.auth_failed_total,
            ),
            (
                "switchboard_tunnel_unknown_frames_total",
                "Frames with an unknown command (ignored).",
                &self.unknown_total,
            ),
            (
                "switchboard_tunnel_malformed_frames_total",
                "Malformed or out-of-place frames (ignored).",
                &self.malformed_total,
            ),
            (
                "switchboard_tunnel_stale_frames_total",
                "Frames for ids without a stream (dropped).",
                &self.stale_total,
            ),
            (
                "switchboard_tunnel_reconnects_total",
                "Agent links lost and redialled.",
                &self.reconnects_total,
            ),
            (
                "switchboard_tunnel_throttled_links_total",
                "Links closed on accept: their address failed too many handshakes.",
                &self.throttled_total,
            ),
            (
                "switchboard_tunnel_pending_refused_total",
                "Links closed on accept: max_pending_per_ip handshakes from their address.",
                &self.pending_refused_total,
            ),
            (
                "switchboard_tunnel_pending_evicted_total",
                "Handshakes closed to make room (max_pending reached).",
                &self.pending_evicted_total,
            ),
            (
                "switchboard_tunnel_received_bytes_total",
                "Stream bytes received from the link.",
                &self.bytes_from_link_total,
            ),
            (
                "switchboard_tunnel_sent_bytes_total",
                "Stream bytes sent on the link.",
                &self.bytes_to_link_total,
            ),
            (
                "switchboard_tunnel_window_grown_total",
                "Times a stream's receive window grew (auto-tuning).",
                &self.window_grown_total,
            ),
        ];
        for (name, help, c) in counters {
            out.counter(name, help, &[], load(c));
        }
    }

    /// Agent: its state, the last error, and the extension bits in force.
    pub fn agent(&self) -> Option<(AgentState, String, u16)> {
        self.status.lock().ok()?.agent.clone()
    }
}

pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn add(c: &AtomicU64, n: usize) {
    c.fetch_add(n as u64, Ordering::Relaxed);
}

fn drop_one(c: &AtomicU64) {
    c.fetch_sub(1, Ordering::Relaxed);
}

fn sub(c: &AtomicU64, n: u64) {
    c.fetch_sub(n, Ordering::Relaxed);
}

/// Per-role stream settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    /// Our receive window per stream (credit we grant; base-mode queue bound).
    pub(crate) window: u32,
    /// CREDIT links: the most a stream's receive window grows to.
    pub(crate) max_window: u32,
    /// CREDIT links: the most growth above `window` a link's streams hold together.
    pub(crate) link_window: u32,
    /// Largest DATA payload we send.
    pub(crate) max_data: usize,
    /// Streams at once per link.
    pub(crate) max_streams: usize,
    /// Base mode: close a stream that keeps the link paused this long.
    pub(crate) stall_timeout: Duration,
    /// Server, base mode: ids it closed stay unused this long.
    pub(crate) quarantine: Option<Duration>,
}

impl Settings {
    /// The send-queue bound of a link: `LINK_HIGH`, plus one DATA frame from
    /// every stream (each may send one before it sees the link is full, and
    /// all resume together when it drains), plus room for control frames
    /// (WINDOW, CLOSE, SHUTDOWN, PONG) for every stream.
    pub(crate) fn link_queue(&self) -> usize {
        LINK_HIGH + self.max_streams * (self.max_data + HEADER_LEN + 64) + 4096
    }

    /// The send-queue bound of a stream socket: the largest window (a grown
    /// one on a CREDIT link), plus one frame the base-mode rule lets through
    /// before it pauses the link. Base mode still pauses at `window`.
    pub(crate) fn stream_queue(&self) -> usize {
        self.window.max(self.max_window) as usize + MAX_PAYLOAD + HEADER_LEN
    }
}

/// One client id on a link.
#[derive(Debug)]
pub(crate) enum Slot {
    Free,
    Open(Stream),
    /// Our CLOSE went out: waiting for the peer's CLOSE (`until` = None,
    /// CLOSE_ACK) or quarantined until `until` (server, base mode).
    Closing {
        until: Option<Instant>,
    },
}

#[derive(Debug)]
pub(crate) struct Stream {
    pub(crate) conn: ConnKey,
    /// Bytes we may still send (u64::MAX without CREDIT).
    credit: u64,
    /// Credit granted to the peer so far, and payload received.
    granted: u64,
    received: u64,
    /// Our receive window: `window`, grown on a CREDIT link (`Mux::grant`).
    window: u32,
    /// Current framing chunk of the socket (≤ max_data, ≤ credit).
    chunk: usize,
    paused_credit: bool,
    paused_link: bool,
    /// Base rule: this stream's socket is over `window`; the link is paused.
    blocking: bool,
    sent_eof: bool,
    recv_eof: bool,
}

/// A link and its streams; `X` is what the role keeps per link.
pub(crate) struct Link<X> {
    pub(crate) conn: ConnKey,
    /// Extension bits in force (0: base protocol).
    pub(crate) flags: u16,
    /// Streams may be opened (handshake done).
    pub(crate) up: bool,
    /// Initial credit for our DATA on each stream (the peer's window).
    peer_window: u32,
    /// 256 slots once up; empty before.
    slots: Vec<Slot>,
    open: usize,
    /// Window growth its streams hold (the sum of their windows above
    /// `window`; at most `link_window`).
    grown: u64,
    waiting: VecDeque<u8>,
    blocking: usize,
    next_id: u8,
    pub(crate) heartbeat: Option<TimerKey>,
    pub(crate) since: Instant,
    pub(crate) extra: X,
}

impl<X> Link<X> {
    pub(crate) fn has(&self, bit: u16) -> bool {
        self.flags & bit != 0
    }

    fn slot_mut(&mut self, id: u8) -> Option<&mut Slot> {
        self.slots.get_mut(usize::from(id))
    }

    fn stream_mut(&mut self, id: u8) -> Option<&mut Stream> {
        open_mut(&mut self.slots, id)
    }

    /// What an id becomes once our CLOSE for it is sent: held until the
    /// peer's CLOSE (CLOSE_ACK), quarantined (server, base), or free.
    fn closed_slot(&self, quarantine: Option<Duration>, now: Instant) -> Slot {
        if self.has(ext::CLOSE_ACK) {
            Slot::Closing { until: None }
        } else if let Some(q) = quarantine {
            Slot::Closing {
                until: Some(now + q),
            }
        } else {
            Slot::Free
        }
    }

    /// Streams open now.
    pub(crate) fn open_streams(&self) -> usize {
        self.open
    }
}

/// The multiplexer: links, their streams, and the stream sockets' owners.
pub(crate) struct Mux<X> {
    pub(crate) settings: Settings,
    pub(crate) links: Slab<Link<X>>,
    /// Stream socket → (link index, client id).
    streams: HashMap<ConnKey, (usize, u8)>,
    pub(crate) stats: std::sync::Arc<TunnelStats>,
    /// A stream the peer broke (credit, overflow): one line a second.
    warn_stream: LogLimit,
}

/// Queue one frame on a link, all or nothing. A frame that does not fit means
/// the peer has stopped reading the link: the link is closed (returns false).
pub(crate) fn send_frame(
    ctx: &mut Ctx<'_>,
    link: ConnKey,
    command: Command,
    id: u8,
    payload: &[u8],
) -> bool {
    let Some(head) = tunnel::header(command, id, payload.len()) else {
        return false;
    };
    match ctx.send_parts(link, &[&head, payload]) {
        Ok(()) => true,
        Err(SendError::Full) => {
            warn!("{link}: link send queue full (the peer is not reading); closing the link");
            ctx.abort(link);
            false
        }
        Err(SendError::Closed) => false,
    }
}

impl<X> Mux<X> {
    pub(crate) fn new(settings: Settings, stats: std::sync::Arc<TunnelStats>) -> Mux<X> {
        Mux {
            settings,
            links: Slab::new(),
            streams: HashMap::new(),
            stats,
            warn_stream: LogLimit::default(),
        }
    }

    pub(crate) fn add_link(&mut self, conn: ConnKey, now: Instant, extra: X) -> usize {
        self.links.insert(Link {
            conn,
            flags: 0,
            up: false,
            peer_window: 0,
            slots: Vec::new(),
            open: 0,
            grown: 0,
            waiting: VecDeque::new(),
            blocking: 0,
            next_id: 0,
            heartbeat: None,
            since: now,
            extra,
        })
    }

    /// The handshake is done: streams may open.
    pub(crate) fn link_up(&mut self, li: usize, flags: u16, peer_window: u32, now: Instant) {
        if let Some(link) = self.links.get_mut(li) {
            link.flags = flags;
            link.peer_window = peer_window;
            link.up = true;
            link.since = now;
            link.slots = (0..IDS).map(|_| Slot::Free).collect();
            link.waiting = VecDeque::with_capacity(IDS);
            bump(&self.stats.links);
            bump(&self.stats.links_total);
        }
    }

    /// Forget a link, resetting every stream socket it carried: a stream
    /// that ends with its link is cut short, and its client must see a reset
    /// (`ECONNRESET`), not the FIN of a complete transfer.
    pub(crate) fn remove_link(&mut self, ctx: &mut Ctx<'_>, li: usize) -> Option<Link<X>> {
        let link = self.links.try_remove(li)?;
        if let Some(t) = link.heartbeat {
            ctx.cancel_timer(t);
        }
        for slot in &link.slots {
            if let Slot::Open(s) = slot {
                self.streams.remove(&s.conn);
                ctx.reset(s.conn);
                drop_one(&self.stats.streams);
            }
        }
        if link.up {
            drop_one(&self.stats.links);
        }
        sub(&self.stats.window_grown_bytes, link.grown);
        if link.open > 0 {
            debug!("{}: link down, closed {} streams", link.conn, link.open);
        }
        Some(link)
    }

    /// The link and id of a stream socket.
    pub(crate) fn stream_of(&self, conn: ConnKey) -> Option<(usize, u8)> {
        self.streams.get(&conn).copied()
    }

    /// Server: the next free id after the last one given, if `max_streams`
    /// allows another stream. Quarantined ids whose time has passed are free.
    pub(crate) fn alloc_id(&mut self, li: usize, now: Instant) -> Option<u8> {
        let max = self.settings.max_streams;
        let link = self.links.get_mut(li)?;
        if !link.up || link.open >= max {
            return None;
        }
        let start = link.next_id;
        for k in 0..IDS {
            let id = start.wrapping_add(k as u8);
            let free = match link.slot_mut(id) {
                Some(Slot::Free) => true,
                Some(Slot::Closing { until: Some(t) }) => *t <= now,
                _ => false,
            };
            if free {
                link.next_id = id.wrapping_add(1);
                return Some(id);
            }
        }
        None
    }

    /// Why [`Mux::alloc_id`] found no id: the link's ids (of [`IDS`]) that
    /// are open, quarantined (server, base) and waiting for the peer's CLOSE
    /// (CLOSE_ACK) at `now`.
    pub(crate) fn ids_taken(&self, li: usize, now: Instant) -> (usize, usize, usize) {
        let (mut open, mut quarantined, mut closing) = (0, 0, 0);
        for slot in self.links.get(li).map_or(&[][..], |l| &l.slots[..]) {
            match slot {
                Slot::Open(_) => open += 1,
                Slot::Closing { until: Some(t) } if *t > now => quarantined += 1,
                Slot::Closing { until: None } => closing += 1,
                _ => {}
            }
        }
        (open, quarantined, closing)
    }

    /// Whether `id` can take a new stream now (agent: a CONNECT's id).
    pub(crate) fn id_state(&self, li: usize, id: u8) -> Option<&Slot> {
        self.links.get(li)?.slots.get(usize::from(id))
    }

    /// A CONNECT we answer with CLOSE at once: with CLOSE_ACK the id stays
    /// taken until the server's CLOSE comes back.
    pub(crate) fn refuse_id(&mut self, li: usize, id: u8, now: Instant) {
        let quarantine = self.settings.quarantine;
        if let Some(link) = self.links.get_mut(li) {
            let next = link.closed_slot(quarantine, now);
            if let Some(slot) = link.slot_mut(id) {
                *slot = next;
            }
        }
    }

    /// Register `conn` as stream `id` of link `li`.
    pub(crate) fn open_stream(&mut self, ctx: &mut Ctx<'_>, li: usize, id: u8, conn: ConnKey) {
        let settings = self.settings;
        let Some(link) = self.links.get_mut(li) else {
            ctx.abort(conn);
            return;
        };
        let credit = if link.has(ext::CREDIT) {
            u64::from(link.peer_window)
        } else {
            u64::MAX
        };
        let chunk = credit.min(settings.max_data as u64) as usize;
        let Some(slot) = link.slot_mut(id) else {
            ctx.abort(conn);
            return;
        };
        *slot = Slot::Open(Stream {
            conn,
            credit,
            granted: u64::from(settings.window),
            received: 0,
            window: settings.window,
            chunk,
            paused_credit: credit == 0,
            paused_link: false,
            blocking: false,
            sent_eof: false,
            recv_eof: false,
        });
        link.open += 1;
        self.streams.insert(conn, (li, id));
        bump(&self.stats.streams);
        bump(&self.stats.streams_total);
        if chunk != settings.max_data {
            ctx.set_framing(conn, Framing::Chunk { max: chunk.max(1) });
        }
        if credit == 0 {
            ctx.pause_reading(conn);
        }
    }

    /// Bytes read from a stream socket (at most one chunk): one DATA frame.
    pub(crate) fn on_stream_data(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey, data: &[u8]) {
        let Some((li, id)) = self.stream_of(conn) else {
            return;
        };
        let Some(link) = self.links.get_mut(li) else {
            return;
        };
        if !send_frame(ctx, link.conn, Command::Data, id, data) {
            return;
        }
        trace!("{conn}: {} bytes to the link as id {id}", data.len());
        add(&self.stats.bytes_to_link_total, data.len());
        let link_conn = link.conn;
        let over = ctx.queued(link_conn).unwrap_or(0) > LINK_HIGH;
        let credit_on = link.has(ext::CREDIT);
        let max_data = self.settings.max_data;
        let Some(s) = open_mut(&mut link.slots, id) else {
            return;
        };
        if credit_on {
            s.credit = s.credit.saturating_sub(data.len() as u64);
            if s.credit == 0 {
                s.paused_credit = true;
            } else if (s.credit as usize) < s.chunk {
                s.chunk = (s.credit as usize).min(max_data);
                ctx.set_framing(conn, Framing::Chunk { max: s.chunk });
            }
        }
        if over && !s.paused_link {
            s.paused_link = true;
            link.waiting.push_back(id);
            ctx.notify_writable(link_conn);
        }
        update_reading(ctx, s);
    }

    /// A stream socket read EOF.
    pub(crate) fn on_stream_eof(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey) {
        let Some((li, id)) = self.stream_of(conn) else {
            ctx.close(conn);
            return;
        };
        let Some(link) = self.links.get_mut(li) else {
            return;
        };
        if !link.has(ext::HALF_CLOSE) {
            ctx.close(conn);
            return;
        }
        let link_conn = link.conn;
        let Some(s) = link.stream_mut(id) else { return };
        if !s.sent_eof {
            s.sent_eof = true;
            let done = s.recv_eof;
            debug!("{conn}: EOF, SHUTDOWN id {id}");
            if send_frame(ctx, link_conn, Command::Shutdown, id, &[]) && done {
                ctx.close(conn);
            }
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
        self.local_close(ctx, li, id);
        Some((li, id))
    }

    /// The stream socket drained: grant credit, and lift the base-mode pause.
    pub(crate) fn on_stream_writable(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey) {
        let Some((li, id)) = self.stream_of(conn) else {
            return;
        };
        self.grant(ctx, li, id);
        let Some(link) = self.links.get_mut(li) else {
            return;
        };
        let Some(s) = open_mut(&mut link.slots, id) else {
            return;
        };
        if s.blocking {
            s.blocking = false;
            unblock(ctx, link, conn);
        }
    }

    /// The link drained: streams waiting for it take their turn.
    pub(crate) fn on_link_writable(&mut self, ctx: &mut Ctx<'_>, li: usize) {
        let Some(link) = self.links.get_mut(li) else {
            return;
        };
        let waiting = std::mem::take(&mut link.waiting);
        let mut waiting = waiting;
        while let Some(id) = waiting.pop_front() {
            if let Some(s) = link.stream_mut(id)
                && s.paused_link
            {
                s.paused_link = false;
                update_reading(ctx, s);
            }
        }
        // Keep the (empty) allocation for the next round.
        link.waiting = waiting;
    }

    /// A stream frame from the link: DATA, CLOSE, WINDOW, SHUTDOWN, PING, PONG
    /// or anything unknown. Connection set-up commands are the role's.
    pub(crate) fn on_link_frame(&mut self, ctx: &mut Ctx<'_>, li: usize, f: TunnelFrame<'_>) {
        match f.command {
            Command::Data => self.link_data(ctx, li, f.id, f.payload),
            Command::Close => self.remote_close(ctx, li, f.id),
            Command::Window => self.window(ctx, li, f.id, f.payload),
            Command::Shutdown => self.remote_shutdown(ctx, li, f.id),
            Command::Ping => {
                if let Some(link) = self.links.get(li)
                    && f.payload.len() == tunnel::PING_LEN
                {
                    send_frame(ctx, link.conn, Command::Pong, 0, f.payload);
                } else {
                    bump(&self.stats.malformed_total);
                }
            }
            Command::Pong => {}
            Command::Unknown(c) => {
                bump(&self.stats.unknown_total);
                debug!("link {li}: unknown command {c} ignored");
            }
            other => {
                bump(&self.stats.malformed_total);
                debug!("link {li}: {other:?} out of place; ignored");
            }
        }
    }

    fn link_data(&mut self, ctx: &mut Ctx<'_>, li: usize, id: u8, payload: &[u8]) {
        let stall = self.settings.stall_timeout;
        let Some(link) = self.links.get_mut(li) else {
            return;
        };
        let credit_on = link.has(ext::CREDIT);
        let link_conn = link.conn;
        let Some(s) = open_mut(&mut link.slots, id) else {
            bump(&self.stats.stale_total);
            return;
        };
        if payload.is_empty() {
            bump(&self.stats.malformed_total);
            return;
        }
        let len = payload.len() as u64;
        if credit_on && s.received + len > s.granted {
            if let Some(n) = self.warn_stream.check(ctx.now()) {
                warn!(
                    "{link_conn}: stream {id} sent {len} bytes beyond its credit; closing the stream{}",
                    Suppressed(n)
                );
            }
            bump(&self.stats.credit_violations_total);
            let conn = s.conn;
            ctx.abort(conn);
            self.on_stream_closed(ctx, conn);
            return;
        }
        let conn = s.conn;
        match ctx.send(conn, payload) {
            Ok(()) => {
                s.received += len;
                add(&self.stats.bytes_from_link_total, payload.len());
                let queued = ctx.queued(conn).unwrap_or(0);
                if queued > s.window as usize && !s.blocking {
                    // Base rule (docs/PROTOCOL.md §2): pause the link until this socket drains.
                    debug!("{conn}: {queued} bytes queued for stream {id}; pausing the link");
                    s.blocking = true;
                    link.blocking += 1;
                    ctx.pause_reading(link_conn);
                    ctx.set_stall_timeout(conn, Some(stall));
                }
                ctx.notify_writable(conn);
                if credit_on {
                    self.grant(ctx, li, id);
                }
            }
            Err(SendError::Full) => {
                if let Some(n) = self.warn_stream.check(ctx.now()) {
                    warn!(
                        "{conn}: stream {id} queue overflow; closing the stream{}",
                        Suppressed(n)
                    );
                }
                ctx.abort(conn);
                self.on_stream_closed(ctx, conn);
            }
            Err(SendError::Closed) => bump(&self.stats.stale_total),
        }
    }

    /// Send WINDOW for what the stream's socket has written, once at least
    /// half a window is owed.
    ///
    /// Auto-tuning (docs/PROTOCOL.md §4.4): when DATA leaves the peer with
    /// less than an eighth of the window as credit, the window is what holds
    /// the stream back, unless our own socket is. The socket's queue is
    /// written at once to find out: if it takes everything (we are not the
    /// bottleneck), the window doubles, up to `max_window` and as far as the
    /// link's `link_window` budget allows; otherwise it stays. Only a call
    /// that finds bytes queued can grow the window (one from `link_data`): a
    /// queue that drained later (`on_stream_writable`) says nothing about the
    /// window.
    fn grant(&mut self, ctx: &mut Ctx<'_>, li: usize, id: u8) {
        let settings = self.settings;
        let Some(link) = self.links.get_mut(li) else {
            return;
        };
        if !link.has(ext::CREDIT) {
            return;
        }
        let link_conn = link.conn;
        let Some(s) = open_mut(&mut link.slots, id) else {
            return;
        };
        let mut window = u64::from(s.window);
        let mut queued = ctx.queued(s.conn).unwrap_or(0) as u64;
        let starved = s.granted.saturating_sub(s.received) < window / 8;
        // Doubling, capped by `max_window` and by what the link has left.
        let step = window
            .min(u64::from(settings.max_window).saturating_sub(window))
            .min(u64::from(settings.link_window).saturating_sub(link.grown));
        if starved && queued > 0 && step > 0 {
            ctx.flush(s.conn);
            queued = ctx.queued(s.conn).unwrap_or(0) as u64;
            if queued == 0 {
                window += step;
                s.window = window as u32;
                link.grown += step;
                add(&self.stats.window_grown_bytes, step as usize);
                bump(&self.stats.window_grown_total);
                trace!("{}: stream {id} window {window}", s.conn);
            }
        }
        let written = s.received.saturating_sub(queued);
        let target = written + window;
        let owed = target.saturating_sub(s.granted);
        if owed >= window / 2 {
            let Ok(inc) = u32::try_from(owed) else { return };
            s.granted = target;
            send_frame(ctx, link_conn, Command::Window, id, &inc.to_be_bytes());
        }
    }

    fn window(&mut self, ctx: &mut Ctx<'_>, li: usize, id: u8, payload: &[u8]) {
        let max_data = self.settings.max_data;
        let Some(link) = self.links.get_mut(li) else {
            return;
        };
        let link_conn = link.conn;
        if !link.has(ext::CREDIT) {
            bump(&self.stats.malformed_total);
            return;
        }
        let Some(inc) = tunnel::parse_window(payload) else {
            bump(&self.stats.malformed_total);
            return;
        };
        let Some(s) = link.stream_mut(id) else {
            bump(&self.stats.stale_total);
            return;
        };
        s.credit = s.credit.saturating_add(u64::from(inc));
        if s.credit > u64::from(u32::MAX) {
            warn!("{link_conn}: credit for stream {id} above 2^32 - 1; closing the link");
            ctx.abort(link_conn);
            return;
        }
        let chunk = (s.credit as usize).min(max_data);
        if chunk != s.chunk {
            s.chunk = chunk;
            ctx.set_framing(s.conn, Framing::Chunk { max: chunk });
        }
        s.paused_credit = false;
        update_reading(ctx, s);
    }

    fn remote_shutdown(&mut self, ctx: &mut Ctx<'_>, li: usize, id: u8) {
        let Some(link) = self.links.get_mut(li) else {
            return;
        };
        if !link.has(ext::HALF_CLOSE) {
            bump(&self.stats.malformed_total);
            return;
        }
        let Some(s) = link.stream_mut(id) else {
            bump(&self.stats.stale_total);
            return;
        };
        if !s.recv_eof {
            s.recv_eof = true;
            ctx.shutdown_write(s.conn);
            if s.sent_eof {
                ctx.close(s.conn);
            }
        }
    }

    /// The peer's CLOSE: close our socket; answer it (CLOSE_ACK) unless it
    /// answers ours.
    fn remote_close(&mut self, ctx: &mut Ctx<'_>, li: usize, id: u8) {
        let Some(link) = self.links.get_mut(li) else {
            return;
        };
        let ack = link.has(ext::CLOSE_ACK);
        let link_conn = link.conn;
        let Some(slot) = link.slot_mut(id) else {
            bump(&self.stats.stale_total);
            return;
        };
        match std::mem::replace(slot, Slot::Free) {
            Slot::Open(s) => {
                debug!("{}: CLOSE for id {id} from the peer", s.conn);
                self.streams.remove(&s.conn);
                ctx.close(s.conn);
                drop_one(&self.stats.streams);
                link.open -= 1;
                release_window(link, &s, self.settings.window, &self.stats);
                if s.blocking {
                    unblock(ctx, link, s.conn);
                }
                if ack {
                    send_frame(ctx, link_conn, Command::Close, id, &[]);
                }
            }
            Slot::Closing { .. } => {}
            Slot::Free => bump(&self.stats.stale_total),
        }
    }

    /// Our side of stream `id` is gone: tell the peer, and hold the id until
    /// the peer's CLOSE (CLOSE_ACK) or for the quarantine (server, base).
    fn local_close(&mut self, ctx: &mut Ctx<'_>, li: usize, id: u8) {
        let now = ctx.now();
        let quarantine = self.settings.quarantine;
        let Some(link) = self.links.get_mut(li) else {
            return;
        };
        let next = link.closed_slot(quarantine, now);
        let link_conn = link.conn;
        let Some(slot) = link.slot_mut(id) else {
            return;
        };
        if let Slot::Open(s) = std::mem::replace(slot, next) {
            ctx.close(s.conn);
            drop_one(&self.stats.streams);
            link.open -= 1;
            release_window(link, &s, self.settings.window, &self.stats);
            if s.blocking {
                unblock(ctx, link, s.conn);
            }
            debug!("{}: stream {id} closed; CLOSE to the peer", s.conn);
            send_frame(ctx, link_conn, Command::Close, id, &[]);
        }
    }

    /// Stream count and open ids of a link, for status output.
    pub(crate) fn link_streams(&self, li: usize) -> usize {
        self.links.get(li).map_or(0, |l| l.open)
    }
}

/// The open stream `id` in `slots` (a free function, so that the caller can
/// still use the link's other fields).
fn open_mut(slots: &mut [Slot], id: u8) -> Option<&mut Stream> {
    match slots.get_mut(usize::from(id)) {
        Some(Slot::Open(s)) => Some(s),
        _ => None,
    }
}

fn unblock<X>(ctx: &mut Ctx<'_>, link: &mut Link<X>, conn: ConnKey) {
    ctx.set_stall_timeout(conn, None);
    link.blocking = link.blocking.saturating_sub(1);
    if link.blocking == 0 {
        ctx.resume_reading(link.conn);
    }
}

/// A closed stream's window growth goes back to its link's budget.
fn release_window<X>(link: &mut Link<X>, s: &Stream, window: u32, stats: &TunnelStats) {
    let grown = u64::from(s.window.saturating_sub(window));
    link.grown = link.grown.saturating_sub(grown);
    sub(&stats.window_grown_bytes, grown);
}

fn update_reading(ctx: &mut Ctx<'_>, s: &Stream) {
    if s.paused_credit || s.paused_link {
        ctx.pause_reading(s.conn);
    } else {
        ctx.resume_reading(s.conn);
    }
}

/// Timer tokens: a kind in the top byte, a link index below.
pub(crate) mod token {
    pub(crate) const HANDSHAKE: u64 = 1 << 56;
    pub(crate) const HEARTBEAT: u64 = 2 << 56;
    pub(crate) const RECONNECT: u64 = 3 << 56;

    pub(crate) fn split(token: u64) -> (u64, usize) {
        (token & (0xff << 56), (token & 0xffff_ffff) as usize)
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

/// Send a PING on an extended link and schedule the next one.
pub(crate) fn heartbeat<X>(ctx: &mut Ctx<'_>, link: &mut Link<X>, li: usize, interval: Duration) {
    let payload = (ctx.now() - link.since).as_millis() as u64;
    send_frame(ctx, link.conn, Command::Ping, 0, &payload.to_be_bytes());
    let at = ctx.now() + interval;
    link.heartbeat = Some(ctx.set_timer(at, token::HEARTBEAT | li as u64));
}
