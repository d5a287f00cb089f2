//! Watching the live account for what would silently undo the hardware identity.
//!
//! A client whose user keeps the cross-signing keys on a token sees them neither locally
//! nor in secret storage, so it offers to "reset" the identity; one click uploads a new
//! master key (and usually deletes the backup). [`check`] compares the account with the
//! token in one pass and reports every [`Event`]; [`Watcher`] does it again whenever a
//! long-polling sync says something changed, remembering what it saw in a state file so
//! that a restart misses nothing.
//!
//! Nothing here signs or uploads: the watch only reads, so a hostile server can at worst
//! hide or invent alarms, never make the token sign.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::sign::anchors;
use super::{Account, AccountError, PublishedIdentity};
use crate::matrix::backup::AuthDataError;
use crate::matrix::cross_signing;
use crate::matrix::keys::{Curve25519PublicKey, Ed25519PublicKey};
use crate::matrix::secret_storage as ssss;
use crate::token::KeyRole;

/// How loud an event is; the order is the order of urgency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// Our identity on the server is no longer the token's.
    IdentityReset,
    /// A user we verified now has another master key.
    VerificationViolation,
    /// The backup changed, or is no longer trusted.
    Backup,
    /// One of our devices is not cross-signed.
    UnsignedDevice,
    /// Secret storage holds copies of keys that are on the token.
    SecretStorageCopy,
}

/// Something the watch noticed. Strings from the server are untrusted: escape them when
/// printing.
#[derive(Debug, Clone)]
pub enum Event {
    /// The server publishes another master key than the token's, or none: some client
    /// reset the identity.
    IdentityReset {
        token: Ed25519PublicKey,
        published: Option<Ed25519PublicKey>,
    },
    /// The master key is the token's, but the rest of the published identity is not
    /// (a self-signing or user-signing key replaced, or not signed by the master key).
    IdentityChanged { problems: Vec<String> },
    /// A user whose master key our user-signing key signed now publishes another one.
    VerifiedUserChanged {
        user_id: String,
        verified: Ed25519PublicKey,
        now: Option<Ed25519PublicKey>,
    },
    /// The current backup version is another than last time (`None`: there is none now).
    BackupChanged {
        previous: String,
        current: Option<String>,
    },
    /// The current backup's `auth_data` is not validly signed by our master key.
    BackupUntrusted {
        version: String,
        reason: AuthDataError,
    },
    /// The current backup is encrypted to another key than the token's backup key.
    BackupNotTokenKey {
        version: String,
        key: Option<Curve25519PublicKey>,
        token: Curve25519PublicKey,
    },
    /// One of our devices is not signed by our self-signing key.
    UnsignedDevice {
        device_id: String,
        display_name: Option<String>,
        ed25519: Option<Ed25519PublicKey>,
        /// The reason, as the trust evaluation gives it.
        reason: String,
    },
    /// Secret storage still holds (encrypted) a private key of a role the token holds:
    /// whoever has the recovery key can use it without the token.
    SecretStorageCopy { secret: &'static str, role: KeyRole },
}

impl Event {
    pub fn class(&self) -> Class {
        match self {
            Event::IdentityReset { .. } | Event::IdentityChanged { .. } => Class::IdentityReset,
            Event::VerifiedUserChanged { .. } => Class::VerificationViolation,
            Event::BackupChanged { .. }
            | Event::BackupUntrusted { .. }
            | Event::BackupNotTokenKey { .. } => Class::Backup,
            Event::UnsignedDevice { .. } => Class::UnsignedDevice,
            Event::SecretStorageCopy { .. } => Class::SecretStorageCopy,
        }
    }

    /// The event's name in JSON (`"event"`).
    pub fn kind(&self) -> &'static str {
        match self {
            Event::IdentityReset { .. } => "identity_reset",
            Event::IdentityChanged { .. } => "identity_changed",
            Event::VerifiedUserChanged { .. } => "verified_user_changed",
            Event::BackupChanged { .. } => "backup_changed",
            Event::BackupUntrusted { .. } => "backup_untrusted",
            Event::BackupNotTokenKey { .. } => "backup_not_token_key",
            Event::UnsignedDevice { .. } => "unsigned_device",
            Event::SecretStorageCopy { .. } => "secret_storage_copy",
        }
    }

