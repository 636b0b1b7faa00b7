//! Admin API for the sync engine: connectors, runs, schedules, pause/resume, identities and
//! secrets. Each route's permission is declared in [`crate::api::ROUTES`] like every other.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value as Json_};

use crate::api::{audit_action, rfc3339, store_problem, AppState, Caller};
use crate::auth::{Permission, Principal};
use crate::problem::{JsonBody, Problem};
use crate::store::{now_ms, ConnectorRow, RunRow, ScheduleRow, StoreError};
use crate::sync::composer::ConnectorRules;
use crate::sync::runner::{RunError, RunMode, SyncEngine};
use crate::sync::schedule;
use crate::sync::source::{entrusts_secret, Source, SourceConfig};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/api/connectors",
            get(list_connectors).post(create_connector),
        )
        .route(
            "/api/connectors/{id}",
            get(get_connector)
                .put(update_connector)
                .delete(delete_connector),
        )
        .route("/api/connectors/{id}/test", post(test_connector))
        .route("/api/connectors/{id}/runs", post(start_run))
        .route("/api/connectors/{id}/clear", post(clear_connector))
        .route("/api/connectors/{id}/objects", get(list_objects))
        .route("/api/connectors/{id}/objects/{anchor}", get(get_object))
        .route("/api/runs", get(list_runs))
        .route("/api/runs/{id}", get(get_run))
        .route("/api/schedules", get(list_schedules).post(create_schedule))
        .route(
            "/api/schedules/{id}",
            axum::routing::delete(delete_schedule).patch(patch_schedule),
        )
        .route("/api/sync", get(sync_state))
        .route("/api/sync/pause", post(pause))
        .route("/api/sync/resume", post(resume))
        .route("/api/identities", get(list_identities))
        .route("/api/identities/{id}", get(get_identity))
        .route("/api/secrets", get(list_secrets))
        .route("/api/secrets/{id}", put(set_secret).delete(delete_secret))
}

/// Precedence of a connector created without rules (lower numbers win).
const DEFAULT_PRECEDENCE: i32 = 100;

fn sync(st: &AppState) -> Result<&Arc<SyncEngine>, Problem> {
    st.sync
        .as_ref()
        .ok_or_else(|| Problem::unavailable("the sync engine is not running in this process"))
}

fn unprocessable(detail: impl Into<String>, errors: Vec<String>) -> Problem {
    Problem::new(StatusCode::UNPROCESSABLE_ENTITY, detail).with("errors", json!(errors))
}

fn not_found(what: &str, id: &str) -> Problem {
    Problem::new(StatusCode::NOT_FOUND, format!("no {what} with id {id:?}"))
}

fn bad_query(e: axum::extract::rejection::QueryRejection) -> Problem {
    Problem::bad_request(format!("bad query: {}", e.body_text()))
}

// ---- connectors ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConnectorBody {
    name: String,
    kind: String,
    config: Json_,
    #[serde(default)]
    rules: Option<Json_>,
    #[serde(default)]
    relay_id: Option<String>,
    #[serde(default)]
    canary: bool,
}

#[derive(Serialize)]
struct ConnectorView {
    id: String,
    name: String,
    kind: String,
    config: Json_,
    rules: Json_,
    relay_id: Option<String>,
    canary: bool,
    created_at: String,
    updated_at: String,
}

fn view(c: ConnectorRow) -> ConnectorView {
    ConnectorView {
        config: serde_json::from_str(&c.config_json).unwrap_or(Json_::Null),
        rules: serde_json::from_str(&c.rules_json).unwrap_or(Json_::Null),
        id: c.id,
        name: c.name,
        kind: c.kind,
        relay_id: c.relay_id,
        canary: c.is_canary,
        created_at: rfc3339(c.created_at_ms),
        updated_at: rfc3339(c.updated_at_ms),
    }
}

/// A saved connector's answer: its view and what could not be checked (`warnings`).
fn saved(row: ConnectorRow, warnings: Vec<String>) -> Json_ {
    let mut v = serde_json::to_value(view(row)).unwrap_or_default();
    v["warnings"] = json!(warnings);
    v
}

