//! Runs one pod as real local processes, the way a kubelet runs containers.
//!
//! - image → local binary through the test's map (keyed by image repository, tag stripped);
//!   a container's `command[0]` names an executable inside the image, so it is replaced by that
//!   binary and the rest of `command` plus `args` become its arguments;
//! - volumes (secret, configMap, projected incl. service-account token, downwardAPI, emptyDir;
//!   anything else becomes an empty directory) are files in a per-pod directory, re-materialised
//!   every few seconds so rotated secrets reach the process;
//! - each volume mountPath (Linux or Windows form) maps to its local directory, and references
//!   to it in env values, command, args and workingDir are rewritten;
//! - processes run in the node's network namespace; probes drive readiness and restarts.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, HostIP, ObjectFieldSelector, Pod, PodCondition, PodIP,
    PodStatus, Probe as ProbeSpec, Secret, ServiceAccount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::Api;
use tokio::process::Child;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::netns::NodeNet;
use crate::probe::{self, Probe};
use crate::process::{self, ProcessTable, Spec};

/// Shared by all pods of a harness.
pub struct RuntimeCtx {
    pub client: kube::Client,
    pub run_dir: PathBuf,
    /// Image repository (e.g. `test/http`, `registry.local/identitymesh/server`) → binary.
    pub images: HashMap<String, PathBuf>,
    pub table: ProcessTable,
    pub registry: PodRegistry,
    /// Port on which each node's host-side address forwards to the apiserver; pods get it as
    /// KUBERNETES_SERVICE_HOST/PORT, with their node's host address as host.
    pub apiserver_port: u16,
    /// Set when the harness is torn down: runners stop touching processes and the API.
    pub shutdown: Arc<AtomicBool>,
}

impl RuntimeCtx {
    pub fn is_shut_down(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }
}

/// One node, as its pods see it.
#[derive(Clone)]
pub struct NodeCtx {
    pub name: String,
    pub net: NodeNet,
    /// False while the node's heartbeats are stopped: the "kubelet" then writes nothing.
    pub connected: Arc<AtomicBool>,
}

impl NodeCtx {
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }
}

/// What is known about one container's process.
#[derive(Debug, Clone, Default)]
pub struct ContainerRun {
    pub name: String,
    pub image: String,
    pub pid: Option<u32>,
    pub running_since: Option<Timestamp>,
    pub restart_count: i32,
    pub last_exit: Option<Exit>,
    pub ready: bool,
    pub waiting: Option<(String, String)>,
    /// Exited and will not be restarted (restartPolicy).
    pub done: bool,
}

#[derive(Debug, Clone)]
pub struct Exit {
    pub code: i32,
    pub reason: String,
    pub started: Option<Timestamp>,
    pub finished: Timestamp,
}

/// A running pod as the harness sees it (for fault injection and assertions).
pub struct PodShared {
    pub uid: String,
    pub dir: PathBuf,
    pub containers: Mutex<Vec<ContainerRun>>,
}

