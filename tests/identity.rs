//! The cross-signing identity on the token, end to end against a real Synapse.
//!
//! Synapse checks SSK/USK uploads and signature uploads itself, so a command that succeeds
//! means Synapse accepted every signature. Other clients are played by the tests with
//! independent code (ed25519-dalek, vodozemac, raw HTTP).

mod common;

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD as B64;
use common::clients::{
    device_trust, phone, random_key, sign_with, software_identity, user_trust, verifies,
};
use common::synapse::{MxhsmUser as Alice, Proxy, http};
use common::{Kind, fails, ok, output};
use serde_json::{Value, json};

fn publish_sign_device_and_user(kind: Kind) {
    let alice = Alice::new(kind);
    let own_device = alice.login();
    let out = ok(alice.cli().args(["identity", "create"]));
    assert!(
        out.contains(&format!(
            "published the cross-signing identity of {}",
            alice.user.user_id
        )),
        "{out}"
    );
    let status = alice.status(&[]);
    assert_eq!(status["identity_ok"], true, "{status}");
    assert_eq!(device_trust(&status, &own_device).0, "verified");

    // The server serves our token's keys, and our device is signed by the SSK
    // (checked here with ed25519-dalek, independently of mxhsm).
    let pk = |role: &str| alice.token_key(role);
    let (phone_token, _) = phone(alice.synapse, &alice.user, "PHONE");
    let q = alice.query(&phone_token, &alice.user.user_id);
    let me = &alice.user.user_id;
    assert_eq!(
        q["master_keys"][me]["keys"][format!("ed25519:{}", pk("master"))],
        pk("master")
    );
    assert!(verifies(&q["self_signing_keys"][me], me, &pk("master")));
    assert!(verifies(&q["user_signing_keys"][me], me, &pk("master")));
    assert!(verifies(
        &q["device_keys"][me][&own_device],
        me,
        &pk("self_signing")
    ));

    // A second device (the phone) is unsigned until we sign it.
    assert_eq!(device_trust(&alice.status(&[]), "PHONE").0, "unsigned");
    let out = ok(alice.cli().args(["sign", "device", "PHONE", "--yes"]));
    assert!(out.contains("signed 1 device(s): PHONE"), "{out}");
    assert_eq!(device_trust(&alice.status(&[]), "PHONE").0, "verified");
    let q = alice.query(&phone_token, me);
    assert!(verifies(
        &q["device_keys"][me]["PHONE"],
        me,
        &pk("self_signing")
    ));

    // Bob, with an identity made by another client.
    let bob = alice.synapse.register("bob");
    let bob_token = alice.synapse.login(&bob, "BOBPHONE");
    let bob_msk = software_identity(alice.synapse, &bob, &bob_token);
    let bob_fp = B64.encode(bob_msk.verifying_key().to_bytes());
    let status = alice.status(&["--user", &bob.user_id]);
    assert_eq!(user_trust(&status, &bob.user_id).0, "unsigned");
    // A wrong fingerprint: refused, nothing signed.
    let err = fails(alice.cli().args([
        "sign",
        "user",
        &bob.user_id,
        "--fingerprint",
        &B64.encode([1u8; 32]),
    ]));
    assert!(
        err.contains("not the fingerprint given: nothing signed"),
        "{err}"
    );
    // Without a fingerprint and without a terminal to confirm: refused.
    let err = fails(alice.cli().args(["sign", "user", &bob.user_id]));
    assert!(err.contains("refusing without a terminal to confirm; pass the fingerprint you verified with --fingerprint"), "{err}");
    assert_eq!(
        user_trust(&alice.status(&["--user", &bob.user_id]), &bob.user_id).0,
        "unsigned"
    );
    // The right fingerprint, typed with spaces as it is read aloud.
    let spaced: String = bob_fp
        .as_bytes()
        .chunks(4)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join(" ");
    ok(alice
        .cli()
        .args(["sign", "user", &bob.user_id, "--fingerprint", &spaced]));
    assert_eq!(
        user_trust(&alice.status(&["--user", &bob.user_id]), &bob.user_id).0,
        "verified"
    );
    let q = alice.query(&phone_token, &bob.user_id);
    assert!(verifies(
        &q["master_keys"][&bob.user_id],
        me,
        &pk("user_signing")
    ));
}

per_token!(publish_sign_device_and_user);

