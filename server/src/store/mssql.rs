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
    pub const OLD_OBJECT: &str = "SELECT object_type, attributes_json, deleted FROM cs_objects WHERE connector_id = @P1 AND anchor = @P2";
    /// A changed object: marked for the composer at a new revision, undeleted if it was gone.
    /// @P7: the batch's `compose`; without it only a linked object is marked (see ImportBatch).
    pub const UPDATE_OBJECT: &str = "UPDATE cs_objects SET object_type = @P3, attributes_json = @P4, updated_at = @P5, dirty = CASE WHEN @P7 = 1 OR EXISTS (SELECT 1 FROM identity_links l WHERE l.connector_id = @P1 AND l.anchor = @P2) THEN 1 ELSE 0 END, deleted = 0, seen_run = COALESCE(@P6, seen_run), rev = rev + 1 WHERE connector_id = @P1 AND anchor = @P2";
    /// A new object has no link (links go with their object's tombstone): marked as @P7 says.
    pub const INSERT_OBJECT: &str = "INSERT INTO cs_objects (connector_id, anchor, object_type, attributes_json, updated_at, dirty, deleted, seen_run, rev) VALUES (@P1, @P2, @P3, @P4, @P5, @P7, 0, @P6, 1)";
    /// An unchanged object seen by a full import: only the run that saw it is recorded.
    pub const SEEN_OBJECT: &str =
        "UPDATE cs_objects SET seen_run = @P3 WHERE connector_id = @P1 AND anchor = @P2";
    pub const MARK_UNSEEN_DELETED: &str = "UPDATE cs_objects SET deleted = 1, dirty = 1, rev = rev + 1, updated_at = @P1 WHERE connector_id = @P2 AND object_type = @P3 AND deleted = 0 AND (seen_run IS NULL OR seen_run <> @P4)";
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

    // Administrative upserts take a key-range lock in the UPDATE (UPDLOCK, SERIALIZABLE), so a
    // concurrent upsert of the same key waits instead of racing to a duplicate INSERT.
    pub const UPDATE_CONNECTOR: &str = "UPDATE connectors WITH (UPDLOCK, SERIALIZABLE) SET name = @P2, kind = @P3, config_json = @P4, rules_json = @P5, relay_id = @P6, is_canary = @P7, updated_at = @P9 WHERE id = @P1";
    pub const INSERT_CONNECTOR: &str = "INSERT INTO connectors (id, name, kind, config_json, rules_json, relay_id, is_canary, created_at, updated_at) VALUES (@P1, @P2, @P3, @P4, @P5, @P6, @P7, @P8, @P9)";
    pub const CONNECTOR: &str = "SELECT id, name, kind, config_json, rules_json, relay_id, is_canary, created_at, updated_at FROM connectors WHERE id = @P1";
    pub const CONNECTORS: &str = "SELECT id, name, kind, config_json, rules_json, relay_id, is_canary, created_at, updated_at FROM connectors ORDER BY name";
    pub const CONNECTOR_OBJECTS: &str =
        "SELECT COUNT_BIG(*) FROM cs_objects WHERE connector_id = @P1";
    pub const DELETE_CONNECTOR_SCHEDULES: &str = "DELETE FROM schedules WHERE connector_id = @P1";
    pub const DELETE_CONNECTOR_WATERMARKS: &str = "DELETE FROM watermarks WHERE connector_id = @P1";
    pub const DELETE_CONNECTOR: &str = "DELETE FROM connectors WHERE id = @P1";

    pub const UPDATE_SCHEDULE: &str = "UPDATE schedules WITH (UPDLOCK, SERIALIZABLE) SET connector_id = @P2, kind = @P3, spec = @P4, run_mode = @P5, enabled = @P6, next_run = @P7 WHERE id = @P1";
    pub const INSERT_SCHEDULE: &str = "INSERT INTO schedules (id, connector_id, kind, spec, run_mode, enabled, next_run, created_at) VALUES (@P1, @P2, @P3, @P4, @P5, @P6, @P7, @P8)";
    pub const SCHEDULES: &str = "SELECT id, connector_id, kind, spec, run_mode, enabled, next_run, created_at FROM schedules ORDER BY created_at, id";
    pub const DELETE_SCHEDULE: &str = "DELETE FROM schedules WHERE id = @P1";
    pub const SET_SCHEDULE_NEXT_RUN: &str = "UPDATE schedules SET next_run = @P2 WHERE id = @P1";

    pub const SETTING: &str = "SELECT value FROM settings WHERE name = @P1";
    pub const UPDATE_SETTING: &str =
        "UPDATE settings WITH (UPDLOCK, SERIALIZABLE) SET value = @P2 WHERE name = @P1";
    pub const INSERT_SETTING: &str = "INSERT INTO settings (name, value) VALUES (@P1, @P2)";

    pub const UPDATE_SECRET: &str = "UPDATE secrets WITH (UPDLOCK, SERIALIZABLE) SET key_id = @P2, nonce = @P3, ciphertext = @P4, updated_at = @P5 WHERE ref = @P1";
    pub const INSERT_SECRET: &str = "INSERT INTO secrets (ref, key_id, nonce, ciphertext, updated_at) VALUES (@P1, @P2, @P3, @P4, @P5)";
    pub const SECRET: &str =
        "SELECT ref, key_id, nonce, ciphertext, updated_at FROM secrets WHERE ref = @P1";
    /// Values stay in the database: the listing carries names, key ids and times only.
    pub const SECRETS: &str = "SELECT ref, key_id, updated_at FROM secrets ORDER BY ref";
    pub const DELETE_SECRET: &str = "DELETE FROM secrets WHERE ref = @P1";

    pub const ABANDON_OLD_RUNS: &str = "UPDATE runs SET status = N'abandoned', finished_at = @P1, error = N'the instance running it lost the active role' WHERE connector_id = @P2 AND status = N'running' AND epoch < @P3";
    pub const RUNNING_RUN: &str =
        "SELECT TOP (1) id FROM runs WHERE connector_id = @P1 AND status = N'running'";
    pub const INSERT_RUN: &str = "INSERT INTO runs (id, connector_id, instance, epoch, status, started_at, run_mode, trigger_kind) VALUES (@P1, @P2, @P3, @P4, N'running', @P5, @P6, @P7)";
    pub const FINISH_RUN: &str = "UPDATE runs SET status = @P2, finished_at = @P3, added = @P4, updated = @P5, unchanged = @P6, deleted = @P7, failed = @P8, error = @P9, errors_json = @P10 WHERE id = @P1 AND status = N'running'";
    pub const RUN: &str = "SELECT id, connector_id, instance, epoch, run_mode, trigger_kind, status, started_at, finished_at, added, updated, unchanged, deleted, failed, error, errors_json FROM runs WHERE id = @P1";
    pub const RUNS: &str = "SELECT TOP (@P2) id, connector_id, instance, epoch, run_mode, trigger_kind, status, started_at, finished_at, added, updated, unchanged, deleted, failed, error, errors_json FROM runs WHERE (@P1 IS NULL OR connector_id = @P1) ORDER BY started_at DESC, id";

    pub const DIRTY_OBJECTS: &str = "SELECT TOP (@P2) anchor, object_type, attributes_json, deleted, rev FROM cs_objects WHERE connector_id = @P1 AND dirty = 1 ORDER BY updated_at, anchor";
    /// @P1 connector, @P2 the ruled object types as a JSON array.
    pub const MARK_FOR_RECOMPOSE: &str = "UPDATE cs_objects SET dirty = 1 WHERE connector_id = @P1 AND dirty = 0 AND (object_type IN (SELECT value FROM OPENJSON(@P2)) OR EXISTS (SELECT 1 FROM identity_links l WHERE l.connector_id = cs_objects.connector_id AND l.anchor = cs_objects.anchor))";
    /// @P1 connector, @P2 the ruled object types as a JSON array, @P3 the limit.
    pub const DROP_UNRULED_TOMBSTONES: &str = "DELETE FROM cs_objects WHERE connector_id = @P1 AND anchor IN (SELECT TOP (@P3) o.anchor FROM cs_objects o WHERE o.connector_id = @P1 AND o.dirty = 1 AND o.deleted = 1 AND o.object_type NOT IN (SELECT value FROM OPENJSON(@P2)) AND NOT EXISTS (SELECT 1 FROM identity_links l WHERE l.connector_id = o.connector_id AND l.anchor = o.anchor))";
    /// As DROP_UNRULED_TOMBSTONES, for the objects that remain.
    pub const SETTLE_UNRULED: &str = "UPDATE cs_objects SET dirty = 0 WHERE connector_id = @P1 AND anchor IN (SELECT TOP (@P3) o.anchor FROM cs_objects o WHERE o.connector_id = @P1 AND o.dirty = 1 AND o.object_type NOT IN (SELECT value FROM OPENJSON(@P2)) AND NOT EXISTS (SELECT 1 FROM identity_links l WHERE l.connector_id = o.connector_id AND l.anchor = o.anchor))";
    pub const LINK: &str = "SELECT connector_id, anchor, identity_id, precedence, contribution_json FROM identity_links WHERE connector_id = @P1 AND anchor = @P2";
    pub const LINKS_OF_IDENTITY: &str = "SELECT connector_id, anchor, identity_id, precedence, contribution_json FROM identity_links WHERE identity_id = @P1 ORDER BY precedence, connector_id";
    pub const IDENTITIES_BY_KEY: &str = "SELECT TOP (16) identity_id FROM identity_keys WHERE attr = @P1 AND value = @P2 ORDER BY identity_id";
    pub const IDENTITY: &str = "SELECT id, display_name, attributes_json, created_at, updated_at FROM identities WHERE id = @P1";
    /// @P1: the LIKE pattern (escaped with `\`), @P2: the search as an exact id, @P3: the
    /// keyset cursor, @P4: the page size. LOWER on both sides keeps the match case-insensitive
    /// under a case-sensitive collation too.
    pub const IDENTITIES: &str = "SELECT TOP (@P4) id, display_name, attributes_json, created_at, updated_at FROM identities WHERE (@P1 IS NULL OR LOWER(display_name) LIKE LOWER(@P1) ESCAPE '\\' OR id = @P2) AND (@P3 IS NULL OR id > @P3) ORDER BY id";
    pub const COUNT_IDENTITIES: &str = "SELECT COUNT_BIG(*) FROM identities";

    pub const UPDATE_IDENTITY: &str = "UPDATE identities SET display_name = @P2, attributes_json = @P3, updated_at = @P5 WHERE id = @P1";
    pub const INSERT_IDENTITY: &str = "INSERT INTO identities (id, display_name, attributes_json, created_at, updated_at) VALUES (@P1, @P2, @P3, @P4, @P5)";
    pub const DELETE_IDENTITY_KEYS: &str = "DELETE FROM identity_keys WHERE identity_id = @P1";
    pub const INSERT_IDENTITY_KEY: &str = "INSERT INTO identity_keys (attr, value, identity_id) SELECT @P1, @P2, @P3 WHERE NOT EXISTS (SELECT 1 FROM identity_keys WHERE attr = @P1 AND value = @P2 AND identity_id = @P3)";
    pub const DELETE_IDENTITY: &str = "DELETE FROM identities WHERE id = @P1";
    pub const UPDATE_LINK: &str = "UPDATE identity_links SET identity_id = @P3, precedence = @P4, contribution_json = @P5 WHERE connector_id = @P1 AND anchor = @P2";
    pub const INSERT_LINK: &str = "INSERT INTO identity_links (connector_id, anchor, identity_id, precedence, contribution_json) VALUES (@P1, @P2, @P3, @P4, @P5)";
    pub const DELETE_LINK: &str =
        "DELETE FROM identity_links WHERE connector_id = @P1 AND anchor = @P2";
    pub const DROP_COMPOSED_TOMBSTONE: &str = "DELETE FROM cs_objects WHERE connector_id = @P1 AND anchor = @P2 AND rev = @P3 AND deleted = 1";
    pub const CLEAR_DIRTY: &str =
        "UPDATE cs_objects SET dirty = 0 WHERE connector_id = @P1 AND anchor = @P2 AND rev = @P3";

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
        OLD_OBJECT,
        UPDATE_OBJECT,
        INSERT_OBJECT,
        SEEN_OBJECT,
        MARK_UNSEEN_DELETED,
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
        UPDATE_CONNECTOR,
        INSERT_CONNECTOR,
        CONNECTOR,
        CONNECTORS,
        CONNECTOR_OBJECTS,
        DELETE_CONNECTOR_SCHEDULES,
        DELETE_CONNECTOR_WATERMARKS,
        DELETE_CONNECTOR,
        UPDATE_SCHEDULE,
        INSERT_SCHEDULE,
        SCHEDULES,
        DELETE_SCHEDULE,
        SET_SCHEDULE_NEXT_RUN,
        SETTING,
        UPDATE_SETTING,
        INSERT_SETTING,
        UPDATE_SECRET,
        INSERT_SECRET,
        SECRET,
        SECRETS,
        DELETE_SECRET,
        ABANDON_OLD_RUNS,
        RUNNING_RUN,
        INSERT_RUN,
        FINISH_RUN,
        RUN,
        RUNS,
        DIRTY_OBJECTS,
        MARK_FOR_RECOMPOSE,
        DROP_UNRULED_TOMBSTONES,
        SETTLE_UNRULED,
        LINK,
        LINKS_OF_IDENTITY,
        IDENTITIES_BY_KEY,
        IDENTITY,
        IDENTITIES,
        COUNT_IDENTITIES,
        UPDATE_IDENTITY,
        INSERT_IDENTITY,
        DELETE_IDENTITY_KEYS,
        INSERT_IDENTITY_KEY,
        DELETE_IDENTITY,
        UPDATE_LINK,
        INSERT_LINK,
        DELETE_LINK,
        DROP_COMPOSED_TOMBSTONE,
        CLEAR_DIRTY,
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

    /// Appends to the ordered journal of fenced commits, inside the commit's transaction.
    async fn journal(
        conn: &mut Conn,
        kind: &str,
        epoch: i64,
        instance: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        Self::exec(conn, sql::JOURNAL, &[&kind, &epoch, &instance, &now_ms]).await?;
        Ok(())
    }

    async fn exec(
        conn: &mut Conn,
        q: &str,
        params: &[&dyn tiberius::ToSql],
    ) -> Result<u64, StoreError> {
        Ok(conn.execute(q, params).await.map_err(backend_err)?.total())
    }

    /// UPDATE, then INSERT when no row matched; only called inside a transaction holding the
    /// fence lock, or with an UPDATE that takes a key-range lock (`WITH (UPDLOCK, SERIALIZABLE)`).
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

    /// One write of a compose batch; the caller holds the fence lock.
    async fn compose_write(conn: &mut Conn, w: &ComposeWrite) -> Result<(), StoreError> {
        match w {
            ComposeWrite::PutIdentity { identity: i, keys } => {
                Self::upsert(
                    conn,
                    sql::UPDATE_IDENTITY,
                    sql::INSERT_IDENTITY,
                    &[
                        &i.id.as_str(),
                        &i.display_name.as_str(),
                        &i.attributes_json.as_str(),
                        &i.created_at_ms,
                        &i.updated_at_ms,
                    ],
                )
                .await?;
                Self::exec(conn, sql::DELETE_IDENTITY_KEYS, &[&i.id.as_str()]).await?;
                for (attr, value) in keys {
                    Self::exec(
                        conn,
                        sql::INSERT_IDENTITY_KEY,
                        &[&attr.as_str(), &value.as_str(), &i.id.as_str()],
                    )
                    .await?;
                }
            }
            ComposeWrite::DeleteIdentity { id } => {
                Self::exec(conn, sql::DELETE_IDENTITY_KEYS, &[&id.as_str()]).await?;
                Self::exec(conn, sql::DELETE_IDENTITY, &[&id.as_str()]).await?;
            }
            ComposeWrite::PutLink(l) => {
                Self::upsert(
                    conn,
                    sql::UPDATE_LINK,
                    sql::INSERT_LINK,
                    &[
                        &l.connector_id.as_str(),
                        &l.anchor.as_str(),
                        &l.identity_id.as_str(),
                        &l.precedence,
                        &l.contribution_json.as_str(),
                    ],
                )
                .await?;
            }
            ComposeWrite::DeleteLink {
                connector_id,
                anchor,
            } => {
                Self::exec(
                    conn,
                    sql::DELETE_LINK,
                    &[&connector_id.as_str(), &anchor.as_str()],
                )
                .await?;
            }
            ComposeWrite::Composed {
                connector_id,
                anchor,
                rev,
            } => {
                let params: [&dyn tiberius::ToSql; 3] =
                    [&connector_id.as_str(), &anchor.as_str(), rev];
                Self::exec(conn, sql::DROP_COMPOSED_TOMBSTONE, &params).await?;
                Self::exec(conn, sql::CLEAR_DIRTY, &params).await?;
            }
            ComposeWrite::Audit(e) => {
                Self::exec(
                    conn,
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
            }
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

/// SQL Server error 2627 (unique constraint) or 2601 (unique index), as tiberius reports them.
fn is_unique_violation(e: &StoreError) -> bool {
    matches!(e, StoreError::Backend(m) if m.contains("(code: 2627,") || m.contains("(code: 2601,"))
}

/// A LIKE pattern matching `q` as a literal substring: `\`, `%`, `_` and T-SQL's `[` are
/// escaped with the backslash the statement names in `ESCAPE '\'`.
fn like_pattern(q: &str) -> String {
    let mut p = String::with_capacity(q.len() + 2);
    p.push('%');
    for ch in q.chars() {
        if matches!(ch, '\\' | '%' | '_' | '[') {
            p.push('\\');
        }
        p.push(ch);
    }
    p.push('%');
    p
}

fn connector_row(r: &Row) -> Result<ConnectorRow, StoreError> {
    Ok(ConnectorRow {
        id: text(r, 0)?,
        name: text(r, 1)?,
        kind: text(r, 2)?,
        config_json: text(r, 3)?,
        rules_json: text(r, 4)?,
        relay_id: opt::<&str>(r, 5)?.map(str::to_string),
        is_canary: col(r, 6)?,
        created_at_ms: col(r, 7)?,
        updated_at_ms: col(r, 8)?,
    })
}

/// The counters are INT columns, read as i32.
fn run_row(r: &Row) -> Result<RunRow, StoreError> {
    Ok(RunRow {
        id: text(r, 0)?,
        connector_id: text(r, 1)?,
        instance: text(r, 2)?,
        epoch: col(r, 3)?,
        mode: text(r, 4)?,
        trigger: text(r, 5)?,
        status: text(r, 6)?,
        started_at_ms: col(r, 7)?,
        finished_at_ms: opt(r, 8)?,
        added: col::<i32>(r, 9)?.into(),
        updated: col::<i32>(r, 10)?.into(),
        unchanged: col::<i32>(r, 11)?.into(),
        deleted: col::<i32>(r, 12)?.into(),
        failed: col::<i32>(r, 13)?.into(),
        error: opt::<&str>(r, 14)?.map(str::to_string),
        errors_json: opt::<&str>(r, 15)?.map(str::to_string),
    })
}

fn link_row(r: &Row) -> Result<LinkRow, StoreError> {
    Ok(LinkRow {
        connector_id: text(r, 0)?,
        anchor: text(r, 1)?,
        identity_id: text(r, 2)?,
        precedence: col::<i32>(r, 3)?.into(),
        contribution_json: text(r, 4)?,
    })
}

fn identity_row(r: &Row) -> Result<IdentityRow, StoreError> {
    Ok(IdentityRow {
        id: text(r, 0)?,
        display_name: text(r, 1)?,
        attributes_json: text(r, 2)?,
        created_at_ms: col(r, 3)?,
        updated_at_ms: col(r, 4)?,
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
            Self::journal(&mut conn, "promote", epoch, instance, now).await?;
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
            let mut out = BatchOutcome::default();
            for o in &batch.objects {
                let old = Self::rows(
                    &mut conn,
                    sql::OLD_OBJECT,
                    &[&batch.connector.as_str(), &o.anchor.as_str()],
                )
                .await?;
                let params: [&dyn tiberius::ToSql; 7] = [
                    &batch.connector.as_str(),
                    &o.anchor.as_str(),
                    &o.object_type.as_str(),
                    &o.attributes_json.as_str(),
                    &now_ms,
                    &batch.seen_in_run.as_deref(),
                    &batch.compose,
                ];
                let Some(old) = old.first() else {
                    Self::exec(&mut conn, sql::INSERT_OBJECT, &params).await?;
                    out.added += 1;
                    continue;
                };
                let changed = col::<&str>(old, 0)? != o.object_type
                    || col::<&str>(old, 1)? != o.attributes_json
                    || col::<bool>(old, 2)?;
                if changed {
                    Self::exec(&mut conn, sql::UPDATE_OBJECT, &params).await?;
                    out.updated += 1;
                } else {
                    if let Some(run) = &batch.seen_in_run {
                        Self::exec(
                            &mut conn,
                            sql::SEEN_OBJECT,
                            &[&batch.connector.as_str(), &o.anchor.as_str(), &run.as_str()],
                        )
                        .await?;
                    }
                    out.unchanged += 1;
                }
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
            Self::journal(&mut conn, "batch", token.epoch, &token.instance, now_ms).await?;
            out.seq = seq as u64;
            Ok(out)
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

    async fn finish_full_import(
        &self,
        token: &FenceToken,
        connector: &str,
        object_type: &str,
        run_id: &str,
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        let mut conn = self.begin().await?;
        let r = async {
            Self::check_fence(&mut conn, token).await?;
            let n = Self::exec(
                &mut conn,
                sql::MARK_UNSEEN_DELETED,
                &[&now_ms, &connector, &object_type, &run_id],
            )
            .await?;
            Self::journal(
                &mut conn,
                "full_import_end",
                token.epoch,
                &token.instance,
                now_ms,
            )
            .await?;
            Ok(n)
        }
        .await;
        self.finish(conn, r).await
    }

    async fn put_connector(&self, c: &ConnectorRow) -> Result<(), StoreError> {
        let mut conn = self.begin().await?;
        let r = Self::upsert(
            &mut conn,
            sql::UPDATE_CONNECTOR,
            sql::INSERT_CONNECTOR,
            &[
                &c.id.as_str(),
                &c.name.as_str(),
                &c.kind.as_str(),
                &c.config_json.as_str(),
                &c.rules_json.as_str(),
                &c.relay_id.as_deref(),
                &c.is_canary,
                &c.created_at_ms,
                &c.updated_at_ms,
            ],
        )
        .await;
        match self.finish(conn, r).await {
            Err(e) if is_unique_violation(&e) => Err(StoreError::Conflict(format!(
                "a connector named {:?} already exists; pick another name",
                c.name
            ))),
            other => other,
        }
    }

    async fn connector(&self, id: &str) -> Result<Option<ConnectorRow>, StoreError> {
        Ok(self
            .read(sql::CONNECTOR, &[&id], connector_row)
            .await?
            .into_iter()
            .next())
    }

    async fn connectors(&self) -> Result<Vec<ConnectorRow>, StoreError> {
        self.read(sql::CONNECTORS, &[], connector_row).await
    }

    async fn delete_connector(&self, id: &str) -> Result<bool, StoreError> {
        let mut conn = self.begin().await?;
        let r = async {
            // Every write of the connector space is fenced: holding the fence row's lock (as
            // SQLite's write lock does) keeps the count true until this transaction ends.
            Self::fence_locked(&mut conn).await?;
            let objects: i64 = match Self::rows(&mut conn, sql::CONNECTOR_OBJECTS, &[&id])
                .await?
                .first()
            {
                Some(r) => col(r, 0)?,
                None => 0,
            };
            if objects > 0 {
                return Err(StoreError::Conflict(format!(
                    "connector {id} still has {objects} objects in its connector space; clear it first \
                     (POST /api/connectors/{id}/clear) so its identity contributions are removed"
                )));
            }
            Self::exec(&mut conn, sql::DELETE_CONNECTOR_SCHEDULES, &[&id]).await?;
            Self::exec(&mut conn, sql::DELETE_CONNECTOR_WATERMARKS, &[&id]).await?;
            Self::exec(&mut conn, sql::DELETE_CONNECTOR, &[&id]).await
        }
        .await;
        Ok(self.finish(conn, r).await? > 0)
    }

    async fn put_schedule(&self, s: &ScheduleRow) -> Result<(), StoreError> {
        let mut conn = self.begin().await?;
        let r = Self::upsert(
            &mut conn,
            sql::UPDATE_SCHEDULE,
            sql::INSERT_SCHEDULE,
            &[
                &s.id.as_str(),
                &s.connector_id.as_str(),
                &s.kind.as_str(),
                &s.spec.as_str(),
                &s.mode.as_str(),
                &s.enabled,
                &s.next_run_ms,
                &s.created_at_ms,
            ],
        )
        .await;
        self.finish(conn, r).await
    }

    async fn schedules(&self) -> Result<Vec<ScheduleRow>, StoreError> {
        self.read(sql::SCHEDULES, &[], |r| {
            Ok(ScheduleRow {
                id: text(r, 0)?,
                connector_id: text(r, 1)?,
                kind: text(r, 2)?,
                spec: text(r, 3)?,
                mode: text(r, 4)?,
                enabled: col(r, 5)?,
                next_run_ms: opt(r, 6)?,
                created_at_ms: col(r, 7)?,
            })
        })
        .await
    }

    async fn delete_schedule(&self, id: &str) -> Result<bool, StoreError> {
        let mut conn = self.take().await?;
        let n = Self::exec(&mut conn, sql::DELETE_SCHEDULE, &[&id]).await?;
        self.give(conn);
        Ok(n > 0)
    }

    async fn set_schedule_next_run(&self, id: &str, next_run_ms: i64) -> Result<(), StoreError> {
        let mut conn = self.take().await?;
        Self::exec(&mut conn, sql::SET_SCHEDULE_NEXT_RUN, &[&id, &next_run_ms]).await?;
        self.give(conn);
        Ok(())
    }

    async fn setting(&self, name: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .read(sql::SETTING, &[&name], |r| text(r, 0))
            .await?
            .into_iter()
            .next())
    }

    async fn set_setting(&self, name: &str, value: &str) -> Result<(), StoreError> {
        let mut conn = self.begin().await?;
        let r = Self::upsert(
            &mut conn,
            sql::UPDATE_SETTING,
            sql::INSERT_SETTING,
            &[&name, &value],
        )
        .await;
        self.finish(conn, r).await
    }

    async fn put_secret(&self, s: &SecretRow) -> Result<(), StoreError> {
        let mut conn = self.begin().await?;
        let r = Self::upsert(
            &mut conn,
            sql::UPDATE_SECRET,
            sql::INSERT_SECRET,
            &[
                &s.name.as_str(),
                &s.key_id.as_str(),
                &s.nonce.as_slice(),
                &s.ciphertext.as_slice(),
                &s.updated_at_ms,
            ],
        )
        .await;
        self.finish(conn, r).await
    }

    async fn secret(&self, name: &str) -> Result<Option<SecretRow>, StoreError> {
        Ok(self
            .read(sql::SECRET, &[&name], |r| {
                Ok(SecretRow {
                    name: text(r, 0)?,
                    key_id: text(r, 1)?,
                    nonce: col::<&[u8]>(r, 2)?.to_vec(),
                    ciphertext: col::<&[u8]>(r, 3)?.to_vec(),
                    updated_at_ms: col(r, 4)?,
                })
            })
            .await?
            .into_iter()
            .next())
    }

    async fn secrets(&self) -> Result<Vec<SecretRow>, StoreError> {
        // The statement does not select the values: they never leave the database here.
        self.read(sql::SECRETS, &[], |r| {
            Ok(SecretRow {
                name: text(r, 0)?,
                key_id: text(r, 1)?,
                nonce: Vec::new(),
                ciphertext: Vec::new(),
                updated_at_ms: col(r, 2)?,
            })
        })
        .await
    }

    async fn delete_secret(&self, name: &str) -> Result<bool, StoreError> {
        let mut conn = self.take().await?;
        let n = Self::exec(&mut conn, sql::DELETE_SECRET, &[&name]).await?;
        self.give(conn);
        Ok(n > 0)
    }

    async fn start_run(&self, token: &FenceToken, run: &RunRow) -> Result<(), StoreError> {
        let mut conn = self.begin().await?;
        let r = async {
            Self::check_fence(&mut conn, token).await?;
            Self::exec(
                &mut conn,
                sql::ABANDON_OLD_RUNS,
                &[&run.started_at_ms, &run.connector_id.as_str(), &token.epoch],
            )
            .await?;
            let running = Self::rows(&mut conn, sql::RUNNING_RUN, &[&run.connector_id.as_str()])
                .await?
                .first()
                .map(|r| text(r, 0))
                .transpose()?;
            if let Some(other) = running {
                return Err(StoreError::Conflict(format!(
                    "connector {} is already running (run {other}); wait for it to finish",
                    run.connector_id
                )));
            }
            Self::exec(
                &mut conn,
                sql::INSERT_RUN,
                &[
                    &run.id.as_str(),
                    &run.connector_id.as_str(),
                    &token.instance.as_str(),
                    &token.epoch,
                    &run.started_at_ms,
                    &run.mode.as_str(),
                    &run.trigger.as_str(),
                ],
            )
            .await?;
            Ok(())
        }
        .await;
        self.finish(conn, r).await
    }

    async fn finish_run(&self, run: &RunRow) -> Result<(), StoreError> {
        let mut conn = self.take().await?;
        Self::exec(
            &mut conn,
            sql::FINISH_RUN,
            &[
                &run.id.as_str(),
                &run.status.as_str(),
                &run.finished_at_ms,
                &run.added,
                &run.updated,
                &run.unchanged,
                &run.deleted,
                &run.failed,
                &run.error.as_deref(),
                &run.errors_json.as_deref(),
            ],
        )
        .await?;
        self.give(conn);
        Ok(())
    }

    async fn run(&self, id: &str) -> Result<Option<RunRow>, StoreError> {
        Ok(self
            .read(sql::RUN, &[&id], run_row)
            .await?
            .into_iter()
            .next())
    }

    async fn runs(&self, connector: Option<&str>, limit: i64) -> Result<Vec<RunRow>, StoreError> {
        self.read(sql::RUNS, &[&connector, &limit], run_row).await
    }

    async fn dirty_objects(
        &self,
        connector: &str,
        limit: i64,
    ) -> Result<Vec<DirtyObject>, StoreError> {
        self.read(sql::DIRTY_OBJECTS, &[&connector, &limit], |r| {
            Ok(DirtyObject {
                anchor: text(r, 0)?,
                object_type: text(r, 1)?,
                attributes_json: text(r, 2)?,
                deleted: col(r, 3)?,
                rev: col(r, 4)?,
            })
        })
        .await
    }

    async fn mark_for_recompose(
        &self,
        token: &FenceToken,
        connector: &str,
        ruled_types: &[String],
    ) -> Result<u64, StoreError> {
        let ruled = json_list(ruled_types);
        let mut conn = self.begin().await?;
        let r = async {
            Self::check_fence(&mut conn, token).await?;
            let n = Self::exec(
                &mut conn,
                sql::MARK_FOR_RECOMPOSE,
                &[&connector, &ruled.as_str()],
            )
            .await?;
            Self::journal(&mut conn, "compose", token.epoch, &token.instance, now_ms()).await?;
            Ok(n)
        }
        .await;
        self.finish(conn, r).await
    }

    async fn settle_unruled(
        &self,
        token: &FenceToken,
        connector: &str,
        ruled_types: &[String],
        limit: i64,
    ) -> Result<u64, StoreError> {
        let ruled = json_list(ruled_types);
        let mut conn = self.begin().await?;
        let r = async {
            Self::check_fence(&mut conn, token).await?;
            // As `Composed` does: a deleted object goes, any other loses its mark.
            let params: [&dyn tiberius::ToSql; 3] = [&connector, &ruled.as_str(), &limit];
            let mut n = Self::exec(&mut conn, sql::DROP_UNRULED_TOMBSTONES, &params).await?;
            n += Self::exec(&mut conn, sql::SETTLE_UNRULED, &params).await?;
            Self::journal(&mut conn, "compose", token.epoch, &token.instance, now_ms()).await?;
            Ok(n)
        }
        .await;
        self.finish(conn, r).await
    }

    async fn link(&self, connector: &str, anchor: &str) -> Result<Option<LinkRow>, StoreError> {
        Ok(self
            .read(sql::LINK, &[&connector, &anchor], link_row)
            .await?
            .into_iter()
            .next())
    }

    async fn links_of_identity(&self, identity_id: &str) -> Result<Vec<LinkRow>, StoreError> {
        self.read(sql::LINKS_OF_IDENTITY, &[&identity_id], link_row)
            .await
    }

    async fn identities_by_key(&self, attr: &str, value: &str) -> Result<Vec<String>, StoreError> {
        self.read(sql::IDENTITIES_BY_KEY, &[&attr, &value], |r| text(r, 0))
            .await
    }

    async fn identity(&self, id: &str) -> Result<Option<IdentityRow>, StoreError> {
        Ok(self
            .read(sql::IDENTITY, &[&id], identity_row)
            .await?
            .into_iter()
            .next())
    }

    async fn identities(
        &self,
        search: Option<&str>,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<IdentityRow>, StoreError> {
        let pattern = search.map(like_pattern);
        self.read(
            sql::IDENTITIES,
            &[&pattern.as_deref(), &search, &after, &limit],
            identity_row,
        )
        .await
    }

    async fn count_identities(&self) -> Result<i64, StoreError> {
        let v = self.read(sql::COUNT_IDENTITIES, &[], |r| col(r, 0)).await?;
        Ok(v.into_iter().next().unwrap_or(0))
    }

    async fn commit_compose(
        &self,
        token: &FenceToken,
        writes: &[ComposeWrite],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let mut conn = self.begin().await?;
        let r = async {
            Self::check_fence(&mut conn, token).await?;
            for w in writes {
                Self::compose_write(&mut conn, w).await?;
            }
            Self::journal(&mut conn, "compose", token.epoch, &token.instance, now_ms).await?;
            Ok(())
        }
        .await;
        self.finish(conn, r).await
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
        // The sync-engine schema is among them.
        assert!(MSSQL
            .iter()
            .any(|m| m.version == 2 && !m.statements.is_empty()));
    }

    /// Every constant of `mod sql` is in `sql::ALL`, so the parse test sees each statement.
    #[test]
    fn every_statement_is_listed_for_the_parse_test() {
        let src = include_str!("mssql.rs");
        let body = src
            .split_once("pub mod sql {")
            .and_then(|(_, rest)| rest.split_once("pub const ALL"))
            .map(|(consts, _)| consts)
            .unwrap();
        let listed = src
            .split_once("pub const ALL: &[&str] = &[")
            .and_then(|(_, rest)| rest.split_once("];"))
            .map(|(names, _)| names)
            .unwrap();
        let listed: Vec<&str> = listed.split(',').map(str::trim).collect();
        let mut names = 0;
        for line in body.lines() {
            if let Some(name) = line
                .trim()
                .strip_prefix("pub const ")
                .and_then(|rest| rest.split_once(':'))
                .map(|(name, _)| name)
            {
                names += 1;
                assert!(listed.contains(&name), "{name} is missing from sql::ALL");
            }
        }
        assert_eq!(names, sql::ALL.len(), "sql::ALL lists a statement twice");
    }

    #[test]
    fn like_patterns_are_literal_substrings() {
        assert_eq!(like_pattern("ann"), "%ann%");
        assert_eq!(like_pattern(r"100%_[x]\y"), r"%100\%\_\[x]\\y%");
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
