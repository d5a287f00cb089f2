//! Test tokens: a fresh SoftHSM or Kryoptic token per test, each in its own directory.
//!
//! SoftHSM and Kryoptic read their configuration (`SOFTHSM2_CONF`, `KRYOPTIC_CONF`) once, in
//! `C_Initialize`, and a module can be initialised once per process. So each test token
//! gets its own copy of the module file (the dynamic loader then gives it separate state)
//! and its own configuration, set in the environment only while that copy initialises,
//! under a lock. The modules come from `cargo xtask test` (MXHSM_TEST_*_MODULE).
#![allow(dead_code)]

pub mod backups;
pub mod clients;
pub mod hostile;
pub mod json_doc;
pub mod peer;
pub mod piv;
pub mod sas_peer;
pub mod synapse;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use mxhsm::token::pkcs11::{Pkcs11Store, Pkcs11Uri, load_module};
use mxhsm::token::{PinProvider, PinRequest, TokenError};
use secrecy::SecretString;
use std::sync::atomic::{AtomicUsize, Ordering};
use tempfile::TempDir;

pub const USER_PIN: &str = "123456";
pub const SO_PIN: &str = "87654321";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    SoftHsm,
    Kryoptic,
    /// Kryoptic configured without any X25519 mechanism, like an HSM that has only
    /// Ed25519 (YubiHSM 2, NetHSM).
    KryopticNoX25519,
    /// The virtual YubiKey (PIV) of [`piv`].
    VirtualYubiKey,
}

pub struct TestToken {
    pub kind: Kind,
    pub dir: TempDir,
    pub module: PathBuf,
    pub label: String,
    /// `pkcs11:token=…?module-path=…` (no PIN source).
    pub uri: String,
    conf_var: &'static str,
    conf_value: PathBuf,
    /// For [`Kind::VirtualYubiKey`]: the card, stopped when the token is dropped.
    pub card: Option<piv::VirtualCard>,
}

static INIT_LOCK: Mutex<()> = Mutex::new(());

fn module_from_env(var: &str, default: Option<&str>) -> PathBuf {
    let p = std::env::var_os(var)
        .map(PathBuf::from)
        .or_else(|| default.map(PathBuf::from))
        .unwrap_or_else(|| panic!("{var} is not set: run the tests with `cargo xtask test`"));
    assert!(
        p.exists(),
        "{} ({var}) does not exist: run the tests with `cargo xtask test`",
        p.display()
    );
    p
}

pub fn spy_module() -> PathBuf {
    module_from_env(
        "MXHSM_TEST_SPY_MODULE",
        Some("/usr/lib/x86_64-linux-gnu/pkcs11-spy.so"),
    )
}

impl TestToken {
    pub fn new(kind: Kind) -> TestToken {
        Self::with_label(kind, "mxhsm-test")
    }

