//! A blocking Client-Server API client for the few endpoints mxhsm needs: login, whoami,
//! logout, device keys, cross-signing keys, signatures.
//!
//! Request and answer bodies are handled as `serde_json::Value` rather than ruma's typed
//! requests: every object mxhsm signs or verifies must keep unknown fields byte for byte
//! (they are covered by signatures), the endpoint set is small, and it keeps the build
//! lean on two cores. Everything the server says is untrusted and checked above this layer.
//!
//! Retries: 429 (honouring `retry_after_ms`), 5xx and dropped connections are retried with
//! exponential backoff; anything else is a clear error naming the endpoint.

pub mod session;

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

pub use session::Session;

/// Attempts per request (first try + retries).
const ATTEMPTS: u32 = 5;
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// The largest answer we read (a key backup of a million sessions is about 700 MB).
const BODY_LIMIT: u64 = 2 << 30;

#[derive(Debug, thiserror::Error)]
pub enum HomeserverError {
    #[error("{endpoint}: cannot reach the homeserver: {reason}")]
    Network { endpoint: String, reason: String },
    #[error("{endpoint}: the homeserver answered {status} {errcode}: {error}")]
    Http {
        endpoint: String,
        status: u16,
        errcode: String,
        error: String,
    },
    #[error("{endpoint}: the homeserver's answer is not what the spec says: {reason}")]
    BadResponse { endpoint: String, reason: String },
    #[error(
        "the homeserver delegates authentication to an OAuth server: approve resetting your cross-signing keys at {url} and run the command again"
    )]
    OAuthApproval { url: String },
    #[error("the homeserver requires {stages} to do this, which mxhsm cannot do")]
    UnsupportedAuth { stages: String },
    #[error("wrong password for {user_id}: nothing was changed on the server")]
    WrongPassword { user_id: String },
    #[error("{0}")]
    Input(String),
}

impl HomeserverError {
    /// The Matrix `errcode`, for HTTP errors.
    pub fn errcode(&self) -> Option<&str> {
        match self {
            HomeserverError::Http { errcode, .. } => Some(errcode),
            _ => None,
        }
    }
}

/// How to pass user-interactive auth when the server asks for it.
pub enum UiaAuth<'a> {
    /// Fail if the server asks for auth.
    None,
    /// Answer `m.login.password` with the password this closure returns (asked only when
    /// the server wants it).
    Password(&'a dyn Fn() -> Result<SecretString, HomeserverError>),
}

