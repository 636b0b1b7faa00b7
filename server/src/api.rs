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
    /// The relay hub, to disconnect a revoked relay at once.
    pub hub: Option<identitymesh_signalr::hub::HubHandle>,
    /// Connector runs, schedules, secrets (absent in tests of the bare API).
    pub sync: Option<Arc<crate::sync::runner::SyncEngine>>,
    /// Browser sessions sealed with the key ring's cookie keys (absent: bearer tokens only).
    pub sessions: Option<Arc<crate::session::Sessions>>,
}

/// A relay is shown Connected while its hub connection is recorded and seen this recently.
const RELAY_SEEN_WINDOW_MS: i64 = 45_000;

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
        path: "/api/relays",
        permission: Permission::DashboardRead,
        summary:
            "Relays with state (Connected / Disconnected), pod, version, connected-since, last-seen",
    },
    RouteSpec {
        method: "post",
        path: "/api/relays",
        permission: Permission::RelaysManage,
        summary: "Register a relay ({\"name\"}); the credential is returned once",
    },
    RouteSpec {
        method: "delete",
        path: "/api/relays/{id}",
        permission: Permission::RelaysManage,
        summary: "Revoke a relay's credential and disconnect it at once",
    },
    RouteSpec {
        method: "get",
        path: "/api/audit",
        permission: Permission::AuditRead,
        summary: "The audit log, newest first (?actor=SUBJECT&action=NAME&since=T&until=T&limit=1..1000): actor exact; action exact, or a prefix when it ends with `.` (action=connector.); since inclusive, until exclusive, both RFC 3339 (bad ones: 422)",
    },
    RouteSpec {
        method: "get",
        path: "/api/connectors",
        permission: Permission::DashboardRead,
        summary: "Connectors (config holds secret references, never values)",
    },
    RouteSpec {
        method: "post",
        path: "/api/connectors",
        permission: Permission::ConnectorsWrite,
        summary: "Create a connector ({name, kind: ldap|csv, config, rules, relay_id?, canary?}); every problem is listed with its field path",
    },
    RouteSpec {
        method: "get",
        path: "/api/connectors/{id}",
        permission: Permission::DashboardRead,
        summary: "One connector, with its connector-space object count",
    },
    RouteSpec {
        method: "put",
        path: "/api/connectors/{id}",
        permission: Permission::ConnectorsWrite,
        summary: "Replace a connector's name, config, rules, relay and canary flag",
    },
    RouteSpec {
        method: "delete",
        path: "/api/connectors/{id}",
        permission: Permission::ConnectorsWrite,
        summary: "Delete a connector whose connector space is empty (clear it first)",
    },
    RouteSpec {
        method: "post",
        path: "/api/connectors/{id}/test",
        permission: Permission::ConnectorsWrite,
        summary: "Test the connection (connect, bind, read) and report each step",
    },
    RouteSpec {
        method: "post",
        path: "/api/connectors/{id}/runs",
        permission: Permission::SchedulesManage,
        summary: "Start a run now ({mode: full|delta}); 202 with the run, 409 if one is running or the engine is paused",
    },
    RouteSpec {
        method: "post",
        path: "/api/connectors/{id}/clear",
        permission: Permission::ConnectorsWrite,
        summary: "Remove every object of the connector and its identity contributions",
    },
    RouteSpec {
        method: "get",
        path: "/api/connectors/{id}/objects",
        permission: Permission::DashboardRead,
        summary: "The connector space, paged by anchor (?search=TEXT&after=ANCHOR&limit=1..500, 422 outside): items {anchor, object_type, dn, deleted, identity_id}, next_after (null on the last page), total. search: case-insensitive substring of the anchor or of the stored attributes JSON (DN, attribute names, text values; binary values only as base64)",
    },
    RouteSpec {
        method: "get",
        path: "/api/connectors/{id}/objects/{anchor}",
        permission: Permission::DashboardRead,
        summary: "One connector-space object, the anchor percent-encoded as one path segment (`,` `=` `/` `\\` and spaces too): type, dn, deleted, pending, seen_in_run, updated_at, identity_id, attributes [{name, values: [{value, binary}]}], binary values as base64",
    },
    RouteSpec {
        method: "get",
        path: "/api/runs",
        permission: Permission::DashboardRead,
        summary: "Run history, newest first, with counts and errors (?connector=ID&limit=1..500)",
    },
    RouteSpec {
        method: "get",
        path: "/api/runs/{id}",
        permission: Permission::DashboardRead,
        summary: "One run",
    },
    RouteSpec {
        method: "get",
        path: "/api/schedules",
        permission: Permission::DashboardRead,
        summary: "Schedules with their next run time",
    },
    RouteSpec {
        method: "post",
        path: "/api/schedules",
        permission: Permission::SchedulesManage,
        summary: "Create a schedule ({connector_id, kind: interval|cron, spec: 15m or */15 * * * *, mode})",
    },
    RouteSpec {
        method: "patch",
        path: "/api/schedules/{id}",
        permission: Permission::SchedulesManage,
        summary: "Enable or disable a schedule ({enabled: true|false}); enabling computes its next run",
    },
    RouteSpec {
        method: "delete",
        path: "/api/schedules/{id}",
        permission: Permission::SchedulesManage,
        summary: "Delete a schedule",
    },
    RouteSpec {
        method: "get",
        path: "/api/sync",
        permission: Permission::DashboardRead,
        summary: "Whether the engine is paused, and the runs in progress",
    },
    RouteSpec {
        method: "post",
        path: "/api/sync/pause",
        permission: Permission::SchedulesManage,
        summary: "Pause the engine: no new runs start; running ones finish",
    },
    RouteSpec {
        method: "post",
        path: "/api/sync/resume",
        permission: Permission::SchedulesManage,
        summary: "Resume the engine",
    },
    RouteSpec {
        method: "get",
        path: "/api/identities",
        permission: Permission::DashboardRead,
        summary: "Identities, paged by id (?search=TEXT&after=ID&limit=1..500)",
    },
    RouteSpec {
        method: "get",
        path: "/api/identities/{id}",
        permission: Permission::DashboardRead,
        summary: "One identity with its attributes, their sources and its connector links",
    },
    RouteSpec {
        method: "get",
        path: "/api/secrets",
        permission: Permission::SecretsWrite,
        summary: "Secret names, key ids and times (values are never returned)",
    },
    RouteSpec {
        method: "put",
        path: "/api/secrets/{id}",
        permission: Permission::SecretsWrite,
        summary: "Set a secret ({value}); sealed with the key ring, never returned",
    },
    RouteSpec {
        method: "delete",
        path: "/api/secrets/{id}",
        permission: Permission::SecretsWrite,
        summary: "Delete a secret",
    },
];

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

