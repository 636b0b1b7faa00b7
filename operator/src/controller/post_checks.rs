//! Post-cutover checks against the active: RelaysReconnected and AdminUiReady (asked on every
//! reconcile where the active answers and no cutover runs) and CanarySync (once per verified
//! transition, run off the reconcile path). The decisions are in `crate::checks`.

use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::EventType;

use super::world::World;
use super::Reconciler;
use crate::checks::{
    admin_ui_condition, admin_ui_not_asked, canary_condition, canary_plan, relays_condition,
    relays_not_asked, CanaryPlan, CondValue, CANARY_WAIT,
};
use crate::conditions::CANARY_CONDITION;
use crate::crd::IdentityMeshClusterStatus;
use crate::observe;
use crate::podclient::InstanceApi;

/// Results of the post-cutover checks; None leaves a condition unchanged.
pub(super) struct Checks {
    pub(super) relays: Option<CondValue>,
    pub(super) admin_ui: Option<CondValue>,
    pub(super) canary: Option<CondValue>,
}

impl Reconciler {
    /// RelaysReconnected on every reconcile where the active answers and no cutover runs;
    /// CanarySync once per verified switchover/failover/upgrade, after it is recorded (the
    /// cutover's duration and events are already written when the canary runs).
    pub(super) async fn post_checks(
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
}
