//! The YubiKey PIV backend (firmware 5.7+, which has Ed25519 and X25519 in PIV).
//!
//! Keys live in the twenty retired key-management slots (82..95). A [`slot_map`] beside
//! the configuration says which slot holds which (user, role); the card's metadata is
//! the truth about what a slot holds, and the two are compared on every listing.
//!
//! What goes through the `yubikey` crate (its real code path, as the test card is driven):
//! opening by serial, PIN verification and retry counter, management-key authentication,
//! generation, import, metadata, attestation, X25519 agreement. What does not: Ed25519
//! signing, which the crate gets wrong for some lengths, and key deletion, which it lacks
//! ([`apdu`]).
//!
//! The PIN is verified once, when the store opens, after reading the retry counter; a
//! wrong PIN is reported with the tries left and never sent again. Keys with PIN policy
//! "always" are re-verified with the same, already-accepted PIN before each use.
//!
//! Here: the store, opening it, and the [`KeyStore`] operations. Beside it: `discovery`
//! (listing and opening cards, one store per process), `pin` (the PIV PIN), `management`
//! (the management key), `policy` (PIN and touch policies), `slots` (what the slots hold,
//! creating, adopting and attesting keys), [`slot_map`], [`apdu`], [`attestation`].

pub mod apdu;
pub mod attestation;
mod discovery;
mod management;
mod pin;
mod policy;
pub mod slot_map;
mod slots;

pub use discovery::{YubiKeyEntry, list_yubikeys};
pub use management::ManagementKey;
pub use slots::{SlotAudit, SlotProblem, first_tlv};

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use yubikey::YubiKey;
use yubikey::piv::{self, AlgorithmId, ManagementSlotId, SlotId};
use zeroize::Zeroizing;

use super::{
    Capabilities, Curve25519PublicKey, KeyAlgorithm, KeyBackend, KeyInfo, KeyOptions, KeyRole,
    KeyStore, PinProvider, PinStatus, RetiredSlot, SecretKeyBytes, SharedSecret, TokenError,
    TokenSummary, X25519Mechanism,
};
use apdu::{ApduError, RawCard};
use discovery::{describe, entry_of, open_all, release, unpanicked};
use pin::pin_status;
use slot_map::SlotMap;
use slots::slot_id;

/// The first firmware with Ed25519 and X25519 in PIV.
pub const MIN_FIRMWARE: (u8, u8) = (5, 7);

/// How to open a YubiKey.
#[derive(Default)]
pub struct YubiKeyOptions {
    /// The serial number; required when more than one YubiKey is present.
    pub serial: Option<u32>,
    pub management_key: ManagementKey,
    /// Where the slot map is; default [`slot_map::default_path`].
    pub slot_map: Option<PathBuf>,
}

/// A YubiKey's PIV application as a [`KeyStore`].
pub struct YubiKeyStore {
    card: Mutex<Card>,
    summary: TokenSummary,
    capabilities: Capabilities,
    serial: u32,
    slot_map: PathBuf,
    management_key: ManagementKey,
    pin_status_before: PinStatus,
    /// How many tries the PIN has in all, when the card says.
    pin_tries_total: Option<u8>,
    touch_notice: Option<Box<TouchNotice>>,
    /// Where the PIN comes from when the store verifies it by itself (see `open_lazy`).
    pins: Option<Arc<dyn PinProvider>>,
    /// When each slot last needed a touch, for the "cached" policy.
    last_touch: Mutex<std::collections::HashMap<RetiredSlot, std::time::Instant>>,
    _process_lock: crate::token::process_lock::ProcessLock,
}

/// Called before an operation that may wait for a touch (the key blinks until touched).
pub type TouchNotice = dyn Fn(&KeyInfo) + Send + Sync;

/// How long a YubiKey remembers a touch for keys with touch policy "cached".
const TOUCH_CACHE: std::time::Duration = std::time::Duration::from_secs(15);

