//! Logging in once (the PIN asked for when a private key is first used) and the pool of
//! sessions every operation borrows from.

use std::ops::Deref;
use std::sync::atomic::Ordering;

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::{Session, UserType};

use super::Pkcs11Store;
use super::module::pin_status;
use crate::token::TokenError;
use crate::token::pin::{NoPins, PinProvider, PinRequest, PinStatus, read_pin_file};

impl Pkcs11Store {
    /// Logs in with the PIN from the provider given to [`Pkcs11Store::open_lazy`], unless
    /// that was done already.
    pub fn login(&self) -> Result<(), TokenError> {
        if self.is_logged_in() {
            return Ok(());
        }
        match self.pins.clone() {
            Some(p) => self.login_with(&*p),
            None => self.login_with(&NoPins),
        }
    }

    /// Whether the session is logged in (or the token needs no login).
    pub fn is_logged_in(&self) -> bool {
        self.logged_in.load(Ordering::Acquire)
    }

    /// Logs in once with a PIN from `pins` (the URI's `pin-source` first). A refused PIN
    /// is remembered: it is never sent a second time by this store.
    pub fn login_with(&self, pins: &dyn PinProvider) -> Result<(), TokenError> {
        let mut state = self.login.lock().unwrap_or_else(|e| e.into_inner());
        let protected_path = match &*state {
            LoginState::Done => return Ok(()),
            LoginState::Refused(reason) => {
                return Err(TokenError::NoPin {
                    token: self.summary.to_string(),
                    reason: reason.clone(),
                });
            }
            LoginState::Pending { protected_path } => *protected_path,
        };
        let token = self.summary.to_string();
        let status = self.pin_status_before_login;
        if status.locked {
            return Err(TokenError::PinLocked { token });
        }
        let session = self.session()?;
        let shown = crate::text::escape(&token).into_owned();
        tracing::info!(
            "C_Login on {shown}{}",
            if protected_path {
                " (the PIN is entered on the device)"
            } else {
                ""
            }
        );
        let login = if protected_path {
            // A PIN pad on the device: the PIN is entered there.
            session.login(UserType::User, None)
        } else {
            let pin = match &self.pin_source {
                Some(p) => read_pin_file(p)?,
                None => pins.pin(&PinRequest {
                    token: token.clone(),
                    status,
                })?,
            };
            session.login(UserType::User, Some(&pin))
        };
        let refused = |state: &mut LoginState, e: TokenError| {
            *state = LoginState::Refused(format!(
                "the token refused the PIN earlier ({e}); it is not sent again"
            ));
            Err(e)
        };
        match login {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {
                tracing::debug!("C_Login on {shown}: logged in");
                *state = LoginState::Done;
                self.logged_in.store(true, Ordering::Release);
                Ok(())
            }
            Err(CkError::Pkcs11(RvError::PinIncorrect, _))
            | Err(CkError::Pkcs11(RvError::PinInvalid, _))
            | Err(CkError::Pkcs11(RvError::PinLenRange, _)) => {
                let after = self
                    .ctx
                    .get_token_info(self.slot)
                    .map(|i| pin_status(&i))
                    .unwrap_or_default();
                let e = if after.locked {
                    TokenError::PinLocked { token }
                } else {
                    TokenError::WrongPin {
                        token,
                        status: after,
                    }
                };
                refused(&mut state, e)
            }
            Err(CkError::Pkcs11(RvError::PinLocked, _)) => {
                refused(&mut state, TokenError::PinLocked { token })
            }
            Err(e) => Err(self.dev("C_Login")(e)),
        }
    }

    /// What the token said about its PIN retry counter before this login (a warning for
    /// the user when someone has been trying PINs).
    pub fn pin_status_before_login(&self) -> PinStatus {
        self.pin_status_before_login
    }

    pub(super) fn session(&self) -> Result<PooledSession<'_>, TokenError> {
        let pooled = self.pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let session = match pooled {
            Some(s) => s,
            None => self
                .ctx
                .open_rw_session(self.slot)
                .map_err(self.dev("C_OpenSession"))?,
        };
        Ok(PooledSession {
            store: self,
            session: Some(session),
        })
    }
}

/// Where the login stands. A refused PIN is never sent twice.
pub(super) enum LoginState {
    Pending { protected_path: bool },
    Done,
    Refused(String),
}

pub(super) struct PooledSession<'a> {
    store: &'a Pkcs11Store,
    session: Option<Session>,
}

impl Deref for PooledSession<'_> {
    type Target = Session;
    fn deref(&self) -> &Session {
        // Only `None` after drop.
        self.session.as_ref().expect("session present until drop")
    }
}

impl Drop for PooledSession<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            self.store
                .pool
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(s);
        }
    }
}
