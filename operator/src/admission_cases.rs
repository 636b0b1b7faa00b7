//! Resources the apiserver must reject at admission, with the message it must give. Used by the
//! end-to-end tests (apply each against a real apiserver with the CRD installed); the unit test
//! here checks that every CEL message is really in the generated CRD.

use serde_json::{json, Value};

/// One bad resource: `manifest` must be rejected, with `expect` in the error message.
#[derive(Clone, Debug)]
pub struct AdmissionCase {
    pub name: &'static str,
    pub manifest: Value,
    pub expect: &'static str,
    /// The message comes from one of our CEL rules (rather than the OpenAPI schema).
    pub cel: bool,
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

pub fn admission_cases() -> Vec<AdmissionCase> {
    let c = |name, patch, expect, cel| AdmissionCase {
        name,
        manifest: with(name, patch),
        expect,
        cel,
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
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::IdentityMeshCluster;

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

    /// Messages of the rules that fail on `manifest` (oldSelf = self: an update without change).
    fn failures(manifest: &Value) -> Vec<String> {
        let mut failed = Vec::new();
        for (path, rule, msg) in rules() {
            let program = cel::Program::compile(&rule)
                .unwrap_or_else(|e| panic!("rule {rule:?} does not compile: {e}"));
            for v in values_at(manifest, &path) {
                let mut ctx = cel::Context::default();
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
