//! One TCP connection as the engine sees it: socket, readiness, decoder, buffers.
//!
//! Invariant: the socket is registered exactly once (READABLE | WRITABLE, edge
//! triggered) when the connection enters the slab, and deregistered exactly once
//! when it is closed; `readiness.event` is cleared only on `WouldBlock` or EOF.
//! An idle connection holds no buffer: `rx` and the send queue's copy block are
//! borrowed from the pool only while they hold bytes.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::TcpStream;

use super::buffer::{Buffer, SendQueue};
use super::timer::{TimerKey, Timers};
use super::token::ConnKey;
use super::{CloseReason, RoleId, TimerOwner};
use crate::codec::Decoder;

/// Readiness bits (sozu's `Readiness`): what the socket reported, and what the
/// connection currently wants. The engine acts on `event & interest`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Readiness {
    pub(crate) event: u8,
    pub(crate) interest: u8,
}

pub(crate) const READABLE: u8 = 0b001;
pub(crate) const WRITABLE: u8 = 0b010;
/// The peer hung up or the socket reported an error: reads must continue to
/// EOF/error even after a short read (no further edge will announce it).
pub(crate) const HUP: u8 = 0b100;

/// With edge-triggered epoll, a read that returns less than asked, or a write
/// that takes less than offered, proves the socket is drained (full): every new
/// arrival or freed byte raises a new edge. Skipping the extra call that would
/// return `WouldBlock` saves a system call per wake-up (tokio relies on the
/// same property). Elsewhere, drain until `WouldBlock`.
pub(crate) const SHORT_IO_DRAINS: bool = cfg!(any(target_os = "linux", target_os = "android"));

/// Raw reads that fill what they asked for between two looks at the socket's
/// MSS (one `getsockopt` per about a mebibyte streamed).
const MSS_REFRESH_READS: u8 = 16;

impl Readiness {
    pub(crate) fn wants(&self, bit: u8) -> bool {
        self.event & self.interest & bit != 0
    }
}

/// Where a connection is in its life, and what each phase holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// Outbound connect in progress, until `timeout` fires.
    Connecting {
        timeout: Option<TimerKey>,
        /// The role closed it with bytes queued: connect, flush, then close.
        close_after: Option<CloseReason>,
    },
    /// Reading and writing (each direction may be shut: `read_closed`,
    /// `shut_write`).
    Open,
    /// Closed by the role: flushing the send queue (input is read and
    /// discarded) until `linger` fires, then [`State::Draining`].
    Closing { linger: Option<TimerKey> },
    /// A graceful close sent its FIN: input is read and discarded until the
    /// peer's EOF, or `engine.linger`, before the socket is closed. Closing a
    /// socket that holds unread input makes the kernel send a reset and drop
    /// what it has not yet sent, so the peer would lose bytes it was owed.
    /// The role has had [`crate::Role::on_closed`]: the key is stale, and the
    /// connection belongs to the engine alone.
    Draining { linger: Option<TimerKey> },
    /// Deregistered; waiting for slab removal at the end of the batch.
    /// `connected`: false for an outbound connect that never completed.
    Closed { connected: bool },
}

/// The sending side of a connection that keeps reading (half-close).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ShutWrite {
    /// Sending.
    No,
    /// Shut down the write side once the send queue is empty.
    Pending,
    /// FIN sent; nothing more can be queued.
    Done,
}

#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) sock: TcpStream,
    pub(crate) generation: u32,
    pub(crate) role: RoleId,
    pub(crate) state: State,
    pub(crate) readiness: Readiness,
    pub(crate) decoder: Decoder,
    pub(crate) rx: Option<Buffer>,
    pub(crate) tx: SendQueue,
    /// The socket's TCP maximum segment size as last looked up (0: not yet,
    /// or not available); see [`Conn::read_len`]. The MSS option is 16 bits.
    pub(crate) mss: u16,
    /// Raw reads that fill their request before the MSS is looked up again.
    pub(crate) mss_due: u8,
    pub(crate) peer: SocketAddr,
    pub(crate) last_active: Instant,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) idle_timer: Option<TimerKey>,
    pub(crate) read_closed: bool,
    /// [`crate::Ctx::shutdown_write`]: send FIN once the queue is flushed.
    pub(crate) shut_write: ShutWrite,
    pub(crate) notify_writable: bool,
    pub(crate) in_ready_list: bool,
    /// Close when the send queue has been non-empty and unmoved this long.
    pub(crate) stall_timeout: Option<Duration>,
    pub(crate) stall_timer: Option<TimerKey>,
    /// Last time the send queue moved (a write, or the first byte queued).
    pub(crate) last_progress: Instant,
    pub(crate) reason: CloseReason,
    /// The role has been told of the close (it may still be draining).
    pub(crate) told: bool,
    /// Timers the role set for this connection, for the close to cancel:
    /// inline, no heap (a role keeps one or two per connection). A further
    /// one is not tracked; it is dropped when it fires for a closed
    /// connection, so the role never sees it either way.
    pub(crate) role_timers: [Option<TimerKey>; 2],
    /// What the connection is to its role ([`crate::Ctx::tag`]).
    pub(crate) tag: u64,
}

