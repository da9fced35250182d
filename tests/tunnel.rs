//! The tunnel roles end to end (docs/PROTOCOL.md is the contract): in-process
//! engines on loopback driven with std sockets.
//!
//! Three kinds of test: our server with our agent; our server with an agent
//! written here (raw frames: the base protocol, or a hand-made extended
//! handshake, for authentication, replay, malformed input, PEER_ADDR, credit
//! and heartbeat); our agent with a server written here (the base protocol:
//! streams, allowlist, refusal of a base server when a token is set). The
//! roles are built directly so that the tests can read their [`TunnelStats`].
//! The server's link listener binds port 0 and is read back from the engine
//! (`addrs[0]`); a service's public port is 0 too and is read from the stats
//! once an agent is linked.
//!
//! The session's own rules (handshake, ids, credit and window growth,
//! half-close, close-ack, heartbeat schedule, counters) are unit-tested on
//! a virtual clock in `src/proto/tunnel/tests.rs`; what is here is what
//! only the roles, the engine and real sockets can show.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly"
)]

mod util;

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use switchboard::Config;
use switchboard::codec::tunnel::{
    Command, HEADER_LEN, Hello, ListenRequest, MAC_LEN, NONCE_LEN, ext, header, parse_peer, reject,
};
use switchboard::config::{EngineConfig, TunnelAgentConfig, TunnelServerConfig};
use switchboard::role::{AgentState, TunnelAgent, TunnelServer, TunnelStats};

use util::{
    IO_TIMEOUT, Pattern, TestEngine, accept_within, closed_within, connect, connect_from,
    expect_bytes, expect_quiet, show, wait_for,
};

/// Bound on waiting for a counter, a link or a frame.
const WAIT: Duration = Duration::from_secs(10);
/// "Closed at once": EOF must come within this.
const AT_ONCE: Duration = Duration::from_secs(2);
/// How long "nothing arrives" is watched for.
const QUIET: Duration = Duration::from_millis(150);

type HmacSha256 = Hmac<Sha256>;

/// Held by the tests whose outcome depends on how fast a client reads (window
/// growth) and by the one that moves the most bytes, so that they do not
/// run beside each other on a two-core machine.
static TIMING: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn timing_lock() -> std::sync::MutexGuard<'static, ()> {
    TIMING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

// ----- engines -----

/// A tunnel server on its own engine.
struct Server {
    engine: TestEngine,
    stats: Arc<TunnelStats>,
    /// Where agents dial.
    link: SocketAddr,
}

fn server_config(toml: &str) -> TunnelServerConfig {
    let config = Config::parse(toml).unwrap_or_else(|e| panic!("bad server config: {e}"));
    config.tunnel_server[0].clone()
}

fn agent_config(toml: &str) -> TunnelAgentConfig {
    let config = Config::parse(toml).unwrap_or_else(|e| panic!("bad agent config: {e}"));
    config.tunnel_agent[0].clone()
}

/// Start a server from a `[[tunnel_server]]` TOML whose `listen` is port 0.
fn start_server(toml: &str) -> Server {
    let server = TunnelServer::new(&server_config(toml));
    let stats = server.stats();
    let (engine, _) = TestEngine::with_roles(EngineConfig::default(), vec![Box::new(server)]);
    let link = engine.addrs[0];
    Server {
        engine,
        stats,
        link,
    }
}

/// A server with one service `name` (with `token`, if any) and `extra`
/// settings, listening on ports chosen by the system.
fn start_simple_server(name: &str, token: Option<&str>, extra: &str) -> Server {
    let token = token.map_or_else(String::new, |t| format!("token = \"{t}\"\n"));
    start_server(&format!(
        "[[tunnel_server]]\nlisten = \"127.0.0.1:0\"\n{extra}\n\
         [[tunnel_server.service]]\nname = \"{name}\"\npublic = \"127.0.0.1:0\"\n{token}"
    ))
}

/// A tunnel agent on its own engine.
struct Agent {
    _engine: TestEngine,
    stats: Arc<TunnelStats>,
}

fn start_agent(config: &TunnelAgentConfig) -> Agent {
    let agent = TunnelAgent::new(config);
    let stats = agent.stats();
    let (engine, _) = TestEngine::with_roles(EngineConfig::default(), vec![Box::new(agent)]);
    Agent {
        _engine: engine,
        stats,
    }
}

/// An agent for service `name` of the server at `server`, streams to `local`.
fn agent_toml(name: &str, server: SocketAddr, local: SocketAddr, extra: &str) -> String {
    format!(
        "[[tunnel_agent]]\nname = \"{name}\"\nserver = \"{server}\"\nlocal = \"{local}\"\n{extra}\n"
    )
}

/// Wait until the agent's link is up; returns the extension bits in force.
fn wait_agent_up(agent: &Agent) -> u16 {
    wait_for(
        "the agent's link to come up",
        WAIT,
        || matches!(agent.stats.agent(), Some((AgentState::Up, _, _))),
        || agent.stats.agent(),
    );
    agent.stats.agent().unwrap().2
}

/// Wait for `service`'s public port to open; returns it.
fn wait_public(stats: &TunnelStats, service: &str) -> SocketAddr {
    wait_for(
        "the public port to open",
        WAIT,
        || stats.public_addr(service).is_some(),
        || (),
    );
    stats.public_addr(service).unwrap()
}

fn load(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// Wait until `c` reads `want`.
fn wait_count(what: &str, c: &AtomicU64, want: u64) {
    wait_for(what, WAIT, || load(c) == want, || load(c));
}

// ----- local services (std threads) -----

/// A TCP service on its own threads: an accept loop that polls a stop flag,
/// one thread per connection running `handler`. Dropping it stops accepting;
/// connection threads end on their sockets' timeouts or EOF.
struct LocalService {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl LocalService {
    fn start(handler: impl Fn(TcpStream) + Send + Sync + 'static) -> LocalService {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let handler = Arc::new(handler);
        let (count, flag) = (Arc::clone(&accepted), Arc::clone(&stop));
        let thread = thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        count.fetch_add(1, Ordering::Relaxed);
                        s.set_nonblocking(false).unwrap();
                        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                        s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
                        let h = Arc::clone(&handler);
                        thread::spawn(move || h(s));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(2));
                    }
                    Err(e) => panic!("local service accept: {e}"),
                }
            }
        });
        LocalService {
            addr,
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    /// Echo every byte until EOF.
    fn echo() -> LocalService {
        LocalService::start(echo_handler)
    }
}

impl Drop for LocalService {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().ok();
        }
    }
}

