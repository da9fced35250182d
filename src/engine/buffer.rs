//! Read buffers lent on demand, and bounded per-connection send queues.
//!
//! Allocation policy: a [`Buffer`] is a fixed, zero-initialised block taken from
//! the [`BufferPool`] only while a connection has unconsumed input or copied
//! output, and given back when drained, so an idle connection holds none. The
//! pool keeps at most `max_free` blocks for reuse; in steady state nothing is
//! allocated. A [`SendQueue`] never holds more than its byte limit.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes};

/// How many buffers one vectored write gathers at most.
pub(crate) const MAX_IOV: usize = 64;
/// A drained queue keeps its chunk and block tables up to this many entries; a
/// larger one is freed so that a connection that once had a burst does not keep
/// the memory.
const KEEP_CHUNKS: usize = 32;

/// A fixed-size byte block with a readable window `start..end`.
#[derive(Debug)]
pub(crate) struct Buffer {
    data: Box<[u8]>,
    start: usize,
    end: usize,
}

// ===== impl Buffer =====

impl Buffer {
    fn new(len: usize) -> Buffer {
        Buffer {
            data: vec![0; len].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// The unconsumed bytes.
    pub(crate) fn data(&self) -> &[u8] {
        self.data.get(self.start..self.end).unwrap_or_default()
    }

    pub(crate) fn len(&self) -> usize {
        self.end - self.start
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Free space after the data, moving the data to the front first when the
    /// tail is full (so partial frames never need more than one block).
    pub(crate) fn space(&mut self) -> &mut [u8] {
        if self.end == self.data.len() && self.start > 0 {
            self.shift();
        }
        self.data.get_mut(self.end..).unwrap_or_default()
    }

    fn shift(&mut self) {
        self.data.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
    }

    /// Mark `n` bytes of [`Buffer::space`] as filled.
    pub(crate) fn fill(&mut self, n: usize) {
        self.end = (self.end + n).min(self.data.len());
    }

    /// Drop `n` bytes from the front.
    pub(crate) fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Keep only the first `n` unconsumed bytes.
    pub(crate) fn truncate(&mut self, n: usize) {
        self.end = self.start + n.min(self.len());
    }

    /// Copy `src` in; returns how much fitted.
    pub(crate) fn extend(&mut self, src: &[u8]) -> usize {
        self.append(src)
    }

    fn has_space(&self) -> bool {
        self.end < self.data.len() || self.start > 0
    }

    /// Append as much of `src` as fits; returns how much was copied.
    fn append(&mut self, src: &[u8]) -> usize {
        let space = self.space();
        let n = space.len().min(src.len());
        if let (Some(dst), Some(src)) = (space.get_mut(..n), src.get(..n)) {
            dst.copy_from_slice(src);
        }
        self.fill(n);
        n
    }
}

/// A bounded free list of equally sized [`Buffer`]s.
#[derive(Debug)]
pub(crate) struct BufferPool {
    free: Vec<Buffer>,
    buf_len: usize,
    max_free: usize,
    /// Buffers currently lent out (for the stats).
    pub(crate) lent: usize,
    /// The fewest free buffers since the last [`BufferPool::trim`]: that
    /// many sat unused the whole time.
    low_water: usize,
}

/// Free buffers a trim always keeps (enough for the next few reads).
pub(crate) const POOL_FLOOR: usize = 8;

// ===== impl BufferPool =====

impl BufferPool {
    pub(crate) fn new(buf_len: usize, max_free: usize) -> BufferPool {
        BufferPool {
            free: Vec::with_capacity(max_free),
            buf_len,
            max_free,
            lent: 0,
            low_water: 0,
        }
    }

    /// Free the buffers that stayed unused since the last trim, down to
    /// [`POOL_FLOOR`]: after a burst the pool shrinks back within two trims
    /// instead of holding `max_free` buffers for good. Returns how many
    /// were freed.
    pub(crate) fn trim(&mut self) -> usize {
        let idle = self
            .low_water
            .min(self.free.len().saturating_sub(POOL_FLOOR));
        self.free.truncate(self.free.len() - idle);
        if self.free.capacity() > 2 * self.max_free.max(POOL_FLOOR) {
            self.free.shrink_to(self.max_free);
        }
        self.low_water = self.free.len();
        idle
    }

    /// Whether a trim could free anything (the loop then wakes up for it).
    pub(crate) fn trimmable(&self) -> bool {
        self.free.len() > POOL_FLOOR
    }

    pub(crate) fn buf_len(&self) -> usize {
        self.buf_len
    }

    pub(crate) fn take(&mut self) -> Buffer {
        self.lent += 1;
        let buf = self.free.pop().unwrap_or_else(|| Buffer::new(self.buf_len));
        self.low_water = self.low_water.min(self.free.len());
        buf
    }

    pub(crate) fn give_back(&mut self, mut buf: Buffer) {
        self.lent = self.lent.saturating_sub(1);
        if self.free.len() < self.max_free && buf.data.len() == self.buf_len {
            buf.start = 0;
            buf.end = 0;
            self.free.push(buf);
        }
    }
}

/// One queued piece of output.
#[derive(Debug)]
enum Chunk {
    /// A refcounted buffer, possibly shared with other connections' queues,
    /// holding this many whole records (as the sender counted them).
    Shared(Bytes, u32),
    /// The next `n` copied bytes. A `Copied` chunk never spans two blocks, so
    /// the chunks map onto the blocks in order.
    Copied(usize),
    /// A whole read buffer moved here instead of copied ([`SendQueue::push_pending`]).
    Moved(Buffer),
    /// Room for `n` bytes that a `Moved` buffer fills before the next write.
    Pending(usize),
}

/// The send queue was full; nothing was queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QueueFull;

/// A connection's outgoing bytes: shared `Bytes` and copies, in order, bounded.
///
/// Copies go into a chain of pooled blocks, so queuing a copy never allocates
/// once the pool is warm, however far the queue is from its bound.
#[derive(Debug)]
pub(crate) struct SendQueue {
    chunks: VecDeque<Chunk>,
    blocks: VecDeque<Buffer>,
    /// The last chunk is `Copied` and refers to the back block (may grow).
    tail_open: bool,
    /// The front chunk is partly written (it must not be dropped).
    front_started: bool,
    /// Records in the `Shared` chunks.
    records: usize,
    len: usize,
    limit: usize,
}

// ===== impl SendQueue =====

impl SendQueue {
    pub(crate) fn new(limit: usize) -> SendQueue {
        SendQueue {
            chunks: VecDeque::new(),
            blocks: VecDeque::new(),
            tail_open: false,
            front_started: false,
            records: 0,
            len: 0,
            limit,
        }
    }

    /// Records queued with [`SendQueue::push_shared`] and not completely written.
    pub(crate) fn records(&self) -> usize {
        self.records
    }

    /// Drop whole shared buffers from the front (after a partly written one,
    /// which must finish) until `need` more bytes fit and at most
    /// `keep_records` records remain, or nothing droppable is left.
    pub(crate) fn drop_oldest(&mut self, need: usize, keep_records: usize) -> super::ctx::Dropped {
        let mut dropped = super::ctx::Dropped::default();
        let first = usize::from(self.front_started);
        while self.limit - self.len < need || self.records > keep_records {
            match self.chunks.get(first) {
                Some(Chunk::Shared(b, r)) => {
                    let (n, r) = (b.len(), *r as usize);
                    self.chunks.remove(first);
                    self.len -= n;
                    self.records -= r;
                    dropped.records += r;
                    dropped.bytes += n;
                }
                _ => break,
            }
        }
        dropped
    }

    /// Queued bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queue a shared buffer (a refcount, not a copy) holding `records` records.
    pub(crate) fn push_shared(&mut self, bytes: Bytes, records: u32) -> Result<(), QueueFull> {
        if bytes.len() > self.limit - self.len {
            return Err(QueueFull);
        }
        if bytes.is_empty() {
            return Ok(());
        }
        self.len += bytes.len();
        self.records += records as usize;
        self.chunks.push_back(Chunk::Shared(bytes, records));
        self.tail_open = false;
        Ok(())
    }

    /// Reserve `n` bytes at the back for a buffer that [`SendQueue::fill_pending`]
    /// moves in later in the same turn (before any write).
    pub(crate) fn push_pending(&mut self, n: usize) -> Result<(), QueueFull> {
        if n > self.limit - self.len {
            return Err(QueueFull);
        }
        self.len += n;
        self.chunks.push_back(Chunk::Pending(n));
        self.tail_open = false;
        Ok(())
    }

    /// Put `buf` where the last pending reservation is; gives it back (to be
    /// returned to the pool) if the reservation is gone (the queue was cleared).
    pub(crate) fn fill_pending(&mut self, buf: Buffer) -> Result<(), Buffer> {
        let len = buf.len();
        let slot = self
            .chunks
            .iter_mut()
            .rev()
            .find(|c| matches!(c, Chunk::Pending(_)));
        match slot {
            Some(c) if matches!(*c, Chunk::Pending(n) if n == len) => {
                *c = Chunk::Moved(buf);
                Ok(())
            }
            _ => Err(buf),
        }
    }

    /// Queue a copy of `src` in pooled blocks.
    pub(crate) fn push_copy(&mut self, src: &[u8], pool: &mut BufferPool) -> Result<(), QueueFull> {
        if src.len() > self.limit - self.len {
            return Err(QueueFull);
        }
        self.len += src.len();
        let mut rest = src;
        while !rest.is_empty() {
            let back = match self.blocks.back_mut() {
                Some(b) if b.has_space() => b,
                _ => {
                    self.blocks.push_back(pool.take());
                    self.tail_open = false;
                    match self.blocks.back_mut() {
                        Some(b) => b,
                        None => break,
                    }
                }
            };
            let n = back.append(rest);
            match (self.tail_open, self.chunks.back_mut()) {
                (true, Some(Chunk::Copied(k))) => *k += n,
                _ => self.chunks.push_back(Chunk::Copied(n)),
            }
            self.tail_open = true;
            rest = rest.get(n..).unwrap_or_default();
        }
        Ok(())
    }

    /// Fill `iov` with the queued bytes in order; returns how many slots are used.
    #[cfg(test)]
    pub(crate) fn gather<'a>(&'a self, iov: &mut [IoSlice<'a>; MAX_IOV]) -> usize {
        self.gather_at_most(iov, usize::MAX)
    }

    /// [`SendQueue::gather`], at most `limit` bytes in all.
    pub(crate) fn gather_at_most<'a>(
        &'a self,
        iov: &mut [IoSlice<'a>; MAX_IOV],
        mut limit: usize,
    ) -> usize {
        let mut blocks = self.blocks.iter();
        let mut block: &[u8] = blocks.next().map(Buffer::data).unwrap_or_default();
        let mut n = 0;
        for (chunk, slot) in self.chunks.iter().zip(iov.iter_mut()) {
            let bytes: &[u8] = match chunk {
                Chunk::Shared(b, _) => b,
                Chunk::Moved(b) => b.data(),
                Chunk::Pending(_) => break,
                Chunk::Copied(k) => {
                    if block.is_empty() {
                        block = blocks.next().map(Buffer::data).unwrap_or_default();
                    }
                    let (head, tail) = block.split_at((*k).min(block.len()));
                    block = tail;
                    head
                }
            };
            let bytes = bytes.get(..bytes.len().min(limit)).unwrap_or_default();
            limit -= bytes.len();
            *slot = IoSlice::new(bytes);
            n += 1;
            if limit == 0 {
                break;
            }
        }
        n
    }

    /// Drop `written` bytes from the front, returning drained blocks to the pool.
    pub(crate) fn advance(&mut self, mut written: usize, pool: &mut BufferPool) {
        self.len = self.len.saturating_sub(written);
        while written > 0 {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            let (n, done) = match front {
                Chunk::Shared(b, r) => {
                    let n = b.len().min(written);
                    b.advance(n);
                    if b.is_empty() {
                        self.records -= *r as usize;
                    }
                    (n, b.is_empty())
                }
                Chunk::Moved(b) => {
                    let n = b.len().min(written);
                    b.consume(n);
                    (n, b.is_empty())
                }
                Chunk::Copied(k) => {
                    let n = (*k).min(written);
                    *k -= n;
                    if let Some(b) = self.blocks.front_mut() {
                        b.consume(n);
                        if b.is_empty()
                            && self.blocks.len() > 1
                            && let Some(b) = self.blocks.pop_front()
                        {
                            pool.give_back(b);
                        }
                    }
                    (n, *k == 0)
                }
                Chunk::Pending(_) => break,
            };
            written -= n;
            // The front chunk is partly written unless it just finished.
            self.front_started = !done;
            if done {
                if let Some(Chunk::Moved(b)) = self.chunks.pop_front() {
                    pool.give_back(b);
                }
                if self.chunks.is_empty() {
                    self.tail_open = false;
                }
            }
        }
    }

    /// Give pooled memory back once the queue is empty (idle connections hold
    /// no block; the small chunk tables are kept unless a burst grew them).
    pub(crate) fn release(&mut self, pool: &mut BufferPool) {
        if !self.is_empty() {
            return;
        }
        self.tail_open = false;
        while let Some(b) = self.blocks.pop_front() {
            pool.give_back(b);
        }
        if self.chunks.capacity() > KEEP_CHUNKS {
            self.chunks = VecDeque::new();
        }
        if self.blocks.capacity() > KEEP_CHUNKS {
            self.blocks = VecDeque::new();
        }
    }

    /// Drop everything (on close), giving pooled memory back.
    pub(crate) fn clear(&mut self, pool: &mut BufferPool) {
        for chunk in self.chunks.drain(..) {
            if let Chunk::Moved(b) = chunk {
                pool.give_back(b);
            }
        }
        self.front_started = false;
        self.records = 0;
        self.len = 0;
        self.release(pool);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn drain(q: &mut SendQueue, pool: &mut BufferPool) -> Vec<u8> {
        let mut out = Vec::new();
        while !q.is_empty() {
            let mut iov = [IoSlice::new(&[]); MAX_IOV];
            let n = q.gather(&mut iov);
            // Write at most 3 bytes at a time to exercise partial advances.
            let mut left = 3;
            for s in &iov[..n] {
                let take = s.len().min(left);
                out.extend_from_slice(&s[..take]);
                left -= take;
                if left == 0 {
                    break;
                }
            }
            let w = 3usize.min(q.len());
            q.advance(w, pool);
        }
        out
    }

    #[test]
    fn copies_and_shared_keep_order() {
        let mut pool = BufferPool::new(8, 4);
        let mut q = SendQueue::new(100);
        q.push_copy(b"abc", &mut pool).unwrap();
        q.push_shared(Bytes::from_static(b"DEF"), 1).unwrap();
        q.push_copy(b"ghijklmnopqrstu", &mut pool).unwrap(); // spans three 8-byte blocks
        q.push_copy(b"v", &mut pool).unwrap();
        assert_eq!(q.len(), 22);
        assert_eq!(pool.lent, 3);
        assert_eq!(drain(&mut q, &mut pool), b"abcDEFghijklmnopqrstuv");
        assert_eq!(pool.lent, 1, "drained blocks go back as the queue drains");
        q.release(&mut pool);
        assert_eq!(pool.lent, 0);
    }

    #[test]
    fn limit_is_enforced() {
        let mut pool = BufferPool::new(8, 4);
        let mut q = SendQueue::new(5);
        q.push_copy(b"abcd", &mut pool).unwrap();
        assert_eq!(q.push_copy(b"ef", &mut pool), Err(QueueFull));
        assert_eq!(q.push_shared(Bytes::from_static(b"ef"), 1), Err(QueueFull));
        q.push_copy(b"e", &mut pool).unwrap();
        assert_eq!(q.len(), 5);
    }

    #[test]
    fn buffer_shifts_partial_data_to_front() {
        let mut b = Buffer::new(4);
        b.space()[..4].copy_from_slice(b"abcd");
        b.fill(4);
        b.consume(3);
        assert_eq!(b.space().len(), 3);
        assert_eq!(b.data(), b"d");
    }

    #[test]
    fn moved_buffers_keep_their_place() {
        let mut pool = BufferPool::new(8, 4);
        let mut q = SendQueue::new(100);
        q.push_copy(b"ab", &mut pool).unwrap();
        q.push_pending(3).unwrap();
        q.push_copy(b"fg", &mut pool).unwrap();
        let mut moved = pool.take();
        moved.extend(b"cdeXX");
        moved.truncate(3);
        q.fill_pending(moved).unwrap();
        assert_eq!(q.len(), 7);
        assert_eq!(drain(&mut q, &mut pool), b"abcdefg");
        q.release(&mut pool);
        assert_eq!(pool.lent, 0);
    }

    #[test]
    fn pending_is_never_written_and_cleared_queues_refuse_the_fill() {
        let mut pool = BufferPool::new(8, 4);
        let mut q = SendQueue::new(100);
        q.push_copy(b"ab", &mut pool).unwrap();
        q.push_pending(3).unwrap();
        let mut iov = [IoSlice::new(&[]); MAX_IOV];
        assert_eq!(q.gather(&mut iov), 1, "gather stops at the reservation");
        q.clear(&mut pool);
        assert!(q.fill_pending(pool.take()).is_err());
    }

    #[test]
    fn drop_oldest_drops_whole_unstarted_buffers_only() {
        let mut pool = BufferPool::new(8, 4);
        let mut q = SendQueue::new(12);
        for r in [&b"aaaa"[..], b"bbbb", b"cccc"] {
            q.push_shared(Bytes::copy_from_slice(r), 1).unwrap();
        }
        q.advance(2, &mut pool); // "aa" of the first record is on the wire
        assert_eq!(q.len(), 10);
        // Room for 5 more: the partly written record stays, "bbbb" goes.
        let d = q.drop_oldest(5, usize::MAX);
        assert_eq!((d.records, d.bytes), (1, 4));
        assert_eq!(q.records(), 2);
        q.push_shared(Bytes::from_static(b"ddddd"), 1).unwrap();
        assert_eq!(drain(&mut q, &mut pool), b"aaccccddddd");
        // Nothing droppable: nothing happens.
        q.push_shared(Bytes::from_static(b"eeee"), 1).unwrap();
        q.advance(1, &mut pool);
        assert_eq!(q.drop_oldest(100, usize::MAX).records, 0);
        // A buffer-count bound: keep at most one besides the started one.
        q.push_shared(Bytes::from_static(b"ff"), 1).unwrap();
        q.push_shared(Bytes::from_static(b"gg"), 1).unwrap();
        assert_eq!(q.drop_oldest(0, 2).records, 1);
        assert_eq!(q.records(), 2);
    }

    proptest::proptest! {
        /// Any mix of copies, shared buffers and partial writes comes out in order,
        /// and every block goes back to the pool once the queue is drained.
        #[test]
        fn queue_preserves_order(
            ops in proptest::collection::vec((proptest::prelude::any::<bool>(), 0usize..40), 1..60),
            write_sizes in proptest::collection::vec(1usize..50, 1..20),
        ) {
            let mut pool = BufferPool::new(16, 2);
            let mut q = SendQueue::new(10_000);
            let mut expected = Vec::new();
            let mut out = Vec::new();
            let mut counter = 0u8;
            for (i, (shared, len)) in ops.iter().enumerate() {
                let data: Vec<u8> = (0..*len).map(|_| { counter = counter.wrapping_add(1); counter }).collect();
                if *shared {
                    q.push_shared(Bytes::from(data.clone()), 1).unwrap();
                } else {
                    q.push_copy(&data, &mut pool).unwrap();
                }
                expected.extend_from_slice(&data);
                // Interleave partial writes with pushes.
                let w = write_sizes[i % write_sizes.len()].min(q.len());
                let mut iov = [IoSlice::new(&[]); MAX_IOV];
                // Gather at most a little more than is written (or all).
                let limit = if i % 2 == 0 { usize::MAX } else { w + i % 3 };
                let n = q.gather_at_most(&mut iov, limit);
                proptest::prop_assert!(iov[..n].iter().map(|s| s.len()).sum::<usize>() <= limit);
                let mut left = w;
                for s in &iov[..n] {
                    let take = s.len().min(left);
                    out.extend_from_slice(&s[..take]);
                    left -= take;
                }
                q.advance(w - left, &mut pool);
            }
            out.extend(drain(&mut q, &mut pool));
            q.release(&mut pool);
            proptest::prop_assert_eq!(out, expected);
            proptest::prop_assert_eq!(pool.lent, 0);
        }
    }
}
