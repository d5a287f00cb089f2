//! The examples of `examples/` run against Synapse and SoftHSM: a bot signing its own new
//! device with the HSM, and a restore of one room's keys into memory.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::clients::verifies;
use common::synapse::MxhsmUser;
use common::{Kind, ok};

/// An example's binary (cargo builds the examples with the tests).
fn example(name: &str) -> Command {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_mxhsm"))
        .parent()
        .unwrap()
        .join("examples")
        .join(name);
    assert!(bin.exists(), "{} was not built", bin.display());
    Command::new(bin)
}

#[test]
fn a_bot_signs_its_new_device_with_the_hsm() {
    let bot = MxhsmUser::new(Kind::SoftHsm);
    bot.login();
    ok(bot.cli().args(["identity", "create"]));
    // A fresh login of the bot: a device with no keys yet.
    let access = bot.synapse.login(&bot.user, "BOTDEVICE");
    let dir = bot.token.dir.path();
    std::fs::write(dir.join("access"), &access).unwrap();
    let (var, conf) = bot.token.conf_env();
    let out = ok(example("bot_signs_its_device")
        .args([&bot.synapse.url, &bot.user.user_id])
        .arg(dir.join("access"))
        .arg(dir.join("bot-sessions"))
        .arg(&bot.token.uri)
        .env(var, conf)
        .env("MXHSM_PIN", common::USER_PIN));
    assert!(
        out.contains("device BOTDEVICE of") && out.contains("is cross-signed"),
        "{out}"
    );
    let checker = bot.synapse.login(&bot.user, "CHECKER");
    let q = bot.query(&checker, &bot.user.user_id);
    let device = &q["device_keys"][&bot.user.user_id]["BOTDEVICE"];
    assert!(
        verifies(device, &bot.user.user_id, &bot.token_key("self_signing")),
        "{device}"
    );
}

#[test]
fn one_rooms_keys_restored_into_memory() {
    let (u, version, public) = common::backups::with_backup(Kind::SoftHsm);
    let made = common::backups::put_sessions(&u, &version, &public, 60);
    let room = "!room3:localhost";
    let (var, conf) = u.token.conf_env();
    let out = ok(example("restore_room")
        .arg(u.session_path())
        .arg(&u.token.uri)
        .arg(room)
        .env(var, conf)
        .env("MXHSM_PIN", common::USER_PIN));
    let expected: Vec<&String> = made
        .keys()
        .filter(|(r, _)| r == room)
        .map(|(_, s)| s)
        .collect();
    assert!(
        out.contains(&format!(
            "{} session(s) of {room}, 0 failed",
            expected.len()
        )),
        "{out}"
    );
    for s in expected {
        assert!(out.contains(&format!("session {s}")), "{out}");
    }
    for key in made.values() {
        assert!(!out.contains(key.as_str()), "no key is printed");
    }
}
