//! Internal checks the operator runs after a cutover (mTLS listener only): are the relays back
//! on this instance, and does a canary connector still sync.

use std::collections::BTreeSet;
use std::time::Duration;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use identitymesh_contract::internal::{
    paths, CanaryReport, CanaryRequest, CanaryRun, RelayReport, UiReport,
};

use crate::api::{store_problem, AppState};
use crate::problem::Problem;
use crate::store::{now_ms, Role};
use crate::sync::runner::{RunError, RunMode};

/// Relays seen this recently are expected to reconnect after a cutover; older ones are treated
/// as switched off.
pub const RELAY_EXPECT_WINDOW_MS: i64 = 10 * 60 * 1000;
const DEFAULT_CANARY_WAIT_MS: u64 = 20_000;
const MAX_CANARY_WAIT_MS: u64 = 120_000;

pub fn internal_routes() -> Router<AppState> {
    Router::new()
        .route(paths::RELAYS, get(relays))
        .route(paths::CANARY, post(canary))
        .route(paths::UI, get(ui))
}

async fn ui(State(st): State<AppState>) -> Response {
    use tower::ServiceExt;
    let req = axum::http::Request::get("/signin")
        .header(axum::http::header::ACCEPT, "text/html")
        .body(axum::body::Body::empty())
        .unwrap_or_default();
    let page_status = crate::api::router(st.clone())
        .oneshot(req)
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or_else(|never| match never {});
    let (sign_in, discovery_error) = if st.auth.oidc_sign_in() {
        ("oidc", st.auth.discover_now().await.err())
    } else if st.auth.has_bootstrap() {
        ("bootstrap", None)
    } else {
        ("none", None)
    };
    Json(UiReport {
        page_status,
        sign_in: sign_in.into(),
        discovery_error,
    })
    .into_response()
}

/// Pure: which expected relays are missing, given who is connected here.
pub fn relay_check(
    relays: &[crate::store::RelayRow],
    connected_ids: &BTreeSet<String>,
    now_ms: i64,
) -> RelayReport {
    let mut expected = Vec::new();
    let mut here = Vec::new();
    let mut missing = Vec::new();
    for r in relays.iter().filter(|r| r.revoked_at_ms.is_none()) {
        let live = connected_ids.contains(&r.id);
        if live {
            here.push(r.name.clone());
        }
        let recent = r
            .last_seen_ms
            .is_some_and(|t| now_ms - t <= RELAY_EXPECT_WINDOW_MS);
        if recent || live {
            expected.push(r.name.clone());
            if !live {
                missing.push(r.name.clone());
            }
        }
    }
    RelayReport {
        expected,
        connected_here: here,
        missing,
    }
}

async fn relays(State(st): State<AppState>) -> Result<Response, Problem> {
    let rows = st.engine.store().relays().await.map_err(store_problem)?;
    let connected: BTreeSet<String> = st
        .hub
        .as_ref()
        .map(|h| {
            h.connections()
                .into_iter()
                .map(|c| c.relay.relay_id)
                .collect()
        })
        .unwrap_or_default();
    Ok(Json(relay_check(&rows, &connected, now_ms())).into_response())
}

/// Runs every canary connector (delta) and waits, within a bound, for them to finish.
/// `ok` is null when no connector is flagged as canary.
async fn canary(State(st): State<AppState>, body: axum::body::Bytes) -> Result<Response, Problem> {
    // An empty body means the defaults.
    let req: CanaryRequest = if body.iter().all(u8::is_ascii_whitespace) {
        CanaryRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| Problem::bad_request(format!("expected {{\"wait_ms\": N}}: {e}")))?
    };
    let wait = Duration::from_millis(
        req.wait_ms
            .unwrap_or(DEFAULT_CANARY_WAIT_MS)
            .min(MAX_CANARY_WAIT_MS),
    );
    let sync = st
        .sync
        .as_ref()
        .ok_or_else(|| Problem::unavailable("the sync engine is not running in this process"))?;
    if st.engine.status().role != Role::Active {
        return Err(Problem::conflict(
            "this instance is not active; run the canary on the active",
        ));
    }
    let canaries: Vec<_> = st
        .engine
        .store()
        .connectors()
        .await
        .map_err(store_problem)?
        .into_iter()
        .filter(|c| c.is_canary)
        .collect();
    let mut runs = Vec::new();
    let mut tasks = Vec::new();
    for c in &canaries {
        match sync.start(&c.id, RunMode::Delta, "canary").await {
            Ok((run, task)) => {
                tasks.push((runs.len(), task));
                runs.push(CanaryRun {
                    connector_id: c.id.clone(),
                    connector: c.name.clone(),
                    run_id: Some(run.id),
                    status: "running".into(),
                    error: None,
                });
            }
            Err(e) => runs.push(CanaryRun {
                connector_id: c.id.clone(),
                connector: c.name.clone(),
                run_id: None,
                status: match e {
                    RunError::AlreadyRunning(_) => "busy".into(),
                    _ => "failed".into(),
                },
                error: Some(e.to_string()),
            }),
        }
    }
    let deadline = tokio::time::Instant::now() + wait;
    for (i, task) in tasks {
        if let Ok(Ok(done)) = tokio::time::timeout_at(deadline, task).await {
            runs[i].status = done.status;
            runs[i].error = done.error;
        }
    }
    Ok(Json(CanaryReport::of(runs)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RelayRow;

    fn relay(id: &str, last_seen: Option<i64>, revoked: bool) -> RelayRow {
        RelayRow {
            id: id.into(),
            name: format!("relay-{id}"),
            created_at_ms: 0,
            revoked_at_ms: revoked.then_some(1),
            last_seen_ms: last_seen,
            version: None,
            connected_instance: None,
            connected_since_ms: None,
        }
    }

    #[test]
    fn expected_relays_are_the_recent_unrevoked_ones() {
        let now = 100 * 60 * 1000;
        let rows = vec![
            relay("a", Some(now - 1000), false),
            relay("b", Some(now - 1000), false),
            relay("old", Some(now - RELAY_EXPECT_WINDOW_MS - 1), false),
            relay("never", None, false),
            relay("revoked", Some(now), true),
        ];
        let connected: BTreeSet<String> = ["a".to_string()].into();
        let c = relay_check(&rows, &connected, now);
        assert_eq!(c.expected, ["relay-a", "relay-b"]);
        assert_eq!(c.connected_here, ["relay-a"]);
        assert_eq!(c.missing, ["relay-b"]);
        let all: BTreeSet<String> = ["a".to_string(), "b".to_string()].into();
        assert!(relay_check(&rows, &all, now).missing.is_empty());
        assert!(relay_check(&[], &all, now).expected.is_empty());
    }
}
