//! The broadcast role end to end (issue 3, item 6): an in-process engine on
//! loopback driven with std sockets, plus stdin ingest through the binary.
//!
//! Records are lines of 50 to 100 bytes, `<tag><seq:010> <filler>\n`, whose
//! length and filler are functions of the sequence number, so a reader can
//! check every line it gets for content, completeness and order without
//! sharing state with the writer.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly"
)]

mod util;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use bytes::Bytes;
use switchboard::role::Broadcast;
use switchboard::role::broadcast::{BroadcastStats, publish};
use switchboard::{Config, HandleError, RoleId};

use util::{
    Captured, ChildGuard, IO_TIMEOUT, Pattern, TestEngine, bin, brief, connect,
    connect_with_recv_buffer, free_port, is_timeout, kernel_send_buffer_max, send_signal,
    target_command, temp_file, wait_for,
};

/// Bound on waiting for a counter or a log line.
const WAIT: Duration = Duration::from_secs(10);

// ----- records -----

/// Tag, ten digits, a space.
const HEAD: usize = 12;
const FILLER: [u8; 130] = {
    let mut a = [0u8; 130];
    let mut i = 0;
    while i < a.len() {
        a[i] = b'a' + (i % 26) as u8;
        i += 1;
    }
    a
};

/// Length of record `seq`, newline included: 50 to 100 bytes.
fn record_len(seq: u64) -> usize {
    50 + (seq.wrapping_mul(7919) % 51) as usize
}

fn push_record(out: &mut Vec<u8>, tag: u8, seq: u64) {
    let len = record_len(seq);
    out.push(tag);
    write!(out, "{seq:010} ").unwrap();
    let off = (seq % 26) as usize;
    out.extend_from_slice(&FILLER[off..off + len - HEAD - 1]);
    out.push(b'\n');
}

fn record(tag: u8, seq: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(100);
    push_record(&mut v, tag, seq);
    v
}

fn records(tag: u8, seqs: std::ops::Range<u64>) -> Vec<u8> {
    let mut v = Vec::with_capacity((seqs.end - seqs.start) as usize * 76);
    for seq in seqs {
        push_record(&mut v, tag, seq);
    }
    v
}

/// Check that `line` (newline included) is a whole, valid record; returns its
/// tag and sequence number.
fn parse_record(line: &[u8]) -> Result<(u8, u64), String> {
    let bad = |why: String| {
        let shown = &line[..line.len().min(120)];
        format!("{why}: {:?}", String::from_utf8_lossy(shown))
    };
    if line.len() < HEAD + 2 {
        return Err(bad(format!("line of {} bytes is too short", line.len())));
    }
    let digits = &line[1..11];
    if !digits.iter().all(u8::is_ascii_digit) || line[11] != b' ' {
        return Err(bad("bad record header".to_owned()));
    }
    let seq = digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    let len = record_len(seq);
    let off = (seq % 26) as usize;
    if line.len() != len
        || line[len - 1] != b'\n'
        || line[HEAD..len - 1] != FILLER[off..off + len - HEAD - 1]
    {
        return Err(bad(format!(
            "not record {seq} ({} bytes, want {len})",
            line.len()
        )));
    }
    Ok((line[0], seq))
}

/// Splits a byte stream into lines (newline included), across reads.
#[derive(Default)]
struct Lines {
    pending: Vec<u8>,
}

impl Lines {
    fn feed(
        &mut self,
        mut data: &[u8],
        mut f: impl FnMut(&[u8]) -> Result<(), String>,
    ) -> Result<(), String> {
        if !self.pending.is_empty() {
            let Some(nl) = data.iter().position(|&b| b == b'\n') else {
                self.pending.extend_from_slice(data);
                return Ok(());
            };
            self.pending.extend_from_slice(&data[..=nl]);
            f(&self.pending)?;
            self.pending.clear();
            data = &data[nl + 1..];
        }
        while let Some(nl) = data.iter().position(|&b| b == b'\n') {
            f(&data[..=nl])?;
            data = &data[nl + 1..];
        }
        self.pending.extend_from_slice(data);
        Ok(())
    }
}

/// Write `data` in pieces of 1 to `max_piece` bytes (a fixed pseudo-random
/// sequence from `seed`), so records are split at arbitrary points.
fn write_in_pieces(s: &mut TcpStream, data: &[u8], max_piece: usize, seed: u64) {
    let mut x = seed | 1;
    let mut rest = data;
    while !rest.is_empty() {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let n = ((x >> 33) as usize % max_piece + 1).min(rest.len());
        s.write_all(&rest[..n]).unwrap();
        rest = &rest[n..];
    }
}

// ----- subscribers -----

/// A subscriber that expects consecutive records with one tag.
struct Sub {
    s: TcpStream,
    lines: Lines,
    tag: u8,
    next: u64,
    buf: Vec<u8>,
}

impl Sub {
    fn connect(addr: SocketAddr, tag: u8) -> Sub {
        Sub::from_stream(connect(addr), tag)
    }

    fn from_stream(s: TcpStream, tag: u8) -> Sub {
        Sub {
            s,
            lines: Lines::default(),
            tag,
            next: 0,
            buf: vec![0; 64 * 1024],
        }
    }

    /// Read records `self.next..to`, whole and in order, and nothing else;
    /// `progress` follows `self.next`. Returns when the last one arrived.
    fn read_until(&mut self, to: u64, progress: Option<&AtomicU64>) -> Result<Instant, String> {
        self.read_records(to, Some(to), progress)
    }

    /// Read on from `self.next`, whole records in order, until at least
    /// record `to - 1` arrived; later ones may follow in the same read.
    fn read_at_least(&mut self, to: u64) -> Result<(), String> {
        self.read_records(to, None, None).map(drop)
    }

