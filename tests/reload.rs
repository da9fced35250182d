//! Live reload end to end: an engine built from a config file
//! (`Config::load` + `Engine::from_config`) that watches it
//! (`Engine::watch_config`), runs on its own thread, and is told to re-read
//! the file with `Handle::reload` (or, for the binary, a real SIGHUP).
//!
//! What a reload must do: leave unchanged roles and their connections alone,
//! change router connpts and tunnel services in place, restart other changed
//! roles on the same address, stop removed ones, and keep everything as it
//! was when the file does not load or validate.
//!
//! Each engine gets an extra role added by hand (not from the file, so a
//! reload never touches it): a probe that answers a message. A reload is
//! queued in the engine's inbox ahead of the probe's message, so once the
//! probe answers, the reload has been applied ([`Live::reload`]); no test
//! sleeps to wait for one. Roles that must keep their address across a
//! reload listen on ports reserved with [`fixed_port`].
//!
//! Config files live under `std::env::temp_dir()` with unique names and are
//! removed when the test ends.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly"
)]

mod util;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard, mpsc};
use std::time::{Duration, Instant};

use switchboard::codec::Frame;
use switchboard::engine::{ConnKey, Ctx};
use switchboard::{Config, Engine, EngineError, Message, Role, RoleId};

use util::{
    Captured, ChildGuard, IO_TIMEOUT, Pattern, TestEngine, bin, brief, closed_within, connect,
    expect_bytes, expect_quiet, fixed_port, http_get, send_signal, show, target_command, wait_for,
    wait_until,
};

/// Bound on waiting for anything.
const WAIT: Duration = Duration::from_secs(10);
/// How long "nothing arrives" is watched for.
const QUIET: Duration = Duration::from_millis(150);

/// The scale test holds most of the process's file descriptors; the others
/// take this lock shared, it takes it alone.
static FDS: RwLock<()> = RwLock::new(());

fn shared_fds() -> RwLockReadGuard<'static, ()> {
    FDS.read().unwrap_or_else(|e| e.into_inner())
}

// ----- config files -----

/// A config file under the temp directory, removed on drop.
struct ConfigFile {
    path: PathBuf,
}

impl ConfigFile {
    fn new(tag: &str, text: &str) -> ConfigFile {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "switchboard-reload-{}-{tag}-{}.toml",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let f = ConfigFile { path };
        f.write(text);
        f
    }

    fn write(&self, text: &str) {
        std::fs::write(&self.path, text)
            .unwrap_or_else(|e| panic!("write {}: {e}", self.path.display()));
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        std::fs::remove_file(&self.path).ok();
    }
}

// ----- the engine -----

/// A role added by hand: answers a `Sender<()>` message, so a test knows
/// when the loop has handled everything queued before it.
struct Probe;

impl Role for Probe {
    fn name(&self) -> &str {
        "probe"
    }

    fn start(&mut self, _ctx: &mut Ctx<'_>) -> Result<(), EngineError> {
        Ok(())
    }

    fn on_frame(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey, _frame: Frame<'_>) {
        ctx.abort(conn);
    }

    fn on_message(&mut self, _ctx: &mut Ctx<'_>, msg: Message) {
        if let Ok(tx) = msg.downcast::<mpsc::Sender<()>>() {
            tx.send(()).ok();
        }
    }
}

/// An engine running from a watched config file.
struct Live {
    engine: TestEngine,
    probe: RoleId,
    file: ConfigFile,
}

impl Live {
    fn start(tag: &str, text: &str) -> Live {
        let file = ConfigFile::new(tag, text);
        let config = Config::load(&file.path).unwrap_or_else(|e| panic!("bad test config: {e}"));
        let mut engine = Engine::from_config(&config).expect("engine");
        engine.watch_config(file.path.clone());
        let probe = engine.add_role(Box::new(Probe));
        Live {
            engine: TestEngine::from_engine(engine),
            probe,
            file,
        }
    }

    /// Wait until the loop has handled every command queued before this one.
    fn settle(&self) {
        let (tx, rx) = mpsc::channel::<()>();
        self.engine
            .handle
            .send(self.probe, Box::new(tx))
            .expect("engine inbox");
        rx.recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("the loop did not answer within {WAIT:?}"));
    }

    /// Write `text` to the watched file, ask for a reload and wait until the
    /// loop has handled it; returns how long that took.
    fn reload(&self, text: &str) -> Duration {
        self.file.write(text);
        let t0 = Instant::now();
        self.engine.handle.reload();
        self.settle();
        t0.elapsed()
    }

    /// Connect to `addr` and wait until the engine has accepted the
    /// connection (so its role has seen it).
    fn attach(&self, addr: SocketAddr) -> TcpStream {
        let before = self.engine.stats().accepted_total;
        let s = connect(addr);
        wait_for(
            &format!("the engine to accept a connection to {addr}"),
            WAIT,
            || self.engine.stats().accepted_total > before,
            || brief(&self.engine.stats()),
        );
        s
    }
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Reserve `N` loopback addresses (see the module docs).
fn addrs<const N: usize>() -> [SocketAddr; N] {
    [0; N].map(|_| local(fixed_port()))
}

