//! The router role end to end (issue 4, item 7): an in-process engine on
//! loopback driven with std sockets. Devices dial the first listener and
//! identify themselves (by the id they send first, or by their source address);
//! applications attach to each connection point's own listener, or the router
//! dials a `connect` upstream on the device's behalf.
//!
//! Every test builds its own engine from TOML, so the listener order is: the
//! device port (`addrs[0]`), then the `listen` connpts in config order.
//! Timeouts in these configs are short (hundreds of milliseconds) so that the
//! whole file runs in seconds; timing assertions allow generous slack.
//!
//! The scale test holds the client side (devices and applications) in a child
//! process, this same test binary re-run on [`scale_client_holder`], because
//! the engine and the clients together need more descriptors than one process
//! may hold.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly"
)]

mod util;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};
use switchboard::Config;
use switchboard::config::{Duplicate, Identity, Offline};
use switchboard::role::Router;
use switchboard::role::router::RouterStats;

use util::{
    Captured, ChildGuard, IO_TIMEOUT, Pattern, TestEngine, accept_within, brief, closed_within,
    connect, connect_from, expect_bytes, is_timeout, show, target_command, temp_file, wait_for,
};

/// Bound on waiting for a counter or an event.
const WAIT: Duration = Duration::from_secs(10);
/// How long "nothing arrives" is watched for.
const QUIET: Duration = Duration::from_millis(150);
/// "Closed at once": EOF must come within this.
const AT_ONCE: Duration = Duration::from_secs(1);

// ----- sockets -----

/// Read whatever arrives on `s` for `dur`; returns the bytes and whether the
/// connection was closed (EOF or reset).
fn read_for(s: &mut TcpStream, dur: Duration) -> (Vec<u8>, bool) {
    let deadline = Instant::now() + dur;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let mut closed = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match s.read(&mut buf) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if is_timeout(&e) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                closed = true;
                break;
            }
            Err(e) => panic!("read failed: {e}"),
        }
    }
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    (out, closed)
}

/// Nothing arrives on `s` for [`QUIET`], and it stays open.
fn expect_quiet(s: &mut TcpStream) {
    let (got, closed) = read_for(s, QUIET);
    assert!(
        got.is_empty() && !closed,
        "expected silence, got {:?}{}",
        show(&got),
        if closed { " and then a close" } else { "" }
    );
}

/// The engine closes `s` within [`AT_ONCE`].
fn expect_closed(s: &mut TcpStream) {
    closed_within(s, AT_ONCE);
}

