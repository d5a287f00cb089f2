//! mxhsm against a hostile homeserver and a hurried user (issue 10's numbered attacks).
//!
//! A proxy in front of the real Synapse plays the malicious server: it rewrites answers,
//! answers itself, streams endless bodies, throttles or stalls, and changes what Synapse
//! stores between two of mxhsm's requests (a server can do all of that). Each test then
//! asks Synapse itself, with independent code (ed25519-dalek, raw HTTP), that nothing the
//! attacker chose was signed or uploaded, and checks the error the user got.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD as B64;
use common::clients::{device_trust, phone, software_identity, verifies};
use common::hostile::{Hostile, Reply};
use common::synapse::{MxhsmUser, http};
use common::{Kind, exits, exits_err, fails, ok, run};
use serde_json::{Value, json};

/// How many mxhsm keys the token holds for the user.
fn token_key_count(u: &MxhsmUser) -> usize {
    let keys: Value = serde_json::from_str(&ok(u.cli().args(["keys", "list", "--json"]))).unwrap();
    keys["keys"].as_array().unwrap().len()
}

/// Synapse's own view of `user`'s device `id` (queried with `token`).
fn stored_device(u: &MxhsmUser, token: &str, id: &str) -> Value {
    u.query(token, &u.user.user_id)["device_keys"][&u.user.user_id][id].clone()
}

/// What a server that rewrites its own store can do: new keys for `id`; returns the key.
fn replace_device_keys(u: &MxhsmUser, token: &str, id: &str) -> String {
    common::clients::replace_keys(&u.synapse.url, &u.user.user_id, token, id)
}

fn with_identity(kind: Kind) -> MxhsmUser {
    let u = MxhsmUser::new(kind);
    u.login();
    ok(u.cli().args(["identity", "create"]));
    u
}

/// Attack 1: `sign device`: the server swaps the device's key after mxhsm fetched it. mxhsm signs
/// what it showed, from its one fetch; the read-back notices the swap.
#[test]
fn sign_device_signs_the_key_that_was_shown() {
    let u = with_identity(Kind::SoftHsm);
    let (phone_token, phone_key) = phone(u.synapse, &u.user, "PHONE");
    let shown = B64.encode(phone_key.verifying_key().to_bytes());
    let attacker_key = Arc::new(std::sync::Mutex::new(String::new()));
    let (synapse_url, user_id, pt, ak) = (
        u.synapse.url.clone(),
        u.user.user_id.clone(),
        phone_token.clone(),
        attacker_key.clone(),
    );
    let server = Hostile::start(&u.synapse.url, move |r| {
        // The second /keys/query of the command: the server has changed PHONE's keys.
        if r.is("POST", "/keys/query") && r.seen == 1 {
            let fake = common::clients::replace_keys(&synapse_url, &user_id, &pt, "PHONE");
            *ak.lock().unwrap() = fake;
        }
        Reply::Forward
    });
    let _via = u.via(&server.url);
    let (code, out, err) = run(u.cli().args(["sign", "device", "PHONE", "--yes"]));
    drop(_via);
    assert!(
        err.contains(&common::clients::spaced(&shown)),
        "the fingerprint shown: {err}"
    );
    let ssk = u.token_key("self_signing");
    let stored = stored_device(&u, &phone_token, "PHONE");
    let now = stored["keys"]["ed25519:PHONE"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        now,
        *attacker_key.lock().unwrap(),
        "Synapse holds the attacker's key now"
    );
    assert!(
        !verifies(&stored, &u.user.user_id, &ssk),
        "the attacker's key must not carry a valid SSK signature: {stored}"
    );
    assert_ne!(code, 0, "{out}");
    assert!(
        err.contains("not served with the self-signing key's signature"),
        "{err}"
    );
}

/// Attack 2: mxhsm's own device is signed from its Olm account: a server that serves (and
/// stores) other keys for it gets a tampering report, and nothing is signed.
#[test]
fn own_device_is_signed_from_its_olm_account() {
    let u = MxhsmUser::new(Kind::Kryoptic);
    u.login();
    let (token, device0) = u.access();
    let fake = replace_device_keys(&u, &token, &device0);
    let err = fails(u.cli().args(["identity", "create"]));
    assert!(err.contains("is not the one mxhsm uploaded"), "{err}");
    assert!(err.contains("nothing was signed"), "{err}");
    assert_eq!(token_key_count(&u), 0, "nothing made on the token either");
    // Login: the server swaps the new device's keys right after mxhsm uploads them.
    let v = MxhsmUser::new(Kind::SoftHsm);
    v.login();
    ok(v.cli().args(["identity", "create"]));
    ok(v.cli().args(["logout"]));
    let (synapse, user_id) = (v.synapse.url.clone(), v.user.user_id.clone());
    let swapped = Arc::new(std::sync::Mutex::new(None::<(String, String)>));
    let s2 = swapped.clone();
    let server = Hostile::start(&v.synapse.url, move |r| {
        if r.is("POST", "/keys/upload") && r.seen == 0 {
            let token = r.token.clone().unwrap();
            let device = r.body.as_ref().unwrap()["device_keys"]["device_id"]
                .as_str()
                .unwrap()
                .to_string();
            let (synapse, user_id, s2) = (synapse.clone(), user_id.clone(), s2.clone());
            return Reply::Rewrite(Box::new(move |_, _| {
                common::clients::replace_keys(&synapse, &user_id, &token, &device);
                *s2.lock().unwrap() = Some((token, device));
            }));
        }
        Reply::Forward
    });
    let err = fails(v.cli().args([
        "login",
        "--homeserver",
        &server.url,
        "--user",
        &v.user.localpart,
    ]));
    assert!(err.contains("not served as uploaded"), "{err}");
    assert!(!v.session_path().exists(), "no session kept");
    let (_, device) = swapped.lock().unwrap().clone().unwrap();
    // The swapped device is not cross-signed, and mxhsm ended it rather than leave it.
    let checker = v.synapse.login(&v.user, "CHECKER");
    let stored = stored_device(&v, &checker, &device);
    assert!(
        !verifies(&stored, &v.user.user_id, &v.token_key("self_signing")),
        "the swapped device is not cross-signed: {stored}"
    );
    let (_, devices) = http(&v.synapse.url, "GET", "/devices", Some(&checker), None);
    assert!(
        devices["devices"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["device_id"] != device.as_str()),
        "{devices}"
    );
    // And identity create signed nothing for the device whose keys the server replaced:
    // it carries its own signature only.
    let stored = stored_device(&u, &token, &device0);
    assert_eq!(stored["keys"][format!("ed25519:{device0}")], fake);
    let signers: Vec<&String> = stored["signatures"][&u.user.user_id]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    assert_eq!(signers, [&format!("ed25519:{device0}")], "{stored}");
}

