//! `mxhsm verify`: interactive SAS verification answered by mxhsm's device, signed on the
//! token only after the user confirmed. The other device here is scripted with raw HTTP
//! (tests/common/sas_peer.rs: the protocol written again, vodozemac's key agreement), so
//! it can also misbehave; `tests/verify_sdk.rs` runs the same against matrix-sdk-crypto.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD as B64;
use common::clients::{phone, verifies};
use common::sas_peer::{JsonChild, RawPeer, commitment, mac_info, macs, sas_info};
use common::synapse::{MxhsmUser, http};
use common::{Kind, ok};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);

struct Setup {
    alice: MxhsmUser,
    mxhsm_device: String,
    peer: RawPeer,
    /// The token's master and self-signing keys (read before mxhsm runs: one process at a
    /// time uses a software token).
    master: String,
    ssk: String,
}

fn setup(kind: Kind) -> Setup {
    let alice = MxhsmUser::new(kind);
    let mxhsm_device = alice.login();
    ok(alice.cli().args(["identity", "create"]));
    let (token, key) = phone(alice.synapse, &alice.user, "PHONE");
    let peer = RawPeer::new(
        &alice.synapse.url,
        &token,
        &alice.user.user_id,
        "PHONE",
        key,
    );
    let (master, ssk) = (alice.token_key("master"), alice.token_key("self_signing"));
    Setup {
        alice,
        mxhsm_device,
        peer,
        master,
        ssk,
    }
}

fn phone_signed_by_ssk(s: &Setup) -> bool {
    let me = &s.alice.user.user_id;
    let (st, q) = http(
        &s.alice.synapse.url,
        "POST",
        "/keys/query",
        Some(&s.peer.token),
        Some(json!({"device_keys": {me: []}})),
    );
    assert_eq!(st, 200);
    verifies(&q["device_keys"][me]["PHONE"], me, &s.ssk)
}

/// The phone asks, starts, and both sides go through the keys; returns the established
/// SAS, the phone's SAS key and mxhsm's.
fn up_to_the_keys(
    s: &mut Setup,
    mx: &mut JsonChild,
    txn: &str,
) -> (vodozemac::sas::EstablishedSas, String, String) {
    let me = s.alice.user.user_id.clone();
    request(s, txn, json!(["m.sas.v1"]));
    let e = mx.until("request", T);
    assert_eq!(e["device_id"], "PHONE");
    let ready = s.peer.expect("m.key.verification.ready", T);
    assert_eq!(ready["from_device"], s.mxhsm_device.as_str());
    assert_eq!(ready["methods"], json!(["m.sas.v1"]));
    let start = json!({
        "from_device": "PHONE", "method": "m.sas.v1",
        "key_agreement_protocols": ["curve25519-hkdf-sha256"], "hashes": ["sha256"],
        "message_authentication_codes": ["hkdf-hmac-sha256.v2"],
        "short_authentication_string": ["decimal", "emoji"], "transaction_id": txn,
    });
    s.peer.send(
        &me,
        &s.mxhsm_device,
        "m.key.verification.start",
        start.clone(),
    );
    let accept = s.peer.expect("m.key.verification.accept", T);
    assert_eq!(accept["message_authentication_code"], "hkdf-hmac-sha256.v2");
    let sas = vodozemac::sas::Sas::new();
    let phone_key = sas.public_key().to_base64();
    s.peer.send(
        &me,
        &s.mxhsm_device,
        "m.key.verification.key",
        json!({"transaction_id": txn, "key": phone_key}),
    );
    let key = s.peer.expect("m.key.verification.key", T);
    let mx_key = key["key"].as_str().unwrap().to_string();
    // mxhsm committed to its key before seeing ours.
    assert_eq!(accept["commitment"], commitment(&mx_key, &start));
    let established = sas
        .diffie_hellman(vodozemac::Curve25519PublicKey::from_base64(&mx_key).unwrap())
        .unwrap();
    (established, phone_key, mx_key)
}

/// The phone asks mxhsm's device for a verification (`methods` offered).
fn request(s: &Setup, txn: &str, methods: Value) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    s.peer.send(
        &s.alice.user.user_id,
        &s.mxhsm_device,
        "m.key.verification.request",
        json!({"from_device": "PHONE", "methods": methods, "timestamp": now, "transaction_id": txn}),
    );
}

/// The phone's next message must be a cancel with `code`; mxhsm reports it and exits 3.
fn cancelled_with(s: &mut Setup, mx: &mut JsonChild, code: &str) {
    let cancel = s.peer.next(T);
    assert_eq!(cancel["type"], "m.key.verification.cancel", "{cancel}");
    assert_eq!(cancel["content"]["code"], code, "{cancel}");
    let e = mx.until("cancelled", T);
    assert_eq!(
        (e["code"].as_str(), e["by_us"].as_bool()),
        (Some(code), Some(true))
    );
}

