//! The hook through which every private-key operation of a [`super::Store`] is recorded.
//!
//! A [`Store`](super::Store) with an [`AuditSink`] calls it before each signature,
//! agreement and deletion, and after each key generation and import (when the new public
//! key is known). An error from the sink stops the operation: what cannot be recorded is
//! not done. When the store is dropped, it asks the sink whether the record needs a signed
//! head and, if the token holds a key of role [`KeyRole::Audit`], signs it with that key
//! (that signature is the one operation not recorded as an entry: it is the head itself).
//!
//! The token layer knows nothing of what the bytes mean; the sink (the account layer's
//! audit log) does.

use super::{Curve25519PublicKey, KeyInfo, KeyRole, KeyStore, TokenError, TokenSummary};

/// One operation on a private key (or the creation or removal of one).
#[derive(Debug, Clone, Copy)]
pub enum TokenOp<'a> {
    Sign {
        key: &'a KeyInfo,
        message: &'a [u8],
    },
    Agree {
        key: &'a KeyInfo,
        peer: &'a Curve25519PublicKey,
    },
    Generated {
        key: &'a KeyInfo,
    },
    Imported {
        key: &'a KeyInfo,
    },
    /// A key already on the device was taken into use (a PIV slot mapped to a role).
    Adopted {
        key: &'a KeyInfo,
    },
    Delete {
        key: &'a KeyInfo,
    },
}

/// Signs the head of a record with the token's audit key.
pub type HeadSigner<'a> = dyn Fn(&[u8]) -> Result<[u8; 64], TokenError> + 'a;

/// Where a store's operations are recorded.
pub trait AuditSink: Send + Sync {
    /// Records `op` on `token`; an error stops the operation.
    fn record(&self, token: &TokenSummary, op: TokenOp<'_>) -> Result<(), String>;

    /// Whether entries were recorded since the last head.
    fn needs_head(&self) -> bool;

    /// Closes the record with a head, signed with `audit_key` through `sign` when the
    /// token has an audit key (`None`: an unsigned head). Called when the store is dropped;
    /// errors are the sink's to report.
    fn head(&self, token: &TokenSummary, signer: Option<(&KeyInfo, &HeadSigner<'_>)>);

    /// Whose audit key signed the last head, if the record knows: looked up first, so
    /// that finding the audit key needs no listing of the whole token.
    fn audit_user_hint(&self) -> Option<String> {
        None
    }
}

/// The newest key of role [`KeyRole::Audit`] on `store`, whoever's it is: among `hint`'s
/// keys when that user has one (one user's lookup), else from a listing of every key.
pub fn audit_key(store: &dyn KeyStore, hint: Option<&str>) -> Result<Option<KeyInfo>, TokenError> {
    let newest = |keys: Vec<KeyInfo>| {
        keys.into_iter()
            .filter(|k| k.role == KeyRole::Audit)
            .max_by_key(|k| k.created_ms)
    };
    if let Some(user) = hint
        && let Some(key) = newest(store.list_keys(Some(user))?)
    {
        return Ok(Some(key));
    }
    Ok(newest(store.list_keys(None)?))
}
