//! Acceptance: the operator as it is installed. `helm install` of charts/identitymesh-operator
//! with two replicas; the chart's Deployment runs them as pods on Linux nodes with in-cluster
//! credentials (the chart's ServiceAccount at the standard path, the kubernetes Service) and the
//! chart's RBAC only; no local operator process. One replica leads (Lease); the leader is killed
//! in the middle of a switchover and the other finishes that cutover with the same epoch; an
//! operator upgrade (`helm upgrade` to a new image tag) adopts the cluster without restarting
//! its server pods.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use identitymesh_tests::operator_env::*;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::Api;

/// The operator pods that run and are Ready: name → node.
async fn operator_pods(env: &Env) -> Vec<(String, String)> {
    let pods: Api<Pod> = Api::namespaced(env.cluster.client(), OPERATOR_NS);
    let lp = ListParams::default().labels(&format!("app.kubernetes.io/name={RELEASE}"));
    let mut out = Vec::new();
    for p in pods.list(&lp).await.map(|l| l.items).unwrap_or_default() {
        let ready = p
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        if ready && p.metadata.deletion_timestamp.is_none() {
            let node = p.spec.and_then(|s| s.node_name).unwrap_or_default();
            out.push((p.metadata.name.unwrap_or_default(), node));
        }
    }
    out.sort();
    out
}

