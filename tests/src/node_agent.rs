//! The node agent: a minimal kubelet for N nodes.
//!
//! Registers the Node objects, renews their Leases every second and their Ready condition every
//! few seconds, and runs the pods bound to them through [`crate::pod_runtime`]. Stopping a node's
//! heartbeat makes the node "lose the API": no lease, status or pod writes and no reaction to
//! pod changes, while its processes keep running (as with a kubelet that is cut off). On resume
//! it re-syncs: pods deleted meanwhile are killed.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    Node, NodeAddress, NodeCondition, NodeSpec, NodeStatus, NodeSystemInfo, Pod,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Api;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::Result;
use crate::netns::NodeNet;
use crate::pod_runtime::{NodeCtx, PodRunner, RuntimeCtx};

/// Lease duration written on node leases (as kubelet: 40s); renewed every second.
const LEASE_SECONDS: i32 = 40;

/// Which OS label a node gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeOs {
    Windows,
    Linux,
}

impl NodeOs {
    pub fn label(self) -> &'static str {
        match self {
            NodeOs::Windows => "windows",
            NodeOs::Linux => "linux",
        }
    }
}

pub struct NodeAgent {
    pub nodes: Vec<NodeCtx>,
    /// Set on resume so the heartbeat loop rewrites node status at once.
    force_status: HashMap<String, Arc<AtomicBool>>,
    tasks: Vec<JoinHandle<()>>,
}

fn quantity(s: &str) -> Quantity {
    Quantity(s.to_string())
}