fn echo_handler(mut s: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

// ----- client sockets -----

/// Connect to `public`, send `msg`, read it back (through an echo service).
fn echo_round_trip(public: SocketAddr, msg: &[u8]) {
    let mut c = connect(public);
    c.write_all(msg).unwrap();
    expect_bytes(&mut c, msg);
}

/// `clients` concurrent clients each send `bytes` of their own pattern to
/// `public` (an echo service behind it) while reading the echo; all checked.
fn pattern_clients(public: SocketAddr, clients: u64, bytes: u64) {
    let threads: Vec<_> = (0..clients)
        .map(|seed| {
            thread::spawn(move || {
                let c = connect(public);
                let mut w = c.try_clone().unwrap();
                let p = Pattern::new(seed);
                let writer = thread::spawn(move || {
                    let mut off = 0;
                    while off < bytes {
                        let chunk = p.chunk(off, 7000.min((bytes - off) as usize));
                        w.write_all(chunk).unwrap();
                        off += chunk.len() as u64;
                    }
                });
                let mut r = c;
                let mut off = 0u64;
                let mut buf = vec![0u8; 32 * 1024];
                while off < bytes {
                    let n = r.read(&mut buf).unwrap();
                    assert!(n > 0, "client {seed}: EOF after {off} bytes");
                    p.check(off, &buf[..n])
                        .unwrap_or_else(|at| panic!("client {seed}: wrong byte at {at}"));
                    off += n as u64;
                }
                writer.join().unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

fn expect_closed(s: &mut TcpStream) {
    closed_within(s, AT_ONCE);
}

// ----- raw frames -----

fn frame(command: Command, id: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = header(command, id, payload.len()).unwrap().to_vec();
    v.extend_from_slice(payload);
    v
}

fn send_frame(s: &mut TcpStream, command: Command, id: u8, payload: &[u8]) {
    s.write_all(&frame(command, id, payload))
        .unwrap_or_else(|e| panic!("sending {command:?} id {id}: {e}"));
}

/// The next frame, or `None` if the peer closed the link (EOF or reset) at a
/// frame boundary. Fails the test on a timeout or a close inside a frame.
fn recv_frame(s: &mut TcpStream) -> Option<(Command, u8, Vec<u8>)> {
    let mut head = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match s.read(&mut head[got..]) {
            Ok(0) if got == 0 => return None,
            Ok(0) => panic!("link closed inside a frame header"),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset && got == 0 => return None,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("reading a frame header: {e}"),
        }
    }
    let len = usize::from(u16::from_be_bytes([head[0], head[1]]));
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload)
        .unwrap_or_else(|e| panic!("reading a {len}-byte payload: {e}"));
    Some((Command::from_u8(head[2]), head[3], payload))
}

/// The next frame must be `command` for `id`; returns its payload.
fn expect_frame(s: &mut TcpStream, command: Command, id: u8) -> Vec<u8> {
    match recv_frame(s) {
        Some((c, i, p)) if c == command && i == id => p,
        Some((c, i, p)) => {
            panic!(
                "expected {command:?} id {id}, got {c:?} id {i} {:?}",
                show(&p)
            )
        }
        None => panic!("expected {command:?} id {id}, the link was closed"),
    }
}

/// The next frame must be a CONNECT; returns its id and payload.
fn expect_connect(s: &mut TcpStream) -> (u8, Vec<u8>) {
    match recv_frame(s) {
        Some((Command::Connect, id, p)) => (id, p),
        other => panic!("expected CONNECT, got {other:?}"),
    }
}

/// Read DATA frames for `id` until `want.len()` bytes came; compare.
fn expect_data(s: &mut TcpStream, id: u8, want: &[u8]) {
    let mut got = Vec::new();
    while got.len() < want.len() {
        got.extend(expect_frame(s, Command::Data, id));
    }
    assert_eq!(show(&got), show(want));
}

/// The peer closes the link within `AT_ONCE`, with no frame before.
fn expect_link_closed(s: &mut TcpStream) {
    s.set_read_timeout(Some(AT_ONCE)).unwrap();
    if let Some(f) = recv_frame(s) {
        panic!("expected the link to be closed, got {f:?}");
    }
}

fn listen_payload(flags: u16, window: u32, nonce: [u8; NONCE_LEN], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    ListenRequest {
        flags,
        window,
        nonce,
        name,
    }
    .encode(&mut p)
    .unwrap();
    p
}

/// Tag per PROTOCOL.md §4.1: HMAC(token, label || first || second || flags || name).
fn tag(
    token: &[u8],
    label: &[u8],
    first: &[u8],
    second: &[u8],
    flags: u16,
    name: &[u8],
) -> Vec<u8> {
    let mut m = HmacSha256::new_from_slice(token).unwrap();
    m.update(label);
    m.update(first);
    m.update(second);
    m.update(&flags.to_be_bytes());
    m.update(name);
    m.finalize().into_bytes().to_vec()
}

fn agent_tag(token: &[u8], na: &[u8], ns: &[u8], flags: u16, name: &[u8]) -> Vec<u8> {
    tag(token, b"switchboard-tunnel-v1 agent", na, ns, flags, name)
}

fn server_tag(token: &[u8], na: &[u8], ns: &[u8], flags: u16, name: &[u8]) -> Vec<u8> {
    tag(token, b"switchboard-tunnel-v1 server", ns, na, flags, name)
}

/// Send an extension request; read and parse the HELLO.
fn hand_listen(s: &mut TcpStream, flags: u16, nonce: [u8; NONCE_LEN], name: &[u8]) -> Hello {
    send_frame(
        s,
        Command::Listen,
        0,
        &listen_payload(flags, 65536, nonce, name),
    );
    let p = expect_frame(s, Command::Hello, 0);
    Hello::parse(&p).unwrap_or_else(|| panic!("malformed HELLO {:?}", show(&p)))
}

/// The next frame must be REJECT with `reason`, then the link closes.
fn expect_reject(s: &mut TcpStream, reason: u8) {
    let p = expect_frame(s, Command::Reject, 0);
    assert_eq!(p.first(), Some(&reason), "REJECT {:?}", show(&p));
    expect_link_closed(s);
}

/// A server written here: listens, accepts the agent's link.
fn accept_link(listener: &TcpListener) -> TcpStream {
    let s = accept_within(listener, WAIT);
    s.set_nodelay(true).unwrap();
    s
}

// ===== 1. our server + our agent =====

#[test]
fn extended_with_token_round_trips_sequential_and_concurrent_clients() {
    let service = LocalService::echo();
    let server = start_simple_server("svc", Some("s3cret-0123456789"), "");
    let agent = start_agent(&agent_config(&agent_toml(
        "svc",
        server.link,
        service.addr,
        "token = \"s3cret-0123456789\"",
    )));
    assert_eq!(wait_agent_up(&agent), ext::ALL, "every extension granted");
    assert_eq!(ext::ALL, 0x3f);
    let public = wait_public(&server.stats, "svc");
    assert!(server.stats.agent_addr("svc").is_some());
    assert_eq!(load(&server.stats.links), 1);

    for i in 0..3 {
        echo_round_trip(public, format!("hello {i}").as_bytes());
    }

    const CLIENTS: u64 = 8;
    pattern_clients(public, CLIENTS, 300 * 1024);
    assert_eq!(load(&server.stats.streams_total), 3 + CLIENTS);
    wait_count("server streams back to 0", &server.stats.streams, 0);
    wait_count("agent streams back to 0", &agent.stats.streams, 0);
    assert_eq!(load(&agent.stats.streams_total), 3 + CLIENTS);
    assert_eq!(load(&server.stats.credit_violations_total), 0);
    assert_eq!(load(&agent.stats.credit_violations_total), 0);
    assert_eq!(load(&server.stats.malformed_total), 0);
    assert_eq!(load(&agent.stats.malformed_total), 0);
    assert_eq!(load(&server.stats.stale_total), 0);
    assert_eq!(load(&agent.stats.stale_total), 0);
    // The link survives all that.
    echo_round_trip(public, b"still there");
}

// ===== 2. our server + a base-protocol agent written here =====

#[test]
fn base_agent_written_here_carries_streams() {
    let server = start_simple_server("open", None, "");
    let mut link = connect(server.link);
    send_frame(&mut link, Command::Listen, 0, &[]);
    let public = wait_public(&server.stats, "open");
    assert_eq!(load(&server.stats.links), 1);

    // Client bytes arrive as DATA; the agent's DATA reaches the client.
    let mut client = connect(public);
    let (id, payload) = expect_connect(&mut link);
    assert!(payload.is_empty(), "base CONNECT carries no payload");
    client.write_all(b"GET /").unwrap();
    expect_data(&mut link, id, b"GET /");
    send_frame(&mut link, Command::Data, id, b"200 OK");
    expect_bytes(&mut client, b"200 OK");
    wait_count("one stream", &server.stats.streams, 1);

    // The client closes: CLOSE for its id (and nothing is expected back).
    drop(client);
    expect_frame(&mut link, Command::Close, id);
    wait_count("no streams", &server.stats.streams, 0);

    // The agent closes: the client reads what was sent, then EOF.
    let mut client = connect(public);
    let (id2, _) = expect_connect(&mut link);
    assert_eq!(id2, id.wrapping_add(1), "ids are given in rotation");
    client.write_all(b"hi").unwrap();
    expect_data(&mut link, id2, b"hi");
    send_frame(&mut link, Command::Data, id2, b"bye");
    send_frame(&mut link, Command::Close, id2, &[]);
    expect_bytes(&mut client, b"bye");
    expect_closed(&mut client);
    wait_count("no streams", &server.stats.streams, 0);
    // The server does not answer a base agent's CLOSE.
    expect_quiet(&mut link, QUIET);

    // The link going down closes the public port.
    drop(link);
    wait_for(
        "the public port to close",
        WAIT,
        || server.stats.public_addr("open").is_none(),
        || (),
    );
    wait_count("no links", &server.stats.links, 0);
    assert!(
        TcpStream::connect(public).is_err(),
        "public port still open"
    );
}

#[test]
fn service_with_token_refuses_an_empty_listen() {
    let server = start_simple_server("locked", Some("s3cret-0123456789"), "");
    let mut link = connect(server.link);
    send_frame(&mut link, Command::Listen, 0, &[]);
    // A base agent understands no REJECT: the link is just closed.
    expect_link_closed(&mut link);
    assert_eq!(load(&server.stats.rejected_total), 1);
    assert_eq!(server.stats.public_addr("locked"), None);
    assert_eq!(load(&server.stats.links), 0);
}

// ===== 3. our agent + a base-protocol server written here =====

/// A local service that echoes, and closes after echoing a read that
/// contains "bye"; counts the EOFs it reads.
fn echo_until_bye(eofs: Arc<AtomicU64>) -> LocalService {
    LocalService::start(move |mut s| {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) => {
                    eofs.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err(_) => return,
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                    if buf[..n].windows(3).any(|w| w == b"bye") {
                        return;
                    }
                }
            }
        }
    })
}

#[test]
fn agent_talks_to_a_base_server_written_here() {
    let eofs = Arc::new(AtomicU64::new(0));
    let service = echo_until_bye(Arc::clone(&eofs));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let agent = start_agent(&agent_config(&agent_toml(
        "dev1",
        listener.local_addr().unwrap(),
        service.addr,
        "",
    )));
    let mut link = accept_link(&listener);

    // The agent asks for extensions; a base server ignores the payload.
    let p = expect_frame(&mut link, Command::Listen, 0);
    let req = ListenRequest::parse(&p).expect("a well-formed extension request");
    assert_eq!(req.flags, ext::ALL & !ext::AUTH, "no token: no AUTH asked");
    assert_eq!(req.name, b"dev1");

    // CONNECT first (no HELLO): the agent carries on in base mode.
    send_frame(&mut link, Command::Connect, 7, &[]);
    send_frame(&mut link, Command::Data, 7, b"ping");
    expect_data(&mut link, 7, b"ping");
    assert_eq!(wait_agent_up(&agent), 0, "base mode: no extensions");
    assert_eq!(load(&agent.stats.streams), 1);

    // Server → agent CLOSE: the local socket is closed (the service reads
    // EOF); in base mode nothing comes back.
    send_frame(&mut link, Command::Close, 7, &[]);
    wait_count("the local service to read EOF", &eofs, 1);
    wait_count("no streams", &agent.stats.streams, 0);
    expect_quiet(&mut link, QUIET);

    // Agent → server CLOSE: the local service closes after "bye".
    send_frame(&mut link, Command::Connect, 8, &[]);
    send_frame(&mut link, Command::Data, 8, b"bye");
    expect_data(&mut link, 8, b"bye");
    expect_frame(&mut link, Command::Close, 8);
    wait_count("no streams", &agent.stats.streams, 0);
    assert_eq!(load(&agent.stats.streams_total), 2);
    assert_eq!(load(&agent.stats.stale_total), 0);
    assert_eq!(load(&agent.stats.malformed_total), 0);
    // In base mode the server does not answer the agent's CLOSE either: the id
    // is free at once, and a new CONNECT for it works.
    send_frame(&mut link, Command::Connect, 8, &[]);
    send_frame(&mut link, Command::Data, 8, b"again");
    expect_data(&mut link, 8, b"again");
    assert_eq!(load(&service.accepted), 3);
}

// ===== 4. authentication =====

/// `TunnelStats::agent()` promises "the last error"; `fail()` records why the
/// link was dropped (REJECT reason, base server, bad READY tag) but the
/// `on_closed` that follows replaces it with a generic "link failed".
#[test]
fn agent_reports_why_its_link_was_refused() {
    let service = LocalService::echo();
    let server = start_simple_server("svc", Some("right-0123456789"), "");
    let agent = start_agent(&agent_config(&agent_toml(
        "svc",
        server.link,
        service.addr,
        "token = \"wrong-0123456789\"\nreconnect_min = \"30s\"",
    )));
    wait_count(
        "the agent's AUTH failure",
        &agent.stats.auth_failed_total,
        1,
    );
    wait_for(
        "the agent to report the rejection",
        WAIT,
        || {
            agent.stats.agent().is_some_and(|(s, why, _)| {
                s == AgentState::Waiting && why.contains("authentication failed")
            })
        },
        || agent.stats.agent(),
    );

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let agent = start_agent(&agent_config(&agent_toml(
        "dev1",
        listener.local_addr().unwrap(),
        service.addr,
        "token = \"s3cret-0123456789\"\nreconnect_min = \"30s\"",
    )));
    let mut link = accept_link(&listener);
    expect_frame(&mut link, Command::Listen, 0);
    send_frame(&mut link, Command::Connect, 1, &[]);
    expect_link_closed(&mut link);
    wait_for(
        "the agent to report the base server",
        WAIT,
        || {
            agent
                .stats
                .agent()
                .is_some_and(|(_, why, _)| why.contains("base protocol"))
        },
        || agent.stats.agent(),
    );
}

#[test]
fn replayed_handshake_is_rejected_and_ready_tag_verifies() {
    let token = b"s3cret-0123456789";
    let name = b"svc";
    let server = start_simple_server("svc", Some("s3cret-0123456789"), "");

    // A correct handshake by hand, recording what the agent sends.
    let mut link = connect(server.link);
    let na = [0x42; NONCE_LEN];
    let flags = ext::AUTH | ext::CLOSE_ACK;
    let listen = frame(Command::Listen, 0, &listen_payload(flags, 65536, na, name));
    link.write_all(&listen).unwrap();
    let hello = Hello::parse(&expect_frame(&mut link, Command::Hello, 0)).unwrap();
    assert_eq!(hello.flags, flags);
    let auth = frame(
        Command::Auth,
        0,
        &agent_tag(token, &na, &hello.nonce, hello.flags, name),
    );
    link.write_all(&auth).unwrap();
    let ready = expect_frame(&mut link, Command::Ready, 0);
    assert_eq!(ready.len(), MAC_LEN);
    assert_eq!(
        ready,
        server_tag(token, &na, &hello.nonce, hello.flags, name),
        "READY carries the server's tag"
    );
    assert_ne!(
        ready,
        server_tag(b"other", &na, &hello.nonce, hello.flags, name)
    );
    let public = wait_public(&server.stats, "svc");

    // The same bytes on a new link: a fresh challenge, so the AUTH is worthless.
    let mut replay = connect(server.link);
    replay.write_all(&listen).unwrap();
    let hello2 = Hello::parse(&expect_frame(&mut replay, Command::Hello, 0)).unwrap();
    assert_ne!(
        hello2.nonce, hello.nonce,
        "the server nonce is fresh per link"
    );
    replay.write_all(&auth).unwrap();
    expect_reject(&mut replay, reject::AUTH_FAILED);
    assert_eq!(load(&server.stats.auth_failed_total), 1);

    // The genuine link still holds the service.
    assert_eq!(server.stats.public_addr("svc"), Some(public));
    assert_eq!(load(&server.stats.links), 1);
    let mut client = connect(public);
    let (id, p) = expect_connect(&mut link);
    assert!(p.is_empty(), "no PEER_ADDR asked for");
    client.write_all(b"x").unwrap();
    expect_data(&mut link, id, b"x");
}

// ===== 5. malformed and hostile links =====

#[test]
fn malformed_and_hostile_links() {
    let server = start_simple_server("open", None, "max_frame = 200");

    // A good extended link (no extensions asked for).
    let mut good = connect(server.link);
    let hello = hand_listen(&mut good, 0, [1; NONCE_LEN], b"open");
    assert_eq!(hello.flags, 0);
    assert_eq!(expect_frame(&mut good, Command::Ready, 0), b"");
    let public = wait_public(&server.stats, "open");

    // An unknown command after the handshake: ignored and counted.
    send_frame(&mut good, Command::Unknown(99), 0, b"whatever");
    wait_count("unknown_total", &server.stats.unknown_total, 1);
    // DATA for an id with no stream: dropped and counted.
    send_frame(&mut good, Command::Data, 42, b"nobody");
    wait_count("stale_total", &server.stats.stale_total, 1);
    // A second LISTEN on a link: ignored and counted.
    send_frame(&mut good, Command::Listen, 0, &[]);
    wait_count("malformed_total", &server.stats.malformed_total, 1);
    expect_quiet(&mut good, QUIET);

    // LISTEN with a garbage payload: REJECT MALFORMED, link closed.
    let mut bad = connect(server.link);
    send_frame(&mut bad, Command::Listen, 0, b"garbage that is no request");
    expect_reject(&mut bad, reject::MALFORMED);

    // A frame larger than max_frame: the link is closed (on the header alone).
    let mut big = connect(server.link);
    big.write_all(&[0, 201, Command::Data.to_u8(), 0]).unwrap();
    expect_link_closed(&mut big);
    let mut big = connect(server.link);
    send_frame(&mut big, Command::Listen, 0, &[b'x'; 201]);
    expect_link_closed(&mut big);

    // A truncated frame, then EOF.
    let mut cut = connect(server.link);
    cut.write_all(&[0, 10, Command::Listen.to_u8(), 0, 1, 2])
        .unwrap();
    cut.shutdown(Shutdown::Write).unwrap();
    expect_link_closed(&mut cut);
    drop(cut);
    // Just a partial header.
    let mut cut = connect(server.link);
    cut.write_all(&[0]).unwrap();
    drop(cut);

    // The engine keeps serving: the good link still carries a client.
    assert_eq!(server.stats.public_addr("open"), Some(public));
    let mut client = connect(public);
    let (id, _) = expect_connect(&mut good);
    client.write_all(b"still").unwrap();
    expect_data(&mut good, id, b"still");
    send_frame(&mut good, Command::Data, id, b"alive");
    expect_bytes(&mut client, b"alive");
    assert_eq!(load(&server.stats.links), 1);
    assert_eq!(load(&server.stats.unknown_total), 1);
    assert_eq!(load(&server.stats.stale_total), 1);
    // New links are still handled: an unknown service is refused properly.
    let mut other = connect(server.link);
    send_frame(
        &mut other,
        Command::Listen,
        0,
        &listen_payload(0, 65536, [2; NONCE_LEN], b"nope"),
    );
    expect_reject(&mut other, reject::UNKNOWN_SERVICE);
    assert_eq!(load(&server.stats.links), 1);
}

// ===== 6. the agent's allowlist =====

#[test]
fn agent_refuses_targets_off_its_allowlist() {
    let local = LocalService::echo();
    // A second service, reachable only when named and allowed.
    let other = LocalService::start(|mut s| {
        let mut buf = [0u8; 256];
        if let Ok(n) = s.read(&mut buf) {
            let mut reply = b"other:".to_vec();
            reply.extend_from_slice(&buf[..n]);
            s.write_all(&reply).ok();
        }
    });
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let agent = start_agent(&agent_config(&agent_toml(
        "",
        listener.local_addr().unwrap(),
        local.addr,
        &format!(
            "extensions = false\nallow = [\"{}\", \"{}\"]",
            local.addr, other.addr
        ),
    )));
    let mut link = accept_link(&listener);
    // extensions = false: a plain base LISTEN.
    assert_eq!(expect_frame(&mut link, Command::Listen, 0), b"");
    wait_agent_up(&agent);

    // Not on the allowlist: answered with CLOSE, nothing dialled.
    send_frame(&mut link, Command::Connect, 3, b"127.0.0.1:1");
    expect_frame(&mut link, Command::Close, 3);
    assert_eq!(load(&agent.stats.refused_total), 1);
    // Not an address at all.
    send_frame(&mut link, Command::Connect, 4, b"localhost:22");
    expect_frame(&mut link, Command::Close, 4);
    assert_eq!(load(&agent.stats.refused_total), 2);
    assert_eq!(load(&agent.stats.streams_total), 0);

    // An allowed explicit target.
    send_frame(
        &mut link,
        Command::Connect,
        5,
        other.addr.to_string().as_bytes(),
    );
    send_frame(&mut link, Command::Data, 5, b"hi");
    expect_data(&mut link, 5, b"other:hi");
    expect_frame(&mut link, Command::Close, 5);
    // The local service, named explicitly, and by an empty target.
    send_frame(
        &mut link,
        Command::Connect,
        6,
        local.addr.to_string().as_bytes(),
    );
    send_frame(&mut link, Command::Data, 6, b"named");
    expect_data(&mut link, 6, b"named");
    send_frame(&mut link, Command::Connect, 3, &[]);
    send_frame(&mut link, Command::Data, 3, b"default");
    expect_data(&mut link, 3, b"default");
    assert_eq!(load(&agent.stats.refused_total), 2);
    assert_eq!(load(&other.accepted), 1);
    assert_eq!(load(&local.accepted), 2);
}

// ===== 7. half-close =====

#[test]
fn half_close_delivers_the_reply_after_the_request_ends() {
    // Reads the whole request (until EOF), then answers and closes.
    let service = LocalService::start(|mut s| {
        let mut request = Vec::new();
        if s.read_to_end(&mut request).is_ok() {
            let reply = format!("got {} bytes: {}", request.len(), show(&request));
            s.write_all(reply.as_bytes()).ok();
        }
    });
    let server = start_simple_server("svc", Some("s3cret-0123456789"), "");
    let agent = start_agent(&agent_config(&agent_toml(
        "svc",
        server.link,
        service.addr,
        "token = \"s3cret-0123456789\"",
    )));
    assert_ne!(wait_agent_up(&agent) & ext::HALF_CLOSE, 0);
    let public = wait_public(&server.stats, "svc");

    for round in 0..2 {
        let mut c = connect(public);
        let request = format!("request {round}");
        c.write_all(request.as_bytes()).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let reply = util::read_to_eof(&mut c, 1024);
        assert_eq!(
            show(&reply),
            format!("got {} bytes: {request}", request.len())
        );
    }
    wait_count("server streams back to 0", &server.stats.streams, 0);
    wait_count("agent streams back to 0", &agent.stats.streams, 0);
    assert_eq!(load(&server.stats.stale_total), 0);
    assert_eq!(load(&agent.stats.stale_total), 0);
}

/// The agent answers 3 MiB and CLOSEs while the client is still uploading.
/// The server closes the client gracefully: its queue is flushed, FIN sent,
/// and the upload still arriving read away, so no reset destroys the answer
/// on its way. The client reads all of it, then a clean EOF.
#[test]
fn close_while_the_client_uploads_delivers_the_whole_answer() {
    let _alone = timing_lock();
    const ANSWER: usize = 3 * 1024 * 1024;
    let server = start_simple_server("svc", None, "");
    let mut link = connect(server.link);
    send_frame(&mut link, Command::Listen, 0, &[]);
    let public = wait_public(&server.stats, "svc");

    let client = connect(public);
    let (id, _) = expect_connect(&mut link);
    // The client uploads, paced (about 16 MB/s, so that the test does not
    // load the machine), until it has read the whole answer.
    let answered = Arc::new(AtomicBool::new(false));
    let mut upload = client.try_clone().unwrap();
    let done = Arc::clone(&answered);
    let writer = thread::spawn(move || {
        let pattern = Pattern::new(5);
        let mut sent = 0;
        while !done.load(Ordering::Relaxed) {
            let c = pattern.chunk(sent, 16 * 1024);
            match upload.write(c) {
                Ok(n) => sent += n as u64,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return sent,
            }
            thread::sleep(Duration::from_millis(1));
        }
        upload.shutdown(Shutdown::Write).ok();
        sent
    });
    // The agent's side of the link: read (and drop) the forwarded upload.
    let mut link_in = link.try_clone().unwrap();
    let link_reader = thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        while matches!(link_in.read(&mut buf), Ok(n) if n > 0) {}
    });
    let answer = Pattern::new(6);
    let mut at = 0;
    while at < ANSWER {
        let c = answer.chunk(at as u64, (ANSWER - at).min(60_000));
        send_frame(&mut link, Command::Data, id, c);
        at += c.len();
    }
    send_frame(&mut link, Command::Close, id, &[]);

    let mut client = client;
    let got = util::read_to_eof(&mut client, ANSWER);
    answered.store(true, Ordering::Relaxed);
    assert_eq!(got.len(), ANSWER, "the answer was cut short");
    assert_eq!(answer.check(0, &got), Ok(()));
    let sent = writer.join().unwrap();
    assert!(sent > 0);
    eprintln!("client uploaded {sent} bytes while the answer came");
    wait_count("no streams", &server.stats.streams, 0);
    link.shutdown(Shutdown::Both).ok();
    link_reader.join().unwrap();
}

