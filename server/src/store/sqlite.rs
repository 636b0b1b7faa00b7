//! The embedded SQLite store (single host, development, tests).
//!
//! Every write that must be fenced runs in `BEGIN IMMEDIATE`, which takes SQLite's write lock
//! before the epoch is read; a promotion needs the same lock, so each fenced commit is ordered
//! entirely before or entirely after any promotion.

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
                Ok(pool) => return Ok(Self { pool }),
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

    async fn begin_locked(&self) -> Result<Tx<'_>, StoreError> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    async fn read_fence(tx: &mut Tx<'_>) -> Result<Fence, StoreError> {
        let row = sqlx::query("SELECT epoch, holder FROM fence WHERE id = 1")
            .fetch_one(&mut **tx)
            .await?;
        Ok(Fence {
            epoch: row.try_get(0)?,
            holder: row.try_get(1)?,
        })
    }

    /// Reads the fence under the write lock and refuses a token that no longer holds it.
    async fn check_fence(tx: &mut Tx<'_>, token: &FenceToken) -> Result<(), StoreError> {
        let fence = Self::read_fence(tx).await?;
        if fence.epoch != token.epoch || fence.holder != token.instance {
            return Err(StoreError::Fenced {
                stored: fence.epoch,
                holder: fence.holder,
                own: token.epoch,
            });
        }
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
        let mut tx = self.begin_locked().await?;
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
        let row = sqlx::query("SELECT epoch, holder FROM fence WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        Ok(Fence {
            epoch: row.try_get(0)?,
            holder: row.try_get(1)?,
        })
    }

    async fn promote(&self, instance: &str, epoch: i64) -> Result<PromoteOutcome, StoreError> {
        let mut tx = self.begin_locked().await?;
        let fence = Self::read_fence(&mut tx).await?;
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
        sqlx::query("UPDATE fence SET epoch = ?, holder = ?, updated_at = ? WHERE id = 1")
            .bind(epoch)
            .bind(instance)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        // The registry must never show two actives: whoever claimed active before is fenced now.
        sqlx::query(
            "UPDATE engine_instances SET role = 'fenced' WHERE role = 'active' AND instance <> ?",
        )
        .bind(instance)
        .execute(&mut *tx)
        .await?;
        Self::journal_insert(&mut tx, "promote", epoch, instance, now).await?;
        tx.commit().await?;
        Ok(PromoteOutcome::Promoted)
    }

    async fn heartbeat(&self, hb: &Heartbeat) -> Result<(), StoreError> {
        let mut tx = self.begin_locked().await?;
        let fence = Self::read_fence(&mut tx).await?;
        let stale =
            hb.role == Role::Active && (fence.epoch != hb.epoch || fence.holder != hb.instance);
        let role = if stale { Role::Fenced } else { hb.role };
        sqlx::query(
            "INSERT INTO engine_instances (instance, host, role, epoch, version, started_at, last_heartbeat) \
             VALUES (?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT (instance) DO UPDATE SET host = excluded.host, role = excluded.role, \
             epoch = excluded.epoch, version = excluded.version, started_at = excluded.started_at, \
             last_heartbeat = excluded.last_heartbeat",
        )
        .bind(&hb.instance)
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
                holder: fence.holder,
                own: hb.epoch,
            });
        }
        Ok(())
    }

    async fn instances(&self, alive_since_ms: i64) -> Result<Vec<InstanceRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT instance, host, role, epoch, version, started_at, last_heartbeat \
             FROM engine_instances WHERE last_heartbeat >= ? ORDER BY instance",
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
                })
            })
            .collect()
    }

    async fn engine_tick(&self, token: &FenceToken, now_ms: i64) -> Result<(), StoreError> {
        let mut tx = self.begin_locked().await?;
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
    ) -> Result<u64, StoreError> {
        let mut tx = self.begin_locked().await?;
        Self::check_fence(&mut tx, token).await?;
        for o in &batch.objects {
            sqlx::query(
                "INSERT INTO cs_objects (connector_id, anchor, object_type, attributes_json, updated_at) \
                 VALUES (?, ?, ?, ?, ?) ON CONFLICT (connector_id, anchor) DO UPDATE SET \
                 object_type = excluded.object_type, attributes_json = excluded.attributes_json, updated_at = excluded.updated_at",
            )
            .bind(&batch.connector)
            .bind(&o.anchor)
            .bind(&o.object_type)
            .bind(&o.attributes_json)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
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
        Self::journal_insert(&mut tx, "batch", token.epoch, &token.instance, now_ms).await?;
        tx.commit().await?;
        Ok(seq as u64)
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

    async fn audit(&self, limit: i64) -> Result<Vec<AuditEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT at, actor, action, target, detail FROM audit_log ORDER BY seq DESC LIMIT ?",
        )
        .bind(limit)
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

const RELAY_COLUMNS: &str = "SELECT id, name, created_at, revoked_at, last_seen, version, connected_instance, connected_since FROM relays";

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
