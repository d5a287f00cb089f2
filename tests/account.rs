//! The flows through the library, as a bot or a GUI would call them (no binary): login,
//! identity, signing devices and users, backup, and errors that say what failed. Against a
//! real Synapse and SoftHSM; what the server stores is checked with independent code.

mod common;

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD as B64;
use common::clients::{phone, software_identity, verifies};
use common::synapse::Synapse;
use common::{Kind, TestToken, fixed_pin};
use mxhsm::account::identity::{self, CreateOptions, PublishPrompts};
use mxhsm::account::login::{self, Credential, CrossSigned, LoginOutcome, LoginRequest};
use mxhsm::account::sign::{self, DeviceSelection};
use mxhsm::account::{Account, AccountError, backup};
use mxhsm::homeserver::{ClientOptions, HomeserverError};
use mxhsm::token::{Store, StoreOptions, TokenChoice, TokenError};
use secrecy::SecretString;
use serde_json::Value;

fn query(synapse: &Synapse, token: &str, user: &str) -> Value {
    let (status, v) = common::synapse::http(
        &synapse.url,
        "POST",
        "/keys/query",
        Some(token),
        Some(serde_json::json!({"device_keys": {user: []}})),
    );
    assert_eq!(status, 200, "{v}");
    v
}

#[test]
fn every_flow_through_the_library() {
    let synapse = Synapse::get();
    let alice = synapse.register("lib");
    let token = TestToken::new(Kind::SoftHsm);
    let sessions = mxhsm::homeserver::Sessions::at(token.dir.path().join("sessions"));
    let password = alice.password.clone();
    let ask_password = move || -> Result<SecretString, HomeserverError> {
        Ok(SecretString::from(password.clone()))
    };

    // Login: a new device; nothing to cross-sign it with yet.
    let outcome = login::login(
        LoginRequest {
            homeserver: &synapse.url,
            user: Some(&alice.localpart),
            credential: Credential::Password(&ask_password),
            device_id: None,
            device_name: "library test".into(),
            replace: false,
            options: ClientOptions::default(),
            token: None,
        },
        &sessions,
        Some(Store::from(token.open())),
    )
    .unwrap();
    let LoginOutcome::New {
        session,
        cross_signed: CrossSigned::NotPublished,
        ..
    } = outcome
    else {
        panic!("{outcome:?}")
    };
    let account = Account::open(
        session,
        Store::from(token.open()),
        &ClientOptions::default(),
    )
    .unwrap();
    let me = alice.user_id.as_str();

    // Identity: made on the token and published; nothing to replace.
    let published = identity::create(
        &account,
        CreateOptions {
            import: None,
            no_publish: false,
            replace: false,
        },
        PublishPrompts {
            confirm_replace: &mut |r| panic!("nothing to replace, asked about {r:?}"),
            password: &ask_password,
        },
    )
    .unwrap();
    assert!(
        published.published && published.device_signed,
        "{published:?}"
    );
    let status = identity::status(&account, &[]).unwrap();
    assert!(!status.has_problems(), "{:?}", status.report);
    assert_eq!(status.own.master, published.master);

    // Signing devices: the callback sees exactly the unsigned phone, with its own key.
    let (phone_token, phone_key) = phone(synapse, &alice, "PHONE");
    let signed = sign::sign_devices(&account, &DeviceSelection::AllUnsigned, &mut |offered| {
        let ids: Vec<&str> = offered.iter().map(|c| c.device_id.as_str()).collect();
        assert_eq!(ids, ["PHONE"]);
        assert_eq!(
            offered[0].ed25519.map(|k| *k.as_bytes()),
            Some(phone_key.verifying_key().to_bytes())
        );
        assert!(offered[0].self_signature.is_ok());
        Ok(vec!["PHONE".to_string()])
    })
    .unwrap();
    assert_eq!(signed.signed, ["PHONE"]);
    let ssk = published.self_signing.to_base64();
    let q = query(synapse, &phone_token, me);
    assert!(verifies(&q["device_keys"][me]["PHONE"], me, &ssk));
    // mxhsm's device vouches for the master key with its device key, as Element does.
    let device_key = mxhsm::account::olm_account(account.session())
        .unwrap()
        .ed25519_key()
        .to_base64();
    let sig_id = format!("ed25519:{}", account.device_id());
    let master_obj = &q["master_keys"][me];
    let sig = master_obj["signatures"][me][&sig_id]
        .as_str()
        .expect("a device signature");
    let vk = ed25519_dalek::VerifyingKey::from_bytes(
        &B64.decode(&device_key).unwrap().try_into().unwrap(),
    )
    .unwrap();
    let sig = ed25519_dalek::Signature::from_slice(&B64.decode(sig).unwrap()).unwrap();
    vk.verify_strict(common::clients::canonical(master_obj).as_bytes(), &sig)
        .expect("the device's signature over the master key verifies");

    // A device the callback turns down is not signed, and the error is the callback's.
    phone(synapse, &alice, "TABLET");
    let err = sign::sign_devices(
        &account,
        &DeviceSelection::Named(vec!["TABLET".into()]),
        &mut |_| Err(AccountError::Cancelled),
    )
    .unwrap_err();
    assert!(matches!(err, AccountError::Cancelled), "{err}");
    let q = query(synapse, &phone_token, me);
    assert!(!verifies(&q["device_keys"][me]["TABLET"], me, &ssk));

    // Signing another user: the callback is shown the master key the server serves.
    let bob = synapse.register("libbob");
    let bob_token = synapse.login(&bob, "BOBPHONE");
    let bob_msk = software_identity(synapse, &bob, &bob_token);
    let candidate = sign::sign_user(&account, &bob.user_id, &mut |c| {
        assert_eq!(*c.master_key.as_bytes(), bob_msk.verifying_key().to_bytes());
        Ok(())
    })
    .unwrap();
    assert_eq!(candidate.user_id, bob.user_id);
    let q = query(synapse, &phone_token, &bob.user_id);
    assert!(verifies(
        &q["master_keys"][&bob.user_id],
        me,
        &published.user_signing.to_base64()
    ));

    // Backup: made with its key on the token, and judged ours.
    let created = backup::create(&account, None, false, &mut |r| {
        panic!("nothing to replace, asked about {r:?}")
    })
    .unwrap();
    assert!(!created.reused);
    let status = backup::status(&account).unwrap().expect("a backup");
    assert_eq!(status.version, created.version);
    assert!(status.is_token_key() && status.signed_by_master.is_ok());
    assert!(!status.has_problems());
    // Other clients are told to use it (MSC4287, and Element's current form).
    for (kind, content) in [
        ("m.key_backup", serde_json::json!({"enabled": true})),
        (
            "m.org.matrix.custom.backup_disabled",
            serde_json::json!({"disabled": false}),
        ),
    ] {
        let (st, v) = common::synapse::http(
            &synapse.url,
            "GET",
            &format!("/user/{me}/account_data/{kind}"),
            Some(&phone_token),
            None,
        );
        assert_eq!((st, v), (200, content), "{kind}");
    }

    // A wrong PIN comes back as the token's own error, so a caller can tell it from a
    // missing card: nothing is signed. (The token is opened once per process: a second
    // store fails at once until the account lets go of it.)
    let open_wrong = || {
        Store::open(
            &TokenChoice::Pkcs11(Box::new(token.parsed_uri())),
            StoreOptions::default(),
            Arc::new(fixed_pin("999999")),
        )
    };
    assert!(matches!(open_wrong(), Err(TokenError::AlreadyOpen { .. })));
    drop(account);
    let wrong = open_wrong().unwrap();
    let session = sessions.load(&alice.user_id).unwrap();
    let account = Account::open(session, wrong, &ClientOptions::default()).unwrap();
    let err = sign::sign_devices(
        &account,
        &DeviceSelection::Named(vec!["TABLET".into()]),
        &mut |_| Ok(vec!["TABLET".into()]),
    )
    .unwrap_err();
    assert!(
        matches!(err.token_error(), Some(TokenError::WrongPin { .. })),
        "{err:?}"
    );
    let q = query(synapse, &phone_token, me);
    assert!(!verifies(&q["device_keys"][me]["TABLET"], me, &ssk));
}