/// A client for one homeserver, with or without an access token.
pub struct Client {
    base: String,
    agent: ureq::Agent,
    access_token: Option<SecretString>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

fn encode_path_segment(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Client {
    /// A client for `homeserver` (e.g. `https://matrix.example.org`).
    pub fn new(
        homeserver: &str,
        access_token: Option<SecretString>,
    ) -> Result<Self, HomeserverError> {
        let base = homeserver.trim_end_matches('/').to_string();
        if !(base.starts_with("https://") || base.starts_with("http://")) {
            return Err(HomeserverError::Input(format!(
                "{homeserver:?} is not a homeserver URL (https://…)"
            )));
        }
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .user_agent(concat!("mxhsm/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Ok(Client {
            base,
            agent,
            access_token,
        })
    }

    /// A client logged in with `session`.
    pub fn for_session(session: &Session) -> Result<Self, HomeserverError> {
        Self::new(
            &session.homeserver,
            Some(SecretString::from(
                session.access_token.expose_secret().to_string(),
            )),
        )
    }

    pub fn homeserver(&self) -> &str {
        &self.base
    }

    /// One request with retries; returns (status, JSON body).
    fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), HomeserverError> {
        let (status, text) = self.send_raw(method, path, body)?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    /// One request with retries; returns (status, body text).
    fn send_raw(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, String), HomeserverError> {
        self.send_with(method, path, body, &mut |_, b| read_text(b))
    }

    /// One request with retries: `read` consumes each answer's body (status, body) and
    /// returns its text; a `Retry` from it (a body cut off) counts as a dropped connection.
    /// 429 (honouring `retry_after_ms`), 5xx and dropped connections are retried with
    /// exponential backoff; the last attempt's answer is returned whatever it is.
    fn send_with(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        read: &mut dyn FnMut(u16, &mut ureq::Body) -> Result<String, ReadFailure>,
    ) -> Result<(u16, String), HomeserverError> {
        let url = format!("{}/_matrix/client/v3{path}", self.base);
        let endpoint = format!("{method} {}", path.split('?').next().unwrap_or(path));
        let auth = self
            .access_token
            .as_ref()
            .map(|t| format!("Bearer {}", t.expose_secret()));
        let mut backoff = FIRST_BACKOFF;
        for attempt in 1..=ATTEMPTS {
            let result = if method == "GET" {
                let mut r = self.agent.get(&url);
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.call()
            } else {
                let mut r = match method {
                    "PUT" => self.agent.put(&url),
                    _ => self.agent.post(&url),
                };
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.send_json(body.cloned().unwrap_or_else(|| json!({})))
            };
            let last = attempt == ATTEMPTS;
            let failure = match result {
                Err(e) => e.to_string(),
                Ok(mut resp) => {
                    let status = resp.status().as_u16();
                    match read(status, resp.body_mut()) {
                        Err(ReadFailure::Fatal(e)) => return Err(e),
                        Err(ReadFailure::Retry(reason)) => reason,
                        Ok(text) => {
                            let retryable = status == 429 || status >= 500;
                            if !retryable || last {
                                return Ok((status, text));
                            }
                            if status == 429
                                && let Some(ms) = serde_json::from_str::<Value>(&text)
                                    .ok()
                                    .and_then(|v| v.get("retry_after_ms").and_then(Value::as_u64))
                            {
                                backoff = Duration::from_millis(ms.min(60_000));
                            }
                            String::new()
                        }
                    }
                }
            };
            if last {
                return Err(HomeserverError::Network {
                    endpoint,
                    reason: failure,
                });
            }
            std::thread::sleep(backoff);
            backoff *= 2;
        }
        unreachable!("the last attempt returns")
    }

    /// A request whose success is a 200 with a JSON object.
    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, HomeserverError> {
        let (status, value) = self.send(method, path, body)?;
        check(method, path, status, value)
    }

    /// `POST /login` with a password; the device ID is chosen by the server unless given.
    pub fn login_password(
        homeserver: &str,
        user: &str,
        password: &SecretString,
        device_id: Option<&str>,
        display_name: &str,
    ) -> Result<Session, HomeserverError> {
        let client = Client::new(homeserver, None)?;
        let mut body = json!({
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user},
            "password": password.expose_secret(),
            "initial_device_display_name": display_name,
        });
        if let Some(d) = device_id {
            body["device_id"] = json!(d);
        }
        let (status, value) = client.send("POST", "/login", Some(&body))?;
        if status == 403 && value.get("errcode").and_then(Value::as_str) == Some("M_FORBIDDEN") {
            return Err(HomeserverError::WrongPassword {
                user_id: user.to_string(),
            });
        }
        let v = check("POST", "/login", status, value)?;
        let field = |name: &str| {
            v.get(name)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| HomeserverError::BadResponse {
                    endpoint: "POST /login".into(),
                    reason: format!("no {name}"),
                })
        };
        Ok(Session {
            homeserver: client.base,
            user_id: field("user_id")?,
            device_id: field("device_id")?,
            access_token: SecretString::from(field("access_token")?),
            olm_account: None,
        })
    }

    /// `GET /account/whoami`: (user ID, device ID).
    pub fn whoami(&self) -> Result<(String, Option<String>), HomeserverError> {
        let v = self.call("GET", "/account/whoami", None)?;
        let user = v.get("user_id").and_then(Value::as_str).ok_or_else(|| {
            HomeserverError::BadResponse {
                endpoint: "GET /account/whoami".into(),
                reason: "no user_id".into(),
            }
        })?;
        Ok((
            user.to_string(),
            v.get("device_id")
                .and_then(Value::as_str)
                .map(str::to_string),
        ))
    }

    /// `POST /logout`: ends the session and deletes its device.
    pub fn logout(&self) -> Result<(), HomeserverError> {
        self.call("POST", "/logout", None).map(|_| ())
    }

    /// `POST /keys/upload` with our device keys.
    pub fn upload_device_keys(&self, device_keys: &Value) -> Result<(), HomeserverError> {
        self.call(
            "POST",
            "/keys/upload",
            Some(&json!({"device_keys": device_keys})),
        )
        .map(|_| ())
    }

    /// `POST /keys/query` for `users` (all their devices).
    pub fn query_keys(&self, users: &[&str]) -> Result<Value, HomeserverError> {
        let device_keys: serde_json::Map<String, Value> =
            users.iter().map(|u| (u.to_string(), json!([]))).collect();
        self.call(
            "POST",
            "/keys/query",
            Some(&json!({"device_keys": device_keys, "timeout": 10000})),
        )
    }

