//! Live reload of a large router: how long a reload holds the loop, and
//! that no online device is dropped by it.
//!
//! One `[[router]]` with C connpts, each with an application port (the DTU
//! example's shape), in an engine built like `switchboard run -c FILE` does
//! (`Config::load`, `Engine::from_config`, `Engine::watch_config`) and run on
//! its own thread. D devices are online, A of them with an application
//! attached; the device and application sockets are held by a child process
//! (this binary re-executed as a holder), so the engine's process has its
//! whole RLIMIT_NOFILE for C listeners and D + A connections.
//!
//! A reload re-reads the file on the loop thread: `Config::load` (parse and
//! validate) and `Engine::reload` (compare fingerprints, let the router
//! apply its connpt changes in place) both run in the loop, which serves
//! nothing else meanwhile. Measured, with the loop otherwise idle:
//! - wall time from `Handle::reload` until a probe role (added by hand, so
//!   the reload never touches it) answers a message queued right after the
//!   reload: the loop has finished the reload by then;
//! - the engine thread's CPU time over the same span (`/proc/.../schedstat`),
//!   which is the loop time the reload took (plus one wake-up and the probe);
//! - for a reload that adds a connpt, the wall time until its new port
//!   accepts a connection;
//! - separately, on the bench thread (its CPU time): `Config::load` of the
//!   same file, the parse-and-validate share of the loop time; and
//!   `Engine::reload` called directly on a started engine that is not
//!   running (no devices), the compare-and-apply share.
//!
//! Reloads measured (R rounds each, alternating): the same file again (no
//! change), one connpt added, that connpt removed again. After every round
//! and at the end, every device with an application sends one message each
//! way (checked byte-exact by the holder), every device without one is
//! checked open, and the engine must have closed no connection but the
//! ones the bench opened to the added connpt's port.
//!
//! Target: < 100 ms of loop time per reload with 10,000 connpts, and no
//! device dropped. The verdict is on the engine thread's CPU time (worst of
//! the rounds), which a busy machine inflates less than the wall time; the
//! wall time is printed too.
//!
//! Full mode: C = 10,000; D = 5,000 if the descriptors allow, A = as many of
//! them as fit (C + D + A + a reserve <= RLIMIT_NOFILE: 4,900 at 20,000);
//! R = 5. `SWITCHBOARD_BENCH_QUICK=1`, or running without `--bench` (as
//! `cargo test --benches` does), uses C = 1,000, D = A = 200, R = 2.
//!
//! The connpts listen on fixed loopback ports below the kernel's ephemeral
//! range, found free just before: binding thousands of listeners to port 0
//! with `SO_REUSEADDR` is slow on Linux (tens of seconds for 10,000).

#[path = "support/harness.rs"]
mod harness;

use std::error::Error;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use harness::{quick_mode, spawn_engine, task_cpu_ns, this_task};
use switchboard::codec::Frame;
use switchboard::engine::{ConnKey, Ctx};
use switchboard::{Config, Engine, EngineError, Handle, Message, Role, RoleId};

type BoxError = Box<dyn Error + Send + Sync>;
type Result<T> = std::result::Result<T, BoxError>;

/// Env var that turns this binary into the socket holder.
const HOLDER_ENV: &str = "SWITCHBOARD_RELOAD_HOLDER";
/// Descriptors kept free in the engine's process (stdio, poll, waker,
/// pipes to the holder, the config file, the bench's own probes).
const FD_RESERVE: usize = 100;
/// Loop time a reload may take.
const TARGET: Duration = Duration::from_millis(100);
/// Bound on any wait.
const WAIT: Duration = Duration::from_secs(30);

struct Plan {
    quick: bool,
    connpts: usize,
    devices: usize,
    apps: usize,
    rounds: usize,
    nofile: usize,
}

impl Plan {
    fn new() -> Plan {
        let quick = quick_mode();
        let nofile = nofile_limit().unwrap_or(1024);
        let (connpts, want_devices, rounds) = if quick {
            (1_000, 200, 2)
        } else {
            (10_000, 5_000, 5)
        };
        // Listeners: the connpts, the device port, the connpt a reload adds.
        let room = nofile.saturating_sub(FD_RESERVE + connpts + 2);
        let devices = want_devices.min(room);
        let apps = devices.min(room - devices);
        Plan {
            quick,
            connpts,
            devices,
            apps,
            rounds,
            nofile,
        }
    }
}

/// RLIMIT_NOFILE (soft) from `/proc/self/limits` (Linux).
fn nofile_limit() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

