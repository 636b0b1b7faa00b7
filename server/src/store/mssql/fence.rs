//! The fence row and its journal: reading the fence under its update lock, the promotion,
//! the check every fenced write makes (the decisions are `store::fencing`'s), and the
//! active engine's liveness tick.

use super::*;

fn fence_from(row: Option<&Row>) -> Result<Fence, StoreError> {
    let row = row.ok_or_else(|| StoreError::Backend("the fence row is missing".into()))?;
    Ok(Fence {
        epoch: col(row, 0)?,
        holder: text(row, 1)?,
        holder_incarnation: text(row, 2)?,
    })
}

/// The fence row, read `WITH (UPDLOCK, HOLDLOCK)`: held until the transaction ends, so a
/// promotion waits for it.
pub(super) async fn read_locked(w: &mut dyn Wire) -> Result<Fence, StoreError> {
    let rows = rows(w, sql::FENCE_LOCKED, &[]).await?;
    fence_from(rows.first())
}

/// Reads the fence under its lock and refuses a token that no longer holds it.
pub(super) async fn check(w: &mut dyn Wire, token: &FenceToken) -> Result<(), StoreError> {
    fencing::check(&read_locked(w).await?, token)
}

/// Appends to the ordered journal of fenced commits, inside the commit's transaction.
pub(super) async fn journal_insert(
    w: &mut dyn Wire,
    kind: &str,
    epoch: i64,
    instance: &str,
    now_ms: i64,
) -> Result<(), StoreError> {
    exec(w, sql::JOURNAL, &[&kind, &epoch, &instance, &now_ms]).await?;
    Ok(())
}

pub(super) async fn fence(store: &MssqlStore) -> Result<Fence, StoreError> {
    let mut conn = store.take().await?;
    let rows = rows(&mut conn, sql::FENCE, &[]).await?;
    store.give(conn);
    fence_from(rows.first())
}

pub(super) async fn promote(
    store: &MssqlStore,
    claim: &FenceToken,
) -> Result<PromoteOutcome, StoreError> {
    let mut conn = store.begin().await?;
    let r = async {
        let fence = read_locked(&mut conn).await?;
        let outcome = fencing::promote(&fence, claim)?;
        if outcome == PromoteOutcome::AlreadyHeld {
            return Ok(outcome);
        }
        let now = now_ms();
        let (instance, incarnation) = (claim.instance.as_str(), claim.incarnation.as_str());
        exec(
            &mut conn,
            sql::SET_FENCE,
            &[&claim.epoch, &instance, &incarnation, &now],
        )
        .await?;
        exec(
            &mut conn,
            sql::FENCE_OTHER_ACTIVES,
            &[&instance, &incarnation],
        )
        .await?;
        journal_insert(&mut conn, "promote", claim.epoch, instance, now).await?;
        Ok(outcome)
    }
    .await;
    store.finish(conn, r).await
}

pub(super) async fn engine_tick(
    store: &MssqlStore,
    token: &FenceToken,
    now_ms: i64,
) -> Result<(), StoreError> {
    let mut conn = store.begin().await?;
    let r = async {
        check(&mut conn, token).await?;
        upsert(
            &mut conn,
            sql::UPDATE_ENGINE_STATE,
            sql::INSERT_ENGINE_STATE,
            &[&token.instance.as_str(), &token.epoch, &now_ms],
        )
        .await
    }
    .await;
    store.finish(conn, r).await
}

pub(super) async fn journal(store: &MssqlStore) -> Result<Vec<(String, i64)>, StoreError> {
    store
        .read(sql::READ_JOURNAL, &[], |r| Ok((text(r, 0)?, col(r, 1)?)))
        .await
}
