//! The embedded SQLite store (single host, development, tests).
//!
//! Every write that must be fenced runs in `BEGIN IMMEDIATE`, which takes SQLite's write lock
//! before the epoch is read; a promotion needs the same lock, so each fenced commit is ordered
//! entirely before or entirely after any promotion.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use super::migrations::SQLITE;
use super::*;

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

/// Rows per multi-row statement: 9 parameters a row stays far below SQLite's 32,766.
const ROWS_PER_STATEMENT: usize = 500;

type Builder<'q> = sqlx::QueryBuilder<'q, sqlx::Sqlite>;

/// A built multi-row statement, kept out of the connection's statement cache: each distinct
/// row count would otherwise stay in every connection's cache, hundreds of KiB apiece.
/// An identity's end state in a compose: its row and join keys, or None when deleted.
type IdentityPut<'a> = Option<(&'a IdentityRow, &'a Vec<(String, String)>)>;

fn build_once<'b, 'args>(
    q: &'b mut Builder<'args>,
) -> sqlx::query::Query<'b, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'args>> {
    q.build().persistent(false)
}

/// Appends `(?, ?, …)`, one bound value per item: the list of an `IN`.
fn push_in<'q, T>(q: &mut Builder<'q>, items: impl IntoIterator<Item = T>)
where
    T: 'q + sqlx::Encode<'q, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>,
{
    q.push("(");
    let mut list = q.separated(", ");
    for item in items {
        list.push_bind(item);
    }
    q.push(")");
}

