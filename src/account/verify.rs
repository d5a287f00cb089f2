//! Interactive verification (`m.sas.v1` over to-device messages) answered by mxhsm's own
//! device, with the signature made on the token only after the user confirmed the match.
//!
//! The flow: request → ready → start → accept (with the accepting side's commitment) →
//! key ↔ key → both users compare the emoji or numbers → MAC ↔ MAC → done. mxhsm's MAC
//! vouches for its own device key and for the master key on the token, so the other
//! device trusts the identity; the other side's MAC must cover the device key (or, for
//! another user, the master key) that the server serves, and only that exact key is then
//! signed — with the self-signing key for one of our devices, with the user-signing key
//! for another user's master key. A cancel, a timeout, a mismatch or a bad MAC signs
//! nothing and sends the matching `m.key.verification.cancel` code.
//!
//! To-device messages are untrusted: the server chooses their sender. The short
//! authentication string is what defeats it; every message must also match the
//! transaction and the device it was started with.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vodozemac::sas::{EstablishedSas, Sas};

use super::sign::{self, DeviceSelection};
use super::{Account, AccountError, PublishedIdentity};
use crate::matrix::keys::Ed25519PublicKey;
use crate::matrix::sas::{self, Party, ShortAuthString};
use crate::token::KeyRole;

const REQUEST: &str = "m.key.verification.request";
const READY: &str = "m.key.verification.ready";
const START: &str = "m.key.verification.start";
const ACCEPT: &str = "m.key.verification.accept";
const KEY: &str = "m.key.verification.key";
const MAC: &str = "m.key.verification.mac";
const DONE: &str = "m.key.verification.done";
const CANCEL: &str = "m.key.verification.cancel";
const SECRET_REQUEST: &str = "m.secret.request";

/// A request older than this (or this far in the future) is ignored, as the spec says.
const REQUEST_AGE: Duration = Duration::from_secs(600);

/// Whom to verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Answer the next request from one of our own devices.
    Wait,
    /// Start with this device of ours.
    OwnDevice(String),
    /// Start with another user (their first device that answers).
    User(String),
}

/// What the flow tells its caller as it goes (strings from the server are untrusted).
#[derive(Debug, Clone)]
pub enum Progress {
    /// A request arrived from, or was sent to, this device.
    Request { user_id: String, device_id: String },
    /// The device is ready; the key exchange starts.
    Ready { user_id: String, device_id: String },
    /// Another device asked for a secret (`m.secret.request`); mxhsm holds no raw
    /// cross-signing or backup key, so it shares none.
    SecretRequest { device_id: String, name: String },
}

/// The other side of the caller: progress to show, and the one question only the user can
/// answer.
pub trait VerifyUi {
    fn progress(&mut self, progress: Progress);
    /// Whether the user sees the same emoji or numbers on the other device. Nothing is
    /// signed unless this returns `Ok(true)`; the token is not used before.
    fn confirm(
        &mut self,
        user_id: &str,
        device_id: &str,
        sas: &ShortAuthString,
    ) -> Result<bool, AccountError>;
}

/// How a verification ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The other side's key is verified and now signed on the token.
    Signed {
        user_id: String,
        device_id: String,
        /// The key that was signed: the device's Ed25519 key, or the user's master key.
        key: Ed25519PublicKey,
        role: KeyRole,
    },
    /// Ended without a signature (`by_us`: mxhsm sent the cancel).
    Cancelled {
        code: String,
        reason: String,
        by_us: bool,
    },
}

/// Runs one verification with `target`, waiting at most `timeout` in all.
pub fn verify(
    account: &Account,
    target: &Target,
    ui: &mut dyn VerifyUi,
    timeout: Duration,
) -> Result<Outcome, AccountError> {
    let mut ch = Channel::open(account, timeout);
    match target {
        Target::Wait => respond(&mut ch, ui),
        Target::OwnDevice(device) => {
            let me = account.user_id().to_string();
            initiate(&mut ch, ui, &me, Some(device))
        }
        Target::User(user) => {
            if user == account.user_id() {
                return Err(AccountError::SignSelf(user.clone()));
            }
            crate::token::check_user_id(user)?;
            initiate(&mut ch, ui, user, None)
        }
    }
}

