//! The hardware boundary: the only code in mxhsm that knows PKCS#11 or PIV.
//!
//! Everything above this module sees a token through the [`KeyStore`] trait: keys are
//! found by (Matrix user ID, [`KeyRole`]), several generations of a role may coexist until
//! the old one is deleted (the newest is the current one), and the only private-key
//! operations are an Ed25519 signature and an X25519 agreement, both done on the device.
//! Private keys never leave it: they are created sensitive and non-extractable, and
//! imported key material is zeroized as soon as the token has it.
//!
//! Backends: [`pkcs11`] (SoftHSM, Kryoptic, network HSMs, ykcs11 — any module) and, with
//! the `yubikey` feature, [`yubikey`] (a YubiKey's PIV application, firmware 5.7+).

pub mod audit;
pub mod pin;
pub mod pkcs11;
mod process_lock;
pub mod store;
#[cfg(feature = "yubikey")]
pub mod yubikey;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use zeroize::{Zeroize, ZeroizeOnDrop};

pub use crate::matrix::keys::{Curve25519PublicKey, KeyAlgorithm, KeyRole, PublicKey};
pub use pin::{PinProvider, PinRequest, PinStatus};
pub use store::{Backend, Store, StoreOptions, TokenChoice};

/// One of the 20 retired key-management slots of a YubiKey's PIV application
/// (0x82..=0x95), the only slots mxhsm puts keys in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RetiredSlot(u8);

impl RetiredSlot {
    const RANGE: std::ops::RangeInclusive<u8> = 0x82..=0x95;

    pub fn new(slot: u8) -> Result<Self, TokenError> {
        if Self::RANGE.contains(&slot) {
            Ok(RetiredSlot(slot))
        } else {
            Err(TokenError::NotRetiredSlot(slot))
        }
    }

    /// Every retired slot, in order.
    pub fn all() -> impl Iterator<Item = RetiredSlot> {
        Self::RANGE.map(RetiredSlot)
    }

    pub fn get(self) -> u8 {
        self.0
    }
}

impl fmt::Display for RetiredSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}", self.0)
    }
}

impl fmt::LowerHex for RetiredSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(&self.0, f)
    }
}

/// A slot as a user writes it: hex, with or without `0x` (`82`, `0x95`).
impl FromStr for RetiredSlot {
    type Err = TokenError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = s.strip_prefix("0x").unwrap_or(s);
        match u8::from_str_radix(hex, 16) {
            Ok(n) if hex.len() == 2 => RetiredSlot::new(n),
            _ => Err(TokenError::UnknownName {
                what: "PIV slot",
                value: s.to_string(),
                expected: "a retired slot in hex, 82 to 95",
            }),
        }
    }
}

/// How a PKCS#11 token does X25519 (docs/tokens.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum X25519Mechanism {
    /// `CKM_EC_MONTGOMERY_KEY_PAIR_GEN` + `CKK_EC_MONTGOMERY` + `CKM_ECDH1_DERIVE`.
    Montgomery,
    /// SoftHSM 2.x: `CKM_EC_EDWARDS_KEY_PAIR_GEN` with curve25519 parameters, so the key is a
    /// `CKK_EC_EDWARDS` object, and `CKM_ECDH1_DERIVE` on it (softhsm/SoftHSMv2#647).
    SoftHsmEdwards,
    /// Not PKCS#11: a PIV slot's GENERAL AUTHENTICATE key agreement.
    Piv,
}

impl X25519Mechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            X25519Mechanism::Montgomery => "montgomery",
            X25519Mechanism::SoftHsmEdwards => "softhsm-edwards",
            X25519Mechanism::Piv => "piv",
        }
    }
}

/// What a token can do, probed from its mechanism list (never assumed from its name alone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    /// Ed25519 key generation and pure EdDSA signing.
    pub ed25519: bool,
    /// How X25519 agreement works on this token, if it can do it at all.
    pub x25519: Option<X25519Mechanism>,
    /// Whether existing keys can be imported (created from their secret bytes).
    pub import: bool,
}

