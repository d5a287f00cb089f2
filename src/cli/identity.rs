//! `mxhsm identity create | publish | status` and `mxhsm sign device | devices | user`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use mxhsm::account::identity::{
    self, CreateOptions, KeySource, PublishPrompts, Published, Replacement,
};
use mxhsm::account::sign::{self, DeviceCandidate, DeviceSelection};
use mxhsm::account::{Account, AccountError};
use mxhsm::homeserver::HomeserverError;
use secrecy::SecretString;
use serde_json::json;

use super::output::{self, esc, fingerprint, note, say};
use super::{GlobalArgs, exit, open_account, secrets};

#[derive(Debug, Subcommand)]
pub enum IdentityCommand {
    /// Create the cross-signing keys on the token (or import existing seeds) and publish
    /// them. Refuses when the server already has an identity that is not on the token.
    Create {
        /// Import the master key's seed from this file (base64 or 32 raw bytes) instead of
        /// generating it; --import-self-signing and --import-user-signing likewise.
        #[arg(long, value_name = "FILE", requires_all = ["import_self_signing", "import_user_signing"])]
        import_master: Option<PathBuf>,
        #[arg(long, value_name = "FILE")]
        import_self_signing: Option<PathBuf>,
        #[arg(long, value_name = "FILE")]
        import_user_signing: Option<PathBuf>,
        /// Only create the keys; publish later with `mxhsm identity publish`.
        #[arg(long)]
        no_publish: bool,
        #[command(flatten)]
        replace: ReplaceArgs,
        #[command(flatten)]
        auth: PasswordArg,
    },
    /// Publish the token's cross-signing keys (only those that changed) and cross-sign
    /// this device.
    Publish {
        #[command(flatten)]
        replace: ReplaceArgs,
        /// With --replace: first make new master, self-signing and user-signing keys on the
        /// token (the old ones stay until deleted). A homeserver that cannot take back keys
        /// it stored before (Synapse) needs this after some client reset the identity.
        #[arg(long, requires = "replace")]
        new_keys: bool,
        #[command(flatten)]
        auth: PasswordArg,
    },
    /// The trust table: our identity as the server serves it, our devices, other users.
    /// Exits with 3 when it reports a problem.
    Status {
        /// Also show these users (and their devices).
        #[arg(long = "user", value_name = "USER_ID")]
        users: Vec<String>,
        /// Draw the chains of trust as a tree that fits 80 columns: what holds each key,
        /// and each link's verdict with its reason.
        #[arg(long, conflicts_with = "json")]
        tree: bool,
    },
}

#[derive(Debug, Args)]
pub struct ReplaceArgs {
    /// Replace a published identity that is not the token's (what is lost is listed first,
    /// and you are asked to type "replace").
    #[arg(long)]
    pub replace: bool,
    /// With --replace: do not ask.
    #[arg(long, requires = "replace")]
    pub yes: bool,
}

#[derive(Debug, Args)]
pub struct PasswordArg {
    /// Password file for user-interactive auth, if the server asks (else $MXHSM_PASSWORD or
    /// a prompt).
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum SignCommand {
    /// Cross-sign one of your own devices with the self-signing key, after you compared
    /// its fingerprint with what the device shows.
    Device {
        device_id: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Cross-sign several of your devices in one upload: the ones named, or every unsigned
    /// one (listed with fingerprints, then you are asked).
    Devices {
        /// The devices to sign.
        device_ids: Vec<String>,
        /// Every device not signed yet (asks; cannot be combined with --yes).
        #[arg(long, conflicts_with = "device_ids")]
        all_unsigned: bool,
        /// Do not ask: only with the device IDs named.
        #[arg(long)]
        yes: bool,
        /// Sign, without asking, the unsigned devices this policy file allows (its rules are
        /// in docs/organisation.md); list the others for a human. Works with --account all.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["device_ids", "all_unsigned", "yes"])]
        policy: Option<std::path::PathBuf>,
        /// With --policy: show what would be signed, sign nothing.
        #[arg(long, requires = "policy")]
        dry_run: bool,
    },
    /// Sign another user's master key with your user-signing key (after you verified it).
    User {
        user_id: String,
        /// The master-key fingerprint you verified out of band (base64, spaces allowed).
        #[arg(long)]
        fingerprint: Option<String>,
    },
}

fn password_prompt<'a>(
    auth: &'a PasswordArg,
    user: &'a str,
) -> impl Fn() -> Result<SecretString, HomeserverError> + 'a {
    move || {
        secrets::password(
            auth.password_file.as_deref(),
            &format!("Password for {user} (to change the published keys)"),
        )
        .map_err(|e| HomeserverError::Input(format!("{e:#}")))
    }
}

