//! The types that cross the [`Store`](super::Store) trait, by domain: the fence and the
//! instance registry, the connector space an import writes, administrative rows (connectors,
//! schedules, secrets, relays), runs, identities and the composer's writes, and the audit log.
//! Re-exported from `store`, so callers name them `store::RunRow` and so on.

use std::collections::HashSet;

use serde::Serialize;

use super::now_ms;

/// What an instance claims when it writes (or asks to be promoted): its name, the incarnation
/// of its process, and the epoch. See [`fencing`](super::fencing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceToken {
    pub instance: String,
    /// Random per process start: tells a recreated pod from its predecessor of the same name.
    pub incarnation: String,
    pub epoch: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Fence {
    pub epoch: i64,
    pub holder: String,
    pub holder_incarnation: String,
}

impl Fence {
    /// The holder as error messages name it.
    pub fn holder_label(&self) -> String {
        if self.holder_incarnation.is_empty() {
            self.holder.clone()
        } else {
            format!("{} (incarnation {})", self.holder, self.holder_incarnation)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromoteOutcome {
    /// The epoch moved forward to the requested one.
    Promoted,
    /// This instance already held exactly this epoch (an idempotent retry).
    AlreadyHeld,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Standby,
    Active,
    /// Claimed active but the stored epoch moved on: recorded so the registry never shows two actives.
    Fenced,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Standby => "standby",
            Role::Active => "active",
            Role::Fenced => "fenced",
        }
    }
    pub fn parse(s: &str) -> Role {
        match s {
            "active" => Role::Active,
            "fenced" => Role::Fenced,
            _ => Role::Standby,
        }
    }
}

/// One heartbeat of the engine-instance registry.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    pub instance: String,
    pub incarnation: String,
    pub host: String,
    pub role: Role,
    pub epoch: i64,
    pub version: String,
    pub started_at_ms: i64,
    pub now_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstanceRow {
    pub instance: String,
    pub incarnation: String,
    pub host: String,
    pub role: Role,
    pub epoch: i64,
    pub version: String,
    pub started_at_ms: i64,
    pub last_heartbeat_ms: i64,
}

/// One connector-space object as imported from a source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsObject {
    pub anchor: String,
    pub object_type: String,
    pub attributes_json: String,
}

/// One import batch: the objects, the watermark it advances to, all in one fenced transaction.
#[derive(Debug, Clone)]
pub struct ImportBatch {
    pub connector: String,
    pub object_type: String,
    pub objects: Vec<CsObject>,
    pub watermark: Option<String>,
    /// The full-import run these objects were seen in (deletion detection, and duplicate
    /// detection: see [`BatchOutcome::duplicates`]), if any.
    pub seen_in_run: Option<String>,
    /// Whether the composer has rules for these objects. When not, a new or changed object is
    /// marked for it only if it is linked to an identity (whose contribution must then go),
    /// so an import-only connector leaves nothing to compose.
    pub compose: bool,
    /// Composer writes for the page's own objects, committed with it: the objects they
    /// compose are stored without a mark, so the composer neither reads nor rewrites them.
    pub composed: Option<PageCompose>,
}

/// The composer's work on an import page, done from the objects in hand before the page is
/// committed (see `sync::runner`).
#[derive(Debug, Clone, Default)]
pub struct PageCompose {
    /// Anchors composed by `writes`: stored unmarked whether or not they are linked.
    pub anchors: HashSet<String>,
    /// As for [`Store::commit_compose`](super::Store::commit_compose), without `Composed` marks.
    pub writes: Vec<ComposeWrite>,
}

impl PageCompose {
    /// Whether the object with this anchor is written without a mark.
    pub fn covers(page: &Option<PageCompose>, anchor: &str) -> bool {
        page.as_ref().is_some_and(|p| p.anchors.contains(anchor))
    }
}

/// What the store holds for an object, as an import compares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredObject {
    pub object_type: String,
    pub attributes_json: String,
    pub deleted: bool,
    /// The full-import run that last saw it.
    pub seen_run: Option<String>,
}

