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

use hashbrown::HashMap;
use serde::{Deserialize, Deserializer};

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

/// Longest device id, in bytes.
pub const MAX_ID_LEN: usize = crate::proto::router::MAX_ID_LEN;

/// Raw bytes written in config as text, or as `"hex:0a1b.."`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RawBytes(pub Vec<u8>);

impl std::str::FromStr for RawBytes {
    type Err = String;

    fn from_str(s: &str) -> Result<RawBytes, String> {
        let Some(hex) = s.strip_prefix("hex:") else {
            return Ok(RawBytes(s.as_bytes().to_vec()));
        };
        let digits: Vec<u8> = hex.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        if !digits.iter().all(u8::is_ascii_hexdigit) {
            return Err(format!("invalid hex {s:?}: expected digits 0-9, a-f"));
        }
        if !digits.len().is_multiple_of(2) {
            return Err(format!("invalid hex {s:?}: an odd number of digits"));
        }
        digits
            .chunks(2)
            .map(|pair| {
                std::str::from_utf8(pair)
                    .ok()
                    .and_then(|p| u8::from_str_radix(p, 16).ok())
                    .ok_or_else(|| format!("invalid hex {s:?}: expected digits 0-9, a-f"))
            })
            .collect::<Result<Vec<u8>, String>>()
            .map(RawBytes)
    }
}

impl<'de> Deserialize<'de> for RawBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<RawBytes, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// How a router tells devices apart.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Identity {
    /// By the id the device sends first.
    #[default]
    Id,
    /// By the device's source address (`connpt.id` is an IP or IP:port).
    Ip,
}

/// What a router does when a second device claims an online id.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Duplicate {
    /// The new connection wins; the old one is closed.
    #[default]
    Replace,
    /// The new connection is closed.
    Reject,
}

/// What happens to applications while their device is offline.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Offline {
    /// They stay connected; their bytes are discarded and counted.
    #[default]
    Keep,
    /// They are closed when the device goes offline, and refused while it is.
    Close,
}

/// `[[router]]`: identify field devices and bridge them to their connection points.
#[derive(Debug, Clone, PartialEq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterConfig {
    /// Name used in logs (default `"router"`).
    #[serde(default = "default_router_name")]
    pub name: String,
    /// Devices dial this address.
    pub listen: SocketAddr,
    /// `id` (the device sends its id first) or `ip` (its address identifies it).
    #[serde(default)]
    pub identity: Identity,
    /// A device that has not identified itself by then is closed.
    #[serde(default = "default_id_timeout", deserialize_with = "de_duration")]
    pub id_timeout: Duration,
    /// Bytes that end the id (not forwarded), e.g. `"\r\n"`.
    #[serde(default)]
    pub id_delimiter: Option<RawBytes>,
    /// Longest id in bytes (at most 64).
    #[serde(default = "default_id_max_len")]
    pub id_max_len: usize,
    /// When the bytes so far are an id and also the start of a longer id, wait
    /// this long for more bytes before deciding.
    #[serde(default = "default_id_gap", deserialize_with = "de_duration")]
    pub id_gap: Duration,
    /// Unidentified connections at once; more are closed.
    #[serde(default = "default_max_pending")]
    pub max_pending: usize,
    /// Unidentified connections at once from one address.
    #[serde(default = "default_max_pending_per_ip")]
    pub max_pending_per_ip: usize,
    /// `replace` or `reject` a second device with an online id.
    #[serde(default)]
    pub duplicate: Duplicate,
    /// Close a device that sends nothing for this long.
    #[serde(default = "default_router_idle", deserialize_with = "de_duration")]
    pub idle_timeout: Duration,
    /// A read made only of repetitions of this pattern is a heartbeat: activity,
    /// not forwarded.
    #[serde(default)]
    pub heartbeat: Option<RawBytes>,
    /// Sent to the device for each heartbeat read.
    #[serde(default)]
    pub heartbeat_reply: Option<RawBytes>,
    /// Sent to each online device every `keepalive_interval`.
    #[serde(default)]
    pub keepalive: Option<RawBytes>,
    /// See `keepalive`.
    #[serde(default = "default_router_keepalive", deserialize_with = "de_duration")]
    pub keepalive_interval: Duration,
    /// Remove the device's id from the start of each packet it sends.
    #[serde(default)]
    pub strip_prefix: bool,
    /// `keep` or `close` applications while their device is offline.
    #[serde(default)]
    pub offline: Offline,
    /// Applications attached to one connection point at once.
    #[serde(default = "default_max_apps")]
    pub max_apps: usize,
    /// Recent unknown ids remembered for the status output.
    #[serde(default = "default_recent_unknown")]
    pub recent_unknown: usize,
    /// `connect` connection points: first re-dial delay (doubles up to `reconnect_max`).
    #[serde(default = "default_reconnect_min", deserialize_with = "de_duration")]
    pub reconnect_min: Duration,
    /// Longest re-dial delay.
    #[serde(default = "default_reconnect_max", deserialize_with = "de_duration")]
    pub reconnect_max: Duration,
    /// The connection points.
    #[serde(default)]
    pub connpt: Vec<ConnptConfig>,
}

