//! `mxhsm backup create | status | restore | upload`: server-side key backup with the
//! backup key on the token.

use std::collections::BTreeMap;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Subcommand, ValueEnum};
use mxhsm::files::PrivateFile;
use mxhsm::homeserver::Client;
use mxhsm::matrix::backup::{self, BackedUpSession, EncryptedSessionData};
use mxhsm::matrix::device::DeviceSigner;
use mxhsm::matrix::key_export;
use mxhsm::matrix::signed_json::{Ed25519PublicKey, encode_base64};
use mxhsm::token::{KeyOptions, KeyRole, KeyStore, TokenAgreement, TokenError, TokenSigner};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use zeroize::Zeroizing;

use super::keys::read_secret;
use super::{Ctx, GlobalArgs, output};

/// Environment variable with the export-file passphrase, for scripts.
pub const PASSPHRASE_ENV: &str = "MXHSM_EXPORT_PASSPHRASE";
/// Sessions per `PUT /room_keys/keys` request.
const UPLOAD_BATCH: usize = 500;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// The encrypted `MEGOLM SESSION DATA` file Element and other clients import.
    Export,
    /// The plain JSON array of sessions (unencrypted: handle with care).
    Json,
}

#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Create a new backup version whose key is on the token and whose auth_data is signed
    /// by the master key on the token and by mxhsm's device.
    Create {
        /// Import this backup private key (base64 or 32 raw bytes) instead of generating
        /// one on the token.
        #[arg(long, value_name = "FILE")]
        import: Option<PathBuf>,
    },
    /// Version, key count, whether auth_data is signed by the master key, whether the
    /// backup's public key is the token's backup key.
    Status,
    /// Decrypt every backed-up session with the token and write them to a file.
    Restore {
        /// The file to write (it appears only when complete).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        #[arg(long, value_enum, default_value_t = Format::Export)]
        format: Format,
        /// Parallel agreements on the token (PKCS#11 sessions). Default: measured.
        #[arg(long)]
        jobs: Option<usize>,
        /// Continue an interrupted restore into the same --out file.
        #[arg(long)]
        resume: bool,
        /// Export passphrase file (else $MXHSM_EXPORT_PASSPHRASE or a prompt, asked twice).
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
        /// PBKDF2 rounds of the export file.
        #[arg(long, default_value_t = key_export::DEFAULT_ROUNDS)]
        rounds: u32,
    },
    /// Put the sessions of an export file into the current backup, after checking that its
    /// auth_data is signed by our master key.
    Upload {
        file: PathBuf,
        #[arg(long, value_enum, default_value_t = Format::Export)]
        format: Format,
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
    },
}

fn passphrase(file: Option<&Path>, twice: bool) -> Result<SecretString> {
    if let Some(f) = file {
        return super::secret_file(f, "passphrase");
    }
    if let Ok(p) = std::env::var(PASSPHRASE_ENV) {
        return Ok(SecretString::from(p));
    }
    if !std::io::stdin().is_terminal() {
        bail!("an export passphrase is needed: pass --passphrase-file or set {PASSPHRASE_ENV}");
    }
    let first = rpassword::prompt_password("Passphrase for the key export file: ")?;
    if twice {
        let second = rpassword::prompt_password("The same passphrase again: ")?;
        if first != second {
            bail!("the two passphrases differ; nothing written");
        }
    }
    if first.is_empty() {
        bail!("an empty passphrase protects nothing; nothing written");
    }
    Ok(SecretString::from(first))
}

/// The current backup version: (its version string, the whole answer).
fn current_version(client: &Client) -> Result<(String, Value)> {
    let v = client
        .backup_version()?
        .context("the server has no key backup: create one with `mxhsm backup create`")?;
    let version = v
        .get("version")
        .and_then(Value::as_str)
        .context("the server's backup has no version")?
        .to_string();
    Ok((version, v))
}