fn finish_socket(s: Socket) -> TcpStream {
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// A socket bound to `src` (a loopback address; port 0 for any), not yet connected.
fn bound_socket(src: SocketAddr) -> Socket {
    let s = Socket::new(Domain::for_address(src), Type::STREAM, None).unwrap();
    s.bind(&src.into())
        .unwrap_or_else(|e| panic!("bind {src}: {e}"));
    s
}

/// Connect an already bound socket to `dst`.
fn connect_bound(s: Socket, dst: SocketAddr) -> TcpStream {
    s.connect_timeout(&dst.into(), IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect to {dst}: {e}"));
    finish_socket(s)
}

// ----- the engine -----

/// One `[[router.connpt]]` table with an application port.
fn cp(name: &str, id: &str) -> String {
    format!("[[router.connpt]]\nname = \"{name}\"\nid = \"{id}\"\nlisten = \"127.0.0.1:0\"\n")
}

/// An engine running one router role whose counters the test keeps.
struct Rt {
    engine: TestEngine,
    stats: Arc<RouterStats>,
}

impl Rt {
    /// A router on loopback port 0 with `keys` in its table and the connpt
    /// tables `connpts` (from [`cp`]) after them.
    fn start(keys: &str, connpts: &str) -> Rt {
        Rt::start_toml(&format!(
            "[[router]]\nlisten = \"127.0.0.1:0\"\n{keys}\n{connpts}"
        ))
    }

    fn start_toml(toml: &str) -> Rt {
        let cfg = Config::parse(toml).unwrap_or_else(|e| panic!("bad test config: {e}"));
        let router = Router::new(&cfg.router[0]);
        let stats = router.stats();
        let (engine, _) = TestEngine::with_roles(cfg.engine.clone(), vec![Box::new(router)]);
        let listens = cfg.router[0]
            .connpt
            .iter()
            .filter(|c| c.listen.is_some())
            .count();
        assert_eq!(
            engine.addrs.len(),
            1 + listens,
            "the router opens the device port and one port per listen connpt"
        );
        Rt { engine, stats }
    }

    /// Where devices dial.
    fn devices(&self) -> SocketAddr {
        self.engine.addrs[0]
    }

    /// The application port of the `i`-th listen connpt.
    fn app_port(&self, i: usize) -> SocketAddr {
        self.engine.addrs[1 + i]
    }

    /// Wait for the counter `which` to reach exactly `want`.
    fn wait(&self, what: &str, which: impl Fn(&RouterStats) -> &AtomicU64, want: u64) {
        wait_for(
            &format!("{what} == {want}"),
            WAIT,
            || which(&self.stats).load(Ordering::Relaxed) == want,
            || (&self.stats, brief(&self.engine.stats())),
        );
    }

    fn get(&self, which: impl Fn(&RouterStats) -> &AtomicU64) -> u64 {
        which(&self.stats).load(Ordering::Relaxed)
    }

    /// Wait until the engine has accepted `n` more connections than `before`
    /// (so the role has seen them).
    fn wait_accepted(&self, before: u64, n: u64) {
        wait_for(
            &format!("{n} more accepted"),
            WAIT,
            || self.engine.stats().accepted_total >= before + n,
            || brief(&self.engine.stats()),
        );
    }

    /// Attach an application to the `i`-th listen connpt and wait until the
    /// engine has accepted it.
    fn attach(&self, i: usize) -> TcpStream {
        let before = self.engine.stats().accepted_total;
        let s = connect(self.app_port(i));
        self.wait_accepted(before, 1);
        s
    }

    /// A device connection that has sent `hello` (nothing waited for).
    fn device(&self, hello: &[u8]) -> TcpStream {
        let mut s = connect(self.devices());
        if !hello.is_empty() {
            s.write_all(hello).unwrap();
        }
        s
    }

    /// A device that sends `hello` and is identified (as a new device, not a
    /// takeover).
    fn online(&self, hello: &[u8]) -> TcpStream {
        let before = self.get(|s| &s.identified_total);
        let online = self.get(|s| &s.online);
        let s = self.device(hello);
        self.wait("identified_total", |s| &s.identified_total, before + 1);
        self.wait("online", |s| &s.online, online + 1);
        s
    }

    /// The recent unknown ids as logs show them (quoted text or `hex:..`).
    fn recent_unknown(&self) -> Vec<(String, SocketAddr)> {
        self.stats
            .recent_unknown()
            .into_iter()
            .map(|(id, peer)| (id.to_string(), peer))
            .collect()
    }
}

// ----- identification -----

#[test]
fn id_and_data_in_one_write_reach_the_application_exactly() {
    let rt = Rt::start("", &(cp("c1", "c0001") + &cp("c2", "c0002")));
    let mut app1 = rt.attach(0);
    let mut app2 = rt.attach(1);
    let mut dev = rt.online(b"c0001hello\x00\x01\xff");
    expect_bytes(&mut app1, b"hello\x00\x01\xff");
    expect_quiet(&mut app1);
    expect_quiet(&mut app2);

    // Later bytes follow, and the other direction works.
    dev.write_all(b" more").unwrap();
    expect_bytes(&mut app1, b" more");
    app1.write_all(b"\x01\x03\x00\x00\x00\x02").unwrap();
    expect_bytes(&mut dev, b"\x01\x03\x00\x00\x00\x02");
    expect_quiet(&mut dev);
    assert_eq!(rt.get(|s| &s.unknown_total), 0);
    rt.engine.stop();
}

#[test]
fn id_split_over_three_writes_is_identified_without_waiting() {
    // A long gap and id timeout: identification must not wait for either.
    let rt = Rt::start(
        "id_gap = \"2s\"\nid_timeout = \"5s\"",
        &(cp("c1", "c0001") + &cp("c2", "c0002")),
    );
    let mut app1 = rt.attach(0);
    let mut app2 = rt.attach(1);

    // The id alone, in three writes, then data.
    let mut dev1 = rt.device(b"c");
    for piece in [&b"000"[..], b"1"] {
        thread::sleep(Duration::from_millis(40));
        dev1.write_all(piece).unwrap();
    }
    let t0 = Instant::now();
    rt.wait("online", |s| &s.online, 1);
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(1), "identified after {took:?}");
    dev1.write_all(b"data").unwrap();
    expect_bytes(&mut app1, b"data");

    // The third write carries the end of the id and the first data.
    let mut dev2 = rt.device(b"c0");
    for piece in [&b"00"[..], b"2first"] {
        thread::sleep(Duration::from_millis(40));
        dev2.write_all(piece).unwrap();
    }
    expect_bytes(&mut app2, b"first");
    expect_quiet(&mut app1);
    expect_quiet(&mut app2);
    assert_eq!(rt.get(|s| &s.identified_total), 2);
    drop((dev1, dev2));
    rt.engine.stop();
}

#[test]
fn delimiter_after_the_id_is_not_forwarded() {
    let rt = Rt::start(
        "id_delimiter = \"\\r\\n\"",
        &(cp("c1", "c0001") + &cp("c2", "c0002")),
    );
    let mut app1 = rt.attach(0);
    let mut app2 = rt.attach(1);

    let _dev1 = rt.online(b"c0001\r\nhello");
    expect_bytes(&mut app1, b"hello");
    expect_quiet(&mut app1);

    // The delimiter itself split across writes.
    let mut dev2 = rt.device(b"c00");
    for piece in [&b"02\r"[..], b"\nworld"] {
        thread::sleep(Duration::from_millis(40));
        dev2.write_all(piece).unwrap();
    }
    expect_bytes(&mut app2, b"world");
    // A later CR LF is data.
    dev2.write_all(b"\r\n").unwrap();
    expect_bytes(&mut app2, b"\r\n");
    expect_quiet(&mut app2);
    rt.engine.stop();
}

#[test]
fn hex_delimiter_is_accepted() {
    let rt = Rt::start("id_delimiter = \"hex:0d0a\"", &cp("c1", "hex:c0ffee"));
    let mut app = rt.attach(0);
    let _dev = rt.online(b"\xc0\xff\xee\r\n\x01\x02");
    expect_bytes(&mut app, b"\x01\x02");
    expect_quiet(&mut app);
    rt.engine.stop();
}

#[test]
fn prefix_ambiguous_ids_wait_for_the_gap_only_when_needed() {
    const GAP: Duration = Duration::from_millis(400);
    let rt = Rt::start(
        "id_gap = \"400ms\"",
        &(cp("short", "c01") + &cp("long", "c012")),
    );
    let mut app_short = rt.attach(0);
    let mut app_long = rt.attach(1);

    // "c012" is no other id's prefix: matched at once.
    let t0 = Instant::now();
    let a = rt.device(b"c012xyz");
    expect_bytes(&mut app_long, b"xyz");
    let took = t0.elapsed();
    assert!(took < GAP * 3 / 4, "c012 matched only after {took:?}");
    drop(a);
    rt.wait("online", |s| &s.online, 0);

    // "c01" and silence: c01 after the gap; what follows is c01's data, even
    // a byte that would have made "c012".
    let t0 = Instant::now();
    let mut b = rt.device(b"c01");
    rt.wait("online", |s| &s.online, 1);
    let took = t0.elapsed();
    assert!(
        took >= GAP * 7 / 8 && took < GAP + Duration::from_secs(1),
        "\"c01\" then silence matched after {took:?}, want about {GAP:?}"
    );
    b.write_all(b"2zz").unwrap();
    expect_bytes(&mut app_short, b"2zz");
    expect_quiet(&mut app_long);

    // "c01", then within the gap "2abc": c012 with data "abc".
    let mut c = rt.device(b"c01");
    thread::sleep(Duration::from_millis(50));
    c.write_all(b"2abc").unwrap();
    expect_bytes(&mut app_long, b"abc");
    rt.wait("online", |s| &s.online, 2);
    expect_quiet(&mut app_short);

    // "c01" followed by a byte that cannot continue "c012": c01 at once (a
    // takeover of b, under the default duplicate = "replace").
    let t0 = Instant::now();
    let _d = rt.device(b"c01Q");
    expect_bytes(&mut app_short, b"Q");
    let took = t0.elapsed();
    assert!(took < GAP * 3 / 4, "\"c01Q\" matched only after {took:?}");
    expect_closed(&mut b);
    assert_eq!(rt.get(|s| &s.unknown_total), 0);
    drop(c);
    rt.engine.stop();
}

#[test]
fn unknown_ids_are_closed_at_once_and_recorded() {
    let rt = Rt::start(
        "recent_unknown = 2",
        &(cp("c1", "c0001") + &cp("c2", "c0002")),
    );
    let mut app = rt.attach(0);

    // Not a prefix of any id.
    let mut u1 = rt.device(b"zz99\x01");
    let u1_addr = u1.local_addr().unwrap();
    expect_closed(&mut u1);
    rt.wait("unknown_total", |s| &s.unknown_total, 1);
    let recent = rt.recent_unknown();
    assert!(
        recent.iter().any(|(preview, peer)| *peer == u1_addr
            && (preview.contains("zz99") || preview.contains("7a7a3939"))),
        "recent_unknown lacks (\"zz99..\" as text or hex, {u1_addr}): {recent:?}"
    );

    // Starts like a known id, then leaves it.
    let t0 = Instant::now();
    let mut u2 = rt.device(b"c00");
    thread::sleep(Duration::from_millis(40));
    u2.write_all(b"X9").unwrap();
    let u2_addr = u2.local_addr().unwrap();
    closed_within(&mut u2, AT_ONCE + Duration::from_millis(40));
    assert!(t0.elapsed() < Duration::from_secs(2));
    rt.wait("unknown_total", |s| &s.unknown_total, 2);

    // Binary junk: the preview is printable.
    let mut u3 = rt.device(b"\x01\xfe\x00\x7f");
    let u3_addr = u3.local_addr().unwrap();
    expect_closed(&mut u3);
    rt.wait("unknown_total", |s| &s.unknown_total, 3);

    // The table holds the last two only.
    let recent = rt.recent_unknown();
    assert_eq!(recent.len(), 2, "recent_unknown = 2 keeps two: {recent:?}");
    let peers: Vec<SocketAddr> = recent.iter().map(|(_, p)| *p).collect();
    assert!(
        peers.contains(&u2_addr) && peers.contains(&u3_addr) && !peers.contains(&u1_addr),
        "want the two latest ({u2_addr}, {u3_addr}): {recent:?}"
    );
    for (preview, peer) in &recent {
        assert!(
            preview.chars().all(|c| !c.is_control()),
            "preview is not printable: {preview:?}"
        );
        // The binary id in the config file's hex form.
        if *peer == u3_addr {
            assert!(preview.starts_with("hex:01"), "{preview:?}");
        }
    }

    // Nobody was identified, and the application heard nothing.
    assert_eq!(rt.get(|s| &s.identified_total), 0);
    assert_eq!(rt.get(|s| &s.online), 0);
    expect_quiet(&mut app);
    rt.engine.stop();
}

#[test]
fn silent_client_is_closed_at_id_timeout() {
    const ID_TIMEOUT: Duration = Duration::from_millis(400);
    let rt = Rt::start("id_timeout = \"400ms\"", &cp("c1", "c0001"));
    let mut app = rt.attach(0);

    let t0 = Instant::now();
    let mut silent = rt.device(b"");
    let mut partial = rt.device(b"c00");
    // Identifying in time cancels the deadline.
    let mut late = rt.device(b"");
    thread::sleep(Duration::from_millis(100));
    late.write_all(b"c0001").unwrap();

    for (what, s) in [("silent", &mut silent), ("partial id", &mut partial)] {
        let at = closed_within(s, Duration::from_secs(3)) - t0;
        assert!(
            at >= ID_TIMEOUT * 3 / 4 && at < ID_TIMEOUT + Duration::from_secs(1),
            "{what} client closed after {at:?}, want about {ID_TIMEOUT:?}"
        );
    }
    rt.wait("id_timeouts", |s| &s.id_timeouts, 2);
    thread::sleep(ID_TIMEOUT);
    expect_quiet(&mut late);
    assert_eq!(rt.get(|s| &s.online), 1);
    late.write_all(b"ok").unwrap();
    expect_bytes(&mut app, b"ok");
    assert_eq!(rt.get(|s| &s.id_timeouts), 2);
    rt.engine.stop();
}

// ----- duplicates -----

#[test]
fn duplicate_replace_new_device_wins_and_the_application_sees_nothing() {
    let rt = Rt::start("duplicate = \"replace\"", &cp("c1", "c0001"));
    let mut app = rt.attach(0);
    let mut old = rt.online(b"c0001a1");
    expect_bytes(&mut app, b"a1");

    let mut new = rt.device(b"c0001b1");
    expect_bytes(&mut app, b"b1");
    expect_closed(&mut old);
    rt.wait("replaced", |s| &s.replaced, 1);
    assert_eq!(rt.get(|s| &s.online), 1);

    // Both directions go to the new device; the application stayed attached
    // and the new device got nothing but the application's bytes.
    app.write_all(b"to-new").unwrap();
    expect_bytes(&mut new, b"to-new");
    new.write_all(b"b2").unwrap();
    expect_bytes(&mut app, b"b2");
    expect_quiet(&mut new);
    expect_quiet(&mut app);
    assert_eq!(rt.get(|s| &s.rejected), 0);
    rt.engine.stop();
}

#[test]
fn duplicate_reject_keeps_the_old_device() {
    let rt = Rt::start("duplicate = \"reject\"", &cp("c1", "c0001"));
    let mut app = rt.attach(0);
    let mut old = rt.online(b"c0001");

    let mut new = rt.device(b"c0001b1");
    expect_closed(&mut new);
    rt.wait("rejected", |s| &s.rejected, 1);
    assert_eq!(rt.get(|s| &s.online), 1);
    assert_eq!(rt.get(|s| &s.replaced), 0);

    // "b1" never reached the application; the old device still works.
    old.write_all(b"a2").unwrap();
    expect_bytes(&mut app, b"a2");
    app.write_all(b"to-old").unwrap();
    expect_bytes(&mut old, b"to-old");
    expect_quiet(&mut app);
    rt.engine.stop();
}

// ----- the application side -----

#[test]
fn application_attached_before_the_device_comes_online_and_across_reconnects() {
    let rt = Rt::start("", &cp("c1", "c0001"));
    let mut app = rt.attach(0);
    // offline = "keep" (default): the application waits.
    expect_quiet(&mut app);

    let mut dev = rt.online(b"c0001");
    thread::sleep(Duration::from_millis(50));
    dev.write_all(b"late").unwrap();
    expect_bytes(&mut app, b"late");

    // The device leaves: the application stays; the device returns.
    drop(dev);
    rt.wait("online", |s| &s.online, 0);
    expect_quiet(&mut app);
    let mut dev = rt.online(b"c0001again");
    expect_bytes(&mut app, b"again");
    app.write_all(b"down").unwrap();
    expect_bytes(&mut dev, b"down");
    rt.engine.stop();
}

#[test]
fn offline_close_closes_and_refuses_applications() {
    let rt = Rt::start("offline = \"close\"", &cp("c1", "c0001"));

    // Refused while the device is offline.
    let mut early = rt.attach(0);
    expect_closed(&mut early);

    let mut dev = rt.online(b"c0001");
    let mut app = rt.attach(0);
    dev.write_all(b"x").unwrap();
    expect_bytes(&mut app, b"x");
    app.write_all(b"y").unwrap();
    expect_bytes(&mut dev, b"y");

    // Closed when the device leaves, refused again after.
    drop(dev);
    expect_closed(&mut app);
    rt.wait("online", |s| &s.online, 0);
    let mut after = rt.attach(0);
    expect_closed(&mut after);
    rt.engine.stop();
}

#[test]
fn application_bytes_while_offline_are_discarded_and_counted() {
    let rt = Rt::start("offline = \"keep\"", &cp("c1", "c0001"));
    let mut app = rt.attach(0);
    app.write_all(&[0x55; 100]).unwrap();
    rt.wait(
        "offline_discarded_bytes",
        |s| &s.offline_discarded_bytes,
        100,
    );
    expect_quiet(&mut app);

    // The discarded bytes never reach the device that comes online later.
    let mut dev = rt.online(b"c0001");
    app.write_all(b"live").unwrap();
    expect_bytes(&mut dev, b"live");
    expect_quiet(&mut dev);
    assert_eq!(rt.get(|s| &s.offline_discarded_bytes), 100);
    rt.engine.stop();
}

#[test]
fn device_bytes_with_no_application_are_counted_not_kept() {
    let rt = Rt::start("", &cp("c1", "c0001"));
    let mut dev = rt.online(b"c0001abc");
    rt.wait("unrouted_bytes", |s| &s.unrouted_bytes, 3);
    let mut app = rt.attach(0);
    dev.write_all(b"x").unwrap();
    expect_bytes(&mut app, b"x");
    expect_quiet(&mut app);
    assert_eq!(rt.get(|s| &s.unrouted_bytes), 3);
    rt.engine.stop();
}

#[test]
fn max_apps_refuses_the_extra_application() {
    let rt = Rt::start("max_apps = 2", &cp("c1", "c0001"));
    let mut a = rt.attach(0);
    let mut b = rt.attach(0);
    let mut c = rt.attach(0);
    expect_closed(&mut c);
    let mut dev = rt.online(b"c0001both");
    expect_bytes(&mut a, b"both");
    expect_bytes(&mut b, b"both");
    // Either application reaches the device.
    a.write_all(b"A").unwrap();
    expect_bytes(&mut dev, b"A");
    b.write_all(b"B").unwrap();
    expect_bytes(&mut dev, b"B");
    // A slot frees when one leaves.
    let closed = rt.engine.stats().closed_total;
    drop(a);
    wait_for(
        "the application's close",
        WAIT,
        || rt.engine.stats().closed_total > closed,
        || brief(&rt.engine.stats()),
    );
    let mut d = rt.attach(0);
    dev.write_all(b"again").unwrap();
    expect_bytes(&mut b, b"again");
    expect_bytes(&mut d, b"again");
    rt.engine.stop();
}

// ----- liveness -----

#[test]
fn heartbeat_is_filtered_and_answered_while_data_passes() {
    let rt = Rt::start(
        "heartbeat = \"hex:fe\"\nheartbeat_reply = \"hex:fd\"",
        &cp("c1", "hex:0102AAbb"),
    );
    let mut app = rt.attach(0);
    let mut dev = rt.online(b"\x01\x02\xaa\xbb");

    for k in 1..=3 {
        dev.write_all(b"\xfe").unwrap();
        expect_bytes(&mut dev, b"\xfd");
        rt.wait("heartbeats", |s| &s.heartbeats, k);
    }
    // Repetitions in one read are one heartbeat read: one reply.
    dev.write_all(b"\xfe\xfe\xfe").unwrap();
    expect_bytes(&mut dev, b"\xfd");
    rt.wait("heartbeats", |s| &s.heartbeats, 4);
    expect_quiet(&mut dev);

    // A read that is not only heartbeats is data, byte-exact, heartbeat byte
    // included; none of the heartbeats above reached the application.
    dev.write_all(b"\xfe\x01\x03\x02\x00\x2a").unwrap();
    expect_bytes(&mut app, b"\xfe\x01\x03\x02\x00\x2a");
    expect_quiet(&mut app);
    expect_quiet(&mut dev);
    assert_eq!(rt.get(|s| &s.heartbeats), 4);
    rt.engine.stop();
}

#[test]
fn idle_timeout_closes_a_silent_device_and_heartbeats_keep_it_alive() {
    const IDLE: Duration = Duration::from_millis(400);
    let rt = Rt::start(
        "idle_timeout = \"400ms\"\nheartbeat = \"HB\"",
        &cp("c1", "c0001"),
    );
    let mut app = rt.attach(0);
    let mut dev = rt.online(b"c0001");

    // Heartbeats every 150 ms for 900 ms: longer than the idle timeout.
    for _ in 0..6 {
        thread::sleep(Duration::from_millis(150));
        dev.write_all(b"HB").unwrap();
        // Application bytes are not activity of the device, but harmless.
        app.write_all(b".").unwrap();
    }
    let mut got = vec![0u8; 6];
    dev.read_exact(&mut got).unwrap();
    assert_eq!(got, b"......");
    assert_eq!(rt.get(|s| &s.online), 1);
    rt.wait("heartbeats", |s| &s.heartbeats, 6);

    // Then silence: closed about one idle timeout after the last byte.
    let t0 = Instant::now();
    let at = closed_within(&mut dev, Duration::from_secs(3)) - t0;
    assert!(
        at >= IDLE * 3 / 4 && at < IDLE + Duration::from_secs(1),
        "closed after {at:?} of silence, want about {IDLE:?}"
    );
    rt.wait("online", |s| &s.online, 0);
    // The application stays (offline = "keep") and heard no heartbeat.
    expect_quiet(&mut app);
    rt.engine.stop();
}

#[test]
fn keepalive_bytes_arrive_every_interval() {
    const INTERVAL: Duration = Duration::from_millis(200);
    let rt = Rt::start(
        "keepalive = \"PING\"\nkeepalive_interval = \"200ms\"",
        &cp("c1", "c0001"),
    );
    let mut app = rt.attach(0);
    let mut dev = rt.device(b"c0001");
    let t0 = Instant::now();

    // The first one comes about one interval after identification.
    let mut first = [0u8; 4];
    dev.read_exact(&mut first).unwrap();
    let at = t0.elapsed();
    assert_eq!(&first, b"PING");
    assert!(
        at >= INTERVAL / 2 && at < INTERVAL + Duration::from_millis(500),
        "first keepalive after {at:?}, want about {INTERVAL:?}"
    );
    // Then one per interval: about five in a second.
    let (got, closed) = read_for(&mut dev, Duration::from_millis(1000));
    assert!(!closed, "device closed");
    assert!(
        got.len() % 4 == 0 && got.chunks(4).all(|c| c == b"PING"),
        "keepalive stream is not whole PINGs: {:?}",
        show(&got)
    );
    let n = got.len() / 4;
    assert!(
        (3..=7).contains(&n),
        "{n} keepalives in 1 s at a 200 ms interval"
    );
    // Not sent to the applications, and the device still works.
    expect_quiet(&mut app);
    dev.write_all(b"data").unwrap();
    expect_bytes(&mut app, b"data");
    rt.engine.stop();
}

#[test]
fn strip_prefix_removes_the_id_from_each_packet() {
    let rt = Rt::start("strip_prefix = true", &cp("c1", "c0001"));
    let mut app = rt.attach(0);
    let mut dev = rt.online(b"c0001data1");
    expect_bytes(&mut app, b"data1");
    // One packet (read) at a time: wait for each before sending the next.
    for (packet, want) in [
        (&b"c0001data2"[..], &b"data2"[..]),
        (b"plain", b"plain"),
        (b"xc0001y", b"xc0001y"),
        (b"c0001", b""),
        (b"c0001c0001z", b"c0001z"),
    ] {
        dev.write_all(packet).unwrap();
        if want.is_empty() {
            expect_quiet(&mut app);
        } else {
            expect_bytes(&mut app, want);
        }
    }
    expect_quiet(&mut app);
    rt.engine.stop();
}

#[test]
fn keepalive_is_not_device_activity() {
    const IDLE: Duration = Duration::from_millis(400);
    let rt = Rt::start(
        "keepalive = \"K\"\nkeepalive_interval = \"100ms\"\nidle_timeout = \"400ms\"",
        &cp("c1", "c0001"),
    );
    let t0 = Instant::now();
    let mut dev = rt.online(b"c0001");
    // Keepalives go out, but a device that answers nothing is still idle.
    let (got, closed) = read_for(&mut dev, Duration::from_secs(3));
    let at = t0.elapsed();
    assert!(
        closed,
        "a silent device receiving keepalives was never closed"
    );
    assert!(
        at >= IDLE * 3 / 4 && at < IDLE + Duration::from_secs(1),
        "closed after {at:?}, want about {IDLE:?}"
    );
    assert!(
        !got.is_empty() && got.iter().all(|&b| b == b'K'),
        "keepalives before the close: {:?}",
        show(&got)
    );
    rt.wait("online", |s| &s.online, 0);
    rt.engine.stop();
}

// ----- back-pressure -----

/// Engine limits small enough that a peer that does not read fills its queue quickly.
const SMALL_QUEUES: &str = "[engine]\nbuffer_bytes = 4096\nqueue_bytes = 8192\n";
/// Give up on "filling the pipes" after this many bytes.
const FILL_CAP: u64 = 512 << 20;
/// No progress for this long counts as held back.
const STALL: Duration = Duration::from_millis(300);

/// Read the pattern stream `pat` on `s` from `*received`, checking every
/// byte, until `until` says stop or no byte came for [`STALL`]; returns
/// whether the stream stalled.
fn read_pattern(
    s: &mut TcpStream,
    pat: Pattern,
    received: &mut u64,
    mut until: impl FnMut(u64) -> bool,
) -> bool {
    let mut buf = vec![0u8; 256 * 1024];
    s.set_read_timeout(Some(STALL)).unwrap();
    let stalled = loop {
        if until(*received) {
            break false;
        }
        match s.read(&mut buf) {
            Ok(0) => panic!("EOF after {} bytes", *received),
            Ok(n) => {
                if let Err(at) = pat.check(*received, &buf[..n]) {
                    panic!("stream differs at byte {at}");
                }
                *received += n as u64;
            }
            Err(e) if is_timeout(&e) => break true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("read failed after {} bytes: {e}", *received),
        }
    };
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stalled
}

/// Device to application and application to device at once, `total` bytes
/// each way, every byte checked.
fn bulk_both_ways(engine: &str, total: u64) {
    let rt = Rt::start_toml(&format!(
        "{engine}[[router]]\nlisten = \"127.0.0.1:0\"\n{}",
        cp("c1", "c0001")
    ));
    let app = rt.attach(0);
    let dev = rt.online(b"c0001");
    let pump = |mut from: TcpStream, mut to: TcpStream, pat: Pattern, what: &'static str| {
        let writer = thread::spawn(move || -> io::Result<()> {
            let mut sent = 0;
            while sent < total {
                let chunk = pat.chunk(sent, (total - sent).min(256 * 1024) as usize);
                from.write_all(chunk)?;
                sent += chunk.len() as u64;
            }
            Ok(())
        });
        let reader = thread::spawn(move || -> Result<u64, String> {
            let mut received = 0;
            let mut buf = vec![0u8; 256 * 1024];
            to.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            while received < total {
                match to.read(&mut buf) {
                    Ok(0) => return Err(format!("{what}: EOF after {received} bytes")),
                    Ok(n) => {
                        if let Err(at) = pat.check(received, &buf[..n]) {
                            return Err(format!("{what}: stream differs at byte {at}"));
                        }
                        received += n as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(format!("{what}: {e} after {received} bytes")),
                }
            }
            Ok(received)
        });
        (writer, reader)
    };
    let up = pump(
        dev.try_clone().unwrap(),
        app.try_clone().unwrap(),
        Pattern::new(51),
        "device to application",
    );
    let down = pump(
        app.try_clone().unwrap(),
        dev.try_clone().unwrap(),
        Pattern::new(52),
        "application to device",
    );
    let mut failures = Vec::new();
    for (writer, reader) in [up, down] {
        if let Err(e) = reader.join().unwrap() {
            failures.push(e);
        }
        // A reader that gave up leaves its writer blocked until its write
        // timeout; closing the sockets below ends it sooner.
        if failures.is_empty() {
            writer.join().unwrap().expect("writer");
        }
    }
    drop((app, dev));
    assert!(
        failures.is_empty(),
        "{failures:?}; router stats {:?}",
        rt.stats
    );
    rt.engine.stop();
}

#[test]
fn bulk_transfer_is_byte_exact_both_ways() {
    bulk_both_ways("", 32 << 20);
}

#[test]
fn bulk_transfer_is_byte_exact_both_ways_with_small_queues() {
    bulk_both_ways(SMALL_QUEUES, 8 << 20);
}

#[test]
fn slow_application_holds_the_device_back_until_it_leaves() {
    let rt = Rt::start_toml(&format!(
        "{SMALL_QUEUES}[[router]]\nlisten = \"127.0.0.1:0\"\n{}",
        cp("c1", "c0001")
    ));
    let before = rt.engine.stats().accepted_total;
    let slow = util::connect_with_recv_buffer(rt.app_port(0), 4096);
    rt.wait_accepted(before, 1);
    let mut fast = rt.attach(0);
    let dev = rt.online(b"c0001");

    // The device sends a pattern stream until told to stop.
    let pat = Pattern::new(41);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (mut dev, stop) = (dev.try_clone().unwrap(), Arc::clone(&stop));
        thread::spawn(move || -> io::Result<u64> {
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) && sent < FILL_CAP {
                let chunk = pat.chunk(sent, 64 * 1024);
                dev.write_all(chunk)?;
                sent += chunk.len() as u64;
            }
            Ok(sent)
        })
    };

    // The slow application's queue fills: the device is held back, so the
    // fast one stalls too (every byte it got is right).
    let mut received = 0;
    let stalled = read_pattern(&mut fast, pat, &mut received, |r| r >= FILL_CAP);
    assert!(
        stalled,
        "the fast application got {received} bytes without a stall"
    );

    // The slow application leaves: the device must be read again, and the
    // fast application gets every byte the device sent, in order.
    drop(slow);
    let resumed = received;
    let stalled = read_pattern(&mut fast, pat, &mut received, |r| {
        r >= resumed + 1024 * 1024
    });
    assert!(
        !stalled,
        "the device stayed held back after the slow application left ({received} bytes in all): {:?}",
        rt.stats
    );
    stop.store(true, Ordering::Relaxed);
    // Drain until the writer has finished and everything it sent arrived.
    let deadline = Instant::now() + WAIT;
    while !writer.is_finished() {
        assert!(Instant::now() < deadline, "device writer did not finish");
        read_pattern(&mut fast, pat, &mut received, |_| writer.is_finished());
    }
    let sent = writer.join().unwrap().expect("device writes");
    read_pattern(&mut fast, pat, &mut received, |r| r >= sent);
    assert_eq!(
        received, sent,
        "bytes lost between the device and the fast application"
    );
    drop(dev);
    rt.engine.stop();
}

