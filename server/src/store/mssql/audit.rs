//! The audit log, and retention: pruning the tables that grow with use.

use super::*;

pub(super) async fn append_audit(store: &MssqlStore, e: &AuditEntry) -> Result<(), StoreError> {
    let mut conn = store.take().await?;
    exec(
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
    store.give(conn);
    Ok(())
}

pub(super) async fn prune(
    store: &MssqlStore,
    token: &FenceToken,
    table: RetainedTable,
    before_ms: i64,
    limit: i64,
) -> Result<u64, StoreError> {
    let q = match table {
        RetainedTable::Runs => sql::PRUNE_RUNS,
        RetainedTable::AuditLog => sql::PRUNE_AUDIT,
        RetainedTable::ImportBatches => sql::PRUNE_BATCHES,
        RetainedTable::FenceJournal => sql::PRUNE_JOURNAL,
    };
    let mut conn = store.begin().await?;
    let r = async {
        fence::check(&mut conn, token).await?;
        exec(&mut conn, q, &[&before_ms, &limit]).await
    }
    .await;
    store.finish(conn, r).await
}

pub(super) async fn audit(
    store: &MssqlStore,
    f: &AuditFilter,
) -> Result<Vec<AuditEntry>, StoreError> {
    let (exact, prefix) = f.action_match();
    let prefix = prefix.map(like_prefix);
    let params: [&dyn ToSql; 6] = [
        &f.actor.as_deref(),
        &exact,
        &prefix,
        &f.since_ms,
        &f.until_ms,
        &f.limit,
    ];
    store
        .read(sql::AUDIT, &params, |r| {
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
