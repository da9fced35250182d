//! Device identification for the router, sans IO: which connpt the first
//! bytes of a device name, decided from those bytes and the time alone.
//!
//! A device that connects sends its id first. With a delimiter (`id_delimiter`)
//! the id is what comes before it; without one, the longest configured id the
//! bytes start with, waiting `id_gap` when those bytes are a whole id and also
//! the start of a longer one. A device that sends nothing decidable within
//! `id_timeout` is timed out. [`Identifying`] holds one device's bytes and
//! deadlines; the role feeds it reads ([`Identifying::push`]) and its timer
//! ([`Identifying::timeout`], due at [`Identifying::deadline`]) and carries
//! out the [`Outcome`].
//!
//! Invariant: the bytes held never exceed `id_max_len` plus the delimiter
//! plus one read; every byte after the id is handed on (none is lost).
//!
//! Also here, the two per-read rules applied once a device is identified:
//! the heartbeat filter ([`is_heartbeat`]) and the id prefix strip
//! ([`strip_id`]).

use std::time::{Duration, Instant};

use hashbrown::HashMap;

/// The longest id a connpt can have (bytes).
pub const MAX_ID_LEN: usize = 64;

/// An id as inline bytes: no heap, fixed size ([`MAX_ID_LEN`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Id {
    len: u8,
    bytes: [u8; MAX_ID_LEN],
}

impl Id {
    /// `src` as an id; `None` if it is longer than [`MAX_ID_LEN`].
    pub fn new(src: &[u8]) -> Option<Id> {
        let mut bytes = [0; MAX_ID_LEN];
        bytes.get_mut(..src.len())?.copy_from_slice(src);
        Some(Id {
            len: src.len() as u8,
            bytes,
        })
    }

    /// The id's bytes.
    pub fn as_slice(&self) -> &[u8] {
        self.bytes.get(..usize::from(self.len)).unwrap_or_default()
    }
}

impl Default for Id {
    /// The empty id.
    fn default() -> Id {
        Id {
            len: 0,
            bytes: [0; MAX_ID_LEN],
        }
    }
}

impl std::fmt::Debug for Id {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Id({:?})", String::from_utf8_lossy(self.as_slice()))
    }
}

/// The configured ids of one router: exact lookup (O(1)) and "could these
/// bytes still become a longer id?" (a binary search over the sorted ids).
#[derive(Debug, Default)]
pub struct IdTable {
    by_id: HashMap<Id, u32>,
    /// Every id with its connpt, in byte order.
    sorted: Vec<(Id, u32)>,
}

impl IdTable {
    /// A table of `ids` (id, connpt); the first connpt of a repeated id wins.
    pub fn new(ids: impl IntoIterator<Item = (Id, u32)>) -> IdTable {
        let mut t = IdTable::default();
        for (id, connpt) in ids {
            t.by_id.entry(id).or_insert(connpt);
            t.sorted.push((id, connpt));
        }
        t.sorted
            .sort_unstable_by(|a, b| a.0.as_slice().cmp(b.0.as_slice()));
        t
    }

    /// Enter `id` for `connpt` (a reload adding one).
    pub fn insert(&mut self, id: Id, connpt: u32) {
        self.by_id.insert(id, connpt);
        let at = self
            .sorted
            .partition_point(|(i, _)| i.as_slice() <= id.as_slice());
        self.sorted.insert(at, (id, connpt));
    }

    /// Take `connpt`, known by `id`, out (a reload removing it).
    pub fn remove(&mut self, id: Id, connpt: u32) {
        if self.by_id.get(&id) == Some(&connpt) {
            self.by_id.remove(&id);
        }
        self.sorted.retain(|&(_, c)| c != connpt);
    }

    /// The connpt whose id is exactly `bytes`.
    pub fn get(&self, bytes: &[u8]) -> Option<u32> {
        Id::new(bytes).and_then(|id| self.by_id.get(&id).copied())
    }

    /// Whether some id is longer than `bytes` and starts with them.
    pub fn extendable(&self, bytes: &[u8]) -> bool {
        let at = self
            .sorted
            .partition_point(|(id, _)| id.as_slice() <= bytes);
        self.sorted
            .get(at)
            .is_some_and(|(id, _)| id.as_slice().starts_with(bytes))
    }
}

