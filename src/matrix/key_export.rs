//! The key-export file, `-----BEGIN MEGOLM SESSION DATA-----` (spec e2e module, "Key
//! exports"; docs/vectors.md), which Element and other clients import.
//!
//! `K ‖ K' = PBKDF2-HMAC-SHA-512(passphrase, salt, rounds, 64)`; the JSON array of sessions
//! is encrypted with AES-256-CTR under `K` and an IV whose bit 63 is cleared; the body
//! `0x01 ‖ salt(16) ‖ iv(16) ‖ rounds(u32 BE) ‖ ciphertext` is authenticated with
//! HMAC-SHA-256 under `K'` and armoured in padded base64.
//!
//! The counter is the low 64 bits of the IV (WebCrypto's `length: 64`, what Element
//! writes), incrementing and wrapping without carrying into the high half: with an IV whose
//! bit 63 is set (element-web's vector 4) a 128-bit counter would corrupt everything after
//! the first block.

use aes::Aes256;
use aes::cipher::{KeyIvInit, StreamCipher};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Sha256, Sha512};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

const HEADER: &str = "-----BEGIN MEGOLM SESSION DATA-----";
const FOOTER: &str = "-----END MEGOLM SESSION DATA-----";
/// Element's default, and the spec's "at least 100,000" with room to spare.
pub const DEFAULT_ROUNDS: u32 = 500_000;
/// Fewer rounds than this make the passphrase cheap to guess; mxhsm writes such a file only
/// when asked to explicitly (`--weak-rounds`), for tests.
pub const MIN_ROUNDS: u32 = 100_000;
/// The most rounds mxhsm runs to open a file: a damaged or hostile file could otherwise
/// ask for four billion.
pub const MAX_ROUNDS: u32 = 50_000_000;
const VERSION: u8 = 1;
/// Base64 characters per armour line (element-web wraps 96 raw bytes a line).
const LINE: usize = 128;

