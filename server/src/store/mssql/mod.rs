//! SQL Server store through tiberius (rustls), for production behind the runbook's AG listener.
//!
//! Fenced writes read the fence row `WITH (UPDLOCK, HOLDLOCK)` inside the transaction: a
//! promotion's UPDATE of that row must wait for the lock, so each fenced commit is ordered
//! entirely before or after any promotion. Every statement sent is a constant in [`sql`] or a
//! multi-row [`multi::Shape`], so the unit tests can parse all of them as T-SQL. The import and
//! compose paths send a few multi-row statements per page or chunk, not one per object: each
//! statement is a round trip, and to an availability-group listener those trips, not the
//! statements, bound the import rate.
//!
//! This file holds the connection pool, the request helpers and the thin `impl Store`: each
//! method calls the function of the same name in the file of its domain, the same files as
//! the SQLite backend's (`store/sqlite/`), for comparing the two:
//!
//! - `fence.rs`: the fence row (read under its update lock, promote, the check of every
//!   fenced write), the fence journal and the engine's liveness tick;
//! - `registry.rs`: instance heartbeats and the registry they show;
//! - `relays.rs`: relay agents;
//! - `connectors.rs`: the administrative data: connectors, schedules, settings, secrets and
//!   the bootstrap admin token's hash;
//! - `runs.rs`: runs and the import side: import batches, watermarks, the connector space;
//! - `identities.rs`: the composer's side: pending objects, recompose marks, identities,
//!   join keys, links and the compose commit;
//! - `audit.rs`: the audit log and retention's pruning;
//! - `sql.rs` and `multi.rs`: every statement sent, single- and multi-row;
//! - `tests.rs`: the T-SQL parse tests and the scripted connection the round-trip tests use.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use tiberius::{Client, Config, Row, ToSql};
use tokio::net::TcpStream;
use tokio_util::compat::{Compat, TokioAsyncWriteCompatExt};

use super::migrations::MSSQL;
use super::*;

mod audit;
mod connectors;
mod fence;
mod identities;
pub mod multi;
mod registry;
mod relays;
mod runs;
pub mod sql;
#[cfg(test)]
mod tests;

type Conn = Client<Compat<TcpStream>>;

/// The statements that send `items` in `shape`, each carrying as many rows as one statement
/// may: the text and its parameters (the shared ones, then each item's, which `row` appends).
fn chunked<'a, T>(
    shape: &multi::Shape,
    shared: &[&'a dyn ToSql],
    items: &'a [T],
    row: impl Fn(&'a T, &mut Vec<&'a dyn ToSql>),
) -> Vec<(String, Vec<&'a dyn ToSql>)> {
    items
        .chunks(shape.max_rows())
        .map(|chunk| {
            let mut params = Vec::with_capacity(shape.params(chunk.len()));
            params.extend_from_slice(shared);
            for item in chunk {
                row(item, &mut params);
            }
            debug_assert_eq!(params.len(), shape.params(chunk.len()), "{}", shape.name);
            (shape.sql(chunk.len()), params)
        })
        .collect()
}

/// One request to the server and its answer. The transaction bodies of the batched paths send
/// through it, so a test can count and read their round trips without a server.
#[async_trait]
trait Wire: Send {
    /// Every result set of the request, in order.
    async fn fetch(&mut self, q: &str, params: &[&dyn ToSql]) -> Result<Vec<Vec<Row>>, StoreError>;
    /// The rows the request's statements affected, summed.
    async fn run(&mut self, q: &str, params: &[&dyn ToSql]) -> Result<u64, StoreError>;
}

#[async_trait]
impl Wire for Conn {
    async fn fetch(&mut self, q: &str, params: &[&dyn ToSql]) -> Result<Vec<Vec<Row>>, StoreError> {
        self.query(q, params)
            .await
            .map_err(backend_err)?
            .into_results()
            .await
            .map_err(backend_err)
    }

    async fn run(&mut self, q: &str, params: &[&dyn ToSql]) -> Result<u64, StoreError> {
        Ok(self.execute(q, params).await.map_err(backend_err)?.total())
    }
}

/// How long any statement waits for a lock (`SET LOCK_TIMEOUT` on every session). Without a
/// bound, a promotion waits behind a hung or cut-off active's fenced transaction for as long
/// as SQL Server keeps that session (until TCP keep-alive ends it); with it, the promotion
/// fails with a retryable error and the operator tries again.
pub const LOCK_WAIT_MS: u64 = 10_000;

