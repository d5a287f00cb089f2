//! `mxhsm watch [--once] [--exec CMD]`: alarms when some client undoes the hardware
//! identity, one line (or JSON line) per event.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command as Process, ExitCode, Stdio};

use anyhow::{Context, Result};
use clap::Args;
use mxhsm::account::watch::{self, Class, Event, Step, WatchState, Watcher};

use super::output::{esc, fingerprint, note, say};
use super::{GlobalArgs, open_account};

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Check once and exit with the code of the loudest alarm (see the README), for cron
    /// and monitoring. Without it, mxhsm keeps watching and reports each event once.
    #[arg(long)]
    once: bool,
    /// Run this shell command for each event, with the event's JSON on its standard input
    /// and its name in $MXHSM_EVENT (server-chosen text never becomes part of the command).
    #[arg(long, value_name = "CMD")]
    exec: Option<String>,
    /// Where the watch remembers what it saw (default: beside the session).
    #[arg(long, value_name = "FILE")]
    state: Option<PathBuf>,
    /// Answer verification requests from your new logins while watching (emoji compared
    /// here, as with `mxhsm verify --wait`). Without it, a request is reported.
    #[arg(long, conflicts_with = "once")]
    verify: bool,
}

/// The exit code of `watch --once` for the loudest class of event (also in the README).
pub fn exit_code(class: Class) -> u8 {
    match class {
        Class::IdentityReset => 10,
        Class::VerificationViolation => 11,
        Class::Backup => 12,
        Class::UnsignedDevice => 13,
        Class::SecretStorageCopy => 14,
    }
}

/// `watch --once` for several accounts: each account's events, marked with its user ID,
/// and the exit code of the loudest alarm of all (1 when an account could not be checked
/// and none raised an alarm).
fn once_for_each(global: &GlobalArgs, args: &WatchArgs) -> Result<ExitCode> {
    if args.state.is_some() {
        anyhow::bail!("--state is one account's file; with several accounts each has its own");
    }
    let results = super::for_each_account(global, |account| {
        let path = watch::default_state_path(account.user_id());
        let mut state = WatchState::load(&path, account)?;
        let events = watch::check(account, &mut state)?;
        state.save(&path)?;
        for e in &events {
            report(global, args, e, Some(account.user_id()));
        }
        Ok(events.iter().map(Event::class).min())
    })?;
    let mut failed = false;
    let mut loudest = None;
    for r in results {
        match r.result {
            Ok(c) => loudest = loudest.into_iter().chain(c).min(),
            Err(e) => {
                failed = true;
                note!("{}: error: {e:#}", esc(&r.user_id));
            }
        }
    }
    Ok(match (loudest, failed) {
        (Some(c), _) => ExitCode::from(exit_code(c)),
        (None, true) => ExitCode::FAILURE,
        (None, false) => ExitCode::SUCCESS,
    })
}

pub fn run(global: &GlobalArgs, args: WatchArgs) -> Result<ExitCode> {
    if super::is_bulk(global) {
        if !args.once {
            anyhow::bail!(
                "watching several accounts needs --once (run one `mxhsm watch` per account to keep watching)"
            );
        }
        return once_for_each(global, &args);
    }
    let account = open_account(global)?;
    let state_path = args
        .state
        .clone()
        .unwrap_or_else(|| watch::default_state_path(account.user_id()));
    if args.once {
        let mut state = WatchState::load(&state_path, &account)?;
        let events = watch::check(&account, &mut state)?;
        state.save(&state_path)?;
        for e in &events {
            report(global, &args, e, None);
        }
        return Ok(match events.iter().map(Event::class).min() {
            None => ExitCode::SUCCESS,
            Some(c) => ExitCode::from(exit_code(c)),
        });
    }
    if args.verify {
        super::verify::can_ask(global)?;
    }
    let mut watcher = Watcher::new(&account, &state_path)?;
    if !global.json {
        note!(
            "watching {} (device {}); Ctrl-C stops",
            esc(account.user_id()),
            esc(account.device_id())
        );
    }
    let mut failures = 0u32;
    loop {
        match watcher.step(failures) {
            Step::Events(events) => {
                failures = 0;
                for e in &events {
                    report(global, &args, e, None);
                }
                for request in watcher.take_requests() {
                    answer(global, &args, &account, &mut watcher, &request)?;
                }
            }
            Step::Unreachable { error, retry_in } => {
                failures += 1;
                note!(
                    "the server cannot be reached ({}); trying again in {} s",
                    esc(&error.to_string()),
                    retry_in.as_secs()
                );
                std::thread::sleep(retry_in);
            }
        }
    }
}

