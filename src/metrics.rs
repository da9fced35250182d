//! Counters declared once. [`counters!`](crate::counters) declares a struct
//! of counters, and each counter's declaration also gives its `/status` field
//! and its Prometheus family (name, help, type). `Report::counters` writes
//! both from it, and [`bump`], [`add`] and [`sub`] update the counters.
//!
//! Invariant: a set reports its counters in declaration order, in both
//! reports; a counter's report names are written only in its declaration.
//! Layering: this module imports nothing from the crate, so the engine, the
//! protocol cores and the roles can all declare counters. Allocation: none;
//! the declarations are constants.

use std::sync::atomic::{AtomicU64, Ordering};

/// What a counter measures, and its Prometheus `TYPE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A total that only grows (its family name ends in `_total`).
    Counter,
    /// A level that goes up and down (connections now, bytes held now).
    Gauge,
}

impl Kind {
    /// The Prometheus `TYPE` word.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        }
    }
}

/// A Prometheus metric family: what `# HELP` and `# TYPE` say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Family {
    /// The family (and sample) name.
    pub name: &'static str,
    /// The `# HELP` text.
    pub help: &'static str,
}

/// One counter's declaration: what [`counters!`](crate::counters) records
/// for each counter field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterInfo {
    /// The struct field.
    pub field: &'static str,
    /// Counter or gauge.
    pub kind: Kind,
    /// Its key in the role's (or engine's) `/status` object; `None` keeps it
    /// out of `/status`.
    pub status: Option<&'static str>,
    /// Its family in `/metrics`; `None` keeps it out of `/metrics`.
    pub metric: Option<Family>,
}

/// A counter field's value now: `u64` for counters only the loop thread
/// touches, `AtomicU64` (read relaxed) for counters shared with other threads.
pub trait CounterValue {
    /// The value now.
    fn value(&self) -> u64;
}

impl CounterValue for u64 {
    fn value(&self) -> u64 {
        *self
    }
}

impl CounterValue for AtomicU64 {
    fn value(&self) -> u64 {
        self.load(Ordering::Relaxed)
    }
}

/// A struct declared with [`counters!`](crate::counters): its counters, with
/// their declarations, in declaration order.
pub trait CounterSet {
    /// Call `f` with each counter's declaration and its value now, in
    /// declaration order (fields that are not counters are skipped).
    fn each(&self, f: &mut dyn FnMut(&'static CounterInfo, u64));
}

/// Add one to a shared counter.
pub fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Add `n` to a shared counter.
pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Take `n` from a shared gauge.
pub fn sub(c: &AtomicU64, n: u64) {
    c.fetch_sub(n, Ordering::Relaxed);
}

/// Declares a struct of counters, each with what the reports say about it.
///
/// The struct is written as usual, except that a counter field is followed
/// by `= counter` or `= gauge` and, when it is reported, by where:
///
/// * `{ status: "key" }`: a `/status` field only;
/// * `{ metric: "name", help: "text" }`: a `/metrics` family only;
/// * `{ status: "key", metric: "name", help: "text" }`: both.
///
/// A counter field is `u64` or `AtomicU64` ([`CounterValue`](crate::metrics::CounterValue));
/// fields without `=` are not counters and are left alone. The struct gets
/// [`CounterSet`](crate::metrics::CounterSet), so a role's report writes every
/// declared field and family, in declaration order, with one
/// `out.counters(&stats)` ([`Report::counters`](crate::Report::counters)).
///
/// ```
/// use std::sync::atomic::AtomicU64;
/// use switchboard::metrics::{CounterSet, bump};
///
/// switchboard::counters! {
///     /// What a ping role counts, readable from any thread.
///     #[derive(Debug, Default)]
///     pub struct PingStats {
///         /// Pings answered.
///         pub pings: AtomicU64 = counter {
///             status: "pings_total",
///             metric: "myapp_pings_total",
///             help: "Pings answered.",
///         },
///         /// Clients connected now.
///         pub clients: AtomicU64 = gauge { metric: "myapp_clients", help: "Clients now." },
///         /// Pings too long to answer (counted, not reported).
///         pub oversized: AtomicU64 = counter,
///         /// Not a counter.
///         pub name: String,
///     }
/// }
///
/// let stats = PingStats::default();
/// bump(&stats.pings);
/// let mut seen = Vec::new();
/// stats.each(&mut |c, v| seen.push((c.field, c.status, v)));
/// assert_eq!(
///     seen,
///     [("pings", Some("pings_total"), 1), ("clients", None, 0), ("oversized", None, 0)]
/// );
/// ```
#[macro_export]
macro_rules! counters {
    (@kind counter) => {
        $crate::metrics::Kind::Counter
    };
    (@kind gauge) => {
        $crate::metrics::Kind::Gauge
    };
    (@info $field:ident $kind:ident) => {
        $crate::metrics::CounterInfo {
            field: stringify!($field),
            kind: $crate::counters!(@kind $kind),
            status: None,
            metric: None,
        }
    };
    (@info $field:ident $kind:ident { status: $key:literal $(,)? }) => {
        $crate::metrics::CounterInfo {
            field: stringify!($field),
            kind: $crate::counters!(@kind $kind),
            status: Some($key),
            metric: None,
        }
    };
    (@info $field:ident $kind:ident { metric: $name:literal, help: $help:literal $(,)? }) => {
        $crate::metrics::CounterInfo {
            field: stringify!($field),
            kind: $crate::counters!(@kind $kind),
            status: None,
            metric: Some($crate::metrics::Family { name: $name, help: $help }),
        }
    };
    (
        @info $field:ident $kind:ident
        { status: $key:literal, metric: $name:literal, help: $help:literal $(,)? }
    ) => {
        $crate::metrics::CounterInfo {
            field: stringify!($field),
            kind: $crate::counters!(@kind $kind),
            status: Some($key),
            metric: Some($crate::metrics::Family { name: $name, help: $help }),
        }
    };
    (
        $(#[$attr:meta])*
        $vis:vis struct $name:ident {
            $(
                $(#[$fattr:meta])*
                $fvis:vis $field:ident : $ty:ty $(= $kind:ident $({ $($spec:tt)* })?)?
            ),* $(,)?
        }
    ) => {
        $(#[$attr])*
        $vis struct $name {
            $($(#[$fattr])* $fvis $field: $ty,)*
        }

        impl $crate::metrics::CounterSet for $name {
            fn each(&self, f: &mut dyn FnMut(&'static $crate::metrics::CounterInfo, u64)) {
                $($({
                    const INFO: $crate::metrics::CounterInfo =
                        $crate::counters!(@info $field $kind $({ $($spec)* })?);
                    f(&INFO, $crate::metrics::CounterValue::value(&self.$field));
                })?)*
            }
        }
    };
}