/// The authenticated caller of an Admin API route, checked against the permission that route
/// declares in [`ROUTES`]. As an extractor it runs before the body is read, so an anonymous
/// caller gets 401 whatever it sent.
pub struct Caller(pub Principal);

impl axum::extract::FromRequestParts<AppState> for Caller {
    type Rejection = Problem;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        st: &AppState,
    ) -> Result<Self, Problem> {
        let path = parts
            .extensions
            .get::<axum::extract::MatchedPath>()
            .map(|m| m.as_str().to_string())
            .unwrap_or_default();
        let method = parts.method.as_str().to_ascii_lowercase();
        let need = ROUTES
            .iter()
            .find(|r| r.path == path && r.method == method)
            .map(|r| r.permission)
            .ok_or_else(|| {
                Problem::internal(format!("route {method} {path} declares no permission"))
            })?;
        let p = match (
            bearer(&parts.headers),
            crate::api_auth::cookie_session(parts, st),
        ) {
            // A bearer token wins; a request with one is no browser's cookie request.
            (b @ Some(_), _) | (b @ None, crate::api_auth::CookieAuth::None) => {
                st.auth.authenticate(b).await.map_err(|e| match e {
                    crate::auth::AuthError::KeysUnavailable(m) => Problem::unavailable(m),
                    other => Problem::unauthorized(other.to_string()),
                })?
            }
            (None, crate::api_auth::CookieAuth::Rejected(m)) => {
                return Err(Problem::unauthorized(m))
            }
            (None, crate::api_auth::CookieAuth::CsrfRefused(m)) => {
                return Err(Problem::forbidden(m))
            }
            (None, crate::api_auth::CookieAuth::Session(p)) => p,
        };
        if !p.permissions.contains(&need) {
            return Err(Problem::forbidden(format!(
                "this endpoint needs the `{}` permission, which the token does not grant",
                need.as_str()
            )));
        }
        Ok(Caller(p))
    }
}

pub(crate) fn store_problem(e: StoreError) -> Problem {
    match e {
        StoreError::Unavailable(m) => Problem::unavailable(format!("database unavailable: {m}")),
        other => Problem::internal(other.to_string()),
    }
}

/// The public listener's routes: the Admin API, `/auth`, and the Admin UI over them.
pub fn router(state: AppState) -> Router {
    let api = api_router(state.clone());
    crate::ui::router(api.clone(), state).merge(api)
}

fn api_router(state: AppState) -> Router {
    Router::new()
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/api/openapi.json", get(openapi))
        .route("/api/instances", get(instances))
        .route("/api/audit", get(audit))
        .route("/api/relays", get(list_relays).post(create_relay))
        .route("/api/relays/{id}", axum::routing::delete(revoke_relay))
        .merge(crate::api_sync::routes())
        .merge(crate::api_auth::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::api_auth::session_layer,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

pub fn internal_router(state: AppState) -> Router {
    Router::new()
        .route("/internal/v1/status", get(internal_status))
        .route("/internal/v1/instances", get(internal_instances))
        .route("/internal/v1/promote", post(promote))
        .route("/internal/v1/demote", post(demote))
        .merge(crate::api_checks::internal_routes())
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
    incarnation: String,
    host: String,
    role: Role,
    epoch: i64,
    version: String,
    started_at: String,
    last_heartbeat: String,
    alive: bool,
}

pub(crate) fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339())
        .unwrap_or_default()
}

async fn instances(State(st): State<AppState>, _caller: Caller) -> Result<Response, Problem> {
    instance_rows(&st).await
}

