//! Roles: the jobs the engine does, written sans-IO against [`crate::Ctx`].
//!
//! Invariant: a role owns its own tables and refers to connections only by
//! [`crate::ConnKey`]; the engine owns every socket and calls the role with events.
//! Callbacks run on the loop thread and must not block: anything slow is a
//! timer or a message from another thread ([`crate::Handle::send`]).

pub mod admin;
mod admission;
pub mod broadcast;
pub mod echo;
pub mod router;
pub mod tunnel;

/// A role is an engine [`crate::engine::Handler`]: the name the roles and
/// their documentation use.
pub use crate::engine::Handler as Role;
pub use crate::engine::report::{self, Report, ReportKind};
pub use crate::engine::{OnFrameError, Reconfigure};
pub use admin::Admin;
pub use broadcast::Broadcast;
pub use echo::Echo;
pub use router::Router;
pub use tunnel::{AgentState, Resolver, TunnelAgent, TunnelServer, TunnelStats};

use crate::config::RoleConfig;

/// The role a configuration describes (not started).
pub fn build(config: &RoleConfig) -> Box<dyn Role> {
    match config {
        RoleConfig::Echo(c) => Box::new(Echo::new(c)),
        RoleConfig::Broadcast(c) => Box::new(Broadcast::new(c)),
        RoleConfig::Router(c) => Box::new(Router::new(c)),
        RoleConfig::TunnelServer(c) => Box::new(TunnelServer::new(c)),
        RoleConfig::TunnelAgent(c) => Box::new(TunnelAgent::new(c)),
        RoleConfig::Admin(c) => Box::new(Admin::new(c)),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use crate::metrics::{CounterSet, Kind};

    /// Every declared counter set's report names follow the conventions the
    /// admin tests check at run time: families named `switchboard_*`,
    /// counters (and only counters) ending in `_total`, each family and each
    /// status key of a set declared once.
    #[test]
    fn declared_counters_are_named_by_the_conventions() {
        let sets: [(&str, &dyn CounterSet); 5] = [
            ("engine", &crate::StatsSnapshot::default()),
            ("tunnel", &super::TunnelStats::default()),
            ("broadcast", &super::broadcast::BroadcastStats::default()),
            ("router", &super::router::RouterStats::default()),
            ("admin", &super::admin::Counters::default()),
        ];
        let mut families = HashSet::new();
        for (set, counters) in sets {
            let mut keys = HashSet::new();
            counters.each(&mut |c, _| {
                if let Some(key) = c.status {
                    assert!(keys.insert(key), "{set}: status key {key} twice");
                }
                if let Some(f) = c.metric {
                    assert!(families.insert(f.name), "{set}: family {} twice", f.name);
                    assert!(f.name.starts_with("switchboard_"), "{set}: {}", f.name);
                    assert_eq!(
                        f.name.ends_with("_total"),
                        c.kind == Kind::Counter,
                        "{set}: {} is a {:?}",
                        f.name,
                        c.kind
                    );
                    assert!(f.help.ends_with('.'), "{set}: {} help", f.name);
                }
            });
        }
    }
}
