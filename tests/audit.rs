//! The audit log: after a mixed session it verifies and records exactly what the token
//! signed (checked against Synapse's copies, with independent code); every kind of
//! tampering is found at its line; two processes appending at once keep one chain; a
//! crash mid-append leaves a verifiable prefix; entries go to a syslog socket too.

mod common;

use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD as B64;
use common::clients::{canonical, phone, software_identity, spaced};
use common::synapse::MxhsmUser;
use common::{Kind, TestToken, exits, ok, run};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

fn log_of(u: &MxhsmUser) -> PathBuf {
    u.token.dir.path().join("data/mxhsm/audit.jsonl")
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn verify(u: &MxhsmUser, file: &Path) -> (i32, Value) {
    let (code, out, err) = run(u.cli().args(["--json", "audit", "verify"]).arg(file));
    (
        code,
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out} {err}")),
    )
}

/// The SHA-256 (hex) of the bytes a Matrix signature covers: the canonical JSON without
/// `signatures` and `unsigned`.
fn signed_digest(object: &Value) -> String {
    let mut o = object.clone();
    o.as_object_mut().unwrap().remove("signatures");
    o.as_object_mut().unwrap().remove("unsigned");
    Sha256::digest(canonical(&o).as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn a_mixed_session_is_recorded_and_every_tampering_is_found() {
    let u = MxhsmUser::new(Kind::SoftHsm);
    ok(u.cli().args([
        "keys",
        "generate",
        "--role",
        "audit",
        "--user",
        &u.user.user_id,
    ]));
    let audit_key = u.token_key("audit");
    u.login();
    ok(u.cli().args(["identity", "create"]));
    phone(u.synapse, &u.user, "PHONE");
    ok(u.cli().args(["sign", "device", "PHONE", "--yes"]));
    let bob = u.synapse.register("bob");
    let bob_token = u.synapse.login(&bob, "BOBPHONE");
    let bob_msk = software_identity(u.synapse, &bob, &bob_token);
    let bob_fp = spaced(&B64.encode(bob_msk.verifying_key().to_bytes()));
    ok(u.cli()
        .args(["sign", "user", &bob.user_id, "--fingerprint", &bob_fp]));
    let created: Value =
        serde_json::from_str(&ok(u.cli().args(["--json", "backup", "create"]))).unwrap();
    let version = created["backup_version"].as_str().unwrap();
    let public = created["public_key"].as_str().unwrap();
    common::backups::put_sessions(&u, version, public, 30);
    let out = u.token.dir.path().join("keys.json");
    ok(u.cli()
        .args(["backup", "restore", "--format", "json", "--out"])
        .arg(&out));

    let log = log_of(&u);
    let (code, v) = verify(&u, &log);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["audit_key"], audit_key.as_str(), "{v}");
    assert_eq!(v["signed_heads"], v["heads"], "{v}");
    assert_eq!(v["unsigned_tail"], 0, "{v}");

    // What the log says the token did, against Synapse's own copies.
    let shown: Value =
        serde_json::from_str(&ok(u.cli().args(["--json", "audit", "show"]))).unwrap();
    let entries = shown["entries"].as_array().unwrap();
    let find = |pred: &dyn Fn(&Value) -> bool| -> Vec<Value> {
        entries.iter().filter(|e| pred(e)).cloned().collect()
    };
    let generated: Vec<String> = find(&|e| e["op"] == "generate")
        .iter()
        .map(|e| e["key"]["role"].as_str().unwrap().to_string())
        .collect();
    for role in ["audit", "master", "self_signing", "user_signing", "backup"] {
        assert!(
            generated.contains(&role.to_string()),
            "{role}: {generated:?}"
        );
    }
    let checker = u.synapse.login(&u.user, "CHECKER");
    let me = u.user.user_id.as_str();
    let q = u.query(&checker, me);
    let phone_signs = find(&|e| {
        e["op"] == "sign"
            && e["object"]["type"] == "device_keys"
            && e["object"]["device_id"] == "PHONE"
    });
    assert_eq!(phone_signs.len(), 1, "{shown}");
    assert_eq!(phone_signs[0]["key"]["role"], "self_signing");
    assert_eq!(phone_signs[0]["command"], "sign device");
    assert_eq!(
        phone_signs[0]["sha256"],
        signed_digest(&q["device_keys"][me]["PHONE"]).as_str()
    );
    let bob_q = u.query(&checker, &bob.user_id);
    let bob_signs = find(&|e| {
        e["op"] == "sign"
            && e["object"]["type"] == "cross_signing_key"
            && e["object"]["user_id"] == bob.user_id.as_str()
    });
    assert_eq!(bob_signs.len(), 1, "{shown}");
    assert_eq!(bob_signs[0]["key"]["role"], "user_signing");
    assert_eq!(
        bob_signs[0]["sha256"],
        signed_digest(&bob_q["master_keys"][&bob.user_id]).as_str()
    );
    let ssk_signs = find(&|e| {
        e["op"] == "sign" && e["object"]["usage"] == "self_signing" && e["object"]["user_id"] == me
    });
    assert_eq!(
        ssk_signs.last().unwrap()["sha256"],
        signed_digest(&q["self_signing_keys"][me]).as_str()
    );
    let auth = find(&|e| e["op"] == "sign" && e["object"]["type"] == "backup_auth_data");
    assert!(!auth.is_empty(), "{shown}");
    let done = find(&|e| e["op"] == "agree_done");
    assert_eq!(done.len(), 1, "{shown}");
    assert_eq!(done[0]["count"], 30);
    assert_eq!(done[0]["command"], "backup restore");
    // The human table.
    let table = ok(u.cli().args(["audit", "show", "--since", "1h"]));
    assert!(
        table.contains("device PHONE of") && table.contains("30 agreement(s)"),
        "{table}"
    );
    let none: Value = serde_json::from_str(&ok(u.cli().args([
        "--json",
        "audit",
        "show",
        "--since",
        "2099-01-01",
    ])))
    .unwrap();
    assert_eq!(none["entries"].as_array().unwrap().len(), 0);

    // Tampering, each on a copy (with the head file beside it).
    let all = lines(&log);
    let head_seq = v["last_head"]["seq"].as_u64().unwrap();
    let head_hash = v["last_head"]["sha256"].as_str().unwrap().to_string();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let sign_line = all
        .iter()
        .position(|l| l.contains("\"op\":\"sign\""))
        .unwrap();
    let first_head = all
        .iter()
        .position(|l| l.contains("\"op\":\"head\""))
        .unwrap();
    let copy = |name: &str, body: String, with_head_file: bool| -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        if with_head_file {
            std::fs::copy(
                mxhsm::account::audit::head_path(&log),
                mxhsm::account::audit::head_path(&p),
            )
            .unwrap();
        }
        p
    };
    let joined = |ls: &[String]| ls.iter().map(|l| format!("{l}\n")).collect::<String>();
    let bad = |p: &Path, line: usize, expected: &str| {
        let (code, v) = verify(&u, p);
        assert_eq!(code, 3, "{v}");
        assert_eq!(v["line"], line as u64, "{v}");
        assert!(v["error"].as_str().unwrap().contains(expected), "{v}");
    };
    // A changed entry: the next line's prev no longer matches.
    let mut changed = all.clone();
    changed[sign_line] = changed[sign_line].replacen("\"op\":\"sign\"", "\"op\":\"sign\" ", 1);
    bad(
        &copy("changed", joined(&changed), false),
        sign_line + 2,
        "prev",
    );
    // A changed head: its signature fails.
    let mut forged = all.clone();
    forged[first_head] = forged[first_head].replacen("\"time\":\"2", "\"time\":\"1", 1);
    bad(
        &copy("forged", joined(&forged), false),
        first_head + 1,
        "signature",
    );
    // The last head replaced by an unsigned one (what rewriting the log from some entry on
    // would leave): refused, since heads were signed before it.
    let mut unsigned = all.clone();
    let last = unsigned.len() - 1;
    let mut head: Value = serde_json::from_str(&unsigned[last]).unwrap();
    head["audit_key"] = Value::Null;
    head["signature"] = Value::Null;
    unsigned[last] = head.to_string();
    bad(
        &copy("unsigned", joined(&unsigned), false),
        last + 1,
        "unsigned, after signed ones",
    );
    // A removed entry.
    let mut removed = all.clone();
    removed.remove(sign_line);
    bad(
        &copy("removed", joined(&removed), false),
        sign_line + 1,
        "removed",
    );
    // Two entries swapped.
    let mut swapped = all.clone();
    swapped.swap(sign_line, sign_line + 1);
    bad(
        &copy("swapped", joined(&swapped), false),
        sign_line + 1,
        "expected",
    );
    // Cut back to an earlier head: the head recorded beside the log says so.
    let cut = copy("cut", joined(&all[..=first_head]), true);
    let (code, v) = verify(&u, &cut);
    assert_eq!(code, 3, "{v}");
    assert!(v["error"].as_str().unwrap().contains("cut off"), "{v}");
    // ... and so does the head an auditor kept, without the file.
    let cut_alone = copy("cut-alone", joined(&all[..=first_head]), false);
    let (code, out, _) = run(u
        .cli()
        .args([
            "--json",
            "audit",
            "verify",
            "--head",
            &format!("{head_seq}:{head_hash}"),
        ])
        .arg(&cut_alone));
    assert_eq!(code, 3, "{out}");
    // Cut mid-line (a crash during an append): the prefix verifies, the torn tail is said.
    let mut torn = joined(&all);
    torn.push_str(&all[sign_line][..20]);
    let (code, v) = verify(&u, &copy("torn", torn, false));
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["torn_tail"], true);
    // Another audit key than the one given.
    let other = B64.encode(common::clients::random_key().verifying_key().to_bytes());
    let (code, out, _) = run(u
        .cli()
        .args(["--json", "audit", "verify", "--key", &other])
        .arg(&log));
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("not by the audit key"), "{out}");
    // The real log still verifies, against the head it printed.
    let (code, out, _) = run(u
        .cli()
        .args([
            "audit",
            "verify",
            "--head",
            &format!("{head_seq}:{head_hash}"),
        ])
        .arg(&log));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("✔"), "{out}");
}

