//! `mxhsm token list | doctor | bench`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Subcommand;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use mxhsm::config;
use mxhsm::token::pkcs11::{self, TokenEntry};
use mxhsm::token::{KeyAlgorithm, KeyInfo, KeyStore};
use serde_json::json;
use x25519_dalek::{PublicKey as XPublic, StaticSecret};

use mxhsm::token::Store;

use super::output::{self, note, say};
use super::{GlobalArgs, open_store};

/// Modules `token list` looks for when none is named.
const WELL_KNOWN_MODULES: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/libykcs11.so",
    "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so",
];

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// List PKCS#11 modules, their slots and tokens, and what each token can do; and the
    /// YubiKeys PC/SC can reach.
    List {
        /// A module to look in (repeatable). Default: the module of --token/$MXHSM_TOKEN,
        /// $MXHSM_PKCS11_MODULE and the usual install paths.
        #[arg(long, value_name = "PATH")]
        module: Vec<PathBuf>,
    },
    /// Self-test the token with temporary keys, and audit every mxhsm key on it.
    Doctor,
    /// Measure Ed25519 signatures and X25519 agreements per second on the token, against
    /// ed25519-dalek / x25519-dalek in software in the same run.
    Bench {
        /// Seconds to measure each operation.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Also measure key-backup restore: this many sessions decrypted through the token
        /// (1 to N parallel sessions) against the token's raw agreement rate and vodozemac
        /// `PkDecryption` in software. 0 skips it.
        #[arg(long, default_value_t = 0)]
        restore_sessions: usize,
    },
}

pub fn run(global: &GlobalArgs, cmd: TokenCommand) -> Result<ExitCode> {
    match cmd {
        TokenCommand::List { module } => list(global, module),
        TokenCommand::Doctor => doctor(global),
        TokenCommand::Bench {
            seconds,
            restore_sessions,
        } => bench(global, seconds, restore_sessions),
    }
}

