//! The engine-instance registry: heartbeats and the instances they show.

use super::*;

pub(super) async fn heartbeat(store: &MssqlStore, hb: &Heartbeat) -> Result<(), StoreError> {
    let mut conn = store.begin().await?;
    let r = async {
        let fence = fence::read_locked(&mut conn).await?;
        let (role, answer) = fencing::heartbeat(&fence, hb);
        upsert(
            &mut conn,
            sql::UPDATE_INSTANCE,
            sql::INSERT_INSTANCE,
            &[
                &hb.instance.as_str(),
                &hb.host.as_str(),
                &role.as_str(),
                &hb.epoch,
                &hb.version.as_str(),
                &hb.started_at_ms,
                &hb.now_ms,
                &hb.incarnation.as_str(),
            ],
        )
        .await?;
        Ok(answer)
    }
    .await;
    store.finish(conn, r).await?
}

pub(super) async fn instances(
    store: &MssqlStore,
    alive_since_ms: i64,
) -> Result<Vec<InstanceRow>, StoreError> {
    store
        .read(sql::INSTANCES, &[&alive_since_ms], |r| {
            Ok(InstanceRow {
                instance: text(r, 0)?,
                host: text(r, 1)?,
                role: Role::parse(&text(r, 2)?),
                epoch: col(r, 3)?,
                version: text(r, 4)?,
                started_at_ms: col(r, 5)?,
                last_heartbeat_ms: col(r, 6)?,
                incarnation: text(r, 7)?,
            })
        })
        .await
}
