//! `mxhsm-sdk-peer`: a Matrix device run by matrix-sdk-crypto's `OlmMachine` (memory
//! store), the other side of mxhsm's interactive SAS verification in tests.
//!
//! It logs in with a password, keeps the machine in sync with the homeserver (its outgoing
//! requests sent, `/sync` fed back), and obeys one JSON command per line on stdin with one
//! JSON reply per line on stdout (README.md). Logs go to stderr.
//!
//! Everything runs on one tokio current-thread runtime: three loops joined in one task
//! (outgoing requests, sync, commands). HTTP is blocking (ureq) and runs on tokio's blocking
//! threads, so a long-polling `/sync` never stalls the commands.

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use matrix_sdk_crypto::types::requests::{
    AnyIncomingResponse, AnyOutgoingRequest, OutgoingVerificationRequest,
};
use matrix_sdk_crypto::{
    CancelInfo, DecryptionSettings, EncryptionSyncChanges, OlmMachine, Sas, SasState,
    TrustRequirement, UserIdentity, VerificationRequest, VerificationRequestState,
};
use ruma::api::auth_scheme::{AccessToken, SendAccessToken};
use ruma::api::client::keys::{get_keys, upload_signing_keys};
use ruma::api::client::sync::sync_events;
use ruma::api::client::to_device::send_event_to_device;
use ruma::api::path_builder::VersionHistory;
use ruma::api::{IncomingResponse, MatrixVersion, OutgoingRequest, SupportedVersions};
use ruma::events::key::verification::VerificationMethod;
use ruma::events::key::verification::cancel::CancelCode;
use ruma::serde::Raw;
use ruma::{OwnedDeviceId, OwnedUserId, TransactionId, UserId};
use serde_json::{Value, json};

/// How long one `/sync` long-polls: short, so that a command never waits long behind it.
const SYNC_TIMEOUT_MS: u64 = 2000;
/// How often a waiting command looks at the verification state again.
const POLL: Duration = Duration::from_millis(50);
/// A sync filter without rooms, presence or account data: only to-device events, device
/// lists and key counts come back.
const FILTER: &str = r#"{"room":{"rooms":[]},"presence":{"types":[]},"account_data":{"types":[]}}"#;

macro_rules! log {
    ($($t:tt)*) => { eprintln!("[sdk-peer] {}", format!($($t)*)) };
}

// ---------------------------------------------------------------------------------------
// HTTP: blocking, through ureq; requests and answers are ruma's types.

struct Http {
    agent: ureq::Agent,
    base: String,
    token: String,
}

fn err<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

