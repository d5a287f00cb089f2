//! Cross-signing key objects and trust evaluation from a `/keys/query` answer.
//!
//! Chains of trust (spec e2e module, "Cross-signing"): our master key (MSK, on the token:
//! the anchor) signs our self-signing key (SSK), which signs our devices; the MSK signs
//! our user-signing key (USK), which signs other users' master keys, whose SSKs sign their
//! devices.
//!
//! Everything in a `/keys/query` answer is untrusted. Synapse stores master-key and device
//! self-signatures without checking them (docs/synapse.md), so every link is checked
//! here with a signature against a key that is itself already trusted.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::keys::{Ed25519PublicKey, KeyError, KeyRole};
use super::signed_json::{Ed25519Signer, SignedJsonError, sign_json, verify_json};

/// The unsigned cross-signing key object for `key` (spec `CrossSigningKey`). `usage` is
/// one of [`KeyRole::CROSS_SIGNING`].
pub fn key_object(user_id: &str, usage: KeyRole, key: &Ed25519PublicKey) -> Value {
    json!({
        "user_id": user_id,
        "usage": [usage.as_str()],
        "keys": { key.key_id(): key.to_base64() },
    })
}

/// The three objects of a new identity: the master key (unsigned; Synapse does not check
/// master signatures, and clients trust it through verification), and the SSK and USK
/// signed by the master key.
pub fn identity_objects(
    user_id: &str,
    master: &dyn Ed25519Signer,
    self_signing: &Ed25519PublicKey,
    user_signing: &Ed25519PublicKey,
) -> Result<[Value; 3], SignedJsonError> {
    let msk = master.public_key();
    let master_obj = key_object(user_id, KeyRole::Master, &msk);
    let mut ssk = key_object(user_id, KeyRole::SelfSigning, self_signing);
    let mut usk = key_object(user_id, KeyRole::UserSigning, user_signing);
    sign_json(&mut ssk, user_id, &msk.key_id(), master)?;
    sign_json(&mut usk, user_id, &msk.key_id(), master)?;
    Ok([master_obj, ssk, usk])
}

/// Why an object is not a cross-signing key of the expected user and usage.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyObjectError {
    #[error("its user_id is not {0}")]
    OtherUser(String),
    #[error("its usage does not include {0}")]
    OtherUsage(KeyRole),
    #[error("it has no keys")]
    NoKeys,
    #[error("it has {0} keys instead of one")]
    SeveralKeys(usize),
    #[error("its key is not a string")]
    NotAString,
    #[error("its key is not an Ed25519 public key: {0}")]
    BadKey(#[from] KeyError),
    #[error("its key ID {} does not name its key {key}", crate::text::escape(.id))]
    KeyIdMismatch { id: String, key: Ed25519PublicKey },
}

/// The single Ed25519 key of a cross-signing key object, checked for shape: `user_id`,
/// `usage` and exactly one `ed25519:` key whose ID matches its value.
pub fn parse_key_object(
    object: &Value,
    user_id: &str,
    usage: KeyRole,
) -> Result<Ed25519PublicKey, KeyObjectError> {
    if object.get("user_id").and_then(Value::as_str) != Some(user_id) {
        return Err(KeyObjectError::OtherUser(user_id.to_string()));
    }
    let usages = object.get("usage").and_then(Value::as_array);
    if !usages.is_some_and(|u| u.iter().any(|x| x.as_str() == Some(usage.as_str()))) {
        return Err(KeyObjectError::OtherUsage(usage));
    }
    let keys = object
        .get("keys")
        .and_then(Value::as_object)
        .ok_or(KeyObjectError::NoKeys)?;
    let (id, value) = match keys.len() {
        1 => keys.iter().next().ok_or(KeyObjectError::NoKeys)?,
        0 => return Err(KeyObjectError::NoKeys),
        n => return Err(KeyObjectError::SeveralKeys(n)),
    };
    let key = Ed25519PublicKey::from_base64(value.as_str().ok_or(KeyObjectError::NotAString)?)?;
    if id != &key.key_id() {
        return Err(KeyObjectError::KeyIdMismatch {
            id: id.clone(),
            key,
        });
    }
    Ok(key)
}

/// How far a device or user can be trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Every link of the chain from our master key checks out.
    Verified,
    /// Signed, but a link of the chain does not verify; the reason says which.
    ChainBroken(String),
    /// Not signed by the key that should sign it.
    Unsigned(String),
}

