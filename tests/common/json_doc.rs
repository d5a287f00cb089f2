//! The `--json` interface as docs/json.md documents it, read from the document itself, and
//! a check of a real document against it.
//!
//! The doc writes a document's shape as a code span after its command's:
//! `` `login`: `{"user_id", "device_id"}` `` (several commands: `` `a`, `b`: `` or
//! `` `a` / `b`: ``), or as a fenced JSON block after `` `command`: `` or after an HTML
//! comment `<!-- json: NAME -->`. A shape lists an object's fields, each bare (any value) or
//! with a value: an object or array shape, or an example (a string, number, `true`,
//! `false`, `null`, a bare word). `…` (or `...`) in an object means more fields may follow,
//! and as an array's content that its elements are not described.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde_json::Value;

#[derive(Clone, Debug, PartialEq)]
pub enum Shape {
    /// Any value.
    Any,
    /// An object with these fields (`open`: and perhaps others).
    Object {
        fields: Vec<(String, Shape)>,
        open: bool,
    },
    /// An array whose elements have this shape.
    Array(Box<Shape>),
}

/// The shape docs/json.md gives for `command` (as the doc names it, without `mxhsm ` and
/// `--json`, for example `identity status`, `sign device(s)`, `graph --out FILE`).
pub fn documented(command: &str) -> &'static Shape {
    let all = all();
    all.get(command).unwrap_or_else(|| {
        panic!(
            "docs/json.md documents no shape for {command:?}; it has: {:?}",
            all.keys().collect::<Vec<_>>()
        )
    })
}

/// The shape of the elements of the array `field` in the documented shape of `command`.
pub fn element_of(command: &str, field: &str) -> &'static Shape {
    match documented(command) {
        Shape::Object { fields, .. } => match fields.iter().find(|(n, _)| n == field) {
            Some((_, Shape::Array(inner))) => inner,
            _ => panic!("docs/json.md: {command} has no array {field:?}"),
        },
        _ => panic!("docs/json.md: {command} is not an object"),
    }
}

/// Checks a part of a document (which has no `"version"` of its own) against `shape`.
pub fn check_shape(what: &str, shape: &Shape, part: &Value) {
    if let Err(e) = matches(shape, part, "") {
        panic!("{what} does not match docs/json.md: {e}\n{part}");
    }
}

/// Checks `doc` against the documented shape of `command`, and that it carries
/// `"version": 1` (as every document does). Panics naming the first difference.
pub fn check(command: &str, doc: &Value) {
    assert_eq!(doc["version"], 1, "{command}: no \"version\": 1 in {doc}");
    let mut doc = doc.clone();
    doc.as_object_mut().unwrap().remove("version");
    let shape = without_version(documented(command));
    if let Err(e) = matches(&shape, &doc, "") {
        panic!("{command} --json does not match docs/json.md: {e}\ndocument: {doc}");
    }
}

/// `keys generate`, `import`, `adopt`: one key of `keys list`, with `version`.
pub fn check_key(command: &str, doc: &Value) {
    assert_eq!(doc["version"], 1, "{command}: {doc}");
    let mut key = doc.clone();
    key.as_object_mut().unwrap().remove("version");
    check_shape(command, element_of("keys list", "keys"), &key);
}

/// One line of `verify --json` or `watch --json`: its `event` names the shape
/// (`verify NAME`, else `watch NAME`); `version`, `event`, and for watch's classed events
/// `class` and (with several accounts) `account`, are checked and left out of the shape.
pub fn check_event(v: &Value) {
    assert_eq!(v["version"], 1, "no \"version\": 1 in {v}");
    let name = v["event"]
        .as_str()
        .unwrap_or_else(|| panic!("an event without \"event\": {v}"));
    let mut rest = v.clone();
    let o = rest.as_object_mut().unwrap();
    for f in ["version", "event", "account"] {
        o.remove(f);
    }
    let command = if all().contains_key(&format!("verify {name}")) {
        format!("verify {name}")
    } else {
        let command = format!("watch {name}");
        if name != "verification_request" {
            assert!(
                o.remove("class").is_some_and(|c| c.is_string()),
                "no class: {v}"
            );
        }
        command
    };
    check_shape(&command, documented(&command), &rest);
}

/// `--account all` (or a list) with `command`: the bulk document, and each account's
/// `result` as `command`'s document (an account that failed has `error` instead).
pub fn check_all_accounts(command: &str, doc: &Value) {
    assert_eq!(doc["version"], 1, "{command}: {doc}");
    let accounts = doc["accounts"]
        .as_array()
        .unwrap_or_else(|| panic!("{doc}"));
    assert!(!accounts.is_empty(), "{doc}");
    let each = element_of("--account all", "accounts");
    let error = element_of_object("error", "error");
    for a in accounts {
        let mut a = a.clone();
        if a["ok"] == true {
            let result = a["result"].take();
            check_shape(command, &without_version(documented(command)), &result);
        } else {
            let e = a.as_object_mut().unwrap().remove("error");
            check_shape("error", error, e.as_ref().unwrap_or(&Value::Null));
            a["result"] = Value::Null;
        }
        check_shape("--account all", each, &a);
    }
    let mut outer = doc.clone();
    outer["accounts"] = Value::Array(Vec::new());
    outer.as_object_mut().unwrap().remove("version");
    check_shape(
        "--account all",
        &without_version(documented("--account all")),
        &outer,
    );
}

