//! Browser sign-in against a real Keycloak: the server discovers the realm, sends the "browser"
//! (reqwest, redirects and cookies handled here, per origin) to Keycloak's login page, the form
//! is filled in and posted, the callback sets the session cookie, and the cookie then works on
//! the API (reads; writes only with the CSRF token). The failover property: the cookie opens on
//! a second server started with the same keyring.json, and on one whose ring has a key added,
//! and not on one with another ring.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::oidc::{start_keycloak, start_server, Server};
use common::*;
use serde_json::json;

/// A minimal browser: follows redirects itself and keeps cookies per origin (scheme, host and
/// port), so the test sees and controls every hop.
struct Browser {
    http: reqwest::Client,
    jar: BTreeMap<String, BTreeMap<String, String>>,
    hops: Vec<String>,
}

fn origin(url: &reqwest::Url) -> String {
    format!(
        "{}://{}:{}",
        url.scheme(),
        url.host_str().unwrap_or(""),
        url.port_or_known_default().unwrap_or(0)
    )
}

impl Browser {
    fn new() -> Self {
        Self {
            http: reqwest::Client::builder()
                .danger_accept_invalid_certs(true)
                .redirect(reqwest::redirect::Policy::none())
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            jar: BTreeMap::new(),
            hops: Vec::new(),
        }
    }

    fn cookie(&self, url: &str, name: &str) -> Option<String> {
        let u = reqwest::Url::parse(url).unwrap();
        self.jar.get(&origin(&u))?.get(name).cloned()
    }

    /// Sends one request with this origin's cookies and records the ones it sets.
    async fn send(
        &mut self,
        method: reqwest::Method,
        url: &str,
        form: Option<&[(&str, &str)]>,
    ) -> reqwest::Response {
        let u = reqwest::Url::parse(url).unwrap();
        let mut req = self.http.request(method, u.clone());
        if let Some(c) = self.jar.get(&origin(&u)) {
            let v: Vec<String> = c.iter().map(|(k, v)| format!("{k}={v}")).collect();
            if !v.is_empty() {
                req = req.header("cookie", v.join("; "));
            }
        }
        if let Some(f) = form {
            req = req.form(f);
        }
        let res = req.send().await.unwrap();
        let jar = self.jar.entry(origin(&u)).or_default();
        for sc in res.headers().get_all("set-cookie") {
            let sc = sc.to_str().unwrap();
            let pair = sc.split(';').next().unwrap();
            let (k, v) = pair.split_once('=').unwrap();
            if v.is_empty() || sc.contains("Max-Age=0") {
                jar.remove(k);
            } else {
                jar.insert(k.to_string(), v.to_string());
            }
        }
        self.hops.push(format!("{} {}", res.status(), url));
        res
    }

    /// Follows redirects from `res` (GET) until an answer that is not one.
    async fn follow(&mut self, mut res: reqwest::Response) -> (reqwest::Response, String) {
        let mut url = res.url().to_string();
        for _ in 0..10 {
            if !res.status().is_redirection() {
                return (res, url);
            }
            let loc = res.headers()["location"].to_str().unwrap().to_string();
            url = res.url().join(&loc).unwrap().to_string();
            res = self.send(reqwest::Method::GET, &url, None).await;
        }
        panic!("too many redirects: {:?}", self.hops);
    }
}

/// The login form's action URL in Keycloak's page.
fn form_action(html: &str) -> String {
    let form = html
        .find("id=\"kc-form-login\"")
        .map(|i| &html[i..])
        .unwrap_or_else(|| panic!("no login form in the page:\n{html}"));
    let a = form.find("action=\"").expect("the form's action") + 8;
    let end = form[a..].find('"').unwrap();
    form[a..a + end].replace("&amp;", "&")
}

/// Signs `user` in on `server` through Keycloak's login page: the session cookie's value, and
/// the callback URL the browser was sent to (for the replay check).
async fn sign_in(b: &mut Browser, server: &Server, user: &str) -> (String, String, String) {
    let res = b
        .send(
            reqwest::Method::GET,
            &format!("{}/auth/login", server.base),
            None,
        )
        .await;
    assert_eq!(res.status(), 303, "{:?}", b.hops);
    let login_cookie = b
        .cookie(&server.base, "im_login")
        .expect("the sign-in cookie");
    let (page, url) = b.follow(res).await;
    assert_eq!(page.status(), 200, "{url}: {:?}", b.hops);
    let html = page.text().await.unwrap();
    let action = form_action(&html);
    let pw = format!("{user}-pw");
    let res = b
        .send(
            reqwest::Method::POST,
            &action,
            Some(&[("username", user), ("password", &pw), ("credentialId", "")]),
        )
        .await;
    assert_eq!(res.status(), 302, "{:?}", b.hops);
    let callback = res.headers()["location"].to_str().unwrap().to_string();
    assert!(
        callback.starts_with(&format!("{}/auth/callback?", server.base)),
        "{callback}"
    );
    let res = b.send(reqwest::Method::GET, &callback, None).await;
    let status = res.status();
    let loc = res
        .headers()
        .get("location")
        .map(|v| v.to_str().unwrap().to_string());
    assert_eq!(
        (status.as_u16(), loc.as_deref()),
        (303, Some("/")),
        "{}; {}",
        res.text().await.unwrap_or_default(),
        server.proc.output()
    );
    let session = b
        .cookie(&server.base, "im_session")
        .expect("the session cookie");
    assert!(
        b.cookie(&server.base, "im_login").is_none(),
        "sign-in cookie cleared"
    );
    (session, callback, login_cookie)
}

