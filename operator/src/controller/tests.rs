//! Reconcile tests against the fake API server and fake pods (`super::fakes`): each drives
//! whole reconciles and asserts on what was written, as the apiserver saw it.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::driver::STEADY_REQUEUE;
use super::fakes::{put, selector_of, Fake, Harness, Store};
use super::*;
use crate::builders::ANNOTATION_SWITCHOVER;
use crate::conditions::{NODE_MAINTENANCE_CONDITION, POD_START_CONDITION, SPEC_REJECTED_CONDITION};
use crate::crd::Role;
use crate::podclient::{CanaryReport, CanaryRun, InstanceRow, RelayReport, UiReport};
use crate::{certs, observe};

// ------------------------------------------------------------------------------- tests

#[tokio::test]
async fn converges_then_steady_state_makes_zero_writes() {
    let h = Harness::new(true);
    h.converge().await;
    let st = h.status();
    assert_eq!(st.active_pod.as_deref(), Some("im-a"));
    assert_eq!(st.standby_pod.as_deref(), Some("im-b"));
    assert_eq!(st.epoch, 1);
    assert_eq!(
        st.last_transition.as_ref().map(|t| t.kind),
        Some(CutoverKind::Initial)
    );
    assert!(st.certificate_expiry.is_some());
    assert_eq!(selector_of(&h.get("services", "im").expect("svc")), "im-a");
    for obj in [
        ("secrets", "im-ca"),
        ("secrets", "im-tls"),
        ("secrets", "im-keyring"),
        ("configmaps", "im-config"),
        ("configmaps", "im-ca"),
        ("services", "im-pods"),
        ("pods", "im-a"),
        ("pods", "im-b"),
    ] {
        let o = h
            .get(obj.0, obj.1)
            .unwrap_or_else(|| panic!("{obj:?} missing"));
        assert_eq!(
            o["metadata"]["ownerReferences"][0]["kind"], "IdentityMeshCluster",
            "{obj:?}"
        );
    }
    assert!(h.cluster().finalizers().contains(&FINALIZER.to_string()));
    assert_eq!(
        h.pods.0.lock().expect("p").calls,
        vec!["promote im-a 1".to_string()]
    );

    h.take_writes();
    for _ in 0..3 {
        h.reconcile().await;
    }
    assert_eq!(
        h.take_writes(),
        Vec::<String>::new(),
        "steady state must not write"
    );
    // The checks ran (relays) or are pending (canary: no switchover yet) without writes.
    let st = h.status();
    let cond = |t: &str| {
        observe::get_condition(&st.conditions, t)
            .map(|c| (c.status.clone(), c.reason.clone()))
            .unwrap_or_default()
    };
    assert_eq!(
        cond("RelaysReconnected"),
        ("True".to_string(), "NoRelays".to_string())
    );
    assert_eq!(
        cond("CanarySync"),
        ("Unknown".to_string(), "CanaryPending".to_string())
    );
    assert!(h.pods.0.lock().expect("p").canary_calls.is_empty());

    // No key material in status or events.
    let status = serde_json::to_string(&h.status()).expect("status json");
    assert!(!status.contains("PRIVATE KEY"));
    let s = h.store.lock().expect("store");
    for ((res, _, _), o) in s.objects.iter() {
        if res == "events" {
            let text = o.to_string();
            assert!(
                !text.contains("PRIVATE KEY") && !text.contains("U2VydmVyPXRjcDpzcWw="),
                "{text}"
            );
        }
    }
}

#[tokio::test]
async fn planned_switchover_by_annotation() {
    let h = Harness::new(true);
    h.converge().await;
    h.pods.0.lock().expect("p").calls.clear();
    {
        let mut s = h.store.lock().expect("store");
        let o = s
            .objects
            .get_mut(&("identitymeshclusters".into(), "prod".into(), "im".into()))
            .expect("imc");
        o["metadata"]["annotations"] = json!({ANNOTATION_SWITCHOVER: "standby"});
    }
    h.converge().await;
    let st = h.status();
    assert_eq!(st.active_pod.as_deref(), Some("im-b"));
    assert_eq!(st.standby_pod.as_deref(), Some("im-a"));
    assert_eq!(st.epoch, 2);
    let lt = st.last_transition.expect("transition");
    assert_eq!(
        (lt.kind, lt.from.as_str(), lt.to.as_str(), lt.epoch),
        (CutoverKind::Switchover, "im-a", "im-b", 2)
    );
    assert_eq!(lt.outcome.as_deref(), Some("Succeeded"));
    assert_eq!(selector_of(&h.get("services", "im").expect("svc")), "im-b");
    assert!(
        !h.cluster()
            .annotations()
            .contains_key(ANNOTATION_SWITCHOVER),
        "request consumed"
    );
    let calls = h.pods.0.lock().expect("p").calls.clone();
    assert_eq!(
        calls,
        vec!["demote im-a".to_string(), "promote im-b 2".to_string()],
        "demote before promote"
    );
    // Both pods stayed: no restart.
    assert!(h.get("pods", "im-a").is_some());
}

#[tokio::test]
async fn automatic_failover_when_active_pod_is_gone() {
    let h = Harness::new(true);
    h.converge().await;
    // The active's pod vanishes (node lost and pod force-deleted, or deleted by hand).
    h.store
        .lock()
        .expect("store")
        .objects
        .remove(&("pods".into(), "prod".into(), "im-a".into()));
    // First reconcile notices, the next acts once the threshold (1 s) has passed.
    h.reconcile().await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    h.converge().await;
    let st = h.status();
    assert_eq!(st.active_pod.as_deref(), Some("im-b"));
    assert_eq!(st.epoch, 2);
    assert_eq!(
        st.last_transition.as_ref().map(|t| t.kind),
        Some(CutoverKind::Failover)
    );
    assert_eq!(selector_of(&h.get("services", "im").expect("svc")), "im-b");
    assert!(
        h.get("pods", "im-a").is_some(),
        "lost pod replaced by a fresh standby"
    );
    let calls = h.pods.0.lock().expect("p").calls.clone();
    assert!(calls.contains(&"promote im-b 2".to_string()), "{calls:?}");
}

#[tokio::test]
async fn resumes_a_persisted_cutover_with_the_same_epoch() {
    let h = Harness::new(true);
    h.converge().await;
    // An operator died right after persisting this intent (before promoting).
    {
        let mut s = h.store.lock().expect("store");
        let o = s
            .objects
            .get_mut(&("identitymeshclusters".into(), "prod".into(), "im".into()))
            .expect("imc");
        o["status"]["cutover"] = json!({
            "kind": "Switchover", "step": "Promoting", "from": "im-a", "target": "im-b", "epoch": 5,
            "reason": "test", "started": "2026-01-01T00:00:00Z", "stepStarted": "2026-01-01T00:00:00Z"
        });
        o["status"]["epoch"] = json!(5);
    }
    h.pods.0.lock().expect("p").calls.clear();
    h.converge().await;
    let calls = h.pods.0.lock().expect("p").calls.clone();
    assert_eq!(
        calls.first().map(String::as_str),
        Some("promote im-b 5"),
        "{calls:?}"
    );
    assert_eq!(h.status().active_pod.as_deref(), Some("im-b"));
    assert_eq!(h.status().epoch, 5);
}

#[tokio::test]
async fn missing_licence_secret_is_reported_and_the_rest_reconciled() {
    let h = Harness::new(false);
    for _ in 0..3 {
        h.reconcile().await;
        h.kubelet();
    }
    let st = h.status();
    let c = observe::get_condition(&st.conditions, "SecretsReady").expect("condition");
    assert_eq!(c.status, "False");
    assert!(
        c.message.contains("im-licence") && c.message.contains("spec.licence"),
        "{}",
        c.message
    );
    // A Warning event names the Secret and key, once.
    {
        let s = h.store.lock().expect("store");
        let events: Vec<&Value> = s
            .objects
            .iter()
            .filter(|((r, _, _), o)| r == "events" && o["reason"] == "SecretProblem")
            .map(|(_, o)| o)
            .collect();
        assert_eq!(events.len(), 1, "one event, not one per reconcile");
        let note = events[0]["note"].as_str().unwrap_or_default();
        assert!(
            note.contains("im-licence") && note.contains("licence.json"),
            "{note}"
        );
    }
    // Everything else is still there.
    assert!(h.get("services", "im").is_some());
    assert!(h.get("pods", "im-a").is_some());
    assert!(h.get("secrets", "im-keyring").is_some());
}

