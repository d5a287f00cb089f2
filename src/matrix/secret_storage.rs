//! Secret storage (SSSS), `m.secret_storage.v1.aes-hmac-sha2` (spec "Secrets";
//! docs/vectors.md): the recovery key, passphrase keys, the key check, and
//! the encrypted secrets (cross-signing seeds, the backup key) clients keep in account data.
//!
//! Per secret: `HKDF-SHA-256(key, salt = 32 zero bytes, info = secret name, 64)` gives an
//! AES key and an HMAC key; the secret (itself base64 text) is encrypted with AES-256-CTR
//! (64-bit counter, as WebCrypto's `length: 64`; the IV has bit 63 cleared) and
//! authenticated with the full HMAC-SHA-256 of the ciphertext. The key check is the same
//! with an empty name over 32 zero bytes.

use std::fmt;

use aes::Aes256;
use aes::cipher::{KeyIvInit, StreamCipher};
use hkdf::Hkdf;
use serde_json::{Value, json};
use sha2::{Sha256, Sha512};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::signed_json::{decode_base64, encode_base64};

pub const ALGORITHM: &str = "m.secret_storage.v1.aes-hmac-sha2";
/// The secret names mxhsm moves onto a token.
pub const MASTER: &str = "m.cross_signing.master";
pub const SELF_SIGNING: &str = "m.cross_signing.self_signing";
pub const USER_SIGNING: &str = "m.cross_signing.user_signing";
pub const BACKUP: &str = "m.megolm_backup.v1";

/// The most PBKDF2 iterations mxhsm runs for a passphrase key. The count comes from the
/// server (the key description in account data): without a cap a malicious server could
/// make mxhsm spin for days. Clients use 500,000; twenty times that takes about half a
/// minute here.
pub const MAX_PBKDF2_ITERATIONS: u64 = 10_000_000;

const RECOVERY_PREFIX: [u8; 2] = [0x8b, 0x01];
/// The Bitcoin base58 alphabet (no 0, O, I, l).
const BASE58: &str = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";

type Aes256Ctr64 = ctr::Ctr64BE<Aes256>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretStorageError {
    #[error("the recovery key contains {0:?}, which is not in the base58 alphabet")]
    Alphabet(char),
    #[error("the recovery key has the wrong parity: a character is mistyped")]
    Parity,
    #[error("the recovery key has the wrong prefix: it is not a Matrix recovery key")]
    Prefix,
    #[error("the recovery key has the wrong length ({0} bytes instead of 35)")]
    Length(usize),
    #[error("the key description is not usable: {0}")]
    KeyDescription(String),
    #[error(
        "the passphrase key asks for {0} PBKDF2 iterations, more than the {max} mxhsm runs (clients use 500,000): refusing a description that would keep mxhsm busy for hours",
        max = MAX_PBKDF2_ITERATIONS
    )]
    TooManyIterations(u64),
    #[error("the recovery key or passphrase is wrong (the key check fails)")]
    WrongKey,
    #[error("the encrypted secret {0} is malformed: {1}")]
    Malformed(String, String),
    #[error("the secret {0} does not decrypt with this key (its MAC does not match)")]
    Mac(String),
    #[error("the secret {0} is not base64 of a 32-byte key")]
    NotAKey(String),
    #[error("no randomness: {0}")]
    Random(String),
}

/// A 32-byte secret-storage key. Zeroized on drop, never printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct StorageKey([u8; 32]);

impl fmt::Debug for StorageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StorageKey([redacted])")
    }
}

