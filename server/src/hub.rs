//! The relay hub inside the server: relay credentials checked against SQL, connection state
//! recorded per relay, and the hub open only while this instance is active. On demotion every
//! relay gets Close{allowReconnect: true} and re-resolves the Service to find the new active.

use std::sync::Arc;
use std::time::Duration;

use identitymesh_signalr::hub::{
    self, AuthError, ConnectionInfo, HubBackend, HubConfig, HubHandle, InvocationContext,
    RelayIdentity,
};
use serde_json::Value;
use tokio::sync::watch;

use crate::auth::hash_token;
use crate::engine::Engine;
use crate::store::{now_ms, Role, Store};

/// Relay credentials carry this prefix so they can never be mistaken for admin tokens.
pub const RELAY_TOKEN_PREFIX: &str = "imr_";

pub struct RelayBackend {
    engine: Arc<Engine>,
    /// Credentials found unknown or revoked lately: a repeated bad credential costs no lookup.
    refused: std::sync::Mutex<RefusedCredentials>,
}

impl RelayBackend {
    fn store(&self) -> &Arc<dyn Store> {
        self.engine.store()
    }
}

/// Hashes of credentials SQL refused, each remembered for a while (bounded). Only refusals are
/// kept: a valid credential is looked up every time, so a revocation takes effect at once.
/// A revoked credential never becomes valid again; an unknown one cannot become valid either
/// (credentials are random and issued with their relay), so remembering them is safe.
struct RefusedCredentials {
    ttl: Duration,
    capacity: usize,
    entries: std::collections::HashMap<String, (std::time::Instant, AuthError)>,
}

impl RefusedCredentials {
    fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            ttl,
            capacity,
            entries: std::collections::HashMap::new(),
        }
    }

    fn get(&self, hash: &str, now: std::time::Instant) -> Option<AuthError> {
        self.entries
            .get(hash)
            .filter(|(at, _)| now.duration_since(*at) < self.ttl)
            .map(|(_, e)| e.clone())
    }

    fn put(&mut self, hash: String, e: AuthError, now: std::time::Instant) {
        if self.entries.len() >= self.capacity {
            let ttl = self.ttl;
            self.entries
                .retain(|_, (at, _)| now.duration_since(*at) < ttl);
            if self.entries.len() >= self.capacity {
                // Still full of fresh refusals (a flood): start over rather than grow.
                self.entries.clear();
            }
        }
        self.entries.insert(hash, (now, e));
    }
}

impl HubBackend for RelayBackend {
    async fn authenticate(&self, bearer: &str) -> Result<RelayIdentity, AuthError> {
        if !bearer.starts_with(RELAY_TOKEN_PREFIX) {
            return Err(AuthError::Invalid(
                "not a relay credential; enrol the relay with a token from POST /api/relays".into(),
            ));
        }
        let hash = hash_token(bearer);
        let refused = || self.refused.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = refused().get(&hash, std::time::Instant::now()) {
            return Err(e);
        }
        let r = match self.store().relay_by_token_hash(&hash).await {
            Ok(Some(r)) if r.revoked_at_ms.is_some() => Err(AuthError::Revoked(format!(
                "relay `{}` was revoked; issue a new credential",
                r.name
            ))),
            Ok(Some(r)) => {
                return Ok(RelayIdentity {
                    relay_id: r.id,
                    name: r.name,
                })
            }
            Ok(None) => Err(AuthError::Invalid("unknown relay credential".into())),
            Err(e) => return Err(AuthError::Unavailable(e.to_string())),
        };
        if let Err(e) = &r {
            refused().put(hash, e.clone(), std::time::Instant::now());
        }
        r
    }

    async fn on_connected(&self, conn: &ConnectionInfo) {
        let version = conn.user_agent.clone().unwrap_or_default();
        if let Err(e) = self
            .store()
            .relay_connected(
                &conn.relay.relay_id,
                self.engine.instance(),
                &version,
                now_ms(),
            )
            .await
        {
            tracing::warn!(relay = %conn.relay.name, error = %e, "cannot record relay connection");
        }
        tracing::info!(relay = %conn.relay.name, connection = %conn.connection_id, "relay connected");
    }

