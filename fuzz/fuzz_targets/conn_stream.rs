//! A connection's receive path without a socket: the stream arrives in chunks
//! through a fixed-size buffer (append, decode until `NeedMore`, consume), and
//! must decode to the same frames, skips and error as the whole stream at once,
//! while the buffer never needs more than one maximal frame (`header + max`
//! bytes), also while an over-long line is being dropped.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::codec::{Decoded, Decoder, FrameError, Framing};

/// Input layout: these first bytes choose the run, the rest is the byte stream.
///
/// | offset | size | meaning                                             |
/// |--------|------|-----------------------------------------------------|
/// | 0      | 1    | framing: `% 3` → 0 line, 1 u16, 2 u32; `/ 3 % 2` → 1 resync after `TooLong` (only line framing accepts) |
/// | 1      | 1    | `max` in bytes (0..=255)                            |
/// | 2      | 4    | read sizes, each `byte + 1`, used in turn, cycling  |
const SETUP_LEN: usize = 6;

/// What the stream decoded to, in order.
#[derive(Debug, PartialEq, Eq)]
enum Event {
    /// An owned `(raw, payload)` frame.
    Frame(Vec<u8>, Vec<u8>),
    /// One resynchronisation and the bytes it dropped: the sum of its
    /// `Skipped` counts, since how they split between calls depends on the
    /// chunking (the sum does not: the line up to and including its `\n`).
    Resync(usize),
}

/// The events and the error that stopped decoding, if any.
type Outcome = (Vec<Event>, Option<FrameError>);

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
    let resync = kind / 3 % 2 == 1;
    let sizes = sizes.map(|b| usize::from(b) + 1);
    assert_eq!(
        decode_chunked(framing, resync, stream, &sizes),
        decode_whole(framing, resync, stream)
    );
});

/// Handle one `decode` result: record it, and return the bytes to consume,
/// or `None` for `NeedMore`; `Err` when decoding stops for good.
fn step(
    decoder: &mut Decoder,
    resync: bool,
    result: Result<Decoded<'_>, FrameError>,
    events: &mut Vec<Event>,
) -> Result<Option<usize>, FrameError> {
    match result {
        Ok(Decoded::Frame(frame, consumed)) => {
            assert!(consumed > 0 && consumed == frame.raw.len());
            events.push(Event::Frame(frame.raw.to_vec(), frame.payload.to_vec()));
            Ok(Some(consumed))
        }
        Ok(Decoded::Skipped(n)) => {
            let Some(Event::Resync(dropped)) = events.last_mut() else {
                panic!("Skipped without a resync");
            };
            assert!(n > 0);
            *dropped += n;
            Ok(Some(n))
        }
        Ok(Decoded::NeedMore) => Ok(None),
        Err(e) if resync && decoder.resync() => {
            assert!(events.last() != Some(&Event::Resync(0)), "{e} twice");
            events.push(Event::Resync(0));
            Ok(Some(0))
        }
        Err(e) => Err(e),
    }
}

/// Decode `input` handed over in one piece.
fn decode_whole(framing: Framing, resync: bool, mut input: &[u8]) -> Outcome {
    let mut decoder = Decoder::new(framing);
    let mut events = Vec::new();
    loop {
        let result = decoder.decode(input);
        match step(&mut decoder, resync, result, &mut events) {
            Ok(Some(consumed)) => input = &input[consumed..],
            Ok(None) => return (events, None),
            Err(e) => return (events, Some(e)),
        }
    }
}

/// Decode `input` the way a connection receives it: reads of `sizes` bytes in
/// turn into a buffer of `header + max` bytes, decoding and consuming after each.
fn decode_chunked(framing: Framing, resync: bool, mut input: &[u8], sizes: &[usize]) -> Outcome {
    // `Line { max: 0 }` refuses the first byte, but it must be able to read one.
    let capacity = framing.max_encoded_len().unwrap_or(usize::MAX).max(1);
    let mut buf: Vec<u8> = Vec::with_capacity(capacity);
    let mut decoder = Decoder::new(framing);
    let mut events = Vec::new();
    for &size in sizes.iter().cycle() {
        if input.is_empty() {
            break;
        }
        let room = capacity - buf.len();
        let (read, rest) = input.split_at(size.min(room).min(input.len()));
        buf.extend_from_slice(read);
        input = rest;
        loop {
            let result = decoder.decode(&buf);
            match step(&mut decoder, resync, result, &mut events) {
                Ok(Some(consumed)) => drop(buf.drain(..consumed)),
                Ok(None) => break,
                Err(e) => return (events, Some(e)),
            }
        }
        // Waiting for more input with a full buffer would wait forever, and
        // junk being dropped must never pile up.
        assert!(
            buf.len() < capacity,
            "decoder wants more than {capacity} buffered bytes"
        );
    }
    (events, None)
}
