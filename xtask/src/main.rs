//! `cargo xtask test | demo | bench`: every set-up step mxhsm's tests and demo need, one
//! command each, from a fresh Debian 12 machine.
//!
//! * system packages from apt (installed when run as root; otherwise the exact command is
//!   printed and we stop);
//! * the Kryoptic PKCS#11 module, built from crates.io (hsm-config/kryoptic) into a cache
//!   outside the clone (`~/.cache/mxhsm-dev`, or `$MXHSM_CACHE_DIR`), keyed by version, then
//!   copied to `target/hsm/`;
//! * then fmt, clippy and the test suite with the test tokens' locations in the environment.

mod demo;
mod e2e;
mod fuzz;
mod peer;
mod piv;
mod synapse;
mod tokens;

use std::env;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

type Result<T = ()> = std::result::Result<T, String>;

/// Debian packages the tests and the demo need.
/// - softhsm2: the SoftHSM 2.6.1 test token (and softhsm2-util);
/// - opensc, opensc-pkcs11: pkcs11-tool (initialises Kryoptic tokens) and pkcs11-spy (counts
///   PKCS#11 calls in the wrong-PIN test);
/// - libclang-dev: bindgen in kryoptic-lib's build; perl, make: the vendored OpenSSL build.
pub const APT_PACKAGES: &[&str] = &[
    "softhsm2",
    "opensc",
    "opensc-pkcs11",
    "libclang-dev",
    "pkg-config",
    "perl",
    "make",
    "gcc",
    "python3",
    "python3-venv",
    // The PC/SC stack: libpcsclite to build mxhsm's YubiKey backend; pcscd and vpcd for
    // the virtual YubiKey the tests use.
    "pcscd",
    "vsmartcard-vpcd",
    "libpcsclite-dev",
    // GNU time: the peak memory of a command (the bounded-answer test, restore-memory);
    // openssl: the private CA of the TLS test.
    "time",
    "openssl",
    // Graphviz lays out `mxhsm graph` (its PNG needs a font); tmux is the real terminal
    // the tree's 80-column test captures.
    "graphviz",
    "fonts-liberation2",
    "tmux",
];

pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
pub const SPY_MODULE: &str = "/usr/lib/x86_64-linux-gnu/pkcs11-spy.so";
const KRYOPTIC_VERSION: &str = "1.5.4";

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(&args[1..]),
        Some("demo") => demo(),
        Some("bench") => bench(&args[1..]),
        Some("restore-memory") => restore_memory(&args[1..]),
        Some("piv-check") => piv::check(&cache_dir(), &target_dir()),
        Some("fuzz") => fuzz::fuzz(&args[1..]),
        Some("setup") => setup().map(|_| ()),
        _ => Err(
            "usage: cargo xtask <test [-- cargo test args] | demo | bench [--scale [--users N] [--token softhsm|kryoptic|kryoptic-indexed] | --accounts N [--devices M] | --e2e [--sessions N]… [--token softhsm|kryoptic]] | restore-memory [--sessions N] | piv-check | fuzz [--seconds N] [TARGET…] | setup>"
                .into(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

pub fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

pub fn cache_dir() -> PathBuf {
    if let Some(d) = env::var_os("MXHSM_CACHE_DIR") {
        return PathBuf::from(d);
    }
    let home = env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".cache").join("mxhsm-dev")
}

/// Runs a command, failing with its name if it does not succeed.
pub fn run(cmd: &mut Command) -> Result {
    eprintln!("+ {}", show(cmd));
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {}: {e}", show(cmd)))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{} failed ({status})", show(cmd)))
    }
}

/// `dir`, emptied.
fn fresh_dir(dir: &Path) -> Result<PathBuf> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir.to_path_buf())
}

fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

