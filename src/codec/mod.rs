//! Pure frame decoders: bytes in, frames out. No I/O, no `mio`, no allocation.
//!
//! Invariant: a decoder never panics on any input and checks every length field
//! against its configured maximum *before* it waits for the body, so a hostile
//! peer can never make a connection buffer more than `header + max` bytes.
//! Frames borrow from the caller's buffer; the caller consumes what was decoded.
#![deny(clippy::indexing_slicing)]

mod length;
mod line;
pub mod tunnel;

pub use length::{LengthDecoder, LengthWidth};
pub use line::LineDecoder;
pub use tunnel::TunnelDecoder;

use std::fmt;

use bytes::BufMut;

/// One decoded frame, borrowed from the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The frame exactly as it arrived on the wire: length prefix or line
    /// terminator included.
    pub raw: &'a [u8],
    /// The frame's content: without the length prefix, without `\n` / `\r\n`.
    pub payload: &'a [u8],
}

/// The outcome of one `decode` call that did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A whole frame, and how many bytes of the input it used (`raw.len()`).
    /// The caller must consume exactly that many bytes before the next call.
    Frame(Frame<'a>, usize),
    /// The input holds no complete frame yet; call again with more bytes.
    NeedMore,
    /// Bytes dropped while resynchronising after an over-long line (see
    /// [`Decoder::resync`]); always at least 1. The caller consumes them like
    /// a frame's bytes before the next call, and hands nothing to the role.
    Skipped(usize),
}

/// Why a byte stream cannot be decoded. The connection cannot recover unless
/// the decoder can resynchronise ([`Decoder::resync`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// A frame is (or announces itself as) longer than the configured maximum.
    TooLong {
        /// The length seen so far or announced by the header, in bytes.
        len: usize,
        /// The configured maximum, in bytes.
        max: usize,
    },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::TooLong { len, max } => {
                write!(
                    f,
                    "frame of at least {len} bytes exceeds the maximum of {max}"
                )
            }
        }
    }
}

impl std::error::Error for FrameError {}

/// Why a payload cannot be encoded. Nothing has been written to `dst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncodeError {
    /// The payload is longer than the framing's maximum (or its header can express).
    TooLong {
        /// The payload length, or for lines the encoded length, in bytes.
        len: usize,
        /// The largest accepted length, in bytes.
        max: usize,
    },
    /// The destination has less room (`BufMut::remaining_mut`) than the frame needs.
    NoSpace {
        /// Bytes the encoded frame occupies.
        needed: usize,
        /// Bytes `dst` can still take.
        remaining: usize,
    },
    /// A line payload contains `\n` or ends in `\r`, so it would not decode to itself.
    Delimiter,
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncodeError::TooLong { len, max } => {
                write!(f, "payload of {len} bytes exceeds the maximum of {max}")
            }
            EncodeError::NoSpace { needed, remaining } => {
                write!(
                    f,
                    "frame needs {needed} bytes but the buffer has room for {remaining}"
                )
            }
            EncodeError::Delimiter => f.write_str("line payload contains a line terminator"),
        }
    }
}

impl std::error::Error for EncodeError {}

/// How a connection's byte stream is cut into frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Whatever bytes are available form one frame (no framing at all).
    Raw,
    /// Lines ending in `\n` (a preceding `\r` is stripped from the payload);
    /// `max` bounds the whole line including its terminator.
    Line {
        /// Longest accepted line in bytes, terminator included.
        max: usize,
    },
    /// A big-endian `u16` payload length, then the payload; `max` bounds the payload.
    U16 {
        /// Longest accepted payload in bytes.
        max: usize,
    },
    /// A big-endian `u32` payload length, then the payload; `max` bounds the payload.
    U32 {
        /// Longest accepted payload in bytes.
        max: usize,
    },
    /// Tunnel link frames ([`tunnel`]): `[size: u16][command][id][payload]`;
    /// `max` bounds the payload (at most 65 535).
    Tunnel {
        /// Longest accepted payload in bytes.
        max: usize,
    },
    /// No framing, but at most `max` bytes per frame (at least 1): a role
    /// that forwards a byte stream in bounded pieces, and may pause between
    /// pieces with the rest left buffered.
    Chunk {
        /// Most bytes in one frame.
        max: usize,
    },
}

impl Framing {
    /// The largest number of bytes a single frame of this framing can occupy on
    /// the wire (header included); `None` for `Raw`, which has no frame bound.
    pub fn max_encoded_len(&self) -> Option<usize> {
        match *self {
            Framing::Raw => None,
            Framing::Line { max } => Some(max),
            Framing::U16 { max } => max.checked_add(2),
            Framing::U32 { max } => max.checked_add(4),
            Framing::Tunnel { max } => max.min(tunnel::MAX_PAYLOAD).checked_add(tunnel::HEADER_LEN),
            Framing::Chunk { max } => Some(max),
        }
    }