impl Capabilities {
    /// Whether keys of `role` can be created and used on this token.
    pub fn supports(&self, role: KeyRole) -> bool {
        match role.algorithm() {
            KeyAlgorithm::Ed25519 => self.ed25519,
            KeyAlgorithm::X25519 => self.x25519.is_some(),
        }
    }

    /// A short human summary, e.g. `ed25519, x25519 (softhsm-edwards), import`.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        if self.ed25519 {
            parts.push("ed25519".to_string());
        }
        if let Some(m) = self.x25519 {
            parts.push(format!("x25519 ({})", m.as_str()));
        }
        if self.import {
            parts.push("import".to_string());
        }
        if parts.is_empty() {
            "none usable by mxhsm".to_string()
        } else {
            parts.join(", ")
        }
    }
}

/// How a private key came to be on the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOrigin {
    /// Generated on the device (`CKA_LOCAL`, PIV metadata origin "generated").
    Generated,
    /// Imported from outside (the key existed in software before).
    Imported,
    /// The token does not say.
    Unknown,
}

impl KeyOrigin {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyOrigin::Generated => "generated",
            KeyOrigin::Imported => "imported",
            KeyOrigin::Unknown => "unknown",
        }
    }
}

/// The protection attributes of a private key as the token reports them (`None`: not
/// reported).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyProtection {
    pub token: Option<bool>,
    pub private: Option<bool>,
    pub sensitive: Option<bool>,
    pub extractable: Option<bool>,
    pub always_sensitive: Option<bool>,
    pub never_extractable: Option<bool>,
    pub local: Option<bool>,
    /// What the key may be used for (`CKA_SIGN`, `CKA_DERIVE`, …) and whether the object
    /// can be changed or copied. PIV keys have no such attributes (`None`).
    pub sign: Option<bool>,
    pub derive: Option<bool>,
    pub decrypt: Option<bool>,
    pub unwrap: Option<bool>,
    pub sign_recover: Option<bool>,
    pub modifiable: Option<bool>,
    pub copyable: Option<bool>,
}

impl KeyProtection {
    /// Problems a security audit must flag for a key of `algorithm`: anything that would
    /// let the private key out, and any use beyond the one its role needs.
    pub fn problems(&self, algorithm: KeyAlgorithm) -> Vec<&'static str> {
        let mut out = self.exposure_problems();
        let own_use_only = match algorithm {
            KeyAlgorithm::Ed25519 => [
                (
                    self.derive,
                    "CKA_DERIVE is true (an Ed25519 key only signs)",
                ),
                (self.decrypt, "CKA_DECRYPT is true"),
            ],
            KeyAlgorithm::X25519 => [
                (self.sign, "CKA_SIGN is true (an X25519 key only derives)"),
                (self.decrypt, "CKA_DECRYPT is true"),
            ],
        };
        for (attr, problem) in own_use_only.into_iter().chain([
            (self.unwrap, "CKA_UNWRAP is true"),
            (self.sign_recover, "CKA_SIGN_RECOVER is true"),
            (
                self.modifiable,
                "CKA_MODIFIABLE is true (its attributes can be changed)",
            ),
            (self.copyable, "CKA_COPYABLE is true (it can be copied)"),
        ]) {
            if attr == Some(true) {
                out.push(problem);
            }
        }
        out
    }

    /// Problems that would let the private key out.
    fn exposure_problems(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.token != Some(true) {
            out.push("not a token (persistent) object");
        }
        if self.private != Some(true) {
            out.push("CKA_PRIVATE is not true");
        }
        if self.sensitive != Some(true) {
            out.push("CKA_SENSITIVE is not true");
        }
        if self.extractable != Some(false) {
            out.push("CKA_EXTRACTABLE is not false");
        }
        out
    }
}

