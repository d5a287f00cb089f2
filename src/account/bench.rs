//! Measuring a token against software, in one run: Ed25519 signatures, X25519 agreements,
//! and whole key-backup restores.

use std::time::{Duration, Instant};

use ed25519_dalek::{Signer, SigningKey};
use serde_json::json;
use x25519_dalek::{PublicKey as XPublic, StaticSecret};

use super::AccountError;
use super::doctor::SessionKey;
use crate::token::{Curve25519PublicKey, KeyAlgorithm, KeyInfo, Store};

/// Runs `op` repeatedly for `seconds` and returns operations per second.
fn rate(
    seconds: f64,
    mut op: impl FnMut() -> Result<(), AccountError>,
) -> Result<f64, AccountError> {
    let budget = Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < budget || n < 10 {
        op()?;
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// One operation measured on the token and in software, in the same run.
#[derive(Debug, Clone, PartialEq)]
pub struct Rate {
    pub operation: &'static str,
    pub token_per_second: f64,
    /// The software implementation measured beside it.
    pub software: &'static str,
    pub software_per_second: f64,
}

/// Ed25519 signatures and X25519 agreements per second on the token (temporary keys),
/// against ed25519-dalek and x25519-dalek measured in the same run, `seconds` each.
pub fn bench(store: &Store, seconds: f64) -> Result<Vec<Rate>, AccountError> {
    if !(seconds > 0.0 && seconds <= 600.0) {
        return Err(AccountError::Input(
            "the measuring time must be between 0 and 600 seconds".into(),
        ));
    }
    let msg = br#"{"keys":{"ed25519:AAAA":"AAAA"},"usage":["self_signing"],"user_id":"@alice:example.org"}"#;
    let mut results = Vec::new();
    if store.capabilities().ed25519 {
        let k = SessionKey::new(store, KeyAlgorithm::Ed25519)?;
        let token = rate(seconds, || {
            store
                .sign_ed25519(&k.key, msg)
                .map(|_| ())
                .map_err(Into::into)
        })?;
        let sk = SigningKey::from_bytes(&[7u8; 32]);
        let soft = rate(seconds, || {
            std::hint::black_box(sk.sign(std::hint::black_box(msg)));
            Ok(())
        })?;
        results.push(Rate {
            operation: "ed25519 sign",
            token_per_second: token,
            software: "ed25519-dalek",
            software_per_second: soft,
        });
    }
    if store.capabilities().x25519.is_some() {
        let k = SessionKey::new(store, KeyAlgorithm::X25519)?;
        let peer = XPublic::from(&StaticSecret::from([9u8; 32]));
        let peer_key = Curve25519PublicKey::from_bytes(peer.to_bytes());
        let token = rate(seconds, || {
            store
                .x25519(&k.key, &peer_key)
                .map(|_| ())
                .map_err(Into::into)
        })?;
        let secret = StaticSecret::from([5u8; 32]);
        let soft = rate(seconds, || {
            std::hint::black_box(secret.diffie_hellman(std::hint::black_box(&peer)));
            Ok(())
        })?;
        results.push(Rate {
            operation: "x25519 agree",
            token_per_second: token,
            software: "x25519-dalek",
            software_per_second: soft,
        });
    }
    Ok(results)
}

/// Restore throughput against the token's own agreement rate, per number of parallel
/// PKCS#11 sessions, and vodozemac's software decryption.
#[derive(Debug, Clone, PartialEq)]
pub struct RestoreBench {
    pub sessions: usize,
    /// (jobs, raw agreements/s, restored sessions/s)
    pub rows: Vec<(usize, f64, f64)>,
    /// vodozemac's `PkDecryption` in software, one thread.
    pub software: f64,
}

impl RestoreBench {
    /// The row with the fastest restore.
    pub fn best(&self) -> (usize, f64, f64) {
        self.rows
            .iter()
            .copied()
            .fold((1, 0.0, 0.0), |b, r| if r.2 > b.2 { r } else { b })
    }

    /// The token's best raw agreement rate over all job counts.
    pub fn best_raw(&self) -> f64 {
        self.rows.iter().map(|r| r.1).fold(0.0, f64::max)
    }

    pub fn to_json(&self) -> serde_json::Value {
        let best = self.best();
        json!({
            "sessions": self.sessions,
            "by_jobs": self.rows.iter().map(|(j, raw, restore)| json!({
                "jobs": j, "raw_agreements_per_second": raw, "restored_per_second": restore,
                "restore_over_raw": restore / raw,
            })).collect::<Vec<_>>(),
            "software_per_second": self.software,
            "best_jobs": best.0,
            "best_raw_agreements_per_second": self.best_raw(),
            "best_restore_over_best_raw": best.2 / self.best_raw(),
            "best_restore_over_software": best.2 / self.software,
        })
    }
}

/// Key-backup restore through the token, `n` real megolm sessions, at 1 to 4 parallel
/// agreements, against the token's raw agreement rate and vodozemac in software: medians of
/// three alternating runs. With `stored`, that key on the token is used, not a temporary
/// session key (a stored key can be slower to reach: Kryoptic reads and decrypts it from
/// its database on every use).
pub fn bench_restore(
    store: &Store,
    n: usize,
    stored: Option<&KeyInfo>,
) -> Result<RestoreBench, AccountError> {
    use crate::matrix::backup::{self, BackedUpSession};
    use crate::token::TokenAgreement;
    use vodozemac::megolm::{GroupSession, InboundGroupSession, SessionConfig};

    let k = SessionKey::or_new(store, stored, KeyAlgorithm::X25519)?;
    let agreement = TokenAgreement::new(&**store, k.key.clone())?;
    let soft = vodozemac::pk_encryption::PkDecryption::new();
    // Realistic sessions: real megolm session keys, encrypted to the token's key and to
    // the software key.
    let mut items = Vec::with_capacity(n);
    let mut soft_items = Vec::with_capacity(n);
    for _ in 0..n {
        let outbound = GroupSession::new(SessionConfig::version_1());
        let mut inbound =
            InboundGroupSession::new(&outbound.session_key(), SessionConfig::version_1());
        let key = inbound
            .export_at(0)
            .ok_or_else(|| AccountError::Input("cannot export a new session".into()))?
            .to_base64();
        let plain = json!({
            "algorithm": "m.megolm.v1.aes-sha2", "sender_key": "WimPd2udAU/1S/+YBpPbmr9L+0H5H+BnAVHSwDxlPGc",
            "session_key": key, "sender_claimed_keys": {"ed25519": "Bhbpt6hqMZlSH4sJV7xiEEEiPVeTWz4Vkujl1EMdIPI"},
            "forwarding_curve25519_key_chain": [],
        })
        .to_string();
        items.push(BackedUpSession {
            room_id: "!bench:localhost".into(),
            session_id: outbound.session_id(),
            session_data: Ok(backup::encrypt(&k.key.curve25519()?, plain.as_bytes())?),
        });
        soft_items.push(
            vodozemac::pk_encryption::PkEncryption::from_key(soft.public_key())
                .encrypt(plain.as_bytes())
                .map_err(|e| AccountError::Input(e.to_string()))?,
        );
    }
    let peer =
        Curve25519PublicKey::from_bytes(XPublic::from(&StaticSecret::from([9u8; 32])).to_bytes());
    let cores = std::thread::available_parallelism()
        .map(|c| c.get())
        .unwrap_or(1);
    let mut rows = Vec::new();
    // Raw agreements and restores alternate, three times each, and the medians are kept:
    // a software token's speed drifts within a run, and one pass of each in a fixed order
    // would compare different moments.
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    for jobs in 1..=cores.clamp(2, 4) {
        let (mut raws, mut restores) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            let start = Instant::now();
            std::thread::scope(|s| {
                for t in 0..jobs {
                    let share = n / jobs + usize::from(t < n % jobs);
                    let (k, peer) = (&k, &peer);
                    s.spawn(move || {
                        for _ in 0..share {
                            let _ = store.x25519(&k.key, peer);
                        }
                    });
                }
            });
            raws.push(n as f64 / start.elapsed().as_secs_f64());
            let start = Instant::now();
            let results = backup::restore_all(
                &agreement,
                &items,
                jobs,
                super::restore::software_jobs(),
                &|| {},
            );
            restores.push(n as f64 / start.elapsed().as_secs_f64());
            if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
                return Err(AccountError::Input(format!(
                    "a session failed to restore during the benchmark: {e}"
                )));
            }
        }
        rows.push((jobs, median(raws), median(restores)));
    }
    let start = Instant::now();
    for (item, msg) in items.iter().zip(&soft_items) {
        let plain = soft
            .decrypt(msg)
            .map_err(|e| AccountError::Input(e.to_string()))?;
        backup::room_key(&item.room_id, &item.session_id, &plain)?;
    }
    let software = n as f64 / start.elapsed().as_secs_f64();
    Ok(RestoreBench {
        sessions: n,
        rows,
        software,
    })
}

