//! The flows, as a library: log in, create and publish the identity, sign devices and
//! users, key backup. An [`Account`] holds a session, a homeserver client and a token
//! [`Store`]; each flow returns a typed result and takes what only the user can give (a
//! confirmation of exactly these devices, a password) as a value or a callback. Nothing
//! here prints or prompts.
//!
//! The rules every flow keeps (docs/threat-model.md says why):
//!
//! * **Sign exactly what was shown.** An object is fetched once; the user confirms what
//!   that fetch returned; the token signs the canonical JSON of that same object. mxhsm's
//!   own device is signed from its own Olm account, never from the server's copy, and a
//!   server copy that differs is reported as tampering.
//! * **Read back.** Every upload is fetched again and checked: the signature is there and
//!   verifies, the published keys are the token's, the backup's `auth_data` is ours.
//! * **Replace nothing unasked.** A published identity that is not the token's, a current
//!   backup, a live session: the flow refuses with what exists, unless the caller passes
//!   `replace`, and then a callback is shown exactly what will be lost first.
//! * **Check before the token.** Everything that can be checked without the token (the
//!   server's state, that the token holds the key needed) is checked before the first
//!   private-key operation, which is when the PIN is asked for.

pub mod accounts;
pub mod audit;
pub mod backup;
pub mod bench;
pub mod doctor;
pub mod identity;
pub mod login;
pub mod policy;
pub mod restore;
pub mod secret_storage;
pub mod sign;
pub mod verify;
pub mod watch;

use serde_json::Value;

use crate::homeserver::{Client, ClientOptions, HomeserverError, Session};
use crate::matrix::backup::BackupError;
use crate::matrix::cross_signing;
use crate::matrix::device;
use crate::matrix::key_export::KeyExportError;
use crate::matrix::keys::Ed25519PublicKey;
use crate::matrix::signed_json::SignedJsonError;
use crate::text::escape;
use crate::token::{KeyRole, Store, TokenError};

/// A logged-in account with its token.
pub struct Account {
    session: Session,
    client: Client,
    store: Store,
}

impl std::fmt::Debug for Account {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Account")
            .field("session", &self.session)
            .field("store", &self.store)
            .finish()
    }
}

impl Account {
    /// An account for `session`, with its keys on `store`.
    pub fn open(
        session: Session,
        store: Store,
        options: &ClientOptions,
    ) -> Result<Account, AccountError> {
        Self::try_open(session, store, options).map_err(|failed| failed.0)
    }

    /// [`Account::open`], giving the store back when it fails (to use it for another
    /// account on the same token).
    pub fn try_open(
        session: Session,
        store: Store,
        options: &ClientOptions,
    ) -> Result<Account, Box<(AccountError, Store)>> {
        match Client::for_session(&session, options) {
            Ok(client) => Ok(Account {
                session,
                client,
                store,
            }),
            Err(e) => Err(Box::new((e.into(), store))),
        }
    }

    pub fn user_id(&self) -> &str {
        &self.session.user_id
    }

    pub fn device_id(&self) -> &str {
        &self.session.device_id
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Gives the token back (to open the next account on the same token without a second
    /// login).
    pub fn into_store(self) -> Store {
        self.store
    }

    /// The token's keys ([`Self::store`] as a [`crate::token::KeyStore`]).
    pub fn keys(&self) -> &dyn crate::token::KeyStore {
        &*self.store
    }

    /// mxhsm's own device as its Olm account makes it (self-signed).
    fn own_device_keys(&self) -> Result<(vodozemac::olm::Account, Value), AccountError> {
        let account = olm_account(&self.session)?;
        let keys = device::device_keys(&account, self.user_id(), self.device_id())?;
        Ok((account, keys))
    }
}

/// The Olm account of `session` (mxhsm's device key).
pub fn olm_account(session: &Session) -> Result<vodozemac::olm::Account, AccountError> {
    use secrecy::ExposeSecret;
    let pickle = session
        .olm_account
        .as_ref()
        .ok_or(AccountError::NoOlmDevice)?;
    let pickle: vodozemac::olm::AccountPickle =
        serde_json::from_str(pickle.expose_secret()).map_err(|_| AccountError::NoOlmDevice)?;
    Ok(vodozemac::olm::Account::from_pickle(pickle))
}

/// The cross-signing identity the server publishes for a user, from one `/keys/query`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishedIdentity {
    pub master: Option<Ed25519PublicKey>,
    pub self_signing: Option<Ed25519PublicKey>,
    pub user_signing: Option<Ed25519PublicKey>,
}

impl PublishedIdentity {
    /// Reads the published keys of `user` from a `/keys/query` answer; a malformed key
    /// object counts as absent. The SSK and USK count only when signed by the master key.
    pub fn from_query(answer: &Value, user: &str) -> PublishedIdentity {
        let object = |field: &str| answer.get(field).and_then(|m| m.get(user));
        let key = |field: &str, usage| {
            object(field).and_then(|o| cross_signing::parse_key_object(o, user, usage).ok())
        };
        let master = key("master_keys", KeyRole::Master);
        let signed_by_master = |field: &str, usage| {
            let k = key(field, usage)?;
            let m = master.as_ref()?;
            crate::matrix::signed_json::verify_json(object(field)?, user, &m.key_id(), m)
                .ok()
                .map(|_| k)
        };
        PublishedIdentity {
            self_signing: signed_by_master("self_signing_keys", KeyRole::SelfSigning),
            user_signing: signed_by_master("user_signing_keys", KeyRole::UserSigning),
            master,
        }
    }