/// Attack 3: `sign devices`: a device the server invented is listed with its fingerprint and
/// never signed unseen; `--yes` signs only devices named on the command line.
#[test]
fn invented_devices_are_never_signed_unseen() {
    let u = with_identity(Kind::SoftHsm);
    let (invented_token, _) = phone(u.synapse, &u.user, "INVENTED");
    let err = fails(u.cli().args(["sign", "devices", "--all-unsigned", "--yes"]));
    assert!(err.contains("always asks"), "{err}");
    let err = fails(u.cli().args(["sign", "devices", "--all-unsigned"]));
    assert!(
        err.contains("INVENTED") && err.contains("self-signature valid"),
        "{err}"
    );
    assert!(err.contains("refusing without a terminal"), "{err}");
    let stored = stored_device(&u, &invented_token, "INVENTED");
    assert!(!verifies(
        &stored,
        &u.user.user_id,
        &u.token_key("self_signing")
    ));
    // A device whose own signature is bad is refused even when named.
    let (bad_token, _) = phone(u.synapse, &u.user, "BADSIG");
    let mut object = stored_device(&u, &bad_token, "BADSIG");
    object["signatures"][&u.user.user_id]["ed25519:BADSIG"] = json!(B64.encode([1u8; 64]));
    let (s, _) = http(
        &u.synapse.url,
        "POST",
        "/keys/upload",
        Some(&bad_token),
        Some(json!({"device_keys": object})),
    );
    assert_eq!(s, 200);
    let err = fails(u.cli().args(["sign", "devices", "BADSIG", "--yes"]));
    assert!(
        err.contains("cannot be signed: its own signature does not verify"),
        "{err}"
    );
}

/// Attack 4: Untrusted text is escaped: a display name with terminal escapes and a bidi override
/// cannot draw a fake line or a fake "verified", in tables, prompts, errors and JSON.
#[test]
fn untrusted_text_is_escaped() {
    let u = with_identity(Kind::Kryoptic);
    let (phone_token, _) = phone(u.synapse, &u.user, "PHONE");
    let evil = "\u{1b}[2K\r\u{1b}[1APHONE verified \u{202e}deifirev\u{1b}]0;x\u{7}\n  Ed25519 fingerprint: AAAA";
    let (s, v) = http(
        &u.synapse.url,
        "PUT",
        "/devices/PHONE",
        Some(&phone_token),
        Some(json!({"display_name": evil})),
    );
    assert_eq!(s, 200, "{v}");
    let clean = |bytes: &str, what: &str| {
        for bad in ['\u{1b}', '\r', '\u{202e}', '\u{7}'] {
            assert!(!bytes.contains(bad), "{what} prints {bad:?} raw: {bytes:?}");
        }
        assert!(
            !bytes
                .lines()
                .any(|l| l.trim_start().starts_with("Ed25519 fingerprint: AAAA")),
            "{what} prints a line the attacker wrote: {bytes}"
        );
    };
    let (_, out, err) = run(u.cli().args(["identity", "status"]));
    clean(&out, "identity status");
    clean(&err, "identity status (stderr)");
    assert!(out.contains("\\x1b[2K\\r"), "escaped, visibly: {out}");
    let line = out.lines().find(|l| l.contains("PHONE")).unwrap();
    assert!(line.contains("unsigned"), "{line}");
    let json_out = u.status(&[]);
    assert_eq!(
        json_out["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["device_id"] == "PHONE")
            .unwrap()["display_name"],
        evil,
        "JSON keeps the exact value"
    );
    let (_, raw_json, _) = run(u.cli().args(["identity", "status", "--json"]));
    clean(&raw_json, "identity status --json");
    // The confirmation list of `sign device`.
    let (_, _, err) = run(u.cli().args(["sign", "device", "PHONE"]));
    clean(&err, "sign device");
    // Server error text and URLs.
    let server = Hostile::start(&u.synapse.url, |r| {
        if r.is("POST", "/keys/query") {
            return Reply::Json(
                400,
                json!({"errcode": "M_\u{1b}[32mOK", "error": "fine\n\u{1b}[1Averified\u{202e}"}),
            );
        }
        Reply::Forward
    });
    let _via = u.via(&server.url);
    let (_, _, err) = run(u.cli().args(["identity", "status"]));
    clean(&err, "a server error");
    assert!(err.contains("M_\\x1b[32mOK"), "{err}");
}

/// Attack 5: Every answer is bounded: a 512 MB `/keys/query` answer is refused past 16 MiB, and
/// peak memory stays small.
#[test]
fn oversized_answers_are_refused_in_bounded_memory() {
    let u = with_identity(Kind::Kryoptic);
    let sent = Arc::new(AtomicUsize::new(0));
    let s2 = sent.clone();
    let server = Hostile::start(&u.synapse.url, move |r| {
        if r.is("POST", "/keys/query") {
            let s2 = s2.clone();
            return Reply::Stream(Box::new(move |w| {
                w.write_all(b"{\"device_keys\":{},\"padding\":\"")?;
                let chunk = vec![b'x'; 1 << 20];
                for _ in 0..512 {
                    w.write_all(&chunk)?;
                    s2.fetch_add(chunk.len(), Ordering::SeqCst);
                }
                w.write_all(b"\"}")
            }));
        }
        Reply::Forward
    });
    let _via = u.via(&server.url);
    let rss = u.token.dir.path().join("rss");
    let mut cmd = std::process::Command::new("/usr/bin/time");
    cmd.arg("-f")
        .arg("%M")
        .arg("-o")
        .arg(&rss)
        .arg(env!("CARGO_BIN_EXE_mxhsm"));
    let c = u.cli();
    cmd.args(["identity", "status"]);
    for (k, v) in c.get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let out = cmd.stdin(std::process::Stdio::null()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("larger than 16 MiB"), "{err}");
    let peak_kb: u64 = std::fs::read_to_string(&rss)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        peak_kb < 120_000,
        "peak RSS {peak_kb} KB for a 512 MB answer"
    );
    assert!(
        sent.load(Ordering::SeqCst) < 128 << 20,
        "mxhsm stopped reading early (read {} bytes)",
        sent.load(Ordering::SeqCst)
    );
    eprintln!("peak RSS for a 512 MB /keys/query answer: {peak_kb} KB");
}

