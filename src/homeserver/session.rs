//! The login session (homeserver, user, device, access token, mxhsm's Olm device), kept in
//! a 0600 file under the XDG data directory (`$XDG_DATA_HOME/mxhsm/session.json`, by
//! default `~/.local/share/mxhsm/session.json`).

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

/// Where the session file lives.
pub fn session_path() -> PathBuf {
    crate::paths::dir(crate::paths::Base::Data).join("session.json")
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
        }))
    }

    /// Loads the saved session; an error when there is none.
    pub fn load(path: &Path) -> Result<Session, HomeserverError> {
        Self::load_if_any(path)?.ok_or_else(|| HomeserverError::NotLoggedIn {
            path: path.to_path_buf(),
        })
    }

    /// Writes the session to a 0600 temporary file and renames it into place.
    pub fn save(&self, path: &Path) -> Result<(), HomeserverError> {
        let io = |reason: String| HomeserverError::File {
            what: "cannot write the session file",
            path: path.to_path_buf(),
            reason,
        };
        if path == session_path() {
            crate::paths::private_dir(crate::paths::Base::Data, None)
                .map_err(|e| io(e.to_string()))?;
        } else if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io(e.to_string()))?;
        }
        let body = json!({
            "homeserver": self.homeserver,
            "user_id": self.user_id,
            "device_id": self.device_id,
            "access_token": self.access_token.expose_secret(),
            "olm_account": self.olm_account.as_ref().map(|a| a.expose_secret().to_string()),
            "insecure_http": self.insecure_http,
        });
        let text = zeroize::Zeroizing::new(body.to_string());
        crate::files::write_private(path, text.as_bytes()).map_err(|e| io(e.to_string()))
    }
}