/// One key on a token, as [`KeyStore::list_keys`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// The Matrix user ID the key belongs to.
    pub user_id: String,
    pub role: KeyRole,
    /// Creation time, milliseconds since the Unix epoch, when the token records it.
    pub created_ms: Option<u64>,
    /// Of the role's algorithm: the backends build it with [`PublicKey::new`] from
    /// `role.algorithm()`.
    pub public_key: PublicKey,
    pub origin: KeyOrigin,
    /// What the token reports of the private key (for a PIV slot, what its policies and
    /// origin mean in PKCS#11's terms), for the doctor's audit.
    pub protection: KeyProtection,
    /// Where the key lives on its token, and what only that kind of token knows of it.
    pub backend: KeyBackend,
}

impl KeyInfo {
    pub fn algorithm(&self) -> KeyAlgorithm {
        self.role.algorithm()
    }

    /// The public key as Matrix writes it: unpadded standard base64.
    pub fn public_key_base64(&self) -> String {
        self.public_key.to_base64()
    }

    /// The Ed25519 public key of a cross-signing key.
    pub fn ed25519(&self) -> Result<crate::matrix::keys::Ed25519PublicKey, TokenError> {
        self.public_key.ed25519().ok_or(TokenError::WrongAlgorithm {
            role: self.role,
            operation: "sign",
        })
    }

    /// The Curve25519 public key of a backup key.
    pub fn curve25519(&self) -> Result<Curve25519PublicKey, TokenError> {
        self.public_key
            .curve25519()
            .ok_or(TokenError::WrongAlgorithm {
                role: self.role,
                operation: "do X25519",
            })
    }

    /// For backup keys: how the token does X25519 with this key.
    pub fn x25519_mechanism(&self) -> Option<X25519Mechanism> {
        match &self.backend {
            KeyBackend::Pkcs11 { x25519, .. } => *x25519,
            KeyBackend::Piv { .. } => {
                (self.algorithm() == KeyAlgorithm::X25519).then_some(X25519Mechanism::Piv)
            }
        }
    }
}

/// Where a key is on its token, and what is specific to that kind of token.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeyBackend {
    /// A PKCS#11 key pair sharing this `CKA_ID` and `CKA_LABEL`; for a backup key, the
    /// mechanism the token does X25519 with.
    Pkcs11 {
        id: Vec<u8>,
        label: String,
        x25519: Option<X25519Mechanism>,
    },
    /// A retired PIV slot, with the PIN and touch policies the card reports for the key
    /// (`None` when the card does not report them).
    Piv {
        slot: RetiredSlot,
        pin: Option<PinPolicy>,
        touch: Option<TouchPolicy>,
    },
}

impl fmt::Display for KeyBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyBackend::Pkcs11 { id, .. } => {
                f.write_str("id=")?;
                for b in id {
                    write!(f, "{b:02x}")?;
                }
                Ok(())
            }
            KeyBackend::Piv { slot, .. } => write!(f, "slot {slot}"),
        }
    }
}

/// Options for creating a key. Backends ignore what does not apply to them (a PKCS#11
/// token has no touch policy).
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct KeyOptions {
    /// PIV: when the PIN is required for the key.
    pub pin_policy: Option<PinPolicy>,
    /// PIV: when a touch is required for the key.
    pub touch_policy: Option<TouchPolicy>,
    /// PIV: overwrite a slot that already holds a key.
    pub force: bool,
    /// PIV: the slot to use; by default the first free one.
    pub slot: Option<RetiredSlot>,
}

/// PIV PIN policy of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PinPolicy {
    Never,
    Once,
    Always,
}

impl PinPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            PinPolicy::Never => "never",
            PinPolicy::Once => "once",
            PinPolicy::Always => "always",
        }
    }
}

impl FromStr for PinPolicy {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "never" => Ok(PinPolicy::Never),
            "once" => Ok(PinPolicy::Once),
            "always" => Ok(PinPolicy::Always),
            other => Err(TokenError::UnknownName {
                what: "PIN policy",
                value: other.to_string(),
                expected: "never, once or always",
            }),
        }
    }
}

/// PIV touch policy of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TouchPolicy {
    Never,
    Always,
    Cached,
}

impl TouchPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            TouchPolicy::Never => "never",
            TouchPolicy::Always => "always",
            TouchPolicy::Cached => "cached",
        }
    }
}

