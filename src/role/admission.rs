//! Admission of connections that have not yet said who they are (a tunnel
//! link in its handshake; a router device before its id), shared by roles so
//! that silent connections can never lock a real peer out.
//!
//! - [`Pending`]: the connections in their handshake, oldest first, with a
//!   count per source address. Full table: the oldest is evicted to make
//!   room (a peer that is talking gets in; a silent one is the first to go).
//!   Too many from one address: the new one is refused. Only connections
//!   pending longer than a grace ([`PER_IP_GRACE`]) count against their
//!   address, so a burst of peers that identify at once (modems behind one
//!   carrier-NAT address reconnecting after an outage) is never refused.
//! - [`Throttle`]: addresses that keep failing their handshake are refused
//!   on accept for a while.
//!
//! Invariant: both tables are bounded (`Pending` by its capacity,
//! `Throttle` by [`Throttle::MAX_ADDRESSES`]); no operation scans more than
//! its own table (`Pending` looks at most at `max_per_ip + 1` entries).
//! Allocation: the tables grow as entries arrive, up to their bound, and keep
//! their memory (an idle gateway with a large `max_pending` pays nothing).

use std::net::IpAddr;
use std::time::{Duration, Instant};

/// A connection counts against its address's `max_pending_per_ip` only
/// once it has been pending this long.
pub(crate) const PER_IP_GRACE: Duration = Duration::from_millis(500);

use hashbrown::HashMap;
use slab::Slab;

/// What to do with a new connection ([`Pending::admit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit<K> {
    /// Room for it.
    Yes,
    /// Its address already has `max_per_ip` connections pending: refuse it.
    TooManyFromAddress,
    /// The table is full: this (the oldest) was evicted to make room; the
    /// caller closes it.
    Evicted(K),
}

/// Where an entry sits in [`Pending`] (for [`Pending::remove`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PendingId(usize);

#[derive(Debug)]
struct Entry<K> {
    key: K,
    ip: IpAddr,
    since: Instant,
    /// Neighbours in arrival order, all addresses.
    older: Option<usize>,
    newer: Option<usize>,
    /// Neighbours in arrival order, this address only.
    ip_older: Option<usize>,
    ip_newer: Option<usize>,
}

/// One address's entries: its oldest and newest (a list through
/// `ip_older`/`ip_newer`).
#[derive(Debug, Clone, Copy)]
struct Ends {
    oldest: usize,
    newest: usize,
}

/// Connections in their handshake, in arrival order, counted per address.
#[derive(Debug)]
pub(crate) struct Pending<K> {
    entries: Slab<Entry<K>>,
    oldest: Option<usize>,
    newest: Option<usize>,
    per_ip: HashMap<IpAddr, Ends>,
    capacity: usize,
    max_per_ip: usize,
    grace: Duration,
}

impl<K: Copy + PartialEq> Pending<K> {
    /// A table for at most `capacity` connections, `max_per_ip` from one
    /// address (counting those pending longer than `grace`).
    pub(crate) fn new(capacity: usize, max_per_ip: usize, grace: Duration) -> Pending<K> {
        Pending {
            entries: Slab::new(),
            oldest: None,
            newest: None,
            per_ip: HashMap::new(),
            capacity,
            max_per_ip,
            grace,
        }
    }

    /// Connections pending now.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Decide on a new connection from `ip` at `now`; with
    /// [`Admit::Evicted`] the oldest entry is already gone from the table.
    pub(crate) fn admit(&mut self, ip: IpAddr, now: Instant) -> Admit<K> {
        if self.settled_from(ip, now) >= self.max_per_ip {
            return Admit::TooManyFromAddress;
        }
        if self.entries.len() < self.capacity {
            return Admit::Yes;
        }
        match self.oldest.and_then(|i| self.unlink(i)) {
            Some(key) => Admit::Evicted(key),
            None => Admit::Yes,
        }
    }

    /// Entries from `ip` pending longer than the grace, counted from its
    /// oldest (at most `max_per_ip` are looked at).
    fn settled_from(&self, ip: IpAddr, now: Instant) -> usize {
        let mut at = self.per_ip.get(&ip).map(|e| e.oldest);
        let mut n = 0;
        while let Some(e) = at.and_then(|i| self.entries.get(i)) {
            if n >= self.max_per_ip || now.saturating_duration_since(e.since) < self.grace {
                break;
            }
            n += 1;
            at = e.ip_newer;
        }
        n
    }

