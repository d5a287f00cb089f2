//! The YubiKey PIV backend on the virtual card (hsm-config/piv-card) through a real
//! pcscd: every KeyStore operation checked with ed25519-dalek / x25519-dalek, every message
//! length, the PIN counter, slots, the management key, attestation, and the CLI.
//! Tests on a real YubiKey run only with MXHSM_YUBIKEY_SERIAL set (see the end).

mod common;

use std::sync::atomic::Ordering;

use common::{Kind, TestToken, fails, fixed_pin, ok, piv};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use mxhsm::token::yubikey::{ManagementKey, YubiKeyOptions, YubiKeyStore, attestation};
use mxhsm::token::{
    Curve25519PublicKey, KeyBackend, KeyOptions, KeyOrigin, KeyRole, KeyStore, PinPolicy,
    RetiredSlot, SecretKeyBytes, TokenError, TouchPolicy, X25519Mechanism,
};
use serde_json::Value;
use x25519_dalek::{PublicKey as XPublic, StaticSecret};

const ALICE: &str = "@alice:localhost";

fn verify(public: &[u8; 32], msg: &[u8], sig: &[u8; 64]) {
    VerifyingKey::from_bytes(public)
        .unwrap()
        .verify_strict(msg, &Signature::from_bytes(sig))
        .unwrap_or_else(|_| panic!("signature over {} bytes does not verify", msg.len()));
}

fn slot_of(k: &mxhsm::token::KeyInfo) -> u8 {
    match k.backend {
        KeyBackend::Piv { slot, .. } => slot.get(),
        _ => panic!("not a PIV key"),
    }
}

fn piv_policy(k: &mxhsm::token::KeyInfo) -> Option<(PinPolicy, TouchPolicy)> {
    match k.backend {
        KeyBackend::Piv { pin, touch, .. } => pin.zip(touch),
        _ => None,
    }
}

fn slot(n: u8) -> RetiredSlot {
    RetiredSlot::new(n).unwrap()
}

fn curve(secret: &StaticSecret) -> Curve25519PublicKey {
    Curve25519PublicKey::from_bytes(XPublic::from(secret).to_bytes())
}

/// A connection of its own to the virtual card's reader (one virtual card at a time).
fn vpcd_connection() -> pcsc::Card {
    let ctx = pcsc::Context::establish(pcsc::Scope::User).unwrap();
    let reader = ctx
        .list_readers_owned()
        .unwrap()
        .into_iter()
        .find(|r| r.to_string_lossy().starts_with("Virtual PCD"))
        .expect("the vpcd reader");
    ctx.connect(&reader, pcsc::ShareMode::Shared, pcsc::Protocols::T1)
        .unwrap()
}

/// Another program changes the PIN (the card keeps it verified and is not reset).
fn change_pin_elsewhere(serial: u32, new_pin: &[u8]) {
    let mut yk = yubikey::YubiKey::open_by_serial(yubikey::Serial(serial)).unwrap();
    yk.change_pin(piv::PIN.as_bytes(), new_pin).unwrap();
    yk.disconnect(pcsc::Disposition::LeaveCard)
        .map_err(|(_, e)| e)
        .unwrap();
}

/// After the PIN changed behind the store's back: the old PIN is sent once (2 tries left),
/// never again, and the card agrees only one try was used.
fn old_pin_costs_one_try(t: &TestToken, store: YubiKeyStore, key: &mxhsm::token::KeyInfo) {
    let err = store.sign_ed25519(key, b"after").unwrap_err();
    assert!(
        matches!(&err, TokenError::WrongPin { status, .. } if status.retries == Some(2)),
        "{err:?}"
    );
    let err = store.sign_ed25519(key, b"again").unwrap_err().to_string();
    assert!(
        err.contains("refused on an earlier re-verification"),
        "{err}"
    );
    drop(store);
    let mut yk = yubikey::YubiKey::open_by_serial(yubikey::Serial(t.serial())).unwrap();
    assert_eq!(yk.get_pin_retries().unwrap(), 2, "exactly one try was used");
}

