//! The PKCS#11 backend (cryptoki): SoftHSM, Kryoptic, network HSMs, ykcs11 — any module.
//!
//! Keys are stored as a private-key object and a public-key object that share a
//! `CKA_LABEL` and a `CKA_ID` (the scheme is in docs/architecture.md):
//!
//! * `CKA_LABEL` = `mxhsm:<role>:<user ID>`, e.g. `mxhsm:master:@alice:example.org`, so a
//!   (user, role) lookup is one exact-match `C_FindObjects`;
//! * `CKA_ID` = `"mx" ‖ 0x01 ‖ creation time in ms (u64 BE) ‖ 4 random bytes`, which makes
//!   each generation of a role unique and orders them (the newest is current).
//!
//! Token quirks handled here, each described in docs/tokens.md:
//! SoftHSM's X25519 only as an EC_EDWARDS key with curve25519 parameters; three
//! `CKA_EC_POINT` encodings; raw 32-byte ECDH peer keys (Kryoptic refuses DER).
//!
//! Here: the store, opening it on a token a URI names, and the [`KeyStore`] operations.
//! Beside it: `module` (loading modules, listing tokens, probing mechanisms), `session`
//! (login and the session pool), `objects` (the object scheme and templates), [`uri`],
//! [`ec`].

mod bare;
pub mod ec;
mod index;
mod module;
mod objects;
pub mod p11kit;
mod session;
pub mod uri;

pub use module::{
    FoundModule, MODULE_ENV, ModuleSource, TokenEntry, default_modules, list_tokens, load_module,
    resolve_module_path,
};
pub use objects::key_label;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use cryptoki::context::Pkcs11;
use cryptoki::error::Error as CkError;
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::elliptic_curve::{EcKdf, Ecdh1DeriveParams};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::slot::{Slot, TokenInfo};
use zeroize::Zeroize;

pub use self::uri::Pkcs11Uri;
use super::pin::{PinProvider, PinStatus};
use super::{
    Capabilities, Curve25519PublicKey, KeyAlgorithm, KeyBackend, KeyInfo, KeyOptions, KeyRole,
    KeyStore, SecretKeyBytes, SharedSecret, TokenError, TokenSummary, check_user_id,
};
use module::{module_error, pin_status, probe, soft_token_lock, summary_of};
use objects::{new_key_id, private_usage, public_usage, with_optional_attributes};
use session::LoginState;

/// How often the slot list is read before a token is declared absent (see `open`).
pub(super) const ENUMERATION_TRIES: u32 = 5;

/// A logged-in PKCS#11 token holding mxhsm keys.
/// The mechanism and template of one X25519 agreement: the shared secret as a readable
/// session object. The peer key is raw (32 bytes): Kryoptic refuses the DER form, ykcs11
/// needs exactly 32.
fn ecdh_derive(peer: &Curve25519PublicKey) -> (Mechanism<'_>, [Attribute; 6]) {
    let mechanism = Mechanism::Ecdh1Derive(Ecdh1DeriveParams::new(EcKdf::null(), peer.as_bytes()));
    let template = [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::Token(false),
        Attribute::Sensitive(false),
        Attribute::Extractable(true),
        Attribute::ValueLen(32.into()),
    ];
    (mechanism, template)
}

pub struct Pkcs11Store {
    ctx: Pkcs11,
    slot: Slot,
    summary: TokenSummary,
    capabilities: Capabilities,
    pin_status_before_login: PinStatus,
    /// Held while this store lives, for software tokens (see `process_lock`).
    _process_lock: Option<crate::token::process_lock::ProcessLock>,
    /// Open sessions, reused; the first one is never closed (closing an application's last
    /// session logs it out).
    pool: Mutex<Vec<Session>>,
    login: Mutex<LoginState>,
    /// `login` is `Done`: every private-key operation asks, so it is answered without a lock.
    logged_in: AtomicBool,
    /// The URI's `pin-source`, read at login.
    pin_source: Option<PathBuf>,
    /// Where the PIN comes from when the store logs in by itself (see `open_lazy`).
    pins: Option<Arc<dyn PinProvider>>,
    /// Private-key handles by (`CKA_ID`, `CKA_LABEL`), so repeated operations skip
    /// `C_FindObjects`.
    handles: Mutex<HashMap<(Vec<u8>, String), ObjectHandle>>,
    /// Each user's keys as last listed (and whether logged in then), kept only while the
    /// process lock is held: then no other process can change the token, and every change
    /// this store makes clears its user's entry. A token search costs a pass over all its
    /// objects, so a flow that looks a user up several times pays for it once.
    listed: Mutex<HashMap<String, (bool, Vec<KeyInfo>)>>,
    /// Set by [`Pkcs11Store::expect_many_users`]: the first lookup of a user (logged in or
    /// not) lists the whole token once and fills `listed` for every user on it, instead
    /// of a search per user. `prefetched` is the login state of the last such listing.
    many_users: AtomicBool,
    prefetched: Mutex<Option<bool>>,
    /// Whether a user's keys are found by subject (see `index`).
    index: Mutex<index::Index>,
}

