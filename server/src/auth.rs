//! Who is calling and what they may do: the bootstrap admin token (stored hashed) and OIDC JWT
//! bearer tokens (RS256/ES256 against a JWKS from a file or URL) mapped to permissions.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::RwLock;

use crate::config::OidcConfig;

/// Every permission an endpoint can require.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Permission {
    #[serde(rename = "dashboard.read")]
    DashboardRead,
    #[serde(rename = "connectors.write")]
    ConnectorsWrite,
    #[serde(rename = "schedules.manage")]
    SchedulesManage,
    #[serde(rename = "relays.manage")]
    RelaysManage,
    #[serde(rename = "secrets.write")]
    SecretsWrite,
    #[serde(rename = "audit.read")]
    AuditRead,
}

impl Permission {
    pub const ALL: [Permission; 6] = [
        Permission::DashboardRead,
        Permission::ConnectorsWrite,
        Permission::SchedulesManage,
        Permission::RelaysManage,
        Permission::SecretsWrite,
        Permission::AuditRead,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::DashboardRead => "dashboard.read",
            Permission::ConnectorsWrite => "connectors.write",
            Permission::SchedulesManage => "schedules.manage",
            Permission::RelaysManage => "relays.manage",
            Permission::SecretsWrite => "secrets.write",
            Permission::AuditRead => "audit.read",
        }
    }
    pub fn parse(s: &str) -> Option<Permission> {
        Permission::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Principal {
    pub subject: String,
    pub permissions: BTreeSet<Permission>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("no bearer token; send Authorization: Bearer <token>")]
    Missing,
    #[error("the bearer token is not valid: {0}")]
    Invalid(String),
    #[error("the identity provider's keys are unavailable: {0}")]
    KeysUnavailable(String),
}

pub const BOOTSTRAP_TOKEN_NAME: &str = "bootstrap-admin";
const BOOTSTRAP_PREFIX: &str = "imb_";

pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

pub fn new_bootstrap_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    format!("{BOOTSTRAP_PREFIX}{}", hex::encode(b))
}

/// Compares without an early exit, so timing does not reveal how much of a hash matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

enum JwksSource {
    File(std::path::PathBuf),
    Url(String),
}

struct Oidc {
    cfg: OidcConfig,
    source: JwksSource,
    keys: RwLock<(JwkSet, Option<Instant>)>,
    http: reqwest::Client,
}

pub struct Authenticator {
    bootstrap_hash: Option<String>,
    oidc: Option<Oidc>,
}

/// Refetch the JWKS for an unknown key id at most this often.
const JWKS_REFRESH_MIN: Duration = Duration::from_secs(30);

impl Authenticator {
    pub async fn new(
        bootstrap_hash: Option<String>,
        oidc: Option<OidcConfig>,
    ) -> Result<Arc<Self>, AuthError> {
        let oidc = match oidc {
            None => None,
            Some(cfg) => {
                let source = match (&cfg.jwks_file, &cfg.jwks_url) {
                    (Some(f), _) => JwksSource::File(f.clone()),
                    (None, Some(u)) => JwksSource::Url(u.clone()),
                    (None, None) => {
                        return Err(AuthError::KeysUnavailable(
                            "set auth.oidc.jwks_file or auth.oidc.jwks_url".into(),
                        ))
                    }
                };
                let http = reqwest::Client::builder()
                    .timeout(Duration::from_secs(10))
                    .build()
                    .map_err(|e| AuthError::KeysUnavailable(e.to_string()))?;
                let o = Oidc {
                    cfg,
                    source,
                    keys: RwLock::new((JwkSet { keys: vec![] }, None)),
                    http,
                };
                // A file must be readable at start; a URL may be down now and come back later.
                match o.fetch().await {
                    Ok(set) => *o.keys.write().await = (set, Some(Instant::now())),
                    Err(e) if matches!(o.source, JwksSource::File(_)) => return Err(e),
                    Err(e) => tracing::warn!(error = %e, "JWKS not loaded yet; will retry"),
                }
                Some(o)
            }
        };
        Ok(Arc::new(Self {
            bootstrap_hash,
            oidc,
        }))
    }

    /// The bootstrap admin token alone (the standalone sign-in form): nothing else signs in.
    pub fn authenticate_bootstrap(&self, token: &str) -> Result<Principal, AuthError> {
        let token = token.trim();
        let ok = token.starts_with(BOOTSTRAP_PREFIX)
            && self
                .bootstrap_hash
                .as_deref()
                .is_some_and(|h| constant_time_eq(h.as_bytes(), hash_token(token).as_bytes()));
        if ok {
            Ok(Principal {
                subject: BOOTSTRAP_TOKEN_NAME.into(),
                permissions: Permission::ALL.into_iter().collect(),
            })
        } else {
            Err(AuthError::Invalid("not the bootstrap admin token".into()))
        }
    }