    fn read_records(
        &mut self,
        to: u64,
        limit: Option<u64>,
        progress: Option<&AtomicU64>,
    ) -> Result<Instant, String> {
        let limit = limit.unwrap_or(u64::MAX);
        while self.next < to {
            let n = match self.s.read(&mut self.buf) {
                Ok(0) => return Err(format!("EOF while expecting record {}", self.next)),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("read failed expecting record {}: {e}", self.next)),
            };
            let (tag, next) = (self.tag, &mut self.next);
            self.lines.feed(&self.buf[..n], |line| {
                let (t, seq) = parse_record(line)?;
                if t != tag || seq != *next || seq >= limit {
                    return Err(format!(
                        "got record {}{seq}, expected {}{} (up to {to})",
                        t as char, tag as char, *next
                    ));
                }
                *next += 1;
                Ok(())
            })?;
            if let Some(p) = progress {
                p.store(self.next, Ordering::Relaxed);
            }
        }
        if limit == to && !self.lines.pending.is_empty() {
            return Err(format!(
                "{} bytes after record {to}",
                self.lines.pending.len()
            ));
        }
        Ok(Instant::now())
    }

    /// Nothing more arrives within `quiet`.
    fn expect_quiet(&mut self, quiet: Duration) {
        self.s.set_read_timeout(Some(quiet)).unwrap();
        match self.s.read(&mut self.buf) {
            Err(e) if is_timeout(&e) => {}
            Ok(n) => panic!(
                "unexpected bytes: {:?}",
                String::from_utf8_lossy(&self.buf[..n])
            ),
            Err(e) => panic!("read failed: {e}"),
        }
        self.s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    }
}

/// Read on each subscriber in its own thread until record `to`.
fn spawn_readers(
    subs: Vec<Sub>,
    to: u64,
    progress: Option<Arc<Vec<AtomicU64>>>,
) -> Vec<JoinHandle<Result<(Sub, Instant), String>>> {
    subs.into_iter()
        .enumerate()
        .map(|(i, mut sub)| {
            let progress = progress.clone();
            thread::spawn(move || {
                let at = sub.read_until(to, progress.as_ref().map(|p| &p[i]))?;
                Ok((sub, at))
            })
        })
        .collect()
}

/// Join reader threads; fails the test with every reader's error.
fn join_readers(readers: Vec<JoinHandle<Result<(Sub, Instant), String>>>) -> Vec<(Sub, Instant)> {
    let mut ok = Vec::new();
    let mut errors = Vec::new();
    for (i, r) in readers.into_iter().enumerate() {
        match r.join() {
            Ok(Ok(x)) => ok.push(x),
            Ok(Err(e)) => errors.push(format!("subscriber {i}: {e}")),
            Err(_) => errors.push(format!("subscriber {i}: reader panicked")),
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    ok
}

/// Read exactly `want.len()` bytes and compare.
fn expect_bytes(s: &mut TcpStream, want: &[u8]) {
    let mut got = vec![0u8; want.len()];
    s.read_exact(&mut got)
        .unwrap_or_else(|e| panic!("expecting {:?}: {e}", String::from_utf8_lossy(want)));
    assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(want));
}

/// The engine closed `s`: EOF (or a reset) comes within the read timeout.
fn expect_closed(s: &mut TcpStream) {
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => panic!(
                "expected the connection to be closed, read {:?}",
                String::from_utf8_lossy(&buf[..n])
            ),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("expected the connection to be closed: {e}"),
        }
    }
}

// ----- the engine -----

/// An engine running one broadcast role whose counters the test keeps.
struct Bc {
    engine: TestEngine,
    stats: Arc<BroadcastStats>,
    role: RoleId,
}

impl Bc {
    /// A broadcast on loopback port 0 (subscribers, then TCP ingest) with
    /// `keys` added to its table.
    fn start(keys: &str) -> Bc {
        Bc::start_toml(&format!(
            "[[broadcast]]\nlisten = \"127.0.0.1:0\"\ningest = \"127.0.0.1:0\"\n{keys}\n"
        ))
    }

    fn start_toml(toml: &str) -> Bc {
        let cfg = Config::parse(toml).unwrap_or_else(|e| panic!("bad test config: {e}"));
        let b = Broadcast::new(&cfg.broadcast[0]);
        let stats = b.stats();
        let (engine, ids) = TestEngine::with_roles(cfg.engine.clone(), vec![Box::new(b)]);
        Bc {
            engine,
            stats,
            role: ids[0],
        }
    }

    fn subs(&self) -> SocketAddr {
        self.engine.addrs[0]
    }

    fn ingest(&self) -> SocketAddr {
        self.engine.addrs[1]
    }

    /// Wait for the counter `which` to reach exactly `want`.
    fn wait(&self, what: &str, which: impl Fn(&BroadcastStats) -> &AtomicU64, want: u64) {
        wait_for(
            &format!("{what} == {want}"),
            WAIT,
            || which(&self.stats).load(Ordering::Relaxed) == want,
            || (&self.stats, brief(&self.engine.stats())),
        );
    }

    fn get(&self, which: impl Fn(&BroadcastStats) -> &AtomicU64) -> u64 {
        which(&self.stats).load(Ordering::Relaxed)
    }

    /// Connect `n` subscribers and wait until the role has all of them.
    fn subscribe(&self, n: usize, tag: u8) -> Vec<Sub> {
        let before = self.get(|s| &s.subscribers);
        let subs = (0..n).map(|_| Sub::connect(self.subs(), tag)).collect();
        self.wait("subscribers", |s| &s.subscribers, before + n as u64);
        subs
    }

    fn stop(self) {
        self.engine.stop();
    }
}

// ----- 1. fan-out at scale -----