/// Attack 6: Plain http:// is refused except to loopback (before any password is asked), allowed
/// with --insecure-http and a warning; a homeserver behind a private CA works with
/// SSL_CERT_FILE.
#[test]
fn transport_https_and_the_system_trust_store() {
    let u = MxhsmUser::new(Kind::SoftHsm);
    let err = exits_err(
        1,
        u.cli().env_remove("MXHSM_PASSWORD").args([
            "login",
            "--homeserver",
            "http://matrix.example.org",
            "--user",
            &u.user.localpart,
        ]),
    );
    assert!(
        err.contains("refusing plain http:// to http://matrix.example.org"),
        "{err}"
    );
    assert!(
        !err.contains("password is needed"),
        "checked before the password: {err}"
    );
    let err = fails(u.cli().args([
        "--insecure-http",
        "login",
        "--homeserver",
        "http://unreachable.invalid",
        "--user",
        &u.user.localpart,
    ]));
    assert!(
        err.contains("warning:") && err.contains("unencrypted"),
        "{err}"
    );
    assert!(err.contains("cannot reach the homeserver"), "{err}");
    // A TLS front for Synapse with a certificate from a private CA.
    let (ca, tls) = common::hostile::private_ca(u.token.dir.path());
    let server = Hostile::start_tls(&u.synapse.url, tls, |_| Reply::Forward);
    let err = fails(u.cli().env("SSL_CERT_FILE", "/nonexistent").args([
        "login",
        "--homeserver",
        &server.url,
        "--user",
        &u.user.localpart,
    ]));
    assert!(err.contains("cannot reach the homeserver"), "{err}");
    assert!(!u.session_path().exists());
    let out = ok(u.cli().env("SSL_CERT_FILE", &ca).args([
        "--json",
        "login",
        "--homeserver",
        &server.url,
        "--user",
        &u.user.localpart,
    ]));
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["homeserver"], server.url);
    assert_eq!(v["user_id"], u.user.user_id);
}

