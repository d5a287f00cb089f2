//! `mxhsm backup create | status | restore | upload`: server-side key backup with the
//! backup key on the token.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Subcommand, ValueEnum};
use mxhsm::account::AccountError;
use mxhsm::account::backup::{self, BackupReplacement, FileFormat};
use mxhsm::account::restore::{self, RestoreOptions, RestoreProgress};
use mxhsm::matrix::key_export;
use serde_json::json;

use super::output::{self, esc, note, say};
use super::{GlobalArgs, exit, open_account, secrets};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// The encrypted `MEGOLM SESSION DATA` file Element and other clients import.
    Export,
    /// The plain JSON array of sessions (unencrypted: handle with care).
    Json,
}

impl From<Format> for FileFormat {
    fn from(f: Format) -> Self {
        match f {
            Format::Export => FileFormat::Export,
            Format::Json => FileFormat::Json,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Create a backup version whose key is on the token and whose auth_data is signed by
    /// the master key on the token and by mxhsm's device. A current backup that already
    /// uses the token's key is kept; any other is replaced only with --replace.
    Create {
        /// Import this backup private key (base64 or 32 raw bytes) instead of generating
        /// one on the token.
        #[arg(long, value_name = "FILE")]
        import: Option<PathBuf>,
        /// Make a new version although the server has a current backup with another key
        /// (its keys are not copied into the new one; you are asked to type "replace").
        #[arg(long)]
        replace: bool,
        /// With --replace: do not ask.
        #[arg(long, requires = "replace")]
        yes: bool,
    },
    /// Version, key count, whether auth_data is signed by the master key, whether the
    /// backup's public key is the token's backup key. Exits with 3 when it is not ours.
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
        /// Continue an interrupted restore into the same --out file, where it stopped.
        #[arg(long)]
        resume: bool,
        /// Only sessions that are new, or whose backed-up data changed, since the last
        /// restore of this backup version on this machine (no agreement for the rest): the
        /// file holds just those.
        #[arg(long)]
        new_only: bool,
        /// Only this room's sessions, fetched through the per-room endpoint (repeatable).
        #[arg(long = "room", value_name = "ROOM_ID")]
        rooms: Vec<String>,
        /// Export passphrase file (else $MXHSM_EXPORT_PASSPHRASE or a prompt, asked twice).
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
        /// PBKDF2 rounds of the export file (at least 100,000 without --weak-rounds).
        #[arg(long, default_value_t = key_export::DEFAULT_ROUNDS)]
        rounds: u32,
        /// Allow fewer than 100,000 rounds (for tests: such a file's passphrase is cheap
        /// to guess).
        #[arg(long)]
        weak_rounds: bool,
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

fn bar(len: u64, template: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// `bar`, drawn nowhere with `-q` (otherwise on standard error when it is a terminal).
fn unless_quiet(quiet: bool, bar: indicatif::ProgressBar) -> indicatif::ProgressBar {
    if quiet {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar
}

/// A spinner while PBKDF2 derives a key from a passphrase (it reports no progress of its
/// own; at many rounds it takes seconds), from when the passphrase is given until the
/// first progress of the work that follows.
#[derive(Default)]
struct KdfSpinner(std::sync::Mutex<Option<indicatif::ProgressBar>>);

impl KdfSpinner {
    /// Shows the spinner on its own, not in a restore's `MultiProgress`: a bar cleared
    /// there before any other bar has drawn stays on the screen.
    fn start(&self, quiet: bool, what: String) {
        let s = unless_quiet(quiet, indicatif::ProgressBar::new_spinner());
        s.set_message(what);
        s.enable_steady_tick(std::time::Duration::from_millis(120));
        if let Ok(mut k) = self.0.lock() {
            *k = Some(s);
        }
    }

    fn end(&self) {
        if let Some(s) = self.0.lock().ok().and_then(|mut k| k.take()) {
            s.finish_and_clear();
        }
    }
}

/// The progress bars of a restore, on standard error: the download and the sessions
/// restored, at once (the restore starts while the backup downloads). The ETA is from the
/// rate the token has been restoring at.
struct Bars {
    download: indicatif::ProgressBar,
    sessions: indicatif::ProgressBar,
    /// The passphrase's PBKDF2, until the restore starts.
    kdf: KdfSpinner,
}

impl Bars {
    /// The bars, drawn on standard error when it is a terminal, never with `-q`.
    fn new(quiet: bool) -> Bars {
        let all = indicatif::MultiProgress::new();
        if quiet {
            all.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        let download = all.add(bar(
            0,
            "{spinner} downloading the backup: {bytes} ({bytes_per_sec})",
        ));
        let sessions = all.add(bar(
            0,
            "{bar:40} {pos}/{len} sessions  {per_sec}  ETA {eta}",
        ));
        Bars {
            download,
            sessions,
            kdf: KdfSpinner::default(),
        }
    }
}

impl RestoreProgress for Bars {
    fn downloaded(&self, bytes: u64) {
        self.download.set_position(bytes);
    }
    fn start(&self, already: u64) {
        self.kdf.end();
        if already > 0 {
            note!("resuming: {already} sessions were restored by the interrupted run");
        }
        self.sessions.set_position(already);
    }
    fn found(&self, total: u64, complete: bool) {
        self.sessions.set_length(total);
        if complete {
            self.download.finish_and_clear();
        }
    }
    fn session(&self) {
        self.sessions.inc(1);
    }
}

fn describe_replacement(r: &BackupReplacement) -> String {
    format!(
        "The server's current key backup is version {} with {} keys, encrypted to {} ({}). A new version does not hold those keys: devices that restore from the backup will not find them.",
        esc(&r.version),
        r.count,
        esc(&r.public_key),
        if r.trusted {
            "signed by your master key"
        } else {
            "NOT signed by your master key"
        }
    )
}

/// The JSON document of `backup status` (docs/json.md).
fn status_json(s: &backup::BackupStatus) -> serde_json::Value {
    json!({
        "backup_version": s.version, "algorithm": s.algorithm, "count": s.count,
        "public_key": s.public_key, "master_signature_valid": s.signed_by_master.is_ok(),
        "master_signature_error": s.signed_by_master.as_ref().err().map(|e| e.to_string()),
        "token_backup_key": s.token_key.map(|k| k.to_base64()),
        "public_key_is_token_key": s.is_token_key(),
        "problems": s.has_problems(),
    })
}

pub fn run(global: &GlobalArgs, cmd: BackupCommand) -> Result<ExitCode> {
    match cmd {
        BackupCommand::Create {
            import,
            replace,
            yes,
        } => {
            let import = import.as_deref().map(secrets::private_key).transpose()?;
            let account = open_account(global)?;
            let mut confirm = |r: &BackupReplacement| -> Result<(), AccountError> {
                let what = describe_replacement(r);
                if yes {
                    note!("{what}\n(--yes: replacing)");
                    return Ok(());
                }
                secrets::confirm_typed(&what, "replace", "pass --yes with --replace")
                    .map_err(|e| AccountError::Refused(format!("{e:#}")))
            };
            let c = backup::create(&account, import, replace, &mut confirm)?;
            let public = c.public_key.to_base64();
            output::emit(
                global.json,
                json!({
                    "backup_version": c.version, "public_key": public, "reused": c.reused,
                    "resigned": c.resigned,
                    "replaced_version": c.replaced.as_ref().map(|r| r.version.clone()),
                }),
                || {
                    if c.reused {
                        say!(
                            "backup version {} already uses the token's backup key {public}{}",
                            esc(&c.version),
                            if c.resigned {
                                "; its auth_data is now signed by your master key"
                            } else {
                                ": nothing to do"
                            }
                        );
                    } else {
                        say!(
                            "created backup version {} for the backup key {public} (auth_data signed by the master key and device {})",
                            esc(&c.version),
                            esc(account.device_id())
                        );
                    }
                },
            );
        }
        BackupCommand::Status if super::is_bulk(global) => {
            let results = super::for_each_account(global, |account| {
                let Some(s) = backup::status(account)? else {
                    return Ok(super::Summary {
                        problem: true,
                        doc: json!({"backup_version": null}),
                        cells: vec!["-".into(), "-".into(), "✘ no backup".into()],
                    });
                };
                let verdict = match (&s.signed_by_master, s.is_token_key()) {
                    (Ok(()), true) => "✔ ok: signed by the master key, the token's key".to_string(),
                    (Err(e), _) => format!("✘ auth_data NOT trusted: {e}"),
                    (Ok(()), false) => "✘ NOT the token's backup key".to_string(),
                };
                Ok(super::Summary {
                    problem: s.has_problems(),
                    doc: status_json(&s),
                    cells: vec![s.version.clone(), s.count.to_string(), verdict],
                })
            })?;
            return Ok(super::print_bulk(
                global,
                &["VERSION", "KEYS", "STATUS"],
                results,
            ));
        }
        BackupCommand::Status => {
            let account = open_account(global)?;
            let Some(s) = backup::status(&account)? else {
                return Err(AccountError::NoBackup.into());
            };
            let token_key = s.token_key.map(|k| k.to_base64());
            output::emit(global.json, status_json(&s), || {
                say!(
                    "backup version {} ({}), {} keys",
                    esc(&s.version),
                    esc(&s.algorithm),
                    s.count
                );
                match &s.signed_by_master {
                    Ok(()) => say!("  auth_data: validly signed by your master key"),
                    Err(e) => say!("  auth_data: NOT trusted: {}", esc(&e.to_string())),
                }
                let public = esc(&s.public_key);
                match (&token_key, s.is_token_key()) {
                    (Some(_), true) => say!("  public key {public}: the token's backup key"),
                    (Some(t), false) => {
                        say!("  public key {public}: NOT the token's backup key ({t})")
                    }
                    (None, _) => say!(
                        "  public key {public}: the token has no backup key for {}",
                        esc(account.user_id())
                    ),
                }
            });
            if s.has_problems() {
                return Ok(ExitCode::from(exit::PROBLEM));
            }
        }
        BackupCommand::Restore {
            out,
            format,
            jobs,
            resume,
            new_only,
            rooms,
            passphrase_file,
            rounds,
            weak_rounds,
        } => {
            let account = open_account(global)?;
            let options = RestoreOptions {
                out: &out,
                format: format.into(),
                rounds,
                weak_rounds,
                jobs,
                resume,
                new_only,
                rooms: &rooms,
            };
            let bars = Bars::new(global.quiet);
            let passphrase = || {
                let p = secrets::passphrase(passphrase_file.as_deref(), true)
                    .map_err(|e| AccountError::Refused(format!("{e:#}")))?;
                bars.kdf.start(
                    global.quiet,
                    format!("deriving the export key: {rounds} rounds of PBKDF2-SHA-512"),
                );
                Ok(p)
            };
            let r = restore::restore(&account, &options, &passphrase, &bars)?;
            bars.sessions.finish_and_clear();
            let rate = (r.restored + r.failed.len() - r.resumed) as f64 / r.seconds.max(1e-9);
            output::emit(
                global.json,
                json!({
                    "out": r.out.display().to_string(), "restored": r.restored, "failed": r.failed.len(),
                    "failures": r.failed.iter().map(|(room, s, e)| json!({"room_id": room, "session_id": s, "error": e})).collect::<Vec<_>>(),
                    "resumed": r.resumed, "downloaded": r.downloaded,
                    "unchanged": r.unchanged, "duplicates": r.duplicates,
                    "jobs": r.jobs, "seconds": r.seconds, "sessions_per_second": rate,
                }),
                || {
                    say!(
                        "restored {} sessions into {} ({rate:.0} sessions/s with {} job(s){})",
                        r.restored,
                        r.out.display(),
                        r.jobs,
                        if r.resumed > 0 {
                            format!("; {} from the interrupted run", r.resumed)
                        } else {
                            String::new()
                        }
                    );
                    if r.unchanged > 0 {
                        say!(
                            "{} sessions were restored before with the same data and skipped",
                            r.unchanged
                        );
                    }
                    if r.duplicates > 0 {
                        say!(
                            "the server sent {} sessions more than once; the first copy of each was restored",
                            r.duplicates
                        );
                    }
                    if !r.failed.is_empty() {
                        say!("{} sessions failed and were not written:", r.failed.len());
                        for (room, s, e) in &r.failed {
                            say!("  {} {}: {}", esc(room), esc(s), esc(e));
                        }
                    }
                },
            );
        }
        BackupCommand::Upload {
            file,
            format,
            passphrase_file,
        } => {
            let account = open_account(global)?;
            let kdf = KdfSpinner::default();
            let passphrase = || {
                let p = secrets::passphrase(passphrase_file.as_deref(), false)
                    .map_err(|e| AccountError::Refused(format!("{e:#}")))?;
                kdf.start(
                    global.quiet,
                    "opening the export: PBKDF2-SHA-512 of the passphrase".into(),
                );
                Ok(p)
            };
            let progress = unless_quiet(
                global.quiet,
                bar(0, "{bar:40} {pos}/{len} sessions uploaded  {per_sec}"),
            );
            let u = backup::upload(
                &account,
                &file,
                format.into(),
                &passphrase,
                &|done, total| {
                    kdf.end();
                    progress.set_length(total as u64);
                    progress.set_position(done as u64);
                },
            )?;
            kdf.end();
            progress.finish_and_clear();
            output::emit(
                global.json,
                json!({"uploaded": u.sessions, "backup_version": u.version}),
                || {
                    say!(
                        "uploaded {} sessions to backup version {}",
                        u.sessions,
                        esc(&u.version)
                    )
                },
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
