//! A spec that passed admission but cannot work: writes the apiserver refuses (400/422) and
//! server pods the node cannot start (image pulls, container config). Pure functions that turn
//! the apiserver's Status and the kubelet's waiting state into messages that quote them and name
//! the IdentityMeshCluster field to change, and the backoff refused writes are retried with.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::core::Status;

/// A refused write is retried after 5 s, then twice as long each time, at most 5 min (at once
/// when the object we would write changes, e.g. after a spec edit).
pub const BACKOFF_BASE: Duration = Duration::from_secs(5);
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// Delay before retry number `attempts` (1 = after the first failure).
pub fn backoff(attempts: u32) -> Duration {
    let exp = attempts.saturating_sub(1).min(16);
    BACKOFF_BASE.saturating_mul(1 << exp).min(BACKOFF_MAX)
}

/// The apiserver's Status when it refused a write as invalid (400 Bad Request, 422 Invalid):
/// the request itself is wrong and repeating it cannot help. None for anything else.
pub fn refused_status(e: &kube::Error) -> Option<&Status> {
    match e {
        kube::Error::Api(s) if s.code == 400 || s.code == 422 => Some(s),
        _ => None,
    }
}

/// A kube error in words: the apiserver's own message for an API error (never the debug dump
/// of the Status), the client's Display otherwise.
pub fn api_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => status_message(s),
        e => e.to_string(),
    }
}

fn status_message(s: &Status) -> String {
    let msg = if s.message.is_empty() {
        "(no message)"
    } else {
        s.message.as_str()
    };
    match (s.code, s.reason.as_str()) {
        (0, "") => msg.to_string(),
        (c, "") => format!("{c}: {msg}"),
        (c, r) => format!("{c} {r}: {msg}"),
    }
}

/// The fields of the written object the apiserver names: the Status causes, else the
/// `... is invalid: <field>: ...` part of its message.
pub fn refused_fields(s: &Status) -> Vec<String> {
    let mut out: Vec<String> = s
        .details
        .iter()
        .flat_map(|d| d.causes.iter())
        .map(|c| c.field.clone())
        .filter(|f| !f.is_empty())
        .collect();
    if out.is_empty() {
        if let Some((_, rest)) = s.message.split_once(" is invalid: ") {
            for part in rest.trim_start_matches('[').split(", ") {
                if let Some((field, _)) = part.split_once(": ") {
                    if !field.contains(' ') {
                        out.push(field.to_string());
                    }
                }
            }
        }
    }
    out
}

/// The IdentityMeshCluster field an object field the operator writes comes from.
pub fn spec_field(kind: &str, object_field: &str) -> Option<&'static str> {
    // spec.containers[0].image -> spec.containers.image
    let mut f = String::with_capacity(object_field.len());
    let mut depth = 0;
    for ch in object_field.chars() {
        match ch {
            '[' => depth += 1,
            ']' => depth -= 1,
            c if depth == 0 => f.push(c),
            _ => {}
        }
    }
    let under = |p: &str| f == p || f.starts_with(&format!("{p}."));
    if under("metadata.name") {
        return Some("metadata.name");
    }
    match kind {
        "Pod" => {
            if under("spec.containers.image") {
                Some("spec.image.repository and spec.version")
            } else if under("spec.containers.imagePullPolicy") {
                Some("spec.image.pullPolicy")
            } else if under("spec.containers.resources") {
                Some("spec.resources")
            } else if under("spec.containers.env.valueFrom.secretKeyRef") {
                Some("spec.database")
            } else if under("spec.volumes.secret") {
                Some("spec.licence and spec.tls.secretName")
            } else if under("spec.imagePullSecrets") {
                Some("spec.image.pullSecrets")
            } else if under("spec.nodeSelector") {
                Some("spec.nodeSelector")
            } else if under("spec.tolerations") {
                Some("spec.tolerations")
            } else if under("spec.volumes.persistentVolumeClaim") {
                Some("spec.csvDropFolders")
            } else {
                None
            }
        }
        "Service" => {
            if under("metadata.annotations") {
                Some("spec.service.annotations")
            } else if under("spec.type") {
                Some("spec.service.type")
            } else if under("spec.ports") {
                Some("spec.service.port")
            } else {
                None
            }
        }
        _ => None,
    }
}

