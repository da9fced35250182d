//! The event loop: one `mio::Poll`, one `Slab` of connections, one thread.
//!
//! Invariant: only this module touches sockets. Every socket is registered once,
//! edge-triggered; reads, writes and accepts drain until `WouldBlock` or a
//! budget, and a connection whose drain stopped early goes on the ready list so
//! the next poll does not sleep. Slab slots are freed only at the end of a turn,
//! so a token in the current `Events` batch never names a different connection.
//! Allocation: none per read, frame or write in steady state (pooled buffers,
//! reused event, ready and close lists).

mod buffer;
mod conn;
mod ctx;
mod handle;
mod handler;
mod logging;
mod reload;
pub mod report;
mod timer;
mod token;

pub use ctx::{
    ConnectOptions, Ctx, Dropped, Keepalive, ListenError, ListenOptions, SendError, View,
};
pub use handle::{Handle, HandleError, Message, StatsSnapshot};
pub use handler::{Handler, OnFrameError, Reconfigure};
pub use logging::{
    LOG_LINE_BYTES, LOG_QUEUE_LINES, LogLimit, LogSink, PREVIEW_BYTES, Preview, Suppressed,
    flush_logs, log_dropped_total,
};
pub(crate) use reload::RoleRecord;
pub use report::{Report, ReportKind};
pub use timer::TimerKey;
pub use token::{ConnKey, ListenerId};

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, IoSlice, Read};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{debug, error, info, trace, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Waker};
use slab::Slab;

use crate::codec::{Decoded, Decoder, FrameError, Framing};
use crate::config::EngineConfig;
use buffer::{BufferPool, MAX_IOV, SendQueue};
use conn::{Conn, HUP, READABLE, Readiness, SHORT_IO_DRAINS, ShutWrite, State, WRITABLE};
use handle::{Command, Shared, Stats};
use timer::Timers;
use token::Target;

/// Events fetched per `poll` call.
const EVENTS_CAPACITY: usize = 1024;
/// Accepts per listener per turn before other work gets a turn.
const ACCEPT_BUDGET: usize = 256;
/// Timers fired per turn before the loop polls again (with a zero timeout).
const TIMER_BUDGET: usize = 4096;
/// Bytes one flush may write to one connection before the others get their
/// turn (the rest follows from the ready list): one client taking a large
/// response cannot hold the loop for the time the kernel takes to copy it.
const WRITE_BUDGET: usize = 256 * 1024;
/// Frames or syscalls one pump may handle before the connection is closed as a
/// bug (a role that resumes forever, say); far above any legitimate count.
/// How often the buffer pool frees buffers that stayed unused meanwhile.
const POOL_TRIM_INTERVAL: Duration = Duration::from_secs(1);
const MAX_LOOP_ITERATIONS: usize = 1 << 20;
/// `poll` failures in a row before the engine gives up.
const MAX_POLL_ERRORS: u32 = 16;
/// Linux errno values for resource exhaustion on `accept` (the same on every
/// Linux architecture, and EMFILE/ENFILE also on the BSDs and macOS).
const ENOMEM: i32 = 12;
const ENFILE: i32 = 23;
const EMFILE: i32 = 24;
const ENOBUFS: i32 = 105;

/// Identifies a role added to an [`Engine`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RoleId(pub(crate) usize);

/// Why a connection closed (given to [`Handler::on_closed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer closed its side and the engine finished with the connection.
    PeerClosed,
    /// The socket failed (reset, broken pipe, ...).
    Io(io::ErrorKind),
    /// A role closed it ([`Ctx::close`] / [`Ctx::abort`]).
    Local,
    /// Nothing was read for the configured idle timeout.
    IdleTimeout,
    /// The input broke the connection's framing.
    Frame(FrameError),
    /// An outbound connect did not complete in time.
    ConnectTimeout,
    /// Queued bytes could not be flushed within `engine.linger`.
    LingerTimeout,
    /// The send queue did not move for the connection's stall timeout.
    Stalled,
    /// The engine is shutting down.
    Shutdown,
    /// An internal guard tripped (logged as a bug).
    Bug,
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::PeerClosed => f.write_str("peer closed"),
            CloseReason::Io(k) => write!(f, "i/o error: {k}"),
            CloseReason::Local => f.write_str("closed locally"),
            CloseReason::IdleTimeout => f.write_str("idle timeout"),
            CloseReason::Frame(e) => write!(f, "framing error: {e}"),
            CloseReason::ConnectTimeout => f.write_str("connect timeout"),
            CloseReason::LingerTimeout => f.write_str("could not flush before linger timeout"),
            CloseReason::Stalled => f.write_str("send queue stalled"),
            CloseReason::Shutdown => f.write_str("shutdown"),
            CloseReason::Bug => f.write_str("internal guard tripped"),
        }
    }
}

/// The engine failed to start or to keep running.
#[derive(Debug)]
pub enum EngineError {
    /// A listener could not be opened (the address is named).
    Listen(ListenError),
    /// A role refused to start.
    Role {
        /// The role's name.
        role: String,
        /// What it said.
        message: String,
    },
    /// Poll setup or the poll loop failed.
    Io(io::Error),
}

impl fmt::Display for EngineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EngineError::Listen(e) => e.fmt(f),
            EngineError::Role { role, message } => write!(f, "role {role}: {message}"),
            EngineError::Io(e) => write!(f, "event loop: {e}"),
        }
    }
}

impl std::error::Error for EngineError {}

impl From<ListenError> for EngineError {
    fn from(e: ListenError) -> EngineError {
        EngineError::Listen(e)
    }
}

impl From<io::Error> for EngineError {
    fn from(e: io::Error) -> EngineError {
        EngineError::Io(e)
    }
}

/// What a timer belongs to.
#[derive(Debug, Clone, Copy)]
pub(crate) enum TimerOwner {
    /// A role's own timer, with the purpose it gave.
    Role(RoleId, u64),
    /// A role's timer for one of its connections (cancelled when it closes).
    RoleConn(RoleId, ConnKey, u64),
    Idle(ConnKey),
    Connect(ConnKey),
    Linger(ConnKey),
    Stall(ConnKey),
    AcceptBackoff,
    ShutdownDeadline,
}

pub(crate) struct Listener {
    sock: TcpListener,
    role: RoleId,
    opts: ListenOptions,
    local: SocketAddr,
    /// Readiness seen and not yet drained to `WouldBlock`.
    ready: bool,
}