fn device_id(i: usize) -> String {
    format!("d{i:05}")
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// `n` loopback ports below the ephemeral range, each free a moment ago.
fn ports_below_ephemeral(n: usize) -> Result<Vec<u16>> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")?;
    let low: u16 = range
        .split_whitespace()
        .next()
        .ok_or("empty ip_local_port_range")?
        .parse()?;
    let mut held = Vec::with_capacity(n);
    for port in (1024..low).rev() {
        if held.len() == n {
            break;
        }
        if let Ok(l) = TcpListener::bind(local(port)) {
            held.push(l);
        }
    }
    if held.len() < n {
        return Err(format!("only {} free ports below {low}", held.len()).into());
    }
    let mut ports = Vec::with_capacity(n);
    for l in &held {
        ports.push(l.local_addr()?.port());
    }
    Ok(ports)
}

/// The config text: the router's device port, then `connpts` connpts on
/// `ports[1..]`, plus connpt number `connpts` when `extra`.
fn config_text(ports: &[u16], connpts: usize, extra: bool) -> String {
    let mut t = String::with_capacity(100 * (connpts + 1));
    t.push_str(&format!(
        "[engine]\nmax_connections = 30000\n\n[[router]]\nname = \"big\"\nlisten = \"127.0.0.1:{}\"\n\
         max_pending = 10000\nmax_pending_per_ip = 10000\n",
        ports[0]
    ));
    let n = connpts + usize::from(extra);
    for (i, port) in ports[1..=n].iter().enumerate() {
        t.push_str(&format!(
            "[[router.connpt]]\nname = \"k{i:05}\"\nid = \"{}\"\nlisten = \"127.0.0.1:{port}\"\n",
            device_id(i)
        ));
    }
    t
}

// ===== the probe role =====

/// Answers a `Sender<()>` message: the loop has handled everything queued
/// before it.
struct Probe;

impl Role for Probe {
    fn name(&self) -> &str {
        "probe"
    }

