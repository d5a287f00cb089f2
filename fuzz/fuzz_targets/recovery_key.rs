//! A recovery key as a user types it (or pastes something else).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxhsm::matrix::secret_storage::StorageKey;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(key) = StorageKey::from_recovery_key(text) {
        // What parses must encode back to a key that parses to the same bytes.
        let again = StorageKey::from_recovery_key(&key.to_recovery_key()).unwrap();
        assert_eq!(again.expose(), key.expose());
    }
});
