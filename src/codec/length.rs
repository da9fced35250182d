//! Length-prefixed framing: a big-endian `u16` or `u32` payload length, then the payload.
//!
//! Invariant: the announced length is checked against `max` as soon as the
//! header is complete, before any body byte is awaited, and the header is
//! parsed once per frame (`DecodeState`). Length math is checked, so a `u32`
//! header cannot overflow a 32-bit `usize`. Allocation: none.
#![deny(clippy::indexing_slicing)]

use bytes::{Buf, BufMut};

use super::{Decoded, EncodeError, Frame, FrameError, check_space};

/// The size of the length header.
///
/// Wire layout of one frame with a payload of `n` bytes (`h` = [`header_len`]):
///
/// | offset | size | field                                  |
/// |--------|------|----------------------------------------|
/// | 0      | `h`  | `n`, unsigned big-endian (`h` = 2 or 4) |
/// | `h`    | `n`  | payload                                |
///
/// A `U16` frame `"hi"` is `00 02 68 69`; an empty `U32` frame is `00 00 00 00`.
///
/// [`header_len`]: LengthWidth::header_len
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LengthWidth {
    /// A 2-byte big-endian length: payloads of up to 65 535 bytes.
    U16,
    /// A 4-byte big-endian length: payloads of up to 4 GiB - 1 (less on 16-bit targets).
    U32,
}

/// Where a [`LengthDecoder`] is within the current frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DecodeState {
    /// Waiting for a complete length header.
    Head,
    /// The header announced this many payload bytes, already checked against `max`.
    Body(usize),
}

/// Decoder for length-prefixed frames whose payload is at most `max` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LengthDecoder {
    width: LengthWidth,
    /// Longest accepted payload in bytes (header excluded).
    max: usize,
    state: DecodeState,
}

// ===== impl LengthWidth =====

impl LengthWidth {
    /// Bytes in the length header: 2 or 4.
    pub fn header_len(self) -> usize {
        match self {
            LengthWidth::U16 => 2,
            LengthWidth::U32 => 4,
        }
    }

    /// The longest payload the header can express on this target.
    pub fn max_payload_len(self) -> usize {
        match self {
            LengthWidth::U16 => usize::from(u16::MAX),
            LengthWidth::U32 => usize::try_from(u32::MAX).unwrap_or(usize::MAX),
        }
    }

    /// Bytes a payload of `payload_len` bytes occupies once framed (header
    /// included); `None` if that overflows `usize`.
    pub fn encoded_len(self, payload_len: usize) -> Option<usize> {
        self.header_len().checked_add(payload_len)
    }

    /// Append the header and `payload` to `dst`, checking only what the header
    /// can express (see [`LengthDecoder::encode`] for the configured maximum).
    ///
    /// # Errors
    /// Nothing is written when:
    /// - [`EncodeError::TooLong`]: `payload` is longer than [`max_payload_len`];
    /// - [`EncodeError::NoSpace`]: `dst` has less room than the frame.
    ///
    /// [`max_payload_len`]: LengthWidth::max_payload_len
    pub fn encode(self, payload: &[u8], dst: &mut impl BufMut) -> Result<(), EncodeError> {
        let len = payload.len();
        let too_long = EncodeError::TooLong {
            len,
            max: self.max_payload_len(),
        };
        let needed = self.encoded_len(len).ok_or(too_long)?;
        match self {
            LengthWidth::U16 => {
                let header = u16::try_from(len).map_err(|_| too_long)?;
                check_space(needed, dst)?;
                dst.put_u16(header);
            }
            LengthWidth::U32 => {
                let header = u32::try_from(len).map_err(|_| too_long)?;
                check_space(needed, dst)?;
                dst.put_u32(header);
            }
        }
        dst.put_slice(payload);
        Ok(())
    }

