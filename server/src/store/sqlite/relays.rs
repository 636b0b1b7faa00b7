//! Relay agents: registration, revocation and where each one is connected.

use sqlx::Row;

use super::*;

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

pub(super) async fn create_relay(
    store: &SqliteStore,
    id: &str,
    name: &str,
    token_hash: &str,
    now_ms: i64,
) -> Result<(), StoreError> {
    let r =
        sqlx::query("INSERT INTO relays (id, name, token_hash, created_at) VALUES (?, ?, ?, ?)")
            .bind(id)
            .bind(name)
            .bind(token_hash)
            .bind(now_ms)
            .execute(&store.pool)
            .await;
    match r {
        Ok(_) => Ok(()),
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
            Err(conflicts::relay_name_taken(name))
        }
        Err(e) => Err(e.into()),
    }
}

pub(super) async fn relay_by_token_hash(
    store: &SqliteStore,
    token_hash: &str,
) -> Result<Option<RelayRow>, StoreError> {
    let row = sqlx::query(&format!("{RELAY_COLUMNS} WHERE token_hash = ?"))
        .bind(token_hash)
        .fetch_optional(&store.pool)
        .await?;
    row.as_ref().map(relay_row).transpose()
}

pub(super) async fn revoke_relay(
    store: &SqliteStore,
    id: &str,
    now_ms: i64,
) -> Result<bool, StoreError> {
    let n = sqlx::query(
        "UPDATE relays SET revoked_at = COALESCE(revoked_at, ?), connected_instance = NULL, connected_since = NULL WHERE id = ?",
    )
    .bind(now_ms)
    .bind(id)
    .execute(&store.pool)
    .await?
    .rows_affected();
    Ok(n > 0)
}

pub(super) async fn relay_connected(
    store: &SqliteStore,
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
    .execute(&store.pool)
    .await?;
    Ok(())
}

pub(super) async fn relay_seen(
    store: &SqliteStore,
    id: &str,
    now_ms: i64,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE relays SET last_seen = ? WHERE id = ?")
        .bind(now_ms)
        .bind(id)
        .execute(&store.pool)
        .await?;
    Ok(())
}

pub(super) async fn relay_disconnected(
    store: &SqliteStore,
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
    .execute(&store.pool)
    .await?;
    Ok(())
}

pub(super) async fn relays(store: &SqliteStore) -> Result<Vec<RelayRow>, StoreError> {
    let rows = sqlx::query(&format!("{RELAY_COLUMNS} ORDER BY name"))
        .fetch_all(&store.pool)
        .await?;
    rows.iter().map(relay_row).collect()
}
