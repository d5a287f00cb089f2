//! `mxhsm watch`: the alarms a user of a token needs, against a real Synapse. Other
//! clients (a phone, Bob, a client that resets the identity) are played with raw HTTP and
//! ed25519-dalek.

mod common;

use std::io::BufRead;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD as B64;
use common::clients::{phone, random_key, sign_with, software_identity, spaced};
use common::synapse::{MxhsmUser, Proxy, Synapse, TestUser, http};
use common::{Kind, ok, run};
use ed25519_dalek::SigningKey;
use serde_json::{Value, json};

/// `watch --once --json`: (exit code, events).
fn once(user: &MxhsmUser, extra: &[&str]) -> (i32, Vec<Value>) {
    let (code, out, err) = run(user.cli().args(["--json", "watch", "--once"]).args(extra));
    let events: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?} ({err})")))
        .collect();
    events.iter().for_each(common::json_doc::check_event);
    (code, events)
}

fn kinds(events: &[Value]) -> Vec<&str> {
    events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect()
}

/// New cross-signing keys for `user`, uploaded as another client would (with the password
/// when the server asks): an identity reset.
fn reset_identity(synapse: &Synapse, user: &TestUser, token: &str) -> SigningKey {
    let (msk, ssk, usk) = (random_key(), random_key(), random_key());
    let b = |k: &SigningKey| B64.encode(k.verifying_key().to_bytes());
    let obj = |usage: &str, k: &SigningKey| json!({"user_id": user.user_id, "usage": [usage], "keys": {format!("ed25519:{}", b(k)): b(k)}});
    let mut s = obj("self_signing", &ssk);
    let mut u = obj("user_signing", &usk);
    sign_with(&mut s, &user.user_id, &format!("ed25519:{}", b(&msk)), &msk);
    sign_with(&mut u, &user.user_id, &format!("ed25519:{}", b(&msk)), &msk);
    let mut body =
        json!({"master_key": obj("master", &msk), "self_signing_key": s, "user_signing_key": u});
    let (st, v) = http(
        &synapse.url,
        "POST",
        "/keys/device_signing/upload",
        Some(token),
        Some(body.clone()),
    );
    if st == 401 {
        body["auth"] = json!({
            "type": "m.login.password", "session": v["session"],
            "identifier": {"type": "m.id.user", "user": user.localpart},
            "password": user.password,
        });
        let (st, v) = http(
            &synapse.url,
            "POST",
            "/keys/device_signing/upload",
            Some(token),
            Some(body),
        );
        assert_eq!(st, 200, "{v}");
    } else {
        assert_eq!(st, 200, "{v}");
    }
    msk
}

