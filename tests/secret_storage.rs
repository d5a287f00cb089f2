//! Moving existing keys from secret storage onto the token, end to end against Synapse.
//!
//! The secret storage is written by an independent encoder in this file — a reimplementation
//! from the spec on the RustCrypto primitives that shares no code with `src/` — as another
//! client (Element) would have written it.

mod common;

use aes::cipher::{KeyIvInit, StreamCipher};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD as B64};
use common::synapse::{MxhsmUser, http};
use common::{Kind, fails, ok};
use ed25519_dalek::{Signer, SigningKey};
use hmac::{KeyInit, Mac};
use serde_json::{Value, json};

/// The independent 4S encoder.
mod encoder {
    use super::*;

    fn derive(key: &[u8; 32], name: &str) -> ([u8; 32], [u8; 32]) {
        let hk = hkdf::Hkdf::<sha2::Sha256>::new(Some(&[0u8; 32]), key);
        let mut okm = [0u8; 64];
        hk.expand(name.as_bytes(), &mut okm).unwrap();
        (okm[..32].try_into().unwrap(), okm[32..].try_into().unwrap())
    }

    pub fn encrypt(key: &[u8; 32], name: &str, plaintext: &[u8], padded: bool) -> Value {
        let (aes_key, mac_key) = derive(key, name);
        let mut iv = [0u8; 16];
        getrandom::fill(&mut iv).unwrap();
        iv[8] &= 0x7f;
        let mut data = plaintext.to_vec();
        ctr::Ctr64BE::<aes::Aes256>::new(&aes_key.into(), &iv.into()).apply_keystream(&mut data);
        let mut h = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&mac_key).unwrap();
        h.update(&data);
        let mac = h.finalize().into_bytes();
        let enc = |b: &[u8]| {
            if padded {
                STANDARD.encode(b)
            } else {
                B64.encode(b)
            }
        };
        json!({"iv": enc(&iv), "ciphertext": enc(&data), "mac": enc(&mac)})
    }

    pub fn description(key: &[u8; 32], passphrase: Option<(&str, u32)>) -> Value {
        let check = encrypt(key, "", &[0u8; 32], false);
        let mut d = json!({"algorithm": "m.secret_storage.v1.aes-hmac-sha2", "iv": check["iv"], "mac": check["mac"]});
        if let Some((salt, iterations)) = passphrase {
            d["passphrase"] =
                json!({"algorithm": "m.pbkdf2", "salt": salt, "iterations": iterations});
        }
        d
    }

    pub fn recovery_key(key: &[u8; 32]) -> String {
        let mut bytes = vec![0x8b, 0x01];
        bytes.extend_from_slice(key);
        bytes.push(bytes.iter().fold(0, |a, b| a ^ b));
        let s = bs58::encode(bytes).into_string();
        s.as_bytes()
            .chunks(4)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join(" ")
    }

    pub fn from_passphrase(passphrase: &str, salt: &str, iterations: u32) -> [u8; 32] {
        let mut out = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<sha2::Sha512>(
            passphrase.as_bytes(),
            salt.as_bytes(),
            iterations,
            &mut out,
        );
        out
    }
}

struct Existing {
    msk: SigningKey,
    ssk: SigningKey,
    usk: SigningKey,
    backup: [u8; 32],
    storage_key: [u8; 32],
    token: String,
}

fn random32() -> [u8; 32] {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).unwrap();
    b
}

