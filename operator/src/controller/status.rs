//! Status: the pure function that composes the conditions and phase from what the steps found. It returns the Events the
//! change calls for instead of publishing them, so it is tested without an apiserver.

use std::collections::BTreeMap;

use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::EventType;

use super::post_checks::Checks;
use super::secrets::Findings;
use super::world::{single_active_row, World};
use super::{display, phase_of, Error};
use crate::builders::Names;
use crate::conditions::{
    ACTIVE_LIVE_CONDITION, ACTIVE_READY_CONDITION, ADMIN_UI_CONDITION, CANARY_CONDITION,
    CERTIFICATES_CONDITION, CONFLICT_CONDITION, KEYRING_CONDITION, NODE_MAINTENANCE_CONDITION,
    PAUSED_CONDITION, PODS_CREATED_CONDITION, POD_START_CONDITION, READY_CONDITION,
    RELAYS_CONDITION, SECRETS_CONDITION, SINGLE_ACTIVE_CONDITION, SPEC_REJECTED_CONDITION,
    STALLED_CONDITION,
};
use crate::crd::{IdentityMeshCluster, IdentityMeshClusterStatus, Phase, Role};
use crate::cutover::{self, drain, health};
use crate::observe::{self, set_condition};
use crate::refusals::{self, Stuck};

/// What the reconcile's steps produced, for the status.
pub(super) struct Steps<'a> {
    pub(super) findings: &'a Findings,
    pub(super) world: &'a World,
    /// The phase (and why) the plan called for when no cutover runs.
    pub(super) plan_phase: Option<&'a (Phase, String)>,
    pub(super) checks: &'a Checks,
    /// The pods step's error, when it failed.
    pub(super) pods_error: Option<&'a Error>,
}

/// What the status is composed from, besides the status it updates.
pub(super) struct Inputs<'a> {
    pub(super) imc: &'a IdentityMeshCluster,
    pub(super) names: &'a Names,
    pub(super) now: Timestamp,
    pub(super) steps: &'a Steps<'a>,
    /// Objects owned elsewhere, and writes the apiserver refused ("Kind/name" → message).
    pub(super) conflicts: &'a BTreeMap<String, String>,
    pub(super) refused: &'a BTreeMap<String, String>,
    /// Server pods whose containers cannot start.
    pub(super) stuck: &'a [(String, Stuck)],
}

/// An Event the new status calls for: a problem that appeared or changed (not on every
/// reconcile: steady state, even a broken one, writes nothing).
#[derive(Debug, PartialEq)]
pub(super) struct Notice {
    /// The server pod it is about, if any (the Event's secondary object).
    pub(super) pod: Option<String>,
    pub(super) type_: EventType,
    pub(super) reason: &'static str,
    pub(super) action: &'static str,
    pub(super) note: String,
}

impl Notice {
    fn warning(
        pod: Option<&str>,
        reason: &'static str,
        action: &'static str,
        note: String,
    ) -> Self {
        Self {
            pod: pod.map(str::to_string),
            type_: EventType::Warning,
            reason,
            action,
            note,
        }
    }
}

/// The paused cluster's status: nothing else is reconciled.
pub(super) fn paused(st: &mut IdentityMeshClusterStatus, gen: Option<i64>, now: Timestamp) {
    st.phase = Some(Phase::Paused);
    set_condition(
        &mut st.conditions,
        PAUSED_CONDITION,
        "True",
        "Paused",
        "spec.paused is true: no pod changes and no cutovers",
        gen,
        now,
    );
}

/// Everything status says after the steps ran, in the order the conditions were always set
/// (their order in the list is part of "unchanged": an unchanged status is not written).
pub(super) fn compose(st: &mut IdentityMeshClusterStatus, i: &Inputs<'_>) -> Vec<Notice> {
    let world = i.steps.world;
    st.observed_generation = i.imc.metadata.generation;
    st.instances = world
        .views
        .iter()
        .map(|v| observe::instance_status(v, world.pods.get(&v.name)))
        .collect();
    st.standby_pod = st.active_pod.as_deref().and_then(|a| i.names.peer(a));
    st.certificate_expiry = i.steps.findings.cert_expiry.clone();
    set_conditions(st, i);
    set_pods_created(st, i);
    let mut notices = Vec::new();
    notices.extend(set_node_maintenance(st, i));
    notices.extend(set_conflicts(st, i));
    notices.extend(set_refused(st, i));
    notices.extend(set_stuck_pods(st, i));
    notices
}

