//! The management key: needed to generate, import or delete keys; the factory default, a PIN-
//! protected one on the card, or one the user gives.

use yubikey::piv::{self, ManagementSlotId, SlotAlgorithmId, SlotId};
use yubikey::{MgmAlgorithmId, MgmKey};
use zeroize::Zeroizing;

use super::discovery::unpanicked;
use super::{Card, YubiKeyStore};
use crate::token::TokenError;

impl YubiKeyStore {
    /// Authenticates with the management key, once per store.
    pub(super) fn authenticate(&self, card: &mut Card) -> Result<(), TokenError> {
        if card.mgm_authenticated {
            return Ok(());
        }
        let meta = unpanicked("GET METADATA", || {
            piv::metadata(
                &mut card.yk,
                SlotId::Management(ManagementSlotId::Management),
            )
        })?
        .map_err(|e| self.device_error("reading the management key's metadata", e))?;
        let alg = match meta.algorithm {
            SlotAlgorithmId::Management(a) => a,
            _ => MgmAlgorithmId::Aes192,
        };
        let key = match &self.management_key {
            ManagementKey::Given(bytes) => MgmKey::from_bytes(bytes.as_slice(), Some(alg))
                .map_err(|_| TokenError::ManagementKeyLength {
                    given: bytes.len(),
                    expected: format!("{alg:?}"),
                })?,
            ManagementKey::Auto if meta.default == Some(true) => {
                MgmKey::from_bytes(DEFAULT_MANAGEMENT_KEY, Some(alg))
                    .map_err(|e| self.device_error("using the default management key", e))?
            }
            ManagementKey::Auto => {
                MgmKey::get_protected(&mut card.yk).map_err(|e| TokenError::NoManagementKey {
                    token: self.summary.to_string(),
                    reason: e.to_string(),
                })?
            }
        };
        card.yk.authenticate(&key).map_err(|e| match e {
            yubikey::Error::AuthenticationError => TokenError::ManagementKeyRefused {
                token: self.summary.to_string(),
            },
            e => self.device_error("authenticating with the management key", e),
        })?;
        card.mgm_authenticated = true;
        Ok(())
    }

    /// Whether the PIN, the PUK and the management key are still the factory defaults
    /// (from the card's metadata; `None` where it does not say).
    pub fn factory_defaults(&self) -> Result<[(&'static str, Option<bool>); 3], TokenError> {
        let mut card = self.card();
        let mut get = |id: ManagementSlotId, what: &str| {
            piv::metadata(&mut card.yk, SlotId::Management(id))
                .map(|m| m.default)
                .map_err(|e| self.device_error(&format!("reading the metadata of the {what}"), e))
        };
        Ok([
            ("PIN", get(ManagementSlotId::Pin, "PIN")?),
            ("PUK", get(ManagementSlotId::Puk, "PUK")?),
            (
                "management key",
                get(ManagementSlotId::Management, "management key")?,
            ),
        ])
    }
}

/// The factory management key (3DES before firmware 5.7, AES-192 since).
pub(super) const DEFAULT_MANAGEMENT_KEY: [u8; 24] = [
    1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8,
];

/// How mxhsm authenticates with the card's management key (needed to generate, import or
/// delete keys).
#[derive(Default)]
pub enum ManagementKey {
    /// The factory default key if the card says it is still set, else the PIN-protected key
    /// stored on the card (ykman's `--protect` scheme).
    #[default]
    Auto,
    /// This key (3DES, AES-128, AES-192 or AES-256, by the card's metadata).
    Given(Zeroizing<Vec<u8>>),
}