#[test]
fn takeover_while_an_application_is_behind_loses_nothing() {
    takeover_while_behind(false);
}

#[test]
fn takeover_with_data_after_the_id_while_an_application_is_behind_loses_nothing() {
    takeover_while_behind(true);
}

/// A slow application holds the device back; a new device takes over (its
/// first data in the same write as its id when `data_with_id`) before the
/// slow application catches up. Every application must get every byte.
fn takeover_while_behind(data_with_id: bool) {
    let rt = Rt::start_toml(&format!(
        "{SMALL_QUEUES}[[router]]\nlisten = \"127.0.0.1:0\"\n{}",
        cp("c1", "c0001")
    ));
    let before = rt.engine.stats().accepted_total;
    let mut slow = util::connect_with_recv_buffer(rt.app_port(0), 4096);
    rt.wait_accepted(before, 1);
    let mut fast = rt.attach(0);

    // The old device streams until the slow application holds it back.
    let (pat_a, pat_b) = (Pattern::new(61), Pattern::new(62));
    let old = rt.online(b"c0001");
    let old_writer = {
        let mut old = old.try_clone().unwrap();
        thread::spawn(move || {
            let mut sent = 0u64;
            while sent < FILL_CAP {
                let chunk = pat_a.chunk(sent, 64 * 1024);
                if old.write_all(chunk).is_err() {
                    break; // replaced: the router closed it
                }
                sent += chunk.len() as u64;
            }
        })
    };
    let mut received = 0;
    assert!(
        read_pattern(&mut fast, pat_a, &mut received, |r| r >= FILL_CAP),
        "the fast application got {received} bytes without a stall"
    );

    // The new device takes over while the slow application is still behind,
    // and sends 1 MiB; the slow application starts reading only later.
    const B_TOTAL: u64 = 1 << 20;
    // With data: the rest of one whole read (SMALL_QUEUES' 4096-byte
    // buffers) after the 5-byte id, more than a held-back queue has room for.
    let first = if data_with_id { 4096 - 5 } else { 0 };
    let mut hello = b"c0001".to_vec();
    hello.extend_from_slice(pat_b.chunk(0, first as usize));
    let new = rt.device(&hello);
    rt.wait("replaced", |s| &s.replaced, 1);
    let new_writer = {
        let mut new = new.try_clone().unwrap();
        thread::spawn(move || -> io::Result<()> {
            let mut sent = first;
            while sent < B_TOTAL {
                let chunk = pat_b.chunk(sent, (B_TOTAL - sent).min(64 * 1024) as usize);
                new.write_all(chunk)?;
                sent += chunk.len() as u64;
            }
            Ok(())
        })
    };
    thread::sleep(Duration::from_millis(300));
    let slow_reader = thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 256 * 1024];
        // Silence this long means the old device's bytes have all come.
        let quiet = if util::emulated().is_some() { 6 } else { 2 };
        slow.set_read_timeout(Some(Duration::from_secs(quiet)))
            .unwrap();
        loop {
            match slow.read(&mut buf) {
                Ok(0) => panic!("the slow application was closed"),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if is_timeout(&e) => return got,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => panic!("slow application read: {e}"),
            }
        }
    });

    // The fast application gets all of the new device's bytes ...
    let mut received = 0;
    read_pattern(&mut fast, pat_b, &mut received, |r| r >= B_TOTAL);
    assert_eq!(
        received, B_TOTAL,
        "the fast application's bytes from the new device"
    );
    new_writer.join().unwrap().expect("new device writes");
    old_writer.join().unwrap();
    // ... and the slow one the old device's up to where it was held, then
    // all of the new device's.
    let got = slow_reader.join().unwrap();
    assert!(
        got.len() as u64 >= B_TOTAL,
        "the slow application got {} bytes, less than the new device's {B_TOTAL}",
        got.len()
    );
    let y = got.len() - B_TOTAL as usize;
    let a_ok = pat_a.check(0, &got[..y]);
    let b_ok = pat_b.check(0, &got[y..]);
    assert!(
        a_ok.is_ok() && b_ok.is_ok(),
        "the slow application's stream is not old[..{y}] + new[..{B_TOTAL}]: old {a_ok:?}, new {b_ok:?}; {:?}",
        rt.stats
    );
    assert_eq!(rt.get(|s| &s.unrouted_bytes), 0);
    drop((old, new));
    rt.engine.stop();
}

