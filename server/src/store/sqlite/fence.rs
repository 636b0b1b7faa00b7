//! The fence row and its journal: reading the fence under the write lock, the promotion,
//! the check every fenced write makes (the decisions are `store::fencing`'s), and the
//! active engine's liveness tick.

use sqlx::Row;

use super::*;

const FENCE_SELECT: &str = "SELECT epoch, holder, holder_incarnation FROM fence WHERE id = 1";

fn fence_row(r: &sqlx::sqlite::SqliteRow) -> Result<Fence, StoreError> {
    Ok(Fence {
        epoch: r.try_get(0)?,
        holder: r.try_get(1)?,
        holder_incarnation: r.try_get(2)?,
    })
}

/// The fence row, read inside the caller's `BEGIN IMMEDIATE` transaction, under the write lock a
/// promotion needs too.
pub(super) async fn read_locked(tx: &mut Tx<'_>) -> Result<Fence, StoreError> {
    let row = sqlx::query(FENCE_SELECT).fetch_one(&mut **tx).await?;
    fence_row(&row)
}

/// Reads the fence under the write lock and refuses a token that no longer holds it.
pub(super) async fn check(tx: &mut Tx<'_>, token: &FenceToken) -> Result<(), StoreError> {
    fencing::check(&read_locked(tx).await?, token)
}

pub(super) async fn journal_insert(
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

pub(super) async fn fence(store: &SqliteStore) -> Result<Fence, StoreError> {
    let row = sqlx::query(FENCE_SELECT).fetch_one(&store.pool).await?;
    fence_row(&row)
}

pub(super) async fn promote(
    store: &SqliteStore,
    claim: &FenceToken,
) -> Result<PromoteOutcome, StoreError> {
    let (_slot, mut tx) = store.begin_locked().await?;
    let fence = read_locked(&mut tx).await?;
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
    journal_insert(&mut tx, "promote", claim.epoch, &claim.instance, now).await?;
    tx.commit().await?;
    Ok(outcome)
}

pub(super) async fn engine_tick(
    store: &SqliteStore,
    token: &FenceToken,
    now_ms: i64,
) -> Result<(), StoreError> {
    let (_slot, mut tx) = store.begin_locked().await?;
    check(&mut tx, token).await?;
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

pub(super) async fn journal(store: &SqliteStore) -> Result<Vec<(String, i64)>, StoreError> {
    let rows = sqlx::query("SELECT kind, epoch FROM fence_journal ORDER BY seq")
        .fetch_all(&store.pool)
        .await?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect()
}
