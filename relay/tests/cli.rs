//! The `identitymesh-relay` binary: enroll, run, SIGTERM.

mod common;

use common::{wait_until, Pki, TestBackend, TlsServer};
use identitymesh_signalr::hub::HubConfig;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_identitymesh-relay");

fn enroll(args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN)
        .arg("enroll")
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test]
async fn enroll_run_and_sigterm() {
    let pki = Pki::new();
    let backend = Arc::new(TestBackend::default());
    let server = TlsServer::start(0, &pki, backend.clone(), HubConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("cluster-ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let wrong_ca = dir.path().join("wrong-ca.pem");
    std::fs::write(&wrong_ca, Pki::new().ca_pem).unwrap();
    let cfg_dir = dir.path().join("state");
    let cfg = cfg_dir.join("relay.toml");
    let url = server.url();
    let resolve = server.resolve();
    let (c, ca_s, wrong_s) = (
        cfg.to_str().unwrap(),
        ca.to_str().unwrap(),
        wrong_ca.to_str().unwrap(),
    );

    let (ok, out) = enroll(&[
        "--server",
        "ftp://x",
        "--token",
        "t",
        "--ca-file",
        ca_s,
        "--config",
        c,
    ]);
    assert!(!ok && out.contains("invalid server URL"), "{out}");
    let (ok, out) = enroll(&["--server", &url, "--token", "t", "--config", c]);
    assert!(!ok && out.contains("--ca-file"), "{out}");
    let (ok, out) = enroll(&[
        "--server",
        &url,
        "--token",
        "token-r7",
        "--ca-file",
        wrong_s,
        "--config",
        c,
        "--resolve",
        &resolve,
    ]);
    assert!(!ok && out.contains("not trusted"), "{out}");
    let (ok, out) = enroll(&[
        "--server",
        &url,
        "--token",
        "bad",
        "--ca-file",
        ca_s,
        "--config",
        c,
        "--resolve",
        &resolve,
    ]);
    assert!(
        !ok && out.contains("rejected the relay credential"),
        "{out}"
    );
    assert!(!cfg.exists(), "nothing is written when enrollment fails");

    let (ok, out) = enroll(&[
        "--server",
        &url,
        "--token",
        "token-r7",
        "--ca-file",
        ca_s,
        "--config",
        c,
        "--resolve",
        &resolve,
    ]);
    assert!(ok, "{out}");
    assert!(cfg_dir.join("ca.pem").exists());
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(text.contains("ca_file = \"ca.pem\""), "{text}");

    let mut child = Command::new(BIN)
        .args(["run", "--config", c])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("relay connected", Duration::from_secs(15), || {
        server.handle.connection_count() == 1
    })
    .await;
    assert_eq!(server.handle.connections()[0].relay.relay_id, "r7");

    // Logs go to stdout (tracing). SIGTERM to the pid we started → clean exit, hub sees the disconnect.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("relay did not stop on SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}");
    let mut log = String::new();
    use std::io::Read as _;
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(log.contains("relay stopped"), "{log}");
    assert!(
        !log.contains("token-r7"),
        "the credential never reaches the log"
    );
    wait_until("disconnect seen", Duration::from_secs(5), || {
        server.handle.connection_count() == 0
    })
    .await;
}

/// Streams `DirectoryImport` of a CSV folder through the hub: the summary, or the relay's error.
async fn csv_import(
    server: &TlsServer,
    folder: &std::path::Path,
) -> Result<serde_json::Value, String> {
    use identitymesh_signalr::hub::StreamEvent;
    let cid = server.handle.connections()[0].connection_id.clone();
    let args = vec![
        serde_json::json!({"kind": "csv", "config": {"folder": folder, "object_type": "people", "anchor_column": "id"}, "password": null}),
        serde_json::json!("people"),
        serde_json::json!({"mode": "full"}),
    ];
    let mut stream = server
        .handle
        .invoke_stream(&cid, identitymesh_contract::hub::DIRECTORY_IMPORT, args, 4)
        .await
        .map_err(|e| e.to_string())?;
    loop {
        match stream.next().await.map_err(|e| e.to_string())? {
            Some(StreamEvent::Item(_)) => {}
            Some(StreamEvent::Completed(v)) => return Ok(v),
            None => return Err("the stream ended without a completion".into()),
        }
    }
}

/// Stops the relay we started, by its pid, and returns its log.
async fn stop(mut child: std::process::Child) -> String {
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let start = std::time::Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("relay did not stop on SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut log = String::new();
    use std::io::Read as _;
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    log
}

/// `enroll --csv-root` stores csv_roots; the running relay imports a CSV folder inside them
/// and refuses one outside (its own state folder, with the credential), naming the setting.
/// Enrolled without a root, the relay refuses CSV connectors altogether.
#[tokio::test]
async fn csv_connectors_read_inside_the_relays_csv_roots_only() {
    let pki = Pki::new();
    let backend = Arc::new(TestBackend::default());
    let server = TlsServer::start(0, &pki, backend.clone(), HubConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("cluster-ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let drop = dir.path().join("drop");
    std::fs::create_dir_all(drop.join("hr")).unwrap();
    std::fs::write(
        drop.join("hr/people.csv"),
        "id,mail\n1,a@example.org\n2,b@example.org\n",
    )
    .unwrap();
    let state = dir.path().join("state");
    let (url, resolve) = (server.url(), server.resolve());

    for (cfg_name, roots) in [
        ("with-roots.toml", vec![drop.clone()]),
        ("none.toml", vec![]),
    ] {
        let cfg = state.join(cfg_name);
        let mut args = vec![
            "--server".to_string(),
            url.clone(),
            "--token".into(),
            "token-r8".into(),
            "--ca-file".into(),
            ca.display().to_string(),
            "--config".into(),
            cfg.display().to_string(),
            "--resolve".into(),
            resolve.clone(),
        ];
        for r in &roots {
            args.extend(["--csv-root".to_string(), r.display().to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, out) = enroll(&args);
        assert!(ok, "{out}");
        let text = std::fs::read_to_string(&cfg).unwrap();
        assert_eq!(text.contains("csv_roots"), !roots.is_empty(), "{text}");
        // The state folder holds the credential: a CSV connector pointed at it must not read it.
        std::fs::write(state.join("people.csv"), "id,mail\n9,x@example.org\n").unwrap();

        let child = Command::new(BIN)
            .args(["run", "--config", cfg.to_str().unwrap()])
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_until("relay connected", Duration::from_secs(15), || {
            server.handle.connection_count() == 1
        })
        .await;
        let inside = csv_import(&server, &drop.join("hr")).await;
        let outside = csv_import(&server, &state).await;
        let log = stop(child).await;
        wait_until("disconnect seen", Duration::from_secs(5), || {
            server.handle.connection_count() == 0
        })
        .await;

        let outside = outside.unwrap_err();
        assert!(
            outside.contains("the relay setting csv_roots in relay.toml"),
            "{outside}"
        );
        assert!(
            !outside.contains("token-r8") && !outside.contains("x@example.org"),
            "{outside}"
        );
        if roots.is_empty() {
            let inside = inside.unwrap_err();
            assert!(
                inside.contains("CSV connectors are disabled on this relay")
                    && inside.contains("csv_roots"),
                "{inside}"
            );
            assert!(
                log.contains("CSV connectors are disabled on this relay"),
                "{log}"
            );
        } else {
            let summary = inside.unwrap_or_else(|e| panic!("{e}\nlog:\n{log}"));
            assert_eq!(summary["objects"], 2, "{summary}");
            let root = std::fs::canonicalize(&drop).unwrap();
            assert!(outside.contains(&root.display().to_string()), "{outside}");
            assert!(log.contains(&root.display().to_string()), "{log}");
        }
    }
}
