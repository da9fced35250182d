//! Looking connections up by key, and closing them (gracefully, at once),
//! and closing listeners.
//!
//! Invariant: a key reaches a connection only if its generation matches
//! (`Conn::named_by`); a graceful close flushes, shuts the write side, tells
//! the role, and drains the peer's input before the socket is closed.

use log::{debug, info};
use slab::Slab;

use super::{CloseReason, Conn, ConnKey, Core, READABLE, ShutWrite, State, Stats, TimerOwner};

impl Core {
    /// The connection `key` names, if its role may still use it.
    pub(super) fn conn(&self, key: ConnKey) -> Option<&Conn> {
        self.conns
            .get(key.index as usize)
            .filter(|c| c.named_by(key) && c.is_live())
    }

    pub(super) fn conn_mut(&mut self, key: ConnKey) -> Option<&mut Conn> {
        live_mut(&mut self.conns, key)
    }

    /// The connection `key` names while its socket is open, draining included
    /// (for the engine's own timers).
    pub(super) fn socket_mut(&mut self, key: ConnKey) -> Option<&mut Conn> {
        self.conns
            .get_mut(key.index as usize)
            .filter(|c| c.named_by(key) && !matches!(c.state, State::Closed { .. }))
    }

    /// The queue of a graceful close is flushed: send FIN, and unless the
    /// peer has already closed its side, drain its input until it does (at
    /// most `engine.linger`) so that closing cannot turn into a reset that
    /// destroys what the peer has yet to receive. The role hears of the close
    /// now ([`Engine::reap`]); the draining socket stays the engine's.
    pub(super) fn finish_close(&mut self, idx: usize) {
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
        c.readiness.interest &= !READABLE;
        c.tx.release(&mut self.pool);
        c.cancel_timers(&mut self.timers);
        let t = self.timers.insert(now + linger, TimerOwner::Linger(key));
        c.state = State::Draining { linger: Some(t) };
        Stats::add(&self.shared.stats.draining, 1);
        self.closed.push(idx);
        // Input may be waiting already, and no new edge would announce it.
        self.mark_ready(idx);
    }

    /// Close after flushing (bounded by `engine.linger`), then send FIN and
    /// drain the peer's input ([`Core::finish_close`]).
    pub(super) fn close_gracefully(&mut self, key: ConnKey, reason: CloseReason) {
        let linger = self.config.linger;
        let now = self.now;
        let Some(c) = self.conn_mut(key) else { return };
        match c.state {
            State::Open if c.tx.is_empty() => {
                c.reason = reason;
                self.finish_close(key.index as usize);
            }
            State::Open => {
                c.reason = reason;
                c.readiness.interest &= !READABLE;
                c.state = State::Closing { linger: None };
                let t = self.timers.insert(now + linger, TimerOwner::Linger(key));
                if let Some(State::Closing { linger }) = self.conn_mut(key).map(|c| &mut c.state) {
                    *linger = Some(t);
                }
                self.mark_ready(key.index as usize);
            }
            State::Connecting {
                ref mut close_after,
                ..
            } if !c.tx.is_empty() => {
                // Connect, flush what was queued, then close (see finish_connect).
                *close_after = Some(reason);
            }
            State::Connecting { .. } => self.close_now(key.index as usize, reason),
            State::Closing { .. } | State::Draining { .. } | State::Closed { .. } => {}
        }
    }

    /// Deregister and mark closed; the slab slot is freed in `reap`.
    pub(super) fn close_now(&mut self, idx: usize, reason: CloseReason) {
        let Some(c) = self.conns.get_mut(idx) else {
            return;
        };
        let connected = match c.state {
            State::Closed { .. } => return,
            State::Draining { .. } => {
                Stats::sub(&self.shared.stats.draining, 1);
                true
            }
            State::Connecting { .. } => false,
            State::Open | State::Closing { .. } => true,
        };
        if let Err(e) = self.poll.registry().deregister(&mut c.sock) {
            debug!("c{idx}: deregister failed: {e}");
        }
        c.reason = reason;
        c.cancel_timers(&mut self.timers);
        c.state = State::Closed { connected };
        c.tx.clear(&mut self.pool);
        self.closed.push(idx);
    }

    pub(super) fn close_listener(&mut self, idx: usize) {
        if self.listeners.contains(idx) {
            let mut l = self.listeners.remove(idx);
            self.poll.registry().deregister(&mut l.sock).ok();
            info!("listener on {} closed", l.local);
        }
    }
}

/// The connection `key` names while the role may still use it, from the
/// slab alone: for callers that hold another part of the `Core` (its
/// timers) at the same time.
pub(super) fn live_mut(conns: &mut Slab<Conn>, key: ConnKey) -> Option<&mut Conn> {
    conns
        .get_mut(key.index as usize)
        .filter(|c| c.named_by(key) && c.is_live())
}
