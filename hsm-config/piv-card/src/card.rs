//! The PIV applet model: persistent state, session state and APDU dispatch.

use crate::der::{self, dec_len, parse_tlvs, tlv, tlv_tag};
use aes::cipher::{BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};
use ed25519_dalek::{Signer, SigningKey};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::PathBuf;

pub const VERSION: [u8; 3] = [5, 7, 1];
pub const DEFAULT_PIN: &[u8] = b"123456";
pub const DEFAULT_PUK: &[u8] = b"12345678";
pub const DEFAULT_MGM: [u8; 24] = [
    1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8,
];
pub const ALG_ED25519: u8 = 0xe0;
pub const ALG_X25519: u8 = 0xe1;
const MGM_3DES: u8 = 0x03;
const MGM_AES128: u8 = 0x08;
const MGM_AES192: u8 = 0x0a;
const MGM_AES256: u8 = 0x0c;
const DEFAULT_TRIES: u8 = 3;
/// Maximum total size of a chained command (a 64 KiB message plus TLV headers fits).
const MAX_CHAIN: usize = 256 * 1024;
/// Data bytes per response APDU before switching to 61 XX / GET RESPONSE.
const MAX_RESP: usize = 256;

const AID_PIV: &[u8] = &[0xa0, 0x00, 0x00, 0x03, 0x08];
const AID_MGMT: &[u8] = &[0xa0, 0x00, 0x00, 0x05, 0x27, 0x47, 0x11, 0x17];
const AID_OTP: &[u8] = &[0xa0, 0x00, 0x00, 0x05, 0x27, 0x20, 0x01, 0x01];

pub const SW_OK: u16 = 0x9000;
const SW_WRONG_LENGTH: u16 = 0x6700;
const SW_SECURITY: u16 = 0x6982;
const SW_BLOCKED: u16 = 0x6983;
const SW_CONDITIONS: u16 = 0x6985;
const SW_WRONG_DATA: u16 = 0x6a80;
const SW_NOT_FOUND: u16 = 0x6a82;
const SW_WRONG_P1P2: u16 = 0x6a86;
const SW_REF_NOT_FOUND: u16 = 0x6a88;
const SW_INS: u16 = 0x6d00;
const SW_CLA: u16 = 0x6e00;

#[derive(Clone)]
pub struct KeySlot {
    pub alg: u8,
    pub secret: [u8; 32],
    pub pin_policy: u8,
    pub touch_policy: u8,
    /// 1 generated, 2 imported
    pub origin: u8,
}

impl KeySlot {
    pub fn public(&self) -> [u8; 32] {
        if self.alg == ALG_ED25519 {
            SigningKey::from_bytes(&self.secret).verifying_key().to_bytes()
        } else {
            x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(self.secret)).to_bytes()
        }
    }
}

/// Everything that survives a power cycle (and, with `--state`, a restart).
pub struct Persistent {
    pub serial: u32,
    pub pin: Vec<u8>,
    pub puk: Vec<u8>,
    pub pin_max: u8,
    pub pin_left: u8,
    pub puk_max: u8,
    pub puk_left: u8,
    pub mgm_alg: u8,
    pub mgm_key: Vec<u8>,
    pub attest_seed: [u8; 32],
    pub slots: BTreeMap<u8, KeySlot>,
    pub objects: BTreeMap<u32, Vec<u8>>,
}

impl Persistent {
    pub fn new(serial: u32) -> Self {
        let mut attest_seed = [0u8; 32];
        getrandom::fill(&mut attest_seed).expect("rng");
        Persistent {
            serial,
            pin: DEFAULT_PIN.to_vec(),
            puk: DEFAULT_PUK.to_vec(),
            pin_max: DEFAULT_TRIES,
            pin_left: DEFAULT_TRIES,
            puk_max: DEFAULT_TRIES,
            puk_left: DEFAULT_TRIES,
            mgm_alg: MGM_AES192,
            mgm_key: DEFAULT_MGM.to_vec(),
            attest_seed,
            slots: BTreeMap::new(),
            objects: BTreeMap::new(),
        }
    }