/// What `--replace` loses, for the typed confirmation.
fn describe_replacement(r: &Replacement) -> String {
    let mut lines = vec![
        format!(
            "The server publishes the cross-signing identity {} for {}. Replacing it with the token's loses:",
            fingerprint(&r.published_master),
            esc(&r.user_id)
        ),
        "  - every verification of you by your contacts: they will see your identity change and must verify you again".into(),
    ];
    if r.signed_devices.is_empty() {
        lines.push("  - (no device of yours is cross-signed by it now)".into());
    } else {
        lines.push(format!(
            "  - the cross-signing of {} device(s): {}",
            r.signed_devices.len(),
            mxhsm::text::escape_joined(&r.signed_devices, ", ")
        ));
    }
    match &r.trusted_backup {
        Some((v, n)) => lines.push(format!(
            "  - the trust in key backup version {} ({n} keys): clients stop using it until it is signed by the new master key",
            esc(v)
        )),
        None => lines.push("  - (no key backup is signed by it)".into()),
    }
    lines.join("\n")
}

fn replace_confirmation(
    args: &ReplaceArgs,
) -> impl FnMut(&Replacement) -> Result<(), AccountError> + '_ {
    move |r| {
        let what = describe_replacement(r);
        if args.yes {
            note!("{what}\n(--yes: replacing)");
            return Ok(());
        }
        secrets::confirm_typed(&what, "replace", "pass --yes with --replace")
            .map_err(|e| AccountError::Refused(format!("{e:#}")))
    }
}

