//! Line framing: frames end in `\n`; a `\r` before it is stripped from the payload.
//!
//! Invariant: no line longer than `max` bytes (terminator included) is ever
//! buffered, and each input byte is scanned for `\n` once, however the input is
//! chunked (the scan offset survives `NeedMore`). After [`LineDecoder::resync`]
//! an over-long line is dropped as it arrives, so it is not buffered either.
//! Allocation: none.
#![deny(clippy::indexing_slicing)]

use bytes::BufMut;

use super::{Decoded, EncodeError, Frame, FrameError, check_space};

/// Decoder for `\n`-terminated lines of at most `max` bytes, terminator included.
///
/// Wire layout of one line of `n` bytes (`n <= max`):
///
/// | offset    | size    | field                                   |
/// |-----------|---------|-----------------------------------------|
/// | 0         | `n - 1` | payload, no `\n` (a final `\r` is kept on the wire, dropped from the payload) |
/// | `n - 1`   | 1       | `\n`                                    |
///
/// `max` of 0 accepts no line at all: the first byte is [`FrameError::TooLong`].
///
/// A line longer than `max` is [`FrameError::TooLong`]; the caller either
/// closes the connection or calls [`LineDecoder::resync`] to drop that line and
/// carry on with the next one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineDecoder {
    /// Longest accepted line in bytes, terminator included.
    max: usize,
    /// Bytes of the pending line already scanned without finding `\n`
    /// (tokio-util `LinesCodec::next_index`).
    next_index: usize,
    /// Dropping an over-long line up to and including its `\n` (tokio-util
    /// `LinesCodec::is_discarding`); set by [`LineDecoder::resync`].
    discarding: bool,
}

// ===== impl LineDecoder =====

impl LineDecoder {
    /// A decoder that accepts lines of up to `max` bytes, terminator included.
    pub fn new(max: usize) -> LineDecoder {
        LineDecoder {
            max,
            next_index: 0,
            discarding: false,
        }
    }

