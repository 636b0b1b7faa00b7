//! Annotations on an `IdentityMeshCluster` that ask the operator for something.

/// A planned switchover: the value is the pod to promote, or `standby` for whichever pod is the
/// standby. The operator removes it once the request is carried out or refused.
pub const SWITCHOVER: &str = "identitymesh.io/switchover";
