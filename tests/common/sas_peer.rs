//! A scripted SAS peer with raw HTTP: it plays the other device message by message, with
//! the info strings, commitment and MACs written here again (independently of
//! `mxhsm::matrix::sas`) and vodozemac's key agreement. The real matrix-sdk-crypto peer is
//! `peer.rs`; this one can also misbehave on purpose.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD as B64;
use ed25519_dalek::SigningKey;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::clients::canonical;
use super::synapse::http;

/// A device speaking to-device messages over raw HTTP.
pub struct RawPeer {
    pub url: String,
    pub token: String,
    pub user: String,
    pub device: String,
    pub key: SigningKey,
    since: Option<String>,
}

impl RawPeer {
    pub fn new(url: &str, token: &str, user: &str, device: &str, key: SigningKey) -> RawPeer {
        let mut p = RawPeer {
            url: url.into(),
            token: token.into(),
            user: user.into(),
            device: device.into(),
            key,
            since: None,
        };
        // Start from now: what was queued before is not part of this test.
        p.sync(0);
        p
    }

    pub fn send(&self, to_user: &str, to_device: &str, kind: &str, content: Value) {
        let txn = format!(
            "t{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        );
        let (st, v) = http(
            &self.url,
            "PUT",
            &format!("/sendToDevice/{kind}/{txn}"),
            Some(&self.token),
            Some(json!({"messages": {to_user: {to_device: content}}})),
        );
        assert_eq!(st, 200, "{v}");
    }

    fn sync(&mut self, timeout_ms: u64) -> Vec<Value> {
        let mut path = format!(
            "/sync?timeout={timeout_ms}&filter=%7B%22room%22%3A%7B%22rooms%22%3A%5B%5D%7D%7D"
        );
        if let Some(s) = &self.since {
            path.push_str(&format!("&since={s}"));
        }
        let (st, v) = http(&self.url, "GET", &path, Some(&self.token), None);
        assert_eq!(st, 200, "{v}");
        self.since = v["next_batch"].as_str().map(str::to_string);
        v.pointer("/to_device/events")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    }

    /// The content of the next to-device message of `kind` (others are dropped).
    pub fn expect(&mut self, kind: &str, within: Duration) -> Value {
        let start = Instant::now();
        while start.elapsed() < within {
            for e in self.sync(1000) {
                if e["type"] == kind {
                    return e["content"].clone();
                }
                assert_ne!(
                    e["type"], "m.key.verification.cancel",
                    "cancelled while waiting for {kind}: {e}"
                );
            }
        }
        panic!("no {kind} within {within:?}");
    }

    /// The next to-device message of any kind.
    pub fn next(&mut self, within: Duration) -> Value {
        let start = Instant::now();
        while start.elapsed() < within {
            if let Some(e) = self.sync(1000).into_iter().next() {
                return e;
            }
        }
        panic!("no message within {within:?}");
    }
}

/// The SAS info string, the first party being the one that sent the start.
pub fn sas_info(first: (&str, &str, &str), second: (&str, &str, &str), txn: &str) -> String {
    format!(
        "MATRIX_KEY_VERIFICATION_SAS|{}|{}|{}|{}|{}|{}|{txn}",
        first.0, first.1, first.2, second.0, second.1, second.2
    )
}

pub fn mac_info(sender: (&str, &str), receiver: (&str, &str), txn: &str) -> String {
    format!(
        "MATRIX_KEY_VERIFICATION_MAC{}{}{}{}{txn}",
        sender.0, sender.1, receiver.0, receiver.1
    )
}

/// sha256(key ‖ canonical JSON of the start content), unpadded base64.
pub fn commitment(key: &str, start: &Value) -> String {
    B64.encode(Sha256::digest(
        format!("{key}{}", canonical(start)).as_bytes(),
    ))
}

/// The `mac` and `keys` of a MAC message vouching for `keys`.
pub fn macs(
    sas: &vodozemac::sas::EstablishedSas,
    info: &str,
    keys: &BTreeMap<String, String>,
) -> (BTreeMap<String, String>, String) {
    let m = keys
        .iter()
        .map(|(id, k)| {
            (
                id.clone(),
                sas.calculate_mac(k, &format!("{info}{id}")).to_base64(),
            )
        })
        .collect();
    let ids: Vec<&str> = keys.keys().map(String::as_str).collect();
    let all = sas
        .calculate_mac(&ids.join(","), &format!("{info}KEY_IDS"))
        .to_base64();
    (m, all)
}

/// `mxhsm … --json` as a child: its JSON lines as they come, and its standard input.
pub struct JsonChild {
    pub child: Child,
    pub stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    pub seen: Vec<Value>,
}

impl JsonChild {
    pub fn spawn(mut cmd: std::process::Command) -> JsonChild {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start mxhsm");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        JsonChild {
            stdin: child.stdin.take(),
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The next event line (JSON), waiting up to `within`.
    pub fn event(&mut self, within: Duration) -> Value {
        let line = self
            .lines
            .recv_timeout(within)
            .unwrap_or_else(|_| panic!("no event within {within:?}; so far {:?}", self.seen));
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        super::json_doc::check_event(&v);
        self.seen.push(v.clone());
        v
    }

    /// Events until one named `name` (which is returned).
    pub fn until(&mut self, name: &str, within: Duration) -> Value {
        let start = Instant::now();
        loop {
            let left = within.saturating_sub(start.elapsed());
            let e = self.event(left);
            if e["event"] == name {
                return e;
            }
        }
    }

    pub fn answer(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    /// Waits for the exit code.
    pub fn exit(mut self, within: Duration) -> i32 {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code().unwrap_or(-1);
            }
            if start.elapsed() > within {
                let _ = self.child.kill();
                panic!("mxhsm did not exit; events {:?}", self.seen);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for JsonChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
