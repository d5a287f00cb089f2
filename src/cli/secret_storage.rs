//! `mxhsm secret-storage import | status`: move a user's existing keys from secret storage
//! (their recovery key) onto the token.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use mxhsm::homeserver::Client;
use mxhsm::matrix::cross_signing::{self, Usage};
use mxhsm::matrix::secret_storage::{self as ssss, StorageKey};
use mxhsm::matrix::signed_json::decode_base64;
use mxhsm::token::{KeyAlgorithm, KeyInfo, KeyOptions, KeyRole, KeyStore, SecretKeyBytes};
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use zeroize::Zeroizing;

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
        /// After the import is proven, delete these secrets from the server's account data
        /// (the token becomes the only copy unless you keep the recovery key).
        #[arg(long)]
        remove_from_server: bool,
    },
    /// Which secrets the server holds, which keys the token holds, whether they match.
    Status,
}

/// The secrets mxhsm moves, their roles, and what each must match.
const SECRETS: [(&str, KeyRole); 4] = [
    (ssss::MASTER, KeyRole::Master),
    (ssss::SELF_SIGNING, KeyRole::SelfSigning),
    (ssss::USER_SIGNING, KeyRole::UserSigning),
    (ssss::BACKUP, KeyRole::Backup),
];

/// The public keys the server publishes for us: the cross-signing keys and the current
/// backup's public key.
fn published(client: &Client, user: &str) -> Result<Vec<(KeyRole, Option<[u8; 32]>)>> {
    let q = client.query_keys(&[user])?;
    let cs = |field: &str, usage: Usage| {
        q.get(field)
            .and_then(|m| m.get(user))
            .and_then(|o| cross_signing::parse_key_object(o, user, usage).ok())
            .map(|k| k.0)
    };
    let backup = client
        .backup_version(None)?
        .and_then(|v| {
            v.pointer("/auth_data/public_key")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .and_then(|s| decode_base64(&s).ok())
        .and_then(|b| <[u8; 32]>::try_from(b).ok());
    Ok(vec![
        (KeyRole::Master, cs("master_keys", Usage::Master)),
        (
            KeyRole::SelfSigning,
            cs("self_signing_keys", Usage::SelfSigning),
        ),
        (
            KeyRole::UserSigning,
            cs("user_signing_keys", Usage::UserSigning),
        ),
        (KeyRole::Backup, backup),
    ])
}

pub fn run(global: &GlobalArgs, cmd: SecretStorageCommand) -> Result<ExitCode> {
    let account = open_account(global)?;
    let (client, user) = (account.client(), account.user_id().to_string());
    let store: &dyn KeyStore = &**account.store();
    let default = client
        .account_data(&user, "m.secret_storage.default_key")?
        .and_then(|v| v.get("key").and_then(Value::as_str).map(str::to_string));
    match cmd {
        SecretStorageCommand::Status => {
            let published = published(client, &user)?;
            let current = store.current_keys(&user)?;
            let mut rows = Vec::new();
            let mut out = Vec::new();
            for ((name, role), (_, pub_key)) in SECRETS.iter().zip(&published) {
                let on_server = client.account_data(&user, name)?;
                let stored = match (&on_server, &default) {
                    (Some(v), Some(id)) => v.pointer(&format!("/encrypted/{id}")).is_some(),
                    _ => false,
                };
                let token = current.get(role);
                let matches = match (&token, pub_key) {
                    (Some(t), Some(p)) => Some(&t.public_key == p),
                    _ => None,
                };
                let enc = |k: &[u8; 32]| mxhsm::matrix::signed_json::encode_base64(k);
                rows.push(vec![
                    name.to_string(),
                    if stored { "yes" } else { "no" }.to_string(),
                    token
                        .as_ref()
                        .map(|t| t.public_key_base64())
                        .unwrap_or_else(|| "-".into()),
                    pub_key.as_ref().map(enc).unwrap_or_else(|| "-".into()),
                    match matches {
                        Some(true) => "match".into(),
                        Some(false) => "MISMATCH".into(),
                        None => "-".into(),
                    },
                ]);
                out.push(json!({
                    "secret": name, "on_server": stored,
                    "token_key": token.as_ref().map(|t| t.public_key_base64()),
                    "published_key": pub_key.as_ref().map(enc), "matches": matches,
                }));
            }
            if global.json {
                output::json(&json!({"default_key": default, "secrets": out}));
            } else {
                say!(
                    "secret storage of {}: default key {}",
                    esc(&user),
                    esc(default.as_deref().unwrap_or("(none)"))
                );
                output::table(&["SECRET", "ON SERVER", "ON TOKEN", "PUBLISHED", ""], &rows);
            }
        }
        SecretStorageCommand::Import {
            key_file,
            remove_from_server,
        } => {
            let key_id = default
                .context("the server has no secret storage (no m.secret_storage.default_key)")?;
            let description = client
                .account_data(&user, &format!("m.secret_storage.key.{key_id}"))?
                .with_context(|| {
                    format!("the secret storage key {key_id} has no description on the server")
                })?;
            if description.get("algorithm").and_then(Value::as_str) != Some(ssss::ALGORITHM) {
                bail!(
                    "secret storage key {} uses {}, which mxhsm does not know",
                    esc(&key_id),
                    esc(&description["algorithm"].to_string())
                );
            }
            let text = secrets::recovery_key(key_file.as_ref())?;
            let key = match StorageKey::from_recovery_key(text.expose_secret()) {
                Ok(k) => k,
                Err(recovery_error) => {
                    if description.get("passphrase").is_some() {
                        StorageKey::from_passphrase(text.expose_secret(), &description)?
                    } else {
                        return Err(recovery_error).context(
                            "not a valid recovery key (and this secret storage has no passphrase)",
                        );
                    }
                }
            };
            key.check(&description).context("nothing was imported")?;
            let published = published(client, &user)?;
            let current = store.current_keys(&user)?;
            // Decrypt and check everything before anything goes onto the token.
            let mut plan: Vec<(&str, KeyRole, Zeroizing<[u8; 32]>)> = Vec::new();
            for ((name, role), (_, pub_key)) in SECRETS.iter().zip(&published) {
                let Some(secret) = client.account_data(&user, name)? else {
                    note!("the server holds no {name}: skipped");
                    continue;
                };
                let Some(encrypted) = secret.pointer(&format!("/encrypted/{key_id}")) else {
                    note!(
                        "{name} is not encrypted with the default key {}: skipped",
                        esc(&key_id)
                    );
                    continue;
                };
                let bytes = key
                    .decrypt_key(name, encrypted)
                    .context("nothing was imported")?;
                let algorithm = role.algorithm();
                let derived = SecretKeyBytes::new(*bytes).public_key(algorithm);
                let what = match algorithm {
                    KeyAlgorithm::Ed25519 => "the published cross-signing identity",
                    KeyAlgorithm::X25519 => "the current key backup's auth_data",
                };
                match pub_key {
                    Some(p) if *p == derived => {}
                    Some(p) => bail!(
                        "refused, nothing imported: the {name} secret's public key {} is not the one in {what} ({})",
                        mxhsm::matrix::signed_json::encode_base64(&derived),
                        mxhsm::matrix::signed_json::encode_base64(p)
                    ),
                    None => bail!(
                        "refused, nothing imported: {what} has no {role} key to check the {name} secret against"
                    ),
                }
                if let Some(existing) = current.get(role) {
                    if existing.public_key == derived {
                        note!(
                            "the token already holds the {role} key {}: skipped",
                            existing.public_key_base64()
                        );
                        continue;
                    }
                    bail!(
                        "refused, nothing imported: the token already holds another {role} key ({}) for {user}; delete it first",
                        existing.public_key_base64()
                    );
                }
                plan.push((name, *role, bytes));
            }
            let mut imported: Vec<(&str, KeyInfo)> = Vec::new();
            for (name, role, bytes) in plan {
                // import() proves the key on the token with a signature or an agreement.
                match store.import(
                    &user,
                    role,
                    SecretKeyBytes::new(*bytes),
                    &KeyOptions::default(),
                ) {
                    Ok(k) => imported.push((name, k)),
                    Err(e) => {
                        for (_, k) in &imported {
                            let _ = store.delete(k);
                        }
                        return Err(e).context(
                            "the import failed; the keys imported in this run were removed again",
                        );
                    }
                }
            }
            for (name, k) in &imported {
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
            let mut removed = Vec::new();
            if remove_from_server {
                for (name, _) in &imported {
                    client.set_account_data(&user, name, &json!({}))?;
                    removed.push(*name);
                }
                if !removed.is_empty() {
                    note!(
                        "removed {} from the server: the token is now the only copy of these keys unless you keep your recovery key",
                        removed.join(", ")
                    );
                }
            }
            if global.json {
                output::json(&json!({
                    "imported": imported.iter().map(|(n, k)| json!({"secret": n, "role": k.role.as_str(), "public_key": k.public_key_base64()})).collect::<Vec<_>>(),
                    "removed_from_server": removed,
                }));
            } else {
                say!(
                    "imported {} key(s) onto {}",
                    imported.len(),
                    store.summary()
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
