//! Bounds under pressure: the connection limit pauses and resumes accepting,
//! connection churn leaks nothing, and a client that never reads cannot make
//! the engine buffer more than its configured queue.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly"
)]

mod util;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use util::{Pattern, TestEngine, brief, connect, is_timeout, wait_for};

/// One 1-byte round trip; panics if it does not come back within the socket timeout.
fn ping(s: &mut TcpStream, b: u8) {
    s.write_all(&[b]).unwrap();
    let mut got = [0u8; 1];
    s.read_exact(&mut got).unwrap();
    assert_eq!(got[0], b);
}

#[test]
fn max_connections_pauses_accepting_until_a_slot_frees() {
    let engine =
        TestEngine::start("[engine]\nmax_connections = 4\n[[echo]]\nlisten = \"127.0.0.1:0\"\n");
    let addr = engine.addr();
    let h = &engine.handle;
    let mut first: Vec<TcpStream> = (0..4u8)
        .map(|i| {
            let mut s = connect(addr);
            ping(&mut s, i);
            s
        })
        .collect();
    assert_eq!(h.connections(), 4);

    // The kernel completes the handshake (backlog), but the engine does not
    // accept it, so nothing is echoed.
    let mut fifth = connect(addr);
    fifth.write_all(b"5").unwrap();
    fifth
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut got = [0u8; 1];
    match fifth.read(&mut got) {
        Err(e) if is_timeout(&e) => {}
        other => panic!("5th connection was served over the limit: {other:?}"),
    }
    let s = h.stats();
    assert_eq!(s.connections, 4, "{}", brief(&s));
    assert_eq!(s.accepted_total, 4, "{}", brief(&s));
    assert_eq!(s.accept_paused_limit_total, 1, "{}", brief(&s));
    // The four still work while the limit holds.
    for (i, s) in first.iter_mut().enumerate() {
        ping(s, 10 + i as u8);
    }

    // Free a slot: accepting resumes and the waiting byte is echoed.
    drop(first.remove(0));
    fifth
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    fifth.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"5");
    ping(&mut fifth, 55);
    let s = h.stats();
    assert_eq!(s.accepted_total, 5, "{}", brief(&s));
    assert_eq!(s.connections, 4, "{}", brief(&s));

    // At the limit again, and again a pause is counted when a 6th arrives.
    let mut sixth = connect(addr);
    sixth.write_all(b"6").unwrap();
    wait_for(
        "a second pause at the limit",
        Duration::from_secs(5),
        || h.stats().accept_paused_limit_total == 2,
        || brief(&h.stats()),
    );
    drop(first.remove(0));
    sixth.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"6");
    drop((first, fifth, sixth));
    wait_for(
        "all connections closed",
        Duration::from_secs(5),
        || h.connections() == 0,
        || brief(&h.stats()),
    );
    engine.stop();
}

