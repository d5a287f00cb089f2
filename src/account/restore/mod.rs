//! Restoring every backed-up session with the token's backup key into a file any client
//! imports, resumable, and leaving no plaintext behind when interrupted.
//!
//! State of a restore lives in a private directory, `~/.cache/mxhsm/restore/<id>/` (0700,
//! checked to be ours; `<id>` names the user and the output file):
//!
//! * `backup.json` — the server's answer as it came (ciphertext only), so `--resume` does
//!   not download again;
//! * `progress` — the sessions restored so far, round by round, **encrypted** under a key
//!   only the token can derive again: a fresh X25519 key pair is made when the restore
//!   starts, the key is HKDF of its agreement with the backup public key, and the private
//!   half is dropped at once; resuming re-derives the key with one agreement on the token.
//!   Each round is one record, AES-256-CTR plus HMAC-SHA-256 over its index, nonce and
//!   ciphertext, so a record cut off by a crash is simply done again.
//!
//! The backup is parsed while it downloads ([`stream`]): sessions go to the token as they
//! arrive, in chunks, each chunk one progress record. [`JobPicker`] chooses how many
//! agreements run at once by timing the restore's own first chunks. With `--new-only`,
//! sessions restored before with the same data ([`state`]) are skipped.
//!
//! The output itself is an unnamed file (see [`crate::files::PrivateFile`]) that gets its
//! name only when complete: a `kill -9` leaves neither a partial export nor plaintext JSON.

pub mod state;
pub mod stream;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{RecvTimeoutError, SyncSender};
use std::time::{Duration, Instant};

use aes::Aes256;
use aes::cipher::{KeyIvInit, StreamCipher};
use hkdf::Hkdf;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::backup::FileFormat;
use super::{Account, AccountError};
use crate::files::PrivateFile;
use crate::homeserver::BackupSink;
use crate::matrix::backup::{self, BackedUpSession, EncryptedSessionData};
use crate::matrix::key_export;
use crate::matrix::keys::Curve25519PublicKey;
use crate::matrix::signed_json::encode_base64;
use crate::paths::{self, Base};
use crate::token::{KeyInfo, KeyRole, TokenAgreement};

/// Sessions restored per round: each round is written out (and recorded for `--resume`)
/// before the next starts, so memory holds one round of plaintext, and an interruption
/// loses at most one round.
pub const ROUND: usize = 4096;
/// Sessions per round while [`JobPicker`] is still measuring.
pub const PROBE_ROUND: usize = 1024;
/// A round starts with fewer sessions when no more arrived for this long (a slow server).
const ROUND_WAIT: Duration = Duration::from_millis(200);
const PROGRESS_MAGIC: &str = "mxhsm restore progress v1";

type Aes256Ctr = ctr::Ctr128BE<Aes256>;

/// How a restore runs.
pub struct RestoreOptions<'a> {
    /// The file to write; it must not exist.
    pub out: &'a Path,
    pub format: FileFormat,
    /// PBKDF2 rounds of an export file.
    pub rounds: u32,
    /// Allow fewer than [`key_export::MIN_ROUNDS`] rounds.
    pub weak_rounds: bool,
    /// Parallel agreements on the token (default: measured).
    pub jobs: Option<usize>,
    /// Continue an interrupted restore into the same `out`.
    pub resume: bool,
    /// Only sessions that are new, or whose data changed, since the last restore of this
    /// backup version (see [`state`]).
    pub new_only: bool,
    /// Only these rooms, each fetched through the per-room endpoint; empty: all.
    pub rooms: &'a [String],
}

/// Told how a restore goes. The download and the restore run at once: the number of
/// sessions grows while the first ones are restored.
pub trait RestoreProgress: Sync {
    /// Bytes of the backup downloaded so far.
    fn downloaded(&self, _bytes: u64) {}
    /// How many sessions an interrupted run had restored already.
    fn start(&self, _already: u64) {}
    /// Sessions to restore found so far (with those of an interrupted run); `complete`
    /// once the backup was read to its end.
    fn found(&self, _total: u64, _complete: bool) {}
    /// One more session done.
    fn session(&self) {}
}

/// Progress nobody watches.
pub struct Quiet;
impl RestoreProgress for Quiet {}

/// What [`restore`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct Restored {
    pub out: PathBuf,
    pub restored: usize,
    /// (room, session, why) for every session that failed its checks: not written.
    pub failed: Vec<(String, String, String)>,
    /// Sessions an interrupted run had restored, carried over.
    pub resumed: usize,
    /// With `new_only`: sessions skipped, restored before with the same data.
    pub unchanged: usize,
    /// Sessions the server sent twice (the first copy is restored).
    pub duplicates: usize,
    /// The backup was downloaded in this run (false: an interrupted run's copy was used).
    pub downloaded: bool,
    pub jobs: usize,
    pub seconds: f64,
}

