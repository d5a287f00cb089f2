//! Canonical JSON and signature checks on any JSON object, and the escaping of untrusted
//! text for terminals and for `--json` output.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxhsm::matrix::keys::Ed25519PublicKey;
use mxhsm::matrix::signed_json::{canonical_json, signable_bytes, verify_json};
use mxhsm::text;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        if let Ok(c) = canonical_json(&v) {
            // Canonical JSON parses back to the same value and is a fixed point.
            let back: serde_json::Value = serde_json::from_str(&c).unwrap();
            assert_eq!(back, v);
            assert_eq!(canonical_json(&back).unwrap(), c);
        }
        let _ = signable_bytes(&v);
        let key = Ed25519PublicKey::from_base64("J+5An10v1vzZpAXTYFokD1/PEVccFnLC61EfRXit0UY").unwrap();
        assert!(verify_json(&v, "@alice:localhost", &key.key_id(), &key).is_err());
        // Output escaping leaves nothing dangerous on a terminal, and keeps the value
        // (floats aside: serde_json does not promise to round-trip them, and canonical
        // JSON has none).
        let shown = text::json_string(&v, false);
        assert!(!shown.chars().any(text::is_dangerous));
        if canonical_json(&v).is_ok() {
            let back: serde_json::Value = serde_json::from_str(&shown).unwrap();
            assert_eq!(back, v);
        }
    }
    if let Ok(s) = std::str::from_utf8(data) {
        assert!(!text::escape(s).chars().any(text::is_dangerous));
        assert!(!text::terminal_safe(s).chars().any(|c| text::is_dangerous(c) && c != '\n' && c != '\t'));
    }
});
