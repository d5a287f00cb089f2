//! mxhsm's object scheme: labels and IDs, reading a key pair back as a KeyInfo, the templates
//! (with the attributes some tokens refuse), generating, proving an import, destroying.

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use zeroize::Zeroize;

use super::Pkcs11Store;
use super::ec::{self, Curve};
use crate::token::{
    Curve25519PublicKey, KeyAlgorithm, KeyBackend, KeyInfo, KeyOrigin, KeyProtection, KeyRole,
    KeyStore, PublicKey, TokenError, X25519Mechanism,
};

impl Pkcs11Store {
    /// Key type and `CKA_EC_PARAMS` for new keys of `algorithm` on this token.
    pub(super) fn key_params(
        &self,
        algorithm: KeyAlgorithm,
    ) -> Result<(KeyType, &'static [u8]), TokenError> {
        match algorithm {
            KeyAlgorithm::Ed25519 if self.capabilities.ed25519 => {
                Ok((KeyType::EC_EDWARDS, ec::OID_ED25519))
            }
            KeyAlgorithm::Ed25519 => Err(self.unsupported(
                "Ed25519 (the module lists no CKM_EC_EDWARDS_KEY_PAIR_GEN + CKM_EDDSA)",
            )),
            KeyAlgorithm::X25519 => match self.capabilities.x25519 {
                Some(X25519Mechanism::Montgomery) => Ok((KeyType::EC_MONTGOMERY, ec::OID_X25519)),
                Some(X25519Mechanism::SoftHsmEdwards) => Ok((KeyType::EC_EDWARDS, ec::OID_X25519)),
                _ => Err(self.unsupported(
                    "X25519 (the module lists no CKM_EC_MONTGOMERY_KEY_PAIR_GEN + CKM_ECDH1_DERIVE); the backup key needs it",
                )),
            },
        }
    }

