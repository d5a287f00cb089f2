//! A real Synapse for end-to-end tests: one per test binary, on 127.0.0.1 with SQLite
//! (docs/synapse.md), from the venv `cargo xtask test` installs
//! (MXHSM_TEST_SYNAPSE_PYTHON). A watchdog stops it by its PID when the test process ends.
//!
//! Also a small rewriting proxy: a "malicious homeserver" that serves what the real Synapse
//! serves, with changes, for the tests of forged data Synapse itself would refuse to store.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{Kind, TestToken, ok};

pub struct Synapse {
    pub url: String,
    pub data: PathBuf,
    /// Not waited for: it outlives us by design, to stop Synapse after we exit.
    _watchdog: std::sync::Mutex<std::process::Child>,
}

static SYNAPSE: OnceLock<Synapse> = OnceLock::new();
static COUNTER: AtomicUsize = AtomicUsize::new(0);

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

/// A raw Client-Server API call: (status, JSON body).
pub fn http(
    url: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let full = format!("{url}/_matrix/client/v3{path}");
    let a = agent();
    let auth = token.map(|t| format!("Bearer {t}"));
    let resp = match method {
        "GET" | "DELETE" => {
            let mut r = if method == "GET" {
                a.get(&full)
            } else {
                a.delete(&full)
            };
            if let Some(h) = &auth {
                r = r.header("Authorization", h);
            }
            r.call()
        }
        _ => {
            let mut r = if method == "PUT" {
                a.put(&full)
            } else {
                a.post(&full)
            };
            if let Some(h) = &auth {
                r = r.header("Authorization", h);
            }
            r.send_json(body.unwrap_or(json!({})))
        }
    };
    let mut resp = resp.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

pub struct TestUser {
    pub user_id: String,
    pub localpart: String,
    pub password: String,
}

impl Synapse {
    pub fn get() -> &'static Synapse {
        SYNAPSE.get_or_init(Synapse::start)
    }

    fn start() -> Synapse {
        let python = std::env::var_os("MXHSM_TEST_SYNAPSE_PYTHON")
            .map(PathBuf::from)
            .expect("MXHSM_TEST_SYNAPSE_PYTHON is not set: run the tests with `cargo xtask test`");
        let port = free_port();
        let data = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("synapse-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data);
        let configure =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("hsm-config/synapse/configure.py");
        let ok = Command::new(&python)
            .arg(&configure)
            .arg(&data)
            .arg(port.to_string())
            .status()
            .unwrap();
        assert!(ok.success(), "configuring Synapse failed");
        // The watchdog: runs Synapse, and stops it by its PID when this test process is gone.
        let script = format!(
            "{py} -m synapse.app.homeserver -c {conf} >{data}/stdout.log 2>&1 & S=$!; echo $S >{data}/synapse.pid; \
             while kill -0 {me} 2>/dev/null && kill -0 $S 2>/dev/null; do sleep 0.3; done; kill $S 2>/dev/null; wait $S",
            py = python.display(),
            conf = data.join("homeserver.yaml").display(),
            data = data.display(),
            me = std::process::id(),
        );
        let watchdog = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}");
        let start = Instant::now();
        loop {
            let up = TcpStream::connect(("127.0.0.1", port)).is_ok()
                && agent()
                    .get(format!("{url}/_matrix/client/versions"))
                    .call()
                    .is_ok_and(|r| r.status().as_u16() == 200);
            if up {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(90),
                "Synapse did not start: see {}",
                data.join("homeserver.log").display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Synapse {
            url,
            data,
            _watchdog: std::sync::Mutex::new(watchdog),
        }
    }

    /// Registers a fresh user (`prefix` + a counter + this process's PID).
    pub fn register(&self, prefix: &str) -> TestUser {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let localpart = format!("{prefix}{n}p{}", std::process::id());
        let password = format!("pw-{localpart}");
        let (status, v) = http(
            &self.url,
            "POST",
            "/register",
            None,
            Some(
                json!({"username": localpart, "password": password, "auth": {"type": "m.login.dummy"}}),
            ),
        );
        assert_eq!(status, 200, "register: {v}");
        TestUser {
            user_id: v["user_id"].as_str().unwrap().to_string(),
            localpart,
            password,
        }
    }

    /// Logs in with a password as another client would: its access token.
    pub fn login(&self, user: &TestUser, device_id: &str) -> String {
        let (status, v) = http(
            &self.url,
            "POST",
            "/login",
            None,
            Some(
                json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user.localpart},
                        "password": user.password, "device_id": device_id, "initial_device_display_name": device_id}),
            ),
        );
        assert_eq!(status, 200, "login: {v}");
        v["access_token"].as_str().unwrap().to_string()
    }
}

/// What the proxy may change: the request path, and the answer's status and body.
pub type Rewrite = dyn Fn(&str, &mut u16, &mut Value) + Send + Sync;

