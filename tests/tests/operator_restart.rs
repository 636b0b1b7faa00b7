//! An operator killed in the middle of a planned switchover: the cutover intent (target and
//! epoch) is in status before any step acts on it, so the next operator resumes the same
//! cutover with the same epoch and reaches the same end state, with never two ready endpoints.
//!
//! Needs root, `cargo xtask tools`, the sqlite3 CLI and `cargo build --workspace --bins`.

use std::time::{Duration, Instant};

use identitymesh_tests::operator_env::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operator_killed_mid_switchover_resumes_with_the_same_epoch() {
    let _serial = SERIAL.lock().await;
    init_tracing();
    let mut env = Env::start(EnvOptions::default()).await;
    env.wait_settled("the first settled state").await;

    // The intent is visible for a short time only; try a few switchovers until the kill lands
    // while one is in progress.
    let mut caught = None;
    for attempt in 1..=5 {
        let before = env.wait_settled("settled before the switchover").await;
        env.request_switchover().await;
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = None;
        while Instant::now() < deadline {
            if let Some(s) = env.status().await {
                if let Some(c) = s.cutover.clone() {
                    seen = Some(c);
                    break;
                }
                if s.epoch > before.epoch {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        match seen {
            Some(cutover) => {
                env.restart_operator();
                caught = Some((before, cutover));
                println!("attempt {attempt}: operator killed during cutover");
                break;
            }
            None => println!("attempt {attempt}: the cutover finished before it was seen"),
        }
    }
    let (before, cutover) = caught.expect("no attempt caught a cutover in progress");
    let target = cutover["targetPod"]
        .as_str()
        .or_else(|| cutover["target"].as_str())
        .unwrap_or_else(|| panic!("cutover without a target: {cutover}"))
        .to_string();
    let intent_epoch = cutover["epoch"]
        .as_i64()
        .unwrap_or_else(|| panic!("cutover without an epoch: {cutover}"));
    assert_eq!(intent_epoch, before.epoch + 1, "{cutover}");
    assert_eq!(
        Some(target.as_str()),
        before.standby.as_deref(),
        "{cutover}"
    );

    // The restarted operator finishes the same cutover: the target active with that epoch.
    let done = env
        .wait_status("the resumed cutover to finish", WAIT, |s| {
            s.cutover.is_none() && s.active.as_deref() == Some(target.as_str()) && s.settled()
        })
        .await;
    assert_eq!(
        done.epoch, intent_epoch,
        "resumed with the intent's epoch, not a new one"
    );
    assert_eq!(
        done.standby, before.active,
        "the old active stays as the standby"
    );
    env.wait_service_active(intent_epoch, WAIT).await;
    env.slices.assert_never_two("across the operator restart");
}