/// A request body the apiserver could not even decode names no field; the one such error a spec
/// can cause is a quantity that does not parse (stored before the CRD checked quantities).
fn undecodable_field(kind: &str, s: &Status) -> Option<&'static str> {
    (kind == "Pod"
        && s.message
            .contains("quantities must match the regular expression"))
    .then_some("spec.resources")
}

/// Condition and Event text for a refused write of `kind` `name`: the spec fields to change
/// (when they can be told) and the apiserver's message, quoted.
pub fn refused_message(kind: &str, name: &str, s: &Status) -> String {
    let mut fields: Vec<&str> = refused_fields(s)
        .iter()
        .filter_map(|f| spec_field(kind, f))
        .chain(undecodable_field(kind, s))
        .collect();
    fields.sort_unstable();
    fields.dedup();
    let check = if fields.is_empty() {
        String::new()
    } else {
        format!(" (check {})", fields.join(", "))
    };
    format!(
        "the apiserver refused {kind} {name}{check}: {}",
        status_message(s)
    )
}

/// Waiting reasons of a container that will not start until the spec, an image or a Secret is
/// fixed (the kubelet retries by itself; the operator reports). A crash loop is one too: the
/// server exits at start when it refuses its configuration, and says why in its log.
const STUCK_REASONS: [&str; 7] = [
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
    "CreateContainerError",
    CRASH_LOOP,
];

/// The kubelet's waiting reason for a container it restarts after repeated exits.
const CRASH_LOOP: &str = "CrashLoopBackOff";

/// Most of a termination message quoted in a condition; the log holds the rest.
const TERMINATION_MESSAGE_MAX: usize = 300;

/// A crash loop is reported once the container has been restarted this often, each last run
/// shorter than [`SHORT_RUN_SECONDS`]: a server killed once (a node fault, `kill -9`) is
/// restarted in back-off too, and that is a failover, not a spec to fix.
const CRASH_LOOP_RESTARTS: i32 = 3;
const SHORT_RUN_SECONDS: i64 = 30;

/// A server pod the node cannot start: the kubelet's waiting reason and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stuck {
    pub reason: String,
    pub message: String,
    pub image: Option<String>,
}

impl Stuck {
    /// The pull failures alternate ErrImagePull (with the registry's error) and
    /// ImagePullBackOff ("Back-off pulling image"): one condition reason for both.
    pub fn condition_reason(&self) -> &'static str {
        match self.reason.as_str() {
            "ErrImagePull" | "ImagePullBackOff" | "ErrImageNeverPull" => "ImagePullFailed",
            "InvalidImageName" => "InvalidImageName",
            UNSCHEDULABLE => UNSCHEDULABLE,
            CRASH_LOOP => "ContainerCrashLooping",
            _ => "ContainerConfigError",
        }
    }

    pub fn is_pull_failure(&self) -> bool {
        self.condition_reason() == "ImagePullFailed"
    }
}

/// The scheduler's reason for a pod no node can take.
const UNSCHEDULABLE: &str = "Unschedulable";

/// The first container of `pod` waiting for one of the reasons above, or the scheduler's
/// refusal when no node can take the pod.
pub fn stuck_container(pod: &Pod) -> Option<Stuck> {
    let status = pod.status.as_ref()?;
    let unscheduled = status.conditions.iter().flatten().find(|c| {
        c.type_ == "PodScheduled"
            && c.status == "False"
            && c.reason.as_deref() == Some(UNSCHEDULABLE)
    });
    if let Some(c) = unscheduled {
        return Some(Stuck {
            reason: UNSCHEDULABLE.into(),
            message: c.message.clone().unwrap_or_default(),
            image: None,
        });
    }
    status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten())
        .find_map(|c| {
            let w = c.state.as_ref()?.waiting.as_ref()?;
            let reason = w.reason.as_deref()?;
            // A crash loop's waiting message is only the back-off ("back-off 40s restarting
            // failed container…", new on every restart); the last exit says what happened.
            let message = if reason == CRASH_LOOP {
                if !exits_at_start(c) {
                    return None;
                }
                last_exit(c)
            } else {
                w.message.clone().unwrap_or_default()
            };
            STUCK_REASONS.contains(&reason).then(|| Stuck {
                reason: reason.to_string(),
                message,
                image: Some(c.image.clone()).filter(|i| !i.is_empty()),
            })
        })
}

