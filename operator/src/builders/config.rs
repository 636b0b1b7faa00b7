//! ConfigMaps: server.toml (non-path settings only) and the CA's public certificate.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use serde::Serialize;

use super::{meta, spec_hash, stamp_hash, Names, HTTPS_PORT, INTERNAL_PORT};
use crate::crd::IdentityMeshCluster;
use identitymesh_contract::forwarding::INSTANCE_PLACEHOLDER;

#[derive(Serialize)]
struct ServerToml {
    listen: String,
    internal_listen: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    auth: Option<AuthToml>,
    engine: EngineToml,
    #[serde(skip_serializing_if = "Option::is_none")]
    http: Option<HttpToml>,
    forwarding: ForwardingToml,
}

/// Requests the Service proxy still sends to a pod that is not active are forwarded to the
/// active's per-pod name (its CA file is an IM_* path, set on the pod).
#[derive(Serialize)]
struct ForwardingToml {
    enabled: bool,
    peer_url_template: String,
    hold_ms: u64,
}

/// A request held between the demotion and the promotion waits out the drain bound and the
/// promotion's round trip, but never so long that a client's own 30 s timeout fires first.
fn forwarding_hold_ms(drain_timeout_ms: u64) -> u64 {
    (drain_timeout_ms + 5_000).min(25_000)
}

#[derive(Serialize)]
struct HttpToml {
    request_timeout_ms: u64,
}

/// The server's default bound on an Admin or internal API request (http.request_timeout_ms). It
/// refuses to start unless the bound is longer than the drain, since a demote request waits for
/// the drain.
const SERVER_DEFAULT_REQUEST_TIMEOUT_MS: u64 = 120_000;
/// Room above the drain for a demote request's own work and its reply.
const REQUEST_OVER_DRAIN_MS: u64 = 30_000;

/// http.request_timeout_ms to write: none (the server's default) unless the drain needs more,
/// so that every drainTimeoutSeconds the CRD admits (up to 600 s) gives a server that starts.
fn request_timeout_ms(drain_timeout_ms: u64) -> Option<u64> {
    let needed = drain_timeout_ms + REQUEST_OVER_DRAIN_MS;
    (needed > SERVER_DEFAULT_REQUEST_TIMEOUT_MS).then_some(needed)
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
    /// The UI client (its secret and the issuer's CA are files: IM_* variables).
    #[serde(skip_serializing_if = "Option::is_none")]
    client_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    redirect_url: Option<String>,
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
    let drain_timeout_ms = u64::from(spec.drain_timeout_seconds) * 1000;
    let cfg = ServerToml {
        listen: format!("0.0.0.0:{HTTPS_PORT}"),
        internal_listen: format!("0.0.0.0:{INTERNAL_PORT}"),
        auth: spec.oidc.as_ref().map(|o| AuthToml {
            oidc: OidcToml {
                issuer: o.issuer.clone(),
                audience: o.audience.clone(),
                jwks_url: o.jwks_url.clone(),
                permissions_claim: o.permissions_claim.clone(),
                client_id: o.ui.as_ref().map(|u| u.client_id.clone()),
                redirect_url: o.ui.as_ref().map(|u| u.redirect_url.clone()),
            },
        }),
        engine: EngineToml {
            heartbeat_interval_ms: 1000,
            instance_ttl_ms: 5000,
            drain_timeout_ms,
        },
        http: request_timeout_ms(drain_timeout_ms)
            .map(|request_timeout_ms| HttpToml { request_timeout_ms }),
        forwarding: ForwardingToml {
            enabled: true,
            peer_url_template: format!(
                "https://{}:{HTTPS_PORT}",
                Names::of(imc).pod_dns_name(INSTANCE_PLACEHOLDER)
            ),
            hold_ms: forwarding_hold_ms(drain_timeout_ms),
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

    /// The server refuses to start when http.request_timeout_ms is not longer than the drain
    /// (its default is 120 s): a long drain, which the CRD admits up to 600 s, raises it; the
    /// default drain leaves server.toml as it was.
    #[test]
    fn request_timeout_outlasts_every_admitted_drain() {
        let mut imc = cluster("im", "prod");
        let toml_of = |imc: &IdentityMeshCluster| -> toml::Value {
            toml::from_str(&server_toml(imc).expect("toml")).expect("parses")
        };
        imc.spec.drain_timeout_seconds = 10;
        assert!(toml_of(&imc).get("http").is_none());
        for drain_s in [1_u32, 10, 89, 90, 91, 119, 120, 300, 600] {
            imc.spec.drain_timeout_seconds = drain_s;
            let v = toml_of(&imc);
            let drain_ms = v["engine"]["drain_timeout_ms"].as_integer().expect("drain");
            let request_ms = v
                .get("http")
                .and_then(|h| h["request_timeout_ms"].as_integer())
                .unwrap_or(SERVER_DEFAULT_REQUEST_TIMEOUT_MS as i64);
            assert!(
                request_ms >= drain_ms + 30_000,
                "drain {drain_s} s: request timeout {request_ms} ms"
            );
        }
    }

    /// Both pods forward to the other's per-pod name through the headless Service, on the
    /// public port; the hold outlasts the drain, within a client's usual 30 s.
    #[test]
    fn both_pods_forward_to_the_active_by_its_per_pod_name() {
        let mut imc = cluster("im", "prod");
        let v: toml::Value = toml::from_str(&server_toml(&imc).expect("toml")).expect("parses");
        let f = &v["forwarding"];
        assert_eq!(f["enabled"].as_bool(), Some(true));
        let template = f["peer_url_template"].as_str().expect("template");
        assert_eq!(template, "https://{instance}.im-pods.prod.svc:8443");
        let names = Names::of(&imc);
        for pod in names.pods() {
            let url = template.replace(INSTANCE_PLACEHOLDER, &pod);
            assert_eq!(
                url,
                format!("https://{}:{HTTPS_PORT}", names.pod_dns_name(&pod))
            );
            // A name the serving certificate carries.
            let host = url
                .trim_start_matches("https://")
                .split(':')
                .next()
                .unwrap();
            assert!(names.pod_dns_names().iter().any(|n| n == host), "{host}");
        }
        assert_eq!(f["hold_ms"].as_integer(), Some(15_000));
        imc.spec.drain_timeout_seconds = 1;
        let v: toml::Value = toml::from_str(&server_toml(&imc).expect("toml")).expect("parses");
        assert_eq!(v["forwarding"]["hold_ms"].as_integer(), Some(6_000));
        imc.spec.drain_timeout_seconds = 600;
        let v: toml::Value = toml::from_str(&server_toml(&imc).expect("toml")).expect("parses");
        assert_eq!(v["forwarding"]["hold_ms"].as_integer(), Some(25_000));
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
