//! Live reload: compare a new configuration with the running one and change
//! only what differs.
//!
//! Invariant: a role is identified across reloads by its kind and name
//! ([`RoleConfig::identity`]). A role whose configuration is unchanged is not
//! called at all; a changed one is asked to apply the change in place
//! ([`crate::Role::reconfigure`]) and is restarted (its listeners and
//! connections closed, a new instance started) only if it cannot. A retired
//! role's slot keeps a no-op role, so timers and connection events still in
//! flight for it land nowhere.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::PathBuf;
use std::time::Instant;

use log::{error, info, warn};

use super::Reconfigure;
use super::{Ctx, Engine, RoleId};
use crate::config::{Config, RoleConfig};
use crate::engine::EngineError;
use crate::role::Role;

/// What the engine remembers of the configuration a role runs with: its
/// identity and a hash of it, not a copy (a router's connpt list can be
/// tens of thousands of entries, which the role already holds in its own form).
pub(crate) struct Applied {
    identity: String,
    fingerprint: u64,
}

impl Applied {
    fn of(config: &RoleConfig) -> Applied {
        // SipHash with fixed keys over every field of the role's config.
        let mut h = DefaultHasher::new();
        config.hash(&mut h);
        Applied {
            identity: config.identity(),
            fingerprint: h.finish(),
        }
    }
}

/// What a retired role's slot holds.
struct Retired;

impl Role for Retired {
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
pub(crate) fn is_retired(role: &dyn Role) -> bool {
    role.kind() == RETIRED
}

const RETIRED: &str = "retired";

impl Engine {
    /// Add a role built from its configuration; a later [`Engine::reload`]
    /// compares against it.
    pub fn add_configured(&mut self, config: RoleConfig) -> RoleId {
        let id = self.add_role(crate::role::build(&config));
        self.role_configs.resize_with(self.roles.len(), || None);
        if let Some(slot) = self.role_configs.get_mut(id.0) {
            *slot = Some(Applied::of(&config));
        }
        id
    }

    /// Reload `path` on SIGHUP (and on [`crate::Handle::reload`]).
    pub fn watch_config(&mut self, path: PathBuf) {
        self.config_path = Some(path);
    }

    /// Re-read the watched file and apply it; a file that does not load or
    /// validate leaves everything as it is (the error is logged).
    pub(crate) fn reload_watched(&mut self) {
        let Some(path) = self.config_path.clone() else {
            warn!("reload asked for, but no config file is watched (built-in config)");
            return;
        };
        match Config::load(&path) {
            Ok(config) => {
                info!("reloading {}", path.display());
                self.reload(&config);
            }
            Err(e) => error!("reload refused, the running config stays: {e}"),
        }
    }

    /// Apply `config` to the running engine: start roles that are new, stop
    /// those that are gone, let changed ones update in place (or restart
    /// them), leave unchanged ones alone. `[engine]` settings are not changed
    /// live (a warning says so). Roles added with [`Engine::add_role`] rather
    /// than from configuration are never touched.
    pub fn reload(&mut self, config: &Config) {
        let t0 = Instant::now();
        self.core.now = t0;
        if config.engine != self.core.config {
            warn!("reload: [engine] settings changed; they apply at the next restart");
        }
        let (mut started, mut updated, mut restarted, mut stopped) = (0, 0, 0, 0);
        let wanted = config.roles();
        let identities: Vec<String> = wanted.iter().map(RoleConfig::identity).collect();
        // Stop what is gone first, so a new role may take over its address.
        for i in 0..self.role_configs.len() {
            let gone = match &self.role_configs[i] {
                Some(c) if !identities.contains(&c.identity) => {
                    info!("reload: {} removed; stopping it", c.identity);
                    true
                }
                _ => false,
            };
            if gone {
                self.retire(RoleId(i));
                stopped += 1;
            }
        }
        // Then change what changed (ports an in-place change gives up are
        // free before anything new binds), and only then start new roles.
        let mut to_start = Vec::new();
        for (new, identity) in wanted.into_iter().zip(identities) {
            let found = self
                .role_configs
                .iter()
                .position(|c| c.as_ref().is_some_and(|c| c.identity == identity));
            let Some(i) = found else {
                to_start.push(new);
                started += 1;
                continue;
            };
            let applied = Applied::of(&new);
            if self
                .role_configs
                .get(i)
                .and_then(Option::as_ref)
                .is_some_and(|c| c.fingerprint == applied.fingerprint)
            {
                continue;
            }
            let mut outcome = Reconfigure::Restart;
            self.call(RoleId(i), |r, ctx| outcome = r.reconfigure(ctx, &new));
            match outcome {
                Reconfigure::Applied => {
                    info!("reload: {identity} updated in place");
                    self.role_configs[i] = Some(applied);
                    updated += 1;
                }
                Reconfigure::Restart => {
                    info!("reload: {identity} changed; restarting it");
                    self.retire(RoleId(i));
                    to_start.push(new);
                    restarted += 1;
                }
            }
        }
        for new in to_start {
            self.start_configured(new);
        }
        info!(
            "reload done in {:?}: {started} started, {updated} updated in place, {restarted} restarted, {stopped} stopped",
            t0.elapsed()
        );
    }

    fn start_configured(&mut self, config: RoleConfig) {
        let identity = config.identity();
        let id = self.add_configured(config);
        if !self.started {
            return;
        }
        let mut result = Ok(());
        self.call(id, |r, ctx| result = r.start(ctx));
        match result {
            Ok(()) => info!("reload: {identity} started"),
            Err(e) => {
                error!("reload: {identity} could not start: {e}");
                self.retire(id);
            }
        }
    }

    /// Close a role's listeners and connections and leave a no-op in its slot.
    fn retire(&mut self, id: RoleId) {
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
        if let Some(c) = self.role_configs.get_mut(id.0) {
            *c = None;
        }
    }
}
