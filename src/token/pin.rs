//! Where PINs come from.
//!
//! A PIN never comes from the command line (argv is visible to every user of the machine).
//! Sources, in order: `pin-source=` in the PKCS#11 URI (read by the backend), a PIN file,
//! the `MXHSM_PIN` environment variable, an interactive prompt. A PIN is sent to a token
//! once per login; a wrong one is reported, never retried automatically.

use std::fmt;
use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};

use super::TokenError;

/// The environment variable holding a PIN for scripts and CI.
pub const PIN_ENV: &str = "MXHSM_PIN";

/// What the token says about its PIN retry counter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PinStatus {
    /// The token says an incorrect PIN has been entered at least once since the last
    /// successful login (`CKF_USER_PIN_COUNT_LOW`).
    pub count_low: bool,
    /// One more wrong PIN locks the PIN (`CKF_USER_PIN_FINAL_TRY`).
    pub final_try: bool,
    /// The PIN is locked (`CKF_USER_PIN_LOCKED`).
    pub locked: bool,
    /// Exact tries left, where the device tells (PIV).
    pub retries: Option<u32>,
}

impl PinStatus {
    /// A warning for the user, or `None` when there is nothing to say.
    pub fn describe(&self) -> Option<String> {
        if self.locked {
            Some("the PIN is now locked".to_string())
        } else if self.final_try {
            Some("one try left: the next wrong PIN locks it".to_string())
        } else if let Some(n) = self.retries {
            Some(format!("{n} tries left"))
        } else if self.count_low {
            Some("the token reports few tries left".to_string())
        } else {
            None
        }
    }
}

/// What a [`PinProvider`] is asked for.
#[derive(Debug, Clone)]
pub struct PinRequest {
    /// The token, as shown to the user.
    pub token: String,
    /// The retry counter before this attempt, so a prompt can warn.
    pub status: PinStatus,
}

/// Supplies a PIN when a token needs one.
pub trait PinProvider: Send + Sync {
    fn pin(&self, request: &PinRequest) -> Result<SecretString, TokenError>;
}

/// A prompt callback (the CLI's terminal prompt).
pub type PromptFn = dyn Fn(&PinRequest) -> Result<SecretString, TokenError> + Send + Sync;

/// The standard chain: a PIN file, then `MXHSM_PIN`, then a prompt.
#[derive(Default)]
pub struct PinSources {
    pub pin_file: Option<PathBuf>,
    pub use_env: bool,
    pub prompt: Option<Box<PromptFn>>,
}

impl fmt::Debug for PinSources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinSources")
            .field("pin_file", &self.pin_file)
            .field("use_env", &self.use_env)
            .field("prompt", &self.prompt.is_some())
            .finish()
    }
}

impl PinSources {
    /// No interaction: a PIN file or `MXHSM_PIN`.
    pub fn non_interactive(pin_file: Option<PathBuf>) -> Self {
        PinSources {
            pin_file,
            use_env: true,
            prompt: None,
        }
    }
}

impl PinProvider for PinSources {
    fn pin(&self, request: &PinRequest) -> Result<SecretString, TokenError> {
        if let Some(path) = &self.pin_file {
            return read_pin_file(path);
        }
        if let Some(pin) = self.use_env.then(|| std::env::var(PIN_ENV).ok()).flatten() {
            return non_empty(SecretString::from(pin), &request.token, PIN_ENV);
        }
        match &self.prompt {
            Some(prompt) => prompt(request),
            None => Err(TokenError::NoPin {
                token: request.token.clone(),
                reason: format!(
                    "{PIN_ENV} is not set, the token URI has no pin-source, and there is no terminal to ask on"
                ),
            }),
        }
    }
}

/// No PIN source: a store opened with this asks for nothing and fails when it needs a PIN.
pub struct NoPins;

impl PinProvider for NoPins {
    fn pin(&self, request: &PinRequest) -> Result<SecretString, TokenError> {
        Err(TokenError::NoPin {
            token: request.token.clone(),
            reason: "this store was opened without a PIN source".into(),
        })
    }
}

/// Reads a PIN from a file: its first line, without the line ending.
pub fn read_pin_file(path: &Path) -> Result<SecretString, TokenError> {
    read_secret_line(path, "PIN").map_err(|e| TokenError::PinSource {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// Why a file holding a secret cannot be used. It never holds any of the file's bytes.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error("{0}")]
    Read(std::io::Error),
    #[error("the {0} is not UTF-8")]
    NotUtf8(&'static str),
    #[error("the file is empty")]
    Empty,
}

/// The first line of a file holding a secret (`what`: "PIN", "password", …), without its
/// line ending; the error is the reason it cannot be used.
pub fn read_secret_line(path: &Path, what: &'static str) -> Result<SecretString, SecretFileError> {
    let bytes = zeroize::Zeroizing::new(std::fs::read(path).map_err(SecretFileError::Read)?);
    let text = std::str::from_utf8(&bytes).map_err(|_| SecretFileError::NotUtf8(what))?;
    let line = text.lines().next().unwrap_or("");
    if line.is_empty() {
        return Err(SecretFileError::Empty);
    }
    Ok(SecretString::from(line.to_string()))
}

fn non_empty(pin: SecretString, token: &str, source: &str) -> Result<SecretString, TokenError> {
    if pin.expose_secret().is_empty() {
        return Err(TokenError::NoPin {
            token: token.to_string(),
            reason: format!("{source} is set but empty"),
        });
    }
    Ok(pin)
}
