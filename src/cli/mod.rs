//! The command line: one file per command group; output (a table, or `--json`), prompts.

mod account;
mod backup;
mod identity;
mod keys;
mod output;
mod secret_storage;
mod token;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use mxhsm::config;
use mxhsm::config::TokenChoice;
use mxhsm::token::pin::PinSources;
use mxhsm::token::pkcs11::Pkcs11Store;
use mxhsm::token::yubikey::{ManagementKey, YubiKeyOptions, YubiKeyStore};
use mxhsm::token::{KeyStore, PinRequest, TokenError};
use secrecy::SecretString;

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
    #[arg(long, global = true, value_name = "URI")]
    pub token: Option<String>,
    /// Use the PIV application of the YubiKey with this serial number (firmware 5.7+), or
    /// `any` for the only one plugged in. Default: $MXHSM_YUBIKEY.
    #[arg(long, global = true, value_name = "SERIAL", conflicts_with = "token")]
    pub yubikey: Option<String>,
    /// YubiKey: the PIV management key (hex) is in this file. By default mxhsm uses the
    /// factory key while the card says it is set, else the PIN-protected key on the card.
    #[arg(long, global = true, value_name = "FILE")]
    pub management_key_file: Option<PathBuf>,
    /// Read the token PIN from this file (its first line). Otherwise $MXHSM_PIN or a prompt;
    /// never from the command line.
    #[arg(long, global = true, value_name = "FILE")]
    pub pin_file: Option<PathBuf>,
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
    }
}

/// The PIN chain of the CLI: --pin-file, $MXHSM_PIN, then a prompt when a terminal is
/// attached.
fn pin_sources(global: &GlobalArgs) -> PinSources {
    let mut pins = PinSources::non_interactive(global.pin_file.clone());
    if std::io::stdin().is_terminal() {
        pins.prompt = Some(Box::new(|req: &PinRequest| {
            let warning = req
                .status
                .describe()
                .map(|s| format!(" [{s}]"))
                .unwrap_or_default();
            rpassword::prompt_password(format!("PIN for {}{warning}: ", req.token))
                .map(SecretString::from)
                .map_err(|e| TokenError::NoPin {
                    token: req.token.clone(),
                    reason: format!("cannot read from the terminal: {e}"),
                })
        }));
    }
    pins
}

/// Environment variable with the account password, for scripts.
pub const PASSWORD_ENV: &str = "MXHSM_PASSWORD";

/// An account password: from `file`, else $MXHSM_PASSWORD, else a prompt on the terminal.
fn password(file: Option<&std::path::Path>, prompt: &str) -> Result<SecretString> {
    if let Some(f) = file {
        return secret_file(f, "password");
    }
    if let Ok(p) = std::env::var(PASSWORD_ENV) {
        return Ok(SecretString::from(p));
    }
    if std::io::stdin().is_terminal() {
        return Ok(SecretString::from(rpassword::prompt_password(format!(
            "{prompt}: "
        ))?));
    }
    anyhow::bail!(
        "a password is needed: pass --password-file, set {PASSWORD_ENV}, or run in a terminal"
    )
}

/// A password or passphrase from a file (its first line).
fn secret_file(path: &std::path::Path, what: &str) -> Result<SecretString> {
    mxhsm::token::pin::read_secret_line(path, what).map_err(|reason| {
        anyhow::anyhow!("cannot read the {what} from {}: {reason}", path.display())
    })
}

/// An open token of either kind; dereferences to its [`KeyStore`].
pub enum Store {
    Pkcs11(Pkcs11Store),
    YubiKey(YubiKeyStore),
}

impl std::ops::Deref for Store {
    type Target = dyn KeyStore;
    fn deref(&self) -> &Self::Target {
        match self {
            Store::Pkcs11(s) => s,
            Store::YubiKey(s) => s,
        }
    }
}

/// What the Matrix commands work with: the saved session, a client for it, the token.
struct Ctx {
    session: mxhsm::homeserver::Session,
    client: mxhsm::homeserver::Client,
    store: Store,
}

impl Ctx {
    fn open(global: &GlobalArgs) -> Result<Ctx> {
        let session =
            mxhsm::homeserver::Session::load(&mxhsm::homeserver::session::session_path())?;
        let client = mxhsm::homeserver::Client::for_session(&session)?;
        let store = open_store(global)?;
        Ok(Ctx {
            session,
            client,
            store,
        })
    }
}

/// The device named by --token / --yubikey or the environment.
fn token_choice(global: &GlobalArgs) -> Result<TokenChoice, TokenError> {
    config::token_choice(global.token.as_deref(), global.yubikey.as_deref())
}

/// Opens and logs in to the token named by --token / --yubikey or the environment.
fn open_store(global: &GlobalArgs) -> Result<Store> {
    let store = match token_choice(global)? {
        TokenChoice::Pkcs11(uri) => {
            let store = Pkcs11Store::open(&uri, &pin_sources(global))?;
            if let Some(warning) = store.pin_status_before_login().describe() {
                eprintln!(
                    "warning: before this login the token reported: {warning} (someone entered a wrong PIN)"
                );
            }
            Store::Pkcs11(store)
        }
        TokenChoice::YubiKey(serial) => {
            let management_key = match &global.management_key_file {
                None => ManagementKey::Auto,
                Some(f) => ManagementKey::Given(read_management_key(f)?),
            };
            let options = YubiKeyOptions {
                serial,
                management_key,
                slot_map: None,
            };
            let mut store = YubiKeyStore::open(options, &pin_sources(global))?;
            store.set_touch_notice(Box::new(|key| {
                eprintln!(
                    "touch your YubiKey to use the {} key of {} ({})",
                    key.role, key.user_id, key.locator
                );
            }));
            let before = store.pin_status_before_login().retries;
            if let (Some(left), Some(total)) = (before, store.pin_tries_total())
                && left < u32::from(total)
            {
                eprintln!(
                    "warning: before this PIN the YubiKey had {left} of {total} tries left (someone entered a wrong PIN)"
                );
            }
            Store::YubiKey(store)
        }
    };
    Ok(store)
}

/// A PIV management key from a file: hex (48 or 64 digits, 32 for AES-128), whitespace
/// ignored.
fn read_management_key(path: &std::path::Path) -> Result<zeroize::Zeroizing<Vec<u8>>> {
    use secrecy::ExposeSecret;
    let text = secret_file(path, "management key")?;
    let hex: String = text
        .expose_secret()
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let hex = zeroize::Zeroizing::new(hex);
    if !hex.len().is_multiple_of(2) || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        anyhow::bail!("the management key in {} is not hex digits", path.display());
    }
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("checked hex"))
        .collect();
    if ![16, 24, 32].contains(&bytes.len()) {
        anyhow::bail!(
            "the management key in {} has {} bytes; PIV management keys have 16, 24 or 32",
            path.display(),
            bytes.len()
        );
    }
    Ok(zeroize::Zeroizing::new(bytes))
}
