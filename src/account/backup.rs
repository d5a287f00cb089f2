//! Server-side key backup with the backup key on the token: create a version, check it,
//! upload sessions into it. Restoring is in [`super::restore`].
//!
//! `create` never drops a current backup for a new one unless asked (`replace`, after a
//! callback saw the version and its key count); a current backup that already uses the
//! token's key is kept, with its `auth_data` re-signed when it is not signed by our master
//! key. Every new version and every upload is read back.

use std::path::Path;

use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use zeroize::Zeroizing;

use super::sign::{anchors, take_key};
use super::{Account, AccountError, PublishedIdentity};

use crate::matrix::backup::{self, BackupVersion};
use crate::matrix::device::DeviceSigner;
use crate::matrix::key_export;
use crate::matrix::keys::{Curve25519PublicKey, Ed25519PublicKey};
use crate::token::{KeyInfo, KeyOptions, KeyRole, SecretKeyBytes, TokenSigner};

/// Sessions per `PUT /room_keys/keys` request.
const UPLOAD_BATCH: usize = 500;

/// The current backup version as the server describes it, judged against the token.
#[derive(Debug, Clone)]
pub struct BackupStatus {
    pub version: String,
    pub algorithm: String,
    pub count: u64,
    /// The backup's public key as `auth_data` gives it (untrusted text).
    pub public_key: String,
    /// Whether `auth_data` carries a valid signature of the token's master key (`Err`: why
    /// not).
    pub signed_by_master: Result<(), backup::AuthDataError>,
    /// The token's backup key, if it has one.
    pub token_key: Option<Curve25519PublicKey>,
}

impl BackupStatus {
    pub fn is_token_key(&self) -> bool {
        self.token_key
            .is_some_and(|k| k.to_base64() == self.public_key.trim_end_matches('='))
    }

    /// Whether the backup is not fully ours (a problem to report).
    pub fn has_problems(&self) -> bool {
        self.signed_by_master.is_err() || !self.is_token_key()
    }
}

/// The current backup version, if there is one.
pub(crate) fn current_version(account: &Account) -> Result<Option<BackupVersion>, AccountError> {
    Ok(account.client().backup_version(None)?)
}

/// The backup version `v` judged against the token's master key and backup key.
fn describe(
    me: &str,
    v: &BackupVersion,
    master: &Ed25519PublicKey,
    token_key: Option<Curve25519PublicKey>,
) -> BackupStatus {
    BackupStatus {
        version: v.version.clone(),
        algorithm: v.algorithm.clone(),
        count: v.count,
        public_key: v.claimed_public_key().to_string(),
        signed_by_master: v.verified_key(me, master).map(|_| ()),
        token_key,
    }
}

/// The token's master key (required) and backup key (if any), from one listing.
fn token_keys(account: &Account) -> Result<(KeyInfo, Option<KeyInfo>), AccountError> {
    let mut current = account.store().current_keys(account.user_id())?;
    let master = take_key(account, &mut current, KeyRole::Master)?;
    Ok((master, current.remove(&KeyRole::Backup)))
}

/// The current backup, judged against the token; `None` when the server has none.
pub fn status(account: &Account) -> Result<Option<BackupStatus>, AccountError> {
    let Some(v) = current_version(account)? else {
        return Ok(None);
    };
    let (master, backup_key) = token_keys(account)?;
    Ok(Some(describe(
        account.user_id(),
        &v,
        &master.ed25519()?,
        backup_key.map(|k| k.curve25519()).transpose()?,
    )))
}

/// A backup `create` would drop, shown before anything is done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupReplacement {
    pub version: String,
    pub count: u64,
    pub public_key: String,
    /// Whether its `auth_data` is signed by our master key (clients trust it today).
    pub trusted: bool,
}

/// What [`create`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    pub version: String,
    pub public_key: Curve25519PublicKey,
    /// The current backup already used the token's key: no new version.
    pub reused: bool,
    /// Its `auth_data` was signed again by our master key (it was not validly signed).
    pub resigned: bool,
    /// How the token's backup key came to be.
    pub key_source: super::identity::KeySource,
    pub replaced: Option<BackupReplacement>,
}