#[test]
fn each_alarm_is_raised_with_its_exit_code() {
    let alice = MxhsmUser::new(Kind::SoftHsm);
    alice.login();
    ok(alice.cli().args(["identity", "create"]));
    ok(alice.cli().args(["backup", "create"]));
    let me = alice.user.user_id.clone();
    assert_eq!(once(&alice, &[]), (0, vec![]));

    // A new login that is not cross-signed: exit 13, with its fingerprint.
    let (phone_token, phone_key) = phone(alice.synapse, &alice.user, "PHONE");
    let (code, events) = once(&alice, &[]);
    assert_eq!((code, kinds(&events)), (13, vec!["unsigned_device"]));
    assert_eq!(events[0]["device_id"], "PHONE");
    assert_eq!(
        events[0]["ed25519"],
        B64.encode(phone_key.verifying_key().to_bytes())
    );
    ok(alice.cli().args(["sign", "device", "PHONE", "--yes"]));
    assert_eq!(once(&alice, &[]), (0, vec![]));

    // Bob, verified by Alice, later publishes another master key: exit 11.
    let bob = alice.synapse.register("bob");
    let bob_token = alice.synapse.login(&bob, "BOBPHONE");
    let bob_msk = software_identity(alice.synapse, &bob, &bob_token);
    let fp = spaced(&B64.encode(bob_msk.verifying_key().to_bytes()));
    ok(alice
        .cli()
        .args(["sign", "user", &bob.user_id, "--fingerprint", &fp]));
    assert_eq!(once(&alice, &[]), (0, vec![]));
    let new_bob = reset_identity(alice.synapse, &bob, &bob_token);
    let (code, events) = once(&alice, &[]);
    assert_eq!((code, kinds(&events)), (11, vec!["verified_user_changed"]));
    assert_eq!(events[0]["user_id"], bob.user_id);
    assert_eq!(
        events[0]["published_master_key"],
        B64.encode(new_bob.verifying_key().to_bytes())
    );

    // Another client replaces the backup with one of its own: reported once as changed,
    // and as untrusted for as long as it stays.
    let (st, v) = http(
        &alice.synapse.url,
        "POST",
        "/room_keys/version",
        Some(&phone_token),
        Some(
            json!({"algorithm": "m.megolm_backup.v1.curve25519-aes-sha2",
                    "auth_data": {"public_key": B64.encode(random_key().verifying_key().to_bytes())}}),
        ),
    );
    assert_eq!(st, 200, "{v}");
    let (code, events) = once(&alice, &[]);
    assert_eq!(code, 11, "the loudest alarm decides: {events:?}");
    assert_eq!(
        kinds(&events),
        [
            "verified_user_changed",
            "backup_changed",
            "backup_untrusted"
        ]
    );
    assert_eq!(events[1]["backup_version"], v["version"]);
    assert_eq!(
        events[1]["version"], 1,
        "events carry the interface version"
    );
    let (_, events) = once(&alice, &[]);
    assert_eq!(
        kinds(&events),
        ["verified_user_changed", "backup_untrusted"]
    );

    // Secret storage holding a copy of a key that is on the token.
    let (st, v) = http(
        &alice.synapse.url,
        "PUT",
        &format!("/user/{me}/account_data/m.cross_signing.master"),
        Some(&phone_token),
        Some(
            json!({"encrypted": {"somekey": {"iv": "AAAA", "ciphertext": "AAAA", "mac": "AAAA"}}}),
        ),
    );
    assert_eq!(st, 200, "{v}");
    let (_, events) = once(&alice, &[]);
    let e = events
        .iter()
        .find(|e| e["event"] == "secret_storage_copy")
        .unwrap_or_else(|| panic!("{events:?}"));
    assert_eq!(
        (e["secret"].clone(), e["role"].clone()),
        (json!("m.cross_signing.master"), json!("master"))
    );

    // Some client resets Alice's identity: the loudest alarm, exit 10, first line, and in
    // words with how to take it back.
    let reset = reset_identity(alice.synapse, &alice.user, &phone_token);
    let (code, events) = once(&alice, &[]);
    assert_eq!(code, 10, "{events:?}");
    assert_eq!(events[0]["event"], "identity_reset");
    assert_eq!(
        events[0]["published_master_key"],
        B64.encode(reset.verifying_key().to_bytes())
    );
    assert_eq!(events[0]["token_master_key"], alice.token_key("master"));
    // The master key in secret storage is now the reset's own, not a copy of the token's:
    // no copy alarm, and the doctor does not call secret storage clean either.
    assert!(
        !events.iter().any(|e| e["event"] == "secret_storage_copy"),
        "{events:?}"
    );
    let (_, out, _) = run(alice.cli().args(["--json", "doctor"]));
    let doctor: Value = serde_json::from_str(&out).unwrap();
    let line = doctor["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "secret storage")
        .unwrap_or_else(|| panic!("{doctor}"));
    assert!(
        line["ok"] == false && line["detail"].as_str().unwrap().starts_with("not judged"),
        "{line}"
    );
    let (code, out, _) = run(alice.cli().args(["watch", "--once"]));
    assert_eq!(code, 10);
    assert!(
        out.lines()
            .next()
            .unwrap()
            .starts_with("ALARM identity reset")
            && out.contains("mxhsm identity publish --replace"),
        "{out}"
    );
}

/// The hook gets each event on standard input; a display name the server's users chose
/// never becomes part of the command line.
#[test]
fn the_exec_hook_gets_events_as_data_only() {
    let alice = MxhsmUser::new(Kind::SoftHsm);
    alice.login();
    ok(alice.cli().args(["identity", "create"]));
    let (phone_token, _) = phone(alice.synapse, &alice.user, "PHONE");
    let pwned = alice.token.dir.path().join("pwned");
    let (st, v) = http(
        &alice.synapse.url,
        "PUT",
        "/devices/PHONE",
        Some(&phone_token),
        Some(json!({"display_name": "$(touch pwned) `touch pwned` \u{1b}[2J"})),
    );
    assert_eq!(st, 200, "{v}");
    let log = alice.token.dir.path().join("events.jsonl");
    let cmd = format!(
        "echo \"$MXHSM_EVENT\" >> '{0}' && cat >> '{0}'",
        log.display()
    );
    // Run where `pwned` would appear if the name were executed.
    let (code, out, _) = run(alice
        .cli()
        .current_dir(alice.token.dir.path())
        .args(["watch", "--once", "--exec", &cmd]));
    assert_eq!(code, 13, "{out}");
    assert!(
        !out.contains('\u{1b}'),
        "the terminal escape must be escaped: {out:?}"
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    let mut lines = logged.lines();
    assert_eq!(lines.next(), Some("unsigned_device"));
    let event: Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(event["device_id"], "PHONE");
    assert!(
        event["display_name"]
            .as_str()
            .unwrap()
            .starts_with("$(touch")
    );
    assert!(!pwned.exists(), "the display name was executed");
}

/// Running, the watch reports a new unsigned device as soon as a sync says the device
/// list changed, and only once.
#[test]
fn a_running_watch_reports_a_new_login() {
    let alice = MxhsmUser::new(Kind::SoftHsm);
    alice.login();
    ok(alice.cli().args(["identity", "create"]));
    let mut child = alice
        .cli()
        .args(["--json", "watch"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let reader = {
        let lines = lines.clone();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(l);
            }
        })
    };
    // Let the first check pass (it finds nothing), then log in somewhere new.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        lines.lock().unwrap().is_empty(),
        "{:?}",
        lines.lock().unwrap()
    );
    phone(alice.synapse, &alice.user, "TABLET");
    let start = Instant::now();
    while lines.lock().unwrap().is_empty() && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(200));
    }
    // A second change that is not about devices brings nothing new.
    std::thread::sleep(Duration::from_secs(2));
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();
    let lines = lines.lock().unwrap();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let e: Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(
        (e["event"].as_str(), e["device_id"].as_str()),
        (Some("unsigned_device"), Some("TABLET"))
    );
    assert!(
        start.elapsed() < Duration::from_secs(40),
        "reported only after {:?}",
        start.elapsed()
    );
}

