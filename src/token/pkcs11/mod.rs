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

pub mod ec;
pub mod uri;

use std::collections::HashMap;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::elliptic_curve::{EcKdf, Ecdh1DeriveParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::{Slot, TokenInfo};
use zeroize::Zeroize;

use self::ec::Curve;
pub use self::uri::Pkcs11Uri;
use super::pin::{NoPins, PinProvider, PinRequest, PinStatus, read_pin_file};
use super::{
    Capabilities, Curve25519PublicKey, KeyAlgorithm, KeyBackend, KeyInfo, KeyOptions, KeyOrigin,
    KeyProtection, KeyRole, KeyStore, PublicKey, SecretKeyBytes, SharedSecret, TokenError,
    TokenSummary, X25519Mechanism, check_user_id,
};

/// Environment variable naming the default PKCS#11 module when a URI has none.
pub const MODULE_ENV: &str = "MXHSM_PKCS11_MODULE";

/// Directories searched for `module-name=` (RFC 7512 leaves the search to the consumer).
const MODULE_DIRS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/pkcs11",
    "/usr/lib/aarch64-linux-gnu/pkcs11",
    "/usr/lib/pkcs11",
    "/usr/lib/softhsm",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib64/pkcs11",
    "/usr/local/lib",
];

const LABEL_PREFIX: &str = "mxhsm:";
/// How often the slot list is read before a token is declared absent (see `open`).
const ENUMERATION_TRIES: u32 = 5;
const ID_MAGIC: &[u8; 3] = b"mx\x01";

/// The label of every object of (`user_id`, `role`).
pub fn key_label(user_id: &str, role: KeyRole) -> String {
    format!("{LABEL_PREFIX}{}:{user_id}", role.as_str())
}

fn parse_label(label: &str) -> Option<(KeyRole, &str)> {
    let rest = label.strip_prefix(LABEL_PREFIX)?;
    let (role, user) = rest.split_once(':')?;
    Some((role.parse().ok()?, user))
}

fn new_key_id() -> Result<Vec<u8>, TokenError> {
    let now = super::now_ms();
    let mut random = [0u8; 4];
    getrandom::fill(&mut random).map_err(|e| TokenError::NoRandomness(e.to_string()))?;
    let mut id = ID_MAGIC.to_vec();
    id.extend_from_slice(&now.to_be_bytes());
    id.extend_from_slice(&random);
    Ok(id)
}

/// Generated on the token (`CKA_LOCAL`) or imported.
/// What a label names (role, user ID) and how the key does X25519.
type Identified = (KeyRole, String, Option<X25519Mechanism>);

fn origin(local: Option<bool>) -> KeyOrigin {
    match local {
        Some(true) => KeyOrigin::Generated,
        Some(false) => KeyOrigin::Imported,
        None => KeyOrigin::Unknown,
    }
}

fn created_from_id(id: &[u8]) -> Option<u64> {
    let rest = id.strip_prefix(ID_MAGIC.as_slice())?;
    let ms: [u8; 8] = rest.get(..8)?.try_into().ok()?;
    Some(u64::from_be_bytes(ms))
}

/// Every loaded module, initialised once and kept for the life of the process:
/// `C_Initialize` may be called only once per module, and unloading SoftHSM without
/// `C_Finalize` is not safe.
fn modules() -> &'static Mutex<HashMap<PathBuf, Pkcs11>> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    MODULES.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Loads and initialises the PKCS#11 module at `path` (once per process).
pub fn load_module(path: &Path) -> Result<Pkcs11, TokenError> {
    let shown = path.display().to_string();
    let canonical = path
        .canonicalize()
        .map_err(|_| TokenError::ModuleNotFound {
            path: shown.clone(),
        })?;
    let mut map = modules().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(ctx) = map.get(&canonical) {
        return Ok(ctx.clone());
    }
    let ctx = Pkcs11::new(&canonical).map_err(|e| TokenError::ModuleLoad {
        path: shown.clone(),
        reason: e.to_string(),
    })?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => {
            return Err(TokenError::ModuleLoad {
                path: shown,
                reason: format!("C_Initialize: {e}"),
            });
        }
    }
    map.insert(canonical, ctx.clone());
    Ok(ctx)
}

