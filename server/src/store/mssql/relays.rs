//! Relay agents: registration, revocation and where each one is connected.

use super::*;

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

pub(super) async fn create_relay(
    store: &MssqlStore,
    id: &str,
    name: &str,
    token_hash: &str,
    now_ms: i64,
) -> Result<(), StoreError> {
    let mut conn = store.take().await?;
    let r = exec(
        &mut conn,
        sql::INSERT_RELAY,
        &[&id, &name, &token_hash, &now_ms],
    )
    .await;
    store.give(conn);
    match r {
        // 2627/2601: unique constraint or index violation.
        Err(StoreError::Backend(m))
            if m.contains("2627") || m.contains("2601") || m.contains("UNIQUE") =>
        {
            Err(conflicts::relay_name_taken(name))
        }
        other => other.map(|_| ()),
    }
}

pub(super) async fn relay_by_token_hash(
    store: &MssqlStore,
    token_hash: &str,
) -> Result<Option<RelayRow>, StoreError> {
    Ok(store
        .read(sql::RELAY_BY_HASH, &[&token_hash], relay_row)
        .await?
        .into_iter()
        .next())
}

pub(super) async fn revoke_relay(
    store: &MssqlStore,
    id: &str,
    now_ms: i64,
) -> Result<bool, StoreError> {
    let mut conn = store.take().await?;
    let n = exec(&mut conn, sql::REVOKE_RELAY, &[&id, &now_ms]).await?;
    store.give(conn);
    Ok(n > 0)
}

pub(super) async fn relay_connected(
    store: &MssqlStore,
    id: &str,
    instance: &str,
    version: &str,
    now_ms: i64,
) -> Result<(), StoreError> {
    let mut conn = store.take().await?;
    exec(
        &mut conn,
        sql::RELAY_CONNECTED,
        &[&id, &instance, &version, &now_ms],
    )
    .await?;
    store.give(conn);
    Ok(())
}

pub(super) async fn relay_seen(
    store: &MssqlStore,
    id: &str,
    now_ms: i64,
) -> Result<(), StoreError> {
    let mut conn = store.take().await?;
    exec(&mut conn, sql::RELAY_SEEN, &[&id, &now_ms]).await?;
    store.give(conn);
    Ok(())
}

pub(super) async fn relay_disconnected(
    store: &MssqlStore,
    id: &str,
    instance: &str,
    now_ms: i64,
) -> Result<(), StoreError> {
    let mut conn = store.take().await?;
    exec(
        &mut conn,
        sql::RELAY_DISCONNECTED,
        &[&id, &instance, &now_ms],
    )
    .await?;
    store.give(conn);
    Ok(())
}

pub(super) async fn relays(store: &MssqlStore) -> Result<Vec<RelayRow>, StoreError> {
    store.read(sql::RELAYS, &[], relay_row).await
}