// ===== 8. ids =====

/// Base mode: ids the server closed stay out of rotation for `id_quarantine`.
/// A base agent written here sees 256 clients come and go; then every id is
/// quarantined, none in use, and the next client is refused for that reason
/// (counted apart, and the log says so). Once the quarantine ends, ids are
/// given again.
#[test]
fn base_server_counts_clients_refused_by_the_id_quarantine() {
    // Long enough that the churn below cannot outlast it.
    const QUARANTINE: Duration = Duration::from_secs(5);
    let server = start_simple_server("open", None, "id_quarantine = \"5s\"");
    let mut link = connect(server.link);
    send_frame(&mut link, Command::Listen, 0, &[]);
    let public = wait_public(&server.stats, "open");

    // The server quarantines an id when it sends CLOSE, before we read it.
    let mut first_close = None;
    let mut seen = [false; 256];
    for k in 0..256u32 {
        let client = connect(public);
        let (id, _) = expect_connect(&mut link);
        assert!(!seen[usize::from(id)], "id {id} given twice (client {k})");
        seen[usize::from(id)] = true;
        drop(client);
        expect_frame(&mut link, Command::Close, id);
        first_close.get_or_insert_with(Instant::now);
    }
    let first_close = first_close.unwrap();
    wait_count("no streams", &server.stats.streams, 0);
    assert_eq!(load(&server.stats.refused_total), 0);

    // All 256 ids are quarantined: the next client is refused.
    let mut refused = connect(public);
    expect_closed(&mut refused);
    let churned = first_close.elapsed();
    assert!(
        churned < QUARANTINE,
        "the churn took {churned:?}, longer than the quarantine"
    );
    assert_eq!(load(&server.stats.refused_total), 1);
    assert_eq!(load(&server.stats.quarantine_refused_total), 1);
    expect_quiet(&mut link, QUIET);

    // Once the first id's quarantine is over, a client gets an id again.
    thread::sleep((first_close + QUARANTINE).saturating_duration_since(Instant::now()));
    let mut client = connect(public);
    let (id, _) = expect_connect(&mut link);
    client.write_all(b"again").unwrap();
    expect_data(&mut link, id, b"again");
    assert_eq!(load(&server.stats.refused_total), 1);
    assert_eq!(load(&server.stats.quarantine_refused_total), 1);
}