/// The module a URI names: `module-path`, `module-name` (searched in the usual
/// directories), or the `MXHSM_PKCS11_MODULE` environment variable.
pub fn resolve_module_path(uri: &Pkcs11Uri) -> Result<PathBuf, TokenError> {
    if let Some(p) = &uri.module_path {
        return Ok(p.clone());
    }
    if let Some(name) = &uri.module_name {
        let file = if name.ends_with(".so") {
            name.clone()
        } else {
            format!("{name}.so")
        };
        return MODULE_DIRS
            .iter()
            .map(|d| Path::new(d).join(&file))
            .find(|p| p.exists())
            .ok_or_else(|| TokenError::ModuleNotFound {
                path: format!("{file} (module-name, searched {})", MODULE_DIRS.join(", ")),
            });
    }
    if let Some(p) = std::env::var_os(MODULE_ENV) {
        return Ok(PathBuf::from(p));
    }
    Err(TokenError::InvalidUri {
        uri: uri.original.clone(),
        reason: format!("no module: add ?module-path=/path/to/module.so or set {MODULE_ENV}"),
    })
}

/// The process lock for `module`, if it is a file-backed software token (see
/// `process_lock`).
fn soft_token_lock(module: &Path) -> Result<Option<std::fs::File>, TokenError> {
    match super::process_lock::soft_token_config_var(module) {
        Some(var) if module.exists() => super::process_lock::lock_soft_token(module, var).map(Some),
        _ => Ok(None),
    }
}

fn is_softhsm(manufacturer: &str) -> bool {
    manufacturer.trim().starts_with("SoftHSM")
}

fn pin_status(info: &TokenInfo) -> PinStatus {
    PinStatus {
        count_low: info.user_pin_count_low(),
        final_try: info.user_pin_final_try(),
        locked: info.user_pin_locked(),
        retries: None,
    }
}

fn summary_of(info: &TokenInfo, module: &Path) -> TokenSummary {
    TokenSummary {
        manufacturer: info.manufacturer_id().trim().to_string(),
        model: info.model().trim().to_string(),
        label: info.label().trim().to_string(),
        serial: info.serial_number().trim().to_string(),
        source: module.display().to_string(),
    }
}

/// Probes what a token can do from its mechanism list.
fn probe(ctx: &Pkcs11, slot: Slot, info: &TokenInfo) -> Result<Capabilities, CkError> {
    let mechs = ctx.get_mechanism_list(slot)?;
    let has = |m: MechanismType| mechs.contains(&m);
    let edwards_gen = has(MechanismType::ECC_EDWARDS_KEY_PAIR_GEN);
    let derive = has(MechanismType::ECDH1_DERIVE);
    let x25519 = if has(MechanismType::ECC_MONTGOMERY_KEY_PAIR_GEN) && derive {
        Some(X25519Mechanism::Montgomery)
    } else if is_softhsm(info.manufacturer_id()) && edwards_gen && derive {
        Some(X25519Mechanism::SoftHsmEdwards)
    } else {
        None
    };
    Ok(Capabilities {
        ed25519: edwards_gen && has(MechanismType::EDDSA),
        x25519,
        import: !info.write_protected(),
    })
}

/// Turns a cryptoki error of `operation` on the module at `module` into a [`TokenError`].
fn module_error(module: &Path, operation: &'static str) -> impl Fn(CkError) -> TokenError {
    let module = module.display().to_string();
    move |e| TokenError::Device {
        token: module.clone(),
        operation: operation.to_string(),
        reason: e.to_string(),
    }
}

/// One token as `mxhsm token list` shows it.
#[derive(Debug, Clone)]
pub struct TokenEntry {
    pub slot_id: u64,
    pub slot_description: String,
    pub summary: TokenSummary,
    /// `None` for a slot whose token is not initialised (e.g. SoftHSM's spare slot).
    pub capabilities: Option<Capabilities>,
    pub pin_status: PinStatus,
    pub uri: String,
}

/// Every slot with a token in the module at `path`.
pub fn list_tokens(path: &Path) -> Result<Vec<TokenEntry>, TokenError> {
    let _lock = soft_token_lock(path)?;
    let ctx = load_module(path)?;
    let dev = |op| module_error(path, op);
    let mut out = Vec::new();
    for slot in ctx.get_slots_with_token().map_err(dev("C_GetSlotList"))? {
        let sinfo = ctx.get_slot_info(slot).map_err(dev("C_GetSlotInfo"))?;
        let tinfo = ctx.get_token_info(slot).map_err(dev("C_GetTokenInfo"))?;
        let summary = summary_of(&tinfo, path);
        let capabilities = if tinfo.token_initialized() {
            Some(probe(&ctx, slot, &tinfo).map_err(dev("C_GetMechanismList"))?)
        } else {
            None
        };
        out.push(TokenEntry {
            slot_id: slot.id(),
            slot_description: sinfo.slot_description().trim().to_string(),
            uri: Pkcs11Uri::for_token(&summary.label, &summary.serial, &path.display().to_string()),
            summary,
            capabilities,
            pin_status: pin_status(&tinfo),
        });
    }
    Ok(out)
}

