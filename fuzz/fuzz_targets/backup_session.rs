//! One backed-up session's `session_data` (and the plaintext it decrypts to), from the
//! server: parsing and decryption must fail cleanly.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxhsm::matrix::backup::{self, EncryptedSessionData, SoftwareX25519};

fuzz_target!(|data: &[u8]| {
    let key = SoftwareX25519(x25519_dalek::StaticSecret::from([7u8; 32]));
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        if let Ok(d) = EncryptedSessionData::from_json(&v) {
            let _ = backup::decrypt(&key, &d);
            let _ = backup::decrypt_with_secret(&[1u8; 32], &d);
        }
        let _ = backup::backup_plaintext(&v);
    }
    // As if it were a decrypted plaintext.
    let _ = backup::room_key("!room:localhost", "sessionid", data);
});
