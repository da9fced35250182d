//! Status and metrics reports: what every role says about itself, for the
//! admin endpoint (`GET /status` as JSON, `GET /metrics` as Prometheus text).
//!
//! Invariant: a report is built only on request (never per frame), from
//! read-only views of the roles and the engine, into one growing `String`
//! whose size is bounded by what the configuration describes (connpts,
//! services, subscribers); the admin role refuses to send one larger than
//! its bound. Declared counters ([`crate::counters!`]) are written by
//! [`Report::counters`] from their declarations, in declaration order.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::metrics::{CounterSet, Kind};

/// Which report is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportKind {
    /// JSON (`GET /status`).
    Status,
    /// Prometheus text exposition (`GET /metrics`).
    Metrics,
}

/// A report being written. Roles add to it in [`crate::Role::report`]: JSON
/// fields (ignored when metrics are asked for) and metric samples (ignored
/// for status). The role's own JSON object is open when `report` is called.
pub struct Report {
    kind: ReportKind,
    out: String,
    /// JSON: whether the current container already holds a value.
    comma: Vec<bool>,
    /// Metrics: each family's HELP/TYPE lines and samples, in order of first
    /// appearance; the exposition format wants a family's lines together.
    families: Vec<(&'static str, String)>,
    /// Metrics: labels every sample of the current role gets.
    role_labels: String,
    now: Instant,
}

impl Report {
    pub(crate) fn new(kind: ReportKind, now: Instant) -> Report {
        Report {
            kind,
            out: String::with_capacity(4096),
            comma: Vec::new(),
            families: Vec::new(),
            role_labels: String::new(),
            now,
        }
    }

    /// Which report this is (a role can skip work the other needs).
    pub fn kind(&self) -> ReportKind {
        self.kind
    }

    /// The time the report is for.
    pub fn now(&self) -> Instant {
        self.now
    }

    pub(crate) fn into_string(mut self) -> String {
        for (_, lines) in self.families.drain(..) {
            self.out.push_str(&lines);
        }
        self.out
    }

    pub(crate) fn set_role_labels(&mut self, kind: &str, name: &str) {
        let labels = &mut self.role_labels;
        labels.clear();
        labels.push_str("role=\"");
        push_escaped(labels, kind, Escape::Label);
        labels.push_str("\",name=\"");
        push_escaped(labels, name, Escape::Label);
        labels.push('"');
    }

    // ----- JSON -----

    fn sep(&mut self) {
        if let Some(c) = self.comma.last_mut() {
            if *c {
                self.out.push(',');
            }
            *c = true;
        }
    }

    /// Start a field of the current object: separator and `"key":`.
    fn key(&mut self, key: &str) {
        self.sep();
        self.out.push('"');
        push_escaped(&mut self.out, key, Escape::Json);
        self.out.push_str("\":");
    }

    /// Open a JSON object (as a field `key` of the current object, or as the
    /// next element of the current array when `key` is `None`).
    pub fn open_object(&mut self, key: Option<&str>) {
        if self.kind != ReportKind::Status {
            return;
        }
        self.open(key, '{');
    }

    /// Open a JSON array (see [`Report::open_object`]).
    pub fn open_array(&mut self, key: Option<&str>) {
        if self.kind != ReportKind::Status {
            return;
        }
        self.open(key, '[');
    }

    fn open(&mut self, key: Option<&str>, c: char) {
        match key {
            Some(k) => self.key(k),
            None => self.sep(),
        }
        self.out.push(c);
        self.comma.push(false);
    }

    /// Close the innermost object.
    pub fn close_object(&mut self) {
        if self.kind == ReportKind::Status {
            self.comma.pop();
            self.out.push('}');
        }
    }

    /// Close the innermost array.
    pub fn close_array(&mut self) {
        if self.kind == ReportKind::Status {
            self.comma.pop();
            self.out.push(']');
        }
    }

    /// A string field.
    pub fn str(&mut self, key: &str, value: &str) {
        if self.kind == ReportKind::Status {
            self.key(key);
            self.out.push('"');
            push_escaped(&mut self.out, value, Escape::Json);
            self.out.push('"');
        }
    }

