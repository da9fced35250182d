//! The `[admin]` endpoint end to end: `GET /status` (JSON), `GET /metrics`
//! (Prometheus text) and `GET /healthz` from an in-process engine on
//! loopback, driven with std sockets, and what hostile or careless clients
//! get (malformed, oversized and slow requests, other methods, too many
//! clients, a client that never reads its answer).
//!
//! The status test runs every role in one engine, talking to each other:
//! echo, broadcast (a subscriber and a publisher), router (an identified
//! device with an application, an unidentified one, an unknown id), tunnel
//! server and agent (linked, one stream open through the echo role as the
//! agent's local service). Those roles need each other's addresses, so their
//! ports are reserved beforehand ([`fixed_port`]). Tests with only the admin
//! role listen on port 0.
//!
//! There is no JSON dependency: the status document is read with the small
//! strict parser below (which also rejects anything that is not one JSON
//! value: unbalanced brackets, trailing commas, bad escapes, duplicate keys).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly"
)]

mod util;

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use util::{
    IO_TIMEOUT, TestEngine, brief, connect, connect_with_recv_buffer, expect_bytes, fixed_port,
    is_timeout, kernel_send_buffer_max, read_to_eof, wait_for,
};

/// Bound on waiting for a state to show in the status.
const WAIT: Duration = Duration::from_secs(10);
/// How long "nothing arrives" is watched for.
const QUIET: Duration = Duration::from_millis(200);
/// The most one response may be in these tests.
const MAX_BODY: usize = 64 * 1024 * 1024;

// ----- a minimal strict JSON reader -----

#[derive(Debug, Clone, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    /// The number's text, as written.
    Num(String),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    fn parse(text: &str) -> Result<Json, String> {
        let mut p = Parser {
            b: text.as_bytes(),
            i: 0,
        };
        p.ws();
        let v = p.value(0)?;
        p.ws();
        if p.i != p.b.len() {
            return Err(format!("trailing bytes at {}", p.i));
        }
        Ok(v)
    }

    /// Field `key` of an object (fails the test if absent).
    fn get(&self, key: &str) -> &Json {
        match self {
            Json::Obj(fields) => fields
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v)
                .unwrap_or_else(|| panic!("no field {key:?} in {}", self.brief())),
            _ => panic!("not an object (looking for {key:?}): {}", self.brief()),
        }
    }

    fn has(&self, key: &str) -> bool {
        matches!(self, Json::Obj(f) if f.iter().any(|(k, _)| k == key))
    }

    fn u64(&self) -> u64 {
        match self {
            Json::Num(n) => n
                .parse()
                .unwrap_or_else(|e| panic!("{n:?} is not a u64: {e}")),
            other => panic!("not a number: {}", other.brief()),
        }
    }

    fn str(&self) -> &str {
        match self {
            Json::Str(s) => s,
            other => panic!("not a string: {}", other.brief()),
        }
    }

    fn bool(&self) -> bool {
        match self {
            Json::Bool(b) => *b,
            other => panic!("not a bool: {}", other.brief()),
        }
    }

    fn arr(&self) -> &[Json] {
        match self {
            Json::Arr(a) => a,
            other => panic!("not an array: {}", other.brief()),
        }
    }

    fn addr(&self) -> SocketAddr {
        self.str()
            .parse()
            .unwrap_or_else(|e| panic!("{:?} is not an address: {e}", self.str()))
    }

    fn is_null(&self) -> bool {
        *self == Json::Null
    }

    /// A short rendering for failure messages.
    fn brief(&self) -> String {
        let s = format!("{self:?}");
        if s.len() > 600 {
            format!("{}…", &s[..s.floor_char_boundary(600)])
        } else {
            s
        }
    }
}

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while matches!(self.b.get(self.i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn err<T>(&self, what: &str) -> Result<T, String> {
        let from = self.i.saturating_sub(40);
        let to = (self.i + 40).min(self.b.len());
        Err(format!(
            "{what} at byte {}: …{}…",
            self.i,
            String::from_utf8_lossy(&self.b[from..to])
        ))
    }

    fn eat(&mut self, c: u8) -> Result<(), String> {
        if self.b.get(self.i) == Some(&c) {
            self.i += 1;
            Ok(())
        } else {
            self.err(&format!("expected {:?}", c as char))
        }
    }

    fn value(&mut self, depth: usize) -> Result<Json, String> {
        if depth > 64 {
            return self.err("nested too deep");
        }
        match self.b.get(self.i) {
            Some(b'{') => {
                self.i += 1;
                let mut fields: Vec<(String, Json)> = Vec::new();
                self.ws();
                if self.b.get(self.i) == Some(&b'}') {
                    self.i += 1;
                    return Ok(Json::Obj(fields));
                }
                loop {
                    self.ws();
                    let k = self.string()?;
                    if fields.iter().any(|(o, _)| *o == k) {
                        return self.err(&format!("duplicate key {k:?}"));
                    }
                    self.ws();
                    self.eat(b':')?;
                    self.ws();
                    let v = self.value(depth + 1)?;
                    fields.push((k, v));
                    self.ws();
                    match self.b.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {
                            self.i += 1;
                            return Ok(Json::Obj(fields));
                        }
                        _ => return self.err("expected ',' or '}'"),
                    }
                }
            }
            Some(b'[') => {
                self.i += 1;
                let mut items = Vec::new();
                self.ws();
                if self.b.get(self.i) == Some(&b']') {
                    self.i += 1;
                    return Ok(Json::Arr(items));
                }
                loop {
                    self.ws();
                    items.push(self.value(depth + 1)?);
                    self.ws();
                    match self.b.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            return Ok(Json::Arr(items));
                        }
                        _ => return self.err("expected ',' or ']'"),
                    }
                }
            }
            Some(b'"') => Ok(Json::Str(self.string()?)),
            Some(b't') => self.literal("true", Json::Bool(true)),
            Some(b'f') => self.literal("false", Json::Bool(false)),
            Some(b'n') => self.literal("null", Json::Null),
            Some(b'-' | b'0'..=b'9') => self.number(),
            _ => self.err("expected a value"),
        }
    }

    fn literal(&mut self, word: &str, v: Json) -> Result<Json, String> {
        if self.b[self.i..].starts_with(word.as_bytes()) {
            self.i += word.len();
            Ok(v)
        } else {
            self.err("bad literal")
        }
    }

    fn number(&mut self) -> Result<Json, String> {
        let start = self.i;
        let digits = |p: &mut Parser<'_>| {
            let s = p.i;
            while p.b.get(p.i).is_some_and(u8::is_ascii_digit) {
                p.i += 1;
            }
            p.i > s
        };
        if self.b.get(self.i) == Some(&b'-') {
            self.i += 1;
        }
        if self.b.get(self.i) == Some(&b'0') {
            self.i += 1;
        } else if !digits(self) {
            return self.err("bad number");
        }
        if self.b.get(self.i) == Some(&b'.') {
            self.i += 1;
            if !digits(self) {
                return self.err("bad fraction");
            }
        }
        if matches!(self.b.get(self.i), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.b.get(self.i), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if !digits(self) {
                return self.err("bad exponent");
            }
        }
        Ok(Json::Num(
            String::from_utf8(self.b[start..self.i].to_vec()).unwrap(),
        ))
    }

    fn string(&mut self) -> Result<String, String> {
        self.eat(b'"')?;
        let mut out = Vec::new();
        loop {
            let Some(&c) = self.b.get(self.i) else {
                return self.err("unterminated string");
            };
            self.i += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    let Some(&e) = self.b.get(self.i) else {
                        return self.err("unterminated escape");
                    };
                    self.i += 1;
                    match e {
                        b'"' | b'\\' | b'/' => out.push(e),
                        b'b' => out.push(8),
                        b'f' => out.push(12),
                        b'n' => out.push(b'\n'),
                        b'r' => out.push(b'\r'),
                        b't' => out.push(b'\t'),
                        b'u' => {
                            let hex = self.b.get(self.i..self.i + 4).unwrap_or_default();
                            let code = std::str::from_utf8(hex)
                                .ok()
                                .and_then(|h| u32::from_str_radix(h, 16).ok());
                            let Some(ch) = code.and_then(char::from_u32) else {
                                return self.err("bad \\u escape");
                            };
                            self.i += 4;
                            out.extend_from_slice(ch.to_string().as_bytes());
                        }
                        _ => return self.err("bad escape"),
                    }
                }
                c if c < 0x20 => return self.err("control character in a string"),
                c => out.push(c),
            }
        }
        String::from_utf8(out).or_else(|_| self.err("string is not UTF-8"))
    }
}

