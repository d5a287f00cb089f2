//! `mxhsm graph`: the account's key infrastructure as a diagram, laid out by Graphviz.
//!
//! What is drawn comes from the live account (the trust report of `identity status`, the
//! token's keys, the backup, secret storage) or, without a session, from the token alone.
//! The colour code is the one of the talk this project grew from:
//!
//! * red: what never leaves the token (the private keys);
//! * green: what is public (public keys, devices, other users' keys);
//! * orange: what is shared with trusted parties (the backup's room keys, secret storage);
//! * blue: signatures; purple: key agreement and encryption.
//!
//! A broken link is drawn dashed in red with the verdict's reason. Every node and edge
//! carries an SVG class (`private`, `public`, `shared`, `signature`, `agreement`,
//! `broken`, `holds`, `copy`, `legend`), so that a reader or a test can find them.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};

use mxhsm::account::backup::BackupStatus;
use mxhsm::account::identity::Status;
use mxhsm::account::secret_storage;
use mxhsm::matrix::cross_signing::Trust;
use mxhsm::token::{KeyInfo, KeyRole, TokenSummary, newest_by_role};

use super::GlobalArgs;
use super::output::{self, esc, note, say};
use super::tree::{protection, short, short_b64};

/// The longest text of a node line; server strings beyond it are cut.
const MAX_LINE: usize = 48;
/// An edge's label is wrapped at this width, to at most this many lines.
const EDGE_WIDTH: usize = 36;
const EDGE_LINES: usize = 6;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Class {
    Private,
    Public,
    Shared,
    /// A node that says something is wrong (a problem of the published identity).
    Problem,
}

impl Class {
    fn name(self) -> &'static str {
        match self {
            Class::Private => "private",
            Class::Public => "public",
            Class::Shared => "shared",
            Class::Problem => "problem",
        }
    }

    /// Border and fill.
    fn colours(self) -> (&'static str, &'static str) {
        match self {
            Class::Private => ("#c62828", "#ffcdd2"),
            Class::Public => ("#2e7d32", "#c8e6c9"),
            Class::Shared => ("#ef6c00", "#ffe0b2"),
            Class::Problem => ("#c62828", "#ffffff"),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Link {
    /// A signature that verifies.
    Signature,
    /// An agreement or encryption to a key.
    Agreement,
    /// A link that should hold and does not.
    Broken,
    /// A private key and its public half.
    Holds,
    /// A copy of a private key off the token.
    Copy,
}

impl Link {
    fn name(self) -> &'static str {
        match self {
            Link::Signature => "signature",
            Link::Agreement => "agreement",
            Link::Broken => "broken",
            Link::Holds => "holds",
            Link::Copy => "copy",
        }
    }

    fn style(self) -> &'static str {
        match self {
            Link::Signature => "color=\"#1565c0\", fontcolor=\"#1565c0\"",
            Link::Agreement => "color=\"#6a1b9a\", fontcolor=\"#6a1b9a\"",
            Link::Broken => "color=\"#c62828\", fontcolor=\"#c62828\", style=dashed, arrowhead=tee",
            Link::Holds => "color=\"#757575\", style=dotted, arrowhead=none",
            Link::Copy => "color=\"#ef6c00\", fontcolor=\"#ef6c00\", style=dashed",
        }
    }
}

/// A node; its DOT name is `n` and its index in `Graph::nodes`.
struct Node {
    lines: Vec<String>,
    class: Class,
    /// The cluster it is drawn in (an index into `Graph::clusters`).
    cluster: Option<usize>,
}

/// An edge between two nodes, by index.
struct Edge {
    from: usize,
    to: usize,
    label: String,
    link: Link,
}

/// A diagram being built: nodes, edges and clusters, written out as DOT.
pub struct Graph {
    title: String,
    clusters: Vec<(String, Class)>,
    nodes: Vec<Node>,
    edges: Vec<Edge>,
    /// The legend's cluster, once drawn.
    legend: Option<usize>,
}

