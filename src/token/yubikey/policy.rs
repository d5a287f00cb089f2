//! PIN and touch policies: mxhsm's defaults, and their encodings in the yubikey crate and in
//! attestation certificates.

use crate::token::{KeyOptions, KeyRole, PinPolicy, TouchPolicy};

/// The PIV encodings of the policies, as in attestation certificates.
pub(super) fn pin_code(p: PinPolicy) -> u8 {
    match p {
        PinPolicy::Never => 1,
        PinPolicy::Once => 2,
        PinPolicy::Always => 3,
    }
}

pub(super) fn touch_code(t: TouchPolicy) -> u8 {
    match t {
        TouchPolicy::Never => 1,
        TouchPolicy::Always => 2,
        TouchPolicy::Cached => 3,
    }
}

/// PIN once for every key; touch always for the master key, cached for the others.
pub(super) fn default_policy(role: KeyRole, options: &KeyOptions) -> (PinPolicy, TouchPolicy) {
    (
        options.pin_policy.unwrap_or(PinPolicy::Once),
        options.touch_policy.unwrap_or(match role {
            KeyRole::Master => TouchPolicy::Always,
            _ => TouchPolicy::Cached,
        }),
    )
}

pub(super) fn piv_pin(p: PinPolicy) -> yubikey::PinPolicy {
    match p {
        PinPolicy::Never => yubikey::PinPolicy::Never,
        PinPolicy::Once => yubikey::PinPolicy::Once,
        PinPolicy::Always => yubikey::PinPolicy::Always,
    }
}

pub(super) fn piv_touch(t: TouchPolicy) -> yubikey::TouchPolicy {
    match t {
        TouchPolicy::Never => yubikey::TouchPolicy::Never,
        TouchPolicy::Always => yubikey::TouchPolicy::Always,
        TouchPolicy::Cached => yubikey::TouchPolicy::Cached,
    }
}

pub(super) fn pin_policy(p: yubikey::PinPolicy) -> Option<PinPolicy> {
    match p {
        yubikey::PinPolicy::Never => Some(PinPolicy::Never),
        yubikey::PinPolicy::Once => Some(PinPolicy::Once),
        yubikey::PinPolicy::Always => Some(PinPolicy::Always),
        _ => None,
    }
}

pub(super) fn touch_policy(t: yubikey::TouchPolicy) -> Option<TouchPolicy> {
    match t {
        yubikey::TouchPolicy::Never => Some(TouchPolicy::Never),
        yubikey::TouchPolicy::Always => Some(TouchPolicy::Always),
        yubikey::TouchPolicy::Cached => Some(TouchPolicy::Cached),
        _ => None,
    }
}
