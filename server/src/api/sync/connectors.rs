//! Connectors: create, read, change, delete, test the connection. A save is checked completely
//! (every problem with its field path) and may not carry a stored secret somewhere new.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value as Json_};

use super::{conflict_or, connector_row, not_found, sync, unprocessable};
use crate::api::{audit_action, rfc3339, store_problem, AppState, Caller, RouteSpec};
use crate::auth::{Permission, Principal};
use crate::problem::{JsonBody, Problem};
use crate::store::{now_ms, ConnectorRow};
use crate::sync::compose_rules::ConnectorRules;
use crate::sync::source::entrusts_secret;
use crate::sync::source::Source;
use crate::sync::source::SourceConfig;

/// These routes and their permissions (see [`crate::api::routes`]).
pub const ROUTES: &[RouteSpec] = &[
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
];

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
}

/// Precedence of a connector created without rules (lower numbers win).
const DEFAULT_PRECEDENCE: i32 = 100;

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
            identitymesh_contract::hub::DIRECTORY_CHECK_FOLDER,
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