/// Made safe inside a DOT quoted string, where `\` starts an escape (`\N`, `\G`, `\l`…).
fn dot_quoted(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// A node line for a DOT label: escaped for the terminal first (so that control and bidi
/// characters show as escapes), cut to `MAX_LINE` characters, then quoted for DOT.
fn dot_text(s: &str) -> String {
    let safe = esc(s);
    let mut cut: String = safe.chars().take(MAX_LINE).collect();
    if safe.chars().count() > MAX_LINE {
        cut.push('…');
    }
    dot_quoted(&cut)
}

/// An edge's or a cluster's label (a verdict with its reason): escaped, wrapped at `EDGE_WIDTH` columns,
/// at most `EDGE_LINES` lines, quoted for DOT.
fn edge_text(s: &str) -> String {
    let safe = esc(s);
    let mut lines = super::output::wrap("", "", &safe, EDGE_WIDTH);
    if lines.len() > EDGE_LINES {
        lines.truncate(EDGE_LINES);
        lines[EDGE_LINES - 1].push('…');
    }
    lines
        .iter()
        .map(|l| dot_quoted(l))
        .collect::<Vec<_>>()
        .join("\\n")
}

impl Graph {
    pub fn new(title: String) -> Graph {
        Graph {
            title,
            clusters: Vec::new(),
            nodes: Vec::new(),
            edges: Vec::new(),
            legend: None,
        }
    }

    fn cluster(&mut self, label: String, class: Class) -> usize {
        self.clusters.push((label, class));
        self.clusters.len() - 1
    }

    /// Adds a node and returns its index. `lines` are plain text (escaped when written).
    fn node(&mut self, class: Class, cluster: Option<usize>, lines: Vec<String>) -> usize {
        self.nodes.push(Node {
            lines,
            class,
            cluster,
        });
        self.nodes.len() - 1
    }

    fn edge(&mut self, from: usize, to: usize, link: Link, label: impl Into<String>) {
        self.edges.push(Edge {
            from,
            to,
            label: label.into(),
            link,
        });
    }

    /// A signature link from its verdict: verified, or broken with the reason.
    fn trust_edge(&mut self, from: usize, to: usize, what: &str, trust: &Trust) {
        match trust {
            Trust::Verified => self.edge(from, to, Link::Signature, what),
            Trust::ChainBroken(r) => self.edge(from, to, Link::Broken, format!("✘ broken: {r}")),
            Trust::Unsigned(r) => self.edge(from, to, Link::Broken, format!("✘ unsigned: {r}")),
        }
    }

    /// The legend: one node per colour, one edge per kind of link.
    fn legend(&mut self) {
        let c = self.cluster("legend".into(), Class::Public);
        self.legend = Some(c);
        let private = self.node(
            Class::Private,
            Some(c),
            vec!["never leaves the token".into()],
        );
        let public = self.node(Class::Public, Some(c), vec!["public".into()]);
        let shared = self.node(
            Class::Shared,
            Some(c),
            vec!["shared with trusted parties".into()],
        );
        let other = self.node(Class::Public, Some(c), vec!["…".into()]);
        self.edge(private, public, Link::Holds, "its public half");
        self.edge(public, other, Link::Signature, "signs");
        self.edge(public, shared, Link::Agreement, "encrypts to");
        self.edge(shared, other, Link::Broken, "✘ broken link");
    }

    /// The diagram as DOT text.
    pub fn to_dot(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "digraph mxhsm {{");
        let _ = writeln!(
            out,
            "  graph [rankdir=LR, fontname=\"Liberation Sans\", fontsize=12, labelloc=t, label=\"{}\"];",
            dot_text(&self.title)
        );
        out.push_str(
            "  node [shape=box, style=\"rounded,filled\", fontname=\"Liberation Sans\", fontsize=10];\n  edge [fontname=\"Liberation Sans\", fontsize=9];\n",
        );
        let in_legend = |n: &Node| self.legend.is_some() && n.cluster == self.legend;
        let write_node = |out: &mut String, i: usize, n: &Node, indent: &str| {
            let label = n
                .lines
                .iter()
                .map(|l| dot_text(l))
                .collect::<Vec<_>>()
                .join("\\n");
            let (border, fill) = n.class.colours();
            let legend = if in_legend(n) { " legend" } else { "" };
            let _ = writeln!(
                out,
                "{indent}n{i} [label=\"{label}\", class=\"{}{legend}\", color=\"{border}\", fillcolor=\"{fill}\"];",
                n.class.name(),
            );
        };
        for (i, (label, class)) in self.clusters.iter().enumerate() {
            let (border, _) = class.colours();
            let _ = writeln!(
                out,
                "  subgraph cluster_{i} {{\n    label=\"{}\"; color=\"{border}\"; style=rounded;",
                edge_text(label)
            );
            for (j, n) in self.nodes.iter().enumerate() {
                if n.cluster == Some(i) {
                    write_node(&mut out, j, n, "    ");
                }
            }
            out.push_str("  }\n");
        }
        for (j, n) in self.nodes.iter().enumerate() {
            if n.cluster.is_none() {
                write_node(&mut out, j, n, "  ");
            }
        }
        for e in &self.edges {
            let class = if in_legend(&self.nodes[e.from]) {
                format!("{} legend", e.link.name())
            } else {
                e.link.name().to_string()
            };
            let _ = writeln!(
                out,
                "  n{} -> n{} [label=\"{}\", class=\"{class}\", {}];",
                e.from,
                e.to,
                edge_text(&e.label),
                e.link.style()
            );
        }
        out.push_str("}\n");
        out
    }
}