impl PodShared {
    pub fn pids(&self) -> Vec<u32> {
        lock(&self.containers)
            .iter()
            .filter_map(|c| c.pid)
            .collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

type PodMap = HashMap<(String, String), Arc<PodShared>>;

/// (namespace, pod name) → the pod's runtime state.
#[derive(Clone, Default)]
pub struct PodRegistry(Arc<Mutex<PodMap>>);

impl PodRegistry {
    pub fn get(&self, ns: &str, name: &str) -> Option<Arc<PodShared>> {
        lock(&self.0)
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
    }
    fn insert(&self, ns: &str, name: &str, shared: Arc<PodShared>) {
        lock(&self.0).insert((ns.to_string(), name.to_string()), shared);
    }
    fn remove(&self, ns: &str, name: &str, uid: &str) {
        let mut map = lock(&self.0);
        let key = (ns.to_string(), name.to_string());
        if map.get(&key).is_some_and(|p| p.uid == uid) {
            map.remove(&key);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    No,
    /// Graceful deletion: SIGTERM, wait this long, SIGKILL, then delete the pod object.
    Graceful(Duration),
    /// The object is gone (force deletion): kill at once, touch nothing in the API.
    Now,
}

/// Handle of a running pod; dropping it does not stop the pod (use the methods).
pub struct PodRunner {
    pub uid: String,
    stop: watch::Sender<Stop>,
    task: JoinHandle<()>,
}

impl PodRunner {
    pub fn start(ctx: Arc<RuntimeCtx>, node: NodeCtx, pod: Arc<Pod>) -> PodRunner {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let short: String = uid.chars().take(8).collect();
        let dir = ctx
            .run_dir
            .join("pods")
            .join(format!("{ns}_{name}_{short}"));
        let containers = pod
            .spec
            .as_ref()
            .map(|s| {
                s.containers
                    .iter()
                    .map(|c| ContainerRun {
                        name: c.name.clone(),
                        image: c.image.clone().unwrap_or_default(),
                        waiting: Some(("ContainerCreating".into(), String::new())),
                        ..Default::default()
                    })
                    .collect()
            })
            .unwrap_or_default();
        let shared = Arc::new(PodShared {
            uid: uid.clone(),
            dir,
            containers: Mutex::new(containers),
        });
        ctx.registry.insert(&ns, &name, shared.clone());
        let (stop, stop_rx) = watch::channel(Stop::No);
        let task = tokio::spawn(run_pod(ctx, node, pod, shared, stop_rx));
        PodRunner { uid, stop, task }
    }

    /// Starts graceful termination (idempotent; a shorter grace overrides a longer one).
    pub fn terminate(&self, grace: Duration) {
        self.stop.send_if_modified(|s| match *s {
            Stop::No => {
                *s = Stop::Graceful(grace);
                true
            }
            Stop::Graceful(g) if grace < g => {
                *s = Stop::Graceful(grace);
                true
            }
            _ => false,
        });
    }

    pub fn kill_now(&self) {
        self.stop.send_if_modified(|s| {
            if *s == Stop::Now {
                false
            } else {
                *s = Stop::Now;
                true
            }
        });
    }

    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

async fn wait_stop(rx: &mut watch::Receiver<Stop>) -> Stop {
    loop {
        let s = *rx.borrow_and_update();
        if s != Stop::No {
            return s;
        }
        if rx.changed().await.is_err() {
            // The handle is gone: the harness is shutting down; its teardown kills by pid.
            return Stop::Now;
        }
    }
}

fn pod_ns_name(pod: &Pod) -> (String, String) {
    (
        pod.metadata.namespace.clone().unwrap_or_default(),
        pod.metadata.name.clone().unwrap_or_default(),
    )
}

async fn run_pod(
    ctx: Arc<RuntimeCtx>,
    node: NodeCtx,
    pod: Arc<Pod>,
    shared: Arc<PodShared>,
    mut stop_rx: watch::Receiver<Stop>,
) {
    let (ns, name) = pod_ns_name(&pod);
    let start_time = Timestamp::now();
    let mut status = StatusWriter::new(ctx.clone(), node.clone(), pod.clone(), start_time);

    // Volumes first; a missing secret keeps the pod in ContainerCreating, as on a kubelet.
    let volumes = loop {
        match materialise_volumes(&ctx, &node, &pod, &shared.dir).await {
            Ok(v) => break Some(v),
            Err(msg) => {
                for c in lock(&shared.containers).iter_mut() {
                    c.waiting = Some(("ContainerCreating".into(), msg.clone()));
                }
                status.write(&shared, false).await;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = wait_stop(&mut stop_rx) => break None,
                }
            }
        }
    };

    let mut container_tasks = Vec::new();
    let mut probe_tasks = Vec::new();
    if let Some(volumes) = &volumes {
        let containers = pod
            .spec
            .as_ref()
            .map(|s| s.containers.clone())
            .unwrap_or_default();
        for (idx, c) in containers.into_iter().enumerate() {
            let mounts = container_mounts(&c, volumes);
            container_tasks.push(tokio::spawn(run_container(
                ctx.clone(),
                node.clone(),
                pod.clone(),
                idx,
                c.clone(),
                mounts,
                shared.clone(),
                stop_rx.clone(),
            )));
            probe_tasks.push(tokio::spawn(run_probes(
                node.clone(),
                pod.clone(),
                idx,
                c,
                shared.clone(),
            )));
        }
        // Main loop: refresh mounted secrets/config maps and publish status.
        let mut last_refresh = Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = wait_stop(&mut stop_rx) => break,
            }
            if node.is_connected() && last_refresh.elapsed() > Duration::from_secs(2) {
                last_refresh = Instant::now();
                if let Err(e) = materialise_volumes(&ctx, &node, &pod, &shared.dir).await {
                    tracing::debug!(pod = %name, "volume refresh: {e}");
                }
            }
            status.write(&shared, true).await;
        }
    }

    let stop = wait_stop(&mut stop_rx).await;
    for t in probe_tasks {
        t.abort();
    }
    for t in container_tasks {
        let _ = t.await;
    }
    if let Stop::Graceful(_) = stop {
        // Finalize as kubelet does: delete with grace 0, only this incarnation (uid).
        let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(shared.uid.clone()),
                resource_version: None,
            }),
            ..Default::default()
        };
        for _ in 0..600 {
            if ctx.is_shut_down() {
                break;
            }
            if !node.is_connected() {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            match api.delete(&name, &dp).await {
                Ok(_) => break,
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => break,
                Err(e) => {
                    tracing::warn!(pod = %name, "finalizing delete: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
    ctx.registry.remove(&ns, &name, &shared.uid);
}

fn exit_of(status: std::process::ExitStatus) -> (i32, String) {
    match (status.code(), status.signal()) {
        (Some(0), _) => (0, "Completed".into()),
        (Some(c), _) => (c, "Error".into()),
        (None, Some(sig)) => (128 + sig, "Error".into()),
        (None, None) => (255, "Error".into()),
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_container(
    ctx: Arc<RuntimeCtx>,
    node: NodeCtx,
    pod: Arc<Pod>,
    idx: usize,
    spec: Container,
    mounts: Vec<(String, PathBuf)>,
    shared: Arc<PodShared>,
    mut stop_rx: watch::Receiver<Stop>,
) {
    let policy = pod
        .spec
        .as_ref()
        .and_then(|s| s.restart_policy.clone())
        .unwrap_or_else(|| "Always".into());
    let (ns, pod_name) = pod_ns_name(&pod);
    let log = shared.dir.join(format!("{}.log", spec.name));
    let mut backoff = Duration::from_secs(1);
    let set = |f: &dyn Fn(&mut ContainerRun)| {
        if let Some(c) = lock(&shared.containers).get_mut(idx) {
            f(c);
        }
    };
    loop {
        if *stop_rx.borrow() != Stop::No || ctx.is_shut_down() {
            return;
        }
        let launch = match build_launch(&ctx, &node, &pod, &spec, &mounts, &shared.dir).await {
            Ok(l) => l,
            Err((reason, msg)) => {
                set(&|c| c.waiting = Some((reason.clone(), msg.clone())));
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = wait_stop(&mut stop_rx) => return,
                }
            }
        };
        let spawned = process::spawn(
            &ctx.table,
            Spec {
                program: &launch.program,
                args: &launch.args,
                env: Some(&launch.env),
                cwd: Some(&launch.cwd),
                log: &log,
                netns: Some(&node.net.netns_path()),
            },
        );
        let (pid, mut child): (u32, Child) = match spawned {
            Ok(x) => x,
            Err(e) => {
                let msg = e.to_string();
                set(&|c| c.waiting = Some(("RunContainerError".into(), msg.clone())));
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => continue,
                    _ = wait_stop(&mut stop_rx) => return,
                }
            }
        };
        tracing::info!(pod = %format!("{ns}/{pod_name}"), container = %spec.name, pid, "started");
        let started = Timestamp::now();
        let started_at = Instant::now();
        set(&|c| {
            c.pid = Some(pid);
            c.running_since = Some(started);
            c.waiting = None;
            c.ready = false;
        });
        let exit = tokio::select! {
            s = child.wait() => s,
            stop = wait_stop(&mut stop_rx) => {
                match stop {
                    Stop::Graceful(grace) => {
                        process::signal(pid, libc::SIGTERM);
                        match tokio::time::timeout(grace, child.wait()).await {
                            Ok(s) => s,
                            Err(_) => {
                                process::signal(pid, libc::SIGKILL);
                                child.wait().await
                            }
                        }
                    }
                    _ => {
                        process::signal(pid, libc::SIGKILL);
                        child.wait().await
                    }
                }
            }
        };
        ctx.table.remove(pid);
        let (code, reason) = match exit {
            Ok(s) => exit_of(s),
            Err(_) => (255, "Error".into()),
        };
        tracing::info!(pod = %format!("{ns}/{pod_name}"), container = %spec.name, pid, code, "exited");
        let restart = *stop_rx.borrow() == Stop::No
            && match policy.as_str() {
                "Never" => false,
                "OnFailure" => code != 0,
                _ => true,
            };
        let finished = Timestamp::now();
        set(&|c| {
            c.pid = None;
            c.ready = false;
            c.last_exit = Some(Exit {
                code,
                reason: reason.clone(),
                started: c.running_since,
                finished,
            });
            c.running_since = None;
            c.done = !restart;
        });
        if !restart {
            let _ = wait_stop(&mut stop_rx).await;
            return;
        }
        if started_at.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_secs(1);
        }
        set(&|c| {
            c.restart_count += 1;
            c.waiting = Some((
                "CrashLoopBackOff".into(),
                format!(
                    "back-off {}s restarting failed container",
                    backoff.as_secs()
                ),
            ));
        });
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = wait_stop(&mut stop_rx) => return,
        }
        // Short cap (kubelet's is 5 min) so tests see restarts quickly.
        backoff = (backoff * 2).min(Duration::from_secs(8));
    }
}

struct ProbeState {
    spec: ProbeSpec,
    probe: Probe,
    successes: i32,
    failures: i32,
    next: Instant,
}

fn resolve_port(port: &IntOrString, c: &Container) -> Option<u16> {
    match port {
        IntOrString::Int(p) => u16::try_from(*p).ok(),
        IntOrString::String(name) => c
            .ports
            .as_ref()?
            .iter()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

fn probe_of(spec: &ProbeSpec, c: &Container, pod_ip: IpAddr) -> Probe {
    if let Some(h) = &spec.http_get {
        let Some(port) = resolve_port(&h.port, c) else {
            return Probe::Unsupported(format!("unknown probe port {:?}", h.port));
        };
        let ip = h
            .host
            .as_deref()
            .and_then(|h| h.parse().ok())
            .unwrap_or(pod_ip);
        return Probe::Http {
            addr: SocketAddr::new(ip, port),
            https: h.scheme.as_deref() == Some("HTTPS"),
            path: h.path.clone().unwrap_or_else(|| "/".into()),
            headers: h
                .http_headers
                .iter()
                .flatten()
                .map(|h| (h.name.clone(), h.value.clone()))
                .collect(),
        };
    }
    if let Some(t) = &spec.tcp_socket {
        return match resolve_port(&t.port, c) {
            Some(port) => Probe::Tcp {
                addr: SocketAddr::new(pod_ip, port),
            },
            None => Probe::Unsupported(format!("unknown probe port {:?}", t.port)),
        };
    }
    Probe::Unsupported("the harness runs only httpGet and tcpSocket probes".into())
}

/// Readiness and liveness probes of one container; liveness failures kill the process (the
/// container loop then restarts it per restartPolicy).
async fn run_probes(
    node: NodeCtx,
    pod: Arc<Pod>,
    idx: usize,
    c: Container,
    shared: Arc<PodShared>,
) {
    let pod_ip = IpAddr::V4(node.net.node_ip);
    let netns = node.net.netns_path();
    let mk = |s: &Option<ProbeSpec>| {
        s.as_ref().map(|s| ProbeState {
            probe: probe_of(s, &c, pod_ip),
            spec: s.clone(),
            successes: 0,
            failures: 0,
            next: Instant::now(),
        })
    };
    let mut readiness = mk(&c.readiness_probe);
    let mut liveness = mk(&c.liveness_probe);
    let mut current_pid: Option<u32> = None;
    let name = pod.metadata.name.clone().unwrap_or_default();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (pid, since) = {
            let g = lock(&shared.containers);
            match g.get(idx) {
                Some(c) => (c.pid, c.running_since),
                None => return,
            }
        };
        if pid != current_pid {
            // New process incarnation: probes start over with their initial delay.
            current_pid = pid;
            let started = Instant::now();
            for p in [&mut readiness, &mut liveness].into_iter().flatten() {
                p.successes = 0;
                p.failures = 0;
                p.next = started
                    + Duration::from_secs(p.spec.initial_delay_seconds.unwrap_or(0).max(0) as u64);
            }
            if readiness.is_none() {
                let ready = pid.is_some();
                if let Some(c) = lock(&shared.containers).get_mut(idx) {
                    c.ready = ready;
                }
            }
        }
        let Some(pid) = pid else { continue };
        let _ = since;
        let now = Instant::now();
        for (is_liveness, p) in [(false, &mut readiness), (true, &mut liveness)] {
            let Some(p) = p else { continue };
            if now < p.next {
                continue;
            }
            let period = p.spec.period_seconds.unwrap_or(10).max(1) as u64;
            p.next = now + Duration::from_secs(period);
            let timeout = Duration::from_secs(p.spec.timeout_seconds.unwrap_or(1).max(1) as u64);
            let result = probe::run(&netns, &p.probe, timeout).await;
            match result {
                Ok(()) => {
                    p.successes += 1;
                    p.failures = 0;
                }
                Err(why) => {
                    tracing::debug!(pod = %name, container = %c.name, liveness = is_liveness, "probe failed: {why}");
                    p.failures += 1;
                    p.successes = 0;
                }
            }
            let success_threshold = p.spec.success_threshold.unwrap_or(1).max(1);
            let failure_threshold = p.spec.failure_threshold.unwrap_or(3).max(1);
            if is_liveness {
                if p.failures >= failure_threshold {
                    tracing::info!(pod = %name, container = %c.name, pid, "liveness probe failed; killing");
                    process::signal(pid, libc::SIGKILL);
                    p.failures = 0;
                }
            } else {
                let mut g = lock(&shared.containers);
                if let Some(cs) = g.get_mut(idx) {
                    if cs.pid == Some(pid) {
                        if p.successes >= success_threshold {
                            cs.ready = true;
                        } else if p.failures >= failure_threshold {
                            cs.ready = false;
                        }
                    }
                }
            }
        }
    }
}

/// How often the status is written even when nothing changed, as kubelet's status manager
/// resyncs: someone else (the node-lifecycle controller marking pods NotReady after a missed
/// heartbeat, possibly just after ours resumed) may have overwritten it.
const STATUS_RESYNC: Duration = Duration::from_secs(10);

/// Publishes pod status when it changes (and only while the node is connected).
struct StatusWriter {
    ctx: Arc<RuntimeCtx>,
    node: NodeCtx,
    pod: Arc<Pod>,
    start_time: Timestamp,
    last_written: Option<String>,
    last_write_at: Option<Instant>,
    was_connected: bool,
    transitions: HashMap<String, (String, Timestamp)>,
}

impl StatusWriter {
    fn new(ctx: Arc<RuntimeCtx>, node: NodeCtx, pod: Arc<Pod>, start_time: Timestamp) -> Self {
        StatusWriter {
            ctx,
            node,
            pod,
            start_time,
            last_written: None,
            last_write_at: None,
            was_connected: true,
            transitions: HashMap::new(),
        }
    }

    fn condition(&mut self, kind: &str, ok: bool) -> PodCondition {
        let status = if ok { "True" } else { "False" }.to_string();
        let entry = self
            .transitions
            .entry(kind.to_string())
            .or_insert_with(|| (status.clone(), Timestamp::now()));
        if entry.0 != status {
            *entry = (status.clone(), Timestamp::now());
        }
        PodCondition {
            type_: kind.to_string(),
            status,
            last_transition_time: Some(Time(entry.1)),
            ..Default::default()
        }
    }

    async fn write(&mut self, shared: &PodShared, volumes_ready: bool) {
        if self.ctx.is_shut_down() {
            return;
        }
        let connected = self.node.is_connected();
        if !connected {
            self.was_connected = false;
            return;
        }
        let runs = lock(&shared.containers).clone();
        let all_ready = !runs.is_empty() && runs.iter().all(|c| c.ready);
        let all_done = !runs.is_empty() && runs.iter().all(|c| c.done);
        let phase = if all_done {
            if runs
                .iter()
                .all(|c| c.last_exit.as_ref().is_some_and(|e| e.code == 0))
            {
                "Succeeded"
            } else {
                "Failed"
            }
        } else if runs
            .iter()
            .any(|c| c.pid.is_some() || c.last_exit.is_some())
        {
            "Running"
        } else {
            "Pending"
        };
        // A signature without timestamps decides whether anything changed.
        let signature = format!(
            "{phase}|{volumes_ready}|{}",
            runs.iter()
                .map(|c| format!(
                    "{}:{:?}:{}:{}:{:?}:{:?}:{}",
                    c.name,
                    c.pid,
                    c.ready,
                    c.restart_count,
                    c.waiting.as_ref().map(|w| &w.0),
                    c.last_exit.as_ref().map(|e| e.code),
                    c.done
                ))
                .collect::<Vec<_>>()
                .join(",")
        );
        // After a heartbeat pause the node controller may have rewritten our conditions.
        let forced = !self.was_connected
            || self
                .last_write_at
                .is_some_and(|t| t.elapsed() >= STATUS_RESYNC);
        if !forced && self.last_written.as_deref() == Some(signature.as_str()) {
            return;
        }
        let conditions = vec![
            self.condition("PodReadyToStartContainers", volumes_ready),
            self.condition("Initialized", true),
            self.condition("ContainersReady", all_ready),
            self.condition("Ready", all_ready),
            self.condition("PodScheduled", true),
        ];
        let container_statuses = runs.iter().map(container_status).collect();
        let node_ip = self.node.net.node_ip.to_string();
        let status = PodStatus {
            phase: Some(phase.into()),
            conditions: Some(conditions),
            container_statuses: Some(container_statuses),
            host_ip: Some(node_ip.clone()),
            host_ips: Some(vec![HostIP {
                ip: node_ip.clone(),
            }]),
            pod_ip: Some(node_ip.clone()),
            pod_ips: Some(vec![PodIP { ip: node_ip }]),
            start_time: Some(Time(self.start_time)),
            ..Default::default()
        };
        let (ns, name) = pod_ns_name(&self.pod);
        let api: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &ns);
        let patch = serde_json::json!({
            "metadata": {"uid": self.pod.metadata.uid},
            "status": status,
        });
        match api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                self.last_written = Some(signature);
                self.last_write_at = Some(Instant::now());
                self.was_connected = true;
            }
            Err(e) => tracing::debug!(pod = %name, "status update: {e}"),
        }
    }
}

fn container_status(c: &ContainerRun) -> ContainerStatus {
    let terminated = |e: &Exit| ContainerStateTerminated {
        exit_code: e.code,
        reason: Some(e.reason.clone()),
        started_at: e.started.map(Time),
        finished_at: Some(Time(e.finished)),
        ..Default::default()
    };
    let state = if let (Some(_), Some(since)) = (c.pid, c.running_since) {
        ContainerState {
            running: Some(ContainerStateRunning {
                started_at: Some(Time(since)),
            }),
            ..Default::default()
        }
    } else if let (true, Some(e)) = (c.done, &c.last_exit) {
        ContainerState {
            terminated: Some(terminated(e)),
            ..Default::default()
        }
    } else {
        let (reason, message) = c
            .waiting
            .clone()
            .unwrap_or_else(|| ("ContainerCreating".into(), String::new()));
        ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason),
                message: (!message.is_empty()).then_some(message),
            }),
            ..Default::default()
        }
    };
    let last_state = match (&c.last_exit, c.done) {
        (Some(e), false) => Some(ContainerState {
            terminated: Some(terminated(e)),
            ..Default::default()
        }),
        _ => None,
    };
    ContainerStatus {
        name: c.name.clone(),
        image: c.image.clone(),
        image_id: format!("harness://{}", c.image),
        container_id: c.pid.map(|p| format!("harness://{p}")),
        ready: c.ready,
        started: Some(c.pid.is_some()),
        restart_count: c.restart_count,
        state: Some(state),
        last_state,
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Volumes

async fn get_secret(ctx: &RuntimeCtx, ns: &str, name: &str) -> Result<Option<Secret>, String> {
    Api::<Secret>::namespaced(ctx.client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(|e| format!("get secret {ns}/{name}: {e}"))
}

async fn get_config_map(
    ctx: &RuntimeCtx,
    ns: &str,
    name: &str,
) -> Result<Option<ConfigMap>, String> {
    Api::<ConfigMap>::namespaced(ctx.client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(|e| format!("get configmap {ns}/{name}: {e}"))
}

fn secret_data(s: &Secret) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = s
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    for (k, v) in s.string_data.iter().flatten() {
        out.insert(k.clone(), v.clone().into_bytes());
    }
    out
}

fn config_map_data(c: &ConfigMap) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = c
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
        .collect();
    for (k, v) in c.binary_data.iter().flatten() {
        out.insert(k.clone(), v.0.clone());
    }
    out
}

/// Writes `data` to `path` only when different; temp file + rename so readers never see a
/// half-written file.
fn write_if_changed(path: &Path, data: &[u8], mode: u32) -> Result<(), String> {
    if std::fs::read(path).ok().as_deref() == Some(data) {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("create {}: {e}", parent.display()))?;
    }
    let tmp = path.with_extension("harness-tmp");
    std::fs::write(&tmp, data).map_err(|e| format!("write {}: {e}", tmp.display()))?;
    let _ = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode));
    std::fs::rename(&tmp, path).map_err(|e| format!("rename to {}: {e}", path.display()))
}

