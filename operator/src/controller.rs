//! The controller: thin I/O around the pure builders, certificate decisions and the cutover
//! state machine. Read the world → validate → build desired objects → server-side apply what
//! differs (hash annotation) → run the cutover step → write status last, and only if changed.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Node, ObjectReference, Pod, Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use k8s_openapi::NamespaceResourceScope;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action as ReconcileAction, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{finalizer, Event as FinalizerEvent};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::builders::config::{build_ca_config_map, build_config_map};
use crate::builders::pod::build_pod;
use crate::builders::secret::{
    build_ca_secret, build_keyring_secret, build_tls_secret, ca_from_secret, secret_str,
};
use crate::builders::service::{build_client_service, build_headless_service};
use crate::builders::{
    foreign_owner, hash_of, Names, ANNOTATION_SWITCHOVER, FIELD_MANAGER, FINALIZER, LABEL_CLUSTER,
};
use crate::certs::{self, CertAndKey};
use crate::checks::{
    admin_ui_condition, admin_ui_not_asked, canary_condition, canary_plan, relays_condition,
    relays_not_asked, CanaryPlan, CondValue, ADMIN_UI_CONDITION, CANARY_CONDITION, CANARY_WAIT,
    RELAYS_CONDITION,
};
use crate::crd::{
    CertificateExpiry, CutoverIntent, CutoverKind, IdentityMeshCluster, IdentityMeshClusterStatus,
    Phase, Role, TransitionRecord,
};
use crate::cutover::{
    self, action, advance, health, is_promotable, plan, selector_target, Action, InstanceView,
    Outcome, Plan, PlanInput, ServerView, StepContext, StepResult,
};
use crate::keyring::{KeyRing, KEYRING_KEY};
use crate::metrics::Metrics;
use crate::observe::{self, set_condition};
use crate::podclient::{InstanceApi, InstanceApiFactory, InstanceRow, PodClientError, PodTarget};
use crate::refusals;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The apiserver's message, never the debug dump of its Status.
    #[error("Kubernetes API: {}", refusals::api_message(.0))]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("certificate: {0}")]
    Cert(#[from] certs::CertError),
    #[error("rendering server.toml: {0}")]
    Toml(#[from] toml::ser::Error),
    #[error("{0}")]
    Invalid(String),
    /// A status or metadata write lost an optimistic-concurrency race (409): someone wrote the
    /// cluster after this reconcile read it. The reconcile is recomputed from a fresh read.
    #[error("IdentityMeshCluster {0} changed since it was read; recomputing")]
    Conflict(String),
}

impl Error {
    pub fn metric_reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "Kube",
            Error::Finalizer(e) => match e.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(inner)
                | kube::runtime::finalizer::Error::CleanupFailed(inner) => inner.metric_reason(),
                _ => "Finalizer",
            },
            Error::Cert(_) => "Certificate",
            Error::Toml(_) => "Config",
            Error::Invalid(_) => "Invalid",
            Error::Conflict(_) => "Conflict",
        }
    }
}

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

/// The outcome of the last switchover request (accepted, rejected, refused during a cutover).
pub const SWITCHOVER_CONDITION: &str = "SwitchoverRequest";
/// True while an object under one of our derived names belongs to someone else.
pub const CONFLICT_CONDITION: &str = "Conflict";
/// Set while a cutover overruns spec.cutoverTimeoutSeconds, False once that cutover ended.
pub const STALLED_CONDITION: &str = "CutoverStalled";
/// True while the apiserver refuses an object built from the spec (400/422).
pub const SPEC_REJECTED_CONDITION: &str = "SpecRejected";
/// True while a server pod cannot start (image pull, invalid image, container config).
pub const POD_START_CONDITION: &str = "PodStartFailed";

/// Requeue while a cutover runs, and the steady-state poll of the pods' roles (reads only).
const CUTOVER_REQUEUE: Duration = Duration::from_millis(500);
const STEADY_REQUEUE: Duration = Duration::from_secs(2);
/// How long a lost pod whose process answers again may take to become Ready before it is
/// replaced anyway.
const REPLACE_GRACE: Duration = Duration::from_secs(60);

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
    ctx.metrics.reconcile_error(err.metric_reason());
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
    tracing::warn!(error = %err, attempts, retry_in_s = delay.as_secs(), "reconcile failed");
    ReconcileAction::requeue(delay)
}