/// The first line of a key node: its role and the start of its public key.
fn key_line(role: KeyRole, key: &KeyInfo) -> String {
    format!(
        "{} key {}",
        role_words(role),
        short_b64(&key.public_key_base64())
    )
}

fn role_words(role: KeyRole) -> &'static str {
    match role {
        KeyRole::Master => "master",
        KeyRole::SelfSigning => "self-signing",
        KeyRole::UserSigning => "user-signing",
        KeyRole::Backup => "backup",
        KeyRole::Audit => "audit",
    }
}

fn token_title(token: &TokenSummary) -> String {
    if token.manufacturer.contains("Yubico") {
        format!("YubiKey serial {}", token.serial)
    } else {
        format!("token \"{}\" (serial {})", token.label, token.serial)
    }
}

/// What the diagram of a live account is drawn from.
pub struct AccountParts<'a> {
    pub status: &'a Status,
    /// The token's keys of this account.
    pub keys: &'a [KeyInfo],
    pub token: &'a TokenSummary,
    pub backup: Option<&'a BackupStatus>,
    pub secrets: Option<&'a secret_storage::Status>,
}

/// The diagram of a live account.
pub fn account(p: &AccountParts<'_>) -> Graph {
    let own = &p.status.own;
    let report = &p.status.report;
    let mut g = Graph::new(format!("keys of {}", own.user_id));
    let token = g.cluster(
        format!("{} — private keys never leave it", token_title(p.token)),
        Class::Private,
    );
    // The token's current private keys, each with its public half.
    let current = newest_by_role(p.keys);
    let mut private = std::collections::BTreeMap::new();
    for role in [
        KeyRole::Master,
        KeyRole::SelfSigning,
        KeyRole::UserSigning,
        KeyRole::Backup,
    ] {
        if let Some(k) = current.get(&role) {
            let mut lines = vec![format!("{} private key", role_words(role))];
            if let mxhsm::token::KeyBackend::Piv { slot, .. } = &k.backend {
                lines.push(format!("slot {slot}"));
            }
            lines.push(protection(k));
            private.insert(role, g.node(Class::Private, Some(token), lines));
        }
    }
    let public_of = |g: &mut Graph, role: KeyRole, key: Option<String>| -> usize {
        let line = match key {
            Some(k) => format!("{} key {}", role_words(role), short_b64(&k)),
            None => format!("{} key: none on the token", role_words(role)),
        };
        let id = g.node(Class::Public, None, vec![line]);
        if let Some(&pk) = private.get(&role) {
            g.edge(pk, id, Link::Holds, "");
        }
        id
    };
    let master = public_of(&mut g, KeyRole::Master, Some(own.master.to_base64()));
    let ssk = public_of(
        &mut g,
        KeyRole::SelfSigning,
        own.self_signing.map(|k| k.to_base64()),
    );
    let usk = public_of(
        &mut g,
        KeyRole::UserSigning,
        own.user_signing.map(|k| k.to_base64()),
    );
    g.edge(master, ssk, Link::Signature, "signs");
    g.edge(master, usk, Link::Signature, "signs");
    if !report.own_identity.is_empty() {
        let mut lines = vec!["✘ the published identity is not the token's".to_string()];
        lines.extend(report.own_identity.iter().cloned());
        let problem = g.node(Class::Problem, None, lines);
        g.edge(master, problem, Link::Broken, "✘ as published");
    }
    // Our devices, signed by the self-signing key.
    for d in report.devices.iter().filter(|d| d.user_id == own.user_id) {
        let mut lines = vec![format!("device {}", d.device_id)];
        if d.device_id == p.status.this_device {
            lines[0].push_str(" (this mxhsm)");
        }
        if let Some(n) = &d.display_name {
            lines.push(format!("\"{n}\""));
        }
        if let Some(k) = &d.ed25519 {
            lines.push(short(k));
        }
        let dev = g.node(Class::Public, None, lines);
        g.trust_edge(ssk, dev, "signs", &d.trust);
    }
    // Other users: their master key signed by our user-signing key, and their devices.
    for u in &report.users {
        let line = match &u.master_key {
            Some(k) => format!("{} master key {}", u.user_id, short(k)),
            None => format!("{}: no master key", u.user_id),
        };
        let theirs = g.node(Class::Public, None, vec![line]);
        g.trust_edge(usk, theirs, "signs", &u.trust);
        for d in report.devices.iter().filter(|d| d.user_id == u.user_id) {
            let mut lines = vec![format!("device {}", d.device_id)];
            if let Some(n) = &d.display_name {
                lines.push(format!("\"{n}\""));
            }
            let dev = g.node(Class::Public, None, lines);
            g.trust_edge(theirs, dev, "signs (their self-signing key)", &d.trust);
        }
    }
    // The backup: room keys encrypted to the backup key, auth_data signed by the master key.
    match p.backup {
        None => {
            g.node(
                Class::Shared,
                None,
                vec!["key backup: none on the server".into()],
            );
        }
        Some(b) => {
            let backup = g.node(
                Class::Shared,
                None,
                vec![
                    format!("key backup version {}", b.version),
                    format!("{} room keys", b.count),
                ],
            );
            let key = if b.is_token_key() {
                public_of(&mut g, KeyRole::Backup, Some(b.public_key.clone()))
            } else {
                g.node(
                    Class::Public,
                    None,
                    vec![
                        format!("backup key {}", short_b64(&b.public_key)),
                        "✘ not a key on the token".into(),
                    ],
                )
            };
            if b.is_token_key() {
                g.edge(key, backup, Link::Agreement, "room keys encrypted to");
            } else {
                g.edge(
                    key,
                    backup,
                    Link::Broken,
                    "✘ encrypted to a key not on the token",
                );
            }
            match &b.signed_by_master {
                Ok(()) => g.edge(master, backup, Link::Signature, "signs auth_data"),
                Err(e) => g.edge(
                    master,
                    backup,
                    Link::Broken,
                    format!("✘ auth_data not trusted: {e}"),
                ),
            }
        }
    }
    // Secret storage: which secrets it holds; one that holds a token key is a copy of a
    // private key that, with the recovery key, works without the token.
    if let Some(s) = p.secrets {
        let mut lines = vec![match &s.default_key {
            Some(k) => format!("secret storage (key {k})"),
            None => "secret storage: no default key".into(),
        }];
        for x in &s.secrets {
            let state = if !x.on_server {
                "absent"
            } else if x.published_key.is_none() {
                "stale: nothing published for it"
            } else {
                match x.matches() {
                    Some(true) => "holds a copy of the token's key",
                    Some(false) => "stale: not the published key",
                    None => "present (not on the token)",
                }
            };
            lines.push(format!("{}: {state}", x.name));
        }
        let storage = g.node(Class::Shared, None, lines);
        for x in s
            .secrets
            .iter()
            .filter(|x| x.on_server && x.token_key.is_some())
        {
            if let Some(&pk) = private.get(&x.role) {
                g.edge(
                    storage,
                    pk,
                    Link::Copy,
                    format!("⚠ {}: may hold a copy", x.name),
                );
            }
        }
    }
    g.legend();
    g
}

