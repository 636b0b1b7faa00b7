//! Administrative data, not fenced unless said so: connectors, their schedules, settings,
//! sealed secrets and the bootstrap admin token's hash.

use sqlx::Row;

use super::*;

const CONNECTOR_COLUMNS: &str = "SELECT id, name, kind, config_json, rules_json, relay_id, is_canary, created_at, updated_at FROM connectors";

fn connector_row(r: &sqlx::sqlite::SqliteRow) -> Result<ConnectorRow, StoreError> {
    Ok(ConnectorRow {
        id: r.try_get(0)?,
        name: r.try_get(1)?,
        kind: r.try_get(2)?,
        config_json: r.try_get(3)?,
        rules_json: r.try_get(4)?,
        relay_id: r.try_get(5)?,
        is_canary: r.try_get(6)?,
        created_at_ms: r.try_get(7)?,
        updated_at_ms: r.try_get(8)?,
    })
}

fn secret_row(r: &sqlx::sqlite::SqliteRow) -> Result<SecretRow, StoreError> {
    Ok(SecretRow {
        name: r.try_get(0)?,
        key_id: r.try_get(1)?,
        nonce: r.try_get(2)?,
        ciphertext: r.try_get(3)?,
        updated_at_ms: r.try_get(4)?,
    })
}

const SET_SETTING: &str = "INSERT INTO settings (name, value) VALUES (?, ?) \
     ON CONFLICT (name) DO UPDATE SET value = excluded.value";

pub(super) async fn advance_schedule(
    tx: &mut Tx<'_>,
    id: &str,
    next_run_ms: i64,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE schedules SET next_run = ? WHERE id = ?")
        .bind(next_run_ms)
        .bind(id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

pub(super) async fn set_token_hash(
    store: &SqliteStore,
    name: &str,
    hash: &str,
    now_ms: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO api_tokens (name, token_hash, created_at) VALUES (?, ?, ?) \
         ON CONFLICT (name) DO UPDATE SET token_hash = excluded.token_hash",
    )
    .bind(name)
    .bind(hash)
    .bind(now_ms)
    .execute(&store.pool)
    .await?;
    Ok(())
}

pub(super) async fn token_hash(
    store: &SqliteStore,
    name: &str,
) -> Result<Option<String>, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT token_hash FROM api_tokens WHERE name = ?")
            .bind(name)
            .fetch_optional(&store.pool)
            .await?,
    )
}

pub(super) async fn put_connector(store: &SqliteStore, c: &ConnectorRow) -> Result<(), StoreError> {
    let r = sqlx::query(
        "INSERT INTO connectors (id, name, kind, config_json, rules_json, relay_id, is_canary, created_at, updated_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET name = excluded.name, kind = excluded.kind, \
         config_json = excluded.config_json, rules_json = excluded.rules_json, relay_id = excluded.relay_id, \
         is_canary = excluded.is_canary, updated_at = excluded.updated_at",
    )
    .bind(&c.id)
    .bind(&c.name)
    .bind(&c.kind)
    .bind(&c.config_json)
    .bind(&c.rules_json)
    .bind(&c.relay_id)
    .bind(c.is_canary)
    .bind(c.created_at_ms)
    .bind(c.updated_at_ms)
    .execute(&store.pool)
    .await;
    match r {
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
            Err(conflicts::connector_name_taken(&c.name))
        }
        other => other.map(|_| ()).map_err(Into::into),
    }
}

pub(super) async fn connector(
    store: &SqliteStore,
    id: &str,
) -> Result<Option<ConnectorRow>, StoreError> {
    sqlx::query(&format!("{CONNECTOR_COLUMNS} WHERE id = ?"))
        .bind(id)
        .fetch_optional(&store.pool)
        .await?
        .as_ref()
        .map(connector_row)
        .transpose()
}

pub(super) async fn connectors(store: &SqliteStore) -> Result<Vec<ConnectorRow>, StoreError> {
    let rows = sqlx::query(&format!("{CONNECTOR_COLUMNS} ORDER BY name"))
        .fetch_all(&store.pool)
        .await?;
    rows.iter().map(connector_row).collect()
}

pub(super) async fn delete_connector(store: &SqliteStore, id: &str) -> Result<bool, StoreError> {
    let (_slot, mut tx) = store.begin_locked().await?;
    let objects: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM cs_objects WHERE connector_id = ?")
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
    if objects > 0 {
        return Err(conflicts::objects_left(id, objects));
    }
    // Runs of older epochs are abandoned (their writes are fenced); one of the current
    // epoch may still commit objects.
    let running: Option<String> = sqlx::query_scalar(
        "SELECT id FROM runs WHERE connector_id = ? AND status = 'running' \
         AND epoch >= (SELECT epoch FROM fence WHERE id = 1) LIMIT 1",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(run) = running {
        return Err(conflicts::run_in_progress(id, &run));
    }
    for stmt in [
        "DELETE FROM schedules WHERE connector_id = ?",
        "DELETE FROM watermarks WHERE connector_id = ?",
    ] {
        sqlx::query(stmt).bind(id).execute(&mut *tx).await?;
    }
    let n = sqlx::query("DELETE FROM connectors WHERE id = ?")
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    tx.commit().await?;
    Ok(n > 0)
}

pub(super) async fn object_types_of(
    store: &SqliteStore,
    connector: &str,
) -> Result<Vec<String>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT DISTINCT object_type FROM cs_objects WHERE connector_id = ? ORDER BY object_type",
    )
    .bind(connector)
    .fetch_all(&store.pool)
    .await?)
}