#[test]
fn two_processes_keep_one_chain_and_a_crash_leaves_a_prefix() {
    // Two tokens, one log: both processes generate keys at once.
    let soft = TestToken::new(Kind::SoftHsm);
    let kry = TestToken::new(Kind::Kryoptic);
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let log = dir.path().join("shared.jsonl");
    let socket_path = dir.path().join("syslog.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let spawn = |t: &TestToken, user: &str| {
        let mut c = t.cli();
        c.env("MXHSM_AUDIT_LOG", &log)
            .env("MXHSM_AUDIT_SYSLOG", &socket_path)
            .env("XDG_DATA_HOME", t.dir.path().join("data"));
        let script = format!(
            "for i in 1 2 3 4 5 6; do {:?} keys generate --role master --user {user} >/dev/null || exit 1; done",
            env!("CARGO_BIN_EXE_mxhsm")
        );
        let mut sh = std::process::Command::new("sh");
        sh.args(["-c", &script]);
        for (k, v) in c.get_envs() {
            match v {
                Some(v) => sh.env(k, v),
                None => sh.env_remove(k),
            };
        }
        sh.spawn().unwrap()
    };
    // The syslog reads as the entries come.
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while got.len() < 24 {
            let Ok(n) = socket.recv(&mut buf) else { break };
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        got
    });
    let mut a = spawn(&soft, "@a:example.org");
    let mut b = spawn(&kry, "@b:example.org");
    assert!(a.wait().unwrap().success());
    assert!(b.wait().unwrap().success());
    let u = MxhsmUser::new(Kind::SoftHsm);
    let (code, v) = verify(&u, &log);
    assert_eq!(code, 0, "{v}");
    // 12 commands, each a generate and an (unsigned: no audit key) head.
    assert_eq!(v["entries"], 24, "{v}");
    assert_eq!(v["heads"], 12, "{v}");
    assert_eq!(v["signed_heads"], 0, "{v}");
    // Every line also went to the syslog socket.
    let got = reader.join().unwrap();
    assert_eq!(got.len(), 24, "{got:?}");
    for text in got {
        assert!(
            text.starts_with("<37>mxhsm[") && text.contains("\"seq\":"),
            "{text}"
        );
    }

    // A crash mid-append: half a line at the end. It verifies as a prefix; the next
    // command repairs it and records the repair.
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(b"{\"seq\":25,\"prev\":\"0123").unwrap();
    }
    let (code, v) = verify(&u, &log);
    assert_eq!((code, v["torn_tail"].as_bool()), (0, Some(true)), "{v}");
    // Deletes the current master key of @a, recording into the shared log.
    let delete = || {
        let mut c = soft.cli();
        c.env("MXHSM_AUDIT_LOG", &log)
            .env("XDG_DATA_HOME", soft.dir.path().join("data"))
            .args([
                "keys",
                "delete",
                "--role",
                "master",
                "--user",
                "@a:example.org",
                "--yes",
            ]);
        c
    };
    ok(&mut delete());
    let (code, v) = verify(&u, &log);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["repairs"], json!([25]), "{v}");
    assert_eq!(v["torn_tail"], false);

    // A log mxhsm cannot append to stops the operation: nothing is generated.
    std::fs::write(&log, "not an audit log\n").unwrap();
    let (code, _, err) = run(&mut delete());
    assert_ne!(code, 0);
    assert!(err.contains("audit log"), "{err}");
    let keys: Value = serde_json::from_str(&ok(soft
        .cli()
        .env("MXHSM_AUDIT_LOG", dir.path().join("other.jsonl"))
        .args(["keys", "list", "--json", "--user", "@a:example.org"])))
    .unwrap();
    assert_eq!(
        keys["keys"].as_array().unwrap().len(),
        5,
        "the delete was not done: {keys}"
    );
    let _ = exits;
}