    pub(super) fn private_handle(
        &self,
        session: &Session,
        key: &KeyInfo,
    ) -> Result<ObjectHandle, TokenError> {
        let KeyBackend::Pkcs11 { id, label, .. } = &key.backend else {
            return Err(self.other_token(key));
        };
        if let Some(h) = self
            .handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(id.clone(), label.clone()))
        {
            return Ok(*h);
        }
        let found = session
            .find_objects(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::Id(id.clone()),
                Attribute::Label(label.as_bytes().to_vec()),
            ])
            .map_err(self.dev("C_FindObjects"))?;
        let handle = *found.first().ok_or_else(|| TokenError::KeyNotFound {
            user_id: key.user_id.clone(),
            role: key.role,
            token: self.summary.to_string(),
        })?;
        self.handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((id.clone(), label.clone()), handle);
        Ok(handle)
    }

    /// Everything mxhsm reads from a key object, in one `C_GetAttributeValue` (each read
    /// can cost a pass over the token's objects: docs/tokens.md). Attributes the object
    /// does not have (a public key's protection flags, a private key's point) are `None`.
    pub(super) fn read_object(
        &self,
        session: &Session,
        handle: ObjectHandle,
    ) -> Result<ObjectAttributes, TokenError> {
        let attrs = session
            .get_attributes(handle, OBJECT_ATTRIBUTES)
            .map_err(self.dev("C_GetAttributeValue"))?;
        let mut o = ObjectAttributes {
            handle,
            class: None,
            label: None,
            id: None,
            key_type: None,
            curve: None,
            point: None,
            subject: None,
            protection: KeyProtection::default(),
        };
        let p = &mut o.protection;
        for a in attrs {
            match a {
                Attribute::Class(c) => o.class = Some(c),
                Attribute::Label(v) => o.label = String::from_utf8(v).ok(),
                Attribute::Id(v) => o.id = Some(v),
                Attribute::KeyType(t) => o.key_type = Some(t),
                Attribute::EcParams(v) => o.curve = ec::curve_from_params(&v),
                Attribute::EcPoint(v) => o.point = ec::decode_point(&v),
                Attribute::Subject(v) => o.subject = Some(v),
                Attribute::Token(b) => p.token = Some(b),
                Attribute::Private(b) => p.private = Some(b),
                Attribute::Sensitive(b) => p.sensitive = Some(b),
                Attribute::Extractable(b) => p.extractable = Some(b),
                Attribute::AlwaysSensitive(b) => p.always_sensitive = Some(b),
                Attribute::NeverExtractable(b) => p.never_extractable = Some(b),
                Attribute::Local(b) => p.local = Some(b),
                Attribute::Sign(b) => p.sign = Some(b),
                Attribute::Derive(b) => p.derive = Some(b),
                Attribute::Decrypt(b) => p.decrypt = Some(b),
                Attribute::Unwrap(b) => p.unwrap = Some(b),
                Attribute::SignRecover(b) => p.sign_recover = Some(b),
                Attribute::Modifiable(b) => p.modifiable = Some(b),
                Attribute::Copyable(b) => p.copyable = Some(b),
                _ => {}
            }
        }
        Ok(o)
    }

    /// Reads a key back from its private-key object and the public-key object paired with it
    /// (its point taken from `points`, by `CKA_ID`, when the caller read them already).
    pub(super) fn key_info(
        &self,
        session: &Session,
        private: ObjectHandle,
        points: Option<&PublicPoints>,
    ) -> Result<Option<KeyInfo>, TokenError> {
        let object = self.read_object(session, private)?;
        self.private_key_info(session, object, points)
    }

    /// [`Self::key_info`] from a private-key object already read. Its handle is kept, so
    /// that signing with the key needs no search of its own.
    pub(super) fn private_key_info(
        &self,
        session: &Session,
        object: ObjectAttributes,
        points: Option<&PublicPoints>,
    ) -> Result<Option<KeyInfo>, TokenError> {
        let ObjectAttributes {
            handle: private,
            label,
            id,
            key_type,
            curve,
            point: own_point,
            protection: p,
            ..
        } = object;
        let Some(label) = label else { return Ok(None) };
        let Some(identified) = self.identify(&label, curve, key_type)? else {
            return Ok(None);
        };
        let id = id.unwrap_or_default();
        self.handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((id.clone(), label.clone()), private);
        if let Some(point) = points.and_then(|p| p.get(&(id.clone(), label.clone()))) {
            let local = p.local;
            return self
                .described(label, id, identified, Some(*point), local, p)
                .map(Some);
        }
        let public = session
            .find_objects(&[
                Attribute::Class(ObjectClass::PUBLIC_KEY),
                Attribute::Id(id.clone()),
                Attribute::Label(label.as_bytes().to_vec()),
            ])
            .map_err(self.dev("C_FindObjects"))?;
        let point = match public.first() {
            Some(h) => session
                .get_attributes(*h, &[AttributeType::EcPoint])
                .map_err(self.dev("C_GetAttributeValue"))?
                .into_iter()
                .find_map(|a| match a {
                    Attribute::EcPoint(v) => ec::decode_point(&v),
                    _ => None,
                }),
            // Some tokens keep the point on the private object too.
            None => own_point,
        };
        let local = p.local;
        self.described(label, id, identified, point, local, p)
            .map(Some)
    }

    /// The [`KeyInfo`] of an mxhsm key object, from what its attributes said.
    pub(super) fn described(
        &self,
        label: String,
        id: Vec<u8>,
        (role, user_id, x25519_mechanism): Identified,
        point: Option<[u8; 32]>,
        local: Option<bool>,
        protection: KeyProtection,
    ) -> Result<KeyInfo, TokenError> {
        let point = point.ok_or_else(|| {
            self.bad_data(format!(
                "no readable public key (CKA_EC_POINT) for {label:?}"
            ))
        })?;
        let public_key = PublicKey::new(role.algorithm(), &point)
            .map_err(|e| self.bad_data(format!("the public key of {label:?}: {e}")))?;
        Ok(KeyInfo {
            user_id,
            role,
            created_ms: created_from_id(&id),
            public_key,
            origin: origin(local),
            protection,
            backend: KeyBackend::Pkcs11 {
                id,
                label,
                x25519: x25519_mechanism,
            },
        })
    }

    /// Whose key of which role an object with `label` is (`None`: not an mxhsm label),
    /// checked to be on the role's curve, and how it does X25519.
    pub(super) fn identify(
        &self,
        label: &str,
        curve: Option<Curve>,
        key_type: Option<KeyType>,
    ) -> Result<Option<Identified>, TokenError> {
        let Some((role, user_id)) = parse_label(label) else {
            return Ok(None);
        };
        let expected_curve = match role.algorithm() {
            KeyAlgorithm::Ed25519 => Curve::Ed25519,
            KeyAlgorithm::X25519 => Curve::X25519,
        };
        if curve != Some(expected_curve) {
            return Err(self.bad_data(format!(
                "the {role} key {label:?} is not on curve {expected_curve:?}"
            )));
        }
        let mechanism = match (role.algorithm(), key_type) {
            (KeyAlgorithm::X25519, Some(KeyType::EC_MONTGOMERY)) => {
                Some(X25519Mechanism::Montgomery)
            }
            (KeyAlgorithm::X25519, Some(KeyType::EC_EDWARDS)) => {
                Some(X25519Mechanism::SoftHsmEdwards)
            }
            _ => None,
        };
        Ok(Some((role, user_id.to_string(), mechanism)))
    }

    /// A key as its public-key object (already read) shows it, before login: no
    /// protection attributes.
    pub(super) fn public_key_info(
        &self,
        object: ObjectAttributes,
    ) -> Result<Option<KeyInfo>, TokenError> {
        let ObjectAttributes {
            label,
            id,
            key_type,
            curve,
            point,
            protection,
            ..
        } = object;
        let Some(label) = label else { return Ok(None) };
        let Some(identified) = self.identify(&label, curve, key_type)? else {
            return Ok(None);
        };
        let id = id.unwrap_or_default();
        self.described(
            label,
            id,
            identified,
            point,
            protection.local,
            KeyProtection::default(),
        )
        .map(Some)
    }

    /// Checks that the token holds the private key of `expected` (after an import): a
    /// signature that verifies, or an agreement that matches software.
    pub(super) fn prove(
        &self,
        key: &KeyInfo,
        expected_public: &PublicKey,
    ) -> Result<(), TokenError> {
        if &key.public_key != expected_public {
            return Err(
                self.bad_data("the stored public key differs from the imported key's".into())
            );
        }
        match key.algorithm() {
            KeyAlgorithm::Ed25519 => {
                let challenge = b"mxhsm import check";
                let sig = self.sign_ed25519(key, challenge)?;
                if key.ed25519()?.verify(challenge, &sig) {
                    Ok(())
                } else {
                    Err(self.bad_data("a signature by the imported key does not verify".into()))
                }
            }
            KeyAlgorithm::X25519 => {
                let mut seed = [0u8; 32];
                getrandom::fill(&mut seed).map_err(|e| TokenError::NoRandomness(e.to_string()))?;
                let eph = x25519_dalek::StaticSecret::from(seed);
                seed.zeroize();
                let eph_pub = x25519_dalek::PublicKey::from(&eph);
                let on_token =
                    self.x25519(key, &Curve25519PublicKey::from_bytes(eph_pub.to_bytes()))?;
                let soft =
                    eph.diffie_hellman(&x25519_dalek::PublicKey::from(*expected_public.as_bytes()));
                if on_token.expose() == soft.as_bytes() {
                    Ok(())
                } else {
                    Err(self.bad_data("an agreement with the imported key does not match".into()))
                }
            }
        }
    }

    /// Generates a key pair: token objects carrying `subject` (the owner's `CKA_SUBJECT`),
    /// or, without one, session objects that vanish with the session, for self-tests and
    /// benchmarks.
    pub(super) fn generate_objects(
        &self,
        session: &Session,
        algorithm: KeyAlgorithm,
        label: &str,
        id: Vec<u8>,
        subject: Option<Vec<u8>>,
    ) -> Result<(ObjectHandle, ObjectHandle), TokenError> {
        // Session keys (self-tests, benchmarks) belong to nobody and have no subject.
        let persistent = subject.is_some();
        let (key_type, params) = self.key_params(algorithm)?;
        let mechanism = match key_type {
            KeyType::EC_MONTGOMERY => Mechanism::EccMontgomeryKeyPairGen,
            _ => Mechanism::EccEdwardsKeyPairGen,
        };
        let label = label.as_bytes().to_vec();
        let mut public = vec![
            Attribute::Token(persistent),
            Attribute::Private(false),
            Attribute::KeyType(key_type),
            Attribute::EcParams(params.to_vec()),
            Attribute::Label(label.clone()),
            Attribute::Id(id.clone()),
        ];
        public.extend(public_usage(algorithm));
        let mut private = vec![
            Attribute::Token(persistent),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::KeyType(key_type),
            Attribute::Label(label),
            Attribute::Id(id),
        ];
        private.extend(private_usage(algorithm));
        if let Some(subject) = subject {
            public.push(Attribute::Subject(subject.clone()));
            private.push(Attribute::Subject(subject));
        }
        let pair = with_optional_attributes(&public, &private, |public, private| {
            session.generate_key_pair(&mechanism, public, private)
        })
        .map_err(self.dev("C_GenerateKeyPair"))?;
        tracing::info!(
            "C_GenerateKeyPair ({algorithm:?}, {}) on {}",
            if persistent {
                "token object"
            } else {
                "session object"
            },
            crate::text::escape(&self.summary.to_string())
        );
        Ok(pair)
    }

    /// Generates a temporary key pair as session objects (`CKA_TOKEN` = false): it is gone
    /// when mxhsm exits, or at once with [`KeyStore::delete`]. For self-tests and
    /// benchmarks; nothing persistent is touched.
    pub fn generate_session_key(&self, algorithm: KeyAlgorithm) -> Result<KeyInfo, TokenError> {
        self.login()?;
        let session = self.session()?;
        let (role, label) = match algorithm {
            KeyAlgorithm::Ed25519 => (KeyRole::Master, "mxhsm-selftest:ed25519"),
            KeyAlgorithm::X25519 => (KeyRole::Backup, "mxhsm-selftest:x25519"),
        };
        let id = new_key_id()?;
        let (public, private) =
            self.generate_objects(&session, algorithm, label, id.clone(), None)?;
        let point = session
            .get_attributes(public, &[AttributeType::EcPoint])
            .map_err(self.dev("C_GetAttributeValue"))?;
        let point = point
            .into_iter()
            .find_map(|a| match a {
                Attribute::EcPoint(v) => ec::decode_point(&v),
                _ => None,
            })
            .ok_or_else(|| self.bad_data("no readable CKA_EC_POINT on a new key".into()))?;
        let public_key = PublicKey::new(algorithm, &point)
            .map_err(|e| self.bad_data(format!("the public key of a new key: {e}")))?;
        let key = KeyInfo {
            user_id: "@mxhsm-selftest:localhost".into(),
            role,
            created_ms: created_from_id(&id),
            public_key,
            origin: KeyOrigin::Generated,
            protection: KeyProtection::default(),
            backend: KeyBackend::Pkcs11 {
                id: id.clone(),
                label: label.to_string(),
                x25519: self
                    .capabilities
                    .x25519
                    .filter(|_| algorithm == KeyAlgorithm::X25519),
            },
        };
        self.handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((id, label.to_string()), private);
        Ok(key)
    }

    pub(super) fn destroy_pair(
        &self,
        session: &Session,
        id: &[u8],
        label: &str,
    ) -> Result<usize, TokenError> {
        let found = session
            .find_objects(&[
                Attribute::Id(id.to_vec()),
                Attribute::Label(label.as_bytes().to_vec()),
            ])
            .map_err(self.dev("C_FindObjects"))?;
        for h in &found {
            session
                .destroy_object(*h)
                .map_err(self.dev("C_DestroyObject"))?;
        }
        tracing::info!(
            "C_DestroyObject {}: {} object(s)",
            crate::text::escape(label),
            found.len()
        );
        self.handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(id.to_vec(), label.to_string()));
        Ok(found.len())
    }
}

