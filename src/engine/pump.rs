//! Pumping one connection: reading, decoding, dispatching and writing.
//!
//! Invariant: reads and writes drain until `WouldBlock`, a short read or
//! write on Linux (edge-triggered), or a budget; a connection stopped by a
//! budget goes on the ready list. No allocation per read, frame or write.

use std::io;
use std::io::IoSlice;
use std::io::Read;

use log::{debug, error, trace, warn};

use super::{
    CloseReason, ConnKey, Core, Dispatching, Engine, HUP, MAX_IOV, OnFrameError, READABLE, RoleId,
    SHORT_IO_DRAINS, ShutWrite, State, Stats, Suppressed, TimerOwner, WRITABLE, buffer,
    write_nosignal,
};

/// Bytes one flush may write to one connection before the others get their
/// turn (the rest follows from the ready list): one client taking a large
/// response cannot hold the loop for the time the kernel takes to copy it.
const WRITE_BUDGET: usize = 256 * 1024;
/// Frames or syscalls one pump may handle before the connection is closed as a
/// bug (a role that resumes forever, say); far above any legitimate count.
const MAX_LOOP_ITERATIONS: usize = 1 << 20;
use crate::codec::Decoded;
use crate::codec::FrameError;

impl Engine {
    /// Flush, read and dispatch one connection, then flush what the reads produced.
    pub(super) fn pump(&mut self, idx: usize) {
        let Some(c) = self.core.conns.get_mut(idx) else {
            return;
        };
        c.in_ready_list = false;
        match c.state {
            State::Closed { .. } => return,
            State::Connecting { .. } => {
                if !self.finish_connect(idx) {
                    return;
                }
            }
            State::Closing { .. } | State::Draining { .. } => {
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
    pub(super) fn finish_connect(&mut self, idx: usize) -> bool {
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
        let close_after = match std::mem::replace(&mut c.state, State::Open) {
            State::Connecting {
                timeout,
                close_after,
            } => {
                if let Some(t) = timeout {
                    self.core.timers.cancel(t);
                }
                close_after
            }
            _ => None,
        };
        c.last_active = self.core.now;
        Stats::add(&self.core.shared.stats.connected_total, 1);
        debug!("{key} connected to {}", c.peer);
        let role = c.role;
        self.call(role, |r, ctx| r.on_connected(ctx, key));
        if let Some(reason) = close_after {
            self.core.close_gracefully(key, reason);
        }
        self.core
            .conns
            .get(idx)
            .is_some_and(|c| !matches!(c.state, State::Closed { .. }))
    }

    /// Read until `WouldBlock`, EOF, the read budget, or the role pauses;
    /// decode and dispatch frames after every read.
    pub(super) fn read(&mut self, idx: usize) {
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
    pub(super) fn dispatch(
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
            if !matches!(c.state, State::Open) || c.readiness.interest & READABLE == 0 {
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
    pub(super) fn flush(&mut self, idx: usize) {
        self.core.write_queued(idx, WRITE_BUDGET);
        let Some(c) = self.core.conns.get_mut(idx) else {
            return;
        };
        if !matches!(c.state, State::Open) || !c.tx.is_empty() || !c.notify_writable {
            return;
        }
        c.notify_writable = false;
        let key = c.key(idx);
        let role = c.role;
        self.call(role, |r, ctx| r.on_writable(ctx, key));
    }

    /// A stall timer fired: close if the queue has been non-empty and unmoved
    /// for the stall timeout, otherwise check again when it could be.
    pub(super) fn stall_check(&mut self, key: ConnKey) {
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
}

impl Core {
    pub(super) fn mark_ready(&mut self, idx: usize) {
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
    pub(super) fn move_frame(&mut self, rx: &mut buffer::Buffer, used: usize, to: ConnKey) {
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
    pub(super) fn write_queued(&mut self, idx: usize, budget: usize) -> usize {
        let Some(c) = self.conns.get_mut(idx) else {
            return 0;
        };
        if !matches!(c.state, State::Open | State::Closing { .. }) {
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
        if c.shut_write == ShutWrite::Pending && matches!(c.state, State::Open) {
            c.shut_write = ShutWrite::Done;
            match c.sock.shutdown(std::net::Shutdown::Write) {
                Ok(()) => debug!("{key} sending side shut down"),
                Err(e) => debug!("{key} shutdown(write) failed: {e}"),
            }
        }
        if matches!(c.state, State::Closing { .. }) {
            self.finish_close(idx);
        }
        total
    }

    /// Read and throw away the input of a connection its role has closed
    /// (flushing or draining), up to the read budget; a draining one is
    /// closed at the peer's EOF. Never calls a role.
    pub(super) fn discard_input(&mut self, idx: usize) {
        let Some(c) = self.conns.get_mut(idx) else {
            return;
        };
        if c.read_closed || !matches!(c.state, State::Closing { .. } | State::Draining { .. }) {
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
                    if matches!(c.state, State::Draining { .. }) {
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
                    outcome = Some(if matches!(c.state, State::Draining { .. }) {
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
}
