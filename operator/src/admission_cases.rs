//! Resources the apiserver must reject at admission, with the message it must give. Used by the
//! end-to-end tests (apply each against a real apiserver with the CRD installed); the unit test
//! here checks that every CEL message is really in the generated CRD.

use serde_json::{json, Value};

use crate::builders::pod::build_pod;
use crate::builders::service::build_client_service;
use crate::builders::Names;
use crate::crd::IdentityMeshCluster;

/// One bad resource: `manifest` must be rejected, with `expect` in the error message.
#[derive(Clone, Debug)]
pub struct AdmissionCase {
    pub name: &'static str,
    pub manifest: Value,
    pub expect: &'static str,
    /// The message comes from one of our CEL rules (rather than the OpenAPI schema).
    pub cel: bool,
    /// What the apiserver says of the server pod and client Service the operator would build
    /// from this spec, had it been admitted.
    pub objects: Objects,
}

/// The verdict of the pod and Service APIs on the objects built from a case's spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Objects {
    /// The pod or the client Service is refused too: the rule says at admission what the
    /// apiserver would say pod by pod (the end-to-end test checks both on the real apiserver).
    Refused,
    /// Not refused, but can never work (a Secret key no Secret can hold, a resource no node
    /// offers), or not a field of those objects.
    NotChecked,
}

/// A valid resource to start each case from.
pub fn valid_manifest(name: &str) -> Value {
    json!({
        "apiVersion": "identitymesh.io/v1alpha1",
        "kind": "IdentityMeshCluster",
        "metadata": {"name": name},
        "spec": {
            "version": "0.1.0",
            "database": {"name": "im-db", "key": "connectionString"},
            "licence": {"name": "im-licence", "key": "licence.json"}
        }
    })
}

/// The first server pod and the client Service the operator builds from `manifest` (in namespace
/// `ns`), as JSON: what the apiserver is asked to create once the cluster is admitted.
pub fn built_objects(manifest: &Value, ns: &str) -> Result<Vec<Value>, String> {
    let mut imc: IdentityMeshCluster = serde_json::from_value(manifest.clone())
        .map_err(|e| format!("the manifest is not an IdentityMeshCluster: {e}"))?;
    imc.metadata.namespace = Some(ns.to_string());
    imc.metadata.uid = Some("00000000-0000-0000-0000-000000000001".into());
    let names = Names::of(&imc);
    let pod = build_pod(&imc, &names, &names.pods()[0]);
    let service = build_client_service(&imc, &names, None);
    let to = |v: Result<Value, serde_json::Error>| v.map_err(|e| e.to_string());
    Ok(vec![
        to(serde_json::to_value(pod))?,
        to(serde_json::to_value(service))?,
    ])
}

fn with(name: &'static str, patch: Value) -> Value {
    let mut m = valid_manifest(name);
    merge(&mut m, &patch);
    m
}

