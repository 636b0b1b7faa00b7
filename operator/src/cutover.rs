//! The cutover state machine: which pod is active, and how the operator moves that role.
//!
//! Everything here is pure. The controller observes the world into [`InstanceView`]s, asks
//! [`plan`] what to do when no cutover is running, and otherwise runs the [`action`] of the
//! persisted [`CutoverIntent`] step and feeds the result to [`advance`]. Every new intent is
//! written to status *before* its action runs, so an operator restarted between any two steps
//! resumes from status with the same epoch (promote is idempotent for the holder of an epoch).
//!
//! Steps per kind:
//! - Switchover / Upgrade: Demoting → Promoting → Swinging → Verifying → done
//! - Failover:             Promoting → Swinging → Verifying → Replacing → done
//! - Initial:              Promoting → Swinging → Verifying → done

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use crate::crd::{CutoverIntent, CutoverKind, CutoverStep, FailoverPolicy, Role, StallRecord};

/// How long verification may take before the cutover is closed as VerificationFailed.
pub const VERIFY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a promoted-but-unreachable target is retried before rolling back to the old active.
pub const TARGET_LOST_AFTER: Duration = Duration::from_secs(30);

/// What the operator saw of one server pod this reconcile.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct InstanceView {
    pub name: String,
    pub exists: bool,
    pub deleting: bool,
    pub pod_ready: bool,
    /// When the pod's Ready condition last became False (if it is False).
    pub not_ready_since: Option<Timestamp>,
    /// Node Ready condition: None when unknown (no node yet, or not readable).
    pub node_ready: Option<bool>,
    pub node_not_ready_since: Option<Timestamp>,
    /// The node the pod is bound to (spec.nodeName), for messages.
    pub node: Option<String>,
    /// The node is cordoned (being drained, or kept for maintenance): None when the pod has no
    /// node yet or the node could not be read, so nothing is decided on a guess.
    pub node_cordoned: Option<bool>,
    /// Internal API status, when reachable.
    pub server: Option<ServerView>,
    /// When the operator first saw this pod unhealthy (kept in memory across reconciles).
    pub first_seen_unhealthy: Option<Timestamp>,
    /// Pod matches the desired pod (image, config); false means it must be rolled.
    pub up_to_date: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerView {
    pub role: Role,
    pub epoch: i64,
    pub version: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Health {
    Healthy,
    /// Unhealthy since `since` (None: just noticed) for `reason`.
    Unhealthy {
        since: Option<Timestamp>,
        reason: &'static str,
    },
}

impl Health {
    pub fn is_healthy(&self) -> bool {
        matches!(self, Health::Healthy)
    }
}

fn earliest(a: Option<Timestamp>, b: Option<Timestamp>) -> Option<Timestamp> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

/// Health of a pod as a candidate to serve (live process, Ready, node fine, internal API up).
pub fn health(v: &InstanceView) -> Health {
    let seen = v.first_seen_unhealthy;
    if !v.exists {
        return Health::Unhealthy {
            since: seen,
            reason: "PodMissing",
        };
    }
    if v.deleting {
        return Health::Unhealthy {
            since: seen,
            reason: "PodTerminating",
        };
    }
    if v.node_ready == Some(false) {
        return Health::Unhealthy {
            since: earliest(v.node_not_ready_since, seen),
            reason: "NodeNotReady",
        };
    }
    if !v.pod_ready {
        return Health::Unhealthy {
            since: earliest(v.not_ready_since, seen),
            reason: "PodNotReady",
        };
    }
    if v.server.is_none() {
        return Health::Unhealthy {
            since: seen,
            reason: "InternalApiUnreachable",
        };
    }
    Health::Healthy
}

/// A healthy pod that reports the standby role: a pod that can be promoted now.
pub fn is_promotable(v: &InstanceView) -> bool {
    health(v).is_healthy() && v.server.as_ref().is_some_and(|s| s.role == Role::Standby)
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Milliseconds from `from` to `to` (negative when `to` is earlier).
pub fn elapsed_ms(from: Timestamp, to: Timestamp) -> i64 {
    to.as_millisecond() - from.as_millisecond()
}

fn older_than(since: Timestamp, now: Timestamp, d: Duration) -> bool {
    elapsed_ms(since, now) >= secs(d)
}

// ---------------------------------------------------------------------------------------------
// Step actions and results

/// What the controller must do for the current step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// POST /internal/v1/demote on the old active (bounded by the drain timeout).
    Demote { pod: String },
    /// POST /internal/v1/promote {epoch} on the target.
    Promote { pod: String, epoch: i64 },
    /// Write the client Service selector to the target.
    Swing { pod: String },
    /// Check: target live, Ready, internal status active with the epoch, no other active.
    Verify { pod: String, epoch: i64 },
    /// Make sure the lost pod is replaced by a fresh standby (delete it if it is still there
    /// and not healthy; the pod builder recreates it).
    Replace { pod: String },
}

pub fn action(c: &CutoverIntent) -> Action {
    match c.step {
        CutoverStep::Demoting => Action::Demote {
            pod: c.from.clone(),
        },
        CutoverStep::Promoting => Action::Promote {
            pod: c.target.clone(),
            epoch: c.epoch,
        },
        CutoverStep::Swinging => Action::Swing {
            pod: c.target.clone(),
        },
        CutoverStep::Verifying => Action::Verify {
            pod: c.target.clone(),
            epoch: c.epoch,
        },
        CutoverStep::Replacing => Action::Replace {
            pod: c.from.clone(),
        },
    }
}

/// The outcome of running the step's action.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StepResult {
    Demoted {
        drained: bool,
    },
    /// Demote errored, timed out or the pod was unreachable.
    DemoteFailed,
    Promoted,
    /// 409: the epoch is not above the one stored in SQL. `stored` when the server says it.
    PromoteRefused {
        stored: Option<i64>,
    },
    /// Transport error, 5xx, unreachable.
    PromoteFailed,
    Swung,
    SwingFailed,
    Verified,
    /// Not yet: not Ready, or another instance still reports active.
    NotYetVerified,
    /// The target reports standby (it restarted, or was fenced): promote it again.
    TargetNotActive,
    /// The lost pod is gone, recreated, or healthy again as a standby.
    Replaced,
    ReplacePending,
}

