//! Tunnel counters and link status, shared with whoever holds
//! `TunnelServer::stats` or `TunnelAgent::stats` (relaxed atomics, read from
//! any thread). The session counts what it sees on the link; the roles count
//! what they decide (admission, refusals, reconnects). Each counter's
//! declaration also gives its `/status` field and `/metrics` family.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

/// Kept under this path for callers from before [`crate::metrics`].
pub use crate::metrics::bump;

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

crate::counters! {
    /// Counters shared with whoever holds `TunnelServer::stats` or
    /// `TunnelAgent::stats` (relaxed atomics; read from any thread). Both
    /// roles report them in this order; the agent also reports
    /// `reconnects_total` and `handshake_timeouts_total` in `/status`, and
    /// the latter in `/metrics`, itself.
    #[derive(Debug, Default)]
    pub struct TunnelStats {
        /// Links up now (handshake done).
        pub links: AtomicU64 = gauge,
        /// Streams open now.
        pub streams: AtomicU64 = gauge,
        /// Streams opened since start.
        pub streams_total: AtomicU64 = counter {
            status: "streams_total",
            metric: "switchboard_tunnel_streams_opened_total",
            help: "Streams opened.",
        },
        /// Server: clients refused because every id (or `max_streams`) was in use.
        /// Agent: CONNECTs refused (target not allowed, or no local connection).
        pub refused_total: AtomicU64 = counter {
            status: "refused_total",
            metric: "switchboard_tunnel_refused_streams_total",
            help: "Streams refused (ids exhausted, target not allowed).",
        },
        /// Server, base mode: of `refused_total`, clients refused while some ids
        /// were only held by the id quarantine (`id_quarantine`).
        pub quarantine_refused_total: AtomicU64 = counter {
            status: "quarantine_refused_total",
            metric: "switchboard_tunnel_quarantine_refused_streams_total",
            help: "Clients refused while ids were held by the base-mode id quarantine.",
        },
        /// Links that came up (server: handshakes completed; agent: links established).
        pub links_total: AtomicU64 = counter {
            metric: "switchboard_tunnel_links_total",
            help: "Links that completed their handshake.",
        },
        /// Handshakes refused (unknown service, token required, malformed).
        pub rejected_total: AtomicU64 = counter {
            status: "rejected_total",
            metric: "switchboard_tunnel_rejected_links_total",
            help: "Handshakes refused.",
        },
        /// AUTH failures (server: wrong tag; agent: the server's tag was wrong).
        pub auth_failed_total: AtomicU64 = counter {
            status: "auth_failed_total",
            metric: "switchboard_tunnel_auth_failures_total",
            help: "Authentication failures.",
        },
        /// Frames with an unknown command (ignored).
        pub unknown_total: AtomicU64 = counter {
            status: "unknown_frames_total",
            metric: "switchboard_tunnel_unknown_frames_total",
            help: "Frames with an unknown command (ignored).",
        },
        /// Frames of a known command that were malformed or out of place (ignored).
        pub malformed_total: AtomicU64 = counter {
            status: "malformed_frames_total",
            metric: "switchboard_tunnel_malformed_frames_total",
            help: "Malformed or out-of-place frames (ignored).",
        },
        /// Frames for an id with no open stream (dropped).
        pub stale_total: AtomicU64 = counter {
            metric: "switchboard_tunnel_stale_frames_total",
            help: "Frames for ids without a stream (dropped).",
        },
        /// Streams closed because the peer sent DATA beyond its credit.
        pub credit_violations_total: AtomicU64 = counter,
        /// Base mode: streams closed for keeping the link paused `stall_timeout`.
        pub stalled_total: AtomicU64 = counter,
        /// Agent: links lost (each is followed by a reconnect).
        pub reconnects_total: AtomicU64 = counter {
            metric: "switchboard_tunnel_reconnects_total",
            help: "Agent links lost and redialled.",
        },
        /// Server: links closed on accept because their address failed too many
        /// handshakes lately.
        pub throttled_total: AtomicU64 = counter {
            metric: "switchboard_tunnel_throttled_links_total",
            help: "Links closed on accept: their address failed too many handshakes.",
        },
        /// Server: links closed on accept because their address had
        /// `max_pending_per_ip` handshakes in progress.
        pub pending_refused_total: AtomicU64 = counter {
            metric: "switchboard_tunnel_pending_refused_total",
            help: "Links closed on accept: max_pending_per_ip handshakes from their address.",
        },
        /// Server: handshakes closed to make room when `max_pending` were in progress.
        pub pending_evicted_total: AtomicU64 = counter {
            metric: "switchboard_tunnel_pending_evicted_total",
            help: "Handshakes closed to make room (max_pending reached).",
        },
        /// Agent: links dropped because the server did not finish the handshake
        /// within `handshake_timeout`.
        pub handshake_timeouts_total: AtomicU64 = counter,
        /// Stream payload bytes received from the link and queued for sockets.
        pub bytes_from_link_total: AtomicU64 = counter {
            status: "bytes_from_link_total",
            metric: "switchboard_tunnel_received_bytes_total",
            help: "Stream bytes received from the link.",
        },
        /// Stream payload bytes read from sockets and sent on the link.
        pub bytes_to_link_total: AtomicU64 = counter {
            status: "bytes_to_link_total",
            metric: "switchboard_tunnel_sent_bytes_total",
            help: "Stream bytes sent on the link.",
        },
        /// CREDIT links: receive-window bytes granted above `window` now, summed
        /// over open streams (auto-tuning; at most `link_window` per link).
        pub window_grown_bytes: AtomicU64 = gauge {
            status: "window_grown_bytes",
            metric: "switchboard_tunnel_window_grown_bytes",
            help: "Receive-window bytes granted above `window` now (auto-tuning).",
        },
        /// CREDIT links: times a stream's receive window grew.
        pub window_grown_total: AtomicU64 = counter {
            status: "window_grown_total",
            metric: "switchboard_tunnel_window_grown_total",
            help: "Times a stream's receive window grew (auto-tuning).",
        },
        /// Server: services and their public addresses; agent: state and last error.
        pub status: Mutex<Status>,
    }
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