/// `n` loopback ports below the kernel's ephemeral range (so no `connect`
/// or port-0 bind elsewhere picks them), each free a moment ago; `None` if
/// the range leaves too little room. Binding many listeners to port 0 is
/// slow on Linux once thousands are bound with `SO_REUSEADDR` (seconds per
/// thousand), which the scale test would otherwise spend most of its time on.
fn ports_below_ephemeral(n: usize) -> Option<Vec<u16>> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let low: u16 = range.split_whitespace().next()?.parse().ok()?;
    let mut held = Vec::with_capacity(n);
    for port in (1024..low).rev() {
        if held.len() == n {
            break;
        }
        if let Ok(l) = std::net::TcpListener::bind(local(port)) {
            held.push(l);
        }
    }
    (held.len() == n).then(|| {
        held.iter()
            .map(|l| l.local_addr().unwrap().port())
            .collect()
    })
}

// ----- sockets -----

/// Write `msg` and read it back (an echo, direct or through a tunnel).
fn echoes(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).unwrap();
    expect_bytes(s, msg);
}

/// The engine closes `s` (EOF or reset) within [`WAIT`], after sending
/// nothing more.
fn expect_closed(s: &mut TcpStream) {
    closed_within(s, WAIT);
}

/// Whether a connection to `addr` is refused (nothing listens there).
fn refused(addr: SocketAddr) -> bool {
    match TcpStream::connect_timeout(&addr, IO_TIMEOUT) {
        Ok(_) => false,
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => true,
        Err(e) => panic!("connect to {addr}: {e}"),
    }
}

fn expect_refused(addr: SocketAddr) {
    assert!(refused(addr), "{addr} still accepts connections");
}

/// Connect to `addr`, retrying while refused (a port that opens on its
/// own, such as a tunnel service's once its agent links).
fn connect_when_open(addr: SocketAddr) -> TcpStream {
    let mut s = None;
    let ok = wait_until(WAIT, || {
        match TcpStream::connect_timeout(&addr, IO_TIMEOUT) {
            Ok(c) => {
                s = Some(c);
                true
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => false,
            Err(e) => panic!("connect to {addr}: {e}"),
        }
    });
    assert!(ok, "{addr} did not open within {WAIT:?}");
    let s = s.unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Send `len` pattern bytes through an echo path and check every byte back
/// (a writer thread, so neither side's buffers have to hold it all).
fn echo_bulk(s: &mut TcpStream, seed: u64, len: usize) {
    let p = Pattern::new(seed);
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let mut off = 0usize;
        while off < len {
            let c = p.chunk(off as u64, (len - off).min(16 * 1024));
            w.write_all(c).unwrap();
            off += c.len();
        }
    });
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    while got < len {
        let n = s.read(&mut buf[..(len - got).min(64 * 1024)]).unwrap();
        assert!(n > 0, "closed after {got} of {len} bytes");
        p.check(got as u64, &buf[..n])
            .unwrap_or_else(|at| panic!("wrong byte at {at}"));
        got += n;
    }
    writer.join().unwrap();
}

// ----- router -----

fn router_config(dev: SocketAddr, connpts: &[(&str, SocketAddr)]) -> String {
    let mut t = format!("[[router]]\nname = \"r\"\nlisten = \"{dev}\"\n");
    for (name, addr) in connpts {
        t.push_str(&format!(
            "[[router.connpt]]\nname = \"{name}\"\nid = \"{name}\"\nlisten = \"{addr}\"\n"
        ));
    }
    t
}

/// A device that sends `id` and is routed to `app` (checked with a first
/// message each way).
fn device_online(live: &Live, dev: SocketAddr, id: &str, app: &mut TcpStream) -> TcpStream {
    let mut d = live.attach(dev);
    d.write_all(id.as_bytes()).unwrap();
    d.write_all(format!("hello from {id}").as_bytes()).unwrap();
    expect_bytes(app, format!("hello from {id}").as_bytes());
    app.write_all(format!("hello to {id}").as_bytes()).unwrap();
    expect_bytes(&mut d, format!("hello to {id}").as_bytes());
    d
}

fn both_ways(device: &mut TcpStream, app: &mut TcpStream, tag: &str) {
    device.write_all(format!("up {tag}").as_bytes()).unwrap();
    expect_bytes(app, format!("up {tag}").as_bytes());
    app.write_all(format!("down {tag}").as_bytes()).unwrap();
    expect_bytes(device, format!("down {tag}").as_bytes());
}

#[test]
fn router_reload_adds_and_removes_connpts_and_keeps_the_others() {
    let _fds = shared_fds();
    let [dev, p1, p2, p3] = addrs();
    let live = Live::start("router", &router_config(dev, &[("c1", p1), ("c3", p3)]));
    let mut app1 = live.attach(p1);
    let mut dev1 = device_online(&live, dev, "c1", &mut app1);
    let mut app3 = live.attach(p3);
    let mut dev3 = device_online(&live, dev, "c3", &mut app3);
    expect_refused(p2);

    let took = live.reload(&router_config(dev, &[("c1", p1), ("c2", p2)]));
    println!("router reload applied in {took:?}");

    // c1: its device and application are untouched and still talk.
    both_ways(&mut dev1, &mut app1, "after the reload");
    // c3: device and application closed, port closed, id unknown now.
    expect_closed(&mut dev3);
    expect_closed(&mut app3);
    expect_refused(p3);
    let mut late3 = connect(dev);
    late3.write_all(b"c3").unwrap();
    expect_closed(&mut late3);
    // c2: its port accepts and its device is routed.
    let mut app2 = live.attach(p2);
    let mut dev2 = device_online(&live, dev, "c2", &mut app2);
    both_ways(&mut dev2, &mut app2, "new");
    both_ways(&mut dev1, &mut app1, "again");
    expect_quiet(&mut app1, QUIET);
    expect_quiet(&mut dev1, QUIET);

    // Put c3 back: a fresh connpt on the same port.
    live.reload(&router_config(dev, &[("c1", p1), ("c2", p2), ("c3", p3)]));
    let mut app3 = live.attach(p3);
    let mut dev3 = device_online(&live, dev, "c3", &mut app3);
    both_ways(&mut dev3, &mut app3, "back");
    both_ways(&mut dev1, &mut app1, "third");
    both_ways(&mut dev2, &mut app2, "third");
}

