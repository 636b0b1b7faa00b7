//! The OpenAPI document, derived from the route table.

use axum::routing::get;
use axum::{Json, Router};

use super::{routes as all_routes, AppState};

pub fn routes() -> Router<AppState> {
    Router::new().route("/api/openapi.json", get(openapi))
}

pub fn openapi_document() -> serde_json::Value {
    let mut paths = serde_json::Map::new();
    let problem = serde_json::json!({"description": "Error", "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}});
    for r in all_routes() {
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
