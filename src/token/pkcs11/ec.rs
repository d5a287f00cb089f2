//! The byte encodings PKCS#11 uses for Ed25519 / X25519 keys.
//!
//! `CKA_EC_PARAMS` is sent as an RFC 8410 OID (what most tokens accept; SoftHSM ≥ 2.6 and
//! Kryoptic also accept the PrintableString curve name, which we read too).
//!
//! `CKA_EC_POINT` differs between tokens and spec versions (tokens.md §B3): PKCS#11 3.0 says
//! a DER OCTET STRING (`04 20 ‖ key`, SoftHSM, ykcs11), 3.1 says raw bytes (Kryoptic,
//! OP-TEE), and some write a DER BIT STRING (`03 21 00 ‖ key`). We accept all three.

/// DER OID 1.3.101.112 (id-Ed25519).
pub const OID_ED25519: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];
/// DER OID 1.3.101.110 (id-X25519).
pub const OID_X25519: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x6e];
/// PrintableString "edwards25519".
const NAME_ED25519: &[u8] = b"\x13\x0cedwards25519";
/// PrintableString "curve25519".
const NAME_X25519: &[u8] = b"\x13\x0acurve25519";

/// Which curve `CKA_EC_PARAMS` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Curve {
    Ed25519,
    X25519,
}

/// Reads `CKA_EC_PARAMS`; `None` for any other curve.
pub fn curve_from_params(params: &[u8]) -> Option<Curve> {
    match params {
        p if p == OID_ED25519 || p == NAME_ED25519 => Some(Curve::Ed25519),
        p if p == OID_X25519 || p == NAME_X25519 => Some(Curve::X25519),
        _ => None,
    }
}

/// Reads a 32-byte public key from `CKA_EC_POINT` in any of the three encodings.
pub fn decode_point(point: &[u8]) -> Option<[u8; 32]> {
    let raw = match point {
        [0x04, 0x20, rest @ ..] if rest.len() == 32 => rest,
        [0x03, 0x21, 0x00, rest @ ..] if rest.len() == 32 => rest,
        raw if raw.len() == 32 => raw,
        _ => return None,
    };
    raw.try_into().ok()
}

/// `CKA_EC_POINT` as we write it for imported public keys: the DER OCTET STRING of
/// PKCS#11 3.0, which every token we know reads.
pub fn encode_point(key: &[u8; 32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(34);
    out.extend_from_slice(&[0x04, 0x20]);
    out.extend_from_slice(key);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_point_encodings() {
        let key = [7u8; 32];
        let mut octet = vec![0x04, 0x20];
        octet.extend_from_slice(&key);
        let mut bits = vec![0x03, 0x21, 0x00];
        bits.extend_from_slice(&key);
        assert_eq!(decode_point(&key), Some(key));
        assert_eq!(decode_point(&octet), Some(key));
        assert_eq!(decode_point(&bits), Some(key));
        assert_eq!(decode_point(&encode_point(&key)), Some(key));
        assert_eq!(decode_point(&key[..31]), None);
        assert_eq!(decode_point(&[0x04, 0x21, 0]), None);
        // 33 raw bytes are not a 25519 point in any encoding
        assert_eq!(decode_point(&[1u8; 33]), None);
    }

    #[test]
    fn curve_names() {
        assert_eq!(curve_from_params(OID_ED25519), Some(Curve::Ed25519));
        assert_eq!(
            curve_from_params(b"\x13\x0cedwards25519"),
            Some(Curve::Ed25519)
        );
        assert_eq!(curve_from_params(OID_X25519), Some(Curve::X25519));
        assert_eq!(
            curve_from_params(b"\x13\x0acurve25519"),
            Some(Curve::X25519)
        );
        // P-256
        assert_eq!(
            curve_from_params(&[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07]),
            None
        );
    }
}