fn report_published(global: &GlobalArgs, p: &Published) {
    // Users whose newest signature (as the audit log records it) is by another
    // user-signing key than the published one: they are not verified now.
    let usk = p.user_signing.to_base64();
    let to_reverify: Vec<String> = if p.published {
        super::audit::users_signed(&super::audit::log_path(global), &p.user_id)
            .into_iter()
            .filter(|(_, key)| *key != usk)
            .map(|(u, _)| u)
            .collect()
    } else {
        Vec::new()
    };
    let sources: Vec<_> = p
        .sources
        .iter()
        .map(|(r, s)| {
            json!({"role": r.as_str(), "source": match s {
                KeySource::Generated => "generated", KeySource::Imported => "imported", KeySource::Existing => "existing",
            }})
        })
        .collect();
    output::emit(
        global.json,
        json!({
            "user_id": p.user_id,
            "master_key": p.master.to_base64(),
            "self_signing_key": p.self_signing.to_base64(),
            "user_signing_key": p.user_signing.to_base64(),
            "published": p.published,
            "uploaded": p.uploaded.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
            "device_signed": p.device_signed,
            "keys": sources,
            "replaced_master_key": p.replaced.as_ref().map(|r| r.published_master.to_base64()),
            "devices_to_resign": p.devices_to_resign,
            "users_to_reverify": to_reverify,
        }),
        || {
            for (role, source) in &p.sources {
                match source {
                    KeySource::Generated => note!("generated the {role} key on the token"),
                    KeySource::Imported => note!("imported the {role} key onto the token"),
                    KeySource::Existing => {
                        note!("the token already holds the {role} key: using it")
                    }
                }
            }
            if !p.published {
                say!("created; publish with `mxhsm identity publish`");
                return;
            }
            if p.uploaded.is_empty() {
                say!(
                    "the server already publishes the token's cross-signing identity of {}:",
                    esc(&p.user_id)
                );
            } else {
                say!(
                    "published the cross-signing identity of {} ({} uploaded):",
                    esc(&p.user_id),
                    p.uploaded
                        .iter()
                        .map(|r| r.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            say!("  master        {}", fingerprint(&p.master));
            say!("  self-signing  {}", p.self_signing);
            say!("  user-signing  {}", p.user_signing);
            if p.device_signed {
                say!("and cross-signed this device");
            }
            if !p.devices_to_resign.is_empty() {
                say!(
                    "{} device(s) were signed by the previous self-signing key and are not cross-signed now: {}. Check each one and sign it again with `mxhsm sign devices ID…`",
                    p.devices_to_resign.len(),
                    mxhsm::text::escape_joined(&p.devices_to_resign, ", ")
                );
            }
            if !to_reverify.is_empty() {
                say!(
                    "{} user(s) were verified with a previous user-signing key (as the audit log records) and are not verified now: {}. Check each one and verify it again with `mxhsm verify user ID` or `mxhsm sign user ID --fingerprint …`",
                    to_reverify.len(),
                    mxhsm::text::escape_joined(&to_reverify, ", ")
                );
            }
        },
    );
}

pub fn run_identity(global: &GlobalArgs, cmd: IdentityCommand) -> Result<ExitCode> {
    match cmd {
        IdentityCommand::Create {
            import_master,
            import_self_signing,
            import_user_signing,
            no_publish,
            replace,
            auth,
        } => {
            let import = match (import_master, import_self_signing, import_user_signing) {
                (Some(m), Some(s), Some(u)) => Some([
                    secrets::private_key(&m)?,
                    secrets::private_key(&s)?,
                    secrets::private_key(&u)?,
                ]),
                (None, None, None) => None,
                _ => bail!(
                    "--import-master, --import-self-signing and --import-user-signing go together"
                ),
            };
            let account = open_account(global)?;
            let user = account.user_id().to_string();
            let password = password_prompt(&auth, &user);
            let mut confirm = replace_confirmation(&replace);
            let p = identity::create(
                &account,
                CreateOptions {
                    import,
                    no_publish,
                    replace: replace.replace,
                },
                PublishPrompts {
                    confirm_replace: &mut confirm,
                    password: &password,
                },
            )?;
            report_published(global, &p);
        }
        IdentityCommand::Publish {
            replace,
            new_keys,
            auth,
        } => {
            let account = open_account(global)?;
            let user = account.user_id().to_string();
            let password = password_prompt(&auth, &user);
            let mut confirm = replace_confirmation(&replace);
            let p = identity::publish(
                &account,
                replace.replace,
                new_keys,
                PublishPrompts {
                    confirm_replace: &mut confirm,
                    password: &password,
                },
            )?;
            report_published(global, &p);
        }
        IdentityCommand::Status { users, tree } if super::is_bulk(global) => {
            if tree {
                bail!("--tree draws one account; choose it with --account");
            }
            let results = super::for_each_account(global, |account| {
                let status = identity::status(account, &users)?;
                let report = &status.report;
                let unsigned = report
                    .devices
                    .iter()
                    .filter(|d| d.user_id == status.own.user_id && !d.trust.is_verified())
                    .count();
                let own = report
                    .devices
                    .iter()
                    .filter(|d| d.user_id == status.own.user_id)
                    .count();
                let problems = if status.has_problems() {
                    let mut p = report.own_identity.clone();
                    if p.is_empty() {
                        p.push("a device or user's chain is broken".into());
                    }
                    format!("✘ {}", p.join("; "))
                } else {
                    "✔ ok".into()
                };
                Ok(super::Summary {
                    problem: status.has_problems(),
                    doc: status_json(&status),
                    cells: vec![
                        status.own.user_id.clone(),
                        fingerprint(&status.own.master),
                        format!("{own} ({unsigned} unsigned)"),
                        problems,
                    ],
                })
            })?;
            return Ok(super::print_bulk(
                global,
                &["USER", "MASTER KEY", "DEVICES", "STATUS"],
                results,
            ));
        }
        IdentityCommand::Status { users, tree } => {
            let account = open_account(global)?;
            let status = identity::status(&account, &users)?;
            if tree {
                // What holds each key includes its protection attributes.
                let keys = account
                    .store()
                    .list_keys_with_protection(Some(account.user_id()))?;
                let backup = mxhsm::account::backup::status(&account)?;
                for line in
                    super::tree::lines(&status, &keys, account.keys().summary(), backup.as_ref())
                {
                    output::say_verdict(&line);
                }
            } else {
                print_status(global, &status);
            }
            if status.has_problems() {
                return Ok(ExitCode::from(exit::PROBLEM));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The JSON document of `identity status` (docs/json.md).
fn status_json(s: &identity::Status) -> serde_json::Value {
    let (own, report) = (&s.own, &s.report);
    json!({
        "user_id": own.user_id,
        "master_key": own.master.to_base64(),
        "identity_ok": report.own_identity.is_empty(),
        "identity_problems": report.own_identity,
        "problems": s.has_problems(),
        "devices": report.devices.iter().map(|d| json!({
            "user_id": d.user_id, "device_id": d.device_id,
            "display_name": d.display_name,
            "ed25519": d.ed25519.map(|k| k.to_base64()),
            "trust": d.trust.as_str(), "reason": d.trust.reason(),
            "this_device": d.user_id == own.user_id && d.device_id == s.this_device,
        })).collect::<Vec<_>>(),
        "users": report.users.iter().map(|u| json!({
            "user_id": u.user_id, "master_key": u.master_key.map(|k| k.to_base64()),
            "trust": u.trust.as_str(), "reason": u.trust.reason(),
        })).collect::<Vec<_>>(),
    })
}

fn print_status(global: &GlobalArgs, s: &identity::Status) {
    let (own, report) = (&s.own, &s.report);
    output::emit(global.json, status_json(s), || {
        say!(
            "identity of {}: master key {}",
            esc(&own.user_id),
            fingerprint(&own.master)
        );
        if report.own_identity.is_empty() {
            say!("  published and consistent with the token");
        }
        for p in &report.own_identity {
            say!("  PROBLEM: {}", esc(p));
        }
        if !report.own_identity.is_empty() {
            say!("  (`mxhsm identity publish` publishes the token's keys)");
        }
        say!("");
        let rows: Vec<Vec<String>> = report
            .devices
            .iter()
            .map(|d| {
                let this = d.user_id == own.user_id && d.device_id == s.this_device;
                vec![
                    d.user_id.clone(),
                    if this {
                        format!("{} (this mxhsm)", d.device_id)
                    } else {
                        d.device_id.clone()
                    },
                    d.display_name.clone().unwrap_or_default(),
                    d.ed25519.as_ref().map(fingerprint).unwrap_or_default(),
                    d.trust.as_str().to_string(),
                    d.trust.reason().to_string(),
                ]
            })
            .collect();
        output::table(
            &["USER", "DEVICE", "NAME", "ED25519", "TRUST", "WHY"],
            &rows,
        );
        if !report.users.is_empty() {
            say!("");
            let rows: Vec<Vec<String>> = report
                .users
                .iter()
                .map(|u| {
                    vec![
                        u.user_id.clone(),
                        u.master_key.as_ref().map(fingerprint).unwrap_or_default(),
                        u.trust.as_str().to_string(),
                        u.trust.reason().to_string(),
                    ]
                })
                .collect();
            output::table(&["USER", "MASTER KEY", "TRUST", "WHY"], &rows);
        }
    });
}

/// One candidate as a line of the confirmation list.
fn candidate_line(c: &DeviceCandidate) -> String {
    format!(
        "  {}  \"{}\"  {}  (self-signature {}{}; now {})",
        esc(&c.device_id),
        esc(c.display_name.as_deref().unwrap_or("")),
        c.ed25519
            .as_ref()
            .map(fingerprint)
            .unwrap_or_else(|| "(no Ed25519 key)".into()),
        match &c.self_signature {
            Ok(()) => "valid".to_string(),
            Err(e) => format!("BAD: {}", esc(&e.to_string())),
        },
        if c.is_this_device { ", this mxhsm" } else { "" },
        c.trust.as_str()
    )
}

fn sign_devices(
    global: &GlobalArgs,
    account: &Account,
    selection: DeviceSelection,
    yes: bool,
) -> Result<ExitCode> {
    let named = matches!(selection, DeviceSelection::Named(_));
    let mut confirm = |candidates: &[DeviceCandidate]| -> Result<Vec<String>, AccountError> {
        let list = candidates
            .iter()
            .map(candidate_line)
            .collect::<Vec<_>>()
            .join("\n");
        note!(
            "{} device(s) of {} to sign with the self-signing key on the token:\n{list}",
            candidates.len(),
            esc(account.user_id())
        );
        let ids: Vec<String> = candidates.iter().map(|c| c.device_id.clone()).collect();
        if yes && named {
            return Ok(ids);
        }
        secrets::confirm(
            "Is each fingerprint the one its device shows? Sign them?",
            "compare the fingerprints, then pass --yes with the device IDs named",
        )
        .map_err(|e| AccountError::Refused(format!("{e:#}")))?;
        Ok(ids)
    };
    let outcome = sign::sign_devices(account, &selection, &mut confirm)?;
    output::emit(
        global.json,
        json!({
            "signed_devices": outcome.signed,
            "skipped": outcome.skipped.iter().map(|(d, why)| json!({"device_id": d, "reason": why})).collect::<Vec<_>>(),
        }),
        || {
            for (d, why) in &outcome.skipped {
                note!("skipped {}: {}", esc(d), esc(why));
            }
            if outcome.signed.is_empty() {
                say!("no unsigned devices");
            } else {
                say!(
                    "signed {} device(s): {}",
                    outcome.signed.len(),
                    mxhsm::text::escape_joined(&outcome.signed, ", ")
                );
            }
        },
    );
    Ok(ExitCode::SUCCESS)
}

/// `sign devices --policy FILE`: for each chosen account, the devices the policy allows
/// are signed and the rest listed; a summary per account (exit 3 when a device waits for
/// a human, 1 when an account failed).
fn sign_by_policy(global: &GlobalArgs, file: &std::path::Path, dry_run: bool) -> Result<ExitCode> {
    use mxhsm::account::policy::{self, Decision, Policy};
    // The policy is checked before any token or server is touched.
    let rules = Policy::load(file)?;
    let config = super::Setup::load(global)?.config;
    let results = super::for_each_account(global, |account| {
        let name = config.name_of(account.user_id());
        let outcome = policy::sign_by_policy(
            account,
            name,
            &rules,
            &policy::default_first_seen_path(account.user_id()),
            dry_run,
        )?;
        let devices: Vec<serde_json::Value> = outcome
            .devices
            .iter()
            .map(|d| {
                let (decision, rule, reason) = match &d.decision {
                    Decision::Signed { rule } => ("signed", Some(*rule), None),
                    Decision::WouldSign { rule } => ("would_sign", Some(*rule), None),
                    Decision::NeedsHuman { reason } => ("needs_human", None, Some(reason.clone())),
                    Decision::Refused { reason } => ("refused", None, Some(reason.clone())),
                };
                json!({
                    "device_id": d.device_id, "display_name": d.display_name,
                    "ed25519": d.ed25519.map(|k| k.to_base64()),
                    "decision": decision, "rule": rule, "reason": reason,
                })
            })
            .collect();
        for d in outcome.needs_human() {
            note!(
                "{}: {} \"{}\" {}: {}",
                esc(account.user_id()),
                esc(&d.device_id),
                esc(d.display_name.as_deref().unwrap_or("")),
                d.ed25519.as_ref().map(fingerprint).unwrap_or_default(),
                match &d.decision {
                    Decision::Refused { reason } => format!("NEVER signed: {}", esc(reason)),
                    Decision::NeedsHuman { reason } => format!("for a human: {}", esc(reason)),
                    Decision::Signed { .. } | Decision::WouldSign { .. } => String::new(),
                }
            );
        }
        let signed: Vec<String> = outcome.signed().map(|d| d.device_id.clone()).collect();
        let waiting = outcome.needs_human().count();
        Ok(super::Summary {
            problem: waiting > 0,
            doc: json!({"dry_run": dry_run, "devices": devices}),
            cells: vec![
                if signed.is_empty() {
                    "-".into()
                } else {
                    signed.join(", ")
                },
                if waiting == 0 {
                    "✔ none".into()
                } else {
                    format!("✘ {waiting} (listed above)")
                },
            ],
        })
    })?;
    Ok(super::print_bulk(
        global,
        &[if dry_run { "WOULD SIGN" } else { "SIGNED" }, "FOR A HUMAN"],
        results,
    ))
}

pub fn run_sign(global: &GlobalArgs, cmd: SignCommand) -> Result<ExitCode> {
    match cmd {
        SignCommand::Device { device_id, yes } => {
            let account = open_account(global)?;
            sign_devices(
                global,
                &account,
                DeviceSelection::Named(vec![device_id]),
                yes,
            )
        }
        SignCommand::Devices {
            policy: Some(file),
            dry_run,
            ..
        } => sign_by_policy(global, &file, dry_run),
        SignCommand::Devices {
            device_ids,
            all_unsigned,
            yes,
            ..
        } => {
            let selection = match (device_ids.is_empty(), all_unsigned) {
                (false, _) => DeviceSelection::Named(device_ids),
                (true, true) if yes => bail!(
                    "--all-unsigned signs devices you have not seen: it always asks. To sign without asking, name the devices: `mxhsm sign devices ID… --yes`"
                ),
                (true, true) => DeviceSelection::AllUnsigned,
                (true, false) => bail!("name the devices to sign, or pass --all-unsigned"),
            };
            let account = open_account(global)?;
            sign_devices(global, &account, selection, yes)
        }
        SignCommand::User {
            user_id,
            fingerprint: expected,
        } => {
            let account = open_account(global)?;
            let mut confirm = |c: &sign::UserCandidate| -> Result<(), AccountError> {
                note!(
                    "master key of {}: {}",
                    esc(&c.user_id),
                    fingerprint(&c.master_key)
                );
                match &expected {
                    Some(f) => {
                        let given: String = f.chars().filter(|c| !c.is_whitespace()).collect();
                        if given.trim_end_matches('=') != c.master_key.to_base64() {
                            return Err(AccountError::FingerprintMismatch {
                                user_id: c.user_id.clone(),
                                actual: c.master_key,
                            });
                        }
                        Ok(())
                    }
                    None => secrets::confirm(
                        &format!(
                            "Did {} confirm this fingerprint to you (in person or over a trusted channel)? Sign it with your user-signing key?",
                            esc(&c.user_id)
                        ),
                        "pass the fingerprint you verified with --fingerprint",
                    )
                    .map_err(|e| AccountError::Refused(format!("{e:#}"))),
                }
            };
            let c = sign::sign_user(&account, &user_id, &mut confirm)?;
            // `mxhsm watch` reports it if they ever publish another master key.
            let state = mxhsm::account::watch::default_state_path(account.user_id());
            if let Err(e) = mxhsm::account::watch::remember_verified(
                &state,
                &account,
                &c.user_id,
                &c.master_key,
            ) {
                note!("warning: `mxhsm watch` will not know of this verification: {e}");
            }
            output::emit(
                global.json,
                json!({"signed_user": c.user_id, "master_key": c.master_key.to_base64()}),
                || say!("signed the master key of {}", esc(&c.user_id)),
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
