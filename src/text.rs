//! Showing text that someone else chose.
//!
//! Display names, device IDs, user IDs, room IDs, server error messages and URLs come from
//! the homeserver or from other users. Printed raw, a control character or a bidi override
//! in one of them can move the cursor, erase a line, recolour the terminal or reorder what
//! the user reads, so a chain-broken device can be made to look "verified" or a fake
//! fingerprint line can be printed under a real one. So every such string is escaped before
//! it is shown:
//!
//! * [`escape`] for one untrusted value inside a line of ours: every C0 and C1 control
//!   character (newlines too), DEL, the bidi embeddings, overrides, isolates and marks, the
//!   zero-width and other invisible format characters, the line and paragraph separators,
//!   and the backslash itself are written as `\n`, `\x1b`, `\u{202e}`, `\\`…, so the
//!   escaped form is unambiguous and stays on one line;
//! * [`terminal_safe`] for a whole message about to be written to a terminal: the same,
//!   except that the message's own line breaks and tabs are kept — a last line of defence
//!   for a value that missed [`escape`];
//! * [`json_string`] for `--json` output: the same characters as `\uXXXX` escapes inside
//!   JSON strings, so a script reading the JSON gets the exact value back while the bytes
//!   printed stay harmless in a terminal.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Whether `c` must not reach a terminal raw.
pub fn is_dangerous(c: char) -> bool {
    matches!(c,
        '\u{0}'..='\u{1f}' | '\u{7f}'..='\u{9f}'
        // bidi: ALM, LRM, RLM, embeddings/overrides, isolates
        | '\u{61c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        // invisible: zero-width space/joiners, word joiner and invisible operators, BOM,
        // soft hyphen, Hangul fillers, line and paragraph separators, interlinear annotation
        | '\u{ad}' | '\u{200b}'..='\u{200d}' | '\u{2028}' | '\u{2029}' | '\u{2060}'..='\u{2064}'
        | '\u{feff}' | '\u{fff9}'..='\u{fffb}' | '\u{115f}' | '\u{1160}' | '\u{3164}' | '\u{ffa0}'
        // tag characters (invisible, can spell hidden text)
        | '\u{e0000}'..='\u{e007f}')
}

fn push_escaped(out: &mut String, c: char) {
    match c {
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        '\\' => out.push_str("\\\\"),
        c if (c as u32) < 0x100 => {
            let _ = write!(out, "\\x{:02x}", c as u32);
        }
        c => {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
    }
}

/// One untrusted value, made safe to show inside a line: see the module documentation.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| c == '\\' || is_dangerous(c)) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c == '\\' || is_dangerous(c) {
            push_escaped(&mut out, c);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Untrusted values, each [`escape`]d, joined by `separator`.
pub fn escape_joined<S: AsRef<str>>(items: &[S], separator: &str) -> String {
    items
        .iter()
        .map(|s| escape(s.as_ref()))
        .collect::<Vec<_>>()
        .join(separator)
}

/// A whole message for a terminal: every dangerous character escaped except the message's
/// own line breaks and tabs.
pub fn terminal_safe(s: &str) -> Cow<'_, str> {
    let bad = |c: char| is_dangerous(c) && c != '\n' && c != '\t';
    if !s.chars().any(bad) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if bad(c) {
            push_escaped(&mut out, c);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// A `serde_json` formatter that writes every dangerous character of a string as a
/// `\uXXXX` escape (surrogate pairs above the BMP), which JSON decoders turn back into the
/// same character.
struct SafeFormatter<F> {
    inner: F,
}

impl<F: serde_json::ser::Formatter> serde_json::ser::Formatter for SafeFormatter<F> {
    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        let mut start = 0;
        for (i, c) in fragment.char_indices() {
            if is_dangerous(c) {
                writer.write_all(&fragment.as_bytes()[start..i])?;
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    write!(writer, "\\u{:04x}", u)?;
                }
                start = i + c.len_utf8();
            }
        }
        writer.write_all(&fragment.as_bytes()[start..])
    }

    // Everything else as the wrapped formatter does it.
    fn begin_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.inner.begin_array(w)
    }
    fn end_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.inner.end_array(w)
    }
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.inner.begin_array_value(w, first)
    }
    fn end_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.inner.end_array_value(w)
    }
    fn begin_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.inner.begin_object(w)
    }
    fn end_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.inner.end_object(w)
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.inner.begin_object_key(w, first)
    }
    fn end_object_key<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.inner.end_object_key(w)
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.inner.begin_object_value(w)
    }
    fn end_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.inner.end_object_value(w)
    }
}

