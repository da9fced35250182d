//! A connection's receive path without a socket: the stream arrives in chunks
//! through a fixed-size buffer (append, decode until `NeedMore`, consume), and
//! must decode to the same frames and error as the whole stream at once, while
//! the buffer never needs more than one maximal frame (`header + max` bytes).
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::codec::{Decoded, Decoder, FrameError, Framing};

/// Input layout: these first bytes choose the run, the rest is the byte stream.
///
/// | offset | size | meaning                                             |
/// |--------|------|-----------------------------------------------------|
/// | 0      | 1    | framing: `% 3` → 0 line, 1 u16, 2 u32               |
/// | 1      | 1    | `max` in bytes (0..=255)                            |
/// | 2      | 4    | read sizes, each `byte + 1`, used in turn, cycling  |
const SETUP_LEN: usize = 6;

/// Owned `(raw, payload)` frames and the error that stopped decoding, if any.
type Outcome = (Vec<(Vec<u8>, Vec<u8>)>, Option<FrameError>);

fuzz_target!(|data: &[u8]| {
    let Some((setup, stream)) = data.split_first_chunk::<SETUP_LEN>() else {
        return;
    };
    let [kind, max, sizes @ ..] = *setup;
    let max = usize::from(max);
    let framing = match kind % 3 {
        0 => Framing::Line { max },
        1 => Framing::U16 { max },
        _ => Framing::U32 { max },
    };
    let sizes = sizes.map(|b| usize::from(b) + 1);
    assert_eq!(
        decode_chunked(framing, stream, &sizes),
        decode_whole(framing, stream)
    );
});

/// Decode `input` handed over in one piece.
fn decode_whole(framing: Framing, mut input: &[u8]) -> Outcome {
    let mut decoder = Decoder::new(framing);
    let mut frames = Vec::new();
    loop {
        match decoder.decode(input) {
            Ok(Decoded::Frame(frame, consumed)) => {
                frames.push((frame.raw.to_vec(), frame.payload.to_vec()));
                input = &input[consumed..];
            }
            Ok(Decoded::NeedMore) => return (frames, None),
            Err(e) => return (frames, Some(e)),
        }
    }
}

/// Decode `input` the way a connection receives it: reads of `sizes` bytes in
/// turn into a buffer of `header + max` bytes, decoding and consuming after each.
fn decode_chunked(framing: Framing, mut input: &[u8], sizes: &[usize]) -> Outcome {
    // `Line { max: 0 }` refuses the first byte, but it must be able to read one.
    let capacity = framing.max_encoded_len().unwrap_or(usize::MAX).max(1);
    let mut buf: Vec<u8> = Vec::with_capacity(capacity);
    let mut decoder = Decoder::new(framing);
    let mut frames = Vec::new();
    for &size in sizes.iter().cycle() {
        if input.is_empty() {
            break;
        }
        let room = capacity - buf.len();
        assert!(
            room > 0,
            "decoder wants more than {capacity} buffered bytes"
        );
        let (read, rest) = input.split_at(size.min(room).min(input.len()));
        buf.extend_from_slice(read);
        input = rest;
        loop {
            match decoder.decode(&buf) {
                Ok(Decoded::Frame(frame, consumed)) => {
                    assert!(consumed > 0 && consumed == frame.raw.len());
                    frames.push((frame.raw.to_vec(), frame.payload.to_vec()));
                    buf.drain(..consumed);
                }
                Ok(Decoded::NeedMore) => break,
                Err(e) => return (frames, Some(e)),
            }
        }
    }
    (frames, None)
}