impl FromStr for TouchPolicy {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "never" => Ok(TouchPolicy::Never),
            "always" => Ok(TouchPolicy::Always),
            "cached" => Ok(TouchPolicy::Cached),
            other => Err(TokenError::UnknownName {
                what: "touch policy",
                value: other.to_string(),
                expected: "never, always or cached",
            }),
        }
    }
}

/// Secret key bytes on their way onto a token: an Ed25519 seed (RFC 8032) or an X25519
/// scalar. Zeroized on drop, never printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct SecretKeyBytes([u8; 32]);

impl SecretKeyBytes {
    pub fn new(bytes: [u8; 32]) -> Self {
        SecretKeyBytes(bytes)
    }

    /// Takes the bytes from a slice that must be exactly 32 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, TokenError> {
        let arr: [u8; 32] = bytes.try_into().map_err(|_| {
            TokenError::BadPrivateKey(format!(
                "a private key must be 32 bytes, this one is {} bytes",
                bytes.len()
            ))
        })?;
        Ok(SecretKeyBytes(arr))
    }

    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }

    /// A private key as a key file holds it: base64 (padded or not, surrounding whitespace
    /// ignored, as secret storage writes it) or exactly 32 raw bytes.
    pub fn parse(raw: &[u8]) -> Result<Self, TokenError> {
        use base64::Engine;
        let decoded = std::str::from_utf8(raw)
            .ok()
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .and_then(|t| {
                base64::engine::general_purpose::STANDARD_NO_PAD
                    .decode(t.trim_end_matches('='))
                    .ok()
            })
            .map(zeroize::Zeroizing::new);
        if let Some(bytes) = &decoded
            && bytes.len() == 32
        {
            return Self::from_slice(bytes);
        }
        if raw.len() == 32 {
            return Self::from_slice(raw);
        }
        Err(TokenError::BadPrivateKey(match decoded {
            Some(bytes) => format!(
                "the base64 decodes to {} bytes; a private key is 32 bytes",
                bytes.len()
            ),
            None => format!(
                "not a private key (expected base64 of 32 bytes, or 32 raw bytes; got {} bytes that are neither)",
                raw.len()
            ),
        }))
    }

    /// The public key that belongs to this secret, for a key of `algorithm`.
    pub fn public_key(&self, algorithm: KeyAlgorithm) -> PublicKey {
        match algorithm {
            KeyAlgorithm::Ed25519 => PublicKey::Ed25519(
                ed25519_dalek::SigningKey::from_bytes(&self.0)
                    .verifying_key()
                    .into(),
            ),
            KeyAlgorithm::X25519 => {
                let secret = x25519_dalek::StaticSecret::from(self.0);
                PublicKey::Curve25519(Curve25519PublicKey::from_bytes(
                    x25519_dalek::PublicKey::from(&secret).to_bytes(),
                ))
            }
        }
    }
}

impl fmt::Debug for SecretKeyBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKeyBytes([redacted])")
    }
}

/// The 32-byte result of an X25519 agreement. Zeroized on drop, never printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct SharedSecret([u8; 32]);

impl SharedSecret {
    /// Wraps an agreement result, refusing the all-zero output of a non-contributory
    /// (small-order) peer key, as vodozemac does.
    pub fn new(bytes: [u8; 32]) -> Result<Self, TokenError> {
        let secret = SharedSecret(bytes);
        if secret.0.iter().fold(0u8, |acc, b| acc | b) == 0 {
            return Err(TokenError::NonContributory);
        }
        Ok(secret)
    }

    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for SharedSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SharedSecret([redacted])")
    }
}

/// Who and what a token is, for messages and `token list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSummary {
    /// e.g. `SoftHSM project` or `Yubico`.
    pub manufacturer: String,
    pub model: String,
    pub label: String,
    pub serial: String,
    /// The module path (PKCS#11) or reader name (PIV).
    pub source: String,
}

impl fmt::Display for TokenSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "token \"{}\" (serial {}, {} {})",
            self.label, self.serial, self.manufacturer, self.model
        )
    }
}