#[tokio::test]
async fn keyring_is_never_regenerated() {
    let h = Harness::new(true);
    h.converge().await;
    let before = h.get("secrets", "im-keyring").expect("keyring");
    // Break it: the operator reports and leaves it alone.
    {
        let mut s = h.store.lock().expect("store");
        let o = s
            .objects
            .get_mut(&("secrets".into(), "prod".into(), "im-keyring".into()))
            .expect("kr");
        o["data"]["keyring.json"] = json!("e30=");
    }
    h.reconcile().await;
    let after = h.get("secrets", "im-keyring").expect("keyring");
    assert_ne!(before, after);
    assert_eq!(after["data"]["keyring.json"], "e30=");
    let c = observe::get_condition(&h.status().conditions, "KeyRingReady")
        .expect("cond")
        .clone();
    assert_eq!(c.status, "False");
    assert!(c.message.contains("im-keyring"));
}

#[tokio::test]
async fn version_change_upgrades_standby_first() {
    let h = Harness::new(true);
    h.converge().await;
    {
        let mut s = h.store.lock().expect("store");
        let o = s
            .objects
            .get_mut(&("identitymeshclusters".into(), "prod".into(), "im".into()))
            .expect("imc");
        o["spec"]["version"] = json!("1.3.0");
        o["metadata"]["generation"] = json!(2);
    }
    h.reconcile().await;
    // Standby (im-b) was deleted first; the active is untouched.
    assert!(
        h.get("pods", "im-b").is_none()
            || h.get("pods", "im-b")
                .is_some_and(|p| p["metadata"]["labels"]["identitymesh.io/version"] == "1.3.0")
    );
    assert_eq!(
        h.get("pods", "im-a").expect("a")["metadata"]["labels"]["identitymesh.io/version"],
        "1.2.3"
    );
    for _ in 0..20 {
        h.reconcile().await;
        h.kubelet();
        let a = h
            .get("pods", "im-a")
            .map(|p| p["metadata"]["labels"]["identitymesh.io/version"].clone());
        let b = h
            .get("pods", "im-b")
            .map(|p| p["metadata"]["labels"]["identitymesh.io/version"].clone());
        if a == Some(json!("1.3.0"))
            && b == Some(json!("1.3.0"))
            && h.status().phase == Some(Phase::Running)
        {
            break;
        }
    }
    let st = h.status();
    assert_eq!(
        st.active_pod.as_deref(),
        Some("im-b"),
        "switched to the upgraded standby"
    );
    assert_eq!(
        st.last_transition.as_ref().map(|t| t.kind),
        Some(CutoverKind::Upgrade)
    );
    for p in ["im-a", "im-b"] {
        assert_eq!(
            h.get("pods", p).expect("pod")["metadata"]["labels"]["identitymesh.io/version"],
            "1.3.0",
            "{p}"
        );
    }
}

fn edit_cluster(h: &Harness, f: impl FnOnce(&mut Value)) {
    let mut s = h.store.lock().expect("store");
    let o = s
        .objects
        .get_mut(&("identitymeshclusters".into(), "prod".into(), "im".into()))
        .expect("imc");
    f(o);
}

#[tokio::test]
async fn manual_policy_reports_and_waits() {
    let h = Harness::new(true);
    edit_cluster(&h, |o| o["spec"]["failover"]["policy"] = json!("Manual"));
    h.converge().await;
    {
        let mut s = h.store.lock().expect("store");
        let p = s
            .objects
            .get_mut(&("pods".into(), "prod".into(), "im-a".into()))
            .expect("pod");
        p["status"]["conditions"] =
            json!([{"type":"Ready","status":"False","lastTransitionTime":"2026-01-01T00:00:00Z"}]);
    }
    h.reconcile().await;
    h.reconcile().await;
    let st = h.status();
    assert_eq!(
        st.active_pod.as_deref(),
        Some("im-a"),
        "no automatic promotion"
    );
    assert_eq!(st.phase, Some(Phase::FailoverRequired));
    let c = observe::get_condition(&st.conditions, "FailoverRequired").expect("condition");
    assert_eq!(c.status, "True");
    assert!(c.message.contains(ANNOTATION_SWITCHOVER), "{}", c.message);
    assert!(!h
        .pods
        .0
        .lock()
        .expect("p")
        .calls
        .iter()
        .any(|c| c.starts_with("promote im-b")));
}

#[tokio::test]
async fn restarted_active_process_fails_over_at_once() {
    let h = Harness::new(true);
    h.converge().await;
    // kill -9: the kubelet restarts the container, which comes back as standby.
    h.pods
        .0
        .lock()
        .expect("p")
        .roles
        .insert("im-a".into(), (Role::Standby, 0));
    h.converge().await;
    let st = h.status();
    assert_eq!(st.active_pod.as_deref(), Some("im-b"));
    assert_eq!(
        st.last_transition.as_ref().map(|t| t.kind),
        Some(CutoverKind::Failover)
    );
    assert!(
        h.get("pods", "im-a").is_some(),
        "healthy old pod kept as the standby"
    );
}

#[tokio::test]
async fn paused_cluster_touches_nothing_but_status() {
    let h = Harness::new(true);
    h.converge().await;
    edit_cluster(&h, |o| o["spec"]["paused"] = json!(true));
    h.take_writes();
    h.reconcile().await;
    let w = h.take_writes();
    assert!(
        w.iter()
            .all(|w| w.ends_with("/status") || w.contains("/events")),
        "{w:?}"
    );
    assert_eq!(h.status().phase, Some(Phase::Paused));
    h.reconcile().await;
    assert_eq!(h.take_writes(), Vec::<String>::new());
}

#[tokio::test]
async fn switchover_to_an_unready_standby_is_rejected_and_the_request_cleared() {
    let h = Harness::new(true);
    h.converge().await;
    {
        let mut s = h.store.lock().expect("store");
        let p = s
            .objects
            .get_mut(&("pods".into(), "prod".into(), "im-b".into()))
            .expect("pod");
        p["status"]["conditions"] =
            json!([{"type":"Ready","status":"False","lastTransitionTime":"2026-01-01T00:00:00Z"}]);
    }
    edit_cluster(&h, |o| {
        o["metadata"]["annotations"] = json!({ANNOTATION_SWITCHOVER: "standby"})
    });
    h.reconcile().await;
    assert_eq!(h.status().active_pod.as_deref(), Some("im-a"));
    assert!(!h
        .cluster()
        .annotations()
        .contains_key(ANNOTATION_SWITCHOVER));
    let s = h.store.lock().expect("store");
    assert!(
        s.objects
            .iter()
            .any(|((r, _, _), o)| r == "events" && o["reason"] == "SwitchoverRejected"),
        "a Warning event explains why"
    );
}

#[tokio::test]
async fn user_tls_secret_problems_name_secret_and_key() {
    let h = Harness::new(true);
    edit_cluster(&h, |o| o["spec"]["tls"] = json!({"secretName": "my-cert"}));
    put(
        &h.store,
        "secrets",
        "prod",
        json!({"apiVersion":"v1","kind":"Secret","metadata":{"name":"my-cert","namespace":"prod"},
               "data":{"tls.crt": "bm90IGEgY2VydA=="}}),
    );
    h.reconcile().await;
    h.reconcile().await;
    let st = h.status();
    let c = observe::get_condition(&st.conditions, "SecretsReady").expect("condition");
    assert_eq!(c.status, "False");
    assert!(
        c.message.contains("my-cert") && c.message.contains("tls.key"),
        "{}",
        c.message
    );
    assert!(c.message.contains("tls.crt"), "{}", c.message);
    assert!(
        h.get("secrets", "im-tls").is_none(),
        "no operator certificate when the user supplies one"
    );
    let pod = h.get("pods", "im-a").expect("pod still created");
    let vols = pod["spec"]["volumes"].as_array().expect("volumes");
    assert!(vols.iter().any(|v| v["secret"]["secretName"] == "my-cert"));
}

#[tokio::test]
async fn an_edited_client_service_selector_is_repaired() {
    let h = Harness::new(true);
    h.converge().await;
    {
        let mut s = h.store.lock().expect("store");
        let svc = s
            .objects
            .get_mut(&("services".into(), "prod".into(), "im".into()))
            .expect("svc");
        svc["spec"]["selector"]["identitymesh.io/instance"] = json!("im-b");
    }
    h.reconcile().await;
    assert_eq!(selector_of(&h.get("services", "im").expect("svc")), "im-a");
}