/// SQL Server's "lock request time out period exceeded".
const LOCK_TIMEOUT_ERROR: u32 = 1222;

fn backend_err(e: tiberius::error::Error) -> StoreError {
    match e {
        tiberius::error::Error::Io { .. } | tiberius::error::Error::Routing { .. } => {
            StoreError::Unavailable(e.to_string())
        }
        tiberius::error::Error::Server(t) if t.code() == LOCK_TIMEOUT_ERROR => {
            StoreError::Unavailable(lock_wait_exceeded())
        }
        other => StoreError::Backend(other.to_string()),
    }
}

fn lock_wait_exceeded() -> String {
    format!(
        "waited {} s for a database lock another transaction holds (a hung or cut-off \
         instance's, until SQL Server ends its session); retry",
        LOCK_WAIT_MS / 1000
    )
}

/// `sp_getapplock`'s return value: 0 or 1 granted; -1 timeout, -2 cancelled, -3 deadlock
/// victim, -999 a parameter or call error.
fn applock_granted(code: i32) -> Result<(), StoreError> {
    if code >= 0 {
        return Ok(());
    }
    let why = match code {
        -1 => "timed out after 60 s (another instance is migrating; start again)",
        -2 => "was cancelled",
        -3 => "was chosen as a deadlock victim (start again)",
        _ => "failed (a call or parameter error)",
    };
    Err(StoreError::Migration(format!(
        "the schema migration lock (sp_getapplock, result {code}) {why}"
    )))
}

pub struct MssqlStore {
    config: Config,
    /// Idle connections; a connection is taken for a whole transaction and returned after it.
    idle: Mutex<Vec<Conn>>,
}

impl MssqlStore {
    pub async fn connect(connection_string: &str) -> Result<Self, StoreError> {
        let config = Config::from_ado_string(connection_string).map_err(|e| {
            StoreError::Config(format!(
                "{e}; expected the ADO.NET form used for ConnectionStrings:IdentityMesh"
            ))
        })?;
        let store = Self {
            config,
            idle: Mutex::new(Vec::new()),
        };
        // Fail at start, with the server's own message, when the database cannot be reached.
        let conn = store.take().await?;
        store.give(conn);
        Ok(store)
    }

    async fn take(&self) -> Result<Conn, StoreError> {
        if let Some(c) = self.idle.lock().map_err(|_| poisoned())?.pop() {
            return Ok(c);
        }
        let tcp = TcpStream::connect(self.config.get_addr())
            .await
            .map_err(|e| StoreError::Unavailable(format!("{}: {e}", self.config.get_addr())))?;
        tcp.set_nodelay(true)
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let mut conn = Client::connect(self.config.clone(), tcp.compat_write())
            .await
            .map_err(backend_err)?;
        conn.simple_query(sql::SESSION_SETUP)
            .await
            .map_err(backend_err)?;
        Ok(conn)
    }

    fn give(&self, conn: Conn) {
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < 8 {
                idle.push(conn);
            }
        }
    }

    /// Ends a transaction: commit on success, roll back on error. A connection whose rollback
    /// fails is dropped rather than reused in an unknown state.
    async fn finish<T>(
        &self,
        mut conn: Conn,
        result: Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        match result {
            Ok(v) => {
                conn.simple_query(sql::COMMIT).await.map_err(backend_err)?;
                self.give(conn);
                Ok(v)
            }
            Err(e) => {
                if conn.simple_query(sql::ROLLBACK).await.is_ok() {
                    self.give(conn);
                }
                Err(e)
            }
        }
    }

    async fn begin(&self) -> Result<Conn, StoreError> {
        let mut conn = self.take().await?;
        conn.simple_query(sql::BEGIN).await.map_err(backend_err)?;
        Ok(conn)
    }

    /// Gives a read's connection back to the pool once the read succeeded.
    fn kept<T>(&self, conn: Conn, r: Result<T, StoreError>) -> Result<T, StoreError> {
        if r.is_ok() {
            self.give(conn);
        }
        r
    }

    async fn read<T>(
        &self,
        q: &str,
        params: &[&dyn ToSql],
        map: impl Fn(&Row) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        let mut conn = self.take().await?;
        let rows = rows(&mut conn, q, params).await?;
        self.give(conn);
        rows.iter().map(map).collect()
    }
}

