//! Key-backup fixtures: a user with a backup on the token, real megolm sessions made with
//! vodozemac and backed up with vodozemac's `PkEncryption` (another client's code path).
#![allow(dead_code)]

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD as B64;
use serde_json::{Value, json};
use vodozemac::megolm::{GroupSession, InboundGroupSession, SessionConfig};

use super::synapse::{MxhsmUser, http};
use super::{Kind, ok};

/// A user with a published identity and a backup version whose key is on the token.
pub fn with_backup(kind: Kind) -> (MxhsmUser, String, String) {
    let u = MxhsmUser::new(kind);
    u.login();
    ok(u.cli().args(["identity", "create"]));
    let out: Value =
        serde_json::from_str(&ok(u.cli().args(["--json", "backup", "create"]))).unwrap();
    (
        u,
        out["backup_version"].as_str().unwrap().to_string(),
        out["public_key"].as_str().unwrap().to_string(),
    )
}

/// `n` megolm sessions in `rooms` rooms: (room, session id) → exported session key.
pub fn sessions(n: usize, rooms: usize) -> BTreeMap<(String, String), String> {
    (0..n)
        .map(|i| {
            let outbound = GroupSession::new(SessionConfig::version_1());
            let mut inbound =
                InboundGroupSession::new(&outbound.session_key(), SessionConfig::version_1());
            let key = inbound.export_at(0).unwrap().to_base64();
            (
                (
                    format!("!room{}:localhost", i % rooms),
                    outbound.session_id(),
                ),
                key,
            )
        })
        .collect()
}

pub fn session_data(public: &str, key: &str) -> Value {
    let plaintext = json!({
        "algorithm": "m.megolm.v1.aes-sha2",
        "sender_key": "WimPd2udAU/1S/+YBpPbmr9L+0H5H+BnAVHSwDxlPGc",
        "session_key": key,
        "sender_claimed_keys": {"ed25519": "Bhbpt6hqMZlSH4sJV7xiEEEiPVeTWz4Vkujl1EMdIPI"},
        "forwarding_curve25519_key_chain": [],
    });
    let pk = vodozemac::Curve25519PublicKey::from_base64(public).unwrap();
    let m = vodozemac::pk_encryption::PkEncryption::from_key(pk)
        .encrypt(plaintext.to_string().as_bytes())
        .unwrap();
    json!({"ephemeral": m.ephemeral_key.to_base64(), "ciphertext": B64.encode(&m.ciphertext), "mac": B64.encode(&m.mac)})
}

pub fn put(u: &MxhsmUser, version: &str, entries: &[(&str, &str, Value)]) {
    let token: Value =
        serde_json::from_str(&std::fs::read_to_string(u.session_path()).unwrap()).unwrap();
    let token = token["access_token"].as_str().unwrap();
    for chunk in entries.chunks(250) {
        let mut rooms = json!({});
        for (room, sid, data) in chunk {
            rooms[*room]["sessions"][*sid] = json!({"first_message_index": 0, "forwarded_count": 0, "is_verified": false, "session_data": data});
        }
        let (s, v) = http(
            &u.synapse.url,
            "PUT",
            &format!("/room_keys/keys?version={version}"),
            Some(token),
            Some(json!({"rooms": rooms})),
        );
        assert_eq!(s, 200, "{v}");
    }
}

pub fn restored(path: &std::path::Path) -> BTreeMap<(String, String), String> {
    let v: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v.iter()
        .map(|k| {
            (
                (
                    k["room_id"].as_str().unwrap().into(),
                    k["session_id"].as_str().unwrap().into(),
                ),
                k["session_key"].as_str().unwrap().into(),
            )
        })
        .collect()
}

/// `n` new sessions in 10 rooms, backed up into `version` (encrypted to `public`).
pub fn put_sessions(
    u: &MxhsmUser,
    version: &str,
    public: &str,
    n: usize,
) -> BTreeMap<(String, String), String> {
    let made = sessions(n, 10);
    let entries: Vec<(&str, &str, Value)> = made
        .iter()
        .map(|((r, s), k)| (r.as_str(), s.as_str(), session_data(public, k)))
        .collect();
    put(u, version, &entries);
    made
}

/// Writes `sessions` as a plain (JSON) key export, the way a client exports room keys.
pub fn write_export(path: &std::path::Path, sessions: &BTreeMap<(String, String), String>) {
    let array: Vec<Value> = sessions
        .iter()
        .map(|((r, s), k)| json!({"algorithm": "m.megolm.v1.aes-sha2", "room_id": r, "session_id": s, "session_key": k,
                                  "sender_key": "WimPd2udAU/1S/+YBpPbmr9L+0H5H+BnAVHSwDxlPGc", "sender_claimed_keys": {}, "forwarding_curve25519_key_chain": []}))
        .collect();
    std::fs::write(path, serde_json::to_string(&array).unwrap()).unwrap();
}
