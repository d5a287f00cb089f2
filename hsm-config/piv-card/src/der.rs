//! Minimal DER / BER-TLV helpers and the X.509 certificates the card issues
//! (self-signed attestation CA and per-slot attestation certificates).
//! All signatures are Ed25519.

use ed25519_dalek::{Signer, SigningKey};

/// Encode a length (DER definite form; also used for PIV BER-TLV).
pub fn enc_len(len: usize, out: &mut Vec<u8>) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = (len as u64).to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (8 - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

/// One TLV with a one-byte tag.
pub fn tlv(tag: u8, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() + 6);
    out.push(tag);
    enc_len(value.len(), &mut out);
    out.extend_from_slice(value);
    out
}

/// TLV with an arbitrary multi-byte tag (e.g. 7F49).
pub fn tlv_tag(tag: &[u8], value: &[u8]) -> Vec<u8> {
    let mut out = tag.to_vec();
    enc_len(value.len(), &mut out);
    out.extend_from_slice(value);
    out
}

/// Parse a list of single-byte-tag BER-TLVs. Returns None on malformed input.
pub fn parse_tlvs(mut data: &[u8]) -> Option<Vec<(u8, &[u8])>> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let tag = data[0];
        let (len, hdr) = dec_len(&data[1..])?;
        let start = 1 + hdr;
        let end = start.checked_add(len)?;
        if end > data.len() {
            return None;
        }
        out.push((tag, &data[start..end]));
        data = &data[end..];
    }
    Some(out)
}

/// Decode a BER length; returns (length, number of length bytes).
pub fn dec_len(data: &[u8]) -> Option<(usize, usize)> {
    let first = *data.first()?;
    if first < 0x80 {
        return Some((first as usize, 1));
    }
    let n = (first & 0x7f) as usize;
    if n == 0 || n > 4 || data.len() < 1 + n {
        return None;
    }
    let mut len = 0usize;
    for b in &data[1..=n] {
        len = (len << 8) | *b as usize;
    }
    Some((len, 1 + n))
}

fn seq(parts: &[&[u8]]) -> Vec<u8> {
    tlv(0x30, &parts.concat())
}

pub fn oid(arcs: &[u64]) -> Vec<u8> {
    let mut body = Vec::new();
    let mut push = |mut v: u64| {
        let mut tmp = vec![(v & 0x7f) as u8];
        v >>= 7;
        while v > 0 {
            tmp.push(0x80 | (v & 0x7f) as u8);
            v >>= 7;
        }
        tmp.reverse();
        body.extend_from_slice(&tmp);
    };
    push(arcs[0] * 40 + arcs[1]);
    for a in &arcs[2..] {
        push(*a);
    }
    tlv(0x06, &body)
}

const OID_ED25519: &[u64] = &[1, 3, 101, 112];
const OID_X25519: &[u64] = &[1, 3, 101, 110];

fn name(cn: &str) -> Vec<u8> {
    let atv = seq(&[&oid(&[2, 5, 4, 3]), &tlv(0x0c, cn.as_bytes())]);
    let o = seq(&[&oid(&[2, 5, 4, 10]), &tlv(0x0c, b"mxhsm test")]);
    seq(&[&tlv(0x31, &o), &tlv(0x31, &atv)])
}

fn integer(bytes: &[u8]) -> Vec<u8> {
    let mut v: Vec<u8> = bytes.iter().copied().skip_while(|b| *b == 0).collect();
    if v.is_empty() || v[0] & 0x80 != 0 {
        v.insert(0, 0);
    }
    tlv(0x02, &v)
}

fn extension(id: &[u64], critical: bool, value: &[u8]) -> Vec<u8> {
    let mut parts = oid(id);
    if critical {
        parts.extend_from_slice(&[0x01, 0x01, 0xff]);
    }
    parts.extend_from_slice(&tlv(0x04, value));
    tlv(0x30, &parts)
}

/// SubjectPublicKeyInfo for a 25519 key (`x25519` selects the OID).
pub fn spki(public: &[u8; 32], x25519: bool) -> Vec<u8> {
    let alg = seq(&[&oid(if x25519 { OID_X25519 } else { OID_ED25519 })]);
    let mut bits = vec![0u8];
    bits.extend_from_slice(public);
    seq(&[&alg, &tlv(0x03, &bits)])
}