fn node_object(name: &str, os: NodeOs, net: &NodeNet) -> Node {
    let labels: BTreeMap<String, String> = [
        ("kubernetes.io/os", os.label()),
        ("kubernetes.io/arch", "amd64"),
        ("kubernetes.io/hostname", name),
        ("beta.kubernetes.io/os", os.label()),
        ("beta.kubernetes.io/arch", "amd64"),
        ("identitymesh.test/harness-node", "true"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    Node {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(labels),
            ..Default::default()
        },
        spec: Some(NodeSpec::default()),
        status: Some(node_status(name, os, net, Timestamp::now())),
    }
}

fn node_status(name: &str, os: NodeOs, net: &NodeNet, since: Timestamp) -> NodeStatus {
    let now = Time(Timestamp::now());
    let cond = |type_: &str, status: &str, reason: &str, message: &str| NodeCondition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: Some(reason.to_string()),
        message: Some(message.to_string()),
        last_heartbeat_time: Some(now.clone()),
        last_transition_time: Some(Time(since)),
    };
    let resources: BTreeMap<String, Quantity> = [
        ("cpu", "8"),
        ("memory", "16Gi"),
        ("pods", "110"),
        ("ephemeral-storage", "100Gi"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), quantity(v)))
    .collect();
    NodeStatus {
        conditions: Some(vec![
            cond(
                "MemoryPressure",
                "False",
                "KubeletHasSufficientMemory",
                "harness",
            ),
            cond(
                "DiskPressure",
                "False",
                "KubeletHasNoDiskPressure",
                "harness",
            ),
            cond("PIDPressure", "False", "KubeletHasSufficientPID", "harness"),
            cond(
                "Ready",
                "True",
                "KubeletReady",
                "harness node agent is posting ready status",
            ),
        ]),
        addresses: Some(vec![
            NodeAddress {
                type_: "InternalIP".into(),
                address: net.node_ip.to_string(),
            },
            NodeAddress {
                type_: "Hostname".into(),
                address: name.to_string(),
            },
        ]),
        capacity: Some(resources.clone()),
        allocatable: Some(resources),
        node_info: Some(NodeSystemInfo {
            architecture: "amd64".into(),
            operating_system: os.label().into(),
            os_image: format!("identitymesh harness ({})", os.label()),
            kubelet_version: crate::tools::kubernetes_version().into(),
            kube_proxy_version: crate::tools::kubernetes_version().into(),
            container_runtime_version: "harness://1".into(),
            kernel_version: "harness".into(),
            machine_id: name.into(),
            system_uuid: name.into(),
            boot_id: name.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

impl NodeAgent {
    /// Registers the nodes (replacing leftovers of the same name) and starts their loops.
    pub async fn start(ctx: Arc<RuntimeCtx>, nodes: Vec<(NodeNet, NodeOs)>) -> Result<NodeAgent> {
        let client = ctx.client.clone();
        let node_api: Api<Node> = Api::all(client.clone());
        let mut ctxs = Vec::new();
        let mut force_status = HashMap::new();
        let mut tasks = Vec::new();

        // One pod watch for all nodes; each node loop filters by spec.nodeName.
        let (reader, writer) = reflector::store::<Pod>();
        let (changed_tx, changed_rx) = watch::channel(0u64);
        let pods: Api<Pod> = Api::all(client.clone());
        tasks.push(tokio::spawn(async move {
            let stream = reflector::reflector(
                writer,
                watcher(pods, watcher::Config::default()).default_backoff(),
            );
            let mut stream = std::pin::pin!(stream);
            while let Some(ev) = stream.next().await {
                if let Err(e) = ev {
                    // Visible by default: a pod watch that keeps failing leaves pods unstarted.
                    tracing::warn!("pod watch: {e}");
                }
                changed_tx.send_modify(|n| *n = n.wrapping_add(1));
            }
        }));

        for (net, os) in nodes {
            let name = net.node.clone();
            let node = node_object(&name, os, &net);
            match node_api.create(&PostParams::default(), &node).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    node_api.delete(&name, &Default::default()).await?;
                    node_api.create(&PostParams::default(), &node).await?;
                }
                Err(e) => return Err(e.into()),
            }
            let nctx = NodeCtx {
                name: name.clone(),
                net: net.clone(),
                connected: Arc::new(AtomicBool::new(true)),
            };
            let force = Arc::new(AtomicBool::new(false));
            force_status.insert(name.clone(), force.clone());
            tasks.push(tokio::spawn(heartbeat_loop(
                client.clone(),
                nctx.clone(),
                os,
                force,
            )));
            tasks.push(tokio::spawn(kubelet_loop(
                ctx.clone(),
                nctx.clone(),
                reader.clone(),
                changed_rx.clone(),
            )));
            ctxs.push(nctx);
        }
        Ok(NodeAgent {
            nodes: ctxs,
            force_status,
            tasks,
        })
    }

    pub fn node(&self, name: &str) -> Option<&NodeCtx> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Stops all API traffic of the node (lease, status, pods); processes keep running.
    pub fn stop_heartbeat(&self, name: &str) -> bool {
        match self.node(name) {
            Some(n) => {
                n.connected.store(false, Ordering::SeqCst);
                true
            }
            None => false,
        }
    }

    pub fn resume_heartbeat(&self, name: &str) -> bool {
        match self.node(name) {
            Some(n) => {
                if let Some(f) = self.force_status.get(name) {
                    f.store(true, Ordering::SeqCst);
                }
                n.connected.store(true, Ordering::SeqCst);
                true
            }
            None => false,
        }
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn renew_lease(api: &Api<Lease>, node: &str) -> std::result::Result<(), kube::Error> {
    let now = MicroTime(Timestamp::now());
    let patch = serde_json::json!({
        "spec": {"holderIdentity": node, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": now}
    });
    match api
        .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(node.to_string()),
                    namespace: Some("kube-node-lease".into()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(node.to_string()),
                    lease_duration_seconds: Some(LEASE_SECONDS),
                    renew_time: Some(now),
                    ..Default::default()
                }),
            };
            api.create(&PostParams::default(), &lease).await.map(|_| ())
        }
        Err(e) => Err(e),
    }
}

