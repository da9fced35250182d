//! `[[echo]]`: a listener whose clients get back every byte they send.
//!
//! Invariant: a validated `EchoConfig` has a name, a per-client send queue
//! that holds two reads (when it overrides `engine.queue_bytes`), an idle
//! timeout above zero when one is set, and a listen address no other section
//! uses.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::{At, Checks, ConfigError, Section, de_opt_duration};

/// `[[echo]]`: send back every byte received.
#[derive(Debug, Clone, PartialEq, Hash, Deserialize)]
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

impl Section for EchoConfig {
    fn validate(&self, at: &At, cx: &mut Checks<'_>) -> Result<(), ConfigError> {
        if self.name.is_empty() {
            return at.err("name", "must not be empty");
        }
        if let Some(q) = self.queue_bytes
            && q < 2 * cx.engine.buffer_bytes
        {
            return at.err(
                "queue_bytes",
                format!(
                    "must be at least twice engine.buffer_bytes ({}), got {q}",
                    2 * cx.engine.buffer_bytes
                ),
            );
        }
        if self.idle_timeout == Some(Duration::ZERO) {
            return at.err(
                "idle_timeout",
                "must be longer than 0 (omit it for no idle timeout)",
            );
        }
        cx.claim(self.listen, at, "listen")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use crate::config::Config;

    #[test]
    fn echo_errors_name_the_key() {
        for (line, key, message) in [
            ("name = \"\"", "echo[0].name", "must not be empty"),
            (
                "queue_bytes = 1024",
                "echo[0].queue_bytes",
                "must be at least twice engine.buffer_bytes (135168), got 1024",
            ),
            (
                "idle_timeout = \"0s\"",
                "echo[0].idle_timeout",
                "must be longer than 0 (omit it for no idle timeout)",
            ),
        ] {
            let text = format!("[[echo]]\nlisten = \"127.0.0.1:7\"\n{line}\n");
            let e = Config::parse(&text).unwrap_err();
            assert_eq!(
                (e.key.as_str(), e.message.as_str()),
                (key, message),
                "{line}"
            );
        }
    }
}