/// The object of role `kind` named `name` in a status document.
fn role<'a>(status: &'a Json, kind: &str, name: &str) -> &'a Json {
    status
        .get("roles")
        .arr()
        .iter()
        .find(|r| r.get("role").str() == kind && r.get("name").str() == name)
        .unwrap_or_else(|| panic!("no {kind} '{name}' in {}", status.brief()))
}

/// The element of `list` whose `name` is `name`.
fn named<'a>(list: &'a Json, name: &str) -> &'a Json {
    list.arr()
        .iter()
        .find(|c| c.get("name").str() == name)
        .unwrap_or_else(|| panic!("no {name:?} in {}", list.brief()))
}

// ----- HTTP -----

#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8(self.body.clone()).expect("body is UTF-8")
    }
}

/// Parse a whole response (everything up to the server's close), checking
/// what every answer must have: a status line, `Content-Length` equal to the
/// body's length, `Connection: close`.
fn parse_response(raw: &[u8]) -> Response {
    let shown = || String::from_utf8_lossy(&raw[..raw.len().min(400)]).into_owned();
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head in {:?}", shown()));
    let head = std::str::from_utf8(&raw[..end]).expect("head is UTF-8");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let mut parts = status_line.splitn(3, ' ');
    assert_eq!(parts.next(), Some("HTTP/1.1"), "{status_line:?}");
    let status: u16 = parts.next().unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (k, v) = l
                .split_once(':')
                .unwrap_or_else(|| panic!("bad header line {l:?}"));
            (k.trim().to_owned(), v.trim().to_owned())
        })
        .collect();
    let r = Response {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
    };
    let len: usize = r
        .header("Content-Length")
        .unwrap_or_else(|| panic!("no Content-Length: {:?}", shown()))
        .parse()
        .unwrap();
    assert_eq!(
        len,
        r.body.len(),
        "Content-Length disagrees with the body the server sent before closing"
    );
    assert_eq!(r.header("Connection"), Some("close"), "{:?}", r.headers);
    r
}

/// Send `request` (in one write) on a new connection and read the whole
/// answer up to the server's close (which must come).
fn exchange(addr: SocketAddr, request: &[u8]) -> Response {
    let mut s = connect(addr);
    s.write_all(request).unwrap();
    read_response(&mut s)
}

fn read_response(s: &mut TcpStream) -> Response {
    let raw = read_to_eof(s, MAX_BODY);
    parse_response(&raw)
}

fn get(addr: SocketAddr, path: &str) -> Response {
    exchange(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: switchboard\r\nUser-Agent: test\r\n\r\n").as_bytes(),
    )
}

/// `GET /status`, checked and parsed.
fn status(addr: SocketAddr) -> Json {
    let r = get(addr, "/status");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("Content-Type"), Some("application/json"));
    let text = r.text();
    assert!(text.ends_with('\n'), "no final newline");
    check_brackets(&text);
    Json::parse(&text).unwrap_or_else(|e| panic!("status is not JSON: {e}"))
}

/// Braces and brackets balance outside strings (a cheap check that the
/// strict parser also makes; kept separate for a clearer message).
fn check_brackets(text: &str) {
    let mut stack = Vec::new();
    let (mut in_str, mut escaped) = (false, false);
    for (i, c) in text.char_indices() {
        if in_str {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_str = true,
            '{' | '[' => stack.push(c),
            '}' => assert_eq!(stack.pop(), Some('{'), "unbalanced '}}' at {i}"),
            ']' => assert_eq!(stack.pop(), Some('['), "unbalanced ']' at {i}"),
            _ => {}
        }
    }
    assert!(!in_str, "unterminated string");
    assert!(stack.is_empty(), "unclosed {stack:?}");
}

/// Poll `/status` until `cond` holds; returns the document that satisfied it.
fn wait_status(addr: SocketAddr, what: &str, cond: impl Fn(&Json) -> bool) -> Json {
    let mut last = None;
    let ok = util::wait_until(WAIT, || {
        let s = status(addr);
        let done = cond(&s);
        last = Some(s);
        done
    });
    let last = last.unwrap();
    assert!(ok, "timed out waiting for {what}: {}", last.brief());
    last
}

