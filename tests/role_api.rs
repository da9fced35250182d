//! The role API over real loopback sockets, seen from a role: outbound connects
//! (established, refused, timed out), timers, messages from other threads,
//! pause and resume, framing changes, stale keys and close-after-flush.
//!
//! A probe role reports every callback it receives to the test thread over a
//! channel and acts on commands sent with `Handle::send`; a per-test hook adds
//! what must happen inside a callback (pausing on accept, say).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly"
)]

mod util;

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use switchboard::codec::{Frame, FrameError, Framing};
use switchboard::config::EngineConfig;
use switchboard::{
    CloseReason, ConnKey, ConnectOptions, Ctx, EngineError, Handle, HandleError, ListenOptions,
    ListenerId, Message, Role, RoleId, SendError, TimerKey,
};

use util::{Pattern, TestEngine, brief, connect, wait_for};

/// How long a test waits for any one expected event.
const EVENT_TIMEOUT: Duration = Duration::from_secs(5);

// ----- the probe role -----

/// Everything the probe saw, in the order it saw it.
#[derive(Debug, Clone, PartialEq)]
enum Event {
    Accept {
        /// Index into the probe's `listen` list.
        listener: usize,
        conn: ConnKey,
    },
    Connected(ConnKey),
    ConnectFailed(ConnKey, CloseReason),
    Frame {
        conn: ConnKey,
        raw: Vec<u8>,
        payload: Vec<u8>,
    },
    ReadClosed(ConnKey),
    Writable(ConnKey),
    Closed(ConnKey, CloseReason),
    Timer(TimerKey, u64),
    ConnTimer(ConnKey, TimerKey, u64),
    Shutdown,
    /// Answer to [`Cmd::Connect`]: what `ctx.connect` returned, and how many
    /// bytes were queued on the new connection after the sends.
    Connecting {
        result: Result<ConnKey, io::ErrorKind>,
        queued: Option<usize>,
    },
    /// Answer to [`Cmd::Send`].
    Sent(ConnKey, Result<(), SendError>),
    /// Answer to [`Cmd::SendAndClose`].
    SentAndClosed {
        conn: ConnKey,
        sends: [Result<(), SendError>; 2],
        queued_at_close: Option<usize>,
        send_after_close: Result<(), SendError>,
    },
    /// Answer to [`Cmd::Resume`].
    Resumed(ConnKey),
    /// Answer to [`Cmd::SetTimer`].
    TimerSet(u64, TimerKey),
    /// Answer to [`Cmd::CancelTimer`].
    TimerCancelled(TimerKey),
    /// Answer to [`Cmd::SetConnTimer`].
    ConnTimerSet(ConnKey, u64, Option<TimerKey>),
    /// Answer to [`Cmd::SetTag`]: the tag before and after.
    Tagged(ConnKey, Option<u64>, Option<u64>),
    /// Answer to [`Cmd::Poke`].
    Poked(Poke),
    /// Answer to [`Cmd::Block`], sent before blocking.
    Blocking,
    /// Answer to [`Cmd::Barrier`]: everything the probe reported before was
    /// reported before this.
    Barrier(u64),
    /// A message that is not a [`Cmd`].
    Unknown(Option<u32>),
    /// Reported by a test's hook.
    Note(&'static str, ConnKey, usize),
}

/// What every per-connection `Ctx` call returned for one key (see [`Cmd::Poke`]).
#[derive(Debug, Clone, PartialEq)]
struct Poke {
    conn: ConnKey,
    send: Result<(), SendError>,
    send_bytes: Result<(), SendError>,
    queued: Option<usize>,
    send_capacity: Option<usize>,
    peer_addr: Option<SocketAddr>,
    is_paused_after_pause: bool,
}

/// Work for the probe, sent from the test thread with `Handle::send`.
enum Cmd {
    /// `ctx.connect`, then `ctx.send` each chunk in the same callback (so
    /// before the connect can have completed).
    Connect {
        addr: SocketAddr,
        opts: ConnectOptions,
        chunks: Vec<Vec<u8>>,
    },
    Send(ConnKey, Vec<u8>),
    /// Queue a small copy and a large shared buffer, then `ctx.close` at once.
    SendAndClose(ConnKey, Bytes),
    Resume(ConnKey),
    SetTimer {
        after: Duration,
        token: u64,
    },
    CancelTimer(TimerKey),
    SetConnTimer {
        conn: ConnKey,
        after: Duration,
        purpose: u64,
    },
    /// Read the connection's tag, set a new one, read it again.
    SetTag(ConnKey, u64),
    /// Call every per-connection `Ctx` method on the key, destructive ones
    /// included (pause, idle timeout, framing, close, abort).
    Poke(ConnKey),
    /// Block the loop thread (test-only misbehaviour, to fill the inbox).
    Block(Duration),
    Barrier(u64),
}

/// A test's extra behaviour, run on the loop thread after each event is
/// reported; what it returns is reported too.
type Hook = Box<dyn FnMut(&mut Ctx<'_>, &Event) -> Option<Event> + Send>;

struct Probe {
    listen: Vec<ListenOptions>,
    listeners: Vec<ListenerId>,
    events: Sender<Event>,
    hook: Hook,
}

// ===== impl Probe =====

impl Probe {
    fn report(&mut self, ctx: &mut Ctx<'_>, event: Event) {
        // The test may have finished (and dropped the receiver) during shutdown.
        self.events.send(event.clone()).ok();
        if let Some(note) = (self.hook)(ctx, &event) {
            self.events.send(note).ok();
        }
    }

    fn run(ctx: &mut Ctx<'_>, cmd: Cmd) -> Event {
        match cmd {
            Cmd::Connect { addr, opts, chunks } => match ctx.connect(addr, opts) {
                Ok(key) => {
                    for c in &chunks {
                        ctx.send(key, c).unwrap();
                    }
                    Event::Connecting {
                        result: Ok(key),
                        queued: ctx.queued(key),
                    }
                }
                Err(e) => Event::Connecting {
                    result: Err(e.kind()),
                    queued: None,
                },
            },
            Cmd::Send(key, data) => Event::Sent(key, ctx.send(key, &data)),
            Cmd::SendAndClose(key, data) => {
                let head = data.slice(..1000);
                let rest = data.slice(1000..);
                let sends = [ctx.send(key, &head), ctx.send_bytes(key, rest)];
                let queued_at_close = ctx.queued(key);
                ctx.close(key);
                Event::SentAndClosed {
                    conn: key,
                    sends,
                    queued_at_close,
                    send_after_close: ctx.send(key, b"too late"),
                }
            }
            Cmd::Resume(key) => {
                ctx.resume_reading(key);
                Event::Resumed(key)
            }
            Cmd::SetTimer { after, token } => {
                let at = ctx.now() + after;
                Event::TimerSet(token, ctx.set_timer(at, token))
            }
            Cmd::CancelTimer(key) => {
                ctx.cancel_timer(key);
                Event::TimerCancelled(key)
            }
            Cmd::SetTag(conn, tag) => {
                let before = ctx.tag(conn);
                ctx.set_tag(conn, tag);
                Event::Tagged(conn, before, ctx.tag(conn))
            }
            Cmd::SetConnTimer {
                conn,
                after,
                purpose,
            } => {
                let at = ctx.now() + after;
                Event::ConnTimerSet(conn, purpose, ctx.set_conn_timer(conn, at, purpose))
            }
            Cmd::Poke(key) => {
                let send = ctx.send(key, b"stale");
                let send_bytes = ctx.send_bytes(key, Bytes::from_static(b"stale"));
                let queued = ctx.queued(key);
                let send_capacity = ctx.send_capacity(key);
                let peer_addr = ctx.peer_addr(key);
                ctx.pause_reading(key);
                let is_paused_after_pause = ctx.is_paused(key);
                ctx.set_idle_timeout(key, Some(Duration::from_millis(1)));
                ctx.set_framing(key, Framing::Line { max: 1 });
                ctx.close(key);
                ctx.abort(key);
                Event::Poked(Poke {
                    conn: key,
                    send,
                    send_bytes,
                    queued,
                    send_capacity,
                    peer_addr,
                    is_paused_after_pause,
                })
            }
            Cmd::Block(_) | Cmd::Barrier(_) => unreachable!("handled by on_message"),
        }
    }
}

impl Role for Probe {
    fn name(&self) -> &str {
        "probe"
    }

    fn start(&mut self, ctx: &mut Ctx<'_>) -> Result<(), EngineError> {
        for opts in &self.listen {
            let id = ctx.listen(SocketAddr::from(([127, 0, 0, 1], 0)), *opts)?;
            self.listeners.push(id);
        }
        Ok(())
    }

    fn on_accept(&mut self, ctx: &mut Ctx<'_>, listener: ListenerId, conn: ConnKey, _: SocketAddr) {
        let listener = self.listeners.iter().position(|&l| l == listener).unwrap();
        self.report(ctx, Event::Accept { listener, conn });
    }

    fn on_connected(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey) {
        self.report(ctx, Event::Connected(conn));
    }

    fn on_connect_failed(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey, reason: CloseReason) {
        self.report(ctx, Event::ConnectFailed(conn, reason));
    }

    fn on_frame(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey, frame: Frame<'_>) {
        let event = Event::Frame {
            conn,
            raw: frame.raw.to_vec(),
            payload: frame.payload.to_vec(),
        };
        self.report(ctx, event);
    }

    fn on_read_closed(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey) {
        self.report(ctx, Event::ReadClosed(conn));
        // What the default does.
        ctx.close(conn);
    }

    fn on_writable(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey) {
        self.report(ctx, Event::Writable(conn));
    }

    fn on_closed(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey, reason: CloseReason) {
        self.report(ctx, Event::Closed(conn, reason));
    }

    fn on_timer(&mut self, ctx: &mut Ctx<'_>, timer: TimerKey, purpose: u64) {
        self.report(ctx, Event::Timer(timer, purpose));
    }

    fn on_conn_timer(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey, timer: TimerKey, purpose: u64) {
        self.report(ctx, Event::ConnTimer(conn, timer, purpose));
    }

    fn on_message(&mut self, ctx: &mut Ctx<'_>, msg: Message) {
        let cmd = match msg.downcast::<Cmd>() {
            Ok(cmd) => *cmd,
            Err(other) => {
                let n = other.downcast::<u32>().ok().map(|n| *n);
                return self.report(ctx, Event::Unknown(n));
            }
        };
        let event = match cmd {
            Cmd::Block(d) => {
                self.report(ctx, Event::Blocking);
                thread::sleep(d);
                return;
            }
            Cmd::Barrier(n) => Event::Barrier(n),
            cmd => Probe::run(ctx, cmd),
        };
        self.report(ctx, event);
    }

    fn on_shutdown(&mut self, ctx: &mut Ctx<'_>) {
        self.report(ctx, Event::Shutdown);
    }
}

// ----- the test side -----

/// An engine running one probe, and the events it reported so far.
struct Probed {
    engine: TestEngine,
    role: RoleId,
    events: Receiver<Event>,
    /// Every event received so far, in order.
    log: Vec<Event>,
    /// Received events that no `wait` has taken yet, in order.
    pending: VecDeque<Event>,
    barriers: u64,
}

// ===== impl Probed =====

impl Probed {
    fn start(
        config: EngineConfig,
        listen: Vec<ListenOptions>,
        hook: impl FnMut(&mut Ctx<'_>, &Event) -> Option<Event> + Send + 'static,
    ) -> Probed {
        let (tx, events) = mpsc::channel();
        let probe = Probe {
            listen,
            listeners: Vec::new(),
            events: tx,
            hook: Box::new(hook),
        };
        let (engine, roles) = TestEngine::with_roles(config, vec![Box::new(probe)]);
        Probed {
            engine,
            role: roles[0],
            events,
            log: Vec::new(),
            pending: VecDeque::new(),
            barriers: 0,
        }
    }

    fn addr(&self, listener: usize) -> SocketAddr {
        self.engine.addrs[listener]
    }

    fn handle(&self) -> &Handle {
        &self.engine.handle
    }

    fn cmd(&self, cmd: Cmd) {
        self.handle().send(self.role, Box::new(cmd)).unwrap();
    }

    /// The first event matching `pred` that no earlier `wait` took (others
    /// stay pending); fails the test naming `what` after [`EVENT_TIMEOUT`].
    fn wait(&mut self, what: &str, mut pred: impl FnMut(&Event) -> bool) -> Event {
        if let Some(i) = self.pending.iter().position(&mut pred) {
            return self.pending.remove(i).unwrap();
        }
        let deadline = Instant::now() + EVENT_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(e) => {
                    self.log.push(e.clone());
                    if pred(&e) {
                        return e;
                    }
                    self.pending.push_back(e);
                }
                Err(RecvTimeoutError::Timeout) => panic!(
                    "no {what} within {EVENT_TIMEOUT:?}; events so far: {:#?}\nstats: {}",
                    self.log,
                    brief(&self.handle().stats())
                ),
                Err(RecvTimeoutError::Disconnected) => panic!("the probe is gone"),
            }
        }
    }

    /// Wait until the probe has reported everything it did before now.
    fn barrier(&mut self) {
        self.barriers += 1;
        let n = self.barriers;
        self.cmd(Cmd::Barrier(n));
        self.wait("barrier", |e| *e == Event::Barrier(n));
    }

    /// The accepted connection on `listener` reported next.
    fn accepted(&mut self, listener: usize) -> ConnKey {
        let l = listener;
        match self.wait(
            "accept",
            |e| matches!(e, Event::Accept { listener, .. } if *listener == l),
        ) {
            Event::Accept { conn, .. } => conn,
            _ => unreachable!(),
        }
    }

    /// Payloads of the frames `conn` delivers until they add up to `n` bytes.
    fn payload_bytes(&mut self, conn: ConnKey, n: usize) -> Vec<u8> {
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            match self.wait(
                "frame",
                |e| matches!(e, Event::Frame { conn: c, .. } if *c == conn),
            ) {
                Event::Frame { payload, .. } => got.extend_from_slice(&payload),
                _ => unreachable!(),
            }
        }
        assert_eq!(got.len(), n, "more bytes than sent");
        got
    }

