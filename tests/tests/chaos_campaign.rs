//! A seeded fault campaign on the harness: faults against the operator and its two server pods
//! (one SQLite file), a recorded history and the checker.
//!
//! Faults (the default seed [`SEED`], [`FAULTS`] faults, every enabled kind at least once and
//! node faults on both roles): kill -9 of the active and of the standby, a planned switchover,
//! an operator restart, a node heartbeat stop, a node link cut (processes alive, unreachable),
//! a full partition (both), and the SQLite write-lock stall. Roles resolve from the cluster's
//! status at injection time. Before each injection the runner waits for the cluster to settle
//! again (the waits shift the rest of the schedule), so each fault meets a healthy pair: this
//! campaign measures recovery from single faults, not pile-ups. Another seed or length:
//! `cargo xtask chaos --seed S --faults N` (or IM_CHAOS_SEED / IM_CHAOS_FAULTS).
//!
//! Recorded: Admin API writes through the client Service (connector edits, one write in
//! flight per key, every value unique; secrets are write-only, so their values cannot be read
//! back), the client Service's EndpointSlices, each pod's `/health/ready` role and epoch, and
//! afterwards the commit log of the shared database (promotions, engine ticks, active
//! heartbeats, in commit order) as the fence rows.
//!
//! Checks that run: fencing, acknowledged writes, single ready endpoint, single active per
//! epoch, faults healed, and the recovery bound: from a fault's heal (timed) or injection
//! (instantaneous) to one ready endpoint whose instance reports active, within
//! [`RECOVERY_BOUND`]. Out of scope: convergence (connector space equal to the directory),
//! which needs the relay and slapd, not part of this campaign; its check is left out rather
//! than fed an invented final state.
//!
//! Needs root, `cargo xtask tools`, the sqlite3 CLI and `cargo build --workspace --bins`.

mod operator_common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use identitymesh_tests::chaos::checker::{check_all, Check, CheckerConfig};
use identitymesh_tests::chaos::db_stall::DbStall;
use identitymesh_tests::chaos::history::{Endpoint, Event, FenceRow, Record, Recorder, Role};
use identitymesh_tests::chaos::report::Report;
use identitymesh_tests::chaos::schedule::{Action, FaultKind, NodeRole, Schedule, ScheduleConfig};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::ListParams;
use kube::runtime::watcher;
use kube::Api;
use operator_common::*;
use serde_json::{json, Value};

/// The default campaign (the test command's): chosen so that its faults cover every enabled
/// kind, node faults on both roles. `IM_CHAOS_SEED` and `IM_CHAOS_FAULTS` (or `cargo xtask
/// chaos --seed S --faults N`) run another; a failing run prints its seed and schedule.
const SEED: u64 = 59;
const FAULTS: usize = 9;
/// Between two fault starts: longer than any timed fault lasts, so a fault heals before the
/// next one starts.
const MIN_GAP: Duration = Duration::from_secs(18);
/// The one timed property: a failover needs the unhealthy period (2 s), the operator's
/// detection and cutover and a pod restart (back-off up to 8 s); the e2e tests allow 90 s for
/// anything the operator does by itself. 45 s leaves room on two shared cores.
const RECOVERY_BOUND: Duration = Duration::from_secs(45);
/// How long the runner waits for a settled cluster before an injection (then injects anyway).
const SETTLE_BEFORE_FAULT: Duration = Duration::from_secs(30);
const TOKEN: &str = "imb_chaos-campaign-bootstrap-token";
const KEYS: usize = 3;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A setting from the environment, or its default; a value that does not parse is an error.
fn setting<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid number")),
        Err(_) => default,
    }
}