/// A listener opened by a role, as reported by [`Engine::listeners`].
#[derive(Debug, Clone)]
pub struct ListenerInfo {
    /// The role's name.
    pub role: String,
    /// The bound address.
    pub addr: SocketAddr,
}

/// Where the frame being dispatched sits, for `Ctx::forward`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dispatching {
    frame_addr: usize,
    frame_len: usize,
    /// Unconsumed bytes after the frame in the read buffer.
    rest_len: usize,
}

/// Engine state that roles reach through [`Ctx`].
pub(crate) struct Core {
    poll: Poll,
    conns: Slab<Conn>,
    listeners: Slab<Listener>,
    timers: Timers<TimerOwner>,
    pool: BufferPool,
    /// Connections to pump without a new event.
    ready: Vec<usize>,
    /// Connections closed this turn, removed from the slab at its end.
    closed: Vec<usize>,
    now: Instant,
    next_generation: u32,
    config: EngineConfig,
    accept_backoff: Option<TimerKey>,
    limit_logged: bool,
    /// Connections closed for their framing: one warning a second.
    warn_frame: LogLimit,
    /// The frame being handed to a role, so `Ctx::forward` can recognise it.
    dispatching: Option<Dispatching>,
    /// Set by `Ctx::forward`: move the current frame's buffer to this connection.
    forward_to: Option<ConnKey>,
    accept_error_logged: bool,
    stop_requested: bool,
    shared: Arc<Shared>,
    /// When the engine was created (uptime in reports).
    pub(crate) born: Instant,
    /// When the buffer pool next gives back buffers a whole interval left unused.
    next_trim: Instant,
    /// Reports asked for with `Ctx::request_report`, served after the callback.
    reports: Vec<(RoleId, ConnKey, ReportKind)>,
}

/// The event loop and the roles it serves.
pub struct Engine {
    core: Core,
    roles: Vec<Box<dyn Handler>>,
    /// What each role's configuration was (None: added by hand), for the
    /// application's reload to compare against.
    pub(crate) role_records: Vec<Option<RoleRecord>>,
    /// The configuration file the application reloads on SIGHUP.
    pub(crate) config_path: Option<std::path::PathBuf>,
    /// Called on SIGHUP and [`Handle::reload`] (the application's reload).
    reload_hook: Option<fn(&mut Engine)>,
    events: Events,
    /// The ready list being worked on (swapped with `core.ready`).
    ready_work: Vec<usize>,
    signals: Option<signal_hook_mio::v1_0::Signals>,
    started: bool,
    stopping: bool,
}

// ===== impl Engine =====

impl Engine {
    /// A new engine with no roles yet.
    ///
    /// # Errors
    /// If the poll instance or the waker cannot be created.
    pub fn new(config: EngineConfig) -> Result<Engine, EngineError> {
        let poll = Poll::new()?;
        let waker = Waker::new(poll.registry(), token::WAKER)?;
        let shared = Arc::new(Shared {
            waker,
            inbox: Mutex::new(VecDeque::with_capacity(config.inbox)),
            capacity: config.inbox,
            stopped: AtomicBool::new(false),
            stats: Stats::default(),
        });
        let initial = config.max_connections.min(1024);
        let core = Core {
            poll,
            conns: Slab::with_capacity(initial),
            listeners: Slab::new(),
            timers: Timers::with_capacity(initial),
            pool: BufferPool::new(config.buffer_bytes, config.buffer_pool),
            ready: Vec::with_capacity(initial),
            closed: Vec::with_capacity(initial),
            now: Instant::now(),
            next_generation: 0,
            accept_backoff: None,
            limit_logged: false,
            warn_frame: LogLimit::default(),
            dispatching: None,
            forward_to: None,
            accept_error_logged: false,
            stop_requested: false,
            shared,
            config,
            born: Instant::now(),
            reports: Vec::new(),
            next_trim: Instant::now() + POOL_TRIM_INTERVAL,
        };
        Ok(Engine {
            core,
            roles: Vec::new(),
            role_records: Vec::new(),
            config_path: None,
            reload_hook: None,
            events: Events::with_capacity(EVENTS_CAPACITY),
            ready_work: Vec::with_capacity(initial),
            signals: None,
            started: false,
            stopping: false,
        })
    }

    /// Add a role; it starts (opens its listeners) in [`Engine::start`].
    pub fn add_role(&mut self, role: Box<dyn Handler>) -> RoleId {
        self.roles.push(role);
        RoleId(self.roles.len() - 1)
    }

    /// Roles added so far (retired ones included).
    pub(crate) fn role_count(&self) -> usize {
        self.roles.len()
    }

    /// The `[engine]` settings the engine runs with.
    pub(crate) fn engine_config(&self) -> &EngineConfig {
        &self.core.config
    }

    /// Read the clock again (work done outside the loop, such as a reload
    /// applied directly, then sets its timers from the present).
    pub(crate) fn refresh_now(&mut self) {
        self.core.now = Instant::now();
    }

    /// Stop on SIGINT/SIGTERM (graceful) and log SIGHUP. Only the process's
    /// main engine should call this.
    ///
    /// # Errors
    /// If the signal handlers cannot be installed.
    pub fn handle_signals(&mut self) -> Result<(), EngineError> {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let mut signals = signal_hook_mio::v1_0::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
        self.core
            .poll
            .registry()
            .register(&mut signals, token::SIGNALS, Interest::READABLE)?;
        self.signals = Some(signals);
        Ok(())
    }

    /// The id of the first role named `name` (for [`Handle::send`]).
    pub fn role_id(&self, name: &str) -> Option<RoleId> {
        self.roles.iter().position(|r| r.name() == name).map(RoleId)
    }

    /// A thread-safe handle to stop the engine or hand it messages.
    pub fn handle(&self) -> Handle {
        Handle {
            shared: Arc::clone(&self.core.shared),
        }
    }

    /// Start every role: open listeners and initial connections. Called by
    /// [`Engine::run`] if not called before; call it first to learn the bound
    /// addresses (for example after listening on port 0).
    ///
    /// # Errors
    /// The first role that fails, for example a listener whose address is in use.
    pub fn start(&mut self) -> Result<(), EngineError> {
        if self.started {
            return Ok(());
        }
        self.started = true;
        self.core.now = Instant::now();
        for (i, role) in self.roles.iter_mut().enumerate() {
            let mut ctx = Ctx {
                core: &mut self.core,
                role: RoleId(i),
            };
            role.start(&mut ctx)?;
        }
        Ok(())
    }

