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
    /// The `jwks_uri` of the discovery document.
    Discovery,
}

/// What this server uses of the provider's discovery document.
#[derive(Debug, Clone, serde::Deserialize, PartialEq, Eq)]
pub struct Discovery {
    pub issuer: String,
    pub jwks_uri: String,
    #[serde(default)]
    pub authorization_endpoint: Option<String>,
    #[serde(default)]
    pub token_endpoint: Option<String>,
    #[serde(default)]
    pub end_session_endpoint: Option<String>,
}

struct Oidc {
    cfg: OidcConfig,
    source: JwksSource,
    keys: RwLock<(JwkSet, Option<Instant>)>,
    /// The last discovery document, or why there is none yet.
    discovery: RwLock<Result<Discovery, String>>,
    client_secret: Option<String>,
    http: reqwest::Client,
}

pub struct Authenticator {
    bootstrap_hash: Option<String>,
    oidc: Option<Arc<Oidc>>,
}

/// Refetch the JWKS for an unknown key id at most this often.
const JWKS_REFRESH_MIN: Duration = Duration::from_secs(30);
/// Refetch the discovery document this often once it loaded...
const DISCOVERY_REFRESH: Duration = Duration::from_secs(300);
/// ...and after a failure, from this delay doubling up to a minute.
const DISCOVERY_RETRY_FIRST: Duration = Duration::from_millis(500);
const DISCOVERY_RETRY_MAX: Duration = Duration::from_secs(60);

/// The claims of a verified ID token that sign-in needs.
#[derive(Debug, Clone)]
pub struct SignedInUser {
    pub principal: Principal,
    pub display_name: String,
}

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
                    (None, None) => JwksSource::Discovery,
                };
                let client_secret = match &cfg.client_secret_file {
                    None => None,
                    Some(f) => {
                        let s = std::fs::read_to_string(f).map_err(|e| {
                            AuthError::KeysUnavailable(format!(
                                "auth.oidc.client_secret_file {}: {e}",
                                f.display()
                            ))
                        })?;
                        let s = s.trim().to_string();
                        if s.is_empty() {
                            return Err(AuthError::KeysUnavailable(format!(
                                "auth.oidc.client_secret_file {} is empty",
                                f.display()
                            )));
                        }
                        Some(s)
                    }
                };
                let mut http = reqwest::Client::builder()
                    .timeout(Duration::from_secs(10))
                    .redirect(reqwest::redirect::Policy::none());
                if let Some(f) = &cfg.ca_file {
                    for cert in issuer_cas(f)? {
                        http = http.add_root_certificate(cert);
                    }
                }
                let http = http
                    .build()
                    .map_err(|e| AuthError::KeysUnavailable(e.to_string()))?;
                let o = Arc::new(Oidc {
                    cfg,
                    source,
                    keys: RwLock::new((JwkSet { keys: vec![] }, None)),
                    discovery: RwLock::new(Err("not fetched yet".into())),
                    client_secret,
                    http,
                });
                // Discovery only when something needs it (the keys, or browser sign-in), then
                // refreshed in the background; a provider that is down now is retried, never
                // fatal.
                if matches!(o.source, JwksSource::Discovery) || o.cfg.client_id.is_some() {
                    let ok = o.discover().await.is_ok();
                    tokio::spawn(discovery_loop(Arc::downgrade(&o), ok));
                } else {
                    *o.discovery.write().await = Err(
                        "OIDC discovery is not used: the JWKS is configured and there is no \
                         auth.oidc.client_id"
                            .into(),
                    );
                }
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

