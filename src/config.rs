//! Where mxhsm finds its accounts, tokens and PINs: the config file, the environment and
//! the flags.
//!
//! The config file is `$XDG_CONFIG_HOME/mxhsm/config.toml` (`~/.config/mxhsm/config.toml`),
//! or the file `MXHSM_CONFIG` names. It is optional; every setting in it can also be given
//! on the command line. Precedence, highest first: a flag, then the environment, then the
//! account's entry in the config file, then the token recorded in the account's session
//! at login, then `[defaults]`.
//!
//! ```toml
//! [defaults]
//! account = "alice"              # used when neither --account nor MXHSM_ACCOUNT is given
//! token = "team"                 # a name from [tokens], a pkcs11: URI, or yubikey:SERIAL
//!
//! [tokens.team]
//! uri = "pkcs11:token=team?module-path=/usr/lib/softhsm/libsofthsm2.so"
//! pin-credential = "mxhsm-pin"   # $CREDENTIALS_DIRECTORY/mxhsm-pin (systemd)
//!
//! [accounts.alice]
//! user = "@alice:example.org"
//! homeserver = "https://matrix.example.org"   # default: .well-known of example.org
//! token = "team"
//! device-name = "mxhsm (staff HSM)"
//! ```
//!
//! Unknown keys and bad values are errors that name the file and the line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

pub use crate::token::TokenChoice;
use crate::token::TokenError;
use crate::token::pkcs11::Pkcs11Uri;

/// Environment variable with the default token URI.
pub const TOKEN_ENV: &str = "MXHSM_TOKEN";

/// Environment variable with the default YubiKey (a serial number, or `any`).
pub const YUBIKEY_ENV: &str = "MXHSM_YUBIKEY";

/// Environment variable naming the config file.
pub const CONFIG_ENV: &str = "MXHSM_CONFIG";

/// Environment variable choosing the account (a name from the config file, or a user ID).
pub const ACCOUNT_ENV: &str = "MXHSM_ACCOUNT";

/// Parses a `--yubikey` value: a serial number, or `any` for the only YubiKey present.
pub fn parse_yubikey(value: &str) -> Result<Option<u32>, TokenError> {
    if value == "any" {
        return Ok(None);
    }
    value
        .parse()
        .map(Some)
        .map_err(|_| TokenError::BadYubiKeyChoice(value.to_string()))
}

/// A token written as one string: a `pkcs11:` URI, or `yubikey:SERIAL` / `yubikey:any`.
/// This is how the config file names a token inline and how a session records the token
/// it was logged in with.
pub fn parse_token_spec(spec: &str) -> Result<TokenChoice, TokenError> {
    match spec.strip_prefix("yubikey:") {
        Some(serial) => Ok(TokenChoice::YubiKey(parse_yubikey(serial)?)),
        None => Ok(TokenChoice::Pkcs11(Box::new(Pkcs11Uri::parse(spec)?))),
    }
}

/// The string [`parse_token_spec`] reads back as `choice`.
pub fn token_spec(choice: &TokenChoice) -> String {
    match choice {
        TokenChoice::Pkcs11(uri) => uri.original.clone(),
        TokenChoice::YubiKey(Some(serial)) => format!("yubikey:{serial}"),
        TokenChoice::YubiKey(None) => "yubikey:any".into(),
    }
}

/// The device to use: `--token` or `--yubikey` (not both), else `MXHSM_TOKEN` or
/// `MXHSM_YUBIKEY` (not both).
pub fn token_choice(token: Option<&str>, yubikey: Option<&str>) -> Result<TokenChoice, TokenError> {
    flag_or_env_token(token, yubikey)?.ok_or(TokenError::NoTokenChosen)
}

