//! The router role: field devices dial in, are identified (by the id they send
//! first, or by their source address) and are bridged to their connection
//! point (connpt): applications attached to its `listen` port, or an upstream
//! it dials.
//!
//! Invariant: identification happens in the loop, per read, with the bytes kept
//! in a small per-connection buffer bounded by `id_max_len` plus the delimiter;
//! every byte after the id — same read or later — goes to the connpt, none is
//! lost. Ids live in a hashbrown map (O(1)), and every table is bounded by the
//! config (connpts, pending connections in total and per address, applications
//! per connpt, recent unknown ids). An identified idle device costs its engine
//! connection plus one small table entry.

use std::any::Any;
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hashbrown::HashMap;
use log::{debug, error, info, warn};

use crate::codec::Frame;
use crate::config::{ConnptConfig, Duplicate, Identity, Offline, RouterConfig};
use crate::engine::{
    CloseReason, ConnKey, ConnectOptions, Ctx, EngineError, ListenOptions, ListenerId, LogLimit,
    SendError, Suppressed, TimerKey, View,
};
use crate::metrics::{CounterValue, add, bump, sub};
use crate::proto::router::{Id, IdTable, Identifying, Outcome, Rules, is_heartbeat, strip_id};
use crate::role::admission::{Admit, PER_IP_GRACE, Pending as Admission, PendingId};
use crate::role::{Reconfigure, Report, Role};

/// Connection timers: a pending device's identification deadline, and
/// an identified device's keepalive. (The one role timer, a connpt's redial,
/// carries the connpt's index.)
const TIMER_PENDING: u64 = 0;
const TIMER_KEEPALIVE: u64 = 1;

/// An id as people see it, in logs and in the status report: its first 32
/// bytes, as text when they are printable ASCII, else as `hex:` and hex
/// digits — the form the config file takes — with `…` after a longer id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShownId {
    /// Whether `value` is the id's own text (else `hex:` and its bytes).
    pub text: bool,
    /// The text, or `hex:` and the hex digits.
    pub value: String,
}

impl ShownId {
    fn new(bytes: &[u8]) -> Self {
        let shown = bytes.get(..bytes.len().min(32)).unwrap_or_default();
        let more = if bytes.len() > shown.len() { "…" } else { "" };
        // Text that starts like the config's hex form is shown in hex too.
        let text =
            shown.iter().all(|b| b.is_ascii_graphic() || *b == b' ') && !shown.starts_with(b"hex:");
        let value = if text {
            format!("{}{more}", String::from_utf8_lossy(shown))
        } else {
            let hex: String = shown.iter().map(|b| format!("{b:02x}")).collect();
            format!("hex:{hex}{more}")
        };
        ShownId { text, value }
    }

    /// The status report's `id` field.
    fn write(&self, out: &mut Report) {
        out.str("id", &self.value);
    }

    /// The status report's `id` field for `bytes`, without building a
    /// `ShownId` when the id is short printable text (the common case).
    fn write_id(bytes: &[u8], out: &mut Report) {
        let plain = bytes.len() <= 32
            && bytes.iter().all(|b| b.is_ascii_graphic() || *b == b' ')
            && !bytes.starts_with(b"hex:");
        match std::str::from_utf8(bytes) {
            Ok(text) if plain => out.str("id", text),
            _ => ShownId::new(bytes).write(out),
        }
    }
}

/// Quoted text (so spaces show) or `hex:..`: how logs show an id.
impl std::fmt::Display for ShownId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.text {
            write!(f, "{:?}", self.value)
        } else {
            f.write_str(&self.value)
        }
    }
}

fn preview(bytes: &[u8]) -> String {
    ShownId::new(bytes).to_string()
}

crate::counters! {
    /// Counters of one router, readable from any thread ([`Router::stats`]).
    #[derive(Debug, Default)]
    pub struct RouterStats {
        /// Devices online now.
        pub online: AtomicU64 = gauge {
            status: "online",
            metric: "switchboard_router_online_devices",
            help: "Devices identified and online now.",
        },
        /// Identifications since start.
        pub identified_total: AtomicU64 = counter {
            metric: "switchboard_router_identified_total",
            help: "Identifications.",
        },
        /// Connections closed for an unknown id (or address).
        pub unknown_total: AtomicU64 = counter {
            metric: "switchboard_router_unknown_total",
            help: "Connections closed for an unknown id.",
        },
        /// Connections closed for not identifying within `id_timeout`.
        pub id_timeouts: AtomicU64 = counter {
            metric: "switchboard_router_id_timeouts_total",
            help: "Connections closed for not identifying in time.",
        },
        /// Online devices replaced by a new connection with the same id.
        pub replaced: AtomicU64 = counter {
            metric: "switchboard_router_replaced_total",
            help: "Devices replaced by a newer connection.",
        },
        /// New connections rejected because their id was online.
        pub rejected: AtomicU64 = counter,
        /// Heartbeat reads (not forwarded).
        pub heartbeats: AtomicU64 = counter,
        /// Application bytes discarded because the device was offline.
        pub offline_discarded_bytes: AtomicU64 = counter,
        /// Device bytes discarded because nothing was attached to the connpt.
        pub unrouted_bytes: AtomicU64 = counter,
        /// Connections refused (max_pending_per_ip, max_apps, offline = close).
        pub refused: AtomicU64 = counter {
            metric: "switchboard_router_refused_total",
            help: "Connections refused by a limit.",
        },
        /// Unidentified connections closed to make room for a new one
        /// (`max_pending` reached: the oldest goes).
        pub pending_evicted: AtomicU64 = counter {
            metric: "switchboard_router_pending_evicted_total",
            help: "Unidentified connections closed to make room (max_pending reached).",
        },
        recent: Mutex<VecDeque<(ShownId, SocketAddr)>>,
    }
}