    pub fn get(&self, role: KeyRole) -> Option<&Ed25519PublicKey> {
        match role {
            KeyRole::Master => self.master.as_ref(),
            KeyRole::SelfSigning => self.self_signing.as_ref(),
            KeyRole::UserSigning => self.user_signing.as_ref(),
            KeyRole::Backup | KeyRole::Audit => None,
        }
    }
}

/// What a flow could not do, or refused to do.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Homeserver(#[from] HomeserverError),
    #[error(transparent)]
    SignedJson(#[from] SignedJsonError),
    #[error(transparent)]
    Backup(#[from] BackupError),
    #[error(transparent)]
    KeyExport(#[from] KeyExportError),
    #[error(transparent)]
    SecretStorage(#[from] crate::matrix::secret_storage::SecretStorageError),
    #[error("the session has no Olm device (it was made by an older mxhsm, or damaged)")]
    NoOlmDevice,
    #[error(
        "the server already publishes the cross-signing identity {} for {}, and {}: nothing was changed",
        published, escape(.user_id),
        match .on_token { Some(k) => format!("the token's master key is another one ({k})"), None => "the token holds no master key for it".into() }
    )]
    IdentityExists {
        user_id: String,
        published: Ed25519PublicKey,
        on_token: Option<Ed25519PublicKey>,
    },
    #[error(
        "no master key for {} on {token}{}",
        escape(.user_id),
        match .published { Some(k) => format!("; the server publishes the identity {k}, which is not on this token"), None => String::new() }
    )]
    NoIdentityOnToken {
        user_id: String,
        token: String,
        published: Option<Ed25519PublicKey>,
    },
    #[error(
        "the published identity of {} is not the token's ({}): fix that first",
        escape(.user_id),
        crate::text::escape_joined(.problems, "; ")
    )]
    IdentityNotOurs {
        user_id: String,
        problems: Vec<String>,
    },
    #[error(
        "the server's copy of this mxhsm device ({}) is not the one mxhsm uploaded: {}. This is tampering by the server or by someone with the access token; nothing was signed",
        escape(.device_id), escape(.difference)
    )]
    OwnDeviceTampered {
        device_id: String,
        difference: String,
    },
    #[error("the server knows no device {} of {}", escape(.device_id), escape(.user_id))]
    UnknownDevice { user_id: String, device_id: String },
    #[error("device {} cannot be signed: {}", escape(.device_id), escape(.reason))]
    NotSignable { device_id: String, reason: String },
    #[error("{} has no cross-signing identity on the server", escape(.0))]
    NoPublishedIdentity(String),
    #[error("{} is you: sign your own devices instead", escape(.0))]
    SignSelf(String),
    #[error(
        "the master key of {} is {}, not the fingerprint given: nothing signed",
        escape(.user_id), .actual
    )]
    FingerprintMismatch {
        user_id: String,
        actual: Ed25519PublicKey,
    },
    #[error("cancelled; nothing changed")]
    Cancelled,
    #[error("{} signature(s) refused by the server: {}", .0.len(), .0.iter().map(|f| f.to_string()).collect::<Vec<_>>().join("; "))]
    SignaturesRefused(Vec<crate::homeserver::SignatureFailure>),
    #[error("the server accepted the upload but does not serve it back: {}; treat it as not done", escape(.0))]
    ReadBack(String),
    #[error(
        "the server already has backup version {} ({} keys, encrypted to {}), which is not the token's backup key: nothing was changed",
        escape(.version), .count, escape(.public_key)
    )]
    BackupExists {
        version: String,
        count: u64,
        public_key: String,
    },
    #[error("the server has no key backup")]
    NoBackup,
    #[error(
        "{rounds} PBKDF2 rounds make the export passphrase cheap to guess (at least {minimum} are needed)"
    )]
    WeakExportRounds { rounds: u32, minimum: u32 },
    #[error("an interrupted restore into {} exists ({})", .out.display(), .state.display())]
    RestoreInterrupted {
        out: std::path::PathBuf,
        state: std::path::PathBuf,
    },
    #[error("fetching the backup failed; nothing was written ({0})")]
    BackupDownload(HomeserverError),
    /// A refusal; the message escapes whatever untrusted text it quotes.
    #[error("{0}")]
    Refused(String),
    #[error("{what} {}: {reason}", .path.display())]
    File {
        what: &'static str,
        path: std::path::PathBuf,
        reason: String,
    },
    #[error(
        "a session exists for {} (device {}) on {}: nothing was changed",
        escape(.user_id), escape(.device_id), escape(.homeserver)
    )]
    SessionExists {
        user_id: String,
        device_id: String,
        homeserver: String,
    },
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(
        "the homeserver failed to publish the token's cross-signing keys for {} again (Synapse cannot take back a key it stored before; it answers 500): nothing was changed",
        escape(.user_id)
    )]
    KeysStoredBefore { user_id: String },
    #[error(
        "several accounts are logged in ({}): say which",
        crate::text::escape_joined(.logged_in, ", ")
    )]
    WhichAccount { logged_in: Vec<String> },
}

impl AccountError {
    /// The token's error behind this one, if the token is what failed (a wrong PIN, a
    /// missing card, a refused operation), however deep it is in the chain.
    pub fn token_error(&self) -> Option<&TokenError> {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(c) = cause {
            if let Some(t) = c.downcast_ref::<TokenError>() {
                return Some(t);
            }
            cause = c.source();
        }
        None
    }

    fn file(what: &'static str, path: &std::path::Path, reason: impl std::fmt::Display) -> Self {
        AccountError::File {
            what,
            path: path.to_path_buf(),
            reason: reason.to_string(),
        }
    }
}
