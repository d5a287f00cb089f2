//! Where mxhsm finds its token and PIN, from flags and the environment.

use crate::token::TokenError;
use crate::token::pkcs11::Pkcs11Uri;

/// Environment variable with the default token URI.
pub const TOKEN_ENV: &str = "MXHSM_TOKEN";

/// The token URI to use: the `--token` flag, else `MXHSM_TOKEN`.
pub fn token_uri(flag: Option<&str>) -> Result<Pkcs11Uri, TokenError> {
    let uri = match flag {
        Some(u) => u.to_string(),
        None => std::env::var(TOKEN_ENV).map_err(|_| {
            TokenError::InvalidInput(format!(
                "no token given: pass --token 'pkcs11:token=…?module-path=…' or set {TOKEN_ENV} (see `mxhsm token list`)"
            ))
        })?,
    };
    Pkcs11Uri::parse(&uri)
}
