//! The broadcast role: every record from any publisher goes to every
//! subscriber, whole and in publish order; a slow subscriber never holds back
//! the others.
//!
//! Invariant: the records of one publisher read are stored once, in one
//! `Bytes`, and shared (a refcount) by every subscriber queue that has room for
//! them all; a subscriber that is behind gets them record by record, and its
//! full queue (bounded in bytes and records) gets the configured policy,
//! applied to whole records only. The replay ring keeps its own copies. Each publisher has its own
//! decoder (in the engine), so two publishers never interleave inside a record.

use std::collections::VecDeque;
use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use log::{debug, error, info, warn};

use crate::codec::{Decoded, Decoder, Frame, FrameError};
use crate::config::{BroadcastConfig, Ingest, RecordFraming, SlowPolicy};
use crate::engine::{
    CloseReason, ConnKey, Ctx, EngineError, Handle, HandleError, Keepalive, ListenOptions,
    ListenerId, LogLimit, Message, RoleId, SendError, Suppressed, TimerKey, View,
};
use crate::metrics::{add, bump};
use crate::role::{OnFrameError, Report, Role};

/// The tag of a TCP publisher's connection ([`Ctx::tag`]); subscribers
/// keep the default 0.
const PUBLISHER: u64 = 1;
/// Room reserved at a time for a batch of records (one read's worth).
const BATCH_BYTES: usize = 64 * 1024;
/// Bytes read from stdin per message to the loop.
const STDIN_CHUNK: usize = 16 * 1024;

/// A record to publish, handed to the role from another thread; see [`publish`].
#[derive(Debug)]
pub struct Publish(pub Bytes);

/// What the stdin reader thread sends the loop.
#[derive(Debug)]
enum StdinInput {
    Data(Vec<u8>),
    Eof,
}

/// Publish `record` on the broadcast role `role` from any thread. The bytes go
/// out exactly as given, so they must already be one whole record in the
/// role's framing (a line with its newline, or a length prefix and payload).
///
/// # Errors
/// [`HandleError::Full`] when the engine's inbox is full (try again),
/// [`HandleError::Stopped`] when the engine is gone.
pub fn publish(handle: &Handle, role: RoleId, record: Bytes) -> Result<(), HandleError> {
    handle.send(role, Box::new(Publish(record)))
}

crate::counters! {
    /// Counters of one broadcast role, readable from any thread ([`Broadcast::stats`]).
    #[derive(Debug, Default)]
    pub struct BroadcastStats {
        /// Records published.
        pub records_in: AtomicU64 = counter {
            status: "records_in_total",
            metric: "switchboard_broadcast_records_total",
            help: "Records published.",
        },
        /// Record deliveries queued to subscribers.
        pub deliveries: AtomicU64 = counter {
            metric: "switchboard_broadcast_delivered_records_total",
            help: "Record deliveries queued to subscribers.",
        },
        /// Records dropped for slow subscribers (drop-oldest / drop-newest).
        pub dropped_records: AtomicU64 = counter {
            metric: "switchboard_broadcast_dropped_records_total",
            help: "Records dropped for slow subscribers.",
        },
        /// Subscribers disconnected as too slow (queue full or stalled).
        pub slow_disconnects: AtomicU64 = counter {
            metric: "switchboard_broadcast_slow_disconnects_total",
            help: "Subscribers disconnected as too slow.",
        },
        /// Subscribers now.
        pub subscribers: AtomicU64 = gauge,
        /// Connections refused (allow list, max_subscribers, max_publishers).
        pub refused: AtomicU64 = counter {
            metric: "switchboard_broadcast_refused_total",
            help: "Connections refused (allow list, limits).",
        },
        /// Records longer than `max_record` (dropped, or the publisher closed).
        pub oversized: AtomicU64 = counter {
            metric: "switchboard_broadcast_oversized_records_total",
            help: "Records over max_record.",
        },
        /// Partial records discarded because their publisher went away.
        pub partial_discarded: AtomicU64 = counter,
        /// Partial lines published by `flush_idle`.
        pub flushed_partial: AtomicU64 = counter,
    }
}