/// What the card itself says is in `slot`: GET METADATA sent here, on a connection of
/// its own, without selecting the PIV application again (which would make the card forget
/// the PIN the store under test verified) and left without resetting the card.
fn card_public(serial: u32, slot: u8) -> Option<Vec<u8>> {
    let _ = serial; // one virtual card at a time: the vpcd reader is it
    let card = vpcd_connection();
    let mut buf = [0u8; 300];
    let r = card
        .transmit(&[0x00, 0xf7, 0x00, slot, 0x00], &mut buf)
        .unwrap();
    let (data, sw) = r.split_at(r.len() - 2);
    if sw == [0x6a, 0x88] {
        card.disconnect(pcsc::Disposition::LeaveCard)
            .map_err(|(_, e)| e)
            .unwrap();
        return None;
    }
    assert_eq!(sw, [0x90, 0x00]);
    // 01 alg, 02 policy, 03 origin, 04 { 86 public }
    let at = data
        .windows(3)
        .position(|w| w == [0x04, 0x22, 0x86])
        .unwrap();
    let public = data[at + 4..at + 36].to_vec();
    card.disconnect(pcsc::Disposition::LeaveCard)
        .map_err(|(_, e)| e)
        .unwrap();
    Some(public)
}

#[test]
fn every_keystore_operation_checked_against_dalek() {
    let t = TestToken::new(Kind::VirtualYubiKey);
    let store = t.open_yubikey();
    assert_eq!(store.capabilities().x25519, Some(X25519Mechanism::Piv));
    let mut keys = Vec::new();
    for role in KeyRole::ALL {
        let k = store.generate(ALICE, role, &KeyOptions::default()).unwrap();
        assert_eq!(k.origin, KeyOrigin::Generated);
        let touch = if role == KeyRole::Master {
            TouchPolicy::Always
        } else {
            TouchPolicy::Cached
        };
        assert_eq!(piv_policy(&k), Some((PinPolicy::Once, touch)), "{role}");
        assert_eq!(
            card_public(t.serial(), slot_of(&k)).as_deref(),
            Some(&k.public_key.as_bytes()[..])
        );
        keys.push(k);
    }
    // A different slot for each role, the first retired ones.
    let slots: Vec<u8> = keys.iter().map(slot_of).collect();
    assert_eq!(slots, [0x82, 0x83, 0x84, 0x85, 0x86]);

    // Every length Matrix can produce: 0..=1100 (the crate panics at 255 and fails above
    // 1014), then 4 KiB and 64 KiB.
    let ssk = &keys[1];
    for len in (0..=1100usize).chain([4096, 65536]) {
        let msg: Vec<u8> = (0..len).map(|i| (i * 31 + len) as u8).collect();
        let sig = store
            .sign_ed25519(ssk, &msg)
            .unwrap_or_else(|e| panic!("{len}: {e}"));
        verify(ssk.public_key.as_bytes(), &msg, &sig);
    }

    // X25519 with the backup key equals x25519-dalek's, and a small-order peer is refused.
    let backup = &keys[3];
    let peer = StaticSecret::from([7u8; 32]);
    let secret = store.x25519(backup, &curve(&peer)).unwrap();
    assert_eq!(
        secret.expose(),
        peer.diffie_hellman(&XPublic::from(*backup.public_key.as_bytes()))
            .as_bytes()
    );
    // A small-order peer key gives no secret (the card refuses it, or mxhsm refuses the
    // all-zero result).
    assert!(
        store
            .x25519(backup, &Curve25519PublicKey::from_bytes([0u8; 32]))
            .is_err()
    );
    // Keys are used for what they are.
    assert!(store.sign_ed25519(backup, b"x").is_err());
    assert!(
        store
            .x25519(ssk, &Curve25519PublicKey::from_bytes([9u8; 32]))
            .is_err()
    );

    // Imports: the card's signature equals dalek's byte for byte; ECDH equals dalek's.
    let seed = [0x5au8; 32];
    let imported = store
        .import(
            "@bob:localhost",
            KeyRole::UserSigning,
            SecretKeyBytes::new(seed),
            &KeyOptions::default(),
        )
        .unwrap();
    assert_eq!(imported.origin, KeyOrigin::Imported);
    let dalek = SigningKey::from_bytes(&seed);
    assert_eq!(
        imported.public_key.as_bytes(),
        &dalek.verifying_key().to_bytes()
    );
    for len in [0usize, 255, 1015, 3000] {
        let msg = vec![0x42u8; len];
        assert_eq!(
            store.sign_ed25519(&imported, &msg).unwrap(),
            dalek.sign(&msg).to_bytes()
        );
    }
    let xs = [0x33u8; 32];
    let ximp = store
        .import(
            "@bob:localhost",
            KeyRole::Backup,
            SecretKeyBytes::new(xs),
            &KeyOptions::default(),
        )
        .unwrap();
    let xsec = StaticSecret::from(xs);
    assert_eq!(ximp.public_key.as_bytes(), XPublic::from(&xsec).as_bytes());
    let got = store.x25519(&ximp, &curve(&peer)).unwrap();
    assert_eq!(
        got.expose(),
        xsec.diffie_hellman(&XPublic::from(&peer)).as_bytes()
    );

    // Listing, by user; a second generation becomes the current one.
    assert_eq!(store.list_keys(None).unwrap().len(), KeyRole::ALL.len() + 2);
    assert_eq!(
        store.list_keys(Some(ALICE)).unwrap().len(),
        KeyRole::ALL.len()
    );
    let msk2 = store
        .generate(ALICE, KeyRole::Master, &KeyOptions::default())
        .unwrap();
    assert_eq!(store.find_key(ALICE, KeyRole::Master).unwrap(), msk2);

    // Delete empties the slot on the card and the map.
    store.delete(&keys[0]).unwrap();
    assert_eq!(card_public(t.serial(), 0x82), None);
    assert_eq!(
        store.list_keys(Some(ALICE)).unwrap().len(),
        KeyRole::ALL.len()
    );
    assert!(store.delete(&keys[0]).is_err(), "deleting twice");

    // A second process (another store on the same map) sees the same keys after this one
    // is gone.
    drop(store);
    let again = t.open_yubikey();
    assert_eq!(again.list_keys(None).unwrap().len(), KeyRole::ALL.len() + 2);
}

