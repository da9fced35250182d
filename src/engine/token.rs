//! The one place where `mio::Token`s and slab keys meet.
//!
//! Invariant: a connection's token is its slab index and nothing else; listeners,
//! the waker and the signal source use reserved tokens at the top of the range.
//! Anything that refers to a connection from outside the slab holds a [`ConnKey`],
//! whose generation guards against a reused slab slot (the ABA problem).

use mio::Token;

/// The waker that other threads use to hand the loop work.
pub(crate) const WAKER: Token = Token(usize::MAX);
/// The signal-hook source (SIGINT, SIGTERM, SIGHUP).
pub(crate) const SIGNALS: Token = Token(usize::MAX - 1);
/// First listener token; listener `i` uses `LISTENER_BASE + i`. Everything below
/// it is a connection index, so `max_connections` must stay below it (checked in
/// `Config::validate`, and it leaves 2^31 slots even where `usize` is 32 bits).
pub(crate) const LISTENER_BASE: usize = usize::MAX / 2;

/// A generation-checked reference to a connection.
///
/// The slab slot `index` may be reused by a later connection; `generation` tells
/// the two apart, so a stale key simply finds nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey {
    /// Slab index (also the connection's `mio::Token`).
    pub index: u32,
    /// Generation of the connection that held `index` when this key was made.
    pub generation: u32,
}

// ===== impl ConnKey =====

impl ConnKey {
    /// The key of the connection in slab slot `index` at `generation`
    /// (the engine's connections make theirs with `Conn::key`).
    pub(crate) fn new(index: usize, generation: u32) -> ConnKey {
        ConnKey {
            index: index as u32,
            generation,
        }
    }

    /// Pack into a `u64` (to carry a key where only a number fits).
    pub fn to_u64(self) -> u64 {
        (u64::from(self.index) << 32) | u64::from(self.generation)
    }

    /// The inverse of [`ConnKey::to_u64`].
    pub fn from_u64(v: u64) -> ConnKey {
        ConnKey {
            index: (v >> 32) as u32,
            generation: v as u32,
        }
    }
}

impl std::fmt::Display for ConnKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "c{}.{}", self.index, self.generation)
    }
}

/// Identifies a listener opened by a role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ListenerId(pub(crate) usize);

/// What a token from `poll` refers to.
pub(crate) enum Target {
    Conn(usize),
    Listener(usize),
    Waker,
    Signals,
}

pub(crate) fn conn_token(index: usize) -> Token {
    Token(index)
}

pub(crate) fn listener_token(index: usize) -> Token {
    Token(LISTENER_BASE + index)
}

pub(crate) fn target(token: Token) -> Target {
    match token {
        WAKER => Target::Waker,
        SIGNALS => Target::Signals,
        Token(t) if t >= LISTENER_BASE => Target::Listener(t - LISTENER_BASE),
        Token(t) => Target::Conn(t),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_round_trips_through_u64() {
        let k = ConnKey {
            index: 0xdead_beef,
            generation: 7,
        };
        assert_eq!(ConnKey::from_u64(k.to_u64()), k);
    }

    #[test]
    fn tokens_map_back() {
        assert!(matches!(target(conn_token(5)), Target::Conn(5)));
        assert!(matches!(target(listener_token(3)), Target::Listener(3)));
        assert!(matches!(target(WAKER), Target::Waker));
        assert!(matches!(target(SIGNALS), Target::Signals));
    }
}
