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
        .route("/auth/login", post(login_with_token).get(login_at_provider))
        .route("/auth/callback", get(callback))
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

/// The sign-in in flight, sealed into the short-lived `im_login` cookie (so a failover between
/// leaving for the provider and coming back does not break it).
#[derive(serde::Serialize, Deserialize)]
struct Pending {
    state: String,
    nonce: String,
    verifier: String,
    exp: i64,
    /// Where to go once signed in: the page that sent the browser to sign in (a local path).
    /// A cookie sealed by a server without it (an upgrade in flight) goes to `/`.
    #[serde(default = "root_path")]
    next: String,
}

fn root_path() -> String {
    "/".into()
}

#[derive(Deserialize)]
struct LoginQuery {
    next: Option<String>,
}

pub const LOGIN_COOKIE: &str = "im_login";
const LOGIN_PURPOSE: &str = "login";

fn random_b64(n: usize) -> String {
    use base64::Engine as _;
    use rand::RngCore;
    let mut b = vec![0u8; n];
    rand::rngs::OsRng.fill_bytes(&mut b);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn pkce_challenge(verifier: &str) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(verifier))
}

fn redirect(to: &str, cookies: &[String]) -> Response {
    let mut res = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        res.headers_mut().insert(header::LOCATION, v);
    }
    for c in cookies {
        if let Ok(v) = HeaderValue::from_str(c) {
            res.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    res
}

/// `GET /auth/login[?next=/path]`: leaves for the provider's authorization endpoint (code flow,
/// PKCE S256, random `state` and `nonce`), remembering the sign-in (and the local page to come
/// back to) in a sealed cookie for ten minutes.
async fn login_at_provider(
    State(st): State<AppState>,
    q: Result<axum::extract::Query<LoginQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let next = q.ok().and_then(|axum::extract::Query(q)| q.next);
    let next = crate::ui::local_path(next.as_deref()).to_string();
    let sessions = sessions(&st)?;
    if !st.auth.oidc_sign_in() {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            "OIDC sign-in is not configured (auth.oidc.client_id); sign in with the bootstrap \
             admin token: POST /auth/login with the form field `token`",
        ));
    }
    let si = st.auth.sign_in().await.map_err(|e| {
        tracing::warn!(reason = %e, "sign-in cannot start");
        Problem::unavailable(format!("sign-in is unavailable: {e}"))
    })?;
    let now = session::now_s();
    let p = Pending {
        state: random_b64(24),
        nonce: random_b64(24),
        verifier: random_b64(32),
        exp: now + session::LOGIN_TTL_S,
        next,
    };
    let url = reqwest::Url::parse_with_params(
        &si.authorization_endpoint,
        &[
            ("response_type", "code"),
            ("client_id", si.client_id.as_str()),
            ("redirect_uri", si.redirect_url.as_str()),
            ("scope", "openid profile email"),
            ("state", p.state.as_str()),
            ("nonce", p.nonce.as_str()),
            ("code_challenge", pkce_challenge(&p.verifier).as_str()),
            ("code_challenge_method", "S256"),
        ],
    )
    .map_err(|e| {
        Problem::unavailable(format!(
            "the provider's authorization_endpoint is not a URL: {e}"
        ))
    })?;
    let sealed = sessions.seal_value(LOGIN_PURPOSE, &serde_json::to_vec(&p).unwrap_or_default());
    let cookie = sessions.set_cookie_at(LOGIN_COOKIE, &sealed, session::LOGIN_TTL_S, "/auth");
    Ok(redirect(url.as_str(), &[cookie]))
}

#[derive(Deserialize)]
struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

/// A refused sign-in: the reason logged and answered, the sign-in cookie cleared.
fn refuse(sessions: &Sessions, html: bool, status: StatusCode, reason: String) -> Response {
    tracing::warn!(reason = %reason, "sign-in refused");
    let mut res = if html {
        let body = maud::html! {
            section.refusal role="alert" {
                p { "Sign-in was refused: " (reason) "." }
                p { "Nothing was signed in. " a href="/signin" { "Sign in again" } }
            }
        };
        crate::ui::layout::bare_with_status(status, "Sign-in refused", body)
    } else {
        Problem::new(
            status,
            format!("sign-in refused: {reason}; start again at /auth/login"),
        )
        .into_response()
    };
    if let Ok(v) = HeaderValue::from_str(&sessions.set_cookie_at(LOGIN_COOKIE, "", 0, "/auth")) {
        res.headers_mut().append(header::SET_COOKIE, v);
    }
    res
}

