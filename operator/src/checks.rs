//! Pure decisions for the post-cutover checks reported as conditions: `RelaysReconnected` and
//! `AdminUiReady` (asked of the active on every reconcile) and `CanarySync` (run once on the
//! new active after each verified switchover, failover or upgrade). Their names are constants
//! in [`crate::conditions`], with every other condition's.
//!
//! Messages must stay identical while nothing changes: an unchanged condition must not cause a
//! status write, so they carry no times or counters that move on their own. The canary's
//! message names the cutover it covered (kind, pods, epoch, finish time); that is how the
//! controller knows the canary already ran for the last transition.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;

use crate::crd::{CutoverKind, TransitionRecord};
use identitymesh_contract::internal::paths;

use crate::podclient::{CanaryReport, CanaryRun, PodClientError, RelayReport, UiReport};

/// How long the active may take for the canary runs.
pub const CANARY_WAIT: Duration = Duration::from_secs(20);
/// A canary that could not reach the new active is tried again on later reconciles for this
/// long after the cutover finished.
pub const CANARY_RETRY_WINDOW: Duration = Duration::from_secs(120);
/// A cutover that finished longer ago than this (the operator was down, or was upgraded to a
/// version with this check) is not canaried after the fact: a sync run out of the blue is a
/// surprise, not a check.
pub const CANARY_MAX_AGE: Duration = Duration::from_secs(15 * 60);

/// Names listed in a message before "and N more".
const MAX_NAMES: usize = 10;
/// Characters kept of one connector's error.
const MAX_ERROR: usize = 160;
/// Characters kept of the active's error reading the issuer: the discovery URL and the cause
/// below it (a refused connection, a certificate spec.oidc.ca does not vouch for) both fit.
const MAX_ISSUER_ERROR: usize = 400;

/// A condition's status, reason and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CondValue {
    pub status: &'static str,
    pub reason: &'static str,
    pub message: String,
}

impl CondValue {
    fn new(status: &'static str, reason: &'static str, message: String) -> Self {
        Self {
            status,
            reason,
            message,
        }
    }
}

/// "a, b, c" with at most [`MAX_NAMES`] names, then "and N more".
fn list(names: &[String]) -> String {
    let mut s = names
        .iter()
        .take(MAX_NAMES)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > MAX_NAMES {
        s.push_str(&format!(" and {} more", names.len() - MAX_NAMES));
    }
    s
}

fn truncate(s: &str, max: usize) -> String {
    let s = s.trim();
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max).collect();
    out.push('…');
    out
}

/// A short, stable description of a failed call (no response bodies: they may carry ids or
/// times that would change the message on every reconcile).
pub fn error_summary(pod: &str, path: &str, e: &PodClientError) -> String {
    match e {
        PodClientError::Http { status, .. } => format!("{pod} answered HTTP {status} to {path}"),
        PodClientError::Refused { .. } => format!("{pod} refused {path}"),
        PodClientError::Transport { .. } => format!("{pod} did not answer {path}"),
        PodClientError::Setup(_) => format!("no mTLS client for {pod}"),
    }
}

// --------------------------------------------------------------------------------- relays

/// RelaysReconnected from the active's answer to `GET /internal/v1/relays`.
pub fn relays_condition(active: &str, r: Result<&RelayReport, &PodClientError>) -> CondValue {
    let r = match r {
        Ok(r) => r,
        Err(e) => {
            return CondValue::new(
                "Unknown",
                "ActiveUnreachable",
                format!(
                    "relays not checked: {}",
                    error_summary(active, paths::RELAYS, e)
                ),
            )
        }
    };
    if r.expected.is_empty() {
        return CondValue::new(
            "True",
            "NoRelays",
            "no relay was seen in the last 10 minutes: none expected".into(),
        );
    }
    if r.missing.is_empty() {
        let n = r.expected.len();
        let noun = if n == 1 { "relay" } else { "relays" };
        return CondValue::new(
            "True",
            "AllConnected",
            format!("all {n} expected {noun} connected to {active}"),
        );
    }
    let mut missing = r.missing.clone();
    missing.sort();
    CondValue::new(
        "False",
        "RelaysMissing",
        format!(
            "{} of {} expected relays not connected to {active}: {}",
            missing.len(),
            r.expected.len(),
            list(&missing)
        ),
    )
}

