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
    /// Cluster DNS names, written into each pod's /etc/hosts.
    pub dns: crate::cluster_dns::ClusterDns,
    /// emptyDir volume name → size of the tmpfs behind it ([`crate::ClusterOptions`]).
    pub tmpfs_volumes: HashMap<String, u64>,
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
    /// tmpfs-backed emptyDir volumes by name; unmounted when the pod's state goes.
    pub tmpfs: Mutex<HashMap<String, crate::disk_full::FullDisk>>,
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
    /// The pods of namespace `ns` that run now: (name, state).
    pub fn in_namespace(&self, ns: &str) -> Vec<(String, Arc<PodShared>)> {
        let mut pods: Vec<(String, Arc<PodShared>)> = lock(&self.0)
            .iter()
            .filter(|((n, _), _)| n == ns)
            .map(|((_, name), p)| (name.clone(), p.clone()))
            .collect();
        pods.sort_by(|a, b| a.0.cmp(&b.0));
        pods
    }

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
            tmpfs: Mutex::default(),
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
        mount_tmpfs_volumes(&ctx, &pod, volumes, &shared);
        let containers = pod
            .spec
            .as_ref()
            .map(|s| s.containers.clone())
            .unwrap_or_default();
        let hosts = shared.dir.join("etc-hosts");
        write_hosts(&ctx, &node, &pod, &hosts);
        for (idx, c) in containers.into_iter().enumerate() {
            let mounts = container_mounts(&c, volumes);
            let mut binds = linux_binds(&c, volumes);
            binds.push(crate::process::Bind {
                source: hosts.clone(),
                target: PathBuf::from("/etc/hosts"),
                read_only: true,
            });
            let sandbox = crate::process::Sandbox {
                hostname: pod_hostname(&pod),
                binds,
            };
            container_tasks.push(tokio::spawn(run_container(
                ctx.clone(),
                node.clone(),
                pod.clone(),
                idx,
                c.clone(),
                mounts,
                sandbox,
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
                write_hosts(&ctx, &node, &pod, &hosts);
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
    // Its processes are gone: unmount its tmpfs volumes now, whoever still holds its state.
    lock(&shared.tmpfs).clear();
    ctx.registry.remove(&ns, &name, &shared.uid);
}

/// emptyDir volumes the harness backs with a small tmpfs, mounted before any container starts
/// (a container's mount namespace is a copy taken at its start).
fn mount_tmpfs_volumes(
    ctx: &RuntimeCtx,
    pod: &Pod,
    volumes: &HashMap<String, PathBuf>,
    shared: &PodShared,
) {
    let specs = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default();
    for v in specs.iter().filter(|v| v.empty_dir.is_some()) {
        let (Some(bytes), Some(dir)) = (ctx.tmpfs_volumes.get(&v.name), volumes.get(&v.name))
        else {
            continue;
        };
        match crate::disk_full::FullDisk::mount(dir, *bytes) {
            Ok(d) => {
                lock(&shared.tmpfs).insert(v.name.clone(), d);
            }
            Err(e) => tracing::warn!(volume = %v.name, "tmpfs volume: {e}"),
        }
    }
}

/// The pod's hostname: `spec.hostname`, else its name (as kubelet sets it).
fn pod_hostname(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.hostname.clone())
        .or_else(|| pod.metadata.name.clone())
        .unwrap_or_default()
}

/// The pod's /etc/hosts from the cluster's names, rewritten in place (the bind mount holds the
/// inode, so a rename would not reach the pod) and only when it changed.
fn write_hosts(ctx: &RuntimeCtx, node: &NodeCtx, pod: &Pod, path: &Path) {
    let (ns, _) = pod_ns_name(pod);
    let text = crate::cluster_dns::hosts_file(
        &ctx.dns.get(),
        &ns,
        &pod_hostname(pod),
        IpAddr::V4(node.net.node_ip),
    );
    if std::fs::read_to_string(path).ok().as_deref() == Some(text.as_str()) {
        return;
    }
    if let Err(e) = std::fs::write(path, text) {
        tracing::warn!("write {}: {e}", path.display());
    }
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
    sandbox: crate::process::Sandbox,
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
                sandbox: Some(&sandbox),
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

mod launch;
mod paths;
mod probes;
mod status;
mod volumes;

use launch::build_launch;
pub use launch::{expand, image_repository};
use paths::{container_mounts, linux_binds};
pub use paths::{rewrite_env_value, rewrite_paths};
use probes::run_probes;
use status::StatusWriter;
use volumes::{
    config_map_data, field_value, get_config_map, get_secret, materialise_volumes, secret_data,
};
