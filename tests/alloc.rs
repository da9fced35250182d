//! Allocation budget, measured with a counting global allocator: no allocation
//! per echoed message in steady state, and a small heap cost per idle connection.
//!
//! This is its own test binary because the allocator counts every thread of the
//! process, and it holds a single `#[test]`: with several, libtest would spawn
//! a test thread or print a result (both allocate) during another test's
//! counting window.

// A `#[global_allocator]` must be an `unsafe impl GlobalAlloc`. The crate's lint
// table denies unsafe code (src/lib.rs and src/main.rs forbid it outright); this
// test binary needs it for the wrapper below, which only forwards to `System`.
#![allow(unsafe_code)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly"
)]

mod util;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use util::{TestEngine, brief, connect, wait_for};

/// Counts allocations (including reallocations) and live heap bytes.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged, so `System`'s guarantees carry over; the counters are atomics and
// do not allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        LIVE_BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        LIVE_BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        LIVE_BYTES.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.load(Ordering::SeqCst)
}

fn live_bytes() -> i64 {
    LIVE_BYTES.load(Ordering::SeqCst)
}

/// Send `msg` and read it back into `back`, `rounds` times, with no allocation
/// on the client side (std's blocking `write_all`/`read_exact` allocate nothing).
fn round_trips(s: &mut TcpStream, msg: &[u8], back: &mut [u8], rounds: usize) {
    for _ in 0..rounds {
        s.write_all(msg).unwrap();
        s.read_exact(back).unwrap();
    }
}

fn steady_state_echo_allocates_nothing(msg_len: usize) {
    const WARM_UP: usize = 500;
    const ROUNDS: usize = 10_000;
    let engine = TestEngine::start("[[echo]]\nlisten = \"127.0.0.1:0\"\n");
    let mut s = connect(engine.addr());
    let msg: Vec<u8> = (0..msg_len).map(|i| (i * 31 % 251) as u8).collect();
    let mut back = vec![0u8; msg_len];
    round_trips(&mut s, &msg, &mut back, WARM_UP);
    assert_eq!(back, msg);

    let before = allocations();
    let t0 = std::time::Instant::now();
    round_trips(&mut s, &msg, &mut back, ROUNDS);
    let elapsed = t0.elapsed();
    let during = allocations() - before;

    assert_eq!(back, msg);
    eprintln!(
        "{ROUNDS} round trips of {msg_len} bytes in {elapsed:.2?}: {during} allocations (all threads)"
    );
    assert_eq!(
        during, 0,
        "{during} allocations during {ROUNDS} echoed {msg_len}-byte messages"
    );
    drop(s);
    let h = &engine.handle;
    wait_for(
        "the connection to close",
        Duration::from_secs(5),
        || h.connections() == 0,
        || brief(&h.stats()),
    );
    engine.stop();
}

/// The only test in this binary (see the module documentation).
#[test]
fn allocation_budget() {
    steady_state_echo_allocates_nothing(64);
    steady_state_echo_allocates_nothing(16 * 1024);
    an_idle_connection_costs_at_most_1k_of_heap();
    let one = broadcast_allocations_per_record(1);
    let many = broadcast_allocations_per_record(50);
    eprintln!("broadcast: {one:.2} allocations per record with 1 subscriber, {many:.2} with 50");
    assert!(
        many <= one + 0.05,
        "allocations per published record grew with the subscribers: {one:.2} (1) vs {many:.2} (50)"
    );
    assert!(one <= 3.0, "{one:.2} allocations per published record");
}

