//! Browser sessions: a cookie sealed (AES-256-GCM) under a key derived from one of the key
//! ring's cookie keys, so every instance that mounts the same `keyring.json` opens it and a
//! failover signs nobody out. The cookie names its key; a ring with a new key added still opens
//! cookies sealed under the old one until they expire. A CSRF token (HMAC of the session id
//! under another derived key) guards every state-changing request the cookie authenticates.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use hmac::Mac;
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::auth::{Permission, Principal};

pub const SESSION_COOKIE: &str = "im_session";
pub const CSRF_HEADER: &str = "x-csrf-token";
const VERSION: &str = "v1";
/// Re-issue the cookie (moving `last_seen`) at most this often, not on every request.
const REFRESH_AFTER_S: i64 = 60;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SessionError {
    #[error("the session cookie is malformed")]
    Malformed,
    #[error("the session cookie was sealed with cookie key {0:?}, which the key ring does not hold (a foreign cookie, or the key was retired)")]
    UnknownKey(String),
    #[error("the session cookie does not open: it was altered or sealed with another key ring")]
    Tampered,
    #[error("the session expired after {0} s without use; sign in again")]
    IdleExpired(i64),
    #[error("the session reached its maximum lifetime of {0} s; sign in again")]
    AbsoluteExpired(i64),
}

/// What the cookie carries (sealed: the browser cannot read or change it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionData {
    /// Random id; the CSRF token is bound to it.
    pub sid: String,
    pub sub: String,
    pub name: String,
    pub perms: Vec<String>,
    /// Unix seconds.
    pub iat: i64,
    pub seen: i64,
    /// Where sign-out at the provider goes, when the provider has one (with the ID token hint
    /// omitted: the cookie must stay small and never carries tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idp: Option<String>,
}

impl SessionData {
    pub fn new(principal: &Principal, name: &str, now: i64) -> Self {
        let mut sid = [0u8; 18];
        rand::rngs::OsRng.fill_bytes(&mut sid);
        Self {
            sid: b64(&sid),
            sub: principal.subject.clone(),
            name: name.to_string(),
            perms: principal
                .permissions
                .iter()
                .map(|p| p.as_str().to_string())
                .collect(),
            iat: now,
            seen: now,
            idp: None,
        }
    }

    pub fn principal(&self) -> Principal {
        Principal {
            subject: self.sub.clone(),
            permissions: self
                .perms
                .iter()
                .filter_map(|p| Permission::parse(p))
                .collect::<BTreeSet<_>>(),
        }
    }
}

struct DerivedKey {
    aead: Aes256Gcm,
    csrf: [u8; 32],
}

/// The sealing keys derived from the key ring's cookie keys, and the lifetimes.
pub struct Sessions {
    keys: BTreeMap<String, DerivedKey>,
    newest: String,
    pub idle_s: i64,
    pub absolute_s: i64,
    pub secure: bool,
    used_states: std::sync::Mutex<std::collections::HashMap<String, i64>>,
}

/// Sign-in states remembered as used (each lives at most [`LOGIN_TTL_S`]).
const USED_STATES_MAX: usize = 10_000;
/// A sign-in must come back from the provider within this time.
pub const LOGIN_TTL_S: i64 = 600;

impl fmt::Debug for Sessions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sessions")
            .field("keys", &self.keys.keys().collect::<Vec<_>>())
            .field("newest", &self.newest)
            .finish()
    }
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// Orders cookie key ids so that `c2 < c10`: by length, then by text.
fn key_order(id: &str) -> (usize, &str) {
    (id.len(), id)
}

