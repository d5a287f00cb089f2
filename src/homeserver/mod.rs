//! A blocking Client-Server API client for the endpoints mxhsm needs: login, whoami,
//! logout, device keys, cross-signing keys, signatures, key backup, account data.
//!
//! Request bodies and the objects mxhsm signs are `serde_json::Value`, so that unknown
//! fields survive byte for byte (they are covered by signatures). Everything the server
//! says is untrusted and checked above this layer; this layer bounds it:
//!
//! * **Transport.** `https://` anywhere, `http://` only to loopback unless the caller
//!   allows it ([`url::HomeserverUrl`]). Certificates are checked against the system trust
//!   store (`SSL_CERT_FILE` and `SSL_CERT_DIR` are honoured), falling back to the built-in
//!   web roots only when the system has none. Redirects are not followed: the access token
//!   must not travel to wherever a server points.
//! * **Size.** Every answer is read through a limit chosen per endpoint ([`Limit`]), and
//!   parsed from the stream, never from one `String`; past the limit the request fails with
//!   [`HomeserverError::TooLarge`]. The backup download goes to a file, not to memory.
//! * **Time.** No global timeout: a connection that delivers nothing for the idle timeout
//!   (60 s by default) fails, a slow one that keeps delivering finishes.
//! * **Retries.** 429 (honouring `retry_after_ms`) is retried for every request. 5xx and
//!   dropped connections are retried only for requests that are safe to repeat: creating a
//!   device, a backup version or a cross-signing identity is never sent twice.
//! * **Text.** Server-provided strings in errors are escaped ([`crate::text::escape`]) when
//!   they are displayed.

pub mod session;
pub mod url;

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

pub use session::{Session, Sessions};
pub use url::HomeserverUrl;

use crate::matrix::backup::BackupVersion;
use crate::text::escape;

/// Attempts per request (first try + retries).
const ATTEMPTS: u32 = 5;
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// The default for [`ClientOptions::idle_timeout`].
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How much of an answer mxhsm reads, per kind of endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// Small JSON answers (login, whoami, account data, a backup version): 1 MiB.
    Small,
    /// `/keys/query`: 16 MiB (tens of thousands of devices).
    KeysQuery,
    /// The backup download, streamed to a file: 4 GiB.
    Backup,
}

impl Limit {
    pub fn bytes(self) -> u64 {
        match self {
            Limit::Small => 1 << 20,
            Limit::KeysQuery => 16 << 20,
            Limit::Backup => 4 << 30,
        }
    }
}

/// Error bodies (non-200 answers) are read up to this size.
const ERROR_BODY_LIMIT: u64 = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum HomeserverError {
    #[error("{:?} {}", escape(.url), escape(.reason))]
    BadUrl { url: String, reason: String },
    #[error(
        "refusing plain http:// to {}: the password and access token would cross the network unencrypted; use https://, or pass --insecure-http if you really mean it",
        escape(.url)
    )]
    PlainHttp { url: String },
    #[error("{endpoint}: cannot reach the homeserver: {}", escape(.reason))]
    Network { endpoint: String, reason: String },
    #[error(
        "{endpoint}: the homeserver sent nothing for {seconds} s; giving up (MXHSM_IDLE_TIMEOUT sets how long to wait)"
    )]
    Stalled { endpoint: String, seconds: u64 },
    #[error("{endpoint}: the homeserver answered {status} {}: {}", escape(.errcode), escape(.error))]
    Http {
        endpoint: String,
        status: u16,
        errcode: String,
        error: String,
    },
    #[error("{endpoint}: the homeserver's answer is not what the spec says: {}", escape(.reason))]
    BadResponse { endpoint: String, reason: String },
    #[error("{endpoint}: the homeserver's answer is larger than {} MiB; refusing to read more", .limit >> 20)]
    TooLarge { endpoint: String, limit: u64 },
    #[error(
        "the homeserver delegates authentication to an OAuth server: approve resetting your cross-signing keys at {} and run the command again",
        escape(.url)
    )]
    OAuthApproval { url: String },
    #[error("the homeserver requires {} to do this, which mxhsm cannot do", escape(.stages))]
    UnsupportedAuth { stages: String },
    #[error("wrong password for {}: nothing was changed on the server", escape(.user_id))]
    WrongPassword { user_id: String },
    #[error(
        "asked to log in as {}, but the homeserver logged in {}: refusing the session",
        escape(.asked),
        escape(.answered)
    )]
    UserMismatch { asked: String, answered: String },
    #[error("not logged in (no session in {})", .path.display())]
    NotLoggedIn { path: std::path::PathBuf },
    #[error("{}", escape(.0))]
    Input(String),
    #[error("{what} {}: {reason}", .path.display())]
    File {
        what: &'static str,
        path: std::path::PathBuf,
        reason: String,
    },
}

