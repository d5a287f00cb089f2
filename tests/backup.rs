//! Key backup with the backup key on the token, end to end against a real Synapse.
//! Sessions are made with vodozemac `GroupSession` and backed up by the test itself with
//! vodozemac `PkEncryption` (another client's code path), then restored through the token.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD as B64;
use common::backups::{put, restored, session_data, sessions, with_backup};
use common::synapse::{Proxy, http};
use common::{Kind, exits, fails, ok};
use serde_json::{Value, json};

fn restore_1000_sessions_and_tampered_ones(kind: Kind) {
    let (u, version, public) = with_backup(kind);
    let status: Value =
        serde_json::from_str(&ok(u.cli().args(["backup", "status", "--json"]))).unwrap();
    assert_eq!(status["master_signature_valid"], true, "{status}");
    assert_eq!(status["public_key_is_token_key"], true);
    let made = sessions(1000, 10);
    let entries: Vec<(&str, &str, Value)> = made
        .iter()
        .map(|((r, s), k)| (r.as_str(), s.as_str(), session_data(&public, k)))
        .collect();
    put(&u, &version, &entries);
    // Three tampered sessions: ciphertext, MAC, ephemeral key.
    let bad = sessions(3, 1);
    let mut tampered = Vec::new();
    for (i, ((_, sid), key)) in bad.iter().enumerate() {
        let mut d = session_data(&public, key);
        let field = ["ciphertext", "mac", "ephemeral"][i];
        let mut bytes = B64.decode(d[field].as_str().unwrap()).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        d[field] = json!(B64.encode(&bytes));
        tampered.push(("!tampered:localhost", sid.as_str(), d));
    }
    put(&u, &version, &tampered);

    let out = u.token.dir.path().join("keys.json");
    let report: Value = serde_json::from_str(&ok(u
        .cli()
        .args([
            "--json", "backup", "restore", "--format", "json", "--jobs", "2", "--out",
        ])
        .arg(&out)))
    .unwrap();
    assert_eq!(report["restored"], 1000, "{report}");
    assert_eq!(report["failed"], 3, "{report}");
    let errors: Vec<&str> = report["failures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["error"].as_str().unwrap())
        .collect();
    assert!(
        errors.iter().all(|e| e.contains("MAC")
            || e.contains("padding")
            || e.contains("ephemeral")
            || e.contains("session")),
        "{errors:?}"
    );
    assert_eq!(
        restored(&out),
        made,
        "every session key restored exactly, no tampered one written"
    );

    // The export file Element imports, with the passphrase from the environment.
    let export = u.token.dir.path().join("keys.txt");
    ok(u.cli()
        .env("MXHSM_EXPORT_PASSPHRASE", "correct horse")
        .args([
            "backup",
            "restore",
            "--rounds",
            "1000",
            "--weak-rounds",
            "--out",
        ])
        .arg(&export));
    let text = std::fs::read_to_string(&export).unwrap();
    let json = mxhsm::matrix::key_export::decrypt(&text, "correct horse").unwrap();
    let plain = u.token.dir.path().join("from-export.json");
    std::fs::write(&plain, json.as_bytes()).unwrap();
    assert_eq!(restored(&plain), made);
    // No overwriting.
    let err = fails(
        u.cli()
            .args(["backup", "restore", "--format", "json", "--out"])
            .arg(&out),
    );
    assert!(err.contains("exists; mxhsm does not overwrite"), "{err}");
}

per_token!(restore_1000_sessions_and_tampered_ones);

#[test]
fn upload_requires_auth_data_signed_by_our_master_key() {
    let (u, _, _) = with_backup(Kind::Kryoptic);
    let made = sessions(20, 2);
    let file = u.token.dir.path().join("export.json");
    common::backups::write_export(&file, &made);
    let out = ok(u
        .cli()
        .args(["backup", "upload", "--format", "json"])
        .arg(&file));
    assert!(out.contains("uploaded 20 sessions"), "{out}");
    let back = u.token.dir.path().join("back.json");
    ok(u.cli()
        .args(["backup", "restore", "--format", "json", "--out"])
        .arg(&back));
    assert_eq!(restored(&back), made);

    // The server swaps in another backup key: a new version whose auth_data carries a
    // forged master signature, then one with none.
    let session: Value =
        serde_json::from_str(&std::fs::read_to_string(u.session_path()).unwrap()).unwrap();
    let token = session["access_token"].as_str().unwrap();
    let keys: Value = serde_json::from_str(&ok(u.cli().args(["keys", "list", "--json"]))).unwrap();
    let msk = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["role"] == "master")
        .unwrap()["public_key"]
        .as_str()
        .unwrap()
        .to_string();
    let evil = vodozemac::pk_encryption::PkDecryption::new()
        .public_key()
        .to_base64();
    for auth in [
        json!({"public_key": evil, "signatures": {&u.user.user_id: {format!("ed25519:{msk}"): B64.encode([7u8; 64])}}}),
        json!({"public_key": evil}),
    ] {
        let (s, v) = http(
            &u.synapse.url,
            "POST",
            "/room_keys/version",
            Some(token),
            Some(json!({"algorithm": "m.megolm_backup.v1.curve25519-aes-sha2", "auth_data": auth})),
        );
        assert_eq!(s, 200, "{v}");
        let err = fails(
            u.cli()
                .args(["backup", "upload", "--format", "json"])
                .arg(&file),
        );
        assert!(
            err.contains("refusing to upload: the auth_data of backup version"),
            "{err}"
        );
        assert!(err.contains("not signed by your master key"), "{err}");
        // A status that reports a problem exits with 3.
        let status: Value =
            serde_json::from_str(&exits(3, u.cli().args(["backup", "status", "--json"]))).unwrap();
        assert_eq!(status["master_signature_valid"], false);
        assert_eq!(status["public_key_is_token_key"], false);
        // Restoring from a backup encrypted to another key is refused too.
        let err = fails(
            u.cli()
                .args(["backup", "restore", "--format", "json", "--out"])
                .arg(u.token.dir.path().join("x.json")),
        );
        assert!(err.contains("not to the token's backup key"), "{err}");
    }
}

