//! Signing devices under a policy: which unsigned devices may be cross-signed without a
//! human, for an administrator who signs devices of many accounts.
//!
//! A policy file (TOML) is a list of `[[allow]]` rules. A device is signed without asking
//! when its own signature verifies (always required, whatever the rules say) and one rule
//! allows it: every condition the rule gives holds. Every other unsigned device is listed
//! for a human, with the reason.
//!
//! ```toml
//! [[allow]]
//! accounts = ["bot-*", "@bridge:example.org"]  # config names or user IDs; default: all
//! device-id = ["BOT*"]                         # `*` and `?` patterns; default: any
//! display-name = ["mautrix-*"]                 # default: any
//! max-age = "24h"                              # since mxhsm first saw the device
//! require-present = ["ADMINPHONE"]             # these devices must be in the same answer
//! ```
//!
//! Device IDs and display names are chosen by whoever logs in, and the homeserver can
//! make up devices: a pattern sorts devices, it does not authenticate them. What keeps a
//! forged device out is the valid self-signature (the server cannot make one for a key it
//! does not hold) and `max-age`: a device mxhsm saw before the policy ran is never new.
//!
//! "First seen" is mxhsm's own record (`first-seen-<hash of the user ID>.json` under the
//! data directory), per device and Ed25519 key. The first run records every device it
//! finds as seen before the record began, so a `max-age` rule never signs those; a device
//! that appears later is timed from the run that first saw it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::sign::{self, DeviceCandidate, DeviceSelection};
use super::{Account, AccountError};
use crate::text::escape;

/// A policy file, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub rules: Vec<Rule>,
}

/// One `[[allow]]` rule.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rule {
    /// Account names or user IDs (patterns); empty: every account.
    pub accounts: Vec<String>,
    pub device_id: Vec<String>,
    pub display_name: Vec<String>,
    pub max_age: Option<Duration>,
    pub require_present: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    allow: Vec<toml::Spanned<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawRule {
    #[serde(default)]
    accounts: Vec<String>,
    #[serde(default)]
    device_id: Vec<String>,
    #[serde(default)]
    display_name: Vec<String>,
    max_age: Option<toml::Spanned<String>>,
    #[serde(default)]
    require_present: Vec<String>,
}

/// A bad policy file.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read the policy {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the policy {} is not valid: {message}", .path.display())]
    Parse { path: PathBuf, message: String },
    #[error("{}, line {line}: {what}", .path.display())]
    Invalid {
        path: PathBuf,
        line: usize,
        what: String,
    },
}

