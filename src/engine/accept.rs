//! Accepting connections, and entering any new connection into the slab.
//!
//! Invariant: a socket enters the slab only through `Core::insert_conn`,
//! which registers it once, edge-triggered; accepting stops at
//! `max_connections`, on descriptor exhaustion (with a back-off) and after
//! a budget per listener per turn.

use std::io;
use std::net::SocketAddr;

use log::{debug, info, warn};
use mio::Interest;
use mio::net::TcpStream;

use super::{
    CloseReason, Conn, ConnKey, Core, Engine, ListenerId, READABLE, Readiness, RoleId, SendQueue,
    ShutWrite, State, Stats, TimerOwner, WRITABLE, token,
};

/// Accepts per listener per turn before other work gets a turn.
const ACCEPT_BUDGET: usize = 256;
/// Linux errno values for resource exhaustion on `accept` (the same on every
/// Linux architecture, and EMFILE/ENFILE also on the BSDs and macOS).
const ENOMEM: i32 = 12;
const ENFILE: i32 = 23;
const EMFILE: i32 = 24;
const ENOBUFS: i32 = 105;
use crate::codec::Decoder;
use crate::codec::Framing;

impl Engine {
    /// Accept until `WouldBlock`, the connection limit, fd exhaustion or the budget.
    pub(super) fn accept(&mut self, lidx: usize) {
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
                    let setup = Setup {
                        framing: opts.framing,
                        queue_bytes: opts.queue_bytes,
                        tag: opts.tag,
                        outbound: false,
                    };
                    match self.core.insert_conn(sock, peer, role, setup) {
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
}

impl Core {
    pub(super) fn can_accept(&self) -> bool {
        !self.stop_requested
            && self.accept_backoff.is_none()
            && self.conns.len() < self.config.max_connections
    }

    /// Take a slab slot, register the socket once, insert the connection.
    pub(super) fn insert_conn(
        &mut self,
        mut sock: TcpStream,
        peer: SocketAddr,
        role: RoleId,
        setup: Setup,
    ) -> io::Result<ConnKey> {
        let Setup {
            framing,
            queue_bytes,
            tag,
            outbound,
        } = setup;
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
                State::Connecting {
                    timeout: None,
                    close_after: None,
                }
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
            read_closed: false,
            shut_write: ShutWrite::No,
            notify_writable: false,
            in_ready_list: false,
            stall_timeout: None,
            stall_timer: None,
            last_progress: self.now,
            reason: CloseReason::PeerClosed,
            told: false,
            role_timers: [None; 2],
            tag,
        });
        Stats::add(&self.shared.stats.connections, 1);
        Ok(ConnKey::new(idx, generation))
    }
}

/// How a new connection starts: from its listener's options, or its
/// connect's.
pub(super) struct Setup {
    pub(super) framing: Framing,
    pub(super) queue_bytes: Option<usize>,
    pub(super) tag: u64,
    /// An outbound connect (it starts `Connecting`).
    pub(super) outbound: bool,
}