pub fn run(global: &GlobalArgs, cmd: BackupCommand) -> Result<ExitCode> {
    let ctx = Ctx::open(global)?;
    let user = ctx.session.user_id.clone();
    let store: &dyn KeyStore = &*ctx.store;
    match cmd {
        BackupCommand::Create { import } => {
            let key = match (store.find_key(&user, KeyRole::Backup), import) {
                (Ok(k), None) => {
                    eprintln!(
                        "using the backup key {} already on the token",
                        k.public_key_base64()
                    );
                    k
                }
                (Ok(_), Some(_)) => bail!(
                    "the token already holds a backup key for {user}; delete it (mxhsm keys delete --role backup) before importing another"
                ),
                (Err(TokenError::KeyNotFound { .. }), None) => {
                    store.generate(&user, KeyRole::Backup, &KeyOptions::default())?
                }
                (Err(TokenError::KeyNotFound { .. }), Some(file)) => store.import(
                    &user,
                    KeyRole::Backup,
                    read_secret(&file)?,
                    &KeyOptions::default(),
                )?,
                (Err(e), _) => return Err(e.into()),
            };
            let master = TokenSigner {
                store,
                key: store.find_key(&user, KeyRole::Master)?,
            };
            let account = super::account::olm_account(&ctx.session)?;
            let device = DeviceSigner(&account);
            let auth = backup::auth_data(
                &user,
                &key.public_key,
                &master,
                Some((&ctx.session.device_id, &device)),
            )?;
            let version = ctx.client.create_backup_version(backup::ALGORITHM, &auth)?;
            if global.json {
                output::json(&json!({"version": version, "public_key": key.public_key_base64()}));
            } else {
                println!(
                    "created backup version {version} for the backup key {} (auth_data signed by the master key and device {})",
                    key.public_key_base64(),
                    ctx.session.device_id
                );
            }
        }
        BackupCommand::Status => {
            let (_, v) = current_version(&ctx.client)?;
            let master = Ed25519PublicKey(store.find_key(&user, KeyRole::Master)?.public_key);
            let auth = v.get("auth_data").cloned().unwrap_or(Value::Null);
            let signed = backup::verify_auth_data(&user, &auth, &master);
            let public = auth
                .get("public_key")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let token_key = match store.find_key(&user, KeyRole::Backup) {
                Ok(k) => Some(k.public_key_base64()),
                Err(TokenError::KeyNotFound { .. }) => None,
                Err(e) => return Err(e.into()),
            };
            let matches = token_key.as_deref() == Some(public.trim_end_matches('='));
            if global.json {
                output::json(&json!({
                    "version": v.get("version"), "algorithm": v.get("algorithm"), "count": v.get("count"),
                    "public_key": public, "master_signature_valid": signed.is_ok(),
                    "master_signature_error": signed.as_ref().err().map(|e| e.to_string()),
                    "token_backup_key": token_key, "public_key_is_token_key": matches,
                }));
            } else {
                println!(
                    "backup version {} ({}), {} keys",
                    v.get("version").and_then(Value::as_str).unwrap_or("?"),
                    v.get("algorithm").and_then(Value::as_str).unwrap_or("?"),
                    v.get("count").and_then(Value::as_u64).unwrap_or(0)
                );
                match &signed {
                    Ok(_) => println!("  auth_data: validly signed by your master key {master}"),
                    Err(e) => println!("  auth_data: NOT trusted: {e}"),
                }
                match (&token_key, matches) {
                    (Some(_), true) => println!("  public key {public}: the token's backup key"),
                    (Some(t), false) => {
                        println!("  public key {public}: NOT the token's backup key ({t})")
                    }
                    (None, _) => {
                        println!("  public key {public}: the token has no backup key for {user}")
                    }
                }
            }
        }
        BackupCommand::Restore {
            out,
            format,
            jobs,
            resume,
            passphrase_file,
            rounds,
        } => restore(
            global,
            &ctx,
            &out,
            format,
            jobs,
            resume,
            passphrase_file.as_deref(),
            rounds,
        )?,
        BackupCommand::Upload {
            file,
            format,
            passphrase_file,
        } => upload(global, &ctx, &file, format, passphrase_file.as_deref())?,
    }
    Ok(ExitCode::SUCCESS)
}

/// The state of an interrupted restore: the encrypted sessions already fetched (ciphertext
/// only: nothing secret is written before the final file).
fn partial_path(out: &Path) -> PathBuf {
    let mut name = out
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".mxhsm-partial");
    out.with_file_name(name)
}

/// Sessions restored per round of the pipeline: results are written out between rounds,
/// so memory holds the encrypted backup and one round of plaintext, never all of it.
const RESTORE_ROUND: usize = 4096;

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
) -> std::result::Result<Result<EncryptedSessionData, backup::BackupError>, D::Error> {
    let v: Value = serde::Deserialize::deserialize(d)?;
    Ok(EncryptedSessionData::from_json(&v))
}

