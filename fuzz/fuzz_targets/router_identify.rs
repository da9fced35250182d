//! The router's identification core (`switchboard::proto::router`) on any
//! reads and timer firings: no panic, and every outcome is consistent with
//! the bytes and the rules.
//!
//! Input: byte 0 picks the rules (delimiter or longest match, `id_max_len`),
//! then the rest is split at 0xff into reads; a read that starts with 0xfe is
//! instead a timer firing, its second byte the milliseconds since the last
//! event. The id table is fixed (those of its ids within `id_max_len`, as the
//! config requires): ids that are prefixes of each other, binary ids, and ids
//! that contain the delimiter's bytes.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use switchboard::proto::router::{Id, IdTable, Identifying, Outcome, Rules};

const IDS: &[&[u8]] = &[
    b"c01", b"c012", b"c0123", b"b9", b"dev1", b"dev10", b"\x00\x01", b"\r", b"a\rb", b"x",
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let rules = Rules {
        delimiter: match pick & 3 {
            0 | 1 => Vec::new(),
            2 => b"\r\n".to_vec(),
            _ => b"#".to_vec(),
        },
        max_len: 1 + usize::from(pick >> 2) % 12,
        gap: Duration::from_millis(20),
        timeout: Duration::from_millis(500),
    };
    // As the config allows: no id longer than id_max_len.
    let ids = IdTable::new(
        IDS.iter()
            .zip(0..)
            .filter(|(id, _)| id.len() <= rules.max_len)
            .filter_map(|(id, i)| Some((Id::new(id)?, i))),
    );
    let t0 = Instant::now();
    let mut now = t0;
    let mut dev = Identifying::new(&rules, now);
    let mut last_read = 0;
    for event in rest.split(|&b| b == 0xff) {
        let outcome = match event.split_first() {
            Some((0xfe, ms)) => {
                now += Duration::from_millis(u64::from(ms.first().copied().unwrap_or(0)));
                dev.timeout(&rules, &ids, now)
            }
            _ => {
                last_read = event.len();
                dev.push(&rules, &ids, event, now)
            }
        };
        let held = dev.bytes();
        // Bounded: no more than an id and a delimiter before the last read.
        assert!(held.len() <= rules.max_len + rules.delimiter.len() + last_read);
        assert!(dev.deadline() <= t0 + rules.timeout);
        match outcome {
            // Reads are decided as they come; only a timer firing times out.
            Outcome::Wait => {}
            Outcome::Identified { connpt, data_start } => {
                let id = IDS[connpt as usize];
                assert!(data_start <= held.len());
                assert!(held.starts_with(id), "{held:?} is not {id:?}");
                if rules.delimiter.is_empty() {
                    assert_eq!(data_start, id.len());
                } else {
                    assert_eq!(&held[id.len()..data_start], rules.delimiter.as_slice());
                }
                return;
            }
            Outcome::Unknown { id_end } => {
                assert!(id_end <= held.len());
                assert!(ids.get(&held[..id_end]).is_none());
                return;
            }
            Outcome::TimedOut => {
                assert!(now >= t0 + rules.timeout);
                return;
            }
        }
    }
});