/// The phone's MAC, vouching for `key` as its device key.
fn send_mac(s: &Setup, sas: &vodozemac::sas::EstablishedSas, txn: &str, key: String) {
    let me = &s.alice.user.user_id;
    let (m, k) = macs(
        sas,
        &mac_info((me, "PHONE"), (me, &s.mxhsm_device), txn),
        &BTreeMap::from([("ed25519:PHONE".to_string(), key)]),
    );
    s.peer.send(
        me,
        &s.mxhsm_device,
        "m.key.verification.mac",
        json!({"transaction_id": txn, "mac": m, "keys": k}),
    );
}

fn verify_wait(s: &Setup) -> JsonChild {
    let mut cmd = s.alice.cli();
    cmd.args(["--json", "verify", "--wait", "--timeout", "60"]);
    JsonChild::spawn(cmd)
}

#[test]
fn a_new_login_is_verified_by_emoji_and_signed_on_the_token() {
    let mut s = setup(Kind::SoftHsm);
    let me = s.alice.user.user_id.clone();
    let mut mx = verify_wait(&s);
    let (sas, phone_key, mx_key) = up_to_the_keys(&mut s, &mut mx, "txn-ok");

    // Both show the same: the phone started, so it comes first in the info.
    let bytes = sas.bytes(&sas_info(
        (&me, "PHONE", &phone_key),
        (&me, &s.mxhsm_device, &mx_key),
        "txn-ok",
    ));
    let shown = mx.until("sas", T);
    let (a, b, c) = bytes.decimals();
    assert_eq!(shown["decimals"], json!([a, b, c]));
    assert_eq!(shown["emoji"].as_array().unwrap().len(), 7);
    assert!(!phone_signed_by_ssk(&s), "signed before the user answered");
    // The phone asks for the master key's private half: mxhsm has none to give.
    s.peer.send(
        &me,
        &s.mxhsm_device,
        "m.secret.request",
        json!({"action": "request", "name": "m.cross_signing.master", "request_id": "r1", "requesting_device_id": "PHONE"}),
    );
    mx.answer("yes");

    // mxhsm vouches for its device key and for the master key on the token.
    let mac = s.peer.expect("m.key.verification.mac", T);
    let info = mac_info((&me, &s.mxhsm_device), (&me, "PHONE"), "txn-ok");
    let master = s.master.clone();
    let olm = s.alice.session()["device_id"].clone();
    assert_eq!(olm, s.mxhsm_device.as_str());
    let (st, q) = http(
        &s.alice.synapse.url,
        "POST",
        "/keys/query",
        Some(&s.peer.token),
        Some(json!({"device_keys": {&me: []}})),
    );
    assert_eq!(st, 200);
    let device_key = q["device_keys"][&me][&s.mxhsm_device]["keys"]
        [format!("ed25519:{}", s.mxhsm_device)]
    .as_str()
    .unwrap()
    .to_string();
    let expected = BTreeMap::from([
        (format!("ed25519:{}", s.mxhsm_device), device_key),
        (format!("ed25519:{master}"), master.clone()),
    ]);
    let (want, want_keys) = macs(&sas, &info, &expected);
    assert_eq!(mac["keys"], want_keys.as_str());
    assert_eq!(mac["mac"], json!(want));

    // The phone vouches for its device key: mxhsm signs exactly that device.
    let phone_ed = B64.encode(s.peer.key.verifying_key().to_bytes());
    send_mac(&s, &sas, "txn-ok", phone_ed.clone());
    let signed = mx.until("signed", T);
    let asked = mx
        .seen
        .iter()
        .find(|e| e["event"] == "secret_request")
        .unwrap_or_else(|| panic!("the secret request was not reported: {:?}", mx.seen));
    assert_eq!(
        (asked["name"].as_str(), asked["shared"].as_bool()),
        (Some("m.cross_signing.master"), Some(false))
    );
    assert_eq!(
        (signed["device_id"].clone(), signed["key"].clone()),
        (json!("PHONE"), json!(phone_ed))
    );
    let done = s.peer.expect("m.key.verification.done", T);
    assert_eq!(done["transaction_id"], "txn-ok");
    assert_eq!(mx.exit(T), 0);
    assert!(phone_signed_by_ssk(&s));
}

/// The user says the emoji differ: `m.mismatched_sas`, nothing signed.
#[test]
fn a_mismatch_signs_nothing() {
    let mut s = setup(Kind::SoftHsm);
    let mut mx = verify_wait(&s);
    up_to_the_keys(&mut s, &mut mx, "txn-no");
    mx.until("sas", T);
    mx.answer("no");
    assert_eq!(mx.event(T)["event"], "mismatch");
    cancelled_with(&mut s, &mut mx, "m.mismatched_sas");
    assert_eq!(mx.exit(T), 3);
    assert!(!phone_signed_by_ssk(&s));
}

