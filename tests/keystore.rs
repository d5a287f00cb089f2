//! Every KeyStore operation on SoftHSM and on Kryoptic, each result checked by an
//! independent implementation (ed25519-dalek, x25519-dalek) or a published vector.

mod common;

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD as B64;
use common::{Kind, TestToken, fixed_pin};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use mxhsm::token::pkcs11::{Pkcs11Store, Pkcs11Uri};
use mxhsm::token::{
    Curve25519PublicKey, KeyAlgorithm, KeyOptions, KeyOrigin, KeyRole, KeyStore, PublicKey,
    SecretKeyBytes, TokenError, X25519Mechanism,
};

fn curve(secret: &StaticSecret) -> Curve25519PublicKey {
    Curve25519PublicKey::from_bytes(XPublic::from(secret).to_bytes())
}
use x25519_dalek::{PublicKey as XPublic, StaticSecret};

const ALICE: &str = "@alice:localhost";

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn b64(s: &str) -> Vec<u8> {
    B64.decode(s.trim_end_matches('=')).unwrap()
}

fn random32() -> [u8; 32] {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).unwrap();
    b
}

fn verify(public: &PublicKey, msg: &[u8], sig: &[u8; 64]) {
    VerifyingKey::from_bytes(public.as_bytes())
        .unwrap()
        .verify_strict(msg, &Signature::from_bytes(sig))
        .unwrap_or_else(|_| panic!("signature over {} bytes does not verify", msg.len()));
}

fn generate_all_roles_sign_and_agree(kind: Kind) {
    let t = TestToken::new(kind);
    let store = t.open();
    let mut keys = Vec::new();
    for role in KeyRole::ALL {
        keys.push(store.generate(ALICE, role, &KeyOptions::default()).unwrap());
    }
    let listed = store.list_keys(Some(ALICE)).unwrap();
    assert_eq!(listed, keys, "list returns exactly the generated keys");
    for k in &listed {
        assert_eq!(k.user_id, ALICE);
        assert_eq!(k.origin, KeyOrigin::Generated);
        let p = k.protection;
        assert_eq!(p.token, Some(true));
        assert_eq!(p.private, Some(true));
        assert_eq!(p.sensitive, Some(true));
        assert_eq!(p.extractable, Some(false));
        assert_eq!(p.never_extractable, Some(true));
        assert_eq!(p.always_sensitive, Some(true));
        assert_eq!(p.local, Some(true));
        assert!(
            p.problems(k.algorithm()).is_empty(),
            "{:?}",
            p.problems(k.algorithm())
        );
    }
    for k in listed
        .iter()
        .filter(|k| k.algorithm() == KeyAlgorithm::Ed25519)
    {
        for len in [0usize, 1, 32, 255, 256, 1014, 1015, 4096, 65536] {
            let msg: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let sig = store.sign_ed25519(k, &msg).unwrap();
            verify(&k.public_key, &msg, &sig);
        }
        // A different message must not verify under the same signature.
        let sig = store.sign_ed25519(k, b"one").unwrap();
        assert!(
            VerifyingKey::from_bytes(k.public_key.as_bytes())
                .unwrap()
                .verify_strict(b"two", &Signature::from_bytes(&sig))
                .is_err()
        );
    }
    let backup = store.find_key(ALICE, KeyRole::Backup).unwrap();
    let expected_mechanism = match kind {
        Kind::SoftHsm => X25519Mechanism::SoftHsmEdwards,
        _ => X25519Mechanism::Montgomery,
    };
    assert_eq!(backup.x25519_mechanism(), Some(expected_mechanism));
    for _ in 0..20 {
        let peer = StaticSecret::from(random32());
        let on_token = store.x25519(&backup, &curve(&peer)).unwrap();
        let soft = peer.diffie_hellman(&XPublic::from(*backup.public_key.as_bytes()));
        assert_eq!(on_token.expose(), soft.as_bytes());
    }
    // Wrong-algorithm requests are refused before reaching the token.
    assert!(matches!(
        store.sign_ed25519(&backup, b"x"),
        Err(TokenError::WrongAlgorithm {
            role: KeyRole::Backup,
            ..
        })
    ));
    assert!(matches!(
        store.x25519(&listed[0], &Curve25519PublicKey::from_bytes([9u8; 32])),
        Err(TokenError::WrongAlgorithm { .. })
    ));
}

