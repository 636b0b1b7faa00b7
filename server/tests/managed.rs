//! Managed mode: two instances on one database, promoted and fenced through the mTLS internal API.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

struct Instance {
    proc: Proc,
    data: std::path::PathBuf,
    public: String,
    internal: String,
}

fn start(name: &str, dir: &Path, db: &Path, pki: &Pki, token_file: &Path) -> Instance {
    let (pp, ip) = (free_port(), free_port());
    // Per process, not per name: a test may run two processes with one name (a recreated pod).
    let cfg = dir.join(format!("{name}-{pp}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "instance_name = \"{name}\"\nlisten = \"127.0.0.1:{pp}\"\ninternal_listen = \"127.0.0.1:{ip}\"\n\
             [engine]\nheartbeat_interval_ms = 200\ninstance_ttl_ms = 2000\ndrain_timeout_ms = 1000\n"
        ),
    )
    .unwrap();
    let data = dir.join(format!("{name}-{pp}"));
    let env = [
        ("IM_DATA_DIR", data.display().to_string()),
        (
            "IM_DATABASE__CONNECTION_STRING",
            format!("sqlite://{}", db.display()),
        ),
        // Both processes run on this host, so the shared SQLite file's locks hold.
        ("IM_DATABASE__SQLITE_SINGLE_HOST", "true".into()),
        // The canary's CSV folder; managed mode allows none by default.
        (
            "IM_CONNECTORS__CSV_ROOTS",
            dir.join("canary").display().to_string(),
        ),
        ("IM_TLS__CERT_FILE", pki.cert.display().to_string()),
        ("IM_TLS__KEY_FILE", pki.key.display().to_string()),
        ("IM_TLS__CLIENT_CA_FILE", pki.ca.display().to_string()),
        ("IM_KEYRING__FILE", pki.keyring.display().to_string()),
        (
            "IM_AUTH__BOOTSTRAP_TOKEN_FILE",
            token_file.display().to_string(),
        ),
    ];
    Instance {
        proc: Proc::spawn(&["run", "--config", cfg.to_str().unwrap()], &env, dir),
        data,
        public: format!("https://localhost:{pp}"),
        internal: format!("https://localhost:{ip}"),
    }
}

async fn status(c: &reqwest::Client, i: &Instance) -> serde_json::Value {
    get_json(c, &format!("{}/internal/v1/status", i.internal), None).await
}

async fn promote(c: &reqwest::Client, i: &Instance, epoch: i64) -> reqwest::Response {
    c.post(format!("{}/internal/v1/promote", i.internal))
        .json(&serde_json::json!({ "epoch": epoch }))
        .send()
        .await
        .unwrap()
}

async fn actives(c: &reqwest::Client, i: &Instance, token: &str) -> Vec<String> {
    let rows: Vec<serde_json::Value> =
        get_json(c, &format!("{}/api/instances", i.public), Some(token)).await;
    rows.iter()
        .filter(|r| r["role"] == "active")
        .map(|r| r["instance"].as_str().unwrap_or("").to_string())
        .collect()
}

/// Two managed instances on one database, live, with the operator's mTLS client.
struct Pair {
    dir: tempfile::TempDir,
    token: &'static str,
    op: reqwest::Client,
    a: Instance,
    b: Instance,
}

async fn pair(names: [&str; 2]) -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(&dir.path().join("pki"));
    let db = dir.path().join("shared.db");
    let token = "imb_managed-test-token";
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, token).unwrap();
    let a = start(names[0], dir.path(), &db, &pki, &token_file);
    let b = start(names[1], dir.path(), &db, &pki, &token_file);
    let op = mtls_client(&pki);
    wait_up(&op, &format!("{}/health/live", a.public), &a.proc).await;
    wait_up(&op, &format!("{}/health/live", b.public), &b.proc).await;
    Pair {
        dir,
        token,
        op,
        a,
        b,
    }
}

