//! `[admin]`: where the status, metrics and health endpoint listens, who may
//! reach it, and its bounds.
//!
//! Invariant: a validated `AdminConfig` bounds what the endpoint holds: at
//! least one client, a response of at least 4096 bytes, a request time limit
//! above zero, and a listen address no other section uses.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::{At, Checks, Cidr, ConfigError, Section, de_duration};

/// `[admin]`: HTTP status, metrics and health endpoint.
#[derive(Debug, Clone, PartialEq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Where to serve it; keep it on loopback or a management network.
    pub listen: SocketAddr,
    /// A client that has not sent a whole request by then is closed; a
    /// response that does not move for this long is dropped.
    #[serde(default = "default_admin_timeout", deserialize_with = "de_duration")]
    pub request_timeout: Duration,
    /// Clients at once; more are closed.
    #[serde(default = "default_admin_clients")]
    pub max_clients: usize,
    /// Largest response in bytes (a bigger report is answered with 503).
    #[serde(default = "default_admin_response")]
    pub max_response: usize,
    /// Client address ranges allowed (empty: any). Others are closed on accept.
    #[serde(default)]
    pub allow: Vec<Cidr>,
}

fn default_admin_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_admin_clients() -> usize {
    16
}
fn default_admin_response() -> usize {
    16 * 1024 * 1024
}

impl Section for AdminConfig {
    fn validate(&self, at: &At, cx: &mut Checks<'_>) -> Result<(), ConfigError> {
        if self.request_timeout.is_zero() {
            return at.err("request_timeout", "must be longer than 0");
        }
        if self.max_clients == 0 {
            return at.err("max_clients", "must be at least 1");
        }
        if self.max_response < 4096 {
            return at.err(
                "max_response",
                format!("must be at least 4096, got {}", self.max_response),
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
    fn admin_beyond_loopback_without_allow_is_warned_about() {
        let open = Config::parse("[admin]\nlisten = \"0.0.0.0:7080\"\n").unwrap();
        assert_eq!(open.warnings().len(), 1);
        assert!(
            open.describe()
                .contains("warning: admin.listen 0.0.0.0:7080")
        );
        let allowed =
            Config::parse("[admin]\nlisten = \"0.0.0.0:7080\"\nallow = [\"10.0.0.0/8\"]\n")
                .unwrap();
        assert!(allowed.warnings().is_empty());
        let local = Config::parse("[admin]\nlisten = \"127.0.0.1:7080\"\n").unwrap();
        assert!(local.warnings().is_empty());
    }

    #[test]
    fn admin_errors_name_the_key() {
        let e = Config::parse("[admin]\nlisten = \"127.0.0.1:7080\"\nmax_response = 100\n")
            .unwrap_err();
        assert_eq!(e.key, "admin.max_response");
        assert_eq!(e.message, "must be at least 4096, got 100");
        let e = Config::parse(
            "[[echo]]\nlisten = \"127.0.0.1:7\"\n[admin]\nlisten = \"127.0.0.1:7\"\n",
        )
        .unwrap_err();
        assert_eq!(e.key, "admin.listen");
        assert_eq!(
            e.message,
            "address 127.0.0.1:7 is already used by echo[0].listen"
        );
    }
}