impl Policy {
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Policy::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Policy, PolicyError> {
        let raw: RawPolicy = toml::from_str(text).map_err(|e| PolicyError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let line = |span: std::ops::Range<usize>| {
            text.get(..span.start)
                .map_or(1, |b| b.matches('\n').count() + 1)
        };
        let mut rules = Vec::new();
        for spanned in raw.allow {
            let span = spanned.span();
            let r = spanned.into_inner();
            let invalid = |span: std::ops::Range<usize>, what: String| PolicyError::Invalid {
                path: path.to_path_buf(),
                line: line(span),
                what,
            };
            let max_age = match r.max_age {
                None => None,
                Some(m) => Some(crate::text::parse_duration(m.get_ref()).ok_or_else(|| {
                    invalid(
                        m.span(),
                        format!(
                            "max-age {:?} is not a duration (30s, 15m, 24h, 7d)",
                            escape(m.get_ref())
                        ),
                    )
                })?),
            };
            if r.device_id.is_empty() && r.display_name.is_empty() && max_age.is_none() {
                return Err(invalid(
                    span,
                    "this rule would sign every device with a valid self-signature: give device-id, display-name or max-age".into(),
                ));
            }
            for p in r.device_id.iter().chain(&r.display_name).chain(&r.accounts) {
                if p.is_empty() {
                    return Err(invalid(span, "an empty pattern matches nothing".into()));
                }
            }
            rules.push(Rule {
                accounts: r.accounts,
                device_id: r.device_id,
                display_name: r.display_name,
                max_age,
                require_present: r.require_present,
            });
        }
        Ok(Policy { rules })
    }
}

/// Shell-style matching of `*` (any run) and `?` (one character), nothing else. Written
/// here: two wildcards over short strings do not justify a glob or regex crate.
pub fn matches(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// When mxhsm first saw each device of an account (per device ID and Ed25519 key).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FirstSeen {
    /// When the record began; devices present then have no time of their own.
    pub since_ms: u64,
    /// Device ID → every Ed25519 key it has shown, each with when it was first seen
    /// (`None`: present when the record began).
    pub devices: BTreeMap<String, Vec<Seen>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Seen {
    pub ed25519: String,
    pub first_seen_ms: Option<u64>,
}

/// The default first-seen record of `user_id`.
pub fn default_first_seen_path(user_id: &str) -> PathBuf {
    crate::paths::dir(crate::paths::Base::Data).join(format!(
        "first-seen-{}.json",
        super::watch::user_hash(user_id)
    ))
}

impl FirstSeen {
    /// The record at `path`; `None` when there is none yet.
    pub fn load(path: &Path) -> Result<Option<FirstSeen>, AccountError> {
        let Some(mut f) = crate::paths::open_private_if_any(path)
            .map_err(|e| AccountError::file("cannot read the first-seen record", path, e))?
        else {
            return Ok(None);
        };
        let mut text = String::new();
        std::io::Read::read_to_string(&mut f, &mut text)
            .map_err(|e| AccountError::file("cannot read the first-seen record", path, e))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| AccountError::file("the first-seen record is damaged", path, e))
    }

    pub fn save(&self, path: &Path) -> Result<(), AccountError> {
        crate::paths::private_dir(crate::paths::Base::Data, None)
            .map_err(|e| AccountError::file("cannot write the first-seen record", path, e))?;
        let text = serde_json::to_vec(self).unwrap_or_default();
        crate::files::write_private(path, &text)
            .map_err(|e| AccountError::file("cannot write the first-seen record", path, e))
    }

    /// Records the devices in `seen` (ID, Ed25519 key) at `now_ms`; a new record (`self`
    /// was `None`) counts them all as present before it began.
    fn update(record: Option<FirstSeen>, seen: &[(String, String)], now_ms: u64) -> FirstSeen {
        let fresh = record.is_none();
        let mut r = record.unwrap_or(FirstSeen {
            since_ms: now_ms,
            devices: BTreeMap::new(),
        });
        for (id, key) in seen {
            let keys = r.devices.entry(id.clone()).or_default();
            // A key once seen keeps its first time, even when the device showed another
            // key in between: a server cannot make an old device new by swapping keys.
            if !keys.iter().any(|s| &s.ed25519 == key) {
                keys.push(Seen {
                    ed25519: key.clone(),
                    first_seen_ms: (!fresh).then_some(now_ms),
                });
            }
        }
        r
    }
}

/// What the policy decided for one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Signed without asking, by this rule (1-based).
    Signed { rule: usize },
    /// A dry run: this rule would have signed it.
    WouldSign { rule: usize },
    /// Left for a human: why no rule allows it.
    NeedsHuman { reason: String },
    /// Never signed: its own signature does not verify.
    Refused { reason: String },
}

/// One device the policy looked at.
#[derive(Debug, Clone)]
pub struct Judged {
    pub device_id: String,
    pub display_name: Option<String>,
    pub ed25519: Option<crate::matrix::keys::Ed25519PublicKey>,
    pub decision: Decision,
}

/// What [`sign_by_policy`] did for one account.
#[derive(Debug, Clone, Default)]
pub struct PolicyOutcome {
    pub devices: Vec<Judged>,
    /// Nothing was signed because this was a dry run.
    pub dry_run: bool,
}

impl PolicyOutcome {
    /// The devices signed (or, in a dry run, that would be).
    pub fn signed(&self) -> impl Iterator<Item = &Judged> {
        self.devices.iter().filter(|d| {
            matches!(
                d.decision,
                Decision::Signed { .. } | Decision::WouldSign { .. }
            )
        })
    }

    /// The devices left for a human, or never to be signed.
    pub fn needs_human(&self) -> impl Iterator<Item = &Judged> {
        self.devices.iter().filter(|d| {
            matches!(
                d.decision,
                Decision::NeedsHuman { .. } | Decision::Refused { .. }
            )
        })
    }
}

