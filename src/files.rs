//! Writing files that hold secrets: 0600, never through a symbolic link, and invisible
//! until complete, so that a reader never sees half a file, nothing is lost if writing
//! fails, and nothing is left behind if mxhsm is killed.
//!
//! A [`PrivateFile`] is, where the file system allows it (ext4, xfs, btrfs, tmpfs), an
//! unnamed file (`O_TMPFILE`) in the destination's directory: it has no name until
//! [`PrivateFile::commit_new`] or [`PrivateFile::commit_replace`] links it into place, so
//! a `kill -9` leaves nothing on disk. Elsewhere it falls back to a hidden temporary name
//! (`.<name>.mxhsm-tmp-<random>`, created exclusively), removed when the writer is dropped;
//! [`remove_stale_temporaries`] clears what a killed process left behind.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, CWD, Mode, OFlags};

const TMP_MARK: &str = ".mxhsm-tmp-";

enum Backing {
    /// `O_TMPFILE`: linked into place through `/proc/self/fd`.
    Unnamed,
    /// A hidden temporary name in the same directory.
    Named(PathBuf),
}

/// A 0600 file that appears at its path only when committed; dropped without a commit,
/// it vanishes.
pub struct PrivateFile {
    file: Option<BufWriter<File>>,
    backing: Backing,
    path: PathBuf,
}

impl std::fmt::Debug for PrivateFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivateFile")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn random_suffix() -> String {
    crate::text::random_hex(6).unwrap_or_else(|_| "0".repeat(12))
}

impl PrivateFile {
    /// Starts writing the file that will be `path`.
    pub fn create(path: &Path) -> std::io::Result<PrivateFile> {
        let dir = parent_of(path);
        let unnamed = rustix::fs::openat(
            CWD,
            dir,
            OFlags::RDWR | OFlags::TMPFILE | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        );
        let (file, backing) = match unnamed {
            Ok(fd) if Path::new("/proc/self/fd").is_dir() => (File::from(fd), Backing::Unnamed),
            _ => {
                let mut name = std::ffi::OsString::from(".");
                name.push(path.file_name().unwrap_or_default());
                name.push(TMP_MARK);
                name.push(random_suffix());
                let tmp = dir.join(name);
                let file = crate::paths::create_private(&tmp)?;
                (file, Backing::Named(tmp))
            }
        };
        Ok(PrivateFile {
            file: Some(BufWriter::new(file)),
            backing,
            path: path.to_path_buf(),
        })
    }

    fn finish(&mut self) -> std::io::Result<File> {
        let file = self
            .file
            .take()
            .ok_or_else(|| std::io::Error::other("already committed"))?;
        let file = file.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(file)
    }

    /// Gives the temporary file the name `at` (which must not exist).
    fn link(&self, file: &File, at: &Path) -> std::io::Result<()> {
        match &self.backing {
            Backing::Unnamed => rustix::fs::linkat(
                CWD,
                format!("/proc/self/fd/{}", file.as_raw_fd()),
                CWD,
                at,
                AtFlags::SYMLINK_FOLLOW,
            )
            .map_err(std::io::Error::from),
            Backing::Named(tmp) => std::fs::hard_link(tmp, at),
        }
    }

    /// A second handle on the file being written, for reading what was written and
    /// flushed so far (positioned reads: the writer's offset is shared).
    pub fn reader(&self) -> std::io::Result<File> {
        match &self.file {
            Some(f) => f.get_ref().try_clone(),
            None => Err(std::io::Error::other("the file is closed")),
        }
    }

    /// Flushes and syncs the file and gives it its name, which must not exist yet: an
    /// existing file is never overwritten (the error is `AlreadyExists`).
    pub fn commit_new(mut self) -> std::io::Result<()> {
        let file = self.finish()?;
        let linked = self.link(&file, &self.path);
        if let Backing::Named(tmp) = &self.backing {
            let _ = std::fs::remove_file(tmp);
        }
        linked
    }

    /// Flushes and syncs the file and renames it over `path`, replacing what is there (for
    /// files mxhsm owns, such as the session).
    pub fn commit_replace(mut self) -> std::io::Result<()> {
        let file = self.finish()?;
        match &self.backing {
            Backing::Named(tmp) => std::fs::rename(tmp, &self.path),
            Backing::Unnamed => {
                let mut name = std::ffi::OsString::from(".");
                name.push(self.path.file_name().unwrap_or_default());
                name.push(TMP_MARK);
                name.push(random_suffix());
                let tmp = parent_of(&self.path).join(name);
                self.link(&file, &tmp)?;
                std::fs::rename(&tmp, &self.path).inspect_err(|_| {
                    let _ = std::fs::remove_file(&tmp);
                })
            }
        }
    }
}

impl Write for PrivateFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &mut self.file {
            Some(f) => f.write(buf),
            None => Err(std::io::Error::other("already committed")),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.file {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for PrivateFile {
    fn drop(&mut self) {
        if self.file.take().is_some()
            && let Backing::Named(tmp) = &self.backing
        {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// Writes `contents` to `path` (mode 0600), replacing it atomically.
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut f = PrivateFile::create(path)?;
    f.write_all(contents)?;
    f.commit_replace()
}

/// Removes the named temporaries a killed mxhsm left next to `path` (only on file
/// systems without unnamed files). Returns how many it removed.
pub fn remove_stale_temporaries(path: &Path) -> usize {
    let Some(name) = path.file_name() else {
        return 0;
    };
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(name);
    prefix.push(TMP_MARK);
    let prefix = prefix.to_string_lossy().into_owned();
    let mut removed = 0;
    if let Ok(entries) = std::fs::read_dir(parent_of(path)) {
        for e in entries.flatten() {
            let n = e.file_name();
            if n.to_string_lossy().starts_with(&prefix) && std::fs::remove_file(e.path()).is_ok() {
                removed += 1;
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mxhsm-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn invisible_until_committed_and_never_clobbers() {
        let d = scratch("commit");
        let p = d.join("out.json");
        let mut f = PrivateFile::create(&p).unwrap();
        f.write_all(b"secret").unwrap();
        assert_eq!(
            std::fs::read_dir(&d).unwrap().count(),
            0,
            "nothing visible yet"
        );
        f.commit_new().unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"secret");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let mut again = PrivateFile::create(&p).unwrap();
        again.write_all(b"other").unwrap();
        let e = again.commit_new().unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&p).unwrap(), b"secret", "not overwritten");
        write_private(&p, b"replaced").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"replaced");
        assert_eq!(
            std::fs::read_dir(&d).unwrap().count(),
            1,
            "no temporaries left"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn dropped_without_commit_leaves_nothing() {
        let d = scratch("drop");
        let p = d.join("x");
        let mut f = PrivateFile::create(&p).unwrap();
        f.write_all(b"half").unwrap();
        drop(f);
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
