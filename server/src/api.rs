//! HTTP surface: health, the Admin API (every route declares its permission in [`ROUTES`], from
//! which the router's authorisation and the OpenAPI document are both derived), and the internal
//! promote/demote API served only on the mTLS listener.

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::auth::{Authenticator, Permission, Principal};
use crate::engine::Engine;
use crate::licence;
use crate::problem::{JsonBody, Problem};
use crate::store::{Role, StoreError};

/// Requests larger than this are refused with 413 before they are parsed.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub engine: Arc<Engine>,
    pub auth: Arc<Authenticator>,
    pub licence_file: Option<PathBuf>,
}

/// One Admin API route and the permission it requires.
pub struct RouteSpec {
    pub method: &'static str,
    pub path: &'static str,
    pub permission: Permission,
    pub summary: &'static str,
}

pub const ROUTES: &[RouteSpec] = &[
    RouteSpec {
        method: "get",
        path: "/api/instances",
        permission: Permission::DashboardRead,
        summary: "Engine instances that are alive, with role and epoch",
    },
    RouteSpec {
        method: "get",
        path: "/api/audit",
        permission: Permission::AuditRead,
        summary: "The audit log, newest first (?limit=1..1000)",
    },
];

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

/// Authenticates the caller and checks the route's permission.
async fn authorize(st: &AppState, headers: &HeaderMap, path: &str) -> Result<Principal, Problem> {
    let need = ROUTES
        .iter()
        .find(|r| r.path == path)
        .map(|r| r.permission)
        .ok_or_else(|| Problem::internal(format!("route {path} declares no permission")))?;
    let p = st
        .auth
        .authenticate(bearer(headers))
        .await
        .map_err(|e| match e {
            crate::auth::AuthError::KeysUnavailable(m) => Problem::unavailable(m),
            other => Problem::unauthorized(other.to_string()),
        })?;
    if !p.permissions.contains(&need) {
        return Err(Problem::forbidden(format!(
            "this endpoint needs the `{}` permission, which the token does not grant",
            need.as_str()
        )));
    }
    Ok(p)
}

fn store_problem(e: StoreError) -> Problem {
    match e {
        StoreError::Unavailable(m) => Problem::unavailable(format!("database unavailable: {m}")),
        other => Problem::internal(other.to_string()),
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/api/openapi.json", get(openapi))
        .route("/api/instances", get(instances))
        .route("/api/audit", get(audit))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

pub fn internal_router(state: AppState) -> Router {
    Router::new()
        .route("/internal/v1/status", get(internal_status))
        .route("/internal/v1/promote", post(promote))
        .route("/internal/v1/demote", post(demote))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(64 * 1024))
        .with_state(state)
}

async fn not_found() -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "no such endpoint; see /api/openapi.json",
    )
}

async fn method_not_allowed() -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "this endpoint does not take that method; see /api/openapi.json",
    )
}

async fn live() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "live"}))
}

#[derive(Serialize)]
struct Check {
    ok: bool,
    detail: String,
}

async fn ready(State(st): State<AppState>) -> Response {
    let db = match tokio::time::timeout(std::time::Duration::from_secs(3), st.engine.store().ping())
        .await
    {
        Ok(Ok(())) => Check {
            ok: true,
            detail: format!("{} reachable", st.engine.store().backend()),
        },
        Ok(Err(e)) => Check {
            ok: false,
            detail: e.to_string(),
        },
        Err(_) => Check {
            ok: false,
            detail: "database did not answer within 3 s".into(),
        },
    };
    let lic = licence::check(st.licence_file.as_deref(), chrono::Utc::now());
    let lic = Check {
        ok: lic.is_valid(),
        detail: lic.detail(),
    };
    let ready = db.ok && lic.ok;
    let status = st.engine.status();
    let body = serde_json::json!({
        "ready": ready,
        "role": status.role,
        "epoch": status.epoch,
        "checks": {"database": db, "licence": lic},
    });
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

#[derive(Serialize)]
struct InstanceView {
    instance: String,
    host: String,
    role: Role,
    epoch: i64,
    version: String,
    started_at: String,
    last_heartbeat: String,
    alive: bool,
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339())
        .unwrap_or_default()
}