/// One room of a backup download, as the per-room endpoint sends it.
#[derive(serde::Deserialize)]
struct DumpRoom {
    #[serde(default)]
    sessions: BTreeMap<String, DumpSession>,
}

#[derive(serde::Deserialize)]
pub(crate) struct DumpSession {
    /// Decoded as it is read (bytes, not text), keeping a 100,000-session backup small; a
    /// malformed one becomes that session's failure, not the whole restore's.
    #[serde(default = "missing_session_data", deserialize_with = "session_data")]
    pub(crate) session_data: Result<EncryptedSessionData, backup::BackupError>,
}

fn missing_session_data() -> Result<EncryptedSessionData, backup::BackupError> {
    Err(backup::BackupError::Malformed("no session_data".into()))
}

fn session_data<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Result<EncryptedSessionData, backup::BackupError>, D::Error> {
    let v: Value = serde::Deserialize::deserialize(d)?;
    Ok(EncryptedSessionData::from_json(&v))
}

/// Parses a whole backup download into its sessions, in the order of the file (what
/// [`stream::stream_backup`] hands on one by one).
pub fn parse_backup(reader: impl Read) -> Result<Vec<BackedUpSession>, serde_json::Error> {
    let mut items = Vec::new();
    stream::stream_backup(reader, &mut |s| {
        items.push(s);
        Ok(())
    })?;
    Ok(items)
}

/// Where restored sessions go: the plain JSON array or an export file, both written to an
/// unnamed file that becomes the output only when complete.
enum Sink {
    Json(PrivateFile),
    Export(Box<key_export::ExportWriter<PrivateFile>>),
}

impl Sink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Json(f) => f.write_all(bytes),
            Sink::Export(w) => w.write_plaintext(bytes),
        }
    }

    fn commit(self) -> std::io::Result<()> {
        match self {
            Sink::Json(f) => f.commit_new(),
            Sink::Export(w) => w.finish()?.commit_new(),
        }
    }
}

/// The private directory of the restore of `user` into `out`.
fn state_dir(user: &str, out: &Path) -> Result<PathBuf, AccountError> {
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let parent = parent
        .canonicalize()
        .map_err(|e| AccountError::file("cannot find the directory of", out, e))?;
    let mut h = Sha256::new();
    h.update(user.as_bytes());
    h.update([0]);
    h.update(parent.as_os_str().as_encoded_bytes());
    h.update([0]);
    h.update(out.file_name().unwrap_or_default().as_encoded_bytes());
    let id: String = h.finalize()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let base = paths::private_dir(Base::Cache, Some("restore"))
        .map_err(|e| AccountError::Refused(e.to_string()))?;
    Ok(base.join(id))
}

/// The keys of the progress file: AES-256 and HMAC-SHA-256.
struct ProgressKeys(Zeroizing<[u8; 64]>);

impl ProgressKeys {
    fn derive(shared: &[u8; 32], version: &str) -> ProgressKeys {
        let hkdf = Hkdf::<Sha256>::new(Some(PROGRESS_MAGIC.as_bytes()), shared);
        let mut okm = Zeroizing::new([0u8; 64]);
        // 64 bytes is far below HKDF-SHA-256's limit.
        hkdf.expand(version.as_bytes(), okm.as_mut()).unwrap_or(());
        ProgressKeys(okm)
    }

    fn mac(&self, index: u32, nonce: &[u8; 16], ciphertext: &[u8]) -> [u8; 32] {
        crate::matrix::hmac_sha256(&self.0[32..], &[&index.to_be_bytes(), nonce, ciphertext])
    }

    fn apply(&self, nonce: &[u8; 16], data: &mut [u8]) {
        Aes256Ctr::new_from_slices(&self.0[..32], nonce)
            .unwrap_or_else(|_| unreachable!("32-byte key, 16-byte nonce"))
            .apply_keystream(data);
    }
}

/// One round's results, as recorded in the progress file.
#[derive(serde::Serialize, serde::Deserialize)]
struct RoundRecord {
    /// The output entries (export-file JSON objects).
    entries: Vec<Value>,
    failed: Vec<(String, String, String)>,
}

impl Drop for RoundRecord {
    fn drop(&mut self) {
        for e in &mut self.entries {
            if let Some(Value::String(s)) = e.get_mut("session_key") {
                zeroize::Zeroize::zeroize(s);
            }
        }
    }
}