async fn call(
    server: &Server,
    method: reqwest::Method,
    path: &str,
    cookie: &str,
    csrf: Option<&str>,
) -> (u16, String) {
    let mut req = insecure_client()
        .request(method, format!("{}{path}", server.base))
        .header("cookie", format!("im_session={cookie}"));
    if let Some(t) = csrf {
        req = req.header("x-csrf-token", t);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn sign_in_at_keycloak_and_the_session_survives_a_failover() {
    let tmp = tempfile::tempdir().unwrap();
    // The realm's redirect URIs: any loopback HTTPS port (the servers pick free ports).
    let (mut kc, issuer) = start_keycloak(&tmp.path().join("keycloak")).await;

    let a = start_server(&tmp.path().join("a"), &issuer, None).await;
    let mut browser = Browser::new();
    let (cookie, callback, login_cookie) = sign_in(&mut browser, &a, "alice").await;

    // Reads with the cookie; the session names the user and their mapped permissions.
    let (st, body) = call(&a, reqwest::Method::GET, "/auth/session", &cookie, None).await;
    assert_eq!(st, 200, "{body}");
    let s: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(s["name"], "alice Operator", "{s}");
    assert_eq!(
        s["permissions"],
        json!(["dashboard.read", "schedules.manage", "relays.manage"]),
        "{s}"
    );
    let csrf = s["csrf_token"].as_str().unwrap().to_string();
    let (st, body) = call(&a, reqwest::Method::GET, "/api/instances", &cookie, None).await;
    assert_eq!(st, 200, "{body}");
    // A write needs the CSRF token.
    let (st, body) = call(&a, reqwest::Method::POST, "/api/sync/pause", &cookie, None).await;
    assert_eq!(st, 403, "{body}");
    assert!(body.contains("x-csrf-token"), "{body}");
    let (st, body) = call(
        &a,
        reqwest::Method::POST,
        "/api/sync/pause",
        &cookie,
        Some(&csrf),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let (st, body) = call(
        &a,
        reqwest::Method::POST,
        "/api/sync/resume",
        &cookie,
        Some(&csrf),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    // What the groups do not grant stays refused.
    let (st, _) = call(&a, reqwest::Method::GET, "/api/audit", &cookie, None).await;
    assert_eq!(st, 403);

    // The callback replayed with its sign-in cookie: refused (the state was used).
    let r = insecure_client()
        .get(&callback)
        .header("cookie", format!("im_login={login_cookie}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("replayed state"));

    // A viewer: signed in, reads, cannot pause.
    let mut other = Browser::new();
    let (bob, _, _) = sign_in(&mut other, &a, "bob").await;
    let (_, body) = call(&a, reqwest::Method::GET, "/auth/session", &bob, None).await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["permissions"], json!(["dashboard.read"]), "{v}");
    let bob_csrf = v["csrf_token"].as_str().unwrap();
    let (st, body) = call(
        &a,
        reqwest::Method::POST,
        "/api/sync/pause",
        &bob,
        Some(bob_csrf),
    )
    .await;
    assert_eq!(st, 403, "{body}");
    assert!(body.contains("schedules.manage"), "{body}");

    // The failover property: another server with the same keyring.json opens A's cookie, and
    // its CSRF token holds there.
    let ring = tmp.path().join("a/data/keyring.json");
    let b = start_server(&tmp.path().join("b"), &issuer, Some(&ring)).await;
    let (st, body) = call(&b, reqwest::Method::GET, "/api/instances", &cookie, None).await;
    assert_eq!(st, 200, "{body}");
    let (st, body) = call(
        &b,
        reqwest::Method::POST,
        "/api/sync/pause",
        &cookie,
        Some(&csrf),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    // A ring with a cookie key added (a rotation in progress) still opens it.
    let mut rotated = identitymesh_keyring::KeyRing::parse(&std::fs::read(&ring).unwrap()).unwrap();
    rotated.cookie_keys.insert(
        "c2".into(),
        identitymesh_keyring::KeyRing::generate().cookie_keys["c1"].clone(),
    );
    let rotated_file = tmp.path().join("rotated-keyring.json");
    std::fs::write(&rotated_file, rotated.to_json()).unwrap();
    let c = start_server(&tmp.path().join("c"), &issuer, Some(&rotated_file)).await;
    let (st, body) = call(&c, reqwest::Method::GET, "/auth/session", &cookie, None).await;
    assert_eq!(st, 200, "{body}");
    // A server with another key ring does not.
    let d = start_server(&tmp.path().join("d"), &issuer, None).await;
    let (st, body) = call(&d, reqwest::Method::GET, "/api/instances", &cookie, None).await;
    assert_eq!(st, 401, "{body}");
    assert!(body.contains("another key ring"), "{body}");
    let log = log_text(&tmp.path().join("d/data"));
    assert!(log.contains("session cookie refused"), "{log}");
    assert!(
        !log.contains(&cookie),
        "the cookie's value never reaches the log"
    );

    for mut s in [a, b, c, d] {
        s.proc.terminate(Duration::from_secs(30));
    }
    assert!(kc.stop(), "Keycloak did not stop on SIGTERM");
}
