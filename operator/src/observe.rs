//! Pure reading of observed objects: pods and nodes into [`InstanceView`]s, and status pieces
//! (instances, conditions, phase) from views.

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::builders::{hash_of, pod::pod_version};
use crate::crd::{InstanceStatus, Role};
use crate::cutover::{InstanceView, ServerView};

fn condition<'a>(
    pod: &'a Pod,
    type_: &str,
) -> Option<&'a k8s_openapi::api::core::v1::PodCondition> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
}

/// Pod Ready, and since when it is not.
pub fn pod_ready(pod: &Pod) -> (bool, Option<Timestamp>) {
    match condition(pod, "Ready") {
        Some(c) if c.status == "True" => (true, None),
        Some(c) => (false, c.last_transition_time.as_ref().map(|t| t.0)),
        None => (false, None),
    }
}

/// Node Ready (None when unknown), and since when it is not.
pub fn node_ready(node: &Node) -> (Option<bool>, Option<Timestamp>) {
    let c = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"));
    match c {
        Some(c) if c.status == "True" => (Some(true), None),
        // "Unknown" is what the node controller sets when heartbeats stop, a grace period after
        // the last one: the node has been silent since its last heartbeat, not since the mark.
        Some(c) if c.status == "Unknown" => (
            Some(false),
            c.last_heartbeat_time
                .as_ref()
                .or(c.last_transition_time.as_ref())
                .map(|t| t.0),
        ),
        Some(c) => (Some(false), c.last_transition_time.as_ref().map(|t| t.0)),
        None => (None, None),
    }
}

/// The taint `kubectl cordon` (and the node lifecycle controller) put on an unschedulable node.
pub const UNSCHEDULABLE_TAINT: &str = "node.kubernetes.io/unschedulable";

/// NoSchedule taints that node autoscalers put on a node before they drain and remove it:
/// the cluster autoscaler's and Karpenter's (v1). An eviction leaves nothing the operator could
/// watch (the budget refuses it and nothing records the attempt), so the cordon or taint that
/// every drain starts with is the signal to move the active.
pub const DRAIN_TAINTS: [&str; 3] = [
    UNSCHEDULABLE_TAINT,
    "ToBeDeletedByClusterAutoscaler",
    "karpenter.sh/disrupted",
];

/// The node is cordoned or about to be drained: `spec.unschedulable` (`kubectl cordon`, the
/// first step of `kubectl drain`), or one of the [`DRAIN_TAINTS`] with effect NoSchedule.
pub fn node_cordoned(node: &Node) -> bool {
    let Some(spec) = node.spec.as_ref() else {
        return false;
    };
    spec.unschedulable == Some(true)
        || spec
            .taints
            .iter()
            .flatten()
            .any(|t| DRAIN_TAINTS.contains(&t.key.as_str()) && t.effect == "NoSchedule")
}

/// Pod has ended for good (evicted, or the process ran to completion): it must be recreated.
pub fn pod_finished(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Failed") | Some("Succeeded")
    )
}

pub fn pod_ip(pod: &Pod) -> Option<std::net::IpAddr> {
    pod.status.as_ref()?.pod_ip.as_ref()?.parse().ok()
}

pub fn pod_node(pod: &Pod) -> Option<String> {
    pod.spec.as_ref()?.node_name.clone()
}

/// Build the view of one slot.
pub fn instance_view(
    name: &str,
    pod: Option<&Pod>,
    node: Option<&Node>,
    server: Option<ServerView>,
    first_seen_unhealthy: Option<Timestamp>,
    desired_hash: Option<&str>,
) -> InstanceView {
    let Some(pod) = pod else {
        return InstanceView {
            name: name.to_string(),
            first_seen_unhealthy,
            up_to_date: true,
            ..Default::default()
        };
    };
    let (ready, not_ready_since) = pod_ready(pod);
    let (n_ready, n_since) = node.map(node_ready).unwrap_or((None, None));
    InstanceView {
        name: name.to_string(),
        exists: true,
        deleting: pod.metadata.deletion_timestamp.is_some() || pod_finished(pod),
        pod_ready: ready,
        not_ready_since,
        node_ready: n_ready,
        node_not_ready_since: n_since,
        node: pod_node(pod),
        node_cordoned: node.map(node_cordoned),
        server,
        first_seen_unhealthy,
        up_to_date: desired_hash.is_none() || hash_of(&pod.metadata) == desired_hash,
    }
}

/// status.instances[] entry.
pub fn instance_status(v: &InstanceView, pod: Option<&Pod>) -> InstanceStatus {
    InstanceStatus {
        name: v.name.clone(),
        node: pod.and_then(pod_node),
        ready: v.pod_ready,
        version: v
            .server
            .as_ref()
            .and_then(|s| s.version.clone())
            .or_else(|| pod.and_then(pod_version)),
        role: v.server.as_ref().map(|s| s.role).unwrap_or(Role::Unknown),
    }
}

/// Set a condition; keeps lastTransitionTime when the status did not change, so an unchanged
/// world produces an identical status (and no write).
pub fn set_condition(
    conds: &mut Vec<Condition>,
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) {
    let new = |ltt: Time| Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message: message.to_string(),
        observed_generation: generation,
        last_transition_time: ltt,
    };
    match conds.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            let ltt = if c.status == status {
                c.last_transition_time.clone()
            } else {
                Time(now)
            };
            *c = new(ltt);
        }
        None => conds.push(new(Time(now))),
    }
}

pub fn remove_condition(conds: &mut Vec<Condition>, type_: &str) {
    conds.retain(|c| c.type_ != type_);
}

