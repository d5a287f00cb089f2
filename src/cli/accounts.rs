//! `mxhsm account list` and `mxhsm account add`: the config file's accounts and the saved
//! sessions.

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Subcommand};
use mxhsm::account::accounts::{self, Selector};
use mxhsm::config::{Config, NewAccount, TokenChoice};
use mxhsm::token::{KeyRole, Store};
use serde_json::json;

use super::output::{self, esc, say};
use super::{GlobalArgs, Setup, client_options, open_resolved};

#[derive(Debug, Subcommand)]
pub enum AccountCommand {
    /// Every account of the config file and every saved session: its homeserver, token,
    /// whether it is logged in, and whether the identity it publishes is on its token
    /// (one /keys/query per homeserver; tokens are read without a PIN).
    List,
    /// Add an account to the config file (created if missing; comments and the rest of the
    /// file are kept). --token (a pkcs11: URI or a name from [tokens]) or --yubikey, and
    /// --pin-file, are recorded as the account's.
    Add(AddArgs),
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// The account's name, for --account (letters, digits, '.', '_', '-').
    pub name: String,
    /// Its Matrix user ID (@alice:example.org).
    #[arg(long)]
    pub user: String,
    /// Its homeserver (client API URL or server name). Default: the user ID's server.
    #[arg(long)]
    pub homeserver: Option<String>,
    /// The device name mxhsm logs in with.
    #[arg(long)]
    pub device_name: Option<String>,
    /// Replace an account of that name.
    #[arg(long)]
    pub replace: bool,
}

pub fn run(global: &GlobalArgs, cmd: AccountCommand) -> Result<ExitCode> {
    match cmd {
        AccountCommand::List => list(global),
        AccountCommand::Add(args) => add(global, args),
    }
}

fn add(global: &GlobalArgs, args: AddArgs) -> Result<ExitCode> {
    let (path, _) = mxhsm::config::config_path(global.config.as_deref());
    let entry = NewAccount {
        name: args.name,
        user_id: args.user,
        homeserver: args.homeserver,
        // The token options say which token the account uses (a name from [tokens] too).
        token: match (&global.token, &global.yubikey) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(y)) => Some(format!("yubikey:{y}")),
            (None, None) => None,
        },
        device_name: args.device_name,
        pin_file: global.pin_file.clone(),
    };
    let config = Config::add_account(&path, &entry, args.replace)?;
    let a = &config.accounts[&entry.name];
    output::emit(
        global.json,
        json!({"added": a.name, "user_id": a.user_id, "config": path.display().to_string()}),
        || {
            say!(
                "added account {} ({}) to {}; `mxhsm login --account {}` logs it in",
                esc(&a.name),
                esc(&a.user_id),
                path.display(),
                esc(&a.name)
            )
        },
    );
    Ok(ExitCode::SUCCESS)
}

/// A short name for a token: its config name, else its label or serial.
fn token_name(config: &Config, choice: &TokenChoice) -> String {
    if let Some(t) = config.tokens.values().find(|t| t.choice == *choice) {
        return t.name.clone();
    }
    match choice {
        TokenChoice::Pkcs11(uri) => uri
            .token
            .clone()
            .map(|t| format!("token={t}"))
            .unwrap_or_else(|| uri.original.clone()),
        TokenChoice::YubiKey(Some(serial)) => format!("YubiKey {serial}"),
        TokenChoice::YubiKey(None) => "the YubiKey".into(),
    }
}