/// Keeps the discovery document fresh: every few minutes once loaded, with a capped backoff
/// after a failure. Ends when the authenticator is dropped.
/// The certificates of `auth.oidc.ca_file` (at least one, or the file is refused).
fn issuer_cas(f: &std::path::Path) -> Result<Vec<reqwest::Certificate>, AuthError> {
    let refused = |why: String| {
        AuthError::KeysUnavailable(format!("auth.oidc.ca_file {}: {why}", f.display()))
    };
    let pem = std::fs::read(f).map_err(|e| refused(e.to_string()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| refused(format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(refused(
            "holds no certificate (expected PEM blocks: -----BEGIN CERTIFICATE-----)".into(),
        ));
    }
    Ok(certs)
}

async fn discovery_loop(oidc: std::sync::Weak<Oidc>, mut ok: bool) {
    let mut retry = DISCOVERY_RETRY_FIRST;
    loop {
        tokio::time::sleep(if ok { DISCOVERY_REFRESH } else { retry }).await;
        let Some(o) = oidc.upgrade() else { return };
        ok = o.discover().await.is_ok();
        retry = if ok {
            DISCOVERY_RETRY_FIRST
        } else {
            (retry * 2).min(DISCOVERY_RETRY_MAX)
        };
    }
}

/// Where a browser signs in: the provider's endpoints and this server's client.
#[derive(Debug, Clone)]
pub struct SignIn {
    pub authorization_endpoint: String,
    pub end_session_endpoint: Option<String>,
    pub client_id: String,
    pub redirect_url: String,
}

impl Authenticator {
    /// Whether the bootstrap admin token can sign anyone in (standalone servers).
    pub fn has_bootstrap(&self) -> bool {
        self.bootstrap_hash.is_some()
    }

    /// Whether browsers sign in at the OIDC provider (else with the bootstrap token).
    pub fn oidc_sign_in(&self) -> bool {
        self.oidc
            .as_ref()
            .is_some_and(|o| o.cfg.client_id.is_some())
    }

    /// The provider's discovery document as last fetched, or why it is unavailable.
    pub async fn discovery(&self) -> Result<Discovery, AuthError> {
        let o = self
            .oidc
            .as_ref()
            .ok_or_else(|| AuthError::KeysUnavailable("auth.oidc is not configured".into()))?;
        o.discovery
            .read()
            .await
            .clone()
            .map_err(AuthError::KeysUnavailable)
    }

    /// Fetches the discovery document now (the post-cutover check: this instance reaches the
    /// issuer), keeping it for sign-ins.
    pub async fn discover_now(&self) -> Result<(), String> {
        match &self.oidc {
            Some(o) => o.discover().await,
            None => Err("auth.oidc is not configured".into()),
        }
    }

    /// The endpoints a sign-in needs (none when OIDC sign-in is not configured).
    pub async fn sign_in(&self) -> Result<SignIn, AuthError> {
        let o = self
            .oidc
            .as_ref()
            .filter(|o| o.cfg.client_id.is_some())
            .ok_or_else(|| {
                AuthError::KeysUnavailable(
                    "OIDC sign-in is not configured (auth.oidc.client_id)".into(),
                )
            })?;
        let d = self.discovery().await?;
        let authorization_endpoint = d.authorization_endpoint.ok_or_else(|| {
            AuthError::KeysUnavailable(format!(
                "the discovery document {} names no authorization_endpoint",
                o.discovery_url()
            ))
        })?;
        Ok(SignIn {
            authorization_endpoint,
            end_session_endpoint: d.end_session_endpoint,
            client_id: o.cfg.client_id.clone().unwrap_or_default(),
            redirect_url: o.cfg.redirect_url.clone().unwrap_or_default(),
        })
    }

    /// Redeems an authorization code at the token endpoint (PKCE verifier, the client secret
    /// by HTTP Basic when configured) and returns the ID token.
    pub async fn redeem_code(&self, code: &str, verifier: &str) -> Result<String, AuthError> {
        let o = self
            .oidc
            .as_ref()
            .ok_or_else(|| AuthError::KeysUnavailable("auth.oidc is not configured".into()))?;
        let d = self.discovery().await?;
        let url = d.token_endpoint.ok_or_else(|| {
            AuthError::KeysUnavailable(format!(
                "the discovery document {} names no token_endpoint",
                o.discovery_url()
            ))
        })?;
        let client_id = o.cfg.client_id.clone().unwrap_or_default();
        let redirect = o.cfg.redirect_url.clone().unwrap_or_default();
        let mut form = vec![
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", redirect.as_str()),
            ("code_verifier", verifier),
        ];
        let mut req = o.http.post(&url);
        match &o.client_secret {
            Some(secret) => {
                req = req.basic_auth(form_encode(&client_id), Some(form_encode(secret)))
            }
            None => form.push(("client_id", client_id.as_str())),
        }
        let res = req.form(&form).send().await.map_err(|e| {
            AuthError::KeysUnavailable(format!("token endpoint {url}: {}", http_error(e)))
        })?;
        let status = res.status();
        let body: serde_json::Value = res.json().await.unwrap_or_default();
        if !status.is_success() {
            // The provider's error code and description, never the request.
            let err = body.get("error").and_then(|v| v.as_str()).unwrap_or("?");
            let desc = body
                .get("error_description")
                .and_then(|v| v.as_str())
                .unwrap_or("");
            return Err(AuthError::Invalid(format!(
                "the token endpoint {url} refused the code ({status}): {} {}",
                short(err),
                short(desc)
            )));
        }
        body.get("id_token")
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .ok_or_else(|| {
                AuthError::Invalid(format!("the token endpoint {url} returned no id_token"))
            })
    }

    /// Verifies an ID token: signature (JWKS), issuer, audience = the UI client, expiry, and
    /// the sign-in's nonce; its claims map to permissions as a bearer token's do.
    pub async fn verify_id_token(
        &self,
        token: &str,
        nonce: &str,
    ) -> Result<SignedInUser, AuthError> {
        let o = self
            .oidc
            .as_ref()
            .filter(|o| o.cfg.client_id.is_some())
            .ok_or_else(|| {
                AuthError::Invalid("OIDC sign-in is not configured (auth.oidc.client_id)".into())
            })?;
        let client_id = o.cfg.client_id.as_deref().unwrap_or_default();
        let claims = o.decode_claims(token, client_id).await?;
        let got = claims.get("nonce").and_then(|v| v.as_str()).unwrap_or("");
        if got.is_empty() || got != nonce {
            return Err(AuthError::Invalid(
                "the ID token's nonce is not the one of this sign-in".into(),
            ));
        }
        let principal = o.principal_from(&claims);
        let display_name = ["name", "preferred_username", "email"]
            .iter()
            .find_map(|c| claims.get(*c).and_then(|v| v.as_str()))
            .unwrap_or(&principal.subject)
            .to_string();
        Ok(SignedInUser {
            principal,
            display_name,
        })
    }
}

/// `application/x-www-form-urlencoded` of a Basic credential part (RFC 6749 §2.3.1).
fn form_encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// A failed call to the provider as one line: what reqwest says and each cause below it (a
/// refused connection, a certificate the configured CAs do not vouch for), without the URL,
/// which the caller names once. reqwest's own text stops at "error sending request".
fn http_error(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut out = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        let t = c.to_string();
        if !t.is_empty() && !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        cause = c.source();
    }
    out
}

/// At most 200 characters of a provider's message.
pub fn short(s: &str) -> String {
    s.chars().take(200).filter(|c| !c.is_control()).collect()
}

impl Oidc {
    fn discovery_url(&self) -> String {
        format!(
            "{}/.well-known/openid-configuration",
            self.cfg.issuer.trim_end_matches('/')
        )
    }

    /// Fetches and checks the discovery document; keeps the last good one on failure.
    async fn discover(&self) -> Result<(), String> {
        let url = self.discovery_url();
        let got: Result<Discovery, String> = async {
            let res = self.http.get(&url).send().await.map_err(http_error)?;
            let res = res.error_for_status().map_err(http_error)?;
            let d: Discovery = res
                .json()
                .await
                .map_err(|e| format!("not a discovery document: {e}"))?;
            if d.issuer != self.cfg.issuer {
                return Err(format!(
                    "its issuer is {:?}, not the configured auth.oidc.issuer {:?}",
                    d.issuer, self.cfg.issuer
                ));
            }
            Ok(d)
        }
        .await;
        match got {
            Ok(d) => {
                let mut cur = self.discovery.write().await;
                if cur.as_ref().ok() != Some(&d) {
                    tracing::info!(url = %url, jwks_uri = %d.jwks_uri, "OIDC discovery document loaded");
                }
                *cur = Ok(d);
                Ok(())
            }
            Err(e) => {
                let msg = format!("OIDC discovery document {url}: {e}");
                tracing::warn!(url = %url, reason = %e, "OIDC discovery failed; retrying in the background");
                let mut cur = self.discovery.write().await;
                if cur.is_err() {
                    *cur = Err(msg.clone());
                }
                Err(msg)
            }
        }
    }

    async fn fetch(&self) -> Result<JwkSet, AuthError> {
        let get_url = |u: String| async move {
            self.http
                .get(&u)
                .send()
                .await
                .and_then(|r| r.error_for_status())
                .map_err(|e| {
                    AuthError::KeysUnavailable(format!("JWKS URL {u}: {}", http_error(e)))
                })?
                .text()
                .await
                .map_err(|e| AuthError::KeysUnavailable(format!("JWKS URL {u}: {}", http_error(e))))
        };
        let text = match &self.source {
            JwksSource::File(p) => tokio::fs::read_to_string(p).await.map_err(|e| {
                AuthError::KeysUnavailable(format!("JWKS file {}: {e}", p.display()))
            })?,
            JwksSource::Url(u) => get_url(u.clone()).await?,
            JwksSource::Discovery => {
                let d = self.discovery.read().await.clone();
                let d = match d {
                    Ok(d) => d,
                    // Not loaded yet: one more try now rather than wait for the loop.
                    Err(_) => {
                        self.discover().await.map_err(AuthError::KeysUnavailable)?;
                        self.discovery
                            .read()
                            .await
                            .clone()
                            .map_err(AuthError::KeysUnavailable)?
                    }
                };
                get_url(d.jwks_uri).await?
            }
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

    /// Checks a JWT's signature, issuer, audience and expiry and returns its claims.
    async fn decode_claims(
        &self,
        token: &str,
        audience: &str,
    ) -> Result<serde_json::Value, AuthError> {
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
        v.set_audience(&[audience]);
        v.leeway = 30;
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            AuthError::Invalid(match e.kind() {
                ErrorKind::InvalidIssuer => format!(
                    "the token was issued by another issuer (expected {})",
                    self.cfg.issuer
                ),
                ErrorKind::InvalidAudience => {
                    format!("the token is for another audience (expected {audience})")
                }
                ErrorKind::ExpiredSignature => "the token has expired".into(),
                _ => e.to_string(),
            })
        })?;
        Ok(data.claims)
    }

    /// The one rule from claims to permissions, for bearer tokens and ID tokens alike: the
    /// permissions claim's known names, and each role's configured permissions.
    fn principal_from(&self, claims: &serde_json::Value) -> Principal {
        let subject = claims
            .get("sub")
            .and_then(|s| s.as_str())
            .unwrap_or("unknown")
            .to_string();
        let mut permissions = BTreeSet::new();
        for p in claim_strings(claims, &self.cfg.permissions_claim) {
            if let Some(p) = Permission::parse(&p) {
                permissions.insert(p);
            }
        }
        for role in claim_strings(claims, &self.cfg.roles_claim) {
            for p in self.cfg.role_permissions.get(&role).into_iter().flatten() {
                if let Some(p) = Permission::parse(p) {
                    permissions.insert(p);
                }
            }
        }
        Principal {
            subject,
            permissions,
        }
    }

    async fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let claims = self.decode_claims(token, &self.cfg.audience).await?;
        Ok(self.principal_from(&claims))
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

        /// A token with exactly these claims, signed with the issuer's key.
        pub fn sign(&self, claims: &serde_json::Value) -> String {
            let mut h = jsonwebtoken::Header::new(Algorithm::ES256);
            h.kid = Some("k1".into());
            jsonwebtoken::encode(&h, claims, &self.key).unwrap()
        }

        pub fn config(&self, jwks_file: std::path::PathBuf) -> OidcConfig {
            OidcConfig {
                issuer: self.issuer.clone(),
                audience: self.audience.clone(),
                jwks_file: Some(jwks_file),
                jwks_url: None,
                client_id: None,
                client_secret_file: None,
                redirect_url: None,
                ca_file: None,
                permissions_claim: "permissions".into(),
                roles_claim: "roles".into(),
                role_permissions: Default::default(),
            }
        }
    }
}