fn element_of_object(command: &str, field: &str) -> &'static Shape {
    match documented(command) {
        Shape::Object { fields, .. } => &fields.iter().find(|(n, _)| n == field).unwrap().1,
        _ => panic!("docs/json.md: {command} is not an object"),
    }
}

/// Checks `value` against `shape`: `Err` names the path of the first difference.
pub fn matches(shape: &Shape, value: &Value, path: &str) -> Result<(), String> {
    match shape {
        Shape::Any => Ok(()),
        // A documented object or array may be null where it is absent (the doc says when).
        _ if value.is_null() => Ok(()),
        Shape::Array(inner) => {
            let items = value
                .as_array()
                .ok_or_else(|| format!("{path}: an array is documented, got {value}"))?;
            for (i, item) in items.iter().enumerate() {
                matches(inner, item, &format!("{path}[{i}]"))?;
            }
            Ok(())
        }
        Shape::Object { fields, open } => {
            let obj = value
                .as_object()
                .ok_or_else(|| format!("{path}: an object is documented, got {value}"))?;
            for (name, inner) in fields {
                let v = obj
                    .get(name)
                    .ok_or_else(|| format!("{path}.{name}: documented, but missing"))?;
                matches(inner, v, &format!("{path}.{name}"))?;
            }
            if let Some(extra) = obj
                .keys()
                .find(|k| !open && !fields.iter().any(|(n, _)| n == *k))
            {
                return Err(format!("{path}.{extra}: present, but not documented"));
            }
            Ok(())
        }
    }
}

fn without_version(shape: &Shape) -> Shape {
    match shape {
        Shape::Object { fields, open } => Shape::Object {
            fields: fields
                .iter()
                .filter(|(n, _)| n != "version")
                .cloned()
                .collect(),
            open: *open,
        },
        other => other.clone(),
    }
}

/// Every documented shape, by command.
pub fn all() -> &'static BTreeMap<String, Shape> {
    static ALL: OnceLock<BTreeMap<String, Shape>> = OnceLock::new();
    ALL.get_or_init(|| {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/json.md");
        parse_doc(&std::fs::read_to_string(path).unwrap())
    })
}

