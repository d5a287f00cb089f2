//! Short authentication strings (`m.sas.v1`): the pure parts of interactive verification.
//!
//! The key agreement and the HKDF/HMAC are vodozemac's (`vodozemac::sas`); this module
//! holds what the spec fixes around them: the commitment of the accepting side, the info
//! strings that bind both users, devices, ephemeral keys and the transaction, the emoji
//! table, and the MACs over the keys each side vouches for (`hkdf-hmac-sha256.v2`).

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use serde_json::Value;
use sha2::{Digest, Sha256};
use vodozemac::sas::{EstablishedSas, Mac};

use super::signed_json::{SignedJsonError, canonical_json};

/// The one method, key agreement, hash and MAC mxhsm speaks.
pub const METHOD: &str = "m.sas.v1";
pub const KEY_AGREEMENT: &str = "curve25519-hkdf-sha256";
pub const HASH: &str = "sha256";
pub const MAC_METHOD: &str = "hkdf-hmac-sha256.v2";
/// Both short-authentication-string forms, in the order they are offered.
pub const SAS_KINDS: [&str; 2] = ["decimal", "emoji"];

/// The spec's 64 emoji with their English names, by index.
pub const EMOJI: [(&str, &str); 64] = [
    ("🐶", "Dog"),
    ("🐱", "Cat"),
    ("🦁", "Lion"),
    ("🐎", "Horse"),
    ("🦄", "Unicorn"),
    ("🐷", "Pig"),
    ("🐘", "Elephant"),
    ("🐰", "Rabbit"),
    ("🐼", "Panda"),
    ("🐓", "Rooster"),
    ("🐧", "Penguin"),
    ("🐢", "Turtle"),
    ("🐟", "Fish"),
    ("🐙", "Octopus"),
    ("🦋", "Butterfly"),
    ("🌷", "Flower"),
    ("🌳", "Tree"),
    ("🌵", "Cactus"),
    ("🍄", "Mushroom"),
    ("🌏", "Globe"),
    ("🌙", "Moon"),
    ("☁️", "Cloud"),
    ("🔥", "Fire"),
    ("🍌", "Banana"),
    ("🍎", "Apple"),
    ("🍓", "Strawberry"),
    ("🌽", "Corn"),
    ("🍕", "Pizza"),
    ("🎂", "Cake"),
    ("❤️", "Heart"),
    ("😀", "Smiley"),
    ("🤖", "Robot"),
    ("🎩", "Hat"),
    ("👓", "Glasses"),
    ("🔧", "Spanner"),
    ("🎅", "Santa"),
    ("👍", "Thumbs Up"),
    ("☂️", "Umbrella"),
    ("⌛", "Hourglass"),
    ("⏰", "Clock"),
    ("🎁", "Gift"),
    ("💡", "Light Bulb"),
    ("📕", "Book"),
    ("✏️", "Pencil"),
    ("📎", "Paperclip"),
    ("✂️", "Scissors"),
    ("🔒", "Lock"),
    ("🔑", "Key"),
    ("🔨", "Hammer"),
    ("☎️", "Telephone"),
    ("🏁", "Flag"),
    ("🚂", "Train"),
    ("🚲", "Bicycle"),
    ("✈️", "Aeroplane"),
    ("🚀", "Rocket"),
    ("🏆", "Trophy"),
    ("⚽", "Ball"),
    ("🎸", "Guitar"),
    ("🎺", "Trumpet"),
    ("🔔", "Bell"),
    ("⚓", "Anchor"),
    ("🎧", "Headphones"),
    ("📁", "Folder"),
    ("📌", "Pin"),
];

/// One side of a verification: a user's device and its ephemeral SAS key (base64).
#[derive(Debug, Clone, Copy)]
pub struct Party<'a> {
    pub user_id: &'a str,
    pub device_id: &'a str,
    pub sas_key: &'a str,
}

/// What both users compare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShortAuthString {
    /// Seven of [`EMOJI`], by index.
    pub emoji: [u8; 7],
    /// Three numbers from 1000 to 9191.
    pub decimals: (u16, u16, u16),
}

