//! The controller: thin I/O around the pure builders, certificate decisions and the cutover
//! state machine. Read the world → validate → build desired objects → server-side apply what
//! differs (hash annotation) → run the cutover step → write status last, and only if changed.
//!
//! This module holds the wiring (Context, reconcile, error_policy, run) and the per-reconcile
//! state; `driver` runs the steps in order, one module per step.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Node, ObjectReference, Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::Timestamp;
use k8s_openapi::NamespaceResourceScope;
use kube::api::Api;
use kube::runtime::controller::{Action as ReconcileAction, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{finalizer, Event as FinalizerEvent};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};

use crate::builders::{Names, FINALIZER, LABEL_CLUSTER};
use crate::crd::{CutoverKind, IdentityMeshCluster, Phase};
use crate::metrics::Metrics;
use crate::podclient::InstanceApiFactory;
use crate::refusals;

mod apply;
mod canary;
mod drive;
mod driver;
mod error;
#[cfg(test)]
mod fakes;
mod plan;
mod pods;
mod post_checks;
mod secrets;
pub mod status;
mod status_write;
#[cfg(test)]
mod tests;
mod watches;
mod world;

pub use error::Error;

/// Shared state of the controller.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub instances: Arc<dyn InstanceApiFactory>,
    /// First time each pod (ns/name) was seen unhealthy; in memory only (a restart re-learns it
    /// from pod/node condition times or one threshold later).
    unhealthy_seen: Mutex<HashMap<String, Timestamp>>,
    /// Canary runs in flight, off the reconcile path.
    canaries: canary::CanaryJobs,
    /// Writes the apiserver refused as invalid ("ns/cluster/Kind/name"), retried with backoff.
    refused_writes: Mutex<HashMap<String, RefusedWrite>>,
    /// Consecutive failed reconciles per cluster ("ns/cluster"), for the error requeue backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// The last ErrImagePull message per pod ("ns/pod"): ImagePullBackOff only says "Back-off
    /// pulling image", so the registry's error is kept for the condition.
    pull_errors: Mutex<HashMap<String, String>>,
}

/// A write the apiserver refused, and when it may be tried again.
#[derive(Clone, Debug)]
struct RefusedWrite {
    attempts: u32,
    next_try: Timestamp,
    /// Hash of the object that was refused: a different object (a spec edit) is tried at once.
    hash: Option<String>,
    message: String,
}

impl Context {
    pub fn new(
        client: Client,
        metrics: Metrics,
        instances: Arc<dyn InstanceApiFactory>,
        reporter: Reporter,
    ) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            instances,
            unhealthy_seen: Mutex::new(HashMap::new()),
            canaries: canary::CanaryJobs::default(),
            refused_writes: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            pull_errors: Mutex::new(HashMap::new()),
        }
    }
}

/// Entry point for the kube-rs Controller.
pub async fn reconcile(
    imc: Arc<IdentityMeshCluster>,
    ctx: Arc<Context>,
) -> Result<ReconcileAction, Error> {
    ctx.metrics.reconciles.inc();
    let ns = imc
        .namespace()
        .ok_or_else(|| Error::Invalid("IdentityMeshCluster must be namespaced".into()))?;
    let api: Api<IdentityMeshCluster> = Api::namespaced(ctx.client.clone(), &ns);
    let key = format!("{ns}/{}", imc.name_any());
    let result = finalizer(&api, FINALIZER, imc, |ev| async {
        match ev {
            FinalizerEvent::Apply(imc) => {
                // A lost write race is recomputed at once from a fresh read (a few times; a
                // cluster that keeps changing under us falls back to the error requeue).
                let mut attempt = 0;
                loop {
                    match Reconciler::new(imc.clone(), ctx.clone()).apply().await {
                        Err(Error::Conflict(_)) if attempt < 2 => attempt += 1,
                        r => break r,
                    }
                }
            }
            FinalizerEvent::Cleanup(imc) => Reconciler::new(imc, ctx.clone()).cleanup().await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    if result.is_ok() {
        if let Ok(mut m) = ctx.failures.lock() {
            m.remove(&key);
        }
    }
    result
}

/// A failed reconcile is retried after 5 s, doubling while it keeps failing, at most 5 min (a
/// watch event, e.g. a spec edit, still reconciles at once).
pub fn error_policy(
    imc: Arc<IdentityMeshCluster>,
    err: &Error,
    ctx: Arc<Context>,
) -> ReconcileAction {
    ctx.metrics.reconcile_error(err.metric_reason(), err.step());
    let key = format!("{}/{}", imc.namespace().unwrap_or_default(), imc.name_any());
    let attempts = match ctx.failures.lock() {
        Ok(mut m) => {
            let n = m.entry(key).or_insert(0);
            *n = n.saturating_add(1);
            *n
        }
        Err(_) => 1,
    };
    let delay = refusals::backoff(attempts);
    tracing::warn!(
        error = %err,
        step = err.step(),
        attempts,
        retry_in_s = delay.as_secs(),
        "reconcile failed"
    );
    ReconcileAction::requeue(delay)
}

/// Run the controller until shutdown.
pub async fn run(client: Client, namespace: Option<String>, ctx: Arc<Context>) {
    let (clusters, pods, services, secrets, config_maps, budgets) = match &namespace {
        Some(ns) => (
            Api::<IdentityMeshCluster>::namespaced(client.clone(), ns),
            Api::<Pod>::namespaced(client.clone(), ns),
            Api::<Service>::namespaced(client.clone(), ns),
            Api::<Secret>::namespaced(client.clone(), ns),
            Api::<ConfigMap>::namespaced(client.clone(), ns),
            Api::<PodDisruptionBudget>::namespaced(client.clone(), ns),
        ),
        None => (
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
        ),
    };
    // Nodes are cluster-scoped whatever the namespace: a cordon (or readiness change) of a
    // node reconciles the clusters with a pod on it at once, not at the next requeue.
    let nodes = Api::<Node>::all(client.clone());
    // Only our own children: keeps the caches small.
    let owned = watcher::Config::default().labels(LABEL_CLUSTER);
    let controller = Controller::new(clusters, watcher::Config::default());
    let known = controller.store();
    controller
        .owns(pods, owned.clone())
        .owns(services, owned.clone())
        .owns(secrets, owned.clone())
        .owns(config_maps, owned.clone())
        .owns(budgets, owned)
        .watches(nodes, watcher::Config::default(), move |node: Node| {
            watches::clusters_on_node(&node.name_any(), &known.state())
        })
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "reconcile stream");
            }
        })
        .await;
}

