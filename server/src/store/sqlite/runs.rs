//! The import side: runs, import batches and watermarks, and the connector space they write
//! (cs objects, as stored and as listed).

use std::collections::{HashMap, HashSet};

use sqlx::Row;

use super::multi::{build_once, push_in, Builder, ROWS_PER_STATEMENT};
use super::*;

const RUN_COLUMNS: &str = "SELECT id, connector_id, instance, epoch, run_mode, trigger_kind, status, started_at, finished_at, added, updated, unchanged, deleted, failed, error, errors_json FROM runs";

fn run_row(r: &sqlx::sqlite::SqliteRow) -> Result<RunRow, StoreError> {
    Ok(RunRow {
        id: r.try_get(0)?,
        connector_id: r.try_get(1)?,
        instance: r.try_get(2)?,
        epoch: r.try_get(3)?,
        mode: r.try_get(4)?,
        trigger: r.try_get(5)?,
        status: r.try_get(6)?,
        started_at_ms: r.try_get(7)?,
        finished_at_ms: r.try_get(8)?,
        added: r.try_get(9)?,
        updated: r.try_get(10)?,
        unchanged: r.try_get(11)?,
        deleted: r.try_get(12)?,
        failed: r.try_get(13)?,
        error: r.try_get(14)?,
        errors_json: r.try_get(15)?,
    })
}

/// The stored object in the row's columns from `at`: object type, attributes, deleted, the
/// run that last saw it.
fn stored_object(r: &sqlx::sqlite::SqliteRow, at: usize) -> Result<StoredObject, StoreError> {
    Ok(StoredObject {
        object_type: r.try_get(at)?,
        attributes_json: r.try_get(at + 1)?,
        deleted: r.try_get::<i64, _>(at + 2)? != 0,
        seen_run: r.try_get(at + 3)?,
    })
}

/// `connector_space`: @1 connector, (@2 the cursor), @3 the anchor's LIKE pattern, @4 the
/// attributes JSON's, @5 the page size.
const SPACE_PAGE_HEAD: &str = "SELECT o.anchor, o.object_type, \
     CASE WHEN json_valid(o.attributes_json) THEN CASE WHEN json_type(o.attributes_json, '$.dn') = 'text' \
     THEN json_extract(o.attributes_json, '$.dn') END END, o.deleted, l.identity_id \
     FROM cs_objects o LEFT JOIN identity_links l \
     ON l.connector_id = o.connector_id AND l.anchor = o.anchor WHERE o.connector_id = ?1";

const SPACE_PAGE_TAIL: &str = "AND (?3 IS NULL OR o.anchor LIKE ?3 ESCAPE '\\' \
     OR o.attributes_json LIKE ?4 ESCAPE '\\') ORDER BY o.anchor LIMIT ?5";