fn mode_of(m: Option<i32>) -> u32 {
    m.map(|m| m as u32).unwrap_or(0o644)
}

/// Writes keys (or the selected items) of a secret/config map into `dir`.
fn write_keys(
    dir: &Path,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<k8s_openapi::api::core::v1::KeyToPath>>,
    default_mode: u32,
) -> Result<(), String> {
    match items {
        Some(items) => {
            for it in items {
                let value = data
                    .get(&it.key)
                    .ok_or_else(|| format!("key {} not found", it.key))?;
                let mode = it.mode.map(|m| m as u32).unwrap_or(default_mode);
                write_if_changed(&dir.join(&it.path), value, mode)?;
            }
        }
        None => {
            for (k, v) in data {
                write_if_changed(&dir.join(k), v, default_mode)?;
            }
        }
    }
    Ok(())
}

fn field_value(pod: &Pod, node: &NodeCtx, sel: &ObjectFieldSelector) -> Result<String, String> {
    let path = sel.field_path.as_str();
    let node_ip = node.net.node_ip.to_string();
    let label = |map: &Option<BTreeMap<String, String>>, prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|r| r.strip_suffix("']"))
            .map(|k| {
                map.as_ref()
                    .and_then(|m| m.get(k))
                    .cloned()
                    .unwrap_or_default()
            })
    };
    let v = match path {
        "metadata.name" => pod.metadata.name.clone().unwrap_or_default(),
        "metadata.namespace" => pod.metadata.namespace.clone().unwrap_or_default(),
        "metadata.uid" => pod.metadata.uid.clone().unwrap_or_default(),
        "spec.nodeName" => node.name.clone(),
        "spec.serviceAccountName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.podIP" | "status.hostIP" | "status.podIPs" | "status.hostIPs" => node_ip,
        _ => {
            if let Some(v) = label(&pod.metadata.labels, "metadata.labels['") {
                v
            } else if let Some(v) = label(&pod.metadata.annotations, "metadata.annotations['") {
                v
            } else {
                return Err(format!("unsupported fieldRef {path}"));
            }
        }
    };
    Ok(v)
}

