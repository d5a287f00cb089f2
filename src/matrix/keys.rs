//! Keys and their roles in Matrix's key infrastructure, as types.
//!
//! A public key is a validated newtype with a private inner value: an
//! [`Ed25519PublicKey`] is a point that decompresses, a [`Curve25519PublicKey`] is 32
//! bytes (every 32-byte string is an X25519 public key; the all-zero agreement a
//! small-order point gives is refused where the agreement is made). [`KeyRole`] is the one
//! role enum, used for the cross-signing `usage` and for the keys on a token.

use std::fmt;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD;

/// What a key is for in Matrix's key infrastructure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyRole {
    /// The cross-signing master key (MSK): signs the SSK, the USK and backup `auth_data`.
    Master,
    /// The self-signing key (SSK): signs the user's own devices.
    SelfSigning,
    /// The user-signing key (USK): signs other users' master keys.
    UserSigning,
    /// The key-backup decryption key (`m.megolm_backup.v1.curve25519-aes-sha2`).
    Backup,
    /// Not a Matrix key: mxhsm's own key that signs the head of its audit log.
    Audit,
}

impl KeyRole {
    /// Every role, in the order they are created and listed.
    pub const ALL: [KeyRole; 5] = [
        KeyRole::Master,
        KeyRole::SelfSigning,
        KeyRole::UserSigning,
        KeyRole::Backup,
        KeyRole::Audit,
    ];

    /// The three cross-signing roles.
    pub const CROSS_SIGNING: [KeyRole; 3] =
        [KeyRole::Master, KeyRole::SelfSigning, KeyRole::UserSigning];

    /// The role's name: the `usage` of a cross-signing key, and the word in token labels.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyRole::Master => "master",
            KeyRole::SelfSigning => "self_signing",
            KeyRole::UserSigning => "user_signing",
            KeyRole::Backup => "backup",
            KeyRole::Audit => "audit",
        }
    }

    /// The algorithm every key of this role uses.
    pub fn algorithm(self) -> KeyAlgorithm {
        match self {
            KeyRole::Backup => KeyAlgorithm::X25519,
            _ => KeyAlgorithm::Ed25519,
        }
    }

    /// The names a user may type for the role (the first is [`KeyRole::as_str`]).
    pub fn names(self) -> &'static [&'static str] {
        match self {
            KeyRole::Master => &["master", "msk"],
            KeyRole::SelfSigning => &["self_signing", "self-signing", "ssk"],
            KeyRole::UserSigning => &["user_signing", "user-signing", "usk"],
            KeyRole::Backup => &["backup"],
            KeyRole::Audit => &["audit"],
        }
    }
}

impl fmt::Display for KeyRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is none of [`KeyRole::names`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown key role {:?} (expected master, self_signing, user_signing, backup or audit)",
    crate::text::escape(.0)
)]
pub struct UnknownRole(pub String);

impl FromStr for KeyRole {
    type Err = UnknownRole;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KeyRole::ALL
            .into_iter()
            .find(|r| r.names().contains(&s))
            .ok_or_else(|| UnknownRole(s.to_string()))
    }
}

/// The two key algorithms Matrix needs from a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyAlgorithm {
    Ed25519,
    X25519,
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyAlgorithm::Ed25519 => "ed25519",
            KeyAlgorithm::X25519 => "x25519",
        })
    }
}

/// Why bytes or base64 are not a public key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("{:?} is not base64", crate::text::escape(.0))]
    Base64(String),
    #[error("a public key is 32 bytes, not {0}")]
    Length(usize),
    #[error("{0} is not a point on the Ed25519 curve")]
    NotOnCurve(String),
}

fn decode_32(s: &str) -> Result<[u8; 32], KeyError> {
    let bytes = STANDARD_NO_PAD
        .decode(s.trim_end_matches('='))
        .map_err(|_| KeyError::Base64(s.to_string()))?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| KeyError::Length(bytes.len()))
}

/// An Ed25519 public key: 32 bytes that decompress to a curve point.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ed25519PublicKey([u8; 32]);

impl Ed25519PublicKey {
    /// Checks that `bytes` are a point (vodozemac, i.e. ed25519-dalek, decompresses it).
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, KeyError> {
        vodozemac::Ed25519PublicKey::from_slice(bytes)
            .map_err(|_| KeyError::NotOnCurve(STANDARD_NO_PAD.encode(bytes)))?;
        Ok(Ed25519PublicKey(*bytes))
    }

