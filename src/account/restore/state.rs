//! What earlier restores restored, so `backup restore --new-only` does agreements only for
//! sessions that are new or changed.
//!
//! One 0600 file per account and backup version,
//! `$XDG_DATA_HOME/mxhsm/restored/<hash of user and version>`: a header line, then one
//! 32-byte record per session, sorted: 16 bytes of SHA-256 over the room and session IDs,
//! then 16 bytes of SHA-256 over the session's encrypted `session_data` (ephemeral key,
//! MAC, ciphertext). No room or session ID is stored in the clear, and no key material:
//! the file says only "this ciphertext was restored before". A changed `session_data` (the
//! server keeps the better copy of a session) makes the session new again. A lost or
//! damaged file only makes the next `--new-only` restore everything.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::matrix::backup::EncryptedSessionData;
use crate::paths::{self, Base};

const MAGIC: &[u8] = b"mxhsm restored v1\n";

/// A session's identity in the state: room and session IDs, hashed.
pub type SessionId = [u8; 16];
/// A session's encrypted data, hashed.
pub type DataDigest = [u8; 16];

pub fn session_id(room_id: &str, session_id: &str) -> SessionId {
    let mut h = Sha256::new();
    h.update(b"mxhsm restored session\0");
    h.update(room_id.as_bytes());
    h.update([0]);
    h.update(session_id.as_bytes());
    h.finalize()[..16].try_into().unwrap_or([0; 16])
}

pub fn data_digest(data: &EncryptedSessionData) -> DataDigest {
    let mut h = Sha256::new();
    h.update(b"mxhsm restored data\0");
    h.update(data.ephemeral.as_bytes());
    h.update((data.mac.len() as u32).to_be_bytes());
    h.update(&data.mac);
    h.update(&data.ciphertext);
    h.finalize()[..16].try_into().unwrap_or([0; 16])
}

/// The sessions restored from one backup version.
#[derive(Debug, Default)]
pub struct RestoredState {
    pub sessions: HashMap<SessionId, DataDigest>,
}

/// The state file of `user`'s restores of backup `version`.
pub fn state_path(user: &str, version: &str) -> Result<PathBuf, String> {
    let mut h = Sha256::new();
    h.update(user.as_bytes());
    h.update([0]);
    h.update(version.as_bytes());
    let name: String = h.finalize()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let dir = paths::private_dir(Base::Data, Some("restored")).map_err(|e| e.to_string())?;
    Ok(dir.join(name))
}

impl RestoredState {
    /// Reads the state; a missing file is an empty state. A file that is not ours (another
    /// user's, a link) is an error; a damaged one reads as empty, which costs only time.
    pub fn load(path: &Path) -> Result<RestoredState, String> {
        use std::io::Read;
        let Some(mut f) = paths::open_private_if_any(path).map_err(|e| e.to_string())? else {
            return Ok(RestoredState::default());
        };
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Ok(Self::parse(&bytes).unwrap_or_default())
    }

    fn parse(bytes: &[u8]) -> Option<RestoredState> {
        let body = bytes.strip_prefix(MAGIC)?;
        if body.len() % 32 != 0 {
            return None;
        }
        let sessions = body
            .chunks_exact(32)
            .map(|r| {
                let (id, digest) = r.split_at(16);
                (
                    id.try_into().unwrap_or([0; 16]),
                    digest.try_into().unwrap_or([0; 16]),
                )
            })
            .collect();
        Some(RestoredState { sessions })
    }

    fn bytes(&self) -> Vec<u8> {
        let mut records: Vec<_> = self.sessions.iter().collect();
        records.sort();
        let mut out = Vec::with_capacity(MAGIC.len() + 32 * records.len());
        out.extend_from_slice(MAGIC);
        for (id, digest) in records {
            out.extend_from_slice(id);
            out.extend_from_slice(digest);
        }
        out
    }

    /// Whether the session was restored before with exactly this data.
    pub fn unchanged(&self, id: &SessionId, digest: &DataDigest) -> bool {
        self.sessions.get(id) == Some(digest)
    }

    /// Writes the state (a new file replaces the old one whole).
    pub fn save(&self, path: &Path) -> Result<(), String> {
        crate::files::write_private(path, &self.bytes())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_reads_back_and_a_damaged_one_is_empty() {
        let mut s = RestoredState::default();
        s.sessions.insert(session_id("!r:x", "S1"), [1; 16]);
        s.sessions.insert(session_id("!r:x", "S2"), [2; 16]);
        let back = RestoredState::parse(&s.bytes()).unwrap();
        assert_eq!(back.sessions, s.sessions);
        assert!(back.unchanged(&session_id("!r:x", "S1"), &[1; 16]));
        assert!(!back.unchanged(&session_id("!r:x", "S1"), &[2; 16]));
        assert!(!back.unchanged(&session_id("!r:y", "S1"), &[1; 16]));
        let mut cut = s.bytes();
        cut.pop();
        assert!(RestoredState::parse(&cut).is_none());
        assert!(RestoredState::parse(b"something else").is_none());
    }

    #[test]
    fn ids_do_not_run_together() {
        assert_ne!(session_id("!a:x", "bc"), session_id("!a:xb", "c"));
    }
}