pub(super) const LABEL_PREFIX: &str = "mxhsm:";

pub(super) const ID_MAGIC: &[u8; 3] = b"mx\x01";

/// The label of every object of (`user_id`, `role`).
pub fn key_label(user_id: &str, role: KeyRole) -> String {
    format!("{LABEL_PREFIX}{}:{user_id}", role.as_str())
}

pub(super) fn parse_label(label: &str) -> Option<(KeyRole, &str)> {
    let rest = label.strip_prefix(LABEL_PREFIX)?;
    let (role, user) = rest.split_once(':')?;
    Some((role.parse().ok()?, user))
}

pub(super) fn new_key_id() -> Result<Vec<u8>, TokenError> {
    let now = crate::token::now_ms();
    let mut random = [0u8; 4];
    getrandom::fill(&mut random).map_err(|e| TokenError::NoRandomness(e.to_string()))?;
    let mut id = ID_MAGIC.to_vec();
    id.extend_from_slice(&now.to_be_bytes());
    id.extend_from_slice(&random);
    Ok(id)
}

/// Generated on the token (`CKA_LOCAL`) or imported.
/// What a label names (role, user ID) and how the key does X25519.
pub(super) type Identified = (KeyRole, String, Option<X25519Mechanism>);

/// Public-key points by (`CKA_ID`, `CKA_LABEL`).
pub(super) type PublicPoints = std::collections::HashMap<(Vec<u8>, String), [u8; 32]>;

