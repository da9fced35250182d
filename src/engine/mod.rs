//! The event loop: one `mio::Poll`, one `Slab` of connections, one thread.
//!
//! This file holds the engine's types and its public face ([`Engine`]); the
//! loop itself is split by concern: `event_loop` (a turn: poll, timers, the
//! ready list, reports, reaping, messages, signals), `accept` (listeners and
//! new connections), `pump` (reading, decoding, dispatching, writing one
//! connection) and `control` (looking connections up, closing them).
//!
//! Invariant: only this module touches sockets. Every socket is registered once,
//! edge-triggered; reads, writes and accepts drain until `WouldBlock` or a
//! budget, and a connection whose drain stopped early goes on the ready list so
//! the next poll does not sleep. Slab slots are freed only at the end of a turn,
//! so a token in the current `Events` batch never names a different connection.
//! Allocation: none per read, frame or write in steady state (pooled buffers,
//! reused event, ready and close lists).

mod accept;
mod buffer;
mod conn;
mod control;
mod ctx;
mod event_loop;
mod handle;
mod handler;
mod logging;
mod pump;
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
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use log::{error, info};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Waker};
use slab::Slab;

use crate::codec::FrameError;
use crate::config::EngineConfig;
use buffer::{BufferPool, MAX_IOV, SendQueue};
use conn::{Conn, HUP, READABLE, Readiness, SHORT_IO_DRAINS, ShutWrite, State, WRITABLE};
use event_loop::POOL_TRIM_INTERVAL;
use handle::{Command, Shared, Stats};
use timer::Timers;
use token::Target;

/// Events fetched per `poll` call.
const EVENTS_CAPACITY: usize = 1024;
/// `poll` failures in a row before the engine gives up.
const MAX_POLL_ERRORS: u32 = 16;

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

impl Core {}

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