/// How ids are told apart (the router's `id_*` settings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// The id ends at this byte sequence (empty: by longest match).
    pub delimiter: Vec<u8>,
    /// The longest id a device may send.
    pub max_len: usize,
    /// How long to wait when the bytes so far are an id and the start of a
    /// longer one.
    pub gap: Duration,
    /// How long a device has to send its id.
    pub timeout: Duration,
}

/// What to do with a device, after its latest bytes or timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Not decided: wait for more bytes, or for [`Identifying::deadline`].
    Wait,
    /// The device is a connpt's.
    Identified {
        /// The connpt (as numbered in the [`IdTable`]).
        connpt: u32,
        /// Where the device's data starts in [`Identifying::bytes`] (bytes
        /// that came with the id).
        data_start: usize,
    },
    /// The id names no connpt.
    Unknown {
        /// The id is `bytes()[..id_end]`.
        id_end: usize,
    },
    /// Nothing decidable came within `Rules::timeout`.
    TimedOut,
}

/// One device that has not identified yet.
#[derive(Debug)]
pub struct Identifying {
    buf: Vec<u8>,
    id_deadline: Instant,
    /// Set while the bytes so far are an id and the start of a longer one.
    gap_deadline: Option<Instant>,
}

impl Identifying {
    /// A device connected at `now`.
    pub fn new(rules: &Rules, now: Instant) -> Identifying {
        Identifying {
            buf: Vec::new(),
            id_deadline: now + rules.timeout,
            gap_deadline: None,
        }
    }

    /// What the device has sent so far.
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// When [`Identifying::timeout`] is due: the id timeout, or the end of
    /// the gap if that comes first.
    pub fn deadline(&self) -> Instant {
        self.gap_deadline
            .map_or(self.id_deadline, |g| g.min(self.id_deadline))
    }

    /// The device sent `data` at `now`.
    pub fn push(&mut self, rules: &Rules, ids: &IdTable, data: &[u8], now: Instant) -> Outcome {
        self.buf.extend_from_slice(data);
        self.decide(rules, ids, false, now)
    }

    /// The deadline came (or the timer fired early: then nothing changes).
    pub fn timeout(&mut self, rules: &Rules, ids: &IdTable, now: Instant) -> Outcome {
        if now >= self.id_deadline {
            return Outcome::TimedOut;
        }
        if self.gap_deadline.is_some_and(|g| now >= g) {
            return self.decide(rules, ids, true, now);
        }
        Outcome::Wait
    }

    /// Decide from the bytes so far (`gap_over`: the gap has passed).
    fn decide(&mut self, rules: &Rules, ids: &IdTable, gap_over: bool, now: Instant) -> Outcome {
        let buf = &self.buf;
        let (id_end, data_start) = if rules.delimiter.is_empty() {
            let longest = (1..=buf.len().min(rules.max_len))
                .rev()
                .find(|&k| buf.get(..k).and_then(|b| ids.get(b)).is_some());
            let wait = buf.len() < rules.max_len && ids.extendable(buf) && !gap_over;
            match (longest, wait) {
                (Some(_), true) => {
                    // An id, and the start of a longer one: wait a little.
                    if self.gap_deadline.is_none() {
                        self.gap_deadline = Some(now + rules.gap);
                    }
                    return Outcome::Wait;
                }
                (None, true) => return Outcome::Wait,
                (Some(k), false) => (k, k),
                (None, false) => (buf.len(), buf.len()),
            }
        } else {
            match find(buf, &rules.delimiter) {
                Some(at) => (at, at + rules.delimiter.len()),
                None if buf.len() >= rules.max_len + rules.delimiter.len() => {
                    (buf.len(), buf.len())
                }
                None => return Outcome::Wait,
            }
        };
        match buf.get(..id_end).and_then(|id| ids.get(id)) {
            Some(connpt) => Outcome::Identified { connpt, data_start },
            None => Outcome::Unknown { id_end },
        }
    }
}