/// Facts beyond the action's own result that a step decision needs.
#[derive(Clone, Debug, PartialEq)]
pub struct StepContext {
    pub now: Timestamp,
    pub drain_timeout: Duration,
    /// The target pod is healthy (or was, recently enough to keep trying).
    pub target_healthy: bool,
    /// The `from` pod can be promoted (healthy, standby role): a rollback target.
    pub from_promotable: bool,
    /// spec.cutoverTimeoutSeconds: how long from the start the target may take to serve.
    pub stall_after: Duration,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Nothing to persist; retry the same action later.
    Stay,
    /// Persist this intent, then act on it.
    Update(CutoverIntent),
    /// The cutover is over: `verified` is false when verification timed out.
    Finished {
        intent: CutoverIntent,
        verified: bool,
    },
}

fn next_step(c: &CutoverIntent, step: CutoverStep, now: Timestamp) -> CutoverIntent {
    CutoverIntent {
        step,
        step_started: Time(now),
        ..c.clone()
    }
}

/// Roll back to the old active with a fresh epoch. The target may already hold `epoch` in SQL,
/// so re-promoting `from` needs a higher one.
fn roll_back(c: &CutoverIntent, now: Timestamp) -> CutoverIntent {
    CutoverIntent {
        from: c.target.clone(),
        target: c.from.clone(),
        epoch: c.epoch + 1,
        step: CutoverStep::Promoting,
        reason: format!(
            "target {} lost during {}; restoring {}",
            c.target,
            c.kind.as_str(),
            c.from
        ),
        step_started: Time(now),
        verified: None,
        ..c.clone()
    }
}

/// Failovers end by replacing the lost pod (unless the pod was given its role back).
fn needs_replacement(c: &CutoverIntent) -> bool {
    c.kind == CutoverKind::Failover && c.from != c.target && !c.from.is_empty()
}

/// The pure transition: current intent × step result → what to persist next.
pub fn advance(c: &CutoverIntent, result: &StepResult, cx: &StepContext) -> Outcome {
    match advance_step(c, result, cx) {
        Outcome::Stay if failing_before_service(c.step, result) => {
            stall(c, cx).map_or(Outcome::Stay, Outcome::Update)
        }
        other => other,
    }
}

