//! RFC 7512 PKCS#11 URIs: which module to load and which token to use.
//!
//! `pkcs11:token=alice;serial=1234?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/run/pin`
//!
//! Path attributes filter tokens (all given must match). Query attributes say how to get
//! there: `module-path`, `module-name`, `pin-source`. `pin-value` is refused: a URI is
//! usually typed on a command line, and a PIN must never be.
//!
//! Written here rather than taken from a crate: the crates.io parsers are either tied to
//! the old `pkcs11` crate or pull in `regex` for a grammar this small.

use std::path::PathBuf;

use super::super::TokenError;

/// A parsed PKCS#11 URI. Fields are percent-decoded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pkcs11Uri {
    /// The URI as given (without any secret; `pin-value` is rejected).
    pub original: String,
    pub token: Option<String>,
    pub manufacturer: Option<String>,
    pub serial: Option<String>,
    pub model: Option<String>,
    pub slot_id: Option<u64>,
    pub slot_description: Option<String>,
    pub slot_manufacturer: Option<String>,
    pub library_manufacturer: Option<String>,
    pub library_description: Option<String>,
    pub module_path: Option<PathBuf>,
    pub module_name: Option<String>,
    pub pin_source: Option<PathBuf>,
}

const SCHEME: &str = "pkcs11:";

impl Pkcs11Uri {
    pub fn parse(uri: &str) -> Result<Self, TokenError> {
        let shown = redact_pin_value(uri);
        let invalid = |reason: String| TokenError::InvalidUri {
            uri: shown.clone(),
            reason,
        };
        let rest = uri
            .strip_prefix(SCHEME)
            .ok_or_else(|| invalid(format!("it must start with {SCHEME:?}")))?;
        let (path, query) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rest, None),
        };
        let mut out = Pkcs11Uri {
            original: shown.clone(),
            ..Default::default()
        };
        for attr in path.split(';').filter(|a| !a.is_empty()) {
            let (name, value) = attr
                .split_once('=')
                .ok_or_else(|| invalid(format!("path attribute {attr:?} has no '='")))?;
            let value = percent_decode(value).map_err(&invalid)?;
            let slot = match name {
                "token" => &mut out.token,
                "manufacturer" => &mut out.manufacturer,
                "serial" => &mut out.serial,
                "model" => &mut out.model,
                "slot-description" => &mut out.slot_description,
                "slot-manufacturer" => &mut out.slot_manufacturer,
                "library-manufacturer" => &mut out.library_manufacturer,
                "library-description" => &mut out.library_description,
                "slot-id" => {
                    let id = value.parse::<u64>().map_err(|_| {
                        invalid(format!("slot-id {value:?} is not a decimal number"))
                    })?;
                    set_once(&mut out.slot_id, id, name).map_err(&invalid)?;
                    continue;
                }
                // Object attributes select keys, which mxhsm does by user and role.
                "object" | "id" | "type" | "library-version" => {
                    return Err(invalid(format!(
                        "attribute {name:?} is not supported here: mxhsm finds keys by their user and role, not by object"
                    )));
                }
                other => {
                    return Err(invalid(format!("unknown path attribute {other:?}")));
                }
            };
            set_once(slot, value, name).map_err(&invalid)?;
        }
        for attr in query.unwrap_or("").split('&').filter(|a| !a.is_empty()) {
            let (name, value) = attr
                .split_once('=')
                .ok_or_else(|| invalid(format!("query attribute {attr:?} has no '='")))?;
            let value = percent_decode(value).map_err(&invalid)?;
            match name {
                "module-path" => {
                    set_once(&mut out.module_path, PathBuf::from(value), name).map_err(&invalid)?
                }
                "module-name" => set_once(&mut out.module_name, value, name).map_err(&invalid)?,
                "pin-source" => {
                    // RFC 7512 §2.3: a URI (we take file: URIs) or a plain path.
                    let path = value
                        .strip_prefix("file://")
                        .or_else(|| value.strip_prefix("file:"));
                    let path = PathBuf::from(path.unwrap_or(&value));
                    set_once(&mut out.pin_source, path, name).map_err(&invalid)?
                }
                "pin-value" => {
                    return Err(invalid(
                        "pin-value is refused: a PIN on the command line is visible to every user of this machine; use pin-source=FILE, MXHSM_PIN or the prompt".into(),
                    ));
                }
                other => return Err(invalid(format!("unknown query attribute {other:?}"))),
            }
        }
        if out.module_path.is_some() && out.module_name.is_some() {
            return Err(invalid("give module-path or module-name, not both".into()));
        }
        Ok(out)
    }

    /// Whether a token with these properties is selected by this URI.
    pub fn matches(&self, t: &TokenProperties<'_>) -> bool {
        fn ok(want: &Option<String>, have: &str) -> bool {
            want.as_deref().is_none_or(|w| w == have.trim_end())
        }
        ok(&self.token, t.label)
            && ok(&self.manufacturer, t.manufacturer)
            && ok(&self.serial, t.serial)
            && ok(&self.model, t.model)
            && ok(&self.slot_description, t.slot_description)
            && ok(&self.slot_manufacturer, t.slot_manufacturer)
            && ok(&self.library_manufacturer, t.library_manufacturer)
            && ok(&self.library_description, t.library_description)
            && self.slot_id.is_none_or(|id| id == t.slot_id)
    }

    /// A URI selecting exactly one token, for output (`token list`) and configuration.
    pub fn for_token(label: &str, serial: &str, module_path: &str) -> String {
        format!(
            "pkcs11:token={};serial={}?module-path={}",
            percent_encode(label),
            percent_encode(serial),
            percent_encode(module_path)
        )
    }
}