impl HomeserverError {
    /// The Matrix `errcode`, for HTTP errors.
    pub fn errcode(&self) -> Option<&str> {
        match self {
            HomeserverError::Http { errcode, .. } => Some(errcode),
            _ => None,
        }
    }

    /// The HTTP status, for HTTP errors.
    pub fn status(&self) -> Option<u16> {
        match self {
            HomeserverError::Http { status, .. } => Some(*status),
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

/// Settings of a [`Client`] that the user chooses.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Allow `http://` to hosts other than loopback.
    pub insecure_http: bool,
    /// A connection that delivers nothing for this long fails.
    pub idle_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            insecure_http: false,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

impl ClientOptions {
    /// The defaults, with the idle timeout from `MXHSM_IDLE_TIMEOUT` (seconds) if set.
    pub fn from_env() -> Result<ClientOptions, HomeserverError> {
        let mut o = ClientOptions::default();
        if let Some(v) = std::env::var("MXHSM_IDLE_TIMEOUT")
            .ok()
            .filter(|v| !v.is_empty())
        {
            let secs: u64 = v.parse().ok().filter(|s| *s > 0).ok_or_else(|| {
                HomeserverError::Input(format!(
                    "MXHSM_IDLE_TIMEOUT must be a number of seconds, not {v:?}"
                ))
            })?;
            o.idle_timeout = Duration::from_secs(secs);
        }
        Ok(o)
    }
}

/// Whether a request may be sent again after a failure whose effect is unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Repeat {
    /// Sending it twice does no harm (queries, uploads of the same data).
    Safe,
    /// It creates something (a device, a backup version, an identity): retried only when
    /// the server certainly did not act on it (429, or the connection was never made).
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Get,
    Post,
    Put,
}

impl Method {
    fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
        }
    }
}

/// A client for one homeserver, with or without an access token.
pub struct Client {
    url: HomeserverUrl,
    agent: ureq::Agent,
    access_token: Option<SecretString>,
    options: ClientOptions,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// The system's trusted roots (honouring `SSL_CERT_FILE` / `SSL_CERT_DIR`), read once.
fn system_roots() -> Option<Arc<Vec<ureq::tls::Certificate<'static>>>> {
    static ROOTS: std::sync::OnceLock<Option<Arc<Vec<ureq::tls::Certificate<'static>>>>> =
        std::sync::OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let certs: Vec<_> = found
                .certs
                .iter()
                .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
                .collect();
            (!certs.is_empty()).then(|| Arc::new(certs))
        })
        .clone()
}

fn agent(options: &ClientOptions) -> ureq::Agent {
    let roots = match system_roots() {
        Some(certs) => ureq::tls::RootCerts::Specific(certs),
        None => ureq::tls::RootCerts::WebPki,
    };
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_global(None)
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .timeout_per_read(Some(options.idle_timeout))
        .timeout_per_write(Some(options.idle_timeout))
        .tls_config(ureq::tls::TlsConfig::builder().root_certs(roots).build())
        .user_agent(concat!("mxhsm/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

/// A reader that fails with [`TooLargeMarker`] past `left` bytes.
struct Bounded<R> {
    inner: R,
    left: u64,
}

#[derive(Debug)]
struct TooLargeMarker;

impl std::fmt::Display for TooLargeMarker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the answer is larger than its limit")
    }
}

impl std::error::Error for TooLargeMarker {}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            // One byte more tells "exactly at the limit" from "past it".
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => Err(std::io::Error::other(TooLargeMarker)),
            };
        }
        let max = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..max])?;
        self.left -= n as u64;
        Ok(n)
    }
}

/// What went wrong while reading an answer's body.
enum ReadFailure {
    /// Past the limit: not retried.
    TooLarge,
    /// The body was cut off or stalled: retried like a dropped connection.
    Cut(std::io::Error),
    /// The body is not what was expected (not retried).
    Bad(String),
    /// Not the network's fault (a local file could not be written): not retried.
    Fatal(HomeserverError),
}

fn classify_io(e: std::io::Error) -> ReadFailure {
    if e.get_ref().is_some_and(|i| i.is::<TooLargeMarker>()) {
        ReadFailure::TooLarge
    } else {
        ReadFailure::Cut(e)
    }
}

/// Whether a body read failed because the connection sent nothing for the idle timeout:
/// ureq reports its timeouts wrapped in the I/O error, the socket as `TimedOut`.
fn is_idle(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::TimedOut
        || e.get_ref()
            .and_then(|inner| inner.downcast_ref::<ureq::Error>())
            .is_some_and(|u| matches!(u, ureq::Error::Timeout(_)))
}

