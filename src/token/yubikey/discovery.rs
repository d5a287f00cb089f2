//! Finding YubiKeys: listing them over PC/SC, opening one by serial, and one open store per
//! process.

use yubikey::YubiKey;

use super::MIN_FIRMWARE;
use crate::token::TokenError;

/// A YubiKey seen by [`list_yubikeys`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct YubiKeyEntry {
    pub serial: u32,
    pub firmware: String,
    pub reader: String,
    /// Whether the firmware has Ed25519/X25519 in PIV.
    pub supported: bool,
}

pub(super) fn pcsc_error(operation: &str, e: yubikey::Error) -> TokenError {
    let reason = match &e {
        yubikey::Error::PcscError {
            inner: Some(pcsc::Error::NoService),
        } => "pcscd is not running (start it, e.g. systemctl start pcscd.socket)".to_string(),
        yubikey::Error::PcscError {
            inner: Some(pcsc::Error::NoReadersAvailable),
        } => "no smart card reader is present".to_string(),
        other => other.to_string(),
    };
    TokenError::Device {
        token: "PC/SC".into(),
        operation: operation.into(),
        reason,
    }
}

/// Every YubiKey with a PIV application that PC/SC can reach.
///
/// Opening a card selects its PIV application, which makes it forget a verified PIN; so
/// this waits for any other mxhsm process using a YubiKey (see `process_lock`), and fails
/// if this process has one open.
pub fn list_yubikeys() -> Result<Vec<YubiKeyEntry>, TokenError> {
    let _lock = crate::token::process_lock::lock_yubikeys()?;
    let (found, _busy) = open_all()?;
    Ok(found
        .into_iter()
        .map(|yk| {
            let entry = entry_of(&yk);
            let _ = yk.disconnect(pcsc::Disposition::LeaveCard);
            entry
        })
        .collect())
}

/// Runs a `yubikey` crate call, turning a panic on a malformed card answer (the crate
/// indexes some answers without checking their length) into an error.
pub(super) fn unpanicked<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, TokenError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|_| {
        TokenError::BadTokenData {
            token: "the YubiKey".into(),
            what: format!("a malformed answer to {what}"),
        }
    })
}

pub(super) fn entry_of(yk: &YubiKey) -> YubiKeyEntry {
    let v = yk.version();
    YubiKeyEntry {
        serial: yk.serial().0,
        firmware: v.to_string(),
        reader: yk.name().to_string(),
        supported: (v.major, v.minor) >= MIN_FIRMWARE,
    }
}

/// Opens every reader holding a card with a PIV application. Also returns the readers that
/// are in exclusive use by another program.
pub(super) fn open_all() -> Result<(Vec<YubiKey>, Vec<String>), TokenError> {
    let mut ctx = match yubikey::reader::Context::open() {
        Ok(c) => c,
        Err(e) => return Err(pcsc_error("listing readers", e)),
    };
    let readers = match ctx.iter() {
        Ok(r) => r,
        Err(yubikey::Error::PcscError {
            inner: Some(pcsc::Error::NoReadersAvailable),
        }) => return Ok((Vec::new(), Vec::new())),
        Err(e) => return Err(pcsc_error("listing readers", e)),
    };
    let mut found = Vec::new();
    let mut busy = Vec::new();
    for reader in readers {
        // A reader without a YubiKey does not open: skip it.
        match unpanicked("opening the card", || reader.open()) {
            Ok(Ok(yk)) => found.push(yk),
            Ok(Err(yubikey::Error::PcscError {
                inner: Some(pcsc::Error::SharingViolation),
            })) => busy.push(format!(
                "reader {} (in exclusive use by another program, e.g. gpg's scdaemon)",
                reader.name()
            )),
            _ => {}
        }
    }
    Ok((found, busy))
}

pub(super) fn describe(e: &YubiKeyEntry) -> String {
    format!(
        "YubiKey serial {} (firmware {}, {})",
        e.serial, e.firmware, e.reader
    )
}

pub(super) fn release(found: Vec<YubiKey>) {
    for yk in found {
        let _ = yk.disconnect(pcsc::Disposition::LeaveCard);
    }
}