struct Card {
    yk: YubiKey,
    raw: RawCard,
    mgm_authenticated: bool,
    /// The PIN the card accepted, for keys with PIN policy "always"; dropped for good
    /// after a re-verification fails (the PIN changed), so it is never sent twice.
    pin: Option<Zeroizing<Vec<u8>>>,
    pin_state: PinState,
}

/// Whether the PIN was verified yet. A refused PIN is never sent again by this store.
enum PinState {
    Pending,
    Verified,
    Refused(String),
}

impl YubiKeyStore {
    /// Opens the YubiKey (by serial when given), reads its PIN retry counter and verifies
    /// the PIN from `pins` once.
    pub fn open(options: YubiKeyOptions, pins: &dyn PinProvider) -> Result<Self, TokenError> {
        let store = Self::connect(options, None)?;
        store.verify_pin_with(pins)?;
        Ok(store)
    }

    /// Opens the YubiKey without verifying the PIN: keys can be listed at once (the card's
    /// metadata needs no PIN), and the PIN is asked for from `pins` only when a key is
    /// first used, so a command checks everything it can before it asks.
    pub fn open_lazy(
        options: YubiKeyOptions,
        pins: Arc<dyn PinProvider>,
    ) -> Result<Self, TokenError> {
        Self::connect(options, Some(pins))
    }

    fn connect(
        options: YubiKeyOptions,
        pins: Option<Arc<dyn PinProvider>>,
    ) -> Result<Self, TokenError> {
        let lock = super::process_lock::lock_yubikeys()?;
        let (mut found, busy) = open_all()?;
        let index = match options.serial {
            Some(serial) => found.iter().position(|yk| yk.serial().0 == serial),
            None if found.len() > 1 => {
                let names = found.iter().map(|yk| describe(&entry_of(yk))).collect();
                release(found);
                return Err(TokenError::AmbiguousYubiKey { present: names });
            }
            None => (!found.is_empty()).then_some(0),
        };
        let Some(index) = index else {
            let mut available: Vec<String> =
                found.iter().map(|yk| describe(&entry_of(yk))).collect();
            available.extend(busy);
            release(found);
            return Err(TokenError::NoMatchingToken {
                uri: match options.serial {
                    Some(s) => format!("YubiKey serial {s}"),
                    None => "a YubiKey".into(),
                },
                available,
            });
        };
        let yk = found.swap_remove(index);
        release(found);
        let entry = entry_of(&yk);
        let summary = TokenSummary {
            manufacturer: "Yubico".into(),
            model: format!("YubiKey PIV, firmware {}", entry.firmware),
            label: format!("YubiKey {}", entry.serial),
            serial: entry.serial.to_string(),
            source: entry.reader.clone(),
        };
        if !entry.supported {
            return Err(TokenError::Unsupported {
                token: summary.to_string(),
                what: format!(
                    "Ed25519 and X25519 in PIV (firmware {} has them from {}.{})",
                    entry.firmware, MIN_FIRMWARE.0, MIN_FIRMWARE.1
                ),
            });
        }
        let raw = RawCard::connect(&entry.reader).map_err(|e| TokenError::Device {
            token: summary.to_string(),
            operation: "connecting".into(),
            reason: e.to_string(),
        })?;
        let mut card = Card {
            yk,
            raw,
            mgm_authenticated: false,
            pin: None,
            pin_state: PinState::Pending,
        };
        let pin_tries_total = unpanicked("GET METADATA", || {
            piv::metadata(&mut card.yk, SlotId::Management(ManagementSlotId::Pin))
        })?
        .ok()
        .and_then(|m| m.retries)
        .map(|r| r.retry_count);
        let retries = unpanicked("VERIFY", || card.yk.get_pin_retries())?.map_err(|e| {
            TokenError::Device {
                token: summary.to_string(),
                operation: "reading the PIN retry counter".into(),
                reason: e.to_string(),
            }
        })?;
        let pin_status_before = pin_status(retries);
        Ok(YubiKeyStore {
            pins,
            card: Mutex::new(card),
            capabilities: Capabilities {
                ed25519: true,
                x25519: Some(X25519Mechanism::Piv),
                import: true,
            },
            serial: entry.serial,
            slot_map: options
                .slot_map
                .unwrap_or_else(|| slot_map::default_path(entry.serial)),
            management_key: options.management_key,
            pin_status_before,
            pin_tries_total,
            touch_notice: None,
            last_touch: Mutex::new(Default::default()),
            summary,
            _process_lock: lock,
        })
    }

