//! The Admin API's own routes: instances, the audit log, relays.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::{audit_action, rfc3339, store_problem, AppState, Caller, RouteSpec};
use crate::auth::Permission;
use crate::problem::{JsonBody, Problem};
use crate::store::{Role, StoreError};

/// The admin routes and their permissions (see [`super::routes`]).
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
];

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/instances", get(instances))
        .route("/api/audit", get(audit))
        .route("/api/relays", get(list_relays).post(create_relay))
        .route("/api/relays/{id}", axum::routing::delete(revoke_relay))
}

/// A relay is shown Connected while its hub connection is recorded and seen this recently.
const RELAY_SEEN_WINDOW_MS: i64 = 45_000;

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

async fn instances(State(st): State<AppState>, _caller: Caller) -> Result<Response, Problem> {
    instance_rows(&st).await
}

pub(super) async fn instance_rows(st: &AppState) -> Result<Response, Problem> {
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
