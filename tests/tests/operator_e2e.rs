//! The operator end to end on the real control plane: `identitymesh-operator run` as a local
//! process, the real `identitymesh-server` in the pods (two processes sharing one SQLite file),
//! kubectl for the CRD and the cluster resource, and the harness's Service proxy as the client's
//! path. Every scenario starts from a settled cluster (one active, one standby, on different
//! Windows nodes, the Service reaching the active) and watches the client Service's
//! EndpointSlices throughout: it must never have two ready endpoints.
//!
//! Needs root, `cargo xtask tools`, the sqlite3 CLI and `cargo build --workspace --bins`.

use std::time::{Duration, Instant};

use identitymesh_tests::operator_env::*;
use identitymesh_tests::process::pid_alive;

/// (a): both pods Ready on different Windows nodes, status says who is active, the Service
/// reaches the active over HTTPS signed by the cluster CA.
async fn settle(env: &mut Env) -> Status {
    let st = env.wait_settled("the first settled state").await;
    let (a, s) = (st.active.clone().unwrap(), st.standby.clone().unwrap());
    assert!(st.epoch >= 1, "an epoch was issued: {}", st.epoch);
    let (na, ns) = (
        env.pod_node(&a).await.expect("active scheduled"),
        env.pod_node(&s).await.expect("standby scheduled"),
    );
    assert_ne!(na, ns, "active and standby must be on different nodes");
    for n in [&na, &ns] {
        assert_eq!(
            env.node_labels(n)
                .await
                .get("kubernetes.io/os")
                .map(String::as_str),
            Some("windows"),
            "node {n} is a Windows node"
        );
    }
    assert_eq!(env.pids(&a).len(), 1, "the active runs as a process");
    assert_eq!(env.pids(&s).len(), 1, "the standby runs as a process");
    env.wait_service_active(st.epoch, WAIT).await;
    println!(
        "settled: active {a} on {na}, standby {s} on {ns}, epoch {}",
        st.epoch
    );
    st
}