#[test]
fn router_reload_that_changes_a_connpt_port_moves_only_that_connpt() {
    let _fds = shared_fds();
    let [dev, p1, p2, p2b] = addrs();
    let live = Live::start(
        "router-move",
        &router_config(dev, &[("c1", p1), ("c2", p2)]),
    );
    let mut app1 = live.attach(p1);
    let mut dev1 = device_online(&live, dev, "c1", &mut app1);
    let mut app2 = live.attach(p2);
    let mut dev2 = device_online(&live, dev, "c2", &mut app2);

    live.reload(&router_config(dev, &[("c1", p1), ("c2", p2b)]));
    both_ways(&mut dev1, &mut app1, "kept");
    // c2 changed: it is replaced (its device and application closed) and
    // now listens on the new port.
    expect_closed(&mut app2);
    expect_closed(&mut dev2);
    expect_refused(p2);
    let mut app2 = live.attach(p2b);
    let mut dev2 = device_online(&live, dev, "c2", &mut app2);
    both_ways(&mut dev2, &mut app2, "moved");
}

// ----- tunnel -----

fn tunnel_config(echo: SocketAddr, server: SocketAddr, services: &[(&str, SocketAddr)]) -> String {
    let mut t = format!(
        "[[echo]]\nname = \"local\"\nlisten = \"{echo}\"\n\n\
         [[tunnel_server]]\nname = \"ts\"\nlisten = \"{server}\"\n"
    );
    for (name, public) in services {
        t.push_str(&format!(
            "[[tunnel_server.service]]\nname = \"{name}\"\npublic = \"{public}\"\n"
        ));
    }
    for (name, _) in services {
        t.push_str(&format!(
            "\n[[tunnel_agent]]\nname = \"{name}\"\nserver = \"{server}\"\nlocal = \"{echo}\"\n"
        ));
    }
    t
}

#[test]
fn tunnel_reload_adds_a_service_and_open_streams_survive() {
    let _fds = shared_fds();
    let [echo, server, pub1, pub2, pub3] = addrs();
    let live = Live::start(
        "tunnel",
        &tunnel_config(echo, server, &[("s1", pub1), ("s3", pub3)]),
    );
    let mut s1 = connect_when_open(pub1);
    echoes(&mut s1, b"before");
    let mut s3 = connect_when_open(pub3);
    echoes(&mut s3, b"three");
    expect_refused(pub2);

    let took = live.reload(&tunnel_config(echo, server, &[("s1", pub1), ("s2", pub2)]));
    println!("tunnel reload applied in {took:?}");

    // The open stream of the unchanged service keeps going, byte-exact.
    echoes(&mut s1, b"after");
    echo_bulk(&mut s1, 1, 1024 * 1024);
    // The removed service: its stream and public port are gone.
    expect_closed(&mut s3);
    expect_refused(pub3);
    // The added service opens once its (added) agent links.
    let mut s2 = connect_when_open(pub2);
    echoes(&mut s2, b"two");
    // Another stream on the unchanged service.
    let mut s1b = connect(pub1);
    echoes(&mut s1b, b"more");
    echoes(&mut s1, b"still");
}

/// A tunnel server with services `(name, public, token)`, and an agent per
/// `(service, token)` that redials quickly, plus an admin endpoint.
fn revoke_config(
    echo: SocketAddr,
    server: SocketAddr,
    admin: SocketAddr,
    services: &[(&str, SocketAddr, &str)],
    agents: &[(&str, &str)],
) -> String {
    let mut t = format!(
        "[[echo]]\nname = \"local\"\nlisten = \"{echo}\"\n\n[admin]\nlisten = \"{admin}\"\n\n\
         [[tunnel_server]]\nname = \"ts\"\nlisten = \"{server}\"\n"
    );
    for (name, public, token) in services {
        t.push_str(&format!(
            "[[tunnel_server.service]]\nname = \"{name}\"\npublic = \"{public}\"\ntoken = \"{token}\"\n"
        ));
    }
    for (name, token) in agents {
        t.push_str(&format!(
            "\n[[tunnel_agent]]\nname = \"{name}\"\nserver = \"{server}\"\nlocal = \"{echo}\"\n\
             token = \"{token}\"\nreconnect_min = \"20ms\"\nreconnect_max = \"100ms\"\n"
        ));
    }
    t
}

/// The tunnel server's counter `name` (the agents report the same families
/// under their own names).
fn server_counter(admin: SocketAddr, name: &str) -> u64 {
    sample(
        &http_get(admin, "/metrics"),
        &format!("{name}{{role=\"tunnel_server\",name=\"ts\"}}"),
    )
}

/// Wait until the server's counter `name` has grown by at least `by`.
fn wait_counter_grows(admin: SocketAddr, name: &str, from: u64, by: u64) {
    wait_for(
        &format!("{name} to grow by {by}"),
        WAIT,
        || server_counter(admin, name) >= from + by,
        || server_counter(admin, name),
    );
}

