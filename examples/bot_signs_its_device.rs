//! A bot whose cross-signing keys live in an HSM logs in with an access token and
//! cross-signs its own new device with the self-signing key on the token, so that clients
//! that exclude unsigned devices (MSC4153) talk to it.
//!
//! ```sh
//! MXHSM_PIN=… cargo run --example bot_signs_its_device -- \
//!     https://matrix.example.org @bot:example.org token.txt sessions/ \
//!     'pkcs11:token=bots?module-path=/usr/lib/softhsm/libsofthsm2.so'
//! ```
//!
//! The access token must belong to a device with no encryption keys yet (a fresh login);
//! the bot's identity must already be on the token and published (`mxhsm identity create`).

use std::sync::Arc;

use mxhsm::account::login::{self, Credential, CrossSigned, LoginOutcome, LoginRequest};
use mxhsm::homeserver::{ClientOptions, Sessions};
use mxhsm::token::pin::PinSources;
use mxhsm::token::pkcs11::Pkcs11Uri;
use mxhsm::token::{Store, StoreOptions, TokenChoice};
use secrecy::SecretString;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [homeserver, user, token_file, sessions_dir, uri] = args.as_slice() else {
        return Err(
            "usage: bot_signs_its_device HOMESERVER USER ACCESS_TOKEN_FILE SESSIONS_DIR PKCS11_URI"
                .into(),
        );
    };
    let access_token = SecretString::from(std::fs::read_to_string(token_file)?.trim().to_string());
    // The PIN from $MXHSM_PIN (a service would use pin-source= in the URI instead); it is
    // asked for only when the self-signing key is used.
    let store = Store::open(
        &TokenChoice::Pkcs11(Box::new(Pkcs11Uri::parse(uri)?)),
        StoreOptions::default(),
        Arc::new(PinSources::non_interactive(None)),
    )?;
    let outcome = login::login(
        LoginRequest {
            homeserver,
            user: Some(user),
            credential: Credential::AccessToken(access_token),
            device_id: None,
            device_name: "bot (keys in the HSM)".into(),
            replace: false,
            options: ClientOptions::from_env()?,
            token: Some(uri.clone()),
        },
        &Sessions::at(sessions_dir),
        Some(store),
    )?;
    match outcome {
        LoginOutcome::New {
            session,
            cross_signed: CrossSigned::Yes,
            ..
        } => println!(
            "device {} of {} is cross-signed",
            session.device_id, session.user_id
        ),
        LoginOutcome::New { session, .. } => {
            return Err(format!(
                "device {} is not cross-signed: the token does not hold the published identity",
                session.device_id
            )
            .into());
        }
        LoginOutcome::Reused(session) => {
            println!("already logged in as device {}", session.device_id)
        }
    }
    Ok(())
}
