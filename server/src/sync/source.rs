//! Where a run's objects come from: an LDAP or CSV connector in this process, or the same
//! connector running inside a relay agent, reached through the hub. Every source fills the same
//! bounded page channel, so the runner does not care which one it reads.

use identitymesh_connectors::csv::{CsvConfig, CsvConnector};
use identitymesh_connectors::error::{ConnectorError, TestReport};
use identitymesh_connectors::ldap::{LdapConfig, LdapConnector};
use identitymesh_connectors::model::{ImportMode, ImportSummary, Page};
use identitymesh_connectors::roots::DropRoots;
use identitymesh_signalr::hub::{HubHandle, StreamEvent};
use serde_json::json;
use tokio::sync::mpsc::Sender;

use crate::secrets::Secrets;
use crate::store::ConnectorRow;

use identitymesh_contract::hub;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Ldap,
    Csv,
}

impl Kind {
    pub fn parse(s: &str) -> Result<Kind, String> {
        match s {
            "ldap" => Ok(Kind::Ldap),
            "csv" => Ok(Kind::Csv),
            other => Err(format!(
                "unknown connector kind {other:?}; use \"ldap\" or \"csv\""
            )),
        }
    }
}

/// A connector's configuration, parsed and checked. Field paths in errors start at `config`.
#[derive(Debug, Clone)]
pub enum SourceConfig {
    Ldap(LdapConfig),
    Csv(CsvConfig),
}

impl SourceConfig {
    pub fn parse(kind: &str, config_json: &str) -> Result<SourceConfig, Vec<String>> {
        let kind = Kind::parse(kind).map_err(|e| vec![format!("kind: {e}")])?;
        fn de<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, Vec<String>> {
            let d = &mut serde_json::Deserializer::from_str(s);
            serde_path_to_error::deserialize(d).map_err(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner();
                vec![if path == "." {
                    format!("config: {inner}")
                } else {
                    format!("config.{path}: {inner}")
                }]
            })
        }
        let problems = |ps: Vec<identitymesh_connectors::error::ConfigProblem>| {
            ps.iter().map(|p| format!("config.{p}")).collect::<Vec<_>>()
        };
        match kind {
            Kind::Ldap => {
                let c: LdapConfig = de(config_json)?;
                c.validate().map_err(problems)?;
                Ok(SourceConfig::Ldap(c))
            }
            Kind::Csv => {
                let c: CsvConfig = de(config_json)?;
                c.validate().map_err(problems)?;
                Ok(SourceConfig::Csv(c))
            }
        }
    }

    pub fn object_types(&self) -> Vec<String> {
        match self {
            SourceConfig::Ldap(c) => c.object_types.keys().cloned().collect(),
            SourceConfig::Csv(c) => vec![c.object_type.clone()],
        }
    }

    /// The secret the source needs, if any.
    pub fn secret_ref(&self) -> Option<&str> {
        match self {
            SourceConfig::Ldap(c) => c.bind_password_ref.as_deref(),
            SourceConfig::Csv(_) => None,
        }
    }

    /// Where this config would send its stored secret (None: it uses none). A relay-bound
    /// connector's secret goes to that relay, then to the URL.
    pub fn secret_destination(&self, relay_id: Option<&str>) -> Option<SecretDestination> {
        match self {
            SourceConfig::Ldap(c) => c.bind_password_ref.as_ref().map(|r| SecretDestination {
                secret_ref: r.clone(),
                url: c.url.trim().to_ascii_lowercase(),
                bind_dn: c.bind_dn.clone(),
                relay_id: relay_id.map(str::to_string),
            }),
            SourceConfig::Csv(_) => None,
        }
    }
}

/// The parts of a connector that decide who receives its stored secret: the secret, the URL
/// (scheme, host and port: a plain `ldap://` sends a simple bind's password in the clear), the
/// DN it binds as, and the relay that runs the read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretDestination {
    pub secret_ref: String,
    pub url: String,
    pub bind_dn: Option<String>,
    pub relay_id: Option<String>,
}

