//! Human tables and JSON for command output. Everything printed goes through here or the
//! `say!`/`note!` macros, which make text safe for a terminal: server- and peer-chosen
//! strings are escaped by the caller with [`esc`], and whatever is left (a value that
//! slipped through) is escaped again here, keeping only our own line breaks.

use mxhsm::text;

pub use mxhsm::text::escape as esc;

/// A line on standard output, made terminal-safe.
macro_rules! say {
    ($($arg:tt)*) => {
        println!("{}", mxhsm::text::terminal_safe(&format!($($arg)*)))
    };
}

/// A line on standard error, made terminal-safe.
macro_rules! note {
    ($($arg:tt)*) => {
        eprintln!("{}", mxhsm::text::terminal_safe(&format!($($arg)*)))
    };
}

pub(crate) use {note, say};

/// Prints rows as a left-aligned table with a header; every cell is escaped.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| esc(c).into_owned()).collect())
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    // On a terminal, the last column wraps so that no line is wider than the terminal.
    let lead: usize = widths[..widths.len().saturating_sub(1)]
        .iter()
        .map(|w| w + 2)
        .sum();
    let width = terminal_width().filter(|w| w.saturating_sub(lead) >= 20);
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                match width {
                    Some(w) => {
                        let pad = " ".repeat(lead);
                        let mut lines = wrap(&out, &pad, c, w).into_iter();
                        out = lines.next().unwrap_or_default();
                        for l in lines {
                            out.push('\n');
                            out.push_str(&l);
                        }
                    }
                    None => out.push_str(c),
                }
            } else {
                out.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        for l in out.split('\n') {
            say_verdict(l.trim_end());
        }
    };
    line(header.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// The terminal's width, when standard output is one.
fn terminal_width() -> Option<usize> {
    use std::io::IsTerminal;
    let out = std::io::stdout();
    if !out.is_terminal() {
        return None;
    }
    rustix::termios::tcgetwinsize(&out)
        .ok()
        .map(|w| usize::from(w.ws_col))
        .filter(|w| *w > 0)
}

/// `text` after `first`, wrapped at word boundaries to `width` columns; continuation
/// lines start with `rest`. A word longer than a line is cut.
pub fn wrap(first: &str, rest: &str, text: &str, width: usize) -> Vec<String> {
    let cols = |s: &str| s.chars().count();
    let mut out = Vec::new();
    let mut line = first.to_string();
    let mut fresh = true;
    for word in text.split(' ') {
        if !fresh && cols(&line) + 1 + cols(word) > width {
            out.push(std::mem::replace(&mut line, rest.to_string()));
            fresh = true;
        }
        if !fresh {
            line.push(' ');
        }
        let mut chars: Vec<char> = word.chars().collect();
        while cols(&line) + chars.len() > width {
            let room = width.saturating_sub(cols(&line)).max(1).min(chars.len());
            line.extend(chars.drain(..room));
            out.push(std::mem::replace(&mut line, rest.to_string()));
        }
        line.extend(chars);
        fresh = false;
    }
    out.push(line);
    out
}

/// The version of the `--json` documents (docs/json.md): every document carries it as
/// `"version"`, and it changes only when a field changes meaning or goes away.
pub const JSON_VERSION: u64 = 1;

/// `value` as a document: an object, with `"version"` added.
pub fn document(mut value: serde_json::Value) -> serde_json::Value {
    debug_assert!(value.is_object(), "a --json document is an object: {value}");
    if let Some(o) = value.as_object_mut() {
        o.insert("version".into(), JSON_VERSION.into());
    }
    value
}

/// Prints a JSON document, pretty, with every control or bidi character escaped (the value
/// a JSON reader gets back is unchanged).
pub fn json(value: serde_json::Value) {
    println!("{}", text::json_string(&document(value), true));
}

/// Prints a JSON document on one line (an event of `watch` or `verify`, an error).
pub fn json_line(value: serde_json::Value) {
    println!("{}", text::json_string(&document(value), false));
}

/// Prints `value` under `--json`, else runs `human`.
pub fn emit(json_mode: bool, value: serde_json::Value, human: impl FnOnce()) {
    if json_mode {
        json(value);
    } else {
        human();
    }
}

/// `AAAA BBBB …`: a key in groups of four for reading aloud.
pub fn fingerprint(key: &mxhsm::matrix::keys::Ed25519PublicKey) -> String {
    let b = key.to_base64();
    b.as_bytes()
        .chunks(4)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

pub use mxhsm::text::timestamp;

/// A line on standard output, made terminal-safe, with its verdict in colour: a `✔` and
/// what follows in green, a `✘` and what follows in red (up to two spaces, the end of a
/// table cell, or the end of the line). The colour goes only to a terminal, and never with
/// `NO_COLOR` (`CLICOLOR_FORCE` forces it).
pub fn say_verdict(line: &str) {
    use std::io::Write;
    let safe = text::terminal_safe(line);
    let green = anstyle::AnsiColor::Green.on_default();
    let red = anstyle::AnsiColor::Red.on_default().bold();
    let split = safe
        .find('✔')
        .map(|i| (i, green))
        .or_else(|| safe.find('✘').map(|i| (i, red)));
    let mut out = anstream::stdout().lock();
    let _ = match split {
        Some((i, style)) => {
            let end = safe[i..].find("  ").map_or(safe.len(), |j| i + j);
            writeln!(
                out,
                "{}{style}{}{style:#}{}",
                &safe[..i],
                &safe[i..end],
                &safe[end..]
            )
        }
        None => writeln!(out, "{safe}"),
    };
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamps() {
        assert_eq!(super::timestamp(Some(0)), "1970-01-01 00:00:00 UTC");
        assert_eq!(
            super::timestamp(Some(1_795_836_456_000)),
            "2026-11-28 03:27:36 UTC"
        );
        assert_eq!(super::timestamp(None), "-");
    }
}
