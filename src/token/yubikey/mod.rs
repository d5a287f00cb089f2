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
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use secrecy::{ExposeSecret, SecretString};
use yubikey::piv::{self, AlgorithmId, ManagementSlotId, SlotAlgorithmId, SlotId};
use yubikey::{MgmAlgorithmId, MgmKey, YubiKey};
use zeroize::Zeroizing;

use super::{
    Capabilities, KeyAlgorithm, KeyInfo, KeyLocator, KeyOptions, KeyOrigin, KeyProtection, KeyRole,
    KeyStore, PinPolicy, PinProvider, PinRequest, PinStatus, SecretKeyBytes, SharedSecret,
    TokenError, TokenSummary, TouchPolicy, X25519Mechanism, check_user_id,
};
use apdu::{ApduError, RawCard};
use slot_map::{Entry, SlotMap};

/// The first firmware with Ed25519 and X25519 in PIV.
pub const MIN_FIRMWARE: (u8, u8) = (5, 7);

/// The retired key-management slots mxhsm uses.
pub const RETIRED_SLOTS: std::ops::RangeInclusive<u8> = 0x82..=0x95;

/// Whether `slot` is one of the retired slots.
pub fn is_retired_slot(slot: u8) -> bool {
    RETIRED_SLOTS.contains(&slot)
}

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
pub fn list_yubikeys() -> Result<Vec<YubiKeyEntry>, TokenError> {
    Ok(open_all()?
        .into_iter()
        .map(|yk| {
            let entry = entry_of(&yk);
            let _ = yk.disconnect(pcsc::Disposition::LeaveCard);
            entry
        })
        .collect())
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

fn open_all() -> Result<Vec<YubiKey>, TokenError> {
    let mut ctx = match yubikey::reader::Context::open() {
        Ok(c) => c,
        Err(e) => return Err(pcsc_error("listing readers", e)),
    };
    let readers = match ctx.iter() {
        Ok(r) => r,
        Err(yubikey::Error::PcscError {
            inner: Some(pcsc::Error::NoReadersAvailable),
        }) => return Ok(Vec::new()),
        Err(e) => return Err(pcsc_error("listing readers", e)),
    };
    // A reader without a YubiKey (or in exclusive use elsewhere) does not open: skip it.
    Ok(readers.filter_map(|r| r.open().ok()).collect())
}

/// A YubiKey's PIV application as a [`KeyStore`].
pub struct YubiKeyStore {
    card: Mutex<Card>,
    summary: TokenSummary,
    capabilities: Capabilities,
    serial: u32,
    slot_map: PathBuf,
    management_key: ManagementKey,
    /// The PIN the card accepted at open, for keys with PIN policy "always".
    pin: SecretString,
    pin_status_before: PinStatus,
    touch_notice: Option<Box<TouchNotice>>,
    _process_lock: std::fs::File,
}

/// Called before an operation that may wait for a touch (the key blinks until touched).
pub type TouchNotice = dyn Fn(&KeyInfo) + Send + Sync;

/// How long a YubiKey remembers a touch for keys with touch policy "cached".
const TOUCH_CACHE: std::time::Duration = std::time::Duration::from_secs(15);

struct Card {
    yk: YubiKey,
    raw: RawCard,
    mgm_authenticated: bool,
    /// When each slot last needed a touch, for the "cached" policy.
    last_touch: std::collections::HashMap<u8, std::time::Instant>,
}

impl YubiKeyStore {
    /// Opens the YubiKey (by serial when given), reads its PIN retry counter and verifies
    /// the PIN from `pins` once.
    pub fn open(options: YubiKeyOptions, pins: &dyn PinProvider) -> Result<Self, TokenError> {
        let mut found = open_all()?;
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
            let available = found.iter().map(|yk| describe(&entry_of(yk))).collect();
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
        let lock = super::process_lock::lock_yubikey(entry.serial)?;
        let raw = RawCard::connect(&entry.reader).map_err(|e| TokenError::Device {
            token: summary.to_string(),
            operation: "connecting".into(),
            reason: e.to_string(),
        })?;
        let mut card = Card {
            yk,
            raw,
            mgm_authenticated: false,
            last_touch: Default::default(),
        };
        let (pin, pin_status_before) = verify_pin(&mut card.yk, &summary, pins)?;
        Ok(YubiKeyStore {
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
            pin,
            pin_status_before,
            touch_notice: None,
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
        let meta = piv::metadata(
            &mut card.yk,
            SlotId::Management(ManagementSlotId::Management),
        )
        .map_err(|e| self.device_error("reading the management key's metadata", e))?;
        let alg = match meta.algorithm {
            SlotAlgorithmId::Management(a) => a,
            _ => MgmAlgorithmId::Aes192,
        };
        let key = match &self.management_key {
            ManagementKey::Given(bytes) => MgmKey::from_bytes(bytes.as_slice(), Some(alg))
                .map_err(|_| {
                    TokenError::InvalidInput(format!(
                        "the management key given has {} bytes; the card's is {alg:?}",
                        bytes.len()
                    ))
                })?,
            ManagementKey::Auto if meta.default == Some(true) => MgmKey::get_default(&card.yk)
                .map_err(|e| self.device_error("using the default management key", e))?,
            ManagementKey::Auto => MgmKey::get_protected(&mut card.yk).map_err(|_| {
                TokenError::InvalidInput(format!(
                    "{} has a non-default management key that is not PIN-protected on the card; give it with --management-key-file",
                    self.summary
                ))
            })?,
        };
        card.yk.authenticate(&key).map_err(|e| match e {
            yubikey::Error::AuthenticationError => {
                TokenError::InvalidInput(format!("{} refused the management key", self.summary))
            }
            e => self.device_error("authenticating with the management key", e),
        })?;
        card.mgm_authenticated = true;
        Ok(())
    }

    /// What `slot` holds: (algorithm, public key, policy, origin), or `None` when empty.
    fn slot_contents(&self, card: &mut Card, slot: u8) -> Result<Option<SlotContents>, TokenError> {
        let id = slot_id(slot)?;
        match piv::metadata(&mut card.yk, id) {
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

    fn key_info(&self, slot: u8, entry: &Entry, contents: &SlotContents) -> KeyInfo {
        KeyInfo {
            user_id: entry.user_id.clone(),
            role: entry.role,
            created_ms: Some(entry.created_ms),
            public_key: entry.public_key,
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
            },
            x25519_mechanism: (entry.role.algorithm() == KeyAlgorithm::X25519)
                .then_some(X25519Mechanism::Piv),
            locator: KeyLocator::Piv { slot },
            piv_policy: contents.policy,
        }
    }

    /// Every slot-map entry with what the card holds there; `Err` for entries the card
    /// contradicts (empty slot, other key), which are never used.
    pub fn audit(&self) -> Result<Vec<AuditEntry>, TokenError> {
        let map = SlotMap::load(&self.slot_map, self.serial)?;
        let mut card = self.card();
        let mut out = Vec::new();
        for (slot, entry) in map.slots {
            let state = match self.slot_contents(&mut card, slot)? {
                None => Err(format!("slot {slot:02x} is empty")),
                Some(c) if c.public != Some(entry.public_key) => Err(format!(
                    "slot {slot:02x} holds another key than the one mxhsm put there"
                )),
                Some(c) if c.algorithm != Some(entry.role.algorithm()) => {
                    Err(format!("slot {slot:02x} holds a key of another algorithm"))
                }
                Some(c) => Ok(self.key_info(slot, &entry, &c)),
            };
            out.push((slot, entry, state));
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
    ) -> Result<u8, TokenError> {
        if let Some(slot) = options.slot {
            if !is_retired_slot(slot) {
                return Err(TokenError::InvalidInput(format!(
                    "slot {slot:02x} is not a retired key-management slot (82 to 95)"
                )));
            }
            if !options.force {
                if let Some(e) = map.slots.get(&slot) {
                    return Err(TokenError::InvalidInput(format!(
                        "slot {slot:02x} of {} holds the {} key of {}; pass --force to overwrite it",
                        self.summary, e.role, e.user_id
                    )));
                }
                if let Some(c) = self.slot_contents(card, slot)? {
                    return Err(TokenError::InvalidInput(format!(
                        "slot {slot:02x} of {} already holds a key ({}, {}); pass --force to overwrite it",
                        self.summary,
                        c.algorithm
                            .map(|a| a.to_string())
                            .unwrap_or_else(|| "another algorithm".into()),
                        c.origin.as_str()
                    )));
                }
            }
            return Ok(slot);
        }
        for slot in RETIRED_SLOTS {
            if !map.slots.contains_key(&slot) && self.slot_contents(card, slot)?.is_none() {
                return Ok(slot);
            }
        }
        Err(TokenError::InvalidInput(format!(
            "all 20 retired slots of {} are in use; delete a key first",
            self.summary
        )))
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
        self.authenticate(&mut card)?;
        let id = slot_id(slot)?;
        let alg = match algorithm {
            KeyAlgorithm::Ed25519 => AlgorithmId::Ed25519,
            KeyAlgorithm::X25519 => AlgorithmId::X25519,
        };
        let public = match &secret {
            None => {
                let spki = piv::generate(&mut card.yk, id, alg, piv_pin(pin_p), piv_touch(touch_p))
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
                piv::import_cv_key(
                    &mut card.yk,
                    id,
                    alg,
                    secret.expose(),
                    piv_touch(touch_p),
                    piv_pin(pin_p),
                )
                .map_err(|e| {
                    self.device_error(&format!("importing a key into slot {slot:02x}"), e)
                })?;
                secret.public_key(algorithm)
            }
        };
        let imported = secret.is_some();
        drop(secret);
        // The card's own account of the slot must match what was made, or nothing is kept.
        let contents = self.slot_contents(&mut card, slot)?;
        let proven = contents
            .as_ref()
            .is_some_and(|c| c.public == Some(public) && c.algorithm == Some(algorithm));
        if !proven {
            let _ = card.raw.delete_key(slot);
            return Err(TokenError::BadTokenData {
                token: self.summary.to_string(),
                what: format!(
                    "slot {slot:02x} does not hold the key just {} (its metadata shows another public key); the slot was cleared",
                    if imported { "imported" } else { "generated" }
                ),
            });
        }
        let entry = Entry {
            user_id: user_id.to_string(),
            role,
            public_key: public,
            created_ms: now_ms(),
        };
        map.slots.insert(slot, entry.clone());
        if let Err(e) = map.save(&self.slot_map, self.serial) {
            // Without the map entry nobody would find the key: take it off the card again.
            let _ = card.raw.delete_key(slot);
            return Err(e);
        }
        Ok(self.key_info(slot, &entry, contents.as_ref().expect("proven above")))
    }

    /// Before using `key`: the slot it names, with a fresh PIN verification when its PIN
    /// policy is "always".
    fn prepare(
        &self,
        card: &mut Card,
        key: &KeyInfo,
        algorithm: KeyAlgorithm,
    ) -> Result<u8, TokenError> {
        let KeyLocator::Piv { slot } = key.locator else {
            return Err(TokenError::InvalidInput(format!(
                "the {} key of {} is not on {}",
                key.role, key.user_id, self.summary
            )));
        };
        if key.algorithm() != algorithm {
            return Err(TokenError::InvalidInput(format!(
                "the {} key is not an {algorithm} key",
                key.role
            )));
        }
        let touch = match key.piv_policy {
            Some((_, TouchPolicy::Always)) => true,
            Some((_, TouchPolicy::Cached)) => card
                .last_touch
                .get(&slot)
                .is_none_or(|t| t.elapsed() >= TOUCH_CACHE),
            _ => false,
        };
        if touch {
            if let Some(notice) = &self.touch_notice {
                notice(key);
            }
            card.last_touch.insert(slot, std::time::Instant::now());
        }
        if matches!(key.piv_policy, Some((PinPolicy::Always, _))) {
            card.yk
                .verify_pin(self.pin.expose_secret().as_bytes())
                .map_err(|e| self.device_error("verifying the PIN again (PIN policy always)", e))?;
        }
        Ok(slot)
    }

    fn card_refused(&self, operation: &str, slot: u8, e: ApduError) -> TokenError {
        self.device_error(&format!("{operation} with slot {slot:02x}"), e)
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
    pub fn adopt(&self, user_id: &str, role: KeyRole, slot: u8) -> Result<KeyInfo, TokenError> {
        check_user_id(user_id)?;
        slot_id(slot)?;
        let mut card = self.card();
        let mut map = SlotMap::load(&self.slot_map, self.serial)?;
        if let Some(e) = map.slots.get(&slot) {
            return Err(TokenError::InvalidInput(format!(
                "slot {slot:02x} is already mapped to the {} key of {}",
                e.role, e.user_id
            )));
        }
        let contents = self.slot_contents(&mut card, slot)?.ok_or_else(|| {
            TokenError::InvalidInput(format!("slot {slot:02x} of {} is empty", self.summary))
        })?;
        let (Some(public), true) = (
            contents.public,
            contents.algorithm == Some(role.algorithm()),
        ) else {
            return Err(TokenError::InvalidInput(format!(
                "slot {slot:02x} does not hold an {} key, which a {role} key needs",
                role.algorithm()
            )));
        };
        let entry = Entry {
            user_id: user_id.to_string(),
            role,
            public_key: public,
            created_ms: now_ms(),
        };
        map.slots.insert(slot, entry.clone());
        map.save(&self.slot_map, self.serial)?;
        Ok(self.key_info(slot, &entry, &contents))
    }

    /// The attestation of `key` (generated keys only), verified up to one of `roots`.
    pub fn attest(
        &self,
        key: &KeyInfo,
        roots: &[attestation::Root],
    ) -> Result<attestation::Attestation, TokenError> {
        let KeyLocator::Piv { slot } = key.locator else {
            return Err(TokenError::InvalidInput("not a PIV key".into()));
        };
        let mut card = self.card();
        let leaf = piv::attest(&mut card.yk, slot_id(slot)?).map_err(|e| {
            self.device_error(
                &format!("attesting slot {slot:02x}"),
                format!(
                    "{e} (a YubiKey attests only keys generated on it; this one is {})",
                    key.origin.as_str()
                ),
            )
        })?;
        let f9 = card
            .yk
            .fetch_object(0x005f_ff01)
            .map_err(|e| self.device_error("reading the attestation certificate (5FFF01)", e))?;
        // The object is 70 <certificate> 71 <info> [FE <LRC>].
        let f9_cert = first_tlv(&f9, 0x70).ok_or_else(|| TokenError::BadTokenData {
            token: self.summary.to_string(),
            what: "object 5FFF01 holds no certificate".into(),
        })?;
        let mut pool = vec![f9_cert.to_vec()];
        pool.extend(attestation::yubico_intermediates());
        attestation::verify(&leaf, &pool, roots, &key.public_key).map_err(|e| {
            TokenError::BadTokenData {
                token: self.summary.to_string(),
                what: format!("the attestation of slot {slot:02x} does not verify: {e}"),
            }
        })
    }
}

/// A slot-map entry and what the card holds in its slot ([`YubiKeyStore::audit`]).
pub type AuditEntry = (u8, Entry, Result<KeyInfo, String>);

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

fn verify_pin(
    yk: &mut YubiKey,
    summary: &TokenSummary,
    pins: &dyn PinProvider,
) -> Result<(SecretString, PinStatus), TokenError> {
    let token = summary.to_string();
    let retries = yk.get_pin_retries().map_err(|e| TokenError::Device {
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
                "a PIV PIN has 6 to 8 characters, this one has {len}; nothing was sent to the card"
            ),
        });
    }
    match yk.verify_pin(pin.expose_secret().as_bytes()) {
        Ok(()) => Ok((pin, status)),
        Err(yubikey::Error::WrongPin { tries: 0 }) => Err(TokenError::PivPinBlocked { token }),
        Err(yubikey::Error::WrongPin { tries }) => Err(TokenError::WrongPin {
            token,
            status: pin_status(tries),
        }),
        Err(e) => Err(TokenError::Device {
            token,
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

fn slot_id(slot: u8) -> Result<SlotId, TokenError> {
    if !is_retired_slot(slot) {
        return Err(TokenError::InvalidInput(format!(
            "slot {slot:02x} is not a retired key-management slot (82 to 95)"
        )));
    }
    SlotId::try_from(slot).map_err(|_| TokenError::InvalidInput(format!("bad slot {slot:02x}")))
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

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The value of the first TLV with `tag` in a sequence of BER-TLVs.
fn first_tlv(mut data: &[u8], tag: u8) -> Option<&[u8]> {
    while data.len() >= 2 {
        let t = data[0];
        let (len, hdr) = match data[1] {
            n if n < 0x80 => (n as usize, 2),
            0x81 => (*data.get(2)? as usize, 3),
            0x82 => (
                u16::from_be_bytes([*data.get(2)?, *data.get(3)?]) as usize,
                4,
            ),
            _ => return None,
        };
        let value = data.get(hdr..hdr + len)?;
        if t == tag {
            return Some(value);
        }
        data = &data[hdr + len..];
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
            .filter_map(|(_, _, state)| state.ok())
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
        let mut card = self.card();
        let slot = self.prepare(&mut card, key, KeyAlgorithm::Ed25519)?;
        let sig = card
            .raw
            .sign_ed25519(slot, message)
            .map_err(|e| self.card_refused("signing", slot, e))?;
        // A signature that does not verify is never handed on (it would be published).
        let vk = ed25519_dalek::VerifyingKey::from_bytes(&key.public_key).map_err(|_| {
            TokenError::BadTokenData {
                token: self.summary.to_string(),
                what: "an invalid Ed25519 public key".into(),
            }
        })?;
        vk.verify_strict(message, &ed25519_dalek::Signature::from_bytes(&sig))
            .map_err(|_| TokenError::BadTokenData {
                token: self.summary.to_string(),
                what: format!(
                    "slot {slot:02x} returned a signature that does not verify with its public key"
                ),
            })?;
        Ok(sig)
    }

    fn x25519(&self, key: &KeyInfo, peer_public: &[u8; 32]) -> Result<SharedSecret, TokenError> {
        let mut card = self.card();
        let slot = self.prepare(&mut card, key, KeyAlgorithm::X25519)?;
        let out = piv::decrypt_data(
            &mut card.yk,
            peer_public,
            AlgorithmId::X25519,
            slot_id(slot)?,
        )
        .map_err(|e| self.device_error(&format!("X25519 with slot {slot:02x}"), e))?;
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
        let KeyLocator::Piv { slot } = key.locator else {
            return Err(TokenError::InvalidInput("not a PIV key".into()));
        };
        let mut card = self.card();
        let mut map = SlotMap::load(&self.slot_map, self.serial)?;
        if map.slots.get(&slot).map(|e| e.public_key) != Some(key.public_key) {
            return Err(TokenError::InvalidInput(format!(
                "slot {slot:02x} of {} is not mapped to that key",
                self.summary
            )));
        }
        match self.slot_contents(&mut card, slot)? {
            // Already gone: only the map entry is left to remove.
            None => {}
            Some(c) if c.public == Some(key.public_key) => {
                self.authenticate(&mut card)?;
                card.raw
                    .delete_key(slot)
                    .map_err(|e| self.card_refused("deleting the key", slot, e))?;
            }
            Some(_) => {
                return Err(TokenError::InvalidInput(format!(
                    "slot {slot:02x} of {} now holds another key than the {} key of {}; it was not deleted",
                    self.summary, key.role, key.user_id
                )));
            }
        }
        map.slots.remove(&slot);
        map.save(&self.slot_map, self.serial)
    }
}
