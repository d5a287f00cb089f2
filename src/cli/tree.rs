//! `identity status --tree`: the account's chains of trust as a tree that fits 80 columns,
//! with what holds each private key and each link's verdict with its reason.

use mxhsm::account::backup::BackupStatus;
use mxhsm::account::identity::Status;
use mxhsm::matrix::cross_signing::Trust;
use mxhsm::matrix::keys::Ed25519PublicKey;
use mxhsm::token::{KeyBackend, KeyInfo, KeyRole, TokenSummary, newest_by_role};

use super::output::esc;

/// The width the tree is made to fit.
pub const WIDTH: usize = 80;

/// One node: a line (what it is), the lines under it (what holds it, the verdict), and
/// its children.
struct Node {
    label: String,
    notes: Vec<String>,
    children: Vec<Node>,
}

impl Node {
    fn new(label: String) -> Node {
        Node {
            label,
            notes: Vec::new(),
            children: Vec::new(),
        }
    }

    fn note(mut self, note: String) -> Node {
        self.notes.push(note);
        self
    }
}

/// The start of a key, enough to tell keys apart and compare with another screen.
pub(super) fn short(key: &Ed25519PublicKey) -> String {
    short_b64(&key.to_base64())
}

/// [`short`] of a key given as base64 (which may come from the server: a short or odd
/// string is shown whole).
pub(super) fn short_b64(b: &str) -> String {
    let c: Vec<char> = b.chars().take(12).collect();
    if c.len() < 12 {
        return b.to_string();
    }
    let part = |r: std::ops::Range<usize>| c[r].iter().collect::<String>();
    format!("{} {} {}…", part(0..4), part(4..8), part(8..12))
}

fn verdict(t: &Trust) -> String {
    match t {
        Trust::Verified => "✔ verified".into(),
        Trust::ChainBroken(r) => format!("✘ broken: {}", esc(r)),
        Trust::Unsigned(r) => format!("✘ unsigned: {}", esc(r)),
    }
}

/// How the token keeps the private key of `key`: its origin and whether it can leave (a
/// PIV slot: its PIN and touch policies).
pub(super) fn protection(key: &KeyInfo) -> String {
    let p = &key.protection;
    let problems = p.problems(key.algorithm());
    match &key.backend {
        KeyBackend::Pkcs11 { .. } => {
            let protection = if p.sensitive.is_none() && p.extractable.is_none() {
                // A PKCS#11 token shows a private key's attributes only after login.
                "its attributes need a login to read".to_string()
            } else if problems.is_empty() {
                "non-extractable".to_string()
            } else {
                format!("WEAK: {}", problems.join("; "))
            };
            format!("{}, {protection}", key.origin.as_str())
        }
        KeyBackend::Piv { pin, touch, .. } => format!(
            "{}, PIN {}, touch {}",
            key.origin.as_str(),
            pin.map(|p| p.as_str()).unwrap_or("?"),
            touch.map(|t| t.as_str()).unwrap_or("?")
        ),
    }
}

/// What holds the private key of `key`, in a few words.
fn holder(key: &KeyInfo, token: &TokenSummary) -> String {
    match &key.backend {
        KeyBackend::Pkcs11 { .. } => format!(
            "on token {:?} (serial {}), {}",
            esc(&token.label),
            esc(&token.serial),
            protection(key)
        ),
        KeyBackend::Piv { slot, .. } => format!(
            "on YubiKey {} slot {slot}, {}",
            esc(&token.serial),
            protection(key)
        ),
    }
}

