//! `[[tunnel_server]]` with its `[[tunnel_server.service]]`s, and
//! `[[tunnel_agent]]`: the two ends of a tunnel link and the stream settings
//! they share.
//!
//! Invariant: a validated tunnel section has 1 to [`MAX_TUNNEL_STREAMS`]
//! streams, DATA payloads and frames the protocol's u16 can carry, a whole
//! frame within `engine.buffer_bytes`, windows ordered `max_data <= window <=
//! max_window <= MAX_TUNNEL_WINDOW` and `window <= link_window`, a heartbeat
//! timeout longer than its interval, and tokens of at least [`MIN_TOKEN_LEN`]
//! bytes. Both roles' stream keys are checked in one place (`Streams`).

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::{At, Checks, ConfigError, Section, de_duration};

/// Default tunnel `window`: credit per stream and direction, in bytes.
pub const DEFAULT_TUNNEL_WINDOW: u32 = 256 * 1024;
/// Default tunnel `max_window`: the most a stream's receive window grows to
/// on a CREDIT link (auto-tuning), in bytes.
pub const DEFAULT_TUNNEL_MAX_WINDOW: u32 = 4 * 1024 * 1024;
/// Default tunnel `link_window`: growth budget of one link, in bytes (the sum
/// of its streams' windows above `window`).
pub const DEFAULT_TUNNEL_LINK_WINDOW: u32 = 16 * 1024 * 1024;
/// Default tunnel `max_data`: the largest DATA payload sent.
pub const DEFAULT_TUNNEL_MAX_DATA: usize = 16 * 1024;
/// The largest tunnel frame payload (the header's u16).
pub const MAX_TUNNEL_FRAME: usize = u16::MAX as usize;
/// The most streams one link can carry (the one-byte client id).
pub const MAX_TUNNEL_STREAMS: usize = 256;
/// The shortest tunnel `token` accepted, in bytes.
pub const MIN_TOKEN_LEN: usize = 16;
/// The largest `max_window` accepted: 1 GiB (a stream's socket queue holds up
/// to its window; credit must stay far below the protocol's 2^32 - 1).
pub const MAX_TUNNEL_WINDOW: u32 = 1 << 30;

/// `[[tunnel_server]]`: agents dial in; clients of each service's public port
/// are multiplexed over that service's link.
#[derive(Debug, Clone, PartialEq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelServerConfig {
    /// Name used in logs (default `"tunnel"`).
    #[serde(default = "default_tunnel_name")]
    pub name: String,
    /// Agents dial this address.
    pub listen: SocketAddr,
    /// The services agents can offer.
    #[serde(default)]
    pub service: Vec<ServiceConfig>,
    /// Streams per link at once (at most 256); more clients are refused.
    #[serde(default = "default_max_streams")]
    pub max_streams: usize,
    /// Credit per stream and direction, and the most bytes queued for one stream's socket.
    #[serde(default = "default_window")]
    pub window: u32,
    /// CREDIT links: a stream's receive window grows from `window` up to this
    /// while the window is what limits it.
    #[serde(default = "default_max_window")]
    pub max_window: u32,
    /// CREDIT links: the most window growth (above `window`) all streams of
    /// one link hold together.
    #[serde(default = "default_link_window")]
    pub link_window: u32,
    /// Largest DATA payload sent (1..=65535).
    #[serde(default = "default_max_data")]
    pub max_data: usize,
    /// Largest frame payload accepted from an agent (1..=65535).
    #[serde(default = "default_max_frame")]
    pub max_frame: usize,
    /// Extended links: PING every so often.
    #[serde(
        default = "default_heartbeat_interval",
        deserialize_with = "de_duration"
    )]
    pub heartbeat_interval: Duration,
    /// Extended links: close after receiving nothing for this long.
    #[serde(
        default = "default_heartbeat_timeout",
        deserialize_with = "de_duration"
    )]
    pub heartbeat_timeout: Duration,
    /// Close a link that has not completed LISTEN (and AUTH) by then.
    #[serde(
        default = "default_handshake_timeout",
        deserialize_with = "de_duration"
    )]
    pub handshake_timeout: Duration,
    /// Links still in their handshake at once; when full, the oldest is
    /// closed to make room for a new one.
    #[serde(default = "default_max_pending_links")]
    pub max_pending: usize,
    /// Links in their handshake from one address at once; more are closed.
    #[serde(default = "default_max_pending_links_per_ip")]
    pub max_pending_per_ip: usize,
    /// Base mode: an id the server closed stays unused this long.
    #[serde(default = "default_id_quarantine", deserialize_with = "de_duration")]
    pub id_quarantine: Duration,
    /// Base mode: a stream that keeps the link paused this long is closed.
    #[serde(default = "default_tunnel_stall", deserialize_with = "de_duration")]
    pub stall_timeout: Duration,
}

