//! `mxhsm verify` against the real matrix-sdk-crypto: a fresh login of the user, played
//! by the SDK's `OlmMachine` (hsm-config/sdk-peer), goes from unverified to cross-signed and
//! trusting the identity on the token, with the emoji compared on both sides. On SoftHSM,
//! Kryoptic and the virtual YubiKey.

mod common;

use std::time::Duration;

use common::peer::{Peer, device};
use common::sas_peer::JsonChild;
use common::synapse::MxhsmUser;
use common::{Kind, ok};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(60);

/// A user of mxhsm with a published identity, and a new login run by the SDK.
fn alice_and_new_login(kind: Kind) -> (MxhsmUser, String, Peer, String) {
    let alice = MxhsmUser::new(kind);
    let mxhsm_device = alice.login();
    ok(alice.cli().args(["identity", "create"]));
    let master = alice.token_key("master");
    let mut new_login = Peer::start(alice.synapse, &alice.user, "ELEMENTX");
    new_login.ready();
    new_login.expect(
        json!({"cmd": "track", "user": alice.user.user_id}),
        "tracked",
    );
    // Before: the SDK sees the identity, trusts neither it nor itself.
    let before = new_login.expect(
        json!({"cmd": "status", "user": alice.user.user_id}),
        "status",
    );
    assert_eq!(
        before["identity"]["master_key"],
        master.as_str(),
        "{before}"
    );
    assert_eq!(before["identity"]["verified"], false, "{before}");
    assert_eq!(device(&before, "ELEMENTX")["cross_signed_by_owner"], false);
    (alice, mxhsm_device, new_login, master)
}

/// After the verification: the SDK's own device is cross-signed by the token's SSK and the
/// identity is verified.
fn assert_trusted(new_login: &mut Peer, alice: &MxhsmUser, mxhsm_device: &str) {
    let status = new_login.expect(
        json!({"cmd": "status", "user": alice.user.user_id}),
        "status",
    );
    assert_eq!(status["identity"]["verified"], true, "{status}");
    assert_eq!(
        device(&status, "ELEMENTX")["cross_signed_by_owner"],
        true,
        "{status}"
    );
    assert_eq!(device(&status, mxhsm_device)["verified"], true, "{status}");
}