    /// The next frame on `conn`, as `(raw, payload)`.
    fn frame(&mut self, conn: ConnKey) -> (Vec<u8>, Vec<u8>) {
        match self.wait(
            "frame",
            |e| matches!(e, Event::Frame { conn: c, .. } if *c == conn),
        ) {
            Event::Frame { raw, payload, .. } => (raw, payload),
            _ => unreachable!(),
        }
    }

    /// Position of the first logged event matching `pred`.
    fn position(&self, pred: impl FnMut(&Event) -> bool) -> Option<usize> {
        self.log.iter().position(pred)
    }

    fn stop(self) {
        self.engine.stop();
    }
}

fn no_hook(_: &mut Ctx<'_>, _: &Event) -> Option<Event> {
    None
}

fn config() -> EngineConfig {
    EngineConfig {
        connect_timeout: Duration::from_secs(2),
        ..Default::default()
    }
}

fn raw_listener() -> ListenOptions {
    ListenOptions::default()
}

/// Read until the peer closes; a reset counts as closed (the engine may close
/// with unread input, which makes the kernel send RST).
fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return out,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("read failed after {} bytes: {e}", out.len()),
        }
    }
}

/// `len` bytes of `pattern`'s stream from `offset`.
fn pattern_bytes(pattern: Pattern, offset: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    pattern.fill(offset, &mut v);
    v
}

