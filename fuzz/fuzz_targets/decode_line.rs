//! Any bytes through a `LineDecoder` that resynchronises after every over-long
//! line: no panic, every frame is a bounded line, every skip ends at a `\n` or
//! takes all the input, and the whole input is consumed except a short tail.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::codec::{Decoded, FrameError, LineDecoder};

const MAX: usize = 64;

fuzz_target!(|data: &[u8]| {
    let mut decoder = LineDecoder::new(MAX);
    let mut rest = data;
    let mut discarding = false;
    loop {
        match decoder.decode(rest) {
            Ok(Decoded::Frame(frame, consumed)) => {
                assert!(!discarding && consumed == frame.raw.len());
                assert!((1..=MAX).contains(&consumed));
                assert!(frame.raw.ends_with(b"\n") && !frame.payload.contains(&b'\n'));
                rest = &rest[consumed..];
            }
            Ok(Decoded::Skipped(n)) => {
                assert!(discarding && (1..=rest.len()).contains(&n));
                let (dropped, tail) = rest.split_at(n);
                let (last, body) = dropped.split_last().unwrap();
                assert!(!body.contains(&b'\n'));
                discarding = *last != b'\n';
                assert!(!discarding || tail.is_empty());
                rest = tail;
            }
            Ok(Decoded::NeedMore) => {
                assert!(rest.is_empty() || (!discarding && rest.len() < MAX));
                assert!(!rest.contains(&b'\n'));
                break;
            }
            Err(FrameError::TooLong { len, max }) => {
                assert!(!discarding && (len, max) == (MAX + 1, MAX));
                assert!(rest.len() >= MAX && !rest[..MAX].contains(&b'\n'));
                decoder.resync();
                discarding = true;
            }
        }
    }
});