/// The tree's lines: our identity (the master key, the self-signing key with our
/// devices, the user-signing key with the users we verified), then the backup.
pub fn lines(
    status: &Status,
    keys: &[KeyInfo],
    token: &TokenSummary,
    backup: Option<&BackupStatus>,
) -> Vec<String> {
    let own = &status.own;
    let report = &status.report;
    let current = newest_by_role(keys);
    let on_token = |role: KeyRole| {
        current
            .get(&role)
            .map(|k| holder(k, token))
            .unwrap_or_else(|| "not on the token".into())
    };
    let mut master =
        Node::new(format!("master key {}", short(&own.master))).note(on_token(KeyRole::Master));
    if report.own_identity.is_empty() {
        master = master.note("✔ published as the token's".into());
    }
    for p in &report.own_identity {
        master = master.note(format!("✘ {}", esc(p)));
    }
    let mut ssk = Node::new(match &own.self_signing {
        Some(k) => format!("self-signing key {}", short(k)),
        None => "self-signing key: none on the token".into(),
    })
    .note(on_token(KeyRole::SelfSigning));
    for d in report.devices.iter().filter(|d| d.user_id == own.user_id) {
        let this = if d.device_id == status.this_device {
            " (this mxhsm)"
        } else {
            ""
        };
        let name = d
            .display_name
            .as_deref()
            .map(|n| format!(" {:?}", esc(n)))
            .unwrap_or_default();
        ssk.children.push(
            Node::new(format!("device {}{this}{name}", esc(&d.device_id))).note(verdict(&d.trust)),
        );
    }
    let mut usk = Node::new(match &own.user_signing {
        Some(k) => format!("user-signing key {}", short(k)),
        None => "user-signing key: none on the token".into(),
    })
    .note(on_token(KeyRole::UserSigning));
    for u in &report.users {
        let mut user = Node::new(format!(
            "{} master {}",
            esc(&u.user_id),
            u.master_key
                .as_ref()
                .map(short)
                .unwrap_or_else(|| "none".into())
        ))
        .note(verdict(&u.trust));
        for d in report.devices.iter().filter(|d| d.user_id == u.user_id) {
            user.children
                .push(Node::new(format!("device {}", esc(&d.device_id))).note(verdict(&d.trust)));
        }
        usk.children.push(user);
    }
    master.children = vec![ssk, usk];
    let backup = match backup {
        None => Node::new("key backup: none on the server".into()),
        Some(b) => {
            let mut n = Node::new(format!(
                "key backup version {} ({} keys)",
                esc(&b.version),
                b.count
            ))
            .note(if b.is_token_key() {
                on_token(KeyRole::Backup)
            } else {
                format!(
                    "✘ encrypted to {}, not to a key on the token",
                    esc(&b.public_key)
                )
            });
            n = n.note(match &b.signed_by_master {
                Ok(()) => "✔ auth_data signed by the master key".into(),
                Err(e) => format!("✘ auth_data not trusted: {}", esc(&e.to_string())),
            });
            n
        }
    };
    let root = Node {
        label: esc(&own.user_id).into_owned(),
        notes: Vec::new(),
        children: vec![master, backup],
    };
    let mut out = Vec::new();
    render(&root, "", "", &mut out);
    out
}

fn render(node: &Node, first: &str, rest: &str, out: &mut Vec<String>) {
    push_wrapped(out, first, rest, &node.label);
    let below = if node.children.is_empty() {
        format!("{rest}  ")
    } else {
        format!("{rest}│ ")
    };
    for n in &node.notes {
        push_wrapped(out, &below, &format!("{below}  "), n);
    }
    for (i, child) in node.children.iter().enumerate() {
        let last = i + 1 == node.children.len();
        let (branch, cont) = if last {
            ("└─ ", "   ")
        } else {
            ("├─ ", "│  ")
        };
        render(
            child,
            &format!("{rest}{branch}"),
            &format!("{rest}{cont}"),
            out,
        );
    }
}

fn push_wrapped(out: &mut Vec<String>, first: &str, rest: &str, text: &str) {
    out.extend(super::output::wrap(first, rest, text, WIDTH));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapped_lines_fit_and_keep_every_word() {
        let mut out = Vec::new();
        let text = "✘ unsigned: the device is not signed by the self-signing key of the user, which it should be, and a-very-long-word-that-does-not-fit-anywhere-at-all-in-eighty-columns-of-a-terminal-window";
        push_wrapped(&mut out, "│  ├─ ", "│  │    ", text);
        assert!(out.len() > 2, "{out:?}");
        for l in &out {
            assert!(l.chars().count() <= WIDTH, "{l:?}");
        }
        let joined: String = out
            .iter()
            .map(|l| l.trim_start_matches(['│', '├', '─', ' ']))
            .collect::<Vec<_>>()
            .join(" ");
        assert!(joined.contains("self-signing key of the user"), "{joined}");
        assert_eq!(
            joined.replace(' ', "").len(),
            text.replace(' ', "").len(),
            "{joined}"
        );
    }
}
