//! Logging that can neither stall the loop nor be steered by a peer:
//! [`LogSink`] hands each finished line to a writer thread through a bounded
//! queue (a full queue drops the line and counts it), [`Preview`] cuts and
//! escapes peer-supplied bytes, [`LogLimit`] lets one line of a kind through
//! per second and counts the rest.
//!
//! Invariant: the thread that logs never waits for the output (a pipe nobody
//! drains, a stalled terminal): at most [`LOG_QUEUE_LINES`] lines of at most
//! [`LOG_LINE_BYTES`] wait, and each reaches the output in one `write` call.
//! A peer decides neither the length of a line (at most [`PREVIEW_BYTES`] of
//! its bytes, escaped) nor how many lines it causes (one per kind per
//! [`LogLimit::INTERVAL`]). Allocation: one buffer per line logged (logging is
//! never on the per-message path); `Preview` and `LogLimit` allocate nothing.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Lines that may wait for the writer thread; more are dropped and counted.
pub const LOG_QUEUE_LINES: usize = 1024;
/// The longest line written; a longer one is cut and ends in `…`.
pub const LOG_LINE_BYTES: usize = 4096;

/// Lines dropped because the output could not take them in time.
static DROPPED: AtomicU64 = AtomicU64::new(0);
/// Lines handed to a writer thread and not yet written (or dropped by it).
static QUEUED: AtomicU64 = AtomicU64::new(0);

/// Log lines dropped so far by every [`LogSink`] in the process
/// (`switchboard_log_dropped_total`).
pub fn log_dropped_total() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Wait (at most `timeout`) until the writer threads have written every
/// queued line: for a process that is about to exit.
pub fn flush_logs(timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while QUEUED.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// An [`io::Write`] for a logger (simplelog's `WriteLogger`) that never
/// blocks: the pieces of a line are gathered, and the finished line (at its
/// `\n`) is queued for a writer thread that writes it to `out` with one
/// `write` call. When [`LOG_QUEUE_LINES`] lines are waiting, a new line is
/// dropped and counted ([`log_dropped_total`]).
#[derive(Debug)]
pub struct LogSink {
    line: Vec<u8>,
    queue: Arc<Queue>,
}

/// Lines waiting for the writer thread. The lock is held only to push or
/// pop a line, never while writing.
#[derive(Debug, Default)]
struct Queue {
    lines: Mutex<VecDeque<Vec<u8>>>,
    ready: Condvar,
}

impl LogSink {
    /// A sink writing to `out` from a new thread named `log`.
    ///
    /// # Errors
    /// The thread could not be started.
    pub fn new<W: Write + Send + 'static>(out: W) -> io::Result<LogSink> {
        let queue = Arc::new(Queue::default());
        let theirs = Arc::clone(&queue);
        std::thread::Builder::new()
            .name("log".into())
            .spawn(move || write_lines(&theirs, out))?;
        Ok(LogSink {
            line: Vec::with_capacity(256),
            queue,
        })
    }

    fn finish_line(&mut self) {
        if self.line.len() > LOG_LINE_BYTES {
            let mut cut = LOG_LINE_BYTES - "…\n".len();
            // Cut at a character boundary (continuation bytes are 10xxxxxx).
            while cut > 0 && self.line.get(cut).is_some_and(|b| b & 0xc0 == 0x80) {
                cut -= 1;
            }
            self.line.truncate(cut);
            self.line.extend_from_slice("…\n".as_bytes());
        }
        let line = std::mem::replace(&mut self.line, Vec::with_capacity(256));
        let Ok(mut lines) = self.queue.lines.lock() else {
            DROPPED.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if lines.len() >= LOG_QUEUE_LINES {
            DROPPED.fetch_add(1, Ordering::Relaxed);
            return;
        }
        QUEUED.fetch_add(1, Ordering::AcqRel);
        lines.push_back(line);
        drop(lines);
        self.queue.ready.notify_one();
    }
}

impl Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut rest = buf;
        while let Some(at) = rest.iter().position(|&b| b == b'\n') {
            let (head, tail) = rest.split_at(at + 1);
            self.push(head);
            self.finish_line();
            rest = tail;
        }
        self.push(rest);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl LogSink {
    /// Gather a piece of the current line (beyond [`LOG_LINE_BYTES`] plus a
    /// little, the rest of the line is discarded: it will be cut anyway).
    fn push(&mut self, piece: &[u8]) {
        let room = (LOG_LINE_BYTES + 1).saturating_sub(self.line.len());
        self.line
            .extend_from_slice(piece.get(..room.min(piece.len())).unwrap_or(piece));
    }
}

/// The writer thread: one `write_all` per line (one `write` call unless
/// the output takes part of it).
fn write_lines<W: Write>(queue: &Queue, mut out: W) {
    loop {
        let line = {
            let Ok(mut lines) = queue.lines.lock() else {
                return;
            };
            loop {
                if let Some(line) = lines.pop_front() {
                    break line;
                }
                lines = match queue.ready.wait(lines) {
                    Ok(l) => l,
                    Err(_) => return,
                };
            }
        };
        // Nowhere to report a failed log write: the line is lost.
        let _ = out.write_all(&line);
        QUEUED.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The most bytes of peer input shown in a log line.
pub const PREVIEW_BYTES: usize = 64;

/// Peer-supplied bytes shown in a log line: printable ASCII as it is, other
/// bytes as `\xNN` (quotes and backslashes escaped), at most
/// [`PREVIEW_BYTES`] of them, then `…` if there were more.
#[derive(Debug, Clone, Copy)]
pub struct Preview<'a>(pub &'a [u8]);

impl fmt::Display for Preview<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = self.0.get(..PREVIEW_BYTES).unwrap_or(self.0);
        let cut = self.0.len() > PREVIEW_BYTES;
        for &b in shown {
            match b {
                b'\\' => f.write_str("\\\\")?,
                b'\'' => f.write_str("\\'")?,
                b'"' => f.write_str("\\\"")?,
                0x20..=0x7e => fmt::Write::write_char(f, char::from(b))?,
                _ => write!(f, "\\x{b:02x}")?,
            }
        }
        if cut {
            f.write_str("…")?;
        }
        Ok(())
    }
}