    /// A number field.
    pub fn num(&mut self, key: &str, value: u64) {
        if self.kind == ReportKind::Status {
            self.key(key);
            push_u64(&mut self.out, value);
        }
    }

    /// A boolean field.
    pub fn bool(&mut self, key: &str, value: bool) {
        if self.kind == ReportKind::Status {
            self.key(key);
            self.out.push_str(if value { "true" } else { "false" });
        }
    }

    /// An address field (`null` when absent).
    pub fn addr(&mut self, key: &str, value: Option<SocketAddr>) {
        if self.kind != ReportKind::Status {
            return;
        }
        match value {
            Some(a) => {
                // An address needs no escaping.
                self.key(key);
                let _ = write!(self.out, "\"{a}\"");
            }
            None => {
                self.key(key);
                self.out.push_str("null");
            }
        }
    }

    /// Seconds since `t` (`null` when absent), as a field.
    pub fn age(&mut self, key: &str, t: Option<Instant>) {
        if self.kind != ReportKind::Status {
            return;
        }
        match t {
            Some(t) => self.num(key, self.now.saturating_duration_since(t).as_secs()),
            None => {
                self.key(key);
                self.out.push_str("null");
            }
        }
    }

    // ----- both -----

    /// Every counter of `set` ([`crate::counters!`]) that its declaration
    /// puts in this report, in declaration order: a number field under its
    /// status key, or a sample of its family labelled with the role.
    pub fn counters(&mut self, set: &dyn CounterSet) {
        let kind = self.kind;
        set.each(&mut |c, v| match kind {
            ReportKind::Status => {
                if let Some(key) = c.status {
                    self.num(key, v);
                }
            }
            ReportKind::Metrics => {
                if let Some(f) = c.metric {
                    self.sample(f.name, c.kind, f.help, &[], v);
                }
            }
        });
    }

    // ----- metrics -----

    /// A counter sample (`name` should end in `_total`), labelled with the
    /// role and any `labels`.
    pub fn counter(&mut self, name: &'static str, help: &str, labels: &[(&str, &str)], v: u64) {
        self.sample(name, Kind::Counter, help, labels, v);
    }

    /// A gauge sample.
    pub fn gauge(&mut self, name: &'static str, help: &str, labels: &[(&str, &str)], v: u64) {
        self.sample(name, Kind::Gauge, help, labels, v);
    }

    /// The lines of family `name`, started with its HELP and TYPE if new.
    fn family(&mut self, name: &'static str, kind: Kind, help: &str) -> &mut String {
        let i = match self.families.iter().position(|(n, _)| *n == name) {
            Some(i) => i,
            None => {
                let kind = kind.as_str();
                let head = format!("# HELP {name} {help}\n# TYPE {name} {kind}\n");
                self.families.push((name, head));
                self.families.len() - 1
            }
        };
        &mut self.families[i].1
    }

    /// One sample line: the role's labels (none for the engine-wide figures
    /// written before the first role) and `labels`.
    fn sample(
        &mut self,
        name: &'static str,
        kind: Kind,
        help: &str,
        labels: &[(&str, &str)],
        v: u64,
    ) {
        if self.kind != ReportKind::Metrics {
            return;
        }
        let role_labels = std::mem::take(&mut self.role_labels);
        let lines = self.family(name, kind, help);
        lines.push_str(name);
        let mut sep = '{';
        if !role_labels.is_empty() {
            lines.push(sep);
            lines.push_str(&role_labels);
            sep = ',';
        }
        for (k, val) in labels {
            lines.push(sep);
            sep = ',';
            lines.push_str(k);
            lines.push_str("=\"");
            push_escaped(lines, val, Escape::Label);
            lines.push('"');
        }
        if sep == ',' {
            lines.push('}');
        }
        lines.push(' ');
        push_u64(lines, v);
        lines.push('\n');
        self.role_labels = role_labels;
    }