    /// Add `key`, arrived at `now` (after [`Pending::admit`] said there is room).
    pub(crate) fn insert(&mut self, key: K, ip: IpAddr, now: Instant) -> PendingId {
        let ip_newest = self.per_ip.get(&ip).map(|e| e.newest);
        let i = self.entries.insert(Entry {
            key,
            ip,
            since: now,
            older: self.newest,
            newer: None,
            ip_older: ip_newest,
            ip_newer: None,
        });
        match self.newest.and_then(|n| self.entries.get_mut(n)) {
            Some(n) => n.newer = Some(i),
            None => self.oldest = Some(i),
        }
        self.newest = Some(i);
        match ip_newest.and_then(|n| self.entries.get_mut(n)) {
            Some(n) => n.ip_newer = Some(i),
            None => {
                self.per_ip.insert(
                    ip,
                    Ends {
                        oldest: i,
                        newest: i,
                    },
                );
            }
        }
        if let Some(ends) = self.per_ip.get_mut(&ip) {
            ends.newest = i;
        }
        PendingId(i)
    }

    /// `key` finished (or abandoned) its handshake. Does nothing if it was
    /// evicted already (the id may name another entry by now: `key` decides).
    pub(crate) fn remove(&mut self, id: PendingId, key: K) {
        if self.entries.get(id.0).is_some_and(|e| e.key == key) {
            self.unlink(id.0);
        }
    }

    fn unlink(&mut self, i: usize) -> Option<K> {
        let e = self.entries.try_remove(i)?;
        match e.older.and_then(|o| self.entries.get_mut(o)) {
            Some(o) => o.newer = e.newer,
            None => self.oldest = e.newer,
        }
        match e.newer.and_then(|n| self.entries.get_mut(n)) {
            Some(n) => n.older = e.older,
            None => self.newest = e.older,
        }
        if let Some(o) = e.ip_older.and_then(|o| self.entries.get_mut(o)) {
            o.ip_newer = e.ip_newer;
        }
        if let Some(n) = e.ip_newer.and_then(|n| self.entries.get_mut(n)) {
            n.ip_older = e.ip_older;
        }
        match (e.ip_older, e.ip_newer) {
            (None, None) => {
                self.per_ip.remove(&e.ip);
            }
            (older, newer) => {
                if let Some(ends) = self.per_ip.get_mut(&e.ip) {
                    if let Some(n) = newer.filter(|_| older.is_none()) {
                        ends.oldest = n;
                    }
                    if let Some(o) = older.filter(|_| newer.is_none()) {
                        ends.newest = o;
                    }
                }
            }
        }
        Some(e.key)
    }
}

#[derive(Debug, Clone, Copy)]
struct Record {
    failures: u32,
    first: Instant,
    blocked_until: Option<Instant>,
}

/// Addresses whose handshakes keep failing: after [`Throttle::FAILURES`]
/// failures within [`Throttle::WINDOW`], their connections are refused on
/// accept for [`Throttle::BLOCK`].
#[derive(Debug)]
pub(crate) struct Throttle {
    table: HashMap<IpAddr, Record>,
}

impl Throttle {
    /// Failures that start a block...
    pub(crate) const FAILURES: u32 = 5;
    /// ...when they fall within this long.
    pub(crate) const WINDOW: Duration = Duration::from_secs(10);
    /// How long a blocked address is refused.
    pub(crate) const BLOCK: Duration = Duration::from_secs(30);
    /// Addresses tracked at once. When the table is full, records that have
    /// expired are dropped; if none has, a new address is not tracked (it is
    /// still bound by the pending limits).
    pub(crate) const MAX_ADDRESSES: usize = 4096;

    pub(crate) fn new() -> Throttle {
        Throttle {
            table: HashMap::new(),
        }
    }

    /// Whether connections from `ip` are refused now.
    pub(crate) fn is_blocked(&mut self, ip: IpAddr, now: Instant) -> bool {
        match self.table.get(&ip).and_then(|r| r.blocked_until) {
            Some(until) if now < until => true,
            Some(_) => {
                self.table.remove(&ip);
                false
            }
            None => false,
        }
    }

    /// A failed handshake from `ip`. True when this failure starts a block
    /// (log it then, once per episode).
    pub(crate) fn failure(&mut self, ip: IpAddr, now: Instant) -> bool {
        if !self.table.contains_key(&ip) && self.table.len() >= Self::MAX_ADDRESSES {
            self.table.retain(|_, r| !Self::expired(r, now));
            if self.table.len() >= Self::MAX_ADDRESSES {
                return false;
            }
        }
        let r = self.table.entry(ip).or_insert(Record {
            failures: 0,
            first: now,
            blocked_until: None,
        });
        if Self::expired(r, now) {
            *r = Record {
                failures: 0,
                first: now,
                blocked_until: None,
            };
        }
        if r.blocked_until.is_some() {
            return false;
        }
        r.failures += 1;
        if r.failures >= Self::FAILURES {
            r.blocked_until = Some(now + Self::BLOCK);
            return true;
        }
        false
    }