/// Attack 7: The user the server logged in must be the one asked for: on a token holding keys of
/// several users, the server does not get to pick whose are used.
#[test]
fn login_answer_must_name_the_user_asked_for() {
    let alice = MxhsmUser::new(Kind::SoftHsm);
    let bob = alice.synapse.register("bob");
    // Bob's identity on the same token.
    for role in ["master", "self_signing", "user_signing"] {
        ok(alice
            .cli()
            .args(["keys", "generate", "--user", &bob.user_id, "--role", role]));
    }
    let bob_id = bob.user_id.clone();
    let server = Hostile::start(&alice.synapse.url, move |r| {
        if r.is("POST", "/login") {
            let bob_id = bob_id.clone();
            return Reply::Rewrite(Box::new(move |_, v| v["user_id"] = json!(bob_id)));
        }
        Reply::Forward
    });
    let err = fails(alice.cli().args([
        "login",
        "--homeserver",
        &server.url,
        "--user",
        &alice.user.localpart,
    ]));
    assert!(
        err.contains(&format!("asked to log in as {}", alice.user.localpart))
            && err.contains(&format!("logged in {}", bob.user_id)),
        "{err}"
    );
    assert!(!alice.session_path().exists());
    // The device the server made for that login is ended, not left behind: only the
    // registration's device and the checker's are there.
    let checker = alice.synapse.login(&alice.user, "CHECKER");
    let (_, devices) = http(&alice.synapse.url, "GET", "/devices", Some(&checker), None);
    let names: Vec<&Value> = devices["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| &d["display_name"])
        .collect();
    assert_eq!(names.len(), 2, "{devices}");
    assert!(
        !names
            .iter()
            .any(|n| n.as_str().is_some_and(|n| n.starts_with("mxhsm"))),
        "{devices}"
    );
    let token = alice.synapse.login(&bob, "BOBCHECK");
    let q = alice.query(&token, &bob.user_id);
    assert!(
        q["master_keys"].get(&bob.user_id).is_none(),
        "nothing published for Bob: {q}"
    );
}

/// Attack 8: Partial and lock files: in a private directory, owned by the user, 0600; a partial
/// file that another user owns is refused, and so is a state directory that is a link.
#[test]
fn partial_and_lock_files_are_private() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let (u, version, public) = common::backups::with_backup(Kind::SoftHsm);
    common::backups::put_sessions(&u, &version, &public, 20);
    let cache = u.token.dir.path().join("cache");
    let runtime = u.token.dir.path().join("runtime");
    std::fs::create_dir_all(&runtime).unwrap();
    std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700)).unwrap();
    let cli = || {
        let mut c = u.cli();
        c.env("XDG_CACHE_HOME", &cache)
            .env("XDG_RUNTIME_DIR", &runtime);
        c
    };
    // An interrupted restore (the server fails the download after it started).
    let out = u.token.dir.path().join("keys.json");
    let server = Hostile::start(&u.synapse.url, |r| {
        if r.is("GET", "/room_keys/keys") {
            return Reply::Json(502, json!({"errcode": "M_UNKNOWN", "error": "down"}));
        }
        Reply::Forward
    });
    {
        let _via = u.via(&server.url);
        fails(
            cli()
                .args(["backup", "restore", "--format", "json", "--out"])
                .arg(&out),
        );
    }
    let states: Vec<_> = std::fs::read_dir(cache.join("mxhsm/restore"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(states.len(), 1);
    let state = states[0].path();
    for dir in [
        cache.join("mxhsm"),
        cache.join("mxhsm/restore"),
        state.clone(),
    ] {
        let m = std::fs::metadata(&dir).unwrap();
        assert_eq!(m.mode() & 0o777, 0o700, "{}", dir.display());
    }
    let locks = runtime.join("mxhsm/locks");
    for f in std::fs::read_dir(&locks).unwrap().flatten() {
        let m = std::fs::symlink_metadata(f.path()).unwrap();
        assert_eq!(m.mode() & 0o777, 0o600, "{}", f.path().display());
        assert!(m.file_type().is_file());
    }
    // A complete download planted by another user (here: chowned to nobody) is refused.
    let spool = state.join("backup.json");
    std::fs::write(&spool, b"{\"rooms\":{}}").unwrap();
    std::fs::write(state.join("version"), &version).unwrap();
    std::fs::set_permissions(
        state.join("version"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::set_permissions(&spool, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(&spool, Some(65534), Some(65534)).unwrap();
    let err = fails(
        cli()
            .args(["backup", "restore", "--format", "json", "--resume", "--out"])
            .arg(&out),
    );
    assert!(err.contains("belongs to user 65534"), "{err}");
    assert!(!out.exists());
    // The lock directory replaced by a link to somewhere else: refused.
    std::fs::remove_dir_all(runtime.join("mxhsm")).unwrap();
    let elsewhere = u.token.dir.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, runtime.join("mxhsm")).unwrap();
    let err = fails(cli().args(["keys", "list"]));
    assert!(err.contains("is a symbolic link"), "{err}");
    std::fs::remove_file(runtime.join("mxhsm")).unwrap();
    // A lock directory owned by another user: refused.
    std::fs::create_dir_all(runtime.join("mxhsm")).unwrap();
    std::os::unix::fs::chown(runtime.join("mxhsm"), Some(65534), Some(65534)).unwrap();
    let err = fails(cli().args(["keys", "list"]));
    assert!(err.contains("belongs to user 65534"), "{err}");
}

/// Attack 9: PBKDF2 iteration counts from the server are capped; exports need 100,000 rounds.
#[test]
fn pbkdf2_iterations_are_bounded() {
    let u = MxhsmUser::new(Kind::Kryoptic);
    u.login();
    let (token, _) = u.access();
    let me = &u.user.user_id;
    for (kind, content) in [
        (
            "m.secret_storage.key.HUGE".to_string(),
            json!({"algorithm": "m.secret_storage.v1.aes-hmac-sha2",
                   "passphrase": {"algorithm": "m.pbkdf2", "salt": "salt", "iterations": 2_000_000_000u64}}),
        ),
        (
            "m.secret_storage.default_key".to_string(),
            json!({"key": "HUGE"}),
        ),
    ] {
        let (s, v) = http(
            &u.synapse.url,
            "PUT",
            &format!("/user/{}/account_data/{kind}", urlencode(me)),
            Some(&token),
            Some(content),
        );
        assert_eq!(s, 200, "{v}");
    }
    let pass = u.token.dir.path().join("pass");
    std::fs::write(&pass, "correct horse battery staple\n").unwrap();
    let start = std::time::Instant::now();
    let err = fails(
        u.cli()
            .args(["secret-storage", "import", "--key-file"])
            .arg(&pass),
    );
    assert!(err.contains("2000000000 PBKDF2 iterations"), "{err}");
    assert!(start.elapsed().as_secs() < 30, "refused without the work");
    let (u, _, _) = common::backups::with_backup(Kind::SoftHsm);
    let err = fails(
        u.cli()
            .env("MXHSM_EXPORT_PASSPHRASE", "pw")
            .args(["backup", "restore", "--rounds", "1000", "--out"])
            .arg(u.token.dir.path().join("weak.txt")),
    );
    assert!(err.contains("--weak-rounds"), "{err}");
}

fn urlencode(s: &str) -> String {
    s.replace('@', "%40").replace(':', "%3A")
}

/// Attack 10: `kill -9` during a JSON restore leaves no plaintext anywhere, and `--resume`
/// continues from the rounds already done.
#[test]
fn kill_9_leaves_no_plaintext_and_resume_continues() {
    let (u, version, public) = common::backups::with_backup(Kind::SoftHsm);
    let made = common::backups::put_sessions(&u, &version, &public, 12_000);
    let out = u.token.dir.path().join("out/keys.json");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let cache = u.token.dir.path().join("cache");
    let mut child = u
        .cli()
        .env("XDG_CACHE_HOME", &cache)
        .args([
            "backup", "restore", "--format", "json", "--jobs", "1", "--out",
        ])
        .arg(&out)
        .stderr(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once at least one round is recorded and before it finishes.
    let progress = || -> Option<u64> {
        let dir = std::fs::read_dir(cache.join("mxhsm/restore"))
            .ok()?
            .flatten()
            .next()?;
        Some(std::fs::metadata(dir.path().join("progress")).ok()?.len())
    };
    let start = std::time::Instant::now();
    // A round of 4,096 sessions is about 2.3 MB: past 3.5 MB one is complete.
    while progress().unwrap_or(0) < 3_500_000 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before it could be killed"
        );
        assert!(start.elapsed().as_secs() < 120);
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!out.exists());
    // No file anywhere in the test's directory holds plaintext: neither the export JSON's
    // field name nor any of the session keys of the rounds restored before the kill.
    let first: Vec<&String> = made.values().take(200).collect();
    let mut files = vec![u.token.dir.path().to_path_buf()];
    while let Some(p) = files.pop() {
        if p.is_dir() {
            files.extend(std::fs::read_dir(&p).unwrap().flatten().map(|e| e.path()));
        } else if let Ok(bytes) = std::fs::read(&p) {
            let text = String::from_utf8_lossy(&bytes);
            assert!(
                !text.contains("session_key"),
                "{} holds plaintext",
                p.display()
            );
            for k in &first {
                assert!(
                    !text.contains(k.as_str()),
                    "{} holds a session key",
                    p.display()
                );
            }
        }
    }
    let report: Value = serde_json::from_str(&ok(u
        .cli()
        .env("XDG_CACHE_HOME", &cache)
        .args([
            "--json", "backup", "restore", "--format", "json", "--resume", "--out",
        ])
        .arg(&out)))
    .unwrap();
    assert!(report["resumed"].as_u64().unwrap() >= 4096, "{report}");
    assert_eq!(report["downloaded"], false, "{report}");
    assert_eq!(report["restored"], 12_000);
    assert_eq!(common::backups::restored(&out), made);
    assert_eq!(
        std::fs::read_dir(cache.join("mxhsm/restore"))
            .unwrap()
            .count(),
        0
    );
}

/// Attack 12: `identity create` on an account that already has an identity (made by another
/// client) changes nothing without --replace; with it, it says what is lost first.
#[test]
fn identity_create_does_not_replace_an_existing_identity() {
    let u = MxhsmUser::new(Kind::SoftHsm);
    u.login();
    let other = u.synapse.login(&u.user, "ELEMENT");
    let msk = software_identity(u.synapse, &u.user, &other);
    let published = B64.encode(msk.verifying_key().to_bytes());
    let err = exits_err(4, u.cli().args(["identity", "create"]));
    assert!(
        err.contains(&format!(
            "already publishes the cross-signing identity {published}"
        )),
        "{err}"
    );
    assert!(err.contains("secret-storage import"), "{err}");
    assert_eq!(token_key_count(&u), 0, "no key generated");
    let q = u.query(&other, &u.user.user_id);
    assert_eq!(
        q["master_keys"][&u.user.user_id]["keys"][format!("ed25519:{published}")],
        published
    );
    // --replace without a terminal and without --yes: what is lost, then a refusal.
    let err = fails(u.cli().args(["identity", "create", "--replace"]));
    assert!(
        err.contains("every verification of you by your contacts"),
        "{err}"
    );
    assert!(err.contains("refusing without a terminal"), "{err}");
    assert_eq!(token_key_count(&u), 0);
    // publish refuses the same way.
    ok(u.cli().args([
        "keys",
        "generate",
        "--user",
        &u.user.user_id,
        "--role",
        "master",
    ]));
    let err = exits_err(4, u.cli().args(["identity", "publish"]));
    assert!(err.contains("already publishes"), "{err}");
    let out = ok(u.cli().args(["identity", "create", "--replace", "--yes"]));
    assert!(out.contains("published"), "{out}");
    let q = u.query(&other, &u.user.user_id);
    assert!(
        q["master_keys"][&u.user.user_id]["keys"]
            .get(format!("ed25519:{published}"))
            .is_none()
    );
    assert_eq!(u.status(&[])["identity_ok"], true);
}

/// Attack 13: Errors compare the token with what the server publishes.
#[test]
fn errors_say_what_the_server_publishes() {
    let u = MxhsmUser::new(Kind::Kryoptic);
    u.login();
    let other = u.synapse.login(&u.user, "ELEMENT");
    let msk = software_identity(u.synapse, &u.user, &other);
    let published = B64.encode(msk.verifying_key().to_bytes());
    for cmd in [
        vec!["identity", "status"],
        vec!["sign", "devices", "--all-unsigned"],
    ] {
        let err = fails(u.cli().args(&cmd));
        assert!(
            err.contains(&format!(
                "the server publishes the identity {published}, which is not on this token"
            )),
            "{cmd:?}: {err}"
        );
        assert!(err.contains("mxhsm secret-storage import"), "{err}");
        assert!(
            !err.contains("run `mxhsm identity create` to make one"),
            "{err}"
        );
    }
}

/// Attack 14: `backup create` keeps the token's own backup and refuses to drop another one.
#[test]
fn backup_create_does_not_drop_a_backup() {
    let (u, version, public) = common::backups::with_backup(Kind::Kryoptic);
    common::backups::put_sessions(&u, &version, &public, 5);
    let again: Value =
        serde_json::from_str(&ok(u.cli().args(["--json", "backup", "create"]))).unwrap();
    assert_eq!(again["backup_version"], version, "reused");
    assert_eq!(again["reused"], true);
    // Another client's backup becomes current.
    let (token, _) = u.access();
    let other_key = vodozemac::pk_encryption::PkDecryption::new()
        .public_key()
        .to_base64();
    let (s, v) = http(
        &u.synapse.url,
        "POST",
        "/room_keys/version",
        Some(&token),
        Some(
            json!({"algorithm": "m.megolm_backup.v1.curve25519-aes-sha2", "auth_data": {"public_key": other_key}}),
        ),
    );
    assert_eq!(s, 200, "{v}");
    let theirs = v["version"].as_str().unwrap().to_string();
    common::backups::put_sessions(&u, &theirs, &other_key, 7);
    let err = exits_err(4, u.cli().args(["backup", "create"]));
    assert!(
        err.contains(&format!("backup version {theirs} (7 keys")),
        "{err}"
    );
    let (_, current) = http(
        &u.synapse.url,
        "GET",
        "/room_keys/version",
        Some(&token),
        None,
    );
    assert_eq!(current["version"], theirs, "still current");
    assert_eq!(current["count"], 7);
    let err = fails(u.cli().args(["backup", "create", "--replace"]));
    assert!(
        err.contains("7 keys") && err.contains("refusing without a terminal"),
        "{err}"
    );
    let out: Value = serde_json::from_str(&ok(u.cli().args([
        "--json",
        "backup",
        "create",
        "--replace",
        "--yes",
    ])))
    .unwrap();
    assert_eq!(out["replaced_version"], theirs);
    assert_ne!(out["backup_version"], theirs);
}

/// Attack 15: A second login reuses the live session (--replace starts a new device and
/// deletes the old one); another account gets a session of its own and strands nothing;
/// devices get a real name; status marks mxhsm's device.
#[test]
fn a_second_login_never_strands_a_device() {
    let u = MxhsmUser::new(Kind::SoftHsm);
    let first = u.login();
    ok(u.cli().args(["identity", "create"]));
    let out = ok(u.cli().args([
        "login",
        "--homeserver",
        &u.synapse.url,
        "--user",
        &u.user.localpart,
    ]));
    assert!(out.contains("already logged in"), "{out}");
    let other = u.synapse.login(&u.user, "CHECKER");
    let devices = |t: &str| {
        let (s, v) = http(&u.synapse.url, "GET", "/devices", Some(t), None);
        assert_eq!(s, 200);
        v["devices"].as_array().unwrap().clone()
    };
    let mine = devices(&other)
        .into_iter()
        .find(|d| d["device_id"] == first)
        .unwrap();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(mine["display_name"], format!("mxhsm on {}", host.trim()));
    let status = u.status(&[]);
    let me = status["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device_id"] == first)
        .unwrap();
    assert_eq!(me["this_device"], true);
    // Another account is a second session: the first one and its device stay.
    let bob = u.synapse.register("bob");
    ok(u.cli().env("MXHSM_PASSWORD", &bob.password).args([
        "login",
        "--homeserver",
        &u.synapse.url,
        "--user",
        &bob.localpart,
        "--device-name",
        "the bot's HSM",
    ]));
    assert!(
        devices(&other).iter().any(|d| d["device_id"] == first),
        "alice's device stays"
    );
    let bob_token = u.synapse.login(&bob, "BOBCHECK");
    assert!(
        devices(&bob_token)
            .iter()
            .any(|d| d["display_name"] == "the bot's HSM")
    );
    // With two sessions, a command must be told which account.
    let err = fails(u.cli().args(["identity", "status"]));
    assert!(
        err.contains("several accounts are logged in") && err.contains("--account"),
        "{err}"
    );
    ok(u.cli()
        .args(["--account", &u.user.user_id, "identity", "status"]));
    // The same account again with --replace: a new device, the old one deleted first.
    let out = ok(u.cli().args([
        "--json",
        "login",
        "--homeserver",
        &u.synapse.url,
        "--user",
        &u.user.user_id,
        "--replace",
    ]));
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["replaced"]["device_id"], first.as_str(), "{v}");
    assert!(
        devices(&other).iter().all(|d| d["device_id"] != first),
        "the old device is gone"
    );
    // Logging one account out leaves the other.
    ok(u.cli().args(["logout", "--account", &bob.user_id]));
    assert!(
        devices(&bob_token)
            .iter()
            .all(|d| d["display_name"] != "the bot's HSM")
    );
    ok(u.cli().args(["identity", "status"]));
}