fn config() -> ScheduleConfig {
    let seed = setting("IM_CHAOS_SEED", SEED);
    let faults = setting("IM_CHAOS_FAULTS", FAULTS).max(1);
    // Room for every start MIN_GAP apart, and for the last fault to heal.
    let length = MIN_GAP * (faults as u32 + 1) + Duration::from_secs(14);
    let mut c = ScheduleConfig::new(seed, faults, length);
    c.kinds = [
        FaultKind::KillActive,
        FaultKind::KillStandby,
        FaultKind::KillOperator,
        FaultKind::HeartbeatStop,
        FaultKind::LinkCut,
        FaultKind::Partition,
        FaultKind::Switchover,
        FaultKind::DbStall,
    ]
    .into_iter()
    .collect();
    c.min_gap = MIN_GAP;
    c.max_concurrent = 1;
    c.min_duration = Duration::from_secs(3);
    c.max_duration = Duration::from_secs(8);
    c
}

/// What the client tasks need to reach the Admin API through the Service.
#[derive(Clone)]
struct AdminApi {
    addr: SocketAddr,
    sni: String,
    ca: String,
}

impl AdminApi {
    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), String> {
        let body = body.map(Value::to_string);
        let (code, text) = https_request(
            self.addr,
            &self.sni,
            &self.ca,
            method,
            path,
            Some(TOKEN),
            body.as_deref(),
            REQUEST_TIMEOUT,
        )
        .await?;
        Ok((code, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }
}

fn key(i: usize) -> String {
    format!("chaos-{i}")
}

/// The connector body carrying `value` (the object type is the field read back).
fn connector(key: &str, value: &str, drop: &str) -> Value {
    json!({"name": key, "kind": "csv",
           "config": {"folder": drop, "object_type": value, "anchor_column": "id"}})
}

struct Writer {
    api: AdminApi,
    rec: Recorder,
    op: Arc<AtomicU64>,
    drop: String,
}

impl Writer {
    /// One write, recorded sent and then acknowledged or failed (outcome unknown).
    async fn write(&self, method: &str, path: &str, key: &str) -> Option<Value> {
        let op = self.op.fetch_add(1, Ordering::SeqCst);
        let value = format!("v{op}");
        self.rec.record(Event::WriteSent {
            op,
            key: key.into(),
            value: value.clone(),
        });
        let body = connector(key, &value, &self.drop);
        match self.api.call(method, path, Some(&body)).await {
            Ok((200 | 201, v)) => {
                self.rec.record(Event::WriteAcked {
                    op,
                    key: key.into(),
                    value,
                });
                Some(v)
            }
            Ok((code, v)) => {
                self.rec.record(Event::WriteFailed {
                    op,
                    key: key.into(),
                    value,
                    error: format!("{code}: {v}"),
                });
                None
            }
            Err(error) => {
                self.rec.record(Event::WriteFailed {
                    op,
                    key: key.into(),
                    value,
                    error,
                });
                None
            }
        }
    }
}

/// The chaos connectors by name, as the Service's active lists them.
async fn list_connectors(api: &AdminApi) -> Result<Vec<Value>, String> {
    match api.call("GET", "/api/connectors", None).await? {
        (200, Value::Array(list)) => Ok(list),
        (code, v) => Err(format!("GET /api/connectors: {code}: {v}")),
    }
}

/// Creates the connectors the writer edits (before any fault; retried until listed).
async fn create_keys(w: &Writer) -> Vec<(String, String)> {
    let started = Instant::now();
    let mut ids = Vec::new();
    for i in 0..KEYS {
        let k = key(i);
        loop {
            if let Some(v) = w.write("POST", "/api/connectors", &k).await {
                ids.push((
                    k.clone(),
                    v["id"].as_str().expect("connector id").to_string(),
                ));
                break;
            }
            // The outcome is unknown: it may exist anyway.
            if let Ok(list) = list_connectors(&w.api).await {
                if let Some(c) = list.iter().find(|c| c["name"] == k.as_str()) {
                    ids.push((k.clone(), c["id"].as_str().unwrap_or_default().to_string()));
                    break;
                }
            }
            assert!(
                started.elapsed() < WAIT,
                "could not create connector {k} through the Service"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    ids
}

/// Edits the connectors round-robin until `stop`, one request at a time.
async fn write_loop(w: Writer, ids: Vec<(String, String)>, stop: Arc<AtomicBool>) {
    for (k, id) in ids.iter().cycle() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        w.write("PUT", &format!("/api/connectors/{id}"), k).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

/// Records the client Service's ready endpoints (with their pods) at every change.
async fn watch_endpoints(client: kube::Client, ns: String, rec: Recorder) {
    let api: Api<EndpointSlice> = Api::namespaced(client, &ns);
    let cfg = watcher::Config::default().labels(&format!("kubernetes.io/service-name={CLUSTER}"));
    let mut slices: BTreeMap<String, Vec<Endpoint>> = BTreeMap::new();
    let mut last: Option<Vec<Endpoint>> = None;
    let mut stream = std::pin::pin!(watcher(api, cfg));
    while let Some(ev) = stream.next().await {
        let Ok(ev) = ev else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let ready = |s: &EndpointSlice| -> Vec<Endpoint> {
            s.endpoints
                .iter()
                // nil means ready, as kube-proxy reads it.
                .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
                .flat_map(|e| {
                    let pod = e.target_ref.as_ref().and_then(|t| t.name.clone());
                    e.addresses.iter().map(move |a| Endpoint {
                        address: a.clone(),
                        instance: pod.clone(),
                    })
                })
                .collect()
        };
        match ev {
            watcher::Event::Apply(s) | watcher::Event::InitApply(s) => {
                slices.insert(s.metadata.name.clone().unwrap_or_default(), ready(&s));
            }
            watcher::Event::Delete(s) => {
                slices.remove(&s.metadata.name.clone().unwrap_or_default());
            }
            watcher::Event::Init | watcher::Event::InitDone => continue,
        }
        let mut all: Vec<Endpoint> = slices.values().flatten().cloned().collect();
        all.sort_by(|a, b| a.address.cmp(&b.address));
        if last.as_ref() != Some(&all) {
            rec.record(Event::Endpoints { ready: all.clone() });
            last = Some(all);
        }
    }
}

/// Polls every server pod's `/health/ready` (role and epoch as the process reports them).
async fn poll_roles(pods: Api<Pod>, sni: String, ca: String, rec: Recorder, stop: Arc<AtomicBool>) {
    let lp = ListParams::default().labels(&format!("identitymesh.io/cluster={CLUSTER}"));
    while !stop.load(Ordering::SeqCst) {
        let list = pods.list(&lp).await.map(|l| l.items).unwrap_or_default();
        let polls = list.into_iter().filter_map(|p| {
            let name = p.metadata.name.clone()?;
            let status = p.status.as_ref()?;
            let ip: std::net::IpAddr = status.pod_ip.as_ref()?.parse().ok()?;
            let restarts = status
                .container_statuses
                .iter()
                .flatten()
                .map(|c| c.restart_count)
                .sum::<i32>();
            let incarnation = format!("{}/{restarts}", p.metadata.uid.clone().unwrap_or_default());
            let (sni, ca, rec) = (sni.clone(), ca.clone(), rec.clone());
            Some(async move {
                let addr = SocketAddr::new(ip, 8443);
                let Ok((_, body)) =
                    https_get(addr, &sni, &ca, "/health/ready", Duration::from_secs(2)).await
                else {
                    return;
                };
                let Ok(v) = serde_json::from_str::<Value>(&body) else {
                    return;
                };
                let role: Role = serde_json::from_value(v["role"].clone()).unwrap_or(Role::Unknown);
                rec.record(Event::RoleReport {
                    instance: name,
                    role,
                    epoch: v["epoch"].as_i64().unwrap_or(-1),
                    incarnation: Some(incarnation),
                });
            })
        });
        futures::future::join_all(polls).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A timed fault in force, undone by its heal.
enum Held {
    /// A node fault of this kind on this node.
    Node(FaultKind, String),
    Stall(DbStall),
}

/// The pod holding `role` per the cluster's status now.
async fn pod_in_role(env: &Env, role: NodeRole) -> Result<String, String> {
    let st = env.status().await.ok_or("no cluster status")?;
    match role {
        NodeRole::Active => st.active,
        NodeRole::Standby => st.standby,
    }
    .ok_or_else(|| format!("no {role:?} pod in status"))
}

async fn inject(
    env: &mut Env,
    kind: FaultKind,
    target: Option<NodeRole>,
    duration: Duration,
) -> Result<(String, Option<Held>), String> {
    let ns = env.ns.clone();
    match kind {
        FaultKind::KillActive | FaultKind::KillStandby => {
            let role = if kind == FaultKind::KillActive {
                NodeRole::Active
            } else {
                NodeRole::Standby
            };
            let pod = pod_in_role(env, role).await?;
            let pids = env
                .cluster
                .kill_pod_process(&ns, &pod)
                .map_err(|e| e.to_string())?;
            Ok((format!("{pod} pids {pids:?}"), None))
        }
        FaultKind::KillOperator => {
            let old = env.operator.pid();
            env.restart_operator();
            Ok((
                format!("operator pid {old} -> {}", env.operator.pid()),
                None,
            ))
        }
        FaultKind::Switchover => {
            let pod = pod_in_role(env, NodeRole::Active).await?;
            env.cluster
                .kubectl(&[
                    "annotate",
                    "--overwrite",
                    "imc",
                    CLUSTER,
                    "-n",
                    &ns,
                    &format!("{SWITCHOVER_ANNOTATION}=standby"),
                ])
                .await
                .map_err(|e| e.to_string())?;
            Ok((format!("requested, active was {pod}"), None))
        }
        FaultKind::HeartbeatStop | FaultKind::LinkCut | FaultKind::Partition => {
            let pod = pod_in_role(env, target.unwrap_or(NodeRole::Active)).await?;
            let node = env.pod_node(&pod).await.ok_or("pod not scheduled")?;
            let c = &env.cluster;
            match kind {
                FaultKind::HeartbeatStop => c.stop_node_heartbeat(&node),
                FaultKind::LinkCut => c.cut_node_link(&node),
                _ => c.partition_node(&node),
            }
            .map_err(|e| e.to_string())?;
            Ok((format!("{node} ({pod})"), Some(Held::Node(kind, node))))
        }
        FaultKind::DbStall => {
            // Held until the heal releases it; the margin only bounds a lost heal.
            let stall = DbStall::start(
                &env.db,
                duration + Duration::from_secs(30),
                Duration::from_secs(5),
            )
            .map_err(|e| e.to_string())?;
            Ok((
                format!("{} (sqlite3 pid {})", env.db.display(), stall.pid()),
                Some(Held::Stall(stall)),
            ))
        }
        other => Err(format!("{other} is not enabled in this campaign")),
    }
}

fn heal(env: &Env, held: Held) -> Result<String, String> {
    match held {
        Held::Node(kind, node) => {
            let c = &env.cluster;
            match kind {
                FaultKind::HeartbeatStop => c.resume_node_heartbeat(&node),
                FaultKind::LinkCut => c.restore_node_link(&node),
                _ => c.heal_node(&node),
            }
            .map(|_| node)
            .map_err(|e| e.to_string())
        }
        Held::Stall(stall) => {
            let pid = stall.pid();
            stall.release();
            Ok(format!("sqlite3 pid {pid} released"))
        }
    }
}

/// Runs the schedule: events at their times, shifted by the waits for a settled cluster
/// before each injection.
async fn run_schedule(env: &mut Env, schedule: &Schedule, rec: &Recorder) {
    let start = Instant::now();
    let mut shift = Duration::ZERO;
    let mut held: BTreeMap<usize, Held> = BTreeMap::new();
    for ev in &schedule.events {
        let fault = &schedule.faults[ev.fault];
        let due = start + ev.at + shift;
        tokio::time::sleep_until(due.into()).await;
        match ev.action {
            Action::Inject => {
                let waited = Instant::now();
                let settled = tokio::time::timeout(SETTLE_BEFORE_FAULT, async {
                    while !env.status().await.is_some_and(|s| s.settled()) {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                })
                .await;
                if settled.is_err() {
                    let st = env.status().await.unwrap_or_default();
                    println!(
                        "not settled before fault #{}: {}",
                        fault.id,
                        serde_json::to_string(&st.raw["status"]).unwrap_or_default()
                    );
                    rec.record(Event::Phase {
                        name: format!("not settled before fault #{}", fault.id),
                    });
                }
                shift += waited.elapsed();
                let duration = fault.duration.unwrap_or_default();
                match inject(env, fault.kind, fault.target, duration).await {
                    Ok((detail, h)) => {
                        println!(
                            "+{:>6.1}s inject #{} {}: {detail}",
                            start.elapsed().as_secs_f64(),
                            fault.id,
                            fault.kind
                        );
                        rec.record(Event::FaultInjected {
                            fault: fault.id,
                            kind: fault.kind,
                            detail,
                        });
                        if let Some(h) = h {
                            held.insert(fault.id, h);
                        }
                    }
                    Err(error) => {
                        println!("inject #{} {} failed: {error}", fault.id, fault.kind);
                        rec.record(Event::FaultFailed {
                            fault: fault.id,
                            kind: fault.kind,
                            error,
                        });
                    }
                }
            }
            Action::Heal => {
                if let Some(h) = held.remove(&ev.fault) {
                    heal_one(env, rec, fault.id, fault.kind, h);
                }
            }
        }
    }
    // Nothing should be left; heal whatever is, so the history says so.
    for (id, h) in std::mem::take(&mut held) {
        heal_one(env, rec, id, schedule.faults[id].kind, h);
    }
}

fn heal_one(env: &Env, rec: &Recorder, fault: usize, kind: FaultKind, h: Held) {
    match heal(env, h) {
        Ok(detail) => {
            println!("heal #{fault} {kind}: {detail}");
            rec.record(Event::FaultHealed {
                fault,
                kind,
                detail,
            });
        }
        Err(e) => env.fail(&format!("healing fault #{fault} ({kind}): {e}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seeded_fault_campaign() {
    let _serial = SERIAL.lock().await;
    init_tracing();
    let schedule = Schedule::generate(&config()).expect("the campaign's schedule");
    println!("{schedule}");

    let token_dir = std::env::temp_dir().join(format!("im-chaos-campaign-{}", std::process::id()));
    std::fs::create_dir_all(&token_dir).expect("token dir");
    let token_file: PathBuf = token_dir.join("admin.token");
    std::fs::write(&token_file, TOKEN).expect("write the bootstrap token");
    // The writer's CSV connectors name this folder: the servers' only drop root.
    let drop_dir = token_dir.join("drop");
    std::fs::create_dir_all(&drop_dir).expect("drop folder");
    let mut env = Env::start(EnvOptions {
        server_env: vec![
            (
                "IM_AUTH__BOOTSTRAP_TOKEN_FILE".into(),
                token_file.display().to_string(),
            ),
            (
                "IM_CONNECTORS__CSV_ROOTS".into(),
                drop_dir.display().to_string(),
            ),
        ],
        ..EnvOptions::default()
    })
    .await;
    let st = env.wait_settled("the first settled state").await;
    env.wait_service_active(st.epoch, WAIT).await;
    install_commit_log(&env.db);

    let api = AdminApi {
        addr: env.proxy_addr().await,
        sni: env.service_dns(),
        ca: env.ca_pem().await,
    };
    let rec = Recorder::new();
    let stop = Arc::new(AtomicBool::new(false));
    let watch = tokio::spawn(watch_endpoints(
        env.cluster.client(),
        env.ns.clone(),
        rec.clone(),
    ));
    let roles = tokio::spawn(poll_roles(
        env.pods.clone(),
        api.sni.clone(),
        api.ca.clone(),
        rec.clone(),
        stop.clone(),
    ));
    let writer = Writer {
        api: api.clone(),
        rec: rec.clone(),
        op: Arc::default(),
        drop: drop_dir.display().to_string(),
    };
    let ids = create_keys(&writer).await;
    let writes = tokio::spawn(write_loop(writer, ids, stop.clone()));
    // The recovery check needs the endpoints as they were before the first fault.
    let started = Instant::now();
    while !rec
        .history()
        .entries
        .iter()
        .any(|e| matches!(e.event, Event::Endpoints { .. }))
    {
        assert!(
            started.elapsed() < WAIT,
            "the EndpointSlice watch saw nothing"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    rec.record(Event::Phase {
        name: "schedule_start".into(),
    });
    run_schedule(&mut env, &schedule, &rec).await;
    rec.record(Event::Phase {
        name: "healed".into(),
    });
    let st = env.wait_settled("settled after the campaign").await;
    env.wait_service_active(st.epoch, WAIT).await;
    rec.record(Event::Phase {
        name: "settled".into(),
    });
    // Let the pollers see the settled state, then stop the clients.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    writes.await.expect("writer task");
    roles.await.expect("role poller task");
    watch.abort();

    // Read back every chaos connector through the Service.
    let started = Instant::now();
    let list = loop {
        match list_connectors(&api).await {
            Ok(l) => break l,
            Err(e) if started.elapsed() > WAIT => env.fail(&format!("read-back: {e}")),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    };
    let records = list
        .iter()
        .filter(|c| c["name"].as_str().is_some_and(|n| n.starts_with("chaos-")))
        .map(|c| Record {
            key: c["name"].as_str().unwrap_or_default().to_string(),
            value: c["config"]["object_type"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        })
        .collect();
    rec.record(Event::ReadBack { records });

    // The commit log as fence rows: the server's own fence_journal holds only promotions
    // (no import runs here), the commit log also every engine tick and active heartbeat.
    let journal = fence_journal(&env.db);
    for c in commit_log(&env.db) {
        let kind = match (c.what.as_str(), c.role.as_str()) {
            ("promote", _) => "promote",
            ("tick", _) => "tick",
            ("heartbeat", "active") => "active-heartbeat",
            _ => continue,
        };
        rec.record(Event::Fence(FenceRow {
            seq: c.seq,
            kind: kind.into(),
            epoch: c.epoch,
            instance: c.instance,
            at: 0,
        }));
    }

    let history = rec.history();
    let history_path = env.dir.join("history.jsonl");
    history
        .write_json_lines(&history_path)
        .expect("write the history");
    let cfg = CheckerConfig {
        recovery_bound: RECOVERY_BOUND,
        ..CheckerConfig::default()
    };
    let mut verdict = check_all(&history, &cfg);
    // Out of scope here (no relay, no slapd): see the module comment.
    verdict.checks.retain(|(c, _)| *c != Check::Convergence);
    let report = Report::new(&schedule, &verdict);
    println!("{report}");
    println!("out of scope: convergence (needs the relay and slapd)");
    println!(
        "fence_journal: {} promotion(s); history: {} entries",
        journal.iter().filter(|(k, _)| k == "promote").count(),
        history.entries.len()
    );
    let injected = history
        .entries
        .iter()
        .filter(|e| matches!(e.event, Event::FaultInjected { .. }))
        .count();
    if !report.passed() || injected != schedule.faults.len() || verdict.acknowledged_writes == 0 {
        env.fail(&format!(
            "{}\n{injected} of {} faults injected, {} writes acknowledged; history in {}",
            report.failure_text(&schedule),
            schedule.faults.len(),
            verdict.acknowledged_writes,
            history_path.display()
        ));
    }
    let _ = std::fs::remove_dir_all(&token_dir);
}
