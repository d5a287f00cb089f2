//! A `/keys/query` answer from a hostile server: trust evaluation and the published-identity
//! reader must never panic, and nothing unsigned may come out verified.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxhsm::account::PublishedIdentity;
use mxhsm::matrix::cross_signing::{OwnKeys, Trust, evaluate};
use mxhsm::matrix::keys::Ed25519PublicKey;
use mxhsm::token::{KeyAlgorithm, PublicKey, SecretKeyBytes};

const ME: &str = "@alice:localhost";

fuzz_target!(|data: &[u8]| {
    let Ok(answer) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    // Keys whose private halves nothing in the corpus was ever signed with: nothing in the
    // input can verify against them, so every device and user must come out unverified.
    let key = |seed: u8| -> Ed25519PublicKey {
        match SecretKeyBytes::new([seed; 32]).public_key(KeyAlgorithm::Ed25519) {
            PublicKey::Ed25519(k) => k,
            PublicKey::Curve25519(_) => unreachable!("asked for an Ed25519 key"),
        }
    };
    let own = OwnKeys {
        user_id: ME.into(),
        master: key(0x5a),
        self_signing: Some(key(0x5b)),
        user_signing: Some(key(0x5c)),
    };
    let report = evaluate(&own, &answer);
    for d in &report.devices {
        assert!(!matches!(d.trust, Trust::Verified), "{d:?}");
    }
    for u in &report.users {
        assert!(!matches!(u.trust, Trust::Verified), "{u:?}");
    }
    // The published-identity reader never panics, and never calls a key signed by a master
    // key it did not see.
    let p = PublishedIdentity::from_query(&answer, ME);
    if p.master.is_none() {
        assert!(p.self_signing.is_none() && p.user_signing.is_none());
    }
});
