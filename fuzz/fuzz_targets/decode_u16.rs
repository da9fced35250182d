//! Any bytes through a `u16` `LengthDecoder`: no panic, every frame is bounded.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::codec::{Decoded, LengthDecoder, LengthWidth};

fuzz_target!(|data: &[u8]| {
    let mut decoder = LengthDecoder::new(LengthWidth::U16, 256);
    let mut rest = data;
    while let Ok(Decoded::Frame(frame, consumed)) = decoder.decode(rest) {
        assert!(consumed == frame.raw.len() && consumed == frame.payload.len() + 2);
        assert!(frame.payload.len() <= 256);
        rest = &rest[consumed..];
    }
});
