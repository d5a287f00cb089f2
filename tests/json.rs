//! docs/json.md against mxhsm: one account goes through every command with `--json`, and
//! each document is checked against the shape the doc gives it (`common::json_doc`); every
//! shape the doc gives is checked by some test.
mod common;

use common::clients::{phone, software_identity, spaced};
use common::json_doc::{
    Shape, all, check, check_key, check_shape, documented, matches, parse_shape,
};
use common::synapse::MxhsmUser;
use common::{Kind, exits, ok, run};
use serde_json::{Value, json};

#[test]
fn shapes_parse() {
    let obj = |fields: &[(&str, Shape)], open| Shape::Object {
        fields: fields
            .iter()
            .map(|(n, s)| (n.to_string(), s.clone()))
            .collect(),
        open,
    };
    assert_eq!(
        parse_shape(r#"{"a", "b": [{"c"}], "d": {…}, "e": 1, "f": key, …}"#).unwrap(),
        obj(
            &[
                ("a", Shape::Any),
                (
                    "b",
                    Shape::Array(Box::new(obj(&[("c", Shape::Any)], false)))
                ),
                ("d", obj(&[], true)),
                ("e", Shape::Any),
                ("f", Shape::Any),
            ],
            true
        )
    );
    assert_eq!(
        parse_shape(r#"{"e": [...]}"#).unwrap(),
        obj(&[("e", Shape::Array(Box::new(Shape::Any)))], false)
    );
    assert!(parse_shape(r#"{"a" "b"}"#).is_err());
    assert!(parse_shape(r#"{"a""#).is_err());
    let shape = parse_shape(r#"{"a", "b": [{"c"}]}"#).unwrap();
    assert!(matches(&shape, &serde_json::json!({"a": 1, "b": [{"c": 2}]}), "").is_ok());
    let missing = matches(&shape, &serde_json::json!({"a": 1, "b": [{}]}), "").unwrap_err();
    assert_eq!(missing, ".b[0].c: documented, but missing");
    let extra = matches(&shape, &serde_json::json!({"a": 1, "b": [], "z": 0}), "").unwrap_err();
    assert_eq!(extra, ".z: present, but not documented");
}

fn doc(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// Every command of one account, from the first login to the logout, on SoftHSM.
#[test]
fn every_command_prints_what_docs_json_md_says() {
    let alice = MxhsmUser::new(Kind::SoftHsm);
    let cli = || {
        let mut c = alice.cli();
        c.arg("--json");
        c
    };
    let dir = alice.token.dir.path();

    check("token list", &doc(&ok(cli().args(["token", "list"]))));
    let list = doc(&ok(cli().args(["token", "list"])));
    let token = &list["modules"][0]["tokens"][0];
    assert!(token.is_object(), "{list}");
    check_part("token list, each token", token);
    let (code, out, err) = run(cli().args(["token", "doctor"]));
    assert!(code == 0 || code == 3, "{err}");
    check("token doctor", &doc(&out));

    // Not logged in yet: the error document.
    let (code, out, _) = run(cli().args(["identity", "status"]));
    assert_ne!(code, 0, "{out}");
    let err = doc(&out);
    check("error", &err);
    assert_eq!(err["error"]["kind"], "not_logged_in", "{err}");

    let login = doc(&ok(cli().args([
        "login",
        "--homeserver",
        &alice.synapse.url,
        "--user",
        &alice.user.localpart,
    ])));
    check("login", &login);
    let reused = doc(&ok(cli().args([
        "login",
        "--homeserver",
        &alice.synapse.url,
        "--user",
        &alice.user.localpart,
    ])));
    check("login", &reused);
    assert_eq!(reused["reused"], true, "{reused}");

    let created = doc(&ok(cli().args(["identity", "create"])));
    check("identity create", &created);
    check(
        "identity publish",
        &doc(&ok(cli().args(["identity", "publish"]))),
    );

    // Keys of another user: generated, imported, listed, deleted.
    let other = "@json-other:localhost";
    let generated =
        doc(&ok(cli().args([
            "keys", "generate", "--user", other, "--role", "master",
        ])));
    check_key("keys generate", &generated);
    let seed = dir.join("seed.b64");
    std::fs::write(&seed, "dXNlcnVzZXJ1c2VydXNlcnVzZXJ1c2VydXNlcnVzZXI=\n").unwrap();
    let imported = doc(&ok(cli()
        .args([
            "keys",
            "import",
            "--user",
            other,
            "--role",
            "user_signing",
            "--from",
        ])
        .arg(&seed)));
    check_key("keys import", &imported);
    let keys = doc(&ok(cli().args(["keys", "list"])));
    check("keys list", &keys);
    assert!(keys["keys"].as_array().unwrap().len() >= 5, "{keys}");
    check(
        "keys delete",
        &doc(&ok(cli().args([
            "keys", "delete", "--user", other, "--role", "master", "--yes",
        ]))),
    );

    // A second device, signed; Bob, verified.
    phone(alice.synapse, &alice.user, "JSONPHONE");
    let signed = doc(&ok(cli().args(["sign", "devices", "JSONPHONE", "--yes"])));
    check("sign device(s)", &signed);
    assert_eq!(signed["signed_devices"], json!(["JSONPHONE"]), "{signed}");
    let bob = alice.synapse.register("bob");
    let bob_token = alice.synapse.login(&bob, "BOBDEV");
    let bob_msk = software_identity(alice.synapse, &bob, &bob_token);
    let fp = spaced(&base64_of(&bob_msk));
    check(
        "sign user",
        &doc(&ok(cli().args([
            "sign",
            "user",
            &bob.user_id,
            "--fingerprint",
            &fp,
        ]))),
    );
    let status = alice.status(&["--user", &bob.user_id]);
    check("identity status", &status);
    assert!(
        !status["devices"].as_array().unwrap().is_empty(),
        "{status}"
    );
    assert!(!status["users"].as_array().unwrap().is_empty(), "{status}");

    // The backup: created, filled, read, restored.
    let created = doc(&ok(cli().args(["backup", "create"])));
    check("backup create", &created);
    let export = dir.join("export.json");
    let sessions = common::backups::sessions(3, 1);
    common::backups::write_export(&export, &sessions);
    check(
        "backup upload",
        &doc(&ok(cli()
            .args(["backup", "upload", "--format", "json"])
            .arg(&export))),
    );
    check("backup status", &doc(&ok(cli().args(["backup", "status"]))));
    let restored = doc(&ok(cli()
        .args(["backup", "restore", "--format", "json", "--out"])
        .arg(dir.join("restored.json"))));
    check("backup restore", &restored);
    assert_eq!(restored["restored"], 3, "{restored}");

    let (code, out, err) = run(cli().args(["secret-storage", "status"]));
    assert_eq!(code, 0, "{err}");
    check("secret-storage status", &doc(&out));
    let (code, out, err) = run(cli().args(["doctor"]));
    assert!(code == 0 || code == 3, "{err}");
    check("doctor", &doc(&out));
    check("account list", &doc(&ok(cli().args(["account", "list"]))));
    let graph = dir.join("keys.svg");
    check(
        "graph --out FILE",
        &doc(&ok(cli().args(["graph", "--out"]).arg(&graph))),
    );

    let bench = doc(&ok(cli().args([
        "token",
        "bench",
        "--seconds",
        "0.05",
        "--restore-sessions",
        "20",
        "--overhead",
        "20",
    ])));
    check("token bench", &bench);
    check_part("token bench, restore", &bench["restore"]);
    check_part("token bench, overhead", &bench["overhead"]);
    let scale = doc(&ok(cli().args(["token", "bench", "--scale-users", "12"])));
    check("token bench --scale-users", &scale);
    assert_eq!(scale["rows"].as_array().unwrap().len(), 2, "{scale}");
    assert_eq!(scale["rows"][1]["searches_per_user"], 1, "{scale}");

    // The audit log of all that: verified, shown; then cut, and the failure's document.
    let verified = doc(&ok(cli().args(["audit", "verify"])));
    check("audit verify", &verified);
    check("audit show", &doc(&ok(cli().args(["audit", "show"]))));
    let log = verified["file"].as_str().unwrap().to_string();
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let cut = dir.join("cut.jsonl");
    std::fs::write(&cut, format!("{}\n{}\n", lines[0], lines[2])).unwrap();
    let failed = doc(&exits(3, cli().args(["audit", "verify"]).arg(&cut)));
    check("audit verify, failed", &failed);

    check("logout", &doc(&ok(cli().args(["logout"]))));
}

/// The documented shape `name`, for a part of a document (no `"version"` of its own).
fn check_part(name: &str, part: &Value) {
    check_shape(name, documented(name), part);
}

fn base64_of(key: &ed25519_dalek::SigningKey) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(key.verifying_key().to_bytes())
}

/// Every shape docs/json.md gives is checked by a test (a `check`, `check_part`,
/// `check_shape` or `check_all_accounts` call naming it in tests/, or for an event, a test
/// that expects it by name: every event the tests see goes through `check_event`).
#[test]
fn every_documented_shape_is_checked_by_a_test() {
    let mut sources = String::new();
    for dir in ["tests", "tests/common"] {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "rs") {
                sources.push_str(&std::fs::read_to_string(path).unwrap());
            }
        }
    }
    let squeezed: String = sources.split_whitespace().collect();
    let unchecked: Vec<&String> = all()
        .keys()
        .filter(|name| {
            // An event: every event a test sees is checked (`check_event`, in the watch
            // and verify helpers); a test must expect this one by name.
            if let Some(event) = name
                .strip_prefix("watch ")
                .or_else(|| name.strip_prefix("verify "))
            {
                return !sources.contains(&format!("\"{event}\""));
            }
            let name: String = name.split_whitespace().collect();
            ![
                "check(",
                "check_part(",
                "check_shape(",
                "check_all_accounts(",
            ]
            .iter()
            .any(|f| squeezed.contains(&format!("{f}\"{name}\",")))
        })
        .collect();
    assert!(
        unchecked.is_empty(),
        "docs/json.md shapes no test checks: {unchecked:?}"
    );
    // The doc's own sections, at least these.
    for name in [
        "login",
        "identity status",
        "keys list",
        "error",
        "--account all",
        "token bench",
    ] {
        assert!(all().contains_key(name), "{name} is not documented");
    }
}