    fn start(&mut self, _ctx: &mut Ctx<'_>) -> std::result::Result<(), EngineError> {
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

fn settle(handle: &Handle, probe: RoleId) -> Result<()> {
    let (tx, rx) = mpsc::channel::<()>();
    handle
        .send(probe, Box::new(tx))
        .map_err(|e| format!("probe: {e}"))?;
    rx.recv_timeout(WAIT)
        .map_err(|_| format!("the loop did not answer within {WAIT:?}"))?;
    Ok(())
}

// ===== the holder (child process) =====

fn io_timeouts(s: &TcpStream) -> io::Result<()> {
    s.set_read_timeout(Some(WAIT))?;
    s.set_write_timeout(Some(WAIT))?;
    s.set_nodelay(true)
}

/// Read stdin commands: `apps <device addr> <devices> <apps>` followed by
/// one application address per line, `devices <from> <to>`, `round <tag>`,
/// `quit`. Answers each with one line on stdout.
fn holder() -> Result<()> {
    let mut lines = io::stdin().lock().lines();
    let mut out = io::stdout().lock();
    let mut next = move || -> Result<String> { Ok(lines.next().ok_or("stdin closed")??) };
    let head = next()?;
    let mut words = head.split_whitespace().skip(1);
    let devices_at: SocketAddr = words.next().ok_or("no device address")?.parse()?;
    let n_devices: usize = words.next().ok_or("no device count")?.parse()?;
    let n_apps: usize = words.next().ok_or("no app count")?.parse()?;
    let mut apps = Vec::with_capacity(n_apps);
    for _ in 0..n_apps {
        let addr: SocketAddr = next()?.parse()?;
        let s = TcpStream::connect(addr).map_err(|e| format!("app to {addr}: {e}"))?;
        io_timeouts(&s)?;
        apps.push(s);
    }
    writeln!(out, "apps {}", apps.len())?;
    out.flush()?;
    let mut devices = Vec::with_capacity(n_devices);
    loop {
        let cmd = next()?;
        let mut words = cmd.split_whitespace();
        match words.next() {
            Some("devices") => {
                let from: usize = words.next().ok_or("from")?.parse()?;
                let to: usize = words.next().ok_or("to")?.parse()?;
                for i in from..to {
                    let mut s =
                        TcpStream::connect(devices_at).map_err(|e| format!("device {i}: {e}"))?;
                    io_timeouts(&s)?;
                    s.write_all(device_id(i).as_bytes())?;
                    devices.push(s);
                }
                writeln!(out, "devices {}", devices.len())?;
            }
            Some("round") => {
                let tag = words.next().unwrap_or("x");
                let t0 = Instant::now();
                match round(tag, &mut devices, &mut apps) {
                    Ok(()) => writeln!(out, "ok {:?}", t0.elapsed())?,
                    Err(e) => writeln!(out, "fail {e}")?,
                }
            }
            Some("quit") | None => return Ok(()),
            Some(other) => return Err(format!("unknown command {other}").into()),
        }
        out.flush()?;
    }
}

/// One message each way between every device and its application; devices
/// without one must still be open.
fn round(tag: &str, devices: &mut [TcpStream], apps: &mut [TcpStream]) -> Result<()> {
    let msg = |dir: char, i: usize| format!("{tag}{dir}{i:05};");
    for (i, d) in devices.iter_mut().enumerate().take(apps.len()) {
        d.write_all(msg('>', i).as_bytes())?;
    }
    let mut buf = [0u8; 64];
    for (i, a) in apps.iter_mut().enumerate() {
        let want = msg('>', i);
        let got = buf.get_mut(..want.len()).ok_or("message too long")?;
        a.read_exact(got)
            .map_err(|e| format!("application {i}: {e}"))?;
        if got != want.as_bytes() {
            return Err(format!("application {i} got {:?}", got.escape_ascii().to_string()).into());
        }
        a.write_all(msg('<', i).as_bytes())?;
    }
    for (i, d) in devices.iter_mut().enumerate() {
        if i < apps.len() {
            let want = msg('<', i);
            let got = buf.get_mut(..want.len()).ok_or("message too long")?;
            d.read_exact(got).map_err(|e| format!("device {i}: {e}"))?;
            if got != want.as_bytes() {
                return Err(format!("device {i} got {:?}", got.escape_ascii().to_string()).into());
            }
        } else {
            d.set_nonblocking(true)?;
            let r = d.read(&mut buf);
            d.set_nonblocking(false)?;
            match r {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Ok(0) => return Err(format!("device {i} was closed").into()),
                Ok(n) => return Err(format!("device {i} got {n} unexpected bytes").into()),
                Err(e) => return Err(format!("device {i}: {e}").into()),
            }
        }
    }
    Ok(())
}

/// The holder, seen from the bench.
struct Holder {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Holder {
    fn spawn() -> Result<Holder> {
        let mut child = Command::new(std::env::current_exe()?)
            .env(HOLDER_ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdin = child.stdin.take().ok_or("holder stdin")?;
        let stdout = BufReader::new(child.stdout.take().ok_or("holder stdout")?);
        Ok(Holder {
            child,
            stdin,
            stdout,
        })
    }

    fn say(&mut self, line: &str) -> Result<()> {
        writeln!(self.stdin, "{line}")?;
        self.stdin.flush()?;
        Ok(())
    }

    fn answer(&mut self) -> Result<String> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            return Err("the holder exited".into());
        }
        Ok(line.trim_end().to_owned())
    }

    /// Ask for a round; fails if any device or application failed.
    fn round(&mut self, tag: &str) -> Result<String> {
        self.say(&format!("round {tag}"))?;
        let a = self.answer()?;
        match a.strip_prefix("ok ") {
            Some(t) => Ok(t.to_owned()),
            None => Err(format!("round {tag}: {a}").into()),
        }
    }

    fn quit(mut self) -> Result<()> {
        self.say("quit")?;
        let status = self.child.wait()?;
        if !status.success() {
            return Err(format!("holder exited with {status}").into());
        }
        Ok(())
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.child.kill().ok();
            self.child.wait().ok();
        }
    }
}

// ===== measuring =====

/// A config file under the temp directory, removed on drop.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        std::fs::remove_file(&self.0).ok();
    }
}

fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !cond() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    true
}

struct Sample {
    wall: Duration,
    cpu: Option<Duration>,
    /// Until the added connpt's port accepted (adds only).
    open: Option<Duration>,
}

