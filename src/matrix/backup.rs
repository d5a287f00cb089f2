//! Server-side key backup, `m.megolm_backup.v1.curve25519-aes-sha2` (spec e2e module,
//! "Server-side key backups"; docs/vectors.md).
//!
//! Decryption does the one step that needs the backup key — X25519 with the session's
//! ephemeral key — through an [`X25519Agreement`] (the token's ECDH), and everything else
//! in software: HKDF-SHA-256 (32 zero bytes of salt, empty info, 80 bytes: AES key, MAC
//! key, IV), the MAC, AES-256-CBC with PKCS#7. Encryption to a backup public key uses
//! vodozemac's `PkEncryption` with a software ephemeral key: no token needed.
//!
//! **Warning — the MAC authenticates nothing.** Because of a libolm bug every
//! implementation computes the MAC over an *empty* string, not the ciphertext: it only
//! proves the ephemeral key was used with our key. Anyone who knows the backup *public* key
//! can write sessions into a backup. That is why uploads require `auth_data` signed by our
//! master key, and why every restored session key is checked with vodozemac (its session ID
//! must match) before it is written.

use std::fmt;

use aes::Aes256;
use aes::cipher::block_padding::Pkcs7;
use aes::cipher::{BlockModeDecrypt, KeyIvInit};
use hkdf::Hkdf;
use serde_json::{Value, json};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

use super::keys::{Curve25519PublicKey, Ed25519PublicKey};
use super::signed_json::{
    Ed25519Signer, SignedJsonError, decode_base64, encode_base64, sign_json, verify_json,
};

/// The backup algorithm mxhsm speaks.
pub const ALGORITHM: &str = "m.megolm_backup.v1.curve25519-aes-sha2";
/// The algorithm of the room keys inside.
pub const MEGOLM_ALGORITHM: &str = "m.megolm.v1.aes-sha2";

/// Something that does X25519 with a private key it keeps: the token, or software.
pub trait X25519Agreement: Sync {
    fn public_key(&self) -> Curve25519PublicKey;
    /// X25519(private, `peer`). Must refuse an all-zero result.
    fn agree(&self, peer: &Curve25519PublicKey) -> Result<Zeroizing<[u8; 32]>, AgreementError>;
}

/// The agreement failed (the token refused, a small-order peer key, …). The source is the
/// agreeing side's own error — for a key on a token, a `TokenError`.
#[derive(Debug, thiserror::Error)]
#[error("X25519 agreement failed: {source}")]
pub struct AgreementError {
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl AgreementError {
    pub fn new(source: impl std::error::Error + Send + Sync + 'static) -> Self {
        AgreementError {
            source: Box::new(source),
        }
    }
}

/// A small-order (non-contributory) peer key, refused by the software agreement.
#[derive(Debug, thiserror::Error)]
#[error("the peer key is of small order")]
pub struct SmallOrder;

/// A software X25519 key (tests, benchmarks, and keys read from secret storage before
/// they go onto a token).
pub struct SoftwareX25519(pub x25519_dalek::StaticSecret);

impl X25519Agreement for SoftwareX25519 {
    fn public_key(&self) -> Curve25519PublicKey {
        Curve25519PublicKey::from_bytes(x25519_dalek::PublicKey::from(&self.0).to_bytes())
    }
    fn agree(&self, peer: &Curve25519PublicKey) -> Result<Zeroizing<[u8; 32]>, AgreementError> {
        let shared = self
            .0
            .diffie_hellman(&x25519_dalek::PublicKey::from(*peer.as_bytes()));
        if !shared.was_contributory() {
            return Err(AgreementError::new(SmallOrder));
        }
        Ok(Zeroizing::new(shared.to_bytes()))
    }
}

/// Why a backed-up session could not be decrypted.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum BackupError {
    #[error("session_data is malformed: {0}")]
    Malformed(String),
    #[error("the ephemeral key is not a valid Curve25519 key")]
    EphemeralKey,
    #[error("{0}")]
    Agreement(String),
    #[error("the MAC does not match (wrong backup key, or tampered ephemeral key or MAC)")]
    Mac,
    #[error("the ciphertext does not decrypt to valid PKCS#7 padding (tampered ciphertext)")]
    Padding,
    #[error("the decrypted session is not what the spec says: {0}")]
    Plaintext(String),
    #[error("the session key does not belong to session {expected} (it is {actual})")]
    SessionIdMismatch { expected: String, actual: String },
}