    /// Write the document's opening: the version and uptime, then the
    /// engine's counters (declared in `engine::handle`) and the log lines
    /// dropped; in metrics, also the accept pauses of both causes together.
    pub(crate) fn begin(&mut self, uptime: Duration, engine: &crate::StatsSnapshot) {
        let log_dropped = crate::engine::log_dropped_total();
        if self.kind == ReportKind::Status {
            self.out.push('{');
            self.comma.push(false);
            self.str("version", env!("CARGO_PKG_VERSION"));
            self.num("uptime_seconds", uptime.as_secs());
            self.open_object(Some("engine"));
        }
        self.gauge(
            "switchboard_uptime_seconds",
            "Seconds since the engine started.",
            &[],
            uptime.as_secs(),
        );
        self.counters(engine);
        self.num("log_dropped_total", log_dropped);
        self.counter(
            "switchboard_log_dropped_total",
            "Log lines dropped because the log output could not take them in time.",
            &[],
            log_dropped,
        );
        self.counter(
            "switchboard_accept_paused_total",
            "Times accepting paused (connection limit or no file descriptors).",
            &[],
            engine.accept_paused_limit_total + engine.accept_paused_fd_total,
        );
        if self.kind == ReportKind::Status {
            self.close_object();
            self.open_array(Some("roles"));
        }
    }

    pub(crate) fn role_begin(&mut self, kind: &str, name: &str) {
        self.set_role_labels(kind, name);
        if self.kind == ReportKind::Status {
            self.open_object(None);
            self.str("role", kind);
            self.str("name", name);
        }
    }

    pub(crate) fn role_end(&mut self) {
        self.close_object();
    }

    pub(crate) fn end(&mut self) {
        if self.kind == ReportKind::Status {
            self.close_array();
            self.close_object();
            self.out.push('\n');
        }
    }
}

/// `s` escaped as the inside of a JSON string, as a status report writes
/// every name and id (public for the `report_escaping` fuzz target).
pub fn escape_json(s: &str, out: &mut String) {
    push_escaped(out, s, Escape::Json);
}

/// `s` escaped as a Prometheus label value, as a metrics report writes
/// every label (public for the `report_escaping` fuzz target).
pub fn escape_label(s: &str, out: &mut String) {
    push_escaped(out, s, Escape::Label);
}

/// A decimal number, without the formatting machinery.
fn push_u64(out: &mut String, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        if let Some(d) = digits.get_mut(i) {
            *d = b'0' + (v % 10) as u8;
        }
        v /= 10;
        if v == 0 || i == 0 {
            break;
        }
    }
    for &d in digits.get(i..).unwrap_or_default() {
        out.push(char::from(d));
    }
}

/// The text format a value is escaped for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Escape {
    /// The inside of a JSON string.
    Json,
    /// A Prometheus label value.
    Label,
}

/// `s` escaped for `to`, character by character.
fn escape_each(out: &mut String, s: &str, to: Escape) {
    for c in s.chars() {
        match (c, to) {
            ('"', _) => out.push_str("\\\""),
            ('\\', _) => out.push_str("\\\\"),
            ('\n', _) => out.push_str("\\n"),
            ('\r', Escape::Json) => out.push_str("\\r"),
            ('\t', Escape::Json) => out.push_str("\\t"),
            (c, Escape::Json) if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            (c, _) => out.push(c),
        }
    }
}