    /// The listeners the roles opened, with their bound addresses.
    pub fn listeners(&self) -> Vec<ListenerInfo> {
        self.core
            .listeners
            .iter()
            .map(|(_, l)| ListenerInfo {
                role: self
                    .roles
                    .get(l.role.0)
                    .map(|r| r.name().to_owned())
                    .unwrap_or_default(),
                addr: l.local,
            })
            .collect()
    }

    /// Run until stopped (signal, [`Handle::stop`] or [`Ctx::stop`]), then flush
    /// queues for up to `engine.shutdown_timeout` and return.
    ///
    /// # Errors
    /// Start-up failures, or `poll` failing repeatedly.
    pub fn run(&mut self) -> Result<(), EngineError> {
        self.start()?;
        let mut poll_errors = 0;
        let result = loop {
            if self.stopping && self.core.conns.is_empty() {
                break Ok(());
            }
            match self.turn() {
                Ok(()) => poll_errors = 0,
                Err(e) => {
                    poll_errors += 1;
                    Stats::add(&self.core.shared.stats.poll_errors_total, 1);
                    error!("poll failed ({poll_errors} in a row): {e}");
                    if poll_errors >= MAX_POLL_ERRORS {
                        break Err(EngineError::Io(e));
                    }
                }
            }
        };
        self.core.shared.stopped.store(true, Ordering::Release);
        info!("engine stopped");
        result
    }

