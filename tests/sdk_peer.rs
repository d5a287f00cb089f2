//! The matrix-sdk-crypto test peer itself, against a real Synapse: two devices of one user,
//! both run by the SDK's `OlmMachine`, verify each other with to-device SAS; and a user's
//! cross-signing identity made by the SDK is seen by another user. This proves the peer
//! (login, key upload, sync, the verification and bootstrap commands) before tests use it
//! as the other side of mxhsm's verification.

mod common;

use common::peer::{Peer, device};
use common::synapse::Synapse;
use serde_json::json;

#[test]
fn two_sdk_devices_of_one_user_verify_each_other() {
    let synapse = Synapse::get();
    let user = synapse.register("peer");
    let mut a = Peer::start(synapse, &user, "PEERA");
    let mut b = Peer::start(synapse, &user, "PEERB");
    let ready_a = a.ready();
    let ready_b = b.ready();
    assert_eq!(ready_a["user_id"], user.user_id.as_str());
    assert_eq!(ready_a["device_id"], "PEERA");
    assert_eq!(ready_b["device_id"], "PEERB");
    assert_ne!(ready_a["ed25519"], ready_b["ed25519"]);
    for p in [&mut a, &mut b] {
        p.expect(json!({"cmd": "track", "user": user.user_id}), "tracked");
    }

    // Before the verification, B's device is known to A but not trusted.
    let before = a.expect(json!({"cmd": "status", "user": user.user_id}), "status");
    let peer_b = device(&before, "PEERB");
    assert_eq!(peer_b["ed25519"], ready_b["ed25519"], "{before}");
    assert_eq!(peer_b["locally_trusted"], false, "{before}");
    assert_eq!(peer_b["verified"], false, "{before}");

    // A asks B's device; B sees the request from A's device and accepts it.
    let flow = a.expect(
        json!({"cmd": "request", "user": user.user_id, "device": "PEERB"}),
        "requested",
    )["flow_id"]
        .as_str()
        .unwrap()
        .to_string();
    let request = b.expect(json!({"cmd": "wait_request"}), "request");
    assert_eq!(request["flow_id"], flow.as_str());
    assert_eq!(request["from_user"], user.user_id.as_str());
    assert_eq!(request["from_device"], "PEERA");
    let methods = request["methods"].as_array().unwrap();
    assert!(methods.contains(&json!("m.sas.v1")), "{request}");
    b.expect(json!({"cmd": "accept", "flow_id": flow}), "accepted");

    // A starts SAS; B accepts it (inside wait_sas); both show the same short auth string.
    a.expect(json!({"cmd": "start_sas", "flow_id": flow}), "sas_started");
    a.send(json!({"cmd": "wait_sas", "flow_id": flow}));
    b.send(json!({"cmd": "wait_sas", "flow_id": flow}));
    let sas_a = a.expect_reply("sas");
    let sas_b = b.expect_reply("sas");
    assert_eq!(sas_a["emoji"].as_array().unwrap().len(), 7, "{sas_a}");
    assert_eq!(sas_a["decimals"].as_array().unwrap().len(), 3, "{sas_a}");
    assert_eq!(sas_a["emoji"], sas_b["emoji"]);
    assert_eq!(sas_a["decimals"], sas_b["decimals"]);

    // Both confirm; both flows end done, each having verified the other's device and no
    // identity (the user has no cross-signing keys).
    a.expect(json!({"cmd": "confirm", "flow_id": flow}), "confirmed");
    b.expect(json!({"cmd": "confirm", "flow_id": flow}), "confirmed");
    a.send(json!({"cmd": "wait_done", "flow_id": flow}));
    b.send(json!({"cmd": "wait_done", "flow_id": flow}));
    let done_a = a.expect_reply("done");
    let done_b = b.expect_reply("done");
    assert_eq!(done_a["verified_devices"], json!(["PEERB"]), "{done_a}");
    assert_eq!(done_b["verified_devices"], json!(["PEERA"]), "{done_b}");
    assert_eq!(done_a["verified_identities"], json!([]), "{done_a}");
    assert_eq!(done_b["verified_identities"], json!([]), "{done_b}");

    // Without cross-signing keys there is nothing to sign: the SDK records the SAS as local
    // trust in B's device (`LocalTrust::Verified`), so B counts as verified through that
    // alone, and nobody cross-signed it. The user has no identity.
    let status = a.expect(json!({"cmd": "status", "user": user.user_id}), "status");
    assert_eq!(status["identity"], json!(null), "{status}");
    let peer_b = device(&status, "PEERB");
    assert_eq!(peer_b["locally_trusted"], true, "{status}");
    assert_eq!(peer_b["verified"], true, "{status}");
    assert_eq!(peer_b["cross_signed_by_owner"], false, "{status}");

    a.expect(json!({"cmd": "quit"}), "bye");
    b.expect(json!({"cmd": "quit"}), "bye");
}

#[test]
fn an_sdk_cross_signing_identity_is_seen_by_another_user() {
    let synapse = Synapse::get();
    let bob = synapse.register("bob");
    let carol = synapse.register("carol");
    let mut b = Peer::start(synapse, &bob, "BOBPHONE");
    let mut c = Peer::start(synapse, &carol, "CAROLDEV");
    b.ready();
    c.ready();

    // Bob's device makes and uploads his cross-signing identity, and signs itself with it.
    let boot = b.expect(json!({"cmd": "bootstrap"}), "bootstrapped");
    let master_key = boot["master_key"].as_str().unwrap().to_string();
    assert_eq!(
        master_key.len(),
        43,
        "an unpadded base64 ed25519 key: {boot}"
    );

    // Bob trusts his own identity (the SDK marks an identity it made as verified, and the
    // server's copy matches its private keys), and his device is signed by his self-signing
    // key. The SDK always reports its own device as locally trusted.
    let own = b.expect(json!({"cmd": "status", "user": bob.user_id}), "status");
    assert_eq!(
        own["identity"],
        json!({"master_key": master_key, "verified": true, "own": true}),
        "{own}"
    );
    let phone = device(&own, "BOBPHONE");
    assert_eq!(phone["own_device"], true, "{own}");
    assert_eq!(phone["cross_signed_by_owner"], true, "{own}");
    assert_eq!(phone["locally_trusted"], true, "{own}");
    assert_eq!(phone["verified"], true, "{own}");

    // Carol sees Bob's identity with that master key, and his device signed by it, but she
    // has not verified him: neither the identity nor the device is verified for her.
    c.expect(json!({"cmd": "track", "user": bob.user_id}), "tracked");
    let seen = c.expect(json!({"cmd": "status", "user": bob.user_id}), "status");
    assert_eq!(
        seen["identity"],
        json!({"master_key": master_key, "verified": false, "own": false}),
        "{seen}"
    );
    let phone = device(&seen, "BOBPHONE");
    assert_eq!(phone["own_device"], false, "{seen}");
    assert_eq!(phone["cross_signed_by_owner"], true, "{seen}");
    assert_eq!(phone["locally_trusted"], false, "{seen}");
    assert_eq!(phone["verified"], false, "{seen}");

    b.expect(json!({"cmd": "quit"}), "bye");
    c.expect(json!({"cmd": "quit"}), "bye");
}
