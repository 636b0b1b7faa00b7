//! Identities: paged and searched, and one with its attributes' sources and its links.

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value as Json_};

use super::{bad_query, not_found, page_limit};
use crate::api::{rfc3339, store_problem, AppState, Caller, RouteSpec};
use crate::auth::Permission;
use crate::problem::Problem;

/// These routes and their permissions (see [`crate::api::routes`]).
pub const ROUTES: &[RouteSpec] = &[
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
];

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/identities", get(list_identities))
        .route("/api/identities/{id}", get(get_identity))
}

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