/// A piece of the doc: a code span, a fenced block, an HTML comment, or other text.
#[derive(Debug)]
enum Piece<'a> {
    Code(&'a str),
    Fence(&'a str),
    Comment(&'a str),
    Text(&'a str),
}

fn pieces(doc: &str) -> Vec<Piece<'_>> {
    let mut out = Vec::new();
    let mut rest = doc;
    while !rest.is_empty() {
        let next = [rest.find("```"), rest.find('`'), rest.find("<!--")]
            .into_iter()
            .flatten()
            .min();
        let Some(at) = next else {
            out.push(Piece::Text(rest));
            break;
        };
        if at > 0 {
            out.push(Piece::Text(&rest[..at]));
        }
        rest = &rest[at..];
        if let Some(body) = rest.strip_prefix("```") {
            let body = &body[body.find('\n').unwrap() + 1..];
            let end = body.find("```").expect("an unclosed fence in docs/json.md");
            out.push(Piece::Fence(&body[..end]));
            rest = &body[end + 3..];
        } else if let Some(body) = rest.strip_prefix("<!--") {
            let end = body
                .find("-->")
                .expect("an unclosed comment in docs/json.md");
            out.push(Piece::Comment(body[..end].trim()));
            rest = &body[end + 3..];
        } else {
            let body = &rest[1..];
            let end = body
                .find('`')
                .expect("an unclosed code span in docs/json.md");
            out.push(Piece::Code(&body[..end]));
            rest = &body[end + 1..];
        }
    }
    out
}

fn command_name(span: &str) -> String {
    let s = span.strip_prefix("mxhsm ").unwrap_or(span);
    s.split_whitespace()
        .filter(|w| *w != "--json")
        .collect::<Vec<_>>()
        .join(" ")
}

fn parse_doc(doc: &str) -> BTreeMap<String, Shape> {
    let pieces = pieces(doc);
    let mut shapes = BTreeMap::new();
    let mut add = |names: Vec<String>, body: &str| {
        let shape = parse_shape(body).unwrap_or_else(|e| panic!("docs/json.md, {names:?}: {e}"));
        for name in names {
            assert!(
                shapes.insert(name.clone(), shape.clone()).is_none(),
                "docs/json.md documents {name:?} twice"
            );
        }
    };
    for (i, piece) in pieces.iter().enumerate() {
        let body = match piece {
            Piece::Code(s) if s.starts_with('{') || s.starts_with('[') => *s,
            Piece::Fence(s) => *s,
            _ => continue,
        };
        // <!-- json: NAME --> just before it (blank space between is fine).
        let mut j = i;
        while let Some(Piece::Text(t)) = j.checked_sub(1).map(|k| &pieces[k]) {
            if !t.trim().is_empty() {
                break;
            }
            j -= 1;
        }
        if let Some(Piece::Comment(c)) = j.checked_sub(1).map(|k| &pieces[k])
            && let Some(name) = c.strip_prefix("json:")
        {
            add(vec![name.trim().to_string()], body);
            continue;
        }
        if !body.starts_with('{') {
            continue;
        }
        // `name`: SHAPE, with `a`, `b` or `a` / `b` before it.
        let colon = |j: usize| match &pieces[j] {
            Piece::Text(t) => t.trim() == ":",
            _ => false,
        };
        if i < 2 || !colon(i - 1) {
            continue;
        }
        let mut names = Vec::new();
        let mut j = i - 2;
        while let Piece::Code(name) = pieces[j] {
            names.push(command_name(name));
            match j.checked_sub(1).map(|k| &pieces[k]) {
                Some(Piece::Text(sep)) if j >= 2 && [",", "/"].contains(&sep.trim()) => j -= 2,
                _ => break,
            }
        }
        if !names.is_empty() {
            add(names, body);
        }
    }
    shapes
}

/// Parses one shape (see the module's comment).
pub fn parse_shape(text: &str) -> Result<Shape, String> {
    let mut p = Parser {
        s: text.as_bytes(),
        at: 0,
    };
    let shape = p.value()?;
    p.space();
    if p.at != p.s.len() {
        return Err(format!("text after the shape at byte {}", p.at));
    }
    Ok(shape)
}

struct Parser<'a> {
    s: &'a [u8],
    at: usize,
}

impl Parser<'_> {
    fn space(&mut self) {
        while self.at < self.s.len() && self.s[self.at].is_ascii_whitespace() {
            self.at += 1;
        }
    }

    fn eat(&mut self, token: &str) -> bool {
        self.space();
        if self.s[self.at..].starts_with(token.as_bytes()) {
            self.at += token.len();
            true
        } else {
            false
        }
    }

    fn peek(&mut self, token: &str) -> bool {
        self.space();
        self.s[self.at..].starts_with(token.as_bytes())
    }

    fn ellipsis(&mut self) -> bool {
        self.eat("…") || self.eat("...")
    }

    fn value(&mut self) -> Result<Shape, String> {
        if self.eat("{") {
            return self.object();
        }
        if self.eat("[") {
            let inner = if self.ellipsis() || self.peek("]") {
                Shape::Any
            } else {
                self.value()?
            };
            // `[{…}, …]`
            if self.eat(",") && !self.ellipsis() {
                return Err(format!("an array of two shapes at byte {}", self.at));
            }
            if !self.eat("]") {
                return Err(format!("no ] at byte {}", self.at));
            }
            return Ok(Shape::Array(Box::new(inner)));
        }
        if self.ellipsis() {
            return Ok(Shape::Any);
        }
        self.space();
        if self.eat("\"") {
            self.string_rest()?;
            return Ok(Shape::Any);
        }
        // A number, true, false, null, or a bare word.
        let start = self.at;
        while self.at < self.s.len()
            && (self.s[self.at].is_ascii_alphanumeric() || b"_-.".contains(&self.s[self.at]))
        {
            self.at += 1;
        }
        if self.at == start {
            return Err(format!("no value at byte {start}"));
        }
        Ok(Shape::Any)
    }

    fn string_rest(&mut self) -> Result<String, String> {
        let start = self.at;
        while self.at < self.s.len() && self.s[self.at] != b'"' {
            self.at += 1;
        }
        if self.at == self.s.len() {
            return Err(format!("an unclosed string at byte {start}"));
        }
        self.at += 1;
        Ok(String::from_utf8(self.s[start..self.at - 1].to_vec()).unwrap())
    }

    fn object(&mut self) -> Result<Shape, String> {
        let mut fields = Vec::new();
        let mut open = false;
        loop {
            if self.eat("}") {
                return Ok(Shape::Object { fields, open });
            }
            if self.ellipsis() {
                open = true;
            } else if self.eat("\"") {
                let name = self.string_rest()?;
                let shape = if self.eat(":") {
                    self.value()?
                } else {
                    Shape::Any
                };
                fields.push((name, shape));
            } else {
                return Err(format!("no field name at byte {}", self.at));
            }
            if !self.eat(",") && !self.peek("}") {
                return Err(format!("no , or }} at byte {}", self.at));
            }
        }
    }
}
