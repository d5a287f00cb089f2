//! End-to-end check of the virtual PIV card through the real stack:
//! `yubikey` 0.9.0-rc.0 -> pcsc -> pcscd -> vpcd -> mxhsm-piv-card.
//! This never calls the card's code directly.
//!
//! usage: check [CA_PEM]                 full check (card must be freshly started,
//!                                        default PIN/PUK/management key)
//!        check persist-write            import a known key into slot 95
//!        check persist-verify           after a card restart with the same --state:
//!                                        slot 95 still holds that key
//!
//! CA_PEM defaults to $PIV_CARD_CA or ./ca.pem (the file written by
//! `mxhsm-piv-card --attestation-ca`).

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use std::ffi::CString;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Instant;
use x509_cert::der::{Decode, DecodePem, Encode};
use yubikey::piv::{self, AlgorithmId, Origin, RetiredSlotId, SlotAlgorithmId, SlotId};
use yubikey::{Error, MgmKey, PinPolicy, Serial, TouchPolicy, YubiKey};

static mut FAILURES: u32 = 0;

fn check(cond: bool, what: &str) {
    if cond {
        println!("ok   {what}");
    } else {
        println!("FAIL {what}");
        unsafe { FAILURES += 1 };
    }
}

const PIN: &[u8] = b"123456";
const PUK: &[u8] = b"12345678";
const R1: SlotId = SlotId::Retired(RetiredSlotId::R1); // 0x82
const R2: SlotId = SlotId::Retired(RetiredSlotId::R2); // 0x83
const R3: SlotId = SlotId::Retired(RetiredSlotId::R3); // 0x84
const R4: SlotId = SlotId::Retired(RetiredSlotId::R4); // 0x85
const R5: SlotId = SlotId::Retired(RetiredSlotId::R5); // 0x86
const R6: SlotId = SlotId::Retired(RetiredSlotId::R6); // 0x87
const R20: SlotId = SlotId::Retired(RetiredSlotId::R20); // 0x95
const PERSIST_SEED: [u8; 32] = [0x42; 32];

fn msg(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + 7) as u8).collect()
}

fn verify(pk: &VerifyingKey, m: &[u8], sig: &[u8]) -> bool {
    let Ok(sig): Result<[u8; 64], _> = sig.try_into() else {
        return false;
    };
    pk.verify_strict(m, &Signature::from_bytes(&sig)).is_ok()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("persist-write") => persist(true),
        Some("persist-verify") => persist(false),
        other => {
            let ca = other
                .map(String::from)
                .or_else(|| std::env::var("PIV_CARD_CA").ok())
                .unwrap_or_else(|| "ca.pem".into());
            full(&ca)
        }
    }
    let f = unsafe { FAILURES };
    if f > 0 {
        println!("{f} check(s) FAILED");
        std::process::exit(1);
    }
    println!("all checks passed");
}

fn persist(write: bool) {
    let mut yk = YubiKey::open().expect("open");
    let sk = SigningKey::from_bytes(&PERSIST_SEED);
    if write {
        yk.authenticate(&MgmKey::get_default(&yk).unwrap()).unwrap();
        piv::import_cv_key(&mut yk, R20, AlgorithmId::Ed25519, &PERSIST_SEED, TouchPolicy::Never, PinPolicy::Never)
            .expect("import");
        check(true, "persist-write: imported Ed25519 seed into slot 95");
    } else {
        let md = piv::metadata(&mut yk, R20).expect("metadata 95");
        let pk = md.public.map(|p| p.subject_public_key.raw_bytes().to_vec());
        check(pk.as_deref() == Some(&sk.verifying_key().to_bytes()[..]), "persist-verify: slot 95 public key survived restart");
        let sig = piv::sign_data(&mut yk, b"after restart", AlgorithmId::Ed25519, R20).expect("sign");
        check(sig.as_slice() == sk.sign(b"after restart").to_bytes(), "persist-verify: signature equals dalek");
    }
}

