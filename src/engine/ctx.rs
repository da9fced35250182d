//! [`Ctx`]: everything a role may ask of the engine, and nothing more.
//!
//! Invariant: a role never touches a socket. It queues bytes, closes, pauses,
//! opens listeners and connections, and sets timers through `Ctx`; the engine
//! performs the I/O later in the same turn (at once for [`Ctx::flush`]). A
//! stale [`ConnKey`] is harmless: every call checks the generation and does
//! nothing (or returns an error) for it.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use log::{debug, warn};
use mio::net::{TcpListener, TcpStream};
use slab::Slab;

use super::accept::Setup;
use super::buffer::QueueFull;
use super::conn::{Conn, READABLE, ShutWrite, State};
use super::control::live_mut;
use super::handle::Handle;
use super::handle::Stats;
use super::timer::TimerKey;
use super::token::{ConnKey, ListenerId, listener_token};
use super::{CloseReason, Core, Listener, RoleId, TimerOwner};
use crate::codec::{Frame, Framing};

/// The context passed to every [`crate::Role`] callback.
pub struct Ctx<'a> {
    pub(crate) core: &'a mut Core,
    pub(crate) role: RoleId,
}

/// A read-only look at the engine for [`crate::Handler::report`].
pub struct View<'a> {
    pub(crate) core: &'a Core,
}

impl View<'_> {
    /// Bytes queued for `key` and not yet written (`None` for a stale key).
    pub fn queued(&self, key: ConnKey) -> Option<usize> {
        self.core.conn(key).map(|c| c.tx.len())
    }

    /// The peer address of `key`.
    pub fn peer_addr(&self, key: ConnKey) -> Option<SocketAddr> {
        self.core.conn(key).map(|c| c.peer)
    }

    /// The tag of `key` (see [`Ctx::tag`]).
    pub fn tag(&self, key: ConnKey) -> Option<u64> {
        self.core.conn(key).map(|c| c.tag)
    }

    /// The bound address of a listener.
    pub fn listener_addr(&self, id: ListenerId) -> Option<SocketAddr> {
        self.core.listeners.get(id.0).map(|l| l.local)
    }

    /// When `key` last read any bytes (or connected).
    pub fn last_read(&self, key: ConnKey) -> Option<Instant> {
        self.core.conn(key).map(|c| c.last_active)
    }
}

/// Options for [`Ctx::listen`].
#[derive(Debug, Clone, Copy)]
pub struct ListenOptions {
    /// How accepted connections' input is cut into frames.
    pub framing: Framing,
    /// Send queue bound for accepted connections (default: `engine.queue_bytes`).
    pub queue_bytes: Option<usize>,
    /// Disable Nagle's algorithm on accepted connections (default: on, i.e. no delay).
    pub nodelay: bool,
    /// The tag accepted connections start with ([`Ctx::tag`]): what they are
    /// to the role, a number of its own (default 0).
    pub tag: u64,
}

impl Default for ListenOptions {
    fn default() -> ListenOptions {
        ListenOptions {
            framing: Framing::Raw,
            queue_bytes: None,
            nodelay: true,
            tag: 0,
        }
    }
}

/// Options for [`Ctx::connect`].
#[derive(Debug, Clone, Copy)]
pub struct ConnectOptions {
    /// How the connection's input is cut into frames.
    pub framing: Framing,
    /// Send queue bound (default: `engine.queue_bytes`).
    pub queue_bytes: Option<usize>,
    /// Connect time limit (default: `engine.connect_timeout`).
    pub timeout: Option<Duration>,
    /// Disable Nagle's algorithm (default: on, i.e. no delay, as for
    /// [`ListenOptions`]; small control frames must not wait for an ACK).
    pub nodelay: bool,
    /// The connection's tag ([`Ctx::tag`]; default 0).
    pub tag: u64,
}

impl Default for ConnectOptions {
    fn default() -> ConnectOptions {
        ConnectOptions {
            framing: Framing::Raw,
            queue_bytes: None,
            timeout: None,
            nodelay: true,
            tag: 0,
        }
    }
}

/// TCP keepalive settings for [`Ctx::set_keepalive`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Silence before the first probe.
    pub idle: Duration,
    /// Time between probes.
    pub interval: Duration,
    /// Linux `TCP_USER_TIMEOUT`: how long sent data may stay unacknowledged
    /// before the connection is dropped (`None`: the system default).
    pub user_timeout: Option<Duration>,
}

