//! `[[router]]` and its `[[router.connpt]]`s: how devices identify
//! themselves and where each device's bytes go.
//!
//! Invariant: a validated `RouterConfig` has ids and byte patterns of 1 to
//! [`MAX_ID_LEN`] bytes (`id_max_len` for ids), no id twice, exactly one of
//! `listen` or `connect` per connpt, timeouts above zero and counts of at
//! least 1, and addresses no other section uses. [`RawBytes`] is the text or
//! `hex:` form every byte pattern here is written in.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::{At, Checks, ConfigError, Section, de_duration};

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

impl Section for RouterConfig {
    fn validate(&self, at: &At, cx: &mut Checks<'_>) -> Result<(), ConfigError> {
        if self.name.is_empty() {
            return at.err("name", "must not be empty");
        }
        if self.id_max_len == 0 || self.id_max_len > MAX_ID_LEN {
            return at.err(
                "id_max_len",
                format!(
                    "must be between 1 and {MAX_ID_LEN}, got {}",
                    self.id_max_len
                ),
            );
        }
        for (k, v) in [
            ("id_delimiter", &self.id_delimiter),
            ("heartbeat", &self.heartbeat),
            ("keepalive", &self.keepalive),
        ] {
            if v.as_ref()
                .is_some_and(|b| b.0.is_empty() || b.0.len() > MAX_ID_LEN)
            {
                return at.err(k, format!("must be 1 to {MAX_ID_LEN} bytes"));
            }
        }
        for (k, d) in [
            ("id_timeout", self.id_timeout),
            ("idle_timeout", self.idle_timeout),
            ("keepalive_interval", self.keepalive_interval),
            ("reconnect_min", self.reconnect_min),
        ] {
            if d.is_zero() {
                return at.err(k, "must be longer than 0");
            }
        }
        if self.reconnect_max < self.reconnect_min {
            return at.err("reconnect_max", "must not be shorter than reconnect_min");
        }
        if self.max_pending == 0 || self.max_pending_per_ip == 0 || self.max_apps == 0 {
            return at.err(
                "max_pending",
                "max_pending, max_pending_per_ip and max_apps must be at least 1",
            );
        }
        cx.claim(self.listen, at, "listen")?;
        let mut ids: hashbrown::HashSet<&[u8]> =
            hashbrown::HashSet::with_capacity(self.connpt.len());
        for (j, c) in self.connpt.iter().enumerate() {
            let at = at.nested("connpt", j);
            if c.name.is_empty() {
                return at.err("name", "must not be empty");
            }
            match self.identity {
                Identity::Id if c.id.0.is_empty() || c.id.0.len() > self.id_max_len => {
                    return at.err(
                        "id",
                        format!("must be 1 to id_max_len ({}) bytes", self.id_max_len),
                    );
                }
                Identity::Ip => {
                    let text = std::str::from_utf8(&c.id.0).unwrap_or("");
                    if text.parse::<std::net::IpAddr>().is_err()
                        && text.parse::<SocketAddr>().is_err()
                    {
                        return at.err(
                            "id",
                            format!(
                                "with identity = \"ip\" must be an address like \"10.1.2.3\" or \"10.1.2.3:5000\", got {text:?}"
                            ),
                        );
                    }
                }
                Identity::Id => {}
            }
            if !ids.insert(&c.id.0) {
                return at.err("id", "is used by another connpt of this router");
            }
            match (c.listen, c.connect) {
                (Some(a), None) => cx.claim(a, &at, "listen")?,
                (None, Some(_)) => {}
                _ => return at.err("listen", "give exactly one of listen or connect"),
            }
            if c.send_id.is_some() && c.connect.is_none() {
                return at.err("send_id", "applies to connect connpts only");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use crate::config::Config;

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
}
