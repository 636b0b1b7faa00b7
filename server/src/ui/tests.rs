//! The UI over a real API router, store and sync engine: sign-in redirects, what each
//! permission sees, the standby page, escaping, assets, and the sign-in refusal page.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use tower::ServiceExt;

use crate::api::router;
use crate::auth::{hash_token, Authenticator, Permission, Principal};
use crate::config::EngineConfig;
use crate::engine::Engine;
use crate::session::{SessionData, Sessions, SESSION_COOKIE};
use crate::store::Store;

const TOKEN: &str = "imb_0123456789abcdef";

struct App {
    _dir: tempfile::TempDir,
    router: Router,
    internal: Router,
    sessions: Arc<Sessions>,
    store: Arc<dyn Store>,
}

async fn app(active: bool) -> App {
    let p = crate::testing::parts("im-a").await;
    if active {
        p.engine.promote(1, "test").await.unwrap();
    }
    let auth = Authenticator::new(Some(hash_token(TOKEN)), None)
        .await
        .unwrap();
    let ring = identitymesh_keyring::KeyRing::generate();
    let sessions = Arc::new(Sessions::new(&ring, 1800, 43_200, true).unwrap());
    let st = p.state(auth, ring, Some(sessions.clone()));
    App {
        _dir: p.dir,
        router: router(st.clone()),
        internal: crate::api::internal_router(st),
        sessions,
        store: p.store,
    }
}

impl App {
    /// A session cookie for someone with exactly `perms`.
    fn cookie(&self, perms: &[Permission]) -> String {
        let p = Principal {
            subject: "carol".into(),
            permissions: perms.iter().copied().collect(),
        };
        let s = SessionData::new(&p, "Carol Viewer", crate::session::now_s());
        format!("{SESSION_COOKIE}={}", self.sessions.seal(&s))
    }

    fn admin(&self) -> String {
        self.cookie(&Permission::ALL)
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<String>,
    ) -> (StatusCode, axum::http::HeaderMap, String) {
        let mut req = Request::builder().method(method).uri(path);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let body = match body {
            Some(b) => {
                req = req.header("content-type", "application/json");
                Body::from(b)
            }
            None => Body::empty(),
        };
        let res = self
            .router
            .clone()
            .oneshot(req.body(body).unwrap())
            .await
            .unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 22)
            .await
            .unwrap();
        (
            status,
            headers,
            String::from_utf8_lossy(&bytes).into_owned(),
        )
    }

    async fn page(&self, path: &str, cookie: &str) -> (StatusCode, String) {
        let (s, _, b) = self.send("GET", path, &[("cookie", cookie)], None).await;
        (s, b)
    }

    /// A CSV connector through the API with the bootstrap token; its id.
    async fn connector(&self, rules: serde_json::Value) -> String {
        let bearer = format!("Bearer {TOKEN}");
        let body = serde_json::json!({
            "name": "hr", "kind": "csv",
            "config": {"folder": "hr", "object_type": "people", "anchor_column": "id"},
            "rules": rules,
        });
        let (s, _, b) = self
            .send(
                "POST",
                "/api/connectors",
                &[("authorization", &bearer)],
                Some(body.to_string()),
            )
            .await;
        // No drop roots here: the folder check refuses the CSV folder, so store it directly.
        if s == StatusCode::CREATED {
            return serde_json::from_str::<serde_json::Value>(&b).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string();
        }
        let row = crate::store::ConnectorRow {
            id: "c1".into(),
            name: "hr".into(),
            kind: "csv".into(),
            config_json: body["config"].to_string(),
            rules_json: body["rules"].to_string(),
            relay_id: None,
            is_canary: false,
            created_at_ms: 1,
            updated_at_ms: 1,
        };
        self.store.put_connector(&row).await.unwrap();
        row.id
    }
}