#[derive(Debug)]
struct Subscriber {
    key: ConnKey,
    peer: SocketAddr,
    /// Records dropped for it since it last caught up.
    dropping: u64,
    /// Records dropped for it since it joined.
    dropped_total: u64,
    /// Records queued for it since it joined (replay included).
    delivered: u64,
    /// When it joined.
    since: Instant,
}

#[derive(Debug)]
struct Publisher {
    key: ConnKey,
    peer: SocketAddr,
    oversize_logged: bool,
}

/// Records from standard input, decoded on the loop thread.
#[derive(Debug)]
struct StdinState {
    decoder: Decoder,
    buf: Vec<u8>,
    last_input: Instant,
    flush_timer: Option<TimerKey>,
    oversize_logged: bool,
    /// A length-prefixed stream broke its framing: ignore the rest.
    broken: bool,
}

/// Every record to every subscriber. See the module docs and README.
#[derive(Debug)]
pub struct Broadcast {
    config: BroadcastConfig,
    subscriber_listener: Option<ListenerId>,
    ingest_listener: Option<ListenerId>,
    subscribers: Vec<Subscriber>,
    publishers: Vec<Publisher>,
    replay: VecDeque<Bytes>,
    stdin: Option<StdinState>,
    stats: Arc<BroadcastStats>,
    /// Records decoded from the current publisher read, published together.
    batch: BytesMut,
    /// Where each record of `batch` starts and ends.
    bounds: Vec<(u32, u32)>,
    /// Deliveries made by the publish in progress (added to the stats once).
    delivered: u64,
    /// Refused publishers: one warning a second.
    warn_refused: LogLimit,
}

// ===== impl Broadcast =====

impl Broadcast {
    /// A broadcast role as configured by one `[[broadcast]]` table.
    pub fn new(config: &BroadcastConfig) -> Broadcast {
        Broadcast {
            subscribers: Vec::with_capacity(config.max_subscribers.min(1024)),
            publishers: Vec::new(),
            replay: VecDeque::with_capacity(config.replay),
            stdin: None,
            subscriber_listener: None,
            ingest_listener: None,
            stats: Arc::new(BroadcastStats::default()),
            batch: BytesMut::new(),
            bounds: Vec::new(),
            delivered: 0,
            warn_refused: LogLimit::default(),
            config: config.clone(),
        }
    }

    /// The role's counters (shared; keep the `Arc` before adding the role).
    pub fn stats(&self) -> Arc<BroadcastStats> {
        Arc::clone(&self.stats)
    }

    fn allowed(&self, peer: SocketAddr) -> bool {
        self.config.allow.is_empty() || self.config.allow.iter().any(|c| c.contains(peer.ip()))
    }

    /// Publish one record: store it once, queue a refcount to every subscriber.
    fn publish(&mut self, ctx: &mut Ctx<'_>, record: Bytes) {
        let len = u32::try_from(record.len()).unwrap_or(u32::MAX);
        self.publish_batch(ctx, record, &[(0, len)]);
    }

    /// Publish the records `bounds` of `batch` (one publisher read's worth, in
    /// order): the batch is stored once and queued whole to every subscriber
    /// that has room for all of it, record by record (with the slow policy)
    /// to the others.
    fn publish_batch(&mut self, ctx: &mut Ctx<'_>, batch: Bytes, bounds: &[(u32, u32)]) {
        add(&self.stats.records_in, bounds.len() as u64);
        if self.config.replay > 0 {
            let skip = bounds.len().saturating_sub(self.config.replay);
            for &(a, b) in bounds.iter().skip(skip) {
                if self.replay.len() == self.config.replay {
                    self.replay.pop_front();
                }
                // A copy: a slice would pin the batch's whole block for as
                // long as the record stays in the ring.
                let record = batch.get(a as usize..b as usize).unwrap_or_default();
                self.replay.push_back(Bytes::copy_from_slice(record));
            }
        }
        self.delivered = 0;
        let mut i = 0;
        while i < self.subscribers.len() {
            if self.deliver(ctx, i, &batch, bounds) {
                i += 1;
            } else {
                self.subscribers.swap_remove(i);
                self.stats
                    .subscribers
                    .store(self.subscribers.len() as u64, Ordering::Relaxed);
            }
        }
        add(&self.stats.deliveries, self.delivered);
    }