    /// Read the announced payload length, or `None` if `src` is shorter than the
    /// header. A `u32` that does not fit `usize` is reported as `usize::MAX`,
    /// which is larger than any `max`.
    fn decode_head(self, mut src: &[u8]) -> Option<usize> {
        match self {
            LengthWidth::U16 => src.try_get_u16().ok().map(usize::from),
            LengthWidth::U32 => {
                let len = src.try_get_u32().ok()?;
                Some(usize::try_from(len).unwrap_or(usize::MAX))
            }
        }
    }
}

// ===== impl LengthDecoder =====

impl LengthDecoder {
    /// A decoder for `width`-prefixed frames with payloads of up to `max` bytes.
    pub fn new(width: LengthWidth, max: usize) -> LengthDecoder {
        LengthDecoder {
            width,
            max,
            state: DecodeState::Head,
        }
    }

    /// The header width.
    pub fn width(&self) -> LengthWidth {
        self.width
    }

    /// The longest accepted payload in bytes, header excluded.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Decode the next frame from `src`, the caller's unconsumed bytes.
    ///
    /// Once a header has been read its length is remembered, so after
    /// [`Decoded::NeedMore`] the caller must pass the same bytes again,
    /// followed by any new ones. A zero-length payload is a valid frame.
    ///
    /// # Errors
    /// [`FrameError::TooLong`] with the announced length as soon as a header
    /// announces more than `max` payload bytes, without waiting for the body.
    pub fn decode<'a>(&mut self, src: &'a [u8]) -> Result<Decoded<'a>, FrameError> {
        let len = match self.state {
            DecodeState::Body(len) => len,
            DecodeState::Head => {
                let Some(len) = self.width.decode_head(src) else {
                    return Ok(Decoded::NeedMore);
                };
                // Spec: the announced length is refused before the body is awaited.
                if len > self.max {
                    return Err(FrameError::TooLong { len, max: self.max });
                }
                self.state = DecodeState::Body(len);
                len
            }
        };
        let header_len = self.width.header_len();
        let too_long = FrameError::TooLong { len, max: self.max };
        let frame_len = header_len.checked_add(len).ok_or(too_long)?;
        let Some((raw, _)) = src.split_at_checked(frame_len) else {
            return Ok(Decoded::NeedMore);
        };
        let payload = raw.get(header_len..).unwrap_or_default();
        self.state = DecodeState::Head;
        Ok(Decoded::Frame(Frame { raw, payload }, frame_len))
    }

    /// Forget a header already read, for example when the caller discarded its buffer.
    pub fn reset(&mut self) {
        self.state = DecodeState::Head;
    }

    /// Bytes a payload of `payload_len` bytes occupies once framed (header
    /// included); `None` if that overflows `usize`.
    pub fn encoded_len(&self, payload_len: usize) -> Option<usize> {
        self.width.encoded_len(payload_len)
    }

    /// Append the length header and `payload` to `dst`.
    ///
    /// # Errors
    /// Nothing is written when:
    /// - [`EncodeError::TooLong`]: `payload` is longer than `max` or than the
    ///   header can express (`max` is then the smaller of the two);
    /// - [`EncodeError::NoSpace`]: `dst` has less room than the frame.
    pub fn encode(&self, payload: &[u8], dst: &mut impl BufMut) -> Result<(), EncodeError> {
        let max = self.max.min(self.width.max_payload_len());
        if payload.len() > max {
            return Err(EncodeError::TooLong {
                len: payload.len(),
                max,
            });
        }
        self.width.encode(payload, dst)
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

    /// `"hi"`, an empty frame, then `"abc"`, with a `u16` header.
    static U16_FRAMES: [u8; 11] = [0, 2, b'h', b'i', 0, 0, 0, 3, b'a', b'b', b'c'];
    /// The same frames with a `u32` header.
    static U32_FRAMES: [u8; 17] = [
        0, 0, 0, 2, b'h', b'i', 0, 0, 0, 0, 0, 0, 0, 3, b'a', b'b', b'c',
    ];
    static PAYLOADS: [&[u8]; 3] = [b"hi", b"", b"abc"];

    const MAX: usize = 8;

    fn u16f(max: usize) -> Framing {
        Framing::U16 { max }
    }

    fn u32f(max: usize) -> Framing {
        Framing::U32 { max }
    }

    fn payloads(outcome: &Outcome) -> Vec<&[u8]> {
        outcome.frames.iter().map(|(_, p)| p.as_slice()).collect()
    }

    /// `payload` framed with `width`, built by hand rather than by `encode`.
    fn frame(width: LengthWidth, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut wire = match width {
            LengthWidth::U16 => (len as u16).to_be_bytes().to_vec(),
            LengthWidth::U32 => len.to_be_bytes().to_vec(),
        };
        wire.extend_from_slice(payload);
        wire
    }

    #[test]
    fn decodes_several_frames_including_empty() {
        for (framing, wire) in [(u16f(MAX), &U16_FRAMES[..]), (u32f(MAX), &U32_FRAMES[..])] {
            let out = decode_whole(framing, wire);
            assert_eq!(payloads(&out), PAYLOADS, "{framing:?}");
            assert_eq!((out.error, out.rest), (None, 0), "{framing:?}");
        }
        let out = decode_whole(u16f(MAX), &U16_FRAMES);
        assert_eq!(out.frames[0].0, [0, 2, b'h', b'i']);
    }

    #[test]
    fn every_split_and_byte_at_a_time() {
        for width in [LengthWidth::U16, LengthWidth::U32] {
            let framing = match width {
                LengthWidth::U16 => u16f(MAX),
                LengthWidth::U32 => u32f(MAX),
            };
            let mut inputs = vec![
                match width {
                    LengthWidth::U16 => U16_FRAMES.to_vec(),
                    LengthWidth::U32 => U32_FRAMES.to_vec(),
                },
                Vec::new(),
                frame(width, b""),
                frame(width, b"1234567"),
                frame(width, b"12345678"),
                frame(width, b"123456789"),
            ];
            let mut trailing = frame(width, b"ab");
            trailing.extend_from_slice(&frame(width, b"cdef")[..3]);
            inputs.push(trailing);
            for input in &inputs {
                check_every_split(framing, input);
                check_byte_at_a_time(framing, input);
            }
        }
    }

    #[test]
    fn truncated_header_and_body_need_more() {
        let mut d = LengthDecoder::new(LengthWidth::U32, MAX);
        assert_eq!(d.decode(b""), Ok(Decoded::NeedMore));
        assert_eq!(d.decode(&[0, 0, 0]), Ok(Decoded::NeedMore));
        assert_eq!(d.state, DecodeState::Head);
        assert_eq!(d.decode(&[0, 0, 0, 3, b'a']), Ok(Decoded::NeedMore));
        assert_eq!(d.state, DecodeState::Body(3));
        let out = decode_whole(u16f(MAX), &U16_FRAMES[..10]);
        assert_eq!(payloads(&out), [&b"hi"[..], b""]);
        assert_eq!(out.rest, 4);
    }

    #[test]
    fn max_minus_one_max_and_max_plus_one() {
        for width in [LengthWidth::U16, LengthWidth::U32] {
            let framing = match width {
                LengthWidth::U16 => u16f(MAX),
                LengthWidth::U32 => u32f(MAX),
            };
            let out = decode_whole(framing, &frame(width, b"1234567"));
            assert_eq!(payloads(&out), [b"1234567"]);
            let out = decode_whole(framing, &frame(width, b"12345678"));
            assert_eq!(payloads(&out), [b"12345678"]);
            let out = decode_whole(framing, &frame(width, b"123456789"));
            assert_eq!(out.frames, []);
            assert_eq!(
                out.error,
                Some(FrameError::TooLong {
                    len: MAX + 1,
                    max: MAX
                })
            );
        }
    }

    #[test]
    fn announced_length_refused_before_body() {
        let mut d = LengthDecoder::new(LengthWidth::U16, MAX);
        assert_eq!(
            d.decode(&[0xff, 0xff]),
            Err(FrameError::TooLong {
                len: 65_535,
                max: MAX
            })
        );
        let mut d = LengthDecoder::new(LengthWidth::U32, MAX);
        assert_eq!(d.decode(&[0, 0, 0]), Ok(Decoded::NeedMore));
        let huge = Err(FrameError::TooLong {
            len: u32::MAX as usize,
            max: MAX,
        });
        assert_eq!(d.decode(&[0xff, 0xff, 0xff, 0xff]), huge);
    }

    #[test]
    fn header_is_parsed_once() {
        let mut d = LengthDecoder::new(LengthWidth::U16, MAX);
        assert_eq!(d.decode(&[0, 2, b'h']), Ok(Decoded::NeedMore));
        // Contract violation: different header bytes. The remembered length wins,
        // which shows the header was not parsed again (and nothing panics).
        let Ok(Decoded::Frame(f, 4)) = d.decode(&[0xff, 0xff, b'h', b'i']) else {
            panic!("expected a frame");
        };
        assert_eq!(f.payload, b"hi");
        assert_eq!(d.state, DecodeState::Head);
        assert_eq!(d.decode(&[0, 2, b'h']), Ok(Decoded::NeedMore));
        d.reset();
        assert_eq!(d.state, DecodeState::Head);
        assert_eq!(
            d.decode(&[0, 9]),
            Err(FrameError::TooLong { len: 9, max: MAX })
        );
    }

    #[test]
    fn max_beyond_width_and_usize_max() {
        let mut d = LengthDecoder::new(LengthWidth::U32, usize::MAX);
        let biggest = d.decode(&[0xff, 0xff, 0xff, 0xff]);
        if usize::BITS > 32 {
            // 4 GiB - 1 is within max: wait for the body.
            assert_eq!(biggest, Ok(Decoded::NeedMore));
        } else {
            // 32-bit targets (armv7): header + body cannot be addressed.
            let len = u32::MAX as usize;
            assert_eq!(
                biggest,
                Err(FrameError::TooLong {
                    len,
                    max: usize::MAX
                })
            );
        }
        let mut d = LengthDecoder::new(LengthWidth::U32, usize::MAX);
        assert_eq!(d.decode(&[0, 0, 0, 1]), Ok(Decoded::NeedMore));
        let mut d = LengthDecoder::new(LengthWidth::U16, usize::MAX);
        assert!(matches!(d.decode(&[0, 1, b'x']), Ok(Decoded::Frame(_, 3))));
    }

    #[test]
    fn width_limits() {
        assert_eq!(LengthWidth::U16.header_len(), 2);
        assert_eq!(LengthWidth::U32.header_len(), 4);
        assert_eq!(LengthWidth::U16.max_payload_len(), 65_535);
        assert_eq!(LengthWidth::U32.max_payload_len(), u32::MAX as usize);
        assert_eq!(
            LengthWidth::U32.encoded_len(usize::MAX - 4),
            Some(usize::MAX)
        );
        assert_eq!(LengthWidth::U32.encoded_len(usize::MAX - 3), None);
    }

    #[test]
    fn encode_round_trip() {
        for (width, expected) in [
            (LengthWidth::U16, &U16_FRAMES[..]),
            (LengthWidth::U32, &U32_FRAMES),
        ] {
            let d = LengthDecoder::new(width, MAX);
            let mut wire = Vec::new();
            for payload in PAYLOADS {
                d.encode(payload, &mut wire).unwrap();
            }
            assert_eq!(wire, expected);
            assert_eq!(d.encoded_len(2), Some(2 + width.header_len()));
        }
    }

    #[test]
    fn encode_refuses_oversized_payloads() {
        let d = LengthDecoder::new(LengthWidth::U16, MAX);
        let mut wire = Vec::new();
        assert_eq!(d.encode(b"12345678", &mut wire), Ok(()));
        assert_eq!(
            d.encode(b"123456789", &mut wire),
            Err(EncodeError::TooLong { len: 9, max: MAX })
        );
        let big = vec![0u8; 65_536];
        let d = LengthDecoder::new(LengthWidth::U16, usize::MAX);
        assert_eq!(
            d.encode(&big, &mut wire),
            Err(EncodeError::TooLong {
                len: 65_536,
                max: 65_535
            })
        );
        assert_eq!(
            LengthWidth::U16.encode(&big, &mut wire),
            Err(EncodeError::TooLong {
                len: 65_536,
                max: 65_535
            })
        );
        assert_eq!(LengthWidth::U16.encode(&big[1..], &mut Vec::new()), Ok(()));
        let mut fixed = [0u8; 5];
        assert_eq!(
            LengthWidth::U32.encode(b"ab", &mut &mut fixed[..]),
            Err(EncodeError::NoSpace {
                needed: 6,
                remaining: 5
            })
        );
        assert_eq!(fixed, [0; 5]);
        assert_eq!(wire, frame(LengthWidth::U16, b"12345678"));
    }

    #[test]
    fn decoder_enum_delegates() {
        let mut d = Decoder::new(u32f(MAX));
        assert_eq!(d.decode(&[0, 0, 0, 1]), Ok(Decoded::NeedMore));
        d.reset();
        assert_eq!(
            d.decode(&[0, 0, 0, 9]),
            Err(FrameError::TooLong { len: 9, max: MAX })
        );
        // No marker to resume at: the caller must close.
        assert!(!d.resync());
    }

    #[test]
    fn resync_is_refused_and_the_error_stands() {
        let mut input = frame(LengthWidth::U16, b"ab");
        input.extend_from_slice(&frame(LengthWidth::U16, b"123456789"));
        input.extend_from_slice(&frame(LengthWidth::U16, b"cd"));
        let out = decode_whole_with(u16f(MAX), true, &input);
        assert_eq!(payloads(&out), [b"ab"]);
        assert_eq!(out.skipped, []);
        assert_eq!(out.error, Some(FrameError::TooLong { len: 9, max: MAX }));
        check_every_split_with(u16f(MAX), true, &input);
        check_byte_at_a_time_with(u16f(MAX), true, &input);
    }

    fn width() -> impl Strategy<Value = LengthWidth> {
        prop_oneof![Just(LengthWidth::U16), Just(LengthWidth::U32)]
    }

    fn framing(width: LengthWidth, max: usize) -> Framing {
        match width {
            LengthWidth::U16 => u16f(max),
            LengthWidth::U32 => u32f(max),
        }
    }

    proptest! {
        #[test]
        fn prop_chunked_round_trip(
            width in width(),
            frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..12),
            chunks in proptest::collection::vec(1usize..20, 1..8),
        ) {
            let max = 40;
            let d = LengthDecoder::new(width, max);
            let mut wire = Vec::new();
            for p in &frames {
                d.encode(p, &mut wire).unwrap();
            }
            let whole = decode_whole(framing(width, max), &wire);
            prop_assert_eq!(whole.error, None);
            prop_assert_eq!(&payloads(&whole), &frames);
            let mut stream = Stream::new(framing(width, max));
            for chunk in chunk_iter(&wire, &chunks) {
                stream.feed(chunk);
            }
            prop_assert_eq!(stream.finish(), whole);
        }

        #[test]
        fn prop_arbitrary_bytes_chunked_like_whole(
            width in width(),
            input in proptest::collection::vec(
                prop_oneof![Just(0u8), 1u8..8, any::<u8>()], 0..200),
            chunks in proptest::collection::vec(1usize..20, 1..8),
            max in 0usize..16,
        ) {
            let whole = decode_whole(framing(width, max), &input);
            let mut stream = Stream::new(framing(width, max));
            for chunk in chunk_iter(&input, &chunks) {
                stream.feed(chunk);
            }
            prop_assert_eq!(stream.finish(), whole);
        }
    }
}
