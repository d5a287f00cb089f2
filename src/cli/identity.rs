//! `mxhsm identity create | publish | status` and `mxhsm sign device | user | devices`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use mxhsm::homeserver::{SignatureFailure, UiaAuth};
use mxhsm::matrix::cross_signing::{self, OwnKeys, Trust, TrustReport, Usage};
use mxhsm::matrix::device::without_signatures;
use mxhsm::matrix::signed_json::{Ed25519PublicKey, Ed25519Signer, sign_json, verify_json};
use mxhsm::token::{KeyOptions, KeyRole, KeyStore, TokenError, TokenSigner};
use serde_json::{Value, json};

use super::keys::{confirm, read_secret};
use super::{Ctx, GlobalArgs, output, password};

#[derive(Debug, Subcommand)]
pub enum IdentityCommand {
    /// Create the cross-signing keys on the token (or import existing seeds) and publish them.
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
        auth: PasswordArg,
    },
    /// Publish the token's cross-signing keys to the homeserver and cross-sign this device.
    Publish {
        #[command(flatten)]
        auth: PasswordArg,
    },
    /// The trust table: our identity as the server serves it, our devices, other users.
    Status {
        /// Also show these users (and their devices).
        #[arg(long = "user", value_name = "USER_ID")]
        users: Vec<String>,
    },
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
    /// Cross-sign one of your own devices with the self-signing key.
    Device {
        device_id: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Sign another user's master key with your user-signing key (after you verified it).
    User {
        user_id: String,
        /// The master-key fingerprint you verified out of band (base64, spaces allowed).
        #[arg(long)]
        fingerprint: Option<String>,
    },
    /// Cross-sign all your own unsigned devices in one upload.
    Devices {
        #[arg(long, required = true)]
        all_unsigned: bool,
        #[arg(long)]
        yes: bool,
    },
}

