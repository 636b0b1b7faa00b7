//! The canary runs off the reconcile path. `POST /internal/v1/canary` waits up to
//! [`CANARY_WAIT`](crate::checks::CANARY_WAIT) for the runs it starts; awaiting it inside
//! reconcile would keep the operator from noticing a failure of the new active for that long,
//! right after a cutover. So reconcile starts it as a task and picks up the answer on a later
//! reconcile (the steady requeue is 2 s); a new cutover, a pause or the cluster's deletion drops
//! a task that has not answered, so a stale answer never lands on a newer transition.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use tokio::task::JoinHandle;

use crate::podclient::{CanaryReport, InstanceApi, PodClientError, PodTarget};

type Answer = Result<CanaryReport, PodClientError>;

/// One canary in flight (or answered, not yet collected) for one cluster.
struct Job {
    /// The transition it covers (checks::transition_key) and the pod it asked.
    key: String,
    pod: String,
    task: JoinHandle<Answer>,
}

/// What the job registry holds for a cluster, as the decision sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobState<'a> {
    None,
    Running { key: &'a str, pod: &'a str },
    Answered { key: &'a str, pod: &'a str },
}

/// What to do with the registry this reconcile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobStep {
    /// Nothing wanted, nothing held.
    Idle,
    /// Start a canary for the wanted transition.
    Start,
    /// The wanted canary is still running: leave the condition as it is.
    Wait,
    /// The wanted canary answered: use its answer (and forget the job).
    Collect,
    /// A job for another transition (or none wanted): drop it, then start if one is wanted.
    Drop { then_start: bool },
}

/// `wanted`: (transition key, pod) when the canary is due (checks::canary_plan said Run); None
/// when it is not (no verified transition to cover, a cutover running, the cluster paused).
pub fn job_step(wanted: Option<(&str, &str)>, job: JobState<'_>) -> JobStep {
    let held = match job {
        JobState::None => None,
        JobState::Running { key, pod } => Some((key, pod, false)),
        JobState::Answered { key, pod } => Some((key, pod, true)),
    };
    match (wanted, held) {
        (None, None) => JobStep::Idle,
        (None, Some(_)) => JobStep::Drop { then_start: false },
        (Some(_), None) => JobStep::Start,
        (Some(w), Some((key, pod, answered))) if w == (key, pod) => {
            if answered {
                JobStep::Collect
            } else {
                JobStep::Wait
            }
        }
        (Some(_), Some(_)) => JobStep::Drop { then_start: true },
    }
}

/// Canary tasks by cluster (namespace/name).
#[derive(Default)]
pub struct CanaryJobs(Mutex<HashMap<String, Job>>);

impl CanaryJobs {
    /// Advance the cluster's canary: Some(answer) once the wanted one has answered, None while
    /// it runs or when none is wanted. `start` gives the API and target to ask when one must be
    /// started (None: the pod cannot be asked; answered at once with a transport error).
    pub fn poll(
        &self,
        cluster: &str,
        wanted: Option<(&str, &str)>,
        start: impl FnOnce() -> Option<(Arc<dyn InstanceApi>, PodTarget)>,
        wait: std::time::Duration,
    ) -> Option<Answer> {
        let Ok(mut jobs) = self.0.lock() else {
            return None;
        };
        let state = match jobs.get(cluster) {
            None => JobState::None,
            Some(j) if j.task.is_finished() => JobState::Answered {
                key: &j.key,
                pod: &j.pod,
            },
            Some(j) => JobState::Running {
                key: &j.key,
                pod: &j.pod,
            },
        };
        let step = job_step(wanted, state);
        let start_now = match step {
            JobStep::Idle | JobStep::Wait => false,
            JobStep::Start => true,
            JobStep::Collect => {
                let job = jobs.remove(cluster)?;
                let pod = job.pod;
                return Some(match job.task.now_or_never() {
                    Some(Ok(answer)) => answer,
                    _ => Err(PodClientError::Transport {
                        pod,
                        detail: "canary task ended without an answer".into(),
                    }),
                });
            }
            JobStep::Drop { then_start } => {
                if let Some(j) = jobs.remove(cluster) {
                    j.task.abort();
                }
                then_start
            }
        };
        let (Some((key, pod)), true) = (wanted, start_now) else {
            return None;
        };
        let Some((api, target)) = start() else {
            return Some(Err(PodClientError::Transport {
                pod: pod.to_string(),
                detail: "no pod IP or no mTLS client".into(),
            }));
        };
        let task = tokio::spawn(async move { api.canary(&target, wait).await });
        jobs.insert(
            cluster.to_string(),
            Job {
                key: key.to_string(),
                pod: pod.to_string(),
                task,
            },
        );
        None
    }

    /// Drop the cluster's canary, if any (paused, deleted).
    pub fn drop_cluster(&self, cluster: &str) {
        if let Some(j) = self.0.lock().ok().and_then(|mut m| m.remove(cluster)) {
            j.task.abort();
        }
    }

    /// Whether every held task has answered (tests wait on this instead of sleeping).
    #[cfg(test)]
    pub fn all_answered(&self) -> bool {
        self.0
            .lock()
            .map(|m| m.values().all(|j| j.task.is_finished()))
            .unwrap_or(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_steps() {
        let t1 = Some(("t1", "im-b"));
        let run = |key, pod| JobState::Running { key, pod };
        let done = |key, pod| JobState::Answered { key, pod };
        let cases = [
            (None, JobState::None, JobStep::Idle),
            (None, run("t1", "im-b"), JobStep::Drop { then_start: false }),
            (
                None,
                done("t1", "im-b"),
                JobStep::Drop { then_start: false },
            ),
            (t1, JobState::None, JobStep::Start),
            (t1, run("t1", "im-b"), JobStep::Wait),
            (t1, done("t1", "im-b"), JobStep::Collect),
            // Another transition's canary never answers for this one.
            (t1, run("t0", "im-a"), JobStep::Drop { then_start: true }),
            (t1, done("t0", "im-a"), JobStep::Drop { then_start: true }),
            (t1, done("t1", "im-a"), JobStep::Drop { then_start: true }),
        ];
        for (wanted, job, want) in cases {
            assert_eq!(job_step(wanted, job), want, "{wanted:?} {job:?}");
        }
    }
}