async fn service_account_token(
    ctx: &RuntimeCtx,
    pod: &Pod,
    audience: Option<String>,
    expiration: Option<i64>,
) -> Result<String, String> {
    let (ns, name) = pod_ns_name(pod);
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences: audience.into_iter().collect(),
            expiration_seconds: Some(expiration.unwrap_or(3600).max(600)),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(name),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..Default::default()
    };
    let api: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &ns);
    let resp = api
        .create_token_request(&sa, &PostParams::default(), &req)
        .await
        .map_err(|e| format!("token for serviceaccount {ns}/{sa}: {e}"))?;
    resp.status
        .map(|s| s.token)
        .ok_or_else(|| "token request returned no token".into())
}

/// Creates/refreshes every volume of the pod under `<pod dir>/volumes/<name>`.
async fn materialise_volumes(
    ctx: &RuntimeCtx,
    node: &NodeCtx,
    pod: &Pod,
    pod_dir: &Path,
) -> Result<HashMap<String, PathBuf>, String> {
    let (ns, _) = pod_ns_name(pod);
    let mut out = HashMap::new();
    let volumes = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default();
    for v in volumes {
        let dir = pod_dir.join("volumes").join(&v.name);
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        if let Some(s) = &v.secret {
            let name = s.secret_name.clone().unwrap_or_default();
            match get_secret(ctx, &ns, &name).await? {
                Some(secret) => write_keys(
                    &dir,
                    &secret_data(&secret),
                    s.items.as_ref(),
                    mode_of(s.default_mode),
                )?,
                None if s.optional == Some(true) => {}
                None => {
                    return Err(format!(
                        "MountVolume.SetUp failed for volume \"{}\": secret \"{name}\" not found",
                        v.name
                    ))
                }
            }
        } else if let Some(c) = &v.config_map {
            let name = c.name.clone();
            match get_config_map(ctx, &ns, &name).await? {
                Some(cm) => write_keys(
                    &dir,
                    &config_map_data(&cm),
                    c.items.as_ref(),
                    mode_of(c.default_mode),
                )?,
                None if c.optional == Some(true) => {}
                None => {
                    return Err(format!(
                    "MountVolume.SetUp failed for volume \"{}\": configmap \"{name}\" not found",
                    v.name
                ))
                }
            }
        } else if let Some(p) = &v.projected {
            let mode = mode_of(p.default_mode);
            for src in p.sources.iter().flatten() {
                if let Some(s) = &src.secret {
                    if let Some(secret) = get_secret(ctx, &ns, &s.name).await? {
                        write_keys(&dir, &secret_data(&secret), s.items.as_ref(), mode)?;
                    } else if s.optional != Some(true) {
                        return Err(format!("secret \"{}\" not found", s.name));
                    }
                }
                if let Some(c) = &src.config_map {
                    if let Some(cm) = get_config_map(ctx, &ns, &c.name).await? {
                        write_keys(&dir, &config_map_data(&cm), c.items.as_ref(), mode)?;
                    } else if c.optional != Some(true) {
                        return Err(format!("configmap \"{}\" not found", c.name));
                    }
                }
                if let Some(d) = &src.downward_api {
                    for it in d.items.iter().flatten() {
                        if let Some(f) = &it.field_ref {
                            let value = field_value(pod, node, f)?;
                            write_if_changed(&dir.join(&it.path), value.as_bytes(), mode)?;
                        }
                    }
                }
                if let Some(t) = &src.service_account_token {
                    let path = dir.join(&t.path);
                    // Requested once per pod: tokens are valid far longer than a test runs.
                    if !path.exists() {
                        let token = service_account_token(
                            ctx,
                            pod,
                            t.audience.clone(),
                            t.expiration_seconds,
                        )
                        .await?;
                        write_if_changed(&path, token.as_bytes(), mode)?;
                    }
                }
            }
        } else if let Some(d) = &v.downward_api {
            for it in d.items.iter().flatten() {
                if let Some(f) = &it.field_ref {
                    let value = field_value(pod, node, f)?;
                    write_if_changed(&dir.join(&it.path), value.as_bytes(), 0o644)?;
                }
            }
        }
        // emptyDir, hostPath, PVCs, ...: a plain per-pod directory.
        out.insert(v.name.clone(), dir);
    }
    Ok(out)
}

