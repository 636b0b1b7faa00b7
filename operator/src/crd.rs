//! The `IdentityMeshCluster` custom resource (identitymesh.io/v1alpha1).
//!
//! The schema comes from these types (schemars); what a schema cannot express is added as CEL
//! `x-kubernetes-validations` so the apiserver rejects bad resources at admission, with messages
//! that say what to change.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

mod pod_fields;

pub const GROUP: &str = "identitymesh.io";
pub const VERSION: &str = "v1alpha1";
pub const KIND: &str = "IdentityMeshCluster";

/// Desired state of an active/standby IdentityMesh server pair.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "identitymesh.io",
    version = "v1alpha1",
    kind = "IdentityMeshCluster",
    plural = "identitymeshclusters",
    singular = "identitymeshcluster",
    shortname = "imc",
    namespaced,
    status = "IdentityMeshClusterStatus",
    derive = "PartialEq",
    doc = "An active/standby pair of IdentityMesh servers with automatic failover",
    printcolumn(name = "Active", type_ = "string", json_path = ".status.activePod"),
    printcolumn(name = "Standby", type_ = "string", json_path = ".status.standbyPod"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Epoch", type_ = "integer", json_path = ".status.epoch", priority = "1"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.metadata.name.size() <= 40 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')")
        .message("metadata.name must be a DNS label of at most 40 characters starting with a letter: Pods <name>-a/-b and Services <name>, <name>-pods are derived from it"),
    validation = Rule::new("!self.metadata.name.endsWith('-pods')")
        .message("metadata.name must not end in -pods: <name>-pods is the headless Service of the cluster named <name>, so this cluster's client Service would collide with it"),
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.cutoverTimeoutSeconds) || !has(self.drainTimeoutSeconds) || self.cutoverTimeoutSeconds > self.drainTimeoutSeconds").message("cutoverTimeoutSeconds must be greater than drainTimeoutSeconds: the cutover bound includes the demote step, which may use the whole drain bound"))]
#[x_kube(validation = Rule::new("!has(self.nodeSelector) || ['kubernetes.io/os', 'beta.kubernetes.io/os'].all(k, !(k in self.nodeSelector) || self.nodeSelector[k] == (has(self.nodeOS) ? self.nodeOS : 'windows'))").message("nodeSelector kubernetes.io/os contradicts nodeOS: leave it out (the operator sets it from nodeOS) or change nodeOS"))]
pub struct IdentityMeshClusterSpec {
    /// Server version; also the image tag (letters, digits, '_', '.', '-'; no '+': an image tag
    /// cannot hold it).
    #[schemars(length(min = 1, max = 128), pattern(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"))]
    pub version: String,

    /// Server image (repository, pull policy, pull secrets); the tag is `version`.
    #[serde(default)]
    pub image: ImageSpec,

    /// Operating system of the nodes the server pods run on. Linux is for development clusters.
    #[serde(default, rename = "nodeOS")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("nodeOS is immutable: create a new IdentityMeshCluster to move to another OS"))]
    pub node_os: NodeOs,

    /// Extra node selector terms, merged over `kubernetes.io/os` (node label keys and values).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[x_kube(validation = Rule::new(pod_fields::NODE_SELECTOR_KEYS_RULE).message(pod_fields::NODE_SELECTOR_KEYS_MESSAGE))]
    #[x_kube(validation = Rule::new(pod_fields::NODE_SELECTOR_VALUES_RULE).message(pod_fields::NODE_SELECTOR_VALUES_MESSAGE))]
    pub node_selector: BTreeMap<String, String>,

    /// Tolerations for the server pods. Default on Windows: `node.kubernetes.io/os=windows:NoSchedule`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,

    /// Secret and key holding the database connection string.
    pub database: SecretKeyRef,

    /// Secret and key holding licence.json.
    pub licence: SecretKeyRef,

    /// OIDC settings for the Admin API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oidc: Option<OidcSpec>,

    /// Where the server keeps its secret-store keys.
    #[serde(default)]
    pub secret_provider: SecretProviderSpec,

