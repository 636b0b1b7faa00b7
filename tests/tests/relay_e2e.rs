//! A real relay agent follows the active through the client Service: it enrols and connects
//! through the harness's Service proxy (resolving the Service's DNS name to it, trusting only the
//! cluster CA), and after a planned switchover and after a kill -9 of the active it is connected
//! to the new active by itself, with no help from the test.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use identitymesh_tests::operator_env::*;
use sha2::{Digest, Sha256};

/// The relay process; killed by pid when the test ends.
struct Relay(Child);

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn connected_instance(db: &Path) -> String {
    sqlite(
        db,
        "SELECT COALESCE(connected_instance, '') FROM relays WHERE id = 'e2e-relay'",
        true,
    )
    .unwrap_or_default()
    .trim()
    .to_string()
}

async fn wait_connected_to(env: &Env, pod: &str, since: Instant, what: &str) -> Duration {
    let deadline = Instant::now() + WAIT;
    loop {
        if connected_instance(&env.db) == pod {
            return since.elapsed();
        }
        if Instant::now() > deadline {
            env.fail(&format!(
                "{what}: the relay never connected to {pod} (last: {:?})",
                connected_instance(&env.db)
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_follows_the_active_through_the_service() {
    init_tracing();
    let mut env = Env::start(EnvOptions::default()).await;
    let st = env.wait_settled("the first settled state").await;
    let (a, s, e) = (st.active.unwrap(), st.standby.unwrap(), st.epoch);
    env.wait_service_active(e, WAIT).await;

    // A relay credential, seeded the way POST /api/relays stores it (only its hash).
    let token = format!("imr_{}", hex::encode([7u8; 32]));
    let hash = hex::encode(Sha256::digest(token.as_bytes()));
    sqlite(
        &env.db,
        &format!(
            "INSERT INTO relays (id, name, token_hash, created_at) VALUES ('e2e-relay', 'e2e-relay', '{hash}', 0)"
        ),
        false,
    )
    .expect("seed the relay credential");

    let ca = env.dir.join("cluster-ca.pem");
    std::fs::write(&ca, env.ca_pem().await).unwrap();
    let proxy = env.proxy_addr().await;
    let host = env.service_dns();
    let server = format!("https://{host}:{}", proxy.port());
    let resolve = format!("{host}:{}:{}", proxy.port(), proxy.ip());
    let config = env.dir.join("relay.toml");
    let bin = workspace_bin("identitymesh-relay");
    let out = Command::new(&bin)
        .args(["enroll", "--server", &server, "--ca-file"])
        .arg(&ca)
        .arg("--config")
        .arg(&config)
        .args(["--resolve", &resolve])
        .env("IDENTITYMESH_RELAY_TOKEN", &token)
        .output()
        .expect("run identitymesh-relay enroll");
    assert!(
        out.status.success(),
        "enroll failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = std::fs::File::create(env.dir.join("relay.log")).unwrap();
    let _relay = Relay(
        Command::new(&bin)
            .arg("run")
            .arg("--config")
            .arg(&config)
            .args(["--resolve", &resolve])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start identitymesh-relay run"),
    );
    wait_connected_to(&env, &a, Instant::now(), "first connection").await;

    // Planned switchover: the demoted active closes with allowReconnect, the relay re-resolves
    // the Service name and lands on the new active.
    let t0 = Instant::now();
    env.request_switchover().await;
    env.wait_service_active(e + 1, WAIT).await;
    let took = wait_connected_to(&env, &s, t0, "after the switchover").await;
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
    let took = wait_connected_to(&env, &a, t0, "after the failover").await;
    println!(
        "relay on the new active {a} {:.2}s after the kill",
        took.as_secs_f64()
    );
    let relay_log = std::fs::read_to_string(env.dir.join("relay.log")).unwrap_or_default();
    assert!(
        !relay_log.contains(&token),
        "the relay credential reached the relay's log"
    );
}
