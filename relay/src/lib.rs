//! IdentityMesh relay agent: connects out to the server's SignalR hub over TLS, resolving the
//! server name on every attempt, and serves server→relay invocations (directory reads).
pub mod agent;
pub mod backoff;
pub mod config;
pub mod connect;
pub mod directory;
pub mod endpoint;
pub mod handlers;
pub mod session;
pub mod tls;

/// Sent as User-Agent so the server can list relay versions.
pub const USER_AGENT: &str = concat!("identitymesh-relay/", env!("CARGO_PKG_VERSION"));
