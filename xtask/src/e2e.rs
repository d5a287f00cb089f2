//! `cargo xtask bench --e2e [--sessions N]…`: where a restore's time goes, end to end.
//!
//! For each test token (SoftHSM, Kryoptic) a fresh account in a local Synapse gets a
//! backup of N real megolm sessions (10,000 and 100,000 by default, filled one after the
//! other into the same backup). For each N, in one run:
//!
//! * **server**: a plain `GET /room_keys/keys` read to nowhere, the server's time to deliver
//!   the backup;
//! * **token**: the token's raw X25519 agreement rate at its best job count, with the
//!   account's own backup key (`mxhsm token bench --backup-key-of`: a stored key, which
//!   Kryoptic reads from its database on every use, is less than half as fast as the
//!   session key the bench uses by default), so that N ÷ rate is the token's floor;
//! * **wall**: `mxhsm backup restore` from start to exit, with its peak RSS;
//! * **ratio**: wall ÷ max(server, N ÷ token rate).
//!
//! Server and wall are medians of three alternating runs (GET, restore, GET, restore…).
//! After the largest N, 1 % new sessions are added three times, each followed by a
//! `backup restore --new-only`: its median wall against the full restore's.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::{Result, demo, mxhsm_cmd, synapse, tokens};

const RUNS: usize = 3;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One timed `mxhsm backup restore`: wall seconds, peak RSS in MB, and from its JSON the
/// sessions restored and the job count it ended with.
struct Run {
    wall: f64,
    rss_mb: f64,
    restored: u64,
    jobs: u64,
}

/// The server's time to deliver the whole backup: one GET, the body read and dropped.
fn server_time(hs: &str, access: &str, version: &str) -> Result<(f64, u64)> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let t = Instant::now();
    let resp = agent
        .get(format!(
            "{hs}/_matrix/client/v3/room_keys/keys?version={version}"
        ))
        .header("Authorization", format!("Bearer {access}"))
        .call()
        .map_err(|e| format!("GET room_keys: {e}"))?;
    if resp.status() != 200 {
        return Err(format!("GET room_keys: {}", resp.status()));
    }
    let bytes = std::io::copy(&mut resp.into_body().into_reader(), &mut std::io::sink())
        .map_err(|e| format!("GET room_keys: {e}"))?;
    Ok((t.elapsed().as_secs_f64(), bytes))
}

/// `mxhsm backup restore` under GNU time, into a file removed again afterwards.
fn restore(mut cmd: Command, out: &Path) -> Result<Run> {
    let _ = std::fs::remove_file(out);
    let t = Instant::now();
    let output = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| e.to_string())?;
    let wall = t.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(format!("restore failed:\n{stderr}"));
    }
    let rss_kb: f64 = stderr
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Maximum resident set size (kbytes): ")
        })
        .and_then(|v| v.trim().parse().ok())
        .ok_or("no peak RSS from GNU time")?;
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)
        .map_err(|e| format!("backup restore --json: {e}"))?;
    let _ = std::fs::remove_file(out);
    Ok(Run {
        wall,
        rss_mb: rss_kb / 1024.0,
        restored: report["restored"].as_u64().unwrap_or(0),
        jobs: report["jobs"].as_u64().unwrap_or(0),
    })
}

/// The token's best raw agreement rate with `user`'s backup key and its job count, from
/// `mxhsm token bench --json`.
fn token_rate(
    bin: &Path,
    token: &tokens::Token,
    user: &str,
    sessions: usize,
) -> Result<(f64, u64)> {
    let out = mxhsm_cmd(
        bin,
        token,
        [
            "--json",
            "token",
            "bench",
            "--seconds",
            "0.2",
            "--restore-sessions",
            &sessions.to_string(),
            "--backup-key-of",
            user,
        ],
    )
    .stderr(Stdio::inherit())
    .output()
    .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err("token bench failed".into());
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("token bench --json: {e}"))?;
    let rows = v["restore"]["by_jobs"]
        .as_array()
        .ok_or("no restore rows")?;
    rows.iter()
        .filter_map(|r| {
            Some((
                r["raw_agreements_per_second"].as_f64()?,
                r["jobs"].as_u64()?,
            ))
        })
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .ok_or_else(|| "no raw agreement rate".into())
}

