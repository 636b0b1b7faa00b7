//! Cutover bench: how many requests through the client Service fail, and for how long, for a
//! planned switchover, a `kubectl drain` of the active's node, a kill -9 of the active's process
//! and the active node's heartbeat loss, on the real control
//! plane with the real server and operator (see tests/operator_e2e.rs for the setup).
//!
//! An Admin API client polls `GET /api/instances` through the harness's Service proxy every
//! 50 ms; a request fails when it does not get 200 (connection refused or reset, TLS or HTTP
//! error, a 20 s timeout, or an error answer); a request the demoted pod forwards to the new
//! active is answered, not failed. The outage of one cutover is from the first failing request
//! after the fault to the first answer showing the new active's epoch; a cutover without a
//! failing request counts as 0.
//!
//! `IM_BENCH_REPS` (default 20) repetitions per kind; `IM_BENCH_KINDS` (comma list of
//! switchover,drain,kill,heartbeat) to run fewer kinds. Needs what the e2e tests need. The binaries
//! come from the bench's own profile dir (`cargo build --release --workspace --bins`) or from
//! `IDENTITYMESH_BIN_DIR`, e.g. `IDENTITYMESH_BIN_DIR=$CARGO_TARGET_DIR/debug`.

use std::time::{Duration, Instant};

use identitymesh_tests::operator_env::*;