/// The server goes away while the restore fetches: the restore says so, writes nothing,
/// and `--resume` finishes once the server is back, with the same file as a clean run.
#[test]
fn an_interrupted_restore_resumes() {
    let (u, version, public) = with_backup(Kind::SoftHsm);
    let made = sessions(50, 3);
    let entries: Vec<(&str, &str, Value)> = made
        .iter()
        .map(|((r, s), k)| (r.as_str(), s.as_str(), session_data(&public, k)))
        .collect();
    put(&u, &version, &entries);
    let clean = u.token.dir.path().join("clean.json");
    ok(u.cli()
        .args(["backup", "restore", "--format", "json", "--out"])
        .arg(&clean));

    let down = Arc::new(AtomicUsize::new(1));
    let d = down.clone();
    let proxy = Proxy::start_intercepting(
        &u.synapse.url,
        Arc::new(|_, _, _| {}),
        Arc::new(move |path| {
            (path.starts_with("/room_keys/keys") && d.load(Ordering::SeqCst) == 1)
                .then(|| (502, json!({"errcode": "M_UNKNOWN", "error": "Bad gateway"})))
        }),
    );
    let session = std::fs::read_to_string(u.session_path()).unwrap();
    let mut via: Value = serde_json::from_str(&session).unwrap();
    via["homeserver"] = json!(proxy.url);
    std::fs::write(u.session_path(), via.to_string()).unwrap();
    let out = u.token.dir.path().join("resumed.json");
    let err = fails(
        u.cli()
            .args(["backup", "restore", "--format", "json", "--out"])
            .arg(&out),
    );
    assert!(
        err.contains("fetching the backup failed; nothing was written"),
        "{err}"
    );
    assert!(err.contains("--resume"), "{err}");
    assert!(!out.exists());
    down.store(0, Ordering::SeqCst);
    ok(u.cli()
        .args(["backup", "restore", "--format", "json", "--resume", "--out"])
        .arg(&out));
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&clean).unwrap());
    assert_eq!(restored(&out), made);
}

