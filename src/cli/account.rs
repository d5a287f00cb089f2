//! `mxhsm login` and `mxhsm logout`: mxhsm's own Matrix device.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use mxhsm::account::login::{self, Credential, CrossSigned, LoginOutcome, LoginRequest};
use secrecy::SecretString;
use serde_json::json;

use super::output::{self, esc, note, say};
use super::{GlobalArgs, Setup, client_options, open_account, open_resolved, secrets};

#[derive(Debug, Args)]
pub struct LoginArgs {
    /// The homeserver: its client API URL (https://matrix.example.org), or a server name
    /// (example.org) looked up in its /.well-known/matrix/client. Default: the server of
    /// --user when that is a full user ID (@alice:example.org).
    #[arg(long)]
    pub homeserver: Option<String>,
    /// The user ID or localpart to log in as.
    #[arg(long)]
    pub user: Option<String>,
    /// Read the password from this file (its first line). Otherwise $MXHSM_PASSWORD or a
    /// prompt; never from the command line.
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// Log in with an existing access token read from this file instead of a password (of
    /// a device that has no encryption keys yet).
    #[arg(long, value_name = "FILE", conflicts_with = "password_file")]
    pub access_token_file: Option<PathBuf>,
    /// Device ID to use (default: chosen by the server).
    #[arg(long)]
    pub device_id: Option<String>,
    /// The device's name, as other clients show it. Default: "mxhsm on <hostname>".
    #[arg(long)]
    pub device_name: Option<String>,
    /// Log out the saved session first when it is another account's, or start a new
    /// device for this one (the old device is deleted).
    #[arg(long)]
    pub replace: bool,
}

