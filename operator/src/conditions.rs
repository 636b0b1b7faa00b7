//! The names of the IdentityMeshCluster's status conditions, written once: the controller's
//! status step sets them, the post-cutover checks (`crate::checks`) decide three of them.

/// True when the active serves and the standby is ready.
pub const READY_CONDITION: &str = "Ready";
/// True while spec.paused is set.
pub const PAUSED_CONDITION: &str = "Paused";
/// The Secrets the spec references exist and hold their keys.
pub const SECRETS_CONDITION: &str = "SecretsReady";
/// The CA and serving certificate are in place.
pub const CERTIFICATES_CONDITION: &str = "CertificatesReady";
/// The key ring Secret is valid.
pub const KEYRING_CONDITION: &str = "KeyRingReady";
/// The active's internal API answers.
pub const ACTIVE_LIVE_CONDITION: &str = "ActiveLive";
/// The active's pod is Ready.
pub const ACTIVE_READY_CONDITION: &str = "ActiveReady";
/// Exactly one instance reports active, and it is the recorded one.
pub const SINGLE_ACTIVE_CONDITION: &str = "SingleActive";
/// Both server pods exist.
pub const PODS_CREATED_CONDITION: &str = "PodsCreated";
/// The active is unhealthy and the failover policy is Manual.
pub const FAILOVER_REQUIRED_CONDITION: &str = "FailoverRequired";
/// The outcome of the last switchover request (accepted, rejected, refused during a cutover).
pub const SWITCHOVER_CONDITION: &str = "SwitchoverRequest";
/// True while an object under one of our derived names belongs to someone else.
pub const CONFLICT_CONDITION: &str = "Conflict";
/// Set while a cutover overruns spec.cutoverTimeoutSeconds, False once that cutover ended.
pub const STALLED_CONDITION: &str = "CutoverStalled";
/// True while the apiserver refuses an object built from the spec (400/422).
pub const SPEC_REJECTED_CONDITION: &str = "SpecRejected";
/// True while a server pod cannot start (image pull, invalid image, container config).
pub const POD_START_CONDITION: &str = "PodStartFailed";
/// The active's relays are connected (`crate::checks`).
pub const RELAYS_CONDITION: &str = "RelaysReconnected";
/// The canary sync after the last verified transition (`crate::checks`).
pub const CANARY_CONDITION: &str = "CanarySync";
/// The active serves the Admin UI and its sign-in (`crate::checks`).
pub const ADMIN_UI_CONDITION: &str = "AdminUiReady";
/// True while a server pod's node is cordoned; the reason says which (ActiveNodeCordoned,
/// StandbyNodeCordoned, BothNodesCordoned: no switchover possible, uncordon one). Absent otherwise.
pub const NODE_MAINTENANCE_CONDITION: &str = "NodeMaintenance";