/// A logged-in PKCS#11 token holding mxhsm keys.
pub struct Pkcs11Store {
    ctx: Pkcs11,
    slot: Slot,
    summary: TokenSummary,
    capabilities: Capabilities,
    pin_status_before_login: PinStatus,
    /// Held while this store lives, for software tokens (see `process_lock`).
    _process_lock: Option<std::fs::File>,
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
    /// Private-key handles by `CKA_ID`, so repeated operations skip `C_FindObjects`.
    handles: Mutex<HashMap<Vec<u8>, ObjectHandle>>,
}

impl std::fmt::Debug for Pkcs11Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Store")
            .field("summary", &self.summary)
            .field("capabilities", &self.capabilities)
            .finish_non_exhaustive()
    }
}

/// Where the login stands. A refused PIN is never sent twice.
enum LoginState {
    Pending { protected_path: bool },
    Done,
    Refused(String),
}

struct PooledSession<'a> {
    store: &'a Pkcs11Store,
    session: Option<Session>,
}

impl Deref for PooledSession<'_> {
    type Target = Session;
    fn deref(&self) -> &Session {
        // Only `None` after drop.
        self.session.as_ref().expect("session present until drop")
    }
}

impl Drop for PooledSession<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            self.store
                .pool
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(s);
        }
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
        })
    }

    /// Logs in with the PIN from the provider given to [`Pkcs11Store::open_lazy`], unless
    /// that was done already.
    pub fn login(&self) -> Result<(), TokenError> {
        if self.is_logged_in() {
            return Ok(());
        }
        match self.pins.clone() {
            Some(p) => self.login_with(&*p),
            None => self.login_with(&NoPins),
        }
    }

    /// Whether the session is logged in (or the token needs no login).
    pub fn is_logged_in(&self) -> bool {
        self.logged_in.load(Ordering::Acquire)
    }

    /// Logs in once with a PIN from `pins` (the URI's `pin-source` first). A refused PIN
    /// is remembered: it is never sent a second time by this store.
    pub fn login_with(&self, pins: &dyn PinProvider) -> Result<(), TokenError> {
        let mut state = self.login.lock().unwrap_or_else(|e| e.into_inner());
        let protected_path = match &*state {
            LoginState::Done => return Ok(()),
            LoginState::Refused(reason) => {
                return Err(TokenError::NoPin {
                    token: self.summary.to_string(),
                    reason: reason.clone(),
                });
            }
            LoginState::Pending { protected_path } => *protected_path,
        };
        let token = self.summary.to_string();
        let status = self.pin_status_before_login;
        if status.locked {
            return Err(TokenError::PinLocked { token });
        }
        let session = self.session()?;
        let login = if protected_path {
            // A PIN pad on the device: the PIN is entered there.
            session.login(UserType::User, None)
        } else {
            let pin = match &self.pin_source {
                Some(p) => read_pin_file(p)?,
                None => pins.pin(&PinRequest {
                    token: token.clone(),
                    status,
                })?,
            };
            session.login(UserType::User, Some(&pin))
        };
        let refused = |state: &mut LoginState, e: TokenError| {
            *state = LoginState::Refused(format!(
                "the token refused the PIN earlier ({e}); it is not sent again"
            ));
            Err(e)
        };
        match login {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {
                *state = LoginState::Done;
                self.logged_in.store(true, Ordering::Release);
                Ok(())
            }
            Err(CkError::Pkcs11(RvError::PinIncorrect, _))
            | Err(CkError::Pkcs11(RvError::PinInvalid, _))
            | Err(CkError::Pkcs11(RvError::PinLenRange, _)) => {
                let after = self
                    .ctx
                    .get_token_info(self.slot)
                    .map(|i| pin_status(&i))
                    .unwrap_or_default();
                let e = if after.locked {
                    TokenError::PinLocked { token }
                } else {
                    TokenError::WrongPin {
                        token,
                        status: after,
                    }
                };
                refused(&mut state, e)
            }
            Err(CkError::Pkcs11(RvError::PinLocked, _)) => {
                refused(&mut state, TokenError::PinLocked { token })
            }
            Err(e) => Err(self.dev("C_Login")(e)),
        }
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

    /// What the token said about its PIN retry counter before this login (a warning for
    /// the user when someone has been trying PINs).
    pub fn pin_status_before_login(&self) -> PinStatus {
        self.pin_status_before_login
    }

    fn session(&self) -> Result<PooledSession<'_>, TokenError> {
        let pooled = self.pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let session = match pooled {
            Some(s) => s,
            None => self
                .ctx
                .open_rw_session(self.slot)
                .map_err(self.dev("C_OpenSession"))?,
        };
        Ok(PooledSession {
            store: self,
            session: Some(session),
        })
    }

    fn dev(&self, operation: &str) -> impl Fn(CkError) -> TokenError + '_ {
        let operation = operation.to_string();
        move |e| TokenError::Device {
            token: self.summary.to_string(),
            operation: operation.clone(),
            reason: e.to_string(),
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

    fn unsupported(&self, what: &str) -> TokenError {
        TokenError::Unsupported {
            token: self.summary.to_string(),
            what: what.to_string(),
        }
    }

    /// Key type and `CKA_EC_PARAMS` for new keys of `algorithm` on this token.
    fn key_params(&self, algorithm: KeyAlgorithm) -> Result<(KeyType, &'static [u8]), TokenError> {
        match algorithm {
            KeyAlgorithm::Ed25519 if self.capabilities.ed25519 => {
                Ok((KeyType::EC_EDWARDS, ec::OID_ED25519))
            }
            KeyAlgorithm::Ed25519 => Err(self.unsupported(
                "Ed25519 (the module lists no CKM_EC_EDWARDS_KEY_PAIR_GEN + CKM_EDDSA)",
            )),
            KeyAlgorithm::X25519 => match self.capabilities.x25519 {
                Some(X25519Mechanism::Montgomery) => Ok((KeyType::EC_MONTGOMERY, ec::OID_X25519)),
                Some(X25519Mechanism::SoftHsmEdwards) => Ok((KeyType::EC_EDWARDS, ec::OID_X25519)),
                _ => Err(self.unsupported(
                    "X25519 (the module lists no CKM_EC_MONTGOMERY_KEY_PAIR_GEN + CKM_ECDH1_DERIVE); the backup key needs it",
                )),
            },
        }
    }

    fn private_handle(&self, session: &Session, key: &KeyInfo) -> Result<ObjectHandle, TokenError> {
        let KeyBackend::Pkcs11 { id, label, .. } = &key.backend else {
            return Err(self.other_token(key));
        };
        if let Some(h) = self
            .handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
        {
            return Ok(*h);
        }
        let found = session
            .find_objects(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::Id(id.clone()),
                Attribute::Label(label.as_bytes().to_vec()),
            ])
            .map_err(self.dev("C_FindObjects"))?;
        let handle = *found.first().ok_or_else(|| TokenError::KeyNotFound {
            user_id: key.user_id.clone(),
            role: key.role,
            token: self.summary.to_string(),
        })?;
        self.handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), handle);
        Ok(handle)
    }

    /// Reads a key back from its private-key object and the public-key object paired with it.
    fn key_info(
        &self,
        session: &Session,
        private: ObjectHandle,
    ) -> Result<Option<KeyInfo>, TokenError> {
        let attrs = session
            .get_attributes(
                private,
                &[
                    AttributeType::Label,
                    AttributeType::Id,
                    AttributeType::KeyType,
                    AttributeType::EcParams,
                    AttributeType::Token,
                    AttributeType::Private,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::AlwaysSensitive,
                    AttributeType::NeverExtractable,
                    AttributeType::Local,
                    AttributeType::Sign,
                    AttributeType::Derive,
                    AttributeType::Decrypt,
                    AttributeType::Unwrap,
                    AttributeType::SignRecover,
                    AttributeType::Modifiable,
                    AttributeType::Copyable,
                ],
            )
            .map_err(self.dev("C_GetAttributeValue"))?;
        let mut label = None;
        let mut id = None;
        let mut key_type = None;
        let mut curve = None;
        let mut p = KeyProtection::default();
        for a in attrs {
            match a {
                Attribute::Label(v) => label = String::from_utf8(v).ok(),
                Attribute::Id(v) => id = Some(v),
                Attribute::KeyType(t) => key_type = Some(t),
                Attribute::EcParams(v) => curve = ec::curve_from_params(&v),
                Attribute::Token(b) => p.token = Some(b),
                Attribute::Private(b) => p.private = Some(b),
                Attribute::Sensitive(b) => p.sensitive = Some(b),
                Attribute::Extractable(b) => p.extractable = Some(b),
                Attribute::AlwaysSensitive(b) => p.always_sensitive = Some(b),
                Attribute::NeverExtractable(b) => p.never_extractable = Some(b),
                Attribute::Local(b) => p.local = Some(b),
                Attribute::Sign(b) => p.sign = Some(b),
                Attribute::Derive(b) => p.derive = Some(b),
                Attribute::Decrypt(b) => p.decrypt = Some(b),
                Attribute::Unwrap(b) => p.unwrap = Some(b),
                Attribute::SignRecover(b) => p.sign_recover = Some(b),
                Attribute::Modifiable(b) => p.modifiable = Some(b),
                Attribute::Copyable(b) => p.copyable = Some(b),
                _ => {}
            }
        }
        let Some(label) = label else { return Ok(None) };
        let Some(identified) = self.identify(&label, curve, key_type)? else {
            return Ok(None);
        };
        let id = id.unwrap_or_default();
        let public = session
            .find_objects(&[
                Attribute::Class(ObjectClass::PUBLIC_KEY),
                Attribute::Id(id.clone()),
                Attribute::Label(label.as_bytes().to_vec()),
            ])
            .map_err(self.dev("C_FindObjects"))?;
        let point = match public.first() {
            Some(h) => session
                .get_attributes(*h, &[AttributeType::EcPoint])
                .map_err(self.dev("C_GetAttributeValue"))?,
            // Some tokens keep the point on the private object too.
            None => session
                .get_attributes(private, &[AttributeType::EcPoint])
                .map_err(self.dev("C_GetAttributeValue"))?,
        };
        let point = point.into_iter().find_map(|a| match a {
            Attribute::EcPoint(v) => ec::decode_point(&v),
            _ => None,
        });
        let local = p.local;
        self.described(label, id, identified, point, local, p)
            .map(Some)
    }

    /// The [`KeyInfo`] of an mxhsm key object, from what its attributes said.
    fn described(
        &self,
        label: String,
        id: Vec<u8>,
        (role, user_id, x25519_mechanism): Identified,
        point: Option<[u8; 32]>,
        local: Option<bool>,
        protection: KeyProtection,
    ) -> Result<KeyInfo, TokenError> {
        let point = point.ok_or_else(|| {
            self.bad_data(format!(
                "no readable public key (CKA_EC_POINT) for {label:?}"
            ))
        })?;
        let public_key = PublicKey::new(role.algorithm(), &point)
            .map_err(|e| self.bad_data(format!("the public key of {label:?}: {e}")))?;
        Ok(KeyInfo {
            user_id,
            role,
            created_ms: created_from_id(&id),
            public_key,
            origin: origin(local),
            protection,
            backend: KeyBackend::Pkcs11 {
                id,
                label,
                x25519: x25519_mechanism,
            },
        })
    }

    /// Whose key of which role an object with `label` is (`None`: not an mxhsm label),
    /// checked to be on the role's curve, and how it does X25519.
    fn identify(
        &self,
        label: &str,
        curve: Option<Curve>,
        key_type: Option<KeyType>,
    ) -> Result<Option<Identified>, TokenError> {
        let Some((role, user_id)) = parse_label(label) else {
            return Ok(None);
        };
        let expected_curve = match role.algorithm() {
            KeyAlgorithm::Ed25519 => Curve::Ed25519,
            KeyAlgorithm::X25519 => Curve::X25519,
        };
        if curve != Some(expected_curve) {
            return Err(self.bad_data(format!(
                "the {role} key {label:?} is not on curve {expected_curve:?}"
            )));
        }
        let mechanism = match (role.algorithm(), key_type) {
            (KeyAlgorithm::X25519, Some(KeyType::EC_MONTGOMERY)) => {
                Some(X25519Mechanism::Montgomery)
            }
            (KeyAlgorithm::X25519, Some(KeyType::EC_EDWARDS)) => {
                Some(X25519Mechanism::SoftHsmEdwards)
            }
            _ => None,
        };
        Ok(Some((role, user_id.to_string(), mechanism)))
    }

    /// A key as its public-key object shows it (before login): no protection attributes.
    fn public_key_info(
        &self,
        session: &Session,
        public: ObjectHandle,
    ) -> Result<Option<KeyInfo>, TokenError> {
        let attrs = session
            .get_attributes(
                public,
                &[
                    AttributeType::Label,
                    AttributeType::Id,
                    AttributeType::KeyType,
                    AttributeType::EcParams,
                    AttributeType::EcPoint,
                    AttributeType::Local,
                ],
            )
            .map_err(self.dev("C_GetAttributeValue"))?;
        let (mut label, mut id, mut key_type, mut curve, mut point, mut local) =
            (None, None, None, None, None, None);
        for a in attrs {
            match a {
                Attribute::Label(v) => label = String::from_utf8(v).ok(),
                Attribute::Id(v) => id = Some(v),
                Attribute::KeyType(t) => key_type = Some(t),
                Attribute::EcParams(v) => curve = ec::curve_from_params(&v),
                Attribute::EcPoint(v) => point = ec::decode_point(&v),
                Attribute::Local(b) => local = Some(b),
                _ => {}
            }
        }
        let Some(label) = label else { return Ok(None) };
        let Some(identified) = self.identify(&label, curve, key_type)? else {
            return Ok(None);
        };
        let id = id.unwrap_or_default();
        self.described(
            label,
            id,
            identified,
            point,
            local,
            KeyProtection::default(),
        )
        .map(Some)
    }

    /// Checks that the token holds the private key of `expected` (after an import): a
    /// signature that verifies, or an agreement that matches software.
    fn prove(&self, key: &KeyInfo, expected_public: &PublicKey) -> Result<(), TokenError> {
        if &key.public_key != expected_public {
            return Err(
                self.bad_data("the stored public key differs from the imported key's".into())
            );
        }
        match key.algorithm() {
            KeyAlgorithm::Ed25519 => {
                let challenge = b"mxhsm import check";
                let sig = self.sign_ed25519(key, challenge)?;
                if key.ed25519()?.verify(challenge, &sig) {
                    Ok(())
                } else {
                    Err(self.bad_data("a signature by the imported key does not verify".into()))
                }
            }
            KeyAlgorithm::X25519 => {
                let mut seed = [0u8; 32];
                getrandom::fill(&mut seed).map_err(|e| TokenError::NoRandomness(e.to_string()))?;
                let eph = x25519_dalek::StaticSecret::from(seed);
                seed.zeroize();
                let eph_pub = x25519_dalek::PublicKey::from(&eph);
                let on_token =
                    self.x25519(key, &Curve25519PublicKey::from_bytes(eph_pub.to_bytes()))?;
                let soft =
                    eph.diffie_hellman(&x25519_dalek::PublicKey::from(*expected_public.as_bytes()));
                if on_token.expose() == soft.as_bytes() {
                    Ok(())
                } else {
                    Err(self.bad_data("an agreement with the imported key does not match".into()))
                }
            }
        }
    }

    /// Generates a key pair; `persistent` = token objects (false: session objects that
    /// vanish with the session, for self-tests and benchmarks).
    fn generate_objects(
        &self,
        session: &Session,
        algorithm: KeyAlgorithm,
        label: &str,
        id: Vec<u8>,
        persistent: bool,
    ) -> Result<(ObjectHandle, ObjectHandle), TokenError> {
        let (key_type, params) = self.key_params(algorithm)?;
        let mechanism = match key_type {
            KeyType::EC_MONTGOMERY => Mechanism::EccMontgomeryKeyPairGen,
            _ => Mechanism::EccEdwardsKeyPairGen,
        };
        let label = label.as_bytes().to_vec();
        let mut public = vec![
            Attribute::Token(persistent),
            Attribute::Private(false),
            Attribute::KeyType(key_type),
            Attribute::EcParams(params.to_vec()),
            Attribute::Label(label.clone()),
            Attribute::Id(id.clone()),
        ];
        public.extend(public_usage(algorithm));
        let mut private = vec![
            Attribute::Token(persistent),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::KeyType(key_type),
            Attribute::Label(label),
            Attribute::Id(id),
        ];
        private.extend(private_usage(algorithm));
        with_optional_attributes(&public, &private, |public, private| {
            session.generate_key_pair(&mechanism, public, private)
        })
        .map_err(self.dev("C_GenerateKeyPair"))
    }

    /// Generates a temporary key pair as session objects (`CKA_TOKEN` = false): it is gone
    /// when mxhsm exits, or at once with [`KeyStore::delete`]. For self-tests and
    /// benchmarks; nothing persistent is touched.
    pub fn generate_session_key(&self, algorithm: KeyAlgorithm) -> Result<KeyInfo, TokenError> {
        self.login()?;
        let session = self.session()?;
        let (role, label) = match algorithm {
            KeyAlgorithm::Ed25519 => (KeyRole::Master, "mxhsm-selftest:ed25519"),
            KeyAlgorithm::X25519 => (KeyRole::Backup, "mxhsm-selftest:x25519"),
        };
        let id = new_key_id()?;
        let (public, private) =
            self.generate_objects(&session, algorithm, label, id.clone(), false)?;
        let point = session
            .get_attributes(public, &[AttributeType::EcPoint])
            .map_err(self.dev("C_GetAttributeValue"))?;
        let point = point
            .into_iter()
            .find_map(|a| match a {
                Attribute::EcPoint(v) => ec::decode_point(&v),
                _ => None,
            })
            .ok_or_else(|| self.bad_data("no readable CKA_EC_POINT on a new key".into()))?;
        let public_key = PublicKey::new(algorithm, &point)
            .map_err(|e| self.bad_data(format!("the public key of a new key: {e}")))?;
        let key = KeyInfo {
            user_id: "@mxhsm-selftest:localhost".into(),
            role,
            created_ms: created_from_id(&id),
            public_key,
            origin: KeyOrigin::Generated,
            protection: KeyProtection::default(),
            backend: KeyBackend::Pkcs11 {
                id: id.clone(),
                label: label.to_string(),
                x25519: self
                    .capabilities
                    .x25519
                    .filter(|_| algorithm == KeyAlgorithm::X25519),
            },
        };
        self.handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, private);
        Ok(key)
    }

    fn destroy_pair(&self, session: &Session, id: &[u8], label: &str) -> Result<usize, TokenError> {
        let found = session
            .find_objects(&[
                Attribute::Id(id.to_vec()),
                Attribute::Label(label.as_bytes().to_vec()),
            ])
            .map_err(self.dev("C_FindObjects"))?;
        for h in &found {
            session
                .destroy_object(*h)
                .map_err(self.dev("C_DestroyObject"))?;
        }
        self.handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        Ok(found.len())
    }
}

