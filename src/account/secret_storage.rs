//! Moving the user's existing keys from secret storage onto the token.
//!
//! The secrets (cross-signing seeds, the backup key) are decrypted with the recovery key
//! or passphrase, each checked against what the server publishes (the identity, signed by
//! its master key; the current backup's public key), and only when every one checks out are
//! they imported, each proven on the token; a failed import removes what this run put
//! there. Removing them from the server comes last, and only on request.

use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use zeroize::Zeroizing;

use super::{Account, AccountError, PublishedIdentity};
use crate::matrix::keys::{Curve25519PublicKey, PublicKey};
use crate::matrix::secret_storage::{self as ssss, SecretStorageError, StorageKey};
use crate::token::{KeyInfo, KeyOptions, KeyRole, SecretKeyBytes};

/// The secrets mxhsm moves, and the role each one's key has on the token.
pub const SECRETS: [(&str, KeyRole); 4] = [
    (ssss::MASTER, KeyRole::Master),
    (ssss::SELF_SIGNING, KeyRole::SelfSigning),
    (ssss::USER_SIGNING, KeyRole::UserSigning),
    (ssss::BACKUP, KeyRole::Backup),
];

/// The public keys the server publishes for the secrets, in the order of [`SECRETS`].
fn published(account: &Account) -> Result<[Option<PublicKey>; 4], AccountError> {
    let me = account.user_id();
    let q = account.client().query_keys(&[me])?;
    let p = PublishedIdentity::from_query(&q, me);
    let backup = account
        .client()
        .backup_version(None)?
        .and_then(|v| Curve25519PublicKey::from_base64(v.claimed_public_key()).ok());
    Ok([
        p.master.map(PublicKey::Ed25519),
        p.self_signing.map(PublicKey::Ed25519),
        p.user_signing.map(PublicKey::Ed25519),
        backup.map(PublicKey::Curve25519),
    ])
}

/// One secret as `status` sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretStatus {
    pub name: &'static str,
    pub role: KeyRole,
    /// The server holds it, encrypted with the default key.
    pub on_server: bool,
    pub token_key: Option<PublicKey>,
    pub published_key: Option<PublicKey>,
}

impl SecretStatus {
    /// Whether the token's key is the published one (`None`: one of them is missing).
    pub fn matches(&self) -> Option<bool> {
        Some(self.token_key? == self.published_key?)
    }
}

/// What [`status`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The default secret-storage key's ID (untrusted text).
    pub default_key: Option<String>,
    pub secrets: Vec<SecretStatus>,
}

fn default_key(account: &Account) -> Result<Option<String>, AccountError> {
    Ok(account
        .client()
        .account_data(account.user_id(), "m.secret_storage.default_key")?
        .and_then(|v| v.get("key").and_then(Value::as_str).map(str::to_string)))
}

/// Which secrets the server holds, which keys the token holds, whether they match.
pub fn status(account: &Account) -> Result<Status, AccountError> {
    let me = account.user_id();
    let default = default_key(account)?;
    let published = published(account)?;
    let current = account.store().current_keys(me)?;
    let mut secrets = Vec::new();
    for ((name, role), pub_key) in SECRETS.iter().zip(published) {
        let on_server = match (account.client().account_data(me, name)?, &default) {
            (Some(v), Some(id)) => v.pointer(&format!("/encrypted/{id}")).is_some(),
            _ => false,
        };
        secrets.push(SecretStatus {
            name,
            role: *role,
            on_server,
            token_key: current.get(role).map(|k| k.public_key),
            published_key: pub_key,
        });
    }
    Ok(Status {
        default_key: default,
        secrets,
    })
}