    /// The event as one JSON object (raw strings: JSON escapes them).
    pub fn to_json(&self) -> Value {
        let b64 = |k: &Option<Ed25519PublicKey>| k.map(|k| k.to_base64());
        let mut v = match self {
            Event::IdentityReset { token, published } => {
                json!({"token_master_key": token.to_base64(), "published_master_key": b64(published)})
            }
            Event::IdentityChanged { problems } => json!({ "problems": problems }),
            Event::VerifiedUserChanged {
                user_id,
                verified,
                now,
            } => json!({
                "user_id": user_id, "verified_master_key": verified.to_base64(),
                "published_master_key": b64(now),
            }),
            Event::BackupChanged { previous, current } => {
                json!({ "previous_backup_version": previous, "backup_version": current })
            }
            Event::BackupUntrusted { version, reason } => {
                json!({ "backup_version": version, "reason": reason.to_string() })
            }
            Event::BackupNotTokenKey {
                version,
                key,
                token,
            } => json!({
                "backup_version": version, "public_key": key.map(|k| k.to_base64()),
                "token_backup_key": token.to_base64(),
            }),
            Event::UnsignedDevice {
                device_id,
                display_name,
                ed25519,
                reason,
            } => json!({
                "device_id": device_id, "display_name": display_name,
                "ed25519": b64(ed25519), "reason": reason,
            }),
            Event::SecretStorageCopy { secret, role } => {
                json!({ "secret": secret, "role": role.as_str() })
            }
        };
        v["event"] = json!(self.kind());
        v["class"] = json!(self.class());
        v
    }

    /// What identifies the event across checks (so a long watch reports it once).
    fn key(&self) -> String {
        let subject = match self {
            Event::VerifiedUserChanged { user_id, now, .. } => {
                format!(
                    "{user_id} {}",
                    now.map(|k| k.to_base64()).unwrap_or_default()
                )
            }
            Event::UnsignedDevice { device_id, .. } => device_id.clone(),
            Event::SecretStorageCopy { secret, .. } => secret.to_string(),
            Event::BackupChanged { current, .. } => current.clone().unwrap_or_default(),
            Event::BackupUntrusted { version, .. } | Event::BackupNotTokenKey { version, .. } => {
                version.clone()
            }
            Event::IdentityReset { published, .. } => {
                published.map(|k| k.to_base64()).unwrap_or_default()
            }
            Event::IdentityChanged { problems } => problems.join("\n"),
        };
        format!("{} {subject}", self.kind())
    }
}

/// What the watch remembers between checks and runs, per account (a 0600 file).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchState {
    pub user_id: String,
    pub device_id: String,
    /// The last sync's `next_batch`, to resume from.
    pub since: Option<String>,
    /// The backup version seen last.
    pub backup_version: Option<String>,
    /// Users whose master key our user-signing key signed, with that key (base64).
    pub verified_users: BTreeMap<String, String>,
}

impl WatchState {
    /// The state at `path` if it is this account's, else a fresh one.
    pub fn load(path: &Path, account: &Account) -> Result<WatchState, AccountError> {
        let fresh = WatchState {
            user_id: account.user_id().to_string(),
            device_id: account.device_id().to_string(),
            ..WatchState::default()
        };
        let file = crate::paths::open_private_if_any(path)
            .map_err(|e| AccountError::file("cannot open", path, e))?;
        let Some(file) = file else {
            return Ok(fresh);
        };
        let state: WatchState = serde_json::from_reader(std::io::BufReader::new(file))
            .map_err(|e| AccountError::file("is damaged:", path, e))?;
        Ok(
            if state.user_id == fresh.user_id && state.device_id == fresh.device_id {
                state
            } else {
                fresh
            },
        )
    }

