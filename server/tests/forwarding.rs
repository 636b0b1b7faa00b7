//! Forwarding between two managed instances on one database: what reaches the instance that is
//! not active is answered by the active (applied once), held while nobody is active, and a
//! request is never forwarded twice.
//!
//! The two instances listen on 127.0.0.2 and 127.0.0.3 at one port and are named by those
//! addresses, so `https://{instance}:PORT` reaches each of them as a per-pod DNS name would.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const TOKEN: &str = "imb_forwarding-test-token";
const HOLD_MS: u64 = 1500;
const A: &str = "127.0.0.2";
const B: &str = "127.0.0.3";

struct Instance {
    proc: Proc,
    data: std::path::PathBuf,
    public: String,
    internal: String,
}

struct Setup {
    dir: tempfile::TempDir,
    ca_pem: String,
    client_pem: String,
    port: u16,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let ca = identitymesh_test_support::pki::TestCa::new("test cluster CA").unwrap();
    let srv = ca.server("localhost", &["localhost", A, B]).unwrap();
    let cl = ca.client("identitymesh-operator", None).unwrap();
    let p = dir.path();
    std::fs::write(p.join("ca.crt"), ca.cert_pem()).unwrap();
    std::fs::write(p.join("tls.crt"), &srv.cert_pem).unwrap();
    std::fs::write(p.join("tls.key"), &srv.key_pem).unwrap();
    std::fs::write(
        p.join("keyring.json"),
        identitymesh_keyring::KeyRing::generate().to_json(),
    )
    .unwrap();
    std::fs::write(p.join("admin.token"), TOKEN).unwrap();
    std::fs::create_dir_all(p.join("drop")).unwrap();
    std::fs::write(p.join("drop/people.csv"), "id,name\n1,Ada\n2,Grace\n").unwrap();
    Setup {
        ca_pem: ca.cert_pem().to_string(),
        client_pem: cl.identity_pem(),
        port: free_port(),
        dir,
    }
}

fn start(s: &Setup, name: &str) -> Instance {
    let dir = s.dir.path();
    let ip = free_port();
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "instance_name = \"{name}\"\nlisten = \"{name}:{port}\"\ninternal_listen = \"127.0.0.1:{ip}\"\n\
             [engine]\nheartbeat_interval_ms = 200\ninstance_ttl_ms = 2000\ndrain_timeout_ms = 1000\n\
             [forwarding]\nenabled = true\npeer_url_template = \"https://{{instance}}:{port}\"\nhold_ms = {HOLD_MS}\n",
            port = s.port
        ),
    )
    .unwrap();
    let data = dir.join(name);
    let file = |f: &str| dir.join(f).display().to_string();
    let env = [
        ("IM_DATA_DIR", data.display().to_string()),
        (
            "IM_DATABASE__CONNECTION_STRING",
            format!("sqlite://{}", file("shared.db")),
        ),
        ("IM_DATABASE__SQLITE_SINGLE_HOST", "true".into()),
        ("IM_CONNECTORS__CSV_ROOTS", file("drop")),
        ("IM_TLS__CERT_FILE", file("tls.crt")),
        ("IM_TLS__KEY_FILE", file("tls.key")),
        ("IM_TLS__CLIENT_CA_FILE", file("ca.crt")),
        ("IM_FORWARDING__CA_FILE", file("ca.crt")),
        ("IM_KEYRING__FILE", file("keyring.json")),
        ("IM_AUTH__BOOTSTRAP_TOKEN_FILE", file("admin.token")),
    ];
    Instance {
        proc: Proc::spawn(&["run", "--config", cfg.to_str().unwrap()], &env, dir),
        data,
        public: format!("https://{name}:{}", s.port),
        internal: format!("https://localhost:{ip}"),
    }
}

fn clients(s: &Setup) -> (reqwest::Client, reqwest::Client) {
    let ca = || reqwest::Certificate::from_pem(s.ca_pem.as_bytes()).unwrap();
    let op = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca())
        .identity(reqwest::Identity::from_pem(s.client_pem.as_bytes()).unwrap())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let user = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    (op, user)
}

async fn internal(op: &reqwest::Client, i: &Instance, what: &str, body: Value) -> Value {
    let r = op
        .post(format!("{}/internal/v1/{what}", i.internal))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{what} on {}", i.public);
    r.json().await.unwrap()
}

async fn call(
    c: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    body: Option<Value>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut rq = c.request(method, url).bearer_auth(TOKEN);
    if let Some(b) = body {
        rq = rq.json(&b);
    }
    let r = rq.send().await.unwrap();
    let (code, headers) = (r.status().as_u16(), r.headers().clone());
    let text = r.text().await.unwrap();
    (
        code,
        headers,
        serde_json::from_str(&text).unwrap_or(Value::Null),
    )
}

fn connector(name: &str, drop: &Path) -> Value {
    json!({"name": name, "kind": "csv",
           "config": {"folder": drop, "object_type": "person", "anchor_column": "id"}})
}

async fn connectors_named(c: &reqwest::Client, i: &Instance, name: &str) -> usize {
    let (code, _, v) = call(
        c,
        reqwest::Method::GET,
        format!("{}/api/connectors", i.public),
        None,
    )
    .await;
    assert_eq!(code, 200, "{v}");
    let items = v
        .as_array()
        .cloned()
        .or_else(|| v["items"].as_array().cloned())
        .unwrap_or_default();
    items.iter().filter(|c| c["name"] == name).count()
}

