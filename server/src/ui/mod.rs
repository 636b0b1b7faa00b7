//! The Admin UI: pages rendered on the server from the Admin API's own answers.
//!
//! A page handler reads through [`Ctx::get`], which sends the browser's cookie to the Admin API
//! router in-process, so every read is authorised by the same route table as a bearer call and
//! the UI holds no rule of its own. Writes are made by the browser: `assets/app.js` sends a
//! form as JSON to the Admin API with the session's CSRF token. Every asset ships in the binary.

mod call;
pub(crate) mod layout;
mod pages;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use axum::extract::{FromRequestParts, Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::state::AppState;

pub(crate) use call::enc;
pub use call::Refusal;
pub(crate) use pages::signin::local_path;

/// The UI's state: the Admin API router it reads through, and the server's state.
pub struct Ui {
    api: Router,
    app: AppState,
}

/// The UI's routes over `api` (the Admin API router, which the UI calls in-process).
pub fn router(api: Router, app: AppState) -> Router {
    Router::new()
        .route("/", get(pages::overview::page))
        .route("/signin", get(pages::signin::page))
        .route("/connectors", get(pages::connectors::list))
        .route("/connectors/new", get(pages::connectors::create))
        .route("/connectors/{id}", get(pages::connectors::one))
        .route("/connectors/{id}/objects", get(pages::space::list))
        .route("/connectors/{id}/objects/{anchor}", get(pages::space::one))
        .route("/runs", get(pages::runs::list))
        .route("/runs/{id}", get(pages::runs::one))
        .route("/schedules", get(pages::schedules::page))
        .route("/identities", get(pages::identities::list))
        .route("/identities/{id}", get(pages::identities::one))
        .route("/audit", get(pages::audit::page))
        .route("/secrets", get(pages::secrets::page))
        .route("/relays", get(pages::relays::page))
        .route("/assets/{file}", get(asset))
        .with_state(Arc::new(Ui { api, app }))
}

/// A signed-in caller as `GET /auth/session` describes it.
pub struct Session {
    pub subject: String,
    pub name: String,
    pub permissions: Vec<String>,
    pub csrf: String,
}

impl Session {
    pub fn may(&self, permission: crate::auth::Permission) -> bool {
        self.permissions.iter().any(|p| p == permission.as_str())
    }
}

/// One page request: the caller's credentials (forwarded to the API), their session, and the
/// cookies the API set while the page was built (a moved-on session is passed to the browser).
pub struct Ctx {
    ui: Arc<Ui>,
    forward: Vec<(header::HeaderName, HeaderValue)>,
    set_cookies: std::sync::Mutex<Vec<HeaderValue>>,
    pub session: Session,
    /// The page's path and query, for links back to it after sign-in.
    pub here: String,
}

impl FromRequestParts<Arc<Ui>> for Ctx {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        ui: &Arc<Ui>,
    ) -> Result<Self, Response> {
        let here = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        if let Some(page) = standby_page(ui).await {
            return Err(page);
        }
        let had_cookie = crate::session::cookie(&parts.headers, crate::session::SESSION_COOKIE)
            .is_some_and(|c| !c.is_empty());
        let forward = [header::COOKIE, header::AUTHORIZATION]
            .into_iter()
            .flat_map(|h| {
                parts
                    .headers
                    .get_all(&h)
                    .iter()
                    .map(move |v| (h.clone(), v.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut ctx = Ctx {
            ui: ui.clone(),
            forward,
            set_cookies: Default::default(),
            session: Session {
                subject: String::new(),
                name: String::new(),
                permissions: Vec::new(),
                csrf: String::new(),
            },
            here,
        };
        match ctx.get("/auth/session").await {
            Ok(v) => {
                let text = |k: &str| v[k].as_str().unwrap_or_default().to_string();
                ctx.session = Session {
                    subject: text("subject"),
                    name: text("name"),
                    permissions: v["permissions"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|p| p.as_str().map(str::to_string))
                                .collect()
                        })
                        .unwrap_or_default(),
                    csrf: text("csrf_token"),
                };
                Ok(ctx)
            }
            // A cookie that was sent and refused (tampered, foreign, ended): say why, here.
            Err(Refusal::SignIn(why)) if had_cookie => {
                let next = pages::signin::local_path(Some(&ctx.here)).to_string();
                Err(ctx.finish(pages::signin::render(ui, &next, Some(&why))))
            }
            Err(Refusal::SignIn(_)) => {
                let to = format!("/signin?next={}", enc(&ctx.here));
                Err(ctx.finish(redirect(&to)))
            }
            Err(r) => Err(ctx.finish(layout::bare("Sign-in unavailable", r.markup()))),
        }
    }
}

impl Ctx {
    /// Adds the cookies the API set while this page was built to `res`.
    pub fn finish(&self, mut res: Response) -> Response {
        let cookies =
            std::mem::take(&mut *self.set_cookies.lock().unwrap_or_else(|e| e.into_inner()));
        for c in cookies {
            res.headers_mut().append(header::SET_COOKIE, c);
        }
        res
    }
}

pub(crate) fn redirect(to: &str) -> Response {
    let mut res = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        res.headers_mut().insert(header::LOCATION, v);
    }
    res
}

/// On an instance that is not active, every page names the active instance instead (reads
/// would work from the shared database, but writes would not, and the Service never sends
/// browsers here).
async fn standby_page(ui: &Ui) -> Option<Response> {
    let status = ui.app.engine.status();
    if status.role == crate::store::Role::Active {
        return None;
    }
    let store = ui.app.engine.store();
    let active = store
        .instances(ui.app.engine.alive_since_ms())
        .await
        .ok()
        .and_then(|rows| {
            rows.into_iter()
                .find(|r| r.role == crate::store::Role::Active)
        });
    Some(layout::standby(status.role.as_str(), active.as_ref()))
}

/// `/assets/{file}`: the stylesheet and the script, compiled into the binary.
async fn asset(State(_): State<Arc<Ui>>, Path(file): Path<String>) -> Response {
    let (body, kind) = match file.as_str() {
        "app.css" => (include_str!("assets/app.css"), "text/css; charset=utf-8"),
        "app.js" => (
            include_str!("assets/app.js"),
            "text/javascript; charset=utf-8",
        ),
        _ => return (StatusCode::NOT_FOUND, "no such asset").into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            // The binary's version changes the assets; an hour is short enough for an upgrade.
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        body,
    )
        .into_response()
}
