//! The doctors: the token's (a self-test with temporary keys, and an audit of every mxhsm
//! key on the token and, on a YubiKey, of its credentials and slot map), and the
//! account's ([`account`]: the session, the identity, this device, the backup, secret
//! storage, as the server has them against the token).

use ed25519_dalek::{Signature, VerifyingKey};
use x25519_dalek::{PublicKey as XPublic, StaticSecret};

use super::AccountError;
use crate::token::{Backend, Curve25519PublicKey, KeyAlgorithm, KeyInfo, KeyStore, Store};

/// One line of the doctor's report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
    /// What the user can do about it, when mxhsm knows.
    pub fix: Option<Fix>,
}

/// A remedy the caller can offer (the CLI names its command).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fix {
    /// A key mxhsm does not know is in this slot: adopting it maps it to a user and role.
    AdoptSlot(crate::token::RetiredSlot),
    /// The slot map's entry for `slot` contradicts the card: remove it from `map`, or adopt
    /// what the slot holds.
    SlotMapEntry {
        map: std::path::PathBuf,
        slot: crate::token::RetiredSlot,
    },
    /// The session is not valid any more: log in again.
    LogIn,
    /// The server does not publish the token's identity: publish it (or take it back).
    PublishIdentity,
    /// mxhsm's own device is not cross-signed.
    SignThisDevice,
    /// There is no backup with its key on the token, or it is not trusted.
    CreateBackup,
    /// Secret storage holds copies of keys that are on the token.
    RemoveSecretCopies,
}