/// Sorts key objects into private keys and the points of public keys, by (`CKA_ID`,
/// `CKA_LABEL`), so that pairing each private key with its public half needs no search
/// of its own.
pub(super) fn split_halves(
    objects: Vec<ObjectAttributes>,
) -> (Vec<ObjectAttributes>, PublicPoints) {
    let mut privates = Vec::new();
    let mut points = PublicPoints::new();
    for o in objects {
        match o.class {
            Some(ObjectClass::PRIVATE_KEY) => privates.push(o),
            Some(ObjectClass::PUBLIC_KEY) => {
                if let (Some(id), Some(label), Some(point)) = (o.id, o.label, o.point) {
                    points.insert((id, label), point);
                }
            }
            _ => {}
        }
    }
    (privates, points)
}

/// What [`Pkcs11Store::read_object`] reads.
const OBJECT_ATTRIBUTES: &[AttributeType] = &[
    AttributeType::Class,
    AttributeType::Label,
    AttributeType::Id,
    AttributeType::KeyType,
    AttributeType::EcParams,
    AttributeType::EcPoint,
    AttributeType::Subject,
    AttributeType::Token,
    AttributeType::Private,
    AttributeType::Sensitive,
    AttributeType::Extractable,
    AttributeType::AlwaysSensitive,
    AttributeType::NeverExtractable,
    AttributeType::Local,
    AttributeType::Sign,
    AttributeType::Derive,
    AttributeType::Decrypt,
    AttributeType::Unwrap,
    AttributeType::SignRecover,
    AttributeType::Modifiable,
    AttributeType::Copyable,
];