/// `[[router.connpt]]`: one device and where its bytes go.
#[derive(Debug, Clone, PartialEq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnptConfig {
    /// Name used in logs.
    pub name: String,
    /// The device's id (text or `hex:`), or with `identity = "ip"` its address.
    pub id: RawBytes,
    /// Applications connect here to reach the device.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Or: dial this upstream while the device is online.
    #[serde(default)]
    pub connect: Option<SocketAddr>,
    /// `connect` only: bytes sent first on the upstream connection.
    #[serde(default)]
    pub send_id: Option<RawBytes>,
}

fn default_router_name() -> String {
    "router".to_owned()
}
fn default_id_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_id_max_len() -> usize {
    MAX_ID_LEN
}
fn default_id_gap() -> Duration {
    Duration::from_millis(200)
}
fn default_max_pending() -> usize {
    1000
}
fn default_max_pending_per_ip() -> usize {
    16
}
fn default_router_idle() -> Duration {
    Duration::from_secs(300)
}
fn default_router_keepalive() -> Duration {
    Duration::from_secs(30)
}
fn default_max_apps() -> usize {
    16
}
fn default_recent_unknown() -> usize {
    64
}
fn default_reconnect_min() -> Duration {
    Duration::from_secs(1)
}
fn default_reconnect_max() -> Duration {
    Duration::from_secs(30)
}

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
    #[serde(default = "default_reconnect_min", deserialize_with = "de_duration")]
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
            reconnect_min: default_reconnect_min(),
            reconnect_max: default_agent_reconnect_max(),
            reconnect_reset: default_agent_reconnect_reset(),
            handshake_timeout: default_handshake_timeout(),
            stall_timeout: default_tunnel_stall(),
        }
    }
}

/// The stream settings both tunnel roles share, checked the same way.
#[allow(
    clippy::too_many_arguments,
    reason = "one call per role, keys named at the call"
)]
fn validate_tunnel_common(
    key: &dyn Fn(&str) -> String,
    e: &EngineConfig,
    max_streams: usize,
    window: u32,
    (max_window, link_window): (u32, u32),
    max_data: usize,
    max_frame: usize,
    heartbeat: (Duration, Duration),
    stall_timeout: Duration,
) -> Result<(), ConfigError> {
    let err = |k: &str, message: String| {
        Err(ConfigError {
            file: None,
            key: key(k),
            message,
        })
    };
    if max_streams == 0 || max_streams > MAX_TUNNEL_STREAMS {
        return err(
            "max_streams",
            format!("must be between 1 and {MAX_TUNNEL_STREAMS}, got {max_streams}"),
        );
    }
    if max_data == 0 || max_data > MAX_TUNNEL_FRAME {
        return err(
            "max_data",
            format!("must be between 1 and {MAX_TUNNEL_FRAME}, got {max_data}"),
        );
    }
    if max_frame == 0 || max_frame > MAX_TUNNEL_FRAME {
        return err(
            "max_frame",
            format!("must be between 1 and {MAX_TUNNEL_FRAME}, got {max_frame}"),
        );
    }
    if e.buffer_bytes < max_frame + crate::codec::tunnel::HEADER_LEN {
        return err(
            "max_frame",
            format!(
                "a whole frame ({} bytes with its header) must fit engine.buffer_bytes ({})",
                max_frame + crate::codec::tunnel::HEADER_LEN,
                e.buffer_bytes
            ),
        );
    }
    if (window as usize) < max_data {
        return err(
            "window",
            format!("must be at least max_data ({max_data}), got {window}"),
        );
    }
    if max_window < window {
        return err(
            "max_window",
            format!("must be at least window ({window}), got {max_window} (raise it with window)"),
        );
    }
    if max_window > MAX_TUNNEL_WINDOW {
        return err(
            "max_window",
            format!("must be at most {MAX_TUNNEL_WINDOW} (1 GiB), got {max_window}"),
        );
    }
    if link_window < window {
        return err(
            "link_window",
            format!("must be at least window ({window}), got {link_window}"),
        );
    }
    let (interval, timeout) = heartbeat;
    if interval < Duration::from_millis(10) {
        return err(
            "heartbeat_interval",
            format!("must be at least 10ms, got {interval:?}"),
        );
    }
    if timeout <= interval {
        return err(
            "heartbeat_timeout",
            format!("must be longer than heartbeat_interval ({interval:?}), got {timeout:?}"),
        );
    }
    if stall_timeout.is_zero() {
        return err("stall_timeout", "must be longer than 0".to_owned());
    }
    Ok(())
}