    fn expired(r: &Record, now: Instant) -> bool {
        match r.blocked_until {
            Some(until) => now >= until,
            None => now.duration_since(r.first) >= Self::WINDOW,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly")]

    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    /// A table with no grace, and the time a test starts at.
    fn table(capacity: usize, per_ip: usize) -> (Pending<u32>, Instant) {
        (
            Pending::new(capacity, per_ip, Duration::ZERO),
            Instant::now(),
        )
    }

    #[test]
    fn a_full_table_evicts_the_oldest_and_one_address_is_capped() {
        let (mut p, t) = table(3, 2);
        let a = p.insert(1, ip(1), t);
        assert_eq!(p.admit(ip(1), t), Admit::Yes);
        p.insert(2, ip(1), t);
        assert_eq!(p.admit(ip(1), t), Admit::TooManyFromAddress);
        assert_eq!(p.admit(ip(2), t), Admit::Yes);
        p.insert(3, ip(2), t);
        // Full: the oldest (1) makes room, and its address may send again.
        assert_eq!(p.admit(ip(3), t), Admit::Evicted(1));
        assert_eq!(p.len(), 2);
        assert_eq!(p.admit(ip(1), t), Admit::Yes);
        p.insert(4, ip(3), t);
        // A late remove of the evicted entry does not touch the entry that
        // took its slot.
        p.remove(a, 1);
        assert_eq!(p.len(), 3);
        assert_eq!(p.admit(ip(4), t), Admit::Evicted(2));
        assert_eq!(p.admit(ip(4), t), Admit::Yes);
    }

    #[test]
    fn removal_from_the_middle_keeps_the_order() {
        let (mut p, t) = table(3, 3);
        p.insert(1, ip(1), t);
        let b = p.insert(2, ip(1), t);
        p.insert(3, ip(1), t);
        p.remove(b, 2);
        p.insert(4, ip(2), t);
        assert_eq!(p.admit(ip(3), t), Admit::Evicted(1));
        p.insert(5, ip(3), t);
        assert_eq!(p.admit(ip(3), t), Admit::Evicted(3));
        assert_eq!(p.admit(ip(3), t), Admit::Yes);
        p.insert(6, ip(3), t);
        assert_eq!(p.admit(ip(3), t), Admit::Evicted(4));
    }

    #[test]
    fn per_address_lists_survive_removals_anywhere() {
        let (mut p, t) = table(10, 3);
        let ids: Vec<PendingId> = (0..5).map(|k| p.insert(k, ip(1), t)).collect();
        // Remove the middle, the newest, then the oldest of ip(1).
        p.remove(ids[2], 2);
        p.remove(ids[4], 4);
        p.remove(ids[0], 0);
        // Left: 1 and 3, so one more fits under 3.
        assert_eq!(p.admit(ip(1), t), Admit::Yes);
        p.insert(5, ip(1), t);
        assert_eq!(p.admit(ip(1), t), Admit::TooManyFromAddress);
        p.remove(ids[1], 1);
        p.remove(ids[3], 3);
        assert_eq!(p.admit(ip(1), t), Admit::Yes);
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn young_connections_do_not_count_against_their_address() {
        let grace = Duration::from_millis(500);
        let mut p: Pending<u32> = Pending::new(100, 2, grace);
        let t0 = Instant::now();
        // A burst from one address: all young, all admitted.
        for k in 0..20 {
            assert_eq!(p.admit(ip(1), t0), Admit::Yes, "connection {k}");
            p.insert(k, ip(1), t0);
        }
        // Once the grace has passed, they count: the address is at its limit.
        assert_eq!(p.admit(ip(1), t0 + grace), Admit::TooManyFromAddress);
        assert_eq!(p.admit(ip(2), t0 + grace), Admit::Yes);
    }
    #[test]
    fn five_failures_in_ten_seconds_block_for_thirty() {
        let t0 = Instant::now();
        let mut t = Throttle::new();
        let s = Duration::from_secs;
        for k in 0..4 {
            assert!(!t.failure(ip(1), t0 + s(k)));
        }
        assert!(!t.is_blocked(ip(1), t0 + s(4)));
        assert!(t.failure(ip(1), t0 + s(5)), "the fifth starts a block");
        assert!(!t.failure(ip(1), t0 + s(6)), "one log line per episode");
        assert!(t.is_blocked(ip(1), t0 + s(6)));
        assert!(!t.is_blocked(ip(2), t0 + s(6)));
        assert!(t.is_blocked(ip(1), t0 + s(34)));
        assert!(!t.is_blocked(ip(1), t0 + s(35)));
        // Failures spread wider than the window never block.
        for k in 0..10 {
            assert!(!t.failure(ip(3), t0 + s(11 * k)));
        }
        assert!(!t.is_blocked(ip(3), t0 + s(110)));
    }

    #[test]
    fn the_table_is_bounded() {
        let t0 = Instant::now();
        let mut t = Throttle::new();
        for k in 0..Throttle::MAX_ADDRESSES as u32 + 10 {
            t.failure(IpAddr::from(k.to_be_bytes()), t0);
        }
        assert_eq!(t.table.len(), Throttle::MAX_ADDRESSES);
        // Once the first records expire, new addresses are tracked again.
        t.failure(ip(200), t0 + Throttle::WINDOW);
        assert_eq!(t.table.len(), 1);
    }
}