/// A connector body that passed [`validate`], and what could not be checked now.
struct Valid {
    config_json: String,
    rules_json: String,
    /// Saved anyway, said in the answer's `warnings` (e.g. a relay that is not connected).
    warnings: Vec<String>,
}

/// What a relay says of a CSV folder on its host at save time.
enum RelayFolder {
    Inside,
    Refused(String),
    NotChecked(String),
}

/// Asks relay `relay` (named `name`) whether `folder` is inside its drop roots.
async fn relay_folder(st: &AppState, relay: &str, name: &str, folder: &str) -> RelayFolder {
    let not_checked = |why: &str| {
        RelayFolder::NotChecked(format!(
            "config.folder was not checked: {why}; relay {name:?} checks it again on every read"
        ))
    };
    let Some(hub) = st.hub.as_ref() else {
        return not_checked("this server has no relay hub");
    };
    let Some(conn) = hub.connections_of(relay).into_iter().next() else {
        return not_checked("the relay is not connected");
    };
    let asked = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        hub.invoke(
            &conn,
            crate::sync::source::RELAY_CHECK_FOLDER_METHOD,
            vec![json!(folder)],
        ),
    )
    .await;
    match asked {
        Ok(Ok(_)) => RelayFolder::Inside,
        Ok(Err(identitymesh_signalr::hub::InvokeError::Remote(m)))
            if m.contains("is not implemented by this relay") =>
        {
            not_checked("the relay is an older version without the check")
        }
        Ok(Err(identitymesh_signalr::hub::InvokeError::Remote(m))) => {
            RelayFolder::Refused(format!("config.folder: {m} (on relay {name:?})"))
        }
        Ok(Err(e)) => not_checked(&e.to_string()),
        Err(_) => not_checked("the relay did not answer within 10 s"),
    }
}