/// Appends `(SELECT t.rowid FROM (VALUES (…), …) v JOIN {table} t ON t.{col} = v.columnN …)`:
/// the rows of `table` whose `columns` equal one item's values (`row` binds them), for a
/// `rowid IN`. The row-value form `(a, b) IN (VALUES …)` says the same, but SQLite answers it
/// with a scan of the whole table.
fn push_rowids_matching<'q, I>(
    q: &mut Builder<'q>,
    table: &str,
    columns: &[&str],
    items: impl IntoIterator<Item = I>,
    mut row: impl FnMut(&mut sqlx::query_builder::Separated<'_, 'q, sqlx::Sqlite, &'static str>, I),
) {
    q.push("(SELECT t.rowid FROM (VALUES ");
    for (n, item) in items.into_iter().enumerate() {
        q.push(if n == 0 { "(" } else { ", (" });
        row(&mut q.separated(", "), item);
        q.push(")");
    }
    q.push(format!(") v JOIN {table} t ON "));
    for (i, c) in columns.iter().enumerate() {
        let and = if i == 0 { "" } else { " AND " };
        q.push(format!("{and}t.{c} = v.column{}", i + 1));
    }
    q.push(")");
}

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

    async fn read_fence(tx: &mut Tx<'_>) -> Result<Fence, StoreError> {
        let row = sqlx::query(FENCE_SELECT).fetch_one(&mut **tx).await?;
        fence_row(&row)
    }

    /// Reads the fence under the write lock and refuses a token that no longer holds it.
    async fn check_fence(tx: &mut Tx<'_>, token: &FenceToken) -> Result<(), StoreError> {
        fencing::check(&Self::read_fence(tx).await?, token)
    }

    async fn advance_schedule(
        tx: &mut Tx<'_>,
        id: &str,
        next_run_ms: i64,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE schedules SET next_run = ? WHERE id = ?")
            .bind(next_run_ms)
            .bind(id)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    async fn journal_insert(
        tx: &mut Tx<'_>,
        kind: &str,
        epoch: i64,
        instance: &str,
        at: i64,
    ) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO fence_journal (kind, epoch, instance, at) VALUES (?, ?, ?, ?)")
            .bind(kind)
            .bind(epoch)
            .bind(instance)
            .bind(at)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// The end state of composer writes, inside the caller's fenced transaction.
    async fn write_compose(tx: &mut Tx<'_>, writes: &[ComposeWrite]) -> Result<(), StoreError> {
        // The final state of each identity and link the chunk touched (the writes are in order,
        // so the last one wins), then a few multi-row statements: one round trip to SQLite's
        // worker per statement, not several per object.
        let mut identities: Vec<&str> = Vec::new();
        let mut identity_state: HashMap<&str, IdentityPut<'_>> = HashMap::new();
        let mut links: Vec<(&str, &str)> = Vec::new();
        let mut link_state: HashMap<(&str, &str), Option<&LinkRow>> = HashMap::new();
        let mut composed: Vec<(&str, &str, i64)> = Vec::new();
        let mut audits: Vec<&AuditEntry> = Vec::new();
        for w in writes {
            match w {
                ComposeWrite::PutIdentity { identity, keys } => {
                    if identity_state
                        .insert(&identity.id, Some((identity, keys)))
                        .is_none()
                    {
                        identities.push(&identity.id);
                    }
                }
                ComposeWrite::DeleteIdentity { id } => {
                    if identity_state.insert(id, None).is_none() {
                        identities.push(id);
                    }
                }
                ComposeWrite::PutLink(l) => {
                    let k = (l.connector_id.as_str(), l.anchor.as_str());
                    if link_state.insert(k, Some(l)).is_none() {
                        links.push(k);
                    }
                }
                ComposeWrite::DeleteLink {
                    connector_id,
                    anchor,
                } => {
                    let k = (connector_id.as_str(), anchor.as_str());
                    if link_state.insert(k, None).is_none() {
                        links.push(k);
                    }
                }
                ComposeWrite::Composed {
                    connector_id,
                    anchor,
                    rev,
                } => composed.push((connector_id, anchor, *rev)),
                ComposeWrite::Audit(e) => audits.push(e),
            }
        }
        // Identities: every touched one loses its keys; deleted ones go, the rest are upserted
        // with their new keys.
        for chunk in identities.chunks(ROWS_PER_STATEMENT) {
            let mut q = Builder::new("DELETE FROM identity_keys WHERE identity_id IN ");
            push_in(&mut q, chunk.iter().copied());
            build_once(&mut q).execute(&mut **tx).await?;
            let deleted: Vec<&str> = chunk
                .iter()
                .copied()
                .filter(|id| identity_state[id].is_none())
                .collect();
            if !deleted.is_empty() {
                let mut q = Builder::new("DELETE FROM identities WHERE id IN ");
                push_in(&mut q, deleted);
                build_once(&mut q).execute(&mut **tx).await?;
            }
            let puts: Vec<(&IdentityRow, &Vec<(String, String)>)> =
                chunk.iter().filter_map(|id| identity_state[*id]).collect();
            if puts.is_empty() {
                continue;
            }
            let mut q = Builder::new(
                "INSERT INTO identities (id, display_name, attributes_json, created_at, updated_at) ",
            );
            q.push_values(&puts, |mut row, (i, _)| {
                row.push_bind(&i.id)
                    .push_bind(&i.display_name)
                    .push_bind(&i.attributes_json)
                    .push_bind(i.created_at_ms)
                    .push_bind(i.updated_at_ms);
            });
            q.push(
                " ON CONFLICT (id) DO UPDATE SET display_name = excluded.display_name, \
                 attributes_json = excluded.attributes_json, updated_at = excluded.updated_at",
            );
            build_once(&mut q).execute(&mut **tx).await?;
            let keys: Vec<(&str, &(String, String))> = puts
                .iter()
                .flat_map(|(i, ks)| ks.iter().map(move |k| (i.id.as_str(), k)))
                .collect();
            for kc in keys.chunks(ROWS_PER_STATEMENT) {
                let mut q =
                    Builder::new("INSERT OR IGNORE INTO identity_keys (attr, value, identity_id) ");
                q.push_values(kc, |mut row, (id, (attr, value))| {
                    row.push_bind(attr).push_bind(value).push_bind(*id);
                });
                build_once(&mut q).execute(&mut **tx).await?;
            }
        }
        for chunk in links.chunks(ROWS_PER_STATEMENT) {
            let gone: Vec<&(&str, &str)> =
                chunk.iter().filter(|k| link_state[*k].is_none()).collect();
            if !gone.is_empty() {
                let mut q = Builder::new("DELETE FROM identity_links WHERE rowid IN ");
                let cols = ["connector_id", "anchor"];
                push_rowids_matching(&mut q, "identity_links", &cols, gone, |r, (c, a)| {
                    r.push_bind(*c);
                    r.push_bind(*a);
                });
                build_once(&mut q).execute(&mut **tx).await?;
            }
            let puts: Vec<&LinkRow> = chunk.iter().filter_map(|k| link_state[k]).collect();
            if !puts.is_empty() {
                let mut q = Builder::new(
                    "INSERT INTO identity_links (connector_id, anchor, identity_id, precedence, contribution_json) ",
                );
                q.push_values(&puts, |mut row, l| {
                    row.push_bind(&l.connector_id)
                        .push_bind(&l.anchor)
                        .push_bind(&l.identity_id)
                        .push_bind(l.precedence)
                        .push_bind(&l.contribution_json);
                });
                q.push(
                    " ON CONFLICT (connector_id, anchor) DO UPDATE SET identity_id = excluded.identity_id, \
                     precedence = excluded.precedence, contribution_json = excluded.contribution_json",
                );
                build_once(&mut q).execute(&mut **tx).await?;
            }
        }
        // Composed: a deleted object at that revision goes; any other loses its mark (only at
        // the revision the composer read, so a newer import stays marked).
        for chunk in composed.chunks(ROWS_PER_STATEMENT) {
            for head in [
                "DELETE FROM cs_objects WHERE deleted = 1 AND rowid IN ",
                "UPDATE cs_objects SET dirty = 0 WHERE rowid IN ",
            ] {
                let mut q = Builder::new(head);
                let cols = ["connector_id", "anchor", "rev"];
                push_rowids_matching(&mut q, "cs_objects", &cols, chunk, |r, (c, a, rev)| {
                    r.push_bind(*c);
                    r.push_bind(*a);
                    r.push_bind(*rev);
                });
                build_once(&mut q).execute(&mut **tx).await?;
            }
        }
        for chunk in audits.chunks(ROWS_PER_STATEMENT) {
            let mut q = Builder::new("INSERT INTO audit_log (at, actor, action, target, detail) ");
            q.push_values(chunk, |mut row, e| {
                row.push_bind(e.at_ms)
                    .push_bind(&e.actor)
                    .push_bind(&e.action)
                    .push_bind(&e.target)
                    .push_bind(&e.detail);
            });
            build_once(&mut q).execute(&mut **tx).await?;
        }
        Ok(())
    }
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
        let row = sqlx::query(FENCE_SELECT).fetch_one(&self.pool).await?;
        fence_row(&row)
    }

    async fn promote(&self, claim: &FenceToken) -> Result<PromoteOutcome, StoreError> {
        let (_slot, mut tx) = self.begin_locked().await?;
        let fence = Self::read_fence(&mut tx).await?;
        let outcome = fencing::promote(&fence, claim)?;
        if outcome == PromoteOutcome::AlreadyHeld {
            return Ok(outcome);
        }
        let now = now_ms();
        sqlx::query(
            "UPDATE fence SET epoch = ?, holder = ?, holder_incarnation = ?, updated_at = ? WHERE id = 1",
        )
        .bind(claim.epoch)
        .bind(&claim.instance)
        .bind(&claim.incarnation)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        // The registry must never show two actives: whoever claimed active before is fenced now.
        sqlx::query(
            "UPDATE engine_instances SET role = 'fenced' WHERE role = 'active' \
             AND NOT (instance = ? AND incarnation = ?)",
        )
        .bind(&claim.instance)
        .bind(&claim.incarnation)
        .execute(&mut *tx)
        .await?;
        Self::journal_insert(&mut tx, "promote", claim.epoch, &claim.instance, now).await?;
        tx.commit().await?;
        Ok(outcome)
    }

    async fn heartbeat(&self, hb: &Heartbeat) -> Result<(), StoreError> {
        let (_slot, mut tx) = self.begin_locked().await?;
        let fence = Self::read_fence(&mut tx).await?;
        let role = fencing::heartbeat_role(&fence, hb);
        let stale = role != hb.role;
        sqlx::query(
            "INSERT INTO engine_instances (instance, incarnation, host, role, epoch, version, started_at, last_heartbeat) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT (instance, incarnation) DO UPDATE SET host = excluded.host, role = excluded.role, epoch = excluded.epoch, version = excluded.version, \
             started_at = excluded.started_at, last_heartbeat = excluded.last_heartbeat",
        )
        .bind(&hb.instance)
        .bind(&hb.incarnation)
        .bind(&hb.host)
        .bind(role.as_str())
        .bind(hb.epoch)
        .bind(&hb.version)
        .bind(hb.started_at_ms)
        .bind(hb.now_ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        if stale {
            return Err(StoreError::Fenced {
                stored: fence.epoch,
                holder: fence.holder_label(),
                own: hb.epoch,
            });
        }
        Ok(())
    }

    async fn instances(&self, alive_since_ms: i64) -> Result<Vec<InstanceRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT instance, host, role, epoch, version, started_at, last_heartbeat, incarnation \
             FROM engine_instances WHERE last_heartbeat >= ? ORDER BY instance, started_at",
        )
        .bind(alive_since_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(InstanceRow {
                    instance: r.try_get(0)?,
                    host: r.try_get(1)?,
                    role: Role::parse(r.try_get::<&str, _>(2)?),
                    epoch: r.try_get(3)?,
                    version: r.try_get(4)?,
                    started_at_ms: r.try_get(5)?,
                    last_heartbeat_ms: r.try_get(6)?,
                    incarnation: r.try_get(7)?,
                })
            })
            .collect()
    }

    async fn engine_tick(&self, token: &FenceToken, now_ms: i64) -> Result<(), StoreError> {
        let (_slot, mut tx) = self.begin_locked().await?;
        Self::check_fence(&mut tx, token).await?;
        sqlx::query(
            "INSERT INTO engine_state (id, holder, epoch, last_tick) VALUES (1, ?, ?, ?) \
             ON CONFLICT (id) DO UPDATE SET holder = excluded.holder, epoch = excluded.epoch, last_tick = excluded.last_tick",
        )
        .bind(&token.instance)
        .bind(token.epoch)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn commit_import_batch(
        &self,
        token: &FenceToken,
        batch: &ImportBatch,
        now_ms: i64,
    ) -> Result<BatchOutcome, StoreError> {
        let (_slot, mut tx) = self.begin_locked().await?;
        Self::check_fence(&mut tx, token).await?;
        // A handful of statements per batch, not a few per object: every statement is a round
        // trip to SQLite's worker thread, and those trips, not SQLite, bound the import rate.
        // What is stored for the page's anchors, and whether each is linked to an identity.
        let mut existing: HashMap<String, (StoredObject, bool)> = HashMap::new();
        for chunk in batch.objects.chunks(ROWS_PER_STATEMENT) {
            let mut q = Builder::new(
                "SELECT c.anchor, c.object_type, c.attributes_json, c.deleted, c.seen_run, l.anchor IS NOT NULL \
                 FROM cs_objects c LEFT JOIN identity_links l \
                 ON l.connector_id = c.connector_id AND l.anchor = c.anchor WHERE c.connector_id = ",
            );
            q.push_bind(&batch.connector).push(" AND c.anchor IN ");
            push_in(&mut q, chunk.iter().map(|o| &o.anchor));
            for r in build_once(&mut q).fetch_all(&mut *tx).await? {
                existing.insert(
                    r.try_get(0)?,
                    (stored_object(&r, 1)?, r.try_get::<i64, _>(5)? != 0),
                );
            }
        }
        let mut out = BatchOutcome::default();
        // Each written object with its composer mark (see `ImportBatch::compose`); a new object
        // has no link (links go with their object's tombstone). An object the batch composes
        // itself carries no mark.
        let mut writes: Vec<(&CsObject, bool)> = Vec::new();
        let mut unchanged = Vec::new();
        // With deletion detection, each anchor once per run (see `BatchOutcome::duplicates`).
        let mut in_batch = HashSet::new();
        for o in &batch.objects {
            let stored = existing.get(&o.anchor);
            if batch.seen_in_run.is_some()
                && (StoredObject::seen_by(stored.map(|(s, _)| s), batch.seen_in_run.as_ref())
                    || !in_batch.insert(o.anchor.as_str()))
            {
                out.duplicates.push(o.anchor.clone());
                continue;
            }
            if !StoredObject::changed_by(stored.map(|(s, _)| s), o) {
                out.unchanged += 1;
                unchanged.push(o);
                continue;
            }
            let linked = stored.is_some_and(|(_, linked)| *linked);
            if stored.is_some() {
                out.updated += 1;
            } else {
                out.added += 1;
            }
            let composed = PageCompose::covers(&batch.composed, &o.anchor);
            writes.push((o, !composed && (batch.compose || linked)));
        }
        for chunk in writes.chunks(ROWS_PER_STATEMENT) {
            let mut q = Builder::new(
                "INSERT INTO cs_objects (connector_id, anchor, object_type, attributes_json, updated_at, dirty, deleted, seen_run, rev) ",
            );
            q.push_values(chunk, |mut row, (o, dirty)| {
                row.push_bind(&batch.connector)
                    .push_bind(&o.anchor)
                    .push_bind(&o.object_type)
                    .push_bind(&o.attributes_json)
                    .push_bind(now_ms)
                    .push(if *dirty { "1" } else { "0" })
                    .push("0")
                    .push_bind(&batch.seen_in_run)
                    .push("1");
            });
            q.push(
                " ON CONFLICT (connector_id, anchor) DO UPDATE SET object_type = excluded.object_type, \
                 attributes_json = excluded.attributes_json, updated_at = excluded.updated_at, dirty = excluded.dirty, \
                 deleted = 0, seen_run = COALESCE(excluded.seen_run, cs_objects.seen_run), rev = cs_objects.rev + 1",
            );
            build_once(&mut q).execute(&mut *tx).await?;
        }
        if batch.seen_in_run.is_some() {
            for chunk in unchanged.chunks(ROWS_PER_STATEMENT) {
                let mut q = Builder::new("UPDATE cs_objects SET seen_run = ");
                q.push_bind(&batch.seen_in_run)
                    .push(" WHERE connector_id = ")
                    .push_bind(&batch.connector)
                    .push(" AND anchor IN ");
                push_in(&mut q, chunk.iter().map(|o| &o.anchor));
                build_once(&mut q).execute(&mut *tx).await?;
            }
        }
        if let Some(w) = &batch.watermark {
            sqlx::query(
                "INSERT INTO watermarks (connector_id, object_type, value, updated_at) VALUES (?, ?, ?, ?) \
                 ON CONFLICT (connector_id, object_type) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
            )
            .bind(&batch.connector)
            .bind(&batch.object_type)
            .bind(w)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        }
        let seq = sqlx::query(
            "INSERT INTO import_batches (connector_id, object_type, object_count, watermark, epoch, instance, committed_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&batch.connector)
        .bind(&batch.object_type)
        .bind(batch.objects.len() as i64)
        .bind(&batch.watermark)
        .bind(token.epoch)
        .bind(&token.instance)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?
        .last_insert_rowid();
        if let Some(page) = &batch.composed {
            Self::write_compose(&mut tx, &page.writes).await?;
        }
        Self::journal_insert(&mut tx, "batch", token.epoch, &token.instance, now_ms).await?;
        tx.commit().await?;
        out.seq = seq as u64;
        Ok(out)
    }

    async fn finish_full_import(
        &self,
        token: &FenceToken,
        connector: &str,
        object_type: &str,
        run_id: &str,
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        let (_slot, mut tx) = self.begin_locked().await?;
        Self::check_fence(&mut tx, token).await?;
        let n = sqlx::query(
            "UPDATE cs_objects SET deleted = 1, dirty = 1, rev = rev + 1, updated_at = ? \
             WHERE connector_id = ? AND object_type = ? AND deleted = 0 AND (seen_run IS NULL OR seen_run <> ?)",
        )
        .bind(now_ms)
        .bind(connector)
        .bind(object_type)
        .bind(run_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        Self::journal_insert(
            &mut tx,
            "full_import_end",
            token.epoch,
            &token.instance,
            now_ms,
        )
        .await?;
        tx.commit().await?;
        Ok(n)
    }

    async fn watermark(
        &self,
        connector: &str,
        object_type: &str,
    ) -> Result<Option<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT value FROM watermarks WHERE connector_id = ? AND object_type = ?",
        )
        .bind(connector)
        .bind(object_type)
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn count_objects(&self, connector: &str) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT COUNT(*) FROM cs_objects WHERE connector_id = ?")
                .bind(connector)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn count_batches(&self, connector: &str) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT COUNT(*) FROM import_batches WHERE connector_id = ?")
                .bind(connector)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn set_token_hash(&self, name: &str, hash: &str, now_ms: i64) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO api_tokens (name, token_hash, created_at) VALUES (?, ?, ?) \
             ON CONFLICT (name) DO UPDATE SET token_hash = excluded.token_hash",
        )
        .bind(name)
        .bind(hash)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn token_hash(&self, name: &str) -> Result<Option<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT token_hash FROM api_tokens WHERE name = ?")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn create_relay(
        &self,
        id: &str,
        name: &str,
        token_hash: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let r = sqlx::query(
            "INSERT INTO relays (id, name, token_hash, created_at) VALUES (?, ?, ?, ?)",
        )
        .bind(id)
        .bind(name)
        .bind(token_hash)
        .bind(now_ms)
        .execute(&self.pool)
        .await;
        match r {
            Ok(_) => Ok(()),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                Err(StoreError::Conflict(format!(
                    "a relay named `{name}` already exists; pick another name or revoke it first"
                )))
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn relay_by_token_hash(&self, token_hash: &str) -> Result<Option<RelayRow>, StoreError> {
        let row = sqlx::query(&format!("{RELAY_COLUMNS} WHERE token_hash = ?"))
            .bind(token_hash)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(relay_row).transpose()
    }

    async fn revoke_relay(&self, id: &str, now_ms: i64) -> Result<bool, StoreError> {
        let n = sqlx::query(
            "UPDATE relays SET revoked_at = COALESCE(revoked_at, ?), connected_instance = NULL, connected_since = NULL WHERE id = ?",
        )
        .bind(now_ms)
        .bind(id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n > 0)
    }

    async fn relay_connected(
        &self,
        id: &str,
        instance: &str,
        version: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE relays SET connected_instance = ?, connected_since = ?, last_seen = ?, version = ? WHERE id = ?",
        )
        .bind(instance)
        .bind(now_ms)
        .bind(now_ms)
        .bind(version)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn relay_seen(&self, id: &str, now_ms: i64) -> Result<(), StoreError> {
        sqlx::query("UPDATE relays SET last_seen = ? WHERE id = ?")
            .bind(now_ms)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn relay_disconnected(
        &self,
        id: &str,
        instance: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE relays SET connected_instance = NULL, connected_since = NULL, last_seen = ? WHERE id = ? AND connected_instance = ?",
        )
        .bind(now_ms)
        .bind(id)
        .bind(instance)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn relays(&self) -> Result<Vec<RelayRow>, StoreError> {
        let rows = sqlx::query(&format!("{RELAY_COLUMNS} ORDER BY name"))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(relay_row).collect()
    }

    async fn put_connector(&self, c: &ConnectorRow) -> Result<(), StoreError> {
        let r = sqlx::query(
            "INSERT INTO connectors (id, name, kind, config_json, rules_json, relay_id, is_canary, created_at, updated_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET name = excluded.name, kind = excluded.kind, \
             config_json = excluded.config_json, rules_json = excluded.rules_json, relay_id = excluded.relay_id, \
             is_canary = excluded.is_canary, updated_at = excluded.updated_at",
        )
        .bind(&c.id)
        .bind(&c.name)
        .bind(&c.kind)
        .bind(&c.config_json)
        .bind(&c.rules_json)
        .bind(&c.relay_id)
        .bind(c.is_canary)
        .bind(c.created_at_ms)
        .bind(c.updated_at_ms)
        .execute(&self.pool)
        .await;
        match r {
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                Err(StoreError::Conflict(format!(
                    "a connector named {:?} already exists; pick another name",
                    c.name
                )))
            }
            other => other.map(|_| ()).map_err(Into::into),
        }
    }

    async fn connector(&self, id: &str) -> Result<Option<ConnectorRow>, StoreError> {
        sqlx::query(&format!("{CONNECTOR_COLUMNS} WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(connector_row)
            .transpose()
    }

    async fn connectors(&self) -> Result<Vec<ConnectorRow>, StoreError> {
        let rows = sqlx::query(&format!("{CONNECTOR_COLUMNS} ORDER BY name"))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(connector_row).collect()
    }

    async fn delete_connector(&self, id: &str) -> Result<bool, StoreError> {
        let (_slot, mut tx) = self.begin_locked().await?;
        let objects: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM cs_objects WHERE connector_id = ?")
                .bind(id)
                .fetch_one(&mut *tx)
                .await?;
        if objects > 0 {
            return Err(StoreError::Conflict(format!(
                "connector {id} still has {objects} objects in its connector space; clear it first \
                 (POST /api/connectors/{id}/clear) so its identity contributions are removed"
            )));
        }
        // Runs of older epochs are abandoned (their writes are fenced); one of the current
        // epoch may still commit objects.
        let running: Option<String> = sqlx::query_scalar(
            "SELECT id FROM runs WHERE connector_id = ? AND status = 'running' \
             AND epoch >= (SELECT epoch FROM fence WHERE id = 1) LIMIT 1",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(run) = running {
            return Err(StoreError::Conflict(running_conflict(id, &run)));
        }
        for stmt in [
            "DELETE FROM schedules WHERE connector_id = ?",
            "DELETE FROM watermarks WHERE connector_id = ?",
        ] {
            sqlx::query(stmt).bind(id).execute(&mut *tx).await?;
        }
        let n = sqlx::query("DELETE FROM connectors WHERE id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(n > 0)
    }

    async fn object_types_of(&self, connector: &str) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT DISTINCT object_type FROM cs_objects WHERE connector_id = ? ORDER BY object_type",
        )
        .bind(connector)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn put_schedule(&self, s: &ScheduleRow) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO schedules (id, connector_id, kind, spec, run_mode, enabled, next_run, created_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET connector_id = excluded.connector_id, \
             kind = excluded.kind, spec = excluded.spec, run_mode = excluded.run_mode, enabled = excluded.enabled, \
             next_run = excluded.next_run",
        )
        .bind(&s.id)
        .bind(&s.connector_id)
        .bind(&s.kind)
        .bind(&s.spec)
        .bind(&s.mode)
        .bind(s.enabled)
        .bind(s.next_run_ms)
        .bind(s.created_at_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn schedules(&self) -> Result<Vec<ScheduleRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, connector_id, kind, spec, run_mode, enabled, next_run, created_at FROM schedules ORDER BY created_at, id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ScheduleRow {
                    id: r.try_get(0)?,
                    connector_id: r.try_get(1)?,
                    kind: r.try_get(2)?,
                    spec: r.try_get(3)?,
                    mode: r.try_get(4)?,
                    enabled: r.try_get(5)?,
                    next_run_ms: r.try_get(6)?,
                    created_at_ms: r.try_get(7)?,
                })
            })
            .collect()
    }

    async fn delete_schedule(&self, id: &str) -> Result<bool, StoreError> {
        Ok(sqlx::query("DELETE FROM schedules WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await?
            .rows_affected()
            > 0)
    }

    async fn set_schedule_next_run(
        &self,
        token: &FenceToken,
        id: &str,
        next_run_ms: i64,
    ) -> Result<(), StoreError> {
        let (_slot, mut tx) = self.begin_locked().await?;
        Self::check_fence(&mut tx, token).await?;
        Self::advance_schedule(&mut tx, id, next_run_ms).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn setting(&self, name: &str) -> Result<Option<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT value FROM settings WHERE name = ?")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn set_setting(&self, name: &str, value: &str) -> Result<(), StoreError> {
        sqlx::query(SET_SETTING)
            .bind(name)
            .bind(value)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn set_engine_setting(
        &self,
        token: &FenceToken,
        name: &str,
        value: &str,
    ) -> Result<(), StoreError> {
        let (_slot, mut tx) = self.begin_locked().await?;
        Self::check_fence(&mut tx, token).await?;
        sqlx::query(SET_SETTING)
            .bind(name)
            .bind(value)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn put_secret(&self, s: &SecretRow) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO secrets (ref, key_id, nonce, ciphertext, updated_at) VALUES (?, ?, ?, ?, ?) \
             ON CONFLICT (ref) DO UPDATE SET key_id = excluded.key_id, nonce = excluded.nonce, \
             ciphertext = excluded.ciphertext, updated_at = excluded.updated_at",
        )
        .bind(&s.name)
        .bind(&s.key_id)
        .bind(&s.nonce)
        .bind(&s.ciphertext)
        .bind(s.updated_at_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn secret(&self, name: &str) -> Result<Option<SecretRow>, StoreError> {
        sqlx::query("SELECT ref, key_id, nonce, ciphertext, updated_at FROM secrets WHERE ref = ?")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(secret_row)
            .transpose()
    }

    async fn secrets(&self) -> Result<Vec<SecretRow>, StoreError> {
        // Values stay in the database: this listing carries names, keys and times only.
        let rows = sqlx::query(
            "SELECT ref, key_id, X'' AS nonce, X'' AS ciphertext, updated_at FROM secrets ORDER BY ref",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(secret_row).collect()
    }

    async fn delete_secret(&self, name: &str) -> Result<bool, StoreError> {
        Ok(sqlx::query("DELETE FROM secrets WHERE ref = ?")
            .bind(name)
            .execute(&self.pool)
            .await?
            .rows_affected()
            > 0)
    }

    async fn start_run(
        &self,
        token: &FenceToken,
        run: &RunRow,
        advance: Option<&ScheduleAdvance>,
    ) -> Result<(), StoreError> {
        let (_slot, mut tx) = self.begin_locked().await?;
        Self::check_fence(&mut tx, token).await?;
        sqlx::query(
            "UPDATE runs SET status = 'abandoned', finished_at = ?, error = 'the instance running it lost the active role' \
             WHERE connector_id = ? AND status = 'running' AND epoch < ?",
        )
        .bind(run.started_at_ms)
        .bind(&run.connector_id)
        .bind(token.epoch)
        .execute(&mut *tx)
        .await?;
        let running: Option<String> = sqlx::query_scalar(
            "SELECT id FROM runs WHERE connector_id = ? AND status = 'running' LIMIT 1",
        )
        .bind(&run.connector_id)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(other) = running {
            return Err(StoreError::Conflict(format!(
                "connector {} is already running (run {other}); wait for it to finish",
                run.connector_id
            )));
        }
        let exists: Option<i64> = sqlx::query_scalar("SELECT 1 FROM connectors WHERE id = ?")
            .bind(&run.connector_id)
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Err(StoreError::Conflict(deleted_conflict(&run.connector_id)));
        }
        sqlx::query(
            "INSERT INTO runs (id, connector_id, instance, epoch, status, started_at, run_mode, trigger_kind) \
             VALUES (?, ?, ?, ?, 'running', ?, ?, ?)",
        )
        .bind(&run.id)
        .bind(&run.connector_id)
        .bind(&token.instance)
        .bind(token.epoch)
        .bind(run.started_at_ms)
        .bind(&run.mode)
        .bind(&run.trigger)
        .execute(&mut *tx)
        .await?;
        if let Some(a) = advance {
            Self::advance_schedule(&mut tx, &a.schedule_id, a.next_run_ms).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn finish_run(&self, run: &RunRow) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE runs SET status = ?, finished_at = ?, added = ?, updated = ?, unchanged = ?, deleted = ?, \
             failed = ?, error = ?, errors_json = ? WHERE id = ? AND status = 'running'",
        )
        .bind(&run.status)
        .bind(run.finished_at_ms)
        .bind(run.added)
        .bind(run.updated)
        .bind(run.unchanged)
        .bind(run.deleted)
        .bind(run.failed)
        .bind(&run.error)
        .bind(&run.errors_json)
        .bind(&run.id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn run(&self, id: &str) -> Result<Option<RunRow>, StoreError> {
        sqlx::query(&format!("{RUN_COLUMNS} WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(run_row)
            .transpose()
    }

    async fn runs(&self, connector: Option<&str>, limit: i64) -> Result<Vec<RunRow>, StoreError> {
        let rows = sqlx::query(&format!(
            "{RUN_COLUMNS} WHERE (? IS NULL OR connector_id = ?) ORDER BY started_at DESC, id LIMIT ?"
        ))
        .bind(connector)
        .bind(connector)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(run_row).collect()
    }

    async fn stored_objects(
        &self,
        connector: &str,
        anchors: &[String],
    ) -> Result<HashMap<String, StoredObject>, StoreError> {
        let mut out = HashMap::new();
        for chunk in anchors.chunks(ROWS_PER_STATEMENT) {
            let mut q = Builder::new(
                "SELECT anchor, object_type, attributes_json, deleted, seen_run FROM cs_objects WHERE connector_id = ",
            );
            q.push_bind(connector).push(" AND anchor IN ");
            push_in(&mut q, chunk.iter());
            for r in build_once(&mut q).fetch_all(&self.pool).await? {
                out.insert(r.try_get(0)?, stored_object(&r, 1)?);
            }
        }
        Ok(out)
    }

    async fn dirty_objects(
        &self,
        connector: &str,
        limit: i64,
    ) -> Result<Vec<DirtyObject>, StoreError> {
        let rows = sqlx::query(
            "SELECT anchor, object_type, attributes_json, deleted, rev FROM cs_objects \
             WHERE connector_id = ? AND dirty = 1 ORDER BY updated_at, anchor LIMIT ?",
        )
        .bind(connector)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(DirtyObject {
                    anchor: r.try_get(0)?,
                    object_type: r.try_get(1)?,
                    attributes_json: r.try_get(2)?,
                    deleted: r.try_get::<i64, _>(3)? != 0,
                    rev: r.try_get(4)?,
                })
            })
            .collect()
    }

    async fn mark_for_recompose(
        &self,
        token: &FenceToken,
        connector: &str,
        ruled_types: &[String],
    ) -> Result<u64, StoreError> {
        let ruled = json_list(ruled_types);
        let (_slot, mut tx) = self.begin_locked().await?;
        Self::check_fence(&mut tx, token).await?;
        let n = sqlx::query(
            "UPDATE cs_objects SET dirty = 1 WHERE connector_id = ?1 AND dirty = 0 \
             AND (object_type IN (SELECT value FROM json_each(?2)) \
             OR EXISTS (SELECT 1 FROM identity_links l WHERE l.connector_id = cs_objects.connector_id AND l.anchor = cs_objects.anchor))",
        )
        .bind(connector)
        .bind(&ruled)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        Self::journal_insert(&mut tx, "compose", token.epoch, &token.instance, now_ms()).await?;
        tx.commit().await?;
        Ok(n)
    }

    async fn settle_unruled(
        &self,
        token: &FenceToken,
        connector: &str,
        ruled_types: &[String],
        limit: i64,
    ) -> Result<u64, StoreError> {
        let ruled = json_list(ruled_types);
        let (_slot, mut tx) = self.begin_locked().await?;
        Self::check_fence(&mut tx, token).await?;
        // As `Composed` does: a deleted object goes, any other loses its mark.
        let mut n = 0;
        for head in [
            "DELETE FROM cs_objects WHERE rowid IN (SELECT o.rowid FROM cs_objects o WHERE o.deleted = 1 AND ",
            "UPDATE cs_objects SET dirty = 0 WHERE rowid IN (SELECT o.rowid FROM cs_objects o WHERE ",
        ] {
            n += sqlx::query(&format!(
                "{head}o.connector_id = ?1 AND o.dirty = 1 \
                 AND o.object_type NOT IN (SELECT value FROM json_each(?2)) \
                 AND NOT EXISTS (SELECT 1 FROM identity_links l WHERE l.connector_id = o.connector_id AND l.anchor = o.anchor) \
                 LIMIT ?3)"
            ))
            .bind(connector)
            .bind(&ruled)
            .bind(limit)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        Self::journal_insert(&mut tx, "compose", token.epoch, &token.instance, now_ms()).await?;
        tx.commit().await?;
        Ok(n)
    }

    async fn link(&self, connector: &str, anchor: &str) -> Result<Option<LinkRow>, StoreError> {
        sqlx::query(&format!(
            "{LINK_COLUMNS} WHERE connector_id = ? AND anchor = ?"
        ))
        .bind(connector)
        .bind(anchor)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(link_row)
        .transpose()
    }

    async fn links_of_identity(&self, identity_id: &str) -> Result<Vec<LinkRow>, StoreError> {
        let rows = sqlx::query(&format!(
            "{LINK_COLUMNS} WHERE identity_id = ? ORDER BY precedence, connector_id"
        ))
        .bind(identity_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(link_row).collect()
    }

    async fn identities_by_key(&self, attr: &str, value: &str) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT identity_id FROM identity_keys WHERE attr = ? AND value = ? ORDER BY identity_id LIMIT 16",
        )
        .bind(attr)
        .bind(value)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn identity(&self, id: &str) -> Result<Option<IdentityRow>, StoreError> {
        sqlx::query(&format!("{IDENTITY_COLUMNS} WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(identity_row)
            .transpose()
    }

    async fn links_for(
        &self,
        connector: &str,
        anchors: &[String],
    ) -> Result<Vec<LinkRow>, StoreError> {
        let mut out = Vec::new();
        for chunk in anchors.chunks(ROWS_PER_STATEMENT) {
            let mut q = Builder::new(format!("{LINK_COLUMNS} WHERE connector_id = "));
            q.push_bind(connector).push(" AND anchor IN ");
            push_in(&mut q, chunk);
            for r in build_once(&mut q).fetch_all(&self.pool).await? {
                out.push(link_row(&r)?);
            }
        }
        Ok(out)
    }

    async fn identities_by_keys(
        &self,
        keys: &[(String, String)],
    ) -> Result<Vec<(String, String, String)>, StoreError> {
        let mut out = Vec::new();
        for chunk in keys.chunks(ROWS_PER_STATEMENT) {
            let mut q =
                Builder::new("SELECT attr, value, identity_id FROM identity_keys WHERE rowid IN ");
            push_rowids_matching(
                &mut q,
                "identity_keys",
                &["attr", "value"],
                chunk,
                |r, (a, v)| {
                    r.push_bind(a);
                    r.push_bind(v);
                },
            );
            for r in build_once(&mut q).fetch_all(&self.pool).await? {
                out.push((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?));
            }
        }
        Ok(out)
    }

    async fn identities_with_links(
        &self,
        ids: &[String],
    ) -> Result<(Vec<IdentityRow>, Vec<LinkRow>), StoreError> {
        let (mut rows, mut links) = (Vec::new(), Vec::new());
        for chunk in ids.chunks(ROWS_PER_STATEMENT) {
            for (head, is_links) in [
                (format!("{IDENTITY_COLUMNS} WHERE id IN "), false),
                (format!("{LINK_COLUMNS} WHERE identity_id IN "), true),
            ] {
                let mut q = Builder::new(head);
                push_in(&mut q, chunk);
                for r in build_once(&mut q).fetch_all(&self.pool).await? {
                    if is_links {
                        links.push(link_row(&r)?);
                    } else {
                        rows.push(identity_row(&r)?);
                    }
                }
            }
        }
        Ok((rows, links))
    }

    async fn identities(
        &self,
        search: Option<&str>,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<IdentityRow>, StoreError> {
        let pattern = search.map(like_pattern);
        let rows = sqlx::query(&format!(
            "{IDENTITY_COLUMNS} WHERE (? IS NULL OR display_name LIKE ? ESCAPE '\\' OR id = ?) \
             AND (? IS NULL OR id > ?) ORDER BY id LIMIT ?"
        ))
        .bind(&pattern)
        .bind(&pattern)
        .bind(search)
        .bind(after)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(identity_row).collect()
    }

    async fn count_identities(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM identities")
            .fetch_one(&self.pool)
            .await?)
    }

    async fn connector_space(
        &self,
        connector: &str,
        search: Option<&str>,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<SpaceObjectRow>, StoreError> {
        let anchor_pattern = search.map(like_pattern);
        let json_pattern = search.map(|q| like_pattern(&json_escaped(q)));
        // The cursor is in the statement only when there is one: `?2 IS NULL OR anchor > ?2`
        // would read every row before it instead of seeking to it.
        let after_clause = if after.is_some() {
            "AND o.anchor > ?2"
        } else {
            ""
        };
        let rows = sqlx::query(&format!(
            "{SPACE_PAGE_HEAD} {after_clause} {SPACE_PAGE_TAIL}"
        ))
        .bind(connector)
        .bind(after)
        .bind(&anchor_pattern)
        .bind(&json_pattern)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(SpaceObjectRow {
                    anchor: r.try_get(0)?,
                    object_type: r.try_get(1)?,
                    dn: r.try_get(2)?,
                    deleted: r.try_get::<i64, _>(3)? != 0,
                    identity_id: r.try_get(4)?,
                })
            })
            .collect()
    }

    async fn connector_object(
        &self,
        connector: &str,
        anchor: &str,
    ) -> Result<Option<SpaceObject>, StoreError> {
        let row = sqlx::query(
            "SELECT o.anchor, o.object_type, o.attributes_json, o.deleted, o.dirty, o.seen_run, \
             o.updated_at, l.identity_id FROM cs_objects o LEFT JOIN identity_links l \
             ON l.connector_id = o.connector_id AND l.anchor = o.anchor \
             WHERE o.connector_id = ? AND o.anchor = ?",
        )
        .bind(connector)
        .bind(anchor)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(SpaceObject {
                anchor: r.try_get(0)?,
                object_type: r.try_get(1)?,
                attributes_json: r.try_get(2)?,
                deleted: r.try_get::<i64, _>(3)? != 0,
                pending: r.try_get::<i64, _>(4)? != 0,
                seen_run: r.try_get(5)?,
                updated_at_ms: r.try_get(6)?,
                identity_id: r.try_get(7)?,
            })
        })
        .transpose()
    }

    async fn commit_compose(
        &self,
        token: &FenceToken,
        writes: &[ComposeWrite],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let (_slot, mut tx) = self.begin_locked().await?;
        Self::check_fence(&mut tx, token).await?;
        Self::write_compose(&mut tx, writes).await?;
        Self::journal_insert(&mut tx, "compose", token.epoch, &token.instance, now_ms).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn prune(
        &self,
        token: &FenceToken,
        table: RetainedTable,
        before_ms: i64,
        limit: i64,
    ) -> Result<u64, StoreError> {
        let q = match table {
            RetainedTable::Runs => {
                "DELETE FROM runs WHERE rowid IN (SELECT rowid FROM runs \
                 WHERE finished_at < ? AND status <> 'running' ORDER BY finished_at LIMIT ?)"
            }
            RetainedTable::AuditLog => {
                "DELETE FROM audit_log WHERE rowid IN (SELECT rowid FROM \
                 audit_log WHERE at < ? ORDER BY at LIMIT ?)"
            }
            RetainedTable::ImportBatches => {
                "DELETE FROM import_batches WHERE rowid IN (SELECT \
                 rowid FROM import_batches WHERE committed_at < ? ORDER BY committed_at LIMIT ?)"
            }
            RetainedTable::FenceJournal => {
                "DELETE FROM fence_journal WHERE rowid IN (SELECT \
                 rowid FROM fence_journal WHERE at < ? ORDER BY at LIMIT ?)"
            }
        };
        let (_slot, mut tx) = self.begin_locked().await?;
        Self::check_fence(&mut tx, token).await?;
        let n = sqlx::query(q)
            .bind(before_ms)
            .bind(limit)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(n)
    }

    async fn append_audit(&self, e: &AuditEntry) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO audit_log (at, actor, action, target, detail) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(e.at_ms)
        .bind(&e.actor)
        .bind(&e.action)
        .bind(&e.target)
        .bind(&e.detail)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn audit(&self, f: &AuditFilter) -> Result<Vec<AuditEntry>, StoreError> {
        let (exact, prefix) = f.action_match();
        // The prefix compared as `=` compares (not LIKE, which ignores ASCII case here).
        let rows = sqlx::query(
            "SELECT at, actor, action, target, detail FROM audit_log \
             WHERE (?1 IS NULL OR actor = ?1) AND (?2 IS NULL OR action = ?2) \
             AND (?3 IS NULL OR substr(action, 1, length(?3)) = ?3) \
             AND (?4 IS NULL OR at >= ?4) AND (?5 IS NULL OR at < ?5) \
             ORDER BY seq DESC LIMIT ?6",
        )
        .bind(f.actor.as_deref())
        .bind(exact)
        .bind(prefix)
        .bind(f.since_ms)
        .bind(f.until_ms)
        .bind(f.limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AuditEntry {
                    at_ms: r.try_get(0)?,
                    actor: r.try_get(1)?,
                    action: r.try_get(2)?,
                    target: r.try_get(3)?,
                    detail: r.try_get(4)?,
                })
            })
            .collect()
    }

    async fn journal(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let rows = sqlx::query("SELECT kind, epoch FROM fence_journal ORDER BY seq")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }
}

/// `connector_space`: @1 connector, (@2 the cursor), @3 the anchor's LIKE pattern, @4 the
/// attributes JSON's, @5 the page size.
const SPACE_PAGE_HEAD: &str = "SELECT o.anchor, o.object_type, \
     CASE WHEN json_valid(o.attributes_json) THEN CASE WHEN json_type(o.attributes_json, '$.dn') = 'text' \
     THEN json_extract(o.attributes_json, '$.dn') END END, o.deleted, l.identity_id \
     FROM cs_objects o LEFT JOIN identity_links l \
     ON l.connector_id = o.connector_id AND l.anchor = o.anchor WHERE o.connector_id = ?1";
const SPACE_PAGE_TAIL: &str = "AND (?3 IS NULL OR o.anchor LIKE ?3 ESCAPE '\\' \
     OR o.attributes_json LIKE ?4 ESCAPE '\\') ORDER BY o.anchor LIMIT ?5";

/// A LIKE pattern (for `ESCAPE '\'`) matching `q` as a literal substring.
fn like_pattern(q: &str) -> String {
    let escaped = q
        .replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_");
    format!("%{escaped}%")
}

const RELAY_COLUMNS: &str = "SELECT id, name, created_at, revoked_at, last_seen, version, connected_instance, connected_since FROM relays";

const SET_SETTING: &str = "INSERT INTO settings (name, value) VALUES (?, ?) \
     ON CONFLICT (name) DO UPDATE SET value = excluded.value";

const FENCE_SELECT: &str = "SELECT epoch, holder, holder_incarnation FROM fence WHERE id = 1";

fn fence_row(r: &sqlx::sqlite::SqliteRow) -> Result<Fence, StoreError> {
    Ok(Fence {
        epoch: r.try_get(0)?,
        holder: r.try_get(1)?,
        holder_incarnation: r.try_get(2)?,
    })
}

fn relay_row(r: &sqlx::sqlite::SqliteRow) -> Result<RelayRow, StoreError> {
    Ok(RelayRow {
        id: r.try_get(0)?,
        name: r.try_get(1)?,
        created_at_ms: r.try_get(2)?,
        revoked_at_ms: r.try_get(3)?,
        last_seen_ms: r.try_get(4)?,
        version: r.try_get(5)?,
        connected_instance: r.try_get(6)?,
        connected_since_ms: r.try_get(7)?,
    })
}

const CONNECTOR_COLUMNS: &str = "SELECT id, name, kind, config_json, rules_json, relay_id, is_canary, created_at, updated_at FROM connectors";

fn connector_row(r: &sqlx::sqlite::SqliteRow) -> Result<ConnectorRow, StoreError> {
    Ok(ConnectorRow {
        id: r.try_get(0)?,
        name: r.try_get(1)?,
        kind: r.try_get(2)?,
        config_json: r.try_get(3)?,
        rules_json: r.try_get(4)?,
        relay_id: r.try_get(5)?,
        is_canary: r.try_get(6)?,
        created_at_ms: r.try_get(7)?,
        updated_at_ms: r.try_get(8)?,
    })
}

fn secret_row(r: &sqlx::sqlite::SqliteRow) -> Result<SecretRow, StoreError> {
    Ok(SecretRow {
        name: r.try_get(0)?,
        key_id: r.try_get(1)?,
        nonce: r.try_get(2)?,
        ciphertext: r.try_get(3)?,
        updated_at_ms: r.try_get(4)?,
    })
}

const RUN_COLUMNS: &str = "SELECT id, connector_id, instance, epoch, run_mode, trigger_kind, status, started_at, finished_at, added, updated, unchanged, deleted, failed, error, errors_json FROM runs";

fn run_row(r: &sqlx::sqlite::SqliteRow) -> Result<RunRow, StoreError> {
    Ok(RunRow {
        id: r.try_get(0)?,
        connector_id: r.try_get(1)?,
        instance: r.try_get(2)?,
        epoch: r.try_get(3)?,
        mode: r.try_get(4)?,
        trigger: r.try_get(5)?,
        status: r.try_get(6)?,
        started_at_ms: r.try_get(7)?,
        finished_at_ms: r.try_get(8)?,
        added: r.try_get(9)?,
        updated: r.try_get(10)?,
        unchanged: r.try_get(11)?,
        deleted: r.try_get(12)?,
        failed: r.try_get(13)?,
        error: r.try_get(14)?,
        errors_json: r.try_get(15)?,
    })
}

const LINK_COLUMNS: &str =
    "SELECT connector_id, anchor, identity_id, precedence, contribution_json FROM identity_links";

/// The stored object in the row's columns from `at`: object type, attributes, deleted, the
/// run that last saw it.
fn stored_object(r: &sqlx::sqlite::SqliteRow, at: usize) -> Result<StoredObject, StoreError> {
    Ok(StoredObject {
        object_type: r.try_get(at)?,
        attributes_json: r.try_get(at + 1)?,
        deleted: r.try_get::<i64, _>(at + 2)? != 0,
        seen_run: r.try_get(at + 3)?,
    })
}

fn link_row(r: &sqlx::sqlite::SqliteRow) -> Result<LinkRow, StoreError> {
    Ok(LinkRow {
        connector_id: r.try_get(0)?,
        anchor: r.try_get(1)?,
        identity_id: r.try_get(2)?,
        precedence: r.try_get(3)?,
        contribution_json: r.try_get(4)?,
    })
}

const IDENTITY_COLUMNS: &str =
    "SELECT id, display_name, attributes_json, created_at, updated_at FROM identities";

fn identity_row(r: &sqlx::sqlite::SqliteRow) -> Result<IdentityRow, StoreError> {
    Ok(IdentityRow {
        id: r.try_get(0)?,
        display_name: r.try_get(1)?,
        attributes_json: r.try_get(2)?,
        created_at_ms: r.try_get(3)?,
        updated_at_ms: r.try_get(4)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The batched statements find their rows through an index, not a scan of the table: a
    /// scan per statement made every composer chunk read the whole connector space.
    #[tokio::test]
    async fn batched_row_matches_use_an_index() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db")).await.unwrap();
        store.migrate().await.unwrap();
        let cases: [(&str, &str, &[&str]); 3] = [
            (
                "UPDATE cs_objects SET dirty = 0 WHERE rowid IN ",
                "cs_objects",
                &["connector_id", "anchor", "rev"],
            ),
            (
                "DELETE FROM identity_links WHERE rowid IN ",
                "identity_links",
                &["connector_id", "anchor"],
            ),
            (
                "SELECT attr, value, identity_id FROM identity_keys WHERE rowid IN ",
                "identity_keys",
                &["attr", "value"],
            ),
        ];
        for (head, table, cols) in cases {
            let mut q = Builder::new(format!("EXPLAIN QUERY PLAN {head}"));
            push_rowids_matching(&mut q, table, cols, 0..3, |r, i| {
                for _ in cols.iter() {
                    r.push_bind(i);
                }
            });
            let plan: Vec<String> = q
                .build()
                .fetch_all(&store.pool)
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<String, _>(3))
                .collect();
            assert!(
                plan.iter()
                    .any(|d| d.contains("USING") && d.contains("INDEX")),
                "{head}: {plan:?}"
            );
            assert!(
                !plan
                    .iter()
                    .any(|d| d == &format!("SCAN {table}") || d == "SCAN t"),
                "{head}: {plan:?}"
            );
        }
    }

    /// A connector-space page seeks to its cursor on the primary key and reads in its order:
    /// no scan from the connector's first object, no sort of the connector space.
    #[tokio::test]
    async fn connector_space_pages_seek_on_the_primary_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db")).await.unwrap();
        store.migrate().await.unwrap();
        for (after, seek) in [
            ("AND o.anchor > ?2", "(connector_id=? AND anchor>?)"),
            ("", "(connector_id=?)"),
        ] {
            let plan: Vec<String> = sqlx::query(&format!(
                "EXPLAIN QUERY PLAN {SPACE_PAGE_HEAD} {after} {SPACE_PAGE_TAIL}"
            ))
            .bind("c")
            .bind("a")
            .bind("%x%")
            .bind("%x%")
            .bind(10)
            .fetch_all(&store.pool)
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<String, _>(3))
            .collect();
            assert!(
                plan.iter()
                    .any(|d| d.starts_with("SEARCH o USING INDEX") && d.ends_with(seek)),
                "{after}: {plan:?}"
            );
            assert!(
                !plan.iter().any(|d| d.contains("TEMP B-TREE")),
                "{after}: {plan:?}"
            );
        }
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
