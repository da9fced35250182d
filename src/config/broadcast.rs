//! `[[broadcast]]`: where subscribers and publishers connect, how records
//! are delimited, and what a slow subscriber may cost.
//!
//! Invariant: a validated `BroadcastConfig` bounds a subscriber: a whole
//! record (with its length prefix) fits one read buffer and one subscriber
//! queue, queues and connection counts are at least 1 and within
//! `engine.max_connections`, the replay ring holds at most [`MAX_REPLAY`]
//! records, and its addresses are used by no other section.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::{At, Checks, Cidr, ConfigError, Section, de_duration, de_opt_duration};

/// Default `broadcast.max_record`: longest record in bytes (line: with its
/// terminator; u16/u32: the payload).
pub const DEFAULT_MAX_RECORD: usize = 16 * 1024;
/// Default `broadcast.queue_records`: records queued per subscriber.
pub const DEFAULT_QUEUE_RECORDS: usize = 10_000;
/// Default `broadcast.max_subscribers`.
pub const DEFAULT_MAX_SUBSCRIBERS: usize = 1_000;
/// Default `broadcast.max_publishers`.
pub const DEFAULT_MAX_PUBLISHERS: usize = 64;
/// Default broadcast `idle_timeout`: a silent publisher is closed after this.
pub const DEFAULT_PUBLISHER_IDLE: Duration = Duration::from_secs(300);
/// Default `broadcast.stall_timeout`.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Default `broadcast.keepalive`: silence before the first TCP keepalive probe.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(60);
/// Default `broadcast.keepalive_interval`.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Default `broadcast.user_timeout` (Linux `TCP_USER_TIMEOUT`).
pub const DEFAULT_USER_TIMEOUT: Duration = Duration::from_secs(120);
/// Largest accepted `broadcast.replay`.
pub const MAX_REPLAY: usize = 100_000;

/// `[[broadcast]]`: every record from any publisher to every subscriber.
#[derive(Debug, Clone, PartialEq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BroadcastConfig {
    /// Name used in logs (default `"broadcast"`).
    #[serde(default = "default_broadcast_name")]
    pub name: String,
    /// Subscribers (for example a video recorder's console) connect here.
    pub listen: SocketAddr,
    /// Where publishers send records: an address to listen on, or `"stdin"`.
    /// Omitted: records come only from the library (`broadcast::publish`).
    #[serde(default)]
    pub ingest: Option<Ingest>,
    /// How records are delimited: `line` (default), `u16` or `u32`.
    #[serde(default)]
    pub framing: RecordFraming,
    /// Longest record in bytes: for `line` the whole line with its terminator,
    /// for `u16`/`u32` the payload.
    #[serde(default = "default_max_record")]
    pub max_record: usize,
    /// Per-subscriber queue bound in bytes (default `engine.queue_bytes`).
    #[serde(default)]
    pub queue_bytes: Option<usize>,
    /// Per-subscriber queue bound in records.
    #[serde(default = "default_queue_records")]
    pub queue_records: usize,
    /// What to do with a subscriber whose queue is full.
    #[serde(default)]
    pub slow: SlowPolicy,
    /// Close a subscriber whose queue has not moved for this long.
    #[serde(default = "default_stall_timeout", deserialize_with = "de_duration")]
    pub stall_timeout: Duration,
    /// Records kept and replayed to each new subscriber before live records.
    #[serde(default)]
    pub replay: usize,
    /// Addresses allowed to connect (subscribers and publishers), as CIDRs;
    /// empty (the default) allows everyone.
    #[serde(default)]
    pub allow: Vec<Cidr>,
    /// Subscribers at once; more are refused.
    #[serde(default = "default_max_subscribers")]
    pub max_subscribers: usize,
    /// Publisher connections at once; more are refused.
    #[serde(default = "default_max_publishers")]
    pub max_publishers: usize,
    /// A TCP publisher that sends nothing for this long is closed (its slot
    /// frees for the real publisher).
    #[serde(default = "default_publisher_idle", deserialize_with = "de_duration")]
    pub idle_timeout: Duration,
    /// Line framing: a partial line silent this long is published as a record.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub flush_idle: Option<Duration>,
    /// Silence before the first TCP keepalive probe to a subscriber.
    #[serde(default = "default_keepalive", deserialize_with = "de_duration")]
    pub keepalive: Duration,
    /// Time between keepalive probes.
    #[serde(
        default = "default_keepalive_interval",
        deserialize_with = "de_duration"
    )]
    pub keepalive_interval: Duration,
    /// Linux `TCP_USER_TIMEOUT` for subscribers: unacknowledged data older
    /// than this drops the connection.
    #[serde(default = "default_user_timeout", deserialize_with = "de_duration")]
    pub user_timeout: Duration,
}

fn default_broadcast_name() -> String {
    "broadcast".to_owned()
}
fn default_max_record() -> usize {
    DEFAULT_MAX_RECORD
}
fn default_queue_records() -> usize {
    DEFAULT_QUEUE_RECORDS
}
fn default_stall_timeout() -> Duration {
    DEFAULT_STALL_TIMEOUT
}
fn default_max_subscribers() -> usize {
    DEFAULT_MAX_SUBSCRIBERS
}
fn default_max_publishers() -> usize {
    DEFAULT_MAX_PUBLISHERS
}
fn default_publisher_idle() -> Duration {
    DEFAULT_PUBLISHER_IDLE
}
fn default_keepalive() -> Duration {
    DEFAULT_KEEPALIVE
}
fn default_keepalive_interval() -> Duration {
    DEFAULT_KEEPALIVE_INTERVAL
}
fn default_user_timeout() -> Duration {
    DEFAULT_USER_TIMEOUT
}

