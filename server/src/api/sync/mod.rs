//! Admin API for the sync engine, one module per area, each with its route slice (`ROUTES`)
//! beside its handlers; here the helpers they share.

use std::sync::Arc;

use axum::http::StatusCode;
use axum::Router;
use serde_json::json;

pub mod connectors;
pub mod identities;
pub mod runs;
pub mod schedules;
pub mod secrets;
pub mod space;

use crate::api::{store_problem, AppState};
use crate::problem::Problem;
use crate::store::{ConnectorRow, StoreError};
use crate::sync::runner::SyncEngine;

/// The sync areas' routers.
pub fn routes() -> Router<AppState> {
    Router::new()
        .merge(connectors::routes())
        .merge(runs::routes())
        .merge(space::routes())
        .merge(schedules::routes())
        .merge(identities::routes())
        .merge(secrets::routes())
}

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
