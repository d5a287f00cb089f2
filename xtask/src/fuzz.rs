//! `cargo xtask fuzz [--seconds N] [TARGET…]`: builds the cargo-fuzz targets in `fuzz/`
//! with the nightly toolchain and runs each for N seconds, reporting executions.
//!
//! cargo-fuzz itself is installed into the cache (`~/.cache/mxhsm-dev/cargo-fuzz-<version>`),
//! the fuzz build goes to `~/.cache/mxhsm-dev/fuzz-target`, and each target's corpus grows
//! in `~/.cache/mxhsm-dev/fuzz-corpus/<target>` from the seeds in `fuzz/seeds/<target>`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Result, cache_dir, root, run};

const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Every target in fuzz/Cargo.toml.
pub const TARGETS: &[&str] = &[
    "keys_query",
    "backup_session",
    "backup_dump",
    "recovery_key",
    "key_export",
    "secret_storage",
    "piv_answers",
    "attestation",
    "canonical_json",
    "inputs",
];

fn cargo_fuzz() -> Result<PathBuf> {
    let dir = cache_dir().join(format!("cargo-fuzz-{CARGO_FUZZ_VERSION}"));
    let bin = dir.join("bin/cargo-fuzz");
    if !bin.exists() {
        run(
            Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
                .args([
                    "install",
                    "cargo-fuzz",
                    "--locked",
                    "--version",
                    CARGO_FUZZ_VERSION,
                    "--root",
                ])
                .arg(&dir)
                .env_remove("RUSTUP_TOOLCHAIN"),
        )?;
    }
    Ok(bin)
}

/// `cargo +nightly fuzz …` with cargo-fuzz from the cache.
fn fuzz_cmd(bin: &Path) -> Command {
    let mut c = Command::new("cargo");
    c.arg("+nightly").arg("fuzz");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![bin.parent().map(Path::to_path_buf).unwrap_or_default()];
    dirs.extend(std::env::split_paths(&path));
    c.env("PATH", std::env::join_paths(dirs).unwrap_or(path))
        .env_remove("CARGO")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_TARGET_DIR")
        .current_dir(root().join("fuzz"));
    c
}

/// What one run did.
pub struct Outcome {
    pub target: String,
    pub runs: u64,
    pub seconds: u64,
}

pub fn fuzz(args: &[String]) -> Result {
    let mut seconds = 60u64;
    let mut only = Vec::new();
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--seconds" => {
                seconds = args
                    .get(i + 1)
                    .and_then(|s| s.parse().ok())
                    .ok_or("--seconds takes a number")?;
                i += 1;
            }
            t if TARGETS.contains(&t) => only.push(t.to_string()),
            other => {
                return Err(format!(
                    "unknown fuzz target or option {other:?} (targets: {})",
                    TARGETS.join(", ")
                ));
            }
        }
        i += 1;
    }
    let targets: Vec<String> = if only.is_empty() {
        TARGETS.iter().map(|t| t.to_string()).collect()
    } else {
        only
    };
    let outcomes = run_targets(&targets, seconds)?;
    println!(
        "\n{:<16} {:>12} {:>8} {:>10}",
        "TARGET", "EXECUTIONS", "SECONDS", "EXEC/S"
    );
    for o in &outcomes {
        println!(
            "{:<16} {:>12} {:>8} {:>10}",
            o.target,
            o.runs,
            o.seconds,
            o.runs / o.seconds.max(1)
        );
    }
    Ok(())
}

/// Builds the targets and runs each for `seconds`.
pub fn run_targets(targets: &[String], seconds: u64) -> Result<Vec<Outcome>> {
    let nightly = Command::new("cargo")
        .args(["+nightly", "--version"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !nightly {
        return Err("fuzzing needs the nightly toolchain: rustup toolchain install nightly".into());
    }
    let bin = cargo_fuzz()?;
    let target_dir = cache_dir().join("fuzz-target");
    run(fuzz_cmd(&bin)
        .arg("build")
        .arg("--target-dir")
        .arg(&target_dir))?;
    let mut outcomes = Vec::new();
    for t in targets {
        let corpus = cache_dir().join("fuzz-corpus").join(t);
        std::fs::create_dir_all(&corpus).map_err(|e| format!("{}: {e}", corpus.display()))?;
        let seeds = root().join("fuzz/seeds").join(t);
        let mut cmd = fuzz_cmd(&bin);
        cmd.arg("run")
            .arg("--target-dir")
            .arg(&target_dir)
            .arg(t)
            .arg(&corpus);
        if seeds.is_dir() {
            cmd.arg(&seeds);
        }
        cmd.arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg("-print_final_stats=1");
        eprintln!("+ fuzzing {t} for {seconds} s");
        let out = cmd
            .output()
            .map_err(|e| format!("cannot run cargo fuzz: {e}"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            return Err(format!(
                "fuzz target {t} failed:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
        }
        // libFuzzer's last line: "Done 686727 runs in 11 second(s)".
        let done = log
            .lines()
            .rev()
            .find_map(|l| {
                let rest = l.strip_prefix("Done ")?;
                let (runs, rest) = rest.split_once(" runs in ")?;
                let secs = rest.split_whitespace().next()?;
                Some((runs.parse().ok()?, secs.parse().ok()?))
            })
            .ok_or_else(|| format!("fuzz target {t}: no summary in its output"))?;
        outcomes.push(Outcome {
            target: t.clone(),
            runs: done.0,
            seconds: done.1,
        });
    }
    Ok(outcomes)
}