fn u16_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = u16::try_from(payload.len()).unwrap().to_be_bytes().to_vec();
    f.extend_from_slice(payload);
    f
}

// ----- outbound connects -----

#[test]
fn connect_delivers_bytes_queued_before_it_completed_then_reports_the_peer_closing() {
    let peer_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let peer_addr = peer_listener.local_addr().unwrap();
    let mut p = Probed::start(config(), vec![], no_hook);

    // Chunks of assorted sizes, so that reordering shows.
    let pattern = Pattern::new(1);
    let mut chunks = Vec::new();
    let mut total = 0;
    for len in [1, 100, 1000, 10_000, 65_536, 100_000, 7] {
        chunks.push(pattern_bytes(pattern, total as u64, len));
        total += len;
    }
    p.cmd(Cmd::Connect {
        addr: peer_addr,
        opts: ConnectOptions::default(),
        chunks,
    });
    let key = match p.wait("connect result", |e| matches!(e, Event::Connecting { .. })) {
        Event::Connecting {
            result: Ok(key),
            queued,
        } => {
            assert_eq!(
                queued,
                Some(total),
                "bytes sent before connecting were not queued"
            );
            key
        }
        other => panic!("connect did not start: {other:?}"),
    };

    let mut peer = util::accept_within(&peer_listener, EVENT_TIMEOUT);
    p.wait("on_connected", |e| *e == Event::Connected(key));
    let mut got = vec![0u8; total];
    peer.read_exact(&mut got).unwrap();
    assert_eq!(
        pattern.check(0, &got),
        Ok(()),
        "queued bytes arrived out of order"
    );

    // Peer to role, in two writes.
    peer.write_all(b"from the ").unwrap();
    peer.write_all(b"peer").unwrap();
    assert_eq!(p.payload_bytes(key, 13), b"from the peer");

    drop(peer);
    let closed = p.wait(
        "on_closed",
        |e| matches!(e, Event::Closed(k, _) if *k == key),
    );
    assert_eq!(closed, Event::Closed(key, CloseReason::PeerClosed));
    let read_closed = p.position(|e| *e == Event::ReadClosed(key));
    let closed = p.position(|e| matches!(e, Event::Closed(..)));
    assert!(
        read_closed.is_some() && read_closed < closed,
        "{:#?}",
        p.log
    );
    let connected = p.position(|e| *e == Event::Connected(key)).unwrap();
    let first_frame = p.position(|e| matches!(e, Event::Frame { .. })).unwrap();
    assert!(connected < first_frame, "{:#?}", p.log);
    assert!(
        p.position(|e| matches!(e, Event::ConnectFailed(..)))
            .is_none(),
        "{:#?}",
        p.log
    );

    // The loop counts a close after the role has seen it: let that turn end.
    p.barrier();
    let s = p.handle().stats();
    assert_eq!((s.connected_total, s.connect_failed_total), (1, 0), "{s:?}");
    assert_eq!(s.bytes_out_total, total as u64, "{s:?}");
    assert_eq!(s.bytes_in_total, 13, "{s:?}");
    assert_eq!(s.connections, 0, "{s:?}");
    p.stop();
}