/// Publish records one at a time to `subscribers` readers (lock-step, so every
/// queue drains between records) and return the allocations per record, all
/// threads included, after a warm-up.
fn broadcast_allocations_per_record(subscribers: usize) -> f64 {
    const WARM_UP: usize = 200;
    const RECORDS: usize = 2_000;
    let engine =
        TestEngine::start("[[broadcast]]\nlisten = \"127.0.0.1:0\"\ningest = \"127.0.0.1:0\"\n");
    let (sub_addr, ingest_addr) = (engine.addrs[0], engine.addrs[1]);
    let mut subs: Vec<TcpStream> = (0..subscribers).map(|_| connect(sub_addr)).collect();
    let h = &engine.handle;
    wait_for(
        "the subscribers to be accepted",
        Duration::from_secs(10),
        || h.connections() == subscribers as u64,
        || brief(&h.stats()),
    );
    let mut publisher = connect(ingest_addr);
    let record = *b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde\n";
    let mut back = [0u8; 64];
    let mut lock_step = |n: usize, subs: &mut [TcpStream], back: &mut [u8; 64]| {
        for _ in 0..n {
            publisher.write_all(&record).unwrap();
            for s in subs.iter_mut() {
                s.read_exact(back).unwrap();
            }
        }
    };
    lock_step(WARM_UP, &mut subs, &mut back);
    assert_eq!(back, record);
    let before = allocations();
    lock_step(RECORDS, &mut subs, &mut back);
    let during = allocations() - before;
    assert_eq!(back, record);
    drop(publisher);
    drop(subs);
    wait_for(
        "the connections to close",
        Duration::from_secs(10),
        || h.connections() == 0,
        || brief(&h.stats()),
    );
    engine.stop();
    during as f64 / RECORDS as f64
}

fn an_idle_connection_costs_at_most_1k_of_heap() {
    const IDLE: usize = 2_000;
    const BUDGET_PER_CONNECTION: i64 = 1024;
    let mut clients: Vec<TcpStream> = Vec::with_capacity(IDLE);
    // Conservative: the baseline is taken before the engine exists, so its
    // fixed set-up (event list, pool table, slab and timer tables sized for
    // the first 1024 connections, the thread) is charged to the connections.
    let before = live_bytes();
    let engine = TestEngine::start("[[echo]]\nlisten = \"127.0.0.1:0\"\n");
    let addr = engine.addr();
    let h = &engine.handle;
    let t0 = std::time::Instant::now();
    let mut at_half = 0;
    for i in 0..IDLE {
        clients.push(connect(addr));
        // Keep the listen backlog (1024) from overflowing if the engine thread
        // is descheduled: a dropped SYN costs a one-second retransmit.
        if (i + 1) % 500 == 0 {
            wait_for(
                "the engine to accept the batch",
                Duration::from_secs(20),
                || h.connections() == i as u64 + 1,
                || brief(&h.stats()),
            );
            // Let the engine handle the new connections' first (writable) events.
            std::thread::sleep(Duration::from_millis(100));
        }
        if i + 1 == IDLE / 2 {
            at_half = live_bytes();
        }
    }
    let after = live_bytes();
    let per = (after - before) / IDLE as i64;
    // Marginal: the second thousand, which also pays for growing the slab.
    let marginal = (after - at_half) / (IDLE - IDLE / 2) as i64;
    eprintln!(
        "{IDLE} idle connections (opened in {:.2?}): {} heap bytes in all, engine set-up \
         included ({per} per connection); the second half cost {marginal} per connection",
        t0.elapsed(),
        after - before,
    );
    assert_eq!(h.stats().buffers_lent, 0, "idle connections hold buffers");
    assert!(
        per <= BUDGET_PER_CONNECTION && marginal <= BUDGET_PER_CONNECTION,
        "{per} heap bytes per idle connection ({marginal} marginal), budget {BUDGET_PER_CONNECTION}"
    );

    // Reset rather than close: 2,000 client sockets in TIME_WAIT would slow
    // down later connects (the kernel searches the ephemeral ports).
    for c in clients {
        socket2::Socket::from(c)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
    }
    wait_for(
        "every connection to close",
        Duration::from_secs(20),
        || h.connections() == 0,
        || brief(&h.stats()),
    );
    engine.stop();
}