/// `[[tunnel_server.service]]`: one public port.
#[derive(Debug, Clone, PartialEq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// The name an agent asks for in its LISTEN.
    pub name: String,
    /// Clients connect here; open while an agent is linked.
    pub public: SocketAddr,
    /// Shared secret; omit to accept a base-protocol agent (empty LISTEN).
    #[serde(default)]
    pub token: Option<String>,
}

/// `[[tunnel_agent]]` (or `switchboard agent`): dial a tunnel server and
/// connect its streams to a local service.
#[derive(Debug, Clone, PartialEq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelAgentConfig {
    /// The service to ask for (empty: the server's first service without a token).
    #[serde(default)]
    pub name: String,
    /// The server, `host:port`; a host name is resolved off the loop before
    /// each dial, and every address is tried in order.
    pub server: String,
    /// The local service streams connect to, `host:port`; a host name is
    /// resolved with `server`, and a failed connect moves the next stream to
    /// the next address.
    pub local: String,
    /// Shared secret of the service.
    #[serde(default)]
    pub token: Option<String>,
    /// Targets a CONNECT may name (default: the addresses `local` resolves to).
    #[serde(default)]
    pub allow: Vec<SocketAddr>,
    /// Ask for the protocol extensions (`false`: plain base protocol).
    #[serde(default = "default_true")]
    pub extensions: bool,
    /// Streams at once (at most 256).
    #[serde(default = "default_max_streams")]
    pub max_streams: usize,
    /// As for the server.
    #[serde(default = "default_window")]
    pub window: u32,
    /// As for the server.
    #[serde(default = "default_max_window")]
    pub max_window: u32,
    /// As for the server.
    #[serde(default = "default_link_window")]
    pub link_window: u32,
    /// As for the server.
    #[serde(default = "default_max_data")]
    pub max_data: usize,
    /// As for the server.
    #[serde(default = "default_max_frame")]
    pub max_frame: usize,
    /// As for the server.
    #[serde(
        default = "default_heartbeat_interval",
        deserialize_with = "de_duration"
    )]
    pub heartbeat_interval: Duration,
    /// As for the server.
    #[serde(
        default = "default_heartbeat_timeout",
        deserialize_with = "de_duration"
    )]
    pub heartbeat_timeout: Duration,
    /// Time limit for connecting to the local service.
    #[serde(
        default = "default_agent_connect_timeout",
        deserialize_with = "de_duration"
    )]
    pub connect_timeout: Duration,
    /// First reconnect delay (doubles, with jitter, up to `reconnect_max`).
    #[serde(
        default = "default_agent_reconnect_min",
        deserialize_with = "de_duration"
    )]
    pub reconnect_min: Duration,
    /// Longest reconnect delay.
    #[serde(
        default = "default_agent_reconnect_max",
        deserialize_with = "de_duration"
    )]
    pub reconnect_max: Duration,
    /// A link that completed its handshake and stayed up this long starts the
    /// back-off over from `reconnect_min`.
    #[serde(
        default = "default_agent_reconnect_reset",
        deserialize_with = "de_duration"
    )]
    pub reconnect_reset: Duration,
    /// From TCP connect until the handshake is done (READY; base mode: LISTEN
    /// written); a server that has not answered by then is dropped.
    #[serde(
        default = "default_handshake_timeout",
        deserialize_with = "de_duration"
    )]
    pub handshake_timeout: Duration,
    /// Base mode: a stream that keeps the link paused this long is closed.
    #[serde(default = "default_tunnel_stall", deserialize_with = "de_duration")]
    pub stall_timeout: Duration,
}