pub fn get_condition<'a>(conds: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conds.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeCondition, NodeStatus, PodCondition, PodStatus};

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).expect("ts")
    }

    fn pod(ready: &str, since: i64) -> Pod {
        Pod {
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ip: Some("10.0.0.7".into()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: ready.into(),
                    last_transition_time: Some(Time(ts(since))),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn node(ready: &str) -> Node {
        Node {
            status: Some(NodeStatus {
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: ready.into(),
                    last_transition_time: Some(Time(ts(3))),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn readiness() {
        assert_eq!(pod_ready(&pod("True", 1)), (true, None));
        assert_eq!(pod_ready(&pod("False", 1)), (false, Some(ts(1))));
        assert_eq!(pod_ready(&Pod::default()), (false, None));
        assert_eq!(node_ready(&node("True")), (Some(true), None));
        assert_eq!(node_ready(&node("Unknown")), (Some(false), Some(ts(3))));
        assert_eq!(node_ready(&node("False")), (Some(false), Some(ts(3))));
        let mut silent = node("Unknown");
        if let Some(c) = silent
            .status
            .as_mut()
            .and_then(|s| s.conditions.as_mut())
            .and_then(|c| c.first_mut())
        {
            c.last_heartbeat_time = Some(Time(ts(-40)));
        }
        assert_eq!(
            node_ready(&silent),
            (Some(false), Some(ts(-40))),
            "silent since the last heartbeat"
        );
        assert_eq!(node_ready(&Node::default()), (None, None));
        assert_eq!(
            pod_ip(&pod("True", 0)),
            Some("10.0.0.7".parse().expect("ip"))
        );
    }

    #[test]
    fn cordoned_by_field_or_taint() {
        use k8s_openapi::api::core::v1::{NodeSpec, Taint};
        let with = |unschedulable: Option<bool>, taints: Vec<(&str, &str)>| Node {
            spec: Some(NodeSpec {
                unschedulable,
                taints: Some(
                    taints
                        .into_iter()
                        .map(|(key, effect)| Taint {
                            key: key.into(),
                            effect: effect.into(),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(!node_cordoned(&Node::default()));
        assert!(!node_cordoned(&with(None, vec![])));
        assert!(!node_cordoned(&with(Some(false), vec![])));
        assert!(node_cordoned(&with(Some(true), vec![])));
        assert!(node_cordoned(&with(
            None,
            vec![(UNSCHEDULABLE_TAINT, "NoSchedule")]
        )));
        assert!(
            !node_cordoned(&with(None, vec![(UNSCHEDULABLE_TAINT, "NoExecute")])),
            "only the NoSchedule taint is a cordon"
        );
        assert!(!node_cordoned(&with(
            None,
            vec![("node.kubernetes.io/not-ready", "NoSchedule")]
        )));
        // Autoscalers about to drain and remove the node.
        for key in ["ToBeDeletedByClusterAutoscaler", "karpenter.sh/disrupted"] {
            assert!(
                node_cordoned(&with(None, vec![(key, "NoSchedule")])),
                "{key}"
            );
        }
        assert!(
            !node_cordoned(&with(
                None,
                vec![("DeletionCandidateOfClusterAutoscaler", "PreferNoSchedule")]
            )),
            "a candidate is not being drained yet"
        );
    }

    #[test]
    fn views_carry_the_node_and_its_cordon() {
        let mut p = pod("True", 0);
        p.spec = Some(k8s_openapi::api::core::v1::PodSpec {
            node_name: Some("node-1".into()),
            ..Default::default()
        });
        let mut n = node("True");
        n.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
            unschedulable: Some(true),
            ..Default::default()
        });
        let v = instance_view("im-a", Some(&p), Some(&n), None, None, None);
        assert_eq!(
            (v.node.as_deref(), v.node_cordoned),
            (Some("node-1"), Some(true))
        );
        let v = instance_view("im-a", Some(&p), None, None, None, None);
        assert_eq!(
            v.node_cordoned, None,
            "an unread node is not a schedulable one"
        );
        let v = instance_view("im-a", Some(&p), Some(&node("True")), None, None, None);
        assert_eq!(v.node_cordoned, Some(false));
    }

    #[test]
    fn views() {
        let v = instance_view("im-a", None, None, None, Some(ts(1)), Some("h"));
        assert!(!v.exists);
        assert_eq!(v.first_seen_unhealthy, Some(ts(1)));
        let mut p = pod("True", 0);
        p.status.as_mut().expect("s").phase = Some("Failed".into());
        let v = instance_view("im-a", Some(&p), Some(&node("True")), None, None, Some("h"));
        assert!(v.deleting, "failed pods count as going away");
        assert!(!v.up_to_date, "no hash on the pod: out of date");
        let s = instance_status(&v, Some(&p));
        assert_eq!(s.role, Role::Unknown);
    }

    #[test]
    fn conditions_keep_transition_time_when_unchanged() {
        let mut c = Vec::new();
        set_condition(&mut c, "Ready", "True", "Running", "ok", Some(1), ts(1));
        set_condition(&mut c, "Ready", "True", "Running", "ok", Some(1), ts(9));
        assert_eq!(c[0].last_transition_time, Time(ts(1)));
        set_condition(&mut c, "Ready", "False", "Degraded", "no", Some(1), ts(10));
        assert_eq!(c[0].last_transition_time, Time(ts(10)));
        assert_eq!(c.len(), 1);
        remove_condition(&mut c, "Ready");
        assert!(c.is_empty());
    }
}
