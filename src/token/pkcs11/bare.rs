//! The yardstick for the agreement path: the same three PKCS#11 calls `x25519` makes
//! (`C_DeriveKey`, `C_GetAttributeValue`, `C_DestroyObject`), with nothing of mxhsm's around
//! them — no pool, no handle cache, no audit hook, one session per thread opened up front.
//! `token bench --overhead` runs it beside [`crate::token::KeyStore::x25519`] to show what mxhsm adds.

use std::time::Instant;

use cryptoki::object::AttributeType;

use super::Pkcs11Store;
use crate::token::{Curve25519PublicKey, KeyInfo, TokenError};

impl Pkcs11Store {
    /// Agreements per second of a bare loop over the module: `n` agreements of `key` with
    /// `peer`, shared out over `threads` threads, each with its own session.
    pub fn bare_x25519_rate(
        &self,
        key: &KeyInfo,
        peer: &Curve25519PublicKey,
        n: usize,
        threads: usize,
    ) -> Result<f64, TokenError> {
        self.login()?;
        let handle = {
            let session = self.session()?;
            self.private_handle(&session, key)?
        };
        let threads = threads.max(1);
        let sessions = (0..threads)
            .map(|_| {
                self.ctx
                    .open_rw_session(self.slot)
                    .map_err(self.dev("C_OpenSession"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let start = Instant::now();
        let results: Vec<Result<(), TokenError>> = std::thread::scope(|s| {
            let workers: Vec<_> = sessions
                .into_iter()
                .enumerate()
                .map(|(t, session)| {
                    let share = n / threads + usize::from(t < n % threads);
                    s.spawn(move || {
                        let (mechanism, template) = super::ecdh_derive(peer);
                        for _ in 0..share {
                            let derived = session
                                .derive_key(&mechanism, handle, &template)
                                .map_err(self.dev("C_DeriveKey (ECDH)"))?;
                            let value = session
                                .get_attributes(derived, &[AttributeType::Value])
                                .map_err(self.dev("C_GetAttributeValue"))?;
                            std::hint::black_box(value);
                            session
                                .destroy_object(derived)
                                .map_err(self.dev("C_DestroyObject"))?;
                        }
                        Ok(())
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| {
                    w.join()
                        .unwrap_or_else(|_| Err(self.bad_data("a bench thread panicked".into())))
                })
                .collect()
        });
        // Each thread closed its session when done, which is safe: the pool keeps the
        // application's first one open, so the login stays.
        let seconds = start.elapsed().as_secs_f64();
        results.into_iter().collect::<Result<(), _>>()?;
        Ok(n as f64 / seconds)
    }
}
