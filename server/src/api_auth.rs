//! Browser sign-in and sessions: the session cookie layer (opens the sealed cookie, moves it on
//! when used, clears a refused one), the CSRF rule for cookie-authenticated writes, and the
//! `/auth` routes (standalone sign-in with the bootstrap token, the session, sign-out).

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use crate::api::AppState;
use crate::auth::Principal;
use crate::problem::Problem;
use crate::session::{self, SessionData, Sessions, CSRF_HEADER, SESSION_COOKIE};

/// The opened session of this request (set by [`session_layer`]).
#[derive(Clone)]
struct OpenedSession(SessionData);

/// Why this request's session cookie was refused (set by [`session_layer`]).
#[derive(Clone)]
struct RefusedCookie(String);

/// What a request's cookie says about its caller.
pub enum CookieAuth {
    None,
    /// 401: the cookie does not open, or the session ended.
    Rejected(String),
    /// 403: a state-changing request without the session's CSRF token.
    CsrfRefused(String),
    Session(Principal),
}

fn is_safe(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS)
}

fn csrf_ok(parts: &axum::http::request::Parts, sessions: &Sessions, s: &SessionData) -> bool {
    parts
        .headers
        .get(CSRF_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| sessions.csrf_ok(s, t))
}

/// The caller a request's session cookie names, with the CSRF rule applied: GET, HEAD and
/// OPTIONS need only the cookie; every other method also the `X-CSRF-Token` header of that
/// session (from `GET /auth/session` or the sign-in answer).
pub fn cookie_session(parts: &axum::http::request::Parts, st: &AppState) -> CookieAuth {
    if let Some(RefusedCookie(m)) = parts.extensions.get::<RefusedCookie>() {
        return CookieAuth::Rejected(m.clone());
    }
    let (Some(OpenedSession(s)), Some(sessions)) = (
        parts.extensions.get::<OpenedSession>(),
        st.sessions.as_ref(),
    ) else {
        return CookieAuth::None;
    };
    if !is_safe(&parts.method) && !csrf_ok(parts, sessions, s) {
        tracing::warn!(subject = %s.sub, method = %parts.method, path = %parts.uri.path(),
            reason = "missing or wrong CSRF token", "cookie request refused");
        return CookieAuth::CsrfRefused(format!(
            "a {} signed in by session cookie must carry the {CSRF_HEADER} header of that \
             session (its value is in GET /auth/session)",
            parts.method
        ));
    }
    CookieAuth::Session(s.principal())
}

/// Opens the session cookie before the handlers run; afterwards re-issues it when its
/// `last_seen` moved, or clears it when it was refused (the reason is logged, never the value).
pub async fn session_layer(State(st): State<AppState>, mut req: Request, next: Next) -> Response {
    let Some(sessions) = st.sessions.clone() else {
        return next.run(req).await;
    };
    let Some(raw) = session::cookie(req.headers(), SESSION_COOKIE).map(str::to_string) else {
        return next.run(req).await;
    };
    let now = session::now_s();
    let set = match sessions.open(&raw, now) {
        Ok(s) => {
            let refresh = sessions.refreshed(&s, now).map(|c| {
                sessions.set_cookie(SESSION_COOKIE, &c, sessions.absolute_s - (now - s.iat))
            });
            req.extensions_mut().insert(OpenedSession(s));
            refresh
        }
        Err(e) => {
            tracing::warn!(reason = %e, path = %req.uri().path(), "session cookie refused");
            req.extensions_mut().insert(RefusedCookie(e.to_string()));
            Some(sessions.clear_cookie(SESSION_COOKIE))
        }
    };
    let mut res = next.run(req).await;
    if let Some(c) = set.and_then(|c| HeaderValue::from_str(&c).ok()) {
        // A handler that set the cookie itself (sign-in, sign-out) has the last word.
        if !res.headers().contains_key(header::SET_COOKIE) {
            res.headers_mut().append(header::SET_COOKIE, c);
        }
    }
    res
}

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/auth/login", post(login_with_token))
        .route("/auth/session", get(current_session))
        .route("/auth/logout", post(logout))
}