#[test]
fn hundred_subscribers_get_every_record_byte_exact_in_order() {
    const SUBS: usize = 100;
    const RECORDS: u64 = 100_000;
    /// The publisher stays at most this many records ahead of the slowest
    /// reader, so a reader thread that the scheduler starves is not taken
    /// for a frozen console and disconnected.
    const WINDOW: u64 = 5_000;
    const BATCH: u64 = 1_000;
    let bc = Bc::start("");
    let subs = bc.subscribe(SUBS, b'A');
    let progress: Arc<Vec<AtomicU64>> = Arc::new((0..SUBS).map(|_| AtomicU64::new(0)).collect());
    let t0 = Instant::now();
    let readers = spawn_readers(subs, RECORDS, Some(Arc::clone(&progress)));
    let mut publisher = connect(bc.ingest());
    let slowest = || progress.iter().map(|p| p.load(Ordering::Relaxed)).min();
    let mut batch = Vec::new();
    // A reader that stopped (on an error) ends publishing: joining the
    // readers then reports what went wrong.
    let failed = || readers.iter().any(|r| r.is_finished());
    for start in (0..RECORDS).step_by(BATCH as usize) {
        wait_for(
            "the slowest reader to catch up",
            Duration::from_secs(30),
            || failed() || slowest().unwrap_or(0) + WINDOW >= start,
            || (slowest(), &bc.stats),
        );
        if failed() {
            break;
        }
        batch.clear();
        for seq in start..(start + BATCH).min(RECORDS) {
            push_record(&mut batch, b'A', seq);
        }
        publisher.write_all(&batch).unwrap();
    }
    let published = t0.elapsed();
    let done = join_readers(readers);
    let elapsed = t0.elapsed();
    let bytes: usize = (0..RECORDS).map(record_len).sum();
    eprintln!(
        "{SUBS} subscribers x {RECORDS} records ({bytes} bytes each): published in {published:?}, \
         all delivered in {elapsed:?} ({:.0} records/s delivered)",
        (SUBS as u64 * RECORDS) as f64 / elapsed.as_secs_f64()
    );
    assert_eq!(done.len(), SUBS);
    assert_eq!(bc.get(|s| &s.records_in), RECORDS);
    assert_eq!(bc.get(|s| &s.deliveries), RECORDS * SUBS as u64);
    assert_eq!(bc.get(|s| &s.slow_disconnects), 0);
    assert_eq!(bc.get(|s| &s.dropped_records), 0);
    drop(done);
    drop(publisher);
    bc.stop();
}

// ----- 2. a frozen subscriber -----

/// Publish `seqs` as fast as TCP takes them while `subs` read; returns the
/// subscribers and how long after the last byte was written the last
/// record reached the last of them.
fn publish_phase(
    publisher: &mut TcpStream,
    subs: Vec<Sub>,
    seqs: std::ops::Range<u64>,
) -> (Vec<Sub>, Duration) {
    let data = records(b'A', seqs.clone());
    let readers = spawn_readers(subs, seqs.end, None);
    publisher.write_all(&data).unwrap();
    let written = Instant::now();
    let done = join_readers(readers);
    let last = done.iter().map(|(_, at)| *at).max().unwrap();
    let lag = last.saturating_duration_since(written);
    (done.into_iter().map(|(s, _)| s).collect(), lag)
}

/// Ten readers at full speed and one subscriber that never reads (a 4 KiB
/// receive buffer) under policy `slow`. Returns the engine, the frozen
/// socket, the ten readers, and the sequence range published while the
/// frozen one was subscribed.
fn frozen_subscriber(slow: &str) -> (Bc, TcpStream, Vec<Sub>, std::ops::Range<u64>) {
    let bc = Bc::start(&format!(
        "slow = \"{slow}\"\nmax_record = 1024\nqueue_bytes = 65536\nqueue_records = 1000\n"
    ));
    // Enough to overflow the frozen subscriber's kernel buffers (the
    // engine's send buffer can grow to tcp_wmem max) and its queue, twice.
    let n = (2 * kernel_send_buffer_max() + 1_000_000) / 75;
    let mut publisher = connect(bc.ingest());
    let fast = bc.subscribe(10, b'A');

    // The same load without, then with, the frozen subscriber.
    let (fast, lag_alone) = publish_phase(&mut publisher, fast, 0..n);
    let frozen = connect_with_recv_buffer(bc.subs(), 4096);
    bc.wait("subscribers", |s| &s.subscribers, 11);
    let (fast, lag_frozen) = publish_phase(&mut publisher, fast, n..2 * n);
    eprintln!(
        "slow = {slow}: {n} records to 10 readers: last record {lag_alone:?} after it was \
         written alone, {lag_frozen:?} with a frozen subscriber"
    );
    assert!(
        lag_frozen <= lag_alone * 3 + Duration::from_millis(500),
        "the frozen subscriber delayed the others: {lag_frozen:?} vs {lag_alone:?} alone"
    );
    drop(publisher);
    (bc, frozen, fast, n..2 * n)
}

#[test]
fn frozen_subscriber_is_disconnected_and_others_get_everything() {
    let (bc, mut frozen, fast, seqs) = frozen_subscriber("disconnect");
    bc.wait("slow_disconnects", |s| &s.slow_disconnects, 1);
    assert_eq!(bc.get(|s| &s.subscribers), 10);
    assert_eq!(bc.get(|s| &s.dropped_records), 0);
    // What reached its kernel buffers before it was cut off comes first,
    // in order from the first record published after it joined; then EOF.
    let mut lines = Lines::default();
    let mut next = seqs.start;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match frozen.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("frozen subscriber: read failed after record {next}: {e}"),
        };
        lines
            .feed(&buf[..n], |line| {
                let (_, seq) = parse_record(line)?;
                if seq != next {
                    return Err(format!("got record {seq}, expected {next}"));
                }
                next += 1;
                Ok(())
            })
            .unwrap();
    }
    // The cut may fall inside a record the kernel had taken in part: the
    // stream then ends with that record's head, which a console discards
    // with the connection.
    eprintln!(
        "disconnected subscriber got {} records, then {} bytes of a cut record, then EOF",
        next - seqs.start,
        lines.pending.len()
    );
    assert!(next < seqs.end, "the frozen subscriber got everything");
    drop(fast);
    bc.wait("subscribers", |s| &s.subscribers, 0);
    bc.stop();
}