/// The three fields of `session_data`.
#[derive(Clone, PartialEq, Eq)]
pub struct EncryptedSessionData {
    pub ephemeral: Curve25519PublicKey,
    pub ciphertext: Vec<u8>,
    pub mac: Vec<u8>,
}

impl fmt::Debug for EncryptedSessionData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptedSessionData")
            .field("ephemeral", &self.ephemeral.to_base64())
            .field("ciphertext_len", &self.ciphertext.len())
            .finish_non_exhaustive()
    }
}

impl EncryptedSessionData {
    pub fn from_json(session_data: &Value) -> Result<Self, BackupError> {
        let field = |name: &str| -> Result<Vec<u8>, BackupError> {
            let s = session_data
                .get(name)
                .and_then(Value::as_str)
                .ok_or_else(|| BackupError::Malformed(format!("no {name}")))?;
            decode_base64(s).map_err(|_| BackupError::Malformed(format!("{name} is not base64")))
        };
        let ephemeral = <[u8; 32]>::try_from(field("ephemeral")?)
            .map(Curve25519PublicKey::from_bytes)
            .map_err(|_| BackupError::EphemeralKey)?;
        Ok(EncryptedSessionData {
            ephemeral,
            ciphertext: field("ciphertext")?,
            mac: field("mac")?,
        })
    }

    pub fn to_json(&self) -> Value {
        json!({
            "ephemeral": self.ephemeral.to_base64(),
            "ciphertext": encode_base64(&self.ciphertext),
            "mac": encode_base64(&self.mac),
        })
    }
}

/// AES key, MAC key and IV from the shared secret.
struct Keys(Zeroizing<[u8; 80]>);

impl Keys {
    fn derive(shared: &[u8; 32]) -> Keys {
        // HKDF's default salt is HashLen zero bytes, the same as libolm's empty salt and
        // vodozemac's single zero byte (HMAC pads keys with zeros).
        let hkdf = Hkdf::<Sha256>::new(Some(&[0u8; 32]), shared);
        let mut okm = Zeroizing::new([0u8; 80]);
        // 80 bytes is far below HKDF-SHA-256's limit of 255 × 32.
        hkdf.expand(b"", okm.as_mut()).unwrap_or(());
        Keys(okm)
    }
    fn aes_key(&self) -> &[u8] {
        &self.0[..32]
    }
    fn mac_key(&self) -> &[u8] {
        &self.0[32..64]
    }
    fn iv(&self) -> &[u8] {
        &self.0[64..80]
    }
    /// HMAC-SHA-256 of the empty string, the first 8 bytes (the libolm quirk).
    fn mac(&self) -> [u8; 8] {
        let full = super::hmac_sha256(self.mac_key(), &[]);
        let mut out = [0u8; 8];
        out.copy_from_slice(&full[..8]);
        out
    }
}

/// Decrypts one backed-up session: the plaintext JSON bytes.
pub fn decrypt(
    key: &dyn X25519Agreement,
    data: &EncryptedSessionData,
) -> Result<Zeroizing<Vec<u8>>, BackupError> {
    let shared = agree(key, data)?;
    decrypt_with_secret(&shared, data)
}

/// The agreement step of [`decrypt`]: X25519 with the session's ephemeral key.
pub fn agree(
    key: &dyn X25519Agreement,
    data: &EncryptedSessionData,
) -> Result<Zeroizing<[u8; 32]>, BackupError> {
    key.agree(&data.ephemeral)
        .map_err(|e| BackupError::Agreement(e.to_string()))
}

/// The software steps of [`decrypt`], given the shared secret: HKDF, MAC, AES-CBC.
pub fn decrypt_with_secret(
    shared: &[u8; 32],
    data: &EncryptedSessionData,
) -> Result<Zeroizing<Vec<u8>>, BackupError> {
    let keys = Keys::derive(shared);
    let expected = keys.mac();
    if data.mac.len() != expected.len() || !bool::from(data.mac.as_slice().ct_eq(&expected)) {
        return Err(BackupError::Mac);
    }
    let cipher = cbc::Decryptor::<Aes256>::new_from_slices(keys.aes_key(), keys.iv())
        .map_err(|_| BackupError::Padding)?;
    cipher
        .decrypt_padded_vec::<Pkcs7>(&data.ciphertext)
        .map(Zeroizing::new)
        .map_err(|_| BackupError::Padding)
}