fn default_tunnel_name() -> String {
    "tunnel".to_owned()
}
fn default_max_streams() -> usize {
    MAX_TUNNEL_STREAMS
}
fn default_window() -> u32 {
    DEFAULT_TUNNEL_WINDOW
}
fn default_max_window() -> u32 {
    DEFAULT_TUNNEL_MAX_WINDOW
}
fn default_link_window() -> u32 {
    DEFAULT_TUNNEL_LINK_WINDOW
}
fn default_max_data() -> usize {
    DEFAULT_TUNNEL_MAX_DATA
}
fn default_max_frame() -> usize {
    MAX_TUNNEL_FRAME
}
fn default_heartbeat_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_heartbeat_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_pending_links() -> usize {
    64
}
fn default_max_pending_links_per_ip() -> usize {
    4
}
fn default_id_quarantine() -> Duration {
    Duration::from_secs(2)
}
fn default_tunnel_stall() -> Duration {
    Duration::from_secs(30)
}
fn default_true() -> bool {
    true
}
fn default_agent_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_agent_reconnect_min() -> Duration {
    Duration::from_secs(1)
}
fn default_agent_reconnect_max() -> Duration {
    Duration::from_secs(60)
}
fn default_agent_reconnect_reset() -> Duration {
    Duration::from_secs(10)
}

impl TunnelAgentConfig {
    /// An agent with every default but the four command-line settings.
    pub fn new(server: String, local: String, name: String, token: Option<String>) -> Self {
        TunnelAgentConfig {
            name,
            server,
            local,
            token,
            allow: Vec::new(),
            extensions: true,
            max_streams: MAX_TUNNEL_STREAMS,
            window: DEFAULT_TUNNEL_WINDOW,
            max_window: DEFAULT_TUNNEL_MAX_WINDOW,
            link_window: DEFAULT_TUNNEL_LINK_WINDOW,
            max_data: DEFAULT_TUNNEL_MAX_DATA,
            max_frame: MAX_TUNNEL_FRAME,
            heartbeat_interval: default_heartbeat_interval(),
            heartbeat_timeout: default_heartbeat_timeout(),
            connect_timeout: default_agent_connect_timeout(),
            reconnect_min: default_agent_reconnect_min(),
            reconnect_max: default_agent_reconnect_max(),
            reconnect_reset: default_agent_reconnect_reset(),
            handshake_timeout: default_handshake_timeout(),
            stall_timeout: default_tunnel_stall(),
        }
    }
}

/// The stream settings both tunnel roles share, checked the same way under
/// the role's own keys (`tunnel_server[0].window`, `tunnel_agent[0].window`).
struct Streams {
    max_streams: usize,
    window: u32,
    max_window: u32,
    link_window: u32,
    max_data: usize,
    max_frame: usize,
    heartbeat_interval: Duration,
    heartbeat_timeout: Duration,
    stall_timeout: Duration,
}

impl TunnelServerConfig {
    fn streams(&self) -> Streams {
        Streams {
            max_streams: self.max_streams,
            window: self.window,
            max_window: self.max_window,
            link_window: self.link_window,
            max_data: self.max_data,
            max_frame: self.max_frame,
            heartbeat_interval: self.heartbeat_interval,
            heartbeat_timeout: self.heartbeat_timeout,
            stall_timeout: self.stall_timeout,
        }
    }
}

impl TunnelAgentConfig {
    fn streams(&self) -> Streams {
        Streams {
            max_streams: self.max_streams,
            window: self.window,
            max_window: self.max_window,
            link_window: self.link_window,
            max_data: self.max_data,
            max_frame: self.max_frame,
            heartbeat_interval: self.heartbeat_interval,
            heartbeat_timeout: self.heartbeat_timeout,
            stall_timeout: self.stall_timeout,
        }
    }
}

// ===== impl Section =====