/// What a private key may do: sign (Ed25519) or derive (X25519), and nothing else —
/// decryption, unwrapping, signing with recovery are switched off explicitly rather than
/// left to the token's defaults (SoftHSM sets some of them), and the object can be neither
/// modified nor copied.
fn private_usage(algorithm: KeyAlgorithm) -> [Attribute; 7] {
    let ed = algorithm == KeyAlgorithm::Ed25519;
    [
        Attribute::Sign(ed),
        Attribute::Derive(!ed),
        Attribute::Decrypt(false),
        Attribute::Unwrap(false),
        Attribute::SignRecover(false),
        Attribute::Modifiable(false),
        Attribute::Copyable(false),
    ]
}

/// What a public key may do: verify (Ed25519), nothing for X25519.
fn public_usage(algorithm: KeyAlgorithm) -> [Attribute; 6] {
    [
        Attribute::Verify(algorithm == KeyAlgorithm::Ed25519),
        Attribute::Encrypt(false),
        Attribute::Wrap(false),
        Attribute::VerifyRecover(false),
        Attribute::Derive(false),
        Attribute::Modifiable(false),
    ]
}

/// Attributes that only restrict a key further, which a token may not know (CKA_COPYABLE
/// came with PKCS#11 2.40) or may refuse to set at creation. Dropped, in stages, only when
/// the token refuses the template; the doctor reports what the key ended up with.
fn optional_stage(a: &Attribute) -> Option<u8> {
    match a {
        Attribute::Copyable(_) => Some(1),
        Attribute::Modifiable(_) => Some(2),
        Attribute::Decrypt(false)
        | Attribute::Unwrap(false)
        | Attribute::SignRecover(false)
        | Attribute::Encrypt(false)
        | Attribute::Wrap(false)
        | Attribute::VerifyRecover(false)
        | Attribute::Derive(false)
        | Attribute::Sign(false)
        | Attribute::Verify(false) => Some(3),
        _ => None,
    }
}

