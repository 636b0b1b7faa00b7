//! Acceptance: a pod sees what it would on a real cluster. Its volumes are at their real Linux
//! paths (the service-account token at /var/run/secrets/kubernetes.io/serviceaccount), in a
//! mount namespace of its own; its hostname is its name; cluster DNS names of Services and of
//! headless Services' pods resolve inside it; Service traffic and pod-to-pod traffic across nodes
//! work from inside it; a node whose link is cut reaches nothing; a tmpfs-backed emptyDir
//! filled by the test fails the pod's writes with ENOSPC until it is freed.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use identitymesh_tests::{Cluster, ClusterOptions};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_resolve_and_reach_services_and_see_their_volumes_at_real_paths() {
    init_tracing();
    let opts = ClusterOptions {
        linux_nodes: 2,
        ..Default::default()
    }
    .image("test/http", env!("CARGO_BIN_EXE_im-test-http"))
    .tmpfs_volume("scratch", 1 << 20);
    let cluster = Cluster::start(opts).await.expect("start harness");
    let manifest = fixtures().join("pod-network.yaml");
    cluster
        .kubectl(&["apply", "-f", manifest.to_str().unwrap()])
        .await
        .expect("apply the pods and Services");
    let pods: Api<Pod> = Api::namespaced(cluster.client(), "netcheck");
    for name in ["web-0", "client"] {
        cluster
            .wait_until(Duration::from_secs(60), name, || async {
                pods.get_opt(name)
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|p| pod_ready(&p))
            })
            .await
            .unwrap_or_else(|e| panic!("pod {name} Ready: {e}"));
    }
    let client = SocketAddr::new(cluster.node_ip("linux-2").unwrap(), 8080);
    let ask = |path: String| async move {
        http_get(client, &path)
            .await
            .unwrap_or_else(|e| panic!("GET {path} from the client pod: {e}"))
    };

    assert_eq!(ask("/hostname".into()).await, (200, "client".into()));
    assert_eq!(
        ask("/env/KUBERNETES_SERVICE_HOST".into()).await,
        (200, "10.96.0.1".into()),
        "the kubernetes Service's ClusterIP, as on a real cluster"
    );

    // Volumes at their real paths, seen only inside the pod.
    let sa = "/var/run/secrets/kubernetes.io/serviceaccount";
    assert_eq!(
        ask(format!("/file?{sa}/namespace")).await,
        (200, "netcheck".into())
    );
    let (code, token) = ask(format!("/file?{sa}/token")).await;
    assert_eq!(code, 200, "{token}");
    assert_eq!(token.split('.').count(), 3, "a JWT: {token}");
    assert!(
        !std::path::Path::new(sa).join("token").exists(),
        "the pod's mounts do not leak onto the host"
    );
    assert_eq!(
        ask("/file?/etc/client-config/greeting".into()).await,
        (200, "hello-from-a-real-path".into())
    );

    // The scratch volume is a tmpfs inside the pod; filled from outside, the pod's writes fail
    // with ENOSPC; freed, they work again.
    let (_, mounts) = ask("/file?/proc/self/mountinfo".into()).await;
    assert!(
        mounts
            .lines()
            .any(|l| l.split(' ').nth(4) == Some("/scratch") && l.contains(" - tmpfs ")),
        "{mounts}"
    );
    assert_eq!(ask("/write?/scratch/a".into()).await.0, 200);
    let filled = cluster
        .fill_pod_volume("netcheck", "client", "scratch")
        .expect("fill the scratch volume");
    assert!(filled > 0 && filled <= 1 << 20, "{filled}");
    let (code, err) = ask("/write?/scratch/b".into()).await;
    assert_eq!(code, 507, "{err}");
    assert!(err.contains("No space left"), "{err}");
    cluster
        .free_pod_volume("netcheck", "client", "scratch")
        .expect("free the scratch volume");
    assert_eq!(ask("/write?/scratch/b".into()).await.0, 200);

    // Cluster names resolve inside the pod, and the traffic arrives: a Service's ClusterIP on
    // another node, by its full and short names, and a headless Service's pod directly.
    for name in [
        "web.netcheck.svc.cluster.local:80",
        "web.netcheck.svc:80",
        "web:80",
        "web-0.web-pods.netcheck.svc.cluster.local:8080",
    ] {
        let mut last = (0, String::new());
        for _ in 0..50 {
            last = ask(format!("/fetch?{name}/")).await;
            if last.0 == 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(last, (200, "hello from web-0".into()), "{name}");
    }
    // The kubernetes Service reaches the apiserver (which answers plain HTTP with a 400).
    let (code, body) = ask("/fetch?kubernetes.default.svc:443/".into()).await;
    assert_eq!(code, 502, "{body}");
    assert!(body.contains("400"), "the apiserver answered: {body}");

    // The Service's node loses its link: nothing reaches it; back when restored.
    cluster.cut_node_link("linux-1").expect("cut link");
    let (code, body) = ask("/fetch?web:80/".into()).await;
    assert_eq!(code, 502, "a cut node serves nothing: {body}");
    cluster.restore_node_link("linux-1").expect("restore link");
    let mut last = (0, String::new());
    for _ in 0..50 {
        last = ask("/fetch?web:80/".into()).await;
        if last.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        last,
        (200, "hello from web-0".into()),
        "after the link is back"
    );
}