#[test]
fn takeover_resumes_an_application_held_back_by_the_old_device() {
    let rt = Rt::start_toml(&format!(
        "{SMALL_QUEUES}[[router]]\nlisten = \"127.0.0.1:0\"\n{}",
        cp("c1", "c0001")
    ));
    let mut app = rt.attach(0);
    // The old device never reads (a dead 4G link, say).
    let mut old = util::connect_with_recv_buffer(rt.devices(), 4096);
    old.write_all(b"c0001").unwrap();
    rt.wait("online", |s| &s.online, 1);

    // The application writes until it is held back.
    let pat = Pattern::new(43);
    app.set_nonblocking(true).unwrap();
    let mut sent = 0u64;
    let mut last_progress = Instant::now();
    while last_progress.elapsed() < STALL {
        assert!(sent < FILL_CAP, "the application was never held back");
        match app.write(pat.chunk(sent, 64 * 1024)) {
            Ok(n) => {
                sent += n as u64;
                last_progress = Instant::now();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("application write: {e}"),
        }
    }
    app.set_nonblocking(false).unwrap();

    // A new connection takes over: the application's bytes flow again, to it.
    let mut new = rt.device(b"c0001");
    rt.wait("replaced", |s| &s.replaced, 1);
    let more = 256 * 1024;
    let writer = {
        let mut app = app.try_clone().unwrap();
        thread::spawn(move || -> io::Result<()> {
            let mut at = sent;
            while at < sent + more {
                let chunk = pat.chunk(at, (sent + more - at) as usize);
                app.write_all(chunk)?;
                at += chunk.len() as u64;
            }
            Ok(())
        })
    };
    let mut got = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    new.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(Instant::now() < deadline, "still reading after {WAIT:?}");
        match new.read(&mut buf) {
            Ok(0) => panic!("new device closed"),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if is_timeout(&e) && writer.is_finished() => break,
            Err(e) if is_timeout(&e) => {}
            Err(e) => panic!("new device read: {e}"),
        }
    }
    let wrote = writer.join().unwrap();
    assert!(
        wrote.is_ok() && got.len() as u64 >= more,
        "the application stayed held back after the takeover: it wrote {wrote:?}, the new device got {} bytes",
        got.len()
    );
    // What arrives is the end of the application's stream, byte-exact.
    let end = sent + more;
    if let Err(at) = pat.check(end - got.len() as u64, &got) {
        panic!("the new device's bytes differ from the stream at {at}");
    }
    drop(old);
    rt.engine.stop();
}