/// A second restore with `--new-only` restores only the sessions added since the first
/// (the state file remembers the rest), and `--room` restores one room through the
/// per-room endpoint.
#[test]
fn new_only_restores_what_is_new_and_room_restores_one_room() {
    let (u, version, public) = with_backup(Kind::SoftHsm);
    let entries = |made: &std::collections::BTreeMap<(String, String), String>| {
        made.iter()
            .map(|((r, s), k)| (r.clone(), s.clone(), session_data(&public, k)))
            .collect::<Vec<_>>()
    };
    let put_all = |made| {
        let e = entries(made);
        let e: Vec<(&str, &str, Value)> = e
            .iter()
            .map(|(r, s, d)| (r.as_str(), s.as_str(), d.clone()))
            .collect();
        put(&u, &version, &e);
    };
    let first = sessions(30, 3);
    put_all(&first);
    let dir = u.token.dir.path();
    let restore = |name: &str, extra: &[&str]| -> Value {
        let out = dir.join(name);
        let o = ok(u
            .cli()
            .args(["--json", "backup", "restore", "--format", "json"])
            .args(extra)
            .arg("--out")
            .arg(&out));
        serde_json::from_str(&o).unwrap()
    };
    let all = restore("all.json", &[]);
    assert_eq!(all["restored"], 30, "{all}");
    assert_eq!(restored(&dir.join("all.json")), first);

    let more = sessions(4, 1);
    put_all(&more);
    let new = restore("new.json", &["--new-only"]);
    assert_eq!(new["restored"], 4, "{new}");
    assert_eq!(new["unchanged"], 30, "{new}");
    assert_eq!(restored(&dir.join("new.json")), more);
    // Nothing new: an empty file, no agreement.
    let none = restore("none.json", &["--new-only"]);
    assert_eq!(none["restored"], 0, "{none}");
    assert_eq!(none["unchanged"], 34, "{none}");

    let room = "!room1:localhost";
    let one = restore("room.json", &["--room", room]);
    let expected: std::collections::BTreeMap<_, _> = first
        .iter()
        .filter(|((r, _), _)| r == room)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(one["restored"], expected.len(), "{one}");
    assert_eq!(restored(&dir.join("room.json")), expected);
    let err = fails(
        u.cli()
            .args(["backup", "restore", "--format", "json", "--room", "room1"])
            .arg("--out")
            .arg(dir.join("bad.json")),
    );
    assert!(err.contains("is not a room ID"), "{err}");
}

/// At -vvv mxhsm says which endpoints and token operations ran, and that a retry is
/// running; it never writes a secret: not the password, the access token, the PIN, a room
/// key, the export passphrase or the export itself. Without -v it says only the retry;
/// -q silences that too.
#[test]
fn verbose_output_names_endpoints_and_token_calls_but_no_secret() {
    let u = common::synapse::MxhsmUser::new(Kind::SoftHsm);
    let mut said = String::new();
    let mut traced = |cmd: &mut std::process::Command| {
        let (code, out, err) = common::run(cmd);
        assert_eq!(code, 0, "{out}{err}");
        said.push_str(&err);
        out
    };
    traced(u.cli().args([
        "-vvv",
        "login",
        "--homeserver",
        &u.synapse.url,
        "--user",
        &u.user.localpart,
    ]));
    traced(u.cli().args(["-vvv", "identity", "create"]));
    let created: Value = serde_json::from_str(&traced(
        u.cli().args(["-vvv", "--json", "backup", "create"]),
    ))
    .unwrap();
    let (version, public) = (
        created["backup_version"].as_str().unwrap(),
        created["public_key"].as_str().unwrap(),
    );
    let made = common::backups::put_sessions(&u, version, public, 5);
    let dir = u.token.dir.path();
    let json_out = dir.join("keys.json");
    traced(
        u.cli()
            .args(["-vvv", "backup", "restore", "--format", "json", "--out"])
            .arg(&json_out),
    );
    let export = dir.join("keys.txt");
    traced(
        u.cli()
            .env("MXHSM_EXPORT_PASSPHRASE", "correct horse battery")
            .args(["-vvv", "backup", "restore", "--out"])
            .arg(&export),
    );
    // A server that answers 429 once: the retry is said at every level but -q.
    let throttled = Arc::new(AtomicUsize::new(0));
    let proxy = Proxy::start_intercepting(
        &u.synapse.url,
        Arc::new(|_, _, _| {}),
        Arc::new({
            let throttled = throttled.clone();
            move |path| {
                (path.starts_with("/keys/query")
                    && throttled.fetch_add(1, Ordering::SeqCst).is_multiple_of(2))
                .then(|| {
                    (
                        429,
                        json!({"errcode": "M_LIMIT_EXCEEDED", "retry_after_ms": 10}),
                    )
                })
            }
        }),
    );
    let session = std::fs::read_to_string(u.session_path()).unwrap();
    let via = u.via(&proxy.url);
    let status = |flag: Option<&str>| {
        let mut c = u.cli();
        c.args(flag).args(["identity", "status"]);
        let (code, out, err) = common::run(&mut c);
        assert_eq!(code, 0, "{out}{err}");
        err
    };
    let plain = status(None);
    assert!(
        plain.contains("POST /keys/query: 429; retrying in"),
        "no retry warning: {plain}"
    );
    assert!(!plain.contains("→"), "requests shown without -v: {plain}");
    let quiet = status(Some("-q"));
    assert!(!quiet.contains("retrying"), "-q: {quiet}");
    said.push_str(&status(Some("-vvv")));
    drop(via);

    // What was said: the endpoints, the token's operations, each agreement.
    for expected in [
        "→ POST /login",
        "POST /keys/upload → 200",
        "GET /room_keys/keys → 200",
        "C_Login on token",
        "C_GenerateKeyPair",
        "C_Sign (EdDSA) with the master key of",
        "C_DeriveKey (ECDH) with the backup key of",
        "C_FindObjects label mxhsm:master:",
        "retrying in",
    ] {
        assert!(said.contains(expected), "{expected:?} not said:\n{said}");
    }
    // And no secret.
    let saved: Value = serde_json::from_str(&session).unwrap();
    let access_token = saved["access_token"].as_str().unwrap();
    let mut secrets = vec![
        u.user.password.clone(),
        access_token.to_string(),
        common::USER_PIN.to_string(),
        "correct horse battery".to_string(),
    ];
    secrets.extend(made.values().cloned());
    let export_text = std::fs::read_to_string(&export).unwrap();
    secrets.extend(
        export_text
            .lines()
            .filter(|l| l.len() > 20 && !l.starts_with("-----"))
            .map(str::to_string),
    );
    for s in &secrets {
        assert!(!said.contains(s.as_str()), "a secret was said: {s:?}");
    }
    assert_eq!(restored(&json_out), made);
}

