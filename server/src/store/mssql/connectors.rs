//! Administrative data, not fenced unless said so: connectors, their schedules, settings,
//! sealed secrets and the bootstrap admin token's hash.

use super::*;

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

pub(super) async fn set_token_hash(
    store: &MssqlStore,
    name: &str,
    hash: &str,
    now_ms: i64,
) -> Result<(), StoreError> {
    let mut conn = store.begin().await?;
    let r = async {
        if exec(&mut conn, sql::UPDATE_TOKEN, &[&name, &hash]).await? == 0 {
            exec(&mut conn, sql::INSERT_TOKEN, &[&name, &hash, &now_ms]).await?;
        }
        Ok(())
    }
    .await;
    store.finish(conn, r).await
}

pub(super) async fn token_hash(
    store: &MssqlStore,
    name: &str,
) -> Result<Option<String>, StoreError> {
    Ok(store
        .read(sql::TOKEN, &[&name], |r| text(r, 0))
        .await?
        .into_iter()
        .next())
}

pub(super) async fn put_connector(store: &MssqlStore, c: &ConnectorRow) -> Result<(), StoreError> {
    let mut conn = store.begin().await?;
    let r = upsert(
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
    match store.finish(conn, r).await {
        Err(e) if is_unique_violation(&e) => Err(conflicts::connector_name_taken(&c.name)),
        other => other,
    }
}

pub(super) async fn connector(
    store: &MssqlStore,
    id: &str,
) -> Result<Option<ConnectorRow>, StoreError> {
    Ok(store
        .read(sql::CONNECTOR, &[&id], connector_row)
        .await?
        .into_iter()
        .next())
}

pub(super) async fn connectors(store: &MssqlStore) -> Result<Vec<ConnectorRow>, StoreError> {
    store.read(sql::CONNECTORS, &[], connector_row).await
}

pub(super) async fn delete_connector(store: &MssqlStore, id: &str) -> Result<bool, StoreError> {
    let mut conn = store.begin().await?;
    let r = async {
        // Every write of the connector space is fenced: holding the fence row's lock (as
        // SQLite's write lock does) keeps the count true until this transaction ends.
        fence::read_locked(&mut conn).await?;
        let objects: i64 = match rows(&mut conn, sql::CONNECTOR_OBJECTS, &[&id])
            .await?
            .first()
        {
            Some(r) => col(r, 0)?,
            None => 0,
        };
        if objects > 0 {
            return Err(conflicts::objects_left(id, objects));
        }
        let running = rows(&mut conn, sql::CURRENT_EPOCH_RUN, &[&id])
            .await?
            .first()
            .map(|r| text(r, 0))
            .transpose()?;
        if let Some(run) = running {
            return Err(conflicts::run_in_progress(id, &run));
        }
        exec(&mut conn, sql::DELETE_CONNECTOR_SCHEDULES, &[&id]).await?;
        exec(&mut conn, sql::DELETE_CONNECTOR_WATERMARKS, &[&id]).await?;
        exec(&mut conn, sql::DELETE_CONNECTOR, &[&id]).await
    }
    .await;
    Ok(store.finish(conn, r).await? > 0)
}

pub(super) async fn object_types_of(
    store: &MssqlStore,
    connector: &str,
) -> Result<Vec<String>, StoreError> {
    store
        .read(sql::OBJECT_TYPES_OF, &[&connector], |r| text(r, 0))
        .await
}

pub(super) async fn put_schedule(store: &MssqlStore, s: &ScheduleRow) -> Result<(), StoreError> {
    let mut conn = store.begin().await?;
    let r = upsert(
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
    store.finish(conn, r).await
}

pub(super) async fn schedules(store: &MssqlStore) -> Result<Vec<ScheduleRow>, StoreError> {
    store
        .read(sql::SCHEDULES, &[], |r| {
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

pub(super) async fn delete_schedule(store: &MssqlStore, id: &str) -> Result<bool, StoreError> {
    let mut conn = store.take().await?;
    let n = exec(&mut conn, sql::DELETE_SCHEDULE, &[&id]).await?;
    store.give(conn);
    Ok(n > 0)
}

pub(super) async fn set_schedule_next_run(
    store: &MssqlStore,
    token: &FenceToken,
    id: &str,
    next_run_ms: i64,
) -> Result<(), StoreError> {
    let mut conn = store.begin().await?;
    let r = async {
        fence::check(&mut conn, token).await?;
        exec(&mut conn, sql::SET_SCHEDULE_NEXT_RUN, &[&id, &next_run_ms]).await?;
        Ok(())
    }
    .await;
    store.finish(conn, r).await
}

pub(super) async fn setting(store: &MssqlStore, name: &str) -> Result<Option<String>, StoreError> {
    Ok(store
        .read(sql::SETTING, &[&name], |r| text(r, 0))
        .await?
        .into_iter()
        .next())
}

pub(super) async fn set_setting(
    store: &MssqlStore,
    name: &str,
    value: &str,
) -> Result<(), StoreError> {
    let mut conn = store.begin().await?;
    let r = upsert(
        &mut conn,
        sql::UPDATE_SETTING,
        sql::INSERT_SETTING,
        &[&name, &value],
    )
    .await;
    store.finish(conn, r).await
}

pub(super) async fn set_engine_setting(
    store: &MssqlStore,
    token: &FenceToken,
    name: &str,
    value: &str,
) -> Result<(), StoreError> {
    let mut conn = store.begin().await?;
    let r = async {
        fence::check(&mut conn, token).await?;
        upsert(
            &mut conn,
            sql::UPDATE_SETTING,
            sql::INSERT_SETTING,
            &[&name, &value],
        )
        .await
    }
    .await;
    store.finish(conn, r).await
}

pub(super) async fn put_secret(store: &MssqlStore, s: &SecretRow) -> Result<(), StoreError> {
    let mut conn = store.begin().await?;
    let r = upsert(
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
    store.finish(conn, r).await
}

pub(super) async fn secret(
    store: &MssqlStore,
    name: &str,
) -> Result<Option<SecretRow>, StoreError> {
    Ok(store
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

pub(super) async fn secrets(store: &MssqlStore) -> Result<Vec<SecretRow>, StoreError> {
    // The statement does not select the values: they never leave the database here.
    store
        .read(sql::SECRETS, &[], |r| {
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

pub(super) async fn delete_secret(store: &MssqlStore, name: &str) -> Result<bool, StoreError> {
    let mut conn = store.take().await?;
    let n = exec(&mut conn, sql::DELETE_SECRET, &[&name]).await?;
    store.give(conn);
    Ok(n > 0)
}
