//! Signing devices (with the self-signing key) and other users (with the user-signing key).
//!
//! Each flow fetches what it signs once, hands exactly that to the caller to confirm, signs
//! the canonical JSON of that same object on the token, uploads, and reads the result back.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::{Account, AccountError, PublishedIdentity};
use crate::matrix::cross_signing::{self, OwnKeys, Trust};
use crate::matrix::device::without_signatures;
use crate::matrix::keys::Ed25519PublicKey;
use crate::matrix::signed_json::{
    Ed25519Signer, SignedJsonError, sign_json, signable_bytes, verify_json,
};
use crate::token::{KeyInfo, KeyRole, TokenSigner};

/// A device that could be signed, as one `/keys/query` showed it.
#[derive(Debug, Clone)]
pub struct DeviceCandidate {
    pub device_id: String,
    /// Chosen by whoever named the device: untrusted text.
    pub display_name: Option<String>,
    /// Its Ed25519 key: the fingerprint to compare with what the device shows.
    pub ed25519: Option<Ed25519PublicKey>,
    /// Whether the device's own signature over its keys verifies (`Err`: why not).
    pub self_signature: Result<(), SelfSignatureError>,
    /// How it stands today against our self-signing key.
    pub trust: Trust,
    /// This is the device mxhsm itself logged in as.
    pub is_this_device: bool,
    /// The object exactly as fetched; this is what gets signed.
    object: Value,
}

impl DeviceCandidate {
    /// Why it cannot be signed, if it cannot.
    pub fn refusal(&self) -> Option<String> {
        if let Err(e) = &self.self_signature {
            return Some(format!("its own signature does not verify ({e})"));
        }
        if self.trust.is_verified() {
            return Some("already signed by the self-signing key".into());
        }
        None
    }
}

/// Why a device's signature over its own keys does not count.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SelfSignatureError {
    #[error("it has no valid Ed25519 key")]
    NoKey,
    #[error(transparent)]
    Signature(#[from] SignedJsonError),
    #[error("the device object names another user or device")]
    OtherDevice,
}

/// Chooses which of the devices shown to sign (their IDs), or stops with an error.
pub type ConfirmDevices<'a> =
    dyn FnMut(&[DeviceCandidate]) -> Result<Vec<String>, AccountError> + 'a;

/// Which of our devices to consider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSelection {
    /// These device IDs (each must exist).
    Named(Vec<String>),
    /// Every device not yet signed by the self-signing key.
    AllUnsigned,
}

/// What [`sign_devices`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SignedDevices {
    pub signed: Vec<String>,
    /// Named devices that were left alone, with the reason (already signed, bad
    /// self-signature).
    pub skipped: Vec<(String, String)>,
}

/// The user's current keys on the token, from one listing (no PIN needed).
pub(crate) type CurrentKeys = BTreeMap<KeyRole, KeyInfo>;

/// Takes the key of `role` out of `current`, or says the token has none.
pub(crate) fn take_key(
    account: &Account,
    current: &mut CurrentKeys,
    role: KeyRole,
) -> Result<KeyInfo, AccountError> {
    current.remove(&role).ok_or_else(|| {
        AccountError::Token(crate::token::TokenError::KeyNotFound {
            user_id: account.user_id().to_string(),
            role,
            token: account.store().summary().to_string(),
        })
    })
}

/// Our own keys on the token (the trust anchors), with an error that says what the server
/// publishes when the token has no master key.
pub(crate) fn own_keys(account: &Account, answer: &Value) -> Result<OwnKeys, AccountError> {
    Ok(anchors(account, answer)?.0)
}

/// [`own_keys`], and the token's current keys from the same listing.
pub(crate) fn anchors(
    account: &Account,
    answer: &Value,
) -> Result<(OwnKeys, CurrentKeys), AccountError> {
    let user = account.user_id();
    let current = account.store().current_keys(user)?;
    let public = |role| current.get(&role).and_then(|k| k.public_key.ed25519());
    let own = OwnKeys {
        user_id: user.to_string(),
        master: public(KeyRole::Master).ok_or_else(|| AccountError::NoIdentityOnToken {
            user_id: user.to_string(),
            token: account.store().summary().to_string(),
            published: PublishedIdentity::from_query(answer, user).master,
        })?,
        self_signing: public(KeyRole::SelfSigning),
        user_signing: public(KeyRole::UserSigning),
    };
    Ok((own, current))
}