/// A MAC that does not match (here: over another key than the device's) is refused with
/// `m.key_mismatch`; nothing is signed, although the user confirmed.
#[test]
fn a_wrong_mac_signs_nothing() {
    let mut s = setup(Kind::SoftHsm);
    let mut mx = verify_wait(&s);
    let (sas, _, _) = up_to_the_keys(&mut s, &mut mx, "txn-mac");
    mx.until("sas", T);
    mx.answer("yes");
    s.peer.expect("m.key.verification.mac", T);
    let other = B64.encode(common::clients::random_key().verifying_key().to_bytes());
    send_mac(&s, &sas, "txn-mac", other);
    cancelled_with(&mut s, &mut mx, "m.key_mismatch");
    assert_eq!(mx.exit(T), 3);
    assert!(!phone_signed_by_ssk(&s));
}

/// A start with a method mxhsm does not speak: `m.unknown_method`.
#[test]
fn an_unknown_method_is_cancelled() {
    let mut s = setup(Kind::SoftHsm);
    let me = s.alice.user.user_id.clone();
    let mut mx = verify_wait(&s);
    request(&s, "txn-m", json!(["m.sas.v1", "m.qr_code.show.v1"]));
    s.peer.expect("m.key.verification.ready", T);
    s.peer.send(
        &me,
        &s.mxhsm_device,
        "m.key.verification.start",
        json!({"from_device": "PHONE", "method": "m.reciprocate.v1", "transaction_id": "txn-m", "secret": "AAAA"}),
    );
    cancelled_with(&mut s, &mut mx, "m.unknown_method");
    assert_eq!(mx.exit(T), 3);
}

/// The other side cancels: mxhsm stops, says so, and signs nothing.
#[test]
fn a_cancel_from_the_other_side_signs_nothing() {
    let mut s = setup(Kind::SoftHsm);
    let me = s.alice.user.user_id.clone();
    let mut mx = verify_wait(&s);
    let (_, _, _) = up_to_the_keys(&mut s, &mut mx, "txn-c");
    mx.until("sas", T);
    s.peer.send(
        &me,
        &s.mxhsm_device,
        "m.key.verification.cancel",
        json!({"transaction_id": "txn-c", "code": "m.user", "reason": "no"}),
    );
    mx.answer("yes");
    let e = mx.until("cancelled", T);
    assert_eq!(
        (e["code"].clone(), e["by_us"].clone()),
        (json!("m.user"), json!(false))
    );
    assert_eq!(mx.exit(T), 3);
    assert!(!phone_signed_by_ssk(&s));
}

/// Nobody answers in time: mxhsm cancels with `m.timeout`.
#[test]
fn a_silent_peer_times_out() {
    let mut s = setup(Kind::SoftHsm);
    let mut cmd = s.alice.cli();
    cmd.args(["--json", "verify", "--wait", "--timeout", "8"]);
    let mut mx = JsonChild::spawn(cmd);
    request(&s, "txn-t", json!(["m.sas.v1"]));
    s.peer.expect("m.key.verification.ready", T);
    // No start follows.
    cancelled_with(&mut s, &mut mx, "m.timeout");
    assert_eq!(mx.exit(T), 3);
}

/// A hostile server serves another key for the phone than the one the phone vouched for
/// in its MAC: mxhsm refuses with `m.key_mismatch` and uploads no signature; Synapse has
/// neither the phone nor the attacker's key signed.
#[test]
fn a_server_that_swaps_the_device_key_gets_nothing_signed() {
    let mut s = setup(Kind::SoftHsm);
    let me = s.alice.user.user_id.clone();
    let evil = B64.encode(common::clients::random_key().verifying_key().to_bytes());
    let paths = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = paths.clone();
    let (me2, evil2) = (me.clone(), evil.clone());
    let proxy = common::synapse::Proxy::start_intercepting(
        &s.alice.synapse.url,
        std::sync::Arc::new(move |path, _status, v| {
            if path.starts_with("/keys/query") && v["device_keys"][&me2].get("PHONE").is_some() {
                v["device_keys"][&me2]["PHONE"]["keys"]["ed25519:PHONE"] = json!(evil2);
            }
        }),
        std::sync::Arc::new(move |path| {
            seen.lock().unwrap().push(path.to_string());
            None
        }),
    );
    // mxhsm talks to the proxy (the phone, to Synapse).
    let saved = std::fs::read_to_string(s.alice.session_path()).unwrap();
    let mut session: serde_json::Value = serde_json::from_str(&saved).unwrap();
    session["homeserver"] = json!(proxy.url);
    std::fs::write(s.alice.session_path(), session.to_string()).unwrap();
    let mut mx = verify_wait(&s);
    let (sas, _, _) = up_to_the_keys(&mut s, &mut mx, "txn-evil");
    mx.until("sas", T);
    mx.answer("yes");
    s.peer.expect("m.key.verification.mac", T);
    let phone_ed = B64.encode(s.peer.key.verifying_key().to_bytes());
    send_mac(&s, &sas, "txn-evil", phone_ed);
    cancelled_with(&mut s, &mut mx, "m.key_mismatch");
    assert_eq!(mx.exit(T), 3);
    std::fs::write(s.alice.session_path(), saved).unwrap();
    assert!(
        !paths
            .lock()
            .unwrap()
            .iter()
            .any(|p| p.contains("/keys/signatures/upload")),
        "a signature was uploaded"
    );
    assert!(!phone_signed_by_ssk(&s));
}
