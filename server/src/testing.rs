//! What in-crate tests build the same way: a migrated SQLite
//! store in a temporary folder, an engine on it, and a real sync engine (so a request a
//! permission must not reach is refused by its handler, not stopped by a missing engine).

use std::sync::Arc;

use crate::auth::Authenticator;
use crate::config::EngineConfig;
use crate::engine::Engine;
use crate::session::Sessions;
use crate::store::sqlite::SqliteStore;
use crate::store::Store;
use crate::sync::runner::SyncEngine;

use crate::api::AppState;

pub struct Parts {
    pub dir: tempfile::TempDir,
    pub store: Arc<dyn Store>,
    pub engine: Arc<Engine>,
}

/// A store and an engine named `instance` (standby until a test promotes it).
pub async fn parts(instance: &str) -> Parts {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(&dir.path().join("im.db")).await.unwrap());
    store.migrate().await.unwrap();
    let engine = Engine::new(
        store.clone(),
        instance.into(),
        format!("host-{instance}"),
        "1.2.3".into(),
        EngineConfig::default(),
    );
    Parts { dir, store, engine }
}

impl Parts {
    /// The state with `auth`, a sync engine whose secrets are sealed under `ring`, and
    /// `sessions` when browsers sign in.
    pub fn state(
        &self,
        auth: Arc<Authenticator>,
        ring: identitymesh_keyring::KeyRing,
        sessions: Option<Arc<Sessions>>,
    ) -> AppState {
        let secrets = crate::secrets::Secrets::new(self.store.clone(), ring);
        AppState {
            engine: self.engine.clone(),
            auth,
            licence_file: None,
            hub: None,
            sync: Some(SyncEngine::new(
                self.engine.clone(),
                secrets,
                None,
                identitymesh_connectors::roots::DropRoots::default(),
            )),
            sessions,
        }
    }
}