    pub fn with_label(kind: Kind, label: &str) -> TestToken {
        let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let dir = tempfile::Builder::new()
            .prefix("token-")
            .tempdir_in(base)
            .expect("temp dir");
        if kind == Kind::VirtualYubiKey {
            let card = piv::VirtualCard::start(dir.path());
            return TestToken {
                kind,
                module: PathBuf::new(),
                label: format!("YubiKey {}", card.serial),
                uri: String::new(),
                conf_var: "MXHSM_TEST_UNUSED",
                conf_value: dir.path().to_path_buf(),
                dir,
                card: Some(card),
            };
        }
        let (source, file) = match kind {
            Kind::VirtualYubiKey => unreachable!(),
            Kind::SoftHsm => (
                module_from_env(
                    "MXHSM_TEST_SOFTHSM_MODULE",
                    Some("/usr/lib/softhsm/libsofthsm2.so"),
                ),
                "libsofthsm2.so",
            ),
            Kind::Kryoptic | Kind::KryopticNoX25519 => (
                module_from_env("MXHSM_TEST_KRYOPTIC_MODULE", None),
                "libkryoptic.so",
            ),
        };
        let module = dir.path().join(file);
        std::fs::copy(&source, &module).expect("copy module");
        let (conf_var, conf_value) = match kind {
            Kind::SoftHsm => {
                let tokens = dir.path().join("tokens");
                std::fs::create_dir(&tokens).unwrap();
                let conf = dir.path().join("softhsm2.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                        tokens.display()
                    ),
                )
                .unwrap();
                ("SOFTHSM2_CONF", conf)
            }
            Kind::Kryoptic => ("KRYOPTIC_CONF", dir.path().join("token.sql")),
            Kind::KryopticNoX25519 => {
                let conf = dir.path().join("kryoptic.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "[[slots]]\nslot = 1\ndbtype = \"sqlite\"\ndbargs = \"{}\"\nmechanisms = [\"DENY\", \"CKM_EC_MONTGOMERY_KEY_PAIR_GEN\", \"CKM_ECDH1_DERIVE\"]\n",
                        dir.path().join("token.sql").display()
                    ),
                )
                .unwrap();
                ("KRYOPTIC_CONF", conf)
            }
            Kind::VirtualYubiKey => unreachable!(),
        };
        let token = TestToken {
            kind,
            module: module.clone(),
            label: label.to_string(),
            uri: format!("pkcs11:token={label}?module-path={}", module.display()),
            dir,
            conf_var,
            conf_value,
            card: None,
        };
        token.initialise();
        token
    }

    /// Loads this token's module copy with its configuration and initialises the token.
    fn initialise(&self) {
        let _guard = INIT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the variable is read by the module's C_Initialize below, under the lock
        // that every test token takes; no other code of ours reads it.
        unsafe { std::env::set_var(self.conf_var, &self.conf_value) };
        let ctx = load_module(&self.module).expect("load module");
        unsafe { std::env::remove_var(self.conf_var) };
        let slot = ctx
            .get_all_slots()
            .unwrap()
            .into_iter()
            .find(|s| {
                ctx.get_token_info(*s)
                    .map(|t| !t.token_initialized())
                    .unwrap_or(false)
            })
            .expect("a slot with an uninitialised token");
        ctx.init_token(slot, &AuthPin::new(SO_PIN.into()), &self.label)
            .expect("C_InitToken");
        // SoftHSM moves the new token to another slot: find it by label.
        let slot = ctx
            .get_slots_with_initialized_token()
            .unwrap()
            .into_iter()
            .find(|s| ctx.get_token_info(*s).unwrap().label() == self.label)
            .expect("the new token");
        let session = ctx.open_rw_session(slot).unwrap();
        session
            .login(UserType::So, Some(&AuthPin::new(SO_PIN.into())))
            .unwrap();
        session.init_pin(&AuthPin::new(USER_PIN.into())).unwrap();
        session.logout().unwrap();
    }

    /// A read-write cryptoki session on this token, logged in as the user, for checks that
    /// bypass mxhsm (the module is loaded in this process).
    pub fn raw_session(&self) -> cryptoki::session::Session {
        let ctx = load_module(&self.module).unwrap();
        let slot = ctx
            .get_slots_with_initialized_token()
            .unwrap()
            .into_iter()
            .find(|s| ctx.get_token_info(*s).unwrap().label() == self.label)
            .unwrap();
        let session = ctx.open_rw_session(slot).unwrap();
        session
            .login(UserType::User, Some(&AuthPin::new(USER_PIN.into())))
            .unwrap();
        session
    }

    pub fn parsed_uri(&self) -> Pkcs11Uri {
        Pkcs11Uri::parse(&self.uri).unwrap()
    }

    /// Opens the token in this process with the right PIN.
    pub fn open(&self) -> Pkcs11Store {
        Pkcs11Store::open(&self.parsed_uri(), &fixed_pin(USER_PIN)).expect("open token")
    }

    /// The serial of the virtual YubiKey.
    pub fn serial(&self) -> u32 {
        self.card.as_ref().expect("a virtual YubiKey").serial
    }

    /// Opens the virtual YubiKey in this process with the right PIN.
    pub fn open_yubikey(&self) -> mxhsm::token::yubikey::YubiKeyStore {
        self.open_yubikey_with(&fixed_pin(USER_PIN))
            .expect("open the YubiKey")
    }

    pub fn open_yubikey_with(
        &self,
        pins: &dyn PinProvider,
    ) -> Result<mxhsm::token::yubikey::YubiKeyStore, TokenError> {
        mxhsm::token::yubikey::YubiKeyStore::open(
            mxhsm::token::yubikey::YubiKeyOptions {
                serial: Some(self.serial()),
                slot_map: Some(self.slot_map()),
                ..Default::default()
            },
            pins,
        )
    }

    /// Where the CLI keeps this YubiKey's slot map.
    pub fn slot_map(&self) -> PathBuf {
        self.dir
            .path()
            .join(format!("config/mxhsm/yubikey-{}.json", self.serial()))
    }

    /// The mxhsm binary, set up to use this token with the right PIN.
    pub fn cli(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_mxhsm"));
        // The audit log, sessions and watch states of this token's tests stay beside it.
        c.env("XDG_DATA_HOME", self.dir.path().join("data"));
        if self.kind == Kind::VirtualYubiKey {
            c.env("MXHSM_YUBIKEY", self.serial().to_string())
                .env("XDG_CONFIG_HOME", self.dir.path().join("config"))
                .env("MXHSM_PIN", USER_PIN)
                .env_remove("MXHSM_TOKEN")
                .env_remove("MXHSM_PKCS11_MODULE");
            return c;
        }
        c.env(self.conf_var, &self.conf_value)
            .env("MXHSM_TOKEN", &self.uri)
            .env("MXHSM_PIN", USER_PIN)
            .env_remove("MXHSM_YUBIKEY")
            .env_remove("MXHSM_PKCS11_MODULE");
        c
    }

    pub fn conf_env(&self) -> (&'static str, &Path) {
        (self.conf_var, &self.conf_value)
    }
}

/// A PIN provider that always answers `pin` and counts how often it was asked.
pub struct FixedPin {
    pin: String,
    pub asked: AtomicUsize,
}

