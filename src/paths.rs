//! Where mxhsm keeps its files (XDG base directories), and the private directories it
//! keeps state in.
//!
//! * data (`$XDG_DATA_HOME/mxhsm`, `~/.local/share/mxhsm`): the session;
//! * config (`$XDG_CONFIG_HOME/mxhsm`, `~/.config/mxhsm`): YubiKey slot maps;
//! * cache (`$XDG_CACHE_HOME/mxhsm`, `~/.cache/mxhsm`): interrupted restores;
//! * runtime (`$XDG_RUNTIME_DIR/mxhsm`, else the cache directory): lock files.
//!
//! A relative `XDG_*` value is ignored, as the specification asks. Every directory mxhsm
//! creates here is 0700, and [`private_dir`] refuses one that another user owns or that is
//! a symbolic link, so nobody else can plant, read or hold mxhsm's files.

use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The kinds of XDG base directory mxhsm uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Base {
    Data,
    Config,
    Cache,
    Runtime,
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .unwrap_or_else(|| "/".into())
}

fn env_dir(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
}

/// `<base>/mxhsm`, not created.
pub fn dir(base: Base) -> PathBuf {
    let root = match base {
        Base::Data => env_dir("XDG_DATA_HOME").unwrap_or_else(|| home().join(".local/share")),
        Base::Config => env_dir("XDG_CONFIG_HOME").unwrap_or_else(|| home().join(".config")),
        Base::Cache => env_dir("XDG_CACHE_HOME").unwrap_or_else(|| home().join(".cache")),
        Base::Runtime => match env_dir("XDG_RUNTIME_DIR").filter(|d| d.is_dir()) {
            Some(d) => d,
            None => return dir(Base::Cache),
        },
    };
    root.join("mxhsm")
}

/// The effective user ID of this process.
pub fn my_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Why a private directory or file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PrivateError {
    #[error("{}: {reason}", .path.display())]
    Unsafe { path: PathBuf, reason: String },
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> PrivateError + '_ {
    move |source| PrivateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `<base>/mxhsm[/sub]`, created 0700 if missing; refused if it is a symbolic link, not a
/// directory, or owned by another user. A directory of ours with looser permissions is
/// tightened to 0700.
pub fn private_dir(base: Base, sub: Option<&str>) -> Result<PathBuf, PrivateError> {
    let mut path = dir(base);
    if let Some(s) = sub {
        path = path.join(s);
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&path)
        .map_err(io(&path))?;
    // Check every level mxhsm owns: the `mxhsm` directory and the sub-directory.
    let mut levels = vec![dir(base)];
    if sub.is_some() {
        levels.push(path.clone());
    }
    for level in levels {
        check_private_dir(&level)?;
    }
    Ok(path)
}

use std::os::unix::fs::DirBuilderExt;

/// Any directory mxhsm keeps private files in (one under [`dir`], or one a library user
/// chose): created 0700 if missing, and checked like [`private_dir`] checks its levels.
pub fn ensure_private_dir(path: &Path) -> Result<(), PrivateError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(io(path))?;
    check_private_dir(path)
}

fn check_private_dir(path: &Path) -> Result<(), PrivateError> {
    let meta = std::fs::symlink_metadata(path).map_err(io(path))?;
    let unsafe_ = |reason: String| PrivateError::Unsafe {
        path: path.to_path_buf(),
        reason,
    };
    if meta.file_type().is_symlink() {
        return Err(unsafe_(
            "is a symbolic link; mxhsm keeps private files only in a real directory of its own"
                .into(),
        ));
    }
    if !meta.is_dir() {
        return Err(unsafe_("is not a directory".into()));
    }
    if meta.uid() != my_uid() {
        return Err(unsafe_(format!(
            "belongs to user {}, not to you (user {}): another user could read or replace mxhsm's files there",
            meta.uid(),
            my_uid()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(io(path))?;
    }
    Ok(())
}

/// `options` that never follow a symbolic link at the last component.
fn no_follow(options: &mut std::fs::OpenOptions) -> &mut std::fs::OpenOptions {
    options.custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
}

/// Opens an existing private file for reading: not through a symbolic link, a regular
/// file, owned by this user, readable by nobody else.
pub fn open_private(path: &Path) -> Result<std::fs::File, PrivateError> {
    open_checked(path, false)
}

/// [`open_private`], with `Ok(None)` when the file does not exist.
pub fn open_private_if_any(path: &Path) -> Result<Option<std::fs::File>, PrivateError> {
    match open_private(path) {
        Ok(f) => Ok(Some(f)),
        Err(PrivateError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// [`open_private`], for reading and writing.
pub fn open_private_rw(path: &Path) -> Result<std::fs::File, PrivateError> {
    open_checked(path, true)
}

/// Creates a new 0600 file: never through a symbolic link, never over an existing file.
/// Open for reading too (a restore parses its spool while writing it).
pub fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    no_follow(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600),
    )
    .open(path)
}

fn open_checked(path: &Path, write: bool) -> Result<std::fs::File, PrivateError> {
    let file = no_follow(std::fs::OpenOptions::new().read(true).write(write))
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) {
                PrivateError::Unsafe {
                    path: path.to_path_buf(),
                    reason: "is a symbolic link".into(),
                }
            } else {
                io(path)(e)
            }
        })?;
    check_private_file(&file, path)?;
    Ok(file)
}

/// Checks an open file like [`open_private`] does: a regular file, owned by this user,
/// readable by nobody else.
pub fn check_private_file(file: &std::fs::File, path: &Path) -> Result<(), PrivateError> {
    let meta = file.metadata().map_err(io(path))?;
    let unsafe_ = |reason: String| PrivateError::Unsafe {
        path: path.to_path_buf(),
        reason,
    };
    if !meta.is_file() {
        return Err(unsafe_("is not a regular file".into()));
    }
    if meta.uid() != my_uid() {
        return Err(unsafe_(format!(
            "belongs to user {}, not to you (user {}); it was not made by your mxhsm",
            meta.uid(),
            my_uid()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(unsafe_(format!(
            "is readable or writable by other users (mode {:o}); mxhsm makes its files 0600",
            meta.mode() & 0o777
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_is_ours() {
        let dir = std::env::temp_dir();
        let f = dir.join(format!("mxhsm-uid-{}", std::process::id()));
        std::fs::write(&f, b"x").unwrap();
        assert_eq!(std::fs::metadata(&f).unwrap().uid(), my_uid());
        std::fs::remove_file(&f).unwrap();
    }
}
