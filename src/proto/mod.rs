//! Sans-IO protocol cores: decisions taken from bytes and from the time the
//! caller passes in, with no sockets, no engine context and no clock of their
//! own. The roles are the adapters that feed them engine events and carry out
//! what they decide; the cores are tested and fuzzed on their own, in
//! microseconds and deterministically.
//!
//! Layering: `proto` may use `codec`; it never imports `engine`, `role`,
//! `config` or `app`.

pub mod admin;
pub mod router;
pub mod tunnel;