/// One backed-up session to restore.
pub struct BackedUpSession {
    pub room_id: String,
    pub session_id: String,
    /// `session_data`, decoded; a malformed one is reported like any other failure.
    pub session_data: Result<EncryptedSessionData, BackupError>,
}

/// Restores `sessions` as a pipeline: `agreement_jobs` threads keep the token busy with
/// agreements, while `software_jobs` threads do the rest (HKDF, MAC, AES, the vodozemac
/// session check) on the secrets they hand over, so the software work hides behind the
/// token's. Results come back in the order of `sessions`. `progress` is called once per
/// session.
pub fn restore_all(
    key: &dyn X25519Agreement,
    sessions: &[BackedUpSession],
    agreement_jobs: usize,
    software_jobs: usize,
    progress: &(dyn Fn() + Sync),
) -> Vec<Result<RoomKey, BackupError>> {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    // Secrets are handed over in batches: one wake-up of a software thread per secret
    // cost the token thread an eighth of its rate (two futex calls and a context switch
    // each, on the cores the token needs).
    const BATCH: usize = 64;
    type Handover = Vec<(usize, Result<Zeroizing<[u8; 32]>, BackupError>)>;
    let next = AtomicUsize::new(0);
    let (tx, rx) = std::sync::mpsc::sync_channel::<Handover>(4096 / BATCH);
    let rx = Mutex::new(rx);
    let results: Mutex<Vec<Option<Result<RoomKey, BackupError>>>> =
        Mutex::new((0..sessions.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..agreement_jobs.max(1) {
            let tx = tx.clone();
            let next = &next;
            s.spawn(move || {
                let mut batch = Vec::with_capacity(BATCH);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = sessions.get(i) else { break };
                    let step = match &item.session_data {
                        Ok(d) => agree(key, d),
                        Err(e) => Err(e.clone()),
                    };
                    batch.push((i, step));
                    if batch.len() == BATCH
                        && tx
                            .send(std::mem::replace(&mut batch, Vec::with_capacity(BATCH)))
                            .is_err()
                    {
                        return;
                    }
                }
                if !batch.is_empty() {
                    let _ = tx.send(batch);
                }
            });
        }
        drop(tx);
        for _ in 0..software_jobs.max(1) {
            let (rx, results) = (&rx, &results);
            s.spawn(move || {
                let mut local = Vec::new();
                loop {
                    let received = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    let Ok(batch) = received else { break };
                    for (i, step) in batch {
                        let item = &sessions[i];
                        let r = step.and_then(|secret| {
                            let d = item.session_data.as_ref().map_err(Clone::clone)?;
                            let plain = decrypt_with_secret(&secret, d)?;
                            room_key(&item.room_id, &item.session_id, &plain)
                        });
                        local.push((i, r));
                        progress();
                    }
                }
                let mut all = results.lock().unwrap_or_else(|e| e.into_inner());
                for (i, r) in local {
                    all[i] = Some(r);
                }
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(BackupError::Agreement("not processed".into()))))
        .collect()
}

/// Encrypts `plaintext` to the backup public key (software ephemeral key, vodozemac).
pub fn encrypt(
    backup_public: &Curve25519PublicKey,
    plaintext: &[u8],
) -> Result<EncryptedSessionData, BackupError> {
    let public = vodozemac::Curve25519PublicKey::from_bytes(*backup_public.as_bytes());
    let message = vodozemac::pk_encryption::PkEncryption::from_key(public)
        .encrypt(plaintext)
        .map_err(|e| BackupError::Agreement(e.to_string()))?;
    Ok(EncryptedSessionData {
        ephemeral: Curve25519PublicKey::from_bytes(message.ephemeral_key.to_bytes()),
        ciphertext: message.ciphertext,
        mac: message.mac,
    })
}

/// A restored room key, in the shape of the key-export file (spec
/// `megolm_export_session_data`).
#[derive(Clone, PartialEq, Eq)]
pub struct RoomKey(pub Value);

impl fmt::Debug for RoomKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RoomKey")
            .field("room_id", &self.0.get("room_id"))
            .field("session_id", &self.0.get("session_id"))
            .finish_non_exhaustive()
    }
}

impl Drop for RoomKey {
    fn drop(&mut self) {
        if let Some(Value::String(s)) = self.0.get_mut("session_key") {
            s.zeroize();
        }
    }
}