/// A hostile server can invent an alarm (here: it serves another master key), but the
/// watch only reads: it uploads nothing, and Synapse still has the token's identity.
#[test]
fn a_hostile_server_can_only_invent_alarms() {
    let alice = MxhsmUser::new(Kind::SoftHsm);
    alice.login();
    ok(alice.cli().args(["identity", "create"]));
    let token_master = alice.token_key("master");
    let evil = B64.encode(random_key().verifying_key().to_bytes());
    let me = alice.user.user_id.clone();
    let paths = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = paths.clone();
    let (me2, evil2) = (me.clone(), evil.clone());
    let proxy = Proxy::start_intercepting(
        &alice.synapse.url,
        Arc::new(move |path, _status, v| {
            if path.contains("/keys/query") {
                v["master_keys"][&me2] = json!({"user_id": me2, "usage": ["master"],
                    "keys": {format!("ed25519:{evil2}"): evil2}});
            }
        }),
        Arc::new(move |path| {
            seen.lock().unwrap().push(path.to_string());
            None
        }),
    );
    let _via = alice.via(&proxy.url);
    let (code, events) = once(&alice, &[]);
    assert_eq!(code, 10, "{events:?}");
    assert_eq!(events[0]["published_master_key"], evil);
    let paths = paths.lock().unwrap();
    assert!(
        !paths
            .iter()
            .any(|p| p.contains("upload") || p.contains("/sendToDevice")),
        "the watch wrote to the server: {paths:?}"
    );
    drop(_via);
    let (phone_token, _) = phone(alice.synapse, &alice.user, "CHECK");
    let (st, q) = http(
        &alice.synapse.url,
        "POST",
        "/keys/query",
        Some(&phone_token),
        Some(json!({"device_keys": {&me: []}})),
    );
    assert_eq!(st, 200);
    assert_eq!(
        q["master_keys"][&me]["keys"][format!("ed25519:{token_master}")],
        token_master
    );
}

