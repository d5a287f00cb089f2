//! Other clients, played by test code with independent implementations (ed25519-dalek,
//! canonical JSON by serde_json, raw HTTP): a phone of the same user, another user with a
//! software identity, and checks of what Synapse stores.
#![allow(dead_code)]

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD as B64;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde_json::{Value, json};

use super::synapse::{Synapse, TestUser, http};

/// Canonical JSON the way the spec's reference does it (sorted keys, no spaces): our test
/// clients sign with this, independently of mxhsm's signed_json.
pub fn canonical(v: &Value) -> String {
    let mut v = v.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("signatures");
        m.remove("unsigned");
    }
    serde_json::to_string(&v).unwrap()
}

pub fn sign_with(v: &mut Value, user: &str, key_id: &str, key: &SigningKey) {
    let sig = B64.encode(key.sign(canonical(v).as_bytes()).to_bytes());
    v["signatures"][user][key_id] = json!(sig);
}

pub fn verifies(v: &Value, user: &str, key_b64: &str) -> bool {
    let key: [u8; 32] = B64.decode(key_b64).unwrap().try_into().unwrap();
    let Some(sig) = v["signatures"][user][format!("ed25519:{key_b64}")].as_str() else {
        return false;
    };
    let sig: [u8; 64] = B64.decode(sig).unwrap().try_into().unwrap();
    VerifyingKey::from_bytes(&key)
        .unwrap()
        .verify_strict(canonical(v).as_bytes(), &Signature::from_bytes(&sig))
        .is_ok()
}

pub fn random_key() -> SigningKey {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).unwrap();
    SigningKey::from_bytes(&seed)
}

/// (trust, reason) of the entry of `list` in `identity status --json` whose `field` is `id`.
fn trust_in(status: &Value, list: &str, field: &str, id: &str) -> (String, String) {
    let e = status[list]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e[field] == id)
        .unwrap_or_else(|| panic!("no {field} {id} in {status}"));
    (
        e["trust"].as_str().unwrap().into(),
        e["reason"].as_str().unwrap().into(),
    )
}

pub fn device_trust(status: &Value, device: &str) -> (String, String) {
    trust_in(status, "devices", "device_id", device)
}

pub fn user_trust(status: &Value, user: &str) -> (String, String) {
    trust_in(status, "users", "user_id", user)
}

/// Another client of the same user: a device with its own Ed25519 key, uploaded over HTTP.
pub fn phone(synapse: &Synapse, user: &TestUser, id: &str) -> (String, SigningKey) {
    phone_signed_by(synapse, user, id, None)
}

/// [`phone`], whose self-signature is made by `signer` instead of its own key when given:
/// what a server that swapped the device's key leaves.
pub fn phone_signed_by(
    synapse: &Synapse,
    user: &TestUser,
    id: &str,
    signer: Option<&SigningKey>,
) -> (String, SigningKey) {
    let token = synapse.login(user, id);
    let key = random_key();
    let mut keys = json!({
        "user_id": user.user_id, "device_id": id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {format!("ed25519:{id}"): B64.encode(key.verifying_key().to_bytes()),
                 format!("curve25519:{id}"): B64.encode(random_key().verifying_key().to_bytes())},
    });
    sign_with(
        &mut keys,
        &user.user_id,
        &format!("ed25519:{id}"),
        signer.unwrap_or(&key),
    );
    let (s, v) = http(
        &synapse.url,
        "POST",
        "/keys/upload",
        Some(&token),
        Some(json!({"device_keys": keys})),
    );
    assert_eq!(s, 200, "{v}");
    (token, key)
}

/// Bob publishes a cross-signing identity with software keys, as another client would.
pub fn software_identity(synapse: &Synapse, user: &TestUser, token: &str) -> SigningKey {
    let (msk, ssk, usk) = (random_key(), random_key(), random_key());
    let b = |k: &SigningKey| B64.encode(k.verifying_key().to_bytes());
    let obj = |usage: &str, k: &SigningKey| json!({"user_id": user.user_id, "usage": [usage], "keys": {format!("ed25519:{}", b(k)): b(k)}});
    let master = obj("master", &msk);
    let mut s = obj("self_signing", &ssk);
    let mut u = obj("user_signing", &usk);
    sign_with(&mut s, &user.user_id, &format!("ed25519:{}", b(&msk)), &msk);
    sign_with(&mut u, &user.user_id, &format!("ed25519:{}", b(&msk)), &msk);
    let (st, v) = http(
        &synapse.url,
        "POST",
        "/keys/device_signing/upload",
        Some(token),
        Some(json!({"master_key": master, "self_signing_key": s, "user_signing_key": u})),
    );
    assert_eq!(st, 200, "{v}");
    msk
}

/// `AAAA BBBB …`, as mxhsm shows a fingerprint.
pub fn spaced(key_b64: &str) -> String {
    key_b64
        .as_bytes()
        .chunks(4)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join(" ")
}

/// New random keys for device `id` of `user_id`, uploaded with `token` straight to
/// `synapse` (what a server that rewrites its own store can do). Returns the Ed25519 key.
pub fn replace_keys(synapse: &str, user_id: &str, token: &str, id: &str) -> String {
    let key = random_key();
    let mut keys = json!({
        "user_id": user_id, "device_id": id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {format!("ed25519:{id}"): B64.encode(key.verifying_key().to_bytes()),
                 format!("curve25519:{id}"): B64.encode(random_key().verifying_key().to_bytes())},
    });
    sign_with(&mut keys, user_id, &format!("ed25519:{id}"), &key);
    let (s, v) = http(
        synapse,
        "POST",
        "/keys/upload",
        Some(token),
        Some(json!({"device_keys": keys})),
    );
    assert_eq!(s, 200, "{v}");
    B64.encode(key.verifying_key().to_bytes())
}
