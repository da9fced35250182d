//! One turn of the event loop, and what it runs: poll, timers, the ready
//! list, reports, the reaping of closed connections, messages and signals.
//!
//! Invariant: slab slots are freed only in `reap`, at the end of a turn, so a
//! token in the current `Events` batch never names a different connection;
//! every stage is budgeted, and leftover work keeps the next poll from sleeping.

use std::io;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use log::{debug, info, trace, warn};
use mio::Events;

use super::{
    CloseReason, Command, Ctx, Engine, HUP, Handler, READABLE, Report, ReportKind, RoleId, State,
    Stats, Target, TimerOwner, View, WRITABLE, reload, token,
};

/// Timers fired per turn before the loop polls again (with a zero timeout).
const TIMER_BUDGET: usize = 4096;
/// How often the buffer pool frees buffers that stayed unused meanwhile.
pub(super) const POOL_TRIM_INTERVAL: Duration = Duration::from_secs(1);

impl Engine {
    /// One loop iteration: poll, dispatch events, fire timers, work the ready
    /// list, remove closed connections, resume accepting.
    pub(super) fn turn(&mut self) -> io::Result<()> {
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

    pub(super) fn poll_timeout(&mut self) -> Option<Duration> {
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

    pub(super) fn fire_timers(&mut self) {
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
                        && let State::Connecting { timeout, .. } = &mut c.state
                    {
                        *timeout = None;
                        debug!("{key} connect to {} timed out", c.peer);
                        self.core
                            .close_now(key.index as usize, CloseReason::ConnectTimeout);
                    }
                }
                TimerOwner::Linger(key) => {
                    let Some(c) = self.core.socket_mut(key) else {
                        continue;
                    };
                    match &mut c.state {
                        State::Closing { linger } => {
                            *linger = None;
                            debug!("{key} could not flush {} bytes in time", c.tx.len());
                            self.core
                                .close_now(key.index as usize, CloseReason::LingerTimeout);
                        }
                        State::Draining { linger } => {
                            *linger = None;
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

    pub(super) fn work_ready_list(&mut self) {
        // Connections marked ready while this runs wait for the next turn.
        let mut work = std::mem::take(&mut self.ready_work);
        std::mem::swap(&mut self.core.ready, &mut work);
        for idx in work.drain(..) {
            self.pump(idx);
        }
        self.ready_work = work;
    }

    /// Build the reports roles asked for this turn (every role writes its
    /// part from a read-only view), at most one of each kind however many
    /// asked, and hand the same body to each role that asked: sixteen
    /// clients polling `/status` cost one build a turn, not sixteen.
    pub(super) fn serve_reports(&mut self) {
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
    pub(super) fn build_report(&self, kind: ReportKind) -> bytes::Bytes {
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

    pub(super) fn drain_inbox(&mut self) {
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

    pub(super) fn read_signals(&mut self) {
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
    pub(super) fn begin_stop(&mut self) {
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

    /// Tell roles of their closed connections, and remove from the slab
    /// those whose socket is closed (a draining one stays until it is).
    pub(super) fn reap(&mut self) {
        while let Some(idx) = self.core.closed.pop() {
            let Some(c) = self.core.conns.get(idx) else {
                continue;
            };
            if !matches!(c.state, State::Closed { .. } | State::Draining { .. }) {
                continue;
            }
            if !c.told {
                self.tell_closed(idx);
            }
            let Some(c) = self.core.conns.get_mut(idx) else {
                continue;
            };
            if matches!(c.state, State::Draining { .. }) {
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
    pub(super) fn tell_closed(&mut self, idx: usize) {
        let Some(c) = self.core.conns.get_mut(idx) else {
            return;
        };
        c.told = true;
        let key = c.key(idx);
        let never_connected = matches!(c.state, State::Closed { connected: false });
        let (role, reason) = (c.role, c.reason);
        if matches!(c.state, State::Draining { .. }) {
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
}