/// `s` escaped for `to`; most text (names, ids) needs no escaping and is
/// copied as it is. Reports for large configurations are mostly such
/// fields, so this and [`push_u64`] keep their cost down.
fn push_escaped(out: &mut String, s: &str, to: Escape) {
    let plain = |b: u8| match to {
        Escape::Json => b >= 0x20 && b != b'"' && b != b'\\',
        Escape::Label => b != b'"' && b != b'\\' && b != b'\n',
    };
    if s.bytes().all(plain) {
        out.push_str(s);
    } else {
        escape_each(out, s, to);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn json_nests_and_escapes() {
        let now = Instant::now();
        let mut r = Report::new(ReportKind::Status, now);
        r.begin(Duration::from_secs(3), &crate::StatsSnapshot::default());
        r.role_begin("echo", "e\"1");
        r.num("n", 1);
        r.open_array(Some("list"));
        r.open_object(None);
        r.str("a", "x\ny");
        r.addr("peer", None);
        r.close_object();
        r.open_object(None);
        r.bool("b", true);
        r.close_object();
        r.close_array();
        r.role_end();
        r.role_begin("echo", "e2");
        r.role_end();
        r.end();
        let s = r.into_string();
        assert!(s.starts_with("{\"version\":"), "{s}");
        assert!(
            s.contains(
                "{\"role\":\"echo\",\"name\":\"e\\\"1\",\"n\":1,\"list\":[{\"a\":\"x\\ny\",\"peer\":null},{\"b\":true}]},{\"role\":\"echo\",\"name\":\"e2\"}]}"
            ),
            "{s}"
        );
        assert!(
            !s.contains(",,") && !s.contains("{,") && !s.contains("[,"),
            "{s}"
        );
    }

    #[test]
    fn numbers_and_plain_strings_take_the_fast_paths_exactly() {
        for v in [0, 7, 10, 99, 100, 12_345, u64::from(u32::MAX), u64::MAX] {
            let mut s = String::new();
            push_u64(&mut s, v);
            assert_eq!(s, v.to_string());
        }
        for text in ["plain id", "", "tab\there", "quote\"", "back\\slash", "ünï"] {
            let mut s = String::new();
            push_escaped(&mut s, text, Escape::Json);
            let mut each = String::new();
            escape_each(&mut each, text, Escape::Json);
            assert_eq!(s, each);
        }
    }

    #[test]
    fn metrics_have_one_header_per_family() {
        let mut r = Report::new(ReportKind::Metrics, Instant::now());
        r.role_begin("router", "r1");
        r.counter("switchboard_x_total", "X.", &[("connpt", "c1")], 5);
        r.gauge("switchboard_y", "Y.", &[], 1);
        r.role_begin("router", "r2");
        r.counter("switchboard_x_total", "X.", &[("connpt", "c\"2")], 6);
        r.str("ignored", "in metrics");
        let s = r.into_string();
        assert_eq!(s.matches("# TYPE switchboard_x_total counter").count(), 1);
        assert!(s.contains("switchboard_x_total{role=\"router\",name=\"r1\",connpt=\"c1\"} 5\n"));
        assert!(s.contains("name=\"r2\",connpt=\"c\\\"2\"} 6\n"));
        // A family's lines stay together even when roles interleave.
        let x = s.find("switchboard_x_total{").unwrap();
        let y = s.find("# HELP switchboard_y").unwrap();
        assert!(s.rfind("switchboard_x_total{").unwrap() < y && x < y, "{s}");
        assert!(!s.contains("ignored"));
    }

    crate::counters! {
        #[derive(Default)]
        struct Probe {
            seen: u64 = counter { status: "seen_total", metric: "x_seen_total", help: "Seen." },
            kept: u64 = counter,
            now: std::sync::atomic::AtomicU64 = gauge { metric: "x_now", help: "Now." },
            text: &'static str,
            only: u64 = gauge { status: "only" },
        }
    }

    #[test]
    fn declared_counters_go_where_their_declaration_says_in_its_order() {
        let probe = Probe {
            seen: 3,
            kept: 4,
            now: 5.into(),
            text: "not a counter",
            only: 6,
        };
        let mut r = Report::new(ReportKind::Status, Instant::now());
        r.begin(Duration::ZERO, &crate::StatsSnapshot::default());
        r.role_begin("echo", "e");
        r.num("first", 1);
        r.counters(&probe);
        r.num("last", 2);
        r.role_end();
        r.end();
        let s = r.into_string();
        assert!(
            s.contains(r#""name":"e","first":1,"seen_total":3,"only":6,"last":2}"#),
            "{s}"
        );
        assert!(!s.contains(probe.text), "{s}");

        let mut r = Report::new(ReportKind::Metrics, Instant::now());
        r.counters(&probe);
        r.role_begin("echo", "e");
        r.counters(&probe);
        let s = r.into_string();
        assert_eq!(
            s,
            "# HELP x_seen_total Seen.\n# TYPE x_seen_total counter\n\
             x_seen_total 3\nx_seen_total{role=\"echo\",name=\"e\"} 3\n\
             # HELP x_now Now.\n# TYPE x_now gauge\n\
             x_now 5\nx_now{role=\"echo\",name=\"e\"} 5\n"
        );
    }
}
