//! The cross-signing identity: create it on the token, publish it, check it.
//!
//! Publishing never replaces an identity the server has that is not the token's unless
//! the caller asks (`replace`), and then only after a callback was shown what is lost.
//! Only the keys that changed are uploaded (Synapse refuses a key it has stored before,
//! even the same one, with a 500), a new master key comes with new self-signing and
//! user-signing keys, and the upload is read back.

use secrecy::SecretString;
use serde_json::Value;

use super::sign::{CurrentKeys, anchors, own_keys, sign_this_device, take_key};
use super::{Account, AccountError, PublishedIdentity};
use crate::homeserver::{HomeserverError, UiaAuth};
use crate::matrix::cross_signing::{self, OwnKeys, TrustReport};
use crate::matrix::keys::Ed25519PublicKey;
use crate::matrix::signed_json::{sign_json, verify_json};
use crate::token::{KeyOptions, KeyRole, SecretKeyBytes, TokenSigner};

/// What replacing the published identity loses, shown before anything is done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replacement {
    pub user_id: String,
    /// The master key the server publishes now.
    pub published_master: Ed25519PublicKey,
    /// Our devices whose cross-signing (by the current self-signing key) is lost.
    pub signed_devices: Vec<String>,
    /// The current key backup, when its `auth_data` is signed by the published master key:
    /// (version, key count). Clients stop trusting it.
    pub trusted_backup: Option<(String, u64)>,
}

/// Options for [`create`].
#[derive(Debug, Default)]
pub struct CreateOptions {
    /// Import these seeds instead of generating keys (all three, or none).
    pub import: Option<[SecretKeyBytes; 3]>,
    /// Create the keys on the token, but do not publish them.
    pub no_publish: bool,
    /// Replace an identity the server publishes that is not the token's.
    pub replace: bool,
}

/// A key the flow made, or found on the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    Generated,
    Imported,
    /// Already on the token.
    Existing,
}

/// What [`create`] or [`publish`] did.
#[derive(Debug, Clone)]
pub struct Published {
    pub user_id: String,
    pub master: Ed25519PublicKey,
    pub self_signing: Ed25519PublicKey,
    pub user_signing: Ed25519PublicKey,
    /// How each key came to be (master, self-signing, user-signing); empty for `publish`.
    pub sources: Vec<(KeyRole, KeySource)>,
    /// The keys uploaded (none: the server already published exactly these).
    pub uploaded: Vec<KeyRole>,
    /// Whether the identity was published (false with `no_publish`).
    pub published: bool,
    /// mxhsm's own device was signed now (false: it already was, or nothing published).
    pub device_signed: bool,
    /// A published identity replaced (with `replace`).
    pub replaced: Option<Replacement>,
    /// Our devices signed by the previous self-signing key that lost that signature: to be
    /// checked and signed again by the user.
    pub devices_to_resign: Vec<String>,
}

/// The callbacks of a publish: a confirmation of a [`Replacement`] (only with `replace`),
/// and the account password when the server asks for it.
pub struct PublishPrompts<'a> {
    pub confirm_replace: &'a mut dyn FnMut(&Replacement) -> Result<(), AccountError>,
    pub password: &'a dyn Fn() -> Result<SecretString, HomeserverError>,
}

/// What replacing the published identity (master key `master`) would lose.
fn replacement(
    account: &Account,
    answer: &Value,
    master: Ed25519PublicKey,
    published: &PublishedIdentity,
) -> Result<Replacement, AccountError> {
    let me = account.user_id();
    let signed_devices = published
        .self_signing
        .map(|ssk| devices_signed_by(answer, me, &ssk))
        .unwrap_or_default();
    let trusted_backup = account
        .client()
        .backup_version(None)?
        .filter(|v| v.verified_key(me, &master).is_ok())
        .map(|v| (v.version, v.count));
    Ok(Replacement {
        user_id: me.to_string(),
        published_master: master,
        signed_devices,
        trusted_backup,
    })
}

/// mxhsm's own device must be served as its Olm account made it: a server that swapped its
/// keys is caught before anything is made or uploaded.
fn check_own_device(account: &Account, answer: &Value) -> Result<(), AccountError> {
    if let Some(served) = answer
        .get("device_keys")
        .and_then(|d| d.get(account.user_id()))
        .and_then(|d| d.get(account.device_id()))
    {
        super::sign::own_device_object(account, served)?;
    }
    Ok(())
}

