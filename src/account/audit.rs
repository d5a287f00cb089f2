//! The audit log: every operation the token performed for mxhsm, in an append-only,
//! hash-chained JSON Lines file whose head is signed on the token.
//!
//! # Format
//!
//! One JSON object per line. Every entry has `seq` (1, 2, …), `prev` (the SHA-256, hex, of
//! the previous line's bytes without its newline; 64 zeros for the first), `time`
//! (RFC 3339, UTC), `time_ms`, `op`, `command` (the mxhsm command that did it) and `pid`.
//!
//! | `op` | when | what else |
//! |---|---|---|
//! | `sign` | before a signature | `account`, `token`, `key`, `object` (what was signed: its type and who it names), `sha256` of the signed bytes (the canonical JSON) |
//! | `agree` | before the first X25519 agreement of a key in a command | `account`, `token`, `key` |
//! | `agree_done` | at the end of the command | `count`, `sha256` over the peer keys in order |
//! | `generate`, `import`, `adopt` | after the key exists (or, for `adopt`, a key already in a YubiKey slot is mapped) | `account`, `token`, `key` (with its public key) |
//! | `delete` | before a deletion | `account`, `token`, `key` |
//! | `repair` | before the first entry after a crash that left half a line | `dropped_bytes`, `dropped_sha256` |
//! | `head` | at the end of each command that recorded something | `audit_key` and `signature`, or both `null` when the token has no audit key |
//!
//! A head's signature is an Ed25519 signature by the token's audit key (role `audit`)
//! (`audit_user` names whose key it is) over `mxhsm audit head v1\n{seq}\n{prev}\n{time}`;
//! since `prev` chains every line
//! before it, a head vouches for the whole log up to it. The last head is also written to
//! `<log>.head`, so cutting the log back to an earlier head is noticed on this machine
//! (an auditor keeps the head [`verify`] prints, or the syslog mirror, elsewhere).
//!
//! # Writing
//!
//! Appends take an exclusive `flock` on the log, read its last line for `seq` and `prev`,
//! write one line and `fdatasync` it, so two mxhsm processes keep one chain. A crash can
//! leave at most a last line without its newline; the next append removes it and records
//! a `repair` entry with its hash. An operation whose entry cannot be written is not done.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::matrix::keys::Ed25519PublicKey;
use crate::token::audit::{AuditSink, HeadSigner, TokenOp};
use crate::token::{KeyInfo, TokenSummary};

/// Environment variable with the audit log's path.
pub const AUDIT_LOG_ENV: &str = "MXHSM_AUDIT_LOG";

/// The default audit log: `$XDG_DATA_HOME/mxhsm/audit.jsonl`.
pub fn default_path() -> PathBuf {
    crate::paths::dir(crate::paths::Base::Data).join("audit.jsonl")
}

/// The file beside the log that holds its last head.
pub fn head_path(log: &Path) -> PathBuf {
    let mut name = log.file_name().unwrap_or_default().to_os_string();
    name.push(".head");
    log.with_file_name(name)
}

const ZERO_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The longest line the writer reads back (entries are far shorter).
const MAX_LINE: u64 = 1 << 20;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn line_hash(line: &[u8]) -> String {
    hex(&Sha256::digest(line))
}

/// The bytes a head's signature covers.
fn head_message(seq: u64, prev: &str, time: &str) -> Vec<u8> {
    format!("mxhsm audit head v1\n{seq}\n{prev}\n{time}").into_bytes()
}

fn token_json(t: &TokenSummary) -> Value {
    json!({"label": t.label, "serial": t.serial, "manufacturer": t.manufacturer, "model": t.model})
}

fn key_json(k: &KeyInfo) -> Value {
    json!({
        "role": k.role.as_str(),
        "id": k.backend.to_string(),
        "public_key": k.public_key_base64(),
    })
}

