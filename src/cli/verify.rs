//! `mxhsm verify --wait | device ID | user @bob`: emoji verification answered by the token.

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use mxhsm::account::AccountError;
use mxhsm::account::verify::{self, Outcome, Progress, Target, VerifyUi};
use mxhsm::matrix::sas::ShortAuthString;
use serde_json::json;

use super::output::{esc, fingerprint, note, say};
use super::{GlobalArgs, open_account};

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(subcommand)]
    what: Option<VerifyCommand>,
    /// Wait for a verification request from one of your own devices (Element's "Verify
    /// with another device") and answer it.
    #[arg(long)]
    wait: bool,
    /// Give up (and cancel) after this many seconds.
    #[arg(long, global = true, default_value_t = 300, value_name = "SECONDS")]
    timeout: u64,
}

#[derive(Debug, Subcommand)]
enum VerifyCommand {
    /// Start a verification with one of your own devices; on a match, it is signed with
    /// the self-signing key on the token.
    Device { device_id: String },
    /// Verify another user with one of their devices; on a match, their master key is
    /// signed with the user-signing key on the token.
    User { user_id: String },
}

/// Shows progress and asks the question: on the terminal, or (with `--json`) as JSON
/// lines, reading the answer as one line on standard input (`yes` or `no`).
pub(super) struct Cli {
    pub(super) json: bool,
}

impl Cli {
    fn event(&self, v: serde_json::Value) {
        super::output::json_line(v);
    }
}

impl VerifyUi for Cli {
    fn progress(&mut self, p: Progress) {
        match p {
            Progress::Request { user_id, device_id } => {
                if self.json {
                    self.event(
                        json!({"event": "request", "user_id": user_id, "device_id": device_id}),
                    );
                } else {
                    note!(
                        "verification with {} device {}",
                        esc(&user_id),
                        esc(&device_id)
                    );
                }
            }
            Progress::Ready { user_id, device_id } => {
                if self.json {
                    self.event(
                        json!({"event": "ready", "user_id": user_id, "device_id": device_id}),
                    );
                } else {
                    note!("{} device {} is ready", esc(&user_id), esc(&device_id));
                }
            }
            Progress::SecretRequest { device_id, name } => {
                if self.json {
                    self.event(json!({"event": "secret_request", "device_id": device_id, "name": name, "shared": false}));
                } else {
                    note!(
                        "device {} asked for the secret {}: not shared (mxhsm holds no raw key; the keys stay on the token)",
                        esc(&device_id),
                        esc(&name)
                    );
                }
            }
        }
    }

    fn confirm(
        &mut self,
        user_id: &str,
        device_id: &str,
        sas: &ShortAuthString,
    ) -> Result<bool, AccountError> {
        let emoji = sas.emoji();
        let (a, b, c) = sas.decimals;
        if self.json {
            self.event(json!({
                "event": "sas", "user_id": user_id, "device_id": device_id,
                "emoji": emoji.iter().map(|(e, n)| json!([e, n])).collect::<Vec<_>>(),
                "decimals": [a, b, c],
            }));
        } else {
            say!(
                "Compare with what {} device {} shows:",
                esc(user_id),
                esc(device_id)
            );
            say!(
                "  {}",
                emoji
                    .iter()
                    .map(|(e, _)| format!("{e:^12}"))
                    .collect::<String>()
            );
            say!(
                "  {}",
                emoji
                    .iter()
                    .map(|(_, n)| format!("{n:^12}"))
                    .collect::<String>()
            );
            say!("  or the numbers {a} {b} {c}");
            eprint!("Do they match? [y/N] ");
            std::io::stderr().flush().ok();
        }
        let mut answer = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut answer)
            .map_err(|e| AccountError::Input(format!("cannot read the answer: {e}")))?;
        let yes = matches!(answer.trim(), "y" | "Y" | "yes");
        if self.json {
            self.event(json!({"event": if yes { "confirmed" } else { "mismatch" }}));
        }
        Ok(yes)
    }
}

pub fn run(global: &GlobalArgs, args: VerifyArgs) -> Result<ExitCode> {
    let target = match (args.what, args.wait) {
        (Some(_), true) => {
            bail!("--wait answers a request; `device` and `user` start one: not both")
        }
        (Some(VerifyCommand::Device { device_id }), false) => Target::OwnDevice(device_id),
        (Some(VerifyCommand::User { user_id }), false) => Target::User(user_id),
        (None, true) => Target::Wait,
        (None, false) => bail!("say what to verify: --wait, `device ID` or `user @user:server`"),
    };
    // The answer comes from a person at a terminal, or from the program reading --json.
    if !global.json && !std::io::stdin().is_terminal() {
        bail!(
            "verification needs a terminal to ask whether the emoji match (or --json, answering on standard input)"
        );
    }
    let account = open_account(global)?;
    let mut ui = Cli { json: global.json };
    let outcome = verify::verify(
        &account,
        &target,
        &mut ui,
        Duration::from_secs(args.timeout),
    )?;
    Ok(finish(global, &account, &ui, outcome))
}

/// Says how a verification ended, remembers a verified user for `mxhsm watch`, and
/// returns the exit code (0 signed, 3 cancelled).
pub(super) fn finish(
    global: &GlobalArgs,
    account: &mxhsm::account::Account,
    ui: &Cli,
    outcome: Outcome,
) -> ExitCode {
    match outcome {
        Outcome::Signed {
            user_id,
            device_id,
            key,
            role,
        } => {
            if global.json {
                ui.event(json!({
                    "event": "signed", "user_id": user_id, "device_id": device_id,
                    "key": key.to_base64(), "signed_with": role.as_str(),
                }));
            } else if user_id == account.user_id() {
                say!(
                    "verified and signed device {} ({}) with the self-signing key on the token",
                    esc(&device_id),
                    fingerprint(&key)
                );
            } else {
                say!(
                    "verified {} and signed their master key {} with the user-signing key on the token",
                    esc(&user_id),
                    fingerprint(&key)
                );
            }
            if user_id != account.user_id()
                && let Err(e) = mxhsm::account::watch::remember_verified(
                    &mxhsm::account::watch::default_state_path(account.user_id()),
                    account,
                    &user_id,
                    &key,
                )
            {
                note!("warning: `mxhsm watch` will not know of this verification: {e}");
            }
            ExitCode::SUCCESS
        }
        Outcome::Cancelled {
            code,
            reason,
            by_us,
        } => {
            if global.json {
                ui.event(
                    json!({"event": "cancelled", "code": code, "reason": reason, "by_us": by_us}),
                );
            } else {
                note!(
                    "verification cancelled {} ({}: {}); nothing was signed",
                    if by_us {
                        "by mxhsm"
                    } else {
                        "by the other device"
                    },
                    esc(&code),
                    esc(&reason)
                );
            }
            ExitCode::from(super::exit::PROBLEM)
        }
    }
}

/// Verification asks a person at a terminal, or the program reading `--json`.
pub(super) fn can_ask(global: &GlobalArgs) -> Result<()> {
    if !global.json && !std::io::stdin().is_terminal() {
        bail!(
            "verification needs a terminal to ask whether the emoji match (or --json, answering on standard input)"
        );
    }
    Ok(())
}
