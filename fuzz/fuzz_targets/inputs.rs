//! What a user (or a script) gives on the command line or in files: homeserver URLs,
//! PKCS#11 URIs, user IDs, private-key files.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxhsm::homeserver::{HomeserverUrl, check_logged_in_user};
use mxhsm::token::SecretKeyBytes;
use mxhsm::token::pkcs11::Pkcs11Uri;

fuzz_target!(|data: &[u8]| {
    let _ = SecretKeyBytes::parse(data);
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(u) = HomeserverUrl::parse(s, false) {
        // Plain http is only ever accepted for this machine.
        assert!(!u.is_insecure());
        assert!(u.as_str().starts_with("https://") || u.is_loopback());
    }
    let _ = Pkcs11Uri::parse(s);
    let _ = mxhsm::token::check_user_id(s);
    let _ = check_logged_in_user("alice", s);
});
