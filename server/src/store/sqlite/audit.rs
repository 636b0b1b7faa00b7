//! The audit log, and retention: pruning the tables that grow with use.

use sqlx::Row;

use super::*;

pub(super) async fn append_audit(store: &SqliteStore, e: &AuditEntry) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO audit_log (at, actor, action, target, detail) VALUES (?, ?, ?, ?, ?)")
        .bind(e.at_ms)
        .bind(&e.actor)
        .bind(&e.action)
        .bind(&e.target)
        .bind(&e.detail)
        .execute(&store.pool)
        .await?;
    Ok(())
}

pub(super) async fn prune(
    store: &SqliteStore,
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
    let (_slot, mut tx) = store.begin_locked().await?;
    fence::check(&mut tx, token).await?;
    let n = sqlx::query(q)
        .bind(before_ms)
        .bind(limit)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    tx.commit().await?;
    Ok(n)
}

pub(super) async fn audit(
    store: &SqliteStore,
    f: &AuditFilter,
) -> Result<Vec<AuditEntry>, StoreError> {
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
    .fetch_all(&store.pool)
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
