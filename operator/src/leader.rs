//! Leader election for the operator's own replicas with a coordination.k8s.io Lease.
//!
//! The decision is pure ([`decide`]); [`LeaderElector`] does the reads and optimistic writes
//! (replace with resourceVersion, so two candidates cannot both win the same round).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};
use kube::Client;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nobody holds it (or the holder's lease expired): take it.
    Acquire,
    /// We hold it: renew.
    Renew,
    /// Someone else holds a live lease.
    Follow { holder: String },
}

/// Pure lease decision for candidate `me` at `now`.
pub fn decide(
    spec: Option<&LeaseSpec>,
    me: &str,
    now: Timestamp,
    default_duration: Duration,
) -> Decision {
    let Some(spec) = spec else {
        return Decision::Acquire;
    };
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder == me {
        return Decision::Renew;
    }
    if holder.is_empty() {
        return Decision::Acquire;
    }
    let secs = spec
        .lease_duration_seconds
        .map(i64::from)
        .unwrap_or_else(|| i64::try_from(default_duration.as_secs()).unwrap_or(15));
    let last = spec
        .renew_time
        .as_ref()
        .or(spec.acquire_time.as_ref())
        .map(|t| t.0);
    match last {
        Some(t) if t + SignedDuration::from_secs(secs) > now => Decision::Follow { holder },
        _ => Decision::Acquire,
    }
}

/// The lease spec to write for `d`.
pub fn next_spec(
    current: Option<&LeaseSpec>,
    d: &Decision,
    me: &str,
    now: Timestamp,
    duration: Duration,
) -> Option<LeaseSpec> {
    let dur = i32::try_from(duration.as_secs()).unwrap_or(15);
    match d {
        Decision::Follow { .. } => None,
        Decision::Renew => Some(LeaseSpec {
            renew_time: Some(MicroTime(now)),
            lease_duration_seconds: Some(dur),
            ..current.cloned().unwrap_or_default()
        }),
        Decision::Acquire => Some(LeaseSpec {
            holder_identity: Some(me.to_string()),
            acquire_time: Some(MicroTime(now)),
            renew_time: Some(MicroTime(now)),
            lease_duration_seconds: Some(dur),
            lease_transitions: Some(current.and_then(|c| c.lease_transitions).unwrap_or(0) + 1),
            ..Default::default()
        }),
    }
}

pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    me: String,
    pub duration: Duration,
}

impl LeaderElector {
    pub fn new(client: Client, namespace: &str, name: &str, me: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            me: me.to_string(),
            duration: Duration::from_secs(15),
        }
    }

    /// One round: returns whether we hold the lease afterwards.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let existing = self.api.get_opt(&self.name).await?;
        let d = decide(
            existing.as_ref().and_then(|l| l.spec.as_ref()),
            &self.me,
            now,
            self.duration,
        );
        let Some(spec) = next_spec(
            existing.as_ref().and_then(|l| l.spec.as_ref()),
            &d,
            &self.me,
            now,
            self.duration,
        ) else {
            return Ok(false);
        };
        let result = match existing {
            Some(mut lease) => {
                lease.spec = Some(spec);
                // resourceVersion kept: a concurrent writer makes this a 409, and we lose.
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
            }
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..Default::default()
                    },
                    spec: Some(spec),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
        };
        match result {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Block until this replica is the leader.
    pub async fn acquire(&self) {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "leader election round failed"),
            }
            tokio::time::sleep(self.duration / 3).await;
        }
    }

    /// Renew forever; returns when leadership is lost (the caller should exit).
    pub async fn hold(&self) {
        let mut failures = 0u32;
        loop {
            tokio::time::sleep(self.duration / 3).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => failures = 0,
                Ok(false) => return,
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, "lease renewal failed");
                    // Give up before the lease could have expired under us.
                    if failures >= 2 {
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).expect("ts")
    }
    fn held_by(who: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(who.into()),
            renew_time: Some(MicroTime(t(renewed))),
            lease_duration_seconds: Some(15),
            lease_transitions: Some(2),
            ..Default::default()
        }
    }
    const D: Duration = Duration::from_secs(15);

    #[test]
    fn decisions() {
        assert_eq!(decide(None, "me", t(0), D), Decision::Acquire);
        assert_eq!(
            decide(Some(&held_by("me", 0)), "me", t(100), D),
            Decision::Renew
        );
        assert_eq!(
            decide(Some(&held_by("other", 0)), "me", t(10), D),
            Decision::Follow {
                holder: "other".into()
            }
        );
        assert_eq!(
            decide(Some(&held_by("other", 0)), "me", t(16), D),
            Decision::Acquire
        );
        assert_eq!(
            decide(Some(&held_by("", 0)), "me", t(1), D),
            Decision::Acquire
        );
        assert_eq!(
            decide(
                Some(&LeaseSpec {
                    holder_identity: Some("x".into()),
                    ..Default::default()
                }),
                "me",
                t(1),
                D
            ),
            Decision::Acquire
        );
    }

    #[test]
    fn specs_written() {
        let cur = held_by("other", 0);
        let s = next_spec(Some(&cur), &Decision::Acquire, "me", t(20), D).expect("spec");
        assert_eq!(s.holder_identity.as_deref(), Some("me"));
        assert_eq!(s.lease_transitions, Some(3));
        let mine = held_by("me", 0);
        let s = next_spec(Some(&mine), &Decision::Renew, "me", t(5), D).expect("spec");
        assert_eq!(s.renew_time, Some(MicroTime(t(5))));
        assert_eq!(s.lease_transitions, Some(2));
        assert_eq!(
            next_spec(
                Some(&cur),
                &Decision::Follow {
                    holder: "other".into()
                },
                "me",
                t(1),
                D
            ),
            None
        );
    }
}
