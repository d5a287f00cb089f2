//! The `mxhsm` binary against real tokens: key commands, two processes on one token, PIN
//! handling (counted with OpenSC's pkcs11-spy and with Kryoptic's retry counter), and the
//! bad paths.

mod common;

use std::process::Command;

use common::{Kind, TestToken, USER_PIN, fails, ok, output, spy_module};
use serde_json::Value;

const ALICE: &str = "@alice:localhost";

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"))
}

/// How many mxhsm keys the token holds, as `keys list --json` says.
fn key_count(t: &TestToken) -> usize {
    json(&ok(t.cli().args(["keys", "list", "--json"])))["keys"]
        .as_array()
        .unwrap()
        .len()
}

fn keys_flow(kind: Kind) {
    let t = TestToken::new(kind);
    for role in ["master", "self_signing", "user_signing", "backup"] {
        let out = ok(t
            .cli()
            .args(["keys", "generate", "--user", ALICE, "--role", role]));
        assert!(
            out.starts_with(&format!("generated the {role} key of {ALICE}")),
            "{out}"
        );
    }
    let seed = t.dir.path().join("usk.b64");
    std::fs::write(&seed, "dXNlcnVzZXJ1c2VydXNlcnVzZXJ1c2VydXNlcnVzZXI=\n").unwrap();
    let out = ok(t
        .cli()
        .args([
            "--json",
            "keys",
            "import",
            "--user",
            "@bob:localhost",
            "--role",
            "user_signing",
            "--from",
        ])
        .arg(&seed));
    assert_eq!(
        json(&out)["public_key"],
        "g5TC/zjQXyZYuDLZv7a41z5fFVrXpYPypG//AFQj8hY"
    );
    assert_eq!(json(&out)["origin"], "imported");

    let list = json(&ok(t.cli().args(["keys", "list", "--json"])));
    let list = list["keys"].as_array().unwrap();
    assert_eq!(list.len(), 5);
    for k in list {
        assert_eq!(k["attributes"]["sensitive"], true);
        assert_eq!(k["attributes"]["extractable"], false);
        assert_eq!(k["attributes"]["private"], true);
    }
    let alice_only = json(&ok(t
        .cli()
        .args(["keys", "list", "--json", "--user", ALICE])));
    assert_eq!(alice_only["keys"].as_array().unwrap().len(), 4);

    let human = ok(t.cli().args(["keys", "list"]));
    assert!(
        human.contains("g5TC/zjQXyZYuDLZv7a41z5fFVrXpYPypG//AFQj8hY"),
        "{human}"
    );

    let doctor = json(&ok(t.cli().args(["token", "doctor", "--json"])));
    assert_eq!(doctor["ok"], true, "{doctor}");
    assert_eq!(doctor["checks"].as_array().unwrap().len(), 3 + 5);

    // Delete needs a confirmation; without a terminal it refuses and changes nothing.
    let err = fails(
        t.cli()
            .args(["keys", "delete", "--user", ALICE, "--role", "backup"])
            .stdin(std::process::Stdio::null()),
    );
    assert!(err.contains("pass --yes"), "{err}");
    assert_eq!(key_count(&t), 5);
    ok(t.cli().args([
        "keys", "delete", "--user", ALICE, "--role", "backup", "--yes",
    ]));
    let err = fails(t.cli().args([
        "keys", "delete", "--user", ALICE, "--role", "backup", "--yes",
    ]));
    assert!(
        err.contains("no backup key for @alice:localhost on token \"mxhsm-test\""),
        "{err}"
    );
    assert_eq!(key_count(&t), 4);
}

fn import_refuses_bad_files(kind: Kind) {
    let t = TestToken::new(kind);
    let cases: [(&str, &[u8], &str); 4] = [
        ("short.b64", b"c2VsZnNlbGZzZWxm\n", "decodes to 12 bytes"),
        ("empty", b"", "got 0 bytes"),
        ("junk", b"not base64 at all !!!", "not a private key"),
        ("raw33", &[7u8; 33], "got 33 bytes"),
    ];
    for (name, contents, needle) in cases {
        let path = t.dir.path().join(name);
        std::fs::write(&path, contents).unwrap();
        let err = fails(
            t.cli()
                .args([
                    "keys", "import", "--user", ALICE, "--role", "master", "--from",
                ])
                .arg(&path),
        );
        assert!(err.contains(needle), "{name}: {err}");
    }
    let err = fails(t.cli().args([
        "keys",
        "import",
        "--user",
        ALICE,
        "--role",
        "master",
        "--from",
        "/nonexistent/seed",
    ]));
    assert!(
        err.contains("cannot read the private key from /nonexistent/seed"),
        "{err}"
    );
    assert_eq!(key_count(&t), 0);
    // 32 raw bytes are accepted.
    let raw = t.dir.path().join("raw32");
    std::fs::write(&raw, [0x42u8; 32]).unwrap();
    ok(t.cli()
        .args([
            "keys", "import", "--user", ALICE, "--role", "master", "--from",
        ])
        .arg(&raw));
}