fn sessions(st: &AppState) -> Result<&Sessions, Problem> {
    st.sessions.as_deref().ok_or_else(|| {
        Problem::unavailable("browser sessions are not set up on this server (no key ring)")
    })
}

/// A signed-in answer: the session cookie, and the session's view as JSON.
pub(crate) fn signed_in(sessions: &Sessions, s: &SessionData) -> Response {
    let cookie = sessions.set_cookie(SESSION_COOKIE, &sessions.seal(s), sessions.absolute_s);
    let mut res = Json(session_view(sessions, s)).into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        res.headers_mut().insert(header::SET_COOKIE, v);
    }
    res
}

fn session_view(sessions: &Sessions, s: &SessionData) -> serde_json::Value {
    serde_json::json!({
        "subject": s.sub,
        "name": s.name,
        "permissions": s.perms,
        "csrf_token": sessions.csrf_token(s),
        "issued_at": crate::api::rfc3339(s.iat * 1000),
        "idle_expires_at": crate::api::rfc3339((s.seen + sessions.idle_s) * 1000),
        "expires_at": crate::api::rfc3339((s.iat + sessions.absolute_s) * 1000),
    })
}

#[derive(Deserialize)]
struct TokenForm {
    token: String,
}

/// `POST /auth/login` (form `token=`): a standalone server without OIDC sign-in signs the
/// holder of the bootstrap admin token in with a session cookie.
async fn login_with_token(
    State(st): State<AppState>,
    form: Result<axum::Form<TokenForm>, axum::extract::rejection::FormRejection>,
) -> Result<Response, Problem> {
    let sessions = sessions(&st)?;
    if st.auth.oidc_sign_in() {
        return Err(Problem::conflict(
            "this server signs browsers in at the identity provider: GET /auth/login",
        ));
    }
    let axum::Form(form) = form.map_err(|e| {
        Problem::bad_request(format!(
            "send the bootstrap admin token as a form field `token` \
             (application/x-www-form-urlencoded): {}",
            e.body_text()
        ))
    })?;
    let p = st.auth.authenticate_bootstrap(&form.token).map_err(|e| {
        tracing::warn!(reason = %e, "sign-in with the bootstrap token refused");
        Problem::unauthorized(format!(
            "{e}; the token is in the file the server printed at start (admin.token)"
        ))
    })?;
    let s = SessionData::new(&p, "Bootstrap admin", session::now_s());
    tracing::info!(subject = %s.sub, method = "bootstrap token", "signed in");
    crate::api::audit_action(&st, &s.sub, "session.sign_in", &s.sub, "bootstrap token").await;
    Ok(signed_in(sessions, &s))
}

/// `GET /auth/session`: who the cookie signs in, what they may do, and the CSRF token.
async fn current_session(
    State(st): State<AppState>,
    req: axum::http::request::Parts,
) -> Result<Response, Problem> {
    let sessions = sessions(&st)?;
    if let Some(RefusedCookie(m)) = req.extensions.get::<RefusedCookie>() {
        return Err(Problem::unauthorized(m.clone()));
    }
    match req.extensions.get::<OpenedSession>() {
        Some(OpenedSession(s)) => Ok(Json(session_view(sessions, s)).into_response()),
        None => Err(Problem::unauthorized("not signed in")),
    }
}

