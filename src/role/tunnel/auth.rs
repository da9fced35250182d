//! Tunnel authentication (docs/PROTOCOL.md §4.1) and the nonce source.
//!
//! Invariant: the token never leaves this module except as HMAC key; tags are
//! compared in constant time (`Mac::verify_slice`). Nonces come from a keyed
//! generator seeded once from the operating system, so no file is read on the
//! loop thread per link.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io::Read;
use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::codec::tunnel::{MAC_LEN, NONCE_LEN};

type HmacSha256 = Hmac<Sha256>;

const AGENT_LABEL: &[u8] = b"switchboard-tunnel-v1 agent";
const SERVER_LABEL: &[u8] = b"switchboard-tunnel-v1 server";

/// What both tags cover besides the label.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Transcript<'a> {
    pub(crate) agent_nonce: &'a [u8; NONCE_LEN],
    pub(crate) server_nonce: &'a [u8; NONCE_LEN],
    pub(crate) flags: u16,
    pub(crate) name: &'a [u8],
}

fn mac(token: &[u8], label: &[u8], first: &[u8], second: &[u8], t: &Transcript<'_>) -> HmacSha256 {
    // HMAC takes keys of any length: new_from_slice cannot fail for it.
    let mut m = match HmacSha256::new_from_slice(token) {
        Ok(m) => m,
        Err(_) => HmacSha256::new(&Default::default()),
    };
    m.update(label);
    m.update(first);
    m.update(second);
    m.update(&t.flags.to_be_bytes());
    m.update(t.name);
    m
}

/// The agent's proof (AUTH payload).
pub(crate) fn agent_tag(token: &[u8], t: &Transcript<'_>) -> [u8; MAC_LEN] {
    mac(token, AGENT_LABEL, t.agent_nonce, t.server_nonce, t)
        .finalize()
        .into_bytes()
        .into()
}

/// The server's proof (READY payload).
pub(crate) fn server_tag(token: &[u8], t: &Transcript<'_>) -> [u8; MAC_LEN] {
    mac(token, SERVER_LABEL, t.server_nonce, t.agent_nonce, t)
        .finalize()
        .into_bytes()
        .into()
}

/// Check an AUTH payload, in constant time.
pub(crate) fn verify_agent(token: &[u8], t: &Transcript<'_>, tag: &[u8]) -> bool {
    mac(token, AGENT_LABEL, t.agent_nonce, t.server_nonce, t)
        .verify_slice(tag)
        .is_ok()
}

/// Check a READY payload, in constant time.
pub(crate) fn verify_server(token: &[u8], t: &Transcript<'_>, tag: &[u8]) -> bool {
    mac(token, SERVER_LABEL, t.server_nonce, t.agent_nonce, t)
        .verify_slice(tag)
        .is_ok()
}

/// Nonces and jitter: HMAC-SHA256 in counter mode over a 32-byte seed read
/// once from `/dev/urandom` (mixed with the process's randomised hasher keys,
/// the time and the pid, which are all a system without `/dev/urandom` has).
pub(crate) struct Rng {
    key: [u8; 32],
    counter: u64,
}

impl Rng {
    pub(crate) fn from_os() -> Rng {
        let mut key = [0u8; 32];
        let urandom = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut key));
        if let Err(e) = urandom {
            log::warn!(
                "tunnel: /dev/urandom unavailable ({e}); seeding nonces from time and hasher keys"
            );
        }
        let mut h = RandomState::new().build_hasher();
        h.write_u128(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default(),
        );
        h.write_u32(std::process::id());
        for (k, b) in key.iter_mut().zip(h.finish().to_le_bytes()) {
            *k ^= b;
        }
        Rng { key, counter: 0 }
    }

    fn block(&mut self) -> [u8; 32] {
        self.counter = self.counter.wrapping_add(1);
        let mut m = match HmacSha256::new_from_slice(&self.key) {
            Ok(m) => m,
            Err(_) => HmacSha256::new(&Default::default()),
        };
        m.update(&self.counter.to_be_bytes());
        m.finalize().into_bytes().into()
    }

    pub(crate) fn nonce(&mut self) -> [u8; NONCE_LEN] {
        let mut out = [0u8; NONCE_LEN];
        for (o, b) in out.iter_mut().zip(self.block()) {
            *o = b;
        }
        out
    }

    /// A uniform-enough number in `0..n` (n > 0) for back-off jitter.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        let b = self.block();
        let mut v = [0u8; 8];
        for (o, x) in v.iter_mut().zip(b) {
            *o = x;
        }
        u64::from_le_bytes(v) % n.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_bind_every_field_and_verify() {
        let (na, ns) = ([1u8; NONCE_LEN], [2u8; NONCE_LEN]);
        let t = Transcript {
            agent_nonce: &na,
            server_nonce: &ns,
            flags: 0x3f,
            name: b"dev1",
        };
        let a = agent_tag(b"secret", &t);
        assert!(verify_agent(b"secret", &t, &a));
        assert!(!verify_agent(b"other", &t, &a));
        assert!(!verify_agent(
            b"secret",
            &Transcript { flags: 0x3e, ..t },
            &a
        ));
        assert!(!verify_agent(
            b"secret",
            &Transcript { name: b"dev2", ..t },
            &a
        ));
        let ns2 = [3u8; NONCE_LEN];
        assert!(!verify_agent(
            b"secret",
            &Transcript {
                server_nonce: &ns2,
                ..t
            },
            &a
        ));
        let s = server_tag(b"secret", &t);
        assert_ne!(a, s, "the two directions must differ");
        assert!(verify_server(b"secret", &t, &s));
        assert!(!verify_server(b"secret", &t, &a));
        assert!(!verify_agent(b"secret", &t, &a[..31]));
    }

    #[test]
    fn nonces_differ() {
        let mut r = Rng::from_os();
        let a = r.nonce();
        let b = r.nonce();
        assert_ne!(a, b);
        assert_ne!(Rng::from_os().nonce(), Rng::from_os().nonce());
        assert!((0..100).all(|_| r.below(7) < 7));
    }
}
