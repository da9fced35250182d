//! The thread-safe side of the engine: a [`Handle`] to stop it or hand it work,
//! and the [`Stats`] counters it publishes.
//!
//! Invariant: the inbox is bounded (`engine.inbox` messages); a full inbox
//! refuses with [`HandleError::Full`] rather than growing. Counters are relaxed
//! atomics updated per connection event or per system call, never per byte.

use std::any::Any;
use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use mio::Waker;

use super::RoleId;

/// A message for a role, delivered to [`crate::Handler::on_message`] on the loop thread.
pub type Message = Box<dyn Any + Send>;

pub(crate) enum Command {
    Stop,
    Reload,
    Message(RoleId, Message),
}

pub(crate) struct Shared {
    pub(crate) waker: Waker,
    pub(crate) inbox: Mutex<VecDeque<Command>>,
    pub(crate) capacity: usize,
    pub(crate) stopped: AtomicBool,
    pub(crate) stats: Stats,
}

/// Why a [`Handle`] call did nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandleError {
    /// The inbox holds `engine.inbox` messages already; try again later.
    Full,
    /// The engine has stopped.
    Stopped,
}

impl fmt::Display for HandleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HandleError::Full => "the engine's inbox is full",
            HandleError::Stopped => "the engine has stopped",
        })
    }
}

impl std::error::Error for HandleError {}

/// A cloneable, thread-safe handle to a running [`crate::Engine`].
#[derive(Clone)]
pub struct Handle {
    pub(crate) shared: Arc<Shared>,
}

// ===== impl Handle =====

impl Handle {
    /// Ask the engine to stop: it stops accepting, flushes queues up to
    /// `engine.shutdown_timeout`, and `run` returns.
    pub fn stop(&self) {
        self.push(Command::Stop, true).ok();
    }

    /// Ask the engine to reload its watched config file (as SIGHUP does; see
    /// [`crate::Engine::watch_config`]).
    pub fn reload(&self) {
        self.push(Command::Reload, true).ok();
    }

