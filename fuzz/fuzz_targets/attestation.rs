//! Attestation certificates from the card (slot certificate, the card's F9 certificate)
//! and root certificates given with --root (PEM or DER).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxhsm::token::yubikey::attestation;

/// Yubico's roots and intermediates, parsed once.
fn shipped() -> &'static (Vec<attestation::Root>, Vec<Vec<u8>>) {
    static SHIPPED: std::sync::OnceLock<(Vec<attestation::Root>, Vec<Vec<u8>>)> =
        std::sync::OnceLock::new();
    SHIPPED.get_or_init(|| (attestation::yubico_roots(), attestation::yubico_intermediates()))
}

fuzz_target!(|data: &[u8]| {
    let _ = attestation::Root::parse("fuzz", data);
    let (leaf, device) = data.split_at(data.len() / 2);
    let (roots, intermediates) = shipped();
    // Nothing a fuzzer makes is signed by Yubico.
    assert!(attestation::verify(leaf, device, intermediates, roots, &[0u8; 32]).is_err());
    assert!(attestation::verify(data, data, &[], &[], &[0u8; 32]).is_err());
});
