//! Typed configuration: TOML in, validated [`Config`] out, with defaults.
//!
//! Invariant: a `Config` that passed [`Config::validate`] can be run: every bound
//! is set and consistent (a frame fits a read buffer, a read fits a send queue,
//! connection indices stay below the listener tokens). Errors name the file, the
//! key and what is wrong. Every key and default is documented in README.md.
//!
//! Each section has its own file (`engine`, `echo`, `broadcast`, `router`,
//! `tunnel`, `admin`): its structs, `DEFAULT_*` consts, serde defaults and one
//! `Section::validate`. This file holds the root, the order sections are
//! checked in, the rules across sections, and what they share (durations,
//! address ranges, listen addresses claimed once). Every item is re-exported
//! here, so its path is `crate::config::X` whichever file defines it.
//! Allocation: only when a file is loaded, checked or compared for a reload;
//! what roles call per connection ([`Cidr::contains`]) allocates nothing.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hashbrown::HashMap;
use serde::{Deserialize, Deserializer};

mod admin;
mod broadcast;
mod echo;
mod engine;
mod router;
mod tunnel;

pub use admin::AdminConfig;
pub use broadcast::{
    BroadcastConfig, DEFAULT_KEEPALIVE, DEFAULT_KEEPALIVE_INTERVAL, DEFAULT_MAX_PUBLISHERS,
    DEFAULT_MAX_RECORD, DEFAULT_MAX_SUBSCRIBERS, DEFAULT_PUBLISHER_IDLE, DEFAULT_QUEUE_RECORDS,
    DEFAULT_STALL_TIMEOUT, DEFAULT_USER_TIMEOUT, Ingest, MAX_REPLAY, RecordFraming, SlowPolicy,
};
pub use echo::EchoConfig;
pub use engine::{
    DEFAULT_ACCEPT_BACKOFF, DEFAULT_BUFFER_BYTES, DEFAULT_BUFFER_POOL, DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_INBOX, DEFAULT_LINGER, DEFAULT_LISTEN_BACKLOG, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_QUEUE_BYTES, DEFAULT_READ_BUDGET, DEFAULT_SHUTDOWN_TIMEOUT, EngineConfig,
    MAX_MAX_CONNECTIONS, MIN_BUFFER_BYTES,
};
pub use router::{ConnptConfig, Duplicate, Identity, MAX_ID_LEN, Offline, RawBytes, RouterConfig};
pub use tunnel::{
    DEFAULT_TUNNEL_LINK_WINDOW, DEFAULT_TUNNEL_MAX_DATA, DEFAULT_TUNNEL_MAX_WINDOW,
    DEFAULT_TUNNEL_WINDOW, MAX_TUNNEL_FRAME, MAX_TUNNEL_STREAMS, MAX_TUNNEL_WINDOW, MIN_TOKEN_LEN,
    ServiceConfig, TunnelAgentConfig, TunnelServerConfig,
};

/// The built-in configuration used by `switchboard run` without `-c`: loopback only.
pub const BUILTIN_CONFIG: &str = r#"# switchboard built-in default: every role on loopback only.
[engine]
max_connections = 1024

# nc 127.0.0.1 7007: every line comes back.
[[echo]]
name = "echo"
listen = "127.0.0.1:7007"
idle_timeout = "5m"

# Subscribers: nc 127.0.0.1 7000. Publishers: nc 127.0.0.1 7001.
[[broadcast]]
name = "pos"
listen = "127.0.0.1:7000"
ingest = "127.0.0.1:7001"
replay = 10

# A device dials 7100 and sends its id "dev1" first; an application on 7101
# then talks to it.
[[router]]
name = "dtu"
listen = "127.0.0.1:7100"
  [[router.connpt]]
  name = "dev1"
  id = "dev1"
  listen = "127.0.0.1:7101"

# A tunnel server (agents on 7200) and an agent in the same process that
# links to it and exposes the echo service: clients of 7201 reach echo.
[[tunnel_server]]
name = "tunnel"
listen = "127.0.0.1:7200"
  [[tunnel_server.service]]
  name = "demo"
  public = "127.0.0.1:7201"
  token = "demo-token-loopback-only"