    pub fn to_json(&self) -> Value {
        let slots: serde_json::Map<String, Value> = self
            .slots
            .iter()
            .map(|(s, k)| {
                (
                    format!("{s:02x}"),
                    json!({"alg": k.alg, "secret": hex(&k.secret), "pin_policy": k.pin_policy,
                           "touch_policy": k.touch_policy, "origin": k.origin}),
                )
            })
            .collect();
        let objects: serde_json::Map<String, Value> = self
            .objects
            .iter()
            .map(|(id, v)| (format!("{id:06x}"), Value::String(hex(v))))
            .collect();
        json!({
            "serial": self.serial, "pin": hex(&self.pin), "puk": hex(&self.puk),
            "pin_max": self.pin_max, "pin_left": self.pin_left,
            "puk_max": self.puk_max, "puk_left": self.puk_left,
            "mgm_alg": self.mgm_alg, "mgm_key": hex(&self.mgm_key),
            "attest_seed": hex(&self.attest_seed), "slots": slots, "objects": objects,
        })
    }

    pub fn from_json(v: &Value) -> Option<Self> {
        let u8f = |k: &str| v.get(k)?.as_u64().map(|x| x as u8);
        let hexf = |k: &str| unhex(v.get(k)?.as_str()?);
        let mut slots = BTreeMap::new();
        for (k, s) in v.get("slots")?.as_object()? {
            let slot = u8::from_str_radix(k, 16).ok()?;
            let secret: [u8; 32] = unhex(s.get("secret")?.as_str()?)?.try_into().ok()?;
            slots.insert(
                slot,
                KeySlot {
                    alg: s.get("alg")?.as_u64()? as u8,
                    secret,
                    pin_policy: s.get("pin_policy")?.as_u64()? as u8,
                    touch_policy: s.get("touch_policy")?.as_u64()? as u8,
                    origin: s.get("origin")?.as_u64()? as u8,
                },
            );
        }
        let mut objects = BTreeMap::new();
        for (k, o) in v.get("objects")?.as_object()? {
            objects.insert(u32::from_str_radix(k, 16).ok()?, unhex(o.as_str()?)?);
        }
        Some(Persistent {
            serial: v.get("serial")?.as_u64()? as u32,
            pin: hexf("pin")?,
            puk: hexf("puk")?,
            pin_max: u8f("pin_max")?,
            pin_left: u8f("pin_left")?,
            puk_max: u8f("puk_max")?,
            puk_left: u8f("puk_left")?,
            mgm_alg: u8f("mgm_alg")?,
            mgm_key: hexf("mgm_key")?,
            attest_seed: hexf("attest_seed")?.try_into().ok()?,
            slots,
            objects,
        })
    }
}

#[derive(PartialEq, Clone, Copy)]
enum Applet {
    Piv,
    Mgmt,
    Otp,
}

/// Pending management-key challenge.
enum MgmChallenge {
    /// Mutual auth: the plaintext witness the host must return.
    Witness(Vec<u8>),
    /// Single auth (card challenge, host answers with its encryption).
    Challenge(Vec<u8>),
}

/// State that a power cycle / reset clears.
struct Session {
    applet: Applet,
    pin_verified: bool,
    /// Set by a successful VERIFY; consumed by the next command (PIN policy "always").
    pin_fresh: bool,
    mgm_authenticated: bool,
    mgm_challenge: Option<MgmChallenge>,
    chain: Option<([u8; 3], Vec<u8>)>,
    pending: Vec<u8>,
}

impl Session {
    fn new() -> Self {
        Session {
            applet: Applet::Piv,
            pin_verified: false,
            pin_fresh: false,
            mgm_authenticated: false,
            mgm_challenge: None,
            chain: None,
            pending: Vec::new(),
        }
    }
}

pub struct Card {
    pub st: Persistent,
    session: Session,
    state_file: Option<PathBuf>,
    ca_key: SigningKey,
    pub ca_cert: Vec<u8>,
    pub verbose: bool,
}

pub struct Resp {
    pub data: Vec<u8>,
    pub sw: u16,
}