    /// Queue `batch` for subscriber `i`. Returns false if the subscriber was
    /// disconnected.
    fn deliver(
        &mut self,
        ctx: &mut Ctx<'_>,
        i: usize,
        batch: &Bytes,
        bounds: &[(u32, u32)],
    ) -> bool {
        let Some(sub) = self.subscribers.get(i) else {
            return false;
        };
        let key = sub.key;
        let n = bounds.len();
        let limit = self.config.queue_records;
        let try_send = |ctx: &mut Ctx<'_>| {
            if ctx.queued_records(key).unwrap_or(0) + n > limit {
                Err(SendError::Full)
            } else {
                ctx.send_records(key, batch.clone(), n as u32)
            }
        };
        let mut sent = try_send(ctx);
        // One read from a publisher can carry more records than a queue
        // holds: write what the socket takes before calling anyone slow.
        if sent == Err(SendError::Full) && ctx.flush(key) > 0 {
            sent = try_send(ctx);
        }
        match sent {
            Ok(()) => {
                self.delivered += n as u64;
                if let Some(sub) = self.subscribers.get_mut(i) {
                    sub.delivered += n as u64;
                }
                true
            }
            // Gone already: `on_closed` will remove it.
            Err(SendError::Closed) => true,
            // Behind: record by record, so the policy drops whole records only.
            Err(SendError::Full) => bounds
                .iter()
                .all(|&(a, b)| self.deliver_one(ctx, i, batch.slice(a as usize..b as usize))),
        }
    }

    /// Queue one record for subscriber `i`, applying the slow policy when its
    /// queue is full. Returns false if the subscriber was disconnected.
    fn deliver_one(&mut self, ctx: &mut Ctx<'_>, i: usize, record: Bytes) -> bool {
        let Some(sub) = self.subscribers.get(i) else {
            return false;
        };
        let key = sub.key;
        let keep = self.config.queue_records - 1;
        let room = |ctx: &Ctx<'_>| ctx.queued_records(key).unwrap_or(0) <= keep;
        let try_send = |ctx: &mut Ctx<'_>| {
            if room(ctx) {
                ctx.send_bytes(key, record.clone())
            } else {
                Err(SendError::Full)
            }
        };
        let mut sent = try_send(ctx);
        // As in `deliver`: write what the socket takes before calling it slow.
        if sent == Err(SendError::Full) && ctx.flush(key) > 0 {
            sent = try_send(ctx);
        }
        match sent {
            Ok(()) => {
                self.delivered += 1;
                if let Some(sub) = self.subscribers.get_mut(i) {
                    sub.delivered += 1;
                }
                return true;
            }
            Err(SendError::Closed) => return true,
            Err(SendError::Full) => {}
        }
        let queued = ctx.queued(key).unwrap_or(0);
        match self.config.slow {
            SlowPolicy::Disconnect => {
                warn!(
                    "{}: subscriber {} too slow ({queued} bytes queued); disconnecting",
                    self.config.name, sub.peer
                );
                bump(&self.stats.slow_disconnects);
                ctx.abort(key);
                return false;
            }
            SlowPolicy::DropOldest => {
                let dropped = ctx.drop_oldest(key, record.len(), keep);
                let mut lost = dropped.records as u64;
                if room(ctx) && ctx.send_bytes(key, record).is_ok() {
                    self.delivered += 1;
                    if let Some(sub) = self.subscribers.get_mut(i) {
                        sub.delivered += 1;
                    }
                } else {
                    lost += 1;
                }
                self.note_drops(i, lost, queued, "drop-oldest");
            }
            SlowPolicy::DropNewest => self.note_drops(i, 1, queued, "drop-newest"),
        }
        true
    }

    fn note_drops(&mut self, i: usize, n: u64, queued: usize, policy: &str) {
        let Some(sub) = self.subscribers.get_mut(i) else {
            return;
        };
        if n == 0 {
            return;
        }
        if sub.dropping == 0 {
            warn!(
                "{}: subscriber {} too slow ({queued} bytes queued); dropping records ({policy})",
                self.config.name, sub.peer
            );
        }
        sub.dropping += n;
        sub.dropped_total += n;
        add(&self.stats.dropped_records, n);
    }

    fn add_subscriber(&mut self, ctx: &mut Ctx<'_>, key: ConnKey, peer: SocketAddr) {
        if self.subscribers.len() >= self.config.max_subscribers {
            warn!(
                "{}: refused subscriber {peer}: max_subscribers ({}) reached",
                self.config.name, self.config.max_subscribers
            );
            bump(&self.stats.refused);
            ctx.abort(key);
            return;
        }
        let keepalive = Keepalive {
            idle: self.config.keepalive,
            interval: self.config.keepalive_interval,
            user_timeout: Some(self.config.user_timeout),
        };
        if let Err(e) = ctx.set_keepalive(key, keepalive) {
            debug!("{key}: cannot set keepalive: {e}");
        }
        ctx.set_stall_timeout(key, Some(self.config.stall_timeout));
        debug!("{}: subscriber {peer} joined ({key})", self.config.name);
        self.subscribers.push(Subscriber {
            key,
            peer,
            dropping: 0,
            dropped_total: 0,
            delivered: 0,
            since: ctx.now(),
        });
        self.stats
            .subscribers
            .store(self.subscribers.len() as u64, Ordering::Relaxed);
        let i = self.subscribers.len() - 1;
        let replay: Vec<Bytes> = self.replay.iter().cloned().collect();
        self.delivered = 0;
        let stayed = replay.into_iter().all(|r| self.deliver_one(ctx, i, r));
        add(&self.stats.deliveries, self.delivered);
        if !stayed {
            self.subscribers.swap_remove(i);
            self.stats
                .subscribers
                .store(self.subscribers.len() as u64, Ordering::Relaxed);
        }
    }

    fn add_publisher(&mut self, ctx: &mut Ctx<'_>, key: ConnKey, peer: SocketAddr) {
        if self.publishers.len() >= self.config.max_publishers {
            if let Some(n) = self.warn_refused.check(ctx.now()) {
                warn!(
                    "{}: refused publisher {peer}: max_publishers ({}) reached{}",
                    self.config.name,
                    self.config.max_publishers,
                    Suppressed(n)
                );
            }
            bump(&self.stats.refused);
            ctx.abort(key);
            return;
        }
        debug!("{}: publisher {peer} connected ({key})", self.config.name);
        // A silent publisher must not hold its slot for ever (64 idle
        // connections would lock the real publisher out).
        ctx.set_idle_timeout(key, Some(self.config.idle_timeout));
        if let Some(d) = self.config.flush_idle {
            ctx.set_conn_timer(key, ctx.now() + d, 0);
        }
        self.publishers.push(Publisher {
            key,
            peer,
            oversize_logged: false,
        });
    }

    fn start_stdin(&mut self, ctx: &mut Ctx<'_>) -> Result<(), EngineError> {
        let handle = ctx.handle();
        let role = ctx.role_id();
        std::thread::Builder::new()
            .name("stdin-ingest".into())
            .spawn(move || read_stdin(&handle, role))
            .map_err(|e| EngineError::Role {
                role: "broadcast".to_owned(),
                message: format!("cannot start the stdin reader: {e}"),
            })?;
        self.stdin = Some(StdinState {
            decoder: Decoder::new(self.config.framing.framing(self.config.max_record)),
            buf: Vec::with_capacity(2 * STDIN_CHUNK),
            last_input: ctx.now(),
            flush_timer: None,
            oversize_logged: false,
            broken: false,
        });
        Ok(())
    }

    /// Decode records from stdin input buffered on the loop thread.
    fn stdin_input(&mut self, ctx: &mut Ctx<'_>, input: StdinInput) {
        let Some(mut st) = self.stdin.take() else {
            return;
        };
        let eof = match input {
            StdinInput::Data(bytes) if !st.broken => {
                st.buf.extend_from_slice(&bytes);
                st.last_input = ctx.now();
                false
            }
            StdinInput::Data(_) => false,
            StdinInput::Eof => true,
        };
        let mut used = 0;
        while !st.broken {
            let rest = st.buf.get(used..).unwrap_or_default();
            match st.decoder.decode(rest) {
                Ok(Decoded::Frame(frame, n)) => {
                    let record = Bytes::copy_from_slice(frame.raw);
                    used += n;
                    self.publish(ctx, record);
                }
                Ok(Decoded::Skipped(n)) => used += n,
                Ok(Decoded::NeedMore) => break,
                Err(e) => {
                    bump(&self.stats.oversized);
                    if !st.oversize_logged {
                        st.oversize_logged = true;
                        warn!("{}: stdin: {e}; {}", self.config.name, self.oversize_rule());
                    }
                    if !st.decoder.resync() {
                        st.broken = true;
                    }
                }
            }
        }
        st.buf.drain(..used.min(st.buf.len()));
        if st.broken {
            st.buf.clear();
        }
        if eof {
            self.finish_stdin(ctx, &mut st);
            return;
        }
        if let Some(d) = self.config.flush_idle
            && !st.buf.is_empty()
            && st.flush_timer.is_none()
        {
            st.flush_timer = Some(ctx.set_timer(st.last_input + d, 0));
        }
        self.stdin = Some(st);
    }

    /// Stdin closed: a final partial line is published with `flush_idle`
    /// (the input is complete), otherwise discarded and counted.
    fn finish_stdin(&mut self, ctx: &mut Ctx<'_>, st: &mut StdinState) {
        if let Some(t) = st.flush_timer.take() {
            ctx.cancel_timer(t);
        }
        if !st.buf.is_empty() {
            if self.config.flush_idle.is_some() {
                bump(&self.stats.flushed_partial);
                let record = Bytes::copy_from_slice(&st.buf);
                self.publish(ctx, record);
            } else {
                bump(&self.stats.partial_discarded);
                info!(
                    "{}: stdin ended inside a record; {} bytes discarded",
                    self.config.name,
                    st.buf.len()
                );
            }
        }
        info!("{}: stdin closed", self.config.name);
    }

    fn oversize_rule(&self) -> &'static str {
        match self.config.framing {
            RecordFraming::Line => "record dropped up to the next newline (counted; logged once)",
            RecordFraming::U16 | RecordFraming::U32 => "closing the publisher",
        }
    }

    /// `flush_idle` for a TCP publisher: publish a partial line that has been
    /// silent long enough, and check again later.
    fn flush_publisher(&mut self, ctx: &mut Ctx<'_>, key: ConnKey) {
        let Some(flush) = self.config.flush_idle else {
            return;
        };
        if !self.publishers.iter().any(|p| p.key == key) {
            return;
        }
        let Some(last) = ctx.last_read(key) else {
            return;
        };
        let now = ctx.now();
        let pending = ctx.pending_input(key).len();
        let at = if pending > 0 && now >= last + flush {
            let record = Bytes::copy_from_slice(ctx.pending_input(key));
            ctx.consume_input(key, pending);
            bump(&self.stats.flushed_partial);
            debug!(
                "{}: {key}: partial line of {pending} bytes flushed",
                self.config.name
            );
            self.publish(ctx, record);
            now + flush
        } else if pending > 0 {
            last + flush
        } else {
            now + flush
        };
        ctx.set_conn_timer(key, at, 0);
    }

    fn flush_stdin(&mut self, ctx: &mut Ctx<'_>) {
        let (Some(flush), Some(mut st)) = (self.config.flush_idle, self.stdin.take()) else {
            return;
        };
        st.flush_timer = None;
        let now = ctx.now();
        if !st.buf.is_empty() {
            if now >= st.last_input + flush {
                bump(&self.stats.flushed_partial);
                let record = Bytes::copy_from_slice(&st.buf);
                st.buf.clear();
                st.decoder.reset();
                self.publish(ctx, record);
            } else {
                st.flush_timer = Some(ctx.set_timer(st.last_input + flush, 0));
            }
        }
        self.stdin = Some(st);
    }
}