#[test]
fn signing_all_unsigned_devices_in_one_go() {
    let alice = Alice::new(Kind::Kryoptic);
    alice.login();
    ok(alice.cli().args(["identity", "create"]));
    for id in ["DEV1", "DEV2", "DEV3"] {
        phone(alice.synapse, &alice.user, id);
    }
    // Every unsigned device is listed with its fingerprint, and then asked about: without a
    // terminal, nothing is signed.
    let err = fails(alice.cli().args(["sign", "devices", "--all-unsigned"]));
    assert!(
        err.contains("3 device(s) of") && err.contains("pass --yes with the device IDs named"),
        "{err}"
    );
    // --yes signs only devices named on the command line.
    let err = fails(
        alice
            .cli()
            .args(["sign", "devices", "--all-unsigned", "--yes"]),
    );
    assert!(err.contains("name the devices"), "{err}");
    let out = ok(alice
        .cli()
        .args(["sign", "devices", "DEV1", "DEV2", "DEV3", "--yes"]));
    assert!(
        out.contains("signed 3 device(s): DEV1, DEV2, DEV3"),
        "{out}"
    );
    let status = alice.status(&[]);
    for id in ["DEV1", "DEV2", "DEV3"] {
        assert_eq!(device_trust(&status, id).0, "verified");
    }
    let out = ok(alice.cli().args(["sign", "devices", "--all-unsigned"]));
    assert!(out.contains("no unsigned devices"), "{out}");
}

#[test]
fn republishing_asks_for_the_password_and_a_wrong_one_changes_nothing() {
    let alice = Alice::new(Kind::Kryoptic);
    alice.login();
    ok(alice.cli().args(["identity", "create"]));
    let before = alice.status(&[])["master_key"].clone();
    // Publishing the same keys again needs no password.
    ok(alice
        .cli()
        .env_remove("MXHSM_PASSWORD")
        .args(["identity", "publish"]));
    // New keys (a new generation on the token) replace the published ones only with UIA.
    for role in ["master", "self_signing", "user_signing"] {
        ok(alice.cli().args([
            "keys",
            "generate",
            "--user",
            &alice.user.user_id,
            "--role",
            role,
        ]));
    }
    // A new master key is a new identity: refused without --replace (exit 4).
    let err = common::exits_err(4, alice.cli().args(["identity", "publish"]));
    assert!(
        err.contains("already publishes the cross-signing identity"),
        "{err}"
    );
    let err = fails(alice.cli().env("MXHSM_PASSWORD", "wrong").args([
        "identity",
        "publish",
        "--replace",
        "--yes",
    ]));
    assert!(
        err.contains(&format!(
            "wrong password for {}: nothing was changed",
            alice.user.user_id
        )),
        "{err}"
    );
    let status = alice.status(&[]);
    assert_eq!(status["identity_ok"], false);
    assert!(
        status["identity_problems"][0]
            .as_str()
            .unwrap()
            .contains(&format!(
                "the server serves the master key {}",
                before.as_str().unwrap()
            )),
        "{status}"
    );
    let err = fails(alice.cli().env_remove("MXHSM_PASSWORD").args([
        "identity",
        "publish",
        "--replace",
        "--yes",
    ]));
    assert!(err.contains("a password is needed"), "{err}");
    ok(alice
        .cli()
        .args(["identity", "publish", "--replace", "--yes"]));
    let status = alice.status(&[]);
    assert_eq!(status["identity_ok"], true, "{status}");
    assert_ne!(status["master_key"], before);
}

/// Synapse stores master-key signatures without checking them: a junk "signature by
/// Alice's user-signing key" on Bob's master key is served back, and must not count.
#[test]
fn forged_master_key_signatures_stored_by_synapse_are_not_trusted() {
    let alice = Alice::new(Kind::SoftHsm);
    alice.login();
    ok(alice.cli().args(["identity", "create"]));
    let keys: Value =
        serde_json::from_str(&ok(alice.cli().args(["keys", "list", "--json"]))).unwrap();
    let usk = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["role"] == "user_signing")
        .unwrap()["public_key"]
        .as_str()
        .unwrap()
        .to_string();
    let bob = alice.synapse.register("bob");
    let token = alice.synapse.login(&bob, "BOBDEV");
    let msk = random_key();
    let b = B64.encode(msk.verifying_key().to_bytes());
    let mut master =
        json!({"user_id": bob.user_id, "usage": ["master"], "keys": {format!("ed25519:{b}"): b}});
    master["signatures"][&alice.user.user_id][format!("ed25519:{usk}")] =
        json!(B64.encode([9u8; 64]));
    let (s, v) = http(
        &alice.synapse.url,
        "POST",
        "/keys/device_signing/upload",
        Some(&token),
        Some(json!({"master_key": master})),
    );
    assert_eq!(s, 200, "Synapse accepts it: {v}");
    let status = alice.status(&["--user", &bob.user_id]);
    let (trust, why) = user_trust(&status, &bob.user_id);
    assert_eq!(trust, "chain-broken", "{status}");
    assert!(why.contains("does not verify"), "{why}");
}