#[test]
fn filled_slots_are_not_overwritten_without_force() {
    let t = TestToken::new(Kind::VirtualYubiKey);
    let store = t.open_yubikey();
    let at = |n: u8, force: bool| {
        let mut o = KeyOptions::default();
        o.slot = Some(slot(n));
        o.force = force;
        o
    };
    let first = store
        .generate(ALICE, KeyRole::Master, &at(0x90, false))
        .unwrap();
    assert_eq!(slot_of(&first), 0x90);
    let err = store
        .generate(ALICE, KeyRole::SelfSigning, &at(0x90, false))
        .unwrap_err();
    assert!(
        matches!(&err, TokenError::SlotOccupied { slot: s, holder: Some((KeyRole::Master, u)), .. } if s.get() == 0x90 && u == ALICE),
        "{err}"
    );
    assert!(err.to_string().contains("slot 90"), "{err}");
    assert_eq!(
        card_public(t.serial(), 0x90).as_deref(),
        Some(&first.public_key.as_bytes()[..])
    );
    let err = RetiredSlot::new(0x9a).unwrap_err();
    assert!(matches!(err, TokenError::NotRetiredSlot(0x9a)), "{err}");
    assert!(
        err.to_string()
            .contains("not a retired key-management slot"),
        "{err}"
    );

    // A key another tool put in 82 (not in our map) is skipped by the automatic choice
    // and refused without --force. (One mxhsm store has the card at a time.)
    drop(store);
    let other = YubiKeyStore::open(
        YubiKeyOptions {
            serial: Some(t.serial()),
            slot_map: Some(t.dir.path().join("other-tool.json")),
            ..Default::default()
        },
        &fixed_pin(piv::PIN),
    )
    .unwrap();
    let foreign = other
        .generate("@other:localhost", KeyRole::Master, &at(0x82, false))
        .unwrap();
    drop(other);
    let store = t.open_yubikey();
    let err = store
        .generate(ALICE, KeyRole::Backup, &at(0x82, false))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("already holds a key (ed25519, generated)"),
        "{err}"
    );
    let auto = store
        .generate(ALICE, KeyRole::Backup, &KeyOptions::default())
        .unwrap();
    assert_eq!(slot_of(&auto), 0x83);
    assert_eq!(
        card_public(t.serial(), 0x82).as_deref(),
        Some(&foreign.public_key.as_bytes()[..])
    );
    // With --force the slot is taken.
    let forced = store
        .generate(ALICE, KeyRole::SelfSigning, &at(0x82, true))
        .unwrap();
    assert_eq!(
        card_public(t.serial(), 0x82).as_deref(),
        Some(&forced.public_key.as_bytes()[..])
    );
    // Adopting maps an existing slot without touching it.
    let err = store.adopt(ALICE, KeyRole::Backup, slot(0x90)).unwrap_err();
    assert!(
        matches!(&err, TokenError::SlotMapped { role: KeyRole::Master, user_id, .. } if user_id == ALICE),
        "{err}"
    );
}