[[tunnel_agent]]
name = "demo"
server = "127.0.0.1:7200"
local = "127.0.0.1:7007"
token = "demo-token-loopback-only"

# curl http://127.0.0.1:7080/status (also /metrics, /healthz).
[admin]
listen = "127.0.0.1:7080"
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
    /// `[[broadcast]]` roles.
    #[serde(default)]
    pub broadcast: Vec<BroadcastConfig>,
    /// `[[router]]` roles.
    #[serde(default)]
    pub router: Vec<RouterConfig>,
    /// `[[tunnel_server]]` roles.
    #[serde(default)]
    pub tunnel_server: Vec<TunnelServerConfig>,
    /// `[[tunnel_agent]]` roles.
    #[serde(default)]
    pub tunnel_agent: Vec<TunnelAgentConfig>,
    /// `[admin]`: the status and metrics endpoint (off unless configured).
    #[serde(default)]
    pub admin: Option<AdminConfig>,
}

/// One role's configuration, whatever its kind: what a reload compares.
#[derive(Debug, Clone, PartialEq, Hash)]
pub enum RoleConfig {
    /// `[[echo]]`.
    Echo(EchoConfig),
    /// `[[broadcast]]`.
    Broadcast(BroadcastConfig),
    /// `[[router]]`.
    Router(RouterConfig),
    /// `[[tunnel_server]]`.
    TunnelServer(TunnelServerConfig),
    /// `[[tunnel_agent]]`.
    TunnelAgent(TunnelAgentConfig),
    /// `[admin]`.
    Admin(AdminConfig),
}

impl RoleConfig {
    /// The role kind, as reports name it.
    pub fn kind(&self) -> &'static str {
        match self {
            RoleConfig::Echo(_) => "echo",
            RoleConfig::Broadcast(_) => "broadcast",
            RoleConfig::Router(_) => "router",
            RoleConfig::TunnelServer(_) => "tunnel_server",
            RoleConfig::TunnelAgent(_) => "tunnel_agent",
            RoleConfig::Admin(_) => "admin",
        }
    }

    /// The role's own section, as [`crate::Role::reconfigure`] gets it (a
    /// router its `RouterConfig`, and so on).
    pub fn section(&self) -> &dyn std::any::Any {
        match self {
            RoleConfig::Echo(c) => c,
            RoleConfig::Broadcast(c) => c,
            RoleConfig::Router(c) => c,
            RoleConfig::TunnelServer(c) => c,
            RoleConfig::TunnelAgent(c) => c,
            RoleConfig::Admin(c) => c,
        }
    }

    /// What identifies the role across reloads: kind and name (and for an
    /// agent, whose name is the service it asks for, also its server; for an
    /// echo, also its address).
    pub fn identity(&self) -> String {
        match self {
            RoleConfig::TunnelAgent(c) => format!("tunnel_agent '{}' of {}", c.name, c.server),
            RoleConfig::Echo(c) => format!("echo '{}' on {}", c.name, c.listen),
            other => format!("{} '{}'", other.kind(), other.name()),
        }
    }

    /// The role's name.
    pub fn name(&self) -> &str {
        match self {
            RoleConfig::Echo(c) => &c.name,
            RoleConfig::Broadcast(c) => &c.name,
            RoleConfig::Router(c) => &c.name,
            RoleConfig::TunnelServer(c) => &c.name,
            RoleConfig::TunnelAgent(c) => &c.name,
            RoleConfig::Admin(_) => "admin",
        }
    }
}

impl Config {
    /// Every role in the file, in the order they are started.
    pub fn roles(&self) -> Vec<RoleConfig> {
        let mut out: Vec<RoleConfig> = Vec::new();
        out.extend(self.echo.iter().cloned().map(RoleConfig::Echo));
        out.extend(self.broadcast.iter().cloned().map(RoleConfig::Broadcast));
        out.extend(self.router.iter().cloned().map(RoleConfig::Router));
        out.extend(
            self.tunnel_server
                .iter()
                .cloned()
                .map(RoleConfig::TunnelServer),
        );
        out.extend(
            self.tunnel_agent
                .iter()
                .cloned()
                .map(RoleConfig::TunnelAgent),
        );
        out.extend(self.admin.iter().cloned().map(RoleConfig::Admin));
        out
    }
}