/// What [`Ctx::drop_oldest`] dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Whole records dropped.
    pub records: usize,
    /// Bytes dropped.
    pub bytes: usize,
}

/// Why [`Ctx::send`] queued nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// The connection's send queue has no room for these bytes. The role
    /// applies its own policy (pause the source, drop, close); the engine will
    /// call [`crate::Handler::on_writable`] once the queue has drained.
    Full,
    /// The connection is closed, closing, or the key is stale.
    Closed,
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SendError::Full => "send queue full",
            SendError::Closed => "connection closed",
        })
    }
}

impl std::error::Error for SendError {}

/// A listener could not be opened.
#[derive(Debug)]
pub struct ListenError {
    /// The address asked for.
    pub addr: SocketAddr,
    /// What the operating system said.
    pub error: io::Error,
}

impl fmt::Display for ListenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot listen on {}: {}", self.addr, self.error)
    }
}

impl std::error::Error for ListenError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

// ===== impl Ctx =====

impl Ctx<'_> {
    /// The time this loop turn started (read once per turn).
    pub fn now(&self) -> Instant {
        self.core.now
    }

    /// The calling role's id (for [`crate::Handle::send`]).
    pub fn role_id(&self) -> RoleId {
        self.role
    }

    /// Queue a copy of `data` for `key`. The copy goes into a pooled buffer:
    /// no allocation in steady state.
    ///
    /// # Errors
    /// [`SendError::Full`] if the queue has no room for all of `data` (nothing
    /// is queued), [`SendError::Closed`] if the connection is gone or closing.
    pub fn send(&mut self, key: ConnKey, data: &[u8]) -> Result<(), SendError> {
        let core = &mut *self.core;
        let conn = sendable(&mut core.conns, key)?;
        let was_empty = conn.tx.is_empty();
        let r = conn.tx.push_copy(data, &mut core.pool);
        core.after_push(key.index as usize, r, was_empty)
    }

    /// Queue a copy of `parts`, back to back, all or nothing (a frame header
    /// and its payload, say): either every part is queued or none is.
    ///
    /// # Errors
    /// As for [`Ctx::send`], for the parts' total length.
    pub fn send_parts(&mut self, key: ConnKey, parts: &[&[u8]]) -> Result<(), SendError> {
        let core = &mut *self.core;
        let conn = sendable(&mut core.conns, key)?;
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let was_empty = conn.tx.is_empty();
        let r = if total > conn.tx.limit() - conn.tx.len() {
            Err(QueueFull)
        } else {
            parts
                .iter()
                .try_for_each(|p| conn.tx.push_copy(p, &mut core.pool))
        };
        core.after_push(key.index as usize, r, was_empty)
    }

    /// Queue a shared buffer for `key`: a refcount, not a copy. Use this to send
    /// one record to many connections.
    ///
    /// # Errors
    /// As for [`Ctx::send`].
    pub fn send_bytes(&mut self, key: ConnKey, data: Bytes) -> Result<(), SendError> {
        self.send_records(key, data, 1)
    }

    /// Queue a shared buffer that holds `records` whole records (a batch
    /// published at once); [`Ctx::queued_records`] and [`Ctx::drop_oldest`]
    /// count them.
    ///
    /// # Errors
    /// As for [`Ctx::send`].
    pub fn send_records(
        &mut self,
        key: ConnKey,
        data: Bytes,
        records: u32,
    ) -> Result<(), SendError> {
        let core = &mut *self.core;
        let conn = sendable(&mut core.conns, key)?;
        let was_empty = conn.tx.is_empty();
        let r = conn.tx.push_shared(data, records);
        core.after_push(key.index as usize, r, was_empty)
    }

    /// Queue `frame` — the frame being handled in this [`crate::Handler::on_frame`]
    /// call — for `to`, as [`Ctx::send`] would, but move the read buffer that
    /// holds it into `to`'s queue instead of copying when that is worth it (a
    /// frame of at least a quarter buffer that is most of what was read); the
    /// connection then reads on into a fresh pooled buffer. Any other frame is
    /// copied. At most one frame is moved per call to `on_frame`.
    ///
    /// # Errors
    /// As for [`Ctx::send`].
    pub fn forward(&mut self, to: ConnKey, frame: &Frame<'_>) -> Result<(), SendError> {
        let raw = frame.raw;
        let movable = match self.core.dispatching {
            Some(d) => {
                d.frame_addr == raw.as_ptr() as usize
                    && d.frame_len == raw.len()
                    && raw.len() >= self.core.pool.buf_len() / 4
                    && d.rest_len <= raw.len()
                    && self.core.forward_to.is_none()
            }
            None => false,
        };
        if !movable {
            return self.send(to, raw);
        }
        let core = &mut *self.core;
        let conn = sendable(&mut core.conns, to)?;
        let was_empty = conn.tx.is_empty();
        let r = conn.tx.push_pending(raw.len());
        if r.is_ok() {
            core.forward_to = Some(to);
        }
        core.after_push(to.index as usize, r, was_empty)
    }

    /// Write `key`'s queue to its socket now, as far as the socket takes it,
    /// instead of later in this turn. For a role that fans one read out to
    /// many queues: a queue then counts as full only when its peer is really
    /// behind, not because one turn queued more than its bound. Returns the
    /// bytes written (0 for a stale key or a socket that is not writable).
    pub fn flush(&mut self, key: ConnKey) -> usize {
        if self.core.conn(key).is_none() {
            return 0;
        }
        let idx = key.index as usize;
        // All the socket takes: the role asked, to judge what is left.
        let written = self.core.write_queued(idx, usize::MAX);
        // The pump later in the turn tells the role (`on_writable`) if it asked.
        self.core.mark_ready(idx);
        written
    }

    /// Drop whole queued buffers sent with [`Ctx::send_bytes`] or
    /// [`Ctx::send_records`] from the front of `key`'s queue until `need` more
    /// bytes fit and at most `keep_records` records remain, never touching a
    /// buffer that is partly written. Returns the records and bytes dropped.
    pub fn drop_oldest(&mut self, key: ConnKey, need: usize, keep_records: usize) -> Dropped {
        match self.core.conn_mut(key) {
            Some(c) => c.tx.drop_oldest(need, keep_records),
            None => Dropped::default(),
        }
    }

    /// Records queued for `key` with [`Ctx::send_bytes`] (one each) and
    /// [`Ctx::send_records`] and not completely written; `None` for a stale key.
    pub fn queued_records(&self, key: ConnKey) -> Option<usize> {
        self.core.conn(key).map(|c| c.tx.records())
    }

    /// Bytes queued for `key` and not yet written (`None` for a stale key).
    pub fn queued(&self, key: ConnKey) -> Option<usize> {
        self.core.conn(key).map(|c| c.tx.len())
    }

    /// Room left in `key`'s send queue (`None` for a stale key).
    pub fn send_capacity(&self, key: ConnKey) -> Option<usize> {
        self.core.conn(key).map(|c| c.tx.limit() - c.tx.len())
    }

    /// The size of one read buffer: the most bytes one frame callback can carry.
    pub fn read_buffer_len(&self) -> usize {
        self.core.pool.buf_len()
    }

    /// Input read from `key` but not yet decoded into a frame (a partial frame).
    /// Also answers in [`crate::Handler::on_closed`], to see what a closing peer
    /// left unfinished. Empty for a stale key.
    pub fn pending_input(&self, key: ConnKey) -> &[u8] {
        self.core
            .conns
            .get(key.index as usize)
            .filter(|c| c.named_by(key))
            .and_then(|c| c.rx.as_ref())
            .map(|b| b.data())
            .unwrap_or_default()
    }

    /// Drop `n` bytes of [`Ctx::pending_input`] (after taking them as a frame
    /// some other way, e.g. a line that never got its newline). The decoder
    /// starts afresh on what remains.
    pub fn consume_input(&mut self, key: ConnKey, n: usize) {
        let core = &mut *self.core;
        let Some(c) = core.conns.get_mut(key.index as usize) else {
            return;
        };
        if !c.named_by(key) {
            return;
        }
        c.decoder.reset();
        if let Some(mut b) = c.rx.take() {
            b.consume(n);
            if b.is_empty() {
                core.pool.give_back(b);
            } else {
                c.rx = Some(b);
            }
        }
    }

    /// When `key` last read any bytes (or connected), `None` for a stale key.
    pub fn last_read(&self, key: ConnKey) -> Option<Instant> {
        self.core.conn(key).map(|c| c.last_active)
    }

    /// Turn on TCP keepalive probes for `key` (first probe after `idle`, then
    /// every `interval`) and, on Linux, `TCP_USER_TIMEOUT`, so a peer that
    /// vanished without a FIN or RST is noticed.
    ///
    /// # Errors
    /// What the operating system said; a stale key is ignored.
    pub fn set_keepalive(&mut self, key: ConnKey, keepalive: Keepalive) -> io::Result<()> {
        let Some(c) = self.core.conn(key) else {
            return Ok(());
        };
        let sock = socket2::SockRef::from(&c.sock);
        let params = socket2::TcpKeepalive::new()
            .with_time(keepalive.idle)
            .with_interval(keepalive.interval);
        sock.set_tcp_keepalive(&params)?;
        #[cfg(any(target_os = "linux", target_os = "android"))]
        sock.set_tcp_user_timeout(keepalive.user_timeout)?;
        Ok(())
    }

    /// Close `key` (reason [`CloseReason::Stalled`]) once its send queue has
    /// held bytes and not moved for `timeout`; `None` removes the check.
    pub fn set_stall_timeout(&mut self, key: ConnKey, timeout: Option<Duration>) {
        let core = &mut *self.core;
        let now = core.now;
        let Some(c) = live_mut(&mut core.conns, key) else {
            return;
        };
        if let Some(t) = c.stall_timer.take() {
            core.timers.cancel(t);
        }
        c.stall_timeout = timeout;
        if let Some(d) = timeout {
            c.stall_timer = Some(core.timers.insert(now + d, TimerOwner::Stall(key)));
        }
    }

    /// A thread-safe handle to this engine (for a role's helper thread).
    pub fn handle(&self) -> Handle {
        Handle {
            shared: std::sync::Arc::clone(&self.core.shared),
        }
    }

    /// The peer address of `key`.
    pub fn peer_addr(&self, key: ConnKey) -> Option<SocketAddr> {
        self.core.conn(key).map(|c| c.peer)
    }

    /// What `key` is to its role: the tag it was accepted or opened with
    /// ([`ListenOptions::tag`], [`ConnectOptions::tag`]) or last given
    /// ([`Ctx::set_tag`]). The engine keeps it with the connection, so a
    /// role tells its kinds of connection apart without a table of its own.
    /// `None` for a stale key.
    pub fn tag(&self, key: ConnKey) -> Option<u64> {
        self.core.conn(key).map(|c| c.tag)
    }

    /// Give `key` a new tag (a connection changed what it is to the role:
    /// a device that identified, say).
    pub fn set_tag(&mut self, key: ConnKey, tag: u64) {
        if let Some(c) = self.core.conn_mut(key) {
            c.tag = tag;
        }
    }

    /// Close `key` after its queued bytes are written (at most `engine.linger`).
    /// The role's [`crate::Handler::on_closed`] follows at the end of the turn.
    pub fn close(&mut self, key: ConnKey) {
        let reason = match self.core.conn(key) {
            Some(c) if c.read_closed => CloseReason::PeerClosed,
            _ => CloseReason::Local,
        };
        self.core.close_gracefully(key, reason);
    }

    /// Half-close `key`: once its queued bytes are written, shut down its
    /// sending side (the peer reads EOF) and keep reading. Nothing more can
    /// be queued afterwards ([`SendError::Closed`]); the role still closes
    /// the connection when it is done with it.
    pub fn shutdown_write(&mut self, key: ConnKey) {
        if let Some(c) = self.core.conn_mut(key)
            && c.shut_write == ShutWrite::No
        {
            c.shut_write = ShutWrite::Pending;
            self.core.mark_ready(key.index as usize);
        }
    }

    /// Close `key` now, dropping anything queued.
    pub fn abort(&mut self, key: ConnKey) {
        if self.core.conn(key).is_some() {
            self.core.close_now(key.index as usize, CloseReason::Local);
        }
    }

    /// End `key` abnormally: drop anything queued and close with a TCP reset
    /// (RST, `SO_LINGER` 0) instead of a FIN, so the peer reads an error
    /// (`ECONNRESET`) rather than a clean end of stream. For a connection
    /// whose data was cut short, e.g. a tunnel stream whose link died: the
    /// peer must be able to tell a truncated transfer from a complete one.
    pub fn reset(&mut self, key: ConnKey) {
        let Some(c) = self.core.conn(key) else {
            return;
        };
        if let Err(e) = socket2::SockRef::from(&c.sock).set_linger(Some(Duration::ZERO)) {
            debug!("{key}: SO_LINGER 0: {e}");
        }
        self.core.close_now(key.index as usize, CloseReason::Local);
    }

    /// Stop reading from `key` (its bytes wait in the kernel; TCP pushes back).
    pub fn pause_reading(&mut self, key: ConnKey) {
        if let Some(c) = self.core.conn_mut(key) {
            c.readiness.interest &= !READABLE;
            c.notify_writable = true;
        }
    }

    /// Ask for [`crate::Handler::on_writable`] once `key`'s send queue has
    /// drained (for a role that paused a sender because `key` was nearly full).
    pub fn notify_writable(&mut self, key: ConnKey) {
        let now_empty = match self.core.conn_mut(key) {
            Some(c) => {
                c.notify_writable = true;
                c.tx.is_empty()
            }
            None => false,
        };
        if now_empty {
            // Already drained: the next pump reports it.
            self.core.mark_ready(key.index as usize);
        }
    }

    /// Resume reading from `key`; buffered input is decoded this turn.
    pub fn resume_reading(&mut self, key: ConnKey) {
        if let Some(c) = self.core.conn_mut(key)
            && c.readiness.interest & READABLE == 0
        {
            c.readiness.interest |= READABLE;
            self.core.mark_ready(key.index as usize);
        }
    }

    /// Whether reading from `key` is paused.
    pub fn is_paused(&self, key: ConnKey) -> bool {
        self.core
            .conn(key)
            .is_some_and(|c| c.readiness.interest & READABLE == 0)
    }

    /// Change how `key`'s input is cut into frames. Bytes already buffered are
    /// decoded with the new framing.
    pub fn set_framing(&mut self, key: ConnKey, framing: Framing) {
        if let Some(c) = self.core.conn_mut(key) {
            c.decoder = crate::codec::Decoder::new(framing);
            self.core.mark_ready(key.index as usize);
        }
    }

    /// Close `key` (reason [`CloseReason::IdleTimeout`]) once no byte has been
    /// read from it for `timeout`; `None` removes the idle timeout. Activity
    /// costs nothing per read: the deadline is checked when the timer fires.
    pub fn set_idle_timeout(&mut self, key: ConnKey, timeout: Option<Duration>) {
        let core = &mut *self.core;
        let now = core.now;
        let Some(c) = live_mut(&mut core.conns, key) else {
            return;
        };
        if let Some(t) = c.idle_timer.take() {
            core.timers.cancel(t);
        }
        c.idle_timeout = timeout;
        if let Some(d) = timeout {
            c.last_active = now;
            c.idle_timer = Some(core.timers.insert(now + d, TimerOwner::Idle(key)));
        }
    }

    /// Open a listener whose connections belong to the calling role.
    ///
    /// # Errors
    /// A [`ListenError`] naming the address (for example "address in use").
    pub fn listen(
        &mut self,
        addr: SocketAddr,
        opts: ListenOptions,
    ) -> Result<ListenerId, ListenError> {
        let core = &mut *self.core;
        let backlog = core.config.listen_backlog;
        let mut sock = bind_listener(addr, backlog).map_err(|error| ListenError { addr, error })?;
        let local = sock
            .local_addr()
            .map_err(|error| ListenError { addr, error })?;
        let entry = core.listeners.vacant_entry();
        let idx = entry.key();
        core.poll
            .registry()
            .register(&mut sock, listener_token(idx), mio::Interest::READABLE)
            .map_err(|error| ListenError { addr, error })?;
        entry.insert(Listener {
            sock,
            role: self.role,
            opts,
            local,
            ready: false,
        });
        debug!("listener {idx} open on {local}");
        Ok(ListenerId(idx))
    }

    /// The bound address of a listener (the real port when asked for port 0).
    pub fn listener_addr(&self, id: ListenerId) -> Option<SocketAddr> {
        self.core.listeners.get(id.0).map(|l| l.local)
    }

    /// Close a listener; its accepted connections stay open.
    pub fn close_listener(&mut self, id: ListenerId) {
        self.core.close_listener(id.0);
    }

    /// Start an outbound connection. [`crate::Handler::on_connected`] or
    /// [`crate::Handler::on_connect_failed`] follows. Bytes sent before it is
    /// connected are queued.
    ///
    /// # Errors
    /// The error if the connect could not even start, or
    /// `io::ErrorKind::QuotaExceeded`-like `Other` when `max_connections` is reached.
    pub fn connect(&mut self, addr: SocketAddr, opts: ConnectOptions) -> io::Result<ConnKey> {
        let core = &mut *self.core;
        if core.conns.len() >= core.config.max_connections {
            return Err(io::Error::other("max_connections reached"));
        }
        let sock = TcpStream::connect(addr)?;
        if opts.nodelay {
            sock.set_nodelay(true).ok();
        }
        let setup = Setup {
            framing: opts.framing,
            queue_bytes: opts.queue_bytes,
            tag: opts.tag,
            outbound: true,
        };
        let key = core.insert_conn(sock, addr, self.role, setup)?;
        let timeout = opts.timeout.unwrap_or(core.config.connect_timeout);
        let at = core.now + timeout;
        if let Some(c) = core.conns.get_mut(key.index as usize)
            && let State::Connecting { timeout, .. } = &mut c.state
        {
            *timeout = Some(core.timers.insert(at, TimerOwner::Connect(key)));
        }
        debug!("{key} connecting to {addr}");
        Ok(key)
    }

    /// Call [`crate::Handler::on_timer`] with `purpose` (the role's own
    /// number for what the timer is for) at `at`, or at the next turn if `at`
    /// has passed.
    pub fn set_timer(&mut self, at: Instant, purpose: u64) -> TimerKey {
        self.core
            .timers
            .insert(at, TimerOwner::Role(self.role, purpose))
    }

    /// Call [`crate::Handler::on_conn_timer`] with `conn` and `purpose` at
    /// `at`, unless `conn` closes first: the engine cancels a connection's
    /// timers when it closes, so the role never does. `None` if `conn` is
    /// gone already.
    pub fn set_conn_timer(&mut self, conn: ConnKey, at: Instant, purpose: u64) -> Option<TimerKey> {
        let core = &mut *self.core;
        let c = live_mut(&mut core.conns, conn)?;
        let t = core
            .timers
            .insert(at, TimerOwner::RoleConn(self.role, conn, purpose));
        c.track_timer(t);
        Some(t)
    }

    /// Cancel a timer; a key that already fired or was cancelled is ignored.
    pub fn cancel_timer(&mut self, key: TimerKey) {
        if let Some(TimerOwner::RoleConn(_, conn, _)) = self.core.timers.cancel(key)
            && let Some(c) = self.core.conn_mut(conn)
        {
            c.forget_timer(key);
        }
    }

    /// Connections held by the engine now.
    pub fn connection_count(&self) -> usize {
        self.core.conns.len()
    }

    /// Ask for a status or metrics report: at the end of the loop turn every
    /// role writes its part ([`crate::Handler::report`]) and the calling role
    /// gets the whole document in [`crate::Handler::on_report`] with `conn`.
    /// Requests of one kind in one turn share one build.
    pub fn request_report(&mut self, conn: ConnKey, kind: super::ReportKind) {
        self.core.reports.push((self.role, conn, kind));
    }

    /// Stop the engine (as SIGTERM does).
    pub fn stop(&mut self) {
        self.core.stop_requested = true;
    }
}