#[test]
fn wrong_pin_reports_tries_is_sent_once_and_blocks_after_three() {
    let t = TestToken::new(Kind::VirtualYubiKey);
    // A PIN of the wrong length never reaches the card.
    let short = fixed_pin("12345");
    let err = t.open_yubikey_with(&short).err().unwrap().to_string();
    assert!(
        err.contains("6 to 8 bytes long") && err.contains("nothing was sent"),
        "{err}"
    );
    assert_eq!(t.open_yubikey().pin_status_before_login().retries, Some(3));

    for (left, expect) in [(2u32, "2 tries left"), (1, "one try left")] {
        let pins = fixed_pin("654321");
        let err = t.open_yubikey_with(&pins).err().unwrap();
        assert!(
            matches!(&err, TokenError::WrongPin { status, .. } if status.retries == Some(left)),
            "{err:?}"
        );
        assert!(err.to_string().contains(expect), "{err}");
        assert!(
            err.to_string().contains(&format!("YubiKey {}", t.serial())),
            "{err}"
        );
        assert_eq!(
            pins.asked.load(Ordering::SeqCst),
            1,
            "asked once, sent once"
        );
    }
    let pins = fixed_pin("654321");
    let err = t.open_yubikey_with(&pins).err().unwrap();
    assert!(matches!(err, TokenError::PivPinBlocked { .. }), "{err:?}");
    // Blocked: the right PIN is not even asked for, and the card stays blocked.
    let right = fixed_pin(piv::PIN);
    let err = t.open_yubikey_with(&right).err().unwrap();
    assert!(err.to_string().contains("unblock it with the PUK"), "{err}");
    assert_eq!(right.asked.load(Ordering::SeqCst), 0);
    // The card agrees (through the yubikey crate).
    let mut yk = yubikey::YubiKey::open_by_serial(yubikey::Serial(t.serial())).unwrap();
    assert_eq!(yk.get_pin_retries().unwrap(), 0);
    yk.unblock_pin(piv::PUK.as_bytes(), piv::PIN.as_bytes())
        .unwrap();
    drop(yk);
    assert_eq!(t.open_yubikey().pin_status_before_login().retries, Some(3));
}

#[test]
fn pin_always_keys_are_verified_before_each_use() {
    let t = TestToken::new(Kind::VirtualYubiKey);
    let store = t.open_yubikey();
    let mut o = KeyOptions::default();
    o.pin_policy = Some(PinPolicy::Always);
    o.touch_policy = Some(TouchPolicy::Never);
    let k = store.generate(ALICE, KeyRole::SelfSigning, &o).unwrap();
    assert_eq!(
        piv_policy(&k),
        Some((PinPolicy::Always, TouchPolicy::Never))
    );
    for msg in [&b"one"[..], b"two", b"three"] {
        verify(
            k.public_key.as_bytes(),
            msg,
            &store.sign_ed25519(&k, msg).unwrap(),
        );
    }
}

