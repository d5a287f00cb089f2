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
    value.parse().map(Some).map_err(|_| {
        TokenError::TokenChoice(format!(
            "--yubikey takes a serial number (see `mxhsm token list`) or `any`, not {value:?}"
        ))
    })
}

/// The device to use: `--token` or `--yubikey` (not both), else `MXHSM_TOKEN` or
/// `MXHSM_YUBIKEY` (not both).
pub fn token_choice(token: Option<&str>, yubikey: Option<&str>) -> Result<TokenChoice, TokenError> {
    let env = |var: &str| std::env::var(var).ok().filter(|v| !v.is_empty());
    let (token, yubikey) = match (token, yubikey) {
        (Some(_), Some(_)) => {
            return Err(TokenError::TokenChoice(
                "pass --token or --yubikey, not both".into(),
            ));
        }
        (None, None) => (env(TOKEN_ENV), env(YUBIKEY_ENV)),
        (t, y) => (t.map(str::to_string), y.map(str::to_string)),
    };
    match (token, yubikey) {
        (Some(_), Some(_)) => Err(TokenError::TokenChoice(format!(
            "both {TOKEN_ENV} and {YUBIKEY_ENV} are set: unset one, or choose with --token or --yubikey"
        ))),
        (Some(uri), None) => Ok(TokenChoice::Pkcs11(Box::new(Pkcs11Uri::parse(&uri)?))),
        (None, Some(serial)) => Ok(TokenChoice::YubiKey(parse_yubikey(&serial)?)),
        (None, None) => Err(TokenError::TokenChoice(format!(
            "no token given: pass --token 'pkcs11:token=…?module-path=…' or --yubikey SERIAL, or set {TOKEN_ENV} or {YUBIKEY_ENV} (see `mxhsm token list`)"
        ))),
    }
}

/// Whether a token is configured at all (flags or environment).
pub fn token_configured(token: Option<&str>, yubikey: Option<&str>) -> bool {
    let set = |var: &str| std::env::var_os(var).is_some_and(|v| !v.is_empty());
    token.is_some() || yubikey.is_some() || set(TOKEN_ENV) || set(YUBIKEY_ENV)
}