fn transition_kind(st: &Status) -> String {
    st.last_transition
        .as_ref()
        .and_then(|t| t["kind"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// Waits until `to` is active with `epoch` (and the cluster settled again, when asked).
async fn wait_active(env: &Env, what: &str, to: &str, epoch: i64, settled: bool) -> Status {
    let to = to.to_string();
    env.wait_status(what, WAIT, move |s| {
        s.active.as_deref() == Some(to.as_str())
            && s.epoch == epoch
            && s.cutover.is_none()
            && (!settled || s.settled())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn switchover_process_kill_and_deletion() {
    let _serial = SERIAL.lock().await;
    init_tracing();
    let mut env = Env::start(EnvOptions::default()).await;
    let st = settle(&mut env).await;
    install_commit_log(&env.db);

    // (b) Planned switchover: roles swap, epoch + 1, the old active keeps running as standby.
    let (a, s, e) = (st.active.unwrap(), st.standby.unwrap(), st.epoch);
    let a_pids = env.pids(&a);
    let t0 = Instant::now();
    env.request_switchover().await;
    let st = wait_active(&env, "switchover to the standby", &s, e + 1, false).await;
    let reached = env.wait_service_active(e + 1, WAIT).await;
    println!(
        "switchover: {a} -> {s}, Service on the new active {:.2}s after the request",
        (reached - t0).as_secs_f64()
    );
    assert_eq!(transition_kind(&st), "Switchover");
    assert_eq!(st.last_transition.as_ref().unwrap()["outcome"], "Succeeded");
    let st = env.wait_settled("settled after the switchover").await;
    assert_eq!(st.standby.as_deref(), Some(a.as_str()));
    assert_eq!(
        env.pids(&a),
        a_pids,
        "the old active stays up as the new standby: same process, no restart"
    );
    assert!(
        !st.raw["metadata"]["annotations"]
            .as_object()
            .is_some_and(|m| m.contains_key(SWITCHOVER_ANNOTATION)),
        "the switchover request annotation is cleared"
    );
    assert_fenced_after(&env.db, e + 1, &a);

    // (c) kill -9 of the active's process: failover to the standby, epoch + 1, the killed pod
    // comes back (restarted or replaced) as the standby.
    let (a, s, e) = (s, a, e + 1);
    let killed = env
        .cluster
        .kill_pod_process(&env.ns, &a)
        .expect("kill the active's process");
    let t0 = Instant::now();
    let st = wait_active(&env, "failover after kill -9", &s, e + 1, false).await;
    let reached = env.wait_service_active(e + 1, WAIT).await;
    println!(
        "kill -9: {a} -> {s}, Service on the new active {:.2}s after the kill",
        (reached - t0).as_secs_f64()
    );
    assert_eq!(transition_kind(&st), "Failover");
    let st = env.wait_settled("settled after the failover").await;
    assert_eq!(st.standby.as_deref(), Some(a.as_str()));
    let now_pids = env.pids(&a);
    assert!(
        !now_pids.is_empty() && now_pids.iter().all(|p| !killed.contains(p)),
        "the killed pod runs a fresh process ({killed:?} -> {now_pids:?})"
    );
    for p in &killed {
        assert!(!pid_alive(*p), "killed process {p} is gone");
    }
    assert_fenced_after(&env.db, e + 1, &a);

    // (f) Deleting the standby by hand: recreated, roles and epoch untouched.
    let (active, standby, e) = (s, a, e + 1);
    let old_uid = env.pod_uid(&standby).await.expect("standby uid");
    env.kubectl(&[
        "delete",
        "pod",
        &standby,
        "-n",
        &env.ns.clone(),
        "--wait=false",
    ])
    .await;
    let started = Instant::now();
    loop {
        let uid = env.pod_uid(&standby).await;
        let st = env.status().await.unwrap_or_default();
        if uid.is_some() && uid.as_deref() != Some(old_uid.as_str()) && st.settled() {
            assert_eq!(
                st.active.as_deref(),
                Some(active.as_str()),
                "active untouched"
            );
            assert_eq!(st.epoch, e, "no cutover for a standby deletion");
            break;
        }
        if started.elapsed() > WAIT {
            env.fail("the hand-deleted standby was not recreated and Ready");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    env.wait_service_active(e, WAIT).await;

    // Deleting the cluster: every owned object and process goes.
    let pids: Vec<u32> = [&active, &standby]
        .iter()
        .flat_map(|p| env.pids(p))
        .collect();
    env.kubectl(&[
        "delete",
        "imc",
        CLUSTER,
        "-n",
        &env.ns.clone(),
        "--wait=false",
    ])
    .await;
    let started = Instant::now();
    loop {
        let gone = env.status().await.is_none();
        let mut left = Vec::new();
        for r in ["pods", "services", "configmaps", "secrets"] {
            left.extend(env.owned(r).await);
        }
        if gone && left.is_empty() && pids.iter().all(|p| !pid_alive(*p)) {
            break;
        }
        if started.elapsed() > WAIT {
            env.fail(&format!(
                "after deleting the cluster: resource gone {gone}, objects left {left:?}, processes alive {:?}",
                pids.iter().filter(|p| pid_alive(**p)).collect::<Vec<_>>()
            ));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The user's Secrets are not owned and stay.
    let secrets = env
        .kubectl(&["get", "secrets", "-n", &env.ns.clone(), "-o", "name"])
        .await;
    assert!(secrets.contains("secret/im-db") && secrets.contains("secret/im-licence"));
    assert!(
        env.slices.changes() >= 3,
        "the EndpointSlice watch saw the swings"
    );
    env.slices.assert_never_two("switchover, kill -9, deletion");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_heartbeat_loss_fails_over() {
    let _serial = SERIAL.lock().await;
    init_tracing();
    let mut env = Env::start(EnvOptions::default()).await;
    let st = settle(&mut env).await;
    install_commit_log(&env.db);
    let (a, s, e) = (st.active.unwrap(), st.standby.unwrap(), st.epoch);
    let lost = env.pod_node(&a).await.expect("active node");
    let a_pids = env.pids(&a);
    let a_uid = env.pod_uid(&a).await.expect("active uid");

    // (d) The active's node stops heartbeating (its process keeps running and keeps its
    // network): NotReady after the grace period → failover, and the lost pod is replaced on
    // another node.
    env.cluster
        .stop_node_heartbeat(&lost)
        .expect("stop heartbeat");
    let t0 = Instant::now();
    let st = wait_active(&env, "failover after node heartbeat loss", &s, e + 1, false).await;
    let reached = env.wait_service_active(e + 1, WAIT).await;
    println!(
        "heartbeat loss of {lost}: {a} -> {s}, Service on the new active {:.2}s after the last heartbeat (node-monitor-grace-period {})",
        (reached - t0).as_secs_f64(),
        identitymesh_tests::controlplane::NODE_MONITOR_GRACE_PERIOD
    );
    assert_eq!(transition_kind(&st), "Failover");
    let st = env.wait_settled("a fresh standby on another node").await;
    assert_eq!(st.active.as_deref(), Some(s.as_str()));
    let new_node = env.pod_node(&a).await.expect("replacement scheduled");
    assert_ne!(new_node, lost, "the replacement is not on the lost node");
    // The old process kept running on the lost node all along, and could still reach the
    // database: the epoch fenced it.
    assert!(
        a_pids.iter().all(|p| pid_alive(*p)),
        "the cut-off process keeps running while its node is silent"
    );
    let before = assert_fenced_after(&env.db, e + 1, &a);
    println!("old active committed {before} ticks before the promotion, none after");
    // The old process stopped acting as active: demoted by the operator's verification (it is
    // reachable) or by its own next fenced write, whichever came first.
    let started = Instant::now();
    loop {
        let log = env.pod_log_of(&a, &a_uid);
        if log.contains("demoted to standby") || log.contains("fenced") {
            break;
        }
        if started.elapsed() > WAIT {
            env.fail("the silent node's old active never left the active role");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Heartbeats resume: the node learns its pod is gone and stops the orphan process.
    env.cluster
        .resume_node_heartbeat(&lost)
        .expect("resume heartbeat");
    let started = Instant::now();
    while a_pids.iter().any(|p| pid_alive(*p)) {
        if started.elapsed() > WAIT {
            env.fail("the orphan process on the recovered node was not stopped");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let st = env.wait_settled("settled after the node came back").await;
    assert_eq!(st.epoch, e + 1, "the node's return causes no cutover");
    env.wait_service_active(e + 1, WAIT).await;
    assert_fenced_after(&env.db, e + 1, &a);
    env.slices.assert_never_two("node heartbeat loss");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cut_off_active_is_fenced() {
    let _serial = SERIAL.lock().await;
    init_tracing();
    let mut env = Env::start(EnvOptions::default()).await;
    let st = settle(&mut env).await;
    install_commit_log(&env.db);
    let (a, s, e) = (st.active.unwrap(), st.standby.unwrap(), st.epoch);
    let cut = env.pod_node(&a).await.expect("active node");
    let a_pids = env.pids(&a);
    let a_uid = env.pod_uid(&a).await.expect("active uid");
    // Let the active commit a few ticks under the instrumentation first.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // (e) The active's link is cut while its process keeps running (and still reaches the
    // database file): the operator promotes the standby; the new epoch fences the old active.
    env.cluster.cut_node_link(&cut).expect("cut the link");
    let t0 = Instant::now();
    let st = wait_active(&env, "failover after the link cut", &s, e + 1, false).await;
    let reached = env.wait_service_active(e + 1, WAIT).await;
    println!(
        "link cut on {cut}: {a} -> {s}, Service on the new active {:.2}s after the cut",
        (reached - t0).as_secs_f64()
    );
    assert_eq!(transition_kind(&st), "Failover");
    // Keep the old process running a while longer, cut off: it must not write.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = assert_fenced_after(&env.db, e + 1, &a);
    assert!(
        before > 0,
        "the old active was committing engine ticks before the promotion"
    );
    let log = env.pod_log_of(&a, &a_uid);
    let fenced_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("fenced") || l.contains("shutdown"))
        .collect();
    println!(
        "old active committed {before} ticks before the promotion, none after (pids {a_pids:?}); its log on fencing/shutdown: {fenced_lines:#?}"
    );

    env.cluster
        .restore_node_link(&cut)
        .expect("restore the link");
    let st = env.wait_settled("settled after the link came back").await;
    assert_eq!(st.active.as_deref(), Some(s.as_str()));
    assert_eq!(st.epoch, e + 1);
    env.wait_service_active(e + 1, WAIT).await;
    assert_fenced_after(&env.db, e + 1, &a);
    env.slices.assert_never_two("link cut");
    assert_eq!(env.slices.max_ready(), 1);
}

/// The CRD's schema and CEL rules on the real apiserver: every resource in the operator's
/// admission table (`identitymesh-operator admission-cases`) is rejected with its message, and
/// the valid ones are accepted. For the pod fields, the server pod and client Service the
/// operator builds from each spec are offered to the pod and Service APIs too: those of a
/// refused spec that the table marks as refused there are refused (the rule says at admission
/// what the apiserver would say pod by pod), and those of every valid spec are accepted (the
/// rules refuse nothing the pod API takes).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_resources_are_rejected_at_admission() {
    let _serial = SERIAL.lock().await;
    init_tracing();
    let cluster =
        identitymesh_tests::Cluster::start(identitymesh_tests::ClusterOptions::windows(1))
            .await
            .unwrap_or_else(|e| {
                panic!("start harness (run `cargo xtask tools` if tools are missing): {e}")
            });
    install_crd(&cluster).await;
    wait_crd_established(&cluster).await;
    let out = std::process::Command::new(workspace_bin("identitymesh-operator"))
        .arg("admission-cases")
        .output()
        .expect("identitymesh-operator admission-cases");
    assert!(out.status.success());
    let cases: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("case json"))
        .collect();
    // The pods' ServiceAccount must exist before a pod is accepted, dry run or not.
    let mut waited = 0;
    while cluster
        .kubectl(&["get", "serviceaccount", "default", "-n", "default"])
        .await
        .is_err()
    {
        waited += 1;
        assert!(waited < 60, "no default ServiceAccount after 30 s");
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    let mut rejected = 0;
    let (mut objects_refused, mut objects_accepted) = (0, 0);
    for c in &cases {
        let name = c["name"].as_str().unwrap_or_default();
        let objects = c["objects"].as_array().cloned().unwrap_or_default();
        let mut verdicts = Vec::new();
        for o in &objects {
            let r = cluster
                .kubectl_with_stdin(
                    &["create", "-n", "default", "--dry-run=server", "-f", "-"],
                    Some(&o.to_string()),
                )
                .await;
            verdicts.push((o["kind"].as_str().unwrap_or_default().to_string(), r));
        }
        if !objects.is_empty() {
            if c["expect"].is_null() {
                for (kind, r) in &verdicts {
                    if let Err(e) = r {
                        panic!("case {name}: the {kind} built from a valid spec was refused: {e}");
                    }
                }
                objects_accepted += 1;
            } else {
                assert!(
                    verdicts.iter().any(|(_, r)| r.is_err()),
                    "case {name}: the pod and Service built from it were accepted, but the case says the apiserver refuses them"
                );
                objects_refused += 1;
            }
        }
        let manifest = c["manifest"].to_string();
        let r = cluster
            .kubectl_with_stdin(
                &["apply", "-n", "default", "--dry-run=server", "-f", "-"],
                Some(&manifest),
            )
            .await;
        match c["expect"].as_str() {
            None => {
                r.unwrap_or_else(|e| panic!("case {name}: the valid resource was refused: {e}"));
            }
            Some(expect) => {
                let err = match r {
                    Ok(o) => {
                        panic!("case {name}: accepted, expected a rejection with {expect:?}: {o}")
                    }
                    Err(e) => e.to_string(),
                };
                assert!(
                    err.contains(expect),
                    "case {name}: rejected, but the message lacks {expect:?}: {err}"
                );
                rejected += 1;
            }
        }
    }
    assert!(rejected >= 10, "at least ten bad resources: {rejected}");
    assert!(
        objects_refused >= 20 && objects_accepted >= 2,
        "pod-field cases: {objects_refused} refused, {objects_accepted} valid"
    );
    println!(
        "admission: {rejected} bad resources rejected with their messages ({objects_refused} of them refused by the pod or Service API too); {objects_accepted} valid ones accepted, pods and Services included"
    );
}
