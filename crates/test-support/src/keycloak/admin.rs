//! A small Keycloak admin REST client: a token from the master realm (password grant through
//! `admin-cli`, renewed before it expires), realms, LDAP federation, syncs and counts.
//!
//! Realm names and ids are put into paths as given: callers use plain names.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{GroupMapper, KeycloakError, LdapFederation};

/// Renew the token this long before Keycloak says it expires (master tokens live 60 s).
const TOKEN_MARGIN: Duration = Duration::from_secs(15);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// A full sync answers only when it is done.
const DEFAULT_SYNC_TIMEOUT: Duration = Duration::from_secs(4 * 3600);

/// What Keycloak reports for a sync (`SynchronizationResult`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct SyncResult {
    pub ignored: bool,
    pub added: u64,
    pub updated: u64,
    pub removed: u64,
    pub failed: u64,
    pub status: Option<String>,
}

#[derive(Debug)]
pub struct Admin {
    base: String,
    http: reqwest::Client,
    username: String,
    password: String,
    sync_timeout: Duration,
    token: Mutex<Option<(String, Instant)>>,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    expires_in: u64,
}

fn http_err(what: &str) -> impl FnOnce(reqwest::Error) -> KeycloakError + '_ {
    move |source| KeycloakError::Http {
        what: what.to_string(),
        source,
    }
}

impl Admin {
    /// A client for the server at `base` (e.g. `http://127.0.0.1:8080`) acting as a master-realm
    /// admin user.
    pub fn new(
        base: impl Into<String>,
        username: impl Into<String>,
        password: impl Into<String>,
    ) -> Result<Self, KeycloakError> {
        let http = reqwest::Client::builder()
            .build()
            .map_err(http_err("building the HTTP client"))?;
        Ok(Admin {
            base: base.into().trim_end_matches('/').to_string(),
            http,
            username: username.into(),
            password: password.into(),
            sync_timeout: DEFAULT_SYNC_TIMEOUT,
            token: Mutex::new(None),
        })
    }

    /// How long a sync request may take before the client gives up (default 4 h).
    pub fn with_sync_timeout(mut self, t: Duration) -> Self {
        self.sync_timeout = t;
        self
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    async fn token(&self) -> Result<String, KeycloakError> {
        if let Ok(g) = self.token.lock() {
            if let Some((t, until)) = g.as_ref() {
                if Instant::now() + TOKEN_MARGIN < *until {
                    return Ok(t.clone());
                }
            }
        }
        let what = "admin token from the master realm";
        let asked = Instant::now();
        let r = self
            .http
            .post(format!(
                "{}/realms/master/protocol/openid-connect/token",
                self.base
            ))
            .form(&[
                ("grant_type", "password"),
                ("client_id", "admin-cli"),
                ("username", self.username.as_str()),
                ("password", self.password.as_str()),
            ])
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(http_err(what))?;
        let r = check(r, what).await?;
        let t: TokenAnswer = r.json().await.map_err(http_err(what))?;
        if let Ok(mut g) = self.token.lock() {
            *g = Some((
                t.access_token.clone(),
                asked + Duration::from_secs(t.expires_in),
            ));
        }
        Ok(t.access_token)
    }

    /// An authorised request to `path` under `/admin`; the answer if it has a 2xx status.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response, KeycloakError> {
        let what = format!("{method} /admin{path}");
        let mut req = self
            .http
            .request(method, format!("{}/admin{path}", self.base))
            .bearer_auth(self.token().await?)
            .timeout(timeout.unwrap_or(REQUEST_TIMEOUT));
        if let Some(b) = body {
            req = req.json(b);
        }
        let r = req.send().await.map_err(http_err(&what))?;
        check(r, &what).await
    }

    /// `GET /admin{path}` as JSON.
    pub async fn get_json(&self, path: &str) -> Result<Value, KeycloakError> {
        let r = self.call(Method::GET, path, None, None).await?;
        r.json()
            .await
            .map_err(http_err(&format!("GET /admin{path}")))
    }

    /// Creates an enabled realm with defaults.
    pub async fn create_realm(&self, realm: &str) -> Result<(), KeycloakError> {
        self.import_realm(&json!({"realm": realm, "enabled": true}))
            .await
            .map(|_| ())
    }

    /// Creates a realm from a realm representation (an exported realm JSON); returns its name.
    pub async fn import_realm(&self, representation: &Value) -> Result<String, KeycloakError> {
        let name = representation["realm"]
            .as_str()
            .ok_or_else(|| KeycloakError::Answer {
                what: "realm representation".into(),
                body: "no \"realm\" name".into(),
            })?
            .to_string();
        self.call(Method::POST, "/realms", Some(representation), None)
            .await?;
        Ok(name)
    }