/// Run the controller until shutdown.
pub async fn run(client: Client, namespace: Option<String>, ctx: Arc<Context>) {
    let (clusters, pods, services, secrets, config_maps) = match &namespace {
        Some(ns) => (
            Api::<IdentityMeshCluster>::namespaced(client.clone(), ns),
            Api::<Pod>::namespaced(client.clone(), ns),
            Api::<Service>::namespaced(client.clone(), ns),
            Api::<Secret>::namespaced(client.clone(), ns),
            Api::<ConfigMap>::namespaced(client.clone(), ns),
        ),
        None => (
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
        ),
    };
    // Only our own children: keeps the caches small.
    let owned = watcher::Config::default().labels(LABEL_CLUSTER);
    Controller::new(clusters, watcher::Config::default())
        .owns(pods, owned.clone())
        .owns(services, owned.clone())
        .owns(secrets, owned.clone())
        .owns(config_maps, owned)
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

/// Findings of the secret/certificate steps, turned into conditions.
#[derive(Default)]
struct Findings {
    secret_problems: Vec<String>,
    cert_problem: Option<String>,
    keyring_problem: Option<String>,
    cert_expiry: Option<CertificateExpiry>,
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

    fn refused_key(&self, kind: &str, name: &str) -> String {
        format!("{}/{kind}/{name}", self.cluster_key())
    }

    /// True while a write of `kind` `name` that the apiserver refused backs off (same object,
    /// retry time not reached): the write is skipped and the refusal stays reported.
    fn backing_off(&mut self, kind: &str, name: &str, hash: Option<&str>) -> bool {
        let key = self.refused_key(kind, name);
        let Some(r) = self
            .ctx
            .refused_writes
            .lock()
            .ok()
            .and_then(|m| m.get(&key).cloned())
        else {
            return false;
        };
        if r.hash.as_deref() != hash || self.now >= r.next_try {
            return false;
        }
        self.refused.insert(format!("{kind}/{name}"), r.message);
        true
    }

    /// The outcome of a write of `kind` `name`: a refusal (400/422) is recorded and backs off
    /// (Ok: the reconcile goes on and reports it); any other error is returned.
    fn write_result<T>(
        &mut self,
        kind: &str,
        name: &str,
        hash: Option<&str>,
        r: Result<T, kube::Error>,
    ) -> Result<Option<T>, kube::Error> {
        let key = self.refused_key(kind, name);
        match r {
            Ok(v) => {
                if let Ok(mut m) = self.ctx.refused_writes.lock() {
                    m.remove(&key);
                }
                Ok(Some(v))
            }
            Err(e) => {
                let Some(status) = refusals::refused_status(&e) else {
                    return Err(e);
                };
                let message = refusals::refused_message(kind, name, status);
                let attempts = self
                    .ctx
                    .refused_writes
                    .lock()
                    .ok()
                    .and_then(|m| m.get(&key).map(|r| r.attempts))
                    .unwrap_or(0)
                    .saturating_add(1);
                let delay = refusals::backoff(attempts);
                tracing::warn!(%message, attempts, retry_in_s = delay.as_secs(), "write refused");
                let next_try = self.now.checked_add(delay).unwrap_or(self.now);
                if let Ok(mut m) = self.ctx.refused_writes.lock() {
                    m.insert(
                        key,
                        RefusedWrite {
                            attempts,
                            next_try,
                            hash: hash.map(str::to_string),
                            message: message.clone(),
                        },
                    );
                }
                self.refused.insert(format!("{kind}/{name}"), message);
                Ok(None)
            }
        }
    }

    /// True (and a conflict noted) when `live` is not this cluster's: the caller leaves it
    /// alone instead of two controllers rewriting it.
    fn owned_elsewhere<K: Resource<DynamicType = ()>>(&mut self, live: &K) -> bool {
        let Some(owner) = foreign_owner(live.meta(), &self.imc) else {
            return false;
        };
        let (kind, name) = (K::kind(&()), live.name_any());
        self.conflicts.insert(
            format!("{kind}/{name}"),
            format!("{kind} {name} already exists and belongs to {owner}: left alone (delete or rename it, or give this cluster another name)"),
        );
        true
    }

    /// Replace the (possibly cached, possibly stale) object with a consistent read from the
    /// apiserver. The watch cache can lag our own last status write by a requeue, and the Service
    /// selector and every cutover decision follow status: deciding from a stale copy could swing
    /// the selector back or restart a finished cutover.
    async fn refresh(&mut self) -> Result<(), Error> {
        let live = self
            .api::<IdentityMeshCluster>()
            .get(&self.names.cluster)
            .await?;
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

    /// Server-side apply `obj` unless the live object already carries its hash.
    async fn apply_if_changed<K>(&mut self, obj: &K) -> Result<bool, Error>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
            + Clone
            + Serialize
            + DeserializeOwned
            + std::fmt::Debug,
    {
        let name = obj.meta().name.clone().unwrap_or_default();
        let api: Api<K> = self.api();
        if let Some(live) = api.get_opt(&name).await? {
            if self.owned_elsewhere(&live) {
                return Ok(false);
            }
            if hash_of(live.meta()).is_some() && hash_of(live.meta()) == hash_of(obj.meta()) {
                return Ok(false);
            }
        }
        let (kind, hash) = (K::kind(&()), hash_of(obj.meta()).map(str::to_string));
        if self.backing_off(&kind, &name, hash.as_deref()) {
            return Ok(false);
        }
        let r = api
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(obj),
            )
            .await;
        self.writes += 1;
        Ok(self
            .write_result(&kind, &name, hash.as_deref(), r)?
            .is_some())
    }

    // -----------------------------------------------------------------------------------------

    async fn apply(mut self) -> Result<ReconcileAction, Error> {
        self.refresh().await?;
        let imc = self.imc.clone();
        let old_status = imc.status.clone().unwrap_or_default();
        let mut st = old_status.clone();
        let gen = imc.metadata.generation;

        if imc.spec.paused {
            // No sync runs on a paused cluster's behalf either.
            self.ctx.canaries.drop_cluster(&self.cluster_key());
            st.phase = Some(Phase::Paused);
            set_condition(
                &mut st.conditions,
                "Paused",
                "True",
                "Paused",
                "spec.paused is true: no pod changes and no cutovers",
                gen,
                self.now,
            );
            self.write_status_if_changed(&old_status, &st).await?;
            return Ok(ReconcileAction::requeue(Duration::from_secs(60)));
        }
        observe::remove_condition(&mut st.conditions, "Paused");

        let mut f = Findings::default();
        self.check_referenced_secrets(&mut f).await?;
        let ca = self.ensure_ca(&mut f).await?;
        if let Some(ca) = &ca {
            self.apply_if_changed(&build_ca_config_map(&imc, &self.names, &ca.cert_pem))
                .await?;
            self.ensure_serving_cert(ca, &mut f).await?;
        }
        self.observe_user_cert(&mut f).await?;
        self.ensure_keyring(&mut f).await?;
        self.apply_if_changed(&build_config_map(&imc, &self.names)?)
            .await?;
        self.apply_if_changed(&build_headless_service(&imc, &self.names))
            .await?;

        self.report_problems(&old_status, &f).await;

        // Observe the pods.
        let instance_api = match &ca {
            Some(ca) => Some(
                self.ctx
                    .instances
                    .for_cluster(
                        &format!("{}/{}", self.names.namespace, self.names.cluster),
                        ca,
                    )
                    .map_err(|e| Error::Invalid(e.to_string()))?,
            ),
            None => None,
        };
        let world = self.observe(instance_api.as_deref()).await?;

        // The Service follows status (and the running cutover's step).
        self.ensure_client_service(selector_target(
            st.active_pod.as_deref(),
            st.cutover.as_ref(),
        ))
        .await?;

        // Cutover: resume the persisted one, or plan.
        let mut plan_phase: Option<(Phase, String)> = None;
        let request = imc.annotations().get(ANNOTATION_SWITCHOVER).cloned();
        if let Some(c) = st.cutover.clone() {
            if let Some(req) = &request {
                // Refused, not queued: what "standby" names changes when the running cutover
                // finishes, so running it later could undo the cutover the user just saw start.
                let msg = cutover::switchover_refused_during(&c, req);
                self.record_request(&mut st, "False", "CutoverInProgress", &msg)
                    .await?;
                self.event(EventType::Warning, "SwitchoverRefused", "Switchover", msg)
                    .await;
            }
        } else if instance_api.is_none() {
            // Without the CA the pods cannot be asked anything: make no role decisions blind.
            plan_phase = Some((
                Phase::Degraded,
                "cluster CA unavailable: cannot reach the pods' internal API".into(),
            ));
        } else {
            let input = PlanInput {
                now: self.now,
                policy: imc.spec.failover.policy,
                unhealthy_after: Duration::from_secs(u64::from(
                    imc.spec.failover.unhealthy_after_seconds,
                )),
                active: st.active_pod.clone(),
                epoch: st.epoch,
                switchover_request: request.clone(),
                pods: world.views.clone(),
            };
            match plan(&input) {
                Plan::Start(c) => {
                    st.epoch = st.epoch.max(c.epoch);
                    st.phase = Some(phase_of(c.kind));
                    self.event_about(
                        Some(&c.target),
                        EventType::Normal,
                        &format!("{}Started", c.kind.as_str()),
                        c.kind.as_str(),
                        format!(
                            "{} → {} with epoch {}: {}",
                            display(&c.from),
                            c.target,
                            c.epoch,
                            c.reason
                        ),
                    )
                    .await;
                    if let Some(req) = &request {
                        let msg = format!(
                            "switchover request {ANNOTATION_SWITCHOVER}={req} accepted: {} → {} with epoch {}",
                            display(&c.from),
                            c.target,
                            c.epoch
                        );
                        set_condition(
                            &mut st.conditions,
                            SWITCHOVER_CONDITION,
                            "True",
                            "Accepted",
                            &msg,
                            gen,
                            self.now,
                        );
                    }
                    st.cutover = Some(c);
                    // Intent first: written before anything acts on it.
                    self.write_status(&st).await?;
                    if request.is_some() {
                        self.clear_switchover_annotation().await?;
                    }
                }
                Plan::RollStandby { pod } => {
                    self.event_about(
                        Some(&pod),
                        EventType::Normal,
                        "RollingStandby",
                        "Upgrade",
                        format!("recreating standby {pod} from the new template"),
                    )
                    .await;
                    self.delete_pod(&pod, None).await?;
                    plan_phase = Some((Phase::Upgrading, format!("recreating standby {pod}")));
                }
                Plan::DemoteStray { pod } => {
                    if let (Some(api), Some(t)) = (&instance_api, world.target(&pod)) {
                        let _ = api
                            .demote(
                                &t,
                                Duration::from_secs(u64::from(imc.spec.drain_timeout_seconds) + 2),
                            )
                            .await;
                    }
                }
                Plan::FailoverRequired { active, reason } => {
                    let msg = format!("active {active} is unhealthy ({reason}); failover policy is Manual: set annotation {ANNOTATION_SWITCHOVER}=standby to switch");
                    if observe::get_condition(&st.conditions, "FailoverRequired")
                        .is_none_or(|c| c.status != "True")
                    {
                        self.event(
                            EventType::Warning,
                            "FailoverRequired",
                            "Failover",
                            msg.clone(),
                        )
                        .await;
                    }
                    set_condition(
                        &mut st.conditions,
                        "FailoverRequired",
                        "True",
                        &reason,
                        &msg,
                        gen,
                        self.now,
                    );
                    plan_phase = Some((Phase::FailoverRequired, msg));
                }
                Plan::RejectSwitchover { reason } => {
                    let msg = format!(
                        "switchover request {ANNOTATION_SWITCHOVER}={} rejected: {reason}",
                        request.as_deref().unwrap_or_default()
                    );
                    self.record_request(&mut st, "False", "Rejected", &msg)
                        .await?;
                    self.event(EventType::Warning, "SwitchoverRejected", "Switchover", msg)
                        .await;
                }
                Plan::Wait { reason } => {
                    if !reason.is_empty() {
                        plan_phase = Some((Phase::Degraded, reason));
                    }
                }
                Plan::Steady => {}
            }
        }
        if !matches!(plan_phase, Some((Phase::FailoverRequired, _))) {
            observe::remove_condition(&mut st.conditions, "FailoverRequired");
        }

        if st.cutover.is_some() {
            self.drive(&mut st, &world, instance_api.as_deref()).await?;
        }

        // Pods last among children: a missing slot gets a fresh standby.
        // (Its failure is reported in status before it fails the reconcile.)
        let pods_result = self.ensure_pods(&world).await;

        // Post-cutover checks against the active, once any cutover is recorded in status.
        let checks = self.post_checks(&st, &world, instance_api.as_ref()).await;

        // Status.
        st.observed_generation = gen;
        st.instances = world
            .views
            .iter()
            .map(|v| observe::instance_status(v, world.pods.get(&v.name)))
            .collect();
        st.standby_pod = st.active_pod.as_deref().and_then(|a| self.names.peer(a));
        st.certificate_expiry = f.cert_expiry.clone();
        self.set_conditions(&mut st, &f, &world, plan_phase.as_ref(), &checks);
        let pod_refused = self
            .names
            .pods()
            .into_iter()
            .find_map(|p| self.refused.get(&format!("Pod/{p}")).cloned());
        match (&pods_result, pod_refused) {
            (Ok(()), Some(msg)) => set_condition(
                &mut st.conditions,
                "PodsCreated",
                "False",
                "CreateRefused",
                &msg,
                gen,
                self.now,
            ),
            (Ok(()), None) => set_condition(
                &mut st.conditions,
                "PodsCreated",
                "True",
                "Created",
                "both server pods exist",
                gen,
                self.now,
            ),
            (Err(e), _) => set_condition(
                &mut st.conditions,
                "PodsCreated",
                "False",
                "CreateFailed",
                &e.to_string(),
                gen,
                self.now,
            ),
        }
        self.report_conflicts(&mut st).await;
        self.report_refused(&mut st).await;
        self.report_stuck_pods(&mut st, &world).await;
        self.write_status_if_changed(&old_status, &st).await?;
        pods_result?;

        if self.writes > 0 {
            tracing::debug!(cluster = %self.names.cluster, writes = self.writes, "reconciled");
        }
        // Look again soon while anything is off: failover timing depends on noticing early.
        // A refused spec is not something a quick look fixes: the steady poll (refused writes
        // themselves wait for their backoff), unless a cutover runs.
        let unsettled = st.cutover.is_some()
            || (self.refused.is_empty() && world.views.iter().any(|v| !health(v).is_healthy()));
        Ok(ReconcileAction::requeue(if unsettled {
            CUTOVER_REQUEUE
        } else {
            STEADY_REQUEUE
        }))
    }

    async fn cleanup(self) -> Result<ReconcileAction, Error> {
        self.ctx.canaries.drop_cluster(&self.cluster_key());
        // Owner references garbage-collect every child. Demote the active first so its engine
        // stops at a batch boundary instead of being killed mid-run.
        if let Some(active) = self.imc.status.as_ref().and_then(|s| s.active_pod.clone()) {
            let secret: Option<Secret> = self
                .api::<Secret>()
                .get_opt(&self.names.ca_secret())
                .await?;
            if let Some(ca) = secret.as_ref().and_then(ca_from_secret) {
                if let Ok(api) = self.ctx.instances.for_cluster(
                    &format!("{}/{}", self.names.namespace, self.names.cluster),
                    &ca,
                ) {
                    if let Some(pod) = self.api::<Pod>().get_opt(&active).await? {
                        if let Some(ip) = observe::pod_ip(&pod) {
                            let t = PodTarget::new(&active, ip, self.names.pod_dns_name(&active));
                            let _ = api
                                .demote(
                                    &t,
                                    Duration::from_secs(
                                        u64::from(self.imc.spec.drain_timeout_seconds) + 2,
                                    ),
                                )
                                .await;
                        }
                    }
                }
            }
        }
        self.event(
            EventType::Normal,
            "Deleted",
            "Delete",
            "cluster deleted; owned objects are garbage-collected".into(),
        )
        .await;
        Ok(ReconcileAction::await_change())
    }

    /// The client Service, also repaired when someone edited its selector: routing to the
    /// wrong pod is the one drift that must never persist.
    async fn ensure_client_service(&mut self, active: Option<&str>) -> Result<bool, Error> {
        let svc = build_client_service(&self.imc, &self.names, active);
        let live: Option<Service> = self
            .api::<Service>()
            .get_opt(&self.names.client_service())
            .await?;
        let selector_ok = live
            .as_ref()
            .and_then(|l| l.spec.as_ref())
            .map(|s| &s.selector)
            == svc.spec.as_ref().map(|s| &s.selector);
        if let Some(live) = &live {
            if self.owned_elsewhere(live) {
                return Ok(false);
            }
            if selector_ok
                && hash_of(&live.metadata).is_some()
                && hash_of(&live.metadata) == hash_of(&svc.metadata)
            {
                return Ok(false);
            }
        }
        let name = self.names.client_service();
        // The selector is part of what is written: a new target is tried at once.
        let hash = format!(
            "{}/{}",
            hash_of(&svc.metadata).unwrap_or_default(),
            active.unwrap_or_default()
        );
        if self.backing_off("Service", &name, Some(&hash)) {
            return Ok(false);
        }
        let r = self
            .api::<Service>()
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&svc),
            )
            .await;
        self.writes += 1;
        Ok(self
            .write_result("Service", &name, Some(&hash), r)?
            .is_some())
    }

    /// The Conflict condition (removed when there is none), and a Warning Event when its message
    /// changes.
    async fn report_conflicts(&self, st: &mut IdentityMeshClusterStatus) {
        if self.conflicts.is_empty() {
            observe::remove_condition(&mut st.conditions, CONFLICT_CONDITION);
            return;
        }
        let msg = self
            .conflicts
            .values()
            .cloned()
            .collect::<Vec<_>>()
            .join("; ");
        let known = observe::get_condition(&st.conditions, CONFLICT_CONDITION)
            .is_some_and(|c| c.status == "True" && c.message == msg);
        if !known {
            self.event(EventType::Warning, "Conflict", "Validate", msg.clone())
                .await;
        }
        set_condition(
            &mut st.conditions,
            CONFLICT_CONDITION,
            "True",
            "ObjectOwnedElsewhere",
            &msg,
            self.imc.metadata.generation,
            self.now,
        );
    }

    /// The SpecRejected condition (removed when nothing is refused), and a Warning Event when its
    /// message changes: the apiserver's message, quoted, and the spec field when it can be told.
    async fn report_refused(&self, st: &mut IdentityMeshClusterStatus) {
        if self.refused.is_empty() {
            observe::remove_condition(&mut st.conditions, SPEC_REJECTED_CONDITION);
            return;
        }
        let msg = format!(
            "{}; retried with backoff (at once after a spec change)",
            self.refused
                .values()
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        );
        let known = observe::get_condition(&st.conditions, SPEC_REJECTED_CONDITION)
            .is_some_and(|c| c.status == "True" && c.message == msg);
        if !known {
            self.event(EventType::Warning, "SpecRejected", "Apply", msg.clone())
                .await;
        }
        set_condition(
            &mut st.conditions,
            SPEC_REJECTED_CONDITION,
            "True",
            "RefusedByApiserver",
            &msg,
            self.imc.metadata.generation,
            self.now,
        );
    }

    /// The PodStartFailed condition (removed when both pods' containers can start), and a
    /// Warning Event per pod when its problem changes: the kubelet's reason and message, quoted,
    /// and the spec field to change.
    async fn report_stuck_pods(&self, st: &mut IdentityMeshClusterStatus, world: &World) {
        let spec = &self.imc.spec;
        let mut secrets: Vec<(&str, &str)> = vec![
            ("spec.database", spec.database.name.as_str()),
            ("spec.licence", spec.licence.name.as_str()),
        ];
        if let Some(n) = &spec.tls.secret_name {
            secrets.push(("spec.tls.secretName", n.as_str()));
        }
        let mut found = Vec::new();
        for name in self.names.pods() {
            let key = format!("{}/{name}", self.names.namespace);
            let stuck = world
                .pods
                .get(&name)
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .and_then(refusals::stuck_container);
            let Some(mut stuck) = stuck else {
                if let Ok(mut m) = self.ctx.pull_errors.lock() {
                    m.remove(&key);
                }
                continue;
            };
            if let Ok(mut m) = self.ctx.pull_errors.lock() {
                if stuck.reason == "ErrImagePull" {
                    m.insert(key, stuck.message.clone());
                } else if stuck.reason == "ImagePullBackOff" {
                    // Keep the registry's error from the last pull attempt.
                    if let Some(prev) = m.get(&key) {
                        stuck.reason = "ErrImagePull".into();
                        stuck.message = prev.clone();
                    }
                } else {
                    m.remove(&key);
                }
            }
            found.push((name, stuck));
        }
        if found.is_empty() {
            observe::remove_condition(&mut st.conditions, POD_START_CONDITION);
            return;
        }
        let old = observe::get_condition(&st.conditions, POD_START_CONDITION)
            .filter(|c| c.status == "True")
            .map(|c| c.message.clone())
            .unwrap_or_default();
        let mut msgs = Vec::new();
        for (pod, stuck) in &found {
            let m = refusals::stuck_message(pod, stuck, &secrets);
            if !old.split("; ").any(|o| o == m) {
                self.event_about(
                    Some(pod),
                    EventType::Warning,
                    stuck.condition_reason(),
                    "Start",
                    m.clone(),
                )
                .await;
            }
            msgs.push(m);
        }
        set_condition(
            &mut st.conditions,
            POD_START_CONDITION,
            "True",
            found[0].1.condition_reason(),
            &msgs.join("; "),
            self.imc.metadata.generation,
            self.now,
        );
        // Ready says why it waits, instead of only "waiting for a Ready server pod".
        if let Some(ready) = st.conditions.iter_mut().find(|c| c.type_ == "Ready") {
            if ready.status != "True" && !ready.message.contains(&msgs[0]) {
                ready.message = format!("{}: {}", ready.message, msgs.join("; "));
            }
        }
    }

    /// A Warning event when a problem appears or changes (not on every reconcile: steady state,
    /// even a broken one, writes nothing). Messages name Secrets and keys, never values.
    async fn report_problems(&self, old: &IdentityMeshClusterStatus, f: &Findings) {
        let items = [
            (
                "SecretsReady",
                "SecretProblem",
                (!f.secret_problems.is_empty()).then(|| f.secret_problems.join("; ")),
            ),
            (
                "CertificatesReady",
                "CertificateProblem",
                f.cert_problem.clone(),
            ),
            ("KeyRingReady", "KeyRingProblem", f.keyring_problem.clone()),
        ];
        for (cond, reason, problem) in items {
            let Some(msg) = problem else { continue };
            let known = observe::get_condition(&old.conditions, cond)
                .is_some_and(|c| c.status == "False" && c.message == msg);
            if !known {
                self.event(EventType::Warning, reason, "Validate", msg)
                    .await;
            }
        }
    }

    // ----------------------------------------------------------------------------- secrets

    /// Referenced Secrets must exist and hold the key; problems name the Secret and key and
    /// never quote values.
    async fn check_referenced_secrets(&mut self, f: &mut Findings) -> Result<(), Error> {
        let spec = &self.imc.spec;
        let api: Api<Secret> = self.api();
        let mut checks: Vec<(&str, &str, &str)> = vec![
            (
                "spec.database",
                spec.database.name.as_str(),
                spec.database.key.as_str(),
            ),
            (
                "spec.licence",
                spec.licence.name.as_str(),
                spec.licence.key.as_str(),
            ),
        ];
        if let Some(user) = &spec.tls.secret_name {
            checks.push(("spec.tls.secretName", user.as_str(), "tls.crt"));
            checks.push(("spec.tls.secretName", user.as_str(), "tls.key"));
        }
        for (field, name, key) in checks {
            let problem = match api.get_opt(name).await? {
                None => Some(format!(
                    "{field}: Secret {name} (key {key:?}) not found in namespace {}; create it or fix the reference",
                    self.names.namespace
                )),
                Some(s) => match secret_str(&s, key) {
                    None => Some(format!(
                        "{field}: Secret {name} has no key {key:?} (or it is not UTF-8)"
                    )),
                    Some(v) if v.trim().is_empty() => {
                        Some(format!("{field}: Secret {name} key {key:?} is empty"))
                    }
                    Some(v)
                        if field == "spec.licence"
                            && serde_json::from_str::<serde_json::Value>(v).is_err() =>
                    {
                        Some(format!(
                            "{field}: Secret {name} key {key:?} is not valid licence JSON"
                        ))
                    }
                    Some(v) if key == "tls.crt" && certs::inspect(v).is_err() => Some(format!(
                        "{field}: Secret {name} key \"tls.crt\" is not a PEM certificate"
                    )),
                    Some(_) => None,
                },
            };
            f.secret_problems.extend(problem);
        }
        Ok(())
    }

    async fn ensure_ca(&mut self, f: &mut Findings) -> Result<Option<CertAndKey>, Error> {
        let api: Api<Secret> = self.api();
        let name = self.names.ca_secret();
        if let Some(s) = api.get_opt(&name).await? {
            if self.owned_elsewhere(&s) {
                return Ok(None);
            }
            return Ok(
                match ca_from_secret(&s)
                    .filter(|ca| certs::inspect(&ca.cert_pem).is_ok_and(|i| i.is_ca))
                {
                    Some(ca) => Some(ca),
                    None => {
                        // Never replace a CA silently: relays and clients trust it.
                        f.cert_problem = Some(format!("Secret {name} does not hold a CA (keys ca.crt, ca.key); delete it to have a new CA generated"));
                        None
                    }
                },
            );
        }
        let ca = certs::generate_ca(
            &self.names.cluster,
            &self.names.namespace,
            time::OffsetDateTime::now_utc(),
        )?;
        match api
            .create(
                &PostParams::default(),
                &build_ca_secret(&self.imc, &self.names, &ca),
            )
            .await
        {
            Ok(_) => {
                self.writes += 1;
                self.event(
                    EventType::Normal,
                    "CAGenerated",
                    "Certificates",
                    format!("generated cluster CA in Secret {name}"),
                )
                .await;
                Ok(Some(ca))
            }
            // Lost a race with another reconcile: use the winner's CA next time.
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn ensure_serving_cert(
        &mut self,
        ca: &CertAndKey,
        f: &mut Findings,
    ) -> Result<(), Error> {
        let Some(issuer) = self.imc.spec.tls.operator_issuer() else {
            return Ok(());
        };
        let (duration, renew_before) = match issuer.parsed() {
            Ok(x) => x,
            Err(e) => {
                f.cert_problem = Some(e);
                return Ok(());
            }
        };
        let name = self.names.operator_tls_secret();
        let api: Api<Secret> = self.api();
        let live = api.get_opt(&name).await?;
        if live.as_ref().is_some_and(|l| self.owned_elsewhere(l)) {
            return Ok(());
        }
        let existing = live.as_ref().and_then(|s| secret_str(s, "tls.crt"));
        let ca_info = certs::inspect(&ca.cert_pem)?;
        let wanted = certs::serving_dns_names(&self.names, &self.imc.spec.tls.dns_names);
        let now = time::OffsetDateTime::now_utc();
        if let Some(reason) =
            certs::serving_cert_decision(existing, &ca_info, &wanted, now, renew_before)
        {
            let leaf = certs::issue_serving_cert(ca, &wanted, now, duration)?;
            let secret = build_tls_secret(&self.imc, &self.names, &leaf, &ca.cert_pem);
            api.patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&secret),
            )
            .await?;
            self.writes += 1;
            self.event(
                EventType::Normal,
                "CertificateIssued",
                "Certificates",
                format!(
                    "issued serving certificate in Secret {name} ({})",
                    reason.as_str()
                ),
            )
            .await;
            let info = certs::inspect(&leaf.cert_pem)?;
            f.cert_expiry = Some(CertificateExpiry {
                not_after: Time(certs::to_timestamp(info.not_after)),
                secret_name: name,
            });
        } else if let Some(info) = existing.and_then(|p| certs::inspect(p).ok()) {
            f.cert_expiry = Some(CertificateExpiry {
                not_after: Time(certs::to_timestamp(info.not_after)),
                secret_name: name,
            });
        }
        Ok(())
    }

    /// Expiry of a user-provided certificate (the operator does not renew it).
    async fn observe_user_cert(&mut self, f: &mut Findings) -> Result<(), Error> {
        let Some(name) = self.imc.spec.tls.secret_name.clone() else {
            return Ok(());
        };
        if let Some(s) = self.api::<Secret>().get_opt(&name).await? {
            if let Some(info) = secret_str(&s, "tls.crt").and_then(|p| certs::inspect(p).ok()) {
                f.cert_expiry = Some(CertificateExpiry {
                    not_after: Time(certs::to_timestamp(info.not_after)),
                    secret_name: name,
                });
            }
        }
        Ok(())
    }

    async fn ensure_keyring(&mut self, f: &mut Findings) -> Result<(), Error> {
        let api: Api<Secret> = self.api();
        let name = self.names.keyring_secret();
        match api.get_opt(&name).await? {
            Some(s) if self.owned_elsewhere(&s) => {}
            Some(s) => {
                // Never regenerated: a new key ring would orphan every stored secret.
                let problem = match secret_str(&s, KEYRING_KEY) {
                    None => Some(format!("Secret {name} has no key {KEYRING_KEY:?}")),
                    Some(v) => KeyRing::parse(v.as_bytes())
                        .err()
                        .map(|e| format!("Secret {name} key {KEYRING_KEY:?}: {e}")),
                };
                f.keyring_problem = problem;
            }
            None => {
                let kr = KeyRing::generate();
                match api
                    .create(
                        &PostParams::default(),
                        &build_keyring_secret(&self.imc, &self.names, &kr),
                    )
                    .await
                {
                    Ok(_) => {
                        self.writes += 1;
                        self.event(
                            EventType::Normal,
                            "KeyRingGenerated",
                            "Secrets",
                            format!("generated key ring in Secret {name}"),
                        )
                        .await;
                    }
                    Err(kube::Error::Api(e)) if e.code == 409 => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }

    // ----------------------------------------------------------------------------- pods

    async fn observe(&mut self, api: Option<&dyn InstanceApi>) -> Result<World, Error> {
        let pods: Api<Pod> = self.api();
        let list = pods
            .list(&ListParams::default().labels(&format!("{LABEL_CLUSTER}={}", self.names.cluster)))
            .await?;
        let mut by_name: HashMap<String, Pod> = HashMap::new();
        for p in list.items {
            // Our labels on someone else's pod do not make it a server of this cluster.
            if !self.owned_elsewhere(&p) {
                by_name.insert(p.name_any(), p);
            }
        }
        let nodes: Api<Node> = Api::all(self.ctx.client.clone());
        let mut views = Vec::new();
        let mut targets: HashMap<String, PodTarget> = HashMap::new();
        for name in self.names.pods() {
            let pod = by_name.get(&name);
            let node = match pod.and_then(observe::pod_node) {
                // Reading the node is best effort: without it, pod conditions still decide.
                Some(n) => nodes.get_opt(&n).await.ok().flatten(),
                None => None,
            };
            let target = pod
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .and_then(observe::pod_ip)
                .map(|ip| PodTarget::new(&name, ip, self.names.pod_dns_name(&name)));
            let server = match (&target, api) {
                (Some(t), Some(api)) => api.status(t).await.ok().map(|s| ServerView {
                    role: s.role(),
                    epoch: s.epoch,
                    version: s.version.clone(),
                }),
                _ => None,
            };
            if let Some(t) = target {
                targets.insert(name.clone(), t);
            }
            let desired = build_pod(&self.imc, &self.names, &name);
            let key = format!("{}/{}", self.names.namespace, name);
            let seen = self.unhealthy_seen(&key);
            let mut v = observe::instance_view(
                &name,
                pod,
                node.as_ref(),
                server,
                seen,
                hash_of(&desired.metadata),
            );
            if health(&v).is_healthy() {
                self.forget_unhealthy(&key);
            } else if seen.is_none() {
                self.note_unhealthy(&key);
            }
            // Keep the first-seen time we just noted out of this round's decision.
            v.first_seen_unhealthy = seen;
            views.push(v);
        }
        let views: [InstanceView; 2] = views
            .try_into()
            .map_err(|_| Error::Invalid("expected exactly two instance slots".into()))?;
        // The SQL registry through the recorded active (else any answering pod), for the
        // SingleActive condition. Reads only.
        let mut rows = None;
        if let Some(api) = api {
            let active = self.imc.status.as_ref().and_then(|s| s.active_pod.clone());
            let mut order: Vec<&PodTarget> = targets.values().collect();
            order.sort_by_key(|t| Some(&t.pod) != active.as_ref());
            for t in order {
                if views.iter().any(|v| v.name == t.pod && v.server.is_some()) {
                    if let Ok(r) = api.instances(t).await {
                        rows = Some(r);
                        break;
                    }
                }
            }
        }
        Ok(World {
            views,
            pods: by_name,
            targets,
            rows,
        })
    }

    fn unhealthy_seen(&self, key: &str) -> Option<Timestamp> {
        self.ctx
            .unhealthy_seen
            .lock()
            .ok()
            .and_then(|m| m.get(key).copied())
    }
    fn note_unhealthy(&self, key: &str) {
        if let Ok(mut m) = self.ctx.unhealthy_seen.lock() {
            m.entry(key.to_string()).or_insert(self.now);
        }
    }
    fn forget_unhealthy(&self, key: &str) {
        if let Ok(mut m) = self.ctx.unhealthy_seen.lock() {
            m.remove(key);
        }
    }

    /// Create any missing pod; remove finished (evicted/failed) pods so they are recreated.
    async fn ensure_pods(&mut self, world: &World) -> Result<(), Error> {
        let api: Api<Pod> = self.api();
        for name in self.names.pods() {
            match world.pods.get(&name) {
                None => {
                    let pod = build_pod(&self.imc, &self.names, &name);
                    let hash = hash_of(&pod.metadata).map(str::to_string);
                    if self.backing_off("Pod", &name, hash.as_deref()) {
                        continue;
                    }
                    match api.create(&PostParams::default(), &pod).await {
                        Err(kube::Error::Api(e)) if e.code == 409 => {
                            // Not one of ours (else observe would have listed it)?
                            if let Some(p) = api.get_opt(&name).await? {
                                self.owned_elsewhere(&p);
                            }
                        }
                        r => {
                            let created = self.write_result("Pod", &name, hash.as_deref(), r)?;
                            self.writes += 1;
                            if created.is_some() {
                                self.event_about(
                                    Some(&name),
                                    EventType::Normal,
                                    "PodCreated",
                                    "Create",
                                    format!("created server pod {name}"),
                                )
                                .await;
                            }
                        }
                    }
                }
                Some(p) if observe::pod_finished(p) && p.metadata.deletion_timestamp.is_none() => {
                    self.delete_pod(&name, Some(0)).await?;
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    async fn delete_pod(&mut self, name: &str, grace: Option<u32>) -> Result<(), Error> {
        let dp = DeleteParams {
            grace_period_seconds: grace,
            ..Default::default()
        };
        match self.api::<Pod>().delete(name, &dp).await {
            Ok(_) => {
                self.writes += 1;
                Ok(())
            }
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    // ----------------------------------------------------------------------------- cutover

    /// Run the persisted cutover step by step; every new intent is persisted before it acts.
    async fn drive(
        &mut self,
        st: &mut IdentityMeshClusterStatus,
        world: &World,
        api: Option<&dyn InstanceApi>,
    ) -> Result<(), Error> {
        let drain = Duration::from_secs(u64::from(self.imc.spec.drain_timeout_seconds));
        for _ in 0..6 {
            let Some(c) = st.cutover.clone() else { break };
            let result = self.run_action(&c, world, api, drain).await?;
            let view = |n: &str| world.views.iter().find(|v| v.name == n);
            let cx = StepContext {
                now: Timestamp::now(),
                drain_timeout: drain,
                target_healthy: view(&c.target).is_some_and(|v| health(v).is_healthy())
                    || result == StepResult::Promoted,
                from_promotable: view(&c.from).is_some_and(is_promotable),
                stall_after: Duration::from_secs(u64::from(self.imc.spec.cutover_timeout_seconds)),
            };
            match advance(&c, &result, &cx) {
                Outcome::Stay => break,
                Outcome::Update(n) => {
                    st.epoch = st.epoch.max(n.epoch);
                    st.phase = Some(phase_of(n.kind));
                    let newly_stalled = n.stalled != c.stalled;
                    st.cutover = Some(n.clone());
                    if let Some(msg) = self.set_stall_condition(st).filter(|_| newly_stalled) {
                        self.event_about(
                            Some(&c.target),
                            EventType::Warning,
                            "CutoverStalled",
                            n.kind.as_str(),
                            msg,
                        )
                        .await;
                    }
                    self.event_about(
                        Some(&n.target),
                        EventType::Normal,
                        &format!("{:?}", n.step),
                        n.kind.as_str(),
                        format!(
                            "{}: {} → {} epoch {} ({:?})",
                            n.kind.as_str(),
                            display(&n.from),
                            n.target,
                            n.epoch,
                            result
                        ),
                    )
                    .await;
                    st.cutover = Some(n);
                    self.write_status(st).await?;
                }
                Outcome::Finished { intent, verified } => {
                    self.finish(st, intent, verified).await?;
                    self.write_status(st).await?;
                    break;
                }
            }
        }
        Ok(())
    }

    async fn finish(
        &mut self,
        st: &mut IdentityMeshClusterStatus,
        c: CutoverIntent,
        verified: bool,
    ) -> Result<(), Error> {
        let end = c
            .verified
            .as_ref()
            .map(|t| t.0)
            .unwrap_or_else(Timestamp::now);
        let secs = cutover::elapsed_ms(c.started.0, end) as f64 / 1000.0;
        st.active_pod = Some(c.target.clone());
        st.standby_pod = self.names.peer(&c.target);
        st.epoch = st.epoch.max(c.epoch);
        st.cutover = None;
        st.last_transition = Some(TransitionRecord {
            kind: c.kind,
            from: c.from.clone(),
            to: c.target.clone(),
            reason: c.reason.clone(),
            started: c.started.clone(),
            finished: Some(Time(end)),
            duration_seconds: Some(secs),
            outcome: Some(cutover::outcome(&c, verified).into()),
            epoch: c.epoch,
        });
        self.ctx.metrics.cutover_finished(c.kind.as_str(), secs);
        let (t, reason) = match cutover::outcome(&c, verified) {
            "Succeeded" => (EventType::Normal, "CutoverSucceeded"),
            "RolledBack" => (EventType::Warning, "CutoverRolledBack"),
            _ => (EventType::Warning, "CutoverVerificationFailed"),
        };
        self.event_about(
            Some(&c.target),
            t,
            reason,
            c.kind.as_str(),
            format!(
                "{} {} → {} epoch {} in {secs:.2}s",
                c.kind.as_str(),
                display(&c.from),
                c.target,
                c.epoch
            ),
        )
        .await;
        Ok(())
    }

    async fn run_action(
        &mut self,
        c: &CutoverIntent,
        world: &World,
        api: Option<&dyn InstanceApi>,
        drain: Duration,
    ) -> Result<StepResult, Error> {
        Ok(match action(c) {
            Action::Demote { pod } => match (api, world.target(&pod)) {
                (Some(api), Some(t)) => {
                    match api.demote(&t, drain + Duration::from_secs(2)).await {
                        Ok(r) => StepResult::Demoted { drained: r.drained },
                        Err(e) => {
                            tracing::info!(pod, error = %e, "demote failed; will promote anyway once the drain bound passes");
                            StepResult::DemoteFailed
                        }
                    }
                }
                _ => StepResult::DemoteFailed,
            },
            Action::Promote { pod, epoch } => match (api, world.target(&pod)) {
                (Some(api), Some(t)) => match api.promote(&t, epoch).await {
                    Ok(()) => StepResult::Promoted,
                    Err(PodClientError::Refused { stored, .. }) => {
                        StepResult::PromoteRefused { stored }
                    }
                    Err(e) => {
                        tracing::info!(pod, epoch, error = %e, "promote failed; retrying");
                        StepResult::PromoteFailed
                    }
                },
                _ => StepResult::PromoteFailed,
            },
            Action::Swing { pod } => match self.ensure_client_service(Some(&pod)).await {
                Ok(_)
                    if self
                        .conflicts
                        .contains_key(&format!("Service/{}", self.names.client_service()))
                        || self
                            .refused
                            .contains_key(&format!("Service/{}", self.names.client_service())) =>
                {
                    StepResult::SwingFailed
                }
                Ok(_) => StepResult::Swung,
                Err(e) => {
                    tracing::warn!(error = %e, "swinging the Service failed");
                    StepResult::SwingFailed
                }
            },
            Action::Verify { pod, epoch } => self.verify(&pod, epoch, world, api).await?,
            Action::Replace { pod } => {
                let view = world.views.iter().find(|v| v.name == pod);
                let live = world.pods.get(&pod);
                let recreated = live
                    .and_then(|p| p.metadata.creation_timestamp.as_ref())
                    .is_some_and(|t| t.0 > c.started.0);
                if live.is_none() || recreated || view.is_some_and(is_promotable) {
                    StepResult::Replaced
                } else {
                    // Force when the node is gone: the kubelet cannot confirm, and the epoch
                    // already fences whatever may still run there.
                    let node_lost = view.is_some_and(|v| v.node_ready == Some(false));
                    // A process that answers (restarted, coming up as standby) gets time to
                    // become Ready before it is thrown away; recreating is slow on Windows.
                    let answering = view.is_some_and(|v| v.server.is_some());
                    let waited = cutover::elapsed_ms(c.step_started.0, Timestamp::now())
                        >= i64::try_from(REPLACE_GRACE.as_millis()).unwrap_or(i64::MAX);
                    let give_up_on_it = node_lost || !answering || waited;
                    let not_deleting =
                        live.is_some_and(|p| p.metadata.deletion_timestamp.is_none());
                    if give_up_on_it && (not_deleting || node_lost) {
                        self.delete_pod(&pod, if node_lost { Some(0) } else { None })
                            .await?;
                        self.event_about(
                            Some(&pod),
                            EventType::Normal,
                            "ReplacingPod",
                            "Failover",
                            format!("deleting lost pod {pod}; a fresh standby replaces it"),
                        )
                        .await;
                    }
                    StepResult::ReplacePending
                }
            }
        })
    }

    /// Verification checklist: target live (internal API answers), Ready, active with the
    /// epoch, and no other instance reporting active.
    async fn verify(
        &self,
        pod: &str,
        epoch: i64,
        world: &World,
        api: Option<&dyn InstanceApi>,
    ) -> Result<StepResult, Error> {
        let Some(api) = api else {
            return Ok(StepResult::NotYetVerified);
        };
        let Some(t) = world.target(pod) else {
            return Ok(StepResult::NotYetVerified);
        };
        let live_pod = self.api::<Pod>().get_opt(pod).await?;
        let ready = live_pod.as_ref().is_some_and(|p| observe::pod_ready(p).0);
        let s = match api.status(&t).await {
            Ok(s) => s,
            Err(_) => return Ok(StepResult::NotYetVerified),
        };
        if s.role() != Role::Active || s.epoch != epoch {
            return Ok(StepResult::TargetNotActive);
        }
        if let Some(peer) = self.names.peer(pod) {
            if let Some(pt) = world.target(&peer) {
                if let Ok(ps) = api.status(&pt).await {
                    if ps.role() == Role::Active {
                        // Fenced already; tell it so only one instance reports active.
                        let _ = api.demote(&pt, Duration::from_secs(5)).await;
                        return Ok(StepResult::NotYetVerified);
                    }
                }
            }
        }
        // The registry in SQL covers a peer the operator cannot reach (node cut off): exactly
        // one alive active row, and it is the target with the new epoch.
        let rows = match api.instances(&t).await {
            Ok(rows) => rows,
            Err(_) => return Ok(StepResult::NotYetVerified),
        };
        if !single_active_row(&rows, pod, Some(epoch)) {
            return Ok(StepResult::NotYetVerified);
        }
        Ok(if ready {
            StepResult::Verified
        } else {
            StepResult::NotYetVerified
        })
    }

    // ----------------------------------------------------------------------------- checks

    /// RelaysReconnected on every reconcile where the active answers and no cutover runs;
    /// CanarySync once per verified switchover/failover/upgrade, after it is recorded (the
    /// cutover's duration and events are already written when the canary runs).
    async fn post_checks(
        &self,
        st: &IdentityMeshClusterStatus,
        world: &World,
        api: Option<&Arc<dyn InstanceApi>>,
    ) -> Checks {
        let running = st.cutover.is_some();
        let active = st.active_pod.as_deref();
        let live = active
            .and_then(|a| world.views.iter().find(|v| v.name == a))
            .is_some_and(|v| v.server.is_some());
        let target = active.and_then(|a| world.target(a));
        let relays = match (api, &target) {
            (Some(api), Some(t)) if live && !running => {
                let r = api.relays(t).await;
                if let Err(e) = &r {
                    tracing::debug!(pod = %t.pod, error = %e, "relay check failed");
                }
                Some(relays_condition(&t.pod, r.as_ref()))
            }
            _ => relays_not_asked(active, running),
        };
        let admin_ui = match (api, &target) {
            (Some(api), Some(t)) if live && !running => {
                let r = api.ui(t).await;
                if let Err(e) = &r {
                    tracing::debug!(pod = %t.pod, error = %e, "Admin UI check failed");
                }
                Some(admin_ui_condition(&t.pod, r.as_ref()))
            }
            _ => admin_ui_not_asked(active, running),
        };

        let current = observe::get_condition(&st.conditions, CANARY_CONDITION);
        let canary = match canary_plan(
            st.last_transition.as_ref(),
            active,
            running,
            current,
            Timestamp::now(),
        ) {
            plan @ (CanaryPlan::Keep | CanaryPlan::Set(_)) => {
                // Not due (or a cutover runs): an unanswered canary covers nothing any more.
                self.ctx
                    .canaries
                    .poll(&self.cluster_key(), None, || None, CANARY_WAIT);
                match plan {
                    CanaryPlan::Set(v) => Some(v),
                    _ => None,
                }
            }
            CanaryPlan::Run { pod, key } => {
                let start = || Some((api?.clone(), world.target(&pod)?));
                let Some(r) = self.ctx.canaries.poll(
                    &self.cluster_key(),
                    Some((&key, &pod)),
                    start,
                    CANARY_WAIT,
                ) else {
                    // Running: the condition stays as it is until it answers.
                    return Checks {
                        relays,
                        admin_ui,
                        canary: None,
                    };
                };
                if let Err(e) = &r {
                    tracing::warn!(pod, error = %e, "canary sync could not run");
                }
                let v = canary_condition(&key, &pod, CANARY_WAIT, r.as_ref());
                // One event per result (a retry that fails the same way stays quiet).
                let same = current.is_some_and(|c| {
                    c.status == v.status && c.reason == v.reason && c.message == v.message
                });
                if !same {
                    let t = if v.status == "True" {
                        EventType::Normal
                    } else {
                        EventType::Warning
                    };
                    // Event reasons name the canary (the condition's reason is in its context).
                    let reason = match v.reason {
                        "ActiveUnreachable" => "CanaryNotRun",
                        r => r,
                    };
                    self.event_about(Some(&pod), t, reason, "Canary", v.message.clone())
                        .await;
                }
                Some(v)
            }
        };
        Checks {
            relays,
            admin_ui,
            canary,
        }
    }

    // ----------------------------------------------------------------------------- status

    fn set_conditions(
        &self,
        st: &mut IdentityMeshClusterStatus,
        f: &Findings,
        world: &World,
        plan_phase: Option<&(Phase, String)>,
        checks: &Checks,
    ) {
        let gen = self.imc.metadata.generation;
        let now = self.now;
        let c = &mut st.conditions;
        if f.secret_problems.is_empty() {
            set_condition(
                c,
                "SecretsReady",
                "True",
                "Found",
                "referenced Secrets and keys are present",
                gen,
                now,
            );
        } else {
            set_condition(
                c,
                "SecretsReady",
                "False",
                "SecretProblem",
                &f.secret_problems.join("; "),
                gen,
                now,
            );
        }
        match &f.cert_problem {
            None => set_condition(
                c,
                "CertificatesReady",
                "True",
                "Issued",
                "CA and serving certificate are in place",
                gen,
                now,
            ),
            Some(p) => set_condition(
                c,
                "CertificatesReady",
                "False",
                "CertificateProblem",
                p,
                gen,
                now,
            ),
        }
        match &f.keyring_problem {
            None => set_condition(
                c,
                "KeyRingReady",
                "True",
                "Present",
                "key ring Secret is valid",
                gen,
                now,
            ),
            Some(p) => set_condition(c, "KeyRingReady", "False", "KeyRingProblem", p, gen, now),
        }

        // Verification checklist for the current active.
        let active = st.active_pod.clone();
        let av = active
            .as_deref()
            .and_then(|a| world.views.iter().find(|v| v.name == a));
        let live = av.is_some_and(|v| v.server.is_some());
        let ready = av.is_some_and(|v| v.pod_ready);
        // Prefer the registry in SQL (it sees pods the operator cannot reach); fall back on the
        // pods' own answers.
        let (actives, single): (Vec<&str>, bool) = match &world.rows {
            Some(rows) => (
                rows.iter()
                    .filter(|r| r.is_active())
                    .map(|r| r.instance.as_str())
                    .collect(),
                active
                    .as_deref()
                    .is_some_and(|a| single_active_row(rows, a, None)),
            ),
            None => {
                let actives: Vec<&str> = world
                    .views
                    .iter()
                    .filter(|v| v.server.as_ref().is_some_and(|s| s.role == Role::Active))
                    .map(|v| v.name.as_str())
                    .collect();
                let single = actives.len() == 1 && Some(actives[0]) == active.as_deref();
                (actives, single)
            }
        };
        let b = |x: bool| if x { "True" } else { "False" };
        set_condition(
            c,
            "ActiveLive",
            b(live),
            if live {
                "InternalApiAnswers"
            } else {
                "InternalApiUnreachable"
            },
            &format!("active {}", display(active.as_deref().unwrap_or(""))),
            gen,
            now,
        );
        set_condition(
            c,
            "ActiveReady",
            b(ready),
            if ready { "PodReady" } else { "PodNotReady" },
            &format!("active {}", display(active.as_deref().unwrap_or(""))),
            gen,
            now,
        );
        set_condition(
            c,
            "SingleActive",
            b(single),
            if single {
                "ExactlyOneActive"
            } else {
                "ActiveCountMismatch"
            },
            &format!("instances reporting active: [{}]", actives.join(", ")),
            gen,
            now,
        );
        // None: keep the condition as it is (e.g. relays while a cutover moves them).
        for (type_, v) in [
            (RELAYS_CONDITION, &checks.relays),
            (ADMIN_UI_CONDITION, &checks.admin_ui),
            (CANARY_CONDITION, &checks.canary),
        ] {
            if let Some(v) = v {
                set_condition(c, type_, v.status, v.reason, &v.message, gen, now);
            }
        }

        self.set_stall_condition(st);

        // Phase and Ready.
        let c = &mut st.conditions;
        let standby_ok = st
            .standby_pod
            .as_deref()
            .and_then(|s| world.views.iter().find(|v| v.name == s))
            .is_some_and(|v| health(v).is_healthy());
        let phase = if let Some(cut) = &st.cutover {
            phase_of(cut.kind)
        } else if let Some((p, _)) = plan_phase {
            if active.is_none() {
                Phase::Provisioning
            } else {
                *p
            }
        } else if active.is_none() {
            if world.pods.is_empty() {
                Phase::Pending
            } else {
                Phase::Provisioning
            }
        } else if live && ready && standby_ok {
            Phase::Running
        } else {
            Phase::Degraded
        };
        st.phase = Some(phase);
        let (rs, reason, msg) = match phase {
            Phase::Running => (
                "True",
                "Running",
                "active serving, standby ready".to_string(),
            ),
            _ => (
                "False",
                phase.as_str(),
                plan_phase
                    .map(|(_, m)| m.clone())
                    .unwrap_or_else(|| format!("phase {}", phase.as_str())),
            ),
        };
        set_condition(c, "Ready", rs, reason, &msg, gen, now);
    }

    /// CutoverStalled from the running cutover (or the end of a stalled one); returns the
    /// message when it is set True (for the Event).
    fn set_stall_condition(&self, st: &mut IdentityMeshClusterStatus) -> Option<String> {
        let was_stalled = observe::get_condition(&st.conditions, STALLED_CONDITION)
            .is_some_and(|x| x.status == "True");
        let (status, msg, reason) = cutover::stall_condition(
            st.cutover.as_ref(),
            st.last_transition.as_ref().map(|t| (t, was_stalled)),
            self.imc.spec.cutover_timeout_seconds,
        )?;
        set_condition(
            &mut st.conditions,
            STALLED_CONDITION,
            status,
            reason,
            &msg,
            self.imc.metadata.generation,
            self.now,
        );
        (status == "True").then_some(msg)
    }

    async fn write_status_if_changed(
        &mut self,
        old: &IdentityMeshClusterStatus,
        new: &IdentityMeshClusterStatus,
    ) -> Result<(), Error> {
        if old == new {
            return Ok(());
        }
        self.write_status(new).await
    }

    /// Replace status, conditional on the resourceVersion this reconcile read (409 when anyone
    /// wrote the object since: the reconcile is recomputed from a fresh read instead).
    async fn write_status(&mut self, st: &IdentityMeshClusterStatus) -> Result<(), Error> {
        let api: Api<IdentityMeshCluster> = self.api();
        let mut obj = (*self.imc).clone();
        obj.status = Some(st.clone());
        obj.metadata.resource_version = self.rv.clone();
        obj.metadata.managed_fields = None;
        let pp = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        let written = api
            .replace_status(&self.names.cluster, &pp, &obj)
            .await
            .map_err(|e| self.conflict(e))?;
        self.writes += 1;
        self.adopt(written);
        Ok(())
    }

    /// Remove the switchover request, conditional on the resourceVersion read (a request
    /// written meanwhile is not lost).
    async fn clear_switchover_annotation(&mut self) -> Result<(), Error> {
        let api: Api<IdentityMeshCluster> = self.api();
        let patch = serde_json::json!({"metadata": {
            "resourceVersion": self.rv,
            "annotations": {ANNOTATION_SWITCHOVER: null},
        }});
        let written = api
            .patch(
                &self.names.cluster,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .map_err(|e| self.conflict(e))?;
        self.writes += 1;
        self.adopt(written);
        Ok(())
    }

    /// The answer to a switchover request goes to status before the request is removed, so a
    /// request is never consumed without a trace (a failed write leaves it for the next try).
    async fn record_request(
        &mut self,
        st: &mut IdentityMeshClusterStatus,
        status: &str,
        reason: &str,
        msg: &str,
    ) -> Result<(), Error> {
        let gen = self.imc.metadata.generation;
        set_condition(
            &mut st.conditions,
            SWITCHOVER_CONDITION,
            status,
            reason,
            msg,
            gen,
            self.now,
        );
        self.write_status(st).await?;
        self.clear_switchover_annotation().await
    }

    /// Our own write is the newest version: later writes this reconcile build on it.
    fn adopt(&mut self, written: IdentityMeshCluster) {
        self.rv = written.metadata.resource_version.clone();
        self.imc = Arc::new(written);
    }

    fn conflict(&self, e: kube::Error) -> Error {
        match e {
            kube::Error::Api(s) if s.code == 409 => Error::Conflict(self.names.cluster.clone()),
            e => e.into(),
        }
    }
}

/// Results of the post-cutover checks; None leaves a condition unchanged.
struct Checks {
    relays: Option<CondValue>,
    admin_ui: Option<CondValue>,
    canary: Option<CondValue>,
}

/// What the controller observed of both slots.
struct World {
    views: [InstanceView; 2],
    pods: HashMap<String, Pod>,
    targets: HashMap<String, PodTarget>,
    /// Alive registry rows from SQL, when a pod answered.
    rows: Option<Vec<InstanceRow>>,
}

/// Exactly one alive row reports active, it is `pod`, and (if given) it holds `epoch`.
fn single_active_row(rows: &[InstanceRow], pod: &str, epoch: Option<i64>) -> bool {
    let mut actives = rows.iter().filter(|r| r.is_active());
    match (actives.next(), actives.next()) {
        (Some(r), None) => r.instance == pod && epoch.is_none_or(|e| r.epoch == e),
        _ => false,
    }
}

impl World {
    fn target(&self, pod: &str) -> Option<PodTarget> {
        self.targets.get(pod).cloned()
    }
}

fn phase_of(kind: CutoverKind) -> Phase {
    match kind {
        CutoverKind::Initial => Phase::Provisioning,
        CutoverKind::Switchover => Phase::SwitchingOver,
        CutoverKind::Failover => Phase::FailingOver,
        CutoverKind::Upgrade => Phase::Upgrading,
    }
}

fn display(pod: &str) -> &str {
    if pod.is_empty() {
        "(none)"
    } else {
        pod
    }
}

mod canary;
#[cfg(test)]
mod fakes;
#[cfg(test)]
mod tests;