async fn heartbeat_loop(client: kube::Client, node: NodeCtx, os: NodeOs, force: Arc<AtomicBool>) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let nodes: Api<Node> = Api::all(client);
    let mut ready_since = Timestamp::now();
    let mut last_status = Instant::now();
    let mut was_connected = true;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if !node.connected.load(Ordering::SeqCst) {
            was_connected = false;
            continue;
        }
        if !was_connected {
            // Coming back: Ready transitions again now (the controller had marked it Unknown).
            ready_since = Timestamp::now();
            was_connected = true;
        }
        if let Err(e) = renew_lease(&leases, &node.name).await {
            tracing::debug!(node = %node.name, "lease renewal: {e}");
        }
        let forced = force.swap(false, Ordering::SeqCst);
        if forced || last_status.elapsed() >= Duration::from_secs(5) {
            let status = node_status(&node.name, os, &node.net, ready_since);
            let patch = serde_json::json!({ "status": status });
            match nodes
                .patch_status(
                    &node.name,
                    &PatchParams::default(),
                    &Patch::Strategic(&patch),
                )
                .await
            {
                Ok(_) => last_status = Instant::now(),
                Err(e) => {
                    tracing::debug!(node = %node.name, "node status: {e}");
                    if forced {
                        force.store(true, Ordering::SeqCst);
                    }
                }
            }
        }
    }
}

/// Keeps the processes of this node in line with the pods bound to it.
///
/// The pod watch only says *when* to look; what is bound here comes from a LIST by
/// `spec.nodeName` each round, as kubelets resync. A watch that stalls silently (seen right
/// after the apiserver starts: scheduled pods never started) can then delay a pod by one round
/// at most, never leave it unstarted.
async fn kubelet_loop(
    ctx: Arc<RuntimeCtx>,
    node: NodeCtx,
    _store: Store<Pod>,
    mut changed: watch::Receiver<u64>,
) {
    let pods_api: Api<Pod> = Api::all(ctx.client.clone());
    let list_params =
        kube::api::ListParams::default().fields(&format!("spec.nodeName={}", node.name));
    let mut runners: HashMap<String, PodRunner> = HashMap::new();
    let mut last_list = tokio::time::Instant::now() - Duration::from_secs(1);
    loop {
        tokio::select! {
            r = changed.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        // Bursts of pod events must not turn into bursts of LISTs.
        tokio::time::sleep_until(last_list + Duration::from_millis(200)).await;
        last_list = tokio::time::Instant::now();
        runners.retain(|_, r| !r.is_finished());
        if !node.connected.load(Ordering::SeqCst) {
            continue;
        }
        let pods = match pods_api.list(&list_params).await {
            Ok(list) => list.items.into_iter().map(Arc::new).collect::<Vec<_>>(),
            Err(e) => {
                // Never act on a failed LIST: an empty answer would stop every pod here.
                tracing::warn!(node = %node.name, "pod list: {e}");
                continue;
            }
        };
        let mut seen = std::collections::HashSet::new();
        for pod in pods {
            let bound_here =
                pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node.name.as_str());
            if !bound_here {
                continue;
            }
            let Some(uid) = pod.metadata.uid.clone() else {
                continue;
            };
            seen.insert(uid.clone());
            let deleting = pod.metadata.deletion_timestamp.is_some();
            let grace = Duration::from_secs(
                pod.metadata
                    .deletion_grace_period_seconds
                    .unwrap_or(30)
                    .max(0) as u64,
            );
            match runners.get(&uid) {
                Some(r) => {
                    if deleting {
                        r.terminate(grace);
                    }
                }
                None => {
                    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
                    let terminal = matches!(phase, Some("Succeeded") | Some("Failed"));
                    if terminal && !deleting {
                        continue;
                    }
                    // A runner also finalizes pods that are already being deleted.
                    let r = PodRunner::start(ctx.clone(), node.clone(), pod.clone());
                    if deleting {
                        r.terminate(grace);
                    }
                    runners.insert(uid, r);
                }
            }
        }
        for (uid, r) in &runners {
            if !seen.contains(uid) {
                // Gone from the API (force deletion or finalized): stop at once.
                r.kill_now();
            }
        }
    }
}
