//! A `/keys/query` answer from a hostile server: trust evaluation and the published-identity
//! reader must never panic, and nothing unsigned may come out verified.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxhsm::account::PublishedIdentity;
use mxhsm::matrix::cross_signing::{OwnKeys, Trust, evaluate};
use mxhsm::matrix::signed_json::Ed25519PublicKey;

const ME: &str = "@alice:localhost";

fuzz_target!(|data: &[u8]| {
    let Ok(answer) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    // Keys no fuzzer can sign with: nothing in the input can verify against them, so every
    // device and user must come out unverified.
    let own = OwnKeys {
        user_id: ME.into(),
        master: Ed25519PublicKey::from_base64("J+5An10v1vzZpAXTYFokD1/PEVccFnLC61EfRXit0UY").unwrap(),
        self_signing: Ed25519PublicKey::from_base64("aU2+2CyXQTCuDcmWW0EL2bhJ6PdjFW2LbAsbHqf02AY").ok(),
        user_signing: None,
    };
    let report = evaluate(&own, &answer);
    for d in &report.devices {
        assert!(!matches!(d.trust, Trust::Verified), "{d:?}");
    }
    for u in &report.users {
        assert!(!matches!(u.trust, Trust::Verified), "{u:?}");
    }
    let p = PublishedIdentity::from_query(&answer, ME);
    assert!(p.self_signing.is_none() && p.user_signing.is_none());
});
