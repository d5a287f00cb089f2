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

pub mod apdu;
pub mod attestation;
pub mod slot_map;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use secrecy::ExposeSecret;
use yubikey::piv::{self, AlgorithmId, ManagementSlotId, SlotAlgorithmId, SlotId};
use yubikey::{MgmAlgorithmId, MgmKey, YubiKey};
use zeroize::Zeroizing;

use super::pin::NoPins;
use super::{
    Capabilities, Curve25519PublicKey, KeyAlgorithm, KeyBackend, KeyInfo, KeyOptions, KeyOrigin,
    KeyProtection, KeyRole, KeyStore, PinPolicy, PinProvider, PinRequest, PinStatus, PublicKey,
    RetiredSlot, SecretKeyBytes, SharedSecret, TokenError, TokenSummary, TouchPolicy,
    X25519Mechanism, check_user_id,
};
use apdu::{ApduError, RawCard};
use slot_map::{Entry, SlotMap};

/// The factory management key (3DES before firmware 5.7, AES-192 since).
const DEFAULT_MANAGEMENT_KEY: [u8; 24] = [
    1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8,
];

/// The first firmware with Ed25519 and X25519 in PIV.
pub const MIN_FIRMWARE: (u8, u8) = (5, 7);

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

/// How to open a YubiKey.
#[derive(Default)]
pub struct YubiKeyOptions {
    /// The serial number; required when more than one YubiKey is present.
    pub serial: Option<u32>,
    pub management_key: ManagementKey,
    /// Where the slot map is; default [`slot_map::default_path`].
    pub slot_map: Option<PathBuf>,
}

/// A YubiKey seen by [`list_yubikeys`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct YubiKeyEntry {
    pub serial: u32,
    pub firmware: String,
    pub reader: String,
    /// Whether the firmware has Ed25519/X25519 in PIV.
    pub supported: bool,
}

fn pcsc_error(operation: &str, e: yubikey::Error) -> TokenError {
    let reason = match &e {
        yubikey::Error::PcscError {
            inner: Some(pcsc::Error::NoService),
        } => "pcscd is not running (start it, e.g. systemctl start pcscd.socket)".to_string(),
        yubikey::Error::PcscError {
            inner: Some(pcsc::Error::NoReadersAvailable),
        } => "no smart card reader is present".to_string(),
        other => other.to_string(),
    };
    TokenError::Device {
        token: "PC/SC".into(),
        operation: operation.into(),
        reason,
    }
}

/// Every YubiKey with a PIV application that PC/SC can reach.
///
/// Opening a card selects its PIV application, which makes it forget a verified PIN; so
/// this waits for any other mxhsm process using a YubiKey (see `process_lock`), and fails
/// if this process has one open.
pub fn list_yubikeys() -> Result<Vec<YubiKeyEntry>, TokenError> {
    let _claim = ProcessClaim::take()?;
    let _lock = super::process_lock::lock_yubikeys()?;
    let (found, _busy) = open_all()?;
    Ok(found
        .into_iter()
        .map(|yk| {
            let entry = entry_of(&yk);
            let _ = yk.disconnect(pcsc::Disposition::LeaveCard);
            entry
        })
        .collect())
}

/// At most one open YubiKey (store or listing) per process: a second would wait for this
/// process's own lock.
static OPEN_IN_PROCESS: Mutex<bool> = Mutex::new(false);

struct ProcessClaim;

impl ProcessClaim {
    fn take() -> Result<ProcessClaim, TokenError> {
        let mut open = OPEN_IN_PROCESS.lock().unwrap_or_else(|e| e.into_inner());
        if *open {
            return Err(TokenError::AlreadyOpen);
        }
        *open = true;
        Ok(ProcessClaim)
    }
}

impl Drop for ProcessClaim {
    fn drop(&mut self) {
        *OPEN_IN_PROCESS.lock().unwrap_or_else(|e| e.into_inner()) = false;
    }
}

