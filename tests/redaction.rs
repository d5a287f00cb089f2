//! The `Debug` output of every type that holds a secret, pinned: a regression that prints
//! a key, a PIN, a password or an access token fails here.

use mxhsm::homeserver::{Client, ClientOptions, Session};
use mxhsm::matrix::backup::{EncryptedSessionData, RoomKey};
use mxhsm::matrix::secret_storage::StorageKey;
use mxhsm::token::pin::PinSources;
use mxhsm::token::{SecretKeyBytes, SharedSecret};
use secrecy::SecretString;
use serde_json::json;

#[test]
fn secret_holding_types_print_no_secret() {
    assert_eq!(
        format!("{:?}", SecretKeyBytes::new([7u8; 32])),
        "SecretKeyBytes([redacted])"
    );
    assert_eq!(
        format!("{:?}", SharedSecret::new([9u8; 32]).unwrap()),
        "SharedSecret([redacted])"
    );
    assert_eq!(
        format!("{:?}", StorageKey::from_bytes([3u8; 32])),
        "StorageKey([redacted])"
    );
    let session = Session {
        homeserver: "https://matrix.example.org".into(),
        user_id: "@alice:example.org".into(),
        device_id: "MXHSM".into(),
        access_token: SecretString::from("syt_secret_token".to_string()),
        olm_account: Some(SecretString::from("{\"pickled olm\":1}".to_string())),
        insecure_http: false,
        token: None,
    };
    let shown = format!("{session:?}");
    assert_eq!(
        shown,
        "Session { homeserver: \"https://matrix.example.org\", user_id: \"@alice:example.org\", device_id: \"MXHSM\", access_token: \"[redacted]\", .. }"
    );
    let client = Client::for_session(&session, &ClientOptions::default()).unwrap();
    let shown = format!("{client:?}");
    assert!(!shown.contains("syt_secret_token"), "{shown}");
    assert!(shown.starts_with("Client { url: HomeserverUrl"), "{shown}");
    let mut pins = PinSources::non_interactive(Some("/run/pin".into()));
    pins.prompt = Some(Box::new(|_| Ok(SecretString::from("123456".to_string()))));
    assert_eq!(
        format!("{pins:?}"),
        "PinSources { pin_file: Some(\"/run/pin\"), use_env: true, prompt: true }"
    );
    let key = RoomKey(json!({
        "room_id": "!r:example.org", "session_id": "SID",
        "session_key": "AQAAAAsecretsessionkey",
    }));
    assert_eq!(
        format!("{key:?}"),
        "RoomKey { room_id: Some(String(\"!r:example.org\")), session_id: Some(String(\"SID\")), .. }"
    );
    let data = EncryptedSessionData {
        ephemeral: mxhsm::Curve25519PublicKey::from_bytes([1u8; 32]),
        ciphertext: vec![2u8; 48],
        mac: vec![3u8; 8],
    };
    assert_eq!(
        format!("{data:?}"),
        "EncryptedSessionData { ephemeral: \"AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE\", ciphertext_len: 48, .. }"
    );
}
