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
