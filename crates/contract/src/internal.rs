//! The pods' internal API (mTLS, port 9443): what the operator asks an instance and what the
//! instance answers. The server builds these bodies; the operator reads them. Readers tolerate
//! missing fields (`serde(default)`) so an older instance still answers a newer operator during
//! an upgrade.

use serde::{Deserialize, Serialize};

/// The paths, under the internal listener.
pub mod paths {
    pub const STATUS: &str = "/internal/v1/status";
    pub const INSTANCES: &str = "/internal/v1/instances";
    pub const PROMOTE: &str = "/internal/v1/promote";
    pub const DEMOTE: &str = "/internal/v1/demote";
    pub const RELAYS: &str = "/internal/v1/relays";
    pub const CANARY: &str = "/internal/v1/canary";
    pub const UI: &str = "/internal/v1/ui";
}

/// An instance's engine role as it reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Standby,
    Active,
    /// Claimed active after the stored epoch moved on (the registry shows it so).
    Fenced,
    /// A role this build does not know (a newer instance): treated as neither.
    #[serde(other)]
    Unknown,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Standby => "standby",
            Role::Active => "active",
            Role::Fenced => "fenced",
            Role::Unknown => "unknown",
        }
    }
}

/// `GET /internal/v1/status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InternalStatus {
    pub instance: String,
    /// This process's part of the fence holder: a recreated pod of the same name differs.
    #[serde(default)]
    pub incarnation: String,
    pub role: Role,
    pub epoch: i64,
    #[serde(default)]
    pub version: Option<String>,
}

/// One alive row of the engine-instance registry (`GET /internal/v1/instances`, an array), as
/// far as the operator reads it; the server sends more fields.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRow {
    pub instance: String,
    pub role: Role,
    pub epoch: i64,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub version: Option<String>,
}

impl InstanceRow {
    pub fn is_active(&self) -> bool {
        self.role == Role::Active
    }
}

/// `POST /internal/v1/promote`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromoteRequest {
    pub epoch: i64,
}

/// The answer to a promote that took (or already held) the epoch. A stale epoch is a 409
/// problem carrying `stored_epoch` and `holder`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromoteResponse {
    pub role: Role,
    pub epoch: i64,
}

/// `POST /internal/v1/demote`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemoteRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DemoteResponse {
    pub role: Role,
    pub epoch: i64,
    /// False when the in-flight batch outlived the drain bound (the new epoch fences it anyway).
    #[serde(default)]
    pub drained: bool,
}

/// `GET /internal/v1/relays`: which relays the instance expects back and which are connected
/// to it (names, not ids).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayReport {
    /// Non-revoked relays seen in the last 10 minutes, or connected now.
    #[serde(default)]
    pub expected: Vec<String>,
    /// Relays with a live hub connection to this instance.
    #[serde(default)]
    pub connected_here: Vec<String>,
    /// Expected but not connected here.
    #[serde(default)]
    pub missing: Vec<String>,
}

/// `GET /internal/v1/ui`: does the instance serve the Admin UI's sign-in page, how browsers
/// sign in there, and whether it read the issuer's discovery document just now.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UiReport {
    /// The HTTP status of `GET /signin` rendered by the instance.
    #[serde(default)]
    pub page_status: u16,
    /// `oidc` (at the provider), `bootstrap` (standalone token) or `none`.
    #[serde(default)]
    pub sign_in: String,
    /// Why the discovery document could not be read (OIDC sign-in only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery_error: Option<String>,
}

/// `POST /internal/v1/canary` (an empty body means the defaults).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanaryRequest {
    /// How long to wait for the canary runs, in ms (the server caps it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u64>,
}

/// One canary connector's run in a [`CanaryReport`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanaryRun {
    #[serde(default)]
    pub connector_id: String,
    #[serde(default)]
    pub connector: String,
    #[serde(default)]
    pub run_id: Option<String>,
    /// The run's final status (`succeeded`, `completed_with_errors`, `failed`, ...), `running`
    /// when it had not finished at the deadline, `busy` when a run was already in progress.
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub error: Option<String>,
}

impl CanaryRun {
    /// A run that synced (errors on single objects still count as synced).
    pub fn synced(&self) -> bool {
        self.status == "succeeded" || self.status == "completed_with_errors"
    }
}

/// The canary's answer: `ok` is None when no connector is flagged canary.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanaryReport {
    #[serde(default)]
    pub ok: Option<bool>,
    #[serde(default)]
    pub runs: Vec<CanaryRun>,
}

impl CanaryReport {
    pub fn of(runs: Vec<CanaryRun>) -> CanaryReport {
        let ok = (!runs.is_empty()).then(|| runs.iter().all(CanaryRun::synced));
        CanaryReport { ok, runs }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_role_this_build_does_not_know_reads_as_unknown() {
        let s: InternalStatus =
            serde_json::from_value(json!({"instance": "im-a", "role": "observer", "epoch": 3}))
                .unwrap();
        assert_eq!(s.role, Role::Unknown);
        assert_eq!(s.incarnation, "", "an older server sends no incarnation");
        assert_eq!(s.version, None);
        let s: InternalStatus = serde_json::from_value(
            json!({"instance": "im-a", "incarnation": "x", "role": "fenced", "epoch": 3, "version": "1"}),
        )
        .unwrap();
        assert_eq!((s.role, s.version.as_deref()), (Role::Fenced, Some("1")));
    }

    #[test]
    fn roles_are_written_in_lower_case() {
        for r in [Role::Standby, Role::Active, Role::Fenced] {
            assert_eq!(serde_json::to_value(r).unwrap(), json!(r.as_str()));
        }
    }

    #[test]
    fn a_promote_request_with_an_unknown_field_is_refused() {
        assert!(
            serde_json::from_value::<PromoteRequest>(json!({"epoch": 2, "force": true})).is_err()
        );
        assert_eq!(
            serde_json::to_value(PromoteRequest { epoch: 2 }).unwrap(),
            json!({"epoch": 2})
        );
    }

    #[test]
    fn the_canary_is_ok_only_when_every_run_synced_and_unset_without_canaries() {
        let run = |status: &str| CanaryRun {
            status: status.into(),
            ..CanaryRun::default()
        };
        assert_eq!(CanaryReport::of(vec![]).ok, None);
        assert_eq!(
            CanaryReport::of(vec![run("succeeded"), run("completed_with_errors")]).ok,
            Some(true)
        );
        assert_eq!(
            CanaryReport::of(vec![run("succeeded"), run("running")]).ok,
            Some(false)
        );
        assert_eq!(CanaryReport::of(vec![run("busy")]).ok, Some(false));
    }
}
