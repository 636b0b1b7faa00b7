//! Driving a cutover: run the persisted intent's current action against the pods (demote,
//! promote, swing the Service, verify, replace a lost pod), let the pure state machine advance
//! it, and persist every new intent before it acts.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::EventType;

use super::status::set_stall_condition;
use super::world::{single_active_row, World};
use super::{display, phase_of, Error, Reconciler};
use crate::crd::{CutoverIntent, IdentityMeshClusterStatus, Role, TransitionRecord};
use crate::cutover::{
    self, action, advance, health, is_promotable, Action, Outcome, StepContext, StepResult,
};
use crate::observe;
use crate::podclient::{InstanceApi, PodClientError};

/// How long a lost pod whose process answers again may take to become Ready before it is
/// replaced anyway.
const REPLACE_GRACE: Duration = Duration::from_secs(60);

impl Reconciler {
    /// Run the persisted cutover step by step; every new intent is persisted before it acts.
    pub(super) async fn drive(
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
                    let stalled = set_stall_condition(
                        st,
                        self.imc.spec.cutover_timeout_seconds,
                        self.imc.metadata.generation,
                        self.now,
                    );
                    if let Some(msg) = stalled.filter(|_| newly_stalled) {
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

    /// Record the finished cutover: the new active, the transition, its metric and Event.
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

    /// Carry out the intent's current action and say how it went.
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
            Action::Swing { pod } => {
                let swung = self.swing(&pod).await;
                if swung == StepResult::Swung {
                    // The budget follows the Service at once, so the drain's next eviction of
                    // the old active is allowed. Its failure does not undo the swing: the next
                    // reconcile's routing step writes it again (and fails visibly if it must).
                    if let Err(e) = self.ensure_disruption_budget(Some(&pod)).await {
                        tracing::warn!(pod, error = %e, "moving the PodDisruptionBudget failed; retried next reconcile");
                    }
                }
                swung
            }
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

    /// Write the client Service's selector to `pod`: Swung only when the write went through
    /// (not when the Service belongs to someone else or the apiserver refused it).
    async fn swing(&mut self, pod: &str) -> StepResult {
        let svc = format!("Service/{}", self.names.client_service());
        match self.ensure_client_service(Some(pod)).await {
            Ok(_) if self.conflicts.contains_key(&svc) || self.refused.contains_key(&svc) => {
                StepResult::SwingFailed
            }
            Ok(_) => StepResult::Swung,
            Err(e) => {
                tracing::warn!(error = %e, "swinging the Service failed");
                StepResult::SwingFailed
            }
        }
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
        let live_pod = self
            .api::<Pod>()
            .get_opt(pod)
            .await
            .map_err(Error::ReadPods)?;
        let ready = live_pod.as_ref().is_some_and(|p| observe::pod_ready(p).0);
        let s = match api.status(&t).await {
            Ok(s) => s,
            Err(_) => return Ok(StepResult::NotYetVerified),
        };
        if Role::from(s.role) != Role::Active || s.epoch != epoch {
            return Ok(StepResult::TargetNotActive);
        }
        if let Some(peer) = self.names.peer(pod) {
            if let Some(pt) = world.target(&peer) {
                if let Ok(ps) = api.status(&pt).await {
                    if Role::from(ps.role) == Role::Active {
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
}
