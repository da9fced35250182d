//! The report writer's escaping (`switchboard::engine::report`) on any text,
//! such as names from the config and ids received from devices: the JSON
//! string and the Prometheus label value it writes never end early or break
//! their line, and read back to exactly the text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::engine::report::{escape_json, escape_label};

/// The text a JSON string's inside stands for; `None` if it is not a valid
/// inside (a raw quote, backslash or control character, a bad escape).
fn read_json(s: &str) -> Option<String> {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return None,
            c if (c as u32) < 0x20 => return None,
            '\\' => match chars.next()? {
                '"' => out.push('"'),
                '\\' => out.push('\\'),
                '/' => out.push('/'),
                'n' => out.push('\n'),
                'r' => out.push('\r'),
                't' => out.push('\t'),
                'b' => out.push('\u{8}'),
                'f' => out.push('\u{c}'),
                'u' => {
                    let hex: String = chars.by_ref().take(4).collect();
                    let v = u32::from_str_radix(&hex, 16).ok().filter(|_| hex.len() == 4)?;
                    out.push(char::from_u32(v)?);
                }
                _ => return None,
            },
            c => out.push(c),
        }
    }
    Some(out)
}

/// The text a Prometheus label value stands for; `None` if it has a raw
/// quote or newline, or a bad escape.
fn read_label(s: &str) -> Option<String> {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' | '\n' => return None,
            '\\' => match chars.next()? {
                '"' => out.push('"'),
                '\\' => out.push('\\'),
                'n' => out.push('\n'),
                _ => return None,
            },
            c => out.push(c),
        }
    }
    Some(out)
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut json = String::new();
    escape_json(&text, &mut json);
    assert_eq!(read_json(&json).as_deref(), Some(&*text), "JSON {json:?}");
    let mut label = String::new();
    escape_label(&text, &mut label);
    assert_eq!(read_label(&label).as_deref(), Some(&*text), "label {label:?}");
});
