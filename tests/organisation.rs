//! An organisation's mxhsm: a config file with several accounts on one SoftHSM token and
//! one on Kryoptic, in one Synapse; `--account all` status; devices signed under a policy
//! (one PIN for all accounts on a token); a hostile server's forged device never signed.

mod common;

use std::path::PathBuf;
use std::process::Command;

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD as B64;
use common::clients::{phone, phone_signed_by, random_key, verifies};
use common::synapse::{Proxy, Synapse, TestUser, http};
use common::{Kind, TestToken, exits, fails, ok, run};
use serde_json::{Value, json};

struct Org {
    synapse: &'static Synapse,
    team: TestToken,
    kry: TestToken,
    dir: tempfile::TempDir,
    alice: TestUser,
    bob: TestUser,
    carol: TestUser,
}

impl Org {
    fn new() -> Org {
        let synapse = Synapse::get();
        let team = TestToken::with_label(Kind::SoftHsm, "team");
        let kry = TestToken::new(Kind::Kryoptic);
        let dir = tempfile::Builder::new()
            .prefix("org-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .unwrap();
        let org = Org {
            alice: synapse.register("alice"),
            bob: synapse.register("bob"),
            carol: synapse.register("carol"),
            synapse,
            team,
            kry,
            dir,
        };
        std::fs::write(
            org.config(),
            format!(
                r#"# the organisation's accounts
[tokens.team]
uri = "{team}"

[tokens.kry]
uri = "{kry}"

[accounts.alice]
user = "{alice}"
homeserver = "{url}"
token = "team"

[accounts.bob]
user = "{bob}"
homeserver = "{url}"
token = "team"
device-name = "bob's HSM"

[accounts.carol]
user = "{carol}"
homeserver = "{url}"
token = "kry"
"#,
                team = org.team.uri,
                kry = org.kry.uri,
                alice = org.alice.user_id,
                bob = org.bob.user_id,
                carol = org.carol.user_id,
                url = synapse.url,
            ),
        )
        .unwrap();
        org
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    fn cli(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_mxhsm"));
        let (v1, c1) = self.team.conf_env();
        let (v2, c2) = self.kry.conf_env();
        c.env(v1, c1)
            .env(v2, c2)
            .env("MXHSM_CONFIG", self.config())
            .env("XDG_DATA_HOME", self.dir.path().join("data"))
            .env("XDG_CONFIG_HOME", self.dir.path().join("config"))
            .env("MXHSM_PIN", common::USER_PIN)
            // For when the config puts OpenSC's pkcs11-spy in front of the team token.
            .env("PKCS11SPY", &self.team.module)
            .env("PKCS11SPY_OUTPUT", self.dir.path().join("spy-other.log"))
            .env_remove("MXHSM_TOKEN")
            .env_remove("MXHSM_YUBIKEY")
            .env_remove("MXHSM_ACCOUNT")
            .stdin(std::process::Stdio::null());
        c
    }

    fn users(&self) -> [&TestUser; 3] {
        [&self.alice, &self.bob, &self.carol]
    }

    /// Logs every account in and creates its identity on its token.
    fn with_identities(self) -> Org {
        for (name, u) in ["alice", "bob", "carol"].iter().zip(self.users()) {
            ok(self
                .cli()
                .env("MXHSM_PASSWORD", &u.password)
                .args(["--account", name, "login"]));
            ok(self.cli().args(["--account", name, "identity", "create"]));
        }
        self
    }

    fn json(&self, args: &[&str]) -> Value {
        let (_, out, err) = run(self.cli().arg("--json").args(args));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}\n{err}"))
    }
}

/// `--account ACCOUNTS sign devices --policy POLICY`.
fn policy_args<'a>(accounts: &'a str, policy: &'a std::path::Path) -> [&'a str; 6] {
    [
        "--account",
        accounts,
        "sign",
        "devices",
        "--policy",
        policy.to_str().unwrap(),
    ]
}