// ===== 9. takeover =====

#[test]
fn second_agent_takes_the_service_over() {
    let service = LocalService::echo();
    let server = start_simple_server("svc", Some("s3cret-0123456789"), "");
    // The first agent waits long before redialling, so it does not take
    // the service back during the test.
    let first = start_agent(&agent_config(&agent_toml(
        "svc",
        server.link,
        service.addr,
        "token = \"s3cret-0123456789\"\nreconnect_min = \"30s\"\nreconnect_max = \"60s\"",
    )));
    wait_agent_up(&first);
    let public = wait_public(&server.stats, "svc");
    let first_agent_addr = server.stats.agent_addr("svc").unwrap();
    let mut old_client = connect(public);
    old_client.write_all(b"old").unwrap();
    expect_bytes(&mut old_client, b"old");

    let second = start_agent(&agent_config(&agent_toml(
        "svc",
        server.link,
        service.addr,
        "token = \"s3cret-0123456789\"",
    )));
    wait_agent_up(&second);
    wait_count(
        "the first link to be dropped",
        &first.stats.reconnects_total,
        1,
    );
    wait_for(
        "the service to name the second agent",
        WAIT,
        || {
            server
                .stats
                .agent_addr("svc")
                .is_some_and(|a| a != first_agent_addr)
        },
        || server.stats.agent_addr("svc"),
    );
    // The agent counts the lost link just before it records its new state:
    // under emulation the test can read in between.
    wait_for(
        "the first agent to wait for its redial",
        WAIT,
        || {
            first
                .stats
                .agent()
                .is_some_and(|a| a.0 == AgentState::Waiting)
        },
        || first.stats.agent(),
    );
    // The old link's client went with it.
    expect_closed(&mut old_client);

    // The public port stayed where it was, and the second agent serves it.
    assert_eq!(server.stats.public_addr("svc"), Some(public));
    assert_eq!(load(&server.stats.links), 1);
    assert_eq!(load(&server.stats.links_total), 2);
    let first_streams = load(&first.stats.streams_total);
    for i in 0..3 {
        echo_round_trip(public, format!("new {i}").as_bytes());
    }
    assert_eq!(load(&second.stats.streams_total), 3);
    assert_eq!(load(&first.stats.streams_total), first_streams);
    wait_count("first agent: no streams", &first.stats.streams, 0);
}

// ===== 10. PEER_ADDR, by an extended agent written here =====

#[test]
fn peer_addr_reaches_an_extended_agent() {
    let server = start_simple_server("open", None, "");
    let mut link = connect(server.link);
    let asked = ext::PEER_ADDR | ext::CLOSE_ACK;
    let hello = hand_listen(&mut link, asked, [7; NONCE_LEN], b"");
    assert_eq!(
        hello.flags, asked,
        "granted what was asked (no AUTH: no token)"
    );
    assert_eq!(expect_frame(&mut link, Command::Ready, 0), b"");
    let public = wait_public(&server.stats, "open");

    let mut client = connect(public);
    let (id, payload) = expect_connect(&mut link);
    let (peer, target) = parse_peer(&payload).expect("a PEER_ADDR CONNECT");
    assert_eq!(peer, client.local_addr().unwrap());
    assert!(target.is_empty(), "no target: the agent's local service");
    client.write_all(b"q").unwrap();
    expect_data(&mut link, id, b"q");
    send_frame(&mut link, Command::Data, id, b"a");
    expect_bytes(&mut client, b"a");

    // CLOSE_ACK: the server's CLOSE is answered, and frees the id.
    drop(client);
    expect_frame(&mut link, Command::Close, id);
    send_frame(&mut link, Command::Close, id, &[]);
    wait_count("no streams", &server.stats.streams, 0);
    let client2 = connect(public);
    let (id2, payload) = expect_connect(&mut link);
    assert_eq!(
        parse_peer(&payload).map(|(p, _)| p),
        Some(client2.local_addr().unwrap())
    );
    assert_ne!(id2, id);
    assert_eq!(load(&server.stats.stale_total), 0);
    assert_eq!(load(&server.stats.malformed_total), 0);
}

// ===== more edges =====

#[test]
fn agent_answers_close_when_the_local_service_is_down() {
    // A port where nothing listens (bound a moment ago, then released).
    let dead = SocketAddr::from(([127, 0, 0, 1], util::free_port()));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let agent = start_agent(&agent_config(&agent_toml(
        "",
        listener.local_addr().unwrap(),
        dead,
        "extensions = false",
    )));
    let mut link = accept_link(&listener);
    assert_eq!(expect_frame(&mut link, Command::Listen, 0), b"");
    send_frame(&mut link, Command::Connect, 9, &[]);
    send_frame(&mut link, Command::Data, 9, b"into the void");
    expect_frame(&mut link, Command::Close, 9);
    wait_count("no streams", &agent.stats.streams, 0);
    // The link is fine: the id can be used again.
    send_frame(&mut link, Command::Connect, 9, &[]);
    expect_frame(&mut link, Command::Close, 9);
    expect_quiet(&mut link, QUIET);
}

#[test]
fn agent_counts_failed_local_connects_as_refused() {
    let dead = SocketAddr::from(([127, 0, 0, 1], util::free_port()));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let agent = start_agent(&agent_config(&agent_toml(
        "",
        listener.local_addr().unwrap(),
        dead,
        "extensions = false",
    )));
    let mut link = accept_link(&listener);
    expect_frame(&mut link, Command::Listen, 0);
    send_frame(&mut link, Command::Connect, 9, &[]);
    expect_frame(&mut link, Command::Close, 9);
    wait_count("refused_total", &agent.stats.refused_total, 1);
}

