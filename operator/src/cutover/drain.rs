//! Node maintenance: what cordoned nodes mean for the pair. Pure, like the rest of the cutover
//! module: the planner asks [`should_move_active`], the status step reports [`condition`].
//!
//! A cordon of the active's node (`kubectl cordon`, the first half of `kubectl drain`) moves the
//! role by a planned switchover to a standby that is ready on a schedulable node; the
//! PodDisruptionBudget refuses the drain's eviction of the active until then. A cordoned
//! standby's node needs nothing: the drain evicts the standby (the budget does not cover it) and
//! the pods step recreates it, where the scheduler will not put it on a cordoned node.

use super::{is_promotable, InstanceView};
use crate::crd::CutoverIntent;

/// `reason` of a switchover started because the active's node is cordoned (the cutover
/// intent, status.lastTransition and the Event carry it).
pub const NODE_DRAIN_REASON: &str = "NodeDrain";
/// Condition reasons of NodeMaintenance.
pub const ACTIVE_CORDONED: &str = "ActiveNodeCordoned";
pub const STANDBY_CORDONED: &str = "StandbyNodeCordoned";
pub const BOTH_CORDONED: &str = "BothNodesCordoned";

fn cordoned(v: &InstanceView) -> bool {
    v.node_cordoned == Some(true)
}

/// Known to be on a node that takes pods: an unread node is not assumed schedulable.
fn schedulable(v: &InstanceView) -> bool {
    v.node_cordoned == Some(false)
}

fn node(v: &InstanceView) -> &str {
    v.node.as_deref().unwrap_or("(unknown)")
}

/// Start a NodeDrain switchover: the active's node is cordoned and the standby can take the
/// role on a node that is not. Never onto a cordoned node: with both cordoned the role stays
/// (a switch would only have to come back), and after a switchover the old active, now the
/// standby on the cordoned node, is never switched back to.
pub fn should_move_active(active: &InstanceView, standby: &InstanceView) -> bool {
    cordoned(active) && schedulable(standby) && is_promotable(standby)
}