#[tokio::test]
async fn serving_certificate_follows_dns_names_and_keeps_the_ca() {
    let h = Harness::new(true);
    h.converge().await;
    let ca_before = h.get("secrets", "im-ca").expect("ca");
    let tls_before = h.get("secrets", "im-tls").expect("tls");
    edit_cluster(&h, |o| {
        o["spec"]["tls"]["dnsNames"] = json!(["im.contoso.local", "identity.contoso.local"])
    });
    h.reconcile().await;
    let tls_after = h.get("secrets", "im-tls").expect("tls");
    assert_ne!(
        tls_before["data"]["tls.crt"], tls_after["data"]["tls.crt"],
        "re-issued"
    );
    assert_eq!(
        ca_before,
        h.get("secrets", "im-ca").expect("ca"),
        "CA untouched"
    );
    let pem = String::from_utf8(
        base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            tls_after["data"]["tls.crt"].as_str().expect("b64"),
        )
        .expect("decode"),
    )
    .expect("utf8");
    let info = certs::inspect(&pem).expect("cert");
    assert!(info
        .dns_names
        .contains(&"identity.contoso.local".to_string()));
    assert!(info
        .dns_names
        .contains(&"im.prod.svc.cluster.local".to_string()));
    // And then it is stable again.
    h.take_writes();
    h.reconcile().await;
    assert!(
        !h.take_writes().iter().any(|w| w.contains("/secrets/")),
        "no re-issue without a reason"
    );
}

#[tokio::test]
async fn promote_conflict_records_stored_epoch_plus_one_before_retrying() {
    let h = Harness::new(true);
    // The database is ahead of status (restored backup, or status lost): SQL holds epoch 7.
    h.pods.0.lock().expect("p").sql_epoch = 7;
    h.converge().await;
    let (calls, intents) = {
        let p = h.pods.0.lock().expect("p");
        (p.calls.clone(), p.intent_at_promote.clone())
    };
    assert_eq!(
        calls,
        vec!["promote im-a 1".to_string(), "promote im-a 8".to_string()],
        "one refused attempt, then stored_epoch + 1"
    );
    assert_eq!(
        intents,
        vec![(1, Some(1)), (8, Some(8))],
        "each promote acts on an intent already in status"
    );
    let st = h.status();
    assert_eq!(st.active_pod.as_deref(), Some("im-a"));
    assert_eq!(st.epoch, 8);
}

#[tokio::test]
async fn verification_waits_until_the_registry_shows_one_active() {
    let h = Harness::new(true);
    h.converge().await;
    // A cut-off old instance still registered as active (the operator cannot reach it).
    h.pods.0.lock().expect("p").extra_rows = vec![InstanceRow {
        instance: "im-ghost".into(),
        role: identitymesh_contract::internal::Role::Active,
        epoch: 1,
        host: None,
        version: None,
    }];
    {
        let mut s = h.store.lock().expect("store");
        let o = s
            .objects
            .get_mut(&("identitymeshclusters".into(), "prod".into(), "im".into()))
            .expect("imc");
        o["metadata"]["annotations"] = json!({ANNOTATION_SWITCHOVER: "standby"});
    }
    for _ in 0..4 {
        h.reconcile().await;
    }
    let st = h.status();
    let c = st.cutover.as_ref().expect("cutover still open");
    assert_eq!(c.step, crate::crd::CutoverStep::Verifying, "{c:?}");
    assert_eq!(
        observe::get_condition(&st.conditions, "SingleActive").map(|c| c.status.as_str()),
        Some("False")
    );
    // The promotion fences it in SQL: its row leaves the active role.
    h.pods.0.lock().expect("p").extra_rows.clear();
    h.converge().await;
    let st = h.status();
    assert_eq!(st.active_pod.as_deref(), Some("im-b"));
    assert!(st.cutover.is_none());
    assert_eq!(
        observe::get_condition(&st.conditions, "SingleActive").map(|c| c.status.as_str()),
        Some("True")
    );
}

// ------------------------------------------------------------------------------- checks

fn events_with_reason(h: &Harness, reason: &str) -> Vec<Value> {
    h.store
        .lock()
        .expect("store")
        .objects
        .iter()
        .filter(|((r, _, _), o)| r == "events" && o["reason"] == reason)
        .map(|(_, o)| o.clone())
        .collect()
}

fn condition_of(
    h: &Harness,
    type_: &str,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    observe::get_condition(&h.status().conditions, type_)
        .cloned()
        .unwrap_or_else(|| panic!("no condition {type_}"))
}

fn request_switchover(h: &Harness) {
    edit_cluster(h, |o| {
        o["metadata"]["annotations"] = json!({ANNOTATION_SWITCHOVER: "standby"})
    });
}

fn canary_report(ok: Option<bool>, runs: &[(&str, &str, Option<&str>)]) -> CanaryReport {
    CanaryReport {
        ok,
        runs: runs
            .iter()
            .map(|(name, status, error)| CanaryRun {
                connector_id: format!("id-{name}"),
                connector: name.to_string(),
                run_id: Some(format!("run-{name}")),
                status: status.to_string(),
                error: error.map(str::to_string),
            })
            .collect(),
    }
}

#[tokio::test]
async fn canary_runs_once_on_the_new_active_after_a_switchover() {
    let h = Harness::new(true);
    h.converge().await;
    h.pods.0.lock().expect("p").canary.insert(
        "im-b".into(),
        Fake::Ok(canary_report(
            Some(true),
            &[("hr-canary", "succeeded", None)],
        )),
    );
    for _ in 0..3 {
        h.reconcile().await;
    }
    assert!(
        h.pods.0.lock().expect("p").canary_calls.is_empty(),
        "no cutover, no canary"
    );

    request_switchover(&h);
    h.converge().await;
    let st = h.status();
    assert_eq!(st.active_pod.as_deref(), Some("im-b"));
    assert_eq!(
        h.pods.0.lock().expect("p").canary_calls,
        vec![("im-b".to_string(), Duration::from_secs(20))],
        "exactly once, on the new active, waiting 20 s"
    );
    let c = condition_of(&h, "CanarySync");
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", "CanarySucceeded")
    );
    assert!(
        c.message.contains("Switchover im-a → im-b (epoch 2")
            && c.message.contains("hr-canary: succeeded"),
        "{}",
        c.message
    );
    // The cutover itself was recorded before the canary ran.
    assert_eq!(
        st.last_transition
            .as_ref()
            .and_then(|t| t.outcome.as_deref()),
        Some("Succeeded")
    );
    let events = events_with_reason(&h, "CanarySucceeded");
    assert_eq!(events.len(), 1, "one event for the canary result");
    assert_eq!(events[0]["type"], "Normal");

    // Later reconciles neither run it again nor write.
    h.take_writes();
    for _ in 0..3 {
        h.reconcile().await;
    }
    assert_eq!(h.pods.0.lock().expect("p").canary_calls.len(), 1);
    assert_eq!(
        h.take_writes(),
        Vec::<String>::new(),
        "steady state must not write"
    );

    // The next switchover runs it again, on its own new active.
    h.pods
        .0
        .lock()
        .expect("p")
        .canary
        .insert("im-a".into(), Fake::Ok(canary_report(None, &[])));
    request_switchover(&h);
    h.converge().await;
    assert_eq!(
        h.pods.0.lock().expect("p").canary_calls,
        vec![
            ("im-b".to_string(), Duration::from_secs(20)),
            ("im-a".to_string(), Duration::from_secs(20))
        ]
    );
    let c = condition_of(&h, "CanarySync");
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", "NoCanaryConnector")
    );
    assert!(c.message.contains("im-b → im-a (epoch 3"), "{}", c.message);
}

#[tokio::test]
async fn failed_canary_after_a_failover_is_reported() {
    let h = Harness::new(true);
    h.converge().await;
    h.pods.0.lock().expect("p").canary.insert(
        "im-b".into(),
        Fake::Ok(canary_report(
            Some(false),
            &[
                (
                    "hr-canary",
                    "failed",
                    Some("LDAP bind failed: invalid credentials"),
                ),
                ("ad-canary", "running", None),
            ],
        )),
    );
    // kill -9 of the active: it comes back as standby, and the operator fails over.
    h.pods
        .0
        .lock()
        .expect("p")
        .roles
        .insert("im-a".into(), (Role::Standby, 0));
    h.converge().await;
    let st = h.status();
    assert_eq!(
        st.last_transition.as_ref().map(|t| t.kind),
        Some(CutoverKind::Failover)
    );
    assert_eq!(h.pods.0.lock().expect("p").canary_calls.len(), 1);
    let c = condition_of(&h, "CanarySync");
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "CanaryFailed")
    );
    assert!(
        c.message.contains("hr-canary: failed: LDAP bind failed")
            && c.message.contains("still running: ad-canary"),
        "{}",
        c.message
    );
    let events = events_with_reason(&h, "CanaryFailed");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["type"], "Warning");
    for _ in 0..2 {
        h.reconcile().await;
    }
    assert_eq!(h.pods.0.lock().expect("p").canary_calls.len(), 1);
}

