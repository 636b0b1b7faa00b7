//! The internal API, served only on the mTLS listener: status, the registry, promote, demote.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::admin::instance_rows;
use super::{store_problem, AppState, PeerName};
use crate::problem::{JsonBody, Problem};
use crate::store::{Role, StoreError};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/internal/v1/status", get(internal_status))
        .route("/internal/v1/instances", get(internal_instances))
        .route("/internal/v1/promote", post(promote))
        .route("/internal/v1/demote", post(demote))
}

#[derive(Serialize)]
struct InternalStatus {
    instance: String,
    /// This process's part of the fence holder: a recreated pod of the same name differs.
    incarnation: String,
    role: Role,
    epoch: i64,
    version: String,
}

async fn internal_status(State(st): State<AppState>) -> Json<InternalStatus> {
    let s = st.engine.status();
    Json(InternalStatus {
        instance: st.engine.instance().into(),
        incarnation: st.engine.incarnation().into(),
        role: s.role,
        epoch: s.epoch,
        version: st.engine.version().into(),
    })
}

/// The registry as `/api/instances` shows it, for the operator's post-cutover check (it holds a
/// client certificate, not an OIDC token).
async fn internal_instances(State(st): State<AppState>) -> Result<Response, Problem> {
    instance_rows(&st).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PromoteRequest {
    epoch: i64,
}

async fn promote(
    State(st): State<AppState>,
    peer: Option<axum::Extension<PeerName>>,
    JsonBody(req): JsonBody<PromoteRequest>,
) -> Result<Response, Problem> {
    if req.epoch < 1 {
        return Err(Problem::bad_request("epoch must be a positive integer"));
    }
    let actor = peer.map(|p| p.0 .0).unwrap_or_else(|| "internal".into());
    match st.engine.promote(req.epoch, &actor).await {
        Ok(s) => Ok(Json(serde_json::json!({"role": s.role, "epoch": s.epoch})).into_response()),
        Err(StoreError::StaleEpoch {
            requested,
            stored,
            holder,
        }) => Err(Problem::conflict(
            StoreError::StaleEpoch {
                requested,
                stored,
                holder: holder.clone(),
            }
            .to_string(),
        )
        // The operator retries with stored_epoch + 1 instead of probing upwards.
        .with("stored_epoch", stored)
        .with("holder", holder)),
        Err(e) => Err(store_problem(e)),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DemoteRequest {
    #[serde(default)]
    reason: Option<String>,
}

async fn demote(
    State(st): State<AppState>,
    peer: Option<axum::Extension<PeerName>>,
    JsonBody(req): JsonBody<DemoteRequest>,
) -> Json<crate::engine::DemoteOutcome> {
    let actor = peer.map(|p| p.0 .0).unwrap_or_else(|| "internal".into());
    let reason = req.reason.unwrap_or_else(|| "requested".into());
    Json(st.engine.demote(&actor, &reason).await)
}