/// The step's action failed and the target does not serve yet: the results a cutover can get
/// stuck on. (Demoting is bounded by the drain timeout, Verifying by VERIFY_TIMEOUT, and
/// Replacing runs after service is back.)
fn failing_before_service(step: CutoverStep, r: &StepResult) -> bool {
    matches!(
        (step, r),
        (CutoverStep::Promoting, StepResult::PromoteFailed)
            | (CutoverStep::Swinging, StepResult::SwingFailed)
    )
}

/// A cutover that has not made its target serve within `stall_after` of its start, and is not
/// moving: what to record instead of waiting forever (None: nothing new to record).
///
/// The old active was demoted (or is lost) and requests are failing while this lasts, so the
/// most sensible end state is the one that serves soonest:
/// - the old active, if it is a healthy standby: it was serving moments ago, and promote on it
///   with epoch + 1 fences whatever the target may have taken (a promote whose answer was lost
///   may have committed); the Service still selects it before the swing, so no write is needed
///   for traffic to return;
/// - otherwise (a failover from a lost pod, the initial promotion, or an old active that is not
///   up) there is nothing better than the target: keep trying it, and report.
///
/// A rollback is never rolled back again (no ping-pong between two pods that both fail to take
/// the role); a kept-trying stall still rolls back if the old active becomes promotable later.
fn stall(c: &CutoverIntent, cx: &StepContext) -> Option<CutoverIntent> {
    if !older_than(c.started.0, cx.now, cx.stall_after) {
        return None;
    }
    let rolled_back = c.stalled.as_ref().is_some_and(|s| s.rolled_back);
    let can_roll_back =
        !rolled_back && !c.from.is_empty() && c.from != c.target && cx.from_promotable;
    if can_roll_back {
        let mut n = roll_back(c, cx.now);
        n.reason = format!(
            "{} {} → {} did not finish within {}s (stuck in {:?}); restoring {}",
            c.kind.as_str(),
            c.from,
            c.target,
            cx.stall_after.as_secs(),
            c.step,
            c.from
        );
        n.stalled = Some(StallRecord {
            at: Time(cx.now),
            step: c.step,
            target: c.target.clone(),
            rolled_back: true,
        });
        return Some(n);
    }
    if c.stalled.is_some() {
        return None;
    }
    Some(CutoverIntent {
        stalled: Some(StallRecord {
            at: Time(cx.now),
            step: c.step,
            target: c.target.clone(),
            rolled_back: false,
        }),
        ..c.clone()
    })
}

/// How a finished cutover is recorded in status.lastTransition.outcome.
pub fn outcome(c: &CutoverIntent, verified: bool) -> &'static str {
    match (verified, c.stalled.as_ref().is_some_and(|s| s.rolled_back)) {
        (true, false) => "Succeeded",
        (true, true) => "RolledBack",
        (false, _) => "VerificationFailed",
    }
}

/// The CutoverStalled condition as (status, reason, message): True while a stalled cutover runs,
/// False once it has ended (from `last`, when the condition was True before: `was_stalled`).
/// None: leave it as it is (no stall has happened).
pub fn stall_condition(
    running: Option<&CutoverIntent>,
    last: Option<(&crate::crd::TransitionRecord, bool)>,
    bound_secs: u32,
) -> Option<(&'static str, String, &'static str)> {
    if let Some(c) = running {
        let s = c.stalled.as_ref()?;
        let msg = if s.rolled_back {
            format!(
                "{} to {} did not finish within cutoverTimeoutSeconds={bound_secs} (stuck in {:?}); rolling back: promoting {} again with epoch {}",
                c.kind.as_str(),
                s.target,
                s.step,
                c.target,
                c.epoch
            )
        } else {
            format!(
                "{} {} → {} did not finish within cutoverTimeoutSeconds={bound_secs} (stuck in {:?}); {} cannot take the role back (not a healthy standby): still trying {} with epoch {}",
                c.kind.as_str(),
                if c.from.is_empty() { "(none)" } else { &c.from },
                c.target,
                s.step,
                if c.from.is_empty() { "no previous active" } else { &c.from },
                c.target,
                c.epoch
            )
        };
        let reason = if s.rolled_back {
            "RollingBack"
        } else {
            "StillTrying"
        };
        return Some(("True", msg, reason));
    }
    match last {
        Some((t, true)) => Some((
            "False",
            format!(
                "the stalled cutover ended: {} → {} epoch {}, outcome {}",
                if t.from.is_empty() { "(none)" } else { &t.from },
                t.to,
                t.epoch,
                t.outcome.as_deref().unwrap_or("unknown")
            ),
            "CutoverEnded",
        )),
        _ => None,
    }
}