/// A frozen subscriber under a drop policy stays connected; once it reads,
/// it gets whole records in order with gaps, and every record published
/// while it was subscribed was either delivered to it or counted as dropped.
fn frozen_subscriber_drops(slow: &str) {
    let (bc, mut frozen, fast, seqs) = frozen_subscriber(slow);
    assert_eq!(bc.get(|s| &s.slow_disconnects), 0);
    let dropped = bc.get(|s| &s.dropped_records);
    assert!(dropped > 0, "nothing dropped: {:?}", bc.stats);
    assert_eq!(bc.get(|s| &s.subscribers), 11);
    drop(fast);
    bc.wait("subscribers", |s| &s.subscribers, 1);

    let mut lines = Lines::default();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut feed = |data: &[u8], got: &mut Vec<u64>| {
        lines
            .feed(data, |line| {
                let (_, seq) = parse_record(line)?;
                if got.last().is_some_and(|&last| seq <= last) {
                    return Err(format!("record {seq} after {:?}", got.last()));
                }
                got.push(seq);
                Ok(())
            })
            .unwrap();
    };
    // Drain until quiet: then its queue is empty.
    frozen
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let drain_deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match frozen.read(&mut buf) {
            Ok(0) => panic!("the frozen subscriber was disconnected under {slow}"),
            Ok(n) => feed(&buf[..n], &mut got),
            Err(e) if is_timeout(&e) => break,
            Err(e) => panic!("frozen subscriber: read failed: {e}"),
        }
        assert!(Instant::now() < drain_deadline, "never went quiet");
    }
    // One more record now reaches it at once, after everything queued.
    frozen.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut publisher = connect(bc.ingest());
    publisher.write_all(&record(b'A', seqs.end)).unwrap();
    while got.last() != Some(&seqs.end) {
        match frozen.read(&mut buf) {
            Ok(0) => panic!("EOF waiting for the last record"),
            Ok(n) => feed(&buf[..n], &mut got),
            Err(e) => panic!("waiting for the last record: {e}"),
        }
    }
    let dropped = bc.get(|s| &s.dropped_records);
    eprintln!(
        "slow = {slow}: frozen subscriber got {} of {} records, {dropped} dropped",
        got.len(),
        seqs.end - seqs.start + 1
    );
    assert!(got.iter().all(|s| seqs.contains(s) || *s == seqs.end));
    assert!(got.len() as u64 <= seqs.end - seqs.start, "no gaps: {slow}");
    // Which records went: the newest one before the marker arrived when the
    // queue was full, so drop-newest lost it and drop-oldest kept it.
    let newest_kept = got.contains(&(seqs.end - 1));
    assert_eq!(newest_kept, slow == "drop-oldest", "{slow}");
    assert_eq!(
        got.len() as u64 + dropped,
        seqs.end - seqs.start + 1,
        "every record is either delivered or counted as dropped"
    );
    assert_eq!(bc.get(|s| &s.slow_disconnects), 0);
    drop(frozen);
    bc.stop();
}

#[test]
fn frozen_subscriber_under_drop_newest_gets_whole_records_with_gaps() {
    frozen_subscriber_drops("drop-newest");
}

#[test]
fn frozen_subscriber_under_drop_oldest_gets_whole_records_with_gaps() {
    frozen_subscriber_drops("drop-oldest");
}

// ----- 3. late joiners and replay -----

#[test]
fn late_joiners_start_exactly_at_a_record_boundary() {
    let bc = Bc::start("");
    let stop = Arc::new(AtomicBool::new(false));
    let mut publisher = connect(bc.ingest());
    let writer = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            // Small pieces with pauses: the engine often holds half a record
            // when a subscriber joins.
            let mut seq = 0;
            while !stop.load(Ordering::Relaxed) && seq < 1_000_000 {
                let batch = records(b'A', seq..seq + 20);
                write_in_pieces(&mut publisher, &batch, 37, seq);
                seq += 20;
                thread::sleep(Duration::from_micros(300));
            }
            seq
        })
    };
    for j in 0..20 {
        thread::sleep(Duration::from_millis(j % 7));
        let mut sub = Sub::connect(bc.subs(), b'A');
        // The very first byte must start a record.
        let mut first = [0u8; 1];
        sub.s.read_exact(&mut first).unwrap();
        assert_eq!(first[0], b'A', "joiner {j} started mid-record");
        let mut head = [0u8; HEAD - 1];
        sub.s.read_exact(&mut head).unwrap();
        let mut line = vec![b'A'];
        line.extend_from_slice(&head);
        let seq: u64 = std::str::from_utf8(&head[..10])
            .ok()
            .and_then(|d| d.parse().ok())
            .unwrap_or_else(|| panic!("joiner {j}: bad first record {line:?}"));
        let mut rest = vec![0u8; record_len(seq) - HEAD];
        sub.s.read_exact(&mut rest).unwrap();
        line.extend_from_slice(&rest);
        assert_eq!(
            parse_record(&line),
            Ok((b'A', seq)),
            "joiner {j}: first record"
        );
        // Then consecutive records.
        sub.next = seq + 1;
        sub.read_at_least(seq + 200)
            .unwrap_or_else(|e| panic!("joiner {j}: {e}"));
    }
    stop.store(true, Ordering::Relaxed);
    let published = writer.join().unwrap();
    eprintln!("20 late joiners while {published} records were published");
    assert_eq!(bc.get(|s| &s.slow_disconnects), 0);
    bc.stop();
}