/// `AAAA BBBB …`: a key in groups of four for reading aloud.
pub fn fingerprint(key: &Ed25519PublicKey) -> String {
    let b = key.to_base64();
    b.as_bytes()
        .chunks(4)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn own_keys(store: &dyn KeyStore, user: &str) -> Result<OwnKeys> {
    let current = store.current_keys(user)?;
    let public = |role| current.get(&role).map(|k| Ed25519PublicKey(k.public_key));
    Ok(OwnKeys {
        user_id: user.to_string(),
        master: public(KeyRole::Master).with_context(|| {
            format!(
                "no master key for {user} on {}: run `mxhsm identity create`",
                store.summary()
            )
        })?,
        self_signing: public(KeyRole::SelfSigning),
        user_signing: public(KeyRole::UserSigning),
    })
}

pub fn run_identity(global: &GlobalArgs, cmd: IdentityCommand) -> Result<ExitCode> {
    match cmd {
        IdentityCommand::Create {
            import_master,
            import_self_signing,
            import_user_signing,
            no_publish,
            auth,
        } => {
            let ctx = Ctx::open(global)?;
            let user = ctx.session.user_id.clone();
            let imports = [
                (KeyRole::Master, import_master),
                (KeyRole::SelfSigning, import_self_signing),
                (KeyRole::UserSigning, import_user_signing),
            ];
            for (role, import) in imports {
                match (ctx.store.find_key(&user, role), import) {
                    (Ok(k), None) => eprintln!(
                        "the token already holds the {role} key {} of {user}: using it",
                        k.public_key_base64()
                    ),
                    (Ok(_), Some(_)) => bail!(
                        "the token already holds a {role} key for {user}; delete it (mxhsm keys delete) before importing another"
                    ),
                    (Err(TokenError::KeyNotFound { .. }), None) => {
                        let k = ctx.store.generate(&user, role, &KeyOptions::default())?;
                        eprintln!(
                            "generated the {role} key {} on the token",
                            k.public_key_base64()
                        );
                    }
                    (Err(TokenError::KeyNotFound { .. }), Some(file)) => {
                        let k = ctx.store.import(
                            &user,
                            role,
                            read_secret(&file)?,
                            &KeyOptions::default(),
                        )?;
                        eprintln!(
                            "imported the {role} key {} onto the token",
                            k.public_key_base64()
                        );
                    }
                    (Err(e), _) => return Err(e.into()),
                }
            }
            if no_publish {
                println!("created; publish with `mxhsm identity publish`");
                return Ok(ExitCode::SUCCESS);
            }
            publish(global, &ctx, &auth)
        }
        IdentityCommand::Publish { auth } => {
            let ctx = Ctx::open(global)?;
            publish(global, &ctx, &auth)
        }
        IdentityCommand::Status { users } => {
            let ctx = Ctx::open(global)?;
            let me = ctx.session.user_id.clone();
            let own = own_keys(&*ctx.store, &me)?;
            let mut query: Vec<&str> = vec![&me];
            query.extend(users.iter().map(String::as_str));
            let answer = ctx.client.query_keys(&query)?;
            let report = cross_signing::evaluate(&own, &answer);
            print_report(global, &own, &report);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn publish(global: &GlobalArgs, ctx: &Ctx, auth: &PasswordArg) -> Result<ExitCode> {
    let user = ctx.session.user_id.as_str();
    let store: &dyn KeyStore = &*ctx.store;
    let mut current = store.current_keys(user)?;
    let mut take = |role| {
        current
            .remove(&role)
            .ok_or_else(|| TokenError::KeyNotFound {
                user_id: user.to_string(),
                role,
                token: store.summary().to_string(),
            })
    };
    let master = TokenSigner {
        store,
        key: take(KeyRole::Master)?,
    };
    let ssk = take(KeyRole::SelfSigning)?;
    let usk = take(KeyRole::UserSigning)?;
    let [master_obj, ssk_obj, usk_obj] = cross_signing::identity_objects(
        user,
        &master,
        &Ed25519PublicKey(ssk.public_key),
        &Ed25519PublicKey(usk.public_key),
    )?;
    let body = json!({
        "master_key": master_obj,
        "self_signing_key": ssk_obj,
        "user_signing_key": usk_obj,
    });
    let prompt = || {
        password(
            auth.password_file.as_deref(),
            &format!("Password for {user} (to replace the published keys)"),
        )
        .map_err(|e| mxhsm::homeserver::HomeserverError::Input(format!("{e:#}")))
    };
    ctx.client
        .upload_cross_signing_keys(user, &body, UiaAuth::Password(&prompt))
        .context("the identity was not published")?;
    // Cross-sign mxhsm's own device, so using mxhsm leaves no unverified session.
    let signer = TokenSigner { store, key: ssk };
    let failures = sign_own_devices(ctx, &signer, std::slice::from_ref(&ctx.session.device_id))?;
    report_failures(&failures)?;
    if global.json {
        output::json(&json!({
            "user_id": user,
            "master_key": master.key.public_key_base64(),
            "self_signing_key": signer.key.public_key_base64(),
            "user_signing_key": usk.public_key_base64(),
            "device_signed": ctx.session.device_id,
        }));
    } else {
        println!("published the cross-signing identity of {user}:");
        println!(
            "  master        {}",
            fingerprint(&Ed25519PublicKey(master.key.public_key))
        );
        println!("  self-signing  {}", signer.key.public_key_base64());
        println!("  user-signing  {}", usk.public_key_base64());
        println!("and cross-signed this device ({})", ctx.session.device_id);
    }
    Ok(ExitCode::SUCCESS)
}

/// Signs our devices `device_ids` with the SSK in one upload. Each device's own
/// self-signature is checked first: a device whose keys do not verify is never signed.
pub(super) fn sign_own_devices(
    ctx: &Ctx,
    ssk: &TokenSigner<'_>,
    device_ids: &[String],
) -> Result<Vec<SignatureFailure>> {
    let user = ctx.session.user_id.as_str();
    let answer = ctx.client.query_keys(&[user])?;
    let mut uploads = serde_json::Map::new();
    for id in device_ids {
        let device = answer
            .get("device_keys")
            .and_then(|d| d.get(user))
            .and_then(|d| d.get(id))
            .with_context(|| format!("the server knows no device {id} of {user}"))?;
        let own_id = format!("ed25519:{id}");
        let key = device
            .get("keys")
            .and_then(|k| k.get(&own_id))
            .and_then(Value::as_str)
            .and_then(|k| Ed25519PublicKey::from_base64(k).ok())
            .with_context(|| format!("device {id} has no Ed25519 key"))?;
        verify_json(device, user, &own_id, &key).with_context(|| {
            format!("device {id}'s own signature does not verify: refusing to sign it")
        })?;
        let mut object = without_signatures(device);
        sign_json(&mut object, user, &ssk.public_key().key_id(), ssk)?;
        uploads.insert(id.clone(), object);
    }
    Ok(ctx.client.upload_signatures(&json!({ user: uploads }))?)
}

pub(super) fn report_failures(failures: &[SignatureFailure]) -> Result<()> {
    if failures.is_empty() {
        return Ok(());
    }
    for f in failures {
        eprintln!(
            "the server refused the signature on {} {}: {} {}",
            f.user_id, f.key_id, f.errcode, f.message
        );
    }
    bail!("{} signature(s) refused by the server", failures.len())
}

fn device_rows(report: &TrustReport) -> Vec<Vec<String>> {
    report
        .devices
        .iter()
        .map(|d| {
            vec![
                d.user_id.clone(),
                d.device_id.clone(),
                d.display_name.clone().unwrap_or_default(),
                d.ed25519.as_ref().map(fingerprint).unwrap_or_default(),
                d.trust.as_str().to_string(),
                d.trust.reason().to_string(),
            ]
        })
        .collect()
}

fn print_report(global: &GlobalArgs, own: &OwnKeys, report: &TrustReport) {
    if global.json {
        output::json(&json!({
            "user_id": own.user_id,
            "master_key": own.master.to_base64(),
            "identity_ok": report.own_identity.is_empty(),
            "identity_problems": report.own_identity,
            "devices": report.devices.iter().map(|d| {
                json!({
                    "user_id": d.user_id, "device_id": d.device_id,
                    "display_name": d.display_name,
                    "ed25519": d.ed25519.map(|k| k.to_base64()),
                    "trust": d.trust.as_str(), "reason": d.trust.reason(),
                })
            }).collect::<Vec<_>>(),
            "users": report.users.iter().map(|u| {
                json!({
                    "user_id": u.user_id, "master_key": u.master_key.map(|k| k.to_base64()),
                    "trust": u.trust.as_str(), "reason": u.trust.reason(),
                })
            }).collect::<Vec<_>>(),
        }));
        return;
    }
    println!(
        "identity of {}: master key {}",
        own.user_id,
        fingerprint(&own.master)
    );
    if report.own_identity.is_empty() {
        println!("  published and consistent with the token");
    }
    for p in &report.own_identity {
        println!("  PROBLEM: {p}");
    }
    println!();
    output::table(
        &["USER", "DEVICE", "NAME", "ED25519", "TRUST", "WHY"],
        &device_rows(report),
    );
    if !report.users.is_empty() {
        println!();
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
}

pub fn run_sign(global: &GlobalArgs, cmd: SignCommand) -> Result<ExitCode> {
    let ctx = Ctx::open(global)?;
    let me = ctx.session.user_id.clone();
    let store: &dyn KeyStore = &*ctx.store;
    match cmd {
        SignCommand::Device { device_id, yes } => {
            let answer = ctx.client.query_keys(&[&me])?;
            let device = answer
                .get("device_keys")
                .and_then(|d| d.get(&me))
                .and_then(|d| d.get(&device_id))
                .with_context(|| format!("the server knows no device {device_id} of {me}"))?;
            let key = device
                .get("keys")
                .and_then(|k| k.get(format!("ed25519:{device_id}")))
                .and_then(Value::as_str)
                .and_then(|k| Ed25519PublicKey::from_base64(k).ok())
                .with_context(|| format!("device {device_id} has no Ed25519 key"))?;
            let name = device
                .get("unsigned")
                .and_then(|u| u.get("device_display_name"))
                .and_then(Value::as_str)
                .unwrap_or("");
            eprintln!(
                "device {device_id} \"{name}\" of {me}\n  Ed25519 fingerprint: {}",
                fingerprint(&key)
            );
            if !yes {
                confirm(
                    "Is this the fingerprint your device shows? Sign it with your self-signing key?",
                    "pass --yes",
                )?;
            }
            let ssk = TokenSigner {
                store,
                key: store.find_key(&me, KeyRole::SelfSigning)?,
            };
            let failures = sign_own_devices(&ctx, &ssk, std::slice::from_ref(&device_id))?;
            report_failures(&failures)?;
            done(
                global,
                json!({"signed_devices": [device_id]}),
                &format!("signed device {device_id}"),
            );
        }
        SignCommand::Devices {
            all_unsigned: _,
            yes,
        } => {
            let own = own_keys(store, &me)?;
            let answer = ctx.client.query_keys(&[&me])?;
            let report = cross_signing::evaluate(&own, &answer);
            if !report.own_identity.is_empty() {
                bail!(
                    "the published identity is not the token's ({}); run `mxhsm identity publish` first",
                    report.own_identity.join("; ")
                );
            }
            let unsigned: Vec<_> = report
                .devices
                .iter()
                .filter(|d| d.user_id == me && matches!(d.trust, Trust::Unsigned(_)))
                .collect();
            if unsigned.is_empty() {
                done(global, json!({"signed_devices": []}), "no unsigned devices");
                return Ok(ExitCode::SUCCESS);
            }
            eprintln!("{} unsigned device(s) of {me}:", unsigned.len());
            for d in &unsigned {
                eprintln!(
                    "  {}  \"{}\"  {}",
                    d.device_id,
                    d.display_name.as_deref().unwrap_or(""),
                    d.ed25519.as_ref().map(fingerprint).unwrap_or_default()
                );
            }
            if !yes {
                confirm("Sign all of them with your self-signing key?", "pass --yes")?;
            }
            let ids: Vec<String> = unsigned.iter().map(|d| d.device_id.clone()).collect();
            let ssk = TokenSigner {
                store,
                key: store.find_key(&me, KeyRole::SelfSigning)?,
            };
            let failures = sign_own_devices(&ctx, &ssk, &ids)?;
            report_failures(&failures)?;
            done(
                global,
                json!({"signed_devices": ids}),
                &format!("signed {} device(s): {}", ids.len(), ids.join(", ")),
            );
        }
        SignCommand::User {
            user_id,
            fingerprint: expected,
        } => {
            if user_id == me {
                bail!("{user_id} is you: sign your own devices with `mxhsm sign device`");
            }
            let answer = ctx.client.query_keys(&[&user_id])?;
            let object = answer
                .get("master_keys")
                .and_then(|m| m.get(&user_id))
                .with_context(|| {
                    format!("{user_id} has no cross-signing identity on the server")
                })?;
            let key = cross_signing::parse_key_object(object, &user_id, Usage::Master)
                .map_err(|e| anyhow::anyhow!("{user_id}'s master key is malformed: {e}"))?;
            eprintln!("master key of {user_id}: {}", fingerprint(&key));
            match expected {
                Some(f) => {
                    let given: String = f.chars().filter(|c| !c.is_whitespace()).collect();
                    if given.trim_end_matches('=') != key.to_base64() {
                        bail!(
                            "the master key of {user_id} is {}, not the fingerprint you gave: nothing signed",
                            key.to_base64()
                        );
                    }
                }
                None => confirm(
                    &format!(
                        "Did {user_id} confirm this fingerprint to you (in person or over a trusted channel)? Sign it with your user-signing key?"
                    ),
                    "pass the fingerprint you verified with --fingerprint",
                )?,
            }
            let usk = TokenSigner {
                store,
                key: store.find_key(&me, KeyRole::UserSigning)?,
            };
            let mut signed = without_signatures(object);
            sign_json(&mut signed, &me, &usk.public_key().key_id(), &usk)?;
            let failures = ctx
                .client
                .upload_signatures(&json!({ &user_id: { key.to_base64(): signed } }))?;
            report_failures(&failures)?;
            done(
                global,
                json!({"signed_user": user_id, "master_key": key.to_base64()}),
                &format!("signed the master key of {user_id}"),
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn done(global: &GlobalArgs, value: Value, human: &str) {
    if global.json {
        output::json(&value);
    } else {
        println!("{human}");
    }
}