    /// Like [`Handle::send`], but while the inbox is full, wait (sleeping a
    /// millisecond at a time) instead of failing: back-pressure for a producer
    /// thread that must not lose anything.
    ///
    /// # Errors
    /// [`HandleError::Stopped`] when the engine is gone.
    pub fn send_wait(&self, role: RoleId, msg: Message) -> Result<(), HandleError> {
        let mut cmd = Command::Message(role, msg);
        loop {
            match self.push(cmd, false) {
                Ok(()) => return Ok(()),
                Err((HandleError::Full, back)) => {
                    cmd = back;
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    /// Hand `msg` to role `role`'s [`crate::Handler::on_message`] on the loop thread.
    ///
    /// # Errors
    /// [`HandleError::Full`] when the bounded inbox is full,
    /// [`HandleError::Stopped`] when the engine is gone.
    pub fn send(&self, role: RoleId, msg: Message) -> Result<(), HandleError> {
        self.push(Command::Message(role, msg), false)
            .map_err(|(e, _)| e)
    }

    /// Connections currently held by the engine (accepted and outbound). A
    /// closed connection counts until its role's `on_closed` has returned.
    pub fn connections(&self) -> u64 {
        self.shared.stats.connections.load(Ordering::Acquire)
    }

    /// A snapshot of the engine's counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// Queue `cmd` and wake the loop; on failure the command comes back.
    fn push(&self, cmd: Command, force: bool) -> Result<(), (HandleError, Command)> {
        if self.shared.stopped.load(Ordering::Acquire) {
            return Err((HandleError::Stopped, cmd));
        }
        {
            let Ok(mut inbox) = self.shared.inbox.lock() else {
                return Err((HandleError::Stopped, cmd));
            };
            if inbox.len() >= self.shared.capacity && !force {
                return Err((HandleError::Full, cmd));
            }
            inbox.push_back(cmd);
        }
        self.shared
            .waker
            .wake()
            .map_err(|_| (HandleError::Stopped, Command::Stop))
    }
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handle")
            .field("stats", &self.stats())
            .finish()
    }
}

/// The engine's counters, declared once: `Stats` (the atomics the loop
/// updates), `StatsSnapshot` (their copy, a [`crate::metrics::CounterSet`]:
/// each entry is a `counters!` field of it) and the copying.
macro_rules! stats {
    ($($(#[$doc:meta])* $name:ident = $kind:ident $({ $($spec:tt)* })?,)*) => {
        /// Engine counters, updated by the loop thread.
        #[derive(Debug, Default)]
        pub(crate) struct Stats {
            $(pub(crate) $name: AtomicU64,)*
        }

        crate::counters! {
            /// A copy of the engine counters at one moment.
            #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
            pub struct StatsSnapshot {
                $($(#[$doc])* pub $name: u64 = $kind $({ $($spec)* })?,)*
            }
        }

        impl Stats {
            pub(crate) fn snapshot(&self) -> StatsSnapshot {
                StatsSnapshot { $($name: self.$name.load(Ordering::Acquire),)* }
            }
        }
    };
}

// The order here is the order of the engine's fields in `/status` and of its
// families in `/metrics`.
stats! {
    /// Connections held now (accepted and outbound, including closing ones
    /// still flushing; not draining ones, whose roles have been told).
    connections = gauge {
        status: "connections",
        metric: "switchboard_connections",
        help: "Connections held now, all roles.",
    },
    /// Connections closed gracefully whose peer has not closed yet: their
    /// input is read and discarded until it does (at most `engine.linger`).
    draining = gauge {
        status: "draining",
        metric: "switchboard_draining_connections",
        help: "Connections closed gracefully, reading until the peer closes.",
    },
    /// Connections accepted since start.
    accepted_total = counter {
        status: "accepted_total",
        metric: "switchboard_accepted_connections_total",
        help: "Connections accepted.",
    },
    /// Outbound connections established since start.
    connected_total = counter,
    /// Outbound connects that failed or timed out.
    connect_failed_total = counter,
    /// Connections closed since start.
    closed_total = counter {
        status: "closed_total",
        metric: "switchboard_closed_connections_total",
        help: "Connections closed.",
    },
    /// Times accepting paused because `max_connections` was reached.
    accept_paused_limit_total = counter,
    /// Times accepting paused because the process or system ran out of
    /// file descriptors (EMFILE/ENFILE) or memory.
    accept_paused_fd_total = counter,
    /// Bytes read from sockets.
    bytes_in_total = counter {
        status: "bytes_in_total",
        metric: "switchboard_received_bytes_total",
        help: "Bytes read from sockets.",
    },
    /// Bytes written to sockets.
    bytes_out_total = counter {
        status: "bytes_out_total",
        metric: "switchboard_sent_bytes_total",
        help: "Bytes written to sockets.",
    },
    /// Sends refused because a connection's queue was full.
    queue_full_total = counter {
        metric: "switchboard_queue_full_total",
        help: "Sends refused because a connection's queue was full.",
    },
    /// Connections closed because a frame exceeded its maximum length.
    frame_errors_total = counter {
        metric: "switchboard_frame_errors_total",
        help: "Connections closed for a frame over its maximum.",
    },
    /// Connections closed by their idle timeout.
    idle_timeouts_total = counter {
        metric: "switchboard_idle_timeouts_total",
        help: "Connections closed by an idle timeout.",
    },
    /// Read buffers lent out now.
    buffers_lent = gauge {
        status: "buffers_lent",
        metric: "switchboard_buffers_lent",
        help: "Read buffers lent out now.",
    },
    /// Failed `poll` calls (fatal after several in a row).
    poll_errors_total = counter,
    /// Loop iterations.
    turns_total = counter {
        status: "turns_total",
        metric: "switchboard_loop_turns_total",
        help: "Event loop iterations.",
    },
}

// Release on update, Acquire on read: a thread that reads a counter also sees
// everything the loop recorded before updating it (a role's own counters, for
// one), which is what lets a test wait on `connections` and then check them.
impl Stats {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Release);
    }

    pub(crate) fn sub(counter: &AtomicU64, n: u64) {
        counter.fetch_sub(n, Ordering::Release);
    }
}
