//! SQL Server store through tiberius (rustls), for production behind the runbook's AG listener.
//!
//! Fenced writes read the fence row `WITH (UPDLOCK, HOLDLOCK)` inside the transaction: a
//! promotion's UPDATE of that row must wait for the lock, so each fenced commit is ordered
//! entirely before or after any promotion. Every statement sent is a constant in [`sql`], so the
//! unit tests can parse all of them as T-SQL.

use std::sync::Mutex;

use async_trait::async_trait;
use tiberius::{Client, Config, Row};
use tokio::net::TcpStream;
use tokio_util::compat::{Compat, TokioAsyncWriteCompatExt};

use super::migrations::MSSQL;
use super::*;

type Conn = Client<Compat<TcpStream>>;

fn pending() -> StoreError {
    StoreError::Backend("SYNC-PORT-PENDING".into())
}

/// Every statement the SQL Server store sends.
pub mod sql {
    pub const BEGIN: &str = "BEGIN TRANSACTION";
    pub const COMMIT: &str = "COMMIT TRANSACTION";
    pub const ROLLBACK: &str = "ROLLBACK TRANSACTION";
    pub const MIGRATION_LOCK: &str = "EXEC sp_getapplock @Resource = N'identitymesh_schema', @LockMode = N'Exclusive', @LockOwner = N'Transaction', @LockTimeout = 60000";
    pub const MIGRATIONS_TABLE_EXISTS: &str =
        "SELECT COUNT(*) FROM sys.tables WHERE name = N'schema_migrations'";
    pub const CREATE_MIGRATIONS_TABLE: &str = "CREATE TABLE schema_migrations (version INT NOT NULL PRIMARY KEY, name NVARCHAR(256) NOT NULL, applied_at BIGINT NOT NULL)";
    pub const APPLIED_MIGRATIONS: &str = "SELECT version FROM schema_migrations";
    pub const RECORD_MIGRATION: &str =
        "INSERT INTO schema_migrations (version, name, applied_at) VALUES (@P1, @P2, @P3)";
    pub const PING: &str = "SELECT 1";
    pub const FENCE: &str = "SELECT epoch, holder FROM fence WHERE id = 1";
    pub const FENCE_LOCKED: &str =
        "SELECT epoch, holder FROM fence WITH (UPDLOCK, HOLDLOCK) WHERE id = 1";
    pub const SET_FENCE: &str =
        "UPDATE fence SET epoch = @P1, holder = @P2, updated_at = @P3 WHERE id = 1";
    pub const FENCE_OTHER_ACTIVES: &str =
        "UPDATE engine_instances SET role = N'fenced' WHERE role = N'active' AND instance <> @P1";
    pub const JOURNAL: &str =
        "INSERT INTO fence_journal (kind, epoch, instance, at) VALUES (@P1, @P2, @P3, @P4)";
    pub const READ_JOURNAL: &str = "SELECT kind, epoch FROM fence_journal ORDER BY seq";
    pub const UPDATE_INSTANCE: &str = "UPDATE engine_instances SET host = @P2, role = @P3, epoch = @P4, version = @P5, started_at = @P6, last_heartbeat = @P7 WHERE instance = @P1";
    pub const INSERT_INSTANCE: &str = "INSERT INTO engine_instances (instance, host, role, epoch, version, started_at, last_heartbeat) VALUES (@P1, @P2, @P3, @P4, @P5, @P6, @P7)";
    pub const INSTANCES: &str = "SELECT instance, host, role, epoch, version, started_at, last_heartbeat FROM engine_instances WHERE last_heartbeat >= @P1 ORDER BY instance";
    pub const UPDATE_ENGINE_STATE: &str =
        "UPDATE engine_state SET holder = @P1, epoch = @P2, last_tick = @P3 WHERE id = 1";
    pub const INSERT_ENGINE_STATE: &str =
        "INSERT INTO engine_state (id, holder, epoch, last_tick) VALUES (1, @P1, @P2, @P3)";
    pub const UPDATE_OBJECT: &str = "UPDATE cs_objects SET object_type = @P3, attributes_json = @P4, updated_at = @P5 WHERE connector_id = @P1 AND anchor = @P2";
    pub const INSERT_OBJECT: &str = "INSERT INTO cs_objects (connector_id, anchor, object_type, attributes_json, updated_at) VALUES (@P1, @P2, @P3, @P4, @P5)";
    pub const UPDATE_WATERMARK: &str = "UPDATE watermarks SET value = @P3, updated_at = @P4 WHERE connector_id = @P1 AND object_type = @P2";
    pub const INSERT_WATERMARK: &str = "INSERT INTO watermarks (connector_id, object_type, value, updated_at) VALUES (@P1, @P2, @P3, @P4)";
    pub const INSERT_BATCH: &str = "INSERT INTO import_batches (connector_id, object_type, object_count, watermark, epoch, instance, committed_at) VALUES (@P1, @P2, @P3, @P4, @P5, @P6, @P7); SELECT CAST(SCOPE_IDENTITY() AS BIGINT)";
    pub const WATERMARK: &str =
        "SELECT value FROM watermarks WHERE connector_id = @P1 AND object_type = @P2";
    pub const COUNT_OBJECTS: &str = "SELECT COUNT_BIG(*) FROM cs_objects WHERE connector_id = @P1";
    pub const COUNT_BATCHES: &str =
        "SELECT COUNT_BIG(*) FROM import_batches WHERE connector_id = @P1";
    pub const UPDATE_TOKEN: &str = "UPDATE api_tokens SET token_hash = @P2 WHERE name = @P1";
    pub const INSERT_TOKEN: &str =
        "INSERT INTO api_tokens (name, token_hash, created_at) VALUES (@P1, @P2, @P3)";
    pub const TOKEN: &str = "SELECT token_hash FROM api_tokens WHERE name = @P1";
    pub const INSERT_AUDIT: &str =
        "INSERT INTO audit_log (at, actor, action, target, detail) VALUES (@P1, @P2, @P3, @P4, @P5)";
    pub const AUDIT: &str =
        "SELECT TOP (@P1) at, actor, action, target, detail FROM audit_log ORDER BY seq DESC";

