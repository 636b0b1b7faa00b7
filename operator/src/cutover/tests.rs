//! Exhaustive tests of the cutover transitions, the planner, and a randomized simulation with a
//! model of the servers' fencing and operator restarts between any two steps.

use super::*;
use crate::crd::{CutoverKind, CutoverStep};

const KINDS: [CutoverKind; 4] = [
    CutoverKind::Initial,
    CutoverKind::Switchover,
    CutoverKind::Failover,
    CutoverKind::Upgrade,
];
const STEPS: [CutoverStep; 5] = [
    CutoverStep::Demoting,
    CutoverStep::Promoting,
    CutoverStep::Swinging,
    CutoverStep::Verifying,
    CutoverStep::Replacing,
];

fn results() -> Vec<StepResult> {
    vec![
        StepResult::Demoted { drained: true },
        StepResult::Demoted { drained: false },
        StepResult::DemoteFailed,
        StepResult::Promoted,
        StepResult::PromoteRefused { stored: None },
        StepResult::PromoteRefused { stored: Some(41) },
        StepResult::PromoteFailed,
        StepResult::Swung,
        StepResult::SwingFailed,
        StepResult::Verified,
        StepResult::NotYetVerified,
        StepResult::TargetNotActive,
        StepResult::Replaced,
        StepResult::ReplacePending,
    ]
}

/// Which results belong to which step (anything else must leave the machine where it is).
fn belongs(step: CutoverStep, r: &StepResult) -> bool {
    matches!(
        (step, r),
        (
            CutoverStep::Demoting,
            StepResult::Demoted { .. } | StepResult::DemoteFailed
        ) | (
            CutoverStep::Promoting,
            StepResult::Promoted | StepResult::PromoteRefused { .. } | StepResult::PromoteFailed
        ) | (
            CutoverStep::Swinging,
            StepResult::Swung | StepResult::SwingFailed
        ) | (
            CutoverStep::Verifying,
            StepResult::Verified | StepResult::NotYetVerified | StepResult::TargetNotActive
        ) | (
            CutoverStep::Replacing,
            StepResult::Replaced | StepResult::ReplacePending
        )
    )
}

fn ts(s: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + s).expect("ts")
}

fn mk(kind: CutoverKind, step: CutoverStep) -> CutoverIntent {
    CutoverIntent {
        kind,
        step,
        from: if kind == CutoverKind::Initial {
            String::new()
        } else {
            "im-a".into()
        },
        target: "im-b".into(),
        epoch: 7,
        reason: "test".into(),
        started: Time(ts(0)),
        step_started: Time(ts(0)),
        verified: None,
        stalled: None,
    }
}

/// Elapsed times that cross each bound: fresh, past drain (10s), past target-lost, past the
/// stall bound, past verify.
const ELAPSED: [i64; 5] = [0, 11, 31, 46, 61];
/// spec.cutoverTimeoutSeconds in the exhaustive test (between target-lost and verify).
const STALL_AFTER: u64 = 45;

