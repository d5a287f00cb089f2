//! What a (possibly hostile) card answers: status words, BER-TLV, the signature template,
//! the attestation object 5FFF01.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxhsm::token::yubikey::{apdu, first_tlv};

fuzz_target!(|data: &[u8]| {
    if let Ok((body, _sw)) = apdu::split_sw(data) {
        let _ = apdu::parse_signature(body);
    }
    let mut rest = data;
    while let Some((_, value, next)) = apdu::split_tlv(rest) {
        assert!(value.len() <= rest.len());
        rest = next;
    }
    let _ = apdu::expect_tlv(data, 0x7c);
    let _ = first_tlv(data, 0x70);
});
