//! The other clients of the demo, over plain HTTP: registration, and a phone played by a
//! vodozemac Olm account.

use serde_json::{Value, json};

use crate::Result;

pub struct User {
    pub user_id: String,
    pub localpart: String,
    pub password: String,
}

fn call(hs: &str, path: &str, token: Option<&str>, body: Value) -> Result<Value> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut req = agent.post(format!("{hs}/_matrix/client/v3{path}"));
    if let Some(t) = token {
        req = req.header("Authorization", format!("Bearer {t}"));
    }
    let mut resp = req.send_json(body).map_err(|e| format!("{path}: {e}"))?;
    let status = resp.status();
    let v: Value = resp
        .body_mut()
        .read_json()
        .map_err(|e| format!("{path}: {e}"))?;
    if status != 200 {
        return Err(format!("{path}: {status} {v}"));
    }
    Ok(v)
}

pub fn register(hs: &str, localpart: &str) -> Result<User> {
    let password = format!("{localpart}-demo-password");
    let v = call(
        hs,
        "/register",
        None,
        json!({"username": localpart, "password": password, "auth": {"type": "m.login.dummy"}}),
    )?;
    let user_id = v["user_id"].as_str().ok_or("no user_id")?.to_string();
    eprintln!("registered {user_id}");
    Ok(User {
        user_id,
        localpart: localpart.into(),
        password,
    })
}

/// Logs in as `user` with device `device_id` and uploads an Olm account's device keys.
/// Returns the device's access token.
pub fn phone(hs: &str, user: &User, device_id: &str) -> Result<String> {
    let v = call(
        hs,
        "/login",
        None,
        json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user.localpart},
               "password": user.password, "device_id": device_id, "initial_device_display_name": "Alice's phone"}),
    )?;
    let token = v["access_token"].as_str().ok_or("no access token")?;
    let account = vodozemac::olm::Account::new();
    let mut keys = json!({
        "user_id": user.user_id, "device_id": device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {
            format!("curve25519:{device_id}"): account.curve25519_key().to_base64(),
            format!("ed25519:{device_id}"): account.ed25519_key().to_base64(),
        },
    });
    // serde_json's Value sorts keys and writes no spaces: canonical JSON for this object.
    let canonical = serde_json::to_string(&keys).map_err(|e| e.to_string())?;
    keys["signatures"] = json!({ &user.user_id: { format!("ed25519:{device_id}"): account.sign(canonical.as_bytes()).to_base64() } });
    call(
        hs,
        "/keys/upload",
        Some(token),
        json!({"device_keys": keys}),
    )?;
    eprintln!(
        "{device_id} uploaded its keys; Ed25519 fingerprint {}",
        account.ed25519_key().to_base64()
    );
    Ok(token.to_string())
}

/// The master key `of` publishes, as `viewer` sees it (what Bob would read out to Alice).
pub fn master_key(hs: &str, viewer: &User, of: &str) -> Result<String> {
    let v = call(
        hs,
        "/login",
        None,
        json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": viewer.localpart}, "password": viewer.password}),
    )?;
    let token = v["access_token"].as_str().ok_or("no access token")?;
    let q = call(
        hs,
        "/keys/query",
        Some(token),
        json!({"device_keys": {of: []}}),
    )?;
    let keys = q["master_keys"][of]["keys"]
        .as_object()
        .ok_or("no master key")?;
    let key = keys
        .values()
        .next()
        .and_then(Value::as_str)
        .ok_or("no master key")?;
    Ok(key.to_string())
}

/// Logs in as `user` (a fresh device): the access token.
pub fn access_token(hs: &str, user: &User) -> Result<String> {
    let v = call(
        hs,
        "/login",
        None,
        json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user.localpart}, "password": user.password}),
    )?;
    Ok(v["access_token"]
        .as_str()
        .ok_or("no access token")?
        .to_string())
}

/// A backup for `user`, through `cmd` (an mxhsm command with the token and data
/// directory set): login, identity, backup. Returns (version, public key, an access token
/// of a second device for filling the backup).
pub fn account_with_backup(
    hs: &str,
    user: &User,
    cmd: impl Fn(&[&str]) -> std::process::Command,
) -> Result<(String, String, String)> {
    let quiet = |args: &[&str]| {
        let mut c = cmd(args);
        c.stdout(std::process::Stdio::null());
        crate::run(&mut c)
    };
    quiet(&["login", "--homeserver", hs, "--user", &user.localpart])?;
    quiet(&["identity", "create"])?;
    let out = cmd(&["--json", "backup", "create"])
        .output()
        .map_err(|e| e.to_string())?;
    let created: Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("backup create: {e}"))?;
    let version = created["backup_version"].as_str().ok_or("no version")?;
    let public = created["public_key"].as_str().ok_or("no public key")?;
    Ok((version.into(), public.into(), access_token(hs, user)?))
}

/// Backs up `n` new megolm sessions (vodozemac) to backup `version`, encrypted to
/// `public_key` as any client does it; in rooms of 500 sessions, 1000 per request.
pub fn fill_backup(hs: &str, token: &str, version: &str, public_key: &str, n: usize) -> Result {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD_NO_PAD;
    let pk = vodozemac::Curve25519PublicKey::from_base64(public_key).map_err(|e| e.to_string())?;
    let enc = vodozemac::pk_encryption::PkEncryption::from_key(pk);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut done = 0;
    while done < n {
        let mut rooms = json!({});
        for i in done..(done + 1000).min(n) {
            let outbound =
                vodozemac::megolm::GroupSession::new(vodozemac::megolm::SessionConfig::version_1());
            let mut inbound = vodozemac::megolm::InboundGroupSession::new(
                &outbound.session_key(),
                vodozemac::megolm::SessionConfig::version_1(),
            );
            let key = inbound.export_at(0).ok_or("export")?.to_base64();
            let plain = json!({"algorithm": "m.megolm.v1.aes-sha2", "sender_key": "WimPd2udAU/1S/+YBpPbmr9L+0H5H+BnAVHSwDxlPGc",
                "session_key": key, "sender_claimed_keys": {"ed25519": "Bhbpt6hqMZlSH4sJV7xiEEEiPVeTWz4Vkujl1EMdIPI"},
                "forwarding_curve25519_key_chain": []});
            let m = enc
                .encrypt(plain.to_string().as_bytes())
                .map_err(|e| e.to_string())?;
            rooms[format!("!room{}:localhost", i / 500)]["sessions"][outbound.session_id()] = json!({
                "first_message_index": 0, "forwarded_count": 0, "is_verified": false,
                "session_data": {"ephemeral": m.ephemeral_key.to_base64(), "ciphertext": b64.encode(&m.ciphertext), "mac": b64.encode(&m.mac)}});
        }
        let mut resp = agent
            .put(format!(
                "{hs}/_matrix/client/v3/room_keys/keys?version={version}"
            ))
            .header("Authorization", format!("Bearer {token}"))
            .send_json(json!({"rooms": rooms}))
            .map_err(|e| e.to_string())?;
        if resp.status() != 200 {
            return Err(format!(
                "PUT room_keys: {} {}",
                resp.status(),
                resp.body_mut().read_to_string().unwrap_or_default()
            ));
        }
        done = (done + 1000).min(n);
        eprint!("\rbacked up {done}/{n} sessions");
    }
    eprintln!();
    Ok(())
}
