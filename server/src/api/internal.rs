//! The internal API, served only on the mTLS listener: status, the registry, promote, demote.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use identitymesh_contract::internal::{
    paths, DemoteRequest, DemoteResponse, InternalStatus, PromoteRequest, PromoteResponse,
};

use super::admin::instance_rows;
use super::{store_problem, AppState, PeerName};
use crate::problem::{JsonBody, Problem};
use crate::store::{Role, StoreError};

/// The role as the internal API writes it.
fn wire(role: Role) -> identitymesh_contract::internal::Role {
    use identitymesh_contract::internal::Role as Wire;
    match role {
        Role::Standby => Wire::Standby,
        Role::Active => Wire::Active,
        Role::Fenced => Wire::Fenced,
    }
}

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(paths::STATUS, get(internal_status))
        .route(paths::INSTANCES, get(internal_instances))
        .route(paths::PROMOTE, post(promote))
        .route(paths::DEMOTE, post(demote))
}

async fn internal_status(State(st): State<AppState>) -> Json<InternalStatus> {
    let s = st.engine.status();
    Json(InternalStatus {
        instance: st.engine.instance().into(),
        incarnation: st.engine.incarnation().into(),
        role: wire(s.role),
        epoch: s.epoch,
        version: Some(st.engine.version().into()),
    })
}

/// The registry as `/api/instances` shows it, for the operator's post-cutover check (it holds a
/// client certificate, not an OIDC token).
async fn internal_instances(State(st): State<AppState>) -> Result<Response, Problem> {
    instance_rows(&st).await
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
    // A role change runs to its end even if the caller goes away (see `transition`).
    let engine = st.engine.clone();
    let epoch = req.epoch;
    let promoted = transition(async move { engine.promote(epoch, &actor).await }).await?;
    match promoted {
        Ok(s) => Ok(Json(PromoteResponse {
            role: wire(s.role),
            epoch: s.epoch,
        })
        .into_response()),
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

async fn demote(
    State(st): State<AppState>,
    peer: Option<axum::Extension<PeerName>>,
    JsonBody(req): JsonBody<DemoteRequest>,
) -> Result<Json<DemoteResponse>, Problem> {
    let actor = peer.map(|p| p.0 .0).unwrap_or_else(|| "internal".into());
    let reason = req.reason.unwrap_or_else(|| "requested".into());
    let engine = st.engine.clone();
    let d = transition(async move { engine.demote(&actor, &reason).await }).await?;
    Ok(Json(DemoteResponse {
        role: wire(d.role),
        epoch: d.epoch,
        drained: d.drained,
    }))
}

/// Runs a promotion or demotion in a task of its own. hyper drops a handler whose client
/// disconnected (an operator killed mid-switchover); a transition cut there could leave the
/// role, the fence and the registry disagreeing.
async fn transition<T: Send + 'static>(
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> Result<T, Problem> {
    tokio::spawn(work)
        .await
        .map_err(|e| Problem::internal(format!("the role change did not complete: {e}")))
}