/// `POST /auth/logout`: clears the session cookie (with the session's CSRF token when the
/// cookie is valid) and names the provider's end-session URL when it has one.
async fn logout(
    State(st): State<AppState>,
    req: axum::http::request::Parts,
) -> Result<Response, Problem> {
    let sessions = sessions(&st)?;
    let mut end_session = None;
    if let Some(OpenedSession(s)) = req.extensions.get::<OpenedSession>() {
        if !csrf_ok(&req, sessions, s) {
            tracing::warn!(subject = %s.sub, reason = "missing or wrong CSRF token", "sign-out refused");
            return Err(Problem::forbidden(format!(
                "sign-out needs the {CSRF_HEADER} header of the session"
            )));
        }
        tracing::info!(subject = %s.sub, "signed out");
        end_session = s.idp.clone();
    }
    let mut res = (
        StatusCode::OK,
        Json(serde_json::json!({"signed_out": true, "end_session_url": end_session})),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&sessions.clear_cookie(SESSION_COOKIE)) {
        res.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(res)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::api::router;
    use crate::auth::{hash_token, Authenticator};
    use crate::config::EngineConfig;
    use crate::engine::Engine;
    use crate::store::sqlite::SqliteStore;
    use crate::store::Store;
    use axum::body::Body;
    use axum::http::Request;
    use identitymesh_keyring::KeyRing;
    use std::sync::Arc;
    use tower::ServiceExt;

    pub const TOKEN: &str = "imb_0123456789abcdef";

    /// A standalone-like API with the bootstrap token and sessions under `ring`.
    pub async fn app(ring: &KeyRing) -> (tempfile::TempDir, Router) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(&dir.path().join("im.db")).await.unwrap());
        store.migrate().await.unwrap();
        let auth = Authenticator::new(Some(hash_token(TOKEN)), None)
            .await
            .unwrap();
        let engine = Engine::new(
            store.clone(),
            "t".into(),
            "h".into(),
            "1".into(),
            EngineConfig::default(),
        );
        let st = AppState {
            engine,
            auth,
            licence_file: None,
            hub: None,
            sync: None,
            sessions: Some(Arc::new(Sessions::new(ring, 1800, 43_200, true).unwrap())),
        };
        (dir, router(st))
    }

    pub struct Answer {
        pub status: StatusCode,
        pub set_cookie: Option<String>,
        pub body: String,
    }

    pub async fn send(
        app: &Router,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<(&str, String)>,
    ) -> Answer {
        let mut req = Request::builder().method(method).uri(path);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let body = match body {
            Some((ct, b)) => {
                req = req.header("content-type", ct);
                Body::from(b)
            }
            None => Body::empty(),
        };
        let res = app.clone().oneshot(req.body(body).unwrap()).await.unwrap();
        let status = res.status();
        let set_cookie = res
            .headers()
            .get(header::SET_COOKIE)
            .map(|v| v.to_str().unwrap().to_string());
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        Answer {
            status,
            set_cookie,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    const FORM: &str = "application/x-www-form-urlencoded";

    /// Signs in with the bootstrap token: the `Cookie` header value and the CSRF token.
    pub async fn sign_in(app: &Router) -> (String, String) {
        let a = send(
            app,
            "POST",
            "/auth/login",
            &[],
            Some((FORM, format!("token={TOKEN}"))),
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.body);
        let set = a.set_cookie.expect("a session cookie");
        for attr in ["HttpOnly", "SameSite=Lax", "Secure", "Path=/"] {
            assert!(set.contains(attr), "{set}");
        }
        let cookie = set.split(';').next().unwrap().to_string();
        let v: serde_json::Value = serde_json::from_str(&a.body).unwrap();
        assert_eq!(v["subject"], "bootstrap-admin");
        (cookie, v["csrf_token"].as_str().unwrap().to_string())
    }

    #[tokio::test]
    async fn bootstrap_sign_in_and_cookie_requests() {
        let ring = KeyRing::generate();
        let (_d, app) = app(&ring).await;
        // Wrong token, no form: refused, and no cookie.
        let a = send(
            &app,
            "POST",
            "/auth/login",
            &[],
            Some((FORM, "token=imb_nope".into())),
        )
        .await;
        assert_eq!(a.status, 401, "{}", a.body);
        assert!(a.set_cookie.is_none());
        let a = send(&app, "POST", "/auth/login", &[], None).await;
        assert_eq!(a.status, 400, "{}", a.body);
        assert!(a.body.contains("token"), "{}", a.body);

        let (cookie, csrf) = sign_in(&app).await;
        let c = [("cookie", cookie.as_str())];
        assert_eq!(
            send(&app, "GET", "/api/instances", &c, None).await.status,
            200
        );
        let a = send(&app, "GET", "/auth/session", &c, None).await;
        assert_eq!(a.status, 200);
        assert!(a.body.contains(&csrf), "{}", a.body);
        // A write with the cookie but without the CSRF header: 403, saying what is missing.
        let relay = || Some(("application/json", r#"{"name":"r1"}"#.to_string()));
        let a = send(&app, "POST", "/api/relays", &c, relay()).await;
        assert_eq!(a.status, 403, "{}", a.body);
        assert!(a.body.contains("x-csrf-token"), "{}", a.body);
        let wrong = [("cookie", cookie.as_str()), (CSRF_HEADER, "AAAA")];
        assert_eq!(
            send(&app, "POST", "/api/relays", &wrong, relay())
                .await
                .status,
            403
        );
        let ok = [("cookie", cookie.as_str()), (CSRF_HEADER, csrf.as_str())];
        let a = send(&app, "POST", "/api/relays", &ok, relay()).await;
        assert_eq!(a.status, 201, "{}", a.body);
        // Bearer requests need no CSRF header.
        let bearer = format!("Bearer {TOKEN}");
        let b = [("authorization", bearer.as_str())];
        let a = send(&app, "GET", "/api/relays", &b, None).await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert!(a.body.contains("r1"));

        // Sign-out needs the CSRF token too, then clears the cookie.
        assert_eq!(
            send(&app, "POST", "/auth/logout", &c, None).await.status,
            403
        );
        let a = send(&app, "POST", "/auth/logout", &ok, None).await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert!(a.set_cookie.unwrap().contains("Max-Age=0"));
    }

    #[tokio::test]
    async fn tampered_and_foreign_cookies_are_refused_and_cleared() {
        let ring = KeyRing::generate();
        let (_d, server) = app(&ring).await;
        let (cookie, _) = sign_in(&server).await;
        let mut bytes = cookie.into_bytes();
        let n = bytes.len();
        bytes[n - 5] = if bytes[n - 5] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(bytes).unwrap();
        let a = send(
            &server,
            "GET",
            "/api/instances",
            &[("cookie", &tampered)],
            None,
        )
        .await;
        assert_eq!(a.status, 401);
        assert!(a.body.contains("altered"), "{}", a.body);
        assert!(a.set_cookie.unwrap().contains("Max-Age=0"));
        // A cookie from a server with another key ring.
        let (_d2, foreign) = app(&KeyRing::generate()).await;
        let (theirs, _) = sign_in(&foreign).await;
        let a = send(
            &server,
            "GET",
            "/auth/session",
            &[("cookie", &theirs)],
            None,
        )
        .await;
        assert_eq!(a.status, 401);
        assert!(a.body.contains("another key ring"), "{}", a.body);
        assert_eq!(
            send(&server, "GET", "/auth/session", &[], None)
                .await
                .status,
            401
        );
    }

    /// The failover property in one process: a second server with the same key ring opens the
    /// first one's cookie (and its CSRF token holds there); one with a key added does too.
    #[tokio::test]
    async fn a_cookie_opens_on_every_server_with_the_ring() {
        let mut ring = KeyRing::generate();
        let (_a, first) = app(&ring).await;
        let (cookie, csrf) = sign_in(&first).await;
        let (_b, second) = app(&ring).await;
        let ok = [("cookie", cookie.as_str()), (CSRF_HEADER, csrf.as_str())];
        let relay = Some(("application/json", r#"{"name":"r2"}"#.to_string()));
        assert_eq!(
            send(&second, "POST", "/api/relays", &ok, relay)
                .await
                .status,
            201
        );
        ring.cookie_keys
            .insert("c2".into(), KeyRing::generate().cookie_keys["c1"].clone());
        let (_c, rotated) = app(&ring).await;
        assert_eq!(
            send(&rotated, "GET", "/api/instances", &ok, None)
                .await
                .status,
            200
        );
    }
}
