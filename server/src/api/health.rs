//! `/health/live` and `/health/ready` (no authentication: probes and load balancers).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use super::AppState;
use crate::licence;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
}

async fn live() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "live"}))
}

#[derive(Serialize)]
struct Check {
    ok: bool,
    detail: String,
}

async fn ready(State(st): State<AppState>) -> Response {
    let db = match tokio::time::timeout(std::time::Duration::from_secs(3), st.engine.store().ping())
        .await
    {
        Ok(Ok(())) => Check {
            ok: true,
            detail: format!("{} reachable", st.engine.store().backend()),
        },
        Ok(Err(e)) => Check {
            ok: false,
            detail: e.to_string(),
        },
        Err(_) => Check {
            ok: false,
            detail: "database did not answer within 3 s".into(),
        },
    };
    let lic = licence::check(st.licence_file.as_deref(), chrono::Utc::now());
    let lic = Check {
        ok: lic.is_valid(),
        detail: lic.detail(),
    };
    let ready = db.ok && lic.ok;
    let status = st.engine.status();
    let body = serde_json::json!({
        "ready": ready,
        "role": status.role,
        "epoch": status.epoch,
        "checks": {"database": db, "licence": lic},
    });
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}