fn list(global: &GlobalArgs, modules: Vec<PathBuf>) -> Result<ExitCode> {
    let explicit = !modules.is_empty();
    let modules = if modules.is_empty() {
        default_modules(global)
    } else {
        modules
    };
    // YubiKeys too, unless modules were named.
    let yubikeys = (!explicit).then(list_yubikeys);
    if modules.is_empty() && !matches!(&yubikeys, Some(Ok(y)) if !y.is_empty()) {
        bail!(
            "no PKCS#11 module and no YubiKey found; name a module with --module PATH or set {}",
            pkcs11::MODULE_ENV
        );
    }
    let mut found: Vec<(PathBuf, Result<Vec<TokenEntry>, String>)> = Vec::new();
    for m in modules {
        let r = pkcs11::list_tokens(&m).map_err(|e| e.to_string());
        found.push((m, r));
    }
    if global.json {
        let v: Vec<_> = found
            .iter()
            .map(|(m, r)| match r {
                Ok(tokens) => json!({
                    "module": m.display().to_string(),
                    "tokens": tokens.iter().map(token_json).collect::<Vec<_>>(),
                }),
                Err(e) => json!({"module": m.display().to_string(), "error": e}),
            })
            .chain(yubikeys.iter().map(|r| match r {
                Ok(keys) => json!({"yubikeys": keys.iter().map(|y| json!({
                    "serial": y.serial,
                    "firmware": y.firmware,
                    "reader": y.reader,
                    "supported": y.supported,
                })).collect::<Vec<_>>()}),
                Err(e) => json!({"yubikeys": [], "error": e.to_string()}),
            }))
            .collect();
        output::json(&json!(v));
    } else {
        let mut rows = Vec::new();
        for (m, r) in &found {
            match r {
                Ok(tokens) if tokens.is_empty() => {
                    rows.push(vec![
                        m.display().to_string(),
                        "-".into(),
                        "(no token)".into(),
                        "".into(),
                        "".into(),
                        "".into(),
                        "".into(),
                    ]);
                }
                Ok(tokens) => {
                    for t in tokens {
                        rows.push(vec![
                            m.display().to_string(),
                            t.slot_id.to_string(),
                            t.summary.label.clone(),
                            t.summary.serial.clone(),
                            format!("{} {}", t.summary.manufacturer, t.summary.model),
                            t.capabilities
                                .as_ref()
                                .map(|c| c.summary())
                                .unwrap_or_else(|| "(not initialised)".into()),
                            t.pin_status.describe().unwrap_or_else(|| "ok".into()),
                        ]);
                    }
                }
                Err(e) => rows.push(vec![
                    m.display().to_string(),
                    "-".into(),
                    format!("error: {e}"),
                    "".into(),
                    "".into(),
                    "".into(),
                    "".into(),
                ]),
            }
        }
        output::table(
            &[
                "MODULE",
                "SLOT",
                "TOKEN",
                "SERIAL",
                "MAKE",
                "CAPABILITIES",
                "PIN",
            ],
            &rows,
        );
        let usable: Vec<&TokenEntry> = found
            .iter()
            .filter_map(|(_, r)| r.as_ref().ok())
            .flatten()
            .filter(|t| t.capabilities.is_some())
            .collect();
        if !usable.is_empty() {
            say!("\nuse a token with --token '<URI>' or MXHSM_TOKEN:");
            for t in usable {
                say!("  {}", t.uri);
            }
        }
        match &yubikeys {
            Some(Ok(keys)) if !keys.is_empty() => {
                say!("");
                let rows: Vec<Vec<String>> = keys
                    .iter()
                    .map(|y| {
                        vec![
                            y.serial.to_string(),
                            y.firmware.clone(),
                            y.reader.clone(),
                            if y.supported {
                                "ed25519, x25519 (piv), import".into()
                            } else {
                                "none usable by mxhsm (PIV Ed25519/X25519 need firmware 5.7)".into()
                            },
                        ]
                    })
                    .collect();
                output::table(&["YUBIKEY", "FIRMWARE", "READER", "CAPABILITIES"], &rows);
                say!("\nuse a YubiKey with --yubikey SERIAL or MXHSM_YUBIKEY");
            }
            Some(Err(e)) => say!("\nYubiKeys: {e}"),
            _ => {}
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(feature = "yubikey")]
use mxhsm::token::yubikey::list_yubikeys;

/// A YubiKey as `token list` shows it.
#[cfg(not(feature = "yubikey"))]
struct YubiKeyEntry {
    serial: u32,
    firmware: String,
    reader: String,
    supported: bool,
}

/// Without the `yubikey` feature this mxhsm has no PC/SC, so it sees no YubiKey.
#[cfg(not(feature = "yubikey"))]
fn list_yubikeys() -> Result<Vec<YubiKeyEntry>, mxhsm::token::TokenError> {
    Ok(Vec::new())
}

fn default_modules(global: &GlobalArgs) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    let mut add = |p: PathBuf| {
        if !out.contains(&p) {
            out.push(p);
        }
    };
    if let Ok(config::TokenChoice::Pkcs11(uri)) =
        config::token_choice(global.token.as_deref(), global.yubikey.as_deref())
        && let Ok(p) = pkcs11::resolve_module_path(&uri)
    {
        add(p);
    }
    if let Some(p) = std::env::var_os(pkcs11::MODULE_ENV) {
        add(PathBuf::from(p));
    }
    for p in WELL_KNOWN_MODULES {
        if Path::new(p).exists() {
            add(PathBuf::from(p));
        }
    }
    out
}

fn token_json(t: &TokenEntry) -> serde_json::Value {
    json!({
        "slot_id": t.slot_id,
        "slot_description": t.slot_description,
        "label": t.summary.label,
        "serial": t.summary.serial,
        "manufacturer": t.summary.manufacturer,
        "model": t.summary.model,
        "initialized": t.capabilities.is_some(),
        "capabilities": t.capabilities.as_ref().map(|c| json!({
            "ed25519": c.ed25519,
            "x25519": c.x25519.map(|m| m.as_str()),
            "import": c.import,
        })),
        "pin": {
            "count_low": t.pin_status.count_low,
            "final_try": t.pin_status.final_try,
            "locked": t.pin_status.locked,
        },
        "uri": t.uri,
    })
}

/// One line of the doctor's report.
struct Check {
    name: String,
    ok: bool,
    detail: String,
}

fn check(name: impl Into<String>, r: Result<String>) -> Check {
    match r {
        Ok(detail) => Check {
            name: name.into(),
            ok: true,
            detail,
        },
        Err(e) => Check {
            name: name.into(),
            ok: false,
            detail: format!("{e:#}"),
        },
    }
}

/// A temporary key that is destroyed when dropped: a PKCS#11 session object, or on a
/// YubiKey a key in a free retired slot (PIN once, no touch) under a placeholder user.
struct SessionKey<'a> {
    store: &'a dyn KeyStore,
    key: KeyInfo,
}

