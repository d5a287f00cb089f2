//! The login sessions (homeserver, user, device, access token, mxhsm's Olm device, the
//! token it was logged in with), one 0600 file per account under the XDG data directory:
//! `$XDG_DATA_HOME/mxhsm/sessions/<user ID>.json` (by default
//! `~/.local/share/mxhsm/sessions/`). A login as a second account adds a session; it does
//! not replace the first.
//!
//! mxhsm before accounts kept one `session.json` beside `sessions/`; [`Sessions::open`]
//! moves it into place (a rename: nothing is lost) the first time it runs.

use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

use super::HomeserverError;

/// A logged-in device of mxhsm.
pub struct Session {
    pub homeserver: String,
    pub user_id: String,
    pub device_id: String,
    pub access_token: SecretString,
    /// The vodozemac Olm account of mxhsm's device, pickled (unencrypted JSON: the file is
    /// 0600; this is a device key, the cross-signing keys stay on the token).
    pub olm_account: Option<SecretString>,
    /// The user allowed plain `http://` to a non-loopback homeserver at login.
    pub insecure_http: bool,
    /// The token the session was logged in with, as `crate::config::token_spec` writes it
    /// (a PKCS#11 URI or `yubikey:SERIAL`): later commands use it when nothing else names
    /// a token.
    pub token: Option<String>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("homeserver", &self.homeserver)
            .field("user_id", &self.user_id)
            .field("device_id", &self.device_id)
            .field("access_token", &"[redacted]")
            .finish_non_exhaustive()
    }
}

/// Where the sessions live: a 0700 directory with one file per account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sessions {
    dir: PathBuf,
}

/// The characters kept as they are in a session file name; the rest of a user ID
/// (`/`, and anything unusual in an old localpart) is percent-encoded.
const FILE_NAME: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'@')
    .remove(b':')
    .remove(b'.')
    .remove(b'_')
    .remove(b'=')
    .remove(b'-')
    .remove(b'+');

impl Sessions {
    /// The sessions of this user (`$XDG_DATA_HOME/mxhsm/sessions`), with a session file of
    /// an older mxhsm moved in.
    pub fn open() -> Result<Sessions, HomeserverError> {
        let sessions = Sessions::at(crate::paths::dir(crate::paths::Base::Data).join("sessions"));
        let legacy = crate::paths::dir(crate::paths::Base::Data).join("session.json");
        if let Some(old) = Session::load_if_any(&legacy)? {
            let to = sessions.path_for(&old.user_id);
            if !to.exists() {
                sessions.ensure_dir()?;
                std::fs::rename(&legacy, &to).map_err(|e| HomeserverError::File {
                    what: "cannot move the session file",
                    path: legacy.clone(),
                    reason: format!("to {}: {e}", to.display()),
                })?;
            }
        }
        Ok(sessions)
    }