/// Answers a request that another sync loop already received (`mxhsm watch --verify`):
/// `event` is the to-device event as the sync gave it, and the flow goes on syncing from
/// `since`. Returns how it ended and where its sync stopped.
pub fn answer(
    account: &Account,
    event: &Value,
    since: Option<String>,
    ui: &mut dyn VerifyUi,
    timeout: Duration,
) -> Result<(Outcome, Option<String>), AccountError> {
    let mut ch = Channel::open(account, timeout);
    ch.since = since;
    if let Some(m) = ToDevice::from_event(event) {
        ch.pending.push_back(m);
    }
    let outcome = respond(&mut ch, ui)?;
    Ok((outcome, ch.since))
}

/// Whether a to-device event (as a sync gives it) is a verification request from one of
/// `user_id`'s own devices.
pub fn is_own_request(event: &Value, user_id: &str) -> bool {
    event.get("type").and_then(Value::as_str) == Some(REQUEST)
        && event.get("sender").and_then(Value::as_str) == Some(user_id)
}

/// One to-device message.
#[derive(Debug, Clone)]
struct ToDevice {
    sender: String,
    kind: String,
    content: Value,
}

impl ToDevice {
    fn from_event(e: &Value) -> Option<ToDevice> {
        Some(ToDevice {
            sender: e.get("sender")?.as_str()?.to_string(),
            kind: e.get("type")?.as_str()?.to_string(),
            content: e.get("content").filter(|c| c.is_object())?.clone(),
        })
    }

    fn str(&self, field: &str) -> Option<&str> {
        self.content.get(field).and_then(Value::as_str)
    }
}

/// Why waiting stopped without the message.
enum Wait {
    Cancelled(Outcome),
    TimedOut,
}

/// The sync and send side of a verification, with a deadline.
struct Channel<'a> {
    account: &'a Account,
    since: Option<String>,
    pending: VecDeque<ToDevice>,
    deadline: Instant,
}

impl<'a> Channel<'a> {
    /// Starts from a fresh sync, so the to-device messages already queued for our device
    /// (a request sent before we started) are seen too.
    fn open(account: &'a Account, timeout: Duration) -> Channel<'a> {
        Channel {
            account,
            since: None,
            pending: VecDeque::new(),
            deadline: Instant::now() + timeout,
        }
    }

    fn me(&self) -> &str {
        self.account.user_id()
    }

    fn our_device(&self) -> &str {
        self.account.device_id()
    }

    fn send(
        &self,
        user: &str,
        device: &str,
        kind: &str,
        content: Value,
    ) -> Result<(), AccountError> {
        Ok(self
            .account
            .client()
            .send_to_device(kind, user, device, &content)?)
    }

    /// The next to-device message (any), or `None` once the deadline passed.
    fn next(&mut self, ui: &mut dyn VerifyUi) -> Result<Option<ToDevice>, AccountError> {
        loop {
            if let Some(m) = self.pending.pop_front() {
                if m.kind == SECRET_REQUEST && m.sender == self.me() {
                    // Shared by nobody: mxhsm has no raw key to give.
                    if m.str("action") == Some("request") {
                        ui.progress(Progress::SecretRequest {
                            device_id: m.str("requesting_device_id").unwrap_or("").into(),
                            name: m.str("name").unwrap_or("").into(),
                        });
                    }
                    continue;
                }
                return Ok(Some(m));
            }
            if Instant::now() >= self.deadline {
                return Ok(None);
            }
            let filter = json!({
                "room": { "rooms": [] },
                "presence": { "not_types": ["*"] },
                "account_data": { "not_types": ["*"] },
            });
            let answer = self.account.client().sync(self.since.as_deref(), &filter)?;
            if let Some(next) = answer.get("next_batch").and_then(Value::as_str) {
                self.since = Some(next.to_string());
            }
            let events = answer
                .pointer("/to_device/events")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            self.pending
                .extend(events.iter().filter_map(ToDevice::from_event));
        }
    }
}

/// The other side once it is known: their user and device, and the transaction.
struct Peer {
    user: String,
    device: String,
    txn: String,
}

impl Peer {
    fn is_from(&self, m: &ToDevice) -> bool {
        m.sender == self.user
            && m.str("transaction_id") == Some(&self.txn)
            && (m.kind == CANCEL
                || m.kind == MAC
                || m.kind == KEY
                || m.kind == ACCEPT
                || m.kind == DONE
                || m.str("from_device") == Some(&self.device))
    }

