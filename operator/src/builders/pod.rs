//! The server Pods (`<cluster>-a`, `<cluster>-b`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, HTTPGetAction, KeyToPath, LocalObjectReference, ObjectFieldSelector,
    PersistentVolumeClaimVolumeSource, Pod, PodAffinityTerm, PodAntiAffinity, PodSecurityContext,
    PodSpec, Probe, SecretKeySelector, SecretVolumeSource, SecurityContext, Toleration, Volume,
    VolumeMount, WindowsSecurityContextOptions,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    meta, spec_hash, stamp_hash, Names, Paths, HTTPS_PORT, INTERNAL_PORT, LABEL_CLUSTER,
    LABEL_INSTANCE, LABEL_VERSION,
};
use crate::crd::{IdentityMeshCluster, NodeOs, SecretProviderType};

pub const CONTAINER_NAME: &str = "server";
pub const ANNOTATION_CONFIG_HASH: &str = "identitymesh.io/config-hash";

/// Default toleration for Windows node pools tainted `node.kubernetes.io/os=windows:NoSchedule`.
pub fn default_tolerations(os: NodeOs) -> Vec<Toleration> {
    match os {
        NodeOs::Windows => vec![Toleration {
            key: Some("node.kubernetes.io/os".into()),
            operator: Some("Equal".into()),
            value: Some("windows".into()),
            effect: Some("NoSchedule".into()),
            ..Default::default()
        }],
        NodeOs::Linux => Vec::new(),
    }
}

/// Name of the Secret holding the serving certificate: the user's or the operator's.
pub fn tls_secret_name(imc: &IdentityMeshCluster, names: &Names) -> String {
    imc.spec
        .tls
        .secret_name
        .clone()
        .unwrap_or_else(|| names.operator_tls_secret())
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

fn https_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(HTTPS_PORT),
            scheme: Some("HTTPS".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(2),
        failure_threshold: Some(failures),
        ..Default::default()
    }
}