/// Imports an exported megolm session key with vodozemac and checks that it is the key of
/// `session_id` (a key filed under another session's ID is refused).
pub fn import_session_key(
    session_id: &str,
    session_key: &str,
) -> Result<vodozemac::megolm::InboundGroupSession, BackupError> {
    let exported =
        vodozemac::megolm::ExportedSessionKey::from_base64(session_key.trim_end_matches('='))
            .map_err(|e| BackupError::Plaintext(format!("session_key: {e}")))?;
    let session = vodozemac::megolm::InboundGroupSession::import(
        &exported,
        vodozemac::megolm::SessionConfig::version_1(),
    );
    let actual = session.session_id();
    if actual != session_id.trim_end_matches('=') {
        return Err(BackupError::SessionIdMismatch {
            expected: session_id.to_string(),
            actual,
        });
    }
    Ok(session)
}

/// Turns decrypted backup plaintext into an export entry for (`room_id`, `session_id`),
/// after checking with vodozemac that its session key belongs to `session_id`.
pub fn room_key(room_id: &str, session_id: &str, plaintext: &[u8]) -> Result<RoomKey, BackupError> {
    let v: Value = serde_json::from_slice(plaintext)
        .map_err(|e| BackupError::Plaintext(format!("not JSON: {e}")))?;
    let s = |name: &str| -> Result<String, BackupError> {
        v.get(name)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| BackupError::Plaintext(format!("no {name}")))
    };
    let algorithm = s("algorithm")?;
    if algorithm != MEGOLM_ALGORITHM {
        return Err(BackupError::Plaintext(format!("algorithm {algorithm}")));
    }
    let session_key = Zeroizing::new(s("session_key")?);
    import_session_key(session_id, &session_key)?;
    let mut out = json!({
        "algorithm": MEGOLM_ALGORITHM,
        "room_id": room_id,
        "session_id": session_id,
        "sender_key": s("sender_key")?,
        "session_key": *session_key,
        "sender_claimed_keys": v.get("sender_claimed_keys").cloned().unwrap_or_else(|| json!({})),
        "forwarding_curve25519_key_chain": v.get("forwarding_curve25519_key_chain").cloned().unwrap_or_else(|| json!([])),
    });
    // The field's name drifted: m.shared_history (rust-sdk, js test data), shared_history
    // (spec v1.19, mautrix), org.matrix.msc3061.shared_history.
    let shared = [
        "m.shared_history",
        "shared_history",
        "org.matrix.msc3061.shared_history",
    ]
    .iter()
    .find_map(|k| v.get(*k).and_then(Value::as_bool));
    if let Some(b) = shared {
        out["m.shared_history"] = json!(b);
    }
    Ok(RoomKey(out))
}

/// The plaintext to back up for an export entry (`BackedUpSessionData`).
pub fn backup_plaintext(key: &Value) -> Result<Vec<u8>, BackupError> {
    let mut v = json!({
        "algorithm": key.get("algorithm").cloned().unwrap_or(json!(MEGOLM_ALGORITHM)),
        "sender_key": key.get("sender_key").cloned().ok_or_else(|| BackupError::Plaintext("no sender_key".into()))?,
        "session_key": key.get("session_key").cloned().ok_or_else(|| BackupError::Plaintext("no session_key".into()))?,
        "sender_claimed_keys": key.get("sender_claimed_keys").cloned().unwrap_or_else(|| json!({})),
        "forwarding_curve25519_key_chain": key.get("forwarding_curve25519_key_chain").cloned().unwrap_or_else(|| json!([])),
    });
    if let Some(b) = key
        .get("m.shared_history")
        .or_else(|| key.get("shared_history"))
    {
        v["m.shared_history"] = b.clone();
    }
    serde_json::to_vec(&v).map_err(|e| BackupError::Plaintext(e.to_string()))
}

/// The `auth_data` of a new backup version: the public key, signed by the master key (and
/// by the device, when there is one).
pub fn auth_data(
    user_id: &str,
    backup_public: &Curve25519PublicKey,
    master: &dyn Ed25519Signer,
    device: Option<(&str, &dyn Ed25519Signer)>,
) -> Result<Value, SignedJsonError> {
    let mut auth = json!({ "public_key": backup_public.to_base64() });
    sign_json(&mut auth, user_id, &master.public_key().key_id(), master)?;
    if let Some((device_id, signer)) = device {
        sign_json(&mut auth, user_id, &format!("ed25519:{device_id}"), signer)?;
    }
    Ok(auth)
}