/// [`token_choice`], with `Ok(None)` when neither the flags nor the environment name one.
pub fn flag_or_env_token(
    token: Option<&str>,
    yubikey: Option<&str>,
) -> Result<Option<TokenChoice>, TokenError> {
    let env = |var: &str| std::env::var(var).ok().filter(|v| !v.is_empty());
    let (token, yubikey) = match (token, yubikey) {
        (Some(_), Some(_)) => {
            return Err(TokenError::TwoTokens { from_env: false });
        }
        (None, None) => (env(TOKEN_ENV), env(YUBIKEY_ENV)),
        (t, y) => (t.map(str::to_string), y.map(str::to_string)),
    };
    match (token, yubikey) {
        (Some(_), Some(_)) => Err(TokenError::TwoTokens { from_env: true }),
        (Some(uri), None) => Ok(Some(TokenChoice::Pkcs11(Box::new(Pkcs11Uri::parse(&uri)?)))),
        (None, Some(serial)) => Ok(Some(TokenChoice::YubiKey(parse_yubikey(&serial)?))),
        (None, None) => Ok(None),
    }
}

/// Where a token's PIN comes from, when the config file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinSource {
    /// The first line of this file.
    File(PathBuf),
    /// A systemd credential: the file of this name in `$CREDENTIALS_DIRECTORY`.
    Credential(String),
}

impl PinSource {
    /// The file to read the PIN from.
    pub fn path(&self) -> Result<PathBuf, ConfigError> {
        match self {
            PinSource::File(p) => Ok(p.clone()),
            PinSource::Credential(name) => std::env::var_os("CREDENTIALS_DIRECTORY")
                .map(|d| PathBuf::from(d).join(name))
                .ok_or_else(|| ConfigError::NoCredentials { name: name.clone() }),
        }
    }
}

/// A named token of the config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenConfig {
    pub name: String,
    pub choice: TokenChoice,
    pub pin: Option<PinSource>,
    /// YubiKey: the file with the PIV management key.
    pub management_key_file: Option<PathBuf>,
}

/// An account of the config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountConfig {
    pub name: String,
    pub user_id: String,
    /// The homeserver's client API URL or server name (default: the user ID's server).
    pub homeserver: Option<String>,
    /// The token, as a name from `[tokens]` or inline; `None`: the defaults'.
    pub token: Option<TokenRef>,
    pub device_name: Option<String>,
    pub pin: Option<PinSource>,
}

/// A token as an account or the defaults name it: one of `[tokens]`, or inline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenRef {
    Named(String),
    Inline(TokenChoice),
}

/// The `[defaults]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Defaults {
    /// The account used when none is chosen (a name from `[accounts]` or a user ID).
    pub account: Option<String>,
    pub token: Option<TokenRef>,
    pub device_name: Option<String>,
    pub pin: Option<PinSource>,
    /// Where the audit log is (default: `$XDG_DATA_HOME/mxhsm/audit.jsonl`).
    pub audit_log: Option<PathBuf>,
    /// A syslog socket (`/dev/log`) every audit entry is also sent to.
    pub audit_syslog: Option<PathBuf>,
}

/// The config file, checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    /// The file it was read from (`None`: no file; everything is default).
    pub path: Option<PathBuf>,
    pub defaults: Defaults,
    pub tokens: BTreeMap<String, TokenConfig>,
    pub accounts: BTreeMap<String, AccountConfig>,
}

/// A token with the settings that go with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedToken {
    pub choice: TokenChoice,
    /// Where the choice came from, for messages: `--token`, `MXHSM_TOKEN`, `account
    /// "alice" in /path/config.toml`, `the session`, …
    pub source: String,
    pub pin: Option<PinSource>,
    pub management_key_file: Option<PathBuf>,
}

/// What is wrong with the config file, or with a choice of account.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the config file {} is not valid: {message}", .path.display())]
    Parse { path: PathBuf, message: String },
    #[error("{}, line {line}: {what}", .path.display())]
    Invalid {
        path: PathBuf,
        line: usize,
        what: String,
    },
    #[error(
        "no account {} in {} (it has {})",
        crate::text::escape(.name),
        .path.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "the config file (there is none)".into()),
        if .known.is_empty() { "none".to_string() } else { crate::text::escape_joined(.known, ", ") }
    )]
    UnknownAccount {
        name: String,
        path: Option<PathBuf>,
        known: Vec<String>,
    },
    #[error(
        "the PIN is the systemd credential {}, but $CREDENTIALS_DIRECTORY is not set (mxhsm is not running under a unit with LoadCredential=)",
        crate::text::escape(.name)
    )]
    NoCredentials { name: String },
    #[error("account {} already exists in {}", crate::text::escape(.name), .path.display())]
    AccountExists { name: String, path: PathBuf },
    #[error("cannot write the config file {}: {reason}", .path.display())]
    Write { path: PathBuf, reason: String },
}

