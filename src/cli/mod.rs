//! The command line: parse, ask, render. The flows are the library's (`mxhsm::account`);
//! this module reads secrets ([`secrets`]), renders results ([`output`]), and adds the
//! advice a user needs to an error ([`advice`]).

mod account;
mod backup;
mod identity;
mod keys;
mod output;
mod secret_storage;
mod secrets;
mod token;
mod tree;
mod verify;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use mxhsm::account::{Account, AccountError};
use mxhsm::homeserver::{ClientOptions, HomeserverError, Session};
use mxhsm::token::{Store, StoreOptions, TokenChoice, TokenError};

use output::note;

/// Exit codes (also in the README).
pub mod exit {
    /// A status command found a problem and reported it.
    pub const PROBLEM: u8 = 3;
    /// Refused: doing it would replace something (a published identity, a backup, a
    /// session) and `--replace` was not given.
    pub const REFUSED: u8 = 4;
}

/// Keep a Matrix user's cross-signing and key-backup keys in hardware.
#[derive(Debug, Parser)]
#[command(name = "mxhsm", version, about)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// The token, as a PKCS#11 URI: 'pkcs11:token=NAME;serial=N?module-path=/path/module.so'.
    /// Default: $MXHSM_TOKEN.
    #[arg(long, global = true, value_name = "URI", help_heading = "Token")]
    pub token: Option<String>,
    /// Use the PIV application of the YubiKey with this serial number (firmware 5.7+), or
    /// `any` for the only one plugged in. Default: $MXHSM_YUBIKEY.
    #[arg(
        long,
        global = true,
        value_name = "SERIAL",
        conflicts_with = "token",
        help_heading = "Token"
    )]
    pub yubikey: Option<String>,
    /// YubiKey: the PIV management key (hex) is in this file. By default mxhsm uses the
    /// factory key while the card says it is set, else the PIN-protected key on the card.
    #[arg(long, global = true, value_name = "FILE", help_heading = "Token")]
    pub management_key_file: Option<PathBuf>,
    /// Read the token PIN from this file (its first line). Otherwise $MXHSM_PIN or a prompt;
    /// never from the command line.
    #[arg(long, global = true, value_name = "FILE", help_heading = "Token")]
    pub pin_file: Option<PathBuf>,
    /// Allow plain http:// to a homeserver that is not on this machine. The password and
    /// access token then cross the network unencrypted.
    #[arg(long, global = true)]
    pub insecure_http: bool,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Find tokens, check one, measure one.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Generate, import, list and delete keys on the token.
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Log in to a homeserver as a new mxhsm device.
    Login(account::LoginArgs),
    /// Log out and delete mxhsm's device.
    Logout,
    /// Your cross-signing identity: create it on the token, publish it, check it.
    #[command(subcommand)]
    Identity(identity::IdentityCommand),
    /// Sign your devices or other users with the keys on the token.
    #[command(subcommand)]
    Sign(identity::SignCommand),
    /// Server-side key backup with the backup key on the token.
    #[command(subcommand)]
    Backup(backup::BackupCommand),
    /// Move your existing keys from secret storage (your recovery key) onto the token.
    #[command(subcommand)]
    SecretStorage(secret_storage::SecretStorageCommand),
    /// Verify a new login of yours, or another user, by comparing emoji; on a match it is
    /// signed with the keys on the token.
    Verify(verify::VerifyArgs),
    /// Check the account against the token: the session, the published identity, this
    /// device, the backup and its flag for other clients, secret storage. Exits with 3 on
    /// a problem. (`mxhsm token doctor` checks the token itself.)
    Doctor,
    /// Print a shell completion script (bash, zsh, fish, elvish or powershell).
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), e.g. `mxhsm man > mxhsm.1`.
    Man,
    /// Watch the account for an identity reset, unsigned devices, a replaced backup, users
    /// whose verified key changed, and copies of token keys in secret storage.
    Watch(watch::WatchArgs),
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Token(cmd) => token::run(&cli.global, cmd),
        Command::Keys(cmd) => keys::run(&cli.global, cmd),
        Command::Login(args) => account::login(&cli.global, args),
        Command::Logout => account::logout(&cli.global),
        Command::Identity(cmd) => identity::run_identity(&cli.global, cmd),
        Command::Sign(cmd) => identity::run_sign(&cli.global, cmd),
        Command::Backup(cmd) => backup::run(&cli.global, cmd),
        Command::SecretStorage(cmd) => secret_storage::run(&cli.global, cmd),
        Command::Verify(args) => verify::run(&cli.global, args),
        Command::Watch(args) => watch::run(&cli.global, args),
        Command::Doctor => account::doctor(&cli.global),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "mxhsm", &mut script);
            print_all(&script)
        }
        Command::Man => {
            use clap::CommandFactory;
            let mut page = Vec::new();
            clap_mangen::Man::new(Cli::command()).render(&mut page)?;
            print_all(&page)
        }
    }
}