    /// Bytes a payload of `payload_len` bytes occupies once encoded; `None` if
    /// that overflows `usize`. Does not check the maximum (see [`Framing::encode`]).
    pub fn encoded_len(&self, payload_len: usize) -> Option<usize> {
        match *self {
            Framing::Raw => Some(payload_len),
            Framing::Line { .. } => LineDecoder::encoded_len(payload_len),
            Framing::U16 { .. } => LengthWidth::U16.encoded_len(payload_len),
            Framing::U32 { .. } => LengthWidth::U32.encoded_len(payload_len),
            Framing::Tunnel { .. } => tunnel::HEADER_LEN.checked_add(payload_len),
            Framing::Chunk { .. } => Some(payload_len),
        }
    }

    /// Append `payload` to `dst` as one frame that a [`Decoder`] for this framing
    /// decodes back to `payload`. `Raw` appends the payload unchanged.
    ///
    /// # Errors
    /// See [`LineDecoder::encode`] and [`LengthDecoder::encode`]; `Raw` fails only
    /// with [`EncodeError::NoSpace`]. On error nothing is written.
    pub fn encode(&self, payload: &[u8], dst: &mut impl BufMut) -> Result<(), EncodeError> {
        match *self {
            Framing::Raw | Framing::Chunk { .. } => {
                check_space(payload.len(), dst)?;
                dst.put_slice(payload);
                Ok(())
            }
            Framing::Line { max } => LineDecoder::new(max).encode(payload, dst),
            Framing::U16 { max } => LengthDecoder::new(LengthWidth::U16, max).encode(payload, dst),
            Framing::U32 { max } => LengthDecoder::new(LengthWidth::U32, max).encode(payload, dst),
            Framing::Tunnel { max } => {
                // A DATA frame for client 0: the generic encoder knows no command.
                let max = max.min(tunnel::MAX_PAYLOAD);
                let len = payload.len();
                if len > max {
                    return Err(EncodeError::TooLong { len, max });
                }
                check_space(tunnel::HEADER_LEN + len, dst)?;
                let head = tunnel::header(tunnel::Command::Data, 0, len)
                    .ok_or(EncodeError::TooLong { len, max })?;
                dst.put_slice(&head);
                dst.put_slice(payload);
                Ok(())
            }
        }
    }
}

/// `BufMut::put_slice` panics when `dst` is short (fixed slices do not grow), so
/// every encoder checks the room first.
fn check_space(needed: usize, dst: &impl BufMut) -> Result<(), EncodeError> {
    let remaining = dst.remaining_mut();
    if remaining < needed {
        return Err(EncodeError::NoSpace { needed, remaining });
    }
    Ok(())
}

/// A decoder for any [`Framing`], with the state needed to resume on partial input.
#[derive(Debug, Clone)]
pub enum Decoder {
    /// See [`Framing::Raw`].
    Raw,
    /// See [`Framing::Line`].
    Line(LineDecoder),
    /// See [`Framing::U16`] and [`Framing::U32`].
    Length(LengthDecoder),
    /// See [`Framing::Tunnel`].
    Tunnel(TunnelDecoder),
    /// See [`Framing::Chunk`]: the most bytes per frame.
    Chunk(usize),
}

// ===== impl Decoder =====

impl Decoder {
    /// A fresh decoder for `framing`.
    pub fn new(framing: Framing) -> Decoder {
        match framing {
            Framing::Raw => Decoder::Raw,
            Framing::Line { max } => Decoder::Line(LineDecoder::new(max)),
            Framing::U16 { max } => Decoder::Length(LengthDecoder::new(LengthWidth::U16, max)),
            Framing::U32 { max } => Decoder::Length(LengthDecoder::new(LengthWidth::U32, max)),
            Framing::Tunnel { max } => Decoder::Tunnel(TunnelDecoder::new(max)),
            Framing::Chunk { max } => Decoder::Chunk(max.max(1)),
        }
    }

