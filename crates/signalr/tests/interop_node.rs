//! Interop: the official `@microsoft/signalr` client (Node.js) against our hub: negotiate,
//! handshake, invoke + completion, an error completion, a server→client invocation with a
//! client result, pings, and automatic reconnect after the server is killed and restarted.
//!
//! Needs `npm ci` in crates/signalr/interop (done by `cargo xtask test`). Missing modules fail
//! the test on purpose: interop that silently does not run is not tested.

mod common;

use common::{TestBackend, TestServer};
use identitymesh_signalr::hub::HubConfig;
use serde_json::json;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt as _, BufReader};

fn interop_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("interop")
}

struct KillOnDrop(tokio::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // By pid, only the process this test started.
        let _ = self.0.start_kill();
    }
}

#[tokio::test]
async fn official_signalr_client_interop() {
    let dir = interop_dir();
    assert!(
        dir.join("node_modules/@microsoft/signalr/package.json").exists(),
        "node_modules missing in {}: run `cargo xtask test` (it runs `npm ci` there), or `npm ci` in that folder",
        dir.display()
    );
    let node_ok = std::process::Command::new("node")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        node_ok,
        "node (Node.js 18+) is required for the SignalR interop test"
    );

    let backend = Arc::new(TestBackend::default());
    let config = HubConfig {
        keep_alive_interval: Duration::from_millis(300),
        ..HubConfig::default()
    };
    let mut server = TestServer::start(0, backend.clone(), config.clone());
    let port = server.addr.port();

    let mut child = KillOnDrop(
        tokio::process::Command::new("node")
            .arg("client.mjs")
            .arg(server.url())
            .arg("token-node1")
            .current_dir(&dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start node"),
    );
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    let mut transcript = Vec::new();
    let mut next_line = async |what: &str| -> String {
        loop {
            let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}; got {transcript:?}"))
                .expect("read node output")
                .unwrap_or_else(|| panic!("node exited before {what}; got {transcript:?}"));
            transcript.push(line.clone());
            assert!(
                !line.starts_with("FAIL"),
                "node client: {line}; {transcript:?}"
            );
            if line.starts_with(what) {
                return line;
            }
        }
    };

    let line = next_line("CONNECTED").await;
    let connection_id = line["CONNECTED ".len()..].trim().to_owned();
    let listed_by = tokio::time::Instant::now() + Duration::from_secs(5);
    while server.handle.connection_count() != 1 && tokio::time::Instant::now() < listed_by {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let listed = server.handle.connections();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].connection_id, connection_id);
    assert_eq!(listed[0].relay.relay_id, "node1");
    assert!(
        listed[0]
            .user_agent
            .as_deref()
            .unwrap_or("")
            .contains("SignalR"),
        "{:?}",
        listed[0].user_agent
    );

    // Server→client invocation answered by the client's Echo handler (client results).
    let echoed = tokio::time::timeout(
        Duration::from_secs(10),
        server
            .handle
            .invoke(&connection_id, "Echo", vec![json!({"from": "server"})]),
    )
    .await
    .expect("Echo timed out")
    .expect("Echo failed");
    assert_eq!(echoed, json!({"from": "server"}));

    next_line("INVOKE_OK").await;
    next_line("INVOKE_ERROR_OK").await;
    next_line("PINGS").await;

    // Crash the server and bring it back on the same port.
    server.kill();
    next_line("RECONNECTING").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let server = TestServer::start(port, backend.clone(), config);
    let line = next_line("RECONNECTED").await;
    let reconnected_id = line["RECONNECTED ".len()..].trim().to_owned();
    assert_ne!(
        reconnected_id, connection_id,
        "a reconnect negotiates a new id"
    );
    // The client sees the handshake answer a moment before the hub lists the connection. It
    // stays open until Finish below, so the hub must list it (and only it) by then.
    let listed_by = tokio::time::Instant::now() + Duration::from_secs(5);
    while server.handle.connection_count() != 1 && tokio::time::Instant::now() < listed_by {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let listed = server.handle.connections();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].connection_id, reconnected_id);
    let echoed = tokio::time::timeout(
        Duration::from_secs(10),
        server
            .handle
            .invoke(&reconnected_id, "Echo", vec![json!({"after": "reconnect"})]),
    )
    .await
    .expect("Echo after reconnect timed out")
    .expect("Echo after reconnect failed");
    assert_eq!(echoed, json!({"after": "reconnect"}));
    server
        .handle
        .send(&reconnected_id, "Finish", vec![])
        .await
        .expect("send Finish");
    next_line("INVOKE_AFTER_RECONNECT_OK").await;
    next_line("DONE").await;
    let status = tokio::time::timeout(Duration::from_secs(10), child.0.wait())
        .await
        .expect("node did not exit")
        .unwrap();
    assert!(status.success(), "node exited with {status}");
}