impl Section for Streams {
    fn validate(&self, at: &At, cx: &mut Checks<'_>) -> Result<(), ConfigError> {
        let Streams {
            max_streams,
            window,
            max_window,
            link_window,
            max_data,
            max_frame,
            heartbeat_interval: interval,
            heartbeat_timeout: timeout,
            stall_timeout,
        } = *self;
        if max_streams == 0 || max_streams > MAX_TUNNEL_STREAMS {
            return at.err(
                "max_streams",
                format!("must be between 1 and {MAX_TUNNEL_STREAMS}, got {max_streams}"),
            );
        }
        if max_data == 0 || max_data > MAX_TUNNEL_FRAME {
            return at.err(
                "max_data",
                format!("must be between 1 and {MAX_TUNNEL_FRAME}, got {max_data}"),
            );
        }
        if max_frame == 0 || max_frame > MAX_TUNNEL_FRAME {
            return at.err(
                "max_frame",
                format!("must be between 1 and {MAX_TUNNEL_FRAME}, got {max_frame}"),
            );
        }
        if cx.engine.buffer_bytes < max_frame + crate::codec::tunnel::HEADER_LEN {
            return at.err(
                "max_frame",
                format!(
                    "a whole frame ({} bytes with its header) must fit engine.buffer_bytes ({})",
                    max_frame + crate::codec::tunnel::HEADER_LEN,
                    cx.engine.buffer_bytes
                ),
            );
        }
        if (window as usize) < max_data {
            return at.err(
                "window",
                format!("must be at least max_data ({max_data}), got {window}"),
            );
        }
        if max_window < window {
            return at.err(
                "max_window",
                format!(
                    "must be at least window ({window}), got {max_window} (raise it with window)"
                ),
            );
        }
        if max_window > MAX_TUNNEL_WINDOW {
            return at.err(
                "max_window",
                format!("must be at most {MAX_TUNNEL_WINDOW} (1 GiB), got {max_window}"),
            );
        }
        if link_window < window {
            return at.err(
                "link_window",
                format!("must be at least window ({window}), got {link_window}"),
            );
        }
        if interval < Duration::from_millis(10) {
            return at.err(
                "heartbeat_interval",
                format!("must be at least 10ms, got {interval:?}"),
            );
        }
        if timeout <= interval {
            return at.err(
                "heartbeat_timeout",
                format!("must be longer than heartbeat_interval ({interval:?}), got {timeout:?}"),
            );
        }
        if stall_timeout.is_zero() {
            return at.err("stall_timeout", "must be longer than 0");
        }
        Ok(())
    }
}

impl Section for TunnelServerConfig {
    fn validate(&self, at: &At, cx: &mut Checks<'_>) -> Result<(), ConfigError> {
        if self.name.is_empty() {
            return at.err("name", "must not be empty");
        }
        self.streams().validate(at, cx)?;
        if self.max_frame < crate::codec::tunnel::MAX_NAME_LEN + 32 {
            return at.err(
                "max_frame",
                format!(
                    "must be at least 96 to take a LISTEN request, got {}",
                    self.max_frame
                ),
            );
        }
        if self.handshake_timeout.is_zero() {
            return at.err("handshake_timeout", "must be longer than 0");
        }
        if self.max_pending == 0 {
            return at.err("max_pending", "must be at least 1");
        }
        if self.max_pending_per_ip == 0 {
            return at.err("max_pending_per_ip", "must be at least 1");
        }
        if self.service.is_empty() {
            return at.err("service", "at least one service is needed");
        }
        cx.claim(self.listen, at, "listen")?;
        for (j, s) in self.service.iter().enumerate() {
            let at = at.nested("service", j);
            if s.name.is_empty() || s.name.len() > crate::codec::tunnel::MAX_NAME_LEN {
                return at.err(
                    "name",
                    format!(
                        "must be 1 to {} bytes, got {}",
                        crate::codec::tunnel::MAX_NAME_LEN,
                        s.name.len()
                    ),
                );
            }
            if self.service[..j].iter().any(|o| o.name == s.name) {
                return at.err("name", format!("service '{}' is defined twice", s.name));
            }
            check_token(s.token.as_deref(), &at)?;
            cx.claim(s.public, &at, "public")?;
        }
        Ok(())
    }
}

