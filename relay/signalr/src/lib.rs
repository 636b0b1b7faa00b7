//! SignalR JSON hub protocol and a hub server for IdentityMesh relays.
pub mod hub;
pub mod protocol;
