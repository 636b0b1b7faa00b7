//! The composer's side: objects waiting for it, recompose marks, identities with their
//! join keys and links, and the compose commit.

use std::collections::HashMap;

use sqlx::Row;

use super::multi::{build_once, push_in, push_rowids_matching, Builder, ROWS_PER_STATEMENT};
use super::*;

/// An identity's end state in a compose: its row and join keys, or None when deleted.
type IdentityPut<'a> = Option<(&'a IdentityRow, &'a Vec<(String, String)>)>;

const LINK_COLUMNS: &str =
    "SELECT connector_id, anchor, identity_id, precedence, contribution_json FROM identity_links";

fn link_row(r: &sqlx::sqlite::SqliteRow) -> Result<LinkRow, StoreError> {
    Ok(LinkRow {
        connector_id: r.try_get(0)?,
        anchor: r.try_get(1)?,
        identity_id: r.try_get(2)?,
        precedence: r.try_get(3)?,
        contribution_json: r.try_get(4)?,
    })
}

const IDENTITY_COLUMNS: &str =
    "SELECT id, display_name, attributes_json, created_at, updated_at FROM identities";

fn identity_row(r: &sqlx::sqlite::SqliteRow) -> Result<IdentityRow, StoreError> {
    Ok(IdentityRow {
        id: r.try_get(0)?,
        display_name: r.try_get(1)?,
        attributes_json: r.try_get(2)?,
        created_at_ms: r.try_get(3)?,
        updated_at_ms: r.try_get(4)?,
    })
}