pub struct CertParams<'a> {
    pub serial: &'a [u8],
    pub issuer_cn: &'a str,
    pub subject_cn: &'a str,
    pub spki: Vec<u8>,
    pub extensions: Vec<Vec<u8>>,
}

/// Build and sign an X.509 v3 certificate with an Ed25519 issuer key.
pub fn certificate(p: &CertParams<'_>, issuer_key: &SigningKey) -> Vec<u8> {
    let sig_alg = seq(&[&oid(OID_ED25519)]);
    let validity = seq(&[
        &tlv(0x17, b"240101000000Z"),
        &tlv(0x18, b"20991231235959Z"),
    ]);
    let mut parts: Vec<Vec<u8>> = vec![
        tlv(0xa0, &integer(&[2])),
        integer(p.serial),
        sig_alg.clone(),
        name(p.issuer_cn),
        validity,
        name(p.subject_cn),
        p.spki.clone(),
    ];
    if !p.extensions.is_empty() {
        parts.push(tlv(0xa3, &tlv(0x30, &p.extensions.concat())));
    }
    let tbs = tlv(0x30, &parts.concat());
    let sig = issuer_key.sign(&tbs).to_bytes();
    let mut bits = vec![0u8];
    bits.extend_from_slice(&sig);
    seq(&[&tbs, &sig_alg, &tlv(0x03, &bits)])
}

pub const CA_CN: &str = "mxhsm virtual YubiKey PIV Attestation CA";

/// Self-signed attestation CA (also served as the F9 slot certificate).
pub fn ca_certificate(ca_key: &SigningKey) -> Vec<u8> {
    let pk = ca_key.verifying_key().to_bytes();
    let mut serial = [0u8; 8];
    serial.copy_from_slice(&pk[..8]);
    serial[0] &= 0x7f;
    serial[0] |= 0x01;
    certificate(
        &CertParams {
            serial: &serial,
            issuer_cn: CA_CN,
            subject_cn: CA_CN,
            spki: spki(&pk, false),
            extensions: vec![
                // basicConstraints: CA TRUE
                extension(&[2, 5, 29, 19], true, &seq(&[&[0x01, 0x01, 0xff]])),
                // keyUsage: keyCertSign | cRLSign
                extension(&[2, 5, 29, 15], true, &[0x03, 0x02, 0x01, 0x06]),
            ],
        },
        ca_key,
    )
}

const YUBICO_ARC: &[u64] = &[1, 3, 6, 1, 4, 1, 41482, 3];

fn yubico_ext(last: u64, value: &[u8]) -> Vec<u8> {
    let mut arcs = YUBICO_ARC.to_vec();
    arcs.push(last);
    extension(&arcs, false, value)
}

/// Attestation certificate for the key in `slot`, in the style of a YubiKey:
/// subject "YubiKey PIV Attestation <slot>", extensions
/// 1.3.6.1.4.1.41482.3.3 (firmware), .3.7 (serial), .3.8 (pin, touch policy),
/// .3.9 (form factor).
#[allow(clippy::too_many_arguments)]
pub fn attestation_certificate(
    ca_key: &SigningKey,
    slot: u8,
    public: &[u8; 32],
    x25519: bool,
    version: [u8; 3],
    serial: u32,
    pin_policy: u8,
    touch_policy: u8,
) -> Vec<u8> {
    let mut cert_serial = [0u8; 16];
    getrandom::fill(&mut cert_serial).expect("rng");
    cert_serial[0] &= 0x7f;
    cert_serial[0] |= 0x01;
    certificate(
        &CertParams {
            serial: &cert_serial,
            issuer_cn: CA_CN,
            subject_cn: &format!("YubiKey PIV Attestation {slot:02x}"),
            spki: spki(public, x25519),
            extensions: vec![
                yubico_ext(3, &version),
                yubico_ext(7, &integer(&serial.to_be_bytes())),
                yubico_ext(8, &[pin_policy, touch_policy]),
                yubico_ext(9, &[0x01]),
            ],
        },
        ca_key,
    )
}

pub fn pem(label: &str, der: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in der.chunks(3) {
        let n = chunk.len();
        let v = (chunk[0] as u32) << 16
            | (*chunk.get(1).unwrap_or(&0) as u32) << 8
            | *chunk.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= n {
                b64.push(A[((v >> (18 - 6 * i)) & 0x3f) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}