/// Refuse an empty or short shared secret: a tunnel token guards a public
/// port, and a short one falls to guessing.
fn check_token(token: Option<&str>, key: String) -> Result<(), ConfigError> {
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
    Err(ConfigError {
        file: None,
        key,
        message,
    })
}

fn validate_tunnel_server(
    i: usize,
    t: &TunnelServerConfig,
    e: &EngineConfig,
    seen: &mut Seen,
) -> Result<(), ConfigError> {
    let key = |k: &str| format!("tunnel_server[{i}].{k}");
    let err = |k: String, message: String| {
        Err(ConfigError {
            file: None,
            key: k,
            message,
        })
    };
    if t.name.is_empty() {
        return err(key("name"), "must not be empty".to_owned());
    }
    validate_tunnel_common(
        &key,
        e,
        t.max_streams,
        t.window,
        (t.max_window, t.link_window),
        t.max_data,
        t.max_frame,
        (t.heartbeat_interval, t.heartbeat_timeout),
        t.stall_timeout,
    )?;
    if t.max_frame < crate::codec::tunnel::MAX_NAME_LEN + 32 {
        return err(
            key("max_frame"),
            format!(
                "must be at least 96 to take a LISTEN request, got {}",
                t.max_frame
            ),
        );
    }
    if t.handshake_timeout.is_zero() {
        return err(key("handshake_timeout"), "must be longer than 0".to_owned());
    }
    if t.max_pending == 0 {
        return err(key("max_pending"), "must be at least 1".to_owned());
    }
    if t.max_pending_per_ip == 0 {
        return err(key("max_pending_per_ip"), "must be at least 1".to_owned());
    }
    if t.service.is_empty() {
        return err(key("service"), "at least one service is needed".to_owned());
    }
    check_unique(seen, t.listen, key("listen"))?;
    for (j, s) in t.service.iter().enumerate() {
        let skey = |k: &str| format!("tunnel_server[{i}].service[{j}].{k}");
        if s.name.is_empty() || s.name.len() > crate::codec::tunnel::MAX_NAME_LEN {
            return err(
                skey("name"),
                format!(
                    "must be 1 to {} bytes, got {}",
                    crate::codec::tunnel::MAX_NAME_LEN,
                    s.name.len()
                ),
            );
        }
        if t.service[..j].iter().any(|o| o.name == s.name) {
            return err(
                skey("name"),
                format!("service '{}' is defined twice", s.name),
            );
        }
        check_token(s.token.as_deref(), skey("token"))?;
        check_unique(seen, s.public, skey("public"))?;
    }
    Ok(())
}