/// One `/keys/query` of ourselves, mxhsm's device checked in it, and the identity it
/// publishes.
fn fetch_identity(account: &Account) -> Result<(Value, PublishedIdentity), AccountError> {
    let answer = account.client().query_keys(&[account.user_id()])?;
    check_own_device(account, &answer)?;
    let published = PublishedIdentity::from_query(&answer, account.user_id());
    Ok((answer, published))
}

/// Refuses, or asks, when the server publishes a master key that is not `token_master`.
fn check_replace(
    account: &Account,
    answer: &Value,
    published: &PublishedIdentity,
    token_master: Option<Ed25519PublicKey>,
    replace: bool,
    confirm: &mut dyn FnMut(&Replacement) -> Result<(), AccountError>,
) -> Result<Option<Replacement>, AccountError> {
    let Some(server) = published.master else {
        return Ok(None);
    };
    if Some(server) == token_master {
        return Ok(None);
    }
    if !replace {
        return Err(AccountError::IdentityExists {
            user_id: account.user_id().to_string(),
            published: server,
            on_token: token_master,
        });
    }
    let r = replacement(account, answer, server, published)?;
    confirm(&r)?;
    Ok(Some(r))
}

/// Creates the cross-signing keys on the token and publishes them.
///
/// The server is asked first: if it publishes an identity whose master key is not on the
/// token, nothing is generated unless `options.replace` (and `prompts.confirm_replace`
/// accepted the loss). Keys already on the token are used, except that a new master key
/// never takes over the published self-signing or user-signing key.
pub fn create(
    account: &Account,
    options: CreateOptions,
    prompts: PublishPrompts<'_>,
) -> Result<Published, AccountError> {
    let me = account.user_id().to_string();
    let store = account.keys();
    let (answer, published) = fetch_identity(account)?;
    let mut current = store.current_keys(&me)?;
    let on_token =
        |current: &CurrentKeys, role| current.get(&role).and_then(|k| k.public_key.ed25519());
    let roles = KeyRole::CROSS_SIGNING;
    if options.import.is_some()
        && let Some(role) = roles.iter().find(|r| current.contains_key(r))
    {
        return Err(AccountError::Refused(format!(
            "the token already holds a {role} key for {}; delete it before importing another",
            crate::text::escape(&me)
        )));
    }
    // The master key the identity will have, when it is known before anything is made.
    let new_master = match &options.import {
        Some(seeds) => seeds[0].public_key(KeyRole::Master.algorithm()).ed25519(),
        None => on_token(&current, KeyRole::Master),
    };
    let replaced = check_replace(
        account,
        &answer,
        &published,
        new_master,
        options.replace,
        prompts.confirm_replace,
    )?;
    // Only now is anything made on the token.
    let mut sources = Vec::new();
    match options.import {
        Some(seeds) => {
            for (role, seed) in roles.into_iter().zip(seeds) {
                let key = store.import(&me, role, seed, &KeyOptions::default())?;
                current.insert(role, key);
                sources.push((role, KeySource::Imported));
            }
        }
        None => {
            let master = match on_token(&current, KeyRole::Master) {
                Some(k) => {
                    sources.push((KeyRole::Master, KeySource::Existing));
                    k
                }
                None => {
                    let k = store.generate(&me, KeyRole::Master, &KeyOptions::default())?;
                    let public = k.ed25519()?;
                    current.insert(KeyRole::Master, k);
                    sources.push((KeyRole::Master, KeySource::Generated));
                    public
                }
            };
            // A master key that is not the published one cannot take over the published
            // self-signing or user-signing key (Synapse refuses a key it stored before).
            let new_identity = published.master.is_some_and(|m| m != master);
            for role in [KeyRole::SelfSigning, KeyRole::UserSigning] {
                let existing = on_token(&current, role);
                let reuse =
                    existing.is_some_and(|k| !(new_identity && published.get(role) == Some(&k)));
                if reuse {
                    sources.push((role, KeySource::Existing));
                } else {
                    let key = store.generate(&me, role, &KeyOptions::default())?;
                    current.insert(role, key);
                    sources.push((role, KeySource::Generated));
                }
            }
        }
    }
    if options.no_publish {
        let mut pk = |r| -> Result<Ed25519PublicKey, AccountError> {
            Ok(take_key(account, &mut current, r)?.ed25519()?)
        };
        return Ok(Published {
            user_id: me.clone(),
            master: pk(KeyRole::Master)?,
            self_signing: pk(KeyRole::SelfSigning)?,
            user_signing: pk(KeyRole::UserSigning)?,
            sources,
            uploaded: Vec::new(),
            published: false,
            device_signed: false,
            replaced,
            devices_to_resign: Vec::new(),
        });
    }
    let mut out = publish_checked(account, &answer, &published, current, prompts.password)?;
    out.sources = sources;
    out.replaced = replaced;
    Ok(out)
}