impl Sessions {
    /// Derives a sealing key and a CSRF key from every cookie key of the ring (HKDF-SHA256,
    /// distinct labels). New cookies are sealed with the newest key: the longest, then greatest
    /// id (`c1 < c2 < c10`), so a rotation adds `c2` and keeps `c1` until its cookies expire.
    pub fn new(
        ring: &identitymesh_keyring::KeyRing,
        idle_s: i64,
        absolute_s: i64,
        secure: bool,
    ) -> anyhow::Result<Self> {
        let mut keys = BTreeMap::new();
        for (id, v) in &ring.cookie_keys {
            let ikm = base64::engine::general_purpose::STANDARD
                .decode(v)
                .map_err(|_| anyhow::anyhow!("keyring.json: cookie key {id:?} is not base64"))?;
            let hk = hkdf::Hkdf::<sha2::Sha256>::new(Some(b"identitymesh"), &ikm);
            let mut enc = [0u8; 32];
            let mut csrf = [0u8; 32];
            hk.expand(b"session cookie v1", &mut enc)
                .and_then(|_| hk.expand(b"csrf token v1", &mut csrf))
                .map_err(|_| anyhow::anyhow!("cookie key {id:?}: key derivation failed"))?;
            let aead = Aes256Gcm::new_from_slice(&enc)
                .map_err(|_| anyhow::anyhow!("cookie key {id:?}: bad length"))?;
            keys.insert(id.clone(), DerivedKey { aead, csrf });
        }
        let newest = ring
            .cookie_keys
            .keys()
            .max_by(|a, b| key_order(a).cmp(&key_order(b)))
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("keyring.json: no cookie keys"))?;
        Ok(Self {
            keys,
            newest,
            idle_s,
            absolute_s,
            secure,
            used_states: Default::default(),
        })
    }

    /// Seals any value for `purpose` (bound as associated data with the key id, so a value
    /// sealed for one purpose or key does not open as another): `v1.<kid>.<nonce+ciphertext>`.
    pub fn seal_value(&self, purpose: &str, plaintext: &[u8]) -> String {
        let key = &self.keys[&self.newest];
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let aad = format!("{VERSION}|{purpose}|{}", self.newest);
        let ct = key
            .aead
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: aad.as_bytes(),
                },
            )
            .unwrap_or_default();
        let mut body = nonce.to_vec();
        body.extend_from_slice(&ct);
        format!("{VERSION}.{}.{}", self.newest, b64(&body))
    }

    pub fn open_value(&self, purpose: &str, sealed: &str) -> Result<Vec<u8>, SessionError> {
        let mut parts = sealed.splitn(3, '.');
        let (Some(VERSION), Some(kid), Some(body)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(SessionError::Malformed);
        };
        let key = self
            .keys
            .get(kid)
            .ok_or_else(|| SessionError::UnknownKey(kid.chars().take(32).collect()))?;
        let body = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| SessionError::Malformed)?;
        if body.len() < 12 + 16 {
            return Err(SessionError::Malformed);
        }
        let aad = format!("{VERSION}|{purpose}|{kid}");
        key.aead
            .decrypt(
                Nonce::from_slice(&body[..12]),
                Payload {
                    msg: &body[12..],
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| SessionError::Tampered)
    }

    pub fn seal(&self, s: &SessionData) -> String {
        self.seal_value(
            "session",
            serde_json::to_vec(s).unwrap_or_default().as_slice(),
        )
    }

    /// Opens a session cookie and checks its lifetimes at `now` (unix seconds).
    pub fn open(&self, cookie: &str, now: i64) -> Result<SessionData, SessionError> {
        let bytes = self.open_value("session", cookie)?;
        let s: SessionData = serde_json::from_slice(&bytes).map_err(|_| SessionError::Malformed)?;
        if now - s.iat > self.absolute_s {
            return Err(SessionError::AbsoluteExpired(self.absolute_s));
        }
        if now - s.seen > self.idle_s {
            return Err(SessionError::IdleExpired(self.idle_s));
        }
        Ok(s)
    }

    /// The session moved to `now`, re-sealed, when enough time passed since it was last moved.
    pub fn refreshed(&self, s: &SessionData, now: i64) -> Option<String> {
        (now - s.seen >= REFRESH_AFTER_S).then(|| {
            let mut s = s.clone();
            s.seen = now;
            self.seal(&s)
        })
    }

    /// The CSRF token of a session: HMAC-SHA256 of its id under the newest key's CSRF key.
    /// Checked against every key the ring holds, so a rotation keeps open sessions working.
    pub fn csrf_token(&self, s: &SessionData) -> String {
        csrf_with(&self.keys[&self.newest].csrf, &s.sid)
    }

    pub fn csrf_ok(&self, s: &SessionData, token: &str) -> bool {
        self.keys
            .values()
            .any(|k| constant_time_eq(csrf_with(&k.csrf, &s.sid).as_bytes(), token.as_bytes()))
    }

    /// `Set-Cookie` for a value (Max-Age: the absolute lifetime; the idle bound is in the
    /// sealed data, so the browser's copy lapsing is only a tidiness measure).
    pub fn set_cookie(&self, name: &str, value: &str, max_age_s: i64) -> String {
        self.set_cookie_at(name, value, max_age_s, "/")
    }

    pub fn set_cookie_at(&self, name: &str, value: &str, max_age_s: i64, path: &str) -> String {
        let secure = if self.secure { "; Secure" } else { "" };
        format!("{name}={value}; Path={path}; HttpOnly; SameSite=Lax; Max-Age={max_age_s}{secure}")
    }

    /// Records a sign-in `state` as used; false when it already was (a replayed callback).
    /// Bounded: expired entries go first, and past the bound the oldest.
    pub fn use_state(&self, state: &str, expires: i64, now: i64) -> bool {
        let mut used = self.used_states.lock().unwrap_or_else(|p| p.into_inner());
        used.retain(|_, exp| *exp >= now);
        if used.contains_key(state) {
            return false;
        }
        if used.len() >= USED_STATES_MAX {
            if let Some(oldest) = used.iter().min_by_key(|(_, e)| **e).map(|(k, _)| k.clone()) {
                used.remove(&oldest);
            }
        }
        used.insert(state.to_string(), expires);
        true
    }

    pub fn clear_cookie(&self, name: &str) -> String {
        self.set_cookie(name, "", 0)
    }
}

