//! The key ring (keyring.json, see server/README.md): secret-store key and cookie keys shared by
//! both pods. Generated once (by the operator, or by a standalone server on first start); an
//! existing key ring is never regenerated, because that would make every stored secret
//! unreadable and end every session. Secrets are sealed with AES-256-GCM under the active key;
//! each sealed value names its key, so a rotation adds a key and old values still open.

use std::collections::BTreeMap;
use std::fmt;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use rand::RngCore;
use serde::{Deserialize, Serialize};

pub const KEYRING_KEY: &str = "keyring.json";

#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct KeyRing {
    pub active_key: String,
    pub keys: BTreeMap<String, String>,
    pub cookie_keys: BTreeMap<String, String>,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Names only: key values must never reach a log.
        f.debug_struct("KeyRing")
            .field("active_key", &self.active_key)
            .field("keys", &self.keys.keys().collect::<Vec<_>>())
            .field("cookie_keys", &self.cookie_keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyRingError {
    #[error("keyring.json is not valid JSON of the documented shape: {0}")]
    Json(String),
    #[error("keyring.json: active_key {0:?} is not in keys")]
    MissingActive(String),
    #[error("keyring.json: key {0:?} is not base64 of {1} bytes")]
    BadKey(String, usize),
    #[error("keyring.json: no cookie keys")]
    NoCookieKeys,
    #[error("the secret was sealed with key {0:?}, which the key ring no longer holds; restore that key to keyring.json or set the secret again")]
    UnknownKey(String),
    #[error("the secret cannot be decrypted: it was altered, or sealed for another name or with another key ring")]
    Decrypt,
}

/// A value sealed under one key of the ring. The AES-GCM tag is part of `ciphertext`.
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed {
    pub key_id: String,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealed")
            .field("key_id", &self.key_id)
            .field("ciphertext_len", &self.ciphertext.len())
            .finish()
    }
}

fn random_b64(n: usize) -> String {
    let mut b = vec![0u8; n];
    rand::rngs::OsRng.fill_bytes(&mut b);
    base64::engine::general_purpose::STANDARD.encode(b)
}

impl KeyRing {
    /// A fresh key ring: one 32-byte AES-256-GCM key and one 64-byte cookie key.
    pub fn generate() -> Self {
        Self {
            active_key: "k1".into(),
            keys: BTreeMap::from([("k1".to_string(), random_b64(32))]),
            cookie_keys: BTreeMap::from([("c1".to_string(), random_b64(64))]),
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parse and check an existing key ring (errors never quote key values).
    pub fn parse(bytes: &[u8]) -> Result<Self, KeyRingError> {
        let kr: KeyRing =
            serde_json::from_slice(bytes).map_err(|e| KeyRingError::Json(e.classify_str()))?;
        if !kr.keys.contains_key(&kr.active_key) {
            return Err(KeyRingError::MissingActive(kr.active_key));
        }
        for (name, v) in &kr.keys {
            check_len(name, v, 32)?;
        }
        if kr.cookie_keys.is_empty() {
            return Err(KeyRingError::NoCookieKeys);
        }
        for (name, v) in &kr.cookie_keys {
            check_len(name, v, 64)?;
        }
        Ok(kr)
    }
}

impl KeyRing {
    fn cipher(&self, key_id: &str) -> Result<Aes256Gcm, KeyRingError> {
        let b64 = self
            .keys
            .get(key_id)
            .ok_or_else(|| KeyRingError::UnknownKey(key_id.to_string()))?;
        let key = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| KeyRingError::BadKey(key_id.to_string(), 32))?;
        Aes256Gcm::new_from_slice(&key).map_err(|_| KeyRingError::BadKey(key_id.to_string(), 32))
    }

    /// Seals `plaintext` under the active key. `name` is bound as associated data, so a sealed
    /// value copied to another name does not open.
    pub fn seal(&self, name: &str, plaintext: &[u8]) -> Result<Sealed, KeyRingError> {
        let cipher = self.cipher(&self.active_key)?;
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let ciphertext = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: name.as_bytes(),
                },
            )
            .map_err(|_| KeyRingError::Decrypt)?;
        Ok(Sealed {
            key_id: self.active_key.clone(),
            nonce: nonce.to_vec(),
            ciphertext,
        })
    }

    /// Opens a value sealed for `name` with any key the ring still holds.
    pub fn open(&self, name: &str, sealed: &Sealed) -> Result<Vec<u8>, KeyRingError> {
        if sealed.nonce.len() != 12 {
            return Err(KeyRingError::Decrypt);
        }
        self.cipher(&sealed.key_id)?
            .decrypt(
                Nonce::from_slice(&sealed.nonce),
                Payload {
                    msg: &sealed.ciphertext,
                    aad: name.as_bytes(),
                },
            )
            .map_err(|_| KeyRingError::Decrypt)
    }
}

