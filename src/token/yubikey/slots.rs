//! What the retired slots hold: the card's metadata against the slot map, choosing a slot,
//! creating a key in it, adopting one, attesting one.

use yubikey::piv::{self, AlgorithmId, SlotAlgorithmId, SlotId};

use super::apdu::ApduError;
use super::discovery::unpanicked;
use super::policy::{
    default_policy, pin_code, pin_policy, piv_pin, piv_touch, touch_code, touch_policy,
};
use super::slot_map::{Entry, SlotMap};
use super::{Card, TOUCH_CACHE, YubiKeyStore, apdu, attestation};
use crate::token::{
    KeyAlgorithm, KeyBackend, KeyInfo, KeyOptions, KeyOrigin, KeyProtection, KeyRole, PinPolicy,
    PublicKey, RetiredSlot, SecretKeyBytes, TokenError, TouchPolicy, check_user_id,
};

impl YubiKeyStore {
    /// What `slot` holds: (algorithm, public key, policy, origin), or `None` when empty.
    pub(super) fn slot_contents(
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

    pub(super) fn key_info(
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
    pub(super) fn choose_slot(
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
    pub(super) fn create(
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
    pub(super) fn slot_for(
        &self,
        key: &KeyInfo,
        algorithm: KeyAlgorithm,
    ) -> Result<RetiredSlot, TokenError> {
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
    pub(super) fn announce_touch(&self, key: &KeyInfo, slot: RetiredSlot) -> bool {
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
    pub(super) fn touched(&self, slot: RetiredSlot) {
        self.last_touch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(slot, std::time::Instant::now());
    }

    pub(super) fn card_refused(
        &self,
        operation: &str,
        slot: RetiredSlot,
        e: ApduError,
    ) -> TokenError {
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

pub(super) struct SlotContents {
    pub(super) algorithm: Option<KeyAlgorithm>,
    pub(super) public: Option<[u8; 32]>,
    pub(super) policy: Option<(PinPolicy, TouchPolicy)>,
    pub(super) origin: KeyOrigin,
}

pub(super) fn slot_id(slot: RetiredSlot) -> Result<SlotId, TokenError> {
    SlotId::try_from(slot.get()).map_err(|_| TokenError::NotRetiredSlot(slot.get()))
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
