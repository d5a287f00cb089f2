//! Which PIV slot holds which Matrix key: a small JSON file per YubiKey, beside mxhsm's
//! configuration (`$XDG_CONFIG_HOME/mxhsm/yubikey-<serial>.json`).
//!
//! A PIV slot has no label, so (user, role) cannot live on the key itself. The map records,
//! per retired slot, the user, the role, the public key and when it was made. Every use
//! checks the slot still holds that public key (from the card's metadata), so a slot
//! changed by another tool is never taken for a Matrix key. The file holds no secret; it is
//! written whole through a temporary file, so a crash leaves the old map or the new one.
//!
//! On another machine the map can be rebuilt from the card's metadata and the published
//! keys (`mxhsm keys adopt`): the public keys say which slot is which.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::token::{KeyRole, RetiredSlot, TokenError};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD_NO_PAD;

/// One mapped slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub user_id: String,
    pub role: KeyRole,
    pub public_key: [u8; 32],
    pub created_ms: u64,
}

impl Entry {
    /// A new entry, made now.
    pub fn new(user_id: &str, role: KeyRole, public_key: [u8; 32]) -> Entry {
        Entry {
            user_id: user_id.to_string(),
            role,
            public_key,
            created_ms: crate::token::now_ms(),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct FileEntry {
    user_id: String,
    role: String,
    public_key: String,
    created_ms: u64,
}

#[derive(Serialize, Deserialize)]
struct FileFormat {
    version: u32,
    serial: u32,
    /// Slot (two hex digits, e.g. "82") → entry.
    slots: BTreeMap<String, FileEntry>,
}

/// The slot map of one YubiKey.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotMap {
    pub slots: BTreeMap<RetiredSlot, Entry>,
}

/// The default place of the map for the YubiKey with `serial`.
pub fn default_path(serial: u32) -> PathBuf {
    crate::paths::dir(crate::paths::Base::Config).join(format!("yubikey-{serial}.json"))
}

impl SlotMap {
    /// Reads the map; a missing file is an empty map.
    pub fn load(path: &Path, serial: u32) -> Result<SlotMap, TokenError> {
        let bad = |reason: String| TokenError::SlotMap {
            path: path.to_path_buf(),
            reason: format!("damaged: {reason}"),
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(SlotMap::default()),
            Err(e) => return Err(bad(e.to_string())),
        };
        let file: FileFormat = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if file.version != 1 {
            return Err(bad(format!("unknown version {}", file.version)));
        }
        if file.serial != serial {
            return Err(bad(format!(
                "it is for serial {}, not {serial}",
                file.serial
            )));
        }
        let mut slots = BTreeMap::new();
        for (slot, e) in file.slots {
            let slot = slot
                .parse::<RetiredSlot>()
                .map_err(|_| bad(format!("{slot:?} is not a retired PIV slot")))?;
            let public_key = B64
                .decode(&e.public_key)
                .ok()
                .and_then(|k| <[u8; 32]>::try_from(k).ok())
                .ok_or_else(|| bad(format!("slot {slot:02x}: bad public key")))?;
            let role = e
                .role
                .parse()
                .map_err(|_| bad(format!("slot {slot:02x}: bad role")))?;
            slots.insert(
                slot,
                Entry {
                    user_id: e.user_id,
                    role,
                    public_key,
                    created_ms: e.created_ms,
                },
            );
        }
        Ok(SlotMap { slots })
    }

    /// Writes the map whole (temporary file, fsync, rename).
    pub fn save(&self, path: &Path, serial: u32) -> Result<(), TokenError> {
        let file = FileFormat {
            version: 1,
            serial,
            slots: self
                .slots
                .iter()
                .map(|(slot, e)| {
                    (
                        format!("{slot:02x}"),
                        FileEntry {
                            user_id: e.user_id.clone(),
                            role: e.role.as_str().to_string(),
                            public_key: B64.encode(e.public_key),
                            created_ms: e.created_ms,
                        },
                    )
                })
                .collect(),
        };
        let mut text = serde_json::to_string_pretty(&file).expect("a map serialises");
        text.push('\n');
        let write = || -> std::io::Result<()> {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            crate::files::write_private(path, text.as_bytes())
        };
        write().map_err(|e| TokenError::SlotMap {
            path: path.to_path_buf(),
            reason: format!("cannot write it: {e}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_another_cards_map() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.json");
        assert_eq!(SlotMap::load(&path, 7).unwrap(), SlotMap::default());
        let mut map = SlotMap::default();
        map.slots.insert(
            RetiredSlot::new(0x82).unwrap(),
            Entry {
                user_id: "@a:b".into(),
                role: KeyRole::Master,
                public_key: [9; 32],
                created_ms: 5,
            },
        );
        map.save(&path, 7).unwrap();
        assert_eq!(SlotMap::load(&path, 7).unwrap(), map);
        let err = SlotMap::load(&path, 8).unwrap_err().to_string();
        assert!(err.contains("for serial 7, not 8"), "{err}");
        std::fs::write(&path, "{\"version\":1,\"serial\":7,\"slots\":{\"9a\":{\"user_id\":\"@a:b\",\"role\":\"master\",\"public_key\":\"\",\"created_ms\":1}}}").unwrap();
        let err = SlotMap::load(&path, 7).unwrap_err().to_string();
        assert!(err.contains("\"9a\" is not a retired PIV slot"), "{err}");
    }
}