impl StorageKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        StorageKey(bytes)
    }

    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }

    /// Parses a recovery key (base58, any whitespace): `8B 01 ‖ key ‖ parity`.
    pub fn from_recovery_key(text: &str) -> Result<Self, SecretStorageError> {
        let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        if let Some(bad) = compact.chars().find(|c| !BASE58.contains(*c)) {
            return Err(SecretStorageError::Alphabet(bad));
        }
        let bytes = Zeroizing::new(
            bs58::decode(&compact)
                .with_alphabet(bs58::Alphabet::BITCOIN)
                .into_vec()
                .map_err(|_| SecretStorageError::Alphabet('?'))?,
        );
        // The order of matrix-rust-sdk: a wrong length or prefix means it is not a
        // recovery key at all; only then is a parity failure a typo.
        if bytes.len() != 35 {
            return Err(SecretStorageError::Length(bytes.len()));
        }
        if bytes[..2] != RECOVERY_PREFIX {
            return Err(SecretStorageError::Prefix);
        }
        if bytes.iter().fold(0u8, |a, b| a ^ b) != 0 {
            return Err(SecretStorageError::Parity);
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(&bytes[2..34]);
        Ok(StorageKey(key))
    }

    /// The recovery key text, in groups of four characters.
    pub fn to_recovery_key(&self) -> String {
        let mut bytes = Zeroizing::new(Vec::with_capacity(35));
        bytes.extend_from_slice(&RECOVERY_PREFIX);
        bytes.extend_from_slice(&self.0);
        let parity = bytes.iter().fold(0u8, |a, b| a ^ b);
        bytes.push(parity);
        let encoded = Zeroizing::new(
            bs58::encode(&*bytes)
                .with_alphabet(bs58::Alphabet::BITCOIN)
                .into_string(),
        );
        encoded
            .as_bytes()
            .chunks(4)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Derives the key from a passphrase with the `m.pbkdf2` parameters of a key
    /// description (`passphrase: {algorithm, salt, iterations, bits}`).
    pub fn from_passphrase(
        passphrase: &str,
        description: &Value,
    ) -> Result<Self, SecretStorageError> {
        Self::from_passphrase_with_limit(passphrase, description, MAX_PBKDF2_ITERATIONS)
    }

    /// [`StorageKey::from_passphrase`], refusing more than `max_iterations` (the fuzz
    /// targets keep it small).
    pub fn from_passphrase_with_limit(
        passphrase: &str,
        description: &Value,
        max_iterations: u64,
    ) -> Result<Self, SecretStorageError> {
        let p = description.get("passphrase").ok_or_else(|| {
            SecretStorageError::KeyDescription(
                "this key has no passphrase; use the recovery key".into(),
            )
        })?;
        if p.get("algorithm").and_then(Value::as_str) != Some("m.pbkdf2") {
            return Err(SecretStorageError::KeyDescription(format!(
                "passphrase algorithm {}",
                p["algorithm"]
            )));
        }
        let salt = p
            .get("salt")
            .and_then(Value::as_str)
            .ok_or_else(|| SecretStorageError::KeyDescription("no salt".into()))?;
        let iterations = p
            .get("iterations")
            .and_then(Value::as_u64)
            .filter(|i| *i >= 1)
            .ok_or_else(|| SecretStorageError::KeyDescription("bad iterations".into()))?;
        if iterations > max_iterations {
            return Err(SecretStorageError::TooManyIterations(iterations));
        }
        if let Some(bits) = p.get("bits").and_then(Value::as_u64)
            && bits != 256
        {
            return Err(SecretStorageError::KeyDescription(format!(
                "{bits}-bit keys"
            )));
        }
        let mut key = [0u8; 32];
        // The salt is the string's UTF-8 bytes, not base64-decoded.
        pbkdf2::pbkdf2_hmac::<Sha512>(
            passphrase.as_bytes(),
            salt.as_bytes(),
            iterations as u32,
            &mut key,
        );
        Ok(StorageKey(key))
    }

    fn keys(&self, name: &str) -> Zeroizing<[u8; 64]> {
        let hkdf = Hkdf::<Sha256>::new(Some(&[0u8; 32]), &self.0);
        let mut okm = Zeroizing::new([0u8; 64]);
        hkdf.expand(name.as_bytes(), okm.as_mut()).unwrap_or(());
        okm
    }

    fn encrypt_raw(&self, name: &str, iv: &[u8; 16], plaintext: &[u8]) -> (Vec<u8>, [u8; 32]) {
        let k = self.keys(name);
        let mut data = plaintext.to_vec();
        Aes256Ctr64::new_from_slices(&k[..32], iv)
            .unwrap_or_else(|_| unreachable!("32-byte key, 16-byte IV"))
            .apply_keystream(&mut data);
        let mac = hmac(&k[32..], &data);
        (data, mac)
    }

    /// Checks the key against the `iv`/`mac` of its description. A description without
    /// them cannot be checked (the spec says to accept the key then).
    pub fn check(&self, description: &Value) -> Result<(), SecretStorageError> {
        let (Some(iv), Some(mac)) = (
            description.get("iv").and_then(Value::as_str),
            description.get("mac").and_then(Value::as_str),
        ) else {
            return Ok(());
        };
        let iv = iv16(iv).ok_or_else(|| {
            SecretStorageError::KeyDescription("its iv is not 16 bytes of base64".into())
        })?;
        let mac = decode_base64(mac)
            .map_err(|_| SecretStorageError::KeyDescription("its mac is not base64".into()))?;
        let (_, expected) = self.encrypt_raw("", &iv, &[0u8; 32]);
        if bool::from(expected.as_slice().ct_eq(&mac)) {
            Ok(())
        } else {
            Err(SecretStorageError::WrongKey)
        }
    }

    /// A key description (`iv` and `mac` for the key check), for new secret storage.
    pub fn description(&self, name: Option<&str>) -> Result<Value, SecretStorageError> {
        let iv = random_iv()?;
        let (_, mac) = self.encrypt_raw("", &iv, &[0u8; 32]);
        let mut d =
            json!({"algorithm": ALGORITHM, "iv": encode_base64(&iv), "mac": encode_base64(&mac)});
        if let Some(n) = name {
            d["name"] = json!(n);
        }
        Ok(d)
    }

    /// Decrypts `{"iv", "ciphertext", "mac"}` of secret `name`: the secret's text.
    pub fn decrypt(
        &self,
        name: &str,
        encrypted: &Value,
    ) -> Result<Zeroizing<String>, SecretStorageError> {
        let field = |f: &str| {
            encrypted
                .get(f)
                .and_then(Value::as_str)
                .ok_or_else(|| SecretStorageError::Malformed(name.into(), format!("no {f}")))
        };
        let iv = iv16(field("iv")?).ok_or_else(|| {
            SecretStorageError::Malformed(name.into(), "iv is not 16 bytes".into())
        })?;
        let mut data = decode_base64(field("ciphertext")?).map_err(|_| {
            SecretStorageError::Malformed(name.into(), "ciphertext is not base64".into())
        })?;
        let mac = decode_base64(field("mac")?)
            .map_err(|_| SecretStorageError::Malformed(name.into(), "mac is not base64".into()))?;
        let k = self.keys(name);
        if !bool::from(hmac(&k[32..], &data).as_slice().ct_eq(&mac)) {
            return Err(SecretStorageError::Mac(name.into()));
        }
        Aes256Ctr64::new_from_slices(&k[..32], &iv)
            .unwrap_or_else(|_| unreachable!("32-byte key, 16-byte IV"))
            .apply_keystream(&mut data);
        let text = String::from_utf8(data).map_err(|e| {
            let mut bytes = e.into_bytes();
            bytes.zeroize();
            SecretStorageError::NotAKey(name.into())
        })?;
        Ok(Zeroizing::new(text))
    }

    /// Encrypts the text of secret `name`.
    pub fn encrypt(&self, name: &str, secret: &str) -> Result<Value, SecretStorageError> {
        let iv = random_iv()?;
        let (ct, mac) = self.encrypt_raw(name, &iv, secret.as_bytes());
        Ok(
            json!({"iv": encode_base64(&iv), "ciphertext": encode_base64(&ct), "mac": encode_base64(&mac)}),
        )
    }

    /// Decrypts a secret that is a 32-byte key (cross-signing seeds, the backup key),
    /// padded or unpadded base64 inside.
    pub fn decrypt_key(
        &self,
        name: &str,
        encrypted: &Value,
    ) -> Result<Zeroizing<[u8; 32]>, SecretStorageError> {
        let text = self.decrypt(name, encrypted)?;
        let bytes = Zeroizing::new(
            decode_base64(text.trim()).map_err(|_| SecretStorageError::NotAKey(name.into()))?,
        );
        let arr: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| SecretStorageError::NotAKey(name.into()))?;
        Ok(Zeroizing::new(arr))
    }
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    super::hmac_sha256(key, &[data])
}

