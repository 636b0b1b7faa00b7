//! Why a write is refused with [`StoreError::Conflict`]: one text per rule for both backends,
//! which the API passes on to the user as it is.

use super::StoreError;

/// Another connector has the name (a unique key).
pub(super) fn connector_name_taken(name: &str) -> StoreError {
    StoreError::Conflict(format!(
        "a connector named {name:?} already exists; pick another name"
    ))
}

/// Another relay has the name (a unique key).
pub(super) fn relay_name_taken(name: &str) -> StoreError {
    StoreError::Conflict(format!(
        "a relay named `{name}` already exists; pick another name or revoke it first"
    ))
}

/// A connector with objects in its connector space cannot be deleted: its identity
/// contributions would be orphaned.
pub(super) fn objects_left(connector: &str, objects: i64) -> StoreError {
    StoreError::Conflict(format!(
        "connector {connector} still has {objects} objects in its connector space; clear it first \
         (POST /api/connectors/{connector}/clear) so its identity contributions are removed"
    ))
}

/// Why a connector with a run of the current epoch cannot be deleted yet.
pub(super) fn run_in_progress(connector: &str, run: &str) -> StoreError {
    StoreError::Conflict(format!(
        "connector {connector} has a run in progress (run {run}); wait for it to finish, or pause \
         the sync engine and wait, then delete the connector"
    ))
}

/// A connector runs once at a time across the cluster.
pub(super) fn already_running(connector: &str, run: &str) -> StoreError {
    StoreError::Conflict(format!(
        "connector {connector} is already running (run {run}); wait for it to finish"
    ))
}

/// Why a run of a connector deleted after the run was requested does not start.
pub(super) fn connector_deleted(connector: &str) -> StoreError {
    StoreError::Conflict(format!("connector {connector} was deleted; nothing to run"))
}