/// The stdin reader thread: chunks to the loop, back-pressured by the inbox
/// (it waits while the inbox is full, so nothing read is lost).
fn read_stdin(handle: &Handle, role: RoleId) {
    let mut stdin = std::io::stdin().lock();
    let mut buf = vec![0u8; STDIN_CHUNK];
    loop {
        let msg = match stdin.read(&mut buf) {
            Ok(0) => StdinInput::Eof,
            Ok(n) => StdinInput::Data(buf.get(..n).unwrap_or_default().to_vec()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                error!("stdin: {e}; treating it as the end of input");
                StdinInput::Eof
            }
        };
        let eof = matches!(msg, StdinInput::Eof);
        if handle.send_wait(role, Box::new(msg)).is_err() || eof {
            return;
        }
    }
}

impl Role for Broadcast {
    fn name(&self) -> &str {
        &self.config.name
    }

    fn kind(&self) -> &str {
        "broadcast"
    }

    fn report(&self, view: &View<'_>, out: &mut Report) {
        out.addr(
            "listen",
            self.subscriber_listener.and_then(|l| view.listener_addr(l)),
        );
        out.addr(
            "ingest",
            self.ingest_listener.and_then(|l| view.listener_addr(l)),
        );
        // Gauges of the role's own tables (metrics only), then the counters.
        let queued: usize = self
            .subscribers
            .iter()
            .map(|s| view.queued(s.key).unwrap_or(0))
            .sum();
        out.gauge(
            "switchboard_broadcast_subscribers",
            "Subscribers connected now.",
            &[],
            self.subscribers.len() as u64,
        );
        out.gauge(
            "switchboard_broadcast_publishers",
            "Publishers connected now.",
            &[],
            self.publishers.len() as u64,
        );
        out.gauge(
            "switchboard_broadcast_queued_bytes",
            "Bytes queued for subscribers now.",
            &[],
            queued as u64,
        );
        out.counters(&*self.stats);
        out.num("replay_fill", self.replay.len() as u64);
        out.num("replay_capacity", self.config.replay as u64);
        out.open_array(Some("subscribers"));
        for sub in &self.subscribers {
            out.open_object(None);
            out.addr("peer", Some(sub.peer));
            out.age("connected_seconds", Some(sub.since));
            out.num("queued_bytes", view.queued(sub.key).unwrap_or(0) as u64);
            out.num("delivered", sub.delivered);
            out.num("dropped", sub.dropped_total);
            out.close_object();
        }
        out.close_array();
        out.open_array(Some("publishers"));
        for p in &self.publishers {
            out.open_object(None);
            out.addr("peer", Some(p.peer));
            out.close_object();
        }
        out.close_array();
    }