/// Where `needle` first occurs in `haystack` (never for an empty needle).
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Whether a read is a heartbeat: one or more whole repetitions of `pattern`.
pub fn is_heartbeat(data: &[u8], pattern: &[u8]) -> bool {
    !data.is_empty()
        && !pattern.is_empty()
        && data.len().is_multiple_of(pattern.len())
        && data.chunks(pattern.len()).all(|c| c == pattern)
}

/// A read without the device's id in front of it (`strip_prefix`), if it has
/// one there.
pub fn strip_id<'a>(data: &'a [u8], id: &[u8]) -> &'a [u8] {
    data.strip_prefix(id).unwrap_or(data)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::panic, clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn table(ids: &[&str]) -> IdTable {
        IdTable::new(
            ids.iter()
                .enumerate()
                .map(|(i, id)| (Id::new(id.as_bytes()).unwrap(), i as u32)),
        )
    }

    fn rules(delimiter: &str) -> Rules {
        Rules {
            delimiter: delimiter.as_bytes().to_vec(),
            max_len: 8,
            gap: Duration::from_millis(50),
            timeout: Duration::from_secs(10),
        }
    }

    const IDS: &[&str] = &["c01", "c012", "b9", "dev1", "dev10"];

    /// Reads of one device, in order, all at t0, and the outcome after the
    /// last; `Identified`'s connpt is an index into `IDS`.
    #[test]
    fn identification_table() {
        use Outcome::*;
        let cases: &[(&str, &[&str], Outcome)] = &[
            // Longest match, decided at once.
            (
                "",
                &["b9"],
                Identified {
                    connpt: 2,
                    data_start: 2,
                },
            ),
            (
                "",
                &["b9hello"],
                Identified {
                    connpt: 2,
                    data_start: 2,
                },
            ),
            (
                "",
                &["c012"],
                Identified {
                    connpt: 1,
                    data_start: 4,
                },
            ),
            (
                "",
                &["c012xyz"],
                Identified {
                    connpt: 1,
                    data_start: 4,
                },
            ),
            // An id that is the start of a longer one: wait for the gap.
            ("", &["c01"], Wait),
            ("", &["dev1"], Wait),
            // More bytes that rule the longer id out decide it.
            (
                "",
                &["c01", "x"],
                Identified {
                    connpt: 0,
                    data_start: 3,
                },
            ),
            (
                "",
                &["dev1", "0"],
                Identified {
                    connpt: 4,
                    data_start: 5,
                },
            ),
            (
                "",
                &["dev1", "!"],
                Identified {
                    connpt: 3,
                    data_start: 4,
                },
            ),
            // A prefix of ids only: wait; bytes no id starts with: unknown.
            ("", &["c"], Wait),
            ("", &["de", "v"], Wait),
            ("", &["zz"], Unknown { id_end: 2 }),
            ("", &["c0x"], Unknown { id_end: 3 }),
            // Longer than max_len and still extendable cannot happen; a
            // long run of bytes is unknown as a whole.
            ("", &["xxxxxxxxxxxx"], Unknown { id_end: 12 }),
            // Delimited: the id is what comes before the delimiter.
            (
                "\r\n",
                &["b9\r\ndata"],
                Identified {
                    connpt: 2,
                    data_start: 4,
                },
            ),
            (
                "\r\n",
                &["c01\r\n"],
                Identified {
                    connpt: 0,
                    data_start: 5,
                },
            ),
            (
                "\r\n",
                &["c0", "1\r", "\n"],
                Identified {
                    connpt: 0,
                    data_start: 5,
                },
            ),
            ("\r\n", &["c01"], Wait),
            ("\r\n", &["nope\r\n"], Unknown { id_end: 4 }),
            // No delimiter within max_len + its length: unknown as a whole.
            ("\r\n", &["0123456789"], Unknown { id_end: 10 }),
            ("\r\n", &["012345678"], Wait),
        ];
        let t0 = Instant::now();
        let ids = table(IDS);
        for (delim, reads, want) in cases {
            let r = rules(delim);
            let mut dev = Identifying::new(&r, t0);
            let mut got = Wait;
            for read in *reads {
                got = dev.push(&r, &ids, read.as_bytes(), t0);
            }
            assert_eq!(got, *want, "delimiter {delim:?}, reads {reads:?}");
        }
    }

    #[test]
    fn the_gap_decides_for_the_shorter_id_when_nothing_more_comes() {
        let (r, ids, t0) = (rules(""), table(IDS), Instant::now());
        let mut dev = Identifying::new(&r, t0);
        assert_eq!(dev.push(&r, &ids, b"c01", t0), Outcome::Wait);
        assert_eq!(dev.deadline(), t0 + r.gap);
        // Early: nothing changes. More bytes later do not restart the gap.
        assert_eq!(dev.timeout(&r, &ids, t0 + r.gap / 2), Outcome::Wait);
        let want = Outcome::Identified {
            connpt: 0,
            data_start: 3,
        };
        assert_eq!(dev.timeout(&r, &ids, t0 + r.gap), want);
    }

    #[test]
    fn a_silent_or_undecided_device_times_out() {
        let (r, ids, t0) = (rules("\r\n"), table(IDS), Instant::now());
        let mut dev = Identifying::new(&r, t0);
        assert_eq!(dev.deadline(), t0 + r.timeout);
        assert_eq!(dev.push(&r, &ids, b"c0", t0), Outcome::Wait);
        let late = t0 + r.timeout - Duration::from_millis(1);
        assert_eq!(dev.timeout(&r, &ids, late), Outcome::Wait);
        assert_eq!(dev.timeout(&r, &ids, t0 + r.timeout), Outcome::TimedOut);
        assert_eq!(dev.bytes(), b"c0");
    }

    #[test]
    fn the_gap_never_outlasts_the_id_timeout() {
        let mut r = rules("");
        r.gap = r.timeout * 2;
        let (ids, t0) = (table(IDS), Instant::now());
        let mut dev = Identifying::new(&r, t0);
        assert_eq!(dev.push(&r, &ids, b"dev1", t0), Outcome::Wait);
        assert_eq!(dev.deadline(), t0 + r.timeout);
        assert_eq!(dev.timeout(&r, &ids, t0 + r.timeout), Outcome::TimedOut);
    }

    #[test]
    fn the_table_follows_reloads() {
        let mut ids = table(&["a1", "b2"]);
        assert!(ids.extendable(b"a") && !ids.extendable(b"a1"));
        ids.insert(Id::new(b"a12").unwrap(), 7);
        assert!(ids.extendable(b"a1"));
        assert_eq!(ids.get(b"a12"), Some(7));
        ids.remove(Id::new(b"a1").unwrap(), 0);
        assert_eq!(ids.get(b"a1"), None);
        assert_eq!(ids.get(b"a12"), Some(7));
        assert!(ids.extendable(b"a1"), "a12 is still there");
        assert!(!ids.extendable(b"b2") && ids.extendable(b"b"));
    }

    #[test]
    fn heartbeats_are_whole_repetitions_only() {
        assert!(is_heartbeat(b"\xfe", b"\xfe"));
        assert!(is_heartbeat(b"HBHBHB", b"HB"));
        assert!(!is_heartbeat(b"HBH", b"HB"));
        assert!(!is_heartbeat(b"HBxx", b"HB"));
        assert!(!is_heartbeat(b"", b"HB"));
        assert!(!is_heartbeat(b"HB", b""));
    }

    #[test]
    fn the_id_is_stripped_only_from_the_front() {
        assert_eq!(strip_id(b"dev1:42", b"dev1"), b":42");
        assert_eq!(strip_id(b"x dev1", b"dev1"), b"x dev1");
        assert_eq!(strip_id(b"dev1", b"dev1"), b"");
    }

    #[test]
    fn ids_are_inline_and_bounded() {
        assert_eq!(Id::new(b"c0001").unwrap().as_slice(), b"c0001");
        assert!(Id::new(&[0; MAX_ID_LEN + 1]).is_none());
        assert!(find(b"c0001\r\ndata", b"\r\n") == Some(5));
        assert!(find(b"c0001\r", b"\r\n").is_none());
        assert!(find(b"abc", b"").is_none());
    }
}