/// Why a switchover request that arrives while a cutover runs is refused (status and Event).
pub fn switchover_refused_during(c: &CutoverIntent, request: &str) -> String {
    format!(
        "switchover request {}={request} refused: {} {} → {} (epoch {}) is in progress, step {:?}; request again once it has finished",
        crate::builders::ANNOTATION_SWITCHOVER,
        c.kind.as_str(),
        if c.from.is_empty() { "(none)" } else { &c.from },
        c.target,
        c.epoch,
        c.step
    )
}

fn advance_step(c: &CutoverIntent, result: &StepResult, cx: &StepContext) -> Outcome {
    let now = cx.now;
    let in_step_for = |d: Duration| older_than(c.step_started.0, now, d);
    // A target that stays unreachable before it is verified: give the role to the other pod if
    // it can take it (for a failover: the lost pod came back as a healthy standby).
    let target_lost = !cx.target_healthy && in_step_for(TARGET_LOST_AFTER);

    match (c.step, result) {
        (CutoverStep::Demoting, StepResult::Demoted { .. }) => {
            Outcome::Update(next_step(c, CutoverStep::Promoting, now))
        }
        (CutoverStep::Demoting, StepResult::DemoteFailed) => {
            if in_step_for(cx.drain_timeout) {
                // Drain overran its bound: promote anyway, the new epoch fences the old active.
                Outcome::Update(next_step(c, CutoverStep::Promoting, now))
            } else {
                Outcome::Stay
            }
        }
        (CutoverStep::Promoting, StepResult::Promoted) => {
            Outcome::Update(next_step(c, CutoverStep::Swinging, now))
        }
        (CutoverStep::Promoting, StepResult::PromoteRefused { stored }) => {
            let base = stored.unwrap_or(c.epoch).max(c.epoch);
            Outcome::Update(CutoverIntent {
                epoch: base + 1,
                step_started: Time(now),
                ..c.clone()
            })
        }
        (CutoverStep::Promoting, StepResult::PromoteFailed) => {
            if target_lost && cx.from_promotable {
                Outcome::Update(roll_back(c, now))
            } else {
                Outcome::Stay
            }
        }
        (CutoverStep::Swinging, StepResult::Swung) => {
            Outcome::Update(next_step(c, CutoverStep::Verifying, now))
        }
        (CutoverStep::Swinging, StepResult::SwingFailed) => Outcome::Stay,
        (CutoverStep::Verifying, StepResult::Verified) => {
            let done = CutoverIntent {
                verified: Some(Time(now)),
                ..c.clone()
            };
            if needs_replacement(c) {
                Outcome::Update(next_step(&done, CutoverStep::Replacing, now))
            } else {
                Outcome::Finished {
                    intent: done,
                    verified: true,
                }
            }
        }
        (CutoverStep::Verifying, StepResult::TargetNotActive) => {
            Outcome::Update(next_step(c, CutoverStep::Promoting, now))
        }
        (CutoverStep::Verifying, StepResult::NotYetVerified) => {
            if target_lost && cx.from_promotable {
                Outcome::Update(roll_back(c, now))
            } else if in_step_for(VERIFY_TIMEOUT) {
                let done = CutoverIntent {
                    verified: None,
                    ..c.clone()
                };
                if needs_replacement(c) {
                    Outcome::Update(next_step(&done, CutoverStep::Replacing, now))
                } else {
                    Outcome::Finished {
                        intent: done,
                        verified: false,
                    }
                }
            } else {
                Outcome::Stay
            }
        }
        (CutoverStep::Replacing, StepResult::Replaced) => Outcome::Finished {
            intent: c.clone(),
            verified: c.verified.is_some(),
        },
        (CutoverStep::Replacing, StepResult::ReplacePending) => Outcome::Stay,
        // A result that does not belong to the step (stale, or a bug): change nothing.
        _ => Outcome::Stay,
    }
}

// ---------------------------------------------------------------------------------------------
// Planning when no cutover is running