const OLD_TOKEN: &str = "old-token-0123456789";
const NEW_TOKEN: &str = "new-token-0123456789";

#[test]
fn tunnel_reload_of_a_token_revokes_the_old_one_at_once() {
    let _fds = shared_fds();
    let [echo, server, admin, public] = addrs();
    let text = |service_token: &str, agent_token: &str| {
        revoke_config(
            echo,
            server,
            admin,
            &[("s1", public, service_token)],
            &[("s1", agent_token)],
        )
    };
    let live = Live::start("revoke", &text(OLD_TOKEN, OLD_TOKEN));
    let mut stream = connect_when_open(public);
    echoes(&mut stream, b"linked");

    // The service's token changes; the agent keeps the old one.
    let failed = server_counter(admin, "switchboard_tunnel_auth_failures_total");
    live.reload(&text(NEW_TOKEN, OLD_TOKEN));
    // The link that authenticated with the old token is gone, with its stream.
    expect_closed(&mut stream);
    // The agent redials with the old token: refused, again and again, and
    // the public port stays closed meanwhile.
    wait_counter_grows(admin, "switchboard_tunnel_auth_failures_total", failed, 3);
    expect_refused(public);
    let status = http_get(admin, "/status");
    assert!(status.contains("\"link\":\"down\""), "{status}");
    let up = "switchboard_tunnel_link_up{role=\"tunnel_server\",name=\"ts\",service=\"s1\"}";
    assert_eq!(sample(&http_get(admin, "/metrics"), up), 0);

    // The agent gets the new token: it links, and the port opens.
    live.reload(&text(NEW_TOKEN, NEW_TOKEN));
    let mut stream = connect_when_open(public);
    echoes(&mut stream, b"new token");
    assert_eq!(sample(&http_get(admin, "/metrics"), up), 1);
}

#[test]
fn tunnel_service_removed_by_a_reload_never_reopens_its_port() {
    let _fds = shared_fds();
    let [echo, server, admin, pub1, pub2] = addrs();
    let services = [("s1", pub1, OLD_TOKEN), ("s2", pub2, OLD_TOKEN)];
    let agents = [("s1", OLD_TOKEN), ("s2", OLD_TOKEN)];
    let live = Live::start(
        "remove-service",
        &revoke_config(echo, server, admin, &services, &agents),
    );
    let mut s1 = connect_when_open(pub1);
    let mut s2 = connect_when_open(pub2);
    echoes(&mut s2, b"two");

    // s2 is removed from the server; its agent stays and keeps asking.
    let rejected = server_counter(admin, "switchboard_tunnel_rejected_links_total");
    live.reload(&revoke_config(echo, server, admin, &services[..1], &agents));
    expect_closed(&mut s2);
    wait_counter_grows(
        admin,
        "switchboard_tunnel_rejected_links_total",
        rejected,
        3,
    );
    expect_refused(pub2);
    let status = http_get(admin, "/status");
    assert!(!status.contains("{\"name\":\"s2\",\"token\""), "{status}");
    assert!(
        !http_get(admin, "/metrics").contains("service=\"s2\""),
        "metrics still list the removed service"
    );
    // The other service is untouched.
    echoes(&mut s1, b"one");
}

// ----- broadcast -----

#[test]
fn broadcast_subscriber_survives_a_reload_of_another_role() {
    let _fds = shared_fds();
    let [subs, ingest, e1, e2] = addrs();
    let v1 = format!(
        "[[broadcast]]\nname = \"pos\"\nlisten = \"{subs}\"\ningest = \"{ingest}\"\n\n\
         [[echo]]\nname = \"e1\"\nlisten = \"{e1}\"\n"
    );
    let live = Live::start("broadcast", &v1);
    let mut sub = live.attach(subs);
    let mut publisher = live.attach(ingest);
    publisher.write_all(b"one\n").unwrap();
    expect_bytes(&mut sub, b"one\n");
    let mut echo1 = connect(e1);
    echoes(&mut echo1, b"e1");

    // Add an echo and change the other one (restarted): the broadcast is
    // not touched.
    let v2 = format!(
        "[[broadcast]]\nname = \"pos\"\nlisten = \"{subs}\"\ningest = \"{ingest}\"\n\n\
         [[echo]]\nname = \"e1\"\nlisten = \"{e1}\"\nidle_timeout = \"1h\"\n\n\
         [[echo]]\nname = \"e2\"\nlisten = \"{e2}\"\n"
    );
    live.reload(&v2);
    echoes(&mut connect(e2), b"e2");
    expect_closed(&mut echo1);
    echoes(&mut connect(e1), b"e1 again");

    publisher.write_all(b"two\nthree\n").unwrap();
    expect_bytes(&mut sub, b"two\nthree\n");
    let mut other = live.attach(ingest);
    other.write_all(b"four\n").unwrap();
    expect_bytes(&mut sub, b"four\n");
    expect_quiet(&mut sub, QUIET);
}

// ----- files that do not load -----