/// What a signed message is, from its canonical JSON: a cross-signing key, a device, a
/// backup's `auth_data`, other JSON, or bytes. The values are as the signed object gives
/// them (from the server, for devices: a reader escapes them).
pub fn classify(message: &[u8]) -> Value {
    let Ok(Value::Object(o)) = serde_json::from_slice::<Value>(message) else {
        return json!({"type": "bytes", "length": message.len()});
    };
    // The server chooses these strings: a long one is kept as its hash, so an entry stays
    // small whatever a device calls itself.
    let text = |k: &str| o.get(k).and_then(Value::as_str).map(bounded);
    let first_key = || {
        o.get("keys")
            .and_then(Value::as_object)
            .and_then(|k| k.values().next())
            .and_then(Value::as_str)
            .map(bounded)
    };
    if let Some(usage) = o.get("usage").and_then(Value::as_array) {
        return json!({
            "type": "cross_signing_key",
            "usage": usage.first().and_then(Value::as_str),
            "user_id": text("user_id"),
            "public_key": first_key(),
        });
    }
    if o.contains_key("device_id") && o.contains_key("keys") {
        return json!({
            "type": "device_keys",
            "user_id": text("user_id"),
            "device_id": text("device_id"),
        });
    }
    if o.contains_key("public_key") {
        return json!({"type": "backup_auth_data", "public_key": text("public_key")});
    }
    json!({"type": "json"})
}

/// `text`, or when it is longer than 255 bytes, `sha256:<hex>` of it.
fn bounded(text: &str) -> String {
    if text.len() <= 255 {
        text.to_string()
    } else {
        format!("sha256:{}", line_hash(text.as_bytes()))
    }
}

/// Agreements of one key in this command.
struct Tally {
    account: String,
    token: Value,
    key: Value,
    count: u64,
    digest: Sha256,
}

#[derive(Default)]
struct State {
    /// Entries were written since the last head.
    pending: bool,
    agreements: BTreeMap<String, Tally>,
    /// What went wrong writing a head (the store drops without a way to report it).
    error: Option<String>,
}

