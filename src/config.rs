//! Typed configuration: TOML in, validated [`Config`] out, with defaults.
//!
//! Invariant: a `Config` that passed [`Config::validate`] can be run: every bound
//! is set and consistent (a frame fits a read buffer, a read fits a send queue,
//! connection indices stay below the listener tokens). Errors name the file, the
//! key and what is wrong. Every key and default is documented in README.md.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Default `engine.max_connections`: connections held at once (all roles).
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default `engine.buffer_bytes`: size of one pooled read/copy buffer.
pub const DEFAULT_BUFFER_BYTES: usize = 64 * 1024;
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
/// Largest accepted `engine.max_connections` (keeps slab indices in `u32` and
/// below the reserved listener tokens on 32-bit targets).
pub const MAX_MAX_CONNECTIONS: usize = 1 << 24;
/// Smallest accepted `engine.buffer_bytes`.
pub const MIN_BUFFER_BYTES: usize = 1024;

/// The built-in configuration used by `switchboard run` without `-c`: loopback only.
pub const BUILTIN_CONFIG: &str = r#"# switchboard built-in default: every role on loopback only.
[engine]
max_connections = 1024

[[echo]]
name = "echo"
listen = "127.0.0.1:7007"
idle_timeout = "5m"
"#;

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[engine]`: limits shared by every role.
    #[serde(default)]
    pub engine: EngineConfig,
    /// `[[echo]]` roles.
    #[serde(default)]
    pub echo: Vec<EchoConfig>,
}

/// `[engine]`: loop-wide limits.
#[derive(Debug, Clone, Deserialize)]
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
        }
    }
}

/// `[[echo]]`: send back every byte received.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EchoConfig {
    /// Name used in logs (default `"echo"`).
    #[serde(default = "default_echo_name")]
    pub name: String,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Close a client that sends nothing for this long (default: never).
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub idle_timeout: Option<Duration>,
    /// Per-client send queue bound (default: `engine.queue_bytes`).
    #[serde(default)]
    pub queue_bytes: Option<usize>,
}

fn default_echo_name() -> String {
    "echo".to_owned()
}

/// A configuration that cannot be used, naming where and why.
#[derive(Debug)]
pub struct ConfigError {
    /// The file, or `None` for the built-in configuration.
    pub file: Option<PathBuf>,
    /// The key at fault (`engine.max_connections`, `echo[0].listen`), or empty
    /// when the file could not be read or parsed as a whole.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.file {
            Some(p) => write!(f, "{}: ", p.display())?,
            None => f.write_str("built-in config: ")?,
        }
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(self.message.trim_end())
    }
}

impl std::error::Error for ConfigError {}

// ===== impl Config =====

impl Config {
    /// Parse and validate a configuration file.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the file, the key and the problem.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: Some(path.to_owned()),
            key: String::new(),
            message: format!("cannot read: {e}"),
        })?;
        Config::parse(&text).map_err(|mut e| {
            e.file = Some(path.to_owned());
            e
        })
    }

    /// The built-in loopback configuration ([`BUILTIN_CONFIG`]).
    ///
    /// # Errors
    /// Never in a released build; the built-in text is tested.
    pub fn builtin() -> Result<Config, ConfigError> {
        Config::parse(BUILTIN_CONFIG)
    }

    /// Parse and validate TOML text (the error's `file` is left `None`).
    ///
    /// # Errors
    /// A [`ConfigError`] naming the key and the problem.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError {
            file: None,
            key: String::new(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Check every bound and cross-key rule.
    ///
    /// # Errors
    /// The first problem found, as a [`ConfigError`] with `file: None`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let e = &self.engine;
        let err = |key: &str, message: String| {
            Err(ConfigError {
                file: None,
                key: key.to_owned(),
                message,
            })
        };
        if e.max_connections == 0 || e.max_connections > MAX_MAX_CONNECTIONS {
            return err(
                "engine.max_connections",
                format!(
                    "must be between 1 and {MAX_MAX_CONNECTIONS}, got {}",
                    e.max_connections
                ),
            );
        }
        if e.buffer_bytes < MIN_BUFFER_BYTES || e.buffer_bytes > u32::MAX as usize {
            return err(
                "engine.buffer_bytes",
                format!(
                    "must be at least {MIN_BUFFER_BYTES}, got {}",
                    e.buffer_bytes
                ),
            );
        }
        if e.queue_bytes < 2 * e.buffer_bytes {
            return err(
                "engine.queue_bytes",
                format!(
                    "must be at least twice engine.buffer_bytes ({}), got {}",
                    2 * e.buffer_bytes,
                    e.queue_bytes
                ),
            );
        }
        if e.read_budget == 0 {
            return err("engine.read_budget", "must be at least 1".to_owned());
        }
        if e.inbox == 0 {
            return err("engine.inbox", "must be at least 1".to_owned());
        }
        let mut seen: Vec<(SocketAddr, String)> = Vec::new();
        for (i, echo) in self.echo.iter().enumerate() {
            if echo.name.is_empty() {
                return err(&format!("echo[{i}].name"), "must not be empty".to_owned());
            }
            if let Some(q) = echo.queue_bytes
                && q < 2 * e.buffer_bytes
            {
                return err(
                    &format!("echo[{i}].queue_bytes"),
                    format!(
                        "must be at least twice engine.buffer_bytes ({}), got {q}",
                        2 * e.buffer_bytes
                    ),
                );
            }
            if echo.idle_timeout == Some(Duration::ZERO) {
                return err(
                    &format!("echo[{i}].idle_timeout"),
                    "must be longer than 0 (omit it for no idle timeout)".to_owned(),
                );
            }
            check_unique(&mut seen, echo.listen, format!("echo[{i}].listen"))?;
        }
        Ok(())
    }

    /// A short human-readable account of what would run (for `switchboard check`).
    pub fn describe(&self) -> String {
        let e = &self.engine;
        let mut out = format!(
            "engine: max_connections={} buffer_bytes={} queue_bytes={} shutdown_timeout={:?}\n",
            e.max_connections, e.buffer_bytes, e.queue_bytes, e.shutdown_timeout
        );
        for echo in &self.echo {
            out.push_str(&format!("echo '{}': listen {}", echo.name, echo.listen));
            match echo.idle_timeout {
                Some(t) => out.push_str(&format!(", idle_timeout {t:?}\n")),
                None => out.push_str(", no idle timeout\n"),
            }
        }
        if self.echo.is_empty() {
            out.push_str("(no roles configured: nothing would listen)\n");
        }
        out
    }
}

fn check_unique(
    seen: &mut Vec<(SocketAddr, String)>,
    addr: SocketAddr,
    key: String,
) -> Result<(), ConfigError> {
    if addr.port() != 0
        && let Some((_, other)) = seen.iter().find(|(a, _)| *a == addr)
    {
        return Err(ConfigError {
            file: None,
            message: format!("address {addr} is already used by {other}"),
            key,
        });
    }
    seen.push((addr, key));
    Ok(())
}

/// Parse a duration written as a number and a unit: `"500ms"`, `"10s"`, `"5m"`, `"1h"`.
///
/// # Errors
/// A message saying what is expected.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let bad = || {
        format!(
            "invalid duration {s:?}: expected a whole number and a unit (ms, s, m, h), like \"500ms\" or \"10s\""
        )
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    let secs = |mult: u64| n.checked_mul(mult).map(Duration::from_secs).ok_or_else(bad);
    match unit.trim() {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        _ => Err(bad()),
    }
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn builtin_config_is_valid_and_loopback_only() {
        let c = Config::builtin().unwrap();
        assert!(!c.echo.is_empty());
        assert!(c.echo.iter().all(|e| e.listen.ip().is_loopback()));
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("1.5s").is_err());
        assert!(parse_duration("99999999999999999999h").is_err());
    }

    #[test]
    fn errors_name_the_key() {
        let e = Config::parse("[engine]\nmax_connections = 0\n").unwrap_err();
        assert_eq!(e.key, "engine.max_connections");
        let e = Config::parse("[[echo]]\nlisten = \"127.0.0.1:1\"\nidle_timeout = \"5x\"\n")
            .unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("idle_timeout") && text.contains("invalid duration"),
            "{text}"
        );
        let e = Config::parse("[[echo]]\nlisten = \"nonsense\"\n").unwrap_err();
        assert!(e.to_string().contains("listen"), "{e}");
        let e = Config::parse("[engine]\nmax_conections = 5\n").unwrap_err();
        assert!(e.to_string().contains("max_conections"), "{e}");
    }

    #[test]
    fn duplicate_listen_addresses_are_refused() {
        let e = Config::parse(
            "[[echo]]\nlisten = \"127.0.0.1:7\"\n[[echo]]\nlisten = \"127.0.0.1:7\"\n",
        )
        .unwrap_err();
        assert_eq!(e.key, "echo[1].listen");
        assert!(e.message.contains("echo[0].listen"));
    }

    #[test]
    fn queue_must_hold_two_reads() {
        let e = Config::parse("[engine]\nbuffer_bytes = 65536\nqueue_bytes = 65536\n").unwrap_err();
        assert_eq!(e.key, "engine.queue_bytes");
    }
}
