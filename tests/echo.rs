//! The echo role over real loopback sockets: many concurrent byte-exact
//! streams, idle timeout, half-close, and graceful shutdown flushing.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly"
)]

mod util;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::thread;
use std::time::{Duration, Instant};

use mio::net::TcpStream as MioStream;
use mio::{Events, Interest, Poll, Token};

use util::{Pattern, TestEngine, brief, connect, is_timeout, wait_for};

const CONNECTIONS: usize = 200;
const BYTES_PER_CONNECTION: u64 = 10 * 1024 * 1024;
/// Client threads driving the connections (each owns a `mio::Poll` and its
/// share of non-blocking sockets), instead of two threads per connection.
const CLIENT_THREADS: usize = 2;
/// The whole transfer must finish within this; it normally takes seconds.
const TRANSFER_DEADLINE: Duration = Duration::from_secs(90);

/// One client connection: writes its pattern stream and checks what comes back.
struct Stream {
    sock: Option<MioStream>,
    pattern: Pattern,
    sent: u64,
    received: u64,
}

impl Stream {
    /// Write and read until both would block; returns true once finished.
    fn drive(&mut self, id: usize, buf: &mut [u8]) -> bool {
        let Some(sock) = self.sock.as_mut() else {
            return true;
        };
        while self.sent < BYTES_PER_CONNECTION {
            let left = (BYTES_PER_CONNECTION - self.sent) as usize;
            let chunk = self.pattern.chunk(self.sent, left.min(256 * 1024));
            match sock.write(chunk) {
                Ok(n) => self.sent += n as u64,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => panic!("conn {id}: write failed after {} bytes: {e}", self.sent),
            }
        }
        loop {
            match sock.read(buf) {
                Ok(0) => panic!(
                    "conn {id}: EOF after {} of {BYTES_PER_CONNECTION} bytes",
                    self.received
                ),
                Ok(n) => {
                    if let Err(at) = self.pattern.check(self.received, &buf[..n]) {
                        panic!("conn {id}: wrong byte at stream offset {at}");
                    }
                    self.received += n as u64;
                    assert!(
                        self.received <= self.sent,
                        "conn {id}: received {} bytes but sent only {}",
                        self.received,
                        self.sent
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => panic!("conn {id}: read failed after {} bytes: {e}", self.received),
            }
        }
        if self.received == BYTES_PER_CONNECTION {
            // Everything came back: close (the engine sees EOF and closes too).
            self.sock = None;
            return true;
        }
        false
    }
}

/// Drive `streams` (ids starting at `first_id`) to completion on one thread.
fn run_clients(first_id: usize, mut streams: Vec<Stream>) -> u64 {
    let mut poll = Poll::new().unwrap();
    for (i, s) in streams.iter_mut().enumerate() {
        let sock = s.sock.as_mut().unwrap();
        poll.registry()
            .register(sock, Token(i), Interest::READABLE | Interest::WRITABLE)
            .unwrap();
    }
    let mut events = Events::with_capacity(256);
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = streams.len();
    let deadline = Instant::now() + TRANSFER_DEADLINE;
    // Kick every stream once: registration reports writability, but do not rely on it.
    for (i, s) in streams.iter_mut().enumerate() {
        if s.drive(first_id + i, &mut buf) {
            left -= 1;
        }
    }
    while left > 0 {
        assert!(
            Instant::now() < deadline,
            "transfer not done within {TRANSFER_DEADLINE:?}: {left} streams left, e.g. {:?}",
            streams
                .iter()
                .enumerate()
                .find(|(_, s)| s.sock.is_some())
                .map(|(i, s)| (first_id + i, s.sent, s.received))
        );
        poll.poll(&mut events, Some(Duration::from_secs(1)))
            .unwrap();
        for ev in &events {
            let i = ev.token().0;
            let s = &mut streams[i];
            if s.sock.is_some() && s.drive(first_id + i, &mut buf) {
                left -= 1;
            }
        }
    }
    streams.iter().map(|s| s.received).sum()
}

#[test]
fn two_hundred_connections_echo_ten_megabytes_each_byte_exact() {
    let engine = TestEngine::start("[[echo]]\nlisten = \"127.0.0.1:0\"\n");
    let addr = engine.addr();
    let started = Instant::now();

    let per_thread = CONNECTIONS.div_ceil(CLIENT_THREADS);
    let mut threads = Vec::new();
    for t in 0..CLIENT_THREADS {
        let first = t * per_thread;
        let ids = first..(first + per_thread).min(CONNECTIONS);
        let streams: Vec<Stream> = ids
            .map(|id| {
                let s = connect(addr);
                s.set_nonblocking(true).unwrap();
                Stream {
                    sock: Some(MioStream::from_std(s)),
                    pattern: Pattern::new(id as u64),
                    sent: 0,
                    received: 0,
                }
            })
            .collect();
        threads.push(
            thread::Builder::new()
                .name(format!("client-{t}"))
                .spawn(move || run_clients(first, streams))
                .unwrap(),
        );
    }
    let total: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    let expected = CONNECTIONS as u64 * BYTES_PER_CONNECTION;
    assert_eq!(total, expected);
    let elapsed = started.elapsed();
    eprintln!(
        "echoed {} MiB over {CONNECTIONS} connections in {elapsed:.2?} ({:.0} MiB/s each way)",
        expected >> 20,
        expected as f64 / 1048576.0 / elapsed.as_secs_f64()
    );

    // Every client closed: the engine closes its side and gives every buffer back.
    let h = &engine.handle;
    wait_for(
        "all connections closed and buffers returned",
        Duration::from_secs(10),
        || {
            let s = h.stats();
            s.connections == 0 && s.closed_total == CONNECTIONS as u64 && s.buffers_lent == 0
        },
        || brief(&h.stats()),
    );
    let s = h.stats();
    assert_eq!(s.accepted_total, CONNECTIONS as u64);
    assert_eq!(s.bytes_in_total, expected);
    assert_eq!(s.bytes_out_total, expected);
    engine.stop();
}

/// Read with a timeout; `Some(n)` for data or EOF (`0`), `None` on timeout.
fn read_within(s: &mut std::net::TcpStream, buf: &mut [u8], timeout: Duration) -> Option<usize> {
    s.set_read_timeout(Some(timeout)).unwrap();
    match s.read(buf) {
        Ok(n) => Some(n),
        Err(e) if is_timeout(&e) => None,
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Some(0),
        Err(e) => panic!("read failed: {e}"),
    }
}

#[test]
fn idle_timeout_closes_a_silent_client_but_not_an_active_one() {
    let idle = Duration::from_millis(300);
    let engine =
        TestEngine::start("[[echo]]\nlisten = \"127.0.0.1:0\"\nidle_timeout = \"300ms\"\n");
    let addr = engine.addr();

    let active = thread::spawn(move || {
        let mut s = connect(addr);
        let mut buf = [0u8; 1];
        // Talk every 50 ms (a wide margin under the 300 ms timeout, even on a
        // loaded machine) for four idle periods.
        for i in 0..24u8 {
            s.write_all(&[i]).unwrap();
            assert_eq!(
                read_within(&mut s, &mut buf, Duration::from_secs(5)),
                Some(1),
                "active client lost its connection at message {i}"
            );
            assert_eq!(buf[0], i);
            thread::sleep(Duration::from_millis(50));
        }
        s
    });

    let mut silent = connect(addr);
    let t0 = Instant::now();
    let mut buf = [0u8; 16];
    let n = read_within(&mut silent, &mut buf, Duration::from_secs(5));
    let waited = t0.elapsed();
    assert_eq!(n, Some(0), "silent client was not closed within 5 s");
    assert!(
        waited >= idle - Duration::from_millis(50),
        "closed after {waited:?}, before the idle timeout of {idle:?}"
    );
    assert!(
        waited < Duration::from_secs(3),
        "closed only after {waited:?}"
    );

    let mut active = active.join().unwrap();
    // Still open: one more round trip works after 1.2 s of activity.
    active.write_all(b"x").unwrap();
    assert_eq!(
        read_within(&mut active, &mut buf, Duration::from_secs(5)),
        Some(1)
    );
    assert_eq!(engine.stats().idle_timeouts_total, 1);
    // Now let it go silent too: it is closed in turn.
    assert_eq!(
        read_within(&mut active, &mut buf, Duration::from_secs(5)),
        Some(0)
    );
    assert_eq!(engine.stats().idle_timeouts_total, 2);
    engine.stop();
}

#[test]
fn half_closed_client_receives_every_echoed_byte_then_eof() {
    const LEN: u64 = 4 * 1024 * 1024;
    let engine = TestEngine::start("[[echo]]\nlisten = \"127.0.0.1:0\"\n");
    let mut reader = connect(engine.addr());
    let mut writer = reader.try_clone().unwrap();
    let pattern = Pattern::new(7);
    let w = thread::spawn(move || {
        let mut sent = 0;
        while sent < LEN {
            let c = pattern.chunk(sent, (LEN - sent).min(100_000) as usize);
            writer.write_all(c).unwrap();
            sent += c.len() as u64;
        }
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let got = util::read_to_eof(&mut reader, LEN as usize);
    w.join().unwrap();
    assert_eq!(got.len() as u64, LEN, "echo ended early");
    assert_eq!(pattern.check(0, &got), Ok(()));
    let h = &engine.handle;
    wait_for(
        "the engine to close the half-closed connection",
        Duration::from_secs(5),
        || h.connections() == 0,
        || brief(&h.stats()),
    );
    engine.stop();
}

/// The most a loopback socket's send buffer can grow to (`tcp_wmem` max), so
/// a test can send more than the kernel can absorb; 4 MiB where unreadable.
fn kernel_send_buffer_max() -> u64 {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|s| s.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(4 * 1024 * 1024)
}

/// An engine and a client that has sent `n` bytes without reading any, where
/// the engine has read all `n`. `n` is more than the kernel can absorb on the
/// way back (the server's send buffer at its largest plus the client's small
/// receive window), so part of the echo is still in the engine's send queue;
/// the queue bound is above `n`, so the engine did read everything.
fn echo_backed_up_in_the_engine(seed: u64) -> (TestEngine, std::net::TcpStream, Pattern, u64) {
    let n: u64 = kernel_send_buffer_max() + 2 * 1024 * 1024;
    let queue = n + 1024 * 1024;
    let engine = TestEngine::start(&format!(
        "[engine]\nqueue_bytes = {queue}\nshutdown_timeout = \"10s\"\n[[echo]]\nlisten = \"127.0.0.1:0\"\n"
    ));
    let mut client = connect_small_window(engine.addr());
    let pattern = Pattern::new(seed);
    let mut sent = 0;
    while sent < n {
        let c = pattern.chunk(sent, (n - sent).min(100_000) as usize);
        client.write_all(c).unwrap();
        sent += c.len() as u64;
    }
    let h = &engine.handle;
    wait_for(
        "the engine to read every byte sent",
        Duration::from_secs(10),
        || h.stats().bytes_in_total == n,
        || brief(&h.stats()),
    );
    (engine, client, pattern, n)
}

#[test]
fn half_close_with_echo_still_queued_delivers_it_all_then_eof() {
    let (engine, mut client, pattern, n) = echo_backed_up_in_the_engine(8);
    client.shutdown(Shutdown::Write).unwrap();
    let h = &engine.handle;
    // The engine reads EOF right after the last byte (it had read all of
    // them); give it a moment. The connection must stay open (closing) until
    // its queue is flushed to the client.
    thread::sleep(Duration::from_millis(200));
    let s = h.stats();
    assert_eq!(s.connections, 1, "closed before flushing: {}", brief(&s));
    assert!(s.bytes_out_total < n, "nothing was queued: {}", brief(&s));

    let got = util::read_to_eof(&mut client, n as usize);
    assert_eq!(
        got.len() as u64,
        n,
        "half-closed connection lost queued echo"
    );
    assert_eq!(pattern.check(0, &got), Ok(()));
    wait_for(
        "the engine to close the connection",
        Duration::from_secs(5),
        || h.connections() == 0,
        || brief(&h.stats()),
    );
    engine.stop();
}

#[test]
fn graceful_stop_flushes_queued_echo_before_closing() {
    let (mut engine, mut client, pattern, n) = echo_backed_up_in_the_engine(42);
    let h = engine.handle.clone();
    let at_stop = h.stats();
    h.stop();
    eprintln!(
        "at stop: {} of {n} bytes echoed to the kernel, {} still queued in the engine",
        at_stop.bytes_out_total,
        n - at_stop.bytes_out_total
    );
    // The engine has to flush its own queue after the stop, not just close
    // sockets whose kernel buffers already hold everything.
    assert!(
        at_stop.bytes_out_total < n,
        "nothing was left in the engine's queue at stop: {}",
        brief(&at_stop)
    );

    let got = util::read_to_eof(&mut client, n as usize);
    assert_eq!(got.len() as u64, n, "shutdown lost queued bytes");
    assert_eq!(pattern.check(0, &got), Ok(()));
    engine.join(Duration::from_secs(10));
    let s = h.stats();
    assert_eq!(s.bytes_out_total, n);
    assert_eq!(s.connections, 0);
}

/// A client socket whose receive buffer is set small before connecting, so the
/// kernel cannot absorb much of the echo.
fn connect_small_window(addr: SocketAddr) -> std::net::TcpStream {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.set_recv_buffer_size(32 * 1024).unwrap();
    s.connect_timeout(&addr.into(), util::IO_TIMEOUT).unwrap();
    let s: std::net::TcpStream = s.into();
    s.set_read_timeout(Some(util::IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(util::IO_TIMEOUT)).unwrap();
    s
}

/// A client that keeps sending while it does not read, so the engine stops
/// reading it (its queue is full) and unread bytes wait in the engine's
/// receive buffer when the stop comes. Closing such a socket outright makes
/// the kernel answer with a reset that destroys the echo still on its way;
/// the engine must send FIN and read the rest away instead. The client reads
/// every byte the engine echoed, then a clean EOF.
#[test]
fn graceful_stop_with_unread_input_delivers_every_echoed_byte_then_eof() {
    const UPLOAD: u64 = 24 * 1024 * 1024;
    let mut engine = TestEngine::start(
        "[engine]\nqueue_bytes = 262144\nshutdown_timeout = \"10s\"\n\
         [[echo]]\nlisten = \"127.0.0.1:0\"\n",
    );
    let client = connect_small_window(engine.addr());
    let pattern = Pattern::new(77);
    let mut upload = client.try_clone().unwrap();
    let writer = thread::spawn(move || {
        let mut sent = 0;
        while sent < UPLOAD {
            let c = pattern.chunk(sent, (UPLOAD - sent).min(64 * 1024) as usize);
            match upload.write(c) {
                Ok(n) => sent += n as u64,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The engine may close once it has read this side's EOF;
                // nothing after the stop is echoed anyway.
                Err(_) => return sent,
            }
        }
        upload.shutdown(Shutdown::Write).ok();
        sent
    });

    // Wait until the engine has stopped reading: its queue is full and the
    // client's reading nothing, so bytes_in stands still.
    let h = engine.handle.clone();
    let mut last = h.stats().bytes_in_total;
    wait_for(
        "the engine to stop reading the client",
        Duration::from_secs(10),
        || {
            thread::sleep(Duration::from_millis(100));
            let now = h.stats().bytes_in_total;
            let still = now == last && now > 0;
            last = now;
            still
        },
        || brief(&h.stats()),
    );
    h.stop();

    let mut client = client;
    let got = util::read_to_eof(&mut client, UPLOAD as usize);
    let sent = writer.join().unwrap();
    engine.join(Duration::from_secs(15));
    let s = h.stats();
    eprintln!(
        "client sent {sent} bytes, received {} echoed, engine read {}",
        got.len(),
        s.bytes_in_total
    );
    assert_eq!(
        got.len() as u64,
        s.bytes_out_total,
        "the client did not receive every byte the engine echoed"
    );
    assert!(!got.is_empty());
    assert_eq!(Pattern::new(77).check(0, &got), Ok(()));
    assert_eq!((s.connections, s.draining), (0, 0));
}
