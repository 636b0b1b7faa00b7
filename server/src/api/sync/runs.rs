//! Runs: start one now (full, delta) or clear a connector's space, and the run history.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value as Json_};

use super::{bad_query, not_found, page_limit, sync};
use crate::api::{audit_action, rfc3339, store_problem, AppState, Caller, RouteSpec};
use crate::auth::Permission;
use crate::problem::{JsonBody, Problem};
use crate::store::RunRow;
use crate::sync::runner::RunError;
use crate::sync::runner::RunMode;

/// These routes and their permissions (see [`crate::api::routes`]).
pub const ROUTES: &[RouteSpec] = &[
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
];

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/connectors/{id}/runs", post(start_run))
        .route("/api/connectors/{id}/clear", post(clear_connector))
        .route("/api/runs", get(list_runs))
        .route("/api/runs/{id}", get(get_run))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunBody {
    #[serde(default)]
    mode: Option<String>,
}

fn run_problem(e: RunError) -> Problem {
    match e {
        RunError::NotActive | RunError::Paused | RunError::AlreadyRunning(_) => {
            Problem::conflict(e.to_string())
        }
        RunError::NotFound(id) => not_found("connector", &id),
        RunError::Invalid { .. } => Problem::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
        RunError::Store(s) => store_problem(s),
    }
}

async fn start_run(
    State(st): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<RunBody>,
) -> Result<Response, Problem> {
    let mode = match b.mode.as_deref() {
        None => RunMode::Delta,
        Some(m) => RunMode::parse(m).ok_or_else(|| {
            Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("mode {m:?} is unknown; use \"full\" or \"delta\""),
            )
        })?,
    };
    // Starting runs needs only schedules.manage; a clear deletes the connector's objects and
    // their identity contributions, so it stays behind connectors.write on its own route.
    if mode == RunMode::Clear {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "mode \"clear\" is not a run mode: clearing deletes the connector's objects; \
                 use POST /api/connectors/{id}/clear, which needs connectors.write"
            ),
        ));
    }
    let (run, _task) = sync(&st)?
        .start(&id, mode, "manual")
        .await
        .map_err(run_problem)?;
    audit_action(
        &st,
        &who.subject,
        "run.start",
        format!("connector/{id}"),
        json!({"run": run.id, "mode": run.mode}),
    )
    .await;
    Ok((StatusCode::ACCEPTED, Json(run_view(run))).into_response())
}

async fn clear_connector(
    State(st): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let (run, _task) = sync(&st)?
        .start(&id, RunMode::Clear, "manual")
        .await
        .map_err(run_problem)?;
    audit_action(
        &st,
        &who.subject,
        "connector.clear",
        format!("connector/{id}"),
        json!({"run": run.id}),
    )
    .await;
    Ok((StatusCode::ACCEPTED, Json(run_view(run))).into_response())
}

fn run_view(r: RunRow) -> Json_ {
    let errors: Json_ = r
        .errors_json
        .as_deref()
        .and_then(|e| serde_json::from_str(e).ok())
        .unwrap_or_else(|| json!([]));
    json!({
        "id": r.id, "connector_id": r.connector_id, "instance": r.instance, "epoch": r.epoch,
        "mode": r.mode, "trigger": r.trigger, "status": r.status,
        "started_at": rfc3339(r.started_at_ms), "finished_at": r.finished_at_ms.map(rfc3339),
        "counts": {"added": r.added, "updated": r.updated, "unchanged": r.unchanged, "deleted": r.deleted, "failed": r.failed},
        "error": r.error, "errors": errors,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunsQuery {
    connector: Option<String>,
    limit: Option<i64>,
}

async fn list_runs(
    State(st): State<AppState>,
    _c: Caller,
    q: Result<Query<RunsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let Query(q) = q.map_err(bad_query)?;
    let limit = page_limit(q.limit)?;
    let rows = st
        .engine
        .store()
        .runs(q.connector.as_deref(), limit)
        .await
        .map_err(store_problem)?;
    Ok(Json(rows.into_iter().map(run_view).collect::<Vec<_>>()).into_response())
}

async fn get_run(
    State(st): State<AppState>,
    _c: Caller,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let r = st
        .engine
        .store()
        .run(&id)
        .await
        .map_err(store_problem)?
        .ok_or_else(|| not_found("run", &id))?;
    Ok(Json(run_view(r)).into_response())
}
