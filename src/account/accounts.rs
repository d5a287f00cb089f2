//! Which accounts a command is for: the config file's accounts and the saved sessions.
//!
//! An account is chosen by its name in the config file or by its user ID. With no choice,
//! the config's `[defaults] account` is used; without one, the only saved session. `all`
//! is every account the config names and every account with a saved session; a
//! comma-separated list names several.

use std::collections::BTreeMap;

use crate::config::{AccountConfig, Config};
use crate::homeserver::{Client, ClientOptions, HomeserverError, Session, Sessions};
use crate::matrix::keys::Ed25519PublicKey;
use crate::text::escape;

use super::{AccountError, PublishedIdentity};

/// What `--account` (or `MXHSM_ACCOUNT`) said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// Nothing: the default account, else the only session.
    Default,
    /// Every account.
    All,
    /// These accounts (names or user IDs), in this order.
    Some(Vec<String>),
}

impl Selector {
    /// Reads `all`, `NAME`, `@user:server`, or a comma-separated list of names and IDs.
    pub fn parse(value: Option<&str>) -> Selector {
        match value.map(str::trim) {
            None | Some("") => Selector::Default,
            Some("all") => Selector::All,
            Some(list) => Selector::Some(
                list.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect(),
            ),
        }
    }

    /// Whether this can name more than one account.
    pub fn is_many(&self) -> bool {
        match self {
            Selector::Default => false,
            Selector::All => true,
            Selector::Some(list) => list.len() > 1,
        }
    }
}

/// One account a command is for, with its saved session if it has one.
#[derive(Debug)]
pub struct Chosen {
    pub config: AccountConfig,
    pub session: Option<Session>,
}

impl Chosen {
    pub fn user_id(&self) -> &str {
        &self.config.user_id
    }

    /// The saved session, or [`HomeserverError::NotLoggedIn`].
    pub fn take_session(&mut self, sessions: &Sessions) -> Result<Session, AccountError> {
        self.session.take().ok_or_else(|| {
            AccountError::Homeserver(HomeserverError::NotLoggedIn {
                path: sessions.path_for(self.user_id()),
            })
        })
    }
}

/// The accounts `selector` names, each once, in the order given (`all`: by user ID).
pub fn choose(
    config: &Config,
    sessions: &Sessions,
    selector: &Selector,
) -> Result<Vec<Chosen>, AccountError> {
    // Sessions already read (for `all`) are not read again.
    let mut saved: BTreeMap<String, Session> = BTreeMap::new();
    let names: Vec<String> = match selector {
        Selector::Some(list) => list.clone(),
        Selector::Default => match &config.defaults.account {
            Some(a) => vec![a.clone()],
            None => {
                let saved = sessions.list()?;
                return match saved.len() {
                    0 => Err(AccountError::Homeserver(HomeserverError::NotLoggedIn {
                        path: sessions.dir().to_path_buf(),
                    })),
                    1 => {
                        let session = saved.into_iter().next();
                        let user = session.as_ref().map(|s| s.user_id.clone());
                        let config = config.account(&user.unwrap_or_default())?;
                        Ok(vec![Chosen { config, session }])
                    }
                    _ => Err(AccountError::WhichAccount {
                        logged_in: saved.into_iter().map(|s| s.user_id).collect(),
                    }),
                };
            }
        },
        Selector::All => {
            let mut users: Vec<String> = config
                .accounts
                .values()
                .map(|a| a.user_id.clone())
                .collect();
            for s in sessions.list()? {
                users.push(s.user_id.clone());
                saved.insert(s.user_id.clone(), s);
            }
            users.sort();
            users.dedup();
            users
        }
    };
    let mut chosen = |config: AccountConfig| -> Result<Chosen, AccountError> {
        let session = match saved.remove(&config.user_id) {
            Some(s) => Some(s),
            None => sessions.load_if_any(&config.user_id)?,
        };
        Ok(Chosen { config, session })
    };
    let mut out: Vec<Chosen> = Vec::new();
    for name in names {
        let account = config.account(&name)?;
        if out.iter().all(|c| c.user_id() != account.user_id) {
            out.push(chosen(account)?);
        }
    }
    Ok(out)
}

/// The one account `selector` names; an error naming the problem when it names several.
pub fn choose_one(
    config: &Config,
    sessions: &Sessions,
    selector: &Selector,
) -> Result<Chosen, AccountError> {
    let mut all = choose(config, sessions, selector)?;
    if all.len() != 1 {
        return Err(AccountError::Input(format!(
            "this command works on one account; {} were chosen ({})",
            all.len(),
            all.iter()
                .map(|c| escape(c.user_id()))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(all.remove(0))
}

/// The master key each of `sessions`' users publishes, from one `/keys/query` per
/// homeserver (through the first session on it), so that listing many accounts costs one
/// request per server. A server that fails gives its error for each of its users.
pub fn published_masters(
    sessions: &[&Session],
    options: &ClientOptions,
) -> BTreeMap<String, Result<Option<Ed25519PublicKey>, String>> {
    let mut by_server: BTreeMap<&str, Vec<&Session>> = BTreeMap::new();
    for s in sessions {
        by_server.entry(s.homeserver.as_str()).or_default().push(s);
    }
    let mut out = BTreeMap::new();
    for group in by_server.values() {
        let users: Vec<&str> = group.iter().map(|s| s.user_id.as_str()).collect();
        let client = Client::for_session(group[0], options);
        // In batches, so that an answer with every device stays far under its limit.
        for batch in users.chunks(100) {
            let answer = client
                .as_ref()
                .map_err(|e| e.to_string())
                .and_then(|c| c.query_keys(batch).map_err(|e| e.to_string()));
            for user in batch {
                let v = match &answer {
                    Ok(a) => Ok(PublishedIdentity::from_query(a, user).master),
                    Err(e) => Err(e.clone()),
                };
                out.insert(user.to_string(), v);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors() {
        assert_eq!(Selector::parse(None), Selector::Default);
        assert_eq!(Selector::parse(Some("all")), Selector::All);
        assert_eq!(
            Selector::parse(Some("alice, @bob:x,")),
            Selector::Some(vec!["alice".into(), "@bob:x".into()])
        );
        assert!(!Selector::parse(Some("alice")).is_many());
        assert!(Selector::parse(Some("a,b")).is_many());
    }
}