pub(super) async fn commit_import_batch(
    store: &SqliteStore,
    token: &FenceToken,
    batch: &ImportBatch,
    now_ms: i64,
) -> Result<BatchOutcome, StoreError> {
    let (_slot, mut tx) = store.begin_locked().await?;
    fence::check(&mut tx, token).await?;
    // A handful of statements per batch, not a few per object: every statement is a round
    // trip to SQLite's worker thread, and those trips, not SQLite, bound the import rate.
    // What is stored for the page's anchors, and whether each is linked to an identity.
    let mut existing: HashMap<String, (StoredObject, bool)> = HashMap::new();
    for chunk in batch.objects.chunks(ROWS_PER_STATEMENT) {
        let mut q = Builder::new(
            "SELECT c.anchor, c.object_type, c.attributes_json, c.deleted, c.seen_run, l.anchor IS NOT NULL \
             FROM cs_objects c LEFT JOIN identity_links l \
             ON l.connector_id = c.connector_id AND l.anchor = c.anchor WHERE c.connector_id = ",
        );
        q.push_bind(&batch.connector).push(" AND c.anchor IN ");
        push_in(&mut q, chunk.iter().map(|o| &o.anchor));
        for r in build_once(&mut q).fetch_all(&mut *tx).await? {
            existing.insert(
                r.try_get(0)?,
                (stored_object(&r, 1)?, r.try_get::<i64, _>(5)? != 0),
            );
        }
    }
    let mut out = BatchOutcome::default();
    // Each written object with its composer mark (see `ImportBatch::compose`); a new object
    // has no link (links go with their object's tombstone). An object the batch composes
    // itself carries no mark.
    let mut writes: Vec<(&CsObject, bool)> = Vec::new();
    let mut unchanged = Vec::new();
    // With deletion detection, each anchor once per run (see `BatchOutcome::duplicates`).
    let mut in_batch = HashSet::new();
    for o in &batch.objects {
        let stored = existing.get(&o.anchor);
        if batch.seen_in_run.is_some()
            && (StoredObject::seen_by(stored.map(|(s, _)| s), batch.seen_in_run.as_ref())
                || !in_batch.insert(o.anchor.as_str()))
        {
            out.duplicates.push(o.anchor.clone());
            continue;
        }
        if !StoredObject::changed_by(stored.map(|(s, _)| s), o) {
            out.unchanged += 1;
            unchanged.push(o);
            continue;
        }
        let linked = stored.is_some_and(|(_, linked)| *linked);
        if stored.is_some() {
            out.updated += 1;
        } else {
            out.added += 1;
        }
        let composed = PageCompose::covers(&batch.composed, &o.anchor);
        writes.push((o, !composed && (batch.compose || linked)));
    }
    for chunk in writes.chunks(ROWS_PER_STATEMENT) {
        let mut q = Builder::new(
            "INSERT INTO cs_objects (connector_id, anchor, object_type, attributes_json, updated_at, dirty, deleted, seen_run, rev) ",
        );
        q.push_values(chunk, |mut row, (o, dirty)| {
            row.push_bind(&batch.connector)
                .push_bind(&o.anchor)
                .push_bind(&o.object_type)
                .push_bind(&o.attributes_json)
                .push_bind(now_ms)
                .push(if *dirty { "1" } else { "0" })
                .push("0")
                .push_bind(&batch.seen_in_run)
                .push("1");
        });
        q.push(
            " ON CONFLICT (connector_id, anchor) DO UPDATE SET object_type = excluded.object_type, \
             attributes_json = excluded.attributes_json, updated_at = excluded.updated_at, dirty = excluded.dirty, \
             deleted = 0, seen_run = COALESCE(excluded.seen_run, cs_objects.seen_run), rev = cs_objects.rev + 1",
        );
        build_once(&mut q).execute(&mut *tx).await?;
    }
    if batch.seen_in_run.is_some() {
        for chunk in unchanged.chunks(ROWS_PER_STATEMENT) {
            let mut q = Builder::new("UPDATE cs_objects SET seen_run = ");
            q.push_bind(&batch.seen_in_run)
                .push(" WHERE connector_id = ")
                .push_bind(&batch.connector)
                .push(" AND anchor IN ");
            push_in(&mut q, chunk.iter().map(|o| &o.anchor));
            build_once(&mut q).execute(&mut *tx).await?;
        }
    }
    if let Some(w) = &batch.watermark {
        sqlx::query(
            "INSERT INTO watermarks (connector_id, object_type, value, updated_at) VALUES (?, ?, ?, ?) \
             ON CONFLICT (connector_id, object_type) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
        )
        .bind(&batch.connector)
        .bind(&batch.object_type)
        .bind(w)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
    }
    let seq = sqlx::query(
        "INSERT INTO import_batches (connector_id, object_type, object_count, watermark, epoch, instance, committed_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&batch.connector)
    .bind(&batch.object_type)
    .bind(batch.objects.len() as i64)
    .bind(&batch.watermark)
    .bind(token.epoch)
    .bind(&token.instance)
    .bind(now_ms)
    .execute(&mut *tx)
    .await?
    .last_insert_rowid();
    if let Some(page) = &batch.composed {
        identities::write_compose(&mut tx, &page.writes).await?;
    }
    fence::journal_insert(&mut tx, "batch", token.epoch, &token.instance, now_ms).await?;
    tx.commit().await?;
    out.seq = seq as u64;
    Ok(out)
}

pub(super) async fn finish_full_import(
    store: &SqliteStore,
    token: &FenceToken,
    connector: &str,
    object_type: &str,
    run_id: &str,
    now_ms: i64,
) -> Result<u64, StoreError> {
    let (_slot, mut tx) = store.begin_locked().await?;
    fence::check(&mut tx, token).await?;
    let n = sqlx::query(
        "UPDATE cs_objects SET deleted = 1, dirty = 1, rev = rev + 1, updated_at = ? \
         WHERE connector_id = ? AND object_type = ? AND deleted = 0 AND (seen_run IS NULL OR seen_run <> ?)",
    )
    .bind(now_ms)
    .bind(connector)
    .bind(object_type)
    .bind(run_id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    fence::journal_insert(
        &mut tx,
        "full_import_end",
        token.epoch,
        &token.instance,
        now_ms,
    )
    .await?;
    tx.commit().await?;
    Ok(n)
}

pub(super) async fn watermark(
    store: &SqliteStore,
    connector: &str,
    object_type: &str,
) -> Result<Option<String>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT value FROM watermarks WHERE connector_id = ? AND object_type = ?",
    )
    .bind(connector)
    .bind(object_type)
    .fetch_optional(&store.pool)
    .await?)
}

