//! The embedded SQLite store (single host, development, tests).
//!
//! Every write that must be fenced runs in `BEGIN IMMEDIATE`, which takes SQLite's write lock
//! before the epoch is read; a promotion needs the same lock, so each fenced commit is ordered
//! entirely before or entirely after any promotion.
//!
//! This file opens the database (pool, WAL checkpointer, migrations) and holds the thin
//! `impl Store`: each method calls the function of the same name in the file of its domain.
//! The SQL Server backend (`store/mssql/`) has the same files, for comparing the two:
//!
//! - `fence.rs`: the fence row (read under the write lock, promote, the check of every
//!   fenced write), the fence journal and the engine's liveness tick;
//! - `registry.rs`: instance heartbeats and the registry they show;
//! - `relays.rs`: relay agents;
//! - `connectors.rs`: the administrative data: connectors, schedules, settings, secrets and
//!   the bootstrap admin token's hash;
//! - `runs.rs`: runs and the import side: import batches, watermarks, the connector space;
//! - `identities.rs`: the composer's side: pending objects, recompose marks, identities,
//!   join keys, links and the compose commit;
//! - `audit.rs`: the audit log and retention's pruning;
//! - `multi.rs`: the builders of multi-row statements.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;

use super::migrations::SQLITE;
use super::*;

mod audit;
mod connectors;
mod fence;
mod identities;
mod multi;
mod registry;
mod relays;
mod runs;

pub struct SqliteStore {
    pool: SqlitePool,
    /// Queues this process's write transactions in FIFO order. SQLite's busy handler polls, so
    /// without it a promotion can starve behind an import that re-takes the lock the moment it
    /// commits; with it the promotion waits for one batch at most.
    writers: tokio::sync::Mutex<()>,
    /// Copies committed WAL frames into the database file off the writers' path (see
    /// [`checkpoint_in_background`]); stopped when the store goes.
    checkpointer: tokio::task::JoinHandle<()>,
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.checkpointer.abort();
    }
}

/// How often the background checkpointer copies the WAL into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(200);

/// WAL pages after which a commit checkpoints by itself: only if the background checkpointer
/// falls behind (SQLite's default, 1,000 pages, makes every few import pages wait for one).
const AUTOCHECKPOINT_PAGES: &str = "16384";

/// SQLite's automatic checkpoint runs inside the commit that crosses the threshold, so the
/// writer waits for the copy and its fsync. A PASSIVE checkpoint from another connection never
/// blocks the writer or readers, so the copy overlaps the next transaction's work instead.
fn checkpoint_in_background(pool: SqlitePool) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if pool.is_closed() {
                return;
            }
            if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                .execute(&pool)
                .await
            {
                tracing::debug!(error = %e, "background WAL checkpoint failed; the next one retries");
            }
        }
    })
}

type Tx<'a> = sqlx::Transaction<'a, sqlx::Sqlite>;

impl SqliteStore {
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                StoreError::Unavailable(format!("cannot create {}: {e}", parent.display()))
            })?;
        }
        let opts = SqliteConnectOptions::from_str("sqlite://")
            .map_err(|e| StoreError::Config(e.to_string()))?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a committed batch survives a crash of the host, not only of the process.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(30))
            .pragma("wal_autocheckpoint", AUTOCHECKPOINT_PAGES)
            .foreign_keys(true);
        // Two instances opening a new file at once race to switch it to WAL, and SQLite answers
        // that switch with SQLITE_BUSY without consulting the busy timeout: retry for a while.
        let mut delay = Duration::from_millis(20);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let r = SqlitePoolOptions::new()
                .max_connections(4)
                .acquire_timeout(Duration::from_secs(30))
                .connect_with(opts.clone())
                .await;
            match r {
                Ok(pool) => {
                    let checkpointer = checkpoint_in_background(pool.clone());
                    return Ok(Self {
                        pool,
                        writers: tokio::sync::Mutex::new(()),
                        checkpointer,
                    });
                }
                Err(sqlx::Error::Database(e))
                    if e.message().contains("database is locked")
                        && std::time::Instant::now() + delay < deadline =>
                {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(500));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// A write transaction holding SQLite's write lock, and this process's writer slot for as
    /// long as the guard lives (keep it alive until the commit).
    async fn begin_locked(&self) -> Result<(tokio::sync::MutexGuard<'_, ()>, Tx<'_>), StoreError> {
        let slot = self.writers.lock().await;
        Ok((slot, self.pool.begin_with("BEGIN IMMEDIATE").await?))
    }
}

