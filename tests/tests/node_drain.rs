//! Acceptance: node maintenance as an administrator does it. The operator's PodDisruptionBudget
//! refuses an eviction of the active; `kubectl drain` of the active's node then completes by
//! itself: the cordon starts a planned switchover (reason NodeDrain), the old active, now the
//! standby, is evicted and recreated on a schedulable node, a real relay follows the active, and
//! a client polls through the Service throughout.

use std::time::{Duration, Instant};

use identitymesh_tests::operator_env::*;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::EvictParams;
use kube::Api;

/// The Admin API client's bearer token (the servers' bootstrap token).
const TOKEN: &str = "imb_node-drain-token";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kubectl_drain_of_the_active_node_is_a_switchover_and_completes() {
    let _serial = SERIAL.lock().await;
    init_tracing();
    let begun = Instant::now();
    let mut env = Env::start(EnvOptions {
        admin_token: Some(TOKEN.into()),
        ..EnvOptions::default()
    })
    .await;
    let st = env.wait_settled("the first settled state").await;
    println!(
        "settled {:.1}s after the start",
        begun.elapsed().as_secs_f64()
    );
    let (a, s, e) = (st.active.unwrap(), st.standby.unwrap(), st.epoch);
    env.wait_service_active(e, WAIT).await;
    let node = env.pod_node(&a).await.expect("the active is scheduled");
    let standby_node = env.pod_node(&s).await.expect("the standby is scheduled");

    // The budget covers exactly the active: its eviction is refused, as a drain would see it.
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(env.cluster.client(), &env.ns);
    let pdb = pdbs
        .get(CLUSTER)
        .await
        .expect("the operator's PodDisruptionBudget");
    let selector = pdb
        .spec
        .and_then(|s| s.selector)
        .and_then(|s| s.match_labels)
        .unwrap_or_default();
    assert_eq!(
        selector.get("identitymesh.io/instance"),
        Some(&a),
        "{selector:?}"
    );
    let started = Instant::now();
    loop {
        let healthy = pdbs
            .get(CLUSTER)
            .await
            .ok()
            .and_then(|p| p.status)
            .map(|s| s.current_healthy)
            .unwrap_or(0);
        if healthy == 1 {
            break;
        }
        if started.elapsed() > WAIT {
            env.fail("the disruption controller never counted the active as healthy");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let uid = env.pod_uid(&a).await;
    // Without kube's retry of 429 answers, which would retry the refusal for minutes.
    let once =
        identitymesh_tests::controlplane::client_with_retries(env.cluster.kubeconfig_path(), false)
            .await
            .expect("a client without retries");
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(once, &env.ns);
    match pods.evict(&a, &EvictParams::default()).await {
        Err(kube::Error::Api(r)) if r.code == 429 => {
            println!("eviction of the active refused: {}", r.message)
        }
        other => panic!("an eviction of the active must be refused with 429: {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(env.pod_uid(&a).await, uid, "the active still runs");
    assert!(
        env.pod(&a)
            .await
            .is_some_and(|p| p.metadata.deletion_timestamp.is_none()),
        "and is not being deleted"
    );

    let relay = env.start_relay("drain-relay").await;
    env.wait_relay_on(&relay, &a, Instant::now(), "before the drain")
        .await;
    let poller = env.poll_service(TOKEN).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let t0 = Instant::now();
    let out = env.drain_node(&node).await;
    let drained = t0.elapsed();
    println!(
        "kubectl drain {node} completed in {:.1}s:\n{}",
        drained.as_secs_f64(),
        out.trim()
    );

    // The role moved by a planned switchover, for the drain.
    let done = env
        .wait_status("settled after the drain", WAIT, |x| {
            x.active.as_deref() == Some(s.as_str()) && x.settled()
        })
        .await;
    assert_eq!(done.epoch, e + 1, "one cutover, one epoch");
    let last = done.last_transition.clone().expect("a recorded transition");
    assert_eq!(last["reason"], "NodeDrain", "{last}");
    assert_eq!(last["kind"], "Switchover", "{last}");
    assert_eq!(last["from"], a.as_str(), "{last}");
    assert_eq!(last["to"], s.as_str(), "{last}");
    env.wait_service_active(e + 1, WAIT).await;

    // The old active was evicted and recreated as the standby, on neither the drained node nor
    // the new active's.
    let new_node = env.pod_node(&a).await.expect("the old active is recreated");
    assert_ne!(new_node, node, "not on the drained node");
    assert_ne!(new_node, standby_node, "not beside the new active");
    assert_eq!(done.standby.as_deref(), Some(a.as_str()));
    let pods_on_node: Vec<String> = env
        .list_pods()
        .await
        .into_iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node.as_str()))
        .filter_map(|p| p.metadata.name)
        .collect();
    assert!(
        pods_on_node.is_empty(),
        "the drained node runs {pods_on_node:?}"
    );

    // The relay follows by itself.
    env.wait_relay_on(&relay, &s, t0, "after the drain").await;
    let pdb = pdbs.get(CLUSTER).await.expect("the budget");
    assert_eq!(
        pdb.spec
            .and_then(|s| s.selector)
            .and_then(|s| s.match_labels)
            .unwrap_or_default()
            .get("identitymesh.io/instance"),
        Some(&s),
        "the budget follows the active"
    );

    let failed = poller.failures_since(t0);
    let window = match (failed.first(), failed.last()) {
        (Some(f), Some(l)) => (l.at - f.at).as_secs_f64() + POLL.as_secs_f64(),
        _ => 0.0,
    };
    println!(
        "client through the Service during the drain: {} requests, {} failed (window {:.2}s){}",
        poller.since(t0).len(),
        failed.len(),
        window,
        failed
            .first()
            .and_then(|p| p.error.clone())
            .map(|e| format!("; first error: {e}"))
            .unwrap_or_default()
    );
    assert!(
        failed.is_empty(),
        "a drain fails no Admin API request (the demoted pod forwards what still reaches it): {failed:?}"
    );
    env.slices.assert_never_two("kubectl drain");
}