/// Where restored sessions go: the plain JSON array or an export file, both written to a
/// temporary 0600 file that becomes the output only when complete.
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
            Sink::Json(f) => f.commit(),
            Sink::Export(w) => w.finish()?.commit(),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn restore(
    global: &GlobalArgs,
    ctx: &Ctx,
    out: &Path,
    format: Format,
    jobs: Option<usize>,
    resume: bool,
    passphrase_file: Option<&Path>,
    rounds: u32,
) -> Result<()> {
    let user = ctx.session.user_id.as_str();
    let store: &dyn KeyStore = &*ctx.store;
    if out.exists() {
        bail!("{} exists; mxhsm does not overwrite a file", out.display());
    }
    let partial = partial_path(out);
    if partial.exists() && !resume {
        bail!(
            "an interrupted restore into {} exists ({}): run again with --resume, or delete it",
            out.display(),
            partial.display()
        );
    }
    let key = store.find_key(user, KeyRole::Backup)?;
    // Ask for the passphrase before the long part, not after.
    let pass = match format {
        Format::Export => Some(passphrase(passphrase_file, true)?),
        Format::Json => None,
    };
    let (version, v) = current_version(&ctx.client)?;
    let public = v
        .pointer("/auth_data/public_key")
        .and_then(Value::as_str)
        .unwrap_or("")
        .trim_end_matches('=')
        .to_string();
    if public != key.public_key_base64() {
        bail!(
            "backup version {version} is encrypted to {public}, not to the token's backup key {}",
            key.public_key_base64()
        );
    }
    // Fetch every encrypted session into the partial file (version on its first line,
    // then the server's answer as it came), unless an interrupted run already did.
    let header = format!("{version}\n");
    let saved = resume
        && std::fs::File::open(&partial)
            .ok()
            .and_then(|f| {
                let mut line = String::new();
                std::io::BufReader::new(f).read_line(&mut line).ok()?;
                Some(line == header)
            })
            .unwrap_or(false);
    if saved {
        eprintln!("resuming: the sessions of backup version {version} were already fetched");
    } else {
        ctx.client
            .download_backup_keys(&version, &partial, header.as_bytes())
            .with_context(|| {
                format!(
                    "fetching the backup failed; nothing was written. Run `mxhsm backup restore --out {} --resume` when the server is back",
                    out.display()
                )
            })?;
    }
    let mut reader = std::io::BufReader::new(std::fs::File::open(&partial)?);
    reader.read_line(&mut String::new())?;
    let dump: Dump = serde_json::from_reader(reader)
        .context("the server's backup is not the JSON the spec describes")?;
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
    let agreement = TokenAgreement { store, key };
    let jobs = jobs.unwrap_or_else(|| pick_jobs(&agreement, &items));
    let bar = indicatif::ProgressBar::new(items.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} sessions  {per_sec}  ETA {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let file =
        PrivateFile::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut sink = match &pass {
        Some(p) => Sink::Export(Box::new(key_export::ExportWriter::new(
            file,
            p.expose_secret(),
            rounds,
        )?)),
        None => Sink::Json(file),
    };
    sink.write(b"[")?;
    let start = Instant::now();
    let mut restored = 0usize;
    let mut failed = Vec::new();
    for round in items.chunks(RESTORE_ROUND) {
        let results = backup::restore_all(&agreement, round, jobs, software_jobs(), &|| bar.inc(1));
        for (item, r) in round.iter().zip(results) {
            match r {
                Ok(k) => {
                    let entry = Zeroizing::new(serde_json::to_vec(&k.0)?);
                    if restored > 0 {
                        sink.write(b",")?;
                    }
                    sink.write(&entry)?;
                    restored += 1;
                }
                Err(e) => {
                    failed.push((item.room_id.clone(), item.session_id.clone(), e.to_string()))
                }
            }
        }
    }
    sink.write(b"]")?;
    bar.finish_and_clear();
    let elapsed = start.elapsed().as_secs_f64();
    sink.commit()
        .with_context(|| format!("cannot write {}", out.display()))?;
    let _ = std::fs::remove_file(&partial);
    let rate = items.len() as f64 / elapsed.max(1e-9);
    if global.json {
        output::json(&json!({
            "out": out.display().to_string(), "restored": restored, "failed": failed.len(),
            "failures": failed.iter().map(|(r, s, e)| json!({"room_id": r, "session_id": s, "error": e})).collect::<Vec<_>>(),
            "jobs": jobs, "seconds": elapsed, "sessions_per_second": rate,
        }));
    } else {
        println!(
            "restored {restored} sessions into {} ({:.0} sessions/s with {jobs} job(s))",
            out.display(),
            rate
        );
        if !failed.is_empty() {
            println!("{} sessions failed and were not written:", failed.len());
            for (r, s, e) in &failed {
                println!("  {r} {s}: {e}");
            }
        }
    }
    Ok(())
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
fn pick_jobs(agreement: &TokenAgreement<'_>, sessions: &[BackedUpSession]) -> usize {
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
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut best = (1, measure(1));
    for jobs in 2..=cores.min(4) {
        let r = measure(jobs);
        if r > best.1 * 1.1 {
            best = (jobs, r);
        }
    }
    best.0
}

fn upload(
    global: &GlobalArgs,
    ctx: &Ctx,
    file: &Path,
    format: Format,
    passphrase_file: Option<&Path>,
) -> Result<()> {
    let user = ctx.session.user_id.as_str();
    let store: &dyn KeyStore = &*ctx.store;
    let (version, v) = current_version(&ctx.client)?;
    let master = Ed25519PublicKey(store.find_key(user, KeyRole::Master)?.public_key);
    let auth = v.get("auth_data").cloned().unwrap_or(Value::Null);
    let public = backup::verify_auth_data(user, &auth, &master).map_err(|e| {
        anyhow::anyhow!(
            "refusing to upload: the auth_data of backup version {version} is not signed by your master key {master} ({e}); the server may have swapped in another backup key"
        )
    })?;
    if let Ok(k) = store.find_key(user, KeyRole::Backup)
        && k.public_key != public
    {
        bail!(
            "refusing to upload: backup version {version} is encrypted to {}, not to the token's backup key {}",
            encode_base64(&public),
            k.public_key_base64()
        );
    }
    let text = Zeroizing::new(
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?,
    );
    let json_text = match format {
        Format::Export => {
            key_export::decrypt(&text, passphrase(passphrase_file, false)?.expose_secret())?
        }
        Format::Json => text,
    };
    let sessions: Vec<Value> = serde_json::from_str(&json_text)
        .with_context(|| format!("{} is not a JSON array of sessions", file.display()))?;
    let mut rooms = serde_json::Map::new();
    let mut count = 0usize;
    let put = |rooms: &mut serde_json::Map<String, Value>| -> Result<()> {
        if !rooms.is_empty() {
            ctx.client
                .put_backup_keys(&version, &Value::Object(std::mem::take(rooms)))?;
        }
        Ok(())
    };
    for (i, s) in sessions.iter().enumerate() {
        let room_id = s
            .get("room_id")
            .and_then(Value::as_str)
            .with_context(|| format!("session {i} has no room_id"))?;
        let session_id = s
            .get("session_id")
            .and_then(Value::as_str)
            .with_context(|| format!("session {i} has no session_id"))?;
        let session_key = s
            .get("session_key")
            .and_then(Value::as_str)
            .with_context(|| format!("session {i} has no session_key"))?;
        let exported =
            vodozemac::megolm::ExportedSessionKey::from_base64(session_key.trim_end_matches('='))
                .map_err(|e| anyhow::anyhow!("session {session_id}: {e}"))?;
        let inbound = vodozemac::megolm::InboundGroupSession::import(
            &exported,
            vodozemac::megolm::SessionConfig::version_1(),
        );
        if inbound.session_id() != session_id.trim_end_matches('=') {
            bail!(
                "session {session_id} in {}: its session key belongs to {}",
                file.display(),
                inbound.session_id()
            );
        }
        let plaintext = Zeroizing::new(backup::backup_plaintext(s)?);
        let data = backup::encrypt(&public, &plaintext)?;
        let forwarded = s
            .get("forwarding_curve25519_key_chain")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        let entry = json!({
            "first_message_index": inbound.first_known_index(),
            "forwarded_count": forwarded,
            "is_verified": false,
            "session_data": data.to_json(),
        });
        rooms
            .entry(room_id.to_string())
            .or_insert_with(|| json!({"sessions": {}}))["sessions"][session_id] = entry;
        count += 1;
        if count.is_multiple_of(UPLOAD_BATCH) {
            put(&mut rooms)?;
        }
    }
    put(&mut rooms)?;
    if global.json {
        output::json(&json!({"uploaded": count, "version": version}));
    } else {
        println!("uploaded {count} sessions to backup version {version}");
    }
    Ok(())
}
