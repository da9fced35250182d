//! The tunnel link's frames (docs/PROTOCOL.md): a 4-byte header, then the payload.
//!
//! Invariant: the announced size is checked against the decoder's `max` as
//! soon as the header is complete, before any body byte is awaited; the
//! header is parsed once per frame. Every payload parser takes untrusted
//! bytes and returns `None` rather than panicking. Allocation: none.
#![deny(clippy::indexing_slicing)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{Buf, BufMut};

use super::{Decoded, Frame, FrameError};

/// Bytes in a frame header.
///
/// | offset | size | field                                    |
/// |--------|------|------------------------------------------|
/// | 0      | 2    | payload size `n`, unsigned big-endian     |
/// | 2      | 1    | command                                  |
/// | 3      | 1    | client id                                |
/// | 4      | `n`  | payload                                  |
pub const HEADER_LEN: usize = 4;
/// The largest payload a header can announce.
pub const MAX_PAYLOAD: usize = u16::MAX as usize;
/// The magic that opens an extension request (LISTEN) and answer (HELLO).
pub const MAGIC: [u8; 4] = *b"SBT1";
/// Bytes in a nonce (LISTEN and HELLO).
pub const NONCE_LEN: usize = 16;
/// Bytes in an HMAC-SHA256 tag (AUTH and READY).
pub const MAC_LEN: usize = 32;
/// The longest service name a LISTEN request may carry.
pub const MAX_NAME_LEN: usize = 64;
/// Bytes in a PING / PONG payload.
pub const PING_LEN: usize = 8;

/// A frame's command byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// 1, server → agent: a client connected (payload: empty or a target; extended: see PROTOCOL.md).
    Connect,
    /// 2, either way: the stream is closed (extended: acknowledged by a CLOSE back).
    Close,
    /// 3, either way: stream bytes (1..=65535).
    Data,
    /// 4, agent → server: open the public port (payload: empty, or an extension request).
    Listen,
    /// 16, server → agent: the answer to an extension request.
    Hello,
    /// 17, agent → server: proof of the shared secret.
    Auth,
    /// 18, server → agent: the service is open (and the server's proof).
    Ready,
    /// 19, server → agent: the LISTEN was refused (reason code and text).
    Reject,
    /// 20, either way: liveness probe.
    Ping,
    /// 21, either way: the answer to a PING, same payload.
    Pong,
    /// 22, either way: more credit for a stream (u32 increment).
    Window,
    /// 23, either way: no more DATA on this stream from the sender (half-close).
    Shutdown,
    /// Anything else: ignored and counted.
    Unknown(u8),
}

/// One frame of the link, borrowed from the read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunnelFrame<'a> {
    /// The command.
    pub command: Command,
    /// The client (stream) id; 0 for link-level commands.
    pub id: u8,
    /// The payload (its size is the header's size field).
    pub payload: &'a [u8],
}

/// Decoder for tunnel frames whose payload is at most `max` bytes (at most 65 535).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelDecoder {
    max: usize,
    /// The current frame's payload size once its header has been checked.
    body: Option<usize>,
}

/// Extension bits, requested in LISTEN and granted in HELLO.
pub mod ext {
    /// Shared-secret challenge/response (AUTH, READY).
    pub const AUTH: u16 = 0x0001;
    /// PING / PONG on the link.
    pub const HEARTBEAT: u16 = 0x0002;
    /// A CLOSE is answered by a CLOSE; an id is free again only then.
    pub const CLOSE_ACK: u16 = 0x0004;
    /// Per-stream credit windows (WINDOW).
    pub const CREDIT: u16 = 0x0008;
    /// SHUTDOWN: end one direction of a stream. Granted only with `CLOSE_ACK`.
    pub const HALF_CLOSE: u16 = 0x0010;
    /// The public client's address in CONNECT.
    pub const PEER_ADDR: u16 = 0x0020;
    /// Every extension this implementation knows.
    pub const ALL: u16 = AUTH | HEARTBEAT | CLOSE_ACK | CREDIT | HALF_CLOSE | PEER_ADDR;
}

/// An extension request: the payload of a non-empty LISTEN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenRequest<'a> {
    /// Extensions asked for ([`ext`] bits; unknown bits are ignored).
    pub flags: u16,
    /// Credit the agent grants the server on each new stream, in bytes.
    pub window: u32,
    /// The agent's fresh random nonce.
    pub nonce: [u8; NONCE_LEN],
    /// The service name (UTF-8, at most [`MAX_NAME_LEN`] bytes; may be empty).
    pub name: &'a [u8],
}