/// Parses JSON from a bounded reader.
fn parse_json(body: &mut ureq::Body, limit: u64) -> Result<Value, ReadFailure> {
    let reader = body.with_config().limit(u64::MAX).reader();
    let mut bounded = Bounded {
        inner: reader,
        left: limit,
    };
    let mut de = serde_json::Deserializer::from_reader(&mut bounded);
    let v = serde::Deserialize::deserialize(&mut de).map_err(|e| match e.classify() {
        serde_json::error::Category::Io => classify_io(std::io::Error::from(e)),
        _ => ReadFailure::Bad(e.to_string()),
    })?;
    de.end().map_err(|e| ReadFailure::Bad(e.to_string()))?;
    Ok(v)
}

/// An error body: JSON up to [`ERROR_BODY_LIMIT`], else `Null`.
fn error_body(body: &mut ureq::Body) -> Value {
    parse_json(body, ERROR_BODY_LIMIT).unwrap_or(Value::Null)
}

impl Client {
    /// A client for `homeserver` (e.g. `https://matrix.example.org`).
    pub fn new(
        homeserver: &str,
        access_token: Option<SecretString>,
        options: &ClientOptions,
    ) -> Result<Self, HomeserverError> {
        let url = HomeserverUrl::parse(homeserver, options.insecure_http)?;
        Ok(Client {
            agent: agent(options),
            url,
            access_token,
            options: options.clone(),
        })
    }

    /// A client logged in with `session`. A session made with `--insecure-http` keeps it.
    pub fn for_session(
        session: &Session,
        options: &ClientOptions,
    ) -> Result<Self, HomeserverError> {
        let mut options = options.clone();
        options.insecure_http |= session.insecure_http;
        Self::new(
            &session.homeserver,
            Some(SecretString::from(
                session.access_token.expose_secret().to_string(),
            )),
            &options,
        )
    }

    pub fn homeserver(&self) -> &str {
        self.url.as_str()
    }

    pub fn url(&self) -> &HomeserverUrl {
        &self.url
    }

    /// One request with retries. `read` consumes a 200 answer's body; other answers are
    /// returned as (status, error JSON).
    fn exchange<T>(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        repeat: Repeat,
        limit: u64,
        read: &mut dyn FnMut(&mut ureq::Body) -> Result<T, ReadFailure>,
    ) -> Result<Result<T, (u16, Value)>, HomeserverError> {
        let url = format!("{}/_matrix/client/v3{path}", self.url.as_str());
        let endpoint = format!(
            "{} {}",
            method.as_str(),
            path.split('?').next().unwrap_or(path)
        );
        let auth = self
            .access_token
            .as_ref()
            .map(|t| format!("Bearer {}", t.expose_secret()));
        let empty = json!({});
        let mut backoff = FIRST_BACKOFF;
        // What the events say of the request: method and path, never the query, a body or
        // a header (the access token).
        let shown = crate::text::escape(&endpoint).into_owned();
        for attempt in 1..=ATTEMPTS {
            let last = attempt == ATTEMPTS;
            let started = std::time::Instant::now();
            tracing::debug!("→ {shown}");
            let result = match method {
                Method::Get => {
                    let mut r = self.agent.get(&url);
                    if let Some(a) = &auth {
                        r = r.header("Authorization", a);
                    }
                    r.call()
                }
                Method::Post | Method::Put => {
                    let mut r = if method == Method::Put {
                        self.agent.put(&url)
                    } else {
                        self.agent.post(&url)
                    };
                    if let Some(a) = &auth {
                        r = r.header("Authorization", a);
                    }
                    r.send_json(body.unwrap_or(&empty))
                }
            };
            let failure: String = match result {
                Err(e) => {
                    tracing::info!(
                        "{shown} failed after {} ms: {}",
                        started.elapsed().as_millis(),
                        crate::text::escape(&e.to_string())
                    );
                    let never_sent = matches!(
                        &e,
                        ureq::Error::HostNotFound
                            | ureq::Error::ConnectionFailed
                            | ureq::Error::Timeout(ureq::Timeout::Connect | ureq::Timeout::Resolve)
                    ) || matches!(&e, ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused);
                    if let ureq::Error::Timeout(ureq::Timeout::PerRead) = e {
                        if repeat == Repeat::Never || last {
                            return Err(self.stalled(endpoint));
                        }
                    } else if repeat == Repeat::Never && !never_sent {
                        return Err(HomeserverError::Network {
                            endpoint,
                            reason: format!(
                                "{e} (not sent again: it may have been carried out; check before repeating)"
                            ),
                        });
                    }
                    e.to_string()
                }
                Ok(mut resp) => {
                    let status = resp.status().as_u16();
                    tracing::info!("{shown} → {status} in {} ms", started.elapsed().as_millis());
                    if status == 200 {
                        match read(resp.body_mut()) {
                            Ok(v) => return Ok(Ok(v)),
                            Err(ReadFailure::TooLarge) => {
                                return Err(HomeserverError::TooLarge { endpoint, limit });
                            }
                            Err(ReadFailure::Bad(reason)) => {
                                return Err(HomeserverError::BadResponse { endpoint, reason });
                            }
                            Err(ReadFailure::Fatal(e)) => return Err(e),
                            Err(ReadFailure::Cut(io)) => {
                                if is_idle(&io) && (repeat == Repeat::Never || last) {
                                    return Err(self.stalled(endpoint));
                                }
                                if repeat == Repeat::Never {
                                    return Err(HomeserverError::Network {
                                        endpoint,
                                        reason: format!("the answer was cut off: {io}"),
                                    });
                                }
                                format!("the answer was cut off: {io}")
                            }
                        }
                    } else {
                        let value = error_body(resp.body_mut());
                        let retryable = status == 429 || (status >= 500 && repeat == Repeat::Safe);
                        if !retryable || last {
                            return Ok(Err((status, value)));
                        }
                        if status == 429
                            && let Some(ms) = value.get("retry_after_ms").and_then(Value::as_u64)
                        {
                            backoff = Duration::from_millis(ms.min(60_000));
                        }
                        format!("{status}")
                    }
                }
            };
            if last {
                return Err(HomeserverError::Network {
                    endpoint,
                    reason: failure,
                });
            }
            tracing::warn!(
                "{shown}: {}; retrying in {:.1} s (attempt {} of {ATTEMPTS})",
                crate::text::escape(&failure),
                backoff.as_secs_f64(),
                attempt + 1
            );
            std::thread::sleep(backoff);
            backoff *= 2;
        }
        unreachable!("the last attempt returns")
    }