fn full(ca_path: &str) {
    // ---------------------------------------------------------------- open
    let yk = YubiKey::open().expect("YubiKey::open");
    println!("name={} version={} serial={}", yk.name(), yk.version(), yk.serial());
    check(yk.version().to_string() == "5.7.1", "version 5.7.1");
    check(yk.serial() == Serial(12345678), "serial 12345678");
    drop(yk);
    let mut yk = YubiKey::open_by_serial(Serial(12345678)).expect("open_by_serial");
    check(true, "open_by_serial(12345678)");
    check(matches!(YubiKey::open_by_serial(Serial(1)), Err(Error::NotFound)), "open_by_serial(1) -> NotFound");

    // ---------------------------------------------------------------- PIN
    check(yk.get_pin_retries().ok() == Some(3), "get_pin_retries = 3");
    let r = yk.verify_pin(b"000000");
    check(matches!(r, Err(Error::WrongPin { tries: 2 })), &format!("wrong PIN -> {r:?}"));
    check(yk.verify_pin(PIN).is_ok(), "correct PIN ok (resets counter)");
    check(yk.get_pin_retries().ok() == Some(3), "get_pin_retries = 3 after correct PIN");
    for expect in [2u8, 1, 0] {
        let r = yk.verify_pin(b"999999");
        check(matches!(r, Err(Error::WrongPin { tries }) if tries == expect), &format!("wrong PIN -> {r:?}"));
    }
    let r = yk.verify_pin(PIN);
    check(matches!(r, Err(Error::WrongPin { tries: 0 })), &format!("blocked: correct PIN refused -> {r:?}"));
    check(yk.get_pin_retries().ok() == Some(0), "get_pin_retries = 0 when blocked");
    let r = yk.unblock_pin(b"87654321", b"111111");
    check(matches!(r, Err(Error::WrongPin { tries: 2 })), &format!("unblock with wrong PUK -> {r:?}"));
    check(yk.unblock_pin(PUK, PIN).is_ok(), "unblock_pin(PUK, new PIN)");
    check(yk.get_pin_retries().ok() == Some(3), "get_pin_retries = 3 after unblock");
    check(yk.change_pin(PIN, b"654321").is_ok(), "change_pin -> 654321");
    check(matches!(yk.verify_pin(PIN), Err(Error::WrongPin { tries: 2 })), "old PIN refused");
    check(yk.change_pin(b"654321", PIN).is_ok(), "change_pin back -> 123456");

    // ------------------------------------------------------ management key
    let mgm = MgmKey::get_default(&yk).expect("MgmKey::get_default");
    println!("default mgm alg = {:?}", mgm.algorithm_id());
    let r = piv::generate(&mut yk, R1, AlgorithmId::Ed25519, PinPolicy::Once, TouchPolicy::Never);
    check(matches!(r, Err(Error::AuthenticationError)), &format!("generate without mgm auth -> {:?}", r.err()));
    let bad = MgmKey::from_bytes([9u8; 24], Some(yubikey::MgmAlgorithmId::Aes192)).unwrap();
    check(yk.authenticate(&bad).is_err(), "authenticate with wrong key fails");
    check(yk.authenticate(&mgm).is_ok(), "authenticate(default AES-192)");

    // ------------------------------------------------------------- generate
    let spki = piv::generate(&mut yk, R1, AlgorithmId::Ed25519, PinPolicy::Once, TouchPolicy::Never).expect("gen ed25519");
    println!("ed25519 spki oid={} pk={}", spki.algorithm.oid, hexs(spki.subject_public_key.raw_bytes()));
    let ed_pk = VerifyingKey::from_bytes(spki.subject_public_key.raw_bytes().try_into().unwrap()).unwrap();
    check(spki.algorithm.oid.to_string() == "1.3.101.112", "Ed25519 SPKI OID");
    let xspki = piv::generate(&mut yk, R2, AlgorithmId::X25519, PinPolicy::Once, TouchPolicy::Never).expect("gen x25519");
    check(xspki.algorithm.oid.to_string() == "1.3.101.110", "X25519 SPKI OID");
    let x_pk: [u8; 32] = xspki.subject_public_key.raw_bytes().try_into().unwrap();
    let always = piv::generate(&mut yk, R3, AlgorithmId::Ed25519, PinPolicy::Always, TouchPolicy::Always).expect("gen always");
    let always_pk = VerifyingKey::from_bytes(always.subject_public_key.raw_bytes().try_into().unwrap()).unwrap();
    let never = piv::generate(&mut yk, R4, AlgorithmId::Ed25519, PinPolicy::Never, TouchPolicy::Cached).expect("gen never");
    let never_pk = VerifyingKey::from_bytes(never.subject_public_key.raw_bytes().try_into().unwrap()).unwrap();

    // ------------------------------------------------------------- signing
    // change_pin left the PIN verified; get_pin_retries re-selects PIV, which
    // (as on a YubiKey) clears the PIN and management-key security status.
    yk.get_pin_retries().unwrap();
    let r = piv::sign_data(&mut yk, b"x", AlgorithmId::Ed25519, R1);
    check(matches!(r, Err(Error::AuthenticationError)), &format!("sign (PIN once) without PIN -> {:?}", r.err()));
    let s = piv::sign_data(&mut yk, b"x", AlgorithmId::Ed25519, R4).expect("never");
    check(verify(&never_pk, b"x", &s), "sign (PIN never) without PIN verifies");
    yk.verify_pin(PIN).expect("verify");
    let t = Instant::now();
    let mut bad = Vec::new();
    let mut n = 0;
    for len in (1..=254).chain(256..=1014) {
        let m = msg(len);
        match piv::sign_data(&mut yk, &m, AlgorithmId::Ed25519, R1) {
            Ok(sig) if verify(&ed_pk, &m, &sig) => n += 1,
            other => bad.push((len, other.map(|s| s.len()))),
        }
    }
    println!("signed {n} messages (1..=254, 256..=1014) in {:?}", t.elapsed());
    check(bad.is_empty() && n == 254 + 759, &format!("all sign_data lengths verify_strict (failures: {bad:?})"));
    let r = catch_unwind(AssertUnwindSafe(|| piv::sign_data(&mut yk, &msg(255), AlgorithmId::Ed25519, R1)));
    println!("sign 255 bytes -> {}", if r.is_err() { "panic (crate bug)".into() } else { format!("{:?}", r.as_ref().unwrap().as_ref().map(|s| s.len())) });
    let r = piv::sign_data(&mut yk, &msg(1015), AlgorithmId::Ed25519, R1);
    println!("sign 1015 bytes -> {:?}", r.as_ref().map(|s| s.len()));
    check(matches!(r, Err(Error::SizeError)), "1015 bytes -> SizeError (crate limit)");

    // PIN policy always
    let r = piv::sign_data(&mut yk, b"a", AlgorithmId::Ed25519, R3);
    check(matches!(r, Err(Error::AuthenticationError)), "PIN always: sign without fresh VERIFY refused");
    yk.verify_pin(PIN).unwrap();
    let s = piv::sign_data(&mut yk, b"a", AlgorithmId::Ed25519, R3).expect("always sign");
    check(verify(&always_pk, b"a", &s), "PIN always: sign right after VERIFY");
    check(piv::sign_data(&mut yk, b"a", AlgorithmId::Ed25519, R3).is_err(), "PIN always: second sign refused");
    yk.verify_pin(PIN).unwrap();

    // ---------------------------------------------------------------- X25519
    let peer = x25519_dalek::StaticSecret::from([7u8; 32]);
    let peer_pub = x25519_dalek::PublicKey::from(&peer);
    let shared = piv::decrypt_data(&mut yk, peer_pub.as_bytes(), AlgorithmId::X25519, R2).expect("ecdh");
    let expect = peer.diffie_hellman(&x25519_dalek::PublicKey::from(x_pk));
    check(shared.as_slice() == expect.as_bytes(), "decrypt_data X25519 == x25519-dalek");
    check(piv::sign_data(&mut yk, b"m", AlgorithmId::Ed25519, R2).is_err(), "sign with X25519 slot refused");

    // ---------------------------------------------------------------- import
    let seed = [0x11u8; 32];
    yk.authenticate(&mgm).expect("authenticate again after re-select");
    piv::import_cv_key(&mut yk, R5, AlgorithmId::Ed25519, &seed, TouchPolicy::Default, PinPolicy::Default).expect("import ed");
    let sk = SigningKey::from_bytes(&seed);
    for m in [&b"hello"[..], &msg(700)] {
        let sig = piv::sign_data(&mut yk, m, AlgorithmId::Ed25519, R5).expect("sign imported");
        check(sig.as_slice() == sk.sign(m).to_bytes(), &format!("imported key: card sig == dalek sig ({} bytes)", m.len()));
    }
    let xs = [0x22u8; 32];
    piv::import_cv_key(&mut yk, R6, AlgorithmId::X25519, &xs, TouchPolicy::Never, PinPolicy::Once).expect("import x");
    let xsec = x25519_dalek::StaticSecret::from(xs);
    let shared = piv::decrypt_data(&mut yk, peer_pub.as_bytes(), AlgorithmId::X25519, R6).expect("ecdh imported");
    check(shared.as_slice() == xsec.diffie_hellman(&peer_pub).as_bytes(), "imported X25519: ECDH == dalek");

    // -------------------------------------------------------------- metadata
    let md = piv::metadata(&mut yk, R1).expect("metadata 82");
    println!("metadata 82: alg={:?} policy={:?} origin={:?}", md.algorithm, md.policy, md.origin);
    check(md.algorithm == SlotAlgorithmId::Asymmetric(AlgorithmId::Ed25519)
        && md.policy == Some((PinPolicy::Once, TouchPolicy::Never))
        && md.origin == Some(Origin::Generated)
        && md.public.as_ref().map(|p| p.subject_public_key.raw_bytes()) == Some(&ed_pk.to_bytes()[..]),
        "metadata 82 (Ed25519, Once/Never, Generated, public key)");
    let md = piv::metadata(&mut yk, R5).expect("metadata 86");
    println!("metadata 86: alg={:?} policy={:?} origin={:?}", md.algorithm, md.policy, md.origin);
    check(md.policy == Some((PinPolicy::Once, TouchPolicy::Never)) && md.origin == Some(Origin::Imported)
        && md.public.as_ref().map(|p| p.subject_public_key.raw_bytes()) == Some(&sk.verifying_key().to_bytes()[..]),
        "metadata 86 (imported, Default policies resolve to Once/Never)");
    let md = piv::metadata(&mut yk, R6).expect("metadata 87");
    check(md.algorithm == SlotAlgorithmId::Asymmetric(AlgorithmId::X25519)
        && md.public.as_ref().map(|p| p.subject_public_key.raw_bytes()) == Some(&x25519_dalek::PublicKey::from(&xsec).to_bytes()[..]),
        "metadata 87 (X25519 public key == dalek)");
    let md = piv::metadata(&mut yk, R3).expect("metadata 84");
    check(md.policy == Some((PinPolicy::Always, TouchPolicy::Always)), "metadata 84 (Always/Always)");
    check(matches!(piv::metadata(&mut yk, SlotId::Retired(RetiredSlotId::R19)), Err(Error::NotFound)), "metadata of empty slot -> NotFound");
    let md = piv::metadata(&mut yk, SlotId::Management(piv::ManagementSlotId::Pin)).expect("metadata PIN");
    println!("metadata PIN: {md:?}");
    let md = piv::metadata(&mut yk, SlotId::Management(piv::ManagementSlotId::Management)).expect("metadata 9B");
    check(md.algorithm == SlotAlgorithmId::Management(yubikey::MgmAlgorithmId::Aes192), "metadata 9B: AES-192");

    // ------------------------------------------------------------ attestation
    let ca_pem = std::fs::read_to_string(ca_path).expect("read CA PEM");
    let ca = x509_cert::Certificate::from_pem(ca_pem.as_bytes()).expect("parse CA");
    let ca_pk = VerifyingKey::from_bytes(
        ca.tbs_certificate().subject_public_key_info().subject_public_key.raw_bytes().try_into().unwrap(),
    ).unwrap();
    let ca_tbs = ca.tbs_certificate().to_der().unwrap();
    check(verify(&ca_pk, &ca_tbs, ca.signature().raw_bytes()), "CA certificate is self-signed (Ed25519)");
    for (slot, pk, name) in [(R1, ed_pk.to_bytes(), "Ed25519 82"), (R2, x_pk, "X25519 83")] {
        let der = piv::attest(&mut yk, slot).expect("attest");
        let cert = x509_cert::Certificate::from_der(&der).expect("parse attestation cert");
        if let Ok(dir) = std::env::var("CHECK_WRITE_CERTS") {
            std::fs::write(format!("{dir}/attest-{}.der", u8::from(slot)), &der).unwrap();
        }
        let tbs = cert.tbs_certificate();
        println!("attest {name}: {} bytes, subject={} issuer={}", der.len(), tbs.subject(), tbs.issuer());
        check(verify(&ca_pk, &tbs.to_der().unwrap(), cert.signature().raw_bytes()), &format!("attest {name}: signature verifies with CA"));
        check(tbs.issuer() == ca.tbs_certificate().subject(), &format!("attest {name}: issuer == CA subject"));
        check(tbs.subject_public_key_info().subject_public_key.raw_bytes() == pk, &format!("attest {name}: certified key == slot key"));
    }
    check(piv::attest(&mut yk, R5).is_err(), "attest imported key refused");
    let f9 = yk.fetch_object(0x005f_ff01).expect("fetch F9 object");
    check(f9.len() > 4 && f9[0] == 0x70 && f9.windows(ca.to_der().unwrap().len()).any(|w| w == ca.to_der().unwrap()),
        "GET DATA 5FFF01 holds the CA certificate");
    // 3DES (and AES-256) management keys: switch, authenticate, switch back.
    for (alg, len) in [(yubikey::MgmAlgorithmId::ThreeDes, 24usize), (yubikey::MgmAlgorithmId::Aes256, 32)] {
        let k: Vec<u8> = (1..=len as u8).collect();
        let key = MgmKey::from_bytes(&k, Some(alg)).unwrap();
        yk.authenticate(&mgm).unwrap();
        check(key.set_manual(&mut yk, false).is_ok(), &format!("set_manual {alg:?}"));
        check(yk.authenticate(&mgm).is_err(), "old key refused");
        check(yk.authenticate(&key).is_ok(), &format!("authenticate {alg:?}"));
        check(mgm.set_manual(&mut yk, false).is_ok(), "back to default AES-192");
    }
    check(yk.authenticate(&mgm).is_ok(), "authenticate default again");
    drop(yk); // disconnect resets the card: PIN state is gone

    // ------------------------------------------------------------- raw APDUs
    raw(&ed_pk);
}