type Aes256Ctr64 = ctr::Ctr64BE<Aes256>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyExportError {
    #[error("not a key export file: no {0} line")]
    Armour(&'static str),
    #[error("the key export is not valid base64")]
    Base64,
    #[error("the key export is too short ({0} bytes)")]
    TooShort(usize),
    #[error("unsupported key export version {0} (only 1 exists)")]
    Version(u8),
    #[error("wrong passphrase, or the file was modified (the MAC does not match)")]
    Mac,
    #[error("the decrypted export is not UTF-8 JSON")]
    NotJson,
    #[error("zero PBKDF2 rounds")]
    Rounds,
    #[error("the file asks for {0} PBKDF2 rounds, more than the {max} mxhsm runs", max = MAX_ROUNDS)]
    TooManyRounds(u32),
    #[error("no randomness: {0}")]
    Random(String),
}

fn keys(passphrase: &str, salt: &[u8], rounds: u32) -> Zeroizing<[u8; 64]> {
    let mut out = Zeroizing::new([0u8; 64]);
    pbkdf2::pbkdf2_hmac::<Sha512>(passphrase.as_bytes(), salt, rounds, out.as_mut());
    out
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    super::hmac_sha256(key, &[data])
}

/// Decrypts an export file: the JSON text of the sessions.
pub fn decrypt(armoured: &str, passphrase: &str) -> Result<Zeroizing<String>, KeyExportError> {
    decrypt_with_limit(armoured, passphrase, MAX_ROUNDS)
}

/// [`decrypt`], refusing files that ask for more than `max_rounds` PBKDF2 rounds (the fuzz
/// targets keep it small).
pub fn decrypt_with_limit(
    armoured: &str,
    passphrase: &str,
    max_rounds: u32,
) -> Result<Zeroizing<String>, KeyExportError> {
    let trimmed = armoured.trim();
    let body = trimmed
        .strip_prefix(HEADER)
        .ok_or(KeyExportError::Armour("BEGIN"))?
        .trim_end()
        .strip_suffix(FOOTER)
        .ok_or(KeyExportError::Armour("END"))?;
    let b64: String = body.split_whitespace().collect();
    let data = STANDARD_NO_PAD
        .decode(b64.trim_end_matches('='))
        .map_err(|_| KeyExportError::Base64)?;
    if data.len() < 1 + 16 + 16 + 4 + 32 {
        return Err(KeyExportError::TooShort(data.len()));
    }
    if data[0] != VERSION {
        return Err(KeyExportError::Version(data[0]));
    }
    let salt = &data[1..17];
    let iv: [u8; 16] = data[17..33].try_into().unwrap_or([0; 16]);
    let rounds = u32::from_be_bytes(data[33..37].try_into().unwrap_or([0; 4]));
    if rounds == 0 {
        return Err(KeyExportError::Rounds);
    }
    if rounds > max_rounds {
        return Err(KeyExportError::TooManyRounds(rounds));
    }
    let (signed, mac) = data.split_at(data.len() - 32);
    let k = keys(passphrase, salt, rounds);
    if !bool::from(hmac(&k[32..], signed).ct_eq(mac)) {
        return Err(KeyExportError::Mac);
    }
    let mut plain = Zeroizing::new(signed[37..].to_vec());
    Aes256Ctr64::new_from_slices(&k[..32], &iv)
        .unwrap_or_else(|_| unreachable!("32-byte key and 16-byte IV"))
        .apply_keystream(&mut plain);
    let text =
        String::from_utf8(std::mem::take(&mut *plain)).map_err(|_| KeyExportError::NotJson)?;
    Ok(Zeroizing::new(text))
}

/// Encrypts `json` (the sessions array) into an export file with fresh salt and IV.
pub fn encrypt(json: &str, passphrase: &str, rounds: u32) -> Result<String, KeyExportError> {
    let mut out = Vec::with_capacity(json.len() * 4 / 3 + 128);
    let mut w = ExportWriter::new(&mut out, passphrase, rounds).map_err(io_error)?;
    w.write_plaintext(json.as_bytes()).map_err(io_error)?;
    w.finish().map_err(io_error)?;
    String::from_utf8(out).map_err(|_| KeyExportError::NotJson)
}

fn io_error(e: std::io::Error) -> KeyExportError {
    match e
        .into_inner()
        .and_then(|inner| inner.downcast::<KeyExportError>().ok())
    {
        Some(k) => *k,
        None => KeyExportError::Random("I/O error writing the export".into()),
    }
}

#[cfg(test)]
fn encrypt_with(
    json: &str,
    passphrase: &str,
    rounds: u32,
    salt: &[u8; 16],
    iv: &[u8; 16],
) -> Result<String, KeyExportError> {
    let mut out = Vec::new();
    let mut w =
        ExportWriter::with_salt_and_iv(&mut out, passphrase, rounds, salt, iv).map_err(io_error)?;
    w.write_plaintext(json.as_bytes()).map_err(io_error)?;
    w.finish().map_err(io_error)?;
    String::from_utf8(out).map_err(|_| KeyExportError::NotJson)
}

/// Raw bytes per armour line (128 base64 characters).
const LINE_BYTES: usize = LINE / 4 * 3;

/// Writes an export file as the plaintext comes, holding no more than a line of it: for
/// restores of hundreds of thousands of sessions.
pub struct ExportWriter<W: std::io::Write> {
    out: W,
    cipher: Aes256Ctr64,
    mac: Hmac<Sha256>,
    /// Raw bytes not yet base64-encoded (less than one line's worth).
    pending: Vec<u8>,
}

impl<W: std::io::Write> ExportWriter<W> {
    /// Starts a file with fresh salt and IV (bit 63 cleared).
    pub fn new(out: W, passphrase: &str, rounds: u32) -> std::io::Result<Self> {
        let mut salt = [0u8; 16];
        let mut iv = [0u8; 16];
        getrandom::fill(&mut salt)
            .and_then(|_| getrandom::fill(&mut iv))
            .map_err(|e| std::io::Error::other(KeyExportError::Random(e.to_string())))?;
        iv[8] &= 0x7f;
        Self::with_salt_and_iv(out, passphrase, rounds, &salt, &iv)
    }

    fn with_salt_and_iv(
        mut out: W,
        passphrase: &str,
        rounds: u32,
        salt: &[u8; 16],
        iv: &[u8; 16],
    ) -> std::io::Result<Self> {
        if rounds == 0 {
            return Err(std::io::Error::other(KeyExportError::Rounds));
        }
        let k = keys(passphrase, salt, rounds);
        let cipher = Aes256Ctr64::new_from_slices(&k[..32], iv)
            .unwrap_or_else(|_| unreachable!("32-byte key and 16-byte IV"));
        let mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&k[32..])
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        writeln!(out, "{HEADER}")?;
        let mut w = ExportWriter {
            out,
            cipher,
            mac,
            pending: Vec::with_capacity(2 * LINE_BYTES),
        };
        let mut head = vec![VERSION];
        head.extend_from_slice(salt);
        head.extend_from_slice(iv);
        head.extend_from_slice(&rounds.to_be_bytes());
        w.emit(&head)?;
        Ok(w)
    }

    /// Authenticates and armours encrypted (or header) bytes.
    fn emit(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.mac.update(bytes);
        self.pending.extend_from_slice(bytes);
        while self.pending.len() >= LINE_BYTES {
            let line = STANDARD.encode(&self.pending[..LINE_BYTES]);
            writeln!(self.out, "{line}")?;
            self.pending.drain(..LINE_BYTES);
        }
        Ok(())
    }

    /// Encrypts and writes more of the JSON text.
    pub fn write_plaintext(&mut self, plaintext: &[u8]) -> std::io::Result<()> {
        for chunk in plaintext.chunks(4096) {
            let mut buf = Zeroizing::new(chunk.to_vec());
            self.cipher.apply_keystream(&mut buf);
            self.emit(&buf)?;
        }
        Ok(())
    }

    /// Appends the MAC and the footer; returns the writer.
    pub fn finish(mut self) -> std::io::Result<W> {
        let mac: [u8; 32] = self.mac.clone().finalize().into_bytes().into();
        self.pending.extend_from_slice(&mac);
        for chunk in self.pending.chunks(LINE_BYTES) {
            writeln!(self.out, "{}", STANDARD.encode(chunk))?;
        }
        writeln!(self.out, "{FOOTER}")?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// element-web's four vectors, including vector 4 whose IV is all 0xff.
    #[test]
    fn element_web_vectors() {
        let cases = [
            (
                "plain",
                "password".to_string(),
                "-----BEGIN MEGOLM SESSION DATA-----\nAXNhbHRzYWx0c2FsdHNhbHSIiIiIiIiIiIiIiIiIiIiIAAAACmIRUW2OjZ3L2l6j9h0lHlV3M2dx\ncissyYBxjsfsAndErh065A8=\n-----END MEGOLM SESSION DATA-----",
            ),
            (
                "Hello, World",
                "betterpassword".to_string(),
                "-----BEGIN MEGOLM SESSION DATA-----\nAW1vcmVzYWx0bW9yZXNhbHT//////////wAAAAAAAAAAAAAD6KyBpe1Niv5M5NPm4ZATsJo5nghk\nKYu63a0YQ5DRhUWEKk7CcMkrKnAUiZny\n-----END MEGOLM SESSION DATA-----",
            ),
            (
                "alphanumericallyalphanumericallyalphanumericallyalphanumerically",
                "SWORDFISH".to_string(),
                "-----BEGIN MEGOLM SESSION DATA-----\nAXllc3NhbHR5Z29vZG5lc3P//////////wAAAAAAAAAAAAAD6OIW+Je7gwvjd4kYrb+49gKCfExw\nMgJBMD4mrhLkmgAngwR1pHjbWXaoGybtiAYr0moQ93GrBQsCzPbvl82rZhaXO3iH5uHo/RCEpOqp\nPgg29363BGR+/Ripq/VCLKGNbw==\n-----END MEGOLM SESSION DATA-----",
            ),
            (
                "alphanumericallyalphanumericallyalphanumericallyalphanumerically",
                "password".repeat(32),
                "-----BEGIN MEGOLM SESSION DATA-----\nAf//////////////////////////////////////////AAAD6IAZJy7IQ7Y0idqSw/bmpngEEVVh\ngsH+8ptgqxw6ZVWQnohr8JsuwH9SwGtiebZuBu5smPCO+RFVWH2cQYslZijXv/BEH/txvhUrrtCd\nbWnSXS9oymiqwUIGs08sXI33ZA==\n-----END MEGOLM SESSION DATA-----",
            ),
        ];
        for (plain, pass, file) in &cases {
            assert_eq!(decrypt(file, pass).unwrap().as_str(), *plain);
            assert_eq!(decrypt(file, "wrong"), Err(KeyExportError::Mac));
        }
    }

    /// matrix-rust-sdk's test export (unpadded, 71-character lines), passphrase "1234".
    #[test]
    fn rust_sdk_vector() {
        let file = "-----BEGIN MEGOLM SESSION DATA-----
Af7mGhlzQ+eGvHu93u0YXd3D/+vYMs3E7gQqOhuCtkvGAAAAASH7pEdWvFyAP1JUisAcpEo
Xke2Q7Kr9hVl/SCc6jXBNeJCZcrUbUV4D/tRQIl3E9L4fOk928YI1J+3z96qiH0uE7hpsCI
CkHKwjPU+0XTzFdIk1X8H7sZ+MD/2Sg/q3y8rtUjz7uEj4GUTnb+9SCOTVmJsRfqgUpM1CU
bDLytHf1JkohY4tWEgpsCc67xdzgodjr12qYrfg/zNm3LGpxlrffJknw4rk5QFTj4kMbqbD
ZZgDTni+HxRTDGge2J620lMOiznvXX+H09Rwruqx5aJvvaaKd86jWRpiO2oSFqHn4u5ONl9
41uzm62Sj0eIm6ZbA9NQs87jQw4LxsejhZVL+NdjIg80zVSBTWhTdo0DTnbFSNP4ReOiz0U
XosOF8A5T8Vdx2nvA0GXltfcHKVKQYh/LJAkNQ7P9UYL4ae/5TtQZkhB1KxCLTRWqADCl53
uBMGpG53EMgY6G6K2DEIOkcv7sdXQF5WpemiSWZqJRWj+cjfs9BpCTbkp/rszWFl2TniWpR
RqIbT2jORlN4rTvdtF0F4z1pqP4qWyR3sLNTkXm9CFRzWADNG0RDZKxbCoo6RPvtaCTfaHo
SwfvzBS6CjfAG+FOugpV48o7+XetaUUPZ6/tZSPhCdeV8eP9q5r0QwWeXFogzoNzWt4HYx9
MdXxzD+f0mtg5gzehrrEEARwI2bCvPpHxlt/Na9oW/GBpkjwR1LSKgg4CtpRyWngPjdEKpZ
GYW19pdjg0qdXNk/eqZsQTsNWVo6A
-----END MEGOLM SESSION DATA-----";
        let json = decrypt(file, "1234").unwrap();
        assert_eq!(
            json.as_str(),
            r#"[{"algorithm":"m.megolm.v1.aes-sha2","room_id":"!test:localhost","sender_key":"cKQkLU8izjY3tpLVPiR4PDeeCEKtaDiAGiQH+UbZm2w","session_id":"8sdNGgmLft8osylLK9ij3IotBLyQQufe/KngiW4Dpq0","session_key":"AQAAAABBKNS1bA5X+Py5c6YP+RKtjHAtNznKzonSmyciDY9/6IEAcuOpsNc/LC46lOMMnZerWc7LoT8VjY6IzBETBEe0DzYu4F2UZHmNAaGNgHyiEXtruJ2Y9EhaQm10VrgOhhN4NN6UEYVrI4PFSM88BoDiP8bElfD2qnNa4zIfP2KlxvLHTRoJi37fKLMpSyvYo9yKLQS8kELn3vyp4IluA6at","sender_claimed_keys":{"ed25519":"wJ7DzYIlwFghczuxFG7F4ugAK3IFjpSaC74MzLFC6ig"},"forwarding_curve25519_key_chain":[]}]"#
        );
    }

    #[test]
    fn writes_what_the_vectors_say() {
        // Re-encrypting element-web vector 1 with its salt and IV gives the same file.
        let file = encrypt_with("plain", "password", 10, b"saltsaltsaltsalt", &[0x88; 16]).unwrap();
        assert_eq!(
            file,
            "-----BEGIN MEGOLM SESSION DATA-----\nAXNhbHRzYWx0c2FsdHNhbHSIiIiIiIiIiIiIiIiIiIiIAAAACmIRUW2OjZ3L2l6j9h0lHlV3M2dxcissyYBxjsfsAndErh065A8=\n-----END MEGOLM SESSION DATA-----\n"
        );
        // Vector 4, IV all 0xff: the 64-bit counter wraps within the low half.
        let file = encrypt_with(
            "alphanumericallyalphanumericallyalphanumericallyalphanumerically",
            &"password".repeat(32),
            1000,
            &[0xff; 16],
            &[0xff; 16],
        )
        .unwrap();
        assert!(file.contains(
            "Af//////////////////////////////////////////AAAD6IAZJy7IQ7Y0idqSw/bmpngEEVVh"
        ));
    }

    /// Written in pieces of every size, the file decrypts to the same text.
    #[test]
    fn streaming_writer() {
        let text: String = (0..5000)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        for piece in [1usize, 7, 95, 96, 97, 4096, 5000] {
            let mut out = Vec::new();
            let mut w = ExportWriter::new(&mut out, "p", 5).unwrap();
            for c in text.as_bytes().chunks(piece) {
                w.write_plaintext(c).unwrap();
            }
            w.finish().unwrap();
            let file = String::from_utf8(out).unwrap();
            assert!(
                file.lines().all(|l| l.len() <= LINE),
                "lines of at most {LINE}"
            );
            assert_eq!(
                decrypt(&file, "p").unwrap().as_str(),
                text,
                "pieces of {piece}"
            );
        }
    }

    #[test]
    fn round_trip_and_bad_input() {
        let json = r#"[{"room_id":"!a:b","session_key":"日本"}]"#;
        let file = encrypt(json, "pässword", 1000).unwrap();
        assert_eq!(decrypt(&file, "pässword").unwrap().as_str(), json);
        assert!(file.lines().all(|l| l.len() <= LINE + 40));
        assert_eq!(decrypt("hello", "x"), Err(KeyExportError::Armour("BEGIN")));
        assert_eq!(
            decrypt(&format!("{HEADER}\nAAAA"), "x"),
            Err(KeyExportError::Armour("END"))
        );
        assert_eq!(
            decrypt(&format!("{HEADER}\n!!!\n{FOOTER}"), "x"),
            Err(KeyExportError::Base64)
        );
        assert_eq!(
            decrypt(&format!("{HEADER}\nAQID\n{FOOTER}"), "x"),
            Err(KeyExportError::TooShort(3))
        );
        let mut tampered: Vec<char> = file.chars().collect();
        let i = HEADER.len() + 60;
        tampered[i] = if tampered[i] == 'A' { 'B' } else { 'A' };
        let tampered: String = tampered.into_iter().collect();
        assert_eq!(decrypt(&tampered, "pässword"), Err(KeyExportError::Mac));
        let v2 = STANDARD.encode([2u8; 80]);
        assert_eq!(
            decrypt(&format!("{HEADER}\n{v2}\n{FOOTER}"), "x"),
            Err(KeyExportError::Version(2))
        );
    }
}
