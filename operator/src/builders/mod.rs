//! Pure builders: every object the operator owns, computed from the cluster resource alone (plus
//! what it observed). No client here, so each is unit-tested on plain structs.

pub mod config;
pub mod disruption;
pub mod pod;
pub mod secret;
pub mod service;

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::crd::{IdentityMeshCluster, NodeOs};

pub const LABEL_CLUSTER: &str = "identitymesh.io/cluster";
pub const LABEL_INSTANCE: &str = "identitymesh.io/instance";
pub const LABEL_VERSION: &str = "identitymesh.io/version";
pub use identitymesh_contract::annotations::SWITCHOVER as ANNOTATION_SWITCHOVER;
/// Hash of the desired object; equal hash means nothing to write (steady state makes no writes).
pub const ANNOTATION_SPEC_HASH: &str = "identitymesh.io/spec-hash";
pub const FIELD_MANAGER: &str = "identitymesh-operator";
pub const FINALIZER: &str = "identitymesh.io/cleanup";

pub const HTTPS_PORT: i32 = 8443;
pub const INTERNAL_PORT: i32 = 9443;

/// The two instance slots. Names are stable so status, DNS and the selector can refer to them.
pub const SLOTS: [&str; 2] = ["a", "b"];

/// Names of everything derived from one cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    pub cluster: String,
    pub namespace: String,
}

impl Names {
    pub fn new(cluster: &str, namespace: &str) -> Self {
        Self {
            cluster: cluster.to_string(),
            namespace: namespace.to_string(),
        }
    }

    pub fn of(imc: &IdentityMeshCluster) -> Self {
        Self::new(
            &imc.name_any(),
            imc.namespace().as_deref().unwrap_or("default"),
        )
    }

    pub fn pod(&self, slot: &str) -> String {
        format!("{}-{}", self.cluster, slot)
    }
    pub fn pods(&self) -> [String; 2] {
        [self.pod(SLOTS[0]), self.pod(SLOTS[1])]
    }
    /// The other pod of the pair, if `pod` is one of ours.
    pub fn peer(&self, pod: &str) -> Option<String> {
        let [a, b] = self.pods();
        if pod == a {
            Some(b)
        } else if pod == b {
            Some(a)
        } else {
            None
        }
    }
    pub fn client_service(&self) -> String {
        self.cluster.clone()
    }
    /// The PodDisruptionBudget covering the active pod.
    pub fn disruption_budget(&self) -> String {
        self.cluster.clone()
    }
    pub fn headless_service(&self) -> String {
        format!("{}-pods", self.cluster)
    }
    pub fn config_map(&self) -> String {
        format!("{}-config", self.cluster)
    }
    /// ConfigMap with the CA's public certificate (what pods mount).
    pub fn ca_config_map(&self) -> String {
        format!("{}-ca", self.cluster)
    }
    /// Secret with the CA key: read by the operator only, never mounted.
    pub fn ca_secret(&self) -> String {
        format!("{}-ca", self.cluster)
    }
    pub fn operator_tls_secret(&self) -> String {
        format!("{}-tls", self.cluster)
    }
    pub fn keyring_secret(&self) -> String {
        format!("{}-keyring", self.cluster)
    }
    /// DNS names clients use for the client Service.
    pub fn service_dns_names(&self) -> Vec<String> {
        let s = self.client_service();
        let ns = &self.namespace;
        vec![
            s.clone(),
            format!("{s}.{ns}"),
            format!("{s}.{ns}.svc"),
            format!("{s}.{ns}.svc.cluster.local"),
        ]
    }
    /// Per-pod DNS name through the headless Service (pods set hostname + subdomain).
    pub fn pod_dns_name(&self, pod: &str) -> String {
        format!("{pod}.{}.{}.svc", self.headless_service(), self.namespace)
    }
    pub fn pod_dns_names(&self) -> Vec<String> {
        let mut v = Vec::new();
        for p in self.pods() {
            let short = format!("{p}.{}.{}.svc", self.headless_service(), self.namespace);
            v.push(format!("{short}.cluster.local"));
            v.push(short);
        }
        v
    }
}

