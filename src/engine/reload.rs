//! The engine's side of live reload: what it remembers of each role's
//! configuration (an identity and a fingerprint, never the configuration
//! itself, whose types the engine does not know), offering a role a changed
//! configuration, and retiring a role. Deciding what changed is the
//! application layer's job (src/app), which the engine calls through its
//! reload hook on SIGHUP.
//!
//! Invariant: a retired role's slot keeps a no-op role, so timers and
//! connection events still in flight for it land nowhere.

use std::any::Any;

use log::warn;

use super::{Ctx, Engine, EngineError, Handler, Reconfigure, RoleId};

/// What the engine remembers of the configuration a role runs with: its
/// identity and a hash of it, not a copy (a router's connpt list can be
/// tens of thousands of entries, which the role already holds in its own form).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RoleRecord {
    /// What identifies the role across reloads (kind and name).
    pub(crate) identity: String,
    /// A hash of every field of its configuration.
    pub(crate) fingerprint: u64,
}

/// What a retired role's slot holds.
struct Retired;

impl Handler for Retired {
    fn name(&self) -> &str {
        "retired"
    }

    fn kind(&self) -> &str {
        RETIRED
    }

    fn start(&mut self, _ctx: &mut Ctx<'_>) -> Result<(), EngineError> {
        Ok(())
    }

    fn on_frame(
        &mut self,
        ctx: &mut Ctx<'_>,
        conn: super::ConnKey,
        _frame: crate::codec::Frame<'_>,
    ) {
        ctx.abort(conn);
    }
}

/// Whether a role slot holds a retired role (left out of reports).
pub(crate) fn is_retired(role: &dyn Handler) -> bool {
    role.kind() == RETIRED
}

const RETIRED: &str = "retired";

impl Engine {
    /// Ask `hook` to apply a reload when one is asked for (SIGHUP,
    /// [`crate::Handle::reload`]); the application layer installs it.
    pub fn set_reload_hook(&mut self, hook: fn(&mut Engine)) {
        self.reload_hook = Some(hook);
    }

    /// SIGHUP or [`crate::Handle::reload`]: hand over to the reload hook.
    pub(crate) fn reload_watched(&mut self) {
        match self.reload_hook {
            Some(hook) => hook(self),
            None => warn!("reload asked for, but there is nothing to reload (no config file)"),
        }
    }

    /// Offer role `id` a changed configuration `new` (its own type, which
    /// the role downcasts: see [`Handler::reconfigure`]).
    pub fn reconfigure_role(&mut self, id: RoleId, new: &dyn Any) -> Reconfigure {
        let mut outcome = Reconfigure::Restart;
        self.call(id, |r, ctx| outcome = r.reconfigure(ctx, new));
        outcome
    }

    /// Start role `id` if the engine runs already (a role added by a reload).
    pub(crate) fn start_late(&mut self, id: RoleId) -> Result<(), EngineError> {
        if !self.started {
            return Ok(());
        }
        let mut result = Ok(());
        self.call(id, |r, ctx| result = r.start(ctx));
        result
    }

    /// Close a role's listeners and connections and leave a no-op in its slot.
    pub(crate) fn retire(&mut self, id: RoleId) {
        let listeners: Vec<usize> = self
            .core
            .listeners
            .iter()
            .filter(|(_, l)| l.role == id)
            .map(|(i, _)| i)
            .collect();
        for l in listeners {
            self.core.close_listener(l);
        }
        let conns: Vec<usize> = self
            .core
            .conns
            .iter()
            .filter(|(_, c)| c.role == id && c.is_live())
            .map(|(i, _)| i)
            .collect();
        for idx in conns {
            self.core.close_now(idx, super::CloseReason::Shutdown);
        }
        if let Some(slot) = self.roles.get_mut(id.0) {
            *slot = Box::new(Retired);
        }
        if let Some(c) = self.role_records.get_mut(id.0) {
            *c = None;
        }
    }
}