/// Attack 16: Rotating one role at a time, then all three: only what changed is uploaded, and the
/// chain verifies every time. A failing non-idempotent POST is not sent again.
#[test]
fn rotation_of_each_role_and_no_retry_of_uploads() {
    let u = with_identity(Kind::Kryoptic);
    let (_, device) = u.access();
    let other = u.synapse.login(&u.user, "CHECKER");
    let me = u.user.user_id.clone();
    let check_chain = |u: &MxhsmUser| {
        let q = u.query(&other, &me);
        let msk = u.token_key("master");
        assert_eq!(q["master_keys"][&me]["keys"][format!("ed25519:{msk}")], msk);
        assert!(verifies(&q["self_signing_keys"][&me], &me, &msk));
        assert!(verifies(&q["user_signing_keys"][&me], &me, &msk));
        assert!(verifies(
            &q["device_keys"][&me][&device],
            &me,
            &u.token_key("self_signing")
        ));
        assert_eq!(u.status(&[])["identity_ok"], true);
    };
    for role in ["self_signing", "user_signing"] {
        ok(u.cli()
            .args(["keys", "generate", "--user", &me, "--role", role]));
        let out: Value =
            serde_json::from_str(&ok(u.cli().args(["--json", "identity", "publish"]))).unwrap();
        assert_eq!(out["uploaded"], json!([role]), "{out}");
        check_chain(&u);
    }
    // A new master key alone: new SSK and USK come with it.
    ok(u.cli()
        .args(["keys", "generate", "--user", &me, "--role", "master"]));
    let out: Value = serde_json::from_str(&ok(u.cli().args([
        "--json",
        "identity",
        "publish",
        "--replace",
        "--yes",
    ])))
    .unwrap();
    assert_eq!(
        out["uploaded"],
        json!(["master", "self_signing", "user_signing"]),
        "{out}"
    );
    check_chain(&u);
    for role in ["master", "self_signing", "user_signing"] {
        ok(u.cli()
            .args(["keys", "generate", "--user", &me, "--role", role]));
    }
    ok(u.cli().args(["identity", "publish", "--replace", "--yes"]));
    check_chain(&u);
    // The upload fails with a 500: sent once, not five times.
    ok(u.cli()
        .args(["keys", "generate", "--user", &me, "--role", "self_signing"]));
    let server = Hostile::start(&u.synapse.url, |r| {
        if r.is("POST", "/keys/device_signing/upload") {
            return Reply::Json(
                500,
                json!({"errcode": "M_UNKNOWN", "error": "Internal server error"}),
            );
        }
        Reply::Forward
    });
    let _via = u.via(&server.url);
    let err = fails(u.cli().args(["identity", "publish"]));
    assert!(err.contains("500"), "{err}");
    assert_eq!(server.count("POST", "/keys/device_signing/upload"), 1);
}

