//! The login session (homeserver, user, device, access token, mxhsm's Olm device), kept in
//! a 0600 file under the XDG data directory (`$XDG_DATA_HOME/mxhsm/session.json`, by
//! default `~/.local/share/mxhsm/session.json`).

use std::os::unix::fs::PermissionsExt;
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
    let data = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| "/".into());
            home.join(".local/share")
        });
    data.join("mxhsm").join("session.json")
}

impl Session {
    /// Loads the saved session.
    pub fn load(path: &Path) -> Result<Session, HomeserverError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            HomeserverError::Input(format!(
                "not logged in ({}: {e}); run `mxhsm login` first",
                path.display()
            ))
        })?;
        let v: Value = serde_json::from_str(&text).map_err(|e| {
            HomeserverError::Input(format!("{} is not valid JSON: {e}", path.display()))
        })?;
        let field = |name: &str| {
            v.get(name)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| HomeserverError::Input(format!("{} has no {name}", path.display())))
        };
        Ok(Session {
            homeserver: field("homeserver")?,
            user_id: field("user_id")?,
            device_id: field("device_id")?,
            access_token: SecretString::from(field("access_token")?),
            olm_account: v
                .get("olm_account")
                .and_then(Value::as_str)
                .map(|s| SecretString::from(s.to_string())),
        })
    }

    /// Writes the session to a 0600 temporary file and renames it into place.
    pub fn save(&self, path: &Path) -> Result<(), HomeserverError> {
        let io = |e: std::io::Error| {
            HomeserverError::Input(format!("cannot write {}: {e}", path.display()))
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(io)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        let body = json!({
            "homeserver": self.homeserver,
            "user_id": self.user_id,
            "device_id": self.device_id,
            "access_token": self.access_token.expose_secret(),
            "olm_account": self.olm_account.as_ref().map(|a| a.expose_secret().to_string()),
        });
        crate::files::write_private(path, body.to_string().as_bytes()).map_err(io)
    }
}
