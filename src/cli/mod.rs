//! The command line: parse, ask, render. The flows are the library's (`mxhsm::account`);
//! this module reads secrets ([`secrets`]), renders results ([`output`]), and adds the
//! advice a user needs to an error ([`advice`]).

mod account;
mod accounts;
mod audit;
mod backup;
mod graph;
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
use mxhsm::account::accounts::Selector;
use mxhsm::account::{Account, AccountError};
use mxhsm::config::{AccountConfig, Config, ResolvedToken};
use mxhsm::homeserver::{ClientOptions, HomeserverError, Session, Sessions};
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
    /// The account: its name in the config file or its user ID. Commands that report or
    /// sign in bulk (identity status, sign devices, backup status, watch --once) also take
    /// `all` or a comma-separated list. Default: the config's [defaults] account, else the
    /// only account logged in.
    #[arg(
        long,
        global = true,
        env = "MXHSM_ACCOUNT",
        value_name = "NAME|@USER:SERVER|all",
        help_heading = "Account"
    )]
    pub account: Option<String>,
    /// The config file (default: $XDG_CONFIG_HOME/mxhsm/config.toml).
    #[arg(
        long,
        global = true,
        env = "MXHSM_CONFIG",
        value_name = "FILE",
        help_heading = "Account"
    )]
    pub config: Option<PathBuf>,
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
    /// Say more on standard error: -v each request to the homeserver and PKCS#11 login,
    /// -vv each token operation (sign, find, generate), -vvv every agreement. Never a
    /// secret.
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,
    /// Say less: no progress bars and no warnings such as retries; errors and the
    /// command's answer still show.
    #[arg(short, long, global = true)]
    pub quiet: bool,
}