/// Answers a request itself instead of forwarding it, when it returns `Some`.
pub type Intercept = dyn Fn(&str) -> Option<(u16, Value)> + Send + Sync;

/// A proxy in front of Synapse that rewrites answers.
pub struct Proxy {
    pub url: String,
}

impl Proxy {
    pub fn start(target: &str, rewrite: Arc<Rewrite>) -> Proxy {
        Self::start_intercepting(target, rewrite, Arc::new(|_| None))
    }

    /// A [`super::hostile::Hostile`] server that answers what `intercept` answers, and
    /// forwards the rest through `rewrite`.
    pub fn start_intercepting(
        target: &str,
        rewrite: Arc<Rewrite>,
        intercept: Arc<Intercept>,
    ) -> Proxy {
        let server = super::hostile::Hostile::start(target, move |r| {
            if let Some((status, v)) = intercept(&r.path) {
                return super::hostile::Reply::Json(status, v);
            }
            let (rewrite, path) = (rewrite.clone(), r.path.clone());
            super::hostile::Reply::Rewrite(Box::new(move |status, v| rewrite(&path, status, v)))
        });
        Proxy { url: server.url }
    }
}

/// Restores the session file when dropped.
pub struct Via<'a> {
    user: &'a MxhsmUser,
    saved: String,
}

impl Drop for Via<'_> {
    fn drop(&mut self) {
        let _ = std::fs::write(self.user.session_path(), &self.saved);
    }
}

/// A user of mxhsm: a token, a Synapse account, a session directory.
pub struct MxhsmUser {
    pub token: TestToken,
    pub user: TestUser,
    pub synapse: &'static Synapse,
}

impl MxhsmUser {
    pub fn new(kind: Kind) -> MxhsmUser {
        let synapse = Synapse::get();
        MxhsmUser {
            token: TestToken::new(kind),
            user: synapse.register("alice"),
            synapse,
        }
    }

    pub fn cli(&self) -> Command {
        let mut c = self.token.cli();
        c.env("XDG_DATA_HOME", self.token.dir.path().join("data"))
            .env("MXHSM_PASSWORD", &self.user.password)
            .stdin(std::process::Stdio::null());
        c
    }

    pub fn login(&self) -> String {
        let out = ok(self.cli().args([
            "--json",
            "login",
            "--homeserver",
            &self.synapse.url,
            "--user",
            &self.user.localpart,
        ]));
        let v: Value = serde_json::from_str(&out).unwrap();
        v["device_id"].as_str().unwrap().to_string()
    }

    pub fn session_path(&self) -> std::path::PathBuf {
        mxhsm::homeserver::Sessions::at(self.token.dir.path().join("data/mxhsm/sessions"))
            .path_for(&self.user.user_id)
    }

    /// The saved session, as JSON.
    pub fn session(&self) -> Value {
        serde_json::from_str(&std::fs::read_to_string(self.session_path()).unwrap()).unwrap()
    }

    /// The public key (base64) of the token's current `role` key of this user.
    pub fn token_key(&self, role: &str) -> String {
        let keys: Value = serde_json::from_str(&ok(self.cli().args([
            "keys",
            "list",
            "--json",
            "--user",
            &self.user.user_id,
        ])))
        .unwrap();
        keys["keys"]
            .as_array()
            .unwrap()
            .iter()
            .rfind(|k| k["role"] == role)
            .unwrap_or_else(|| panic!("no {role} key: {keys}"))["public_key"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// The access token and device ID of the saved session.
    pub fn access(&self) -> (String, String) {
        let s = self.session();
        (
            s["access_token"].as_str().unwrap().to_string(),
            s["device_id"].as_str().unwrap().to_string(),
        )
    }

    /// Points the saved session at `url` (a hostile proxy) until the guard is dropped.
    pub fn via(&self, url: &str) -> Via<'_> {
        let saved = std::fs::read_to_string(self.session_path()).unwrap();
        let mut s: Value = serde_json::from_str(&saved).unwrap();
        s["homeserver"] = json!(url);
        std::fs::write(self.session_path(), s.to_string()).unwrap();
        Via { user: self, saved }
    }

    /// `identity status --json`, which exits with 0, or 3 when it reports a problem.
    pub fn status(&self, extra: &[&str]) -> Value {
        let (code, out, err) = super::run(
            self.cli()
                .args(["identity", "status", "--json"])
                .args(extra),
        );
        assert!(
            code == 0 || code == 3,
            "identity status exited {code}: {err}"
        );
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            v["problems"] == true,
            code == 3,
            "exit code follows problems: {v}"
        );
        v
    }

    pub fn query(&self, token: &str, user: &str) -> Value {
        let (s, v) = http(
            &self.synapse.url,
            "POST",
            "/keys/query",
            Some(token),
            Some(json!({"device_keys": {user: []}})),
        );
        assert_eq!(s, 200);
        v
    }
}