/// The end state of composer writes, inside the caller's fenced transaction.
pub(super) async fn write_compose(
    tx: &mut Tx<'_>,
    writes: &[ComposeWrite],
) -> Result<(), StoreError> {
    // The final state of each identity and link the chunk touched (the writes are in order,
    // so the last one wins), then a few multi-row statements: one round trip to SQLite's
    // worker per statement, not several per object.
    let mut identities: Vec<&str> = Vec::new();
    let mut identity_state: HashMap<&str, IdentityPut<'_>> = HashMap::new();
    let mut links: Vec<(&str, &str)> = Vec::new();
    let mut link_state: HashMap<(&str, &str), Option<&LinkRow>> = HashMap::new();
    let mut composed: Vec<(&str, &str, i64)> = Vec::new();
    let mut audits: Vec<&AuditEntry> = Vec::new();
    for w in writes {
        match w {
            ComposeWrite::PutIdentity { identity, keys } => {
                if identity_state
                    .insert(&identity.id, Some((identity, keys)))
                    .is_none()
                {
                    identities.push(&identity.id);
                }
            }
            ComposeWrite::DeleteIdentity { id } => {
                if identity_state.insert(id, None).is_none() {
                    identities.push(id);
                }
            }
            ComposeWrite::PutLink(l) => {
                let k = (l.connector_id.as_str(), l.anchor.as_str());
                if link_state.insert(k, Some(l)).is_none() {
                    links.push(k);
                }
            }
            ComposeWrite::DeleteLink {
                connector_id,
                anchor,
            } => {
                let k = (connector_id.as_str(), anchor.as_str());
                if link_state.insert(k, None).is_none() {
                    links.push(k);
                }
            }
            ComposeWrite::Composed {
                connector_id,
                anchor,
                rev,
            } => composed.push((connector_id, anchor, *rev)),
            ComposeWrite::Audit(e) => audits.push(e),
        }
    }
    // Identities: every touched one loses its keys; deleted ones go, the rest are upserted
    // with their new keys.
    for chunk in identities.chunks(ROWS_PER_STATEMENT) {
        let mut q = Builder::new("DELETE FROM identity_keys WHERE identity_id IN ");
        push_in(&mut q, chunk.iter().copied());
        build_once(&mut q).execute(&mut **tx).await?;
        let deleted: Vec<&str> = chunk
            .iter()
            .copied()
            .filter(|id| identity_state[id].is_none())
            .collect();
        if !deleted.is_empty() {
            let mut q = Builder::new("DELETE FROM identities WHERE id IN ");
            push_in(&mut q, deleted);
            build_once(&mut q).execute(&mut **tx).await?;
        }
        let puts: Vec<(&IdentityRow, &Vec<(String, String)>)> =
            chunk.iter().filter_map(|id| identity_state[*id]).collect();
        if puts.is_empty() {
            continue;
        }
        let mut q = Builder::new(
            "INSERT INTO identities (id, display_name, attributes_json, created_at, updated_at) ",
        );
        q.push_values(&puts, |mut row, (i, _)| {
            row.push_bind(&i.id)
                .push_bind(&i.display_name)
                .push_bind(&i.attributes_json)
                .push_bind(i.created_at_ms)
                .push_bind(i.updated_at_ms);
        });
        q.push(
            " ON CONFLICT (id) DO UPDATE SET display_name = excluded.display_name, \
             attributes_json = excluded.attributes_json, updated_at = excluded.updated_at",
        );
        build_once(&mut q).execute(&mut **tx).await?;
        let keys: Vec<(&str, &(String, String))> = puts
            .iter()
            .flat_map(|(i, ks)| ks.iter().map(move |k| (i.id.as_str(), k)))
            .collect();
        for kc in keys.chunks(ROWS_PER_STATEMENT) {
            let mut q =
                Builder::new("INSERT OR IGNORE INTO identity_keys (attr, value, identity_id) ");
            q.push_values(kc, |mut row, (id, (attr, value))| {
                row.push_bind(attr).push_bind(value).push_bind(*id);
            });
            build_once(&mut q).execute(&mut **tx).await?;
        }
    }
    for chunk in links.chunks(ROWS_PER_STATEMENT) {
        let gone: Vec<&(&str, &str)> = chunk.iter().filter(|k| link_state[*k].is_none()).collect();
        if !gone.is_empty() {
            let mut q = Builder::new("DELETE FROM identity_links WHERE rowid IN ");
            let cols = ["connector_id", "anchor"];
            push_rowids_matching(&mut q, "identity_links", &cols, gone, |r, (c, a)| {
                r.push_bind(*c);
                r.push_bind(*a);
            });
            build_once(&mut q).execute(&mut **tx).await?;
        }
        let puts: Vec<&LinkRow> = chunk.iter().filter_map(|k| link_state[k]).collect();
        if !puts.is_empty() {
            let mut q = Builder::new(
                "INSERT INTO identity_links (connector_id, anchor, identity_id, precedence, contribution_json) ",
            );
            q.push_values(&puts, |mut row, l| {
                row.push_bind(&l.connector_id)
                    .push_bind(&l.anchor)
                    .push_bind(&l.identity_id)
                    .push_bind(l.precedence)
                    .push_bind(&l.contribution_json);
            });
            q.push(
                " ON CONFLICT (connector_id, anchor) DO UPDATE SET identity_id = excluded.identity_id, \
                 precedence = excluded.precedence, contribution_json = excluded.contribution_json",
            );
            build_once(&mut q).execute(&mut **tx).await?;
        }
    }
    // Composed: a deleted object at that revision goes; any other loses its mark (only at
    // the revision the composer read, so a newer import stays marked).
    for chunk in composed.chunks(ROWS_PER_STATEMENT) {
        for head in [
            "DELETE FROM cs_objects WHERE deleted = 1 AND rowid IN ",
            "UPDATE cs_objects SET dirty = 0 WHERE rowid IN ",
        ] {
            let mut q = Builder::new(head);
            let cols = ["connector_id", "anchor", "rev"];
            push_rowids_matching(&mut q, "cs_objects", &cols, chunk, |r, (c, a, rev)| {
                r.push_bind(*c);
                r.push_bind(*a);
                r.push_bind(*rev);
            });
            build_once(&mut q).execute(&mut **tx).await?;
        }
    }
    for chunk in audits.chunks(ROWS_PER_STATEMENT) {
        let mut q = Builder::new("INSERT INTO audit_log (at, actor, action, target, detail) ");
        q.push_values(chunk, |mut row, e| {
            row.push_bind(e.at_ms)
                .push_bind(&e.actor)
                .push_bind(&e.action)
                .push_bind(&e.target)
                .push_bind(&e.detail);
        });
        build_once(&mut q).execute(&mut **tx).await?;
    }
    Ok(())
}

