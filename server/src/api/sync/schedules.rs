//! Schedules, and pausing or resuming all of them (the runbook's drain step).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value as Json_};

use super::{not_found, sync, unprocessable};
use crate::api::{audit_action, rfc3339, store_problem, AppState, Caller, RouteSpec};
use crate::auth::Permission;
use crate::problem::{JsonBody, Problem};
use crate::store::{now_ms, ScheduleRow};
use crate::sync::runner::RunMode;
use crate::sync::schedule;

/// These routes and their permissions (see [`crate::api::routes`]).
pub const ROUTES: &[RouteSpec] = &[
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
];

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/schedules", get(list_schedules).post(create_schedule))
        .route(
            "/api/schedules/{id}",
            axum::routing::delete(delete_schedule).patch(patch_schedule),
        )
        .route("/api/sync", get(sync_state))
        .route("/api/sync/pause", post(pause))
        .route("/api/sync/resume", post(resume))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScheduleBody {
    connector_id: String,
    kind: String,
    spec: String,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default = "yes")]
    enabled: bool,
}

fn yes() -> bool {
    true
}

fn schedule_view(s: ScheduleRow) -> Json_ {
    json!({
        "id": s.id, "connector_id": s.connector_id, "kind": s.kind, "spec": s.spec,
        "mode": s.mode, "enabled": s.enabled, "next_run": s.next_run_ms.map(rfc3339),
    })
}

async fn list_schedules(State(st): State<AppState>, _c: Caller) -> Result<Response, Problem> {
    let rows = st.engine.store().schedules().await.map_err(store_problem)?;
    Ok(Json(rows.into_iter().map(schedule_view).collect::<Vec<_>>()).into_response())
}

async fn create_schedule(
    State(st): State<AppState>,
    Caller(who): Caller,
    JsonBody(b): JsonBody<ScheduleBody>,
) -> Result<Response, Problem> {
    let mut errors = Vec::new();
    let spec = match schedule::parse(&b.kind, &b.spec) {
        Ok(s) => Some(s),
        Err(e) => {
            errors.push(format!("spec: {e}"));
            None
        }
    };
    let mode = b.mode.clone().unwrap_or_else(|| "delta".into());
    if RunMode::parse(&mode).is_none_or(|m| m == RunMode::Clear) {
        errors.push(format!(
            "mode: {mode:?} is unknown; use \"full\" or \"delta\""
        ));
    }
    let store = st.engine.store();
    if store
        .connector(&b.connector_id)
        .await
        .map_err(store_problem)?
        .is_none()
    {
        errors.push(format!(
            "connector_id: no connector with id {:?}",
            b.connector_id
        ));
    }
    if !errors.is_empty() {
        return Err(unprocessable(
            format!("the schedule is not valid: {}", errors.join("; ")),
            errors,
        ));
    }
    let now = now_ms();
    let row = ScheduleRow {
        id: uuid::Uuid::new_v4().simple().to_string(),
        connector_id: b.connector_id,
        kind: b.kind,
        spec: b.spec,
        mode,
        enabled: b.enabled,
        next_run_ms: spec.and_then(|s| schedule::next_after(&s, now)),
        created_at_ms: now,
    };
    store.put_schedule(&row).await.map_err(store_problem)?;
    audit_action(
        &st,
        &who.subject,
        "schedule.create",
        format!("schedule/{}", row.id),
        json!({"connector": row.connector_id, "kind": row.kind, "spec": row.spec}),
    )
    .await;
    Ok((StatusCode::CREATED, Json(schedule_view(row))).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SchedulePatch {
    enabled: bool,
}

async fn patch_schedule(
    State(st): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<SchedulePatch>,
) -> Result<Response, Problem> {
    let store = st.engine.store();
    let mut row = store
        .schedules()
        .await
        .map_err(store_problem)?
        .into_iter()
        .find(|s| s.id == id)
        .ok_or_else(|| not_found("schedule", &id))?;
    row.enabled = b.enabled;
    // A disabled schedule keeps no next run; enabling one counts from now.
    row.next_run_ms = if b.enabled {
        schedule::parse(&row.kind, &row.spec)
            .ok()
            .and_then(|s| schedule::next_after(&s, now_ms()))
    } else {
        None
    };
    store.put_schedule(&row).await.map_err(store_problem)?;
    let action = if b.enabled {
        "schedule.enable"
    } else {
        "schedule.disable"
    };
    audit_action(
        &st,
        &who.subject,
        action,
        format!("schedule/{id}"),
        json!({}),
    )
    .await;
    Ok(Json(schedule_view(row)).into_response())
}

async fn delete_schedule(
    State(st): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    if !st
        .engine
        .store()
        .delete_schedule(&id)
        .await
        .map_err(store_problem)?
    {
        return Err(not_found("schedule", &id));
    }
    audit_action(
        &st,
        &who.subject,
        "schedule.delete",
        format!("schedule/{id}"),
        json!({}),
    )
    .await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn sync_state(State(st): State<AppState>, _c: Caller) -> Result<Response, Problem> {
    let sync = sync(&st)?;
    let paused = sync.paused().await.map_err(store_problem)?;
    let running: Vec<Json_> = sync
        .running()
        .into_iter()
        .map(|(c, r)| json!({"connector_id": c, "run_id": r}))
        .collect();
    // The last cutover is the newest promotion in the audit log (every promote is audited).
    let promote = crate::store::AuditFilter {
        action: Some("promote".into()),
        ..crate::store::AuditFilter::latest(1)
    };
    let last_cutover = st
        .engine
        .store()
        .audit(&promote)
        .await
        .map_err(store_problem)?
        .into_iter()
        .next()
        .map(|e| {
            let epoch = serde_json::from_str::<Json_>(&e.detail)
                .ok()
                .and_then(|d| d["epoch"].as_i64());
            json!({"at": rfc3339(e.at_ms), "instance": e.target, "epoch": epoch, "by": e.actor})
        });
    Ok(Json(json!({
        "paused": paused, "role": st.engine.status().role, "running": running,
        "last_cutover": last_cutover,
    }))
    .into_response())
}

async fn set_paused(st: AppState, who: String, paused: bool) -> Result<Response, Problem> {
    let sync = sync(&st)?;
    sync.set_paused(paused, &who).await.map_err(store_problem)?;
    let running = sync.running().len();
    Ok(Json(json!({"paused": paused, "running": running})).into_response())
}

async fn pause(State(st): State<AppState>, Caller(who): Caller) -> Result<Response, Problem> {
    set_paused(st, who.subject, true).await
}

async fn resume(State(st): State<AppState>, Caller(who): Caller) -> Result<Response, Problem> {
    set_paused(st, who.subject, false).await
}