// ----- Prometheus text -----

#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
    line: usize,
}

#[derive(Debug, Default)]
struct Metrics {
    samples: Vec<Sample>,
    /// Family name -> kind (from TYPE).
    types: HashMap<String, String>,
    /// Family name -> line numbers of its HELP, TYPE and samples.
    lines: HashMap<String, Vec<usize>>,
}

impl Metrics {
    /// The value of the one sample `name` whose labels are exactly `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v))
            })
            .collect();
        assert_eq!(
            found.len(),
            1,
            "samples {name}{labels:?}: {found:?} (all of that name: {:?})",
            self.samples
                .iter()
                .filter(|s| s.name == name)
                .collect::<Vec<_>>()
        );
        found[0].value
    }
}

fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(s: &str) -> bool {
    is_name(s) && !s.contains(':')
}

/// Parse `{k="v",...}` starting after the `{`; returns the labels and the
/// rest after the `}`.
fn parse_labels(mut rest: &str, line: usize) -> (Vec<(String, String)>, &str) {
    let mut labels = Vec::new();
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return (labels, r);
        }
        let (k, r) = rest
            .split_once("=\"")
            .unwrap_or_else(|| panic!("line {line}: bad label in {rest:?}"));
        assert!(is_label_name(k), "line {line}: bad label name {k:?}");
        let mut value = String::new();
        let mut chars = r.char_indices();
        let end = loop {
            let Some((i, c)) = chars.next() else {
                panic!("line {line}: unterminated label value")
            };
            match c {
                '"' => break i,
                '\\' => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => panic!("line {line}: bad escape {other:?}"),
                },
                '\n' => panic!("line {line}: newline in a label value"),
                c => value.push(c),
            }
        };
        assert!(
            labels.iter().all(|(o, _)| o != k),
            "line {line}: label {k} twice"
        );
        labels.push((k.to_owned(), value));
        rest = &r[end + 1..];
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else {
            assert!(
                rest.starts_with('}'),
                "line {line}: expected ',' or '}}' in {rest:?}"
            );
        }
    }
}

/// Parse and check a text exposition: every line a comment, HELP, TYPE or a
/// sample `name{labels} value` / `name value`; every family with exactly one
/// HELP and one TYPE, both before its samples; every sample of a declared
/// family; counters named `_total`; no two samples with the same name and
/// labels.
fn parse_metrics(text: &str) -> Metrics {
    assert!(
        text.ends_with('\n'),
        "the last line must end with a newline"
    );
    let mut m = Metrics::default();
    let mut helps: HashMap<String, usize> = HashMap::new();
    let mut seen: Vec<(String, Vec<(String, String)>)> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let n = n + 1;
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, doc) = rest.split_once(' ').unwrap_or((rest, ""));
            assert!(is_name(name), "line {n}: bad family name {name:?}");
            assert!(!doc.trim().is_empty(), "line {n}: empty HELP for {name}");
            *helps.entry(name.to_owned()).or_default() += 1;
            assert!(
                !m.samples.iter().any(|s| s.name == name),
                "line {n}: HELP for {name} after its samples"
            );
            m.lines.entry(name.to_owned()).or_default().push(n);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split(' ');
            let (name, kind) = (it.next().unwrap(), it.next().unwrap_or(""));
            assert!(it.next().is_none(), "line {n}: extra tokens in {line:?}");
            assert!(is_name(name), "line {n}: bad family name {name:?}");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "line {n}: bad type {kind:?}"
            );
            assert!(
                m.types.insert(name.to_owned(), kind.to_owned()).is_none(),
                "line {n}: second TYPE for {name}"
            );
            assert!(
                !m.samples.iter().any(|s| s.name == name),
                "line {n}: TYPE for {name} after its samples"
            );
            if kind == "counter" {
                assert!(
                    name.ends_with("_total"),
                    "counter {name} must end in _total"
                );
            }
            m.lines.entry(name.to_owned()).or_default().push(n);
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .unwrap_or_else(|| panic!("line {n}: no value in {line:?}"));
        let name = &line[..name_end];
        assert!(is_name(name), "line {n}: bad metric name {name:?}");
        let (labels, rest) = match line[name_end..].strip_prefix('{') {
            Some(r) => parse_labels(r, n),
            None => (Vec::new(), &line[name_end..]),
        };
        let rest = rest
            .strip_prefix(' ')
            .unwrap_or_else(|| panic!("line {n}: expected ' value' in {line:?}"));
        let mut it = rest.split(' ');
        let value: f64 = it
            .next()
            .unwrap()
            .parse()
            .unwrap_or_else(|e| panic!("line {n}: bad value in {line:?}: {e}"));
        if let Some(ts) = it.next() {
            ts.parse::<i64>()
                .unwrap_or_else(|e| panic!("line {n}: bad timestamp in {line:?}: {e}"));
        }
        assert!(it.next().is_none(), "line {n}: extra tokens in {line:?}");
        assert!(
            m.types.contains_key(name),
            "line {n}: sample {name} has no TYPE before it"
        );
        let mut key = labels.clone();
        key.sort();
        assert!(
            !seen.contains(&(name.to_owned(), key.clone())),
            "line {n}: {name}{labels:?} twice"
        );
        seen.push((name.to_owned(), key));
        m.lines.entry(name.to_owned()).or_default().push(n);
        m.samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
            line: n,
        });
    }
    for name in m.types.keys() {
        assert_eq!(helps.get(name), Some(&1), "family {name}: HELP lines");
        assert!(
            m.samples.iter().any(|s| &s.name == name),
            "family {name} without samples"
        );
    }
    for name in helps.keys() {
        assert!(m.types.contains_key(name), "HELP for {name} without TYPE");
    }
    m
}