/// The published identity must be the token's, as far as `roles` go.
fn require_published(
    account: &Account,
    own: &OwnKeys,
    answer: &Value,
    role: KeyRole,
) -> Result<(), AccountError> {
    let published = PublishedIdentity::from_query(answer, account.user_id());
    let token = match role {
        KeyRole::SelfSigning => own.self_signing,
        KeyRole::UserSigning => own.user_signing,
        _ => Some(own.master),
    };
    if published.master == Some(own.master) && published.get(role).copied() == token {
        return Ok(());
    }
    let report = cross_signing::evaluate(own, answer);
    let mut problems = report.own_identity;
    if problems.is_empty() {
        problems.push(format!(
            "the server's {} key is not the token's",
            role.as_str().replace('_', "-")
        ));
    }
    Err(AccountError::IdentityNotOurs {
        user_id: account.user_id().to_string(),
        problems,
    })
}

/// The devices of our user in `answer`, as candidates, judged against `own`.
fn candidates(account: &Account, own: &OwnKeys, answer: &Value) -> Vec<DeviceCandidate> {
    let me = account.user_id();
    let report = cross_signing::evaluate(own, answer);
    let objects = answer
        .get("device_keys")
        .and_then(|d| d.get(me))
        .and_then(Value::as_object);
    report
        .devices
        .into_iter()
        .filter(|d| d.user_id == me)
        .filter_map(|d| {
            let object = objects?.get(&d.device_id)?.clone();
            let own_id = format!("ed25519:{}", d.device_id);
            let self_signature = match &d.ed25519 {
                None => Err(SelfSignatureError::NoKey),
                Some(k) => verify_json(&object, me, &own_id, k).map_err(SelfSignatureError::from),
            };
            let self_signature = self_signature.and_then(|()| {
                (object.get("user_id").and_then(Value::as_str) == Some(me)
                    && object.get("device_id").and_then(Value::as_str) == Some(&d.device_id))
                .then_some(())
                .ok_or(SelfSignatureError::OtherDevice)
            });
            Some(DeviceCandidate {
                is_this_device: d.device_id == account.device_id(),
                device_id: d.device_id,
                display_name: d.display_name,
                ed25519: d.ed25519,
                self_signature,
                trust: d.trust,
                object,
            })
        })
        .collect()
}

/// Signs some of our own devices with the self-signing key on the token.
///
/// One `/keys/query`; the devices `selection` names are handed to `confirm`, which returns
/// the IDs to sign (any subset, or an error to stop). Exactly those objects, as fetched,
/// are signed — mxhsm's own device from its Olm account — uploaded in one request and read
/// back. Devices whose own signature does not verify are never signed.
pub fn sign_devices(
    account: &Account,
    selection: &DeviceSelection,
    confirm: &mut ConfirmDevices<'_>,
) -> Result<SignedDevices, AccountError> {
    sign_devices_seeing_all(account, selection, &mut |offered, _| {
        if offered.is_empty() {
            Ok(Vec::new())
        } else {
            confirm(offered)
        }
    })
}

/// Chooses which of the devices offered to sign, seeing every device of the same answer
/// (signed ones and those that cannot be signed too).
pub type ConfirmSeeingAll<'a> =
    dyn FnMut(&[DeviceCandidate], &[DeviceCandidate]) -> Result<Vec<String>, AccountError> + 'a;

/// [`sign_devices`], whose `confirm` also sees every device of the account in the same
/// `/keys/query` answer (for a policy that needs devices to be present). `confirm` is
/// called even when nothing can be signed (with nothing offered).
pub fn sign_devices_seeing_all(
    account: &Account,
    selection: &DeviceSelection,
    confirm: &mut ConfirmSeeingAll<'_>,
) -> Result<SignedDevices, AccountError> {
    let me = account.user_id();
    let answer = account.client().query_keys(&[me])?;
    let (own, mut current) = anchors(account, &answer)?;
    let ssk = take_key(account, &mut current, KeyRole::SelfSigning)?;
    require_published(account, &own, &answer, KeyRole::SelfSigning)?;
    let all = candidates(account, &own, &answer);
    let mut outcome = SignedDevices::default();
    let offered: Vec<DeviceCandidate> = match selection {
        DeviceSelection::Named(ids) => {
            let mut offered = Vec::new();
            for id in ids {
                let c = all.iter().find(|c| &c.device_id == id).ok_or_else(|| {
                    AccountError::UnknownDevice {
                        user_id: me.to_string(),
                        device_id: id.clone(),
                    }
                })?;
                match c.refusal() {
                    Some(why) if c.trust.is_verified() => outcome.skipped.push((id.clone(), why)),
                    Some(why) => {
                        return Err(AccountError::NotSignable {
                            device_id: id.clone(),
                            reason: why,
                        });
                    }
                    None => offered.push(c.clone()),
                }
            }
            offered
        }
        DeviceSelection::AllUnsigned => all
            .iter()
            .filter(|c| matches!(c.trust, Trust::Unsigned(_)))
            .filter(|c| match c.refusal() {
                None => true,
                Some(why) => {
                    outcome.skipped.push((c.device_id.clone(), why));
                    false
                }
            })
            .cloned()
            .collect(),
    };
    if offered.is_empty() {
        let _ = confirm(&offered, &all)?;
        return Ok(outcome);
    }
    let chosen = confirm(&offered, &all)?;
    if chosen.is_empty() {
        return Err(AccountError::Cancelled);
    }
    let mut to_sign = Vec::new();
    for id in &chosen {
        let c = offered.iter().find(|c| &c.device_id == id).ok_or_else(|| {
            AccountError::Input(format!(
                "device {} was not among those shown; nothing signed",
                crate::text::escape(id)
            ))
        })?;
        let object = if c.is_this_device {
            own_device_object(account, &c.object)?
        } else {
            without_signatures(&c.object)
        };
        to_sign.push((id.clone(), object));
    }
    upload_device_signatures(account, &ssk, to_sign)?;
    outcome.signed = chosen;
    Ok(outcome)
}