/// One kind of warning that a peer can repeat: at most one line per
/// [`LogLimit::INTERVAL`]; the lines in between are counted, and the next
/// line that gets through says how many were suppressed ([`Suppressed`]).
///
/// ```
/// # use std::time::Instant;
/// # use switchboard::engine::LogLimit;
/// let mut refused = LogLimit::default();
/// let now = Instant::now();
/// assert_eq!(refused.check(now), Some(0)); // logged
/// assert_eq!(refused.check(now), None); // suppressed, counted
/// ```
#[derive(Debug, Default, Clone)]
pub struct LogLimit {
    next: Option<Instant>,
    suppressed: u64,
}

impl LogLimit {
    /// One line per kind per this long.
    pub const INTERVAL: Duration = Duration::from_secs(1);

    /// `Some(n)` if a line may be written now (`n` lines were suppressed
    /// since the last one); `None` if this one is suppressed (and counted).
    pub fn check(&mut self, now: Instant) -> Option<u64> {
        if self.next.is_some_and(|next| now < next) {
            self.suppressed = self.suppressed.saturating_add(1);
            return None;
        }
        self.next = Some(now + Self::INTERVAL);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// The tail of a rate-limited line: nothing, or ` (N similar lines suppressed)`.
#[derive(Debug, Clone, Copy)]
pub struct Suppressed(pub u64);

impl fmt::Display for Suppressed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            0 => Ok(()),
            1 => f.write_str(" (1 similar line suppressed)"),
            n => write!(f, " ({n} similar lines suppressed)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An output that takes nothing until it is opened, and records
    /// every write call.
    #[derive(Clone, Default)]
    struct Gate {
        open: Arc<std::sync::atomic::AtomicBool>,
        writes: Arc<Mutex<Vec<Vec<u8>>>>,
    }

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            while !self.open.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(1));
            }
            if let Ok(mut w) = self.writes.lock() {
                w.push(buf.to_vec());
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stuck_output_never_blocks_the_logger_and_lines_are_whole() {
        #![allow(clippy::unwrap_used, reason = "tests fail loudly")]
        let gate = Gate::default();
        let mut sink = LogSink::new(gate.clone()).unwrap();
        let before = log_dropped_total();
        let t0 = Instant::now();
        // Pieces as a logger writes them; far more lines than the queue holds.
        for i in 0..LOG_QUEUE_LINES + 500 {
            write!(sink, "2026-12-02 [WARN] ").unwrap();
            write!(sink, "line {i}").unwrap();
            sink.write_all(b"\n").unwrap();
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "the logger waited");
        // At most one line was taken by the (stuck) writer; the queue holds
        // the rest, and everything beyond was dropped and counted.
        let dropped = log_dropped_total() - before;
        assert!((499..=500).contains(&dropped), "{dropped} dropped");
        // A line longer than the limit is cut.
        sink.write_all(&vec![b'x'; 10_000]).unwrap();
        sink.write_all(b"\n").unwrap();
        gate.open.store(true, Ordering::Release);
        flush_logs(Duration::from_secs(10));
        let writes = gate.writes.lock().unwrap();
        assert!(writes.len() >= LOG_QUEUE_LINES, "{} lines", writes.len());
        for w in writes.iter() {
            assert!(w.ends_with(b"\n") && w.len() <= LOG_LINE_BYTES, "{w:?}");
            assert_eq!(w.iter().filter(|&&b| b == b'\n').count(), 1);
        }
        assert!(writes[0].starts_with(b"2026-12-02 [WARN] line 0\n"));
    }

    #[test]
    fn previews_are_cut_and_escaped() {
        assert_eq!(Preview(b"127.0.0.1:80").to_string(), "127.0.0.1:80");
        assert_eq!(
            Preview(b"a\"b'\\\n\xff").to_string(),
            "a\\\"b\\'\\\\\\x0a\\xff"
        );
        let long = [b'x'; 65_536];
        let shown = Preview(&long).to_string();
        assert_eq!(shown, format!("{}…", "x".repeat(PREVIEW_BYTES)));
        let exact = [b'y'; PREVIEW_BYTES];
        assert_eq!(Preview(&exact).to_string(), "y".repeat(PREVIEW_BYTES));
        assert_eq!(Preview(b"").to_string(), "");
    }

    #[test]
    fn one_line_per_interval_with_the_suppressed_count() {
        let t0 = Instant::now();
        let mut l = LogLimit::default();
        assert_eq!(l.check(t0), Some(0));
        for i in 1..=5 {
            assert_eq!(l.check(t0 + Duration::from_millis(i * 100)), None);
        }
        assert_eq!(l.check(t0 + LogLimit::INTERVAL), Some(5));
        assert_eq!(l.check(t0 + LogLimit::INTERVAL), None);
        assert_eq!(l.check(t0 + 3 * LogLimit::INTERVAL), Some(1));
        assert_eq!(Suppressed(0).to_string(), "");
        assert_eq!(Suppressed(3).to_string(), " (3 similar lines suppressed)");
    }
}
