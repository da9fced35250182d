//! Deadlines keyed by owner, with O(log n) insert and an O(1) next deadline.
//!
//! Invariant: every live timer has exactly one valid heap entry; cancelled or
//! fired timers leave stale entries that are recognised by their generation
//! and skipped. Stale entries are compacted away before they can outnumber the
//! live ones, so the heap stays bounded by twice the live timers. Inserting allocates
//! nothing once the slab and heap have grown to their working size.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

use slab::Slab;

/// A handle to a timer, generation-checked like [`crate::ConnKey`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TimerKey {
    index: u32,
    generation: u32,
}

#[derive(Debug)]
struct Entry<O> {
    generation: u32,
    owner: O,
}

/// A set of deadlines, each carrying an owner value `O`.
#[derive(Debug)]
pub(crate) struct Timers<O> {
    entries: Slab<Entry<O>>,
    heap: BinaryHeap<Reverse<(Instant, u32, u32)>>,
    next_generation: u32,
}

// ===== impl Timers =====

impl<O: Copy> Timers<O> {
    pub(crate) fn with_capacity(n: usize) -> Timers<O> {
        Timers {
            entries: Slab::with_capacity(n),
            heap: BinaryHeap::with_capacity(n),
            next_generation: 0,
        }
    }

    /// Live timers.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn insert(&mut self, at: Instant, owner: O) -> TimerKey {
        self.next_generation = self.next_generation.wrapping_add(1);
        let generation = self.next_generation;
        let index = self.entries.insert(Entry { generation, owner });
        self.push(at, index, generation);
        TimerKey {
            index: index as u32,
            generation,
        }
    }

    /// Cancel a live timer and return its owner; a stale key does nothing.
    pub(crate) fn cancel(&mut self, key: TimerKey) -> Option<O> {
        self.live_mut(key)?;
        Some(self.entries.remove(key.index as usize).owner)
    }

    /// The earliest live deadline.
    pub(crate) fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(&Reverse((at, index, generation))) = self.heap.peek() {
            if self.is_current(index, generation) {
                return Some(at);
            }
            self.heap.pop();
        }
        None
    }

    /// Remove and return one expired timer, if any.
    pub(crate) fn pop_expired(&mut self, now: Instant) -> Option<(TimerKey, O)> {
        while let Some(&Reverse((at, index, generation))) = self.heap.peek() {
            if !self.is_current(index, generation) {
                self.heap.pop();
                continue;
            }
            if at > now {
                return None;
            }
            self.heap.pop();
            let e = self.entries.remove(index as usize);
            return Some((
                TimerKey {
                    index,
                    generation: e.generation,
                },
                e.owner,
            ));
        }
        None
    }

    fn push(&mut self, at: Instant, index: usize, generation: u32) {
        if self.heap.len() >= 2 * self.entries.len() + 64 {
            let entries = &self.entries;
            self.heap.retain(|Reverse((_, i, g))| {
                entries.get(*i as usize).is_some_and(|e| e.generation == *g)
            });
        }
        self.heap.push(Reverse((at, index as u32, generation)));
    }

    fn is_current(&self, index: u32, generation: u32) -> bool {
        self.entries
            .get(index as usize)
            .is_some_and(|e| e.generation == generation)
    }

    fn live_mut(&mut self, key: TimerKey) -> Option<&mut Entry<O>> {
        self.entries
            .get_mut(key.index as usize)
            .filter(|e| e.generation == key.generation)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use std::time::Duration;

    #[test]
    fn fires_in_order_and_skips_cancelled() {
        let t0 = Instant::now();
        let mut t = Timers::with_capacity(4);
        let a = t.insert(t0 + Duration::from_millis(30), 'a');
        let _b = t.insert(t0 + Duration::from_millis(10), 'b');
        let c = t.insert(t0 + Duration::from_millis(20), 'c');
        t.cancel(c);
        assert_eq!(t.next_deadline(), Some(t0 + Duration::from_millis(10)));
        assert!(t.pop_expired(t0).is_none());
        let later = t0 + Duration::from_millis(100);
        assert_eq!(t.pop_expired(later).unwrap().1, 'b');
        assert_eq!(t.pop_expired(later).unwrap().1, 'a');
        assert!(t.pop_expired(later).is_none());
        t.cancel(a); // a fired already: cancelling a stale key is a no-op
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn heap_stays_bounded_under_churn() {
        let t0 = Instant::now();
        let mut t = Timers::with_capacity(4);
        let keep = t.insert(t0 + Duration::from_secs(1), 0u32);
        for i in 0..10_000u32 {
            let k = t.insert(t0 + Duration::from_millis(u64::from(i)), i);
            t.cancel(k);
        }
        assert!(t.heap.len() <= 2 * t.len() + 65);
        assert_eq!(t.next_deadline(), Some(t0 + Duration::from_secs(1)));
        t.cancel(keep);
        assert_eq!(t.next_deadline(), None);
    }
}
