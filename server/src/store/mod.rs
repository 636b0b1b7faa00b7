//! The one store trait every backend implements, its error, and the connection string that
//! picks a backend. The types that cross the trait are in `rows.rs`, re-exported here.
//!
//! Fencing lives here: `promote` moves the epoch forward atomically, and every engine write
//! (`engine_tick`, `commit_import_batch`) checks, under a lock a promotion must wait for, that
//! the stored epoch is still the writer's own. A stale instance's write fails with
//! [`StoreError::Fenced`] and nothing of it commits.

use std::collections::HashMap;

use async_trait::async_trait;

mod conflicts;
pub mod fencing;
pub mod migrations;
pub mod mssql;
mod rows;
pub mod sqlite;

pub use rows::*;

#[cfg(test)]
mod conformance;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("fenced: the stored epoch is {stored} (held by `{holder}`), this instance writes with epoch {own}")]
    Fenced {
        stored: i64,
        holder: String,
        own: i64,
    },
    #[error("epoch {requested} is not greater than the stored epoch {stored} (held by `{holder}`); promote with a higher epoch")]
    StaleEpoch {
        requested: i64,
        stored: i64,
        holder: String,
    },
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("database error: {0}")]
    Backend(String),
    #[error("schema migration failed: {0}")]
    Migration(String),
    #[error("invalid connection string: {0}")]
    Config(String),
    #[error("{0}")]
    Conflict(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => {
                StoreError::Unavailable(e.to_string())
            }
            // SQLITE_BUSY after the busy timeout: another process holds the write lock (a
            // stopped or hung one holds it until it resumes or dies). Retryable.
            sqlx::Error::Database(ref d) if d.code().as_deref() == Some("5") => {
                StoreError::Unavailable(format!(
                    "{e}: another process has held SQLite's write lock for longer than the busy \
                     timeout; retry"
                ))
            }
            other => StoreError::Backend(other.to_string()),
        }
    }
}

/// Records an administrative action, best effort: a failed audit write is logged, and the
/// action it records stands.
pub async fn audit(store: &dyn Store, entry: AuditEntry) {
    if let Err(e) = store.append_audit(&entry).await {
        tracing::warn!(error = %e, action = %entry.action, "audit write failed");
    }
}

