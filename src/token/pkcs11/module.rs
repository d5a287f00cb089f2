//! Loading a PKCS#11 module once per process, finding it on the usual paths, listing its
//! tokens, and probing what a token can do from its mechanism list.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::MechanismType;
use cryptoki::slot::{Slot, TokenInfo};

use super::uri::Pkcs11Uri;
use crate::token::pin::PinStatus;
use crate::token::{Capabilities, TokenError, TokenSummary, X25519Mechanism};

/// Environment variable naming the default PKCS#11 module when a URI has none.
pub const MODULE_ENV: &str = "MXHSM_PKCS11_MODULE";

/// Directories searched for `module-name=` (RFC 7512 leaves the search to the consumer) and
/// for the well-known modules: this system's multiarch library directories first.
pub(super) fn module_dirs() -> Vec<String> {
    let mut dirs = Vec::new();
    if let Some(t) = super::p11kit::multiarch() {
        for d in ["/pkcs11", "/softhsm", ""] {
            dirs.push(format!("/usr/lib/{t}{d}"));
        }
    }
    for d in [
        "/usr/lib/pkcs11",
        "/usr/lib/softhsm",
        "/usr/lib64/pkcs11",
        "/usr/lib64",
        "/usr/local/lib",
    ] {
        dirs.push(d.to_string());
    }
    dirs
}

/// Modules known to hold tokens, by file name: what `token list` looks for in
/// [`module_dirs`] when no module is named and p11-kit registers none.
const WELL_KNOWN_MODULES: &[&str] = &["libsofthsm2.so", "libykcs11.so", "opensc-pkcs11.so"];

/// A module to look in, and where mxhsm heard of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundModule {
    pub path: PathBuf,
    pub source: ModuleSource,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleSource {
    /// Named on the command line (`token list --module`).
    Named,
    /// The token URI (`--token` or `$MXHSM_TOKEN`).
    Uri,
    /// `$MXHSM_PKCS11_MODULE`.
    Env,
    /// A p11-kit module config file.
    P11Kit { name: String, config: PathBuf },
    /// A well-known module file in a standard directory.
    StandardPath,
}

impl std::fmt::Display for ModuleSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModuleSource::Named => f.write_str("--module"),
            ModuleSource::Uri => f.write_str("token URI"),
            ModuleSource::Env => write!(f, "${MODULE_ENV}"),
            ModuleSource::P11Kit { name, .. } => write!(f, "p11-kit {name}"),
            ModuleSource::StandardPath => f.write_str("standard path"),
        }
    }
}

/// The modules to look in when none is named: the module `uri` names, then
/// `$MXHSM_PKCS11_MODULE`, then the modules p11-kit registers, then the well-known modules
/// found in the standard directories. Each file appears once (a module linked into two
/// directories is one module), with the first source that named it.
pub fn default_modules(uri: Option<&Pkcs11Uri>) -> Vec<FoundModule> {
    let mut out: Vec<FoundModule> = Vec::new();
    let mut seen = Vec::new();
    let mut add = |path: PathBuf, source: ModuleSource| {
        let real = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
        if !seen.contains(&real) {
            seen.push(real);
            out.push(FoundModule { path, source });
        }
    };
    if let Some(p) = uri.and_then(|u| resolve_module_path(u).ok()) {
        add(p, ModuleSource::Uri);
    }
    if let Some(p) = std::env::var_os(MODULE_ENV) {
        add(PathBuf::from(p), ModuleSource::Env);
    }
    for m in super::p11kit::registered() {
        if m.path.exists() {
            add(
                m.path,
                ModuleSource::P11Kit {
                    name: m.name,
                    config: m.config,
                },
            );
        }
    }
    let dirs = module_dirs();
    for name in WELL_KNOWN_MODULES {
        for dir in &dirs {
            let p = Path::new(dir).join(name);
            if p.exists() {
                add(p, ModuleSource::StandardPath);
            }
        }
    }
    out
}

/// Every loaded module, initialised once and kept for the life of the process:
/// `C_Initialize` may be called only once per module, and unloading SoftHSM without
/// `C_Finalize` is not safe.
pub(super) fn modules() -> &'static Mutex<HashMap<PathBuf, Pkcs11>> {
    pub(super) static MODULES: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
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
        // A name p11-kit registers (`softhsm2`), else a library file in the standard
        // directories (`libsofthsm2`, `libsofthsm2.so`).
        if let Some(m) = super::p11kit::by_name(name) {
            return Ok(m.path);
        }
        if name.contains('/') {
            return Err(TokenError::InvalidUri {
                uri: uri.original.clone(),
                reason: "module-name is a name, not a path: use module-path for a path".into(),
            });
        }
        let file = if name.ends_with(".so") {
            name.clone()
        } else {
            format!("{name}.so")
        };
        let dirs = module_dirs();
        return dirs
            .iter()
            .map(|d| Path::new(d).join(&file))
            .find(|p| p.exists())
            .ok_or_else(|| TokenError::ModuleNotFound {
                path: format!(
                    "{name} (module-name: no p11-kit module of that name; no {file} in {})",
                    dirs.join(", ")
                ),
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
pub(super) fn soft_token_lock(
    module: &Path,
) -> Result<Option<crate::token::process_lock::ProcessLock>, TokenError> {
    match crate::token::process_lock::soft_token_config_var(module) {
        Some(var) if module.exists() => {
            crate::token::process_lock::lock_soft_token(module, var).map(Some)
        }
        _ => Ok(None),
    }
}

pub(super) fn is_softhsm(manufacturer: &str) -> bool {
    manufacturer.trim().starts_with("SoftHSM")
}

pub(super) fn pin_status(info: &TokenInfo) -> PinStatus {
    PinStatus {
        count_low: info.user_pin_count_low(),
        final_try: info.user_pin_final_try(),
        locked: info.user_pin_locked(),
        retries: None,
    }
}

pub(super) fn summary_of(info: &TokenInfo, module: &Path) -> TokenSummary {
    TokenSummary {
        manufacturer: info.manufacturer_id().trim().to_string(),
        model: info.model().trim().to_string(),
        label: info.label().trim().to_string(),
        serial: info.serial_number().trim().to_string(),
        source: module.display().to_string(),
    }
}

/// Probes what a token can do from its mechanism list.
pub(super) fn probe(ctx: &Pkcs11, slot: Slot, info: &TokenInfo) -> Result<Capabilities, CkError> {
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
pub(super) fn module_error(
    module: &Path,
    operation: &'static str,
) -> impl Fn(CkError) -> TokenError {
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