/// The config file's default place.
pub fn default_path() -> PathBuf {
    crate::paths::dir(crate::paths::Base::Config).join("config.toml")
}

/// The file to read: `explicit`, else `$MXHSM_CONFIG`, else the default place. The flag says
/// whether the file must exist (it must when named).
pub fn config_path(explicit: Option<&Path>) -> (PathBuf, bool) {
    if let Some(p) = explicit {
        return (p.to_path_buf(), true);
    }
    match std::env::var_os(CONFIG_ENV).filter(|v| !v.is_empty()) {
        Some(p) => (PathBuf::from(p), true),
        None => (default_path(), false),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawConfig {
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(default)]
    tokens: BTreeMap<String, Spanned<RawToken>>,
    #[serde(default)]
    accounts: BTreeMap<String, Spanned<RawAccount>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawDefaults {
    account: Option<Spanned<String>>,
    token: Option<Spanned<String>>,
    device_name: Option<String>,
    pin_file: Option<PathBuf>,
    pin_credential: Option<Spanned<String>>,
    audit_log: Option<PathBuf>,
    audit_syslog: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Serial {
    Number(u64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawToken {
    uri: Option<Spanned<String>>,
    yubikey: Option<Spanned<Serial>>,
    pin_file: Option<PathBuf>,
    pin_credential: Option<Spanned<String>>,
    management_key_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawAccount {
    user: Spanned<String>,
    homeserver: Option<Spanned<String>>,
    token: Option<Spanned<String>>,
    device_name: Option<String>,
    pin_file: Option<PathBuf>,
    pin_credential: Option<Spanned<String>>,
}

/// A config name: what `--account NAME` and `token = "NAME"` can refer to.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('@')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

impl Config {
    /// Reads the config file ([`config_path`]); no file at the default place is an empty
    /// config.
    pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        let (path, required) = config_path(explicit);
        match std::fs::read_to_string(&path) {
            Ok(text) => Config::parse(&text, &path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                Ok(Config::default())
            }
            Err(source) => Err(ConfigError::Read { path, source }),
        }
    }

    /// Parses and checks the text of a config file read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let line = |span: std::ops::Range<usize>| {
            text.get(..span.start)
                .map_or(1, |before| before.matches('\n').count() + 1)
        };
        let invalid = |span: std::ops::Range<usize>, what: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            line: line(span),
            what,
        };
        let pin = |file: Option<PathBuf>,
                   credential: Option<Spanned<String>>,
                   span: std::ops::Range<usize>|
         -> Result<Option<PinSource>, ConfigError> {
            match (file, credential) {
                (Some(_), Some(_)) => Err(invalid(
                    span,
                    "pin-file and pin-credential are both set; give one".into(),
                )),
                (Some(f), None) => Ok(Some(PinSource::File(f))),
                (None, Some(c)) => {
                    let span = c.span();
                    let name = c.into_inner();
                    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                        return Err(invalid(
                            span,
                            format!(
                                "pin-credential {:?} is not a credential name (a file name, no '/')",
                                crate::text::escape(&name)
                            ),
                        ));
                    }
                    Ok(Some(PinSource::Credential(name)))
                }
                (None, None) => Ok(None),
            }
        };
        let token_ref = |s: Spanned<String>, tokens: &BTreeMap<String, Spanned<RawToken>>| {
            let span = s.span();
            let value = s.into_inner();
            if value.starts_with("pkcs11:") || value.starts_with("yubikey:") {
                return parse_token_spec(&value)
                    .map(TokenRef::Inline)
                    .map_err(|e| invalid(span, format!("token: {e}")));
            }
            if tokens.contains_key(&value) {
                Ok(TokenRef::Named(value))
            } else {
                Err(invalid(
                    span,
                    format!(
                        "token {:?} is neither a name from [tokens] ({}) nor a pkcs11: URI or yubikey:SERIAL",
                        crate::text::escape(&value),
                        if tokens.is_empty() {
                            "there are none".to_string()
                        } else {
                            tokens.keys().cloned().collect::<Vec<_>>().join(", ")
                        }
                    ),
                ))
            }
        };

        let mut tokens = BTreeMap::new();
        for (name, spanned) in raw.tokens.iter() {
            let span = spanned.span();
            if !valid_name(name) {
                return Err(invalid(
                    span,
                    format!(
                        "token name {:?}: use letters, digits, '.', '_' and '-'",
                        crate::text::escape(name)
                    ),
                ));
            }
            let t = spanned.get_ref();
            let choice = match (&t.uri, &t.yubikey) {
                (Some(_), Some(_)) | (None, None) => {
                    return Err(invalid(
                        span,
                        format!(
                            "token {name}: give exactly one of uri = \"pkcs11:…\" and yubikey = SERIAL"
                        ),
                    ));
                }
                (Some(uri), None) => Pkcs11Uri::parse(uri.get_ref())
                    .map(|u| TokenChoice::Pkcs11(Box::new(u)))
                    .map_err(|e| invalid(uri.span(), format!("token {name}: {e}")))?,
                (None, Some(serial)) => {
                    let text = match serial.get_ref() {
                        Serial::Number(n) => n.to_string(),
                        Serial::Text(s) => s.clone(),
                    };
                    TokenChoice::YubiKey(
                        parse_yubikey(&text)
                            .map_err(|e| invalid(serial.span(), format!("token {name}: {e}")))?,
                    )
                }
            };
            tokens.insert(
                name.clone(),
                TokenConfig {
                    name: name.clone(),
                    choice,
                    pin: pin(t.pin_file.clone(), t.pin_credential.clone(), span)?,
                    management_key_file: t.management_key_file.clone(),
                },
            );
        }

        let mut accounts = BTreeMap::new();
        let mut users: BTreeMap<String, String> = BTreeMap::new();
        for (name, spanned) in raw.accounts {
            let span = spanned.span();
            if !valid_name(&name) {
                return Err(invalid(
                    span,
                    format!(
                        "account name {:?}: use letters, digits, '.', '_' and '-' (not '@': a user ID is the user = key)",
                        crate::text::escape(&name)
                    ),
                ));
            }
            let a = spanned.into_inner();
            let user_span = a.user.span();
            let user_id = a.user.into_inner();
            crate::token::check_user_id(&user_id)
                .map_err(|e| invalid(user_span.clone(), format!("account {name}: {e}")))?;
            if let Some(other) = users.insert(user_id.clone(), name.clone()) {
                return Err(invalid(
                    user_span,
                    format!(
                        "accounts {other} and {name} are both {}",
                        crate::text::escape(&user_id)
                    ),
                ));
            }
            let homeserver = match a.homeserver {
                Some(h) if h.get_ref().is_empty() => {
                    return Err(invalid(
                        h.span(),
                        format!("account {name}: empty homeserver"),
                    ));
                }
                h => h.map(Spanned::into_inner),
            };
            let token = a.token.map(|t| token_ref(t, &raw.tokens)).transpose()?;
            accounts.insert(
                name.clone(),
                AccountConfig {
                    name,
                    user_id,
                    homeserver,
                    token,
                    device_name: a.device_name,
                    pin: pin(a.pin_file, a.pin_credential, span)?,
                },
            );
        }

        let d = raw.defaults;
        let defaults = Defaults {
            account: match d.account {
                Some(a) => {
                    let span = a.span();
                    let a = a.into_inner();
                    if !a.starts_with('@') && !accounts.contains_key(&a) {
                        return Err(invalid(
                            span,
                            format!(
                                "defaults: account {:?} is not in [accounts]",
                                crate::text::escape(&a)
                            ),
                        ));
                    }
                    Some(a)
                }
                None => None,
            },
            token: d.token.map(|t| token_ref(t, &raw.tokens)).transpose()?,
            device_name: d.device_name,
            pin: pin(d.pin_file, d.pin_credential, 0..0)?,
            audit_log: d.audit_log,
            audit_syslog: d.audit_syslog,
        };
        Ok(Config {
            path: Some(path.to_path_buf()),
            defaults,
            tokens,
            accounts,
        })
    }

    /// The account `selector` names: a name from `[accounts]`, or a user ID (the config's
    /// entry for it if there is one, else a bare account).
    pub fn account(&self, selector: &str) -> Result<AccountConfig, ConfigError> {
        if selector.starts_with('@') {
            if let Some(a) = self.accounts.values().find(|a| a.user_id == selector) {
                return Ok(a.clone());
            }
            crate::token::check_user_id(selector).map_err(|e| ConfigError::UnknownAccount {
                name: format!("{selector} ({e})"),
                path: self.path.clone(),
                known: self.accounts.keys().cloned().collect(),
            })?;
            return Ok(AccountConfig {
                name: selector.to_string(),
                user_id: selector.to_string(),
                homeserver: None,
                token: None,
                device_name: None,
                pin: None,
            });
        }
        self.accounts
            .get(selector)
            .cloned()
            .ok_or_else(|| ConfigError::UnknownAccount {
                name: selector.to_string(),
                path: self.path.clone(),
                known: self.accounts.keys().cloned().collect(),
            })
    }

    /// The config's name for `user_id`, if it has one.
    pub fn name_of(&self, user_id: &str) -> Option<&str> {
        self.accounts
            .values()
            .find(|a| a.user_id == user_id)
            .map(|a| a.name.as_str())
    }

    /// The device a [`TokenRef`] names.
    fn ref_choice(&self, r: &TokenRef) -> TokenChoice {
        match r {
            TokenRef::Named(n) => self.tokens[n].choice.clone(),
            TokenRef::Inline(c) => c.clone(),
        }
    }

    /// `choice` with the settings the config has for it. The PIN source is the account's
    /// (when the account's token is this one, or it names none), else the token's own, else
    /// the defaults' (when the default token is this one, or there is none): a PIN meant for
    /// one token is never sent to another.
    fn resolved(
        &self,
        choice: TokenChoice,
        source: String,
        account: Option<&AccountConfig>,
    ) -> ResolvedToken {
        let named = self.tokens.values().find(|t| t.choice == choice);
        let account_pin = account
            .filter(|a| {
                a.token
                    .as_ref()
                    .is_none_or(|r| self.ref_choice(r) == choice)
            })
            .and_then(|a| a.pin.clone());
        let default_pin = self
            .defaults
            .token
            .as_ref()
            .is_none_or(|r| self.ref_choice(r) == choice)
            .then(|| self.defaults.pin.clone())
            .flatten();
        ResolvedToken {
            pin: account_pin
                .or_else(|| named.and_then(|t| t.pin.clone()))
                .or(default_pin),
            management_key_file: named.and_then(|t| t.management_key_file.clone()),
            source: match named {
                Some(t) if !source.contains(&t.name) => format!("{source} (token {})", t.name),
                _ => source,
            },
            choice,
        }
    }

    /// The token for `account`, from the config alone: its own, else `recorded` (what its
    /// session was logged in with), else the defaults'. Flags and the environment come
    /// before this; see [`Config::resolve_token`].
    fn config_token(
        &self,
        account: Option<&AccountConfig>,
        recorded: Option<&str>,
    ) -> Result<Option<ResolvedToken>, ConfigError> {
        let file = self
            .path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        if let Some(a) = account
            && let Some(r) = &a.token
        {
            let source = format!("account {} in {file}", a.name);
            return Ok(Some(self.resolved(self.ref_choice(r), source, account)));
        }
        if let Some(spec) = recorded {
            let choice = parse_token_spec(spec).map_err(|e| ConfigError::Parse {
                path: PathBuf::from("the session file"),
                message: format!("its token: {e}"),
            })?;
            let source = "the session (the token it was logged in with)".to_string();
            return Ok(Some(self.resolved(choice, source, account)));
        }
        Ok(self
            .defaults
            .token
            .as_ref()
            .map(|r| self.resolved(self.ref_choice(r), format!("[defaults] in {file}"), account)))
    }

    /// The token to use: the flags, else the environment, else [`Config::config_token`].
    /// `Ok(None)`: nothing names one.
    pub fn resolve_token(
        &self,
        flag_token: Option<&str>,
        flag_yubikey: Option<&str>,
        account: Option<&AccountConfig>,
        recorded: Option<&str>,
    ) -> Result<Option<ResolvedToken>, TokenOrConfigError> {
        let flagged = flag_token.is_some() || flag_yubikey.is_some();
        // `--token NAME` names a token of the config file.
        if let Some(named) = flag_token.and_then(|t| self.tokens.get(t)) {
            let source = format!("--token {}", named.name);
            return Ok(Some(self.resolved(named.choice.clone(), source, account)));
        }
        if let Some(choice) = flag_or_env_token(flag_token, flag_yubikey)? {
            let source = match (flagged, &choice) {
                (true, TokenChoice::Pkcs11(_)) => "--token",
                (true, TokenChoice::YubiKey(_)) => "--yubikey",
                (false, TokenChoice::Pkcs11(_)) => TOKEN_ENV,
                (false, TokenChoice::YubiKey(_)) => YUBIKEY_ENV,
            };
            return Ok(Some(self.resolved(choice, source.into(), account)));
        }
        Ok(self.config_token(account, recorded)?)
    }

    /// Adds `account` to the config file at `path` (created if missing), keeping the rest of
    /// the file as it is, comments included. An account of that name is replaced only with
    /// `replace`. The result is parsed again before it is written, and written to a
    /// temporary file (0600) that is renamed into place.
    pub fn add_account(
        path: &Path,
        entry: &NewAccount,
        replace: bool,
    ) -> Result<Config, ConfigError> {
        let write_error = |reason: String| ConfigError::Write {
            path: path.to_path_buf(),
            reason,
        };
        if !valid_name(&entry.name) {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                line: 0,
                what: format!(
                    "account name {:?}: use letters, digits, '.', '_' and '-'",
                    crate::text::escape(&entry.name)
                ),
            });
        }
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        // The file as it is must be valid: mxhsm does not build on a broken file.
        let before = if text.is_empty() {
            Config::default()
        } else {
            Config::parse(&text, path)?
        };
        let exists = before.accounts.contains_key(&entry.name);
        if exists && !replace {
            return Err(ConfigError::AccountExists {
                name: entry.name.clone(),
                path: path.to_path_buf(),
            });
        }
        // A new account is appended as its own table, so everything before it stays
        // byte for byte; a replaced one is edited in place.
        let mut doc: toml_edit::DocumentMut = if exists {
            text.parse()
                .map_err(|e: toml_edit::TomlError| write_error(e.to_string()))?
        } else {
            toml_edit::DocumentMut::new()
        };
        let accounts = doc
            .entry("accounts")
            .or_insert_with(|| {
                let mut t = toml_edit::Table::new();
                t.set_implicit(true);
                toml_edit::Item::Table(t)
            })
            .as_table_mut()
            .ok_or_else(|| write_error("[accounts] is not a table".into()))?;
        let mut table = toml_edit::Table::new();
        table.insert("user", toml_edit::value(&entry.user_id));
        let optional = [
            ("homeserver", &entry.homeserver),
            ("token", &entry.token),
            ("device-name", &entry.device_name),
        ];
        for (key, value) in optional {
            if let Some(v) = value {
                table.insert(key, toml_edit::value(v.as_str()));
            }
        }
        if let Some(p) = &entry.pin_file {
            table.insert("pin-file", toml_edit::value(p.display().to_string()));
        }
        accounts.insert(&entry.name, toml_edit::Item::Table(table));
        let new_text = if exists {
            doc.to_string()
        } else {
            let mut t = text.clone();
            if !t.is_empty() && !t.ends_with('\n') {
                t.push('\n');
            }
            if !t.is_empty() {
                t.push('\n');
            }
            t + &doc.to_string()
        };
        let after = Config::parse(&new_text, path)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| write_error(e.to_string()))?;
        }
        crate::files::write_private(path, new_text.as_bytes())
            .map_err(|e| write_error(e.to_string()))?;
        Ok(after)
    }
}

