//! A real relay agent follows the active through the client Service: it enrols and connects
//! through the harness's Service proxy (resolving the Service's DNS name to it, trusting only the
//! cluster CA), and after a planned switchover and after a kill -9 of the active it is connected
//! to the new active by itself, with no help from the test.

use std::time::Instant;

use identitymesh_tests::operator_env::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_follows_the_active_through_the_service() {
    init_tracing();
    let mut env = Env::start(EnvOptions::default()).await;
    let st = env.wait_settled("the first settled state").await;
    let (a, s, e) = (st.active.unwrap(), st.standby.unwrap(), st.epoch);
    env.wait_service_active(e, WAIT).await;

    let relay = env.start_relay("e2e-relay").await;
    env.wait_relay_on(&relay, &a, Instant::now(), "first connection")
        .await;

    // Planned switchover: the demoted active closes with allowReconnect, the relay re-resolves
    // the Service name and lands on the new active.
    let t0 = Instant::now();
    env.request_switchover().await;
    env.wait_service_active(e + 1, WAIT).await;
    let took = env
        .wait_relay_on(&relay, &s, t0, "after the switchover")
        .await;
    println!(
        "relay on the new active {s} {:.2}s after the switchover request",
        took.as_secs_f64()
    );
    env.wait_settled("settled after the switchover").await;
    // The operator's checklist sees the relay on the new active (and no canary to run).
    let st = env
        .wait_status("RelaysReconnected after the switchover", WAIT, |st| {
            st.condition("RelaysReconnected").as_deref() == Some("True")
                && st.condition("CanarySync").as_deref() == Some("True")
        })
        .await;
    let reason = |kind: &str| {
        st.conditions
            .iter()
            .find(|c| c["type"] == kind)
            .map(|c| c["reason"].as_str().unwrap_or_default().to_string())
            .unwrap_or_default()
    };
    assert_eq!(reason("RelaysReconnected"), "AllConnected");
    assert_eq!(reason("CanarySync"), "NoCanaryConnector");

    // kill -9 of the new active: no Close frame this time; the relay's backoff finds the new
    // active once the operator has failed over.
    let t0 = Instant::now();
    env.cluster
        .kill_pod_process(&env.ns, &s)
        .expect("kill the active's process");
    env.wait_service_active(e + 2, WAIT).await;
    let took = env
        .wait_relay_on(&relay, &a, t0, "after the failover")
        .await;
    println!(
        "relay on the new active {a} {:.2}s after the kill",
        took.as_secs_f64()
    );
    let relay_log = std::fs::read_to_string(&relay.log).unwrap_or_default();
    assert!(
        !relay_log.contains(&relay.token),
        "the relay credential reached the relay's log"
    );
}
