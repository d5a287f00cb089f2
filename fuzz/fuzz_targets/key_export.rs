//! A key export file (`MEGOLM SESSION DATA`), damaged or hostile. PBKDF2 is capped low so
//! the fuzzer reaches everything after it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxhsm::matrix::key_export;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = key_export::decrypt_with_limit(text, "passphrase", 16);
});