/// Checks a connector body completely and reports every problem at once, with field paths.
async fn validate(st: &AppState, b: &ConnectorBody) -> Result<Valid, Problem> {
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let mut relay_csv_folder = None;
    let name = b.name.trim();
    if name.is_empty()
        || name.len() > 128
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ' '))
    {
        errors
            .push("name: use 1-128 characters of letters, digits, spaces, '-', '_' or '.'".into());
    }
    let config_json = b.config.to_string();
    match SourceConfig::parse(&b.kind, &config_json) {
        Err(e) => errors.extend(e),
        // A relay-bound connector reads the relay's host, not this one.
        Ok(cfg) if b.relay_id.is_none() => {
            if let (SourceConfig::Csv(c), Some(sync)) = (&cfg, st.sync.as_ref()) {
                if let Err(e) = sync.csv_roots().resolve(&c.folder) {
                    errors.push(format!("config.folder: {e}"));
                }
            }
        }
        Ok(SourceConfig::Csv(c)) => relay_csv_folder = Some(c.folder.display().to_string()),
        Ok(_) => {}
    }
    // Without rules a connector only imports: its objects join no identities.
    let rules_value = b
        .rules
        .clone()
        .unwrap_or_else(|| json!({"precedence": DEFAULT_PRECEDENCE}));
    let rules_json = rules_value.to_string();
    let d = &mut serde_json::Deserializer::from_str(&rules_json);
    match serde_path_to_error::deserialize::<_, ConnectorRules>(d) {
        Ok(r) => {
            if let Err(e) = r.compile() {
                errors.push(format!("rules.{e}"));
            }
        }
        Err(e) => {
            let path = e.path().to_string();
            errors.push(if path == "." {
                format!("rules: {}", e.inner())
            } else {
                format!("rules.{path}: {}", e.inner())
            })
        }
    }
    if let Some(relay) = &b.relay_id {
        let relays = st.engine.store().relays().await.map_err(store_problem)?;
        match relays.iter().find(|r| &r.id == relay) {
            None => errors.push(format!(
                "relay_id: no relay with id {relay:?} (see GET /api/relays)"
            )),
            Some(r) if r.revoked_at_ms.is_some() => {
                errors.push(format!("relay_id: relay {relay:?} is revoked"))
            }
            Some(r) => {
                // A relay-bound CSV folder is on the relay's host: the relay says whether it is
                // inside its own drop roots.
                if let Some(folder) = &relay_csv_folder {
                    match relay_folder(st, relay, &r.name, folder).await {
                        RelayFolder::Inside => {}
                        RelayFolder::Refused(m) => errors.push(m),
                        RelayFolder::NotChecked(m) => warnings.push(m),
                    }
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(Valid {
            config_json,
            rules_json,
            warnings,
        })
    } else {
        Err(unprocessable(
            format!("the connector is not valid: {}", errors.join("; ")),
            errors,
        ))
    }
}

async fn list_connectors(State(st): State<AppState>, _c: Caller) -> Result<Response, Problem> {
    let rows = st
        .engine
        .store()
        .connectors()
        .await
        .map_err(store_problem)?;
    Ok(Json(rows.into_iter().map(view).collect::<Vec<_>>()).into_response())
}

async fn get_connector(
    State(st): State<AppState>,
    _c: Caller,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let row = connector_row(&st, &id).await?;
    let objects = st
        .engine
        .store()
        .count_objects(&id)
        .await
        .map_err(store_problem)?;
    let mut v = serde_json::to_value(view(row)).unwrap_or_default();
    v["objects"] = json!(objects);
    Ok(Json(v).into_response())
}

async fn connector_row(st: &AppState, id: &str) -> Result<ConnectorRow, Problem> {
    st.engine
        .store()
        .connector(id)
        .await
        .map_err(store_problem)?
        .ok_or_else(|| not_found("connector", id))
}

/// `?limit=` within 1..=500, 50 when absent.
fn page_limit(limit: Option<i64>) -> Result<i64, Problem> {
    let limit = limit.unwrap_or(50);
    if (1..=500).contains(&limit) {
        Ok(limit)
    } else {
        Err(Problem::bad_request("limit must be between 1 and 500"))
    }
}

fn conflict_or(e: StoreError) -> Problem {
    match e {
        StoreError::Conflict(m) => Problem::conflict(m),
        other => store_problem(other),
    }
}

/// Refuses a save that would send a stored secret somewhere it was not entrusted to, unless
/// the caller may also write secrets (see [`entrusts_secret`]).
fn check_entrusted(
    who: &Principal,
    kind: &str,
    old: Option<&ConnectorRow>,
    config_json: &str,
    relay_id: Option<&str>,
) -> Result<(), Problem> {
    if who.permissions.contains(&Permission::SecretsWrite) {
        return Ok(());
    }
    let destination = |kind: &str, json: &str, relay: Option<&str>| {
        SourceConfig::parse(kind, json)
            .ok()
            .and_then(|c| c.secret_destination(relay))
    };
    let new = destination(kind, config_json, relay_id);
    let old = old.and_then(|o| destination(&o.kind, &o.config_json, o.relay_id.as_deref()));
    if !entrusts_secret(old.as_ref(), new.as_ref()) {
        return Ok(());
    }
    let secret = new.map(|n| n.secret_ref).unwrap_or_default();
    Err(Problem::new(
        StatusCode::FORBIDDEN,
        format!(
            "this save would send the stored secret {secret:?} to a destination it was not entrusted to \
             (a new connector, or a changed url, bind_dn, bind_password_ref or relay_id): that needs \
             secrets.write as well as connectors.write; ask someone who has it to save the connector, \
             or save it without bind_password_ref"
        ),
    ))
}

async fn create_connector(
    State(st): State<AppState>,
    Caller(who): Caller,
    JsonBody(b): JsonBody<ConnectorBody>,
) -> Result<Response, Problem> {
    let Valid {
        config_json,
        rules_json,
        warnings,
    } = validate(&st, &b).await?;
    check_entrusted(&who, &b.kind, None, &config_json, b.relay_id.as_deref())?;
    let now = now_ms();
    let row = ConnectorRow {
        id: uuid::Uuid::new_v4().simple().to_string(),
        name: b.name.trim().to_string(),
        kind: b.kind.clone(),
        config_json,
        rules_json,
        relay_id: b.relay_id.clone(),
        is_canary: b.canary,
        created_at_ms: now,
        updated_at_ms: now,
    };
    st.engine
        .store()
        .put_connector(&row)
        .await
        .map_err(conflict_or)?;
    audit_action(
        &st,
        &who.subject,
        "connector.create",
        format!("connector/{}", row.id),
        json!({"name": row.name, "kind": row.kind}),
    )
    .await;
    Ok((StatusCode::CREATED, Json(saved(row, warnings))).into_response())
}

async fn update_connector(
    State(st): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<ConnectorBody>,
) -> Result<Response, Problem> {
    let old = connector_row(&st, &id).await?;
    let Valid {
        config_json,
        rules_json,
        warnings,
    } = validate(&st, &b).await?;
    if b.kind != old.kind {
        return Err(unprocessable(
            "kind cannot change; create a new connector instead",
            vec![format!("kind: was {:?}", old.kind)],
        ));
    }
    check_entrusted(
        &who,
        &b.kind,
        Some(&old),
        &config_json,
        b.relay_id.as_deref(),
    )?;
    let row = ConnectorRow {
        name: b.name.trim().to_string(),
        config_json,
        rules_json,
        relay_id: b.relay_id.clone(),
        is_canary: b.canary,
        updated_at_ms: now_ms(),
        ..old
    };
    st.engine
        .store()
        .put_connector(&row)
        .await
        .map_err(conflict_or)?;
    audit_action(
        &st,
        &who.subject,
        "connector.update",
        format!("connector/{id}"),
        json!({"name": row.name}),
    )
    .await;
    Ok(Json(saved(row, warnings)).into_response())
}

async fn delete_connector(
    State(st): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let gone = st
        .engine
        .store()
        .delete_connector(&id)
        .await
        .map_err(conflict_or)?;
    if !gone {
        return Err(not_found("connector", &id));
    }
    audit_action(
        &st,
        &who.subject,
        "connector.delete",
        format!("connector/{id}"),
        json!({}),
    )
    .await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn test_connector(
    State(st): State<AppState>,
    _c: Caller,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let sync = sync(&st)?;
    let row = connector_row(&st, &id).await?;
    let result = match Source::build(&row, sync.secrets(), sync.hub(), sync.csv_roots()).await {
        Ok((source, _)) => source.test().await,
        Err(e) => Err(e),
    };
    Ok(Json(match result {
        Ok(report) => json!({"ok": true, "steps": report.steps}),
        Err(e) => json!({"ok": false, "error": e.to_string()}),
    })
    .into_response())
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

// ---- connector space ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ObjectsQuery {
    search: Option<String>,
    after: Option<String>,
    limit: Option<i64>,
}

/// Objects per page when `?limit=` is absent, and the most a page may ask for.
const OBJECTS_PAGE: i64 = 50;
const OBJECTS_PAGE_MAX: i64 = 500;

async fn list_objects(
    State(st): State<AppState>,
    _c: Caller,
    Path(id): Path<String>,
    q: Result<Query<ObjectsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let Query(q) = q.map_err(bad_query)?;
    let limit = q.limit.unwrap_or(OBJECTS_PAGE);
    if !(1..=OBJECTS_PAGE_MAX).contains(&limit) {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("limit must be between 1 and {OBJECTS_PAGE_MAX}; got {limit}"),
        ));
    }
    connector_row(&st, &id).await?;
    let search = q.search.as_deref().map(str::trim).filter(|s| !s.is_empty());
    let after = q.after.as_deref().filter(|a| !a.is_empty());
    let store = st.engine.store();
    let mut rows = store
        .connector_space(&id, search, after, limit + 1)
        .await
        .map_err(store_problem)?;
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next_after = if more {
        rows.last().map(|r| r.anchor.clone())
    } else {
        None
    };
    let total = store.count_objects(&id).await.map_err(store_problem)?;
    Ok(Json(json!({"items": rows, "next_after": next_after, "total": total})).into_response())
}

/// The stored attributes (`{"dn"?, "attributes": {name: [value]}}`, a value a string or
/// `{"base64": ...}`) as the API shows them: the DN, and each attribute with its values in
/// stored order, every value `{"value", "binary"}`, binary ones as their base64. A value is
/// flagged on its own: the LDAP connector keeps a value that is not UTF-8 as bytes even in a
/// text attribute.
fn attributes_view(attributes_json: &str) -> (Option<String>, Json_) {
    let stored: Json_ = match serde_json::from_str(attributes_json) {
        Ok(v) => v,
        Err(_) => return (None, Json_::Null),
    };
    let dn = stored.get("dn").and_then(Json_::as_str).map(str::to_string);
    let value = |v: &Json_| match v {
        Json_::String(t) => json!({"value": t, "binary": false}),
        Json_::Object(o) if o.get("base64").is_some_and(Json_::is_string) => {
            json!({"value": o["base64"], "binary": true})
        }
        other => json!({"value": other.to_string(), "binary": false}),
    };
    let attributes: Vec<Json_> = stored
        .get("attributes")
        .and_then(Json_::as_object)
        .map(|m| {
            m.iter()
                .map(|(name, values)| {
                    let values: Vec<Json_> = match values {
                        Json_::Array(a) => a.iter().map(value).collect(),
                        one => vec![value(one)],
                    };
                    json!({"name": name, "values": values})
                })
                .collect()
        })
        .unwrap_or_default();
    (dn, Json_::Array(attributes))
}

async fn get_object(
    State(st): State<AppState>,
    _c: Caller,
    Path((id, anchor)): Path<(String, String)>,
) -> Result<Response, Problem> {
    connector_row(&st, &id).await?;
    let o = st
        .engine
        .store()
        .connector_object(&id, &anchor)
        .await
        .map_err(store_problem)?
        .ok_or_else(|| {
            Problem::new(
                StatusCode::NOT_FOUND,
                format!(
                    "connector {id:?} has no object with anchor {anchor:?} (list them with \
                     GET /api/connectors/{id}/objects; percent-encode the anchor in the path)"
                ),
            )
        })?;
    let (dn, attributes) = attributes_view(&o.attributes_json);
    let mut v = json!({
        "connector_id": id, "anchor": o.anchor, "object_type": o.object_type, "dn": dn,
        "deleted": o.deleted, "pending": o.pending, "seen_in_run": o.seen_run,
        "updated_at": rfc3339(o.updated_at_ms), "identity_id": o.identity_id,
        "attributes": attributes,
    });
    if v["attributes"].is_null() {
        // Not the stored form: shown as it is rather than not at all.
        v["attributes_json"] = json!(o.attributes_json);
    }
    Ok(Json(v).into_response())
}

// ---- schedules and pause ----

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

// ---- identities ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentitiesQuery {
    search: Option<String>,
    after: Option<String>,
    limit: Option<i64>,
}