    /// `endpoint` sent nothing for the idle timeout.
    fn stalled(&self, endpoint: String) -> HomeserverError {
        HomeserverError::Stalled {
            endpoint,
            seconds: self.options.idle_timeout.as_secs(),
        }
    }

    /// A request whose success is a 200 with a JSON object of at most `limit`.
    fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        repeat: Repeat,
        limit: Limit,
    ) -> Result<Value, HomeserverError> {
        match self.json_or_status(method, path, body, repeat, limit)? {
            Ok(v) => check(method, path, 200, v),
            Err((status, v)) => check(method, path, status, v),
        }
    }

    /// `POST /login` with a password, as `user` (a user ID or localpart). The user ID the
    /// server logged in must be the one asked for; `device_id` (if any) and the display
    /// name are sent as given.
    pub fn login_password(
        homeserver: &str,
        user: &str,
        password: &SecretString,
        device_id: Option<&str>,
        display_name: &str,
        options: &ClientOptions,
    ) -> Result<Session, HomeserverError> {
        let client = Client::new(homeserver, None, options)?;
        let mut body = json!({
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user},
            "password": password.expose_secret(),
            "initial_device_display_name": display_name,
        });
        if let Some(d) = device_id {
            body["device_id"] = json!(d);
        }
        let answer = client.json_or_status(
            Method::Post,
            "/login",
            Some(&body),
            Repeat::Never,
            Limit::Small,
        )?;
        let v = match answer {
            Ok(v) => check(Method::Post, "/login", 200, v)?,
            Err((403, v)) if v.get("errcode").and_then(Value::as_str) == Some("M_FORBIDDEN") => {
                return Err(HomeserverError::WrongPassword {
                    user_id: user.to_string(),
                });
            }
            Err((status, v)) => check(Method::Post, "/login", status, v)?,
        };
        let field = |name: &str| {
            v.get(name)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| HomeserverError::BadResponse {
                    endpoint: "POST /login".into(),
                    reason: format!("no {name}"),
                })
        };
        let user_id = field("user_id")?;
        if let Err(e) = check_logged_in_user(user, &user_id) {
            // The server made a device anyway: end it rather than leave it behind.
            if let Ok(token) = field("access_token") {
                let _ = Client::new(
                    client.url.as_str(),
                    Some(SecretString::from(token)),
                    options,
                )
                .and_then(|c| c.logout());
            }
            return Err(e);
        }
        Ok(Session {
            homeserver: client.url.as_str().to_string(),
            user_id,
            device_id: field("device_id")?,
            access_token: SecretString::from(field("access_token")?),
            olm_account: None,
            insecure_http: client.url.is_insecure(),
            token: None,
        })
    }

    /// `GET /account/whoami`: (user ID, device ID).
    pub fn whoami(&self) -> Result<(String, Option<String>), HomeserverError> {
        let v = self.call(
            Method::Get,
            "/account/whoami",
            None,
            Repeat::Safe,
            Limit::Small,
        )?;
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

    /// `POST /logout`.
    pub fn logout(&self) -> Result<(), HomeserverError> {
        self.call(Method::Post, "/logout", None, Repeat::Never, Limit::Small)
            .map(|_| ())
    }

    /// `POST /keys/upload` with our device keys.
    pub fn upload_device_keys(&self, device_keys: &Value) -> Result<(), HomeserverError> {
        self.call(
            Method::Post,
            "/keys/upload",
            Some(&json!({"device_keys": device_keys})),
            Repeat::Safe,
            Limit::Small,
        )
        .map(|_| ())
    }

    /// `POST /keys/query` for `users` (all their devices), parsed from the stream with a
    /// limit of [`Limit::KeysQuery`].
    pub fn query_keys(&self, users: &[&str]) -> Result<Value, HomeserverError> {
        let device_keys: serde_json::Map<String, Value> =
            users.iter().map(|u| (u.to_string(), json!([]))).collect();
        self.call(
            Method::Post,
            "/keys/query",
            Some(&json!({"device_keys": device_keys, "timeout": 10000})),
            Repeat::Safe,
            Limit::KeysQuery,
        )
    }

    /// `POST /keys/signatures/upload`; returns the per-key failures
    /// (`{user: {key_id: {errcode, ...}}}`), empty when everything was accepted.
    pub fn upload_signatures(
        &self,
        body: &Value,
    ) -> Result<Vec<SignatureFailure>, HomeserverError> {
        let v = self.call(
            Method::Post,
            "/keys/signatures/upload",
            Some(body),
            Repeat::Safe,
            Limit::Small,
        )?;
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
    /// Never sent twice on a server error: a second upload of the same keys can fail in
    /// ways the first did not.
    pub fn upload_cross_signing_keys(
        &self,
        user_id: &str,
        keys: &Value,
        auth: UiaAuth<'_>,
    ) -> Result<(), HomeserverError> {
        const PATH: &str = "/keys/device_signing/upload";
        let first =
            self.json_or_status(Method::Post, PATH, Some(keys), Repeat::Never, Limit::Small)?;
        let value = match first {
            Ok(v) => return check(Method::Post, PATH, 200, v).map(|_| ()),
            Err((401, v)) => v,
            Err((status, v)) => return check(Method::Post, PATH, status, v).map(|_| ()),
        };
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
        match self.json_or_status(Method::Post, PATH, Some(&body), Repeat::Never, Limit::Small)? {
            Ok(v) => check(Method::Post, PATH, 200, v).map(|_| ()),
            Err((401, v)) if v.get("errcode").and_then(Value::as_str) == Some("M_FORBIDDEN") => {
                Err(HomeserverError::WrongPassword {
                    user_id: user_id.to_string(),
                })
            }
            Err((status, v)) => check(Method::Post, PATH, status, v).map(|_| ()),
        }
    }

    /// One request answered with JSON of at most `limit`: `Ok(body)` for a 200,
    /// `Err((status, error body))` otherwise.
    fn json_or_status(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        repeat: Repeat,
        limit: Limit,
    ) -> Result<Result<Value, (u16, Value)>, HomeserverError> {
        self.exchange(method, path, body, repeat, limit.bytes(), &mut |b| {
            parse_json(b, limit.bytes())
        })
    }
}

/// Key backup (`/room_keys`).
impl Client {
    /// `POST /room_keys/version`: a new backup version; returns its version string. Never
    /// sent twice on a server error (each success makes a new version).
    pub fn create_backup_version(
        &self,
        algorithm: &str,
        auth_data: &Value,
    ) -> Result<String, HomeserverError> {
        let v = self.call(
            Method::Post,
            "/room_keys/version",
            Some(&json!({"algorithm": algorithm, "auth_data": auth_data})),
            Repeat::Never,
            Limit::Small,
        )?;
        v.get("version")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| HomeserverError::BadResponse {
                endpoint: "POST /room_keys/version".into(),
                reason: "no version".into(),
            })
    }

    /// `PUT /room_keys/version/{version}`: new `auth_data` for an existing version.
    pub fn update_backup_version(
        &self,
        version: &str,
        algorithm: &str,
        auth_data: &Value,
    ) -> Result<(), HomeserverError> {
        self.call(
            Method::Put,
            &format!("/room_keys/version/{}", path_segment(version)),
            Some(&json!({"algorithm": algorithm, "auth_data": auth_data, "version": version})),
            Repeat::Safe,
            Limit::Small,
        )
        .map(|_| ())
    }

    /// `GET /room_keys/version[/{version}]`: the current backup version (or the one
    /// named), or `None` if there is none.
    pub fn backup_version(
        &self,
        version: Option<&str>,
    ) -> Result<Option<BackupVersion>, HomeserverError> {
        let path = match version {
            None => "/room_keys/version".to_string(),
            Some(v) => format!("/room_keys/version/{}", path_segment(v)),
        };
        let v = match self.json_or_status(Method::Get, &path, None, Repeat::Safe, Limit::Small)? {
            Ok(v) => check(Method::Get, &path, 200, v)?,
            Err((404, v)) if v.get("errcode").and_then(Value::as_str) == Some("M_NOT_FOUND") => {
                return Ok(None);
            }
            Err((status, v)) => check(Method::Get, &path, status, v)?,
        };
        BackupVersion::from_json(&v)
            .map(Some)
            .ok_or_else(|| HomeserverError::BadResponse {
                endpoint: format!("GET {path}"),
                reason: "no version or algorithm".into(),
            })
    }

    /// `GET /room_keys/keys?version=V`: every backed-up session, streamed into `sink`
    /// (up to [`Limit::Backup`]); `progress` is told the bytes received so far. A transfer
    /// cut off or stalled is retried from the start (the endpoint has no ranges), so
    /// `sink` is called again for each attempt and must start a fresh file.
    pub fn download_backup_keys(
        &self,
        version: &str,
        sink: &mut dyn FnMut() -> std::io::Result<Box<dyn BackupSink>>,
        progress: &dyn Fn(u64),
    ) -> Result<(), HomeserverError> {
        let path = format!("/room_keys/keys?version={}", path_segment(version));
        let limit = Limit::Backup.bytes();
        let answer = self.exchange(Method::Get, &path, None, Repeat::Safe, limit, &mut |body| {
            let fatal = |e: std::io::Error| {
                ReadFailure::Fatal(HomeserverError::Input(format!(
                    "cannot write the downloaded backup: {e}"
                )))
            };
            let mut out = sink().map_err(fatal)?;
            let reader = body.with_config().limit(u64::MAX).reader();
            let mut bounded = Bounded {
                inner: reader,
                left: Limit::Backup.bytes(),
            };
            let mut buf = vec![0u8; 64 << 10];
            let mut total = 0u64;
            loop {
                let n = match bounded.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(classify_io(e)),
                };
                out.write_all(&buf[..n]).map_err(fatal)?;
                total += n as u64;
                progress(total);
            }
            out.finish().map_err(fatal)?;
            Ok(())
        })?;
        match answer {
            Ok(()) => Ok(()),
            Err((status, v)) => check(Method::Get, &path, status, v).map(|_| ()),
        }
    }

    /// `GET /room_keys/keys/{room}?version=V`: the backed-up sessions of one room,
    /// `{"sessions": {session: KeyBackupData}}` (an unknown room has none).
    pub fn backup_room(&self, version: &str, room_id: &str) -> Result<Value, HomeserverError> {
        let path = format!(
            "/room_keys/keys/{}?version={}",
            path_segment(room_id),
            path_segment(version)
        );
        match self.json_or_status(Method::Get, &path, None, Repeat::Safe, Limit::KeysQuery)? {
            Ok(v) => check(Method::Get, &path, 200, v),
            Err((404, _)) => Ok(json!({"sessions": {}})),
            Err((status, v)) => check(Method::Get, &path, status, v),
        }
    }

    /// `GET /room_keys/keys/{room}/{session}?version=V`: one backed-up session, or `None`.
    pub fn backup_session(
        &self,
        version: &str,
        room_id: &str,
        session_id: &str,
    ) -> Result<Option<Value>, HomeserverError> {
        let path = format!(
            "/room_keys/keys/{}/{}?version={}",
            path_segment(room_id),
            path_segment(session_id),
            path_segment(version)
        );
        match self.json_or_status(Method::Get, &path, None, Repeat::Safe, Limit::Small)? {
            Ok(v) => check(Method::Get, &path, 200, v).map(Some),
            Err((404, _)) => Ok(None),
            Err((status, v)) => check(Method::Get, &path, status, v).map(Some),
        }
    }

    /// `PUT /room_keys/keys?version=V` with `{"rooms": …}`.
    pub fn put_backup_keys(&self, version: &str, rooms: &Value) -> Result<Value, HomeserverError> {
        self.call(
            Method::Put,
            &format!("/room_keys/keys?version={}", path_segment(version)),
            Some(&json!({ "rooms": rooms })),
            Repeat::Safe,
            Limit::Small,
        )
    }
}