    /// `POST /keys/signatures/upload`; returns the per-key failures
    /// (`{user: {key_id: {errcode, ...}}}`), empty when everything was accepted.
    pub fn upload_signatures(
        &self,
        body: &Value,
    ) -> Result<Vec<SignatureFailure>, HomeserverError> {
        let v = self.call("POST", "/keys/signatures/upload", Some(body))?;
        let mut out = Vec::new();
        if let Some(failures) = v.get("failures").and_then(Value::as_object) {
            for (user, keys) in failures {
                for (key, f) in keys.as_object().into_iter().flatten() {
                    out.push(SignatureFailure {
                        user_id: user.clone(),
                        key_id: key.clone(),
                        errcode: f
                            .get("errcode")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                        message: f
                            .get("message")
                            .or_else(|| f.get("error"))
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                    });
                }
            }
        }
        Ok(out)
    }

    /// `POST /keys/device_signing/upload` with user-interactive auth when the server asks.
    pub fn upload_cross_signing_keys(
        &self,
        user_id: &str,
        keys: &Value,
        auth: UiaAuth<'_>,
    ) -> Result<(), HomeserverError> {
        const PATH: &str = "/keys/device_signing/upload";
        let (status, value) = self.send("POST", PATH, Some(keys))?;
        if status != 401 {
            return check("POST", PATH, status, value).map(|_| ());
        }
        let session = value
            .get("session")
            .and_then(Value::as_str)
            .map(str::to_string);
        let flows: Vec<Vec<String>> = value
            .get("flows")
            .and_then(Value::as_array)
            .map(|flows| {
                flows
                    .iter()
                    .map(|f| {
                        f.get("stages")
                            .and_then(Value::as_array)
                            .map(|s| {
                                s.iter()
                                    .filter_map(|x| x.as_str().map(str::to_string))
                                    .collect()
                            })
                            .unwrap_or_default()
                    })
                    .collect()
            })
            .unwrap_or_default();
        let has = |stage: &str| flows.iter().any(|f| f.len() == 1 && f[0] == stage);
        if has("m.oauth") || has("org.matrix.cross_signing_reset") {
            let params = value.get("params").cloned().unwrap_or(Value::Null);
            let url = ["m.oauth", "org.matrix.cross_signing_reset"]
                .iter()
                .find_map(|s| params.get(s)?.get("url")?.as_str())
                .unwrap_or("(the server gave no URL)")
                .to_string();
            return Err(HomeserverError::OAuthApproval { url });
        }
        if !has("m.login.password") {
            return Err(HomeserverError::UnsupportedAuth {
                stages: format!("{flows:?}"),
            });
        }
        let UiaAuth::Password(password) = auth else {
            return Err(HomeserverError::UnsupportedAuth {
                stages: "a password (user-interactive auth)".into(),
            });
        };
        let password = password()?;
        let mut body = keys.clone();
        body["auth"] = json!({
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user_id},
            "password": password.expose_secret(),
            "session": session,
        });
        let (status, value) = self.send("POST", PATH, Some(&body))?;
        if status == 401 {
            let errcode = value.get("errcode").and_then(Value::as_str).unwrap_or("");
            if errcode == "M_FORBIDDEN" {
                return Err(HomeserverError::WrongPassword {
                    user_id: user_id.to_string(),
                });
            }
        }
        check("POST", PATH, status, value).map(|_| ())
    }
}