impl Trust {
    pub fn as_str(&self) -> &'static str {
        match self {
            Trust::Verified => "verified",
            Trust::ChainBroken(_) => "chain-broken",
            Trust::Unsigned(_) => "unsigned",
        }
    }

    pub fn reason(&self) -> &str {
        match self {
            Trust::Verified => "",
            Trust::ChainBroken(r) | Trust::Unsigned(r) => r,
        }
    }

    pub fn is_verified(&self) -> bool {
        matches!(self, Trust::Verified)
    }
}

/// One device in the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceTrust {
    pub user_id: String,
    pub device_id: String,
    pub display_name: Option<String>,
    /// The device's Ed25519 key (its fingerprint), if it has a readable one.
    pub ed25519: Option<Ed25519PublicKey>,
    pub trust: Trust,
}

/// Another user in the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserTrust {
    pub user_id: String,
    pub master_key: Option<Ed25519PublicKey>,
    pub trust: Trust,
}

/// The trust table of `mxhsm identity status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustReport {
    /// Problems with our own identity as the server serves it (empty: all good).
    pub own_identity: Vec<String>,
    pub devices: Vec<DeviceTrust>,
    pub users: Vec<UserTrust>,
}

/// Our own keys, as the token holds them: the trust anchors.
#[derive(Debug, Clone)]
pub struct OwnKeys {
    pub user_id: String,
    pub master: Ed25519PublicKey,
    pub self_signing: Option<Ed25519PublicKey>,
    pub user_signing: Option<Ed25519PublicKey>,
}

fn cross_signing_key<'a>(answer: &'a Value, field: &str, user: &str) -> Option<&'a Value> {
    answer.get(field)?.get(user)
}

/// Checks a cross-signing sub-key (SSK or USK) of `user` that `master` must have signed.
fn checked_subkey(
    answer: &Value,
    field: &str,
    usage: KeyRole,
    user: &str,
    master: &Ed25519PublicKey,
) -> Result<Ed25519PublicKey, Trust> {
    let object = cross_signing_key(answer, field, user).ok_or_else(|| {
        Trust::Unsigned(format!(
            "the server has no {} key for {user}",
            usage.as_str()
        ))
    })?;
    let key = parse_key_object(object, user, usage).map_err(|e| {
        Trust::ChainBroken(format!(
            "the {} key of {user} is malformed: {e}",
            usage.as_str()
        ))
    })?;
    verify_json(object, user, &master.key_id(), master).map_err(|e| {
        Trust::ChainBroken(format!(
            "the {} key {key} is not validly signed by the master key {master}: {e}",
            usage.as_str()
        ))
    })?;
    Ok(key)
}

/// The devices of `user` judged against `ssk` (already trusted, or the reason it is not).
fn device_trust(
    answer: &Value,
    user: &str,
    ssk: &Result<Ed25519PublicKey, Trust>,
) -> Vec<DeviceTrust> {
    let Some(devices) = answer
        .get("device_keys")
        .and_then(|d| d.get(user))
        .and_then(Value::as_object)
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (device_id, device) in devices {
        let display_name = device
            .get("unsigned")
            .and_then(|u| u.get("device_display_name"))
            .and_then(Value::as_str)
            .map(str::to_string);
        let own_key_id = format!("ed25519:{device_id}");
        let ed25519 = device
            .get("keys")
            .and_then(|k| k.get(&own_key_id))
            .and_then(Value::as_str)
            .and_then(|k| Ed25519PublicKey::from_base64(k).ok());
        let trust = (|| {
            if device.get("user_id").and_then(Value::as_str) != Some(user)
                || device.get("device_id").and_then(Value::as_str) != Some(device_id)
            {
                return Trust::ChainBroken("the device object names another user or device".into());
            }
            let Some(own) = ed25519 else {
                return Trust::ChainBroken("the device has no valid Ed25519 key".into());
            };
            // Synapse does not check the device's self-signature; we do.
            if let Err(e) = verify_json(device, user, &own_key_id, &own) {
                return Trust::ChainBroken(format!("the device's self-signature is bad: {e}"));
            }
            let ssk = match ssk {
                Ok(k) => k,
                Err(t) => {
                    return match t {
                        Trust::Unsigned(r) | Trust::ChainBroken(r) => Trust::ChainBroken(r.clone()),
                        Trust::Verified => Trust::ChainBroken("no self-signing key".into()),
                    };
                }
            };
            match verify_json(device, user, &ssk.key_id(), ssk) {
                Ok(()) => Trust::Verified,
                Err(SignedJsonError::MissingSignature { .. }) => {
                    Trust::Unsigned("not signed by the self-signing key".into())
                }
                Err(SignedJsonError::BadSignature { .. }) => Trust::ChainBroken(
                    "the self-signing key's signature does not match the device's keys (forged, or the device's keys changed)".into(),
                ),
                Err(e) => Trust::ChainBroken(e.to_string()),
            }
        })();
        out.push(DeviceTrust {
            user_id: user.to_string(),
            device_id: device_id.clone(),
            display_name,
            ed25519,
            trust,
        });
    }
    out
}