/// RelaysReconnected when the active is not asked: None keeps the condition as it is (a
/// cutover is moving the relays; the next steady reconcile reports them).
pub fn relays_not_asked(active: Option<&str>, cutover_running: bool) -> Option<CondValue> {
    not_asked("relays", active, cutover_running)
}

/// A per-reconcile check of the active that was not made: kept while a cutover runs, else
/// Unknown saying whether there is no active or it does not answer.
fn not_asked(what: &str, active: Option<&str>, cutover_running: bool) -> Option<CondValue> {
    if cutover_running {
        return None;
    }
    Some(match active {
        None => CondValue::new("Unknown", "NotChecked", "no active instance yet".into()),
        Some(a) => CondValue::new(
            "Unknown",
            "ActiveUnreachable",
            format!("{what} not checked: the internal API of active {a} does not answer"),
        ),
    })
}

// --------------------------------------------------------------------------------- admin UI

/// AdminUiReady from the active's answer to `GET /internal/v1/ui`: it serves the sign-in page
/// and, with OIDC sign-in, read the issuer's discovery document just now.
pub fn admin_ui_condition(active: &str, r: Result<&UiReport, &PodClientError>) -> CondValue {
    let r = match r {
        Ok(r) => r,
        Err(e) => {
            return CondValue::new(
                "Unknown",
                "ActiveUnreachable",
                format!(
                    "Admin UI not checked: {}",
                    error_summary(active, paths::UI, e)
                ),
            )
        }
    };
    if r.page_status != 200 {
        return CondValue::new(
            "False",
            "UiNotServed",
            format!(
                "{active} answered HTTP {} for the Admin UI's sign-in page",
                r.page_status
            ),
        );
    }
    match (r.sign_in.as_str(), &r.discovery_error) {
        ("oidc", None) => CondValue::new(
            "True",
            "UiServed",
            format!("{active} serves the Admin UI and reads the issuer's discovery document"),
        ),
        ("oidc", Some(e)) => CondValue::new(
            "False",
            "IssuerUnreachable",
            format!(
                "{active} serves the Admin UI but cannot read the issuer's discovery document, so no one can sign in: {}",
                truncate(e, MAX_ISSUER_ERROR)
            ),
        ),
        ("bootstrap", _) => CondValue::new(
            "True",
            "UiServed",
            format!("{active} serves the Admin UI (sign-in with the bootstrap token)"),
        ),
        _ => CondValue::new(
            "False",
            "NoSignIn",
            format!(
                "{active} serves the Admin UI but no one can sign in: set spec.oidc.ui (the UI's client at the identity provider)"
            ),
        ),
    }
}

/// AdminUiReady when the active is not asked (None: keep it while a cutover runs).
pub fn admin_ui_not_asked(active: Option<&str>, cutover_running: bool) -> Option<CondValue> {
    not_asked("Admin UI", active, cutover_running)
}

// --------------------------------------------------------------------------------- canary

/// Names one finished cutover; the CanarySync message starts with `after <key>:`.
pub fn transition_key(t: &TransitionRecord) -> String {
    let finished = t
        .finished
        .as_ref()
        // Whole seconds, as metav1.Time is stored: the key must survive the status round trip.
        .map(|f| f.0.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|| "-".into());
    format!(
        "{} {} → {} (epoch {}, finished {finished})",
        t.kind.as_str(),
        if t.from.is_empty() { "(none)" } else { &t.from },
        t.to,
        t.epoch
    )
}

fn prefix(key: &str) -> String {
    format!("after {key}: ")
}

/// What to do about CanarySync this reconcile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CanaryPlan {
    /// Leave the condition as it is.
    Keep,
    /// Set it without calling anything.
    Set(CondValue),
    /// Run the canary on `pod` for the transition named `key`.
    Run { pod: String, key: String },
}

