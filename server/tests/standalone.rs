//! The main job on a fresh machine: `identitymesh-server standalone --data-dir DIR`.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::*;

#[tokio::test]
async fn standalone_serves_health_and_instances_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let base = format!("https://127.0.0.1:{port}");
    let args = [
        "standalone",
        "--data-dir",
        data.to_str().unwrap(),
        "--listen",
        &listen,
    ];
    let mut p = Proc::spawn(&args, &[], dir.path());
    let c = insecure_client();
    wait_up(&c, &format!("{base}/health/live"), &p).await;

    assert_eq!(
        c.get(format!("{base}/health/live"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let ready = c.get(format!("{base}/health/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["checks"]["database"]["ok"], true, "{body}");
    assert_eq!(body["checks"]["licence"]["ok"], true, "{body}");

    // The token file: printed path, owner-only mode.
    let token_path = data.join("admin.token");
    let mode = std::fs::metadata(&token_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let token = std::fs::read_to_string(&token_path)
        .unwrap()
        .trim()
        .to_string();
    common::eventually(Duration::from_secs(5), "token path printed", || {
        let out = p.output();
        let path = token_path.display().to_string();
        async move { out.contains(&path) }
    })
    .await;

    let r = c.get(format!("{base}/api/instances")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let rows: Vec<serde_json::Value> =
        get_json(&c, &format!("{base}/api/instances"), Some(&token)).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["role"], "active");
    let first_epoch = rows[0]["epoch"].as_i64().unwrap();
    assert!(first_epoch >= 1);

    let st = p.terminate(Duration::from_secs(20));
    assert!(st.success(), "exit status {st:?}; {}", p.output());
    let log = log_text(&data);
    assert!(
        last_line(&log).contains("shutdown complete"),
        "last log line: {}",
        last_line(&log)
    );
    assert!(last_line(&std::fs::read_to_string(&p.stdout).unwrap()).contains("shutdown complete"));
    assert!(!log.contains(&token), "the admin token reached the log");
    assert!(
        !p.output().contains(&token),
        "the admin token reached stdout/stderr"
    );

    // Restart on the same directory: same token, state kept, next epoch.
    let mut p2 = Proc::spawn(&args, &[], dir.path());
    wait_up(&c, &format!("{base}/health/live"), &p2).await;
    assert_eq!(std::fs::read_to_string(&token_path).unwrap().trim(), token);
    let rows: Vec<serde_json::Value> =
        get_json(&c, &format!("{base}/api/instances"), Some(&token)).await;
    let active: Vec<_> = rows.iter().filter(|r| r["role"] == "active").collect();
    assert_eq!(active.len(), 1, "{rows:?}");
    assert_eq!(active[0]["epoch"].as_i64().unwrap(), first_epoch + 1);
    let audit: Vec<serde_json::Value> =
        get_json(&c, &format!("{base}/api/audit?limit=10"), Some(&token)).await;
    assert!(
        audit.iter().filter(|e| e["action"] == "promote").count() >= 2,
        "{audit:?}"
    );
    assert!(p2.terminate(Duration::from_secs(20)).success());
}

#[tokio::test]
async fn bad_config_is_refused_at_start_with_the_key_named() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("server.toml");
    std::fs::write(&cfg, "data_dir = \"/tmp/x\"\n[engine]\nheartbeat = 5\n").unwrap();
    let mut p = Proc::spawn(&["run", "--config", cfg.to_str().unwrap()], &[], dir.path());
    let st = p.wait(Duration::from_secs(20));
    assert_eq!(st.code(), Some(2));
    let out = p.output();
    assert!(
        out.contains("engine") && out.contains("unknown field `heartbeat`"),
        "{out}"
    );

    let mut p = Proc::spawn(
        &[
            "standalone",
            "--data-dir",
            dir.path().join("d").to_str().unwrap(),
        ],
        &[("IM_ENGINE__DRAIN_TIMEOUT_MS", "soon".into())],
        dir.path(),
    );
    assert_eq!(p.wait(Duration::from_secs(20)).code(), Some(2));
    let out = p.output();
    assert!(
        out.contains("engine.drain_timeout_ms") && out.contains("IM_ENGINE__DRAIN_TIMEOUT_MS"),
        "{out}"
    );

    let mut p = Proc::spawn(
        &[
            "standalone",
            "--data-dir",
            dir.path().join("d").to_str().unwrap(),
            "--listen",
            "nonsense",
        ],
        &[],
        dir.path(),
    );
    assert_eq!(p.wait(Duration::from_secs(20)).code(), Some(2));
    assert!(p.output().contains("HOST:PORT"), "{}", p.output());
}

#[tokio::test]
async fn expired_licence_makes_the_instance_not_ready_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let lic = dir.path().join("licence.json");
    std::fs::write(
        &lic,
        r#"{"format":1,"customer":"Contoso","licence_id":"L-9","edition":"enterprise","issued":"2020-01-01T00:00:00Z","expires":"2021-01-01T00:00:00Z"}"#,
    )
    .unwrap();
    let port = free_port();
    let p = Proc::spawn(
        &[
            "standalone",
            "--data-dir",
            data.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ],
        &[("IM_LICENCE__FILE", lic.display().to_string())],
        dir.path(),
    );
    let c = insecure_client();
    let base = format!("https://127.0.0.1:{port}");
    wait_up(&c, &format!("{base}/health/live"), &p).await;
    let r = c.get(format!("{base}/health/ready")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["checks"]["licence"]["ok"], false);
    assert!(
        body["checks"]["licence"]["detail"]
            .as_str()
            .unwrap()
            .contains("expired"),
        "{body}"
    );
    assert_eq!(body["checks"]["database"]["ok"], true);
}

#[tokio::test]
async fn an_unreachable_sql_server_is_a_clear_error_and_the_password_is_never_logged() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // A loopback port nothing listens on.
    let port = free_port();
    let secret = "Pa55-w0rd-never-logged";
    let cs = format!("Server=tcp:127.0.0.1,{port};Database=IdentityMesh;User Id=im;Password={secret};Encrypt=false");
    let mut p = Proc::spawn(
        &[
            "standalone",
            "--data-dir",
            data.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
        ],
        &[
            ("IM_DATABASE__CONNECTION_STRING", cs),
            ("IM_DATABASE__CONNECT_TIMEOUT_MS", "1500".into()),
        ],
        dir.path(),
    );
    let st = p.wait(Duration::from_secs(30));
    assert!(!st.success());
    let out = p.output();
    assert!(out.contains("cannot open SQL Server"), "{out}");
    assert!(
        out.contains("not reachable yet"),
        "retries are logged: {out}"
    );
    assert!(!out.contains(secret), "password leaked to stdout/stderr");
    assert!(
        !log_text(&data).contains(secret),
        "password leaked to the log file"
    );
}