/// What [`import`] did.
#[derive(Debug, Clone)]
pub struct Imported {
    /// (secret name, the key now on the token)
    pub imported: Vec<(&'static str, KeyInfo)>,
    /// (secret name, why it was left alone)
    pub skipped: Vec<(&'static str, String)>,
    /// Secrets removed from the server's account data.
    pub removed: Vec<&'static str>,
}

/// Imports the keys in secret storage onto the token. `key_text` (a recovery key or a
/// passphrase) is asked for after the secret-storage description was found and checked.
pub fn import(
    account: &Account,
    key_text: &dyn Fn() -> Result<SecretString, AccountError>,
    remove_from_server: bool,
) -> Result<Imported, AccountError> {
    let me = account.user_id();
    let client = account.client();
    let store = account.keys();
    let key_id = default_key(account)?.ok_or_else(|| {
        AccountError::Refused(
            "the server has no secret storage (no m.secret_storage.default_key)".into(),
        )
    })?;
    let description = client
        .account_data(me, &format!("m.secret_storage.key.{key_id}"))?
        .ok_or_else(|| {
            AccountError::Refused(format!(
                "the secret storage key {} has no description on the server",
                crate::text::escape(&key_id)
            ))
        })?;
    if description.get("algorithm").and_then(Value::as_str) != Some(ssss::ALGORITHM) {
        return Err(AccountError::Refused(format!(
            "secret storage key {} uses {}, which mxhsm does not know",
            crate::text::escape(&key_id),
            crate::text::escape(&description["algorithm"].to_string())
        )));
    }
    let text = key_text()?;
    let key = match StorageKey::from_recovery_key(text.expose_secret()) {
        Ok(k) => k,
        Err(recovery_error) => {
            if description.get("passphrase").is_some() {
                StorageKey::from_passphrase(text.expose_secret(), &description)
                    .map_err(nothing_imported)?
            } else {
                return Err(AccountError::Refused(format!(
                    "not a valid recovery key ({recovery_error}), and this secret storage has no passphrase; nothing was imported"
                )));
            }
        }
    };
    key.check(&description).map_err(nothing_imported)?;
    let published = published(account)?;
    let current = store.current_keys(me)?;
    let mut outcome = Imported {
        imported: Vec::new(),
        skipped: Vec::new(),
        removed: Vec::new(),
    };
    // Secrets whose key the token holds already (checked like the ones imported).
    let mut already_held: Vec<&'static str> = Vec::new();
    // Decrypt and check everything before anything goes onto the token.
    let mut plan: Vec<(&'static str, KeyRole, Zeroizing<[u8; 32]>)> = Vec::new();
    for ((name, role), pub_key) in SECRETS.iter().zip(published) {
        let Some(secret) = client.account_data(me, name)? else {
            outcome
                .skipped
                .push((name, "the server holds no such secret".into()));
            continue;
        };
        let Some(encrypted) = secret.pointer(&format!("/encrypted/{key_id}")) else {
            outcome.skipped.push((
                name,
                "it is not encrypted with the default secret-storage key".into(),
            ));
            continue;
        };
        let bytes = key.decrypt_key(name, encrypted).map_err(nothing_imported)?;
        let algorithm = role.algorithm();
        let derived = SecretKeyBytes::new(*bytes).public_key(algorithm);
        let what = match algorithm {
            crate::token::KeyAlgorithm::Ed25519 => "the published cross-signing identity",
            crate::token::KeyAlgorithm::X25519 => "the current key backup's auth_data",
        };
        match pub_key {
            Some(p) if p == derived => {}
            Some(p) => {
                return Err(AccountError::Refused(format!(
                    "refused, nothing imported: the {name} secret's public key {derived} is not the one in {what} ({p})"
                )));
            }
            // Without a key backup there is nothing to check the backup key against, and
            // nothing it would decrypt: it is left where it is, the rest goes on.
            None if *role == KeyRole::Backup => {
                outcome.skipped.push((
                    name,
                    "the server has no key backup to check it against (import it once a backup encrypted to it exists)".into(),
                ));
                continue;
            }
            None => {
                return Err(AccountError::Refused(format!(
                    "refused, nothing imported: {what} has no {role} key to check the {name} secret against"
                )));
            }
        }
        if let Some(existing) = current.get(role) {
            if existing.public_key == derived {
                outcome
                    .skipped
                    .push((name, format!("the token already holds this {role} key")));
                already_held.push(name);
                continue;
            }
            return Err(AccountError::Refused(format!(
                "refused, nothing imported: the token already holds another {role} key ({}) for {}; delete it first",
                existing.public_key_base64(),
                crate::text::escape(me)
            )));
        }
        plan.push((name, *role, bytes));
    }
    for (name, role, bytes) in plan {
        // import() proves the key on the token with a signature or an agreement.
        match store.import(
            me,
            role,
            SecretKeyBytes::new(*bytes),
            &KeyOptions::default(),
        ) {
            Ok(k) => outcome.imported.push((name, k)),
            Err(e) => {
                for (_, k) in &outcome.imported {
                    let _ = store.delete(k);
                }
                return Err(AccountError::Refused(format!(
                    "the import failed ({e}); the keys imported in this run were removed again"
                )));
            }
        }
    }
    if remove_from_server {
        // What the token now holds, imported in this run or before: each checked above
        // against the published key, and on the token with that same public key.
        let held: Vec<&'static str> = SECRETS
            .iter()
            .map(|(name, _)| *name)
            .filter(|name| {
                outcome.imported.iter().any(|(n, _)| n == name) || already_held.contains(name)
            })
            .collect();
        for name in held {
            client.set_account_data(me, name, &json!({}))?;
            outcome.removed.push(name);
        }
    }
    Ok(outcome)
}

/// A secret-storage error, for which nothing was imported.
fn nothing_imported(e: SecretStorageError) -> AccountError {
    AccountError::Refused(format!("{e}; nothing was imported"))
}
