//! Canonical JSON and signed JSON objects (Matrix spec, appendices §"Signing JSON").
//!
//! Canonical JSON is "the shortest UTF-8 JSON encoding with dictionary keys
//! lexicographically sorted by Unicode codepoint", integers only, in ±(2^53 − 1).
//!
//! We produce it with `serde_json` rather than ruma's `CanonicalJsonValue`, and this is why
//! its output is canonical:
//! * `serde_json::Value` objects are `BTreeMap<String, _>` (the `preserve_order` feature is
//!   off — a unit test fails if any dependency turns it on), so keys come out sorted by
//!   byte order, which for UTF-8 is code-point order;
//! * `serde_json::to_string` writes no whitespace, escapes only `"` `\` and control
//!   characters (`\b \t \n \f \r` short, others as lower-case `\u00xx`), and writes `/` and
//!   non-ASCII characters raw — exactly the spec's grammar;
//! * numbers: we refuse floats and integers outside the interoperable range before
//!   serialising, so every number is written as a plain integer.
//!
//! Signing removes `signatures` and `unsigned`, signs the canonical bytes with pure Ed25519
//! and puts the unpadded-base64 signature at `signatures[entity][key_id]`, keeping any
//! signatures already there. Verification is strict (vodozemac, `verify_strict`).

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use serde_json::{Map, Value};

use super::keys::{Ed25519PublicKey, KeyError};

/// Largest integer canonical JSON allows (2^53 − 1).
const MAX_SAFE_INTEGER: i64 = (1 << 53) - 1;

/// Something that makes pure Ed25519 signatures: a key on a token, or a software key.
pub trait Ed25519Signer {
    fn public_key(&self) -> Ed25519PublicKey;
    /// Signs exactly `message`.
    fn sign(&self, message: &[u8]) -> Result<[u8; 64], SignError>;
}

/// A signer failed (the token refused, was unplugged, …). The source is the signer's own
/// error — for a key on a token, a `TokenError`, which a caller can downcast to tell a
/// wrong PIN from a missing card.
///
/// Shared (an `Arc`) so that errors holding it stay `Clone`, as a typed verdict kept in a
/// status report must be.
#[derive(Debug, Clone)]
pub struct SignError {
    cause: std::sync::Arc<dyn std::error::Error + Send + Sync>,
}

impl SignError {
    pub fn new(source: impl std::error::Error + Send + Sync + 'static) -> Self {
        SignError {
            cause: std::sync::Arc::new(source),
        }
    }
}

impl std::fmt::Display for SignError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "signing failed: {}", self.cause)
    }
}

impl std::error::Error for SignError {
    /// The signer's own error itself (not the `Arc`, whose `source` would skip it).
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.cause)
    }
}