#[tokio::test]
async fn canary_that_cannot_reach_the_new_active_is_retried_until_it_answers() {
    let h = Harness::new(true);
    h.converge().await;
    h.pods
        .0
        .lock()
        .expect("p")
        .canary
        .insert("im-b".into(), Fake::Unreachable);
    request_switchover(&h);
    h.converge().await;
    let c = condition_of(&h, "CanarySync");
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("Unknown", "ActiveUnreachable")
    );
    let calls = h.pods.0.lock().expect("p").canary_calls.len();
    assert!(calls >= 1);
    // Retried (within the window) without rewriting status or repeating the event. A retry
    // takes two reconciles: one collects the last answer, the next starts another attempt.
    h.take_writes();
    h.reconcile().await;
    h.reconcile().await;
    assert_eq!(h.pods.0.lock().expect("p").canary_calls.len(), calls + 1);
    assert_eq!(h.take_writes(), Vec::<String>::new());
    assert_eq!(events_with_reason(&h, "CanaryNotRun").len(), 1);
    // It answers now: timed out this time; recorded, and not run again. (The first reconcile
    // collects the attempt made before it answered.)
    h.pods.0.lock().expect("p").canary.insert(
        "im-b".into(),
        Fake::Ok(canary_report(
            Some(false),
            &[("hr-canary", "running", None)],
        )),
    );
    for _ in 0..3 {
        h.reconcile().await;
    }
    let c = condition_of(&h, "CanarySync");
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "CanaryTimedOut")
    );
    assert!(c.message.contains("after 20s: hr-canary"), "{}", c.message);
    h.reconcile().await;
    assert_eq!(h.pods.0.lock().expect("p").canary_calls.len(), calls + 2);
}

#[tokio::test]
async fn relays_reconnected_follows_the_active_without_needless_writes() {
    let h = Harness::new(true);
    h.converge().await;
    let set = |f: Fake<RelayReport>| {
        h.pods.0.lock().expect("p").relays.insert("im-a".into(), f);
    };
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    set(Fake::Ok(RelayReport {
        expected: names(&["dc1", "dc2", "dc3"]),
        connected_here: names(&["dc1"]),
        missing: names(&["dc3", "dc2"]),
    }));
    h.reconcile().await;
    let c = condition_of(&h, "RelaysReconnected");
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "RelaysMissing")
    );
    assert_eq!(
        c.message,
        "2 of 3 expected relays not connected to im-a: dc2, dc3"
    );
    h.take_writes();
    h.reconcile().await;
    h.reconcile().await;
    assert_eq!(
        h.take_writes(),
        Vec::<String>::new(),
        "unchanged answer, no write"
    );

    set(Fake::Ok(RelayReport {
        expected: names(&["dc1", "dc2", "dc3"]),
        connected_here: names(&["dc1", "dc2", "dc3"]),
        missing: vec![],
    }));
    h.reconcile().await;
    let c = condition_of(&h, "RelaysReconnected");
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", "AllConnected")
    );
    assert_eq!(c.message, "all 3 expected relays connected to im-a");
    h.take_writes();
    h.reconcile().await;
    assert_eq!(h.take_writes(), Vec::<String>::new());

    set(Fake::Unreachable);
    h.reconcile().await;
    let c = condition_of(&h, "RelaysReconnected");
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("Unknown", "ActiveUnreachable")
    );
    h.take_writes();
    h.reconcile().await;
    assert_eq!(h.take_writes(), Vec::<String>::new());

    // Only the active is asked.
    let calls = h.pods.0.lock().expect("p").relay_calls.clone();
    assert!(calls.iter().all(|p| p == "im-a"), "{calls:?}");
}

#[tokio::test]
async fn relays_are_asked_of_the_new_active_after_a_switchover() {
    let h = Harness::new(true);
    h.converge().await;
    h.pods.0.lock().expect("p").relays.insert(
        "im-b".into(),
        Fake::Ok(RelayReport {
            expected: vec!["dc1".into()],
            connected_here: vec![],
            missing: vec!["dc1".into()],
        }),
    );
    request_switchover(&h);
    h.converge().await;
    assert_eq!(h.status().active_pod.as_deref(), Some("im-b"));
    let c = condition_of(&h, "RelaysReconnected");
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "RelaysMissing")
    );
    assert!(
        c.message.ends_with("connected to im-b: dc1"),
        "{}",
        c.message
    );
    assert_eq!(
        h.pods
            .0
            .lock()
            .expect("p")
            .relay_calls
            .last()
            .map(String::as_str),
        Some("im-b")
    );
}

#[tokio::test]
async fn admin_ui_is_checked_on_the_active_and_after_a_switchover_on_the_new_one() {
    let h = Harness::new(true);
    h.converge().await;
    let c = condition_of(&h, "AdminUiReady");
    assert_eq!(
        (c.status.as_str(), c.reason.as_str(), c.message.as_str()),
        (
            "True",
            "UiServed",
            "im-a serves the Admin UI and reads the issuer's discovery document"
        )
    );
    // Unchanged answers write no status.
    h.take_writes();
    h.reconcile().await;
    assert_eq!(h.take_writes(), Vec::<String>::new());
    // The standby cannot reach the issuer: after the switchover the condition says so.
    h.pods.0.lock().expect("p").ui.insert(
        "im-b".into(),
        Fake::Ok(UiReport {
            page_status: 200,
            sign_in: "oidc".into(),
            discovery_error: Some(
                "OIDC discovery document https://login/x: connection refused".into(),
            ),
        }),
    );
    request_switchover(&h);
    h.converge().await;
    assert_eq!(h.status().active_pod.as_deref(), Some("im-b"));
    let c = condition_of(&h, "AdminUiReady");
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "IssuerUnreachable")
    );
    assert!(
        c.message
            .starts_with("im-b serves the Admin UI but cannot read"),
        "{}",
        c.message
    );
    assert!(c.message.ends_with("connection refused"), "{}", c.message);
}

// ------------------------------------------------------------------------------- stale reads

/// The watch cache can hand reconcile an object older than the operator's own last status
/// write. Deciding from it must not swing the selector back, wipe or replace the cutover
/// intent, or lower the epoch.
#[tokio::test]
async fn a_stale_cached_object_never_regresses_the_selector_or_the_cutover_intent() {
    let h = Harness::new(true);
    h.converge().await;
    let stale = h.cluster(); // active im-a, epoch 1, no cutover
                             // A ghost active row keeps the switchover open in Verifying (after the swing).
    h.pods.0.lock().expect("p").extra_rows = vec![InstanceRow {
        instance: "im-ghost".into(),
        role: identitymesh_contract::internal::Role::Active,
        epoch: 1,
        host: None,
        version: None,
    }];
    request_switchover(&h);
    for _ in 0..3 {
        h.reconcile().await;
    }
    let c = h.status().cutover.expect("cutover open");
    assert_eq!(
        (c.step, c.epoch),
        (crate::crd::CutoverStep::Verifying, 2),
        "{c:?}"
    );
    let swung_at = {
        let mut s = h.store.lock().expect("store");
        s.statuses.clear();
        let sel = s.selectors.clone();
        assert_eq!(sel.last().map(String::as_str), Some("im-b"), "{sel:?}");
        sel.len()
    };

    // Requeues deliver the stale copy, before and after the cutover finishes.
    for _ in 0..2 {
        reconcile(Arc::new(stale.clone()), h.ctx.clone())
            .await
            .expect("reconcile");
    }
    h.pods.0.lock().expect("p").extra_rows.clear();
    for _ in 0..3 {
        reconcile(Arc::new(stale.clone()), h.ctx.clone())
            .await
            .expect("reconcile");
    }

    let s = h.store.lock().expect("store");
    assert!(
        s.selectors[swung_at..].iter().all(|x| x == "im-b"),
        "the selector went back: {:?}",
        s.selectors
    );
    for st in &s.statuses {
        assert!(st["epoch"].as_i64() >= Some(2), "epoch went back: {st}");
        let cut = &st["cutover"];
        assert!(
            cut.is_null() || (cut["kind"] == "Switchover" && cut["epoch"] == 2),
            "cutover intent replaced: {cut}"
        );
    }
    drop(s);
    let st = h.status();
    assert_eq!(st.active_pod.as_deref(), Some("im-b"));
    assert_eq!(st.epoch, 2);
    let lt = st.last_transition.expect("transition");
    assert_eq!((lt.kind, lt.epoch), (CutoverKind::Switchover, 2));
    let calls = h.pods.0.lock().expect("p").calls.clone();
    assert!(
        !calls
            .iter()
            .any(|c| c.starts_with("promote") && !c.ends_with(" 2") && c != "promote im-a 1"),
        "no cutover was restarted from the stale copy: {calls:?}"
    );
}