/// While the server fails (here: every sync for a while answers 502, more than the
/// client's own retries), the watch waits and goes on; a login made meanwhile is still
/// reported once the server is back.
#[test]
fn a_watch_survives_a_failing_server() {
    let alice = MxhsmUser::new(Kind::SoftHsm);
    alice.login();
    ok(alice.cli().args(["identity", "create"]));
    let failed = Arc::new(Mutex::new(0u32));
    let count = failed.clone();
    let proxy = Proxy::start_intercepting(
        &alice.synapse.url,
        Arc::new(|_, _, _| {}),
        Arc::new(move |path| {
            let mut n = count.lock().unwrap();
            // After the first sync (which records where to resume), 12 failures in a row.
            (path.starts_with("/sync") && path.contains("since=") && *n < 12).then(|| {
                *n += 1;
                (502, json!({"errcode": "M_UNKNOWN", "error": "bad gateway"}))
            })
        }),
    );
    let _via = alice.via(&proxy.url);
    let mut child = alice
        .cli()
        .args(["--json", "watch"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    // The login happens while the server is failing.
    let start = Instant::now();
    while *failed.lock().unwrap() < 3 && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(100));
    }
    phone(alice.synapse, &alice.user, "DURING");
    let line = rx.recv_timeout(Duration::from_secs(90));
    let _ = child.kill();
    let output = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    let line = line.unwrap_or_else(|_| panic!("nothing reported; stderr: {err}"));
    let e: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        (e["event"].as_str(), e["device_id"].as_str()),
        (Some("unsigned_device"), Some("DURING"))
    );
    assert_eq!(*failed.lock().unwrap(), 12, "the server never failed");
    assert!(err.contains("cannot be reached"), "{err}");
}

/// `mxhsm doctor` checks the account against the token, one line each, and names the
/// command that fixes each problem.
#[test]
fn the_account_doctor_names_each_problem_and_its_fix() {
    let alice = MxhsmUser::new(Kind::SoftHsm);
    alice.login();
    ok(alice.cli().args(["identity", "create"]));
    let doctor = |alice: &MxhsmUser| {
        let (code, out, err) = run(alice.cli().args(["--json", "doctor"]));
        let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
        let checks: std::collections::BTreeMap<String, (bool, String)> = v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["name"].as_str().unwrap().to_string(),
                    (
                        c["ok"].as_bool().unwrap(),
                        c["detail"].as_str().unwrap().to_string(),
                    ),
                )
            })
            .collect();
        (code, checks)
    };
    let (code, checks) = doctor(&alice);
    assert_eq!(code, 3, "{checks:?}");
    for ok_name in ["session", "identity", "this device", "secret storage"] {
        assert!(checks[ok_name].0, "{ok_name}: {checks:?}");
    }
    assert!(!checks["backup"].0);
    assert!(
        checks["backup"].1.contains("mxhsm backup create"),
        "{checks:?}"
    );

    ok(alice.cli().args(["backup", "create"]));
    let (code, checks) = doctor(&alice);
    assert_eq!(code, 0, "{checks:?}");
    assert!(checks.values().all(|(ok, _)| *ok), "{checks:?}");
    assert!(checks.contains_key("backup preference"));

    let (phone_token, _) = phone(alice.synapse, &alice.user, "PHONE");
    reset_identity(alice.synapse, &alice.user, &phone_token);
    // On an 80-column terminal the long details wrap inside their column (continuation
    // lines start under it), instead of the terminal breaking them at column 80.
    let mut cli = alice.cli();
    cli.arg("doctor");
    let (screen, _) = common::in_terminal(&cli, 80, alice.token.dir.path());
    assert!(screen.contains("mxhsm identity"), "{screen}");
    for line in screen.lines() {
        assert!(
            line.starts_with(['✔', '✘', ' ']),
            "a line the terminal broke: {line:?}\n{screen}"
        );
    }
    let (_, piped, _) = run(alice.cli().arg("doctor"));
    let widest = piped.lines().map(|l| l.chars().count()).max().unwrap_or(0);
    assert!(widest > 80, "the pipe keeps whole lines ({widest} columns)");
    let narrow = screen.lines().count();
    assert!(
        narrow > piped.lines().count(),
        "nothing wrapped on the terminal:\n{screen}"
    );
    let (code, checks) = doctor(&alice);
    assert_eq!(code, 3);
    assert!(!checks["identity"].0);
    assert!(
        checks["identity"]
            .1
            .contains("mxhsm identity publish --replace"),
        "{checks:?}"
    );
}

