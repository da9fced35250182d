//! A tunnel frame as a typed value: the header and every payload parsed
//! once, where the frame enters the session. Nothing after this looks at a
//! command byte or a payload layout again.
//!
//! Invariant: parsing never fails on a whole frame (one that
//! [`crate::codec::tunnel::TunnelDecoder`] delimited): a payload that does not
//! have its command's shape becomes that variant's `None`, so the session
//! can count it and answer as the protocol says (docs/PROTOCOL.md).
//! Allocation: none; variable payloads borrow the read buffer.

use crate::codec::tunnel::{
    Command, HEADER_LEN, Hello, ListenRequest, MAC_LEN, PING_LEN, TunnelFrame, parse_window,
};

/// What a LISTEN asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen<'a> {
    /// An empty payload: a base-protocol agent.
    Base,
    /// An extension request.
    Request(ListenRequest<'a>),
    /// A payload that is neither.
    Malformed,
}

/// One frame of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Server → agent: a client connected as stream `id`. The payload is the
    /// target, after the client's address on a `PEER_ADDR` link (read by the
    /// session, which knows the flags).
    Connect {
        /// The stream.
        id: u8,
        /// The raw payload.
        payload: &'a [u8],
    },
    /// Either way: the stream is closed.
    Close {
        /// The stream.
        id: u8,
    },
    /// Either way: stream bytes (an empty payload is malformed).
    Data {
        /// The stream.
        id: u8,
        /// The bytes.
        payload: &'a [u8],
    },
    /// Agent → server: open the public port.
    Listen(Listen<'a>),
    /// Server → agent: the answer to an extension request; `None` if malformed.
    Hello(Option<Hello>),
    /// Agent → server: the agent's tag; `None` if not [`MAC_LEN`] bytes.
    Auth(Option<&'a [u8; MAC_LEN]>),
    /// Server → agent: the service is open; the payload is the server's tag
    /// (empty without AUTH).
    Ready(&'a [u8]),
    /// Server → agent: the LISTEN was refused.
    Reject {
        /// The reason code (`codec::tunnel::reject`); 0 if the payload is empty.
        code: u8,
        /// The reason text as sent (not checked).
        text: &'a [u8],
    },
    /// Either way: a liveness probe; `None` if not [`PING_LEN`] bytes.
    Ping(Option<&'a [u8; PING_LEN]>),
    /// Either way: the answer to a PING.
    Pong,
    /// Either way: more credit for stream `id`; `None` if not a u32 of at least 1.
    Window {
        /// The stream.
        id: u8,
        /// The increment.
        increment: Option<u32>,
    },
    /// Either way: no more DATA from the sender on stream `id`.
    Shutdown {
        /// The stream.
        id: u8,
    },
    /// A command this side does not know (ignored and counted).
    Unknown(u8),
}

impl<'a> Frame<'a> {
    /// Parse one whole frame (header and payload, as the decoder delimits
    /// it). `None` only if `raw` is not exactly one frame.
    pub fn parse(raw: &'a [u8]) -> Option<Frame<'a>> {
        let f = TunnelFrame::parse(raw)?;
        let (id, p) = (f.id, f.payload);
        Some(match f.command {
            Command::Connect => Frame::Connect { id, payload: p },
            Command::Close => Frame::Close { id },
            Command::Data => Frame::Data { id, payload: p },
            Command::Listen if p.is_empty() => Frame::Listen(Listen::Base),
            Command::Listen => {
                Frame::Listen(ListenRequest::parse(p).map_or(Listen::Malformed, Listen::Request))
            }
            Command::Hello => Frame::Hello(Hello::parse(p)),
            Command::Auth => Frame::Auth(p.try_into().ok()),
            Command::Ready => Frame::Ready(p),
            Command::Reject => {
                let (code, text) = p.split_first().map_or((0, &[][..]), |(c, t)| (*c, t));
                Frame::Reject { code, text }
            }
            Command::Ping => Frame::Ping(p.try_into().ok()),
            Command::Pong => Frame::Pong,
            Command::Window => Frame::Window {
                id,
                increment: parse_window(p),
            },
            Command::Shutdown => Frame::Shutdown { id },
            Command::Unknown(c) => Frame::Unknown(c),
        })
    }

    /// The frame's command name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Connect { .. } => "CONNECT",
            Frame::Close { .. } => "CLOSE",
            Frame::Data { .. } => "DATA",
            Frame::Listen(_) => "LISTEN",
            Frame::Hello(_) => "HELLO",
            Frame::Auth(_) => "AUTH",
            Frame::Ready(_) => "READY",
            Frame::Reject { .. } => "REJECT",
            Frame::Ping(_) => "PING",
            Frame::Pong => "PONG",
            Frame::Window { .. } => "WINDOW",
            Frame::Shutdown { .. } => "SHUTDOWN",
            Frame::Unknown(_) => "unknown",
        }
    }
}

/// Append one frame (header and payload) to `out`; `false` (nothing
/// written) if the payload is longer than a frame carries.
pub fn encode(out: &mut Vec<u8>, command: Command, id: u8, payload: &[u8]) -> bool {
    let Some(head) = crate::codec::tunnel::header(command, id, payload.len()) else {
        return false;
    };
    out.reserve(HEADER_LEN + payload.len());
    out.extend_from_slice(&head);
    out.extend_from_slice(payload);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(command: Command, id: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        assert!(encode(&mut v, command, id, payload));
        v
    }

    #[test]
    fn every_command_parses_to_its_variant_and_bad_payloads_to_none() {
        let cases: Vec<(Vec<u8>, Frame<'static>)> = vec![
            (raw(Command::Close, 7, b"x"), Frame::Close { id: 7 }),
            (raw(Command::Listen, 0, b""), Frame::Listen(Listen::Base)),
            (
                raw(Command::Listen, 0, b"SBT0xxxx"),
                Frame::Listen(Listen::Malformed),
            ),
            (raw(Command::Hello, 0, b"SBT1"), Frame::Hello(None)),
            (raw(Command::Auth, 0, &[0; 31]), Frame::Auth(None)),
            (raw(Command::Ping, 0, &[0; 9]), Frame::Ping(None)),
            (raw(Command::Pong, 0, b"anything"), Frame::Pong),
            (
                raw(Command::Window, 3, &0u32.to_be_bytes()),
                Frame::Window {
                    id: 3,
                    increment: None,
                },
            ),
            (
                raw(Command::Window, 3, &9u32.to_be_bytes()),
                Frame::Window {
                    id: 3,
                    increment: Some(9),
                },
            ),
            (raw(Command::Shutdown, 4, b""), Frame::Shutdown { id: 4 }),
            (raw(Command::Unknown(99), 0, b"zz"), Frame::Unknown(99)),
            (
                raw(Command::Reject, 0, b""),
                Frame::Reject { code: 0, text: b"" },
            ),
        ];
        for (bytes, want) in &cases {
            assert_eq!(Frame::parse(bytes).as_ref(), Some(want), "{bytes:?}");
        }
        let r = raw(Command::Reject, 0, b"\x02why");
        assert_eq!(
            Frame::parse(&r),
            Some(Frame::Reject {
                code: 2,
                text: b"why"
            })
        );
        // Not exactly one frame.
        assert_eq!(Frame::parse(&[0, 5, 3, 1, b'a']), None);
        assert_eq!(Frame::parse(&[0, 0, 3]), None);
    }
}