/// A LIKE pattern (for `ESCAPE '\'`) matching `q` as a literal substring.
fn like_pattern(q: &str) -> String {
    let escaped = q
        .replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_");
    format!("%{escaped}%")
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn migrate(&self) -> Result<Vec<u32>, StoreError> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)",
        )
        .execute(&self.pool)
        .await?;
        let (_slot, mut tx) = self.begin_locked().await?;
        let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM schema_migrations")
            .fetch_all(&mut *tx)
            .await?;
        let mut done = Vec::new();
        for m in SQLITE
            .iter()
            .filter(|m| !applied.contains(&(m.version as i64)))
        {
            for stmt in m.statements {
                sqlx::query(stmt).execute(&mut *tx).await.map_err(|e| {
                    StoreError::Migration(format!("version {} ({}): {e}", m.version, m.name))
                })?;
            }
            sqlx::query(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
            )
            .bind(m.version as i64)
            .bind(m.name)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
            done.push(m.version);
        }
        tx.commit().await?;
        Ok(done)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn fence(&self) -> Result<Fence, StoreError> {
        fence::fence(self).await
    }

    async fn promote(&self, claim: &FenceToken) -> Result<PromoteOutcome, StoreError> {
        fence::promote(self, claim).await
    }

    async fn heartbeat(&self, hb: &Heartbeat) -> Result<(), StoreError> {
        registry::heartbeat(self, hb).await
    }

    async fn instances(&self, alive_since_ms: i64) -> Result<Vec<InstanceRow>, StoreError> {
        registry::instances(self, alive_since_ms).await
    }

    async fn engine_tick(&self, token: &FenceToken, now_ms: i64) -> Result<(), StoreError> {
        fence::engine_tick(self, token, now_ms).await
    }

    async fn commit_import_batch(
        &self,
        token: &FenceToken,
        batch: &ImportBatch,
        now_ms: i64,
    ) -> Result<BatchOutcome, StoreError> {
        runs::commit_import_batch(self, token, batch, now_ms).await
    }

    async fn finish_full_import(
        &self,
        token: &FenceToken,
        connector: &str,
        object_type: &str,
        run_id: &str,
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        runs::finish_full_import(self, token, connector, object_type, run_id, now_ms).await
    }

    async fn watermark(
        &self,
        connector: &str,
        object_type: &str,
    ) -> Result<Option<String>, StoreError> {
        runs::watermark(self, connector, object_type).await
    }

    async fn count_objects(&self, connector: &str) -> Result<i64, StoreError> {
        runs::count_objects(self, connector).await
    }

    async fn count_batches(&self, connector: &str) -> Result<i64, StoreError> {
        runs::count_batches(self, connector).await
    }

    async fn set_token_hash(&self, name: &str, hash: &str, now_ms: i64) -> Result<(), StoreError> {
        connectors::set_token_hash(self, name, hash, now_ms).await
    }

    async fn token_hash(&self, name: &str) -> Result<Option<String>, StoreError> {
        connectors::token_hash(self, name).await
    }

    async fn create_relay(
        &self,
        id: &str,
        name: &str,
        token_hash: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        relays::create_relay(self, id, name, token_hash, now_ms).await
    }

    async fn relay_by_token_hash(&self, token_hash: &str) -> Result<Option<RelayRow>, StoreError> {
        relays::relay_by_token_hash(self, token_hash).await
    }

    async fn revoke_relay(&self, id: &str, now_ms: i64) -> Result<bool, StoreError> {
        relays::revoke_relay(self, id, now_ms).await
    }

    async fn relay_connected(
        &self,
        id: &str,
        instance: &str,
        version: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        relays::relay_connected(self, id, instance, version, now_ms).await
    }

    async fn relay_seen(&self, id: &str, now_ms: i64) -> Result<(), StoreError> {
        relays::relay_seen(self, id, now_ms).await
    }

    async fn relay_disconnected(
        &self,
        id: &str,
        instance: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        relays::relay_disconnected(self, id, instance, now_ms).await
    }

    async fn relays(&self) -> Result<Vec<RelayRow>, StoreError> {
        relays::relays(self).await
    }

    async fn put_connector(&self, c: &ConnectorRow) -> Result<(), StoreError> {
        connectors::put_connector(self, c).await
    }

    async fn connector(&self, id: &str) -> Result<Option<ConnectorRow>, StoreError> {
        connectors::connector(self, id).await
    }

    async fn connectors(&self) -> Result<Vec<ConnectorRow>, StoreError> {
        connectors::connectors(self).await
    }

    async fn delete_connector(&self, id: &str) -> Result<bool, StoreError> {
        connectors::delete_connector(self, id).await
    }

    async fn object_types_of(&self, connector: &str) -> Result<Vec<String>, StoreError> {
        connectors::object_types_of(self, connector).await
    }

    async fn put_schedule(&self, s: &ScheduleRow) -> Result<(), StoreError> {
        connectors::put_schedule(self, s).await
    }

    async fn schedules(&self) -> Result<Vec<ScheduleRow>, StoreError> {
        connectors::schedules(self).await
    }

    async fn delete_schedule(&self, id: &str) -> Result<bool, StoreError> {
        connectors::delete_schedule(self, id).await
    }

    async fn set_schedule_next_run(
        &self,
        token: &FenceToken,
        id: &str,
        next_run_ms: i64,
    ) -> Result<(), StoreError> {
        connectors::set_schedule_next_run(self, token, id, next_run_ms).await
    }

    async fn setting(&self, name: &str) -> Result<Option<String>, StoreError> {
        connectors::setting(self, name).await
    }

    async fn set_setting(&self, name: &str, value: &str) -> Result<(), StoreError> {
        connectors::set_setting(self, name, value).await
    }

    async fn set_engine_setting(
        &self,
        token: &FenceToken,
        name: &str,
        value: &str,
    ) -> Result<(), StoreError> {
        connectors::set_engine_setting(self, token, name, value).await
    }

    async fn put_secret(&self, s: &SecretRow) -> Result<(), StoreError> {
        connectors::put_secret(self, s).await
    }

    async fn secret(&self, name: &str) -> Result<Option<SecretRow>, StoreError> {
        connectors::secret(self, name).await
    }

    async fn secrets(&self) -> Result<Vec<SecretRow>, StoreError> {
        connectors::secrets(self).await
    }

    async fn delete_secret(&self, name: &str) -> Result<bool, StoreError> {
        connectors::delete_secret(self, name).await
    }

    async fn start_run(
        &self,
        token: &FenceToken,
        run: &RunRow,
        advance: Option<&ScheduleAdvance>,
    ) -> Result<(), StoreError> {
        runs::start_run(self, token, run, advance).await
    }

    async fn finish_run(&self, run: &RunRow) -> Result<(), StoreError> {
        runs::finish_run(self, run).await
    }

    async fn run(&self, id: &str) -> Result<Option<RunRow>, StoreError> {
        runs::run(self, id).await
    }

    async fn runs(&self, connector: Option<&str>, limit: i64) -> Result<Vec<RunRow>, StoreError> {
        runs::runs(self, connector, limit).await
    }

    async fn stored_objects(
        &self,
        connector: &str,
        anchors: &[String],
    ) -> Result<HashMap<String, StoredObject>, StoreError> {
        runs::stored_objects(self, connector, anchors).await
    }

    async fn dirty_objects(
        &self,
        connector: &str,
        limit: i64,
    ) -> Result<Vec<DirtyObject>, StoreError> {
        identities::dirty_objects(self, connector, limit).await
    }

    async fn mark_for_recompose(
        &self,
        token: &FenceToken,
        connector: &str,
        ruled_types: &[String],
    ) -> Result<u64, StoreError> {
        identities::mark_for_recompose(self, token, connector, ruled_types).await
    }

    async fn settle_unruled(
        &self,
        token: &FenceToken,
        connector: &str,
        ruled_types: &[String],
        limit: i64,
    ) -> Result<u64, StoreError> {
        identities::settle_unruled(self, token, connector, ruled_types, limit).await
    }

    async fn link(&self, connector: &str, anchor: &str) -> Result<Option<LinkRow>, StoreError> {
        identities::link(self, connector, anchor).await
    }

    async fn links_of_identity(&self, identity_id: &str) -> Result<Vec<LinkRow>, StoreError> {
        identities::links_of_identity(self, identity_id).await
    }

    async fn identities_by_key(&self, attr: &str, value: &str) -> Result<Vec<String>, StoreError> {
        identities::identities_by_key(self, attr, value).await
    }

    async fn identity(&self, id: &str) -> Result<Option<IdentityRow>, StoreError> {
        identities::identity(self, id).await
    }

    async fn links_for(
        &self,
        connector: &str,
        anchors: &[String],
    ) -> Result<Vec<LinkRow>, StoreError> {
        identities::links_for(self, connector, anchors).await
    }

    async fn identities_by_keys(
        &self,
        keys: &[(String, String)],
    ) -> Result<Vec<(String, String, String)>, StoreError> {
        identities::identities_by_keys(self, keys).await
    }

    async fn identities_with_links(
        &self,
        ids: &[String],
    ) -> Result<(Vec<IdentityRow>, Vec<LinkRow>), StoreError> {
        identities::identities_with_links(self, ids).await
    }

    async fn identities(
        &self,
        search: Option<&str>,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<IdentityRow>, StoreError> {
        identities::identities(self, search, after, limit).await
    }

    async fn count_identities(&self) -> Result<i64, StoreError> {
        identities::count_identities(self).await
    }

    async fn connector_space(
        &self,
        connector: &str,
        search: Option<&str>,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<SpaceObjectRow>, StoreError> {
        runs::connector_space(self, connector, search, after, limit).await
    }

    async fn connector_object(
        &self,
        connector: &str,
        anchor: &str,
    ) -> Result<Option<SpaceObject>, StoreError> {
        runs::connector_object(self, connector, anchor).await
    }

    async fn commit_compose(
        &self,
        token: &FenceToken,
        writes: &[ComposeWrite],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        identities::commit_compose(self, token, writes, now_ms).await
    }

    async fn append_audit(&self, e: &AuditEntry) -> Result<(), StoreError> {
        audit::append_audit(self, e).await
    }

    async fn prune(
        &self,
        token: &FenceToken,
        table: RetainedTable,
        before_ms: i64,
        limit: i64,
    ) -> Result<u64, StoreError> {
        audit::prune(self, token, table, before_ms, limit).await
    }

    async fn audit(&self, f: &AuditFilter) -> Result<Vec<AuditEntry>, StoreError> {
        audit::audit(self, f).await
    }

    async fn journal(&self) -> Result<Vec<(String, i64)>, StoreError> {
        fence::journal(self).await
    }
}

#[cfg(test)]
mod upgrade_tests {
    use super::*;

    /// A database at schema version 2 (fence and registry without incarnations) upgrades in
    /// place: its rows survive and the old holder never matches a running process.
    #[tokio::test]
    async fn version_2_upgrades_to_incarnations_keeping_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("im.db")).await.unwrap();
        sqlx::query("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)")
            .execute(&store.pool)
            .await
            .unwrap();
        for m in SQLITE.iter().filter(|m| m.version <= 2) {
            for stmt in m.statements {
                sqlx::query(stmt).execute(&store.pool).await.unwrap();
            }
            sqlx::query("INSERT INTO schema_migrations VALUES (?, ?, 0)")
                .bind(m.version as i64)
                .bind(m.name)
                .execute(&store.pool)
                .await
                .unwrap();
        }
        sqlx::query("UPDATE fence SET epoch = 9, holder = 'im-a' WHERE id = 1")
            .execute(&store.pool)
            .await
            .unwrap();
        sqlx::query("INSERT INTO engine_instances VALUES ('im-a', 'h', 'active', 9, '1', 1, ?)")
            .bind(now_ms())
            .execute(&store.pool)
            .await
            .unwrap();
        assert_eq!(store.migrate().await.unwrap(), vec![3, 4, 5]);
        let f = store.fence().await.unwrap();
        assert_eq!(
            (f.epoch, f.holder.as_str(), f.holder_incarnation.as_str()),
            (9, "im-a", "")
        );
        let rows = store.instances(0).await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].instance.as_str(), rows[0].incarnation.as_str()),
            ("im-a", "")
        );
        // The process that held epoch 9 before the upgrade is gone: a new one needs epoch 10.
        let claim = FenceToken {
            instance: "im-a".into(),
            incarnation: "p1".into(),
            epoch: 9,
        };
        assert!(matches!(
            store.promote(&claim).await,
            Err(StoreError::StaleEpoch { stored: 9, .. })
        ));
        let claim = FenceToken { epoch: 10, ..claim };
        assert_eq!(
            store.promote(&claim).await.unwrap(),
            PromoteOutcome::Promoted
        );
    }
}