/// The diagram of a token alone: for each user, the keys it holds and their attributes.
pub fn token_only(token: &TokenSummary, keys: &[KeyInfo]) -> Graph {
    let mut g = Graph::new(format!(
        "{} — private keys never leave it",
        token_title(token)
    ));
    let mut users: Vec<&str> = keys.iter().map(|k| k.user_id.as_str()).collect();
    users.sort_unstable();
    users.dedup();
    for user in users {
        let c = g.cluster(user.to_string(), Class::Private);
        let mine: Vec<&KeyInfo> = keys.iter().filter(|k| k.user_id == user).collect();
        let newest = newest_by_role(mine.iter().copied());
        for k in &mine {
            let current = newest
                .get(&k.role)
                .is_some_and(|n| n.public_key == k.public_key);
            let mut lines = vec![format!("{} private key", role_words(k.role))];
            lines.push(k.backend.to_string());
            lines.push(protection(k));
            if !current {
                lines.push("older key of this role".into());
            }
            let private = g.node(Class::Private, Some(c), lines);
            let public = g.node(Class::Public, Some(c), vec![key_line(k.role, k)]);
            g.edge(private, public, Link::Holds, "");
        }
    }
    if keys.is_empty() {
        g.node(
            Class::Public,
            None,
            vec!["no mxhsm keys on this token".into()],
        );
    }
    g.legend();
    g
}

