//! PIV attestation: proof from the YubiKey that a slot's key was generated on it.
//!
//! ATTEST (INS F9) returns an X.509 certificate for the slot's public key, signed by the
//! card's attestation key (slot F9). The F9 key's certificate is in data object 5FFF01 and
//! is signed by Yubico (directly by a root, or through intermediates). mxhsm ships Yubico's
//! public PIV attestation roots (`data/yubico-piv/`) and accepts a chain only when every
//! signature verifies up to one of them, the leaf certifies exactly the slot's public key,
//! and every certificate is within its validity period. Imported keys cannot be attested
//! (the card refuses), which is how a user tells a generated key from a copied one.
//!
//! Signature algorithms handled: Ed25519, RSA PKCS#1 v1.5 with SHA-256/384, ECDSA P-256 or
//! P-384 with SHA-256/384, which covers Yubico's roots and intermediates and the test card.

use std::time::{SystemTime, UNIX_EPOCH};

use der::{Decode, Encode};
use sha2::Digest;
use x509_cert::Certificate;

/// Yubico's PIV attestation roots, shipped as data (`data/yubico-piv/README.md` has their
/// sources and fingerprints). Firmware before 5.7.4 chains to the first, later firmware to
/// the second. The older pathlen-0 variant and the U2F root in that directory are kept
/// for reference only and are not trusted.
const YUBICO_ROOTS: &[(&str, &str)] = &[
    (
        "Yubico PIV Root CA Serial 263751",
        include_str!("../../../data/yubico-piv/yubico-piv-root-ca-263751.pem"),
    ),
    (
        "Yubico Attestation Root 1",
        include_str!("../../../data/yubico-piv/yubico-attestation-root-1.pem"),
    ),
];

/// Yubico's published intermediates between Attestation Root 1 and the cards' F9
/// certificates (firmware 5.7.4+). The card does not hold them; they are looked up by name
/// and every signature is checked, so they add no trust of their own.
const YUBICO_INTERMEDIATES: &str =
    include_str!("../../../data/yubico-piv/intermediates/yubico-piv-intermediates.pem");

/// Yubico's intermediates, DER.
pub fn yubico_intermediates() -> Vec<Vec<u8>> {
    Certificate::load_pem_chain(YUBICO_INTERMEDIATES.as_bytes())
        .expect("shipped intermediates parse")
        .iter()
        .map(to_der)
        .collect()
}

/// What a verified attestation says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attestation {
    /// Subjects from the slot certificate up to the root.
    pub chain: Vec<String>,
    /// The card's serial number (extension 1.3.6.1.4.1.41482.3.7).
    pub serial: Option<u32>,
    /// The firmware version (1.3.6.1.4.1.41482.3.3).
    pub firmware: Option<[u8; 3]>,
    /// Raw PIN and touch policy bytes (1.3.6.1.4.1.41482.3.8).
    pub policy: Option<[u8; 2]>,
}

/// Why an attestation (or a root given for it) is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttestationError {
    #[error("{what} is not an X.509 certificate: {reason}")]
    NotACertificate { what: String, reason: String },
    #[error("the attestation certifies a different public key than the slot's")]
    OtherKey,
    #[error("the slot certificate was not issued by the card's attestation certificate \"{0}\"")]
    NotIssuedByCard(String),
    /// A certificate of the chain is out of its validity period or badly signed.
    #[error("{0}")]
    Invalid(String),
    #[error("the chain does not reach a trusted root: {0}")]
    NoTrustedRoot(String),
    #[error("the attestation chain is too long")]
    ChainTooLong,
}

fn not_a_certificate(what: &str, e: impl std::fmt::Display) -> AttestationError {
    AttestationError::NotACertificate {
        what: what.to_string(),
        reason: e.to_string(),
    }
}

/// A trust anchor: a root certificate.
pub struct Root {
    pub name: String,
    cert: Certificate,
}

impl Root {
    /// Parses a PEM or DER certificate.
    pub fn parse(name: &str, bytes: &[u8]) -> Result<Root, AttestationError> {
        let cert = if bytes.starts_with(b"-----") {
            use der::DecodePem;
            Certificate::from_pem(bytes)
        } else {
            Certificate::from_der(bytes)
        }
        .map_err(|e| not_a_certificate(name, e))?;
        Ok(Root {
            name: name.to_string(),
            cert,
        })
    }
}