/// What the cluster resource asks for and what status records.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanInput {
    pub now: Timestamp,
    pub policy: FailoverPolicy,
    pub unhealthy_after: Duration,
    /// status.activePod
    pub active: Option<String>,
    /// status.epoch: the highest epoch issued.
    pub epoch: i64,
    /// Value of the identitymesh.io/switchover annotation, if set.
    pub switchover_request: Option<String>,
    pub pods: [InstanceView; 2],
}

#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    /// Persist and run this cutover.
    Start(CutoverIntent),
    /// Delete this standby pod so it is recreated from the current template (upgrade/rollout).
    RollStandby {
        pod: String,
    },
    /// The standby reports the active role (stale): demote it.
    DemoteStray {
        pod: String,
    },
    /// Manual policy: the active is unhealthy; report and wait for a switchover request.
    FailoverRequired {
        active: String,
        reason: String,
    },
    /// Switchover request that cannot be honoured (reason for the event).
    RejectSwitchover {
        reason: String,
    },
    /// Nothing to do now (reason for the phase/condition, empty when all is well).
    Wait {
        reason: String,
    },
    Steady,
}

fn intent(
    kind: CutoverKind,
    step: CutoverStep,
    from: &str,
    target: &str,
    epoch: i64,
    reason: String,
    now: Timestamp,
) -> CutoverIntent {
    CutoverIntent {
        kind,
        step,
        from: from.to_string(),
        target: target.to_string(),
        epoch,
        reason,
        started: Time(now),
        step_started: Time(now),
        verified: None,
        stalled: None,
    }
}

/// Highest epoch the operator knows of: status, or any pod's report (a restored database or
/// a lost status can be ahead of status).
fn known_epoch(p: &PlanInput) -> i64 {
    p.pods
        .iter()
        .filter_map(|v| v.server.as_ref().map(|s| s.epoch))
        .fold(p.epoch, i64::max)
}

