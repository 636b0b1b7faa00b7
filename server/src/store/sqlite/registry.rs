//! The engine-instance registry: heartbeats and the instances they show.

use sqlx::Row;

use super::*;

pub(super) async fn heartbeat(store: &SqliteStore, hb: &Heartbeat) -> Result<(), StoreError> {
    let (_slot, mut tx) = store.begin_locked().await?;
    let fence = fence::read_locked(&mut tx).await?;
    let (role, answer) = fencing::heartbeat(&fence, hb);
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
    answer
}

pub(super) async fn instances(
    store: &SqliteStore,
    alive_since_ms: i64,
) -> Result<Vec<InstanceRow>, StoreError> {
    let rows = sqlx::query(
        "SELECT instance, host, role, epoch, version, started_at, last_heartbeat, incarnation \
         FROM engine_instances WHERE last_heartbeat >= ? ORDER BY instance, started_at",
    )
    .bind(alive_since_ms)
    .fetch_all(&store.pool)
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
