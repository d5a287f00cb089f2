//! `mxhsm keys generate | import | list | delete`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
#[cfg(feature = "yubikey")]
use mxhsm::token::yubikey::{YubiKeyStore, attestation};
use mxhsm::token::{
    KeyBackend, KeyInfo, KeyOptions, KeyRole, PinPolicy, RetiredSlot, Store, TouchPolicy,
};
use serde_json::json;

#[cfg(feature = "yubikey")]
use super::output::note;
use super::output::{self, esc, say};
use super::secrets::{confirm, private_key as read_secret};
use super::{GlobalArgs, open_store};

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Generate a key pair on the token.
    Generate {
        #[command(flatten)]
        target: KeyTarget,
        #[command(flatten)]
        placement: Placement,
    },
    /// Import an existing private key onto the token (as a non-extractable key).
    Import {
        #[command(flatten)]
        target: KeyTarget,
        #[command(flatten)]
        placement: Placement,
        /// File with the private key: base64 (padded or not, as in secret storage) or 32
        /// raw bytes; '-' reads standard input. Never the key itself on the command line.
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
    },
    /// YubiKey: check the card's attestation that the key was generated on it, up to
    /// Yubico's root certificates.
    Attest {
        #[command(flatten)]
        target: KeyTarget,
        /// Also trust this root certificate (PEM or DER), e.g. a test card's.
        #[arg(long, value_name = "FILE")]
        root: Vec<PathBuf>,
    },
    /// YubiKey: record a key already in a slot as this user's key of this role (on a new
    /// machine, or after another tool put it there). Nothing on the card changes.
    Adopt {
        #[command(flatten)]
        target: KeyTarget,
        /// The retired slot (82 to 95, hex).
        #[arg(long)]
        slot: RetiredSlot,
    },
    /// List the mxhsm keys on the token.
    List {
        /// Only this user's keys.
        #[arg(long)]
        user: Option<String>,
    },
    /// Delete a key from the token (destroys the private key: it cannot be undone).
    Delete {
        #[command(flatten)]
        target: KeyTarget,
        /// Delete the key with this public key (base64) rather than the current one.
        #[arg(long, value_name = "BASE64")]
        public_key: Option<String>,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Args)]
pub struct KeyTarget {
    /// The Matrix user ID the key belongs to (@alice:example.org).
    #[arg(long)]
    pub user: String,
    /// What the key is for.
    #[arg(long, value_parser = role_parser())]
    pub role: KeyRole,
}

/// Where and how a new key goes on a YubiKey (PIV); PKCS#11 tokens take none of these.
#[derive(Debug, Args)]
pub struct Placement {
    /// YubiKey: the retired slot (82 to 95, hex). Default: the first free one.
    #[arg(long)]
    pub slot: Option<RetiredSlot>,
    /// YubiKey: when the PIN is needed: never, once (default) or always.
    #[arg(long)]
    pub pin_policy: Option<PinPolicy>,
    /// YubiKey: when a touch is needed: never, always (default for the master key) or
    /// cached (default for the others; one touch counts for 15 s).
    #[arg(long)]
    pub touch_policy: Option<TouchPolicy>,
    /// YubiKey: overwrite the key already in --slot (it is destroyed).
    #[arg(long, requires = "slot")]
    pub force: bool,
}

impl Placement {
    fn options(&self, store: &Store) -> Result<KeyOptions> {
        let mut o = KeyOptions::default();
        o.slot = self.slot;
        o.pin_policy = self.pin_policy;
        o.touch_policy = self.touch_policy;
        o.force = self.force;
        let piv_only = o.slot.is_some() || o.pin_policy.is_some() || o.touch_policy.is_some();
        if piv_only && store.as_pkcs11().is_some() {
            bail!("--slot, --pin-policy, --touch-policy and --force are for YubiKeys (--yubikey)");
        }
        Ok(o)
    }
}

/// The roles as the values clap lists (with their short names as aliases).
fn role_parser() -> impl clap::builder::TypedValueParser<Value = KeyRole> {
    use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
    let what = |r: KeyRole| match r {
        KeyRole::Master => "the master key",
        KeyRole::SelfSigning => "the self-signing key",
        KeyRole::UserSigning => "the user-signing key",
        KeyRole::Backup => "the key-backup key",
        KeyRole::Audit => "mxhsm's audit-log key (signs the head of the audit log)",
    };
    PossibleValuesParser::new(KeyRole::ALL.map(|r| {
        let aliases = &r.names()[1..];
        let help = if aliases.is_empty() {
            what(r).to_string()
        } else {
            format!("{} (also: {})", what(r), aliases.join(", "))
        };
        PossibleValue::new(r.as_str())
            .aliases(aliases.iter().copied())
            .help(help)
    }))
    .try_map(|name| name.parse::<KeyRole>())
}