/// The request's first result set.
async fn rows(w: &mut dyn Wire, q: &str, params: &[&dyn ToSql]) -> Result<Vec<Row>, StoreError> {
    Ok(w.fetch(q, params)
        .await?
        .into_iter()
        .next()
        .unwrap_or_default())
}

async fn exec(w: &mut dyn Wire, q: &str, params: &[&dyn ToSql]) -> Result<u64, StoreError> {
    w.run(q, params).await
}

/// UPDATE, then INSERT when no row matched; only called inside a transaction holding the
/// fence lock, or with an UPDATE that takes a key-range lock (`WITH (UPDLOCK, SERIALIZABLE)`).
async fn upsert(
    w: &mut dyn Wire,
    update: &str,
    insert: &str,
    params: &[&dyn ToSql],
) -> Result<(), StoreError> {
    if exec(w, update, params).await? == 0 {
        exec(w, insert, params).await?;
    }
    Ok(())
}

fn poisoned() -> StoreError {
    StoreError::Backend("connection pool lock poisoned".into())
}

fn col<'a, T: tiberius::FromSql<'a>>(row: &'a Row, i: usize) -> Result<T, StoreError> {
    row.try_get::<T, _>(i)
        .map_err(backend_err)?
        .ok_or_else(|| StoreError::Backend(format!("unexpected NULL in column {i}")))
}

fn text(row: &Row, i: usize) -> Result<String, StoreError> {
    col::<&str>(row, i).map(str::to_string)
}

fn opt<'a, T: tiberius::FromSql<'a>>(row: &'a Row, i: usize) -> Result<Option<T>, StoreError> {
    row.try_get::<T, _>(i).map_err(backend_err)
}

/// SQL Server error 2627 (unique constraint) or 2601 (unique index), as tiberius reports them.
fn is_unique_violation(e: &StoreError) -> bool {
    matches!(e, StoreError::Backend(m) if m.contains("(code: 2627,") || m.contains("(code: 2601,"))
}

/// A LIKE pattern matching `q` as a literal substring: `\`, `%`, `_` and T-SQL's `[` are
/// escaped with the backslash the statement names in `ESCAPE '\'`.
fn like_pattern(q: &str) -> String {
    format!("%{}", like_prefix(q))
}

/// A LIKE pattern matching what starts with `q`, escaped as [`like_pattern`]'s.
fn like_prefix(q: &str) -> String {
    let mut p = String::with_capacity(q.len() + 2);
    for ch in q.chars() {
        if matches!(ch, '\\' | '%' | '_' | '[') {
            p.push('\\');
        }
        p.push(ch);
    }
    p.push('%');
    p
}

#[async_trait]
impl Store for MssqlStore {
    fn backend(&self) -> &'static str {
        "sqlserver"
    }

    async fn migrate(&self) -> Result<Vec<u32>, StoreError> {
        let mut conn = self.begin().await?;
        let r = async {
            let granted: i32 = col(
                rows(&mut conn, sql::MIGRATION_LOCK, &[])
                    .await?
                    .first()
                    .ok_or_else(|| StoreError::Migration("no result from sp_getapplock".into()))?,
                0,
            )?;
            applock_granted(granted)?;
            let exists: i32 = col(
                rows(&mut conn, sql::MIGRATIONS_TABLE_EXISTS, &[])
                    .await?
                    .first()
                    .ok_or_else(|| StoreError::Migration("no result from sys.tables".into()))?,
                0,
            )?;
            if exists == 0 {
                exec(&mut conn, sql::CREATE_MIGRATIONS_TABLE, &[]).await?;
            }
            let applied: Vec<i32> = rows(&mut conn, sql::APPLIED_MIGRATIONS, &[])
                .await?
                .iter()
                .map(|r| col(r, 0))
                .collect::<Result<_, _>>()?;
            let mut done = Vec::new();
            for m in MSSQL
                .iter()
                .filter(|m| !applied.contains(&(m.version as i32)))
            {
                for stmt in m.statements {
                    exec(&mut conn, stmt, &[]).await.map_err(|e| {
                        StoreError::Migration(format!("version {} ({}): {e}", m.version, m.name))
                    })?;
                }
                exec(
                    &mut conn,
                    sql::RECORD_MIGRATION,
                    &[&(m.version as i32), &m.name, &now_ms()],
                )
                .await?;
                done.push(m.version);
            }
            Ok(done)
        }
        .await;
        self.finish(conn, r).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.read(sql::PING, &[], |_| Ok(())).await.map(|_| ())
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
