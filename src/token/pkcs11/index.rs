//! Finding one user's keys with one token search.
//!
//! A `C_FindObjects` costs a pass over every object on the token (both test tokens scan;
//! docs/tokens.md), so the number of searches per lookup is what a lookup costs on a token
//! that holds many users. Looking a user up by label takes one search per role. Instead,
//! both halves of every key mxhsm makes carry `CKA_SUBJECT` = the DER name `CN=<user ID>`,
//! so one search by subject finds all of a user's keys.
//!
//! Keys made before this scheme have no subject, and mxhsm's keys cannot be modified
//! (`CKA_MODIFIABLE` false), so they cannot be given one. A public data object, the index
//! marker (`CKA_LABEL` `mxhsm:index`, `CKA_APPLICATION` `mxhsm`), says that every mxhsm key
//! on the token has its subject. It is created before the first key is made on a token whose
//! mxhsm keys all have one (a new token has none), and destroyed if a token ever drops the
//! subject from a new key. Without it, lookups search by label as before.

use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use super::Pkcs11Store;
use super::objects::parse_label;
use crate::token::TokenError;

/// The marker's label and application.
pub(super) const INDEX_LABEL: &str = "mxhsm:index";
const INDEX_APPLICATION: &[u8] = b"mxhsm";
/// The marker's value: which scheme the keys follow.
const INDEX_VALUE: &[u8] = b"subject-cn-v1";

/// What this store knows of the token's index marker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Index {
    /// Not looked for yet.
    Unknown,
    /// The marker is there: a user's keys are found by subject.
    Present,
    /// No marker; not yet checked whether one can be made.
    Absent,
    /// No marker, and the token holds mxhsm keys without a subject (or refused the marker).
    Legacy,
}

/// `CKA_SUBJECT` of every object of `user_id`: the DER of the X.501 name `CN=<user ID>`
/// (a SEQUENCE of one SET of one SEQUENCE { OID 2.5.4.3, UTF8String }).
pub(super) fn subject_of(user_id: &str) -> Vec<u8> {
    let mut atv = vec![0x06, 0x03, 0x55, 0x04, 0x03];
    der_push(&mut atv, 0x0c, user_id.as_bytes());
    let mut seq = Vec::new();
    der_push(&mut seq, 0x30, &atv);
    let mut set = Vec::new();
    der_push(&mut set, 0x31, &seq);
    let mut name = Vec::new();
    der_push(&mut name, 0x30, &set);
    name
}

/// Whether an object with `label` and `subject` is an mxhsm key without the subject of the
/// user its label names.
pub(super) fn lacks_subject(label: Option<&str>, subject: Option<&[u8]>) -> bool {
    label
        .and_then(parse_label)
        .is_some_and(|(_, user)| subject != Some(subject_of(user).as_slice()))
}

/// Appends a DER TLV (definite length, short or long form).
fn der_push(out: &mut Vec<u8>, tag: u8, content: &[u8]) {
    out.push(tag);
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
}

fn marker_template() -> [Attribute; 3] {
    [
        Attribute::Class(ObjectClass::DATA),
        Attribute::Label(INDEX_LABEL.as_bytes().to_vec()),
        Attribute::Application(INDEX_APPLICATION.to_vec()),
    ]
}

