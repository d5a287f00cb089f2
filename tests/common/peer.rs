//! The matrix-sdk-crypto peer (hsm-config/sdk-peer): a real Matrix device run by the SDK's
//! `OlmMachine`, driven over its stdin/stdout (one JSON command per line in, one JSON reply
//! per line out). `cargo xtask test` builds it and sets MXHSM_TEST_SDK_PEER. Its log (stderr)
//! goes to a file named in every failure message.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::Duration;

use serde_json::{Value, json};

use super::synapse::{Synapse, TestUser};

/// How long a reply may take beyond the command's own `timeout_ms` (default 30 s).
const SLACK: Duration = Duration::from_secs(30);

fn peer_binary() -> PathBuf {
    let p = std::env::var_os("MXHSM_TEST_SDK_PEER")
        .map(PathBuf::from)
        .expect("MXHSM_TEST_SDK_PEER is not set: run the tests with `cargo xtask test`");
    assert!(
        p.exists(),
        "the SDK peer {} (MXHSM_TEST_SDK_PEER) does not exist: run the tests with `cargo xtask test`",
        p.display()
    );
    p
}

/// One running peer; killed when dropped.
pub struct Peer {
    child: Child,
    stdin: ChildStdin,
    replies: Receiver<String>,
    /// The peer's stderr.
    pub log: PathBuf,
    pub device_id: String,
    /// The `timeout_ms` of the commands sent and not yet answered, oldest first.
    pending: std::collections::VecDeque<u64>,
}

impl Peer {
    /// Starts a peer that logs in as `user` with the device ID `device_id`.
    pub fn start(synapse: &Synapse, user: &TestUser, device_id: &str) -> Peer {
        let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("sdk-peer-{}-{device_id}.log", user.localpart));
        let stderr = std::fs::File::create(&log).expect("the peer's log file");
        let mut child = Command::new(peer_binary())
            .args(["--homeserver", &synapse.url, "--user", &user.user_id])
            .args(["--password", &user.password, "--device-id", device_id])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start the SDK peer");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, replies) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Peer {
            child,
            stdin,
            replies,
            log,
            device_id: device_id.to_string(),
            pending: Default::default(),
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends one command without waiting for its reply (for two peers that must wait at
    /// the same time); [`Peer::reply`] reads it.
    pub fn send(&mut self, cmd: Value) {
        let timeout = cmd["timeout_ms"].as_u64().unwrap_or(30_000);
        writeln!(self.stdin, "{cmd}")
            .and_then(|()| self.stdin.flush())
            .unwrap_or_else(|e| panic!("{}: cannot send {cmd}: {e}", self.device_id));
        self.pending.push_back(timeout);
    }

    /// The reply to the oldest command sent and not yet answered.
    pub fn reply(&mut self) -> Value {
        let timeout = self
            .pending
            .pop_front()
            .expect("no command is waiting for a reply");
        let wait = Duration::from_millis(timeout) + SLACK;
        match self.replies.recv_timeout(wait) {
            Ok(line) => serde_json::from_str(&line).unwrap_or_else(|e| {
                panic!("{}: a reply that is not JSON ({e}): {line}", self.device_id)
            }),
            Err(RecvTimeoutError::Timeout) => panic!(
                "{}: no reply within {wait:?}; its log ({}):\n{}",
                self.device_id,
                self.log.display(),
                self.log_text()
            ),
            Err(RecvTimeoutError::Disconnected) => panic!(
                "{}: the peer exited ({:?}); its log ({}):\n{}",
                self.device_id,
                self.child.try_wait(),
                self.log.display(),
                self.log_text()
            ),
        }
    }

    /// Sends a command and returns its reply.
    pub fn call(&mut self, cmd: Value) -> Value {
        self.send(cmd);
        self.reply()
    }

    /// Sends a command and returns its reply, which must be the event `event`.
    pub fn expect(&mut self, cmd: Value, event: &str) -> Value {
        let reply = self.call(cmd.clone());
        self.check(&cmd, reply, event)
    }

    /// The reply to the oldest waiting command, which must be the event `event`.
    pub fn expect_reply(&mut self, event: &str) -> Value {
        let reply = self.reply();
        self.check(&Value::Null, reply, event)
    }

    fn check(&self, cmd: &Value, reply: Value, event: &str) -> Value {
        assert_eq!(
            reply["event"],
            event,
            "{}: {cmd} answered {reply}; its log ({}):\n{}",
            self.device_id,
            self.log.display(),
            self.log_text()
        );
        reply
    }

    /// `ready`: the peer's user ID, device ID and identity keys once its keys are uploaded.
    pub fn ready(&mut self) -> Value {
        self.expect(json!({"cmd": "ready"}), "ready")
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One device of a `status` reply.
pub fn device<'a>(status: &'a Value, device_id: &str) -> &'a Value {
    status["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device_id"] == device_id)
        .unwrap_or_else(|| panic!("no {device_id} in {status}"))
}
