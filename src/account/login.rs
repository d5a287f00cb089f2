//! Logging in as a new mxhsm device, and out again.
//!
//! Each account has its own session ([`Sessions`]), so logging in as another account adds
//! a session. A login never silently replaces a live session: the same account's live
//! session is reused, and replaced (its device deleted) only when the caller passes
//! `replace`. The user ID the server logged in must be the one asked for. The new
//! device is a real Olm device whose keys are read back, and it is cross-signed at once
//! when the token holds the published self-signing key.

use std::path::Path;

use secrecy::SecretString;
use vodozemac::olm::Account as OlmAccount;

use super::{Account, AccountError, PublishedIdentity, sign};
use crate::homeserver::{Client, ClientOptions, HomeserverError, HomeserverUrl, Session, Sessions};
use crate::matrix::device;
use crate::matrix::signed_json::signable_bytes;
use crate::token::{KeyRole, Store};

/// How to prove who we are.
pub enum Credential<'a> {
    /// The account password, asked for (by this closure) only after every check passed.
    Password(&'a dyn Fn() -> Result<SecretString, HomeserverError>),
    /// An access token of a device that has no encryption keys yet.
    AccessToken(SecretString),
}

/// A login.
pub struct LoginRequest<'a> {
    pub homeserver: &'a str,
    /// A user ID or a localpart; with an access token, `None` accepts whoever it is for.
    pub user: Option<&'a str>,
    pub credential: Credential<'a>,
    /// The device ID to ask for (default: the server chooses).
    pub device_id: Option<&'a str>,
    /// The device's display name, as other clients show it.
    pub device_name: String,
    /// Log out this account's live session first (its device is deleted).
    pub replace: bool,
    /// The token to record in the session (`crate::config::token_spec`), so that later
    /// commands find it without being told.
    pub token: Option<String>,
    pub options: ClientOptions,
}

/// The session a login replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OldSession {
    pub user_id: String,
    pub device_id: String,
    pub homeserver: String,
    /// `true`: mxhsm logged it out (its device is deleted); `false`: the server had
    /// already ended it.
    pub logged_out: bool,
}

/// Whether the new device was cross-signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrossSigned {
    /// Signed with the self-signing key on the token.
    Yes,
    /// No token was given.
    NoToken,
    /// The token does not hold the published identity (publish it first).
    NotPublished,
}

/// What [`login`] did.
#[derive(Debug)]
pub enum LoginOutcome {
    /// The saved session is live and for this account: kept, no new device.
    Reused(Session),
    New {
        session: Session,
        replaced: Option<OldSession>,
        cross_signed: CrossSigned,
    },
}

/// Checks a user given as `@local:server` or a bare localpart.
fn check_user(user: &str) -> Result<(), AccountError> {
    if user.starts_with('@') {
        crate::token::check_user_id(user)?;
        return Ok(());
    }
    let ok = !user.is_empty()
        && user.len() <= 255
        && user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._=-/+".contains(c));
    if ok {
        Ok(())
    } else {
        Err(AccountError::Input(format!(
            "{:?} is not a Matrix user ID or localpart (expected @alice:example.org or alice)",
            crate::text::escape(user)
        )))
    }
}

/// The saved session a login as `user` on `url` would replace: by user ID, or for a bare
/// localpart, the session of that localpart on that homeserver.
fn existing(
    sessions: &Sessions,
    url: &HomeserverUrl,
    user: Option<&str>,
) -> Result<Option<Session>, AccountError> {
    match user {
        Some(u) if u.starts_with('@') => Ok(sessions.load_if_any(u)?),
        Some(local) => Ok(sessions.list()?.into_iter().find(|s| {
            s.homeserver == url.as_str()
                && s.user_id
                    .strip_prefix('@')
                    .and_then(|r| r.split_once(':'))
                    .is_some_and(|(l, _)| l == local)
        })),
        None => Ok(None),
    }
}