#[test]
fn a_file_that_does_not_load_changes_nothing_and_a_good_one_still_applies() {
    let _fds = shared_fds();
    let [e1, e2, dev, p1, server, public] = addrs();
    let good = format!(
        "[[echo]]\nname = \"e1\"\nlisten = \"{e1}\"\n\n{}",
        router_config(dev, &[("c1", p1)])
    );
    let live = Live::start("invalid", &good);
    let mut echo1 = connect(e1);
    echoes(&mut echo1, b"first");
    let mut app = live.attach(p1);
    let mut device = device_online(&live, dev, "c1", &mut app);

    // Each would remove e1 and the router and add e2 and a tunnel server.
    let wanted_but_bad = format!(
        "[[echo]]\nname = \"e2\"\nlisten = \"{e2}\"\n\n\
         [[tunnel_server]]\nname = \"ts\"\nlisten = \"{server}\"\n\
         [[tunnel_server.service]]\nname = \"s\"\npublic = \"{public}\"\n"
    );
    let cases = [
        (
            "TOML syntax error",
            format!("{wanted_but_bad}\n[[echo]\nname = \"broken\n"),
        ),
        (
            "validation error (max_streams = 999)",
            wanted_but_bad.replace(
                &format!("name = \"ts\"\nlisten = \"{server}\"\n"),
                &format!("name = \"ts\"\nlisten = \"{server}\"\nmax_streams = 999\n"),
            ),
        ),
        ("missing file", String::new()),
    ];
    assert!(Config::parse(&wanted_but_bad).is_ok());
    for (what, text) in cases {
        if what == "missing file" {
            std::fs::remove_file(&live.file.path).unwrap();
            live.engine.handle.reload();
            live.settle();
        } else {
            let e = Config::parse(&text).expect_err(what);
            println!("{what}: {e}");
            live.reload(&text);
        }
        // Everything runs as before: connections survive, new ones work,
        // nothing of the bad file was applied.
        echoes(&mut echo1, what.as_bytes());
        echoes(&mut connect(e1), b"new client");
        both_ways(&mut device, &mut app, what);
        expect_refused(e2);
        expect_refused(server);
    }

    // A good file applies after all that.
    let next = format!("{good}\n[[echo]]\nname = \"e2\"\nlisten = \"{e2}\"\n");
    live.reload(&next);
    echoes(&mut connect(e2), b"e2");
    echoes(&mut echo1, b"still here");
    both_ways(&mut device, &mut app, "still");
}

// ----- restarted and removed roles -----

#[test]
fn a_changed_role_restarts_on_the_same_address() {
    let _fds = shared_fds();
    let [e, subs, ingest] = addrs();
    let text = |idle: &str, framing: &str| {
        format!(
            "[[echo]]\nname = \"e\"\nlisten = \"{e}\"\nidle_timeout = \"{idle}\"\n\n\
             [[broadcast]]\nname = \"b\"\nlisten = \"{subs}\"\ningest = \"{ingest}\"\nframing = \"{framing}\"\n"
        )
    };
    let live = Live::start("restart", &text("1h", "line"));
    let mut old_echo = connect(e);
    echoes(&mut old_echo, b"old");
    let mut old_sub = live.attach(subs);
    let mut old_pub = live.attach(ingest);
    old_pub.write_all(b"line record\n").unwrap();
    expect_bytes(&mut old_sub, b"line record\n");

    live.reload(&text("2h", "u16"));
    // Old connections of both restarted roles are closed...
    expect_closed(&mut old_echo);
    expect_closed(&mut old_sub);
    expect_closed(&mut old_pub);
    // ...and each listens again on its address at once (no "address in use").
    echoes(&mut connect(e), b"new");
    let mut sub = live.attach(subs);
    let mut publisher = live.attach(ingest);
    let frame = [&[0u8, 5][..], b"hello"].concat();
    publisher.write_all(&frame).unwrap();
    expect_bytes(&mut sub, &frame);

    // And back, twice more: restarts can repeat.
    for (idle, framing) in [("3h", "line"), ("4h", "u32")] {
        live.reload(&text(idle, framing));
        echoes(&mut connect(e), idle.as_bytes());
        expect_closed(&mut sub);
        sub = live.attach(subs);
    }
    let mut publisher = live.attach(ingest);
    let frame = [&[0u8, 0, 0, 3][..], b"u32"].concat();
    publisher.write_all(&frame).unwrap();
    expect_bytes(&mut sub, &frame);
}

#[test]
fn a_removed_role_stops_listening_and_closes_its_connections() {
    let _fds = shared_fds();
    let [e1, e2, subs, ingest] = addrs();
    let echo = |name: &str, addr: SocketAddr| {
        format!("[[echo]]\nname = \"{name}\"\nlisten = \"{addr}\"\n\n")
    };
    let bc = format!("[[broadcast]]\nname = \"b\"\nlisten = \"{subs}\"\ningest = \"{ingest}\"\n");
    let live = Live::start(
        "removed",
        &format!("{}{}{bc}", echo("e1", e1), echo("e2", e2)),
    );
    let mut c1 = connect(e1);
    echoes(&mut c1, b"1");
    let mut c2 = connect(e2);
    echoes(&mut c2, b"2");
    let mut sub = live.attach(subs);

    live.reload(&echo("e1", e1));
    expect_refused(e2);
    expect_refused(subs);
    expect_refused(ingest);
    expect_closed(&mut c2);
    expect_closed(&mut sub);
    echoes(&mut c1, b"kept");

    // Removing everything leaves an engine that still answers and can take
    // roles again.
    live.reload("");
    expect_refused(e1);
    expect_closed(&mut c1);
    live.reload(&echo("e2", e2));
    echoes(&mut connect(e2), b"back");
}

// ----- ports changing hands, settings that restart nothing -----