fn list(global: &GlobalArgs) -> Result<ExitCode> {
    let setup = Setup::load(global)?;
    let chosen = accounts::choose(&setup.config, &setup.sessions, &Selector::All)?;
    let options = client_options(global)?;
    let sessions: Vec<_> = chosen.iter().filter_map(|c| c.session.as_ref()).collect();
    let published = accounts::published_masters(&sessions, &options);
    // Each token is opened once (no PIN: public keys only) and listed once.
    let mut masters: BTreeMap<String, Result<BTreeMap<String, String>, String>> = BTreeMap::new();
    let mut rows = Vec::new();
    let mut docs = Vec::new();
    for c in &chosen {
        let recorded = c.session.as_ref().and_then(|s| s.token.clone());
        let token = setup.token(global, Some(&c.config), recorded.as_deref());
        let (token_label, on_token) = match &token {
            Ok(Some(t)) => {
                let spec = mxhsm::config::token_spec(&t.choice);
                let listed = masters
                    .entry(spec)
                    .or_insert_with(|| master_keys(global, t).map_err(|e| format!("{e:#}")));
                let mine = listed
                    .as_ref()
                    .map(|m| m.get(c.user_id()).cloned())
                    .map_err(Clone::clone);
                (token_name(&setup.config, &t.choice), mine)
            }
            Ok(None) => ("-".into(), Ok(None)),
            Err(e) => ("?".into(), Err(format!("{e:#}"))),
        };
        let published = published.get(c.user_id());
        let identity = match (&c.session, published, &on_token) {
            (None, _, _) => "not logged in".to_string(),
            (_, Some(Err(e)), _) => format!("server unreachable: {e}"),
            (_, _, Err(e)) => format!("token unreadable: {e}"),
            (_, Some(Ok(None)), Ok(None)) => "none".into(),
            (_, Some(Ok(None)), Ok(Some(_))) => "on token, not published".into(),
            (_, Some(Ok(Some(p))), Ok(Some(t))) if p.to_base64() == *t => "on token".into(),
            (_, Some(Ok(Some(_))), Ok(Some(_))) => "PUBLISHED IS NOT THE TOKEN'S".into(),
            (_, Some(Ok(Some(_))), Ok(None)) => "published, not on token".into(),
            (_, None, _) => "?".into(),
        };
        let homeserver = c
            .session
            .as_ref()
            .map(|s| s.homeserver.clone())
            .or_else(|| c.config.homeserver.clone())
            .unwrap_or_else(|| "-".into());
        let name = setup.config.name_of(c.user_id());
        let logged_in = c
            .session
            .as_ref()
            .map(|s| format!("yes ({})", s.device_id))
            .unwrap_or_else(|| "no".into());
        docs.push(json!({
            "name": name,
            "user_id": c.user_id(),
            "homeserver": homeserver,
            "token": token_label,
            "logged_in": c.session.is_some(),
            "device_id": c.session.as_ref().map(|s| s.device_id.clone()),
            "identity": identity,
        }));
        rows.push(vec![
            name.unwrap_or("-").to_string(),
            c.user_id().to_string(),
            homeserver,
            token_label,
            logged_in,
            identity,
        ]);
    }
    output::emit(global.json, json!({"version": 1, "accounts": docs}), || {
        if rows.is_empty() {
            say!("no accounts: `mxhsm account add` or `mxhsm login` makes one");
        } else {
            output::table(
                &[
                    "ACCOUNT",
                    "USER",
                    "HOMESERVER",
                    "TOKEN",
                    "LOGGED IN",
                    "IDENTITY",
                ],
                &rows,
            );
        }
    });
    Ok(ExitCode::SUCCESS)
}

/// Every user's current master key on `token`, as base64.
fn master_keys(
    global: &GlobalArgs,
    token: &mxhsm::config::ResolvedToken,
) -> Result<BTreeMap<String, String>> {
    let store: Store = open_resolved(global, token)?;
    let mut newest: BTreeMap<String, mxhsm::token::KeyInfo> = BTreeMap::new();
    for k in store.list_keys(None)? {
        if k.role == KeyRole::Master
            && newest
                .get(&k.user_id)
                .is_none_or(|n| n.created_ms <= k.created_ms)
        {
            newest.insert(k.user_id.clone(), k);
        }
    }
    Ok(newest
        .into_iter()
        .map(|(u, k)| (u, k.public_key_base64()))
        .collect())
}