impl std::fmt::Debug for Pkcs11Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Store")
            .field("summary", &self.summary)
            .field("capabilities", &self.capabilities)
            .finish_non_exhaustive()
    }
}

impl Pkcs11Store {
    /// Opens the one token `uri` selects and logs in at once with a PIN from `pins`.
    ///
    /// Tokens are filtered by the URI before anything is sent to them, so a PIN never
    /// reaches the wrong token. The PIN comes from the URI's `pin-source`, else from
    /// `pins`; it is sent once. A wrong PIN is an error that says what the token reports
    /// about its retry counter.
    pub fn open(uri: &Pkcs11Uri, pins: &dyn PinProvider) -> Result<Self, TokenError> {
        let store = Self::connect(uri, None)?;
        store.login_with(pins)?;
        Ok(store)
    }

    /// Opens the one token `uri` selects without logging in: public objects (the public
    /// halves of mxhsm's keys) can be read at once, and the PIN is asked for from `pins`
    /// only when a private key is first needed. So a command checks everything it can
    /// before it asks for a PIN.
    pub fn open_lazy(uri: &Pkcs11Uri, pins: Arc<dyn PinProvider>) -> Result<Self, TokenError> {
        Self::connect(uri, Some(pins))
    }

    fn connect(uri: &Pkcs11Uri, pins: Option<Arc<dyn PinProvider>>) -> Result<Self, TokenError> {
        let path = resolve_module_path(uri)?;
        let process_lock = soft_token_lock(&path)?;
        let ctx = load_module(&path)?;
        let dev = |op| module_error(&path, op);
        // SoftHSM's file store can show another process's token as absent while that
        // process rewrites it; looking again a moment later finds it. Only the slot list is
        // read again: nothing has been sent to any token yet.
        // It can also fail C_GetTokenInfo with CKR_GENERAL_ERROR in that moment.
        let mut attempt = 0;
        let (mut candidates, available) = loop {
            attempt += 1;
            match Self::matching_tokens(&ctx, uri, &path) {
                Ok((c, a)) if !c.is_empty() || attempt >= ENUMERATION_TRIES => break (c, a),
                Err(e) if attempt >= ENUMERATION_TRIES => return Err(e),
                _ => std::thread::sleep(std::time::Duration::from_millis(50 * attempt as u64)),
            }
        };
        let (slot, tinfo, summary) = match candidates.len() {
            1 => candidates.remove(0),
            0 => {
                return Err(TokenError::NoMatchingToken {
                    uri: uri.original.clone(),
                    available,
                });
            }
            _ => {
                return Err(TokenError::AmbiguousToken {
                    uri: uri.original.clone(),
                    matches: candidates
                        .iter()
                        .map(|(_, _, s)| format!("\"{}\" serial {}", s.label, s.serial))
                        .collect(),
                });
            }
        };
        let status = pin_status(&tinfo);
        let session = ctx.open_rw_session(slot).map_err(dev("C_OpenSession"))?;
        let capabilities = probe(&ctx, slot, &tinfo).map_err(dev("C_GetMechanismList"))?;
        tracing::info!(
            "opened {} (slot {})",
            crate::text::escape(&summary.to_string()),
            slot.id()
        );
        Ok(Pkcs11Store {
            ctx,
            slot,
            summary,
            capabilities,
            pin_status_before_login: status,
            logged_in: AtomicBool::new(!tinfo.login_required()),
            login: Mutex::new(if tinfo.login_required() {
                LoginState::Pending {
                    protected_path: tinfo.protected_authentication_path(),
                }
            } else {
                LoginState::Done
            }),
            pin_source: uri.pin_source.clone(),
            pins,
            _process_lock: process_lock,
            pool: Mutex::new(vec![session]),
            handles: Mutex::new(HashMap::new()),
            listed: Mutex::new(HashMap::new()),
            many_users: AtomicBool::new(false),
            prefetched: Mutex::new(None),
            index: Mutex::new(index::Index::Unknown),
        })
    }

