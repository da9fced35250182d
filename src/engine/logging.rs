//! Log lines a remote peer can cause, kept bounded: [`Preview`] cuts and
//! escapes peer-supplied bytes, [`LogLimit`] lets one line of a kind through
//! per second and counts the rest.
//!
//! Invariant: a peer decides neither the length of a line (at most
//! [`PREVIEW_BYTES`] of its bytes, escaped) nor how many lines it causes (one
//! per kind per [`LogLimit::INTERVAL`], plus a count of the suppressed ones).
//! Allocation: none; `Preview` writes straight into the formatter.

use std::fmt;
use std::time::{Duration, Instant};

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