fn secret_volume(name: &str, secret: &str, items: &[(&str, &str)]) -> Volume {
    Volume {
        name: name.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.into()),
            items: Some(
                items
                    .iter()
                    .map(|(k, p)| KeyToPath {
                        key: (*k).into(),
                        path: (*p).into(),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn config_map_volume(name: &str, cm: &str, key: &str) -> Volume {
    config_map_volume_as(name, cm, key, key)
}

/// A ConfigMap volume with one key, as the file `path`.
fn config_map_volume_as(name: &str, cm: &str, key: &str, path: &str) -> Volume {
    Volume {
        name: name.into(),
        config_map: Some(ConfigMapVolumeSource {
            name: cm.into(),
            items: Some(vec![KeyToPath {
                key: key.into(),
                path: path.into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(true),
        ..Default::default()
    }
}

/// The desired server Pod named `pod_name`, hash-stamped.
pub fn build_pod(imc: &IdentityMeshCluster, names: &Names, pod_name: &str) -> Pod {
    let spec = &imc.spec;
    let os = spec.node_os;
    let paths = Paths::for_os(os);

    let mut labels = super::common_labels(names);
    labels.insert(LABEL_INSTANCE.into(), pod_name.into());
    labels.insert(LABEL_VERSION.into(), label_safe(&spec.version));

    let mut node_selector =
        BTreeMap::from([("kubernetes.io/os".to_string(), os.as_str().to_string())]);
    node_selector.extend(spec.node_selector.clone());

    let mut env_vars = vec![
        EnvVar {
            name: "IM_INSTANCE_NAME".into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.name".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        },
        env("IM_DATA_DIR", &paths.data_dir),
        env("IM_TLS__CERT_FILE", &paths.cert_file),
        env("IM_TLS__KEY_FILE", &paths.key_file),
        env("IM_TLS__CLIENT_CA_FILE", &paths.ca_file),
        // The peer a request is forwarded to serves a certificate from the cluster CA.
        env("IM_FORWARDING__CA_FILE", &paths.ca_file),
        env("IM_LICENCE__FILE", &paths.licence_file),
        env("IM_KEYRING__FILE", &paths.keyring_file),
        env("IM_VERSION_LABEL", &spec.version),
        EnvVar {
            name: "IM_DATABASE__CONNECTION_STRING".into(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: spec.database.name.clone(),
                    key: spec.database.key.clone(),
                    optional: Some(false),
                }),
                ..Default::default()
            }),
            ..Default::default()
        },
    ];
    if spec.secret_provider.type_ == SecretProviderType::AzureKeyVault {
        if let Some(akv) = &spec.secret_provider.azure_key_vault {
            // The server's [secret_provider] section (it refuses IM_* names it does not know).
            env_vars.push(env("IM_SECRET_PROVIDER__KIND", "azure_key_vault"));
            env_vars.push(env("IM_SECRET_PROVIDER__VAULT_URL", &akv.vault_url));
            env_vars.push(env("IM_SECRET_PROVIDER__TENANT_ID", &akv.tenant_id));
            env_vars.push(env("IM_SECRET_PROVIDER__CLIENT_ID", &akv.client_id));
        }
    }

    let drops = csv_drop_folders(imc, &paths);
    if let Some(roots) = csv_roots_env(&drops, &paths) {
        env_vars.push(env("IM_CONNECTORS__CSV_ROOTS", roots));
    }

    let mut volumes = vec![
        secret_volume(
            "tls",
            &tls_secret_name(imc, names),
            &[("tls.crt", "tls.crt"), ("tls.key", "tls.key")],
        ),
        config_map_volume("ca", &names.ca_config_map(), "ca.crt"),
        secret_volume(
            "keyring",
            &names.keyring_secret(),
            &[("keyring.json", "keyring.json")],
        ),
        secret_volume(
            "licence",
            &spec.licence.name,
            &[(spec.licence.key.as_str(), "licence.json")],
        ),
        config_map_volume("config", &names.config_map(), "server.toml"),
        Volume {
            name: "data".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        },
    ];
    let mut mounts = vec![
        mount("tls", &paths.tls_dir),
        mount("ca", &paths.ca_dir),
        mount("keyring", &paths.keyring_dir),
        mount("licence", &paths.licence_dir),
        mount("config", &paths.config_dir),
        VolumeMount {
            name: "data".into(),
            mount_path: paths.data_dir.clone(),
            ..Default::default()
        },
    ];
    for d in drops {
        volumes.push(d.volume);
        mounts.push(d.mount);
    }
    if let Some(o) = &spec.oidc {
        if let Some(secret) = o.ui.as_ref().and_then(|u| u.client_secret.as_ref()) {
            volumes.push(secret_volume(
                "oidc-client",
                &secret.name,
                &[(secret.key.as_str(), "client-secret")],
            ));
            mounts.push(mount("oidc-client", &paths.oidc_client_dir));
            env_vars.push(env(
                "IM_AUTH__OIDC__CLIENT_SECRET_FILE",
                &paths.oidc_client_secret_file,
            ));
        }
        if let Some(ca) = &o.ca {
            volumes.push(config_map_volume_as("oidc-ca", &ca.name, &ca.key, "ca.crt"));
            mounts.push(mount("oidc-ca", &paths.oidc_ca_dir));
            env_vars.push(env("IM_AUTH__OIDC__CA_FILE", &paths.oidc_ca_file));
        }
    }

    let (pod_security, container_security) = match os {
        NodeOs::Windows => (
            PodSecurityContext {
                windows_options: Some(WindowsSecurityContextOptions {
                    run_as_user_name: Some("ContainerUser".into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            None,
        ),
        NodeOs::Linux => (
            PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(10001),
                ..Default::default()
            },
            Some(SecurityContext {
                allow_privilege_escalation: Some(false),
                read_only_root_filesystem: Some(true),
                ..Default::default()
            }),
        ),
    };

    let container = Container {
        name: CONTAINER_NAME.into(),
        image: Some(format!("{}:{}", spec.image.repository, spec.version)),
        image_pull_policy: Some(spec.image.pull_policy.as_str().into()),
        args: Some(vec![
            "run".into(),
            "--config".into(),
            paths.config_file.clone(),
        ]),
        ports: Some(vec![
            ContainerPort {
                name: Some("https".into()),
                container_port: HTTPS_PORT,
                protocol: Some("TCP".into()),
                ..Default::default()
            },
            ContainerPort {
                name: Some("internal".into()),
                container_port: INTERNAL_PORT,
                protocol: Some("TCP".into()),
                ..Default::default()
            },
        ]),
        env: Some(env_vars),
        volume_mounts: Some(mounts),
        liveness_probe: Some(https_probe("/health/live", 5, 3)),
        // Fast readiness: failover detection and endpoint changes key off it.
        readiness_probe: Some(https_probe("/health/ready", 2, 2)),
        resources: spec.resources.clone(),
        security_context: container_security,
        ..Default::default()
    };

    let mut cluster_only = BTreeMap::new();
    cluster_only.insert(LABEL_CLUSTER.to_string(), names.cluster.clone());

    let pod_spec = PodSpec {
        // Per-pod DNS through the headless Service: <pod>.<cluster>-pods.<ns>.svc
        hostname: Some(pod_name.into()),
        subdomain: Some(names.headless_service()),
        node_selector: Some(node_selector),
        tolerations: Some(
            spec.tolerations
                .clone()
                .unwrap_or_else(|| default_tolerations(os)),
        ),
        affinity: Some(Affinity {
            pod_anti_affinity: Some(PodAntiAffinity {
                required_during_scheduling_ignored_during_execution: Some(vec![PodAffinityTerm {
                    label_selector: Some(LabelSelector {
                        match_labels: Some(cluster_only),
                        ..Default::default()
                    }),
                    topology_key: "kubernetes.io/hostname".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        security_context: Some(pod_security),
        image_pull_secrets: if spec.image.pull_secrets.is_empty() {
            None
        } else {
            Some(
                spec.image
                    .pull_secrets
                    .iter()
                    .map(|n| LocalObjectReference { name: n.clone() })
                    .collect(),
            )
        },
        // The pods need no API access.
        automount_service_account_token: Some(false),
        // Service links would inject e.g. IM_PORT for a cluster named "im", and the server
        // refuses unknown IM_* variables.
        enable_service_links: Some(false),
        // Room for the bounded drain on a clean stop.
        termination_grace_period_seconds: Some(i64::from(spec.drain_timeout_seconds) + 15),
        restart_policy: Some("Always".into()),
        containers: vec![container],
        volumes: Some(volumes),
        ..Default::default()
    };

    let mut pod = Pod {
        metadata: meta(imc, names, pod_name.to_string()),
        spec: Some(pod_spec),
        status: None,
    };
    pod.metadata.labels = Some(labels);
    // The server reads server.toml at start: a config change must roll the pods (standby first),
    // so the config's hash is part of the pod's.
    let config_hash = super::config::server_toml(imc)
        .map(|t| spec_hash(&t))
        .unwrap_or_default();
    pod.metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(ANNOTATION_CONFIG_HASH.to_string(), config_hash);
    let hash = spec_hash(&pod);
    stamp_hash(&mut pod.metadata, hash);
    pod
}

/// A CSV drop folder as the pod has it: its volume, its mount and where it is mounted.
struct DropFolder {
    volume: Volume,
    mount: VolumeMount,
}

/// `spec.csvDropFolders`, each a claim volume `drop-<name>` mounted at `<drop_dir>/<name>`.
fn csv_drop_folders(imc: &IdentityMeshCluster, paths: &Paths) -> Vec<DropFolder> {
    imc.spec
        .csv_drop_folders
        .iter()
        .map(|f| {
            let name = format!("drop-{}", f.name);
            DropFolder {
                volume: Volume {
                    name: name.clone(),
                    persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                        claim_name: f.claim_name.clone(),
                        read_only: Some(f.read_only),
                    }),
                    ..Default::default()
                },
                mount: VolumeMount {
                    name,
                    mount_path: format!("{}{}{}", paths.drop_dir, paths.sep, f.name),
                    read_only: Some(f.read_only),
                    ..Default::default()
                },
            }
        })
        .collect()
}

/// The server's `connectors.csv_roots` in PATH-list form for the pod's OS (the server splits it
/// with `std::env::split_paths`: ';' on Windows, ':' on Linux). None without drop folders: the
/// managed server's default is no roots, so CSV connectors are refused.
fn csv_roots_env(drops: &[DropFolder], paths: &Paths) -> Option<String> {
    if drops.is_empty() {
        return None;
    }
    Some(
        drops
            .iter()
            .map(|d| d.mount.mount_path.as_str())
            .collect::<Vec<_>>()
            .join(paths.list_sep),
    )
}

/// Label values allow [A-Za-z0-9_.-], at most 63 characters.
fn label_safe(v: &str) -> String {
    let s: String = v
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(63)
        .collect();
    s.trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string()
}

/// The server version a pod runs, from its label.
pub fn pod_version(pod: &Pod) -> Option<String> {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_VERSION))
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builders::test_support::cluster;
    use crate::builders::{hash_of, ANNOTATION_SPEC_HASH};

    fn container(p: &Pod) -> &Container {
        &p.spec.as_ref().expect("spec").containers[0]
    }
    fn env_value(p: &Pod, name: &str) -> Option<String> {
        container(p)
            .env
            .as_ref()?
            .iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    }

    #[test]
    fn windows_pod_shape() {
        let imc = cluster("im", "prod");
        let names = Names::of(&imc);
        let p = build_pod(&imc, &names, "im-a");
        let spec = p.spec.as_ref().expect("spec");
        let labels = p.metadata.labels.as_ref().expect("labels");
        assert_eq!(labels.get(LABEL_CLUSTER).map(String::as_str), Some("im"));
        assert_eq!(labels.get(LABEL_INSTANCE).map(String::as_str), Some("im-a"));
        assert_eq!(
            spec.node_selector
                .as_ref()
                .and_then(|n| n.get("kubernetes.io/os"))
                .map(String::as_str),
            Some("windows")
        );
        assert_eq!(
            spec.security_context
                .as_ref()
                .and_then(|s| s.windows_options.as_ref())
                .and_then(|w| w.run_as_user_name.as_deref()),
            Some("ContainerUser")
        );
        let tol = spec.tolerations.as_ref().expect("tolerations");
        assert_eq!(tol[0].value.as_deref(), Some("windows"));
        let anti = spec
            .affinity
            .as_ref()
            .and_then(|a| a.pod_anti_affinity.as_ref())
            .and_then(|a| {
                a.required_during_scheduling_ignored_during_execution
                    .as_ref()
            })
            .expect("required anti-affinity");
        assert_eq!(anti[0].topology_key, "kubernetes.io/hostname");
        assert_eq!(spec.hostname.as_deref(), Some("im-a"));
        assert_eq!(spec.subdomain.as_deref(), Some("im-pods"));
        assert_eq!(spec.enable_service_links, Some(false));
        assert_eq!(spec.automount_service_account_token, Some(false));

        let c = container(&p);
        assert_eq!(c.image.as_deref(), Some("identitymesh/server:1.2.3"));
        assert_eq!(
            c.args.as_deref(),
            Some(
                &[
                    "run".to_string(),
                    "--config".to_string(),
                    "C:\\identitymesh\\config\\server.toml".to_string()
                ][..]
            )
        );
        let ports: Vec<_> = c
            .ports
            .as_ref()
            .expect("ports")
            .iter()
            .map(|p| p.container_port)
            .collect();
        assert_eq!(ports, vec![8443, 9443]);
        let live = c
            .liveness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("live");
        assert_eq!(live.path.as_deref(), Some("/health/live"));
        assert_eq!(live.scheme.as_deref(), Some("HTTPS"));
        assert_eq!(live.port, IntOrString::Int(8443));
        let ready = c
            .readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("ready");
        assert_eq!(ready.path.as_deref(), Some("/health/ready"));
        assert!(hash_of(&p.metadata).is_some());
        assert!(p
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(ANNOTATION_SPEC_HASH)));
    }

    #[test]
    fn every_path_goes_through_env_into_a_mount() {
        let imc = cluster("im", "prod");
        let p = build_pod(&imc, &Names::of(&imc), "im-b");
        let mounts: Vec<String> = container(&p)
            .volume_mounts
            .as_ref()
            .expect("mounts")
            .iter()
            .map(|m| m.mount_path.clone())
            .collect();
        for var in [
            "IM_TLS__CERT_FILE",
            "IM_TLS__KEY_FILE",
            "IM_TLS__CLIENT_CA_FILE",
            "IM_FORWARDING__CA_FILE",
            "IM_LICENCE__FILE",
            "IM_KEYRING__FILE",
            "IM_DATA_DIR",
        ] {
            let v = env_value(&p, var).unwrap_or_else(|| panic!("{var} missing"));
            assert!(
                mounts.iter().any(|m| v.starts_with(m.as_str())),
                "{var}={v} is not inside a mount {mounts:?}"
            );
        }
        // Forwarded requests verify the peer against the cluster CA, the file the "ca" volume holds.
        assert_eq!(
            env_value(&p, "IM_FORWARDING__CA_FILE"),
            env_value(&p, "IM_TLS__CLIENT_CA_FILE")
        );
        let envs = container(&p).env.as_ref().expect("env");
        let inst = envs
            .iter()
            .find(|e| e.name == "IM_INSTANCE_NAME")
            .expect("instance");
        assert_eq!(
            inst.value_from
                .as_ref()
                .and_then(|v| v.field_ref.as_ref())
                .map(|f| f.field_path.as_str()),
            Some("metadata.name")
        );
        let db = envs
            .iter()
            .find(|e| e.name == "IM_DATABASE__CONNECTION_STRING")
            .expect("db");
        let sk = db
            .value_from
            .as_ref()
            .and_then(|v| v.secret_key_ref.as_ref())
            .expect("secret ref");
        assert_eq!(
            (sk.name.as_str(), sk.key.as_str()),
            ("im-db", "connectionString")
        );
        // Only the documented IM_* names: the server refuses unknown ones.
        let allowed = [
            "IM_INSTANCE_NAME",
            "IM_DATA_DIR",
            "IM_TLS__CERT_FILE",
            "IM_TLS__KEY_FILE",
            "IM_TLS__CLIENT_CA_FILE",
            "IM_FORWARDING__CA_FILE",
            "IM_LICENCE__FILE",
            "IM_KEYRING__FILE",
            "IM_VERSION_LABEL",
            "IM_DATABASE__CONNECTION_STRING",
        ];
        for e in envs {
            if e.name.starts_with("IM_") {
                assert!(allowed.contains(&e.name.as_str()), "unexpected {}", e.name);
            }
        }
    }

    #[test]
    fn the_ui_client_secret_and_the_issuer_ca_are_files_named_by_env() {
        let mut imc = cluster("im", "prod");
        let o = imc.spec.oidc.as_mut().expect("the fixture has oidc");
        o.ui = Some(crate::crd::OidcUiSpec {
            client_id: "identitymesh-ui".into(),
            client_secret: Some(crate::crd::SecretKeyRef {
                name: "kc-client".into(),
                key: "secret".into(),
            }),
            redirect_url: "https://im.contoso.local/auth/callback".into(),
        });
        o.ca = Some(crate::crd::ConfigMapKeyRef {
            name: "corp-ca".into(),
            key: "bundle.pem".into(),
        });
        let names = Names::of(&imc);
        let p = build_pod(&imc, &names, "im-a");
        let spec = p.spec.as_ref().expect("spec");
        let vols = spec.volumes.as_ref().expect("volumes");
        let secret = vols
            .iter()
            .find(|v| v.name == "oidc-client")
            .and_then(|v| v.secret.as_ref())
            .expect("client secret volume");
        assert_eq!(secret.secret_name.as_deref(), Some("kc-client"));
        assert_eq!(
            secret
                .items
                .as_ref()
                .map(|i| (i[0].key.as_str(), i[0].path.as_str())),
            Some(("secret", "client-secret"))
        );
        let ca = vols
            .iter()
            .find(|v| v.name == "oidc-ca")
            .and_then(|v| v.config_map.as_ref())
            .expect("issuer CA volume");
        assert_eq!(
            (
                ca.name.as_str(),
                ca.items
                    .as_ref()
                    .map(|i| (i[0].key.as_str(), i[0].path.as_str()))
            ),
            ("corp-ca", Some(("bundle.pem", "ca.crt")))
        );
        let c = &spec.containers[0];
        let env: BTreeMap<_, _> = c
            .env
            .iter()
            .flatten()
            .filter_map(|e| Some((e.name.as_str(), e.value.as_deref()?)))
            .collect();
        let paths = Paths::for_os(NodeOs::Windows);
        assert_eq!(
            env.get("IM_AUTH__OIDC__CLIENT_SECRET_FILE"),
            Some(&paths.oidc_client_secret_file.as_str())
        );
        assert_eq!(
            env.get("IM_AUTH__OIDC__CA_FILE"),
            Some(&paths.oidc_ca_file.as_str())
        );
        let mounts: Vec<_> = c
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| (m.name.as_str(), m.mount_path.as_str()))
            .collect();
        assert!(
            mounts.contains(&("oidc-client", paths.oidc_client_dir.as_str())),
            "{mounts:?}"
        );
        assert!(
            mounts.contains(&("oidc-ca", paths.oidc_ca_dir.as_str())),
            "{mounts:?}"
        );
        // The client id and callback are in server.toml.
        let toml: toml::Value =
            toml::from_str(&super::super::config::server_toml(&imc).unwrap()).unwrap();
        assert_eq!(
            toml["auth"]["oidc"]["client_id"].as_str(),
            Some("identitymesh-ui")
        );
        assert_eq!(
            toml["auth"]["oidc"]["redirect_url"].as_str(),
            Some("https://im.contoso.local/auth/callback")
        );
    }

    #[test]
    fn volumes_never_mount_the_ca_key() {
        let imc = cluster("im", "prod");
        let names = Names::of(&imc);
        let p = build_pod(&imc, &names, "im-a");
        let vols = p
            .spec
            .as_ref()
            .and_then(|s| s.volumes.as_ref())
            .expect("volumes");
        let names_of: Vec<_> = vols.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(
            names_of,
            vec!["tls", "ca", "keyring", "licence", "config", "data"]
        );
        for v in vols {
            if let Some(s) = &v.secret {
                assert_ne!(s.secret_name.as_deref(), Some(names.ca_secret().as_str()));
            }
        }
        let ca = vols
            .iter()
            .find(|v| v.name == "ca")
            .and_then(|v| v.config_map.as_ref())
            .expect("ca cm");
        assert_eq!(ca.name, "im-ca");
        let lic = vols
            .iter()
            .find(|v| v.name == "licence")
            .and_then(|v| v.secret.as_ref())
            .expect("lic");
        assert_eq!(lic.secret_name.as_deref(), Some("im-licence"));
        assert_eq!(
            lic.items.as_ref().map(|i| i[0].path.as_str()),
            Some("licence.json")
        );
    }

    #[test]
    fn linux_and_user_tls_and_akv() {
        let mut imc = cluster("im", "dev");
        imc.spec.node_os = NodeOs::Linux;
        imc.spec.tls.secret_name = Some("my-cert".into());
        imc.spec.secret_provider.type_ = SecretProviderType::AzureKeyVault;
        imc.spec.secret_provider.azure_key_vault = Some(crate::crd::AzureKeyVaultSpec {
            vault_url: "https://kv.vault.azure.net/".into(),
            client_id: "cid".into(),
            tenant_id: "tid".into(),
        });
        let p = build_pod(&imc, &Names::of(&imc), "im-a");
        let spec = p.spec.as_ref().expect("spec");
        assert_eq!(
            container(&p).args.as_ref().map(|a| a[2].clone()),
            Some("/etc/identitymesh/config/server.toml".into())
        );
        assert_eq!(spec.tolerations.as_ref().map(Vec::len), Some(0));
        assert!(spec
            .security_context
            .as_ref()
            .and_then(|s| s.windows_options.as_ref())
            .is_none());
        let tls = spec
            .volumes
            .as_ref()
            .expect("v")
            .iter()
            .find(|v| v.name == "tls")
            .expect("tls");
        assert_eq!(
            tls.secret.as_ref().and_then(|s| s.secret_name.as_deref()),
            Some("my-cert")
        );
        assert_eq!(
            env_value(&p, "IM_SECRET_PROVIDER__KIND").as_deref(),
            Some("azure_key_vault")
        );
        assert_eq!(
            env_value(&p, "IM_SECRET_PROVIDER__VAULT_URL").as_deref(),
            Some("https://kv.vault.azure.net/")
        );
        assert_eq!(
            env_value(&p, "IM_SECRET_PROVIDER__TENANT_ID").as_deref(),
            Some("tid")
        );
        assert_eq!(
            env_value(&p, "IM_SECRET_PROVIDER__CLIENT_ID").as_deref(),
            Some("cid")
        );
        // Still only the server's documented IM_* names.
        let allowed = [
            "IM_SECRET_PROVIDER__KIND",
            "IM_SECRET_PROVIDER__VAULT_URL",
            "IM_SECRET_PROVIDER__TENANT_ID",
            "IM_SECRET_PROVIDER__CLIENT_ID",
        ];
        for e in container(&p).env.as_ref().expect("env") {
            assert!(
                !e.name.starts_with("IM_SECRET") || allowed.contains(&e.name.as_str()),
                "unexpected {}",
                e.name
            );
            assert!(!e.name.starts_with("AZURE_"), "unexpected {}", e.name);
        }
        // The default key ring provider sets none of them (the server's default kind).
        let kr = build_pod(
            &cluster("im", "prod"),
            &Names::of(&cluster("im", "prod")),
            "im-a",
        );
        assert!(env_value(&kr, "IM_SECRET_PROVIDER__KIND").is_none());
    }

    #[test]
    fn hash_changes_with_version_but_not_between_builds() {
        let mut imc = cluster("im", "prod");
        let names = Names::of(&imc);
        let h1 = hash_of(&build_pod(&imc, &names, "im-a").metadata).map(str::to_string);
        let h2 = hash_of(&build_pod(&imc, &names, "im-a").metadata).map(str::to_string);
        assert_eq!(h1, h2);
        imc.spec.version = "1.2.4".into();
        let p = build_pod(&imc, &names, "im-a");
        assert_ne!(h1.as_deref(), hash_of(&p.metadata));
        assert_eq!(pod_version(&p).as_deref(), Some("1.2.4"));
    }

    #[test]
    fn config_change_changes_the_pod_hash() {
        let mut imc = cluster("im", "prod");
        let names = Names::of(&imc);
        let h1 = hash_of(&build_pod(&imc, &names, "im-a").metadata).map(str::to_string);
        imc.spec.oidc = None; // only server.toml changes
        let h2 = hash_of(&build_pod(&imc, &names, "im-a").metadata).map(str::to_string);
        assert_ne!(h1, h2);
    }

    fn with_drops(os: NodeOs) -> IdentityMeshCluster {
        let mut imc = cluster("im", "prod");
        imc.spec.node_os = os;
        imc.spec.csv_drop_folders = serde_json::from_value(serde_json::json!([
            {"name": "hr", "claimName": "hr-share"},
            {"name": "contractors", "claimName": "azure-files.contractors", "readOnly": false}
        ]))
        .expect("drop folders");
        imc
    }

    fn mount_of<'a>(p: &'a Pod, volume: &str) -> Option<&'a VolumeMount> {
        container(p)
            .volume_mounts
            .as_ref()?
            .iter()
            .find(|m| m.name == volume)
    }

    fn claim_of(p: &Pod, volume: &str) -> Option<PersistentVolumeClaimVolumeSource> {
        p.spec
            .as_ref()?
            .volumes
            .as_ref()?
            .iter()
            .find(|v| v.name == volume)?
            .persistent_volume_claim
            .clone()
    }

    #[test]
    fn windows_drop_folders_are_claims_mounted_and_listed_with_semicolons() {
        let imc = with_drops(NodeOs::Windows);
        let p = build_pod(&imc, &Names::of(&imc), "im-a");
        let hr = claim_of(&p, "drop-hr").expect("drop-hr volume");
        assert_eq!(
            (hr.claim_name.as_str(), hr.read_only),
            ("hr-share", Some(true))
        );
        let c = claim_of(&p, "drop-contractors").expect("drop-contractors volume");
        assert_eq!(
            (c.claim_name.as_str(), c.read_only),
            ("azure-files.contractors", Some(false))
        );
        let m = mount_of(&p, "drop-hr").expect("drop-hr mount");
        assert_eq!(
            (m.mount_path.as_str(), m.read_only),
            ("C:\\identitymesh\\drop\\hr", Some(true))
        );
        let m = mount_of(&p, "drop-contractors").expect("drop-contractors mount");
        assert_eq!(
            (m.mount_path.as_str(), m.read_only),
            ("C:\\identitymesh\\drop\\contractors", Some(false))
        );
        // Windows' PATH-list form, which the server (a Windows process there) splits on ';'.
        assert_eq!(
            env_value(&p, "IM_CONNECTORS__CSV_ROOTS").as_deref(),
            Some("C:\\identitymesh\\drop\\hr;C:\\identitymesh\\drop\\contractors")
        );
        // Not inside the data emptyDir, and the other mounts are unchanged.
        let data = Paths::for_os(NodeOs::Windows).data_dir;
        assert!(!m.mount_path.starts_with(&data), "{}", m.mount_path);
        assert_eq!(
            mount_of(&p, "data").map(|m| m.mount_path.as_str()),
            Some(data.as_str())
        );
    }

    #[test]
    fn linux_drop_folders_are_listed_the_way_split_paths_reads_them() {
        let imc = with_drops(NodeOs::Linux);
        let p = build_pod(&imc, &Names::of(&imc), "im-b");
        let roots = env_value(&p, "IM_CONNECTORS__CSV_ROOTS").expect("csv roots env");
        assert_eq!(
            roots,
            "/var/lib/identitymesh/drop/hr:/var/lib/identitymesh/drop/contractors"
        );
        // The server's own reading of it (this test runs on a ':' platform, as Linux pods do).
        #[cfg(unix)]
        {
            let split: Vec<_> = std::env::split_paths(&roots).collect();
            let mounts: Vec<_> = ["drop-hr", "drop-contractors"]
                .iter()
                .map(|v| std::path::PathBuf::from(&mount_of(&p, v).expect("mount").mount_path))
                .collect();
            assert_eq!(split, mounts);
        }
        assert_eq!(
            claim_of(&p, "drop-hr").map(|c| c.claim_name),
            Some("hr-share".to_string())
        );
    }

    #[test]
    fn no_drop_folders_no_volumes_and_no_roots_env() {
        for os in [NodeOs::Windows, NodeOs::Linux] {
            let mut imc = cluster("im", "prod");
            imc.spec.node_os = os;
            let p = build_pod(&imc, &Names::of(&imc), "im-a");
            assert_eq!(env_value(&p, "IM_CONNECTORS__CSV_ROOTS"), None);
            let envs = container(&p).env.as_ref().expect("env");
            assert!(!envs.iter().any(|e| e.name.starts_with("IM_CONNECTORS")));
            let vols = p.spec.as_ref().and_then(|s| s.volumes.as_ref()).expect("v");
            assert!(vols.iter().all(|v| v.persistent_volume_claim.is_none()));
            assert!(container(&p)
                .volume_mounts
                .iter()
                .flatten()
                .all(|m| !m.name.starts_with("drop-")));
        }
    }

    #[test]
    fn adding_a_drop_folder_changes_the_pod_hash() {
        let imc = cluster("im", "prod");
        let names = Names::of(&imc);
        let h1 = hash_of(&build_pod(&imc, &names, "im-a").metadata).map(str::to_string);
        let h2 = hash_of(&build_pod(&with_drops(NodeOs::Windows), &names, "im-a").metadata)
            .map(str::to_string);
        assert_ne!(h1, h2);
    }

    #[test]
    fn label_safe_versions() {
        assert_eq!(label_safe("1.2.3+build.5"), "1.2.3_build.5");
        assert_eq!(label_safe("v1"), "v1");
    }
}