impl ShortAuthString {
    /// The emoji with their names.
    pub fn emoji(&self) -> [(&'static str, &'static str); 7] {
        self.emoji.map(|i| EMOJI[usize::from(i) % 64])
    }
}

/// The short authentication string: HKDF of the shared secret with an info string naming
/// the side that sent `m.key.verification.start` first.
pub fn short_auth_string(
    sas: &EstablishedSas,
    starter: Party<'_>,
    other: Party<'_>,
    transaction_id: &str,
) -> ShortAuthString {
    let info = format!(
        "MATRIX_KEY_VERIFICATION_SAS|{}|{}|{}|{}|{}|{}|{transaction_id}",
        starter.user_id,
        starter.device_id,
        starter.sas_key,
        other.user_id,
        other.device_id,
        other.sas_key
    );
    let bytes = sas.bytes(&info);
    ShortAuthString {
        emoji: bytes.emoji_indices(),
        decimals: bytes.decimals(),
    }
}

/// The accepting side's commitment: SHA-256 of its SAS public key (base64) followed by the
/// canonical JSON of the `m.key.verification.start` content, in unpadded base64.
pub fn commitment(sas_key: &str, start_content: &Value) -> Result<String, SignedJsonError> {
    let mut h = Sha256::new();
    h.update(sas_key.as_bytes());
    h.update(canonical_json(start_content)?.as_bytes());
    Ok(STANDARD_NO_PAD.encode(h.finalize()))
}

fn mac_info(sender: (&str, &str), receiver: (&str, &str), transaction_id: &str) -> String {
    format!(
        "MATRIX_KEY_VERIFICATION_MAC{}{}{}{}{transaction_id}",
        sender.0, sender.1, receiver.0, receiver.1
    )
}

/// The `mac` and `keys` fields of an `m.key.verification.mac` that `sender` sends to
/// `receiver`, vouching for `keys` (key ID → unpadded base64 public key).
pub fn mac_content(
    sas: &EstablishedSas,
    sender: (&str, &str),
    receiver: (&str, &str),
    transaction_id: &str,
    keys: &BTreeMap<String, String>,
) -> (BTreeMap<String, String>, String) {
    let info = mac_info(sender, receiver, transaction_id);
    let macs = keys
        .iter()
        .map(|(id, key)| {
            (
                id.clone(),
                sas.calculate_mac(key, &format!("{info}{id}")).to_base64(),
            )
        })
        .collect();
    let ids: Vec<&str> = keys.keys().map(String::as_str).collect();
    let all = sas
        .calculate_mac(&ids.join(","), &format!("{info}KEY_IDS"))
        .to_base64();
    (macs, all)
}

/// Why a received MAC is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MacError {
    #[error("the MAC over the key IDs does not match")]
    KeyIds,
    #[error("the MAC of {0} does not match")]
    Key(String),
    #[error("the MAC of {0} is not base64 of a MAC")]
    Malformed(String),
}

