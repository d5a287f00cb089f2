//! Restores the backed-up room keys of one room into memory with the backup key on the
//! token, and prints which sessions it got (never the keys).
//!
//! ```sh
//! MXHSM_PIN=… cargo run --example restore_room -- session.json \
//!     'pkcs11:token=alice?module-path=/usr/lib/softhsm/libsofthsm2.so' '!room:example.org'
//! ```

use std::path::Path;
use std::sync::Arc;

use mxhsm::account::{Account, restore};
use mxhsm::homeserver::{ClientOptions, Session};
use mxhsm::token::pin::PinSources;
use mxhsm::token::pkcs11::Pkcs11Uri;
use mxhsm::token::{Store, StoreOptions, TokenChoice};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [session_file, uri, room] = args.as_slice() else {
        return Err("usage: restore_room SESSION_FILE PKCS11_URI ROOM_ID".into());
    };
    let session = Session::load(Path::new(session_file))?;
    let store = Store::open(
        &TokenChoice::Pkcs11(Box::new(Pkcs11Uri::parse(uri)?)),
        StoreOptions::default(),
        Arc::new(PinSources::non_interactive(None)),
    )?;
    let account = Account::open(session, store, &ClientOptions::from_env()?)?;
    let restored = restore::restore_room(&account, room)?;
    println!(
        "backup version {}: {} session(s) of {room}, {} failed",
        restored.version,
        restored.keys.len(),
        restored.failed.len()
    );
    for key in &restored.keys {
        // A `RoomKey` is the export-file object; a client would import it into its store.
        println!("session {}", key.0["session_id"].as_str().unwrap_or("?"));
    }
    Ok(())
}