// ===== impl Conn =====

impl Conn {
    pub(crate) fn can_read(&self) -> bool {
        matches!(self.state, State::Open)
            && !self.read_closed
            && self.readiness.interest & READABLE != 0
    }

    /// The key of this connection, in slab slot `index`: the one place a
    /// [`ConnKey`] is made for a connection.
    pub(crate) fn key(&self, index: usize) -> ConnKey {
        ConnKey::new(index, self.generation)
    }

    /// Whether `key` names this connection (and not an earlier one in the
    /// same slab slot): the one place generations are compared.
    pub(crate) fn named_by(&self, key: ConnKey) -> bool {
        self.generation == key.generation
    }

    /// Cancel every timer of the connection: the engine's (idle, connect
    /// or linger, stall) and those its role set for it
    /// ([`crate::Ctx::set_conn_timer`]).
    pub(crate) fn cancel_timers(&mut self, timers: &mut Timers<TimerOwner>) {
        let phase = match &mut self.state {
            State::Connecting { timeout: t, .. }
            | State::Closing { linger: t }
            | State::Draining { linger: t } => t.take(),
            State::Open | State::Closed { .. } => None,
        };
        let own = [self.idle_timer.take(), phase, self.stall_timer.take()];
        let role = std::mem::take(&mut self.role_timers);
        for t in own.into_iter().chain(role).flatten() {
            timers.cancel(t);
        }
    }

    /// A role timer of the connection was set: remember it for the close,
    /// if there is room.
    pub(crate) fn track_timer(&mut self, key: TimerKey) {
        if let Some(free) = self.role_timers.iter_mut().find(|t| t.is_none()) {
            *free = Some(key);
        }
    }

    /// A role timer of the connection fired or was cancelled.
    pub(crate) fn forget_timer(&mut self, key: TimerKey) {
        for t in &mut self.role_timers {
            if *t == Some(key) {
                *t = None;
            }
        }
    }

    /// Whether the role may still use the connection: not closed, and not
    /// draining after a close the role has been told of.
    pub(crate) fn is_live(&self) -> bool {
        matches!(
            self.state,
            State::Connecting { .. } | State::Open | State::Closing { .. }
        )
    }

    /// How many bytes a read into `space` free bytes asks for.
    ///
    /// Raw input goes out as it was read (echo, bridging), and with
    /// `TCP_NODELAY` a write that is not a whole number of segments sends its
    /// remainder as a short segment of its own, which costs the kernel about
    /// as much as a full one. On loopback (a 64 KiB segment) a 66 KiB read
    /// thus became two segments per echoed read; reading whole segments cut
    /// the engine's CPU per echoed byte by a fifth at 8 connections and by
    /// two fifths at 1 (`benches/engine_loopback.rs`). Other framings re-cut
    /// the stream, so they read all the space.
    pub(crate) fn read_len(&self, space: usize) -> usize {
        if matches!(self.decoder, Decoder::Raw) {
            whole_segments(space, usize::from(self.mss))
        } else {
            space
        }
    }

    /// A read got all it asked for (the stream is flowing): look at the MSS
    /// now and then. Early in a connection the kernel bounds it by half the
    /// peer's largest window, which grows; the path MTU can shrink it.
    pub(crate) fn filled_read(&mut self) {
        if !matches!(self.decoder, Decoder::Raw) {
            return;
        }
        if self.mss_due == 0 {
            let mss = socket2::SockRef::from(&self.sock).tcp_mss();
            self.mss = mss.ok().and_then(|m| u16::try_from(m).ok()).unwrap_or(0);
            self.mss_due = MSS_REFRESH_READS;
        }
        self.mss_due -= 1;
    }
}

/// The largest whole number of `mss`-byte segments within `space`, or all of
/// `space` when it holds at most one segment or the MSS is unknown (0).
fn whole_segments(space: usize, mss: usize) -> usize {
    if mss == 0 || space <= mss {
        space
    } else {
        space - space % mss
    }
}

#[cfg(test)]
mod tests {
    use super::whole_segments;

    #[test]
    fn reads_take_whole_segments_when_more_than_one_fits() {
        // Loopback: a 66 KiB buffer and a 65 483-byte MSS.
        assert_eq!(whole_segments(67_584, 65_483), 65_483);
        assert_eq!(whole_segments(2 * 65_483 + 1, 65_483), 2 * 65_483);
        // Ethernet: 46 segments of 1448 bytes.
        assert_eq!(whole_segments(67_584, 1448), 66_608);
        // At most one segment of room, or no MSS known: all of it.
        assert_eq!(whole_segments(65_483, 65_483), 65_483);
        assert_eq!(whole_segments(2_101, 65_483), 2_101);
        assert_eq!(whole_segments(67_584, 0), 67_584);
        assert_eq!(whole_segments(0, 1448), 0);
    }
}