/// Yubico's roots (and nothing else).
pub fn yubico_roots() -> Vec<Root> {
    YUBICO_ROOTS
        .iter()
        .map(|(name, pem)| Root::parse(name, pem.as_bytes()).expect("shipped roots parse"))
        .collect()
}

const OID_ED25519: &str = "1.3.101.112";
const OID_RSA: &str = "1.2.840.113549.1.1.1";
const OID_EC: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";
const OID_RSA_SHA256: &str = "1.2.840.113549.1.1.11";
const OID_RSA_SHA384: &str = "1.2.840.113549.1.1.12";
const OID_ECDSA_SHA256: &str = "1.2.840.10045.4.3.2";
const OID_ECDSA_SHA384: &str = "1.2.840.10045.4.3.3";
const OID_YUBICO_FIRMWARE: &str = "1.3.6.1.4.1.41482.3.3";
const OID_YUBICO_SERIAL: &str = "1.3.6.1.4.1.41482.3.7";
const OID_YUBICO_POLICY: &str = "1.3.6.1.4.1.41482.3.8";

/// Verifies the slot certificate `leaf` (DER) for `public_key`: signed by the card's
/// attestation certificate `device` (DER, object 5FFF01), which chains through Yubico's
/// `intermediates` (DER) to one of `roots`. Nothing the card supplies is ever a root, and
/// the leaf must be signed by the device certificate itself.
pub fn verify(
    leaf: &[u8],
    device: &[u8],
    intermediates: &[Vec<u8>],
    roots: &[Root],
    public_key: &[u8; 32],
) -> Result<Attestation, AttestationError> {
    let leaf_cert =
        Certificate::from_der(leaf).map_err(|e| not_a_certificate("the slot certificate", e))?;
    let certified = leaf_cert
        .tbs_certificate()
        .subject_public_key_info()
        .subject_public_key
        .raw_bytes();
    if certified != public_key {
        return Err(AttestationError::OtherKey);
    }
    let device_cert = Certificate::from_der(device)
        .map_err(|e| not_a_certificate("the card's attestation certificate", e))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let name = |c: &Certificate| c.tbs_certificate().subject().to_string();
    if leaf_cert.tbs_certificate().issuer() != device_cert.tbs_certificate().subject() {
        return Err(AttestationError::NotIssuedByCard(name(&device_cert)));
    }
    check_validity(&leaf_cert, now)?;
    check_signature(leaf, &device_cert).map_err(|e| {
        AttestationError::Invalid(format!("{}: signature by the card: {e}", name(&leaf_cert)))
    })?;

    let pool: Vec<(Certificate, &[u8])> = intermediates
        .iter()
        .map(|d| {
            Certificate::from_der(d)
                .map(|c| (c, d.as_slice()))
                .map_err(|e| not_a_certificate("an attestation intermediate", e))
        })
        .collect::<Result<_, _>>()?;
    let mut chain = vec![name(&leaf_cert), name(&device_cert)];
    let mut current: (Certificate, &[u8]) = (device_cert, device);
    for _ in 0..6 {
        check_validity(&current.0, now)?;
        let issuer = current.0.tbs_certificate().issuer().clone();
        // Every root and intermediate with the issuer's name is tried; the signature
        // decides.
        let mut failures = Vec::new();
        for root in roots
            .iter()
            .filter(|r| r.cert.tbs_certificate().subject() == &issuer)
        {
            match check_signature(current.1, &root.cert) {
                Ok(()) => {
                    check_validity(&root.cert, now)?;
                    chain.push(name(&root.cert));
                    return Ok(Attestation {
                        chain,
                        serial: extension(&leaf_cert, OID_YUBICO_SERIAL).and_then(|v| {
                            let value = der::asn1::Uint::from_der(v).ok()?;
                            let bytes = value.as_bytes();
                            (bytes.len() <= 4)
                                .then(|| bytes.iter().fold(0u32, |a, b| (a << 8) | *b as u32))
                        }),
                        firmware: extension(&leaf_cert, OID_YUBICO_FIRMWARE)
                            .and_then(|v| v.try_into().ok()),
                        policy: extension(&leaf_cert, OID_YUBICO_POLICY)
                            .and_then(|v| v.try_into().ok()),
                    });
                }
                Err(e) => failures.push(format!("{}: {e}", root.name)),
            }
        }
        let next = pool
            .iter()
            .filter(|(c, _)| c.tbs_certificate().subject() == &issuer)
            .find(|(c, _)| match check_signature(current.1, c) {
                Ok(()) => true,
                Err(e) => {
                    failures.push(format!("{}: {e}", name(c)));
                    false
                }
            });
        let Some(next) = next else {
            let last = chain.last().map(String::as_str).unwrap_or("");
            return Err(AttestationError::NoTrustedRoot(if failures.is_empty() {
                format!("nothing known issued \"{last}\" (issuer \"{issuer}\")")
            } else {
                format!(
                    "\"{last}\" is signed by none of the certificates named \"{issuer}\" ({})",
                    failures.join("; ")
                )
            }));
        };
        chain.push(name(&next.0));
        current = (next.0.clone(), next.1);
    }
    Err(AttestationError::ChainTooLong)
}

