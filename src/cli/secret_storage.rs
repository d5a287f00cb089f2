//! `mxhsm secret-storage import | status`: move a user's existing keys from secret storage
//! (their recovery key) onto the token.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;
use mxhsm::account::AccountError;
use mxhsm::account::secret_storage;
use mxhsm::token::KeyAlgorithm;
use serde_json::json;

use super::output::{self, esc, note, say};
use super::{GlobalArgs, open_account, secrets};

#[derive(Debug, Subcommand)]
pub enum SecretStorageCommand {
    /// Decrypt the cross-signing keys and the backup key from secret storage, check them
    /// against what is published, and import them onto the token as non-extractable keys.
    Import {
        /// Read the recovery key or passphrase from this file ('-' for standard input);
        /// otherwise it is asked for. Never on the command line.
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
        /// After the import is proven, delete from the server's account data every secret
        /// whose key the token holds (imported now or before). The recovery key then
        /// decrypts none of them: this token, and any other you imported them onto, hold
        /// the only copies.
        #[arg(long)]
        remove_from_server: bool,
    },
    /// Which secrets the server holds, which keys the token holds, whether they match.
    Status,
}

pub fn run(global: &GlobalArgs, cmd: SecretStorageCommand) -> Result<ExitCode> {
    let account = open_account(global)?;
    match cmd {
        SecretStorageCommand::Status => {
            let s = secret_storage::status(&account)?;
            let key = |k: &Option<mxhsm::token::PublicKey>| k.as_ref().map(|k| k.to_base64());
            output::emit(
                global.json,
                json!({
                    "default_key": s.default_key,
                    "secrets": s.secrets.iter().map(|x| json!({
                        "secret": x.name, "on_server": x.on_server,
                        "token_key": key(&x.token_key), "published_key": key(&x.published_key),
                        "matches": x.matches(),
                    })).collect::<Vec<_>>(),
                }),
                || {
                    say!(
                        "secret storage of {}: default key {}",
                        esc(account.user_id()),
                        esc(s.default_key.as_deref().unwrap_or("(none)"))
                    );
                    let rows: Vec<Vec<String>> = s
                        .secrets
                        .iter()
                        .map(|x| {
                            vec![
                                x.name.to_string(),
                                if x.on_server { "yes" } else { "no" }.to_string(),
                                key(&x.token_key).unwrap_or_else(|| "-".into()),
                                key(&x.published_key).unwrap_or_else(|| "-".into()),
                                match x.matches() {
                                    Some(true) => "match".into(),
                                    Some(false) => "MISMATCH".into(),
                                    None => "-".into(),
                                },
                            ]
                        })
                        .collect();
                    output::table(&["SECRET", "ON SERVER", "ON TOKEN", "PUBLISHED", ""], &rows);
                },
            );
        }
        SecretStorageCommand::Import {
            key_file,
            remove_from_server,
        } => {
            let key_text = || {
                secrets::recovery_key(key_file.as_ref())
                    .map_err(|e| AccountError::Refused(format!("{e:#}")))
            };
            let r = secret_storage::import(&account, &key_text, remove_from_server)?;
            for (name, why) in &r.skipped {
                note!("{name}: skipped ({})", esc(why));
            }
            for (name, k) in &r.imported {
                let proof = match k.algorithm() {
                    KeyAlgorithm::Ed25519 => "a signature by it verifies",
                    KeyAlgorithm::X25519 => "an agreement with it matches software",
                };
                note!(
                    "imported {name} as the {} key {} ({proof})",
                    k.role,
                    k.public_key_base64()
                );
            }
            if !r.removed.is_empty() {
                note!(
                    "removed {} from the server: your recovery key no longer opens them; this token (and any other you imported them onto) holds the only copies",
                    r.removed.join(", ")
                );
            }
            output::emit(
                global.json,
                json!({
                    "imported": r.imported.iter().map(|(n, k)| json!({"secret": n, "role": k.role.as_str(), "public_key": k.public_key_base64()})).collect::<Vec<_>>(),
                    "skipped": r.skipped.iter().map(|(n, why)| json!({"secret": n, "reason": why})).collect::<Vec<_>>(),
                    "removed_from_server": r.removed,
                }),
                || {
                    say!(
                        "imported {} key(s) onto {}",
                        r.imported.len(),
                        account.store().summary()
                    )
                },
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