/// Decide the next move when no cutover is in progress.
pub fn plan(p: &PlanInput) -> Plan {
    let next_epoch = known_epoch(p) + 1;
    let by_name = |n: &str| p.pods.iter().find(|v| v.name == n);

    // Bootstrap: nobody has been made active yet.
    let Some(active_name) = p.active.clone() else {
        // A pod may already be active from before status was lost: adopt it by re-promoting
        // it with a fresh epoch rather than promoting the other one.
        let candidate = p
            .pods
            .iter()
            .find(|v| {
                health(v).is_healthy() && v.server.as_ref().is_some_and(|s| s.role == Role::Active)
            })
            .or_else(|| p.pods.iter().find(|v| is_promotable(v)));
        return match candidate {
            Some(v) => Plan::Start(intent(
                CutoverKind::Initial,
                CutoverStep::Promoting,
                "",
                &v.name,
                next_epoch,
                "initial promotion".into(),
                p.now,
            )),
            None => Plan::Wait {
                reason: "waiting for a Ready server pod to promote".into(),
            },
        };
    };

    let Some(active) = by_name(&active_name) else {
        return Plan::Wait {
            reason: format!("status.activePod {active_name} is not one of this cluster's pods"),
        };
    };
    let Some(standby) = p.pods.iter().find(|v| v.name != active_name) else {
        return Plan::Wait {
            reason: "no standby pod".into(),
        };
    };

    // Planned switchover on request.
    if let Some(req) = &p.switchover_request {
        let target = if req == "standby" {
            standby.name.clone()
        } else {
            req.clone()
        };
        if target == active.name {
            return Plan::RejectSwitchover {
                reason: format!("{target} is already the active pod"),
            };
        }
        if target != standby.name {
            return Plan::RejectSwitchover {
                reason: format!(
                    "{target:?} is not a pod of this cluster; use \"standby\" or {}",
                    standby.name
                ),
            };
        }
        if !is_promotable(standby) {
            return Plan::RejectSwitchover {
                reason: format!("standby {} is not ready to take over", standby.name),
            };
        }
        return Plan::Start(intent(
            CutoverKind::Switchover,
            CutoverStep::Demoting,
            &active.name,
            &standby.name,
            next_epoch,
            format!("requested by annotation identitymesh.io/switchover={req}"),
            p.now,
        ));
    }

    // The active lost its role (process restarted as standby, or was fenced): definitive, no
    // need to wait out the unhealthy threshold.
    // (Reachable is enough: a process that answers "standby" has certainly lost it, and
    // waiting for its readiness probe would only lengthen the outage.)
    let lost_role = active.exists
        && !active.deleting
        && active
            .server
            .as_ref()
            .is_some_and(|s| s.role != Role::Active || s.epoch < p.epoch);
    let active_health = health(active);
    let unhealthy_for_long = match &active_health {
        Health::Healthy => None,
        Health::Unhealthy { since, reason } => match since {
            Some(s) if older_than(*s, p.now, p.unhealthy_after) => Some(*reason),
            _ => None,
        },
    };
    let failure = if lost_role {
        Some("ActiveLostRole")
    } else {
        unhealthy_for_long
    };
    if let Some(reason) = failure {
        return match p.policy {
            FailoverPolicy::Manual => Plan::FailoverRequired {
                active: active.name.clone(),
                reason: reason.to_string(),
            },
            FailoverPolicy::Automatic if is_promotable(standby) => Plan::Start(intent(
                CutoverKind::Failover,
                CutoverStep::Promoting,
                &active.name,
                &standby.name,
                next_epoch,
                format!("active {} unhealthy: {reason}", active.name),
                p.now,
            )),
            FailoverPolicy::Automatic if lost_role && is_promotable(active) => {
                // No standby to fail over to, but the pod itself is up: give it the role back.
                Plan::Start(intent(
                    CutoverKind::Failover,
                    CutoverStep::Promoting,
                    &active.name,
                    &active.name,
                    next_epoch,
                    format!(
                        "active {} lost its role and no standby is ready",
                        active.name
                    ),
                    p.now,
                ))
            }
            FailoverPolicy::Automatic => Plan::Wait {
                reason: format!(
                    "active {} unhealthy ({reason}) and standby {} not ready",
                    active.name, standby.name
                ),
            },
        };
    }
    if !active_health.is_healthy() {
        return Plan::Wait {
            reason: format!(
                "active {} not healthy yet within the failover threshold",
                active.name
            ),
        };
    }

    // A standby that still believes it is active (fenced, it will find out at its next write;
    // tell it now so verification and /api/instances agree).
    if standby
        .server
        .as_ref()
        .is_some_and(|s| s.role == Role::Active)
    {
        return Plan::DemoteStray {
            pod: standby.name.clone(),
        };
    }

    // The active's node is cordoned (a drain, OS patching): hand the role over before the
    // rollout, which can wait; a drain cannot evict the active until it is the standby.
    if drain::should_move_active(active, standby) {
        return Plan::Start(intent(
            CutoverKind::Switchover,
            CutoverStep::Demoting,
            &active.name,
            &standby.name,
            next_epoch,
            drain::NODE_DRAIN_REASON.into(),
            p.now,
        ));
    }

    // Rollout (version or template change): standby first, then switch, then the other.
    if !standby.up_to_date && standby.exists && !standby.deleting {
        return Plan::RollStandby {
            pod: standby.name.clone(),
        };
    }
    if !active.up_to_date && standby.up_to_date && is_promotable(standby) {
        return Plan::Start(intent(
            CutoverKind::Upgrade,
            CutoverStep::Demoting,
            &active.name,
            &standby.name,
            next_epoch,
            format!(
                "rolling {} to the new template: standby {} first",
                active.name, standby.name
            ),
            p.now,
        ));
    }
    if !active.up_to_date {
        return Plan::Wait {
            reason: format!("upgrade: waiting for standby {} to be ready", standby.name),
        };
    }
    if !health(standby).is_healthy() {
        return Plan::Wait {
            reason: format!("standby {} not ready", standby.name),
        };
    }
    Plan::Steady
}

/// Which pod the client Service selects while `c` runs (before the swing: the old one).
pub fn selector_target<'a>(
    active: Option<&'a str>,
    c: Option<&'a CutoverIntent>,
) -> Option<&'a str> {
    match c {
        None => active,
        Some(c) => match c.step {
            CutoverStep::Demoting | CutoverStep::Promoting | CutoverStep::Swinging => {
                if c.from.is_empty() {
                    None
                } else {
                    Some(c.from.as_str())
                }
            }
            CutoverStep::Verifying | CutoverStep::Replacing => Some(c.target.as_str()),
        },
    }
}

pub mod drain;
#[cfg(test)]
mod tests;