    /// The initialised tokens `uri` selects, and a description of every one present.
    #[allow(clippy::type_complexity)]
    fn matching_tokens(
        ctx: &Pkcs11,
        uri: &Pkcs11Uri,
        path: &Path,
    ) -> Result<(Vec<(Slot, TokenInfo, TokenSummary)>, Vec<String>), TokenError> {
        let dev = |op| module_error(path, op);
        let lib = ctx.get_library_info().map_err(dev("C_GetInfo"))?;
        let mut candidates = Vec::new();
        let mut available = Vec::new();
        for slot in ctx.get_slots_with_token().map_err(dev("C_GetSlotList"))? {
            let sinfo = ctx.get_slot_info(slot).map_err(dev("C_GetSlotInfo"))?;
            let tinfo = ctx.get_token_info(slot).map_err(dev("C_GetTokenInfo"))?;
            if !tinfo.token_initialized() {
                continue;
            }
            let props = uri::TokenProperties {
                label: tinfo.label(),
                manufacturer: tinfo.manufacturer_id(),
                serial: tinfo.serial_number(),
                model: tinfo.model(),
                slot_id: slot.id(),
                slot_description: sinfo.slot_description(),
                slot_manufacturer: sinfo.manufacturer_id(),
                library_manufacturer: lib.manufacturer_id(),
                library_description: lib.library_description(),
            };
            let summary = summary_of(&tinfo, path);
            available.push(format!("\"{}\" serial {}", summary.label, summary.serial));
            if uri.matches(&props) {
                candidates.push((slot, tinfo, summary));
            }
        }
        Ok((candidates, available))
    }

    /// The error of a failed call: allocates only when there is one (the agreement loop
    /// of a restore calls this for every session).
    fn dev<'a>(&'a self, operation: &'a str) -> impl Fn(CkError) -> TokenError + 'a {
        move |e| {
            tracing::debug!(
                "{operation} on {} failed: {e}",
                crate::text::escape(&self.summary.to_string())
            );
            TokenError::Device {
                token: self.summary.to_string(),
                operation: operation.to_string(),
                reason: e.to_string(),
            }
        }
    }

    fn other_token(&self, key: &KeyInfo) -> TokenError {
        TokenError::OtherToken {
            role: key.role,
            user_id: key.user_id.clone(),
            token: self.summary.to_string(),
        }
    }

    fn bad_data(&self, what: String) -> TokenError {
        TokenError::BadTokenData {
            token: self.summary.to_string(),
            what,
        }
    }