/// The user of a YubiKey's temporary test keys.
#[cfg(feature = "yubikey")]
const TEST_KEY_USER: &str = "@mxhsm-self-test:localhost";

impl<'a> SessionKey<'a> {
    fn new(store: &'a Store, algorithm: KeyAlgorithm) -> Result<Self> {
        let key = match store {
            Store::Pkcs11(s) => s.generate_session_key(algorithm)?,
            #[cfg(feature = "yubikey")]
            Store::YubiKey(s) => {
                let role = match algorithm {
                    KeyAlgorithm::Ed25519 => mxhsm::token::KeyRole::SelfSigning,
                    KeyAlgorithm::X25519 => mxhsm::token::KeyRole::Backup,
                };
                let mut options = mxhsm::token::KeyOptions::default();
                options.pin_policy = Some(mxhsm::token::PinPolicy::Once);
                options.touch_policy = Some(mxhsm::token::TouchPolicy::Never);
                s.generate(TEST_KEY_USER, role, &options)?
            }
        };
        Ok(SessionKey {
            store: &**store,
            key,
        })
    }
}

impl Drop for SessionKey<'_> {
    fn drop(&mut self) {
        let _ = self.store.delete(&self.key);
    }
}

fn doctor(global: &GlobalArgs) -> Result<ExitCode> {
    let store = open_store(global)?;
    store.login()?;
    let caps = store.capabilities().clone();
    let mut checks = vec![Check {
        name: "capabilities".into(),
        ok: caps.ed25519,
        detail: caps.summary(),
    }];
    if caps.ed25519 {
        checks.push(check("ed25519 sign + verify", (|| {
            let k = SessionKey::new(&store, KeyAlgorithm::Ed25519)?;
            let vk = VerifyingKey::from_bytes(&k.key.public_key)?;
            let mut lengths = Vec::new();
            for len in [0usize, 1, 255, 1015, 65536] {
                let msg: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
                let sig = store.sign_ed25519(&k.key, &msg)?;
                vk.verify_strict(&msg, &Signature::from_bytes(&sig))
                    .map_err(|_| anyhow::anyhow!("a {len}-byte message's signature does not verify (ed25519-dalek verify_strict)"))?;
                lengths.push(len.to_string());
            }
            Ok(format!("session key; signatures over {} bytes verify with ed25519-dalek", lengths.join("/")))
        })()));
    }
    if caps.x25519.is_some() {
        checks.push(check(
            "x25519 agreement",
            (|| {
                let k = SessionKey::new(&store, KeyAlgorithm::X25519)?;
                let mut seed = [0u8; 32];
                getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("{e}"))?;
                let peer = StaticSecret::from(seed);
                let on_token = store.x25519(&k.key, XPublic::from(&peer).as_bytes())?;
                let soft = peer.diffie_hellman(&XPublic::from(k.key.public_key));
                if on_token.expose() != soft.as_bytes() {
                    bail!("the token's shared secret differs from x25519-dalek's");
                }
                // A small-order peer key must be refused, not turned into a zero secret.
                match store.x25519(&k.key, &[0u8; 32]) {
                    Err(_) => {}
                    Ok(_) => bail!("an all-zero peer key gave a secret"),
                }
                Ok(format!(
                    "session key ({}); secret equals x25519-dalek's; zero peer key refused",
                    k.key.x25519_mechanism.map(|m| m.as_str()).unwrap_or("?")
                ))
            })(),
        ));
    } else {
        checks.push(Check {
            name: "x25519 agreement".into(),
            ok: true,
            detail:
                "not supported by this token: keep the backup key elsewhere (cross-signing works)"
                    .into(),
        });
    }
    let keys = store.list_keys(None);
    match keys {
        Ok(keys) => {
            if keys.is_empty() {
                checks.push(Check {
                    name: "key audit".into(),
                    ok: true,
                    detail: "no mxhsm keys on this token".into(),
                });
            }
            for k in &keys {
                let problems = k.protection.problems(k.algorithm());
                let mut notes = vec![k.origin.as_str().to_string()];
                if k.protection.never_extractable == Some(true)
                    && k.protection.always_sensitive == Some(true)
                {
                    notes.push("never extractable, always sensitive".into());
                }
                checks.push(Check {
                    name: format!("key {} {} {}", k.user_id, k.role, k.public_key_base64()),
                    ok: problems.is_empty(),
                    detail: if problems.is_empty() {
                        format!(
                            "token, private, sensitive, not extractable, {} only; {}",
                            match k.algorithm() {
                                KeyAlgorithm::Ed25519 => "signs",
                                KeyAlgorithm::X25519 => "derives",
                            },
                            notes.join(", ")
                        )
                    } else {
                        problems.join("; ")
                    },
                });
            }
        }
        Err(e) => checks.push(Check {
            name: "key audit".into(),
            ok: false,
            detail: e.to_string(),
        }),
    }
    #[cfg(feature = "yubikey")]
    if let Store::YubiKey(y) = &store {
        // Factory credentials are worth a warning, not a failure: a default management key
        // lets anyone holding the card replace (not use) its keys; a default PIN lets
        // anyone holding it use them.
        match y.factory_defaults() {
            Ok(defaults) => {
                let still: Vec<&str> = defaults
                    .iter()
                    .filter(|(_, d)| *d == Some(true))
                    .map(|(what, _)| *what)
                    .collect();
                checks.push(Check {
                    name: "factory credentials".into(),
                    ok: true,
                    detail: if still.is_empty() {
                        "PIN, PUK and management key are changed from the factory defaults".into()
                    } else {
                        format!(
                            "WARNING: still the factory default: {}; change them with ykman piv access change-pin / change-puk / change-management-key --generate --protect",
                            still.join(", ")
                        )
                    },
                });
            }
            Err(e) => checks.push(Check {
                name: "factory credentials".into(),
                ok: false,
                detail: e.to_string(),
            }),
        }
        match y.unmapped_slots() {
            Ok(slots) => {
                for (slot, alg, origin) in slots {
                    checks.push(Check {
                        name: format!("slot {slot:02x}"),
                        ok: true,
                        detail: format!(
                            "holds a key mxhsm does not know ({}, {}); `mxhsm keys adopt --slot {slot:02x} …` maps it",
                            alg.map(|a| a.to_string()).unwrap_or_else(|| "another algorithm".into()),
                            origin.as_str()
                        ),
                    });
                }
            }
            Err(e) => checks.push(Check {
                name: "unmapped slots".into(),
                ok: false,
                detail: e.to_string(),
            }),
        }
        // Slot-map entries the card contradicts are never used; say so.
        match y.audit() {
            Ok(entries) => {
                for (slot, entry, state) in entries {
                    if let Err(problem) = state {
                        checks.push(Check {
                            name: format!("slot map {slot:02x} ({} {})", entry.user_id, entry.role),
                            ok: false,
                            detail: format!(
                                "{problem}; fix {} (remove the entry) or `mxhsm keys adopt`",
                                y.slot_map_path().display()
                            ),
                        });
                    }
                }
            }
            Err(e) => checks.push(Check {
                name: "slot map".into(),
                ok: false,
                detail: e.to_string(),
            }),
        }
    }
    let failed = checks.iter().filter(|c| !c.ok).count();
    if global.json {
        output::json(&json!({
            "token": store.summary().to_string(),
            "ok": failed == 0,
            "checks": checks.iter().map(|c| json!({"name": c.name, "ok": c.ok, "detail": c.detail})).collect::<Vec<_>>(),
        }));
    } else {
        say!("{}", store.summary());
        let rows: Vec<Vec<String>> = checks
            .iter()
            .map(|c| {
                vec![
                    if c.ok { "ok" } else { "FAIL" }.to_string(),
                    c.name.clone(),
                    c.detail.clone(),
                ]
            })
            .collect();
        output::table(&["", "CHECK", "DETAIL"], &rows);
        if failed > 0 {
            note!("{failed} check(s) failed");
        }
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Runs `op` repeatedly for `seconds` and returns operations per second.
fn rate(seconds: f64, mut op: impl FnMut() -> Result<()>) -> Result<f64> {
    let budget = Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < budget || n < 10 {
        op()?;
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

fn bench(global: &GlobalArgs, seconds: f64, restore_sessions: usize) -> Result<ExitCode> {
    if !(seconds > 0.0 && seconds <= 600.0) {
        bail!("--seconds must be between 0 and 600");
    }
    let store = open_store(global)?;
    let msg = br#"{"keys":{"ed25519:AAAA":"AAAA"},"usage":["self_signing"],"user_id":"@alice:example.org"}"#;
    let mut rows = Vec::new();
    let mut results = Vec::new();
    if store.capabilities().ed25519 {
        let k = SessionKey::new(&store, KeyAlgorithm::Ed25519)?;
        let token = rate(seconds, || {
            store
                .sign_ed25519(&k.key, msg)
                .map(|_| ())
                .map_err(Into::into)
        })?;
        let sk = SigningKey::from_bytes(&[7u8; 32]);
        let soft = rate(seconds, || {
            std::hint::black_box(sk.sign(std::hint::black_box(msg)));
            Ok(())
        })?;
        results.push(("ed25519 sign", token, "ed25519-dalek", soft));
    }
    if store.capabilities().x25519.is_some() {
        let k = SessionKey::new(&store, KeyAlgorithm::X25519)?;
        let peer = XPublic::from(&StaticSecret::from([9u8; 32]));
        let token = rate(seconds, || {
            store
                .x25519(&k.key, peer.as_bytes())
                .map(|_| ())
                .map_err(Into::into)
        })?;
        let secret = StaticSecret::from([5u8; 32]);
        let soft = rate(seconds, || {
            std::hint::black_box(secret.diffie_hellman(std::hint::black_box(&peer)));
            Ok(())
        })?;
        results.push(("x25519 agree", token, "x25519-dalek", soft));
    }
    let restore = if restore_sessions > 0 && store.capabilities().x25519.is_some() {
        Some(bench_restore(&store, restore_sessions)?)
    } else {
        None
    };
    for (op, token, baseline, soft) in &results {
        rows.push(vec![
            op.to_string(),
            format!("{token:.0}/s"),
            format!("{soft:.0}/s ({baseline})"),
            format!("{:.4}", token / soft),
        ]);
    }
    if global.json {
        output::json(&json!({
            "token": store.summary().to_string(),
            "seconds": seconds,
            "results": results.iter().map(|(op, t, b, s)| json!({
                "operation": op, "token_per_second": t, "software": b,
                "software_per_second": s, "ratio": t / s,
            })).collect::<Vec<_>>(),
            "restore": restore.as_ref().map(|r| r.to_json()),
        }));
    } else {
        say!("{} — one thread, one session", store.summary());
        output::table(&["OPERATION", "TOKEN", "SOFTWARE", "TOKEN/SOFTWARE"], &rows);
        if let Some(r) = &restore {
            r.print();
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Restore throughput against the token's own agreement rate, per number of parallel
/// PKCS#11 sessions, and vodozemac's software decryption.
struct RestoreBench {
    sessions: usize,
    /// (jobs, raw agreements/s, restored sessions/s)
    rows: Vec<(usize, f64, f64)>,
    software: f64,
}

impl RestoreBench {
    /// The row with the fastest restore.
    fn best(&self) -> (usize, f64, f64) {
        self.rows
            .iter()
            .copied()
            .fold((1, 0.0, 0.0), |b, r| if r.2 > b.2 { r } else { b })
    }

    /// The token's best raw agreement rate over all job counts.
    fn best_raw(&self) -> f64 {
        self.rows.iter().map(|r| r.1).fold(0.0, f64::max)
    }

    fn to_json(&self) -> serde_json::Value {
        let best = self.best();
        json!({
            "sessions": self.sessions,
            "by_jobs": self.rows.iter().map(|(j, raw, restore)| json!({
                "jobs": j, "raw_agreements_per_second": raw, "restored_per_second": restore,
                "restore_over_raw": restore / raw,
            })).collect::<Vec<_>>(),
            "software_per_second": self.software,
            "best_jobs": best.0,
            "best_raw_agreements_per_second": self.best_raw(),
            "best_restore_over_best_raw": best.2 / self.best_raw(),
            "best_restore_over_software": best.2 / self.software,
        })
    }

    fn print(&self) {
        say!(
            "\nkey-backup restore, {} sessions (decrypt + session-key check), medians of 3 alternating runs",
            self.sessions
        );
        let rows: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|(j, raw, r)| {
                vec![
                    j.to_string(),
                    format!("{raw:.0}/s"),
                    format!("{r:.0}/s"),
                    format!("{:.3}", r / raw),
                    format!("{:.4}", r / self.software),
                ]
            })
            .collect();
        output::table(
            &[
                "JOBS",
                "RAW TOKEN ECDH",
                "RESTORE",
                "RESTORE/RAW",
                "RESTORE/SOFTWARE",
            ],
            &rows,
        );
        let best = self.best();
        say!(
            "software (vodozemac PkDecryption, 1 thread): {:.0}/s; best restore: {} job(s), {:.0} sessions/s = {:.1} % of the token's best raw agreement rate ({:.0}/s)",
            self.software,
            best.0,
            best.2,
            100.0 * best.2 / self.best_raw(),
            self.best_raw()
        );
    }
}

fn bench_restore(store: &Store, n: usize) -> Result<RestoreBench> {
    use mxhsm::matrix::backup::{self, BackedUpSession};
    use mxhsm::token::TokenAgreement;
    use vodozemac::megolm::{GroupSession, InboundGroupSession, SessionConfig};

    let k = SessionKey::new(store, KeyAlgorithm::X25519)?;
    let agreement = TokenAgreement {
        store: &**store,
        key: k.key.clone(),
    };
    let soft = vodozemac::pk_encryption::PkDecryption::new();
    // Realistic sessions: real megolm session keys, encrypted to the token's key and to
    // the software key.
    let mut items = Vec::with_capacity(n);
    let mut soft_items = Vec::with_capacity(n);
    for _ in 0..n {
        let outbound = GroupSession::new(SessionConfig::version_1());
        let mut inbound =
            InboundGroupSession::new(&outbound.session_key(), SessionConfig::version_1());
        let key = inbound
            .export_at(0)
            .ok_or_else(|| anyhow::anyhow!("cannot export a new session"))?
            .to_base64();
        let plain = json!({
            "algorithm": "m.megolm.v1.aes-sha2", "sender_key": "WimPd2udAU/1S/+YBpPbmr9L+0H5H+BnAVHSwDxlPGc",
            "session_key": key, "sender_claimed_keys": {"ed25519": "Bhbpt6hqMZlSH4sJV7xiEEEiPVeTWz4Vkujl1EMdIPI"},
            "forwarding_curve25519_key_chain": [],
        })
        .to_string();
        items.push(BackedUpSession {
            room_id: "!bench:localhost".into(),
            session_id: outbound.session_id(),
            session_data: Ok(backup::encrypt(&k.key.public_key, plain.as_bytes())?),
        });
        soft_items.push(
            vodozemac::pk_encryption::PkEncryption::from_key(soft.public_key())
                .encrypt(plain.as_bytes())?,
        );
    }
    let peer = XPublic::from(&StaticSecret::from([9u8; 32]));
    let cores = std::thread::available_parallelism()
        .map(|c| c.get())
        .unwrap_or(1);
    let mut rows = Vec::new();
    // Raw agreements and restores alternate, three times each, and the medians are kept:
    // a software token's speed drifts within a run, and one pass of each in a fixed order
    // would compare different moments.
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    for jobs in 1..=cores.clamp(2, 4) {
        let (mut raws, mut restores) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            let start = Instant::now();
            std::thread::scope(|s| {
                for t in 0..jobs {
                    let share = n / jobs + usize::from(t < n % jobs);
                    let (k, peer) = (&k, &peer);
                    s.spawn(move || {
                        for _ in 0..share {
                            let _ = store.x25519(&k.key, peer.as_bytes());
                        }
                    });
                }
            });
            raws.push(n as f64 / start.elapsed().as_secs_f64());
            let start = Instant::now();
            let results = backup::restore_all(
                &agreement,
                &items,
                jobs,
                mxhsm::account::restore::software_jobs(),
                &|| {},
            );
            restores.push(n as f64 / start.elapsed().as_secs_f64());
            if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
                bail!("a session failed to restore during the benchmark: {e}");
            }
        }
        rows.push((jobs, median(raws), median(restores)));
    }
    let start = Instant::now();
    for (item, msg) in items.iter().zip(&soft_items) {
        let plain = soft.decrypt(msg)?;
        backup::room_key(&item.room_id, &item.session_id, &plain)?;
    }
    let software = n as f64 / start.elapsed().as_secs_f64();
    Ok(RestoreBench {
        sessions: n,
        rows,
        software,
    })
}