/// Creates a backup version whose key is on the token (generated, or `import`ed), with
/// `auth_data` signed by the master key on the token and by mxhsm's device; or keeps the
/// current one when it already uses the token's key.
pub fn create(
    account: &Account,
    import: Option<SecretKeyBytes>,
    replace: bool,
    confirm_replace: &mut dyn FnMut(&BackupReplacement) -> Result<(), AccountError>,
) -> Result<Created, AccountError> {
    let me = account.user_id().to_string();
    let store = account.keys();
    // A backup is trusted through our master key: it must be published, and ours.
    let answer = account.client().query_keys(&[&me])?;
    let (own, mut current) = anchors(account, &answer)?;
    if PublishedIdentity::from_query(&answer, &me).master != Some(own.master) {
        return Err(AccountError::IdentityNotOurs {
            user_id: me.clone(),
            problems: vec![
                "the server does not publish the token's master key, so clients could not trust the backup's auth_data".into(),
            ],
        });
    }
    let master = take_key(account, &mut current, KeyRole::Master)?;
    let token_key = current.remove(&KeyRole::Backup);
    if import.is_some() && token_key.is_some() {
        return Err(AccountError::Refused(format!(
            "the token already holds a backup key for {}; delete it before importing another",
            crate::text::escape(&me)
        )));
    }
    let current = current_version(account)?;
    let mut replaced = None;
    if let Some(v) = &current {
        let version = &v.version;
        let status = describe(
            &me,
            v,
            &own.master,
            token_key.as_ref().map(|k| k.curve25519()).transpose()?,
        );
        if let Some(key) = token_key.as_ref().filter(|_| status.is_token_key()) {
            let mut resigned = false;
            if status.signed_by_master.is_err() {
                let auth = signed_auth_data(account, &master, key)?;
                account
                    .client()
                    .update_backup_version(version, backup::ALGORITHM, &auth)?;
                read_back(account, version, &key.curve25519()?, &own.master)?;
                resigned = true;
            }
            set_backup_preference(account)?;
            return Ok(Created {
                version: version.clone(),
                public_key: key.curve25519()?,
                reused: true,
                resigned,
                key_source: super::identity::KeySource::Existing,
                replaced: None,
            });
        }
        let r = BackupReplacement {
            version: version.clone(),
            count: status.count,
            public_key: status.public_key.clone(),
            trusted: status.signed_by_master.is_ok(),
        };
        if !replace {
            return Err(AccountError::BackupExists {
                version: r.version,
                count: r.count,
                public_key: r.public_key,
            });
        }
        confirm_replace(&r)?;
        replaced = Some(r);
    }
    let (key, key_source) = match (token_key, import) {
        (Some(k), None) => (k, super::identity::KeySource::Existing),
        (None, Some(secret)) => (
            store.import(&me, KeyRole::Backup, secret, &KeyOptions::default())?,
            super::identity::KeySource::Imported,
        ),
        (None, None) => (
            store.generate(&me, KeyRole::Backup, &KeyOptions::default())?,
            super::identity::KeySource::Generated,
        ),
        (Some(_), Some(_)) => unreachable!("refused above"),
    };
    let auth = signed_auth_data(account, &master, &key)?;
    let version = account
        .client()
        .create_backup_version(backup::ALGORITHM, &auth)?;
    read_back(account, &version, &key.curve25519()?, &own.master)?;
    set_backup_preference(account)?;
    Ok(Created {
        version,
        public_key: key.curve25519()?,
        reused: false,
        resigned: false,
        key_source,
        replaced,
    })
}

/// Account data that tells other clients the user wants key backup (MSC4287's
/// `m.key_backup`, and the reversed-sense form Element reads today), so that a new login of
/// Element X uses this backup instead of making its own. Read back.
fn set_backup_preference(account: &Account) -> Result<(), AccountError> {
    let me = account.user_id();
    for (kind, content) in [
        (BACKUP_PREFERENCE, json!({"enabled": true})),
        (BACKUP_PREFERENCE_ELEMENT, json!({"disabled": false})),
    ] {
        account.client().set_account_data(me, kind, &content)?;
        if account.client().account_data(me, kind)?.as_ref() != Some(&content) {
            return Err(AccountError::ReadBack(format!(
                "the account data {kind} is not served as set"
            )));
        }
    }
    Ok(())
}

/// MSC4287: whether new logins should use key backup.
pub const BACKUP_PREFERENCE: &str = "m.key_backup";
/// The same preference as Element clients store it today (reversed sense).
pub const BACKUP_PREFERENCE_ELEMENT: &str = "m.org.matrix.custom.backup_disabled";

/// `auth_data` for `key`, signed by the master key `master` on the token and by mxhsm's
/// device.
fn signed_auth_data(
    account: &Account,
    master: &KeyInfo,
    key: &KeyInfo,
) -> Result<Value, AccountError> {
    let me = account.user_id();
    let store = account.keys();
    let master = TokenSigner::new(store, master.clone())?;
    let (olm, _) = account.own_device_keys()?;
    let device = DeviceSigner(&olm);
    Ok(backup::auth_data(
        me,
        &key.curve25519()?,
        &master,
        Some((account.device_id(), &device)),
    )?)
}

/// The version must now be served with our key, signed by our master key.
fn read_back(
    account: &Account,
    version: &str,
    public_key: &Curve25519PublicKey,
    master: &Ed25519PublicKey,
) -> Result<(), AccountError> {
    let served = account.client().backup_version(Some(version))?;
    let ok = served.as_ref().is_some_and(|v| {
        v.version == version
            && v.algorithm == backup::ALGORITHM
            && v.verified_key(account.user_id(), master).ok() == Some(*public_key)
    });
    if ok {
        Ok(())
    } else {
        Err(AccountError::ReadBack(format!(
            "backup version {version} is not served with the token's key and our master key's signature"
        )))
    }
}