    /// Sets what to do before an operation that may wait for a touch (e.g. tell the user).
    pub fn set_touch_notice(&mut self, notice: Box<TouchNotice>) {
        self.touch_notice = Some(notice);
    }

    /// The serial number.
    pub fn serial(&self) -> u32 {
        self.serial
    }

    /// Where this card's slot map is.
    pub fn slot_map_path(&self) -> &std::path::Path {
        &self.slot_map
    }

    /// The PIN retry counter as it was before this store verified the PIN.
    pub fn pin_status_before_login(&self) -> PinStatus {
        self.pin_status_before
    }

    /// How many tries the PIN has when none is used up, if the card says.
    pub fn pin_tries_total(&self) -> Option<u8> {
        self.pin_tries_total
    }

    fn card(&self) -> std::sync::MutexGuard<'_, Card> {
        self.card.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn device_error(&self, operation: &str, reason: impl std::fmt::Display) -> TokenError {
        TokenError::Device {
            token: self.summary.to_string(),
            operation: operation.to_string(),
            reason: reason.to_string(),
        }
    }
}

impl KeyStore for YubiKeyStore {
    fn summary(&self) -> &TokenSummary {
        &self.summary
    }

    fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    fn list_keys(&self, user_id: Option<&str>) -> Result<Vec<KeyInfo>, TokenError> {
        let mut keys: Vec<KeyInfo> = self
            .audit()?
            .into_iter()
            .filter_map(|a| a.state.ok())
            .filter(|k| user_id.is_none_or(|u| k.user_id == u))
            .collect();
        keys.sort_by(|a, b| {
            (&a.user_id, a.role, a.created_ms).cmp(&(&b.user_id, b.role, b.created_ms))
        });
        Ok(keys)
    }

    fn generate(
        &self,
        user_id: &str,
        role: KeyRole,
        options: &KeyOptions,
    ) -> Result<KeyInfo, TokenError> {
        self.create(user_id, role, options, None)
    }

    fn import(
        &self,
        user_id: &str,
        role: KeyRole,
        secret: SecretKeyBytes,
        options: &KeyOptions,
    ) -> Result<KeyInfo, TokenError> {
        self.create(user_id, role, options, Some(secret))
    }

    fn sign_ed25519(&self, key: &KeyInfo, message: &[u8]) -> Result<[u8; 64], TokenError> {
        let slot = self.slot_for(key, KeyAlgorithm::Ed25519)?;
        if message.len() > apdu::MAX_MESSAGE {
            return Err(TokenError::MessageTooLong {
                len: message.len(),
                max: apdu::MAX_MESSAGE,
            });
        }
        self.ensure_pin(&mut self.card())?;
        let touch = self.announce_touch(key, slot);
        let mut card = self.card();
        self.reverify(&mut card, key)?;
        let mut result = card.raw.sign_ed25519(slot.get(), message);
        if let Some(reset) = result.as_ref().err().and_then(ApduError::lost_state) {
            // Another program got between: once more, with the card set up again.
            self.recover(&mut card, reset)?;
            result = card.raw.sign_ed25519(slot.get(), message);
        }
        let sig = result.map_err(|e| self.card_refused("signing", slot, e))?;
        drop(card);
        tracing::debug!(
            "PIV sign (Ed25519) with slot {slot:02x}, the {} key of {}: {} bytes signed",
            key.role,
            crate::text::escape(&key.user_id),
            message.len()
        );
        if touch {
            self.touched(slot);
        }
        // A signature that does not verify is never handed on (it would be published).
        if !key.ed25519()?.verify(message, &sig) {
            return Err(TokenError::BadTokenData {
                token: self.summary.to_string(),
                what: format!(
                    "slot {slot:02x} returned a signature that does not verify with its public key"
                ),
            });
        }
        Ok(sig)
    }