    pub const INSERT_RELAY: &str =
        "INSERT INTO relays (id, name, token_hash, created_at) VALUES (@P1, @P2, @P3, @P4)";
    pub const RELAY_BY_HASH: &str = "SELECT id, name, created_at, revoked_at, last_seen, version, connected_instance, connected_since FROM relays WHERE token_hash = @P1";
    pub const RELAYS: &str = "SELECT id, name, created_at, revoked_at, last_seen, version, connected_instance, connected_since FROM relays ORDER BY name";
    pub const REVOKE_RELAY: &str = "UPDATE relays SET revoked_at = COALESCE(revoked_at, @P2), connected_instance = NULL, connected_since = NULL WHERE id = @P1";
    pub const RELAY_CONNECTED: &str = "UPDATE relays SET connected_instance = @P2, connected_since = @P4, last_seen = @P4, version = @P3 WHERE id = @P1";
    pub const RELAY_SEEN: &str = "UPDATE relays SET last_seen = @P2 WHERE id = @P1";
    pub const RELAY_DISCONNECTED: &str = "UPDATE relays SET connected_instance = NULL, connected_since = NULL, last_seen = @P3 WHERE id = @P1 AND connected_instance = @P2";

    /// All of the above, for the syntax test.
    pub const ALL: &[&str] = &[
        INSERT_RELAY,
        RELAY_BY_HASH,
        RELAYS,
        REVOKE_RELAY,
        RELAY_CONNECTED,
        RELAY_SEEN,
        RELAY_DISCONNECTED,
        BEGIN,
        COMMIT,
        ROLLBACK,
        MIGRATION_LOCK,
        MIGRATIONS_TABLE_EXISTS,
        CREATE_MIGRATIONS_TABLE,
        APPLIED_MIGRATIONS,
        RECORD_MIGRATION,
        PING,
        FENCE,
        FENCE_LOCKED,
        SET_FENCE,
        FENCE_OTHER_ACTIVES,
        JOURNAL,
        READ_JOURNAL,
        UPDATE_INSTANCE,
        INSERT_INSTANCE,
        INSTANCES,
        UPDATE_ENGINE_STATE,
        INSERT_ENGINE_STATE,
        UPDATE_OBJECT,
        INSERT_OBJECT,
        UPDATE_WATERMARK,
        INSERT_WATERMARK,
        INSERT_BATCH,
        WATERMARK,
        COUNT_OBJECTS,
        COUNT_BATCHES,
        UPDATE_TOKEN,
        INSERT_TOKEN,
        TOKEN,
        INSERT_AUDIT,
        AUDIT,
    ];
}