/// A PIN-always key re-sends the accepted PIN before each use; if the PIN was changed
/// meanwhile, the card's refusal is reported and the PIN is never sent again.
#[test]
fn a_changed_pin_is_not_resent() {
    let t = TestToken::new(Kind::VirtualYubiKey);
    let store = t.open_yubikey();
    let mut o = KeyOptions::default();
    o.pin_policy = Some(PinPolicy::Always);
    o.touch_policy = Some(TouchPolicy::Never);
    let k = store.generate(ALICE, KeyRole::SelfSigning, &o).unwrap();
    store.sign_ed25519(&k, b"before").unwrap();
    change_pin_elsewhere(t.serial(), b"24682468");
    old_pin_costs_one_try(&t, store, &k);
}

/// Another program on the card: connects, optionally selects PIV (the card forgets the
/// PIN) and leaves, resetting the card or not.
fn other_program(select: bool, reset: bool) {
    let card = vpcd_connection();
    if select {
        let mut buf = [0u8; 300];
        let r = card
            .transmit(
                &[0x00, 0xa4, 0x04, 0x00, 0x05, 0xa0, 0x00, 0x00, 0x03, 0x08],
                &mut buf,
            )
            .unwrap();
        assert_eq!(&r[r.len() - 2..], [0x90, 0x00]);
    }
    let how = if reset {
        pcsc::Disposition::ResetCard
    } else {
        pcsc::Disposition::LeaveCard
    };
    card.disconnect(how).map_err(|(_, e)| e).unwrap();
}

/// Another program selecting PIV or resetting the card between two uses costs nothing:
/// mxhsm selects PIV again, re-sends the accepted PIN once and carries on.
#[test]
fn another_program_between_uses() {
    let t = TestToken::new(Kind::VirtualYubiKey);
    let store = t.open_yubikey();
    let mut o = KeyOptions::default();
    o.touch_policy = Some(TouchPolicy::Never);
    let ssk = store.generate(ALICE, KeyRole::SelfSigning, &o).unwrap();
    let backup = store.generate(ALICE, KeyRole::Backup, &o).unwrap();
    let peer = StaticSecret::from([3u8; 32]);
    let expect = peer.diffie_hellman(&XPublic::from(*backup.public_key.as_bytes()));
    for (select, reset) in [(true, false), (false, true), (true, true)] {
        other_program(select, reset);
        let sig = store.sign_ed25519(&ssk, b"m").unwrap();
        verify(ssk.public_key.as_bytes(), b"m", &sig);
        other_program(select, reset);
        let got = store.x25519(&backup, &curve(&peer)).unwrap();
        assert_eq!(got.expose(), expect.as_bytes());
    }
    drop(store);
    assert_eq!(t.open_yubikey().pin_status_before_login().retries, Some(3));

    // If the other program changed the PIN, the old one is sent once, and never again.
    let store = t.open_yubikey();
    change_pin_elsewhere(t.serial(), b"13571357");
    other_program(true, false);
    old_pin_costs_one_try(&t, store, &ssk);
}

#[test]
fn touch_is_announced_before_it_is_needed() {
    let t = TestToken::new(Kind::VirtualYubiKey);
    let mut store = t.open_yubikey();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    store.set_touch_notice(Box::new(move |k| log.lock().unwrap().push(k.role)));
    let msk = store
        .generate(ALICE, KeyRole::Master, &KeyOptions::default())
        .unwrap();
    let ssk = store
        .generate(ALICE, KeyRole::SelfSigning, &KeyOptions::default())
        .unwrap();
    let mut never = KeyOptions::default();
    never.touch_policy = Some(TouchPolicy::Never);
    let usk = store.generate(ALICE, KeyRole::UserSigning, &never).unwrap();
    for _ in 0..2 {
        for k in [&msk, &ssk, &usk] {
            store.sign_ed25519(k, b"m").unwrap();
        }
    }
    // Always: each time; cached: once within 15 s; never: not at all.
    assert_eq!(
        *seen.lock().unwrap(),
        [KeyRole::Master, KeyRole::SelfSigning, KeyRole::Master]
    );
}