#[test]
fn a_port_a_connpt_gives_up_can_be_taken_by_a_new_role_in_the_same_reload() {
    let _fds = shared_fds();
    let [dev, p1, p3] = addrs();
    let live = Live::start("handover", &router_config(dev, &[("c1", p1), ("c3", p3)]));
    let mut app3 = live.attach(p3);
    live.reload(&format!(
        "{}\n[[echo]]\nname = \"e\"\nlisten = \"{p3}\"\n",
        router_config(dev, &[("c1", p1)])
    ));
    expect_closed(&mut app3);
    echoes(&mut connect(p3), b"the echo has the port");
}

#[test]
fn a_port_a_removed_role_gives_up_can_be_taken_by_a_new_role_in_the_same_reload() {
    let _fds = shared_fds();
    let [a, b] = addrs();
    let live = Live::start(
        "takeover",
        &format!("[[echo]]\nname = \"old\"\nlisten = \"{a}\"\n"),
    );
    let mut c = connect(a);
    echoes(&mut c, b"old");
    // The old echo goes; a broadcast takes its address for subscribers.
    live.reload(&format!(
        "[[broadcast]]\nname = \"b\"\nlisten = \"{a}\"\ningest = \"{b}\"\n"
    ));
    expect_closed(&mut c);
    let mut sub = live.attach(a);
    live.attach(b).write_all(b"rec\n").unwrap();
    expect_bytes(&mut sub, b"rec\n");
}

#[test]
fn engine_settings_comments_and_key_order_restart_nothing() {
    let _fds = shared_fds();
    let [e, subs, ingest, admin] = addrs();
    let v1 = format!(
        "[engine]\nmax_connections = 2000\n\n\
         [[echo]]\nname = \"e\"\nlisten = \"{e}\"\nidle_timeout = \"1h\"\n\n\
         [[broadcast]]\nname = \"b\"\nlisten = \"{subs}\"\ningest = \"{ingest}\"\nreplay = 5\n\n\
         [admin]\nlisten = \"{admin}\"\n"
    );
    let live = Live::start("same", &v1);
    let mut c = connect(e);
    echoes(&mut c, b"1");
    let mut sub = live.attach(subs);
    let mut publisher = live.attach(ingest);
    let mut idle_admin = live.attach(admin);

    // The same roles written differently, and an [engine] change (which
    // only applies at the next start).
    let v2 = format!(
        "# reordered, with comments\n[[broadcast]]\nreplay = 5 # same\ningest = \"{ingest}\"\n\
         listen = \"{subs}\"\nname = \"b\"\n\n\
         [admin]\nlisten = \"{admin}\"\nrequest_timeout = \"5s\" # the default\n\n\
         [engine]\nmax_connections = 3000\n\n\
         [[echo]]\nidle_timeout = \"60m\"\nlisten = \"{e}\"\nname = \"e\"\n"
    );
    live.reload(&v2);
    echoes(&mut c, b"2");
    publisher.write_all(b"r\n").unwrap();
    expect_bytes(&mut sub, b"r\n");
    // The admin client that was waiting for its request is still waited for.
    idle_admin
        .write_all(b"GET /healthz HTTP/1.1\r\n\r\n")
        .unwrap();
    let answer = util::read_to_eof(&mut idle_admin, 4096);
    assert!(
        answer.starts_with(b"HTTP/1.1 200 OK\r\n"),
        "{}",
        show(&answer)
    );
    // The client may see the close a moment before the loop has counted it.
    wait_until(Duration::from_secs(5), || {
        live.engine.stats().closed_total >= 1
    });
    assert_eq!(live.engine.stats().closed_total, 1, "only the admin client");
}

#[test]
fn a_changed_admin_restarts_on_the_same_address() {
    let _fds = shared_fds();
    let [admin] = addrs();
    let live = Live::start(
        "admin",
        &format!("[admin]\nlisten = \"{admin}\"\nmax_clients = 4\n"),
    );
    assert!(http_get(admin, "/healthz").starts_with("ok"));
    live.reload(&format!("[admin]\nlisten = \"{admin}\"\nmax_clients = 8\n"));
    assert!(http_get(admin, "/healthz").starts_with("ok"));
    assert!(http_get(admin, "/status").contains("\"role\":\"admin\""));
}

#[test]
fn a_new_role_whose_address_is_taken_starts_at_a_later_reload() {
    let _fds = shared_fds();
    let [e1, e2] = addrs();
    let v1 = format!("[[echo]]\nname = \"e1\"\nlisten = \"{e1}\"\n");
    let v2 = format!("{v1}\n[[echo]]\nname = \"e2\"\nlisten = \"{e2}\"\n");
    let live = Live::start("taken", &v1);
    let mut c1 = connect(e1);
    // Something else holds e2's address: the reload cannot start e2 but
    // leaves the rest running.
    let squatter = std::net::TcpListener::bind(e2).unwrap();
    live.reload(&v2);
    echoes(&mut c1, b"still");
    squatter.set_nonblocking(true).unwrap();
    let c2 = connect(e2);
    assert!(squatter.accept().is_ok(), "the squatter has the port");
    drop((c2, squatter));
    // The same file again, now that the address is free: e2 starts.
    live.reload(&v2);
    echoes(&mut connect(e2), b"e2");
    echoes(&mut c1, b"e1");
}

// ----- what the admin endpoint says after a reload -----

/// The `"role":"..","name":".."` pairs of a status document, in order.
fn status_roles(status: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = status;
    while let Some(at) = rest.find("{\"role\":\"") {
        rest = &rest[at + 9..];
        let kind = &rest[..rest.find('"').unwrap()];
        let after = &rest[kind.len()..];
        let name = after
            .strip_prefix("\",\"name\":\"")
            .map(|r| &r[..r.find('"').unwrap()])
            .unwrap_or_default();
        out.push((kind.to_owned(), name.to_owned()));
    }
    out
}