#[test]
fn credit_above_u32_closes_the_link() {
    let server = start_simple_server("open", None, "");
    let mut link = connect(server.link);
    let asked = ext::CREDIT | ext::CLOSE_ACK;
    let hello = hand_listen(&mut link, asked, [5; NONCE_LEN], b"open");
    assert_eq!(hello.flags, asked);
    assert_eq!(expect_frame(&mut link, Command::Ready, 0), b"");
    let public = wait_public(&server.stats, "open");
    let mut client = connect(public);
    let (id, _) = expect_connect(&mut link);
    // Within the window the server grants: delivered.
    send_frame(&mut link, Command::Data, id, b"ok");
    expect_bytes(&mut client, b"ok");
    // 65536 (our window) + u32::MAX: above 2^32 - 1.
    send_frame(&mut link, Command::Window, id, &u32::MAX.to_be_bytes());
    expect_link_closed(&mut link);
    expect_closed(&mut client);
    wait_for(
        "the public port to close",
        WAIT,
        || server.stats.public_addr("open").is_none(),
        || (),
    );
    assert_eq!(load(&server.stats.streams), 0);
}

/// What an agent written here saw of the server's credit (see [`credit_flood`]).
#[derive(Debug, Clone, Default)]
struct Seen {
    /// Per stream: the most credit the agent held at once.
    held: Vec<u64>,
    /// The most `window_grown_bytes` the server reported meanwhile.
    grown_max: u64,
}

/// The link of [`credit_flood`] after the flood, still open.
struct Flood {
    link: TcpStream,
    /// The public clients, each read to the end.
    clients: Vec<TcpStream>,
    /// Updated on every WINDOW until the link closes.
    seen: Arc<std::sync::Mutex<Seen>>,
    watcher: JoinHandle<()>,
}

impl Flood {
    fn seen(&self) -> Seen {
        self.seen.lock().unwrap().clone()
    }

    /// Close the link (both directions) and wait for the watcher to see it.
    fn close_link(self) -> Seen {
        self.link.shutdown(Shutdown::Both).ok();
        self.watcher.join().unwrap();
        let seen = self.seen.lock().unwrap().clone();
        drop(self.clients);
        seen
    }
}

/// An extended agent written here (CREDIT, CLOSE_ACK) links to service
/// `open` of `server`; `streams` public clients connect, and on each stream
/// the agent sends `bytes` of a pattern as fast as the server's credit lets
/// it, while each client reads and checks its bytes. Credit held is granted
/// minus sent, with "sent" counted before each write: never more than what
/// the server's window allowed when it granted.
fn credit_flood(server: &Server, streams: usize, bytes: u64) -> Flood {
    const FRAME: u64 = 16 * 1024;
    let mut link = connect(server.link);
    let asked = ext::CREDIT | ext::CLOSE_ACK;
    let hello = hand_listen(&mut link, asked, [9; NONCE_LEN], b"open");
    assert_eq!(hello.flags, asked);
    assert_eq!(expect_frame(&mut link, Command::Ready, 0), b"");
    let public = wait_public(&server.stats, "open");
    let mut ids = Vec::new();
    let mut readers = Vec::new();
    for seed in 0..streams as u64 {
        let mut c = connect(public);
        let (id, _) = expect_connect(&mut link);
        ids.push(id);
        readers.push(thread::spawn(move || {
            let p = Pattern::new(seed);
            let mut buf = vec![0u8; 64 * 1024];
            let mut off = 0u64;
            while off < bytes {
                let n = c.read(&mut buf).unwrap();
                assert!(n > 0, "client {seed}: EOF after {off} bytes");
                p.check(off, &buf[..n])
                    .unwrap_or_else(|at| panic!("client {seed}: wrong byte at {at}"));
                off += n as u64;
            }
            c
        }));
    }
    let granted: Arc<Vec<AtomicU64>> = Arc::new(
        (0..streams)
            .map(|_| AtomicU64::new(u64::from(hello.window)))
            .collect(),
    );
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..streams).map(|_| AtomicU64::new(0)).collect());
    let seen = Arc::new(std::sync::Mutex::new(Seen {
        held: vec![0; streams],
        ..Seen::default()
    }));
    let watcher = {
        let (granted, sent, ids) = (Arc::clone(&granted), Arc::clone(&sent), ids.clone());
        let (stats, seen) = (Arc::clone(&server.stats), Arc::clone(&seen));
        let mut r = link.try_clone().unwrap();
        r.set_read_timeout(None).unwrap();
        thread::spawn(move || {
            // Until the link closes.
            while let Some((command, id, p)) = recv_frame(&mut r) {
                let mut seen = seen.lock().unwrap();
                seen.grown_max = seen.grown_max.max(load(&stats.window_grown_bytes));
                if command != Command::Window {
                    continue;
                }
                let i = ids
                    .iter()
                    .position(|&x| x == id)
                    .expect("WINDOW for an unknown id");
                let inc = u32::from_be_bytes(p.try_into().expect("a 4-byte WINDOW"));
                granted[i].fetch_add(u64::from(inc), Ordering::SeqCst);
                for (j, h) in seen.held.iter_mut().enumerate() {
                    let now = load(&granted[j]).saturating_sub(load(&sent[j]));
                    *h = (*h).max(now);
                }
            }
        })
    };
    let deadline = Instant::now() + 3 * WAIT;
    let mut done = vec![0u64; streams];
    while done.iter().any(|&d| d < bytes) {
        assert!(
            Instant::now() < deadline,
            "flood stuck at {done:?} of {bytes} bytes"
        );
        let mut moved = false;
        for (i, &id) in ids.iter().enumerate() {
            let credit = load(&granted[i]).saturating_sub(done[i]);
            let n = credit.min(FRAME).min(bytes - done[i]);
            if n == 0 {
                continue;
            }
            let chunk = Pattern::new(i as u64).chunk(done[i], n as usize);
            sent[i].fetch_add(chunk.len() as u64, Ordering::SeqCst);
            send_frame(&mut link, Command::Data, id, chunk);
            done[i] += chunk.len() as u64;
            moved = true;
        }
        if !moved {
            thread::yield_now();
        }
    }
    let clients = readers.into_iter().map(|r| r.join().unwrap()).collect();
    Flood {
        link,
        clients,
        seen,
        watcher,
    }
}

#[test]
fn credit_window_grows_on_a_fast_stream_up_to_max_window() {
    let _alone = timing_lock();
    const WINDOW: u64 = 64 * 1024;
    const MAX_WINDOW: u64 = 1024 * 1024;
    let server = start_simple_server(
        "open",
        None,
        &format!("window = {WINDOW}\nmax_window = {MAX_WINDOW}\n"),
    );
    let mut flood = credit_flood(&server, 1, 32 * 1024 * 1024);
    let seen = flood.seen();
    let held = seen.held[0];
    // Credit held is at most the window the server granted it from.
    assert!(
        held <= MAX_WINDOW,
        "the agent held {held} bytes of credit, above max_window {MAX_WINDOW}"
    );
    // It grew past `window` over real sockets. (How far credit held gets
    // depends on how fast this test's agent reads under load; the exact
    // doublings are the session's unit test
    // `window_doubles_on_a_fast_stream_up_to_max_window`.)
    assert!(
        held > WINDOW,
        "the window did not grow: at most {held} bytes of credit held (window {WINDOW})"
    );
    // At least one doubling through the adapter's flush path, never past
    // max_window. (How many depends on how fast this test's client reads
    // under load: in CI one run stopped at three of four; the exact
    // schedule is the session's unit test.)
    let grown = load(&server.stats.window_grown_bytes);
    assert!(
        (WINDOW..=MAX_WINDOW - WINDOW).contains(&grown),
        "growth held at the end: {grown}"
    );
    assert!(seen.grown_max <= MAX_WINDOW - WINDOW, "{seen:?}");
    assert!(load(&server.stats.window_grown_total) >= 1);
    // Closing the stream gives its growth back.
    for c in flood.clients.drain(..) {
        c.shutdown(Shutdown::Both).ok();
    }
    wait_count("the growth to go back", &server.stats.window_grown_bytes, 0);
    wait_count("the stream to close", &server.stats.streams, 0);
    let seen = flood.close_link();
    assert!(seen.held[0] <= MAX_WINDOW, "{seen:?}");
    assert_eq!(load(&server.stats.credit_violations_total), 0);
}

#[test]
fn base_mode_end_to_end() {
    let service = LocalService::echo();
    let server = start_simple_server("svc", None, "");
    let agent = start_agent(&agent_config(&agent_toml(
        "svc",
        server.link,
        service.addr,
        "extensions = false",
    )));
    assert_eq!(wait_agent_up(&agent), 0);
    let public = wait_public(&server.stats, "svc");
    echo_round_trip(public, b"base");
    pattern_clients(public, 4, 512 * 1024);
    wait_count("server streams back to 0", &server.stats.streams, 0);
    wait_count("agent streams back to 0", &agent.stats.streams, 0);
    assert_eq!(load(&server.stats.streams_total), 5);
    assert_eq!(load(&server.stats.stalled_total), 0);
    assert_eq!(load(&agent.stats.stalled_total), 0);
}

#[test]
fn half_close_the_other_way() {
    // The service speaks first, ends its side, then reads the client's
    // request to EOF and hands it to the test.
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let tx = std::sync::Mutex::new(tx);
    let service = LocalService::start(move |mut s| {
        s.write_all(b"banner").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut request = Vec::new();
        if s.read_to_end(&mut request).is_ok() {
            tx.lock().unwrap().send(request).ok();
        }
    });
    let server = start_simple_server("svc", None, "");
    let agent = start_agent(&agent_config(&agent_toml(
        "svc",
        server.link,
        service.addr,
        "",
    )));
    assert_ne!(wait_agent_up(&agent) & ext::HALF_CLOSE, 0);
    let public = wait_public(&server.stats, "svc");

    let mut c = connect(public);
    assert_eq!(util::read_to_eof(&mut c, 1024), b"banner");
    // The client's side is still open after the service's EOF.
    c.write_all(b"late request").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let got = rx
        .recv_timeout(WAIT)
        .expect("the service to get the request");
    assert_eq!(show(&got), "late request");
    wait_count("server streams back to 0", &server.stats.streams, 0);
    wait_count("agent streams back to 0", &agent.stats.streams, 0);
}