    /// The longest accepted line in bytes, terminator included.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Decode the next line from `src`, the caller's unconsumed bytes.
    ///
    /// Only `src[..max]` is examined: a line ends within the first `max` bytes
    /// or not at all. Bytes scanned by an earlier call that returned
    /// [`Decoded::NeedMore`] are not scanned again, so the caller must pass the
    /// same bytes again, followed by any new ones.
    ///
    /// After [`LineDecoder::resync`], the over-long line is dropped instead:
    /// [`Decoded::Skipped`]`(n)` up to and including its `\n` (and the call
    /// after that decodes normally), or, while no `\n` has arrived, all of
    /// `src`; [`Decoded::NeedMore`] only for an empty `src`. The caller
    /// consumes the `n` bytes like a frame's.
    ///
    /// # Errors
    /// [`FrameError::TooLong`] with `len: max + 1` (the least the line can be)
    /// as soon as `src` holds `max` bytes and none of them is `\n`.
    pub fn decode<'a>(&mut self, src: &'a [u8]) -> Result<Decoded<'a>, FrameError> {
        if self.discarding {
            return Ok(self.skip(src));
        }
        // The line must end within the first `max` bytes; never look further.
        let window = src.get(..self.max).unwrap_or(src);
        let start = self.next_index.min(window.len());
        let unscanned = window.get(start..).unwrap_or_default();
        let Some(offset) = unscanned.iter().position(|&b| b == b'\n') else {
            self.next_index = window.len();
            if !src.is_empty() && src.len() >= self.max {
                let len = self.max.saturating_add(1);
                return Err(FrameError::TooLong { len, max: self.max });
            }
            return Ok(Decoded::NeedMore);
        };
        self.next_index = 0;
        // `start + offset` indexes the `\n` inside `window`, so neither sum overflows.
        let consumed = start + offset + 1;
        let (raw, _) = src.split_at_checked(consumed).unwrap_or((src, &[]));
        let line = raw.strip_suffix(b"\n").unwrap_or(raw);
        let payload = line.strip_suffix(b"\r").unwrap_or(line);
        Ok(Decoded::Frame(Frame { raw, payload }, raw.len()))
    }

    /// Drop the line that made `decode` return [`FrameError::TooLong`] and
    /// carry on with the next one: the following calls return
    /// [`Decoded::Skipped`] up to and including the line's `\n`. Call it right
    /// after the error, then call `decode` again with the same bytes.
    pub fn resync(&mut self) {
        self.discarding = true;
    }

    /// Forget the scan offset and any resynchronisation in progress, for
    /// example when the caller discarded its buffer.
    pub fn reset(&mut self) {
        self.next_index = 0;
        self.discarding = false;
    }

    /// While discarding: find the over-long line's `\n` and drop up to it, or
    /// drop all of `src`. `src[..next_index]` (the `max` bytes that made the
    /// line too long) is known to hold no `\n`, so scanning starts after it;
    /// every later call starts at 0, because each `Skipped` takes everything
    /// scanned.
    fn skip<'a>(&mut self, src: &'a [u8]) -> Decoded<'a> {
        let start = self.next_index.min(src.len());
        let unscanned = src.get(start..).unwrap_or_default();
        self.next_index = 0;
        match unscanned.iter().position(|&b| b == b'\n') {
            // `start + offset` indexes the `\n` inside `src`, so the sum cannot overflow.
            Some(offset) => {
                self.discarding = false;
                Decoded::Skipped(start + offset + 1)
            }
            None if src.is_empty() => Decoded::NeedMore,
            None => Decoded::Skipped(src.len()),
        }
    }

    /// Bytes a payload of `payload_len` bytes occupies as a line (`payload_len + 1`
    /// for the `\n`); `None` if that overflows `usize`.
    pub fn encoded_len(payload_len: usize) -> Option<usize> {
        payload_len.checked_add(1)
    }

    /// Append `payload` and `\n` to `dst`.
    ///
    /// # Errors
    /// Nothing is written when:
    /// - [`EncodeError::Delimiter`]: `payload` contains `\n` or ends in `\r`, so the
    ///   peer would not decode it back to `payload`;
    /// - [`EncodeError::TooLong`]: the line, `\n` included, exceeds `max`
    ///   (`len` is the encoded length);
    /// - [`EncodeError::NoSpace`]: `dst` has less room than the line.
    pub fn encode(&self, payload: &[u8], dst: &mut impl BufMut) -> Result<(), EncodeError> {
        if payload.contains(&b'\n') || payload.ends_with(b"\r") {
            return Err(EncodeError::Delimiter);
        }
        let len = LineDecoder::encoded_len(payload.len()).ok_or(EncodeError::TooLong {
            len: usize::MAX,
            max: self.max,
        })?;
        if len > self.max {
            return Err(EncodeError::TooLong { len, max: self.max });
        }
        check_space(len, dst)?;
        dst.put_slice(payload);
        dst.put_u8(b'\n');
        Ok(())
    }
}

#[cfg(test)]
#[allow(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a panic is a failed test, and fixtures are indexed directly"
)]
mod tests {
    use proptest::prelude::*;

    use super::super::tests::{
        Outcome, Stream, check_byte_at_a_time, check_byte_at_a_time_with, check_every_split,
        check_every_split_with, chunk_iter, decode_whole, decode_whole_with,
    };
    use super::*;
    use crate::codec::{Decoder, Framing};

    /// Three lines: LF, CRLF, and an empty CRLF line.
    static LINES: [u8; 15] = *b"abc\nde\r\n\r\nfghi\n";
    static LINES_PAYLOADS: [&[u8]; 4] = [b"abc", b"de", b"", b"fghi"];

    const MAX: usize = 8;

    fn line(max: usize) -> Framing {
        Framing::Line { max }
    }

    fn payloads(outcome: &Outcome) -> Vec<&[u8]> {
        outcome.frames.iter().map(|(_, p)| p.as_slice()).collect()
    }

    const TOO_LONG: FrameError = FrameError::TooLong {
        len: MAX + 1,
        max: MAX,
    };

    /// Decode `input` with resync whole, split at every byte and byte by byte;
    /// check that exactly `expected` lines come out, that no byte of an
    /// over-long line (all `X`, which good lines never contain) does, and
    /// that every input byte is consumed by a line or a skip. Returns the
    /// one-shot outcome.
    fn check_resync(input: &[u8], expected: &[&[u8]]) -> Outcome {
        let out = decode_whole_with(line(MAX), true, input);
        assert_eq!(payloads(&out), expected, "{:?}", input.escape_ascii());
        assert!(out.frames.iter().all(|(raw, _)| !raw.contains(&b'X')));
        assert_eq!((out.error, out.rest), (None, 0));
        check_every_split_with(line(MAX), true, input);
        check_byte_at_a_time_with(line(MAX), true, input);
        out
    }