#[test]
fn exhaustive_transition_invariants() {
    let mut cases = 0;
    for kind in KINDS {
        for step in STEPS {
            for r in results() {
                for target_healthy in [true, false] {
                    for from_promotable in [true, false] {
                        for el in ELAPSED {
                            cases += 1;
                            let c = mk(kind, step);
                            let cx = StepContext {
                                now: ts(el),
                                drain_timeout: Duration::from_secs(10),
                                target_healthy,
                                from_promotable,
                                stall_after: Duration::from_secs(STALL_AFTER),
                            };
                            let out = advance(&c, &r, &cx);
                            let label = format!("{kind:?} {step:?} {r:?} th={target_healthy} fp={from_promotable} t+{el}");
                            if !belongs(step, &r) {
                                assert_eq!(
                                    out,
                                    Outcome::Stay,
                                    "{label}: foreign result must not move"
                                );
                                continue;
                            }
                            match &out {
                                Outcome::Stay => {}
                                Outcome::Update(n) => {
                                    assert!(n.epoch >= c.epoch, "{label}: epoch went down");
                                    assert_ne!(
                                        n.step,
                                        CutoverStep::Demoting,
                                        "{label}: never back to Demoting"
                                    );
                                    assert_eq!(n.kind, c.kind, "{label}: kind is fixed");
                                    assert_eq!(
                                        n.started, c.started,
                                        "{label}: start time is fixed"
                                    );
                                    let stalled_now = n.stalled != c.stalled;
                                    if stalled_now {
                                        assert!(
                                            el >= STALL_AFTER as i64
                                                && matches!(
                                                    step,
                                                    CutoverStep::Promoting | CutoverStep::Swinging
                                                ),
                                            "{label}: a stall only past the bound, before service"
                                        );
                                    }
                                    let rolled_back =
                                        n.stalled.as_ref().is_some_and(|s| s.rolled_back);
                                    if !stalled_now || rolled_back {
                                        assert_eq!(
                                            n.step_started.0, cx.now,
                                            "{label}: step clock restarts"
                                        );
                                    }
                                    if n.from != c.from {
                                        // Only a rollback swaps roles, and it needs a new epoch.
                                        assert_eq!(
                                            (n.from.as_str(), n.target.as_str()),
                                            (c.target.as_str(), c.from.as_str()),
                                            "{label}"
                                        );
                                        assert_eq!(
                                            n.epoch,
                                            c.epoch + 1,
                                            "{label}: rollback takes a new epoch"
                                        );
                                        assert_eq!(n.step, CutoverStep::Promoting, "{label}");
                                        assert!(
                                            from_promotable && (!target_healthy || rolled_back),
                                            "{label}"
                                        );
                                    }
                                    if n.step == CutoverStep::Replacing {
                                        assert_eq!(
                                            kind,
                                            CutoverKind::Failover,
                                            "{label}: only failovers replace"
                                        );
                                    }
                                    if n.step == CutoverStep::Swinging && c.step != n.step {
                                        assert_eq!(
                                            r,
                                            StepResult::Promoted,
                                            "{label}: swing only after a successful promote"
                                        );
                                    }
                                }
                                Outcome::Finished { intent, verified } => {
                                    assert!(
                                        matches!(
                                            step,
                                            CutoverStep::Verifying | CutoverStep::Replacing
                                        ),
                                        "{label}"
                                    );
                                    assert_eq!(intent.epoch, c.epoch, "{label}");
                                    if step == CutoverStep::Verifying && *verified {
                                        assert_ne!(
                                            kind,
                                            CutoverKind::Failover,
                                            "{label}: failover replaces first"
                                        );
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    assert_eq!(cases, 4 * 5 * 14 * 2 * 2 * 5);
}

/// The expected path for each result, at the moment the result arrives (healthy target).
#[test]
fn transition_table() {
    use CutoverStep::*;
    let cx = |el: i64| StepContext {
        now: ts(el),
        drain_timeout: Duration::from_secs(10),
        target_healthy: true,
        from_promotable: true,
        stall_after: Duration::from_secs(3600),
    };
    let step_of = |o: Outcome| match o {
        Outcome::Stay => "stay".to_string(),
        Outcome::Update(n) => format!("{:?}@{}", n.step, n.epoch),
        Outcome::Finished { verified, .. } => format!("finished(verified={verified})"),
    };
    let table: Vec<(CutoverKind, CutoverStep, StepResult, i64, &str)> = vec![
        (
            CutoverKind::Switchover,
            Demoting,
            StepResult::Demoted { drained: true },
            0,
            "Promoting@7",
        ),
        (
            CutoverKind::Switchover,
            Demoting,
            StepResult::Demoted { drained: false },
            0,
            "Promoting@7",
        ),
        (
            CutoverKind::Switchover,
            Demoting,
            StepResult::DemoteFailed,
            5,
            "stay",
        ),
        (
            CutoverKind::Switchover,
            Demoting,
            StepResult::DemoteFailed,
            11,
            "Promoting@7",
        ),
        (
            CutoverKind::Switchover,
            Promoting,
            StepResult::Promoted,
            0,
            "Swinging@7",
        ),
        (
            CutoverKind::Switchover,
            Promoting,
            StepResult::PromoteRefused { stored: None },
            0,
            "Promoting@8",
        ),
        (
            CutoverKind::Switchover,
            Promoting,
            StepResult::PromoteRefused { stored: Some(41) },
            0,
            "Promoting@42",
        ),
        (
            CutoverKind::Switchover,
            Promoting,
            StepResult::PromoteFailed,
            0,
            "stay",
        ),
        (
            CutoverKind::Switchover,
            Swinging,
            StepResult::Swung,
            0,
            "Verifying@7",
        ),
        (
            CutoverKind::Switchover,
            Swinging,
            StepResult::SwingFailed,
            0,
            "stay",
        ),
        (
            CutoverKind::Switchover,
            Verifying,
            StepResult::Verified,
            0,
            "finished(verified=true)",
        ),
        (
            CutoverKind::Switchover,
            Verifying,
            StepResult::NotYetVerified,
            5,
            "stay",
        ),
        (
            CutoverKind::Switchover,
            Verifying,
            StepResult::NotYetVerified,
            61,
            "finished(verified=false)",
        ),
        (
            CutoverKind::Switchover,
            Verifying,
            StepResult::TargetNotActive,
            0,
            "Promoting@7",
        ),
        (
            CutoverKind::Failover,
            Promoting,
            StepResult::Promoted,
            0,
            "Swinging@7",
        ),
        (
            CutoverKind::Failover,
            Verifying,
            StepResult::Verified,
            0,
            "Replacing@7",
        ),
        (
            CutoverKind::Failover,
            Verifying,
            StepResult::NotYetVerified,
            61,
            "Replacing@7",
        ),
        (
            CutoverKind::Failover,
            Replacing,
            StepResult::ReplacePending,
            0,
            "stay",
        ),
        (
            CutoverKind::Failover,
            Replacing,
            StepResult::Replaced,
            0,
            "finished(verified=false)",
        ),
        (
            CutoverKind::Initial,
            Verifying,
            StepResult::Verified,
            0,
            "finished(verified=true)",
        ),
        (
            CutoverKind::Upgrade,
            Demoting,
            StepResult::Demoted { drained: true },
            0,
            "Promoting@7",
        ),
    ];
    for (kind, step, r, el, want) in table {
        let got = step_of(advance(&mk(kind, step), &r, &cx(el)));
        assert_eq!(got, want, "{kind:?} {step:?} {r:?} t+{el}");
    }
}

#[test]
fn lost_target_rolls_back_with_new_epoch_when_the_other_can_serve() {
    let cx = StepContext {
        now: ts(31),
        drain_timeout: Duration::from_secs(10),
        target_healthy: false,
        from_promotable: true,
        stall_after: Duration::from_secs(60),
    };
    match advance(
        &mk(CutoverKind::Switchover, CutoverStep::Promoting),
        &StepResult::PromoteFailed,
        &cx,
    ) {
        Outcome::Update(n) => {
            assert_eq!(
                (n.from.as_str(), n.target.as_str(), n.epoch),
                ("im-b", "im-a", 8)
            );
        }
        o => panic!("expected rollback, got {o:?}"),
    }
    // A failover whose target died too goes back to the lost pod once it is a healthy standby
    // again (and then replaces the other one).
    match advance(
        &mk(CutoverKind::Failover, CutoverStep::Promoting),
        &StepResult::PromoteFailed,
        &cx,
    ) {
        Outcome::Update(n) => assert_eq!(
            (n.target.as_str(), n.from.as_str(), n.epoch),
            ("im-a", "im-b", 8)
        ),
        o => panic!("expected rollback, got {o:?}"),
    }
    let no_fallback = StepContext {
        from_promotable: false,
        ..cx
    };
    assert_eq!(
        advance(
            &mk(CutoverKind::Failover, CutoverStep::Promoting),
            &StepResult::PromoteFailed,
            &no_fallback
        ),
        Outcome::Stay
    );
}

#[test]
fn failover_onto_itself_does_not_replace() {
    let mut c = mk(CutoverKind::Failover, CutoverStep::Verifying);
    c.target = c.from.clone();
    let cx = StepContext {
        now: ts(1),
        drain_timeout: Duration::from_secs(10),
        target_healthy: true,
        from_promotable: false,
        stall_after: Duration::from_secs(60),
    };
    assert!(matches!(
        advance(&c, &StepResult::Verified, &cx),
        Outcome::Finished { verified: true, .. }
    ));
}

#[test]
fn actions_follow_steps() {
    let c = mk(CutoverKind::Switchover, CutoverStep::Demoting);
    assert_eq!(action(&c), Action::Demote { pod: "im-a".into() });
    let c = mk(CutoverKind::Switchover, CutoverStep::Promoting);
    assert_eq!(
        action(&c),
        Action::Promote {
            pod: "im-b".into(),
            epoch: 7
        }
    );
    let c = mk(CutoverKind::Switchover, CutoverStep::Swinging);
    assert_eq!(action(&c), Action::Swing { pod: "im-b".into() });
    let c = mk(CutoverKind::Switchover, CutoverStep::Verifying);
    assert_eq!(
        action(&c),
        Action::Verify {
            pod: "im-b".into(),
            epoch: 7
        }
    );
    let c = mk(CutoverKind::Failover, CutoverStep::Replacing);
    assert_eq!(action(&c), Action::Replace { pod: "im-a".into() });
}

#[test]
fn selector_moves_only_after_promotion() {
    for step in STEPS {
        let c = mk(CutoverKind::Switchover, step);
        let sel = selector_target(Some("im-a"), Some(&c));
        match step {
            CutoverStep::Verifying | CutoverStep::Replacing => assert_eq!(sel, Some("im-b")),
            _ => assert_eq!(sel, Some("im-a")),
        }
        let c = mk(CutoverKind::Initial, step);
        if matches!(step, CutoverStep::Promoting | CutoverStep::Swinging) {
            assert_eq!(
                selector_target(None, Some(&c)),
                None,
                "no endpoints before the first promote"
            );
        }
    }
    assert_eq!(selector_target(Some("im-a"), None), Some("im-a"));
}

// ----------------------------------------------------------------------------------------------
// Planner

fn healthy(name: &str, role: Role, epoch: i64) -> InstanceView {
    InstanceView {
        name: name.into(),
        exists: true,
        pod_ready: true,
        node_ready: Some(true),
        server: Some(ServerView {
            role,
            epoch,
            version: None,
        }),
        up_to_date: true,
        ..Default::default()
    }
}

fn steady() -> PlanInput {
    PlanInput {
        now: ts(100),
        policy: FailoverPolicy::Automatic,
        unhealthy_after: Duration::from_secs(10),
        active: Some("im-a".into()),
        epoch: 3,
        switchover_request: None,
        pods: [
            healthy("im-a", Role::Active, 3),
            healthy("im-b", Role::Standby, 0),
        ],
    }
}

#[test]
fn plan_steady() {
    assert_eq!(plan(&steady()), Plan::Steady);
}

#[test]
fn plan_initial_promotion() {
    let mut p = steady();
    p.active = None;
    p.epoch = 0;
    p.pods[0].server = Some(ServerView {
        role: Role::Standby,
        epoch: 0,
        version: None,
    });
    p.pods[1].pod_ready = false;
    match plan(&p) {
        Plan::Start(c) => {
            assert_eq!(
                (c.kind, c.step, c.target.as_str(), c.epoch),
                (CutoverKind::Initial, CutoverStep::Promoting, "im-a", 1)
            );
        }
        o => panic!("{o:?}"),
    }
    p.pods[0].pod_ready = false;
    assert!(matches!(plan(&p), Plan::Wait { .. }));
}

#[test]
fn plan_initial_adopts_an_existing_active_and_outbids_known_epochs() {
    let mut p = steady();
    p.active = None;
    p.epoch = 0;
    p.pods[1] = healthy("im-b", Role::Active, 12);
    p.pods[0] = healthy("im-a", Role::Standby, 12);
    match plan(&p) {
        Plan::Start(c) => assert_eq!((c.target.as_str(), c.epoch), ("im-b", 13)),
        o => panic!("{o:?}"),
    }
}

#[test]
fn plan_switchover_requests() {
    let mut p = steady();
    p.switchover_request = Some("standby".into());
    match plan(&p) {
        Plan::Start(c) => {
            assert_eq!(
                (c.kind, c.step, c.from.as_str(), c.target.as_str(), c.epoch),
                (
                    CutoverKind::Switchover,
                    CutoverStep::Demoting,
                    "im-a",
                    "im-b",
                    4
                )
            );
        }
        o => panic!("{o:?}"),
    }
    p.switchover_request = Some("im-b".into());
    assert!(matches!(plan(&p), Plan::Start(_)));
    p.switchover_request = Some("im-a".into());
    assert!(matches!(plan(&p), Plan::RejectSwitchover { .. }));
    p.switchover_request = Some("other".into());
    assert!(matches!(plan(&p), Plan::RejectSwitchover { .. }));
    p.switchover_request = Some("standby".into());
    p.pods[1].pod_ready = false;
    assert!(matches!(plan(&p), Plan::RejectSwitchover { .. }));
}

#[test]
fn plan_failover_waits_for_threshold_then_promotes_without_proof_of_death() {
    let mut p = steady();
    p.pods[0].pod_ready = false;
    p.pods[0].not_ready_since = Some(ts(95));
    assert!(matches!(plan(&p), Plan::Wait { .. }), "5s < 10s threshold");
    p.pods[0].not_ready_since = Some(ts(90));
    match plan(&p) {
        Plan::Start(c) => {
            assert_eq!(
                (c.kind, c.step, c.target.as_str(), c.epoch),
                (CutoverKind::Failover, CutoverStep::Promoting, "im-b", 4)
            );
        }
        o => panic!("{o:?}"),
    }
    // Every failure mode counts.
    for mutate in [
        (|v: &mut InstanceView| v.exists = false) as fn(&mut InstanceView),
        |v| v.deleting = true,
        |v| {
            v.node_ready = Some(false);
            v.node_not_ready_since = Some(ts(0));
        },
        |v| v.server = None,
    ] {
        let mut q = steady();
        mutate(&mut q.pods[0]);
        q.pods[0].first_seen_unhealthy = Some(ts(80));
        assert!(
            matches!(
                plan(&q),
                Plan::Start(CutoverIntent {
                    kind: CutoverKind::Failover,
                    ..
                })
            ),
            "{:?}",
            q.pods[0]
        );
        // Just noticed (no time known yet): wait.
        q.pods[0].first_seen_unhealthy = None;
        q.pods[0].node_not_ready_since = None;
        assert!(matches!(plan(&q), Plan::Wait { .. }));
    }
}

#[test]
fn plan_manual_policy_reports_and_waits() {
    let mut p = steady();
    p.policy = FailoverPolicy::Manual;
    p.pods[0].pod_ready = false;
    p.pods[0].not_ready_since = Some(ts(0));
    assert!(matches!(plan(&p), Plan::FailoverRequired { .. }));
    // A manual switchover request is still honoured.
    p.switchover_request = Some("standby".into());
    assert!(matches!(
        plan(&p),
        Plan::Start(CutoverIntent {
            kind: CutoverKind::Switchover,
            ..
        })
    ));
}

#[test]
fn plan_active_that_lost_its_role_fails_over_at_once() {
    let mut p = steady();
    p.pods[0].server = Some(ServerView {
        role: Role::Standby,
        epoch: 3,
        version: None,
    });
    assert!(matches!(
        plan(&p),
        Plan::Start(CutoverIntent {
            kind: CutoverKind::Failover,
            ..
        })
    ));
    // No standby ready: give the role back to the same pod.
    p.pods[1].pod_ready = false;
    match plan(&p) {
        Plan::Start(c) => assert_eq!((c.from.as_str(), c.target.as_str()), ("im-a", "im-a")),
        o => panic!("{o:?}"),
    }
}

#[test]
fn plan_demotes_a_stray_active_standby() {
    let mut p = steady();
    p.pods[1].server = Some(ServerView {
        role: Role::Active,
        epoch: 2,
        version: None,
    });
    assert_eq!(plan(&p), Plan::DemoteStray { pod: "im-b".into() });
}

#[test]
fn plan_standby_unhealthy_and_active_unhealthy() {
    let mut p = steady();
    p.pods[1].pod_ready = false;
    assert!(matches!(plan(&p), Plan::Wait { .. }));
    p.pods[0].pod_ready = false;
    p.pods[0].not_ready_since = Some(ts(0));
    assert!(
        matches!(plan(&p), Plan::Wait { .. }),
        "nothing to fail over to"
    );
}

/// What the planner starts for a steady pair whose nodes are (un)cordoned as given.
fn plan_with_nodes(
    active_cordoned: Option<bool>,
    standby_cordoned: Option<bool>,
    tweak: impl Fn(&mut PlanInput),
) -> Plan {
    let mut p = steady();
    p.pods[0].node = Some("node-1".into());
    p.pods[0].node_cordoned = active_cordoned;
    p.pods[1].node = Some("node-2".into());
    p.pods[1].node_cordoned = standby_cordoned;
    tweak(&mut p);
    plan(&p)
}

fn drain_switchover(pl: &Plan) -> Option<(&str, &str, i64)> {
    match pl {
        Plan::Start(c)
            if c.kind == CutoverKind::Switchover
                && c.step == CutoverStep::Demoting
                && c.reason == drain::NODE_DRAIN_REASON =>
        {
            Some((c.from.as_str(), c.target.as_str(), c.epoch))
        }
        _ => None,
    }
}

#[test]
fn plan_node_drain_table() {
    let (c, u) = (Some(true), Some(false));
    let none = |_: &mut PlanInput| {};
    let standby_unready = |p: &mut PlanInput| p.pods[1].pod_ready = false;
    let manual = |p: &mut PlanInput| p.policy = FailoverPolicy::Manual;
    // After a NodeDrain switchover: im-b active on node-2, im-a the standby on cordoned node-1.
    let switched = |p: &mut PlanInput| {
        p.active = Some("im-b".into());
        p.epoch = 4;
        p.pods[0].server = Some(ServerView {
            role: Role::Standby,
            epoch: 4,
            version: None,
        });
        p.pods[1].server = Some(ServerView {
            role: Role::Active,
            epoch: 4,
            version: None,
        });
    };
    let rollout_pending = |p: &mut PlanInput| p.pods[0].up_to_date = false;
    let both_out_of_date = |p: &mut PlanInput| {
        p.pods[0].up_to_date = false;
        p.pods[1].up_to_date = false;
    };
    #[allow(clippy::type_complexity)]
    let table: [(
        &str,
        Option<bool>,
        Option<bool>,
        &dyn Fn(&mut PlanInput),
        Option<(&str, &str, i64)>,
    ); 12] = [
        ("active cordoned", c, u, &none, Some(("im-a", "im-b", 4))),
        ("nothing cordoned", u, u, &none, None),
        ("nodes unread", None, None, &none, None),
        ("standby cordoned", u, c, &none, None),
        ("both cordoned", c, c, &none, None),
        ("standby's node unread", c, None, &none, None),
        ("standby not ready", c, u, &standby_unready, None),
        (
            "manual policy: still a planned switchover",
            c,
            u,
            &manual,
            Some(("im-a", "im-b", 4)),
        ),
        // im-a is the cordoned standby now; im-b's node is schedulable: never back.
        ("after the switchover", c, u, &switched, None),
        // ... and if im-b's node is cordoned too, still not back onto cordoned node-1.
        ("after the switchover, both cordoned", c, c, &switched, None),
        (
            "before a rollout",
            c,
            u,
            &rollout_pending,
            Some(("im-a", "im-b", 4)),
        ),
        (
            "before rolling an out-of-date standby",
            c,
            u,
            &both_out_of_date,
            Some(("im-a", "im-b", 4)),
        ),
    ];
    // Column one is im-a's node, column two im-b's (whichever is active).
    for (name, a, s, tweak, want) in table {
        let got = plan_with_nodes(a, s, tweak);
        assert_eq!(drain_switchover(&got), want, "{name}: {got:?}");
        if want.is_none() {
            assert!(
                !matches!(got, Plan::Start(_)),
                "{name}: nothing may start: {got:?}"
            );
        }
    }
    // Once im-a is on a schedulable node again (recreated), a cordon of im-b's node moves
    // the role back: the rule follows the nodes, not the history.
    let moved = plan_with_nodes(u, c, switched);
    assert_eq!(drain_switchover(&moved), Some(("im-b", "im-a", 5)));
}

#[test]
fn plan_node_drain_yields_to_requests_and_failures() {
    let (c, u) = (Some(true), Some(false));
    // An explicit request is what runs (its reason, not NodeDrain).
    let req = plan_with_nodes(c, u, |p| p.switchover_request = Some("standby".into()));
    match req {
        Plan::Start(c) => assert!(c.reason.starts_with("requested by annotation"), "{c:?}"),
        o => panic!("{o:?}"),
    }
    // An unhealthy active is the failover rules' business (failover past the threshold).
    let failing = plan_with_nodes(c, u, |p| {
        p.pods[0].pod_ready = false;
        p.pods[0].not_ready_since = Some(ts(0));
    });
    assert!(
        matches!(&failing, Plan::Start(c) if c.kind == CutoverKind::Failover),
        "{failing:?}"
    );
    let within = plan_with_nodes(c, u, |p| {
        p.pods[0].pod_ready = false;
        p.pods[0].not_ready_since = Some(ts(99));
    });
    assert!(matches!(within, Plan::Wait { .. }), "{within:?}");
    // A stray active standby is demoted first; the drain follows on the next plan.
    let stray = plan_with_nodes(c, u, |p| {
        p.pods[1].server = Some(ServerView {
            role: Role::Active,
            epoch: 2,
            version: None,
        })
    });
    assert_eq!(stray, Plan::DemoteStray { pod: "im-b".into() });
}

#[test]
fn plan_upgrade_standby_first_then_switch_then_other() {
    let mut p = steady();
    p.pods[0].up_to_date = false;
    p.pods[1].up_to_date = false;
    assert_eq!(plan(&p), Plan::RollStandby { pod: "im-b".into() });
    // Standby recreated with the new version but not ready yet.
    p.pods[1] = healthy("im-b", Role::Standby, 0);
    p.pods[1].pod_ready = false;
    assert!(matches!(plan(&p), Plan::Wait { .. }));
    p.pods[1].pod_ready = true;
    match plan(&p) {
        Plan::Start(c) => assert_eq!(
            (c.kind, c.step, c.target.as_str()),
            (CutoverKind::Upgrade, CutoverStep::Demoting, "im-b")
        ),
        o => panic!("{o:?}"),
    }
    // After the switch the old active is the out-of-date standby.
    let mut q = steady();
    q.active = Some("im-b".into());
    q.pods = [
        healthy("im-a", Role::Standby, 3),
        healthy("im-b", Role::Active, 4),
    ];
    q.epoch = 4;
    q.pods[0].up_to_date = false;
    assert_eq!(plan(&q), Plan::RollStandby { pod: "im-a".into() });
}

// ----------------------------------------------------------------------------------------------
// Simulation: the servers' fencing model, random faults and operator restarts.

/// Minimal deterministic PRNG (xorshift) so the test needs no extra crate and replays exactly.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn chance(&mut self, pct: u64) -> bool {
        self.next() % 100 < pct
    }
}

#[derive(Clone, Debug)]
struct Server {
    up: bool,
    reachable: bool,
    role: Role,
    epoch: i64,
}

/// The contract from server/README.md: promote(N) succeeds iff N > stored, or this instance
/// already holds N; demote always succeeds; a restarted process comes back standby.
struct World {
    sql_epoch: i64,
    sql_holder: Option<usize>,
    servers: [Server; 2],
    selector: Option<usize>,
}

impl World {
    fn promote(&mut self, i: usize, epoch: i64) -> StepResult {
        if !self.servers[i].up || !self.servers[i].reachable {
            return StepResult::PromoteFailed;
        }
        let holds = self.sql_holder == Some(i) && self.sql_epoch == epoch;
        if epoch > self.sql_epoch || holds {
            self.sql_epoch = epoch;
            self.sql_holder = Some(i);
            self.servers[i].role = Role::Active;
            self.servers[i].epoch = epoch;
            StepResult::Promoted
        } else {
            StepResult::PromoteRefused { stored: None }
        }
    }
    /// Instances that could commit a fenced write now.
    fn writers(&self) -> usize {
        (0..2)
            .filter(|&i| {
                self.servers[i].up
                    && self.servers[i].role == Role::Active
                    && self.servers[i].epoch == self.sql_epoch
            })
            .count()
    }
}

const NAMES: [&str; 2] = ["im-a", "im-b"];

fn idx(n: &str) -> usize {
    usize::from(n == "im-b")
}

fn view(w: &World, i: usize, now: Timestamp) -> InstanceView {
    let s = &w.servers[i];
    InstanceView {
        name: NAMES[i].into(),
        exists: true,
        pod_ready: s.up,
        not_ready_since: if s.up {
            None
        } else {
            Some(now - k8s_openapi::jiff::SignedDuration::from_secs(3600))
        },
        node_ready: Some(true),
        server: (s.up && s.reachable).then_some(ServerView {
            role: s.role,
            epoch: s.epoch,
            version: None,
        }),
        up_to_date: true,
        ..Default::default()
    }
}

#[derive(Clone, Default)]
struct Status {
    active: Option<String>,
    epoch: i64,
    cutover: Option<CutoverIntent>,
}

/// One reconcile of the operator against the model. Returns the persisted status after it.
fn reconcile(
    w: &mut World,
    st: &mut Status,
    now: Timestamp,
    request: &mut Option<String>,
    crash_at: Option<usize>,
) {
    let mut writes = 0usize;
    let crashed = |writes: usize| crash_at.is_some_and(|c| writes >= c);
    if st.cutover.is_none() {
        let p = PlanInput {
            now,
            policy: FailoverPolicy::Automatic,
            unhealthy_after: Duration::from_secs(1),
            active: st.active.clone(),
            epoch: st.epoch,
            switchover_request: request.take(),
            pods: [view(w, 0, now), view(w, 1, now)],
        };
        match plan(&p) {
            Plan::Start(c) => {
                st.epoch = st.epoch.max(c.epoch);
                st.cutover = Some(c); // persisted before any action
                writes += 1;
            }
            Plan::DemoteStray { pod } => {
                w.servers[idx(&pod)].role = Role::Standby;
                return;
            }
            _ => return,
        }
    }
    for _ in 0..8 {
        if crashed(writes) {
            return;
        }
        let Some(c) = st.cutover.clone() else { return };
        let result = match action(&c) {
            Action::Demote { pod } => {
                let i = idx(&pod);
                if w.servers[i].up && w.servers[i].reachable {
                    w.servers[i].role = Role::Standby;
                    StepResult::Demoted { drained: true }
                } else {
                    StepResult::DemoteFailed
                }
            }
            Action::Promote { pod, epoch } => w.promote(idx(&pod), epoch),
            Action::Swing { pod } => {
                w.selector = Some(idx(&pod));
                StepResult::Swung
            }
            Action::Verify { pod, epoch } => {
                let s = &w.servers[idx(&pod)];
                if !s.up || !s.reachable {
                    StepResult::NotYetVerified
                } else if s.role != Role::Active || s.epoch != epoch {
                    StepResult::TargetNotActive
                } else {
                    StepResult::Verified
                }
            }
            Action::Replace { pod } => {
                let i = idx(&pod);
                if !w.servers[i].up {
                    // The replacement pod starts as a standby.
                    w.servers[i] = Server {
                        up: true,
                        reachable: true,
                        role: Role::Standby,
                        epoch: 0,
                    };
                }
                StepResult::Replaced
            }
        };
        let from_promotable = !c.from.is_empty() && {
            let s = &w.servers[idx(&c.from)];
            s.up && s.reachable && s.role == Role::Standby
        };
        let t = &w.servers[idx(&c.target)];
        let cx = StepContext {
            now,
            drain_timeout: Duration::from_secs(10),
            target_healthy: t.up && t.reachable,
            from_promotable,
            stall_after: Duration::from_secs(60),
        };
        match advance(&c, &result, &cx) {
            Outcome::Stay => return,
            Outcome::Update(n) => {
                st.epoch = st.epoch.max(n.epoch);
                st.cutover = Some(n);
                writes += 1;
            }
            Outcome::Finished { intent, .. } => {
                st.active = Some(intent.target.clone());
                st.epoch = st.epoch.max(intent.epoch);
                st.cutover = None;
                return;
            }
        }
    }
}

#[test]
fn simulation_converges_and_never_has_two_writers() {
    for seed in 1..=300u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let mut w = World {
            sql_epoch: (seed % 3) as i64, // sometimes the database is ahead of a fresh status
            sql_holder: None,
            servers: [
                Server {
                    up: true,
                    reachable: true,
                    role: Role::Standby,
                    epoch: 0,
                },
                Server {
                    up: true,
                    reachable: true,
                    role: Role::Standby,
                    epoch: 0,
                },
            ],
            selector: None,
        };
        let mut st = Status::default();
        let mut clock = 0i64;
        let mut last_epoch = 0;
        for round in 0..60 {
            clock += 1 + (rng.next() % 40) as i64;
            let faults = round < 45;
            if faults {
                for i in 0..2 {
                    if rng.chance(4) {
                        // kill -9: restarts as standby (or stays down a while)
                        w.servers[i] = Server {
                            up: rng.chance(50),
                            reachable: true,
                            role: Role::Standby,
                            epoch: 0,
                        };
                    } else if rng.chance(4) {
                        w.servers[i].reachable = !w.servers[i].reachable;
                    } else if !w.servers[i].up && rng.chance(30) {
                        w.servers[i] = Server {
                            up: true,
                            reachable: true,
                            role: Role::Standby,
                            epoch: 0,
                        };
                    }
                }
            } else {
                for s in &mut w.servers {
                    s.reachable = true;
                    if !s.up {
                        *s = Server {
                            up: true,
                            reachable: true,
                            role: Role::Standby,
                            epoch: 0,
                        };
                    }
                }
            }
            // Server behaviour: a fenced active finds out at its next write and demotes itself.
            for s in &mut w.servers {
                if s.role == Role::Active && s.epoch < w.sql_epoch && rng.chance(50) {
                    s.role = Role::Standby;
                }
            }
            let mut request = (faults && rng.chance(10)).then(|| "standby".to_string());
            // Operator crash after a random number of persisted writes: the in-memory state is
            // lost, status (serialised) survives and the next reconcile resumes from it.
            let crash_at = (faults && rng.chance(20)).then(|| (rng.next() % 4) as usize);
            let before = st.cutover.clone();
            reconcile(&mut w, &mut st, ts(clock), &mut request, crash_at);
            let json = serde_json::to_string(&st.cutover).expect("ser");
            st.cutover = serde_json::from_str(&json).expect("de");
            if let (Some(b), Some(a)) = (&before, &st.cutover) {
                // Resuming never forgets the epoch it already handed out.
                assert!(a.epoch >= b.epoch, "seed {seed}: epoch regressed on resume");
            }
            assert!(
                st.epoch >= last_epoch,
                "seed {seed}: status epoch went down"
            );
            last_epoch = st.epoch;
            assert!(
                w.writers() <= 1,
                "seed {seed} round {round}: two instances can write"
            );
            if let (None, Some(active)) = (&st.cutover, &st.active) {
                // Between cutovers the Service selects exactly the recorded active.
                assert_eq!(w.selector, Some(idx(active)), "seed {seed} round {round}");
            }
        }
        // After faults stop, a few more reconciles converge.
        for _ in 0..20 {
            clock += 70;
            reconcile(&mut w, &mut st, ts(clock), &mut None, None);
        }
        assert!(
            st.cutover.is_none(),
            "seed {seed}: cutover still running: {:?}",
            st.cutover
        );
        let active = st.active.as_deref().map(idx).expect("an active");
        assert_eq!(
            w.selector,
            Some(active),
            "seed {seed}: Service must select the active"
        );
        assert_eq!(
            w.sql_holder,
            Some(active),
            "seed {seed}: the active holds the fence"
        );
        assert_eq!(w.servers[active].role, Role::Active, "seed {seed}");
        assert_eq!(w.servers[active].epoch, w.sql_epoch, "seed {seed}");
        assert_eq!(w.writers(), 1, "seed {seed}");
        assert_eq!(w.servers[1 - active].role, Role::Standby, "seed {seed}");
    }
}

#[test]
fn plan_lost_role_needs_no_readiness() {
    // The restarted process answers "standby" before its readiness probe passes: act now.
    let mut p = steady();
    p.pods[0].pod_ready = false;
    p.pods[0].server = Some(ServerView {
        role: Role::Standby,
        epoch: 0,
        version: None,
    });
    match plan(&p) {
        Plan::Start(c) => assert_eq!(
            (c.kind, c.target.as_str(), c.epoch),
            (CutoverKind::Failover, "im-b", 4)
        ),
        o => panic!("{o:?}"),
    }
}

// ------------------------------------------------------------------------------- stalls

fn stall_cx(el: i64, target_healthy: bool, from_promotable: bool) -> StepContext {
    StepContext {
        now: ts(el),
        drain_timeout: Duration::from_secs(10),
        target_healthy,
        from_promotable,
        stall_after: Duration::from_secs(60),
    }
}

#[test]
fn a_stuck_promote_waits_until_the_bound() {
    let c = mk(CutoverKind::Switchover, CutoverStep::Promoting);
    assert_eq!(
        advance(&c, &StepResult::PromoteFailed, &stall_cx(59, true, true)),
        Outcome::Stay
    );
}

#[test]
fn a_stalled_cutover_rolls_back_to_a_healthy_old_active_with_a_new_epoch() {
    for (step, r) in [
        (CutoverStep::Promoting, StepResult::PromoteFailed),
        (CutoverStep::Swinging, StepResult::SwingFailed),
    ] {
        for kind in [
            CutoverKind::Switchover,
            CutoverKind::Upgrade,
            CutoverKind::Failover,
        ] {
            let c = mk(kind, step);
            let Outcome::Update(n) = advance(&c, &r, &stall_cx(60, true, true)) else {
                panic!("{kind:?} {step:?}: expected a rollback");
            };
            assert_eq!(
                (n.from.as_str(), n.target.as_str(), n.epoch, n.step),
                ("im-b", "im-a", 8, CutoverStep::Promoting),
                "{kind:?} {step:?}"
            );
            let s = n.stalled.as_ref().expect("stall recorded");
            assert_eq!(
                (s.step, s.target.as_str(), s.rolled_back),
                (step, "im-b", true)
            );
            assert_eq!(n.started, c.started, "the cutover's clock keeps running");
            // The rollback stalls too: never rolled back again, no rewrite either.
            assert_eq!(
                advance(&n, &StepResult::PromoteFailed, &stall_cx(200, true, true)),
                Outcome::Stay
            );
            assert_eq!(outcome(&n, true), "RolledBack");
            assert_eq!(outcome(&c, true), "Succeeded");
        }
    }
}

#[test]
fn a_stalled_cutover_without_a_fallback_keeps_trying_and_reports() {
    // Initial promotion (no old active), or an old active that cannot take the role back.
    for (kind, from_promotable) in [
        (CutoverKind::Initial, true),
        (CutoverKind::Switchover, false),
        (CutoverKind::Failover, false),
    ] {
        let c = mk(kind, CutoverStep::Promoting);
        let Outcome::Update(n) = advance(
            &c,
            &StepResult::PromoteFailed,
            &stall_cx(61, true, from_promotable),
        ) else {
            panic!("{kind:?}: expected the stall to be recorded");
        };
        assert_eq!(
            (n.target.as_str(), n.epoch, n.step),
            ("im-b", 7, CutoverStep::Promoting),
            "{kind:?}: same target, same epoch"
        );
        assert!(n.stalled.as_ref().is_some_and(|s| !s.rolled_back));
        // Recorded once: later failures change nothing.
        assert_eq!(
            advance(&n, &StepResult::PromoteFailed, &stall_cx(90, true, false)),
            Outcome::Stay
        );
        // A promote that finally works moves on as usual.
        assert!(matches!(
            advance(&n, &StepResult::Promoted, &stall_cx(95, true, false)),
            Outcome::Update(m) if m.step == CutoverStep::Swinging
        ));
        if kind != CutoverKind::Initial {
            // The old active comes back as a healthy standby: now the role goes back to it.
            let Outcome::Update(m) =
                advance(&n, &StepResult::PromoteFailed, &stall_cx(95, true, true))
            else {
                panic!("{kind:?}: expected a rollback");
            };
            assert_eq!((m.target.as_str(), m.epoch), ("im-a", 8));
        }
    }
}

#[test]
fn steps_that_are_bounded_otherwise_do_not_stall() {
    for (step, r) in [
        (CutoverStep::Demoting, StepResult::DemoteFailed),
        (CutoverStep::Verifying, StepResult::NotYetVerified),
        (CutoverStep::Replacing, StepResult::ReplacePending),
    ] {
        let c = mk(CutoverKind::Failover, step);
        if let Outcome::Update(n) = advance(&c, &r, &stall_cx(61, true, true)) {
            assert!(n.stalled.is_none(), "{step:?}: {n:?}");
        }
    }
}

#[test]
fn stall_condition_says_what_happens_and_clears_once_the_cutover_ended() {
    let c = mk(CutoverKind::Switchover, CutoverStep::Promoting);
    assert_eq!(stall_condition(Some(&c), None, 60), None, "not stalled");
    let Outcome::Update(back) = advance(&c, &StepResult::PromoteFailed, &stall_cx(60, true, true))
    else {
        panic!("rollback");
    };
    let (status, msg, reason) = stall_condition(Some(&back), None, 60).expect("condition");
    assert_eq!((status, reason), ("True", "RollingBack"));
    assert!(
        msg.contains("Switchover to im-b did not finish within cutoverTimeoutSeconds=60")
            && msg.contains("stuck in Promoting")
            && msg.contains("promoting im-a again with epoch 8"),
        "{msg}"
    );
    let Outcome::Update(kept) = advance(&c, &StepResult::PromoteFailed, &stall_cx(60, true, false))
    else {
        panic!("kept");
    };
    let (_, msg, reason) = stall_condition(Some(&kept), None, 60).expect("condition");
    assert_eq!(reason, "StillTrying");
    assert!(
        msg.contains("im-a cannot take the role back")
            && msg.contains("still trying im-b with epoch 7"),
        "{msg}"
    );
    let t = crate::crd::TransitionRecord {
        kind: CutoverKind::Switchover,
        from: "im-b".into(),
        to: "im-a".into(),
        reason: "r".into(),
        started: Time(ts(0)),
        finished: Some(Time(ts(62))),
        duration_seconds: Some(62.0),
        outcome: Some("RolledBack".into()),
        epoch: 8,
    };
    let (status, msg, reason) = stall_condition(None, Some((&t, true)), 60).expect("ended");
    assert_eq!((status, reason), ("False", "CutoverEnded"));
    assert!(msg.contains("outcome RolledBack"), "{msg}");
    assert_eq!(stall_condition(None, Some((&t, false)), 60), None);
}

#[test]
fn a_request_during_a_cutover_is_refused_with_what_runs() {
    let c = mk(CutoverKind::Failover, CutoverStep::Verifying);
    let m = switchover_refused_during(&c, "standby");
    assert_eq!(
        m,
        "switchover request identitymesh.io/switchover=standby refused: Failover im-a → im-b (epoch 7) is in progress, step Verifying; request again once it has finished"
    );
}
