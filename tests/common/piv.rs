//! The virtual YubiKey for tests: our card process (hsm-config/piv-card) on the vpcd
//! socket of Debian's `vsmartcard-vpcd`, through a real pcscd.
//!
//! vpcd gives one reader, so one card exists at a time: a test holds the card lock for
//! as long as its card lives, and each card is fresh (new serial, factory PIN, PUK and
//! management key, no keys). `cargo xtask test` builds the card, starts pcscd and sets
//! MXHSM_TEST_PIV_CARD.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

static CARD_LOCK: Mutex<()> = Mutex::new(());
static NEXT: AtomicU32 = AtomicU32::new(0);

/// The card's factory PIN, PUK and management key.
pub const PIN: &str = "123456";
pub const PUK: &str = "12345678";
pub const MGM_KEY_HEX: &str = "010203040506070801020304050607080102030405060708";

pub struct VirtualCard {
    child: Child,
    pub serial: u32,
    /// The card's attestation CA certificate (PEM).
    pub ca: PathBuf,
    _guard: MutexGuard<'static, ()>,
}

fn card_binary() -> PathBuf {
    let p = std::env::var_os("MXHSM_TEST_PIV_CARD")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default();
            home.join(".cache/mxhsm-dev/piv-card/release/mxhsm-piv-card")
        });
    assert!(
        p.exists(),
        "the virtual PIV card {} does not exist: run the tests with `cargo xtask test`",
        p.display()
    );
    p
}

fn ensure_pcscd() {
    let running = Command::new("pidof")
        .arg("pcscd")
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !running {
        let status = Command::new("pcscd")
            .status()
            .expect("start pcscd (apt install pcscd vsmartcard-vpcd)");
        assert!(status.success(), "pcscd did not start");
    }
}

impl VirtualCard {
    /// Starts a fresh card and waits until PC/SC sees it.
    pub fn start(dir: &Path) -> VirtualCard {
        let guard = CARD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        ensure_pcscd();
        let serial =
            30_000_000 + (std::process::id() % 10_000) * 100 + NEXT.fetch_add(1, Ordering::SeqCst);
        let ca = dir.join("card-ca.pem");
        let log = std::fs::File::create(dir.join("card.log")).unwrap();
        let child = Command::new(card_binary())
            .arg("--serial")
            .arg(serial.to_string())
            .arg("--attestation-ca")
            .arg(&ca)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start the virtual card");
        let card = VirtualCard {
            child,
            serial,
            ca,
            _guard: guard,
        };
        let start = Instant::now();
        loop {
            if let Ok(keys) = mxhsm::token::yubikey::list_yubikeys()
                && keys.iter().any(|k| k.serial == serial)
            {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the virtual card {serial} did not appear in PC/SC; see {}",
                dir.join("card.log").display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        card
    }
}

/// A second card on vpcd's second reader (port 35964), for as long as it lives. Start it
/// only while holding a [`VirtualCard`] (which holds the card lock).
pub struct SecondCard {
    child: Child,
    serial: u32,
}

impl SecondCard {
    pub fn start(_first: &VirtualCard, dir: &Path, serial: u32) -> SecondCard {
        let log = std::fs::File::create(dir.join("card2.log")).unwrap();
        let child = Command::new(card_binary())
            .args(["--port", "35964", "--serial", &serial.to_string()])
            .arg("--attestation-ca")
            .arg(dir.join("card2-ca.pem"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start the second virtual card");
        let start = Instant::now();
        while !mxhsm::token::yubikey::list_yubikeys()
            .map(|k| k.iter().any(|k| k.serial == serial))
            .unwrap_or(false)
        {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the second card did not appear"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        SecondCard { child, serial }
    }
}

impl Drop for SecondCard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10)
            && mxhsm::token::yubikey::list_yubikeys()
                .map(|k| k.iter().any(|k| k.serial == self.serial))
                .unwrap_or(false)
        {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for VirtualCard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Wait until PC/SC no longer sees it, so the next card is the only one.
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            match mxhsm::token::yubikey::list_yubikeys() {
                Ok(keys) if keys.iter().any(|k| k.serial == self.serial) => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                _ => break,
            }
        }
    }
}