/// The account's doctor: one line per thing that must hold for the hardware identity to
/// work with other clients. Reads only.
pub fn account(account: &super::Account) -> Result<Vec<Check>, AccountError> {
    use super::watch::{self, Event};
    let mut checks = Vec::new();
    let line = |name: &str, ok: bool, detail: String, fix: Option<Fix>| Check {
        name: name.into(),
        ok,
        detail,
        fix,
    };
    let esc = |s: &str| crate::text::escape(s).into_owned();
    match account.client().whoami() {
        Ok((user, device))
            if user == account.user_id() && device.as_deref() == Some(account.device_id()) =>
        {
            checks.push(line(
                "session",
                true,
                format!(
                    "valid on {} as device {}",
                    esc(account.client().homeserver()),
                    esc(account.device_id())
                ),
                None,
            ))
        }
        Ok((user, device)) => checks.push(line(
            "session",
            false,
            format!(
                "the server says this session is {} device {}",
                esc(&user),
                esc(device.as_deref().unwrap_or("?"))
            ),
            Some(Fix::LogIn),
        )),
        Err(e) => {
            checks.push(line("session", false, e.to_string(), Some(Fix::LogIn)));
            return Ok(checks);
        }
    }
    // The watch's pass, on a scratch state: the identity, devices, backup, secret storage.
    let mut state = watch::WatchState::default();
    let events = watch::check(account, &mut state)?;
    let identity: Vec<String> = events
        .iter()
        .filter_map(|e| match e {
            Event::IdentityReset { published, .. } => Some(format!(
                "the server publishes the master key {} instead of the token's",
                published
                    .map(|k| k.to_base64())
                    .unwrap_or_else(|| "(none)".into())
            )),
            Event::IdentityChanged { problems } => Some(esc(&problems.join("; "))),
            _ => None,
        })
        .collect();
    checks.push(if identity.is_empty() {
        line("identity", true, "published as the token's".into(), None)
    } else {
        line(
            "identity",
            false,
            identity.join("; "),
            Some(Fix::PublishIdentity),
        )
    });
    let this_unsigned = events.iter().any(|e| {
        matches!(e, Event::UnsignedDevice { device_id, .. } if device_id == account.device_id())
    });
    checks.push(if this_unsigned {
        line(
            "this device",
            false,
            format!(
                "{} is not signed by the self-signing key",
                esc(account.device_id())
            ),
            Some(Fix::SignThisDevice),
        )
    } else {
        line(
            "this device",
            true,
            "cross-signed by the token's self-signing key".into(),
            None,
        )
    });
    let backup: Vec<String> = events
        .iter()
        .filter_map(|e| match e {
            Event::BackupUntrusted { version, reason } => Some(format!(
                "version {} is not trusted: {}",
                esc(version),
                esc(&reason.to_string())
            )),
            Event::BackupNotTokenKey { version, .. } => Some(format!(
                "version {} is not encrypted to the token's backup key",
                esc(version)
            )),
            _ => None,
        })
        .collect();
    checks.push(match (&state.backup_version, backup.is_empty()) {
        (None, _) => line(
            "backup",
            false,
            "the server has no key backup".into(),
            Some(Fix::CreateBackup),
        ),
        (Some(v), true) => line(
            "backup",
            true,
            format!(
                "version {} with its key on the token, auth_data signed by the master key",
                esc(v)
            ),
            None,
        ),
        (Some(_), false) => line("backup", false, backup.join("; "), Some(Fix::CreateBackup)),
    });
    if state.backup_version.is_some() {
        let flag = account
            .client()
            .account_data(account.user_id(), super::backup::BACKUP_PREFERENCE)?;
        let on = flag
            .as_ref()
            .and_then(|v| v.get("enabled"))
            .and_then(serde_json::Value::as_bool)
            == Some(true);
        checks.push(if on {
            line(
                "backup preference",
                true,
                "m.key_backup says other clients use it".into(),
                None,
            )
        } else {
            line(
                "backup preference",
                false,
                "m.key_backup does not tell other clients to use the backup".into(),
                Some(Fix::CreateBackup),
            )
        });
    }
    let copies: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            Event::SecretStorageCopy { secret, .. } => Some(*secret),
            _ => None,
        })
        .collect();
    let reset = events.iter().any(|e| {
        matches!(
            e,
            Event::IdentityReset { .. } | Event::IdentityChanged { .. }
        )
    });
    checks.push(if copies.is_empty() && reset {
        // What secret storage holds for a role whose published key is not the token's is
        // most likely that key, not a copy; the watch cannot decrypt it to tell.
        line(
            "secret storage",
            false,
            "not judged: the identity on the server is not the token's, so what secret storage holds for it cannot be told apart from a copy".into(),
            None,
        )
    } else if copies.is_empty() {
        line(
            "secret storage",
            true,
            "holds no copy of a key on the token".into(),
            None,
        )
    } else {
        line(
            "secret storage",
            false,
            format!("holds copies of keys on the token: {}", copies.join(", ")),
            Some(Fix::RemoveSecretCopies),
        )
    });
    Ok(checks)
}

fn check(name: impl Into<String>, r: Result<String, AccountError>) -> Check {
    match r {
        Ok(detail) => Check {
            name: name.into(),
            ok: true,
            detail,
            fix: None,
        },
        Err(e) => Check {
            name: name.into(),
            ok: false,
            detail: e.to_string(),
            fix: None,
        },
    }
}

/// A temporary key that is destroyed when dropped: a PKCS#11 session object, or on a
/// YubiKey a key in a free retired slot (PIN once, no touch) under a placeholder user.
pub(crate) struct SessionKey<'a> {
    pub(crate) store: &'a dyn KeyStore,
    pub(crate) key: KeyInfo,
    /// False for a stored key a measurement borrows ([`SessionKey::or_new`]): kept.
    temporary: bool,
}

/// The user of a YubiKey's temporary test keys.
#[cfg(feature = "yubikey")]
const TEST_KEY_USER: &str = "@mxhsm-self-test:localhost";