/// What a token URI is matched against.
#[derive(Debug, Clone, Copy)]
pub struct TokenProperties<'a> {
    pub label: &'a str,
    pub manufacturer: &'a str,
    pub serial: &'a str,
    pub model: &'a str,
    pub slot_id: u64,
    pub slot_description: &'a str,
    pub slot_manufacturer: &'a str,
    pub library_manufacturer: &'a str,
    pub library_description: &'a str,
}

/// The URI with any `pin-value` replaced, so that error messages never echo a PIN.
fn redact_pin_value(uri: &str) -> String {
    match uri.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|a| {
                    if a.starts_with("pin-value=") {
                        "pin-value=[redacted]".to_string()
                    } else {
                        a.to_string()
                    }
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => uri.to_string(),
    }
}

fn set_once<T>(slot: &mut Option<T>, value: T, name: &str) -> Result<(), String> {
    if slot.is_some() {
        return Err(format!("attribute {name:?} appears twice"));
    }
    *slot = Some(value);
    Ok(())
}

/// RFC 7512 percent-decoding, refusing a `%` that is not followed by two hex digits (the
/// crate would pass it through as is).
fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let malformed = b.iter().enumerate().any(|(i, &c)| {
        c == b'%'
            && !b
                .get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
    });
    if malformed {
        return Err(format!("bad percent-encoding in {s:?}"));
    }
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| format!("{s:?} does not decode to UTF-8"))
}

/// What a URI value may hold unencoded: RFC 3986's unreserved characters and the ones RFC
/// 7512 allows in a path attribute value (`/:@!$'()*+,`).
const VALUE_SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/')
    .remove(b':')
    .remove(b'@')
    .remove(b'!')
    .remove(b'$')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')')
    .remove(b'*')
    .remove(b'+')
    .remove(b',');

fn percent_encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, VALUE_SET).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props<'a>(label: &'a str, serial: &'a str) -> TokenProperties<'a> {
        TokenProperties {
            label,
            manufacturer: "SoftHSM project",
            serial,
            model: "SoftHSM v2",
            slot_id: 7,
            slot_description: "",
            slot_manufacturer: "",
            library_manufacturer: "",
            library_description: "",
        }
    }

    #[test]
    fn parses_path_and_query() {
        let u = Pkcs11Uri::parse(
            "pkcs11:token=My%20Token;serial=abc;slot-id=7?module-path=/usr/lib/x.so&pin-source=file:/run/pin",
        )
        .unwrap();
        assert_eq!(u.token.as_deref(), Some("My Token"));
        assert_eq!(u.serial.as_deref(), Some("abc"));
        assert_eq!(u.slot_id, Some(7));
        assert_eq!(u.module_path, Some(PathBuf::from("/usr/lib/x.so")));
        assert_eq!(u.pin_source, Some(PathBuf::from("/run/pin")));
        assert!(u.matches(&props("My Token", "abc")));
        assert!(!u.matches(&props("My Token", "abd")));
        assert!(!u.matches(&props("Other", "abc")));
    }

    #[test]
    fn empty_uri_matches_everything() {
        let u = Pkcs11Uri::parse("pkcs11:").unwrap();
        assert!(u.matches(&props("x", "y")));
    }

    #[test]
    fn refuses_pin_value_unknown_and_duplicate_attributes() {
        for (uri, needle) in [
            ("pkcs11:token=a?pin-value=1234", "pin-value is refused"),
            ("pkcs11:tokn=a", "unknown path attribute \"tokn\""),
            ("pkcs11:token=a;token=b", "appears twice"),
            ("pkcs11:token=a%2", "bad percent-encoding"),
            ("pkcs11:slot-id=x", "not a decimal number"),
            ("pkcs:token=a", "must start with"),
            ("pkcs11:object=foo", "not supported here"),
            ("pkcs11:?module-path=/a&module-name=b", "not both"),
        ] {
            let err = Pkcs11Uri::parse(uri).unwrap_err().to_string();
            assert!(err.contains(needle), "{uri}: {err}");
            assert!(!err.contains("1234"), "a PIN must not be echoed: {err}");
        }
    }

    #[test]
    fn for_token_round_trips() {
        let s = Pkcs11Uri::for_token("a b;cé%", "12", "/usr/lib/softhsm/libsofthsm2.so");
        assert_eq!(
            s,
            "pkcs11:token=a%20b%3Bc%C3%A9%25;serial=12?module-path=/usr/lib/softhsm/libsofthsm2.so"
        );
        let u = Pkcs11Uri::parse(&s).unwrap();
        assert_eq!(u.token.as_deref(), Some("a b;cé%"));
        assert_eq!(u.serial.as_deref(), Some("12"));
        assert_eq!(
            u.module_path,
            Some(PathBuf::from("/usr/lib/softhsm/libsofthsm2.so"))
        );
    }
}