#[test]
fn connect_to_a_closed_port_reports_refused_and_never_connected_or_closed() {
    let addr = SocketAddr::from(([127, 0, 0, 1], util::free_port()));
    let mut p = Probed::start(config(), vec![], no_hook);
    p.cmd(Cmd::Connect {
        addr,
        opts: ConnectOptions::default(),
        chunks: vec![b"never delivered".to_vec()],
    });
    let key = match p.wait("connect result", |e| matches!(e, Event::Connecting { .. })) {
        Event::Connecting {
            result: Ok(key), ..
        } => key,
        other => panic!("non-blocking connect failed at once (no on_connect_failed): {other:?}"),
    };
    let failed = p.wait(
        "on_connect_failed",
        |e| matches!(e, Event::ConnectFailed(k, _) if *k == key),
    );
    assert_eq!(
        failed,
        Event::ConnectFailed(key, CloseReason::Io(io::ErrorKind::ConnectionRefused))
    );
    p.barrier();
    assert!(
        p.position(|e| matches!(e, Event::Connected(_) | Event::Closed(..)))
            .is_none(),
        "{:#?}",
        p.log
    );
    p.cmd(Cmd::Send(key, b"late".to_vec()));
    p.wait("send result", |e| {
        *e == Event::Sent(key, Err(SendError::Closed))
    });

    let s = p.handle().stats();
    assert_eq!((s.connected_total, s.connect_failed_total), (0, 1), "{s:?}");
    assert_eq!((s.connections, s.bytes_out_total), (0, 0), "{s:?}");
    p.stop();
}

/// A loopback listener that completes no more handshakes: its accept queue
/// (backlog 0) is filled with connections nobody accepts, and Linux then drops
/// further SYNs. `None` if this kernel kept completing handshakes.
fn unresponsive_listener() -> Option<(socket2::Socket, Vec<TcpStream>)> {
    use socket2::{Domain, Socket, Type};
    let l = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    l.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    l.listen(0).unwrap();
    let addr = l.local_addr().unwrap().as_socket().unwrap();
    let mut held = Vec::new();
    for _ in 0..4 {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(100)) {
            Ok(s) => held.push(s),
            Err(e) if util::is_timeout(&e) => return Some((l, held)),
            Err(e) => panic!("filling the accept queue: {e}"),
        }
    }
    None
}

#[test]
fn connect_to_a_peer_that_never_answers_times_out() {
    let Some((listener, _held)) = unresponsive_listener() else {
        eprintln!("SKIPPED: the kernel completes loopback handshakes past a full accept queue");
        return;
    };
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    let config = EngineConfig {
        connect_timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let mut p = Probed::start(config, vec![], no_hook);
    let t0 = Instant::now();
    // One with its own timeout, one with the engine's.
    for timeout in [Some(Duration::from_millis(300)), None] {
        let opts = ConnectOptions {
            timeout,
            ..Default::default()
        };
        p.cmd(Cmd::Connect {
            addr,
            opts,
            chunks: vec![b"queued".to_vec()],
        });
    }
    let mut keys = Vec::new();
    for _ in 0..2 {
        match p.wait("connect result", |e| matches!(e, Event::Connecting { .. })) {
            Event::Connecting {
                result: Ok(key), ..
            } => keys.push(key),
            other => panic!("connect did not start: {other:?}"),
        }
    }
    let mut at = Vec::new();
    for key in &keys {
        let e = p.wait(
            "connect outcome",
            |e| matches!(e, Event::ConnectFailed(k, _) | Event::Connected(k) if k == key),
        );
        if matches!(e, Event::Connected(_)) {
            eprintln!("SKIPPED: the kernel completed a handshake past a full accept queue");
            p.stop();
            return;
        }
        assert_eq!(e, Event::ConnectFailed(*key, CloseReason::ConnectTimeout));
        at.push(t0.elapsed());
    }
    eprintln!(
        "connect timeouts fired after {:?} (300ms) and {:?} (500ms)",
        at[0], at[1]
    );
    assert!(
        at[0] >= Duration::from_millis(300) && at[0] < Duration::from_secs(5),
        "{at:?}"
    );
    assert!(
        at[1] >= Duration::from_millis(500) && at[1] < Duration::from_secs(5),
        "{at:?}"
    );
    p.barrier();
    let s = p.handle().stats();
    assert_eq!((s.connected_total, s.connect_failed_total), (0, 2), "{s:?}");
    assert_eq!(s.connections, 0, "{s:?}");
    p.stop();
}

#[test]
fn close_while_connecting_still_delivers_the_queued_bytes() {
    let peer_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let peer_addr = peer_listener.local_addr().unwrap();
    // "Send a request and close": the close comes before the connect completes.
    let hook = |ctx: &mut Ctx<'_>, e: &Event| {
        if let Event::Connecting {
            result: Ok(key), ..
        } = e
        {
            ctx.close(*key);
        }
        None
    };
    let mut p = Probed::start(config(), vec![], hook);
    p.cmd(Cmd::Connect {
        addr: peer_addr,
        opts: ConnectOptions::default(),
        chunks: vec![b"request".to_vec()],
    });
    let mut peer = util::accept_within(&peer_listener, EVENT_TIMEOUT);
    assert_eq!(read_until_closed(&mut peer), b"request");
    let e = p.wait("outcome", |e| {
        matches!(e, Event::ConnectFailed(..) | Event::Closed(..))
    });
    assert!(matches!(e, Event::Closed(_, CloseReason::Local)), "{e:?}");
    p.stop();
}

