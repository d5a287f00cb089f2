//! mxhsm keeps a Matrix user's most valuable private keys in hardware.
//!
//! The cross-signing keys (master, self-signing, user-signing; Ed25519) and the key-backup
//! key (X25519) live on a PKCS#11 token or a YubiKey's PIV application. Every signature and
//! every agreement happens on the device; software does only HKDF, AES, HMAC and canonical
//! JSON.
//!
//! ```text
//!   our device ──signed by──▶ SSK ◀──signed by── MSK ──signs──▶ USK ──signs──▶ Bob's MSK
//!   (Olm, software)          (token)            (token)        (token)           │
//!                                                 │                          Bob's SSK
//!                                      signs backup auth_data                    │
//!                                                 ▼                         Bob's devices
//!                            backup key (X25519, token): ECDH per session
//! ```
//!
//! Layers (data flows one way, top to bottom; `cli` is the binary):
//!
//! * [`account`] — the flows: [`account::login`], [`account::identity`] (create, publish,
//!   status), [`account::sign`] (devices, users), [`account::backup`], [`account::restore`],
//!   [`account::secret_storage`]. They take confirmations, passwords and progress as
//!   callbacks, return typed results, and never print or prompt;
//! * [`token`] — the hardware boundary, the only code that knows PKCS#11 or PIV, seen
//!   through [`token::KeyStore`]; [`token::Store`] opens either kind;
//! * [`matrix`] — pure Matrix formats and crypto: canonical JSON, signed objects,
//!   cross-signing trust, key backup, secret storage, key export files;
//! * [`homeserver`] — the Client-Server API client: bounded answers, https only, retries
//!   only where safe;
//! * [`text`], [`files`], [`paths`], [`config`] — escaping untrusted text, secret files,
//!   private directories, which token.
//!
//! A bot that cross-signs its own new device with the key in an HSM:
//!
//! ```no_run
//! use std::sync::Arc;
//! use mxhsm::{ClientOptions, Credential, LoginRequest, Store, StoreOptions, TokenChoice};
//! use mxhsm::token::{pin::PinSources, pkcs11::Pkcs11Uri};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let uri = Pkcs11Uri::parse("pkcs11:token=bots?module-path=/usr/lib/softhsm/libsofthsm2.so")?;
//! let store = Store::open(
//!     &TokenChoice::Pkcs11(Box::new(uri)),
//!     StoreOptions::default(),
//!     Arc::new(PinSources::non_interactive(None)),
//! )?;
//! let outcome = mxhsm::account::login::login(
//!     LoginRequest {
//!         homeserver: "https://matrix.example.org",
//!         user: Some("@bot:example.org"),
//!         credential: Credential::AccessToken("syt_…".to_string().into()),
//!         device_id: None,
//!         device_name: "bot".into(),
//!         replace: false,
//!         options: ClientOptions::default(),
//!         token: None,
//!     },
//!     &mxhsm::homeserver::Sessions::at("sessions"),
//!     Some(store),
//! )?;
//! # let _ = outcome; Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub mod account;
pub mod config;
pub mod files;
pub mod homeserver;
pub mod matrix;
pub mod paths;
pub mod text;
pub mod token;

pub use account::login::{Credential, LoginOutcome, LoginRequest};
pub use account::{Account, AccountError, PublishedIdentity};
pub use homeserver::{Client, ClientOptions, HomeserverError, Session};
pub use matrix::keys::{Curve25519PublicKey, Ed25519PublicKey, KeyRole};
pub use token::{KeyInfo, KeyStore, Store, StoreOptions, TokenChoice, TokenError};