/// Someone else writes the cluster between this reconcile's read and its status write: the
/// write is refused (409) and recomputed from the newer object instead of overwriting it.
#[tokio::test]
async fn a_status_write_that_lost_a_race_is_recomputed_not_forced() {
    let h = Harness::new(true);
    // While the first promote runs, another writer records a higher epoch.
    h.pods.0.lock().expect("p").on_first_promote = Some(Box::new(|s: &mut Store| {
        let o = s
            .objects
            .get_mut(&("identitymeshclusters".into(), "prod".into(), "im".into()))
            .expect("imc");
        o["status"]["epoch"] = json!(9);
        o["metadata"]["resourceVersion"] = json!("999999");
    }));
    h.converge().await;
    // (Epoch 9 issued elsewhere means im-a's epoch 1 is stale: the operator moves on from 9.)
    let st = h.status();
    assert!(
        st.epoch >= 9,
        "the other writer's epoch was overwritten: {st:?}"
    );
    let statuses = h.store.lock().expect("store").statuses.clone();
    let epochs: Vec<i64> = statuses
        .iter()
        .filter_map(|s| s["epoch"].as_i64())
        .collect();
    assert!(
        epochs.windows(2).all(|w| w[0] <= w[1]),
        "status.epoch went back: {epochs:?}"
    );
}

// ------------------------------------------------------------------------------- stalls

/// The standby stays healthy but its promote keeps failing after the old active was demoted:
/// past spec.cutoverTimeoutSeconds the cutover is reported stalled and the role goes back to
/// the old active with a new epoch. A switchover request meanwhile is refused, in status.
#[tokio::test]
async fn a_stalled_switchover_is_reported_and_rolled_back_to_the_old_active() {
    let h = Harness::new(true);
    edit_cluster(&h, |o| o["spec"]["cutoverTimeoutSeconds"] = json!(1));
    h.converge().await;
    h.pods.0.lock().expect("p").promote_fails = vec!["im-b".into()];
    h.pods.0.lock().expect("p").calls.clear();
    request_switchover(&h);
    h.reconcile().await;
    let c = h.status().cutover.expect("cutover running");
    assert_eq!(c.step, crate::crd::CutoverStep::Promoting);
    assert!(c.stalled.is_none());

    // Another request while it runs: refused with the reason in status, not silently dropped.
    request_switchover(&h);
    h.reconcile().await;
    let r = condition_of(&h, "SwitchoverRequest");
    assert_eq!(
        (r.status.as_str(), r.reason.as_str()),
        ("False", "CutoverInProgress")
    );
    assert!(
        r.message.contains("refused") && r.message.contains("Switchover im-a → im-b"),
        "{}",
        r.message
    );
    assert!(!h
        .cluster()
        .annotations()
        .contains_key(ANNOTATION_SWITCHOVER));
    assert_eq!(events_with_reason(&h, "SwitchoverRefused").len(), 1);
    assert_eq!(
        h.status().cutover.map(|c| (c.target, c.epoch)),
        Some(("im-b".to_string(), 2)),
        "the running cutover is untouched"
    );

    tokio::time::sleep(Duration::from_millis(1100)).await;
    h.converge().await;
    let st = h.status();
    assert_eq!(st.active_pod.as_deref(), Some("im-a"), "{st:?}");
    assert_eq!(
        st.epoch, 3,
        "the rollback outbids the epoch the target may hold"
    );
    let lt = st.last_transition.as_ref().expect("transition");
    assert_eq!(
        (lt.to.as_str(), lt.epoch, lt.outcome.as_deref()),
        ("im-a", 3, Some("RolledBack"))
    );
    let calls = h.pods.0.lock().expect("p").calls.clone();
    assert_eq!(calls.first().map(String::as_str), Some("demote im-a"));
    assert_eq!(
        calls.last().map(String::as_str),
        Some("promote im-a 3"),
        "{calls:?}"
    );
    // Stalled while it ran (True in a written status), resolved once it ended.
    let was_true = h.store.lock().expect("store").statuses.iter().any(|s| {
        s["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "CutoverStalled" && c["status"] == "True")
    });
    assert!(was_true, "CutoverStalled was never True in status");
    let c = condition_of(&h, "CutoverStalled");
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "CutoverEnded")
    );
    assert!(c.message.contains("RolledBack"), "{}", c.message);
    let ev = events_with_reason(&h, "CutoverStalled");
    assert_eq!(ev.len(), 1, "one event for the stall");
    assert_eq!(ev[0]["type"], "Warning");
    let note = ev[0]["note"].as_str().unwrap_or_default();
    assert!(
        note.contains("cutoverTimeoutSeconds=1") && note.contains("promoting im-a again"),
        "{note}"
    );
    assert_eq!(events_with_reason(&h, "CutoverRolledBack").len(), 1);
    // Traffic never went to the pod that could not be promoted.
    let sel = h.store.lock().expect("store").selectors.clone();
    assert!(!sel.iter().any(|s| s == "im-b"), "{sel:?}");
}

// ------------------------------------------------------------------------------- canary task

/// A reconcile that must come back promptly (the canary may take its whole 20 s wait).
async fn reconcile_promptly(h: &Harness) {
    tokio::time::timeout(Duration::from_secs(5), h.reconcile())
        .await
        .expect("reconcile blocked (on the canary?)");
}

fn hang_canary_on(h: &Harness, pod: &str) {
    h.pods
        .0
        .lock()
        .expect("p")
        .canary
        .insert(pod.into(), Fake::Hang);
}

/// The canary after a switchover takes its time; meanwhile the new active dies and the
/// failover starts on the next reconcile, and the unanswered canary is given up.
#[tokio::test]
async fn a_running_canary_does_not_hold_up_failure_detection() {
    let h = Harness::new(true);
    h.converge().await;
    hang_canary_on(&h, "im-b");
    request_switchover(&h);
    for _ in 0..4 {
        reconcile_promptly(&h).await;
        h.kubelet();
    }
    let st = h.status();
    assert_eq!(st.active_pod.as_deref(), Some("im-b"));
    assert!(st.cutover.is_none());
    assert_eq!(h.pods.0.lock().expect("p").canary_calls.len(), 1);
    assert_eq!(
        condition_of(&h, "CanarySync").reason,
        "CanaryPending",
        "no answer yet: the condition is left alone"
    );

    // kill -9 of the new active: it restarts as a standby.
    h.pods
        .0
        .lock()
        .expect("p")
        .roles
        .insert("im-b".into(), (Role::Standby, 0));
    reconcile_promptly(&h).await;
    let st = h.status();
    let moved = st
        .cutover
        .as_ref()
        .map(|c| (c.kind, c.target.clone()))
        .or_else(|| st.last_transition.as_ref().map(|t| (t.kind, t.to.clone())));
    assert_eq!(
        moved,
        Some((CutoverKind::Failover, "im-a".to_string())),
        "{st:?}"
    );
    assert_eq!(
        h.pods.0.lock().expect("p").canary_abandoned,
        1,
        "the unanswered canary of the previous transition is dropped"
    );
}

/// spec.paused: the canary of the last cutover is dropped and not started while paused.
#[tokio::test]
async fn a_paused_cluster_runs_no_canary() {
    let h = Harness::new(true);
    h.converge().await;
    hang_canary_on(&h, "im-b");
    request_switchover(&h);
    for _ in 0..4 {
        reconcile_promptly(&h).await;
        h.kubelet();
    }
    assert_eq!(h.pods.0.lock().expect("p").canary_calls.len(), 1);
    edit_cluster(&h, |o| o["spec"]["paused"] = json!(true));
    for _ in 0..3 {
        reconcile_promptly(&h).await;
    }
    {
        let p = h.pods.0.lock().expect("p");
        assert_eq!(p.canary_abandoned, 1, "the running canary is dropped");
        assert_eq!(p.canary_calls.len(), 1, "none started while paused");
    }
    // Resumed: the canary the last cutover is owed runs again.
    h.pods.0.lock().expect("p").canary.insert(
        "im-b".into(),
        Fake::Ok(canary_report(
            Some(true),
            &[("hr-canary", "succeeded", None)],
        )),
    );
    edit_cluster(&h, |o| o["spec"]["paused"] = json!(false));
    for _ in 0..3 {
        reconcile_promptly(&h).await;
    }
    assert_eq!(h.pods.0.lock().expect("p").canary_calls.len(), 2);
    assert_eq!(condition_of(&h, "CanarySync").reason, "CanarySucceeded");
}

// ------------------------------------------------------------------------------- ownership