// ----- timers -----

#[test]
fn timers_fire_with_their_token_and_cancelled_ones_never_do() {
    let mut p = Probed::start(config(), vec![], no_hook);
    let t0 = Instant::now();
    fn set(p: &mut Probed, after_ms: u64, token: u64) -> TimerKey {
        p.cmd(Cmd::SetTimer {
            after: Duration::from_millis(after_ms),
            token,
        });
        match p.wait(
            "timer set",
            |e| matches!(e, Event::TimerSet(t, _) if *t == token),
        ) {
            Event::TimerSet(_, key) => key,
            _ => unreachable!(),
        }
    }
    let due = set(&mut p, 0, 6);
    let k7 = set(&mut p, 50, 7);
    let k8 = set(&mut p, 60, 8);
    p.cmd(Cmd::CancelTimer(k8));
    p.wait("cancel", |e| *e == Event::TimerCancelled(k8));

    p.wait("due timer", |e| *e == Event::Timer(due, 6));
    p.wait("50ms timer", |e| *e == Event::Timer(k7, 7));
    let fired_7 = t0.elapsed();
    assert!(
        fired_7 >= Duration::from_millis(50),
        "fired early: {fired_7:?}"
    );

    // Cancelling a timer that already fired is ignored, even once its slot
    // holds a new timer.
    let k9 = set(&mut p, 100, 9);
    p.cmd(Cmd::CancelTimer(k7));
    p.wait("cancel", |e| *e == Event::TimerCancelled(k7));
    p.wait("100ms timer", |e| *e == Event::Timer(k9, 9));
    let fired_9 = t0.elapsed();
    eprintln!("timers fired after {fired_7:?} (50ms) and {fired_9:?} (100ms after that)");

    // Well past the cancelled timer's deadline (60ms) by now.
    assert!(fired_9 >= Duration::from_millis(150), "{fired_9:?}");
    p.barrier();
    assert!(
        p.position(|e| matches!(e, Event::Timer(_, 8))).is_none(),
        "cancelled timer fired: {:#?}",
        p.log
    );
    p.stop();
}

#[test]
fn connection_timers_fire_with_their_connection_and_die_with_it() {
    let mut p = Probed::start(config(), vec![raw_listener()], no_hook);
    let a_client = connect(p.addr(0));
    let a = p.accepted(0);
    let _b_client = connect(p.addr(0));
    let b = p.accepted(0);
    fn set(p: &mut Probed, conn: ConnKey, after_ms: u64, purpose: u64) -> Option<TimerKey> {
        p.cmd(Cmd::SetConnTimer {
            conn,
            after: Duration::from_millis(after_ms),
            purpose,
        });
        match p.wait(
            "conn timer set",
            |e| matches!(e, Event::ConnTimerSet(c, n, _) if *c == conn && *n == purpose),
        ) {
            Event::ConnTimerSet(_, _, key) => key,
            _ => unreachable!(),
        }
    }
    let a1 = set(&mut p, a, 150, 1).expect("a is open");
    // More than the engine tracks inline per connection (two): the third
    // must not reach the role after the close either.
    set(&mut p, a, 150, 5).expect("a is open");
    set(&mut p, a, 150, 6).expect("a is open");
    let b2 = set(&mut p, b, 150, 2).expect("b is open");
    let b3 = set(&mut p, b, 100, 3).expect("b is open");
    p.cmd(Cmd::CancelTimer(b3));
    p.wait("cancel", |e| *e == Event::TimerCancelled(b3));
    // `a` closes before its timer is due: the engine cancels it.
    drop(a_client);
    p.wait("on_closed", |e| {
        *e == Event::Closed(a, CloseReason::PeerClosed)
    });
    assert_eq!(
        set(&mut p, a, 0, 4),
        None,
        "a timer for a closed connection"
    );
    p.wait("b's timer", |e| *e == Event::ConnTimer(b, b2, 2));
    thread::sleep(Duration::from_millis(50));
    p.barrier();
    assert!(
        p.position(|e| matches!(e, Event::ConnTimer(k, _, _) if *k == a))
            .is_none()
            && p.position(|e| matches!(e, Event::ConnTimer(_, _, 3)))
                .is_none(),
        "a closed connection's or a cancelled timer fired ({a1:?}): {:#?}",
        p.log
    );
    p.stop();
}