/// The store every backend implements; the conformance suite in `conformance.rs` runs against each.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Backend name for logs and health output.
    fn backend(&self) -> &'static str;
    /// Applies pending schema migrations; safe when several instances start at once.
    async fn migrate(&self) -> Result<Vec<u32>, StoreError>;
    /// A cheap round trip proving the database answers.
    async fn ping(&self) -> Result<(), StoreError>;

    async fn fence(&self) -> Result<Fence, StoreError>;
    /// Moves the stored epoch to `claim.epoch` iff it is greater, or is already held by this very
    /// process (name and incarnation); see [`fencing::promote`].
    async fn promote(&self, claim: &FenceToken) -> Result<PromoteOutcome, StoreError>;

    /// Upserts the instance's registry row. A row claiming `active` whose epoch is no longer the
    /// stored one is written as `fenced`, and the call returns [`StoreError::Fenced`].
    async fn heartbeat(&self, hb: &Heartbeat) -> Result<(), StoreError>;
    /// Registry rows whose last heartbeat is at or after `alive_since_ms`.
    async fn instances(&self, alive_since_ms: i64) -> Result<Vec<InstanceRow>, StoreError>;

    /// The active engine's fenced liveness write.
    async fn engine_tick(&self, token: &FenceToken, now_ms: i64) -> Result<(), StoreError>;
    /// Commits the batch's objects and its watermark in one fenced transaction. Objects whose
    /// attributes changed are marked for the composer, unless the batch carries their
    /// composer writes (`composed`), which are committed in the same transaction. With
    /// `seen_in_run`, an object the run already imported is refused as a duplicate (see
    /// [`BatchOutcome::duplicates`]).
    async fn commit_import_batch(
        &self,
        token: &FenceToken,
        batch: &ImportBatch,
        now_ms: i64,
    ) -> Result<BatchOutcome, StoreError>;
    /// Ends a full import: objects of this type the run did not see are marked deleted (for the
    /// composer), fenced. Returns how many.
    async fn finish_full_import(
        &self,
        token: &FenceToken,
        connector: &str,
        object_type: &str,
        run_id: &str,
        now_ms: i64,
    ) -> Result<u64, StoreError>;
    async fn watermark(
        &self,
        connector: &str,
        object_type: &str,
    ) -> Result<Option<String>, StoreError>;
    async fn count_objects(&self, connector: &str) -> Result<i64, StoreError>;
    async fn count_batches(&self, connector: &str) -> Result<i64, StoreError>;

    /// The bootstrap admin token's hash (sha-256 hex); the plain token never reaches the store.
    async fn set_token_hash(&self, name: &str, hash: &str, now_ms: i64) -> Result<(), StoreError>;
    async fn token_hash(&self, name: &str) -> Result<Option<String>, StoreError>;

    /// Registers a relay with the hash of its credential; a duplicate name is a Conflict.
    async fn create_relay(
        &self,
        id: &str,
        name: &str,
        token_hash: &str,
        now_ms: i64,
    ) -> Result<(), StoreError>;
    /// The relay a credential hash belongs to, revoked or not.
    async fn relay_by_token_hash(&self, token_hash: &str) -> Result<Option<RelayRow>, StoreError>;
    /// Marks the relay revoked; false when there is no such relay.
    async fn revoke_relay(&self, id: &str, now_ms: i64) -> Result<bool, StoreError>;
    // Relay rows are not fenced: they record where a relay's socket is, a fact about the
    // process that holds it (a stale active does hold it until it closes its sockets), and
    // `relay_disconnected` only clears the row its own instance wrote.
    async fn relay_connected(
        &self,
        id: &str,
        instance: &str,
        version: &str,
        now_ms: i64,
    ) -> Result<(), StoreError>;
    async fn relay_seen(&self, id: &str, now_ms: i64) -> Result<(), StoreError>;
    /// Clears the connection only if it is still the one this instance recorded.
    async fn relay_disconnected(
        &self,
        id: &str,
        instance: &str,
        now_ms: i64,
    ) -> Result<(), StoreError>;
    async fn relays(&self) -> Result<Vec<RelayRow>, StoreError>;

    // Connectors, schedules, settings and secrets: administrative data, not fenced (a standby
    // may be configured too); engine writes are.
    /// Inserts or replaces by id; a name used by another connector is a Conflict.
    async fn put_connector(&self, c: &ConnectorRow) -> Result<(), StoreError>;
    async fn connector(&self, id: &str) -> Result<Option<ConnectorRow>, StoreError>;
    async fn connectors(&self) -> Result<Vec<ConnectorRow>, StoreError>;
    /// Deletes the connector with its schedules and watermarks. A connector that still has
    /// objects in its connector space, or a run under the current epoch, is a Conflict (its
    /// contributions would be orphaned; a running import would write objects after it).
    async fn delete_connector(&self, id: &str) -> Result<bool, StoreError>;
    /// The object types the connector has objects of (deleted-marked ones included), whatever
    /// its configuration says today: what a clear must sweep.
    async fn object_types_of(&self, connector: &str) -> Result<Vec<String>, StoreError>;

    async fn put_schedule(&self, s: &ScheduleRow) -> Result<(), StoreError>;
    async fn schedules(&self) -> Result<Vec<ScheduleRow>, StoreError>;
    async fn delete_schedule(&self, id: &str) -> Result<bool, StoreError>;
    /// Fenced: a stale active's scheduler must not move a schedule on (its run would be lost).
    async fn set_schedule_next_run(
        &self,
        token: &FenceToken,
        id: &str,
        next_run_ms: i64,
    ) -> Result<(), StoreError>;

    async fn setting(&self, name: &str) -> Result<Option<String>, StoreError>;
    /// Administrator settings (pause, for one). Not fenced: an API write is a user's intent and
    /// holds whichever instance served it.
    async fn set_setting(&self, name: &str, value: &str) -> Result<(), StoreError>;
    /// A setting the engine keeps about the state it wrote (which rules the connector space
    /// is composed with, which attributes identities are indexed by), fenced: a stale active
    /// recording it could make the new active skip work it never did.
    async fn set_engine_setting(
        &self,
        token: &FenceToken,
        name: &str,
        value: &str,
    ) -> Result<(), StoreError>;

    async fn put_secret(&self, s: &SecretRow) -> Result<(), StoreError>;
    async fn secret(&self, name: &str) -> Result<Option<SecretRow>, StoreError>;
    /// Names, key ids and times; never values.
    async fn secrets(&self) -> Result<Vec<SecretRow>, StoreError>;
    async fn delete_secret(&self, name: &str) -> Result<bool, StoreError>;

    /// Records a run as started, fenced. Runs of this connector left `running` by an older epoch
    /// are marked `abandoned`; one still running under the current epoch is a Conflict, so a
    /// connector runs once at a time across the cluster. A connector deleted meanwhile is a
    /// Conflict too. A scheduled run moves its schedule on in the same transaction, so a run
    /// is never recorded without its schedule advancing, nor the schedule advanced without it.
    async fn start_run(
        &self,
        token: &FenceToken,
        run: &RunRow,
        advance: Option<&ScheduleAdvance>,
    ) -> Result<(), StoreError>;
    /// Stores the run's end state (only while it is still `running`). Not fenced: it records
    /// what happened to a run, its failure by fencing included; a run the new active already
    /// marked `abandoned` is left as it is, and no engine state depends on it.
    async fn finish_run(&self, run: &RunRow) -> Result<(), StoreError>;
    async fn run(&self, id: &str) -> Result<Option<RunRow>, StoreError>;
    /// Newest first.
    async fn runs(&self, connector: Option<&str>, limit: i64) -> Result<Vec<RunRow>, StoreError>;

    /// What the store holds for those of these anchors that exist (deleted ones included).
    async fn stored_objects(
        &self,
        connector: &str,
        anchors: &[String],
    ) -> Result<HashMap<String, StoredObject>, StoreError>;
    /// Objects of the connector waiting for the composer, oldest change first.
    async fn dirty_objects(
        &self,
        connector: &str,
        limit: i64,
    ) -> Result<Vec<DirtyObject>, StoreError>;
    /// Marks for the composer every object of the connector it must see again after the rules
    /// changed: those of the types `ruled_types` lists and those linked to an identity. Fenced.
    async fn mark_for_recompose(
        &self,
        token: &FenceToken,
        connector: &str,
        ruled_types: &[String],
    ) -> Result<u64, StoreError>;
    /// Marks composed, at most `limit` per call, the connector's changed objects the composer
    /// has nothing to do for: of a type `ruled_types` does not list and linked to no identity.
    /// Fenced. Returns how many; the caller repeats until none is left.
    async fn settle_unruled(
        &self,
        token: &FenceToken,
        connector: &str,
        ruled_types: &[String],
        limit: i64,
    ) -> Result<u64, StoreError>;
    async fn link(&self, connector: &str, anchor: &str) -> Result<Option<LinkRow>, StoreError>;
    async fn links_of_identity(&self, identity_id: &str) -> Result<Vec<LinkRow>, StoreError>;
    /// Identities whose join key `attr` has the (lower-cased) value.
    async fn identities_by_key(&self, attr: &str, value: &str) -> Result<Vec<String>, StoreError>;
    async fn identity(&self, id: &str) -> Result<Option<IdentityRow>, StoreError>;

    // Batched reads for the composer (one chunk of objects at a time). The defaults make one
    // call per item; a backend overrides them when a round trip costs more than the query.
    /// The connector's links for these anchors.
    async fn links_for(
        &self,
        connector: &str,
        anchors: &[String],
    ) -> Result<Vec<LinkRow>, StoreError> {
        let mut out = Vec::new();
        for a in anchors {
            out.extend(self.link(connector, a).await?);
        }
        Ok(out)
    }
    /// `(attr, value, identity id)` for every identity matching one of the join keys.
    async fn identities_by_keys(
        &self,
        keys: &[(String, String)],
    ) -> Result<Vec<(String, String, String)>, StoreError> {
        let mut out = Vec::new();
        for (a, v) in keys {
            for id in self.identities_by_key(a, v).await? {
                out.push((a.clone(), v.clone(), id));
            }
        }
        Ok(out)
    }
    /// These identities (the ones that exist) and all their links.
    async fn identities_with_links(
        &self,
        ids: &[String],
    ) -> Result<(Vec<IdentityRow>, Vec<LinkRow>), StoreError> {
        let (mut rows, mut links) = (Vec::new(), Vec::new());
        for id in ids {
            if let Some(r) = self.identity(id).await? {
                rows.push(r);
                links.extend(self.links_of_identity(id).await?);
            }
        }
        Ok((rows, links))
    }
    /// Keyset paging by id; `search` matches the display name (substring, case-insensitive) or
    /// the id exactly.
    async fn identities(
        &self,
        search: Option<&str>,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<IdentityRow>, StoreError>;
    async fn count_identities(&self) -> Result<i64, StoreError>;
    /// A page of the connector's connector space (deleted-marked objects included), ordered by
    /// anchor as the backend's key compares anchors, keyset-paged with `after` (the last anchor
    /// of the previous page). `search` matches, as a substring and ignoring case (ASCII letters
    /// on SQLite, the collation's rule on SQL Server), the anchor or the stored attributes JSON
    /// (the DN, attribute names and text values as the JSON spells them; bytes only by their
    /// base64). `%`, `_` and the like are literal characters.
    async fn connector_space(
        &self,
        connector: &str,
        search: Option<&str>,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<SpaceObjectRow>, StoreError>;
    /// One object of the connector's connector space, deleted-marked or not.
    async fn connector_object(
        &self,
        connector: &str,
        anchor: &str,
    ) -> Result<Option<SpaceObject>, StoreError>;
    /// Applies the composer's writes in order, in one fenced transaction.
    async fn commit_compose(
        &self,
        token: &FenceToken,
        writes: &[ComposeWrite],
        now_ms: i64,
    ) -> Result<(), StoreError>;

    /// Not fenced: the audit log records what each instance did, a fenced one's demotion too.
    async fn append_audit(&self, entry: &AuditEntry) -> Result<(), StoreError>;
    /// Deletes up to `limit` rows of `table` older than `before_ms`, oldest first, fenced (only
    /// the active prunes). Returns how many went.
    async fn prune(
        &self,
        token: &FenceToken,
        table: RetainedTable,
        before_ms: i64,
        limit: i64,
    ) -> Result<u64, StoreError>;
    /// The entries `filter` selects, newest first, at most `filter.limit`.
    async fn audit(&self, filter: &AuditFilter) -> Result<Vec<AuditEntry>, StoreError>;
    /// Ordered journal of fenced commits (kind, epoch), for proving commit order in tests.
    async fn journal(&self) -> Result<Vec<(String, i64)>, StoreError>;
}

/// Which backend a connection string names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    Sqlite(std::path::PathBuf),
    SqlServer(String),
}

