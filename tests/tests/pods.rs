//! Acceptance: CRDs and pods against the real control plane; pods become real processes that
//! the Service proxy reaches; deletion stops them.

mod common;

use std::time::{Duration, Instant};

use common::*;
use identitymesh_tests::process::pid_alive;
use identitymesh_tests::Cluster;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::PostParams;
use kube::Api;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crd_pod_service_and_deletion() {
    init_tracing();
    let cluster = Cluster::start(options()).await.expect("start harness");
    println!(
        "harness started in {:.1}s",
        cluster.started_in().as_secs_f64()
    );
    let fx = fixtures();

    // CRD: registered, established, and its schema enforced by the real apiserver.
    let crd = fx.join("widget-crd.yaml");
    cluster
        .kubectl(&["apply", "-f", crd.to_str().unwrap()])
        .await
        .expect("apply CRD");
    cluster
        .kubectl(&[
            "wait",
            "--for=condition=Established",
            "crd/widgets.harness.identitymesh.test",
            "--timeout=30s",
        ])
        .await
        .expect("CRD established");
    let good = "apiVersion: harness.identitymesh.test/v1\nkind: Widget\nmetadata: {name: w1}\nspec: {size: 3}\n";
    cluster
        .kubectl_with_stdin(&["apply", "-f", "-"], Some(good))
        .await
        .expect("valid Widget accepted");
    let bad = "apiVersion: harness.identitymesh.test/v1\nkind: Widget\nmetadata: {name: w2}\nspec: {size: 99}\n";
    let err = cluster
        .kubectl_with_stdin(&["apply", "-f", "-"], Some(bad))
        .await
        .expect_err("schema must reject size 99");
    assert!(
        err.to_string().contains("spec.size"),
        "unexpected error: {err}"
    );

    // Pod + Service through kubectl.
    let web = fx.join("web-pod.yaml");
    cluster
        .kubectl(&["apply", "-f", web.to_str().unwrap()])
        .await
        .expect("apply pod and service");
    let pods: Api<Pod> = Api::namespaced(cluster.client(), "default");
    cluster
        .wait_until(Duration::from_secs(60), "pod web Ready", || async {
            pods.get_opt("web")
                .await
                .ok()
                .flatten()
                .is_some_and(|p| pod_ready(&p))
        })
        .await
        .expect("pod becomes Ready through its readiness probe");
    // Another writer flips Ready to False (as the node-lifecycle controller does when it sees a
    // heartbeat gap, possibly after the node's heartbeats resumed): the runtime's periodic
    // status resync puts the truth back, it does not stay NotReady for ever.
    let not_ready = serde_json::json!({"status": {"conditions": [
        {"type": "Ready", "status": "False", "reason": "NodeStatusUnknown"}]}});
    pods.patch_status(
        "web",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Strategic(&not_ready),
    )
    .await
    .expect("mark the pod NotReady");
    assert!(!pod_ready(&pods.get("web").await.unwrap()));
    cluster
        .wait_until(Duration::from_secs(30), "pod web Ready again", || async {
            pods.get_opt("web")
                .await
                .ok()
                .flatten()
                .is_some_and(|p| pod_ready(&p))
        })
        .await
        .expect("the runtime rewrites a status someone else overwrote");
    let pod = pods.get("web").await.unwrap();
    let node = pod.spec.as_ref().unwrap().node_name.clone().unwrap();
    assert!(
        node.starts_with("win-"),
        "scheduled on a windows node, got {node}"
    );
    let status = pod.status.clone().unwrap();
    assert_eq!(status.phase.as_deref(), Some("Running"));
    let pod_ip = status.pod_ip.clone().unwrap();
    assert_eq!(Some(pod_ip.parse().unwrap()), cluster.node_ip(&node));
    let pids = cluster.pod_pids("default", "web");
    assert_eq!(pids.len(), 1, "one process for one container");
    let pid = pids[0];
    assert!(pid_alive(pid));
    let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(
        cmdline.contains("im-test-http"),
        "runs the mapped binary: {cmdline:?}"
    );

    // The Service proxy reaches it (after the EndpointSlice controller publishes it).
    let addr = cluster
        .service_addr("default", "web", 80)
        .await
        .expect("service listener");
    let mut body = String::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if let Ok((200, b)) = http_get(addr, "/").await {
            body = b;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(body, "hello from web");
    let env =
        |name: &'static str| async move { http_get(addr, &format!("/env/{name}")).await.unwrap() };
    assert_eq!(env("GREETING").await, (200, "hello-from-configmap".into()));
    assert_eq!(env("TOKEN").await, (200, "s3cret-token".into()));
    assert_eq!(env("POD_NAME").await, (200, "web".into()));
    assert_eq!(env("POD_NAMESPACE").await, (200, "default".into()));
    // The Windows mount path was rewritten to the materialised secret volume.
    let (_, token_file) = env("TOKEN_FILE").await;
    assert!(
        token_file.starts_with('/') && token_file.ends_with("/token.txt"),
        "{token_file}"
    );
    assert_eq!(
        http_get(addr, &format!("/file?{token_file}"))
            .await
            .unwrap(),
        (200, "s3cret-token".into())
    );

    // The admission-added kube-api-access volume holds a real token, the CA and the namespace.
    let volumes = cluster.pod_dir("default", "web").unwrap().join("volumes");
    let api_access = std::fs::read_dir(&volumes)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("kube-api-access-")
        })
        .expect("kube-api-access volume");
    let token = std::fs::read_to_string(api_access.join("token")).unwrap();
    assert_eq!(token.split('.').count(), 3, "a JWT: {token}");
    let ca = std::fs::read_to_string(api_access.join("ca.crt")).unwrap();
    let our_ca = std::fs::read_to_string(cluster.run_dir().join("pki/ca.crt")).unwrap();
    assert_eq!(ca, our_ca);
    assert_eq!(
        std::fs::read_to_string(api_access.join("namespace")).unwrap(),
        "default"
    );

    // Secret rotation reaches the mounted file within a few seconds.
    cluster
        .kubectl(&[
            "patch",
            "secret",
            "web-secret",
            "-p",
            r#"{"stringData":{"token.txt":"rotated"}}"#,
        ])
        .await
        .expect("patch secret");
    cluster
        .wait_until(Duration::from_secs(15), "rotated secret file", || async {
            std::fs::read_to_string(&token_file).ok().as_deref() == Some("rotated")
        })
        .await
        .expect("secret volume re-materialised");

    // Killing the process: the agent restarts it and the API shows the restart.
    let killed = cluster.kill_pod_process("default", "web").expect("kill");
    assert_eq!(killed, vec![pid]);
    cluster
        .wait_until(
            Duration::from_secs(30),
            "restart visible in status",
            || async {
                pods.get("web").await.ok().is_some_and(|p| {
                    let cs = &p
                        .status
                        .as_ref()
                        .unwrap()
                        .container_statuses
                        .as_ref()
                        .unwrap()[0];
                    cs.restart_count == 1 && pod_ready(&p)
                })
            },
        )
        .await
        .expect("container restarted");
    let p = pods.get("web").await.unwrap();
    let cs = &p.status.unwrap().container_statuses.unwrap()[0];
    let last = cs.last_state.as_ref().unwrap().terminated.as_ref().unwrap();
    assert_eq!(last.exit_code, 128 + 9, "SIGKILL exit code recorded");
    let new_pid = cluster.pod_pids("default", "web")[0];
    assert_ne!(new_pid, pid);
    assert!(!pid_alive(pid));

    // Graceful deletion: SIGTERM (the server exits on it), then the object is finalized.
    let t = Instant::now();
    cluster
        .kubectl(&["delete", "pod", "web", "--wait=true", "--timeout=60s"])
        .await
        .expect("delete pod");
    println!(
        "graceful pod deletion took {:.1}s",
        t.elapsed().as_secs_f64()
    );
    assert!(!pid_alive(new_pid), "process gone after deletion");
    assert!(pods.get_opt("web").await.unwrap().is_none());
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "SIGTERM, not the 20 s grace, ended it"
    );

    // Force deletion kills at once.
    cluster
        .kubectl(&["apply", "-f", web.to_str().unwrap()])
        .await
        .expect("re-apply");
    cluster
        .wait_until(Duration::from_secs(60), "pod web running again", || async {
            !cluster.pod_pids("default", "web").is_empty()
        })
        .await
        .unwrap();
    let pid = cluster.pod_pids("default", "web")[0];
    cluster
        .kubectl(&["delete", "pod", "web", "--grace-period=0", "--force"])
        .await
        .expect("force delete");
    cluster
        .wait_until(
            Duration::from_secs(5),
            "force-deleted process gone",
            || async { !pid_alive(pid) },
        )
        .await
        .expect("force deletion kills the process");

    // HTTPS readiness probe (no certificate verification, as kubelet) against a server whose
    // certificate comes from a secret volume at a Windows path.
    let cert = identitymesh_test_support::pki::self_signed(&["web-tls"]).unwrap();
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "tls"},
        "stringData": {"tls.crt": cert.cert_pem, "tls.key": cert.key_pem}
    }))
    .unwrap();
    Api::<Secret>::namespaced(cluster.client(), "default")
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "secure"},
        "spec": {
            "containers": [{
                "name": "https", "image": "test/http",
                "args": ["--listen", "0.0.0.0:8443",
                         "--tls-cert", "C:\\identitymesh\\tls\\tls.crt",
                         "--tls-key", "C:\\identitymesh\\tls\\tls.key"],
                "readinessProbe": {"httpGet": {"path": "/readyz", "port": 8443, "scheme": "HTTPS"}, "periodSeconds": 1},
                "volumeMounts": [{"name": "tls", "mountPath": "C:\\identitymesh\\tls"}]
            }],
            "volumes": [{"name": "tls", "secret": {"secretName": "tls"}}]
        }
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    cluster
        .wait_until(Duration::from_secs(60), "pod secure Ready", || async {
            pods.get_opt("secure")
                .await
                .ok()
                .flatten()
                .is_some_and(|p| pod_ready(&p))
        })
        .await
        .expect("HTTPS readiness probe passes");
    let log = cluster
        .pod_log("default", "secure", "https")
        .unwrap_or_default();
    assert!(log.contains("tls: true"), "server runs with TLS: {log}");
}
