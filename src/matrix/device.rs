//! mxhsm's own Matrix device: a vodozemac Olm account and its signed device keys
//! (spec `DeviceKeys`), so that using mxhsm leaves a real, cross-signed device on the
//! account rather than an "unverified session".

use serde_json::{Value, json};
use vodozemac::olm::Account;

use super::keys::Ed25519PublicKey;
use super::signed_json::{Ed25519Signer, SignError, SignedJsonError, sign_json};

/// The algorithms an Olm device advertises.
pub const ALGORITHMS: [&str; 2] = ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"];

/// The device's Ed25519 identity key signs like any other key.
pub struct DeviceSigner<'a>(pub &'a Account);

impl Ed25519Signer for DeviceSigner<'_> {
    fn public_key(&self) -> Ed25519PublicKey {
        self.0.ed25519_key().into()
    }
    fn sign(&self, message: &[u8]) -> Result<[u8; 64], SignError> {
        Ok(self.0.sign(message).to_bytes())
    }
}

/// The device keys object of `account`, self-signed.
pub fn device_keys(
    account: &Account,
    user_id: &str,
    device_id: &str,
) -> Result<Value, SignedJsonError> {
    let mut keys = json!({
        "user_id": user_id,
        "device_id": device_id,
        "algorithms": ALGORITHMS,
        "keys": {
            format!("curve25519:{device_id}"): account.curve25519_key().to_base64(),
            format!("ed25519:{device_id}"): account.ed25519_key().to_base64(),
        },
    });
    sign_json(
        &mut keys,
        user_id,
        &format!("ed25519:{device_id}"),
        &DeviceSigner(account),
    )?;
    Ok(keys)
}

/// A device object as it should be signed by a cross-signing key: the object without
/// `signatures` and `unsigned` (the server compares it with what it stores).
pub fn without_signatures(object: &Value) -> Value {
    let mut o = object.clone();
    if let Some(map) = o.as_object_mut() {
        map.remove("signatures");
        map.remove("unsigned");
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matrix::signed_json::verify_json;

    #[test]
    fn device_keys_are_self_signed() {
        let account = Account::new();
        let keys = device_keys(&account, "@a:b", "MXHSM").unwrap();
        let pk = DeviceSigner(&account).public_key();
        verify_json(&keys, "@a:b", "ed25519:MXHSM", &pk).unwrap();
        assert_eq!(keys["keys"]["ed25519:MXHSM"], pk.to_base64());
        assert!(without_signatures(&keys).get("signatures").is_none());
    }
}