/// A backup version as the server describes it (`GET /room_keys/version`): untrusted.
/// `auth_data` stays JSON, because its signatures are checked over exactly what the server
/// sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupVersion {
    pub version: String,
    pub algorithm: String,
    /// The number of keys the server says it holds (0 when it does not say).
    pub count: u64,
    pub etag: Option<String>,
    /// `Null` when the server sent none.
    pub auth_data: Value,
}

impl BackupVersion {
    /// The typed view of a server's answer; `None` when `version` or `algorithm` is not a
    /// string.
    pub fn from_json(v: &Value) -> Option<BackupVersion> {
        Some(BackupVersion {
            version: v.get("version")?.as_str()?.to_string(),
            algorithm: v.get("algorithm")?.as_str()?.to_string(),
            count: v.get("count").and_then(Value::as_u64).unwrap_or(0),
            etag: v.get("etag").and_then(Value::as_str).map(str::to_string),
            auth_data: v.get("auth_data").cloned().unwrap_or(Value::Null),
        })
    }

    /// `auth_data.public_key` as the server wrote it (untrusted text; empty if absent).
    pub fn claimed_public_key(&self) -> &str {
        self.auth_data
            .get("public_key")
            .and_then(Value::as_str)
            .unwrap_or("")
    }

    /// The backup key, when `auth_data` carries a valid signature by `master` (else why
    /// not).
    pub fn verified_key(
        &self,
        user_id: &str,
        master: &Ed25519PublicKey,
    ) -> Result<Curve25519PublicKey, AuthDataError> {
        verify_auth_data(user_id, &self.auth_data, master)
    }
}