/// mxhsm's own device object to sign: made from its Olm account, after checking that the
/// server's copy (`served`) is the same device.
pub(crate) fn own_device_object(account: &Account, served: &Value) -> Result<Value, AccountError> {
    let (_, local) = account.own_device_keys()?;
    let ours = signable_bytes(&local)?;
    let theirs = signable_bytes(served)?;
    if ours != theirs {
        return Err(AccountError::OwnDeviceTampered {
            device_id: account.device_id().to_string(),
            difference: describe_difference(&local, served),
        });
    }
    Ok(without_signatures(&local))
}

/// Which signed fields of two device objects differ, for the tampering report.
fn describe_difference(ours: &Value, theirs: &Value) -> String {
    let mut fields = Vec::new();
    let a = without_signatures(ours);
    let b = without_signatures(theirs);
    let empty = serde_json::Map::new();
    let (a, b) = (
        a.as_object().unwrap_or(&empty),
        b.as_object().unwrap_or(&empty),
    );
    for k in a.keys().chain(b.keys().filter(|k| !a.contains_key(*k))) {
        if a.get(k) != b.get(k) {
            fields.push(k.clone());
        }
    }
    if fields.is_empty() {
        "its signed content differs".into()
    } else {
        format!("its {} differ", fields.join(", "))
    }
}

/// Signs mxhsm's own device with the self-signing key `ssk`, from the Olm account, after
/// checking the server's copy in `answer`, and the token's `master` key with the device
/// key. Returns `false` when the device is already signed by `ssk`.
pub(crate) fn sign_this_device(
    account: &Account,
    ssk: &KeyInfo,
    master: &Ed25519PublicKey,
    answer: &Value,
) -> Result<bool, AccountError> {
    let me = account.user_id();
    let served = answer
        .get("device_keys")
        .and_then(|d| d.get(me))
        .and_then(|d| d.get(account.device_id()))
        .ok_or_else(|| AccountError::UnknownDevice {
            user_id: me.to_string(),
            device_id: account.device_id().to_string(),
        })?;
    let object = own_device_object(account, served)?;
    device_signs_master(account, master, answer)?;
    let ssk_key = ssk.ed25519()?;
    if verify_json(served, me, &ssk_key.key_id(), &ssk_key).is_ok() {
        return Ok(false);
    }
    upload_device_signatures(
        account,
        ssk,
        vec![(account.device_id().to_string(), object)],
    )?;
    Ok(true)
}

/// mxhsm's device signs our master key (the token's `master`) with its device key, as
/// Element's devices do, when `answer` serves it as mxhsm would publish it. Skipped when it
/// already carries that signature; read back.
fn device_signs_master(
    account: &Account,
    master: &Ed25519PublicKey,
    answer: &Value,
) -> Result<(), AccountError> {
    let me = account.user_id();
    let Some(object) = answer.get("master_keys").and_then(|m| m.get(me)) else {
        return Ok(());
    };
    // Only the object mxhsm itself would publish for the token's key: nothing the server
    // added is vouched for.
    let ours = cross_signing::key_object(me, KeyRole::Master, master);
    if signable_bytes(object).ok() != signable_bytes(&ours).ok() {
        return Ok(());
    }
    let (olm, _) = account.own_device_keys()?;
    let device = crate::matrix::device::DeviceSigner(&olm);
    let key_id = format!("ed25519:{}", account.device_id());
    if verify_json(object, me, &key_id, &device.public_key()).is_ok() {
        return Ok(());
    }
    let mut signed = ours;
    sign_json(&mut signed, me, &key_id, &device)?;
    let failures = account
        .client()
        .upload_signatures(&json!({ me: { master.to_base64(): signed } }))?;
    if !failures.is_empty() {
        return Err(AccountError::SignaturesRefused(failures));
    }
    let back = account.client().query_keys(&[me])?;
    let served = back.get("master_keys").and_then(|m| m.get(me));
    if served.is_none_or(|s| verify_json(s, me, &key_id, &device.public_key()).is_err()) {
        return Err(AccountError::ReadBack(
            "our master key is not served with mxhsm's device signature".into(),
        ));
    }
    Ok(())
}