pub(super) async fn put_schedule(store: &SqliteStore, s: &ScheduleRow) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO schedules (id, connector_id, kind, spec, run_mode, enabled, next_run, created_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET connector_id = excluded.connector_id, \
         kind = excluded.kind, spec = excluded.spec, run_mode = excluded.run_mode, enabled = excluded.enabled, \
         next_run = excluded.next_run",
    )
    .bind(&s.id)
    .bind(&s.connector_id)
    .bind(&s.kind)
    .bind(&s.spec)
    .bind(&s.mode)
    .bind(s.enabled)
    .bind(s.next_run_ms)
    .bind(s.created_at_ms)
    .execute(&store.pool)
    .await?;
    Ok(())
}

pub(super) async fn schedules(store: &SqliteStore) -> Result<Vec<ScheduleRow>, StoreError> {
    let rows = sqlx::query(
        "SELECT id, connector_id, kind, spec, run_mode, enabled, next_run, created_at FROM schedules ORDER BY created_at, id",
    )
    .fetch_all(&store.pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(ScheduleRow {
                id: r.try_get(0)?,
                connector_id: r.try_get(1)?,
                kind: r.try_get(2)?,
                spec: r.try_get(3)?,
                mode: r.try_get(4)?,
                enabled: r.try_get(5)?,
                next_run_ms: r.try_get(6)?,
                created_at_ms: r.try_get(7)?,
            })
        })
        .collect()
}

pub(super) async fn delete_schedule(store: &SqliteStore, id: &str) -> Result<bool, StoreError> {
    Ok(sqlx::query("DELETE FROM schedules WHERE id = ?")
        .bind(id)
        .execute(&store.pool)
        .await?
        .rows_affected()
        > 0)
}

pub(super) async fn set_schedule_next_run(
    store: &SqliteStore,
    token: &FenceToken,
    id: &str,
    next_run_ms: i64,
) -> Result<(), StoreError> {
    let (_slot, mut tx) = store.begin_locked().await?;
    fence::check(&mut tx, token).await?;
    advance_schedule(&mut tx, id, next_run_ms).await?;
    tx.commit().await?;
    Ok(())
}

pub(super) async fn setting(store: &SqliteStore, name: &str) -> Result<Option<String>, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT value FROM settings WHERE name = ?")
            .bind(name)
            .fetch_optional(&store.pool)
            .await?,
    )
}

pub(super) async fn set_setting(
    store: &SqliteStore,
    name: &str,
    value: &str,
) -> Result<(), StoreError> {
    sqlx::query(SET_SETTING)
        .bind(name)
        .bind(value)
        .execute(&store.pool)
        .await?;
    Ok(())
}

pub(super) async fn set_engine_setting(
    store: &SqliteStore,
    token: &FenceToken,
    name: &str,
    value: &str,
) -> Result<(), StoreError> {
    let (_slot, mut tx) = store.begin_locked().await?;
    fence::check(&mut tx, token).await?;
    sqlx::query(SET_SETTING)
        .bind(name)
        .bind(value)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

pub(super) async fn put_secret(store: &SqliteStore, s: &SecretRow) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO secrets (ref, key_id, nonce, ciphertext, updated_at) VALUES (?, ?, ?, ?, ?) \
         ON CONFLICT (ref) DO UPDATE SET key_id = excluded.key_id, nonce = excluded.nonce, \
         ciphertext = excluded.ciphertext, updated_at = excluded.updated_at",
    )
    .bind(&s.name)
    .bind(&s.key_id)
    .bind(&s.nonce)
    .bind(&s.ciphertext)
    .bind(s.updated_at_ms)
    .execute(&store.pool)
    .await?;
    Ok(())
}

pub(super) async fn secret(
    store: &SqliteStore,
    name: &str,
) -> Result<Option<SecretRow>, StoreError> {
    sqlx::query("SELECT ref, key_id, nonce, ciphertext, updated_at FROM secrets WHERE ref = ?")
        .bind(name)
        .fetch_optional(&store.pool)
        .await?
        .as_ref()
        .map(secret_row)
        .transpose()
}

pub(super) async fn secrets(store: &SqliteStore) -> Result<Vec<SecretRow>, StoreError> {
    // Values stay in the database: this listing carries names, keys and times only.
    let rows = sqlx::query(
        "SELECT ref, key_id, X'' AS nonce, X'' AS ciphertext, updated_at FROM secrets ORDER BY ref",
    )
    .fetch_all(&store.pool)
    .await?;
    rows.iter().map(secret_row).collect()
}

pub(super) async fn delete_secret(store: &SqliteStore, name: &str) -> Result<bool, StoreError> {
    Ok(sqlx::query("DELETE FROM secrets WHERE ref = ?")
        .bind(name)
        .execute(&store.pool)
        .await?
        .rows_affected()
        > 0)
}
