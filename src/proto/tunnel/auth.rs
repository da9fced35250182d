//! Tunnel authentication tags (docs/PROTOCOL.md §4.1).
//!
//! Invariant: the token never leaves this module except as HMAC key; tags are
//! compared in constant time (`Mac::verify_slice`). Nonces are the caller's
//! (the session takes them as inputs, so it stays deterministic).

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::codec::tunnel::{MAC_LEN, NONCE_LEN};

type HmacSha256 = Hmac<Sha256>;

const AGENT_LABEL: &[u8] = b"switchboard-tunnel-v1 agent";
const SERVER_LABEL: &[u8] = b"switchboard-tunnel-v1 server";

/// What both tags cover besides the label.
#[derive(Debug, Clone, Copy)]
pub struct Transcript<'a> {
    /// The agent's LISTEN nonce.
    pub agent_nonce: &'a [u8; NONCE_LEN],
    /// The server's HELLO nonce.
    pub server_nonce: &'a [u8; NONCE_LEN],
    /// The extension bits granted in HELLO.
    pub flags: u16,
    /// The service name asked for.
    pub name: &'a [u8],
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
pub fn agent_tag(token: &[u8], t: &Transcript<'_>) -> [u8; MAC_LEN] {
    mac(token, AGENT_LABEL, t.agent_nonce, t.server_nonce, t)
        .finalize()
        .into_bytes()
        .into()
}

/// The server's proof (READY payload).
pub fn server_tag(token: &[u8], t: &Transcript<'_>) -> [u8; MAC_LEN] {
    mac(token, SERVER_LABEL, t.server_nonce, t.agent_nonce, t)
        .finalize()
        .into_bytes()
        .into()
}

/// Check an AUTH payload, in constant time.
pub fn verify_agent(token: &[u8], t: &Transcript<'_>, tag: &[u8]) -> bool {
    mac(token, AGENT_LABEL, t.agent_nonce, t.server_nonce, t)
        .verify_slice(tag)
        .is_ok()
}

/// Check a READY payload, in constant time.
pub fn verify_server(token: &[u8], t: &Transcript<'_>, tag: &[u8]) -> bool {
    mac(token, SERVER_LABEL, t.server_nonce, t.agent_nonce, t)
        .verify_slice(tag)
        .is_ok()
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
}