/// `value` as JSON text (pretty or compact) with every dangerous character escaped.
pub fn json_string(value: &serde_json::Value, pretty: bool) -> String {
    use serde::Serialize;
    let mut out = Vec::new();
    let result = if pretty {
        let mut ser = serde_json::Serializer::with_formatter(
            &mut out,
            SafeFormatter {
                inner: serde_json::ser::PrettyFormatter::new(),
            },
        );
        value.serialize(&mut ser)
    } else {
        let mut ser = serde_json::Serializer::with_formatter(
            &mut out,
            SafeFormatter {
                inner: serde_json::ser::CompactFormatter,
            },
        );
        value.serialize(&mut ser)
    };
    // Serialising a `Value` into memory cannot fail, and the output is UTF-8: the escapes
    // are ASCII and the rest is copied from `str` fragments.
    match result {
        Ok(()) => String::from_utf8(out).unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// `bytes` random bytes from the operating system, as lower-case hex: transaction IDs and
/// temporary file names.
pub(crate) fn random_hex(bytes: usize) -> Result<String, getrandom::Error> {
    let mut b = vec![0u8; bytes];
    getrandom::fill(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// `2026-11-28 03:27:36 UTC` from milliseconds since the epoch.
pub fn timestamp(ms: Option<u64>) -> String {
    let Some(ms) = ms else { return "-".into() };
    let (date, h, min, sec) = civil(ms);
    format!("{date} {h:02}:{min:02}:{sec:02} UTC")
}

/// `2026-11-28T03:27:36.123Z` (RFC 3339, UTC) from milliseconds since the epoch.
pub fn rfc3339(ms: u64) -> String {
    let (date, h, min, sec) = civil(ms);
    format!("{date}T{h:02}:{min:02}:{sec:02}.{:03}Z", ms % 1000)
}

/// The date (`YYYY-MM-DD`), hour, minute and second of `ms`.
fn civil(ms: u64) -> (String, u64, u64, u64) {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    (
        format!("{y:04}-{m:02}-{d:02}"),
        rem / 3600,
        (rem / 60) % 60,
        rem % 60,
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `30s`, `15m`, `24h`, `7d`.
pub fn parse_duration(text: &str) -> Option<std::time::Duration> {
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = number.parse().ok()?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return None,
    };
    n.checked_mul(seconds).map(std::time::Duration::from_secs)
}

/// A day written `YYYY-MM-DD`, as milliseconds since the epoch at its start (UTC).
pub fn parse_date(text: &str) -> Option<u64> {
    let mut parts = text.split('-');
    let (y, m, d) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || y.len() != 4 || m.len() != 2 || d.len() != 2 {
        return None;
    }
    let (y, m, d): (i64, i64, i64) = (y.parse().ok()?, m.parse().ok()?, d.parse().ok()?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || y < 1970 {
        return None;
    }
    // Days from civil (H. Hinnant's algorithm), the inverse of `civil_from_days`.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let ms = days.checked_mul(86_400_000)?;
    let back = timestamp(Some(ms as u64));
    // 2026-02-31 is not a day.
    back.starts_with(text).then_some(ms as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn durations_and_dates() {
        assert_eq!(
            parse_duration("7d"),
            Some(std::time::Duration::from_secs(604_800))
        );
        assert_eq!(parse_duration("d"), None);
        assert_eq!(parse_duration("5w"), None);
        assert_eq!(parse_duration("99999999999999999999d"), None);
        let day = parse_date("2026-12-01").unwrap();
        assert_eq!(timestamp(Some(day)), "2026-12-01 00:00:00 UTC");
        assert_eq!(rfc3339(day + 1_234), "2026-12-01T00:00:01.234Z");
        assert_eq!(
            parse_date("2024-02-29")
                .map(|d| timestamp(Some(d)))
                .unwrap(),
            "2024-02-29 00:00:00 UTC"
        );
        for bad in [
            "2026-02-30",
            "2026-13-01",
            "26-12-01",
            "2026-12-01x",
            "yesterday",
        ] {
            assert_eq!(parse_date(bad), None, "{bad}");
        }
    }

    #[test]
    fn escape_makes_one_harmless_line() {
        assert_eq!(escape("Alice's phone"), "Alice's phone");
        assert!(matches!(escape("plain"), Cow::Borrowed(_)));
        assert_eq!(escape("a\x1b[2Kb"), "a\\x1b[2Kb");
        assert_eq!(escape("x\ny\r"), "x\\ny\\r");
        assert_eq!(escape("\u{202e}olleh"), "\\u{202e}olleh");
        assert_eq!(escape("zero\u{200b}width"), "zero\\u{200b}width");
        assert_eq!(escape("c1\u{9b}31m"), "c1\\x9b31m");
        assert_eq!(escape("del\u{7f}"), "del\\x7f");
        assert_eq!(escape("back\\slash"), "back\\\\slash");
        assert_eq!(escape("tag\u{e0041}"), "tag\\u{e0041}");
        assert_eq!(escape("日本語 émoji 🎉"), "日本語 émoji 🎉");
    }

    #[test]
    fn terminal_safe_keeps_our_line_breaks() {
        assert_eq!(terminal_safe("one\ntwo\tthree"), "one\ntwo\tthree");
        assert_eq!(
            terminal_safe("a\x1b]0;title\x07\rb"),
            "a\\x1b]0;title\\x07\\rb"
        );
        assert_eq!(terminal_safe("\u{2066}x\u{2069}"), "\\u{2066}x\\u{2069}");
    }

    #[test]
    fn json_escapes_and_round_trips() {
        let name = "ph\u{1b}[1A\u{202e}one\u{7f}\u{85}\u{1f600}\u{e0041}";
        let v = json!({"display_name": name, "plain": "ok/é"});
        for pretty in [false, true] {
            let text = json_string(&v, pretty);
            // Pretty output has line breaks of its own; nothing else dangerous is left.
            assert!(
                !text.chars().any(|c| is_dangerous(c) && c != '\n'),
                "{text:?}"
            );
            assert!(
                text.contains("\\u001b") && text.contains("\\u202e"),
                "{text}"
            );
            assert!(
                text.contains("\\udb40\\udc41"),
                "tag characters as surrogates: {text}"
            );
            let back: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(back, v, "the value survives exactly");
        }
        assert_eq!(
            json_string(&json!({"a": [1, "b"]}), false),
            r#"{"a":[1,"b"]}"#
        );
    }
}
