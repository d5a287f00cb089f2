//! The virtual YubiKey for the PIV backend's tests: pcscd and vpcd from Debian, and our
//! card (hsm-config/piv-card), built into ~/.cache/mxhsm-dev/piv-card (cargo rebuilds it when its source changes) and
//! started on the vpcd socket.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{APT_PACKAGES, Result, cargo, ensure_packages, root, run};

const VPCD_PORT: u16 = 35963;

/// Builds the card (and, with `check`, its check program) and returns the build directory.
pub fn build(cache: &Path, check: bool) -> Result<PathBuf> {
    let dir = cache.join("piv-card");
    let mut cmd = cargo();
    cmd.args(["build", "--release", "--locked", "--manifest-path"])
        .arg(root().join("hsm-config/piv-card/Cargo.toml"))
        .arg("--target-dir")
        .arg(&dir)
        .args(["--bin", "mxhsm-piv-card"])
        .env_remove("CARGO_TARGET_DIR");
    if check {
        cmd.args(["--example", "check"]);
    }
    run(&mut cmd)?;
    Ok(dir.join("release"))
}

fn pcscd_running() -> bool {
    Command::new("pidof")
        .arg("pcscd")
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Starts pcscd (it forks into the background) unless it runs already.
pub fn ensure_pcscd() -> Result {
    if !pcscd_running() {
        run(&mut Command::new("pcscd"))?;
    }
    Ok(())
}

/// pcscd (started if it is not running) and a fresh card; the card stops when dropped.
pub struct VirtualCard {
    child: Child,
    pub ca: PathBuf,
}

impl VirtualCard {
    pub fn start(bin_dir: &Path, state_dir: &Path) -> Result<VirtualCard> {
        ensure_pcscd()?;
        if state_dir.exists() {
            std::fs::remove_dir_all(state_dir).map_err(|e| e.to_string())?;
        }
        std::fs::create_dir_all(state_dir).map_err(|e| e.to_string())?;
        let ca = state_dir.join("ca.pem");
        let log = std::fs::File::create(state_dir.join("card.log")).map_err(|e| e.to_string())?;
        let child = Command::new(bin_dir.join("mxhsm-piv-card"))
            .arg("--attestation-ca")
            .arg(&ca)
            .arg("--port")
            .arg(VPCD_PORT.to_string())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start the virtual card: {e}"))?;
        let card = VirtualCard { child, ca };
        // The card writes its CA once it is up; pcscd sees it within a poll interval.
        let start = Instant::now();
        while !card.ca.exists() {
            if start.elapsed() > Duration::from_secs(30) {
                return Err(format!(
                    "the virtual card did not start; see {}",
                    state_dir.join("card.log").display()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(1500));
        Ok(card)
    }
}

impl Drop for VirtualCard {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

/// `cargo xtask piv-check`: installs the stack, starts a fresh card and runs its check
/// against the real `yubikey` crate through pcscd.
pub fn check(cache: &Path, target: &Path) -> Result {
    ensure_packages(APT_PACKAGES)?;
    let bin = build(cache, true)?;
    let card = VirtualCard::start(&bin, &target.join("piv-card"))?;
    run(Command::new(bin.join("examples/check")).arg(&card.ca))
}
