//! Pure Matrix formats and crypto. No I/O and no token types: keys are seen only through
//! [`signed_json::Ed25519Signer`] (and, for key backup, an X25519 agreement trait), which
//! token keys and in-memory software keys both implement.

pub mod backup;
pub mod cross_signing;
pub mod device;
pub mod key_export;
pub mod keys;
pub mod sas;
pub mod secret_storage;
pub mod signed_json;

/// HMAC-SHA-256 under `key` of the concatenation of `parts`.
pub(crate) fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    use hmac::{KeyInit, Mac};
    let mut h = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    for p in parts {
        h.update(p);
    }
    h.finalize().into_bytes().into()
}