fn csrf_with(key: &[u8; 32], sid: &str) -> String {
    let Ok(mut mac) = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(key) else {
        return String::new();
    };
    mac.update(b"csrf|");
    mac.update(sid.as_bytes());
    b64(&mac.finalize().into_bytes())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The value of cookie `name` in a request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a axum::http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

pub fn now_s() -> i64 {
    chrono::Utc::now().timestamp()
}

#[cfg(test)]
mod tests {
    use super::*;
    use identitymesh_keyring::KeyRing;

    fn principal() -> Principal {
        Principal {
            subject: "alice".into(),
            permissions: [Permission::DashboardRead, Permission::AuditRead]
                .into_iter()
                .collect(),
        }
    }

    fn sessions(ring: &KeyRing) -> Sessions {
        Sessions::new(ring, 1800, 43_200, true).unwrap()
    }

    #[test]
    fn sealed_cookie_round_trips_and_hides_its_content() {
        let ring = KeyRing::generate();
        let s = sessions(&ring);
        let d = SessionData::new(&principal(), "Alice Example", 1000);
        let c = s.seal(&d);
        assert!(c.starts_with("v1.c1."), "{c}");
        assert!(!c.contains("alice") && !c.contains("dashboard"));
        let back = s.open(&c, 1001).unwrap();
        assert_eq!(back, d);
        assert_eq!(back.principal().permissions, principal().permissions);
        // Cookie-safe characters only.
        assert!(c
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch)));
    }

    #[test]
    fn tampered_foreign_and_malformed_cookies_are_refused() {
        let ring = KeyRing::generate();
        let s = sessions(&ring);
        let c = s.seal(&SessionData::new(&principal(), "a", 1000));
        // Flip one byte of the ciphertext.
        let (head, body) = c.rsplit_once('.').unwrap();
        let mut raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .unwrap();
        raw[20] ^= 1;
        let flipped = format!("{head}.{}", b64(&raw));
        assert_eq!(s.open(&flipped, 1000), Err(SessionError::Tampered));
        // Another ring with the same key id: does not open.
        let other = sessions(&KeyRing::generate());
        assert_eq!(other.open(&c, 1000), Err(SessionError::Tampered));
        // A key id the ring does not hold.
        let renamed = c.replacen("v1.c1.", "v1.c9.", 1);
        assert_eq!(
            s.open(&renamed, 1000),
            Err(SessionError::UnknownKey("c9".into()))
        );
        for bad in ["", "v1", "v1.c1", "v2.c1.AAAA", "v1.c1.!!!!", "v1.c1.AAAA"] {
            assert_eq!(s.open(bad, 1000), Err(SessionError::Malformed), "{bad}");
        }
        // Sealed for another purpose: does not open as a session.
        let login = s.seal_value("login", b"{}");
        assert_eq!(s.open(&login, 1000), Err(SessionError::Tampered));
    }

    #[test]
    fn idle_and_absolute_lifetimes() {
        let ring = KeyRing::generate();
        let s = Sessions::new(&ring, 100, 1000, true).unwrap();
        let d = SessionData::new(&principal(), "a", 0);
        let c = s.seal(&d);
        assert!(s.open(&c, 100).is_ok());
        assert_eq!(s.open(&c, 101), Err(SessionError::IdleExpired(100)));
        // Used often enough: refreshed, it lives until the absolute bound and no longer.
        let mut cur = c;
        let mut t = 0;
        while t < 1000 {
            t += 90;
            match s.open(&cur, t) {
                Ok(d) => cur = s.refreshed(&d, t).unwrap_or(cur),
                Err(e) => {
                    assert_eq!(e, SessionError::AbsoluteExpired(1000));
                    assert!(t > 1000);
                }
            }
        }
        assert_eq!(s.open(&cur, 1001), Err(SessionError::AbsoluteExpired(1000)));
        // Not re-sealed on every request.
        let d = s.open(&s.seal(&SessionData::new(&principal(), "a", 0)), 10);
        assert!(s.refreshed(&d.unwrap(), 10).is_none());
    }

    #[test]
    fn a_rotated_ring_opens_old_cookies_and_seals_with_the_new_key() {
        let mut ring = KeyRing::generate();
        let old = sessions(&ring);
        let d = SessionData::new(&principal(), "a", 1000);
        let c = old.seal(&d);
        let token = old.csrf_token(&d);
        let extra = KeyRing::generate().cookie_keys["c1"].clone();
        ring.cookie_keys.insert("c10".into(), extra.clone());
        ring.cookie_keys.insert("c2".into(), extra);
        let new = sessions(&ring);
        assert_eq!(new.open(&c, 1000).unwrap(), d);
        assert!(new.csrf_ok(&d, &token), "the old CSRF token still works");
        assert!(new.seal(&d).starts_with("v1.c10."), "c10 is newer than c2");
        // Retiring the old key ends its sessions.
        ring.cookie_keys.remove("c1");
        assert_eq!(
            sessions(&ring).open(&c, 1000),
            Err(SessionError::UnknownKey("c1".into()))
        );
    }

    #[test]
    fn csrf_token_is_bound_to_the_session() {
        let ring = KeyRing::generate();
        let s = sessions(&ring);
        let a = SessionData::new(&principal(), "a", 0);
        let b = SessionData::new(&principal(), "a", 0);
        let t = s.csrf_token(&a);
        assert!(s.csrf_ok(&a, &t));
        assert!(!s.csrf_ok(&b, &t));
        assert!(!s.csrf_ok(&a, ""));
        assert!(!sessions(&KeyRing::generate()).csrf_ok(&a, &t));
    }

    #[test]
    fn cookie_attributes_and_parsing() {
        let ring = KeyRing::generate();
        let s = sessions(&ring);
        let c = s.set_cookie(SESSION_COOKIE, "v", 60);
        for a in ["HttpOnly", "SameSite=Lax", "Secure", "Path=/", "Max-Age=60"] {
            assert!(c.contains(a), "{c}");
        }
        let plain = Sessions::new(&ring, 1, 2, false).unwrap();
        assert!(!plain.set_cookie("x", "v", 1).contains("Secure"));
        let mut h = axum::http::HeaderMap::new();
        h.insert("cookie", "a=1; im_session=v1.c1.x; b=2".parse().unwrap());
        assert_eq!(cookie(&h, SESSION_COOKIE), Some("v1.c1.x"));
        assert_eq!(cookie(&h, "c"), None);
    }
}