/// Whether the canary is due: once per verified switchover, failover or upgrade, on its new
/// active, after the cutover is recorded. `current` is the CanarySync condition in status.
pub fn canary_plan(
    last: Option<&TransitionRecord>,
    active: Option<&str>,
    cutover_running: bool,
    current: Option<&Condition>,
    now: Timestamp,
) -> CanaryPlan {
    if cutover_running {
        return CanaryPlan::Keep;
    }
    let Some(t) = last.filter(|t| t.kind != CutoverKind::Initial) else {
        return CanaryPlan::Set(CondValue::new(
            "Unknown",
            "CanaryPending",
            "no switchover or failover yet: the canary runs on the new active after the next one"
                .into(),
        ));
    };
    let key = transition_key(t);
    let covered = current.filter(|c| c.message.starts_with(&prefix(&key)));
    if t.outcome.as_deref() != Some("Succeeded") {
        return CanaryPlan::Set(CondValue::new(
            "Unknown",
            "CutoverNotVerified",
            format!(
                "{}not run: the cutover ended {} and the canary runs only after a verified one",
                prefix(&key),
                t.outcome.as_deref().unwrap_or("without an outcome")
            ),
        ));
    }
    if active != Some(t.to.as_str()) {
        // Status not settled on the new active (should not happen outside a cutover).
        return CanaryPlan::Keep;
    }
    let age = t
        .finished
        .as_ref()
        .map(|f| Duration::try_from(now.duration_since(f.0)).unwrap_or(Duration::ZERO));
    match covered {
        Some(c) => {
            let retry = c.reason == "ActiveUnreachable"
                && age.is_some_and(|a| a <= CANARY_RETRY_WINDOW);
            if retry {
                CanaryPlan::Run { pod: t.to.clone(), key }
            } else {
                CanaryPlan::Keep
            }
        }
        None if age.is_none_or(|a| a > CANARY_MAX_AGE) => CanaryPlan::Set(CondValue::new(
            "Unknown",
            "CanaryPending",
            format!(
                "{}not run: the cutover finished before this check could run; the canary runs after the next one",
                prefix(&key)
            ),
        )),
        None => CanaryPlan::Run { pod: t.to.clone(), key },
    }
}

fn run_name(r: &CanaryRun) -> &str {
    if r.connector.is_empty() {
        &r.connector_id
    } else {
        &r.connector
    }
}