/// Whether the container keeps exiting soon after it starts (see [`CRASH_LOOP_RESTARTS`]).
fn exits_at_start(c: &k8s_openapi::api::core::v1::ContainerStatus) -> bool {
    let Some(t) = c.last_state.as_ref().and_then(|s| s.terminated.as_ref()) else {
        return false;
    };
    let ran = match (&t.started_at, &t.finished_at) {
        (Some(s), Some(f)) => f.0.as_second() - s.0.as_second(),
        _ => 0,
    };
    c.restart_count >= CRASH_LOOP_RESTARTS && ran < SHORT_RUN_SECONDS
}

/// A container's last exit: its code, the runtime's reason and the termination message,
/// shortened; the same for every exit of the same kind, so an Event is not sent per restart.
fn last_exit(c: &k8s_openapi::api::core::v1::ContainerStatus) -> String {
    let Some(t) = c.last_state.as_ref().and_then(|s| s.terminated.as_ref()) else {
        return String::new();
    };
    let mut m = format!("exited with code {}", t.exit_code);
    if let Some(r) = t.reason.as_deref().filter(|r| !r.is_empty()) {
        m.push_str(&format!(" ({r})"));
    }
    if let Some(text) = t
        .message
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        let short: String = text.chars().take(TERMINATION_MESSAGE_MAX).collect();
        let more = if short.len() < text.len() { "…" } else { "" };
        m.push_str(&format!(": {short}{more}"));
    }
    m
}