/// The output format of `mxhsm graph`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// SVG, laid out by Graphviz's `dot`.
    Svg,
    /// PNG, laid out by Graphviz's `dot`.
    Png,
    /// The Graphviz source itself.
    Dot,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::Svg => "svg",
            Format::Png => "png",
            Format::Dot => "dot",
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct GraphArgs {
    /// Also draw this user (repeatable): their master key, whether our user-signing key
    /// signed it, and their devices. Users our user-signing key signed, as the audit log
    /// records, are drawn without it.
    #[arg(long = "user", value_name = "@USER:SERVER")]
    pub users: Vec<String>,
    /// The output format. svg and png need Graphviz (`apt install graphviz`); without it,
    /// the DOT text is written to standard output instead.
    #[arg(long, value_enum, default_value = "svg")]
    pub format: Format,
    /// Write the drawing to this new file (it must not exist). Default: standard output
    /// (not for png on a terminal).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Draw the token alone, without a session: which keys it holds for which users, and
    /// their attributes. Also what is drawn when no account is logged in.
    #[arg(long)]
    pub token_only: bool,
}

/// At most this many users are taken from the audit log (the most recently signed).
const MAX_AUDIT_USERS: usize = 50;

/// Lays `dot` out with Graphviz into `format`; `None` when `dot` is not installed.
fn layout(dot: &str, format: Format) -> Result<Option<Vec<u8>>> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let child = Command::new("dot")
        .arg(format!("-T{}", format.name()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => bail!("cannot run Graphviz's dot: {e}"),
        Ok(c) => c,
    };
    let mut stdin = child.stdin.take().context("dot's input")?;
    let text = dot.to_string();
    let writer = std::thread::spawn(move || stdin.write_all(text.as_bytes()));
    let out = child.wait_with_output().context("Graphviz's dot")?;
    let _ = writer.join();
    if !out.status.success() {
        bail!(
            "Graphviz's dot failed: {}",
            esc(String::from_utf8_lossy(&out.stderr).trim())
        );
    }
    Ok(Some(out.stdout))
}

