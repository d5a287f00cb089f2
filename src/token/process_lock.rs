//! One mxhsm process at a time on a software token's file store (SoftHSM, Kryoptic), or on
//! one YubiKey.
//!
//! SoftHSM 2.6.1's file object store is not safe for concurrent processes: when it rewrites
//! `token.object` (on every successful login) or an object file, it truncates the file,
//! releases its lock and only then writes (seen with strace: `ftruncate(fd, 0)`,
//! `fcntl(F_UNLCK)`, `write`). A second process reading in that moment sees an empty file
//! and fails with `CKR_GENERAL_ERROR`, or does not see the token at all. So mxhsm
//! processes using the same SoftHSM module and configuration take turns: each holds an
//! advisory lock from before `C_Initialize` until it is done.
//!
//! Kryoptic 1.5 keeps its token in SQLite, opened without a busy timeout: a second process
//! writing at the same moment (a login updates the PIN counter; key generation adds
//! objects) gets a storage error, which Kryoptic reports as `CKR_DEVICE_MEMORY` (seen in
//! our two-process test). It takes the same lock. Real HSMs serialise inside the device
//! and need none.
//!
//! A YubiKey forgets a verified PIN and an authenticated management key whenever any
//! program selects its PIV application, which every new connection does; two mxhsm
//! processes would undo each other's PIN; and since opening one card means selecting PIV on
//! every card present, they take turns on all YubiKeys at once.

use std::fs::{File, OpenOptions, TryLockError};
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::time::{Duration, Instant};

use super::TokenError;

/// How long to wait for another mxhsm process to finish with the token.
const WAIT: Duration = Duration::from_secs(600);

/// The environment variable naming the store of a file-backed software token, if `module`
/// is one (judged by its file name: we must decide before loading it).
pub fn soft_token_config_var(module: &Path) -> Option<&'static str> {
    let name = module.file_name()?.to_str()?;
    if name.starts_with("libsofthsm2") {
        Some("SOFTHSM2_CONF")
    } else if name.starts_with("libkryoptic") {
        Some("KRYOPTIC_CONF")
    } else {
        None
    }
}

/// Takes the lock for (`module`, its current configuration), waiting for other mxhsm
/// processes. The lock is released when the returned file is dropped.
pub fn lock_soft_token(module: &Path, config_var: &str) -> Result<File, TokenError> {
    let conf = std::env::var_os(config_var).unwrap_or_default();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    module.hash(&mut h);
    Path::new(&conf)
        .canonicalize()
        .unwrap_or_else(|_| conf.clone().into())
        .hash(&mut h);
    lock(
        &format!("mxhsm-token-{:016x}.lock", h.finish()),
        &module.display().to_string(),
    )
}

/// Takes the lock for YubiKeys. One for all of them: opening any card selects the PIV
/// application of every card present, which would undo another process's PIN.
#[cfg(feature = "yubikey")]
pub fn lock_yubikeys() -> Result<File, TokenError> {
    lock("mxhsm-yubikey.lock", "the YubiKeys")
}

/// Takes the lock file `name` in the user's runtime directory (else the temporary
/// directory), for `token` (in messages).
fn lock(name: &str, token: &str) -> Result<File, TokenError> {
    let dir = std::env::var_os("XDG_RUNTIME_DIR")
        .map(std::path::PathBuf::from)
        .filter(|d| d.is_absolute() && d.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    let path = dir.join(name);
    let err = |reason: String| TokenError::Device {
        token: token.to_string(),
        operation: format!("locking {}", path.display()),
        reason,
    };
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| err(e.to_string()))?;
    let start = Instant::now();
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(TryLockError::WouldBlock) if start.elapsed() < WAIT => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(TryLockError::WouldBlock) => {
                return Err(err(format!(
                    "another mxhsm process has used this token for over {} s",
                    WAIT.as_secs()
                )));
            }
            Err(TryLockError::Error(e)) => return Err(err(e.to_string())),
        }
    }
}