    /// Serving certificate: operator-issued by default, or a user kubernetes.io/tls Secret.
    #[serde(default)]
    pub tls: TlsSpec,

    /// The client Service.
    #[serde(default)]
    pub service: ServiceSpec,

    /// Compute resources of the server container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Automatic or manual failover.
    #[serde(default)]
    pub failover: FailoverSpec,

    /// Bound for the in-flight batch when the active is demoted; past it the standby is promoted anyway.
    #[serde(default = "default_drain_timeout_seconds")]
    #[schemars(range(min = 1, max = 600))]
    pub drain_timeout_seconds: u32,

    /// How long a cutover may take until its target serves (from its start, so the drain is
    /// included); past it the cutover is reported `CutoverStalled` and rolled back to the old
    /// active when that can take the role back (10–3600 s, more than drainTimeoutSeconds).
    #[serde(default = "default_cutover_timeout_seconds")]
    #[schemars(range(min = 10, max = 3600))]
    pub cutover_timeout_seconds: u32,

    /// Stop reconciling (no pod changes, no cutovers) until set back to false.
    #[serde(default)]
    pub paused: bool,

    /// Folders CSV connectors may read: each a PersistentVolumeClaim (SMB, Azure Files, ...)
    /// mounted into both server pods under the drop area, and listed in the server's
    /// `connectors.csv_roots`. Empty: the servers run no CSV connectors (at most 16, names unique).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = Rule::new("self.all(f, self.exists_one(g, g.name == f.name))").message("csvDropFolders names must be unique: each folder is mounted at <drop area>/<name>"))]
    pub csv_drop_folders: Vec<CsvDropFolder>,
}

/// One CSV drop folder: a claim in the cluster's namespace, mounted at `<drop area>/<name>`
/// (`C:\identitymesh\drop\<name>` on Windows nodes, `/var/lib/identitymesh/drop/<name>` on Linux).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CsvDropFolder {
    /// Folder name in the pods; a DNS label (lower-case letters, digits, '-'), at most 40 characters.
    #[schemars(length(min = 1, max = 40))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message("csvDropFolders[].name must be a DNS label (lower-case letters, digits and '-', starting and ending with a letter or digit): it names the folder and the pod volume drop-<name>"))]
    pub name: String,
    /// The PersistentVolumeClaim holding the files, in the cluster's namespace.
    #[schemars(length(min = 1, max = 253), pattern(OBJECT_NAME))]
    pub claim_name: String,
    /// Mount read-only (the default): CSV connectors only read.
    #[serde(default = "default_true")]
    pub read_only: bool,
}

fn default_true() -> bool {
    true
}

fn default_drain_timeout_seconds() -> u32 {
    10
}

/// A minute: a healthy promote takes well under a second and the default drain 10 s, and the
/// outage runs while a promote is stuck (the old active is already demoted).
fn default_cutover_timeout_seconds() -> u32 {
    60
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ImageSpec {
    /// Image repository without tag or digest (`[registry[:port]/]path`); the operator appends
    /// `:<version>`.
    #[serde(default = "default_repository")]
    #[schemars(length(min = 1, max = 255))]
    #[x_kube(validation = Rule::new(REPOSITORY_RULE).message("image.repository must be an image repository without a tag or digest, e.g. registry.contoso.local:5000/identitymesh/server (lower-case path): the operator appends :<version>"))]
    pub repository: String,
    #[serde(default)]
    pub pull_policy: PullPolicy,
    /// Names of image pull Secrets in the cluster's namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 16),
        inner(length(min = 1, max = 253), pattern(OBJECT_NAME))
    )]
    pub pull_secrets: Vec<String>,
}

/// An image name as the container runtimes parse it (distribution/reference): an optional
/// registry host (DNS components, optional port) and a '/', then lower-case path components
/// separated by '/', each of alphanumerics joined by '.', '_', '__' or runs of '-'. No tag, no
/// digest: ':' only in the registry port, '@' nowhere.
const REPOSITORY_RULE: &str = concat!(
    "self.matches('^(",
    "([a-zA-Z0-9]|[a-zA-Z0-9][-a-zA-Z0-9]*[a-zA-Z0-9])([.]([a-zA-Z0-9]|[a-zA-Z0-9][-a-zA-Z0-9]*[a-zA-Z0-9]))*",
    "(:[0-9]+)?/)?",
    "[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*",
    "(/[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*)*$')"
);