fn metrics(addr: SocketAddr) -> Metrics {
    let r = get(addr, "/metrics");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        r.header("Content-Type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    parse_metrics(&r.text())
}

// ----- sockets -----

/// Wait (at most `limit`) for the server to close `s` without sending
/// anything; returns how long that took.
fn closed_within(s: &mut TcpStream, limit: Duration) -> Duration {
    let t0 = Instant::now();
    s.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 512];
    let r = loop {
        match s.read(&mut buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            r => break r,
        }
    };
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    match r {
        Ok(0) => {}
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        Ok(n) => panic!(
            "expected a close, got {:?}",
            buf[..n].escape_ascii().to_string()
        ),
        Err(e) if is_timeout(&e) => panic!("not closed within {limit:?}"),
        Err(e) => panic!("expected a close: {e}"),
    }
    t0.elapsed()
}

/// Nothing arrives on `s` for [`QUIET`] and it stays open.
fn expect_open(s: &mut TcpStream) {
    s.set_read_timeout(Some(QUIET)).unwrap();
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Err(e) if is_timeout(&e) => {}
        Ok(0) => panic!("closed"),
        Ok(n) => panic!("unexpected {:?}", buf[..n].escape_ascii().to_string()),
        Err(e) => panic!("read: {e}"),
    }
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
}

// ----- engines -----

/// An engine with only the admin role (on port 0) and `keys` in `[admin]`,
/// after `before` (other roles).
fn admin_only(keys: &str, before: &str) -> (TestEngine, SocketAddr) {
    let engine = TestEngine::start(&format!(
        "{before}\n[admin]\nlisten = \"127.0.0.1:0\"\n{keys}\n"
    ));
    let addr = *engine.addrs.last().unwrap();
    (engine, addr)
}

/// Every role in one engine, with some activity on each.
struct Gateway {
    engine: TestEngine,
    admin: SocketAddr,
    echo: SocketAddr,
    subs: SocketAddr,
    ingest: SocketAddr,
    devices: SocketAddr,
    tunnel: SocketAddr,
    public: SocketAddr,
    subscriber: TcpStream,
    publisher: TcpStream,
    device: TcpStream,
    /// The application of c1 and a device that has not sent its id: held
    /// open so that the status shows them.
    _held: Vec<TcpStream>,
    unknown_peer: SocketAddr,
    /// A client of the tunnel's public port (a stream to the echo role).
    stream: TcpStream,
}

/// Records the publisher sent.
const RECORDS: &[u8] = b"rec-1\nrec-2\nrec-3\n";
/// Bytes the device sent after its id, and the application sent back.
const UP: &[u8] = b"0123456789";
const DOWN: &[u8] = b"abcdefg";

impl Gateway {
    fn start() -> Gateway {
        let p = |_| SocketAddr::from(([127, 0, 0, 1], fixed_port()));
        let [
            echo,
            subs,
            ingest,
            devices,
            app1,
            app2,
            tunnel,
            public,
            admin,
        ] = [0; 9].map(p);
        let toml = format!(
            r#"
[[echo]]
name = "loc"
listen = "{echo}"

[[broadcast]]
name = "pos"
listen = "{subs}"
ingest = "{ingest}"

[[router]]
name = "r1"
listen = "{devices}"
[[router.connpt]]
name = "c1"
id = "dev-A"
listen = "{app1}"
[[router.connpt]]
name = "c2"
id = "dev-B"
listen = "{app2}"

[[tunnel_server]]
name = "ts"
listen = "{tunnel}"
[[tunnel_server.service]]
name = "svc"
public = "{public}"

[[tunnel_agent]]
name = "svc"
server = "{tunnel}"
local = "{echo}"

[admin]
listen = "{admin}"
request_timeout = "2s"
"#
        );
        let engine = TestEngine::start(&toml);

        // Broadcast: a subscriber, then a publisher with three records.
        let mut subscriber = connect(subs);
        wait_status(admin, "the subscriber", |s| {
            role(s, "broadcast", "pos").get("subscribers").arr().len() == 1
        });
        let mut publisher = connect(ingest);
        publisher.write_all(RECORDS).unwrap();
        expect_bytes(&mut subscriber, RECORDS);

        // Router: an application on c1, an unknown id, the device of c1
        // (bytes both ways), and a device that has not sent its id.
        let mut app = connect(app1);
        wait_status(admin, "the application", |s| {
            named(role(s, "router", "r1").get("connpts"), "c1")
                .get("applications")
                .u64()
                == 1
        });
        let mut unknown = connect(devices);
        let unknown_peer = unknown.local_addr().unwrap();
        unknown.write_all(b"zzz").unwrap();
        closed_within(&mut unknown, WAIT);
        let mut device = connect(devices);
        device.write_all(b"dev-A").unwrap();
        device.write_all(UP).unwrap();
        expect_bytes(&mut app, UP);
        app.write_all(DOWN).unwrap();
        expect_bytes(&mut device, DOWN);
        let pending = connect(devices);
        wait_status(admin, "the pending device", |s| {
            role(s, "router", "r1").get("pending").u64() == 1
        });

        // Tunnel: the agent links (the public port opens), one stream.
        wait_status(admin, "the tunnel link", |s| {
            named(role(s, "tunnel_server", "ts").get("services"), "svc")
                .get("link")
                .str()
                == "up"
        });
        let mut stream = connect(public);
        stream.write_all(b"ping").unwrap();
        expect_bytes(&mut stream, b"ping");

        Gateway {
            engine,
            admin,
            echo,
            subs,
            ingest,
            devices,
            tunnel,
            public,
            subscriber,
            publisher,
            device,
            _held: vec![app, pending],
            unknown_peer,
            stream,
        }
    }
}

// ----- status, metrics, health -----

