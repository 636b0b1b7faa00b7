//! A seeded fault campaign on the harness: faults against the operator, its two server pods
//! (one SQLite file), a real relay and a changing slapd, a recorded history and the checker.
//!
//! The system under test: the operator; two server pods; the real `identitymesh-relay`,
//! enrolled and connected through the client Service; the tests' slapd as a changing directory
//! (a background writer adds, modifies, renames and deletes people, recording each change); an
//! LDAP connector bound to the relay with scheduled delta imports (every 10 s) and full imports
//! (every 30 s).
//!
//! Faults (the default seed [`SEED`], [`FAULTS`] faults, every enabled kind at least once and
//! node faults on both roles): kill -9 of the active and of the standby, a planned switchover,
//! an operator restart, a node heartbeat stop, a node link cut (processes alive, unreachable),
//! a full partition (both), the SQLite write-lock stall, a relay kill (kill -9 by pid, started
//! again at the heal) and a slapd restart (kill -9 by pid, started again on the same ports and
//! data at the heal). Roles resolve from the cluster's status at injection time. Before each
//! injection the runner waits for the cluster to settle again (the waits shift the rest of the
//! schedule), so each fault meets a healthy pair: this campaign measures recovery from single
//! faults, not pile-ups. Another seed or length: `cargo xtask chaos --seed S --faults N` (or
//! IM_CHAOS_SEED / IM_CHAOS_FAULTS).
//!
//! Recorded: Admin API writes through the client Service (connector edits, secret sets,
//! schedule creations and deletions; one write in flight per key, every value unique), every
//! directory change, the client Service's EndpointSlices, each pod's `/health/ready` role and
//! epoch, where the relay is connected, and afterwards the commit log of the shared database
//! (promotions, engine ticks, active heartbeats, import batches, in commit order) as the fence
//! rows. After the heal the directory writer stops, a final delta import and then a final full
//! import run, and the directory, the connector space (after each) and the identities are
//! read: the final state.
//!
//! Checks: fencing, acknowledged writes (secrets are read back by opening the stored values
//! with the key ring), convergence (connector space equal to the directory by entryUUID and key
//! attributes after the final full import, and after the final delta deletions aside; one
//! identity per person, none left over), single ready endpoint, single active
//! per epoch, faults healed, and the recovery bound: from a fault's heal (timed) or injection
//! (instantaneous) to one ready endpoint whose instance reports active with the relay connected
//! to it, within [`RECOVERY_BOUND`].
//!
//! Needs root, `cargo xtask tools`, slapd, the sqlite3 CLI and `cargo build --workspace --bins`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use identitymesh_connectors::testing::{
    generate_people, Slapd, GROUPS_BASE, PEOPLE_BASE, ROOT_DN, ROOT_PASSWORD,
};
use identitymesh_tests::chaos::checker::{check_all, CheckerConfig};
use identitymesh_tests::chaos::db_stall::DbStall;
use identitymesh_tests::chaos::directory::{self, ObjectType, Target, BINARY_PREFIX};
use identitymesh_tests::chaos::history::{
    DeltaState, Endpoint, Event, FenceRow, FinalState, ImportRun, Object, Record, Recorder, Role,
    DELETED,
};
use identitymesh_tests::chaos::relay::RelayProcess;
use identitymesh_tests::chaos::report::Report;
use identitymesh_tests::chaos::schedule::{Action, FaultKind, NodeRole, Schedule, ScheduleConfig};
use identitymesh_tests::operator_env::*;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::ListParams;
use kube::runtime::watcher;
use kube::Api;
use serde_json::{json, Value};

/// The default campaign (the test command's): chosen so that its faults cover every enabled
/// kind, node faults on both roles. `IM_CHAOS_SEED` and `IM_CHAOS_FAULTS` (or `cargo xtask
/// chaos --seed S --faults N`) run another; a failing run prints its seed and schedule.
const SEED: u64 = 1509;
const FAULTS: usize = 20;
/// Between two fault starts: longer than any timed fault lasts, so a fault heals before the
/// next one starts.
const MIN_GAP: Duration = Duration::from_secs(15);
/// The one timed property: a failover needs the unhealthy period (2 s), the operator's
/// detection and cutover and a pod restart (back-off up to 8 s), and the relay's reconnect
/// (backoff capped at 8 s); the e2e tests allow 90 s for anything the operator does by itself.
/// 45 s leaves room on two shared cores.
const RECOVERY_BOUND: Duration = Duration::from_secs(45);
/// How long the runner waits for a settled cluster before an injection (then injects anyway).
const SETTLE_BEFORE_FAULT: Duration = Duration::from_secs(30);
const TOKEN: &str = "imb_chaos-campaign-bootstrap-token";
/// Connectors edited, secrets set, and schedules kept at once by the Admin API writer.
const KEYS: usize = 3;
const LIVE_SCHEDULES: usize = 3;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// People in the directory at the start (and a group per ten).
const PEOPLE: usize = 200;
/// Attributes compared between the directory and the connector space (and `dn`); entryCSN
/// says the stored copy is the latest version, not only an equal-looking one.
const COMPARED: &[&str] = &[
    "objectClass",
    "uid",
    "cn",
    "sn",
    "mail",
    "description",
    "title",
    "telephoneNumber",
    "employeeNumber",
    "member",
    "jpegPhoto",
    "entryCSN",
];
const RELAY_NAME: &str = "chaos-relay";
const LDAP_CONNECTOR: &str = "chaos-directory";
const BIND_SECRET: &str = "chaos-ldap-bind";

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
    c.kinds = campaign_kinds();
    c.min_gap = MIN_GAP;
    c.max_concurrent = 1;
    c.min_duration = Duration::from_secs(3);
    c.max_duration = Duration::from_secs(8);
    c
}