/// Where a broadcast's publishers come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ingest {
    /// A TCP address publishers connect to.
    Tcp(SocketAddr),
    /// Records read from standard input.
    Stdin,
}

impl<'de> Deserialize<'de> for Ingest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Ingest, D::Error> {
        let s = String::deserialize(d)?;
        if s == "stdin" {
            return Ok(Ingest::Stdin);
        }
        s.parse().map(Ingest::Tcp).map_err(|_| {
            serde::de::Error::custom(format!(
                "invalid ingest {s:?}: expected \"stdin\" or an address like \"127.0.0.1:7001\""
            ))
        })
    }
}

/// Record delimiting for a broadcast.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordFraming {
    /// Lines ending in `\n` (CRLF too).
    #[default]
    Line,
    /// A big-endian u16 length, then the payload.
    U16,
    /// A big-endian u32 length, then the payload.
    U32,
}

impl RecordFraming {
    /// The codec framing for records of at most `max_record` bytes.
    pub fn framing(self, max_record: usize) -> crate::codec::Framing {
        use crate::codec::Framing;
        match self {
            RecordFraming::Line => Framing::Line { max: max_record },
            RecordFraming::U16 => Framing::U16 { max: max_record },
            RecordFraming::U32 => Framing::U32 { max: max_record },
        }
    }
}

/// The policy for a subscriber whose queue is full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SlowPolicy {
    /// Close the subscriber (it can reconnect and start at a record boundary).
    #[default]
    Disconnect,
    /// Drop the oldest queued records (whole) to make room for the new one.
    DropOldest,
    /// Drop the new record for this subscriber.
    DropNewest,
}

impl Section for BroadcastConfig {
    fn validate(&self, at: &At, cx: &mut Checks<'_>) -> Result<(), ConfigError> {
        let e = cx.engine;
        if self.name.is_empty() {
            return at.err("name", "must not be empty");
        }
        let wire = self
            .framing
            .framing(self.max_record)
            .max_encoded_len()
            .unwrap_or(usize::MAX);
        if self.max_record == 0 || wire > e.buffer_bytes {
            return at.err(
                "max_record",
                format!(
                    "must be between 1 and engine.buffer_bytes ({}) less the length prefix, got {}",
                    e.buffer_bytes, self.max_record
                ),
            );
        }
        if self.framing == RecordFraming::U16 && self.max_record > usize::from(u16::MAX) {
            return at.err(
                "max_record",
                format!(
                    "must be at most 65535 with framing = \"u16\", got {}",
                    self.max_record
                ),
            );
        }
        let queue = self.queue_bytes.unwrap_or(e.queue_bytes);
        if queue < wire {
            return at.err(
                "queue_bytes",
                format!("must hold at least one record ({wire} bytes), got {queue}"),
            );
        }
        if self.queue_records == 0 {
            return at.err("queue_records", "must be at least 1");
        }
        if self.replay > MAX_REPLAY {
            return at.err(
                "replay",
                format!("must be at most {MAX_REPLAY}, got {}", self.replay),
            );
        }
        if self.max_subscribers == 0 || self.max_subscribers > e.max_connections {
            return at.err(
                "max_subscribers",
                format!(
                    "must be between 1 and engine.max_connections ({}), got {}",
                    e.max_connections, self.max_subscribers
                ),
            );
        }
        if self.max_publishers == 0 {
            return at.err("max_publishers", "must be at least 1");
        }
        if self.idle_timeout.is_zero() {
            return at.err("idle_timeout", "must be longer than 0");
        }
        if self.flush_idle.is_some() && self.framing != RecordFraming::Line {
            return at.err("flush_idle", "applies to framing = \"line\" only");
        }
        if self.flush_idle == Some(Duration::ZERO) {
            return at.err(
                "flush_idle",
                "must be longer than 0 (omit it to never flush partial lines)",
            );
        }
        for (k, d) in [
            ("stall_timeout", self.stall_timeout),
            ("keepalive", self.keepalive),
            ("keepalive_interval", self.keepalive_interval),
        ] {
            if d < Duration::from_secs(1) {
                return at.err(k, format!("must be at least 1s, got {d:?}"));
            }
        }
        cx.claim(self.listen, at, "listen")?;
        if let Some(Ingest::Tcp(a)) = self.ingest {
            cx.claim(a, at, "ingest")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use crate::config::Config;

    #[test]
    fn broadcast_errors_name_the_key() {
        for (line, key, message) in [
            (
                "framing = \"u16\"\nflush_idle = \"1s\"",
                "broadcast[0].flush_idle",
                "applies to framing = \"line\" only",
            ),
            (
                "replay = 100001",
                "broadcast[0].replay",
                "must be at most 100000, got 100001",
            ),
            (
                "keepalive = \"500ms\"",
                "broadcast[0].keepalive",
                "must be at least 1s, got 500ms",
            ),
            (
                "ingest = \"127.0.0.1:7\"",
                "broadcast[0].ingest",
                "address 127.0.0.1:7 is already used by broadcast[0].listen",
            ),
        ] {
            let text = format!("[[broadcast]]\nlisten = \"127.0.0.1:7\"\n{line}\n");
            let e = Config::parse(&text).unwrap_err();
            assert_eq!(
                (e.key.as_str(), e.message.as_str()),
                (key, message),
                "{line}"
            );
        }
        let two_on_stdin = "[[broadcast]]\nname = \"a\"\nlisten = \"127.0.0.1:7\"\ningest = \"stdin\"\n\
                            [[broadcast]]\nname = \"b\"\nlisten = \"127.0.0.1:8\"\ningest = \"stdin\"\n";
        let e = Config::parse(two_on_stdin).unwrap_err();
        assert_eq!(e.key, "broadcast.ingest");
        assert_eq!(e.message, "only one broadcast can read stdin");
    }
}