/// Writes generated text to standard output; a reader that stops early (`| head`) is not
/// an error.
fn print_all(bytes: &[u8]) -> Result<ExitCode> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(bytes) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(ExitCode::SUCCESS),
    }
}

/// A command-line mistake: clap's own message (exit 2), or with `--json` the error
/// document. Help and version go out as they are.
pub fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    let json = std::env::args().any(|a| a == "--json");
    if !json || matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        e.exit();
    }
    let message = e.render().to_string();
    error_json("usage", message.trim(), None);
    ExitCode::from(2)
}

fn error_json(kind: &str, message: &str, hint: Option<&str>) {
    let v = serde_json::json!({"error": {"kind": kind, "message": message, "hint": hint}});
    println!("{}", mxhsm::text::json_string(&v, false));
}

/// Prints an error with the advice that goes with it (with `json`, as the error document
/// on standard output), and returns the exit code.
pub fn report(e: &anyhow::Error, json: bool) -> ExitCode {
    let hint = advice(e);
    if json {
        error_json(kind(e), &format!("{e:#}"), hint.as_deref());
    } else {
        note!("error: {e:#}");
        if let Some(hint) = &hint {
            note!("{hint}");
        }
    }
    let refused = e.chain().any(|c| {
        matches!(
            c.downcast_ref::<AccountError>(),
            Some(
                AccountError::IdentityExists { .. }
                    | AccountError::BackupExists { .. }
                    | AccountError::SessionExists { .. }
            )
        )
    });
    ExitCode::from(if refused { exit::REFUSED } else { 1 })
}

/// The class of an error, stable for scripts (docs/json.md): `refused`, `cancelled`,
/// `not_logged_in`, `pin`, `token`, `network`, `server`, `input` or `error`.
fn kind(e: &anyhow::Error) -> &'static str {
    let token = |t: &TokenError| match t {
        TokenError::WrongPin { .. }
        | TokenError::PinLocked { .. }
        | TokenError::PivPinBlocked { .. }
        | TokenError::NoPin { .. }
        | TokenError::PinSource { .. } => "pin",
        _ => "token",
    };
    let homeserver = |h: &HomeserverError| match h {
        HomeserverError::NotLoggedIn { .. } => "not_logged_in",
        HomeserverError::Network { .. } | HomeserverError::Stalled { .. } => "network",
        HomeserverError::Http { .. }
        | HomeserverError::BadResponse { .. }
        | HomeserverError::TooLarge { .. } => "server",
        _ => "input",
    };
    for cause in e.chain() {
        if let Some(a) = cause.downcast_ref::<AccountError>() {
            return match a {
                AccountError::IdentityExists { .. }
                | AccountError::BackupExists { .. }
                | AccountError::SessionExists { .. }
                | AccountError::Refused(_) => "refused",
                AccountError::Cancelled => "cancelled",
                AccountError::Token(t) => token(t),
                AccountError::Homeserver(h) => homeserver(h),
                AccountError::Input(_) | AccountError::File { .. } => "input",
                _ => "error",
            };
        }
        if let Some(h) = cause.downcast_ref::<HomeserverError>() {
            return homeserver(h);
        }
        if let Some(t) = cause.downcast_ref::<TokenError>() {
            return token(t);
        }
    }
    "error"
}

/// What to do next, for the errors where the library cannot know the command to suggest.
fn advice(e: &anyhow::Error) -> Option<String> {
    for cause in e.chain() {
        if let Some(a) = cause.downcast_ref::<AccountError>() {
            return match a {
                AccountError::IdentityExists { .. } => Some(
                    "to move that identity onto the token, run `mxhsm secret-storage import` with your recovery key; to replace it with a new one (every verification of you, the cross-signing of your devices and the trust in your key backup are lost), run the command again with --replace".into(),
                ),
                AccountError::NoIdentityOnToken { published: Some(_), .. } => Some(
                    "`mxhsm secret-storage import` moves the published identity onto this token (you need your recovery key); `mxhsm identity create --replace` makes a new one instead".into(),
                ),
                AccountError::NoIdentityOnToken { published: None, .. } => {
                    Some("run `mxhsm identity create` to make one on the token".into())
                }
                AccountError::IdentityNotOurs { .. } => Some(
                    "run `mxhsm identity status` to see what the server publishes, and `mxhsm identity publish` to publish the token's keys".into(),
                ),
                AccountError::BackupExists { .. } => Some(
                    "`mxhsm backup create --replace` makes a new backup version anyway; the keys in the current one are not copied into it".into(),
                ),
                AccountError::NoBackup => {
                    Some("create one with `mxhsm backup create`".into())
                }
                AccountError::SessionExists { .. } => Some(
                    "`mxhsm login --replace` logs that session out first (its device is deleted), or run `mxhsm logout`".into(),
                ),
                AccountError::NoOlmDevice => Some("log in again with `mxhsm login --replace`".into()),
                AccountError::WeakExportRounds { .. } => {
                    Some("pass --weak-rounds only for tests".into())
                }
                AccountError::RestoreInterrupted { .. } => Some(
                    "run the same command again with --resume, or delete that directory to start over".into(),
                ),
                AccountError::BackupDownload(_) => Some(
                    "run the restore again with --resume when the server is back".into(),
                ),
                // Transparent wrappers: their own source is the inner error's source.
                AccountError::Token(t) => token_advice(t),
                AccountError::Homeserver(h) => homeserver_advice(h),
                _ => None,
            };
        }
        if let Some(h) = cause.downcast_ref::<HomeserverError>() {
            return homeserver_advice(h);
        }
        if let Some(t) = cause.downcast_ref::<TokenError>() {
            return token_advice(t);
        }
    }
    None
}