/// How key lookups grow with the number of users a token holds: one row per size.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleRow {
    /// Users with a full set of keys (master, self-signing, user-signing, backup).
    pub users: usize,
    /// Key pairs on the token.
    pub keys: usize,
    /// Median time to list one user's keys (what every flow does).
    pub one_user: Duration,
    /// The same user's keys again, in the same process.
    pub same_user_again: Duration,
    /// Median time to list every key.
    pub all: Duration,
    /// PKCS#11 only: the median time of one search that matches nothing (one pass over the
    /// token's objects), measured alternately with `one_user`, and how many searches a
    /// user's lookup makes.
    pub one_pass: Option<(Duration, usize)>,
}

/// The users the scale bench makes (and deletes): in a domain that cannot exist.
pub fn scale_user(n: usize) -> String {
    format!("@mxhsm-bench-{n}:bench.invalid")
}

/// Fills `store` with keys for up to `users` users, in steps (10, 100, 1000, …), and at each
/// step measures listing one user's keys and listing all, as medians of alternating runs.
/// The keys are deleted again at the end, also when a step fails, unless `keep` (for a token
/// made for the bench: deleting thousands of keys one by one costs more than the bench).
/// `step` is told each row.
pub fn scale(
    store: &Store,
    users: usize,
    keep: bool,
    mut step: impl FnMut(&ScaleRow),
) -> Result<Vec<ScaleRow>, AccountError> {
    use crate::token::{KeyOptions, KeyRole};
    let mut sizes = Vec::new();
    let mut s = 10;
    while s < users {
        sizes.push(s);
        s *= 10;
    }
    sizes.push(users);
    let mut made = 0;
    let mut rows = Vec::new();
    let result = (|| -> Result<(), AccountError> {
        for &size in &sizes {
            while made < size {
                for role in [
                    KeyRole::Master,
                    KeyRole::SelfSigning,
                    KeyRole::UserSigning,
                    KeyRole::Backup,
                ] {
                    store.generate(&scale_user(made), role, &KeyOptions::default())?;
                }
                made += 1;
            }
            let median = |mut v: Vec<Duration>| {
                v.sort();
                v[v.len() / 2]
            };
            let (mut one, mut again, mut all, mut pass) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let mut searches = 0;
            // Users not looked up before (a first lookup is a token search; a second one
            // of the same user, in the same process, is answered from what the first found).
            for round in 0..size.min(15) {
                let user = scale_user(size - 1 - round);
                let t = Instant::now();
                store.list_keys(Some(&user))?;
                one.push(t.elapsed());
                let t = Instant::now();
                store.list_keys(Some(&user))?;
                again.push(t.elapsed());
                if let Some(p) = store.as_pkcs11() {
                    let (d, n) = p.search_cost()?;
                    pass.push(d);
                    searches = n;
                }
                if round % 5 == 0 {
                    let t = Instant::now();
                    store.list_keys(None)?;
                    all.push(t.elapsed());
                }
            }
            let row = ScaleRow {
                users: size,
                keys: store.list_keys(None)?.len(),
                one_user: median(one),
                same_user_again: median(again),
                all: median(all),
                one_pass: (!pass.is_empty()).then(|| (median(pass), searches)),
            };
            step(&row);
            rows.push(row);
        }
        Ok(())
    })();
    if !keep {
        let ours: std::collections::HashSet<String> = (0..made).map(scale_user).collect();
        for key in store.list_keys(None)? {
            if ours.contains(&key.user_id) {
                store.delete(&key)?;
            }
        }
    }
    result.map(|()| rows)
}