pub(super) async fn count_objects(store: &SqliteStore, connector: &str) -> Result<i64, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT COUNT(*) FROM cs_objects WHERE connector_id = ?")
            .bind(connector)
            .fetch_one(&store.pool)
            .await?,
    )
}

pub(super) async fn count_batches(store: &SqliteStore, connector: &str) -> Result<i64, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT COUNT(*) FROM import_batches WHERE connector_id = ?")
            .bind(connector)
            .fetch_one(&store.pool)
            .await?,
    )
}

pub(super) async fn start_run(
    store: &SqliteStore,
    token: &FenceToken,
    run: &RunRow,
    advance: Option<&ScheduleAdvance>,
) -> Result<(), StoreError> {
    let (_slot, mut tx) = store.begin_locked().await?;
    fence::check(&mut tx, token).await?;
    sqlx::query(
        "UPDATE runs SET status = 'abandoned', finished_at = ?, error = 'the instance running it lost the active role' \
         WHERE connector_id = ? AND status = 'running' AND epoch < ?",
    )
    .bind(run.started_at_ms)
    .bind(&run.connector_id)
    .bind(token.epoch)
    .execute(&mut *tx)
    .await?;
    let running: Option<String> = sqlx::query_scalar(
        "SELECT id FROM runs WHERE connector_id = ? AND status = 'running' LIMIT 1",
    )
    .bind(&run.connector_id)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(other) = running {
        return Err(conflicts::already_running(&run.connector_id, &other));
    }
    let exists: Option<i64> = sqlx::query_scalar("SELECT 1 FROM connectors WHERE id = ?")
        .bind(&run.connector_id)
        .fetch_optional(&mut *tx)
        .await?;
    if exists.is_none() {
        return Err(conflicts::connector_deleted(&run.connector_id));
    }
    sqlx::query(
        "INSERT INTO runs (id, connector_id, instance, epoch, status, started_at, run_mode, trigger_kind) \
         VALUES (?, ?, ?, ?, 'running', ?, ?, ?)",
    )
    .bind(&run.id)
    .bind(&run.connector_id)
    .bind(&token.instance)
    .bind(token.epoch)
    .bind(run.started_at_ms)
    .bind(&run.mode)
    .bind(&run.trigger)
    .execute(&mut *tx)
    .await?;
    if let Some(a) = advance {
        connectors::advance_schedule(&mut tx, &a.schedule_id, a.next_run_ms).await?;
    }
    tx.commit().await?;
    Ok(())
}

pub(super) async fn finish_run(store: &SqliteStore, run: &RunRow) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE runs SET status = ?, finished_at = ?, added = ?, updated = ?, unchanged = ?, deleted = ?, \
         failed = ?, error = ?, errors_json = ? WHERE id = ? AND status = 'running'",
    )
    .bind(&run.status)
    .bind(run.finished_at_ms)
    .bind(run.added)
    .bind(run.updated)
    .bind(run.unchanged)
    .bind(run.deleted)
    .bind(run.failed)
    .bind(&run.error)
    .bind(&run.errors_json)
    .bind(&run.id)
    .execute(&store.pool)
    .await?;
    Ok(())
}

pub(super) async fn run(store: &SqliteStore, id: &str) -> Result<Option<RunRow>, StoreError> {
    sqlx::query(&format!("{RUN_COLUMNS} WHERE id = ?"))
        .bind(id)
        .fetch_optional(&store.pool)
        .await?
        .as_ref()
        .map(run_row)
        .transpose()
}

pub(super) async fn runs(
    store: &SqliteStore,
    connector: Option<&str>,
    limit: i64,
) -> Result<Vec<RunRow>, StoreError> {
    let rows = sqlx::query(&format!(
        "{RUN_COLUMNS} WHERE (? IS NULL OR connector_id = ?) ORDER BY started_at DESC, id LIMIT ?"
    ))
    .bind(connector)
    .bind(connector)
    .bind(limit)
    .fetch_all(&store.pool)
    .await?;
    rows.iter().map(run_row).collect()
}