    /// Lists keys with a token search (see `list_keys`). Before login only the public
    /// halves are visible (CKA_PRIVATE = false): enough to know which keys exist and their
    /// public keys; the protection attributes of the private halves are read once logged in.
    fn search_keys(
        &self,
        user_id: Option<&str>,
        logged_in: bool,
    ) -> Result<Vec<KeyInfo>, TokenError> {
        let session = self.session()?;
        // Every C_FindObjects costs a pass over the token's objects. A user's keys (both
        // halves) are one search by subject on an indexed token, or one per role's label
        // on a legacy one; the listing of all keys is one search per class. Each object is
        // then read once, and private keys are paired with their public halves in memory.
        let handles = match user_id {
            Some(user) => {
                check_user_id(user)?;
                let mut found = Vec::new();
                if self.indexed(&session)? {
                    found = session
                        .find_objects(&[Attribute::Subject(index::subject_of(user))])
                        .map_err(self.dev("C_FindObjects"))?;
                    tracing::debug!(
                        "C_FindObjects subject CN={}: {} object(s)",
                        crate::text::escape(user),
                        found.len()
                    );
                }
                // Nothing by subject: before calling the user keyless, their labels are
                // searched too, for keys made without a subject (by an older mxhsm, or
                // another tool); finding any ends the index below.
                if found.is_empty() {
                    found = self.find_by_labels(&session, user)?;
                }
                found
            }
            None => {
                let find = |class| {
                    session
                        .find_objects(&[Attribute::Class(class)])
                        .map_err(self.dev("C_FindObjects"))
                };
                let mut found = find(ObjectClass::PUBLIC_KEY)?;
                if logged_in {
                    found.extend(find(ObjectClass::PRIVATE_KEY)?);
                }
                found
            }
        };
        let mut objects = Vec::with_capacity(handles.len());
        for h in handles {
            objects.push(self.read_object(&session, h)?);
        }
        if let Some(o) = objects.iter().find(|o| o.lacks_subject()) {
            self.unindex(
                &session,
                &format!(
                    "{} has no subject",
                    crate::text::escape(o.label.as_deref().unwrap_or_default())
                ),
            );
        }
        let mut keys = Vec::new();
        if logged_in {
            let (privates, points) = objects::split_halves(objects);
            for o in privates {
                if let Some(k) = self.private_key_info(&session, o, Some(&points))? {
                    keys.push(k);
                }
            }
        } else {
            // Before login only public objects are visible.
            for o in objects {
                if o.class == Some(ObjectClass::PUBLIC_KEY)
                    && let Some(k) = self.public_key_info(o)?
                {
                    keys.push(k);
                }
            }
        }
        if let Some(user) = user_id {
            // A subject search could find another application's object of that subject.
            keys.retain(|k| k.user_id == user);
        }
        keys.sort_by(|a, b| {
            (&a.user_id, a.role, a.created_ms).cmp(&(&b.user_id, b.role, b.created_ms))
        });
        Ok(keys)
    }

    /// For a command that looks up many users on this token (`--account all`): the first
    /// lookup lists every key once (on SoftHSM, 1,000 users cost one listing of about a
    /// second instead of a search of about 0.2 s each). Only while the process lock is
    /// held, as for every cached listing.
    pub fn expect_many_users(&self) {
        self.many_users
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Lists the whole token into `listed` once per login state, when many users are
    /// expected; whether it did (now or before). A user the listing did not find (or whose
    /// keys changed since) is still looked up by a search of its own.
    fn prefetch(&self, logged_in: bool) -> bool {
        if !self.many_users.load(std::sync::atomic::Ordering::Relaxed) {
            return false;
        }
        let mut prefetched = self.prefetched.lock().unwrap_or_else(|e| e.into_inner());
        if *prefetched == Some(logged_in) {
            return true;
        }
        *prefetched = Some(logged_in);
        match self.search_keys(None, logged_in) {
            Ok(keys) => {
                let mut by_user: HashMap<String, (bool, Vec<KeyInfo>)> = HashMap::new();
                for k in keys {
                    by_user
                        .entry(k.user_id.clone())
                        .or_insert_with(|| (logged_in, Vec::new()))
                        .1
                        .push(k);
                }
                tracing::debug!("listed the keys of {} user(s) at once", by_user.len());
                self.listed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend(by_user);
                true
            }
            Err(e) => {
                tracing::debug!("listing the whole token failed ({e}): a search per user");
                false
            }
        }
    }

    /// Both halves of `user`'s keys, one label search per role.
    fn find_by_labels(
        &self,
        session: &Session,
        user: &str,
    ) -> Result<Vec<ObjectHandle>, TokenError> {
        let mut all = Vec::new();
        for role in KeyRole::ALL {
            let label = key_label(user, role);
            let found = session
                .find_objects(&[Attribute::Label(label.clone().into_bytes())])
                .map_err(self.dev("C_FindObjects"))?;
            tracing::debug!(
                "C_FindObjects label {}: {} object(s)",
                crate::text::escape(&label),
                found.len()
            );
            all.extend(found);
        }
        Ok(all)
    }

    /// Forgets the listing of `user_id` (its keys changed).
    fn forget(&self, user_id: &str) {
        self.listed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(user_id);
    }

    fn unsupported(&self, what: &str) -> TokenError {
        TokenError::Unsupported {
            token: self.summary.to_string(),
            what: what.to_string(),
        }
    }
}

impl KeyStore for Pkcs11Store {
    fn summary(&self) -> &TokenSummary {
        &self.summary
    }

    fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    fn list_keys(&self, user_id: Option<&str>) -> Result<Vec<KeyInfo>, TokenError> {
        let logged_in = self.is_logged_in();
        let cached = self._process_lock.is_some();
        if cached && let Some(user) = user_id {
            // What an earlier lookup, or a listing of the whole token, found.
            let known = || {
                self.listed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(user)
                    .filter(|(when, _)| *when == logged_in)
                    .map(|(_, keys)| keys.clone())
            };
            if let Some(keys) = known() {
                return Ok(keys);
            }
            if self.prefetch(logged_in)
                && let Some(keys) = known()
            {
                return Ok(keys);
            }
        }
        let keys = self.search_keys(user_id, logged_in)?;
        if cached && let Some(user) = user_id {
            self.listed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(user.to_string(), (logged_in, keys.clone()));
        }
        Ok(keys)
    }

    fn generate(
        &self,
        user_id: &str,
        role: KeyRole,
        _options: &KeyOptions,
    ) -> Result<KeyInfo, TokenError> {
        check_user_id(user_id)?;
        self.forget(user_id);
        self.key_params(role.algorithm())?;
        self.login()?;
        let session = self.session()?;
        let label = key_label(user_id, role);
        self.index_before_create(&session)?;
        let subject = Some(index::subject_of(user_id));
        let id = new_key_id()?;
        let (public, private) =
            self.generate_objects(&session, role.algorithm(), &label, id.clone(), subject)?;
        let made = self
            .index_after_create(&session, &[public, private])
            .and_then(|()| self.key_info(&session, private, None))
            .and_then(|k| k.ok_or_else(|| self.bad_data("the new key cannot be read back".into())));
        if made.is_err() {
            // A key mxhsm could not check is not left behind.
            let _ = self.destroy_pair(&session, &id, &label);
        }
        made
    }

