//! HTTP surface: health, the Admin API and the internal API served only on the mTLS listener.
//!
//! Every Admin API route declares its permission in a `ROUTES` slice beside its handlers
//! ([`admin`], [`sync`]); [`routes`] chains them, and both the authorisation of [`Caller`] and
//! the OpenAPI document ([`openapi`]) derive from that one table. This module holds what the
//! areas share: the state, the caller, the problem mapping, the routers.

use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderMap, StatusCode};
use axum::Router;

pub mod admin;
pub mod auth;
pub mod checks;
pub mod health;
pub mod internal;
pub mod openapi;
pub mod sync;

use crate::auth::{Permission, Principal};
use crate::problem::Problem;
use crate::store::StoreError;

pub use crate::state::AppState;

/// Requests larger than this are refused with 413 before they are parsed.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Every Admin API route's slice of the route table.
const ROUTE_TABLE: &[&[RouteSpec]] = &[
    admin::ROUTES,
    sync::connectors::ROUTES,
    sync::runs::ROUTES,
    sync::space::ROUTES,
    sync::schedules::ROUTES,
    sync::identities::ROUTES,
    sync::secrets::ROUTES,
];

/// Every Admin API route with its permission.
pub fn routes() -> impl Iterator<Item = &'static RouteSpec> {
    ROUTE_TABLE.iter().flat_map(|slice| slice.iter())
}

/// One Admin API route and the permission it requires.
pub struct RouteSpec {
    pub method: &'static str,
    pub path: &'static str,
    pub permission: Permission,
    pub summary: &'static str,
}

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
        let need = routes()
            .find(|r| r.path == path && r.method == method)
            .map(|r| r.permission)
            .ok_or_else(|| {
                Problem::internal(format!("route {method} {path} declares no permission"))
            })?;
        let p = match (
            bearer(&parts.headers),
            crate::api::auth::cookie_session(parts, st),
        ) {
            // A bearer token wins; a request with one is no browser's cookie request.
            (b @ Some(_), _) | (b @ None, crate::api::auth::CookieAuth::None) => {
                st.auth.authenticate(b).await.map_err(|e| match e {
                    crate::auth::AuthError::KeysUnavailable(m) => Problem::unavailable(m),
                    other => Problem::unauthorized(other.to_string()),
                })?
            }
            (None, crate::api::auth::CookieAuth::Rejected(m)) => {
                return Err(Problem::unauthorized(m))
            }
            (None, crate::api::auth::CookieAuth::CsrfRefused(m)) => {
                return Err(Problem::forbidden(m))
            }
            (None, crate::api::auth::CookieAuth::Session(p)) => p,
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
        .merge(health::routes())
        .merge(openapi::routes())
        .merge(admin::routes())
        .merge(sync::routes())
        .merge(auth::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::session_layer,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

pub fn internal_router(state: AppState) -> Router {
    Router::new()
        .merge(internal::routes())
        .merge(checks::internal_routes())
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

pub(crate) fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339())
        .unwrap_or_default()
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
/// The verified client certificate's subject, attached by the mTLS listener.
#[derive(Clone, Debug)]
pub struct PeerName(pub String);

#[cfg(test)]
mod tests;
