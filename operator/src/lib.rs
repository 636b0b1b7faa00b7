//! IdentityMesh operator: reconciles an `IdentityMeshCluster` into an active and a standby server
//! pod, the Services that reach them, their certificates and key ring, and cuts over between them
//! (planned switchover, automatic failover, upgrades) with fencing epochs.

pub mod admission_cases;
pub mod builders;
pub mod certs;
#[cfg(test)]
mod chart_rbac;
pub mod checks;
pub mod conditions;
pub mod controller;
pub mod crd;
pub mod cutover;
pub use identitymesh_keyring as keyring;
pub mod leader;
pub mod metrics;
pub mod observe;
pub mod podclient;
pub mod refusals;
