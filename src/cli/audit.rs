//! `mxhsm audit verify` and `mxhsm audit show`: the record of what the token did.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Subcommand;
use mxhsm::account::audit;
use serde_json::{Value, json};

use super::GlobalArgs;
use super::output::{self, esc, say};

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the audit log offline: every entry chains to the one before, every head is
    /// signed by the audit key, nothing was changed, removed, reordered or cut off. Reports
    /// the first bad line and exits 3.
    Verify {
        /// The log (default: the configured one, else $XDG_DATA_HOME/mxhsm/audit.jsonl).
        file: Option<PathBuf>,
        /// An audit key the heads must be signed with (base64, from `mxhsm keys list`);
        /// repeat it for a log that several tokens sign, or whose audit key was rotated.
        /// Default: the key of the first signed head.
        #[arg(long, value_name = "BASE64")]
        key: Vec<String>,
        /// A head you kept elsewhere (`SEQ:SHA256`, as verify prints it): the log must
        /// still contain exactly that line.
        #[arg(long, value_name = "SEQ:SHA256")]
        head: Option<String>,
    },
    /// List what the token did: time, operation, account, key, what was signed, command.
    Show {
        /// The log (default: the configured one).
        file: Option<PathBuf>,
        /// Only entries this recent (30m, 24h, 7d) or from this day on (2026-12-01).
        #[arg(long, value_name = "AGE|DATE")]
        since: Option<String>,
    },
}

/// The audit log to read or write: `MXHSM_AUDIT_LOG`, else the config's, else the default.
pub fn log_path(global: &GlobalArgs) -> PathBuf {
    if let Some(p) = std::env::var_os(audit::AUDIT_LOG_ENV).filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    mxhsm::config::Config::load(global.config.as_deref())
        .ok()
        .and_then(|c| c.defaults.audit_log)
        .unwrap_or_else(audit::default_path)
}

/// The users whose master key a user-signing key of `account` signed, as the audit log at
/// `log` records it: each once, with the (base64) user-signing key of its newest signature,
/// newest first. A missing or unreadable log gives none.
pub fn users_signed(log: &std::path::Path, account: &str) -> Vec<(String, String)> {
    use mxhsm::token::KeyRole;
    let Ok(entries) = audit::entries(log, None) else {
        return Vec::new();
    };
    fn s(v: Option<&serde_json::Value>) -> Option<&str> {
        v.and_then(serde_json::Value::as_str)
    }
    let mut users: Vec<(String, String)> = Vec::new();
    for e in entries.iter().rev() {
        let object = e.get("object");
        let key = e.get("key");
        let signed_master = s(e.get("op")) == Some("sign")
            && s(e.get("account")) == Some(account)
            && s(key.and_then(|k| k.get("role"))) == Some(KeyRole::UserSigning.as_str())
            && s(object.and_then(|o| o.get("usage"))) == Some(KeyRole::Master.as_str());
        let (Some(user), Some(usk)) = (
            s(object.and_then(|o| o.get("user_id"))).filter(|_| signed_master),
            s(key.and_then(|k| k.get("public_key"))),
        ) else {
            continue;
        };
        if mxhsm::token::check_user_id(user).is_ok() && !users.iter().any(|(u, _)| u == user) {
            users.push((user.to_string(), usk.to_string()));
        }
    }
    users
}

/// `--since`: an age back from now, or a day (UTC).
fn since_ms(text: &str) -> Result<u64> {
    if let Some(d) = mxhsm::text::parse_duration(text) {
        return Ok(mxhsm::text::now_ms().saturating_sub(d.as_millis() as u64));
    }
    mxhsm::text::parse_date(text).ok_or_else(|| {
        anyhow::anyhow!(
            "--since {:?} is neither an age (30m, 24h, 7d) nor a date (2026-12-01)",
            esc(text)
        )
    })
}