async fn wait_operator_pods(env: &Env, n: usize, what: &str) -> Vec<(String, String)> {
    let started = Instant::now();
    loop {
        let pods = operator_pods(env).await;
        if pods.len() == n {
            return pods;
        }
        if started.elapsed() > WAIT {
            env.fail(&format!("{what}: {n} operator pods Ready, have {pods:?}"));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn leader(env: &Env) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(env.cluster.client(), OPERATOR_NS);
    leases
        .get_opt(RELEASE)
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
}

async fn server_pod_uids(env: &Env) -> Vec<String> {
    let mut uids = Vec::new();
    for p in [format!("{CLUSTER}-a"), format!("{CLUSTER}-b")] {
        uids.push(env.pod_uid(&p).await.expect("server pod exists"));
    }
    uids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn helm_installed_operator_pods_lead_fail_over_and_upgrade() {
    let _serial = SERIAL.lock().await;
    init_tracing();
    let mut env = Env::start(EnvOptions {
        helm: true,
        operator_replicas: 2,
        ..EnvOptions::default()
    })
    .await;
    assert!(env.operator.is_none(), "no local operator process");
    let list = env
        .cluster
        .helm(&["list", "-n", OPERATOR_NS, "-o", "json"])
        .await
        .expect("helm list");
    let releases: serde_json::Value = serde_json::from_str(&list).expect("helm list json");
    assert_eq!(releases[0]["name"], RELEASE);
    assert_eq!(releases[0]["status"], "deployed");

    let ops = wait_operator_pods(&env, 2, "after helm install").await;
    let nodes: BTreeSet<&str> = ops.iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(nodes.len(), 2, "one replica per node: {ops:?}");
    assert!(
        nodes.iter().all(|n| n.starts_with("linux-")),
        "the operator is a Linux workload: {ops:?}"
    );

    // The chart's operator, in the cluster, runs the cluster to a settled state.
    let st = env
        .wait_settled("settled under the in-cluster operator")
        .await;
    let (a, s, e) = (
        st.active.clone().unwrap(),
        st.standby.clone().unwrap(),
        st.epoch,
    );
    env.wait_service_active(e, WAIT).await;
    let first_leader = leader(&env).await.expect("a leader holds the Lease");
    assert!(
        ops.iter().any(|(p, _)| *p == first_leader),
        "the Lease names a running replica: {first_leader} of {ops:?}"
    );
    println!("settled: active {a}, standby {s}, epoch {e}; leader {first_leader}");

    // The leader dies in the middle of a switchover; the other replica finishes it.
    let mut caught = None;
    for attempt in 1..=5 {
        let before = env.wait_settled("settled before the switchover").await;
        let leader_now = leader(&env).await.expect("a leader");
        env.request_switchover().await;
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = None;
        while Instant::now() < deadline {
            if let Some(st) = env.status().await {
                if let Some(c) = st.cutover.clone() {
                    seen = Some(c);
                    break;
                }
                if st.epoch > before.epoch {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        match seen {
            Some(cutover) => {
                // As a lost node would: the pod is gone at once, no graceful stop.
                env.kubectl(&[
                    "delete",
                    "pod",
                    &leader_now,
                    "-n",
                    OPERATOR_NS,
                    "--grace-period=0",
                    "--force",
                ])
                .await;
                println!("attempt {attempt}: leader {leader_now} killed during {cutover}");
                caught = Some((before, cutover, leader_now));
                break;
            }
            None => {
                println!("attempt {attempt}: the cutover finished before it was seen");
            }
        }
    }
    let (before, cutover, killed) = caught.expect("no attempt caught a cutover in progress");
    let intent_epoch = cutover["epoch"].as_i64().expect("the intent's epoch");
    assert_eq!(intent_epoch, before.epoch + 1, "{cutover}");
    let target = cutover["target"]
        .as_str()
        .expect("the intent's target")
        .to_string();
    let done = env
        .wait_status("the other replica to finish the cutover", WAIT, |st| {
            st.cutover.is_none() && st.active.as_deref() == Some(target.as_str()) && st.settled()
        })
        .await;
    assert_eq!(done.epoch, intent_epoch, "finished with the intent's epoch");
    let new_leader = leader(&env).await.expect("a leader after the kill");
    assert_ne!(new_leader, killed, "the Lease moved off the killed replica");
    env.wait_service_active(intent_epoch, WAIT).await;
    println!(
        "leader {killed} killed mid-cutover; {new_leader} finished it at epoch {intent_epoch}"
    );

    // An operator upgrade (a new build: a new image tag, so the Deployment rolls) adopts the
    // cluster without touching its server pods.
    let ops = wait_operator_pods(&env, 2, "after the leader's replacement").await;
    let uids = server_pod_uids(&env).await;
    let chart = env!("CARGO_MANIFEST_DIR").to_string() + "/../charts/identitymesh-operator";
    env.cluster
        .helm(&[
            "upgrade",
            RELEASE,
            &chart,
            "--namespace",
            OPERATOR_NS,
            "--reuse-values",
            "--set",
            "image.tag=0.1.1-next",
        ])
        .await
        .expect("helm upgrade");
    let started = Instant::now();
    let upgraded = loop {
        let now = wait_operator_pods(&env, 2, "after helm upgrade").await;
        let fresh = now.iter().all(|p| !ops.contains(p));
        if fresh {
            break now;
        }
        if started.elapsed() > WAIT {
            env.fail(&format!("the upgrade did not replace {ops:?}: {now:?}"));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let deploy = env
        .kubectl(&[
            "get",
            "deployment",
            RELEASE,
            "-n",
            OPERATOR_NS,
            "-o",
            "json",
        ])
        .await;
    let deploy: serde_json::Value = serde_json::from_str(&deploy).expect("deployment json");
    assert!(
        deploy["spec"]["template"]["spec"]["containers"][0]["image"]
            .as_str()
            .is_some_and(|i| i.ends_with(":0.1.1-next")),
        "{}",
        deploy["spec"]["template"]["spec"]["containers"][0]["image"]
    );
    // The new replicas lead and reconcile: a switchover under them works too.
    let st = env
        .wait_settled("settled under the upgraded operator")
        .await;
    let started = Instant::now();
    while !leader(&env)
        .await
        .is_some_and(|l| upgraded.iter().any(|(p, _)| *p == l))
    {
        if started.elapsed() > WAIT {
            env.fail("no upgraded replica took the Lease");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    env.request_switchover().await;
    let after = env
        .wait_status("a switchover under the upgraded operator", WAIT, |s| {
            s.epoch == st.epoch + 1 && s.cutover.is_none() && s.settled()
        })
        .await;
    assert_eq!(
        server_pod_uids(&env).await,
        uids,
        "the operator upgrade restarted no server pod"
    );
    env.wait_service_active(after.epoch, WAIT).await;

    // Deletion under the chart's RBAC: the finalizer runs and the owned objects go.
    env.kubectl(&[
        "delete",
        "imc",
        CLUSTER,
        "-n",
        &env.ns.clone(),
        "--timeout=90s",
    ])
    .await;
    for r in ["pods", "services", "configmaps", "secrets"] {
        let started = Instant::now();
        while !env.owned(r).await.is_empty() {
            if started.elapsed() > WAIT {
                env.fail(&format!("{r} of the deleted cluster remain"));
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    let log = env.operator_log();
    let denied: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("forbidden") || l.contains("Forbidden"))
        .collect();
    assert!(
        denied.is_empty(),
        "the chart's RBAC refused operator calls: {denied:?}"
    );
    env.slices
        .assert_never_two("helm install, leader kill, upgrade");
}