/// An address range, `"192.168.1.0/24"`, `"::1/128"` or a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: std::net::IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is in the range (IPv4-mapped IPv6 peers match IPv4 ranges).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let bad = || {
            format!("invalid CIDR {s:?}: expected like \"10.0.0.0/8\", \"::1/128\" or an address")
        };
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: std::net::IpAddr = addr.trim().parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(bad)?,
            None => max,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Cidr, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
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
        // The order matters: of several problems, the first one checked here
        // is the one reported (so `[admin]` stays after the role names).
        let mut cx = Checks::new(&self.engine);
        self.engine.validate(&At::table("engine"), &mut cx)?;
        validate_each("echo", &self.echo, &mut cx)?;
        validate_each("broadcast", &self.broadcast, &mut cx)?;
        validate_each("router", &self.router, &mut cx)?;
        validate_each("tunnel_server", &self.tunnel_server, &mut cx)?;
        validate_each("tunnel_agent", &self.tunnel_agent, &mut cx)?;
        self.validate_role_names()?;
        if let Some(a) = &self.admin {
            a.validate(&At::table("admin"), &mut cx)?;
        }
        // One process, one standard input.
        if self
            .broadcast
            .iter()
            .filter(|b| b.ingest == Some(Ingest::Stdin))
            .count()
            > 1
        {
            return At::table("broadcast").err("ingest", "only one broadcast can read stdin");
        }
        Ok(())
    }

    /// One name per kind, and one identity per role across reloads.
    fn validate_role_names(&self) -> Result<(), ConfigError> {
        let roles = self.roles();
        for (i, r) in roles.iter().enumerate() {
            let at = At::table(r.kind());
            // One name per kind: reports and metric series are labelled by
            // kind and name, and two alike would be indistinguishable.
            if roles[..i]
                .iter()
                .any(|o| o.kind() == r.kind() && o.name() == r.name())
            {
                return at.err(
                    "name",
                    format!(
                        "two {} roles are named '{}': give them different names \
                         (reports, metrics and reloads tell roles apart by name)",
                        r.kind(),
                        r.name()
                    ),
                );
            }
            if roles[..i].iter().any(|o| o.identity() == r.identity()) {
                return at.err(
                    "name",
                    format!(
                        "two roles are {}: give them different names (a reload tells roles apart by name)",
                        r.identity()
                    ),
                );
            }
        }
        Ok(())
    }

    /// A short human-readable account of what would run (for `switchboard check`).
    pub fn describe(&self) -> String {
        let mut out = self.describe_roles();
        for w in self.warnings() {
            out.push_str(&format!("warning: {w}\n"));
        }
        out
    }

    /// What is allowed but probably a mistake: `check` prints these and
    /// `run` logs them at warn.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(a) = &self.admin
            && !a.listen.ip().is_loopback()
            && a.allow.is_empty()
        {
            out.push(format!(
                "admin.listen {} is not a loopback address and admin.allow is empty: \
                 anyone who can reach it reads /status and /metrics (set admin.allow)",
                a.listen
            ));
        }
        out
    }

    fn describe_roles(&self) -> String {
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
        for b in &self.broadcast {
            let ingest = match b.ingest {
                Some(Ingest::Tcp(a)) => format!("publishers on {a}"),
                Some(Ingest::Stdin) => "publisher on stdin".to_owned(),
                None => "library publishing only".to_owned(),
            };
            out.push_str(&format!(
                "broadcast '{}': subscribers on {}, {ingest}, {:?} records up to {} bytes, slow = {:?}, replay {}\n",
                b.name, b.listen, b.framing, b.max_record, b.slow, b.replay
            ));
        }
        for r in &self.router {
            let listens = r.connpt.iter().filter(|c| c.listen.is_some()).count();
            out.push_str(&format!(
                "router '{}': devices on {}, identity {:?}, {} connpts ({listens} with an application port, {} dialling out)\n",
                r.name,
                r.listen,
                r.identity,
                r.connpt.len(),
                r.connpt.len() - listens
            ));
        }
        for t in &self.tunnel_server {
            out.push_str(&format!(
                "tunnel_server '{}': agents on {}, {} services:",
                t.name,
                t.listen,
                t.service.len()
            ));
            for s in &t.service {
                let auth = if s.token.is_some() {
                    "token"
                } else {
                    "no token"
                };
                out.push_str(&format!(" {} (public {}, {auth})", s.name, s.public));
            }
            out.push('\n');
        }
        for a in &self.tunnel_agent {
            out.push_str(&format!(
                "tunnel_agent '{}': server {}, local {}, {}\n",
                a.name,
                a.server,
                a.local,
                if a.extensions {
                    "extensions asked for"
                } else {
                    "base protocol"
                }
            ));
        }
        if let Some(a) = &self.admin {
            out.push_str(&format!(
                "admin: http://{}/status, /metrics, /healthz\n",
                a.listen
            ));
        }
        if self.echo.is_empty()
            && self.broadcast.is_empty()
            && self.router.is_empty()
            && self.tunnel_server.is_empty()
            && self.tunnel_agent.is_empty()
        {
            out.push_str("(no roles configured: nothing would listen)\n");
        }
        out
    }
}