#[tokio::test]
async fn a_page_without_a_session_sends_the_browser_to_sign_in() {
    let a = app(true).await;
    let (s, h, _) = a.send("GET", "/connectors?x=1", &[], None).await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    assert_eq!(h["location"], "/signin?next=%2Fconnectors%3Fx%3D1");
    // A tampered cookie: the sign-in page says why, and the cookie is cleared.
    let (s, h, b) = a
        .send("GET", "/runs", &[("cookie", "im_session=AAAA")], None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{b}");
    assert!(
        h.get_all("set-cookie")
            .iter()
            .any(|c| c.to_str().unwrap().contains("Max-Age=0")),
        "{h:?}"
    );
    assert!(
        b.contains("You are signed out: ") && b.contains(r#"data-signin="/runs""#),
        "{b}"
    );
    // One sealed under another key ring (a foreign cookie): the same, naming that reason.
    let other = app(true).await;
    let foreign = other.admin();
    let (s, _, b) = a.send("GET", "/", &[("cookie", &foreign)], None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{b}");
    assert!(
        b.contains("You are signed out: ") && b.contains("key"),
        "{b}"
    );
    // The sign-in page offers the bootstrap token (no provider configured).
    let (s, _, b) = a.send("GET", "/signin?next=/runs", &[], None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        b.contains("Bootstrap admin token") && b.contains(r#"data-signin="/runs""#),
        "{b}"
    );
    // Signed in already: straight on, but never to another site.
    let (s, h, _) = a
        .send(
            "GET",
            "/signin?next=//evil.example/",
            &[("cookie", &a.admin())],
            None,
        )
        .await;
    assert_eq!(
        (s, h["location"].to_str().unwrap()),
        (StatusCode::SEE_OTHER, "/")
    );
}

#[tokio::test]
async fn the_overview_shows_the_active_instance_and_the_session_csrf_token() {
    let a = app(true).await;
    let cookie = a.admin();
    let (s, b) = a.page("/", &cookie).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert!(b.contains(r#"data-testid="active-instance">im-a<"#), "{b}");
    assert!(b.contains("Pause all schedules"), "{b}");
    assert!(
        b.contains("Last cutover: <strong>im-a</strong> became active at epoch 1"),
        "{b}"
    );
    let (_, _, session) = a
        .send("GET", "/auth/session", &[("cookie", &cookie)], None)
        .await;
    let csrf = serde_json::from_str::<serde_json::Value>(&session).unwrap()["csrf_token"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        b.contains(&format!(r#"<meta name="csrf-token" content="{csrf}">"#)),
        "{b}"
    );
    // Every section renders for an administrator.
    let id = a.connector(serde_json::json!({"precedence": 5})).await;
    for p in [
        "/connectors",
        "/connectors/new",
        &format!("/connectors/{id}"),
        "/runs",
        "/schedules",
        "/identities",
        "/relays",
        "/audit",
        "/secrets",
    ] {
        let (s, b) = a.page(p, &cookie).await;
        assert_eq!(s, StatusCode::OK, "{p}: {b}");
        assert!(b.contains("<h1>"), "{p}");
    }
    // Paused through the API: the overview says so and offers Resume.
    let bearer = format!("Bearer {TOKEN}");
    let (s, _, b) = a
        .send(
            "POST",
            "/api/sync/pause",
            &[("authorization", &bearer)],
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (_, b) = a.page("/", &cookie).await;
    assert!(
        b.contains(r#"data-testid="sync-state">paused<"#) && b.contains("Resume all schedules"),
        "{b}"
    );
}

#[tokio::test]
async fn a_viewer_sees_no_editing_controls_and_the_api_still_refuses() {
    let a = app(true).await;
    let id = a.connector(serde_json::json!({"precedence": 5})).await;
    let viewer = a.cookie(&[Permission::DashboardRead]);
    let (_, b) = a.page("/connectors", &viewer).await;
    assert!(b.contains(">hr<") && !b.contains("New connector"), "{b}");
    let (_, b) = a.page(&format!("/connectors/{id}"), &viewer).await;
    for control in [
        "Test connection",
        "Run full import now",
        "Clear connector space",
        "<form",
    ] {
        assert!(!b.contains(control), "a viewer sees {control:?}: {b}");
    }
    let (_, b) = a.page("/", &viewer).await;
    assert!(
        !b.contains("Pause all schedules")
            && !b.contains(r#"href="/secrets""#)
            && !b.contains(r#"href="/audit""#)
            && !b.contains("Register one"),
        "{b}"
    );
    // Who may register relays is invited to.
    let (_, b) = a
        .page(
            "/",
            &a.cookie(&[Permission::DashboardRead, Permission::RelaysManage]),
        )
        .await;
    assert!(
        b.contains("No relay is registered.") && b.contains("Register one"),
        "{b}"
    );
    let (s, b) = a.page("/connectors/new", &viewer).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(b.contains("connectors.write"), "{b}");
    let (s, b) = a.page("/secrets", &viewer).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(b.contains("secrets.write"), "{b}");
    // Forced: the API refuses the viewer's write whatever the page showed.
    let (_, _, session) = a
        .send("GET", "/auth/session", &[("cookie", &viewer)], None)
        .await;
    let csrf = serde_json::from_str::<serde_json::Value>(&session).unwrap()["csrf_token"]
        .as_str()
        .unwrap()
        .to_string();
    let (s, _, b) = a
        .send(
            "POST",
            &format!("/api/connectors/{id}/clear"),
            &[("cookie", &viewer), ("x-csrf-token", &csrf)],
            None,
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    assert!(b.contains("connectors.write"), "{b}");
}

#[tokio::test]
async fn a_standby_names_the_active_instance_instead_of_serving_pages() {
    let a = app(false).await;
    let (s, b) = a.page("/connectors", &a.admin()).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        b.contains("This instance is <strong>standby</strong>")
            && b.contains("No instance is active"),
        "{b}"
    );
    // Another instance takes the epoch: the standby names it.
    let other = Engine::new(
        a.store.clone(),
        "im-b".into(),
        "host-b".into(),
        "1.2.4".into(),
        EngineConfig::default(),
    );
    other.promote(1, "test").await.unwrap();
    let (_, b) = a.page("/", "").await;
    assert!(b.contains("<strong>im-b</strong> on host-b"), "{b}");
}

#[tokio::test]
async fn source_data_is_escaped_in_pages() {
    let a = app(true).await;
    let evil = "'<img src=x onerror=alert(1)>'";
    let id = a
        .connector(serde_json::json!({"precedence": 5, "object_types": {"people": {"display_name": evil}}}))
        .await;
    let (s, b) = a.page(&format!("/connectors/{id}"), &a.admin()).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert!(!b.contains("<img src=x"), "{b}");
    assert!(b.contains("&lt;img src=x onerror=alert(1)&gt;"), "{b}");
}

#[tokio::test]
async fn schedules_are_disabled_and_enabled_through_the_api() {
    let a = app(true).await;
    let id = a.connector(serde_json::json!({"precedence": 5})).await;
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("authorization", bearer.as_str())];
    let body = serde_json::json!({"connector_id": id, "kind": "interval", "spec": "15m"});
    let (s, _, b) = a
        .send("POST", "/api/schedules", &auth, Some(body.to_string()))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let sid = serde_json::from_str::<serde_json::Value>(&b).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (s, _, b) = a
        .send(
            "PATCH",
            &format!("/api/schedules/{sid}"),
            &auth,
            Some(r#"{"enabled":false}"#.into()),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(
        (v["enabled"].clone(), v["next_run"].clone()),
        (serde_json::json!(false), serde_json::Value::Null)
    );
    let (_, page) = a.page("/schedules", &a.admin()).await;
    assert!(
        page.contains(">Enable<") && !page.contains(">Disable<"),
        "{page}"
    );
    let (s, _, b) = a
        .send(
            "PATCH",
            &format!("/api/schedules/{sid}"),
            &auth,
            Some(r#"{"enabled":true}"#.into()),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert!(
        serde_json::from_str::<serde_json::Value>(&b).unwrap()["next_run"].is_string(),
        "{b}"
    );
    let (s, _, _) = a
        .send(
            "PATCH",
            "/api/schedules/nope",
            &auth,
            Some(r#"{"enabled":true}"#.into()),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _, b) = a
        .send(
            "PATCH",
            &format!("/api/schedules/{sid}"),
            &auth,
            Some(r#"{"enabled":"yes"}"#.into()),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    let log = a
        .store
        .audit(&crate::store::AuditFilter::latest(10))
        .await
        .unwrap();
    assert!(
        log.iter().any(|e| e.action == "schedule.disable")
            && log.iter().any(|e| e.action == "schedule.enable"),
        "{log:?}"
    );
}

#[tokio::test]
async fn assets_ship_in_the_binary_and_a_browser_gets_a_refusal_page() {
    let a = app(true).await;
    let (s, h, b) = a.send("GET", "/assets/app.js", &[], None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        h["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/javascript")
            && b.contains("X-CSRF-Token")
    );
    let (s, _, _) = a.send("GET", "/assets/other.js", &[], None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // A callback with no sign-in in flight: a page for a browser, a problem for an API client.
    let (s, h, b) = a
        .send(
            "GET",
            "/auth/callback?code=c&state=s",
            &[("accept", "text/html,*/*")],
            None,
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        h["content-type"].to_str().unwrap().starts_with("text/html"),
        "{h:?}"
    );
    assert!(
        b.contains("Sign-in was refused: no sign-in in flight") && b.contains(r#"href="/signin""#),
        "{b}"
    );
    let (_, h, _) = a
        .send("GET", "/auth/callback?code=c&state=s", &[], None)
        .await;
    assert_eq!(h["content-type"], "application/problem+json");
}

#[tokio::test]
async fn the_operator_check_sees_the_sign_in_page_served() {
    let a = app(true).await;
    let req = Request::get("/internal/v1/ui").body(Body::empty()).unwrap();
    let res = a.internal.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let bytes = axum::body::to_bytes(res.into_body(), 1 << 16)
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    // No provider here: the bootstrap token signs in, and no discovery is asked for.
    assert_eq!(
        v,
        serde_json::json!({"page_status": 200, "sign_in": "bootstrap"})
    );
}