/// Why a backup's `auth_data` cannot be trusted.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthDataError {
    #[error(transparent)]
    Signature(#[from] SignedJsonError),
    #[error("auth_data has no public_key")]
    NoPublicKey,
    #[error("auth_data.public_key: {0}")]
    BadPublicKey(#[from] super::keys::KeyError),
}

/// Checks that `auth_data` carries a valid signature by our master key and returns its
/// public key.
pub fn verify_auth_data(
    user_id: &str,
    auth_data: &Value,
    master: &Ed25519PublicKey,
) -> Result<Curve25519PublicKey, AuthDataError> {
    verify_json(auth_data, user_id, &master.key_id(), master)?;
    let pk = auth_data
        .get("public_key")
        .and_then(Value::as_str)
        .ok_or(AuthDataError::NoPublicKey)?;
    Ok(Curve25519PublicKey::from_base64(pk)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b64: &str) -> SoftwareX25519 {
        let bytes: [u8; 32] = decode_base64(b64).unwrap().try_into().unwrap();
        SoftwareX25519(x25519_dalek::StaticSecret::from(bytes))
    }

    fn data(ephemeral: &str, ciphertext: &str, mac: &str) -> EncryptedSessionData {
        EncryptedSessionData::from_json(
            &json!({"ephemeral": ephemeral, "ciphertext": ciphertext, "mac": mac}),
        )
        .unwrap()
    }

    /// Vector (a), matrix-js-sdk test data (docs/vectors.md).
    pub const JS_CIPHERTEXT: &str = "r6HRk2/Im2yJe5cLP8R81aVjFWjYWPHpw7TVxphiSK1cdIDZTTK57r6MfU+0i/mTPn+/PosT74OvYwCnehy2dyqqks+Ev+uBKw3TAo0HCv7W3Rmq9XtqxikG9ts7XtcjFEkx37+qRaXtikcu0+CmUf+I5X6KStwNXb+CPnN2CGgwpn8g5+xEgSjE904QFrte4s9ygfqymgszgF7kzNICYF5g2GTlss8pdu/GLnh52AKvtT6FcqE5LC74N07BDWUycMHMMMw43F7z5GhzEnoWOXlbz+M4eTGrCYuhvcmQGNbdgzYqEXPm1z4xFhVgs84kFCtNeUc+AHZWfC2zynZ++4tpmfCYYpYEfYwQNo9Ks7o+Mh2PtAo9/GIU4xAK/uG0vizEiNYt/1QAxwgrmDxjdRe5TH4pPUtLMktRDyZKeUHJmYZA7pcLtpVatXhXmVEQLFLDc/uusxaBxFXYkx7BQnNRoa1BE1yXRxud94s6vMsI/auhn95TG58Z0Rz9psRT4HzgDKeHf/uVbdfKR9O3gqxlB4mzZAyTCqHhUQERmGiISC2FeuKkAwVk/ZxXiFqSTUCizwXcczGbzEbC+pBJTi6jX5Pa2yI9cT5C8xaGGUzEaKdNWukcs73uvXoFl/5y0Y29PkfE8UlPWpN4kZn7hrcOllcqqV9ZMH+rBbGViIw0yZ6yQUciEJzO8Gk3yz36lIT30VhCgKXMu+kELEPTRSVXqEQkCXBcfNOhgl3LIso";

    #[test]
    fn js_sdk_vector() {
        let k = key("dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=");
        assert_eq!(
            k.public_key().to_base64(),
            "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo"
        );
        let d = data(
            "q+P1WdRtEiPIEtNuuGrRcueZxUbLnSKdsuTAkxewXgU",
            JS_CIPHERTEXT,
            "OibmACbORhI",
        );
        let plain = decrypt(&k, &d).unwrap();
        let v: Value = serde_json::from_slice(&plain).unwrap();
        assert_eq!(
            v["session_id"],
            "ipdI6Zs/7DzFTEhiA2iGaMDfHkIYCleqXT6L+5e1/co"
        );
        let rk = room_key(
            "!room:id",
            "ipdI6Zs/7DzFTEhiA2iGaMDfHkIYCleqXT6L+5e1/co",
            &plain,
        )
        .unwrap();
        assert_eq!(rk.0["m.shared_history"], true);
        assert_eq!(
            rk.0["sender_key"],
            "WimPd2udAU/1S/+YBpPbmr9L+0H5H+BnAVHSwDxlPGc"
        );
        // The session key checked against the wrong session: refused.
        assert!(matches!(
            room_key(
                "!room:id",
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
                &plain
            ),
            Err(BackupError::SessionIdMismatch { .. })
        ));
        // The MAC over the ciphertext (what the spec meant) is not what anyone writes.
        let d2 = data(
            "q+P1WdRtEiPIEtNuuGrRcueZxUbLnSKdsuTAkxewXgU",
            JS_CIPHERTEXT,
            "I/VWGB9XWyM",
        );
        assert_eq!(decrypt(&k, &d2), Err(BackupError::Mac));
    }

    #[test]
    fn tampering_is_detected() {
        let k = key("dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo");
        let good = data(
            "q+P1WdRtEiPIEtNuuGrRcueZxUbLnSKdsuTAkxewXgU",
            JS_CIPHERTEXT,
            "OibmACbORhI",
        );
        let mut bad_eph = good.clone();
        let mut flipped = *bad_eph.ephemeral.as_bytes();
        flipped[3] ^= 1;
        bad_eph.ephemeral = Curve25519PublicKey::from_bytes(flipped);
        assert!(matches!(
            decrypt(&k, &bad_eph),
            Err(BackupError::Mac | BackupError::EphemeralKey)
        ));
        let mut bad_mac = good.clone();
        bad_mac.mac[0] ^= 1;
        assert_eq!(decrypt(&k, &bad_mac), Err(BackupError::Mac));
        // The MAC does not cover the ciphertext: a flipped last block gives bad padding,
        // a flipped early block gives garbage that is not JSON or not a session.
        let mut bad_ct = good.clone();
        let n = bad_ct.ciphertext.len();
        bad_ct.ciphertext[n - 1] ^= 0x55;
        assert_eq!(decrypt(&k, &bad_ct), Err(BackupError::Padding));
        let mut bad_block = good.clone();
        bad_block.ciphertext[20] ^= 0x55;
        let plain = decrypt(&k, &bad_block).unwrap();
        assert!(
            room_key(
                "!room:id",
                "ipdI6Zs/7DzFTEhiA2iGaMDfHkIYCleqXT6L+5e1/co",
                &plain
            )
            .is_err()
        );
    }

    /// Vectors (b) (matrix-rust-sdk) and (c) (mautrix-go).
    #[test]
    fn rust_sdk_and_mautrix_vectors() {
        let k = key("Ha9cklU/9NqFo9WKdVfGzmqUL/9wlkdxfEitbSIPVXw");
        assert_eq!(
            k.public_key().to_base64(),
            "6Q6b15s4YM2jCs38pHiN8wiRkiuCcvpsM9S3/qm31Co"
        );
        let d = data(
            "HlLi76oV6wxHz3PCqE/bxJi6yF1HnYz5Dq3T+d/KpRw",
            "MuM8E3Yc6TSAvhVGb77rQ++jE6p9dRepx63/3YPD2wACKAppkZHeFrnTH6wJ/HSyrmzo7HfwqVl6tKNpfooSTHqUf6x1LHz+h4B/Id5ITO1WYt16AaI40LOnZqTkJZCfSPuE2oxalwEHnCS3biWybutcnrBFPR3LMtaeHvvkb+k3ny9l5ZpsU9G7vCm3XoeYkWfLekWXvDhbqWrylXD0+CNUuaQJ/S527TzLd4XKctqVjjO/cCH7q+9utt9WJAfK8LGaWT/mZ3AeWjf5kiqOpKKf5Cn4n5SSil5p/pvGYmjnURvZSEeQIzHgvunIBEPtzK/MYEPOXe/P5achNGlCx+5N19Ftyp9TFaTFlTWCTi0mpD7ePfCNISrwpozAz9HZc0OhA8+1aSc7rhYFIeAYXFU326NuFIFHI5pvpSxjzPQlOA+mavIKmiRAtjlLw11IVKTxgrdT4N8lXeMr4ndCSmvIkAzFMo1uZA4fzjiAdQJE4/2WeXFNNpvdfoYmX8Zl9CAYjpSO5HvpwkAbk4/iLEH3hDfCVUwDfMh05PdGLnxeRpiEFWSMSsJNp+OWAA+5JsF41BoRGrxoXXT+VKqlUDONd+O296Psu8Q+d8/S618",
            "GtMrurhDTwo",
        );
        let v: Value = serde_json::from_slice(&decrypt(&k, &d).unwrap()).unwrap();
        assert_eq!(
            v["sender_key"],
            "wREG/hBdSspoqM9xPCEXd/4YwjpBFXlsobRkyDTo/Q8"
        );
        assert_eq!(
            v["sender_claimed_keys"]["ed25519"],
            "MnNLGwn4j9ArCvtgU6o1jG8TgJaEXQpDTxz7QU0h7GM"
        );

        let k = key("ReSMMZeRtDSdrwXzu2OvN0B73KUXkYPt3kaYfFIkw10");
        assert_eq!(
            k.public_key().to_base64(),
            "QeTvLLbpkE4iel5+VxNYWmgi1JVvaUSjX+fS02T0LWk"
        );
        let d = data(
            "o43y/Mck1DExWdHr0+qbPJbjzO97+RH1mw6phLhYQj0",
            "hDCjEbyi2uMXt3RBWe9mRdeqhcoraPR84/cq5ll16LIIIICJ8ZLmiWG5IwmGqDFmd3Jw20cNo49b38LH3oBJUl5DG44VdjoI4nlgAzaMSLwMZ7JFGt0Enu1Csfgpvgt1qksTP6QB7YDwITD33iL7ucco1iOl7ABGzhyjCi2iZ3A6Xmx3RsAmHhmU5gJWE6/lIoI6/lh7dZFSfp4RTGfxQ8ToCCIsrgdx1weViv4I4ArXfcrdnaprPzP4cH77Ej1Wg1/bUHtB4C8nOiX+cYnOG29NbTHbtQF14zJpA+2XM2JngiLkss+NQj96PQzgPNhAMEFOLLy5ckY1WvS4sMMeCVzAyt5dwEGDcyxLTC4oJ/RrvLcHCHW0aOygPSlNoMRyDgC0f92+mPQGAmFv4GhfDFXfaauBxBdRAPjXj7Onn2B4UdfwQXGLT3RAihba8i9usOX5hLxqQqvtA3SUuV8hPrzHhpPEeRvx+PgZsXwV+gM7Aw3Mza6hwmILdngJh7NNQTINsCRqff9Ck3Kh7aSOoHsHvz7Ot+T514ObDwWYYCBMmS/6EG4XjSya6R98ggRWGrO9l21YYUvzBTv7OLtMck0Za3151Zqi/5LRKP95QIU",
            "Mnt8eXwFfjw",
        );
        let v: Value = serde_json::from_slice(&decrypt(&k, &d).unwrap()).unwrap();
        assert_eq!(
            v["sender_key"],
            "JUUfV6vErSATm3rIOU9DML+IX1SlYxnAAS824xhbhC4"
        );
        assert!(
            v["session_key"]
                .as_str()
                .unwrap()
                .starts_with("AQAAAABc1O9JP2/HXS22")
        );
    }

    /// Randomized round trips: our encryption, vodozemac `PkDecryption` as the oracle, and
    /// vodozemac's encryption decrypted by us.
    #[test]
    fn round_trips_against_vodozemac() {
        for i in 0..20 {
            let pk = vodozemac::pk_encryption::PkDecryption::new();
            let secret = SoftwareX25519(x25519_dalek::StaticSecret::from(
                *pk.secret_key().to_bytes(),
            ));
            let public = Curve25519PublicKey::from_bytes(pk.public_key().to_bytes());
            let plaintext = vec![b'x'; i * 13];
            let enc = encrypt(&public, &plaintext).unwrap();
            let msg = vodozemac::pk_encryption::Message::from_base64(
                &encode_base64(&enc.ciphertext),
                &encode_base64(&enc.mac),
                &enc.ephemeral.to_base64(),
            )
            .unwrap();
            assert_eq!(pk.decrypt(&msg).unwrap(), plaintext);
            let msg = vodozemac::pk_encryption::PkEncryption::from_key(pk.public_key())
                .encrypt(&plaintext)
                .unwrap();
            let d = EncryptedSessionData {
                ephemeral: Curve25519PublicKey::from_bytes(msg.ephemeral_key.to_bytes()),
                ciphertext: msg.ciphertext,
                mac: msg.mac,
            };
            assert_eq!(*decrypt(&secret, &d).unwrap(), plaintext);
        }
    }

    #[test]
    fn backup_version_views_only_what_the_server_typed_right() {
        let v = BackupVersion::from_json(&json!({
            "version": "7", "algorithm": ALGORITHM, "count": 3, "etag": "e",
            "auth_data": {"public_key": "abc"},
        }))
        .unwrap();
        assert_eq!(
            (v.version.as_str(), v.count, v.etag.as_deref()),
            ("7", 3, Some("e"))
        );
        assert_eq!(v.claimed_public_key(), "abc");
        let bare = BackupVersion::from_json(&json!({"version": "8", "algorithm": "x"})).unwrap();
        assert_eq!((bare.count, bare.auth_data.clone()), (0, Value::Null));
        assert_eq!(bare.claimed_public_key(), "");
        for bad in [
            json!({"algorithm": ALGORITHM}),
            json!({"version": 7, "algorithm": ALGORITHM}),
            json!({"version": "7"}),
            json!([]),
        ] {
            assert_eq!(BackupVersion::from_json(&bad), None, "{bad}");
        }
    }

    #[test]
    fn auth_data_signed_by_the_master_key() {
        let msk = vodozemac::Ed25519SecretKey::from_slice(b"doyouspeakwhaaaaaaaaaaaaaaaaaale");
        let public = key("dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo").public_key();
        let auth = auth_data("@alice:localhost", &public, &msk, None).unwrap();
        // The reference's self-computed MSK signature over this auth_data.
        assert_eq!(
            auth["signatures"]["@alice:localhost"]["ed25519:J+5An10v1vzZpAXTYFokD1/PEVccFnLC61EfRXit0UY"],
            "O1xvEZk1edFNgle/4RC33PMV6tjtemDw3TDeWbf8YS+SHW8mxaC2XBc5wA8iG+1xh6/N++P5YqjdQNX2BVNjAw"
        );
        let mpk = Ed25519Signer::public_key(&msk);
        assert_eq!(
            verify_auth_data("@alice:localhost", &auth, &mpk).unwrap(),
            public
        );
        let mut forged = auth.clone();
        forged["public_key"] = json!(encode_base64(&[9u8; 32]));
        assert!(verify_auth_data("@alice:localhost", &forged, &mpk).is_err());
        let mut unsigned = auth.clone();
        unsigned.as_object_mut().unwrap().remove("signatures");
        assert!(matches!(
            verify_auth_data("@alice:localhost", &unsigned, &mpk),
            Err(AuthDataError::Signature(
                SignedJsonError::MissingSignature { .. }
            ))
        ));
    }
}