impl Section for TunnelAgentConfig {
    fn validate(&self, at: &At, cx: &mut Checks<'_>) -> Result<(), ConfigError> {
        self.streams().validate(at, cx)?;
        if self.name.len() > crate::codec::tunnel::MAX_NAME_LEN {
            return at.err(
                "name",
                format!(
                    "must be at most {} bytes, got {}",
                    crate::codec::tunnel::MAX_NAME_LEN,
                    self.name.len()
                ),
            );
        }
        for (k, v) in [("server", &self.server), ("local", &self.local)] {
            if !is_host_port(v) {
                return at.err(
                    k,
                    format!(
                        "must be host:port (a name or an address, and a port from 1 to 65535), got '{v}'"
                    ),
                );
            }
        }
        check_token(self.token.as_deref(), at)?;
        if self.token.is_some() && !self.extensions {
            return at.err(
                "token",
                "needs extensions = true (the base protocol has no authentication)",
            );
        }
        if self.connect_timeout.is_zero() {
            return at.err("connect_timeout", "must be longer than 0");
        }
        if self.handshake_timeout.is_zero() {
            return at.err("handshake_timeout", "must be longer than 0");
        }
        if self.reconnect_reset.is_zero() {
            return at.err("reconnect_reset", "must be longer than 0");
        }
        if self.reconnect_min.is_zero() || self.reconnect_max < self.reconnect_min {
            return at.err(
                "reconnect_max",
                format!(
                    "need 0 < reconnect_min <= reconnect_max, got {:?} and {:?}",
                    self.reconnect_min, self.reconnect_max
                ),
            );
        }
        Ok(())
    }
}

/// Refuse an empty or short shared secret (the `token` key of `at`): a tunnel
/// token guards a public port, and a short one falls to guessing.
fn check_token(token: Option<&str>, at: &At) -> Result<(), ConfigError> {
    let message = match token {
        None => return Ok(()),
        Some("") => "must not be empty (omit it for a service without a token)".to_owned(),
        Some(t) if t.len() < MIN_TOKEN_LEN => format!(
            "is {} bytes; a token needs at least {MIN_TOKEN_LEN} \
             (make a good one with `openssl rand -hex 32`)",
            t.len()
        ),
        Some(_) => return Ok(()),
    };
    at.err("token", message)
}