impl<'a> SessionKey<'a> {
    pub(crate) fn new(store: &'a Store, algorithm: KeyAlgorithm) -> Result<Self, AccountError> {
        let key = match store.backend() {
            Backend::Pkcs11(s) => s.generate_session_key(algorithm)?,
            #[cfg(feature = "yubikey")]
            Backend::YubiKey(s) => {
                let role = match algorithm {
                    KeyAlgorithm::Ed25519 => crate::token::KeyRole::SelfSigning,
                    KeyAlgorithm::X25519 => crate::token::KeyRole::Backup,
                };
                let options = crate::token::KeyOptions {
                    pin_policy: Some(crate::token::PinPolicy::Once),
                    touch_policy: Some(crate::token::TouchPolicy::Never),
                    ..Default::default()
                };
                s.generate(TEST_KEY_USER, role, &options)?
            }
        };
        Ok(SessionKey {
            store: &**store,
            key,
            temporary: true,
        })
    }

    /// `stored`, a key already on the token, used in place of a temporary one and kept;
    /// or else a new temporary key.
    pub(crate) fn or_new(
        store: &'a Store,
        stored: Option<&KeyInfo>,
        algorithm: KeyAlgorithm,
    ) -> Result<Self, AccountError> {
        match stored {
            Some(k) => Ok(SessionKey {
                store: &**store,
                key: k.clone(),
                temporary: false,
            }),
            None => Self::new(store, algorithm),
        }
    }
}

impl Drop for SessionKey<'_> {
    fn drop(&mut self) {
        if self.temporary {
            let _ = self.store.delete(&self.key);
        }
    }
}