/// Synapse's `/keys/query` answer for `user`.
fn query(synapse: &Synapse, token: &str, user: &str) -> Value {
    let (_, q) = http(
        &synapse.url,
        "POST",
        "/keys/query",
        Some(token),
        Some(json!({"device_keys": {user: []}})),
    );
    q
}

/// The self-signing key (base64) the server publishes for `user`.
fn published_ssk(synapse: &Synapse, token: &str, user: &str) -> String {
    query(synapse, token, user)["self_signing_keys"][user]["keys"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_string()
}

/// Synapse's own copy of `user`'s device `id`.
fn stored_device(synapse: &Synapse, token: &str, user: &str, id: &str) -> Value {
    query(synapse, token, user)["device_keys"][user][id].clone()
}

/// Whether Synapse holds a signature of `id` by `user`'s published self-signing key.
fn cross_signed(synapse: &Synapse, checker: &str, user: &str, id: &str) -> bool {
    let ssk = published_ssk(synapse, checker, user);
    let device = stored_device(synapse, checker, user, id);
    device["signatures"][user]
        .get(format!("ed25519:{ssk}"))
        .is_some()
        && verifies(&device, user, &ssk)
}

#[test]
fn config_accounts_and_bulk_status() {
    let org = Org::new();
    // Before any login: three accounts, none logged in.
    let list = org.json(&["account", "list"]);
    common::json_doc::check("account list", &list);
    let accounts = list["accounts"].as_array().unwrap();
    assert_eq!(accounts.len(), 3, "{list}");
    assert!(accounts.iter().all(|a| a["logged_in"] == false), "{list}");
    // A command without an account, with nobody logged in.
    let err = fails(org.cli().args(["identity", "status"]));
    assert!(err.contains("not logged in"), "{err}");

    let org = org.with_identities();
    // One session file per account; the token each was logged in with is recorded.
    let sessions = org.dir.path().join("data/mxhsm/sessions");
    assert_eq!(std::fs::read_dir(&sessions).unwrap().count(), 3);
    let s: Value = serde_json::from_str(
        &std::fs::read_to_string(
            mxhsm::homeserver::Sessions::at(&sessions).path_for(&org.carol.user_id),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(s["token"], org.kry.uri.as_str());

    let list = org.json(&["account", "list"]);
    for (name, token) in [("alice", "team"), ("bob", "team"), ("carol", "kry")] {
        let a = list["accounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == name)
            .unwrap_or_else(|| panic!("{list}"));
        assert_eq!(a["logged_in"], true, "{a}");
        assert_eq!(a["token"], token, "{a}");
        assert_eq!(a["identity"], "on token", "{a}");
    }
    // The human table has a row per account.
    let table = ok(org.cli().args(["account", "list"]));
    for u in org.users() {
        assert!(table.contains(&u.user_id), "{table}");
    }

    // Several accounts logged in: a single-account command must be told which.
    let err = fails(org.cli().args(["identity", "status"]));
    assert!(err.contains("several accounts are logged in"), "{err}");
    let one = org.json(&["--account", "bob", "identity", "status"]);
    assert_eq!(one["user_id"], org.bob.user_id.as_str());
    // By user ID too.
    let one = org.json(&["--account", &org.carol.user_id, "identity", "status"]);
    assert_eq!(one["user_id"], org.carol.user_id.as_str());

    // `--account all`: every account, one document.
    let all = org.json(&["--account", "all", "identity", "status"]);
    common::json_doc::check_all_accounts("identity status", &all);
    let docs = all["accounts"].as_array().unwrap();
    assert_eq!(docs.len(), 3, "{all}");
    for d in docs {
        assert_eq!(d["ok"], true, "{d}");
        assert_eq!(d["result"]["identity_ok"], true, "{d}");
    }
    let table = ok(org.cli().args(["--account", "all", "identity", "status"]));
    assert!(
        table.contains("ACCOUNT") && table.contains("alice") && table.contains("carol"),
        "{table}"
    );
    // A list of accounts.
    let two = org.json(&["--account", "alice,carol", "identity", "status"]);
    assert_eq!(two["accounts"].as_array().unwrap().len(), 2);
    // No backups yet: a problem for each (exit 3), reported per account.
    let out = exits(3, org.cli().args(["--account", "all", "backup", "status"]));
    assert_eq!(out.matches("no backup").count(), 3, "{out}");
    ok(org.cli().args(["--account", "alice", "backup", "create"]));
    let all = org.json(&["--account", "all", "backup", "status"]);
    common::json_doc::check_all_accounts("backup status", &all);
    let alice = all["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "alice")
        .unwrap();
    assert_eq!(alice["ok"], true, "{all}");
    assert_eq!(alice["result"]["public_key_is_token_key"], true);
    // watch --once for all: no alarm for anyone.
    let (code, out, err) = run(org.cli().args(["--account", "all", "watch", "--once"]));
    assert!(code == 0 || code == 13, "{code} {out} {err}");

    // An unknown account is an error naming the ones there are.
    let err = fails(org.cli().args(["--account", "dave", "identity", "status"]));
    assert!(
        err.contains("no account dave") && err.contains("alice"),
        "{err}"
    );
    // Logging one account out leaves the others.
    ok(org.cli().args(["--account", "bob", "logout"]));
    let list = org.json(&["account", "list"]);
    let logged: Vec<&str> = list["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["logged_in"] == true)
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(logged, ["alice", "carol"]);
    // `all` reports bob's account as not logged in, and the others as before.
    let (code, out, _) = run(org
        .cli()
        .args(["--json", "--account", "all", "identity", "status"]));
    assert_eq!(code, 1, "{out}");
    let all: Value = serde_json::from_str(&out).unwrap();
    let bob = all["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "bob")
        .unwrap();
    assert_eq!(bob["error"]["kind"], "not_logged_in", "{bob}");
}

#[test]
fn config_file_errors_name_the_line() {
    let org = Org::new();
    let cases = [
        (
            "[accounts.x]\nuser = \"@x:y\"\ncolour = \"red\"\n",
            "line 3",
        ),
        ("[accounts.x]\nuser = \"x\"\n", "line 2"),
        (
            "[accounts.x]\nuser = \"@x:y\"\ntoken = \"nowhere\"\n",
            "line 3",
        ),
    ];
    for (text, line) in cases {
        std::fs::write(org.config(), text).unwrap();
        let (code, out, err) = run(org.cli().args(["--json", "account", "list"]));
        assert_eq!(code, 1, "{out}");
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["error"]["kind"], "config", "{v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(line) && message.contains("config.toml"),
            "{message} {err}"
        );
    }
    // A named config file that is missing is an error; the default place may be empty.
    let err = fails(
        org.cli()
            .env("MXHSM_CONFIG", org.dir.path().join("none.toml"))
            .args(["account", "list"]),
    );
    assert!(err.contains("none.toml"), "{err}");
    ok(org
        .cli()
        .env_remove("MXHSM_CONFIG")
        .args(["account", "list"]));
    // `account add` writes the file and keeps what is there; twice is refused.
    std::fs::write(org.config(), "# hand-written\n").unwrap();
    let added = org.json(&[
        "account",
        "add",
        "dave",
        "--user",
        "@dave:example.org",
        "--token",
        &org.team.uri,
    ]);
    common::json_doc::check("account add", &added);
    assert_eq!(added["added"], "dave", "{added}");
    let text = std::fs::read_to_string(org.config()).unwrap();
    assert!(
        text.starts_with("# hand-written\n") && text.contains("[accounts.dave]"),
        "{text}"
    );
    let err = fails(
        org.cli()
            .args(["account", "add", "dave", "--user", "@dave:example.org"]),
    );
    assert!(err.contains("already exists"), "{err}");
}

#[test]
fn devices_signed_under_a_policy_with_one_pin() {
    let org = Org::new().with_identities();
    let checker = |u: &TestUser| org.synapse.login(u, &format!("CHECK{}", u.localpart.len()));
    // Devices before the policy's first run: never signed by a max-age rule.
    phone(org.synapse, &org.alice, "BOTOLD");
    let policy = org.dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "# bots sign themselves in within the hour\n[[allow]]\ndevice-id = [\"BOT*\"]\nmax-age = \"1h\"\n",
    )
    .unwrap();
    let first = org.json(&policy_args("alice,bob", &policy));
    common::json_doc::check_all_accounts("sign devices --policy", &first);
    let alice_first = &first["accounts"][0]["result"]["devices"];
    let old = alice_first
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device_id"] == "BOTOLD")
        .unwrap_or_else(|| panic!("{first}"));
    assert_eq!(old["decision"], "needs_human", "{old}");
    assert!(
        old["reason"]
            .as_str()
            .unwrap()
            .contains("before mxhsm's first-seen record"),
        "{old}"
    );

    // New devices: bots of alice and bob, a phone, and a bot with a forged self-signature.
    phone(org.synapse, &org.alice, "BOTA1");
    phone(org.synapse, &org.alice, "PHONE");
    phone_signed_by(org.synapse, &org.alice, "BOTFAKE", Some(&random_key()));
    phone(org.synapse, &org.bob, "BOTB1");
    // The dry run signs nothing.
    let dry = org.json(&[&policy_args("all", &policy)[..], &["--dry-run"]].concat());
    assert!(dry.to_string().contains("would_sign"), "{dry}");
    // One listing of each token serves all its accounts: no search for anyone's keys.
    let (_, _, err) = run(org
        .cli()
        .args(["-vv", "--json"])
        .args(policy_args("all", &policy))
        .arg("--dry-run"));
    assert!(err.contains("listed the keys of"), "{err}");
    assert!(
        !err.contains("C_FindObjects subject") && !err.contains("C_FindObjects label"),
        "{err}"
    );
    let alice_check = checker(&org.alice);
    assert!(!cross_signed(
        org.synapse,
        &alice_check,
        &org.alice.user_id,
        "BOTA1"
    ));

    // The policy run, with the PIN from a file and OpenSC's pkcs11-spy between mxhsm and
    // the "team" token: one C_Login for the two accounts on it.
    let spy_log = org.dir.path().join("spy.log");
    let pin_file = org.dir.path().join("team.pin");
    std::fs::write(&pin_file, format!("{}\n", common::USER_PIN)).unwrap();
    let spied = format!(
        "pkcs11:token=team?module-path={}",
        common::spy_module().display()
    );
    let config = std::fs::read_to_string(org.config()).unwrap().replace(
        &format!("uri = \"{}\"\n", org.team.uri),
        &format!("uri = \"{spied}\"\npin-file = \"{}\"\n", pin_file.display()),
    );
    std::fs::write(org.config(), config).unwrap();
    let (code, out, err) = run(org
        .cli()
        .env_remove("MXHSM_PIN")
        .env("PKCS11SPY", &org.team.module)
        .env("PKCS11SPY_OUTPUT", &spy_log)
        .arg("--json")
        .args(policy_args("all", &policy)));
    assert_eq!(code, 3, "devices wait for a human: {out}\n{err}");
    let calls = std::fs::read_to_string(&spy_log).unwrap();
    assert_eq!(
        calls.matches("C_Login").count(),
        1,
        "one login (one PIN) for both accounts on the token"
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    let decisions = |name: &str| -> Vec<(String, String)> {
        v["accounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == name)
            .unwrap()["result"]["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                (
                    d["device_id"].as_str().unwrap().to_string(),
                    d["decision"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let alice = decisions("alice");
    for (device, decision) in [
        ("BOTA1", "signed"),
        ("BOTOLD", "needs_human"),
        ("PHONE", "needs_human"),
        ("BOTFAKE", "refused"),
    ] {
        assert!(
            alice.contains(&(device.to_string(), decision.to_string())),
            "{device} {decision}: {alice:?}"
        );
    }
    assert!(decisions("bob").contains(&("BOTB1".into(), "signed".into())));
    // From Synapse's own data: exactly the allowed devices carry the SSK's signature.
    assert!(cross_signed(
        org.synapse,
        &alice_check,
        &org.alice.user_id,
        "BOTA1"
    ));
    for d in ["BOTOLD", "PHONE", "BOTFAKE"] {
        assert!(
            !cross_signed(org.synapse, &alice_check, &org.alice.user_id, d),
            "{d} must not be signed"
        );
    }
    let bob_check = checker(&org.bob);
    assert!(cross_signed(
        org.synapse,
        &bob_check,
        &org.bob.user_id,
        "BOTB1"
    ));
    // The human summary lists what waits for a human.
    let (_, out, err) = run(org.cli().args(policy_args("alice", &policy)));
    assert!(
        err.contains("PHONE") && err.contains("for a human") && err.contains("BOTFAKE"),
        "{err}"
    );
    assert!(out.contains("FOR A HUMAN"), "{out}");

    // A bad policy is refused before anything is touched.
    std::fs::write(&policy, "[[allow]]\nmax-age = \"soon\"\n").unwrap();
    let err = fails(org.cli().args(policy_args("all", &policy)));
    assert!(
        err.contains("line 2") && err.contains("not a duration"),
        "{err}"
    );
}

#[test]
fn a_hostile_server_swapping_a_device_key_gets_no_signature() {
    let org = Org::new().with_identities();
    let policy = org.dir.path().join("policy.toml");
    std::fs::write(&policy, "[[allow]]\ndevice-id = [\"BOT*\"]\n").unwrap();
    // The baseline run, then a new bot whose key the server swaps for its own in every
    // answer (keeping the device's signature, which then does not verify).
    ok(org.cli().args(policy_args("alice", &policy)));
    phone(org.synapse, &org.alice, "BOTSWAP");
    let attacker = B64.encode(random_key().verifying_key().to_bytes());
    let evil = attacker.clone();
    let proxy = Proxy::start(
        &org.synapse.url,
        std::sync::Arc::new(move |path: &str, _status: &mut u16, body: &mut Value| {
            if path.starts_with("/keys/query")
                && let Some(keys) = body.pointer_mut("/device_keys")
            {
                for devices in keys
                    .as_object_mut()
                    .into_iter()
                    .flat_map(|u| u.values_mut())
                {
                    if let Some(d) = devices.get_mut("BOTSWAP") {
                        d["keys"]["ed25519:BOTSWAP"] = json!(evil);
                    }
                }
            }
        }),
    );
    // mxhsm's session now talks to the proxy.
    let sessions = mxhsm::homeserver::Sessions::at(org.dir.path().join("data/mxhsm/sessions"));
    let path = sessions.path_for(&org.alice.user_id);
    let mut s: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    s["homeserver"] = json!(proxy.url);
    std::fs::write(&path, s.to_string()).unwrap();
    let v = org.json(&policy_args("alice", &policy));
    let d = v["accounts"][0]["result"]["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device_id"] == "BOTSWAP")
        .cloned()
        .unwrap_or_else(|| panic!("{v}"));
    assert_eq!(d["decision"], "refused", "{d}");
    // Synapse: the real device is not signed, and nothing names the attacker's key.
    let checker = org.synapse.login(&org.alice, "CHECKER");
    assert!(!cross_signed(
        org.synapse,
        &checker,
        &org.alice.user_id,
        "BOTSWAP"
    ));
    let stored = stored_device(org.synapse, &checker, &org.alice.user_id, "BOTSWAP");
    assert!(!stored.to_string().contains(&attacker));
    let ssk = published_ssk(org.synapse, &checker, &org.alice.user_id);
    assert!(
        stored["signatures"][&org.alice.user_id]
            .get(format!("ed25519:{ssk}"))
            .is_none()
    );
}