    /// Writes the state whole (temporary file, then rename).
    pub fn save(&self, path: &Path) -> Result<(), AccountError> {
        let text = serde_json::to_vec_pretty(self)
            .map_err(|e| AccountError::file("cannot write", path, e))?;
        if path.parent() == Some(crate::paths::dir(crate::paths::Base::Data).as_path()) {
            crate::paths::private_dir(crate::paths::Base::Data, None)
                .map_err(|e| AccountError::file("cannot write", path, e))?;
        } else if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| AccountError::file("cannot make", dir, e))?;
        }
        crate::files::write_private(path, &text)
            .map_err(|e| AccountError::file("cannot write", path, e))
    }
}

/// Where the watch state of `user_id` lives (beside the session): one file per account, so
/// logging in as another account never overwrites what the watch knew of this one.
pub fn default_state_path(user_id: &str) -> PathBuf {
    crate::paths::dir(crate::paths::Base::Data).join(format!("watch-{}.json", user_hash(user_id)))
}

/// A short name for a user's files: the first 8 bytes of the SHA-256 of the user ID, in hex.
pub(crate) fn user_hash(user_id: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(user_id.as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Remembers that our user-signing key signed `master` of `user_id`, so a later change of
/// their master key is reported.
pub fn remember_verified(
    path: &Path,
    account: &Account,
    user_id: &str,
    master: &Ed25519PublicKey,
) -> Result<(), AccountError> {
    let mut state = WatchState::load(path, account)?;
    state
        .verified_users
        .insert(user_id.to_string(), master.to_base64());
    state.save(path)
}

/// One pass over the account: our identity, our devices, the users we verified, the
/// backup and secret storage, judged against the token. Updates `state` (the backup
/// version seen, users newly found verified) and returns the events, loudest first.
pub fn check(account: &Account, state: &mut WatchState) -> Result<Vec<Event>, AccountError> {
    let me = account.user_id();
    let mut users: Vec<&str> = vec![me];
    users.extend(state.verified_users.keys().map(String::as_str));
    let answer = account.client().query_keys(&users)?;
    let (own, current) = anchors(account, &answer)?;
    let mut events = Vec::new();

    // Our identity.
    let published = PublishedIdentity::from_query(&answer, me);
    let report = cross_signing::evaluate(&own, &answer);
    if published.master != Some(own.master) {
        events.push(Event::IdentityReset {
            token: own.master,
            published: published.master,
        });
    } else if !report.own_identity.is_empty() {
        events.push(Event::IdentityChanged {
            problems: report.own_identity.clone(),
        });
    }

    // Users we verified: their master key must not have changed.
    let mut verified = BTreeMap::new();
    for (user, key) in &state.verified_users {
        let Ok(key) = Ed25519PublicKey::from_base64(key) else {
            continue;
        };
        let now = PublishedIdentity::from_query(&answer, user).master;
        if now != Some(key) {
            events.push(Event::VerifiedUserChanged {
                user_id: user.clone(),
                verified: key,
                now,
            });
        }
        verified.insert(user.clone(), key.to_base64());
    }
    // Users the report finds verified now are watched from here on (only while our own
    // identity is intact: otherwise the report's anchors are not trustworthy).
    if events.is_empty() {
        for u in &report.users {
            if let (cross_signing::Trust::Verified, Some(k)) = (&u.trust, u.master_key) {
                verified.entry(u.user_id.clone()).or_insert(k.to_base64());
            }
        }
    }
    state.verified_users = verified;

    // The backup.
    let backup = account.client().backup_version(None)?;
    let backup_public_key = backup
        .as_ref()
        .and_then(|v| Curve25519PublicKey::from_base64(v.claimed_public_key()).ok());
    match (&state.backup_version, &backup) {
        (Some(prev), Some(v)) if *prev != v.version => events.push(Event::BackupChanged {
            previous: prev.clone(),
            current: Some(v.version.clone()),
        }),
        (Some(prev), None) => events.push(Event::BackupChanged {
            previous: prev.clone(),
            current: None,
        }),
        _ => {}
    }
    if let Some(v) = &backup {
        match v.verified_key(me, &own.master) {
            Err(reason) => events.push(Event::BackupUntrusted {
                version: v.version.clone(),
                reason,
            }),
            Ok(key) => {
                let token = current
                    .get(&KeyRole::Backup)
                    .and_then(|k| k.public_key.curve25519());
                if let Some(token) = token.filter(|t| *t != key) {
                    events.push(Event::BackupNotTokenKey {
                        version: v.version.clone(),
                        key: Some(key),
                        token,
                    });
                }
            }
        }
    }
    state.backup_version = backup.map(|v| v.version);

    // Our devices.
    for d in report.devices.iter().filter(|d| d.user_id == me) {
        if !d.trust.is_verified() {
            events.push(Event::UnsignedDevice {
                device_id: d.device_id.clone(),
                display_name: d.display_name.clone(),
                ed25519: d.ed25519,
                reason: d.trust.reason().to_string(),
            });
        }
    }

    // Secret storage: an encrypted copy of a key the token holds. The watch cannot read
    // the secret, so it does not call it a copy once the server shows another key for the
    // role: after a reset (or a backup made under another key) the client that did it
    // stored its own new key there, and the reset's or the backup's event says what
    // happened. With no other key shown (nothing published, no backup), it is a copy.
    let token_key = |role: KeyRole| current.get(&role).map(|k| &k.public_key);
    let other_ed25519 = |shown: Option<Ed25519PublicKey>, role| {
        shown.is_some_and(|k| Some(k) != token_key(role).and_then(|t| t.ed25519()))
    };
    let others_key = |role: KeyRole| match role {
        KeyRole::Master => other_ed25519(published.master, role),
        KeyRole::SelfSigning => other_ed25519(published.self_signing, role),
        KeyRole::UserSigning => other_ed25519(published.user_signing, role),
        // The backup's key as auth_data states it, signed or not.
        KeyRole::Backup => backup_public_key
            .is_some_and(|k| Some(k) != token_key(role).and_then(|t| t.curve25519())),
        KeyRole::Audit => true,
    };
    for (secret, role) in [
        (ssss::MASTER, KeyRole::Master),
        (ssss::SELF_SIGNING, KeyRole::SelfSigning),
        (ssss::USER_SIGNING, KeyRole::UserSigning),
        (ssss::BACKUP, KeyRole::Backup),
    ] {
        if !current.contains_key(&role) || others_key(role) {
            continue;
        }
        let stored = account.client().account_data(me, secret)?;
        if stored
            .as_ref()
            .and_then(|v| v.get("encrypted"))
            .and_then(Value::as_object)
            .is_some_and(|m| !m.is_empty())
        {
            events.push(Event::SecretStorageCopy { secret, role });
        }
    }
    events.sort_by_key(Event::class);
    Ok(events)
}

/// The sync filter of the watch: no rooms, no presence; only the account data that holds
/// secrets. Device-list changes come with every sync.
fn sync_filter() -> Value {
    json!({
        "room": { "rooms": [] },
        "presence": { "not_types": ["*"] },
        "account_data": { "types": [
            ssss::MASTER, ssss::SELF_SIGNING, ssss::USER_SIGNING, ssss::BACKUP,
        ]},
    })
}

/// How often the whole account is checked again when sync reports nothing (a backup
/// replaced, for one, shows in no sync).
const RECHECK: Duration = Duration::from_secs(300);

/// The longest wait between two attempts while the server is unreachable.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// A long-running watch: checks now, then again whenever a sync says our devices, keys
/// or secrets changed (or every few minutes), and reports each event once.
pub struct Watcher<'a> {
    account: &'a Account,
    state_path: PathBuf,
    state: WatchState,
    /// The events of the last check, by their key: reported when they first appear.
    seen: std::collections::BTreeSet<String>,
    last_check: Option<Instant>,
    /// Verification requests from our own devices that syncs brought, oldest first.
    requests: Vec<Value>,
}

/// What one round of [`Watcher::step`] came to.
#[derive(Debug)]
pub enum Step {
    /// Events that are new since the last check (possibly none).
    Events(Vec<Event>),
    /// The server could not be reached or answered badly: the watch waits and goes on.
    Unreachable {
        error: AccountError,
        retry_in: Duration,
    },
}

impl<'a> Watcher<'a> {
    pub fn new(account: &'a Account, state_path: &Path) -> Result<Watcher<'a>, AccountError> {
        Ok(Watcher {
            state: WatchState::load(state_path, account)?,
            account,
            state_path: state_path.to_path_buf(),
            seen: Default::default(),
            last_check: None,
            requests: Vec::new(),
        })
    }

    /// One round: a check if one is due, else a sync that waits for news (then a check if
    /// it brought any). The state is saved after each round that changed it.
    pub fn step(&mut self, failures: u32) -> Step {
        match self.round() {
            Ok(events) => Step::Events(events),
            Err(error) => Step::Unreachable {
                error,
                retry_in: (Duration::from_secs(1) * 2u32.saturating_pow(failures.min(6)))
                    .min(MAX_BACKOFF),
            },
        }
    }

    /// The verification requests received since the last call (to answer with
    /// [`crate::account::verify::answer`], or to report).
    pub fn take_requests(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.requests)
    }

    /// Where the sync stands, and where to go on from after something else synced.
    pub fn since(&self) -> Option<String> {
        self.state.since.clone()
    }

    pub fn set_since(&mut self, since: Option<String>) -> Result<(), AccountError> {
        self.state.since = since;
        self.state.save(&self.state_path)
    }

    fn round(&mut self) -> Result<Vec<Event>, AccountError> {
        let due = self.last_check.is_none_or(|t| t.elapsed() >= RECHECK);
        let news = if due {
            true
        } else {
            let answer = self
                .account
                .client()
                .sync(self.state.since.as_deref(), &sync_filter())?;
            let news = sync_has_news(&answer, self.account.user_id(), &self.state);
            let me = self.account.user_id();
            self.requests.extend(
                answer
                    .pointer("/to_device/events")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter(|e| crate::account::verify::is_own_request(e, me))
                    .cloned(),
            );
            if let Some(next) = answer.get("next_batch").and_then(Value::as_str) {
                self.state.since = Some(next.to_string());
                self.state.save(&self.state_path)?;
            }
            news
        };
        if !news {
            return Ok(Vec::new());
        }
        let events = check(self.account, &mut self.state)?;
        self.last_check = Some(Instant::now());
        self.state.save(&self.state_path)?;
        let keys: std::collections::BTreeSet<String> = events.iter().map(Event::key).collect();
        let new = events
            .into_iter()
            .filter(|e| !self.seen.contains(&e.key()))
            .collect();
        self.seen = keys;
        Ok(new)
    }
}

/// Whether a sync answer says something the watch looks at changed: the device list of
/// our user or of a user we verified, or secret account data.
fn sync_has_news(answer: &Value, me: &str, state: &WatchState) -> bool {
    let changed = answer
        .pointer("/device_lists/changed")
        .and_then(Value::as_array)
        .is_some_and(|users| {
            users
                .iter()
                .filter_map(Value::as_str)
                .any(|u| u == me || state.verified_users.contains_key(u))
        });
    let account_data = answer
        .pointer("/account_data/events")
        .and_then(Value::as_array)
        .is_some_and(|e| !e.is_empty());
    changed || account_data
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn news_is_our_devices_or_verified_users_or_secrets() {
        let mut state = WatchState::default();
        state.verified_users.insert("@bob:h".into(), String::new());
        let sync = |v: Value| sync_has_news(&v, "@me:h", &state);
        assert!(!sync(json!({"next_batch": "s1"})));
        assert!(!sync(json!({"device_lists": {"changed": ["@carol:h"]}})));
        assert!(sync(json!({"device_lists": {"changed": ["@me:h"]}})));
        assert!(sync(json!({"device_lists": {"changed": ["@bob:h"]}})));
        assert!(sync(
            json!({"account_data": {"events": [{"type": ssss::MASTER}]}})
        ));
        // Junk where lists should be is no news (and no panic).
        assert!(!sync(
            json!({"device_lists": {"changed": "@me:h"}, "account_data": 7})
        ));
    }

    #[test]
    fn classes_order_by_urgency() {
        assert!(Class::IdentityReset < Class::VerificationViolation);
        assert!(Class::VerificationViolation < Class::Backup);
        assert!(Class::Backup < Class::UnsignedDevice);
        assert!(Class::UnsignedDevice < Class::SecretStorageCopy);
    }
}