fn validate_tunnel_agent(
    i: usize,
    a: &TunnelAgentConfig,
    e: &EngineConfig,
) -> Result<(), ConfigError> {
    let key = |k: &str| format!("tunnel_agent[{i}].{k}");
    let err = |k: String, message: String| {
        Err(ConfigError {
            file: None,
            key: k,
            message,
        })
    };
    validate_tunnel_common(
        &key,
        e,
        a.max_streams,
        a.window,
        (a.max_window, a.link_window),
        a.max_data,
        a.max_frame,
        (a.heartbeat_interval, a.heartbeat_timeout),
        a.stall_timeout,
    )?;
    if a.name.len() > crate::codec::tunnel::MAX_NAME_LEN {
        return err(
            key("name"),
            format!(
                "must be at most {} bytes, got {}",
                crate::codec::tunnel::MAX_NAME_LEN,
                a.name.len()
            ),
        );
    }
    for (k, v) in [("server", &a.server), ("local", &a.local)] {
        if !is_host_port(v) {
            return err(
                key(k),
                format!(
                    "must be host:port (a name or an address, and a port from 1 to 65535), got '{v}'"
                ),
            );
        }
    }
    check_token(a.token.as_deref(), key("token"))?;
    if a.token.is_some() && !a.extensions {
        return err(
            key("token"),
            "needs extensions = true (the base protocol has no authentication)".to_owned(),
        );
    }
    if a.connect_timeout.is_zero() {
        return err(key("connect_timeout"), "must be longer than 0".to_owned());
    }
    if a.handshake_timeout.is_zero() {
        return err(key("handshake_timeout"), "must be longer than 0".to_owned());
    }
    if a.reconnect_reset.is_zero() {
        return err(key("reconnect_reset"), "must be longer than 0".to_owned());
    }
    if a.reconnect_min.is_zero() || a.reconnect_max < a.reconnect_min {
        return err(
            key("reconnect_max"),
            format!(
                "need 0 < reconnect_min <= reconnect_max, got {:?} and {:?}",
                a.reconnect_min, a.reconnect_max
            ),
        );
    }
    Ok(())
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
        if e.listen_backlog == 0 {
            return err("engine.listen_backlog", "must be at least 1".to_owned());
        }
        let mut seen: Seen = HashMap::new();
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
        for (i, b) in self.broadcast.iter().enumerate() {
            let key = |k: &str| format!("broadcast[{i}].{k}");
            if b.name.is_empty() {
                return err(&key("name"), "must not be empty".to_owned());
            }
            let wire = b
                .framing
                .framing(b.max_record)
                .max_encoded_len()
                .unwrap_or(usize::MAX);
            if b.max_record == 0 || wire > e.buffer_bytes {
                return err(
                    &key("max_record"),
                    format!(
                        "must be between 1 and engine.buffer_bytes ({}) less the length prefix, got {}",
                        e.buffer_bytes, b.max_record
                    ),
                );
            }
            if b.framing == RecordFraming::U16 && b.max_record > usize::from(u16::MAX) {
                return err(
                    &key("max_record"),
                    format!(
                        "must be at most 65535 with framing = \"u16\", got {}",
                        b.max_record
                    ),
                );
            }
            let queue = b.queue_bytes.unwrap_or(e.queue_bytes);
            if queue < wire {
                return err(
                    &key("queue_bytes"),
                    format!("must hold at least one record ({wire} bytes), got {queue}"),
                );
            }
            if b.queue_records == 0 {
                return err(&key("queue_records"), "must be at least 1".to_owned());
            }
            if b.replay > MAX_REPLAY {
                return err(
                    &key("replay"),
                    format!("must be at most {MAX_REPLAY}, got {}", b.replay),
                );
            }
            if b.max_subscribers == 0 || b.max_subscribers > e.max_connections {
                return err(
                    &key("max_subscribers"),
                    format!(
                        "must be between 1 and engine.max_connections ({}), got {}",
                        e.max_connections, b.max_subscribers
                    ),
                );
            }
            if b.max_publishers == 0 {
                return err(&key("max_publishers"), "must be at least 1".to_owned());
            }
            if b.idle_timeout.is_zero() {
                return err(&key("idle_timeout"), "must be longer than 0".to_owned());
            }
            if b.flush_idle.is_some() && b.framing != RecordFraming::Line {
                return err(
                    &key("flush_idle"),
                    "applies to framing = \"line\" only".to_owned(),
                );
            }
            if b.flush_idle == Some(Duration::ZERO) {
                return err(
                    &key("flush_idle"),
                    "must be longer than 0 (omit it to never flush partial lines)".to_owned(),
                );
            }
            for (k, d) in [
                ("stall_timeout", b.stall_timeout),
                ("keepalive", b.keepalive),
                ("keepalive_interval", b.keepalive_interval),
            ] {
                if d < Duration::from_secs(1) {
                    return err(&key(k), format!("must be at least 1s, got {d:?}"));
                }
            }
            check_unique(&mut seen, b.listen, key("listen"))?;
            if let Some(Ingest::Tcp(a)) = b.ingest {
                check_unique(&mut seen, a, key("ingest"))?;
            }
        }
        for (i, r) in self.router.iter().enumerate() {
            validate_router(i, r, &mut seen)?;
        }
        for (i, t) in self.tunnel_server.iter().enumerate() {
            validate_tunnel_server(i, t, e, &mut seen)?;
        }
        for (i, a) in self.tunnel_agent.iter().enumerate() {
            validate_tunnel_agent(i, a, e)?;
        }
        let roles = self.roles();
        for (i, r) in roles.iter().enumerate() {
            // One name per kind: reports and metric series are labelled by
            // kind and name, and two alike would be indistinguishable.
            if roles[..i]
                .iter()
                .any(|o| o.kind() == r.kind() && o.name() == r.name())
            {
                return err(
                    &format!("{}.name", r.kind()),
                    format!(
                        "two {} roles are named '{}': give them different names \
                         (reports, metrics and reloads tell roles apart by name)",
                        r.kind(),
                        r.name()
                    ),
                );
            }
            if roles[..i].iter().any(|o| o.identity() == r.identity()) {
                return err(
                    &format!("{}.name", r.kind()),
                    format!(
                        "two roles are {}: give them different names (a reload tells roles apart by name)",
                        r.identity()
                    ),
                );
            }
        }
        if let Some(a) = &self.admin {
            if a.request_timeout.is_zero() {
                return err("admin.request_timeout", "must be longer than 0".to_owned());
            }
            if a.max_clients == 0 {
                return err("admin.max_clients", "must be at least 1".to_owned());
            }
            if a.max_response < 4096 {
                return err(
                    "admin.max_response",
                    format!("must be at least 4096, got {}", a.max_response),
                );
            }
            check_unique(&mut seen, a.listen, "admin.listen".to_owned())?;
        }
        if self
            .broadcast
            .iter()
            .filter(|b| b.ingest == Some(Ingest::Stdin))
            .count()
            > 1
        {
            return err(
                "broadcast.ingest",
                "only one broadcast can read stdin".to_owned(),
            );
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

fn validate_router(i: usize, r: &RouterConfig, seen: &mut Seen) -> Result<(), ConfigError> {
    let key = |k: &str| format!("router[{i}].{k}");
    let err = |key: String, message: String| {
        Err(ConfigError {
            file: None,
            key,
            message,
        })
    };
    if r.name.is_empty() {
        return err(key("name"), "must not be empty".to_owned());
    }
    if r.id_max_len == 0 || r.id_max_len > MAX_ID_LEN {
        return err(
            key("id_max_len"),
            format!("must be between 1 and {MAX_ID_LEN}, got {}", r.id_max_len),
        );
    }
    for (k, v) in [
        ("id_delimiter", &r.id_delimiter),
        ("heartbeat", &r.heartbeat),
        ("keepalive", &r.keepalive),
    ] {
        if v.as_ref()
            .is_some_and(|b| b.0.is_empty() || b.0.len() > MAX_ID_LEN)
        {
            return err(key(k), format!("must be 1 to {MAX_ID_LEN} bytes"));
        }
    }
    for (k, d) in [
        ("id_timeout", r.id_timeout),
        ("idle_timeout", r.idle_timeout),
        ("keepalive_interval", r.keepalive_interval),
        ("reconnect_min", r.reconnect_min),
    ] {
        if d.is_zero() {
            return err(key(k), "must be longer than 0".to_owned());
        }
    }
    if r.reconnect_max < r.reconnect_min {
        return err(
            key("reconnect_max"),
            "must not be shorter than reconnect_min".to_owned(),
        );
    }
    if r.max_pending == 0 || r.max_pending_per_ip == 0 || r.max_apps == 0 {
        return err(
            key("max_pending"),
            "max_pending, max_pending_per_ip and max_apps must be at least 1".to_owned(),
        );
    }
    check_unique(seen, r.listen, key("listen"))?;
    let mut ids: hashbrown::HashSet<&[u8]> = hashbrown::HashSet::with_capacity(r.connpt.len());
    for (j, c) in r.connpt.iter().enumerate() {
        let ckey = |k: &str| format!("router[{i}].connpt[{j}].{k}");
        if c.name.is_empty() {
            return err(ckey("name"), "must not be empty".to_owned());
        }
        match r.identity {
            Identity::Id if c.id.0.is_empty() || c.id.0.len() > r.id_max_len => {
                return err(
                    ckey("id"),
                    format!("must be 1 to id_max_len ({}) bytes", r.id_max_len),
                );
            }
            Identity::Ip => {
                let text = std::str::from_utf8(&c.id.0).unwrap_or("");
                if text.parse::<std::net::IpAddr>().is_err() && text.parse::<SocketAddr>().is_err()
                {
                    return err(
                        ckey("id"),
                        format!(
                            "with identity = \"ip\" must be an address like \"10.1.2.3\" or \"10.1.2.3:5000\", got {text:?}"
                        ),
                    );
                }
            }
            Identity::Id => {}
        }
        if !ids.insert(&c.id.0) {
            return err(
                ckey("id"),
                "is used by another connpt of this router".to_owned(),
            );
        }
        match (c.listen, c.connect) {
            (Some(a), None) => check_unique(seen, a, ckey("listen"))?,
            (None, Some(_)) => {}
            _ => {
                return err(
                    ckey("listen"),
                    "give exactly one of listen or connect".to_owned(),
                );
            }
        }
        if c.send_id.is_some() && c.connect.is_none() {
            return err(
                ckey("send_id"),
                "applies to connect connpts only".to_owned(),
            );
        }
    }
    Ok(())
}

/// Listen addresses seen so far, and the key that claimed each.
type Seen = HashMap<SocketAddr, String>;

fn check_unique(seen: &mut Seen, addr: SocketAddr, key: String) -> Result<(), ConfigError> {
    if addr.port() == 0 {
        return Ok(());
    }
    if let Some(other) = seen.get(&addr) {
        return Err(ConfigError {
            file: None,
            message: format!("address {addr} is already used by {other}"),
            key,
        });
    }
    seen.insert(addr, key);
    Ok(())
}

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

    #[test]
    fn raw_bytes_are_text_or_hex() {
        assert_eq!("c0001".parse::<RawBytes>(), Ok(RawBytes(b"c0001".to_vec())));
        assert_eq!(
            "hex:0d0A".parse::<RawBytes>(),
            Ok(RawBytes(vec![0x0d, 0x0a]))
        );
        assert!("hex:0d0".parse::<RawBytes>().is_err());
        assert!("hex:zz".parse::<RawBytes>().is_err());
        assert!("hex:+a+b".parse::<RawBytes>().is_err());
        assert!("hex:-1".parse::<RawBytes>().is_err());
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

    #[test]
    fn router_config_errors_name_the_connpt() {
        let e = Config::parse(
            "[[router]]\nlisten = \"127.0.0.1:0\"\n[[router.connpt]]\nname = \"a\"\nid = \"x\"\n",
        )
        .unwrap_err();
        assert_eq!(e.key, "router[0].connpt[0].listen");
        let e = Config::parse(
            "[[router]]\nlisten = \"127.0.0.1:0\"\nidentity = \"ip\"\n[[router.connpt]]\nname = \"a\"\nid = \"c01\"\nlisten = \"127.0.0.1:0\"\n",
        )
        .unwrap_err();
        assert_eq!(e.key, "router[0].connpt[0].id");
    }

    #[test]
    fn queue_must_hold_two_reads() {
        let e = Config::parse("[engine]\nbuffer_bytes = 65536\nqueue_bytes = 65536\n").unwrap_err();
        assert_eq!(e.key, "engine.queue_bytes");
    }
}