/// The js-sdk's Alice master key seed, imported, reproduces the published SSK signature
/// byte for byte, and ed25519-dalek's signature with the same seed
/// (docs/vectors.md).
fn imported_seed_signs_like_dalek_and_js_sdk(kind: Kind) {
    let t = TestToken::new(kind);
    let store = t.open();
    let seed = b64("ZG95b3VzcGVha3doYWFhYWFhYWFhYWFhYWFhYWFhbGU");
    let dalek = SigningKey::from_bytes(&seed.clone().try_into().unwrap());
    let key = store
        .import(
            ALICE,
            KeyRole::Master,
            SecretKeyBytes::from_slice(&seed).unwrap(),
            &KeyOptions::default(),
        )
        .unwrap();
    assert_eq!(
        key.public_key_base64(),
        "J+5An10v1vzZpAXTYFokD1/PEVccFnLC61EfRXit0UY"
    );
    assert_eq!(key.origin, KeyOrigin::Imported);
    assert_eq!(key.protection.sensitive, Some(true));
    assert_eq!(key.protection.extractable, Some(false));
    let ssk = br#"{"keys":{"ed25519:aU2+2CyXQTCuDcmWW0EL2bhJ6PdjFW2LbAsbHqf02AY":"aU2+2CyXQTCuDcmWW0EL2bhJ6PdjFW2LbAsbHqf02AY"},"usage":["self_signing"],"user_id":"@alice:localhost"}"#;
    let sig = store.sign_ed25519(&key, ssk).unwrap();
    assert_eq!(
        B64.encode(sig),
        "XfhYEhZmOs8BJdb3viatILBZ/bElsHXEW28V4tIaY5CxrBR0YOym3yZHWmRmypXessHZAKOhZn3yBMXzdajyCw"
    );
    for len in [0usize, 100, 65536] {
        let msg = vec![0x5a; len];
        assert_eq!(
            store.sign_ed25519(&key, &msg).unwrap(),
            dalek.sign(&msg).to_bytes(),
            "{len}-byte message"
        );
    }
}

/// RFC 7748 §6.1: Alice's private key imported as the backup key, Bob's public key.
fn imported_x25519_matches_rfc7748(kind: Kind) {
    let t = TestToken::new(kind);
    let store = t.open();
    let alice = hex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
    let key = store
        .import(
            ALICE,
            KeyRole::Backup,
            SecretKeyBytes::from_slice(&alice).unwrap(),
            &KeyOptions::default(),
        )
        .unwrap();
    assert_eq!(
        key.public_key.as_bytes().to_vec(),
        hex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
    );
    // The js-sdk test data's backup public key is this same key (matrix-crypto.md §2.3a).
    assert_eq!(
        key.public_key_base64(),
        "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo"
    );
    let bob = Curve25519PublicKey::from_bytes(
        hex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
            .try_into()
            .unwrap(),
    );
    let shared = store.x25519(&key, &bob).unwrap();
    assert_eq!(
        shared.expose().to_vec(),
        hex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
    );
}

/// Small-order peer keys give an all-zero secret, which is refused (vodozemac does the same).
fn small_order_peer_is_refused(kind: Kind) {
    let t = TestToken::new(kind);
    let store = t.open();
    let key = store
        .generate(ALICE, KeyRole::Backup, &KeyOptions::default())
        .unwrap();
    let mut one = [0u8; 32];
    one[0] = 1;
    for peer in [[0u8; 32], one] {
        let peer_key = Curve25519PublicKey::from_bytes(peer);
        assert!(store.x25519(&key, &peer_key).is_err(), "peer {peer:?}");
    }
    // The key still works afterwards.
    let peer = StaticSecret::from(random32());
    let s = store.x25519(&key, &curve(&peer)).unwrap();
    assert_eq!(
        s.expose(),
        peer.diffie_hellman(&XPublic::from(*key.public_key.as_bytes()))
            .as_bytes()
    );
}

fn generations_coexist_and_newest_is_current(kind: Kind) {
    let t = TestToken::new(kind);
    let store = t.open();
    let old = store
        .generate(ALICE, KeyRole::Master, &KeyOptions::default())
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(5));
    let new = store
        .generate(ALICE, KeyRole::Master, &KeyOptions::default())
        .unwrap();
    assert_ne!(old.public_key, new.public_key);
    assert_eq!(
        store.list_keys(Some(ALICE)).unwrap(),
        vec![old.clone(), new.clone()]
    );
    assert_eq!(store.find_key(ALICE, KeyRole::Master).unwrap(), new);
    // Both generations still sign.
    for k in [&old, &new] {
        let sig = store.sign_ed25519(k, b"gen").unwrap();
        verify(&k.public_key, b"gen", &sig);
    }
    store.delete(&new).unwrap();
    assert_eq!(store.find_key(ALICE, KeyRole::Master).unwrap(), old);
    // The deleted key is gone for good: using it is a clear error.
    assert!(matches!(
        store.sign_ed25519(&new, b"x"),
        Err(TokenError::KeyNotFound { .. })
    ));
}