pub fn parse_connection_string(s: &str) -> Result<Backend, StoreError> {
    let s = s.trim();
    if let Some(rest) = s.strip_prefix("sqlite://") {
        if rest.is_empty() {
            return Err(StoreError::Config(
                "sqlite:// needs a file path, e.g. sqlite:///var/lib/identitymesh/im.db".into(),
            ));
        }
        return Ok(Backend::Sqlite(rest.into()));
    }
    if s.contains('=') && s.contains(';') || s.to_ascii_lowercase().starts_with("server=") {
        return Ok(Backend::SqlServer(s.to_string()));
    }
    Err(StoreError::Config(
        "expected sqlite://PATH or an ADO.NET SQL Server string such as \
         Server=tcp:sql.contoso.local,1433;Database=IdentityMesh;User Id=im;Password=...;Encrypt=true"
            .into(),
    ))
}

pub async fn open(backend: &Backend) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    Ok(match backend {
        Backend::Sqlite(path) => std::sync::Arc::new(sqlite::SqliteStore::open(path).await?),
        Backend::SqlServer(cs) => std::sync::Arc::new(mssql::MssqlStore::connect(cs).await?),
    })
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The search text as it appears inside stored JSON (the attributes JSON serde_json writes):
/// `"`, `\` and control characters escaped, everything else as it is.
fn json_escaped(q: &str) -> String {
    let quoted = serde_json::to_string(q).unwrap_or_default();
    quoted
        .strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .unwrap_or(q)
        .to_string()
}

/// A list of names as the JSON array the object-type statements take (SQLite's `json_each`,
/// SQL Server's `OPENJSON`), so the statement text does not vary with the list.
fn json_list(items: &[String]) -> String {
    serde_json::to_string(items).unwrap_or_else(|_| "[]".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_strings() {
        assert_eq!(
            parse_connection_string("sqlite:///a/b.db").unwrap(),
            Backend::Sqlite("/a/b.db".into())
        );
        assert!(matches!(
            parse_connection_string("Server=tcp:x,1433;Database=IM;User Id=a;Password=b").unwrap(),
            Backend::SqlServer(_)
        ));
        assert!(parse_connection_string("sqlite://").is_err());
        let e = parse_connection_string("postgres://x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("sqlite://PATH"), "{e}");
    }
}
