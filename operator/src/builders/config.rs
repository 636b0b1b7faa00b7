//! ConfigMaps: server.toml (non-path settings only) and the CA's public certificate.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use serde::Serialize;

use super::{meta, spec_hash, stamp_hash, Names, HTTPS_PORT, INTERNAL_PORT};
use crate::crd::IdentityMeshCluster;

#[derive(Serialize)]
struct ServerToml {
    listen: String,
    internal_listen: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    auth: Option<AuthToml>,
    engine: EngineToml,
}

#[derive(Serialize)]
struct AuthToml {
    oidc: OidcToml,
}

#[derive(Serialize)]
struct OidcToml {
    issuer: String,
    audience: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    jwks_url: Option<String>,
    permissions_claim: String,
}

#[derive(Serialize)]
struct EngineToml {
    heartbeat_interval_ms: u64,
    instance_ttl_ms: u64,
    drain_timeout_ms: u64,
}

/// server.toml for both pods. File paths are not here: they go through IM_* env vars, which is
/// where the test harness rewrites mount paths.
pub fn server_toml(imc: &IdentityMeshCluster) -> Result<String, toml::ser::Error> {
    let spec = &imc.spec;
    let cfg = ServerToml {
        listen: format!("0.0.0.0:{HTTPS_PORT}"),
        internal_listen: format!("0.0.0.0:{INTERNAL_PORT}"),
        auth: spec.oidc.as_ref().map(|o| AuthToml {
            oidc: OidcToml {
                issuer: o.issuer.clone(),
                audience: o.audience.clone(),
                jwks_url: o.jwks_url.clone(),
                permissions_claim: o.permissions_claim.clone(),
            },
        }),
        engine: EngineToml {
            heartbeat_interval_ms: 1000,
            instance_ttl_ms: 5000,
            drain_timeout_ms: u64::from(spec.drain_timeout_seconds) * 1000,
        },
    };
    toml::to_string(&cfg)
}

pub fn build_config_map(
    imc: &IdentityMeshCluster,
    names: &Names,
) -> Result<ConfigMap, toml::ser::Error> {
    let mut cm = ConfigMap {
        metadata: meta(imc, names, names.config_map()),
        data: Some(BTreeMap::from([(
            "server.toml".to_string(),
            server_toml(imc)?,
        )])),
        ..Default::default()
    };
    let h = spec_hash(&cm);
    stamp_hash(&mut cm.metadata, h);
    Ok(cm)
}

/// Public CA certificate for the pods (client_ca_file). The CA key is in a Secret pods never see.
pub fn build_ca_config_map(
    imc: &IdentityMeshCluster,
    names: &Names,
    ca_cert_pem: &str,
) -> ConfigMap {
    let mut cm = ConfigMap {
        metadata: meta(imc, names, names.ca_config_map()),
        data: Some(BTreeMap::from([(
            "ca.crt".to_string(),
            ca_cert_pem.to_string(),
        )])),
        ..Default::default()
    };
    let h = spec_hash(&cm);
    stamp_hash(&mut cm.metadata, h);
    cm
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builders::test_support::cluster;

    #[test]
    fn toml_has_no_paths_and_carries_oidc_and_timings() {
        let mut imc = cluster("im", "prod");
        imc.spec.drain_timeout_seconds = 7;
        let t = server_toml(&imc).expect("toml");
        let v: toml::Value = toml::from_str(&t).expect("parses");
        assert_eq!(v["listen"].as_str(), Some("0.0.0.0:8443"));
        assert_eq!(v["internal_listen"].as_str(), Some("0.0.0.0:9443"));
        assert_eq!(v["engine"]["drain_timeout_ms"].as_integer(), Some(7000));
        assert_eq!(
            v["auth"]["oidc"]["issuer"].as_str(),
            Some("https://login.contoso.local/")
        );
        assert_eq!(
            v["auth"]["oidc"]["permissions_claim"].as_str(),
            Some("permissions")
        );
        for forbidden in ["file", "dir", "C:\\", "/etc/", "[tls]", "[database]"] {
            assert!(
                !t.contains(forbidden),
                "server.toml contains {forbidden}: {t}"
            );
        }
    }

    #[test]
    fn toml_without_oidc() {
        let mut imc = cluster("im", "prod");
        imc.spec.oidc = None;
        let t = server_toml(&imc).expect("toml");
        assert!(!t.contains("[auth"));
    }

    #[test]
    fn config_maps() {
        let imc = cluster("im", "prod");
        let names = Names::of(&imc);
        let cm = build_config_map(&imc, &names).expect("cm");
        assert_eq!(cm.metadata.name.as_deref(), Some("im-config"));
        assert!(cm
            .data
            .as_ref()
            .is_some_and(|d| d.contains_key("server.toml")));
        let ca = build_ca_config_map(&imc, &names, "-----BEGIN CERTIFICATE-----\n");
        assert_eq!(ca.metadata.name.as_deref(), Some("im-ca"));
        assert!(ca.data.as_ref().is_some_and(|d| d.contains_key("ca.crt")));
        assert!(ca.metadata.owner_references.is_some());
    }
}
