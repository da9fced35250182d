//! Any bytes through a `LineDecoder`: no panic, every frame is a bounded line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::codec::{Decoded, LineDecoder};

fuzz_target!(|data: &[u8]| {
    let mut decoder = LineDecoder::new(64);
    let mut rest = data;
    while let Ok(Decoded::Frame(frame, consumed)) = decoder.decode(rest) {
        assert!(consumed == frame.raw.len() && (1..=64).contains(&consumed));
        assert!(frame.raw.ends_with(b"\n") && !frame.payload.contains(&b'\n'));
        rest = &rest[consumed..];
    }
});