#[test]
fn replay_sends_exactly_the_last_k_records_first() {
    const K: u64 = 50;
    let bc = Bc::start(&format!("replay = {K}"));
    let mut publisher = connect(bc.ingest());
    // Fewer than K published: a joiner gets all of them.
    publisher.write_all(&records(b'A', 0..20)).unwrap();
    bc.wait("records_in", |s| &s.records_in, 20);
    let mut early = bc.subscribe(1, b'A').pop().unwrap();
    early.read_until(20, None).unwrap();

    // More than K: a joiner gets exactly the last K, then live records.
    publisher.write_all(&records(b'A', 20..120)).unwrap();
    bc.wait("records_in", |s| &s.records_in, 120);
    early.read_until(120, None).unwrap();
    let mut late = bc.subscribe(1, b'A').pop().unwrap();
    late.next = 120 - K;
    late.read_until(120, None).unwrap();
    late.expect_quiet(Duration::from_millis(100));
    publisher.write_all(&records(b'A', 120..150)).unwrap();
    late.read_until(150, None).unwrap();
    early.read_until(150, None).unwrap();
    late.expect_quiet(Duration::from_millis(100));
    assert_eq!(bc.get(|s| &s.deliveries), 150 + (K + 30));
    bc.stop();
}

// ----- 4. refusals -----

#[test]
fn allow_list_refuses_other_addresses_and_accepts_listed_ones() {
    let bc = Bc::start("allow = [\"10.0.0.0/8\"]");
    let mut sub = connect(bc.subs());
    expect_closed(&mut sub);
    bc.wait("refused", |s| &s.refused, 1);
    // Publishers too.
    let mut publisher = connect(bc.ingest());
    expect_closed(&mut publisher);
    bc.wait("refused", |s| &s.refused, 2);
    assert_eq!(bc.get(|s| &s.subscribers), 0);
    wait_for(
        "refused connections to be gone",
        WAIT,
        || bc.engine.handle.connections() == 0,
        || brief(&bc.engine.stats()),
    );
    bc.stop();

    let bc = Bc::start("allow = [\"192.168.0.0/16\", \"127.0.0.0/8\"]");
    let mut sub = bc.subscribe(1, b'A').pop().unwrap();
    let mut publisher = connect(bc.ingest());
    publisher.write_all(&record(b'A', 0)).unwrap();
    sub.read_until(1, None).unwrap();
    assert_eq!(bc.get(|s| &s.refused), 0);
    bc.stop();
}

#[test]
fn allow_list_over_ipv6() {
    if let Err(e) = std::net::TcpListener::bind("[::1]:0") {
        eprintln!("skipping: cannot bind [::1]:0 ({e})");
        return;
    }
    let toml = |allow: &str| format!("[[broadcast]]\nlisten = \"[::1]:0\"\nallow = [{allow}]\n");
    let bc = Bc::start_toml(&toml("\"::1/128\""));
    assert!(bc.subs().is_ipv6());
    let mut sub = bc.subscribe(1, b'A').pop().unwrap();
    publish(&bc.engine.handle, bc.role, Bytes::from(record(b'A', 0))).unwrap();
    sub.read_until(1, None).unwrap();
    assert_eq!(bc.get(|s| &s.refused), 0);
    bc.stop();

    let bc = Bc::start_toml(&toml("\"127.0.0.0/8\", \"fe80::/10\""));
    let mut sub = connect(bc.subs());
    expect_closed(&mut sub);
    bc.wait("refused", |s| &s.refused, 1);
    assert_eq!(bc.get(|s| &s.subscribers), 0);
    bc.stop();
}

#[test]
fn max_subscribers_refuses_the_next_one_until_a_slot_frees() {
    let bc = Bc::start("max_subscribers = 3");
    let mut subs = bc.subscribe(3, b'A');
    let mut extra = connect(bc.subs());
    expect_closed(&mut extra);
    bc.wait("refused", |s| &s.refused, 1);
    assert_eq!(bc.get(|s| &s.subscribers), 3);
    let mut publisher = connect(bc.ingest());
    publisher.write_all(&record(b'A', 0)).unwrap();
    for sub in &mut subs {
        sub.read_until(1, None).unwrap();
    }
    // A slot frees: the next one is accepted and gets the next record.
    drop(subs.pop());
    bc.wait("subscribers", |s| &s.subscribers, 2);
    let mut again = bc.subscribe(1, b'A').pop().unwrap();
    again.next = 1;
    publisher.write_all(&record(b'A', 1)).unwrap();
    again.read_until(2, None).unwrap();
    for sub in &mut subs {
        sub.read_until(2, None).unwrap();
    }
    assert_eq!(bc.get(|s| &s.refused), 1);
    bc.stop();
}

// ----- 5. two publishers -----

#[test]
fn two_publishers_interleave_only_at_record_boundaries() {
    const N: u64 = 3_000;
    let bc = Bc::start("");
    let subs = bc.subscribe(3, b'A');
    let start = Arc::new(Barrier::new(2));
    let publishers: Vec<_> = [b'A', b'B']
        .into_iter()
        .map(|tag| {
            let mut p = connect(bc.ingest());
            let start = Arc::clone(&start);
            thread::spawn(move || {
                let data = records(tag, 0..N);
                start.wait();
                write_in_pieces(&mut p, &data, 41, u64::from(tag));
                p
            })
        })
        .collect();
    let readers: Vec<_> = subs
        .into_iter()
        .map(|mut sub| {
            thread::spawn(move || -> Result<u64, String> {
                let mut next = [0u64; 2];
                let mut switches = 0;
                let mut last_tag = 0;
                let mut buf = vec![0u8; 64 * 1024];
                while next != [N, N] {
                    let n = match sub.s.read(&mut buf) {
                        Ok(0) => return Err(format!("EOF at {next:?}")),
                        Ok(n) => n,
                        Err(e) => return Err(format!("read failed at {next:?}: {e}")),
                    };
                    sub.lines.feed(&buf[..n], |line| {
                        let (tag, seq) = parse_record(line)?;
                        let i = match tag {
                            b'A' => 0,
                            b'B' => 1,
                            _ => return Err(format!("unknown tag in {line:?}")),
                        };
                        if seq != next[i] {
                            let want = next[i];
                            return Err(format!("{}{seq} where {want} was due", tag as char));
                        }
                        next[i] += 1;
                        if tag != last_tag {
                            switches += 1;
                            last_tag = tag;
                        }
                        Ok(())
                    })?;
                }
                Ok(switches)
            })
        })
        .collect();
    let publishers: Vec<TcpStream> = publishers.into_iter().map(|p| p.join().unwrap()).collect();
    for (i, r) in readers.into_iter().enumerate() {
        let switches = r
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("subscriber {i}: {e}"));
        eprintln!("subscriber {i}: the stream switched publisher {switches} times");
        assert!(switches >= 2, "the publishers never interleaved");
    }
    assert_eq!(bc.get(|s| &s.records_in), 2 * N);
    drop(publishers);
    bc.stop();
}