/// The Admin API client's bearer token (the servers' bootstrap token).
const TOKEN: &str = "imb_cutover-bench-token";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Switchover,
    Drain,
    Kill,
    Heartbeat,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Switchover => "planned switchover",
            Kind::Drain => "kubectl drain",
            Kind::Kill => "process kill -9",
            Kind::Heartbeat => "node heartbeat loss",
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    // Nearest rank.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// One cutover of `kind`: (failing-request window s, fault → new active reachable s, failed
/// requests).
async fn one(env: &mut Env, poller: &Poller, kind: Kind) -> (f64, f64, usize) {
    let st = env.wait_settled("settled before the fault").await;
    env.wait_service_active(st.epoch, WAIT).await;
    let (a, s, e) = (st.active.unwrap(), st.standby.unwrap(), st.epoch);
    // A little steady traffic before the fault.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let node = env.pod_node(&a).await.expect("active node");
    let fault = Instant::now();
    match kind {
        Kind::Switchover => {
            env.request_switchover().await;
        }
        Kind::Drain => {
            // Completes once the old active, now the standby, is evicted.
            env.drain_node(&node).await;
        }
        Kind::Kill => {
            env.cluster
                .kill_pod_process(&env.ns, &a)
                .expect("kill the active");
        }
        Kind::Heartbeat => {
            env.cluster
                .stop_node_heartbeat(&node)
                .expect("stop heartbeat");
        }
    }
    let s2 = s.clone();
    env.wait_status("the cutover", WAIT, move |x| {
        x.active.as_deref() == Some(s2.as_str()) && x.epoch == e + 1
    })
    .await;
    let reached = env.wait_service_active(e + 1, WAIT).await;
    let recovered_after = (reached - fault).as_secs_f64();
    if kind == Kind::Heartbeat {
        // Bring the node back so the next round has three nodes again.
        env.wait_settled("a fresh standby").await;
        env.cluster
            .resume_node_heartbeat(&node)
            .expect("resume heartbeat");
    }
    if kind == Kind::Drain {
        env.wait_settled("a fresh standby after the drain").await;
        env.cluster
            .kubectl(&["uncordon", &node])
            .await
            .expect("uncordon the drained node");
    }
    // Let the poller see the recovery.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let outage = poller
        .outage(fault, e + 1)
        .map(|d| d.as_secs_f64())
        .unwrap_or(f64::NAN);
    let failed = poller.failures_since(fault);
    if let Some(first) = failed.first() {
        println!(
            "    first failed request {:.3}s after the fault: {}",
            (first.at - fault).as_secs_f64(),
            first.error.as_deref().unwrap_or("?")
        );
    }
    (outage, recovered_after, failed.len())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    // `cargo test --all-targets` runs bench binaries too (without --bench): minutes of
    // cutovers do not belong in the test run.
    if !std::env::args().any(|a| a == "--bench") {
        println!("cutover bench: run with `cargo bench -p identitymesh-tests --bench cutover`");
        return;
    }
    let reps: usize = std::env::var("IM_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let kinds: Vec<Kind> = match std::env::var("IM_BENCH_KINDS") {
        Ok(v) => v
            .split(',')
            .filter_map(|k| match k.trim() {
                "switchover" => Some(Kind::Switchover),
                "drain" => Some(Kind::Drain),
                "kill" => Some(Kind::Kill),
                "heartbeat" => Some(Kind::Heartbeat),
                _ => None,
            })
            .collect(),
        Err(_) => vec![Kind::Switchover, Kind::Drain, Kind::Kill, Kind::Heartbeat],
    };
    // kube-proxy's sync lag on a real cluster; IM_BENCH_PROXY_DELAY_MS=0 measures without it.
    let proxy_delay = Duration::from_millis(
        std::env::var("IM_BENCH_PROXY_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000),
    );
    init_tracing();
    let mut env = Env::start(EnvOptions {
        proxy_delay,
        admin_token: Some(TOKEN.into()),
        ..EnvOptions::default()
    })
    .await;
    let st = env.wait_settled("the first settled state").await;
    env.wait_service_active(st.epoch, WAIT).await;
    let addr = env.proxy_addr().await;
    let ca = env.ca_pem().await;
    let poller = Poller::start(addr, env.service_dns(), ca, TOKEN.into());

    println!(
        "cutover bench: {reps} repetitions per kind; failover.unhealthyAfterSeconds {UNHEALTHY_AFTER_SECONDS}; node-monitor-grace-period {}; client polls every {} ms; Service proxy applies EndpointSlice changes {} ms after they happen",
        identitymesh_tests::controlplane::NODE_MONITOR_GRACE_PERIOD,
        POLL.as_millis(),
        proxy_delay.as_millis()
    );
    let mut report = Vec::new();
    for kind in kinds {
        let mut outages = Vec::new();
        let mut recoveries = Vec::new();
        let mut failed = Vec::new();
        for i in 0..reps {
            let (o, r, f) = one(&mut env, &poller, kind).await;
            println!(
                "  {} #{:>2}: {f} requests failed, for {o:.3}s; new active reachable {r:.3}s after the fault",
                kind.name(),
                i + 1
            );
            outages.push(o);
            recoveries.push(r);
            failed.push(f as f64);
        }
        outages.sort_by(f64::total_cmp);
        recoveries.sort_by(f64::total_cmp);
        failed.sort_by(f64::total_cmp);
        report.push((kind, outages, recoveries, failed));
    }
    env.slices.assert_never_two("the bench");
    println!();
    println!(
        "{:<20} {:>3} {:>20} {:>24}   {:>22}",
        "cutover",
        "n",
        "failed req p50/p99/max",
        "failing window p50/p99/max s",
        "fault→new active p50/max s"
    );
    for (kind, o, r, f) in &report {
        println!(
            "{:<20} {:>3} {:>20} {:>24}   {:>10.3} / {:.3}",
            kind.name(),
            o.len(),
            format!(
                "{}/{}/{}",
                percentile(f, 50.0),
                percentile(f, 99.0),
                f.last().copied().unwrap_or(f64::NAN)
            ),
            format!(
                "{:.3}/{:.3}/{:.3}",
                percentile(o, 50.0),
                percentile(o, 99.0),
                o.last().copied().unwrap_or(f64::NAN)
            ),
            percentile(r, 50.0),
            r.last().copied().unwrap_or(f64::NAN),
        );
    }
    println!(
        "targets: 0 failed requests at p99 for switchover and drain; kill -9 window p99 < unhealthyAfterSeconds ({UNHEALTHY_AFTER_SECONDS} s) + 2 s; heartbeat loss < node grace ({}) + 2 s",
        identitymesh_tests::controlplane::NODE_MONITOR_GRACE_PERIOD
    );
}
