//! `[engine]`: the loop-wide limits every role shares, their `DEFAULT_*`
//! values and their bounds.
//!
//! Invariant: a validated `EngineConfig` can size the loop: connection indices
//! stay below the reserved listener tokens, a read buffer holds at least
//! [`MIN_BUFFER_BYTES`], and a send queue holds two reads. This is the only part
//! of the configuration the engine itself reads (`use crate::config::EngineConfig`).

use std::time::Duration;

use serde::Deserialize;

use super::{At, Checks, ConfigError, Section, de_duration};

/// Default `engine.max_connections`: connections held at once (all roles).
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default `engine.buffer_bytes`: size of one pooled read/copy buffer (64 KiB
/// plus room for a whole 65 535-byte tunnel frame and its header).
pub const DEFAULT_BUFFER_BYTES: usize = 66 * 1024;
/// Default `engine.buffer_pool`: idle buffers kept for reuse.
pub const DEFAULT_BUFFER_POOL: usize = 256;
/// Default `engine.queue_bytes`: per-connection send queue bound.
pub const DEFAULT_QUEUE_BYTES: usize = 1024 * 1024;
/// Default `engine.read_budget`: reads per connection per loop turn.
pub const DEFAULT_READ_BUDGET: usize = 16;
/// Default `engine.shutdown_timeout`: how long SIGINT/SIGTERM waits for queues to flush.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// Default `engine.linger`: how long a closing connection may take to flush.
pub const DEFAULT_LINGER: Duration = Duration::from_secs(10);
/// Default `engine.connect_timeout`: outbound connect limit.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default `engine.accept_backoff`: pause after EMFILE/ENFILE before accepting again.
pub const DEFAULT_ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Default `engine.inbox`: messages another thread may queue for the loop.
pub const DEFAULT_INBOX: usize = 1024;
/// Default `engine.listen_backlog`: the kernel's accept queue per listener.
pub const DEFAULT_LISTEN_BACKLOG: u32 = 1024;
/// Largest accepted `engine.max_connections` (keeps slab indices in `u32` and
/// below the reserved listener tokens on 32-bit targets).
pub const MAX_MAX_CONNECTIONS: usize = 1 << 24;
/// Smallest accepted `engine.buffer_bytes`.
pub const MIN_BUFFER_BYTES: usize = 1024;

/// `[engine]`: loop-wide limits.
#[derive(Debug, Clone, PartialEq, Hash, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Connections held at once, over all roles; at the limit accepting pauses.
    pub max_connections: usize,
    /// Size of one read buffer, which is also the largest frame a connection
    /// can decode (header included).
    pub buffer_bytes: usize,
    /// Idle buffers kept in the pool for reuse (more are freed).
    pub buffer_pool: usize,
    /// Default bound on one connection's queued outgoing bytes.
    pub queue_bytes: usize,
    /// Reads one connection may do per loop turn before others get a turn.
    pub read_budget: usize,
    /// SIGINT/SIGTERM: how long to flush queues before exiting anyway.
    #[serde(deserialize_with = "de_duration")]
    pub shutdown_timeout: Duration,
    /// How long a connection closed with data still queued may take to flush.
    #[serde(deserialize_with = "de_duration")]
    pub linger: Duration,
    /// Outbound connect time limit.
    #[serde(deserialize_with = "de_duration")]
    pub connect_timeout: Duration,
    /// After EMFILE/ENFILE on accept, wait this long before accepting again.
    #[serde(deserialize_with = "de_duration")]
    pub accept_backoff: Duration,
    /// Messages other threads may queue for the loop (see `Handle::send`).
    pub inbox: usize,
    /// Connections the kernel queues per listener before the loop accepts
    /// them (capped by the system's `net.core.somaxconn`).
    pub listen_backlog: u32,
}

impl Default for EngineConfig {
    fn default() -> EngineConfig {
        EngineConfig {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            buffer_bytes: DEFAULT_BUFFER_BYTES,
            buffer_pool: DEFAULT_BUFFER_POOL,
            queue_bytes: DEFAULT_QUEUE_BYTES,
            read_budget: DEFAULT_READ_BUDGET,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            linger: DEFAULT_LINGER,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            accept_backoff: DEFAULT_ACCEPT_BACKOFF,
            inbox: DEFAULT_INBOX,
            listen_backlog: DEFAULT_LISTEN_BACKLOG,
        }
    }
}

impl Section for EngineConfig {
    fn validate(&self, at: &At, _cx: &mut Checks<'_>) -> Result<(), ConfigError> {
        if self.max_connections == 0 || self.max_connections > MAX_MAX_CONNECTIONS {
            return at.err(
                "max_connections",
                format!(
                    "must be between 1 and {MAX_MAX_CONNECTIONS}, got {}",
                    self.max_connections
                ),
            );
        }
        if self.buffer_bytes < MIN_BUFFER_BYTES || self.buffer_bytes > u32::MAX as usize {
            return at.err(
                "buffer_bytes",
                format!(
                    "must be at least {MIN_BUFFER_BYTES}, got {}",
                    self.buffer_bytes
                ),
            );
        }
        if self.queue_bytes < 2 * self.buffer_bytes {
            return at.err(
                "queue_bytes",
                format!(
                    "must be at least twice engine.buffer_bytes ({}), got {}",
                    2 * self.buffer_bytes,
                    self.queue_bytes
                ),
            );
        }
        if self.read_budget == 0 {
            return at.err("read_budget", "must be at least 1");
        }
        if self.inbox == 0 {
            return at.err("inbox", "must be at least 1");
        }
        if self.listen_backlog == 0 {
            return at.err("listen_backlog", "must be at least 1");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use crate::config::Config;

    #[test]
    fn queue_must_hold_two_reads() {
        let e = Config::parse("[engine]\nbuffer_bytes = 65536\nqueue_bytes = 65536\n").unwrap_err();
        assert_eq!(e.key, "engine.queue_bytes");
    }
}