fn default_repository() -> String {
    "identitymesh/server".into()
}

impl Default for ImageSpec {
    fn default() -> Self {
        Self {
            repository: default_repository(),
            pull_policy: PullPolicy::default(),
            pull_secrets: Vec::new(),
        }
    }
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PullPolicy {
    Always,
    #[default]
    IfNotPresent,
    Never,
}

impl PullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum NodeOs {
    #[default]
    Windows,
    Linux,
}

impl NodeOs {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeOs::Windows => "windows",
            NodeOs::Linux => "linux",
        }
    }
}

/// A key in a Secret in the cluster's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SecretKeyRef {
    /// Secret name.
    #[schemars(length(min = 1, max = 253), pattern(OBJECT_NAME))]
    pub name: String,
    /// Key inside the Secret's data (letters, digits, '-', '_' and '.'; not '.', not starting
    /// with '..').
    #[schemars(length(min = 1, max = 253), pattern(r"^[-._a-zA-Z0-9]+$"))]
    #[x_kube(validation = Rule::new("self != '.' && !self.startsWith('..')").message("a Secret key must not be '.' nor start with '..': no Secret can hold such a key (use the key's name in the Secret's data, e.g. connectionString)"))]
    pub key: String,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.jwksUrl) || self.jwksUrl.startsWith('https://')").message("oidc.jwksUrl must be an https:// URL"))]
pub struct OidcSpec {
    /// Token issuer; must be https.
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("self.startsWith('https://')").message("oidc.issuer must be an https:// URL"))]
    pub issuer: String,
    #[schemars(length(min = 1, max = 512))]
    pub audience: String,
    /// JWKS endpoint; discovered from the issuer when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    pub jwks_url: Option<String>,
    /// Claim holding permission strings or roles.
    #[serde(default = "default_permissions_claim")]
    #[schemars(length(min = 1, max = 256))]
    pub permissions_claim: String,
    /// The Admin UI's client at the provider: set, operators sign in to the UI there
    /// (authorization code flow with PKCE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ui: Option<OidcUiSpec>,
    /// A ConfigMap key with PEM certificates to trust for the issuer (discovery, keys, token
    /// endpoint), for a provider with a private CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<ConfigMapKeyRef>,
}

/// The Admin UI's OIDC client.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct OidcUiSpec {
    /// The client id registered at the provider.
    #[schemars(length(min = 1, max = 256))]
    pub client_id: String,
    /// The client secret of a confidential client (none: a public client).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<SecretKeyRef>,
    /// This cluster's `/auth/callback` as registered at the provider, through the client
    /// Service's external name, e.g. https://im.contoso.local/auth/callback.
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("self.startsWith('https://') && self.endsWith('/auth/callback')").message("oidc.ui.redirectUrl must be an https:// URL ending in /auth/callback"))]
    pub redirect_url: String,
}

/// A key of a ConfigMap in the cluster's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapKeyRef {
    /// ConfigMap name.
    #[schemars(length(min = 1, max = 253), pattern(OBJECT_NAME))]
    pub name: String,
    /// Key inside the ConfigMap's data.
    #[schemars(length(min = 1, max = 253), pattern(r"^[-._a-zA-Z0-9]+$"))]
    #[x_kube(validation = Rule::new("self != '.' && !self.startsWith('..')").message("a ConfigMap key must not be '.' nor start with '..'"))]
    pub key: String,
}