fn many_users_share_one_token(kind: Kind) {
    let t = TestToken::new(kind);
    let store = t.open();
    let users: Vec<String> = (0..5).map(|i| format!("@user{i}:example.org")).collect();
    for u in &users {
        store
            .generate(u, KeyRole::Master, &KeyOptions::default())
            .unwrap();
        store
            .generate(u, KeyRole::SelfSigning, &KeyOptions::default())
            .unwrap();
    }
    assert_eq!(store.list_keys(None).unwrap().len(), 10);
    for u in &users {
        let keys = store.list_keys(Some(u)).unwrap();
        assert_eq!(keys.len(), 2);
        assert!(keys.iter().all(|k| &k.user_id == u));
        assert!(matches!(
            store.find_key(u, KeyRole::Backup),
            Err(TokenError::KeyNotFound { .. })
        ));
    }
    // Threads signing with different users' keys at once, over a pool of sessions.
    std::thread::scope(|s| {
        for u in &users {
            let store = &store;
            s.spawn(move || {
                let k = store.find_key(u, KeyRole::SelfSigning).unwrap();
                for i in 0..20 {
                    let msg = format!("{u} {i}");
                    verify(
                        &k.public_key,
                        msg.as_bytes(),
                        &store.sign_ed25519(&k, msg.as_bytes()).unwrap(),
                    );
                }
            });
        }
    });
}