#[test]
fn connections_carry_their_listeners_tag_until_the_role_changes_it() {
    let tagged = ListenOptions {
        tag: 7,
        ..raw_listener()
    };
    let mut p = Probed::start(config(), vec![raw_listener(), tagged], no_hook);
    let _plain_client = connect(p.addr(0));
    let plain = p.accepted(0);
    let tagged_client = connect(p.addr(1));
    let t = p.accepted(1);
    p.cmd(Cmd::SetTag(plain, 3));
    p.wait("tag", |e| *e == Event::Tagged(plain, Some(0), Some(3)));
    p.cmd(Cmd::SetTag(t, 9));
    p.wait("tag", |e| *e == Event::Tagged(t, Some(7), Some(9)));
    drop(tagged_client);
    p.wait("on_closed", |e| {
        *e == Event::Closed(t, CloseReason::PeerClosed)
    });
    // A stale key has no tag, and setting one does nothing.
    p.cmd(Cmd::SetTag(t, 11));
    p.wait("stale tag", |e| *e == Event::Tagged(t, None, None));
    p.stop();
}

// ----- messages from other threads -----

#[test]
fn handle_messages_reach_the_role_which_acts_on_them_and_fail_once_stopped() {
    let config = EngineConfig {
        inbox: 2,
        ..config()
    };
    let mut p = Probed::start(config, vec![raw_listener()], no_hook);
    let mut client = connect(p.addr(0));
    let key = p.accepted(0);

    let payload = b"hello from the test thread".to_vec();
    p.cmd(Cmd::Send(key, payload.clone()));
    p.wait("send result", |e| *e == Event::Sent(key, Ok(())));
    let mut got = vec![0u8; payload.len()];
    client.read_exact(&mut got).unwrap();
    assert_eq!(got, payload);

    // Any `Send` type goes; the role decides what it understands.
    p.handle().send(p.role, Box::new(42u32)).unwrap();
    p.wait("unknown message", |e| *e == Event::Unknown(Some(42)));
    p.handle().send(p.role, Box::new("text")).unwrap();
    p.wait("unknown message", |e| *e == Event::Unknown(None));

    // The inbox is bounded: with the loop busy, the third message is refused.
    p.cmd(Cmd::Block(Duration::from_millis(200)));
    p.wait("blocking", |e| *e == Event::Blocking);
    let h = p.handle().clone();
    let results: Vec<_> = (1..=3)
        .map(|n| h.send(p.role, Box::new(Cmd::Barrier(100 + n))))
        .collect();
    assert_eq!(results, [Ok(()), Ok(()), Err(HandleError::Full)]);
    p.wait("queued message", |e| *e == Event::Barrier(101));
    p.wait("queued message", |e| *e == Event::Barrier(102));
    p.barrier();
    assert!(p.position(|e| *e == Event::Barrier(103)).is_none());

    let role = p.role;
    p.stop();
    assert_eq!(
        h.send(role, Box::new(Cmd::Barrier(0))).unwrap_err(),
        HandleError::Stopped
    );
    h.stop();
    assert_eq!(read_until_closed(&mut client), b"");
}

/// A role that refuses to start.
struct Refuses;

impl Role for Refuses {
    fn name(&self) -> &str {
        "refuses"
    }

    fn start(&mut self, _: &mut Ctx<'_>) -> Result<(), EngineError> {
        Err(EngineError::Role {
            role: "refuses".into(),
            message: "not today".into(),
        })
    }

    fn on_frame(&mut self, _: &mut Ctx<'_>, _: ConnKey, _: Frame<'_>) {}
}

#[test]
fn a_handle_to_an_engine_that_is_gone_refuses_messages() {
    // Dropped without ever running.
    let mut engine = switchboard::Engine::new(config()).unwrap();
    let role = engine.add_role(Box::new(Refuses));
    let h = engine.handle();
    drop(engine);
    assert_eq!(h.send(role, Box::new(1u32)), Err(HandleError::Stopped));

    // `run` failed to start it.
    let mut engine = switchboard::Engine::new(config()).unwrap();
    let role = engine.add_role(Box::new(Refuses));
    let h = engine.handle();
    let thread = thread::spawn(move || engine.run());
    assert!(
        util::wait_until(EVENT_TIMEOUT, || thread.is_finished()),
        "run did not return"
    );
    let result = thread.join().unwrap();
    assert!(
        matches!(result, Err(EngineError::Role { .. })),
        "{result:?}"
    );
    assert_eq!(h.send(role, Box::new(1u32)), Err(HandleError::Stopped));
}

// ----- pause and resume -----