// ----- 6. oversized records -----

#[test]
fn oversized_line_is_dropped_and_the_next_line_delivered() {
    let bc = Bc::start("max_record = 64");
    let mut sub = bc.subscribe(1, b'A').pop().unwrap().s;
    let mut publisher = connect(bc.ingest());
    let line = |c: u8, len: usize| {
        let mut v = vec![c; len - 1];
        v.push(b'\n');
        v
    };
    // Exactly max_record (terminator included) passes; 200 bytes do not.
    let mut burst = line(b'a', 64);
    burst.extend_from_slice(&line(b'x', 200));
    burst.extend_from_slice(b"after\n");
    publisher.write_all(&burst).unwrap();
    expect_bytes(&mut sub, &line(b'a', 64));
    expect_bytes(&mut sub, b"after\n");
    bc.wait("oversized", |s| &s.oversized, 1);

    // An oversized line split across reads is counted once and skipped whole.
    let before = bc.engine.stats().bytes_in_total;
    let long = line(b'y', 200);
    publisher.write_all(&long[..100]).unwrap();
    wait_for(
        "the engine to read the first half",
        WAIT,
        || bc.engine.stats().bytes_in_total >= before + 100,
        || brief(&bc.engine.stats()),
    );
    thread::sleep(Duration::from_millis(20));
    publisher.write_all(&long[100..]).unwrap();
    // One byte over the limit.
    publisher.write_all(&line(b'z', 65)).unwrap();
    publisher.write_all(b"still here\n").unwrap();
    expect_bytes(&mut sub, b"still here\n");
    bc.wait("oversized", |s| &s.oversized, 3);
    assert_eq!(bc.get(|s| &s.records_in), 3);
    let mut sub = Sub::from_stream(sub, b'A');
    sub.expect_quiet(Duration::from_millis(100));
    bc.stop();
}

/// A u16 frame of `payload`.
fn u16_frame(payload: &[u8]) -> Vec<u8> {
    let mut v = u16::try_from(payload.len()).unwrap().to_be_bytes().to_vec();
    v.extend_from_slice(payload);
    v
}

#[test]
fn oversized_length_prefix_closes_only_that_publisher() {
    let bc = Bc::start("framing = \"u16\"\nmax_record = 64");
    let mut sub = bc.subscribe(1, b'A').pop().unwrap().s;
    let mut a = connect(bc.ingest());
    let mut b = connect(bc.ingest());
    let a1 = u16_frame(&[b'a'; 64]);
    let b1 = u16_frame(b"b1");
    a.write_all(&a1).unwrap();
    bc.wait("records_in", |s| &s.records_in, 1);
    b.write_all(&b1).unwrap();
    bc.wait("records_in", |s| &s.records_in, 2);
    expect_bytes(&mut sub, &[a1, b1].concat());

    // 65 announced: publisher a is closed; nothing it sent after is used.
    let mut bad = 65u16.to_be_bytes().to_vec();
    bad.extend_from_slice(&[b'x'; 65]);
    bad.extend_from_slice(&u16_frame(b"a2"));
    a.write_all(&bad).unwrap();
    expect_closed(&mut a);
    bc.wait("oversized", |s| &s.oversized, 1);
    let b2 = u16_frame(b"b2");
    b.write_all(&b2).unwrap();
    expect_bytes(&mut sub, &b2);
    assert_eq!(bc.get(|s| &s.records_in), 3);
    let mut sub = Sub::from_stream(sub, b'A');
    sub.expect_quiet(Duration::from_millis(100));
    bc.stop();
}

// ----- 7. missing final newline, reset mid-record -----

#[test]
fn partial_line_is_discarded_without_flush_idle_and_on_reset() {
    let bc = Bc::start("");
    let mut sub = bc.subscribe(1, b'A').pop().unwrap().s;

    // A clean close after "abc": nothing is published, the partial counted.
    let mut p = connect(bc.ingest());
    p.write_all(b"abc").unwrap();
    p.shutdown(Shutdown::Write).unwrap();
    bc.wait("partial_discarded", |s| &s.partial_discarded, 1);
    expect_closed(&mut p);

    let mut good = connect(bc.ingest());
    good.write_all(b"ok\n").unwrap();
    expect_bytes(&mut sub, b"ok\n");

    // A reset after half a record: nothing from it, the partial counted.
    let before = bc.engine.stats().bytes_in_total;
    let reset = socket2::Socket::from(connect(bc.ingest()));
    reset.set_linger(Some(Duration::ZERO)).unwrap();
    let mut reset = TcpStream::from(reset);
    reset.write_all(b"half a rec").unwrap();
    wait_for(
        "the engine to read the partial record",
        WAIT,
        || bc.engine.stats().bytes_in_total >= before + 10,
        || brief(&bc.engine.stats()),
    );
    drop(reset);
    bc.wait("partial_discarded", |s| &s.partial_discarded, 2);
    good.write_all(b"fine\n").unwrap();
    expect_bytes(&mut sub, b"fine\n");
    assert_eq!(bc.get(|s| &s.records_in), 2);
    assert_eq!(bc.get(|s| &s.flushed_partial), 0);
    let mut sub = Sub::from_stream(sub, b'A');
    sub.expect_quiet(Duration::from_millis(100));
    bc.stop();
}