fn identity_view(r: crate::store::IdentityRow) -> Json_ {
    let merged: Json_ = serde_json::from_str(&r.attributes_json).unwrap_or(Json_::Null);
    json!({
        "id": r.id, "display_name": r.display_name,
        "attributes": merged.get("attributes").cloned().unwrap_or(Json_::Null),
        "sources": merged.get("sources").cloned().unwrap_or(Json_::Null),
        "created_at": rfc3339(r.created_at_ms), "updated_at": rfc3339(r.updated_at_ms),
    })
}

async fn list_identities(
    State(st): State<AppState>,
    _c: Caller,
    q: Result<Query<IdentitiesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let Query(q) = q.map_err(bad_query)?;
    let limit = page_limit(q.limit)?;
    let search = q.search.as_deref().map(str::trim).filter(|s| !s.is_empty());
    let store = st.engine.store();
    let rows = store
        .identities(search, q.after.as_deref(), limit + 1)
        .await
        .map_err(store_problem)?;
    let more = rows.len() as i64 > limit;
    let items: Vec<_> = rows.into_iter().take(limit as usize).collect();
    let next = if more {
        items.last().map(|r| r.id.clone())
    } else {
        None
    };
    let total = store.count_identities().await.map_err(store_problem)?;
    Ok(Json(json!({
        "items": items.into_iter().map(identity_view).collect::<Vec<_>>(),
        "next": next,
        "total": total,
    }))
    .into_response())
}

