//! Decode throughput of each framing, in bytes per second.
//!
//! Each bench decodes a buffer holding many frames from start to end, the way
//! the engine drains a connection's receive buffer: decode, consume, repeat.
#![allow(
    clippy::unwrap_used,
    reason = "bench setup: a failed encode is a broken bench and should stop it"
)]

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use switchboard::codec::{Decoded, Decoder, Framing};

/// Bytes of frames in each bench buffer, whatever the frame size.
const BUFFER_BYTES: usize = 256 * 1024;

/// A buffer of about `BUFFER_BYTES` holding frames of `payload_len` bytes each.
fn frames(framing: Framing, payload_len: usize) -> Vec<u8> {
    let payload: Vec<u8> = (b'a'..=b'z').cycle().take(payload_len).collect();
    let frame_len = framing.encoded_len(payload_len).unwrap();
    let mut buf = Vec::with_capacity(BUFFER_BYTES + frame_len);
    while buf.len() < BUFFER_BYTES {
        framing.encode(&payload, &mut buf).unwrap();
    }
    buf
}

/// Decode every frame in `buf`; returns the payload bytes seen so the work
/// cannot be optimised away.
fn decode_all(decoder: &mut Decoder, mut buf: &[u8]) -> usize {
    let mut payload_bytes = 0;
    while let Ok(Decoded::Frame(frame, consumed)) = decoder.decode(buf) {
        payload_bytes += black_box(frame.payload).len();
        buf = buf.get(consumed..).unwrap_or_default();
    }
    payload_bytes
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    let cases = [
        ("line", Framing::Line { max: 1024 }, 63),
        ("u16", Framing::U16 { max: 8192 }, 64),
        ("u16", Framing::U16 { max: 8192 }, 4096),
        ("u32", Framing::U32 { max: 8192 }, 64),
        ("u32", Framing::U32 { max: 8192 }, 4096),
    ];
    for (name, framing, payload_len) in cases {
        let buf = frames(framing, payload_len);
        let frame_len = framing.encoded_len(payload_len).unwrap();
        group.throughput(Throughput::Bytes(buf.len() as u64));
        group.bench_with_input(BenchmarkId::new(name, frame_len), &buf, |b, buf| {
            let mut decoder = Decoder::new(framing);
            b.iter(|| decode_all(&mut decoder, black_box(buf)));
        });
    }
    group.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);