#[test]
fn credit_keeps_a_stalled_stream_from_blocking_the_others() {
    // Echo, except for a connection that starts with "SINK": that one is
    // never read (until the test ends), so its stream runs out of credit.
    let done = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&done);
    let service = LocalService::start(move |mut s| {
        let mut buf = [0u8; 16 * 1024];
        let Ok(n) = s.read(&mut buf) else { return };
        if buf[..n].starts_with(b"SINK") {
            let until = Instant::now() + WAIT;
            while !flag.load(Ordering::Relaxed) && Instant::now() < until {
                thread::sleep(Duration::from_millis(5));
            }
            return;
        }
        if s.write_all(&buf[..n]).is_ok() {
            echo_handler(s);
        }
    });
    let small = "window = 16384\nmax_data = 16384";
    let server = start_simple_server("svc", None, small);
    let agent = start_agent(&agent_config(&agent_toml(
        "svc",
        server.link,
        service.addr,
        small,
    )));
    assert_ne!(wait_agent_up(&agent) & ext::CREDIT, 0);
    let public = wait_public(&server.stats, "svc");

    // A client whose service does not read: it writes until TCP stops it.
    let slow = connect(public);
    let written = Arc::new(AtomicU64::new(0));
    let mut w = slow.try_clone().unwrap();
    let count = Arc::clone(&written);
    let writer = thread::spawn(move || {
        let mut chunk = [b's'; 16 * 1024];
        chunk[..4].copy_from_slice(b"SINK");
        while count.load(Ordering::Relaxed) < 256 << 20 {
            match w.write(&chunk) {
                Ok(n) => {
                    count.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(_) => return,
            }
        }
    });
    // Wait until it is stuck: no progress for a while.
    let mut last = u64::MAX;
    wait_for(
        "the slow client to be stuck",
        WAIT,
        || {
            thread::sleep(Duration::from_millis(150));
            let now = load(&written);
            let stuck = now == last && now > 0;
            last = now;
            stuck
        },
        || load(&written),
    );

    // Other streams go on.
    let t0 = Instant::now();
    for i in 0..5 {
        echo_round_trip(public, format!("fast {i}").as_bytes());
    }
    pattern_clients(public, 2, 256 * 1024);
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "other streams were held up for {:?}",
        t0.elapsed()
    );
    assert_eq!(load(&server.stats.credit_violations_total), 0);
    assert_eq!(load(&agent.stats.credit_violations_total), 0);
    slow.shutdown(Shutdown::Both).ok();
    drop(slow);
    writer.join().unwrap();
    done.store(true, Ordering::Relaxed);
    wait_count("server streams back to 0", &server.stats.streams, 0);
}

#[test]
fn base_mode_closes_a_stream_that_stalls_the_link() {
    let server = start_simple_server(
        "open",
        None,
        "window = 16384\nmax_data = 16384\nstall_timeout = \"300ms\"",
    );
    let mut link = connect(server.link);
    send_frame(&mut link, Command::Listen, 0, &[]);
    let public = wait_public(&server.stats, "open");

    // A client that never reads; the base agent floods it with more than
    // the kernel can absorb on the way.
    let mut slow = util::connect_with_recv_buffer(public, 4096);
    let (id, _) = expect_connect(&mut link);
    let mut w = link.try_clone().unwrap();
    let frames = (util::kernel_send_buffer_max() + (2 << 20)) / (16 * 1024);
    let flood = thread::spawn(move || {
        let data = frame(Command::Data, id, &[b'f'; 16 * 1024]);
        for _ in 0..frames {
            if w.write_all(&data).is_err() {
                return;
            }
        }
    });
    // The server gives up on the client and tells the agent.
    expect_frame(&mut link, Command::Close, id);
    flood.join().unwrap();
    wait_count("stalled_total", &server.stats.stalled_total, 1);
    wait_count("no streams", &server.stats.streams, 0);
    // The rest of the flood was for a closed id: dropped and counted.
    wait_for(
        "late DATA to be counted",
        WAIT,
        || load(&server.stats.stale_total) > 0,
        || load(&server.stats.stale_total),
    );
    let mut buf = vec![0u8; 64 * 1024];
    let mut closed = false;
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        match slow.read(&mut buf) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(_) => {}
            Err(_) => {
                closed = true;
                break;
            }
        }
    }
    assert!(closed, "the stalled client was not closed");

    // The link reads again: a new client works.
    let mut client = connect(public);
    let (id2, _) = expect_connect(&mut link);
    assert_ne!(id2, id, "the closed id is quarantined");
    client.write_all(b"next").unwrap();
    expect_data(&mut link, id2, b"next");
    send_frame(&mut link, Command::Data, id2, b"ok");
    expect_bytes(&mut client, b"ok");
}

#[test]
fn agent_reconnects_after_the_server_restarts() {
    let service = LocalService::echo();
    let port = util::free_port();
    let toml = format!(
        "[[tunnel_server]]\nlisten = \"127.0.0.1:{port}\"\n\
         [[tunnel_server.service]]\nname = \"svc\"\npublic = \"127.0.0.1:0\"\ntoken = \"t-0123456789abcdef\"\n"
    );
    let server = start_server(&toml);
    let agent = start_agent(&agent_config(&agent_toml(
        "svc",
        server.link,
        service.addr,
        "token = \"t-0123456789abcdef\"\nreconnect_min = \"50ms\"\nreconnect_max = \"200ms\"",
    )));
    wait_agent_up(&agent);
    echo_round_trip(wait_public(&server.stats, "svc"), b"one");

    server.engine.stop();
    wait_count(
        "the agent to lose its link",
        &agent.stats.reconnects_total,
        1,
    );
    let server = start_server(&toml);
    wait_for(
        "the agent to link again",
        WAIT,
        || load(&agent.stats.links_total) == 2 && load(&agent.stats.links) == 1,
        || agent.stats.agent(),
    );
    echo_round_trip(wait_public(&server.stats, "svc"), b"two");
    assert_eq!(load(&agent.stats.reconnects_total), 1);
}

// ===== agent: handshake timeout, back-off reset, host names =====

/// Read frames until the peer closes the link (within `WAIT`); returns when.
fn wait_link_closed(s: &mut TcpStream) -> Instant {
    s.set_read_timeout(Some(WAIT)).unwrap();
    loop {
        match recv_frame(s) {
            None => return Instant::now(),
            Some((Command::Ping, 0, _)) => {}
            Some(f) => panic!("expected the link to be closed, got {f:?}"),
        }
    }
}

#[test]
fn agent_drops_a_server_that_never_finishes_the_handshake() {
    let service = LocalService::echo();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let agent = start_agent(&agent_config(&agent_toml(
        "dev1",
        listener.local_addr().unwrap(),
        service.addr,
        "handshake_timeout = \"300ms\"\nreconnect_min = \"100ms\"\nreconnect_max = \"200ms\"",
    )));

    // 1. Accepts TCP, reads the LISTEN, never answers (what a TCP load
    //    balancer with its backend down looks like): dropped, counted.
    let mut silent = accept_link(&listener);
    expect_frame(&mut silent, Command::Listen, 0);
    wait_link_closed(&mut silent);
    wait_count(
        "the first handshake timeout",
        &agent.stats.handshake_timeouts_total,
        1,
    );
    let (state, why, _) = agent.stats.agent().unwrap();
    assert_ne!(state, AgentState::Up);
    assert!(why.contains("handshake_timeout"), "last error: {why}");

    // 2. The agent redials with its back-off. This server answers HELLO and
    //    then freezes (no READY): dropped too.
    let mut frozen = accept_link(&listener);
    let p = expect_frame(&mut frozen, Command::Listen, 0);
    let req = ListenRequest::parse(&p).unwrap();
    let hello = Hello {
        flags: req.flags & !ext::AUTH,
        window: 65536,
        nonce: [9; NONCE_LEN],
    };
    send_frame(&mut frozen, Command::Hello, 0, &hello.encode());
    wait_link_closed(&mut frozen);
    wait_count(
        "the second handshake timeout",
        &agent.stats.handshake_timeouts_total,
        2,
    );
    assert_eq!(load(&agent.stats.links_total), 0);

    // 3. A server that finishes the handshake keeps its link past the
    //    timeout, and it carries streams.
    let mut good = accept_link(&listener);
    let p = expect_frame(&mut good, Command::Listen, 0);
    let req = ListenRequest::parse(&p).unwrap();
    let flags = req.flags & !(ext::AUTH | ext::PEER_ADDR | ext::HEARTBEAT);
    let hello = Hello {
        flags,
        window: 65536,
        nonce: [7; NONCE_LEN],
    };
    send_frame(&mut good, Command::Hello, 0, &hello.encode());
    send_frame(&mut good, Command::Ready, 0, &[]);
    assert_eq!(wait_agent_up(&agent), flags);
    thread::sleep(Duration::from_millis(600));
    assert_eq!(agent.stats.agent().unwrap().0, AgentState::Up);
    assert_eq!(load(&agent.stats.handshake_timeouts_total), 2);
    send_frame(&mut good, Command::Connect, 3, &[]);
    send_frame(&mut good, Command::Data, 3, b"up");
    expect_data(&mut good, 3, b"up");
}

/// A base server written here for `agent_backoff_*`: accept the agent's link
/// within `WAIT`, read its LISTEN, hold the link `hold`, drop it. Returns how
/// long the agent took to dial after the previous drop, and when this one was
/// dropped.
fn base_link_cycle(
    listener: &TcpListener,
    dropped: Instant,
    hold: Duration,
) -> (Duration, Instant) {
    let mut link = accept_link(listener);
    let delay = dropped.elapsed();
    assert_eq!(
        expect_frame(&mut link, Command::Listen, 0),
        b"",
        "base LISTEN"
    );
    thread::sleep(hold);
    drop(link);
    (delay, Instant::now())
}