/// Runs a `yubikey` crate call, turning a panic on a malformed card answer (the crate
/// indexes some answers without checking their length) into an error.
fn unpanicked<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, TokenError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|_| {
        TokenError::BadTokenData {
            token: "the YubiKey".into(),
            what: format!("a malformed answer to {what}"),
        }
    })
}

fn entry_of(yk: &YubiKey) -> YubiKeyEntry {
    let v = yk.version();
    YubiKeyEntry {
        serial: yk.serial().0,
        firmware: v.to_string(),
        reader: yk.name().to_string(),
        supported: (v.major, v.minor) >= MIN_FIRMWARE,
    }
}

/// Opens every reader holding a card with a PIV application. Also returns the readers that
/// are in exclusive use by another program.
fn open_all() -> Result<(Vec<YubiKey>, Vec<String>), TokenError> {
    let mut ctx = match yubikey::reader::Context::open() {
        Ok(c) => c,
        Err(e) => return Err(pcsc_error("listing readers", e)),
    };
    let readers = match ctx.iter() {
        Ok(r) => r,
        Err(yubikey::Error::PcscError {
            inner: Some(pcsc::Error::NoReadersAvailable),
        }) => return Ok((Vec::new(), Vec::new())),
        Err(e) => return Err(pcsc_error("listing readers", e)),
    };
    let mut found = Vec::new();
    let mut busy = Vec::new();
    for reader in readers {
        // A reader without a YubiKey does not open: skip it.
        match unpanicked("opening the card", || reader.open()) {
            Ok(Ok(yk)) => found.push(yk),
            Ok(Err(yubikey::Error::PcscError {
                inner: Some(pcsc::Error::SharingViolation),
            })) => busy.push(format!(
                "reader {} (in exclusive use by another program, e.g. gpg's scdaemon)",
                reader.name()
            )),
            _ => {}
        }
    }
    Ok((found, busy))
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
    _process_lock: std::fs::File,
    _claim: ProcessClaim,
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

    /// Verifies the PIN now, with `pins` (unless verified already).
    pub fn verify_pin_with(&self, pins: &dyn PinProvider) -> Result<(), TokenError> {
        let mut card = self.card();
        self.ensure_pin_with(&mut card, pins)
    }

    /// Verifies the PIN from the provider given to [`YubiKeyStore::open_lazy`] (unless
    /// verified already).
    pub fn verify_pin(&self) -> Result<(), TokenError> {
        let mut card = self.card();
        self.ensure_pin(&mut card)
    }

    fn ensure_pin(&self, card: &mut Card) -> Result<(), TokenError> {
        match self.pins.clone() {
            Some(p) => self.ensure_pin_with(card, &*p),
            None => self.ensure_pin_with(card, &NoPins),
        }
    }

    fn ensure_pin_with(&self, card: &mut Card, pins: &dyn PinProvider) -> Result<(), TokenError> {
        match &card.pin_state {
            PinState::Verified => return Ok(()),
            PinState::Refused(reason) => {
                return Err(TokenError::NoPin {
                    token: self.summary.to_string(),
                    reason: reason.clone(),
                });
            }
            PinState::Pending => {}
        }
        match verify_pin(card, &self.summary, pins) {
            Ok(_) => {
                card.pin_state = PinState::Verified;
                Ok(())
            }
            Err(e @ (TokenError::WrongPin { .. } | TokenError::PivPinBlocked { .. })) => {
                card.pin_state = PinState::Refused(format!(
                    "the card refused the PIN earlier ({e}); it is not sent again"
                ));
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    fn connect(
        options: YubiKeyOptions,
        pins: Option<Arc<dyn PinProvider>>,
    ) -> Result<Self, TokenError> {
        let claim = ProcessClaim::take()?;
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
            _claim: claim,
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

    /// Authenticates with the management key, once per store.
    fn authenticate(&self, card: &mut Card) -> Result<(), TokenError> {
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

    /// What `slot` holds: (algorithm, public key, policy, origin), or `None` when empty.
    fn slot_contents(
        &self,
        card: &mut Card,
        slot: RetiredSlot,
    ) -> Result<Option<SlotContents>, TokenError> {
        let id = slot_id(slot)?;
        match unpanicked("GET METADATA", || piv::metadata(&mut card.yk, id))? {
            Ok(meta) => {
                let algorithm = match meta.algorithm {
                    SlotAlgorithmId::Asymmetric(AlgorithmId::Ed25519) => {
                        Some(KeyAlgorithm::Ed25519)
                    }
                    SlotAlgorithmId::Asymmetric(AlgorithmId::X25519) => Some(KeyAlgorithm::X25519),
                    _ => None,
                };
                let public = meta
                    .public
                    .as_ref()
                    .and_then(|p| <[u8; 32]>::try_from(p.subject_public_key.raw_bytes()).ok());
                Ok(Some(SlotContents {
                    algorithm,
                    public,
                    policy: meta
                        .policy
                        .and_then(|(p, t)| Some((pin_policy(p)?, touch_policy(t)?))),
                    origin: match meta.origin {
                        Some(piv::Origin::Generated) => KeyOrigin::Generated,
                        Some(piv::Origin::Imported) => KeyOrigin::Imported,
                        None => KeyOrigin::Unknown,
                    },
                }))
            }
            Err(yubikey::Error::NotFound) => Ok(None),
            Err(e) => {
                Err(self.device_error(&format!("reading the metadata of slot {slot:02x}"), e))
            }
        }
    }

    fn key_info(
        &self,
        slot: RetiredSlot,
        entry: &Entry,
        contents: &SlotContents,
    ) -> Result<KeyInfo, TokenError> {
        let public_key =
            PublicKey::new(entry.role.algorithm(), &entry.public_key).map_err(|e| {
                TokenError::BadTokenData {
                    token: self.summary.to_string(),
                    what: format!("the key in slot {slot}: {e}"),
                }
            })?;
        Ok(KeyInfo {
            user_id: entry.user_id.clone(),
            role: entry.role,
            created_ms: Some(entry.created_ms),
            public_key,
            origin: contents.origin,
            protection: KeyProtection {
                token: Some(true),
                private: Some(!matches!(contents.policy, Some((PinPolicy::Never, _)))),
                sensitive: Some(true),
                extractable: Some(false),
                // As PKCS#11 defines them: an imported key was outside the card once.
                always_sensitive: Some(contents.origin == KeyOrigin::Generated),
                never_extractable: Some(contents.origin == KeyOrigin::Generated),
                local: Some(contents.origin == KeyOrigin::Generated),
                ..KeyProtection::default()
            },
            backend: KeyBackend::Piv {
                slot,
                pin: contents.policy.map(|p| p.0),
                touch: contents.policy.map(|p| p.1),
            },
        })
    }

    /// Every slot-map entry with what the card holds there; `Err` for entries the card
    /// contradicts (empty slot, other key), which are never used.
    pub fn audit(&self) -> Result<Vec<SlotAudit>, TokenError> {
        let map = SlotMap::load(&self.slot_map, self.serial)?;
        let mut card = self.card();
        let mut out = Vec::new();
        for (slot, entry) in map.slots {
            let state = match self.slot_contents(&mut card, slot)? {
                None => Err(SlotProblem::Empty),
                Some(c) if c.public != Some(entry.public_key) => Err(SlotProblem::OtherKey),
                Some(c) if c.algorithm != Some(entry.role.algorithm()) => {
                    Err(SlotProblem::OtherAlgorithm)
                }
                Some(c) => Ok(self.key_info(slot, &entry, &c)?),
            };
            out.push(SlotAudit { slot, entry, state });
        }
        Ok(out)
    }

    /// Picks the slot for a new key: the one asked for (refusing a filled one unless
    /// `force`), else the first retired slot that is empty and unmapped.
    fn choose_slot(
        &self,
        card: &mut Card,
        map: &SlotMap,
        options: &KeyOptions,
    ) -> Result<RetiredSlot, TokenError> {
        if let Some(slot) = options.slot {
            if !options.force
                && let Some(c) = self.slot_contents(card, slot)?
            {
                let ours = map
                    .slots
                    .get(&slot)
                    .filter(|e| c.public == Some(e.public_key));
                return Err(TokenError::SlotOccupied {
                    token: self.summary.to_string(),
                    slot,
                    holder: ours.map(|e| (e.role, e.user_id.clone())),
                    contents: format!(
                        "{}, {}",
                        c.algorithm
                            .map(|a| a.to_string())
                            .unwrap_or_else(|| "another algorithm".into()),
                        c.origin.as_str()
                    ),
                });
            }
            return Ok(slot);
        }
        // A mapped slot that is empty on the card (the card was reset, or the key deleted
        // by another tool) is free again; its stale entry is replaced.
        for slot in RetiredSlot::all() {
            if self.slot_contents(card, slot)?.is_none() {
                return Ok(slot);
            }
        }
        Err(TokenError::NoFreeSlot {
            token: self.summary.to_string(),
            slot_map: self.slot_map.clone(),
        })
    }

    /// Generates or imports a key: the shared part (slot, policies, map).
    fn create(
        &self,
        user_id: &str,
        role: KeyRole,
        options: &KeyOptions,
        secret: Option<SecretKeyBytes>,
    ) -> Result<KeyInfo, TokenError> {
        check_user_id(user_id)?;
        let algorithm = role.algorithm();
        let (pin_p, touch_p) = default_policy(role, options);
        let mut card = self.card();
        let mut map = SlotMap::load(&self.slot_map, self.serial)?;
        let slot = self.choose_slot(&mut card, &map, options)?;
        self.ensure_pin(&mut card)?;
        self.authenticate(&mut card)?;
        let id = slot_id(slot)?;
        let alg = match algorithm {
            KeyAlgorithm::Ed25519 => AlgorithmId::Ed25519,
            KeyAlgorithm::X25519 => AlgorithmId::X25519,
        };
        let public = match &secret {
            None => {
                let spki = unpanicked("GENERATE", || {
                    piv::generate(&mut card.yk, id, alg, piv_pin(pin_p), piv_touch(touch_p))
                })?
                .map_err(|e| {
                    self.device_error(&format!("generating a key in slot {slot:02x}"), e)
                })?;
                <[u8; 32]>::try_from(spki.subject_public_key.raw_bytes()).map_err(|_| {
                    TokenError::BadTokenData {
                        token: self.summary.to_string(),
                        what: "a generated public key that is not 32 bytes".into(),
                    }
                })?
            }
            Some(secret) => {
                unpanicked("IMPORT", || {
                    piv::import_cv_key(
                        &mut card.yk,
                        id,
                        alg,
                        secret.expose(),
                        piv_touch(touch_p),
                        piv_pin(pin_p),
                    )
                })?
                .map_err(|e| {
                    self.device_error(&format!("importing a key into slot {slot:02x}"), e)
                })?;
                *secret.public_key(algorithm).as_bytes()
            }
        };
        let imported = secret.is_some();
        drop(secret);
        // The card's own account of the slot must match what was made, or nothing is kept.
        let checked = match self.slot_contents(&mut card, slot)? {
            None => Err("it is empty"),
            Some(c) if c.algorithm != Some(algorithm) => {
                Err("its metadata shows another algorithm")
            }
            Some(c) if c.public != Some(public) => Err("its metadata shows another public key"),
            Some(c) => Ok(c),
        };
        let contents = match checked {
            Ok(c) => c,
            Err(problem) => {
                let _ = card.raw.delete_key(slot.get());
                return Err(TokenError::BadTokenData {
                    token: self.summary.to_string(),
                    what: format!(
                        "slot {slot:02x} does not hold the key just {}: {problem}; the slot was cleared",
                        if imported { "imported" } else { "generated" }
                    ),
                });
            }
        };
        let entry = Entry::new(user_id, role, public);
        map.slots.insert(slot, entry.clone());
        if let Err(e) = map.save(&self.slot_map, self.serial) {
            // Without the map entry nobody would find the key: take it off the card again.
            let _ = card.raw.delete_key(slot.get());
            return Err(e);
        }
        self.key_info(slot, &entry, &contents)
    }

    /// The slot `key` names, if it is a PIV key of `algorithm`.
    fn slot_for(&self, key: &KeyInfo, algorithm: KeyAlgorithm) -> Result<RetiredSlot, TokenError> {
        let KeyBackend::Piv { slot, .. } = key.backend else {
            return Err(TokenError::OtherToken {
                role: key.role,
                user_id: key.user_id.clone(),
                token: self.summary.to_string(),
            });
        };
        if key.algorithm() != algorithm {
            return Err(TokenError::WrongAlgorithm {
                role: key.role,
                operation: match algorithm {
                    KeyAlgorithm::Ed25519 => "sign",
                    KeyAlgorithm::X25519 => "do X25519",
                },
            });
        }
        Ok(slot)
    }

    /// Tells the user (through the touch notice, outside any lock) when using `key` may wait
    /// for a touch. Returns whether it did.
    fn announce_touch(&self, key: &KeyInfo, slot: RetiredSlot) -> bool {
        let touch = match key.backend {
            KeyBackend::Piv {
                touch: Some(TouchPolicy::Always),
                ..
            } => true,
            KeyBackend::Piv {
                touch: Some(TouchPolicy::Cached),
                ..
            } => self
                .last_touch
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&slot)
                .is_none_or(|t| t.elapsed() >= TOUCH_CACHE),
            _ => false,
        };
        if touch && let Some(notice) = &self.touch_notice {
            notice(key);
        }
        touch
    }

    /// Records a touch that was given (the operation succeeded).
    fn touched(&self, slot: RetiredSlot) {
        self.last_touch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(slot, std::time::Instant::now());
    }

    /// For keys with PIN policy "always": the PIN again, right before the use. If the card
    /// refuses it (the PIN was changed meanwhile), it is forgotten and never sent again.
    fn reverify(&self, card: &mut Card, key: &KeyInfo) -> Result<(), TokenError> {
        if !matches!(
            key.backend,
            KeyBackend::Piv {
                pin: Some(PinPolicy::Always),
                ..
            }
        ) {
            return Ok(());
        }
        self.resend_pin(card)
    }

    /// After another program reset the card or selected an application on it: the
    /// connections back, PIV selected, and the PIN the card accepted at open sent again —
    /// once: if the card refuses it now (the PIN was changed), it is forgotten.
    fn recover(&self, card: &mut Card, reset: bool) -> Result<(), TokenError> {
        let lost = |e: &dyn std::fmt::Display| {
            self.device_error("getting the card back after another program used it", e)
        };
        if reset {
            // The crate reconnects with a reset of its own; ours then reconnects as is.
            unpanicked("SELECT", || card.yk.reconnect())?.map_err(|e| lost(&e))?;
            card.raw.reconnect().map_err(|e| lost(&e))?;
        } else {
            card.raw.select_piv().map_err(|e| lost(&e))?;
        }
        card.mgm_authenticated = false;
        self.resend_pin(card)
    }

    /// Sends the PIN the card accepted at open again. If the card refuses it now (the PIN
    /// was changed), it is forgotten, so it is never sent a second time.
    fn resend_pin(&self, card: &mut Card) -> Result<(), TokenError> {
        let Some(pin) = card.pin.take() else {
            return Err(TokenError::NoPin {
                token: self.summary.to_string(),
                reason: "the PIN was refused on an earlier re-verification; run the command again"
                    .into(),
            });
        };
        let result = send_pin(card, &self.summary.to_string(), &pin);
        if !matches!(
            result,
            Err(TokenError::WrongPin { .. } | TokenError::PivPinBlocked { .. })
        ) {
            card.pin = Some(pin);
        }
        result
    }

    fn card_refused(&self, operation: &str, slot: RetiredSlot, e: ApduError) -> TokenError {
        self.device_error(&format!("{operation} with slot {slot:02x}"), e)
    }

    /// Retired slots that hold a key but are not in the slot map: (slot, algorithm, origin).
    /// `keys adopt` can map them.
    #[allow(clippy::type_complexity)]
    pub fn unmapped_slots(
        &self,
    ) -> Result<Vec<(RetiredSlot, Option<KeyAlgorithm>, KeyOrigin)>, TokenError> {
        let map = SlotMap::load(&self.slot_map, self.serial)?;
        let mut card = self.card();
        let mut out = Vec::new();
        for slot in RetiredSlot::all() {
            if !map.slots.contains_key(&slot)
                && let Some(c) = self.slot_contents(&mut card, slot)?
            {
                out.push((slot, c.algorithm, c.origin));
            }
        }
        Ok(out)
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

    /// Records an existing key in `slot` as (`user_id`, `role`) in the slot map, e.g. on a
    /// new machine or after another tool put the key there. Nothing on the card changes.
    pub fn adopt(
        &self,
        user_id: &str,
        role: KeyRole,
        slot: RetiredSlot,
    ) -> Result<KeyInfo, TokenError> {
        check_user_id(user_id)?;
        let mut card = self.card();
        let mut map = SlotMap::load(&self.slot_map, self.serial)?;
        if let Some(e) = map.slots.get(&slot) {
            return Err(TokenError::SlotMapped {
                slot,
                role: e.role,
                user_id: e.user_id.clone(),
            });
        }
        let contents =
            self.slot_contents(&mut card, slot)?
                .ok_or_else(|| TokenError::SlotEmpty {
                    token: self.summary.to_string(),
                    slot,
                })?;
        let (Some(public), true) = (
            contents.public,
            contents.algorithm == Some(role.algorithm()),
        ) else {
            return Err(TokenError::SlotAlgorithm {
                slot,
                algorithm: role.algorithm(),
                role,
            });
        };
        let entry = Entry::new(user_id, role, public);
        let key = self.key_info(slot, &entry, &contents)?;
        map.slots.insert(slot, entry);
        map.save(&self.slot_map, self.serial)?;
        Ok(key)
    }

    /// The attestation of `key` (generated keys only), verified up to one of `roots`: the
    /// slot certificate must be signed by this card's attestation certificate (5FFF01), name
    /// this card's serial, and state the policies the card's metadata reports.
    pub fn attest(
        &self,
        key: &KeyInfo,
        roots: &[attestation::Root],
    ) -> Result<attestation::Attestation, TokenError> {
        let KeyBackend::Piv {
            slot, pin, touch, ..
        } = key.backend
        else {
            return Err(TokenError::OtherToken {
                role: key.role,
                user_id: key.user_id.clone(),
                token: self.summary.to_string(),
            });
        };
        let id = slot_id(slot)?;
        let mut card = self.card();
        let leaf = unpanicked("ATTEST", || piv::attest(&mut card.yk, id))?.map_err(|e| {
            let hint = if key.origin == KeyOrigin::Generated {
                String::new()
            } else {
                format!(
                    " (a YubiKey attests only keys generated on it; this one is {})",
                    key.origin.as_str()
                )
            };
            self.device_error(&format!("attesting slot {slot:02x}"), format!("{e}{hint}"))
        })?;
        let f9 = unpanicked("GET DATA", || card.yk.fetch_object(0x005f_ff01))?
            .map_err(|e| self.device_error("reading the attestation certificate (5FFF01)", e))?;
        drop(card);
        let bad = |what: String| TokenError::BadTokenData {
            token: self.summary.to_string(),
            what,
        };
        // The object is 70 <certificate> 71 <info> [FE <LRC>].
        let device =
            first_tlv(&f9, 0x70).ok_or_else(|| bad("object 5FFF01 holds no certificate".into()))?;
        let a = attestation::verify(
            &leaf,
            device,
            &attestation::yubico_intermediates(),
            roots,
            key.public_key.as_bytes(),
        )
        .map_err(|e| {
            bad(format!(
                "the attestation of slot {slot:02x} does not verify: {e}"
            ))
        })?;
        if a.serial != Some(self.serial) {
            return Err(bad(format!(
                "the attestation of slot {slot:02x} names serial {:?}, not this card's {}",
                a.serial, self.serial
            )));
        }
        let expected = pin.zip(touch).map(|(p, t)| [pin_code(p), touch_code(t)]);
        if a.policy.is_some() && a.policy != expected {
            return Err(bad(format!(
                "the attestation of slot {slot:02x} states other policies ({:?}) than the card's metadata ({:?})",
                a.policy, expected
            )));
        }
        Ok(a)
    }
}

/// The PIV encodings of the policies, as in attestation certificates.
fn pin_code(p: PinPolicy) -> u8 {
    match p {
        PinPolicy::Never => 1,
        PinPolicy::Once => 2,
        PinPolicy::Always => 3,
    }
}

fn touch_code(t: TouchPolicy) -> u8 {
    match t {
        TouchPolicy::Never => 1,
        TouchPolicy::Always => 2,
        TouchPolicy::Cached => 3,
    }
}

/// A slot-map entry and what the card holds in its slot ([`YubiKeyStore::audit`]).
#[derive(Debug)]
pub struct SlotAudit {
    pub slot: RetiredSlot,
    pub entry: Entry,
    /// The key, or why the card contradicts the map (such an entry is never used).
    pub state: Result<KeyInfo, SlotProblem>,
}

/// How the card contradicts a slot-map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SlotProblem {
    #[error("the slot is empty")]
    Empty,
    #[error("the slot holds another key than the one mxhsm put there")]
    OtherKey,
    #[error("the slot holds a key of another algorithm")]
    OtherAlgorithm,
}

struct SlotContents {
    algorithm: Option<KeyAlgorithm>,
    public: Option<[u8; 32]>,
    policy: Option<(PinPolicy, TouchPolicy)>,
    origin: KeyOrigin,
}

fn describe(e: &YubiKeyEntry) -> String {
    format!(
        "YubiKey serial {} (firmware {}, {})",
        e.serial, e.firmware, e.reader
    )
}

fn release(found: Vec<YubiKey>) {
    for yk in found {
        let _ = yk.disconnect(pcsc::Disposition::LeaveCard);
    }
}

/// Reads the retry counter, asks `pins` for the PIN (unless it is blocked) and sends it
/// once. The card keeps it for keys with PIN policy "always".
fn verify_pin(
    card: &mut Card,
    summary: &TokenSummary,
    pins: &dyn PinProvider,
) -> Result<PinStatus, TokenError> {
    let token = summary.to_string();
    let retries =
        unpanicked("VERIFY", || card.yk.get_pin_retries())?.map_err(|e| TokenError::Device {
            token: token.clone(),
            operation: "reading the PIN retry counter".into(),
            reason: e.to_string(),
        })?;
    let status = pin_status(retries);
    if retries == 0 {
        return Err(TokenError::PivPinBlocked { token });
    }
    let pin = pins.pin(&PinRequest {
        token: token.clone(),
        status,
    })?;
    // A PIV PIN is 6 to 8 bytes: anything else would be refused by the card and cost a try.
    let len = pin.expose_secret().len();
    if !(6..=8).contains(&len) {
        return Err(TokenError::NoPin {
            token,
            reason: format!(
                "a PIV PIN is 6 to 8 bytes long, this one is {len}; nothing was sent to the card"
            ),
        });
    }
    let pin = Zeroizing::new(pin.expose_secret().as_bytes().to_vec());
    send_pin(card, &token, &pin)?;
    card.pin = Some(pin);
    Ok(status)
}

/// VERIFY, sent by mxhsm itself from zeroized buffers (the crate would keep a copy of the
/// PIN in a buffer it never wipes).
fn send_pin(card: &mut Card, token: &str, pin: &[u8]) -> Result<(), TokenError> {
    match card.raw.verify_pin(pin) {
        Ok(()) => Ok(()),
        Err(ApduError::Status(0x6983)) | Err(ApduError::Status(0x63c0)) => {
            Err(TokenError::PivPinBlocked {
                token: token.to_string(),
            })
        }
        Err(ApduError::Status(sw)) if sw & 0xfff0 == 0x63c0 => Err(TokenError::WrongPin {
            token: token.to_string(),
            status: pin_status((sw & 0x0f) as u8),
        }),
        Err(e) => Err(TokenError::Device {
            token: token.to_string(),
            operation: "verifying the PIN".into(),
            reason: e.to_string(),
        }),
    }
}

fn pin_status(retries: u8) -> PinStatus {
    PinStatus {
        count_low: false,
        final_try: retries == 1,
        locked: retries == 0,
        retries: Some(retries.into()),
    }
}

/// PIN once for every key; touch always for the master key, cached for the others.
fn default_policy(role: KeyRole, options: &KeyOptions) -> (PinPolicy, TouchPolicy) {
    (
        options.pin_policy.unwrap_or(PinPolicy::Once),
        options.touch_policy.unwrap_or(match role {
            KeyRole::Master => TouchPolicy::Always,
            _ => TouchPolicy::Cached,
        }),
    )
}

fn slot_id(slot: RetiredSlot) -> Result<SlotId, TokenError> {
    SlotId::try_from(slot.get()).map_err(|_| TokenError::NotRetiredSlot(slot.get()))
}

fn piv_pin(p: PinPolicy) -> yubikey::PinPolicy {
    match p {
        PinPolicy::Never => yubikey::PinPolicy::Never,
        PinPolicy::Once => yubikey::PinPolicy::Once,
        PinPolicy::Always => yubikey::PinPolicy::Always,
    }
}

fn piv_touch(t: TouchPolicy) -> yubikey::TouchPolicy {
    match t {
        TouchPolicy::Never => yubikey::TouchPolicy::Never,
        TouchPolicy::Always => yubikey::TouchPolicy::Always,
        TouchPolicy::Cached => yubikey::TouchPolicy::Cached,
    }
}

fn pin_policy(p: yubikey::PinPolicy) -> Option<PinPolicy> {
    match p {
        yubikey::PinPolicy::Never => Some(PinPolicy::Never),
        yubikey::PinPolicy::Once => Some(PinPolicy::Once),
        yubikey::PinPolicy::Always => Some(PinPolicy::Always),
        _ => None,
    }
}

fn touch_policy(t: yubikey::TouchPolicy) -> Option<TouchPolicy> {
    match t {
        yubikey::TouchPolicy::Never => Some(TouchPolicy::Never),
        yubikey::TouchPolicy::Always => Some(TouchPolicy::Always),
        yubikey::TouchPolicy::Cached => Some(TouchPolicy::Cached),
        _ => None,
    }
}

/// The value of the first TLV with `tag` in a sequence of BER-TLVs.
/// The value of the first TLV with `tag` in a sequence of TLVs (the object 5FFF01).
pub fn first_tlv(mut data: &[u8], tag: u8) -> Option<&[u8]> {
    while let Some((t, value, rest)) = apdu::split_tlv(data) {
        if t == tag {
            return Some(value);
        }
        data = rest;
    }
    None
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