    async fn on_disconnected(&self, conn: &ConnectionInfo, reason: &str) {
        if let Err(e) = self
            .store()
            .relay_disconnected(&conn.relay.relay_id, self.engine.instance(), now_ms())
            .await
        {
            tracing::warn!(relay = %conn.relay.name, error = %e, "cannot record relay disconnection");
        }
        tracing::info!(relay = %conn.relay.name, reason, "relay disconnected");
    }

    async fn handle_invocation(
        &self,
        _ctx: InvocationContext,
        target: String,
        _args: Vec<Value>,
    ) -> Result<Value, String> {
        match target.as_str() {
            // Lets a relay (and the tests) see which instance it reached.
            "GetServerInfo" => {
                let st = self.engine.status();
                Ok(serde_json::json!({
                    "instance": self.engine.instance(),
                    "role": st.role,
                    "epoch": st.epoch,
                    "version": self.engine.version(),
                }))
            }
            other => Err(format!("unknown hub method `{other}`")),
        }
    }
}

/// How long a stopping server waits for its relay connections to send their Close and end.
const CLOSE_DRAIN: Duration = Duration::from_secs(3);

/// Builds the hub routes and starts the task that follows the role and refreshes last-seen
/// times. The task ends once `stop` fired and the connections it closed have ended (at most
/// [`CLOSE_DRAIN`]): awaiting it before the process exits is what lets every relay read its
/// Close with allowReconnect instead of a dropped socket.
pub fn start<S: Clone + Send + Sync + 'static>(
    engine: Arc<Engine>,
    config: HubConfig,
    mut stop: watch::Receiver<bool>,
) -> (axum::Router<S>, HubHandle, tokio::task::JoinHandle<()>) {
    let backend = Arc::new(RelayBackend {
        engine: engine.clone(),
        refused: std::sync::Mutex::new(RefusedCredentials::new(Duration::from_secs(30), 4096)),
    });
    let (router, handle) = hub::router(backend, config);
    let mut roles = engine.subscribe();
    let h = handle.clone();
    let e = engine.clone();
    let task = tokio::spawn(async move {
        let mut seen = tokio::time::interval(Duration::from_secs(10));
        loop {
            let active = roles.borrow_and_update().role == Role::Active;
            if h.is_accepting() != active {
                h.set_accepting(active);
                if !active {
                    let n = h.close_all(Some("instance is no longer active".into()));
                    tracing::info!(closed = n, "hub closed relay connections (allowReconnect)");
                }
            }
            tokio::select! {
                r = roles.changed() => if r.is_err() { break },
                _ = seen.tick() => {
                    let now = now_ms();
                    for c in h.connections() {
                        let _ = e.store().relay_seen(&c.relay.relay_id, now).await;
                    }
                }
                _ = stop.changed() => {
                    h.set_accepting(false);
                    h.close_all(Some("server shutting down".into()));
                    let deadline = tokio::time::Instant::now() + CLOSE_DRAIN;
                    while h.connection_count() > 0 && tokio::time::Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    break;
                }
            }
        }
    });
    (router, handle, task)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn refusals_are_remembered_for_a_while_and_the_table_is_bounded() {
        let t0 = Instant::now();
        let mut r = RefusedCredentials::new(Duration::from_secs(30), 3);
        let e = AuthError::Invalid("unknown relay credential".into());
        r.put("h1".into(), e.clone(), t0);
        assert_eq!(r.get("h1", t0 + Duration::from_secs(29)), Some(e.clone()));
        assert_eq!(r.get("h1", t0 + Duration::from_secs(30)), None, "expired");
        assert_eq!(r.get("h2", t0), None);
        for i in 0..100 {
            r.put(format!("x{i}"), e.clone(), t0);
            assert!(r.entries.len() <= 3);
        }
    }
}