    fn cancel(&self, ch: &Channel<'_>, code: &str, reason: &str) -> Outcome {
        let _ = ch.send(
            &self.user,
            &self.device,
            CANCEL,
            json!({"transaction_id": self.txn, "code": code, "reason": reason}),
        );
        Outcome::Cancelled {
            code: code.to_string(),
            reason: reason.to_string(),
            by_us: true,
        }
    }

    /// The next message of this verification: a cancel ends it; anything else of another
    /// transaction or device is skipped.
    fn expect(
        &self,
        ch: &mut Channel<'_>,
        ui: &mut dyn VerifyUi,
        kinds: &[&str],
    ) -> Result<Result<ToDevice, Wait>, AccountError> {
        while let Some(m) = ch.next(ui)? {
            if !self.is_from(&m) {
                continue;
            }
            if m.kind == CANCEL {
                return Ok(Err(Wait::Cancelled(Outcome::Cancelled {
                    code: m.str("code").unwrap_or("m.unknown").to_string(),
                    reason: m.str("reason").unwrap_or("").to_string(),
                    by_us: false,
                })));
            }
            if kinds.contains(&m.kind.as_str()) {
                return Ok(Ok(m));
            }
            let unexpected = format!("unexpected {}", m.kind);
            return Ok(Err(Wait::Cancelled(self.cancel(
                ch,
                "m.unexpected_message",
                &unexpected,
            ))));
        }
        Ok(Err(Wait::TimedOut))
    }
}

/// Unwraps a message or ends the flow (a cancel received, or a timeout: cancelled by us).
macro_rules! expect {
    ($peer:expr, $ch:expr, $ui:expr, $kinds:expr) => {
        match $peer.expect($ch, $ui, $kinds)? {
            Ok(m) => m,
            Err(Wait::Cancelled(o)) => return Ok(o),
            Err(Wait::TimedOut) => {
                return Ok($peer.cancel($ch, "m.timeout", "no answer in time"));
            }
        }
    };
}

fn strings(v: &Value, field: &str) -> Vec<String> {
    v.get(field)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a request or ready offers `m.sas.v1`.
fn speaks_sas(content: &Value) -> bool {
    strings(content, "methods").iter().any(|m| m == sas::METHOD)
}

/// The Ed25519 device keys a `/keys/query` answer serves for `user`, by device ID (each
/// checked to be a curve point).
fn served_devices(answer: &Value, user: &str) -> BTreeMap<String, Ed25519PublicKey> {
    let mut out = BTreeMap::new();
    let devices = answer
        .get("device_keys")
        .and_then(|d| d.get(user))
        .and_then(Value::as_object);
    for (id, d) in devices.into_iter().flatten() {
        let key = d
            .get("keys")
            .and_then(|k| k.get(format!("ed25519:{id}")))
            .and_then(Value::as_str)
            .and_then(|k| Ed25519PublicKey::from_base64(k).ok());
        if let Some(k) = key {
            out.insert(id.clone(), k);
        }
    }
    out
}

/// Answers the next request from one of our own devices.
fn respond(ch: &mut Channel<'_>, ui: &mut dyn VerifyUi) -> Result<Outcome, AccountError> {
    let me = ch.me().to_string();
    let request = loop {
        let Some(m) = ch.next(ui)? else {
            return Ok(Outcome::Cancelled {
                code: "m.timeout".into(),
                reason: "no verification request arrived".into(),
                by_us: true,
            });
        };
        if m.kind != REQUEST || m.sender != me {
            continue;
        }
        let (Some(device), Some(txn)) = (m.str("from_device"), m.str("transaction_id")) else {
            continue;
        };
        if device == ch.our_device() || txn.is_empty() || txn.len() > 255 {
            continue;
        }
        let age_ok = m
            .content
            .get("timestamp")
            .and_then(Value::as_u64)
            .is_some_and(|t| {
                let now = crate::token::now_ms();
                t + REQUEST_AGE.as_millis() as u64 >= now
                    && t <= now + REQUEST_AGE.as_millis() as u64 / 2
            });
        if !age_ok {
            continue;
        }
        break m;
    };
    let peer = Peer {
        user: me.clone(),
        device: request.str("from_device").unwrap_or("").to_string(),
        txn: request.str("transaction_id").unwrap_or("").to_string(),
    };
    ui.progress(Progress::Request {
        user_id: peer.user.clone(),
        device_id: peer.device.clone(),
    });
    if !speaks_sas(&request.content) {
        return Ok(peer.cancel(ch, "m.unknown_method", "mxhsm speaks only m.sas.v1"));
    }
    ch.send(
        &peer.user,
        &peer.device,
        READY,
        json!({"from_device": ch.our_device(), "methods": [sas::METHOD], "transaction_id": peer.txn}),
    )?;
    ui.progress(Progress::Ready {
        user_id: peer.user.clone(),
        device_id: peer.device.clone(),
    });
    let start = expect!(peer, ch, ui, &[START]);
    accept_and_finish(ch, ui, &peer, &start.content)
}

/// The checks of a start: the method and the one choice of each mxhsm speaks.
fn unsupported(start: &Value) -> Option<&'static str> {
    let has = |field: &str, want: &str| strings(start, field).iter().any(|s| s == want);
    if start.get("method").and_then(Value::as_str) != Some(sas::METHOD) {
        return Some("mxhsm speaks only m.sas.v1");
    }
    if !has("key_agreement_protocols", sas::KEY_AGREEMENT)
        || !has("hashes", sas::HASH)
        || !has("message_authentication_codes", sas::MAC_METHOD)
    {
        return Some("mxhsm needs curve25519-hkdf-sha256, sha256 and hkdf-hmac-sha256.v2");
    }
    if !sas::SAS_KINDS
        .iter()
        .any(|k| has("short_authentication_string", k))
    {
        return Some("no emoji or decimal short authentication string");
    }
    None
}

/// As the accepting side: accept (with our commitment), then the keys, the comparison,
/// the MACs and the signature.
fn accept_and_finish(
    ch: &mut Channel<'_>,
    ui: &mut dyn VerifyUi,
    peer: &Peer,
    start: &Value,
) -> Result<Outcome, AccountError> {
    if let Some(why) = unsupported(start) {
        return Ok(peer.cancel(ch, "m.unknown_method", why));
    }
    let ours = Sas::new();
    let our_key = ours.public_key().to_base64();
    let kinds: Vec<&str> = sas::SAS_KINDS
        .into_iter()
        .filter(|k| {
            strings(start, "short_authentication_string")
                .iter()
                .any(|s| s == k)
        })
        .collect();
    ch.send(
        &peer.user,
        &peer.device,
        ACCEPT,
        json!({
            "transaction_id": peer.txn, "method": sas::METHOD,
            "key_agreement_protocol": sas::KEY_AGREEMENT, "hash": sas::HASH,
            "message_authentication_code": sas::MAC_METHOD,
            "short_authentication_string": kinds,
            "commitment": sas::commitment(&our_key, start)?,
        }),
    )?;
    let their = expect!(peer, ch, ui, &[KEY]);
    let Some(their_key) = their.str("key").map(str::to_string) else {
        return Ok(peer.cancel(ch, "m.invalid_message", "the key message has no key"));
    };
    let Some(established) = establish(ours, &their_key) else {
        return Ok(peer.cancel(ch, "m.invalid_message", "the key is not a Curve25519 key"));
    };
    ch.send(
        &peer.user,
        &peer.device,
        KEY,
        json!({"transaction_id": peer.txn, "key": our_key}),
    )?;
    let short = short_auth_string(ch, peer, &established, &our_key, &their_key, false);
    compare_and_sign(ch, ui, peer, &established, &short)
}

/// Starts a verification with `user` (one `device`, or all of theirs).
fn initiate(
    ch: &mut Channel<'_>,
    ui: &mut dyn VerifyUi,
    user: &str,
    device: Option<&String>,
) -> Result<Outcome, AccountError> {
    let known = served_devices(&ch.account.client().query_keys(&[user])?, user);
    let devices: Vec<String> = match device {
        Some(d) if known.contains_key(d) => vec![d.clone()],
        Some(d) => {
            return Err(AccountError::UnknownDevice {
                user_id: user.to_string(),
                device_id: d.clone(),
            });
        }
        None => known
            .keys()
            .filter(|d| user != ch.me() || d.as_str() != ch.our_device())
            .cloned()
            .collect(),
    };
    if devices.is_empty() {
        return Err(AccountError::NoPublishedIdentity(user.to_string()));
    }
    let txn = crate::text::random_hex(16).map_err(|e| AccountError::Input(e.to_string()))?;
    let request = json!({
        "from_device": ch.our_device(), "methods": [sas::METHOD],
        "timestamp": crate::token::now_ms(), "transaction_id": txn,
    });
    for d in &devices {
        ch.send(user, d, REQUEST, request.clone())?;
        ui.progress(Progress::Request {
            user_id: user.to_string(),
            device_id: d.clone(),
        });
    }
    // The first device to be ready is the one; the others are told it was accepted
    // elsewhere.
    let ready = loop {
        let Some(m) = ch.next(ui)? else {
            for d in &devices {
                let _ = ch.send(
                    user,
                    d,
                    CANCEL,
                    json!({"transaction_id": txn, "code": "m.timeout", "reason": "no answer in time"}),
                );
            }
            return Ok(Outcome::Cancelled {
                code: "m.timeout".into(),
                reason: "no device answered the request".into(),
                by_us: true,
            });
        };
        let from = m.str("from_device").unwrap_or("").to_string();
        if m.sender != user || m.str("transaction_id") != Some(&txn) || !devices.contains(&from) {
            continue;
        }
        if m.kind == CANCEL {
            return Ok(Outcome::Cancelled {
                code: m.str("code").unwrap_or("m.unknown").to_string(),
                reason: m.str("reason").unwrap_or("").to_string(),
                by_us: false,
            });
        }
        if m.kind == READY {
            break m;
        }
    };
    let peer = Peer {
        user: user.to_string(),
        device: ready.str("from_device").unwrap_or("").to_string(),
        txn: txn.clone(),
    };
    for d in devices.iter().filter(|d| **d != peer.device) {
        let _ = ch.send(
            user,
            d,
            CANCEL,
            json!({"transaction_id": txn, "code": "m.accepted", "reason": "another device answered"}),
        );
    }
    ui.progress(Progress::Ready {
        user_id: peer.user.clone(),
        device_id: peer.device.clone(),
    });
    if !speaks_sas(&ready.content) {
        return Ok(peer.cancel(ch, "m.unknown_method", "mxhsm speaks only m.sas.v1"));
    }
    let start = json!({
        "from_device": ch.our_device(), "method": sas::METHOD,
        "key_agreement_protocols": [sas::KEY_AGREEMENT], "hashes": [sas::HASH],
        "message_authentication_codes": [sas::MAC_METHOD],
        "short_authentication_string": sas::SAS_KINDS,
        "transaction_id": txn,
    });
    ch.send(&peer.user, &peer.device, START, start.clone())?;
    let answer = expect!(peer, ch, ui, &[ACCEPT, START]);
    if answer.kind == START {
        // Both sides started: the one of the smaller (user ID, device ID) stands.
        let mine = (ch.me().to_string(), ch.our_device().to_string());
        if (peer.user.clone(), peer.device.clone()) < mine {
            return accept_and_finish(ch, ui, &peer, &answer.content);
        }
        let accepted = expect!(peer, ch, ui, &[ACCEPT]);
        return started_and_accepted(ch, ui, &peer, &start, &accepted);
    }
    started_and_accepted(ch, ui, &peer, &start, &answer)
}

/// As the starting side, after the accept: our key, theirs (checked against the
/// commitment), the comparison, the MACs and the signature.
fn started_and_accepted(
    ch: &mut Channel<'_>,
    ui: &mut dyn VerifyUi,
    peer: &Peer,
    start: &Value,
    accept: &ToDevice,
) -> Result<Outcome, AccountError> {
    let chosen_ok = accept.str("key_agreement_protocol") == Some(sas::KEY_AGREEMENT)
        && accept.str("hash") == Some(sas::HASH)
        && accept.str("message_authentication_code") == Some(sas::MAC_METHOD)
        && !strings(&accept.content, "short_authentication_string").is_empty();
    if !chosen_ok {
        return Ok(peer.cancel(
            ch,
            "m.unknown_method",
            "the accept chose what was not offered",
        ));
    }
    let Some(commitment) = accept.str("commitment").map(str::to_string) else {
        return Ok(peer.cancel(ch, "m.invalid_message", "the accept has no commitment"));
    };
    let ours = Sas::new();
    let our_key = ours.public_key().to_base64();
    ch.send(
        &peer.user,
        &peer.device,
        KEY,
        json!({"transaction_id": peer.txn, "key": our_key}),
    )?;
    let their = expect!(peer, ch, ui, &[KEY]);
    let Some(their_key) = their.str("key").map(str::to_string) else {
        return Ok(peer.cancel(ch, "m.invalid_message", "the key message has no key"));
    };
    if sas::commitment(&their_key, start)? != commitment {
        return Ok(peer.cancel(
            ch,
            "m.mismatched_commitment",
            "the key does not match the commitment",
        ));
    }
    let Some(established) = establish(ours, &their_key) else {
        return Ok(peer.cancel(ch, "m.invalid_message", "the key is not a Curve25519 key"));
    };
    let short = short_auth_string(ch, peer, &established, &our_key, &their_key, true);
    compare_and_sign(ch, ui, peer, &established, &short)
}

/// The string both users compare; the side that sent the start comes first.
fn short_auth_string(
    ch: &Channel<'_>,
    peer: &Peer,
    established: &EstablishedSas,
    our_key: &str,
    their_key: &str,
    we_started: bool,
) -> ShortAuthString {
    let us = Party {
        user_id: ch.me(),
        device_id: ch.our_device(),
        sas_key: our_key,
    };
    let them = Party {
        user_id: &peer.user,
        device_id: &peer.device,
        sas_key: their_key,
    };
    let (first, second) = if we_started { (us, them) } else { (them, us) };
    sas::short_auth_string(established, first, second, &peer.txn)
}

fn establish(ours: Sas, their_key: &str) -> Option<EstablishedSas> {
    let key = vodozemac::Curve25519PublicKey::from_base64(their_key).ok()?;
    ours.diffie_hellman(key).ok()
}

/// The user compares; on a match our MAC goes out, theirs is checked against the keys the
/// server serves, and exactly the key it vouches for is signed on the token.
fn compare_and_sign(
    ch: &mut Channel<'_>,
    ui: &mut dyn VerifyUi,
    peer: &Peer,
    established: &EstablishedSas,
    short: &ShortAuthString,
) -> Result<Outcome, AccountError> {
    if !ui.confirm(&peer.user, &peer.device, short)? {
        return Ok(peer.cancel(
            ch,
            "m.mismatched_sas",
            "the short authentication strings differ",
        ));
    }
    let account = ch.account;
    let me = ch.me().to_string();
    let our_device = ch.our_device().to_string();
    // What we vouch for: our device key, and the master key on the token when the server
    // serves it as ours.
    let (olm, _) = account.own_device_keys()?;
    let mut ours = BTreeMap::from([(
        format!("ed25519:{our_device}"),
        olm.ed25519_key().to_base64(),
    )]);
    let answer = account.client().query_keys(&[&me, &peer.user])?;
    let own = PublishedIdentity::from_query(&answer, &me);
    let token_master = account
        .store()
        .current_keys(&me)?
        .get(&KeyRole::Master)
        .and_then(|k| k.public_key.ed25519());
    if let Some(m) = token_master.filter(|m| own.master == Some(*m)) {
        ours.insert(m.key_id(), m.to_base64());
    }
    let (macs, keys) = sas::mac_content(
        established,
        (&me, &our_device),
        (&peer.user, &peer.device),
        &peer.txn,
        &ours,
    );
    ch.send(
        &peer.user,
        &peer.device,
        MAC,
        json!({"transaction_id": peer.txn, "mac": macs, "keys": keys}),
    )?;
    let their = expect!(peer, ch, ui, &[MAC]);
    let macs: BTreeMap<String, String> = their
        .content
        .get("mac")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    let Some(keys_mac) = their.str("keys").map(str::to_string) else {
        return Ok(peer.cancel(ch, "m.invalid_message", "the MAC message has no keys"));
    };
    // What the server serves for them, from the query made after the comparison.
    let device_key = served_devices(&answer, &peer.user)
        .get(&peer.device)
        .copied();
    let master = PublishedIdentity::from_query(&answer, &peer.user).master;
    let mut known = BTreeMap::new();
    if let Some(k) = device_key {
        known.insert(format!("ed25519:{}", peer.device), k.to_base64());
    }
    if let Some(m) = master.filter(|_| peer.user != me) {
        known.insert(m.key_id(), m.to_base64());
    }
    let verified = match sas::verify_mac(
        established,
        (&peer.user, &peer.device),
        (&me, &our_device),
        &peer.txn,
        &macs,
        &keys_mac,
        &known,
    ) {
        Ok(v) => v,
        Err(e) => return Ok(peer.cancel(ch, "m.key_mismatch", &e.to_string())),
    };
    let outcome = if peer.user == me {
        let Some(key) =
            device_key.filter(|_| verified.contains(&format!("ed25519:{}", peer.device)))
        else {
            return Ok(peer.cancel(
                ch,
                "m.key_mismatch",
                "the MAC does not vouch for the device key the server serves",
            ));
        };
        sign::sign_devices(
            account,
            &DeviceSelection::Named(vec![peer.device.clone()]),
            &mut |offered| match offered.first() {
                Some(c) if c.ed25519 == Some(key) && c.refusal().is_none() => {
                    Ok(vec![c.device_id.clone()])
                }
                Some(c) if c.ed25519 == Some(key) && c.trust.is_verified() => Ok(Vec::new()),
                _ => Err(AccountError::Refused(format!(
                    "device {} changed between the comparison and the signature; nothing signed",
                    crate::text::escape(&peer.device)
                ))),
            },
        )?;
        Outcome::Signed {
            user_id: me.clone(),
            device_id: peer.device.clone(),
            key,
            role: KeyRole::SelfSigning,
        }
    } else {
        let Some(key) = master.filter(|m| verified.contains(&m.key_id())) else {
            return Ok(peer.cancel(
                ch,
                "m.key_mismatch",
                "their device did not vouch for their master key; nothing signed",
            ));
        };
        sign::sign_user(account, &peer.user, &mut |c| {
            if c.master_key == key {
                Ok(())
            } else {
                Err(AccountError::Refused(format!(
                    "the master key of {} changed between the comparison and the signature; nothing signed",
                    crate::text::escape(&peer.user)
                )))
            }
        })?;
        Outcome::Signed {
            user_id: peer.user.clone(),
            device_id: peer.device.clone(),
            key,
            role: KeyRole::UserSigning,
        }
    };
    ch.send(
        &peer.user,
        &peer.device,
        DONE,
        json!({"transaction_id": peer.txn}),
    )?;
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_must_offer_what_mxhsm_speaks() {
        let good = json!({
            "method": sas::METHOD, "key_agreement_protocols": [sas::KEY_AGREEMENT],
            "hashes": [sas::HASH], "message_authentication_codes": ["hkdf-hmac-sha256", sas::MAC_METHOD],
            "short_authentication_string": ["emoji"],
        });
        assert_eq!(unsupported(&good), None);
        for (field, value) in [
            ("method", json!("m.reciprocate.v1")),
            ("key_agreement_protocols", json!(["curve25519"])),
            ("hashes", json!(["sha512"])),
            ("message_authentication_codes", json!(["hkdf-hmac-sha256"])),
            ("short_authentication_string", json!(["words"])),
            ("hashes", json!("sha256")),
        ] {
            let mut bad = good.clone();
            bad[field] = value;
            assert!(unsupported(&bad).is_some(), "{bad}");
        }
    }
}