#[test]
fn flush_idle_publishes_a_silent_partial_line() {
    let bc = Bc::start("flush_idle = \"200ms\"");
    let mut sub = bc.subscribe(1, b'A').pop().unwrap().s;
    let mut p = connect(bc.ingest());
    let t0 = Instant::now();
    p.write_all(b"abc").unwrap();
    expect_bytes(&mut sub, b"abc");
    let after = t0.elapsed();
    eprintln!("silent partial line published after {after:?}");
    assert!(
        after >= Duration::from_millis(150),
        "published after {after:?}, before flush_idle"
    );
    assert!(after < Duration::from_secs(3), "published after {after:?}");
    assert_eq!(bc.get(|s| &s.flushed_partial), 1);
    // The publisher goes on; its next line starts afresh.
    p.write_all(b"def\n").unwrap();
    expect_bytes(&mut sub, b"def\n");
    assert_eq!(bc.get(|s| &s.records_in), 2);
    bc.stop();

    // A clean close completes the last line: published at once, long before
    // flush_idle would.
    let bc = Bc::start("flush_idle = \"30s\"");
    let mut sub = bc.subscribe(1, b'A').pop().unwrap().s;
    let mut p = connect(bc.ingest());
    let t0 = Instant::now();
    p.write_all(b"abc").unwrap();
    p.shutdown(Shutdown::Write).unwrap();
    expect_bytes(&mut sub, b"abc");
    assert!(t0.elapsed() < Duration::from_secs(5));
    expect_closed(&mut p);
    assert_eq!(bc.get(|s| &s.flushed_partial), 1);
    assert_eq!(bc.get(|s| &s.partial_discarded), 0);
    bc.stop();
}

// ----- 8. length-prefixed framing -----

fn length_prefixed_records_are_forwarded_byte_exact(framing: &str, header: usize) {
    const MAX: usize = 1000;
    let bc = Bc::start(&format!("framing = \"{framing}\"\nmax_record = {MAX}"));
    let mut subs: Vec<TcpStream> = bc.subscribe(2, b'A').into_iter().map(|s| s.s).collect();
    let pattern = Pattern::new(header as u64);
    let mut wire = Vec::new();
    let mut lens = vec![0, 1, 2, 255, 256, MAX - 1, MAX];
    lens.extend((0..300).map(|i| (i * 7919) % (MAX + 1)));
    let mut offset = 0;
    for &len in &lens {
        let n = u32::try_from(len).unwrap().to_be_bytes();
        wire.extend_from_slice(&n[4 - header..]);
        let mut payload = vec![0u8; len];
        pattern.fill(offset, &mut payload);
        offset += len as u64;
        wire.extend_from_slice(&payload);
    }
    let mut publisher = connect(bc.ingest());
    write_in_pieces(&mut publisher, &wire, 97, 3);
    for s in &mut subs {
        let mut got = vec![0u8; wire.len()];
        s.read_exact(&mut got).unwrap();
        assert!(got == wire, "{framing}: records differ from what was sent");
    }
    assert_eq!(bc.get(|s| &s.records_in), lens.len() as u64);
    assert_eq!(bc.get(|s| &s.oversized), 0);
    for s in subs {
        Sub::from_stream(s, b'A').expect_quiet(Duration::from_millis(50));
    }
    bc.stop();
}

#[test]
fn u16_records_are_forwarded_byte_exact() {
    length_prefixed_records_are_forwarded_byte_exact("u16", 2);
}

#[test]
fn u32_records_are_forwarded_byte_exact() {
    length_prefixed_records_are_forwarded_byte_exact("u32", 4);
}

// ----- 9. stdin ingest through the binary -----

/// Start the binary on `config` (debug log, stderr captured) and wait for
/// its broadcast to listen.
fn spawn_binary(config: &str, name: &str, stdin: Stdio) -> (ChildGuard, Captured) {
    let path = temp_file(name, config);
    let mut child = target_command(bin())
        .args(["--log-level", "debug", "run", "-c"])
        .arg(&path)
        .stdin(stdin)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn switchboard");
    let log = Captured::new(child.stderr.take().unwrap());
    let guard = ChildGuard(child);
    assert!(
        log.wait_for(WAIT, |t| t.contains("listening for subscribers")),
        "no listening line: {}",
        log.text()
    );
    (guard, log)
}

fn joined(log: &Captured) -> usize {
    log.text().matches(" joined (").count()
}

#[test]
fn stdin_ingest_through_the_binary() {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = format!("[[broadcast]]\nlisten = \"{addr}\"\ningest = \"stdin\"\n");
    let (mut child, log) = spawn_binary(&config, "broadcast-stdin.toml", Stdio::piped());
    let mut stdin = child.0.stdin.take().unwrap();
    let mut sub = Sub::connect(addr, b'A');
    assert!(
        log.wait_for(WAIT, |t| t.matches(" joined (").count() == 1),
        "{}",
        log.text()
    );
    // Written in two parts, split mid-record.
    let data = records(b'A', 0..2_000);
    stdin.write_all(&data[..data.len() / 2 + 7]).unwrap();
    stdin.flush().unwrap();
    thread::sleep(Duration::from_millis(20));
    stdin.write_all(&data[data.len() / 2 + 7..]).unwrap();
    sub.read_until(2_000, None).unwrap();

    // Closing stdin is logged; the process keeps serving.
    drop(stdin);
    assert!(
        log.wait_for(WAIT, |t| t.contains("stdin closed")),
        "{}",
        log.text()
    );
    let second = connect(addr);
    assert!(
        log.wait_for(WAIT, |t| t.matches(" joined (").count() == 2),
        "{}",
        log.text()
    );
    assert!(
        matches!(child.0.try_wait(), Ok(None)),
        "exited on stdin EOF"
    );
    sub.expect_quiet(Duration::from_millis(100));

    send_signal(child.id(), "TERM");
    let status = child.wait(WAIT);
    let text = log.finish();
    assert_eq!(status.code(), Some(0), "{text}");
    let mut s = sub.s;
    expect_closed(&mut s);
    drop(second);
    assert!(!text.contains("ERROR"), "{text}");
}