/// Labels every owned object carries.
pub fn common_labels(names: &Names) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "identitymesh".to_string(),
        ),
        (
            "app.kubernetes.io/instance".to_string(),
            names.cluster.clone(),
        ),
        (
            "app.kubernetes.io/managed-by".to_string(),
            "identitymesh-operator".to_string(),
        ),
        (LABEL_CLUSTER.to_string(), names.cluster.clone()),
    ])
}

/// Controller owner reference so garbage collection removes everything with the cluster.
pub fn owner_ref(imc: &IdentityMeshCluster) -> Option<OwnerReference> {
    imc.controller_owner_ref(&())
}

/// Who holds an existing object the operator would write under one of its derived names, when
/// it is not this cluster (None: ours, write it). An object without our owner reference is left
/// alone even if it carries our labels: it is another cluster's, a user's, or orphaned on
/// purpose (`--cascade=orphan`); taking it over would have two writers fighting over it.
pub fn foreign_owner(live: &ObjectMeta, imc: &IdentityMeshCluster) -> Option<String> {
    let ours = imc.metadata.uid.as_deref();
    let refs = live.owner_references.as_deref().unwrap_or_default();
    if refs.iter().any(|r| Some(r.uid.as_str()) == ours) {
        return None;
    }
    let owner = refs
        .iter()
        .find(|r| r.controller == Some(true))
        .or(refs.first());
    Some(match owner {
        Some(o) => format!("{} {}", o.kind, o.name),
        None => match live
            .managed_fields
            .as_deref()
            .unwrap_or_default()
            .iter()
            .find_map(|m| m.manager.as_deref())
        {
            Some(m) => format!("no owner (written by {m})"),
            None => "no owner".to_string(),
        },
    })
}

pub(crate) fn meta(imc: &IdentityMeshCluster, names: &Names, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(names.namespace.clone()),
        labels: Some(common_labels(names)),
        owner_references: owner_ref(imc).map(|o| vec![o]),
        ..Default::default()
    }
}

/// Paths inside the server container. Windows form on Windows nodes; the harness remaps them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Paths {
    pub config_dir: String,
    pub config_file: String,
    pub tls_dir: String,
    pub cert_file: String,
    pub key_file: String,
    pub ca_dir: String,
    pub ca_file: String,
    pub licence_dir: String,
    pub licence_file: String,
    pub keyring_dir: String,
    pub keyring_file: String,
    /// The UI client's secret and the issuer's CA (spec.oidc.ui.clientSecret, spec.oidc.ca).
    pub oidc_client_dir: String,
    pub oidc_client_secret_file: String,
    pub oidc_ca_dir: String,
    pub oidc_ca_file: String,
    pub data_dir: String,
    /// Where CSV drop folders are mounted, one sub-folder each (`<drop_dir><sep><name>`). Beside
    /// the data directory rather than inside it: the data volume is an emptyDir, and a volume
    /// mounted inside another one is an ordering hazard on Windows nodes.
    pub drop_dir: String,
    /// The path separator of the node OS.
    pub sep: &'static str,
    /// The PATH-list separator of the node OS (what `std::env::split_paths` splits on there).
    pub list_sep: &'static str,
}