    /// One loop iteration: poll, dispatch events, fire timers, work the ready
    /// list, remove closed connections, resume accepting.
    fn turn(&mut self) -> io::Result<()> {
        let timeout = self.poll_timeout();
        match self.core.poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        self.core.now = Instant::now();
        Stats::add(&self.core.shared.stats.turns_total, 1);
        let events = std::mem::replace(&mut self.events, Events::with_capacity(0));
        for event in events.iter() {
            match token::target(event.token()) {
                Target::Conn(idx) => {
                    if let Some(c) = self.core.conns.get_mut(idx) {
                        // Errors and hang-ups surface through the next read/write.
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            c.readiness.event |= READABLE;
                        }
                        if event.is_read_closed() || event.is_error() {
                            c.readiness.event |= HUP;
                        }
                        if event.is_writable() || event.is_write_closed() || event.is_error() {
                            c.readiness.event |= WRITABLE;
                        }
                        self.pump(idx);
                    }
                }
                Target::Listener(l) => {
                    if let Some(l) = self.core.listeners.get_mut(l) {
                        l.ready = true;
                    }
                    self.accept(l);
                }
                Target::Waker => self.drain_inbox(),
                Target::Signals => self.read_signals(),
            }
        }
        self.events = events;
        self.fire_timers();
        self.work_ready_list();
        if !self.core.reports.is_empty() {
            self.serve_reports();
        }
        self.reap();
        if self.core.now >= self.core.next_trim {
            let freed = self.core.pool.trim();
            if freed > 0 {
                trace!("buffer pool: {freed} idle buffers freed");
            }
            self.core.next_trim = self.core.now + POOL_TRIM_INTERVAL;
        }
        let lent = self.core.pool.lent as u64;
        self.core
            .shared
            .stats
            .buffers_lent
            .store(lent, Ordering::Relaxed);
        if self.core.stop_requested {
            self.begin_stop();
        }
        if self.core.can_accept() {
            for l in 0..self.core.listeners.capacity() {
                if self.core.listeners.get(l).is_some_and(|l| l.ready) {
                    self.accept(l);
                }
            }
        }
        Ok(())
    }

    fn poll_timeout(&mut self) -> Option<Duration> {
        let accept_pending =
            self.core.can_accept() && self.core.listeners.iter().any(|(_, l)| l.ready);
        if !self.core.ready.is_empty()
            || !self.core.closed.is_empty()
            || !self.core.reports.is_empty()
            || accept_pending
        {
            return Some(Duration::ZERO);
        }
        let next = self.core.timers.next_deadline();
        // An idle loop still wakes up to give back buffers left from a burst.
        let trim = self.core.pool.trimmable().then_some(self.core.next_trim);
        let at = match (next, trim) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        at.map(|at| at.saturating_duration_since(Instant::now()))
    }

    /// Accept until `WouldBlock`, the connection limit, fd exhaustion or the budget.
    fn accept(&mut self, lidx: usize) {
        for _ in 0..ACCEPT_BUDGET {
            if !self.core.can_accept() {
                if self.core.conns.len() >= self.core.config.max_connections
                    && !self.core.limit_logged
                {
                    self.core.limit_logged = true;
                    Stats::add(&self.core.shared.stats.accept_paused_limit_total, 1);
                    warn!(
                        "max_connections ({}) reached: accepting paused until a connection closes",
                        self.core.config.max_connections
                    );
                }
                return;
            }
            let Some(l) = self.core.listeners.get_mut(lidx) else {
                return;
            };
            if !l.ready {
                return;
            }
            match l.sock.accept() {
                Ok((sock, peer)) => {
                    let (role, opts) = (l.role, l.opts);
                    if self.core.accept_error_logged {
                        self.core.accept_error_logged = false;
                        info!("accepting again on {}", l.local);
                    }
                    if opts.nodelay {
                        sock.set_nodelay(true).ok();
                    }
                    match self.core.insert_conn(
                        sock,
                        peer,
                        role,
                        opts.framing,
                        opts.queue_bytes,
                        false,
                    ) {
                        Ok(key) => {
                            Stats::add(&self.core.shared.stats.accepted_total, 1);
                            debug!("{key} accepted from {peer}");
                            self.call(role, |r, ctx| r.on_accept(ctx, ListenerId(lidx), key, peer));
                        }
                        Err(e) => warn!("cannot register connection from {peer}: {e}"),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    l.ready = false;
                    return;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted
                            | io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                    ) => {}
                Err(e) => {
                    let exhausted =
                        matches!(e.raw_os_error(), Some(EMFILE | ENFILE | ENOBUFS | ENOMEM));
                    if exhausted {
                        Stats::add(&self.core.shared.stats.accept_paused_fd_total, 1);
                    }
                    let backoff = self.core.config.accept_backoff;
                    if self.core.accept_error_logged {
                        debug!("accept on {} failed again: {e}", l.local);
                    } else {
                        self.core.accept_error_logged = true;
                        warn!(
                            "accept on {} failed: {e}; accepting paused for {backoff:?} at a time",
                            l.local
                        );
                    }
                    let at = self.core.now + backoff;
                    self.core.accept_backoff =
                        Some(self.core.timers.insert(at, TimerOwner::AcceptBackoff));
                    return;
                }
            }
        }
    }

    /// Flush, read and dispatch one connection, then flush what the reads produced.
    fn pump(&mut self, idx: usize) {
        let Some(c) = self.core.conns.get_mut(idx) else {
            return;
        };
        c.in_ready_list = false;
        match c.state {
            State::Closed => return,
            State::Connecting => {
                if !self.finish_connect(idx) {
                    return;
                }
            }
            State::Closing | State::Draining => {
                self.core.write_queued(idx, WRITE_BUDGET);
                self.core.discard_input(idx);
                return;
            }
            State::Open => {}
        }
        self.flush(idx);
        self.read(idx);
        self.flush(idx);
    }

    /// mio's connect sequence: on an event, `take_error`, then `peer_addr`.
    /// Returns true once connected.
    fn finish_connect(&mut self, idx: usize) -> bool {
        let Some(c) = self.core.conns.get_mut(idx) else {
            return false;
        };
        let key = c.key(idx);
        if c.readiness.event == 0 {
            return false;
        }
        let failed = match c.sock.take_error() {
            Ok(Some(e)) | Err(e) => Some(e),
            Ok(None) => match c.sock.peer_addr() {
                Ok(_) => None,
                Err(e)
                    if e.kind() == io::ErrorKind::NotConnected || e.raw_os_error() == Some(115) =>
                {
                    // EINPROGRESS / not yet connected: wait for the next event.
                    c.readiness.event = 0;
                    return false;
                }
                Err(e) => Some(e),
            },
        };
        if let Some(e) = failed {
            debug!("{key} connect to {} failed: {e}", c.peer);
            self.core.close_now(idx, CloseReason::Io(e.kind()));
            return false;
        }
        c.state = State::Open;
        c.never_connected = false;
        c.last_active = self.core.now;
        if let Some(t) = c.aux_timer.take() {
            self.core.timers.cancel(t);
        }
        Stats::add(&self.core.shared.stats.connected_total, 1);
        debug!("{key} connected to {}", c.peer);
        let role = c.role;
        self.call(role, |r, ctx| r.on_connected(ctx, key));
        if let Some(reason) = self
            .core
            .conns
            .get_mut(idx)
            .and_then(|c| c.close_when_connected.take())
        {
            self.core.close_gracefully(key, reason);
        }
        self.core
            .conns
            .get(idx)
            .is_some_and(|c| c.state != State::Closed)
    }

    /// Read until `WouldBlock`, EOF, the read budget, or the role pauses;
    /// decode and dispatch frames after every read.
    fn read(&mut self, idx: usize) {
        let Some(c) = self.core.conns.get_mut(idx) else {
            return;
        };
        let key = c.key(idx);
        let role = c.role;
        let mut rx = match c.rx.take() {
            Some(b) => b,
            None if c.can_read() && c.readiness.event & READABLE != 0 => self.core.pool.take(),
            None => return,
        };
        let mut budget = self.core.config.read_budget;
        let mut eof = false;
        for _ in 0..MAX_LOOP_ITERATIONS {
            let (go_on, frames) = self.dispatch(idx, key, role, &mut rx);
            if frames > 0 {
                self.call(role, |r, ctx| r.on_input_done(ctx, key));
            }
            if !go_on {
                break;
            }
            // Write what the frames produced before reading more, so the
            // queue stays short and its blocks are reused.
            if self.core.conns.get(idx).is_some_and(|c| !c.tx.is_empty()) {
                self.flush(idx);
            }
            let Some(c) = self.core.conns.get_mut(idx) else {
                break;
            };
            if !c.can_read() || !c.readiness.wants(READABLE) {
                break;
            }
            if budget == 0 {
                self.core.mark_ready(idx);
                break;
            }
            let space = rx.space();
            if space.is_empty() {
                // Validation keeps every bounded frame within one buffer, so a
                // full buffer that decodes nothing is a framing error.
                let max = self.core.pool.buf_len();
                self.core.close_now(
                    idx,
                    CloseReason::Frame(FrameError::TooLong { len: rx.len(), max }),
                );
                break;
            }
            let asked = c.read_len(space.len());
            let space = space.get_mut(..asked).unwrap_or_default();
            match c.sock.read(space) {
                Ok(0) => {
                    c.read_closed = true;
                    c.readiness.event &= !READABLE;
                    eof = true;
                    break;
                }
                Ok(n) => {
                    trace!("{key} read {n} bytes");
                    if SHORT_IO_DRAINS && n < asked && c.readiness.event & HUP == 0 {
                        c.readiness.event &= !READABLE;
                    }
                    if n == asked {
                        c.filled_read();
                    }
                    rx.fill(n);
                    budget -= 1;
                    c.last_active = self.core.now;
                    Stats::add(&self.core.shared.stats.bytes_in_total, n as u64);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    c.readiness.event &= !READABLE;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!("{key} read failed: {e}");
                    self.core.close_now(idx, CloseReason::Io(e.kind()));
                    break;
                }
            }
        }
        match self.core.conns.get_mut(idx) {
            Some(c) if !rx.is_empty() => c.rx = Some(rx),
            _ => self.core.pool.give_back(rx),
        }
        if eof {
            debug!("{key} peer closed its sending side");
            self.call(role, |r, ctx| r.on_read_closed(ctx, key));
        }
    }

    /// Decode and hand frames to the role until input runs out or the
    /// connection stops reading. Returns whether reading may go on, and how
    /// many frames were handed over.
    fn dispatch(
        &mut self,
        idx: usize,
        key: ConnKey,
        role: RoleId,
        rx: &mut buffer::Buffer,
    ) -> (bool, usize) {
        let mut frames = 0;
        for _ in 0..MAX_LOOP_ITERATIONS {
            let Some(c) = self.core.conns.get_mut(idx) else {
                return (false, frames);
            };
            if c.state != State::Open || c.readiness.interest & READABLE == 0 {
                return (false, frames);
            }
            if rx.is_empty() {
                return (true, frames);
            }
            let used = match c.decoder.decode(rx.data()) {
                Ok(Decoded::Frame(frame, used)) => {
                    trace!("{key} frame of {} bytes", frame.raw.len());
                    self.core.dispatching = Some(Dispatching {
                        frame_addr: frame.raw.as_ptr() as usize,
                        frame_len: frame.raw.len(),
                        rest_len: rx.len() - used,
                    });
                    self.call(role, |r, ctx| r.on_frame(ctx, key, frame));
                    self.core.dispatching = None;
                    frames += 1;
                    used
                }
                Ok(Decoded::Skipped(n)) => {
                    trace!("{key} skipped {n} bytes while resynchronising");
                    n
                }
                Ok(Decoded::NeedMore) => return (true, frames),
                Err(e) => {
                    Stats::add(&self.core.shared.stats.frame_errors_total, 1);
                    let mut action = OnFrameError::Close;
                    self.call(role, |r, ctx| action = r.on_frame_error(ctx, key, e));
                    let resynced = action == OnFrameError::Resync
                        && self.core.conn_mut(key).is_some_and(|c| c.decoder.resync());
                    if resynced {
                        continue;
                    }
                    let now = self.core.now;
                    if let Some(n) = self.core.warn_frame.check(now)
                        && let Some(c) = self.core.conn(key)
                    {
                        warn!("{key} from {}: {e}; closing{}", c.peer, Suppressed(n));
                    }
                    self.core.close_now(idx, CloseReason::Frame(e));
                    return (false, frames);
                }
            };
            match self.core.forward_to.take() {
                Some(to) => self.core.move_frame(rx, used, to),
                None => rx.consume(used),
            }
        }
        error!("{key}: frame loop guard tripped; closing (bug)");
        self.core.close_now(idx, CloseReason::Bug);
        (false, frames)
    }

    /// Write queued bytes until `WouldBlock` or empty; once empty, tell the
    /// role if it asked to hear of it.
    fn flush(&mut self, idx: usize) {
        self.core.write_queued(idx, WRITE_BUDGET);
        let Some(c) = self.core.conns.get_mut(idx) else {
            return;
        };
        if c.state != State::Open || !c.tx.is_empty() || !c.notify_writable {
            return;
        }
        c.notify_writable = false;
        let key = c.key(idx);
        let role = c.role;
        self.call(role, |r, ctx| r.on_writable(ctx, key));
    }

    /// A stall timer fired: close if the queue has been non-empty and unmoved
    /// for the stall timeout, otherwise check again when it could be.
    fn stall_check(&mut self, key: ConnKey) {
        let now = self.core.now;
        let Some(c) = self.core.conn_mut(key) else {
            return;
        };
        c.stall_timer = None;
        let Some(limit) = c.stall_timeout else {
            return;
        };
        let at = if c.tx.is_empty() {
            now + limit
        } else if now >= c.last_progress + limit {
            debug!(
                "{key}: {} bytes queued, none written for {limit:?}; closing",
                c.tx.len()
            );
            self.core
                .close_now(key.index as usize, CloseReason::Stalled);
            return;
        } else {
            c.last_progress + limit
        };
        let t = self.core.timers.insert(at, TimerOwner::Stall(key));
        if let Some(c) = self.core.conn_mut(key) {
            c.stall_timer = Some(t);
        }
    }

    /// Run one role callback with a [`Ctx`] over the engine core.
    pub(crate) fn call(&mut self, role: RoleId, f: impl FnOnce(&mut dyn Handler, &mut Ctx<'_>)) {
        if let Some(r) = self.roles.get_mut(role.0) {
            f(
                r.as_mut(),
                &mut Ctx {
                    core: &mut self.core,
                    role,
                },
            );
        }
    }

    /// Build the reports roles asked for this turn (every role writes its
    /// part from a read-only view), at most one of each kind however many
    /// asked, and hand the same body to each role that asked: sixteen
    /// clients polling `/status` cost one build a turn, not sixteen.
    fn serve_reports(&mut self) {
        let mut requests = std::mem::take(&mut self.core.reports);
        for kind in [ReportKind::Status, ReportKind::Metrics] {
            if !requests.iter().any(|r| r.2 == kind) {
                continue;
            }
            let body = self.build_report(kind);
            for &(requester, conn, _) in requests.iter().filter(|r| r.2 == kind) {
                // A report asked for while handing one over waits for the next turn.
                if let Some(r) = self.roles.get_mut(requester.0) {
                    r.on_report(
                        &mut Ctx {
                            core: &mut self.core,
                            role: requester,
                        },
                        conn,
                        kind,
                        body.clone(),
                    );
                }
            }
        }
        requests.clear();
        // Keep the (empty) allocation unless this turn's requests grew it.
        if self.core.reports.is_empty() {
            self.core.reports = requests;
        }
    }

    /// One report of `kind`: the engine's figures, then each role's part.
    fn build_report(&self, kind: ReportKind) -> bytes::Bytes {
        let mut report = Report::new(kind, self.core.now);
        let uptime = self.core.now.saturating_duration_since(self.core.born);
        report.begin(uptime, &self.core.shared.stats.snapshot());
        let view = View { core: &self.core };
        for role in self
            .roles
            .iter()
            .filter(|r| !reload::is_retired(r.as_ref()))
        {
            report.role_begin(role.kind(), role.name());
            role.report(&view, &mut report);
            report.role_end();
        }
        report.end();
        bytes::Bytes::from(report.into_string())
    }

    fn fire_timers(&mut self) {
        for _ in 0..TIMER_BUDGET {
            let Some((tkey, owner)) = self.core.timers.pop_expired(self.core.now) else {
                return;
            };
            match owner {
                TimerOwner::Role(role, purpose) => {
                    self.call(role, |r, ctx| r.on_timer(ctx, tkey, purpose));
                }
                TimerOwner::RoleConn(role, key, purpose) => {
                    if let Some(c) = self.core.conn_mut(key) {
                        c.forget_timer(tkey);
                        self.call(role, |r, ctx| r.on_conn_timer(ctx, key, tkey, purpose));
                    }
                }
                TimerOwner::Idle(key) => {
                    let now = self.core.now;
                    let Some(c) = self.core.conn_mut(key) else {
                        continue;
                    };
                    c.idle_timer = None;
                    let Some(idle) = c.idle_timeout else { continue };
                    let deadline = c.last_active + idle;
                    if now >= deadline {
                        debug!("{key} idle for {idle:?}; closing");
                        Stats::add(&self.core.shared.stats.idle_timeouts_total, 1);
                        self.core
                            .close_now(key.index as usize, CloseReason::IdleTimeout);
                    } else {
                        let t = self.core.timers.insert(deadline, TimerOwner::Idle(key));
                        if let Some(c) = self.core.conn_mut(key) {
                            c.idle_timer = Some(t);
                        }
                    }
                }
                TimerOwner::Connect(key) => {
                    if let Some(c) = self.core.conn_mut(key)
                        && c.state == State::Connecting
                    {
                        c.aux_timer = None;
                        debug!("{key} connect to {} timed out", c.peer);
                        self.core
                            .close_now(key.index as usize, CloseReason::ConnectTimeout);
                    }
                }
                TimerOwner::Linger(key) => {
                    let Some(c) = self.core.socket_mut(key) else {
                        continue;
                    };
                    c.aux_timer = None;
                    match c.state {
                        State::Closing => {
                            debug!("{key} could not flush {} bytes in time", c.tx.len());
                            self.core
                                .close_now(key.index as usize, CloseReason::LingerTimeout);
                        }
                        State::Draining => {
                            debug!("{key} peer did not close within the linger time");
                            let reason = c.reason;
                            self.core.close_now(key.index as usize, reason);
                        }
                        _ => {}
                    }
                }
                TimerOwner::Stall(key) => self.stall_check(key),
                TimerOwner::AcceptBackoff => self.core.accept_backoff = None,
                TimerOwner::ShutdownDeadline => {
                    let left = self.core.conns.len();
                    warn!("shutdown timeout: closing {left} connections that did not flush");
                    for idx in 0..self.core.conns.capacity() {
                        if self.core.conns.contains(idx) {
                            self.core.close_now(idx, CloseReason::Shutdown);
                        }
                    }
                }
            }
        }
        // Budget used up: the rest are overdue, so `poll_timeout` (from the
        // next deadline) is zero and they fire next turn.
    }

    fn work_ready_list(&mut self) {
        // Connections marked ready while this runs wait for the next turn.
        let mut work = std::mem::take(&mut self.ready_work);
        std::mem::swap(&mut self.core.ready, &mut work);
        for idx in work.drain(..) {
            self.pump(idx);
        }
        self.ready_work = work;
    }

    /// Tell roles of their closed connections, and remove from the slab
    /// those whose socket is closed (a draining one stays until it is).
    fn reap(&mut self) {
        while let Some(idx) = self.core.closed.pop() {
            let Some(c) = self.core.conns.get(idx) else {
                continue;
            };
            if !matches!(c.state, State::Closed | State::Draining) {
                continue;
            }
            if !c.told {
                self.tell_closed(idx);
            }
            let Some(c) = self.core.conns.get_mut(idx) else {
                continue;
            };
            if c.state == State::Draining {
                // Told; the role's last look at its input is over.
                if let Some(b) = c.rx.take() {
                    self.core.pool.give_back(b);
                }
                continue;
            }
            let c = self.core.conns.remove(idx);
            if let Some(b) = c.rx {
                self.core.pool.give_back(b);
            }
            if self.core.conns.len() < self.core.config.max_connections {
                self.core.limit_logged = false;
            }
        }
    }

    /// Hand a connection's close to its role (once), and count it.
    fn tell_closed(&mut self, idx: usize) {
        let Some(c) = self.core.conns.get_mut(idx) else {
            return;
        };
        c.told = true;
        let key = c.key(idx);
        let (role, reason, never_connected) = (c.role, c.reason, c.never_connected);
        if c.state == State::Draining {
            debug!("{key} closed ({reason}); reading until the peer closes");
        } else {
            debug!("{key} closed ({reason})");
        }
        // The role runs while the slot is still taken: its key is stale for
        // every call but `Ctx::pending_input`, which shows unconsumed input.
        if never_connected {
            Stats::add(&self.core.shared.stats.connect_failed_total, 1);
            self.call(role, |r, ctx| r.on_connect_failed(ctx, key, reason));
        } else {
            self.call(role, |r, ctx| r.on_closed(ctx, key, reason));
        }
        // Counted after the role has seen the close, so a reader that sees
        // the connection gone also sees the role's own counters settled.
        Stats::sub(&self.core.shared.stats.connections, 1);
        Stats::add(&self.core.shared.stats.closed_total, 1);
    }

    fn drain_inbox(&mut self) {
        loop {
            let cmd = match self.core.shared.inbox.lock() {
                Ok(mut q) => q.pop_front(),
                Err(_) => None,
            };
            match cmd {
                None => return,
                Some(Command::Stop) => self.core.stop_requested = true,
                Some(Command::Reload) => self.reload_watched(),
                Some(Command::Message(role, msg)) => {
                    self.call(role, |r, ctx| r.on_message(ctx, msg));
                }
            }
        }
    }

    fn read_signals(&mut self) {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let Some(signals) = self.signals.as_mut() else {
            return;
        };
        for sig in signals.pending() {
            match sig {
                SIGINT | SIGTERM => {
                    info!("signal {sig}: shutting down");
                    self.core.stop_requested = true;
                }
                SIGHUP => {
                    info!("SIGHUP: reloading the config");
                    self.reload_watched();
                }
                _ => {}
            }
        }
    }

    /// Stop accepting, let roles react, and close every connection after its
    /// queue is flushed (bounded by `engine.shutdown_timeout`).
    fn begin_stop(&mut self) {
        if self.stopping {
            return;
        }
        self.stopping = true;
        let open = self.core.conns.len();
        info!(
            "stopping: listeners closed, flushing {open} connections (at most {:?})",
            self.core.config.shutdown_timeout
        );
        for l in 0..self.core.listeners.capacity() {
            self.core.close_listener(l);
        }
        for i in 0..self.roles.len() {
            self.call(RoleId(i), |r, ctx| r.on_shutdown(ctx));
        }
        for idx in 0..self.core.conns.capacity() {
            let Some(c) = self.core.conns.get(idx) else {
                continue;
            };
            let key = c.key(idx);
            self.core.close_gracefully(key, CloseReason::Shutdown);
        }
        let at = self.core.now + self.core.config.shutdown_timeout;
        self.core.timers.insert(at, TimerOwner::ShutdownDeadline);
    }
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("connections", &self.core.conns.len())
            .field("listeners", &self.core.listeners.len())
            .field(
                "roles",
                &self.roles.iter().map(|r| r.name()).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Drop for Engine {
    /// An engine that is gone (never run, failed to start, or unwound by a
    /// panicking role) refuses [`Handle`] calls with `Stopped` like one that
    /// returned from `run`, instead of queuing into an inbox nobody drains.
    fn drop(&mut self) {
        self.core.shared.stopped.store(true, Ordering::Release);
    }
}

// ===== impl Core =====

impl Core {
    /// The connection `key` names, if its role may still use it.
    fn conn(&self, key: ConnKey) -> Option<&Conn> {
        self.conns
            .get(key.index as usize)
            .filter(|c| c.named_by(key) && c.is_live())
    }

    fn conn_mut(&mut self, key: ConnKey) -> Option<&mut Conn> {
        self.conns
            .get_mut(key.index as usize)
            .filter(|c| c.named_by(key) && c.is_live())
    }

    /// The connection `key` names while its socket is open, draining included
    /// (for the engine's own timers).
    fn socket_mut(&mut self, key: ConnKey) -> Option<&mut Conn> {
        self.conns
            .get_mut(key.index as usize)
            .filter(|c| c.named_by(key) && c.state != State::Closed)
    }

    fn can_accept(&self) -> bool {
        !self.stop_requested
            && self.accept_backoff.is_none()
            && self.conns.len() < self.config.max_connections
    }

    fn mark_ready(&mut self, idx: usize) {
        if let Some(c) = self.conns.get_mut(idx)
            && !c.in_ready_list
        {
            c.in_ready_list = true;
            self.ready.push(idx);
        }
    }

    /// Move the first `used` bytes of `rx` (a frame [`Ctx::forward`] reserved
    /// room for) into `to`'s queue; `rx` becomes a fresh pooled buffer holding
    /// the bytes after the frame (at most the frame's length, by `forward`'s rule).
    fn move_frame(&mut self, rx: &mut buffer::Buffer, used: usize, to: ConnKey) {
        let mut fresh = self.pool.take();
        fresh.extend(rx.data().get(used..).unwrap_or_default());
        let mut frame = std::mem::replace(rx, fresh);
        frame.truncate(used);
        let filled = match self.conns.get_mut(to.index as usize) {
            Some(c) if c.named_by(to) => c.tx.fill_pending(frame),
            _ => Err(frame),
        };
        if let Err(frame) = filled {
            self.pool.give_back(frame);
        }
    }

    /// Write queued bytes with vectored writes until `WouldBlock` or empty;
    /// once empty, give the queue's blocks back and finish a graceful close.
    /// Returns the bytes written. Never calls a role, so [`Ctx::flush`] can
    /// use it from inside a callback.
    /// At most `budget` bytes are written; a connection with more to write
    /// goes on the ready list.
    fn write_queued(&mut self, idx: usize, budget: usize) -> usize {
        let Some(c) = self.conns.get_mut(idx) else {
            return 0;
        };
        if !matches!(c.state, State::Open | State::Closing) {
            return 0;
        }
        let key = c.key(idx);
        let mut total = 0;
        while !c.tx.is_empty() && c.readiness.event & WRITABLE != 0 {
            if total >= budget {
                self.mark_ready(idx);
                return total;
            }
            let mut iov = [IoSlice::new(&[]); MAX_IOV];
            let n = c.tx.gather_at_most(&mut iov, budget - total);
            let offered: usize = iov.iter().take(n).map(|s| s.len()).sum();
            let res = write_nosignal(&c.sock, iov.get(..n).unwrap_or_default());
            match res {
                Ok(0) => {
                    self.close_now(idx, CloseReason::Io(io::ErrorKind::WriteZero));
                    return total;
                }
                Ok(w) => {
                    trace!("{key} wrote {w} bytes");
                    if SHORT_IO_DRAINS && w < offered {
                        c.readiness.event &= !WRITABLE;
                    }
                    c.tx.advance(w, &mut self.pool);
                    c.last_progress = self.now;
                    total += w;
                    Stats::add(&self.shared.stats.bytes_out_total, w as u64);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    c.readiness.event &= !WRITABLE;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!("{key} write failed: {e}");
                    self.close_now(idx, CloseReason::Io(e.kind()));
                    return total;
                }
            }
        }
        if !c.tx.is_empty() {
            return total;
        }
        c.tx.release(&mut self.pool);
        if c.shut_write == ShutWrite::Pending && c.state == State::Open {
            c.shut_write = ShutWrite::Done;
            match c.sock.shutdown(std::net::Shutdown::Write) {
                Ok(()) => debug!("{key} sending side shut down"),
                Err(e) => debug!("{key} shutdown(write) failed: {e}"),
            }
        }
        if c.state == State::Closing {
            self.finish_close(idx);
        }
        total
    }

    /// The queue of a graceful close is flushed: send FIN, and unless the
    /// peer has already closed its side, drain its input until it does (at
    /// most `engine.linger`) so that closing cannot turn into a reset that
    /// destroys what the peer has yet to receive. The role hears of the close
    /// now ([`Engine::reap`]); the draining socket stays the engine's.
    fn finish_close(&mut self, idx: usize) {
        let (linger, now) = (self.config.linger, self.now);
        let Some(c) = self.conns.get_mut(idx) else {
            return;
        };
        let key = c.key(idx);
        let reason = c.reason;
        if c.read_closed {
            self.close_now(idx, reason);
            return;
        }
        if c.shut_write != ShutWrite::Done {
            c.shut_write = ShutWrite::Done;
            if let Err(e) = c.sock.shutdown(std::net::Shutdown::Write) {
                // Not connected any more (reset by the peer): nothing to drain.
                debug!("{key} shutdown(write) failed: {e}");
                self.close_now(idx, reason);
                return;
            }
        }
        c.state = State::Draining;
        Stats::add(&self.shared.stats.draining, 1);
        c.readiness.interest &= !READABLE;
        c.tx.release(&mut self.pool);
        c.cancel_timers(&mut self.timers);
        let t = self.timers.insert(now + linger, TimerOwner::Linger(key));
        if let Some(c) = self.conns.get_mut(idx) {
            c.aux_timer = Some(t);
        }
        self.closed.push(idx);
        // Input may be waiting already, and no new edge would announce it.
        self.mark_ready(idx);
    }

    /// Read and throw away the input of a connection its role has closed
    /// (flushing or draining), up to the read budget; a draining one is
    /// closed at the peer's EOF. Never calls a role.
    fn discard_input(&mut self, idx: usize) {
        let Some(c) = self.conns.get_mut(idx) else {
            return;
        };
        if c.read_closed || !matches!(c.state, State::Closing | State::Draining) {
            return;
        }
        let mut scratch = self.pool.take();
        let mut outcome = None;
        for _ in 0..self.config.read_budget {
            if c.readiness.event & READABLE == 0 {
                break;
            }
            let space = scratch.space();
            let asked = space.len();
            match c.sock.read(space) {
                Ok(0) => {
                    c.read_closed = true;
                    c.readiness.event &= !READABLE;
                    if c.state == State::Draining {
                        outcome = Some(c.reason);
                    }
                    break;
                }
                Ok(n) => {
                    if SHORT_IO_DRAINS && n < asked && c.readiness.event & HUP == 0 {
                        c.readiness.event &= !READABLE;
                    }
                    Stats::add(&self.shared.stats.bytes_in_total, n as u64);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    c.readiness.event &= !READABLE;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    outcome = Some(if c.state == State::Draining {
                        c.reason
                    } else {
                        CloseReason::Io(e.kind())
                    });
                    break;
                }
            }
        }
        let more = outcome.is_none() && c.readiness.event & READABLE != 0 && !c.read_closed;
        self.pool.give_back(scratch);
        if let Some(reason) = outcome {
            self.close_now(idx, reason);
        } else if more {
            self.mark_ready(idx);
        }
    }

    /// Take a slab slot, register the socket once, insert the connection.
    fn insert_conn(
        &mut self,
        mut sock: TcpStream,
        peer: SocketAddr,
        role: RoleId,
        framing: Framing,
        queue_bytes: Option<usize>,
        outbound: bool,
    ) -> io::Result<ConnKey> {
        let entry = self.conns.vacant_entry();
        let idx = entry.key();
        if idx >= token::LISTENER_BASE || u32::try_from(idx).is_err() {
            return Err(io::Error::other("connection index out of range"));
        }
        self.poll.registry().register(
            &mut sock,
            token::conn_token(idx),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        self.next_generation = self.next_generation.wrapping_add(1);
        let generation = self.next_generation;
        entry.insert(Conn {
            sock,
            generation,
            role,
            state: if outbound {
                State::Connecting
            } else {
                State::Open
            },
            readiness: Readiness {
                event: 0,
                interest: READABLE | WRITABLE,
            },
            decoder: Decoder::new(framing),
            rx: None,
            tx: SendQueue::new(queue_bytes.unwrap_or(self.config.queue_bytes)),
            mss: 0,
            mss_due: 0,
            peer,
            last_active: self.now,
            idle_timeout: None,
            idle_timer: None,
            aux_timer: None,
            read_closed: false,
            shut_write: ShutWrite::No,
            notify_writable: false,
            in_ready_list: false,
            never_connected: outbound,
            close_when_connected: None,
            stall_timeout: None,
            stall_timer: None,
            last_progress: self.now,
            reason: CloseReason::PeerClosed,
            told: false,
            role_timers: Vec::new(),
        });
        Stats::add(&self.shared.stats.connections, 1);
        Ok(ConnKey::new(idx, generation))
    }

    /// Close after flushing (bounded by `engine.linger`), then send FIN and
    /// drain the peer's input ([`Core::finish_close`]).
    fn close_gracefully(&mut self, key: ConnKey, reason: CloseReason) {
        let linger = self.config.linger;
        let now = self.now;
        let Some(c) = self.conn_mut(key) else { return };
        match c.state {
            State::Open if c.tx.is_empty() => {
                c.reason = reason;
                self.finish_close(key.index as usize);
            }
            State::Open => {
                c.state = State::Closing;
                c.reason = reason;
                c.readiness.interest &= !READABLE;
                let t = self.timers.insert(now + linger, TimerOwner::Linger(key));
                if let Some(c) = self.conn_mut(key) {
                    c.aux_timer = Some(t);
                }
                self.mark_ready(key.index as usize);
            }
            State::Connecting if !c.tx.is_empty() => {
                // Connect, flush what was queued, then close (see finish_connect).
                c.close_when_connected = Some(reason);
            }
            State::Connecting => self.close_now(key.index as usize, reason),
            State::Closing | State::Draining | State::Closed => {}
        }
    }

    /// Deregister and mark closed; the slab slot is freed in `reap`.
    fn close_now(&mut self, idx: usize, reason: CloseReason) {
        let Some(c) = self.conns.get_mut(idx) else {
            return;
        };
        match c.state {
            State::Closed => return,
            State::Draining => Stats::sub(&self.shared.stats.draining, 1),
            _ => {}
        }
        if let Err(e) = self.poll.registry().deregister(&mut c.sock) {
            debug!("c{idx}: deregister failed: {e}");
        }
        c.reason = reason;
        c.state = State::Closed;
        c.tx.clear(&mut self.pool);
        c.cancel_timers(&mut self.timers);
        self.closed.push(idx);
    }

    fn close_listener(&mut self, idx: usize) {
        if self.listeners.contains(idx) {
            let mut l = self.listeners.remove(idx);
            self.poll.registry().deregister(&mut l.sock).ok();
            info!("listener on {} closed", l.local);
        }
    }
}

/// A vectored write that never raises SIGPIPE: a peer that reset the
/// connection is an `EPIPE` error for this connection, not a signal that
/// kills a host process which does not ignore SIGPIPE (Rust's own `main`
/// ignores it; a C program embedding the library, or a fuzzer, may not).
#[cfg(any(target_os = "linux", target_os = "android"))]
fn write_nosignal(sock: &TcpStream, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    /// `MSG_NOSIGNAL`: the same value on every Linux architecture.
    const MSG_NOSIGNAL: std::ffi::c_int = 0x4000;
    socket2::SockRef::from(sock).send_vectored_with_flags(bufs, MSG_NOSIGNAL)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn write_nosignal(mut sock: &TcpStream, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    std::io::Write::write_vectored(&mut sock, bufs)
}