pub(super) async fn stored_objects(
    store: &SqliteStore,
    connector: &str,
    anchors: &[String],
) -> Result<HashMap<String, StoredObject>, StoreError> {
    let mut out = HashMap::new();
    for chunk in anchors.chunks(ROWS_PER_STATEMENT) {
        let mut q = Builder::new(
            "SELECT anchor, object_type, attributes_json, deleted, seen_run FROM cs_objects WHERE connector_id = ",
        );
        q.push_bind(connector).push(" AND anchor IN ");
        push_in(&mut q, chunk.iter());
        for r in build_once(&mut q).fetch_all(&store.pool).await? {
            out.insert(r.try_get(0)?, stored_object(&r, 1)?);
        }
    }
    Ok(out)
}

pub(super) async fn connector_space(
    store: &SqliteStore,
    connector: &str,
    search: Option<&str>,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<SpaceObjectRow>, StoreError> {
    let anchor_pattern = search.map(like_pattern);
    let json_pattern = search.map(|q| like_pattern(&json_escaped(q)));
    // The cursor is in the statement only when there is one: `?2 IS NULL OR anchor > ?2`
    // would read every row before it instead of seeking to it.
    let after_clause = if after.is_some() {
        "AND o.anchor > ?2"
    } else {
        ""
    };
    let rows = sqlx::query(&format!(
        "{SPACE_PAGE_HEAD} {after_clause} {SPACE_PAGE_TAIL}"
    ))
    .bind(connector)
    .bind(after)
    .bind(&anchor_pattern)
    .bind(&json_pattern)
    .bind(limit)
    .fetch_all(&store.pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(SpaceObjectRow {
                anchor: r.try_get(0)?,
                object_type: r.try_get(1)?,
                dn: r.try_get(2)?,
                deleted: r.try_get::<i64, _>(3)? != 0,
                identity_id: r.try_get(4)?,
            })
        })
        .collect()
}

pub(super) async fn connector_object(
    store: &SqliteStore,
    connector: &str,
    anchor: &str,
) -> Result<Option<SpaceObject>, StoreError> {
    let row = sqlx::query(
        "SELECT o.anchor, o.object_type, o.attributes_json, o.deleted, o.dirty, o.seen_run, \
         o.updated_at, l.identity_id FROM cs_objects o LEFT JOIN identity_links l \
         ON l.connector_id = o.connector_id AND l.anchor = o.anchor \
         WHERE o.connector_id = ? AND o.anchor = ?",
    )
    .bind(connector)
    .bind(anchor)
    .fetch_optional(&store.pool)
    .await?;
    row.map(|r| {
        Ok(SpaceObject {
            anchor: r.try_get(0)?,
            object_type: r.try_get(1)?,
            attributes_json: r.try_get(2)?,
            deleted: r.try_get::<i64, _>(3)? != 0,
            pending: r.try_get::<i64, _>(4)? != 0,
            seen_run: r.try_get(5)?,
            updated_at_ms: r.try_get(6)?,
            identity_id: r.try_get(7)?,
        })
    })
    .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connector-space page seeks to its cursor on the primary key and reads in its order:
    /// no scan from the connector's first object, no sort of the connector space.
    #[tokio::test]
    async fn connector_space_pages_seek_on_the_primary_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db")).await.unwrap();
        store.migrate().await.unwrap();
        for (after, seek) in [
            ("AND o.anchor > ?2", "(connector_id=? AND anchor>?)"),
            ("", "(connector_id=?)"),
        ] {
            let plan: Vec<String> = sqlx::query(&format!(
                "EXPLAIN QUERY PLAN {SPACE_PAGE_HEAD} {after} {SPACE_PAGE_TAIL}"
            ))
            .bind("c")
            .bind("a")
            .bind("%x%")
            .bind("%x%")
            .bind(10)
            .fetch_all(&store.pool)
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<String, _>(3))
            .collect();
            assert!(
                plan.iter()
                    .any(|d| d.starts_with("SEARCH o USING INDEX") && d.ends_with(seek)),
                "{after}: {plan:?}"
            );
            assert!(
                !plan.iter().any(|d| d.contains("TEMP B-TREE")),
                "{after}: {plan:?}"
            );
        }
    }
}