/// `host:port` as the tunnel agent dials it: an IP address (IPv6 in
/// brackets) or a non-empty host name, and a port from 1 to 65535.
fn is_host_port(v: &str) -> bool {
    if let Ok(a) = v.parse::<SocketAddr>() {
        return a.port() != 0;
    }
    match v.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty()
                && !host.contains(char::is_whitespace)
                && port.parse::<u16>().is_ok_and(|p| p != 0)
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use crate::config::Config;

    #[test]
    fn tunnel_config_defaults_and_errors() {
        let ok = "[[tunnel_server]]\nlisten = \"127.0.0.1:9000\"\n[[tunnel_server.service]]\nname = \"d\"\npublic = \"127.0.0.1:2323\"\n[[tunnel_agent]]\nserver = \"gw.example:9000\"\nlocal = \"127.0.0.1:23\"\n";
        let c = Config::parse(ok).unwrap();
        assert_eq!(c.tunnel_server[0].window, DEFAULT_TUNNEL_WINDOW);
        assert_eq!(c.tunnel_server[0].max_window, DEFAULT_TUNNEL_MAX_WINDOW);
        assert_eq!(c.tunnel_server[0].link_window, DEFAULT_TUNNEL_LINK_WINDOW);
        assert_eq!(c.tunnel_agent[0].max_window, DEFAULT_TUNNEL_MAX_WINDOW);
        assert_eq!(c.tunnel_agent[0].link_window, DEFAULT_TUNNEL_LINK_WINDOW);
        assert_eq!(c.tunnel_server[0].max_streams, 256);
        assert!(c.tunnel_agent[0].extensions);
        let cases = [
            ("max_streams = 257", "tunnel_server[0].max_streams"),
            ("max_data = 0", "tunnel_server[0].max_data"),
            ("window = 100", "tunnel_server[0].window"),
            ("max_window = 131072", "tunnel_server[0].max_window"),
            ("max_window = 2147483648", "tunnel_server[0].max_window"),
            ("link_window = 131072", "tunnel_server[0].link_window"),
            (
                "heartbeat_timeout = \"5s\"",
                "tunnel_server[0].heartbeat_timeout",
            ),
        ];
        for (line, key) in cases {
            let text = ok.replacen(
                "listen = \"127.0.0.1:9000\"\n",
                &format!("listen = \"127.0.0.1:9000\"\n{line}\n"),
                1,
            );
            assert_eq!(Config::parse(&text).unwrap_err().key, key, "{line}");
        }
        let dup = ok.replace("public = \"127.0.0.1:2323\"", "public = \"127.0.0.1:9000\"");
        assert_eq!(
            Config::parse(&dup).unwrap_err().key,
            "tunnel_server[0].service[0].public"
        );
        let bad_server = ok.replace("gw.example:9000", "gw.example");
        assert_eq!(
            Config::parse(&bad_server).unwrap_err().key,
            "tunnel_agent[0].server"
        );
        let small = format!("[engine]\nbuffer_bytes = 65536\n{ok}");
        assert_eq!(
            Config::parse(&small).unwrap_err().key,
            "tunnel_server[0].max_frame"
        );
        let base_token = ok.replace(
            "local = \"127.0.0.1:23\"",
            "local = \"127.0.0.1:23\"\nextensions = false\ntoken = \"0123456789abcdef\"",
        );
        let e = Config::parse(&base_token).unwrap_err();
        assert_eq!(e.key, "tunnel_agent[0].token");
        assert!(e.message.contains("extensions"), "{e}");
    }

    #[test]
    fn short_tokens_are_refused_with_a_way_to_make_a_good_one() {
        let server = |token: &str| {
            format!(
                "[[tunnel_server]]\nlisten = \"127.0.0.1:9000\"\n[[tunnel_server.service]]\n\
                 name = \"d\"\npublic = \"127.0.0.1:2323\"\ntoken = \"{token}\"\n"
            )
        };
        let agent = |token: &str| {
            format!(
                "[[tunnel_agent]]\nserver = \"gw.example:9000\"\nlocal = \"127.0.0.1:23\"\n\
                 token = \"{token}\"\n"
            )
        };
        for (text, key) in [
            (server("change-me"), "tunnel_server[0].service[0].token"),
            (
                server("0123456789abcde"),
                "tunnel_server[0].service[0].token",
            ),
            (agent("change-me"), "tunnel_agent[0].token"),
        ] {
            let e = Config::parse(&text).unwrap_err();
            assert_eq!(e.key, key, "{text}");
            assert!(e.message.contains("at least 16"), "{e}");
            assert!(e.message.contains("openssl rand -hex 32"), "{e}");
        }
        assert!(Config::parse(&server("0123456789abcdef")).is_ok());
        assert!(Config::parse(&agent("0123456789abcdef")).is_ok());
    }

    #[test]
    fn tunnel_agent_host_names_and_timeouts() {
        let ok = "[[tunnel_agent]]\nserver = \"gw.example:9000\"\nlocal = \"localhost:23\"\n";
        let c = Config::parse(ok).unwrap();
        let a = &c.tunnel_agent[0];
        assert_eq!(a.local, "localhost:23");
        assert_eq!(a.handshake_timeout, Duration::from_secs(10));
        assert_eq!(a.reconnect_reset, Duration::from_secs(10));
        for good in ["[::1]:23", "127.0.0.1:23", "plc-7.lan:502"] {
            let text = ok.replace("localhost:23", good);
            assert!(Config::parse(&text).is_ok(), "{good}");
        }
        let cases = [
            ("localhost:23", "localhost", "tunnel_agent[0].local"),
            ("localhost:23", "localhost:0", "tunnel_agent[0].local"),
            ("localhost:23", ":23", "tunnel_agent[0].local"),
            ("localhost:23", "local host:23", "tunnel_agent[0].local"),
            (
                "gw.example:9000",
                "gw.example:99999",
                "tunnel_agent[0].server",
            ),
        ];
        for (from, to, key) in cases {
            let text = ok.replace(from, to);
            let e = Config::parse(&text).unwrap_err();
            assert_eq!(e.key, key, "{to}");
            assert!(e.message.contains("host:port"), "{e}");
        }
        for (line, key) in [
            (
                "handshake_timeout = \"0s\"",
                "tunnel_agent[0].handshake_timeout",
            ),
            (
                "reconnect_reset = \"0s\"",
                "tunnel_agent[0].reconnect_reset",
            ),
        ] {
            let text = format!("{ok}{line}\n");
            assert_eq!(Config::parse(&text).unwrap_err().key, key, "{line}");
        }
    }
}