/// The NodeMaintenance condition as (reason, message), status True; None when neither pod's
/// node is cordoned (the condition is removed). `cutover` is the running one, if any.
pub fn condition(
    active: &InstanceView,
    standby: &InstanceView,
    cutover: Option<&CutoverIntent>,
) -> Option<(&'static str, String)> {
    let (a, s) = (&active.name, &standby.name);
    match (cordoned(active), cordoned(standby)) {
        (false, false) => None,
        (true, true) => Some((
            BOTH_CORDONED,
            format!(
                "the nodes of both server pods are cordoned (active {a} on {}, standby {s} on {}): no switchover is possible, and the PodDisruptionBudget keeps {a} from being evicted; uncordon one of them (kubectl uncordon {} lets {a} move to {s}), or delete pod {s} so it is recreated on a schedulable node",
                node(active),
                node(standby),
                node(standby)
            ),
        )),
        (true, false) => {
            let what = match cutover {
                Some(c) if c.reason == NODE_DRAIN_REASON => {
                    format!("switching over to {}", c.target)
                }
                Some(c) => format!(
                    "waiting for the running {} to finish, then switching over",
                    c.kind.as_str()
                ),
                None if should_move_active(active, standby) => format!("switching over to {s}"),
                None => format!(
                    "waiting for standby {s} to be ready on a schedulable node before switching over; the PodDisruptionBudget keeps {a} from being evicted meanwhile"
                ),
            };
            Some((
                ACTIVE_CORDONED,
                format!("node {} of active {a} is cordoned: {what}", node(active)),
            ))
        }
        (false, true) => Some((
            STANDBY_CORDONED,
            format!(
                "node {} of standby {s} is cordoned: nothing to switch; a drain may evict {s}, which is then recreated on a schedulable node",
                node(standby)
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{CutoverKind, CutoverStep, Role};
    use crate::cutover::ServerView;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    fn view(name: &str, role: Role, node: &str, cordoned: Option<bool>) -> InstanceView {
        InstanceView {
            name: name.into(),
            exists: true,
            pod_ready: true,
            node_ready: Some(true),
            node: Some(node.into()),
            node_cordoned: cordoned,
            server: Some(ServerView {
                role,
                epoch: 1,
                version: None,
            }),
            up_to_date: true,
            ..Default::default()
        }
    }

    fn running(kind: CutoverKind, reason: &str) -> CutoverIntent {
        CutoverIntent {
            kind,
            step: CutoverStep::Promoting,
            from: "im-a".into(),
            target: "im-b".into(),
            epoch: 2,
            reason: reason.into(),
            started: Time(Timestamp::UNIX_EPOCH),
            step_started: Time(Timestamp::UNIX_EPOCH),
            verified: None,
            stalled: None,
        }
    }

    #[test]
    fn moves_the_active_only_to_a_ready_standby_on_a_schedulable_node() {
        let c = Some(true);
        let u = Some(false);
        let not_ready = |mut v: InstanceView| {
            v.pod_ready = false;
            v
        };
        let as_active = |mut v: InstanceView| {
            v.server.as_mut().expect("server").role = Role::Active;
            v
        };
        let active = |cordoned| view("im-a", Role::Active, "node-1", cordoned);
        let standby = |cordoned| view("im-b", Role::Standby, "node-2", cordoned);
        // (active, standby, switch?)
        let table = [
            (active(c), standby(u), true),
            (active(u), standby(u), false),
            (active(None), standby(u), false),
            (active(u), standby(c), false),
            (active(c), standby(c), false),
            (active(c), standby(None), false),
            (active(c), not_ready(standby(u)), false),
            (active(c), as_active(standby(u)), false),
        ];
        for (i, (a, s, want)) in table.iter().enumerate() {
            assert_eq!(should_move_active(a, s), *want, "row {i}: {a:?} {s:?}");
        }
    }

    #[test]
    fn condition_says_what_the_cordon_means() {
        let a = |c| view("im-a", Role::Active, "node-1", c);
        let s = |c| view("im-b", Role::Standby, "node-2", c);
        assert_eq!(condition(&a(Some(false)), &s(Some(false)), None), None);
        assert_eq!(condition(&a(None), &s(None), None), None);

        let (reason, msg) = condition(&a(Some(true)), &s(Some(true)), None).expect("both");
        assert_eq!(reason, BOTH_CORDONED);
        assert!(msg.contains("im-a on node-1"), "{msg}");
        assert!(msg.contains("im-b on node-2"), "{msg}");
        assert!(msg.contains("kubectl uncordon node-2"), "{msg}");

        let (reason, msg) = condition(&a(Some(true)), &s(Some(false)), None).expect("active");
        assert_eq!(reason, ACTIVE_CORDONED);
        assert_eq!(
            msg,
            "node node-1 of active im-a is cordoned: switching over to im-b"
        );
        let drain = running(CutoverKind::Switchover, NODE_DRAIN_REASON);
        let (_, msg) = condition(&a(Some(true)), &s(Some(false)), Some(&drain)).expect("drain");
        assert!(msg.ends_with("switching over to im-b"), "{msg}");
        let upgrade = running(CutoverKind::Upgrade, "rolling");
        let (_, msg) = condition(&a(Some(true)), &s(Some(false)), Some(&upgrade)).expect("up");
        assert!(
            msg.ends_with("waiting for the running Upgrade to finish, then switching over"),
            "{msg}"
        );
        let mut unready = s(Some(false));
        unready.pod_ready = false;
        let (_, msg) = condition(&a(Some(true)), &unready, None).expect("waiting");
        assert!(
            msg.contains("waiting for standby im-b to be ready on a schedulable node"),
            "{msg}"
        );

        let (reason, msg) = condition(&a(Some(false)), &s(Some(true)), None).expect("standby");
        assert_eq!(reason, STANDBY_CORDONED);
        assert!(
            msg.starts_with("node node-2 of standby im-b is cordoned"),
            "{msg}"
        );
    }
}