/// An account for [`Config::add_account`], as the user wrote it.
#[derive(Debug, Clone, Default)]
pub struct NewAccount {
    pub name: String,
    pub user_id: String,
    pub homeserver: Option<String>,
    /// A name from `[tokens]`, a `pkcs11:` URI or `yubikey:SERIAL`.
    pub token: Option<String>,
    pub device_name: Option<String>,
    pub pin_file: Option<PathBuf>,
}

/// The token could not be chosen: the flags or environment are wrong, or the config is.
#[derive(Debug, thiserror::Error)]
pub enum TokenOrConfigError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Config(#[from] ConfigError),
}

#[cfg(test)]
mod tests {
    use super::*;

    const URI: &str = "pkcs11:token=team?module-path=/usr/lib/softhsm/libsofthsm2.so";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/mxhsm.toml"))
    }

    fn error(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn a_full_config() {
        let c = parse(&format!(
            r#"
# the staff token
[defaults]
account = "alice"
token = "team"
audit-log = "/var/log/mxhsm.jsonl"

[tokens.team]
uri = "{URI}"
pin-credential = "mxhsm-pin"

[tokens.yk]
yubikey = 12345678
management-key-file = "/etc/mgm"

[accounts.alice]
user = "@alice:example.org"
homeserver = "https://matrix.example.org"
device-name = "staff HSM"

[accounts.bot]
user = "@bot:example.org"
token = "yk"
pin-file = "/etc/bot.pin"

[accounts.bridge]
user = "@bridge:example.org"
token = "yubikey:any"
"#
        ))
        .unwrap();
        assert_eq!(c.defaults.account.as_deref(), Some("alice"));
        assert_eq!(c.defaults.token, Some(TokenRef::Named("team".into())));
        assert_eq!(
            c.tokens["team"].pin,
            Some(PinSource::Credential("mxhsm-pin".into()))
        );
        assert_eq!(c.tokens["yk"].choice, TokenChoice::YubiKey(Some(12345678)));
        assert_eq!(
            c.accounts["bot"].pin,
            Some(PinSource::File("/etc/bot.pin".into()))
        );
        assert_eq!(
            c.accounts["bridge"].token,
            Some(TokenRef::Inline(TokenChoice::YubiKey(None)))
        );
        assert_eq!(c.account("@bot:example.org").unwrap().name, "bot");
        assert_eq!(c.account("@carol:example.org").unwrap().token, None);
        assert_eq!(c.name_of("@alice:example.org"), Some("alice"));

        // alice has no token of her own: the defaults' (and its PIN source).
        let alice = c.account("alice").unwrap();
        let t = c.config_token(Some(&alice), None).unwrap().unwrap();
        assert!(t.source.contains("[defaults]"), "{}", t.source);
        assert_eq!(t.pin, Some(PinSource::Credential("mxhsm-pin".into())));
        // The recorded token comes before the defaults, the account's own before both.
        let r = c
            .config_token(Some(&alice), Some("yubikey:7"))
            .unwrap()
            .unwrap();
        assert_eq!(r.choice, TokenChoice::YubiKey(Some(7)));
        let bot = c.account("bot").unwrap();
        let b = c
            .config_token(Some(&bot), Some("yubikey:7"))
            .unwrap()
            .unwrap();
        assert_eq!(b.choice, TokenChoice::YubiKey(Some(12345678)));
        assert_eq!(b.pin, Some(PinSource::File("/etc/bot.pin".into())));
        assert_eq!(b.management_key_file, Some(PathBuf::from("/etc/mgm")));
        // A PIN meant for one token is never sent to another: bob's pin file is for "yk",
        // not for a token given on the command line; the defaults' PIN source (for
        // "team") does not go to the recorded YubiKey 7.
        let other = c
            .resolve_token(
                Some("pkcs11:token=other?module-path=/x.so"),
                None,
                Some(&bot),
                None,
            )
            .unwrap()
            .unwrap();
        assert_eq!(other.pin, None);
        assert_eq!(r.pin, None);
        let named = c
            .resolve_token(Some("team"), None, Some(&bot), None)
            .unwrap()
            .unwrap();
        assert_eq!(named.pin, Some(PinSource::Credential("mxhsm-pin".into())));
    }

    #[test]
    fn every_error_names_its_line() {
        let cases: &[(&str, &str)] = &[
            (
                "[accounts.a]\nuser = \"@a:x\"\ncolour = 1\n",
                "unknown field `colour`",
            ),
            ("[acounts.a]\n", "unknown field `acounts`"),
            ("[accounts.a]\nhomeserver = \"x\"\n", "missing field `user`"),
            ("[accounts.a]\nuser = 7\n", "invalid type"),
            ("[accounts.a]\nuser = \"@a:x\"\n[accounts.a]\n", "duplicate"),
            ("[accounts]\na = \n", "line 2"),
        ];
        for (text, expected) in cases {
            let e = error(text);
            assert!(e.contains(expected), "{text:?}: {e}");
            assert!(e.contains("line "), "{text:?}: {e}");
            assert!(e.contains("/etc/mxhsm.toml"), "{e}");
        }
        let checked: &[(&str, &str, usize)] = &[
            ("[accounts.a]\nuser = \"alice\"\n", "user ID", 2),
            (
                "[accounts.a]\nuser = \"@a:x\"\n\n[accounts.b]\nuser = \"@a:x\"\n",
                "accounts a and b are both @a:x",
                5,
            ),
            (
                "[accounts.a]\nuser = \"@a:x\"\ntoken = \"nope\"\n",
                "token \"nope\" is neither",
                3,
            ),
            (
                "[accounts.a]\nuser = \"@a:x\"\ntoken = \"pkcs11:token=a?pin-value=1234\"\n",
                "token:",
                3,
            ),
            (
                "[tokens.t]\nuri = \"pkcs11:token=a\"\nyubikey = 5\n",
                "exactly one of uri",
                1,
            ),
            ("[tokens.t]\nyubikey = \"twelve\"\n", "token t:", 2),
            (
                "[tokens.t]\nyubikey = 5\npin-file = \"/a\"\npin-credential = \"b\"\n",
                "both set",
                1,
            ),
            (
                "[tokens.t]\nyubikey = 5\npin-credential = \"../pin\"\n",
                "not a credential name",
                3,
            ),
            ("[defaults]\naccount = \"nobody\"\n", "not in [accounts]", 2),
            ("[accounts.\"@a:x\"]\nuser = \"@a:x\"\n", "account name", 1),
            (
                "[accounts.a]\nuser = \"@a:x\"\nhomeserver = \"\"\n",
                "empty homeserver",
                3,
            ),
        ];
        for (text, expected, line) in checked {
            match parse(text) {
                Err(ConfigError::Invalid { line: l, what, .. }) => {
                    assert!(what.contains(expected), "{text:?}: {what}");
                    assert_eq!(l, *line, "{text:?}: {what}");
                }
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn unknown_accounts_and_credentials() {
        let c = parse("[accounts.a]\nuser = \"@a:x\"\n").unwrap();
        let e = c.account("b").unwrap_err().to_string();
        assert!(e.contains("no account b") && e.contains("it has a"), "{e}");
        assert!(c.account("@not a user").is_err());
        // SAFETY of the test: no other test reads CREDENTIALS_DIRECTORY.
        let e = PinSource::Credential("pin".into()).path().unwrap_err();
        if std::env::var_os("CREDENTIALS_DIRECTORY").is_none() {
            assert!(e.to_string().contains("CREDENTIALS_DIRECTORY"));
        }
    }

    #[test]
    fn token_specs_round_trip() {
        for spec in [URI, "yubikey:12345678", "yubikey:any"] {
            assert_eq!(token_spec(&parse_token_spec(spec).unwrap()), spec);
        }
        assert!(parse_token_spec("yubikey:twelve").is_err());
        assert!(parse_token_spec("team").is_err());
    }

    #[test]
    fn add_account_keeps_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        let original = format!("# our tokens\n[tokens.team]\nuri = \"{URI}\" # the staff HSM\n");
        std::fs::write(&path, &original).unwrap();
        let entry = NewAccount {
            name: "alice".into(),
            user_id: "@alice:example.org".into(),
            token: Some("team".into()),
            ..Default::default()
        };
        let c = Config::add_account(&path, &entry, false).unwrap();
        assert_eq!(
            c.accounts["alice"].token,
            Some(TokenRef::Named("team".into()))
        );
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(&original), "{text}");
        assert!(text.contains("[accounts.alice]"), "{text}");
        // Not twice without replace; a bad entry leaves the file as it was.
        assert!(matches!(
            Config::add_account(&path, &entry, false),
            Err(ConfigError::AccountExists { .. })
        ));
        let bad = NewAccount {
            token: Some("nope".into()),
            ..entry.clone()
        };
        assert!(Config::add_account(&path, &bad, true).is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    }
}