impl Http {
    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into()
    }

    /// Sends one request, the answer as an `http::Response` whatever its status.
    fn run(&self, request: http::Request<Vec<u8>>) -> Result<http::Response<Vec<u8>>, String> {
        let what = format!("{} {}", request.method(), request.uri().path());
        let response = self
            .agent
            .run(request)
            .map_err(|e| format!("{what}: {e}"))?;
        let (parts, mut body) = response.into_parts();
        let bytes = body.read_to_vec().map_err(|e| format!("{what}: {e}"))?;
        if !parts.status.is_success() {
            log!(
                "{what} -> {}: {}",
                parts.status,
                String::from_utf8_lossy(&bytes)
            );
        }
        Ok(http::Response::from_parts(parts, bytes))
    }

    /// One Client-Server API call with ruma's request and response types.
    fn call<R>(&self, request: R) -> Result<R::IncomingResponse, String>
    where
        R: OutgoingRequest<Authentication = AccessToken, PathBuilder = VersionHistory>,
    {
        let versions = SupportedVersions {
            versions: [MatrixVersion::V1_1].into(),
            features: Default::default(),
        };
        let request: http::Request<Vec<u8>> = request
            .try_into_http_request(
                &self.base,
                SendAccessToken::Always(&self.token),
                Cow::Owned(versions),
            )
            .map_err(err)?;
        let what = format!("{} {}", request.method(), request.uri().path());
        let response = self.run(request)?;
        R::IncomingResponse::try_from_http_response(response).map_err(|e| format!("{what}: {e}"))
    }

    /// `GET /sync` with our filter.
    fn sync(
        &self,
        since: Option<&str>,
        timeout_ms: u64,
    ) -> Result<sync_events::v3::Response, String> {
        let mut request = self
            .agent
            .get(format!("{}/_matrix/client/v3/sync", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .query("timeout", timeout_ms.to_string())
            .query("filter", FILTER);
        if let Some(since) = since {
            request = request.query("since", since);
        }
        let response = request.call().map_err(|e| format!("GET /sync: {e}"))?;
        let (parts, mut body) = response.into_parts();
        let bytes = body.read_to_vec().map_err(|e| format!("GET /sync: {e}"))?;
        if !parts.status.is_success() {
            log!(
                "GET /sync -> {}: {}",
                parts.status,
                String::from_utf8_lossy(&bytes)
            );
        }
        sync_events::v3::Response::try_from_http_response(http::Response::from_parts(parts, bytes))
            .map_err(|e| format!("GET /sync: {e}"))
    }

    /// `POST path` with a JSON body: the status and the answer's JSON (`null` if it has none).
    fn post_json(&self, path: &str, body: &Value) -> Result<(http::StatusCode, Value), String> {
        let request = http::Request::post(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .header("Content-Type", "application/json")
            .body(serde_json::to_vec(body).map_err(err)?)
            .map_err(err)?;
        let response = self.run(request)?;
        let status = response.status();
        let v = serde_json::from_slice(response.body()).unwrap_or(Value::Null);
        Ok((status, v))
    }
}

/// `POST /login` with a password, as `device_id`: (user ID, access token).
fn login(
    homeserver: &str,
    user: &str,
    password: &str,
    device_id: &str,
) -> Result<(OwnedUserId, String), String> {
    let localpart = user
        .strip_prefix('@')
        .and_then(|u| u.split(':').next())
        .ok_or_else(|| format!("--user {user} is not a Matrix user ID"))?;
    let body = json!({
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": localpart},
        "password": password,
        "device_id": device_id,
        "initial_device_display_name": format!("mxhsm-sdk-peer {device_id}"),
    });
    let mut response = Http::agent()
        .post(format!("{homeserver}/_matrix/client/v3/login"))
        .send_json(&body)
        .map_err(|e| format!("POST /login: {e}"))?;
    let status = response.status();
    let text = response.body_mut().read_to_string().map_err(err)?;
    if !status.is_success() {
        return Err(format!("POST /login -> {status}: {text}"));
    }
    let v: Value = serde_json::from_str(&text).map_err(err)?;
    let user_id = v["user_id"]
        .as_str()
        .ok_or("the login answer has no user_id")?;
    let token = v["access_token"]
        .as_str()
        .ok_or("the login answer has no access_token")?;
    if v["device_id"].as_str() != Some(device_id) {
        return Err(format!(
            "logged in as device {}, not {device_id}",
            v["device_id"]
        ));
    }
    Ok((UserId::parse(user_id).map_err(err)?, token.to_string()))
}

// ---------------------------------------------------------------------------------------
// The peer.

#[derive(Clone)]
struct Flow {
    request: VerificationRequest,
    sas: Option<Sas>,
}

struct Peer {
    machine: OlmMachine,
    http: Arc<Http>,
    /// The account's password, for user-interactive auth.
    password: String,
    /// Our device keys were uploaded.
    uploaded: Cell<bool>,
    /// One `/sync` answer was processed.
    synced: Cell<bool>,
    /// Wakes the outgoing loop (after a sync, after a command).
    nudge: tokio::sync::Notify,
    /// Incoming verification requests not yet reported by `wait_request`.
    incoming: RefCell<VecDeque<String>>,
    /// Every flow by its ID. The machine forgets finished flows on the next sync; we keep
    /// the handles (they share their state with the machine's objects).
    flows: RefCell<HashMap<String, Flow>>,
}

fn emit(v: &Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn cancelled(info: &CancelInfo) -> Value {
    json!({
        "event": "cancelled",
        "code": info.cancel_code().as_str(),
        "reason": info.reason(),
        "by_us": info.cancelled_by_us(),
    })
}

fn timeout_reply() -> Value {
    json!({"event": "timeout"})
}

fn field<'a>(cmd: &'a Value, name: &str) -> Result<&'a str, String> {
    cmd[name]
        .as_str()
        .ok_or_else(|| format!("the command needs a string \"{name}\""))
}

fn user_field(cmd: &Value) -> Result<OwnedUserId, String> {
    UserId::parse(field(cmd, "user")?).map_err(|e| format!("user: {e}"))
}

fn deadline(cmd: &Value) -> Instant {
    Instant::now() + Duration::from_millis(cmd["timeout_ms"].as_u64().unwrap_or(30_000))
}

/// `"methods": ["m.sas.v1", ...]` if the command has it.
fn methods_field(cmd: &Value) -> Option<Vec<VerificationMethod>> {
    cmd["methods"].as_array().map(|a| {
        a.iter()
            .filter_map(|m| m.as_str())
            .map(VerificationMethod::from)
            .collect()
    })
}

fn methods_json(methods: Option<Vec<VerificationMethod>>) -> Value {
    json!(
        methods
            .unwrap_or_default()
            .iter()
            .map(|m| m.as_str().to_string())
            .collect::<Vec<_>>()
    )
}

impl Peer {
    /// One API call on a blocking thread.
    async fn call<R>(&self, request: R) -> Result<R::IncomingResponse, String>
    where
        R: OutgoingRequest<Authentication = AccessToken, PathBuilder = VersionHistory>
            + Send
            + 'static,
        R::IncomingResponse: Send + 'static,
    {
        let http = self.http.clone();
        tokio::task::spawn_blocking(move || http.call(request))
            .await
            .map_err(err)?
    }

    /// Sends one of the machine's requests and hands the answer back to it.
    async fn send(&self, id: &TransactionId, request: &AnyOutgoingRequest) -> Result<(), String> {
        let marked = match request {
            AnyOutgoingRequest::KeysUpload(r) => {
                let device_keys = r.device_keys.is_some();
                let response = self.call(r.clone()).await?;
                log!(
                    "keys/upload: device keys {device_keys}, {} one-time keys; counts now {:?}",
                    r.one_time_keys.len(),
                    response.one_time_key_counts
                );
                let marked = self.machine.mark_request_as_sent(id, &response).await;
                if device_keys && marked.is_ok() {
                    self.uploaded.set(true);
                }
                marked
            }
            AnyOutgoingRequest::KeysQuery(r) => {
                let mut query = get_keys::v3::Request::new();
                query.device_keys = r.device_keys.clone();
                query.timeout = r.timeout;
                let response = self.call(query).await?;
                log!(
                    "keys/query {:?}: devices {:?}",
                    r.device_keys.keys().collect::<Vec<_>>(),
                    response
                        .device_keys
                        .iter()
                        .map(|(u, d)| (u.to_string(), d.keys().cloned().collect::<Vec<_>>()))
                        .collect::<Vec<_>>()
                );
                self.machine.mark_request_as_sent(id, &response).await
            }
            AnyOutgoingRequest::KeysClaim(r) => {
                let response = self.call(r.clone()).await?;
                self.machine.mark_request_as_sent(id, &response).await
            }
            AnyOutgoingRequest::ToDeviceRequest(r) => {
                let recipients: Vec<String> = r
                    .messages
                    .iter()
                    .flat_map(|(u, d)| d.keys().map(move |d| format!("{u}/{d}")))
                    .collect();
                log!("sendToDevice {} -> {recipients:?}", r.event_type);
                let to_device = send_event_to_device::v3::Request::new_raw(
                    r.event_type.clone(),
                    r.txn_id.clone(),
                    r.messages.clone(),
                );
                let response = self.call(to_device).await?;
                self.machine.mark_request_as_sent(id, &response).await
            }
            AnyOutgoingRequest::SignatureUpload(r) => {
                let response = self.call(r.clone()).await?;
                log!("keys/signatures/upload: failures {:?}", response.failures);
                self.machine.mark_request_as_sent(id, &response).await
            }
            AnyOutgoingRequest::RoomMessage(_) => {
                return Err("room messages (in-room verification) are not supported".into());
            }
        };
        marked.map_err(|e| format!("mark_request_as_sent: {e}"))
    }

    async fn send_verification(&self, request: OutgoingVerificationRequest) -> Result<(), String> {
        let id = request.request_id().to_owned();
        self.send(&id, &request.into()).await
    }

    /// Queries `users`' keys now (an out-of-band `/keys/query`) and stores the answer.
    async fn query_now(&self, users: &[&UserId]) -> Result<(), String> {
        let (id, request) = self.machine.query_keys_for_users(users.iter().copied());
        self.send(&id, &AnyOutgoingRequest::KeysQuery(request))
            .await
    }

    async fn track(&self, user: &UserId) -> Result<(), String> {
        self.machine
            .update_tracked_users([user])
            .await
            .map_err(err)?;
        self.query_now(&[user]).await
    }

    /// `POST path` on a blocking thread.
    async fn post_json(
        &self,
        path: &str,
        body: Value,
    ) -> Result<(http::StatusCode, Value), String> {
        let http = self.http.clone();
        let path = path.to_string();
        tokio::task::spawn_blocking(move || http.post_json(&path, &body))
            .await
            .map_err(err)?
    }

    /// `bootstrap`: a new cross-signing identity made by the machine, uploaded with its
    /// signature of our device; the master key (base64) once the server serves it.
    async fn bootstrap(&self, until: Instant) -> Result<Option<String>, String> {
        let requests = self
            .machine
            .bootstrap_cross_signing(false)
            .await
            .map_err(err)?;
        // Our device keys, if they were never uploaded (they normally were, at start).
        if let Some(r) = &requests.upload_keys_req {
            self.send(r.request_id(), r.request()).await?;
        }
        let keys = &requests.upload_signing_keys_req;
        let master = keys
            .master_key
            .as_ref()
            .ok_or("the SDK made no master key")?;
        let master = serde_json::to_value(master).map_err(err)?;
        let master_key = master["keys"]
            .as_object()
            .and_then(|k| k.values().next())
            .and_then(|k| k.as_str())
            .ok_or_else(|| format!("a master key without keys: {master}"))?
            .to_string();
        let mut body = json!({
            "master_key": master,
            "self_signing_key": keys.self_signing_key,
            "user_signing_key": keys.user_signing_key,
        });
        const UPLOAD: &str = "/_matrix/client/v3/keys/device_signing/upload";
        let (mut status, mut answer) = self.post_json(UPLOAD, body.clone()).await?;
        if status == http::StatusCode::UNAUTHORIZED && answer["session"].is_string() {
            log!("device_signing/upload wants user-interactive auth: {answer}");
            let user = self.machine.user_id();
            body["auth"] = json!({
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": user.localpart()},
                "password": self.password,
                "session": answer["session"],
            });
            (status, answer) = self.post_json(UPLOAD, body).await?;
        }
        if !status.is_success() {
            return Err(format!("POST {UPLOAD} -> {status}: {answer}"));
        }
        log!("device_signing/upload: master key {master_key}");
        // The machine marks its private identity as shared.
        let response = upload_signing_keys::v3::Response::new();
        self.machine
            .mark_request_as_sent(
                &TransactionId::new(),
                AnyIncomingResponse::SigningKeysUpload(&response),
            )
            .await
            .map_err(|e| format!("mark_request_as_sent: {e}"))?;
        // Our device signed by the new self-signing key (and the master key by our device).
        let response = self.call(requests.upload_signatures_req).await?;
        if !response.failures.is_empty() {
            return Err(format!(
                "keys/signatures/upload failed: {:?}",
                response.failures
            ));
        }
        self.machine
            .mark_request_as_sent(&TransactionId::new(), &response)
            .await
            .map_err(|e| format!("mark_request_as_sent: {e}"))?;
        // Our own keys again, until the server serves the new master key.
        let user = self.machine.user_id().to_owned();
        loop {
            let (id, request) = self.machine.query_keys_for_users([user.as_ref()]);
            let mut query = get_keys::v3::Request::new();
            query.device_keys = request.device_keys.clone();
            let response = self.call(query).await?;
            self.machine
                .mark_request_as_sent(&id, &response)
                .await
                .map_err(|e| format!("mark_request_as_sent: {e}"))?;
            let served = response
                .master_keys
                .get(&user)
                .and_then(|raw| serde_json::from_str::<Value>(raw.json().get()).ok())
                .is_some_and(|k| {
                    k["keys"]
                        .as_object()
                        .is_some_and(|k| k.values().any(|v| v == master_key.as_str()))
                });
            if served {
                return Ok(Some(master_key));
            }
            if Instant::now() >= until {
                return Ok(None);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    // -- the loops --------------------------------------------------------------------

    /// Sends whatever the machine wants sent, again after every nudge (or 250 ms).
    async fn outgoing_loop(&self) {
        loop {
            let mut failed = false;
            match self.machine.outgoing_requests().await {
                Ok(requests) => {
                    for r in requests {
                        if let Err(e) = self.send(r.request_id(), r.request()).await {
                            log!("outgoing request failed: {e}");
                            failed = true;
                        }
                    }
                }
                Err(e) => {
                    log!("outgoing_requests: {e}");
                    failed = true;
                }
            }
            let pause = Duration::from_millis(if failed { 1000 } else { 250 });
            tokio::select! {
                _ = self.nudge.notified(), if !failed => {}
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Long-polls `/sync` and feeds every answer to the machine.
    async fn sync_loop(&self) {
        let mut since: Option<String> = None;
        loop {
            let http = self.http.clone();
            let from = since.clone();
            // The first sync does not wait: `ready` should not take a long-poll.
            let timeout = if since.is_none() { 0 } else { SYNC_TIMEOUT_MS };
            let answer = tokio::task::spawn_blocking(move || http.sync(from.as_deref(), timeout))
                .await
                .map_err(err)
                .and_then(|r| r);
            let response = match answer {
                Ok(r) => r,
                Err(e) => {
                    log!("sync failed: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            self.learn_senders(&response.to_device.events).await;
            for e in &response.to_device.events {
                if let Ok(v) = serde_json::from_str::<Value>(e.json().get()) {
                    log!("to-device {} from {}", v["type"], v["sender"]);
                }
            }
            let changes = EncryptionSyncChanges {
                to_device_events: response.to_device.events,
                changed_devices: &response.device_lists,
                one_time_keys_counts: &response.device_one_time_keys_count,
                unused_fallback_keys: response.device_unused_fallback_key_types.as_deref(),
                next_batch_token: Some(response.next_batch.clone()),
            };
            let settings = DecryptionSettings {
                sender_device_trust_requirement: TrustRequirement::Untrusted,
            };
            match self.machine.receive_sync_changes(changes, &settings).await {
                Ok((events, _room_keys)) => {
                    for event in &events {
                        self.note_event(event.as_raw());
                    }
                }
                Err(e) => log!("receive_sync_changes: {e}"),
            }
            since = Some(response.next_batch);
            self.synced.set(true);
            self.nudge.notify_one();
        }
    }

    /// The machine ignores a verification event from a device it does not know (a device
    /// that logged in since our last `/keys/query`). So before a sync's events go to the
    /// machine, the keys of any unknown sender device of a verification event are queried.
    async fn learn_senders(&self, events: &[Raw<ruma::events::AnyToDeviceEvent>]) {
        for e in events {
            let Ok(v) = serde_json::from_str::<Value>(e.json().get()) else {
                continue;
            };
            let is_verification = v["type"]
                .as_str()
                .is_some_and(|t| t.starts_with("m.key.verification."));
            let (Some(sender), Some(device)) = (
                v["sender"].as_str().and_then(|s| UserId::parse(s).ok()),
                v["content"]["from_device"].as_str(),
            ) else {
                continue;
            };
            if !is_verification {
                continue;
            }
            let device: OwnedDeviceId = device.into();
            let known = matches!(
                self.machine.get_device(&sender, &device, None).await,
                Ok(Some(_))
            );
            if !known {
                log!("{sender}/{device} is not known yet: querying its keys");
                if let Err(e) = self.track(&sender).await {
                    log!("keys/query for {sender}: {e}");
                }
            }
        }
    }

    /// Remembers an incoming verification request.
    fn note_event(&self, raw: &Raw<ruma::events::AnyToDeviceEvent>) {
        let Ok(v) = serde_json::from_str::<Value>(raw.json().get()) else {
            return;
        };
        if v["type"] != "m.key.verification.request" {
            return;
        }
        let (Some(sender), Some(flow_id)) = (
            v["sender"].as_str().and_then(|s| UserId::parse(s).ok()),
            v["content"]["transaction_id"].as_str(),
        ) else {
            return;
        };
        match self.machine.get_verification_request(&sender, flow_id) {
            Some(request) => {
                log!("verification request {flow_id} from {sender}");
                self.flows
                    .borrow_mut()
                    .insert(flow_id.to_string(), Flow { request, sas: None });
                self.incoming.borrow_mut().push_back(flow_id.to_string());
            }
            None => log!("the machine did not keep the request {flow_id} from {sender}"),
        }
    }

    /// Reads commands until `quit` or the end of stdin.
    async fn command_loop(&self, mut commands: tokio::sync::mpsc::UnboundedReceiver<String>) {
        while let Some(line) = commands.recv().await {
            if line.trim().is_empty() {
                continue;
            }
            let reply = match serde_json::from_str::<Value>(&line) {
                Ok(cmd) => {
                    log!("command {cmd}");
                    let reply = self
                        .handle(&cmd)
                        .await
                        .unwrap_or_else(|e| json!({"event": "error", "error": e}));
                    if cmd["cmd"] == "quit" {
                        emit(&reply);
                        std::process::exit(0);
                    }
                    reply
                }
                Err(e) => json!({"event": "error", "error": format!("not JSON: {e}")}),
            };
            log!("reply {reply}");
            emit(&reply);
            self.nudge.notify_one();
        }
        log!("stdin closed");
        std::process::exit(0);
    }

    fn flow(&self, cmd: &Value) -> Result<Flow, String> {
        let flow_id = field(cmd, "flow_id")?;
        self.flows
            .borrow()
            .get(flow_id)
            .cloned()
            .ok_or_else(|| format!("unknown flow_id {flow_id}"))
    }

    /// The SAS of a flow, once there is one (started by us or by the other side).
    fn sas(&self, flow: &Flow) -> Option<Sas> {
        if let Some(sas) = &flow.sas {
            return Some(sas.clone());
        }
        let sas = match flow.request.state() {
            VerificationRequestState::Transitioned { verification, .. } => verification.sas_v1(),
            _ => None,
        }
        .or_else(|| {
            self.machine
                .get_verification(flow.request.other_user(), flow.request.flow_id().as_str())
                .and_then(|v| v.sas_v1())
        })
        .map(|s| *s)?;
        if let Some(f) = self
            .flows
            .borrow_mut()
            .get_mut(flow.request.flow_id().as_str())
        {
            f.sas = Some(sas.clone());
        }
        Some(sas)
    }

    async fn handle(&self, cmd: &Value) -> Result<Value, String> {
        let name = field(cmd, "cmd")?;
        match name {
            "ready" => {
                let until = deadline(cmd);
                while !(self.uploaded.get() && self.synced.get()) {
                    if Instant::now() >= until {
                        return Ok(timeout_reply());
                    }
                    tokio::time::sleep(POLL).await;
                }
                let keys = self.machine.identity_keys();
                Ok(json!({
                    "event": "ready",
                    "user_id": self.machine.user_id().as_str(),
                    "device_id": self.machine.device_id().as_str(),
                    "ed25519": keys.ed25519.to_base64(),
                    "curve25519": keys.curve25519.to_base64(),
                }))
            }
            "track" => {
                let user = user_field(cmd)?;
                self.track(&user).await?;
                Ok(json!({"event": "tracked"}))
            }
            "request" => {
                let user = user_field(cmd)?;
                let device_id: OwnedDeviceId = field(cmd, "device")?.into();
                let mut device = self
                    .machine
                    .get_device(&user, &device_id, None)
                    .await
                    .map_err(err)?;
                if device.is_none() {
                    self.track(&user).await?;
                    device = self
                        .machine
                        .get_device(&user, &device_id, None)
                        .await
                        .map_err(err)?;
                }
                let device = device
                    .ok_or_else(|| format!("the server lists no device {user}/{device_id}"))?;
                let (request, outgoing) = match methods_field(cmd) {
                    Some(methods) => device.request_verification_with_methods(methods),
                    None => device.request_verification(),
                };
                let flow_id = request.flow_id().as_str().to_string();
                self.flows
                    .borrow_mut()
                    .insert(flow_id.clone(), Flow { request, sas: None });
                self.send_verification(outgoing).await?;
                Ok(json!({"event": "requested", "flow_id": flow_id}))
            }
            "wait_request" => {
                let until = deadline(cmd);
                loop {
                    let next = self.incoming.borrow_mut().pop_front();
                    if let Some(flow_id) = next {
                        let flow = self.flows.borrow().get(&flow_id).cloned();
                        let Some(flow) = flow else { continue };
                        let r = &flow.request;
                        return Ok(json!({
                            "event": "request",
                            "flow_id": flow_id,
                            "from_user": r.other_user().as_str(),
                            "from_device": r.other_device_id().map(|d| d.to_string()),
                            "methods": methods_json(r.their_supported_methods()),
                        }));
                    }
                    if Instant::now() >= until {
                        return Ok(timeout_reply());
                    }
                    tokio::time::sleep(POLL).await;
                }
            }
            "accept" => {
                let flow = self.flow(cmd)?;
                let outgoing = match methods_field(cmd) {
                    Some(methods) => flow.request.accept_with_methods(methods),
                    None => flow
                        .request
                        .accept_with_methods(vec![VerificationMethod::SasV1]),
                };
                let outgoing = outgoing.ok_or_else(|| {
                    format!(
                        "the request cannot be accepted in its state {:?}",
                        state_name(&flow.request.state())
                    )
                })?;
                self.send_verification(outgoing).await?;
                Ok(json!({"event": "accepted"}))
            }
            "start_sas" => {
                let flow = self.flow(cmd)?;
                let until = deadline(cmd);
                loop {
                    match flow.request.state() {
                        VerificationRequestState::Ready { .. } => break,
                        VerificationRequestState::Cancelled(info) => return Ok(cancelled(&info)),
                        _ => {}
                    }
                    if Instant::now() >= until {
                        return Ok(timeout_reply());
                    }
                    tokio::time::sleep(POLL).await;
                }
                let (sas, outgoing) = flow
                    .request
                    .start_sas()
                    .await
                    .map_err(err)?
                    .ok_or("the request did not start a SAS")?;
                if let Some(f) = self
                    .flows
                    .borrow_mut()
                    .get_mut(flow.request.flow_id().as_str())
                {
                    f.sas = Some(sas);
                }
                self.send_verification(outgoing).await?;
                Ok(json!({"event": "sas_started"}))
            }
            "wait_sas" => {
                let flow = self.flow(cmd)?;
                let until = deadline(cmd);
                loop {
                    if let Some(sas) = self.sas(&flow) {
                        if let SasState::Cancelled(info) = sas.state() {
                            return Ok(cancelled(&info));
                        }
                        // `Started` is the state of a SAS the other side proposed (ours
                        // starts as `Created`); `Sas::we_started` tells who sent the
                        // request, not who started the SAS.
                        if matches!(sas.state(), SasState::Started { .. })
                            && let Some(outgoing) = sas.accept()
                        {
                            log!("accepting the SAS the other side started");
                            self.send_verification(outgoing).await?;
                        }
                        if sas.can_be_presented() {
                            let emoji = sas.emoji().map(|e| {
                                e.iter()
                                    .map(|e| json!([e.symbol, e.description]))
                                    .collect::<Vec<_>>()
                            });
                            let decimals = sas.decimals().map(|(a, b, c)| json!([a, b, c]));
                            return Ok(json!({
                                "event": "sas",
                                "emoji": emoji,
                                "decimals": decimals,
                            }));
                        }
                    } else if let VerificationRequestState::Cancelled(info) = flow.request.state() {
                        return Ok(cancelled(&info));
                    }
                    if Instant::now() >= until {
                        return Ok(timeout_reply());
                    }
                    tokio::time::sleep(POLL).await;
                }
            }
            "confirm" => {
                let flow = self.flow(cmd)?;
                let sas = self.sas(&flow).ok_or("this flow has no SAS yet")?;
                let (outgoing, signatures) = sas.confirm().await.map_err(err)?;
                for o in outgoing {
                    self.send_verification(o).await?;
                }
                if let Some(signatures) = signatures {
                    let id = TransactionId::new();
                    self.send(&id, &AnyOutgoingRequest::SignatureUpload(signatures))
                        .await?;
                }
                Ok(json!({"event": "confirmed"}))
            }
            "mismatch" | "cancel" => {
                let flow = self.flow(cmd)?;
                let sas = self.sas(&flow);
                let outgoing = match (&sas, name) {
                    (Some(sas), "mismatch") => sas.cancel_with_code(CancelCode::MismatchedSas),
                    (None, "mismatch") => return Err("this flow has no SAS yet".into()),
                    (Some(sas), _) if !sas.is_done() && !sas.is_cancelled() => sas.cancel(),
                    _ => flow.request.cancel(),
                };
                let outgoing = outgoing.ok_or("the flow is already done or cancelled")?;
                self.send_verification(outgoing).await?;
                Ok(json!({"event": "cancelled_by_us"}))
            }
            "wait_done" => {
                let flow = self.flow(cmd)?;
                let until = deadline(cmd);
                loop {
                    if let Some(sas) = self.sas(&flow) {
                        match sas.state() {
                            SasState::Done {
                                verified_devices,
                                verified_identities,
                            } => {
                                return Ok(json!({
                                    "event": "done",
                                    "verified_devices": verified_devices
                                        .iter()
                                        .map(|d| d.device_id().to_string())
                                        .collect::<Vec<_>>(),
                                    "verified_identities": verified_identities
                                        .iter()
                                        .map(|i| i.user_id().to_string())
                                        .collect::<Vec<_>>(),
                                }));
                            }
                            SasState::Cancelled(info) => return Ok(cancelled(&info)),
                            _ => {}
                        }
                    } else {
                        match flow.request.state() {
                            VerificationRequestState::Done => {
                                return Ok(json!({
                                    "event": "done",
                                    "verified_devices": [],
                                    "verified_identities": [],
                                }));
                            }
                            VerificationRequestState::Cancelled(info) => {
                                return Ok(cancelled(&info));
                            }
                            _ => {}
                        }
                    }
                    if Instant::now() >= until {
                        return Ok(timeout_reply());
                    }
                    tokio::time::sleep(POLL).await;
                }
            }
            "status" => {
                let user = user_field(cmd)?;
                self.track(&user).await?;
                let identity = self
                    .machine
                    .get_identity(&user, None)
                    .await
                    .map_err(err)?
                    .map(|identity| {
                        let (master, own) = match &identity {
                            UserIdentity::Own(i) => (i.master_key().get_first_key(), true),
                            UserIdentity::Other(i) => (i.master_key().get_first_key(), false),
                        };
                        json!({
                            "master_key": master.map(|k| k.to_base64()),
                            "verified": identity.is_verified(),
                            "own": own,
                        })
                    });
                let devices = self
                    .machine
                    .get_user_devices(&user, None)
                    .await
                    .map_err(err)?;
                let mut list: Vec<Value> = devices
                    .devices()
                    .map(|d| {
                        json!({
                            "device_id": d.device_id().as_str(),
                            "ed25519": d.ed25519_key().map(|k| k.to_base64()),
                            "locally_trusted": d.is_locally_trusted(),
                            "cross_signed_by_owner": d.is_cross_signed_by_owner(),
                            "verified": d.is_verified(),
                            "own_device": d.is_our_own_device(),
                        })
                    })
                    .collect();
                list.sort_by(|a, b| a["device_id"].as_str().cmp(&b["device_id"].as_str()));
                Ok(json!({"event": "status", "identity": identity, "devices": list}))
            }
            "bootstrap" => Ok(match self.bootstrap(deadline(cmd)).await? {
                Some(master_key) => json!({"event": "bootstrapped", "master_key": master_key}),
                None => timeout_reply(),
            }),
            "quit" => Ok(json!({"event": "bye"})),
            other => Err(format!("unknown command {other}")),
        }
    }
}

fn state_name(state: &VerificationRequestState) -> &'static str {
    match state {
        VerificationRequestState::Created { .. } => "created",
        VerificationRequestState::Requested { .. } => "requested",
        VerificationRequestState::Ready { .. } => "ready",
        VerificationRequestState::Transitioned { .. } => "transitioned",
        VerificationRequestState::Done => "done",
        VerificationRequestState::Cancelled(_) => "cancelled",
    }
}

// ---------------------------------------------------------------------------------------

struct Args {
    homeserver: String,
    user: String,
    password: String,
    device_id: String,
}

fn args() -> Result<Args, String> {
    let mut homeserver = None;
    let mut user = None;
    let mut password = None;
    let mut device_id = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let slot = match a.as_str() {
            "--homeserver" => &mut homeserver,
            "--user" => &mut user,
            "--password" => &mut password,
            "--device-id" => &mut device_id,
            other => return Err(format!("unknown argument {other}")),
        };
        *slot = Some(it.next().ok_or_else(|| format!("{a} needs a value"))?);
    }
    let need = |v: Option<String>, name: &str| v.ok_or_else(|| format!("{name} is required"));
    Ok(Args {
        homeserver: need(homeserver, "--homeserver")?
            .trim_end_matches('/')
            .to_string(),
        user: need(user, "--user")?,
        password: need(password, "--password")?,
        device_id: need(device_id, "--device-id")?,
    })
}

fn main() {
    let usage =
        "usage: mxhsm-sdk-peer --homeserver URL --user @u:server --password PW --device-id DEVICE";
    let args = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}\n{usage}");
            std::process::exit(2);
        }
    };
    let (user_id, token) = match login(
        &args.homeserver,
        &args.user,
        &args.password,
        &args.device_id,
    ) {
        Ok(v) => v,
        Err(e) => {
            log!("login failed: {e}");
            std::process::exit(1);
        }
    };
    log!("logged in as {user_id} / {}", args.device_id);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async move {
        let device_id: OwnedDeviceId = args.device_id.as_str().into();
        let machine = OlmMachine::new(&user_id, &device_id).await;
        if let Err(e) = machine.update_tracked_users([user_id.as_ref()]).await {
            log!("update_tracked_users: {e}");
        }
        let peer = Peer {
            machine,
            http: Arc::new(Http {
                agent: Http::agent(),
                base: args.homeserver,
                token,
            }),
            password: args.password,
            uploaded: Cell::new(false),
            synced: Cell::new(false),
            nudge: tokio::sync::Notify::new(),
            incoming: RefCell::new(VecDeque::new()),
            flows: RefCell::new(HashMap::new()),
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        tokio::join!(
            peer.outgoing_loop(),
            peer.sync_loop(),
            peer.command_loop(rx)
        );
    });
}