pub(super) async fn dirty_objects(
    store: &SqliteStore,
    connector: &str,
    limit: i64,
) -> Result<Vec<DirtyObject>, StoreError> {
    let rows = sqlx::query(
        "SELECT anchor, object_type, attributes_json, deleted, rev FROM cs_objects \
         WHERE connector_id = ? AND dirty = 1 ORDER BY updated_at, anchor LIMIT ?",
    )
    .bind(connector)
    .bind(limit)
    .fetch_all(&store.pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(DirtyObject {
                anchor: r.try_get(0)?,
                object_type: r.try_get(1)?,
                attributes_json: r.try_get(2)?,
                deleted: r.try_get::<i64, _>(3)? != 0,
                rev: r.try_get(4)?,
            })
        })
        .collect()
}

pub(super) async fn mark_for_recompose(
    store: &SqliteStore,
    token: &FenceToken,
    connector: &str,
    ruled_types: &[String],
) -> Result<u64, StoreError> {
    let ruled = json_list(ruled_types);
    let (_slot, mut tx) = store.begin_locked().await?;
    fence::check(&mut tx, token).await?;
    let n = sqlx::query(
        "UPDATE cs_objects SET dirty = 1 WHERE connector_id = ?1 AND dirty = 0 \
         AND (object_type IN (SELECT value FROM json_each(?2)) \
         OR EXISTS (SELECT 1 FROM identity_links l WHERE l.connector_id = cs_objects.connector_id AND l.anchor = cs_objects.anchor))",
    )
    .bind(connector)
    .bind(&ruled)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    fence::journal_insert(&mut tx, "compose", token.epoch, &token.instance, now_ms()).await?;
    tx.commit().await?;
    Ok(n)
}

pub(super) async fn settle_unruled(
    store: &SqliteStore,
    token: &FenceToken,
    connector: &str,
    ruled_types: &[String],
    limit: i64,
) -> Result<u64, StoreError> {
    let ruled = json_list(ruled_types);
    let (_slot, mut tx) = store.begin_locked().await?;
    fence::check(&mut tx, token).await?;
    // As `Composed` does: a deleted object goes, any other loses its mark.
    let mut n = 0;
    for head in [
        "DELETE FROM cs_objects WHERE rowid IN (SELECT o.rowid FROM cs_objects o WHERE o.deleted = 1 AND ",
        "UPDATE cs_objects SET dirty = 0 WHERE rowid IN (SELECT o.rowid FROM cs_objects o WHERE ",
    ] {
        n += sqlx::query(&format!(
            "{head}o.connector_id = ?1 AND o.dirty = 1 \
             AND o.object_type NOT IN (SELECT value FROM json_each(?2)) \
             AND NOT EXISTS (SELECT 1 FROM identity_links l WHERE l.connector_id = o.connector_id AND l.anchor = o.anchor) \
             LIMIT ?3)"
        ))
        .bind(connector)
        .bind(&ruled)
        .bind(limit)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    }
    fence::journal_insert(&mut tx, "compose", token.epoch, &token.instance, now_ms()).await?;
    tx.commit().await?;
    Ok(n)
}

pub(super) async fn link(
    store: &SqliteStore,
    connector: &str,
    anchor: &str,
) -> Result<Option<LinkRow>, StoreError> {
    sqlx::query(&format!(
        "{LINK_COLUMNS} WHERE connector_id = ? AND anchor = ?"
    ))
    .bind(connector)
    .bind(anchor)
    .fetch_optional(&store.pool)
    .await?
    .as_ref()
    .map(link_row)
    .transpose()
}

pub(super) async fn links_of_identity(
    store: &SqliteStore,
    identity_id: &str,
) -> Result<Vec<LinkRow>, StoreError> {
    let rows = sqlx::query(&format!(
        "{LINK_COLUMNS} WHERE identity_id = ? ORDER BY precedence, connector_id"
    ))
    .bind(identity_id)
    .fetch_all(&store.pool)
    .await?;
    rows.iter().map(link_row).collect()
}

