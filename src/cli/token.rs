//! `mxhsm token list | doctor | bench`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::Subcommand;
use mxhsm::account::doctor::{Check, Fix};
use mxhsm::config;
use mxhsm::token::pkcs11::{self, TokenEntry};
use serde_json::json;

use super::output::{self, note, say};
use super::{GlobalArgs, open_store};

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
        /// Also measure what mxhsm's agreement path costs: this many X25519 agreements
        /// through mxhsm beside a bare PKCS#11 loop (the same three calls, nothing around
        /// them), 1 to N threads, medians of 7 alternating runs. 0 skips it.
        #[arg(long, default_value_t = 0, value_name = "AGREEMENTS")]
        overhead: usize,
        /// With --restore-sessions or --overhead: agree with this user's current backup
        /// key on the token rather than a temporary session key (a stored key can be
        /// slower to reach: Kryoptic reads and decrypts it from its database on every use).
        #[arg(long, value_name = "USER_ID")]
        backup_key_of: Option<String>,
        /// Also measure how key lookups grow with the number of users on the token: keys
        /// for up to this many made-up users (@mxhsm-bench-N:bench.invalid, four keys
        /// each) are generated in steps, timed, and deleted again. 0 skips it.
        #[arg(long, default_value_t = 0, value_name = "USERS")]
        scale_users: usize,
        /// With --scale-users: leave the made-up users' keys on the token (for a token made
        /// for the bench; deleting thousands of keys takes longer than the bench).
        #[arg(long, requires = "scale_users")]
        scale_keep: bool,
    },
}

pub fn run(global: &GlobalArgs, cmd: TokenCommand) -> Result<ExitCode> {
    match cmd {
        TokenCommand::List { module } => list(global, module),
        TokenCommand::Doctor => doctor(global),
        TokenCommand::Bench {
            scale_users,
            scale_keep,
            ..
        } if scale_users > 0 => scale_bench(global, scale_users, scale_keep),
        TokenCommand::Bench {
            seconds,
            restore_sessions,
            overhead,
            backup_key_of,
            ..
        } => bench(
            global,
            seconds,
            restore_sessions,
            overhead,
            backup_key_of.as_deref(),
        ),
    }
}