/// Self-tests the token with temporary keys (Ed25519 at several lengths, X25519 against
/// x25519-dalek, a small-order peer refused) and audits every mxhsm key on it; on a
/// YubiKey also the factory credentials, unmapped slots and the slot map.
pub fn doctor(store: &Store) -> Result<Vec<Check>, AccountError> {
    store.login()?;
    let caps = store.capabilities().clone();
    let mut checks = vec![Check {
        name: "capabilities".into(),
        ok: caps.ed25519,
        detail: caps.summary(),
        fix: None,
    }];
    if caps.ed25519 {
        checks.push(check("ed25519 sign + verify", (|| {
            let k = SessionKey::new(store, KeyAlgorithm::Ed25519)?;
            let vk = VerifyingKey::from_bytes(k.key.public_key.as_bytes())
                .map_err(|e| AccountError::Input(e.to_string()))?;
            let mut lengths = Vec::new();
            for len in [0usize, 1, 255, 1015, 65536] {
                let msg: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
                let sig = store.sign_ed25519(&k.key, &msg)?;
                vk.verify_strict(&msg, &Signature::from_bytes(&sig))
                    .map_err(|_| AccountError::Input(format!("a {len}-byte message's signature does not verify (ed25519-dalek verify_strict)")))?;
                lengths.push(len.to_string());
            }
            Ok(format!("session key; signatures over {} bytes verify with ed25519-dalek", lengths.join("/")))
        })()));
    }
    if caps.x25519.is_some() {
        checks.push(check(
            "x25519 agreement",
            (|| {
                let k = SessionKey::new(store, KeyAlgorithm::X25519)?;
                let mut seed = [0u8; 32];
                getrandom::fill(&mut seed).map_err(|e| AccountError::Input(e.to_string()))?;
                let peer = StaticSecret::from(seed);
                let peer_key = Curve25519PublicKey::from_bytes(XPublic::from(&peer).to_bytes());
                let on_token = store.x25519(&k.key, &peer_key)?;
                let soft = peer.diffie_hellman(&XPublic::from(*k.key.public_key.as_bytes()));
                if on_token.expose() != soft.as_bytes() {
                    return Err(AccountError::Input(
                        "the token's shared secret differs from x25519-dalek's".into(),
                    ));
                }
                // A small-order peer key must be refused, not turned into a zero secret.
                match store.x25519(&k.key, &Curve25519PublicKey::from_bytes([0u8; 32])) {
                    Err(_) => {}
                    Ok(_) => {
                        return Err(AccountError::Input(
                            "an all-zero peer key gave a secret".into(),
                        ));
                    }
                }
                Ok(format!(
                    "session key ({}); secret equals x25519-dalek's; zero peer key refused",
                    k.key.x25519_mechanism().map(|m| m.as_str()).unwrap_or("?")
                ))
            })(),
        ));
    } else {
        checks.push(Check {
            name: "x25519 agreement".into(),
            ok: true,
            detail:
                "not supported by this token: keep the backup key elsewhere (cross-signing works)"
                    .into(),
            fix: None,
        });
    }
    let keys = store.list_keys(None);
    match keys {
        Ok(keys) => {
            if keys.is_empty() {
                checks.push(Check {
                    name: "key audit".into(),
                    ok: true,
                    detail: "no mxhsm keys on this token".into(),
                    fix: None,
                });
            }
            for k in &keys {
                let problems = k.protection.problems(k.algorithm());
                let mut notes = vec![k.origin.as_str().to_string()];
                if k.protection.never_extractable == Some(true)
                    && k.protection.always_sensitive == Some(true)
                {
                    notes.push("never extractable, always sensitive".into());
                }
                checks.push(Check {
                    name: format!("key {} {} {}", k.user_id, k.role, k.public_key_base64()),
                    ok: problems.is_empty(),
                    detail: if problems.is_empty() {
                        format!(
                            "token, private, sensitive, not extractable, {} only; {}",
                            match k.algorithm() {
                                KeyAlgorithm::Ed25519 => "signs",
                                KeyAlgorithm::X25519 => "derives",
                            },
                            notes.join(", ")
                        )
                    } else {
                        problems.join("; ")
                    },
                    fix: None,
                });
            }
        }
        Err(e) => checks.push(Check {
            name: "key audit".into(),
            ok: false,
            detail: e.to_string(),
            fix: None,
        }),
    }
    #[cfg(feature = "yubikey")]
    if let Some(y) = store.as_yubikey() {
        // Factory credentials are worth a warning, not a failure: a default management key
        // lets anyone holding the card replace (not use) its keys; a default PIN lets
        // anyone holding it use them.
        match y.factory_defaults() {
            Ok(defaults) => {
                let still: Vec<&str> = defaults
                    .iter()
                    .filter(|(_, d)| *d == Some(true))
                    .map(|(what, _)| *what)
                    .collect();
                checks.push(Check {
                    name: "factory credentials".into(),
                    ok: true,
                    detail: if still.is_empty() {
                        "PIN, PUK and management key are changed from the factory defaults".into()
                    } else {
                        format!(
                            "WARNING: still the factory default: {}; change them with ykman piv access change-pin / change-puk / change-management-key --generate --protect",
                            still.join(", ")
                        )
                    },
                    fix: None,
                });
            }
            Err(e) => checks.push(Check {
                name: "factory credentials".into(),
                ok: false,
                detail: e.to_string(),
                fix: None,
            }),
        }
        match y.unmapped_slots() {
            Ok(slots) => {
                for (slot, alg, origin) in slots {
                    checks.push(Check {
                        name: format!("slot {slot:02x}"),
                        ok: true,
                        detail: format!(
                            "holds a key mxhsm does not know ({}, {})",
                            alg.map(|a| a.to_string())
                                .unwrap_or_else(|| "another algorithm".into()),
                            origin.as_str()
                        ),
                        fix: Some(Fix::AdoptSlot(slot)),
                    });
                }
            }
            Err(e) => checks.push(Check {
                name: "unmapped slots".into(),
                ok: false,
                detail: e.to_string(),
                fix: None,
            }),
        }
        // Slot-map entries the card contradicts are never used; say so.
        match y.audit() {
            Ok(entries) => {
                for crate::token::yubikey::SlotAudit { slot, entry, state } in entries {
                    if let Err(problem) = state {
                        checks.push(Check {
                            name: format!("slot map {slot:02x} ({} {})", entry.user_id, entry.role),
                            ok: false,
                            detail: problem.to_string(),
                            fix: Some(Fix::SlotMapEntry {
                                map: y.slot_map_path().to_path_buf(),
                                slot,
                            }),
                        });
                    }
                }
            }
            Err(e) => checks.push(Check {
                name: "slot map".into(),
                ok: false,
                detail: e.to_string(),
                fix: None,
            }),
        }
    }
    Ok(checks)
}
