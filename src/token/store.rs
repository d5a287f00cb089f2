//! Opening a token of either kind: [`Store`] is a PKCS#11 token or a YubiKey, and derefs
//! to its [`KeyStore`].
//!
//! A store opens without a PIN: the public halves of the keys can be listed at once, and
//! the PIN is asked for (from the [`PinProvider`] given) only when a private key is first
//! used. So a flow checks what it can (the server's state, that the token holds the key it
//! needs) before it asks for a PIN or a touch.

use std::sync::Arc;

use super::audit::{AuditSink, TokenOp};
use super::pkcs11::{Pkcs11Store, Pkcs11Uri};
#[cfg(feature = "yubikey")]
use super::yubikey::{ManagementKey, YubiKeyOptions, YubiKeyStore};
use super::{
    Curve25519PublicKey, KeyInfo, KeyOptions, KeyRole, KeyStore, PinProvider, PinStatus,
    SecretKeyBytes, SharedSecret, TokenError,
};

/// Which device the keys are on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenChoice {
    Pkcs11(Box<Pkcs11Uri>),
    /// A YubiKey's PIV application, by serial (`None`: the only one present).
    YubiKey(Option<u32>),
}

/// What opening a YubiKey needs beyond its serial.
#[derive(Default)]
pub struct StoreOptions {
    /// The PIV management key (default: the factory key while set, else the PIN-protected
    /// one on the card).
    #[cfg(feature = "yubikey")]
    pub management_key: ManagementKey,
    /// Where the YubiKey's slot map is (default: beside the configuration).
    pub slot_map: Option<std::path::PathBuf>,
}

/// The device behind a [`Store`].
pub enum Backend {
    Pkcs11(Pkcs11Store),
    #[cfg(feature = "yubikey")]
    YubiKey(YubiKeyStore),
}

impl Backend {
    fn keys(&self) -> &dyn KeyStore {
        match self {
            Backend::Pkcs11(s) => s,
            #[cfg(feature = "yubikey")]
            Backend::YubiKey(s) => s,
        }
    }
}

/// An open token of either kind. It is a [`KeyStore`] (and dereferences to one): every
/// private-key operation goes through it, and through its audit sink when it has one
/// ([`Store::set_audit`]).
pub struct Store {
    backend: Backend,
    audit: Option<Arc<dyn AuditSink>>,
    /// This store recorded an operation: it signs the record's head when it closes (a
    /// store that only read never needs its token's PIN or touch for that).
    recorded: std::sync::atomic::AtomicBool,
}

impl From<Pkcs11Store> for Store {
    fn from(s: Pkcs11Store) -> Store {
        Store {
            backend: Backend::Pkcs11(s),
            audit: None,
            recorded: Default::default(),
        }
    }
}

#[cfg(feature = "yubikey")]
impl From<YubiKeyStore> for Store {
    fn from(s: YubiKeyStore) -> Store {
        Store {
            backend: Backend::YubiKey(s),
            audit: None,
            recorded: Default::default(),
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Store")
            .field(&self.summary().to_string())
            .finish()
    }
}

impl std::ops::Deref for Store {
    type Target = dyn KeyStore;
    fn deref(&self) -> &Self::Target {
        self
    }
}

impl Store {
    /// Records every private-key operation from now on in `sink` (see [`super::audit`]).
    pub fn set_audit(&mut self, sink: Arc<dyn AuditSink>) {
        self.audit = Some(sink);
    }

    /// The device.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    fn record(&self, op: TokenOp<'_>) -> Result<(), TokenError> {
        match &self.audit {
            Some(sink) => {
                self.recorded
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                sink.record(self.summary(), op)
                    .map_err(|reason| TokenError::Audit { reason })
            }
            None => Ok(()),
        }
    }
}

impl KeyStore for Store {
    fn summary(&self) -> &super::TokenSummary {
        self.backend.keys().summary()
    }

    fn capabilities(&self) -> &super::Capabilities {
        self.backend.keys().capabilities()
    }

    fn list_keys(&self, user_id: Option<&str>) -> Result<Vec<KeyInfo>, TokenError> {
        self.backend.keys().list_keys(user_id)
    }

    fn generate(
        &self,
        user_id: &str,
        role: KeyRole,
        options: &KeyOptions,
    ) -> Result<KeyInfo, TokenError> {
        let key = self.backend.keys().generate(user_id, role, options)?;
        self.record(TokenOp::Generated { key: &key })?;
        Ok(key)
    }

    fn import(
        &self,
        user_id: &str,
        role: KeyRole,
        secret: SecretKeyBytes,
        options: &KeyOptions,
    ) -> Result<KeyInfo, TokenError> {
        let key = self.backend.keys().import(user_id, role, secret, options)?;
        self.record(TokenOp::Imported { key: &key })?;
        Ok(key)
    }

    fn sign_ed25519(&self, key: &KeyInfo, message: &[u8]) -> Result<[u8; 64], TokenError> {
        self.record(TokenOp::Sign { key, message })?;
        self.backend.keys().sign_ed25519(key, message)
    }

    fn x25519(
        &self,
        key: &KeyInfo,
        peer_public: &Curve25519PublicKey,
    ) -> Result<SharedSecret, TokenError> {
        self.record(TokenOp::Agree {
            key,
            peer: peer_public,
        })?;
        self.backend.keys().x25519(key, peer_public)
    }