/// CanarySync from the new active's answer to `POST /internal/v1/canary`.
pub fn canary_condition(
    key: &str,
    pod: &str,
    wait: Duration,
    r: Result<&CanaryReport, &PodClientError>,
) -> CondValue {
    let p = prefix(key);
    let r = match r {
        Ok(r) => r,
        Err(e) => {
            return CondValue::new(
                "Unknown",
                "ActiveUnreachable",
                format!(
                    "{p}canary not run: {}",
                    error_summary(pod, paths::CANARY, e)
                ),
            )
        }
    };
    if r.runs.is_empty() && r.ok != Some(false) {
        return match r.ok {
            None => CondValue::new(
                "True",
                "NoCanaryConnector",
                format!("{p}no connector is flagged canary on {pod}: nothing to check (flag one to have cutovers prove a sync)"),
            ),
            _ => CondValue::new("True", "CanarySucceeded", format!("{p}canary ok on {pod}")),
        };
    }
    let failed: Vec<String> = r
        .runs
        .iter()
        .filter(|x| !x.synced() && x.status != "running")
        .map(|x| {
            let what = match x.status.as_str() {
                "busy" => "busy (a run was already in progress)".to_string(),
                "" => "no status".to_string(),
                s => s.to_string(),
            };
            match x.error.as_deref().filter(|e| !e.trim().is_empty()) {
                Some(e) => format!("{}: {what}: {}", run_name(x), truncate(e, MAX_ERROR)),
                None => format!("{}: {what}", run_name(x)),
            }
        })
        .collect();
    let running: Vec<String> = r
        .runs
        .iter()
        .filter(|x| x.status == "running")
        .map(|x| run_name(x).to_string())
        .collect();
    if !failed.is_empty() {
        let mut msg = format!(
            "{p}canary failed on {pod}: {}",
            failed
                .iter()
                .take(MAX_NAMES)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        );
        if failed.len() > MAX_NAMES {
            msg.push_str(&format!("; and {} more", failed.len() - MAX_NAMES));
        }
        if !running.is_empty() {
            msg.push_str(&format!("; still running: {}", list(&running)));
        }
        return CondValue::new("False", "CanaryFailed", msg);
    }
    if !running.is_empty() {
        return CondValue::new(
            "False",
            "CanaryTimedOut",
            format!(
                "{p}canary still running on {pod} after {}s: {}",
                wait.as_secs(),
                list(&running)
            ),
        );
    }
    let runs: Vec<String> = r
        .runs
        .iter()
        .map(|x| format!("{}: {}", run_name(x), x.status))
        .collect();
    if r.ok == Some(false) {
        return CondValue::new(
            "False",
            "CanaryFailed",
            format!("{p}{pod} reported the canary not ok ({})", list(&runs)),
        );
    }
    CondValue::new(
        "True",
        "CanarySucceeded",
        format!("{p}canary runs ok on {pod} ({})", list(&runs)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conditions::CANARY_CONDITION;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).expect("ts")
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn report(expected: &[&str], here: &[&str], missing: &[&str]) -> RelayReport {
        RelayReport {
            expected: names(expected),
            connected_here: names(here),
            missing: names(missing),
        }
    }

    fn transport() -> PodClientError {
        PodClientError::Transport {
            pod: "im-b".into(),
            detail: "connection refused (os error 111) at 02:01:03.123".into(),
        }
    }

    #[test]
    fn admin_ui_condition_names_what_is_missing() {
        let ui = |status: u16, sign_in: &str, err: Option<&str>| UiReport {
            page_status: status,
            sign_in: sign_in.into(),
            discovery_error: err.map(str::to_string),
        };
        let reason = |r: &UiReport| admin_ui_condition("im-a", Ok(r)).reason;
        assert_eq!(reason(&ui(200, "oidc", None)), "UiServed");
        assert_eq!(reason(&ui(200, "bootstrap", None)), "UiServed");
        assert_eq!(reason(&ui(503, "oidc", None)), "UiNotServed");
        assert_eq!(reason(&ui(200, "none", None)), "NoSignIn");
        let c = admin_ui_condition("im-a", Ok(&ui(200, "oidc", Some(&"x".repeat(5000)))));
        assert_eq!((c.status, c.reason), ("False", "IssuerUnreachable"));
        assert!(c.message.chars().count() < 600, "{}", c.message);
        // A real one keeps its cause, after the URL.
        let e = "OIDC discovery document https://login.contoso.local/realms/identitymesh/.well-known/openid-configuration: error sending request: client error (Connect): invalid peer certificate: UnknownIssuer";
        let c = admin_ui_condition("im-a", Ok(&ui(200, "oidc", Some(e))));
        assert!(
            c.message
                .ends_with("invalid peer certificate: UnknownIssuer"),
            "{}",
            c.message
        );
        assert!(admin_ui_condition("im-a", Ok(&ui(200, "none", None)))
            .message
            .contains("spec.oidc.ui"));
        let c = admin_ui_condition("im-a", Err(&transport()));
        assert_eq!((c.status, c.reason), ("Unknown", "ActiveUnreachable"));
        assert_eq!(admin_ui_not_asked(Some("im-a"), true), None);
        assert_eq!(
            admin_ui_not_asked(Some("im-a"), false).map(|c| c.message),
            Some("Admin UI not checked: the internal API of active im-a does not answer".into())
        );
    }

    #[test]
    fn relays_none_expected() {
        let c = relays_condition("im-a", Ok(&report(&[], &[], &[])));
        assert_eq!((c.status, c.reason), ("True", "NoRelays"));
    }

    #[test]
    fn relays_all_connected_counts_them() {
        let c = relays_condition("im-a", Ok(&report(&["dc1", "dc2"], &["dc1", "dc2"], &[])));
        assert_eq!((c.status, c.reason), ("True", "AllConnected"));
        assert_eq!(c.message, "all 2 expected relays connected to im-a");
        let one = relays_condition("im-a", Ok(&report(&["dc1"], &["dc1"], &[])));
        assert_eq!(one.message, "all 1 expected relay connected to im-a");
    }

    #[test]
    fn relays_missing_are_named_sorted_and_capped() {
        let c = relays_condition("im-b", Ok(&report(&["a", "b", "c"], &["a"], &["c", "b"])));
        assert_eq!((c.status, c.reason), ("False", "RelaysMissing"));
        assert_eq!(
            c.message,
            "2 of 3 expected relays not connected to im-b: b, c"
        );

        let many: Vec<String> = (0..14).map(|i| format!("r{i:02}")).collect();
        let r = RelayReport {
            expected: many.clone(),
            connected_here: vec![],
            missing: many,
        };
        let c = relays_condition("im-b", Ok(&r));
        assert!(c.message.ends_with("r09 and 4 more"), "{}", c.message);
        assert!(!c.message.contains("r10"), "{}", c.message);
    }

    #[test]
    fn relays_error_is_unknown_and_stable() {
        let c = relays_condition("im-b", Err(&transport()));
        assert_eq!((c.status, c.reason), ("Unknown", "ActiveUnreachable"));
        // The transport detail (with its changing text) stays out of the message.
        assert_eq!(
            c.message,
            "relays not checked: im-b did not answer /internal/v1/relays"
        );
        let http = PodClientError::Http {
            pod: "im-b".into(),
            status: 404,
            detail: r#"{"traceId":"abc"}"#.into(),
        };
        let c = relays_condition("im-b", Err(&http));
        assert!(c.message.contains("HTTP 404") && !c.message.contains("traceId"));
    }

    #[test]
    fn relays_not_asked_keeps_during_a_cutover() {
        assert_eq!(relays_not_asked(Some("im-a"), true), None);
        assert_eq!(
            relays_not_asked(None, false).map(|c| c.reason),
            Some("NotChecked")
        );
        assert_eq!(
            relays_not_asked(Some("im-a"), false).map(|c| (c.status, c.reason)),
            Some(("Unknown", "ActiveUnreachable"))
        );
    }

    fn transition(kind: CutoverKind, outcome: &str, finished: i64) -> TransitionRecord {
        TransitionRecord {
            kind,
            from: "im-a".into(),
            to: "im-b".into(),
            reason: "test".into(),
            started: Time(ts(finished - 3)),
            finished: Some(Time(ts(finished))),
            duration_seconds: Some(3.0),
            outcome: Some(outcome.into()),
            epoch: 2,
        }
    }

    fn cond(reason: &str, message: &str) -> Condition {
        Condition {
            type_: CANARY_CONDITION.into(),
            status: "True".into(),
            reason: reason.into(),
            message: message.into(),
            observed_generation: None,
            last_transition_time: Time(ts(0)),
        }
    }

    #[test]
    fn transition_key_names_kind_pods_epoch_and_finish() {
        let k = transition_key(&transition(CutoverKind::Switchover, "Succeeded", 10));
        assert_eq!(
            k,
            format!("Switchover im-a → im-b (epoch 2, finished {})", ts(10))
        );
        // Sub-second precision is lost when status is stored; the key must not change.
        let mut t = transition(CutoverKind::Switchover, "Succeeded", 10);
        let precise = ts(10)
            .checked_add(k8s_openapi::jiff::SignedDuration::from_millis(345))
            .expect("ts");
        t.finished = Some(Time(precise));
        let stored: TransitionRecord =
            serde_json::from_value(serde_json::to_value(&t).expect("json")).expect("back");
        assert_eq!(transition_key(&t), transition_key(&stored));
        assert_eq!(transition_key(&t), k);
    }

    #[test]
    fn canary_runs_once_after_a_verified_switchover_or_failover() {
        for kind in [
            CutoverKind::Switchover,
            CutoverKind::Failover,
            CutoverKind::Upgrade,
        ] {
            let t = transition(kind, "Succeeded", 10);
            let key = transition_key(&t);
            let plan = canary_plan(Some(&t), Some("im-b"), false, None, ts(12));
            assert_eq!(
                plan,
                CanaryPlan::Run {
                    pod: "im-b".into(),
                    key: key.clone()
                }
            );
            // An older transition's result does not cover this one.
            let older = cond(
                "CanarySucceeded",
                "after Switchover im-b → im-a (epoch 1, finished x): ok",
            );
            assert!(matches!(
                canary_plan(Some(&t), Some("im-b"), false, Some(&older), ts(12)),
                CanaryPlan::Run { .. }
            ));
            // Once its result is recorded: never again.
            let done = canary_condition(
                &key,
                "im-b",
                CANARY_WAIT,
                Ok(&CanaryReport {
                    ok: None,
                    runs: vec![],
                }),
            );
            let c = cond(done.reason, &done.message);
            assert_eq!(
                canary_plan(Some(&t), Some("im-b"), false, Some(&c), ts(13)),
                CanaryPlan::Keep
            );
            assert_eq!(
                canary_plan(Some(&t), Some("im-b"), false, Some(&c), ts(10_000)),
                CanaryPlan::Keep
            );
        }
    }

    #[test]
    fn canary_not_run_during_a_cutover_or_off_the_new_active() {
        let t = transition(CutoverKind::Switchover, "Succeeded", 10);
        assert_eq!(
            canary_plan(Some(&t), Some("im-b"), true, None, ts(12)),
            CanaryPlan::Keep
        );
        assert_eq!(
            canary_plan(Some(&t), Some("im-a"), false, None, ts(12)),
            CanaryPlan::Keep
        );
    }

    #[test]
    fn canary_pending_before_any_switchover() {
        for last in [
            None,
            Some(transition(CutoverKind::Initial, "Succeeded", 10)),
        ] {
            match canary_plan(last.as_ref(), Some("im-b"), false, None, ts(12)) {
                CanaryPlan::Set(c) => {
                    assert_eq!((c.status, c.reason), ("Unknown", "CanaryPending"))
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn canary_skipped_after_an_unverified_or_old_cutover() {
        let t = transition(CutoverKind::Failover, "VerificationFailed", 10);
        match canary_plan(Some(&t), Some("im-b"), false, None, ts(12)) {
            CanaryPlan::Set(c) => {
                assert_eq!(c.reason, "CutoverNotVerified");
                assert!(c.message.contains("VerificationFailed"), "{}", c.message);
            }
            other => panic!("{other:?}"),
        }
        let old = transition(CutoverKind::Failover, "Succeeded", 10);
        let late = ts(10 + CANARY_MAX_AGE.as_secs() as i64 + 1);
        match canary_plan(Some(&old), Some("im-b"), false, None, late) {
            CanaryPlan::Set(c) => {
                assert_eq!((c.status, c.reason), ("Unknown", "CanaryPending"));
                // Stable, and recorded against this transition: not re-evaluated into a run.
                let recorded = cond(c.reason, &c.message);
                assert_eq!(
                    canary_plan(Some(&old), Some("im-b"), false, Some(&recorded), late),
                    CanaryPlan::Keep
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unreachable_canary_is_retried_within_the_window_only() {
        let t = transition(CutoverKind::Switchover, "Succeeded", 10);
        let key = transition_key(&t);
        let v = canary_condition(&key, "im-b", CANARY_WAIT, Err(&transport()));
        assert_eq!((v.status, v.reason), ("Unknown", "ActiveUnreachable"));
        assert!(!v.message.contains("os error"), "{}", v.message);
        let c = cond(v.reason, &v.message);
        assert!(matches!(
            canary_plan(Some(&t), Some("im-b"), false, Some(&c), ts(30)),
            CanaryPlan::Run { .. }
        ));
        let after = ts(10 + CANARY_RETRY_WINDOW.as_secs() as i64 + 1);
        assert_eq!(
            canary_plan(Some(&t), Some("im-b"), false, Some(&c), after),
            CanaryPlan::Keep
        );
    }

    fn run(name: &str, status: &str, error: Option<&str>) -> CanaryRun {
        CanaryRun {
            connector_id: format!("id-{name}"),
            connector: name.into(),
            run_id: Some("r1".into()),
            status: status.into(),
            error: error.map(str::to_string),
        }
    }

    #[test]
    fn canary_results_map_to_reasons() {
        let k = "Switchover im-a → im-b (epoch 2, finished t)";
        let ok = canary_condition(
            k,
            "im-b",
            CANARY_WAIT,
            Ok(&CanaryReport {
                ok: Some(true),
                runs: vec![run("hr-canary", "succeeded", None)],
            }),
        );
        assert_eq!((ok.status, ok.reason), ("True", "CanarySucceeded"));
        assert_eq!(
            ok.message,
            format!("after {k}: canary runs ok on im-b (hr-canary: succeeded)")
        );

        let none = canary_condition(
            k,
            "im-b",
            CANARY_WAIT,
            Ok(&CanaryReport {
                ok: None,
                runs: vec![],
            }),
        );
        assert_eq!((none.status, none.reason), ("True", "NoCanaryConnector"));
        assert!(none.message.contains("nothing to check"));

        let long = "x".repeat(1000);
        let failed = canary_condition(
            k,
            "im-b",
            CANARY_WAIT,
            Ok(&CanaryReport {
                ok: Some(false),
                runs: vec![
                    run("hr-canary", "succeeded", None),
                    run("ad", "failed", Some(&long)),
                    run("ldap", "running", None),
                ],
            }),
        );
        assert_eq!((failed.status, failed.reason), ("False", "CanaryFailed"));
        assert!(
            failed.message.contains("ad: failed: xxx"),
            "{}",
            failed.message
        );
        assert!(
            failed.message.contains("still running: ldap"),
            "{}",
            failed.message
        );
        assert!(!failed.message.contains("hr-canary"), "{}", failed.message);
        assert!(failed.message.len() < 400, "error truncated");

        let busy = canary_condition(
            k,
            "im-b",
            CANARY_WAIT,
            Ok(&CanaryReport {
                ok: Some(false),
                runs: vec![run("hr", "busy", Some("already running"))],
            }),
        );
        assert_eq!(busy.reason, "CanaryFailed");
        assert!(busy.message.contains("hr: busy"), "{}", busy.message);

        let slow = canary_condition(
            k,
            "im-b",
            CANARY_WAIT,
            Ok(&CanaryReport {
                ok: Some(false),
                runs: vec![run("hr", "succeeded", None), run("ad", "running", None)],
            }),
        );
        assert_eq!((slow.status, slow.reason), ("False", "CanaryTimedOut"));
        assert_eq!(
            slow.message,
            format!("after {k}: canary still running on im-b after 20s: ad")
        );

        // The server's verdict wins over runs that look fine.
        let odd = canary_condition(
            k,
            "im-b",
            CANARY_WAIT,
            Ok(&CanaryReport {
                ok: Some(false),
                runs: vec![run("hr", "succeeded", None)],
            }),
        );
        assert_eq!(odd.reason, "CanaryFailed");

        let refused = canary_condition(
            k,
            "im-b",
            CANARY_WAIT,
            Err(&PodClientError::Http {
                pod: "im-b".into(),
                status: 409,
                detail: "not active".into(),
            }),
        );
        assert_eq!(
            (refused.status, refused.reason),
            ("Unknown", "ActiveUnreachable")
        );
        assert!(refused.message.contains("HTTP 409"), "{}", refused.message);
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        let s = "é".repeat(300);
        let t = truncate(&s, MAX_ERROR);
        assert_eq!(t.chars().count(), MAX_ERROR + 1);
    }
}