fn default_permissions_claim() -> String {
    "permissions".into()
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.type == 'AzureKeyVault' ? has(self.azureKeyVault) : !has(self.azureKeyVault)").message("secretProvider.azureKeyVault is required when type is AzureKeyVault and not allowed otherwise"))]
pub struct SecretProviderSpec {
    #[serde(default, rename = "type")]
    pub type_: SecretProviderType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure_key_vault: Option<AzureKeyVaultSpec>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SecretProviderType {
    /// A key ring in a Kubernetes Secret, generated by the operator and mounted by both pods.
    #[default]
    KubernetesKeyRing,
    AzureKeyVault,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AzureKeyVaultSpec {
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("self.startsWith('https://')").message("azureKeyVault.vaultUrl must be an https:// URL"))]
    pub vault_url: String,
    #[schemars(length(min = 1, max = 64))]
    pub client_id: String,
    #[schemars(length(min = 1, max = 64))]
    pub tenant_id: String,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.operator) && has(self.secretName))").message("set exactly one TLS source: tls.operator (operator-issued, the default) or tls.secretName (your kubernetes.io/tls Secret), not both"))]
pub struct TlsSpec {
    /// Extra DNS names for the serving certificate (e.g. im.contoso.local).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 253), pattern(DNS_NAME)))]
    pub dns_names: Vec<String>,
    /// Operator-issued certificate settings (used when secretName is unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<OperatorIssuerSpec>,
    /// A kubernetes.io/tls Secret you manage (e.g. cert-manager); the operator does not renew it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), pattern(OBJECT_NAME))]
    pub secret_name: Option<String>,
}

impl TlsSpec {
    /// The operator issuer settings in force, or None when the user supplies the Secret.
    pub fn operator_issuer(&self) -> Option<OperatorIssuerSpec> {
        match (&self.secret_name, &self.operator) {
            (Some(_), _) => None,
            (None, Some(op)) => Some(op.clone()),
            (None, None) => Some(OperatorIssuerSpec::default()),
        }
    }
}

/// A DNS-1123 subdomain: the name of a Secret or a PersistentVolumeClaim (at most 253
/// characters; dot-separated labels, none empty).
const OBJECT_NAME: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// A DNS name for the certificate: labels of at most 63 characters, optionally a wildcard.
const DNS_NAME: &str =
    r"^(\*\.)?[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*$";

const GO_DURATION: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$";

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("duration(self.renewBefore) < duration(self.duration)").message("tls.operator.renewBefore must be shorter than tls.operator.duration"))]
pub struct OperatorIssuerSpec {
    /// Certificate lifetime (Go duration, e.g. 2160h); at least 1h.
    #[serde(default = "default_cert_duration")]
    #[schemars(length(min = 2, max = 32), pattern(GO_DURATION))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1h')").message("tls.operator.duration must be at least 1h"))]
    pub duration: String,
    /// Renew this long before expiry (Go duration, e.g. 360h); at least 5m.
    #[serde(default = "default_renew_before")]
    #[schemars(length(min = 2, max = 32), pattern(GO_DURATION))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('5m')").message("tls.operator.renewBefore must be at least 5m"))]
    pub renew_before: String,
}

fn default_cert_duration() -> String {
    "2160h".into()
}
fn default_renew_before() -> String {
    "360h".into()
}

impl Default for OperatorIssuerSpec {
    fn default() -> Self {
        Self {
            duration: default_cert_duration(),
            renew_before: default_renew_before(),
        }
    }
}

impl OperatorIssuerSpec {
    /// Parsed (duration, renewBefore). Errors name the field.
    pub fn parsed(&self) -> Result<(std::time::Duration, std::time::Duration), String> {
        let d = parse_go_duration(&self.duration)
            .map_err(|e| format!("tls.operator.duration {:?}: {e}", self.duration))?;
        let r = parse_go_duration(&self.renew_before)
            .map_err(|e| format!("tls.operator.renewBefore {:?}: {e}", self.renew_before))?;
        if r >= d {
            return Err(
                "tls.operator.renewBefore must be shorter than tls.operator.duration".into(),
            );
        }
        Ok((d, r))
    }
}

/// Parse a Go-style duration ("2160h", "1h30m"), as the apiserver's CEL `duration()` does.
pub fn parse_go_duration(s: &str) -> Result<std::time::Duration, String> {
    let d: kube::core::Duration = s.parse().map_err(|e| format!("{e}"))?;
    if d.is_negative() {
        return Err("must not be negative".into());
    }
    Ok(d.into())
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    /// Client port (targets the pods' https port 8443).
    #[serde(default = "default_service_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Annotations of the client Service (e.g. for a cloud load balancer).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[x_kube(validation = Rule::new(pod_fields::ANNOTATION_KEYS_RULE).message(pod_fields::ANNOTATION_KEYS_MESSAGE))]
    pub annotations: BTreeMap<String, String>,
}