/// The value of the sample line that starts with `prefix` (name and labels).
fn sample(metrics: &str, prefix: &str) -> u64 {
    let line = metrics
        .lines()
        .find(|l| l.starts_with(prefix) && l[prefix.len()..].starts_with(' '))
        .unwrap_or_else(|| panic!("no {prefix} in {metrics}"));
    line[prefix.len() + 1..].parse().unwrap()
}

#[test]
fn status_after_a_reload_lists_exactly_the_running_roles() {
    let _fds = shared_fds();
    let [e1, e2, e3, admin] = addrs();
    let text = |echoes: &[(&str, SocketAddr, &str)]| {
        let mut t = String::new();
        for (name, addr, idle) in echoes {
            t.push_str(&format!(
                "[[echo]]\nname = \"{name}\"\nlisten = \"{addr}\"\nidle_timeout = \"{idle}\"\n"
            ));
        }
        t + &format!("\n[admin]\nlisten = \"{admin}\"\n")
    };
    let live = Live::start("status", &text(&[("e1", e1, "1h"), ("e2", e2, "1h")]));
    let roles = status_roles(&http_get(admin, "/status"));
    let names: Vec<(&str, &str)> = roles.iter().map(|(k, n)| (&**k, &**n)).collect();
    assert_eq!(
        names,
        [
            ("echo", "e1"),
            ("echo", "e2"),
            ("admin", "admin"),
            ("custom", "probe")
        ]
    );

    // e1 restarted (changed), e2 removed, e3 added.
    live.reload(&text(&[("e1", e1, "2h"), ("e3", e3, "1h")]));
    let mut roles = status_roles(&http_get(admin, "/status"));
    roles.sort();
    let names: Vec<(&str, &str)> = roles.iter().map(|(k, n)| (&**k, &**n)).collect();
    assert_eq!(
        names,
        [
            ("admin", "admin"),
            ("custom", "probe"),
            ("echo", "e1"),
            ("echo", "e3")
        ]
    );
}

#[test]
fn router_metrics_after_a_reload_count_the_configured_connpts() {
    let _fds = shared_fds();
    let [dev, p1, p2, p3, admin] = addrs();
    let text = |connpts: &[(&str, SocketAddr)]| {
        format!(
            "{}\n[admin]\nlisten = \"{admin}\"\n",
            router_config(dev, connpts)
        )
    };
    let gauge = "switchboard_router_connpts{role=\"router\",name=\"r\"}";
    let live = Live::start(
        "router-metrics",
        &text(&[("c1", p1), ("c2", p2), ("c3", p3)]),
    );
    assert_eq!(sample(&http_get(admin, "/metrics"), gauge), 3);
    live.reload(&text(&[("c1", p1)]));
    let status = http_get(admin, "/status");
    assert!(!status.contains("\"name\":\"c2\""), "{status}");
    assert_eq!(sample(&http_get(admin, "/metrics"), gauge), 1);
}

// ----- the binary: SIGHUP -----