/// Objects under this cluster's derived names that belong to someone else (another cluster's
/// Service, a user's Secret) are reported and left alone, not taken over.
#[tokio::test]
async fn objects_owned_elsewhere_are_reported_and_left_alone() {
    let h = Harness::new(true);
    let theirs = json!({"apiVersion":"v1","kind":"Service","metadata":{"name":"im-pods","namespace":"prod",
        "resourceVersion":"5",
        "ownerReferences":[{"apiVersion":"identitymesh.io/v1alpha1","kind":"IdentityMeshCluster",
            "name":"im-pods","uid":"uid-other","controller":true}]},
        "spec":{"selector":{"identitymesh.io/instance":"im-pods-a"},"ports":[{"port":443}]}});
    let users = json!({"apiVersion":"v1","kind":"Secret","metadata":{"name":"im-keyring","namespace":"prod",
        "resourceVersion":"6",
        "managedFields":[{"manager":"kubectl-create","operation":"Update"}]},
        "data":{"keyring.json":"e30="}});
    put(&h.store, "services", "prod", theirs.clone());
    put(&h.store, "secrets", "prod", users.clone());
    for _ in 0..4 {
        h.reconcile().await;
        h.kubelet();
    }
    assert_eq!(
        h.get("services", "im-pods"),
        Some(theirs),
        "their Service untouched"
    );
    assert_eq!(
        h.get("secrets", "im-keyring"),
        Some(users),
        "the user's Secret untouched"
    );
    let c = condition_of(&h, "Conflict");
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", "ObjectOwnedElsewhere")
    );
    assert!(
        c.message.contains(
            "Service im-pods already exists and belongs to IdentityMeshCluster im-pods: left alone"
        ) && c.message.contains(
            "Secret im-keyring already exists and belongs to no owner (written by kubectl-create)"
        ),
        "{}",
        c.message
    );
    let ev = events_with_reason(&h, "Conflict");
    assert_eq!(ev.len(), 1, "one event, not one per reconcile");
    assert_eq!(ev[0]["type"], "Warning");

    // Once they are gone, the operator creates its own and the condition goes away.
    {
        let mut s = h.store.lock().expect("store");
        s.objects
            .remove(&("services".into(), "prod".into(), "im-pods".into()));
        s.objects
            .remove(&("secrets".into(), "prod".into(), "im-keyring".into()));
    }
    h.converge().await;
    assert!(observe::get_condition(&h.status().conditions, "Conflict").is_none());
    assert_eq!(
        h.get("services", "im-pods").expect("headless")["metadata"]["ownerReferences"][0]["uid"],
        "uid-1234"
    );
}

/// A pod under our name and with our labels that another owner holds is not adopted.
#[tokio::test]
async fn a_foreign_pod_with_our_name_is_not_adopted() {
    let h = Harness::new(true);
    let pod = json!({"apiVersion":"v1","kind":"Pod","metadata":{"name":"im-a","namespace":"prod",
        "resourceVersion":"7",
        "labels":{"identitymesh.io/cluster":"im","identitymesh.io/instance":"im-a"},
        "ownerReferences":[{"apiVersion":"apps/v1","kind":"ReplicaSet","name":"web-5d8f","uid":"uid-rs","controller":true}]},
        "spec":{"nodeName":"node-1","containers":[{"name":"web","image":"nginx"}]},
        "status":{"phase":"Running","podIP":"10.1.0.9",
            "conditions":[{"type":"Ready","status":"True","lastTransitionTime":"2026-01-01T00:00:00Z"}]}});
    put(&h.store, "pods", "prod", pod.clone());
    for _ in 0..4 {
        h.reconcile().await;
        h.kubelet();
    }
    assert_eq!(h.get("pods", "im-a"), Some(pod), "untouched");
    let calls = h.pods.0.lock().expect("p").calls.clone();
    assert!(
        !calls.iter().any(|c| c.contains("im-a")),
        "the foreign pod is never promoted: {calls:?}"
    );
    let c = condition_of(&h, "Conflict");
    assert!(
        c.message
            .contains("Pod im-a already exists and belongs to ReplicaSet web-5d8f"),
        "{}",
        c.message
    );
}

// ------------------------------------------------------------------------------- refusals

/// The apiserver's 422 for a pod, as it sends it (message and causes).
fn invalid_pod(name: &str) -> Value {
    json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","reason":"Invalid","code":422,
        "message": format!("Pod \"{name}\" is invalid: spec.tolerations[0].operator: Invalid value: \"Exists\": value must be empty when `operator` is 'Exists'"),
        "details":{"name":name,"kind":"Pod","causes":[{"reason":"FieldValueInvalid",
            "message":"Invalid value: \"Exists\": value must be empty when `operator` is 'Exists'",
            "field":"spec.tolerations[0].operator"}]}})
}

fn pod_creates(h: &Harness) -> usize {
    h.store
        .lock()
        .expect("store")
        .writes
        .iter()
        .filter(|w| w.starts_with("POST /api/v1/namespaces/prod/pods"))
        .count()
}

/// Pods the apiserver refuses (a field of the spec the pod API does not accept): a condition
/// and one Warning Event quoting the apiserver and naming the spec field, not a debug dump nor
/// a reconcile error; the create is retried with a growing delay, at once after a spec edit.
#[tokio::test]
async fn a_pod_the_apiserver_refuses_is_reported_and_retried_with_backoff() {
    let h = Harness::new(true);
    {
        let mut s = h.store.lock().expect("store");
        for p in ["im-a", "im-b"] {
            s.refuse.insert(("pods".into(), p.into()), invalid_pod(p));
        }
    }
    let mut requeues = Vec::new();
    for _ in 0..5 {
        requeues.push(h.reconcile().await);
    }
    assert_eq!(pod_creates(&h), 2, "one try per pod, not one per reconcile");
    assert!(
        requeues[1..]
            .iter()
            .all(|a| *a == ReconcileAction::requeue(STEADY_REQUEUE)),
        "no tight loop: {requeues:?}"
    );
    let c = condition_of(&h, SPEC_REJECTED_CONDITION);
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", "RefusedByApiserver")
    );
    assert!(
        c.message.contains("the apiserver refused Pod im-a (check spec.tolerations): 422 Invalid: Pod \"im-a\" is invalid: spec.tolerations[0].operator: Invalid value: \"Exists\": value must be empty when `operator` is 'Exists'"),
        "{}",
        c.message
    );
    let created = condition_of(&h, "PodsCreated");
    assert_eq!(
        (created.status.as_str(), created.reason.as_str()),
        ("False", "CreateRefused")
    );
    for m in [&c.message, &created.message] {
        assert!(
            !m.contains("Status {") && !m.contains("ErrorResponse"),
            "{m}"
        );
    }
    let ev = events_with_reason(&h, "SpecRejected");
    assert_eq!(ev.len(), 1, "one event, not one per reconcile");
    assert_eq!(ev[0]["type"], "Warning");
    assert!(ev[0]["note"]
        .as_str()
        .unwrap_or_default()
        .contains("spec.tolerations"));

    // When the delay is up it is tried again, and the next delay is longer.
    let delay_of = |h: &Harness| {
        let m = h.ctx.refused_writes.lock().expect("m");
        let r = m.get("prod/im/Pod/im-a").expect("backing off").clone();
        (r.attempts, r.next_try.duration_since(Timestamp::now()))
    };
    let (attempts, d) = delay_of(&h);
    assert_eq!(attempts, 1);
    assert!(d.as_secs() <= 5 && d.as_secs() >= 3, "{d:?}");
    for r in h.ctx.refused_writes.lock().expect("m").values_mut() {
        r.next_try = Timestamp::now();
    }
    h.reconcile().await;
    assert_eq!(pod_creates(&h), 4);
    let (attempts, d) = delay_of(&h);
    assert_eq!(attempts, 2);
    assert!(d.as_secs() <= 10 && d.as_secs() >= 8, "{d:?}");
    h.reconcile().await;
    assert_eq!(pod_creates(&h), 4, "backing off again");

    // The user fixes the spec: the new pods are created at once and the condition goes away.
    h.store.lock().expect("store").refuse.clear();
    edit_cluster(&h, |o| {
        o["spec"]["tolerations"] = json!([]);
        o["metadata"]["generation"] = json!(2);
    });
    h.reconcile().await;
    assert_eq!(
        pod_creates(&h),
        6,
        "created without waiting for the backoff"
    );
    h.kubelet();
    h.converge().await;
    assert!(observe::get_condition(&h.status().conditions, SPEC_REJECTED_CONDITION).is_none());
    assert_eq!(condition_of(&h, "PodsCreated").status, "True");
    assert!(h.ctx.refused_writes.lock().expect("m").is_empty());
}