fn default_service_port() -> i32 {
    443
}

impl Default for ServiceSpec {
    fn default() -> Self {
        Self {
            type_: ServiceType::default(),
            port: default_service_port(),
            annotations: BTreeMap::new(),
        }
    }
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

impl ServiceType {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct FailoverSpec {
    /// Automatic: promote the standby when the active is unhealthy; Manual: report
    /// FailoverRequired and wait. Either way, a cordon of the active's node (kubectl drain)
    /// starts a planned switchover (reason NodeDrain) to a standby ready on a schedulable node.
    #[serde(default)]
    pub policy: FailoverPolicy,
    /// How long the active must be unhealthy before the standby is promoted (1–3600 s).
    #[serde(default = "default_unhealthy_after")]
    #[schemars(range(min = 1, max = 3600))]
    pub unhealthy_after_seconds: u32,
}

fn default_unhealthy_after() -> u32 {
    10
}

impl Default for FailoverSpec {
    fn default() -> Self {
        Self {
            policy: FailoverPolicy::default(),
            unhealthy_after_seconds: default_unhealthy_after(),
        }
    }
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FailoverPolicy {
    /// Promote the standby by itself when the active is unhealthy.
    #[default]
    Automatic,
    /// Report (condition FailoverRequired) and wait for a switchover request.
    Manual,
}

// ---------------------------------------------------------------------------------------------
// Status

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct IdentityMeshClusterStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby_pod: Option<String>,
    /// Highest fencing epoch the operator has issued.
    #[serde(default)]
    pub epoch: i64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instances: Vec<InstanceStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition: Option<TransitionRecord>,
    /// A cutover in progress. Written before each step is acted on, so a restarted operator
    /// resumes it with the same epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cutover: Option<CutoverIntent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_expiry: Option<CertificateExpiry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Pending,
    Provisioning,
    Running,
    SwitchingOver,
    FailingOver,
    Upgrading,
    Degraded,
    FailoverRequired,
    Paused,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Provisioning => "Provisioning",
            Phase::Running => "Running",
            Phase::SwitchingOver => "SwitchingOver",
            Phase::FailingOver => "FailingOver",
            Phase::Upgrading => "Upgrading",
            Phase::Degraded => "Degraded",
            Phase::FailoverRequired => "FailoverRequired",
            Phase::Paused => "Paused",
        }
    }
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Active,
    Standby,
    Unknown,
}

/// The role an instance reports on the internal API; a fenced instance is neither.
impl From<identitymesh_contract::internal::Role> for Role {
    fn from(r: identitymesh_contract::internal::Role) -> Role {
        use identitymesh_contract::internal::Role as Wire;
        match r {
            Wire::Active => Role::Active,
            Wire::Standby => Role::Standby,
            Wire::Fenced | Wire::Unknown => Role::Unknown,
        }
    }
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct InstanceStatus {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub ready: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    pub role: Role,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CutoverKind {
    /// First promotion of a new cluster.
    Initial,
    Switchover,
    Failover,
    Upgrade,
}

impl CutoverKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CutoverKind::Initial => "Initial",
            CutoverKind::Switchover => "Switchover",
            CutoverKind::Failover => "Failover",
            CutoverKind::Upgrade => "Upgrade",
        }
    }
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TransitionRecord {
    pub kind: CutoverKind,
    pub from: String,
    pub to: String,
    pub reason: String,
    pub started: Time,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_seconds: Option<f64>,
    /// Succeeded, or why not (e.g. VerificationFailed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    pub epoch: i64,
}