// ----- connect connpts -----

#[test]
fn connect_binding_dials_upstream_with_send_id_and_redials() {
    let up = TcpListener::bind("127.0.0.1:0").unwrap();
    up.set_nonblocking(true).unwrap();
    let up_addr = up.local_addr().unwrap();
    let rt = Rt::start(
        "reconnect_min = \"100ms\"\nreconnect_max = \"400ms\"",
        &format!(
            "[[router.connpt]]\nname = \"cloud\"\nid = \"c0001\"\nconnect = \"{up_addr}\"\nsend_id = \"REG c0001\\r\\n\"\n"
        ),
    );
    let no_dial = |up: &TcpListener, what: &str| {
        thread::sleep(Duration::from_millis(300));
        match up.accept() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Ok((_, peer)) => panic!("the router dialled upstream {what} (from {peer})"),
            Err(e) => panic!("accept: {e}"),
        }
    };

    // Nothing is dialled before the device comes online.
    no_dial(&up, "before the device came online");
    let mut dev = rt.online(b"c0001");
    let mut u1 = accept_within(&up, Duration::from_secs(3));
    expect_bytes(&mut u1, b"REG c0001\r\n");
    dev.write_all(b"first").unwrap();
    expect_bytes(&mut u1, b"first");
    u1.write_all(b"reply").unwrap();
    expect_bytes(&mut dev, b"reply");

    // The upstream drops while the device stays online: re-dialled.
    let t0 = Instant::now();
    drop(u1);
    let mut u2 = accept_within(&up, Duration::from_secs(3));
    let took = t0.elapsed();
    expect_bytes(&mut u2, b"REG c0001\r\n");
    assert!(took < Duration::from_secs(2), "re-dialled after {took:?}");
    dev.write_all(b"second").unwrap();
    expect_bytes(&mut u2, b"second");
    u2.write_all(b"reply2").unwrap();
    expect_bytes(&mut dev, b"reply2");
    expect_quiet(&mut dev);

    // The device leaves: the upstream is closed and not dialled again.
    drop(dev);
    expect_closed(&mut u2);
    rt.wait("online", |s| &s.online, 0);
    no_dial(&up, "after the device went offline");

    // The upstream is down when the device comes online: dialled with
    // back-off (100, 200, 400, 400 ms...) until it is back.
    drop(up);
    let failed_before = rt.engine.stats().connect_failed_total;
    let dev = rt.online(b"c0001");
    thread::sleep(Duration::from_millis(900));
    let failed = rt.engine.stats().connect_failed_total - failed_before;
    assert!(
        (2..=8).contains(&failed),
        "{failed} failed dials in 900 ms with back-off from 100 ms to 400 ms"
    );
    let up = TcpListener::bind(up_addr)
        .unwrap_or_else(|e| panic!("re-binding the upstream port {up_addr}: {e}"));
    let mut u3 = accept_within(&up, Duration::from_secs(3));
    expect_bytes(&mut u3, b"REG c0001\r\n");
    drop(dev);
    expect_closed(&mut u3);
    rt.engine.stop();
}