async fn instances(State(st): State<AppState>, headers: HeaderMap) -> Result<Response, Problem> {
    authorize(&st, &headers, "/api/instances").await?;
    let rows = st
        .engine
        .store()
        .instances(st.engine.alive_since_ms())
        .await
        .map_err(store_problem)?;
    let view: Vec<InstanceView> = rows
        .into_iter()
        .map(|r| InstanceView {
            instance: r.instance,
            host: r.host,
            role: r.role,
            epoch: r.epoch,
            version: r.version,
            started_at: rfc3339(r.started_at_ms),
            last_heartbeat: rfc3339(r.last_heartbeat_ms),
            alive: true,
        })
        .collect();
    Ok(Json(view).into_response())
}

#[derive(Deserialize)]
struct AuditQuery {
    limit: Option<i64>,
}

async fn audit(
    State(st): State<AppState>,
    headers: HeaderMap,
    q: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    authorize(&st, &headers, "/api/audit").await?;
    let Query(q) = q.map_err(|e| Problem::bad_request(format!("bad query: {}", e.body_text())))?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(Problem::bad_request("limit must be between 1 and 1000"));
    }
    let rows = st
        .engine
        .store()
        .audit(limit)
        .await
        .map_err(store_problem)?;
    Ok(Json(rows).into_response())
}

/// The OpenAPI document, derived from the same route table the router and the permission
/// checks use, so it cannot drift from them.
pub fn openapi_document() -> serde_json::Value {
    let mut paths = serde_json::Map::new();
    let problem = serde_json::json!({"description": "Error", "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}});
    for r in ROUTES {
        let op = serde_json::json!({
            "summary": r.summary,
            "security": [{"bearer": []}],
            "x-permission": r.permission.as_str(),
            "responses": {"200": {"description": "OK"}, "401": problem, "403": problem}
        });
        let entry = paths
            .entry(r.path.to_string())
            .or_insert_with(|| serde_json::json!({}));
        entry[r.method] = op;
    }
    for (path, summary) in [
        ("/health/live", "Process is up"),
        ("/health/ready", "Database reachable and licence valid"),
        ("/api/openapi.json", "This document"),
    ] {
        paths.insert(
            path.into(),
            serde_json::json!({"get": {"summary": summary, "responses": {"200": {"description": "OK"}, "503": {"description": "Not ready"}}}}),
        );
    }
    serde_json::json!({
        "openapi": "3.1.0",
        "info": {"title": "IdentityMesh Admin API", "version": env!("CARGO_PKG_VERSION")},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Problem": {"type": "object", "properties": {
                "type": {"type": "string"}, "title": {"type": "string"},
                "status": {"type": "integer"}, "detail": {"type": "string"}}}}
        }
    })
}

async fn openapi() -> Json<serde_json::Value> {
    Json(openapi_document())
}

// ---- internal API (mTLS listener only) ----

#[derive(Serialize)]
struct InternalStatus {
    instance: String,
    role: Role,
    epoch: i64,
    version: String,
}