/// Runs `create` with the full templates; if the token refuses an attribute, again with
/// the optional ones left out stage by stage. Copies holding `CKA_VALUE` are zeroized.
fn with_optional_attributes<T>(
    public: &[Attribute],
    private: &[Attribute],
    create: impl Fn(&[Attribute], &[Attribute]) -> Result<T, CkError>,
) -> Result<T, CkError> {
    let first = match create(public, private) {
        Ok(v) => return Ok(v),
        Err(e) => e,
    };
    let refused_attribute = |e: &CkError| {
        matches!(
            e,
            CkError::Pkcs11(
                RvError::AttributeTypeInvalid
                    | RvError::AttributeValueInvalid
                    | RvError::AttributeReadOnly
                    | RvError::TemplateInconsistent,
                _
            )
        )
    };
    if !refused_attribute(&first) {
        return Err(first);
    }
    for stage in 1..=3u8 {
        let keep = |a: &&Attribute| optional_stage(a).is_none_or(|s| s > stage);
        let public: Vec<Attribute> = public.iter().filter(keep).cloned().collect();
        let mut private: Vec<Attribute> = private.iter().filter(keep).cloned().collect();
        let result = create(&public, &private);
        for a in private.iter_mut() {
            if let Attribute::Value(v) = a {
                v.zeroize();
            }
        }
        match result {
            Ok(v) => return Ok(v),
            Err(e) if refused_attribute(&e) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(first)
}

impl KeyStore for Pkcs11Store {
    fn summary(&self) -> &TokenSummary {
        &self.summary
    }

    fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    fn list_keys(&self, user_id: Option<&str>) -> Result<Vec<KeyInfo>, TokenError> {
        // Before login only the public halves are visible (CKA_PRIVATE = false): enough to
        // know which keys exist and their public keys; the protection attributes of the
        // private halves are read once logged in.
        let logged_in = self.is_logged_in();
        let class = if logged_in {
            ObjectClass::PRIVATE_KEY
        } else {
            ObjectClass::PUBLIC_KEY
        };
        let session = self.session()?;
        let handles = match user_id {
            Some(user) => {
                check_user_id(user)?;
                let mut all = Vec::new();
                for role in KeyRole::ALL {
                    all.extend(
                        session
                            .find_objects(&[
                                Attribute::Class(class),
                                Attribute::Label(key_label(user, role).into_bytes()),
                            ])
                            .map_err(self.dev("C_FindObjects"))?,
                    );
                }
                all
            }
            None => session
                .find_objects(&[Attribute::Class(class)])
                .map_err(self.dev("C_FindObjects"))?,
        };
        let mut keys = Vec::new();
        for h in handles {
            let key = if logged_in {
                self.key_info(&session, h)?
            } else {
                self.public_key_info(&session, h)?
            };
            if let Some(k) = key {
                keys.push(k);
            }
        }
        keys.sort_by(|a, b| {
            (&a.user_id, a.role, a.created_ms).cmp(&(&b.user_id, b.role, b.created_ms))
        });
        Ok(keys)
    }

    fn generate(
        &self,
        user_id: &str,
        role: KeyRole,
        _options: &KeyOptions,
    ) -> Result<KeyInfo, TokenError> {
        check_user_id(user_id)?;
        self.key_params(role.algorithm())?;
        self.login()?;
        let session = self.session()?;
        let label = key_label(user_id, role);
        let (_, private) =
            self.generate_objects(&session, role.algorithm(), &label, new_key_id()?, true)?;
        self.key_info(&session, private)?
            .ok_or_else(|| self.bad_data("the new key cannot be read back".into()))
    }

    fn import(
        &self,
        user_id: &str,
        role: KeyRole,
        secret: SecretKeyBytes,
        _options: &KeyOptions,
    ) -> Result<KeyInfo, TokenError> {
        check_user_id(user_id)?;
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
        ];
        public.extend(public_usage(algorithm));
        let checked = with_optional_attributes(&public, &[], |public, _| {
            session.create_object(public).map(|h| (h, h))
        })
        .map_err(self.dev("C_CreateObject (public key)"))
        .and_then(|_| {
            self.key_info(&session, priv_handle)?
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
        // Raw 32-byte peer key: Kryoptic refuses the DER form, ykcs11 needs exactly 32.
        let mechanism = Mechanism::Ecdh1Derive(Ecdh1DeriveParams::new(
            EcKdf::null(),
            peer_public.as_bytes(),
        ));
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::GENERIC_SECRET),
            Attribute::Token(false),
            Attribute::Sensitive(false),
            Attribute::Extractable(true),
            Attribute::ValueLen(32.into()),
        ];
        let derived = session
            .derive_key(&mechanism, handle, &template)
            .map_err(self.dev("C_DeriveKey (ECDH)"))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_round_trip() {
        for role in KeyRole::ALL {
            let l = key_label("@alice:example.org", role);
            assert_eq!(parse_label(&l), Some((role, "@alice:example.org")));
        }
        assert_eq!(
            key_label("@a:b", KeyRole::SelfSigning),
            "mxhsm:self_signing:@a:b"
        );
        assert_eq!(parse_label("other:master:@a:b"), None);
        assert_eq!(parse_label("mxhsm:bogus:@a:b"), None);
    }

    #[test]
    fn ids_carry_creation_time() {
        let id = new_key_id().unwrap();
        assert_eq!(id.len(), 15);
        let t = created_from_id(&id).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert!(now >= t && now - t < 60_000);
        assert_eq!(created_from_id(b"foreign-id"), None);
    }
}