#[test]
fn paused_connections_read_nothing_until_resumed_then_everything_in_order() {
    const TOTAL: usize = 256 * 1024;
    const PAUSE_AT: usize = 32 * 1024;
    const TIMER_PAUSE: Duration = Duration::from_millis(150);
    // Pause every accepted connection at once; pause again once PAUSE_AT
    // bytes have arrived and resume from a timer.
    let mut received = 0;
    let hook = move |ctx: &mut Ctx<'_>, e: &Event| match e {
        Event::Accept { conn, .. } => {
            ctx.pause_reading(*conn);
            Some(Event::Note(
                "paused on accept",
                *conn,
                usize::from(ctx.is_paused(*conn)),
            ))
        }
        Event::Frame { conn, payload, .. } => {
            let before = received;
            received += payload.len();
            (before < PAUSE_AT && received >= PAUSE_AT).then(|| {
                ctx.pause_reading(*conn);
                ctx.set_timer(ctx.now() + TIMER_PAUSE, conn.to_u64());
                Event::Note("paused after", *conn, received)
            })
        }
        Event::Timer(_, token) => {
            let conn = ConnKey::from_u64(*token);
            ctx.resume_reading(conn);
            Some(Event::Note(
                "resumed by timer",
                conn,
                usize::from(ctx.is_paused(conn)),
            ))
        }
        _ => None,
    };
    let mut p = Probed::start(config(), vec![raw_listener()], hook);
    let client = connect(p.addr(0));
    let key = p.accepted(0);
    let note = p.wait("pause", |e| matches!(e, Event::Note(..)));
    assert_eq!(note, Event::Note("paused on accept", key, 1));

    let pattern = Pattern::new(6);
    let mut writer_sock = client.try_clone().unwrap();
    let writer = thread::spawn(move || {
        let mut sent = 0;
        while sent < TOTAL {
            let c = pattern.chunk(sent as u64, (TOTAL - sent).min(16 * 1024));
            writer_sock.write_all(c).unwrap();
            sent += c.len();
        }
        writer_sock.shutdown(Shutdown::Write).unwrap();
    });

    // Paused: the bytes wait in the kernel.
    thread::sleep(Duration::from_millis(100));
    p.barrier();
    let s = p.handle().stats();
    assert_eq!(s.bytes_in_total, 0, "read while paused: {}", brief(&s));
    assert!(p.position(|e| matches!(e, Event::Frame { .. })).is_none());

    p.cmd(Cmd::Resume(key));
    p.wait("resume", |e| *e == Event::Resumed(key));
    let paused = p.wait("second pause", |e| {
        matches!(e, Event::Note("paused after", ..))
    });
    let Event::Note(_, _, at) = paused else {
        unreachable!()
    };
    let in_at_pause = p.handle().stats().bytes_in_total;
    thread::sleep(Duration::from_millis(60));
    let in_later = p.handle().stats().bytes_in_total;
    assert_eq!(in_at_pause, in_later, "read while paused by the role");
    assert!(
        (in_at_pause as usize) < TOTAL,
        "everything was read before the pause"
    );
    assert!(at >= PAUSE_AT);

    let resumed = p.wait("timer resume", |e| {
        matches!(e, Event::Note("resumed by timer", ..))
    });
    assert_eq!(resumed, Event::Note("resumed by timer", key, 0));
    let from = p
        .position(|e| matches!(e, Event::Note("paused after", ..)))
        .unwrap();
    let to = p
        .position(|e| matches!(e, Event::Note("resumed by timer", ..)))
        .unwrap();
    assert!(
        !p.log[from..to]
            .iter()
            .any(|e| matches!(e, Event::Frame { .. })),
        "frame delivered while paused: {:#?}",
        &p.log[from..to]
    );

    // Everything arrives, in order.
    let got = p.payload_bytes(key, TOTAL);
    assert_eq!(
        pattern.check(0, &got),
        Ok(()),
        "bytes lost or reordered across pauses"
    );
    writer.join().unwrap();
    p.wait("on_closed", |e| {
        *e == Event::Closed(key, CloseReason::PeerClosed)
    });
    assert_eq!(p.handle().stats().bytes_in_total, TOTAL as u64);
    p.stop();
}

// ----- framing -----

#[test]
fn framing_lines_length_prefixes_and_a_switch_between_them() {
    const U16_MAX: usize = 300;
    let line = ListenOptions {
        framing: Framing::Line { max: 16 },
        ..Default::default()
    };
    let u16 = ListenOptions {
        framing: Framing::U16 { max: U16_MAX },
        ..Default::default()
    };
    // A line "SWITCH U16" switches its connection to length-prefixed frames.
    let hook = |ctx: &mut Ctx<'_>, e: &Event| {
        if let Event::Frame { conn, payload, .. } = e
            && payload == b"SWITCH U16"
        {
            ctx.set_framing(*conn, Framing::U16 { max: U16_MAX });
        }
        None
    };
    let mut p = Probed::start(config(), vec![line, u16], hook);

    // Lines: CRLF stripped from the payload and kept in the raw frame, split
    // across writes, exactly `max` long, empty.
    let mut c1 = connect(p.addr(0));
    let k1 = p.accepted(0);
    c1.write_all(b"hello\r\nwor").unwrap();
    thread::sleep(Duration::from_millis(5));
    c1.write_all(b"ld\n123456789abcdef\n\n").unwrap();
    let want: [(&[u8], &[u8]); 4] = [
        (b"hello\r\n", b"hello"),
        (b"world\n", b"world"),
        (b"123456789abcdef\n", b"123456789abcdef"),
        (b"\n", b""),
    ];
    for (raw, payload) in want {
        assert_eq!(p.frame(k1), (raw.to_vec(), payload.to_vec()));
    }
    // One byte over the maximum closes the connection.
    c1.write_all(b"123456789abcdefX\n").unwrap();
    let closed = p.wait(
        "on_closed",
        |e| matches!(e, Event::Closed(k, _) if *k == k1),
    );
    assert_eq!(
        closed,
        Event::Closed(
            k1,
            CloseReason::Frame(FrameError::TooLong { len: 17, max: 16 })
        )
    );
    assert_eq!(read_until_closed(&mut c1), b"");
    assert_eq!(p.handle().stats().frame_errors_total, 1);

    // Switching framing from inside on_frame: bytes that arrived with the
    // line are decoded with the new framing, none lost.
    let mut c2 = connect(p.addr(0));
    let k2 = p.accepted(0);
    let big = pattern_bytes(Pattern::new(7), 0, U16_MAX);
    let mut input = b"SWITCH U16\n".to_vec();
    input.extend(u16_frame(b"bin\n\0ary"));
    input.extend(u16_frame(&big));
    c2.write_all(&input).unwrap();
    assert_eq!(p.frame(k2).1, b"SWITCH U16");
    assert_eq!(
        p.frame(k2),
        (u16_frame(b"bin\n\0ary"), b"bin\n\0ary".to_vec())
    );
    assert_eq!(p.frame(k2), (u16_frame(&big), big.clone()));
    c2.write_all(&u16::try_from(U16_MAX + 1).unwrap().to_be_bytes())
        .unwrap();
    let closed = p.wait(
        "on_closed",
        |e| matches!(e, Event::Closed(k, _) if *k == k2),
    );
    let too_long = FrameError::TooLong {
        len: U16_MAX + 1,
        max: U16_MAX,
    };
    assert_eq!(closed, Event::Closed(k2, CloseReason::Frame(too_long)));
    assert_eq!(p.handle().stats().frame_errors_total, 2);

    // Length-prefixed frames from ListenOptions, written a few bytes at a time.
    let mut c3 = connect(p.addr(1));
    let k3 = p.accepted(1);
    let pattern = Pattern::new(8);
    let lens = [0, 1, 2, 255, 256, U16_MAX];
    let mut stream = Vec::new();
    let mut at = 0;
    for len in lens {
        stream.extend(u16_frame(&pattern_bytes(pattern, at, len)));
        at += len as u64;
    }
    for (i, piece) in stream.chunks(7).enumerate() {
        if i < 4 {
            // The first frames byte by byte.
            for b in piece {
                c3.write_all(&[*b]).unwrap();
                thread::sleep(Duration::from_millis(1));
            }
        } else {
            c3.write_all(piece).unwrap();
            if i % 8 == 0 {
                thread::sleep(Duration::from_millis(1));
            }
        }
    }
    let mut at = 0;
    for len in lens {
        let payload = pattern_bytes(pattern, at, len);
        assert_eq!(
            p.frame(k3),
            (u16_frame(&payload), payload),
            "frame of {len} bytes"
        );
        at += len as u64;
    }
    c3.shutdown(Shutdown::Write).unwrap();
    p.wait("on_closed", |e| {
        *e == Event::Closed(k3, CloseReason::PeerClosed)
    });
    assert_eq!(read_until_closed(&mut c3), b"");
    assert_eq!(p.handle().stats().frame_errors_total, 2);
    p.stop();
}