/// `GET /auth/callback?code&state`: checks the state against the sealed sign-in cookie (and
/// that it was not used before), redeems the code with the PKCE verifier, verifies the ID token
/// (signature, issuer, audience, expiry, nonce), maps its claims to permissions and sets the
/// session cookie.
async fn callback(
    State(st): State<AppState>,
    headers: axum::http::HeaderMap,
    q: Result<axum::extract::Query<CallbackQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let sessions = sessions(&st)?;
    // A browser gets a page that says what went wrong; an API client a problem.
    let html = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"));
    let bad = StatusCode::BAD_REQUEST;
    let Ok(axum::extract::Query(q)) = q else {
        return Ok(refuse(
            sessions,
            html,
            bad,
            "the callback's query is malformed".into(),
        ));
    };
    if let Some(err) = &q.error {
        let desc = q.error_description.as_deref().unwrap_or("");
        return Ok(refuse(
            sessions,
            html,
            StatusCode::UNAUTHORIZED,
            format!(
                "the identity provider answered {}{}{}",
                crate::auth::short(err),
                if desc.is_empty() { "" } else { ": " },
                crate::auth::short(desc)
            ),
        ));
    }
    let (Some(code), Some(state)) = (q.code.as_deref(), q.state.as_deref()) else {
        return Ok(refuse(
            sessions,
            html,
            bad,
            "the callback carries no code and state".into(),
        ));
    };
    let Some(raw) = session::cookie(&headers, LOGIN_COOKIE) else {
        return Ok(refuse(
            sessions,
            html,
            bad,
            "no sign-in in flight in this browser (the sign-in cookie is missing or expired)"
                .into(),
        ));
    };
    let pending: Pending = match sessions
        .open_value(LOGIN_PURPOSE, raw)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
    {
        Some(p) => p,
        None => {
            return Ok(refuse(
                sessions,
                html,
                bad,
                "the sign-in cookie does not open (altered, or from another key ring)".into(),
            ))
        }
    };
    let now = session::now_s();
    if pending.exp < now {
        return Ok(refuse(
            sessions,
            html,
            bad,
            "the sign-in took longer than ten minutes".into(),
        ));
    }
    if state != pending.state {
        return Ok(refuse(
            sessions,
            html,
            bad,
            "the state does not match the sign-in in flight (unknown state)".into(),
        ));
    }
    if !sessions.use_state(state, pending.exp, now) {
        return Ok(refuse(
            sessions,
            html,
            bad,
            "this sign-in response was already used (replayed state)".into(),
        ));
    }
    let id_token = match st.auth.redeem_code(code, &pending.verifier).await {
        Ok(t) => t,
        Err(e) => {
            return Ok(refuse(
                sessions,
                html,
                StatusCode::BAD_GATEWAY,
                e.to_string(),
            ))
        }
    };
    let user = match st.auth.verify_id_token(&id_token, &pending.nonce).await {
        Ok(u) => u,
        Err(crate::auth::AuthError::KeysUnavailable(m)) => {
            return Ok(refuse(sessions, html, StatusCode::SERVICE_UNAVAILABLE, m))
        }
        Err(e) => {
            return Ok(refuse(
                sessions,
                html,
                StatusCode::UNAUTHORIZED,
                format!("the ID token is not accepted: {e}"),
            ))
        }
    };
    let mut s = SessionData::new(&user.principal, &user.display_name, now);
    s.idp = st.auth.sign_in().await.ok().and_then(|si| {
        let end = si.end_session_endpoint?;
        // Back to this server's sign-in page afterwards (register it at the provider as a
        // post-logout redirect URI): the callback's sibling.
        let back = si
            .redirect_url
            .strip_suffix("/auth/callback")
            .map(|origin| format!("{origin}/signin"));
        let mut params = vec![("client_id", si.client_id.clone())];
        params.extend(back.map(|b| ("post_logout_redirect_uri", b)));
        reqwest::Url::parse_with_params(&end, &params)
            .ok()
            .map(|u| u.to_string())
    });
    tracing::info!(subject = %s.sub, permissions = ?s.perms, method = "oidc", "signed in");
    crate::api::audit_action(&st, &s.sub, "session.sign_in", &s.sub, "oidc").await;
    let cookie = sessions.set_cookie(SESSION_COOKIE, &sessions.seal(&s), sessions.absolute_s);
    let clear = sessions.set_cookie_at(LOGIN_COOKIE, "", 0, "/auth");
    // Checked again: the cookie is sealed, but the rule is the rule.
    let next = crate::ui::local_path(Some(&pending.next));
    Ok(redirect(next, &[cookie, clear]))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::api::router;
    use crate::auth::{hash_token, Authenticator};

    use axum::body::Body;
    use axum::http::Request;
    use identitymesh_keyring::KeyRing;
    use std::sync::Arc;
    use tower::ServiceExt;

    pub const TOKEN: &str = "imb_0123456789abcdef";

    /// A standalone-like API with the bootstrap token and sessions under `ring`.
    pub async fn app(ring: &KeyRing) -> (tempfile::TempDir, Router) {
        app_with(ring, None).await
    }

    pub async fn app_with(
        ring: &KeyRing,
        oidc: Option<crate::config::OidcConfig>,
    ) -> (tempfile::TempDir, Router) {
        let p = crate::testing::parts("t").await;
        let auth = Authenticator::new(Some(hash_token(TOKEN)), oidc)
            .await
            .unwrap();
        let sessions = Arc::new(Sessions::new(ring, 1800, 43_200, true).unwrap());
        let st = p.state(auth, ring.clone(), Some(sessions));
        (p.dir, router(st))
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

    fn query_param(url: &str, name: &str) -> String {
        reqwest::Url::parse(url)
            .unwrap()
            .query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    }

    fn cookie_pair(set_cookie: &str) -> String {
        set_cookie.split(';').next().unwrap().to_string()
    }

    struct Flight {
        state: String,
        nonce: String,
        challenge: String,
        login_cookie: String,
    }

    async fn start_sign_in(app: &Router, base: &str) -> Flight {
        start_sign_in_at(app, base, "/auth/login").await
    }

    async fn start_sign_in_at(app: &Router, base: &str, login: &str) -> Flight {
        let res = app
            .clone()
            .oneshot(Request::builder().uri(login).body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), 303);
        let loc = res.headers()[header::LOCATION]
            .to_str()
            .unwrap()
            .to_string();
        assert!(loc.starts_with(&format!("{base}/authorize?")), "{loc}");
        for (k, v) in [
            ("response_type", "code"),
            ("client_id", "im-ui"),
            ("redirect_uri", "https://im.test/auth/callback"),
            ("code_challenge_method", "S256"),
        ] {
            assert_eq!(query_param(&loc, k), v, "{loc}");
        }
        let set = res.headers()[header::SET_COOKIE].to_str().unwrap();
        assert!(
            set.starts_with("im_login=") && set.contains("Path=/auth"),
            "{set}"
        );
        assert!(
            set.contains("HttpOnly") && set.contains("Max-Age=600"),
            "{set}"
        );
        Flight {
            state: query_param(&loc, "state"),
            nonce: query_param(&loc, "nonce"),
            challenge: query_param(&loc, "code_challenge"),
            login_cookie: cookie_pair(set),
        }
    }

    async fn come_back(app: &Router, f: &Flight, state: &str) -> Answer {
        let res = app
            .clone()
            .oneshot(
                Request::builder()
                    .uri(format!("/auth/callback?code=the-code&state={state}"))
                    .header("cookie", &f.login_cookie)
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = res.status();
        let cookies: Vec<String> = res
            .headers()
            .get_all(header::SET_COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect();
        let loc = res
            .headers()
            .get(header::LOCATION)
            .map(|v| v.to_str().unwrap().to_string());
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        let session = cookies
            .iter()
            .find(|c| c.starts_with("im_session="))
            .cloned();
        assert!(
            cookies.iter().any(|c| c.starts_with("im_login=;")),
            "the sign-in cookie is cleared: {cookies:?}"
        );
        Answer {
            status,
            set_cookie: session,
            body: format!(
                "{}{}",
                loc.map(|l| format!("location={l} ")).unwrap_or_default(),
                String::from_utf8_lossy(&bytes)
            ),
        }
    }

    #[tokio::test]
    async fn oidc_code_flow_signs_in_and_maps_claims() {
        let p = crate::auth::fake_provider::FakeProvider::start().await;
        let ring = KeyRing::generate();
        let (_d, app) = app_with(&ring, Some(p.config())).await;
        // The bootstrap form is not the way in when the provider is.
        let a = send(
            &app,
            "POST",
            "/auth/login",
            &[],
            Some((FORM, format!("token={TOKEN}"))),
        )
        .await;
        assert_eq!(a.status, 409, "{}", a.body);

        let f = start_sign_in(&app, &p.base).await;
        p.answer_id_token(&f.nonce, serde_json::json!({}));
        let a = come_back(&app, &f, &f.state).await;
        assert_eq!(a.status, 303, "{}", a.body);
        assert!(a.body.starts_with("location=/ "), "{}", a.body);
        let set = a.set_cookie.expect("session cookie");
        assert!(set.contains("HttpOnly") && set.contains("Secure"), "{set}");
        // PKCE: the verifier sent to the token endpoint hashes to the challenge.
        let (basic, form) = p.token_requests.lock().unwrap().last().cloned().unwrap();
        assert!(basic.is_none(), "a public client sends no secret");
        let form: std::collections::HashMap<String, String> =
            url::form_urlencoded::parse(form.as_bytes())
                .into_owned()
                .collect();
        assert_eq!(form["grant_type"], "authorization_code");
        assert_eq!(form["code"], "the-code");
        assert_eq!(form["client_id"], "im-ui");
        assert_eq!(pkce_challenge(&form["code_verifier"]), f.challenge);

        let cookie = cookie_pair(&set);
        let c = [("cookie", cookie.as_str())];
        let a = send(&app, "GET", "/auth/session", &c, None).await;
        assert_eq!(a.status, 200, "{}", a.body);
        let v: serde_json::Value = serde_json::from_str(&a.body).unwrap();
        assert_eq!(v["subject"], "u-alice");
        assert_eq!(v["name"], "Alice Example");
        assert_eq!(
            v["permissions"],
            serde_json::json!(["dashboard.read", "relays.manage"])
        );
        assert_eq!(
            send(&app, "GET", "/api/instances", &c, None).await.status,
            200
        );
        // Mapped like a bearer token: no audit.read from the group.
        assert_eq!(send(&app, "GET", "/api/audit", &c, None).await.status, 403);
        let csrf = v["csrf_token"].as_str().unwrap();
        let ok = [("cookie", cookie.as_str()), (CSRF_HEADER, csrf)];
        let relay = || Some(("application/json", r#"{"name":"r3"}"#.to_string()));
        assert_eq!(
            send(&app, "POST", "/api/relays", &c, relay()).await.status,
            403
        );
        assert_eq!(
            send(&app, "POST", "/api/relays", &ok, relay()).await.status,
            201
        );
        // Sign-out names the provider's end-session endpoint.
        let a = send(&app, "POST", "/auth/logout", &ok, None).await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert!(
            a.body
                .contains(&format!("{}/logout?client_id=im-ui", p.base)),
            "{}",
            a.body
        );
        // ...and comes back to this server's sign-in page afterwards.
        assert!(
            a.body
                .contains("post_logout_redirect_uri=https%3A%2F%2Fim.test%2Fsignin"),
            "{}",
            a.body
        );

        // The same callback again: a replayed state.
        p.answer_id_token(&f.nonce, serde_json::json!({}));
        let a = come_back(&app, &f, &f.state).await;
        assert_eq!(a.status, 400, "{}", a.body);
        assert!(a.body.contains("replayed state"), "{}", a.body);
        assert!(a.set_cookie.is_none());
    }

    /// The page that sent the browser to sign in is where the callback leads: `/auth/login`
    /// keeps `next` in the sealed sign-in cookie, and only a local path is followed.
    #[tokio::test]
    async fn oidc_sign_in_comes_back_to_the_page_that_asked_for_it() {
        let p = crate::auth::fake_provider::FakeProvider::start().await;
        let ring = KeyRing::generate();
        let (_d, app) = app_with(&ring, Some(p.config())).await;
        for (login, landing) in [
            (
                "/auth/login?next=%2Fconnectors%2Fc1%3Fx%3D1",
                "/connectors/c1?x=1",
            ),
            ("/auth/login", "/"),
            ("/auth/login?next=https%3A%2F%2Fevil.example%2F", "/"),
            ("/auth/login?next=%2F%2Fevil.example%2F", "/"),
        ] {
            let f = start_sign_in_at(&app, &p.base, login).await;
            p.answer_id_token(&f.nonce, serde_json::json!({}));
            let a = come_back(&app, &f, &f.state).await;
            assert_eq!(a.status, 303, "{login}: {}", a.body);
            assert!(
                a.body.starts_with(&format!("location={landing} ")),
                "{login}: {}",
                a.body
            );
            assert!(a.set_cookie.is_some(), "{login}: signed in");
        }
    }

    #[tokio::test]
    async fn oidc_bad_callbacks_are_refused_with_their_reason() {
        let p = crate::auth::fake_provider::FakeProvider::start().await;
        let ring = KeyRing::generate();
        let (_d, app) = app_with(&ring, Some(p.config())).await;
        let now = chrono::Utc::now().timestamp();
        let cases: &[(serde_json::Value, &str)] = &[
            (serde_json::json!({"nonce": "another"}), "nonce"),
            (
                serde_json::json!({"aud": "someone-else"}),
                "another audience",
            ),
            (
                serde_json::json!({"iss": "https://evil.test/"}),
                "another issuer",
            ),
            (serde_json::json!({"exp": now - 600}), "expired"),
        ];
        for (claims, phrase) in cases {
            let f = start_sign_in(&app, &p.base).await;
            p.answer_id_token(&f.nonce, claims.clone());
            let a = come_back(&app, &f, &f.state).await;
            assert_eq!(a.status, 401, "{claims}: {}", a.body);
            assert!(a.body.contains(phrase), "{claims}: {}", a.body);
            assert!(a.set_cookie.is_none());
        }
        // Signed by a key the provider never published.
        let f = start_sign_in(&app, &p.base).await;
        let mut stranger = crate::auth::testing::TestIssuer::new();
        stranger.issuer = p.base.clone();
        let t = stranger.sign(
            &serde_json::json!({"iss": p.base, "aud": "im-ui", "sub": "x",
            "exp": now + 60, "nonce": f.nonce}),
        );
        *p.next_answer.lock().unwrap() = (200, serde_json::json!({"id_token": t}));
        let a = come_back(&app, &f, &f.state).await;
        assert_eq!(a.status, 401, "{}", a.body);
        // An unknown state, the provider's refusal, the token endpoint's refusal.
        let f = start_sign_in(&app, &p.base).await;
        let a = come_back(&app, &f, "not-the-state").await;
        assert_eq!(a.status, 400);
        assert!(a.body.contains("unknown state"), "{}", a.body);
        let res = send(
            &app,
            "GET",
            "/auth/callback?error=access_denied&error_description=User+said+no",
            &[("cookie", &f.login_cookie)],
            None,
        )
        .await;
        assert_eq!(res.status, 401);
        assert!(
            res.body.contains("access_denied: User said no"),
            "{}",
            res.body
        );
        *p.next_answer.lock().unwrap() = (
            400,
            serde_json::json!({"error": "invalid_grant", "error_description": "Code not valid"}),
        );
        let a = come_back(&app, &f, &f.state).await;
        assert_eq!(a.status, 502, "{}", a.body);
        assert!(a.body.contains("invalid_grant"), "{}", a.body);
        // No sign-in cookie, and one from another key ring.
        let a = send(&app, "GET", "/auth/callback?code=c&state=s", &[], None).await;
        assert_eq!(a.status, 400);
        assert!(a.body.contains("no sign-in in flight"), "{}", a.body);
        let (_d2, other) = app_with(&KeyRing::generate(), Some(p.config())).await;
        let theirs = start_sign_in(&other, &p.base).await;
        let a = come_back(&app, &theirs, &theirs.state).await;
        assert_eq!(a.status, 400);
        assert!(a.body.contains("does not open"), "{}", a.body);
    }

    /// A sign-in started on one server completes on another with the same key ring (a failover
    /// while the browser is at the provider).
    #[tokio::test]
    async fn a_sign_in_in_flight_survives_a_failover() {
        let p = crate::auth::fake_provider::FakeProvider::start().await;
        let ring = KeyRing::generate();
        let (_a, first) = app_with(&ring, Some(p.config())).await;
        let (_b, second) = app_with(&ring, Some(p.config())).await;
        let f = start_sign_in(&first, &p.base).await;
        p.answer_id_token(&f.nonce, serde_json::json!({}));
        let a = come_back(&second, &f, &f.state).await;
        assert_eq!(a.status, 303, "{}", a.body);
        let cookie = cookie_pair(&a.set_cookie.unwrap());
        assert_eq!(
            send(
                &first,
                "GET",
                "/api/instances",
                &[("cookie", &cookie)],
                None
            )
            .await
            .status,
            200
        );
    }

    /// A confidential client sends its secret (from the file) by HTTP Basic.
    #[tokio::test]
    async fn a_confidential_client_authenticates_at_the_token_endpoint() {
        let p = crate::auth::fake_provider::FakeProvider::start().await;
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("client-secret");
        std::fs::write(&secret, "s3cret/+\n").unwrap();
        let mut cfg = p.config();
        cfg.client_secret_file = Some(secret);
        let (_d, app) = app_with(&KeyRing::generate(), Some(cfg)).await;
        let f = start_sign_in(&app, &p.base).await;
        p.answer_id_token(&f.nonce, serde_json::json!({}));
        assert_eq!(come_back(&app, &f, &f.state).await.status, 303);
        let (basic, form) = p.token_requests.lock().unwrap().last().cloned().unwrap();
        use base64::Engine as _;
        let want = base64::engine::general_purpose::STANDARD.encode("im-ui:s3cret%2F%2B");
        assert_eq!(basic.as_deref(), Some(format!("Basic {want}").as_str()));
        assert!(!form.contains("client_id="), "{form}");
        // An unreadable secret file stops the start, naming the setting.
        let mut cfg = p.config();
        cfg.client_secret_file = Some(dir.path().join("missing"));
        let e = Authenticator::new(None, Some(cfg)).await.err().unwrap();
        assert!(
            e.to_string().contains("auth.oidc.client_secret_file"),
            "{e}"
        );
    }

    /// A session used after a while is re-issued with its last use moved on (so the idle
    /// bound counts from the last request), not on every request.
    #[tokio::test]
    async fn a_used_session_is_moved_on() {
        let ring = KeyRing::generate();
        let (_d, app) = app(&ring).await;
        let sessions = Sessions::new(&ring, 1800, 43_200, true).unwrap();
        let p = crate::auth::Principal {
            subject: "carol".into(),
            permissions: [crate::auth::Permission::DashboardRead]
                .into_iter()
                .collect(),
        };
        let now = session::now_s();
        let mut old = SessionData::new(&p, "Carol", now - 600);
        old.seen = now - 300;
        let cookie = format!("{SESSION_COOKIE}={}", sessions.seal(&old));
        let a = send(&app, "GET", "/api/instances", &[("cookie", &cookie)], None).await;
        assert_eq!(a.status, 200, "{}", a.body);
        let set = a.set_cookie.expect("re-issued");
        let moved = sessions
            .open(
                set.split(';').next().unwrap().split_once('=').unwrap().1,
                now,
            )
            .unwrap();
        assert!(moved.seen >= now && moved.iat == old.iat && moved.sid == old.sid);
        // Max-Age counts down to the absolute bound.
        assert!(
            set.contains(&format!("Max-Age={}", 43_200 - 600))
                || set.contains(&format!("Max-Age={}", 43_200 - 601)),
            "{set}"
        );
        // Fresh: not re-issued.
        let fresh = format!(
            "{SESSION_COOKIE}={}",
            sessions.seal(&SessionData::new(&p, "C", now))
        );
        let a = send(&app, "GET", "/api/instances", &[("cookie", &fresh)], None).await;
        assert!(a.set_cookie.is_none());
        // Idle too long: refused, cleared.
        let mut idle = SessionData::new(&p, "C", now - 4000);
        idle.seen = now - 1900;
        let stale = format!("{SESSION_COOKIE}={}", sessions.seal(&idle));
        let a = send(&app, "GET", "/api/instances", &[("cookie", &stale)], None).await;
        assert_eq!(a.status, 401);
        assert!(a.body.contains("without use"), "{}", a.body);
        assert!(a.set_cookie.unwrap().contains("Max-Age=0"));
    }
}