#[test]
fn status_describes_every_role_and_what_it_serves() {
    let g = Gateway::start();
    let s = status(g.admin);

    assert_eq!(s.get("version").str(), env!("CARGO_PKG_VERSION"));
    let uptime = s.get("uptime_seconds").u64();
    assert!(uptime < 60, "uptime {uptime}");
    let engine = s.get("engine");
    // subscriber, publisher, app, device, pending, stream; the tunnel link
    // (both ends), the stream's local leg (both ends), this request.
    assert!(engine.get("connections").u64() >= 11, "{}", engine.brief());
    for k in [
        "accepted_total",
        "closed_total",
        "bytes_in_total",
        "bytes_out_total",
        "buffers_lent",
        "turns_total",
    ] {
        engine.get(k).u64();
    }

    let kinds: Vec<(&str, &str)> = s
        .get("roles")
        .arr()
        .iter()
        .map(|r| (r.get("role").str(), r.get("name").str()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("echo", "loc"),
            ("broadcast", "pos"),
            ("router", "r1"),
            ("tunnel_server", "ts"),
            ("tunnel_agent", "svc"),
            ("admin", "admin"),
        ]
    );

    // Echo.
    assert_eq!(role(&s, "echo", "loc").get("listen").addr(), g.echo);

    // Broadcast.
    let b = role(&s, "broadcast", "pos");
    assert_eq!(b.get("listen").addr(), g.subs);
    assert_eq!(b.get("ingest").addr(), g.ingest);
    assert_eq!(b.get("records_in_total").u64(), 3);
    let subs = b.get("subscribers").arr();
    assert_eq!(subs.len(), 1, "{}", b.brief());
    let sub = &subs[0];
    assert_eq!(sub.get("peer").addr(), g.subscriber.local_addr().unwrap());
    assert!(sub.get("connected_seconds").u64() <= uptime);
    assert_eq!(sub.get("queued_bytes").u64(), 0);
    assert_eq!(sub.get("delivered").u64(), 3);
    assert_eq!(sub.get("dropped").u64(), 0);
    let pubs = b.get("publishers").arr();
    assert_eq!(pubs.len(), 1);
    assert_eq!(
        pubs[0].get("peer").addr(),
        g.publisher.local_addr().unwrap()
    );

    // Router.
    let r = role(&s, "router", "r1");
    assert_eq!(r.get("listen").addr(), g.devices);
    assert_eq!(r.get("online").u64(), 1);
    assert_eq!(r.get("pending").u64(), 1);
    let c1 = named(r.get("connpts"), "c1");
    assert_eq!(c1.get("id").str(), "dev-A");
    assert!(c1.get("online").bool());
    assert!(c1.get("since_seconds").u64() <= uptime);
    assert_eq!(c1.get("peer").addr(), g.device.local_addr().unwrap());
    assert_eq!(c1.get("bytes_from_device").u64(), UP.len() as u64);
    assert_eq!(c1.get("bytes_to_device").u64(), DOWN.len() as u64);
    assert_eq!(c1.get("applications").u64(), 1);
    assert!(!c1.get("upstream").bool());
    let c2 = named(r.get("connpts"), "c2");
    assert!(!c2.get("online").bool());
    assert!(
        c2.get("since_seconds").is_null(),
        "never seen: {}",
        c2.brief()
    );
    assert!(c2.get("peer").is_null());
    assert_eq!(c2.get("bytes_from_device").u64(), 0);
    assert_eq!(c2.get("bytes_to_device").u64(), 0);
    assert_eq!(c2.get("applications").u64(), 0);
    let unknown = r.get("recent_unknown").arr();
    assert_eq!(unknown.len(), 1, "{}", r.brief());
    assert_eq!(unknown[0].get("id").str(), "zzz");
    assert_eq!(unknown[0].get("peer").addr(), g.unknown_peer);

    // Tunnel server.
    let t = role(&s, "tunnel_server", "ts");
    assert_eq!(t.get("listen").addr(), g.tunnel);
    assert_eq!(t.get("pending_links").u64(), 0);
    let services = t.get("services").arr();
    assert_eq!(services.len(), 1);
    let svc = &services[0];
    assert_eq!(svc.get("name").str(), "svc");
    assert!(!svc.get("token").bool());
    assert_eq!(svc.get("link").str(), "up");
    assert_eq!(svc.get("public").addr(), g.public);
    let agent = svc.get("agent").addr();
    assert!(agent.ip().is_loopback(), "{agent}");
    assert_ne!(agent.port(), g.tunnel.port());
    assert!(svc.get("linked_seconds").u64() <= uptime);
    assert_eq!(svc.get("streams").u64(), 1);
    assert_eq!(t.get("streams_total").u64(), 1);

    // Tunnel agent.
    let a = role(&s, "tunnel_agent", "svc");
    assert_eq!(a.get("server").str(), g.tunnel.to_string());
    assert_eq!(a.get("local").addr(), g.echo);
    assert_eq!(a.get("state").str(), "up");
    assert!(a.get("linked_seconds").u64() <= uptime);
    assert_eq!(a.get("streams").u64(), 1);
    assert_eq!(a.get("reconnects_total").u64(), 0);
    assert_eq!(a.get("handshake_timeouts_total").u64(), 0);
    assert_eq!(a.get("last_error").str(), "");
    assert!(
        a.get("extensions").u64() > 0,
        "extensions asked for by default"
    );

    // The stream is still served.
    let mut stream = g.stream;
    stream.write_all(b"still").unwrap();
    expect_bytes(&mut stream, b"still");
    g.engine.stop();
}

#[test]
fn status_lists_the_admin_listener_too() {
    let (engine, admin) = admin_only("", "");
    let s = status(admin);
    let a = role(&s, "admin", "admin");
    assert!(a.has("listen"), "{}", a.brief());
    assert_eq!(a.get("listen").addr(), admin);
    engine.stop();
}