/// The format of a key file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    /// The encrypted `MEGOLM SESSION DATA` file Element and other clients import.
    Export,
    /// The plain JSON array of sessions (unencrypted).
    Json,
}

/// What [`upload`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploaded {
    pub version: String,
    pub sessions: usize,
}

/// Puts the sessions of `file` into the current backup, after checking that its
/// `auth_data` is signed by our master key and encrypted to the token's backup key (when
/// the token has one). `progress` is told the sessions uploaded so far.
pub fn upload(
    account: &Account,
    file: &Path,
    format: FileFormat,
    passphrase: &dyn Fn() -> Result<SecretString, AccountError>,
    progress: &dyn Fn(usize, usize),
) -> Result<Uploaded, AccountError> {
    let me = account.user_id();
    let v = current_version(account)?.ok_or(AccountError::NoBackup)?;
    let version = v.version.clone();
    let (master, backup_key) = token_keys(account)?;
    let master = master.ed25519()?;
    let public = v.verified_key(me, &master).map_err(|e| {
        AccountError::Refused(format!(
            "refusing to upload: the auth_data of backup version {} is not signed by your master key {master} ({}); the server may have swapped in another backup key",
            crate::text::escape(&version),
            crate::text::escape(&e.to_string())
        ))
    })?;
    if let Some(k) = backup_key
        && k.public_key.curve25519() != Some(public)
    {
        return Err(AccountError::Refused(format!(
            "refusing to upload: backup version {} is encrypted to {}, not to the token's backup key {}",
            crate::text::escape(&version),
            public,
            k.public_key_base64()
        )));
    }
    let text = Zeroizing::new(
        std::fs::read_to_string(file).map_err(|e| AccountError::file("cannot read", file, e))?,
    );
    let json_text = match format {
        FileFormat::Export => key_export::decrypt(&text, passphrase()?.expose_secret())?,
        FileFormat::Json => text,
    };
    let sessions: Vec<Value> = serde_json::from_str(&json_text)
        .map_err(|e| AccountError::file("is not a JSON array of sessions:", file, e))?;
    let mut rooms = serde_json::Map::new();
    let mut batch_last: Option<(String, String, Value)> = None;
    let mut count = 0usize;
    let total = sessions.len();
    let put = |rooms: &mut serde_json::Map<String, Value>,
               last: &mut Option<(String, String, Value)>|
     -> Result<(), AccountError> {
        if rooms.is_empty() {
            return Ok(());
        }
        account
            .client()
            .put_backup_keys(&version, &Value::Object(std::mem::take(rooms)))?;
        // Read back one session of the batch: the server must serve what we sent, or the
        // copy it kept because it starts at the same or an earlier message (the spec's
        // merge rule).
        if let Some((room, session, entry)) = last.take() {
            let served = account.client().backup_session(&version, &room, &session)?;
            let index = |e: &Value| e.get("first_message_index").and_then(Value::as_u64);
            let kept = served.as_ref().is_some_and(|s| {
                s.get("session_data") == entry.get("session_data")
                    || index(s).is_some_and(|i| Some(i) <= index(&entry))
            });
            if !kept {
                return Err(AccountError::ReadBack(format!(
                    "session {session} of room {room} is not in backup version {version} as uploaded"
                )));
            }
        }
        Ok(())
    };
    for (i, s) in sessions.iter().enumerate() {
        let field = |name: &str| {
            s.get(name).and_then(Value::as_str).ok_or_else(|| {
                AccountError::Input(format!("session {i} in {} has no {name}", file.display()))
            })
        };
        let room_id = field("room_id")?;
        let session_id = field("session_id")?;
        let session_key = field("session_key")?;
        let inbound = backup::import_session_key(session_id, session_key).map_err(|e| {
            AccountError::Input(match e {
                backup::BackupError::SessionIdMismatch { actual, .. } => format!(
                    "session {} in {}: its session key belongs to {actual}",
                    crate::text::escape(session_id),
                    file.display()
                ),
                e => format!(
                    "session {} in {}: {e}",
                    crate::text::escape(session_id),
                    file.display()
                ),
            })
        })?;
        let plaintext = Zeroizing::new(backup::backup_plaintext(s)?);
        let data = backup::encrypt(&public, &plaintext)?.to_json();
        let forwarded = s
            .get("forwarding_curve25519_key_chain")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        let entry = json!({
            "first_message_index": inbound.first_known_index(),
            "forwarded_count": forwarded,
            "is_verified": false,
            "session_data": data,
        });
        batch_last = Some((room_id.to_string(), session_id.to_string(), entry.clone()));
        rooms
            .entry(room_id.to_string())
            .or_insert_with(|| json!({"sessions": {}}))["sessions"][session_id] = entry;
        count += 1;
        if count.is_multiple_of(UPLOAD_BATCH) {
            put(&mut rooms, &mut batch_last)?;
            progress(count, total);
        }
    }
    put(&mut rooms, &mut batch_last)?;
    progress(count, total);
    Ok(Uploaded {
        version,
        sessions: count,
    })
}