/// The progress file: records appended round by round.
struct Progress {
    file: std::fs::File,
    keys: ProgressKeys,
    records: u32,
}

impl Progress {
    /// Starts a progress file: the key comes from a fresh ephemeral key pair's agreement
    /// with the backup public key; only the public half is kept (in the header).
    fn create(
        path: &Path,
        version: &str,
        backup_public: &Curve25519PublicKey,
    ) -> Result<Progress, AccountError> {
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::fill(seed.as_mut())
            .map_err(|e| AccountError::Input(format!("no randomness: {e}")))?;
        let secret = x25519_dalek::StaticSecret::from(*seed);
        let public = x25519_dalek::PublicKey::from(&secret);
        let shared = Zeroizing::new(
            secret
                .diffie_hellman(&x25519_dalek::PublicKey::from(*backup_public.as_bytes()))
                .to_bytes(),
        );
        drop(secret);
        let header = format!(
            "{PROGRESS_MAGIC} {} {}\n",
            encode_base64(public.as_bytes()),
            encode_base64(version.as_bytes())
        );
        let io = |e: std::io::Error| AccountError::file("cannot write", path, e);
        let mut file = paths::create_private(path).map_err(io)?;
        file.write_all(header.as_bytes()).map_err(io)?;
        file.sync_data().map_err(io)?;
        Ok(Progress {
            file,
            keys: ProgressKeys::derive(&shared, version),
            records: 0,
        })
    }

    /// Opens an interrupted restore's progress: re-derives the key on the token (one
    /// agreement), replays every intact record through `replay`, and cuts off a torn last
    /// record. Returns `None` when the file is not for `version`.
    fn resume(
        path: &Path,
        version: &str,
        agreement: &TokenAgreement<'_>,
        replay: &mut dyn FnMut(RoundRecord) -> Result<(), AccountError>,
    ) -> Result<Option<Progress>, AccountError> {
        let io = |e: std::io::Error| AccountError::file("cannot read", path, e);
        let mut file =
            paths::open_private_rw(path).map_err(|e| AccountError::Refused(e.to_string()))?;
        let mut reader = std::io::BufReader::new(&file);
        let mut header = String::new();
        reader.read_line(&mut header).map_err(io)?;
        let mut parts = header.trim_end().rsplitn(3, ' ');
        let (Some(v), Some(eph), Some(magic)) = (parts.next(), parts.next(), parts.next()) else {
            return Ok(None);
        };
        if magic != PROGRESS_MAGIC || v != encode_base64(version.as_bytes()) {
            return Ok(None);
        }
        let eph = Curve25519PublicKey::from_base64(eph)
            .map_err(|e| AccountError::file("is damaged:", path, e))?;
        let shared = agreement.store().x25519(agreement.key(), &eph)?;
        let keys = ProgressKeys::derive(shared.expose(), version);
        let mut good_len = header.len() as u64;
        let mut records = 0u32;
        loop {
            let mut len = [0u8; 4];
            if reader.read_exact(&mut len).is_err() {
                break;
            }
            let len = u32::from_be_bytes(len) as usize;
            if !(16 + 32..=1 << 30).contains(&len) {
                break;
            }
            let mut body = Zeroizing::new(vec![0u8; len]);
            if reader.read_exact(&mut body).is_err() {
                break;
            }
            let (nonce, rest) = body.split_at(16);
            let (ct, tag) = rest.split_at(rest.len() - 32);
            let nonce: [u8; 16] = nonce.try_into().unwrap_or([0; 16]);
            if !bool::from(keys.mac(records, &nonce, ct).ct_eq(tag)) {
                break;
            }
            let mut plain = Zeroizing::new(ct.to_vec());
            keys.apply(&nonce, &mut plain);
            let record: RoundRecord = serde_json::from_slice(&plain)
                .map_err(|e| AccountError::file("is damaged:", path, e))?;
            replay(record)?;
            records += 1;
            good_len += 4 + len as u64;
        }
        drop(reader);
        file.set_len(good_len).map_err(io)?;
        std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0)).map_err(io)?;
        Ok(Some(Progress {
            file,
            keys,
            records,
        }))
    }

    /// Appends one round, synced before the round's sessions reach the output.
    fn append(&mut self, record: &RoundRecord, path: &Path) -> Result<(), AccountError> {
        let io = |e: std::io::Error| AccountError::file("cannot write", path, e);
        let mut plain = Zeroizing::new(
            serde_json::to_vec(record).map_err(|e| AccountError::Input(e.to_string()))?,
        );
        let mut nonce = [0u8; 16];
        getrandom::fill(&mut nonce)
            .map_err(|e| AccountError::Input(format!("no randomness: {e}")))?;
        self.keys.apply(&nonce, &mut plain);
        let tag = self.keys.mac(self.records, &nonce, &plain);
        let len = (16 + plain.len() + 32) as u32;
        let mut buf = Vec::with_capacity(4 + len as usize);
        buf.extend_from_slice(&len.to_be_bytes());
        buf.extend_from_slice(&nonce);
        buf.extend_from_slice(&plain);
        buf.extend_from_slice(&tag);
        self.file.write_all(&buf).map_err(io)?;
        self.file.sync_data().map_err(io)?;
        self.records += 1;
        Ok(())
    }
}