fn list(global: &GlobalArgs, modules: Vec<PathBuf>) -> Result<ExitCode> {
    let explicit = !modules.is_empty();
    let modules = if modules.is_empty() {
        default_modules(global)
    } else {
        modules
            .into_iter()
            .map(|path| pkcs11::FoundModule {
                path,
                source: pkcs11::ModuleSource::Named,
            })
            .collect()
    };
    // YubiKeys too, unless modules were named.
    let yubikeys = (!explicit).then(list_yubikeys);
    if modules.is_empty() && !matches!(&yubikeys, Some(Ok(y)) if !y.is_empty()) {
        bail!(
            "{}",
            nothing_found(yubikeys.as_ref().and_then(|r| r.as_ref().err()))
        );
    }
    let mut found: Vec<(pkcs11::FoundModule, Result<Vec<TokenEntry>, String>)> = Vec::new();
    for m in modules {
        let r = pkcs11::list_tokens(&m.path).map_err(|e| e.to_string());
        found.push((m, r));
    }
    let modules: Vec<_> = found
        .iter()
        .map(|(m, r)| {
            let mut doc = json!({
                "module": m.path.display().to_string(),
                "source": m.source.to_string(),
                "p11_kit_config": match &m.source {
                    pkcs11::ModuleSource::P11Kit { config, .. } => Some(config.display().to_string()),
                    _ => None,
                },
            });
            match r {
                Ok(tokens) => {
                    doc["tokens"] = json!(tokens.iter().map(token_json).collect::<Vec<_>>())
                }
                Err(e) => doc["error"] = json!(e),
            }
            doc
        })
        .collect();
    let v = json!({
        "modules": modules,
        // Not asked for when modules were named; `yubikey_error` says why none could be
        // listed (pcscd not running, say).
        "yubikeys": match &yubikeys {
            Some(Ok(keys)) => json!(keys.iter().map(|y| json!({
                "serial": y.serial,
                "firmware": y.firmware,
                "reader": y.reader,
                "supported": y.supported,
            })).collect::<Vec<_>>()),
            _ => json!([]),
        },
        "yubikey_error": match &yubikeys {
            Some(Err(e)) => Some(e.to_string()),
            _ => None,
        },
    });
    output::emit(global.json, v, || {
        let mut rows = Vec::new();
        for (m, r) in &found {
            match r {
                Ok(tokens) if tokens.is_empty() => {
                    rows.push(vec![
                        m.path.display().to_string(),
                        m.source.to_string(),
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
                            m.path.display().to_string(),
                            m.source.to_string(),
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
                    m.path.display().to_string(),
                    m.source.to_string(),
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
                "FROM",
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
    });
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

/// Why `token list` found nothing: with the reason YubiKeys could not be listed, if they
/// could not (pcscd not running, say), which "no YubiKey found" alone would hide.
fn nothing_found(yubikeys: Option<&impl std::fmt::Display>) -> String {
    let hint = format!(
        "name a module with --module PATH or set {}",
        pkcs11::MODULE_ENV
    );
    match yubikeys {
        Some(e) => format!("no PKCS#11 module found, and YubiKeys cannot be listed ({e}); {hint}"),
        None => format!("no PKCS#11 module and no YubiKey found; {hint}"),
    }
}

/// The module of --token/$MXHSM_TOKEN, $MXHSM_PKCS11_MODULE and the usual install paths.
fn default_modules(global: &GlobalArgs) -> Vec<pkcs11::FoundModule> {
    let uri = match config::token_choice(global.token.as_deref(), global.yubikey.as_deref()) {
        Ok(config::TokenChoice::Pkcs11(uri)) => Some(uri),
        _ => None,
    };
    pkcs11::default_modules(uri.as_deref())
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

/// A doctor line with its remedy as a command.
pub(super) fn detail(c: &Check) -> String {
    let with = |cmd: &str| format!("{}; {cmd}", c.detail);
    match &c.fix {
        None => c.detail.clone(),
        Some(Fix::LogIn) => with("log in again with `mxhsm login --replace`"),
        Some(Fix::PublishIdentity) => with(
            "`mxhsm identity publish --replace` publishes the token's identity (it lists what is lost first; add --new-keys on Synapse, which cannot take back keys it stored before)",
        ),
        Some(Fix::SignThisDevice) => with("`mxhsm identity publish` cross-signs this device"),
        Some(Fix::CreateBackup) => with("`mxhsm backup create` makes or re-signs one"),
        Some(Fix::RemoveSecretCopies) => with(
            "remove them from secret storage in a client that has your recovery key (the token's keys are the ones to keep)",
        ),
        Some(Fix::AdoptSlot(slot)) => format!(
            "{}; `mxhsm keys adopt --slot {slot} --user … --role …` maps it",
            c.detail
        ),
        Some(Fix::SlotMapEntry { map, slot }) => format!(
            "{}; remove the entry for slot {slot} from {}, or run `mxhsm keys adopt --slot {slot}`",
            c.detail,
            map.display()
        ),
    }
}

fn doctor(global: &GlobalArgs) -> Result<ExitCode> {
    let store = open_store(global)?;
    let checks = mxhsm::account::doctor::doctor(&store)?;
    let failed = checks.iter().filter(|c| !c.ok).count();
    output::emit(
        global.json,
        json!({
            "token": store.summary().to_string(),
            "ok": failed == 0,
            "checks": checks.iter().map(|c| json!({"name": c.name, "ok": c.ok, "detail": detail(c)})).collect::<Vec<_>>(),
        }),
        || {
            say!("{}", store.summary());
            let rows: Vec<Vec<String>> = checks
                .iter()
                .map(|c| {
                    vec![
                        if c.ok { "ok" } else { "FAIL" }.to_string(),
                        c.name.clone(),
                        detail(c),
                    ]
                })
                .collect();
            output::table(&["", "CHECK", "DETAIL"], &rows);
            if failed > 0 {
                note!("{failed} check(s) failed");
            }
        },
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn bench(
    global: &GlobalArgs,
    seconds: f64,
    restore_sessions: usize,
    overhead: usize,
    backup_key_of: Option<&str>,
) -> Result<ExitCode> {
    if let Some(user) = backup_key_of {
        mxhsm::token::check_user_id(user).map_err(|e| anyhow::anyhow!("--backup-key-of: {e}"))?;
    }
    let store = open_store(global)?;
    let stored = match backup_key_of {
        Some(user) => Some(
            store
                .current_keys(user)?
                .remove(&mxhsm::token::KeyRole::Backup)
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "{} holds no backup key of {}",
                        store.summary(),
                        mxhsm::text::escape(user)
                    )
                })?,
        ),
        None => None,
    };
    let results = mxhsm::account::bench::bench(&store, seconds)?;
    let overhead = match overhead {
        0 => None,
        n => mxhsm::account::bench::bench_overhead(&store, n, stored.as_ref())?,
    };
    let restore = if restore_sessions > 0 && store.capabilities().x25519.is_some() {
        Some(mxhsm::account::bench::bench_restore(
            &store,
            restore_sessions,
            stored.as_ref(),
        )?)
    } else {
        None
    };
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            vec![
                r.operation.to_string(),
                format!("{:.0}/s", r.token_per_second),
                format!("{:.0}/s ({})", r.software_per_second, r.software),
                format!("{:.4}", r.token_per_second / r.software_per_second),
            ]
        })
        .collect();
    output::emit(
        global.json,
        json!({
            "token": store.summary().to_string(),
            "seconds": seconds,
            "results": results.iter().map(|r| json!({
                "operation": r.operation, "token_per_second": r.token_per_second,
                "software": r.software, "software_per_second": r.software_per_second,
                "ratio": r.token_per_second / r.software_per_second,
            })).collect::<Vec<_>>(),
            "restore": restore.as_ref().map(|r| r.to_json()),
            "overhead": overhead.as_ref().map(|rows| rows.iter().map(|r| json!({
                "jobs": r.jobs, "keystore_per_second": r.keystore,
                "bare_per_second": r.bare, "keystore_over_bare": r.ratio(),
            })).collect::<Vec<_>>()),
        }),
        || {
            say!("{} — one thread, one session", store.summary());
            output::table(&["OPERATION", "TOKEN", "SOFTWARE", "TOKEN/SOFTWARE"], &rows);
            if let Some(r) = &restore {
                print_restore_bench(r);
            }
            if let Some(rows) = &overhead {
                say!(
                    "\nX25519 through mxhsm against a bare PKCS#11 loop, medians of 7 alternating runs"
                );
                let rows: Vec<Vec<String>> = rows
                    .iter()
                    .map(|r| {
                        vec![
                            r.jobs.to_string(),
                            format!("{:.0}/s", r.keystore),
                            format!("{:.0}/s", r.bare),
                            format!("{:.3}", r.ratio()),
                        ]
                    })
                    .collect();
                output::table(&["JOBS", "MXHSM", "BARE LOOP", "MXHSM/BARE"], &rows);
            }
        },
    );
    Ok(ExitCode::SUCCESS)
}

fn print_restore_bench(b: &mxhsm::account::bench::RestoreBench) {
    say!(
        "\nkey-backup restore, {} sessions (decrypt + session-key check), medians of 3 alternating runs",
        b.sessions
    );
    let rows: Vec<Vec<String>> = b
        .rows
        .iter()
        .map(|(j, raw, r)| {
            vec![
                j.to_string(),
                format!("{raw:.0}/s"),
                format!("{r:.0}/s"),
                format!("{:.3}", r / raw),
                format!("{:.4}", r / b.software),
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
    let best = b.best();
    say!(
        "software (vodozemac PkDecryption, 1 thread): {:.0}/s; best restore: {} job(s), {:.0} sessions/s = {:.1} % of the token's best raw agreement rate ({:.0}/s)",
        b.software,
        best.0,
        best.2,
        100.0 * best.2 / b.best_raw(),
        b.best_raw()
    );
}

/// `token bench --scale-users N`: lookups against the number of users on the token.
fn scale_bench(global: &GlobalArgs, users: usize, keep: bool) -> Result<ExitCode> {
    let store = open_store(global)?;
    note!(
        "generating keys for up to {users} made-up users on {}{}",
        store.summary(),
        if keep {
            ""
        } else {
            " (deleted again at the end)"
        }
    );
    let mut first: Option<std::time::Duration> = None;
    let rows = mxhsm::account::bench::scale(&store, users, keep, |r| {
        let base = *first.get_or_insert(r.one_user);
        note!(
            "{} users ({} keys): one user {:.2} ms ({:.2}x the first step), all {:.1} ms",
            r.users,
            r.keys,
            r.one_user.as_secs_f64() * 1e3,
            r.one_user.as_secs_f64() / base.as_secs_f64(),
            r.all.as_secs_f64() * 1e3
        );
    })?;
    let base = rows
        .first()
        .map(|r| r.one_user.as_secs_f64())
        .unwrap_or(1.0);
    output::emit(
        global.json,
        json!({"version": 1, "token": store.summary().to_string(), "rows": rows.iter().map(|r| json!({
            "users": r.users, "keys": r.keys,
            "one_user_ms": r.one_user.as_secs_f64() * 1e3, "all_ms": r.all.as_secs_f64() * 1e3,
            "same_user_again_ms": r.same_user_again.as_secs_f64() * 1e3,
            "one_user_ratio": r.one_user.as_secs_f64() / base,
            "one_pass_ms": r.one_pass.map(|(d, _)| d.as_secs_f64() * 1e3),
            "searches_per_user": r.one_pass.map(|(_, n)| n),
        })).collect::<Vec<_>>()}),
        || {
            let table: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    vec![
                        r.users.to_string(),
                        r.keys.to_string(),
                        format!("{:.2} ms", r.one_user.as_secs_f64() * 1e3),
                        format!("{:.2}", r.one_user.as_secs_f64() / base),
                        format!("{:.3} ms", r.same_user_again.as_secs_f64() * 1e3),
                        format!("{:.1} ms", r.all.as_secs_f64() * 1e3),
                        r.one_pass.map_or("-".into(), |(d, n)| {
                            format!("{:.2} ms ({n} per user)", d.as_secs_f64() * 1e3)
                        }),
                        r.one_pass.map_or("-".into(), |(d, _)| {
                            format!("{:.2}", r.one_user.as_secs_f64() / d.as_secs_f64())
                        }),
                    ]
                })
                .collect();
            say!("key lookups on {} (medians)", store.summary());
            output::table(
                &[
                    "USERS",
                    "KEYS",
                    "ONE USER",
                    "ONE USER / FIRST",
                    "SAME USER AGAIN",
                    "ALL KEYS",
                    "ONE SEARCH",
                    "ONE USER / ONE SEARCH",
                ],
                &table,
            );
        },
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_empty_listing_names_why_yubikeys_were_not_listed() {
        let pcscd = "PC/SC: listing readers failed: pcscd is not running";
        let m = super::nothing_found(Some(&pcscd));
        assert!(
            m.contains(
                "YubiKeys cannot be listed (PC/SC: listing readers failed: pcscd is not running)"
            ),
            "{m}"
        );
        assert!(m.contains("--module PATH"), "{m}");
        let m = super::nothing_found(None::<&String>);
        assert_eq!(
            m,
            "no PKCS#11 module and no YubiKey found; name a module with --module PATH or set MXHSM_PKCS11_MODULE"
        );
    }
}
