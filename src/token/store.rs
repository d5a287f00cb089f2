//! Opening a token of either kind: [`Store`] is a PKCS#11 token or a YubiKey, and derefs
//! to its [`KeyStore`].
//!
//! A store opens without a PIN: the public halves of the keys can be listed at once, and
//! the PIN is asked for (from the [`PinProvider`] given) only when a private key is first
//! used. So a flow checks what it can (the server's state, that the token holds the key it
//! needs) before it asks for a PIN or a touch.

use std::sync::Arc;

use super::pkcs11::{Pkcs11Store, Pkcs11Uri};
#[cfg(feature = "yubikey")]
use super::yubikey::{ManagementKey, YubiKeyOptions, YubiKeyStore};
use super::{KeyStore, PinProvider, PinStatus, TokenError};

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

/// An open token of either kind; dereferences to its [`KeyStore`].
pub enum Store {
    Pkcs11(Pkcs11Store),
    #[cfg(feature = "yubikey")]
    YubiKey(YubiKeyStore),
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
        match self {
            Store::Pkcs11(s) => s,
            #[cfg(feature = "yubikey")]
            Store::YubiKey(s) => s,
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
            TokenChoice::Pkcs11(uri) => Ok(Store::Pkcs11(Pkcs11Store::open_lazy(uri, pins)?)),
            #[cfg(feature = "yubikey")]
            TokenChoice::YubiKey(serial) => Ok(Store::YubiKey(YubiKeyStore::open_lazy(
                YubiKeyOptions {
                    serial: *serial,
                    management_key: options.management_key,
                    slot_map: options.slot_map,
                },
                pins,
            )?)),
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
        match self {
            Store::Pkcs11(s) => s.login(),
            #[cfg(feature = "yubikey")]
            Store::YubiKey(s) => s.verify_pin(),
        }
    }

    /// What the token said about its PIN retry counter when it was opened.
    pub fn pin_status_at_open(&self) -> PinStatus {
        match self {
            Store::Pkcs11(s) => s.pin_status_before_login(),
            #[cfg(feature = "yubikey")]
            Store::YubiKey(s) => s.pin_status_before_login(),
        }
    }

    /// A warning for the user when someone has entered wrong PINs since the last good
    /// one, or `None`.
    pub fn pin_warning(&self) -> Option<String> {
        let status = self.pin_status_at_open();
        match self {
            Store::Pkcs11(_) => status.describe().map(|w| {
                format!("before this login the token reported: {w} (someone entered a wrong PIN)")
            }),
            #[cfg(feature = "yubikey")]
            Store::YubiKey(y) => match (status.retries, y.pin_tries_total()) {
                (Some(left), Some(total)) if left < u32::from(total) => Some(format!(
                    "before this PIN the YubiKey had {left} of {total} tries left (someone entered a wrong PIN)"
                )),
                _ => None,
            },
        }
    }

    /// The PKCS#11 store, if this is one.
    pub fn as_pkcs11(&self) -> Option<&Pkcs11Store> {
        match self {
            Store::Pkcs11(s) => Some(s),
            #[cfg(feature = "yubikey")]
            Store::YubiKey(_) => None,
        }
    }

    /// The YubiKey store, if this is one.
    #[cfg(feature = "yubikey")]
    pub fn as_yubikey(&self) -> Option<&YubiKeyStore> {
        match self {
            Store::YubiKey(s) => Some(s),
            Store::Pkcs11(_) => None,
        }
    }
}
