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
//! The output itself is an unnamed file (see [`crate::files::PrivateFile`]) that gets its
//! name only when complete: a `kill -9` leaves neither a partial export nor plaintext JSON.

use std::collections::BTreeMap;
use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

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
/// before the next starts, so memory holds one round of plaintext.
pub const ROUND: usize = 4096;
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
}

/// Told how a restore goes.
pub trait RestoreProgress: Sync {
    /// Bytes of the backup downloaded so far.
    fn downloaded(&self, _bytes: u64) {}
    /// The number of sessions, and how many an interrupted run had restored already.
    fn start(&self, _total: u64, _already: u64) {}
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
    /// The backup was downloaded in this run (false: an interrupted run's copy was used).
    pub downloaded: bool,
    pub jobs: usize,
    pub seconds: f64,
}

/// The backup as the server sends it, parsed into no more than restore needs.
#[derive(serde::Deserialize)]
struct Dump {
    #[serde(default)]
    rooms: BTreeMap<String, DumpRoom>,
}

#[derive(serde::Deserialize)]
struct DumpRoom {
    #[serde(default)]
    sessions: BTreeMap<String, DumpSession>,
}

#[derive(serde::Deserialize)]
struct DumpSession {
    /// Decoded as it is read (bytes, not text), keeping a 100,000-session backup small; a
    /// malformed one becomes that session's failure, not the whole restore's.
    #[serde(default = "missing_session_data", deserialize_with = "session_data")]
    session_data: Result<EncryptedSessionData, backup::BackupError>,
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

/// Parses a backup download (`{"rooms": {room: {"sessions": {id: KeyBackupData}}}}`)
/// into the sessions to restore, in a fixed order (rooms, then sessions, sorted), so an
/// interrupted restore resumes on the same rounds.
pub fn parse_backup(reader: impl Read) -> Result<Vec<BackedUpSession>, serde_json::Error> {
    let dump: Dump = serde_json::from_reader(std::io::BufReader::new(reader))?;
    let mut items = Vec::new();
    for (room_id, room) in dump.rooms {
        for (session_id, s) in room.sessions {
            items.push(BackedUpSession {
                room_id: room_id.clone(),
                session_id,
                session_data: s.session_data,
            });
        }
    }
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

/// A backup download written into the state directory.
struct SpoolFile(PrivateFile);

impl Write for SpoolFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl BackupSink for SpoolFile {
    fn finish(self: Box<Self>) -> std::io::Result<()> {
        self.0.commit_replace()
    }
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

/// Decrypts every session of the current backup with the token's backup key and writes
/// them to `options.out`. `passphrase` is asked (for the export format) only after every
/// check passed and before the long part.
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
    let saved_spool = if options.resume && saved_version.as_deref() == Some(version.as_str()) {
        ours(&spool)?
    } else {
        None
    };
    let saved = saved_spool.is_some();
    if !saved {
        let _ = std::fs::remove_file(dir.join("progress"));
        let spool_path = spool.clone();
        account
            .client()
            .download_backup_keys(
                &version,
                &mut || {
                    Ok(Box::new(SpoolFile(PrivateFile::create(&spool_path)?))
                        as Box<dyn BackupSink>)
                },
                &|bytes| progress.downloaded(bytes),
            )
            .map_err(AccountError::BackupDownload)?;
        crate::files::write_private(&spool_version, version.as_bytes())
            .map_err(|e| AccountError::file("cannot write", &spool_version, e))?;
    }
    let spool_file = match saved_spool {
        Some(f) => f,
        None => paths::open_private(&spool).map_err(|e| AccountError::Refused(e.to_string()))?,
    };
    let items = parse_backup(spool_file).map_err(|e| {
        AccountError::Refused(format!(
            "the server's backup is not the JSON the spec describes: {}",
            crate::text::escape(&e.to_string())
        ))
    })?;
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
    let mut resumed_rounds = 0usize;
    let mut state = None;
    if saved && progress_path.exists() {
        state = Progress::resume(&progress_path, &version, &agreement, &mut |record| {
            emit(&mut sink, &record, &mut restored).map_err(write_err)?;
            failed.extend(record.failed.iter().cloned());
            resumed_rounds += 1;
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
    let resumed = restored + failed.len();
    progress.start(items.len() as u64, resumed as u64);
    let jobs = options.jobs.unwrap_or_else(|| {
        pick_jobs(
            &agreement,
            &items[(resumed_rounds * ROUND).min(items.len())..],
        )
    });
    let start = Instant::now();
    for round in items.chunks(ROUND).skip(resumed_rounds) {
        let results = backup::restore_all(&agreement, round, jobs, software_jobs(), &|| {
            progress.session()
        });
        let mut record = RoundRecord {
            entries: Vec::with_capacity(round.len()),
            failed: Vec::new(),
        };
        for (item, r) in round.iter().zip(results) {
            match r {
                Ok(k) => record.entries.push(k.0.clone()),
                Err(e) => record.failed.push((
                    item.room_id.clone(),
                    item.session_id.clone(),
                    e.to_string(),
                )),
            }
        }
        state.append(&record, &progress_path)?;
        emit(&mut sink, &record, &mut restored).map_err(write_err)?;
        failed.extend(record.failed.iter().cloned());
    }
    sink.write(b"]").map_err(write_err)?;
    let seconds = start.elapsed().as_secs_f64();
    sink.commit()
        .map_err(|e| AccountError::file("cannot write", out, e))?;
    drop(state);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Restored {
        out: out.to_path_buf(),
        restored,
        failed,
        resumed,
        downloaded: !saved,
        jobs,
        seconds,
    })
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

/// How many parallel agreements this token gains from, measured on a sample of the real
/// sessions with the whole pipeline (an in-process token such as SoftHSM competes with the
/// software workers for the CPU, so the agreement rate alone misleads): more sessions help
/// SoftHSM, not Kryoptic; a YubiKey is serial.
pub fn pick_jobs(agreement: &TokenAgreement<'_>, sessions: &[BackedUpSession]) -> usize {
    const SAMPLE: usize = 400;
    if sessions.len() < 2 * SAMPLE {
        return 1;
    }
    let sample = &sessions[..SAMPLE];
    let measure = |jobs: usize| {
        let start = Instant::now();
        backup::restore_all(agreement, sample, jobs, software_jobs(), &|| {});
        SAMPLE as f64 / start.elapsed().as_secs_f64()
    };
    let cores = software_jobs();
    let mut best = (1, measure(1));
    for jobs in 2..=cores.min(4) {
        let r = measure(jobs);
        if r > best.1 * 1.1 {
            best = (jobs, r);
        }
    }
    best.0
}