/// Two mxhsm processes on one token at the same time: both succeed.
fn two_processes_at_once(kind: Kind) {
    let t = TestToken::new(kind);
    let spawn = |user: &str| {
        let mut c = t.cli();
        c.args(["token", "doctor"]);
        let doctor = c.spawn().unwrap();
        let mut g = t.cli();
        g.args(["keys", "generate", "--user", user, "--role", "master"]);
        (doctor, g.spawn().unwrap())
    };
    let (d1, g1) = spawn("@one:localhost");
    let (d2, g2) = spawn("@two:localhost");
    for child in [d1, g1, d2, g2] {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let list = json(&ok(t.cli().args(["keys", "list", "--json"])));
    let users: Vec<&str> = list["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["user_id"].as_str().unwrap())
        .collect();
    assert_eq!(users, ["@one:localhost", "@two:localhost"]);
}

per_pkcs11_token!(keys_flow, import_refuses_bad_files, two_processes_at_once);

/// OpenSC's pkcs11-spy sits between mxhsm and SoftHSM and logs every call: a wrong PIN
/// reaches C_Login exactly once, and the error names the token.
#[test]
fn wrong_pin_reaches_the_token_once() {
    let t = TestToken::with_label(Kind::SoftHsm, "spied");
    let log = t.dir.path().join("spy.log");
    let spy_uri = format!("pkcs11:token=spied?module-path={}", spy_module().display());
    let run = |pin: &str| {
        let mut c = t.cli();
        c.env("MXHSM_TOKEN", &spy_uri)
            .env("MXHSM_PIN", pin)
            .env("PKCS11SPY", &t.module)
            .env("PKCS11SPY_OUTPUT", &log)
            .args(["keys", "list"]);
        c
    };
    let err = fails(&mut run("999999"));
    assert!(err.contains("wrong PIN for token \"spied\""), "{err}");
    let calls = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        calls.matches("C_Login").count(),
        1,
        "C_Login calls in:\n{calls}"
    );
    assert!(!err.contains("999999"), "the PIN is never echoed: {err}");

    // A URI that matches no token: no C_Login at all.
    std::fs::remove_file(&log).unwrap();
    let mut c = run(USER_PIN);
    c.env(
        "MXHSM_TOKEN",
        format!("pkcs11:token=other?module-path={}", spy_module().display()),
    );
    let err = fails(&mut c);
    assert!(err.contains("no token matches pkcs11:token=other"), "{err}");
    let calls = std::fs::read_to_string(&log).unwrap();
    assert_eq!(calls.matches("C_Login").count(), 0, "{calls}");
}

/// What one user's lookup costs the token, counted by pkcs11-spy: every C_FindObjects is a
/// pass over all the token's objects (docs/tokens.md), so a lookup is one search for the
/// index marker and one by subject, whatever the number of users; and each of the user's
/// objects is read once (cryptoki's two C_GetAttributeValue passes).
#[test]
fn a_user_lookup_is_two_searches_and_one_read_per_object() {
    let t = TestToken::with_label(Kind::SoftHsm, "counted");
    for user in ["@one:localhost", "@two:localhost", "@three:localhost"] {
        for role in ["master", "self_signing", "user_signing", "backup"] {
            ok(t.cli()
                .args(["keys", "generate", "--user", user, "--role", role]));
        }
    }
    let log = t.dir.path().join("spy.log");
    let out = ok(t
        .cli()
        .env(
            "MXHSM_TOKEN",
            format!(
                "pkcs11:token=counted?module-path={}",
                spy_module().display()
            ),
        )
        .env("PKCS11SPY", &t.module)
        .env("PKCS11SPY_OUTPUT", &log)
        .args(["keys", "list", "--user", "@two:localhost"]));
    assert_eq!(out.matches("@two:localhost").count(), 4, "{out}");
    let calls = std::fs::read_to_string(&log).unwrap();
    let count = |f: &str| {
        calls
            .lines()
            .filter(|l| {
                l.split_once(": ")
                    .is_some_and(|(n, c)| n.parse::<u32>().is_ok() && c == f)
            })
            .count()
    };
    assert_eq!(count("C_FindObjectsInit"), 2, "{calls}");
    // 4 keys, 8 objects, two passes each.
    assert_eq!(count("C_GetAttributeValue"), 16, "{calls}");
}

/// Kryoptic locks the PIN after 10 failures and reports the count in its flags. Each run of
/// mxhsm with a wrong PIN must use up exactly one try: after 7 runs the token says the count
/// is low, after 9 it is on its final try, and the right PIN then still works (with a
/// warning), which it would not if any run had sent the PIN twice.
#[test]
fn each_wrong_pin_uses_exactly_one_try() {
    let t = TestToken::with_label(Kind::Kryoptic, "counted");
    let wrong = |n: usize| {
        let err = fails(t.cli().env("MXHSM_PIN", "000000").args(["keys", "list"]));
        assert!(
            err.contains("wrong PIN for token \"counted\""),
            "run {n}: {err}"
        );
        err
    };
    for n in 1..=6 {
        let err = wrong(n);
        assert!(
            !err.contains("tries left") && !err.contains("one try left"),
            "run {n}: {err}"
        );
    }
    for n in 7..=8 {
        let err = wrong(n);
        assert!(
            err.contains("the token reports few tries left"),
            "run {n}: {err}"
        );
    }
    let err = wrong(9);
    assert!(
        err.contains("one try left: the next wrong PIN locks it"),
        "{err}"
    );
    let (success, _, stderr) = output(t.cli().args(["keys", "list"]));
    assert!(success, "{stderr}");
    assert!(
        stderr.contains("warning: before this login the token reported: one try left"),
        "{stderr}"
    );
    // The successful login reset the counter.
    let (success, _, stderr) = output(t.cli().args(["keys", "list"]));
    assert!(success && !stderr.contains("warning"), "{stderr}");
}

#[test]
fn a_locked_pin_is_reported_without_trying() {
    let t = TestToken::with_label(Kind::Kryoptic, "locked");
    for _ in 0..10 {
        fails(t.cli().env("MXHSM_PIN", "000000").args(["keys", "list"]));
    }
    let err = fails(t.cli().args(["keys", "list"]));
    assert!(err.contains("the user PIN of token \"locked\""), "{err}");
    assert!(err.contains("is locked"), "{err}");
}

#[test]
fn pins_never_come_from_the_command_line() {
    let t = TestToken::new(Kind::SoftHsm);
    let err = fails(t.cli().args(["keys", "list", "--pin", "123456"]));
    assert!(err.contains("unexpected argument '--pin'"), "{err}");
    let err = fails(
        t.cli()
            .env("MXHSM_TOKEN", format!("{}&pin-value=123456", t.uri))
            .args(["keys", "list"]),
    );
    assert!(err.contains("pin-value is refused"), "{err}");
    assert!(!err.contains("123456"), "the PIN is not echoed: {err}");
    // Without MXHSM_PIN, a PIN file or a terminal there is no PIN: a clear error.
    let err = fails(
        t.cli()
            .env_remove("MXHSM_PIN")
            .stdin(std::process::Stdio::null())
            .args(["keys", "list"]),
    );
    assert!(err.contains("no PIN for token \"mxhsm-test\""), "{err}");
    // A PIN file and pin-source= work.
    let pin = t.dir.path().join("pin");
    std::fs::write(&pin, format!("{USER_PIN}\n")).unwrap();
    ok(t.cli()
        .env_remove("MXHSM_PIN")
        .arg("--pin-file")
        .arg(&pin)
        .args(["keys", "list"]));
    ok(t.cli()
        .env_remove("MXHSM_PIN")
        .env(
            "MXHSM_TOKEN",
            format!("{}&pin-source=file:{}", t.uri, pin.display()),
        )
        .args(["keys", "list"]));
    let err = fails(
        t.cli()
            .env_remove("MXHSM_PIN")
            .arg("--pin-file")
            .arg("/nonexistent/pin")
            .args(["keys", "list"]),
    );
    assert!(
        err.contains("cannot read the PIN from /nonexistent/pin"),
        "{err}"
    );
}

#[test]
fn bad_module_and_uri_errors() {
    let bin = env!("CARGO_BIN_EXE_mxhsm");
    let run = |uri: &str| {
        let mut c = Command::new(bin);
        c.env("MXHSM_TOKEN", uri)
            .env("MXHSM_PIN", USER_PIN)
            .env_remove("MXHSM_PKCS11_MODULE")
            .args(["keys", "list"]);
        c
    };
    let err = fails(&mut run(
        "pkcs11:token=a?module-path=/nonexistent/module.so",
    ));
    assert!(
        err.contains("PKCS#11 module /nonexistent/module.so does not exist"),
        "{err}"
    );
    let err = fails(&mut run("pkcs11:token=a"));
    assert!(err.contains("no module: add ?module-path="), "{err}");
    let err = fails(&mut run("token=a"));
    assert!(err.contains("must start with \"pkcs11:\""), "{err}");
    let not_a_module = std::env::current_exe().unwrap();
    let err = fails(&mut run(&format!(
        "pkcs11:token=a?module-path={}",
        not_a_module.display()
    )));
    assert!(err.contains("cannot load PKCS#11 module"), "{err}");
    let err = fails(
        Command::new(bin)
            .env_remove("MXHSM_TOKEN")
            .args(["keys", "list"]),
    );
    assert!(
        err.contains("no token is chosen") && err.contains("pass --token"),
        "{err}"
    );
}

#[test]
fn token_list_shows_capabilities() {
    let soft = TestToken::with_label(Kind::SoftHsm, "listed-softhsm");
    let kry = TestToken::with_label(Kind::Kryoptic, "listed-kryoptic");
    let out = json(&ok(soft
        .cli()
        .env(kry.conf_env().0, kry.conf_env().1)
        .args(["token", "list", "--json", "--module"])
        .arg(&soft.module)
        .arg("--module")
        .arg(&kry.module)));
    let modules = out["modules"].as_array().unwrap();
    let token = |i: usize| -> Value {
        modules[i]["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["initialized"] == true)
            .cloned()
            .unwrap()
    };
    let s = token(0);
    assert_eq!(s["label"], "listed-softhsm");
    assert_eq!(s["capabilities"]["ed25519"], true);
    assert_eq!(s["capabilities"]["x25519"], "softhsm-edwards");
    let k = token(1);
    assert_eq!(k["label"], "listed-kryoptic");
    assert_eq!(k["capabilities"]["x25519"], "montgomery");
    // The URI it prints selects that token.
    let uri = s["uri"].as_str().unwrap();
    ok(soft.cli().env("MXHSM_TOKEN", uri).args(["keys", "list"]));
}

/// Modules are found as p11-kit registers them: a user's `.module` file adds one (shown
/// with its source), `module-name=` takes its p11-kit name, a user's empty `module:`
/// disables a system one, and a name that is not registered is an error that says so.
#[test]
fn modules_are_discovered_like_p11_kit() {
    let soft = TestToken::with_label(Kind::SoftHsm, "p11kit-softhsm");
    let config = soft.dir.path().join("config");
    let modules = config.join("pkcs11/modules");
    std::fs::create_dir_all(&modules).unwrap();
    std::fs::write(
        modules.join("team-hsm.module"),
        format!("# the team's HSM\nmodule: {}\n", soft.module.display()),
    )
    .unwrap();
    // The user disables the system's SoftHSM registration.
    std::fs::write(modules.join("softhsm2.module"), "module:\n").unwrap();
    let cli = || {
        let mut c = soft.cli();
        c.env("XDG_CONFIG_HOME", &config).env_remove("MXHSM_TOKEN");
        c
    };
    let listed = json(&ok(cli().args(["--json", "token", "list"])));
    let entry = listed["modules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["module"] == soft.module.display().to_string())
        .unwrap_or_else(|| panic!("the registered module is not listed: {listed}"));
    assert_eq!(entry["source"], "p11-kit team-hsm", "{entry}");
    assert_eq!(
        entry["p11_kit_config"],
        modules.join("team-hsm.module").display().to_string()
    );
    assert!(
        entry["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["label"] == "p11kit-softhsm"),
        "{entry}"
    );
    assert!(
        !listed.to_string().contains("p11-kit softhsm2"),
        "the disabled registration is used: {listed}"
    );
    let table = ok(cli().args(["token", "list"]));
    assert!(
        table.contains("FROM") && table.contains("p11-kit team-hsm"),
        "{table}"
    );

    // module-name= with the p11-kit name opens the token.
    let by_name = "pkcs11:token=p11kit-softhsm?module-name=team-hsm";
    ok(cli().env("MXHSM_TOKEN", by_name).args(["keys", "list"]));
    let err = fails(
        cli()
            .env(
                "MXHSM_TOKEN",
                "pkcs11:token=p11kit-softhsm?module-name=no-such-hsm",
            )
            .args(["keys", "list"]),
    );
    assert!(
        err.contains("no-such-hsm") && err.contains("no p11-kit module of that name"),
        "{err}"
    );
    let err = fails(
        cli()
            .env("MXHSM_TOKEN", "pkcs11:token=x?module-name=../lib/evil")
            .args(["keys", "list"]),
    );
    assert!(err.contains("module-name is a name, not a path"), "{err}");
}

#[test]
fn doctor_and_bench_without_x25519() {
    let t = TestToken::new(Kind::KryopticNoX25519);
    let out = ok(t.cli().args(["token", "doctor"]));
    assert!(out.contains("not supported by this token"), "{out}");
    let out = json(&ok(t.cli().args([
        "token",
        "bench",
        "--seconds",
        "0.2",
        "--json",
    ])));
    let results = out["results"].as_array().unwrap();
    assert_eq!(results.len(), 1);
    assert_eq!(results[0]["operation"], "ed25519 sign");
    assert!(results[0]["ratio"].as_f64().unwrap() > 0.0);
}

/// `token bench --backup-key-of` measures with the user's stored backup key, which it
/// keeps; a user without one, or a malformed user ID, is refused by name.
#[test]
fn bench_with_a_stored_backup_key() {
    let t = TestToken::new(Kind::Kryoptic);
    ok(t.cli()
        .args(["keys", "generate", "--user", ALICE, "--role", "backup"]));
    let keys = |t: &TestToken| ok(t.cli().args(["keys", "list", "--json"]));
    let before = keys(&t);
    let bench = |user: &str| {
        let mut c = t.cli();
        c.args(["token", "bench", "--seconds", "0.05"])
            .args(["--restore-sessions", "60", "--overhead", "60"])
            .args(["--backup-key-of", user]);
        c
    };
    let out = json(&ok(bench(ALICE).arg("--json")));
    let rows = out["restore"]["by_jobs"].as_array().unwrap();
    assert!(!rows.is_empty(), "{out}");
    assert!(
        rows.iter()
            .all(|r| r["raw_agreements_per_second"].as_f64().unwrap() > 0.0)
    );
    assert!(!out["overhead"].as_array().unwrap().is_empty(), "{out}");
    assert_eq!(keys(&t), before, "the stored key is kept, nothing added");
    let err = fails(&mut bench("@bob:localhost"));
    assert!(
        err.contains("holds no backup key of @bob:localhost"),
        "{err}"
    );
    let err = fails(&mut bench("bob"));
    assert!(
        err.contains("--backup-key-of: \"bob\" is not a Matrix user ID"),
        "{err}"
    );
}

/// A key another tool made with the token's default template (on SoftHSM: decrypt, unwrap,
/// sign-recover, modifiable, copyable) under mxhsm's label is flagged by the doctor, while
/// mxhsm's own keys pass.
#[test]
fn doctor_flags_keys_with_more_uses_than_their_role() {
    use cryptoki::mechanism::Mechanism;
    use cryptoki::object::Attribute;
    let t = TestToken::new(Kind::SoftHsm);
    ok(t.cli()
        .args(["keys", "generate", "--user", ALICE, "--role", "master"]));
    let session = t.raw_session();
    let label = b"mxhsm:self_signing:@alice:localhost".to_vec();
    let id = b"mx\x01\x00\x00\x01\x90\x00\x00\x00\x00abcd".to_vec();
    let oid = vec![0x06, 0x03, 0x2b, 0x65, 0x70];
    session
        .generate_key_pair(
            &Mechanism::EccEdwardsKeyPairGen,
            &[
                Attribute::Token(true),
                Attribute::EcParams(oid),
                Attribute::Label(label.clone()),
                Attribute::Id(id.clone()),
            ],
            &[
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Sign(true),
                Attribute::Label(label),
                Attribute::Id(id),
            ],
        )
        .unwrap();
    drop(session);
    let doctor = json(&crate::common::exits(
        1,
        t.cli().args(["token", "doctor", "--json"]),
    ));
    assert_eq!(doctor["ok"], false, "{doctor}");
    let checks = doctor["checks"].as_array().unwrap();
    let weak = checks
        .iter()
        .find(|c| c["name"].as_str().unwrap().contains("self_signing"))
        .unwrap();
    assert_eq!(weak["ok"], false, "{weak}");
    let detail = weak["detail"].as_str().unwrap();
    eprintln!("doctor on a default-template key: {detail}");
    for attr in ["CKA_DECRYPT", "CKA_MODIFIABLE", "CKA_COPYABLE"] {
        assert!(detail.contains(attr), "{detail}");
    }
    let ours = checks
        .iter()
        .find(|c| c["name"].as_str().unwrap().contains(" master "))
        .unwrap();
    assert_eq!(ours["ok"], true, "{ours}");
}

/// Shell completions and the man page are generated from the command definitions; typos
/// get suggestions; roles are listed with their short names; the token options have a
/// heading of their own.
#[test]
fn completions_man_page_suggestions_and_roles() {
    let bin = env!("CARGO_BIN_EXE_mxhsm");
    let out = |args: &[&str]| {
        let o = Command::new(bin).args(args).output().unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    for (shell, marker) in [
        ("bash", "_mxhsm()"),
        ("zsh", "#compdef mxhsm"),
        ("fish", "complete -c mxhsm"),
    ] {
        let (code, script, err) = out(&["completions", shell]);
        assert_eq!(code, Some(0), "{err}");
        assert!(script.contains(marker), "{shell}: {script:.200}");
        for sub in ["verify", "watch", "identity", "backup"] {
            assert!(script.contains(sub), "{shell} completes no {sub}");
        }
    }
    let (code, page, _) = out(&["man"]);
    assert_eq!(code, Some(0));
    assert!(page.contains(".TH mxhsm 1"), "{page:.300}");
    assert!(page.contains("verify") && page.contains("watch"));

    let (code, _, err) = out(&["idenity", "status"]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("a similar subcommand exists: 'identity'"),
        "{err}"
    );

    let (_, help, _) = out(&["keys", "generate", "--help"]);
    assert!(
        help.contains("master:") && help.contains("(also: msk)"),
        "{help}"
    );
    assert!(help.contains("\nToken:\n"), "{help}");
    // A short name is accepted where a role is asked for (the URI is checked after it).
    let (code, _, err) = out(&[
        "keys", "generate", "--user", "@a:b", "--role", "ssk", "--token", "x",
    ]);
    assert_eq!(code, Some(1));
    assert!(err.contains("invalid PKCS#11 URI"), "{err}");
    let (code, _, err) = out(&[
        "keys", "generate", "--user", "@a:b", "--role", "boss", "--token", "x",
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("invalid value 'boss'"), "{err}");
}

/// Under `--json`, errors are a document on standard output with a stable `kind`; a usage
/// mistake too (exit 2).
#[test]
fn errors_under_json_are_documents() {
    let bin = env!("CARGO_BIN_EXE_mxhsm");
    let run = |args: &[&str]| {
        let o = Command::new(bin)
            .env_remove("MXHSM_TOKEN")
            .env_remove("MXHSM_YUBIKEY")
            .args(args)
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stdout)));
        (o.status.code(), v)
    };
    let (code, v) = run(&["--json", "keys", "list"]);
    assert_eq!(code, Some(1));
    assert_eq!(v["error"]["kind"], "token", "{v}");
    assert_eq!(
        v["version"], 1,
        "every document has the interface's version: {v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no token is chosen"),
        "{v}"
    );
    assert!(
        v["error"]["hint"].as_str().unwrap().contains("--token"),
        "{v}"
    );
    let (code, v) = run(&["--json", "keys", "lst"]);
    assert_eq!(code, Some(2));
    assert_eq!(v["error"]["kind"], "usage", "{v}");
    assert_eq!(v["version"], 1, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("'lst'"),
        "{v}"
    );
    let data = tempfile::tempdir().unwrap();
    let o = Command::new(bin)
        .env("XDG_DATA_HOME", data.path())
        .args(["--json", "identity", "status"])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["error"]["kind"], "not_logged_in", "{v}");
}