pub fn run(global: &GlobalArgs, cmd: AuditCommand) -> Result<ExitCode> {
    match cmd {
        AuditCommand::Verify { file, key, head } => {
            let path = file.unwrap_or_else(|| log_path(global));
            let keys = key
                .iter()
                .map(|k| mxhsm::Ed25519PublicKey::from_base64(k.trim()))
                .collect::<Result<Vec<_>, _>>()
                .context("--key is not an Ed25519 public key")?;
            let head = head
                .map(|h| {
                    h.split_once(':')
                        .and_then(|(s, hash)| Some((s.parse::<u64>().ok()?, hash.to_string())))
                        .ok_or_else(|| anyhow::anyhow!("--head takes SEQ:SHA256"))
                })
                .transpose()?;
            match audit::verify(&path, &keys, head.as_ref().map(|(s, h)| (*s, h.as_str()))) {
                Ok(v) => {
                    output::emit(
                        global.json,
                        json!({
                            "version": 1, "ok": true, "file": path.display().to_string(),
                            "entries": v.entries, "heads": v.heads, "signed_heads": v.signed_heads,
                            "audit_key": v.audit_key,
                            "last_head": v.last_head.as_ref().map(|(s, h)| json!({"seq": s, "sha256": h})),
                            "unsigned_tail": v.unsigned_tail, "torn_tail": v.torn_tail,
                            "repairs": v.repairs,
                        }),
                        || {
                            say!(
                                "✔ {}: {} entries, {} heads ({} signed by the audit key {})",
                                path.display(),
                                v.entries,
                                v.heads,
                                v.signed_heads,
                                v.audit_key.as_deref().unwrap_or("-")
                            );
                            if let Some((seq, hash)) = &v.last_head {
                                say!(
                                    "  last head: {seq}:{hash} (keep it elsewhere; `--head` checks against it)"
                                );
                            }
                            if v.signed_heads < v.heads {
                                say!(
                                    "  {} head(s) unsigned: the token had no audit key (`mxhsm keys generate --role audit`)",
                                    v.heads - v.signed_heads
                                );
                            }
                            if v.unsigned_tail > 0 {
                                say!(
                                    "  {} entries after the last head: a command is running, or one was killed",
                                    v.unsigned_tail
                                );
                            }
                            if v.torn_tail {
                                say!(
                                    "  the last line is incomplete (a crash during an append); the next append repairs it"
                                );
                            }
                            for line in &v.repairs {
                                say!("  line {line}: repaired after a crash");
                            }
                        },
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e @ audit::AuditError::Bad { .. }) => {
                    output::emit(
                        global.json,
                        json!({"version": 1, "ok": false, "file": path.display().to_string(), "error": e.to_string(),
                               "line": match &e { audit::AuditError::Bad { line, .. } => Some(*line), _ => None }}),
                        || say!("✘ {}", esc(&e.to_string())),
                    );
                    Ok(ExitCode::from(super::exit::PROBLEM))
                }
                Err(e) => Err(e.into()),
            }
        }
        AuditCommand::Show { file, since } => {
            let path = file.unwrap_or_else(|| log_path(global));
            let since = since.as_deref().map(since_ms).transpose()?;
            let entries = audit::entries(&path, since)?;
            output::emit(
                global.json,
                json!({"version": 1, "file": path.display().to_string(), "entries": entries}),
                || {
                    let text = |e: &serde_json::Map<String, Value>, k: &str| {
                        e.get(k).and_then(Value::as_str).unwrap_or("").to_string()
                    };
                    let rows: Vec<Vec<String>> = entries
                        .iter()
                        .map(|e| {
                            let object =
                                e.get("object").map(describe_object).unwrap_or_else(|| {
                                    match e.get("count") {
                                        Some(c) => format!("{c} agreement(s)"),
                                        None => String::new(),
                                    }
                                });
                            vec![
                                e.get("seq").map(Value::to_string).unwrap_or_default(),
                                text(e, "time"),
                                text(e, "op"),
                                text(e, "account"),
                                e.get("key")
                                    .and_then(|k| k.get("role"))
                                    .and_then(Value::as_str)
                                    .unwrap_or("")
                                    .to_string(),
                                object,
                                text(e, "command"),
                            ]
                        })
                        .collect();
                    output::table(
                        &["SEQ", "TIME", "OP", "ACCOUNT", "KEY", "WHAT", "COMMAND"],
                        &rows,
                    );
                },
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `device_keys @alice:example.org DEVICE`, `cross_signing_key master @bob:…`, …
fn describe_object(o: &Value) -> String {
    let s = |k: &str| o.get(k).and_then(Value::as_str).unwrap_or("");
    match s("type") {
        "device_keys" => format!("device {} of {}", s("device_id"), s("user_id")),
        "cross_signing_key" => format!("{} key of {}", s("usage"), s("user_id")),
        "backup_auth_data" => format!("backup auth_data ({})", s("public_key")),
        other => other.to_string(),
    }
}