/// Where a backup download goes: written in order, then finished (only a finished sink
/// counts as a complete download).
pub trait BackupSink: Write {
    fn finish(self: Box<Self>) -> std::io::Result<()>;
}

/// Server discovery (spec "Server discovery": `/.well-known/matrix/client`).
impl Client {
    /// `GET /.well-known/matrix/client` on this origin (not under the client API), read up
    /// to [`Limit::Small`]; `None` when the origin serves none (any status but 200).
    pub fn well_known(&self) -> Result<Option<Value>, HomeserverError> {
        let url = format!("{}/.well-known/matrix/client", self.url.as_str());
        let endpoint = "GET /.well-known/matrix/client".to_string();
        match self.agent.get(&url).call() {
            Ok(mut resp) if resp.status().as_u16() == 200 => {
                parse_json(resp.body_mut(), Limit::Small.bytes())
                    .map(Some)
                    .map_err(|e| HomeserverError::BadResponse {
                        endpoint,
                        reason: match e {
                            ReadFailure::Bad(r) => r,
                            ReadFailure::TooLarge => "larger than 1 MiB".into(),
                            _ => "the answer was cut off".into(),
                        },
                    })
            }
            Ok(_) => Ok(None),
            Err(e) => Err(HomeserverError::Network {
                endpoint,
                reason: e.to_string(),
            }),
        }
    }
}