pub fn bench_e2e(
    bin: &Path,
    python: &Path,
    dir: &Path,
    tokens: &[(&str, &tokens::Token)],
    sizes: &[usize],
) -> Result {
    let server = synapse::Server::start(python, &dir.join("synapse"))?;
    let mut lines = Vec::new();
    let mut report = |line: String| {
        println!("{line}");
        lines.push(line);
    };
    for (name, token) in tokens {
        let user = demo::register(&server.url, &format!("e2e-{name}"))?;
        let data = dir.join(format!("data-{name}"));
        let cmd = |args: &[&str]| {
            let mut c = mxhsm_cmd(bin, token, args);
            c.env("XDG_DATA_HOME", &data)
                .env("MXHSM_PASSWORD", &user.password);
            c
        };
        let timed_restore = |extra: &[&str]| -> Result<Run> {
            let out = dir.join(format!("keys-{name}.json"));
            let mut c = Command::new("/usr/bin/time");
            c.arg("-v")
                .arg(bin)
                .args(["--json", "backup", "restore", "--format", "json", "--out"]);
            c.arg(&out).args(extra);
            token.apply_env(&mut c);
            c.env("XDG_DATA_HOME", &data);
            restore(c, &out)
        };
        let (version, public, access) = demo::account_with_backup(&server.url, &user, cmd)?;
        let (version, public) = (version.as_str(), public.as_str());
        let (rate, rate_jobs) = token_rate(bin, token, &user.user_id, 5_000)?;
        let mut filled = 0;
        let mut full = 0.0;
        for &n in sizes {
            demo::fill_backup(&server.url, &access, version, public, n - filled)?;
            filled = n;
            let (mut gets, mut walls, mut rss) = (Vec::new(), Vec::new(), 0f64);
            let mut bytes = 0;
            let mut jobs = 0;
            for _ in 0..RUNS {
                let (s, b) = server_time(&server.url, &access, version)?;
                gets.push(s);
                bytes = b;
                let r = timed_restore(&[])?;
                if r.restored != n as u64 {
                    return Err(format!("restored {} of {n} sessions", r.restored));
                }
                walls.push(r.wall);
                rss = rss.max(r.rss_mb);
                jobs = r.jobs;
            }
            let (get, wall) = (median(gets), median(walls));
            let floor = n as f64 / rate;
            full = wall;
            report(format!(
                "{name:9} {n:>7}  server {get:6.2} s ({:.0} MB)  token {rate:6.0}/s ({rate_jobs} jobs; floor {floor:6.2} s)  \
                 wall {wall:6.2} s ({jobs} jobs, peak RSS {rss:.0} MB)  wall/max {:.3}",
                bytes as f64 / 1e6,
                wall / get.max(floor),
            ));
        }
        // A second restore of what is new: 1 % more sessions each time, then --new-only.
        let new = (filled / 100).max(1);
        let mut walls = Vec::new();
        for _ in 0..RUNS {
            demo::fill_backup(&server.url, &access, version, public, new)?;
            filled += new;
            let r = timed_restore(&["--new-only"])?;
            if r.restored != new as u64 {
                return Err(format!(
                    "--new-only restored {} sessions, not the {new} new ones",
                    r.restored
                ));
            }
            walls.push(r.wall);
        }
        let wall = median(walls);
        report(format!(
            "{name:9} {filled:>7}  --new-only with {new} new: wall {wall:6.2} s = {:.1} % of the full restore ({full:.2} s)",
            100.0 * wall / full,
        ));
    }
    println!("\nend-to-end restore against a local Synapse, medians of {RUNS} alternating runs");
    for l in &lines {
        println!("  {l}");
    }
    drop(server);
    Ok(())
}