/// Why `rule` does not allow `c` (`None`: it does).
fn refuses(
    rule: &Rule,
    c: &DeviceCandidate,
    present: &[&str],
    first_seen: &FirstSeen,
    now_ms: u64,
) -> Option<String> {
    let any = |patterns: &[String], text: &str| patterns.iter().any(|p| matches(p, text));
    if !rule.device_id.is_empty() && !any(&rule.device_id, &c.device_id) {
        return Some(format!(
            "device ID matches none of {}",
            rule.device_id.join(", ")
        ));
    }
    let name = c.display_name.as_deref().unwrap_or("");
    if !rule.display_name.is_empty() && !any(&rule.display_name, name) {
        return Some(format!(
            "display name \"{}\" matches none of {}",
            escape(name),
            rule.display_name.join(", ")
        ));
    }
    let missing: Vec<&str> = rule
        .require_present
        .iter()
        .map(String::as_str)
        .filter(|r| !present.contains(r))
        .collect();
    if !missing.is_empty() {
        return Some(format!(
            "required device(s) {} missing from the server's answer",
            escape(&missing.join(", "))
        ));
    }
    if let Some(max) = rule.max_age {
        let key = c.ed25519.map(|k| k.to_base64());
        let seen = first_seen
            .devices
            .get(&c.device_id)
            .and_then(|keys| keys.iter().find(|s| Some(&s.ed25519) == key.as_ref()))
            .and_then(|s| s.first_seen_ms);
        match seen {
            None => {
                return Some(
                    "it was there before mxhsm's first-seen record began, so its age is unknown"
                        .into(),
                );
            }
            Some(t) => {
                let age = Duration::from_millis(now_ms.saturating_sub(t));
                if age > max {
                    return Some(format!(
                        "first seen {} min ago, more than max-age {} min",
                        age.as_secs() / 60,
                        max.as_secs() / 60
                    ));
                }
            }
        }
    }
    None
}

/// Whether `rule` is for `account` (its config name or user ID).
fn for_account(rule: &Rule, user_id: &str, name: Option<&str>) -> bool {
    rule.accounts.is_empty()
        || rule
            .accounts
            .iter()
            .any(|p| matches(p, user_id) || name.is_some_and(|n| matches(p, n)))
}