impl StoredObject {
    /// The one rule for "this import changes the object": new, retyped, different
    /// attributes, or coming back after a deletion. Unchanged objects are not rewritten.
    pub fn changed_by(stored: Option<&StoredObject>, o: &CsObject) -> bool {
        match stored {
            None => true,
            Some(s) => {
                s.object_type != o.object_type
                    || s.attributes_json != o.attributes_json
                    || s.deleted
            }
        }
    }

    /// Whether the full-import run `run` already imported the stored object: an anchor is
    /// imported once per run (see [`BatchOutcome::duplicates`]).
    pub fn seen_by(stored: Option<&StoredObject>, run: Option<&String>) -> bool {
        run.is_some() && stored.is_some_and(|s| s.seen_run.as_ref() == run)
    }
}

/// What a committed batch did: new objects, changed ones (marked for the composer), ones
/// whose attributes were already stored as they are, and ones the run had already imported.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BatchOutcome {
    pub seq: u64,
    pub added: u64,
    pub updated: u64,
    pub unchanged: u64,
    /// With `seen_in_run`: the anchors (as the batch spells them, in the order found) of objects
    /// this run had already imported, in an earlier batch or earlier in this one. They are
    /// not written (the first one stands) and count as none of the above; the caller reports
    /// each as a per-object error. A source streams its objects, so only the store knows
    /// every anchor a run has seen. Anchors are "the same" as the backend's key compares them
    /// (SQL Server's default collation ignores case).
    pub duplicates: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ConnectorRow {
    pub id: String,
    pub name: String,
    /// `ldap` or `csv`.
    pub kind: String,
    pub config_json: String,
    pub rules_json: String,
    pub relay_id: Option<String>,
    pub is_canary: bool,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ScheduleRow {
    pub id: String,
    pub connector_id: String,
    /// `interval` (spec like `15m`) or `cron` (five fields).
    pub kind: String,
    pub spec: String,
    /// `full` or `delta`.
    pub mode: String,
    pub enabled: bool,
    pub next_run_ms: Option<i64>,
    pub created_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RunRow {
    pub id: String,
    pub connector_id: String,
    pub instance: String,
    pub epoch: i64,
    /// `full` or `delta`.
    pub mode: String,
    /// `manual`, `schedule`, `canary`.
    pub trigger: String,
    /// `running`, `succeeded`, `completed_with_errors`, `failed`, `abandoned`.
    pub status: String,
    pub started_at_ms: i64,
    pub finished_at_ms: Option<i64>,
    pub added: i64,
    pub updated: i64,
    pub unchanged: i64,
    pub deleted: i64,
    pub failed: i64,
    pub error: Option<String>,
    /// Per-object problems (JSON array of {location, reason}), capped.
    pub errors_json: Option<String>,
}

/// A secret sealed with the key ring; the store never sees a plain value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRow {
    pub name: String,
    pub key_id: String,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
    pub updated_at_ms: i64,
}

/// A connector-space object waiting for the composer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyObject {
    pub anchor: String,
    pub object_type: String,
    pub attributes_json: String,
    /// Gone from the source (a full import did not see it): unlink, then drop the row.
    pub deleted: bool,
    /// Bumped on every change, so the composer only clears the mark of the version it read.
    pub rev: i64,
}

/// One object of a connector space as a listing shows it (see [`Store::connector_space`](super::Store::connector_space)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SpaceObjectRow {
    pub anchor: String,
    pub object_type: String,
    /// The stored `dn` (LDAP objects), when the attributes JSON has one as text.
    pub dn: Option<String>,
    /// Gone from the source, waiting for the composer to drop it.
    pub deleted: bool,
    /// The identity the object is joined to, if it is linked.
    pub identity_id: Option<String>,
}

