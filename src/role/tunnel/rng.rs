//! The tunnel roles' nonce and jitter source.
//!
//! Invariant: seeded once from the operating system, so no file is read on
//! the loop thread per link.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io::Read;
use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::codec::tunnel::NONCE_LEN;

type HmacSha256 = Hmac<Sha256>;

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
    fn nonces_differ() {
        let mut r = Rng::from_os();
        let a = r.nonce();
        let b = r.nonce();
        assert_ne!(a, b);
        assert_ne!(Rng::from_os().nonce(), Rng::from_os().nonce());
        assert!((0..100).all(|_| r.below(7) < 7));
    }
}