    #[test]
    fn decodes_lf_and_crlf_lines() {
        let out = decode_whole(line(MAX), &LINES);
        assert_eq!(payloads(&out), LINES_PAYLOADS);
        let raws: Vec<&[u8]> = out.frames.iter().map(|(r, _)| r.as_slice()).collect();
        assert_eq!(raws, [&b"abc\n"[..], b"de\r\n", b"\r\n", b"fghi\n"]);
        assert_eq!(out.error, None);
        assert_eq!(out.rest, 0);
    }

    #[test]
    fn frame_borrows_from_src_and_reports_consumed() {
        let mut d = LineDecoder::new(MAX);
        let Ok(Decoded::Frame(frame, consumed)) = d.decode(&LINES) else {
            panic!("expected a frame");
        };
        assert_eq!(consumed, 4);
        assert_eq!(frame.raw, b"abc\n");
        assert_eq!(frame.payload, b"abc");
        assert!(std::ptr::eq(frame.raw.as_ptr(), LINES.as_ptr()));
    }

    #[test]
    fn lone_cr_is_payload() {
        let out = decode_whole(line(MAX), b"a\rb\n\r\r\n");
        assert_eq!(payloads(&out), [&b"a\rb"[..], b"\r"]);
    }

    #[test]
    fn every_split_and_byte_at_a_time() {
        for input in [
            &LINES[..],
            b"",
            b"\n",
            b"\r\n",
            b"no newline",
            b"1234567\n",
            b"12345678\n",
            b"abc\n12345678",
        ] {
            check_every_split(line(MAX), input);
            check_byte_at_a_time(line(MAX), input);
        }
    }

    #[test]
    fn truncated_line_needs_more() {
        let mut d = LineDecoder::new(MAX);
        assert_eq!(d.decode(b""), Ok(Decoded::NeedMore));
        assert_eq!(d.decode(b"abc"), Ok(Decoded::NeedMore));
        assert_eq!(d.decode(b"abc\r"), Ok(Decoded::NeedMore));
        let out = decode_whole(line(MAX), b"abc\nde\r");
        assert_eq!(payloads(&out), [b"abc"]);
        assert_eq!(out.rest, 3);
    }

    #[test]
    fn max_minus_one_max_and_max_plus_one() {
        // `max` counts the terminator: 7 + "\n" is exactly MAX.
        let out = decode_whole(line(MAX), b"123456\n");
        assert_eq!(payloads(&out), [b"123456"]);
        let out = decode_whole(line(MAX), b"1234567\n");
        assert_eq!(payloads(&out), [b"1234567"]);
        let out = decode_whole(line(MAX), b"123456\r\n");
        assert_eq!(payloads(&out), [b"123456"]);
        let too_long = FrameError::TooLong {
            len: MAX + 1,
            max: MAX,
        };
        let out = decode_whole(line(MAX), b"12345678\n");
        assert_eq!(out.frames, []);
        assert_eq!(out.error, Some(too_long));
        let out = decode_whole(line(MAX), b"1234567\r\n");
        assert_eq!(out.error, Some(too_long));
    }

    #[test]
    fn too_long_as_soon_as_max_bytes_hold_no_newline() {
        let mut d = LineDecoder::new(MAX);
        assert_eq!(d.decode(b"1234567"), Ok(Decoded::NeedMore));
        let too_long = Err(FrameError::TooLong {
            len: MAX + 1,
            max: MAX,
        });
        assert_eq!(d.decode(b"12345678"), too_long);
        // A newline past `max` does not rescue the line.
        assert_eq!(LineDecoder::new(MAX).decode(b"12345678\n"), too_long);
        assert_eq!(LineDecoder::new(MAX).decode(b"123456789abc\n"), too_long);
    }

    #[test]
    fn zero_max_accepts_nothing() {
        let mut d = LineDecoder::new(0);
        assert_eq!(d.decode(b""), Ok(Decoded::NeedMore));
        assert_eq!(d.decode(b"\n"), Err(FrameError::TooLong { len: 1, max: 0 }));
    }