#[test]
fn agent_backoff_starts_over_after_reconnect_reset() {
    // With the old rule (back-off reset only after a link stayed up
    // `reconnect_max`, 10 s here) the delays of phase A double: 0.1-0.2 s,
    // 0.2-0.4, 0.4-0.8, 0.8-1.6 s, so the fourth is over the bound below.
    let min = Duration::from_millis(200);
    let reset = Duration::from_millis(500);
    let slack = Duration::from_millis(500);
    let service = LocalService::echo();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let agent = start_agent(&agent_config(&agent_toml(
        "",
        listener.local_addr().unwrap(),
        service.addr,
        "extensions = false\nreconnect_min = \"200ms\"\nreconnect_max = \"10s\"\n\
         reconnect_reset = \"500ms\"",
    )));
    let (_, mut dropped) = base_link_cycle(&listener, Instant::now(), reset + min);

    // A. Links that stayed up longer than reconnect_reset and then dropped
    //    (a 4G cell that froze): every redial comes after about reconnect_min.
    let mut delays = Vec::new();
    for _ in 0..4 {
        let (delay, at) = base_link_cycle(&listener, dropped, reset + min);
        delays.push(delay);
        dropped = at;
    }
    assert!(
        delays.iter().all(|d| *d < min + slack),
        "redial delays after links that stayed up: {delays:?}"
    );

    // B. Links dropped at once (before reconnect_reset) still back off. The
    //    first delay follows the last long link (0.1-0.2 s), then the waits
    //    are drawn from 0.2-0.4, 0.4-0.8 and 0.8-1.6 s.
    let mut delays = Vec::new();
    for _ in 0..4 {
        let (delay, at) = base_link_cycle(&listener, dropped, Duration::ZERO);
        delays.push(delay);
        dropped = at;
    }
    assert!(
        delays[3] >= 4 * min,
        "the back-off did not grow for short links: {delays:?}"
    );

    // C. One link that stays up again (after a wait of 1.6-3.2 s): back to
    //    about reconnect_min.
    let (_, at) = base_link_cycle(&listener, dropped, reset + min);
    let (delay, _) = base_link_cycle(&listener, at, Duration::ZERO);
    assert!(delay < min + slack, "after a long link again: {delay:?}");
    assert_eq!(load(&agent.stats.links_total), 11);
}

/// An agent whose names are resolved by `names` (name → addresses, in
/// order) instead of the system; counts the look-ups.
fn start_agent_resolving(
    config: &TunnelAgentConfig,
    names: Vec<(String, Vec<SocketAddr>)>,
) -> (Agent, Arc<AtomicU64>) {
    let lookups = Arc::new(AtomicU64::new(0));
    let count = Arc::clone(&lookups);
    let mut agent = TunnelAgent::new(config);
    agent.set_resolver(Arc::new(move |name: &str| {
        count.fetch_add(1, Ordering::Relaxed);
        names
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| a.clone())
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "unknown name"))
    }));
    let stats = agent.stats();
    let (engine, _) = TestEngine::with_roles(EngineConfig::default(), vec![Box::new(agent)]);
    (
        Agent {
            _engine: engine,
            stats,
        },
        lookups,
    )
}

#[test]
fn agent_tries_every_address_of_a_name_in_order() {
    // The names resolve to ::1 first, then 127.0.0.1 (as many systems order
    // `localhost`); the server and the local service listen on 127.0.0.1
    // only. Nothing listens on [::1] at those ports: the connect is refused
    // (or fails at once where IPv6 is off), so dialling only the first
    // address, as before, never links.
    let service = LocalService::echo();
    let server = start_simple_server("svc", None, "");
    let v6 = |port| SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port));
    let names = vec![
        (
            format!("tunnel.test:{}", server.link.port()),
            vec![v6(server.link.port()), server.link],
        ),
        (
            format!("service.test:{}", service.addr.port()),
            vec![v6(service.addr.port()), service.addr],
        ),
    ];
    let config = agent_config(&format!(
        "[[tunnel_agent]]\nname = \"svc\"\nserver = \"tunnel.test:{}\"\n\
         local = \"service.test:{}\"\nreconnect_min = \"30s\"\n",
        server.link.port(),
        service.addr.port()
    ));
    let (agent, lookups) = start_agent_resolving(&config, names);
    wait_agent_up(&agent);
    assert_eq!(load(&lookups), 2, "server and local, resolved once each");
    assert_eq!(load(&agent.stats.reconnects_total), 0);
    let public = wait_public(&server.stats, "svc");

    // The first stream tries [::1] (the first local address) and is refused;
    // the next streams go to 127.0.0.1, and stay there.
    let mut first = connect(public);
    expect_closed(&mut first);
    assert_eq!(load(&agent.stats.refused_total), 1);
    for msg in [&b"second"[..], b"third", b"fourth"] {
        echo_round_trip(public, msg);
    }
    assert_eq!(load(&agent.stats.refused_total), 1);
    assert_eq!(load(&service.accepted), 3);
}

#[test]
fn agent_resolves_localhost_for_server_and_local() {
    // The system resolver, through `localhost`. Where `localhost` is
    // [::1, 127.0.0.1] this also checks the order (the server written here
    // is on 127.0.0.1 only); where it is 127.0.0.1 alone, as on some CI
    // machines, it cannot fail on the order, which
    // `agent_tries_every_address_of_a_name_in_order` covers.
    let service = LocalService::echo();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let sport = service.addr.port();
    let agent = start_agent(&agent_config(&format!(
        "[[tunnel_agent]]\nserver = \"localhost:{port}\"\nlocal = \"localhost:{sport}\"\n"
    )));
    let mut link = accept_link(&listener);
    expect_frame(&mut link, Command::Listen, 0);

    // The default allowlist is what `local` resolves to: an empty target,
    // `local` as configured, and its address are served.
    let other = util::free_port();
    let targets: [(u8, String, bool); 4] = [
        (1, String::new(), true),
        (2, format!("localhost:{sport}"), true),
        (3, format!("127.0.0.1:{sport}"), true),
        (4, format!("127.0.0.1:{other}"), false),
    ];
    for (id, target, served) in targets {
        send_frame(&mut link, Command::Connect, id, target.as_bytes());
        if served {
            send_frame(&mut link, Command::Data, id, b"hi");
            expect_data(&mut link, id, b"hi");
        } else {
            expect_frame(&mut link, Command::Close, id);
        }
    }
    assert_eq!(wait_agent_up(&agent), 0, "a base server");
    assert_eq!(load(&service.accepted), 3);
    assert_eq!(load(&agent.stats.refused_total), 1);
}

#[test]
fn heartbeat_answers_pings_and_drops_a_silent_link() {
    let server = start_simple_server(
        "open",
        None,
        "heartbeat_interval = \"100ms\"\nheartbeat_timeout = \"400ms\"",
    );
    let mut link = connect(server.link);
    let hello = hand_listen(&mut link, ext::HEARTBEAT, [3; NONCE_LEN], b"open");
    assert_eq!(hello.flags, ext::HEARTBEAT);
    assert_eq!(expect_frame(&mut link, Command::Ready, 0), b"");
    // The server pings.
    let ping = expect_frame(&mut link, Command::Ping, 0);
    assert_eq!(ping.len(), 8);
    // And answers our PING with the same bytes (its own PINGs may come between).
    send_frame(&mut link, Command::Ping, 0, b"12345678");
    let sent = Instant::now();
    loop {
        match recv_frame(&mut link) {
            Some((Command::Ping, 0, _)) => {}
            Some((Command::Pong, 0, p)) => {
                assert_eq!(p, b"12345678");
                break;
            }
            other => panic!("expected PONG, got {other:?}"),
        }
    }
    // Now silent: closed after heartbeat_timeout, server PINGs meanwhile.
    link.set_read_timeout(Some(WAIT)).unwrap();
    loop {
        match recv_frame(&mut link) {
            Some((Command::Ping, 0, _)) => {}
            None => break,
            other => panic!("expected PING or a close, got {other:?}"),
        }
    }
    let after = sent.elapsed();
    assert!(
        after >= Duration::from_millis(350) && after < Duration::from_secs(5),
        "closed {after:?} after the last frame"
    );
    wait_for(
        "the public port to close",
        WAIT,
        || server.stats.public_addr("open").is_none(),
        || (),
    );
}

#[test]
fn heartbeat_keeps_an_idle_link_up() {
    let service = LocalService::echo();
    let hb = "heartbeat_interval = \"100ms\"\nheartbeat_timeout = \"400ms\"";
    let server = start_simple_server("svc", None, hb);
    let agent = start_agent(&agent_config(&agent_toml(
        "svc",
        server.link,
        service.addr,
        hb,
    )));
    wait_agent_up(&agent);
    let public = wait_public(&server.stats, "svc");
    thread::sleep(Duration::from_millis(1200));
    assert_eq!(load(&agent.stats.reconnects_total), 0);
    assert_eq!(load(&server.stats.links_total), 1);
    echo_round_trip(public, b"awake");
}

#[test]
fn handshake_timeout_and_max_pending() {
    let server = start_simple_server(
        "svc",
        Some("t-0123456789abcdef"),
        "handshake_timeout = \"300ms\"\nmax_pending = 1",
    );
    // One link in its handshake (HELLO received, AUTH not sent).
    let mut first = connect(server.link);
    hand_listen(&mut first, ext::AUTH, [1; NONCE_LEN], b"svc");
    // Another arrives: the table is full, so the oldest makes room.
    let mut pending = connect(server.link);
    let t0 = Instant::now();
    expect_closed(&mut first);
    assert_eq!(load(&server.stats.pending_evicted_total), 1);
    hand_listen(&mut pending, ext::AUTH, [4; NONCE_LEN], b"svc");
    // The pending one times out.
    pending.set_read_timeout(Some(WAIT)).unwrap();
    closed_within(&mut pending, WAIT);
    let after = t0.elapsed();
    assert!(
        after >= Duration::from_millis(250),
        "closed after {after:?}"
    );
    // The slot is free again: a full handshake succeeds.
    let mut link = connect(server.link);
    let na = [2; NONCE_LEN];
    let hello = hand_listen(&mut link, ext::AUTH, na, b"svc");
    send_frame(
        &mut link,
        Command::Auth,
        0,
        &agent_tag(
            b"t-0123456789abcdef",
            &na,
            &hello.nonce,
            hello.flags,
            b"svc",
        ),
    );
    expect_frame(&mut link, Command::Ready, 0);
    wait_public(&server.stats, "svc");
    // Up links are not pending: a new handshake may start.
    let mut next = connect(server.link);
    hand_listen(&mut next, ext::AUTH, [3; NONCE_LEN], b"svc");
}