/// mountPath → local path for one container, longest mountPath first.
fn container_mounts(c: &Container, volumes: &HashMap<String, PathBuf>) -> Vec<(String, PathBuf)> {
    let mut mounts: Vec<(String, PathBuf)> = c
        .volume_mounts
        .iter()
        .flatten()
        .filter_map(|m| {
            let base = volumes.get(&m.name)?;
            let local = match m.sub_path.as_deref() {
                Some(sub) if !sub.is_empty() => base.join(sub),
                _ => base.clone(),
            };
            Some((m.mount_path.clone(), local))
        })
        .collect();
    mounts.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
    mounts
}

fn is_windows_path(p: &str) -> bool {
    let b = p.as_bytes();
    p.contains('\\') || (b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':')
}

/// Canonical form of a mount path for matching: Windows paths lower-cased with `/`
/// separators, trailing separators dropped.
fn canonical_mount(p: &str) -> (String, bool) {
    let win = is_windows_path(p);
    let mut s = if win {
        p.replace('\\', "/").to_ascii_lowercase()
    } else {
        p.to_string()
    };
    while s.len() > 1 && s.ends_with('/') {
        s.pop();
    }
    (s, win)
}

/// Rewrites references to mount paths in `s`: the mount path becomes the local directory and
/// the rest of that path (up to whitespace, a quote, `;` or `,`) gets `/` separators.
/// An environment value: a `;`-separated list of Windows paths (a Windows PATH-style list, as
/// `IM_CONNECTORS__CSV_ROOTS` is for a Windows pod) becomes a `:`-separated list of local paths,
/// since the process reading it runs on Linux here; anything else as [`rewrite_paths`].
pub fn rewrite_env_value(v: &str, mounts: &[(String, PathBuf)]) -> String {
    let is_windows_path = |p: &str| {
        let b = p.as_bytes();
        b.len() >= 3 && b[0].is_ascii_alphabetic() && b[1] == b':' && matches!(b[2], b'\\' | b'/')
    };
    if v.contains(';') && v.split(';').all(is_windows_path) {
        return v
            .split(';')
            .map(|p| rewrite_paths(p, mounts))
            .collect::<Vec<_>>()
            .join(":");
    }
    rewrite_paths(v, mounts)
}