/// Whether saving a connector entrusts a stored secret to a destination it was not entrusted
/// to before (`old` None: a new connector). Such a save needs `secrets.write` besides
/// `connectors.write`: otherwise whoever may edit connectors could point one at a host of
/// their choosing and have the server send it the password.
pub fn entrusts_secret(old: Option<&SecretDestination>, new: Option<&SecretDestination>) -> bool {
    new.is_some_and(|n| old != Some(n))
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Connector(#[from] ConnectorError),
    #[error("{0}")]
    Secret(#[from] crate::secrets::SecretError),
    #[error("relay {relay}: {reason}")]
    Relay { relay: String, reason: String },
    #[error("invalid connector: {0}")]
    Invalid(String),
}

/// A ready-to-run source for one connector.
pub enum Source {
    Ldap(LdapConnector),
    Csv(CsvConnector),
    Relay(RelaySource),
}

/// A connector whose reads run inside a relay agent, reached through the hub.
pub struct RelaySource {
    hub: HubHandle,
    relay_id: String,
    /// `{kind, config, password}`: the connector with its bind password resolved, sent to the
    /// relay over the hub's TLS connection (the relay needs it to bind).
    connector: serde_json::Value,
}

impl Source {
    /// A CSV connector running here is confined to `csv_roots` (checked again on every read).
    pub async fn build(
        row: &ConnectorRow,
        secrets: &Secrets,
        hub: Option<&HubHandle>,
        csv_roots: &DropRoots,
    ) -> Result<(Source, SourceConfig), SourceError> {
        let cfg = SourceConfig::parse(&row.kind, &row.config_json)
            .map_err(|e| SourceError::Invalid(e.join("; ")))?;
        let password = match cfg.secret_ref() {
            Some(r) => Some(secrets.reveal(r).await?),
            None => None,
        };
        if let Some(relay_id) = &row.relay_id {
            let hub = hub.ok_or_else(|| SourceError::Relay {
                relay: relay_id.clone(),
                reason: "this server has no relay hub".into(),
            })?;
            let config: serde_json::Value = serde_json::from_str(&row.config_json)
                .map_err(|e| SourceError::Invalid(e.to_string()))?;
            let source = RelaySource {
                hub: hub.clone(),
                relay_id: relay_id.clone(),
                connector: json!({ "kind": row.kind, "config": config, "password": password }),
            };
            return Ok((Source::Relay(source), cfg));
        }
        let source = match &cfg {
            SourceConfig::Ldap(c) => Source::Ldap(LdapConnector::new(c.clone(), password)?),
            SourceConfig::Csv(c) => {
                Source::Csv(CsvConnector::new(c.clone())?.with_roots(csv_roots.clone()))
            }
        };
        Ok((source, cfg))
    }

    pub async fn test(&self) -> Result<TestReport, SourceError> {
        match self {
            Source::Ldap(c) => Ok(c.test_connection().await?),
            Source::Csv(c) => Ok(c.test_connection().await?),
            Source::Relay(r) => r.test().await,
        }
    }

    /// Reads one object type into `tx`, page by page.
    pub async fn import(
        &self,
        object_type: &str,
        mode: &ImportMode,
        tx: Sender<Page>,
    ) -> Result<ImportSummary, SourceError> {
        match self {
            Source::Ldap(c) => Ok(c.import(object_type, mode, tx).await?),
            Source::Csv(c) => Ok(c.import(object_type, mode, tx).await?),
            Source::Relay(r) => r.import(object_type, mode, tx).await,
        }
    }
}

impl RelaySource {
    fn err(&self, reason: impl Into<String>) -> SourceError {
        SourceError::Relay {
            relay: self.relay_id.clone(),
            reason: reason.into(),
        }
    }

    /// The relay's hub connection on this server.
    fn connection(&self) -> Result<String, SourceError> {
        self.hub
            .connections_of(&self.relay_id)
            .into_iter()
            .next()
            .ok_or_else(|| {
                self.err(
                    "not connected to this server; check the relay agent is running and \
                     reaches the Service (GET /api/relays shows its state)",
                )
            })
    }

    async fn test(&self) -> Result<TestReport, SourceError> {
        let conn = self.connection()?;
        let v = tokio::time::timeout(
            std::time::Duration::from_secs(60),
            self.hub
                .invoke(&conn, hub::DIRECTORY_TEST, vec![self.connector.clone()]),
        )
        .await
        .map_err(|_| self.err("the connection test did not finish within 60 s"))?
        .map_err(|e| self.err(e.to_string()))?;
        serde_json::from_value(v).map_err(|e| self.err(format!("unexpected test report: {e}")))
    }

    async fn import(
        &self,
        object_type: &str,
        mode: &ImportMode,
        tx: Sender<Page>,
    ) -> Result<ImportSummary, SourceError> {
        let conn = self.connection()?;
        let args = vec![
            self.connector.clone(),
            json!(object_type),
            serde_json::to_value(mode).map_err(|e| self.err(e.to_string()))?,
        ];
        let mut stream = self
            .hub
            .invoke_stream(&conn, hub::DIRECTORY_IMPORT, args, 2)
            .await
            .map_err(|e| self.err(e.to_string()))?;
        loop {
            match stream.next().await.map_err(|e| self.err(e.to_string()))? {
                Some(StreamEvent::Item(v)) => {
                    let page: Page = serde_json::from_value(v)
                        .map_err(|e| self.err(format!("malformed page: {e}")))?;
                    tx.send(page).await.map_err(|_| ConnectorError::Cancelled)?;
                }
                Some(StreamEvent::Completed(v)) => {
                    return serde_json::from_value(v)
                        .map_err(|e| self.err(format!("malformed summary: {e}")));
                }
                None => return Err(self.err("the stream ended without a completion")),
            }
        }
    }
}

#[cfg(test)]
mod entrust_tests {
    use super::*;

    fn dest(url: &str, dn: &str, secret: &str, relay: Option<&str>) -> SecretDestination {
        SecretDestination {
            secret_ref: secret.into(),
            url: url.into(),
            bind_dn: Some(dn.into()),
            relay_id: relay.map(Into::into),
        }
    }

    #[test]
    fn a_secret_moves_only_with_secrets_write() {
        let a = dest("ldaps://dc1:636", "cn=sync", "bind", None);
        // Unchanged destination (a rules or filter edit): connectors.write is enough.
        assert!(!entrusts_secret(Some(&a), Some(&a.clone())));
        // No secret at all: nothing to entrust, before or after.
        assert!(!entrusts_secret(None, None));
        assert!(!entrusts_secret(Some(&a), None));
        // New connector naming a secret; each part of the destination changing.
        assert!(entrusts_secret(None, Some(&a)));
        for changed in [
            dest("ldaps://evil:636", "cn=sync", "bind", None),
            dest("ldaps://dc1:6360", "cn=sync", "bind", None),
            dest("ldap://dc1:636", "cn=sync", "bind", None),
            dest("ldaps://dc1:636", "cn=admin", "bind", None),
            dest("ldaps://dc1:636", "cn=sync", "other-secret", None),
            dest("ldaps://dc1:636", "cn=sync", "bind", Some("relay-x")),
        ] {
            assert!(entrusts_secret(Some(&a), Some(&changed)), "{changed:?}");
        }
    }

    #[test]
    fn destination_comes_from_the_ldap_config() {
        let cfg = SourceConfig::parse(
            "ldap",
            r#"{"url":"LDAPS://DC1.contoso.local:636","bind_dn":"cn=sync","bind_password_ref":"bind",
                "object_types":{"people":{"base_dn":"dc=x","filter":"(objectClass=*)"}}}"#,
        )
        .unwrap();
        let d = cfg.secret_destination(Some("r1")).unwrap();
        assert_eq!(d.url, "ldaps://dc1.contoso.local:636");
        assert_eq!(d.relay_id.as_deref(), Some("r1"));
        let csv = SourceConfig::parse(
            "csv",
            r#"{"folder":"/x","object_type":"p","anchor_column":"id"}"#,
        )
        .unwrap();
        assert_eq!(csv.secret_destination(None), None);
    }
}