pub fn cargo() -> Command {
    let mut c = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    c
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Installs the missing apt packages (as root), or says exactly what to run.
pub fn ensure_packages(packages: &[&str]) -> Result {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let install = format!(
        "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends {}",
        missing.join(" ")
    );
    if !is_root() {
        return Err(format!(
            "missing packages {}; run as root:\n  {install}",
            missing.join(", ")
        ));
    }
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Builds the Kryoptic module (cached outside the clone) and copies it to target/hsm/.
fn build_kryoptic() -> Result<PathBuf> {
    let build_dir = cache_dir().join(format!("kryoptic-{KRYOPTIC_VERSION}"));
    run(cargo()
        .args(["build", "--release", "--locked", "--manifest-path"])
        .arg(root().join("hsm-config/kryoptic/Cargo.toml"))
        .arg("--target-dir")
        .arg(&build_dir)
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS"))?;
    let built = build_dir.join("release/libkryoptic_mxhsm.so");
    let dest_dir = target_dir().join("hsm");
    std::fs::create_dir_all(&dest_dir).map_err(|e| format!("{}: {e}", dest_dir.display()))?;
    let dest = dest_dir.join("libkryoptic.so");
    // Copy to a temporary name and rename, so a running test never sees half a module.
    let tmp = dest_dir.join("libkryoptic.so.tmp");
    std::fs::copy(&built, &tmp).map_err(|e| format!("copy {}: {e}", built.display()))?;
    std::fs::rename(&tmp, &dest).map_err(|e| format!("{}: {e}", dest.display()))?;
    Ok(dest)
}

/// Everything the tests need, installed and built. Returns the environment for them.
fn setup() -> Result<Vec<(&'static str, PathBuf)>> {
    ensure_packages(APT_PACKAGES)?;
    let kryoptic = build_kryoptic()?;
    for m in [SOFTHSM_MODULE, SPY_MODULE] {
        if !Path::new(m).exists() {
            return Err(format!("{m} is missing although its package is installed"));
        }
    }
    let python = synapse::ensure_venv(&cache_dir())?;
    let card = piv::build(&cache_dir(), false)?.join("mxhsm-piv-card");
    piv::ensure_pcscd()?;
    let sdk_peer = peer::build(&cache_dir())?;
    Ok(vec![
        ("MXHSM_TEST_PIV_CARD", card),
        ("MXHSM_TEST_SDK_PEER", sdk_peer),
        ("MXHSM_TEST_SYNAPSE_PYTHON", python),
        ("MXHSM_TEST_SOFTHSM_MODULE", PathBuf::from(SOFTHSM_MODULE)),
        ("MXHSM_TEST_KRYOPTIC_MODULE", kryoptic),
        ("MXHSM_TEST_SPY_MODULE", PathBuf::from(SPY_MODULE)),
    ])
}

fn test(extra: &[String]) -> Result {
    let envs = setup()?;
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    let extra_is_empty = extra.is_empty();
    let extra = extra.iter().skip_while(|a| *a == "--");
    let mut cmd = cargo();
    cmd.args(["test", "--workspace"]);
    let (cargo_args, test_args): (Vec<_>, Vec<_>) = {
        let all: Vec<&String> = extra.collect();
        match all.iter().position(|a| *a == "--") {
            Some(i) => (all[..i].to_vec(), all[i + 1..].to_vec()),
            None => (all, Vec::new()),
        }
    };
    cmd.args(cargo_args);
    if !test_args.is_empty() {
        cmd.arg("--").args(test_args);
    }
    for (k, v) in &envs {
        cmd.env(k, v);
    }
    run(&mut cmd)?;
    // The library builds alone (no clap, no PC/SC), and the command without the YubiKey
    // backend. (Their own target directory: other RUSTFLAGS would invalidate the main build.)
    run(cargo()
        .args(["build", "--lib", "--no-default-features", "--target-dir"])
        .arg(target_dir().join("no-default-features"))
        .env("RUSTFLAGS", "-D warnings"))?;
    run(cargo()
        .args([
            "build",
            "--no-default-features",
            "--features",
            "cli",
            "--target-dir",
        ])
        .arg(target_dir().join("no-default-features"))
        .env("RUSTFLAGS", "-D warnings"))?;
    // A short run of every fuzz target: one that stops building, or finds something at
    // once, fails the suite. Long runs: `cargo xtask fuzz --seconds 600`.
    if extra_is_empty {
        let smoke = fuzz::run_targets(
            &fuzz::TARGETS
                .iter()
                .map(|t| t.to_string())
                .collect::<Vec<_>>(),
            3,
        )?;
        for o in smoke {
            println!("fuzz smoke: {} ran {} inputs", o.target, o.runs);
        }
    }
    // A real YubiKey, only when the developer names one (docs/yubikey.md).
    if std::env::var_os("MXHSM_YUBIKEY_SERIAL").is_some() {
        run(cargo().args([
            "test",
            "--test",
            "yubikey",
            "--",
            "--ignored",
            "--exact",
            "real_yubikey",
        ]))?;
    } else {
        println!(
            "(no MXHSM_YUBIKEY_SERIAL: the real-YubiKey test did not run; see docs/yubikey.md)"
        );
    }
    Ok(())
}

fn build_mxhsm(release: bool) -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args(["build", "--bin", "mxhsm"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    Ok(target_dir()
        .join(if release { "release" } else { "debug" })
        .join("mxhsm"))
}

fn mxhsm_cmd<I, S>(bin: &Path, token: &tokens::Token, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut c = Command::new(bin);
    c.args(args);
    token.apply_env(&mut c);
    c
}

/// The whole flow: a local Synapse and a fresh SoftHSM token; Alice's identity created on
/// the token and published; a second device of hers (a vodozemac account playing a phone)
/// cross-signed; Bob (whose keys live on the same token, as in an organisation's HSM)
/// verified by Alice; `identity status` printed.
fn demo() -> Result {
    ensure_packages(APT_PACKAGES)?;
    let python = synapse::ensure_venv(&cache_dir())?;
    let bin = build_mxhsm(false)?;
    let dir = fresh_dir(&target_dir().join("demo"))?;
    let server = synapse::Server::start(&python, &dir.join("synapse"))?;
    eprintln!("\n== Synapse {} on {} ==", synapse::VERSION, server.url);
    let token = tokens::Token::softhsm(&dir.join("token"), "mxhsm-demo")?;
    let hs = &server.url;
    let alice = demo::register(hs, "alice")?;
    let bob = demo::register(hs, "bob")?;
    let as_user = |user: &demo::User, args: &[&str]| {
        let mut c = mxhsm_cmd(&bin, &token, args);
        c.env(
            "XDG_DATA_HOME",
            dir.join(format!("{}-data", user.localpart)),
        )
        .env("MXHSM_PASSWORD", &user.password);
        c
    };

    eprintln!("\n== The token ==");
    run(&mut mxhsm_cmd(
        &bin,
        &token,
        ["token", "list", "--module", SOFTHSM_MODULE],
    ))?;
    for user in [&alice, &bob] {
        eprintln!(
            "\n== {}: log in (a real device), create the identity on the token, publish ==",
            user.user_id
        );
        run(&mut as_user(
            user,
            &["login", "--homeserver", hs, "--user", &user.localpart],
        ))?;
        run(&mut as_user(user, &["identity", "create"]))?;
    }
    eprintln!("\n== Alice's phone (a vodozemac Olm account) logs in and uploads its keys ==");
    let phone = demo::phone(hs, &alice, "PHONE")?;
    run(&mut as_user(&alice, &["identity", "status"]))?;
    eprintln!("\n== Alice cross-signs her phone with the self-signing key on the token ==");
    run(&mut as_user(&alice, &["sign", "device", "PHONE", "--yes"]))?;
    eprintln!(
        "\n== Alice verifies Bob: his master-key fingerprint, signed with her user-signing key =="
    );
    let bob_master = demo::master_key(hs, &alice, &bob.user_id)?;
    run(&mut as_user(
        &alice,
        &["sign", "user", &bob.user_id, "--fingerprint", &bob_master],
    ))?;
    eprintln!("\n== identity status ==");
    run(&mut as_user(
        &alice,
        &["identity", "status", "--user", &bob.user_id],
    ))?;
    eprintln!(
        "\n== Alice's key backup: created with the backup key on the token, signed by her master key =="
    );
    let created = as_user(&alice, &["--json", "backup", "create"])
        .output()
        .map_err(|e| e.to_string())?;
    let created: serde_json::Value =
        serde_json::from_slice(&created.stdout).map_err(|e| format!("backup create: {e}"))?;
    let (version, public) = (
        created["backup_version"]
            .as_str()
            .ok_or("no backup version")?,
        created["public_key"].as_str().ok_or("no backup key")?,
    );
    eprintln!("{version}, encrypted to {public}");
    eprintln!("\n== Her phone backs up 20 room keys; mxhsm restores them with the token ==");
    demo::fill_backup(hs, &phone, version, public, 20)?;
    let keys = dir.join("alice-room-keys.json");
    run(as_user(&alice, &["backup", "restore", "--format", "json", "--out"]).arg(&keys))?;
    eprintln!("\n== The keys on the token, and the doctor's audit ==");
    run(&mut mxhsm_cmd(&bin, &token, ["keys", "list"]))?;
    run(&mut mxhsm_cmd(&bin, &token, ["token", "doctor"]))?;
    eprintln!("\n== Where are Alice's keys: the tree, and the diagram ==");
    run(&mut as_user(
        &alice,
        &["identity", "status", "--tree", "--user", &bob.user_id],
    ))?;
    let svg = dir.join("alice-keys.svg");
    run(as_user(&alice, &["graph", "--out"]).arg(&svg))?;
    run(as_user(&alice, &["graph", "--format", "png", "--out"]).arg(svg.with_extension("png")))?;
    eprintln!(
        "\nDone. The token stays in {} (PIN in {}), the restored room keys in {}, the diagram in {} (and .png); Synapse stops now.",
        dir.join("token").display(),
        token.pin_file.display(),
        keys.display(),
        svg.display()
    );
    drop(server);
    Ok(())
}

/// Token vs software rates for Ed25519 and X25519 on SoftHSM and Kryoptic, and key-backup
/// restore throughput against each token's raw agreement rate, in one run
/// (`cargo xtask bench [--seconds S] [--restore-sessions N]`); with `--scale [--users N]`,
/// how key lookups grow with the number of users a token holds; with `--e2e [--sessions
/// N]…`, a restore end to end against a local Synapse (see `e2e`).
fn bench(args: &[String]) -> Result {
    let envs = setup()?;
    let kryoptic = envs
        .iter()
        .find(|(k, _)| *k == "MXHSM_TEST_KRYOPTIC_MODULE")
        .map(|(_, v)| v.clone())
        .ok_or("no Kryoptic module")?;
    let arg = |name: &str, default: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .unwrap_or_else(|| default.into())
    };
    let seconds = arg("--seconds", "3");
    let sessions = arg("--restore-sessions", "10000");
    let overhead = arg("--overhead", "20000");
    let bin = build_mxhsm(true)?;
    let dir = target_dir().join("bench");
    let softhsm = tokens::Token::softhsm(&dir.join("softhsm"), "bench-softhsm")?;
    let kry = tokens::Token::kryoptic(&dir.join("kryoptic"), "bench-kryoptic", &kryoptic)?;
    // `--accounts N [--devices M]`: many accounts against a local Synapse.
    if args.iter().any(|a| a == "--accounts") {
        let accounts: usize = arg("--accounts", "100")
            .parse()
            .map_err(|_| "--accounts N")?;
        let devices: usize = arg("--devices", "1000")
            .parse()
            .map_err(|_| "--devices M")?;
        return bench_accounts(&bin, &softhsm, accounts, devices);
    }
    // `--e2e [--sessions N]…`: where a restore's time goes, against a local Synapse.
    if args.iter().any(|a| a == "--e2e") {
        let mut sizes = Vec::new();
        for (i, a) in args.iter().enumerate() {
            if a == "--sessions" {
                let n: usize = args
                    .get(i + 1)
                    .and_then(|n| n.parse().ok())
                    .filter(|n| *n >= 100)
                    .ok_or("--sessions N, at least 100")?;
                sizes.push(n);
            }
        }
        if sizes.is_empty() {
            sizes = vec![10_000, 100_000];
        }
        sizes.sort_unstable();
        sizes.dedup();
        ensure_packages(&["time"])?;
        let python = synapse::ensure_venv(&cache_dir())?;
        let dir = fresh_dir(&target_dir().join("bench-e2e"))?;
        // `--token softhsm|kryoptic`: one of them only.
        let only = args
            .iter()
            .position(|a| a == "--token")
            .map(|i| args.get(i + 1).cloned().ok_or("--token softhsm|kryoptic"))
            .transpose()?;
        let all = [("softhsm", &softhsm), ("kryoptic", &kry)];
        let chosen: Vec<_> = all
            .into_iter()
            .filter(|(name, _)| only.as_deref().is_none_or(|o| o == *name))
            .collect();
        if chosen.is_empty() {
            return Err("--token softhsm|kryoptic".into());
        }
        return e2e::bench_e2e(&bin, &python, &dir, &chosen, &sizes);
    }
    // `--scale [--users N]`: key lookups against the number of users on each token.
    if args.iter().any(|a| a == "--scale") {
        let users = arg("--users", "1000");
        let only = arg("--token", "");
        let indexed = tokens::Token::kryoptic(
            &dir.join("kryoptic-indexed"),
            "bench-kryoptic-indexed",
            &kryoptic,
        )?;
        indexed.index_kryoptic()?;
        let all = [
            ("softhsm", &softhsm),
            ("kryoptic", &kry),
            ("kryoptic-indexed", &indexed),
        ];
        if !only.is_empty() && !all.iter().any(|(name, _)| *name == only) {
            return Err("--token softhsm|kryoptic|kryoptic-indexed".into());
        }
        for (_, t) in all
            .into_iter()
            .filter(|(name, _)| only.is_empty() || *name == only)
        {
            run(&mut mxhsm_cmd(
                &bin,
                t,
                ["token", "bench", "--scale-users", &users, "--scale-keep"],
            ))?;
        }
        return Ok(());
    }
    for t in [&softhsm, &kry] {
        run(&mut mxhsm_cmd(
            &bin,
            t,
            [
                "token",
                "bench",
                "--seconds",
                &seconds,
                "--restore-sessions",
                &sessions,
                "--overhead",
                &overhead,
            ],
        ))?;
    }
    Ok(())
}

/// `cargo xtask bench --accounts N --devices M`: N accounts on one SoftHSM token in a local
/// Synapse, each logged in with its identity on the token; `account list`; then M new
/// devices spread over the accounts, signed by one `--account all sign devices --policy`.
/// The same bulk command with no device to sign is measured first, in the same run, as the
/// baseline of what the accounts cost by themselves.
fn bench_accounts(bin: &Path, token: &tokens::Token, accounts: usize, devices: usize) -> Result {
    let python = synapse::ensure_venv(&cache_dir())?;
    let dir = fresh_dir(&target_dir().join("bench-accounts"))?;
    let server = synapse::Server::start(&python, &dir.join("synapse"))?;
    let mut users = Vec::new();
    let mut config = String::new();
    for i in 0..accounts {
        let u = demo::register(&server.url, &format!("staff{i}"))?;
        config.push_str(&format!(
            "[accounts.a{i}]\nuser = \"{}\"\nhomeserver = \"{}\"\n\n",
            u.user_id, server.url
        ));
        users.push(u);
    }
    let config_path = dir.join("config.toml");
    std::fs::write(&config_path, &config).map_err(|e| e.to_string())?;
    let policy = dir.join("policy.toml");
    std::fs::write(
        &policy,
        "[[allow]]\ndevice-id = [\"BOT*\"]\nmax-age = \"1h\"\n",
    )
    .map_err(|e| e.to_string())?;
    let cmd = |args: &[&str]| {
        let mut c = mxhsm_cmd(bin, token, args);
        c.env("XDG_DATA_HOME", dir.join("data"))
            .env("MXHSM_CONFIG", &config_path)
            .env("MXHSM_AUDIT_LOG", dir.join("audit.jsonl"))
            .stdout(std::process::Stdio::null());
        c
    };
    let timed = |what: &str, c: &mut Command, ok_codes: &[i32]| -> Result<f64> {
        let t = Instant::now();
        let status = c.status().map_err(|e| e.to_string())?;
        let secs = t.elapsed().as_secs_f64();
        if !ok_codes.contains(&status.code().unwrap_or(-1)) {
            return Err(format!("{what} failed: {status}"));
        }
        Ok(secs)
    };
    let start = Instant::now();
    for (i, u) in users.iter().enumerate() {
        let name = format!("a{i}");
        let mut login = cmd(&["--account", &name, "login"]);
        login.env("MXHSM_PASSWORD", &u.password);
        timed("login", &mut login, &[0])?;
        timed(
            "identity create",
            &mut cmd(&["--account", &name, "identity", "create"]),
            &[0],
        )?;
    }
    let setup = start.elapsed().as_secs_f64();
    let list = timed("account list", &mut cmd(&["account", "list"]), &[0])?;
    let policy_arg = policy.to_str().ok_or("path")?;
    let bulk = [
        "--account",
        "all",
        "sign",
        "devices",
        "--policy",
        policy_arg,
    ];
    // The baseline: every account's flow with nothing new to sign (this run also starts
    // each account's first-seen record).
    let empty = timed("sign devices (nothing to sign)", &mut cmd(&bulk), &[0, 3])?;
    for d in 0..devices {
        let u = &users[d % accounts];
        demo::phone(&server.url, u, &format!("BOT{d}"))?;
    }
    let t = Instant::now();
    let out = cmd(&bulk)
        .arg("--json")
        .stdout(std::process::Stdio::piped())
        .output()
        .map_err(|e| e.to_string())?;
    let signed = t.elapsed().as_secs_f64();
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("sign devices --json: {e}"))?;
    let count = report["accounts"]
        .as_array()
        .ok_or("no accounts in the report")?
        .iter()
        .flat_map(|a| {
            a["result"]["devices"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter(|d| d["decision"] == "signed")
        .count();
    if count != devices {
        return Err(format!(
            "{count} of {devices} devices were signed: {report}"
        ));
    }
    let verify = timed("audit verify", &mut cmd(&["audit", "verify"]), &[0])?;
    println!("\n{accounts} accounts on one SoftHSM token, {devices} devices, one local Synapse");
    println!(
        "  login + identity create, all accounts   {setup:8.1} s ({:.2} s per account)",
        setup / accounts as f64
    );
    println!("  account list                              {list:8.2} s");
    println!("  sign devices --policy, nothing to sign    {empty:8.2} s (the baseline)");
    println!(
        "  sign devices --policy, {devices} devices   {signed:8.2} s ({:.0} devices/s; {:.2}x the baseline)",
        devices as f64 / (signed - empty).max(0.001),
        signed / empty
    );
    println!("  audit verify                              {verify:8.2} s");
    drop(server);
    Ok(())
}

/// Peak memory of `mxhsm backup restore` for a large backup (default 100,000 sessions) on
/// a Kryoptic token against a local Synapse, measured with GNU time.
fn restore_memory(args: &[String]) -> Result {
    let sessions: usize = args
        .iter()
        .position(|a| a == "--sessions")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(100_000);
    let envs = setup()?;
    ensure_packages(&["time"])?;
    let kryoptic = envs
        .iter()
        .find(|(k, _)| *k == "MXHSM_TEST_KRYOPTIC_MODULE")
        .map(|(_, v)| v.clone())
        .ok_or("no Kryoptic module")?;
    let python = synapse::ensure_venv(&cache_dir())?;
    let bin = build_mxhsm(true)?;
    let dir = fresh_dir(&target_dir().join("restore-memory"))?;
    let server = synapse::Server::start(&python, &dir.join("synapse"))?;
    let token = tokens::Token::kryoptic(&dir.join("token"), "restore-memory", &kryoptic)?;
    let user = demo::register(&server.url, "memory")?;
    let cmd = |args: &[&str]| {
        let mut c = mxhsm_cmd(&bin, &token, args);
        c.env("XDG_DATA_HOME", dir.join("data"))
            .env("MXHSM_PASSWORD", &user.password);
        c
    };
    let (version, public, access) = demo::account_with_backup(&server.url, &user, cmd)?;
    demo::fill_backup(&server.url, &access, &version, &public, sessions)?;
    let mut restore = Command::new("/usr/bin/time");
    restore
        .arg("-v")
        .arg(&bin)
        .args(["backup", "restore", "--format", "json", "--out"]);
    restore.arg(dir.join("keys.json"));
    token.apply_env(&mut restore);
    restore
        .env("XDG_DATA_HOME", dir.join("data"))
        .stderr(std::process::Stdio::piped());
    let output = restore.output().map_err(|e| e.to_string())?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    print!("{}", String::from_utf8_lossy(&output.stdout));
    for line in stderr
        .lines()
        .filter(|l| l.contains("Maximum resident set size") || l.contains("Elapsed (wall clock)"))
    {
        println!("{}", line.trim());
    }
    if !output.status.success() {
        return Err(format!("restore failed:\n{stderr}"));
    }
    drop(server);
    Ok(())
}