fn check_validity(cert: &Certificate, now: std::time::Duration) -> Result<(), AttestationError> {
    let v = cert.tbs_certificate().validity();
    if now < v.not_before.to_unix_duration() || now > v.not_after.to_unix_duration() {
        return Err(AttestationError::Invalid(format!(
            "\"{}\" is not valid now (valid {} to {})",
            cert.tbs_certificate().subject(),
            v.not_before,
            v.not_after
        )));
    }
    Ok(())
}

fn extension<'a>(cert: &'a Certificate, oid: &str) -> Option<&'a [u8]> {
    cert.tbs_certificate()
        .extensions()?
        .iter()
        .find(|e| e.extn_id.to_string() == oid)
        .map(|e| e.extn_value.as_bytes())
}

/// The TBSCertificate exactly as encoded in `cert_der` (the first element of the outer
/// SEQUENCE), so the signature is checked over the signed bytes, not a re-encoding.
fn raw_tbs(cert_der: &[u8]) -> Result<&[u8], String> {
    fn header(d: &[u8]) -> Option<(usize, usize)> {
        // (header length, content length) of the TLV at the start of d
        let first = *d.get(1)?;
        if first < 0x80 {
            return Some((2, first as usize));
        }
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || d.len() < 2 + n {
            return None;
        }
        Some((
            2 + n,
            d[2..2 + n]
                .iter()
                .fold(0usize, |a, b| (a << 8) | *b as usize),
        ))
    }
    let (h, _) = header(cert_der).ok_or("bad certificate encoding")?;
    let inner = &cert_der[h..];
    let (th, tl) = header(inner).ok_or("bad certificate encoding")?;
    inner
        .get(..th + tl)
        .ok_or_else(|| "truncated certificate".to_string())
}

