//! The PIV PIN: read the retry counter, send the PIN once, re-send the accepted PIN for keys
//! with PIN policy "always" and after another program used the card.

use secrecy::ExposeSecret;
use zeroize::Zeroizing;

use super::apdu::ApduError;
use super::discovery::unpanicked;
use super::{Card, PinState, YubiKeyStore};
use crate::token::pin::NoPins;
use crate::token::{
    KeyBackend, KeyInfo, PinPolicy, PinProvider, PinRequest, PinStatus, TokenError, TokenSummary,
};

impl YubiKeyStore {
    /// Verifies the PIN now, with `pins` (unless verified already).
    pub fn verify_pin_with(&self, pins: &dyn PinProvider) -> Result<(), TokenError> {
        let mut card = self.card();
        self.ensure_pin_with(&mut card, pins)
    }

    /// Verifies the PIN from the provider given to [`YubiKeyStore::open_lazy`] (unless
    /// verified already).
    pub fn verify_pin(&self) -> Result<(), TokenError> {
        let mut card = self.card();
        self.ensure_pin(&mut card)
    }

    pub(super) fn ensure_pin(&self, card: &mut Card) -> Result<(), TokenError> {
        match self.pins.clone() {
            Some(p) => self.ensure_pin_with(card, &*p),
            None => self.ensure_pin_with(card, &NoPins),
        }
    }

    pub(super) fn ensure_pin_with(
        &self,
        card: &mut Card,
        pins: &dyn PinProvider,
    ) -> Result<(), TokenError> {
        match &card.pin_state {
            PinState::Verified => return Ok(()),
            PinState::Refused(reason) => {
                return Err(TokenError::NoPin {
                    token: self.summary.to_string(),
                    reason: reason.clone(),
                });
            }
            PinState::Pending => {}
        }
        match verify_pin(card, &self.summary, pins) {
            Ok(_) => {
                card.pin_state = PinState::Verified;
                Ok(())
            }
            Err(e @ (TokenError::WrongPin { .. } | TokenError::PivPinBlocked { .. })) => {
                card.pin_state = PinState::Refused(format!(
                    "the card refused the PIN earlier ({e}); it is not sent again"
                ));
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// For keys with PIN policy "always": the PIN again, right before the use. If the card
    /// refuses it (the PIN was changed meanwhile), it is forgotten and never sent again.
    pub(super) fn reverify(&self, card: &mut Card, key: &KeyInfo) -> Result<(), TokenError> {
        if !matches!(
            key.backend,
            KeyBackend::Piv {
                pin: Some(PinPolicy::Always),
                ..
            }
        ) {
            return Ok(());
        }
        self.resend_pin(card)
    }

    /// After another program reset the card or selected an application on it: the
    /// connections back, PIV selected, and the PIN the card accepted at open sent again —
    /// once: if the card refuses it now (the PIN was changed), it is forgotten.
    pub(super) fn recover(&self, card: &mut Card, reset: bool) -> Result<(), TokenError> {
        let lost = |e: &dyn std::fmt::Display| {
            self.device_error("getting the card back after another program used it", e)
        };
        if reset {
            // The crate reconnects with a reset of its own; ours then reconnects as is.
            unpanicked("SELECT", || card.yk.reconnect())?.map_err(|e| lost(&e))?;
            card.raw.reconnect().map_err(|e| lost(&e))?;
        } else {
            card.raw.select_piv().map_err(|e| lost(&e))?;
        }
        card.mgm_authenticated = false;
        self.resend_pin(card)
    }

    /// Sends the PIN the card accepted at open again. If the card refuses it now (the PIN
    /// was changed), it is forgotten, so it is never sent a second time.
    pub(super) fn resend_pin(&self, card: &mut Card) -> Result<(), TokenError> {
        let Some(pin) = card.pin.take() else {
            return Err(TokenError::NoPin {
                token: self.summary.to_string(),
                reason: "the PIN was refused on an earlier re-verification; run the command again"
                    .into(),
            });
        };
        let result = send_pin(card, &self.summary.to_string(), &pin);
        if !matches!(
            result,
            Err(TokenError::WrongPin { .. } | TokenError::PivPinBlocked { .. })
        ) {
            card.pin = Some(pin);
        }
        result
    }
}

/// Reads the retry counter, asks `pins` for the PIN (unless it is blocked) and sends it
/// once. The card keeps it for keys with PIN policy "always".
pub(super) fn verify_pin(
    card: &mut Card,
    summary: &TokenSummary,
    pins: &dyn PinProvider,
) -> Result<PinStatus, TokenError> {
    let token = summary.to_string();
    let retries =
        unpanicked("VERIFY", || card.yk.get_pin_retries())?.map_err(|e| TokenError::Device {
            token: token.clone(),
            operation: "reading the PIN retry counter".into(),
            reason: e.to_string(),
        })?;
    let status = pin_status(retries);
    if retries == 0 {
        return Err(TokenError::PivPinBlocked { token });
    }
    tracing::info!(
        "PIV VERIFY PIN on {} ({retries} tries left)",
        crate::text::escape(&token)
    );
    let pin = pins.pin(&PinRequest {
        token: token.clone(),
        status,
    })?;
    // A PIV PIN is 6 to 8 bytes: anything else would be refused by the card and cost a try.
    let len = pin.expose_secret().len();
    if !(6..=8).contains(&len) {
        return Err(TokenError::NoPin {
            token,
            reason: format!(
                "a PIV PIN is 6 to 8 bytes long, this one is {len}; nothing was sent to the card"
            ),
        });
    }
    let pin = Zeroizing::new(pin.expose_secret().as_bytes().to_vec());
    send_pin(card, &token, &pin)?;
    card.pin = Some(pin);
    Ok(status)
}

/// VERIFY, sent by mxhsm itself from zeroized buffers (the crate would keep a copy of the
/// PIN in a buffer it never wipes).
pub(super) fn send_pin(card: &mut Card, token: &str, pin: &[u8]) -> Result<(), TokenError> {
    match card.raw.verify_pin(pin) {
        Ok(()) => Ok(()),
        Err(ApduError::Status(0x6983)) | Err(ApduError::Status(0x63c0)) => {
            Err(TokenError::PivPinBlocked {
                token: token.to_string(),
            })
        }
        Err(ApduError::Status(sw)) if sw & 0xfff0 == 0x63c0 => Err(TokenError::WrongPin {
            token: token.to_string(),
            status: pin_status((sw & 0x0f) as u8),
        }),
        Err(e) => Err(TokenError::Device {
            token: token.to_string(),
            operation: "verifying the PIN".into(),
            reason: e.to_string(),
        }),
    }
}

pub(super) fn pin_status(retries: u8) -> PinStatus {
    PinStatus {
        count_low: false,
        final_try: retries == 1,
        locked: retries == 0,
        retries: Some(retries.into()),
    }
}
