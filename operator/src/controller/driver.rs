//! The reconcile driver: the steps in their order, one named call each; what each step does is
//! in its module. Status is written last, and only if it changed.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::runtime::controller::Action as ReconcileAction;
use kube::runtime::events::EventType;

use super::status::{self, Steps};
use super::world::World;
use super::{Error, Reconciler};
use crate::builders::secret::ca_from_secret;
use crate::conditions::PAUSED_CONDITION;
use crate::crd::IdentityMeshClusterStatus;
use crate::cutover::{health, selector_target};
use crate::observe;
use crate::podclient::PodTarget;

/// Requeue while a cutover runs, and the steady-state poll of the pods' roles (reads only).
const CUTOVER_REQUEUE: Duration = Duration::from_millis(500);
pub(super) const STEADY_REQUEUE: Duration = Duration::from_secs(2);
/// A paused cluster is only looked at again this often (or on a change).
const PAUSED_REQUEUE: Duration = Duration::from_secs(60);

impl Reconciler {
    /// One reconcile of a cluster that is not being deleted.
    pub(super) async fn apply(mut self) -> Result<ReconcileAction, Error> {
        self.refresh().await?;
        let old = self.imc.status.clone().unwrap_or_default();
        let mut st = old.clone();
        if self.imc.spec.paused {
            return self.pause(&old, st).await;
        }
        observe::remove_condition(&mut st.conditions, PAUSED_CONDITION);
        let (findings, ca) = self.secrets_and_certificates().await?;
        self.apply_config().await?;
        self.report_problems(&old, &findings).await;
        let pod_api = self.pod_client(ca.as_ref())?;
        let world = self.observe(pod_api.as_deref()).await?;
        // The Service follows status (and the running cutover's step); the disruption budget
        // follows the Service (why in that order: `ensure_disruption_budget`).
        let selected = selector_target(st.active_pod.as_deref(), st.cutover.as_ref());
        self.ensure_client_service(selected).await?;
        self.ensure_disruption_budget(selected).await?;
        let plan_phase = self.plan(&mut st, &world, pod_api.as_deref()).await?;
        if st.cutover.is_some() {
            self.drive(&mut st, &world, pod_api.as_deref()).await?;
        }
        // Pods last among children: a missing slot gets a fresh standby. Its failure is
        // reported in status before it fails the reconcile.
        let pods = self.ensure_pods(&world).await;
        let checks = self.post_checks(&st, &world, pod_api.as_ref()).await;
        let steps = Steps {
            findings: &findings,
            world: &world,
            plan_phase: plan_phase.as_ref(),
            checks: &checks,
            pods_error: pods.as_ref().err(),
        };
        self.update_status(&old, &mut st, &steps).await?;
        pods?;
        if self.writes > 0 {
            tracing::debug!(cluster = %self.names.cluster, writes = self.writes, "reconciled");
        }
        Ok(ReconcileAction::requeue(self.next_look(&st, &world)))
    }

    /// A paused cluster: status says so, nothing else is touched.
    async fn pause(
        &mut self,
        old: &IdentityMeshClusterStatus,
        mut st: IdentityMeshClusterStatus,
    ) -> Result<ReconcileAction, Error> {
        // No sync runs on a paused cluster's behalf either.
        self.ctx.canaries.drop_cluster(&self.cluster_key());
        status::paused(&mut st, self.imc.metadata.generation, self.now);
        self.write_status_if_changed(old, &st).await?;
        Ok(ReconcileAction::requeue(PAUSED_REQUEUE))
    }

    /// Look again soon while anything is off: failover timing depends on noticing early. A
    /// refused spec is not something a quick look fixes: the steady poll (refused writes
    /// themselves wait for their backoff), unless a cutover runs.
    fn next_look(&self, st: &IdentityMeshClusterStatus, world: &World) -> Duration {
        let unsettled = st.cutover.is_some()
            || (self.refused.is_empty() && world.views.iter().any(|v| !health(v).is_healthy()));
        if unsettled {
            CUTOVER_REQUEUE
        } else {
            STEADY_REQUEUE
        }
    }

    /// The cluster is being deleted.
    pub(super) async fn cleanup(self) -> Result<ReconcileAction, Error> {
        self.ctx.canaries.drop_cluster(&self.cluster_key());
        // Owner references garbage-collect every child. Demote the active first so its engine
        // stops at a batch boundary instead of being killed mid-run.
        if let Some(active) = self.imc.status.as_ref().and_then(|s| s.active_pod.clone()) {
            let secret: Option<Secret> = self
                .api::<Secret>()
                .get_opt(&self.names.ca_secret())
                .await
                .map_err(Error::ReadSecret)?;
            if let Some(ca) = secret.as_ref().and_then(ca_from_secret) {
                if let Ok(api) = self.ctx.instances.for_cluster(&self.cluster_key(), &ca) {
                    let pod = self
                        .api::<Pod>()
                        .get_opt(&active)
                        .await
                        .map_err(Error::ReadPods)?;
                    if let Some(pod) = pod {
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
}