/// The audit log of one mxhsm command (an [`AuditSink`] for its stores).
pub struct AuditLog {
    path: PathBuf,
    command: String,
    /// A syslog socket (`/dev/log`) every line is also sent to.
    mirror: Option<PathBuf>,
    state: Mutex<State>,
    /// Held from the check for a key's first agreement until its `agree` entry is written,
    /// so that no thread agrees before that entry is on disk.
    agree_gate: Mutex<()>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .field("command", &self.command)
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// The log at `path` for the command `command` (as the user would say it: `sign
    /// devices`), with every line also sent to the syslog socket `mirror`.
    pub fn new(path: PathBuf, command: &str, mirror: Option<PathBuf>) -> AuditLog {
        AuditLog {
            path,
            command: command.to_string(),
            mirror,
            state: Mutex::new(State::default()),
            agree_gate: Mutex::new(()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What went wrong closing the record, if anything (reported once).
    pub fn take_error(&self) -> Option<String> {
        self.state.lock().ok().and_then(|mut s| s.error.take())
    }

    fn entry(&self, seq: u64, prev: &str, op: &str) -> Map<String, Value> {
        let now = crate::token::now_ms();
        let mut m = Map::new();
        m.insert("seq".into(), seq.into());
        m.insert("prev".into(), prev.into());
        m.insert("time".into(), crate::text::rfc3339(now).into());
        m.insert("time_ms".into(), now.into());
        m.insert("op".into(), op.into());
        m.insert("command".into(), self.command.clone().into());
        m.insert("pid".into(), std::process::id().into());
        m
    }

    /// Appends the entry `build` makes from the next `seq` and `prev`, under the file lock.
    fn append(
        &self,
        build: impl FnOnce(u64, &str) -> Result<Map<String, Value>, String>,
    ) -> Result<(), String> {
        let mut file = self.open()?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| format!("cannot lock {}: {e}", self.path.display()))?;
        let tail = read_tail(&mut file).map_err(|e| format!("{}: {e}", self.path.display()))?;
        let (mut seq, mut prev) = (tail.seq, tail.prev);
        if let Some((at, dropped)) = tail.torn {
            file.set_len(at)
                .map_err(|e| format!("cannot repair {}: {e}", self.path.display()))?;
            let mut repair = self.entry(seq + 1, &prev, "repair");
            repair.insert("dropped_bytes".into(), dropped.len().into());
            repair.insert("dropped_sha256".into(), line_hash(&dropped).into());
            prev = self.write_line(&mut file, &repair)?;
            seq += 1;
        }
        let entry = build(seq + 1, &prev)?;
        let hash = self.write_line(&mut file, &entry)?;
        if entry.get("op").and_then(Value::as_str) == Some("head") {
            // Still under the lock, so the file always names the newest head.
            let head = json!({
                "seq": seq + 1, "sha256": hash, "audit_user": entry.get("audit_user"),
            })
            .to_string();
            let at = head_path(&self.path);
            crate::files::write_private(&at, head.as_bytes())
                .map_err(|e| format!("cannot write {}: {e}", at.display()))?;
        }
        Ok(())
    }

    /// Writes one entry and its newline in one call, syncs it, mirrors it; returns its hash.
    fn write_line(
        &self,
        file: &mut std::fs::File,
        entry: &Map<String, Value>,
    ) -> Result<String, String> {
        let line = serde_json::to_string(entry).map_err(|e| e.to_string())?;
        let mut bytes = line.clone().into_bytes();
        bytes.push(b'\n');
        file.write_all(&bytes)
            .and_then(|()| file.sync_data())
            .map_err(|e| format!("cannot write {}: {e}", self.path.display()))?;
        if let Some(socket) = &self.mirror {
            // The mirror is a copy elsewhere; the file is the record. A socket that is
            // not there does not stop the operation.
            let _ = mirror(socket, &line);
        }
        Ok(line_hash(line.as_bytes()))
    }

    fn open(&self) -> Result<std::fs::File, String> {
        let err = |e: &dyn std::fmt::Display| format!("{}: {e}", self.path.display());
        if self.path == default_path() {
            crate::paths::private_dir(crate::paths::Base::Data, None).map_err(|e| err(&e))?;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&self.path)
            .map_err(|e| err(&e))?;
        // The log must be ours and private, like every file mxhsm keeps.
        crate::paths::check_private_file(&file, &self.path).map_err(|e| e.to_string())?;
        Ok(file)
    }

    fn record_entry(
        &self,
        op: &str,
        token: &TokenSummary,
        key: &KeyInfo,
        extra: impl FnOnce(&mut Map<String, Value>),
    ) -> Result<(), String> {
        self.append(|seq, prev| {
            let mut e = self.entry(seq, prev, op);
            e.insert("account".into(), key.user_id.clone().into());
            e.insert("token".into(), token_json(token));
            e.insert("key".into(), key_json(key));
            extra(&mut e);
            Ok(e)
        })?;
        if let Ok(mut s) = self.state.lock() {
            s.pending = true;
        }
        Ok(())
    }

    /// Writes the `agree_done` entries of this command's agreements.
    fn flush_agreements(&self) -> Result<(), String> {
        let tallies = match self.state.lock() {
            Ok(mut s) => std::mem::take(&mut s.agreements),
            Err(_) => return Err("the audit log's state is poisoned".into()),
        };
        for (_, t) in tallies {
            self.append(|seq, prev| {
                let mut e = self.entry(seq, prev, "agree_done");
                e.insert("account".into(), t.account.clone().into());
                e.insert("token".into(), t.token.clone());
                e.insert("key".into(), t.key.clone());
                e.insert("count".into(), t.count.into());
                e.insert("sha256".into(), hex(&t.digest.clone().finalize()).into());
                Ok(e)
            })?;
        }
        Ok(())
    }
}

impl AuditSink for AuditLog {
    fn record(&self, token: &TokenSummary, op: TokenOp<'_>) -> Result<(), String> {
        match op {
            TokenOp::Sign { key, message } => self.record_entry("sign", token, key, |e| {
                e.insert("object".into(), classify(message));
                e.insert("sha256".into(), line_hash(message).into());
            }),
            TokenOp::Agree { key, peer } => {
                let id = format!("{}|{}", token.serial, key.public_key_base64());
                let _gate = self.agree_gate.lock().map_err(|_| "poisoned".to_string())?;
                let known = self
                    .state
                    .lock()
                    .map_err(|_| "poisoned".to_string())?
                    .agreements
                    .contains_key(&id);
                if !known {
                    // Written before the first agreement; only then is the key tallied.
                    self.record_entry("agree", token, key, |_| {})?;
                }
                let mut s = self.state.lock().map_err(|_| "poisoned".to_string())?;
                let t = s.agreements.entry(id).or_insert_with(|| Tally {
                    account: key.user_id.clone(),
                    token: token_json(token),
                    key: key_json(key),
                    count: 0,
                    digest: Sha256::new(),
                });
                t.count += 1;
                t.digest.update(peer.as_bytes());
                Ok(())
            }
            TokenOp::Generated { key } => self.record_entry("generate", token, key, |_| {}),
            TokenOp::Imported { key } => self.record_entry("import", token, key, |_| {}),
            TokenOp::Adopted { key } => self.record_entry("adopt", token, key, |_| {}),
            TokenOp::Delete { key } => self.record_entry("delete", token, key, |_| {}),
        }
    }

    fn audit_user_hint(&self) -> Option<String> {
        let text = std::fs::read(head_path(&self.path)).ok()?;
        let v: Value = serde_json::from_slice(&text).ok()?;
        v.get("audit_user")?.as_str().map(str::to_string)
    }

    fn needs_head(&self) -> bool {
        self.state
            .lock()
            .map(|s| s.pending || !s.agreements.is_empty())
            .unwrap_or(true)
    }

    fn head(&self, token: &TokenSummary, signer: Option<(&KeyInfo, &HeadSigner<'_>)>) {
        let result = self.flush_agreements().and_then(|()| {
            self.append(|seq, prev| {
                let mut e = self.entry(seq, prev, "head");
                e.insert("token".into(), token_json(token));
                let time = e
                    .get("time")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                match signer {
                    Some((key, sign)) => {
                        let sig = sign(&head_message(seq, prev, &time))
                            .map_err(|e| format!("the audit key did not sign the head: {e}"))?;
                        e.insert("audit_key".into(), key.public_key_base64().into());
                        e.insert("audit_user".into(), key.user_id.clone().into());
                        e.insert(
                            "signature".into(),
                            crate::matrix::signed_json::encode_base64(&sig).into(),
                        );
                    }
                    None => {
                        e.insert("audit_key".into(), Value::Null);
                        e.insert("signature".into(), Value::Null);
                    }
                }
                Ok(e)
            })
        });
        if let Ok(mut s) = self.state.lock() {
            s.pending = false;
            if let Err(e) = result {
                s.error = Some(e);
            }
        }
    }
}

/// Sends `line` to a syslog socket (RFC 3164: facility auth, severity notice). A syslog
/// that does not read within a moment loses the copy rather than stall the token.
fn mirror(socket: &Path, line: &str) -> std::io::Result<()> {
    let s = std::os::unix::net::UnixDatagram::unbound()?;
    s.set_write_timeout(Some(std::time::Duration::from_millis(200)))?;
    let message = format!("<37>mxhsm[{}]: {line}", std::process::id());
    s.send_to(message.as_bytes(), socket).map(|_| ())
}

/// The end of the log: the last entry's `seq` and line hash, and a torn last line (its
/// offset and bytes) if there is one.
struct Tail {
    seq: u64,
    prev: String,
    torn: Option<(u64, Vec<u8>)>,
}

fn read_tail(file: &mut std::fs::File) -> Result<Tail, String> {
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    if len == 0 {
        return Ok(Tail {
            seq: 0,
            prev: ZERO_HASH.into(),
            torn: None,
        });
    }
    let start = len.saturating_sub(2 * MAX_LINE);
    file.seek(SeekFrom::Start(start))
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf).map_err(|e| e.to_string())?;
    // A last line without its newline is half an entry: a crash during an append.
    let complete = match buf.iter().rposition(|b| *b == b'\n') {
        Some(i) => i + 1,
        None if start == 0 => 0,
        None => return Err("its last line is longer than 2 MiB: not an mxhsm audit log".into()),
    };
    let torn = (complete < buf.len()).then(|| (start + complete as u64, buf[complete..].to_vec()));
    if complete == 0 {
        return Ok(Tail {
            seq: 0,
            prev: ZERO_HASH.into(),
            torn,
        });
    }
    let body = &buf[..complete - 1];
    let from = body.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    if from == 0 && start > 0 {
        return Err("its last line is longer than 2 MiB: not an mxhsm audit log".into());
    }
    let last = &body[from..];
    let seq = serde_json::from_slice::<Value>(last)
        .ok()
        .and_then(|v| v.get("seq").and_then(Value::as_u64))
        .ok_or("its last line is not an audit entry; run `mxhsm audit verify` on it, and move it aside to start a new log")?;
    Ok(Tail {
        seq,
        prev: line_hash(last),
        torn,
    })
}

/// What [`verify`] found in a log that checks out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verified {
    pub entries: u64,
    pub heads: u64,
    /// Heads signed by the audit key.
    pub signed_heads: u64,
    /// The audit key the heads are signed with (base64).
    pub audit_key: Option<String>,
    /// The last head: its `seq` and the SHA-256 of its line, for an auditor to keep.
    pub last_head: Option<(u64, String)>,
    /// Entries after the last head (a command still running, or one that was killed).
    pub unsigned_tail: u64,
    /// The last line has no newline (a crash during an append); it is not counted.
    pub torn_tail: bool,
    /// Lines (1-based) of `repair` entries: crashes the next append cleaned up after.
    pub repairs: Vec<u64>,
}

/// Why a log does not verify, or cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}, line {line}: {what}", .path.display())]
    Bad {
        path: PathBuf,
        line: u64,
        what: String,
    },
}