#[test]
fn empty_listen_picks_the_first_free_tokenless_service() {
    let server = start_server(
        "[[tunnel_server]]\nlisten = \"127.0.0.1:0\"\n\
         [[tunnel_server.service]]\nname = \"a\"\npublic = \"127.0.0.1:0\"\ntoken = \"t-0123456789abcdef\"\n\
         [[tunnel_server.service]]\nname = \"b\"\npublic = \"127.0.0.1:0\"\n\
         [[tunnel_server.service]]\nname = \"c\"\npublic = \"127.0.0.1:0\"\n",
    );
    let mut one = connect(server.link);
    send_frame(&mut one, Command::Listen, 0, &[]);
    let b = wait_public(&server.stats, "b");
    let mut two = connect(server.link);
    send_frame(&mut two, Command::Listen, 0, &[]);
    let c = wait_public(&server.stats, "c");
    assert_eq!(server.stats.public_addr("a"), None);

    let _cb = connect(b);
    expect_connect(&mut one);
    let _cc = connect(c);
    expect_connect(&mut two);

    // All tokenless services linked: the next empty LISTEN takes over "b".
    let mut three = connect(server.link);
    send_frame(&mut three, Command::Listen, 0, &[]);
    one.set_read_timeout(Some(WAIT)).unwrap();
    closed_within(&mut one, WAIT);
    assert_eq!(server.stats.public_addr("b"), Some(b));
    let _cb = connect(b);
    expect_connect(&mut three);
    assert_eq!(load(&server.stats.links), 2);
}

// ===== hardening: admission, throttling, honest stream ends, bounded logs =====

/// Connect from `src` and wait until the engine has accepted it (so the
/// order in which the server saw connections is the order of the calls).
fn attach_from(server: &Server, src: [u8; 4]) -> TcpStream {
    let before = server.engine.stats().accepted_total;
    let s = connect_from(Ipv4Addr::from(src), server.link);
    wait_for(
        "the server to accept a link",
        WAIT,
        || server.engine.stats().accepted_total > before,
        || (),
    );
    s
}

/// The peer ends `s` with a reset (not a FIN) within `AT_ONCE`; bytes
/// before it are returned.
fn read_until_reset(s: &mut TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(AT_ONCE)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => panic!("clean EOF (FIN) after {:?}; expected a reset", show(&got)),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return got,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("expected a reset, got {e} after {:?}", show(&got)),
        }
    }
}

/// A full extended handshake with `token` for service `svc`.
fn hand_auth(s: &mut TcpStream, token: &[u8], nonce: [u8; NONCE_LEN]) {
    let hello = hand_listen(s, ext::AUTH, nonce, b"svc");
    let tag = agent_tag(token, &nonce, &hello.nonce, hello.flags, b"svc");
    send_frame(s, Command::Auth, 0, &tag);
    expect_frame(s, Command::Ready, 0);
}

#[test]
fn silent_links_cannot_lock_a_real_agent_out() {
    const TOKEN: &[u8] = b"t-0123456789abcdef";
    let server = start_simple_server(
        "svc",
        Some("t-0123456789abcdef"),
        "max_pending = 4\nmax_pending_per_ip = 2",
    );
    // Two silent links from one address; once they have been pending past
    // the grace (500 ms), a third from it is closed at once.
    let mut a = attach_from(&server, [127, 0, 0, 1]);
    let _b = attach_from(&server, [127, 0, 0, 1]);
    thread::sleep(Duration::from_millis(600));
    let mut c = connect_from(Ipv4Addr::new(127, 0, 0, 1), server.link);
    expect_closed(&mut c);
    assert_eq!(load(&server.stats.pending_refused_total), 1);
    // Two more from another address fill the table.
    let _d = attach_from(&server, [127, 0, 0, 2]);
    let _e = attach_from(&server, [127, 0, 0, 2]);
    // A real agent still gets in: the oldest silent link makes room.
    let mut real = connect_from(Ipv4Addr::new(127, 0, 0, 3), server.link);
    hand_auth(&mut real, TOKEN, [9; NONCE_LEN]);
    expect_closed(&mut a);
    assert_eq!(load(&server.stats.pending_evicted_total), 1);
    wait_public(&server.stats, "svc");
    // The address whose link was evicted may start a handshake again.
    let mut again = connect_from(Ipv4Addr::new(127, 0, 0, 1), server.link);
    hand_listen(&mut again, ext::AUTH, [5; NONCE_LEN], b"svc");
}

#[test]
fn a_burst_of_agents_from_one_address_is_not_refused() {
    // Agents behind one carrier-NAT address redial together after an
    // outage: more at once than max_pending_per_ip, each handshaking at once.
    let server = start_simple_server("svc", None, "max_pending_per_ip = 2");
    let mut links: Vec<TcpStream> = (0..8).map(|_| connect(server.link)).collect();
    for (k, link) in links.iter_mut().enumerate() {
        hand_listen(link, 0, [k as u8; NONCE_LEN], b"svc");
    }
    assert_eq!(load(&server.stats.pending_refused_total), 0);
}

#[test]
fn failed_authentications_close_an_address_on_accept() {
    const TOKEN: &[u8] = b"t-0123456789abcdef";
    let server = start_simple_server("svc", Some("t-0123456789abcdef"), "");
    for k in 0..5u8 {
        let mut s = connect_from(Ipv4Addr::new(127, 0, 0, 1), server.link);
        let na = [k; NONCE_LEN];
        let hello = hand_listen(&mut s, ext::AUTH, na, b"svc");
        let bad = agent_tag(
            b"not-the-token-0123",
            &na,
            &hello.nonce,
            hello.flags,
            b"svc",
        );
        send_frame(&mut s, Command::Auth, 0, &bad);
        expect_reject(&mut s, reject::AUTH_FAILED);
    }
    assert_eq!(load(&server.stats.auth_failed_total), 5);
    // The sixth link from that address is closed before any HELLO, even
    // with the right token.
    let mut blocked = connect_from(Ipv4Addr::new(127, 0, 0, 1), server.link);
    send_frame(
        &mut blocked,
        Command::Listen,
        0,
        &listen_payload(ext::AUTH, 65536, [7; NONCE_LEN], b"svc"),
    );
    expect_link_closed(&mut blocked);
    assert_eq!(load(&server.stats.throttled_total), 1);
    assert_eq!(load(&server.stats.auth_failed_total), 5);
    // Another address is not affected.
    let mut other = connect_from(Ipv4Addr::new(127, 0, 0, 2), server.link);
    hand_auth(&mut other, TOKEN, [8; NONCE_LEN]);
    wait_public(&server.stats, "svc");
}

#[test]
fn a_dead_link_resets_public_clients_and_close_still_ends_with_fin() {
    let server = start_simple_server("open", None, "");
    let mut link = connect(server.link);
    send_frame(&mut link, Command::Listen, 0, &[]);
    let public = wait_public(&server.stats, "open");

    // A normal end: every byte, then EOF.
    let mut done = connect(public);
    let (id, _) = expect_connect(&mut link);
    let answer = vec![b'a'; 100_000];
    for chunk in answer.chunks(16 * 1024) {
        send_frame(&mut link, Command::Data, id, chunk);
    }
    send_frame(&mut link, Command::Close, id, &[]);
    let got = util::read_to_eof(&mut done, 1 << 20);
    assert_eq!(
        got.len(),
        answer.len(),
        "a CLOSEd stream delivers every byte"
    );

    // The link dies mid-transfer: the client reads what came, then a reset.
    let mut cut = connect(public);
    let (id, _) = expect_connect(&mut link);
    send_frame(&mut link, Command::Data, id, b"partial");
    expect_bytes(&mut cut, b"partial");
    drop(link);
    let rest = read_until_reset(&mut cut);
    assert!(rest.is_empty(), "{:?}", show(&rest));
}

#[test]
fn agent_resets_its_local_connections_when_it_loses_the_server() {
    let local = TcpListener::bind("127.0.0.1:0").unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let _agent = start_agent(&agent_config(&agent_toml(
        "dev1",
        listener.local_addr().unwrap(),
        local.local_addr().unwrap(),
        "reconnect_min = \"30s\"\nreconnect_max = \"60s\"",
    )));
    let mut link = accept_link(&listener);
    expect_frame(&mut link, Command::Listen, 0);
    // A base server: CONNECT, then DATA for the local service.
    send_frame(&mut link, Command::Connect, 3, &[]);
    let mut svc = accept_within(&local, WAIT);
    send_frame(&mut link, Command::Data, 3, b"to the device");
    svc.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    expect_bytes(&mut svc, b"to the device");
    drop(link);
    let rest = read_until_reset(&mut svc);
    assert!(rest.is_empty(), "{:?}", show(&rest));
}

#[test]
fn hostile_connect_targets_are_cut_and_rate_limited_in_the_agent_log() {
    use std::process::Stdio;
    let local = TcpListener::bind("127.0.0.1:0").unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut child = util::target_command(util::bin())
        .args([
            "agent",
            "--server",
            &listener.local_addr().unwrap().to_string(),
            "--local",
            &local.local_addr().unwrap().to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = util::Captured::new(child.stderr.take().unwrap());
    let _child = util::ChildGuard(child);
    let mut link = accept_link(&listener);
    expect_frame(&mut link, Command::Listen, 0);
    // A base server asks for 200 targets of 60,000 bytes each, off the
    // allowlist: every one is refused with a CLOSE.
    let target = vec![b'x'; 60_000];
    let t0 = Instant::now();
    for id in 0..200u8 {
        send_frame(&mut link, Command::Connect, id, &target);
    }
    for id in 0..200u8 {
        expect_frame(&mut link, Command::Close, id);
    }
    let took = t0.elapsed();
    // One more after the rate limit's second: its line counts the others.
    thread::sleep(Duration::from_millis(1100));
    send_frame(&mut link, Command::Connect, 200, &target);
    expect_frame(&mut link, Command::Close, 200);
    assert!(
        log.wait_for(WAIT, |t| t.contains("similar lines suppressed")),
        "no suppressed count in the log:\n{}",
        log.text()
    );
    let text = log.text();
    let refused: Vec<&str> = text.lines().filter(|l| l.contains("allowlist")).collect();
    let seconds = (t0.elapsed().as_secs() + 1) as usize;
    assert!(
        (2..=seconds + 1).contains(&refused.len()),
        "{} refusal lines in {took:?}:\n{text}",
        refused.len()
    );
    for line in &refused {
        assert!(line.len() < 300, "a {}-byte line: {line}", line.len());
        assert!(line.contains(&format!("{}…", "x".repeat(64))), "{line}");
    }
    assert!(text.len() < 16 * 1024, "{} bytes of log", text.len());
}