/// Every kind.
fn campaign_kinds() -> BTreeSet<FaultKind> {
    FaultKind::ALL.into_iter().collect()
}

/// The server pods' data directory is a tmpfs of this size, which the disk-full fault fills.
const DATA_TMPFS: u64 = 64 << 20;

/// What the client tasks need to reach the Admin API through the Service.
#[derive(Clone)]
struct AdminApi(AdminClient);

impl std::ops::Deref for AdminApi {
    type Target = AdminClient;
    fn deref(&self) -> &AdminClient {
        &self.0
    }
}

impl AdminApi {
    async fn get(&self, path: &str) -> Result<Value, String> {
        match self.call("GET", path, None).await? {
            (200, v) => Ok(v),
            (code, v) => Err(format!("GET {path}: {code}: {v}")),
        }
    }

    /// Retries a setup call (before any fault) until it answers one of `ok`.
    async fn setup(&self, method: &str, path: &str, body: &Value, ok: &[u16]) -> Value {
        let started = Instant::now();
        loop {
            let last = match self.call(method, path, Some(body)).await {
                Ok((code, v)) if ok.contains(&code) => return v,
                Ok((code, v)) => format!("{code}: {v}"),
                Err(e) => e,
            };
            assert!(
                started.elapsed() < WAIT,
                "{method} {path} through the Service: {last}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

fn connector_key(i: usize) -> String {
    format!("chaos-{i}")
}

/// The connector body carrying `value` (the object type is the field read back).
fn connector(name: &str, value: &str, drop: &str) -> Value {
    json!({"name": name, "kind": "csv",
           "config": {"folder": drop, "object_type": value, "anchor_column": "id"}})
}

/// The Admin API writer: connector edits, secret sets and schedule changes, each recorded
/// sent and then acknowledged or failed (outcome unknown).
struct Writer {
    api: AdminApi,
    rec: Recorder,
    op: Arc<AtomicU64>,
    drop: String,
}

enum Outcome {
    Acked(Value),
    /// Answered with this error status (recorded as failed all the same: a 5xx may follow a
    /// commit).
    Refused(u16),
    Unknown,
}

/// One Admin API request and the statuses that acknowledge it.
struct Request<'a> {
    method: &'a str,
    path: &'a str,
    body: Option<Value>,
    ok: &'a [u16],
}

impl Writer {
    fn next_op(&self) -> u64 {
        self.op.fetch_add(1, Ordering::SeqCst)
    }

    /// One recorded write of `value` to `key`.
    async fn write(&self, op: u64, key: &str, value: &str, req: Request<'_>) -> Outcome {
        self.rec.record(Event::WriteSent {
            op,
            key: key.into(),
            value: value.into(),
        });
        let (error, outcome) = match self.api.call(req.method, req.path, req.body.as_ref()).await {
            Ok((code, v)) if req.ok.contains(&code) => {
                self.rec.record(Event::WriteAcked {
                    op,
                    key: key.into(),
                    value: value.into(),
                });
                return Outcome::Acked(v);
            }
            Ok((code, v)) => (format!("{code}: {v}"), Outcome::Refused(code)),
            Err(e) => (e, Outcome::Unknown),
        };
        self.rec.record(Event::WriteFailed {
            op,
            key: key.into(),
            value: value.into(),
            error,
        });
        outcome
    }

    async fn connector(&self, method: &str, path: &str, name: &str) -> Outcome {
        let op = self.next_op();
        let value = format!("v{op}");
        let req = Request {
            method,
            path,
            body: Some(connector(name, &value, &self.drop)),
            ok: &[200, 201],
        };
        self.write(op, &format!("connector:{name}"), &value, req)
            .await
    }

    async fn secret(&self, name: &str) {
        let op = self.next_op();
        let value = format!("v{op}");
        let req = Request {
            method: "PUT",
            path: &format!("/api/secrets/{name}"),
            body: Some(json!({ "value": value })),
            ok: &[200],
        };
        self.write(op, &format!("secret:{name}"), &value, req).await;
    }
}

/// The chaos connectors by name, as the Service's active lists them.
async fn list_connectors(api: &AdminApi) -> Result<Vec<Value>, String> {
    match api.get("/api/connectors").await? {
        Value::Array(list) => Ok(list),
        v => Err(format!("GET /api/connectors: {v}")),
    }
}

/// Creates the connectors the writer edits (before any fault; retried until listed).
async fn create_keys(w: &Writer) -> Vec<(String, String)> {
    let started = Instant::now();
    let mut ids = Vec::new();
    for i in 0..KEYS {
        let k = connector_key(i);
        loop {
            if let Outcome::Acked(v) = w.connector("POST", "/api/connectors", &k).await {
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

/// A schedule the writer created (or tried to): its key is `schedule:<spec>`.
struct LiveSchedule {
    spec: String,
    /// Known when the create was acknowledged.
    id: Option<String>,
    /// A delete was sent before and got no answer: it may have been applied.
    delete_sent: bool,
}

/// Schedule changes: creates schedules on the chaos connectors (intervals of more than a day,
/// so they never fire here; each spec unique, so it names its write) and deletes the oldest
/// once [`LIVE_SCHEDULES`] exist. A delete is a write of [`DELETED`]; a schedule whose create
/// had no answer is looked up by spec first, and forgotten when it does not exist.
struct Schedules {
    live: Vec<LiveSchedule>,
    turn: usize,
    /// Specs of schedules that were gone when deleted (must stay empty).
    lost: Vec<String>,
}

impl Schedules {
    async fn step(&mut self, w: &Writer, ids: &[(String, String)]) {
        if self.live.len() < LIVE_SCHEDULES {
            let op = w.next_op();
            let spec = format!("{}s", 100_000 + op);
            let connector = &ids[self.turn % ids.len()].1;
            self.turn += 1;
            let body = json!({"connector_id": connector, "kind": "interval", "spec": spec,
                              "mode": "delta"});
            let req = Request {
                method: "POST",
                path: "/api/schedules",
                body: Some(body),
                ok: &[201],
            };
            let id = match w.write(op, &format!("schedule:{spec}"), &spec, req).await {
                Outcome::Acked(v) => v["id"].as_str().map(str::to_string),
                // Looked up by its spec when it is deleted (an error answer may still have
                // come after the insert).
                Outcome::Refused(_) | Outcome::Unknown => None,
            };
            self.live.push(LiveSchedule {
                spec,
                id,
                delete_sent: false,
            });
            return;
        }
        let oldest = &self.live[0];
        let id = match &oldest.id {
            Some(id) => id.clone(),
            None => {
                let Ok(Value::Array(list)) = w.api.get("/api/schedules").await else {
                    return;
                };
                match list.iter().find(|s| s["spec"] == oldest.spec.as_str()) {
                    Some(s) => s["id"].as_str().unwrap_or_default().to_string(),
                    None => {
                        self.live.remove(0);
                        return;
                    }
                }
            }
        };
        let op = w.next_op();
        let key = format!("schedule:{}", oldest.spec);
        let req = Request {
            method: "DELETE",
            path: &format!("/api/schedules/{id}"),
            body: None,
            ok: &[204],
        };
        match w.write(op, &key, DELETED, req).await {
            Outcome::Acked(_) => {
                self.live.remove(0);
            }
            // Not there. After a delete that got no answer, that one was applied. Otherwise
            // its create was acknowledged (or it was listed a moment ago), so it was lost; the
            // failed delete would excuse its absence at the read-back, so it is counted here
            // and fails the campaign.
            Outcome::Refused(404) => {
                let gone = self.live.remove(0);
                if !gone.delete_sent {
                    w.rec.record(Event::Phase {
                        name: format!("schedule {} gone before its delete (op {op})", gone.spec),
                    });
                    self.lost.push(gone.spec);
                }
            }
            // Try again later.
            Outcome::Refused(_) | Outcome::Unknown => self.live[0].delete_sent = true,
        }
    }
}

/// Connector edits, secret sets and schedule changes in turn until `stop`, one request at a
/// time.
async fn write_loop(w: Writer, ids: Vec<(String, String)>, stop: Arc<AtomicBool>) -> Vec<String> {
    let mut schedules = Schedules {
        live: Vec::new(),
        turn: 0,
        lost: Vec::new(),
    };
    for round in 0usize.. {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let i = round / 3 % KEYS;
        match round % 3 {
            0 => {
                let (k, id) = &ids[i];
                w.connector("PUT", &format!("/api/connectors/{id}"), k)
                    .await;
            }
            1 => w.secret(&format!("chaos-secret-{i}")).await,
            _ => schedules.step(&w, &ids).await,
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    schedules.lost
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

/// Where the relay is connected, per `GET /api/relays` through the Service.
async fn relay_instance(api: &AdminApi, relay: &str) -> Result<Option<String>, String> {
    let list = api.get("/api/relays").await?;
    let r = list
        .as_array()
        .and_then(|l| l.iter().find(|r| r["id"] == relay))
        .ok_or_else(|| format!("relay {relay} not listed: {list}"))?;
    Ok(match r["state"].as_str() {
        Some("Connected") => r["instance"].as_str().map(str::to_string),
        _ => None,
    })
}

/// Records the relay's connection at every poll the Service answers.
async fn poll_relay(api: AdminApi, relay: String, rec: Recorder, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        if let Ok(instance) = relay_instance(&api, &relay).await {
            rec.record(Event::RelayReport {
                relay: relay.clone(),
                instance,
            });
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Waits until the relay is connected to the Service's active.
async fn wait_relay_on_active(env: &Env, api: &AdminApi, relay: &str, what: &str) {
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < WAIT {
        let active = env.status().await.and_then(|s| s.active);
        match relay_instance(api, relay).await {
            Ok(Some(i)) if Some(&i) == active.as_ref() => return,
            Ok(i) => last = format!("relay on {i:?}, active {active:?}"),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    env.fail(&format!(
        "{what}: the relay never connected to the active: {last}"
    ));
}

/// The system besides the operator's cluster: the relay and the directory.
struct Campaign {
    env: Env,
    relay: RelayProcess,
    slapd: Slapd,
}

/// A timed fault in force, undone by its heal.
enum Held {
    /// A node fault of this kind on this node.
    Node(FaultKind, String),
    Stall(DbStall),
    /// The relay was killed (this pid).
    Relay(u32),
    /// slapd was killed (this pid).
    Slapd(u32),
    /// This pod's data directory was filled.
    DiskFull(String),
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
    c: &mut Campaign,
    kind: FaultKind,
    target: Option<NodeRole>,
    duration: Duration,
) -> Result<(String, Option<Held>), String> {
    let env = &mut c.env;
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
            let old = env.operator_pid();
            env.restart_operator();
            Ok((
                format!("operator pid {old:?} -> {:?}", env.operator_pid()),
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
            let cl = &env.cluster;
            match kind {
                FaultKind::HeartbeatStop => cl.stop_node_heartbeat(&node),
                FaultKind::LinkCut => cl.cut_node_link(&node),
                _ => cl.partition_node(&node),
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
        FaultKind::RelayKill => {
            let pid = c.relay.kill().map_err(|e| e.to_string())?;
            Ok((format!("relay pid {pid}"), Some(Held::Relay(pid))))
        }
        FaultKind::SlapdRestart => {
            let pid = c.slapd.pid().ok_or("slapd is not running")?;
            if !identitymesh_tests::process::signal(pid, libc::SIGKILL) {
                return Err(format!("slapd pid {pid} is gone"));
            }
            identitymesh_tests::process::wait_dead(pid, Duration::from_secs(5));
            Ok((format!("slapd pid {pid}"), Some(Held::Slapd(pid))))
        }
        FaultKind::DiskFull => {
            // The active's own directory (logs and whatever else the server keeps there).
            let pod = pod_in_role(env, NodeRole::Active).await?;
            let bytes = env
                .cluster
                .fill_pod_volume(&ns, &pod, DATA_VOLUME)
                .map_err(|e| e.to_string())?;
            Ok((
                format!("{pod} data directory ({bytes} bytes filled)"),
                Some(Held::DiskFull(pod)),
            ))
        }
    }
}

async fn heal(c: &mut Campaign, held: Held) -> Result<String, String> {
    match held {
        Held::Node(kind, node) => {
            let cl = &c.env.cluster;
            match kind {
                FaultKind::HeartbeatStop => cl.resume_node_heartbeat(&node),
                FaultKind::LinkCut => cl.restore_node_link(&node),
                _ => cl.heal_node(&node),
            }
            .map(|_| node)
            .map_err(|e| e.to_string())
        }
        Held::Stall(stall) => {
            let pid = stall.pid();
            stall.release();
            Ok(format!("sqlite3 pid {pid} released"))
        }
        Held::Relay(old) => {
            let pid = c.relay.restart().map_err(|e| e.to_string())?;
            Ok(format!("relay pid {old} -> {pid}"))
        }
        Held::DiskFull(pod) => {
            let ns = c.env.ns.clone();
            match c.env.cluster.free_pod_volume(&ns, &pod, DATA_VOLUME) {
                Ok(()) => Ok(format!("{pod} data directory freed")),
                // Replaced meanwhile: its tmpfs went with it.
                Err(_) if c.env.cluster.pod_pids(&ns, &pod).is_empty() => {
                    Ok(format!("{pod} was replaced; its tmpfs went with it"))
                }
                Err(e) => Err(e.to_string()),
            }
        }
        Held::Slapd(old) => {
            c.slapd.restart().await.map_err(|e| e.to_string())?;
            Ok(format!(
                "slapd pid {old} -> {} on port {}",
                c.slapd.pid().unwrap_or_default(),
                c.slapd.ldaps_port()
            ))
        }
    }
}

/// Runs the schedule: events at their times, shifted by the waits for a settled cluster
/// before each injection.
async fn run_schedule(c: &mut Campaign, schedule: &Schedule, rec: &Recorder) {
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
                    while !c.env.status().await.is_some_and(|s| s.settled()) {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                })
                .await;
                if settled.is_err() {
                    let st = c.env.status().await.unwrap_or_default();
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
                match inject(c, fault.kind, fault.target, duration).await {
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
                    heal_one(c, rec, fault.id, fault.kind, h).await;
                }
            }
        }
    }
    // Nothing should be left; heal whatever is, so the history says so.
    for (id, h) in std::mem::take(&mut held) {
        heal_one(c, rec, id, schedule.faults[id].kind, h).await;
    }
}

async fn heal_one(c: &mut Campaign, rec: &Recorder, fault: usize, kind: FaultKind, h: Held) {
    match heal(c, h).await {
        Ok(detail) => {
            println!("heal #{fault} {kind}: {detail}");
            rec.record(Event::FaultHealed {
                fault,
                kind,
                detail,
            });
        }
        Err(e) => c.env.fail(&format!("healing fault #{fault} ({kind}): {e}")),
    }
}

// ------------------------------------------------------------------------------- the directory

/// sqlite3 `-json` rows of a read-only query on the shared database.
fn sqlite_json(db: &Path, sql: &str) -> Vec<Value> {
    let out = std::process::Command::new("sqlite3")
        .args(["-readonly", "-cmd", ".timeout 5000", "-json"])
        .arg(db)
        .arg(sql)
        .output()
        .expect("run sqlite3");
    assert!(
        out.status.success(),
        "sqlite3 {sql:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Vec::new();
    }
    serde_json::from_slice(&out.stdout).expect("sqlite3 -json output")
}

/// A stored value as the directory reader writes it: text as is, bytes as base64.
fn stored_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Object(o) => format!(
            "{BINARY_PREFIX}{}",
            o.get("base64").and_then(Value::as_str).unwrap_or_default()
        ),
        other => other.to_string(),
    }
}

/// The connector's stored objects (not deleted), keyed by anchor, with the compared attributes.
fn connector_space(db: &Path, connector: &str) -> Vec<Object> {
    sqlite_json(
        db,
        &format!(
            "SELECT anchor, attributes_json FROM cs_objects WHERE connector_id = '{connector}' AND deleted = 0"
        ),
    )
    .into_iter()
    .map(|row| {
        let stored: Value =
            serde_json::from_str(row["attributes_json"].as_str().unwrap_or("{}")).unwrap_or_default();
        let mut attributes: BTreeMap<String, Vec<String>> = BTreeMap::new();
        if let Some(dn) = stored["dn"].as_str() {
            attributes.insert("dn".into(), vec![dn.to_string()]);
        }
        if let Some(attrs) = stored["attributes"].as_object() {
            for key in COMPARED {
                let mut values: Vec<String> = attrs
                    .iter()
                    .filter(|(name, _)| name.eq_ignore_ascii_case(key))
                    .flat_map(|(_, v)| v.as_array().cloned().unwrap_or_default())
                    .map(|v| stored_text(&v))
                    .collect();
                if !values.is_empty() {
                    values.sort();
                    attributes.insert((*key).to_string(), values);
                }
            }
        }
        Object {
            id: row["anchor"].as_str().unwrap_or_default().to_string(),
            attributes,
        }
    })
    .collect()
}

/// Per directory person (anchor): the identities that link it or carry its uid; and the
/// identities no directory person links.
fn identities(
    db: &Path,
    connector: &str,
    people: &[Object],
) -> (BTreeMap<String, u32>, Vec<String>) {
    let links: HashMap<String, String> = sqlite_json(
        db,
        &format!(
            "SELECT anchor, identity_id FROM identity_links WHERE connector_id = '{connector}'"
        ),
    )
    .into_iter()
    .map(|r| {
        (
            r["anchor"].as_str().unwrap_or_default().to_string(),
            r["identity_id"].as_str().unwrap_or_default().to_string(),
        )
    })
    .collect();
    let mut by_uid: HashMap<String, BTreeSet<String>> = HashMap::new();
    let mut all: BTreeSet<String> = BTreeSet::new();
    for r in sqlite_json(db, "SELECT id, attributes_json FROM identities") {
        let id = r["id"].as_str().unwrap_or_default().to_string();
        let v: Value =
            serde_json::from_str(r["attributes_json"].as_str().unwrap_or("{}")).unwrap_or_default();
        for uid in v["attributes"]["uid"].as_array().into_iter().flatten() {
            if let Some(u) = uid.as_str() {
                by_uid
                    .entry(u.to_lowercase())
                    .or_default()
                    .insert(id.clone());
            }
        }
        all.insert(id);
    }
    let mut per_person = BTreeMap::new();
    let mut linked: BTreeSet<String> = BTreeSet::new();
    for p in people {
        let mut ids: BTreeSet<String> = BTreeSet::new();
        if let Some(i) = links.get(&p.id) {
            ids.insert(i.clone());
            linked.insert(i.clone());
        }
        for uid in p.attributes.get("uid").into_iter().flatten() {
            ids.extend(
                by_uid
                    .get(&uid.to_lowercase())
                    .into_iter()
                    .flatten()
                    .cloned(),
            );
        }
        per_person.insert(p.id.clone(), ids.len() as u32);
    }
    let orphans = all.difference(&linked).cloned().collect();
    (per_person, orphans)
}

fn ldap_rules() -> Value {
    json!({
        "precedence": 20,
        "object_types": {
            "people": {
                "join": [{"source": "lower(uid)", "identity_attribute": "uid"}],
                "flows": [
                    {"target": "uid", "expression": "lower(uid)"},
                    {"target": "mail", "expression": "mail"}
                ],
                "display_name": "cn"
            }
        }
    })
}

fn run_detail(r: &Value) -> String {
    match r["error"].as_str() {
        Some(e) => e.chars().take(300).collect(),
        None => format!("counts {}", r["counts"]),
    }
}

/// An import (`mode` full or delta) through the Service, retried (a scheduled run may hold the connector, a run
/// may fail while something still reconnects) until one succeeds or [`WAIT`] passes.
async fn run_import(api: &AdminApi, connector: &str, mode: &str) -> ImportRun {
    let started = Instant::now();
    let mut last = ImportRun {
        run: String::new(),
        mode: mode.into(),
        status: "not started".into(),
        detail: String::new(),
    };
    while started.elapsed() < WAIT * 2 {
        let path = format!("/api/connectors/{connector}/runs");
        let run = match api
            .call("POST", &path, Some(&json!({ "mode": mode })))
            .await
        {
            Ok((202, v)) => v,
            Ok((code, v)) => {
                last.detail = format!("POST {path}: {code}: {v}");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(e) => {
                last.detail = e;
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let id = run["id"].as_str().unwrap_or_default().to_string();
        let done = loop {
            match api.get(&format!("/api/runs/{id}")).await {
                Ok(r) if r["status"] != "running" => break Some(r),
                _ if started.elapsed() > WAIT * 2 => break None,
                _ => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        };
        let Some(r) = done else { break };
        last = ImportRun {
            run: id,
            mode: mode.into(),
            status: r["status"].as_str().unwrap_or_default().to_string(),
            detail: run_detail(&r),
        };
        if last.status == "succeeded" {
            return last;
        }
        println!(
            "final {mode} import {} ended {}: {}",
            last.run, last.status, last.detail
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    last
}

// ------------------------------------------------------------------------------- read-back

/// The key ring both pods mount, from its Secret.
async fn key_ring(env: &Env) -> identitymesh_keyring::KeyRing {
    let secrets: Api<Secret> = Api::namespaced(env.cluster.client(), &env.ns);
    let s = secrets
        .get(&format!("{CLUSTER}-keyring"))
        .await
        .expect("the key ring Secret");
    let bytes = s
        .data
        .and_then(|d| d.get(identitymesh_keyring::KEYRING_KEY).cloned())
        .expect("keyring.json in the key ring Secret");
    identitymesh_keyring::KeyRing::parse(&bytes.0).expect("a valid key ring")
}

/// The writer's secrets as stored, opened with the key ring (a value that does not open is
/// read back as such, and no write sent it).
async fn read_back_secrets(env: &Env) -> Vec<Record> {
    let ring = key_ring(env).await;
    sqlite_json(
        &env.db,
        "SELECT ref, key_id, hex(nonce) AS nonce, hex(ciphertext) AS ciphertext FROM secrets \
         WHERE ref LIKE 'chaos-secret-%'",
    )
    .into_iter()
    .map(|r| {
        let name = r["ref"].as_str().unwrap_or_default().to_string();
        let sealed = identitymesh_keyring::Sealed {
            key_id: r["key_id"].as_str().unwrap_or_default().to_string(),
            nonce: hex::decode(r["nonce"].as_str().unwrap_or_default()).unwrap_or_default(),
            ciphertext: hex::decode(r["ciphertext"].as_str().unwrap_or_default())
                .unwrap_or_default(),
        };
        let value = match ring.open(&name, &sealed) {
            Ok(plain) => String::from_utf8_lossy(&plain).into_owned(),
            Err(e) => format!("<does not open: {e}>"),
        };
        Record {
            key: format!("secret:{name}"),
            value,
        }
    })
    .collect()
}

/// Retries a read through the Service after the run (everything healed) until it answers.
async fn read_retrying(env: &Env, api: &AdminApi, path: &str) -> Value {
    let started = Instant::now();
    loop {
        match api.get(path).await {
            Ok(v) => return v,
            Err(e) if started.elapsed() > WAIT => env.fail(&format!("read-back {path}: {e}")),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// Every import batch commits under its epoch too; the triggers of `install_commit_log` do not
/// see them.
fn install_batch_log(db: &Path) {
    sqlite(
        db,
        "CREATE TRIGGER IF NOT EXISTS e2e_batch AFTER INSERT ON import_batches BEGIN
            INSERT INTO e2e_commit_log (what, instance, epoch) VALUES ('batch', NEW.instance, NEW.epoch); END;",
        false,
    )
    .expect("install the import-batch trigger");
}

/// The relay: a credential from the Admin API, enrolled and run through the Service (its
/// DNS name resolved to the Service proxy, trusting the cluster CA). Returns it and its id.
async fn start_relay(env: &mut Env, api: &AdminApi) -> (RelayProcess, String) {
    let created = api
        .setup(
            "POST",
            "/api/relays",
            &json!({ "name": RELAY_NAME }),
            &[201],
        )
        .await;
    let relay_id = created["id"].as_str().expect("relay id").to_string();
    let relay_token = created["token"].as_str().expect("relay token").to_string();
    let relay = env
        .enroll_relay(
            &relay_id,
            &relay_token,
            &[
                ("RUST_LOG".into(), "info".into()),
                ("NO_COLOR".into(), "1".into()),
            ],
        )
        .await;
    (relay.process, relay_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seeded_fault_campaign() {
    let _serial = SERIAL.lock().await;
    init_tracing();
    let schedule = Schedule::generate(&config()).expect("the campaign's schedule");
    println!("{schedule}");
    let campaign_started = Instant::now();

    let token_dir = std::env::temp_dir().join(format!("im-chaos-campaign-{}", std::process::id()));
    std::fs::create_dir_all(&token_dir).expect("token dir");
    let token_file: PathBuf = token_dir.join("admin.token");
    std::fs::write(&token_file, TOKEN).expect("write the bootstrap token");
    // The writer's CSV connectors name this folder: the servers' only drop root.
    let drop_dir = token_dir.join("drop");
    std::fs::create_dir_all(&drop_dir).expect("drop folder");
    let generated = generate_people(PEOPLE, schedule.seed);
    let slapd = Slapd::launch(&token_dir.join("slapd"), Some(&generated.ldif))
        .await
        .expect("start slapd (apt-get install slapd)");
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
        data_tmpfs: Some(DATA_TMPFS),
        ..EnvOptions::default()
    })
    .await;
    let st = env.wait_settled("the first settled state").await;
    env.wait_service_active(st.epoch, WAIT).await;
    install_commit_log(&env.db);
    install_batch_log(&env.db);

    let api = AdminApi(env.admin_client(TOKEN, REQUEST_TIMEOUT).await);

    let (relay, relay_id) = start_relay(&mut env, &api).await;
    let mut c = Campaign { env, relay, slapd };
    wait_relay_on_active(&c.env, &api, &relay_id, "before the campaign").await;

    // The LDAP connector through the relay, its bind password a stored secret; a first full
    // import, then the schedules.
    api.setup(
        "PUT",
        &format!("/api/secrets/{BIND_SECRET}"),
        &json!({ "value": ROOT_PASSWORD }),
        &[200],
    )
    .await;
    let mut ldap_config = serde_json::to_value(c.slapd.ldap_config()).expect("ldap config");
    ldap_config["bind_password_ref"] = json!(BIND_SECRET);
    // Several pages per run, so an interrupted run has committed some and not others.
    ldap_config["page_size"] = json!(10);
    let created = api
        .setup(
            "POST",
            "/api/connectors",
            &json!({"name": LDAP_CONNECTOR, "kind": "ldap", "config": ldap_config,
                    "rules": ldap_rules(), "relay_id": relay_id}),
            &[201],
        )
        .await;
    let ldap_id = created["id"].as_str().expect("connector id").to_string();
    let first = run_import(&api, &ldap_id, "full").await;
    assert_eq!(
        first.status,
        "succeeded",
        "the first full import through the relay: {first:?}\nrelay log:\n{}",
        std::fs::read_to_string(c.env.dir.join(format!("{relay_id}.log"))).unwrap_or_default()
    );
    for (mode, every) in [("delta", "10s"), ("full", "30s")] {
        api.setup(
            "POST",
            "/api/schedules",
            &json!({"connector_id": ldap_id, "kind": "interval", "spec": every, "mode": mode}),
            &[201],
        )
        .await;
    }

    let rec = Recorder::new();
    let stop = Arc::new(AtomicBool::new(false));
    let stop_directory = Arc::new(AtomicBool::new(false));
    let watch = tokio::spawn(watch_endpoints(
        c.env.cluster.client(),
        c.env.ns.clone(),
        rec.clone(),
    ));
    let roles = tokio::spawn(poll_roles(
        c.env.pods.clone(),
        api.sni.clone(),
        api.ca.clone(),
        rec.clone(),
        stop.clone(),
    ));
    let relay_poll = tokio::spawn(poll_relay(
        api.clone(),
        relay_id.clone(),
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
    let writes = tokio::spawn(write_loop(writer, ids.clone(), stop.clone()));
    let target = Target {
        url: c.slapd.ldap_url(),
        bind_dn: ROOT_DN.into(),
        password: ROOT_PASSWORD.into(),
        people_base: PEOPLE_BASE.into(),
    };
    let dir_writer = directory::Writer::new(target.clone(), rec.clone(), schedule.seed);
    let dir_writes = tokio::spawn(dir_writer.run(stop_directory.clone()));
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
    let schedule_started = Instant::now();
    run_schedule(&mut c, &schedule, &rec).await;
    rec.record(Event::Phase {
        name: "healed".into(),
    });
    let schedule_took = schedule_started.elapsed();
    let st = c.env.wait_settled("settled after the campaign").await;
    c.env.wait_service_active(st.epoch, WAIT).await;
    rec.record(Event::Phase {
        name: "settled".into(),
    });
    // The directory stops changing; the relay must be back on the active.
    stop_directory.store(true, Ordering::SeqCst);
    let dir_counts = dir_writes.await.expect("directory writer task");
    rec.record(Event::Phase {
        name: "directory writer stopped".into(),
    });
    wait_relay_on_active(&c.env, &api, &relay_id, "after the campaign").await;
    // Let the pollers see the settled state, then stop the clients.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    let lost_schedules = writes.await.expect("writer task");
    roles.await.expect("role poller task");
    relay_poll.await.expect("relay poller task");
    watch.abort();

    // A final delta import (it resumes from the last committed watermark, so it must bring
    // every change), then the final full import, then the final state.
    let delta_import = run_import(&api, &ldap_id, "delta").await;
    let after_delta = DeltaState {
        import: delta_import,
        connector_space: connector_space(&c.env.db, &ldap_id),
    };
    let final_import = run_import(&api, &ldap_id, "full").await;
    println!(
        "final full import {}: {} ({})",
        final_import.run, final_import.status, final_import.detail
    );
    let people_type = ObjectType {
        base: PEOPLE_BASE.into(),
        one_level: false,
        filter: "(objectClass=inetOrgPerson)".into(),
    };
    let groups_type = ObjectType {
        base: GROUPS_BASE.into(),
        one_level: true,
        filter: "(objectClass=groupOfNames)".into(),
    };
    let people = directory::read(&target, &[people_type], COMPARED)
        .await
        .expect("read the people from slapd");
    let groups = directory::read(&target, &[groups_type], COMPARED)
        .await
        .expect("read the groups from slapd");
    let space = connector_space(&c.env.db, &ldap_id);
    let (identities_per_person, orphan_identities) = identities(&c.env.db, &ldap_id, &people);
    let objects = people.len() + groups.len();
    rec.record(Event::FinalState(Box::new(FinalState {
        directory: people.into_iter().chain(groups).collect(),
        connector_space: space,
        identities_per_person,
        orphan_identities,
        final_import: Some(final_import),
        after_delta: Some(after_delta),
    })));

    // Read back every write: connectors and schedules through the Service, secrets from the
    // database, opened with the key ring.
    let list = read_retrying(&c.env, &api, "/api/connectors").await;
    let mut records: Vec<Record> = list
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["name"].as_str().is_some_and(|n| n.starts_with("chaos-")))
        .filter(|c| c["kind"] == "csv")
        .map(|c| Record {
            key: format!("connector:{}", c["name"].as_str().unwrap_or_default()),
            value: c["config"]["object_type"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        })
        .collect();
    let chaos_ids: BTreeSet<&str> = ids.iter().map(|(_, id)| id.as_str()).collect();
    let schedules = read_retrying(&c.env, &api, "/api/schedules").await;
    records.extend(
        schedules
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| {
                s["connector_id"]
                    .as_str()
                    .is_some_and(|id| chaos_ids.contains(id))
            })
            .map(|s| {
                let spec = s["spec"].as_str().unwrap_or_default().to_string();
                Record {
                    key: format!("schedule:{spec}"),
                    value: spec,
                }
            }),
    );
    records.extend(read_back_secrets(&c.env).await);
    rec.record(Event::ReadBack { records });

    // The commit log as fence rows: promotions, engine ticks, active heartbeats and import
    // batches, in commit order.
    let journal = fence_journal(&c.env.db);
    for cm in commit_log(&c.env.db) {
        let kind = match (cm.what.as_str(), cm.role.as_str()) {
            ("promote", _) => "promote",
            ("tick", _) => "tick",
            ("batch", _) => "batch",
            ("heartbeat", "active") => "active-heartbeat",
            _ => continue,
        };
        rec.record(Event::Fence(FenceRow {
            seq: cm.seq,
            kind: kind.into(),
            epoch: cm.epoch,
            instance: cm.instance,
            at: 0,
        }));
    }
    let runs = sqlite_json(
        &c.env.db,
        &format!(
            "SELECT run_mode AS mode, trigger_kind AS trigger, status, count(*) AS n FROM runs \
             WHERE connector_id = '{ldap_id}' GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
        ),
    );
    let scheduled_full = runs
        .iter()
        .filter(|r| r["trigger"] == "schedule" && r["mode"] == "full" && r["status"] == "succeeded")
        .filter_map(|r| r["n"].as_u64())
        .sum::<u64>();
    let runs: Vec<String> = runs
        .iter()
        .map(|r| {
            format!(
                "{} {} {} {}",
                r["trigger"].as_str().unwrap_or("?"),
                r["mode"].as_str().unwrap_or("?"),
                r["status"].as_str().unwrap_or("?"),
                r["n"]
            )
        })
        .collect();

    let history = rec.history();
    let history_path = c.env.dir.join("history.jsonl");
    history
        .write_json_lines(&history_path)
        .expect("write the history");
    let cfg = CheckerConfig {
        recovery_bound: RECOVERY_BOUND,
        ..CheckerConfig::default()
    };
    let verdict = check_all(&history, &cfg);
    let report = Report::new(&schedule, &verdict);
    println!("{report}");
    println!(
        "directory changes: {} acknowledged ({:?}), {} failed, {} re-reads; {objects} entries at the end",
        dir_counts.total_ok(),
        dir_counts.ok,
        dir_counts.failed,
        dir_counts.resyncs
    );
    println!("imports of {LDAP_CONNECTOR}: {}", runs.join(", "));
    println!(
        "fence_journal: {} promotion(s), {} batch(es); history: {} entries; schedule {:.0}s, whole test {:.0}s",
        journal.iter().filter(|(k, _)| k == "promote").count(),
        journal.iter().filter(|(k, _)| k == "batch").count(),
        history.entries.len(),
        schedule_took.as_secs_f64(),
        campaign_started.elapsed().as_secs_f64()
    );
    let injected = history
        .entries
        .iter()
        .filter(|e| matches!(e.event, Event::FaultInjected { .. }))
        .count();
    // The workload itself must have happened: every fault, acknowledged writes, directory
    // changes, and scheduled full imports (periodic, interrupted by the faults).
    if !report.passed()
        || injected != schedule.faults.len()
        || verdict.acknowledged_writes == 0
        || dir_counts.total_ok() == 0
        || scheduled_full == 0
        || !lost_schedules.is_empty()
    {
        c.env.fail(&format!(
            "{}\n{injected} of {} faults injected, {} writes acknowledged, {} directory changes, \
             {scheduled_full} scheduled full imports succeeded, acknowledged schedules gone \
             before their delete: {lost_schedules:?}; history in {}",
            report.failure_text(&schedule),
            schedule.faults.len(),
            verdict.acknowledged_writes,
            dir_counts.total_ok(),
            history_path.display()
        ));
    }
    drop(c);
    let _ = std::fs::remove_dir_all(&token_dir);
}