/// Secrets, certificates, key ring, the active's checklist, the post-cutover checks, the
/// stall, and the phase with Ready.
fn set_conditions(st: &mut IdentityMeshClusterStatus, i: &Inputs<'_>) {
    let Steps {
        findings: f,
        world,
        plan_phase,
        checks,
        ..
    } = *i.steps;
    let gen = i.imc.metadata.generation;
    let now = i.now;
    let c = &mut st.conditions;
    if f.secret_problems.is_empty() {
        set_condition(
            c,
            SECRETS_CONDITION,
            "True",
            "Found",
            "referenced Secrets and keys are present",
            gen,
            now,
        );
    } else {
        set_condition(
            c,
            SECRETS_CONDITION,
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
            CERTIFICATES_CONDITION,
            "True",
            "Issued",
            "CA and serving certificate are in place",
            gen,
            now,
        ),
        Some(p) => set_condition(
            c,
            CERTIFICATES_CONDITION,
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
            KEYRING_CONDITION,
            "True",
            "Present",
            "key ring Secret is valid",
            gen,
            now,
        ),
        Some(p) => set_condition(c, KEYRING_CONDITION, "False", "KeyRingProblem", p, gen, now),
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
        ACTIVE_LIVE_CONDITION,
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
        ACTIVE_READY_CONDITION,
        b(ready),
        if ready { "PodReady" } else { "PodNotReady" },
        &format!("active {}", display(active.as_deref().unwrap_or(""))),
        gen,
        now,
    );
    set_condition(
        c,
        SINGLE_ACTIVE_CONDITION,
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

    set_stall_condition(st, i.imc.spec.cutover_timeout_seconds, gen, now);

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
    set_condition(c, READY_CONDITION, rs, reason, &msg, gen, now);
}

/// CutoverStalled from the running cutover (or the end of a stalled one); returns the
/// message when it is set True (for the Event).
pub(super) fn set_stall_condition(
    st: &mut IdentityMeshClusterStatus,
    cutover_timeout_seconds: u32,
    gen: Option<i64>,
    now: Timestamp,
) -> Option<String> {
    let was_stalled = observe::get_condition(&st.conditions, STALLED_CONDITION)
        .is_some_and(|x| x.status == "True");
    let (status, msg, reason) = cutover::stall_condition(
        st.cutover.as_ref(),
        st.last_transition.as_ref().map(|t| (t, was_stalled)),
        cutover_timeout_seconds,
    )?;
    set_condition(
        &mut st.conditions,
        STALLED_CONDITION,
        status,
        reason,
        &msg,
        gen,
        now,
    );
    (status == "True").then_some(msg)
}

/// PodsCreated: the pods step's error, else a refused create, else both pods exist.
fn set_pods_created(st: &mut IdentityMeshClusterStatus, i: &Inputs<'_>) {
    let (gen, now) = (i.imc.metadata.generation, i.now);
    let pod_refused = i
        .names
        .pods()
        .into_iter()
        .find_map(|p| i.refused.get(&format!("Pod/{p}")).cloned());
    let (status, reason, msg) = match (i.steps.pods_error, pod_refused) {
        (None, Some(msg)) => ("False", "CreateRefused", msg),
        (None, None) => ("True", "Created", "both server pods exist".to_string()),
        (Some(e), _) => ("False", "CreateFailed", e.to_string()),
    };
    set_condition(
        &mut st.conditions,
        PODS_CREATED_CONDITION,
        status,
        reason,
        &msg,
        gen,
        now,
    );
}

/// NodeMaintenance from the nodes of the active and the standby (removed while neither is
/// cordoned); an Event when both become cordoned, once: not again while they stay so.
fn set_node_maintenance(st: &mut IdentityMeshClusterStatus, i: &Inputs<'_>) -> Option<Notice> {
    let views = &i.steps.world.views;
    let view = |pod: Option<&str>| pod.and_then(|p| views.iter().find(|v| v.name == p));
    let found = match (
        view(st.active_pod.as_deref()),
        view(st.standby_pod.as_deref()),
    ) {
        (Some(a), Some(s)) => drain::condition(a, s, st.cutover.as_ref()),
        _ => None,
    };
    let Some((reason, msg)) = found else {
        observe::remove_condition(&mut st.conditions, NODE_MAINTENANCE_CONDITION);
        return None;
    };
    let known = observe::get_condition(&st.conditions, NODE_MAINTENANCE_CONDITION)
        .is_some_and(|c| c.status == "True" && c.reason == reason);
    let notice = (reason == drain::BOTH_CORDONED && !known)
        .then(|| Notice::warning(None, drain::BOTH_CORDONED, "NodeMaintenance", msg.clone()));
    set_condition(
        &mut st.conditions,
        NODE_MAINTENANCE_CONDITION,
        "True",
        reason,
        &msg,
        i.imc.metadata.generation,
        i.now,
    );
    notice
}

/// The Conflict condition (removed when there is none); an Event when its message changes.
fn set_conflicts(st: &mut IdentityMeshClusterStatus, i: &Inputs<'_>) -> Option<Notice> {
    if i.conflicts.is_empty() {
        observe::remove_condition(&mut st.conditions, CONFLICT_CONDITION);
        return None;
    }
    let msg = i.conflicts.values().cloned().collect::<Vec<_>>().join("; ");
    let known = observe::get_condition(&st.conditions, CONFLICT_CONDITION)
        .is_some_and(|c| c.status == "True" && c.message == msg);
    let notice = (!known).then(|| Notice::warning(None, "Conflict", "Validate", msg.clone()));
    set_condition(
        &mut st.conditions,
        CONFLICT_CONDITION,
        "True",
        "ObjectOwnedElsewhere",
        &msg,
        i.imc.metadata.generation,
        i.now,
    );
    notice
}

/// The SpecRejected condition (removed when nothing is refused); an Event when its message
/// changes: the apiserver's message, quoted, and the spec field when it can be told.
fn set_refused(st: &mut IdentityMeshClusterStatus, i: &Inputs<'_>) -> Option<Notice> {
    if i.refused.is_empty() {
        observe::remove_condition(&mut st.conditions, SPEC_REJECTED_CONDITION);
        return None;
    }
    let msg = format!(
        "{}; retried with backoff (at once after a spec change)",
        i.refused.values().cloned().collect::<Vec<_>>().join("; ")
    );
    let known = observe::get_condition(&st.conditions, SPEC_REJECTED_CONDITION)
        .is_some_and(|c| c.status == "True" && c.message == msg);
    let notice = (!known).then(|| Notice::warning(None, "SpecRejected", "Apply", msg.clone()));
    set_condition(
        &mut st.conditions,
        SPEC_REJECTED_CONDITION,
        "True",
        "RefusedByApiserver",
        &msg,
        i.imc.metadata.generation,
        i.now,
    );
    notice
}

/// The PodStartFailed condition (removed when both pods' containers can start); an Event per
/// pod when its problem changes: the kubelet's reason and message, quoted, and the spec field
/// to change.
fn set_stuck_pods(st: &mut IdentityMeshClusterStatus, i: &Inputs<'_>) -> Vec<Notice> {
    if i.stuck.is_empty() {
        observe::remove_condition(&mut st.conditions, POD_START_CONDITION);
        return Vec::new();
    }
    let spec = &i.imc.spec;
    let mut secrets: Vec<(&str, &str)> = vec![
        ("spec.database", spec.database.name.as_str()),
        ("spec.licence", spec.licence.name.as_str()),
    ];
    if let Some(n) = &spec.tls.secret_name {
        secrets.push(("spec.tls.secretName", n.as_str()));
    }
    let old = observe::get_condition(&st.conditions, POD_START_CONDITION)
        .filter(|c| c.status == "True")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    let mut notices = Vec::new();
    let mut msgs = Vec::new();
    for (pod, stuck) in i.stuck {
        let m = refusals::stuck_message(pod, stuck, &secrets);
        if !old.split("; ").any(|o| o == m) {
            notices.push(Notice::warning(
                Some(pod.as_str()),
                stuck.condition_reason(),
                "Start",
                m.clone(),
            ));
        }
        msgs.push(m);
    }
    set_condition(
        &mut st.conditions,
        POD_START_CONDITION,
        "True",
        i.stuck[0].1.condition_reason(),
        &msgs.join("; "),
        i.imc.metadata.generation,
        i.now,
    );
    // Ready says why it waits, instead of only "waiting for a Ready server pod".
    if let Some(ready) = st
        .conditions
        .iter_mut()
        .find(|c| c.type_ == READY_CONDITION)
    {
        if ready.status != "True" && !ready.message.contains(&msgs[0]) {
            ready.message = format!("{}: {}", ready.message, msgs.join("; "));
        }
    }
    notices
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::builders::test_support::cluster;
    use crate::cutover::{InstanceView, ServerView};

    fn view(name: &str, role: Role) -> InstanceView {
        InstanceView {
            name: name.into(),
            exists: true,
            pod_ready: true,
            node_ready: Some(true),
            server: Some(ServerView {
                role,
                epoch: 1,
                version: None,
            }),
            up_to_date: true,
            ..Default::default()
        }
    }

    /// A cluster, its pods' views and what the other steps found, to compose status from.
    struct Case {
        imc: IdentityMeshCluster,
        names: Names,
        world: World,
        findings: Findings,
        checks: Checks,
        conflicts: BTreeMap<String, String>,
        refused: BTreeMap<String, String>,
        stuck: Vec<(String, Stuck)>,
    }

    impl Case {
        /// im-a active and answering, im-b a ready standby.
        fn healthy() -> Self {
            let imc = cluster("im", "prod");
            let names = Names::of(&imc);
            let [a, b] = names.pods();
            Self {
                world: World {
                    views: [view(&a, Role::Active), view(&b, Role::Standby)],
                    pods: HashMap::new(),
                    targets: HashMap::new(),
                    rows: None,
                },
                imc,
                names,
                findings: Findings::default(),
                checks: Checks {
                    relays: None,
                    admin_ui: None,
                    canary: None,
                },
                conflicts: BTreeMap::new(),
                refused: BTreeMap::new(),
                stuck: Vec::new(),
            }
        }

        fn compose(
            &self,
            st: &mut IdentityMeshClusterStatus,
            pods_error: Option<&Error>,
        ) -> Vec<Notice> {
            let steps = Steps {
                findings: &self.findings,
                world: &self.world,
                plan_phase: None,
                checks: &self.checks,
                pods_error,
            };
            compose(
                st,
                &Inputs {
                    imc: &self.imc,
                    names: &self.names,
                    now: Timestamp::UNIX_EPOCH,
                    steps: &steps,
                    conflicts: &self.conflicts,
                    refused: &self.refused,
                    stuck: &self.stuck,
                },
            )
        }
    }

    fn with_active(pod: &str) -> IdentityMeshClusterStatus {
        IdentityMeshClusterStatus {
            active_pod: Some(pod.into()),
            ..Default::default()
        }
    }

    fn cond<'a>(st: &'a IdentityMeshClusterStatus, type_: &str) -> (&'a str, &'a str, &'a str) {
        let c = observe::get_condition(&st.conditions, type_)
            .unwrap_or_else(|| panic!("no condition {type_}"));
        (c.status.as_str(), c.reason.as_str(), c.message.as_str())
    }

    #[test]
    fn a_healthy_pair_is_running_with_the_conditions_in_their_order() {
        let case = Case::healthy();
        let mut st = with_active("im-a");
        let notices = case.compose(&mut st, None);
        assert_eq!(notices, []);
        assert_eq!(st.phase, Some(Phase::Running));
        assert_eq!(st.standby_pod.as_deref(), Some("im-b"));
        assert_eq!(
            cond(&st, READY_CONDITION),
            ("True", "Running", "active serving, standby ready")
        );
        assert_eq!(cond(&st, SINGLE_ACTIVE_CONDITION).0, "True");
        // The order is what an unchanged status compares equal with: it must not move.
        let types: Vec<&str> = st.conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(
            types,
            [
                SECRETS_CONDITION,
                CERTIFICATES_CONDITION,
                KEYRING_CONDITION,
                ACTIVE_LIVE_CONDITION,
                ACTIVE_READY_CONDITION,
                SINGLE_ACTIVE_CONDITION,
                READY_CONDITION,
                PODS_CREATED_CONDITION,
            ]
        );
        // Composing again from the same findings changes nothing.
        let before = st.clone();
        assert_eq!(case.compose(&mut st, None), []);
        assert_eq!(st, before);
    }

    #[test]
    fn two_instances_reporting_active_are_not_a_single_active() {
        let mut case = Case::healthy();
        case.world.views[1] = view("im-b", Role::Active);
        let mut st = with_active("im-a");
        case.compose(&mut st, None);
        assert_eq!(
            cond(&st, SINGLE_ACTIVE_CONDITION),
            (
                "False",
                "ActiveCountMismatch",
                "instances reporting active: [im-a, im-b]"
            )
        );
    }

    #[test]
    fn without_an_active_the_phase_waits_for_pods() {
        let case = Case::healthy();
        let mut st = IdentityMeshClusterStatus::default();
        case.compose(&mut st, None);
        assert_eq!(st.phase, Some(Phase::Pending));
        assert_eq!(
            cond(&st, READY_CONDITION),
            ("False", "Pending", "phase Pending")
        );
        assert_eq!(st.standby_pod, None);
    }

    #[test]
    fn a_conflict_is_announced_once_and_cleared_when_gone() {
        let mut case = Case::healthy();
        case.conflicts.insert(
            "Service/im".into(),
            "Service im belongs to someone else".into(),
        );
        let mut st = with_active("im-a");
        let notices = case.compose(&mut st, None);
        assert_eq!(
            notices,
            [Notice::warning(
                None,
                "Conflict",
                "Validate",
                "Service im belongs to someone else".into()
            )]
        );
        assert_eq!(cond(&st, CONFLICT_CONDITION).1, "ObjectOwnedElsewhere");
        assert_eq!(case.compose(&mut st, None), [], "already reported");
        case.conflicts.clear();
        case.compose(&mut st, None);
        assert!(observe::get_condition(&st.conditions, CONFLICT_CONDITION).is_none());
    }

    #[test]
    fn both_nodes_cordoned_is_a_condition_announced_once() {
        let mut case = Case::healthy();
        for (v, node) in case.world.views.iter_mut().zip(["node-1", "node-2"]) {
            v.node = Some(node.into());
            v.node_cordoned = Some(true);
        }
        let mut st = with_active("im-a");
        let notices = case.compose(&mut st, None);
        assert_eq!(notices.len(), 1, "{notices:?}");
        assert_eq!(
            (notices[0].type_, notices[0].reason),
            (EventType::Warning, drain::BOTH_CORDONED)
        );
        let (status, reason, msg) = cond(&st, NODE_MAINTENANCE_CONDITION);
        assert_eq!((status, reason), ("True", drain::BOTH_CORDONED));
        assert!(msg.contains("uncordon"), "{msg}");
        // Stable: no second Event and no change while both stay cordoned.
        let before = st.clone();
        assert_eq!(case.compose(&mut st, None), []);
        assert_eq!(st, before);
        // The standby's node uncordoned: the condition says the active's is, without an Event.
        case.world.views[1].node_cordoned = Some(false);
        assert_eq!(case.compose(&mut st, None), []);
        assert_eq!(
            cond(&st, NODE_MAINTENANCE_CONDITION).1,
            drain::ACTIVE_CORDONED
        );
        // Both schedulable: the condition goes.
        case.world.views[0].node_cordoned = Some(false);
        case.compose(&mut st, None);
        assert!(observe::get_condition(&st.conditions, NODE_MAINTENANCE_CONDITION).is_none());
        // Cordoned both again: announced again (a new episode).
        case.world.views[0].node_cordoned = Some(true);
        case.world.views[1].node_cordoned = Some(true);
        assert_eq!(case.compose(&mut st, None).len(), 1);
    }

    #[test]
    fn pods_created_says_why_a_pod_is_missing() {
        let mut case = Case::healthy();
        let mut st = with_active("im-a");
        case.refused
            .insert("Pod/im-b".into(), "422 Invalid: spec.tolerations".into());
        case.compose(&mut st, None);
        assert_eq!(
            cond(&st, PODS_CREATED_CONDITION),
            ("False", "CreateRefused", "422 Invalid: spec.tolerations")
        );
        assert_eq!(cond(&st, SPEC_REJECTED_CONDITION).1, "RefusedByApiserver");
        // A failed pods step wins over a refusal, with the error's message.
        let failed = Error::WritePod(kube::Error::Api(Box::new(
            serde_json::from_value(serde_json::json!({
                "status": "Failure", "code": 500, "reason": "InternalError", "message": "etcd"
            }))
            .expect("status"),
        )));
        case.compose(&mut st, Some(&failed));
        assert_eq!(
            cond(&st, PODS_CREATED_CONDITION),
            (
                "False",
                "CreateFailed",
                "Kubernetes API: 500 InternalError: etcd"
            )
        );
    }

    #[test]
    fn a_pod_that_cannot_start_is_named_in_ready() {
        let mut case = Case::healthy();
        case.world.views[0].pod_ready = false;
        case.stuck.push((
            "im-a".into(),
            Stuck {
                reason: "InvalidImageName".into(),
                message: "couldn't parse image name".into(),
                image: Some("bad//image".into()),
            },
        ));
        let mut st = with_active("im-a");
        let notices = case.compose(&mut st, None);
        assert_eq!(notices.len(), 1, "{notices:?}");
        assert_eq!(
            (notices[0].pod.as_deref(), notices[0].reason),
            (Some("im-a"), "InvalidImageName")
        );
        let (status, reason, msg) = cond(&st, POD_START_CONDITION);
        assert_eq!((status, reason), ("True", "InvalidImageName"));
        let ready = cond(&st, READY_CONDITION);
        assert_eq!(ready.0, "False");
        assert!(ready.2.ends_with(msg), "{ready:?}");
        assert_eq!(case.compose(&mut st, None), [], "already reported");
    }
}