/// The server's answer to an extension request: the payload of HELLO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Extensions granted: a subset of those asked for. `AUTH` set means the
    /// agent must answer with AUTH before the service opens.
    pub flags: u16,
    /// Credit the server grants the agent on each new stream, in bytes.
    pub window: u32,
    /// The server's fresh random nonce (the challenge).
    pub nonce: [u8; NONCE_LEN],
}

/// REJECT reason codes.
pub mod reject {
    /// No service by that name (or no service without a token for an empty LISTEN).
    pub const UNKNOWN_SERVICE: u8 = 1;
    /// The AUTH tag did not match.
    pub const AUTH_FAILED: u8 = 2;
    /// The service has a token and the LISTEN did not ask for AUTH.
    pub const AUTH_REQUIRED: u8 = 3;
    /// The request could not be parsed.
    pub const MALFORMED: u8 = 4;
    /// The public port could not be opened.
    pub const LISTEN_FAILED: u8 = 5;
}

// ===== impl Command =====

impl Command {
    /// The command for a byte.
    pub fn from_u8(b: u8) -> Command {
        match b {
            1 => Command::Connect,
            2 => Command::Close,
            3 => Command::Data,
            4 => Command::Listen,
            16 => Command::Hello,
            17 => Command::Auth,
            18 => Command::Ready,
            19 => Command::Reject,
            20 => Command::Ping,
            21 => Command::Pong,
            22 => Command::Window,
            23 => Command::Shutdown,
            other => Command::Unknown(other),
        }
    }

    /// The command's byte.
    pub fn to_u8(self) -> u8 {
        match self {
            Command::Connect => 1,
            Command::Close => 2,
            Command::Data => 3,
            Command::Listen => 4,
            Command::Hello => 16,
            Command::Auth => 17,
            Command::Ready => 18,
            Command::Reject => 19,
            Command::Ping => 20,
            Command::Pong => 21,
            Command::Window => 22,
            Command::Shutdown => 23,
            Command::Unknown(b) => b,
        }
    }
}

// ===== impl TunnelFrame =====

impl<'a> TunnelFrame<'a> {
    /// Split a whole frame (as [`TunnelDecoder`] returns it in `Frame::raw`)
    /// into command, id and payload. `None` if `raw` is not exactly one frame.
    pub fn parse(raw: &'a [u8]) -> Option<TunnelFrame<'a>> {
        let (head, payload) = raw.split_at_checked(HEADER_LEN)?;
        let mut head = head;
        let size = usize::from(head.try_get_u16().ok()?);
        let command = Command::from_u8(head.try_get_u8().ok()?);
        let id = head.try_get_u8().ok()?;
        (payload.len() == size).then_some(TunnelFrame {
            command,
            id,
            payload,
        })
    }
}

/// The header of a frame with a payload of `len` bytes; `None` if `len` > 65 535.
pub fn header(command: Command, id: u8, len: usize) -> Option<[u8; HEADER_LEN]> {
    let size = u16::try_from(len).ok()?.to_be_bytes();
    Some([size[0], size[1], command.to_u8(), id])
}

// ===== impl TunnelDecoder =====

impl TunnelDecoder {
    /// A decoder for frames with payloads of up to `max` bytes (capped at 65 535).
    pub fn new(max: usize) -> TunnelDecoder {
        TunnelDecoder {
            max: max.min(MAX_PAYLOAD),
            body: None,
        }
    }

    /// The longest accepted payload in bytes.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Decode the next frame from `src`; `Frame::raw` is the whole frame and
    /// `Frame::payload` the bytes after the header (parse `raw` with
    /// [`TunnelFrame::parse`] for command and id).
    ///
    /// # Errors
    /// [`FrameError::TooLong`] as soon as a header announces more than `max`
    /// payload bytes, without waiting for the body.
    pub fn decode<'a>(&mut self, src: &'a [u8]) -> Result<Decoded<'a>, FrameError> {
        let len = match self.body {
            Some(len) => len,
            None => {
                let mut head = src;
                let Ok(len) = head.try_get_u16() else {
                    return Ok(Decoded::NeedMore);
                };
                let len = usize::from(len);
                if len > self.max {
                    return Err(FrameError::TooLong { len, max: self.max });
                }
                self.body = Some(len);
                len
            }
        };
        // len <= 65535, so this cannot overflow even on 16-bit targets' usize (>= 65539 needs 17 bits).
        let too_long = FrameError::TooLong { len, max: self.max };
        let frame_len = HEADER_LEN.checked_add(len).ok_or(too_long)?;
        let Some((raw, _)) = src.split_at_checked(frame_len) else {
            return Ok(Decoded::NeedMore);
        };
        let payload = raw.get(HEADER_LEN..).unwrap_or_default();
        self.body = None;
        Ok(Decoded::Frame(Frame { raw, payload }, frame_len))
    }

    /// Forget a header already read.
    pub fn reset(&mut self) {
        self.body = None;
    }
}