async fn get_identity(
    State(st): State<AppState>,
    _c: Caller,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let store = st.engine.store();
    let row = store
        .identity(&id)
        .await
        .map_err(store_problem)?
        .ok_or_else(|| not_found("identity", &id))?;
    let links = store.links_of_identity(&id).await.map_err(store_problem)?;
    let mut v = identity_view(row);
    v["links"] = json!(links
        .into_iter()
        .map(|l| json!({
            "connector_id": l.connector_id, "anchor": l.anchor, "precedence": l.precedence,
            "contribution": serde_json::from_str::<Json_>(&l.contribution_json).unwrap_or(Json_::Null),
        }))
        .collect::<Vec<_>>());
    Ok(Json(v).into_response())
}

// ---- secrets ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretBody {
    value: String,
}

fn secret_problem(e: crate::secrets::SecretError) -> Problem {
    use crate::secrets::SecretError as E;
    match e {
        E::BadName(_) | E::Empty | E::TooLarge => {
            Problem::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())
        }
        E::NotFound(_) => Problem::new(StatusCode::NOT_FOUND, e.to_string()),
        E::Store(s) => store_problem(s),
        E::Crypto { .. } => Problem::internal(e.to_string()),
    }
}

async fn list_secrets(State(st): State<AppState>, _c: Caller) -> Result<Response, Problem> {
    let list = sync(&st)?.secrets().list().await.map_err(secret_problem)?;
    let v: Vec<Json_> = list
        .into_iter()
        .map(
            |s| json!({"name": s.name, "key_id": s.key_id, "updated_at": rfc3339(s.updated_at_ms)}),
        )
        .collect();
    Ok(Json(v).into_response())
}