#[test]
fn metrics_are_prometheus_text_that_agrees_with_what_happened() {
    let g = Gateway::start();
    let m = metrics(g.admin);

    // Engine-wide families carry no role labels.
    assert!(m.value("switchboard_connections", &[]) >= 11.0);
    assert!(m.value("switchboard_accepted_connections_total", &[]) >= 9.0);
    m.value("switchboard_uptime_seconds", &[]);
    m.value("switchboard_loop_turns_total", &[]);
    assert_eq!(m.types["switchboard_connections"], "gauge");

    let router = [("role", "router"), ("name", "r1")];
    let v = |name: &str, labels: &[(&str, &str)]| m.value(name, labels);
    assert_eq!(v("switchboard_router_identified_total", &router), 1.0);
    assert_eq!(v("switchboard_router_unknown_total", &router), 1.0);
    assert_eq!(v("switchboard_router_online_devices", &router), 1.0);
    assert_eq!(v("switchboard_router_pending_connections", &router), 1.0);
    assert_eq!(v("switchboard_router_connpts", &router), 2.0);
    assert_eq!(
        v("switchboard_router_device_bytes_total", &router),
        UP.len() as f64
    );
    assert_eq!(
        v("switchboard_router_application_bytes_total", &router),
        DOWN.len() as f64
    );
    assert_eq!(v("switchboard_router_dropped_bytes_total", &router), 0.0);
    assert_eq!(v("switchboard_router_refused_total", &router), 0.0);

    let bc = [("role", "broadcast"), ("name", "pos")];
    assert_eq!(v("switchboard_broadcast_records_total", &bc), 3.0);
    assert_eq!(v("switchboard_broadcast_delivered_records_total", &bc), 3.0);
    assert_eq!(v("switchboard_broadcast_subscribers", &bc), 1.0);
    assert_eq!(v("switchboard_broadcast_publishers", &bc), 1.0);
    assert_eq!(v("switchboard_broadcast_dropped_records_total", &bc), 0.0);

    let ts = [
        ("role", "tunnel_server"),
        ("name", "ts"),
        ("service", "svc"),
    ];
    assert_eq!(v("switchboard_tunnel_link_up", &ts), 1.0);
    assert_eq!(v("switchboard_tunnel_streams", &ts), 1.0);
    let ts = [("role", "tunnel_server"), ("name", "ts")];
    assert_eq!(v("switchboard_tunnel_streams_opened_total", &ts), 1.0);
    assert_eq!(v("switchboard_tunnel_links_total", &ts), 1.0);
    let ta = [("role", "tunnel_agent"), ("name", "svc")];
    assert_eq!(v("switchboard_tunnel_link_up", &ta), 1.0);
    assert_eq!(v("switchboard_tunnel_streams", &ta), 1.0);
    assert_eq!(v("switchboard_tunnel_reconnects_total", &ta), 0.0);
    assert_eq!(v("switchboard_tunnel_handshake_timeouts_total", &ta), 0.0);
    // "ping" went through the link in both directions.
    assert!(v("switchboard_tunnel_sent_bytes_total", &ts) >= 4.0);
    assert!(v("switchboard_tunnel_received_bytes_total", &ts) >= 4.0);

    // Every role-labelled sample names a role that runs.
    let roles = [
        ("echo", "loc"),
        ("broadcast", "pos"),
        ("router", "r1"),
        ("tunnel_server", "ts"),
        ("tunnel_agent", "svc"),
        ("admin", "admin"),
    ];
    for s in &m.samples {
        let get = |k: &str| {
            s.labels
                .iter()
                .find(|(l, _)| l == k)
                .map(|(_, v)| v.as_str())
        };
        if let Some(kind) = get("role") {
            let name = get("name").unwrap_or_else(|| panic!("line {}: role without name", s.line));
            assert!(
                roles.contains(&(kind, name)),
                "line {}: unknown role {kind}/{name}",
                s.line
            );
        } else {
            assert!(
                !s.name.starts_with("switchboard_router")
                    && !s.name.starts_with("switchboard_broadcast")
                    && !s.name.starts_with("switchboard_tunnel"),
                "line {}: role metric {} without role labels",
                s.line,
                s.name
            );
        }
    }
    drop(g);
}

#[test]
fn metrics_families_are_each_one_group() {
    let g = Gateway::start();
    let m = metrics(g.admin);
    for (name, lines) in &m.lines {
        let contiguous = lines.windows(2).all(|w| w[1] == w[0] + 1);
        assert!(contiguous, "family {name} is split over lines {lines:?}");
    }
    drop(g);
}

#[test]
fn healthz_answers_ok_and_ignores_a_query() {
    let (engine, admin) = admin_only("", "");
    for path in ["/healthz", "/healthz?probe=1"] {
        let r = get(admin, path);
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "ok\n");
        assert_eq!(r.header("Content-Type"), Some("text/plain; charset=utf-8"));
        assert_eq!(r.header("Cache-Control"), Some("no-store"));
    }
    // A query on /status is ignored too.
    let r = get(admin, "/status?pretty=1");
    assert_eq!(r.status, 200);
    Json::parse(&r.text()).unwrap();
    engine.stop();
}

#[test]
fn a_client_that_half_closes_after_its_request_gets_the_answer() {
    let (engine, admin) = admin_only("", "");
    let mut s = connect(admin);
    s.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let r = read_response(&mut s);
    assert_eq!((r.status, r.text().as_str()), (200, "ok\n"));
    engine.stop();
}

// ----- hostile clients -----

#[test]
fn malformed_requests_get_400() {
    let (engine, admin) = admin_only("", "");
    let cases: [&[u8]; 5] = [
        b"GARBAGE\r\n\r\n",
        b"GET /status HTTP/9.9\r\n\r\n",
        b"\x00\x01\x02\x03 / HTTP/1.1\r\n\r\n",
        b"GET /status HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /sta tus HTTP/1.1\r\n\r\n",
    ];
    for req in cases {
        let r = exchange(admin, req);
        assert_eq!(
            r.status,
            400,
            "{:?}: {}",
            req.escape_ascii().to_string(),
            r.text()
        );
        assert_eq!(r.text(), "400 Bad Request\n");
    }
    // The endpoint still serves.
    assert_eq!(get(admin, "/healthz").status, 200);
    engine.stop();
}

#[test]
fn a_head_over_8_kib_gets_431() {
    let (engine, admin) = admin_only("", "");
    // In one write, complete but too long.
    let mut req = b"GET /status HTTP/1.1\r\nX-Pad: ".to_vec();
    req.resize(9000, b'a');
    req.extend_from_slice(b"\r\n\r\n");
    let r = exchange(admin, &req);
    assert_eq!(r.status, 431, "{}", r.text());

    // Dribbled, never ending: answered once 8 KiB have arrived.
    let mut s = connect(admin);
    let mut head = b"GET /status HTTP/1.1\r\nX-Pad: ".to_vec();
    head.resize(8 * 1024, b'b');
    for piece in head.chunks(1024) {
        s.write_all(piece).unwrap();
        thread::sleep(Duration::from_millis(5));
    }
    let r = read_response(&mut s);
    assert_eq!(r.status, 431, "{}", r.text());

    // Just under the limit is fine.
    let mut req = b"GET /healthz HTTP/1.1\r\nX-Pad: ".to_vec();
    req.resize(8 * 1024 - 5, b'c');
    req.extend_from_slice(b"\r\n\r\n");
    assert!(req.len() < 8 * 1024);
    assert_eq!(exchange(admin, &req).status, 200);
    engine.stop();
}