// ===== extension payloads =====

impl<'a> ListenRequest<'a> {
    /// Bytes of a request for a name of `name_len` bytes.
    pub fn encoded_len(name_len: usize) -> usize {
        MAGIC.len() + 2 + 4 + NONCE_LEN + 1 + name_len
    }

    /// Parse a LISTEN payload. `None` if it is not a well-formed request
    /// (an empty payload is the base protocol and is not a request).
    pub fn parse(mut p: &'a [u8]) -> Option<ListenRequest<'a>> {
        let (magic, rest) = p.split_at_checked(MAGIC.len())?;
        if magic != MAGIC {
            return None;
        }
        p = rest;
        let flags = p.try_get_u16().ok()?;
        let window = p.try_get_u32().ok()?;
        let nonce = take_array::<NONCE_LEN>(&mut p)?;
        let name_len = usize::from(p.try_get_u8().ok()?);
        if name_len > MAX_NAME_LEN || p.len() != name_len {
            return None;
        }
        std::str::from_utf8(p).ok()?;
        Some(ListenRequest {
            flags,
            window,
            nonce,
            name: p,
        })
    }

    /// Append the request to `dst`. `None` (nothing written) if the name is
    /// longer than [`MAX_NAME_LEN`] or `dst` is short.
    pub fn encode(&self, dst: &mut impl BufMut) -> Option<()> {
        let name_len = u8::try_from(self.name.len())
            .ok()
            .filter(|&n| usize::from(n) <= MAX_NAME_LEN)?;
        if dst.remaining_mut() < ListenRequest::encoded_len(self.name.len()) {
            return None;
        }
        dst.put_slice(&MAGIC);
        dst.put_u16(self.flags);
        dst.put_u32(self.window);
        dst.put_slice(&self.nonce);
        dst.put_u8(name_len);
        dst.put_slice(self.name);
        Some(())
    }
}

impl Hello {
    /// Bytes of an encoded HELLO payload.
    pub const ENCODED_LEN: usize = MAGIC.len() + 2 + 4 + NONCE_LEN;

    /// Parse a HELLO payload; `None` if malformed.
    pub fn parse(mut p: &[u8]) -> Option<Hello> {
        let (magic, rest) = p.split_at_checked(MAGIC.len())?;
        if magic != MAGIC {
            return None;
        }
        p = rest;
        let flags = p.try_get_u16().ok()?;
        let window = p.try_get_u32().ok()?;
        let nonce = take_array::<NONCE_LEN>(&mut p)?;
        p.is_empty().then_some(Hello {
            flags,
            window,
            nonce,
        })
    }

    /// The encoded payload.
    pub fn encode(&self) -> [u8; Hello::ENCODED_LEN] {
        let mut out = [0u8; Hello::ENCODED_LEN];
        let mut dst = &mut out[..];
        dst.put_slice(&MAGIC);
        dst.put_u16(self.flags);
        dst.put_u32(self.window);
        dst.put_slice(&self.nonce);
        out
    }
}

/// The longest extended CONNECT address prefix (family, IPv6 address, port).
pub const MAX_PEER_LEN: usize = 1 + 16 + 2;

/// Encode a client address for an extended CONNECT (`PEER_ADDR`): family
/// byte 4 or 6, the address, the port (big-endian). Returns the buffer and
/// how many of its bytes are used.
pub fn encode_peer(peer: SocketAddr) -> ([u8; MAX_PEER_LEN], usize) {
    let mut out = [0u8; MAX_PEER_LEN];
    let mut dst = &mut out[..];
    match peer.ip() {
        IpAddr::V4(ip) => {
            dst.put_u8(4);
            dst.put_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            dst.put_u8(6);
            dst.put_slice(&ip.octets());
        }
    }
    dst.put_u16(peer.port());
    let used = MAX_PEER_LEN - dst.len();
    (out, used)
}

/// Split an extended CONNECT payload into the client's address and the
/// target (possibly empty). `None` if malformed.
pub fn parse_peer(mut p: &[u8]) -> Option<(SocketAddr, &[u8])> {
    let ip = match p.try_get_u8().ok()? {
        4 => IpAddr::V4(Ipv4Addr::from(take_array::<4>(&mut p)?)),
        6 => IpAddr::V6(Ipv6Addr::from(take_array::<16>(&mut p)?)),
        _ => return None,
    };
    let port = p.try_get_u16().ok()?;
    Some((SocketAddr::new(ip, port), p))
}

/// Parse a WINDOW payload (a u32 increment, at least 1).
pub fn parse_window(mut p: &[u8]) -> Option<u32> {
    let n = p.try_get_u32().ok()?;
    (p.is_empty() && n > 0).then_some(n)
}

fn take_array<const N: usize>(p: &mut &[u8]) -> Option<[u8; N]> {
    let (head, rest) = p.split_at_checked(N)?;
    let out = <[u8; N]>::try_from(head).ok()?;
    *p = rest;
    Some(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "tests")]
mod tests {
    use super::*;

