//! What every request handler shares, the Admin API's and the Admin UI's alike: the engine,
//! the authenticator, the sync engine, the hub and the browser sessions. Its own module so the
//! UI (which the API router mounts) and the API both depend on it, not on each other.

use std::path::PathBuf;
use std::sync::Arc;

use crate::auth::Authenticator;
use crate::engine::Engine;

#[derive(Clone)]
pub struct AppState {
    pub engine: Arc<Engine>,
    pub auth: Arc<Authenticator>,
    pub licence_file: Option<PathBuf>,
    /// The relay hub, to disconnect a revoked relay at once.
    pub hub: Option<identitymesh_signalr::hub::HubHandle>,
    /// Connector runs, schedules, secrets (absent in tests of the bare API).
    pub sync: Option<Arc<crate::sync::runner::SyncEngine>>,
    /// Browser sessions sealed with the key ring's cookie keys (absent: bearer tokens only).
    pub sessions: Option<Arc<crate::session::Sessions>>,
}