#[tokio::test]
async fn a_standby_forwards_to_the_active_holds_without_one_and_never_forwards_twice() {
    let s = setup();
    let (op, user) = clients(&s);
    let a = start(&s, A);
    let b = start(&s, B);
    wait_up(&user, &format!("{}/health/live", a.public), &a.proc).await;
    wait_up(&user, &format!("{}/health/live", b.public), &b.proc).await;
    let drop = s.dir.path().join("drop");
    internal(&op, &a, "promote", json!({"epoch": 1})).await;

    // The standby passes a write to the active: applied once, the active's answer relayed.
    let (code, _, created) = call(
        &user,
        reqwest::Method::POST,
        format!("{}/api/connectors", b.public),
        Some(connector("via-standby", &drop)),
    )
    .await;
    assert_eq!(code, 201, "{created}");
    assert_eq!(connectors_named(&user, &a, "via-standby").await, 1);
    // Engine work, which only the active does (a standby alone answers 409 "not active").
    let id = created["id"].as_str().unwrap().to_string();
    let (code, _, run) = call(
        &user,
        reqwest::Method::POST,
        format!("{}/api/connectors/{id}/runs", b.public),
        Some(json!({"mode": "full"})),
    )
    .await;
    assert_eq!(code, 202, "{run}");
    let (_, _, runs) = call(
        &user,
        reqwest::Method::GET,
        format!("{}/api/runs", a.public),
        None,
    )
    .await;
    let runs = runs
        .as_array()
        .cloned()
        .or_else(|| runs["items"].as_array().cloned())
        .unwrap_or_default();
    assert_eq!(
        runs.iter().filter(|r| r["id"] == run["id"]).count(),
        1,
        "{runs:?}"
    );
    // A browser sign-in through the standby: the active's cookie reaches the client unchanged.
    let r = user
        .post(format!("{}/auth/login", b.public))
        .form(&[("token", TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let cookie = r
        .headers()
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .find(|c| c.starts_with("im_session="))
        .expect("the session cookie");
    assert!(
        cookie.contains("Secure") && cookie.contains("HttpOnly"),
        "{cookie}"
    );
    // Probes stay local: the standby answers for itself.
    let ready: Value = user
        .get(format!("{}/health/ready", b.public))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["role"], "standby");

    // A forwarded request reaching an instance that is not active is refused, not forwarded.
    let r = user
        .get(format!("{}/api/connectors", b.public))
        .bearer_auth(TOKEN)
        .header("x-identitymesh-forwarded-by", "elsewhere")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let why: Value = r.json().await.unwrap();
    assert!(
        why["detail"].as_str().unwrap().contains("at most once"),
        "{why}"
    );

    // Demoted, nobody promoted yet: a request is held for hold_ms, then 503 saying why.
    internal(&op, &a, "demote", json!({})).await;
    let t = Instant::now();
    let (code, headers, why) = call(
        &user,
        reqwest::Method::GET,
        format!("{}/api/connectors", a.public),
        None,
    )
    .await;
    let held = t.elapsed();
    assert_eq!(code, 503, "{why}");
    assert!(held >= Duration::from_millis(HOLD_MS), "{held:?}");
    assert!(held < Duration::from_millis(HOLD_MS + 2000), "{held:?}");
    assert_eq!(headers["retry-after"], "1");
    let detail = why["detail"].as_str().unwrap();
    assert!(
        detail.contains("demoted") && detail.contains("retry"),
        "{detail}"
    );
    // The standby forwards to the demoted holder, which refuses; nothing loops.
    let (code, _, why) = call(
        &user,
        reqwest::Method::POST,
        format!("{}/api/connectors", b.public),
        Some(connector("refused", &drop)),
    )
    .await;
    assert_eq!(code, 503, "{why}");

    // A write held on the demoted instance goes to the new active once it is promoted.
    let t = Instant::now();
    let held = tokio::spawn({
        let (user, url, body) = (
            user.clone(),
            format!("{}/api/connectors", a.public),
            connector("held", &drop),
        );
        async move { call(&user, reqwest::Method::POST, url, Some(body)).await }
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    internal(&op, &b, "promote", json!({"epoch": 2})).await;
    let (code, _, v) = held.await.unwrap();
    assert_eq!(code, 201, "{v}");
    assert!(t.elapsed() >= Duration::from_millis(400));
    assert_eq!(connectors_named(&user, &b, "held").await, 1);
    assert_eq!(connectors_named(&user, &b, "refused").await, 0);
    // And the old active forwards to the new one from now on.
    assert_eq!(connectors_named(&user, &a, "via-standby").await, 1);

    // Nothing secret in the logs: no token, no cookie.
    let log = log_text(&a.data) + &log_text(&b.data);
    assert!(
        log.contains("forwarded a request to the active instance"),
        "{log}"
    );
    assert!(
        !log.contains(TOKEN) && !log.contains("im_session="),
        "{log}"
    );
    drop_all(a, b);
}

fn drop_all(mut a: Instance, mut b: Instance) {
    for i in [&mut a, &mut b] {
        i.proc.terminate(Duration::from_secs(20));
    }
}
