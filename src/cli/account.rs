//! `mxhsm login` and `mxhsm logout`: mxhsm's own Matrix device.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use mxhsm::homeserver::session::session_path;
use mxhsm::homeserver::{Client, Session};
use mxhsm::matrix::device;
use secrecy::SecretString;
use serde_json::json;
use vodozemac::olm::Account;

use super::{GlobalArgs, output, password};

#[derive(Debug, Args)]
pub struct LoginArgs {
    /// The homeserver's client API URL, e.g. https://matrix.example.org.
    #[arg(long)]
    pub homeserver: String,
    /// The user ID or localpart to log in as.
    #[arg(long)]
    pub user: String,
    /// Read the password from this file (its first line). Otherwise $MXHSM_PASSWORD or a
    /// prompt; never from the command line.
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// Log in with an existing access token read from this file instead of a password.
    #[arg(long, value_name = "FILE", conflicts_with = "password_file")]
    pub access_token_file: Option<PathBuf>,
    /// Device ID to use (default: chosen by the server).
    #[arg(long)]
    pub device_id: Option<String>,
}

pub fn login(global: &GlobalArgs, args: LoginArgs) -> Result<ExitCode> {
    let path = session_path();
    let mut session = match &args.access_token_file {
        Some(file) => {
            let token = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read the access token from {}", file.display()))?;
            let token = SecretString::from(token.trim().to_string());
            let client = Client::new(&args.homeserver, Some(token.clone()))?;
            let (user_id, device_id) = client.whoami()?;
            Session {
                homeserver: client.homeserver().to_string(),
                user_id,
                device_id: device_id
                    .context("the server does not say which device this access token belongs to")?,
                access_token: token,
                olm_account: None,
            }
        }
        None => {
            let pw = password(
                args.password_file.as_deref(),
                &format!("Password for {}", args.user),
            )?;
            Client::login_password(
                &args.homeserver,
                &args.user,
                &pw,
                args.device_id.as_deref(),
                "mxhsm",
            )?
        }
    };
    // A real device: an Olm account whose keys the server (and other clients) can see.
    let account = Account::new();
    let keys = device::device_keys(&account, &session.user_id, &session.device_id)?;
    let client = Client::for_session(&session)?;
    client
        .upload_device_keys(&keys)
        .context("the device keys of mxhsm's session were not uploaded")?;
    let pickle = serde_json::to_string(&account.pickle())?;
    session.olm_account = Some(SecretString::from(pickle));
    session.save(&path)?;
    let signed = cross_sign_new_device(global, session)?;
    let session = Session::load(&path)?;
    if global.json {
        output::json(&json!({
            "user_id": session.user_id,
            "device_id": session.device_id,
            "homeserver": session.homeserver,
            "session_file": path.display().to_string(),
            "cross_signed": signed,
        }));
    } else {
        println!(
            "logged in as {} on {} (device {}); session saved in {}",
            session.user_id,
            session.homeserver,
            session.device_id,
            path.display()
        );
        if signed {
            println!("cross-signed this device with the self-signing key on the token");
        } else {
            println!(
                "once your identity is on the token, `mxhsm identity publish` (or `mxhsm sign device {}`) cross-signs this device",
                session.device_id
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// When a token is configured and holds the self-signing key the server publishes for
/// us, signs the new device at once, so that logging in leaves no unverified session.
fn cross_sign_new_device(global: &GlobalArgs, session: Session) -> Result<bool> {
    if !mxhsm::config::token_configured(global.token.as_deref(), global.yubikey.as_deref()) {
        return Ok(false);
    }
    let client = Client::for_session(&session)?;
    let store = super::open_store(global)?;
    let ctx = super::Ctx {
        session,
        client,
        store,
    };
    let user = ctx.session.user_id.clone();
    let ssk = match ctx
        .store
        .find_key(&user, mxhsm::token::KeyRole::SelfSigning)
    {
        Ok(k) => k,
        Err(mxhsm::token::TokenError::KeyNotFound { .. }) => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    let answer = ctx.client.query_keys(&[&user])?;
    let published = answer
        .get("self_signing_keys")
        .and_then(|m| m.get(&user))
        .and_then(|o| {
            mxhsm::matrix::cross_signing::parse_key_object(
                o,
                &user,
                mxhsm::matrix::cross_signing::Usage::SelfSigning,
            )
            .ok()
        });
    if published.map(|k| k.0) != Some(ssk.public_key) {
        return Ok(false);
    }
    let signer = mxhsm::token::TokenSigner {
        store: &*ctx.store,
        key: ssk,
    };
    let failures = super::identity::sign_own_devices(
        &ctx,
        &signer,
        std::slice::from_ref(&ctx.session.device_id),
    )?;
    super::identity::report_failures(&failures)?;
    Ok(true)
}

pub fn logout(global: &GlobalArgs) -> Result<ExitCode> {
    let path = session_path();
    let session = Session::load(&path)?;
    Client::for_session(&session)?.logout()?;
    std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
    if global.json {
        output::json(&json!({"logged_out": session.user_id, "device_id": session.device_id}));
    } else {
        println!(
            "logged out {} and deleted device {}",
            session.user_id, session.device_id
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The Olm account of the saved session (mxhsm's device key).
pub fn olm_account(session: &Session) -> Result<Account> {
    use secrecy::ExposeSecret;
    let pickle = session
        .olm_account
        .as_ref()
        .context("the session has no Olm device; log in again with `mxhsm login`")?;
    let pickle: vodozemac::olm::AccountPickle = serde_json::from_str(pickle.expose_secret())
        .context("the session's Olm account cannot be read")?;
    Ok(Account::from_pickle(pickle))
}