    fn import(
        &self,
        user_id: &str,
        role: KeyRole,
        secret: SecretKeyBytes,
        _options: &KeyOptions,
    ) -> Result<KeyInfo, TokenError> {
        check_user_id(user_id)?;
        self.forget(user_id);
        let algorithm = role.algorithm();
        let (key_type, params) = self.key_params(algorithm)?;
        if !self.capabilities.import {
            return Err(self.unsupported("key import (the token is write-protected)"));
        }
        let public_key = secret.public_key(algorithm);
        let label = key_label(user_id, role);
        let id = new_key_id()?;
        // The PIN before the secret goes into a template (an early return must not skip
        // the zeroizing below).
        self.login()?;
        self.index_before_create(&*self.session()?)?;
        let subject = index::subject_of(user_id);
        let mut private = vec![
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::KeyType(key_type),
            Attribute::EcParams(params.to_vec()),
            Attribute::Value(secret.expose().to_vec()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Label(label.clone().into_bytes()),
            Attribute::Id(id.clone()),
            Attribute::Subject(subject.clone()),
        ];
        private.extend(private_usage(algorithm));
        drop(secret);
        let created = self.session().and_then(|session| {
            with_optional_attributes(&[], &private, |_, private| {
                session.create_object(private).map(|h| (h, h))
            })
            .map(|(h, _)| h)
            .map_err(self.dev("C_CreateObject (private key)"))
        });
        for a in private.iter_mut() {
            if let Attribute::Value(v) = a {
                v.zeroize();
            }
        }
        let priv_handle = created?;
        let session = self.session()?;
        let mut public = vec![
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::KeyType(key_type),
            Attribute::EcParams(params.to_vec()),
            Attribute::EcPoint(ec::encode_point(public_key.as_bytes())),
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Label(label.clone().into_bytes()),
            Attribute::Id(id.clone()),
            Attribute::Subject(subject),
        ];
        public.extend(public_usage(algorithm));
        let checked = with_optional_attributes(&public, &[], |public, _| {
            session.create_object(public).map(|h| (h, h))
        })
        .map_err(self.dev("C_CreateObject (public key)"))
        .and_then(|(h, _)| self.index_after_create(&session, &[h, priv_handle]))
        .inspect(|_| {
            tracing::info!(
                "C_CreateObject: imported a key pair on {}",
                crate::text::escape(&self.summary.to_string())
            )
        })
        .and_then(|_| {
            self.key_info(&session, priv_handle, None)?
                .ok_or_else(|| self.bad_data("the imported key cannot be read back".into()))
        });
        drop(session);
        let checked = checked.and_then(|key| self.prove(&key, &public_key).map(|_| key));
        if checked.is_err() {
            // Nothing half-imported stays behind.
            if let Ok(session) = self.session() {
                let _ = self.destroy_pair(&session, &id, &label);
            }
        }
        checked
    }

    fn sign_ed25519(&self, key: &KeyInfo, message: &[u8]) -> Result<[u8; 64], TokenError> {
        if key.algorithm() != KeyAlgorithm::Ed25519 {
            return Err(TokenError::WrongAlgorithm {
                role: key.role,
                operation: "sign",
            });
        }
        self.login()?;
        let session = self.session()?;
        let handle = self.private_handle(&session, key)?;
        let sig = session
            .sign(
                &Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure)),
                handle,
                message,
            )
            .map_err(self.dev("C_Sign (EdDSA)"))?;
        tracing::debug!(
            "C_Sign (EdDSA) with the {} key of {}: {} bytes signed",
            key.role,
            crate::text::escape(&key.user_id),
            message.len()
        );
        let sig: [u8; 64] = sig
            .as_slice()
            .try_into()
            .map_err(|_| self.bad_data(format!("an Ed25519 signature of {} bytes", sig.len())))?;
        // A signature that does not verify is never handed on (it would be published).
        if !key.ed25519()?.verify(message, &sig) {
            return Err(self.bad_data(format!(
                "the {} key of {} made a signature that does not verify with its public key",
                key.role, key.user_id
            )));
        }
        Ok(sig)
    }

    fn x25519(
        &self,
        key: &KeyInfo,
        peer_public: &Curve25519PublicKey,
    ) -> Result<SharedSecret, TokenError> {
        if key.algorithm() != KeyAlgorithm::X25519 {
            return Err(TokenError::WrongAlgorithm {
                role: key.role,
                operation: "do X25519",
            });
        }
        self.login()?;
        let session = self.session()?;
        let handle = self.private_handle(&session, key)?;
        let (mechanism, template) = ecdh_derive(peer_public);
        let derived = session
            .derive_key(&mechanism, handle, &template)
            .map_err(self.dev("C_DeriveKey (ECDH)"))?;
        tracing::trace!(
            "C_DeriveKey (ECDH) with the {} key of {}",
            key.role,
            crate::text::escape(&key.user_id)
        );
        // The secret is read once from a session object that is destroyed right after.
        let read = session.get_attributes(derived, &[AttributeType::Value]);
        let destroyed = session.destroy_object(derived);
        let mut value = read
            .map_err(self.dev("C_GetAttributeValue (derived secret)"))?
            .into_iter()
            .find_map(|a| match a {
                Attribute::Value(v) => Some(v),
                _ => None,
            })
            .ok_or_else(|| self.bad_data("the derived secret has no readable value".into()))?;
        destroyed.map_err(self.dev("C_DestroyObject (derived secret)"))?;
        let result = <[u8; 32]>::try_from(value.as_slice())
            .map_err(|_| self.bad_data(format!("an X25519 secret of {} bytes", value.len())));
        value.zeroize();
        SharedSecret::new(result?)
    }

    fn delete(&self, key: &KeyInfo) -> Result<(), TokenError> {
        let KeyBackend::Pkcs11 { id, label, .. } = &key.backend else {
            return Err(self.other_token(key));
        };
        self.forget(&key.user_id);
        self.login()?;
        let session = self.session()?;
        if self.destroy_pair(&session, id, label)? == 0 {
            return Err(TokenError::KeyNotFound {
                user_id: key.user_id.clone(),
                role: key.role,
                token: self.summary.to_string(),
            });
        }
        Ok(())
    }
}