    /// Decode the next frame from `src`, the connection's unconsumed bytes.
    ///
    /// Contract: between calls the caller either consumes exactly the bytes a
    /// returned frame used (or the `n` of [`Decoded::Skipped`]), or (after
    /// `NeedMore`) calls again with the same bytes followed by new ones.
    /// Partial input is never rescanned.
    ///
    /// # Errors
    /// [`FrameError::TooLong`] when a frame exceeds the configured maximum.
    /// The caller then either closes the connection or, if [`Decoder::resync`]
    /// returns true, carries on decoding the same bytes.
    pub fn decode<'a>(&mut self, src: &'a [u8]) -> Result<Decoded<'a>, FrameError> {
        match self {
            Decoder::Raw => Ok(if src.is_empty() {
                Decoded::NeedMore
            } else {
                Decoded::Frame(
                    Frame {
                        raw: src,
                        payload: src,
                    },
                    src.len(),
                )
            }),
            Decoder::Line(d) => d.decode(src),
            Decoder::Length(d) => d.decode(src),
            Decoder::Tunnel(d) => d.decode(src),
            Decoder::Chunk(max) => {
                let raw = src.get(..*max).unwrap_or(src);
                Ok(if raw.is_empty() {
                    Decoded::NeedMore
                } else {
                    Decoded::Frame(Frame { raw, payload: raw }, raw.len())
                })
            }
        }
    }

    /// Forget any partial-frame state (for example after a framing change),
    /// including a resynchronisation in progress.
    pub fn reset(&mut self) {
        match self {
            Decoder::Raw | Decoder::Chunk(_) => {}
            Decoder::Line(d) => d.reset(),
            Decoder::Length(d) => d.reset(),
            Decoder::Tunnel(d) => d.reset(),
        }
    }

    /// Called right after `decode` returned [`FrameError::TooLong`]: drop the
    /// over-long frame and carry on with the next one. Returns false when this
    /// framing cannot resynchronise, and the caller must close the connection.
    ///
    /// - `Line`: see [`LineDecoder::resync`]; the following calls return
    ///   [`Decoded::Skipped`] up to and including the line's `\n`. Returns true.
    /// - `U16` / `U32`: a length-prefixed stream has no marker to resume at
    ///   (the announced body may be gigabytes of anything). Returns false.
    /// - `Raw`: never fails, so there is nothing to resynchronise. Returns false.
    pub fn resync(&mut self) -> bool {
        match self {
            Decoder::Line(d) => {
                d.resync();
                true
            }
            Decoder::Raw | Decoder::Length(_) | Decoder::Tunnel(_) | Decoder::Chunk(_) => false,
        }
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
    //! Shared harness: a connection's receive path without the socket, used by
    //! every decoder's tests to feed input split at every byte and byte by byte.

    use super::*;

    /// Everything a byte stream decoded to, owned so that runs can be compared.
    #[derive(Debug, Default, PartialEq, Eq)]
    pub(super) struct Outcome {
        /// `(raw, payload)` of each frame, in order.
        pub(super) frames: Vec<(Vec<u8>, Vec<u8>)>,
        /// One entry per resynchronisation: `(frames decoded before it, bytes
        /// dropped)`, the bytes summed over all its `Skipped` (how they are
        /// split between calls depends on the chunking; the sum does not).
        pub(super) skipped: Vec<(usize, usize)>,
        /// The error that ended decoding, if any.
        pub(super) error: Option<FrameError>,
        /// Bytes received but not consumed by a frame or a skip.
        pub(super) rest: usize,
    }

    /// A connection's receive buffer: chunks are appended, decoded, consumed.
    pub(super) struct Stream {
        decoder: Decoder,
        /// On `TooLong`, call `Decoder::resync` and carry on if it agrees.
        resync: bool,
        buf: Vec<u8>,
        /// Bytes fed so far.
        fed: usize,
        outcome: Outcome,
    }

    impl Stream {
        pub(super) fn new(framing: Framing) -> Stream {
            Stream::with_resync(framing, false)
        }

        pub(super) fn with_resync(framing: Framing, resync: bool) -> Stream {
            Stream {
                decoder: Decoder::new(framing),
                resync,
                buf: Vec::new(),
                fed: 0,
                outcome: Outcome::default(),
            }
        }

        /// Append `chunk` and decode until `NeedMore`. After an error the
        /// connection is dead: bytes are still counted but no longer decoded.
        pub(super) fn feed(&mut self, chunk: &[u8]) {
            self.buf.extend_from_slice(chunk);
            self.fed += chunk.len();
            while self.outcome.error.is_none() {
                match self.decoder.decode(&self.buf) {
                    Ok(Decoded::Frame(frame, consumed)) => {
                        assert_eq!(consumed, frame.raw.len());
                        assert!(consumed > 0, "a frame must consume bytes");
                        assert!(std::ptr::eq(frame.raw.as_ptr(), self.buf.as_ptr()));
                        let within = frame.payload.as_ptr_range();
                        let raw = frame.raw.as_ptr_range();
                        assert!(raw.start <= within.start && within.end <= raw.end);
                        self.outcome
                            .frames
                            .push((frame.raw.to_vec(), frame.payload.to_vec()));
                        self.buf.drain(..consumed);
                    }
                    Ok(Decoded::Skipped(n)) => {
                        assert!(0 < n && n <= self.buf.len(), "skipped {n} bytes");
                        let Some((_, dropped)) = self.outcome.skipped.last_mut() else {
                            panic!("Skipped without a resync");
                        };
                        *dropped += n;
                        self.buf.drain(..n);
                    }
                    Ok(Decoded::NeedMore) => break,
                    Err(e) if self.resync && self.decoder.resync() => {
                        let before = self.outcome.frames.len();
                        assert_ne!(
                            self.outcome.skipped.last(),
                            Some(&(before, 0)),
                            "{e} again without progress"
                        );
                        self.outcome.skipped.push((before, 0));
                    }
                    Err(e) => self.outcome.error = Some(e),
                }
            }
        }

        pub(super) fn buffered(&self) -> usize {
            self.buf.len()
        }

        pub(super) fn frames(&self) -> &[(Vec<u8>, Vec<u8>)] {
            &self.outcome.frames
        }

        pub(super) fn skipped(&self) -> &[(usize, usize)] {
            &self.outcome.skipped
        }

        pub(super) fn error(&self) -> Option<FrameError> {
            self.outcome.error
        }

        /// The outcome; every byte fed is in a frame, a skip, or `rest`.
        pub(super) fn finish(mut self) -> Outcome {
            self.outcome.rest = self.buf.len();
            let framed: usize = self.outcome.frames.iter().map(|(raw, _)| raw.len()).sum();
            let dropped: usize = self.outcome.skipped.iter().map(|&(_, n)| n).sum();
            assert_eq!(framed + dropped + self.outcome.rest, self.fed);
            self.outcome
        }
    }

    /// Decode `input` delivered in one piece.
    pub(super) fn decode_whole(framing: Framing, input: &[u8]) -> Outcome {
        decode_whole_with(framing, false, input)
    }

    /// [`decode_whole`], resynchronising after `TooLong` if `resync`.
    pub(super) fn decode_whole_with(framing: Framing, resync: bool, input: &[u8]) -> Outcome {
        let mut stream = Stream::with_resync(framing, resync);
        stream.feed(input);
        stream.finish()
    }

    /// Where each frame of `outcome` ends in the input, dropped bytes included.
    fn frame_ends(outcome: &Outcome) -> Vec<usize> {
        let mut end = 0;
        let mut skips = outcome.skipped.iter().peekable();
        let mut ends = Vec::new();
        for (i, (raw, _)) in outcome.frames.iter().enumerate() {
            while let Some(&(_, n)) = skips.next_if(|&&(before, _)| before == i) {
                end += n;
            }
            end += raw.len();
            ends.push(end);
        }
        ends
    }

    /// Feed `input` split in two at every byte position.
    pub(super) fn check_every_split(framing: Framing, input: &[u8]) {
        check_every_split_with(framing, false, input);
    }

    /// Feed `input` split in two at every byte position, resynchronising after
    /// `TooLong` if `resync`. After the first part exactly the frames that fit
    /// in it have been decoded (otherwise `NeedMore`), and the skips so far
    /// agree with one-shot decoding; after both, the result equals it.
    pub(super) fn check_every_split_with(framing: Framing, resync: bool, input: &[u8]) {
        let whole = decode_whole_with(framing, resync, input);
        let ends = frame_ends(&whole);
        for at in 0..=input.len() {
            let (head, tail) = input.split_at(at);
            let mut stream = Stream::with_resync(framing, resync);
            stream.feed(head);
            let fit = ends.iter().take_while(|&&end| end <= at).count();
            assert_eq!(stream.frames(), &whole.frames[..fit], "split at {at}");
            if let Some((&(before, n), done)) = stream.skipped().split_last() {
                assert_eq!(done, &whole.skipped[..done.len()], "split at {at}");
                let (whole_before, whole_n) = whole.skipped[done.len()];
                assert!(before == whole_before && n <= whole_n, "split at {at}");
            }
            if let Some(e) = stream.error() {
                assert_eq!(Some(e), whole.error, "split at {at}");
                assert_eq!(fit, whole.frames.len(), "split at {at}");
            }
            stream.feed(tail);
            assert_eq!(stream.finish(), whole, "split at {at}");
        }
    }

    /// Feed `input` one byte at a time.
    pub(super) fn check_byte_at_a_time(framing: Framing, input: &[u8]) {
        check_byte_at_a_time_with(framing, false, input);
    }

    /// Feed `input` one byte at a time, resynchronising after `TooLong` if
    /// `resync`; the buffer never holds more than one maximal frame, and the
    /// result equals one-shot decoding.
    pub(super) fn check_byte_at_a_time_with(framing: Framing, resync: bool, input: &[u8]) {
        let bound = framing.max_encoded_len().unwrap();
        let mut stream = Stream::with_resync(framing, resync);
        for byte in input {
            stream.feed(std::slice::from_ref(byte));
            if stream.error().is_none() {
                assert!(
                    stream.buffered() <= bound,
                    "{} > {bound}",
                    stream.buffered()
                );
            }
        }
        assert_eq!(stream.finish(), decode_whole_with(framing, resync, input));
    }

    /// Cut `input` into pieces whose sizes cycle through `sizes` (all non-zero).
    pub(super) fn chunk_iter<'a>(
        input: &'a [u8],
        sizes: &'a [usize],
    ) -> impl Iterator<Item = &'a [u8]> {
        let mut rest = input;
        sizes.iter().cycle().map_while(move |&n| {
            if rest.is_empty() {
                return None;
            }
            let (chunk, tail) = rest.split_at(n.clamp(1, rest.len()));
            rest = tail;
            Some(chunk)
        })
    }

    #[test]
    fn raw_takes_everything() {
        let mut d = Decoder::new(Framing::Raw);
        assert_eq!(d.decode(b""), Ok(Decoded::NeedMore));
        let Ok(Decoded::Frame(frame, 3)) = d.decode(b"a\nb") else {
            panic!("expected a frame");
        };
        assert_eq!((frame.raw, frame.payload), (&b"a\nb"[..], &b"a\nb"[..]));
        d.reset();
        assert!(!d.resync());
    }

    #[test]
    fn only_line_framing_resyncs() {
        for (framing, resyncs) in [
            (Framing::Raw, false),
            (Framing::Line { max: 8 }, true),
            (Framing::U16 { max: 8 }, false),
            (Framing::U32 { max: 8 }, false),
        ] {
            assert_eq!(Decoder::new(framing).resync(), resyncs, "{framing:?}");
        }
    }

    #[test]
    fn max_encoded_len_includes_header() {
        assert_eq!(Framing::Raw.max_encoded_len(), None);
        assert_eq!(Framing::Line { max: 10 }.max_encoded_len(), Some(10));
        assert_eq!(Framing::U16 { max: 10 }.max_encoded_len(), Some(12));
        assert_eq!(Framing::U32 { max: 10 }.max_encoded_len(), Some(14));
        assert_eq!(Framing::U32 { max: usize::MAX }.max_encoded_len(), None);
    }

    #[test]
    fn framing_encode_round_trips() {
        for framing in [
            Framing::Raw,
            Framing::Line { max: 64 },
            Framing::U16 { max: 64 },
            Framing::U32 { max: 64 },
        ] {
            let mut wire = Vec::new();
            framing.encode(b"hello", &mut wire).unwrap();
            assert_eq!(Some(wire.len()), framing.encoded_len(5), "{framing:?}");
            let out = decode_whole(framing, &wire);
            assert_eq!(
                out.frames,
                [(wire.clone(), b"hello".to_vec())],
                "{framing:?}"
            );
        }
    }

    #[test]
    fn framing_encode_checks_room() {
        let mut fixed = [0u8; 4];
        assert_eq!(
            Framing::Raw.encode(b"hello", &mut &mut fixed[..]),
            Err(EncodeError::NoSpace {
                needed: 5,
                remaining: 4
            })
        );
        assert_eq!(
            Framing::U16 { max: 64 }.encode(b"abc", &mut &mut fixed[..]),
            Err(EncodeError::NoSpace {
                needed: 5,
                remaining: 4
            })
        );
        assert_eq!(fixed, [0; 4]);
    }

    #[test]
    fn errors_display() {
        let e = FrameError::TooLong { len: 9, max: 8 };
        assert_eq!(
            e.to_string(),
            "frame of at least 9 bytes exceeds the maximum of 8"
        );
        let e = EncodeError::NoSpace {
            needed: 5,
            remaining: 4,
        };
        assert_eq!(
            e.to_string(),
            "frame needs 5 bytes but the buffer has room for 4"
        );
        let e = EncodeError::TooLong { len: 9, max: 8 };
        assert_eq!(e.to_string(), "payload of 9 bytes exceeds the maximum of 8");
        let e = EncodeError::Delimiter;
        assert_eq!(e.to_string(), "line payload contains a line terminator");
    }
}