/// Attack 17: A slow link finishes (no global timeout); a stalled one fails fast with the idle
/// timeout.
#[test]
fn slow_links_finish_and_stalled_ones_fail() {
    let (u, version, public) = common::backups::with_backup(Kind::Kryoptic);
    let made = common::backups::put_sessions(&u, &version, &public, 7_000);
    // About 6 MB at 90 KB/s: longer than the 60 s one global timeout used to allow.
    let server = Hostile::start(&u.synapse.url, |r| {
        if r.is("GET", "/room_keys/keys") {
            return Reply::Throttle(90_000);
        }
        Reply::Forward
    });
    let out = u.token.dir.path().join("slow.json");
    {
        let _via = u.via(&server.url);
        let start = std::time::Instant::now();
        ok(u.cli()
            .args(["backup", "restore", "--format", "json", "--out"])
            .arg(&out));
        eprintln!("restore over a throttled link took {:?}", start.elapsed());
    }
    assert_eq!(common::backups::restored(&out), made);
    let stalled = Hostile::start(&u.synapse.url, |r| {
        if r.is("GET", "/room_keys/keys") {
            return Reply::Stall(1000);
        }
        Reply::Forward
    });
    let _via = u.via(&stalled.url);
    let start = std::time::Instant::now();
    let err = fails(
        u.cli()
            .env("MXHSM_IDLE_TIMEOUT", "2")
            .args(["backup", "restore", "--format", "json", "--out"])
            .arg(u.token.dir.path().join("stalled.json")),
    );
    assert!(err.contains("sent nothing for 2 s"), "{err}");
    assert!(start.elapsed().as_secs() < 40, "{:?}", start.elapsed());
}

