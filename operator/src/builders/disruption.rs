//! The PodDisruptionBudget that keeps the active from being evicted: `kubectl drain` (and any
//! other eviction) is refused for the active and allowed for the standby, so a drain waits for
//! the NodeDrain switchover instead of taking the serving pod down.

use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::service::client_selector;
use super::{meta, spec_hash, stamp_hash, Names};
use crate::crd::IdentityMeshCluster;

/// The budget for the pod the client Service selects (`active`), with the Service's own
/// selector so the two can never name different pods. No active (provisioning): the selector
/// names no pod, so the budget exists but covers nothing, and both pods may be evicted; neither
/// serves yet. One object whose selector swings, rather than one created and deleted.
pub fn build_disruption_budget(
    imc: &IdentityMeshCluster,
    names: &Names,
    active: Option<&str>,
) -> PodDisruptionBudget {
    let mut pdb = PodDisruptionBudget {
        metadata: meta(imc, names, names.disruption_budget()),
        spec: Some(PodDisruptionBudgetSpec {
            // One pod selected and one must stay: every eviction of the active is refused. An
            // integer minAvailable, not maxUnavailable: the disruption controller computes the
            // latter from the pods' controller's scale, which a custom resource does not have,
            // and then never allows or counts anything.
            min_available: Some(IntOrString::Int(1)),
            // A broken active may be evicted (a drain must not wait on it): failover handles it.
            unhealthy_pod_eviction_policy: Some("AlwaysAllow".into()),
            selector: Some(LabelSelector {
                match_labels: Some(client_selector(names, active)),
                match_expressions: None,
            }),
            ..Default::default()
        }),
        status: None,
    };
    let h = spec_hash(&pdb);
    stamp_hash(&mut pdb.metadata, h);
    pdb
}

/// The spec fields the operator decides: a live budget that differs in them is rewritten even
/// when its hash annotation still matches (an edited selector would leave the active exposed).
pub fn budget_matches(live: &PodDisruptionBudget, desired: &PodDisruptionBudget) -> bool {
    let key = |p: &PodDisruptionBudget| {
        p.spec.as_ref().map(|s| {
            (
                s.selector.clone(),
                s.max_unavailable.clone(),
                s.min_available.clone(),
                s.unhealthy_pod_eviction_policy.clone(),
            )
        })
    };
    key(live) == key(desired)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builders::service::build_client_service;
    use crate::builders::test_support::cluster;
    use crate::builders::{hash_of, LABEL_CLUSTER, LABEL_INSTANCE};

    fn match_labels(p: &PodDisruptionBudget) -> std::collections::BTreeMap<String, String> {
        p.spec
            .as_ref()
            .and_then(|s| s.selector.as_ref())
            .and_then(|s| s.match_labels.clone())
            .expect("matchLabels")
    }

    #[test]
    fn protects_exactly_the_pod_the_service_selects() {
        let imc = cluster("im", "prod");
        let names = Names::of(&imc);
        for active in [Some("im-a"), Some("im-b"), None] {
            let pdb = build_disruption_budget(&imc, &names, active);
            let svc = build_client_service(&imc, &names, active);
            assert_eq!(
                Some(match_labels(&pdb)),
                svc.spec.and_then(|s| s.selector),
                "{active:?}"
            );
            let spec = pdb.spec.as_ref().expect("spec");
            assert_eq!(spec.min_available, Some(IntOrString::Int(1)));
            assert_eq!(spec.max_unavailable, None);
            assert_eq!(
                spec.unhealthy_pod_eviction_policy.as_deref(),
                Some("AlwaysAllow")
            );
        }
        let pdb = build_disruption_budget(&imc, &names, Some("im-b"));
        let sel = match_labels(&pdb);
        assert_eq!(sel.get(LABEL_INSTANCE).map(String::as_str), Some("im-b"));
        assert_eq!(sel.get(LABEL_CLUSTER).map(String::as_str), Some("im"));
        assert_eq!(pdb.metadata.name.as_deref(), Some("im"));
        assert_eq!(pdb.metadata.namespace.as_deref(), Some("prod"));
        let owner = &pdb.metadata.owner_references.as_ref().expect("owner")[0];
        assert_eq!(
            (owner.kind.as_str(), owner.controller),
            ("IdentityMeshCluster", Some(true))
        );
    }

    #[test]
    fn without_an_active_it_covers_no_pod() {
        let imc = cluster("im", "prod");
        let names = Names::of(&imc);
        let pdb = build_disruption_budget(&imc, &names, None);
        // Every server pod carries its own (non-empty) name as the instance label.
        for pod in names.pods() {
            let labels = crate::builders::pod::build_pod(&imc, &names, &pod)
                .metadata
                .labels
                .expect("labels");
            let selected = match_labels(&pdb)
                .iter()
                .all(|(k, v)| labels.get(k) == Some(v));
            assert!(!selected, "{pod} must not be covered before a promotion");
        }
    }

    #[test]
    fn a_swing_changes_selector_and_hash_only() {
        let imc = cluster("im", "prod");
        let names = Names::of(&imc);
        let a = build_disruption_budget(&imc, &names, Some("im-a"));
        let b = build_disruption_budget(&imc, &names, Some("im-b"));
        assert_ne!(hash_of(&a.metadata), hash_of(&b.metadata));
        assert!(!budget_matches(&a, &b));
        assert!(budget_matches(&a, &a.clone()));
        let mut a2 = a.clone();
        a2.spec = b.spec.clone();
        a2.metadata.annotations = b.metadata.annotations.clone();
        assert_eq!(a2, b);
        // An edit of the budget's limits is drift too.
        let mut edited = a.clone();
        edited.spec.as_mut().expect("spec").min_available = Some(IntOrString::Int(0));
        assert!(!budget_matches(&edited, &a));
    }
}
