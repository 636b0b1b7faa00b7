//! Acceptance (issue 14): a planned switchover fails no client request. A client makes Admin
//! API writes and reads through the client Service every 50 ms across three planned
//! switchovers, with the Service proxy applying endpoint changes a second late (kube-proxy's
//! lag): what still reaches the demoted pod is forwarded to the new active (held while nobody
//! holds the fence), so no request fails and every acknowledged write is applied exactly once.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use identitymesh_tests::operator_env::*;
use serde_json::json;

const TOKEN: &str = "imb_switchover-no-failed-request-token";
const PROXY_DELAY: Duration = Duration::from_secs(1);
const SWITCHOVERS: usize = 3;
const EVERY: Duration = Duration::from_millis(50);
/// Longer than the servers' hold bound: a held request is a slow answer, not a failure.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// One client request and its outcome.
#[derive(Debug, Clone)]
struct Call {
    what: &'static str,
    at: Instant,
    took: Duration,
    /// None: answered as expected.
    error: Option<String>,
}

#[derive(Default)]
struct History {
    calls: Vec<Call>,
    /// Acknowledged connector creates: name -> id.
    created: BTreeMap<String, String>,
    /// Acknowledged run starts: run id -> connector id.
    runs: BTreeMap<String, String>,
}

/// The client: a connector create, every fourth one a run start on it, and a read of it back,
/// every [`EVERY`], until `stop`.
async fn client(api: AdminClient, folder: String, stop: Arc<AtomicBool>, h: Arc<Mutex<History>>) {
    let mut every = tokio::time::interval(EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let record = |h: &Arc<Mutex<History>>, what, at: Instant, error| {
        h.lock().unwrap().calls.push(Call {
            what,
            at,
            took: at.elapsed(),
            error,
        });
    };
    for i in 0.. {
        every.tick().await;
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let name = format!("w-{i}");
        let body = json!({"name": name, "kind": "csv",
            "config": {"folder": folder, "object_type": "person", "anchor_column": "id"}});
        let at = Instant::now();
        let id = match api.call("POST", "/api/connectors", Some(&body)).await {
            Ok((201, v)) => {
                let id = v["id"].as_str().unwrap_or_default().to_string();
                record(&h, "create", at, None);
                h.lock().unwrap().created.insert(name.clone(), id.clone());
                id
            }
            Ok((code, v)) => {
                record(&h, "create", at, Some(format!("{code}: {v}")));
                continue;
            }
            Err(e) => {
                record(&h, "create", at, Some(e));
                continue;
            }
        };
        if i % 4 == 0 {
            // Engine work: only the active starts runs (a standby alone answers 409).
            let at = Instant::now();
            let path = format!("/api/connectors/{id}/runs");
            match api
                .call("POST", &path, Some(&json!({"mode": "full"})))
                .await
            {
                Ok((202, v)) => {
                    record(&h, "run", at, None);
                    let run = v["id"].as_str().unwrap_or_default().to_string();
                    h.lock().unwrap().runs.insert(run, id.clone());
                }
                Ok((code, v)) => record(&h, "run", at, Some(format!("{code}: {v}"))),
                Err(e) => record(&h, "run", at, Some(e)),
            }
        }
        let at = Instant::now();
        match api
            .call("GET", &format!("/api/connectors/{id}"), None)
            .await
        {
            Ok((200, v)) if v["name"] == name.as_str() => record(&h, "read", at, None),
            Ok((code, v)) => record(&h, "read", at, Some(format!("{code}: {v}"))),
            Err(e) => record(&h, "read", at, Some(e)),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn planned_switchovers_fail_no_client_request() {
    let _serial = SERIAL.lock().await;
    init_tracing();
    let dir = std::env::temp_dir().join(format!("im-switchover-no-fail-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("test dir");
    let token_file = dir.join("admin.token");
    std::fs::write(&token_file, TOKEN).expect("write the bootstrap token");
    let drop = dir.join("drop");
    std::fs::create_dir_all(&drop).expect("drop folder");
    std::fs::write(drop.join("people.csv"), "id,name\n1,Ada\n2,Grace\n").expect("csv");
    let mut env = Env::start(EnvOptions {
        proxy_delay: PROXY_DELAY,
        server_env: vec![
            (
                "IM_AUTH__BOOTSTRAP_TOKEN_FILE".into(),
                token_file.display().to_string(),
            ),
            (
                "IM_CONNECTORS__CSV_ROOTS".into(),
                drop.display().to_string(),
            ),
        ],
        ..EnvOptions::default()
    })
    .await;
    let st = env.wait_settled("the first settled state").await;
    env.wait_service_active(st.epoch, WAIT).await;
    let api = env.admin_client(TOKEN, REQUEST_TIMEOUT).await;

    let history: Arc<Mutex<History>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let task = tokio::spawn(client(
        api.clone(),
        drop.display().to_string(),
        stop.clone(),
        history.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;

    let t0 = Instant::now();
    let mut epoch = st.epoch;
    for round in 1..=SWITCHOVERS {
        let before = env.wait_settled("settled before the switchover").await;
        let from = before.active.clone().expect("an active");
        let started = Instant::now();
        env.request_switchover().await;
        let after = env
            .wait_status("the switchover done", WAIT, |x| {
                x.epoch == epoch + 1 && x.settled()
            })
            .await;
        let settled = started.elapsed();
        epoch += 1;
        env.wait_service_active(epoch, WAIT).await;
        let swung = started.elapsed();
        println!(
            "switchover {round}: {from} -> {}, epoch {epoch}, settled in {:.2}s, the Service reached the new active after {:.2}s (proxy delay {PROXY_DELAY:?})",
            after.active.as_deref().unwrap_or("?"),
            settled.as_secs_f64(),
            swung.as_secs_f64()
        );
        // Traffic at the steady state after the swing reached the proxy, before the next one.
        tokio::time::sleep(PROXY_DELAY + Duration::from_secs(1)).await;
    }
    stop.store(true, Ordering::SeqCst);
    task.await.expect("the client task");

    // The client has stopped: take its history out of the lock.
    let h = std::mem::take(&mut *history.lock().unwrap());
    let during: Vec<&Call> = h.calls.iter().filter(|c| c.at >= t0).collect();
    let failed: Vec<&Call> = h.calls.iter().filter(|c| c.error.is_some()).collect();
    let slowest = h.calls.iter().map(|c| c.took).max().unwrap_or_default();
    let count = |what| h.calls.iter().filter(|c| c.what == what).count();

    // Read every acknowledged write back, from the active, through the Service.
    let listed = match api.call("GET", "/api/connectors", None).await {
        Ok((200, v)) => v,
        other => panic!("GET /api/connectors: {other:?}"),
    };
    let listed = listed
        .as_array()
        .cloned()
        .or_else(|| listed["items"].as_array().cloned())
        .expect("a connector list");
    let mut by_name: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for c in &listed {
        if let (Some(n), Some(id)) = (c["name"].as_str(), c["id"].as_str()) {
            if n.starts_with("w-") {
                by_name
                    .entry(n.to_string())
                    .or_default()
                    .push(id.to_string());
            }
        }
    }
    let forwarded: usize = env
        .list_pods()
        .await
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .map(|pod| {
            env.pod_log(&pod)
                .matches("forwarded a request to the active instance")
                .count()
        })
        .sum();
    println!(
        "client through the Service across {SWITCHOVERS} planned switchovers (proxy delay {PROXY_DELAY:?}): \
         {} requests ({} during the switchovers): {} creates, {} run starts, {} reads; {} failed; \
         {} forwarded by a pod that was not active; slowest answer {:.2}s; \
         {} creates and {} run starts acknowledged",
        h.calls.len(),
        during.len(),
        count("create"),
        count("run"),
        count("read"),
        failed.len(),
        forwarded,
        slowest.as_secs_f64(),
        h.created.len(),
        h.runs.len(),
    );
    assert!(
        failed.is_empty(),
        "{} failed requests, the first: {:?}",
        failed.len(),
        failed.first()
    );
    for (name, id) in &h.created {
        assert_eq!(
            by_name.get(name),
            Some(&vec![id.clone()]),
            "connector {name} applied exactly once"
        );
    }
    // No create without an acknowledgement left a connector behind.
    assert_eq!(
        by_name.len(),
        h.created.len(),
        "only acknowledged creates exist"
    );
    let mut runs_found = 0;
    for (run, connector) in &h.runs {
        let path = format!("/api/runs?connector={connector}");
        let (code, v) = api
            .call("GET", &path, None)
            .await
            .expect("runs of a connector");
        assert_eq!(code, 200, "{v}");
        let rows = v.as_array().cloned().unwrap_or_default();
        assert_eq!(rows.len(), 1, "one run of {connector}: {rows:?}");
        assert_eq!(rows[0]["id"], run.as_str());
        runs_found += 1;
    }
    println!(
        "read back: {} connectors and {runs_found} runs, each exactly once, and no other",
        by_name.len()
    );
    assert!(
        forwarded > 0,
        "the demoted pods forwarded nothing: the test saw no lagging proxy"
    );
    env.slices.assert_never_two("the switchovers");
    let _ = std::fs::remove_dir_all(&dir);
}