impl Ed25519Signer for vodozemac::Ed25519SecretKey {
    fn public_key(&self) -> Ed25519PublicKey {
        self.public_key().into()
    }
    fn sign(&self, message: &[u8]) -> Result<[u8; 64], SignError> {
        Ok(vodozemac::Ed25519SecretKey::sign(self, message).to_bytes())
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum SignedJsonError {
    #[error("canonical JSON does not allow the number {0} (only integers within ±(2^53−1))")]
    Number(String),
    #[error("a signed JSON value must be an object")]
    NotAnObject,
    #[error("not an Ed25519 public key: {0}")]
    InvalidKey(#[from] KeyError),
    #[error("no signature by {entity} with key {key_id}")]
    MissingSignature { entity: String, key_id: String },
    #[error("the signature by {entity} with key {key_id} is not valid base64 of 64 bytes")]
    MalformedSignature { entity: String, key_id: String },
    #[error("the signature by {entity} with key {key_id} does not verify")]
    BadSignature { entity: String, key_id: String },
    #[error(transparent)]
    Signer(#[from] SignError),
}

/// Decodes standard base64 with or without padding (the spec asks decoders to accept both).
pub fn decode_base64(s: &str) -> Result<Vec<u8>, base64::DecodeError> {
    STANDARD_NO_PAD.decode(s.trim_end_matches('='))
}

pub fn encode_base64(bytes: &[u8]) -> String {
    STANDARD_NO_PAD.encode(bytes)
}

fn check_numbers(v: &Value) -> Result<(), SignedJsonError> {
    match v {
        Value::Number(n) => match n.as_i64() {
            Some(i) if (-MAX_SAFE_INTEGER..=MAX_SAFE_INTEGER).contains(&i) => Ok(()),
            _ => Err(SignedJsonError::Number(n.to_string())),
        },
        Value::Array(a) => a.iter().try_for_each(check_numbers),
        Value::Object(o) => o.values().try_for_each(check_numbers),
        _ => Ok(()),
    }
}

/// The canonical JSON encoding of `value`.
pub fn canonical_json(value: &Value) -> Result<String, SignedJsonError> {
    check_numbers(value)?;
    // Serialising a `Value` cannot fail (all keys are strings).
    Ok(serde_json::to_string(value).unwrap_or_default())
}

/// The bytes that are signed: the object without `signatures` and `unsigned`, canonical.
pub fn signable_bytes(object: &Value) -> Result<Vec<u8>, SignedJsonError> {
    let mut map = object
        .as_object()
        .ok_or(SignedJsonError::NotAnObject)?
        .clone();
    map.remove("signatures");
    map.remove("unsigned");
    Ok(canonical_json(&Value::Object(map))?.into_bytes())
}

/// Signs `object` as `entity` (a user ID) with key ID `key_id`, adding the signature to
/// those already present.
pub fn sign_json(
    object: &mut Value,
    entity: &str,
    key_id: &str,
    signer: &dyn Ed25519Signer,
) -> Result<(), SignedJsonError> {
    let bytes = signable_bytes(object)?;
    let sig = signer.sign(&bytes).map_err(SignedJsonError::Signer)?;
    let map = object.as_object_mut().ok_or(SignedJsonError::NotAnObject)?;
    let signatures = map
        .entry("signatures")
        .or_insert_with(|| Value::Object(Map::new()));
    if !signatures.is_object() {
        *signatures = Value::Object(Map::new());
    }
    let by_entity = signatures
        .as_object_mut()
        .and_then(|s| {
            s.entry(entity)
                .or_insert_with(|| Value::Object(Map::new()))
                .as_object_mut()
        })
        .ok_or(SignedJsonError::NotAnObject)?;
    by_entity.insert(key_id.to_string(), Value::String(encode_base64(&sig)));
    Ok(())
}

/// The signature `signatures[entity][key_id]`, if present.
pub fn signature<'a>(object: &'a Value, entity: &str, key_id: &str) -> Option<&'a str> {
    object.get("signatures")?.get(entity)?.get(key_id)?.as_str()
}

/// Checks the signature `signatures[entity][key_id]` of `object` against `key`.
pub fn verify_json(
    object: &Value,
    entity: &str,
    key_id: &str,
    key: &Ed25519PublicKey,
) -> Result<(), SignedJsonError> {
    let missing = || SignedJsonError::MissingSignature {
        entity: entity.to_string(),
        key_id: key_id.to_string(),
    };
    let sig_b64 = signature(object, entity, key_id).ok_or_else(missing)?;
    let sig: [u8; 64] = decode_base64(sig_b64)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| SignedJsonError::MalformedSignature {
            entity: entity.to_string(),
            key_id: key_id.to_string(),
        })?;
    let bytes = signable_bytes(object)?;
    if key.verify(&bytes, &sig) {
        Ok(())
    } else {
        Err(SignedJsonError::BadSignature {
            entity: entity.to_string(),
            key_id: key_id.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn canon(s: &str) -> String {
        canonical_json(&serde_json::from_str(s).unwrap()).unwrap()
    }

    /// The examples of the spec's canonical JSON section, input → output.
    #[test]
    fn spec_examples() {
        assert_eq!(canon(r#"{}"#), "{}");
        assert_eq!(
            canon(r#"{"one": 1, "two": "Two"}"#),
            r#"{"one":1,"two":"Two"}"#
        );
        assert_eq!(canon(r#"{"b": "2", "a": "1"}"#), r#"{"a":"1","b":"2"}"#);
        assert_eq!(canon(r#"{"b":"2","a":"1"}"#), r#"{"a":"1","b":"2"}"#);
        assert_eq!(
            canon(
                r#"{"auth": {"success": true, "mxid": "@john.doe:example.com", "profile": {"display_name": "John Doe", "three_pids": [{"medium": "email", "address": "john.doe@example.org"}, {"medium": "msisdn", "address": "123456789"}]}}}"#
            ),
            r#"{"auth":{"mxid":"@john.doe:example.com","profile":{"display_name":"John Doe","three_pids":[{"address":"john.doe@example.org","medium":"email"},{"address":"123456789","medium":"msisdn"}]},"success":true}}"#
        );
        assert_eq!(canon(r#"{"a": "日本語"}"#), r#"{"a":"日本語"}"#);
        assert_eq!(canon(r#"{"本": 2, "日": 1}"#), r#"{"日":1,"本":2}"#);
        assert_eq!(canon(r#"{"a": "\u65E5"}"#), r#"{"a":"日"}"#);
        assert_eq!(canon(r#"{"a": null}"#), r#"{"a":null}"#);
        // Escapes: short forms, lower-case \u00xx, '/' raw.
        assert_eq!(
            canon(r#"{"a": "\u0001\b\t\n\f\r\"\\/\u007f\u001F"}"#),
            "{\"a\":\"\\u0001\\b\\t\\n\\f\\r\\\"\\\\/\u{7f}\\u001f\"}"
        );
    }

    #[test]
    fn numbers_outside_canonical_json_are_refused() {
        for bad in [
            r#"{"a": 1.5}"#,
            r#"{"a": 1e10}"#,
            r#"{"a": 9007199254740992}"#,
            r#"{"a": [-9007199254740992]}"#,
        ] {
            let v: Value = serde_json::from_str(bad).unwrap();
            assert!(
                matches!(canonical_json(&v), Err(SignedJsonError::Number(_))),
                "{bad}"
            );
        }
        assert_eq!(
            canon(r#"{"a": 9007199254740991, "b": -9007199254740991}"#),
            r#"{"a":9007199254740991,"b":-9007199254740991}"#
        );
    }

    /// The js-sdk's published cross-signing signatures (docs/vectors.md),
    /// made with software keys here; the token tests make them on SoftHSM and Kryoptic.
    #[test]
    fn js_sdk_vectors() {
        let msk = vodozemac::Ed25519SecretKey::from_slice(b"doyouspeakwhaaaaaaaaaaaaaaaaaale");
        assert_eq!(
            Ed25519Signer::public_key(&msk).to_base64(),
            "J+5An10v1vzZpAXTYFokD1/PEVccFnLC61EfRXit0UY"
        );
        let mut ssk = json!({
            "user_id": "@alice:localhost",
            "usage": ["self_signing"],
            "keys": {"ed25519:aU2+2CyXQTCuDcmWW0EL2bhJ6PdjFW2LbAsbHqf02AY": "aU2+2CyXQTCuDcmWW0EL2bhJ6PdjFW2LbAsbHqf02AY"},
            "unsigned": {"ignored": true},
        });
        let key_id = "ed25519:J+5An10v1vzZpAXTYFokD1/PEVccFnLC61EfRXit0UY";
        sign_json(&mut ssk, "@alice:localhost", key_id, &msk).unwrap();
        assert_eq!(
            signature(&ssk, "@alice:localhost", key_id),
            Some(
                "XfhYEhZmOs8BJdb3viatILBZ/bElsHXEW28V4tIaY5CxrBR0YOym3yZHWmRmypXessHZAKOhZn3yBMXzdajyCw"
            )
        );
        let pk = Ed25519Signer::public_key(&msk);
        verify_json(&ssk, "@alice:localhost", key_id, &pk).unwrap();
        // Any change to a signed field breaks it; `unsigned` is not covered.
        ssk["unsigned"]["ignored"] = json!(false);
        verify_json(&ssk, "@alice:localhost", key_id, &pk).unwrap();
        ssk["usage"] = json!(["user_signing"]);
        assert!(matches!(
            verify_json(&ssk, "@alice:localhost", key_id, &pk),
            Err(SignedJsonError::BadSignature { .. })
        ));
        assert!(matches!(
            verify_json(&ssk, "@bob:localhost", key_id, &pk),
            Err(SignedJsonError::MissingSignature { .. })
        ));
        ssk["signatures"]["@alice:localhost"][key_id] = json!("!!!");
        assert!(matches!(
            verify_json(&ssk, "@alice:localhost", key_id, &pk),
            Err(SignedJsonError::MalformedSignature { .. })
        ));
    }

    #[test]
    fn signing_keeps_existing_signatures() {
        let a = vodozemac::Ed25519SecretKey::from_slice(&[1u8; 32]);
        let b = vodozemac::Ed25519SecretKey::from_slice(&[2u8; 32]);
        let mut obj = json!({"x": 1});
        sign_json(&mut obj, "@u:h", "ed25519:A", &a).unwrap();
        sign_json(&mut obj, "@u:h", "ed25519:B", &b).unwrap();
        sign_json(&mut obj, "@v:h", "ed25519:B", &b).unwrap();
        verify_json(&obj, "@u:h", "ed25519:A", &Ed25519Signer::public_key(&a)).unwrap();
        verify_json(&obj, "@u:h", "ed25519:B", &Ed25519Signer::public_key(&b)).unwrap();
        verify_json(&obj, "@v:h", "ed25519:B", &Ed25519Signer::public_key(&b)).unwrap();
    }

    /// A signer's own error stays reachable as the source (a caller can tell a wrong PIN
    /// from a missing card).
    #[test]
    fn signer_errors_keep_their_source() {
        #[derive(Debug, thiserror::Error)]
        #[error("the card is gone")]
        struct Gone;
        struct Failing;
        impl Ed25519Signer for Failing {
            fn public_key(&self) -> Ed25519PublicKey {
                Ed25519Signer::public_key(&vodozemac::Ed25519SecretKey::new())
            }
            fn sign(&self, _: &[u8]) -> Result<[u8; 64], SignError> {
                Err(SignError::new(Gone))
            }
        }
        let e = sign_json(&mut serde_json::json!({}), "@u:h", "ed25519:K", &Failing).unwrap_err();
        assert_eq!(e.to_string(), "signing failed: the card is gone");
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        let mut found = false;
        while let Some(c) = cause {
            found |= c.downcast_ref::<Gone>().is_some();
            cause = c.source();
        }
        assert!(found, "the signer's error is in the chain");
    }

    #[test]
    fn keys_parse_padded_and_unpadded() {
        let k =
            Ed25519PublicKey::from_base64("J+5An10v1vzZpAXTYFokD1/PEVccFnLC61EfRXit0UY=").unwrap();
        assert_eq!(
            k.key_id(),
            "ed25519:J+5An10v1vzZpAXTYFokD1/PEVccFnLC61EfRXit0UY"
        );
        assert!(Ed25519PublicKey::from_base64("short").is_err());
    }
}