fn homeserver_advice(h: &HomeserverError) -> Option<String> {
    match h {
        HomeserverError::NotLoggedIn { .. } => Some("run `mxhsm login` first".into()),
        _ => None,
    }
}

fn token_advice(t: &TokenError) -> Option<String> {
    match t {
        TokenError::KeyNotFound { role, .. } => Some(match role {
            mxhsm::token::KeyRole::Backup => {
                "create a backup with its key on the token: `mxhsm backup create`".into()
            }
            _ => "see `mxhsm keys list`; `mxhsm identity create` makes the missing keys"
                .into(),
        }),
        TokenError::BadYubiKeyChoice(_) => Some(
            "--yubikey takes a serial number (see `mxhsm token list`) or `any`".into(),
        ),
        TokenError::TwoTokens { from_env: false } => {
            Some("pass --token or --yubikey, not both".into())
        }
        TokenError::TwoTokens { from_env: true } => {
            Some("unset one, or choose with --token or --yubikey".into())
        }
        TokenError::NoTokenChosen => Some(
            "pass --token 'pkcs11:token=…?module-path=…' or --yubikey SERIAL, or set MXHSM_TOKEN or MXHSM_YUBIKEY (see `mxhsm token list`)".into(),
        ),
        TokenError::NoPin { .. } => Some(
            "pass --pin-file, set MXHSM_PIN, or add pin-source= to the token URI".into(),
        ),
        TokenError::AmbiguousYubiKey { .. } => {
            Some("choose one with --yubikey SERIAL".into())
        }
        TokenError::SlotOccupied { .. } => Some(
            "pass --force to overwrite it (the key in the slot is destroyed), or choose another --slot".into(),
        ),
        TokenError::NoFreeSlot { .. } => {
            Some("delete a key first (`mxhsm keys delete`)".into())
        }
        TokenError::NoManagementKey { .. } | TokenError::ManagementKeyRefused { .. } => {
            Some("give the management key with --management-key-file".into())
        }
        _ => None,
    }
}

/// How to reach the homeserver: the user's flags and environment.
fn client_options(global: &GlobalArgs) -> Result<ClientOptions> {
    let mut o = ClientOptions::from_env()?;
    o.insecure_http = global.insecure_http;
    Ok(o)
}

/// The device named by --token / --yubikey or the environment.
fn token_choice(global: &GlobalArgs) -> Result<TokenChoice, TokenError> {
    mxhsm::config::token_choice(global.token.as_deref(), global.yubikey.as_deref())
}

/// Opens the token named by --token / --yubikey or the environment. The PIN is asked for
/// when a private key is first used.
fn open_store(global: &GlobalArgs) -> Result<Store> {
    let choice = token_choice(global)?;
    #[allow(unused_mut)]
    let mut options = StoreOptions::default();
    #[cfg(feature = "yubikey")]
    if let Some(f) = &global.management_key_file {
        options.management_key =
            mxhsm::token::yubikey::ManagementKey::Given(secrets::management_key(f)?);
    }
    #[allow(unused_mut)]
    let mut store = Store::open(&choice, options, secrets::pins(global.pin_file.clone()))?;
    #[cfg(feature = "yubikey")]
    if let Store::YubiKey(y) = &mut store {
        y.set_touch_notice(Box::new(|key| {
            note!(
                "touch your YubiKey to use the {} key of {} ({})",
                key.role,
                output::esc(&key.user_id),
                key.backend
            );
        }));
    }
    if let Some(w) = store.pin_warning() {
        note!("warning: {w}");
    }
    Ok(store)
}

/// The saved session, its homeserver client and the token.
fn open_account(global: &GlobalArgs) -> Result<Account> {
    let session = Session::load(&mxhsm::homeserver::session::session_path())?;
    let options = client_options(global)?;
    if session.insecure_http {
        note!(
            "warning: this session talks to {} over plain http://",
            output::esc(&session.homeserver)
        );
    }
    let store = open_store(global)?;
    Ok(Account::open(session, store, &options)?)
}