/// Checks the log at `path` offline: every line is an entry; `seq` counts up from 1; each
/// `prev` is the hash of the line before; every signed head verifies with one of the audit
/// keys (`keys`, else the first signed head's: a log several tokens sign, or one whose
/// audit key was rotated, needs them all given); once a head is signed, every later head
/// must be, and with `keys` given the last one must be; and the log still reaches the head
/// recorded in `<log>.head` and `expected_head`. The first line that fails is the error.
pub fn verify(
    path: &Path,
    keys: &[Ed25519PublicKey],
    expected_head: Option<(u64, &str)>,
) -> Result<Verified, AuditError> {
    let read = |source| AuditError::Read {
        path: path.to_path_buf(),
        source,
    };
    let bytes = std::fs::read(path).map_err(read)?;
    let bad = |line: u64, what: String| AuditError::Bad {
        path: path.to_path_buf(),
        line,
        what,
    };
    let mut out = Verified::default();
    let mut prev = ZERO_HASH.to_string();
    let mut pinned: Vec<Ed25519PublicKey> = keys.to_vec();
    let mut signing_began = false;
    let mut last_head_signed = false;
    let mut hashes: BTreeMap<u64, String> = BTreeMap::new();
    let mut rest: &[u8] = &bytes;
    let mut n = 0u64;
    while !rest.is_empty() {
        n += 1;
        let Some(end) = rest.iter().position(|b| *b == b'\n') else {
            out.torn_tail = true;
            break;
        };
        let line = &rest[..end];
        rest = &rest[end + 1..];
        let v: Map<String, Value> =
            serde_json::from_slice(line).map_err(|e| bad(n, format!("not a JSON object ({e})")))?;
        let seq = v.get("seq").and_then(Value::as_u64);
        if seq != Some(n) {
            return Err(bad(
                n,
                format!(
                    "seq is {}, expected {n}: an entry before it was removed, or the lines were reordered",
                    seq.map_or("missing".into(), |s| s.to_string())
                ),
            ));
        }
        if v.get("prev").and_then(Value::as_str) != Some(prev.as_str()) {
            return Err(bad(
                n,
                "its prev is not the hash of the line before: that line was changed, or this one moved".into(),
            ));
        }
        let op = v.get("op").and_then(Value::as_str).unwrap_or_default();
        let time = v.get("time").and_then(Value::as_str).unwrap_or_default();
        match op {
            "sign" | "agree" | "agree_done" | "generate" | "import" | "adopt" | "delete" => {
                out.unsigned_tail += 1
            }
            "repair" => {
                out.repairs.push(n);
                out.unsigned_tail += 1;
            }
            "head" => {
                out.heads += 1;
                out.unsigned_tail = 0;
                match (v.get("audit_key"), v.get("signature")) {
                    (Some(Value::String(k)), Some(Value::String(sig))) => {
                        let k = Ed25519PublicKey::from_base64(k)
                            .map_err(|e| bad(n, format!("its audit_key is not a key ({e})")))?;
                        if pinned.is_empty() {
                            pinned.push(k);
                        }
                        if !pinned.contains(&k) {
                            return Err(bad(
                                n,
                                format!(
                                    "this head is signed by the key {}, not by the audit key {}",
                                    k.to_base64(),
                                    pinned
                                        .iter()
                                        .map(|k| k.to_base64())
                                        .collect::<Vec<_>>()
                                        .join(" or ")
                                ),
                            ));
                        }
                        let sig: [u8; 64] = crate::matrix::signed_json::decode_base64(sig)
                            .ok()
                            .and_then(|s| s.try_into().ok())
                            .ok_or_else(|| {
                                bad(n, "its signature is not 64 bytes of base64".into())
                            })?;
                        if !k.verify(&head_message(n, &prev, time), &sig) {
                            return Err(bad(n, "its signature does not verify".into()));
                        }
                        out.signed_heads += 1;
                        signing_began = true;
                        last_head_signed = true;
                    }
                    (Some(Value::Null), Some(Value::Null)) if signing_began => {
                        return Err(bad(
                            n,
                            "this head is unsigned, after signed ones: heads were replaced".into(),
                        ));
                    }
                    (Some(Value::Null), Some(Value::Null)) => last_head_signed = false,
                    _ => return Err(bad(n, "a head with a malformed signature".into())),
                }
                out.last_head = Some((n, line_hash(line)));
            }
            other => {
                return Err(bad(
                    n,
                    format!("unknown op {:?}", crate::text::escape(other)),
                ));
            }
        }
        prev = line_hash(line);
        hashes.insert(n, prev.clone());
        out.entries = n;
    }
    if !keys.is_empty() && out.heads > 0 && !last_head_signed {
        return Err(bad(
            out.last_head.as_ref().map_or(n, |(s, _)| *s),
            "the last head is not signed by the audit key".into(),
        ));
    }
    out.audit_key = pinned.first().map(|k| k.to_base64());
    let recorded = std::fs::read(head_path(path)).ok().and_then(|b| {
        let v: Value = serde_json::from_slice(&b).ok()?;
        Some((
            v.get("seq")?.as_u64()?,
            v.get("sha256")?.as_str()?.to_string(),
        ))
    });
    let pins = recorded
        .iter()
        .map(|(s, h)| (*s, h.as_str(), "the head recorded beside the log"))
        .chain(expected_head.map(|(s, h)| (s, h, "the head you gave")));
    for (seq, hash, what) in pins {
        match hashes.get(&seq) {
            None => {
                return Err(bad(
                    out.entries + 1,
                    format!(
                        "the log ends at seq {}, but {what} is seq {seq}: entries were cut off the end",
                        out.entries
                    ),
                ));
            }
            Some(h) if h != hash => {
                return Err(bad(
                    seq,
                    format!("this line is not {what} (its hash differs): the log was changed"),
                ));
            }
            Some(_) => {}
        }
    }
    Ok(out)
}