    fn frame(cmd: u8, id: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = (payload.len() as u16).to_be_bytes().to_vec();
        v.extend([cmd, id]);
        v.extend(payload);
        v
    }

    #[test]
    fn decodes_every_split() {
        let mut wire = frame(3, 7, b"hello");
        wire.extend(frame(2, 7, b""));
        for split in 0..=wire.len() {
            let mut d = TunnelDecoder::new(MAX_PAYLOAD);
            let mut buf = wire[..split].to_vec();
            let mut got = Vec::new();
            let mut fed = split;
            loop {
                match d.decode(&buf).unwrap() {
                    Decoded::Frame(f, used) => {
                        let t = TunnelFrame::parse(f.raw).unwrap();
                        got.push((t.command, t.id, t.payload.to_vec()));
                        assert_eq!(f.payload, t.payload);
                        buf.drain(..used);
                    }
                    Decoded::NeedMore if fed < wire.len() => {
                        buf.push(wire[fed]);
                        fed += 1;
                    }
                    Decoded::NeedMore => break,
                    Decoded::Skipped(_) => unreachable!(),
                }
            }
            assert_eq!(
                got,
                vec![
                    (Command::Data, 7, b"hello".to_vec()),
                    (Command::Close, 7, Vec::new())
                ],
                "split at {split}"
            );
        }
    }

    #[test]
    fn size_checked_before_body() {
        let max = frame(3, 1, &[0; 10]);
        assert!(matches!(
            TunnelDecoder::new(10).decode(&max),
            Ok(Decoded::Frame(_, 14))
        ));
        let head = [0u8, 11, 3, 1];
        assert_eq!(
            TunnelDecoder::new(10).decode(&head),
            Err(FrameError::TooLong { len: 11, max: 10 })
        );
        assert_eq!(
            TunnelDecoder::new(10).decode(&head[..1]),
            Ok(Decoded::NeedMore)
        );
    }

    #[test]
    fn listen_request_round_trip_and_rejects() {
        let req = ListenRequest {
            flags: ext::ALL,
            window: 1 << 18,
            nonce: [9; NONCE_LEN],
            name: b"dev1",
        };
        let mut buf = Vec::new();
        req.encode(&mut buf).unwrap();
        assert_eq!(buf.len(), ListenRequest::encoded_len(4));
        assert_eq!(ListenRequest::parse(&buf), Some(req));
        for cut in 0..buf.len() {
            assert_eq!(ListenRequest::parse(&buf[..cut]), None, "cut {cut}");
        }
        let mut long = buf.clone();
        long.push(b'x');
        assert_eq!(ListenRequest::parse(&long), None);
        let mut bad = buf.clone();
        bad[0] = b'X';
        assert_eq!(ListenRequest::parse(&bad), None);
        let name = [b'a'; MAX_NAME_LEN + 1];
        let too_long = ListenRequest { name: &name, ..req };
        assert_eq!(too_long.encode(&mut Vec::new()), None);
    }

    #[test]
    fn hello_and_peer_round_trip() {
        let h = Hello {
            flags: ext::CREDIT | ext::AUTH,
            window: 65536,
            nonce: [3; NONCE_LEN],
        };
        assert_eq!(Hello::parse(&h.encode()), Some(h));
        assert_eq!(Hello::parse(&h.encode()[..Hello::ENCODED_LEN - 1]), None);
        for peer in ["10.1.2.3:4567", "[2001:db8::1]:80"] {
            let peer: SocketAddr = peer.parse().unwrap();
            let (buf, n) = encode_peer(peer);
            let mut p = buf[..n].to_vec();
            p.extend(b"127.0.0.1:23");
            assert_eq!(parse_peer(&p), Some((peer, &b"127.0.0.1:23"[..])));
            assert_eq!(parse_peer(&buf[..n - 1]), None);
        }
        assert_eq!(parse_peer(&[5, 0, 0]), None);
        assert_eq!(parse_window(&[0, 0, 1, 0]), Some(256));
        assert_eq!(parse_window(&[0, 0, 0, 0]), None);
        assert_eq!(parse_window(&[0, 0, 1]), None);
    }

    #[test]
    fn commands_round_trip() {
        for b in 0..=255u8 {
            assert_eq!(Command::from_u8(b).to_u8(), b);
        }
        assert_eq!(header(Command::Data, 5, 70_000), None);
        assert_eq!(header(Command::Data, 5, 258), Some([1, 2, 3, 5]));
    }
}