#[test]
fn ten_thousand_connect_close_cycles_leak_nothing() {
    const CYCLES: usize = 10_000;
    const THREADS: usize = 4;
    let engine = TestEngine::start("[[echo]]\nlisten = \"127.0.0.1:0\"\n");
    let addr = engine.addr();
    let started = Instant::now();
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            thread::spawn(move || {
                for i in (t..CYCLES).step_by(THREADS) {
                    let mut s = connect(addr);
                    // A round trip proves the engine accepted it.
                    ping(&mut s, i as u8);
                    if i % 2 == 0 {
                        drop(s); // FIN
                    } else {
                        // RST: no TIME_WAIT left behind; the engine sees a reset.
                        let s = socket2::Socket::from(s);
                        s.set_linger(Some(Duration::ZERO)).unwrap();
                        drop(s);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    eprintln!(
        "{CYCLES} connect/echo/close cycles in {:.2?}",
        started.elapsed()
    );
    let h = &engine.handle;
    wait_for(
        "every connection closed",
        Duration::from_secs(10),
        || {
            let s = h.stats();
            s.connections == 0 && s.closed_total == CYCLES as u64
        },
        || brief(&h.stats()),
    );
    let s = h.stats();
    assert_eq!(h.connections(), 0);
    assert_eq!(s.accepted_total, CYCLES as u64, "{}", brief(&s));
    assert_eq!(s.accepted_total, s.closed_total, "{}", brief(&s));
    assert_eq!(s.buffers_lent, 0, "{}", brief(&s));
    assert_eq!(s.bytes_in_total, CYCLES as u64);
    assert_eq!(s.bytes_out_total, CYCLES as u64);
    engine.stop();
}

#[test]
fn a_client_that_never_reads_cannot_grow_the_engine_past_its_queue() {
    const BUFFER: u64 = 16 * 1024;
    const QUEUE: u64 = 64 * 1024;
    /// Far above anything loopback kernel buffers can absorb here; reaching it
    /// means the engine kept reading.
    const RUNAWAY: u64 = 256 * 1024 * 1024;
    let engine = TestEngine::start(&format!(
        "[engine]\nbuffer_bytes = {BUFFER}\nqueue_bytes = {QUEUE}\n[[echo]]\nlisten = \"127.0.0.1:0\"\n"
    ));
    let h = &engine.handle;
    let mut client = connect(engine.addr());
    client
        .set_write_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let pattern = Pattern::new(99);

    // Write without reading until a write times out: TCP pushed back because
    // the engine stopped reading.
    let mut written: u64 = 0;
    loop {
        assert!(
            written < RUNAWAY,
            "wrote {written} bytes without being blocked"
        );
        match client.write(pattern.chunk(written, 64 * 1024)) {
            Ok(n) => written += n as u64,
            Err(e) if is_timeout(&e) => break,
            Err(e) => panic!("write failed after {written} bytes: {e}"),
        }
    }

    // The engine has stopped reading: its input counter stays put (checked
    // over a quiet period while the client keeps trying to write).
    let settled = |h: &switchboard::Handle| {
        let a = h.stats();
        thread::sleep(Duration::from_millis(200));
        let b = h.stats();
        (a.bytes_in_total == b.bytes_in_total && a.bytes_out_total == b.bytes_out_total)
            .then_some(b)
    };
    let mut quiet = None;
    wait_for(
        "the engine to stop reading",
        Duration::from_secs(5),
        || {
            quiet = settled(h);
            quiet.is_some()
        },
        || brief(&h.stats()),
    );
    let quiet = quiet.unwrap();
    match client.write(pattern.chunk(written, 64 * 1024)) {
        Ok(n) => written += n as u64,
        Err(e) if is_timeout(&e) => {}
        Err(e) => panic!("write failed: {e}"),
    }
    let s = h.stats();
    eprintln!(
        "client wrote {written} bytes before blocking; engine read {}, wrote back {}, holds {} in {} buffers",
        s.bytes_in_total,
        s.bytes_out_total,
        s.bytes_in_total - s.bytes_out_total,
        s.buffers_lent
    );
    assert_eq!(
        s.bytes_in_total, quiet.bytes_in_total,
        "the engine kept reading"
    );

    // Every byte the echo read is in exactly one place: written back to the
    // kernel (bytes_out_total), waiting in the send queue (at most QUEUE: the
    // role pauses reading before a send could overflow it), or not yet
    // dispatched in the read buffer (at most BUFFER). Hence:
    assert!(
        s.bytes_in_total <= s.bytes_out_total + QUEUE + BUFFER,
        "engine holds {} bytes, more than queue ({QUEUE}) + one read buffer ({BUFFER})",
        s.bytes_in_total - s.bytes_out_total
    );
    // The held bytes live in pooled blocks: at most one read buffer, and the
    // queue's blocks (QUEUE / BUFFER of them, plus one when the front and back
    // blocks are both partly used).
    assert!(
        s.buffers_lent <= QUEUE / BUFFER + 2,
        "{} buffers lent for one connection",
        s.buffers_lent
    );
    assert!(written >= s.bytes_in_total);

    // Pausing is not closing: once the client reads, everything comes back in
    // order and the engine resumes reading the rest.
    assert_eq!(s.connections, 1);
    client.shutdown(std::net::Shutdown::Write).unwrap();
    let got = util::read_to_eof(&mut client, written as usize);
    assert_eq!(got.len() as u64, written);
    assert_eq!(pattern.check(0, &got), Ok(()));
    wait_for(
        "the connection to close with no buffers held",
        Duration::from_secs(5),
        || {
            let s = h.stats();
            s.connections == 0 && s.buffers_lent == 0
        },
        || brief(&h.stats()),
    );
    engine.stop();
}