fn backend_err(e: tiberius::error::Error) -> StoreError {
    match e {
        tiberius::error::Error::Io { .. } | tiberius::error::Error::Routing { .. } => {
            StoreError::Unavailable(e.to_string())
        }
        other => StoreError::Backend(other.to_string()),
    }
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
        Client::connect(self.config.clone(), tcp.compat_write())
            .await
            .map_err(backend_err)
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

    async fn rows(
        conn: &mut Conn,
        q: &str,
        params: &[&dyn tiberius::ToSql],
    ) -> Result<Vec<Row>, StoreError> {
        conn.query(q, params)
            .await
            .map_err(backend_err)?
            .into_first_result()
            .await
            .map_err(backend_err)
    }

    async fn exec(
        conn: &mut Conn,
        q: &str,
        params: &[&dyn tiberius::ToSql],
    ) -> Result<u64, StoreError> {
        Ok(conn.execute(q, params).await.map_err(backend_err)?.total())
    }

    /// UPDATE, then INSERT when no row matched; only called inside a transaction holding the fence lock.
    async fn upsert(
        conn: &mut Conn,
        update: &str,
        insert: &str,
        params: &[&dyn tiberius::ToSql],
    ) -> Result<(), StoreError> {
        if Self::exec(conn, update, params).await? == 0 {
            Self::exec(conn, insert, params).await?;
        }
        Ok(())
    }

    async fn fence_locked(conn: &mut Conn) -> Result<Fence, StoreError> {
        let rows = Self::rows(conn, sql::FENCE_LOCKED, &[]).await?;
        fence_from(rows.first())
    }

    async fn check_fence(conn: &mut Conn, token: &FenceToken) -> Result<(), StoreError> {
        let fence = Self::fence_locked(conn).await?;
        if fence.epoch != token.epoch || fence.holder != token.instance {
            return Err(StoreError::Fenced {
                stored: fence.epoch,
                holder: fence.holder,
                own: token.epoch,
            });
        }
        Ok(())
    }

    async fn read<T>(
        &self,
        q: &str,
        params: &[&dyn tiberius::ToSql],
        map: impl Fn(&Row) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        let mut conn = self.take().await?;
        let rows = Self::rows(&mut conn, q, params).await?;
        self.give(conn);
        rows.iter().map(map).collect()
    }
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

fn relay_row(r: &Row) -> Result<RelayRow, StoreError> {
    Ok(RelayRow {
        id: text(r, 0)?,
        name: text(r, 1)?,
        created_at_ms: col(r, 2)?,
        revoked_at_ms: opt(r, 3)?,
        last_seen_ms: opt(r, 4)?,
        version: opt::<&str>(r, 5)?.map(str::to_string),
        connected_instance: opt::<&str>(r, 6)?.map(str::to_string),
        connected_since_ms: opt(r, 7)?,
    })
}

fn fence_from(row: Option<&Row>) -> Result<Fence, StoreError> {
    let row = row.ok_or_else(|| StoreError::Backend("the fence row is missing".into()))?;
    Ok(Fence {
        epoch: col(row, 0)?,
        holder: text(row, 1)?,
    })
}

#[async_trait]
impl Store for MssqlStore {
    fn backend(&self) -> &'static str {
        "sqlserver"
    }

    async fn migrate(&self) -> Result<Vec<u32>, StoreError> {
        let mut conn = self.begin().await?;
        let r = async {
            Self::exec(&mut conn, sql::MIGRATION_LOCK, &[]).await?;
            let exists: i32 = col(
                Self::rows(&mut conn, sql::MIGRATIONS_TABLE_EXISTS, &[])
                    .await?
                    .first()
                    .ok_or_else(|| StoreError::Migration("no result from sys.tables".into()))?,
                0,
            )?;
            if exists == 0 {
                Self::exec(&mut conn, sql::CREATE_MIGRATIONS_TABLE, &[]).await?;
            }
            let applied: Vec<i32> = Self::rows(&mut conn, sql::APPLIED_MIGRATIONS, &[])
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
                    Self::exec(&mut conn, stmt, &[]).await.map_err(|e| {
                        StoreError::Migration(format!("version {} ({}): {e}", m.version, m.name))
                    })?;
                }
                Self::exec(
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
        let mut conn = self.take().await?;
        let rows = Self::rows(&mut conn, sql::FENCE, &[]).await?;
        self.give(conn);
        fence_from(rows.first())
    }

    async fn promote(&self, instance: &str, epoch: i64) -> Result<PromoteOutcome, StoreError> {
        let mut conn = self.begin().await?;
        let r = async {
            let fence = Self::fence_locked(&mut conn).await?;
            if epoch == fence.epoch && fence.holder == instance {
                return Ok(PromoteOutcome::AlreadyHeld);
            }
            if epoch <= fence.epoch {
                return Err(StoreError::StaleEpoch {
                    requested: epoch,
                    stored: fence.epoch,
                    holder: fence.holder,
                });
            }
            let now = now_ms();
            Self::exec(&mut conn, sql::SET_FENCE, &[&epoch, &instance, &now]).await?;
            Self::exec(&mut conn, sql::FENCE_OTHER_ACTIVES, &[&instance]).await?;
            Self::exec(
                &mut conn,
                sql::JOURNAL,
                &[&"promote", &epoch, &instance, &now],
            )
            .await?;
            Ok(PromoteOutcome::Promoted)
        }
        .await;
        self.finish(conn, r).await
    }

    async fn heartbeat(&self, hb: &Heartbeat) -> Result<(), StoreError> {
        let mut conn = self.begin().await?;
        let r = async {
            let fence = Self::fence_locked(&mut conn).await?;
            let stale =
                hb.role == Role::Active && (fence.epoch != hb.epoch || fence.holder != hb.instance);
            let role = if stale { Role::Fenced } else { hb.role };
            Self::upsert(
                &mut conn,
                sql::UPDATE_INSTANCE,
                sql::INSERT_INSTANCE,
                &[
                    &hb.instance.as_str(),
                    &hb.host.as_str(),
                    &role.as_str(),
                    &hb.epoch,
                    &hb.version.as_str(),
                    &hb.started_at_ms,
                    &hb.now_ms,
                ],
            )
            .await?;
            Ok((stale, fence))
        }
        .await;
        let (stale, fence) = self.finish(conn, r).await?;
        if stale {
            return Err(StoreError::Fenced {
                stored: fence.epoch,
                holder: fence.holder,
                own: hb.epoch,
            });
        }
        Ok(())
    }

    async fn instances(&self, alive_since_ms: i64) -> Result<Vec<InstanceRow>, StoreError> {
        self.read(sql::INSTANCES, &[&alive_since_ms], |r| {
            Ok(InstanceRow {
                instance: text(r, 0)?,
                host: text(r, 1)?,
                role: Role::parse(&text(r, 2)?),
                epoch: col(r, 3)?,
                version: text(r, 4)?,
                started_at_ms: col(r, 5)?,
                last_heartbeat_ms: col(r, 6)?,
            })
        })
        .await
    }

    async fn engine_tick(&self, token: &FenceToken, now_ms: i64) -> Result<(), StoreError> {
        let mut conn = self.begin().await?;
        let r = async {
            Self::check_fence(&mut conn, token).await?;
            Self::upsert(
                &mut conn,
                sql::UPDATE_ENGINE_STATE,
                sql::INSERT_ENGINE_STATE,
                &[&token.instance.as_str(), &token.epoch, &now_ms],
            )
            .await
        }
        .await;
        self.finish(conn, r).await
    }

    async fn commit_import_batch(
        &self,
        token: &FenceToken,
        batch: &ImportBatch,
        now_ms: i64,
    ) -> Result<BatchOutcome, StoreError> {
        let mut conn = self.begin().await?;
        let r = async {
            Self::check_fence(&mut conn, token).await?;
            for o in &batch.objects {
                Self::upsert(
                    &mut conn,
                    sql::UPDATE_OBJECT,
                    sql::INSERT_OBJECT,
                    &[
                        &batch.connector.as_str(),
                        &o.anchor.as_str(),
                        &o.object_type.as_str(),
                        &o.attributes_json.as_str(),
                        &now_ms,
                    ],
                )
                .await?;
            }
            if let Some(w) = &batch.watermark {
                Self::upsert(
                    &mut conn,
                    sql::UPDATE_WATERMARK,
                    sql::INSERT_WATERMARK,
                    &[
                        &batch.connector.as_str(),
                        &batch.object_type.as_str(),
                        &w.as_str(),
                        &now_ms,
                    ],
                )
                .await?;
            }
            let rows = Self::rows(
                &mut conn,
                sql::INSERT_BATCH,
                &[
                    &batch.connector.as_str(),
                    &batch.object_type.as_str(),
                    &(batch.objects.len() as i32),
                    &batch.watermark.as_deref(),
                    &token.epoch,
                    &token.instance.as_str(),
                    &now_ms,
                ],
            )
            .await?;
            let seq: i64 = col(
                rows.first()
                    .ok_or_else(|| StoreError::Backend("no batch sequence returned".into()))?,
                0,
            )?;
            Self::exec(
                &mut conn,
                sql::JOURNAL,
                &[&"batch", &token.epoch, &token.instance.as_str(), &now_ms],
            )
            .await?;
            Ok(BatchOutcome {
                seq: seq as u64,
                added: batch.objects.len() as u64,
                ..Default::default()
            })
        }
        .await;
        self.finish(conn, r).await
    }

    async fn watermark(
        &self,
        connector: &str,
        object_type: &str,
    ) -> Result<Option<String>, StoreError> {
        Ok(self
            .read(sql::WATERMARK, &[&connector, &object_type], |r| text(r, 0))
            .await?
            .into_iter()
            .next())
    }

    async fn count_objects(&self, connector: &str) -> Result<i64, StoreError> {
        let v = self
            .read(sql::COUNT_OBJECTS, &[&connector], |r| col(r, 0))
            .await?;
        Ok(v.into_iter().next().unwrap_or(0))
    }

    async fn count_batches(&self, connector: &str) -> Result<i64, StoreError> {
        let v = self
            .read(sql::COUNT_BATCHES, &[&connector], |r| col(r, 0))
            .await?;
        Ok(v.into_iter().next().unwrap_or(0))
    }

    async fn set_token_hash(&self, name: &str, hash: &str, now_ms: i64) -> Result<(), StoreError> {
        let mut conn = self.begin().await?;
        let r = async {
            if Self::exec(&mut conn, sql::UPDATE_TOKEN, &[&name, &hash]).await? == 0 {
                Self::exec(&mut conn, sql::INSERT_TOKEN, &[&name, &hash, &now_ms]).await?;
            }
            Ok(())
        }
        .await;
        self.finish(conn, r).await
    }

    async fn token_hash(&self, name: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .read(sql::TOKEN, &[&name], |r| text(r, 0))
            .await?
            .into_iter()
            .next())
    }

    async fn create_relay(
        &self,
        id: &str,
        name: &str,
        token_hash: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let mut conn = self.take().await?;
        let r = Self::exec(
            &mut conn,
            sql::INSERT_RELAY,
            &[&id, &name, &token_hash, &now_ms],
        )
        .await;
        self.give(conn);
        match r {
            // 2627/2601: unique constraint or index violation.
            Err(StoreError::Backend(m))
                if m.contains("2627") || m.contains("2601") || m.contains("UNIQUE") =>
            {
                Err(StoreError::Conflict(format!(
                    "a relay named `{name}` already exists; pick another name or revoke it first"
                )))
            }
            other => other.map(|_| ()),
        }
    }

    async fn relay_by_token_hash(&self, token_hash: &str) -> Result<Option<RelayRow>, StoreError> {
        Ok(self
            .read(sql::RELAY_BY_HASH, &[&token_hash], relay_row)
            .await?
            .into_iter()
            .next())
    }

    async fn revoke_relay(&self, id: &str, now_ms: i64) -> Result<bool, StoreError> {
        let mut conn = self.take().await?;
        let n = Self::exec(&mut conn, sql::REVOKE_RELAY, &[&id, &now_ms]).await?;
        self.give(conn);
        Ok(n > 0)
    }

    async fn relay_connected(
        &self,
        id: &str,
        instance: &str,
        version: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let mut conn = self.take().await?;
        Self::exec(
            &mut conn,
            sql::RELAY_CONNECTED,
            &[&id, &instance, &version, &now_ms],
        )
        .await?;
        self.give(conn);
        Ok(())
    }

    async fn relay_seen(&self, id: &str, now_ms: i64) -> Result<(), StoreError> {
        let mut conn = self.take().await?;
        Self::exec(&mut conn, sql::RELAY_SEEN, &[&id, &now_ms]).await?;
        self.give(conn);
        Ok(())
    }

    async fn relay_disconnected(
        &self,
        id: &str,
        instance: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let mut conn = self.take().await?;
        Self::exec(
            &mut conn,
            sql::RELAY_DISCONNECTED,
            &[&id, &instance, &now_ms],
        )
        .await?;
        self.give(conn);
        Ok(())
    }

    async fn relays(&self) -> Result<Vec<RelayRow>, StoreError> {
        self.read(sql::RELAYS, &[], relay_row).await
    }

    // SYNC-PORT-PENDING: replaced by the SQL Server port of the sync-engine methods.
    async fn finish_full_import(
        &self,
        _t: &FenceToken,
        _c: &str,
        _o: &str,
        _r: &str,
        _n: i64,
    ) -> Result<u64, StoreError> {
        Err(pending())
    }
    async fn put_connector(&self, _c: &ConnectorRow) -> Result<(), StoreError> {
        Err(pending())
    }
    async fn connector(&self, _id: &str) -> Result<Option<ConnectorRow>, StoreError> {
        Err(pending())
    }
    async fn connectors(&self) -> Result<Vec<ConnectorRow>, StoreError> {
        Err(pending())
    }
    async fn delete_connector(&self, _id: &str) -> Result<bool, StoreError> {
        Err(pending())
    }
    async fn put_schedule(&self, _s: &ScheduleRow) -> Result<(), StoreError> {
        Err(pending())
    }
    async fn schedules(&self) -> Result<Vec<ScheduleRow>, StoreError> {
        Err(pending())
    }
    async fn delete_schedule(&self, _id: &str) -> Result<bool, StoreError> {
        Err(pending())
    }
    async fn set_schedule_next_run(&self, _id: &str, _n: i64) -> Result<(), StoreError> {
        Err(pending())
    }
    async fn setting(&self, _n: &str) -> Result<Option<String>, StoreError> {
        Err(pending())
    }
    async fn set_setting(&self, _n: &str, _v: &str) -> Result<(), StoreError> {
        Err(pending())
    }
    async fn put_secret(&self, _s: &SecretRow) -> Result<(), StoreError> {
        Err(pending())
    }
    async fn secret(&self, _n: &str) -> Result<Option<SecretRow>, StoreError> {
        Err(pending())
    }
    async fn secrets(&self) -> Result<Vec<SecretRow>, StoreError> {
        Err(pending())
    }
    async fn delete_secret(&self, _n: &str) -> Result<bool, StoreError> {
        Err(pending())
    }
    async fn start_run(&self, _t: &FenceToken, _r: &RunRow) -> Result<(), StoreError> {
        Err(pending())
    }
    async fn finish_run(&self, _r: &RunRow) -> Result<(), StoreError> {
        Err(pending())
    }
    async fn run(&self, _id: &str) -> Result<Option<RunRow>, StoreError> {
        Err(pending())
    }
    async fn runs(&self, _c: Option<&str>, _l: i64) -> Result<Vec<RunRow>, StoreError> {
        Err(pending())
    }
    async fn dirty_objects(&self, _c: &str, _l: i64) -> Result<Vec<DirtyObject>, StoreError> {
        Err(pending())
    }
    async fn link(&self, _c: &str, _a: &str) -> Result<Option<LinkRow>, StoreError> {
        Err(pending())
    }
    async fn links_of_identity(&self, _i: &str) -> Result<Vec<LinkRow>, StoreError> {
        Err(pending())
    }
    async fn identities_by_key(&self, _a: &str, _v: &str) -> Result<Vec<String>, StoreError> {
        Err(pending())
    }
    async fn identity(&self, _id: &str) -> Result<Option<IdentityRow>, StoreError> {
        Err(pending())
    }
    async fn identities(
        &self,
        _s: Option<&str>,
        _a: Option<&str>,
        _l: i64,
    ) -> Result<Vec<IdentityRow>, StoreError> {
        Err(pending())
    }
    async fn count_identities(&self) -> Result<i64, StoreError> {
        Err(pending())
    }
    async fn commit_compose(
        &self,
        _t: &FenceToken,
        _w: &[ComposeWrite],
        _n: i64,
    ) -> Result<(), StoreError> {
        Err(pending())
    }

    async fn append_audit(&self, e: &AuditEntry) -> Result<(), StoreError> {
        let mut conn = self.take().await?;
        Self::exec(
            &mut conn,
            sql::INSERT_AUDIT,
            &[
                &e.at_ms,
                &e.actor.as_str(),
                &e.action.as_str(),
                &e.target.as_str(),
                &e.detail.as_str(),
            ],
        )
        .await?;
        self.give(conn);
        Ok(())
    }

    async fn audit(&self, limit: i64) -> Result<Vec<AuditEntry>, StoreError> {
        self.read(sql::AUDIT, &[&limit], |r| {
            Ok(AuditEntry {
                at_ms: col(r, 0)?,
                actor: text(r, 1)?,
                action: text(r, 2)?,
                target: text(r, 3)?,
                detail: text(r, 4)?,
            })
        })
        .await
    }

    async fn journal(&self) -> Result<Vec<(String, i64)>, StoreError> {
        self.read(sql::READ_JOURNAL, &[], |r| Ok((text(r, 0)?, col(r, 1)?)))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlparser::dialect::MsSqlDialect;
    use sqlparser::parser::Parser;

    fn parse(stmt: &str) {
        if let Err(e) = Parser::parse_sql(&MsSqlDialect {}, stmt) {
            panic!("T-SQL does not parse: {e}\n{stmt}");
        }
    }

    #[test]
    fn every_statement_parses_as_tsql() {
        for stmt in sql::ALL {
            parse(stmt);
        }
    }

    #[test]
    fn every_migration_parses_as_tsql() {
        for m in MSSQL {
            for stmt in m.statements {
                parse(stmt);
            }
        }
    }

    #[test]
    fn the_parser_catches_typos() {
        // Guard against a parser that accepts anything: these must fail.
        for bad in [
            "SELEC epoch FROM fence",
            "UPDATE fence SET epoch = WHERE id = 1",
            "INSERT INTO fence (id VALUES (1)",
        ] {
            assert!(Parser::parse_sql(&MsSqlDialect {}, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn fenced_reads_take_update_locks() {
        assert!(sql::FENCE_LOCKED.contains("WITH (UPDLOCK, HOLDLOCK)"));
    }

    #[test]
    fn bad_ado_string_is_a_clear_error() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let e = rt
            .block_on(MssqlStore::connect(
                "Server=tcp:127.0.0.1,notaport;Database=x;",
            ))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(!e.is_empty());
    }
}
