//! mxhsm keeps a Matrix user's most valuable private keys in hardware.
//!
//! The cross-signing keys (master, self-signing, user-signing; Ed25519) and the key-backup
//! key (X25519) live on a PKCS#11 token or a YubiKey's PIV application. Every signature and
//! every agreement happens on the device; software does only what the device cannot.
//!
//! Layers (data flows one way, top to bottom):
//!
//! * `cli` (in the binary) — commands, output, prompts;
//! * [`config`] — where the token is, how the PIN is found;
//! * [`token`] — the hardware boundary: the only code that knows PKCS#11 or PIV,
//!   seen from above through [`token::KeyStore`];
//! * [`matrix`] — pure Matrix formats: canonical JSON, signed objects, cross-signing trust.
#![forbid(unsafe_code)]

pub mod account;
pub mod config;
pub mod files;
pub mod homeserver;
pub mod matrix;
pub mod paths;
pub mod text;
pub mod token;