/// Everything one reconcile of one cluster needs.
struct Reconciler {
    imc: Arc<IdentityMeshCluster>,
    ctx: Arc<Context>,
    names: Names,
    now: Timestamp,
    /// Writes done this reconcile (for logs; tests count requests at the API instead).
    writes: usize,
    /// resourceVersion of the cluster object this reconcile builds on: every write of its status
    /// or annotations is conditional on it, so a stale read can never overwrite a newer intent.
    rv: Option<String>,
    /// Objects under our derived names that belong to someone else ("Kind/name" → message),
    /// left alone and reported as the Conflict condition.
    conflicts: BTreeMap<String, String>,
    /// Writes the apiserver refused as invalid ("Kind/name" → message), reported as the
    /// SpecRejected condition and retried with backoff.
    refused: BTreeMap<String, String>,
}

impl Reconciler {
    fn new(imc: Arc<IdentityMeshCluster>, ctx: Arc<Context>) -> Self {
        let names = Names::of(&imc);
        Self {
            now: Timestamp::now(),
            rv: imc.metadata.resource_version.clone(),
            imc,
            ctx,
            names,
            writes: 0,
            conflicts: BTreeMap::new(),
            refused: BTreeMap::new(),
        }
    }

    /// Replace the (possibly cached, possibly stale) object with a consistent read from the
    /// apiserver. The watch cache can lag our own last status write by a requeue, and the Service
    /// selector and every cutover decision follow status: deciding from a stale copy could swing
    /// the selector back or restart a finished cutover.
    async fn refresh(&mut self) -> Result<(), Error> {
        let live = self
            .api::<IdentityMeshCluster>()
            .get(&self.names.cluster)
            .await
            .map_err(Error::ReadCluster)?;
        self.rv = live.metadata.resource_version.clone();
        self.imc = Arc::new(live);
        Ok(())
    }

    /// Key of this cluster in the Context's per-cluster maps.
    fn cluster_key(&self) -> String {
        format!("{}/{}", self.names.namespace, self.names.cluster)
    }

    fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.ctx.client.clone(), &self.names.namespace)
    }

    async fn event(&self, type_: EventType, reason: &str, action: &str, note: String) {
        self.event_about(None, type_, reason, action, note).await;
    }

    /// An event whose secondary object is one of the server pods (the recorder groups events
    /// into series by reason and objects, so this keeps pod-specific notes apart).
    async fn event_about(
        &self,
        pod: Option<&str>,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let secondary = pod.filter(|p| !p.is_empty()).map(|p| ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(p.to_string()),
            namespace: Some(self.names.namespace.clone()),
            ..Default::default()
        });
        let ev = KubeEvent {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary,
        };
        if let Err(e) = self
            .ctx
            .recorder
            .publish(&ev, &self.imc.object_ref(&()))
            .await
        {
            tracing::warn!(error = %e, reason, "publishing event failed");
        }
    }
}

/// The phase a running cutover of `kind` shows.
fn phase_of(kind: CutoverKind) -> Phase {
    match kind {
        CutoverKind::Initial => Phase::Provisioning,
        CutoverKind::Switchover => Phase::SwitchingOver,
        CutoverKind::Failover => Phase::FailingOver,
        CutoverKind::Upgrade => Phase::Upgrading,
    }
}

/// A pod name in messages; an Initial cutover comes from no pod.
fn display(pod: &str) -> &str {
    if pod.is_empty() {
        "(none)"
    } else {
        pod
    }
}