    fn x25519(
        &self,
        key: &KeyInfo,
        peer_public: &Curve25519PublicKey,
    ) -> Result<SharedSecret, TokenError> {
        let slot = self.slot_for(key, KeyAlgorithm::X25519)?;
        self.ensure_pin(&mut self.card())?;
        let touch = self.announce_touch(key, slot);
        let mut card = self.card();
        self.reverify(&mut card, key)?;
        let id = slot_id(slot)?;
        let agree = |card: &mut Card| {
            unpanicked("GENERAL AUTHENTICATE", || {
                piv::decrypt_data(
                    &mut card.yk,
                    peer_public.as_bytes(),
                    AlgorithmId::X25519,
                    id,
                )
            })
        };
        let mut result = agree(&mut card)?;
        let lost = match &result {
            Err(yubikey::Error::PcscError {
                inner: Some(pcsc::Error::ResetCard),
            }) => Some(true),
            Err(yubikey::Error::AuthenticationError) => Some(false),
            _ => None,
        };
        if let Some(reset) = lost {
            self.recover(&mut card, reset)?;
            result = agree(&mut card)?;
        }
        let out = result.map_err(|e| {
            let reason = match e {
                // The crate's name for 69 82 here.
                yubikey::Error::AuthenticationError => apdu::describe(0x6982).to_string(),
                e => e.to_string(),
            };
            self.device_error(&format!("X25519 with slot {slot:02x}"), reason)
        })?;
        drop(card);
        tracing::trace!(
            "PIV X25519 with slot {slot:02x}, the {} key of {}",
            key.role,
            crate::text::escape(&key.user_id)
        );
        if touch {
            self.touched(slot);
        }
        let bytes: [u8; 32] = out
            .as_slice()
            .try_into()
            .map_err(|_| TokenError::BadTokenData {
                token: self.summary.to_string(),
                what: format!("an X25519 result of {} bytes", out.len()),
            })?;
        SharedSecret::new(bytes)
    }

    fn delete(&self, key: &KeyInfo) -> Result<(), TokenError> {
        let KeyBackend::Piv { slot, .. } = key.backend else {
            return Err(TokenError::OtherToken {
                role: key.role,
                user_id: key.user_id.clone(),
                token: self.summary.to_string(),
            });
        };
        let mut card = self.card();
        let mut map = SlotMap::load(&self.slot_map, self.serial)?;
        let public = *key.public_key.as_bytes();
        if map.slots.get(&slot).map(|e| e.public_key) != Some(public) {
            return Err(TokenError::SlotNotMapped {
                token: self.summary.to_string(),
                slot,
            });
        }
        match self.slot_contents(&mut card, slot)? {
            // Already gone: only the map entry is left to remove.
            None => {}
            Some(c) if c.public == Some(public) => {
                self.ensure_pin(&mut card)?;
                self.authenticate(&mut card)?;
                card.raw
                    .delete_key(slot.get())
                    .map_err(|e| self.card_refused("deleting the key", slot, e))?;
            }
            Some(_) => {
                return Err(TokenError::SlotChanged {
                    token: self.summary.to_string(),
                    slot,
                    role: key.role,
                    user_id: key.user_id.clone(),
                });
            }
        }
        map.slots.remove(&slot);
        map.save(&self.slot_map, self.serial)
    }
}