#[cfg(test)]
mod cancel_tests {
    use super::*;
    use sqlx::Connection;

    /// A write abandoned while BEGIN IMMEDIATE waits for the lock (a client gone mid-request)
    /// leaves no pooled connection holding the write lock against every other process (a guard:
    /// the leak seen once in CI came from a demotion cut short, see `api::internal::transition`).
    #[tokio::test]
    async fn a_write_cancelled_while_waiting_for_the_lock_leaks_no_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("im.db");
        let store = SqliteStore::open(&path).await.unwrap();
        store.migrate().await.unwrap();
        let other = SqliteStore::open(&path).await.unwrap();

        // Another process holds the write lock.
        let url = format!("sqlite://{}", path.display());
        let mut holder = sqlx::SqliteConnection::connect(&url).await.unwrap();
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut holder)
            .await
            .unwrap();
        let entry = || AuditEntry::now("test", "probe", String::from("t"), String::from("{}"));
        let cancelled =
            tokio::time::timeout(Duration::from_millis(300), store.append_audit(&entry())).await;
        assert!(cancelled.is_err(), "the write waited for the lock");
        sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
        holder.close().await.unwrap();

        // Both stores write again; the abandoned begin was rolled back, not left holding.
        for s in [&store, &other, &store] {
            tokio::time::timeout(Duration::from_secs(10), s.append_audit(&entry()))
                .await
                .expect("a write is blocked by a leaked transaction")
                .unwrap();
        }
    }
}