fn check_len(name: &str, v: &str, n: usize) -> Result<(), KeyRingError> {
    match base64::engine::general_purpose::STANDARD.decode(v) {
        Ok(b) if b.len() == n => Ok(()),
        _ => Err(KeyRingError::BadKey(name.to_string(), n)),
    }
}

trait ClassifyStr {
    fn classify_str(&self) -> String;
}

impl ClassifyStr for serde_json::Error {
    // serde_json errors can echo input fragments; report only where and what kind.
    fn classify_str(&self) -> String {
        format!(
            "{:?} error at line {} column {}",
            self.classify(),
            self.line(),
            self.column()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keyring_has_documented_shape() {
        let kr = KeyRing::generate();
        let v: serde_json::Value = serde_json::from_str(&kr.to_json()).expect("json");
        assert_eq!(v["active_key"], "k1");
        assert!(v["keys"]["k1"].is_string());
        assert!(v["cookie_keys"]["c1"].is_string());
        let back = KeyRing::parse(kr.to_json().as_bytes()).expect("parses");
        assert_eq!(back, kr);
        assert_ne!(KeyRing::generate(), kr, "keys are random");
    }

    #[test]
    fn sealed_values_open_only_for_their_name_and_ring() {
        let kr = KeyRing::generate();
        let s = kr.seal("ldap-bind", b"p@ss w0rd").expect("seal");
        assert_eq!(s.key_id, "k1");
        assert!(!s.ciphertext.windows(9).any(|w| w == b"p@ss w0rd"));
        assert_eq!(kr.open("ldap-bind", &s).expect("open"), b"p@ss w0rd");
        assert_eq!(kr.open("other", &s), Err(KeyRingError::Decrypt));
        assert_eq!(
            KeyRing::generate().open("ldap-bind", &s),
            Err(KeyRingError::Decrypt)
        );
        let mut flipped = s.clone();
        flipped.ciphertext[0] ^= 1;
        assert_eq!(kr.open("ldap-bind", &flipped), Err(KeyRingError::Decrypt));
        assert_ne!(
            kr.seal("ldap-bind", b"x").unwrap().nonce,
            kr.seal("ldap-bind", b"x").unwrap().nonce
        );
    }

    #[test]
    fn a_rotated_ring_still_opens_old_values() {
        let mut kr = KeyRing::generate();
        let old = kr.seal("r", b"v1").unwrap();
        kr.keys.insert("k2".into(), random_b64(32));
        kr.active_key = "k2".into();
        assert_eq!(kr.seal("r", b"v2").unwrap().key_id, "k2");
        assert_eq!(kr.open("r", &old).unwrap(), b"v1");
        kr.keys.remove("k1");
        assert_eq!(
            kr.open("r", &old),
            Err(KeyRingError::UnknownKey("k1".into()))
        );
    }

    #[test]
    fn debug_never_shows_values() {
        let kr = KeyRing::generate();
        let dbg = format!("{kr:?}");
        for v in kr.keys.values().chain(kr.cookie_keys.values()) {
            assert!(!dbg.contains(v.as_str()));
        }
    }

    #[test]
    fn malformed_keyrings_are_reported_without_values() {
        assert!(matches!(
            KeyRing::parse(b"{not json"),
            Err(KeyRingError::Json(_))
        ));
        let bad = r#"{"active_key":"k2","keys":{"k1":"AAAA"},"cookie_keys":{}}"#;
        assert_eq!(
            KeyRing::parse(bad.as_bytes()),
            Err(KeyRingError::MissingActive("k2".into()))
        );
        let short = r#"{"active_key":"k1","keys":{"k1":"c2VjcmV0"},"cookie_keys":{"c1":"AAAA"}}"#;
        let e = KeyRing::parse(short.as_bytes()).expect_err("short key");
        assert!(!e.to_string().contains("c2VjcmV0"));
    }
}