pub fn run(global: &GlobalArgs, args: GraphArgs) -> Result<ExitCode> {
    use std::io::{IsTerminal, Write};
    // Inputs first, before a PIN is asked for.
    for u in &args.users {
        mxhsm::token::check_user_id(u)?;
    }
    if let Some(out) = &args.out
        && out.symlink_metadata().is_ok()
    {
        bail!(
            "{} already exists; mxhsm graph writes only a new file",
            out.display()
        );
    }
    if args.out.is_none() && global.json {
        bail!(
            "--json describes the file written with --out; without --out the drawing is the output"
        );
    }
    if args.out.is_none() && args.format == Format::Png && std::io::stdout().is_terminal() {
        bail!("a PNG is not for the terminal: give --out FILE, or redirect the output");
    }
    let account = if args.token_only {
        None
    } else {
        match super::open_account(global) {
            Ok(a) => Some(a),
            Err(e) if super::kind(&e) == "not_logged_in" => {
                note!("not logged in: drawing the token's keys alone (log in to draw the account)");
                None
            }
            Err(e) => return Err(e),
        }
    };
    let graph = match &account {
        Some(account) => {
            let mut users = args.users.clone();
            let log = super::audit::log_path(global);
            for (u, _) in super::audit::users_signed(&log, account.user_id())
                .into_iter()
                .take(MAX_AUDIT_USERS)
            {
                if !users.contains(&u) {
                    users.push(u);
                }
            }
            let status = mxhsm::account::identity::status(account, &users)?;
            let keys = account
                .store()
                .list_keys_with_protection(Some(account.user_id()))?;
            let backup = mxhsm::account::backup::status(account)?;
            let secrets = secret_storage::status(account)?;
            self::account(&AccountParts {
                status: &status,
                keys: &keys,
                token: account.keys().summary(),
                backup: backup.as_ref(),
                secrets: Some(&secrets),
            })
        }
        None => {
            let store = super::open_store(global)?;
            let keys = store.list_keys_with_protection(None)?;
            token_only(store.summary(), &keys)
        }
    };
    let dot = graph.to_dot();
    let (bytes, format) = match args.format {
        Format::Dot => (dot.into_bytes(), Format::Dot),
        f => match layout(&dot, f)? {
            Some(b) => (b, f),
            None if args.out.is_none() => {
                note!(
                    "Graphviz's dot is not installed (apt install graphviz): writing the DOT text instead"
                );
                (dot.into_bytes(), Format::Dot)
            }
            None => bail!(
                "Graphviz's dot is not installed (apt install graphviz); --format dot writes the DOT text without it"
            ),
        },
    };
    match &args.out {
        None => {
            let mut stdout = std::io::stdout().lock();
            match stdout.write_all(&bytes).and_then(|()| stdout.flush()) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(e.into()),
                _ => {}
            }
        }
        Some(out) => {
            let mut f = mxhsm::files::PrivateFile::create(out)
                .with_context(|| format!("cannot write {}", out.display()))?;
            f.write_all(&bytes)
                .and_then(|()| f.commit_new())
                .with_context(|| format!("cannot write {}", out.display()))?;
            output::emit(
                global.json,
                serde_json::json!({
                    "out": out.display().to_string(),
                    "format": format.name(),
                    "bytes": bytes.len(),
                    "token_only": account.is_none(),
                }),
                || {
                    say!(
                        "wrote {} ({}, {} bytes)",
                        out.display(),
                        format.name(),
                        bytes.len()
                    )
                },
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_from_the_server_cannot_break_out_of_a_label() {
        let mut g = Graph::new("t".into());
        let n = g.node(
            Class::Public,
            None,
            vec!["evil\" ]; n0 -> n0 [label=\"x\\N\u{202e}\n".into()],
        );
        g.edge(n, n, Link::Broken, "a\"b\\c");
        let dot = g.to_dot();
        let line = dot.lines().find(|l| l.starts_with("  n0 [")).unwrap();
        // The label is one quoted string: every quote in it is escaped, so the line
        // holds exactly the label's two quotes plus the attributes' own.
        let unescaped = line
            .replace("\\\\", "")
            .replace("\\\"", "")
            .matches('"')
            .count();
        assert_eq!(unescaped, 8, "{line}");
        assert!(!line.contains('\u{202e}'), "{line}");
        // Left of the escaped backslashes and quotes, no backslash remains that DOT would
        // read as an escape of its own (`\N`, the node's name).
        let bare = line.replace("\\\\", "").replace("\\\"", "");
        assert!(!bare.contains('\\'), "a DOT escape survived: {line}");
    }

    #[test]
    fn long_server_strings_are_cut() {
        let t = dot_text(&"x".repeat(1000));
        assert_eq!(t.chars().count(), MAX_LINE + 1);
        assert!(t.ends_with('…'));
    }
}