/// Key backup (`/room_keys`).
impl Client {
    /// `POST /room_keys/version`: a new backup version; returns its version string.
    pub fn create_backup_version(
        &self,
        algorithm: &str,
        auth_data: &Value,
    ) -> Result<String, HomeserverError> {
        let v = self.call(
            "POST",
            "/room_keys/version",
            Some(&json!({"algorithm": algorithm, "auth_data": auth_data})),
        )?;
        v.get("version")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| HomeserverError::BadResponse {
                endpoint: "POST /room_keys/version".into(),
                reason: "no version".into(),
            })
    }

    /// `GET /room_keys/version`: the current backup version, or `None` if there is none.
    pub fn backup_version(&self) -> Result<Option<Value>, HomeserverError> {
        let (status, value) = self.send("GET", "/room_keys/version", None)?;
        if status == 404 && value.get("errcode").and_then(Value::as_str) == Some("M_NOT_FOUND") {
            return Ok(None);
        }
        check("GET", "/room_keys/version", status, value).map(Some)
    }

    /// `GET /room_keys/keys?version=V`: every backed-up session,
    /// `{"rooms": {room: {"sessions": {session: KeyBackupData}}}}`, streamed into a 0600
    /// file at `dest` after `header` (a large backup is hundreds of megabytes: it is never
    /// held in memory whole). The file appears only when the answer is complete; dropped
    /// connections and 5xx answers are retried like any request.
    pub fn download_backup_keys(
        &self,
        version: &str,
        dest: &std::path::Path,
        header: &[u8],
    ) -> Result<(), HomeserverError> {
        let path = format!("/room_keys/keys?version={}", path_segment(version));
        let fatal = |e: std::io::Error| {
            ReadFailure::Fatal(HomeserverError::Input(format!(
                "cannot write {}: {e}",
                dest.display()
            )))
        };
        let (status, text) = self.send_with("GET", &path, None, &mut |status, body| {
            if status != 200 {
                return read_text(body);
            }
            let mut file = crate::files::PrivateFile::create(dest).map_err(fatal)?;
            std::io::Write::write_all(&mut file, header).map_err(fatal)?;
            let mut reader = body.with_config().limit(BODY_LIMIT).reader();
            std::io::copy(&mut reader, &mut file)
                .map_err(|e| ReadFailure::Retry(format!("the answer was cut off: {e}")))?;
            file.commit().map_err(fatal)?;
            Ok(String::new())
        })?;
        if status == 200 {
            return Ok(());
        }
        check(
            "GET",
            &path,
            status,
            serde_json::from_str(&text).unwrap_or(Value::Null),
        )
        .map(|_| ())
    }

    /// `PUT /room_keys/keys?version=V` with `{"rooms": …}`.
    pub fn put_backup_keys(&self, version: &str, rooms: &Value) -> Result<Value, HomeserverError> {
        self.call(
            "PUT",
            &format!("/room_keys/keys?version={}", path_segment(version)),
            Some(&json!({ "rooms": rooms })),
        )
    }
}

/// Account data (secret storage lives there).
impl Client {
    /// `GET /user/{userId}/account_data/{type}`, or `None` when there is none.
    pub fn account_data(
        &self,
        user_id: &str,
        kind: &str,
    ) -> Result<Option<Value>, HomeserverError> {
        let path = format!(
            "/user/{}/account_data/{}",
            path_segment(user_id),
            path_segment(kind)
        );
        let (status, value) = self.send("GET", &path, None)?;
        if status == 404 && value.get("errcode").and_then(Value::as_str) == Some("M_NOT_FOUND") {
            return Ok(None);
        }
        check("GET", "/user/…/account_data/…", status, value).map(Some)
    }

    /// `PUT /user/{userId}/account_data/{type}`.
    pub fn set_account_data(
        &self,
        user_id: &str,
        kind: &str,
        content: &Value,
    ) -> Result<(), HomeserverError> {
        let path = format!(
            "/user/{}/account_data/{}",
            path_segment(user_id),
            path_segment(kind)
        );
        let (status, value) = self.send("PUT", &path, Some(content))?;
        check("PUT", "/user/…/account_data/…", status, value).map(|_| ())
    }
}

/// Why reading an answer's body failed.
enum ReadFailure {
    /// The body was cut off: retried like a dropped connection.
    Retry(String),
    /// Not the network's fault (a local file could not be written): not retried.
    Fatal(HomeserverError),
}

/// The whole body as text. ureq stops at 10 MB by default; a large key backup is bigger.
fn read_text(body: &mut ureq::Body) -> Result<String, ReadFailure> {
    body.with_config()
        .limit(BODY_LIMIT)
        .read_to_string()
        .map_err(|e| ReadFailure::Retry(format!("the answer was cut off: {e}")))
}

/// A signature the server refused in `/keys/signatures/upload`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureFailure {
    pub user_id: String,
    pub key_id: String,
    pub errcode: String,
    pub message: String,
}

fn check(method: &str, path: &str, status: u16, value: Value) -> Result<Value, HomeserverError> {
    let endpoint = format!("{method} {}", path.split('?').next().unwrap_or(path));
    if status == 200 {
        if value.is_object() {
            return Ok(value);
        }
        return Err(HomeserverError::BadResponse {
            endpoint,
            reason: "the body is not a JSON object".into(),
        });
    }
    Err(HomeserverError::Http {
        endpoint,
        status,
        errcode: value
            .get("errcode")
            .and_then(Value::as_str)
            .unwrap_or("(no errcode)")
            .to_string(),
        error: value
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("(no message)")
            .to_string(),
    })
}

/// Percent-encodes a user ID or device ID for a URL path.
pub fn path_segment(s: &str) -> String {
    encode_path_segment(s)
}