/// Attack 18: Checks before prompts; status commands exit 3 on a problem.
#[test]
fn checks_come_before_prompts_and_status_exit_codes() {
    let u = MxhsmUser::new(Kind::SoftHsm);
    u.login();
    // The token holds no self-signing key: said before any PIN is read.
    let err = fails(u.cli().env_remove("MXHSM_PIN").args([
        "--pin-file",
        "/nonexistent/pin",
        "sign",
        "device",
        "PHONE",
        "--yes",
    ]));
    assert!(err.contains("no master key"), "{err}");
    assert!(!err.contains("PIN"), "{err}");
    let err = fails(u.cli().env_remove("MXHSM_PASSWORD").args([
        "login",
        "--homeserver",
        &u.synapse.url,
        "--user",
        "not a user",
    ]));
    assert!(
        err.contains("is not a Matrix user ID or localpart"),
        "{err}"
    );
    // Problems exit with 3, and say so in the JSON.
    ok(u.cli().args(["identity", "create"]));
    let (phone_token, _) = phone(u.synapse, &u.user, "PHONE");
    ok(u.cli().args(["sign", "device", "PHONE", "--yes"]));
    replace_device_keys(&u, &phone_token, "PHONE");
    let out = exits(3, u.cli().args(["identity", "status", "--json"]));
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["problems"], true);
    assert_eq!(device_trust(&v, "PHONE").0, "chain-broken");
}

/// Every signature mxhsm uploads is read back: a server that claims to accept a signature
/// and drops it is caught.
#[test]
fn signatures_are_read_back() {
    let u = with_identity(Kind::SoftHsm);
    phone(u.synapse, &u.user, "PHONE");
    let server = Hostile::start(&u.synapse.url, |r| {
        if r.is("POST", "/keys/signatures/upload") {
            return Reply::Json(200, json!({"failures": {}}));
        }
        Reply::Forward
    });
    let _via = u.via(&server.url);
    let err = fails(u.cli().args(["sign", "device", "PHONE", "--yes"]));
    assert!(err.contains("does not serve it back"), "{err}");
}

/// Server discovery: `--homeserver NAME` asks `https://NAME/.well-known/matrix/client`
/// for the client API; what it names is checked like a URL the user typed (plain http
/// only to this machine), and a broken answer is an error, before any password.
#[test]
fn well_known_discovery_is_checked_like_a_typed_url() {
    let u = MxhsmUser::new(Kind::SoftHsm);
    let (ca, tls) = common::hostile::private_ca(u.token.dir.path());
    let answer = std::sync::Arc::new(std::sync::Mutex::new(
        json!({"m.homeserver": {"base_url": u.synapse.url}}),
    ));
    let served = answer.clone();
    let server = Hostile::start_tls(&u.synapse.url, tls, move |r| {
        if r.path == "/.well-known/matrix/client" {
            Reply::Json(200, served.lock().unwrap().clone())
        } else {
            Reply::Forward
        }
    });
    let name = server.url.trim_start_matches("https://").to_string();
    let login = |u: &MxhsmUser| {
        common::run(u.cli().env("SSL_CERT_FILE", &ca).args([
            "--json",
            "login",
            "--homeserver",
            &name,
            "--user",
            &u.user.localpart,
        ]))
    };
    // A base URL over plain http to another machine is refused; so is an answer without
    // one. Nothing is logged in.
    // (Under --json the error is the error document on standard output.)
    *answer.lock().unwrap() = json!({"m.homeserver": {"base_url": "http://matrix.evil.example"}});
    let (code, out, _) = login(&u);
    assert_eq!(code, 1, "{out}");
    let e: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(e["error"]["kind"], "input", "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("http://matrix.evil.example"),
        "{e}"
    );
    *answer.lock().unwrap() = json!({"m.identity_server": {}});
    let (code, out, _) = login(&u);
    assert_eq!(code, 1, "{out}");
    let e: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(e["error"]["kind"], "server", "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no m.homeserver.base_url"),
        "{e}"
    );
    assert!(!u.session_path().exists());
    // The real answer: the session is on the client API it names.
    *answer.lock().unwrap() = json!({"m.homeserver": {"base_url": u.synapse.url}});
    let (code, out, err) = login(&u);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["homeserver"], u.synapse.url.as_str());
    assert_eq!(v["user_id"], u.user.user_id.as_str());
}