// ----- ip identity -----

#[test]
fn ip_identity_by_source_address() {
    // The 127.0.0.4 device must come from one port: bind it before the config
    // is written, connect it later.
    let d4_sock = bound_socket("127.0.0.4:0".parse().unwrap());
    let d4_addr = d4_sock.local_addr().unwrap().as_socket().unwrap();
    let rt = Rt::start(
        "identity = \"ip\"",
        &(cp("p2", "127.0.0.2") + &cp("p4", &d4_addr.to_string())),
    );
    let mut app2 = rt.attach(0);
    let mut app4 = rt.attach(1);

    // Identified by address alone, before sending anything; every byte is data.
    let mut d2 = connect_from(Ipv4Addr::new(127, 0, 0, 2), rt.devices());
    rt.wait("online", |s| &s.online, 1);
    d2.write_all(b"127.0.0.2 hello").unwrap();
    expect_bytes(&mut app2, b"127.0.0.2 hello");
    app2.write_all(b"back").unwrap();
    expect_bytes(&mut d2, b"back");

    // Unknown address: closed at once, recorded.
    let mut d3 = connect_from(Ipv4Addr::new(127, 0, 0, 3), rt.devices());
    let d3_addr = d3.local_addr().unwrap();
    expect_closed(&mut d3);
    rt.wait("unknown_total", |s| &s.unknown_total, 1);
    let recent = rt.recent_unknown();
    assert!(
        recent.iter().any(|(_, peer)| *peer == d3_addr),
        "recent_unknown lacks {d3_addr}: {recent:?}"
    );

    // Right address, wrong port: unknown too.
    let mut wrong = connect_from(Ipv4Addr::new(127, 0, 0, 4), rt.devices());
    expect_closed(&mut wrong);
    rt.wait("unknown_total", |s| &s.unknown_total, 2);

    // Address and port: identified.
    let mut d4 = connect_bound(d4_sock, rt.devices());
    rt.wait("online", |s| &s.online, 2);
    d4.write_all(b"four").unwrap();
    expect_bytes(&mut app4, b"four");
    expect_quiet(&mut app2);
    rt.engine.stop();
}

// ----- limits -----