/// The newest key of each role among `keys` (one user's listing): the current ones. Of
/// two with the same creation time, the later in the listing.
pub fn newest_by_role<'a>(
    keys: impl IntoIterator<Item = &'a KeyInfo>,
) -> BTreeMap<KeyRole, &'a KeyInfo> {
    let mut current: BTreeMap<KeyRole, &KeyInfo> = BTreeMap::new();
    for key in keys {
        match current.get(&key.role) {
            Some(k) if k.created_ms > key.created_ms => {}
            _ => {
                current.insert(key.role, key);
            }
        }
    }
    current
}

/// A store of Matrix keys on one token.
///
/// Implementations are thread-safe: operations on different keys (or the same key) may
/// run concurrently; a backend that cannot run them in parallel serialises them.
pub trait KeyStore: Send + Sync {
    /// Which token this is.
    fn summary(&self) -> &TokenSummary;

    /// What the token can do.
    fn capabilities(&self) -> &Capabilities;

    /// Every mxhsm key on the token, or only `user_id`'s, oldest first within a role.
    fn list_keys(&self, user_id: Option<&str>) -> Result<Vec<KeyInfo>, TokenError>;

    /// Generates a key pair for (`user_id`, `role`) on the device. An existing key of the
    /// same role is kept; the new one becomes the current one.
    fn generate(
        &self,
        user_id: &str,
        role: KeyRole,
        options: &KeyOptions,
    ) -> Result<KeyInfo, TokenError>;

    /// Imports an existing private key for (`user_id`, `role`). `secret` is dropped (and so
    /// zeroized) before this returns.
    fn import(
        &self,
        user_id: &str,
        role: KeyRole,
        secret: SecretKeyBytes,
        options: &KeyOptions,
    ) -> Result<KeyInfo, TokenError>;

    /// A pure Ed25519 (RFC 8032) signature over exactly `message`.
    fn sign_ed25519(&self, key: &KeyInfo, message: &[u8]) -> Result<[u8; 64], TokenError>;

    /// X25519 of the key with a peer's public key. An all-zero result is an error
    /// ([`TokenError::NonContributory`]).
    fn x25519(
        &self,
        key: &KeyInfo,
        peer_public: &Curve25519PublicKey,
    ) -> Result<SharedSecret, TokenError>;

    /// Destroys the key (private and public objects).
    fn delete(&self, key: &KeyInfo) -> Result<(), TokenError>;

    /// The current (newest) key of each role `user_id` has, from one listing.
    fn current_keys(&self, user_id: &str) -> Result<BTreeMap<KeyRole, KeyInfo>, TokenError> {
        let keys = self.list_keys(Some(user_id))?;
        Ok(newest_by_role(&keys)
            .into_iter()
            .map(|(role, key)| (role, key.clone()))
            .collect())
    }

    /// The current (newest) key of `role` for `user_id`.
    fn find_key(&self, user_id: &str, role: KeyRole) -> Result<KeyInfo, TokenError> {
        self.current_keys(user_id)?
            .remove(&role)
            .ok_or_else(|| TokenError::KeyNotFound {
                user_id: user_id.to_string(),
                role,
                token: self.summary().to_string(),
            })
    }
}

/// A key on a token as a Matrix signer.
pub struct TokenSigner<'a> {
    store: &'a dyn KeyStore,
    key: KeyInfo,
    public: crate::matrix::keys::Ed25519PublicKey,
}

impl<'a> TokenSigner<'a> {
    /// Refuses a key that is not Ed25519 (a backup key).
    pub fn new(store: &'a dyn KeyStore, key: KeyInfo) -> Result<Self, TokenError> {
        let public = key.ed25519()?;
        Ok(TokenSigner { store, key, public })
    }

    pub fn key(&self) -> &KeyInfo {
        &self.key
    }
}

impl crate::matrix::signed_json::Ed25519Signer for TokenSigner<'_> {
    fn public_key(&self) -> crate::matrix::keys::Ed25519PublicKey {
        self.public
    }
    fn sign(&self, message: &[u8]) -> Result<[u8; 64], crate::matrix::signed_json::SignError> {
        self.store
            .sign_ed25519(&self.key, message)
            .map_err(crate::matrix::signed_json::SignError::new)
    }
}