/// The new login asks mxhsm's device for a verification; returns the flow.
fn request_from(new_login: &mut Peer, alice: &MxhsmUser, mxhsm_device: &str) -> String {
    new_login.expect(
        json!({"cmd": "request", "user": alice.user.user_id, "device": mxhsm_device}),
        "requested",
    )["flow_id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Both sides show their short authentication string, the same emoji and numbers; both
/// users say yes; returns the SDK's end of the flow (`done`).
fn both_say_yes(mx: &mut JsonChild, peer: &mut Peer, flow: &str) -> Value {
    let sdk = peer.expect(json!({"cmd": "wait_sas", "flow_id": flow}), "sas");
    let shown = mx.until("sas", T);
    assert_eq!(emoji_of(&shown), emoji_of(&sdk), "the emoji differ");
    assert_eq!(shown["decimals"], sdk["decimals"]);
    mx.answer("yes");
    peer.expect(json!({"cmd": "confirm", "flow_id": flow}), "confirmed");
    peer.expect(json!({"cmd": "wait_done", "flow_id": flow}), "done")
}

fn emoji_of(v: &Value) -> Vec<(String, String)> {
    v["emoji"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e[0].as_str().unwrap().to_string(),
                e[1].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// "Verify with another device" on the new login: mxhsm --wait answers.
fn the_new_login_asks_and_mxhsm_answers(kind: Kind) {
    let (alice, mxhsm_device, mut new_login, _) = alice_and_new_login(kind);
    let mut cmd = alice.cli();
    cmd.args(["--json", "verify", "--wait", "--timeout", "90"]);
    let mut mx = JsonChild::spawn(cmd);
    let flow = request_from(&mut new_login, &alice, &mxhsm_device);
    assert_eq!(mx.until("request", T)["device_id"], "ELEMENTX");
    new_login.expect(json!({"cmd": "start_sas", "flow_id": flow}), "sas_started");
    let done = both_say_yes(&mut mx, &mut new_login, &flow);
    assert!(
        done["verified_devices"]
            .as_array()
            .unwrap()
            .contains(&json!(mxhsm_device)),
        "{done}"
    );
    assert_eq!(
        done["verified_identities"],
        json!([alice.user.user_id]),
        "{done}"
    );
    let signed = mx.until("signed", T);
    assert_eq!(signed["device_id"], "ELEMENTX");
    assert_eq!(mx.exit(T), 0);
    assert_trusted(&mut new_login, &alice, &mxhsm_device);
}

/// `mxhsm verify device ID`: mxhsm asks, the new login accepts.
fn mxhsm_asks_the_new_login(kind: Kind) {
    let (alice, mxhsm_device, mut new_login, _) = alice_and_new_login(kind);
    let mut cmd = alice.cli();
    cmd.args(["--json", "verify", "device", "ELEMENTX", "--timeout", "90"]);
    let mut mx = JsonChild::spawn(cmd);
    let request = new_login.expect(json!({"cmd": "wait_request"}), "request");
    assert_eq!(request["from_device"], mxhsm_device.as_str());
    let flow = request["flow_id"].as_str().unwrap().to_string();
    new_login.expect(json!({"cmd": "accept", "flow_id": flow}), "accepted");
    both_say_yes(&mut mx, &mut new_login, &flow);
    assert_eq!(mx.until("signed", T)["device_id"], "ELEMENTX");
    assert_eq!(mx.exit(T), 0);
    assert_trusted(&mut new_login, &alice, &mxhsm_device);
}

/// The user says no on mxhsm: the SDK sees `m.mismatched_sas`, nothing is signed, and the
/// token is never asked (no PIN: none is available to this mxhsm at all).
fn a_mismatch_reaches_the_sdk_and_signs_nothing(kind: Kind) {
    let (alice, mxhsm_device, mut new_login, _) = alice_and_new_login(kind);
    let mut cmd = alice.cli();
    cmd.env_remove("MXHSM_PIN")
        .args(["--json", "verify", "--wait", "--timeout", "90"]);
    let mut mx = JsonChild::spawn(cmd);
    let flow = request_from(&mut new_login, &alice, &mxhsm_device);
    new_login.expect(json!({"cmd": "start_sas", "flow_id": flow}), "sas_started");
    new_login.expect(json!({"cmd": "wait_sas", "flow_id": flow}), "sas");
    mx.until("sas", T);
    mx.answer("no");
    let end = new_login.expect(json!({"cmd": "wait_done", "flow_id": flow}), "cancelled");
    assert_eq!(end["code"], "m.mismatched_sas", "{end}");
    assert_eq!(end["by_us"], false);
    assert_eq!(mx.exit(T), 3);
    let status = new_login.expect(
        json!({"cmd": "status", "user": alice.user.user_id}),
        "status",
    );
    assert_eq!(
        device(&status, "ELEMENTX")["cross_signed_by_owner"],
        false,
        "{status}"
    );
}

macro_rules! on_every_token {
    ($($name:ident),*) => {$(
        mod $name {
            #[test]
            fn softhsm() {
                super::$name(super::Kind::SoftHsm)
            }
            #[test]
            fn kryoptic() {
                super::$name(super::Kind::Kryoptic)
            }
            #[test]
            fn virtual_yubikey() {
                super::$name(super::Kind::VirtualYubiKey)
            }
        }
    )*};
}

on_every_token!(the_new_login_asks_and_mxhsm_answers);

mod mxhsm_asks_the_new_login {
    #[test]
    fn softhsm() {
        super::mxhsm_asks_the_new_login(super::Kind::SoftHsm)
    }
}

mod a_mismatch_reaches_the_sdk_and_signs_nothing {
    #[test]
    fn softhsm() {
        super::a_mismatch_reaches_the_sdk_and_signs_nothing(super::Kind::SoftHsm)
    }
}

/// `mxhsm verify user @bob`: Bob's phone (the SDK, with a cross-signing identity it made)
/// vouches for his master key; mxhsm signs exactly that key with the USK on the token, and
/// Bob's side verifies Alice's identity.
#[test]
fn another_user_is_verified_and_their_master_key_signed() {
    let alice = MxhsmUser::new(Kind::SoftHsm);
    alice.login();
    ok(alice.cli().args(["identity", "create"]));
    let usk = alice.token_key("user_signing");
    let bob = alice.synapse.register("bob");
    let mut phone = Peer::start(alice.synapse, &bob, "BOBPHONE");
    phone.ready();
    let bob_master = phone.expect(json!({"cmd": "bootstrap"}), "bootstrapped")["master_key"]
        .as_str()
        .unwrap()
        .to_string();
    phone.expect(
        json!({"cmd": "track", "user": alice.user.user_id}),
        "tracked",
    );
    let mut cmd = alice.cli();
    cmd.args(["--json", "verify", "user", &bob.user_id, "--timeout", "90"]);
    let mut mx = JsonChild::spawn(cmd);
    let request = phone.expect(json!({"cmd": "wait_request"}), "request");
    assert_eq!(request["from_user"], alice.user.user_id.as_str());
    let flow = request["flow_id"].as_str().unwrap().to_string();
    phone.expect(json!({"cmd": "accept", "flow_id": flow}), "accepted");
    let done = both_say_yes(&mut mx, &mut phone, &flow);
    assert_eq!(
        done["verified_identities"],
        json!([alice.user.user_id]),
        "{done}"
    );
    let signed = mx.until("signed", T);
    assert_eq!(
        (signed["key"].as_str(), signed["signed_with"].as_str()),
        (Some(bob_master.as_str()), Some("user_signing"))
    );
    assert_eq!(mx.exit(T), 0);
    // Synapse serves Bob's master key signed by Alice's USK (checked with ed25519-dalek);
    // it shows a user-signing signature only to its signer, so Alice asks.
    let (st, q) = common::synapse::http(
        &alice.synapse.url,
        "POST",
        "/keys/query",
        Some(&alice.access().0),
        Some(json!({"device_keys": {&bob.user_id: []}})),
    );
    assert_eq!(st, 200);
    assert!(common::clients::verifies(
        &q["master_keys"][&bob.user_id],
        &alice.user.user_id,
        &usk
    ));
}

/// A running `mxhsm watch --verify` answers the new login's request, as `verify --wait`
/// does, and goes on watching.
#[test]
fn a_running_watch_answers_a_new_login() {
    let (alice, mxhsm_device, mut new_login, _) = alice_and_new_login(Kind::SoftHsm);
    let mut cmd = alice.cli();
    cmd.args(["--json", "watch", "--verify"]);
    let mut mx = JsonChild::spawn(cmd);
    // The first check reports the new login as unsigned.
    let first = mx.event(T);
    assert_eq!(
        (first["event"].as_str(), first["device_id"].as_str()),
        (Some("unsigned_device"), Some("ELEMENTX"))
    );
    let flow = request_from(&mut new_login, &alice, &mxhsm_device);
    assert_eq!(mx.until("request", T)["device_id"], "ELEMENTX");
    new_login.expect(json!({"cmd": "start_sas", "flow_id": flow}), "sas_started");
    both_say_yes(&mut mx, &mut new_login, &flow);
    assert_eq!(mx.until("signed", T)["device_id"], "ELEMENTX");
    drop(mx);
    assert_trusted(&mut new_login, &alice, &mxhsm_device);
}