/// A client Service the apiserver refuses (e.g. a bad annotation in spec.service.annotations)
/// is reported naming that field.
#[tokio::test]
async fn a_refused_client_service_names_the_service_annotations() {
    let h = Harness::new(true);
    h.store.lock().expect("store").refuse.insert(
        ("services".into(), "im".into()),
        json!({"kind":"Status","apiVersion":"v1","status":"Failure","reason":"Invalid","code":422,
            "message":"Service \"im\" is invalid: metadata.annotations: Invalid value: \"bad key!\": name part must consist of alphanumeric characters",
            "details":{"name":"im","kind":"Service","causes":[{"reason":"FieldValueInvalid","message":"Invalid value","field":"metadata.annotations"}]}}),
    );
    for _ in 0..3 {
        h.reconcile().await;
        h.kubelet();
    }
    let c = condition_of(&h, SPEC_REJECTED_CONDITION);
    assert!(
        c.message.contains("the apiserver refused Service im (check spec.service.annotations): 422 Invalid: Service \"im\" is invalid: metadata.annotations"),
        "{}",
        c.message
    );
    let patches = h
        .store
        .lock()
        .expect("store")
        .writes
        .iter()
        .filter(|w| w.as_str() == "PATCH /api/v1/namespaces/prod/services/im")
        .count();
    assert!(patches <= 2, "backed off: {patches}");
}

/// A reconcile that keeps failing is retried after a growing delay, reset by a success.
#[tokio::test]
async fn failed_reconciles_back_off() {
    let h = Harness::new(true);
    let imc = Arc::new(h.cluster());
    let err = || Error::Invalid("boom".into());
    let got: Vec<_> = (0..4)
        .map(|_| error_policy(imc.clone(), &err(), h.ctx.clone()))
        .collect();
    let want: Vec<_> = [5, 10, 20, 40]
        .into_iter()
        .map(|s| ReconcileAction::requeue(Duration::from_secs(s)))
        .collect();
    assert_eq!(got, want);
    h.reconcile().await;
    assert_eq!(
        error_policy(imc, &err(), h.ctx.clone()),
        ReconcileAction::requeue(Duration::from_secs(5))
    );
}

/// A failed reconcile is counted under the step that failed, and the reason it always had.
#[tokio::test]
async fn failed_reconciles_are_counted_by_step() {
    let h = Harness::new(true);
    let imc = Arc::new(h.cluster());
    let gone = || {
        let s: kube::core::Status = serde_json::from_value(json!({
            "status": "Failure", "code": 503, "reason": "ServiceUnavailable", "message": "etcd"
        }))
        .expect("status");
        kube::Error::Api(Box::new(s))
    };
    error_policy(imc.clone(), &Error::ReadSecret(gone()), h.ctx.clone());
    let wrapped = Error::Finalizer(Box::new(kube::runtime::finalizer::Error::ApplyFailed(
        Error::Conflict("im".into()),
    )));
    error_policy(imc, &wrapped, h.ctx.clone());
    let out = h.ctx.metrics.render();
    for line in [
        r#"identitymesh_operator_reconcile_errors_total{reason="Kube",step="read_secret"} 1"#,
        r#"identitymesh_operator_reconcile_errors_total{reason="Conflict",step="write_status"} 1"#,
    ] {
        assert!(out.contains(line), "{line} not in {out}");
    }
}

/// The kubelet's part for pods that cannot start: the server container waits with `reason`.
fn kubelet_waiting(h: &Harness, reason: &str, message: &str) {
    let mut s = h.store.lock().expect("store");
    for ((res, _, name), o) in s.objects.iter_mut() {
        if res == "pods" {
            o["spec"]["nodeName"] = json!(if name == "im-a" { "node-1" } else { "node-2" });
            o["status"] = json!({"phase":"Pending",
                "conditions":[{"type":"Ready","status":"False","lastTransitionTime":"2026-01-01T00:00:00Z"}],
                "containerStatuses":[{"name":"server","image": o["spec"]["containers"][0]["image"],
                    "imageID":"","ready":false,"restartCount":0,
                    "state":{"waiting":{"reason":reason,"message":message}}}]});
        }
    }
}

/// Pods whose image cannot be pulled, or whose container config names a missing Secret, are
/// reported with the kubelet's message and the spec field, instead of only "waiting for a Ready
/// server pod"; the pull error survives the ImagePullBackOff that follows it.
#[tokio::test]
async fn pods_that_cannot_start_are_reported_with_the_kubelets_message() {
    let h = Harness::new(true);
    h.reconcile().await;
    h.reconcile().await;
    assert!(h.get("pods", "im-a").is_some() && h.get("pods", "im-b").is_some());
    let pull = "rpc error: code = NotFound desc = failed to pull and unpack image \"docker.io/identitymesh/server:1.2.3\": not found";
    kubelet_waiting(&h, "ErrImagePull", pull);
    h.reconcile().await;
    let c = condition_of(&h, POD_START_CONDITION);
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", "ImagePullFailed")
    );
    let want = format!("pod im-a cannot pull image \"identitymesh/server:1.2.3\" (check spec.image.repository, spec.version and spec.image.pullSecrets): ErrImagePull: {pull}");
    assert!(c.message.contains(&want), "{}", c.message);
    let ready = condition_of(&h, "Ready");
    assert!(
        ready.message.contains("waiting for a Ready server pod") && ready.message.contains(&want),
        "{}",
        ready.message
    );
    let events = events_with_reason(&h, "ImagePullFailed");
    assert_eq!(events.len(), 2, "one per pod");

    // The back-off that follows keeps the registry's error, and no new events.
    kubelet_waiting(
        &h,
        "ImagePullBackOff",
        "Back-off pulling image \"identitymesh/server:1.2.3\"",
    );
    h.reconcile().await;
    h.reconcile().await;
    assert!(condition_of(&h, POD_START_CONDITION)
        .message
        .contains(&want));
    assert_eq!(events_with_reason(&h, "ImagePullFailed").len(), 2);

    kubelet_waiting(
        &h,
        "CreateContainerConfigError",
        "secret \"im-licence\" not found",
    );
    h.reconcile().await;
    let c = condition_of(&h, POD_START_CONDITION);
    assert_eq!(c.reason, "ContainerConfigError");
    assert!(
        c.message.contains("pod im-b cannot create its container (check spec.licence (Secret im-licence)): CreateContainerConfigError: secret \"im-licence\" not found"),
        "{}",
        c.message
    );
    assert_eq!(events_with_reason(&h, "ContainerConfigError").len(), 2);

    // Fixed: the pods start, the condition goes away.
    {
        let mut s = h.store.lock().expect("store");
        for ((res, _, _), o) in s.objects.iter_mut() {
            if res == "pods" {
                o["status"] = Value::Null;
            }
        }
    }
    h.kubelet();
    h.converge().await;
    assert!(observe::get_condition(&h.status().conditions, POD_START_CONDITION).is_none());
}

// ------------------------------------------------------------------------------- node drain

fn calls(h: &Harness) -> Vec<String> {
    h.pods.0.lock().expect("p").calls.clone()
}

fn node_maintenance(h: &Harness) -> Option<(String, String, String)> {
    observe::get_condition(&h.status().conditions, NODE_MAINTENANCE_CONDITION)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// The budget covers what the Service selects: cluster and the active's instance label.
fn budget_names(h: &Harness, active: &str) {
    let sel = h.budget_selector().expect("budget");
    assert_eq!(
        sel,
        json!({"identitymesh.io/cluster": "im", "identitymesh.io/instance": active})
    );
    let svc = h.get("services", "im").expect("svc");
    assert_eq!(
        sel, svc["spec"]["selector"],
        "budget and Service name one pod"
    );
}

#[tokio::test]
async fn a_cordon_of_the_active_node_switches_over_with_reason_node_drain() {
    let h = Harness::new(true);
    h.converge().await;
    h.pods.0.lock().expect("p").calls.clear();
    h.cordon("node-1", false);
    h.converge().await;
    let st = h.status();
    assert_eq!(st.active_pod.as_deref(), Some("im-b"));
    assert_eq!(st.epoch, 2);
    let lt = st.last_transition.clone().expect("transition");
    assert_eq!(
        (
            lt.kind,
            lt.from.as_str(),
            lt.to.as_str(),
            lt.reason.as_str()
        ),
        (CutoverKind::Switchover, "im-a", "im-b", "NodeDrain")
    );
    assert_eq!(lt.outcome.as_deref(), Some("Succeeded"));
    assert_eq!(
        calls(&h),
        ["demote im-a", "promote im-b 2"],
        "a planned switchover: demote first"
    );
    let events = events_with_reason(&h, "NodeDrain");
    assert_eq!(events.len(), 1, "{events:?}");
    let note = events[0]["note"].as_str().unwrap_or_default();
    assert!(
        note.contains("node node-1 of active im-a is cordoned"),
        "{note}"
    );
    assert_eq!(selector_of(&h.get("services", "im").expect("svc")), "im-b");
    budget_names(&h, "im-b");
    // The old active stays, as the standby on the cordoned node; the condition says so.
    assert!(h.get("pods", "im-a").is_some());
    let (status, reason, _) = node_maintenance(&h).expect("condition");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "StandbyNodeCordoned")
    );

    // Never switched back, and nothing else written while it stays so.
    h.take_writes();
    for _ in 0..3 {
        h.reconcile().await;
    }
    assert_eq!(h.take_writes(), Vec::<String>::new());
    assert_eq!(calls(&h).len(), 2, "{:?}", calls(&h));
    assert_eq!(h.status().active_pod.as_deref(), Some("im-b"));
}

