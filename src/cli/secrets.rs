//! Every secret the CLI reads, in one place: PINs, account passwords, export passphrases,
//! recovery keys, private-key files, the PIV management key. None comes from argv; each
//! comes from a file, an environment variable (for scripts), or a prompt on the terminal.
//! Also the yes/no and typed confirmations.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use mxhsm::token::pin::PinSources;
use mxhsm::token::{PinProvider, PinRequest, SecretKeyBytes, TokenError};
use secrecy::SecretString;
use zeroize::Zeroizing;

use super::output::note;

/// Environment variable with the account password, for scripts.
pub const PASSWORD_ENV: &str = "MXHSM_PASSWORD";
/// Environment variable with the export-file passphrase, for scripts.
pub const PASSPHRASE_ENV: &str = "MXHSM_EXPORT_PASSPHRASE";

fn terminal() -> bool {
    std::io::stdin().is_terminal()
}

/// The PIN chain: --pin-file, $MXHSM_PIN, then a prompt when a terminal is attached.
pub fn pins(pin_file: Option<PathBuf>) -> Arc<dyn PinProvider> {
    let mut pins = PinSources::non_interactive(pin_file);
    if terminal() {
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
    Arc::new(pins)
}

/// A secret from a file (its first line).
pub fn from_file(path: &Path, what: &'static str) -> Result<SecretString> {
    mxhsm::token::pin::read_secret_line(path, what).map_err(|reason| {
        anyhow::anyhow!("cannot read the {what} from {}: {reason}", path.display())
    })
}

/// An account password: from `file`, else $MXHSM_PASSWORD, else a prompt on the terminal.
pub fn password(file: Option<&Path>, prompt: &str) -> Result<SecretString> {
    if let Some(f) = file {
        return from_file(f, "password");
    }
    if let Ok(p) = std::env::var(PASSWORD_ENV) {
        return Ok(SecretString::from(p));
    }
    if terminal() {
        return Ok(SecretString::from(rpassword::prompt_password(format!(
            "{prompt}: "
        ))?));
    }
    bail!("a password is needed: pass --password-file, set {PASSWORD_ENV}, or run in a terminal")
}

/// An export passphrase: from `file`, else $MXHSM_EXPORT_PASSPHRASE, else asked (twice for
/// a new file).
pub fn passphrase(file: Option<&Path>, twice: bool) -> Result<SecretString> {
    if let Some(f) = file {
        return from_file(f, "passphrase");
    }
    if let Ok(p) = std::env::var(PASSPHRASE_ENV) {
        return Ok(SecretString::from(p));
    }
    if !terminal() {
        bail!("an export passphrase is needed: pass --passphrase-file or set {PASSPHRASE_ENV}");
    }
    let first = Zeroizing::new(rpassword::prompt_password(
        "Passphrase for the key export file: ",
    )?);
    if twice {
        let second = Zeroizing::new(rpassword::prompt_password("The same passphrase again: ")?);
        if first != second {
            bail!("the two passphrases differ; nothing written");
        }
    }
    if first.is_empty() {
        bail!("an empty passphrase protects nothing; nothing written");
    }
    Ok(SecretString::from(first.to_string()))
}

/// A recovery key or passphrase: from `file` ('-' for standard input) or a prompt.
pub fn recovery_key(file: Option<&PathBuf>) -> Result<SecretString> {
    let mut text = Zeroizing::new(String::new());
    match file {
        Some(p) if p.as_os_str() == "-" => {
            std::io::stdin()
                .read_to_string(&mut text)
                .context("cannot read standard input")?;
        }
        Some(p) => {
            *text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))?;
        }
        None if terminal() => {
            *text = rpassword::prompt_password("Recovery key or passphrase: ")?;
        }
        None => bail!(
            "the recovery key or passphrase is needed: pass --key-file FILE (or '-' for standard input), or run in a terminal"
        ),
    }
    let trimmed = text.trim_end_matches(['\n', '\r']).to_string();
    if trimmed.is_empty() {
        bail!("the recovery key or passphrase is empty");
    }
    Ok(SecretString::from(trimmed))
}

/// A private key from a file or stdin: base64 (padded or not) or 32 raw bytes.
pub fn private_key(path: &Path) -> Result<SecretKeyBytes> {
    let mut raw = Zeroizing::new(Vec::new());
    if path.as_os_str() == "-" {
        std::io::stdin()
            .read_to_end(&mut raw)
            .context("cannot read the private key from standard input")?;
    } else {
        *raw = std::fs::read(path)
            .with_context(|| format!("cannot read the private key from {}", path.display()))?;
    }
    SecretKeyBytes::parse(&raw).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

#[cfg(feature = "yubikey")]
/// A PIV management key from a file: hex (48 or 64 digits, 32 for AES-128), whitespace
/// ignored.
pub fn management_key(path: &Path) -> Result<Zeroizing<Vec<u8>>> {
    use secrecy::ExposeSecret;
    let text = from_file(path, "management key")?;
    let hex: Zeroizing<String> = Zeroizing::new(
        text.expose_secret()
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect(),
    );
    if !hex.len().is_multiple_of(2) || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!("the management key in {} is not hex digits", path.display());
    }
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .filter_map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
        .collect();
    if ![16, 24, 32].contains(&bytes.len()) {
        bail!(
            "the management key in {} has {} bytes; PIV management keys have 16, 24 or 32",
            path.display(),
            bytes.len()
        );
    }
    Ok(Zeroizing::new(bytes))
}

/// Asks a yes/no question on the terminal; refuses when there is none, saying which flag
/// (`hint`) answers it for scripts.
pub fn confirm(question: &str, hint: &str) -> Result<()> {
    if !terminal() {
        bail!("{question}\nrefusing without a terminal to confirm; {hint}");
    }
    eprint!("{} [y/N] ", mxhsm::text::terminal_safe(question));
    std::io::stderr().flush().ok();
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    if matches!(answer.trim(), "y" | "Y" | "yes") {
        Ok(())
    } else {
        bail!("cancelled; nothing changed")
    }
}

/// Asks the user to type `word` to go on with something that cannot be undone.
pub fn confirm_typed(what: &str, word: &str, hint: &str) -> Result<()> {
    if !terminal() {
        bail!("{what}\nrefusing without a terminal to confirm; {hint}");
    }
    note!("{what}");
    eprint!("Type {word:?} to go on: ");
    std::io::stderr().flush().ok();
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    if answer.trim() == word {
        Ok(())
    } else {
        bail!("cancelled; nothing changed")
    }
}
