//! The contract between the engine and the roles it serves ([`Handler`]),
//! and what a role answers to a framing error and to a changed configuration.

use std::any::Any;
use std::net::SocketAddr;

use bytes::Bytes;

use super::{
    CloseReason, ConnKey, Ctx, EngineError, ListenerId, Message, Report, ReportKind, TimerKey, View,
};
use crate::codec::{Frame, FrameError};

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

/// A job served by the engine. See the crate documentation for a complete example.
///
/// Every callback gets a [`Ctx`] to queue bytes, close connections, pause and
/// resume reading, open listeners and connections, and set timers. All
/// callbacks but [`Handler::name`], [`Handler::start`] and [`Handler::on_frame`] have
/// default implementations that do nothing (or the obvious thing).
pub trait Handler: Send {
    /// A short name for logs and listings.
    fn name(&self) -> &str;

    /// Open listeners and initial connections.
    ///
    /// # Errors
    /// Whatever prevents the role from running, typically a
    /// [`crate::ListenError`] converted with `?`.
    fn start(&mut self, ctx: &mut Ctx<'_>) -> Result<(), EngineError>;

    /// A connection was accepted on one of this role's listeners.
    fn on_accept(
        &mut self,
        ctx: &mut Ctx<'_>,
        listener: ListenerId,
        conn: ConnKey,
        peer: SocketAddr,
    ) {
        let _ = (ctx, listener, conn, peer);
    }

    /// An outbound connection from [`Ctx::connect`] is established.
    fn on_connected(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey) {
        let _ = (ctx, conn);
    }

    /// An outbound connection failed or timed out before it was established.
    fn on_connect_failed(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey, reason: CloseReason) {
        let _ = (ctx, conn, reason);
    }

    /// A whole frame arrived. `frame` borrows the connection's read buffer and
    /// is valid only during the call; copy it with [`Ctx::send`] or into a
    /// `Bytes` to keep it.
    fn on_frame(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey, frame: Frame<'_>);

    /// The frames from one read of `conn` have all been handed to
    /// [`Handler::on_frame`]: a role that batches per read (one shared buffer
    /// for many records) sends the batch here.
    fn on_input_done(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey) {
        let _ = (ctx, conn);
    }

    /// The input broke the connection's framing (a frame longer than its
    /// maximum). The default closes the connection; a role may ask to
    /// resynchronise instead, which line framing supports (the rest of the
    /// over-long line is skipped up to its newline).
    fn on_frame_error(
        &mut self,
        ctx: &mut Ctx<'_>,
        conn: ConnKey,
        error: FrameError,
    ) -> OnFrameError {
        let _ = (ctx, conn, error);
        OnFrameError::Close
    }

    /// The peer shut down its sending side (EOF). The default closes the
    /// connection once its queue is flushed; a role that supports half-close
    /// can keep writing instead.
    fn on_read_closed(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey) {
        ctx.close(conn);
    }

    /// The connection's send queue has drained completely after it had passed
    /// half its bound, refused a send, or reading was paused.
    fn on_writable(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey) {
        let _ = (ctx, conn);
    }

    /// The connection is gone; its key is stale from now on. After a graceful
    /// close this comes once the queue is flushed and FIN sent; the engine
    /// alone then reads the peer's input away until it closes too.
    fn on_closed(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey, reason: CloseReason) {
        let _ = (ctx, conn, reason);
    }

    /// A timer set with [`Ctx::set_timer`] fired; `purpose` is the number
    /// the role gave it.
    fn on_timer(&mut self, ctx: &mut Ctx<'_>, timer: TimerKey, purpose: u64) {
        let _ = (ctx, timer, purpose);
    }

    /// A timer set with [`Ctx::set_conn_timer`] for `conn` fired (`conn` is
    /// still open: the engine cancels a connection's timers when it closes).
    fn on_conn_timer(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey, timer: TimerKey, purpose: u64) {
        let _ = (ctx, conn, timer, purpose);
    }

    /// A message from another thread ([`crate::Handle::send`]).
    fn on_message(&mut self, ctx: &mut Ctx<'_>, msg: Message) {
        let _ = (ctx, msg);
    }

    /// Live reload: the role's configuration changed (it is never called
    /// with an unchanged one). `new` is the role's own configuration (a
    /// built-in role gets its section, e.g. a `RouterConfig`; an embedder's
    /// role whatever it is given with [`crate::Engine::reconfigure_role`]):
    /// downcast it, apply what can change in place and return
    /// [`Reconfigure::Applied`], leaving alone every connection the new
    /// configuration still allows. The default asks for a restart.
    fn reconfigure(&mut self, ctx: &mut Ctx<'_>, new: &dyn Any) -> Reconfigure {
        let _ = (ctx, new);
        Reconfigure::Restart
    }

    /// The role's kind for reports (`"echo"`, `"router"`, ...).
    fn kind(&self) -> &str {
        "custom"
    }

    /// Write this role's part of a status or metrics report: the role's
    /// JSON object is open, and metric samples get its kind and name as labels.
    /// Counters declared with [`crate::counters!`] go in with
    /// [`Report::counters`].
    fn report(&self, view: &View<'_>, out: &mut Report) {
        let _ = (view, out);
    }

    /// A report asked for with [`Ctx::request_report`] is ready.
    fn on_report(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey, kind: ReportKind, body: Bytes) {
        let _ = (ctx, conn, kind, body);
    }

    /// The engine is stopping: listeners are already closed and every
    /// connection will be closed after flushing. Roles may queue final bytes.
    fn on_shutdown(&mut self, ctx: &mut Ctx<'_>) {
        let _ = ctx;
    }
}
