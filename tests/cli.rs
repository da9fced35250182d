//! The `switchboard` command: version, `check`, exit codes, a graceful stop
//! on SIGTERM, and `switchboard agent` with host names.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly"
)]

mod util;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Output, Stdio};
use std::thread;
use std::time::Duration;

use switchboard::codec::tunnel::{Command, HEADER_LEN, header};
use util::{
    Captured, ChildGuard, accept_within, bin, connect, http_get, send_signal, target_command,
    temp_file, wait_child,
};

const EXIT_CONFIG: i32 = 2;

/// Run the binary to completion (bounded), stdin null, output captured.
fn run(args: &[&str]) -> Output {
    let mut child = target_command(bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn switchboard");
    let out = Captured::new(child.stdout.take().unwrap());
    let err = Captured::new(child.stderr.take().unwrap());
    let status = wait_child(&mut child, Duration::from_secs(20));
    Output {
        status,
        stdout: out.finish().into_bytes(),
        stderr: err.finish().into_bytes(),
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn version_prints_the_crate_version() {
    let out = run(&["--version"]);
    assert!(out.status.success(), "{:?}", out.status);
    let stdout = text(&out.stdout);
    assert_eq!(
        stdout.trim(),
        format!("switchboard {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn check_accepts_a_good_file_and_lists_its_roles() {
    let cfg = temp_file(
        "good.toml",
        "[engine]\nmax_connections = 64\n\n[[echo]]\nname = \"alpha\"\nlisten = \"127.0.0.1:0\"\nidle_timeout = \"30s\"\n\n[[echo]]\nname = \"beta\"\nlisten = \"127.0.0.1:7007\"\n",
    );
    let out = run(&["check", "-c", cfg.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {}",
        text(&out.stderr)
    );
    assert!(stdout.contains("ok"), "{stdout}");
    assert!(stdout.contains("max_connections=64"), "{stdout}");
    assert!(
        stdout.contains("echo 'alpha': listen 127.0.0.1:0, idle_timeout 30s"),
        "{stdout}"
    );
    assert!(
        stdout.contains("echo 'beta': listen 127.0.0.1:7007, no idle timeout"),
        "{stdout}"
    );
}

#[test]
fn check_rejects_bad_files_naming_the_key() {
    let cases = [
        (
            "unknown-key.toml",
            "[engine]\nmax_conections = 5\n",
            &["max_conections"][..],
        ),
        (
            "bad-duration.toml",
            "[[echo]]\nlisten = \"127.0.0.1:0\"\nidle_timeout = \"5 parsecs\"\n",
            &["idle_timeout", "invalid duration"][..],
        ),
        (
            "bad-address.toml",
            "[[echo]]\nlisten = \"localhost:port\"\n",
            &["listen"][..],
        ),
        (
            "bad-bound.toml",
            "[engine]\nbuffer_bytes = 65536\nqueue_bytes = 65536\n",
            &["engine.queue_bytes"][..],
        ),
    ];
    for (name, body, needles) in cases {
        let cfg = temp_file(name, body);
        let out = run(&["check", "-c", cfg.to_str().unwrap()]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{name}: {stderr}");
        for needle in needles {
            assert!(
                stderr.contains(needle),
                "{name}: stderr lacks {needle:?}: {stderr}"
            );
        }
        assert!(
            stderr.contains(name),
            "{name}: stderr does not name the file: {stderr}"
        );
    }
    // A missing file is a config error too.
    let out = run(&["check", "-c", "/nonexistent/switchboard.toml"]);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG));
    assert!(text(&out.stderr).contains("/nonexistent/switchboard.toml"));
}

#[test]
fn run_exits_2_naming_an_address_already_in_use() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let cfg = temp_file(
        "in-use.toml",
        &format!("[[echo]]\nname = \"busy\"\nlisten = \"{addr}\"\n"),
    );
    let out = run(&["run", "-c", cfg.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{stderr}");
    assert!(
        stderr.contains(&addr.to_string()),
        "address not named: {stderr}"
    );
    drop(taken);
}

#[test]
fn run_serves_then_stops_cleanly_on_sigterm() {
    let cfg = temp_file(
        "sigterm.toml",
        "[[echo]]\nname = \"front\"\nlisten = \"127.0.0.1:0\"\n",
    );
    let child = target_command(bin())
        .args(["--log-level", "info", "run", "-c", cfg.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn switchboard");
    let mut child = ChildGuard(child);
    let log = Captured::new(child.0.stderr.take().unwrap());
    const MARK: &str = "echo 'front' listening on ";
    // A whole line only: the pipe may hold the start of one whose address
    // has not been written yet.
    let listening = |t: &str| -> Option<String> {
        t.split_inclusive('\n')
            .find(|l| l.ends_with('\n') && l.contains(MARK))
            .map(str::to_owned)
    };
    let ready = log.wait_for(Duration::from_secs(20), |t| listening(t).is_some());
    assert!(ready, "no listening line in the log: {}", log.text());
    let line = listening(&log.text()).unwrap();
    let addr: SocketAddr = line[line.find(MARK).unwrap() + MARK.len()..]
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("bad address in {line:?}: {e}"));
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");

    // It really serves there.
    let mut s = connect(addr);
    s.write_all(b"hello").unwrap();
    let mut got = [0u8; 5];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello");

    send_signal(child.id(), "TERM");
    // The open client is closed by the graceful stop.
    let mut buf = [0u8; 8];
    assert_eq!(s.read(&mut buf).unwrap(), 0, "client not closed on stop");
    let status = child.wait(Duration::from_secs(15));
    let log = log.finish();
    assert_eq!(status.code(), Some(0), "{status}: {log}");
    assert!(log.contains(&format!("{MARK}{addr}")), "{log}");
    assert!(log.contains("shutting down"), "{log}");
    assert!(log.contains("engine stopped"), "{log}");
}

/// Write one tunnel frame.
fn send_frame(s: &mut TcpStream, command: Command, id: u8, payload: &[u8]) {
    s.write_all(&header(command, id, payload.len()).unwrap())
        .unwrap();
    s.write_all(payload).unwrap();
}

/// Read one tunnel frame (bounded by the socket's read timeout).
fn recv_frame(s: &mut TcpStream) -> (Command, u8, Vec<u8>) {
    let mut head = [0u8; HEADER_LEN];
    s.read_exact(&mut head).expect("a frame header");
    let mut payload = vec![0u8; usize::from(u16::from_be_bytes([head[0], head[1]]))];
    s.read_exact(&mut payload).expect("a frame payload");
    (Command::from_u8(head[2]), head[3], payload)
}

#[test]
fn agent_command_takes_host_names_for_server_and_local() {
    // A local echo service and a base tunnel server, both written here on
    // 127.0.0.1; the agent is given both as `localhost:PORT`.
    let service = TcpListener::bind("127.0.0.1:0").unwrap();
    let sport = service.local_addr().unwrap().port();
    let echo = thread::spawn(move || {
        let mut s = accept_within(&service, Duration::from_secs(20));
        let mut buf = [0u8; 1024];
        while let Ok(n @ 1..) = s.read(&mut buf) {
            s.write_all(&buf[..n]).unwrap();
        }
    });
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (server, local) = (format!("localhost:{port}"), format!("localhost:{sport}"));
    let child = target_command(bin())
        .args(["--log-level", "info", "agent", "--server", &server])
        .args(["--local", &local])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn switchboard");
    let mut child = ChildGuard(child);
    let log = Captured::new(child.0.stderr.take().unwrap());

    let mut link = accept_within(&listener, Duration::from_secs(20));
    let (command, _, _) = recv_frame(&mut link);
    assert_eq!(command, Command::Listen, "{}", log.text());
    // A base server: CONNECT (to the agent's local service), then DATA.
    send_frame(&mut link, Command::Connect, 0, &[]);
    send_frame(&mut link, Command::Data, 0, b"hello");
    let mut got = Vec::new();
    while got.len() < 5 {
        let (command, id, payload) = recv_frame(&mut link);
        assert_eq!((command, id), (Command::Data, 0), "{}", log.text());
        got.extend(payload);
    }
    assert_eq!(got, b"hello");

    send_signal(child.id(), "TERM");
    let status = child.wait(Duration::from_secs(15));
    let log = log.finish();
    assert_eq!(status.code(), Some(0), "{status}: {log}");
    // The address dialled is logged (after [::1] where `localhost` has it first).
    let dialled = format!("dialling localhost:{port} at 127.0.0.1:{port}");
    assert!(log.contains(&dialled), "{log}");
    echo.join().unwrap();

    // Not host:port: refused before anything runs, naming the option's key.
    let out = run(&["agent", "--server", &server, "--local", "localhost"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{stderr}");
    assert!(
        stderr.contains("local") && stderr.contains("host:port"),
        "{stderr}"
    );
}

#[test]
fn a_stderr_nobody_reads_never_stalls_the_loop() {
    let echo = SocketAddr::from(([127, 0, 0, 1], util::fixed_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], util::fixed_port()));
    let cfg = temp_file(
        "stuck-stderr.toml",
        &format!("[[echo]]\nlisten = \"{echo}\"\n\n[admin]\nlisten = \"{admin}\"\n"),
    );
    // Debug logging writes three lines per connection; stderr is a pipe
    // that this test holds open and never reads (64 KiB fill it).
    let mut child = target_command(bin())
        .args(["--log-level", "debug", "run", "-c", cfg.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn switchboard");
    let _stuck = child.stderr.take().unwrap();
    let _child = ChildGuard(child);
    let ready = util::wait_until(Duration::from_secs(20), || {
        TcpStream::connect_timeout(&echo, Duration::from_millis(200)).is_ok()
    });
    assert!(ready, "echo on {echo} never opened");
    // Far more log than the pipe and the log queue hold together.
    for i in 0..1500u32 {
        let mut s = connect(echo);
        let msg = i.to_be_bytes();
        s.write_all(&msg).unwrap();
        let mut got = [0u8; 4];
        s.read_exact(&mut got)
            .unwrap_or_else(|e| panic!("round trip {i}: {e} (the loop is stuck)"));
        assert_eq!(got, msg);
    }
    let metrics = http_get(admin, "/metrics");
    let dropped: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("switchboard_log_dropped_total "))
        .unwrap_or_else(|| panic!("no switchboard_log_dropped_total in {metrics}"))
        .parse()
        .unwrap();
    assert!(dropped > 0, "no log line was dropped: {metrics}");
}

/// The keys a config section accepts, as the parser lists them when it
/// meets an unknown one.
fn accepted_keys(section: &str) -> Vec<String> {
    let text = format!("{section}\nno_such_key_here = 1\n");
    let e = switchboard::Config::parse(&text)
        .expect_err("an unknown key must be refused")
        .to_string();
    let list = e
        .split("expected one of ")
        .nth(1)
        .or_else(|| e.split("expected ").nth(1))
        .unwrap_or_else(|| panic!("no key list in: {e}"));
    list.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

#[test]
fn readme_documents_every_config_key_the_binary_accepts() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let sections = [
        "[engine]",
        "[[echo]]\nlisten = \"127.0.0.1:1\"",
        "[[broadcast]]\nlisten = \"127.0.0.1:1\"",
        "[[router]]\nlisten = \"127.0.0.1:1\"",
        "[[router]]\nlisten = \"127.0.0.1:1\"\n[[router.connpt]]\nname = \"c\"",
        "[[tunnel_server]]\nlisten = \"127.0.0.1:1\"",
        "[[tunnel_server]]\nlisten = \"127.0.0.1:1\"\n[[tunnel_server.service]]\nname = \"s\"",
        "[[tunnel_agent]]\nserver = \"a:1\"\nlocal = \"b:2\"",
        "[admin]\nlisten = \"127.0.0.1:1\"",
    ];
    let mut missing = Vec::new();
    for section in sections {
        let keys = accepted_keys(section);
        assert!(keys.len() > 1, "{section}: {keys:?}");
        for key in keys {
            // A key, or a sub-table such as `[[tunnel_server.service]]`.
            if !readme.contains(&format!("`{key}`")) && !readme.contains(&format!(".{key}]]")) {
                missing.push(format!("{} {key}", section.lines().last().unwrap_or("")));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "keys not documented in README.md: {missing:?}"
    );
}

#[test]
fn readme_lists_every_subcommand_and_global_option() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let listing = readme
        .split("## Command line")
        .nth(1)
        .and_then(|r| r.split("\n## ").next())
        .expect("a Command line section");
    let help = text(&run(&["--help"]).stdout);
    for cmd in ["run", "check", "agent"] {
        assert!(help.contains(cmd), "--help lacks {cmd}: {help}");
        assert!(
            listing.contains(&format!("switchboard {cmd}")),
            "README lacks `switchboard {cmd}`"
        );
    }
    let agent = text(&run(&["agent", "--help"]).stdout);
    for flag in ["--server", "--local", "--name", "--token", "--token-file"] {
        assert!(agent.contains(flag), "agent --help lacks {flag}");
        assert!(listing.contains(flag), "README's listing lacks {flag}");
    }
    for flag in ["--log-level", "--version", "--help"] {
        assert!(help.contains(flag), "--help lacks {flag}");
        assert!(listing.contains(flag), "README's listing lacks {flag}");
    }
}