/// Sends the library's events to standard error at the level `-v`/`-q` chose: warnings
/// (retries) by default, errors only with `-q`.
pub fn init_logging(global: &GlobalArgs) {
    use tracing::level_filters::LevelFilter;
    let level = match (global.quiet, global.verbose) {
        (true, _) => LevelFilter::ERROR,
        (false, 0) => LevelFilter::WARN,
        (false, 1) => LevelFilter::INFO,
        (false, 2) => LevelFilter::DEBUG,
        _ => LevelFilter::TRACE,
    };
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .try_init();
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
    /// The accounts of the config file and the saved sessions.
    #[command(subcommand)]
    Account(accounts::AccountCommand),
    /// The audit log of everything the token did for mxhsm: verify it, show it.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
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
    /// Draw the account's keys, devices, verified users, backup and secret storage as a
    /// diagram (SVG, PNG or Graphviz DOT), or the token's keys alone without a session.
    Graph(graph::GraphArgs),
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

/// The audit log of this command, which every store it opens records into.
static AUDIT: std::sync::OnceLock<std::sync::Arc<mxhsm::account::audit::AuditLog>> =
    std::sync::OnceLock::new();

/// Environment variable with a syslog socket (e.g. /dev/log) the audit log is mirrored to.
const AUDIT_SYSLOG_ENV: &str = "MXHSM_AUDIT_SYSLOG";

/// The command as a user would say it (`sign devices`), for the audit log.
fn command_name() -> String {
    use clap::CommandFactory;
    let mut words = Vec::new();
    if let Ok(m) = Cli::command().try_get_matches_from(std::env::args_os()) {
        let mut m = &m;
        while let Some((name, sub)) = m.subcommand() {
            words.push(name.to_string());
            m = sub;
        }
    }
    words.join(" ")
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    // Everything but the token's own checks and benchmarks is recorded.
    if !matches!(
        cli.command,
        Command::Token(_) | Command::Audit(_) | Command::Completions { .. } | Command::Man
    ) {
        let mirror = std::env::var_os(AUDIT_SYSLOG_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| {
                Config::load(cli.global.config.as_deref())
                    .ok()
                    .and_then(|c| c.defaults.audit_syslog)
            });
        let log = mxhsm::account::audit::AuditLog::new(
            audit::log_path(&cli.global),
            &command_name(),
            mirror,
        );
        let _ = AUDIT.set(std::sync::Arc::new(log));
    }
    let code = dispatch(cli)?;
    // Every store is closed by now, and has signed the log's head.
    if let Some(e) = AUDIT.get().and_then(|l| l.take_error()) {
        anyhow::bail!("the audit log was not closed with a head: {e}");
    }
    Ok(code)
}

fn dispatch(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Token(cmd) => token::run(&cli.global, cmd),
        Command::Keys(cmd) => keys::run(&cli.global, cmd),
        Command::Login(args) => account::login(&cli.global, args),
        Command::Logout => account::logout(&cli.global),
        Command::Account(cmd) => accounts::run(&cli.global, cmd),
        Command::Audit(cmd) => audit::run(&cli.global, cmd),
        Command::Identity(cmd) => identity::run_identity(&cli.global, cmd),
        Command::Sign(cmd) => identity::run_sign(&cli.global, cmd),
        Command::Backup(cmd) => backup::run(&cli.global, cmd),
        Command::SecretStorage(cmd) => secret_storage::run(&cli.global, cmd),
        Command::Verify(args) => verify::run(&cli.global, args),
        Command::Watch(args) => watch::run(&cli.global, args),
        Command::Doctor => account::doctor(&cli.global),
        Command::Graph(args) => graph::run(&cli.global, args),
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
    output::json_line(
        serde_json::json!({"error": {"kind": kind, "message": message, "hint": hint}}),
    );
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
                AccountError::KeysStoredBefore { .. } => "server",
                AccountError::Token(t) => token(t),
                AccountError::Homeserver(h) => homeserver(h),
                AccountError::Input(_) | AccountError::File { .. } => "input",
                AccountError::Config(_) => "config",
                AccountError::WhichAccount { .. } => "usage",
                _ => "error",
            };
        }
        if let Some(h) = cause.downcast_ref::<HomeserverError>() {
            return homeserver(h);
        }
        if let Some(t) = cause.downcast_ref::<TokenError>() {
            return token(t);
        }
        if cause.downcast_ref::<mxhsm::config::ConfigError>().is_some() {
            return "config";
        }
        if let Some(e) = cause.downcast_ref::<mxhsm::config::TokenOrConfigError>() {
            return match e {
                mxhsm::config::TokenOrConfigError::Token(t) => token(t),
                mxhsm::config::TokenOrConfigError::Config(_) => "config",
            };
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
                AccountError::KeysStoredBefore { .. } => Some(
                    "`mxhsm identity publish --replace --new-keys` makes new cross-signing keys on the token and publishes those (the old ones stay on the token until you delete them)".into(),
                ),
                AccountError::WhichAccount { .. } => Some(
                    "choose one with --account (or MXHSM_ACCOUNT), or set [defaults] account in the config file; `mxhsm account list` shows them".into(),
                ),
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
        if let Some(mxhsm::config::TokenOrConfigError::Token(t)) = cause.downcast_ref() {
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

/// The config file and the saved sessions.
pub struct Setup {
    pub config: Config,
    pub sessions: Sessions,
}

impl Setup {
    pub fn load(global: &GlobalArgs) -> Result<Setup> {
        Ok(Setup {
            config: Config::load(global.config.as_deref())?,
            sessions: Sessions::open()?,
        })
    }

    /// What --account says.
    pub fn selector(global: &GlobalArgs) -> Selector {
        Selector::parse(global.account.as_deref())
    }

    /// The token for `account` (flags, environment, config, the session's record), with its
    /// PIN source; `Ok(None)` when nothing names one.
    pub fn token(
        &self,
        global: &GlobalArgs,
        account: Option<&AccountConfig>,
        recorded: Option<&str>,
    ) -> Result<Option<ResolvedToken>> {
        Ok(self.config.resolve_token(
            global.token.as_deref(),
            global.yubikey.as_deref(),
            account,
            recorded,
        )?)
    }
}

/// Opens `token`. The PIN is asked for when a private key is first used.
fn open_resolved(global: &GlobalArgs, token: &ResolvedToken) -> Result<Store> {
    #[allow(unused_mut)]
    let mut options = StoreOptions::default();
    #[cfg(feature = "yubikey")]
    if let Some(f) = global
        .management_key_file
        .as_ref()
        .or(token.management_key_file.as_ref())
    {
        options.management_key =
            mxhsm::token::yubikey::ManagementKey::Given(secrets::management_key(f)?);
    }
    let pin_file = match (&global.pin_file, &token.pin) {
        (Some(f), _) => Some(f.clone()),
        (None, Some(source)) => Some(source.path()?),
        (None, None) => None,
    };
    let mut store = Store::open(&token.choice, options, secrets::pins(pin_file))?;
    if let Some(log) = AUDIT.get() {
        store.set_audit(log.clone());
    }
    #[cfg(feature = "yubikey")]
    if let Some(y) = store.as_yubikey_mut() {
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

/// The token for a command about the token itself: the flags or the environment, else
/// the chosen account's (when one can be chosen), else the config's default.
fn resolve_store_token(global: &GlobalArgs) -> Result<ResolvedToken> {
    let ctx = Setup::load(global)?;
    let selector = Setup::selector(global);
    let chosen = match &selector {
        // An account named on purpose must be usable; a default one only if it is.
        Selector::Default => {
            mxhsm::account::accounts::choose_one(&ctx.config, &ctx.sessions, &selector).ok()
        }
        _ => Some(mxhsm::account::accounts::choose_one(
            &ctx.config,
            &ctx.sessions,
            &selector,
        )?),
    };
    let recorded = chosen
        .as_ref()
        .and_then(|c| c.session.as_ref())
        .and_then(|s| s.token.clone());
    ctx.token(
        global,
        chosen.as_ref().map(|c| &c.config),
        recorded.as_deref(),
    )?
    .ok_or_else(|| TokenError::NoTokenChosen.into())
}

/// Opens the token of [`resolve_store_token`].
fn open_store(global: &GlobalArgs) -> Result<Store> {
    open_resolved(global, &resolve_store_token(global)?)
}

/// The chosen account (one), logged in, with its token.
fn open_account(global: &GlobalArgs) -> Result<Account> {
    let ctx = Setup::load(global)?;
    let mut chosen =
        mxhsm::account::accounts::choose_one(&ctx.config, &ctx.sessions, &Setup::selector(global))?;
    let session = chosen.take_session(&ctx.sessions)?;
    let token = ctx
        .token(global, Some(&chosen.config), session.token.as_deref())?
        .ok_or(TokenError::NoTokenChosen)?;
    let store = open_resolved(global, &token)?;
    account_with(global, session, store).map_err(|failed| failed.0)
}

fn account_with(
    global: &GlobalArgs,
    session: Session,
    store: Store,
) -> Result<Account, Box<(anyhow::Error, Store)>> {
    let options = match client_options(global) {
        Ok(o) => o,
        Err(e) => return Err(Box::new((e, store))),
    };
    if session.insecure_http {
        note!(
            "warning: this session talks to {} over plain http://",
            output::esc(&session.homeserver)
        );
    }
    Account::try_open(session, store, &options).map_err(|failed| {
        let (e, s) = *failed;
        Box::new((e.into(), s))
    })
}

/// What a bulk command did for one account.
pub struct PerAccount<T> {
    pub user_id: String,
    pub name: Option<String>,
    pub result: Result<T>,
}

/// Runs `f` for each chosen account. Accounts on the same token share one open store, so
/// its PIN is asked for once. An account that fails does not stop the others.
fn for_each_account<T>(
    global: &GlobalArgs,
    mut f: impl FnMut(&Account) -> Result<T>,
) -> Result<Vec<PerAccount<T>>> {
    let ctx = Setup::load(global)?;
    let chosen =
        mxhsm::account::accounts::choose(&ctx.config, &ctx.sessions, &Setup::selector(global))?;
    let mut stores: Vec<(TokenChoice, Store)> = Vec::new();
    let mut out = Vec::new();
    let many = chosen.len() > 1;
    for mut c in chosen {
        let user_id = c.user_id().to_string();
        let name = ctx.config.name_of(&user_id).map(str::to_string);
        let mut run = || -> Result<T> {
            let session = c.take_session(&ctx.sessions)?;
            let token = ctx
                .token(global, Some(&c.config), session.token.as_deref())?
                .ok_or(TokenError::NoTokenChosen)?;
            let store = match stores.iter().position(|(t, _)| *t == token.choice) {
                Some(i) => stores.swap_remove(i).1,
                None => {
                    let store = open_resolved(global, &token)?;
                    // Many accounts on one token: one listing of it, not a search each.
                    if let (true, Some(p)) = (many, store.as_pkcs11()) {
                        p.expect_many_users();
                    }
                    store
                }
            };
            let account = match account_with(global, session, store) {
                Ok(a) => a,
                Err(failed) => {
                    let (e, store) = *failed;
                    stores.push((token.choice, store));
                    return Err(e);
                }
            };
            let result = f(&account);
            stores.push((token.choice, account.into_store()));
            result
        };
        let result = run();
        out.push(PerAccount {
            user_id,
            name,
            result,
        });
    }
    Ok(out)
}

/// What a bulk command found for one account: whether it is a problem, its JSON document,
/// and its cells in the summary table.
pub struct Summary {
    pub problem: bool,
    pub doc: serde_json::Value,
    pub cells: Vec<String>,
}

/// Whether --account names several accounts (or `all`).
fn is_bulk(global: &GlobalArgs) -> bool {
    Setup::selector(global).is_many()
}

/// Prints a bulk command's results, one row per account (with --json, one document with
/// each account's), and returns the exit code: 1 when an account failed, 3 when one has a
/// problem, else 0.
fn print_bulk(global: &GlobalArgs, header: &[&str], results: Vec<PerAccount<Summary>>) -> ExitCode {
    let failed = results.iter().any(|r| r.result.is_err());
    let problem = results
        .iter()
        .any(|r| r.result.as_ref().is_ok_and(|s| s.problem));
    let docs: Vec<serde_json::Value> = results
        .iter()
        .map(|r| match &r.result {
            Ok(s) => serde_json::json!({
                "user_id": r.user_id, "name": r.name, "ok": !s.problem, "result": s.doc,
            }),
            Err(e) => serde_json::json!({
                "user_id": r.user_id, "name": r.name, "ok": false,
                "error": {"kind": kind(e), "message": format!("{e:#}"), "hint": advice(e)},
            }),
        })
        .collect();
    output::emit(
        global.json,
        serde_json::json!({"version": 1, "accounts": docs, "problems": problem || failed}),
        || {
            let mut head = vec!["ACCOUNT"];
            head.extend_from_slice(header);
            let rows: Vec<Vec<String>> = results
                .iter()
                .map(|r| {
                    let mut row = vec![r.name.clone().unwrap_or_else(|| r.user_id.clone())];
                    match &r.result {
                        Ok(s) => row.extend(s.cells.iter().cloned()),
                        Err(e) => {
                            row.extend(std::iter::repeat_n(String::new(), header.len() - 1));
                            row.push(format!("✘ ERROR: {e:#}"));
                        }
                    }
                    row
                })
                .collect();
            output::table(&head, &rows);
        },
    );
    if failed {
        ExitCode::FAILURE
    } else if problem {
        ExitCode::from(exit::PROBLEM)
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    /// clap's own checks of the whole command line: no two flags of one command share a
    /// name or a short form (a global `-v` or `-q` against a subcommand's, say).
    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