fn deleting_a_missing_key_changes_nothing(kind: Kind) {
    let t = TestToken::new(kind);
    let store = t.open();
    let kept = store
        .generate(ALICE, KeyRole::Master, &KeyOptions::default())
        .unwrap();
    let err = store.find_key(ALICE, KeyRole::UserSigning).unwrap_err();
    assert!(
        matches!(
            &err,
            TokenError::KeyNotFound {
                role: KeyRole::UserSigning,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("no user_signing key for @alice:localhost on token \"mxhsm-test\""),
        "{err}"
    );
    store.delete(&kept).unwrap();
    let again = store.delete(&kept).unwrap_err();
    assert!(matches!(again, TokenError::KeyNotFound { .. }), "{again:?}");
    assert!(store.list_keys(None).unwrap().is_empty());
}

fn bad_user_ids_and_key_sizes_are_refused(kind: Kind) {
    let t = TestToken::new(kind);
    let store = t.open();
    for bad in ["alice", "@alice", "@:x", "@a b:x", ""] {
        let e = store
            .generate(bad, KeyRole::Master, &KeyOptions::default())
            .unwrap_err();
        assert!(matches!(e, TokenError::BadUserId(_)), "{e}");
        assert!(e.to_string().contains("is not a Matrix user ID"), "{e}");
    }
    let e = SecretKeyBytes::from_slice(&[1u8; 31]).unwrap_err();
    assert!(matches!(e, TokenError::BadPrivateKey(_)), "{e}");
    assert!(e.to_string().contains("32 bytes, this one is 31"), "{e}");
    assert!(store.list_keys(None).unwrap().is_empty());
}

fn wrong_pin_is_sent_once_and_names_the_token(kind: Kind) {
    let t = TestToken::with_label(kind, "pin-test");
    let pins = fixed_pin("000000");
    let err = Pkcs11Store::open(&t.parsed_uri(), &pins).unwrap_err();
    assert!(matches!(err, TokenError::WrongPin { .. }), "{err:?}");
    assert!(
        err.to_string()
            .starts_with("wrong PIN for token \"pin-test\""),
        "{err}"
    );
    assert_eq!(pins.asked.load(std::sync::atomic::Ordering::SeqCst), 1);
    // The right PIN still works (nothing was locked by a retry loop).
    t.open();
}

/// Every private key may do exactly what its role needs: read back with cryptoki directly
/// (not through mxhsm), generated and imported keys alike have CKA_SIGN or CKA_DERIVE and
/// nothing else, and can be neither modified nor copied.
fn key_templates_are_explicit(kind: Kind) {
    use cryptoki::object::{Attribute, AttributeType, ObjectClass};
    let t = TestToken::new(kind);
    let store = t.open();
    let seed = SecretKeyBytes::new([42u8; 32]);
    for role in KeyRole::ALL {
        store.generate(ALICE, role, &KeyOptions::default()).unwrap();
    }
    store
        .import(
            "@bob:localhost",
            KeyRole::Master,
            seed.clone(),
            &KeyOptions::default(),
        )
        .unwrap();
    store
        .import(
            "@bob:localhost",
            KeyRole::Backup,
            seed,
            &KeyOptions::default(),
        )
        .unwrap();
    drop(store);
    let session = t.raw_session();
    let keys = session
        .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
        .unwrap();
    assert_eq!(keys.len(), KeyRole::ALL.len() + 2);
    for h in keys {
        let attrs = session
            .get_attributes(
                h,
                &[
                    AttributeType::Label,
                    AttributeType::Sign,
                    AttributeType::Derive,
                    AttributeType::Decrypt,
                    AttributeType::Unwrap,
                    AttributeType::SignRecover,
                    AttributeType::Modifiable,
                    AttributeType::Copyable,
                ],
            )
            .unwrap();
        let label = attrs
            .iter()
            .find_map(|a| match a {
                Attribute::Label(l) => Some(String::from_utf8_lossy(l).into_owned()),
                _ => None,
            })
            .unwrap();
        let backup = label.starts_with("mxhsm:backup:");
        for a in &attrs {
            let (name, value, want) = match a {
                Attribute::Sign(v) => ("CKA_SIGN", *v, !backup),
                Attribute::Derive(v) => ("CKA_DERIVE", *v, backup),
                Attribute::Decrypt(v) => ("CKA_DECRYPT", *v, false),
                Attribute::Unwrap(v) => ("CKA_UNWRAP", *v, false),
                Attribute::SignRecover(v) => ("CKA_SIGN_RECOVER", *v, false),
                Attribute::Modifiable(v) => ("CKA_MODIFIABLE", *v, false),
                Attribute::Copyable(v) => ("CKA_COPYABLE", *v, false),
                _ => continue,
            };
            assert_eq!(value, want, "{name} of {label} on {kind:?}");
        }
        // All seven usage attributes were reported (both tokens know them).
        assert_eq!(attrs.len(), 8, "{label}: {attrs:?}");
    }
}

/// Raw cryptoki helpers for the index tests: objects as mxhsm made them before keys had a
/// subject, and the index marker.
mod raw {
    use cryptoki::mechanism::Mechanism;
    use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
    use cryptoki::session::Session;
    use mxhsm::token::KeyRole;
    use mxhsm::token::pkcs11::{ec, key_label};

    /// An Ed25519 pair with an mxhsm label and ID and no `CKA_SUBJECT`.
    pub fn legacy_pair(session: &Session, user: &str, role: KeyRole) {
        let mut id = b"mx\x01".to_vec();
        id.extend_from_slice(&1_700_000_000_000u64.to_be_bytes());
        id.extend_from_slice(&[1, 2, 3, 4]);
        let label = key_label(user, role).into_bytes();
        let common = [
            Attribute::Token(true),
            Attribute::Label(label),
            Attribute::Id(id),
        ];
        let mut public = vec![
            Attribute::Private(false),
            Attribute::EcParams(ec::OID_ED25519.to_vec()),
            Attribute::Verify(true),
        ];
        public.extend(common.clone());
        let mut private = vec![
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Sign(true),
        ];
        private.extend(common);
        session
            .generate_key_pair(&Mechanism::EccEdwardsKeyPairGen, &public, &private)
            .unwrap();
    }

    pub fn markers(session: &Session) -> Vec<ObjectHandle> {
        session
            .find_objects(&[
                Attribute::Class(ObjectClass::DATA),
                Attribute::Label(b"mxhsm:index".to_vec()),
            ])
            .unwrap()
    }

    /// The `CKA_SUBJECT` of every object labelled for `user`, by class.
    pub fn subjects(session: &Session, user: &str) -> Vec<(ObjectClass, Vec<u8>)> {
        let mut out = Vec::new();
        for role in KeyRole::ALL {
            let label = key_label(user, role).into_bytes();
            for h in session.find_objects(&[Attribute::Label(label)]).unwrap() {
                let (mut class, mut subject) = (None, Vec::new());
                for a in session
                    .get_attributes(h, &[AttributeType::Class, AttributeType::Subject])
                    .unwrap()
                {
                    match a {
                        Attribute::Class(c) => class = Some(c),
                        Attribute::Subject(v) => subject = v,
                        _ => {}
                    }
                }
                out.push((class.unwrap(), subject));
            }
        }
        out
    }
}

/// On a new token, the first key makes the index marker, and both halves of every key
/// (generated or imported) carry the owner's subject, so a lookup is one search by subject.
/// Another application's object with the same subject is not taken for a key.
fn users_are_found_by_subject_on_a_new_token(kind: Kind) {
    let t = TestToken::new(kind);
    let store = t.open();
    store
        .generate(ALICE, KeyRole::Master, &KeyOptions::default())
        .unwrap();
    store
        .import(
            ALICE,
            KeyRole::Backup,
            SecretKeyBytes::new(random32()),
            &KeyOptions::default(),
        )
        .unwrap();
    store
        .generate("@bob:localhost", KeyRole::Master, &KeyOptions::default())
        .unwrap();
    drop(store);
    let session = t.raw_session();
    assert_eq!(
        raw::markers(&session).len(),
        1,
        "one index marker on {kind:?}"
    );
    let subjects = raw::subjects(&session, ALICE);
    assert_eq!(subjects.len(), 4, "{subjects:?}");
    let alice = &subjects[0].1;
    assert!(
        alice.starts_with(&[0x30]) && alice.ends_with(ALICE.as_bytes()),
        "{alice:?}"
    );
    assert!(subjects.iter().all(|(_, s)| s == alice), "{subjects:?}");
    let bob = raw::subjects(&session, "@bob:localhost");
    assert!(
        bob.iter().all(|(_, s)| s.ends_with(b"@bob:localhost")),
        "{bob:?}"
    );
    // A foreign data object with Alice's subject (data objects have none, so a public key
    // under another label): found by the search, never listed as hers.
    {
        use cryptoki::mechanism::Mechanism;
        use cryptoki::object::Attribute;
        let public = [
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::EcParams(mxhsm::token::pkcs11::ec::OID_ED25519.to_vec()),
            Attribute::Label(b"other-app key".to_vec()),
            Attribute::Subject(alice.clone()),
        ];
        let private = [Attribute::Token(true), Attribute::Subject(alice.clone())];
        session
            .generate_key_pair(&Mechanism::EccEdwardsKeyPairGen, &public, &private)
            .unwrap();
    }
    drop(session);
    let store = t.open();
    let keys = store.list_keys(Some(ALICE)).unwrap();
    let roles: Vec<KeyRole> = keys.iter().map(|k| k.role).collect();
    assert_eq!(roles, [KeyRole::Master, KeyRole::Backup], "{keys:?}");
    assert_eq!(store.list_keys(Some("@bob:localhost")).unwrap().len(), 1);
    assert_eq!(store.list_keys(None).unwrap().len(), 3);
}

/// A token holding keys made before subjects (no `CKA_SUBJECT`) gets no marker: every
/// lookup searches by label, so the old keys are still found, new keys beside them too.
fn tokens_with_keys_without_a_subject_are_searched_by_label(kind: Kind) {
    let t = TestToken::new(kind);
    let old = "@old:localhost";
    {
        let session = t.raw_session();
        raw::legacy_pair(&session, old, KeyRole::Master);
        raw::legacy_pair(&session, ALICE, KeyRole::SelfSigning);
    }
    for _ in 0..2 {
        let store = t.open();
        store
            .generate(ALICE, KeyRole::Master, &KeyOptions::default())
            .unwrap();
        drop(store);
        assert!(
            raw::markers(&t.raw_session()).is_empty(),
            "no marker on {kind:?}"
        );
    }
    let store = t.open();
    let keys = store.list_keys(Some(ALICE)).unwrap();
    let roles: Vec<KeyRole> = keys.iter().map(|k| k.role).collect();
    assert_eq!(
        roles,
        [KeyRole::Master, KeyRole::Master, KeyRole::SelfSigning],
        "{keys:?}"
    );
    let old_keys = store.list_keys(Some(old)).unwrap();
    assert_eq!(old_keys.len(), 1, "{old_keys:?}");
    let k = store.find_key(old, KeyRole::Master).unwrap();
    verify(
        &k.public_key,
        b"still works",
        &store.sign_ed25519(&k, b"still works").unwrap(),
    );
}

/// A key without a subject on an indexed token (made by an older mxhsm or another tool)
/// ends the index: a user found by nothing but such keys is looked up by label before being
/// called keyless, and a listing of all keys that reads one removes the marker too. From
/// then on every lookup searches by label and finds everything.
fn a_key_without_a_subject_ends_the_index(kind: Kind) {
    let t = TestToken::new(kind);
    let late = "@late:localhost";
    let store = t.open();
    store
        .generate(ALICE, KeyRole::Master, &KeyOptions::default())
        .unwrap();
    drop(store);
    assert_eq!(raw::markers(&t.raw_session()).len(), 1);
    raw::legacy_pair(&t.raw_session(), late, KeyRole::Master);
    let store = t.open();
    let found = store.list_keys(Some(late)).unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    drop(store);
    assert!(raw::markers(&t.raw_session()).is_empty(), "{kind:?}");

    // Another token: Alice has a key by subject, and one without (a rotation by an older
    // version): her lookup by subject misses it, until a listing of all keys sees it.
    let t = TestToken::new(kind);
    let store = t.open();
    store
        .generate(ALICE, KeyRole::Master, &KeyOptions::default())
        .unwrap();
    drop(store);
    raw::legacy_pair(&t.raw_session(), ALICE, KeyRole::UserSigning);
    let store = t.open();
    assert_eq!(store.list_keys(Some(ALICE)).unwrap().len(), 1);
    assert_eq!(store.list_keys(None).unwrap().len(), 2);
    drop(store);
    assert!(raw::markers(&t.raw_session()).is_empty(), "{kind:?}");
    let store = t.open();
    let roles: Vec<KeyRole> = store
        .list_keys(Some(ALICE))
        .unwrap()
        .iter()
        .map(|k| k.role)
        .collect();
    assert_eq!(roles, [KeyRole::Master, KeyRole::UserSigning]);
}

per_pkcs11_token!(
    key_templates_are_explicit,
    users_are_found_by_subject_on_a_new_token,
    a_key_without_a_subject_ends_the_index,
    tokens_with_keys_without_a_subject_are_searched_by_label,
    generate_all_roles_sign_and_agree,
    imported_seed_signs_like_dalek_and_js_sdk,
    imported_x25519_matches_rfc7748,
    small_order_peer_is_refused,
    generations_coexist_and_newest_is_current,
    many_users_share_one_token,
    deleting_a_missing_key_changes_nothing,
    bad_user_ids_and_key_sizes_are_refused,
    wrong_pin_is_sent_once_and_names_the_token,
);

#[test]
fn token_without_x25519_says_so_and_keeps_ed25519() {
    let t = TestToken::new(Kind::KryopticNoX25519);
    let store = t.open();
    assert!(store.capabilities().ed25519);
    assert_eq!(store.capabilities().x25519, None);
    let err = store
        .generate(ALICE, KeyRole::Backup, &KeyOptions::default())
        .unwrap_err();
    assert!(matches!(err, TokenError::Unsupported { .. }), "{err:?}");
    assert!(err.to_string().contains("cannot do X25519"), "{err}");
    let err = store
        .import(
            ALICE,
            KeyRole::Backup,
            SecretKeyBytes::new(random32()),
            &KeyOptions::default(),
        )
        .unwrap_err();
    assert!(matches!(err, TokenError::Unsupported { .. }), "{err:?}");
    assert!(
        store.list_keys(None).unwrap().is_empty(),
        "nothing was created"
    );
    let k = store
        .generate(ALICE, KeyRole::Master, &KeyOptions::default())
        .unwrap();
    verify(
        &k.public_key,
        b"still signs",
        &store.sign_ed25519(&k, b"still signs").unwrap(),
    );
}

#[test]
fn missing_module_and_unmatched_uri_are_clear_and_ask_no_pin() {
    let pins = fixed_pin(common::USER_PIN);
    let uri = Pkcs11Uri::parse("pkcs11:token=x?module-path=/nonexistent/libnothing.so").unwrap();
    let err = Pkcs11Store::open(&uri, &pins).unwrap_err();
    assert!(matches!(err, TokenError::ModuleNotFound { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("/nonexistent/libnothing.so does not exist")
    );

    let t = TestToken::with_label(Kind::SoftHsm, "present");
    let uri = Pkcs11Uri::parse(&format!(
        "pkcs11:token=absent?module-path={}",
        t.module.display()
    ))
    .unwrap();
    let err = Pkcs11Store::open(&uri, &pins).unwrap_err();
    assert!(matches!(err, TokenError::NoMatchingToken { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("no token matches pkcs11:token=absent"),
        "{msg}"
    );
    assert!(
        msg.contains("\"present\""),
        "lists the tokens present: {msg}"
    );
    assert_eq!(
        pins.asked.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "no PIN is asked for when no token matches"
    );
}

/// The js-sdk's Alice seeds imported on the token: mxhsm's signed JSON reproduces the
/// published signatures byte for byte (docs/vectors.md).
fn published_cross_signing_signatures_from_the_token(kind: Kind) {
    use mxhsm::matrix::cross_signing::{identity_objects, key_object};
    use mxhsm::matrix::signed_json::{sign_json, signature};
    use mxhsm::token::TokenSigner;
    let t = TestToken::new(kind);
    let store = t.open();
    let import = |role, seed: &[u8]| {
        store
            .import(
                ALICE,
                role,
                SecretKeyBytes::from_slice(seed).unwrap(),
                &KeyOptions::default(),
            )
            .unwrap()
    };
    let msk = TokenSigner::new(
        &store,
        import(KeyRole::Master, b"doyouspeakwhaaaaaaaaaaaaaaaaaale"),
    )
    .unwrap();
    let ssk = TokenSigner::new(
        &store,
        import(KeyRole::SelfSigning, b"selfselfselfselfselfselfselfself"),
    )
    .unwrap();
    let usk = import(KeyRole::UserSigning, b"useruseruseruseruseruseruseruser");
    assert_eq!(
        usk.public_key_base64(),
        "g5TC/zjQXyZYuDLZv7a41z5fFVrXpYPypG//AFQj8hY"
    );
    let [master, ssk_obj, usk_obj] = identity_objects(
        ALICE,
        &msk,
        &ssk.key().ed25519().unwrap(),
        &usk.ed25519().unwrap(),
    )
    .unwrap();
    let msk_id = "ed25519:J+5An10v1vzZpAXTYFokD1/PEVccFnLC61EfRXit0UY";
    assert_eq!(
        signature(&ssk_obj, ALICE, msk_id),
        Some(
            "XfhYEhZmOs8BJdb3viatILBZ/bElsHXEW28V4tIaY5CxrBR0YOym3yZHWmRmypXessHZAKOhZn3yBMXzdajyCw"
        )
    );
    assert_eq!(
        signature(&usk_obj, ALICE, msk_id),
        Some(
            "6AkD1XM2H0/ebgP9oBdMKNeft7uxsrb0XN1CsjjHgeZCvCTMmv3BHlLiT/Hzy4fe8H+S1tr484dcXN/PIdnfDA"
        )
    );
    // The master key's self-signature and the SSK's signature over the test device (both
    // self-computed in the reference from the spec).
    let mut m = master.clone();
    sign_json(&mut m, ALICE, msk_id, &msk).unwrap();
    assert_eq!(
        signature(&m, ALICE, msk_id),
        Some(
            "CZc7CJ27F7N6m+f9++jEsJsQMHBGtgKQx4WVQjgPP4gZxzpBJf0mGtU1EoGKLublmCUM19FMm1jDLFNBwP2SCw"
        )
    );
    let mut device: serde_json::Value = serde_json::from_str(r#"{"algorithms":["m.olm.v1.curve25519-aes-sha2","m.megolm.v1.aes-sha2"],"device_id":"test_device","keys":{"curve25519:test_device":"F4uCNNlcbRvc7CfBz95ZGWBvY1ALniG1J8+6rhVoKS0","ed25519:test_device":"YI/7vbGVLpGdYtuceQR8MSsKB/QjgfMXM1xqnn+0NWU"},"user_id":"@alice:localhost"}"#).unwrap();
    let ssk_id = "ed25519:aU2+2CyXQTCuDcmWW0EL2bhJ6PdjFW2LbAsbHqf02AY";
    sign_json(&mut device, ALICE, ssk_id, &ssk).unwrap();
    assert_eq!(
        signature(&device, ALICE, ssk_id),
        Some(
            "2RaoPmX3d4gKgmqIJSR827r1A+k5G2XE4i7LLX0Jcdo2SJ/+5K3W/7khIkHGSdZbnSnH7OMKCWXjEBxFcbpGCw"
        )
    );
    assert_eq!(
        key_object(ALICE, KeyRole::Master, &msk.key().ed25519().unwrap()),
        master
    );
}

mod published_vectors {
    #[test]
    fn softhsm() {
        super::published_cross_signing_signatures_from_the_token(super::Kind::SoftHsm)
    }
    #[test]
    fn kryoptic() {
        super::published_cross_signing_signatures_from_the_token(super::Kind::Kryoptic)
    }
}

/// The three published key-backup vectors (matrix-crypto.md §2.3), each backup key imported
/// on the token, decrypted through the token's ECDH.
fn backup_vectors_decrypt_through_the_token(kind: Kind) {
    use mxhsm::matrix::backup::{EncryptedSessionData, decrypt};
    use mxhsm::token::TokenAgreement;
    let t = TestToken::new(kind);
    let store = t.open();
    let vectors = [
        (
            "@js:localhost",
            "dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=",
            "q+P1WdRtEiPIEtNuuGrRcueZxUbLnSKdsuTAkxewXgU",
            "r6HRk2/Im2yJe5cLP8R81aVjFWjYWPHpw7TVxphiSK1cdIDZTTK57r6MfU+0i/mTPn+/PosT74OvYwCnehy2dyqqks+Ev+uBKw3TAo0HCv7W3Rmq9XtqxikG9ts7XtcjFEkx37+qRaXtikcu0+CmUf+I5X6KStwNXb+CPnN2CGgwpn8g5+xEgSjE904QFrte4s9ygfqymgszgF7kzNICYF5g2GTlss8pdu/GLnh52AKvtT6FcqE5LC74N07BDWUycMHMMMw43F7z5GhzEnoWOXlbz+M4eTGrCYuhvcmQGNbdgzYqEXPm1z4xFhVgs84kFCtNeUc+AHZWfC2zynZ++4tpmfCYYpYEfYwQNo9Ks7o+Mh2PtAo9/GIU4xAK/uG0vizEiNYt/1QAxwgrmDxjdRe5TH4pPUtLMktRDyZKeUHJmYZA7pcLtpVatXhXmVEQLFLDc/uusxaBxFXYkx7BQnNRoa1BE1yXRxud94s6vMsI/auhn95TG58Z0Rz9psRT4HzgDKeHf/uVbdfKR9O3gqxlB4mzZAyTCqHhUQERmGiISC2FeuKkAwVk/ZxXiFqSTUCizwXcczGbzEbC+pBJTi6jX5Pa2yI9cT5C8xaGGUzEaKdNWukcs73uvXoFl/5y0Y29PkfE8UlPWpN4kZn7hrcOllcqqV9ZMH+rBbGViIw0yZ6yQUciEJzO8Gk3yz36lIT30VhCgKXMu+kELEPTRSVXqEQkCXBcfNOhgl3LIso",
            "OibmACbORhI",
            "WimPd2udAU/1S/+YBpPbmr9L+0H5H+BnAVHSwDxlPGc",
        ),
        (
            "@rust:localhost",
            "Ha9cklU/9NqFo9WKdVfGzmqUL/9wlkdxfEitbSIPVXw",
            "HlLi76oV6wxHz3PCqE/bxJi6yF1HnYz5Dq3T+d/KpRw",
            "MuM8E3Yc6TSAvhVGb77rQ++jE6p9dRepx63/3YPD2wACKAppkZHeFrnTH6wJ/HSyrmzo7HfwqVl6tKNpfooSTHqUf6x1LHz+h4B/Id5ITO1WYt16AaI40LOnZqTkJZCfSPuE2oxalwEHnCS3biWybutcnrBFPR3LMtaeHvvkb+k3ny9l5ZpsU9G7vCm3XoeYkWfLekWXvDhbqWrylXD0+CNUuaQJ/S527TzLd4XKctqVjjO/cCH7q+9utt9WJAfK8LGaWT/mZ3AeWjf5kiqOpKKf5Cn4n5SSil5p/pvGYmjnURvZSEeQIzHgvunIBEPtzK/MYEPOXe/P5achNGlCx+5N19Ftyp9TFaTFlTWCTi0mpD7ePfCNISrwpozAz9HZc0OhA8+1aSc7rhYFIeAYXFU326NuFIFHI5pvpSxjzPQlOA+mavIKmiRAtjlLw11IVKTxgrdT4N8lXeMr4ndCSmvIkAzFMo1uZA4fzjiAdQJE4/2WeXFNNpvdfoYmX8Zl9CAYjpSO5HvpwkAbk4/iLEH3hDfCVUwDfMh05PdGLnxeRpiEFWSMSsJNp+OWAA+5JsF41BoRGrxoXXT+VKqlUDONd+O296Psu8Q+d8/S618",
            "GtMrurhDTwo",
            "wREG/hBdSspoqM9xPCEXd/4YwjpBFXlsobRkyDTo/Q8",
        ),
        (
            "@mautrix:localhost",
            "ReSMMZeRtDSdrwXzu2OvN0B73KUXkYPt3kaYfFIkw10",
            "o43y/Mck1DExWdHr0+qbPJbjzO97+RH1mw6phLhYQj0",
            "hDCjEbyi2uMXt3RBWe9mRdeqhcoraPR84/cq5ll16LIIIICJ8ZLmiWG5IwmGqDFmd3Jw20cNo49b38LH3oBJUl5DG44VdjoI4nlgAzaMSLwMZ7JFGt0Enu1Csfgpvgt1qksTP6QB7YDwITD33iL7ucco1iOl7ABGzhyjCi2iZ3A6Xmx3RsAmHhmU5gJWE6/lIoI6/lh7dZFSfp4RTGfxQ8ToCCIsrgdx1weViv4I4ArXfcrdnaprPzP4cH77Ej1Wg1/bUHtB4C8nOiX+cYnOG29NbTHbtQF14zJpA+2XM2JngiLkss+NQj96PQzgPNhAMEFOLLy5ckY1WvS4sMMeCVzAyt5dwEGDcyxLTC4oJ/RrvLcHCHW0aOygPSlNoMRyDgC0f92+mPQGAmFv4GhfDFXfaauBxBdRAPjXj7Onn2B4UdfwQXGLT3RAihba8i9usOX5hLxqQqvtA3SUuV8hPrzHhpPEeRvx+PgZsXwV+gM7Aw3Mza6hwmILdngJh7NNQTINsCRqff9Ck3Kh7aSOoHsHvz7Ot+T514ObDwWYYCBMmS/6EG4XjSya6R98ggRWGrO9l21YYUvzBTv7OLtMck0Za3151Zqi/5LRKP95QIU",
            "Mnt8eXwFfjw",
            "JUUfV6vErSATm3rIOU9DML+IX1SlYxnAAS824xhbhC4",
        ),
    ];
    for (user, key, ephemeral, ciphertext, mac, sender_key) in vectors {
        let k = store
            .import(
                user,
                KeyRole::Backup,
                SecretKeyBytes::from_slice(&b64(key)).unwrap(),
                &KeyOptions::default(),
            )
            .unwrap();
        let agreement = TokenAgreement::new(&store, k).unwrap();
        let data = EncryptedSessionData::from_json(
            &serde_json::json!({"ephemeral": ephemeral, "ciphertext": ciphertext, "mac": mac}),
        )
        .unwrap();
        let plain: serde_json::Value =
            serde_json::from_slice(&decrypt(&agreement, &data).unwrap()).unwrap();
        assert_eq!(plain["sender_key"], sender_key, "{user}");
        assert_eq!(plain["algorithm"], "m.megolm.v1.aes-sha2");
    }
}

mod backup_vectors {
    #[test]
    fn softhsm() {
        super::backup_vectors_decrypt_through_the_token(super::Kind::SoftHsm)
    }
    #[test]
    fn kryoptic() {
        super::backup_vectors_decrypt_through_the_token(super::Kind::Kryoptic)
    }
}

/// A second store on a token this process already has open fails at once (it would wait
/// for the process's own lock otherwise); after the first is dropped, it opens.
fn a_second_open_in_one_process_fails_at_once(kind: Kind) {
    let t = TestToken::new(kind);
    let first = t.open();
    let start = std::time::Instant::now();
    let err = Pkcs11Store::open(&t.parsed_uri(), &fixed_pin(common::USER_PIN)).unwrap_err();
    assert!(matches!(err, TokenError::AlreadyOpen { .. }), "{err}");
    assert!(
        err.to_string().contains("already open in this process"),
        "{err}"
    );
    assert!(start.elapsed() < std::time::Duration::from_secs(5));
    drop(first);
    let again = t.open();
    assert!(again.list_keys(None).unwrap().is_empty());
}

mod second_open {
    #[test]
    fn softhsm() {
        super::a_second_open_in_one_process_fails_at_once(super::Kind::SoftHsm)
    }
    #[test]
    fn kryoptic() {
        super::a_second_open_in_one_process_fails_at_once(super::Kind::Kryoptic)
    }
}