pub fn login(global: &GlobalArgs, args: LoginArgs) -> Result<ExitCode> {
    let ctx = Setup::load(global)?;
    let options = client_options(global)?;
    // --account names the config's entry (or a user ID): its user, homeserver, device name
    // and token are the defaults here.
    let account = match &global.account {
        Some(a) => {
            if Setup::selector(global).is_many() {
                anyhow::bail!("log in to one account at a time (--account {})", esc(a));
            }
            Some(ctx.config.account(a)?)
        }
        None => None,
    };
    let user = args
        .user
        .clone()
        .or_else(|| account.as_ref().map(|a| a.user_id.clone()));
    if args.access_token_file.is_none() && user.is_none() {
        anyhow::bail!("--user (or --account) is needed for a password login");
    }
    let password_file = args.password_file.clone();
    let prompt_user = user.clone();
    let ask = move || {
        secrets::password(
            password_file.as_deref(),
            &format!("Password for {}", prompt_user.as_deref().unwrap_or("")),
        )
        .map_err(|e| mxhsm::homeserver::HomeserverError::Input(format!("{e:#}")))
    };
    let credential = match &args.access_token_file {
        Some(file) => {
            let token = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read the access token from {}", file.display()))?;
            Credential::AccessToken(SecretString::from(token.trim().to_string()))
        }
        None => Credential::Password(&ask),
    };
    // A token is opened (without a PIN) only when one is named: then the new device is
    // cross-signed at once, and the session records the token for later commands.
    let token = ctx.token(global, account.as_ref(), None)?;
    let store = match &token {
        Some(t) => Some(open_resolved(global, t)?),
        None => None,
    };
    let server = match (
        &args.homeserver,
        account.as_ref().and_then(|a| a.homeserver.as_ref()),
        user.as_deref(),
    ) {
        (Some(h), _, _) | (None, Some(h), _) => h.clone(),
        (None, None, Some(u)) if u.starts_with('@') && u.contains(':') => u
            .split_once(':')
            .map(|(_, s)| s.to_string())
            .unwrap_or_default(),
        _ => anyhow::bail!(
            "which homeserver? Pass --homeserver, or --user as a full user ID (@alice:example.org)"
        ),
    };
    let homeserver = mxhsm::homeserver::discover(&server, &options)?;
    let device_name = args
        .device_name
        .clone()
        .or_else(|| account.as_ref().and_then(|a| a.device_name.clone()))
        .or_else(|| ctx.config.defaults.device_name.clone())
        .unwrap_or_else(login::default_device_name);
    let request = LoginRequest {
        homeserver: homeserver.as_str(),
        user: user.as_deref(),
        credential,
        device_id: args.device_id.as_deref(),
        device_name,
        replace: args.replace,
        options: options.clone(),
        token: token.as_ref().map(|t| mxhsm::config::token_spec(&t.choice)),
    };
    if homeserver.is_insecure() {
        note!(
            "warning: {} is plain http:// to another machine: your password and access token cross the network unencrypted",
            esc(homeserver.as_str())
        );
    }
    let outcome = login::login(request, &ctx.sessions, store)?;
    match outcome {
        LoginOutcome::Reused(session) => {
            let mut doc = session_json(&ctx, &session);
            doc["reused"] = true.into();
            output::emit(global.json, doc, || {
                say!(
                    "already logged in as {} on {} (device {}): kept that session; `mxhsm login --replace` starts a new device",
                    esc(&session.user_id),
                    esc(&session.homeserver),
                    esc(&session.device_id)
                );
            })
        }
        LoginOutcome::New {
            session,
            replaced,
            cross_signed,
        } => {
            let path = ctx.sessions.path_for(&session.user_id);
            let mut doc = session_json(&ctx, &session);
            doc["cross_signed"] = (cross_signed == CrossSigned::Yes).into();
            doc["replaced"] = json!(replaced.as_ref().map(|o| json!({
                "user_id": o.user_id, "device_id": o.device_id, "logged_out": o.logged_out,
            })));
            output::emit(global.json, doc, || {
                if let Some(o) = &replaced {
                    if o.logged_out {
                        say!(
                            "logged out the previous session ({} device {}); its device is deleted",
                            esc(&o.user_id),
                            esc(&o.device_id)
                        );
                    } else {
                        say!(
                            "the previous session ({} device {}) had already ended on the server",
                            esc(&o.user_id),
                            esc(&o.device_id)
                        );
                    }
                }
                say!(
                    "logged in as {} on {} (device {}); session saved in {}",
                    esc(&session.user_id),
                    esc(&session.homeserver),
                    esc(&session.device_id),
                    path.display()
                );
                match cross_signed {
                    CrossSigned::Yes => {
                        say!("cross-signed this device with the self-signing key on the token")
                    }
                    CrossSigned::NoToken | CrossSigned::NotPublished => say!(
                        "once your identity is on the token, `mxhsm identity publish` (or `mxhsm sign device {}`) cross-signs this device",
                        esc(&session.device_id)
                    ),
                }
            })
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The login document (docs/json.md), before what only a new login adds.
fn session_json(ctx: &Setup, session: &mxhsm::homeserver::Session) -> serde_json::Value {
    json!({
        "user_id": session.user_id, "device_id": session.device_id,
        "homeserver": session.homeserver,
        "session_file": ctx.sessions.path_for(&session.user_id).display().to_string(),
        "reused": false, "cross_signed": null, "replaced": null,
    })
}

pub fn logout(global: &GlobalArgs) -> Result<ExitCode> {
    let ctx = Setup::load(global)?;
    let chosen =
        mxhsm::account::accounts::choose_one(&ctx.config, &ctx.sessions, &Setup::selector(global))?;
    let path = ctx.sessions.path_for(chosen.user_id());
    let session = login::logout(&path, &client_options(global)?)?;
    output::emit(
        global.json,
        json!({"logged_out": session.user_id, "device_id": session.device_id}),
        || {
            say!(
                "logged out {} and deleted device {}",
                esc(&session.user_id),
                esc(&session.device_id)
            )
        },
    );
    Ok(ExitCode::SUCCESS)
}

/// `mxhsm doctor`: the account's checks, one line each, with the command that fixes each
/// problem.
pub fn doctor(global: &GlobalArgs) -> Result<ExitCode> {
    let account = open_account(global)?;
    let checks = mxhsm::account::doctor::account(&account)?;
    let failed = checks.iter().filter(|c| !c.ok).count();
    output::emit(
        global.json,
        json!({
            "user_id": account.user_id(),
            "ok": failed == 0,
            "checks": checks.iter().map(|c| json!({
                "name": c.name, "ok": c.ok, "detail": super::token::detail(c),
            })).collect::<Vec<_>>(),
        }),
        || {
            let rows: Vec<Vec<String>> = checks
                .iter()
                .map(|c| {
                    vec![
                        if c.ok { "✔ ok" } else { "✘ PROBLEM" }.to_string(),
                        c.name.clone(),
                        super::token::detail(c),
                    ]
                })
                .collect();
            output::table(&["", "CHECK", "DETAIL"], &rows);
        },
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(super::exit::PROBLEM)
    })
}