/// A verification request a sync brought: answered (`--verify`), or reported.
fn answer(
    global: &GlobalArgs,
    args: &WatchArgs,
    account: &mxhsm::account::Account,
    watcher: &mut Watcher<'_>,
    request: &serde_json::Value,
) -> Result<()> {
    let device = request
        .pointer("/content/from_device")
        .and_then(serde_json::Value::as_str)
        .unwrap_or("?");
    if !args.verify {
        if global.json {
            super::output::json_line(
                serde_json::json!({"event": "verification_request", "device_id": device}),
            );
        } else {
            say!(
                "verification request from your device {}: run `mxhsm watch --verify` to answer such requests here",
                esc(device)
            );
        }
        return Ok(());
    }
    let mut ui = super::verify::Cli { json: global.json };
    let (outcome, since) = mxhsm::account::verify::answer(
        account,
        request,
        watcher.since(),
        &mut ui,
        std::time::Duration::from_secs(300),
    )?;
    super::verify::finish(global, account, &ui, outcome);
    watcher.set_since(since)?;
    Ok(())
}

/// Prints `e` (a line, or a JSON line) and runs the hook. With several accounts, `user`
/// marks whose event it is.
fn report(global: &GlobalArgs, args: &WatchArgs, e: &Event, user: Option<&str>) {
    let mut v = super::output::document(e.to_json());
    if let (Some(u), Some(o)) = (user, v.as_object_mut()) {
        o.insert("account".into(), u.into());
    }
    if global.json {
        super::output::json_line(v.clone());
    } else {
        match user {
            Some(u) => say!("{}: {}", esc(u), describe(e)),
            None => say!("{}", describe(e)),
        }
    }
    if let Some(cmd) = &args.exec
        && let Err(err) = hook(cmd, e.kind(), &v)
    {
        note!("the --exec command failed for {}: {err:#}", e.kind());
    }
}

/// Runs `sh -c CMD` with the event on standard input. The command line is the user's own;
/// the event reaches it only as data.
fn hook(cmd: &str, kind: &str, event: &serde_json::Value) -> Result<()> {
    let mut child = Process::new("/bin/sh")
        .args(["-c", cmd])
        .env("MXHSM_EVENT", kind)
        .stdin(Stdio::piped())
        .spawn()
        .context("cannot start /bin/sh")?;
    if let Some(mut stdin) = child.stdin.take() {
        let mut line = mxhsm::text::json_string(event, false);
        line.push('\n');
        // A command that does not read its input is not an error.
        let _ = stdin.write_all(line.as_bytes());
    }
    let status = child.wait().context("waiting for the command")?;
    anyhow::ensure!(status.success(), "it exited with {status}");
    Ok(())
}

/// One line for a human; untrusted text escaped.
fn describe(e: &Event) -> String {
    let fp = |k: &Option<mxhsm::Ed25519PublicKey>| {
        k.as_ref().map(fingerprint).unwrap_or_else(|| "none".into())
    };
    match e {
        Event::IdentityReset { token, published } => format!(
            "ALARM identity reset: the server publishes the master key {} instead of the token's {}. Some client reset your cross-signing identity; your devices and contacts now see a new identity. To take it back, run `mxhsm identity publish --replace` (it lists what is lost and asks first; on Synapse, which cannot take back a key it stored before, add --new-keys), then check who verified the other key.",
            fp(published),
            fingerprint(token)
        ),
        Event::IdentityChanged { problems } => format!(
            "ALARM identity changed: {} (`mxhsm identity status` shows it; `mxhsm identity publish` publishes the token's keys)",
            esc(&problems.join("; "))
        ),
        Event::VerifiedUserChanged {
            user_id,
            verified,
            now,
        } => format!(
            "ALARM verification violation: {} now publishes the master key {}, not the {} you verified; verify them again before trusting it",
            esc(user_id),
            fp(now),
            fingerprint(verified)
        ),
        Event::BackupChanged { previous, current } => match current {
            Some(v) => format!(
                "backup changed: version {} replaced version {} (`mxhsm backup status` judges it)",
                esc(v),
                esc(previous)
            ),
            None => format!(
                "backup changed: version {} was deleted and there is none now (`mxhsm backup create` makes one)",
                esc(previous)
            ),
        },
        Event::BackupUntrusted { version, reason } => format!(
            "backup untrusted: the auth_data of version {} is not signed by your master key ({})",
            esc(version),
            esc(&reason.to_string())
        ),
        Event::BackupNotTokenKey {
            version,
            key,
            token,
        } => format!(
            "backup not the token's: version {} is encrypted to {}, not to the token's backup key {}",
            esc(version),
            key.map(|k| k.to_base64()).unwrap_or_else(|| "?".into()),
            token.to_base64()
        ),
        Event::UnsignedDevice {
            device_id,
            display_name,
            ed25519,
            reason,
        } => format!(
            "unsigned device {} ({}), fingerprint {}: {}; if it is yours, compare the fingerprint and run `mxhsm sign device {}`",
            esc(device_id),
            esc(display_name.as_deref().unwrap_or("no name")),
            fp(ed25519),
            esc(reason),
            esc(device_id)
        ),
        Event::SecretStorageCopy { secret, role } => format!(
            "secret storage holds a copy: {secret} (your {role} key, which is on the token) is in secret storage too; anyone with your recovery key can use it without the token"
        ),
    }
}