/// Logs in, saving the session in `sessions`; cross-signs the new device with the token's
/// self-signing key when `store` holds the published one.
pub fn login(
    request: LoginRequest<'_>,
    sessions: &Sessions,
    store: Option<Store>,
) -> Result<LoginOutcome, AccountError> {
    // Every check that needs no password first.
    let url = HomeserverUrl::parse(request.homeserver, request.options.insecure_http)?;
    if let Some(u) = request.user {
        check_user(u)?;
    }
    if matches!(request.credential, Credential::Password(_)) && request.user.is_none() {
        return Err(AccountError::Input(
            "a password login needs the user".into(),
        ));
    }
    let mut replaced = None;
    if let Some(old) = existing(sessions, &url, request.user)? {
        let client = Client::for_session(&old, &request.options)?;
        match client.whoami() {
            Ok((uid, dev)) if uid == old.user_id && dev.as_deref() == Some(&old.device_id) => {
                let same_account = old.homeserver == url.as_str()
                    && request
                        .user
                        .is_none_or(|u| crate::homeserver::check_logged_in_user(u, &uid).is_ok());
                if same_account && !request.replace {
                    return Ok(LoginOutcome::Reused(old));
                }
                if !request.replace {
                    return Err(AccountError::SessionExists {
                        user_id: old.user_id,
                        device_id: old.device_id,
                        homeserver: old.homeserver,
                    });
                }
                client.logout()?;
                replaced = Some(OldSession {
                    user_id: old.user_id,
                    device_id: old.device_id,
                    homeserver: old.homeserver,
                    logged_out: true,
                });
            }
            Ok(_) | Err(HomeserverError::Http { status: 401, .. }) => {
                // The server ended that session (or it is not what the file says): its
                // access token no longer works, so there is nothing to log out.
                replaced = Some(OldSession {
                    user_id: old.user_id,
                    device_id: old.device_id,
                    homeserver: old.homeserver,
                    logged_out: false,
                });
            }
            Err(e) => return Err(e.into()),
        }
    }
    let mut session = match &request.credential {
        Credential::Password(password) => Client::login_password(
            url.as_str(),
            request.user.unwrap_or_default(),
            &password()?,
            request.device_id,
            &request.device_name,
            &request.options,
        )?,
        Credential::AccessToken(token) => {
            let client = Client::new(url.as_str(), Some(token.clone()), &request.options)?;
            let (user_id, device_id) = client.whoami()?;
            if let Some(u) = request.user {
                crate::homeserver::check_logged_in_user(u, &user_id)?;
            }
            let device_id = device_id.ok_or_else(|| {
                AccountError::Refused(
                    "the server does not say which device this access token belongs to".into(),
                )
            })?;
            // The device must be new: uploading our keys for another client's device would
            // replace its keys and break it.
            let q = client.query_keys(&[&user_id])?;
            if q.get("device_keys")
                .and_then(|d| d.get(&user_id))
                .and_then(|d| d.get(&device_id))
                .is_some()
            {
                return Err(AccountError::Refused(format!(
                    "device {} of this access token already has encryption keys (it is another client's device): mxhsm needs a device of its own; log in with a password, or with the token of a fresh device",
                    crate::text::escape(&device_id)
                )));
            }
            Session {
                homeserver: client.homeserver().to_string(),
                user_id,
                device_id,
                access_token: token.clone(),
                olm_account: None,
                insecure_http: client.url().is_insecure(),
                token: None,
            }
        }
    };
    // A real device: an Olm account whose keys the server (and other clients) can see.
    let olm = OlmAccount::new();
    let keys = device::device_keys(&olm, &session.user_id, &session.device_id)?;
    let client = Client::for_session(&session, &request.options)?;
    client.upload_device_keys(&keys)?;
    let back = client.query_keys(&[&session.user_id])?;
    let served = back
        .get("device_keys")
        .and_then(|d| d.get(&session.user_id))
        .and_then(|d| d.get(&session.device_id));
    if served.and_then(|s| signable_bytes(s).ok()) != Some(signable_bytes(&keys)?) {
        // Not kept: the device is ended rather than left behind with someone else's keys.
        let _ = client.logout();
        return Err(AccountError::ReadBack(format!(
            "the keys of the new device {} are not served as uploaded",
            session.device_id
        )));
    }
    let pickle = serde_json::to_string(&olm.pickle())
        .map_err(|e| AccountError::Input(format!("cannot keep the Olm account: {e}")))?;
    session.olm_account = Some(SecretString::from(pickle));
    session.token = request.token.clone();
    if let Some(old) = sessions.load_if_any(&session.user_id)?
        && replaced.is_none()
    {
        // Logged in with an access token or a localpart that turned out to be an account
        // with a live session: the new device is kept only with `replace`.
        if !request.replace {
            let _ = client.logout();
            return Err(AccountError::SessionExists {
                user_id: old.user_id,
                device_id: old.device_id,
                homeserver: old.homeserver,
            });
        }
        let _ = Client::for_session(&old, &request.options).and_then(|c| c.logout());
        replaced = Some(OldSession {
            user_id: old.user_id,
            device_id: old.device_id,
            homeserver: old.homeserver,
            logged_out: true,
        });
    }
    sessions.save(&session)?;
    let cross_signed = match store {
        None => CrossSigned::NoToken,
        Some(store) => {
            let account = Account::open(session, store, &request.options)?;
            let signed = cross_sign_if_published(&account, &back)?;
            let Account { session: s, .. } = account;
            session = s;
            signed
        }
    };
    Ok(LoginOutcome::New {
        session,
        replaced,
        cross_signed,
    })
}

/// Signs mxhsm's new device when the token holds the master and self-signing keys the
/// server publishes (`answer`: a `/keys/query` of ourselves).
fn cross_sign_if_published(
    account: &Account,
    answer: &serde_json::Value,
) -> Result<CrossSigned, AccountError> {
    let me = account.user_id();
    let current = account.store().current_keys(me)?;
    let published = PublishedIdentity::from_query(answer, me);
    let token = |r| current.get(&r).and_then(|k| k.public_key.ed25519());
    let (Some(master), Some(ssk)) = (token(KeyRole::Master), current.get(&KeyRole::SelfSigning))
    else {
        return Ok(CrossSigned::NotPublished);
    };
    if published.master != Some(master) || published.self_signing != Some(ssk.ed25519()?) {
        return Ok(CrossSigned::NotPublished);
    }
    sign::sign_this_device(account, ssk, &master, answer)?;
    Ok(CrossSigned::Yes)
}

/// Ends the session: logs out on the server (which deletes mxhsm's device) and removes
/// the session file. Returns the session that ended.
pub fn logout(session_path: &Path, options: &ClientOptions) -> Result<Session, AccountError> {
    let session = Session::load(session_path)?;
    Client::for_session(&session, options)?.logout()?;
    std::fs::remove_file(session_path)
        .map_err(|e| AccountError::file("cannot remove the session file", session_path, e))?;
    Ok(session)
}

/// The default device name: `mxhsm on <hostname>`.
pub fn default_device_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    if host.is_empty() {
        "mxhsm".into()
    } else {
        format!("mxhsm on {host}")
    }
}
