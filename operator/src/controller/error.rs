//! A reconcile's errors, one variant per step that can fail, so a failed reconcile says where it
//! stopped: the step is a label of `reconcile_errors_total` and a field of the log line.

use crate::certs::CertError;
use crate::refusals::api_message;

/// Kubernetes API errors show the apiserver's message, never the debug dump of its Status. The
/// message does not name the step: it also lands in conditions (PodsCreated), unchanged.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the IdentityMeshCluster itself (the consistent read each reconcile starts with).
    #[error("Kubernetes API: {}", api_message(.0))]
    ReadCluster(#[source] kube::Error),
    /// Reading a referenced or owned Secret.
    #[error("Kubernetes API: {}", api_message(.0))]
    ReadSecret(#[source] kube::Error),
    /// Creating the CA or key ring Secret, or writing the serving certificate's.
    #[error("Kubernetes API: {}", api_message(.0))]
    WriteSecret(#[source] kube::Error),
    /// Generating, issuing or reading a certificate.
    #[error("certificate: {0}")]
    Certificate(#[from] CertError),
    #[error("rendering server.toml: {0}")]
    RenderConfig(#[from] toml::ser::Error),
    /// Reading or server-side applying a ConfigMap or Service.
    #[error("Kubernetes API: {}", api_message(.0))]
    ApplyObject(#[source] kube::Error),
    /// Listing or reading the server pods.
    #[error("Kubernetes API: {}", api_message(.0))]
    ReadPods(#[source] kube::Error),
    /// Creating or deleting a server pod.
    #[error("Kubernetes API: {}", api_message(.0))]
    WritePod(#[source] kube::Error),
    /// Building the client of the pods' internal API (from the cluster CA).
    #[error("{0}")]
    PodClient(String),
    /// Writing the cluster's status or removing its switchover request.
    #[error("Kubernetes API: {}", api_message(.0))]
    WriteStatus(#[source] kube::Error),
    /// A status or metadata write lost an optimistic-concurrency race (409): someone wrote the
    /// cluster after this reconcile read it. The reconcile is recomputed from a fresh read.
    #[error("IdentityMeshCluster {0} changed since it was read; recomputing")]
    Conflict(String),
    /// The cluster or what was observed of it cannot be reconciled as it is.
    #[error("{0}")]
    Invalid(String),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

impl Error {
    /// What kind of failure, for the metric's `reason` label (the values it always had).
    pub fn metric_reason(&self) -> &'static str {
        match self {
            Error::ReadCluster(_)
            | Error::ReadSecret(_)
            | Error::WriteSecret(_)
            | Error::ApplyObject(_)
            | Error::ReadPods(_)
            | Error::WritePod(_)
            | Error::WriteStatus(_) => "Kube",
            Error::Certificate(_) => "Certificate",
            Error::RenderConfig(_) => "Config",
            Error::PodClient(_) | Error::Invalid(_) => "Invalid",
            Error::Conflict(_) => "Conflict",
            Error::Finalizer(e) => match finalized(e) {
                Some(inner) => inner.metric_reason(),
                None => "Finalizer",
            },
        }
    }

    /// The step that failed, for the metric's `step` label and the log.
    pub fn step(&self) -> &'static str {
        match self {
            Error::ReadCluster(_) => "read_cluster",
            Error::ReadSecret(_) => "read_secret",
            Error::WriteSecret(_) => "write_secret",
            Error::Certificate(_) => "certificate",
            Error::RenderConfig(_) => "render_config",
            Error::ApplyObject(_) => "apply_object",
            Error::ReadPods(_) => "read_pods",
            Error::WritePod(_) => "write_pod",
            Error::PodClient(_) => "pod_client",
            Error::WriteStatus(_) | Error::Conflict(_) => "write_status",
            Error::Invalid(_) => "validate",
            Error::Finalizer(e) => match finalized(e) {
                Some(inner) => inner.step(),
                None => "finalizer",
            },
        }
    }
}

/// The reconcile's own error inside a finalizer error (None: adding or removing the finalizer
/// itself failed).
fn finalized(e: &kube::runtime::finalizer::Error<Error>) -> Option<&Error> {
    use kube::runtime::finalizer::Error as F;
    match e {
        F::ApplyFailed(inner) | F::CleanupFailed(inner) => Some(inner),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use kube::runtime::finalizer::Error as F;

    use super::*;

    fn api_error(code: u16) -> kube::Error {
        let s: kube::core::Status = serde_json::from_value(serde_json::json!({
            "status": "Failure", "code": code, "reason": "InternalError", "message": "etcd timeout"
        }))
        .expect("status");
        kube::Error::Api(Box::new(s))
    }

    #[test]
    fn each_api_step_is_its_own_label_with_the_kube_reason() {
        type Make = fn(kube::Error) -> Error;
        let cases: [(Make, &str); 7] = [
            (Error::ReadCluster, "read_cluster"),
            (Error::ReadSecret, "read_secret"),
            (Error::WriteSecret, "write_secret"),
            (Error::ApplyObject, "apply_object"),
            (Error::ReadPods, "read_pods"),
            (Error::WritePod, "write_pod"),
            (Error::WriteStatus, "write_status"),
        ];
        for (make, step) in cases {
            let e = make(api_error(500));
            assert_eq!((e.step(), e.metric_reason()), (step, "Kube"), "{e:?}");
            // The message is the apiserver's, as before the steps were told apart.
            assert_eq!(
                e.to_string(),
                "Kubernetes API: 500 InternalError: etcd timeout"
            );
        }
    }

    #[test]
    fn other_failures_keep_their_reason_and_name_their_step() {
        let conflict = Error::Conflict("im".into());
        assert_eq!(
            (conflict.step(), conflict.metric_reason()),
            ("write_status", "Conflict")
        );
        let client = Error::PodClient("bad CA".into());
        assert_eq!(
            (client.step(), client.metric_reason()),
            ("pod_client", "Invalid")
        );
        let invalid = Error::Invalid("two slots".into());
        assert_eq!(
            (invalid.step(), invalid.metric_reason()),
            ("validate", "Invalid")
        );
    }

    #[test]
    fn a_finalizer_error_reports_the_step_inside_it() {
        let e = Error::Finalizer(Box::new(F::ApplyFailed(Error::ReadSecret(api_error(503)))));
        assert_eq!((e.step(), e.metric_reason()), ("read_secret", "Kube"));
        let e = Error::Finalizer(Box::new(F::CleanupFailed(Error::Conflict("im".into()))));
        assert_eq!((e.step(), e.metric_reason()), ("write_status", "Conflict"));
        let e = Error::Finalizer(Box::new(F::AddFinalizer(api_error(500))));
        assert_eq!((e.step(), e.metric_reason()), ("finalizer", "Finalizer"));
    }
}