async fn set_secret(
    State(st): State<AppState>,
    Caller(who): Caller,
    Path(name): Path<String>,
    JsonBody(b): JsonBody<SecretBody>,
) -> Result<Response, Problem> {
    sync(&st)?
        .secrets()
        .set(&name, &b.value, &who.subject)
        .await
        .map_err(secret_problem)?;
    // The value is never echoed back.
    Ok(Json(json!({"name": name, "stored": true})).into_response())
}

async fn delete_secret(
    State(st): State<AppState>,
    Caller(who): Caller,
    Path(name): Path<String>,
) -> Result<Response, Problem> {
    if !sync(&st)?
        .secrets()
        .delete(&name, &who.subject)
        .await
        .map_err(secret_problem)?
    {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            format!("no secret named {name:?}"),
        ));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_values_are_flagged_one_by_one_and_other_forms_still_show() {
        let (dn, attrs) = attributes_view(
            r#"{"dn": "cn=x", "attributes": {"n": ["a", 7, {"base64": "AA=="}], "one": "b"}}"#,
        );
        assert_eq!(dn.as_deref(), Some("cn=x"));
        assert_eq!(
            attrs,
            json!([
                {"name": "n", "values": [
                    {"value": "a", "binary": false},
                    {"value": "7", "binary": false},
                    {"value": "AA==", "binary": true}
                ]},
                {"name": "one", "values": [{"value": "b", "binary": false}]}
            ])
        );
        // Not JSON: no attributes, so the handler shows the stored text instead.
        assert_eq!(attributes_view("not json"), (None, Json_::Null));
    }
}
