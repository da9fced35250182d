//! Tunnel link frames (docs/PROTOCOL.md §1) through `Decoder::new(Framing::Tunnel { max })`
//! the way a connection receives them: read in chunks into a buffer, decode
//! until `NeedMore`, consume each frame, stop at the first error. Every frame
//! must be a well-formed `[size][command][id][payload]` with `payload <= max`,
//! decode the same as the whole input at once, and survive every payload
//! parser; whatever a parser accepts must encode back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::codec::tunnel::{
    self, Command, HEADER_LEN, Hello, ListenRequest, MAX_NAME_LEN, MAX_PAYLOAD, TunnelFrame,
};
use switchboard::codec::{Decoded, Decoder, FrameError, Framing};

/// Input layout: these first bytes choose the run, the rest is the byte stream.
///
/// | offset | size | meaning                                                       |
/// |--------|------|---------------------------------------------------------------|
/// | 0      | 2    | `max`, big-endian; `0xFFxx` means `usize::MAX` (capped at 65 535) |
/// | 2      | 4    | read sizes, each `byte + 1`, used in turn, cycling            |
const SETUP_LEN: usize = 6;

/// An owned frame: (raw, payload).
type Owned = (Vec<u8>, Vec<u8>);

fuzz_target!(|data: &[u8]| {
    let Some((setup, stream)) = data.split_first_chunk::<SETUP_LEN>() else {
        return;
    };
    let [m0, m1, sizes @ ..] = *setup;
    let max = if m0 == 0xFF {
        usize::MAX
    } else {
        usize::from(u16::from_be_bytes([m0, m1]))
    };
    let framing = Framing::Tunnel { max };
    let bound = framing
        .max_encoded_len()
        .expect("tunnel frames are bounded");
    let max_eff = max.min(MAX_PAYLOAD);
    assert_eq!(bound, HEADER_LEN + max_eff);

    let sizes = sizes.map(|b| usize::from(b) + 1);
    let chunked = decode_chunked(framing, max_eff, stream, &sizes);
    let whole = decode_whole(framing, max_eff, stream);
    assert_eq!(chunked, whole, "chunked and one-shot decoding differ");

    let (frames, error) = whole;
    let framed: usize = frames.iter().map(|(raw, _)| raw.len()).sum();
    assert!(framed <= stream.len(), "consumed more than the input");
    if let Some(FrameError::TooLong { len, max }) = error {
        // The error names the announced size of the next frame's header.
        assert_eq!(max, max_eff);
        assert!(len > max);
        let head = &stream[framed..];
        assert!(head.len() >= 2);
        assert_eq!(len, usize::from(u16::from_be_bytes([head[0], head[1]])));
    }
    for (raw, payload) in &frames {
        check_payload_parsers(raw, payload);
        check_framing_encode(framing, payload);
    }
});

/// Check one decoded frame and return it owned.
fn check_frame(max_eff: usize, raw: &[u8], payload: &[u8], used: usize) -> Owned {
    assert_eq!(used, raw.len());
    assert!(used >= HEADER_LEN);
    assert!(
        payload.len() <= max_eff,
        "payload {} > max {max_eff}",
        payload.len()
    );
    assert_eq!(&raw[HEADER_LEN..], payload);
    assert_eq!(
        usize::from(u16::from_be_bytes([raw[0], raw[1]])),
        payload.len()
    );
    let f = TunnelFrame::parse(raw).expect("a decoded frame parses");
    assert_eq!(f.payload, payload);
    assert_eq!(f.id, raw[3]);
    assert_eq!(f.command.to_u8(), raw[2]);
    assert_eq!(Command::from_u8(raw[2]), f.command);
    assert_eq!(
        tunnel::header(f.command, f.id, payload.len()),
        Some([raw[0], raw[1], raw[2], raw[3]])
    );
    // A frame with bytes missing or added is not one frame.
    assert!(TunnelFrame::parse(&raw[..raw.len() - 1]).is_none());
    (raw.to_vec(), payload.to_vec())
}

/// Decode `input` handed over in one piece.
fn decode_whole(
    framing: Framing,
    max_eff: usize,
    mut input: &[u8],
) -> (Vec<Owned>, Option<FrameError>) {
    let mut decoder = Decoder::new(framing);
    assert!(!decoder.resync(), "tunnel framing cannot resynchronise");
    let mut frames = Vec::new();
    loop {
        match decoder.decode(input) {
            Ok(Decoded::Frame(frame, used)) => {
                frames.push(check_frame(max_eff, frame.raw, frame.payload, used));
                input = &input[used..];
            }
            Ok(Decoded::NeedMore) => {
                assert!(
                    input.len() < HEADER_LEN + max_eff,
                    "NeedMore with a whole frame's worth buffered"
                );
                return (frames, None);
            }
            Ok(Decoded::Skipped(n)) => panic!("tunnel framing skipped {n} bytes"),
            Err(e) => return (frames, Some(e)),
        }
    }
}

