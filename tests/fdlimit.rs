//! At the file-descriptor limit the loop pauses accepting instead of spinning
//! on EMFILE, and resumes once descriptors free up. Runs the real binary under
//! `ulimit -n` so the limit does not touch the test process.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly"
)]

mod util;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use util::{Captured, ChildGuard, bin, connect, send_signal, target_command, temp_file};

/// Descriptors the child may hold: stdio, poll, waker, signal pipe and the
/// listener use about 8, leaving room for about 40 connections.
const FD_LIMIT: u32 = 48;
const CLIENTS: usize = 80;
/// Allowed CPU use while stuck at the limit, as a share of one core.
const MAX_CPU_SHARE: f64 = 0.20;
const SAMPLE: Duration = Duration::from_secs(2);

/// utime + stime of `pid`, in clock ticks (fields 14 and 15 of /proc/<pid>/stat).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name (field 2) is in parentheses and may contain spaces:
    // count fields after the last ')'. Field 3 is the first one after it.
    let rest = &stat[stat.rfind(')').unwrap() + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields[14 - 3].parse().unwrap();
    let stime: u64 = fields[15 - 3].parse().unwrap();
    utime + stime
}

fn clock_ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

fn echo_once(addr: SocketAddr, msg: &[u8]) {
    let mut s = connect(addr);
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(msg).unwrap();
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).unwrap();
    assert_eq!(got, msg);
}

#[test]
fn at_the_fd_limit_the_loop_does_not_spin_and_recovers() {
    if !Path::new("/proc/self/stat").exists() {
        eprintln!("skipped: /proc is not available to measure the child's CPU time");
        return;
    }
    let port = util::free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let cfg = temp_file(
        "fdlimit.toml",
        &format!(
            "[engine]\nmax_connections = 1000\naccept_backoff = \"100ms\"\n[[echo]]\nlisten = \"{addr}\"\n"
        ),
    );
    // Under user-mode emulation the binary runs through cargo's runner.
    let target = target_command(bin());
    let program: Vec<String> = std::iter::once(target.get_program())
        .chain(target.get_args())
        .map(|a| format!("'{}'", a.to_string_lossy()))
        .collect();
    let script = format!(
        "ulimit -n {FD_LIMIT} && exec {} run -c '{}'",
        program.join(" "),
        cfg.display()
    );
    let child = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sh");
    let mut child = ChildGuard(child);
    // `exec` keeps the pid: this is the switchboard process once it runs.
    let pid = child.id();
    let log = Captured::new(child.0.stderr.take().unwrap());
    if !log.wait_for(Duration::from_secs(20), |t| t.contains("listening on")) {
        panic!("switchboard did not start: {}", log.text());
    }

    // More clients than descriptors: the kernel's backlog completes every
    // handshake, the engine accepts until EMFILE and then pauses.
    let clients: Vec<TcpStream> = (0..CLIENTS).map(|_| connect(addr)).collect();
    let paused = log.wait_for(Duration::from_secs(10), |t| t.contains("accepting paused"));
    assert!(paused, "the engine never hit the fd limit: {}", log.text());

    let hz = clock_ticks_per_second();
    let t0 = cpu_ticks(pid);
    thread::sleep(SAMPLE);
    let used = cpu_ticks(pid) - t0;
    let share = used as f64 / hz as f64 / SAMPLE.as_secs_f64();
    eprintln!(
        "at the fd limit with {CLIENTS} clients: {used} ticks of CPU in {SAMPLE:?} ({:.1}% of one core)",
        share * 100.0
    );
    assert!(
        share < MAX_CPU_SHARE,
        "the loop used {:.0}% of a core while stuck at the fd limit",
        share * 100.0
    );

    // Free every descriptor: the engine drains its backlog and serves again.
    drop(clients);
    echo_once(addr, b"after the limit");
    echo_once(addr, b"and again");

    send_signal(pid, "TERM");
    let status = child.wait(Duration::from_secs(15));
    let log = log.finish();
    assert_eq!(status.code(), Some(0), "{status}: {log}");
    assert!(
        log.contains("Too many open files") || log.contains("os error 24"),
        "EMFILE was not the reason: {log}"
    );
}