#[cfg(test)]
pub mod fake_provider {
    //! A minimal OpenID provider on loopback: discovery, JWKS and a token endpoint that answers
    //! what the test put in `next_answer`, recording each token request's form.
    use super::testing::TestIssuer;
    use std::sync::{Arc, Mutex};

    /// Each token request's `Authorization` header and form body.
    pub type TokenRequests = Arc<Mutex<Vec<(Option<String>, String)>>>;

    pub struct FakeProvider {
        pub issuer: TestIssuer,
        pub base: String,
        /// The token endpoint's next answer: (status, JSON body).
        pub next_answer: Arc<Mutex<(u16, serde_json::Value)>>,
        pub token_requests: TokenRequests,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for FakeProvider {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl FakeProvider {
        pub async fn start() -> Self {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            Self::on(l).await
        }

        pub async fn on(l: tokio::net::TcpListener) -> Self {
            use axum::routing::{get, post};
            let base = format!("http://{}/realms/test", l.local_addr().unwrap());
            let mut issuer = TestIssuer::new();
            issuer.issuer = base.clone();
            let doc = serde_json::json!({
                "issuer": base,
                "jwks_uri": format!("{base}/jwks"),
                "authorization_endpoint": format!("{base}/authorize"),
                "token_endpoint": format!("{base}/token"),
                "end_session_endpoint": format!("{base}/logout"),
            });
            let jwks: serde_json::Value = serde_json::from_str(&issuer.jwks_json).unwrap();
            let next_answer = Arc::new(Mutex::new((500, serde_json::json!({}))));
            let token_requests = Arc::new(Mutex::new(Vec::new()));
            let (ans, reqs) = (next_answer.clone(), token_requests.clone());
            let app = axum::Router::new()
                .route(
                    "/realms/test/.well-known/openid-configuration",
                    get(move || async move { axum::Json(doc) }),
                )
                .route(
                    "/realms/test/jwks",
                    get(move || async move { axum::Json(jwks) }),
                )
                .route(
                    "/realms/test/token",
                    post(move |h: axum::http::HeaderMap, body: String| async move {
                        let auth = h
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string);
                        reqs.lock().unwrap().push((auth, body));
                        let (code, v) = ans.lock().unwrap().clone();
                        (
                            axum::http::StatusCode::from_u16(code).unwrap(),
                            axum::Json(v),
                        )
                    }),
                );
            let task = tokio::spawn(async move {
                let _ = axum::serve(l, app).await;
            });
            Self {
                issuer,
                base,
                next_answer,
                token_requests,
                task,
            }
        }

        /// OIDC settings for this provider: keys by discovery, UI client `im-ui`.
        pub fn config(&self) -> crate::config::OidcConfig {
            crate::config::OidcConfig {
                issuer: self.base.clone(),
                audience: "identitymesh".into(),
                jwks_file: None,
                jwks_url: None,
                client_id: Some("im-ui".into()),
                client_secret_file: None,
                redirect_url: Some("https://im.test/auth/callback".into()),
                ca_file: None,
                permissions_claim: "permissions".into(),
                roles_claim: "groups".into(),
                role_permissions: [(
                    "im-admins".to_string(),
                    vec!["dashboard.read".to_string(), "relays.manage".to_string()],
                )]
                .into_iter()
                .collect(),
            }
        }

        /// The token endpoint answers an ID token with these claims over the defaults.
        pub fn answer_id_token(&self, nonce: &str, overrides: serde_json::Value) {
            let now = chrono::Utc::now().timestamp();
            let mut c = serde_json::json!({
                "iss": self.base, "aud": "im-ui", "sub": "u-alice", "exp": now + 300,
                "iat": now, "nonce": nonce, "name": "Alice Example", "groups": ["im-admins"],
            });
            for (k, v) in overrides.as_object().unwrap() {
                c[k] = v.clone();
            }
            let t = self.issuer.sign(&c);
            *self.next_answer.lock().unwrap() = (
                200,
                serde_json::json!({"id_token": t, "access_token": "x", "token_type": "Bearer"}),
            );
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

    /// Bearer-only settings with a configured JWKS never contact the issuer.
    #[tokio::test]
    async fn no_discovery_without_a_need_for_it() {
        let i = TestIssuer::new();
        let (_d, a) = auth_with_oidc(&i).await;
        let e = a.discovery().await.unwrap_err().to_string();
        assert!(e.contains("not used"), "{e}");
        assert!(!a.oidc_sign_in());
    }

    #[tokio::test]
    async fn discovery_supplies_the_keys_and_endpoints() {
        let p = super::fake_provider::FakeProvider::start().await;
        let mut cfg = p.config();
        cfg.audience = p.issuer.audience.clone();
        let a = Authenticator::new(None, Some(cfg)).await.unwrap();
        let d = a.discovery().await.unwrap();
        assert_eq!(d.jwks_uri, format!("{}/jwks", p.base));
        assert!(a.oidc_sign_in());
        let si = a.sign_in().await.unwrap();
        assert_eq!(si.authorization_endpoint, format!("{}/authorize", p.base));
        // A bearer token verifies with the discovered JWKS, mapped by the same rule.
        let now = chrono::Utc::now().timestamp();
        let t = p
            .issuer
            .sign(&serde_json::json!({"iss": p.base, "aud": "identitymesh",
            "sub": "svc", "exp": now + 60, "groups": ["im-admins"]}));
        let pr = a.authenticate(Some(&t)).await.unwrap();
        assert_eq!(
            pr.permissions,
            [Permission::DashboardRead, Permission::RelaysManage]
                .into_iter()
                .collect()
        );
    }

    #[tokio::test]
    async fn discovery_refuses_another_issuer_and_recovers_when_the_provider_comes_up() {
        let p = super::fake_provider::FakeProvider::start().await;
        let mut cfg = p.config();
        cfg.issuer = format!("{}/", p.base);
        let a = Authenticator::new(None, Some(cfg)).await.unwrap();
        let e = a.discovery().await.unwrap_err().to_string();
        assert!(e.contains("/.well-known/openid-configuration"), "{e}");
        assert!(e.contains("not the configured auth.oidc.issuer"), "{e}");

        // Nothing listens yet: the server starts, says why, and retries in the background.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let mut cfg = p.config();
        cfg.issuer = format!("http://{addr}/realms/test");
        let a = Authenticator::new(None, Some(cfg)).await.unwrap();
        let e = a.discovery().await.unwrap_err().to_string();
        assert!(e.contains(&addr.to_string()), "{e}");
        // Why, and the URL once: the operator's AdminUiReady shows this to whoever must fix it.
        assert!(e.to_lowercase().contains("refused"), "the cause: {e}");
        assert_eq!(e.matches(&addr.to_string()).count(), 1, "{e}");
        let up = super::fake_provider::FakeProvider::on(
            tokio::net::TcpListener::bind(addr).await.unwrap(),
        )
        .await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while a.discovery().await.is_err() {
            assert!(Instant::now() < deadline, "discovery never recovered");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(a.discovery().await.unwrap().issuer, up.base);
    }
}
