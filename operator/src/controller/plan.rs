//! Planning: resume the persisted cutover (refusing a switchover request meanwhile), or ask the
//! pure planner what to do next and act on its answer. A new cutover's intent is written to
//! status before anything acts on it.

use std::time::Duration;

use kube::runtime::events::EventType;
use kube::ResourceExt;

use super::world::World;
use super::{display, phase_of, Error, Reconciler};
use crate::builders::ANNOTATION_SWITCHOVER;
use crate::conditions::{FAILOVER_REQUIRED_CONDITION, SWITCHOVER_CONDITION};
use crate::crd::{IdentityMeshClusterStatus, Phase};
use crate::cutover::{self, drain, plan, Plan, PlanInput};
use crate::observe::{self, set_condition};
use crate::podclient::InstanceApi;

impl Reconciler {
    /// The step; returns the phase (and why) the plan calls for when no cutover runs.
    pub(super) async fn plan(
        &mut self,
        st: &mut IdentityMeshClusterStatus,
        world: &World,
        instance_api: Option<&dyn InstanceApi>,
    ) -> Result<Option<(Phase, String)>, Error> {
        let imc = self.imc.clone();
        let gen = imc.metadata.generation;
        let mut plan_phase: Option<(Phase, String)> = None;
        let request = imc.annotations().get(ANNOTATION_SWITCHOVER).cloned();
        if let Some(c) = st.cutover.clone() {
            if let Some(req) = &request {
                // Refused, not queued: what "standby" names changes when the running cutover
                // finishes, so running it later could undo the cutover the user just saw start.
                let msg = cutover::switchover_refused_during(&c, req);
                self.record_request(st, "False", "CutoverInProgress", &msg)
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
                    if c.reason == drain::NODE_DRAIN_REASON {
                        let node = world
                            .views
                            .iter()
                            .find(|v| v.name == c.from)
                            .and_then(|v| v.node.clone())
                            .unwrap_or_else(|| "(unknown)".into());
                        self.event_about(
                            Some(&c.from),
                            EventType::Normal,
                            drain::NODE_DRAIN_REASON,
                            c.kind.as_str(),
                            format!(
                                "node {node} of active {} is cordoned: switching over to {} (epoch {}) so the drain can evict {} once it is the standby",
                                c.from, c.target, c.epoch, c.from
                            ),
                        )
                        .await;
                    }
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
                    self.write_status(st).await?;
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
                    if let (Some(api), Some(t)) = (instance_api, world.target(&pod)) {
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
                    if observe::get_condition(&st.conditions, FAILOVER_REQUIRED_CONDITION)
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
                        FAILOVER_REQUIRED_CONDITION,
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
                    self.record_request(st, "False", "Rejected", &msg).await?;
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
            observe::remove_condition(&mut st.conditions, FAILOVER_REQUIRED_CONDITION);
        }
        Ok(plan_phase)
    }
}