#[test]
fn stdin_ingest_from_a_file() {
    const LINES: u64 = 3_000;
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let data = records(b'A', 0..LINES);
    let file = temp_file(
        "broadcast-stdin-input.txt",
        std::str::from_utf8(&data).unwrap(),
    );
    // The file is read as soon as the process starts: replay keeps every
    // line for a subscriber that connects whenever it likes.
    let config =
        format!("[[broadcast]]\nlisten = \"{addr}\"\ningest = \"stdin\"\nreplay = {LINES}\n");
    let stdin = Stdio::from(std::fs::File::open(&file).unwrap());
    let (mut child, log) = spawn_binary(&config, "broadcast-file.toml", stdin);
    assert!(
        log.wait_for(WAIT, |t| t.contains("stdin closed")),
        "{}",
        log.text()
    );
    let mut sub = Sub::connect(addr, b'A');
    sub.read_until(LINES, None).unwrap();
    sub.expect_quiet(Duration::from_millis(100));
    assert_eq!(joined(&log), 1);
    send_signal(child.id(), "TERM");
    let status = child.wait(WAIT);
    let text = log.finish();
    assert_eq!(status.code(), Some(0), "{text}");
    assert!(!text.contains("ERROR"), "{text}");
}

// ----- 10. library publishing -----

#[test]
fn library_publish_from_another_thread_reaches_subscribers() {
    const N: u64 = 5_000;
    let bc = Bc::start_toml("[[broadcast]]\nlisten = \"127.0.0.1:0\"\n");
    let subs = bc.subscribe(2, b'L');
    let readers = spawn_readers(subs, N, None);
    let handle = bc.engine.handle.clone();
    let role = bc.role;
    let publisher = thread::spawn(move || {
        let mut full = 0u64;
        for seq in 0..N {
            let rec = Bytes::from(record(b'L', seq));
            let deadline = Instant::now() + WAIT;
            loop {
                match publish(&handle, role, rec.clone()) {
                    Ok(()) => break,
                    Err(HandleError::Full) if Instant::now() < deadline => {
                        full += 1;
                        thread::sleep(Duration::from_millis(1));
                    }
                    Err(e) => panic!("publish {seq}: {e}"),
                }
            }
        }
        full
    });
    let full = publisher.join().unwrap();
    let done = join_readers(readers);
    eprintln!("library publish: {N} records, inbox full {full} times");
    assert_eq!(bc.get(|s| &s.records_in), N);
    let handle = bc.engine.handle.clone();
    drop(done);
    bc.stop();
    // Once the engine is gone, publishing says so.
    assert_eq!(
        publish(&handle, role, Bytes::from_static(b"x\n")),
        Err(HandleError::Stopped)
    );
}

// ----- 11. probes -----

#[test]
fn connect_and_close_probe_leaves_no_trace() {
    let bc = Bc::start("");
    let mut real = bc.subscribe(1, b'A').pop().unwrap();
    for i in 0..20 {
        let probe = connect(bc.subs());
        if i % 2 == 1 {
            // Some consoles reset rather than close.
            socket2::SockRef::from(&probe)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
        }
        drop(probe);
    }
    wait_for(
        "the probes to be accepted and gone",
        WAIT,
        || {
            let s = bc.engine.stats();
            s.accepted_total == 21 && s.connections == 1
        },
        || (brief(&bc.engine.stats()), &bc.stats),
    );
    assert_eq!(bc.get(|s| &s.subscribers), 1);
    let mut publisher = connect(bc.ingest());
    publisher.write_all(&records(b'A', 0..10)).unwrap();
    real.read_until(10, None).unwrap();
    assert_eq!(bc.get(|s| &s.deliveries), 10);
    assert_eq!(bc.get(|s| &s.refused), 0);
    assert_eq!(bc.get(|s| &s.slow_disconnects), 0);
    assert_eq!(bc.get(|s| &s.dropped_records), 0);
    drop(real);
    bc.wait("subscribers", |s| &s.subscribers, 0);
    bc.stop();
}

#[test]
fn silent_publishers_are_closed_at_idle_timeout_and_free_their_slots() {
    let bc = Bc::start("max_publishers = 2\nidle_timeout = \"300ms\"");
    let mut sub = bc.subscribe(1, b'A').pop().unwrap();
    let t0 = Instant::now();
    let mut silent: Vec<TcpStream> = (0..2).map(|_| connect(bc.ingest())).collect();
    wait_for(
        "two publishers",
        WAIT,
        || bc.engine.stats().accepted_total >= 3,
        || brief(&bc.engine.stats()),
    );
    // The slots are taken: a third is refused.
    let mut third = connect(bc.ingest());
    expect_closed(&mut third);
    bc.wait("refused", |s| &s.refused, 1);
    // The silent ones go at their idle timeout, not before.
    for s in &mut silent {
        expect_closed(s);
    }
    assert!(
        t0.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t0.elapsed()
    );
    // The real publisher gets in and its record reaches the subscriber.
    let mut publisher = connect(bc.ingest());
    publisher.write_all(&records(b'A', 0..1)).unwrap();
    sub.read_at_least(1).unwrap();
    bc.stop();
}