#[test]
fn max_pending_full_closes_the_oldest_unidentified_connection() {
    let rt = Rt::start("max_pending = 3", &(cp("c1", "c0001") + &cp("c2", "c0002")));
    let before = rt.engine.stats().accepted_total;
    let mut pending: Vec<TcpStream> = Vec::new();
    for k in 0..3 {
        pending.push(rt.device(b""));
        rt.wait_accepted(before, k + 1);
    }

    // A fourth arrives: the oldest silent one makes room, so silent
    // connections can never lock a real device out.
    let mut real = rt.device(b"");
    expect_closed(&mut pending[0]);
    rt.wait("pending_evicted", |s| &s.pending_evicted, 1);
    expect_quiet(&mut real);
    real.write_all(b"c0001").unwrap();
    rt.wait("online", |s| &s.online, 1);
    for p in &mut pending[1..] {
        expect_quiet(p);
    }
    pending[1].write_all(b"c0002").unwrap();
    rt.wait("online", |s| &s.online, 2);
    assert_eq!(rt.get(|s| &s.refused), 0);
    rt.engine.stop();
}

#[test]
fn max_pending_per_ip_refuses_only_that_address() {
    let rt = Rt::start(
        "max_pending = 100\nmax_pending_per_ip = 2",
        &(cp("c1", "c0001") + &cp("c2", "c0002")),
    );
    let before = rt.engine.stats().accepted_total;
    let local = Ipv4Addr::new(127, 0, 0, 1);
    let mut a = connect_from(local, rt.devices());
    let mut b = connect_from(local, rt.devices());
    rt.wait_accepted(before, 2);
    // Pending connections count against their address after a grace of 500 ms.
    thread::sleep(Duration::from_millis(600));
    let mut c = connect_from(local, rt.devices());
    expect_closed(&mut c);
    rt.wait("refused", |s| &s.refused, 1);

    // Another address still gets in.
    let mut other = connect_from(Ipv4Addr::new(127, 0, 0, 2), rt.devices());
    expect_quiet(&mut other);
    other.write_all(b"c0002").unwrap();
    rt.wait("online", |s| &s.online, 1);
    expect_quiet(&mut a);
    expect_quiet(&mut b);
    a.write_all(b"c0001").unwrap();
    rt.wait("online", |s| &s.online, 2);
    assert_eq!(rt.get(|s| &s.refused), 1);
    rt.engine.stop();
}

#[test]
fn a_burst_of_devices_behind_one_address_is_never_refused() {
    // Modems behind one carrier-NAT address reconnect together after an
    // outage, each sending its id at once: far more at a time than
    // max_pending_per_ip.
    const N: usize = 200;
    let connpts: String = (0..N)
        .map(|k| cp(&format!("c{k}"), &format!("dev{k:04}")))
        .collect();
    let rt = Rt::start("max_pending_per_ip = 4\nid_gap = \"0ms\"", &connpts);
    let devices: Vec<TcpStream> = (0..N)
        .map(|k| rt.device(format!("dev{k:04}").as_bytes()))
        .collect();
    rt.wait("online", |s| &s.online, N as u64);
    assert_eq!(rt.get(|s| &s.refused), 0);
    drop(devices);
    rt.engine.stop();
}

// ----- configuration -----

#[test]
fn router_defaults() {
    let cfg = Config::parse(
        "[[router]]\nlisten = \"127.0.0.1:0\"\n[[router.connpt]]\nname = \"c1\"\nid = \"c0001\"\nlisten = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let r = &cfg.router[0];
    assert_eq!(r.name, "router");
    assert_eq!(r.identity, Identity::Id);
    assert_eq!(r.id_timeout, Duration::from_secs(10));
    assert!(r.id_delimiter.is_none());
    assert_eq!(r.id_max_len, 64);
    assert_eq!(r.id_gap, Duration::from_millis(200));
    assert_eq!(r.max_pending, 1000);
    assert_eq!(r.max_pending_per_ip, 16);
    assert_eq!(r.duplicate, Duplicate::Replace);
    assert_eq!(r.idle_timeout, Duration::from_secs(300));
    assert!(r.heartbeat.is_none() && r.heartbeat_reply.is_none() && r.keepalive.is_none());
    assert_eq!(r.keepalive_interval, Duration::from_secs(30));
    assert!(!r.strip_prefix);
    assert_eq!(r.offline, Offline::Keep);
    assert_eq!(r.max_apps, 16);
    assert_eq!(r.recent_unknown, 64);
    assert_eq!(r.reconnect_min, Duration::from_secs(1));
    assert_eq!(r.reconnect_max, Duration::from_secs(30));
    assert_eq!(r.connpt[0].id.0, b"c0001");
}

#[test]
fn invalid_router_configs_are_rejected() {
    let base = "[[router]]\nlisten = \"127.0.0.1:0\"\n";
    let c1 = cp("c1", "c0001");
    let cases: Vec<(&str, String)> = vec![
        (
            "id_max_len above 64",
            format!("{base}id_max_len = 65\n{c1}"),
        ),
        (
            "id longer than id_max_len",
            format!("{base}id_max_len = 4\n{c1}"),
        ),
        ("empty id", format!("{base}{}", cp("c1", ""))),
        ("odd hex", format!("{base}{}", cp("c1", "hex:abc"))),
        ("bad hex", format!("{base}{}", cp("c1", "hex:0g"))),
        ("duplicate id", format!("{base}{c1}{}", cp("c2", "c0001"))),
        (
            "duplicate hex id spelled as text",
            format!("{base}{c1}{}", cp("c2", "hex:6330303031")),
        ),
        (
            "unknown identity",
            format!("{base}identity = \"name\"\n{c1}"),
        ),
        (
            "ip identity with a non-address id",
            format!("{base}identity = \"ip\"\n{c1}"),
        ),
        (
            "unknown duplicate policy",
            format!("{base}duplicate = \"both\"\n{c1}"),
        ),
        (
            "unknown offline policy",
            format!("{base}offline = \"drop\"\n{c1}"),
        ),
        (
            "listen and connect",
            format!(
                "{base}[[router.connpt]]\nname = \"c1\"\nid = \"c0001\"\nlisten = \"127.0.0.1:0\"\nconnect = \"127.0.0.1:9\"\n"
            ),
        ),
        (
            "neither listen nor connect",
            format!("{base}[[router.connpt]]\nname = \"c1\"\nid = \"c0001\"\n"),
        ),
        (
            "send_id on a listen connpt",
            format!(
                "{base}[[router.connpt]]\nname = \"c1\"\nid = \"c0001\"\nlisten = \"127.0.0.1:0\"\nsend_id = \"x\"\n"
            ),
        ),
        (
            "reconnect_max below reconnect_min",
            format!("{base}reconnect_min = \"2s\"\nreconnect_max = \"1s\"\n{c1}"),
        ),
        (
            "zero id_timeout",
            format!("{base}id_timeout = \"0s\"\n{c1}"),
        ),
        ("zero max_pending", format!("{base}max_pending = 0\n{c1}")),
        ("unknown key", format!("{base}colour = \"blue\"\n{c1}")),
    ];
    for (what, toml) in cases {
        assert!(
            Config::parse(&toml).is_err(),
            "accepted a config with {what}:\n{toml}"
        );
    }
}

// ----- scale -----

/// Devices the scale test wants online at once.
const SCALE_TARGET: usize = 10_000;
/// Descriptors left for everything but the scale test's sockets and listeners
/// (stdio, poll, other tests running in parallel).
const FD_RESERVE: usize = 600;
/// The child process (client holder) reads the address file named here.
const SCALE_ENV: &str = "SWITCHBOARD_ROUTER_SCALE_ADDRS";

/// The soft `RLIMIT_NOFILE` of this process, from /proc.
fn fd_soft_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// How many devices fit: the engine process holds three descriptors per
/// device (the device connection, the application connection and the
/// connpt's listener), the client holder two.
/// `SWITCHBOARD_ROUTER_SCALE_N` overrides the count (for a quick look).
fn scale_devices() -> usize {
    let limit = fd_soft_limit().unwrap_or(1024);
    let fits = SCALE_TARGET.min(limit.saturating_sub(FD_RESERVE) / 3);
    std::env::var("SWITCHBOARD_ROUTER_SCALE_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(fits, |n: usize| n.min(fits))
}

fn scale_id(i: usize) -> String {
    format!("dev{i:06}")
}

/// The bytes application `i` sends and device `i` echoes: 1 to 4096 bytes.
fn scale_payload(i: usize) -> Vec<u8> {
    let mut v = vec![0u8; 1 + (i * 7919) % 4096];
    Pattern::new(i as u64).fill(0, &mut v);
    v
}

/// Lines from the child's stdout, on a thread, so the test can wait with a deadline.
fn line_reader(out: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Wait for the child's next line containing `prefix` (skipping the test
/// harness's own lines); returns the rest of it.
fn expect_line(
    rx: &mpsc::Receiver<String>,
    prefix: &str,
    timeout: Duration,
    stderr: &Captured,
) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                // libtest may have written "test name ... " on the same line.
                if let Some(at) = line.find(prefix) {
                    return line[at + prefix.len()..].trim().to_owned();
                }
            }
            Err(e) => panic!(
                "no {prefix:?} line from the client holder ({e:?}); its stderr:\n{}",
                stderr.text()
            ),
        }
    }
}