    /// Parses unpadded or padded standard base64.
    pub fn from_base64(s: &str) -> Result<Self, KeyError> {
        Self::from_bytes(&decode_32(s)?)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_base64(&self) -> String {
        STANDARD_NO_PAD.encode(self.0)
    }

    /// The key ID of a cross-signing key: `ed25519:<unpadded base64 of the key>`.
    pub fn key_id(&self) -> String {
        format!("ed25519:{}", self.to_base64())
    }

    /// Strict Ed25519 verification (vodozemac, i.e. ed25519-dalek `verify_strict`).
    pub fn verify(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        let Ok(key) = vodozemac::Ed25519PublicKey::from_slice(&self.0) else {
            return false;
        };
        let Ok(sig) = vodozemac::Ed25519Signature::from_slice(signature) else {
            return false;
        };
        key.verify(message, &sig).is_ok()
    }
}

/// Keys of the Ed25519 libraries are points already.
impl From<vodozemac::Ed25519PublicKey> for Ed25519PublicKey {
    fn from(k: vodozemac::Ed25519PublicKey) -> Self {
        Ed25519PublicKey(*k.as_bytes())
    }
}

impl From<ed25519_dalek::VerifyingKey> for Ed25519PublicKey {
    fn from(k: ed25519_dalek::VerifyingKey) -> Self {
        Ed25519PublicKey(k.to_bytes())
    }
}

impl fmt::Debug for Ed25519PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ed25519PublicKey({})", self.to_base64())
    }
}

impl fmt::Display for Ed25519PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

/// A Curve25519 (X25519) public key: a backup key, an ephemeral key of a backed-up
/// session, a device's identity key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Curve25519PublicKey([u8; 32]);

impl Curve25519PublicKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Curve25519PublicKey(bytes)
    }

    /// Parses unpadded or padded standard base64 of 32 bytes.
    pub fn from_base64(s: &str) -> Result<Self, KeyError> {
        decode_32(s).map(Curve25519PublicKey)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_base64(&self) -> String {
        STANDARD_NO_PAD.encode(self.0)
    }
}

impl fmt::Debug for Curve25519PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Curve25519PublicKey({})", self.to_base64())
    }
}

impl fmt::Display for Curve25519PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

/// A public key of either algorithm, as a token reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PublicKey {
    Ed25519(Ed25519PublicKey),
    Curve25519(Curve25519PublicKey),
}

impl PublicKey {
    /// The key of `algorithm` with these bytes (an Ed25519 key must be a curve point).
    pub fn new(algorithm: KeyAlgorithm, bytes: &[u8; 32]) -> Result<Self, KeyError> {
        Ok(match algorithm {
            KeyAlgorithm::Ed25519 => PublicKey::Ed25519(Ed25519PublicKey::from_bytes(bytes)?),
            KeyAlgorithm::X25519 => PublicKey::Curve25519(Curve25519PublicKey(*bytes)),
        })
    }

    pub fn algorithm(&self) -> KeyAlgorithm {
        match self {
            PublicKey::Ed25519(_) => KeyAlgorithm::Ed25519,
            PublicKey::Curve25519(_) => KeyAlgorithm::X25519,
        }
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        match self {
            PublicKey::Ed25519(k) => k.as_bytes(),
            PublicKey::Curve25519(k) => k.as_bytes(),
        }
    }

    /// Unpadded standard base64, as Matrix writes keys.
    pub fn to_base64(&self) -> String {
        STANDARD_NO_PAD.encode(self.as_bytes())
    }

    pub fn ed25519(&self) -> Option<Ed25519PublicKey> {
        match self {
            PublicKey::Ed25519(k) => Some(*k),
            PublicKey::Curve25519(_) => None,
        }
    }

    pub fn curve25519(&self) -> Option<Curve25519PublicKey> {
        match self {
            PublicKey::Curve25519(k) => Some(*k),
            PublicKey::Ed25519(_) => None,
        }
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_parse_from_every_name_and_only_those() {
        for role in KeyRole::ALL {
            assert_eq!(role.names()[0], role.as_str());
            for name in role.names() {
                assert_eq!(name.parse::<KeyRole>(), Ok(role));
            }
        }
        let e = "Master".parse::<KeyRole>().unwrap_err();
        assert!(e.to_string().contains("\"Master\""), "{e}");
    }

    #[test]
    fn ed25519_keys_are_exactly_the_points_dalek_accepts() {
        let mut refused = 0;
        for y in 0u8..64 {
            let mut bytes = [0u8; 32];
            bytes[0] = y;
            let dalek = ed25519_dalek::VerifyingKey::from_bytes(&bytes).is_ok();
            match Ed25519PublicKey::from_bytes(&bytes) {
                Ok(k) => {
                    assert!(dalek, "{y}");
                    assert_eq!(Ed25519PublicKey::from_base64(&k.to_base64()).unwrap(), k);
                }
                Err(e) => {
                    assert!(!dalek, "{y}");
                    assert!(matches!(e, KeyError::NotOnCurve(_)));
                    refused += 1;
                }
            }
        }
        assert!(refused > 0, "no non-point among the first 64 encodings");
        assert_eq!(
            Ed25519PublicKey::from_base64("AAAA"),
            Err(KeyError::Length(3))
        );
        assert!(matches!(
            Ed25519PublicKey::from_base64("not base64!"),
            Err(KeyError::Base64(_))
        ));
    }

    #[test]
    fn curve25519_keys_round_trip_padded_or_not() {
        let k = Curve25519PublicKey::from_bytes([7; 32]);
        let padded = format!("{}=", k.to_base64());
        assert_eq!(Curve25519PublicKey::from_base64(&padded).unwrap(), k);
        assert_eq!(
            PublicKey::new(KeyAlgorithm::X25519, &[7; 32]).unwrap(),
            PublicKey::Curve25519(k)
        );
    }
}