    fn delete(&self, key: &KeyInfo) -> Result<(), TokenError> {
        self.record(TokenOp::Delete { key })?;
        self.backend.keys().delete(key)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let Some(sink) = self.audit.take() else {
            return;
        };
        if !sink.needs_head() || !self.recorded.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let keys = self.backend.keys();
        match super::audit::audit_key(keys, sink.audit_user_hint().as_deref()) {
            Ok(Some(key)) => {
                let sign = |bytes: &[u8]| keys.sign_ed25519(&key, bytes);
                sink.head(keys.summary(), Some((&key, &sign)));
            }
            _ => sink.head(keys.summary(), None),
        }
    }
}

impl Store {
    /// Opens the token `choice` names, without logging in (see the module documentation).
    pub fn open(
        choice: &TokenChoice,
        options: StoreOptions,
        pins: Arc<dyn PinProvider>,
    ) -> Result<Store, TokenError> {
        match choice {
            TokenChoice::Pkcs11(uri) => Ok(Pkcs11Store::open_lazy(uri, pins)?.into()),
            #[cfg(feature = "yubikey")]
            TokenChoice::YubiKey(serial) => Ok(YubiKeyStore::open_lazy(
                YubiKeyOptions {
                    serial: *serial,
                    management_key: options.management_key,
                    slot_map: options.slot_map,
                },
                pins,
            )?
            .into()),
            #[cfg(not(feature = "yubikey"))]
            TokenChoice::YubiKey(_) => {
                let _ = options;
                Err(TokenError::Unsupported {
                    token: "this build of mxhsm".into(),
                    what: "YubiKeys (it was built without the `yubikey` feature)".into(),
                })
            }
        }
    }

    /// Logs in now (PKCS#11 `C_Login`, or the PIV PIN), unless done already.
    pub fn login(&self) -> Result<(), TokenError> {
        match &self.backend {
            Backend::Pkcs11(s) => s.login(),
            #[cfg(feature = "yubikey")]
            Backend::YubiKey(s) => s.verify_pin(),
        }
    }

    /// What the token said about its PIN retry counter when it was opened.
    pub fn pin_status_at_open(&self) -> PinStatus {
        match &self.backend {
            Backend::Pkcs11(s) => s.pin_status_before_login(),
            #[cfg(feature = "yubikey")]
            Backend::YubiKey(s) => s.pin_status_before_login(),
        }
    }

    /// A warning for the user when someone has entered wrong PINs since the last good
    /// one, or `None`.
    pub fn pin_warning(&self) -> Option<String> {
        let status = self.pin_status_at_open();
        match &self.backend {
            Backend::Pkcs11(_) => status.describe().map(|w| {
                format!("before this login the token reported: {w} (someone entered a wrong PIN)")
            }),
            #[cfg(feature = "yubikey")]
            Backend::YubiKey(y) => match (status.retries, y.pin_tries_total()) {
                (Some(left), Some(total)) if left < u32::from(total) => Some(format!(
                    "before this PIN the YubiKey had {left} of {total} tries left (someone entered a wrong PIN)"
                )),
                _ => None,
            },
        }
    }

    /// The keys of `user_id` (or of everyone), with each private key's protection
    /// attributes: a PKCS#11 token shows those only after login, so this logs in there
    /// first (the PIN is asked for if needed); a YubiKey's metadata needs no PIN.
    pub fn list_keys_with_protection(
        &self,
        user_id: Option<&str>,
    ) -> Result<Vec<super::KeyInfo>, TokenError> {
        if self.as_pkcs11().is_some() {
            self.login()?;
        }
        self.list_keys(user_id)
    }

    /// The PKCS#11 store, if this is one.
    pub fn as_pkcs11(&self) -> Option<&Pkcs11Store> {
        match &self.backend {
            Backend::Pkcs11(s) => Some(s),
            #[cfg(feature = "yubikey")]
            Backend::YubiKey(_) => None,
        }
    }

    /// Takes the key already in `slot` of a YubiKey into use as `role` of `user_id`,
    /// recorded like a generation.
    #[cfg(feature = "yubikey")]
    pub fn adopt(
        &self,
        user_id: &str,
        role: KeyRole,
        slot: super::RetiredSlot,
    ) -> Result<KeyInfo, TokenError> {
        let Backend::YubiKey(y) = &self.backend else {
            return Err(TokenError::Unsupported {
                token: self.summary().to_string(),
                what: "adopting a key in a slot (that is for YubiKeys)".into(),
            });
        };
        let key = y.adopt(user_id, role, slot)?;
        self.record(TokenOp::Adopted { key: &key })?;
        Ok(key)
    }

    /// The YubiKey store, if this is one, to change its settings.
    #[cfg(feature = "yubikey")]
    pub fn as_yubikey_mut(&mut self) -> Option<&mut YubiKeyStore> {
        match &mut self.backend {
            Backend::YubiKey(s) => Some(s),
            Backend::Pkcs11(_) => None,
        }
    }

    /// The YubiKey store, if this is one.
    #[cfg(feature = "yubikey")]
    pub fn as_yubikey(&self) -> Option<&YubiKeyStore> {
        match &self.backend {
            Backend::YubiKey(s) => Some(s),
            Backend::Pkcs11(_) => None,
        }
    }
}