    pub async fn delete_realm(&self, realm: &str) -> Result<(), KeycloakError> {
        self.call(
            Method::DELETE,
            &format!("/realms/{realm}"),
            None,
            Some(self.sync_timeout),
        )
        .await
        .map(|_| ())
    }

    async fn realm_id(&self, realm: &str) -> Result<String, KeycloakError> {
        let v = self.get_json(&format!("/realms/{realm}")).await?;
        str_field(&v, "id", &format!("realm {realm}"))
    }

    /// Adds a component; returns its id (from the `Location` of the 201).
    async fn add_component(&self, realm: &str, c: &Value) -> Result<String, KeycloakError> {
        let path = format!("/realms/{realm}/components");
        let r = self.call(Method::POST, &path, Some(c), None).await?;
        let loc = r
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .unwrap_or_default();
        match loc.rsplit('/').next() {
            Some(id) if !id.is_empty() => Ok(id.to_string()),
            _ => Err(KeycloakError::Answer {
                what: format!("POST /admin{path}"),
                body: format!("no component id in Location {loc:?}"),
            }),
        }
    }

    /// Adds an LDAP user-storage provider to `realm`; returns the provider's component id.
    /// Keycloak adds its default attribute mappers (username, names, email, dates) itself.
    pub async fn add_ldap_federation(
        &self,
        realm: &str,
        ldap: &LdapFederation,
    ) -> Result<String, KeycloakError> {
        let realm_id = self.realm_id(realm).await?;
        self.add_component(realm, &ldap.component(&realm_id)).await
    }

    /// Adds a group mapper to the LDAP provider `provider_id`; returns the mapper's id.
    pub async fn add_group_mapper(
        &self,
        realm: &str,
        provider_id: &str,
        mapper: &GroupMapper,
    ) -> Result<String, KeycloakError> {
        self.add_component(realm, &mapper.component(provider_id))
            .await
    }

    /// "Sync all users" (`full`) or "Sync changed users"; answers when the sync is done.
    pub async fn sync_users(
        &self,
        realm: &str,
        provider_id: &str,
        full: bool,
    ) -> Result<SyncResult, KeycloakError> {
        let action = if full {
            "triggerFullSync"
        } else {
            "triggerChangedUsersSync"
        };
        let path = format!("/realms/{realm}/user-storage/{provider_id}/sync?action={action}");
        self.sync(&path).await
    }

    /// A mapper's "Sync LDAP groups to Keycloak"; answers when it is done.
    pub async fn sync_mapper(
        &self,
        realm: &str,
        provider_id: &str,
        mapper_id: &str,
    ) -> Result<SyncResult, KeycloakError> {
        let path = format!(
            "/realms/{realm}/user-storage/{provider_id}/mappers/{mapper_id}/sync?direction=fedToKeycloak"
        );
        self.sync(&path).await
    }

    async fn sync(&self, path: &str) -> Result<SyncResult, KeycloakError> {
        let what = format!("POST /admin{path}");
        let r = self
            .call(Method::POST, path, None, Some(self.sync_timeout))
            .await?;
        let s: SyncResult = r.json().await.map_err(http_err(&what))?;
        if s.ignored {
            return Err(KeycloakError::Answer {
                what,
                body: format!("sync ignored: {s:?}"),
            });
        }
        Ok(s)
    }

    /// Users in the realm's local store (with import on: every synced LDAP user).
    pub async fn user_count(&self, realm: &str) -> Result<u64, KeycloakError> {
        let path = format!("/realms/{realm}/users/count");
        let v = self.get_json(&path).await?;
        v.as_u64().ok_or_else(|| KeycloakError::Answer {
            what: format!("GET /admin{path}"),
            body: v.to_string(),
        })
    }

    /// Top-level and nested groups in the realm.
    pub async fn group_count(&self, realm: &str) -> Result<u64, KeycloakError> {
        let path = format!("/realms/{realm}/groups/count");
        let v = self.get_json(&path).await?;
        v["count"].as_u64().ok_or_else(|| KeycloakError::Answer {
            what: format!("GET /admin{path}"),
            body: v.to_string(),
        })
    }
}

async fn check(r: reqwest::Response, what: &str) -> Result<reqwest::Response, KeycloakError> {
    let status = r.status();
    if status.is_success() {
        return Ok(r);
    }
    let body = r.text().await.unwrap_or_default();
    Err(KeycloakError::Status {
        what: what.to_string(),
        status: status.as_u16(),
        body: if status == StatusCode::UNAUTHORIZED && body.is_empty() {
            "unauthorised (wrong admin credentials?)".into()
        } else {
            body
        },
    })
}

fn str_field(v: &Value, field: &str, what: &str) -> Result<String, KeycloakError> {
    v[field]
        .as_str()
        .map(String::from)
        .ok_or_else(|| KeycloakError::Answer {
            what: what.to_string(),
            body: v.to_string(),
        })
}