async fn instance_rows(st: &AppState) -> Result<Response, Problem> {
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
            incarnation: r.incarnation,
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
#[serde(deny_unknown_fields)]
struct AuditQuery {
    actor: Option<String>,
    action: Option<String>,
    since: Option<String>,
    until: Option<String>,
    limit: Option<i64>,
}

/// `?since=` / `?until=` as milliseconds, or a 422 naming the parameter and the format.
pub(crate) fn query_time(name: &str, value: Option<&str>) -> Result<Option<i64>, Problem> {
    let Some(v) = value.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    // An unencoded `+` of an offset arrives as a space: take it as the `+` it was.
    chrono::DateTime::parse_from_rfc3339(v)
        .or_else(|e| chrono::DateTime::parse_from_rfc3339(&v.replace(' ', "+")).map_err(|_| e))
        .map(|t| Some(t.timestamp_millis()))
        .map_err(|e| {
            Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "{name} must be an RFC 3339 timestamp such as 2026-01-31T08:00:00Z or \
                     2026-01-31T09:00:00+01:00; got {v:?} ({e})"
                ),
            )
        })
}

async fn audit(
    State(st): State<AppState>,
    _caller: Caller,
    q: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let Query(q) = q.map_err(|e| Problem::bad_request(format!("bad query: {}", e.body_text())))?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(Problem::bad_request("limit must be between 1 and 1000"));
    }
    let given = |v: Option<String>| v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
    let filter = crate::store::AuditFilter {
        since_ms: query_time("since", q.since.as_deref())?,
        until_ms: query_time("until", q.until.as_deref())?,
        actor: given(q.actor),
        action: given(q.action),
        limit,
    };
    let rows = st
        .engine
        .store()
        .audit(&filter)
        .await
        .map_err(store_problem)?;
    Ok(Json(rows).into_response())
}

#[derive(Serialize)]
struct RelayView {
    id: String,
    name: String,
    state: &'static str,
    instance: Option<String>,
    version: Option<String>,
    connected_since: Option<String>,
    last_seen: Option<String>,
    revoked: bool,
}

async fn list_relays(State(st): State<AppState>, _caller: Caller) -> Result<Response, Problem> {
    let now = crate::store::now_ms();
    let rows = st.engine.store().relays().await.map_err(store_problem)?;
    let view: Vec<RelayView> = rows
        .into_iter()
        .map(|r| {
            let connected = r.connected_instance.is_some()
                && r.last_seen_ms
                    .is_some_and(|t| now - t < RELAY_SEEN_WINDOW_MS);
            RelayView {
                id: r.id,
                name: r.name,
                state: if connected {
                    "Connected"
                } else {
                    "Disconnected"
                },
                instance: r.connected_instance.filter(|_| connected),
                version: r.version,
                connected_since: r.connected_since_ms.filter(|_| connected).map(rfc3339),
                last_seen: r.last_seen_ms.map(rfc3339),
                revoked: r.revoked_at_ms.is_some(),
            }
        })
        .collect();
    Ok(Json(view).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewRelay {
    name: String,
}

async fn create_relay(
    State(st): State<AppState>,
    Caller(who): Caller,
    JsonBody(req): JsonBody<NewRelay>,
) -> Result<Response, Problem> {
    let name = req.name.trim();
    if name.is_empty()
        || name.len() > 128
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "name must be 1-128 characters of letters, digits, '-', '_' or '.'",
        ));
    }
    let id = uuid::Uuid::new_v4().simple().to_string();
    let token = {
        use rand::RngCore;
        let mut b = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut b);
        format!("{}{}", crate::hub::RELAY_TOKEN_PREFIX, hex::encode(b))
    };
    let now = crate::store::now_ms();
    st.engine
        .store()
        .create_relay(&id, name, &crate::auth::hash_token(&token), now)
        .await
        .map_err(|e| match e {
            StoreError::Conflict(m) => Problem::conflict(m),
            other => store_problem(other),
        })?;
    audit_action(&st, &who.subject, "relay.create", name, "").await;
    let body = serde_json::json!({"id": id, "name": name, "token": token});
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

async fn revoke_relay(
    State(st): State<AppState>,
    Caller(who): Caller,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Response, Problem> {
    let found = st
        .engine
        .store()
        .revoke_relay(&id, crate::store::now_ms())
        .await
        .map_err(store_problem)?;
    if !found {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            format!("no relay with id `{id}`"),
        ));
    }
    let closed = st
        .hub
        .as_ref()
        .map(|h| h.disconnect_relay(&id, "credential revoked"))
        .unwrap_or(0);
    audit_action(&st, &who.subject, "relay.revoke", &id, "").await;
    Ok(
        Json(serde_json::json!({"id": id, "revoked": true, "disconnected": closed}))
            .into_response(),
    )
}

/// Records an Admin API action in the audit log (best effort).
pub(crate) async fn audit_action(
    st: &AppState,
    actor: &str,
    action: &str,
    target: impl Into<String>,
    detail: impl ToString,
) {
    let entry = crate::store::AuditEntry::now(actor, action, target, detail.to_string());
    crate::store::audit(st.engine.store().as_ref(), entry).await;
}