/// Condition and Event text for a stuck pod: the kubelet's reason and message, quoted, and the
/// spec field to change. `secrets` are (spec field, Secret name) the pods reference; a config
/// error that names one of them names its field.
pub fn stuck_message(pod: &str, s: &Stuck, secrets: &[(&str, &str)]) -> String {
    let image = s
        .image
        .as_deref()
        .map(|i| format!(" image {i:?}"))
        .unwrap_or_default();
    let check = match s.condition_reason() {
        "ImagePullFailed" => format!(
            "cannot pull{image} (check spec.image.repository, spec.version and spec.image.pullSecrets)"
        ),
        "InvalidImageName" => {
            format!("has an invalid{image} (check spec.image.repository and spec.version)")
        }
        UNSCHEDULABLE => "cannot be scheduled (check spec.nodeOS, spec.nodeSelector and \
             spec.tolerations; the two server pods need two such nodes)"
            .to_string(),
        "ContainerCrashLooping" => format!(
            "keeps exiting at start (the server's reason is in `kubectl logs {pod} --previous`; \
             a setting it refuses names its spec field there)"
        ),
        _ => {
            let named: Vec<String> = secrets
                .iter()
                .filter(|(_, name)| {
                    s.message.contains(&format!("\"{name}\""))
                        || s.message.contains(&format!("/{name}"))
                        || s.message.contains(&format!(" {name} "))
                })
                .map(|(field, name)| format!("{field} (Secret {name})"))
                .collect();
            if named.is_empty() {
                "cannot create its container".to_string()
            } else {
                format!("cannot create its container (check {})", named.join(", "))
            }
        }
    };
    let msg = if s.message.is_empty() {
        "(no message)"
    } else {
        s.message.as_str()
    };
    format!("pod {pod} {check}: {}: {msg}", s.reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn invalid(message: &str, fields: &[&str]) -> Status {
        let causes: Vec<_> = fields
            .iter()
            .map(|f| json!({"reason": "FieldValueInvalid", "message": "Invalid value", "field": f}))
            .collect();
        serde_json::from_value(json!({
            "status": "Failure", "code": 422, "reason": "Invalid", "message": message,
            "details": {"name": "im-a", "kind": "pods", "causes": causes}
        }))
        .expect("status")
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let d: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(d, vec![5, 10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }

    #[test]
    fn only_bad_requests_and_invalid_are_refusals() {
        for (code, refused) in [
            (400, true),
            (422, true),
            (409, false),
            (403, false),
            (500, false),
        ] {
            let e = kube::Error::Api(Box::new(Status {
                code,
                ..Default::default()
            }));
            assert_eq!(refused_status(&e).is_some(), refused, "{code}");
        }
    }

    #[test]
    fn api_errors_are_quoted_not_dumped() {
        let s = invalid("Pod \"im-a\" is invalid: spec.tolerations[0].operator: Invalid value: \"Exists\": value must be empty when `operator` is 'Exists'", &[]);
        let e = kube::Error::Api(Box::new(s));
        let m = api_message(&e);
        assert_eq!(m, "422 Invalid: Pod \"im-a\" is invalid: spec.tolerations[0].operator: Invalid value: \"Exists\": value must be empty when `operator` is 'Exists'");
        assert!(!m.contains("Status {"), "{m}");
        // The controller's error Display goes through it too.
        let err = crate::controller::Error::ApplyObject(e);
        assert!(!err.to_string().contains("Status {"), "{err}");
        assert!(err.to_string().contains("value must be empty"), "{err}");
    }

    #[test]
    fn fields_from_causes_or_message() {
        let s = invalid(
            "whatever",
            &["spec.nodeSelector", "spec.containers[0].resources.requests"],
        );
        assert_eq!(
            refused_fields(&s),
            vec!["spec.nodeSelector", "spec.containers[0].resources.requests"]
        );
        let s = invalid("Pod \"im-b\" is invalid: [spec.tolerations[0].effect: Unsupported value: \"Never\", spec.imagePullSecrets[0].name: Required value]", &[]);
        assert_eq!(
            refused_fields(&s),
            vec![
                "spec.tolerations[0].effect",
                "spec.imagePullSecrets[0].name"
            ]
        );
    }

    #[test]
    fn object_fields_map_to_spec_fields() {
        for (kind, field, want) in [
            (
                "Pod",
                "spec.containers[0].image",
                Some("spec.image.repository and spec.version"),
            ),
            (
                "Pod",
                "spec.containers[0].resources.requests",
                Some("spec.resources"),
            ),
            (
                "Pod",
                "spec.nodeSelector[kubernetes.io/os]",
                Some("spec.nodeSelector"),
            ),
            ("Pod", "spec.nodeSelector", Some("spec.nodeSelector")),
            (
                "Pod",
                "spec.tolerations[1].operator",
                Some("spec.tolerations"),
            ),
            (
                "Pod",
                "spec.imagePullSecrets[0].name",
                Some("spec.image.pullSecrets"),
            ),
            (
                "Pod",
                "spec.volumes[4].persistentVolumeClaim.claimName",
                Some("spec.csvDropFolders"),
            ),
            ("Pod", "metadata.name", Some("metadata.name")),
            (
                "Pod",
                "spec.containers[0].env[8].valueFrom.secretKeyRef.name",
                Some("spec.database"),
            ),
            (
                "Pod",
                "spec.volumes[3].secret.items[0].key",
                Some("spec.licence and spec.tls.secretName"),
            ),
            ("Pod", "spec.containers[0].env[1].value", None),
            ("Pod", "spec.securityContext", None),
            (
                "Service",
                "metadata.annotations",
                Some("spec.service.annotations"),
            ),
            ("Service", "spec.ports[0].port", Some("spec.service.port")),
            ("ConfigMap", "data", None),
            ("Pod", "spec.nodeSelectorX", None),
        ] {
            assert_eq!(spec_field(kind, field), want, "{kind} {field}");
        }
    }

    #[test]
    fn refused_message_names_the_field_and_quotes_the_apiserver() {
        let s = invalid(
            "Pod \"im-a\" is invalid: spec.tolerations[0].operator: Invalid value: \"Exists\": value must be empty when `operator` is 'Exists'",
            &["spec.tolerations[0].operator"],
        );
        assert_eq!(
            refused_message("Pod", "im-a", &s),
            "the apiserver refused Pod im-a (check spec.tolerations): 422 Invalid: Pod \"im-a\" is invalid: spec.tolerations[0].operator: Invalid value: \"Exists\": value must be empty when `operator` is 'Exists'"
        );
        let s = Status {
            code: 400,
            reason: "BadRequest".into(),
            message: "something odd".into(),
            ..Default::default()
        };
        assert_eq!(
            refused_message("Service", "im", &s),
            "the apiserver refused Service im: 400 BadRequest: something odd"
        );
    }

    /// A quantity the apiserver cannot decode fails the whole body with no field named: the
    /// message still names spec.resources (the only spec field that can cause it).
    #[test]
    fn an_undecodable_quantity_names_spec_resources() {
        let s: Status = serde_json::from_value(json!({
            "status": "Failure", "code": 400, "reason": "BadRequest",
            "message": "Pod in version \"v1\" cannot be handled as a Pod: quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"
        }))
        .expect("status");
        let m = refused_message("Pod", "im-a", &s);
        assert!(
            m.starts_with("the apiserver refused Pod im-a (check spec.resources): 400 BadRequest: Pod in version"),
            "{m}"
        );
        assert_eq!(
            refused_message("Service", "im", &s),
            format!(
                "the apiserver refused Service im: 400 BadRequest: {}",
                s.message
            )
        );
    }

    fn pod_waiting(reason: &str, message: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "im-a"},
            "status": {"phase": "Pending", "containerStatuses": [{
                "name": "server", "image": "identitymesh/server:9.9.9", "imageID": "",
                "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": reason, "message": message}}}]}
        }))
        .expect("pod")
    }

    #[test]
    fn a_crash_looping_server_is_reported_with_its_last_exit() {
        let looping = |message: &str| -> Pod {
            serde_json::from_value(json!({
                "metadata": {"name": "im-a"},
                "status": {"phase": "Running", "containerStatuses": [{
                    "name": "server", "image": "identitymesh/server:9.9.9", "imageID": "",
                    "ready": false, "restartCount": 4,
                    "state": {"waiting": {"reason": "CrashLoopBackOff",
                        "message": message}},
                    "lastState": {"terminated": {"exitCode": 2, "reason": "Error",
                        "startedAt": "2026-12-02T03:00:00Z", "finishedAt": "2026-12-02T03:00:01Z",
                        "message": "config: http.request_timeout_ms must exceed the drain timeout\n"}}}]}
            }))
            .expect("pod")
        };
        let a = stuck_container(&looping("back-off 20s restarting failed container=server"))
            .expect("stuck");
        let b = stuck_container(&looping("back-off 40s restarting failed container=server"))
            .expect("stuck");
        assert_eq!(a.condition_reason(), "ContainerCrashLooping");
        // The same crash reads the same on every restart: one Event, not one per back-off.
        assert_eq!(
            stuck_message("im-a", &a, &[]),
            stuck_message("im-a", &b, &[])
        );
        assert_eq!(
            stuck_message("im-a", &a, &[]),
            "pod im-a keeps exiting at start (the server's reason is in `kubectl logs im-a --previous`; a setting it refuses names its spec field there): CrashLoopBackOff: exited with code 2 (Error): config: http.request_timeout_ms must exceed the drain timeout"
        );
        // A long termination message is shortened; none at all still gives the exit code.
        let mut long = looping("");
        use k8s_openapi::api::core::v1::{ContainerStateTerminated, ContainerStatus};
        fn server(p: &mut Pod) -> &mut ContainerStatus {
            &mut p
                .status
                .as_mut()
                .unwrap()
                .container_statuses
                .as_mut()
                .unwrap()[0]
        }
        fn exit(p: &mut Pod) -> &mut ContainerStateTerminated {
            server(p)
                .last_state
                .as_mut()
                .unwrap()
                .terminated
                .as_mut()
                .unwrap()
        }
        exit(&mut long).message = Some("x".repeat(1000));
        let m = stuck_container(&long).unwrap().message;
        assert!(m.ends_with('…') && m.len() < 400, "{m}");
        exit(&mut long).message = None;
        exit(&mut long).reason = None;
        assert_eq!(
            stuck_container(&long).unwrap().message,
            "exited with code 2"
        );
        // A server that ran for a while and was killed, or restarted only twice: a failover's
        // business, not a spec to fix.
        exit(&mut long).started_at = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            "2026-12-02T02:00:00Z".parse().unwrap(),
        ));
        assert_eq!(stuck_container(&long), None);
        let mut twice = looping("");
        server(&mut twice).restart_count = 2;
        assert_eq!(stuck_container(&twice), None);
        // Running again: nothing to report.
        server(&mut long).state = serde_json::from_value(json!({"running": {}})).unwrap();
        assert_eq!(stuck_container(&long), None);
    }

    #[test]
    fn an_unschedulable_pod_is_reported_with_the_schedulers_message() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "im-b"},
            "status": {"phase": "Pending", "conditions": [{
                "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": "0/2 nodes are available: 1 node(s) didn't match pod anti-affinity rules."}]}
        }))
        .unwrap();
        let s = stuck_container(&pod).expect("stuck");
        assert_eq!(s.condition_reason(), "Unschedulable");
        let m = stuck_message("im-b", &s, &[]);
        assert!(
            m.contains("spec.nodeSelector") && m.contains("0/2 nodes are available"),
            "{m}"
        );
        // Scheduled, or not yet looked at by the scheduler: nothing to report.
        let pending: Pod = serde_json::from_value(json!({
            "metadata": {"name": "im-b"}, "status": {"phase": "Pending"}
        }))
        .unwrap();
        assert_eq!(stuck_container(&pending), None);
    }

    #[test]
    fn stuck_pods_are_recognised_and_named() {
        assert_eq!(stuck_container(&pod_waiting("ContainerCreating", "")), None);
        let s = stuck_container(&pod_waiting(
            "ErrImagePull",
            "rpc error: code = NotFound desc = manifest unknown",
        ))
        .expect("stuck");
        assert_eq!(s.condition_reason(), "ImagePullFailed");
        assert_eq!(
            stuck_message("im-a", &s, &[]),
            "pod im-a cannot pull image \"identitymesh/server:9.9.9\" (check spec.image.repository, spec.version and spec.image.pullSecrets): ErrImagePull: rpc error: code = NotFound desc = manifest unknown"
        );
        let s = stuck_container(&pod_waiting(
            "InvalidImageName",
            "Failed to apply default image tag \"x:1+2\": couldn't parse image reference",
        ))
        .expect("stuck");
        assert!(stuck_message("im-a", &s, &[])
            .starts_with("pod im-a has an invalid image \"identitymesh/server:9.9.9\" (check spec.image.repository and spec.version): InvalidImageName: Failed to apply"));
        let s = stuck_container(&pod_waiting(
            "CreateContainerConfigError",
            "secret \"im-db\" not found",
        ))
        .expect("stuck");
        assert_eq!(
            stuck_message(
                "im-a",
                &s,
                &[("spec.licence", "im-licence"), ("spec.database", "im-db")]
            ),
            "pod im-a cannot create its container (check spec.database (Secret im-db)): CreateContainerConfigError: secret \"im-db\" not found"
        );
        let s = stuck_container(&pod_waiting(
            "CreateContainerConfigError",
            "couldn't find key connectionString in Secret prod/im-db",
        ))
        .expect("stuck");
        assert!(stuck_message("im-a", &s, &[("spec.database", "im-db")])
            .contains("(check spec.database (Secret im-db))"));
    }
}