/// The current backup version, which must be encrypted to `key` (the token's backup key).
fn ours_current_version(account: &Account, key: &KeyInfo) -> Result<String, AccountError> {
    let v = super::backup::current_version(account)?.ok_or(AccountError::NoBackup)?;
    let version = v.version.clone();
    let public = v.claimed_public_key().trim_end_matches('=');
    if public != key.public_key_base64() {
        return Err(AccountError::Refused(format!(
            "backup version {} is encrypted to {}, not to the token's backup key {}",
            crate::text::escape(&version),
            crate::text::escape(public),
            key.public_key_base64()
        )));
    }
    Ok(version)
}

/// Decrypts every session of the current backup (or of `options.rooms`) with the token's
/// backup key and writes them to `options.out`. `passphrase` is asked (for the export
/// format) only after every check passed and before the long part.
pub fn restore(
    account: &Account,
    options: &RestoreOptions<'_>,
    passphrase: &dyn Fn() -> Result<SecretString, AccountError>,
    progress: &dyn RestoreProgress,
) -> Result<Restored, AccountError> {
    let me = account.user_id();
    let out = options.out;
    let store = account.keys();
    if options.format == FileFormat::Export
        && options.rounds < key_export::MIN_ROUNDS
        && !options.weak_rounds
    {
        return Err(AccountError::WeakExportRounds {
            rounds: options.rounds,
            minimum: key_export::MIN_ROUNDS,
        });
    }
    for room in options.rooms {
        let ok = room.len() <= 255
            && room
                .strip_prefix('!')
                .is_some_and(|r| !r.is_empty() && !r.chars().any(char::is_control));
        if !ok {
            return Err(AccountError::Input(format!(
                "{} is not a room ID (they look like !opaque:example.org)",
                crate::text::escape(room)
            )));
        }
    }
    if out.exists() {
        return Err(AccountError::Refused(format!(
            "{} exists; mxhsm does not overwrite a file",
            out.display()
        )));
    }
    crate::files::remove_stale_temporaries(out);
    let dir = state_dir(me, out)?;
    if dir.exists() && !options.resume {
        return Err(AccountError::RestoreInterrupted {
            out: out.to_path_buf(),
            state: dir,
        });
    }
    let key = store.find_key(me, KeyRole::Backup)?;
    let version = ours_current_version(account, &key)?;
    let state_path = state::state_path(me, &version).map_err(AccountError::Refused)?;
    let previous = if options.new_only {
        state::RestoredState::load(&state_path).map_err(AccountError::Refused)?
    } else {
        state::RestoredState::default()
    };
    let pass = match options.format {
        FileFormat::Export => Some(passphrase()?),
        FileFormat::Json => None,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode_0700()
        .create(&dir)
        .map_err(|e| AccountError::file("cannot make", &dir, e))?;
    let spool = dir.join("backup.json");
    let spool_version = dir.join("version");
    // The download, unless an interrupted run of the same version left it complete. A
    // file there that is not ours (another user's, a link) is refused, not used.
    let ours = |p: &Path| {
        paths::open_private_if_any(p).map_err(|e| {
            AccountError::Refused(format!(
                "{e}; remove {} to start the restore again",
                dir.display()
            ))
        })
    };
    let saved_version = match ours(&spool_version)? {
        Some(mut f) => {
            let mut s = String::new();
            f.read_to_string(&mut s)
                .map_err(|e| AccountError::file("cannot read", &spool_version, e))?;
            Some(s)
        }
        None => None,
    };
    let same_version = saved_version.as_deref() == Some(version.as_str());
    let saved_spool = match options.resume && same_version && options.rooms.is_empty() {
        true => ours(&spool)?,
        false => None,
    };
    let downloaded = saved_spool.is_none() && options.rooms.is_empty();
    let agreement = TokenAgreement::new(store, key.clone())?;
    let file = PrivateFile::create(out).map_err(|e| AccountError::file("cannot create", out, e))?;
    let mut sink = match &pass {
        Some(p) => Sink::Export(Box::new(
            key_export::ExportWriter::new(file, p.expose_secret(), options.rounds)
                .map_err(|e| AccountError::file("cannot write", out, e))?,
        )),
        None => Sink::Json(file),
    };
    let write_err = |e: std::io::Error| AccountError::file("cannot write", out, e);
    sink.write(b"[").map_err(write_err)?;
    let mut restored = 0usize;
    let mut failed = Vec::new();
    // Sessions done by an interrupted run (replayed from its progress), by ID.
    let mut done: HashSet<state::SessionId> = HashSet::new();
    let emit = |sink: &mut Sink, record: &RoundRecord, restored: &mut usize| {
        for entry in &record.entries {
            let bytes = Zeroizing::new(serde_json::to_vec(entry).unwrap_or_default());
            if *restored > 0 {
                sink.write(b",")?;
            }
            sink.write(&bytes)?;
            *restored += 1;
        }
        Ok::<(), std::io::Error>(())
    };
    let progress_path = dir.join("progress");
    let mut state = None;
    // An interrupted run's rounds count whether or not its download finished: they are
    // matched to the sessions by ID, not by position.
    if options.resume && same_version && progress_path.exists() {
        state = Progress::resume(&progress_path, &version, &agreement, &mut |record| {
            emit(&mut sink, &record, &mut restored).map_err(write_err)?;
            for e in &record.entries {
                if let (Some(Value::String(r)), Some(Value::String(s))) =
                    (e.get("room_id"), e.get("session_id"))
                {
                    done.insert(state::session_id(r, s));
                }
            }
            for (r, s, _) in &record.failed {
                done.insert(state::session_id(r, s));
            }
            failed.extend(record.failed.iter().cloned());
            Ok(())
        })?;
        // `None`: another version's progress (nothing was replayed); the rounds start
        // again.
    }
    let mut state = match state {
        Some(s) => s,
        None => {
            let _ = std::fs::remove_file(&progress_path);
            Progress::create(&progress_path, &version, &key.curve25519()?)?
        }
    };
    if !same_version {
        // Another version's download is never parsed as this one's.
        let _ = std::fs::remove_file(&spool);
        crate::files::write_private(&spool_version, version.as_bytes())
            .map_err(|e| AccountError::file("cannot write", &spool_version, e))?;
    }
    let resumed = restored + failed.len();
    progress.start(resumed as u64);
    // A YubiKey does one agreement at a time.
    let picker_max = match account.store().as_pkcs11() {
        Some(_) => software_jobs().min(4),
        None => 1,
    };
    let mut picker = JobPicker::new(options.jobs, picker_max);
    let mut this_run: HashMap<state::SessionId, state::DataDigest> = HashMap::new();
    let (mut unchanged, mut duplicates) = (0usize, 0usize);
    let start = Instant::now();
    let (tx, rx) = std::sync::mpsc::sync_channel::<BackedUpSession>(2 * ROUND);
    let spooling = stream::Spool::new();
    let produced = std::thread::scope(|scope| -> Result<(), AccountError> {
        let source = scope.spawn(|| -> Result<(), AccountError> {
            // Dropped when the source is done, which ends the restore's loop.
            let tx = tx;
            if !options.rooms.is_empty() {
                return send_rooms(account, &version, options.rooms, &tx);
            }
            if let Some(f) = saved_spool {
                return send_spool(f, &tx);
            }
            download_and_send(account, &version, &spool, &spooling, &tx, progress)
        });
        let consumed = (|| -> Result<(), AccountError> {
            let mut seen: HashSet<state::SessionId> = HashSet::new();
            let mut found = resumed as u64;
            let mut closed = false;
            let mut round: Vec<BackedUpSession> = Vec::new();
            while !closed {
                let want = picker.round();
                while round.len() < want && !closed {
                    let next = match round.is_empty() {
                        true => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                        false => rx.recv_timeout(ROUND_WAIT),
                    };
                    let item = match next {
                        Ok(item) => item,
                        Err(RecvTimeoutError::Timeout) => break,
                        Err(RecvTimeoutError::Disconnected) => {
                            closed = true;
                            break;
                        }
                    };
                    let id = state::session_id(&item.room_id, &item.session_id);
                    if !seen.insert(id) {
                        duplicates += 1;
                        continue;
                    }
                    let digest = item.session_data.as_ref().ok().map(state::data_digest);
                    if let Some(d) = digest {
                        if previous.unchanged(&id, &d) {
                            unchanged += 1;
                            continue;
                        }
                        this_run.insert(id, d);
                    }
                    if done.contains(&id) {
                        continue;
                    }
                    round.push(item);
                    found += 1;
                }
                progress.found(found, closed);
                if round.is_empty() {
                    continue;
                }
                let jobs = picker.jobs();
                let began = Instant::now();
                let results =
                    backup::restore_all(&agreement, &round, jobs, software_jobs(), &|| {
                        progress.session()
                    });
                picker.measured(jobs, round.len(), began.elapsed());
                let mut record = RoundRecord {
                    entries: Vec::with_capacity(round.len()),
                    failed: Vec::new(),
                };
                for (item, r) in round.drain(..).zip(results) {
                    match r {
                        Ok(k) => record.entries.push(k.0.clone()),
                        Err(e) => {
                            record
                                .failed
                                .push((item.room_id, item.session_id, e.to_string()))
                        }
                    }
                }
                state.append(&record, &progress_path)?;
                emit(&mut sink, &record, &mut restored).map_err(write_err)?;
                failed.extend(record.failed.iter().cloned());
            }
            Ok(())
        })();
        if consumed.is_err() {
            // The source stops at its next send (or the download at its next write).
            spooling.cancel();
            drop(rx);
        }
        let produced = source
            .join()
            .unwrap_or_else(|_| Err(AccountError::Input("the backup reader failed".into())));
        consumed.and(produced)
    });
    produced?;
    sink.write(b"]").map_err(write_err)?;
    let seconds = start.elapsed().as_secs_f64();
    sink.commit()
        .map_err(|e| AccountError::file("cannot write", out, e))?;
    drop(state);
    // Remembered for the next `--new-only`: everything this run saw and restored (or that
    // failed its checks: the same data would fail again), over what earlier runs did.
    let mut remembered = match options.new_only {
        true => previous,
        false => state::RestoredState::load(&state_path).unwrap_or_default(),
    };
    remembered.sessions.extend(this_run);
    let saved = remembered.save(&state_path);
    let _ = std::fs::remove_dir_all(&dir);
    saved.map_err(AccountError::Refused)?;
    Ok(Restored {
        out: out.to_path_buf(),
        restored,
        failed,
        resumed,
        unchanged,
        duplicates,
        downloaded,
        jobs: picker.jobs(),
        seconds,
    })
}

/// The source of a whole-backup restore: downloads into the spool and parses at once.
fn download_and_send(
    account: &Account,
    version: &str,
    spool: &Path,
    spooling: &std::sync::Arc<stream::Spool>,
    tx: &SyncSender<BackedUpSession>,
    progress: &dyn RestoreProgress,
) -> Result<(), AccountError> {
    std::thread::scope(|scope| {
        let download = scope.spawn(|| {
            let r = account.client().download_backup_keys(
                version,
                &mut || {
                    let file = PrivateFile::create(spool)?;
                    Ok(Box::new(spooling.begin(file)?) as Box<dyn BackupSink>)
                },
                &|bytes| progress.downloaded(bytes),
            );
            spooling.end();
            r
        });
        let parsed = spooling.follow(&mut |s| tx.send(s).map_err(|_| STOPPED.to_string()));
        if parsed.is_err() {
            spooling.cancel();
        }
        let downloaded = download.join().unwrap_or_else(|_| {
            Err(crate::homeserver::HomeserverError::Input(
                "the download failed".into(),
            ))
        });
        match (downloaded, parsed) {
            // The restore stopped reading: its own error is the one reported.
            (_, Err(e)) if stopped(&e) => Ok(()),
            (_, Err(e)) => Err(bad_backup(&e)),
            (Err(e), _) => Err(AccountError::BackupDownload(e)),
            (Ok(()), Ok(true)) => Ok(()),
            (Ok(()), Ok(false)) => Err(AccountError::Refused(
                "the backup download ended without a whole answer".into(),
            )),
        }
    })
}

/// What a source's handler says when the restore stopped taking sessions.
const STOPPED: &str = "the restore stopped taking sessions";

fn stopped(e: &serde_json::Error) -> bool {
    e.to_string().starts_with(STOPPED)
}

fn bad_backup(e: &serde_json::Error) -> AccountError {
    AccountError::Refused(format!(
        "the server's backup is not the JSON the spec describes: {}",
        crate::text::escape(&e.to_string())
    ))
}

/// The source of a resumed restore whose download had finished: its spool.
fn send_spool(file: std::fs::File, tx: &SyncSender<BackedUpSession>) -> Result<(), AccountError> {
    match stream::stream_backup(file, &mut |s| tx.send(s).map_err(|_| STOPPED.to_string())) {
        Ok(()) => Ok(()),
        Err(e) if stopped(&e) => Ok(()),
        Err(e) => Err(bad_backup(&e)),
    }
}

/// The source of `--room`: each room through `GET /room_keys/keys/{room}`.
fn send_rooms(
    account: &Account,
    version: &str,
    rooms: &[String],
    tx: &SyncSender<BackedUpSession>,
) -> Result<(), AccountError> {
    for room_id in rooms {
        let room = account.client().backup_room(version, room_id)?;
        let room: DumpRoom = serde_json::from_value(room).map_err(|e| {
            AccountError::Refused(format!(
                "the server's backup of room {} is not what the spec describes: {}",
                crate::text::escape(room_id),
                crate::text::escape(&e.to_string())
            ))
        })?;
        for (session_id, s) in room.sessions {
            let item = BackedUpSession {
                room_id: room_id.clone(),
                session_id,
                session_data: s.session_data,
            };
            if tx.send(item).is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}

trait Mode0700 {
    fn mode_0700(&mut self) -> &mut Self;
}

impl Mode0700 for std::fs::DirBuilder {
    fn mode_0700(&mut self) -> &mut Self {
        use std::os::unix::fs::DirBuilderExt;
        self.mode(0o700)
    }
}

/// The keys of one room, restored into memory.
#[derive(Debug)]
pub struct RoomRestore {
    pub version: String,
    pub keys: Vec<backup::RoomKey>,
    /// (session, why) for every session that failed its checks.
    pub failed: Vec<(String, String)>,
}

/// Restores the backed-up sessions of one room (`GET /room_keys/keys/{room}`) with the
/// token's backup key, into memory: nothing is written anywhere.
pub fn restore_room(account: &Account, room_id: &str) -> Result<RoomRestore, AccountError> {
    let me = account.user_id();
    let store = account.keys();
    let key = store.find_key(me, KeyRole::Backup)?;
    let version = ours_current_version(account, &key)?;
    let room = account.client().backup_room(&version, room_id)?;
    let room: DumpRoom = serde_json::from_value(room).map_err(|e| {
        AccountError::Refused(format!(
            "the server's backup of the room is not what the spec describes: {}",
            crate::text::escape(&e.to_string())
        ))
    })?;
    let items: Vec<BackedUpSession> = room
        .sessions
        .into_iter()
        .map(|(session_id, s)| BackedUpSession {
            room_id: room_id.to_string(),
            session_id,
            session_data: s.session_data,
        })
        .collect();
    let agreement = TokenAgreement::new(store, key)?;
    let results = backup::restore_all(&agreement, &items, 1, software_jobs(), &|| {});
    let mut out = RoomRestore {
        version,
        keys: Vec::new(),
        failed: Vec::new(),
    };
    for (item, r) in items.iter().zip(results) {
        match r {
            Ok(k) => out.keys.push(k),
            Err(e) => out.failed.push((item.session_id.clone(), e.to_string())),
        }
    }
    Ok(out)
}

/// Threads for the software part of a restore (HKDF, AES, the session check).
pub fn software_jobs() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Chooses how many agreements run at once, on the restore's own first rounds: no sample
/// is decrypted twice and nothing is thrown away.
///
/// The rule: the first rounds are small ([`PROBE_ROUND`]) and run at 1, 2, … up to the
/// most jobs worth trying, then in reverse order, then forward again, so a drift of the
/// machine's speed does not favour one count. The count with the best median rate wins;
/// more jobs win only when at least 5 % faster than fewer (each job is a PKCS#11 session,
/// and a token that serialises them, as Kryoptic does, only loses by more). The rest of
/// the restore runs at the winner, in full rounds. `--jobs` fixes the count and skips all
/// of this; a YubiKey always runs one job.
///
/// These rounds run in the real pipeline, against the real download, with the software
/// threads and the server competing for the CPU as they will for the whole restore; a
/// sample measured alone favoured 2 jobs on Kryoptic, which runs the pipeline slower.
#[derive(Debug)]
pub struct JobPicker {
    fixed: Option<usize>,
    /// Job counts still to try, in order.
    schedule: std::collections::VecDeque<usize>,
    /// Sessions per second measured for each count.
    rates: BTreeMap<usize, Vec<f64>>,
    chosen: Option<usize>,
}

impl JobPicker {
    /// `fixed`: `--jobs`; `max`: the most jobs worth trying.
    pub fn new(fixed: Option<usize>, max: usize) -> JobPicker {
        let max = max.max(1);
        let forward: Vec<usize> = (1..=max).collect();
        let schedule = match (fixed, max) {
            (Some(_), _) | (None, 1) => Default::default(),
            _ => forward
                .iter()
                .chain(forward.iter().rev())
                .chain(forward.iter())
                .copied()
                .collect(),
        };
        JobPicker {
            fixed: fixed.map(|j| j.max(1)),
            chosen: (max == 1).then_some(1),
            schedule,
            rates: BTreeMap::new(),
        }
    }

    /// Sessions for the next round.
    pub fn round(&self) -> usize {
        match self.schedule.is_empty() {
            true => ROUND,
            false => PROBE_ROUND,
        }
    }

    /// Jobs for the next round (or the count chosen, once the restore is over).
    pub fn jobs(&self) -> usize {
        self.fixed
            .or(self.chosen)
            .or_else(|| self.schedule.front().copied())
            .unwrap_or(1)
    }

    /// The round at `jobs` restored `sessions` in `took`.
    pub fn measured(&mut self, jobs: usize, sessions: usize, took: Duration) {
        if self.schedule.front() != Some(&jobs) {
            return;
        }
        self.schedule.pop_front();
        // A round cut short by a slow server says little about the token.
        if sessions * 2 >= PROBE_ROUND {
            let rate = sessions as f64 / took.as_secs_f64().max(1e-9);
            self.rates.entry(jobs).or_default().push(rate);
        }
        if self.schedule.is_empty() {
            self.chosen = Some(self.best());
        }
    }

    fn best(&self) -> usize {
        let median = |v: &Vec<f64>| {
            let mut v = v.clone();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let mut best: Option<(usize, f64)> = None;
        for (&jobs, rates) in &self.rates {
            let r = median(rates);
            match best {
                Some((_, b)) if r <= b * 1.05 => {}
                _ => best = Some((jobs, r)),
            }
        }
        best.map(|b| b.0).unwrap_or(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_picker_keeps_one_job_unless_more_are_clearly_faster() {
        let run = |rates: &dyn Fn(usize) -> f64| {
            let mut p = JobPicker::new(None, 2);
            let mut rounds = Vec::new();
            while p.round() == PROBE_ROUND {
                let j = p.jobs();
                rounds.push(j);
                p.measured(
                    j,
                    PROBE_ROUND,
                    Duration::from_secs_f64(PROBE_ROUND as f64 / rates(j)),
                );
            }
            (rounds, p.jobs())
        };
        // Kryoptic-like: two sessions are a little slower.
        let (rounds, jobs) = run(&|j| if j == 1 { 10_800.0 } else { 9_800.0 });
        assert_eq!(rounds, [1, 2, 2, 1, 1, 2]);
        assert_eq!(jobs, 1);
        // Only 3 % faster: not worth a second session.
        assert_eq!(run(&|j| 1000.0 + 30.0 * j as f64).1, 1);
        // SoftHSM-like: two sessions are clearly faster.
        assert_eq!(run(&|j| if j == 1 { 3_000.0 } else { 3_900.0 }).1, 2);
        // --jobs is kept, a YubiKey is one job, and neither measures.
        let fixed = JobPicker::new(Some(3), 4);
        assert_eq!((fixed.jobs(), fixed.round()), (3, ROUND));
        let serial = JobPicker::new(None, 1);
        assert_eq!((serial.jobs(), serial.round()), (1, ROUND));
    }

    #[test]
    fn a_download_parses_as_it_arrives_and_starts_over_when_retried() {
        use std::io::Write;
        let dir = std::env::temp_dir().join(format!("mxhsm-stream-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("spool.json");
        let spool = stream::Spool::new();
        let body = br#"{"rooms":{"!a:x":{"sessions":{"s1":{"session_data":{}},"s2":{}}},"!b:x":{"sessions":{"s3":{}}}},"extra":1}"#;
        let got = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|s| {
            s.spawn(|| {
                // A first attempt cut off half-way, then a whole one, in small writes.
                let mut first = spool.begin(PrivateFile::create(&path).unwrap()).unwrap();
                first.write_all(&body[..40]).unwrap();
                drop(first);
                let mut second =
                    Box::new(spool.begin(PrivateFile::create(&path).unwrap()).unwrap());
                for chunk in body.chunks(7) {
                    second.write_all(chunk).unwrap();
                }
                BackupSink::finish(second).unwrap();
                spool.end();
            });
            let whole = spool
                .follow(&mut |item| {
                    got.lock().unwrap().push((item.room_id, item.session_id));
                    Ok(())
                })
                .unwrap();
            assert!(whole);
        });
        let got = got.into_inner().unwrap();
        // The cut-off attempt handed on s1 at most; the whole one everything, in order.
        assert!(got.ends_with(&[
            ("!a:x".into(), "s1".into()),
            ("!a:x".into(), "s2".into()),
            ("!b:x".into(), "s3".into())
        ]));
        assert_eq!(std::fs::read(&path).unwrap(), body);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