    #[test]
    fn scan_offset_resumes_and_resets() {
        let mut d = LineDecoder::new(MAX);
        assert_eq!(d.decode(b"abc"), Ok(Decoded::NeedMore));
        assert_eq!(d.next_index, 3);
        assert!(matches!(d.decode(b"abcd\nx"), Ok(Decoded::Frame(_, 5))));
        assert_eq!(d.next_index, 0);
        assert_eq!(d.decode(b"xy"), Ok(Decoded::NeedMore));
        d.reset();
        assert_eq!(d.next_index, 0);
        // A caller that breaks the contract with shorter input gets no panic.
        assert_eq!(d.decode(b"xy"), Ok(Decoded::NeedMore));
        let mut d = LineDecoder::new(MAX);
        assert_eq!(d.decode(b"abcdef"), Ok(Decoded::NeedMore));
        assert_eq!(d.decode(b"a\n"), Ok(Decoded::NeedMore));
    }

    #[test]
    fn resync_drops_long_lines_and_keeps_good_ones() {
        let out = check_resync(b"ab\nXXXXXXXXXXXX\ncd\r\nef\n", &[b"ab", b"cd", b"ef"]);
        assert_eq!(out.skipped, [(1, 13)]);
        let out = check_resync(b"XXXXXXXXX\nab\n", &[b"ab"]);
        assert_eq!(out.skipped, [(0, 10)]);
        // Two in a row, one much longer than the buffer, then an empty line.
        let out = check_resync(
            b"XXXXXXXX\nXXXXXXXXXXXXXXXXXXXXXXXXX\n\nok\n",
            &[b"", b"ok"],
        );
        assert_eq!(out.skipped, [(0, 9), (0, 26)]);
        let out = check_resync(b"a\nXXXXXXXX\nb\nXXXXXXXXXX\nc\n", &[b"a", b"b", b"c"]);
        assert_eq!(out.skipped, [(1, 9), (2, 11)]);
    }

    #[test]
    fn resync_long_line_at_the_end_keeps_being_skipped() {
        let out = check_resync(b"ab\nXXXXXXXXXXXXXXX", &[b"ab"]);
        assert_eq!(out.skipped, [(1, 15)]);
        let mut stream = Stream::with_resync(line(MAX), true);
        stream.feed(b"ab\nXXXXXXX");
        assert_eq!((stream.buffered(), stream.skipped()), (7, &[][..]));
        stream.feed(b"X");
        assert_eq!((stream.buffered(), stream.skipped()), (0, &[(1, 8)][..]));
        for (chunk, dropped) in [(&b"XXX"[..], 11), (b"X", 12), (b"XX\r", 15)] {
            stream.feed(chunk);
            assert_eq!(stream.buffered(), 0, "nothing buffered while discarding");
            assert_eq!(stream.skipped(), [(1, dropped)]);
        }
        stream.feed(b"\ncd");
        assert_eq!((stream.buffered(), stream.skipped()), (2, &[(1, 16)][..]));
        stream.feed(b"\r\n");
        let out = stream.finish();
        assert_eq!(payloads(&out), [b"ab", b"cd"]);
        assert_eq!((out.error, out.rest), (None, 0));
    }

    #[test]
    fn resync_max_minus_one_max_and_max_plus_one() {
        // 7 and 8 (= MAX) bytes are lines, 9 is dropped; the same with CRLF.
        let out = check_resync(
            b"123456\n1234567\n12345678\nok\n",
            &[b"123456", b"1234567", b"ok"],
        );
        assert_eq!(out.skipped, [(2, 9)]);
        let out = check_resync(
            b"12345\r\n123456\r\n1234567\r\nok\r\n",
            &[b"12345", b"123456", b"ok"],
        );
        assert_eq!(out.skipped, [(2, 9)]);
        // The `\n` right after the `max` bytes that made the line too long.
        let out = check_resync(b"XXXXXXXX\n1234567\n", &[b"1234567"]);
        assert_eq!(out.skipped, [(0, 9)]);
        let out = check_resync(b"XXXXXXX\r\n123456\r\n", &[b"123456"]);
        assert_eq!(out.skipped, [(0, 9)]);
    }