/// Publishes the token's cross-signing keys and cross-signs mxhsm's own device.
///
/// Refuses when the server publishes a master key that is not the token's, unless
/// `replace` (after `prompts.confirm_replace`); a new master key gets new self-signing and
/// user-signing keys generated on the token when the token's are the published ones.
/// With `new_keys`, all three are generated anew on the token first (after the
/// confirmation): what a homeserver that refuses keys it stored before (Synapse) needs to
/// take the account back after a reset.
pub fn publish(
    account: &Account,
    replace: bool,
    new_keys: bool,
    prompts: PublishPrompts<'_>,
) -> Result<Published, AccountError> {
    let me = account.user_id().to_string();
    let store = account.keys();
    let (answer, published) = fetch_identity(account)?;
    let (own, mut current) = anchors(account, &answer)?;
    let replaced = check_replace(
        account,
        &answer,
        &published,
        Some(own.master),
        replace,
        prompts.confirm_replace,
    )?;
    let mut sources = Vec::new();
    if new_keys {
        for role in KeyRole::CROSS_SIGNING {
            let key = store.generate(&me, role, &KeyOptions::default())?;
            current.insert(role, key);
            sources.push((role, KeySource::Generated));
        }
    } else if published.master.is_some_and(|m| m != own.master) {
        for (role, token) in [
            (KeyRole::SelfSigning, own.self_signing),
            (KeyRole::UserSigning, own.user_signing),
        ] {
            if token.is_none() || published.get(role) == token.as_ref() {
                let key = store.generate(&me, role, &KeyOptions::default())?;
                current.insert(role, key);
                sources.push((role, KeySource::Generated));
            }
        }
    }
    let mut out = publish_checked(account, &answer, &published, current, prompts.password)
        .map_err(|e| match e {
            // Synapse keeps every cross-signing key it ever stored and fails (500) on one
            // uploaded again (docs/synapse.md).
            AccountError::Homeserver(HomeserverError::Http { status: 500, .. })
                if replaced.is_some() && !new_keys =>
            {
                AccountError::KeysStoredBefore {
                    user_id: me.clone(),
                }
            }
            e => e,
        })?;
    out.sources = sources;
    out.replaced = replaced;
    Ok(out)
}