pub fn rewrite_paths(s: &str, mounts: &[(String, PathBuf)]) -> String {
    let canon: Vec<(String, bool, String)> = mounts
        .iter()
        .map(|(m, local)| {
            let (c, win) = canonical_mount(m);
            (c, win, local.display().to_string())
        })
        .collect();
    let bytes = s.as_bytes();
    let mut out: Vec<u8> = Vec::with_capacity(s.len());
    let mut i = 0;
    'outer: while i < bytes.len() {
        for (m, win, local) in &canon {
            let mb = m.as_bytes();
            if i + mb.len() > bytes.len() {
                continue;
            }
            let matches = bytes[i..i + mb.len()].iter().zip(mb).all(|(a, b)| {
                if *win {
                    let a = if *a == b'\\' {
                        b'/'
                    } else {
                        a.to_ascii_lowercase()
                    };
                    a == *b
                } else {
                    a == b
                }
            });
            let end = i + mb.len();
            let boundary = end == bytes.len()
                || matches!(bytes[end], b'/' | b'\\')
                || is_delimiter(bytes[end]);
            if matches && boundary {
                out.extend_from_slice(local.as_bytes());
                let mut j = end;
                while j < bytes.len() && !is_delimiter(bytes[j]) {
                    out.push(if bytes[j] == b'\\' { b'/' } else { bytes[j] });
                    j += 1;
                }
                i = j;
                continue 'outer;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap_or_else(|_| s.to_string())
}

fn is_delimiter(b: u8) -> bool {
    b.is_ascii_whitespace() || matches!(b, b'"' | b'\'' | b';' | b',')
}

/// Kubernetes `$(VAR)` expansion: known names are replaced, `$$` escapes, others stay.
pub fn expand(s: &str, vars: &HashMap<String, String>) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        if let Some(t) = tail.strip_prefix("$$") {
            out.push('$');
            rest = t;
        } else if let Some(t) = tail.strip_prefix("$(") {
            match t.find(')') {
                Some(end) if vars.contains_key(&t[..end]) => {
                    out.push_str(&vars[&t[..end]]);
                    rest = &t[end + 1..];
                }
                _ => {
                    out.push_str("$(");
                    rest = t;
                }
            }
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// Image reference → repository (tag and digest stripped).
pub fn image_repository(image: &str) -> &str {
    let no_digest = image.split('@').next().unwrap_or(image);
    match no_digest.rfind(':') {
        Some(colon) if !no_digest[colon..].contains('/') => &no_digest[..colon],
        _ => no_digest,
    }
}

struct Launch {
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    cwd: PathBuf,
}

async fn build_launch(
    ctx: &RuntimeCtx,
    node: &NodeCtx,
    pod: &Pod,
    c: &Container,
    mounts: &[(String, PathBuf)],
    pod_dir: &Path,
) -> Result<Launch, (String, String)> {
    let (ns, name) = pod_ns_name(pod);
    let image = c.image.clone().unwrap_or_default();
    let repo = image_repository(&image);
    let program = ctx.images.get(repo).cloned().ok_or_else(|| {
        (
            "ErrImagePull".to_string(),
            format!("the harness has no local binary for image repository {repo:?} (pass it in ClusterOptions::images)"),
        )
    })?;
    let config_err = |m: String| ("CreateContainerConfigError".to_string(), m);

    // Order as kubelet: envFrom, then env (later wins); $(VAR) sees earlier values.
    let mut env: Vec<(String, String)> = vec![
        (
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ),
        ("HOSTNAME".into(), name.clone()),
        ("HOME".into(), pod_dir.display().to_string()),
        (
            "KUBERNETES_SERVICE_HOST".into(),
            node.net.host_ip.to_string(),
        ),
        (
            "KUBERNETES_SERVICE_PORT".into(),
            ctx.apiserver_port.to_string(),
        ),
        // Every node of this harness is a namespace on one host with one filesystem, so the
        // tests' shared SQLite file is safe; a real cluster needs SQL Server (the server refuses
        // sqlite:// in managed mode without this).
        ("IM_DATABASE__SQLITE_SINGLE_HOST".into(), "true".into()),
    ];
    if let Ok(v) = std::env::var("RUST_LOG") {
        env.push(("RUST_LOG".into(), v));
    }
    let set = |env: &mut Vec<(String, String)>, k: String, v: String| {
        env.retain(|(ek, _)| *ek != k);
        env.push((k, v));
    };
    for from in c.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        if let Some(r) = &from.secret_ref {
            match get_secret(ctx, &ns, &r.name).await.map_err(config_err)? {
                Some(s) => {
                    for (k, v) in secret_data(&s) {
                        set(
                            &mut env,
                            format!("{prefix}{k}"),
                            String::from_utf8_lossy(&v).into(),
                        );
                    }
                }
                None if r.optional == Some(true) => {}
                None => return Err(config_err(format!("secret \"{}\" not found", r.name))),
            }
        }
        if let Some(r) = &from.config_map_ref {
            match get_config_map(ctx, &ns, &r.name)
                .await
                .map_err(config_err)?
            {
                Some(cm) => {
                    for (k, v) in config_map_data(&cm) {
                        set(
                            &mut env,
                            format!("{prefix}{k}"),
                            String::from_utf8_lossy(&v).into(),
                        );
                    }
                }
                None if r.optional == Some(true) => {}
                None => return Err(config_err(format!("configmap \"{}\" not found", r.name))),
            }
        }
    }
    for e in c.env.iter().flatten() {
        let value = if let Some(v) = &e.value {
            expand(v, &vars_snapshot(&env))
        } else if let Some(from) = &e.value_from {
            if let Some(r) = &from.secret_key_ref {
                let secret = get_secret(ctx, &ns, &r.name).await.map_err(config_err)?;
                match secret
                    .as_ref()
                    .and_then(|s| secret_data(s).get(&r.key).cloned())
                {
                    Some(v) => String::from_utf8_lossy(&v).into_owned(),
                    None if r.optional == Some(true) => continue,
                    None => {
                        return Err(config_err(format!(
                            "couldn't find key {} in Secret {ns}/{}",
                            r.key, r.name
                        )))
                    }
                }
            } else if let Some(r) = &from.config_map_key_ref {
                let cm = get_config_map(ctx, &ns, &r.name)
                    .await
                    .map_err(config_err)?;
                match cm
                    .as_ref()
                    .and_then(|c| config_map_data(c).get(&r.key).cloned())
                {
                    Some(v) => String::from_utf8_lossy(&v).into_owned(),
                    None if r.optional == Some(true) => continue,
                    None => {
                        return Err(config_err(format!(
                            "couldn't find key {} in ConfigMap {ns}/{}",
                            r.key, r.name
                        )))
                    }
                }
            } else if let Some(f) = &from.field_ref {
                field_value(pod, node, f).map_err(config_err)?
            } else {
                // resourceFieldRef: the harness sets no resource limits.
                "0".into()
            }
        } else {
            String::new()
        };
        set(&mut env, e.name.clone(), value);
    }
    for (_, v) in env.iter_mut() {
        *v = rewrite_env_value(v, mounts);
    }
    let vars = vars_snapshot(&env);
    let mut args: Vec<String> = Vec::new();
    if let Some(cmd) = &c.command {
        args.extend(cmd.iter().skip(1).cloned());
    }
    args.extend(c.args.iter().flatten().cloned());
    let args = args
        .iter()
        .map(|a| rewrite_paths(&expand(a, &vars), mounts))
        .collect();
    let cwd = match &c.working_dir {
        Some(w) if !w.is_empty() => {
            let p = PathBuf::from(rewrite_paths(w, mounts));
            if p.is_absolute() && p.starts_with(pod_dir) {
                p
            } else {
                pod_dir.to_path_buf()
            }
        }
        _ => pod_dir.to_path_buf(),
    };
    std::fs::create_dir_all(&cwd)
        .map_err(|e| config_err(format!("create {}: {e}", cwd.display())))?;
    Ok(Launch {
        program,
        args,
        env,
        cwd,
    })
}

fn vars_snapshot(env: &[(String, String)]) -> HashMap<String, String> {
    env.iter().cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_windows_path_list_becomes_a_local_one() {
        let mounts = vec![
            (
                "C:\\identitymesh\\drop\\hr".to_string(),
                PathBuf::from("/run/p/volumes/hr"),
            ),
            (
                "C:\\identitymesh\\drop\\it".to_string(),
                PathBuf::from("/run/p/volumes/it"),
            ),
        ];
        let v = "C:\\identitymesh\\drop\\hr;C:\\identitymesh\\drop\\it";
        assert_eq!(
            rewrite_env_value(v, &mounts),
            "/run/p/volumes/hr:/run/p/volumes/it"
        );
        let split: Vec<_> = std::env::split_paths(&rewrite_env_value(v, &mounts)).collect();
        assert_eq!(split.len(), 2);
        // Not a path list: unchanged apart from the mounts.
        assert_eq!(rewrite_env_value("a;b", &mounts), "a;b");
    }

    #[test]
    fn rewrites_windows_and_linux_mount_paths() {
        let mounts = vec![
            (
                "C:\\identitymesh\\tls".to_string(),
                PathBuf::from("/run/p/volumes/tls"),
            ),
            ("/etc/cfg".to_string(), PathBuf::from("/run/p/volumes/cfg")),
        ];
        assert_eq!(
            rewrite_paths("--cert=C:\\identitymesh\\tls\\tls.crt --x", &mounts),
            "--cert=/run/p/volumes/tls/tls.crt --x"
        );
        assert_eq!(
            rewrite_paths("c:/IdentityMesh/TLS/ca.crt", &mounts),
            "/run/p/volumes/tls/ca.crt"
        );
        assert_eq!(
            rewrite_paths("/etc/cfg/a.toml;/etc/cfgx", &mounts),
            "/run/p/volumes/cfg/a.toml;/etc/cfgx"
        );
        assert_eq!(rewrite_paths("nothing here", &mounts), "nothing here");
    }

    #[test]
    fn expands_variables() {
        let vars: HashMap<String, String> = [("A".to_string(), "1".to_string())].into();
        assert_eq!(expand("x$(A)y$(B)$$(A)", &vars), "x1y$(B)$(A)");
    }

    #[test]
    fn strips_tags_and_digests() {
        assert_eq!(image_repository("test/http:latest"), "test/http");
        assert_eq!(image_repository("reg:5000/a/b:1.2"), "reg:5000/a/b");
        assert_eq!(image_repository("reg:5000/a/b"), "reg:5000/a/b");
        assert_eq!(image_repository("a/b@sha256:abc"), "a/b");
    }
}