// ===== validation =====

/// A section of the file (`[engine]`, one `[[router]]`, `[admin]`, or a
/// group of keys two sections share), checked the same way wherever it is
/// defined, and only from [`Config::validate`].
trait Section {
    /// Check the section's bounds and the rules between its keys.
    ///
    /// `at` is where the section sits (`echo[1]`) and names its keys in
    /// errors; `cx` is what it is checked against besides itself: the engine
    /// limits, and the listen addresses earlier sections claimed.
    ///
    /// # Errors
    /// The first problem found, keyed under `at`.
    fn validate(&self, at: &At, cx: &mut Checks<'_>) -> Result<(), ConfigError>;
}

/// Validate every `[[name]]` section of one kind, in file order.
fn validate_each<S: Section>(
    name: &str,
    sections: &[S],
    cx: &mut Checks<'_>,
) -> Result<(), ConfigError> {
    for (i, s) in sections.iter().enumerate() {
        s.validate(&At::array(name, i), cx)?;
    }
    Ok(())
}

/// Where a section sits in the file, as errors name its keys: `engine`,
/// `echo[0]`, `tunnel_server[1].service[0]`.
struct At(String);

impl At {
    /// The `[name]` table.
    fn table(name: &str) -> At {
        At(name.to_owned())
    }

    /// The `i`th `[[name]]` entry (from 0).
    fn array(name: &str, i: usize) -> At {
        At(format!("{name}[{i}]"))
    }

    /// The `j`th `name` entry nested in this section (`[[router.connpt]]`).
    fn nested(&self, name: &str, j: usize) -> At {
        At(format!("{}.{name}[{j}]", self.0))
    }

    /// The whole path of `key` in this section: `echo[0].listen`.
    fn key(&self, key: &str) -> String {
        format!("{}.{key}", self.0)
    }

    /// The error for `key` in this section.
    fn err(&self, key: &str, message: impl Into<String>) -> Result<(), ConfigError> {
        Err(ConfigError {
            file: None,
            key: self.key(key),
            message: message.into(),
        })
    }
}

/// What a section is checked against besides itself.
struct Checks<'a> {
    /// `[engine]` (checked first): other sections are bounded by its buffers
    /// and connection limit.
    engine: &'a EngineConfig,
    /// Listen addresses claimed so far, and the key that claimed each.
    seen: HashMap<SocketAddr, String>,
}