impl Paths {
    pub fn for_os(os: NodeOs) -> Self {
        let (root, data, drop, sep, list_sep) = match os {
            NodeOs::Windows => (
                "C:\\identitymesh",
                "C:\\identitymesh\\data".to_string(),
                "C:\\identitymesh\\drop".to_string(),
                "\\",
                ";",
            ),
            NodeOs::Linux => (
                "/etc/identitymesh",
                "/var/lib/identitymesh/data".to_string(),
                "/var/lib/identitymesh/drop".to_string(),
                "/",
                ":",
            ),
        };
        let dir = |d: &str| format!("{root}{sep}{d}");
        let file = |d: &str, f: &str| format!("{root}{sep}{d}{sep}{f}");
        Self {
            config_dir: dir("config"),
            config_file: file("config", "server.toml"),
            tls_dir: dir("tls"),
            cert_file: file("tls", "tls.crt"),
            key_file: file("tls", "tls.key"),
            ca_dir: dir("ca"),
            ca_file: file("ca", "ca.crt"),
            licence_dir: dir("licence"),
            licence_file: file("licence", "licence.json"),
            keyring_dir: dir("keyring"),
            keyring_file: file("keyring", "keyring.json"),
            oidc_client_dir: dir("oidc-client"),
            oidc_client_secret_file: file("oidc-client", "client-secret"),
            oidc_ca_dir: dir("oidc-ca"),
            oidc_ca_file: file("oidc-ca", "ca.crt"),
            data_dir: data,
            drop_dir: drop,
            sep,
            list_sep,
        }
    }
}

/// Stable hash of a desired object, stored in ANNOTATION_SPEC_HASH.
pub fn spec_hash<T: Serialize>(obj: &T) -> String {
    // serde_json over BTreeMap-backed k8s types is deterministic.
    let bytes = serde_json::to_vec(obj).unwrap_or_default();
    let digest = Sha256::digest(&bytes);
    digest.iter().take(12).map(|b| format!("{b:02x}")).collect()
}

/// Stamp the hash of `meta`'s owner object into its annotations.
pub fn stamp_hash(meta: &mut ObjectMeta, hash: String) {
    meta.annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(ANNOTATION_SPEC_HASH.to_string(), hash);
}

/// The hash an existing object carries, if any.
pub fn hash_of(meta: &ObjectMeta) -> Option<&str> {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_SPEC_HASH))
        .map(String::as_str)
}

#[cfg(test)]
pub(crate) mod test_support {
    use crate::crd::{IdentityMeshCluster, IdentityMeshClusterSpec};

    pub fn cluster(name: &str, ns: &str) -> IdentityMeshCluster {
        let spec: IdentityMeshClusterSpec = serde_json::from_value(serde_json::json!({
            "version": "1.2.3",
            "database": {"name": "im-db", "key": "connectionString"},
            "licence": {"name": "im-licence", "key": "licence.json"},
            "tls": {"dnsNames": ["im.contoso.local"]},
            "oidc": {"issuer": "https://login.contoso.local/", "audience": "identitymesh"}
        }))
        .expect("spec");
        let mut imc = IdentityMeshCluster::new(name, spec);
        imc.metadata.namespace = Some(ns.to_string());
        imc.metadata.uid = Some("uid-1234".to_string());
        imc.metadata.generation = Some(1);
        imc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let n = Names::new("im", "prod");
        assert_eq!(n.pods(), ["im-a".to_string(), "im-b".to_string()]);
        assert_eq!(n.peer("im-a").as_deref(), Some("im-b"));
        assert_eq!(n.peer("im-b").as_deref(), Some("im-a"));
        assert_eq!(n.peer("other"), None);
        assert_eq!(
            n.service_dns_names(),
            vec!["im", "im.prod", "im.prod.svc", "im.prod.svc.cluster.local"]
        );
        assert_eq!(n.pod_dns_name("im-a"), "im-a.im-pods.prod.svc");
        assert!(n
            .pod_dns_names()
            .contains(&"im-b.im-pods.prod.svc.cluster.local".to_string()));
    }

