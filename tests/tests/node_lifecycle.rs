//! Acceptance: a node whose heartbeats stop goes NotReady through the real node-lifecycle
//! controller, and its pods become not ready.

mod common;

use std::time::{Duration, Instant};

use common::*;
use identitymesh_tests::process::pid_alive;
use identitymesh_tests::Cluster;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::PostParams;
use kube::Api;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_heartbeat_marks_node_and_pods_not_ready() {
    init_tracing();
    let cluster = Cluster::start(options()).await.expect("start harness");
    let pods: Api<Pod> = Api::namespaced(cluster.client(), "default");
    let nodes: Api<Node> = Api::all(cluster.client());
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "pinned"},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": "win-1"},
            "containers": [{
                "name": "http", "image": "test/http",
                "args": ["--listen", "0.0.0.0:8081"],
                "readinessProbe": {"httpGet": {"path": "/readyz", "port": 8081}, "periodSeconds": 1}
            }]
        }
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    cluster
        .wait_until(Duration::from_secs(60), "pod pinned Ready", || async {
            pods.get_opt("pinned")
                .await
                .ok()
                .flatten()
                .is_some_and(|p| pod_ready(&p))
        })
        .await
        .expect("pod Ready");
    let pid = cluster.pod_pids("default", "pinned")[0];

    cluster.stop_node_heartbeat("win-1").unwrap();
    let stopped = Instant::now();
    cluster
        .wait_until(Duration::from_secs(60), "win-1 NotReady", || async {
            nodes
                .get("win-1")
                .await
                .ok()
                .and_then(|n| node_ready(&n))
                .is_some_and(|s| s != "True")
        })
        .await
        .expect("node-lifecycle controller marks the node NotReady");
    let not_ready_after = stopped.elapsed();
    println!(
        "node NotReady {:.1}s after its heartbeats stopped (node-monitor-grace-period {})",
        not_ready_after.as_secs_f64(),
        identitymesh_tests::controlplane::NODE_MONITOR_GRACE_PERIOD
    );
    cluster
        .wait_until(Duration::from_secs(30), "pod pinned not Ready", || async {
            pods.get("pinned")
                .await
                .ok()
                .is_some_and(|p| !pod_ready(&p))
        })
        .await
        .expect("the controller marks the node's pods not ready");
    println!(
        "pod not ready {:.1}s after heartbeats stopped",
        stopped.elapsed().as_secs_f64()
    );
    // The process itself kept running (the node is cut off, not dead).
    assert!(pid_alive(pid));
    let other = nodes.get("win-2").await.unwrap();
    assert_eq!(
        node_ready(&other).as_deref(),
        Some("True"),
        "win-2 unaffected"
    );

    cluster.resume_node_heartbeat("win-1").unwrap();
    cluster
        .wait_until(Duration::from_secs(30), "win-1 Ready again", || async {
            nodes
                .get("win-1")
                .await
                .ok()
                .and_then(|n| node_ready(&n))
                .as_deref()
                == Some("True")
        })
        .await
        .expect("node Ready after heartbeats resume");
    cluster
        .wait_until(Duration::from_secs(30), "pod Ready again", || async {
            pods.get("pinned").await.ok().is_some_and(|p| pod_ready(&p))
        })
        .await
        .expect("pod Ready again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_link_isolates_pod_but_process_keeps_running() {
    init_tracing();
    let cluster = Cluster::start(options()).await.expect("start harness");
    let pods: Api<Pod> = Api::namespaced(cluster.client(), "default");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "island"},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": "win-2"},
            "containers": [{"name": "http", "image": "test/http", "args": ["--listen", "0.0.0.0:8082"]}]
        }
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    cluster
        .wait_until(Duration::from_secs(60), "pod island Ready", || async {
            pods.get_opt("island")
                .await
                .ok()
                .flatten()
                .is_some_and(|p| pod_ready(&p))
        })
        .await
        .expect("pod Ready");
    let ip = cluster.node_ip("win-2").unwrap();
    let addr = std::net::SocketAddr::new(ip, 8082);
    let (code, _) = http_get(addr, "/healthz")
        .await
        .expect("reachable before the cut");
    assert_eq!(code, 200);
    let pid = cluster.pod_pids("default", "island")[0];

    cluster.cut_node_link("win-2").unwrap();
    assert!(
        http_get(addr, "/healthz").await.is_err(),
        "unreachable while cut"
    );
    assert!(pid_alive(pid), "process keeps running");
    cluster.restore_node_link("win-2").unwrap();
    cluster
        .wait_until(
            Duration::from_secs(10),
            "reachable after restore",
            || async { matches!(http_get(addr, "/healthz").await, Ok((200, _))) },
        )
        .await
        .expect("reachable again");
    assert_eq!(
        cluster.pod_pids("default", "island"),
        vec![pid],
        "same process throughout"
    );
}