fn hexs(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn ber_len(n: usize) -> Vec<u8> {
    match n {
        0..=0x7f => vec![n as u8],
        0x80..=0xff => vec![0x81, n as u8],
        0x100..=0xffff => vec![0x82, (n >> 8) as u8, n as u8],
        _ => vec![0x83, (n >> 16) as u8, (n >> 8) as u8, n as u8],
    }
}

/// Send one logical command with command chaining (CLA 0x10, 255-byte chunks)
/// and collect a chained answer (61 XX + GET RESPONSE). Returns (data, SW).
fn send(card: &pcsc::Card, ins: u8, p1: u8, p2: u8, data: &[u8]) -> (Vec<u8>, u16) {
    let mut buf = vec![0u8; 300];
    let chunks: Vec<&[u8]> = if data.is_empty() { vec![&[][..]] } else { data.chunks(255).collect() };
    let mut resp = Vec::new();
    let mut sw = 0u16;
    for (i, chunk) in chunks.iter().enumerate() {
        let last = i + 1 == chunks.len();
        let mut apdu = vec![if last { 0x00 } else { 0x10 }, ins, p1, p2];
        if !chunk.is_empty() {
            apdu.push(chunk.len() as u8);
            apdu.extend_from_slice(chunk);
        }
        let r = card.transmit(&apdu, &mut buf).expect("transmit");
        sw = u16::from_be_bytes([r[r.len() - 2], r[r.len() - 1]]);
        if !last && sw != 0x9000 {
            return (vec![], sw);
        }
        resp = r[..r.len() - 2].to_vec();
    }
    while sw >> 8 == 0x61 {
        let r = card.transmit(&[0x00, 0xc0, 0x00, 0x00, 0x00], &mut buf).expect("get response");
        sw = u16::from_be_bytes([r[r.len() - 2], r[r.len() - 1]]);
        resp.extend_from_slice(&r[..r.len() - 2]);
    }
    (resp, sw)
}

fn raw(ed_pk: &VerifyingKey) {
    let ctx = pcsc::Context::establish(pcsc::Scope::User).expect("pcsc context");
    let readers = ctx.list_readers_owned().expect("readers");
    let reader: CString = readers.into_iter().find(|r| r.to_string_lossy().contains("Virtual PCD 00 00")).expect("vpcd reader");
    let card = ctx.connect(&reader, pcsc::ShareMode::Shared, pcsc::Protocols::T1).expect("connect");
    let (_, sw) = send(&card, 0xa4, 0x04, 0x00, &[0xa0, 0x00, 0x00, 0x03, 0x08]);
    check(sw == 0x9000, "raw SELECT PIV");
    let (_, sw) = send(&card, 0x42, 0, 0, &[]);
    check(sw == 0x6d00, &format!("raw unknown INS -> {sw:04x}"));
    let ga = |m: &[u8]| {
        let mut inner = vec![0x82, 0x00, 0x81];
        inner.extend(ber_len(m.len()));
        inner.extend_from_slice(m);
        let mut d = vec![0x7c];
        d.extend(ber_len(inner.len()));
        d.extend(inner);
        d
    };
    let (_, sw) = send(&card, 0x87, 0xe0, 0x82, &ga(b"no pin"));
    check(sw == 0x6982, &format!("raw sign without PIN -> {sw:04x}"));
    let mut pin = PIN.to_vec();
    pin.resize(8, 0xff);
    let (_, sw) = send(&card, 0x20, 0x00, 0x80, &pin);
    check(sw == 0x9000, "raw VERIFY");
    for len in [255usize, 1015, 4096, 65536] {
        let m = msg(len);
        let t = Instant::now();
        let apdus = ga(&m).len().div_ceil(255);
        let (r, sw) = send(&card, 0x87, 0xe0, 0x82, &ga(&m));
        let el = t.elapsed();
        let ok_shape = sw == 0x9000 && r.len() == 68 && r[..4] == [0x7c, 0x42, 0x82, 0x40];
        check(ok_shape && verify(ed_pk, &m, &r[4..]), &format!("raw chained sign {len} bytes ({apdus} APDUs, {el:?}) verify_strict"));
    }
    // Long answer through 61 XX / GET RESPONSE: the F9 attestation object.
    let (r, sw) = send(&card, 0xcb, 0x3f, 0xff, &[0x5c, 0x03, 0x5f, 0xff, 0x01]);
    check(sw == 0x9000 && r.len() > 256 && r[0] == 0x53, &format!("raw GET DATA 5FFF01 via GET RESPONSE ({} bytes)", r.len()));
    let (_, sw) = send(&card, 0xf7, 0x00, 0x42, &[]);
    check(sw == 0x6a88, &format!("raw METADATA bad slot -> {sw:04x}"));
}