#[test]
fn management_key_default_given_or_pin_protected() {
    let t = TestToken::new(Kind::VirtualYubiKey);
    let open = |mk: ManagementKey| {
        YubiKeyStore::open(
            YubiKeyOptions {
                serial: Some(t.serial()),
                management_key: mk,
                slot_map: Some(t.slot_map()),
            },
            &fixed_pin(piv::PIN),
        )
        .unwrap()
    };
    let wrong = open(ManagementKey::Given(zeroize::Zeroizing::new(vec![9u8; 24])));
    let err = wrong
        .generate(ALICE, KeyRole::Master, &KeyOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("refused the management key"), "{err}");
    assert!(
        wrong.list_keys(None).unwrap().is_empty(),
        "nothing was made"
    );
    drop(wrong);
    let given = open(ManagementKey::Given(zeroize::Zeroizing::new(
        (0..24).map(|i| [1u8, 2, 3, 4, 5, 6, 7, 8][i % 8]).collect(),
    )));
    given
        .generate(ALICE, KeyRole::Master, &KeyOptions::default())
        .unwrap();
    drop(given);

    // Switch the card to a PIN-protected random key (ykman's --protect scheme) with the
    // yubikey crate; mxhsm then finds it on its own.
    let mut yk = yubikey::YubiKey::open_by_serial(yubikey::Serial(t.serial())).unwrap();
    yk.authenticate(&yubikey::MgmKey::get_default(&yk).unwrap())
        .unwrap();
    yk.verify_pin(piv::PIN.as_bytes()).unwrap();
    let mut key = [0u8; 24];
    getrandom::fill(&mut key).unwrap();
    let protected =
        yubikey::MgmKey::from_bytes(key, Some(yubikey::MgmAlgorithmId::Aes192)).unwrap();
    protected.set_protected(&mut yk).unwrap();
    drop(yk);
    let auto = open(ManagementKey::Auto);
    auto.generate(ALICE, KeyRole::SelfSigning, &KeyOptions::default())
        .unwrap();
    assert_eq!(auto.list_keys(None).unwrap().len(), 2);
}

#[test]
fn attestation_verifies_to_the_cards_root_only() {
    let t = TestToken::new(Kind::VirtualYubiKey);
    let store = t.open_yubikey();
    let generated = store
        .generate(ALICE, KeyRole::Master, &KeyOptions::default())
        .unwrap();
    let card_root = attestation::Root::parse(
        "test card",
        &std::fs::read(&t.card.as_ref().unwrap().ca).unwrap(),
    )
    .unwrap();
    let a = store.attest(&generated, &[card_root]).unwrap();
    assert_eq!(a.serial, Some(t.serial()));
    assert_eq!(a.firmware, Some([5, 7, 1]));
    assert_eq!(a.policy, Some([2, 2]), "PIN once, touch always");
    // The test card is not Yubico: with Yubico's roots alone it must not verify.
    let err = store
        .attest(&generated, &attestation::yubico_roots())
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not reach a trusted root"), "{err}");
    // Imported keys have no attestation.
    let imported = store
        .import(
            ALICE,
            KeyRole::SelfSigning,
            SecretKeyBytes::new([1; 32]),
            &KeyOptions::default(),
        )
        .unwrap();
    let card_root = attestation::Root::parse(
        "test card",
        &std::fs::read(&t.card.as_ref().unwrap().ca).unwrap(),
    )
    .unwrap();
    let err = store
        .attest(&imported, &[card_root])
        .unwrap_err()
        .to_string();
    assert!(err.contains("attests only keys generated on it"), "{err}");
}

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"))
}