/// A server (a proxy in front of Synapse) that serves a forged SSK, a forged device
/// signature, or a device whose keys changed after it was signed.
#[test]
fn forged_keys_served_by_the_server_are_untrusted_with_reasons() {
    let alice = Alice::new(Kind::SoftHsm);
    alice.login();
    ok(alice.cli().args(["identity", "create"]));
    let (_, _) = phone(alice.synapse, &alice.user, "PHONE");
    let (_, _) = phone(alice.synapse, &alice.user, "TABLET");
    ok(alice
        .cli()
        .args(["sign", "devices", "PHONE", "TABLET", "--yes"]));
    let me = alice.user.user_id.clone();

    let with_proxy = |rewrite: Arc<common::synapse::Rewrite>| {
        let proxy = Proxy::start(&alice.synapse.url, rewrite);
        let session: Value =
            serde_json::from_str(&std::fs::read_to_string(alice.session_path()).unwrap()).unwrap();
        let mut s2 = session.clone();
        s2["homeserver"] = json!(proxy.url);
        std::fs::write(alice.session_path(), s2.to_string()).unwrap();
        let status = alice.status(&[]);
        std::fs::write(alice.session_path(), session.to_string()).unwrap();
        status
    };

    // 1. A forged SSK: a key the server made, with a made-up "master signature".
    let me1 = me.clone();
    let status = with_proxy(Arc::new(move |path, _, v| {
        if path.starts_with("/keys/query") {
            let evil = random_key();
            let b = B64.encode(evil.verifying_key().to_bytes());
            let old = v["self_signing_keys"][&me1].clone();
            let master_id = old["signatures"][&me1]
                .as_object()
                .unwrap()
                .keys()
                .next()
                .unwrap()
                .clone();
            let mut forged = json!({"user_id": me1, "usage": ["self_signing"], "keys": {format!("ed25519:{b}"): b}});
            sign_with(&mut forged, &me1, &master_id, &evil);
            v["self_signing_keys"][&me1] = forged;
        }
    }));
    assert_eq!(status["identity_ok"], false);
    assert!(
        status["identity_problems"]
            .to_string()
            .contains("not validly signed by the master key"),
        "{status}"
    );
    for d in ["PHONE", "TABLET"] {
        assert_eq!(device_trust(&status, d).0, "chain-broken", "{status}");
    }

    // 2. A forged device signature, and 3. a device whose keys changed after signing.
    let me2 = me.clone();
    let status = with_proxy(Arc::new(move |path, _, v| {
        if path.starts_with("/keys/query") {
            let phone = &mut v["device_keys"][&me2]["PHONE"];
            let ssk_id = phone["signatures"][&me2]
                .as_object()
                .unwrap()
                .keys()
                .find(|k| *k != "ed25519:PHONE")
                .unwrap()
                .clone();
            phone["signatures"][&me2][&ssk_id] = json!(B64.encode([5u8; 64]));
            let tablet = &mut v["device_keys"][&me2]["TABLET"];
            let new_key = random_key();
            tablet["keys"]["ed25519:TABLET"] =
                json!(B64.encode(new_key.verifying_key().to_bytes()));
            sign_with(tablet, &me2, "ed25519:TABLET", &new_key);
        }
    }));
    assert_eq!(status["identity_ok"], true);
    let (t, why) = device_trust(&status, "PHONE");
    assert_eq!(t, "chain-broken");
    assert!(why.contains("does not match"), "{why}");
    let (t, why) = device_trust(&status, "TABLET");
    assert_eq!(t, "chain-broken");
    assert!(why.contains("keys changed"), "{why}");
    // Without the proxy, all is well again.
    let status = alice.status(&[]);
    assert_eq!(device_trust(&status, "PHONE").0, "verified");
    assert_eq!(device_trust(&status, "TABLET").0, "verified");
}