/// A key object's attributes, as one read found them.
pub(super) struct ObjectAttributes {
    pub handle: ObjectHandle,
    pub class: Option<ObjectClass>,
    pub label: Option<String>,
    pub id: Option<Vec<u8>>,
    pub key_type: Option<KeyType>,
    pub curve: Option<Curve>,
    pub point: Option<[u8; 32]>,
    pub subject: Option<Vec<u8>>,
    pub protection: KeyProtection,
}

impl ObjectAttributes {
    /// An mxhsm key object (by its label) without the subject the index needs.
    pub fn lacks_subject(&self) -> bool {
        super::index::lacks_subject(self.label.as_deref(), self.subject.as_deref())
    }
}

pub(super) fn origin(local: Option<bool>) -> KeyOrigin {
    match local {
        Some(true) => KeyOrigin::Generated,
        Some(false) => KeyOrigin::Imported,
        None => KeyOrigin::Unknown,
    }
}

pub(super) fn created_from_id(id: &[u8]) -> Option<u64> {
    let rest = id.strip_prefix(ID_MAGIC.as_slice())?;
    let ms: [u8; 8] = rest.get(..8)?.try_into().ok()?;
    Some(u64::from_be_bytes(ms))
}

/// What a private key may do: sign (Ed25519) or derive (X25519), and nothing else —
/// decryption, unwrapping, signing with recovery are switched off explicitly rather than
/// left to the token's defaults (SoftHSM sets some of them), and the object can be neither
/// modified nor copied.
pub(super) fn private_usage(algorithm: KeyAlgorithm) -> [Attribute; 7] {
    let ed = algorithm == KeyAlgorithm::Ed25519;
    [
        Attribute::Sign(ed),
        Attribute::Derive(!ed),
        Attribute::Decrypt(false),
        Attribute::Unwrap(false),
        Attribute::SignRecover(false),
        Attribute::Modifiable(false),
        Attribute::Copyable(false),
    ]
}