#[tokio::test]
async fn a_cordon_of_the_standby_node_does_not_switch_over_and_an_evicted_standby_is_recreated() {
    let h = Harness::new(true);
    h.converge().await;
    h.pods.0.lock().expect("p").calls.clear();
    // The taint alone is a cordon too.
    h.cordon("node-2", true);
    for _ in 0..3 {
        h.reconcile().await;
    }
    assert_eq!(calls(&h), Vec::<String>::new(), "nothing to cut over");
    assert_eq!(h.status().active_pod.as_deref(), Some("im-a"));
    assert_eq!(h.status().phase, Some(Phase::Running));
    assert_eq!(
        node_maintenance(&h).map(|c| c.1).as_deref(),
        Some("StandbyNodeCordoned")
    );
    budget_names(&h, "im-a");
    // The drain evicts the standby (the budget does not cover it): it is recreated.
    let old_uid = h.get("pods", "im-b").expect("pod")["metadata"]["uid"].clone();
    h.store
        .lock()
        .expect("store")
        .objects
        .remove(&("pods".into(), "prod".into(), "im-b".into()));
    h.reconcile().await;
    let new = h.get("pods", "im-b").expect("standby recreated");
    assert_ne!(new["metadata"]["uid"], old_uid);
    assert_eq!(calls(&h), Vec::<String>::new(), "still no cutover");
    assert_eq!(h.status().active_pod.as_deref(), Some("im-a"));
}

#[tokio::test]
async fn both_nodes_cordoned_is_reported_once_and_nothing_switches_until_one_is_uncordoned() {
    let h = Harness::new(true);
    h.converge().await;
    h.pods.0.lock().expect("p").calls.clear();
    h.cordon("node-1", false);
    h.cordon("node-2", false);
    h.reconcile().await;
    let (status, reason, msg) = node_maintenance(&h).expect("condition");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "BothNodesCordoned")
    );
    assert!(msg.contains("kubectl uncordon node-2"), "{msg}");
    assert_eq!(events_with_reason(&h, "BothNodesCordoned").len(), 1);
    // Stable: no switchover, no second Event, no writes at all.
    h.take_writes();
    for _ in 0..5 {
        h.reconcile().await;
    }
    assert_eq!(
        h.take_writes(),
        Vec::<String>::new(),
        "no flapping, no rewrites"
    );
    assert_eq!(calls(&h), Vec::<String>::new());
    assert_eq!(h.status().active_pod.as_deref(), Some("im-a"));
    assert_eq!(events_with_reason(&h, "BothNodesCordoned").len(), 1);
    budget_names(&h, "im-a");
    // What the condition says to do works: uncordon the standby's node and the active moves.
    h.uncordon("node-2");
    h.converge().await;
    let lt = h.status().last_transition.expect("transition");
    assert_eq!((lt.to.as_str(), lt.reason.as_str()), ("im-b", "NodeDrain"));
    assert_eq!(calls(&h), ["demote im-a", "promote im-b 2"]);
}

#[tokio::test]
async fn a_cordon_during_another_cutover_waits_for_it_to_finish() {
    let h = Harness::new(true);
    h.converge().await;
    // A switchover im-a → im-b is under way (persisted at Promoting), and im-b's node, the
    // target's, is cordoned meanwhile.
    edit_cluster(&h, |o| {
        o["status"]["cutover"] = json!({
            "kind": "Switchover", "step": "Promoting", "from": "im-a", "target": "im-b", "epoch": 5,
            "reason": "test", "started": "2026-01-01T00:00:00Z", "stepStarted": "2026-01-01T00:00:00Z"
        });
        o["status"]["epoch"] = json!(5);
    });
    h.pods.0.lock().expect("p").calls.clear();
    let before = h.store.lock().expect("store").statuses.len();
    h.cordon("node-2", false);
    h.converge().await;
    // The running one finished first (its verification told im-a, still believing it is
    // active, that it is fenced), then the drain moved the role off the cordoned node.
    assert_eq!(
        calls(&h),
        [
            "promote im-b 5",
            "demote im-a",
            "demote im-b",
            "promote im-a 6"
        ]
    );
    let st = h.status();
    assert_eq!(st.active_pod.as_deref(), Some("im-a"));
    let lt = st.last_transition.expect("transition");
    assert_eq!(
        (
            lt.from.as_str(),
            lt.to.as_str(),
            lt.reason.as_str(),
            lt.epoch
        ),
        ("im-b", "im-a", "NodeDrain", 6)
    );
    // Every recorded intent: the NodeDrain one only after the first cutover ended.
    let statuses = h.store.lock().expect("store").statuses.clone();
    let reasons: Vec<&str> = statuses[before..]
        .iter()
        .filter_map(|s| s["cutover"]["reason"].as_str())
        .collect();
    let first_drain = reasons
        .iter()
        .position(|r| *r == "NodeDrain")
        .expect("drain");
    assert!(
        first_drain > 0 && reasons[..first_drain].iter().all(|r| *r == "test"),
        "{reasons:?}"
    );
    // ... and the first one had ended, im-b active, before the drain's intent was written.
    let ended = statuses[before..]
        .iter()
        .position(|s| s["cutover"].is_null() && s["activePod"] == "im-b")
        .expect("the first cutover ended");
    let drain_at = statuses[before..]
        .iter()
        .position(|s| s["cutover"]["reason"] == "NodeDrain")
        .expect("drain intent");
    assert!(ended < drain_at, "{statuses:?}");
    assert!(
        reasons[first_drain..].iter().all(|r| *r == "NodeDrain"),
        "{reasons:?}"
    );
}

#[tokio::test]
async fn the_disruption_budget_covers_no_pod_before_a_promotion_then_follows_the_active() {
    let h = Harness::new(true);
    // Provisioning (the first reconcile adds the finalizer only): the budget exists and
    // selects nothing, as no pod has an empty instance label.
    h.reconcile().await;
    h.reconcile().await;
    assert_eq!(h.status().active_pod, None);
    assert!(
        h.get("pods", "im-a").is_some(),
        "pods created, none promoted"
    );
    budget_names(&h, "");
    let b = h.get("poddisruptionbudgets", "im").expect("budget");
    assert_eq!(b["spec"]["minAvailable"], json!(1));
    assert_eq!(
        b["metadata"]["ownerReferences"][0]["kind"],
        "IdentityMeshCluster"
    );
    h.kubelet();
    h.converge().await;
    budget_names(&h, "im-a");

    // A switchover re-points it, in the swing, right after the Service.
    h.take_writes();
    request_switchover(&h);
    h.converge().await;
    assert_eq!(h.status().active_pod.as_deref(), Some("im-b"));
    budget_names(&h, "im-b");
    let writes = h.take_writes();
    let at = |what: &str| {
        writes
            .iter()
            .position(|w| w.starts_with("PATCH") && w.ends_with(what))
            .unwrap_or_else(|| panic!("no write of {what}: {writes:?}"))
    };
    assert!(
        at("/services/im") < at("/poddisruptionbudgets/im"),
        "the Service first: {writes:?}"
    );
    assert_eq!(
        writes
            .iter()
            .filter(|w| w.ends_with("/poddisruptionbudgets/im"))
            .count(),
        1,
        "one write per swing: {writes:?}"
    );

    // An edited budget is put back.
    {
        let mut s = h.store.lock().expect("store");
        let b = s
            .objects
            .get_mut(&("poddisruptionbudgets".into(), "prod".into(), "im".into()))
            .expect("budget");
        b["spec"]["selector"]["matchLabels"]["identitymesh.io/instance"] = json!("im-a");
    }
    h.reconcile().await;
    budget_names(&h, "im-b");
}