/// The server is down after the keys were generated: re-running finishes the job with the
/// same keys, none lost, none duplicated.
#[test]
fn an_interrupted_publish_can_be_rerun() {
    let alice = Alice::new(Kind::SoftHsm);
    alice.login();
    let session = std::fs::read_to_string(alice.session_path()).unwrap();
    let mut down: Value = serde_json::from_str(&session).unwrap();
    down["homeserver"] = json!(format!("http://127.0.0.1:{}", common::synapse::free_port()));
    std::fs::write(alice.session_path(), down.to_string()).unwrap();
    let err = fails(alice.cli().args(["identity", "create"]));
    assert!(err.contains("cannot reach the homeserver"), "{err}");
    let keys = |a: &Alice| -> Vec<String> {
        let v: Value = serde_json::from_str(&ok(a.cli().args(["keys", "list", "--json"]))).unwrap();
        v["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["public_key"].as_str().unwrap().to_string())
            .collect()
    };
    // The server is asked before anything is made: nothing was generated.
    assert_eq!(
        keys(&alice).len(),
        0,
        "no key made while the server was unreachable"
    );
    std::fs::write(alice.session_path(), &session).unwrap();
    // Keys made, then the upload fails: re-running publishes the same keys.
    ok(alice.cli().args(["identity", "create", "--no-publish"]));
    let generated = keys(&alice);
    assert_eq!(generated.len(), 3);
    let (success, out, err) = output(alice.cli().args(["identity", "create"]));
    assert!(success, "{err}");
    assert!(err.contains("already holds the master key"), "{err}");
    assert!(out.contains("published"), "{out}");
    assert_eq!(keys(&alice), generated, "no key lost, none duplicated");
    let status = alice.status(&[]);
    assert_eq!(status["identity_ok"], true);
    assert_eq!(status["master_key"].as_str().unwrap(), generated[0]);
}

/// 503s and 429s are retried; an OAuth-delegating server gets a clear error with its URL.
#[test]
fn retries_and_oauth_delegation() {
    let alice = Alice::new(Kind::Kryoptic);
    alice.login();
    let failures = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let f = failures.clone();
    let proxy = Proxy::start_intercepting(
        &alice.synapse.url,
        Arc::new(move |path, status, v| {
            if path.starts_with("/keys/query")
                && f.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 2
            {
                *status = if f.load(std::sync::atomic::Ordering::SeqCst) == 1 {
                    503
                } else {
                    429
                };
                *v = json!({"errcode": "M_LIMIT_EXCEEDED", "retry_after_ms": 50});
            }
        }),
        // An OAuth-delegating server (MAS) answers the upload itself.
        Arc::new(|path| {
            path.starts_with("/keys/device_signing/upload").then(|| {
                (401, json!({"session": "s", "flows": [{"stages": ["m.oauth"]}, {"stages": ["org.matrix.cross_signing_reset"]}],
                        "params": {"m.oauth": {"url": "https://account.example.org/?action=org.matrix.cross_signing_reset"}}}))
            })
        }),
    );
    let session = std::fs::read_to_string(alice.session_path()).unwrap();
    let mut via: Value = serde_json::from_str(&session).unwrap();
    via["homeserver"] = json!(proxy.url);
    std::fs::write(alice.session_path(), via.to_string()).unwrap();
    let err = fails(alice.cli().args(["identity", "create"]));
    assert!(err.contains("approve resetting your cross-signing keys at https://account.example.org/?action=org.matrix.cross_signing_reset"), "{err}");
    let status = alice.status(&[]);
    assert_eq!(
        status["identity_ok"], false,
        "nothing was published: {status}"
    );
    assert!(
        failures.load(std::sync::atomic::Ordering::SeqCst) >= 3,
        "the 503 and the 429 were retried"
    );
}

#[test]
fn logout_deletes_the_device_and_bad_logins_are_clear() {
    let alice = Alice::new(Kind::Kryoptic);
    let err = fails(alice.cli().env("MXHSM_PASSWORD", "nope").args([
        "login",
        "--homeserver",
        &alice.synapse.url,
        "--user",
        &alice.user.localpart,
    ]));
    assert!(err.contains("wrong password for"), "{err}");
    assert!(!alice.session_path().exists());
    let err =
        fails(
            alice
                .cli()
                .args(["login", "--homeserver", "matrix.example.org", "--user", "x"]),
        );
    // A server name is looked up (/.well-known/matrix/client), and this one does not exist.
    assert!(
        err.contains("/.well-known/matrix/client") && err.contains("cannot reach"),
        "{err}"
    );
    let err = fails(
        alice
            .cli()
            .args(["login", "--homeserver", "ftp://x.example", "--user", "x"]),
    );
    assert!(err.contains("is not a homeserver URL"), "{err}");
    let device = alice.login();
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(alice.session_path())
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let other = alice.synapse.login(&alice.user, "OTHER");
    let devices = |t: &str| {
        alice.query(t, &alice.user.user_id)["device_keys"][&alice.user.user_id]
            .as_object()
            .map(|m| m.keys().cloned().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    assert!(devices(&other).contains(&device));
    ok(alice.cli().args(["logout"]));
    assert!(!alice.session_path().exists());
    assert!(!devices(&other).contains(&device), "the device is gone");
    let err = fails(alice.cli().args(["identity", "status"]));
    assert!(err.contains("not logged in"), "{err}");
}

/// Answers above ureq's default 10 MB limit (a large key backup) are read whole.
#[test]
fn large_answers_are_read_whole() {
    let alice = Alice::new(Kind::Kryoptic);
    alice.login();
    ok(alice.cli().args(["identity", "create"]));
    let proxy = Proxy::start(
        &alice.synapse.url,
        Arc::new(|path, _, v| {
            if path.starts_with("/keys/query") {
                v["padding"] = json!("x".repeat(12 << 20));
            }
        }),
    );
    let session = std::fs::read_to_string(alice.session_path()).unwrap();
    let mut via: Value = serde_json::from_str(&session).unwrap();
    via["homeserver"] = json!(proxy.url);
    std::fs::write(alice.session_path(), via.to_string()).unwrap();
    let status = alice.status(&[]);
    assert_eq!(status["identity_ok"], true, "{status}");
}

/// Logging in again once the identity is on the token cross-signs the new device at once:
/// using mxhsm never leaves an unverified session.
#[test]
fn a_new_login_is_cross_signed_at_once() {
    let alice = Alice::new(Kind::Kryoptic);
    let first = alice.login();
    ok(alice.cli().args(["identity", "create"]));
    ok(alice.cli().args(["logout"]));
    let out = ok(alice.cli().args([
        "login",
        "--homeserver",
        &alice.synapse.url,
        "--user",
        &alice.user.localpart,
    ]));
    assert!(
        out.contains("cross-signed this device with the self-signing key on the token"),
        "{out}"
    );
    let status = alice.status(&[]);
    let devices = status["devices"].as_array().unwrap();
    assert_eq!(
        devices.len(),
        1,
        "the first device was deleted at logout: {status}"
    );
    assert_ne!(devices[0]["device_id"], json!(first));
    assert_eq!(devices[0]["trust"], "verified", "{status}");
    // Without a token configured, login does not ask for one and leaves signing for later.
    ok(alice.cli().args(["logout"]));
    let out = ok(alice.cli().env_remove("MXHSM_TOKEN").args([
        "login",
        "--homeserver",
        &alice.synapse.url,
        "--user",
        &alice.user.localpart,
    ]));
    assert!(out.contains("cross-signs this device"), "{out}");
}

/// Bob, with an identity another client made and his device BOBPHONE, verified by Alice:
/// his master key signed with the user-signing key on her token.
fn bob_verified_by(alice: &Alice) -> common::synapse::TestUser {
    let bob = alice.synapse.register("bob");
    let bob_token = alice.synapse.login(&bob, "BOBPHONE");
    let bob_msk = software_identity(alice.synapse, &bob, &bob_token);
    let fp = common::clients::spaced(&B64.encode(bob_msk.verifying_key().to_bytes()));
    ok(alice
        .cli()
        .args(["sign", "user", &bob.user_id, "--fingerprint", &fp]));
    bob
}

/// `identity status --tree` draws the chains of trust in 80 columns: the master key and
/// what holds it, the self-signing key with our devices, the user-signing key with the
/// users we verified, the backup; each verdict with its reason. Captured from a real
/// 80-column terminal (tmux), it is exactly what was printed: nothing wrapped.
#[test]
fn the_trust_tree_fits_80_columns() {
    let alice = Alice::new(Kind::SoftHsm);
    let own = alice.login();
    ok(alice.cli().args(["identity", "create"]));
    ok(alice.cli().args(["backup", "create"]));
    let (_phone_token, _) = phone(alice.synapse, &alice.user, "PHONE");
    let bob = bob_verified_by(&alice);
    let master = alice.token_key("master");
    let (code, out, err) =
        common::run(
            alice
                .cli()
                .args(["identity", "status", "--tree", "--user", &bob.user_id]),
        );
    // An unsigned device is shown, not a problem of the identity (exit 0, as without
    // --tree).
    assert_eq!(code, 0, "{out}{err}");
    for line in out.lines() {
        assert!(
            line.chars().count() <= 80,
            "{} columns: {line}",
            line.chars().count()
        );
    }
    let has = |s: &str| assert!(out.contains(s), "no {s:?} in\n{out}");
    has(&alice.user.user_id);
    has(&format!("master key {} {}", &master[0..4], &master[4..8]));
    has("on token \"mxhsm-test\"");
    has("✔ published as the token's");
    has("├─ self-signing key");
    has(&format!("device {own} (this mxhsm)"));
    has("device PHONE");
    has("✘ unsigned");
    has("└─ user-signing key");
    has(&format!("{} master", bob.user_id));
    has("✔ auth_data signed by the master key");
    assert!(out.lines().next().unwrap() == alice.user.user_id, "{out}");

    // The same in a real 80-column terminal: what it shows is line for line what was
    // printed (a line over 80 columns would show as two). On the terminal the verdicts
    // are in colour, unless NO_COLOR is set.
    let tree = |no_color: bool| {
        let mut cli = alice.cli();
        cli.args(["identity", "status", "--tree", "--user", &bob.user_id]);
        if no_color {
            cli.env("NO_COLOR", "1");
        }
        common::in_terminal(&cli, 80, alice.token.dir.path())
    };
    let (screen, coloured) = tree(false);
    let printed: Vec<&str> = out.lines().map(str::trim_end).collect();
    assert_eq!(
        screen.lines().collect::<Vec<_>>(),
        printed,
        "the terminal shows something else:\n{screen}"
    );
    assert!(!out.contains('\u{1b}'), "colour in a pipe: {out:?}");
    assert!(
        coloured.contains("\u{1b}[32m"),
        "no colour on the terminal: {coloured:?}"
    );
    let (_, plain) = tree(true);
    assert!(plain.contains("✔ verified"), "{plain}");
    assert!(
        !plain.contains("\u{1b}[3"),
        "colour despite NO_COLOR: {plain:?}"
    );
}

/// The nodes (`node`) and edges (`edge`) of an SVG Graphviz drew: for each, its classes
/// (beyond `node`/`edge`) and its text.
fn svg_items(svg: &str, kind: &str) -> Vec<(String, String)> {
    // Graphviz writes an SVG 1.1 DOCTYPE (no entities of its own).
    let options = roxmltree::ParsingOptions {
        allow_dtd: true,
        ..Default::default()
    };
    let doc = roxmltree::Document::parse_with_options(svg, options).expect("the SVG parses as XML");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    doc.descendants()
        .filter(|n| n.tag_name().name() == "g")
        .filter_map(|n| {
            let class = n.attribute("class")?;
            let mut words = class.split_whitespace();
            if words.next() != Some(kind) {
                return None;
            }
            let text = n
                .descendants()
                .filter(|t| t.tag_name().name() == "text")
                .filter_map(|t| t.text())
                .collect::<Vec<_>>()
                .join(" ");
            Some((words.collect::<Vec<_>>().join(" "), text))
        })
        .collect()
}

/// `mxhsm graph` draws the live account: the token's private keys (red), the public keys,
/// devices and the user we verified (green), the backup and secret storage (orange),
/// signatures and the backup's encryption, and a broken link with its reason. Checked in
/// the SVG Graphviz made, by class and text. A device name chosen by another client cannot
/// add a node or break out of its label. Without a session it draws the token alone.
#[test]
fn the_graph_holds_every_key_and_device_with_its_colour() {
    let alice = Alice::new(Kind::SoftHsm);
    let own = alice.login();
    ok(alice.cli().args(["identity", "create"]));
    ok(alice.cli().args(["backup", "create"]));
    let (phone_token, _) = phone(alice.synapse, &alice.user, "PHONE");
    phone(alice.synapse, &alice.user, "TABLET");
    ok(alice.cli().args(["sign", "device", "PHONE", "--yes"]));
    let evil_name = "x\"]; n99 [label=\"pwned\\N\u{202e}";
    let (s, v) = http(
        &alice.synapse.url,
        "PUT",
        "/devices/PHONE",
        Some(&phone_token),
        Some(json!({"display_name": evil_name})),
    );
    assert_eq!(s, 200, "{v}");
    let bob = bob_verified_by(&alice);

    let dir = alice.token.dir.path();
    let svg_path = dir.join("keys.svg");
    let out = ok(alice
        .cli()
        .args(["graph", "--out", svg_path.to_str().unwrap()]));
    assert!(out.contains("wrote"), "{out}");
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    let nodes = svg_items(&svg, "node");
    let edges = svg_items(&svg, "edge");
    let node = |class: &str, text: &str| {
        nodes
            .iter()
            .filter(|(c, t)| c == class && t.contains(text))
            .count()
    };
    let short = |role: &str| {
        let k = alice.token_key(role);
        format!("{} {} {}", &k[0..4], &k[4..8], &k[8..12])
    };
    for role in ["master", "self-signing", "user-signing", "backup"] {
        assert_eq!(
            node("private", &format!("{role} private key")),
            1,
            "{role} {nodes:?}"
        );
    }
    assert_eq!(node("private", "non-extractable"), 4, "{nodes:?}");
    for (role, words) in [
        ("master", "master key"),
        ("self_signing", "self-signing key"),
        ("user_signing", "user-signing key"),
        ("backup", "backup key"),
    ] {
        assert_eq!(
            node("public", &format!("{words} {}", short(role))),
            1,
            "{role} {nodes:?}"
        );
    }
    assert_eq!(node("public", &format!("device {own} (this mxhsm)")), 1);
    assert_eq!(node("public", "device PHONE"), 1, "{nodes:?}");
    assert_eq!(node("public", "device TABLET"), 1, "{nodes:?}");
    // Bob is drawn without --user: the audit log says our user-signing key signed him.
    assert_eq!(node("public", &format!("{} master key", bob.user_id)), 1);
    assert_eq!(node("shared", "key backup version"), 1, "{nodes:?}");
    assert_eq!(node("shared", "secret storage"), 1, "{nodes:?}");
    // The legend shows each colour.
    for class in ["private legend", "public legend", "shared legend"] {
        assert!(nodes.iter().any(|(c, _)| c == class), "{class}: {nodes:?}");
    }
    // The device name is one label's text, escaped: no node of its own.
    assert!(!nodes.iter().any(|(_, t)| t == "pwned"), "{nodes:?}");
    assert!(!svg.contains('\u{202e}'), "a bidi control reached the SVG");
    assert_eq!(node("public", "n99 [label="), 1, "{nodes:?}");
    let edge = |class: &str, text: &str| {
        edges
            .iter()
            .filter(|(c, t)| c == class && t.contains(text))
            .count()
    };
    // MSK → SSK, MSK → USK, SSK → own device and PHONE, USK → Bob, MSK → auth_data.
    assert_eq!(edge("signature", "signs"), 6, "{edges:?}");
    assert_eq!(edge("signature", "signs auth_data"), 1, "{edges:?}");
    assert_eq!(edge("agreement", "room keys encrypted to"), 1, "{edges:?}");
    assert_eq!(edge("broken", "✘ unsigned"), 1, "TABLET: {edges:?}");

    // A server that forges PHONE's signature: that link is drawn broken, with the reason.
    let proxy = Proxy::start(
        &alice.synapse.url,
        Arc::new({
            let me = alice.user.user_id.clone();
            move |path, _, v| {
                if path.starts_with("/keys/query")
                    && let Some(sigs) =
                        v["device_keys"][&me]["PHONE"]["signatures"][&me].as_object_mut()
                {
                    for (k, s) in sigs.iter_mut() {
                        if k != "ed25519:PHONE" {
                            *s = json!(B64.encode([5u8; 64]));
                        }
                    }
                }
            }
        }),
    );
    let session = std::fs::read_to_string(alice.session_path()).unwrap();
    let mut via: Value = serde_json::from_str(&session).unwrap();
    via["homeserver"] = json!(proxy.url);
    std::fs::write(alice.session_path(), via.to_string()).unwrap();
    let forged = ok(alice.cli().args(["graph", "--format", "svg"]));
    std::fs::write(alice.session_path(), &session).unwrap();
    let edges = svg_items(&forged, "edge");
    assert!(
        edges
            .iter()
            .any(|(c, t)| c == "broken" && t.contains("✘ broken") && t.contains("does not match")),
        "{edges:?}"
    );

    // The --json document of a written file (docs/json.md).
    let doc: Value = serde_json::from_str(&ok(alice.cli().args([
        "--json",
        "graph",
        "--format",
        "dot",
        "--out",
        dir.join("keys.dot").to_str().unwrap(),
    ])))
    .unwrap();
    assert_eq!(doc["format"], "dot", "{doc}");
    assert_eq!(doc["version"], 1, "{doc}");
    assert_eq!(doc["token_only"], false, "{doc}");
    assert_eq!(
        doc["bytes"].as_u64().unwrap(),
        std::fs::metadata(dir.join("keys.dot")).unwrap().len()
    );
    let (code, out, _) = common::run(alice.cli().args(["--json", "graph"]));
    assert_eq!(code, 1, "{out}");
    let err: Value = serde_json::from_str(&out).unwrap();
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--json describes the file written with --out"),
        "{err}"
    );

    // DOT text, and a PNG (saved beside the token for a look).
    let dot = ok(alice.cli().args(["graph", "--format", "dot"]));
    assert!(dot.starts_with("digraph mxhsm {"), "{dot}");
    let png = dir.join("keys.png");
    ok(alice
        .cli()
        .args(["graph", "--format", "png", "--out", png.to_str().unwrap()]));
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    if let Some(keep) = std::env::var_os("MXHSM_TEST_KEEP_GRAPH") {
        std::fs::copy(&png, keep).unwrap();
    }

    // An existing file is never replaced; a bad user ID is refused by name.
    let err = fails(
        alice
            .cli()
            .args(["graph", "--out", svg_path.to_str().unwrap()]),
    );
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read_to_string(&svg_path).unwrap(), svg);
    let err = fails(alice.cli().args(["graph", "--user", "bob"]));
    assert!(err.contains("bob"), "{err}");

    // The token alone: without a session, each user's keys and their attributes.
    ok(alice.cli().args(["logout"]));
    let (code, svg, err) = common::run(alice.cli().args(["graph"]));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("not logged in: drawing the token"), "{err}");
    let nodes = svg_items(&svg, "node");
    assert_eq!(
        nodes
            .iter()
            .filter(|(c, t)| c == "private" && t.contains("non-extractable"))
            .count(),
        4,
        "master, self-signing, user-signing and backup keys: {nodes:?}"
    );
    assert!(
        nodes
            .iter()
            .any(|(c, t)| c == "public" && t.contains(&format!("master key {}", short("master")))),
        "{nodes:?}"
    );
    assert!(
        svg.contains(&alice.user.user_id),
        "the cluster names the user"
    );
}