/// Write `text`, reload, wait for the probe; with `new_port`, also time
/// until it accepts (the connection is closed again).
fn measure(
    file: &Path,
    text: &str,
    handle: &Handle,
    probe: RoleId,
    task: Option<&Path>,
    new_port: Option<SocketAddr>,
) -> Result<Sample> {
    std::fs::write(file, text)?;
    let cpu0 = task.and_then(task_cpu_ns);
    let t0 = Instant::now();
    handle.reload();
    let mut open = None;
    if let Some(addr) = new_port {
        let mut ok = false;
        while t0.elapsed() < WAIT {
            match TcpStream::connect(addr) {
                Ok(_) => {
                    ok = true;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                Err(e) => return Err(format!("connect to {addr}: {e}").into()),
            }
        }
        if !ok {
            return Err(format!("{addr} did not open").into());
        }
        open = Some(t0.elapsed());
    }
    settle(handle, probe)?;
    let wall = t0.elapsed();
    let cpu1 = task.and_then(task_cpu_ns);
    let cpu = cpu0
        .zip(cpu1)
        .map(|(a, b)| Duration::from_nanos(b.saturating_sub(a)));
    Ok(Sample { wall, cpu, open })
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// Median and worst of `samples` as text.
fn summary(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    let median = samples.get(samples.len() / 2).copied().unwrap_or_default();
    let worst = samples.last().copied().unwrap_or_default();
    (median, worst)
}

fn main() -> Result<()> {
    if std::env::var_os(HOLDER_ENV).is_some() {
        return holder();
    }
    let plan = Plan::new();
    println!(
        "reload ({} mode): RLIMIT_NOFILE {}; {} connpts with application ports, {} devices \
         online, {} of them with an application; {} rounds",
        if plan.quick { "quick" } else { "full" },
        plan.nofile,
        plan.connpts,
        plan.devices,
        plan.apps,
        plan.rounds
    );
    if plan.devices < 5_000 && !plan.quick {
        println!("  (fewer than 5,000 devices: that is what RLIMIT_NOFILE leaves)");
    }

    // The file, and what parsing it costs on its own.
    let ports = ports_below_ephemeral(plan.connpts + 2)?;
    let base = config_text(&ports, plan.connpts, false);
    let added = config_text(&ports, plan.connpts, true);
    let file = TempFile(std::env::temp_dir().join(format!(
        "switchboard-bench-reload-{}.toml",
        std::process::id()
    )));
    std::fs::write(&file.0, &base)?;
    // Times are this thread's CPU time (wall time where unavailable): a
    // busy machine stretches the wall time of anything on a shared CPU.
    let me = this_task();
    let cpu_now = || me.as_deref().and_then(task_cpu_ns);
    let timed = |f: &mut dyn FnMut() -> Result<()>| -> Result<Duration> {
        let (c0, t0) = (cpu_now(), Instant::now());
        f()?;
        Ok(match (c0, cpu_now()) {
            (Some(a), Some(b)) => Duration::from_nanos(b.saturating_sub(a)),
            _ => t0.elapsed(),
        })
    };
    let mut loads = Vec::new();
    let mut config = None;
    for _ in 0..plan.rounds.max(3) {
        loads.push(timed(&mut || {
            config = Some(Config::load(&file.0)?);
            Ok(())
        })?);
    }
    let config = config.ok_or("no config")?;
    let (load_median, load_worst) = summary(loads);
    println!(
        "Config::load of the {} KiB file: median {}, worst {} ({})",
        base.len() >> 10,
        ms(load_median),
        ms(load_worst),
        if me.is_some() {
            "CPU time"
        } else {
            "wall time"
        }
    );

    // Applying alone: `Engine::reload` called directly on a started engine
    // that is not running (no devices; the router's work per reload does
    // not depend on them).
    let added_config = Config::parse(&added)?;
    let mut engine = Engine::from_config(&config)?;
    engine.start()?;
    let (mut apply_same, mut apply_add, mut apply_remove) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..plan.rounds {
        for (config, out) in [
            (&config, &mut apply_same),
            (&added_config, &mut apply_add),
            (&config, &mut apply_remove),
        ] {
            out.push(timed(&mut || {
                engine.reload(config);
                Ok(())
            })?);
        }
    }
    drop(engine);
    drop(added_config);
    let apply: Vec<(&str, Duration)> = [
        ("same config", apply_same),
        ("one connpt added", apply_add),
        ("that connpt removed", apply_remove),
    ]
    .into_iter()
    .map(|(what, v)| (what, summary(v).0))
    .collect();
    println!(
        "Engine::reload alone (compare and apply, no parsing), median: {}",
        apply
            .iter()
            .map(|(what, d)| format!("{what} {}", ms(*d)))
            .collect::<Vec<_>>()
            .join(", ")
    );

    // The engine.
    let t0 = Instant::now();
    let mut engine = Engine::from_config(&config)?;
    drop(config);
    engine.watch_config(file.0.clone());
    let probe = engine.add_role(Box::new(Probe));
    engine.start()?;
    let handle = engine.handle();
    let listeners = engine.listeners();
    let (thread, task) = spawn_engine(engine)?;
    println!(
        "engine started with {} listeners in {}",
        listeners.len(),
        ms(t0.elapsed())
    );
    let devices_at = local(ports[0]);

    // The holder connects the applications, then the devices in batches.
    let t0 = Instant::now();
    let mut holder = Holder::spawn()?;
    holder.say(&format!("apps {devices_at} {} {}", plan.devices, plan.apps))?;
    for port in &ports[1..=plan.apps] {
        holder.say(&local(*port).to_string())?;
    }
    let a = holder.answer()?;
    if a != format!("apps {}", plan.apps) {
        return Err(format!("holder: {a}").into());
    }
    let accepted = |n: usize| {
        wait_until(WAIT, || handle.stats().accepted_total >= n as u64)
            .then_some(())
            .ok_or_else(|| format!("the engine accepted only {}", handle.stats().accepted_total))
    };
    accepted(plan.apps)?;
    for from in (0..plan.devices).step_by(500) {
        let to = (from + 500).min(plan.devices);
        holder.say(&format!("devices {from} {to}"))?;
        let a = holder.answer()?;
        if a != format!("devices {to}") {
            return Err(format!("holder: {a}").into());
        }
        accepted(plan.apps + to)?;
    }
    let first = holder.round("a")?;
    println!(
        "{} applications and {} devices online in {} (first round of messages: {first})",
        plan.apps,
        plan.devices,
        ms(t0.elapsed())
    );
    let before = handle.stats();

    // The reloads.
    let task_path = task.get().cloned();
    let task_path = task_path.as_deref();
    let new_port = local(ports[plan.connpts + 1]);
    let (mut same, mut add, mut remove, mut open) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in 0..plan.rounds {
        let s = measure(&file.0, &base, &handle, probe, task_path, None)?;
        same.push(s);
        let s = measure(&file.0, &added, &handle, probe, task_path, Some(new_port))?;
        open.push(s.open.unwrap_or_default());
        add.push(s);
        let s = measure(&file.0, &base, &handle, probe, task_path, None)?;
        remove.push(s);
        holder.round(&format!("r{r}"))?;
    }
    let last = holder.round("z")?;
    let after = handle.stats();
    // The only connections accepted meanwhile are the bench's to the added
    // port (closed when the connpt is removed again, or refused by the
    // kernel if the engine had not accepted one yet).
    let closed = after.closed_total - before.closed_total;
    let opened = after.accepted_total - before.accepted_total;

    println!();
    let mut met = true;
    for (what, samples) in [
        ("same file again", &same),
        ("one connpt added", &add),
        ("that connpt removed", &remove),
    ] {
        let (wall, wall_worst) = summary(samples.iter().map(|s| s.wall).collect());
        let cpu: Vec<Duration> = samples.iter().filter_map(|s| s.cpu).collect();
        let cpu_text = if cpu.is_empty() {
            met &= wall_worst < TARGET;
            "engine CPU n/a".to_owned()
        } else {
            let (c, c_worst) = summary(cpu);
            met &= c_worst < TARGET;
            format!("engine CPU median {}, worst {}", ms(c), ms(c_worst))
        };
        println!(
            "  {what:<20} reload -> loop done: median {}, worst {}; {cpu_text}",
            ms(wall),
            ms(wall_worst)
        );
    }
    let (o, o_worst) = summary(open);
    println!(
        "  new connpt's port accepting after Handle::reload: median {}, worst {}",
        ms(o),
        ms(o_worst)
    );
    println!(
        "  of which: Config::load (parse + validate) median {}; Engine::reload (compare + apply) \
         median {}",
        ms(load_median),
        apply
            .iter()
            .map(|(what, d)| format!("{} for {what}", ms(*d)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let kept = closed == opened;
    println!(
        "  connections closed by the engine during the reloads: {closed} (the {opened} the bench \
         opened to the added port that the engine accepted); last round of messages over all devices: {last}"
    );
    println!();
    println!(
        "loop time per reload with {} connpts and {} devices online: < {} {}",
        plan.connpts,
        plan.devices,
        ms(TARGET),
        if met { "MET" } else { "MISSED" }
    );
    println!(
        "no device dropped ({} devices, {} with an application, checked after every reload) {}",
        plan.devices,
        plan.apps,
        if kept { "MET" } else { "MISSED" }
    );

    holder.quit()?;
    handle.stop();
    if !wait_until(WAIT, || thread.is_finished()) {
        return Err("engine did not stop".into());
    }
    thread.join().map_err(|_| "engine thread panicked")??;
    Ok(())
}
