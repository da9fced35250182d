//! Embedding switchboard with a role of your own: answer every line with its
//! length. Run with `cargo run --example line_length`, then `nc 127.0.0.1 7100`.

use std::net::SocketAddr;
use std::time::Duration;

use switchboard::codec::{Frame, Framing};
use switchboard::config::EngineConfig;
use switchboard::{ConnKey, Ctx, Engine, EngineError, ListenOptions, ListenerId, Role};

/// Answers each line with its length in bytes, as decimal text.
struct LineLength {
    listen: SocketAddr,
}

impl Role for LineLength {
    fn name(&self) -> &str {
        "line-length"
    }

    fn start(&mut self, ctx: &mut Ctx<'_>) -> Result<(), EngineError> {
        let opts = ListenOptions {
            framing: Framing::Line { max: 4096 },
            ..Default::default()
        };
        let id = ctx.listen(self.listen, opts)?;
        eprintln!("line-length listening on {:?}", ctx.listener_addr(id));
        Ok(())
    }

    fn on_accept(&mut self, ctx: &mut Ctx<'_>, _: ListenerId, conn: ConnKey, _: SocketAddr) {
        ctx.set_idle_timeout(conn, Some(Duration::from_secs(60)));
    }

    fn on_frame(&mut self, ctx: &mut Ctx<'_>, conn: ConnKey, frame: Frame<'_>) {
        let mut out = [0u8; 24];
        let n = decimal(frame.payload.len(), &mut out);
        // A client that never reads fills its queue: drop it rather than buffer more.
        if ctx.send(conn, out.get(..n).unwrap_or_default()).is_err() {
            ctx.abort(conn);
        }
    }
}

/// Writes `v` and a newline into `out`; returns the length. No allocation.
fn decimal(mut v: usize, out: &mut [u8; 24]) -> usize {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    let n = digits.len() - i;
    out[..n].copy_from_slice(&digits[i..]);
    out[n] = b'\n';
    n + 1
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut engine = Engine::new(EngineConfig::default())?;
    engine.add_role(Box::new(LineLength {
        listen: "127.0.0.1:7100".parse()?,
    }));
    engine.handle_signals()?;
    engine.run()?;
    Ok(())
}