/// In a terminal, a restore shows a spinner while PBKDF2 derives the export key (which
/// reports no progress of its own), and an upload while it opens the export; both are
/// cleared once done, and `-q` shows none.
#[test]
fn a_spinner_shows_while_pbkdf2_runs() {
    let (u, version, public) = with_backup(Kind::SoftHsm);
    common::backups::put_sessions(&u, &version, &public, 3);
    let dir = u.token.dir.path();
    let cli = |args: &[&str]| {
        let mut c = u.cli();
        c.env("MXHSM_EXPORT_PASSPHRASE", "correct horse")
            .args(args)
            .args(["--rounds", "600000"]);
        c
    };
    let shown = |frames: &[String], what: &str| frames.iter().any(|f| f.contains(what));
    let deriving = "deriving the export key: 600000 rounds of PBKDF2-SHA-512";

    let out = dir.join("spun.txt");
    let frames = common::terminal_frames(
        &cli(&["backup", "restore", "--out", out.to_str().unwrap()]),
        100,
        dir,
    );
    assert!(shown(&frames, deriving), "{frames:#?}");
    let last = frames.last().unwrap();
    assert!(
        !last.contains("deriving") && last.contains("restored 3 sessions"),
        "{last}"
    );

    let quiet = dir.join("quiet.txt");
    let frames = common::terminal_frames(
        &cli(&["-q", "backup", "restore", "--out", quiet.to_str().unwrap()]),
        100,
        dir,
    );
    assert!(!shown(&frames, "PBKDF2"), "{frames:#?}");
    assert!(quiet.exists(), "{frames:#?}");

    let mut upload = u.cli();
    upload
        .env("MXHSM_EXPORT_PASSPHRASE", "correct horse")
        .args(["backup", "upload"])
        .arg(&out);
    let frames = common::terminal_frames(&upload, 100, dir);
    assert!(
        shown(
            &frames,
            "opening the export: PBKDF2-SHA-512 of the passphrase"
        ),
        "{frames:#?}"
    );
    assert!(
        frames.last().unwrap().contains("uploaded 3 sessions"),
        "{frames:#?}"
    );
}