impl PinProvider for FixedPin {
    fn pin(&self, _request: &PinRequest) -> Result<SecretString, TokenError> {
        self.asked.fetch_add(1, Ordering::SeqCst);
        Ok(SecretString::from(self.pin.clone()))
    }
}

pub fn fixed_pin(pin: &str) -> FixedPin {
    FixedPin {
        pin: pin.to_string(),
        asked: AtomicUsize::new(0),
    }
}

/// Runs a command, returning (success, stdout, stderr).
pub fn output(cmd: &mut Command) -> (bool, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().expect("run mxhsm");
    (
        status.success(),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

/// Runs a command; returns (exit code, stdout, stderr).
pub fn run(cmd: &mut Command) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().expect("run mxhsm");
    (
        status.code().unwrap_or(-1),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

/// Runs a command that must exit with `code`; returns stdout.
pub fn exits(code: i32, cmd: &mut Command) -> String {
    let (got, out, err) = run(cmd);
    assert_eq!(
        got, code,
        "exit code of {cmd:?}\nstdout:\n{out}\nstderr:\n{err}"
    );
    out
}

/// Runs a command that must exit with `code`; returns stderr.
pub fn exits_err(code: i32, cmd: &mut Command) -> String {
    let (got, out, err) = run(cmd);
    assert_eq!(
        got, code,
        "exit code of {cmd:?}\nstdout:\n{out}\nstderr:\n{err}"
    );
    err
}

/// Runs a command that must succeed; returns stdout.
pub fn ok(cmd: &mut Command) -> String {
    let (success, out, err) = output(cmd);
    assert!(
        success,
        "command failed: {cmd:?}\nstdout:\n{out}\nstderr:\n{err}"
    );
    out
}

/// Runs a command that must fail; returns stderr.
pub fn fails(cmd: &mut Command) -> String {
    let (success, out, err) = output(cmd);
    assert!(!success, "command succeeded: {cmd:?}\nstdout:\n{out}");
    err
}

/// Generates one test per token kind from a function taking a `Kind`: SoftHSM, Kryoptic
/// and the virtual YubiKey.
#[macro_export]
macro_rules! per_token {
    ($($name:ident),* $(,)?) => {
        $crate::per_pkcs11_token!($($name),*);
        mod yubikey {
            $( #[test] fn $name() { super::$name($crate::common::Kind::VirtualYubiKey) } )*
        }
    };
}

/// One test per PKCS#11 token kind (SoftHSM, Kryoptic).
#[macro_export]
macro_rules! per_pkcs11_token {
    ($($name:ident),* $(,)?) => {
        mod softhsm {
            $( #[test] fn $name() { super::$name($crate::common::Kind::SoftHsm) } )*
        }
        mod kryoptic {
            $( #[test] fn $name() { super::$name($crate::common::Kind::Kryoptic) } )*
        }
    };
}

/// Runs `cmd` in a real terminal (a tmux pane `width` columns wide) and returns what the
/// screen shows once it is done: as text, and with its escape sequences (colours).
pub fn in_terminal(cmd: &Command, width: u16, dir: &Path) -> (String, String) {
    let (_, text, escapes) = terminal(cmd, width, dir);
    (text, escapes)
}

/// [`in_terminal`], with every different screen seen while the command ran (as text, in
/// order, polled every 50 ms): what a progress bar or spinner showed before it was cleared.
pub fn terminal_frames(cmd: &Command, width: u16, dir: &Path) -> Vec<String> {
    terminal(cmd, width, dir).0
}

fn terminal(cmd: &Command, width: u16, dir: &Path) -> (Vec<String>, String, String) {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let session = format!("mxhsm-{}-{n}", std::process::id());
    let script = dir.join(format!("terminal-{n}.sh"));
    std::fs::write(&script, format!("{cmd:?}\necho __done__\nsleep 60\n")).unwrap();
    let tmux = |args: &[&str]| Command::new("tmux").args(args).output().unwrap();
    let started = tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        &width.to_string(),
        "-y",
        "200",
        "sh",
        script.to_str().unwrap(),
    ]);
    assert!(started.status.success(), "{started:?}");
    let capture = |escapes: bool| {
        let mut args = vec!["capture-pane", "-p", "-t", &session];
        if escapes {
            args.push("-e");
        }
        String::from_utf8_lossy(&tmux(&args).stdout).into_owned()
    };
    let start = std::time::Instant::now();
    let mut frames: Vec<String> = Vec::new();
    loop {
        let frame = capture(false);
        let done = frame.contains("__done__");
        if frames.last() != Some(&frame) {
            frames.push(frame);
        }
        if done || start.elapsed() > std::time::Duration::from_secs(30) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let shown = (capture(false), capture(true));
    let _ = tmux(&["kill-session", "-t", &session]);
    let cut = |s: String| {
        s.lines()
            .take_while(|l| *l != "__done__")
            .collect::<Vec<_>>()
            .join("\n")
    };
    (frames, cut(shown.0), cut(shown.1))
}