    fn start(&mut self, ctx: &mut Ctx<'_>) -> Result<(), EngineError> {
        let framing = self.config.framing.framing(self.config.max_record);
        let subs = ListenOptions {
            queue_bytes: self.config.queue_bytes,
            ..ListenOptions::default()
        };
        let id = ctx.listen(self.config.listen, subs)?;
        self.subscriber_listener = Some(id);
        let sub_addr = ctx.listener_addr(id).unwrap_or(self.config.listen);
        let ingest = match self.config.ingest {
            Some(Ingest::Tcp(addr)) => {
                let opts = ListenOptions {
                    framing,
                    tag: PUBLISHER,
                    ..ListenOptions::default()
                };
                let id = ctx.listen(addr, opts)?;
                self.ingest_listener = Some(id);
                format!("publishers on {}", ctx.listener_addr(id).unwrap_or(addr))
            }
            Some(Ingest::Stdin) => {
                self.start_stdin(ctx)?;
                "publisher on stdin".to_owned()
            }
            None => "library publishing only".to_owned(),
        };
        info!(
            "broadcast '{}' listening for subscribers on {sub_addr}, {ingest}",
            self.config.name
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
        let subscriber = Some(listener) == self.subscriber_listener;
        if !self.allowed(peer) {
            let what = if subscriber {
                "subscriber"
            } else {
                "publisher"
            };
            warn!(
                "{}: refused {what} {peer}: not in the allow list",
                self.config.name
            );
            bump(&self.stats.refused);
            ctx.abort(conn);
            return;
        }
        if subscriber {
            self.add_subscriber(ctx, conn, peer);
        } else {
            self.add_publisher(ctx, conn, peer);
        }
    }

    fn on_frame(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey, frame: Frame<'_>) {
        // Subscribers' own bytes are read (so the socket drains) and discarded.
        if ctx.tag(conn) != Some(PUBLISHER) {
            return;
        }
        // Collect the read's records; `on_input_done` publishes them at once.
        if self.batch.capacity() - self.batch.len() < frame.raw.len() {
            self.batch.reserve(frame.raw.len().max(BATCH_BYTES));
        }
        let start = self.batch.len();
        self.batch.extend_from_slice(frame.raw);
        let end = self.batch.len();
        self.bounds.push((start as u32, end as u32));
    }

    fn on_input_done(&mut self, ctx: &mut Ctx<'_>, _: ConnKey) {
        if self.bounds.is_empty() {
            return;
        }
        let batch = self.batch.split().freeze();
        let bounds = std::mem::take(&mut self.bounds);
        self.publish_batch(ctx, batch, &bounds);
        self.bounds = bounds;
        self.bounds.clear();
    }

    fn on_frame_error(
        &mut self,
        _: &mut Ctx<'_>,
        conn: ConnKey,
        error: FrameError,
    ) -> OnFrameError {
        bump(&self.stats.oversized);
        let rule = self.oversize_rule();
        if let Some(p) = self.publishers.iter_mut().find(|p| p.key == conn)
            && !p.oversize_logged
        {
            p.oversize_logged = true;
            warn!(
                "{}: publisher {}: {error}; {rule}",
                self.config.name, p.peer
            );
        }
        OnFrameError::Resync
    }

    fn on_read_closed(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey) {
        // A publisher that finished cleanly: with flush_idle its last,
        // unterminated line is complete and is published now.
        let pending = ctx.pending_input(conn).len();
        if pending > 0
            && self.config.flush_idle.is_some()
            && self.publishers.iter().any(|p| p.key == conn)
        {
            let record = Bytes::copy_from_slice(ctx.pending_input(conn));
            ctx.consume_input(conn, pending);
            bump(&self.stats.flushed_partial);
            self.publish(ctx, record);
        }
        ctx.close(conn);
    }

    fn on_writable(&mut self, _: &mut Ctx<'_>, conn: ConnKey) {
        if let Some(sub) = self.subscribers.iter_mut().find(|s| s.key == conn)
            && sub.dropping > 0
        {
            info!(
                "{}: subscriber {} caught up after {} dropped records",
                self.config.name, sub.peer, sub.dropping
            );
            sub.dropping = 0;
        }
    }

    fn on_closed(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey, reason: CloseReason) {
        if let Some(i) = self.subscribers.iter().position(|s| s.key == conn) {
            let sub = self.subscribers.swap_remove(i);
            self.stats
                .subscribers
                .store(self.subscribers.len() as u64, Ordering::Relaxed);
            if reason == CloseReason::Stalled {
                bump(&self.stats.slow_disconnects);
                warn!(
                    "{}: subscriber {} closed: queue stalled for {:?}",
                    self.config.name, sub.peer, self.config.stall_timeout
                );
            } else if sub.dropped_total > 0 {
                info!(
                    "{}: subscriber {} left ({reason}); {} records were dropped for it",
                    self.config.name, sub.peer, sub.dropped_total
                );
            } else {
                debug!(
                    "{}: subscriber {} left ({reason})",
                    self.config.name, sub.peer
                );
            }
            return;
        }
        if let Some(i) = self.publishers.iter().position(|p| p.key == conn) {
            let p = self.publishers.swap_remove(i);
            let partial = ctx.pending_input(conn).len();
            if partial > 0 {
                bump(&self.stats.partial_discarded);
                info!(
                    "{}: publisher {} left inside a record ({reason}); {partial} bytes discarded",
                    self.config.name, p.peer
                );
            } else {
                debug!("{}: publisher {} left ({reason})", self.config.name, p.peer);
            }
        }
    }

    /// The stdin publisher's `flush_idle` check (its only role timer).
    fn on_timer(&mut self, ctx: &mut Ctx<'_>, _: TimerKey, _: u64) {
        self.flush_stdin(ctx);
    }

    /// A TCP publisher's `flush_idle` check (its only connection timer).
    fn on_conn_timer(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey, _: TimerKey, _: u64) {
        self.flush_publisher(ctx, conn);
    }

    fn on_message(&mut self, ctx: &mut Ctx<'_>, msg: Message) {
        let msg = match msg.downcast::<Publish>() {
            Ok(p) => return self.publish(ctx, p.0),
            Err(other) => other,
        };
        if let Ok(input) = msg.downcast::<StdinInput>() {
            self.stdin_input(ctx, *input);
        }
    }
}
