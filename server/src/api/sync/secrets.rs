//! Secrets: names and key ids; values are set, sealed and never returned.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value as Json_};

use super::sync;
use crate::api::{rfc3339, store_problem, AppState, Caller, RouteSpec};
use crate::auth::Permission;
use crate::problem::{JsonBody, Problem};

/// These routes and their permissions (see [`crate::api::routes`]).
pub const ROUTES: &[RouteSpec] = &[
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

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/secrets", get(list_secrets))
        .route("/api/secrets/{id}", put(set_secret).delete(delete_secret))
}

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