    /// Whether browsers sign in at the OIDC provider (else with the bootstrap token).
    pub fn oidc_sign_in(&self) -> bool {
        false
    }

    /// Resolves a bearer token to a principal.
    pub async fn authenticate(&self, bearer: Option<&str>) -> Result<Principal, AuthError> {
        let token = bearer
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::Missing)?;
        if token.starts_with(BOOTSTRAP_PREFIX) {
            return self
                .authenticate_bootstrap(token)
                .map_err(|_| AuthError::Invalid("unknown admin token".into()));
        }
        match &self.oidc {
            Some(o) => o.verify(token).await,
            None => Err(AuthError::Invalid(
                "not an admin token, and OIDC is not configured (auth.oidc)".into(),
            )),
        }
    }
}

impl Oidc {
    async fn fetch(&self) -> Result<JwkSet, AuthError> {
        let text = match &self.source {
            JwksSource::File(p) => tokio::fs::read_to_string(p).await.map_err(|e| {
                AuthError::KeysUnavailable(format!("JWKS file {}: {e}", p.display()))
            })?,
            JwksSource::Url(u) => self
                .http
                .get(u)
                .send()
                .await
                .and_then(|r| r.error_for_status())
                .map_err(|e| AuthError::KeysUnavailable(format!("JWKS URL {u}: {e}")))?
                .text()
                .await
                .map_err(|e| AuthError::KeysUnavailable(format!("JWKS URL {u}: {e}")))?,
        };
        serde_json::from_str(&text)
            .map_err(|e| AuthError::KeysUnavailable(format!("JWKS is not a JSON key set: {e}")))
    }

    async fn key_for(&self, kid: Option<&str>) -> Result<DecodingKey, AuthError> {
        let find = |set: &JwkSet| -> Option<DecodingKey> {
            let jwk = match kid {
                Some(k) => set.find(k)?,
                None if set.keys.len() == 1 => &set.keys[0],
                None => return None,
            };
            DecodingKey::from_jwk(jwk).ok()
        };
        {
            let keys = self.keys.read().await;
            if let Some(k) = find(&keys.0) {
                return Ok(k);
            }
            if keys.1.is_some_and(|t| t.elapsed() < JWKS_REFRESH_MIN) {
                return Err(AuthError::Invalid("signing key not in the JWKS".into()));
            }
        }
        // Unknown key: the provider may have rotated; refetch (rate-limited above).
        let set = self.fetch().await?;
        let key = find(&set);
        *self.keys.write().await = (set, Some(Instant::now()));
        key.ok_or_else(|| AuthError::Invalid("signing key not in the JWKS".into()))
    }

    async fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| AuthError::Invalid(format!("malformed JWT: {e}")))?;
        if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
            return Err(AuthError::Invalid(format!(
                "algorithm {:?} is not accepted (RS256 or ES256)",
                header.alg
            )));
        }
        let key = self.key_for(header.kid.as_deref()).await?;
        let mut v = Validation::new(header.alg);
        v.set_issuer(&[&self.cfg.issuer]);
        v.set_audience(&[&self.cfg.audience]);
        v.leeway = 30;
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &key, &v)
            .map_err(|e| AuthError::Invalid(e.to_string()))?;
        let claims = data.claims;
        let subject = claims
            .get("sub")
            .and_then(|s| s.as_str())
            .unwrap_or("unknown")
            .to_string();
        let mut permissions = BTreeSet::new();
        for p in claim_strings(&claims, &self.cfg.permissions_claim) {
            if let Some(p) = Permission::parse(&p) {
                permissions.insert(p);
            }
        }
        for role in claim_strings(&claims, &self.cfg.roles_claim) {
            for p in self.cfg.role_permissions.get(&role).into_iter().flatten() {
                if let Some(p) = Permission::parse(p) {
                    permissions.insert(p);
                }
            }
        }
        Ok(Principal {
            subject,
            permissions,
        })
    }
}

