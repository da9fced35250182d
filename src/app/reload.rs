//! Live reload, the application's side: compare a new configuration with
//! the running one and change only what differs.
//!
//! Invariant: a role is identified across reloads by its kind and name
//! ([`RoleConfig::identity`]). A role whose configuration is unchanged is not
//! called at all; a changed one is offered its new section in place
//! ([`crate::Role::reconfigure`]) and is restarted (its listeners and
//! connections closed, a new instance started) only if it cannot.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::PathBuf;
use std::time::Instant;

use log::{error, info, warn};

use crate::config::{Config, RoleConfig};
use crate::engine::{Engine, EngineError, Reconfigure, RoleId, RoleRecord};

/// What the engine keeps of `config`: its identity and a fingerprint (SipHash
/// with fixed keys over every field).
fn record(config: &RoleConfig) -> RoleRecord {
    let mut h = DefaultHasher::new();
    config.hash(&mut h);
    RoleRecord {
        identity: config.identity(),
        fingerprint: h.finish(),
    }
}

/// The reload hook [`Engine::watch_config`] installs: re-read the watched
/// file and apply it; a file that does not load or validate leaves
/// everything as it is (the error is logged).
fn reload_watched(engine: &mut Engine) {
    let Some(path) = engine.config_path.clone() else {
        warn!("reload asked for, but no config file is watched (built-in config)");
        return;
    };
    match Config::load(&path) {
        Ok(config) => {
            info!("reloading {}", path.display());
            engine.reload(&config);
        }
        Err(e) => error!("reload refused, the running config stays: {e}"),
    }
}

impl Engine {
    /// An engine with every role of `config` added (not started yet).
    ///
    /// # Errors
    /// If the poll instance cannot be created.
    pub fn from_config(config: &Config) -> Result<Engine, EngineError> {
        let mut engine = Engine::new(config.engine.clone())?;
        for role in config.roles() {
            engine.add_configured(role);
        }
        Ok(engine)
    }

    /// Add a role built from its configuration; a later [`Engine::reload`]
    /// compares against it.
    pub fn add_configured(&mut self, config: RoleConfig) -> RoleId {
        let id = self.add_role(crate::role::build(&config));
        self.role_records.resize_with(self.role_count(), || None);
        if let Some(slot) = self.role_records.get_mut(id.0) {
            *slot = Some(record(&config));
        }
        id
    }

    /// Reload `path` on SIGHUP (and on [`crate::Handle::reload`]).
    pub fn watch_config(&mut self, path: PathBuf) {
        self.config_path = Some(path);
        self.set_reload_hook(reload_watched);
    }

    /// Apply `config` to the running engine: start roles that are new, stop
    /// those that are gone, let changed ones update in place (or restart
    /// them), leave unchanged ones alone. `[engine]` settings are not changed
    /// live (a warning says so). Roles added with [`Engine::add_role`] rather
    /// than from configuration are never touched.
    pub fn reload(&mut self, config: &Config) {
        let t0 = Instant::now();
        self.refresh_now();
        if &config.engine != self.engine_config() {
            warn!("reload: [engine] settings changed; they apply at the next restart");
        }
        let (mut started, mut updated, mut restarted, mut stopped) = (0, 0, 0, 0);
        let wanted = config.roles();
        let identities: Vec<String> = wanted.iter().map(RoleConfig::identity).collect();
        // Stop what is gone first, so a new role may take over its address.
        for i in 0..self.role_records.len() {
            let gone = match &self.role_records[i] {
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
                .role_records
                .iter()
                .position(|c| c.as_ref().is_some_and(|c| c.identity == identity));
            let Some(i) = found else {
                to_start.push(new);
                started += 1;
                continue;
            };
            let applied = record(&new);
            if self
                .role_records
                .get(i)
                .and_then(Option::as_ref)
                .is_some_and(|c| c.fingerprint == applied.fingerprint)
            {
                continue;
            }
            match self.reconfigure_role(RoleId(i), new.section()) {
                Reconfigure::Applied => {
                    info!("reload: {identity} updated in place");
                    self.role_records[i] = Some(applied);
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
        match self.start_late(id) {
            Ok(()) => info!("reload: {identity} started"),
            Err(e) => {
                error!("reload: {identity} could not start: {e}");
                self.retire(id);
            }
        }
    }
}
