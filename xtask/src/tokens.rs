//! Fresh test tokens for the demo and the benchmark, made with the tokens' own tools
//! (softhsm2-util, pkcs11-tool), each in its own directory.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Result, SOFTHSM_MODULE, run};

const SO_PIN: &str = "87654321";
/// The user PIN of a demo/bench token. Written to a 0600 file and used through the URI's
/// `pin-source=`, as a real deployment would.
const USER_PIN: &str = "246810";

pub struct Token {
    pub uri: String,
    pub pin_file: PathBuf,
    env: Vec<(&'static str, PathBuf)>,
}

impl Token {
    pub fn apply_env(&self, cmd: &mut Command) {
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.env("MXHSM_TOKEN", &self.uri);
        cmd.env_remove("MXHSM_PIN");
    }

    fn fresh_dir(dir: &Path) -> Result<PathBuf> {
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let pin_file = dir.join("user.pin");
        write_private(&pin_file, USER_PIN)?;
        Ok(pin_file)
    }

    pub fn softhsm(dir: &Path, label: &str) -> Result<Token> {
        let pin_file = Self::fresh_dir(dir)?;
        let tokens = dir.join("tokens");
        std::fs::create_dir_all(&tokens).map_err(|e| e.to_string())?;
        let conf = dir.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .map_err(|e| e.to_string())?;
        run(Command::new("softhsm2-util")
            .args([
                "--init-token",
                "--free",
                "--label",
                label,
                "--so-pin",
                SO_PIN,
                "--pin",
                USER_PIN,
            ])
            .env("SOFTHSM2_CONF", &conf))?;
        Ok(Token {
            uri: uri(label, Path::new(SOFTHSM_MODULE), &pin_file),
            pin_file,
            env: vec![("SOFTHSM2_CONF", conf)],
        })
    }

    pub fn kryoptic(dir: &Path, label: &str, module: &Path) -> Result<Token> {
        let pin_file = Self::fresh_dir(dir)?;
        let db = dir.join("token.sql");
        let tool = |args: &[&str]| {
            let mut c = Command::new("pkcs11-tool");
            c.arg("--module")
                .arg(module)
                .args(args)
                .env("KRYOPTIC_CONF", &db);
            c
        };
        run(&mut tool(&[
            "--init-token",
            "--label",
            label,
            "--so-pin",
            SO_PIN,
        ]))?;
        run(&mut tool(&[
            "--init-pin",
            "--login",
            "--so-pin",
            SO_PIN,
            "--pin",
            USER_PIN,
        ]))?;
        Ok(Token {
            uri: uri(label, module, &pin_file),
            pin_file,
            env: vec![("KRYOPTIC_CONF", db)],
        })
    }
}

impl Token {
    /// Adds an SQLite index on (attribute, value) to a Kryoptic token's database. Kryoptic
    /// 1.5 has none: every search, and every read of an object's attributes (it finds the
    /// object by `CKA_UNIQUE_ID`), scans the whole table (docs/tokens.md).
    pub fn index_kryoptic(&self) -> Result {
        let db = self
            .env
            .iter()
            .find(|(k, _)| *k == "KRYOPTIC_CONF")
            .map(|(_, v)| v)
            .ok_or("not a Kryoptic token")?;
        run(Command::new("python3")
            .args([
                "-c",
                "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); \
             c.execute('CREATE INDEX IF NOT EXISTS mxhsm_attr_val ON objects(attr, val)'); \
             c.commit()",
            ])
            .arg(db))
    }
}

fn uri(label: &str, module: &Path, pin_file: &Path) -> String {
    format!(
        "pkcs11:token={label}?module-path={}&pin-source=file:{}",
        module.display(),
        pin_file.display()
    )
}

fn write_private(path: &Path, contents: &str) -> Result {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    writeln!(f, "{contents}").map_err(|e| e.to_string())
}