/// Steps of a cutover, in the order a planned switchover takes them.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CutoverStep {
    Demoting,
    Promoting,
    Swinging,
    Verifying,
    Replacing,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CutoverIntent {
    pub kind: CutoverKind,
    pub step: CutoverStep,
    /// The pod being replaced as active.
    pub from: String,
    /// The pod being promoted.
    pub target: String,
    /// The epoch the target is promoted with.
    pub epoch: i64,
    pub reason: String,
    pub started: Time,
    pub step_started: Time,
    /// When verification passed (the outage is over), before any replacement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<Time>,
    /// Set when the cutover overran spec.cutoverTimeoutSeconds before its target served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stalled: Option<StallRecord>,
}

/// A cutover that overran its bound, and what the operator did about it.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StallRecord {
    pub at: Time,
    /// The step it was stuck in and the pod that could not be made active.
    pub step: CutoverStep,
    pub target: String,
    /// The role went back to the old active (with a new epoch); otherwise the operator keeps
    /// trying the target.
    pub rolled_back: bool,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CertificateExpiry {
    pub not_after: Time,
    /// Name of the Secret holding the serving certificate.
    pub secret_name: String,
}

/// The CRD as installed: the derived one plus a length bound on metadata.name, and the rules and
/// bounds on the pod fields typed with k8s-openapi structs (see pod_fields). The bound keeps
/// the apiserver's CEL cost estimate of the name rule small (an unbounded string is costed at the
/// maximum request size), and names longer than 40 would make invalid derived names anyway.
pub fn crd() -> CustomResourceDefinition {
    let mut crd = IdentityMeshCluster::crd();
    for v in &mut crd.spec.versions {
        if let Some(schema) = v
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        {
            if let Some(spec) = schema.properties.as_mut().and_then(|p| p.get_mut("spec")) {
                pod_fields::add_rules(spec);
            }
            let props = schema.properties.get_or_insert_with(BTreeMap::new);
            props.insert(
                "metadata".to_string(),
                JSONSchemaProps {
                    type_: Some("object".into()),
                    properties: Some(BTreeMap::from([(
                        "name".to_string(),
                        JSONSchemaProps {
                            type_: Some("string".into()),
                            max_length: Some(40),
                            ..Default::default()
                        },
                    )])),
                    ..Default::default()
                },
            );
        }
    }
    crd
}

/// The CRD as YAML, as `identitymesh-operator crd` prints it and crds/ holds it.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(&crd())
}

/// File name of the generated CRD under crds/.
pub const CRD_FILE: &str = "identitymeshclusters.identitymesh.io.yaml";

#[cfg(test)]
mod tests {
    use super::*;

    fn crd_json() -> serde_json::Value {
        serde_json::to_value(crd()).expect("crd serialises")
    }