#[cfg(feature = "yubikey")]
fn yubikey(store: &Store) -> Result<&YubiKeyStore> {
    match store.as_yubikey() {
        Some(y) => Ok(y),
        None => bail!(
            "this is for YubiKeys (--yubikey); {} is a PKCS#11 token",
            store.summary()
        ),
    }
}

pub fn run(global: &GlobalArgs, cmd: KeysCommand) -> Result<ExitCode> {
    match cmd {
        KeysCommand::Generate { target, placement } => {
            let store = open_store(global)?;
            let key = store.generate(&target.user, target.role, &placement.options(&store)?)?;
            report_new_key(global, "generated", &key);
            #[cfg(feature = "yubikey")]
            if let Some(y) = store.as_yubikey() {
                // Say at once whether Yubico vouches for the new key.
                match y.attest(&key, &attestation::yubico_roots()) {
                    Ok(a) => note!("attested by Yubico: {}", describe_attestation(&a)),
                    Err(e) => note!("note: the attestation was not verified: {e}"),
                }
            }
        }
        KeysCommand::Import {
            target,
            placement,
            from,
        } => {
            let secret = read_secret(&from)?;
            let store = open_store(global)?;
            let options = placement.options(&store)?;
            let key = store.import(&target.user, target.role, secret, &options)?;
            report_new_key(global, "imported", &key);
        }
        KeysCommand::Attest { target, root } => attest(global, target, root)?,
        KeysCommand::Adopt { target, slot } => {
            let store = open_store(global)?;
            let key = adopt(&store, &target, slot)?;
            report_new_key(global, "adopted", &key);
        }
        KeysCommand::List { user } => {
            let store = open_store(global)?;
            let keys = store.list_keys_with_protection(user.as_deref())?;
            let value = json!({
                "token": store.summary().to_string(),
                "keys": keys.iter().map(key_json).collect::<Vec<_>>(),
            });
            output::emit(global.json, value, || {
                if keys.is_empty() {
                    say!("no mxhsm keys on {}", store.summary());
                    return;
                }
                let rows: Vec<Vec<String>> = keys
                    .iter()
                    .map(|k| {
                        vec![
                            k.user_id.clone(),
                            k.role.to_string(),
                            k.algorithm().to_string(),
                            k.public_key_base64(),
                            k.origin.as_str().to_string(),
                            output::timestamp(k.created_ms),
                            protection_summary(k),
                        ]
                    })
                    .collect();
                output::table(
                    &[
                        "USER",
                        "ROLE",
                        "ALG",
                        "PUBLIC KEY",
                        "ORIGIN",
                        "CREATED",
                        "PROTECTION",
                    ],
                    &rows,
                );
            });
        }
        KeysCommand::Delete {
            target,
            public_key,
            yes,
        } => {
            let store = open_store(global)?;
            let key = match &public_key {
                Some(pk) => store
                    .list_keys(Some(&target.user))?
                    .into_iter()
                    .find(|k| k.role == target.role && &k.public_key_base64() == pk)
                    .with_context(|| {
                        format!(
                            "no {} key of {} with public key {pk} on {}",
                            target.role,
                            target.user,
                            store.summary()
                        )
                    })?,
                None => store.find_key(&target.user, target.role)?,
            };
            if !yes {
                confirm(
                    &format!(
                        "Destroy the {} key {} of {} on {}? This cannot be undone.",
                        key.role,
                        key.public_key_base64(),
                        esc(&key.user_id),
                        store.summary()
                    ),
                    "pass --yes",
                )?;
            }
            store.delete(&key)?;
            output::emit(global.json, json!({"deleted": key_json(&key)}), || {
                say!(
                    "deleted the {} key {} of {}",
                    key.role,
                    key.public_key_base64(),
                    esc(&key.user_id)
                );
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `keys attest`: the card's attestation of a key, verified up to Yubico's roots (and
/// `--root`s).
#[cfg(feature = "yubikey")]
fn attest(global: &GlobalArgs, target: KeyTarget, root: Vec<PathBuf>) -> Result<()> {
    let store = open_store(global)?;
    let y = yubikey(&store)?;
    let mut roots = attestation::yubico_roots();
    for f in &root {
        let bytes = std::fs::read(f).with_context(|| format!("cannot read {}", f.display()))?;
        roots.push(
            attestation::Root::parse(&f.display().to_string(), &bytes)
                .map_err(anyhow::Error::msg)?,
        );
    }
    let key = store.find_key(&target.user, target.role)?;
    let a = y.attest(&key, &roots)?;
    if a.serial.is_some_and(|s| s != y.serial()) {
        bail!(
            "the attestation names serial {:?}, but this YubiKey is {}",
            a.serial,
            y.serial()
        );
    }
    output::emit(
        global.json,
        json!({
            "key": key_json(&key),
            "chain": a.chain,
            "serial": a.serial,
            "firmware": a.firmware.map(|f| format!("{}.{}.{}", f[0], f[1], f[2])),
            "verified": true,
        }),
        || {
            say!(
                "the {} key of {} was generated on this YubiKey: {}",
                key.role,
                esc(&key.user_id),
                describe_attestation(&a)
            );
        },
    );
    Ok(())
}

#[cfg(not(feature = "yubikey"))]
fn attest(_: &GlobalArgs, _: KeyTarget, _: Vec<PathBuf>) -> Result<()> {
    bail!("this mxhsm was built without YubiKey support (the `yubikey` feature)")
}

/// `keys adopt`: records a key already in a PIV slot.
#[cfg(feature = "yubikey")]
fn adopt(store: &Store, target: &KeyTarget, slot: RetiredSlot) -> Result<KeyInfo> {
    yubikey(store)?;
    Ok(store.adopt(&target.user, target.role, slot)?)
}

#[cfg(not(feature = "yubikey"))]
fn adopt(_: &Store, _: &KeyTarget, _: RetiredSlot) -> Result<KeyInfo> {
    bail!("this mxhsm was built without YubiKey support (the `yubikey` feature)")
}

#[cfg(feature = "yubikey")]
fn describe_attestation(a: &attestation::Attestation) -> String {
    let mut parts = vec![format!("chain {}", a.chain.join(" <- "))];
    if let Some(s) = a.serial {
        parts.push(format!("serial {s}"));
    }
    if let Some(f) = a.firmware {
        parts.push(format!("firmware {}.{}.{}", f[0], f[1], f[2]));
    }
    parts.join(", ")
}

fn report_new_key(global: &GlobalArgs, verb: &str, key: &KeyInfo) {
    output::emit(global.json, key_json(key), || {
        say!(
            "{verb} the {} key of {} ({}): {}",
            key.role,
            esc(&key.user_id),
            key.algorithm(),
            key.public_key_base64()
        );
    });
}

fn protection_summary(k: &KeyInfo) -> String {
    if let KeyBackend::Piv { pin, touch, .. } = &k.backend {
        // A PIV key never leaves the card; what protects its use is the PIN and touch.
        let or_unknown = |p: Option<&'static str>| p.unwrap_or("unknown");
        return format!(
            "{}, PIN {}, touch {}",
            k.backend,
            or_unknown(pin.map(|p| p.as_str())),
            or_unknown(touch.map(|t| t.as_str()))
        );
    }
    let problems = k.protection.problems(k.algorithm());
    if problems.is_empty() {
        "sensitive, non-extractable".into()
    } else {
        format!("WEAK: {}", problems.join("; "))
    }
}

pub fn key_json(k: &KeyInfo) -> serde_json::Value {
    let p = &k.protection;
    let piv = match k.backend {
        KeyBackend::Piv { pin, touch, .. } => Some((pin, touch)),
        KeyBackend::Pkcs11 { .. } => None,
    };
    json!({
        "user_id": k.user_id,
        "role": k.role.as_str(),
        "algorithm": k.algorithm().to_string(),
        "public_key": k.public_key_base64(),
        "origin": k.origin.as_str(),
        "created_ms": k.created_ms,
        "x25519_mechanism": k.x25519_mechanism().map(|m| m.as_str()),
        "locator": k.backend.to_string(),
        "pin_policy": piv.and_then(|p| p.0).map(|p| p.as_str()),
        "touch_policy": piv.and_then(|p| p.1).map(|t| t.as_str()),
        "attributes": {
            "token": p.token,
            "private": p.private,
            "sensitive": p.sensitive,
            "extractable": p.extractable,
            "always_sensitive": p.always_sensitive,
            "never_extractable": p.never_extractable,
            "local": p.local,
            "sign": p.sign,
            "derive": p.derive,
            "decrypt": p.decrypt,
            "unwrap": p.unwrap,
            "sign_recover": p.sign_recover,
            "modifiable": p.modifiable,
            "copyable": p.copyable,
        },
    })
}