fn merge(t: &mut Value, p: &Value) {
    match (t, p) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

/// Specs that must be admitted, and whose server pod and client Service the apiserver must
/// accept: every form of the pod fields the rules below must not refuse.
pub fn valid_cases() -> Vec<(&'static str, Value)> {
    vec![
        ("valid", valid_manifest("valid")),
        (
            "valid-pod-fields",
            with(
                "valid-pod-fields",
                json!({"spec": {
                    "nodeSelector": {
                        "kubernetes.io/os": "windows",
                        "agentpool": "im",
                        "example.com/Pool_2.a": "",
                        "node.kubernetes.io/instance-type": "Standard_D4s_v5"
                    },
                    "tolerations": [
                        {"key": "node.kubernetes.io/os", "operator": "Equal", "value": "windows", "effect": "NoSchedule"},
                        {"key": "dedicated", "value": "Identity_Mesh.1"},
                        {"key": "example.com/maintenance", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                        {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 0},
                        {"key": "spot", "operator": "Equal", "value": "", "effect": ""},
                        {"operator": "Exists"}
                    ],
                    "resources": {
                        "requests": {"cpu": "500m", "memory": "1Gi", "ephemeral-storage": "2G", "example.com/dongle": 1, "hugepages-2Mi": "4Mi"},
                        "limits": {"cpu": 2, "memory": "1.5Gi", "example.com/dongle": "1", "hugepages-2Mi": "4Mi"}
                    },
                    "service": {"type": "LoadBalancer", "port": 8443, "annotations": {
                        "service.beta.kubernetes.io/azure-load-balancer-internal": "true",
                        "Contoso.Example/Owner": "identity team",
                        "plain_key.1": "any value, even with spaces"
                    }},
                    "oidc": {"issuer": "https://login.contoso.local/realms/im", "audience": "im",
                        "jwksUrl": "https://login.contoso.local/realms/im/protocol/openid-connect/certs"},
                    "database": {"name": "im.db-1", "key": ".connection_string"},
                    "licence": {"name": "licence", "key": "licence..json"}
                }}),
            ),
        ),
        (
            "valid-limits-only",
            with(
                "valid-limits-only",
                json!({"spec": {"resources": {"limits": {"cpu": "1", "memory": "2Gi"}}, "tolerations": [],
                    "oidc": {"issuer": "https://login.contoso.local/", "audience": "im"}}}),
            ),
        ),
    ]
}

pub fn admission_cases() -> Vec<AdmissionCase> {
    let c = |name, patch, expect, cel| AdmissionCase {
        name,
        manifest: with(name, patch),
        expect,
        cel,
        objects: Objects::NotChecked,
    };
    // Also refused by the pod or Service API when built into those objects.
    let r = |name, patch, expect, cel| AdmissionCase {
        objects: Objects::Refused,
        ..c(name, patch, expect, cel)
    };
    vec![
        c("no-database", json!({"spec": {"database": null}}), "spec.database: Required value", false),
        c(
            "two-tls-sources",
            json!({"spec": {"tls": {"operator": {"duration": "2160h", "renewBefore": "360h"}, "secretName": "mine"}}}),
            "set exactly one TLS source",
            true,
        ),
        c(
            "renew-before-too-long",
            json!({"spec": {"tls": {"operator": {"duration": "24h", "renewBefore": "48h"}}}}),
            "renewBefore must be shorter than tls.operator.duration",
            true,
        ),
        c(
            "cert-too-short",
            json!({"spec": {"tls": {"operator": {"duration": "30m", "renewBefore": "10m"}}}}),
            "duration must be at least 1h",
            true,
        ),
        c(
            "unhealthy-after-zero",
            json!({"spec": {"failover": {"unhealthyAfterSeconds": 0}}}),
            "should be greater than or equal to 1",
            false,
        ),
        c(
            "unhealthy-after-huge",
            json!({"spec": {"failover": {"unhealthyAfterSeconds": 7200}}}),
            "should be less than or equal to 3600",
            false,
        ),
        c(
            "drain-zero",
            json!({"spec": {"drainTimeoutSeconds": 0}}),
            "should be greater than or equal to 1",
            false,
        ),
        c(
            "cutover-timeout-zero",
            json!({"spec": {"cutoverTimeoutSeconds": 0}}),
            "should be greater than or equal to 10",
            false,
        ),
        c(
            "cutover-timeout-huge",
            json!({"spec": {"cutoverTimeoutSeconds": 86400}}),
            "should be less than or equal to 3600",
            false,
        ),
        c(
            "cutover-timeout-within-drain",
            json!({"spec": {"cutoverTimeoutSeconds": 30, "drainTimeoutSeconds": 30}}),
            "cutoverTimeoutSeconds must be greater than drainTimeoutSeconds",
            true,
        ),
        c(
            "bad-policy",
            json!({"spec": {"failover": {"policy": "Sometimes"}}}),
            "Unsupported value: \"Sometimes\"",
            false,
        ),
        c("bad-os", json!({"spec": {"nodeOS": "macos"}}), "Unsupported value: \"macos\"", false),
        c(
            "akv-missing",
            json!({"spec": {"secretProvider": {"type": "AzureKeyVault"}}}),
            "secretProvider.azureKeyVault is required when type is AzureKeyVault",
            true,
        ),
        c(
            "akv-on-keyring",
            json!({"spec": {"secretProvider": {"type": "KubernetesKeyRing",
                "azureKeyVault": {"vaultUrl": "https://kv.vault.azure.net/", "clientId": "c", "tenantId": "t"}}}}),
            "secretProvider.azureKeyVault is required when type is AzureKeyVault and not allowed otherwise",
            true,
        ),
        c(
            "oidc-http",
            json!({"spec": {"oidc": {"issuer": "http://login.contoso.local/", "audience": "im"}}}),
            "oidc.issuer must be an https:// URL",
            true,
        ),
        c(
            "oidc-ui-callback-not-https",
            json!({"spec": {"oidc": {"issuer": "https://login.contoso.local/", "audience": "im",
                "ui": {"clientId": "identitymesh-ui", "redirectUrl": "http://im.contoso.local/auth/callback"}}}}),
            "oidc.ui.redirectUrl must be an https:// URL ending in /auth/callback",
            true,
        ),
        c(
            "oidc-ui-callback-elsewhere",
            json!({"spec": {"oidc": {"issuer": "https://login.contoso.local/", "audience": "im",
                "ui": {"clientId": "identitymesh-ui", "redirectUrl": "https://im.contoso.local/"}}}}),
            "oidc.ui.redirectUrl must be an https:// URL ending in /auth/callback",
            true,
        ),
        c(
            "name-too-long-for-derived-names",
            json!({"metadata": {"name": "a-very-long-cluster-name-that-exceeds-forty-chars"}}),
            "metadata.name",
            false,
        ),
        c(
            "name-starting-with-digit",
            json!({"metadata": {"name": "1im"}}),
            "metadata.name must be a DNS label of at most 40 characters starting with a letter",
            true,
        ),
        c(
            "name-ending-in-pods",
            json!({"metadata": {"name": "im-pods"}}),
            "metadata.name must not end in -pods",
            true,
        ),
        c("bad-version", json!({"spec": {"version": "1.0 beta"}}), "spec.version in body should match", false),
        c(
            "version-with-build-metadata",
            json!({"spec": {"version": "1.2.3+build.5"}}),
            "spec.version in body should match",
            false,
        ),
        c(
            "image-with-tag",
            json!({"spec": {"image": {"repository": "identitymesh/server:1.2.3"}}}),
            "image.repository must be an image repository without a tag or digest",
            true,
        ),
        c(
            "image-with-digest",
            json!({"spec": {"image": {"repository": format!("identitymesh/server@sha256:{}", "a".repeat(64))}}}),
            "image.repository must be an image repository without a tag or digest",
            true,
        ),
        c(
            "image-upper-case-path",
            json!({"spec": {"image": {"repository": "registry.contoso.local/IdentityMesh/Server"}}}),
            "image.repository must be an image repository without a tag or digest",
            true,
        ),
        c(
            "image-with-scheme",
            json!({"spec": {"image": {"repository": "https://registry.contoso.local/identitymesh/server"}}}),
            "image.repository must be an image repository without a tag or digest",
            true,
        ),
        c(
            "image-too-long",
            json!({"spec": {"image": {"repository": format!("r/{}", "a".repeat(255))}}}),
            "spec.image.repository: Too long",
            false,
        ),
        c(
            "bad-pull-secret-name",
            json!({"spec": {"image": {"pullSecrets": ["Registry Login"]}}}),
            "spec.image.pullSecrets[0] in body should match",
            false,
        ),
        c(
            "bad-tls-secret-name",
            json!({"spec": {"tls": {"secretName": "My_Cert"}}}),
            "spec.tls.secretName in body should match",
            false,
        ),
        c(
            "node-selector-os-contradicts-windows",
            json!({"spec": {"nodeSelector": {"kubernetes.io/os": "linux"}}}),
            "nodeSelector kubernetes.io/os contradicts nodeOS",
            true,
        ),
        c(
            "node-selector-os-contradicts-linux",
            json!({"spec": {"nodeOS": "linux", "nodeSelector": {"pool": "im", "beta.kubernetes.io/os": "windows"}}}),
            "nodeSelector kubernetes.io/os contradicts nodeOS",
            true,
        ),
        c(
            "bad-port",
            json!({"spec": {"service": {"port": 70000}}}),
            "should be less than or equal to 65535",
            false,
        ),
        c(
            "bad-dns-name",
            json!({"spec": {"tls": {"dnsNames": ["Not_A_Name"]}}}),
            "should match",
            false,
        ),
        c(
            "drop-folder-not-a-dns-label",
            json!({"spec": {"csvDropFolders": [{"name": "HR_Share", "claimName": "hr"}]}}),
            "csvDropFolders[].name must be a DNS label",
            true,
        ),
        c(
            "drop-folder-path-in-name",
            json!({"spec": {"csvDropFolders": [{"name": "../data", "claimName": "hr"}]}}),
            "csvDropFolders[].name must be a DNS label",
            true,
        ),
        c(
            "drop-folder-name-too-long",
            json!({"spec": {"csvDropFolders": [{"name": "a".repeat(41), "claimName": "hr"}]}}),
            "spec.csvDropFolders[0].name: Too long",
            false,
        ),
        c(
            "drop-folders-duplicate",
            json!({"spec": {"csvDropFolders": [
                {"name": "hr", "claimName": "hr-a"},
                {"name": "hr", "claimName": "hr-b"}
            ]}}),
            "csvDropFolders names must be unique",
            true,
        ),
        c(
            "drop-folders-too-many",
            json!({"spec": {"csvDropFolders": (0..17)
                .map(|i| json!({"name": format!("f{i}"), "claimName": "shared"}))
                .collect::<Vec<_>>()}}),
            "must have at most 16 items",
            false,
        ),
        c(
            "drop-folder-without-claim",
            json!({"spec": {"csvDropFolders": [{"name": "hr"}]}}),
            "spec.csvDropFolders[0].claimName: Required value",
            false,
        ),
        c(
            "drop-folder-bad-claim",
            json!({"spec": {"csvDropFolders": [{"name": "hr", "claimName": "HR Share"}]}}),
            "spec.csvDropFolders[0].claimName in body should match",
            false,
        ),
        // Object names and Secret keys: DNS subdomains (no empty label), keys a Secret can hold.
        r(
            "database-name-empty-label",
            json!({"spec": {"database": {"name": "im..db", "key": "connectionString"}}}),
            "spec.database.name in body should match",
            false,
        ),
        r(
            "database-key-dot",
            json!({"spec": {"database": {"name": "im-db", "key": "."}}}),
            "a Secret key must not be '.' nor start with '..'",
            true,
        ),
        r(
            "database-key-dot-dot-prefix",
            json!({"spec": {"database": {"name": "im-db", "key": "..data"}}}),
            "a Secret key must not be '.' nor start with '..'",
            true,
        ),
        c(
            "licence-key-dot-dot",
            json!({"spec": {"licence": {"name": "im-licence", "key": ".."}}}),
            "a Secret key must not be '.' nor start with '..'",
            true,
        ),
        c(
            "licence-name-dash-after-dot",
            json!({"spec": {"licence": {"name": "im.-licence", "key": "licence.json"}}}),
            "spec.licence.name in body should match",
            false,
        ),
        c(
            "pull-secret-empty-label",
            json!({"spec": {"image": {"pullSecrets": ["registry..login"]}}}),
            "spec.image.pullSecrets[0] in body should match",
            false,
        ),
        c(
            "tls-secret-empty-label",
            json!({"spec": {"tls": {"secretName": "im..tls"}}}),
            "spec.tls.secretName in body should match",
            false,
        ),
        c(
            "drop-folder-claim-empty-label",
            json!({"spec": {"csvDropFolders": [{"name": "hr", "claimName": "hr..share"}]}}),
            "spec.csvDropFolders[0].claimName in body should match",
            false,
        ),
        c(
            "dns-name-label-too-long",
            json!({"spec": {"tls": {"dnsNames": [format!("{}.contoso.local", "a".repeat(64))]}}}),
            "spec.tls.dnsNames[0] in body should match",
            false,
        ),
        // nodeSelector: node label keys and values.
        r(
            "node-selector-key-with-space",
            json!({"spec": {"nodeSelector": {"agent pool": "im"}}}),
            "nodeSelector keys must be node label keys",
            true,
        ),
        r(
            "node-selector-key-upper-case-prefix",
            json!({"spec": {"nodeSelector": {"Example.com/pool": "im"}}}),
            "nodeSelector keys must be node label keys",
            true,
        ),
        r(
            "node-selector-key-name-too-long",
            json!({"spec": {"nodeSelector": {format!("example.com/{}", "a".repeat(64)): "im"}}}),
            "nodeSelector keys must be node label keys",
            true,
        ),
        r(
            "node-selector-key-prefix-too-long",
            json!({"spec": {"nodeSelector": {format!("{}.example.com/pool", ["a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(63)].join(".")): "im"}}}),
            "nodeSelector keys must be node label keys",
            true,
        ),
        r(
            "node-selector-value-with-space",
            json!({"spec": {"nodeSelector": {"pool": "identity mesh"}}}),
            "nodeSelector values must be node label values",
            true,
        ),
        r(
            "node-selector-value-too-long",
            json!({"spec": {"nodeSelector": {"pool": "a".repeat(64)}}}),
            "spec.nodeSelector.pool: Too long",
            false,
        ),
        // tolerations: what the pod API accepts of each toleration.
        r(
            "toleration-unknown-operator",
            json!({"spec": {"tolerations": [{"key": "dedicated", "operator": "Equals", "value": "im"}]}}),
            "tolerations[].operator must be Equal (the default) or Exists",
            true,
        ),
        r(
            "toleration-comparison-operator",
            json!({"spec": {"tolerations": [{"key": "example.com/tier", "operator": "Gt", "value": "2"}]}}),
            "tolerations[].operator must be Equal (the default) or Exists",
            true,
        ),
        r(
            "toleration-exists-with-value",
            json!({"spec": {"tolerations": [{"key": "dedicated", "operator": "Exists", "value": "im"}]}}),
            "tolerations[].value must be empty when operator is Exists",
            true,
        ),
        r(
            "toleration-empty-key-equal",
            json!({"spec": {"tolerations": [{"operator": "Equal", "value": "im", "effect": "NoSchedule"}]}}),
            "tolerations[].operator must be Exists when key is empty",
            true,
        ),
        r(
            "toleration-unknown-effect",
            json!({"spec": {"tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoEvict"}]}}),
            "tolerations[].effect must be NoSchedule, PreferNoSchedule or NoExecute",
            true,
        ),
        r(
            "toleration-seconds-without-no-execute",
            json!({"spec": {"tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 60}]}}),
            "tolerations[].tolerationSeconds needs effect NoExecute",
            true,
        ),
        r(
            "toleration-bad-key",
            json!({"spec": {"tolerations": [{"key": "node os", "operator": "Exists"}]}}),
            "tolerations[].key must be a taint key",
            true,
        ),
        r(
            "toleration-bad-value",
            json!({"spec": {"tolerations": [{"key": "node.kubernetes.io/os", "value": "windows server", "effect": "NoSchedule"}]}}),
            "tolerations[].value must be a taint value",
            true,
        ),
        // resources: names, quantities, requests against limits, claims.
        r(
            "resources-request-above-limit",
            json!({"spec": {"resources": {"requests": {"memory": "2Gi"}, "limits": {"memory": "1Gi"}}}}),
            "resources.requests must not exceed resources.limits",
            true,
        ),
        r(
            "resources-cpu-request-above-limit",
            json!({"spec": {"resources": {"requests": {"cpu": 2}, "limits": {"cpu": "1500m"}}}}),
            "resources.requests must not exceed resources.limits",
            true,
        ),
        r(
            "resources-request-not-a-quantity",
            json!({"spec": {"resources": {"requests": {"cpu": "two"}}}}),
            "resources.requests values must be quantities",
            true,
        ),
        r(
            "resources-limit-not-a-quantity",
            json!({"spec": {"resources": {"limits": {"memory": "1 GB"}}}}),
            "resources.limits values must be quantities",
            true,
        ),
        r(
            "resources-negative-limit",
            json!({"spec": {"resources": {"limits": {"memory": "-1Gi"}}}}),
            "resources.limits must not be negative",
            true,
        ),
        r(
            "resources-negative-request",
            json!({"spec": {"resources": {"requests": {"cpu": -1}}}}),
            "resources.requests must not be negative",
            true,
        ),
        r(
            "resources-unknown-name",
            json!({"spec": {"resources": {"requests": {"gpu": "1"}, "limits": {"gpu": "1"}}}}),
            "resources.requests keys must be cpu, memory, ephemeral-storage",
            true,
        ),
        // Not refused by the pod API, but no node offers a resource under kubernetes.io that is
        // not a native one: the pod could never be scheduled.
        c(
            "resources-kubernetes-io-name",
            json!({"spec": {"resources": {"limits": {"kubernetes.io/dongle": "1"}}}}),
            "resources.limits keys must be cpu, memory, ephemeral-storage",
            true,
        ),
        r(
            "resources-extended-without-limit",
            json!({"spec": {"resources": {"requests": {"example.com/dongle": "1"}}}}),
            "need the same amount in resources.limits",
            true,
        ),
        r(
            "resources-extended-overcommitted",
            json!({"spec": {"resources": {"requests": {"example.com/dongle": "1"}, "limits": {"example.com/dongle": "2"}}}}),
            "must equal their resources.limits",
            true,
        ),
        r(
            "resources-extended-fraction",
            json!({"spec": {"resources": {"requests": {"example.com/dongle": "500m"}, "limits": {"example.com/dongle": "500m"}}}}),
            "resources.requests of extended resources (<domain>/<name>) must be whole numbers",
            true,
        ),
        r(
            "resources-hugepages-alone",
            json!({"spec": {"resources": {"requests": {"hugepages-2Mi": "4Mi"}, "limits": {"hugepages-2Mi": "4Mi"}}}}),
            "resources with hugepages-* need a cpu or memory request or limit",
            true,
        ),
        r(
            "resources-claims",
            json!({"spec": {"resources": {"claims": [{"name": "gpu"}]}}}),
            "resources.claims must be empty",
            true,
        ),
        // The client Service's annotations.
        r(
            "service-annotation-key-with-space",
            json!({"spec": {"service": {"annotations": {"load balancer": "internal"}}}}),
            "service.annotations keys must be annotation keys",
            true,
        ),
        r(
            "service-annotation-empty-name",
            json!({"spec": {"service": {"annotations": {"example.com/": "x"}}}}),
            "service.annotations keys must be annotation keys",
            true,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_least_ten_cases_with_cel_messages_in_the_crd() {
        let cases = admission_cases();
        assert!(cases.len() >= 10);
        let crd = serde_json::to_string(&crate::crd::crd()).expect("crd");
        for case in cases.iter().filter(|c| c.cel) {
            assert!(
                crd.contains(case.expect),
                "{}: message {:?} not in the CRD",
                case.name,
                case.expect
            );
        }
        // Names are unique so the cases can be applied side by side.
        let mut names: Vec<_> = cases
            .iter()
            .map(|c| c.manifest["metadata"]["name"].to_string())
            .collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), cases.len());
    }

    /// The admission-cases command prints the objects built from these cases: each builds.
    #[test]
    fn pods_and_services_build_from_the_checked_and_valid_cases() {
        let checked: Vec<(&str, Value)> = admission_cases()
            .into_iter()
            .filter(|c| c.objects == Objects::Refused)
            .map(|c| (c.name, c.manifest))
            .collect();
        assert!(checked.len() >= 20, "{}", checked.len());
        for (name, manifest) in checked.into_iter().chain(valid_cases()) {
            let objects =
                built_objects(&manifest, "default").unwrap_or_else(|e| panic!("case {name}: {e}"));
            let kinds: Vec<_> = objects.iter().map(|o| o["kind"].clone()).collect();
            assert_eq!(kinds, vec![json!("Pod"), json!("Service")], "{name}");
            assert_eq!(objects[0]["metadata"]["namespace"], "default", "{name}");
        }
        // The pod carries the spec's pod fields as they are.
        let (_, full) = valid_cases()
            .into_iter()
            .find(|(n, _)| *n == "valid-pod-fields")
            .expect("case");
        let pod = &built_objects(&full, "default").expect("objects")[0];
        assert_eq!(pod["spec"]["tolerations"], full["spec"]["tolerations"]);
        assert_eq!(
            pod["spec"]["nodeSelector"]["example.com/Pool_2.a"],
            json!("")
        );
        assert_eq!(
            pod["spec"]["containers"][0]["resources"]["limits"]["cpu"],
            json!("2")
        );
    }

    #[test]
    fn the_valid_manifest_deserialises() {
        let v = valid_manifest("im");
        let imc: IdentityMeshCluster = serde_json::from_value(v).expect("valid manifest");
        assert_eq!(imc.spec.version, "0.1.0");
        assert!(imc.spec.csv_drop_folders.is_empty());
    }

    #[test]
    fn drop_folders_are_read_only_unless_said_otherwise() {
        let v = with(
            "drops",
            json!({"spec": {"csvDropFolders": [
                {"name": "hr", "claimName": "hr-share"},
                {"name": "out", "claimName": "out-share", "readOnly": false}
            ]}}),
        );
        let imc: IdentityMeshCluster = serde_json::from_value(v).expect("manifest");
        let ro: Vec<_> = imc
            .spec
            .csv_drop_folders
            .iter()
            .map(|f| (f.name.as_str(), f.claim_name.as_str(), f.read_only))
            .collect();
        assert_eq!(
            ro,
            vec![("hr", "hr-share", true), ("out", "out-share", false)]
        );
    }
}

/// The CRD's CEL rules compiled and evaluated with a CEL interpreter, on the admission cases.
#[cfg(test)]
mod cel_tests {
    use std::sync::Arc;

    use super::*;

    /// (path in the object, rule, message) for every x-kubernetes-validations entry.
    fn rules() -> Vec<(Vec<String>, String, String)> {
        fn walk(
            schema: &Value,
            path: &mut Vec<String>,
            out: &mut Vec<(Vec<String>, String, String)>,
        ) {
            if let Some(rs) = schema
                .get("x-kubernetes-validations")
                .and_then(Value::as_array)
            {
                for r in rs {
                    out.push((
                        path.clone(),
                        r["rule"].as_str().unwrap_or_default().to_string(),
                        r["message"].as_str().unwrap_or_default().to_string(),
                    ));
                }
            }
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (k, v) in props {
                    path.push(k.clone());
                    walk(v, path, out);
                    path.pop();
                }
            }
            if let Some(items) = schema.get("items") {
                path.push("*".into());
                walk(items, path, out);
                path.pop();
            }
        }
        let crd = serde_json::to_value(crate::crd::crd()).expect("crd");
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let mut out = Vec::new();
        walk(schema, &mut Vec::new(), &mut out);
        out
    }

    fn values_at<'a>(v: &'a Value, path: &[String]) -> Vec<&'a Value> {
        let Some((head, rest)) = path.split_first() else {
            return vec![v];
        };
        if head == "*" {
            return v
                .as_array()
                .map(|a| a.iter().flat_map(|x| values_at(x, rest)).collect())
                .unwrap_or_default();
        }
        v.get(head).map(|x| values_at(x, rest)).unwrap_or_default()
    }

    /// A Kubernetes quantity in base units, as the apiserver's CEL `quantity()` reads it (f64 is
    /// exact enough for the values here); None when it is not one.
    fn parse_quantity(s: &str) -> Option<f64> {
        let (sign, rest) = match s.as_bytes().first()? {
            b'+' => (1.0, &s[1..]),
            b'-' => (-1.0, &s[1..]),
            _ => (1.0, s),
        };
        let end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, suffix) = rest.split_at(end);
        if number.is_empty() || number == "." || number.matches('.').count() > 1 {
            return None;
        }
        let n: f64 = number.parse().ok()?;
        let binary = |p: i32| 1024f64.powi(p);
        let factor = match suffix {
            "" => 1.0,
            "n" => 1e-9,
            "u" => 1e-6,
            "m" => 1e-3,
            "k" => 1e3,
            "M" => 1e6,
            "G" => 1e9,
            "T" => 1e12,
            "P" => 1e15,
            "E" => 1e18,
            "Ki" => binary(1),
            "Mi" => binary(2),
            "Gi" => binary(3),
            "Ti" => binary(4),
            "Pi" => binary(5),
            "Ei" => binary(6),
            e => {
                let exp = e.strip_prefix(['e', 'E'])?;
                10f64.powi(exp.parse().ok()?)
            }
        };
        Some(sign * n * factor)
    }

    #[test]
    fn quantities_parse_as_the_apiserver_reads_them() {
        for (q, want) in [
            ("500m", Some(0.5)),
            ("2", Some(2.0)),
            ("1.5Gi", Some(1.5 * 1024f64.powi(3))),
            ("+1k", Some(1000.0)),
            ("-1Gi", Some(-1024f64.powi(3))),
            ("1e3", Some(1000.0)),
            (".5", Some(0.5)),
            ("two", None),
            ("1 GB", None),
            ("1GB", None),
            ("", None),
            ("1..2", None),
        ] {
            assert_eq!(parse_quantity(q), want, "{q:?}");
        }
    }

    /// A CEL context with the apiserver's quantity functions (the ones the rules use), a quantity
    /// standing for its value in base units.
    fn context<'a>() -> cel::Context<'a, 'a> {
        use cel::extractors::This;
        let mut ctx = cel::Context::default();
        let no_quantity = |s: &str| {
            cel::ExecutionError::function_error("quantity", format!("{s:?} is not a quantity"))
        };
        let declared = [
            ctx.add_function("isQuantity", |s: Arc<String>| parse_quantity(&s).is_some()),
            ctx.add_function("quantity", move |s: Arc<String>| {
                parse_quantity(&s)
                    .map(cel::Value::Float)
                    .ok_or_else(|| no_quantity(&s))
            }),
            ctx.add_function("sign", |q: f64| {
                cel::Value::Int(if q > 0.0 {
                    1
                } else if q < 0.0 {
                    -1
                } else {
                    0
                })
            }),
            ctx.add_function("compareTo", |This(q): This<f64>, other: f64| {
                cel::Value::Int(match q.partial_cmp(&other) {
                    Some(std::cmp::Ordering::Less) => -1,
                    Some(std::cmp::Ordering::Greater) => 1,
                    _ => 0,
                })
            }),
            ctx.add_function("isInteger", |This(q): This<f64>| q.fract() == 0.0),
        ];
        for d in declared {
            d.expect("the quantity functions are not cel-rust built-ins");
        }
        ctx
    }

    /// Messages of the rules that fail on `manifest` (oldSelf = self: an update without change).
    fn failures(manifest: &Value) -> Vec<String> {
        let mut failed = Vec::new();
        for (path, rule, msg) in rules() {
            let program = cel::Program::compile(&rule)
                .unwrap_or_else(|e| panic!("rule {rule:?} does not compile: {e}"));
            for v in values_at(manifest, &path) {
                let mut ctx = context();
                let val = cel::to_value(v).expect("to cel");
                ctx.add_variable_from_value("self", val.clone());
                ctx.add_variable_from_value("oldSelf", val);
                match program.execute(&ctx) {
                    Ok(cel::Value::Bool(true)) => {}
                    Ok(other) => {
                        assert_eq!(
                            other,
                            cel::Value::Bool(false),
                            "rule {rule:?} must yield a bool"
                        );
                        failed.push(msg.clone());
                    }
                    Err(e) => panic!("rule {rule:?} errored on {v}: {e}"),
                }
            }
        }
        failed
    }

    #[test]
    fn every_rule_compiles_and_valid_resources_pass() {
        assert!(rules().len() >= 8);
        assert_eq!(failures(&valid_manifest("im")), Vec::<String>::new());
        let full = with(
            "full",
            json!({"spec": {
                "tls": {"dnsNames": ["im.contoso.local"], "operator": {"duration": "2160h", "renewBefore": "360h"}},
                "secretProvider": {"type": "AzureKeyVault",
                    "azureKeyVault": {"vaultUrl": "https://kv.vault.azure.net/", "clientId": "c", "tenantId": "t"}},
                "oidc": {"issuer": "https://login.contoso.local/", "audience": "im", "jwksUrl": "https://login.contoso.local/keys"},
                "nodeOS": "linux",
                "nodeSelector": {"kubernetes.io/os": "linux", "agentpool": "im"},
                "image": {"repository": "registry.contoso.local:5000/identity-mesh/server__x.y", "pullSecrets": ["registry-login"]},
                "csvDropFolders": (0..16)
                    .map(|i| json!({"name": format!("folder-{i}"), "claimName": "drops", "readOnly": i % 2 == 0}))
                    .collect::<Vec<_>>()
            }}),
        );
        assert_eq!(failures(&full), Vec::<String>::new());
        let user_tls = with("user-tls", json!({"spec": {"tls": {"secretName": "mine"}}}));
        assert_eq!(failures(&user_tls), Vec::<String>::new());
        let windows_os = with(
            "windows-os",
            json!({"spec": {"nodeOS": "windows", "nodeSelector": {"kubernetes.io/os": "windows"}}}),
        );
        assert_eq!(failures(&windows_os), Vec::<String>::new());
        for (name, manifest) in valid_cases() {
            assert_eq!(failures(&manifest), Vec::<String>::new(), "{name}");
        }
    }

    /// Repositories the container runtimes accept pass; with a tag, a digest, upper case in the
    /// path or a scheme they do not.
    #[test]
    fn image_repositories() {
        let fails = |repo: &str| {
            !failures(&with(
                "img",
                json!({"spec": {"image": {"repository": repo}}}),
            ))
            .is_empty()
        };
        for ok in [
            "identitymesh/server",
            "server",
            "localhost:5000/server",
            "mcr.microsoft.com/windows/servercore",
            "Registry.Contoso.local:443/team/identity-mesh/server",
            "r/a__b/c.d/e---f",
            "10.0.0.1:5000/im",
        ] {
            assert!(!fails(ok), "{ok} refused");
        }
        for bad in [
            "identitymesh/server:1.2.3",
            "identitymesh/server:latest",
            "identitymesh/server@sha256:abc",
            "IdentityMesh",
            "registry/Server",
            "registry:5000",
            "registry:port/server",
            "/server",
            "server/",
            "a//b",
            "a/-b",
            "a/b_",
            "a/b___c",
            "a b/c",
            "https://registry/server",
            "",
        ] {
            assert!(fails(bad), "{bad:?} accepted");
        }
    }

    /// The schema pattern at `field` (e.g. "spec.image.pullSecrets[0]") and the value there.
    fn pattern_and_value(manifest: &Value, field: &str) -> (String, String) {
        let crd = serde_json::to_value(crate::crd::crd()).expect("crd");
        let mut schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let mut value = manifest;
        for part in field.split('.') {
            let (key, index) = match part.split_once('[') {
                Some((k, i)) => (k, i.trim_end_matches(']').parse::<usize>().ok()),
                None => (part, None),
            };
            schema = &schema["properties"][key];
            value = &value[key];
            if let Some(i) = index {
                schema = &schema["items"];
                value = &value[i];
            }
        }
        (
            schema["pattern"].as_str().unwrap_or_default().to_string(),
            value.as_str().unwrap_or_default().to_string(),
        )
    }

    /// The OpenAPI-pattern cases (checked for real by the end-to-end test) fail their pattern
    /// here too, evaluated with the same regex engine as the CEL rules.
    #[test]
    fn pattern_cases_fail_their_schema_pattern() {
        let mut checked = 0;
        for case in admission_cases().into_iter().filter(|c| !c.cel) {
            let Some(field) = case.expect.strip_suffix(" in body should match") else {
                continue;
            };
            let (pattern, value) = pattern_and_value(&case.manifest, field);
            assert!(!pattern.is_empty(), "{}: no pattern at {field}", case.name);
            let program = cel::Program::compile("v.matches(p)").expect("compiles");
            let mut ctx = cel::Context::default();
            ctx.add_variable_from_value("v", cel::Value::String(value.clone().into()));
            ctx.add_variable_from_value("p", cel::Value::String(pattern.clone().into()));
            assert_eq!(
                program.execute(&ctx).expect("runs"),
                cel::Value::Bool(false),
                "{}: {value:?} matches {pattern}",
                case.name
            );
            checked += 1;
        }
        assert!(checked >= 5, "{checked}");
    }

    #[test]
    fn cel_cases_fail_with_their_message() {
        for case in admission_cases().into_iter().filter(|c| c.cel) {
            let f = failures(&case.manifest);
            assert!(
                f.iter().any(|m| m.contains(case.expect)),
                "{}: expected a failing rule with {:?}, got {f:?}",
                case.name,
                case.expect
            );
        }
    }
}

/// `cargo test -p identitymesh-operator dump_admission_cases -- --ignored --nocapture` prints the
/// cases as JSON lines, for trying them against an apiserver by hand.
#[cfg(test)]
#[test]
#[ignore]
fn dump_admission_cases() {
    for c in admission_cases() {
        println!(
            "{}",
            json!({"name": c.name, "expect": c.expect, "manifest": c.manifest})
        );
    }
}