/// The OpenAPI document, derived from the same route table the router and the permission
/// checks use, so it cannot drift from them.
pub fn openapi_document() -> serde_json::Value {
    let mut paths = serde_json::Map::new();
    let problem = serde_json::json!({"description": "Error", "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}});
    for r in ROUTES {
        let op = serde_json::json!({
            "summary": r.summary,
            "security": [{"bearer": []}, {"session": []}],
            "x-permission": r.permission.as_str(),
            "responses": {"200": {"description": "OK"}, "401": problem, "403": problem}
        });
        let entry = paths
            .entry(r.path.to_string())
            .or_insert_with(|| serde_json::json!({}));
        entry[r.method] = op;
    }
    for (method, path, summary) in [
        ("get", "/auth/login", "Browser sign-in: 303 to the identity provider (code flow, PKCE); ?next=/path is where the callback leads back to (local paths only)"),
        ("post", "/auth/login", "Standalone sign-in with the bootstrap admin token (form field `token`); sets the session cookie"),
        ("get", "/auth/callback", "The provider's redirect back (?code&state): sets the session cookie, 303 to the sign-in's next page (/ by default)"),
        ("get", "/auth/session", "The session cookie's user, permissions and CSRF token"),
        ("post", "/auth/logout", "Clears the session cookie (X-CSRF-Token); answers the provider's end-session URL"),
    ] {
        let entry = paths
            .entry(path.to_string())
            .or_insert_with(|| serde_json::json!({}));
        entry[method] = serde_json::json!({"summary": summary, "security": [],
            "responses": {"200": {"description": "OK"}, "303": {"description": "Redirect"}, "400": problem, "401": problem}});
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
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                "session": {"type": "apiKey", "in": "cookie", "name": "im_session",
                    "description": "Browser session; POST, PUT, PATCH and DELETE also need the X-CSRF-Token header"}},
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
    /// This process's part of the fence holder: a recreated pod of the same name differs.
    incarnation: String,
    role: Role,
    epoch: i64,
    version: String,
}

async fn internal_status(State(st): State<AppState>) -> Json<InternalStatus> {
    let s = st.engine.status();
    Json(InternalStatus {
        instance: st.engine.instance().into(),
        incarnation: st.engine.incarnation().into(),
        role: s.role,
        epoch: s.epoch,
        version: st.engine.version().into(),
    })
}

/// The registry as `/api/instances` shows it, for the operator's post-cutover check (it holds a
/// client certificate, not an OIDC token).
async fn internal_instances(State(st): State<AppState>) -> Result<Response, Problem> {
    instance_rows(&st).await
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
        Err(StoreError::StaleEpoch {
            requested,
            stored,
            holder,
        }) => Err(Problem::conflict(
            StoreError::StaleEpoch {
                requested,
                stored,
                holder: holder.clone(),
            }
            .to_string(),
        )
        // The operator retries with stored_epoch + 1 instead of probing upwards.
        .with("stored_epoch", stored)
        .with("holder", holder)),
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
        let (dir, app, issuer, _) = app_with_store().await;
        (dir, app, issuer)
    }

    /// As [`app`], with the store behind it, for tests that put rows there first.
    async fn app_with_store() -> (tempfile::TempDir, Router, TestIssuer, Arc<dyn Store>) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(&dir.path().join("im.db")).await.unwrap());
        store.migrate().await.unwrap();
        let issuer = TestIssuer::new();
        let jwks = dir.path().join("jwks.json");
        std::fs::write(&jwks, &issuer.jwks_json).unwrap();
        let auth = Authenticator::new(None, Some(issuer.config(jwks)))
            .await
            .unwrap();
        let engine = Engine::new(
            store.clone(),
            "t".into(),
            "h".into(),
            "1".into(),
            EngineConfig::default(),
        );
        // A real sync engine, so a request a permission must not reach is refused by its
        // handler, not stopped by a missing engine.
        let secrets =
            crate::secrets::Secrets::new(store.clone(), identitymesh_keyring::KeyRing::generate());
        let sync = crate::sync::runner::SyncEngine::new(
            engine.clone(),
            secrets,
            None,
            identitymesh_connectors::roots::DropRoots::default(),
        );
        let st = AppState {
            engine,
            auth,
            licence_file: None,
            hub: None,
            sync: Some(sync),
            sessions: None,
        };
        (dir, router(st), issuer, store)
    }

    async fn call(app: &Router, method: &str, path: &str, token: Option<&str>) -> StatusCode {
        call_detail(app, method, path, token).await.0
    }

    async fn call_detail(
        app: &Router,
        method: &str,
        path: &str,
        token: Option<&str>,
    ) -> (StatusCode, String) {
        let body = (method == "post")
            .then(|| format!("{{\"name\":\"relay-{}\"}}", uuid::Uuid::new_v4().simple()));
        call_with(app, method, path, token, body).await
    }

    /// A request with `body` as JSON (none: no body).
    async fn call_with(
        app: &Router,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<String>,
    ) -> (StatusCode, String) {
        let path = path
            .replace("{id}", "0123")
            .replace("{anchor}", "uid%3D0123%2Cou%3Dpeople");
        let mut req = Request::builder()
            .method(method.to_uppercase().as_str())
            .uri(path);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let body = match body {
            Some(b) => {
                req = req.header("content-type", "application/json");
                Body::from(b)
            }
            None => Body::empty(),
        };
        let res = app.clone().oneshot(req.body(body).unwrap()).await.unwrap();
        let status = res.status();
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&bytes).into_owned())
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
                    // Authorised: anything but 401/403 (DELETE of an unknown id is a 404).
                    assert!(
                        !matches!(status.as_u16(), 401 | 403),
                        "{} {} with {}: {status}",
                        r.method,
                        r.path,
                        p.as_str()
                    );
                } else {
                    assert_eq!(status, 403, "{} with {}", r.path, p.as_str());
                }
            }
        }
    }

    /// Requests a permission admits by route but must not reach what they name: (method, path,
    /// body, the caller's only permission, expected status, a phrase the refusal must say).
    const ABUSE_CASES: &[(&str, &str, &str, &str, u16, &str)] = &[
        // Deleting a connector's objects is connectors.write's, not a run mode of
        // schedules.manage.
        (
            "post",
            "/api/connectors/{id}/runs",
            r#"{"mode":"clear"}"#,
            "schedules.manage",
            422,
            "/api/connectors/{id}/clear",
        ),
    ];

    #[tokio::test]
    async fn abuse_cases_are_refused() {
        let (_d, app, issuer) = app().await;
        for (method, path, body, permission, want, phrase) in ABUSE_CASES {
            let token = issuer.token(&[permission], 300);
            let (status, detail) =
                call_with(&app, method, path, Some(&token), Some(body.to_string())).await;
            assert_eq!(
                status.as_u16(),
                *want,
                "{method} {path} {body} with {permission}: {detail}"
            );
            let phrase = phrase.replace("{id}", "0123");
            assert!(
                detail.contains(&phrase),
                "{method} {path} {body}: the refusal should say {phrase:?}: {detail}"
            );
        }
    }

    /// A TCP listener that keeps every byte it is sent (an LDAP simple bind carries its
    /// password in the clear over `ldap://`) and then hangs up.
    async fn recorder() -> (u16, Arc<std::sync::Mutex<Vec<u8>>>) {
        use tokio::io::AsyncReadExt as _;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let keep = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                let mut buf = vec![0u8; 4096];
                if let Ok(Ok(n)) =
                    tokio::time::timeout(std::time::Duration::from_secs(2), c.read(&mut buf)).await
                {
                    keep.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            }
        });
        (port, seen)
    }

    fn ldap_connector(port: u16, filter: &str) -> String {
        serde_json::json!({
            "name": "corp", "kind": "ldap",
            "config": {"url": format!("ldap://127.0.0.1:{port}"), "allow_plain": true, "timeout_ms": 2000,
                       "bind_dn": "cn=sync,dc=x", "bind_password_ref": "bind",
                       "object_types": {"people": {"base_dn": "dc=x", "filter": filter}}}
        })
        .to_string()
    }

    /// `connectors.write` alone cannot send a stored secret anywhere new: not by pointing a
    /// connector at another host, not with a new connector naming the secret; a test call only
    /// ever binds to where the secret was entrusted.
    #[tokio::test]
    async fn a_stored_secret_goes_only_where_it_was_entrusted() {
        let (_d, app, issuer) = app().await;
        let admin = issuer.token(&Permission::ALL.map(|p| p.as_str()), 300);
        let editor = issuer.token(&["connectors.write"], 300);
        let password = "pw-entrusted-9f3k";
        let (st, body) = call_with(
            &app,
            "put",
            "/api/secrets/bind",
            Some(&admin),
            Some(format!(r#"{{"value":"{password}"}}"#)),
        )
        .await;
        assert_eq!(st, 200, "{body}");
        let (legit, legit_seen) = recorder().await;
        let (evil, evil_seen) = recorder().await;
        let (st, body) = call_with(
            &app,
            "post",
            "/api/connectors",
            Some(&admin),
            Some(ldap_connector(legit, "(objectClass=*)")),
        )
        .await;
        assert_eq!(st, 201, "{body}");
        let id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        let path = format!("/api/connectors/{id}");

        // Pointed at another host by an editor: refused, and the stored config stays.
        let (st, body) = call_with(
            &app,
            "put",
            &path,
            Some(&editor),
            Some(ldap_connector(evil, "(objectClass=*)")),
        )
        .await;
        assert_eq!(st, 403, "{body}");
        assert!(body.contains("secrets.write"), "{body}");
        // A new connector naming the secret, by an editor: refused too.
        let (st, body) = call_with(
            &app,
            "post",
            "/api/connectors",
            Some(&editor),
            Some(ldap_connector(evil, "(objectClass=*)").replace("\"corp\"", "\"corp2\"")),
        )
        .await;
        assert_eq!(st, 403, "{body}");
        // An edit that leaves the destination alone is the editor's to make.
        let (st, body) = call_with(
            &app,
            "put",
            &path,
            Some(&editor),
            Some(ldap_connector(legit, "(objectClass=person)")),
        )
        .await;
        assert_eq!(st, 200, "{body}");
        // Testing binds to the entrusted endpoint only.
        let (st, body) =
            call_with(&app, "post", &format!("{path}/test"), Some(&editor), None).await;
        assert_eq!(st, 200, "{body}");
        let contains = |seen: &Arc<std::sync::Mutex<Vec<u8>>>| {
            let b = seen.lock().unwrap();
            b.windows(password.len()).any(|w| w == password.as_bytes())
        };
        assert!(
            contains(&legit_seen),
            "the entrusted endpoint got the bind (so this test can see one)"
        );
        assert!(
            evil_seen.lock().unwrap().is_empty(),
            "nothing may reach a host an editor chose"
        );
        // Someone who may write secrets may move it.
        let (st, body) = call_with(
            &app,
            "put",
            &path,
            Some(&admin),
            Some(ldap_connector(evil, "(objectClass=person)")),
        )
        .await;
        assert_eq!(st, 200, "{body}");
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
                let (s, detail) = call_detail(&app, method, path, Some(&token)).await;
                assert!(
                    !detail.contains("no such endpoint") && s != 405,
                    "{method} {path} documented but not routed ({s}: {detail})"
                );
            }
        }
        let (s, detail) = call_detail(&app, "get", "/api/nothing", Some(&token)).await;
        assert_eq!(s, 404);
        assert!(detail.contains("no such endpoint"));
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

    /// `s` as one path segment or query value: everything but unreserved characters
    /// percent-encoded, as a browser's encodeURIComponent does with `,` `=` `/` `\` and spaces.
    fn encode(s: &str) -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    }

    async fn get_json(app: &Router, path: &str, token: &str) -> (StatusCode, serde_json::Value) {
        let (status, body) = call_with(app, "get", path, Some(token), None).await;
        let v = serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body));
        (status, v)
    }

    const DOE: &str = r"cn=Doe\, John/Ops,ou=people,dc=example,dc=org";

    /// A connector `c1` whose connector space holds `people` objects `uid=p00..` as the LDAP
    /// connector stores them, Doe's DN with a binary objectGUID and a value that is not
    /// UTF-8, and Doe joined to an identity.
    async fn connector_space_fixture(store: &Arc<dyn Store>, people: usize) -> String {
        use crate::store::{
            ComposeWrite, ConnectorRow, CsObject, FenceToken, IdentityRow, ImportBatch, LinkRow,
        };
        use identitymesh_connectors::model::{Attributes, ConnectorObject, Value};
        store
            .put_connector(&ConnectorRow {
                id: "c1".into(),
                name: "corp".into(),
                kind: "ldap".into(),
                config_json: "{}".into(),
                rules_json: "{}".into(),
                relay_id: None,
                is_canary: false,
                created_at_ms: 1,
                updated_at_ms: 1,
            })
            .await
            .unwrap();
        let object = |anchor: &str, dn: Option<&str>, attributes: Attributes| {
            let o = ConnectorObject {
                anchor: anchor.into(),
                object_type: "people".into(),
                dn: dn.map(str::to_string),
                attributes,
                location: None,
            };
            CsObject {
                anchor: o.anchor.clone(),
                object_type: o.object_type.clone(),
                attributes_json: o.attributes_json(),
            }
        };
        let mut doe = Attributes::new();
        doe.insert("cn".into(), vec![Value::Text("John Doe".into())]);
        doe.insert(
            "objectGUID".into(),
            vec![Value::Binary(vec![0, 159, 255, 10])],
        );
        doe.insert(
            "description".into(),
            vec![Value::Text("plain".into()), Value::Binary(vec![0xff, 0xfe])],
        );
        let mut objects = vec![object(DOE, Some(DOE), doe)];
        for i in 0..people {
            let mut a = Attributes::new();
            a.insert("cn".into(), vec![Value::Text(format!("Person {i:02}"))]);
            let uid = format!("uid=p{i:02},ou=people,dc=example,dc=org");
            objects.push(object(&uid, Some(&uid), a));
        }
        let t = FenceToken {
            instance: "t".into(),
            incarnation: "space-test".into(),
            epoch: store.fence().await.unwrap().epoch + 1,
        };
        store.promote(&t).await.unwrap();
        let batch = ImportBatch {
            connector: "c1".into(),
            object_type: "people".into(),
            objects,
            watermark: None,
            seen_in_run: Some("run-1".into()),
            compose: false,
            composed: None,
        };
        store.commit_import_batch(&t, &batch, 1).await.unwrap();
        let identity = IdentityRow {
            id: "idn-doe".into(),
            display_name: "John Doe".into(),
            attributes_json: "{}".into(),
            created_at_ms: 1,
            updated_at_ms: 1,
        };
        store
            .commit_compose(
                &t,
                &[
                    ComposeWrite::PutIdentity {
                        identity,
                        keys: Vec::new(),
                    },
                    ComposeWrite::PutLink(LinkRow {
                        connector_id: "c1".into(),
                        anchor: DOE.into(),
                        identity_id: "idn-doe".into(),
                        precedence: 1,
                        contribution_json: "{}".into(),
                    }),
                ],
                2,
            )
            .await
            .unwrap();
        "c1".into()
    }

    #[tokio::test]
    async fn connector_objects_page_by_anchor_and_search() {
        let (_d, app, issuer, store) = app_with_store().await;
        let c = connector_space_fixture(&store, 6).await;
        let t = issuer.token(&["dashboard.read"], 300);

        // Pages of 3 by anchor, each cursor from the page before, the last without one.
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        let mut pages = 0;
        loop {
            let cursor = after
                .as_deref()
                .map(|a| format!("&after={}", encode(a)))
                .unwrap_or_default();
            let (st, page) = get_json(
                &app,
                &format!("/api/connectors/{c}/objects?limit=3{cursor}"),
                &t,
            )
            .await;
            assert_eq!(st, 200, "{page}");
            assert_eq!(page["total"], 7, "{page}");
            pages += 1;
            let items = page["items"].as_array().unwrap();
            seen.extend(
                items
                    .iter()
                    .map(|i| i["anchor"].as_str().unwrap().to_string()),
            );
            match page["next_after"].as_str() {
                Some(next) => {
                    assert_eq!(items.len(), 3, "{page}");
                    assert_eq!(Some(next), items.last().unwrap()["anchor"].as_str());
                    after = Some(next.to_string());
                }
                None => {
                    assert!(page["next_after"].is_null(), "{page}");
                    break;
                }
            }
        }
        assert_eq!(pages, 3);
        let mut want: Vec<String> = (0..6)
            .map(|i| format!("uid=p{i:02},ou=people,dc=example,dc=org"))
            .collect();
        want.push(DOE.into());
        want.sort();
        assert_eq!(seen, want, "every object once, in anchor order");

        // An item: anchor, type, dn, deleted, the joined identity.
        let (_, all) = get_json(&app, &format!("/api/connectors/{c}/objects"), &t).await;
        let doe = all["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["anchor"] == DOE)
            .unwrap()
            .clone();
        assert_eq!(
            doe,
            serde_json::json!({"anchor": DOE, "object_type": "people", "dn": DOE, "deleted": false, "identity_id": "idn-doe"})
        );
        assert!(all["items"][1]["identity_id"].is_null(), "{all}");

        // Search: a substring of the anchor or of the attributes, ignoring case.
        let search = |q: &str| {
            let (app, t, q) = (app.clone(), t.clone(), encode(q));
            async move {
                let (st, v) =
                    get_json(&app, &format!("/api/connectors/c1/objects?search={q}"), &t).await;
                assert_eq!(st, 200, "{v}");
                v["items"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|i| i["anchor"].as_str().unwrap().to_string())
                    .collect::<Vec<_>>()
            }
        };
        assert_eq!(
            search("person 03").await,
            vec!["uid=p03,ou=people,dc=example,dc=org".to_string()]
        );
        assert_eq!(search(r"DOE\, JOHN").await, vec![DOE.to_string()]);
        assert_eq!(
            search("uid=P05").await,
            vec!["uid=p05,ou=people,dc=example,dc=org".to_string()]
        );
        assert_eq!(
            search("AJ//Cg==").await,
            vec![DOE.to_string()],
            "bytes by their base64"
        );
        assert!(search("nobody").await.is_empty());
        assert_eq!(search("dc=example").await.len(), 7);
        // Search and paging together.
        let (_, page) = get_json(
            &app,
            &format!("/api/connectors/{c}/objects?search=person&limit=4"),
            &t,
        )
        .await;
        assert_eq!(page["items"].as_array().unwrap().len(), 4);
        let next = encode(page["next_after"].as_str().unwrap());
        let (_, page) = get_json(
            &app,
            &format!("/api/connectors/{c}/objects?search=person&limit=4&after={next}"),
            &t,
        )
        .await;
        assert_eq!(page["items"].as_array().unwrap().len(), 2, "{page}");
        assert!(page["next_after"].is_null());
    }

    #[tokio::test]
    async fn connector_objects_refuse_bad_limits_and_unknown_connectors() {
        let (_d, app, issuer, store) = app_with_store().await;
        let c = connector_space_fixture(&store, 1).await;
        let t = issuer.token(&["dashboard.read"], 300);
        for limit in ["0", "501", "-1"] {
            let (st, v) = get_json(
                &app,
                &format!("/api/connectors/{c}/objects?limit={limit}"),
                &t,
            )
            .await;
            assert_eq!(st, 422, "limit={limit}: {v}");
            assert!(
                v["detail"].as_str().unwrap().contains("between 1 and 500"),
                "{v}"
            );
        }
        for limit in ["1", "500"] {
            let (st, v) = get_json(
                &app,
                &format!("/api/connectors/{c}/objects?limit={limit}"),
                &t,
            )
            .await;
            assert_eq!(st, 200, "limit={limit}: {v}");
        }
        let (st, v) = get_json(&app, &format!("/api/connectors/{c}/objects?limit=many"), &t).await;
        assert_eq!(st, 400, "{v}");
        let (st, v) = get_json(&app, &format!("/api/connectors/{c}/objects?serch=x"), &t).await;
        assert_eq!(st, 400, "an unknown parameter is refused, not ignored: {v}");
        for path in [
            "/api/connectors/nope/objects".to_string(),
            format!("/api/connectors/nope/objects/{}", encode(DOE)),
        ] {
            let (st, v) = get_json(&app, &path, &t).await;
            assert_eq!(st, 404, "{path}: {v}");
            assert!(
                v["detail"].as_str().unwrap().contains("no connector"),
                "{v}"
            );
        }
        let (st, v) = get_json(
            &app,
            &format!("/api/connectors/{c}/objects/{}", encode("uid=nobody")),
            &t,
        )
        .await;
        assert_eq!(st, 404, "{v}");
        assert!(v["detail"].as_str().unwrap().contains("uid=nobody"), "{v}");
    }

    #[tokio::test]
    async fn a_connector_object_shows_its_attributes_with_binary_values_as_base64() {
        let (_d, app, issuer, store) = app_with_store().await;
        let c = connector_space_fixture(&store, 1).await;
        let t = issuer.token(&["dashboard.read"], 300);
        // The DN's `,` `=` ` ` `/` and `\` round-trip through one percent-encoded segment.
        let (st, o) = get_json(
            &app,
            &format!("/api/connectors/{c}/objects/{}", encode(DOE)),
            &t,
        )
        .await;
        assert_eq!(st, 200, "{o}");
        assert_eq!(o["anchor"], DOE);
        assert_eq!(o["dn"], DOE);
        assert_eq!(o["connector_id"], "c1");
        assert_eq!(o["object_type"], "people");
        assert_eq!(o["deleted"], false);
        assert_eq!(o["seen_in_run"], "run-1");
        assert_eq!(o["identity_id"], "idn-doe");
        assert!(
            o["updated_at"]
                .as_str()
                .unwrap()
                .starts_with("1970-01-01T00:00:00.001"),
            "{o}"
        );
        assert_eq!(
            o["attributes"],
            serde_json::json!([
                {"name": "cn", "values": [{"value": "John Doe", "binary": false}]},
                {"name": "description", "values": [
                    {"value": "plain", "binary": false},
                    {"value": "//4=", "binary": true}
                ]},
                {"name": "objectGUID", "values": [{"value": "AJ//Cg==", "binary": true}]}
            ]),
            "{o}"
        );
        assert!(
            o.get("attributes_json").is_none(),
            "the stored form parsed: {o}"
        );
        // An unlinked object, by its encoded anchor too.
        let uid = "uid=p00,ou=people,dc=example,dc=org";
        let (st, o) = get_json(
            &app,
            &format!("/api/connectors/{c}/objects/{}", encode(uid)),
            &t,
        )
        .await;
        assert_eq!(st, 200, "{o}");
        assert_eq!(o["anchor"], uid);
        assert!(o["identity_id"].is_null(), "{o}");
    }

    #[tokio::test]
    async fn audit_filters_narrow_the_log() {
        let (_d, app, issuer, store) = app_with_store().await;
        let t = issuer.token(&["audit.read"], 300);
        let at = |s: &str| {
            chrono::DateTime::parse_from_rfc3339(s)
                .unwrap()
                .timestamp_millis()
        };
        for (when, actor, action) in [
            ("2026-01-01T10:00:00Z", "alice", "connector.create"),
            ("2026-01-02T10:00:00Z", "bob", "connector.delete"),
            ("2026-01-03T10:00:00Z", "alice", "schedule.create"),
            ("2026-01-04T10:00:00Z", "bob", "connectors.other"),
        ] {
            store
                .append_audit(&crate::store::AuditEntry {
                    at_ms: at(when),
                    actor: actor.into(),
                    action: action.into(),
                    target: when.into(),
                    detail: String::new(),
                })
                .await
                .unwrap();
        }
        let targets = |q: &'static str| {
            let (app, t) = (app.clone(), t.clone());
            async move {
                let (st, v) = get_json(&app, &format!("/api/audit{q}"), &t).await;
                assert_eq!(st, 200, "{q}: {v}");
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e["target"].as_str().unwrap()[8..10].to_string())
                    .collect::<Vec<_>>()
            }
        };
        assert_eq!(
            targets("").await,
            ["04", "03", "02", "01"],
            "all, newest first"
        );
        assert_eq!(targets("?actor=alice").await, ["03", "01"]);
        assert_eq!(targets("?action=connector.create").await, ["01"], "exact");
        assert_eq!(
            targets("?action=connector.").await,
            ["02", "01"],
            "a prefix ending with a dot"
        );
        assert!(
            targets("?action=connector").await.is_empty(),
            "no prefix without the dot"
        );
        assert_eq!(
            targets("?since=2026-01-03T10:00:00Z").await,
            ["04", "03"],
            "since is inclusive"
        );
        assert_eq!(
            targets("?until=2026-01-02T10:00:00Z").await,
            ["01"],
            "until is exclusive"
        );
        // An offset, its `+` encoded, and one sent bare (a query string makes it a space).
        assert_eq!(
            targets("?since=2026-01-02T11:00:00%2B01:00").await,
            ["04", "03", "02"]
        );
        assert_eq!(
            targets("?since=2026-01-02T11:00:00+01:00").await,
            ["04", "03", "02"]
        );
        assert_eq!(targets("?limit=1").await, ["04"]);
        assert_eq!(
            targets("?actor=bob&action=connector.&since=2026-01-02T00:00:00Z").await,
            ["02"]
        );

        for (q, name) in [
            ("?since=yesterday", "since"),
            ("?until=2026-13-01T00:00:00Z", "until"),
            ("?since=2026-01-01", "since"),
        ] {
            let (st, v) = get_json(&app, &format!("/api/audit{q}"), &t).await;
            assert_eq!(st, 422, "{q}: {v}");
            let detail = v["detail"].as_str().unwrap();
            assert!(
                detail.starts_with(&format!("{name} must be an RFC 3339 timestamp")),
                "{detail}"
            );
            assert!(detail.contains("2026-01-31T08:00:00Z"), "{detail}");
        }
        let (st, v) = get_json(&app, "/api/audit?actr=alice", &t).await;
        assert_eq!(st, 400, "an unknown filter is refused, not ignored: {v}");
    }
}