/// Another client set the account up: a published identity, a backup with sessions, and
/// secret storage holding all four keys.
fn existing_account(
    u: &MxhsmUser,
    passphrase: Option<(&str, &str, u32)>,
    usk_in_storage: Option<SigningKey>,
) -> Existing {
    let (msk, ssk, usk) = (
        SigningKey::from_bytes(&random32()),
        SigningKey::from_bytes(&random32()),
        SigningKey::from_bytes(&random32()),
    );
    let backup = random32();
    let storage_key = match passphrase {
        Some((p, salt, it)) => encoder::from_passphrase(p, salt, it),
        None => random32(),
    };
    let token = u.synapse.login(&u.user, "ELEMENT");
    let me = &u.user.user_id;
    let b = |k: &SigningKey| B64.encode(k.verifying_key().to_bytes());
    let canonical = |v: &Value| {
        let mut v = v.clone();
        v.as_object_mut().unwrap().remove("signatures");
        serde_json::to_string(&v).unwrap()
    };
    let obj = |usage: &str, k: &SigningKey| json!({"user_id": me, "usage": [usage], "keys": {format!("ed25519:{}", b(k)): b(k)}});
    let mut s = obj("self_signing", &ssk);
    let mut us = obj("user_signing", &usk);
    for o in [&mut s, &mut us] {
        let sig = B64.encode(msk.sign(canonical(o).as_bytes()).to_bytes());
        o["signatures"] = json!({me: {format!("ed25519:{}", b(&msk)): sig}});
    }
    let (st, v) = http(
        &u.synapse.url,
        "POST",
        "/keys/device_signing/upload",
        Some(&token),
        Some(
            json!({"master_key": obj("master", &msk), "self_signing_key": s, "user_signing_key": us}),
        ),
    );
    assert_eq!(st, 200, "{v}");
    let backup_pub =
        x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(backup)).to_bytes();
    let mut auth = json!({"public_key": B64.encode(backup_pub)});
    let sig = B64.encode(
        msk.sign(serde_json::to_string(&auth).unwrap().as_bytes())
            .to_bytes(),
    );
    auth["signatures"] = json!({me: {format!("ed25519:{}", b(&msk)): sig}});
    let (st, v) = http(
        &u.synapse.url,
        "POST",
        "/room_keys/version",
        Some(&token),
        Some(json!({"algorithm": "m.megolm_backup.v1.curve25519-aes-sha2", "auth_data": auth})),
    );
    assert_eq!(st, 200, "{v}");

    let key_id = "ELEMENTKEYID0000";
    let put = |kind: &str, content: Value| {
        let (st, v) = http(
            &u.synapse.url,
            "PUT",
            &format!("/user/{me}/account_data/{kind}"),
            Some(&token),
            Some(content),
        );
        assert_eq!(st, 200, "{v}");
    };
    put(
        &format!("m.secret_storage.key.{key_id}"),
        encoder::description(&storage_key, passphrase.map(|(_, s, i)| (s, i))),
    );
    put("m.secret_storage.default_key", json!({"key": key_id}));
    let usk_stored = usk_in_storage.unwrap_or_else(|| usk.clone());
    let secrets: [(&str, [u8; 32], bool); 4] = [
        ("m.cross_signing.master", msk.to_bytes(), true), // padded, as older Element wrote
        ("m.cross_signing.self_signing", ssk.to_bytes(), false),
        ("m.cross_signing.user_signing", usk_stored.to_bytes(), false),
        ("m.megolm_backup.v1", backup, false),
    ];
    for (name, secret, padded) in secrets {
        let text = if padded {
            STANDARD.encode(secret)
        } else {
            B64.encode(secret)
        };
        put(
            name,
            json!({"encrypted": {key_id: encoder::encrypt(&storage_key, name, text.as_bytes(), padded)}}),
        );
    }
    Existing {
        msk,
        ssk,
        usk,
        backup,
        storage_key,
        token,
    }
}

fn key_file(u: &MxhsmUser, text: &str) -> std::path::PathBuf {
    let p = u.token.dir.path().join("recovery.txt");
    std::fs::write(&p, format!("{text}\n")).unwrap();
    p
}

fn token_keys(u: &MxhsmUser) -> Vec<Value> {
    serde_json::from_str::<Value>(&ok(u.cli().args(["keys", "list", "--json"]))).unwrap()["keys"]
        .as_array()
        .unwrap()
        .clone()
}