/// What a public key may do: verify (Ed25519), nothing for X25519.
pub(super) fn public_usage(algorithm: KeyAlgorithm) -> [Attribute; 6] {
    [
        Attribute::Verify(algorithm == KeyAlgorithm::Ed25519),
        Attribute::Encrypt(false),
        Attribute::Wrap(false),
        Attribute::VerifyRecover(false),
        Attribute::Derive(false),
        Attribute::Modifiable(false),
    ]
}

/// Attributes that only restrict a key further, which a token may not know (CKA_COPYABLE
/// came with PKCS#11 2.40) or may refuse to set at creation. Dropped, in stages, only when
/// the token refuses the template; the doctor reports what the key ended up with.
pub(super) fn optional_stage(a: &Attribute) -> Option<u8> {
    match a {
        // Without its subject a key is only slower to find (the index marker then goes),
        // so it is given up before any restriction.
        Attribute::Subject(_) => Some(1),
        Attribute::Copyable(_) => Some(2),
        Attribute::Modifiable(_) => Some(3),
        Attribute::Decrypt(false)
        | Attribute::Unwrap(false)
        | Attribute::SignRecover(false)
        | Attribute::Encrypt(false)
        | Attribute::Wrap(false)
        | Attribute::VerifyRecover(false)
        | Attribute::Derive(false)
        | Attribute::Sign(false)
        | Attribute::Verify(false) => Some(4),
        _ => None,
    }
}

/// Runs `create` with the full templates; if the token refuses an attribute, again with
/// the optional ones left out stage by stage. Copies holding `CKA_VALUE` are zeroized.
pub(super) fn with_optional_attributes<T>(
    public: &[Attribute],
    private: &[Attribute],
    create: impl Fn(&[Attribute], &[Attribute]) -> Result<T, CkError>,
) -> Result<T, CkError> {
    let first = match create(public, private) {
        Ok(v) => return Ok(v),
        Err(e) => e,
    };
    let refused_attribute = |e: &CkError| {
        matches!(
            e,
            CkError::Pkcs11(
                RvError::AttributeTypeInvalid
                    | RvError::AttributeValueInvalid
                    | RvError::AttributeReadOnly
                    | RvError::TemplateInconsistent,
                _
            )
        )
    };
    if !refused_attribute(&first) {
        return Err(first);
    }
    for stage in 1..=4u8 {
        let keep = |a: &&Attribute| optional_stage(a).is_none_or(|s| s > stage);
        let public: Vec<Attribute> = public.iter().filter(keep).cloned().collect();
        let mut private: Vec<Attribute> = private.iter().filter(keep).cloned().collect();
        let result = create(&public, &private);
        for a in private.iter_mut() {
            if let Attribute::Value(v) = a {
                v.zeroize();
            }
        }
        match result {
            Ok(v) => return Ok(v),
            Err(e) if refused_attribute(&e) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_round_trip() {
        for role in KeyRole::ALL {
            let l = key_label("@alice:example.org", role);
            assert_eq!(parse_label(&l), Some((role, "@alice:example.org")));
        }
        assert_eq!(
            key_label("@a:b", KeyRole::SelfSigning),
            "mxhsm:self_signing:@a:b"
        );
        assert_eq!(parse_label("other:master:@a:b"), None);
        assert_eq!(parse_label("mxhsm:bogus:@a:b"), None);
    }

    #[test]
    fn ids_carry_creation_time() {
        let id = new_key_id().unwrap();
        assert_eq!(id.len(), 15);
        let t = created_from_id(&id).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert!(now >= t && now - t < 60_000);
        assert_eq!(created_from_id(b"foreign-id"), None);
    }
}