/// What mxhsm's agreement path costs over a bare PKCS#11 loop, at one thread count.
#[derive(Debug, Clone, PartialEq)]
pub struct OverheadRow {
    pub jobs: usize,
    /// Agreements/s through [`crate::token::KeyStore::x25519`] (what a restore calls).
    pub keystore: f64,
    /// Agreements/s of the bare loop (the same three calls, nothing around them).
    pub bare: f64,
}

impl OverheadRow {
    /// `keystore ÷ bare`: 1.0 means mxhsm adds nothing.
    pub fn ratio(&self) -> f64 {
        self.keystore / self.bare
    }
}

/// Runs `KeyStore::x25519` and the bare loop side by side on a PKCS#11 token, `n` agreements
/// each, at 1 to 4 threads: seven alternating runs each, medians kept. `None` for a
/// token that is not PKCS#11 (a YubiKey has no bare loop to compare with).
pub fn bench_overhead(
    store: &Store,
    n: usize,
    stored: Option<&KeyInfo>,
) -> Result<Option<Vec<OverheadRow>>, AccountError> {
    let Some(p11) = store.as_pkcs11() else {
        return Ok(None);
    };
    if store.capabilities().x25519.is_none() {
        return Ok(None);
    }
    let k = SessionKey::or_new(store, stored, KeyAlgorithm::X25519)?;
    let peer =
        Curve25519PublicKey::from_bytes(XPublic::from(&StaticSecret::from([9u8; 32])).to_bytes());
    let cores = std::thread::available_parallelism()
        .map(|c| c.get())
        .unwrap_or(1);
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let keystore_rate = |jobs: usize| -> Result<f64, AccountError> {
        let start = Instant::now();
        let failed = std::thread::scope(|s| {
            let workers: Vec<_> = (0..jobs)
                .map(|t| {
                    let share = n / jobs + usize::from(t < n % jobs);
                    let (k, peer) = (&k, &peer);
                    s.spawn(move || {
                        (0..share)
                            .map(|_| store.x25519(&k.key, peer).map(drop))
                            .find_map(Result::err)
                    })
                })
                .collect();
            workers.into_iter().find_map(|w| w.join().ok().flatten())
        });
        match failed {
            Some(e) => Err(e.into()),
            None => Ok(n as f64 / start.elapsed().as_secs_f64()),
        }
    };
    let mut rows = Vec::new();
    for jobs in 1..=cores.clamp(2, 4) {
        let (mut ours, mut bare) = (Vec::new(), Vec::new());
        // Warm both paths (session pool, handle cache) before anything counts.
        keystore_rate(jobs)?;
        for round in 0..7 {
            // The order flips every round, so neither side always runs first.
            if round % 2 == 0 {
                ours.push(keystore_rate(jobs)?);
                bare.push(p11.bare_x25519_rate(&k.key, &peer, n, jobs)?);
            } else {
                bare.push(p11.bare_x25519_rate(&k.key, &peer, n, jobs)?);
                ours.push(keystore_rate(jobs)?);
            }
        }
        rows.push(OverheadRow {
            jobs,
            keystore: median(ours),
            bare: median(bare),
        });
    }
    Ok(Some(rows))
}