/// Checks an `m.key.verification.mac` that `sender` sent to `receiver`: the MAC over the
/// sorted key IDs, then each key the caller knows (`known`: key ID → base64 public key, as
/// fetched). Returns the IDs of the known keys whose MAC matched; keys the MAC names that
/// are not known are ignored (never trusted).
pub fn verify_mac(
    sas: &EstablishedSas,
    sender: (&str, &str),
    receiver: (&str, &str),
    transaction_id: &str,
    macs: &BTreeMap<String, String>,
    keys_mac: &str,
    known: &BTreeMap<String, String>,
) -> Result<Vec<String>, MacError> {
    let info = mac_info(sender, receiver, transaction_id);
    let decode = |what: &str, b64: &str| {
        Mac::from_base64(b64).map_err(|_| MacError::Malformed(what.to_string()))
    };
    let ids: Vec<&str> = macs.keys().map(String::as_str).collect();
    sas.verify_mac(
        &ids.join(","),
        &format!("{info}KEY_IDS"),
        &decode("the key IDs", keys_mac)?,
    )
    .map_err(|_| MacError::KeyIds)?;
    let mut verified = Vec::new();
    for (id, mac) in macs {
        let Some(key) = known.get(id) else { continue };
        sas.verify_mac(key, &format!("{info}{id}"), &decode(id, mac)?)
            .map_err(|_| MacError::Key(id.clone()))?;
        verified.push(id.clone());
    }
    Ok(verified)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use vodozemac::sas::Sas;

    fn pair() -> (EstablishedSas, EstablishedSas, String, String) {
        let (a, b) = (Sas::new(), Sas::new());
        let (ka, kb) = (a.public_key().to_base64(), b.public_key().to_base64());
        let (pa, pb) = (a.public_key(), b.public_key());
        (
            a.diffie_hellman(pb).unwrap(),
            b.diffie_hellman(pa).unwrap(),
            ka,
            kb,
        )
    }

    #[test]
    fn both_sides_see_the_same_string_only_with_the_same_info() {
        let (a, b, ka, kb) = pair();
        let alice = Party {
            user_id: "@a:h",
            device_id: "A",
            sas_key: &ka,
        };
        let bob = Party {
            user_id: "@a:h",
            device_id: "B",
            sas_key: &kb,
        };
        let sa = short_auth_string(&a, alice, bob, "t1");
        assert_eq!(sa, short_auth_string(&b, alice, bob, "t1"));
        assert_ne!(sa, short_auth_string(&b, bob, alice, "t1"));
        assert_ne!(sa, short_auth_string(&b, alice, bob, "t2"));
        let (x, y, z) = sa.decimals;
        assert!([x, y, z].iter().all(|n| (1000..=9191).contains(n)));
        assert!(sa.emoji.iter().all(|i| *i < 64));
    }

    #[test]
    fn macs_verify_for_the_keys_known_and_fail_for_others() {
        let (a, b, _, _) = pair();
        let keys = BTreeMap::from([
            ("ed25519:A".to_string(), "devicekey".to_string()),
            ("ed25519:MASTER".to_string(), "MASTER".to_string()),
        ]);
        let (macs, all) = mac_content(&a, ("@a:h", "A"), ("@a:h", "B"), "t", &keys);
        let known = BTreeMap::from([("ed25519:A".to_string(), "devicekey".to_string())]);
        let ok = verify_mac(&b, ("@a:h", "A"), ("@a:h", "B"), "t", &macs, &all, &known);
        assert_eq!(ok, Ok(vec!["ed25519:A".to_string()]));
        // The receiver knows another key under that ID (a swapped device key).
        let swapped = BTreeMap::from([("ed25519:A".to_string(), "otherkey".to_string())]);
        assert_eq!(
            verify_mac(&b, ("@a:h", "A"), ("@a:h", "B"), "t", &macs, &all, &swapped),
            Err(MacError::Key("ed25519:A".into()))
        );
        // A key ID dropped from the list breaks the MAC over the IDs.
        let mut fewer = macs.clone();
        fewer.remove("ed25519:MASTER");
        assert_eq!(
            verify_mac(&b, ("@a:h", "A"), ("@a:h", "B"), "t", &fewer, &all, &known),
            Err(MacError::KeyIds)
        );
        // The sender and receiver are bound: the same MAC does not verify the other way.
        assert_eq!(
            verify_mac(&b, ("@a:h", "B"), ("@a:h", "A"), "t", &macs, &all, &known),
            Err(MacError::KeyIds)
        );
        assert!(matches!(
            verify_mac(&b, ("@a:h", "A"), ("@a:h", "B"), "t", &macs, "!!", &known),
            Err(MacError::Malformed(_))
        ));
    }

    #[test]
    fn the_commitment_binds_the_key_and_the_start_content() {
        let start = json!({"method": METHOD, "transaction_id": "t", "from_device": "A"});
        let c = commitment("KEY", &start).unwrap();
        // sha256("KEY" || canonical JSON), computed here independently.
        let expected = STANDARD_NO_PAD.encode(Sha256::digest(
            br#"KEY{"from_device":"A","method":"m.sas.v1","transaction_id":"t"}"#,
        ));
        assert_eq!(c, expected);
        assert_ne!(c, commitment("KEY2", &start).unwrap());
    }
}