/// Signs each (device ID, object without signatures) with `ssk`, uploads them in one
/// request, and reads them back.
fn upload_device_signatures(
    account: &Account,
    ssk: &KeyInfo,
    devices: Vec<(String, Value)>,
) -> Result<(), AccountError> {
    let me = account.user_id();
    let store = account.keys();
    let signer = TokenSigner::new(store, ssk.clone())?;
    let key_id = signer.public_key().key_id();
    let mut uploads = serde_json::Map::new();
    let mut signed = Vec::new();
    for (id, mut object) in devices {
        sign_json(&mut object, me, &key_id, &signer)?;
        signed.push((id.clone(), object.clone()));
        uploads.insert(id, object);
    }
    let failures = account
        .client()
        .upload_signatures(&json!({ me: uploads }))?;
    if !failures.is_empty() {
        return Err(AccountError::SignaturesRefused(failures));
    }
    // Read back: the server must now serve each device with our signature over exactly the
    // content we signed.
    let answer = account.client().query_keys(&[me])?;
    let pk = signer.public_key();
    for (id, ours) in signed {
        let served = answer
            .get("device_keys")
            .and_then(|d| d.get(me))
            .and_then(|d| d.get(&id));
        let ok = served.is_some_and(|s| {
            signable_bytes(s).ok() == signable_bytes(&ours).ok()
                && verify_json(s, me, &key_id, &pk).is_ok()
        });
        if !ok {
            return Err(AccountError::ReadBack(format!(
                "device {id} is not served with the self-signing key's signature"
            )));
        }
    }
    Ok(())
}

/// Another user's master key as one `/keys/query` showed it.
#[derive(Debug, Clone)]
pub struct UserCandidate {
    pub user_id: String,
    pub master_key: Ed25519PublicKey,
    /// Already signed by our user-signing key.
    pub already_signed: bool,
    object: Value,
}

/// Signs `user_id`'s master key with the user-signing key on the token, after `confirm`
/// accepted exactly the key fetched (one `/keys/query`); uploads and reads back.
pub fn sign_user(
    account: &Account,
    user_id: &str,
    confirm: &mut dyn FnMut(&UserCandidate) -> Result<(), AccountError>,
) -> Result<UserCandidate, AccountError> {
    let me = account.user_id();
    if user_id == me {
        return Err(AccountError::SignSelf(user_id.to_string()));
    }
    crate::token::check_user_id(user_id)?;
    let answer = account.client().query_keys(&[me, user_id])?;
    let (own, mut current) = anchors(account, &answer)?;
    let usk = take_key(account, &mut current, KeyRole::UserSigning)?;
    require_published(account, &own, &answer, KeyRole::UserSigning)?;
    let object = answer
        .get("master_keys")
        .and_then(|m| m.get(user_id))
        .ok_or_else(|| AccountError::NoPublishedIdentity(user_id.to_string()))?
        .clone();
    let master_key =
        cross_signing::parse_key_object(&object, user_id, KeyRole::Master).map_err(|e| {
            AccountError::Refused(format!(
                "the master key of {} is malformed: {}",
                crate::text::escape(user_id),
                crate::text::escape(&e.to_string())
            ))
        })?;
    let usk_pk = usk.ed25519()?;
    let candidate = UserCandidate {
        user_id: user_id.to_string(),
        master_key,
        already_signed: verify_json(&object, me, &usk_pk.key_id(), &usk_pk).is_ok(),
        object,
    };
    confirm(&candidate)?;
    let store = account.keys();
    let signer = TokenSigner::new(store, usk)?;
    let mut signed = without_signatures(&candidate.object);
    sign_json(&mut signed, me, &usk_pk.key_id(), &signer)?;
    let failures = account.client().upload_signatures(
        &json!({ user_id: { candidate.master_key.to_base64(): signed.clone() } }),
    )?;
    if !failures.is_empty() {
        return Err(AccountError::SignaturesRefused(failures));
    }
    let back = account.client().query_keys(&[user_id])?;
    let served = back.get("master_keys").and_then(|m| m.get(user_id));
    let ok = served.is_some_and(|s| {
        signable_bytes(s).ok() == signable_bytes(&signed).ok()
            && verify_json(s, me, &usk_pk.key_id(), &usk_pk).is_ok()
    });
    if !ok {
        return Err(AccountError::ReadBack(format!(
            "the master key of {user_id} is not served with the user-signing key's signature"
        )));
    }
    Ok(candidate)
}
