//! The contract between the engine and the roles it serves: what a role
//! answers to a framing error and to a changed configuration.

/// What to do after a framing error ([`crate::Role::on_frame_error`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFrameError {
    /// Close the connection (reason [`super::CloseReason::Frame`]).
    Close,
    /// Skip to the next frame boundary if the framing can find one (line
    /// framing: the next newline); otherwise close.
    Resync,
}

/// What a role did with a changed configuration ([`crate::Role::reconfigure`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconfigure {
    /// The change is in force; connections the new configuration still
    /// allows are untouched.
    Applied,
    /// The role cannot change in place: the engine closes its listeners and
    /// connections and starts a new instance.
    Restart,
}