/// One connector-space object with everything stored about it (see [`Store::connector_object`](super::Store::connector_object)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SpaceObject {
    pub anchor: String,
    pub object_type: String,
    /// As stored: `{"dn"?: "...", "attributes": {name: [value]}}`, a value a JSON string
    /// (text) or `{"base64": "..."}` (bytes); see the connectors' model.
    pub attributes_json: String,
    pub deleted: bool,
    /// Changed since the composer last saw it.
    pub pending: bool,
    /// The full-import run that last saw it.
    pub seen_run: Option<String>,
    pub updated_at_ms: i64,
    pub identity_id: Option<String>,
}

/// Which audit entries [`Store::audit`](super::Store::audit) returns, newest first. Every filter set must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditFilter {
    /// The actor exactly.
    pub actor: Option<String>,
    /// The action exactly, or, when it ends with `.`, every action that starts with it
    /// (`connector.` matches `connector.create` and `connector.delete`).
    pub action: Option<String>,
    /// Entries at or after this time (ms).
    pub since_ms: Option<i64>,
    /// Entries before this time (ms).
    pub until_ms: Option<i64>,
    pub limit: i64,
}

impl AuditFilter {
    /// The newest `limit` entries, unfiltered.
    pub fn latest(limit: i64) -> Self {
        AuditFilter {
            actor: None,
            action: None,
            since_ms: None,
            until_ms: None,
            limit,
        }
    }

    /// The action filter as the statements take it: `(exact, prefix)`, at most one set.
    pub(super) fn action_match(&self) -> (Option<&str>, Option<&str>) {
        match self.action.as_deref() {
            Some(a) if a.ends_with('.') => (None, Some(a)),
            other => (other, None),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LinkRow {
    pub connector_id: String,
    pub anchor: String,
    pub identity_id: String,
    pub precedence: i64,
    pub contribution_json: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IdentityRow {
    pub id: String,
    pub display_name: String,
    pub attributes_json: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// One write of the composer; a batch of them commits in one fenced transaction, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ComposeWrite {
    /// Creates or replaces the identity, and replaces its join keys.
    PutIdentity {
        identity: IdentityRow,
        keys: Vec<(String, String)>,
    },
    DeleteIdentity {
        id: String,
    },
    PutLink(LinkRow),
    DeleteLink {
        connector_id: String,
        anchor: String,
    },
    /// The object at this revision is composed: clear its mark, or drop it if it was deleted.
    Composed {
        connector_id: String,
        anchor: String,
        rev: i64,
    },
    Audit(AuditEntry),
}

/// A relay agent's registration and its last known connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RelayRow {
    pub id: String,
    pub name: String,
    pub created_at_ms: i64,
    pub revoked_at_ms: Option<i64>,
    pub last_seen_ms: Option<i64>,
    pub version: Option<String>,
    pub connected_instance: Option<String>,
    pub connected_since_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditEntry {
    pub at_ms: i64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub detail: String,
}

impl AuditEntry {
    /// An entry stamped now.
    pub fn now(
        actor: &str,
        action: &str,
        target: impl Into<String>,
        detail: impl Into<String>,
    ) -> Self {
        AuditEntry {
            at_ms: now_ms(),
            actor: actor.to_string(),
            action: action.to_string(),
            target: target.into(),
            detail: detail.into(),
        }
    }
}

/// The tables that grow with use and are pruned by age (see `sync::retention`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RetainedTable {
    /// Finished runs only (a running run is never pruned).
    Runs,
    AuditLog,
    ImportBatches,
    FenceJournal,
}

impl RetainedTable {
    pub const ALL: [RetainedTable; 4] = [
        RetainedTable::Runs,
        RetainedTable::AuditLog,
        RetainedTable::ImportBatches,
        RetainedTable::FenceJournal,
    ];

    pub fn name(self) -> &'static str {
        match self {
            RetainedTable::Runs => "runs",
            RetainedTable::AuditLog => "audit_log",
            RetainedTable::ImportBatches => "import_batches",
            RetainedTable::FenceJournal => "fence_journal",
        }
    }
}

/// A schedule's next due time, written with the run it started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleAdvance {
    pub schedule_id: String,
    pub next_run_ms: i64,
}