    /// crds/ (and the chart's copy) must match the types. Regenerate with:
    /// `cargo run -p identitymesh-operator -- crd > crds/identitymeshclusters.identitymesh.io.yaml`
    /// `cp crds/identitymeshclusters.identitymesh.io.yaml charts/identitymesh-operator/crds/`
    #[test]
    fn crds_dir_is_fresh() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let generated = crd_yaml().expect("yaml");
        for dir in ["crds", "charts/identitymesh-operator/crds"] {
            let path = root.join(dir).join(CRD_FILE);
            let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                on_disk == generated,
                "{} is stale or missing. Regenerate with:\n  cargo run -p identitymesh-operator -- crd > crds/{CRD_FILE}\n  cp crds/{CRD_FILE} charts/identitymesh-operator/crds/",
                path.display(),
            );
        }
    }

    #[test]
    fn crd_names_and_columns() {
        let crd = crd();
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some("identitymeshclusters.identitymesh.io")
        );
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.short_names, Some(vec!["imc".to_string()]));
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, "v1alpha1");
        let cols: Vec<_> = v
            .additional_printer_columns
            .as_ref()
            .expect("columns")
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        for want in ["Active", "Standby", "Phase", "Age"] {
            assert!(cols.contains(&want), "missing column {want}");
        }
        assert!(v
            .subresources
            .as_ref()
            .and_then(|s| s.status.as_ref())
            .is_some());
    }

    fn rules(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(serde_json::Value::Array(rs)) = m.get("x-kubernetes-validations") {
                    for r in rs {
                        if let Some(s) = r.get("rule").and_then(|s| s.as_str()) {
                            out.push(s.to_string());
                        }
                    }
                }
                m.values().for_each(|x| rules(x, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| rules(x, out)),
            _ => {}
        }
    }

    #[test]
    fn cel_rules_are_present() {
        let mut rs = Vec::new();
        rules(&crd_json(), &mut rs);
        for needle in [
            "duration(self.renewBefore) < duration(self.duration)",
            "!(has(self.operator) && has(self.secretName))",
            "self.metadata.name.size() <= 40",
            "self == oldSelf",
            "has(self.azureKeyVault)",
            "self.cutoverTimeoutSeconds > self.drainTimeoutSeconds",
            "!self.metadata.name.endsWith('-pods')",
            "self.all(f, self.exists_one(g, g.name == f.name))",
            "self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')",
            REPOSITORY_RULE,
            "self.nodeSelector[k] == (has(self.nodeOS) ? self.nodeOS : 'windows')",
            pod_fields::NODE_SELECTOR_KEYS_RULE,
            pod_fields::NODE_SELECTOR_VALUES_RULE,
            pod_fields::ANNOTATION_KEYS_RULE,
            "self != '.' && !self.startsWith('..')",
        ]
        .into_iter()
        .chain(pod_fields::TOLERATION_RULES.iter().map(|(r, _)| *r))
        .chain(pod_fields::resource_rules().into_iter().map(|(r, _)| r))
        {
            assert!(
                rs.iter().any(|r| r.contains(needle)),
                "missing CEL rule {needle}: {rs:?}"
            );
        }
    }

    #[test]
    fn schema_is_structural_enough() {
        // The apiserver refuses oneOf/anyOf with types inside and $ref; none may remain.
        let s = serde_json::to_string(&crd_json()).expect("json");
        assert!(!s.contains("\"$ref\""), "schema contains $ref");
        assert!(!s.contains("\"$defs\""), "schema contains $defs");
    }

    #[test]
    fn defaults_from_minimal_spec() {
        let spec: IdentityMeshClusterSpec = serde_json::from_value(serde_json::json!({
            "version": "1.2.3",
            "database": {"name": "db", "key": "connectionString"},
            "licence": {"name": "lic", "key": "licence.json"}
        }))
        .expect("minimal spec");
        assert_eq!(spec.node_os, NodeOs::Windows);
        assert_eq!(spec.failover.policy, FailoverPolicy::Automatic);
        assert_eq!(spec.failover.unhealthy_after_seconds, 10);
        assert_eq!(spec.drain_timeout_seconds, 10);
        assert_eq!(spec.cutover_timeout_seconds, 60);
        assert_eq!(spec.service.port, 443);
        assert_eq!(
            spec.secret_provider.type_,
            SecretProviderType::KubernetesKeyRing
        );
        assert_eq!(
            spec.tls.operator_issuer(),
            Some(OperatorIssuerSpec::default())
        );
        assert!(!spec.paused);
        assert!(spec.csv_drop_folders.is_empty());
        // Absent stays absent: a cluster without drop folders serialises as before.
        let v = serde_json::to_value(&spec).expect("json");
        assert!(v.get("csvDropFolders").is_none(), "{v}");
    }

    #[test]
    fn go_durations() {
        assert_eq!(
            parse_go_duration("2160h"),
            Ok(std::time::Duration::from_secs(2160 * 3600))
        );
        assert_eq!(
            parse_go_duration("1h30m"),
            Ok(std::time::Duration::from_secs(5400))
        );
        assert!(parse_go_duration("10").is_err());
        assert!(parse_go_duration("-1h").is_err());
        let bad = OperatorIssuerSpec {
            duration: "1h".into(),
            renew_before: "2h".into(),
        };
        assert!(bad.parsed().is_err());
        assert!(OperatorIssuerSpec::default().parsed().is_ok());
    }

    #[test]
    fn user_tls_secret_disables_operator_issuer() {
        let tls = TlsSpec {
            secret_name: Some("mine".into()),
            ..Default::default()
        };
        assert_eq!(tls.operator_issuer(), None);
    }
}