/// A backup key on a token as an X25519 agreement for key-backup decryption.
pub struct TokenAgreement<'a> {
    store: &'a dyn KeyStore,
    key: KeyInfo,
    public: Curve25519PublicKey,
}

impl<'a> TokenAgreement<'a> {
    /// Refuses a key that is not X25519 (a cross-signing key).
    pub fn new(store: &'a dyn KeyStore, key: KeyInfo) -> Result<Self, TokenError> {
        let public = key.curve25519()?;
        Ok(TokenAgreement { store, key, public })
    }

    pub fn key(&self) -> &KeyInfo {
        &self.key
    }

    pub fn store(&self) -> &'a dyn KeyStore {
        self.store
    }
}

impl crate::matrix::backup::X25519Agreement for TokenAgreement<'_> {
    fn public_key(&self) -> Curve25519PublicKey {
        self.public
    }
    fn agree(
        &self,
        peer: &Curve25519PublicKey,
    ) -> Result<zeroize::Zeroizing<[u8; 32]>, crate::matrix::backup::AgreementError> {
        self.store
            .x25519(&self.key, peer)
            .map(|s| zeroize::Zeroizing::new(*s.expose()))
            .map_err(crate::matrix::backup::AgreementError::new)
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it), for key creation times.
pub(crate) fn now_ms() -> u64 {
    crate::text::now_ms()
}

/// Checks that `user_id` looks like a Matrix user ID (`@localpart:server`), so that labels
/// on the token stay meaningful.
pub fn check_user_id(user_id: &str) -> Result<(), TokenError> {
    let ok = user_id.starts_with('@')
        && user_id.len() <= 255
        && user_id[1..].split_once(':').is_some_and(|(local, server)| {
            !local.is_empty() && !server.is_empty() && !user_id.chars().any(char::is_whitespace)
        });
    if ok {
        Ok(())
    } else {
        Err(TokenError::BadUserId(user_id.to_string()))
    }
}