    /// Sessions kept in `dir` (tests, and library users with their own layout).
    pub fn at(dir: impl Into<PathBuf>) -> Sessions {
        Sessions { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The session file of `user_id` (which need not exist).
    pub fn path_for(&self, user_id: &str) -> PathBuf {
        let name = percent_encoding::utf8_percent_encode(user_id, FILE_NAME).to_string();
        self.dir.join(format!("{name}.json"))
    }

    /// The saved session of `user_id`, if any.
    pub fn load_if_any(&self, user_id: &str) -> Result<Option<Session>, HomeserverError> {
        let found = Session::load_if_any(&self.path_for(user_id))?;
        match found {
            Some(s) if s.user_id != user_id => Err(HomeserverError::File {
                what: "the session file",
                path: self.path_for(user_id),
                reason: format!(
                    "it holds a session of {}, not of {}",
                    crate::text::escape(&s.user_id),
                    crate::text::escape(user_id)
                ),
            }),
            other => Ok(other),
        }
    }

    /// The saved session of `user_id`; [`HomeserverError::NotLoggedIn`] when there is none.
    pub fn load(&self, user_id: &str) -> Result<Session, HomeserverError> {
        self.load_if_any(user_id)?
            .ok_or_else(|| HomeserverError::NotLoggedIn {
                path: self.path_for(user_id),
            })
    }

    /// Every saved session, by user ID. A file that is not a session of ours is an error
    /// (it is not skipped: it may be one the user expects to see).
    pub fn list(&self) -> Result<Vec<Session>, HomeserverError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(HomeserverError::File {
                    what: "cannot list the sessions in",
                    path: self.dir.clone(),
                    reason: e.to_string(),
                });
            }
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            // Temporaries of an interrupted save start with a dot.
            if !name.ends_with(".json") || name.starts_with('.') {
                continue;
            }
            if let Some(s) = Session::load_if_any(&entry.path())? {
                out.push(s);
            }
        }
        out.sort_by(|a, b| a.user_id.cmp(&b.user_id));
        Ok(out)
    }

    /// Saves `session` as its user's session, replacing the file of that user.
    pub fn save(&self, session: &Session) -> Result<PathBuf, HomeserverError> {
        self.ensure_dir()?;
        let path = self.path_for(&session.user_id);
        session.save(&path)?;
        Ok(path)
    }

    fn ensure_dir(&self) -> Result<(), HomeserverError> {
        crate::paths::ensure_private_dir(&self.dir).map_err(|e| HomeserverError::File {
            what: "cannot use the sessions directory",
            path: self.dir.clone(),
            reason: e.to_string(),
        })
    }
}

impl Session {
    /// Loads the saved session; `Ok(None)` when there is none.
    pub fn load_if_any(path: &Path) -> Result<Option<Session>, HomeserverError> {
        let file_error = |reason: String| HomeserverError::File {
            what: "the session file",
            path: path.to_path_buf(),
            reason,
        };
        let Some(mut file) =
            crate::paths::open_private_if_any(path).map_err(|e| file_error(e.to_string()))?
        else {
            return Ok(None);
        };
        let mut text = zeroize::Zeroizing::new(String::new());
        std::io::Read::read_to_string(&mut file, &mut text)
            .map_err(|e| file_error(e.to_string()))?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| file_error(format!("not valid JSON: {e}")))?;
        let field = |name: &str| {
            v.get(name)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| file_error(format!("it has no {name}")))
        };
        Ok(Some(Session {
            homeserver: field("homeserver")?,
            user_id: field("user_id")?,
            device_id: field("device_id")?,
            access_token: SecretString::from(field("access_token")?),
            olm_account: v
                .get("olm_account")
                .and_then(Value::as_str)
                .map(|s| SecretString::from(s.to_string())),
            insecure_http: v
                .get("insecure_http")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            token: v.get("token").and_then(Value::as_str).map(str::to_string),
        }))
    }

    /// Loads the saved session; an error when there is none.
    pub fn load(path: &Path) -> Result<Session, HomeserverError> {
        Self::load_if_any(path)?.ok_or_else(|| HomeserverError::NotLoggedIn {
            path: path.to_path_buf(),
        })
    }

    /// Writes the session to a 0600 temporary file and renames it into place; the
    /// directory must exist ([`Sessions::save`] makes it).
    pub fn save(&self, path: &Path) -> Result<(), HomeserverError> {
        let io = |reason: String| HomeserverError::File {
            what: "cannot write the session file",
            path: path.to_path_buf(),
            reason,
        };
        let body = json!({
            "homeserver": self.homeserver,
            "user_id": self.user_id,
            "device_id": self.device_id,
            "access_token": self.access_token.expose_secret(),
            "olm_account": self.olm_account.as_ref().map(|a| a.expose_secret().to_string()),
            "insecure_http": self.insecure_http,
            "token": self.token,
        });
        let text = zeroize::Zeroizing::new(body.to_string());
        crate::files::write_private(path, text.as_bytes()).map_err(|e| io(e.to_string()))
    }
}