/// After a user-signing key rotation, `identity publish` lists the users the previous key
/// verified (from the audit log): their signatures no longer count. Once a user is
/// verified again with the new key, they are no longer listed.
#[test]
fn a_user_signing_key_rotation_lists_the_users_to_verify_again() {
    let alice = Alice::new(Kind::SoftHsm);
    alice.login();
    ok(alice.cli().args(["identity", "create"]));
    let bob = bob_verified_by(&alice);
    let old_usk = alice.token_key("user_signing");
    ok(alice.cli().args([
        "keys",
        "generate",
        "--user",
        &alice.user.user_id,
        "--role",
        "user_signing",
    ]));
    assert_ne!(alice.token_key("user_signing"), old_usk);
    let out = ok(alice.cli().args(["identity", "publish"]));
    assert!(
        out.contains("1 user(s) were verified with a previous user-signing key")
            && out.contains(&bob.user_id),
        "{out}"
    );
    let status = alice.status(&["--user", &bob.user_id]);
    assert_ne!(user_trust(&status, &bob.user_id).0, "verified", "{status}");

    // Verified again with the new key: no longer listed.
    let fp = status["users"][0]["master_key"]
        .as_str()
        .unwrap()
        .to_string();
    ok(alice.cli().args([
        "sign",
        "user",
        &bob.user_id,
        "--fingerprint",
        &common::clients::spaced(&fp),
    ]));
    let doc: Value =
        serde_json::from_str(&ok(alice.cli().args(["--json", "identity", "publish"]))).unwrap();
    assert_eq!(doc["users_to_reverify"], json!([]), "{doc}");
}