pub(super) async fn identities_by_key(
    store: &SqliteStore,
    attr: &str,
    value: &str,
) -> Result<Vec<String>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT identity_id FROM identity_keys WHERE attr = ? AND value = ? ORDER BY identity_id LIMIT 16",
    )
    .bind(attr)
    .bind(value)
    .fetch_all(&store.pool)
    .await?)
}

pub(super) async fn identity(
    store: &SqliteStore,
    id: &str,
) -> Result<Option<IdentityRow>, StoreError> {
    sqlx::query(&format!("{IDENTITY_COLUMNS} WHERE id = ?"))
        .bind(id)
        .fetch_optional(&store.pool)
        .await?
        .as_ref()
        .map(identity_row)
        .transpose()
}

pub(super) async fn links_for(
    store: &SqliteStore,
    connector: &str,
    anchors: &[String],
) -> Result<Vec<LinkRow>, StoreError> {
    let mut out = Vec::new();
    for chunk in anchors.chunks(ROWS_PER_STATEMENT) {
        let mut q = Builder::new(format!("{LINK_COLUMNS} WHERE connector_id = "));
        q.push_bind(connector).push(" AND anchor IN ");
        push_in(&mut q, chunk);
        for r in build_once(&mut q).fetch_all(&store.pool).await? {
            out.push(link_row(&r)?);
        }
    }
    Ok(out)
}

pub(super) async fn identities_by_keys(
    store: &SqliteStore,
    keys: &[(String, String)],
) -> Result<Vec<(String, String, String)>, StoreError> {
    let mut out = Vec::new();
    for chunk in keys.chunks(ROWS_PER_STATEMENT) {
        let mut q =
            Builder::new("SELECT attr, value, identity_id FROM identity_keys WHERE rowid IN ");
        push_rowids_matching(
            &mut q,
            "identity_keys",
            &["attr", "value"],
            chunk,
            |r, (a, v)| {
                r.push_bind(a);
                r.push_bind(v);
            },
        );
        for r in build_once(&mut q).fetch_all(&store.pool).await? {
            out.push((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?));
        }
    }
    Ok(out)
}

pub(super) async fn identities_with_links(
    store: &SqliteStore,
    ids: &[String],
) -> Result<(Vec<IdentityRow>, Vec<LinkRow>), StoreError> {
    let (mut rows, mut links) = (Vec::new(), Vec::new());
    for chunk in ids.chunks(ROWS_PER_STATEMENT) {
        for (head, is_links) in [
            (format!("{IDENTITY_COLUMNS} WHERE id IN "), false),
            (format!("{LINK_COLUMNS} WHERE identity_id IN "), true),
        ] {
            let mut q = Builder::new(head);
            push_in(&mut q, chunk);
            for r in build_once(&mut q).fetch_all(&store.pool).await? {
                if is_links {
                    links.push(link_row(&r)?);
                } else {
                    rows.push(identity_row(&r)?);
                }
            }
        }
    }
    Ok((rows, links))
}

pub(super) async fn identities(
    store: &SqliteStore,
    search: Option<&str>,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<IdentityRow>, StoreError> {
    let pattern = search.map(like_pattern);
    let rows = sqlx::query(&format!(
        "{IDENTITY_COLUMNS} WHERE (? IS NULL OR display_name LIKE ? ESCAPE '\\' OR id = ?) \
         AND (? IS NULL OR id > ?) ORDER BY id LIMIT ?"
    ))
    .bind(&pattern)
    .bind(&pattern)
    .bind(search)
    .bind(after)
    .bind(after)
    .bind(limit)
    .fetch_all(&store.pool)
    .await?;
    rows.iter().map(identity_row).collect()
}

pub(super) async fn count_identities(store: &SqliteStore) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar("SELECT COUNT(*) FROM identities")
        .fetch_one(&store.pool)
        .await?)
}

pub(super) async fn commit_compose(
    store: &SqliteStore,
    token: &FenceToken,
    writes: &[ComposeWrite],
    now_ms: i64,
) -> Result<(), StoreError> {
    let (_slot, mut tx) = store.begin_locked().await?;
    fence::check(&mut tx, token).await?;
    write_compose(&mut tx, writes).await?;
    fence::journal_insert(&mut tx, "compose", token.epoch, &token.instance, now_ms).await?;
    tx.commit().await?;
    Ok(())
}