impl RouterStats {
    /// The most recent unknown ids and their peers, oldest first.
    pub fn recent_unknown(&self) -> Vec<(ShownId, SocketAddr)> {
        self.recent
            .lock()
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// What one connection of this role is.
#[derive(Debug)]
enum Party {
    /// A device that has not identified yet.
    Pending(Box<Pending>),
    /// The identified device of connpt `.0`.
    Device(u32),
    /// An application attached to connpt `.0`.
    App(u32),
    /// The upstream connection of connpt `.0`.
    Upstream(u32),
}

#[derive(Debug)]
struct Pending {
    peer: SocketAddr,
    /// Its place in the admission table.
    slot: PendingId,
    /// Its bytes and deadlines (the sans-IO identification).
    ident: Identifying,
    /// Set for `ident.deadline()`.
    timer: Option<(TimerKey, Instant)>,
}

#[derive(Debug)]
struct Connpt {
    name: String,
    id: Id,
    listen: Option<SocketAddr>,
    connect: Option<SocketAddr>,
    send_id: Option<Vec<u8>>,
    device: Option<(ConnKey, SocketAddr)>,
    apps: Vec<ConnKey>,
    upstream: Option<ConnKey>,
    redial: Option<TimerKey>,
    backoff: Duration,
    /// When the current upstream connected.
    connected_at: Option<Instant>,
    /// The device is paused because a target's queue was full.
    device_paused: bool,
    /// Bytes that came with the id, waiting for every target to have room.
    held: Vec<u8>,
    /// When the device last came online or went offline (None: never seen).
    since: Option<Instant>,
    /// Bytes from the device to its applications / upstream, and back.
    bytes_up: u64,
    bytes_down: u64,
    /// Taken out of service by a reload (the slot waits in `free_connpts`).
    removed: bool,
}

/// Identifies devices and bridges them to their connpts. See the module docs.
#[derive(Debug)]
pub struct Router {
    config: RouterConfig,
    stats: Arc<RouterStats>,
    device_listener: Option<ListenerId>,
    connpts: Vec<Connpt>,
    /// The ids of live connpts (`identity = "id"`).
    ids: IdTable,
    /// The `id_*` settings, as the identification takes them.
    rules: Rules,
    by_ip: HashMap<IpAddr, u32>,
    by_addr: HashMap<SocketAddr, u32>,
    app_listeners: HashMap<ListenerId, u32>,
    parties: HashMap<ConnKey, Party>,
    /// Unidentified connections, oldest first (bounded; the oldest makes room).
    pending: Admission<ConnKey>,
    /// Connpt slots freed by a reload, reused by the next one added.
    free_connpts: Vec<u32>,
    /// Warnings devices can repeat (refused, unknown id, duplicate): one
    /// line per kind per second.
    warn_refused: LogLimit,
    warn_unknown: LogLimit,
    warn_duplicate: LogLimit,
}

// ===== impl Router =====

impl Router {
    /// A router as configured by one `[[router]]` table.
    pub fn new(config: &RouterConfig) -> Router {
        let n = config.connpt.len();
        let mut r = Router {
            stats: Arc::new(RouterStats::default()),
            device_listener: None,
            connpts: Vec::with_capacity(n),
            ids: IdTable::default(),
            rules: Router::rules(config),
            by_ip: HashMap::new(),
            by_addr: HashMap::new(),
            app_listeners: HashMap::with_capacity(
                config.connpt.iter().filter(|c| c.listen.is_some()).count(),
            ),
            parties: HashMap::with_capacity(n),
            pending: Admission::new(config.max_pending, config.max_pending_per_ip, PER_IP_GRACE),
            free_connpts: Vec::new(),
            warn_refused: LogLimit::default(),
            warn_unknown: LogLimit::default(),
            warn_duplicate: LogLimit::default(),
            config: config.clone(),
        };
        for c in &config.connpt {
            r.connpts.push(Router::connpt_from(config, c));
        }
        match config.identity {
            Identity::Id => {
                r.ids = IdTable::new(r.connpts.iter().zip(0..).map(|(c, i)| (c.id, i)));
            }
            Identity::Ip => {
                for i in 0..r.connpts.len() {
                    r.index_connpt(i as u32);
                }
            }
        }
        // The connpts now live in `connpts`; do not keep a second copy.
        r.config.connpt = Vec::new();
        r
    }

    /// The identification settings of `config`.
    fn rules(config: &RouterConfig) -> Rules {
        Rules {
            delimiter: config
                .id_delimiter
                .as_ref()
                .map(|d| d.0.clone())
                .unwrap_or_default(),
            max_len: config.id_max_len,
            gap: config.id_gap,
            timeout: config.id_timeout,
        }
    }

    fn connpt_from(config: &RouterConfig, c: &ConnptConfig) -> Connpt {
        Connpt {
            name: c.name.clone(),
            // Validation keeps ids within MAX_ID_LEN.
            id: Id::new(&c.id.0).unwrap_or_default(),
            listen: c.listen,
            connect: c.connect,
            send_id: c.send_id.as_ref().map(|b| b.0.clone()),
            device: None,
            apps: Vec::new(),
            upstream: None,
            redial: None,
            backoff: config.reconnect_min,
            connected_at: None,
            device_paused: false,
            held: Vec::new(),
            since: None,
            bytes_up: 0,
            bytes_down: 0,
            removed: false,
        }
    }

    /// Enter connpt `i` in the lookup tables.
    fn index_connpt(&mut self, i: u32) {
        let Some(c) = self.connpts.get(i as usize) else {
            return;
        };
        match self.config.identity {
            Identity::Id => self.ids.insert(c.id, i),
            Identity::Ip => {
                let text = String::from_utf8_lossy(c.id.as_slice());
                if let Ok(a) = text.parse::<SocketAddr>() {
                    self.by_addr.insert(a, i);
                } else if let Ok(ip) = text.parse::<IpAddr>() {
                    self.by_ip.insert(ip, i);
                }
            }
        }
    }

    /// Whether connpt `c` is what `cfg` describes.
    fn same_connpt(c: &Connpt, cfg: &ConnptConfig) -> bool {
        !c.removed
            && c.name == cfg.name
            && c.id.as_slice() == cfg.id.0.as_slice()
            && c.listen == cfg.listen
            && c.connect == cfg.connect
            && c.send_id.as_deref() == cfg.send_id.as_ref().map(|b| b.0.as_slice())
    }

    /// Live reload: take connpt `i` out of service, closing its device,
    /// applications, upstream and application port. Its slot is reused.
    fn remove_connpt(&mut self, ctx: &mut Ctx<'_>, i: u32) {
        let name = self.config.name.clone();
        let Some(c) = self.connpts.get_mut(i as usize) else {
            return;
        };
        if let Some((dev, _)) = c.device.take() {
            self.parties.remove(&dev);
            ctx.close(dev);
            sub(&self.stats.online, 1);
        }
        for k in c.apps.drain(..).chain(c.upstream.take()) {
            self.parties.remove(&k);
            ctx.close(k);
        }
        if let Some(t) = c.redial.take() {
            ctx.cancel_timer(t);
        }
        c.removed = true;
        c.held = Vec::new();
        info!("{name}: connpt {} removed", c.name);
        let id = c.id;
        match self.config.identity {
            Identity::Id => self.ids.remove(id, i),
            Identity::Ip => {
                self.by_addr.retain(|_, x| *x != i);
                self.by_ip.retain(|_, x| *x != i);
            }
        }
        let listeners: Vec<ListenerId> = self
            .app_listeners
            .iter()
            .filter(|(_, x)| **x == i)
            .map(|(l, _)| *l)
            .collect();
        for l in listeners {
            self.app_listeners.remove(&l);
            ctx.close_listener(l);
        }
        self.free_connpts.push(i);
    }

    /// Live reload: put a new connpt in service (opening its application port).
    fn add_connpt(&mut self, ctx: &mut Ctx<'_>, cfg: &ConnptConfig) {
        let c = Router::connpt_from(&self.config, cfg);
        let i = match self.free_connpts.pop() {
            Some(i) => {
                if let Some(slot) = self.connpts.get_mut(i as usize) {
                    *slot = c;
                }
                i
            }
            None => {
                self.connpts.push(c);
                (self.connpts.len() - 1) as u32
            }
        };
        self.index_connpt(i);
        if let Some(listen) = cfg.listen {
            match ctx.listen(listen, ListenOptions::default()) {
                Ok(l) => {
                    self.app_listeners.insert(l, i);
                }
                Err(e) => error!("{}: connpt {}: {e}", self.config.name, cfg.name),
            }
        }
        info!("{}: connpt {} added", self.config.name, cfg.name);
    }

    /// The role's counters (shared; keep the `Arc` before adding the role).
    pub fn stats(&self) -> Arc<RouterStats> {
        Arc::clone(&self.stats)
    }

    fn connpt(&mut self, i: u32) -> Option<&mut Connpt> {
        self.connpts.get_mut(i as usize)
    }

    fn accept_device(&mut self, ctx: &mut Ctx<'_>, key: ConnKey, peer: SocketAddr) {
        if self.config.identity == Identity::Ip {
            let found = self
                .by_addr
                .get(&peer)
                .or_else(|| self.by_ip.get(&peer.ip()))
                .copied();
            match found {
                Some(i) => self.identified(ctx, key, peer, i, &[]),
                None => self.unknown(ctx, key, peer, peer.ip().to_string().as_bytes()),
            }
            return;
        }
        let now = ctx.now();
        match self.pending.admit(peer.ip(), now) {
            Admit::Yes => {}
            Admit::TooManyFromAddress => {
                if let Some(n) = self.warn_refused.check(now) {
                    warn!(
                        "{}: refused device {peer}: {} unidentified connections from its address{}",
                        self.config.name,
                        self.config.max_pending_per_ip,
                        Suppressed(n)
                    );
                }
                bump(&self.stats.refused);
                ctx.abort(key);
                return;
            }
            Admit::Evicted(old) => {
                let old_peer = self.take_pending(ctx, old).map(|p| p.peer);
                if let Some(n) = self.warn_refused.check(now) {
                    warn!(
                        "{}: {} unidentified connections; closed the oldest ({}) for device {peer}{}",
                        self.config.name,
                        self.config.max_pending,
                        old_peer.map_or_else(|| "?".to_owned(), |p| p.to_string()),
                        Suppressed(n)
                    );
                }
                bump(&self.stats.pending_evicted);
                ctx.abort(old);
            }
        }
        let slot = self.pending.insert(key, peer.ip(), now);
        let ident = Identifying::new(&self.rules, now);
        let at = ident.deadline();
        let pending = Pending {
            peer,
            slot,
            ident,
            timer: ctx.set_conn_timer(key, at, TIMER_PENDING).map(|t| (t, at)),
        };
        self.parties.insert(key, Party::Pending(Box::new(pending)));
        debug!(
            "{}: device {peer} connected ({key}), waiting for its id",
            self.config.name
        );
    }

    /// Leave the pending state (counts and timer).
    fn take_pending(&mut self, ctx: &mut Ctx<'_>, key: ConnKey) -> Option<Box<Pending>> {
        let Some(Party::Pending(p)) = self.parties.remove(&key) else {
            return None;
        };
        if let Some((t, _)) = p.timer {
            ctx.cancel_timer(t);
        }
        self.pending.remove(p.slot, key);
        Some(p)
    }

    /// Carry out what the identification of pending device `key` decided.
    fn settle(&mut self, ctx: &mut Ctx<'_>, key: ConnKey, outcome: Outcome) {
        match outcome {
            Outcome::Wait => {
                // Keep the timer at the identification's deadline.
                let Some(Party::Pending(p)) = self.parties.get_mut(&key) else {
                    return;
                };
                let at = p.ident.deadline();
                if p.timer.is_some_and(|(_, set)| set == at) {
                    return;
                }
                if let Some((t, _)) = p.timer.take() {
                    ctx.cancel_timer(t);
                }
                p.timer = ctx.set_conn_timer(key, at, TIMER_PENDING).map(|t| (t, at));
            }
            Outcome::Identified { connpt, data_start } => {
                if let Some(p) = self.take_pending(ctx, key) {
                    let rest = p.ident.bytes().get(data_start..).unwrap_or_default();
                    self.identified(ctx, key, p.peer, connpt, rest);
                }
            }
            Outcome::Unknown { id_end } => {
                if let Some(p) = self.take_pending(ctx, key) {
                    let id = p.ident.bytes().get(..id_end).unwrap_or_default();
                    self.unknown(ctx, key, p.peer, id);
                }
            }
            Outcome::TimedOut => {
                if let Some(p) = self.take_pending(ctx, key) {
                    warn!(
                        "{}: device {} sent no known id within {:?} (got {}); closing",
                        self.config.name,
                        p.peer,
                        self.config.id_timeout,
                        preview(p.ident.bytes())
                    );
                    bump(&self.stats.id_timeouts);
                    ctx.abort(key);
                }
            }
        }
    }

    fn unknown(&mut self, ctx: &mut Ctx<'_>, key: ConnKey, peer: SocketAddr, id: &[u8]) {
        let shown = ShownId::new(id);
        if let Some(n) = self.warn_unknown.check(ctx.now()) {
            warn!(
                "{}: unknown id {shown} from {peer}; closing{}",
                self.config.name,
                Suppressed(n)
            );
        }
        bump(&self.stats.unknown_total);
        if self.config.recent_unknown > 0
            && let Ok(mut recent) = self.stats.recent.lock()
        {
            if recent.len() >= self.config.recent_unknown {
                recent.pop_front();
            }
            recent.push_back((shown, peer));
        }
        ctx.abort(key);
    }

    fn identified(
        &mut self,
        ctx: &mut Ctx<'_>,
        key: ConnKey,
        peer: SocketAddr,
        i: u32,
        rest: &[u8],
    ) {
        let name = self.config.name.clone();
        let duplicate = self.config.duplicate;
        let Some(c) = self.connpts.get_mut(i as usize) else {
            return;
        };
        if let Some((old, old_peer)) = c.device {
            match duplicate {
                Duplicate::Reject => {
                    if let Some(n) = self.warn_duplicate.check(ctx.now()) {
                        warn!(
                            "{name}: {} is online from {old_peer}; rejected {peer}{}",
                            c.name,
                            Suppressed(n)
                        );
                    }
                    bump(&self.stats.rejected);
                    ctx.abort(key);
                    return;
                }
                Duplicate::Replace => {
                    info!("{name}: {} taken over by {peer} (was {old_peer})", c.name);
                    bump(&self.stats.replaced);
                    self.parties.remove(&old);
                    ctx.abort(old);
                    sub(&self.stats.online, 1);
                }
            }
        } else {
            info!("{name}: {} online from {peer}", c.name);
        }
        c.device = Some((key, peer));
        c.device_paused = false;
        c.since = Some(ctx.now());
        // Senders held back by a slow previous device may talk again.
        for s in c.upstream.iter().chain(c.apps.iter()) {
            ctx.resume_reading(*s);
        }
        self.parties.insert(key, Party::Device(i));
        bump(&self.stats.online);
        bump(&self.stats.identified_total);
        ctx.set_idle_timeout(key, Some(self.config.idle_timeout));
        if self.config.keepalive.is_some() {
            let at = ctx.now() + self.config.keepalive_interval;
            ctx.set_conn_timer(key, at, TIMER_KEEPALIVE);
        }
        if c.connect.is_some() && c.upstream.is_none() && c.redial.is_none() {
            self.dial(ctx, i);
        }
        // An application may still be behind from the previous device
        // (takeover): the bytes that came with the id wait on the connpt
        // (at most one read) while the device is held, and go first when
        // every target has room.
        if let Some(c) = self.connpts.get_mut(i as usize) {
            // A replaced device's bytes that were still waiting are lost with it.
            let lost = c.held.len() as u64;
            add(&self.stats.unrouted_bytes, lost);
            c.held = rest.to_vec();
        }
        self.hold_device_if_needed(ctx, i, key);
    }

    fn dial(&mut self, ctx: &mut Ctx<'_>, i: u32) {
        let name = self.config.name.clone();
        let Some(c) = self.connpts.get_mut(i as usize) else {
            return;
        };
        let Some(addr) = c.connect else {
            return;
        };
        match ctx.connect(addr, ConnectOptions::default()) {
            Ok(up) => {
                debug!("{name}: {} dialling {addr}", c.name);
                if let Some(id) = &c.send_id {
                    ctx.send(up, id).ok();
                }
                c.upstream = Some(up);
                self.parties.insert(up, Party::Upstream(i));
            }
            Err(e) => {
                warn!("{name}: {} cannot dial {addr}: {e}", c.name);
                self.schedule_redial(ctx, i);
            }
        }
    }

    fn schedule_redial(&mut self, ctx: &mut Ctx<'_>, i: u32) {
        let max = self.config.reconnect_max;
        let Some(c) = self.connpts.get_mut(i as usize) else {
            return;
        };
        if c.device.is_none() || c.redial.is_some() {
            return;
        }
        let wait = c.backoff;
        c.backoff = (c.backoff * 2).min(max);
        c.redial = Some(ctx.set_timer(ctx.now() + wait, u64::from(i)));
    }

    /// Bytes from the device of connpt `i` (its id already taken off).
    fn device_data(&mut self, ctx: &mut Ctx<'_>, i: u32, mut data: &[u8]) {
        let Some(c) = self.connpts.get(i as usize) else {
            return;
        };
        let Some((device, _)) = c.device else {
            return;
        };
        if let Some(hb) = &self.config.heartbeat
            && is_heartbeat(data, &hb.0)
        {
            bump(&self.stats.heartbeats);
            if let Some(reply) = &self.config.heartbeat_reply {
                ctx.send(device, &reply.0).ok();
            }
            return;
        }
        if self.config.strip_prefix {
            data = strip_id(data, c.id.as_slice());
        }
        if data.is_empty() {
            return;
        }
        let mut delivered = false;
        let len = data.len() as u64;
        let targets = c.upstream.into_iter().chain(c.apps.iter().copied());
        for t in targets {
            match ctx.send(t, data) {
                Ok(()) => delivered = true,
                // Cannot happen: the device pauses while any target lacks
                // room for one more read. Counted, never silent.
                Err(SendError::Full) => {
                    warn!(
                        "{}: {}: application queue overflowed (bug)",
                        self.config.name, c.name
                    );
                    add(&self.stats.unrouted_bytes, data.len() as u64);
                }
                Err(SendError::Closed) => {}
            }
        }
        if !delivered {
            add(&self.stats.unrouted_bytes, data.len() as u64);
        } else if let Some(c) = self.connpts.get_mut(i as usize) {
            c.bytes_up += len;
        }
        self.hold_device_if_needed(ctx, i, device);
    }

    /// Pause the device of connpt `i` while any of its targets has no room
    /// for one more read (TCP then pushes back to the device); each such
    /// target reports `on_writable` when drained, and reading resumes once
    /// every target has room again.
    fn hold_device_if_needed(&mut self, ctx: &mut Ctx<'_>, i: u32, device: ConnKey) {
        let room = ctx.read_buffer_len();
        let Some(c) = self.connpts.get_mut(i as usize) else {
            return;
        };
        let mut hold = false;
        for t in c.upstream.iter().chain(c.apps.iter()) {
            if ctx.send_capacity(*t).is_some_and(|free| free < room) {
                ctx.notify_writable(*t);
                hold = true;
            }
        }
        if hold {
            ctx.pause_reading(device);
        } else if c.device_paused {
            ctx.resume_reading(device);
        }
        c.device_paused = hold;
        if !hold && !c.held.is_empty() {
            let held = std::mem::take(&mut c.held);
            self.device_data(ctx, i, &held);
        }
    }

    /// Bytes from an application or the upstream of connpt `i`, for the device.
    fn app_data(&mut self, ctx: &mut Ctx<'_>, i: u32, data: &[u8]) {
        let Some(c) = self.connpts.get_mut(i as usize) else {
            return;
        };
        let Some((device, _)) = c.device else {
            add(&self.stats.offline_discarded_bytes, data.len() as u64);
            return;
        };
        let sent = ctx.send(device, data);
        if sent.is_ok() {
            c.bytes_down += data.len() as u64;
        }
        if sent == Err(SendError::Full) {
            warn!(
                "{}: {}: device queue overflowed (bug)",
                self.config.name, c.name
            );
            add(&self.stats.offline_discarded_bytes, data.len() as u64);
        }
        // Every sender may deliver one more read before it sees a pause: hold
        // them all while the device lacks room for that; its `on_writable`
        // (queue drained) lets them go on.
        let senders = c.apps.len() + usize::from(c.upstream.is_some());
        let needed = senders.max(1) * ctx.read_buffer_len();
        if ctx.send_capacity(device).is_some_and(|free| free < needed) {
            ctx.notify_writable(device);
            for s in c.upstream.iter().chain(c.apps.iter()) {
                ctx.pause_reading(*s);
            }
        }
    }

    fn device_gone(&mut self, ctx: &mut Ctx<'_>, i: u32, reason: CloseReason) {
        let name = self.config.name.clone();
        let offline = self.config.offline;
        let Some(c) = self.connpts.get_mut(i as usize) else {
            return;
        };
        let peer = c.device.take().map(|(_, p)| p);
        c.since = Some(ctx.now());
        if !c.held.is_empty() {
            add(&self.stats.unrouted_bytes, c.held.len() as u64);
            c.held = Vec::new();
        }
        sub(&self.stats.online, 1);
        info!(
            "{name}: {} offline ({reason}), was {}",
            c.name,
            peer.map(|p| p.to_string()).unwrap_or_default()
        );
        if let Some(t) = c.redial.take() {
            ctx.cancel_timer(t);
        }
        c.backoff = self.config.reconnect_min;
        c.connected_at = None;
        if let Some(up) = c.upstream.take() {
            self.parties.remove(&up);
            ctx.close(up);
        }
        if offline == Offline::Close {
            for app in c.apps.drain(..) {
                self.parties.remove(&app);
                ctx.close(app);
            }
        } else {
            for &app in &c.apps {
                ctx.resume_reading(app);
            }
        }
    }
}

impl Role for Router {
    fn name(&self) -> &str {
        &self.config.name
    }

    fn kind(&self) -> &str {
        "router"
    }

    fn reconfigure(&mut self, ctx: &mut Ctx<'_>, new: &dyn Any) -> Reconfigure {
        let Some(new) = new.downcast_ref::<RouterConfig>() else {
            return Reconfigure::Restart;
        };
        if new.listen != self.config.listen || new.identity != self.config.identity {
            return Reconfigure::Restart;
        }
        let mut settings = new.clone();
        settings.connpt = Vec::new();
        self.config = settings;
        self.rules = Router::rules(&self.config);
        // Connpts by name: unchanged ones (and their devices) stay as they are.
        let wanted: HashMap<&str, &ConnptConfig> =
            new.connpt.iter().map(|c| (c.name.as_str(), c)).collect();
        for i in 0..self.connpts.len() {
            let Some(c) = self.connpts.get(i) else {
                continue;
            };
            if c.removed {
                continue;
            }
            let keep = wanted
                .get(c.name.as_str())
                .is_some_and(|cfg| Router::same_connpt(c, cfg));
            if !keep {
                self.remove_connpt(ctx, i as u32);
            }
        }
        let added: Vec<ConnptConfig> = {
            let live: hashbrown::HashSet<&str> = self
                .connpts
                .iter()
                .filter(|c| !c.removed)
                .map(|c| c.name.as_str())
                .collect();
            new.connpt
                .iter()
                .filter(|c| !live.contains(c.name.as_str()))
                .cloned()
                .collect()
        };
        for cfg in &added {
            self.add_connpt(ctx, cfg);
        }
        Reconfigure::Applied
    }

    fn report(&self, view: &View<'_>, out: &mut Report) {
        out.addr(
            "listen",
            self.device_listener.and_then(|l| view.listener_addr(l)),
        );
        // Gauges of the role's own tables (metrics only), then the counters.
        out.gauge(
            "switchboard_router_pending_connections",
            "Connections not identified yet.",
            &[],
            self.pending.len() as u64,
        );
        out.gauge(
            "switchboard_router_connpts",
            "Connection points configured.",
            &[],
            (self.connpts.len() - self.free_connpts.len()) as u64,
        );
        let st = &*self.stats;
        out.counters(st);
        out.num("pending", self.pending.len() as u64);
        out.open_array(Some("connpts"));
        let (mut up, mut down) = (0, 0);
        for c in self.connpts.iter().filter(|c| !c.removed) {
            up += c.bytes_up;
            down += c.bytes_down;
            out.open_object(None);
            out.str("name", &c.name);
            ShownId::write_id(c.id.as_slice(), out);
            out.bool("online", c.device.is_some());
            out.age("since_seconds", c.since);
            out.addr("peer", c.device.map(|(_, p)| p));
            out.num("bytes_from_device", c.bytes_up);
            out.num("bytes_to_device", c.bytes_down);
            out.num("applications", c.apps.len() as u64);
            out.bool("upstream", c.upstream.is_some());
            out.close_object();
        }
        out.close_array();
        out.open_array(Some("recent_unknown"));
        for (id, peer) in st.recent_unknown() {
            out.open_object(None);
            id.write(out);
            out.addr("peer", Some(peer));
            out.close_object();
        }
        out.close_array();
        out.counter(
            "switchboard_router_device_bytes_total",
            "Bytes from devices forwarded.",
            &[],
            up,
        );
        out.counter(
            "switchboard_router_application_bytes_total",
            "Bytes from applications forwarded to devices.",
            &[],
            down,
        );
        out.counter(
            "switchboard_router_dropped_bytes_total",
            "Bytes discarded (device offline or nothing attached).",
            &[],
            st.unrouted_bytes.value() + st.offline_discarded_bytes.value(),
        );
    }

    fn start(&mut self, ctx: &mut Ctx<'_>) -> Result<(), EngineError> {
        let id = ctx.listen(self.config.listen, ListenOptions::default())?;
        self.device_listener = Some(id);
        let addr = ctx.listener_addr(id).unwrap_or(self.config.listen);
        for i in 0..self.connpts.len() {
            let Some(listen) = self.connpts.get(i).and_then(|c| c.listen) else {
                continue;
            };
            let l = ctx.listen(listen, ListenOptions::default())?;
            self.app_listeners.insert(l, i as u32);
            if let Some(c) = self.connpts.get(i) {
                debug!(
                    "{}: connpt {} ({:?}) on {}",
                    self.config.name,
                    c.name,
                    c.id,
                    ctx.listener_addr(l).unwrap_or(listen)
                );
            }
        }
        info!(
            "router '{}' listening for devices on {addr} ({:?} identity), {} connpts",
            self.config.name,
            self.config.identity,
            self.connpts.len()
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
        if Some(listener) == self.device_listener {
            self.accept_device(ctx, conn, peer);
            return;
        }
        let Some(&i) = self.app_listeners.get(&listener) else {
            ctx.abort(conn);
            return;
        };
        let (max_apps, offline, name) = (
            self.config.max_apps,
            self.config.offline,
            self.config.name.clone(),
        );
        let Some(c) = self.connpt(i) else {
            return;
        };
        if c.apps.len() >= max_apps || (offline == Offline::Close && c.device.is_none()) {
            warn!(
                "{name}: refused application {peer} on {}: {}",
                c.name,
                if c.device.is_none() {
                    "device offline"
                } else {
                    "max_apps reached"
                }
            );
            bump(&self.stats.refused);
            ctx.abort(conn);
            return;
        }
        c.apps.push(conn);
        debug!("{name}: application {peer} attached to {}", c.name);
        self.parties.insert(conn, Party::App(i));
    }

    fn on_frame(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey, frame: Frame<'_>) {
        let link = match self.parties.get_mut(&conn) {
            Some(Party::Pending(p)) => {
                let outcome = p.ident.push(&self.rules, &self.ids, frame.raw, ctx.now());
                self.settle(ctx, conn, outcome);
                return;
            }
            Some(Party::Device(i)) => Some((true, *i)),
            Some(Party::App(i) | Party::Upstream(i)) => Some((false, *i)),
            None => return,
        };
        match link {
            None => {}
            Some((true, i)) => self.device_data(ctx, i, frame.raw),
            Some((false, i)) => self.app_data(ctx, i, frame.raw),
        }
    }

    fn on_writable(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey) {
        match self.parties.get(&conn) {
            // A target of the device drained: let the device talk again.
            Some(Party::App(i) | Party::Upstream(i)) => {
                let i = *i;
                if let Some((device, _)) = self.connpts.get(i as usize).and_then(|c| c.device) {
                    self.hold_device_if_needed(ctx, i, device);
                }
            }
            // The device drained: let its senders talk again.
            Some(Party::Device(i)) => {
                let i = *i;
                if let Some(c) = self.connpts.get(i as usize) {
                    for s in c.upstream.iter().chain(c.apps.iter()) {
                        ctx.resume_reading(*s);
                    }
                }
            }
            _ => {}
        }
    }

    fn on_connected(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey) {
        if let Some(Party::Upstream(i)) = self.parties.get(&conn) {
            let i = *i;
            let now = ctx.now();
            if let Some(c) = self.connpt(i) {
                // The back-off resets only once the upstream has stayed up
                // (see `on_closed`): one that accepts and drops at once is
                // not re-dialled at the minimum delay forever.
                c.connected_at = Some(now);
                debug!("{}: upstream connected", c.name);
            }
        }
    }

    fn on_connect_failed(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey, reason: CloseReason) {
        self.on_closed(ctx, conn, reason);
    }

    fn on_closed(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey, reason: CloseReason) {
        match self.parties.get(&conn) {
            Some(Party::Pending(_)) => {
                if let Some(p) = self.take_pending(ctx, conn) {
                    debug!(
                        "{}: device {} left before identifying ({reason})",
                        self.config.name, p.peer
                    );
                }
            }
            Some(Party::Device(i)) => {
                let i = *i;
                self.parties.remove(&conn);
                if self
                    .connpts
                    .get(i as usize)
                    .and_then(|c| c.device)
                    .is_some_and(|(k, _)| k == conn)
                {
                    self.device_gone(ctx, i, reason);
                }
            }
            Some(Party::App(i)) => {
                let i = *i;
                self.parties.remove(&conn);
                if let Some(c) = self.connpt(i) {
                    c.apps.retain(|a| *a != conn);
                }
                // It may have been the slow one holding the device back.
                if let Some((device, _)) = self.connpts.get(i as usize).and_then(|c| c.device) {
                    self.hold_device_if_needed(ctx, i, device);
                }
            }
            Some(Party::Upstream(i)) => {
                let i = *i;
                self.parties.remove(&conn);
                let name = self.config.name.clone();
                let (min, stable) = (self.config.reconnect_min, self.config.reconnect_max);
                let now = ctx.now();
                if let Some(c) = self.connpt(i)
                    && c.upstream == Some(conn)
                {
                    c.upstream = None;
                    if c.connected_at.take().is_some_and(|at| now >= at + stable) {
                        c.backoff = min;
                    }
                    warn!(
                        "{name}: {} upstream closed ({reason}); re-dialling while the device is online",
                        c.name
                    );
                }
                self.schedule_redial(ctx, i);
            }
            None => {}
        }
    }

    /// A connpt's redial (the role's only own timer; `i` is the connpt).
    fn on_timer(&mut self, ctx: &mut Ctx<'_>, _: TimerKey, i: u64) {
        let Ok(i) = u32::try_from(i) else { return };
        if let Some(c) = self.connpt(i) {
            c.redial = None;
            if c.device.is_some() && c.upstream.is_none() {
                self.dial(ctx, i);
            }
        }
    }

    fn on_conn_timer(&mut self, ctx: &mut Ctx<'_>, key: ConnKey, _: TimerKey, purpose: u64) {
        match purpose {
            TIMER_PENDING => {
                let now = ctx.now();
                let Some(Party::Pending(p)) = self.parties.get_mut(&key) else {
                    return;
                };
                p.timer = None;
                let outcome = p.ident.timeout(&self.rules, &self.ids, now);
                self.settle(ctx, key, outcome);
            }
            TIMER_KEEPALIVE => {
                let Some(Party::Device(i)) = self.parties.get(&key) else {
                    return;
                };
                let i = *i;
                let interval = self.config.keepalive_interval;
                if let Some(bytes) = &self.config.keepalive {
                    ctx.send(key, &bytes.0).ok();
                }
                let at = ctx.now() + interval;
                if self.connpt(i).is_some() {
                    ctx.set_conn_timer(key, at, TIMER_KEEPALIVE);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::panic, clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn previews_are_text_or_hex() {
        assert_eq!(preview(b"c0001"), "\"c0001\"");
        assert_eq!(preview(b"\x01\xff"), "hex:01ff");
        assert!(preview(&[b'a'; 40]).ends_with("…\""));
        let text = ShownId::new(b"c 1");
        assert!(text.text && text.value == "c 1", "{text:?}");
        let hex = ShownId::new(b"\x01\xff");
        assert!(!hex.text && hex.value == "hex:01ff", "{hex:?}");
        // Never ambiguous with the config's hex form.
        assert_eq!(ShownId::new(b"hex:1").value, "hex:6865783a31");
    }
}
