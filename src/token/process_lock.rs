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
//!
//! Within one process, a second store on a token that is already open fails at once
//! ([`TokenError::AlreadyOpen`]) instead of waiting for the process's own lock.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions, TryLockError};
use std::hash::{Hash, Hasher};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::TokenError;

/// How long to wait for another mxhsm process to finish with the token.
const WAIT: Duration = Duration::from_secs(600);

/// The locks this process holds or is taking, by file name.
static HELD: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// A held lock: released (for other processes and this one) when dropped.
#[derive(Debug)]
pub struct ProcessLock {
    _file: File,
    name: String,
}

impl Drop for ProcessLock {
    fn drop(&mut self) {
        held().remove(&self.name);
    }
}

fn held() -> std::sync::MutexGuard<'static, BTreeSet<String>> {
    HELD.lock().unwrap_or_else(|e| e.into_inner())
}

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
pub fn lock_soft_token(module: &Path, config_var: &str) -> Result<ProcessLock, TokenError> {
    let conf = std::env::var_os(config_var).unwrap_or_default();
    lock(
        &soft_token_lock_name(module, Path::new(&conf)),
        &module.display().to_string(),
    )
}

/// The lock file's name for (`module`, `conf`). Both paths are canonicalised first, so two
/// spellings of one module (`/usr/lib/./x.so`, a symlink to it) share one lock.
pub(crate) fn soft_token_lock_name(module: &Path, conf: &Path) -> String {
    let canonical = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    let mut h = std::collections::hash_map::DefaultHasher::new();
    canonical(module).hash(&mut h);
    canonical(conf).hash(&mut h);
    format!("token-{:016x}.lock", h.finish())
}

/// Takes the lock for YubiKeys. One for all of them: opening any card selects the PIV
/// application of every card present, which would undo another process's PIN.
#[cfg(feature = "yubikey")]
pub fn lock_yubikeys() -> Result<ProcessLock, TokenError> {
    lock("yubikey.lock", "the YubiKeys")
}

/// Takes the lock file `name` in mxhsm's private lock directory (`$XDG_RUNTIME_DIR/mxhsm/
/// locks`, else `~/.cache/mxhsm/locks`; 0700, ours), for `token` (in messages). The file
/// is opened without following symbolic links and must belong to us: nobody else can point
/// it elsewhere or hold it to stop us.
fn lock(name: &str, token: &str) -> Result<ProcessLock, TokenError> {
    // Reserved before the file is locked, so two threads of this process cannot both wait.
    if !held().insert(name.to_string()) {
        return Err(TokenError::AlreadyOpen {
            token: token.to_string(),
        });
    }
    let taken = lock_file(name, token);
    if taken.is_err() {
        held().remove(name);
    }
    taken.map(|file| ProcessLock {
        _file: file,
        name: name.to_string(),
    })
}

fn lock_file(name: &str, token: &str) -> Result<File, TokenError> {
    let err = |operation: String, reason: String| TokenError::Device {
        token: token.to_string(),
        operation,
        reason,
    };
    let dir = crate::paths::private_dir(crate::paths::Base::Runtime, Some("locks"))
        .map_err(|e| err("making the lock directory".into(), e.to_string()))?;
    let path = dir.join(name);
    let locking = || format!("locking {}", path.display());
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(&path)
        .map_err(|e| err(locking(), e.to_string()))?;
    let owner = file
        .metadata()
        .map_err(|e| err(locking(), e.to_string()))?
        .uid();
    if owner != crate::paths::my_uid() {
        return Err(err(
            locking(),
            format!("the lock file belongs to user {owner}, not to you"),
        ));
    }
    let start = Instant::now();
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(TryLockError::WouldBlock) if start.elapsed() < WAIT => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(TryLockError::WouldBlock) => {
                return Err(err(
                    locking(),
                    format!(
                        "another mxhsm process has used this token for over {} s",
                        WAIT.as_secs()
                    ),
                ));
            }
            Err(TryLockError::Error(e)) => return Err(err(locking(), e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_spellings_of_a_module_share_a_lock() {
        let dir = std::env::temp_dir().join(format!("mxhsm-lock-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        let module = dir.join("libsofthsm2.so");
        std::fs::write(&module, b"").unwrap();
        let link = dir.join("link.so");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&module, &link).unwrap();
        let conf = dir.join("softhsm2.conf");
        std::fs::write(&conf, b"").unwrap();
        let name = soft_token_lock_name(&module, &conf);
        for other in [
            dir.join("sub/../libsofthsm2.so"),
            dir.join("./libsofthsm2.so"),
            link,
        ] {
            assert_eq!(
                soft_token_lock_name(&other, &conf),
                name,
                "{}",
                other.display()
            );
        }
        assert_ne!(soft_token_lock_name(&module, &dir.join("other.conf")), name);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
