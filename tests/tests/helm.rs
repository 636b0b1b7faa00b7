//! Acceptance: `helm install` of a small chart works against the harness.

mod common;

use std::time::{Duration, Instant};

use common::*;
use identitymesh_tests::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_small_chart() {
    init_tracing();
    let cluster = Cluster::start(options()).await.expect("start harness");
    let version = cluster
        .helm(&["version", "--short"])
        .await
        .expect("helm version");
    println!("helm {}", version.trim());
    let chart = fixtures().join("charts/hello");
    let installed = cluster
        .helm(&[
            "install",
            "hello",
            chart.to_str().unwrap(),
            "--namespace",
            "charts",
            "--create-namespace",
            "--wait",
            "--timeout",
            "90s",
        ])
        .await;
    let out = match installed {
        Ok(out) => out,
        Err(e) => {
            // Say why: what the cluster shows about the release's objects.
            let state = cluster
                .kubectl(&[
                    "get",
                    "all,events,serviceaccounts",
                    "-n",
                    "charts",
                    "-o",
                    "wide",
                ])
                .await
                .unwrap_or_else(|e| e.to_string());
            panic!("helm install --wait: {e}\n{state}");
        }
    };
    assert!(out.contains("STATUS: deployed"), "{out}");
    let list = cluster
        .helm(&["list", "-n", "charts", "-o", "json"])
        .await
        .expect("helm list");
    let releases: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(releases[0]["name"], "hello");
    assert_eq!(releases[0]["status"], "deployed");

    // The chart's Deployment runs a real process reachable through its Service.
    let addr = cluster.service_addr("charts", "hello", 80).await.unwrap();
    let start = Instant::now();
    let mut got = None;
    while start.elapsed() < Duration::from_secs(30) {
        if let Ok((200, body)) = http_get(addr, "/env/GREETING").await {
            got = Some(body);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(got.as_deref(), Some("hello-from-helm"));

    cluster
        .helm(&["uninstall", "hello", "-n", "charts", "--wait"])
        .await
        .expect("helm uninstall");
}