fn with_headers(n: usize) -> Vec<u8> {
    let mut req = b"GET /healthz HTTP/1.1\r\n".to_vec();
    for i in 0..n {
        req.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    req
}

#[test]
fn more_than_32_headers_get_431() {
    let (engine, admin) = admin_only("", "");
    let r = exchange(admin, &with_headers(40));
    assert_eq!(r.status, 431, "{}", r.text());
    assert_eq!(r.text(), "431 Request Header Fields Too Large\n");
    assert_eq!(exchange(admin, &with_headers(33)).status, 431);
    assert_eq!(exchange(admin, &with_headers(32)).status, 200);
    engine.stop();
}

#[test]
fn other_methods_get_405_with_allow_get() {
    let (engine, admin) = admin_only("", "");
    for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"] {
        for path in ["/status", "/metrics", "/healthz", "/nowhere"] {
            let req = format!("{method} {path} HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
            let r = exchange(admin, req.as_bytes());
            assert_eq!(r.status, 405, "{method} {path}: {}", r.text());
            assert_eq!(r.header("Allow"), Some("GET"), "{method} {path}");
            assert_eq!(r.text(), "405 Method Not Allowed\n");
        }
    }
    // A body that came with the head does not confuse anything.
    let r = exchange(
        admin,
        b"POST /status HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
    );
    assert_eq!(r.status, 405);
    // Only 405 carries Allow.
    assert_eq!(get(admin, "/healthz").header("Allow"), None);
    engine.stop();
}

#[test]
fn unknown_paths_get_404() {
    let (engine, admin) = admin_only("", "");
    for path in [
        "/",
        "/nope",
        "/status/extra",
        "/STATUS",
        "/healthz/",
        "/metrics.json",
    ] {
        let r = get(admin, path);
        assert_eq!(r.status, 404, "{path}: {}", r.text());
        assert_eq!(r.text(), "404 Not Found\n");
    }
    engine.stop();
}

#[test]
fn a_stalled_request_is_closed_after_request_timeout() {
    let (engine, admin) = admin_only("request_timeout = \"300ms\"", "");
    let timeout = Duration::from_millis(300);
    let margin = Duration::from_secs(1);

    // Each is closed request_timeout after it connected (the engine cannot
    // have accepted it before the connect began), within a margin.
    let cases: [&[u8]; 3] = [
        b"GET /sta",                             // half a request line
        b"",                                     // nothing at all
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n", // a head without its end
    ];
    for sent in cases {
        let t0 = Instant::now();
        let mut s = connect(admin);
        s.write_all(sent).unwrap();
        closed_within(&mut s, timeout + margin);
        let took = t0.elapsed();
        println!(
            "{:?} closed {took:?} after connecting (request_timeout {timeout:?})",
            sent.escape_ascii().to_string()
        );
        // (Slack: the loop's clock is read once per turn, before the accept.)
        assert!(
            took + Duration::from_millis(20) >= timeout,
            "closed after {took:?}, before the request timeout"
        );
    }

    wait_for(
        "the engine to drop the stalled clients",
        WAIT,
        || engine.stats().connections == 0,
        || brief(&engine.stats()),
    );
    assert_eq!(get(admin, "/healthz").status, 200);
    engine.stop();
}

#[test]
fn healthz_is_answered_when_every_client_slot_is_taken() {
    let (engine, admin) = admin_only("max_clients = 2\nrequest_timeout = \"5s\"", "");
    let accepted = || engine.stats().accepted_total;
    let mut a = connect(admin);
    wait_for(
        "a accepted",
        WAIT,
        || accepted() == 1,
        || brief(&engine.stats()),
    );
    let mut b = connect(admin);
    wait_for(
        "b accepted",
        WAIT,
        || accepted() == 2,
        || brief(&engine.stats()),
    );

    // Both slots are held by silent clients: a new client is still served,
    // and the oldest silent one (a) made room.
    let t0 = Instant::now();
    assert_eq!(get(admin, "/healthz").status, 200);
    println!(
        "/healthz answered in {:?} with every slot taken",
        t0.elapsed()
    );
    closed_within(&mut a, Duration::from_secs(2));
    expect_open(&mut b);
    let status = get(admin, "/status").text();
    assert!(status.contains("\"evicted_total\":"), "{status}");
    b.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut b).status, 200);
    let metrics = get(admin, "/metrics").text();
    let evicted = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("switchboard_admin_evicted_total{role=\"admin\",name=\"admin\"} ")
        })
        .unwrap_or_else(|| panic!("no evicted counter in {metrics}"));
    assert!(evicted.parse::<u64>().unwrap() >= 1, "{evicted}");
    engine.stop();
}

/// Clients that poll in a loop, as many as `max_clients`: every request is
/// answered whole, and none is evicted to make room for another, although
/// a client that got its answer reconnects within the loop turn that closed
/// its previous connection (requests of one turn share one report build).
#[test]
fn clients_polling_at_max_clients_are_all_answered_and_never_evicted() {
    const CLIENTS: usize = 4;
    const ROUNDS: usize = 30;
    // A router with many connpts makes each report, and so each loop turn
    // that builds one, take a while.
    let mut roles = String::from(
        "[[router]]\nlisten = \"127.0.0.1:0\"\nreconnect_min = \"1h\"\nreconnect_max = \"1h\"\n",
    );
    for i in 0..2000 {
        roles.push_str(&format!(
            "[[router.connpt]]\nname = \"c{i}\"\nid = \"d{i:05}\"\nconnect = \"127.0.0.1:9\"\n"
        ));
    }
    let (engine, admin) = admin_only(&format!("max_clients = {CLIENTS}"), &roles);
    let pollers: Vec<_> = (0..CLIENTS)
        .map(|i| {
            thread::spawn(move || {
                for round in 0..ROUNDS {
                    if (i + round) % 2 == 0 {
                        let s = status(admin);
                        assert_eq!(s.get("version").str(), env!("CARGO_PKG_VERSION"));
                    } else {
                        let m = metrics(admin);
                        assert!(m.value("switchboard_uptime_seconds", &[]) >= 0.0);
                    }
                }
            })
        })
        .collect();
    for p in pollers {
        p.join().unwrap();
    }
    let m = metrics(admin);
    let labels = [("role", "admin"), ("name", "admin")];
    assert_eq!(m.value("switchboard_admin_evicted_total", &labels), 0.0);
    assert_eq!(
        m.value("switchboard_accepted_connections_total", &[]),
        (CLIENTS * ROUNDS + 1) as f64
    );
    engine.stop();
}