/// After some client reset the identity, the account is taken back as the watch's alarm
/// says. Synapse cannot publish the token's old keys again (it fails on a key it stored
/// before): mxhsm says so and changes nothing; `--new-keys` makes new keys on the token
/// and publishes them.
#[test]
fn the_identity_is_taken_back_after_a_reset() {
    let alice = MxhsmUser::new(Kind::SoftHsm);
    alice.login();
    ok(alice.cli().args(["identity", "create"]));
    let old = alice.token_key("master");
    let token = alice.synapse.login(&alice.user, "ELEMENT");
    let theirs = B64.encode(
        reset_identity(alice.synapse, &alice.user, &token)
            .verifying_key()
            .to_bytes(),
    );
    let (code, out, _) =
        common::run(
            alice
                .cli()
                .args(["--json", "identity", "publish", "--replace", "--yes"]),
        );
    assert_eq!(code, 1, "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cannot take back a key it stored before")
            && v["error"]["hint"].as_str().unwrap().contains("--new-keys"),
        "{v}"
    );
    let problems = alice.status(&[])["identity_problems"].to_string();
    assert!(problems.contains(&theirs), "nothing changed: {problems}");
    // --new-keys needs --replace.
    common::fails(alice.cli().args(["identity", "publish", "--new-keys"]));
    ok(alice
        .cli()
        .args(["identity", "publish", "--replace", "--new-keys", "--yes"]));
    let status = alice.status(&[]);
    assert_eq!(status["identity_ok"], true, "{status}");
    let now = alice.token_key("master");
    assert_eq!(status["master_key"], now.as_str());
    assert_ne!(now, old);
    assert_ne!(now, theirs);
    // The watch is quiet about the identity again.
    let (_, events) = once(&alice, &[]);
    assert!(!kinds(&events).contains(&"identity_reset"), "{events:?}");
}

/// The master key stays the token's but the server serves another self-signing key: an
/// `identity_changed` alarm (exit 10). A newer backup key on the token than the one the
/// current backup uses: `backup_not_token_key` (exit 12).
#[test]
fn a_swapped_self_signing_key_and_a_newer_backup_key_are_reported() {
    let alice = MxhsmUser::new(Kind::SoftHsm);
    alice.login();
    ok(alice.cli().args(["identity", "create"]));
    ok(alice.cli().args(["backup", "create"]));
    assert_eq!(once(&alice, &[]).0, 0);

    let me = alice.user.user_id.clone();
    let evil = B64.encode(random_key().verifying_key().to_bytes());
    let (me2, evil2) = (me.clone(), evil.clone());
    let proxy = Proxy::start(
        &alice.synapse.url,
        Arc::new(move |path, _status, v| {
            if path.contains("/keys/query") {
                v["self_signing_keys"][&me2] = json!({"user_id": me2, "usage": ["self_signing"],
                    "keys": {format!("ed25519:{evil2}"): evil2}});
            }
        }),
    );
    let via = alice.via(&proxy.url);
    let (code, events) = once(&alice, &[]);
    assert_eq!(code, 10, "{events:?}");
    assert_eq!(events[0]["event"], "identity_changed", "{events:?}");
    assert_eq!(events[0]["class"], "identity_reset", "{events:?}");
    assert!(
        !events[0]["problems"].as_array().unwrap().is_empty(),
        "{events:?}"
    );
    drop(via);

    let before = alice.token_key("backup");
    ok(alice
        .cli()
        .args(["keys", "generate", "--user", &me, "--role", "backup"]));
    let newer = alice.token_key("backup");
    assert_ne!(before, newer);
    let (code, events) = once(&alice, &[]);
    assert_eq!(code, 12, "{events:?}");
    let e = events
        .iter()
        .find(|e| e["event"] == "backup_not_token_key")
        .unwrap_or_else(|| panic!("{events:?}"));
    assert_eq!(
        (e["public_key"].as_str(), e["token_backup_key"].as_str()),
        (Some(before.as_str()), Some(newer.as_str()))
    );
}
