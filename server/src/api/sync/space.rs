//! The connector space: a connector's staged objects, paged and searched, and one object.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value as Json_};

use super::{bad_query, connector_row};
use crate::api::{rfc3339, store_problem, AppState, Caller, RouteSpec};
use crate::auth::Permission;
use crate::problem::Problem;

/// These routes and their permissions (see [`crate::api::routes`]).
pub const ROUTES: &[RouteSpec] = &[
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
];

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/connectors/{id}/objects", get(list_objects))
        .route("/api/connectors/{id}/objects/{anchor}", get(get_object))
}

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