async fn internal_status(State(st): State<AppState>) -> Json<InternalStatus> {
    let s = st.engine.status();
    Json(InternalStatus {
        instance: st.engine.instance().into(),
        role: s.role,
        epoch: s.epoch,
        version: st.engine.version().into(),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PromoteRequest {
    epoch: i64,
}

async fn promote(
    State(st): State<AppState>,
    peer: Option<axum::Extension<PeerName>>,
    JsonBody(req): JsonBody<PromoteRequest>,
) -> Result<Response, Problem> {
    if req.epoch < 1 {
        return Err(Problem::bad_request("epoch must be a positive integer"));
    }
    let actor = peer.map(|p| p.0 .0).unwrap_or_else(|| "internal".into());
    match st.engine.promote(req.epoch, &actor).await {
        Ok(s) => Ok(Json(serde_json::json!({"role": s.role, "epoch": s.epoch})).into_response()),
        Err(e @ StoreError::StaleEpoch { .. }) => Err(Problem::conflict(e.to_string())),
        Err(e) => Err(store_problem(e)),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DemoteRequest {
    #[serde(default)]
    reason: Option<String>,
}

async fn demote(
    State(st): State<AppState>,
    peer: Option<axum::Extension<PeerName>>,
    JsonBody(req): JsonBody<DemoteRequest>,
) -> Json<crate::engine::DemoteOutcome> {
    let actor = peer.map(|p| p.0 .0).unwrap_or_else(|| "internal".into());
    let reason = req.reason.unwrap_or_else(|| "requested".into());
    Json(st.engine.demote(&actor, &reason).await)
}

/// The verified client certificate's subject, attached by the mTLS listener.
#[derive(Clone, Debug)]
pub struct PeerName(pub String);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::testing::TestIssuer;
    use crate::config::EngineConfig;
    use crate::store::sqlite::SqliteStore;
    use crate::store::Store;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    async fn app() -> (tempfile::TempDir, Router, TestIssuer) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("im.db")).await.unwrap();
        store.migrate().await.unwrap();
        let issuer = TestIssuer::new();
        let jwks = dir.path().join("jwks.json");
        std::fs::write(&jwks, &issuer.jwks_json).unwrap();
        let auth = Authenticator::new(None, Some(issuer.config(jwks)))
            .await
            .unwrap();
        let engine = Engine::new(
            Arc::new(store),
            "t".into(),
            "h".into(),
            "1".into(),
            EngineConfig::default(),
        );
        let st = AppState {
            engine,
            auth,
            licence_file: None,
        };
        (dir, router(st), issuer)
    }

    async fn call(app: &Router, method: &str, path: &str, token: Option<&str>) -> StatusCode {
        let mut req = Request::builder()
            .method(method.to_uppercase().as_str())
            .uri(path);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        app.clone()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap()
            .status()
    }

    /// Every route, with no token, with each single permission, and with its own permission.
    #[tokio::test]
    async fn every_endpoint_enforces_its_permission() {
        let (_d, app, issuer) = app().await;
        for r in ROUTES {
            assert_eq!(call(&app, r.method, r.path, None).await, 401, "{}", r.path);
            assert_eq!(
                call(&app, r.method, r.path, Some("garbage")).await,
                401,
                "{}",
                r.path
            );
            for p in Permission::ALL {
                let status = call(
                    &app,
                    r.method,
                    r.path,
                    Some(&issuer.token(&[p.as_str()], 300)),
                )
                .await;
                if p == r.permission {
                    assert_eq!(status, 200, "{} with {}", r.path, p.as_str());
                } else {
                    assert_eq!(status, 403, "{} with {}", r.path, p.as_str());
                }
            }
        }
    }

    #[tokio::test]
    async fn openapi_matches_the_routes() {
        let (_d, app, issuer) = app().await;
        let doc = openapi_document();
        let paths = doc["paths"].as_object().unwrap();
        for r in ROUTES {
            assert_eq!(
                paths[r.path][r.method]["x-permission"],
                r.permission.as_str(),
                "{}",
                r.path
            );
        }
        let all = Permission::ALL.map(|p| p.as_str());
        let token = issuer.token(&all, 300);
        for (path, ops) in paths {
            for method in ops.as_object().unwrap().keys() {
                let s = call(&app, method, path, Some(&token)).await;
                assert_ne!(s, 404, "{method} {path} documented but not routed");
                assert_ne!(s, 405, "{method} {path} documented but not routed");
            }
        }
        assert_eq!(call(&app, "get", "/api/nothing", Some(&token)).await, 404);
    }

    #[tokio::test]
    async fn bad_query_is_a_problem_not_a_crash() {
        let (_d, app, issuer) = app().await;
        let t = issuer.token(&["audit.read"], 300);
        assert_eq!(
            call(&app, "get", "/api/audit?limit=abc", Some(&t)).await,
            400
        );
        assert_eq!(call(&app, "get", "/api/audit?limit=0", Some(&t)).await, 400);
        assert_eq!(call(&app, "get", "/api/audit?limit=5", Some(&t)).await, 200);
    }
}