/// Where the client API of `input` is. A URL (`https://matrix.example.org`) is used as it
/// is. A server name (`example.org`, `example.org:8448`, the part of a user ID after the
/// colon) is looked up at `https://NAME/.well-known/matrix/client`: its
/// `m.homeserver.base_url`, checked like a URL given by the user (https, or plain http
/// only to this machine), or `https://NAME` itself when it serves none.
pub fn discover(input: &str, options: &ClientOptions) -> Result<HomeserverUrl, HomeserverError> {
    let input = input.trim();
    if input.contains("://") {
        return HomeserverUrl::parse(input, options.insecure_http);
    }
    let bad = |reason: &str| HomeserverError::BadUrl {
        url: input.to_string(),
        reason: reason.to_string(),
    };
    if input.is_empty()
        || input.contains(['/', '?', '#', '@'])
        || input.chars().any(char::is_whitespace)
    {
        return Err(bad(
            "it is neither a homeserver URL (https://…) nor a server name (example.org)",
        ));
    }
    let origin = HomeserverUrl::parse(&format!("https://{input}"), false)?;
    let client = Client::new(origin.as_str(), None, options)?;
    let Some(found) = client.well_known()? else {
        return Ok(origin);
    };
    let base = found
        .get("m.homeserver")
        .and_then(|h| h.get("base_url"))
        .and_then(Value::as_str)
        .ok_or_else(|| HomeserverError::BadResponse {
            endpoint: "GET /.well-known/matrix/client".into(),
            reason: "it has no m.homeserver.base_url".into(),
        })?;
    HomeserverUrl::parse(base, options.insecure_http)
}