/// A 16-byte IV from base64 (padded or not). Longer IVs (nheko once wrote 32 bytes) are
/// refused, as matrix-rust-sdk does.
fn iv16(s: &str) -> Option<[u8; 16]> {
    decode_base64(s).ok()?.try_into().ok()
}

fn random_iv() -> Result<[u8; 16], SecretStorageError> {
    let mut iv = [0u8; 16];
    getrandom::fill(&mut iv).map_err(|e| SecretStorageError::Random(e.to_string()))?;
    iv[8] &= 0x7f;
    Ok(iv)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn pbkdf2_iterations_from_the_server_are_capped() {
        let d = json!({"algorithm": ALGORITHM, "passphrase": {"algorithm": "m.pbkdf2", "salt": "s", "iterations": MAX_PBKDF2_ITERATIONS + 1}});
        let start = std::time::Instant::now();
        assert_eq!(
            StorageKey::from_passphrase("pw", &d).unwrap_err(),
            SecretStorageError::TooManyIterations(MAX_PBKDF2_ITERATIONS + 1)
        );
        assert!(start.elapsed().as_secs() < 1, "refused before any work");
        let d = json!({"algorithm": ALGORITHM, "passphrase": {"algorithm": "m.pbkdf2", "salt": "s", "iterations": u64::MAX}});
        assert!(matches!(
            StorageKey::from_passphrase("pw", &d),
            Err(SecretStorageError::TooManyIterations(_))
        ));
    }

    #[test]
    fn recovery_key_vectors() {
        let k = StorageKey::from_recovery_key(
            "EsTc LW2K PGiF wKEA 3As5 g5c4 BXwk qeeJ ZJV8 Q9fu gUMN UE4d",
        )
        .unwrap();
        assert_eq!(
            k.expose().to_vec(),
            hex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
        );
        assert_eq!(
            k.to_recovery_key(),
            "EsTc LW2K PGiF wKEA 3As5 g5c4 BXwk qeeJ ZJV8 Q9fu gUMN UE4d"
        );
        assert_eq!(
            StorageKey::from_recovery_key("EsTcLW2KPGiFwKEA3As5g5c4BXwkqeeJZJV8Q9fugUMNUE4e")
                .unwrap_err(),
            SecretStorageError::Parity
        );
        let k = StorageKey::from_recovery_key(
            "EsT           pRvZTnjck8    YrhRAtw XLS84Nr2r9S9LGAWDaExVAPBvLRK   ",
        )
        .unwrap();
        assert_eq!(
            k.expose(),
            &[
                159, 189, 70, 187, 52, 81, 113, 198, 246, 2, 44, 154, 37, 213, 104, 27, 165, 78,
                236, 106, 108, 73, 83, 243, 173, 192, 185, 110, 157, 145, 173, 163
            ]
        );
        assert_eq!(
            StorageKey::from_recovery_key("EsTpRvZTnjck8YrhRAtwXLS84Nr2r9S9LGAWDaExVAPBvLRk")
                .unwrap_err(),
            SecretStorageError::Parity
        );
        assert_eq!(
            StorageKey::from_recovery_key("AATpRvZTnjck8YrhRAtwXLS84Nr2r9S9LGAWDaExVAPBvLRk")
                .unwrap_err(),
            SecretStorageError::Prefix
        );
        assert!(matches!(
            StorageKey::from_recovery_key("AATpRvZTnjck8YrhRAtwXLS84Nr2r9S9").unwrap_err(),
            SecretStorageError::Length(_)
        ));
        assert_eq!(
            StorageKey::from_recovery_key("AATpRvZTnjck8YrhRAtwXLS84Nr0OIl").unwrap_err(),
            SecretStorageError::Alphabet('0')
        );
        let k = StorageKey::from_bytes((0u8..32).collect::<Vec<_>>().try_into().unwrap());
        assert_eq!(
            k.to_recovery_key(),
            "EsSz ykH7 LCZx 7Cae cmKD wcmY JRXi Ybtu 8iQ3 t8Ez nRwK pUY1"
        );
        // The js-sdk's mistyped key (EsSz → EsSZ) changes the second prefix byte; the
        // js-sdk checks parity first and says "parity", we check the prefix first.
        assert_eq!(
            StorageKey::from_recovery_key(
                "EsSZ ykH7 LCZx 7Cae cmKD wcmY JRXi Ybtu 8iQ3 t8Ez nRwK pUY1"
            )
            .unwrap_err(),
            SecretStorageError::Prefix
        );
    }

    /// The exact length error: a well-formed, parity-correct, prefixed 3-byte key.
    #[test]
    fn length_error() {
        let bytes = [0x8b, 0x01, 0x8a];
        let text = bs58::encode(bytes)
            .with_alphabet(bs58::Alphabet::BITCOIN)
            .into_string();
        assert_eq!(
            StorageKey::from_recovery_key(&text).unwrap_err(),
            SecretStorageError::Length(3)
        );
    }

    #[test]
    fn passphrase_and_key_check_vectors() {
        let d: Value = serde_json::from_str(r#"{"algorithm":"m.secret_storage.v1.aes-hmac-sha2","iv":"gH2iNpiETFhApvW6/FFEJQ","mac":"9Lw12m5SKDipNghdQXKjgpfdj1/K7HFI2brO+UWAGoM","passphrase":{"algorithm":"m.pbkdf2","salt":"IuLnH7S85YtZmkkBJKwNUKxWF42g9O1H","iterations":10}}"#).unwrap();
        let k = StorageKey::from_passphrase("It's a secret to everybody", &d).unwrap();
        assert_eq!(
            k.expose().to_vec(),
            hex("397aff44a04238741cff9b76b38126073c34bf25599fa9969287f01ccf77559f")
        );
        k.check(&d).unwrap();
        assert_eq!(
            StorageKey::from_passphrase("It's a secret to nobody", &d)
                .unwrap()
                .check(&d),
            Err(SecretStorageError::WrongKey)
        );
        // A recovery key with padded base64 in its description (Element-web style).
        let d: Value = serde_json::from_str(r#"{"algorithm":"m.secret_storage.v1.aes-hmac-sha2","iv":"xv5b6/p3ExEw++wTyfSHEg==","mac":"ujBBbXahnTAMkmPUX2/0+VTfUh63pGyVRuBcDMgmJC8="}"#).unwrap();
        let k = StorageKey::from_recovery_key(
            "EsTj 3yST y93F SLpB jJsz eAXc 2XzA ygD3 w69H fGaN TKBj jXEd",
        )
        .unwrap();
        k.check(&d).unwrap();
        assert_eq!(
            StorageKey::from_bytes([0; 32]).check(&d),
            Err(SecretStorageError::WrongKey)
        );
        assert_eq!(
            StorageKey::from_passphrase("x", &d).unwrap_err(),
            SecretStorageError::KeyDescription(
                "this key has no passphrase; use the recovery key".into()
            )
        );
    }

    /// mautrix-go's complete chain: passphrase → key → the master seed.
    #[test]
    fn mautrix_chain() {
        let d: Value = serde_json::from_str(r#"{"algorithm":"m.secret_storage.v1.aes-hmac-sha2","passphrase":{"algorithm":"m.pbkdf2","iterations":500000,"salt":"y863BOoqOadgDp8S3FtHXikDJEalsQ7d"},"iv":"xxkTK0L4UzxgAFkQ6XPwsw","mac":"MEhooO0ZhFJNxUhvRMSxBnJfL20wkLgle3ocY0ee/eA"}"#).unwrap();
        let from_recovery = StorageKey::from_recovery_key(
            "EsTE s92N EtaX s2h6 VQYF 9Kao tHYL mkyL GKMh isZb KJ4E tvoC",
        )
        .unwrap();
        assert_eq!(
            from_recovery.expose().to_vec(),
            hex("2ebfa5ad1a95ab94a94bc569b68fac914c2572ce5ae47877ab2415feeecd859c")
        );
        from_recovery.check(&d).unwrap();
        let k = StorageKey::from_passphrase("correct horse battery staple", &d).unwrap();
        assert_eq!(k.expose(), from_recovery.expose());
        let secret: Value = serde_json::from_str(r#"{"iv":"BpKP9nQJTE9jrsAssoxPqQ==","ciphertext":"fNRiiiidezjerTgV+G6pUtmeF3izzj5re/mVvY0hO2kM6kYGrxLuIu2ej80=","mac":"/gWGDGMyOLmbJp+aoSLh5JxCs0AdS6nAhjzpe+9G2Q0="}"#).unwrap();
        assert_eq!(
            k.decrypt(MASTER, &secret).unwrap().as_str(),
            "aPl/0ZIu7Pa4K7iQ0k0GUphOeh1wO56Ge3669/65W28="
        );
        assert_eq!(
            k.decrypt_key(MASTER, &secret).unwrap().to_vec(),
            hex("68f97fd1922eecf6b82bb890d24d0652984e7a1d703b9e867b7ebaf7feb95b6f")
        );
        assert_eq!(
            k.decrypt(SELF_SIGNING, &secret).unwrap_err(),
            SecretStorageError::Mac(SELF_SIGNING.into())
        );
        let key2: Value = serde_json::from_str(r#"{"algorithm":"m.secret_storage.v1.aes-hmac-sha2","iv":"O0BOvTqiIAYjC+RMcyHfWw==","mac":"7k6OruQlWg0UmQjxGZ0ad4Q6DdwkgnoI7G6X3IjBYtI="}"#).unwrap();
        StorageKey::from_recovery_key(
            "EsUC xSxt XJgQ dz19 8WBZ rHdE GZo7 ybsn EFmG Y5HY MDAG GNWe",
        )
        .unwrap()
        .check(&key2)
        .unwrap();
    }

    /// The self-computed fixed vector: zero key, zero IV, the js backup key as the secret.
    #[test]
    fn fixed_vector_and_round_trips() {
        let k = StorageKey::from_bytes([0; 32]);
        let (ct, mac) = k.encrypt_raw(
            BACKUP,
            &[0; 16],
            b"dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo",
        );
        assert_eq!(
            encode_base64(&ct),
            "X66+g78fQdRU136uvV0KM9XK+F2hC9HsGVsGOVdGuuXLS3uyUX5akumR1Q"
        );
        assert_eq!(
            encode_base64(&mac),
            "ZXBZRlpe9jHY4RlSxOBuNJuHJkW4HNl7Sewcdg0pEZs"
        );
        let (_, check) = k.encrypt_raw("", &[0; 16], &[0; 32]);
        assert_eq!(
            encode_base64(&check),
            "HwRM9acFfsmgx1IlMgQI2n1pdsF6jVbAq9RIGTiIosQ"
        );
        for i in 0..20u8 {
            let k = StorageKey::from_bytes([i; 32]);
            let d = k.description(Some("x")).unwrap();
            k.check(&d).unwrap();
            let secret = encode_base64(&[i.wrapping_mul(7); 32]);
            let enc = k.encrypt(USER_SIGNING, &secret).unwrap();
            assert_eq!(
                *k.decrypt_key(USER_SIGNING, &enc).unwrap(),
                [i.wrapping_mul(7); 32]
            );
            assert!(StorageKey::from_bytes([i + 1; 32]).check(&d).is_err());
        }
    }
}
