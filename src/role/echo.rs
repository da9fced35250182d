//! The echo role: every byte received goes back, in order.
//!
//! Invariant: a client that sends but never reads costs at most its send queue
//! bound plus one read buffer: reading pauses before the queue could overflow and
//! resumes when it has drained. Allocation: none per message (a full read
//! buffer is moved into the send queue; small messages are copied into pooled
//! blocks).

use std::net::SocketAddr;
use std::time::Duration;

use log::{error, info};

use crate::codec::{Frame, Framing};
use crate::config::EchoConfig;
use crate::engine::{ConnKey, Ctx, EngineError, ListenOptions, ListenerId, SendError, View};
use crate::role::{Report, Role};

/// Sends back what it receives. Also the template for new roles.
#[derive(Debug)]
pub struct Echo {
    name: String,
    listen: SocketAddr,
    idle_timeout: Option<Duration>,
    queue_bytes: Option<usize>,
    listener: Option<ListenerId>,
}

// ===== impl Echo =====

impl Echo {
    /// An echo role as configured by one `[[echo]]` table.
    pub fn new(config: &EchoConfig) -> Echo {
        Echo {
            name: config.name.clone(),
            listen: config.listen,
            idle_timeout: config.idle_timeout,
            queue_bytes: config.queue_bytes,
            listener: None,
        }
    }

    /// Where the role listens, once started (the real port if 0 was asked for).
    pub fn local_addr(&self, ctx: &Ctx<'_>) -> Option<SocketAddr> {
        self.listener.and_then(|l| ctx.listener_addr(l))
    }
}

impl Role for Echo {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &str {
        "echo"
    }

    fn report(&self, view: &View<'_>, out: &mut Report) {
        out.addr("listen", self.listener.and_then(|l| view.listener_addr(l)));
    }

    fn start(&mut self, ctx: &mut Ctx<'_>) -> Result<(), EngineError> {
        let opts = ListenOptions {
            framing: Framing::Raw,
            queue_bytes: self.queue_bytes,
            nodelay: true,
            ..ListenOptions::default()
        };
        let id = ctx.listen(self.listen, opts)?;
        self.listener = Some(id);
        let addr = ctx.listener_addr(id).unwrap_or(self.listen);
        info!("echo '{}' listening on {addr}", self.name);
        Ok(())
    }

    fn on_accept(&mut self, ctx: &mut Ctx<'_>, _: ListenerId, conn: ConnKey, _: SocketAddr) {
        if self.idle_timeout.is_some() {
            ctx.set_idle_timeout(conn, self.idle_timeout);
        }
    }

    fn on_frame(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey, frame: Frame<'_>) {
        match ctx.forward(conn, &frame) {
            Ok(()) => {}
            Err(SendError::Closed) => return,
            Err(SendError::Full) => {
                // Cannot happen: reading pauses while a whole read would not fit.
                error!("{conn}: echo queue overflowed (bug); closing");
                ctx.abort(conn);
                return;
            }
        }
        // Raw frames are at most one read buffer long: keep room for one more.
        if ctx.send_capacity(conn).unwrap_or(0) < ctx.read_buffer_len() {
            ctx.pause_reading(conn);
        }
    }

    fn on_writable(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey) {
        ctx.resume_reading(conn);
    }
}