#[test]
fn devices_at_scale_each_echo_through_their_own_connpt() {
    let n = scale_devices();
    if n < SCALE_TARGET {
        eprintln!(
            "scale test: {n} devices, not {SCALE_TARGET}: RLIMIT_NOFILE is {:?} and the engine needs 3 descriptors per device",
            fd_soft_limit()
        );
    }
    let connpts: String = (0..n).map(|i| cp(&format!("d{i}"), &scale_id(i))).collect();
    let t_start = Instant::now();
    let rt = Rt::start_toml(&format!(
        "[engine]\nmax_connections = {}\n[[router]]\nlisten = \"127.0.0.1:0\"\nid_timeout = \"60s\"\nmax_pending = {n}\nmax_pending_per_ip = {n}\n{connpts}",
        2 * n + 64
    ));
    let started = t_start.elapsed();
    let addrs: String = rt.engine.addrs.iter().map(|a| format!("{a}\n")).collect();
    let file = temp_file("router-scale.addrs", &addrs);

    let mut child = target_command(std::env::current_exe().unwrap());
    child
        .args([
            "scale_client_holder",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(SCALE_ENV, &file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = ChildGuard(child.spawn().expect("spawn the client holder"));
    let mut to_child = child.0.stdin.take().unwrap();
    let lines = line_reader(child.0.stdout.take().unwrap());
    let stderr = Captured::new(child.0.stderr.take().unwrap());
    let step = Duration::from_secs(40);

    // 1. Every device dials and sends its id.
    let t0 = Instant::now();
    expect_line(&lines, "SCALE devices", step, &stderr);
    wait_for(
        &format!("{n} devices online"),
        step,
        || rt.get(|s| &s.online) == n as u64,
        || (&rt.stats, brief(&rt.engine.stats())),
    );
    let identified = t0.elapsed();
    assert_eq!(rt.get(|s| &s.identified_total), n as u64);
    assert_eq!(rt.get(|s| &s.unknown_total), 0);

    // 2. Every application attaches and sends; its device echoes; it checks.
    writeln!(to_child, "apps").unwrap();
    let t1 = Instant::now();
    let echoed = expect_line(&lines, "SCALE echoed", step, &stderr);
    let echo_time = t1.elapsed();
    assert_eq!(rt.get(|s| &s.online), n as u64, "a device dropped");
    assert_eq!(rt.engine.handle.connections(), 2 * n as u64);
    assert_eq!(rt.get(|s| &s.offline_discarded_bytes), 0);

    // 3. Every device leaves: all offline, the applications stay attached
    // (offline = "keep"); then the applications leave. The clients close
    // first, so the TIME_WAIT states sit on the clients' connect() ports,
    // which loopback may reuse (tcp_tw_reuse), and not on the listeners'
    // bind() ports, which would make the next run's thousands of port-0
    // binds crawl.
    writeln!(to_child, "close devices").unwrap();
    expect_line(&lines, "SCALE devices closed", step, &stderr);
    wait_for(
        "every device offline",
        step,
        || rt.get(|s| &s.online) == 0,
        || (&rt.stats, brief(&rt.engine.stats())),
    );
    // Each close is counted just after the router has seen it.
    wait_for(
        "only the applications left",
        step,
        || rt.engine.handle.connections() == n as u64,
        || brief(&rt.engine.stats()),
    );
    writeln!(to_child, "close apps").unwrap();
    expect_line(&lines, "SCALE apps closed", step, &stderr);
    wait_for(
        "no connection left",
        step,
        || rt.engine.handle.connections() == 0,
        || brief(&rt.engine.stats()),
    );
    rt.engine.stop();
    let status = child.wait(step);
    assert!(
        status.success(),
        "client holder failed: {status}\n{}",
        stderr.text()
    );
    std::fs::remove_file(&file).ok();
    eprintln!(
        "scale test: {n} devices; engine start {started:?}; all identified in {identified:?}; echo round ({echoed}) in {echo_time:?}"
    );
}

/// The client side of [`devices_at_scale_each_echo_through_their_own_connpt`],
/// run by it in a child process (this test binary, this test only) so that
/// the clients' descriptors do not count against the engine's process.
/// Talks over stdin/stdout: prints `SCALE devices`, waits for `apps`, prints
/// `SCALE echoed`, waits for `close devices`, closes them, prints `SCALE
/// devices closed`, and the same for `close apps`.
#[test]
#[ignore = "the client side of the scale test, run by it in a child process"]
fn scale_client_holder() {
    let Some(file) = std::env::var_os(SCALE_ENV) else {
        return;
    };
    let text = std::fs::read_to_string(file).unwrap();
    let addrs: Vec<SocketAddr> = text.lines().map(|l| l.parse().unwrap()).collect();
    let n = addrs.len() - 1;
    let mut stdin = BufReader::new(io::stdin().lock());
    let mut command = |want: &str| {
        let mut line = String::new();
        stdin.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), want, "unexpected command from the test");
    };
    let say = |line: String| {
        let mut out = io::stdout().lock();
        writeln!(out, "{line}").unwrap();
        out.flush().unwrap();
    };

    let mut devices: Vec<TcpStream> = (0..n)
        .map(|i| {
            let mut s = connect(addrs[0]);
            s.write_all(scale_id(i).as_bytes()).unwrap();
            s
        })
        .collect();
    say(format!("SCALE devices {n}"));

    command("apps");
    let mut apps: Vec<TcpStream> = Vec::with_capacity(n);
    for (i, addr) in addrs[1..].iter().enumerate() {
        let mut s = connect(*addr);
        s.write_all(&scale_payload(i)).unwrap();
        apps.push(s);
    }
    let mut bytes = 0;
    for (i, dev) in devices.iter_mut().enumerate() {
        let want = scale_payload(i);
        let mut got = vec![0u8; want.len()];
        dev.read_exact(&mut got)
            .unwrap_or_else(|e| panic!("device {i}: reading {} bytes: {e}", want.len()));
        assert!(
            got == want,
            "device {i} got other bytes than its application sent"
        );
        dev.write_all(&got).unwrap();
        bytes += got.len();
    }
    for (i, app) in apps.iter_mut().enumerate() {
        let want = scale_payload(i);
        let mut got = vec![0u8; want.len()];
        app.read_exact(&mut got)
            .unwrap_or_else(|e| panic!("application {i}: reading the echo: {e}"));
        if let Err(at) = Pattern::new(i as u64).check(0, &got) {
            panic!("application {i}: echo differs at byte {at}");
        }
    }
    say(format!("SCALE echoed {n} pairs, {bytes} bytes each way"));

    command("close devices");
    drop(devices);
    say("SCALE devices closed".to_owned());
    command("close apps");
    drop(apps);
    say("SCALE apps closed".to_owned());
}