/// Signs the unsigned devices of `account` that `policy` allows, from one `/keys/query`,
/// and says what it decided for every other unsigned device. `name` is the account's
/// config name (rules may name it). With `dry_run`, nothing is signed and the first-seen
/// record is still updated.
pub fn sign_by_policy(
    account: &Account,
    name: Option<&str>,
    policy: &Policy,
    first_seen_path: &Path,
    dry_run: bool,
) -> Result<PolicyOutcome, AccountError> {
    let now_ms = crate::token::now_ms();
    let record = FirstSeen::load(first_seen_path)?;
    let mut judged: Vec<Judged> = Vec::new();
    let mut updated: Option<FirstSeen> = None;
    let rules: Vec<(usize, &Rule)> = policy
        .rules
        .iter()
        .enumerate()
        .filter(|(_, r)| for_account(r, account.user_id(), name))
        .map(|(i, r)| (i + 1, r))
        .collect();
    let mut decide = |offered: &[DeviceCandidate], all: &[DeviceCandidate]| {
        let seen: Vec<(String, String)> = all
            .iter()
            .filter_map(|c| Some((c.device_id.clone(), c.ed25519?.to_base64())))
            .collect();
        let record = FirstSeen::update(record.clone(), &seen, now_ms);
        let present: Vec<&str> = all.iter().map(|c| c.device_id.as_str()).collect();
        let mut chosen = Vec::new();
        for c in all.iter().filter(|c| !c.trust.is_verified()) {
            let decision = if let Err(e) = &c.self_signature {
                Decision::Refused {
                    reason: format!("its own signature does not verify ({e})"),
                }
            } else if !offered.iter().any(|o| o.device_id == c.device_id) {
                Decision::NeedsHuman {
                    reason: c.refusal().unwrap_or_else(|| "not offered".into()),
                }
            } else if rules.is_empty() {
                Decision::NeedsHuman {
                    reason: "no rule of the policy is for this account".into(),
                }
            } else {
                let mut reasons = Vec::new();
                let mut allowed = None;
                for (n, rule) in &rules {
                    match refuses(rule, c, &present, &record, now_ms) {
                        None => {
                            allowed = Some(*n);
                            break;
                        }
                        Some(why) => reasons.push(format!("rule {n}: {why}")),
                    }
                }
                match allowed {
                    Some(rule) => {
                        chosen.push(c.device_id.clone());
                        Decision::Signed { rule }
                    }
                    None => Decision::NeedsHuman {
                        reason: reasons.join("; "),
                    },
                }
            };
            judged.push(Judged {
                device_id: c.device_id.clone(),
                display_name: c.display_name.clone(),
                ed25519: c.ed25519,
                decision,
            });
        }
        updated = Some(record);
        if dry_run { Vec::new() } else { chosen }
    };
    let result =
        sign::sign_devices_seeing_all(account, &DeviceSelection::AllUnsigned, &mut |o, a| {
            Ok(decide(o, a))
        });
    if let Some(r) = &updated {
        r.save(first_seen_path)?;
    }
    match result {
        // Nothing to sign (nothing offered, or nothing allowed) is not an error here.
        Ok(_) | Err(AccountError::Cancelled) => {}
        Err(e) => return Err(e),
    }
    if dry_run {
        for j in &mut judged {
            if let Decision::Signed { rule } = j.decision {
                j.decision = Decision::WouldSign { rule };
            }
        }
    }
    Ok(PolicyOutcome {
        devices: judged,
        dry_run,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        for (p, t, m) in [
            ("BOT*", "BOTABC", true),
            ("BOT*", "XBOT", false),
            ("*", "", true),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("*-bridge-*", "mautrix-bridge-1", true),
            ("exact", "exact", true),
            ("exact", "exactly", false),
            ("**a", "bba", true),
            ("*a", "*ba", true),
            ("a*", "a*", true),
        ] {
            assert_eq!(matches(p, t), m, "{p} {t}");
        }
    }

    #[test]
    fn policy_files() {
        let p = Policy::parse(
            "[[allow]]\ndevice-id = [\"BOT*\"]\nmax-age = \"2h\"\nrequire-present = [\"A\"]\n",
            Path::new("p.toml"),
        )
        .unwrap();
        assert_eq!(p.rules[0].max_age, Some(Duration::from_secs(7200)));
        let bad = |text: &str, expected: &str| {
            let e = Policy::parse(text, Path::new("p.toml"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(expected) && e.contains("line"), "{text}: {e}");
        };
        bad("[[allow]]\nmax-age = \"2 hours\"\n", "not a duration");
        bad("[[allow]]\naccounts = [\"a\"]\n", "would sign every device");
        bad("[[allow]]\ndevice = [\"a\"]\n", "unknown field `device`");
        bad("[[allow]]\ndevice-id = [\"\"]\n", "empty pattern");
    }

    #[test]
    fn first_seen_starts_with_a_baseline() {
        let seen = vec![("A".to_string(), "ka".to_string())];
        let r = FirstSeen::update(None, &seen, 1000);
        assert_eq!(r.devices["A"][0].first_seen_ms, None);
        let seen2 = vec![
            ("A".to_string(), "ka".to_string()),
            ("B".to_string(), "kb".to_string()),
        ];
        let r2 = FirstSeen::update(Some(r), &seen2, 2000);
        assert_eq!(r2.devices["A"][0].first_seen_ms, None);
        assert_eq!(r2.devices["B"][0].first_seen_ms, Some(2000));
        // A new key of a device is new; its first key, shown again, is still old.
        let seen3 = vec![("A".to_string(), "other".to_string())];
        let r3 = FirstSeen::update(Some(r2), &seen3, 3000);
        assert_eq!(r3.devices["A"][1].first_seen_ms, Some(3000));
        let r4 = FirstSeen::update(Some(r3), &seen, 4000);
        assert_eq!(r4.devices["A"].len(), 2);
        assert_eq!(r4.devices["A"][0].first_seen_ms, None);
    }
}
