//! A pinned Synapse from PyPI in a venv kept outside the clone
//! (`~/.cache/mxhsm-dev/synapse-<version>`), for the end-to-end tests and the demo.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Result, run};

pub const VERSION: &str = "1.163.2";

fn python_ok(python: &Path) -> bool {
    Command::new(python)
        .args([
            "-c",
            &format!("import synapse, sys; sys.exit(synapse.__version__ != '{VERSION}')"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// The venv's python, installing Synapse first if the cache does not have it. The venv is
/// built in a temporary directory and renamed into place, so a broken install is never
/// reused.
pub fn ensure_venv(cache: &Path) -> Result<PathBuf> {
    let dir = cache.join(format!("synapse-{VERSION}"));
    let python = dir.join("bin/python");
    if python_ok(&python) {
        return Ok(python);
    }
    let tmp = cache.join(format!("synapse-{VERSION}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| e.to_string())?;
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| e.to_string())?;
    }
    std::fs::create_dir_all(cache).map_err(|e| e.to_string())?;
    run(Command::new("python3").arg("-m").arg("venv").arg(&tmp))?;
    let pip = tmp.join("bin/pip");
    run(Command::new(&pip).args(["install", "-q", "--upgrade", "pip"]))?;
    run(Command::new(&pip).args(["install", "-q", &format!("matrix-synapse=={VERSION}")]))?;
    // A venv records its own path in scripts; ours run `python -m`, which does not care.
    std::fs::rename(&tmp, &dir).map_err(|e| e.to_string())?;
    if !python_ok(&python) {
        return Err(format!(
            "Synapse {VERSION} does not import from {}",
            dir.display()
        ));
    }
    Ok(python)
}

/// A Synapse started for the demo; stopped (by its PID) when dropped.
pub struct Server {
    child: Child,
    pub url: String,
}

impl Server {
    /// Starts a fresh Synapse with its data in `data`, on a free loopback port.
    pub fn start(python: &Path, data: &Path) -> Result<Server> {
        if data.exists() {
            std::fs::remove_dir_all(data).map_err(|e| e.to_string())?;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let configure = crate::root().join("hsm-config/synapse/configure.py");
        run(Command::new(python)
            .arg(&configure)
            .arg(data)
            .arg(port.to_string()))?;
        let log = std::fs::File::create(data.join("stdout.log")).map_err(|e| e.to_string())?;
        let child = Command::new(python)
            .args(["-m", "synapse.app.homeserver", "-c"])
            .arg(data.join("homeserver.yaml"))
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start Synapse: {e}"))?;
        let url = format!("http://127.0.0.1:{port}");
        let server = Server { child, url };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                std::thread::sleep(Duration::from_millis(300));
                return Ok(server);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!(
            "Synapse did not start; see {}",
            data.join("homeserver.log").display()
        ))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}