fn sw(sw: u16) -> Resp {
    Resp { data: vec![], sw }
}
fn ok(data: Vec<u8>) -> Resp {
    Resp { data, sw: SW_OK }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

fn valid_key_slot(slot: u8) -> bool {
    matches!(slot, 0x9a | 0x9c | 0x9d | 0x9e | 0x82..=0x95)
}

fn strip_pin(data: &[u8]) -> &[u8] {
    let end = data.iter().rposition(|b| *b != 0xff).map_or(0, |i| i + 1);
    &data[..end]
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Encrypt or decrypt one block with the management key.
fn mgm_block(alg: u8, key: &[u8], block: &mut [u8], encrypt: bool) -> Option<()> {
    macro_rules! run {
        ($c:ty) => {{
            let c = <$c>::new_from_slice(key).ok()?;
            let b = block.try_into().ok()?;
            if encrypt { c.encrypt_block(b) } else { c.decrypt_block(b) }
        }};
    }
    match alg {
        MGM_3DES => run!(des::TdesEde3),
        MGM_AES128 => run!(aes::Aes128),
        MGM_AES192 => run!(aes::Aes192),
        MGM_AES256 => run!(aes::Aes256),
        _ => return None,
    }
    Some(())
}

fn mgm_key_len(alg: u8) -> Option<usize> {
    match alg {
        MGM_3DES | MGM_AES192 => Some(24),
        MGM_AES128 => Some(16),
        MGM_AES256 => Some(32),
        _ => None,
    }
}

fn mgm_block_len(alg: u8) -> usize {
    if alg == MGM_3DES { 8 } else { 16 }
}

fn random(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    getrandom::fill(&mut v).expect("rng");
    v
}

impl Card {
    pub fn new(st: Persistent, state_file: Option<PathBuf>) -> Self {
        let ca_key = SigningKey::from_bytes(&st.attest_seed);
        let ca_cert = der::ca_certificate(&ca_key);
        Card {
            st,
            session: Session::new(),
            state_file,
            ca_key,
            ca_cert,
            verbose: false,
        }
    }

    pub fn power_reset(&mut self) {
        self.session = Session::new();
    }

    fn save(&self) {
        if let Some(path) = &self.state_file {
            let tmp = path.with_extension("tmp");
            let text = serde_json::to_string_pretty(&self.st.to_json()).expect("json");
            if let Err(e) = std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, path)) {
                eprintln!("piv-card: cannot write state {}: {e}", path.display());
            }
        }
    }

    /// Process one command APDU and return the response APDU bytes (data || SW).
    pub fn process(&mut self, apdu: &[u8]) -> Vec<u8> {
        let r = self.process_inner(apdu);
        let mut out = r.data;
        out.push((r.sw >> 8) as u8);
        out.push(r.sw as u8);
        out
    }

    fn process_inner(&mut self, apdu: &[u8]) -> Resp {
        if apdu.len() < 4 {
            return sw(SW_WRONG_LENGTH);
        }
        let (cla, ins, p1, p2) = (apdu[0], apdu[1], apdu[2], apdu[3]);
        let Some(data) = parse_body(&apdu[4..]) else {
            return sw(SW_WRONG_LENGTH);
        };
        if cla & !0x10 != 0 {
            return sw(SW_CLA);
        }
        if ins == 0xc0 {
            return self.get_response();
        }
        self.session.pending.clear();

        // Command chaining.
        let head = [ins, p1, p2];
        if cla & 0x10 != 0 {
            match &mut self.session.chain {
                Some((h, buf)) if *h == head => {
                    if buf.len() + data.len() > MAX_CHAIN {
                        self.session.chain = None;
                        return sw(SW_WRONG_LENGTH);
                    }
                    buf.extend_from_slice(data);
                }
                _ => self.session.chain = Some((head, data.to_vec())),
            }
            return sw(SW_OK);
        }
        let full: Vec<u8>;
        let data: &[u8] = match self.session.chain.take() {
            Some((h, mut buf)) if h == head => {
                if buf.len() + data.len() > MAX_CHAIN {
                    return sw(SW_WRONG_LENGTH);
                }
                buf.extend_from_slice(data);
                full = buf;
                &full
            }
            _ => data,
        };

        let fresh = std::mem::take(&mut self.session.pin_fresh);
        let r = self.dispatch(ins, p1, p2, data, fresh);
        self.queue(r)
    }

    /// Split a long answer into 61 XX chunks.
    fn queue(&mut self, mut r: Resp) -> Resp {
        if r.sw == SW_OK && r.data.len() > MAX_RESP {
            let rest = r.data.split_off(MAX_RESP);
            let left = rest.len().min(0xff) as u16;
            self.session.pending = rest;
            r.sw = 0x6100 | left;
        }
        r
    }

    fn get_response(&mut self) -> Resp {
        if self.session.pending.is_empty() {
            return sw(SW_CONDITIONS);
        }
        let pending = std::mem::take(&mut self.session.pending);
        self.queue(ok(pending))
    }

    fn dispatch(&mut self, ins: u8, p1: u8, p2: u8, data: &[u8], fresh: bool) -> Resp {
        if ins == 0xa4 {
            return self.select(p1, data);
        }
        match self.session.applet {
            Applet::Piv => {}
            Applet::Mgmt => return self.mgmt(ins),
            Applet::Otp => return self.otp(ins, p1),
        }
        match ins {
            0xfd => ok(VERSION.to_vec()),
            0xf8 => ok(self.st.serial.to_be_bytes().to_vec()),
            0x20 => self.verify(p1, p2, data),
            0x24 => self.change_reference(p2, data),
            0x2c => self.reset_retry(p2, data),
            0x87 => self.general_authenticate(p1, p2, data, fresh),
            0x47 => self.generate(p1, p2, data),
            0xfe => self.import(p1, p2, data),
            0xf6 => self.move_key(p1, p2),
            0xf7 => self.metadata(p2),
            0xf9 => self.attest(p1),
            0xcb => self.get_data(p1, p2, data),
            0xdb => self.put_data(p1, p2, data),
            0xff => self.set_mgm_key(p1, p2, data),
            0xfa => self.set_pin_retries(p1, p2),
            0xfb => self.reset_piv(),
            _ => sw(SW_INS),
        }
    }

    fn select(&mut self, p1: u8, aid: &[u8]) -> Resp {
        if p1 != 0x04 {
            return sw(SW_WRONG_P1P2);
        }
        if aid.len() >= AID_PIV.len() && aid.starts_with(AID_PIV) {
            // Selecting PIV resets the security status (PIN and management key).
            self.session = Session::new();
            // Application property template, like a YubiKey.
            let mut apt = tlv(0x4f, &[0x00, 0x00, 0x10, 0x00, 0x01, 0x00]);
            apt.extend_from_slice(&tlv(0x79, &tlv(0x4f, AID_PIV)));
            return ok(tlv(0x61, &apt));
        }
        if aid == AID_MGMT {
            self.session.applet = Applet::Mgmt;
            self.session.pin_verified = false;
            self.session.mgm_authenticated = false;
            return ok(b"Virtual mgmt - FW version 5.7.1".to_vec());
        }
        if aid == AID_OTP {
            self.session.applet = Applet::Otp;
            self.session.pin_verified = false;
            self.session.mgm_authenticated = false;
            // OTP status: version, sequence, touch level
            return ok(vec![5, 7, 1, 1, 0x05, 0x00]);
        }
        sw(SW_NOT_FOUND)
    }

    fn mgmt(&mut self, ins: u8) -> Resp {
        match ins {
            0x1d => {
                // Device info: TLVs prefixed by their total length.
                let mut body = Vec::new();
                body.extend(tlv(0x01, &[0x02, 0x3b])); // USB supported
                body.extend(tlv(0x02, &self.st.serial.to_be_bytes()));
                body.extend(tlv(0x03, &[0x02, 0x3b])); // USB enabled
                body.extend(tlv(0x04, &[0x01])); // form factor: USB-A keychain
                body.extend(tlv(0x05, &VERSION));
                let mut out = vec![body.len() as u8];
                out.extend(body);
                ok(out)
            }
            _ => sw(SW_INS),
        }
    }

    fn otp(&mut self, ins: u8, p1: u8) -> Resp {
        match (ins, p1) {
            (0x01, 0x10) => ok(self.st.serial.to_be_bytes().to_vec()),
            _ => sw(SW_INS),
        }
    }

    // ---------------------------------------------------------------- PIN / PUK

    fn verify(&mut self, p1: u8, p2: u8, data: &[u8]) -> Resp {
        if p2 != 0x80 {
            return sw(SW_REF_NOT_FOUND);
        }
        if p1 == 0xff {
            // Reset the verification status.
            if !data.is_empty() {
                return sw(SW_WRONG_DATA);
            }
            self.session.pin_verified = false;
            return sw(SW_OK);
        }
        if p1 != 0x00 {
            return sw(SW_WRONG_P1P2);
        }
        if data.is_empty() {
            if self.session.pin_verified {
                return sw(SW_OK);
            }
            return sw(0x63c0 | self.st.pin_left as u16);
        }
        if data.len() != 8 {
            return sw(SW_WRONG_DATA);
        }
        if self.st.pin_left == 0 {
            return sw(SW_BLOCKED);
        }
        if ct_eq(strip_pin(data), &self.st.pin) {
            self.st.pin_left = self.st.pin_max;
            self.session.pin_verified = true;
            self.session.pin_fresh = true;
            self.save();
            sw(SW_OK)
        } else {
            self.session.pin_verified = false;
            self.st.pin_left -= 1;
            self.save();
            sw(0x63c0 | self.st.pin_left as u16)
        }
    }

    /// Check PIN or PUK (`puk`) and decrement its counter on failure.
    fn check_ref(&mut self, puk: bool, given: &[u8]) -> Result<(), u16> {
        let (left, max, secret) = if puk {
            (self.st.puk_left, self.st.puk_max, self.st.puk.clone())
        } else {
            (self.st.pin_left, self.st.pin_max, self.st.pin.clone())
        };
        if left == 0 {
            return Err(SW_BLOCKED);
        }
        if ct_eq(strip_pin(given), &secret) {
            if puk {
                self.st.puk_left = max;
            } else {
                self.st.pin_left = max;
            }
            Ok(())
        } else {
            let new = left - 1;
            if puk {
                self.st.puk_left = new;
            } else {
                self.st.pin_left = new;
                self.session.pin_verified = false;
            }
            self.save();
            Err(0x63c0 | new as u16)
        }
    }

    fn change_reference(&mut self, p2: u8, data: &[u8]) -> Resp {
        if p2 != 0x80 && p2 != 0x81 {
            return sw(SW_REF_NOT_FOUND);
        }
        if data.len() != 16 {
            return sw(SW_WRONG_DATA);
        }
        let new = strip_pin(&data[8..]).to_vec();
        if new.len() < 6 {
            return sw(SW_WRONG_DATA);
        }
        let puk = p2 == 0x81;
        if let Err(e) = self.check_ref(puk, &data[..8]) {
            return sw(e);
        }
        if puk {
            self.st.puk = new;
        } else {
            self.st.pin = new;
            self.session.pin_verified = true;
        }
        self.save();
        sw(SW_OK)
    }

    fn reset_retry(&mut self, p2: u8, data: &[u8]) -> Resp {
        if p2 != 0x80 {
            return sw(SW_REF_NOT_FOUND);
        }
        if data.len() != 16 {
            return sw(SW_WRONG_DATA);
        }
        let new = strip_pin(&data[8..]).to_vec();
        if new.len() < 6 {
            return sw(SW_WRONG_DATA);
        }
        if let Err(e) = self.check_ref(true, &data[..8]) {
            return sw(e);
        }
        self.st.pin = new;
        self.st.pin_left = self.st.pin_max;
        self.save();
        sw(SW_OK)
    }

    fn set_pin_retries(&mut self, p1: u8, p2: u8) -> Resp {
        if !self.session.mgm_authenticated || !self.session.pin_verified {
            return sw(SW_SECURITY);
        }
        if p1 == 0 || p2 == 0 || p1 > 15 || p2 > 15 {
            return sw(SW_WRONG_P1P2);
        }
        self.st.pin_max = p1;
        self.st.pin_left = p1;
        self.st.puk_max = p2;
        self.st.puk_left = p2;
        self.st.pin = DEFAULT_PIN.to_vec();
        self.st.puk = DEFAULT_PUK.to_vec();
        self.save();
        sw(SW_OK)
    }

    fn reset_piv(&mut self) -> Resp {
        if self.st.pin_left != 0 || self.st.puk_left != 0 {
            return sw(SW_CONDITIONS);
        }
        let serial = self.st.serial;
        let seed = self.st.attest_seed;
        self.st = Persistent::new(serial);
        self.st.attest_seed = seed;
        self.session = Session::new();
        self.save();
        sw(SW_OK)
    }

    // ---------------------------------------------------------- management key

    fn set_mgm_key(&mut self, p1: u8, p2: u8, data: &[u8]) -> Resp {
        if p1 != 0xff || (p2 != 0xff && p2 != 0xfe) {
            return sw(SW_WRONG_P1P2);
        }
        if !self.session.mgm_authenticated {
            return sw(SW_SECURITY);
        }
        if data.len() < 3 || data[1] != 0x9b || data[2] as usize != data.len() - 3 {
            return sw(SW_WRONG_DATA);
        }
        let alg = data[0];
        if mgm_key_len(alg) != Some(data.len() - 3) {
            return sw(SW_WRONG_DATA);
        }
        self.st.mgm_alg = alg;
        self.st.mgm_key = data[3..].to_vec();
        self.save();
        sw(SW_OK)
    }

    fn mgm_auth(&mut self, p1: u8, data: &[u8]) -> Resp {
        if p1 != self.st.mgm_alg {
            return sw(SW_WRONG_P1P2);
        }
        let Some(items) = outer_7c(data) else {
            return sw(SW_WRONG_DATA);
        };
        let get = |t: u8| items.iter().find(|(tag, _)| *tag == t).map(|(_, v)| *v);
        let bl = mgm_block_len(self.st.mgm_alg);
        let (alg, key) = (self.st.mgm_alg, self.st.mgm_key.clone());
        match (get(0x80), get(0x81), get(0x82)) {
            // Step 1 of mutual auth: card sends an encrypted witness.
            (Some(w), None, None) if w.is_empty() => {
                let plain = random(bl);
                let mut enc = plain.clone();
                mgm_block(alg, &key, &mut enc, true).expect("mgm key");
                self.session.mgm_challenge = Some(MgmChallenge::Witness(plain));
                self.session.mgm_authenticated = false;
                ok(tlv(0x7c, &tlv(0x80, &enc)))
            }
            // Step 2 of mutual auth: decrypted witness + host challenge.
            (Some(w), Some(chal), None) => {
                let pending = self.session.mgm_challenge.take();
                match pending {
                    Some(MgmChallenge::Witness(plain)) if ct_eq(&plain, w) && chal.len() == bl => {
                        let mut enc = chal.to_vec();
                        mgm_block(alg, &key, &mut enc, true).expect("mgm key");
                        self.session.mgm_authenticated = true;
                        ok(tlv(0x7c, &tlv(0x82, &enc)))
                    }
                    _ => sw(SW_SECURITY),
                }
            }
            // Single (external) auth, step 1: card challenge in clear.
            (None, Some(c), None) if c.is_empty() => {
                let plain = random(bl);
                self.session.mgm_challenge = Some(MgmChallenge::Challenge(plain.clone()));
                self.session.mgm_authenticated = false;
                ok(tlv(0x7c, &tlv(0x81, &plain)))
            }
            // Single auth, step 2: host returns the encrypted challenge.
            (None, None, Some(resp)) => match self.session.mgm_challenge.take() {
                Some(MgmChallenge::Challenge(plain)) => {
                    let mut enc = plain.clone();
                    mgm_block(alg, &key, &mut enc, true).expect("mgm key");
                    if ct_eq(&enc, resp) {
                        self.session.mgm_authenticated = true;
                        sw(SW_OK)
                    } else {
                        sw(SW_SECURITY)
                    }
                }
                _ => sw(SW_SECURITY),
            },
            _ => sw(SW_WRONG_DATA),
        }
    }

    // ------------------------------------------------------------ private keys

    fn general_authenticate(&mut self, p1: u8, p2: u8, data: &[u8], fresh: bool) -> Resp {
        if p2 == 0x9b {
            return self.mgm_auth(p1, data);
        }
        if !valid_key_slot(p2) {
            return sw(SW_REF_NOT_FOUND);
        }
        let Some(key) = self.st.slots.get(&p2).cloned() else {
            return sw(SW_REF_NOT_FOUND);
        };
        if key.alg != p1 {
            return sw(SW_WRONG_P1P2);
        }
        let Some(items) = outer_7c(data) else {
            return sw(SW_WRONG_DATA);
        };
        let get = |t: u8| items.iter().find(|(tag, _)| *tag == t).map(|(_, v)| *v);
        if get(0x82).is_none_or(|v| !v.is_empty()) {
            return sw(SW_WRONG_DATA);
        }
        let allowed = match key.pin_policy {
            1 => true,
            3 => self.session.pin_verified && fresh,
            _ => self.session.pin_verified,
        };
        if !allowed {
            return sw(SW_SECURITY);
        }
        // Touch policy: the virtual card is always "touched".
        match (key.alg, get(0x81), get(0x85)) {
            (ALG_ED25519, Some(msg), None) => {
                let sig = SigningKey::from_bytes(&key.secret).sign(msg).to_bytes();
                ok(tlv(0x7c, &tlv(0x82, &sig)))
            }
            (ALG_X25519, None, Some(peer)) => {
                let Ok(peer): Result<[u8; 32], _> = peer.try_into() else {
                    return sw(SW_WRONG_DATA);
                };
                let secret = x25519_dalek::StaticSecret::from(key.secret);
                let shared = secret.diffie_hellman(&x25519_dalek::PublicKey::from(peer));
                if !shared.was_contributory() {
                    return sw(SW_WRONG_DATA);
                }
                ok(tlv(0x7c, &tlv(0x82, shared.as_bytes())))
            }
            _ => sw(SW_WRONG_DATA),
        }
    }

    fn parse_policies(items: &[(u8, &[u8])], slot: u8) -> Result<(u8, u8), u16> {
        let mut pin = 0u8;
        let mut touch = 0u8;
        for (t, v) in items {
            match *t {
                0xaa if v.len() == 1 && v[0] <= 3 => pin = v[0],
                0xab if v.len() == 1 && v[0] <= 3 => touch = v[0],
                0xaa | 0xab => return Err(SW_WRONG_DATA),
                _ => {}
            }
        }
        if pin == 0 {
            pin = if slot == 0x9e { 1 } else { 2 };
        }
        if touch == 0 {
            touch = 1;
        }
        Ok((pin, touch))
    }

    fn generate(&mut self, p1: u8, p2: u8, data: &[u8]) -> Resp {
        if p1 != 0 {
            return sw(SW_WRONG_P1P2);
        }
        if !self.session.mgm_authenticated {
            return sw(SW_SECURITY);
        }
        if !valid_key_slot(p2) {
            return sw(SW_REF_NOT_FOUND);
        }
        let Some(outer) = parse_tlvs(data) else {
            return sw(SW_WRONG_DATA);
        };
        let Some((0xac, body)) = outer.first().copied() else {
            return sw(SW_WRONG_DATA);
        };
        let Some(items) = parse_tlvs(body) else {
            return sw(SW_WRONG_DATA);
        };
        let alg = match items.iter().find(|(t, _)| *t == 0x80) {
            Some((_, [a])) if *a == ALG_ED25519 || *a == ALG_X25519 => *a,
            _ => return sw(SW_WRONG_DATA),
        };
        let (pin_policy, touch_policy) = match Self::parse_policies(&items, p2) {
            Ok(p) => p,
            Err(e) => return sw(e),
        };
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).expect("rng");
        let key = KeySlot {
            alg,
            secret,
            pin_policy,
            touch_policy,
            origin: 1,
        };
        let public = key.public();
        self.st.slots.insert(p2, key);
        self.save();
        ok(tlv_tag(&[0x7f, 0x49], &tlv(0x86, &public)))
    }

    fn import(&mut self, p1: u8, p2: u8, data: &[u8]) -> Resp {
        if !self.session.mgm_authenticated {
            return sw(SW_SECURITY);
        }
        if !valid_key_slot(p2) {
            return sw(SW_REF_NOT_FOUND);
        }
        let tag = match p1 {
            ALG_ED25519 => 0x07,
            ALG_X25519 => 0x08,
            _ => return sw(SW_WRONG_P1P2),
        };
        let Some(items) = parse_tlvs(data) else {
            return sw(SW_WRONG_DATA);
        };
        let secret: [u8; 32] = match items.iter().find(|(t, _)| *t == tag) {
            Some((_, v)) if v.len() == 32 => (*v).try_into().unwrap(),
            _ => return sw(SW_WRONG_DATA),
        };
        let (pin_policy, touch_policy) = match Self::parse_policies(&items, p2) {
            Ok(p) => p,
            Err(e) => return sw(e),
        };
        self.st.slots.insert(
            p2,
            KeySlot {
                alg: p1,
                secret,
                pin_policy,
                touch_policy,
                origin: 2,
            },
        );
        self.save();
        sw(SW_OK)
    }

    /// MOVE KEY (firmware 5.7): P1 the destination slot, or FF to delete the key in P2.
    fn move_key(&mut self, p1: u8, p2: u8) -> Resp {
        if !self.session.mgm_authenticated {
            return sw(SW_SECURITY);
        }
        if !valid_key_slot(p2) || !(p1 == 0xff || valid_key_slot(p1)) || p1 == p2 {
            return sw(SW_WRONG_P1P2);
        }
        let Some(key) = self.st.slots.remove(&p2) else {
            return sw(SW_REF_NOT_FOUND);
        };
        if p1 != 0xff {
            if self.st.slots.contains_key(&p1) {
                self.st.slots.insert(p2, key);
                return sw(SW_CONDITIONS);
            }
            self.st.slots.insert(p1, key);
        }
        self.save();
        sw(SW_OK)
    }

    fn metadata(&mut self, p2: u8) -> Resp {
        let mut out = Vec::new();
        match p2 {
            0x80 | 0x81 => {
                let (def, max, left) = if p2 == 0x80 {
                    (self.st.pin == DEFAULT_PIN, self.st.pin_max, self.st.pin_left)
                } else {
                    (self.st.puk == DEFAULT_PUK, self.st.puk_max, self.st.puk_left)
                };
                out.extend(tlv(0x01, &[0xff]));
                out.extend(tlv(0x05, &[def as u8]));
                out.extend(tlv(0x06, &[max, left]));
            }
            0x9b => {
                out.extend(tlv(0x01, &[self.st.mgm_alg]));
                out.extend(tlv(0x02, &[0x00, 0x01]));
                let def = self.st.mgm_key == DEFAULT_MGM;
                out.extend(tlv(0x05, &[def as u8]));
            }
            s if valid_key_slot(s) => {
                let Some(k) = self.st.slots.get(&s) else {
                    return sw(SW_REF_NOT_FOUND);
                };
                out.extend(tlv(0x01, &[k.alg]));
                out.extend(tlv(0x02, &[k.pin_policy, k.touch_policy]));
                out.extend(tlv(0x03, &[k.origin]));
                out.extend(tlv(0x04, &tlv(0x86, &k.public())));
            }
            _ => return sw(SW_REF_NOT_FOUND),
        }
        ok(out)
    }

    fn attest(&mut self, p1: u8) -> Resp {
        if !valid_key_slot(p1) {
            return sw(SW_REF_NOT_FOUND);
        }
        let Some(k) = self.st.slots.get(&p1) else {
            return sw(SW_REF_NOT_FOUND);
        };
        if k.origin != 1 {
            // Real YubiKeys refuse to attest imported keys.
            return sw(SW_WRONG_DATA);
        }
        let cert = der::attestation_certificate(
            &self.ca_key,
            p1,
            &k.public(),
            k.alg == ALG_X25519,
            VERSION,
            self.st.serial,
            k.pin_policy,
            k.touch_policy,
        );
        ok(cert)
    }

    // ------------------------------------------------------------ data objects

    fn object_id(data: &[u8]) -> Option<(u32, &[u8])> {
        if data.first() != Some(&0x5c) {
            return None;
        }
        let (len, hdr) = dec_len(&data[1..])?;
        let end = 1 + hdr + len;
        if len == 0 || len > 3 || end > data.len() {
            return None;
        }
        let id = data[1 + hdr..end]
            .iter()
            .fold(0u32, |acc, b| (acc << 8) | *b as u32);
        Some((id, &data[end..]))
    }

    fn get_data(&mut self, p1: u8, p2: u8, data: &[u8]) -> Resp {
        if (p1, p2) != (0x3f, 0xff) {
            return sw(SW_WRONG_P1P2);
        }
        let Some((id, _)) = Self::object_id(data) else {
            return sw(SW_WRONG_DATA);
        };
        if let Some(v) = self.st.objects.get(&id) {
            return ok(tlv(0x53, v));
        }
        if id == 0x5f_ff01 {
            // Attestation (F9) certificate object: our self-signed CA.
            let mut v = tlv(0x70, &self.ca_cert);
            v.extend(tlv(0x71, &[0x00]));
            v.extend(tlv(0xfe, &[]));
            return ok(tlv(0x53, &v));
        }
        sw(SW_NOT_FOUND)
    }

    fn put_data(&mut self, p1: u8, p2: u8, data: &[u8]) -> Resp {
        if (p1, p2) != (0x3f, 0xff) {
            return sw(SW_WRONG_P1P2);
        }
        if !self.session.mgm_authenticated {
            return sw(SW_SECURITY);
        }
        let Some((id, rest)) = Self::object_id(data) else {
            return sw(SW_WRONG_DATA);
        };
        match parse_tlvs(rest).as_deref() {
            Some([(0x53, v)]) => {
                if v.is_empty() {
                    self.st.objects.remove(&id);
                } else {
                    self.st.objects.insert(id, v.to_vec());
                }
                self.save();
                sw(SW_OK)
            }
            _ => sw(SW_WRONG_DATA),
        }
    }
}

/// Parse `7C len { TLVs }`.
fn outer_7c(data: &[u8]) -> Option<Vec<(u8, &[u8])>> {
    match parse_tlvs(data)?.as_slice() {
        [(0x7c, inner)] => parse_tlvs(inner),
        _ => None,
    }
}

/// Body after the 4-byte header: short or extended Lc, optional Le.
fn parse_body(body: &[u8]) -> Option<&[u8]> {
    match body.len() {
        0 | 1 => Some(&[]), // no data, or Le only
        _ if body[0] != 0 => {
            let lc = body[0] as usize;
            match body.len() - 1 {
                n if n == lc || n == lc + 1 => Some(&body[1..1 + lc]),
                _ => None,
            }
        }
        3 => Some(&[]), // extended Le only
        n if n >= 3 => {
            let lc = ((body[1] as usize) << 8) | body[2] as usize;
            match n - 3 {
                m if m == lc || m == lc + 2 => Some(&body[3..3 + lc]),
                _ => None,
            }
        }
        _ => None,
    }
}
