//! Where mxhsm finds its token and PIN, from flags and the environment.

pub use crate::token::TokenChoice;
use crate::token::TokenError;
use crate::token::pkcs11::Pkcs11Uri;

/// Environment variable with the default token URI.
pub const TOKEN_ENV: &str = "MXHSM_TOKEN";

/// Environment variable with the default YubiKey (a serial number, or `any`).
pub const YUBIKEY_ENV: &str = "MXHSM_YUBIKEY";

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

/// The device to use: `--token` or `--yubikey` (not both), else `MXHSM_TOKEN` or
/// `MXHSM_YUBIKEY` (not both).
pub fn token_choice(token: Option<&str>, yubikey: Option<&str>) -> Result<TokenChoice, TokenError> {
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
        (Some(uri), None) => Ok(TokenChoice::Pkcs11(Box::new(Pkcs11Uri::parse(&uri)?))),
        (None, Some(serial)) => Ok(TokenChoice::YubiKey(parse_yubikey(&serial)?)),
        (None, None) => Err(TokenError::NoTokenChosen),
    }
}

/// Whether a token is configured at all (flags or environment).
pub fn token_configured(token: Option<&str>, yubikey: Option<&str>) -> bool {
    let set = |var: &str| std::env::var_os(var).is_some_and(|v| !v.is_empty());
    token.is_some() || yubikey.is_some() || set(TOKEN_ENV) || set(YUBIKEY_ENV)
}
