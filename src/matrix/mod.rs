//! Pure Matrix formats and crypto. No I/O and no token types: keys are seen only through
//! [`signed_json::Ed25519Signer`] (and, for key backup, an X25519 agreement trait), which
//! token keys and in-memory software keys both implement.

pub mod backup;
pub mod cross_signing;
pub mod device;
pub mod key_export;
pub mod secret_storage;
pub mod signed_json;