#[test]
fn sighup_reloads_the_file_given_to_run() {
    let _fds = shared_fds();
    let [a, b] = addrs();
    let echo = |name: &str, addr: SocketAddr| {
        format!("[[echo]]\nname = \"{name}\"\nlisten = \"{addr}\"\n\n")
    };
    let file = ConfigFile::new("sighup", &echo("a", a));
    let child = target_command(bin())
        .args(["--log-level", "info", "run", "-c"])
        .arg(&file.path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn switchboard");
    let mut child = ChildGuard(child);
    let log = Captured::new(child.0.stderr.take().unwrap());
    let listening = |name: &str, addr: SocketAddr| format!("echo '{name}' listening on {addr}");
    assert!(
        log.wait_for(WAIT, |t| t.contains(&listening("a", a))),
        "not started: {}",
        log.text()
    );
    let mut client = connect(a);
    echoes(&mut client, b"before");

    // Add an echo; the running one is unchanged.
    file.write(&format!("{}{}", echo("a", a), echo("b", b)));
    send_signal(child.id(), "HUP");
    let mut cb = connect_when_open(b);
    echoes(&mut cb, b"b is there");
    assert!(
        log.wait_for(WAIT, |t| t.contains("reload done in")),
        "{}",
        log.text()
    );
    echoes(&mut client, b"after");

    // A broken file: logged, nothing changes.
    file.write("[[echo]\n");
    send_signal(child.id(), "HUP");
    assert!(
        log.wait_for(WAIT, |t| t.contains("reload refused")),
        "{}",
        log.text()
    );
    echoes(&mut client, b"still");
    echoes(&mut cb, b"still b");

    // Remove b: its port closes, its client too.
    file.write(&echo("a", a));
    send_signal(child.id(), "HUP");
    expect_closed(&mut cb);
    assert!(wait_until(WAIT, || refused(b)), "{b} still open");
    echoes(&mut client, b"last");

    send_signal(child.id(), "TERM");
    expect_closed(&mut client);
    let status = child.wait(WAIT);
    let log = log.finish();
    assert_eq!(status.code(), Some(0), "{status}: {log}");
    assert_eq!(log.matches("reload done in").count(), 2, "{log}");
}

// ----- scale -----

/// Connpts in the scale test, and devices online among them (each device
/// and its application: a socket on each side, 4 descriptors in this
/// process, plus one listener per connpt).
const SCALE_CONNPTS: usize = 10_000;
const SCALE_ONLINE: usize = 2_000;

#[test]
fn reload_of_10_000_connpts_keeps_2_000_online_devices() {
    let _all = FDS.write().unwrap_or_else(|e| e.into_inner());
    let start = Instant::now();
    let id = |i: usize| format!("d{i:05}");
    let ports = ports_below_ephemeral(SCALE_CONNPTS + 1);
    let port = |i: usize| ports.as_ref().map_or(0, |p| p[i]);
    let mut text = String::from(
        "[engine]\nmax_connections = 20000\n\n\
         [[router]]\nname = \"big\"\nlisten = \"127.0.0.1:0\"\n\
         max_pending = 5000\nmax_pending_per_ip = 5000\n",
    );
    for i in 0..SCALE_CONNPTS {
        text.push_str(&format!(
            "[[router.connpt]]\nname = \"k{i:05}\"\nid = \"{}\"\nlisten = \"127.0.0.1:{}\"\n",
            id(i),
            port(i)
        ));
    }
    let t0 = Instant::now();
    let live = Live::start("scale", &text);
    println!(
        "{SCALE_CONNPTS} connpts loaded and listening in {:?}",
        t0.elapsed()
    );
    let addrs = live.engine.addrs.clone();
    assert_eq!(addrs.len(), 1 + SCALE_CONNPTS);
    let devices_at = addrs[0];

    // Applications first (in batches below the listen backlog), then the
    // devices, each sending its id at once.
    let accepted = || live.engine.stats().accepted_total;
    let mut apps = Vec::with_capacity(SCALE_ONLINE);
    let mut devices = Vec::with_capacity(SCALE_ONLINE);
    for batch in (0..SCALE_ONLINE).collect::<Vec<_>>().chunks(500) {
        let before = accepted();
        for &i in batch {
            apps.push(connect(addrs[1 + i]));
        }
        wait_for(
            "applications accepted",
            WAIT,
            || accepted() >= before + batch.len() as u64,
            || brief(&live.engine.stats()),
        );
    }
    for batch in (0..SCALE_ONLINE).collect::<Vec<_>>().chunks(500) {
        let before = accepted();
        for &i in batch {
            let mut d = connect(devices_at);
            d.write_all(id(i).as_bytes()).unwrap();
            devices.push(d);
        }
        wait_for(
            "devices accepted",
            WAIT,
            || accepted() >= before + batch.len() as u64,
            || brief(&live.engine.stats()),
        );
    }
    let round = |tag: &str, devices: &mut [TcpStream], apps: &mut [TcpStream]| {
        for (i, d) in devices.iter_mut().enumerate() {
            d.write_all(format!("{tag}>{i:05};").as_bytes()).unwrap();
        }
        for (i, a) in apps.iter_mut().enumerate() {
            expect_bytes(a, format!("{tag}>{i:05};").as_bytes());
        }
        for (i, a) in apps.iter_mut().enumerate() {
            a.write_all(format!("{tag}<{i:05};").as_bytes()).unwrap();
        }
        for (i, d) in devices.iter_mut().enumerate() {
            expect_bytes(d, format!("{tag}<{i:05};").as_bytes());
        }
    };
    round("a", &mut devices, &mut apps);
    println!(
        "{SCALE_ONLINE} devices and applications online and talking at {:?}",
        start.elapsed()
    );

    // Add one connpt on a port of its own.
    let new_port = match &ports {
        Some(p) => local(p[SCALE_CONNPTS]),
        None => local(fixed_port()),
    };
    let added = format!(
        "{text}[[router.connpt]]\nname = \"k{SCALE_CONNPTS:05}\"\nid = \"{}\"\nlisten = \"{new_port}\"\n",
        id(SCALE_CONNPTS)
    );
    live.file.write(&added);
    let t0 = Instant::now();
    live.engine.handle.reload();
    let before = accepted();
    let mut app = connect_when_open(new_port);
    let open = t0.elapsed();
    live.settle();
    let applied = t0.elapsed();
    println!(
        "reload adding 1 connpt to {SCALE_CONNPTS} with {SCALE_ONLINE} devices online: \
         new port accepting {open:?} after Handle::reload, loop done with it after {applied:?}"
    );

    // Nobody was dropped: every device still talks both ways.
    round("b", &mut devices, &mut apps);
    assert_eq!(
        live.engine.stats().closed_total,
        0,
        "{}",
        brief(&live.engine.stats())
    );
    // ...and none has anything unexpected waiting, or was closed.
    for (i, d) in devices.iter_mut().chain(apps.iter_mut()).enumerate() {
        d.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 64];
        match d.read(&mut buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            other => panic!("socket {i}: {other:?}"),
        }
        d.set_nonblocking(false).unwrap();
    }
    // The new connpt routes its device.
    wait_for(
        "the new application accepted",
        WAIT,
        || accepted() > before,
        || brief(&live.engine.stats()),
    );
    let mut d = connect(devices_at);
    d.write_all(id(SCALE_CONNPTS).as_bytes()).unwrap();
    d.write_all(b"new one").unwrap();
    expect_bytes(&mut app, b"new one");
    app.write_all(b"welcome").unwrap();
    expect_bytes(&mut d, b"welcome");

    // The same reload again changes nothing (and takes about as long).
    let again = live.reload(&added);
    println!("the same file again: {again:?}");
    round("c", &mut devices, &mut apps);
    println!("checked at {:?}", start.elapsed());
    drop(live);
    println!("engine stopped at {:?}", start.elapsed());
}