    #[test]
    fn resync_crlf() {
        let out = check_resync(b"ab\r\nXXXXXXXXXX\r\ncd\r\n\r\n", &[b"ab", b"cd", b""]);
        assert_eq!(out.skipped, [(1, 12)]);
        // A `\r` alone does not end the dropped line.
        let out = check_resync(b"XXXXXXXX\rX\r\nab\r\n", &[b"ab"]);
        assert_eq!(out.skipped, [(0, 12)]);
    }

    #[test]
    fn resync_decoder_states() {
        let mut d = LineDecoder::new(MAX);
        assert_eq!(d.decode(b"XXXXXXXX"), Err(TOO_LONG));
        assert_eq!(d.next_index, MAX);
        d.resync();
        assert_eq!(d.decode(b"XXXXXXXX"), Ok(Decoded::Skipped(MAX)));
        assert_eq!((d.next_index, d.discarding), (0, true));
        assert_eq!(d.decode(b""), Ok(Decoded::NeedMore));
        assert_eq!(d.decode(b"X"), Ok(Decoded::Skipped(1)));
        assert_eq!(d.decode(b"XX\nab\n"), Ok(Decoded::Skipped(3)));
        assert!(!d.discarding);
        assert_eq!(
            d.decode(b"ab\n"),
            Ok(Decoded::Frame(
                Frame {
                    raw: b"ab\n",
                    payload: b"ab"
                },
                3
            ))
        );
    }

    #[test]
    fn resync_does_not_rescan_the_first_max_bytes() {
        let mut d = LineDecoder::new(MAX);
        assert_eq!(d.decode(b"XXXXXXXX"), Err(TOO_LONG));
        d.resync();
        // Contract violation: a `\n` inside the bytes already scanned is not
        // seen again; the scan resumes at `max`.
        assert_eq!(d.decode(b"X\nXXXXXXXX\nab\n"), Ok(Decoded::Skipped(11)));
        // Shorter input than was scanned: no panic, everything is dropped.
        assert_eq!(d.decode(b"XXXXXXXX"), Err(TOO_LONG));
        d.resync();
        assert_eq!(d.decode(b"XX"), Ok(Decoded::Skipped(2)));
    }

    #[test]
    fn reset_ends_resync() {
        let mut d = LineDecoder::new(MAX);
        assert_eq!(d.decode(b"XXXXXXXX"), Err(TOO_LONG));
        d.resync();
        d.reset();
        assert_eq!((d.next_index, d.discarding), (0, false));
        assert!(matches!(d.decode(b"ab\n"), Ok(Decoded::Frame(_, 3))));
        let mut d = Decoder::new(line(MAX));
        assert_eq!(d.decode(b"XXXXXXXX"), Err(TOO_LONG));
        assert!(d.resync());
        assert_eq!(d.decode(b"XXXXXXXX"), Ok(Decoded::Skipped(8)));
        d.reset();
        assert_eq!(d.decode(b"XXXXXXXX"), Err(TOO_LONG));
    }

    #[test]
    fn resync_with_zero_max_drops_every_line() {
        let input = b"a\n\nb";
        let out = decode_whole_with(line(0), true, input);
        assert_eq!(out.frames, []);
        assert_eq!(out.skipped, [(0, 2), (0, 1), (0, 1)]);
        assert_eq!((out.error, out.rest), (None, 0));
        check_every_split_with(line(0), true, input);
        check_byte_at_a_time_with(line(0), true, input);
    }

    #[test]
    fn encode_round_trip() {
        let d = LineDecoder::new(MAX);
        let mut wire = Vec::new();
        for payload in LINES_PAYLOADS {
            d.encode(payload, &mut wire).unwrap();
        }
        assert_eq!(wire, b"abc\nde\n\nfghi\n");
        assert_eq!(payloads(&decode_whole(line(MAX), &wire)), LINES_PAYLOADS);
        assert_eq!(LineDecoder::encoded_len(3), Some(4));
        assert_eq!(LineDecoder::encoded_len(usize::MAX), None);
    }

    #[test]
    fn encode_refuses_what_would_not_round_trip() {
        let d = LineDecoder::new(MAX);
        let mut wire = Vec::new();
        assert_eq!(d.encode(b"a\nb", &mut wire), Err(EncodeError::Delimiter));
        assert_eq!(d.encode(b"ab\r", &mut wire), Err(EncodeError::Delimiter));
        assert_eq!(d.encode(b"1234567", &mut wire), Ok(()));
        assert_eq!(
            d.encode(b"12345678", &mut wire),
            Err(EncodeError::TooLong {
                len: MAX + 1,
                max: MAX
            })
        );
        let mut fixed = [0u8; 3];
        assert_eq!(
            d.encode(b"abc", &mut &mut fixed[..]),
            Err(EncodeError::NoSpace {
                needed: 4,
                remaining: 3
            })
        );
        assert_eq!(wire, b"1234567\n");
    }