fn import_then_sign_and_restore(kind: Kind) {
    let u = MxhsmUser::new(kind);
    let e = existing_account(&u, None, None);
    u.login();
    // A backed-up session, encrypted by "Element".
    let outbound =
        vodozemac::megolm::GroupSession::new(vodozemac::megolm::SessionConfig::version_1());
    let mut inbound = vodozemac::megolm::InboundGroupSession::new(
        &outbound.session_key(),
        vodozemac::megolm::SessionConfig::version_1(),
    );
    let session_key = inbound.export_at(0).unwrap().to_base64();
    let plain = json!({"algorithm": "m.megolm.v1.aes-sha2", "sender_key": "WimPd2udAU/1S/+YBpPbmr9L+0H5H+BnAVHSwDxlPGc",
        "session_key": session_key, "sender_claimed_keys": {}, "forwarding_curve25519_key_chain": []});
    let bpub = vodozemac::Curve25519PublicKey::from_bytes(
        x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(e.backup)).to_bytes(),
    );
    let m = vodozemac::pk_encryption::PkEncryption::from_key(bpub)
        .encrypt(plain.to_string().as_bytes())
        .unwrap();
    let (st, v) = http(
        &u.synapse.url,
        "PUT",
        "/room_keys/keys?version=1",
        Some(&e.token),
        Some(
            json!({"rooms": {"!r:localhost": {"sessions": {outbound.session_id(): {
        "first_message_index": 0, "forwarded_count": 0, "is_verified": false,
        "session_data": {"ephemeral": m.ephemeral_key.to_base64(), "ciphertext": B64.encode(&m.ciphertext), "mac": B64.encode(&m.mac)}}}}}}),
        ),
    );
    assert_eq!(st, 200, "{v}");

    let status: Value =
        serde_json::from_str(&ok(u.cli().args(["secret-storage", "status", "--json"]))).unwrap();
    assert!(
        status["secrets"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["on_server"] == true),
        "{status}"
    );

    let file = key_file(&u, &encoder::recovery_key(&e.storage_key));
    let out: Value = serde_json::from_str(&ok(u
        .cli()
        .args(["--json", "secret-storage", "import", "--key-file"])
        .arg(&file)))
    .unwrap();
    common::json_doc::check("secret-storage import", &out);
    assert_eq!(out["imported"].as_array().unwrap().len(), 4, "{out}");
    let keys = token_keys(&u);
    let pk = |role: &str| {
        keys.iter().find(|k| k["role"] == role).unwrap()["public_key"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(pk("master"), B64.encode(e.msk.verifying_key().to_bytes()));
    assert_eq!(
        pk("self_signing"),
        B64.encode(e.ssk.verifying_key().to_bytes())
    );
    assert_eq!(
        pk("user_signing"),
        B64.encode(e.usk.verifying_key().to_bytes())
    );
    assert!(keys.iter().all(|k| k["origin"] == "imported"
        && k["attributes"]["extractable"] == false
        && k["attributes"]["sensitive"] == true));
    let status: Value =
        serde_json::from_str(&ok(u.cli().args(["secret-storage", "status", "--json"]))).unwrap();
    assert!(
        status["secrets"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["matches"] == true),
        "{status}"
    );

    // The imported keys work: Synapse accepts a device signed by the SSK on the token, and
    // the backup restores through the token's ECDH.
    let session: Value =
        serde_json::from_str(&std::fs::read_to_string(u.session_path()).unwrap()).unwrap();
    let own = session["device_id"].as_str().unwrap();
    ok(u.cli().args(["sign", "devices", own, "--yes"]));
    let status = u.status(&[]);
    assert_eq!(status["identity_ok"], true, "{status}");
    assert!(
        status["devices"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["trust"] == "verified"),
        "{status}"
    );
    let out = u.token.dir.path().join("keys.json");
    ok(u.cli()
        .args(["backup", "restore", "--format", "json", "--out"])
        .arg(&out));
    let restored: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(restored.len(), 1);
    assert_eq!(restored[0]["session_key"], json!(session_key));

    // Importing again changes nothing.
    let again: Value = serde_json::from_str(&ok(u
        .cli()
        .args(["--json", "secret-storage", "import", "--key-file"])
        .arg(&file)))
    .unwrap();
    assert_eq!(again["imported"].as_array().unwrap().len(), 0);
    assert_eq!(token_keys(&u).len(), 4);
}

per_token!(import_then_sign_and_restore);

#[test]
fn a_wrong_recovery_key_or_passphrase_imports_nothing() {
    let u = MxhsmUser::new(Kind::Kryoptic);
    existing_account(&u, Some(("open sesame", "SALTSALTSALTSALT", 1000)), None);
    u.login();
    let err = fails(
        u.cli()
            .args(["secret-storage", "import", "--key-file"])
            .arg(key_file(&u, &encoder::recovery_key(&random32()))),
    );
    assert!(
        err.contains("the recovery key or passphrase is wrong")
            && err.contains("nothing was imported"),
        "{err}"
    );
    let err = fails(
        u.cli()
            .args(["secret-storage", "import", "--key-file"])
            .arg(key_file(&u, "open sesame!")),
    );
    assert!(
        err.contains("the recovery key or passphrase is wrong"),
        "{err}"
    );
    let mut typo = encoder::recovery_key(&random32()).into_bytes();
    typo[10] = if typo[10] == b'a' { b'b' } else { b'a' };
    let err = fails(
        u.cli()
            .args(["secret-storage", "import", "--key-file"])
            .arg(key_file(&u, std::str::from_utf8(&typo).unwrap())),
    );
    assert!(
        err.contains("recovery key or passphrase is wrong") || err.contains("parity"),
        "{err}"
    );
    assert!(token_keys(&u).is_empty());
    // The passphrase works, and --remove-from-server deletes the secrets after the import.
    let out = ok(u
        .cli()
        .args([
            "secret-storage",
            "import",
            "--remove-from-server",
            "--key-file",
        ])
        .arg(key_file(&u, "open sesame")));
    assert!(out.contains("imported 4 key(s)"), "{out}");
    assert_eq!(token_keys(&u).len(), 4);
    let status: Value =
        serde_json::from_str(&ok(u.cli().args(["secret-storage", "status", "--json"]))).unwrap();
    assert!(
        status["secrets"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["on_server"] == false),
        "{status}"
    );
}

#[test]
fn a_secret_that_does_not_match_the_published_identity_is_refused() {
    let u = MxhsmUser::new(Kind::SoftHsm);
    let e = existing_account(&u, None, Some(SigningKey::from_bytes(&random32())));
    u.login();
    let err = fails(
        u.cli()
            .args(["secret-storage", "import", "--key-file"])
            .arg(key_file(&u, &encoder::recovery_key(&e.storage_key))),
    );
    assert!(
        err.contains(
            "refused, nothing imported: the m.cross_signing.user_signing secret's public key"
        ),
        "{err}"
    );
    assert!(token_keys(&u).is_empty(), "nothing imported");
}

/// Secret storage whose key backup was deleted: the backup key is skipped (there is nothing
/// to check it against) and the three cross-signing keys are imported. A later run with
/// --remove-from-server removes the secrets whose keys the token already holds, and leaves
/// the backup key where it is.
#[test]
fn without_a_backup_the_backup_key_waits_and_held_keys_are_removed_later() {
    let u = MxhsmUser::new(Kind::SoftHsm);
    let e = existing_account(&u, None, None);
    let (st, v) = http(
        &u.synapse.url,
        "GET",
        "/room_keys/version",
        Some(&e.token),
        None,
    );
    assert_eq!(st, 200, "{v}");
    let version = v["version"].as_str().unwrap().to_string();
    let (st, v) = http(
        &u.synapse.url,
        "DELETE",
        &format!("/room_keys/version/{version}"),
        Some(&e.token),
        None,
    );
    assert_eq!(st, 200, "{v}");
    u.login();
    let key = key_file(&u, &encoder::recovery_key(&e.storage_key));
    let (code, out, err) = common::run(
        u.cli()
            .args(["secret-storage", "import", "--key-file"])
            .arg(&key),
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        err.contains("m.megolm_backup.v1: skipped (the server has no key backup"),
        "{err}"
    );
    assert!(out.contains("imported 3 key(s)"), "{out}");
    let roles: Vec<Value> = token_keys(&u).iter().map(|k| k["role"].clone()).collect();
    assert_eq!(roles.len(), 3, "{roles:?}");
    assert!(!roles.contains(&json!("backup")), "{roles:?}");

    let (code, out, err) = common::run(
        u.cli()
            .args([
                "secret-storage",
                "import",
                "--remove-from-server",
                "--key-file",
            ])
            .arg(&key),
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        err.contains("removed m.cross_signing.master, m.cross_signing.self_signing, m.cross_signing.user_signing from the server"),
        "{err}"
    );
    let status: Value =
        serde_json::from_str(&ok(u.cli().args(["secret-storage", "status", "--json"]))).unwrap();
    let on_server: Vec<(String, bool)> = status["secrets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["secret"].as_str().unwrap().to_string(),
                s["on_server"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        on_server,
        vec![
            ("m.cross_signing.master".into(), false),
            ("m.cross_signing.self_signing".into(), false),
            ("m.cross_signing.user_signing".into(), false),
            ("m.megolm_backup.v1".into(), true),
        ]
    );
    // The token's keys still sign for the identity the server publishes.
    assert_eq!(u.status(&[])["identity_ok"], true);
}
