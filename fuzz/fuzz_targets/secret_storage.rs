//! Secret-storage account data from the server: a key description (`m.secret_storage.key.*`)
//! and an encrypted secret, read with a fixed key and a passphrase (iterations capped low).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxhsm::matrix::secret_storage::{self as ssss, StorageKey};

fuzz_target!(|data: &[u8]| {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let key = StorageKey::from_bytes([3u8; 32]);
    let _ = key.check(&v);
    let _ = key.decrypt(ssss::MASTER, &v);
    let _ = key.decrypt_key(ssss::BACKUP, &v);
    if let Some(encrypted) = v.get("encrypted").and_then(|e| e.as_object()) {
        for e in encrypted.values() {
            let _ = key.decrypt_key(ssss::SELF_SIGNING, e);
        }
    }
    let _ = StorageKey::from_passphrase_with_limit("passphrase", &v, 64);
});