    #[test]
    fn paths_follow_node_os() {
        let w = Paths::for_os(NodeOs::Windows);
        assert_eq!(w.config_file, "C:\\identitymesh\\config\\server.toml");
        assert_eq!(w.cert_file, "C:\\identitymesh\\tls\\tls.crt");
        let l = Paths::for_os(NodeOs::Linux);
        assert_eq!(l.config_file, "/etc/identitymesh/config/server.toml");
        assert_eq!(l.keyring_file, "/etc/identitymesh/keyring/keyring.json");
        assert!(l.data_dir.starts_with('/'));
        assert_eq!(w.drop_dir, "C:\\identitymesh\\drop");
        assert_eq!((w.sep, w.list_sep), ("\\", ";"));
        assert_eq!(l.drop_dir, "/var/lib/identitymesh/drop");
        assert_eq!((l.sep, l.list_sep), ("/", ":"));
    }

    #[test]
    fn hash_is_stable_and_sensitive() {
        let a = spec_hash(&serde_json::json!({"a": 1}));
        assert_eq!(a, spec_hash(&serde_json::json!({"a": 1})));
        assert_ne!(a, spec_hash(&serde_json::json!({"a": 2})));
        let mut m = ObjectMeta::default();
        stamp_hash(&mut m, a.clone());
        assert_eq!(hash_of(&m), Some(a.as_str()));
    }

    #[test]
    fn objects_owned_elsewhere_are_foreign() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;
        let imc = test_support::cluster("im", "prod");
        let mine = meta(&imc, &Names::of(&imc), "im-pods".into());
        assert_eq!(foreign_owner(&mine, &imc), None);
        let other = test_support::cluster("im-pods", "prod");
        let mut other = other.clone();
        other.metadata.uid = Some("uid-other".into());
        let theirs = meta(&other, &Names::of(&other), "im-pods".into());
        assert_eq!(
            foreign_owner(&theirs, &imc).as_deref(),
            Some("IdentityMeshCluster im-pods")
        );
        let user = ObjectMeta {
            name: Some("im-keyring".into()),
            managed_fields: Some(vec![ManagedFieldsEntry {
                manager: Some("kubectl-create".into()),
                ..Default::default()
            }]),
            ..Default::default()
        };
        assert_eq!(
            foreign_owner(&user, &imc).as_deref(),
            Some("no owner (written by kubectl-create)")
        );
        // Our labels alone do not make it ours.
        let orphan = ObjectMeta {
            labels: mine.labels.clone(),
            ..Default::default()
        };
        assert_eq!(foreign_owner(&orphan, &imc).as_deref(), Some("no owner"));
    }

    /// With the admission rule (no cluster name ends in -pods), two clusters in one namespace
    /// never derive the same name for objects of one kind.
    #[test]
    fn derived_names_of_two_clusters_never_collide() {
        let names = [
            "im",
            "im-a",
            "im-b",
            "im-ca",
            "im-tls",
            "im-config",
            "im-keyring",
            "x",
            "im-pod",
            "ims",
        ];
        let derived = |c: &str| {
            let n = Names::new(c, "prod");
            let [a, b] = n.pods();
            vec![
                ("Service", n.client_service()),
                ("Service", n.headless_service()),
                ("PodDisruptionBudget", n.disruption_budget()),
                ("Pod", a),
                ("Pod", b),
                ("ConfigMap", n.config_map()),
                ("ConfigMap", n.ca_config_map()),
                ("Secret", n.ca_secret()),
                ("Secret", n.operator_tls_secret()),
                ("Secret", n.keyring_secret()),
            ]
        };
        for x in names {
            for y in names.iter().filter(|y| **y != x) {
                for d in derived(x) {
                    assert!(!derived(y).contains(&d), "{x} and {y} both derive {d:?}");
                }
            }
        }
        // What the rule prevents:
        assert_eq!(
            Names::new("im-pods", "prod").client_service(),
            Names::new("im", "prod").headless_service()
        );
    }

    #[test]
    fn owner_reference_is_controller() {
        let imc = test_support::cluster("im", "prod");
        let o = owner_ref(&imc).expect("owner ref");
        assert_eq!(o.kind, "IdentityMeshCluster");
        assert_eq!(o.controller, Some(true));
        assert_eq!(o.uid, "uid-1234");
    }
}