/// A claim holding an array of strings or one space-separated string (the OAuth `scp` style).
fn claim_strings(claims: &serde_json::Value, name: &str) -> Vec<String> {
    match claims.get(name) {
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        Some(serde_json::Value::String(s)) => s.split_whitespace().map(str::to_string).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
pub mod testing {
    //! An ES256 signer and its JWKS, for tests that need real OIDC tokens.
    use super::*;
    use base64::Engine as _;

    pub struct TestIssuer {
        pub jwks_json: String,
        key: jsonwebtoken::EncodingKey,
        pub issuer: String,
        pub audience: String,
    }

    impl Default for TestIssuer {
        fn default() -> Self {
            Self::new()
        }
    }

    impl TestIssuer {
        pub fn new() -> Self {
            let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let raw = kp.public_key_raw(); // 0x04 || x || y
            let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
            let jwks = serde_json::json!({"keys":[{"kty":"EC","crv":"P-256","kid":"k1","alg":"ES256","use":"sig","x":b64(&raw[1..33]),"y":b64(&raw[33..65])}]});
            Self {
                jwks_json: jwks.to_string(),
                key: jsonwebtoken::EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap(),
                issuer: "https://login.test/".into(),
                audience: "identitymesh".into(),
            }
        }

        pub fn token(&self, permissions: &[&str], exp_offset: i64) -> String {
            let mut h = jsonwebtoken::Header::new(Algorithm::ES256);
            h.kid = Some("k1".into());
            let now = chrono::Utc::now().timestamp();
            let claims = serde_json::json!({"iss":self.issuer,"aud":self.audience,"sub":"alice","exp":now+exp_offset,"iat":now,"permissions":permissions});
            jsonwebtoken::encode(&h, &claims, &self.key).unwrap()
        }

        pub fn config(&self, jwks_file: std::path::PathBuf) -> OidcConfig {
            OidcConfig {
                issuer: self.issuer.clone(),
                audience: self.audience.clone(),
                jwks_file: Some(jwks_file),
                jwks_url: None,
                permissions_claim: "permissions".into(),
                roles_claim: "roles".into(),
                role_permissions: Default::default(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::TestIssuer;
    use super::*;

    async fn auth_with_oidc(issuer: &TestIssuer) -> (tempfile::TempDir, Arc<Authenticator>) {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("jwks.json");
        std::fs::write(&f, &issuer.jwks_json).unwrap();
        let tok = "imb_secret";
        let a = Authenticator::new(Some(hash_token(tok)), Some(issuer.config(f)))
            .await
            .unwrap();
        (dir, a)
    }

    #[tokio::test]
    async fn bootstrap_token() {
        let i = TestIssuer::new();
        let (_d, a) = auth_with_oidc(&i).await;
        let p = a.authenticate(Some("imb_secret")).await.unwrap();
        assert_eq!(p.permissions.len(), Permission::ALL.len());
        assert!(a.authenticate(Some("imb_wrong")).await.is_err());
        assert_eq!(a.authenticate(None).await.unwrap_err(), AuthError::Missing);
    }

    #[tokio::test]
    async fn es256_tokens_map_permissions() {
        let i = TestIssuer::new();
        let (_d, a) = auth_with_oidc(&i).await;
        let p = a
            .authenticate(Some(&i.token(&["dashboard.read", "bogus"], 300)))
            .await
            .unwrap();
        assert_eq!(p.subject, "alice");
        assert_eq!(
            p.permissions,
            [Permission::DashboardRead].into_iter().collect()
        );
        // Expired, wrong audience, tampered.
        assert!(a.authenticate(Some(&i.token(&[], -600))).await.is_err());
        let other = TestIssuer::new();
        assert!(a.authenticate(Some(&other.token(&[], 300))).await.is_err());
        let mut t = i.token(&["audit.read"], 300);
        t.push('x');
        assert!(a.authenticate(Some(&t)).await.is_err());
    }

    #[tokio::test]
    async fn roles_map_through_configuration() {
        let i = TestIssuer::new();
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("jwks.json");
        std::fs::write(&f, &i.jwks_json).unwrap();
        let mut cfg = i.config(f);
        cfg.permissions_claim = "scp".into();
        cfg.role_permissions
            .insert("sub".into(), vec!["audit.read".into()]);
        // The test token carries `sub` = alice, no roles claim: nothing maps.
        let a = Authenticator::new(None, Some(cfg)).await.unwrap();
        let p = a
            .authenticate(Some(&i.token(&["audit.read"], 300)))
            .await
            .unwrap();
        assert!(p.permissions.is_empty());
    }

    #[test]
    fn claim_shapes() {
        let c = serde_json::json!({"a":["x","y"],"b":"x y","c":1});
        assert_eq!(claim_strings(&c, "a"), vec!["x", "y"]);
        assert_eq!(claim_strings(&c, "b"), vec!["x", "y"]);
        assert!(claim_strings(&c, "c").is_empty());
    }
}