impl Checks<'_> {
    fn new(engine: &EngineConfig) -> Checks<'_> {
        Checks {
            engine,
            seen: HashMap::new(),
        }
    }

    /// Claim `addr` for `key` of `at`: one address, one listener (port 0,
    /// an address the system picks, is never refused).
    fn claim(&mut self, addr: SocketAddr, at: &At, key: &str) -> Result<(), ConfigError> {
        if addr.port() == 0 {
            return Ok(());
        }
        let key = at.key(key);
        if let Some(other) = self.seen.get(&addr) {
            return Err(ConfigError {
                file: None,
                message: format!("address {addr} is already used by {other}"),
                key,
            });
        }
        self.seen.insert(addr, key);
        Ok(())
    }
}

// ===== durations =====

/// The longest duration any key accepts: a year. Longer ones would overflow
/// `Instant` arithmetic at run time, and none is meaningful for a gateway.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Parse a duration written as a number and a unit: `"500ms"`, `"10s"`,
/// `"5m"`, `"1h"`; at most [`MAX_DURATION`].
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
    let d = match unit.trim() {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        _ => Err(bad()),
    }?;
    if d > MAX_DURATION {
        return Err(format!(
            "duration {s:?} is longer than the maximum, a year (8760h)"
        ));
    }
    Ok(d)
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
        assert!(c.broadcast.iter().all(|b| {
            b.listen.ip().is_loopback()
                && matches!(b.ingest, Some(Ingest::Tcp(a)) if a.ip().is_loopback())
        }));
        assert!(c.router.iter().all(|r| {
            r.listen.ip().is_loopback()
                && r.connpt
                    .iter()
                    .all(|p| p.listen.is_some_and(|a| a.ip().is_loopback()))
        }));
        assert!(c.tunnel_server.iter().all(|t| t.listen.ip().is_loopback()
            && t.service.iter().all(|s| s.public.ip().is_loopback())));
        assert!(
            c.admin
                .as_ref()
                .is_some_and(|a| a.listen.ip().is_loopback())
        );
        // Every role is in the demo.
        assert!(!c.router.is_empty() && !c.tunnel_server.is_empty() && !c.tunnel_agent.is_empty());
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
        assert_eq!(parse_duration("8760h"), Ok(MAX_DURATION));
        assert!(parse_duration("8761h").is_err());
        assert!(parse_duration("18446744073709551615ms").is_err());
        let e =
            Config::parse("[[echo]]\nlisten = \"127.0.0.1:1\"\nidle_timeout = \"9999999999h\"\n")
                .unwrap_err();
        assert!(e.to_string().contains("a year"), "{e}");
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
    fn two_roles_of_one_kind_with_one_name_are_refused() {
        let agents = "[[tunnel_agent]]\nname = \"d\"\nserver = \"a.example:9000\"\nlocal = \"127.0.0.1:23\"\n\
                      [[tunnel_agent]]\nname = \"d\"\nserver = \"b.example:9000\"\nlocal = \"127.0.0.1:23\"\n";
        let e = Config::parse(agents).unwrap_err();
        assert_eq!(e.key, "tunnel_agent.name");
        assert!(e.message.contains("named 'd'"), "{e}");
        let echoes = "[[echo]]\nlisten = \"127.0.0.1:7\"\n[[echo]]\nlisten = \"127.0.0.1:8\"\n";
        assert_eq!(Config::parse(echoes).unwrap_err().key, "echo.name");
        // One name across different kinds is fine.
        let mixed = "[[echo]]\nname = \"x\"\nlisten = \"127.0.0.1:7\"\n\
                     [[broadcast]]\nname = \"x\"\nlisten = \"127.0.0.1:8\"\n";
        assert!(Config::parse(mixed).is_ok());
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
    fn cidrs_match_v4_v6_and_mapped() {
        let net: Cidr = "127.0.0.0/8".parse().unwrap();
        assert!(net.contains("127.1.2.3".parse().unwrap()));
        assert!(net.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!net.contains("10.0.0.1".parse().unwrap()));
        let v6: Cidr = "::1".parse().unwrap();
        assert!(v6.contains("::1".parse().unwrap()));
        assert!(!v6.contains("::2".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
    }
}