impl Pkcs11Store {
    fn index_state(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a user's keys can be found by subject (one search, cached per store).
    pub(super) fn indexed(&self, session: &Session) -> Result<bool, TokenError> {
        let mut state = self.index_state();
        if *state == Index::Unknown {
            // A token that cannot search for a data object is searched by label.
            *state = match self.find_marker(session) {
                Ok(found) if found.is_empty() => Index::Absent,
                Ok(_) => Index::Present,
                Err(e) => {
                    tracing::debug!("no index: {e}");
                    Index::Legacy
                }
            };
        }
        Ok(*state == Index::Present)
    }

    fn find_marker(&self, session: &Session) -> Result<Vec<ObjectHandle>, TokenError> {
        let found = session
            .find_objects(&marker_template())
            .map_err(self.dev("C_FindObjects"))?;
        tracing::debug!("C_FindObjects {INDEX_LABEL}: {} object(s)", found.len());
        Ok(found)
    }

    /// Before a key is created (logged in): makes the marker if the token has none and
    /// none of its mxhsm key objects, private or public, lacks a subject. The check reads
    /// every key object once, once per store, and only on a token without the marker. A
    /// token on which the check or the marker fails is searched by label.
    pub(super) fn index_before_create(&self, session: &Session) -> Result<(), TokenError> {
        if self.indexed(session)? || *self.index_state() == Index::Legacy {
            return Ok(());
        }
        let legacy = match self.count_without_subject(session) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!("no index: {e}");
                *self.index_state() = Index::Legacy;
                return Ok(());
            }
        };
        if legacy > 0 {
            tracing::debug!(
                "{legacy} mxhsm key object(s) without a subject: users are looked up by label"
            );
            *self.index_state() = Index::Legacy;
            return Ok(());
        }
        let mut template = marker_template().to_vec();
        template.extend([
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Value(INDEX_VALUE.to_vec()),
        ]);
        match session.create_object(&template) {
            Ok(_) => {
                tracing::info!("C_CreateObject: the index marker {INDEX_LABEL}");
                *self.index_state() = Index::Present;
            }
            Err(e) => {
                // A token that takes no data objects is searched by label.
                tracing::debug!("C_CreateObject ({INDEX_LABEL}) failed: {e}");
                *self.index_state() = Index::Legacy;
            }
        }
        Ok(())
    }

    /// How many of the token's mxhsm key objects (both classes) lack their subject.
    fn count_without_subject(&self, session: &Session) -> Result<usize, TokenError> {
        let mut legacy = 0;
        for class in [ObjectClass::PUBLIC_KEY, ObjectClass::PRIVATE_KEY] {
            let found = session
                .find_objects(&[Attribute::Class(class)])
                .map_err(self.dev("C_FindObjects"))?;
            for h in found {
                if self.object_lacks_subject(session, h)? {
                    legacy += 1;
                }
            }
        }
        Ok(legacy)
    }

    /// Whether the object `h` is an mxhsm key without the subject of the user its label
    /// names.
    fn object_lacks_subject(&self, session: &Session, h: ObjectHandle) -> Result<bool, TokenError> {
        let attrs = session
            .get_attributes(h, &[AttributeType::Label, AttributeType::Subject])
            .map_err(self.dev("C_GetAttributeValue"))?;
        let mut label = None;
        let mut subject = Vec::new();
        for a in attrs {
            match a {
                Attribute::Label(v) => label = String::from_utf8(v).ok(),
                Attribute::Subject(v) => subject = v,
                _ => {}
            }
        }
        Ok(lacks_subject(label.as_deref(), Some(&subject)))
    }

    /// Ends the index (`why`: an mxhsm key without its subject was seen): the marker is
    /// destroyed, and users are looked up by label from then on, by this store and every
    /// later process. If the marker cannot be destroyed, this store still stops using it.
    pub(super) fn unindex(&self, session: &Session, why: &str) {
        if *self.index_state() != Index::Present {
            return;
        }
        *self.index_state() = Index::Legacy;
        let destroyed = self.find_marker(session).and_then(|found| {
            found.into_iter().try_for_each(|h| {
                session
                    .destroy_object(h)
                    .map_err(self.dev("C_DestroyObject (index marker)"))
            })
        });
        match destroyed {
            Ok(()) => tracing::info!("{why}: the index marker {INDEX_LABEL} is removed"),
            Err(e) => tracing::warn!(
                "{why}, but the index marker {INDEX_LABEL} could not be removed ({e}): other processes may miss such keys"
            ),
        }
    }

    /// For benchmarks: how long one search takes that matches nothing (the pass over the
    /// token's objects every search costs), and how many searches a user's lookup makes.
    pub fn search_cost(&self) -> Result<(std::time::Duration, usize), TokenError> {
        let session = self.session()?;
        let searches = if self.indexed(&session)? {
            1
        } else {
            crate::token::KeyRole::ALL.len()
        };
        let t = std::time::Instant::now();
        session
            .find_objects(&[Attribute::Label(
                b"mxhsm:none:@nobody:bench.invalid".to_vec(),
            )])
            .map_err(self.dev("C_FindObjects"))?;
        Ok((t.elapsed(), searches))
    }

    /// After a key is created: if the token dropped the subject from either half, the
    /// index ends (the key would not be found by subject).
    pub(super) fn index_after_create(
        &self,
        session: &Session,
        halves: &[ObjectHandle],
    ) -> Result<(), TokenError> {
        if *self.index_state() != Index::Present {
            return Ok(());
        }
        for h in halves {
            if self.object_lacks_subject(session, *h)? {
                self.unindex(session, "the token dropped CKA_SUBJECT from a new key");
                break;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_long_subjects_are_der() {
        let s = subject_of("@a:b");
        assert_eq!(
            s,
            [
                0x30, 0x0f, 0x31, 0x0d, 0x30, 0x0b, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x04, b'@',
                b'a', b':', b'b'
            ]
        );
        // A 255-byte user ID (the longest Matrix allows) needs long-form lengths.
        let long = format!("@{}:b", "x".repeat(252));
        let s = subject_of(&long);
        assert_eq!(&s[..3], &[0x30, 0x82, 0x01]);
        assert_eq!(s.len(), 4 + s[3] as usize + 0x100);
    }

    /// Checked against an independent DER decoder (the `x509-cert` crate): the subject is
    /// a name whose only attribute is the common name, the user ID.
    #[cfg(feature = "yubikey")]
    #[test]
    fn subjects_parse_as_x509_names() {
        use der::Decode;
        for user in [
            "@a:b",
            "@alice:example.org",
            &format!("@{}:b", "é".repeat(120)),
        ] {
            let name = x509_cert::name::Name::from_der(&subject_of(user)).unwrap();
            assert_eq!(name.to_string(), format!("CN={user}"), "{user}");
        }
    }
}