#[tokio::test]
async fn promotion_fences_the_old_active() {
    let Pair {
        dir,
        token,
        op,
        a,
        b,
    } = pair(["im-a", "im-b"]).await;

    // Both start standby and are ready (a standby is ready when it could take over).
    for i in [&a, &b] {
        assert_eq!(status(&op, i).await["role"], "standby");
        let r = op
            .get(format!("{}/health/ready", i.public))
            .send()
            .await
            .unwrap();
        // No licence configured in this test: not ready, and the body says why.
        assert_eq!(r.status(), 503);
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["checks"]["database"]["ok"], true);
        assert_eq!(body["checks"]["licence"]["ok"], false);
    }

    assert_eq!(promote(&op, &a, 1).await.status(), 200);
    assert_eq!(status(&op, &a).await["role"], "active");
    eventually(
        Duration::from_secs(5),
        "a is the one active row",
        || async { actives(&op, &a, token).await == vec!["im-a".to_string()] },
    )
    .await;
    // Idempotent retry by the holder.
    assert_eq!(promote(&op, &a, 1).await.status(), 200);

    assert_eq!(promote(&op, &b, 2).await.status(), 200);
    // A's next engine write fails and it demotes itself.
    eventually(Duration::from_secs(5), "a demotes itself", || async {
        status(&op, &a).await["role"] == "standby"
    })
    .await;
    eventually(Duration::from_secs(5), "only b active", || async {
        actives(&op, &b, token).await == vec!["im-b".to_string()]
    })
    .await;

    // Engine work happens on the active only: the standby refuses runs and canaries, the
    // active answers the operator's post-cutover checks.
    let r = op
        .post(format!("{}/api/connectors/any/runs", a.public))
        .bearer_auth(token)
        .json(&serde_json::json!({"mode": "delta"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    assert!(r.text().await.unwrap().contains("not active"));
    let r = op
        .post(format!("{}/internal/v1/canary", a.internal))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let canary: serde_json::Value = op
        .post(format!("{}/internal/v1/canary", b.internal))
        .json(&serde_json::json!({"wait_ms": 1000}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        canary["ok"],
        serde_json::Value::Null,
        "no canary connector: {canary}"
    );
    // With a canary connector (a CSV drop folder), the canary runs it and reports success.
    let drop = dir.path().join("canary");
    std::fs::create_dir_all(&drop).unwrap();
    std::fs::write(drop.join("c.csv"), "id,name\n1,Canary\n").unwrap();
    let r = op
        .post(format!("{}/api/connectors", b.public))
        .bearer_auth(token)
        .json(
            &serde_json::json!({"name": "canary", "kind": "csv", "canary": true,
            "config": {"folder": drop, "object_type": "row", "anchor_column": "id"},
            "rules": {"precedence": 1}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let canary: serde_json::Value = op
        .post(format!("{}/internal/v1/canary", b.internal))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(canary["ok"], true, "{canary}");
    assert_eq!(canary["runs"][0]["status"], "succeeded", "{canary}");
    let relays: serde_json::Value =
        get_json(&op, &format!("{}/internal/v1/relays", b.internal), None).await;
    assert_eq!(relays["expected"], serde_json::json!([]), "{relays}");

    // The operator's view of the registry over mTLS agrees.
    let rows: Vec<serde_json::Value> =
        get_json(&op, &format!("{}/internal/v1/instances", a.internal), None).await;
    let act: Vec<_> = rows.iter().filter(|r| r["role"] == "active").collect();
    assert_eq!(act.len(), 1, "{rows:?}");
    assert_eq!(act[0]["instance"], "im-b");
    // ... and reads as the contract's rows, as the operator reads them.
    let typed: Vec<identitymesh_contract::internal::InstanceRow> =
        serde_json::from_value(serde_json::Value::Array(rows.clone())).unwrap();
    let act: Vec<_> = typed
        .iter()
        .filter(|r| r.role == identitymesh_contract::internal::Role::Active)
        .collect();
    assert_eq!(act.len(), 1, "{typed:?}");
    assert_eq!(act[0].instance, "im-b");
    let st: identitymesh_contract::internal::InternalStatus =
        serde_json::from_value(status(&op, &b).await).unwrap();
    assert_eq!(st.instance, "im-b");
    assert_eq!(st.role, identitymesh_contract::internal::Role::Active);
    assert!(!st.incarnation.is_empty(), "{st:?}");

    // Epochs not greater than the stored one are refused, with a problem body.
    for epoch in [1, 2] {
        let r = promote(&op, &a, epoch).await;
        assert_eq!(r.status(), 409);
        assert_eq!(r.headers()["content-type"], "application/problem+json");
        let p: serde_json::Value = r.json().await.unwrap();
        assert!(p["detail"].as_str().unwrap().contains("not greater"), "{p}");
        assert_eq!(p["stored_epoch"], 2, "{p}");
        let holder = p["holder"].as_str().unwrap_or("");
        assert!(holder.starts_with("im-b (incarnation "), "{p}");
    }
    assert_eq!(status(&op, &a).await["role"], "standby");

    // Demote drains and keeps the process up as standby.
    let r: serde_json::Value = op
        .post(format!("{}/internal/v1/demote", b.internal))
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["role"], "standby");
    assert_eq!(r["drained"], true);
    assert_eq!(
        op.get(format!("{}/health/live", b.public))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // The log names why A stepped down.
    let log = log_text(&a.data);
    assert!(log.contains("fenced"), "{log}");
    assert!(!log.contains(token), "token leaked to the log");
}

/// A recreated pod and its predecessor (still running on a cut-off node) share the name `im-b`:
/// a retried promote of the same epoch reaching the new process is refused, so the two never
/// hold one epoch; the new process takes a greater one and the old one is fenced.
#[tokio::test]
async fn a_recreated_pod_of_the_same_name_needs_a_greater_epoch() {
    let Pair {
        op, a: old, b: new, ..
    } = pair(["im-b", "im-b"]).await;
    let (so, sn) = (status(&op, &old).await, status(&op, &new).await);
    assert_eq!(
        (so["instance"].clone(), sn["instance"].clone()),
        ("im-b".into(), "im-b".into())
    );
    let inc = |s: &serde_json::Value| s["incarnation"].as_str().unwrap_or("").to_string();
    assert!(!inc(&so).is_empty() && inc(&so) != inc(&sn), "{so} {sn}");

    assert_eq!(promote(&op, &old, 1).await.status(), 200);
    let r = promote(&op, &new, 1).await;
    assert_eq!(r.status(), 409, "same epoch, other incarnation");
    let p: serde_json::Value = r.json().await.unwrap();
    assert_eq!(p["stored_epoch"], 1, "{p}");
    assert!(
        p["holder"].as_str().unwrap_or("").contains(&inc(&so)),
        "{p}"
    );
    assert_eq!(status(&op, &new).await["role"], "standby");
    assert_eq!(status(&op, &old).await["role"], "active");

    // The operator's answer to the 409: stored_epoch + 1.
    assert_eq!(promote(&op, &new, 2).await.status(), 200);
    eventually(
        Duration::from_secs(5),
        "the old process fences itself",
        || async { status(&op, &old).await["role"] == "standby" },
    )
    .await;
    let rows: Vec<serde_json::Value> = get_json(
        &op,
        &format!("{}/internal/v1/instances", new.internal),
        None,
    )
    .await;
    let act: Vec<_> = rows.iter().filter(|r| r["role"] == "active").collect();
    assert_eq!(act.len(), 1, "{rows:?}");
    assert_eq!(
        act[0]["incarnation"].as_str(),
        Some(inc(&sn).as_str()),
        "{rows:?}"
    );
}

#[tokio::test]
async fn internal_api_requires_a_client_certificate_and_rejects_bad_bodies() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(&dir.path().join("pki"));
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, "imb_x").unwrap();
    let a = start(
        "im-a",
        dir.path(),
        &dir.path().join("db.sqlite"),
        &pki,
        &token_file,
    );
    let op = mtls_client(&pki);
    wait_up(&op, &format!("{}/health/live", a.public), &a.proc).await;

    // No client certificate: the TLS handshake is refused, nothing reaches the handler.
    let anon = ca_only_client(&pki);
    assert!(anon
        .post(format!("{}/internal/v1/promote", a.internal))
        .json(&serde_json::json!({"epoch": 7}))
        .send()
        .await
        .is_err());
    // A client certificate from another CA is refused too.
    let other = pki_other(dir.path());
    let stranger = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap())
        .identity(reqwest::Identity::from_pem(other.client_pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    assert!(stranger
        .post(format!("{}/internal/v1/promote", a.internal))
        .json(&serde_json::json!({"epoch": 7}))
        .send()
        .await
        .is_err());
    assert_eq!(status(&op, &a).await["role"], "standby");

    let url = format!("{}/internal/v1/promote", a.internal);
    let cases: Vec<(reqwest::RequestBuilder, u16)> = vec![
        (
            op.post(&url)
                .header("content-type", "application/json")
                .body("{\"epoch\":"),
            400,
        ),
        (
            op.post(&url)
                .header("content-type", "text/plain")
                .body("{\"epoch\":3}"),
            415,
        ),
        (
            op.post(&url).json(&serde_json::json!({"epoch": "three"})),
            422,
        ),
        (
            op.post(&url)
                .json(&serde_json::json!({"epoch": 3, "extra": 1})),
            422,
        ),
        (op.post(&url).json(&serde_json::json!({"epoch": 0})), 400),
        (
            op.post(&url)
                .header("content-type", "application/json")
                .body(vec![b' '; 100 * 1024]),
            413,
        ),
        (op.get(&url), 405),
        (op.get(format!("{}/internal/v1/nothing", a.internal)), 404),
    ];
    for (req, want) in cases {
        let r = req.send().await.unwrap();
        assert_eq!(r.status().as_u16(), want);
        assert_eq!(r.headers()["content-type"], "application/problem+json");
        let p: serde_json::Value = r.json().await.unwrap();
        assert!(!p["detail"].as_str().unwrap_or("").is_empty());
    }
    // Still alive and still standby after all of that.
    assert_eq!(status(&op, &a).await["role"], "standby");
    assert_eq!(
        op.get(format!("{}/health/live", a.public))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

fn pki_other(dir: &Path) -> Pki {
    pki(&dir.join("other-pki"))
}