/// A non-blocking listener with `SO_REUSEADDR` (a restart never waits for
/// TIME_WAIT) and an accept queue of `backlog` (mio's own bind uses 128, which
/// drops connection bursts while the loop is busy).
fn bind_listener(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    Ok(TcpListener::from_std(sock.into()))
}

/// The connection `key` names, if it still takes output (open or connecting).
fn sendable(conns: &mut Slab<Conn>, key: ConnKey) -> Result<&mut Conn, SendError> {
    match conns.get_mut(key.index as usize) {
        Some(c)
            if c.named_by(key)
                && matches!(c.state, State::Open | State::Connecting { .. })
                && c.shut_write == ShutWrite::No =>
        {
            Ok(c)
        }
        _ => Err(SendError::Closed),
    }
}

// ===== impl Core (send path) =====

impl Core {
    fn after_push(
        &mut self,
        idx: usize,
        r: Result<(), QueueFull>,
        was_empty: bool,
    ) -> Result<(), SendError> {
        let Some(conn) = self.conns.get_mut(idx) else {
            return Err(SendError::Closed);
        };
        match r {
            Ok(()) => {
                if was_empty {
                    conn.last_progress = self.now;
                }
                if conn.tx.len() > conn.tx.limit() / 2 {
                    conn.notify_writable = true;
                }
                self.mark_ready(idx);
                Ok(())
            }
            Err(QueueFull) => {
                conn.notify_writable = true;
                Stats::add(&self.shared.stats.queue_full_total, 1);
                if !conn.tx.is_empty() {
                    self.mark_ready(idx);
                } else {
                    warn!("c{idx}: send larger than the whole queue bound was refused");
                }
                Err(SendError::Full)
            }
        }
    }
}
