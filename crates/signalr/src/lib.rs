//! SignalR JSON hub protocol (`protocol`) and, with the default `hub` feature, an axum hub
//! server for IdentityMesh relays (`hub`).
#[cfg(feature = "hub")]
pub mod auth_limit;
#[cfg(feature = "hub")]
pub mod hub;
pub mod protocol;
