//! switchboard: a single-threaded TCP gateway engine.
//!
//! One hand-written [`mio`] poll loop on one thread owns every socket, in one
//! [`slab::Slab`] of connections. Each connection has its own frame decoder
//! ([`codec`]), a read buffer borrowed from a pool only while it holds
//! unconsumed bytes, and a bounded queue of outgoing buffers written with one
//! vectored write. Roles ([`Role`], the engine's [`Handler`]) give the engine its
//! jobs; they see events and act through a [`Ctx`], and the protocol logic
//! behind them ([`proto`]) is sans-IO: bytes and time in, decisions out. Nothing grows without a configured
//! bound, and nothing is allocated per read, frame or write in steady state.
//! Counters are declared once ([`counters!`], [`metrics`]): the declaration
//! gives each its `/status` field and Prometheus family.
//!
//! ```text
//!              +-------------------------- Engine::turn ---------------------------+
//!  poll(timeout = 0 if work is pending, else the next timer deadline)              |
//!     |                                                                            |
//!     +-- listener --> accept until WouldBlock / max_connections / EMFILE          |
//!     |                  --> Handler::on_accept                                    |
//!     +-- connection --> readiness |= event --> pump(conn):                        |
//!     |                    flush the queue (vectored writes, WRITE_BUDGET a turn)  |
//!     |                    read --> decoder --> Handler::on_frame(ctx, conn, ..)   |
//!     |                      (read budget spent? -> ready list)    |               |
//!     |                    flush again                             v               |
//!     +-- waker -------> Handle messages, reload requests   Ctx: send / close /   |
//!     +-- signals -----> SIGINT/SIGTERM: stop; SIGHUP: reload   pause / listen /   |
//!                                                               connect / timers   |
//!  fire timers: the engine's (idle, connect, linger, stall) and the handlers'      |
//!               (Handler::on_timer, Handler::on_conn_timer)                        |
//!  pump the ready list                                                             |
//!  serve the reports asked for this turn (one build per kind)                      |
//!  reap: connections closed this turn --> Handler::on_closed; a graceful close     |
//!        drains the peer's input (engine only) until EOF or linger, then frees     |
//!  trim the buffer pool; begin stopping if asked; resume accepting if a slot freed |
//!              +-------------------------------------------------------------------+
//! ```
//!
//! # Adding a role
//!
//! A role implements [`Role`]. This one answers every line with its length,
//! closes clients that stay silent for 30 seconds, and is run by an engine:
//!
//! ```
//! use std::net::SocketAddr;
//! use std::time::Duration;
//! use switchboard::codec::{Frame, Framing};
//! use switchboard::{ConnKey, Ctx, Engine, EngineError, ListenOptions, ListenerId, Role};
//!
//! struct LineLength {
//!     listen: SocketAddr,
//! }
//!
//! impl Role for LineLength {
//!     fn name(&self) -> &str {
//!         "line-length"
//!     }
//!
//!     fn start(&mut self, ctx: &mut Ctx<'_>) -> Result<(), EngineError> {
//!         let opts = ListenOptions { framing: Framing::Line { max: 1024 }, ..Default::default() };
//!         ctx.listen(self.listen, opts)?;
//!         Ok(())
//!     }
//!
//!     fn on_accept(&mut self, ctx: &mut Ctx<'_>, _: ListenerId, conn: ConnKey, _: SocketAddr) {
//!         ctx.set_idle_timeout(conn, Some(Duration::from_secs(30)));
//!     }
//!
//!     fn on_frame(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey, frame: Frame<'_>) {
//!         let mut digits = [0u8; 24];
//!         let n = write_decimal(frame.payload.len(), &mut digits);
//!         // A full queue means a client that does not read: drop it.
//!         if ctx.send(conn, &digits[..n]).is_err() {
//!             ctx.abort(conn);
//!         }
//!     }
//! }
//!
//! fn write_decimal(mut v: usize, out: &mut [u8; 24]) -> usize {
//!     let mut tmp = [0u8; 20];
//!     let mut i = tmp.len();
//!     loop {
//!         i -= 1;
//!         tmp[i] = b'0' + (v % 10) as u8;
//!         v /= 10;
//!         if v == 0 { break; }
//!     }
//!     let n = tmp.len() - i;
//!     out[..n].copy_from_slice(&tmp[i..]);
//!     out[n] = b'\n';
//!     n + 1
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut engine = Engine::new(Default::default())?;
//! engine.add_role(Box::new(LineLength { listen: "127.0.0.1:0".parse()? }));
//! engine.start()?;
//! let addr = engine.listeners()[0].addr;
//! let handle = engine.handle();
//! let thread = std::thread::spawn(move || engine.run());
//!
//! use std::io::{BufRead, BufReader, Write};
//! let mut client = std::net::TcpStream::connect(addr)?;
//! client.write_all(b"hello\r\nswitchboard\n")?;
//! let mut lines = BufReader::new(client).lines();
//! assert_eq!(lines.next().transpose()?.as_deref(), Some("5"));
//! assert_eq!(lines.next().transpose()?.as_deref(), Some("11"));
//!
//! handle.stop();
//! thread.join().expect("engine thread")?;
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]

mod app;
pub mod codec;
pub mod config;
pub mod engine;
pub mod metrics;
pub mod proto;
pub mod role;

pub use config::{Config, ConfigError};
pub use engine::{
    CloseReason, ConnKey, ConnectOptions, Ctx, Dropped, Engine, EngineError, Handle, HandleError,
    Keepalive, ListenError, ListenOptions, ListenerId, ListenerInfo, Message, RoleId, SendError,
    StatsSnapshot, TimerKey, View,
};
pub use engine::{Handler, OnFrameError, Reconfigure, Report, ReportKind};
pub use role::Role;