/// Decode `input` the way the engine receives it: reads of `sizes` bytes in
/// turn into a buffer of `header + max` bytes, decoding and consuming after each.
fn decode_chunked(
    framing: Framing,
    max_eff: usize,
    mut input: &[u8],
    sizes: &[usize],
) -> (Vec<Owned>, Option<FrameError>) {
    let capacity = HEADER_LEN + max_eff;
    let mut buf: Vec<u8> = Vec::with_capacity(capacity);
    let mut decoder = Decoder::new(framing);
    let mut frames = Vec::new();
    let mut fed = 0usize;
    let mut consumed = 0usize;
    for &size in sizes.iter().cycle() {
        if input.is_empty() {
            break;
        }
        let room = capacity - buf.len();
        let (read, rest) = input.split_at(size.min(room).min(input.len()));
        buf.extend_from_slice(read);
        fed += read.len();
        input = rest;
        loop {
            match decoder.decode(&buf) {
                Ok(Decoded::Frame(frame, used)) => {
                    assert!(std::ptr::eq(frame.raw.as_ptr(), buf.as_ptr()));
                    frames.push(check_frame(max_eff, frame.raw, frame.payload, used));
                    consumed += used;
                    assert!(consumed <= fed, "consumed {consumed} of {fed} bytes");
                    buf.drain(..used);
                }
                Ok(Decoded::NeedMore) => break,
                Ok(Decoded::Skipped(n)) => panic!("tunnel framing skipped {n} bytes"),
                Err(e) => return (frames, Some(e)),
            }
        }
        // Waiting for more input with a full buffer would wait forever.
        assert!(
            buf.len() < capacity,
            "decoder wants more than {capacity} buffered bytes"
        );
    }
    (frames, None)
}

/// Every payload parser on `payload`: no panic, and what parses re-encodes to itself.
fn check_payload_parsers(raw: &[u8], payload: &[u8]) {
    if let Some(req) = ListenRequest::parse(payload) {
        assert!(req.name.len() <= MAX_NAME_LEN);
        assert!(std::str::from_utf8(req.name).is_ok());
        assert_eq!(ListenRequest::encoded_len(req.name.len()), payload.len());
        let mut out = Vec::new();
        assert_eq!(req.encode(&mut out), Some(()));
        assert_eq!(out, payload, "LISTEN request round trip");
        // Too little room: nothing written.
        let mut short = vec![0u8; payload.len() - 1];
        let mut dst = &mut short[..];
        assert_eq!(req.encode(&mut dst), None);
        assert!(short.iter().all(|&b| b == 0));
    }
    if let Some(hello) = Hello::parse(payload) {
        assert_eq!(payload.len(), Hello::ENCODED_LEN);
        assert_eq!(&hello.encode()[..], payload, "HELLO round trip");
    }
    if let Some((peer, target)) = tunnel::parse_peer(payload) {
        let (prefix, n) = tunnel::encode_peer(peer);
        let mut out = prefix[..n].to_vec();
        out.extend_from_slice(target);
        assert_eq!(out, payload, "CONNECT peer address round trip");
    }
    if let Some(inc) = tunnel::parse_window(payload) {
        assert!(inc > 0);
        assert_eq!(&inc.to_be_bytes()[..], payload, "WINDOW round trip");
    }
    // The whole frame as a payload too: parsers see headers as data.
    let _ = ListenRequest::parse(raw);
    let _ = Hello::parse(raw);
    let _ = tunnel::parse_peer(raw);
    let _ = tunnel::parse_window(raw);
}

/// The generic encoder (a DATA frame for id 0) decodes back to the payload.
fn check_framing_encode(framing: Framing, payload: &[u8]) {
    let mut wire = Vec::new();
    framing
        .encode(payload, &mut wire)
        .expect("a decoded payload fits its framing");
    assert_eq!(framing.encoded_len(payload.len()), Some(wire.len()));
    let mut decoder = Decoder::new(framing);
    let Ok(Decoded::Frame(frame, used)) = decoder.decode(&wire) else {
        panic!("an encoded frame must decode");
    };
    assert_eq!(used, wire.len());
    assert_eq!(frame.payload, payload);
    let f = TunnelFrame::parse(frame.raw).expect("parses");
    assert_eq!((f.command, f.id), (Command::Data, 0));
}