/// Uploads what differs from `answer` (the server's identity, checked by the caller to be
/// ours or replaceable), reads it back, and signs mxhsm's device. `current`: the token's
/// keys, as listed by the caller and updated with what it made.
fn publish_checked(
    account: &Account,
    answer: &Value,
    published: &PublishedIdentity,
    mut current: CurrentKeys,
    password: &dyn Fn() -> Result<SecretString, HomeserverError>,
) -> Result<Published, AccountError> {
    let me = account.user_id();
    let store = account.keys();
    let master = take_key(account, &mut current, KeyRole::Master)?;
    let ssk = take_key(account, &mut current, KeyRole::SelfSigning)?;
    let usk = take_key(account, &mut current, KeyRole::UserSigning)?;
    let (master_pk, ssk_pk, usk_pk) = (master.ed25519()?, ssk.ed25519()?, usk.ed25519()?);
    let master_changes = published.master != Some(master_pk);
    let mut body = serde_json::Map::new();
    let mut uploaded = Vec::new();
    let signer = TokenSigner::new(store, master.clone())?;
    if master_changes {
        body.insert(
            "master_key".into(),
            cross_signing::key_object(me, KeyRole::Master, &master_pk),
        );
        uploaded.push(KeyRole::Master);
    }
    for (role, field, pk) in [
        (KeyRole::SelfSigning, "self_signing_key", ssk_pk),
        (KeyRole::UserSigning, "user_signing_key", usk_pk),
    ] {
        if master_changes || published.get(role) != Some(&pk) {
            let mut object = cross_signing::key_object(me, role, &pk);
            sign_json(&mut object, me, &master_pk.key_id(), &signer)?;
            body.insert(field.into(), object);
            uploaded.push(role);
        }
    }
    // Our devices (other than mxhsm's) validly signed by the outgoing self-signing key.
    let devices_to_resign = match published.self_signing {
        Some(old) if uploaded.contains(&KeyRole::SelfSigning) && !master_changes => {
            let mut ids = devices_signed_by(answer, me, &old);
            ids.retain(|id| id != account.device_id());
            ids
        }
        _ => Vec::new(),
    };
    if !body.is_empty() {
        let prompt = || password();
        account.client().upload_cross_signing_keys(
            me,
            &Value::Object(body),
            UiaAuth::Password(&prompt),
        )?;
    }
    // Read back: the server must publish exactly the token's three keys now.
    let back = account.client().query_keys(&[me])?;
    let served = PublishedIdentity::from_query(&back, me);
    if served.master != Some(master_pk)
        || served.self_signing != Some(ssk_pk)
        || served.user_signing != Some(usk_pk)
    {
        return Err(AccountError::ReadBack(format!(
            "the server publishes {} / {} / {} instead of the token's master, self-signing and user-signing keys",
            show(served.master),
            show(served.self_signing),
            show(served.user_signing)
        )));
    }
    let device_signed = sign_this_device(account, &ssk, &master_pk, &back)?;
    Ok(Published {
        user_id: me.to_string(),
        master: master_pk,
        self_signing: ssk_pk,
        user_signing: usk_pk,
        sources: Vec::new(),
        uploaded,
        published: true,
        device_signed,
        replaced: None,
        devices_to_resign,
    })
}

fn show(k: Option<Ed25519PublicKey>) -> String {
    k.map(|k| k.to_base64()).unwrap_or_else(|| "(none)".into())
}

/// Our devices in `answer` validly signed by the self-signing key `ssk`.
fn devices_signed_by(answer: &Value, me: &str, ssk: &Ed25519PublicKey) -> Vec<String> {
    answer
        .get("device_keys")
        .and_then(|d| d.get(me))
        .and_then(Value::as_object)
        .map(|devices| {
            devices
                .iter()
                .filter(|(_, d)| verify_json(d, me, &ssk.key_id(), ssk).is_ok())
                .map(|(id, _)| id.clone())
                .collect()
        })
        .unwrap_or_default()
}

/// `identity status`: the trust report, from one `/keys/query` of us and `users`.
#[derive(Debug, Clone)]
pub struct Status {
    pub own: OwnKeys,
    pub report: TrustReport,
    /// mxhsm's own device.
    pub this_device: String,
}

impl Status {
    /// Whether anything needs the user's attention: our identity as published, or a
    /// device or user that is not verified.
    pub fn has_problems(&self) -> bool {
        !self.report.own_identity.is_empty()
            || self
                .report
                .devices
                .iter()
                .any(|d| matches!(d.trust, cross_signing::Trust::ChainBroken(_)))
            || self
                .report
                .users
                .iter()
                .any(|u| matches!(u.trust, cross_signing::Trust::ChainBroken(_)))
    }
}

/// The trust report of the account's identity, its devices and `users`.
pub fn status(account: &Account, users: &[String]) -> Result<Status, AccountError> {
    let me = account.user_id();
    for u in users {
        crate::token::check_user_id(u)?;
    }
    let mut query: Vec<&str> = vec![me];
    query.extend(users.iter().map(String::as_str));
    let answer = account.client().query_keys(&query)?;
    let own = own_keys(account, &answer)?;
    let report = cross_signing::evaluate(&own, &answer);
    Ok(Status {
        own,
        report,
        this_device: account.device_id().to_string(),
    })
}