// ----- stale keys -----

#[test]
fn a_stale_key_does_nothing_even_after_its_slot_is_reused() {
    let mut p = Probed::start(config(), vec![raw_listener()], no_hook);
    let a_client = connect(p.addr(0));
    let a = p.accepted(0);
    drop(a_client);
    p.wait("on_closed", |e| {
        *e == Event::Closed(a, CloseReason::PeerClosed)
    });
    p.cmd(Cmd::Send(a, b"gone".to_vec()));
    p.wait("send result", |e| {
        *e == Event::Sent(a, Err(SendError::Closed))
    });

    let mut b_client = connect(p.addr(0));
    let b = p.accepted(0);
    assert_eq!(b.index, a.index, "the slab slot was not reused");
    assert_ne!(b.generation, a.generation);

    p.cmd(Cmd::Poke(a));
    let poked = p.wait("poke", |e| matches!(e, Event::Poked(_)));
    assert_eq!(
        poked,
        Event::Poked(Poke {
            conn: a,
            send: Err(SendError::Closed),
            send_bytes: Err(SendError::Closed),
            queued: None,
            send_capacity: None,
            peer_addr: None,
            is_paused_after_pause: false,
        })
    );
    // Had the idle timeout, framing, pause, close or abort reached `b`, it
    // would be closed, or its raw bytes would break `Line { max: 1 }`.
    thread::sleep(Duration::from_millis(30));
    p.cmd(Cmd::Send(b, b"still here".to_vec()));
    p.wait("send result", |e| *e == Event::Sent(b, Ok(())));
    let mut got = [0u8; 10];
    b_client.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"still here");
    b_client.write_all(b"abc").unwrap();
    assert_eq!(p.payload_bytes(b, 3), b"abc");
    p.barrier();
    assert!(
        p.position(|e| matches!(e, Event::Closed(k, _) if *k == b))
            .is_none(),
        "{:#?}",
        p.log
    );
    assert_eq!(p.handle().connections(), 1);

    drop(b_client);
    p.wait("on_closed", |e| {
        *e == Event::Closed(b, CloseReason::PeerClosed)
    });
    p.stop();
}

// ----- close after flush -----

#[test]
fn close_flushes_everything_queued_then_closes() {
    // More than the kernel can absorb (the engine's send buffer at its largest
    // plus the client's small window), so the engine must keep the rest.
    let n = (util::kernel_send_buffer_max() + 2 * 1024 * 1024) as usize;
    let opts = ListenOptions {
        queue_bytes: Some(n + 1024 * 1024),
        ..Default::default()
    };
    let mut p = Probed::start(config(), vec![opts], no_hook);
    let mut client = util::connect_with_recv_buffer(p.addr(0), 32 * 1024);
    let key = p.accepted(0);

    let mut data = vec![0u8; n];
    let pattern = Pattern::new(9);
    pattern.fill(0, &mut data);
    p.cmd(Cmd::SendAndClose(key, Bytes::from(data)));
    let e = p.wait("send and close", |e| {
        matches!(e, Event::SentAndClosed { .. })
    });
    assert_eq!(
        e,
        Event::SentAndClosed {
            conn: key,
            sends: [Ok(()), Ok(())],
            queued_at_close: Some(n),
            send_after_close: Err(SendError::Closed),
        }
    );

    // The client has not read: the connection stays open, flushing.
    thread::sleep(Duration::from_millis(100));
    let s = p.handle().stats();
    assert_eq!(s.connections, 1, "closed before flushing: {}", brief(&s));
    assert!(
        (s.bytes_out_total as usize) < n,
        "nothing left queued: {}",
        brief(&s)
    );
    p.barrier();
    assert!(p.position(|e| matches!(e, Event::Closed(..))).is_none());

    let got = util::read_to_eof(&mut client, n);
    assert_eq!(got.len(), n, "close lost queued bytes");
    assert_eq!(pattern.check(0, &got), Ok(()));
    p.wait("on_closed", |e| {
        *e == Event::Closed(key, CloseReason::Local)
    });
    let h = p.handle();
    wait_for(
        "the connection to be gone",
        Duration::from_secs(5),
        || h.connections() == 0,
        || brief(&h.stats()),
    );
    assert_eq!(h.stats().bytes_out_total, n as u64);
    p.stop();
}
