//! Tunnel counters and link status, shared with whoever holds
//! `TunnelServer::stats` or `TunnelAgent::stats` (relaxed atomics, read from
//! any thread). The session counts what it sees on the link; the roles count
//! what they decide (admission, refusals, reconnects).

use std::fmt;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Where the agent's link is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentState {
    /// Waiting to reconnect (or resolving the server's name).
    Waiting,
    /// TCP connect in progress.
    Connecting,
    /// LISTEN sent; waiting for HELLO (or, from a base server, a CONNECT).
    Handshake,
    /// Streams flow.
    Up,
}

impl fmt::Display for AgentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AgentState::Waiting => "waiting",
            AgentState::Connecting => "connecting",
            AgentState::Handshake => "handshake",
            AgentState::Up => "up",
        })
    }
}

/// Counters shared with whoever holds `TunnelServer::stats` or
/// `TunnelAgent::stats` (relaxed atomics; read from any thread).
#[derive(Debug, Default)]
pub struct TunnelStats {
    /// Links up now (handshake done).
    pub links: AtomicU64,
    /// Streams open now.
    pub streams: AtomicU64,
    /// Streams opened since start.
    pub streams_total: AtomicU64,
    /// Server: clients refused because every id (or `max_streams`) was in use.
    /// Agent: CONNECTs refused (target not allowed, or no local connection).
    pub refused_total: AtomicU64,
    /// Server, base mode: of `refused_total`, clients refused while some ids
    /// were only held by the id quarantine (`id_quarantine`).
    pub quarantine_refused_total: AtomicU64,
    /// Frames with an unknown command (ignored).
    pub unknown_total: AtomicU64,
    /// Frames of a known command that were malformed or out of place (ignored).
    pub malformed_total: AtomicU64,
    /// Frames for an id with no open stream (dropped).
    pub stale_total: AtomicU64,
    /// Streams closed because the peer sent DATA beyond its credit.
    pub credit_violations_total: AtomicU64,
    /// Base mode: streams closed for keeping the link paused `stall_timeout`.
    pub stalled_total: AtomicU64,
    /// Handshakes refused (unknown service, token required, malformed).
    pub rejected_total: AtomicU64,
    /// AUTH failures (server: wrong tag; agent: the server's tag was wrong).
    pub auth_failed_total: AtomicU64,
    /// Links that came up (server: handshakes completed; agent: links established).
    pub links_total: AtomicU64,
    /// Agent: links lost (each is followed by a reconnect).
    pub reconnects_total: AtomicU64,
    /// Server: links closed on accept because their address failed too many
    /// handshakes lately.
    pub throttled_total: AtomicU64,
    /// Server: links closed on accept because their address had
    /// `max_pending_per_ip` handshakes in progress.
    pub pending_refused_total: AtomicU64,
    /// Server: handshakes closed to make room when `max_pending` were in progress.
    pub pending_evicted_total: AtomicU64,
    /// Agent: links dropped because the server did not finish the handshake
    /// within `handshake_timeout`.
    pub handshake_timeouts_total: AtomicU64,
    /// Stream payload bytes received from the link and queued for sockets.
    pub bytes_from_link_total: AtomicU64,
    /// Stream payload bytes read from sockets and sent on the link.
    pub bytes_to_link_total: AtomicU64,
    /// CREDIT links: receive-window bytes granted above `window` now, summed
    /// over open streams (auto-tuning; at most `link_window` per link).
    pub window_grown_bytes: AtomicU64,
    /// CREDIT links: times a stream's receive window grew.
    pub window_grown_total: AtomicU64,
    /// Server: services and their public addresses; agent: state and last error.
    pub status: Mutex<Status>,
}

/// What [`TunnelStats::public_addr`], [`TunnelStats::agent_addr`] and
/// [`TunnelStats::agent`] report.
#[derive(Debug, Default, Clone)]
pub struct Status {
    /// Server: (service name, bound public address while linked, agent address).
    pub services: Vec<(String, Option<SocketAddr>, Option<SocketAddr>)>,
    /// Agent: where the link is, and why it last went down.
    pub agent: Option<(AgentState, String, u16)>,
}

impl TunnelStats {
    /// The bound public address of `service` while an agent is linked to it.
    pub fn public_addr(&self, service: &str) -> Option<SocketAddr> {
        let st = self.status.lock().ok()?;
        st.services
            .iter()
            .rev()
            .find(|(n, _, _)| n == service)
            .and_then(|(_, a, _)| *a)
    }

    /// The address of the agent linked to `service`.
    pub fn agent_addr(&self, service: &str) -> Option<SocketAddr> {
        let st = self.status.lock().ok()?;
        st.services
            .iter()
            .rev()
            .find(|(n, _, _)| n == service)
            .and_then(|(_, _, a)| *a)
    }

    /// Agent: its state, the last error, and the extension bits in force.
    pub fn agent(&self) -> Option<(AgentState, String, u16)> {
        self.status.lock().ok()?.agent.clone()
    }
}

/// Add one to a counter.
pub fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn add(c: &AtomicU64, n: usize) {
    c.fetch_add(n as u64, Ordering::Relaxed);
}

pub(crate) fn drop_one(c: &AtomicU64) {
    c.fetch_sub(1, Ordering::Relaxed);
}

pub(crate) fn sub(c: &AtomicU64, n: u64) {
    c.fetch_sub(n, Ordering::Relaxed);
}