/// Checks the signature on `cert_der` with the public key of `issuer`.
fn check_signature(cert_der: &[u8], issuer: &Certificate) -> Result<(), String> {
    let cert = Certificate::from_der(cert_der).map_err(|e| e.to_string())?;
    let tbs = raw_tbs(cert_der)?;
    let sig = cert.signature().raw_bytes();
    let sig_alg = cert.signature_algorithm().oid.to_string();
    let spki = issuer.tbs_certificate().subject_public_key_info();
    let key_alg = spki.algorithm.oid.to_string();
    let key = spki.subject_public_key.raw_bytes();
    let bad = || "the signature does not verify".to_string();
    match (sig_alg.as_str(), key_alg.as_str()) {
        (OID_ED25519, OID_ED25519) => {
            let vk = ed25519_dalek::VerifyingKey::from_bytes(
                key.try_into().map_err(|_| "bad Ed25519 issuer key")?,
            )
            .map_err(|_| "bad Ed25519 issuer key")?;
            let sig = ed25519_dalek::Signature::from_slice(sig).map_err(|_| bad())?;
            vk.verify_strict(tbs, &sig).map_err(|_| bad())
        }
        (OID_RSA_SHA256 | OID_RSA_SHA384, OID_RSA) => {
            use rsa::pkcs1::DecodeRsaPublicKey;
            use rsa::signature::Verifier;
            let pk = rsa::RsaPublicKey::from_pkcs1_der(key)
                .map_err(|e| format!("bad RSA issuer key: {e}"))?;
            let sig = rsa::pkcs1v15::Signature::try_from(sig).map_err(|_| bad())?;
            if sig_alg == OID_RSA_SHA256 {
                rsa::pkcs1v15::VerifyingKey::<sha2::Sha256>::new(pk).verify(tbs, &sig)
            } else {
                rsa::pkcs1v15::VerifyingKey::<sha2::Sha384>::new(pk).verify(tbs, &sig)
            }
            .map_err(|_| bad())
        }
        (OID_ECDSA_SHA256 | OID_ECDSA_SHA384, OID_EC) => {
            use p256::ecdsa::signature::hazmat::PrehashVerifier;
            let digest: Vec<u8> = if sig_alg == OID_ECDSA_SHA256 {
                sha2::Sha256::digest(tbs).to_vec()
            } else {
                sha2::Sha384::digest(tbs).to_vec()
            };
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.decode_as::<der::asn1::ObjectIdentifier>().ok())
                .map(|o| o.to_string())
                .ok_or("the issuer's EC key names no curve")?;
            match curve.as_str() {
                OID_P256 => {
                    let vk = p256::ecdsa::VerifyingKey::from_sec1_bytes(key)
                        .map_err(|_| "bad P-256 issuer key")?;
                    let sig = p256::ecdsa::Signature::from_der(sig).map_err(|_| bad())?;
                    vk.verify_prehash(&digest, &sig).map_err(|_| bad())
                }
                OID_P384 => {
                    let vk = p384::ecdsa::VerifyingKey::from_sec1_bytes(key)
                        .map_err(|_| "bad P-384 issuer key")?;
                    let sig = p384::ecdsa::Signature::from_der(sig).map_err(|_| bad())?;
                    vk.verify_prehash(&digest, &sig).map_err(|_| bad())
                }
                other => Err(format!("unsupported issuer curve {other}")),
            }
        }
        (s, k) => Err(format!(
            "unsupported signature algorithm {s} with an issuer key of type {k}"
        )),
    }
}

/// DER of a certificate, for tests and output.
pub fn to_der(cert: &Certificate) -> Vec<u8> {
    cert.to_der().expect("a parsed certificate encodes")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Yubico's own intermediates verify up to Attestation Root 1 with this code: RSA
    /// PKCS#1 v1.5 SHA-256 on real certificates, including the B2 ones that encode the
    /// algorithm identifier without its NULL parameter.
    #[test]
    fn yubico_intermediates_chain_to_attestation_root_1() {
        let roots = yubico_roots();
        assert_eq!(roots.len(), 2);
        let pool: Vec<(Certificate, Vec<u8>)> = yubico_intermediates()
            .into_iter()
            .map(|d| (Certificate::from_der(&d).unwrap(), d))
            .collect();
        assert_eq!(pool.len(), 5);
        for (cert, der) in &pool {
            let issuer = cert.tbs_certificate().issuer();
            let signer = pool
                .iter()
                .map(|(c, _)| c)
                .chain(roots.iter().map(|r| &r.cert))
                .find(|c| c.tbs_certificate().subject() == issuer)
                .unwrap_or_else(|| panic!("no issuer for {}", cert.tbs_certificate().subject()));
            check_signature(der, signer).unwrap();
            // One flipped bit in the signed part breaks it.
            let mut bad = der.clone();
            let tbs_len = raw_tbs(der).unwrap().len();
            bad[tbs_len / 2] ^= 1;
            assert!(check_signature(&bad, signer).is_err());
        }
    }

    #[test]
    fn a_leaf_for_another_key_is_refused() {
        let pool = yubico_intermediates();
        let key: [u8; 32] = [0; 32];
        let err = verify(&pool[0], &pool[1], &pool, &[], &key).unwrap_err();
        assert_eq!(err, AttestationError::OtherKey);
    }
}