/// Sync: the long poll `watch` waits on.
impl Client {
    /// How long a sync may wait for news: under the idle timeout, so that a quiet server is
    /// not taken for a dead one (at most 30 s).
    pub fn sync_wait(&self) -> Duration {
        (self.options.idle_timeout / 2).min(Duration::from_secs(30))
    }

    /// `GET /sync` with an inline `filter`, from `since` (the last answer's `next_batch`),
    /// waiting up to [`Client::sync_wait`] for news; the answer is read up to
    /// [`Limit::KeysQuery`].
    pub fn sync(&self, since: Option<&str>, filter: &Value) -> Result<Value, HomeserverError> {
        let mut path = format!(
            "/sync?timeout={}&filter={}",
            self.sync_wait().as_millis(),
            path_segment(&filter.to_string())
        );
        if let Some(s) = since {
            path.push_str("&since=");
            path.push_str(&path_segment(s));
        }
        match self.json_or_status(Method::Get, &path, None, Repeat::Safe, Limit::KeysQuery)? {
            Ok(v) => check(Method::Get, "/sync", 200, v),
            Err((status, v)) => check(Method::Get, "/sync", status, v),
        }
    }
}

/// To-device messages (interactive verification).
impl Client {
    /// `PUT /sendToDevice/{type}/{txnId}`: `content` to one device of one user. The
    /// transaction ID makes a retried PUT a no-op on the server.
    pub fn send_to_device(
        &self,
        event_type: &str,
        user_id: &str,
        device_id: &str,
        content: &Value,
    ) -> Result<(), HomeserverError> {
        let txn = crate::text::random_hex(12).map_err(|e| HomeserverError::Input(e.to_string()))?;
        let path = format!("/sendToDevice/{}/{txn}", path_segment(event_type));
        let body = json!({ "messages": { user_id: { device_id: content } } });
        self.call(Method::Put, &path, Some(&body), Repeat::Safe, Limit::Small)
            .map(|_| ())
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
        match self.json_or_status(Method::Get, &path, None, Repeat::Safe, Limit::Small)? {
            Ok(v) => check(Method::Get, "/user/…/account_data/…", 200, v).map(Some),
            Err((404, v)) if v.get("errcode").and_then(Value::as_str) == Some("M_NOT_FOUND") => {
                Ok(None)
            }
            Err((status, v)) => check(Method::Get, "/user/…/account_data/…", status, v).map(Some),
        }
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
        match self.json_or_status(
            Method::Put,
            &path,
            Some(content),
            Repeat::Safe,
            Limit::Small,
        )? {
            Ok(v) => check(Method::Put, "/user/…/account_data/…", 200, v).map(|_| ()),
            Err((status, v)) => check(Method::Put, "/user/…/account_data/…", status, v).map(|_| ()),
        }
    }
}