/// The entries of the log at `path` from `since_ms` on (every entry when `None`). Lines
/// that are not entries are skipped: [`verify`] is the check.
pub fn entries(path: &Path, since_ms: Option<u64>) -> Result<Vec<Map<String, Value>>, AuditError> {
    let bytes = std::fs::read(path).map_err(|source| AuditError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(bytes
        .split(|b| *b == b'\n')
        .filter_map(|l| serde_json::from_slice::<Map<String, Value>>(l).ok())
        .filter(|e| {
            since_ms.is_none_or(|s| e.get("time_ms").and_then(Value::as_u64).unwrap_or(0) >= s)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary() -> TokenSummary {
        TokenSummary {
            manufacturer: "test".into(),
            model: "m".into(),
            label: "t".into(),
            serial: "1".into(),
            source: "s".into(),
        }
    }

    #[test]
    fn concurrent_appends_keep_one_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        std::thread::scope(|s| {
            for t in 0..4 {
                let path = path.clone();
                s.spawn(move || {
                    // Each thread has its own log object (its own open file), as two
                    // processes would.
                    let log = AuditLog::new(path, &format!("thread {t}"), None);
                    for _ in 0..50 {
                        log.append(|seq, prev| Ok(log.entry(seq, prev, "generate")))
                            .unwrap();
                    }
                });
            }
        });
        let v = verify(&path, &[], None).unwrap();
        assert_eq!(v.entries, 200);
    }

    #[test]
    fn a_torn_line_is_repaired_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::new(path.clone(), "test", None);
        log.append(|seq, prev| Ok(log.entry(seq, prev, "generate")))
            .unwrap();
        log.head(&summary(), None);
        // A crash mid-append: half a line.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"{\"seq\":3,\"prev\":\"ab").unwrap();
        let v = verify(&path, &[], None).unwrap();
        assert!(v.torn_tail);
        assert_eq!((v.entries, v.heads), (2, 1));
        log.append(|seq, prev| Ok(log.entry(seq, prev, "delete")))
            .unwrap();
        let v = verify(&path, &[], None).unwrap();
        assert!(!v.torn_tail);
        assert_eq!(v.repairs, vec![3]);
        assert_eq!(v.entries, 4);
    }

    #[test]
    fn objects_are_classified() {
        let long = "D".repeat(3000);
        let d = classify(
            format!(r#"{{"algorithms":[],"device_id":"{long}","keys":{{}},"user_id":"@a:b"}}"#)
                .as_bytes(),
        );
        assert!(d["device_id"].as_str().unwrap().starts_with("sha256:"));
        let c = classify(br#"{"keys":{"ed25519:K":"K"},"usage":["master"],"user_id":"@a:b"}"#);
        assert_eq!(c["type"], "cross_signing_key");
        assert_eq!(c["usage"], "master");
        let d = classify(br#"{"algorithms":[],"device_id":"D","keys":{},"user_id":"@a:b"}"#);
        assert_eq!(
            (d["type"].as_str(), d["device_id"].as_str()),
            (Some("device_keys"), Some("D"))
        );
        assert_eq!(
            classify(br#"{"public_key":"P"}"#)["type"],
            "backup_auth_data"
        );
        assert_eq!(classify(b"\x00\x01")["type"], "bytes");
    }
}