/// Evaluates a `/keys/query` answer from the point of view of `own`, whose keys are the
/// anchors (they come from the token, not from the server).
pub fn evaluate(own: &OwnKeys, answer: &Value) -> TrustReport {
    let me = own.user_id.as_str();
    let mut own_identity = Vec::new();

    // Our master key as the server serves it must be the token's.
    match cross_signing_key(answer, "master_keys", me) {
        None => own_identity.push("the server has no master key for us".into()),
        Some(obj) => match parse_key_object(obj, me, KeyRole::Master) {
            Ok(k) if k == own.master => {}
            Ok(k) => own_identity.push(format!(
                "the server serves the master key {k}, not the token's {}",
                own.master
            )),
            Err(e) => own_identity.push(format!("the server's master key is malformed: {e}")),
        },
    }
    let master_ok = own_identity.is_empty();
    let anchor_error = |usage: KeyRole| {
        Trust::ChainBroken(format!(
            "our master key on the server is not the token's, so its {} key cannot be trusted",
            usage.as_str()
        ))
    };

    // Our SSK and USK as the server serves them: signed by the token's master key, and
    // the token's own keys where the token has them.
    let mut own_subkey = |field: &str, usage: KeyRole, on_token: Option<&Ed25519PublicKey>| {
        let mut key = if master_ok {
            checked_subkey(answer, field, usage, me, &own.master)
        } else {
            Err(anchor_error(usage))
        };
        let name = usage.as_str().replace('_', "-");
        if let (Ok(served), Some(token)) = (&key, on_token)
            && served != token
        {
            own_identity.push(format!(
                "the server's {name} key {served} is not the token's {token}"
            ));
            key = Err(Trust::ChainBroken(format!(
                "the server's {name} key {served} is not the token's"
            )));
        }
        if let Err(t) = &key {
            own_identity.push(t.reason().to_string());
        }
        key
    };
    let ssk = own_subkey(
        "self_signing_keys",
        KeyRole::SelfSigning,
        own.self_signing.as_ref(),
    );
    let usk = own_subkey(
        "user_signing_keys",
        KeyRole::UserSigning,
        own.user_signing.as_ref(),
    );
    own_identity.dedup();

    let mut devices = device_trust(answer, me, &ssk);

    let mut users = Vec::new();
    let mut others: BTreeMap<&str, ()> = BTreeMap::new();
    for field in ["master_keys", "device_keys"] {
        if let Some(map) = answer.get(field).and_then(Value::as_object) {
            for u in map.keys().filter(|u| u.as_str() != me) {
                others.insert(u, ());
            }
        }
    }
    for user in others.keys() {
        let (master_key, trust) = match cross_signing_key(answer, "master_keys", user) {
            None => (
                None,
                Trust::Unsigned(format!("{user} has no cross-signing identity")),
            ),
            Some(obj) => match parse_key_object(obj, user, KeyRole::Master) {
                Err(e) => (
                    None,
                    Trust::ChainBroken(format!("their master key is malformed: {e}")),
                ),
                Ok(k) => {
                    let trust = match &usk {
                        Err(t) => Trust::ChainBroken(format!(
                            "our user-signing key cannot be trusted: {}",
                            t.reason()
                        )),
                        Ok(usk) => match verify_json(obj, me, &usk.key_id(), usk) {
                            Ok(()) => Trust::Verified,
                            Err(SignedJsonError::MissingSignature { .. }) => {
                                Trust::Unsigned("not signed by our user-signing key".into())
                            }
                            Err(e) => Trust::ChainBroken(format!(
                                "our user-signing key's signature on their master key does not verify: {e}"
                            )),
                        },
                    };
                    (Some(k), trust)
                }
            },
        };
        // Their devices: trusted through their SSK, signed by their (verified) master key.
        let their_ssk = match (&master_key, &trust) {
            (Some(mk), Trust::Verified) => {
                checked_subkey(answer, "self_signing_keys", KeyRole::SelfSigning, user, mk)
            }
            _ => Err(Trust::ChainBroken(format!("{user} is not verified"))),
        };
        devices.extend(device_trust(answer, user, &their_ssk));
        users.push(UserTrust {
            user_id: user.to_string(),
            master_key,
            trust,
        });
    }
    TrustReport {
        own_identity,
        devices,
        users,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matrix::signed_json::Ed25519Signer;
    use vodozemac::Ed25519SecretKey;

    const ME: &str = "@alice:localhost";
    const BOB: &str = "@bob:localhost";

    struct Identity {
        msk: Ed25519SecretKey,
        ssk: Ed25519SecretKey,
        usk: Ed25519SecretKey,
    }

    impl Identity {
        fn new(seed: u8) -> Self {
            Identity {
                msk: Ed25519SecretKey::from_slice(&[seed; 32]),
                ssk: Ed25519SecretKey::from_slice(&[seed + 1; 32]),
                usk: Ed25519SecretKey::from_slice(&[seed + 2; 32]),
            }
        }
        fn objects(&self, user: &str) -> [Value; 3] {
            identity_objects(
                user,
                &self.msk,
                &Ed25519Signer::public_key(&self.ssk),
                &Ed25519Signer::public_key(&self.usk),
            )
            .unwrap()
        }
        fn own(&self, user: &str) -> OwnKeys {
            OwnKeys {
                user_id: user.into(),
                master: Ed25519Signer::public_key(&self.msk),
                self_signing: Some(Ed25519Signer::public_key(&self.ssk)),
                user_signing: Some(Ed25519Signer::public_key(&self.usk)),
            }
        }
    }

    fn device(user: &str, id: &str, key: &Ed25519SecretKey) -> Value {
        let pk = Ed25519Signer::public_key(key);
        let mut d = json!({
            "user_id": user, "device_id": id,
            "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
            "keys": {format!("ed25519:{id}"): pk.to_base64(), format!("curve25519:{id}"): pk.to_base64()},
        });
        sign_json(&mut d, user, &format!("ed25519:{id}"), key).unwrap();
        d
    }

    fn answer(alice: &Identity, bob: &Identity) -> Value {
        let [am, assk, ausk] = alice.objects(ME);
        let [mut bm, bssk, _] = bob.objects(BOB);
        sign_json(
            &mut bm,
            ME,
            &Ed25519Signer::public_key(&alice.usk).key_id(),
            &alice.usk,
        )
        .unwrap();
        let phone = Ed25519SecretKey::from_slice(&[50; 32]);
        let mut signed_phone = device(ME, "PHONE", &phone);
        sign_json(
            &mut signed_phone,
            ME,
            &Ed25519Signer::public_key(&alice.ssk).key_id(),
            &alice.ssk,
        )
        .unwrap();
        let laptop = device(ME, "LAPTOP", &Ed25519SecretKey::from_slice(&[51; 32]));
        let mut bob_dev = device(BOB, "BOBDEV", &Ed25519SecretKey::from_slice(&[52; 32]));
        sign_json(
            &mut bob_dev,
            BOB,
            &Ed25519Signer::public_key(&bob.ssk).key_id(),
            &bob.ssk,
        )
        .unwrap();
        json!({
            "master_keys": {ME: am, BOB: bm},
            "self_signing_keys": {ME: assk, BOB: bssk},
            "user_signing_keys": {ME: ausk},
            "device_keys": {ME: {"PHONE": signed_phone, "LAPTOP": laptop}, BOB: {"BOBDEV": bob_dev}},
        })
    }

    fn trust_of<'a>(r: &'a TrustReport, device: &str) -> &'a Trust {
        &r.devices
            .iter()
            .find(|d| d.device_id == device)
            .unwrap()
            .trust
    }

    #[test]
    fn a_good_answer() {
        let (alice, bob) = (Identity::new(1), Identity::new(10));
        let r = evaluate(&alice.own(ME), &answer(&alice, &bob));
        assert!(r.own_identity.is_empty(), "{:?}", r.own_identity);
        assert_eq!(trust_of(&r, "PHONE"), &Trust::Verified);
        assert!(matches!(trust_of(&r, "LAPTOP"), Trust::Unsigned(_)));
        assert_eq!(r.users.len(), 1);
        assert_eq!(r.users[0].trust, Trust::Verified);
        assert_eq!(trust_of(&r, "BOBDEV"), &Trust::Verified);
    }

    #[test]
    fn forged_ssk_breaks_every_own_device() {
        let (alice, bob) = (Identity::new(1), Identity::new(10));
        let mut a = answer(&alice, &bob);
        // A server that swaps in its own SSK, "signed" with a forged signature.
        let evil = Ed25519SecretKey::from_slice(&[99; 32]);
        let mut forged = key_object(ME, KeyRole::SelfSigning, &Ed25519Signer::public_key(&evil));
        sign_json(
            &mut forged,
            ME,
            &Ed25519Signer::public_key(&alice.msk).key_id(),
            &evil,
        )
        .unwrap();
        a["self_signing_keys"][ME] = forged;
        let r = evaluate(&alice.own(ME), &a);
        assert!(
            r.own_identity
                .iter()
                .any(|p| p.contains("not validly signed by the master key")),
            "{:?}",
            r.own_identity
        );
        assert!(matches!(trust_of(&r, "PHONE"), Trust::ChainBroken(_)));
    }

    #[test]
    fn forged_device_signature_and_changed_keys() {
        let (alice, bob) = (Identity::new(1), Identity::new(10));
        let mut a = answer(&alice, &bob);
        let ssk_id = Ed25519Signer::public_key(&alice.ssk).key_id();
        // The device's keys changed after it was signed: its self-signature is redone by
        // the (new) device key, but the SSK signature is over the old keys.
        let newkey = Ed25519SecretKey::from_slice(&[77; 32]);
        let old_sig = a["device_keys"][ME]["PHONE"]["signatures"][ME][&ssk_id].clone();
        let mut changed = device(ME, "PHONE", &newkey);
        changed["signatures"][ME][&ssk_id] = old_sig;
        a["device_keys"][ME]["PHONE"] = changed;
        // A device with a random "SSK signature".
        a["device_keys"][ME]["LAPTOP"]["signatures"][ME][&ssk_id] =
            json!(crate::matrix::signed_json::encode_base64(&[7u8; 64]));
        let r = evaluate(&alice.own(ME), &a);
        let Trust::ChainBroken(why) = trust_of(&r, "PHONE") else {
            panic!()
        };
        assert!(why.contains("keys changed"), "{why}");
        assert!(matches!(trust_of(&r, "LAPTOP"), Trust::ChainBroken(_)));
        // A device whose self-signature is bad is untrusted even with a valid SSK signature.
        let mut a = answer(&alice, &bob);
        a["device_keys"][ME]["PHONE"]["signatures"][ME]["ed25519:PHONE"] =
            json!(crate::matrix::signed_json::encode_base64(&[1u8; 64]));
        let r = evaluate(&alice.own(ME), &a);
        let Trust::ChainBroken(why) = trust_of(&r, "PHONE") else {
            panic!()
        };
        assert!(why.contains("self-signature"), "{why}");
    }

    #[test]
    fn forged_usk_signature_on_another_user() {
        let (alice, bob) = (Identity::new(1), Identity::new(10));
        let mut a = answer(&alice, &bob);
        let usk_id = Ed25519Signer::public_key(&alice.usk).key_id();
        a["master_keys"][BOB]["signatures"][ME][&usk_id] =
            json!(crate::matrix::signed_json::encode_base64(&[3u8; 64]));
        let r = evaluate(&alice.own(ME), &a);
        assert!(matches!(r.users[0].trust, Trust::ChainBroken(_)));
        assert!(matches!(trust_of(&r, "BOBDEV"), Trust::ChainBroken(_)));
        // A server swapping Bob's master key for another: not signed by our USK.
        let mut a = answer(&alice, &bob);
        let [other, _, _] = Identity::new(30).objects(BOB);
        a["master_keys"][BOB] = other;
        let r = evaluate(&alice.own(ME), &a);
        assert!(matches!(r.users[0].trust, Trust::Unsigned(_)));
    }

    #[test]
    fn a_server_serving_another_master_key() {
        let (alice, bob) = (Identity::new(1), Identity::new(10));
        let a = answer(&Identity::new(40), &bob);
        let r = evaluate(&alice.own(ME), &a);
        assert!(
            r.own_identity[0].contains("not the token's"),
            "{:?}",
            r.own_identity
        );
        assert!(r.devices.iter().all(|d| !d.trust.is_verified()));
        assert!(r.users.iter().all(|u| !u.trust.is_verified()));
    }
}