/// A signature the server refused in `/keys/signatures/upload`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureFailure {
    pub user_id: String,
    pub key_id: String,
    pub errcode: String,
    pub message: String,
}

impl std::fmt::Display for SignatureFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the server refused the signature on {} {}: {} {}",
            escape(&self.user_id),
            escape(&self.key_id),
            escape(&self.errcode),
            escape(&self.message)
        )
    }
}

fn check(method: Method, path: &str, status: u16, value: Value) -> Result<Value, HomeserverError> {
    let endpoint = format!(
        "{} {}",
        method.as_str(),
        path.split('?').next().unwrap_or(path)
    );
    if status == 200 {
        if value.is_object() {
            return Ok(value);
        }
        return Err(HomeserverError::BadResponse {
            endpoint,
            reason: "the body is not a JSON object".into(),
        });
    }
    let text = |name: &str, default: &str| {
        let s = value.get(name).and_then(Value::as_str).unwrap_or(default);
        // Bounded: an error message is shown to the user, not a document.
        s.chars().take(500).collect::<String>()
    };
    Err(HomeserverError::Http {
        endpoint,
        status,
        errcode: text("errcode", "(no errcode)"),
        error: text("error", "(no message)"),
    })
}

/// Checks the user ID a login answered for against the one asked for (`asked`: a user ID,
/// or a localpart, which must then be the answer's localpart).
pub fn check_logged_in_user(asked: &str, answered: &str) -> Result<(), HomeserverError> {
    let mismatch = || HomeserverError::UserMismatch {
        asked: asked.to_string(),
        answered: answered.to_string(),
    };
    if crate::token::check_user_id(answered).is_err() {
        return Err(mismatch());
    }
    let same = if asked.starts_with('@') {
        asked == answered
    } else {
        answered
            .strip_prefix('@')
            .and_then(|r| r.split_once(':'))
            .is_some_and(|(local, _)| local == asked.to_lowercase())
    };
    if same { Ok(()) } else { Err(mismatch()) }
}

/// Percent-encodes a user ID, device ID or room ID for a URL path segment or query value.
pub fn path_segment(s: &str) -> String {
    const SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(s, SET).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logged_in_user_must_be_the_one_asked_for() {
        check_logged_in_user("@alice:example.org", "@alice:example.org").unwrap();
        check_logged_in_user("alice", "@alice:example.org").unwrap();
        check_logged_in_user("Alice", "@alice:example.org").unwrap();
        for (asked, answered) in [
            ("@alice:example.org", "@bob:example.org"),
            ("@alice:example.org", "@alice:evil.example"),
            ("alice", "@bob:example.org"),
            ("alice", "not a user"),
        ] {
            assert!(
                matches!(
                    check_logged_in_user(asked, answered),
                    Err(HomeserverError::UserMismatch { .. })
                ),
                "{asked} {answered}"
            );
        }
    }

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(path_segment("@alice:example.org"), "%40alice%3Aexample.org");
        assert_eq!(path_segment("!r/../x?y"), "%21r%2F..%2Fx%3Fy");
        assert_eq!(path_segment("a-b_c.d~"), "a-b_c.d~");
    }

    #[test]
    fn bounded_reader_stops_past_the_limit() {
        let mut exact = Bounded {
            inner: &b"12345"[..],
            left: 5,
        };
        let mut out = Vec::new();
        exact.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"12345");
        let mut over = Bounded {
            inner: &b"123456"[..],
            left: 5,
        };
        let e = over.read_to_end(&mut Vec::new()).unwrap_err();
        assert!(matches!(classify_io(e), ReadFailure::TooLarge));
    }

    #[test]
    fn server_text_in_errors_is_escaped() {
        let e = check(
            Method::Get,
            "/x",
            400,
            json!({"errcode": "M_\u{1b}[31m", "error": "line\nfake: verified\u{202e}"}),
        )
        .unwrap_err();
        let shown = e.to_string();
        assert!(
            !shown.contains('\u{1b}') && !shown.contains('\n') && !shown.contains('\u{202e}'),
            "{shown}"
        );
        assert!(
            shown.contains("\\x1b[31m") && shown.contains("line\\nfake"),
            "{shown}"
        );
    }
}