/// Errors from the token layer. Each names the token or input it is about.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the audit log cannot record this operation, so it was not done: {reason}")]
    Audit { reason: String },
    #[error("PKCS#11 module {path} does not exist")]
    ModuleNotFound { path: String },
    #[error("cannot load PKCS#11 module {path}: {reason}")]
    ModuleLoad { path: String, reason: String },
    #[error("invalid PKCS#11 URI {uri:?}: {reason}")]
    InvalidUri { uri: String, reason: String },
    #[error("no token matches {uri}; tokens present: {}", list_or_none(.available))]
    NoMatchingToken { uri: String, available: Vec<String> },
    #[error("{uri} matches {} tokens ({}); add serial= or token= to choose one", .matches.len(), .matches.join("; "))]
    AmbiguousToken { uri: String, matches: Vec<String> },
    #[error("{} YubiKeys are present ({})", .present.len(), .present.join("; "))]
    AmbiguousYubiKey { present: Vec<String> },
    #[error("wrong PIN for {token}{}", status_suffix(.status))]
    WrongPin { token: String, status: PinStatus },
    #[error(
        "the user PIN of {token} is locked; unlock it with the SO PIN (e.g. pkcs11-tool --init-pin) or your HSM's tools"
    )]
    PinLocked { token: String },
    #[error(
        "the PIV PIN of {token} is blocked; unblock it with the PUK (ykman piv access unblock-pin)"
    )]
    PivPinBlocked { token: String },
    #[error("no PIN for {token}: {reason}")]
    NoPin { token: String, reason: String },
    #[error("cannot read the PIN from {path}: {reason}")]
    PinSource { path: String, reason: String },
    #[error("{token} cannot do {what}")]
    Unsupported { token: String, what: String },
    #[error("no {role} key for {user_id} on {token}")]
    KeyNotFound {
        user_id: String,
        role: KeyRole,
        token: String,
    },
    #[error("unknown {what} {value:?} (expected {expected})")]
    UnknownName {
        what: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("{:?} is not a Matrix user ID (expected @localpart:server.name)", crate::text::escape(.0))]
    BadUserId(String),
    #[error("{0}")]
    BadPrivateKey(String),
    #[error("no randomness from the operating system: {0}")]
    NoRandomness(String),
    #[error("the {role} key cannot {operation}")]
    WrongAlgorithm {
        role: KeyRole,
        operation: &'static str,
    },
    #[error("the {role} key of {user_id} is not a key of {token}")]
    OtherToken {
        role: KeyRole,
        user_id: String,
        token: String,
    },
    #[error(
        "a YubiKey is chosen by its serial number or `any`, not {:?}",
        crate::text::escape(.0)
    )]
    BadYubiKeyChoice(String),
    #[error("{}", if *.from_env {
        "both MXHSM_TOKEN and MXHSM_YUBIKEY are set"
    } else {
        "a PKCS#11 token and a YubiKey are both chosen"
    })]
    TwoTokens { from_env: bool },
    #[error("no token is chosen")]
    NoTokenChosen,
    #[error("a message of {len} bytes is too long to sign (at most {max} bytes)")]
    MessageTooLong { len: usize, max: usize },
    #[error("{token} is already open in this process; close it first")]
    AlreadyOpen { token: String },
    #[error("slot {0:02x} is not a retired key-management slot (82 to 95)")]
    NotRetiredSlot(u8),
    #[error("slot {slot} of {token} {}", match .holder {
        Some((role, user)) => format!("holds the {role} key of {}", crate::text::escape(user)),
        None => format!("already holds a key ({})", .contents),
    })]
    SlotOccupied {
        token: String,
        slot: RetiredSlot,
        /// mxhsm's record of the key there, when the card agrees with it.
        holder: Option<(KeyRole, String)>,
        /// What the card says is there, when mxhsm has no record of it.
        contents: String,
    },
    #[error("all 20 retired slots of {token} hold keys (the slot map is {})", .slot_map.display())]
    NoFreeSlot {
        token: String,
        slot_map: std::path::PathBuf,
    },
    #[error("slot {slot} is already mapped to the {role} key of {}", crate::text::escape(.user_id))]
    SlotMapped {
        slot: RetiredSlot,
        role: KeyRole,
        user_id: String,
    },
    #[error("slot {slot} of {token} is empty")]
    SlotEmpty { token: String, slot: RetiredSlot },
    #[error("slot {slot} does not hold an {algorithm} key, which a {role} key needs")]
    SlotAlgorithm {
        slot: RetiredSlot,
        algorithm: KeyAlgorithm,
        role: KeyRole,
    },
    #[error("slot {slot} of {token} is not mapped to that key")]
    SlotNotMapped { token: String, slot: RetiredSlot },
    #[error("slot {slot} of {token} now holds another key than the {role} key of {}; it was not deleted", crate::text::escape(.user_id))]
    SlotChanged {
        token: String,
        slot: RetiredSlot,
        role: KeyRole,
        user_id: String,
    },
    #[error("the YubiKey slot map {}: {reason}", .path.display())]
    SlotMap {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("the management key given has {given} bytes; the card's is {expected}")]
    ManagementKeyLength { given: usize, expected: String },
    #[error(
        "{token} has a non-default management key, and no PIN-protected one could be read from the card ({reason})"
    )]
    NoManagementKey { token: String, reason: String },
    #[error("{token} refused the management key")]
    ManagementKeyRefused { token: String },
    #[error("{token} returned data mxhsm cannot use: {what}")]
    BadTokenData { token: String, what: String },
    #[error("the X25519 agreement gave an all-zero secret (the peer key is of small order)")]
    NonContributory,
    #[error("{token}: {operation} failed: {reason}")]
    Device {
        token: String,
        operation: String,
        reason: String,
    },
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_string()
    } else {
        items.join("; ")
    }
}

fn status_suffix(status: &PinStatus) -> String {
    match status.describe() {
        Some(s) => format!(" ({s})"),
        None => String::new(),
    }
}