#[test]
fn cli_on_the_yubikey() {
    let t = TestToken::new(Kind::VirtualYubiKey);
    let listed = json(&ok(t.cli().args(["token", "list", "--json"])));
    let found = listed["yubikeys"]
        .as_array()
        .unwrap()
        .iter()
        .any(|y| y["serial"] == t.serial() && y["supported"] == true);
    assert!(found, "{listed}");

    let out = ok(t.cli().args([
        "keys", "generate", "--user", ALICE, "--role", "master", "--slot", "88",
    ]));
    assert!(
        out.starts_with(&format!("generated the master key of {ALICE}")),
        "{out}"
    );
    let err = fails(t.cli().args([
        "keys", "generate", "--user", ALICE, "--role", "backup", "--slot", "88",
    ]));
    assert!(err.contains("--force"), "{err}");
    let out = ok(t.cli().args([
        "--json",
        "keys",
        "generate",
        "--user",
        ALICE,
        "--role",
        "self_signing",
        "--pin-policy",
        "always",
        "--touch-policy",
        "never",
    ]));
    let k = json(&out);
    assert_eq!(k["pin_policy"], "always");
    assert_eq!(k["touch_policy"], "never");
    assert_eq!(k["locator"], "slot 82");

    // Attestation: against the card's root given with --root, and not against Yubico's.
    let attest = json(&ok(t
        .cli()
        .args([
            "--json", "keys", "attest", "--user", ALICE, "--role", "master", "--root",
        ])
        .arg(&t.card.as_ref().unwrap().ca)));
    common::json_doc::check("keys attest", &attest);
    assert_eq!(attest["verified"], true);
    assert_eq!(attest["serial"], t.serial());
    let err = fails(
        t.cli()
            .args(["keys", "attest", "--user", ALICE, "--role", "master"]),
    );
    assert!(err.contains("does not reach a trusted root"), "{err}");

    // A key put there by "another machine" (another slot map) is shown, then adopted.
    ok(t.cli()
        .env("XDG_CONFIG_HOME", t.dir.path().join("elsewhere"))
        .args([
            "keys", "generate", "--user", ALICE, "--role", "backup", "--slot", "90",
        ]));
    let doctor = json(&ok(t.cli().args(["token", "doctor", "--json"])));
    assert_eq!(doctor["ok"], true, "{doctor}");
    let checks = doctor["checks"].as_array().unwrap();
    assert!(
        checks.iter().any(|c| c["name"] == "slot 90"
            && c["detail"]
                .as_str()
                .unwrap()
                .contains("holds a key mxhsm does not know (x25519, generated)")),
        "{doctor}"
    );
    assert!(
        checks.iter().any(|c| c["name"] == "factory credentials"
            && c["detail"]
                .as_str()
                .unwrap()
                .contains("PIN, PUK, management key")),
        "{doctor}"
    );
    let adopted = json(&ok(t.cli().args([
        "--json", "keys", "adopt", "--user", ALICE, "--role", "backup", "--slot", "90",
    ])));
    common::json_doc::check_key("keys adopt", &adopted);
    assert!(adopted["pin_policy"].is_string(), "{adopted}");
    // The adoption is in the audit log.
    let shown = json(&ok(t.cli().args(["--json", "audit", "show"])));
    assert!(
        shown["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["op"] == "adopt" && e["key"]["role"] == "backup"),
        "{shown}"
    );
    let err = fails(t.cli().args([
        "keys", "adopt", "--user", ALICE, "--role", "master", "--slot", "91",
    ]));
    assert!(
        err.contains("slot 91 of") && err.contains("is empty"),
        "{err}"
    );
    // The doctor's temporary keys are gone again.
    let list = json(&ok(t.cli().args(["keys", "list", "--json"])));
    assert_eq!(list["keys"].as_array().unwrap().len(), 3, "{list}");

    ok(t.cli().args([
        "keys", "delete", "--user", ALICE, "--role", "master", "--yes",
    ]));
    assert_eq!(card_public(t.serial(), 0x88), None);

    // Listing needs no PIN (the card's metadata is public), so a wrong one is not even
    // sent; an operation that needs it names the tries left.
    ok(t.cli().env("MXHSM_PIN", "000000").args(["keys", "list"]));
    let err = fails(t.cli().env("MXHSM_PIN", "000000").args(["token", "doctor"]));
    assert!(
        err.contains(&format!("wrong PIN for token \"YubiKey {}\"", t.serial()))
            && err.contains("2 tries left"),
        "{err}"
    );
    // Naming both kinds of token is refused; a missing serial is named.
    let err = fails(t.cli().args([
        "--token",
        "pkcs11:token=x",
        "--yubikey",
        "1",
        "keys",
        "list",
    ]));
    assert!(err.contains("cannot be used with"), "{err}");
    let err = fails(t.cli().args(["--yubikey", "1", "keys", "list"]));
    assert!(err.contains("no token matches YubiKey serial 1"), "{err}");
    assert!(
        err.contains(&t.serial().to_string()),
        "lists the present ones: {err}"
    );
    let err = fails(t.cli().args(["--yubikey", "12x", "keys", "list"]));
    assert!(err.contains("takes a serial number"), "{err}");
}

#[test]
fn several_yubikeys_need_a_serial() {
    let t = TestToken::new(Kind::VirtualYubiKey);
    let second = piv::SecondCard::start(t.card.as_ref().unwrap(), t.dir.path(), 424242);
    let err = fails(t.cli().args(["--yubikey", "any", "keys", "list"]));
    assert!(
        err.contains("2 YubiKeys are present")
            && err.contains(&format!("YubiKey serial {}", t.serial()))
            && err.contains("YubiKey serial 424242")
            && err.contains("choose one with --yubikey SERIAL"),
        "{err}"
    );
    // Each by its serial: keys go to the right card.
    ok(t.cli()
        .args(["keys", "generate", "--user", ALICE, "--role", "backup"]));
    let other = ok(t.cli().args(["--yubikey", "424242", "keys", "list"]));
    assert!(
        other.starts_with("no mxhsm keys on token \"YubiKey 424242\""),
        "{other}"
    );
    drop(second);
    // Alone again, `any` finds it.
    let list = ok(t.cli().args(["--yubikey", "any", "keys", "list"]));
    assert!(list.contains("backup"), "{list}");
}

/// On a real YubiKey 5.7+ (destructive for retired slots 94 and 95 only): run with
/// MXHSM_YUBIKEY_SERIAL=<serial> MXHSM_PIN=<pin> cargo xtask test (which adds --ignored for it).
/// Ignored otherwise because CI has no YubiKey and the test overwrites two slots; the
/// virtual-card tests above cover the same paths on every run.
#[test]
#[ignore = "needs a real YubiKey: set MXHSM_YUBIKEY_SERIAL (see docs/yubikey.md)"]
fn real_yubikey() {
    let serial: u32 = std::env::var("MXHSM_YUBIKEY_SERIAL")
        .expect("MXHSM_YUBIKEY_SERIAL")
        .parse()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = YubiKeyStore::open(
        YubiKeyOptions {
            serial: Some(serial),
            slot_map: Some(dir.path().join("map.json")),
            ..Default::default()
        },
        &mxhsm::token::pin::PinSources::non_interactive(None),
    )
    .unwrap();
    let mut o = KeyOptions::default();
    o.slot = Some(slot(0x94));
    o.force = true;
    o.touch_policy = Some(TouchPolicy::Never);
    let k = store
        .generate("@hw-test:localhost", KeyRole::SelfSigning, &o)
        .unwrap();
    for len in (0..=1100usize).chain([4096, 65536]) {
        let msg = vec![0xa5u8; len];
        verify(
            k.public_key.as_bytes(),
            &msg,
            &store.sign_ed25519(&k, &msg).unwrap(),
        );
    }
    let a = store.attest(&k, &attestation::yubico_roots()).unwrap();
    assert_eq!(a.serial, Some(serial));
    o.slot = Some(slot(0x95));
    let x = store
        .generate("@hw-test:localhost", KeyRole::Backup, &o)
        .unwrap();
    let peer = StaticSecret::from([7u8; 32]);
    let s = store.x25519(&x, &curve(&peer)).unwrap();
    assert_eq!(
        s.expose(),
        peer.diffie_hellman(&XPublic::from(*x.public_key.as_bytes()))
            .as_bytes()
    );
    store.delete(&k).unwrap();
    store.delete(&x).unwrap();
}