#[test]
fn allow_closes_other_addresses_and_bad_requests_are_counted() {
    let (engine, admin) = admin_only("allow = [\"127.0.0.2/32\"]", "");
    // 127.0.0.1 is not allowed: closed at once, nothing answered.
    let mut s = connect(admin);
    s.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").ok();
    closed_within(&mut s, Duration::from_secs(2));
    drop(engine);

    let (engine, admin) = admin_only("allow = [\"127.0.0.0/8\"]", "");
    let mut bad = connect(admin);
    bad.write_all(b"NOT HTTP\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut bad).status, 400);
    let status = get(admin, "/status").text();
    assert!(status.contains("\"bad_requests_total\":1"), "{status}");
    engine.stop();
}

#[test]
fn a_stalled_client_does_not_stall_the_loop() {
    let (engine, admin) = admin_only("request_timeout = \"5s\"", "");
    let mut slow = connect(admin);
    slow.write_all(b"GET /healthz HT").unwrap();
    let mut worst = Duration::ZERO;
    for _ in 0..20 {
        let t0 = Instant::now();
        let r = get(admin, "/healthz");
        worst = worst.max(t0.elapsed());
        assert_eq!(r.status, 200);
    }
    println!("/healthz while a client is stalled: worst {worst:?} of 20");
    assert!(worst < Duration::from_secs(1), "{worst:?}");
    // The slow one is still waited for, and answered when it finishes.
    expect_open(&mut slow);
    slow.write_all(b"TP/1.1\r\n\r\n").unwrap();
    let r = read_response(&mut slow);
    assert_eq!((r.status, r.text().as_str()), (200, "ok\n"));
    engine.stop();
}

/// Router connpts (with `connect`, so no listener each) that make the
/// status document about `bytes` long.
fn bulky_router(bytes: usize) -> String {
    // One connpt's JSON object is about 265 bytes with these names.
    let n = bytes / 230;
    let pad = "x".repeat(80);
    let mut t = String::from("[[router]]\nname = \"bulk\"\nlisten = \"127.0.0.1:0\"\n");
    for i in 0..n {
        t.push_str(&format!(
            "[[router.connpt]]\nname = \"connpt-{i:06}-{pad}\"\nid = \"id{i:06}\"\nconnect = \"127.0.0.1:9\"\n"
        ));
    }
    t
}

#[test]
fn a_client_that_never_reads_a_large_status_does_not_block_others() {
    // Larger than what the kernel can buffer on both sides.
    let want = 2 * kernel_send_buffer_max() as usize + 4 * 1024 * 1024;
    // The readers' own reads must never pause for request_timeout; under
    // user-mode emulation everything runs several times slower.
    let timeout = if util::emulated().is_some() {
        "5s"
    } else {
        "1s"
    };
    let (engine, admin) = admin_only(
        &format!(
            "request_timeout = \"{timeout}\"\nmax_response = {}",
            4 * want
        ),
        &bulky_router(want),
    );
    let mut stuck = connect_with_recv_buffer(admin, 4096);
    stuck.write_all(b"GET /status HTTP/1.1\r\n\r\n").unwrap();

    // Others are answered, small and large, while it does not read.
    let t0 = Instant::now();
    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        let t = Instant::now();
        assert_eq!(get(admin, "/healthz").status, 200);
        worst = worst.max(t.elapsed());
    }
    let r = get(admin, "/status");
    assert_eq!(r.status, 200);
    let len = r.body.len();
    assert!(len >= want, "status is only {len} bytes; wanted {want}");
    Json::parse(&r.text()).unwrap();
    println!(
        "status of {len} bytes; /healthz worst {worst:?}, whole big /status read in {:?}, while one client does not read",
        t0.elapsed()
    );
    // Building a 12 MB report holds the loop for ~0.2 s natively in a debug
    // build, several times that under emulation.
    let bound = Duration::from_secs(if util::emulated().is_some() { 10 } else { 1 });
    assert!(worst < bound, "{worst:?}");

    // Its answer does not move: the engine drops it after request_timeout.
    wait_for(
        "the engine to drop the client that does not read",
        WAIT,
        || engine.stats().connections == 0,
        || brief(&engine.stats()),
    );
    // What it can still read is a truncated answer, then the end.
    stuck.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut got = 0usize;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match stuck.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("read after {got} bytes: {e}"),
        }
    }
    assert!(
        got < len,
        "got {got} of {len}: the whole answer was buffered"
    );
    engine.stop();
}

#[test]
fn a_report_over_max_response_gets_503() {
    let (engine, admin) = admin_only("max_response = 4096", &bulky_router(64 * 1024));
    let r = get(admin, "/status");
    assert_eq!(r.status, 503, "{} bytes", r.body.len());
    assert_eq!(r.text(), "503 Service Unavailable\n");
    assert_eq!(get(admin, "/healthz").status, 200);
    engine.stop();
}

#[test]
fn responses_have_exact_lengths_and_the_server_closes() {
    let (engine, admin) = admin_only("", "[[echo]]\nname = \"e\"\nlisten = \"127.0.0.1:0\"\n");
    for (req, status) in [
        (&b"GET /status HTTP/1.1\r\n\r\n"[..], 200),
        (b"GET /metrics HTTP/1.1\r\n\r\n", 200),
        (b"GET /healthz HTTP/1.0\r\n\r\n", 200),
        (b"GET /x HTTP/1.1\r\n\r\n", 404),
        (b"PUT / HTTP/1.1\r\n\r\n", 405),
        (b"BAD\r\n\r\n", 400),
    ] {
        // `exchange` reads to the server's close and checks Content-Length
        // and Connection: close.
        let r = exchange(admin, req);
        assert_eq!(r.status, status, "{:?}", req.escape_ascii().to_string());
    }
    // A second request on the same connection is not read: one answer, then
    // the close.
    let mut s = connect(admin);
    s.write_all(b"GET /healthz HTTP/1.1\r\n\r\nGET /status HTTP/1.1\r\n\r\n")
        .unwrap();
    let raw = read_to_eof(&mut s, MAX_BODY);
    let r = parse_response(&raw);
    assert_eq!((r.status, r.text().as_str()), (200, "ok\n"));
    engine.stop();
}
