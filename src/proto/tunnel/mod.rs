//! The tunnel protocol (docs/PROTOCOL.md), sans IO: frames as a typed value
//! ([`frame`]), the authentication tags ([`auth`]), one link's state machine
//! ([`session`]) and the counters it keeps ([`stats`]). The tunnel roles are
//! the adapters that connect a [`Session`] to the engine's sockets and timers.

pub mod auth;
pub mod frame;
pub mod session;
pub mod stats;

pub use frame::{Frame, Listen};
pub use session::{
    AfterSend, AgentHello, End, Event, Failure, IDS, Incoming, LINK_HIGH, LinkEvent, NoId, Problem,
    Session, Settings,
};
pub use stats::{AgentState, Status, TunnelStats};

#[cfg(test)]
mod tests;