    #[test]
    fn decoder_enum_delegates() {
        let mut d = Decoder::new(line(MAX));
        assert!(matches!(d.decode(b"ab\ncd"), Ok(Decoded::Frame(f, 3)) if f.payload == b"ab"));
        assert_eq!(d.decode(b"cd"), Ok(Decoded::NeedMore));
        d.reset();
        assert_eq!(d.decode(b"cd\n").map(|_| ()), Ok(()));
    }

    /// A line payload that encodes and decodes back to itself.
    fn payload() -> impl Strategy<Value = Vec<u8>> {
        payload_in(0..40)
    }

    /// A line payload of up to `len` bytes (fewer if it ended in `\r`) that
    /// encodes and decodes back to itself.
    fn payload_in(len: std::ops::Range<usize>) -> impl Strategy<Value = Vec<u8>> {
        let byte = any::<u8>().prop_map(|b| if b == b'\n' { b'n' } else { b });
        proptest::collection::vec(byte, len).prop_map(|mut p| {
            while p.last() == Some(&b'\r') {
                p.pop();
            }
            p
        })
    }

    proptest! {
        #[test]
        fn prop_chunked_round_trip(
            frames in proptest::collection::vec(payload(), 0..12),
            chunks in proptest::collection::vec(1usize..20, 1..8),
        ) {
            let max = 41;
            let d = LineDecoder::new(max);
            let mut wire = Vec::new();
            for p in &frames {
                d.encode(p, &mut wire).unwrap();
            }
            let whole = decode_whole(line(max), &wire);
            prop_assert_eq!(whole.error, None);
            prop_assert_eq!(&payloads(&whole), &frames);
            let mut stream = Stream::new(line(max));
            for chunk in chunk_iter(&wire, &chunks) {
                stream.feed(chunk);
            }
            prop_assert_eq!(stream.finish(), whole);
        }

        #[test]
        fn prop_resync_drops_exactly_the_long_lines(
            lines in proptest::collection::vec(
                (any::<bool>(), payload_in(0..16), payload_in(16..48)), 0..12),
            chunks in proptest::collection::vec(1usize..20, 1..8),
        ) {
            let max = 16;
            let d = LineDecoder::new(max);
            let (mut wire, mut good, mut skipped) = (Vec::new(), Vec::new(), Vec::new());
            for (is_long, short, long) in &lines {
                if *is_long {
                    // At least `max` bytes before the `\n`: one too many.
                    wire.extend_from_slice(long);
                    wire.resize(wire.len() + max.saturating_sub(long.len()), b'x');
                    wire.push(b'\n');
                    skipped.push((good.len(), long.len().max(max) + 1));
                } else {
                    d.encode(short, &mut wire).unwrap();
                    good.push(short.clone());
                }
            }
            let whole = decode_whole_with(line(max), true, &wire);
            prop_assert_eq!(&payloads(&whole), &good);
            prop_assert_eq!(&whole.skipped, &skipped);
            prop_assert_eq!((whole.error, whole.rest), (None, 0));
            let mut stream = Stream::with_resync(line(max), true);
            for chunk in chunk_iter(&wire, &chunks) {
                stream.feed(chunk);
                prop_assert!(stream.buffered() < max);
            }
            prop_assert_eq!(stream.finish(), whole);
        }

        #[test]
        fn prop_arbitrary_bytes_chunked_like_whole(
            input in proptest::collection::vec(
                prop_oneof![Just(b'\n'), Just(b'\r'), any::<u8>()], 0..200),
            chunks in proptest::collection::vec(1usize..20, 1..8),
            max in 0usize..24,
            resync in any::<bool>(),
        ) {
            let whole = decode_whole_with(line(max), resync, &input);
            let mut stream = Stream::with_resync(line(max), resync);
            for chunk in chunk_iter(&input, &chunks) {
                stream.feed(chunk);
            }
            prop_assert_eq!(stream.finish(), whole);
        }
    }
}