/// mxhsm's device signs the master key only as mxhsm itself would publish it: a server
/// that serves the master key object with a field of its own gets no device signature over
/// it (the login still cross-signs the new device).
#[test]
fn the_device_signs_no_master_object_the_server_dressed_up() {
    let u = MxhsmUser::new(Kind::SoftHsm);
    let first = u.login();
    ok(u.cli().args(["identity", "create"]));
    let me = u.user.user_id.clone();
    let me2 = me.clone();
    let proxy = common::synapse::Proxy::start(
        &u.synapse.url,
        Arc::new(move |path, _status, v| {
            if path.starts_with("/keys/query") && v["master_keys"].get(&me2).is_some() {
                v["master_keys"][&me2]["attacker"] = json!("chose this");
            }
        }),
    );
    let out = ok(u.cli().args([
        "--json",
        "login",
        "--replace",
        "--homeserver",
        &proxy.url,
        "--user",
        &u.user.localpart,
    ]));
    let second = serde_json::from_str::<Value>(&out).unwrap()["device_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(second, first);
    let checker = u.synapse.login(&u.user, "CHECKER");
    let (st, q) = http(
        &u.synapse.url,
        "POST",
        "/keys/query",
        Some(&checker),
        Some(json!({"device_keys": {&me: []}})),
    );
    assert_eq!(st, 200);
    let master = &q["master_keys"][&me];
    assert!(master.get("attacker").is_none(), "{master}");
    let sigs = master["signatures"][&me].as_object().unwrap();
    assert!(
        !sigs.contains_key(&format!("ed25519:{second}")),
        "the new device signed the dressed-up object: {master}"
    );
    assert!(verifies(
        &q["device_keys"][&me][&second],
        &me,
        &u.token_key("self_signing")
    ));
}

/// Attack 24: During a restore the server sends sessions twice with its own data (a second
/// copy inside the room, and the room itself a second time) and swaps one session's data
/// for a session of its own under that ID. The genuine copies are restored, the copies
/// counted, the swapped session fails its ID check and is not written; and the state file
/// does not let the attacker's data hide the genuine session from the next `--new-only`.
#[test]
fn a_restore_keeps_the_genuine_copy_of_every_session() {
    use common::backups::{put, restored, session_data, sessions, with_backup};
    let (u, version, public) = with_backup(Kind::SoftHsm);
    let made = sessions(12, 2);
    let entries: Vec<(&str, &str, Value)> = made
        .iter()
        .map(|((r, s), k)| (r.as_str(), s.as_str(), session_data(&public, k)))
        .collect();
    put(&u, &version, &entries);
    // The attacker's own session, encrypted to the public backup key like any client can.
    let theirs = sessions(1, 1).into_values().next().unwrap();
    let (r0, r1) = ("!room0:localhost", "!room1:localhost");
    let in_room = |room: &str| -> Vec<&str> {
        entries
            .iter()
            .filter(|(r, _, _)| *r == room)
            .map(|(_, s, _)| *s)
            .collect()
    };
    let (copied, again, swapped) = (in_room(r0)[0], in_room(r0)[1], in_room(r1)[0]);
    let entry = |s: &str, data: &Value| {
        format!(
            "{}:{}",
            json!(s),
            json!({"first_message_index": 0, "forwarded_count": 0, "is_verified": true, "session_data": data})
        )
    };
    let genuine = |room: &str, skip: &str| -> Vec<String> {
        entries
            .iter()
            .filter(|(r, s, _)| *r == room && *s != skip)
            .map(|(_, s, d)| entry(s, d))
            .collect()
    };
    let mut room0 = genuine(r0, "");
    room0.push(entry(copied, &session_data(&public, &theirs)));
    let mut room1 = genuine(r1, swapped);
    room1.push(entry(swapped, &session_data(&public, &theirs)));
    let body = format!(
        "{{\"rooms\":{{{}:{{\"sessions\":{{{}}}}},{}:{{\"sessions\":{{{}}}}},{}:{{\"sessions\":{{{}}}}}}}}}",
        json!(r0),
        room0.join(","),
        json!(r1),
        room1.join(","),
        json!(r0),
        entry(again, &session_data(&public, &theirs)),
    );
    let server = Hostile::start(&u.synapse.url, move |r| {
        if r.is("GET", "/room_keys/keys") {
            let body = body.clone();
            return Reply::Stream(Box::new(move |w| w.write_all(body.as_bytes())));
        }
        Reply::Forward
    });
    let dir = u.token.dir.path();
    let restore = |name: &str, extra: &[&str]| -> Value {
        let o = ok(u
            .cli()
            .args(["--json", "backup", "restore", "--format", "json"])
            .args(extra)
            .arg("--out")
            .arg(dir.join(name)));
        serde_json::from_str(&o).unwrap()
    };
    {
        let _via = u.via(&server.url);
        let r = restore("hostile.json", &[]);
        assert_eq!(r["restored"], 11, "{r}");
        assert_eq!(r["duplicates"], 2, "{r}");
        assert_eq!(r["failed"], 1, "{r}");
        assert_eq!(r["failures"][0]["session_id"], swapped, "{r}");
        let mut expected = made.clone();
        expected.remove(&(r1.to_string(), swapped.to_string()));
        assert_eq!(restored(&dir.join("hostile.json")), expected);
        assert_eq!(server.count("GET", "/room_keys/keys"), 1);
    }
    // The honest server's next `--new-only`: the swapped session's genuine data differs
    // from what failed, so it is restored now; nothing else is.
    let r = restore("next.json", &["--new-only"]);
    assert_eq!(r["restored"], 1, "{r}");
    assert_eq!(r["unchanged"], 11, "{r}");
    let key = (r1.to_string(), swapped.to_string());
    assert_eq!(
        restored(&dir.join("next.json")),
        [(key.clone(), made[&key].clone())].into_iter().collect()
    );
}
