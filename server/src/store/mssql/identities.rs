//! The composer's side: objects waiting for it, recompose marks, identities with their
//! join keys and links, and the compose commit.

use std::collections::{HashMap, HashSet};

use super::*;

/// An identity as a compose commit leaves it: the last put's values, with the creation time
/// of the put that would have inserted it (the first one since it was last deleted; a kept
/// row keeps its own).
struct IdentityPut<'a> {
    row: &'a IdentityRow,
    created_at_ms: &'a i64,
}

/// What a compose commit's writes leave behind, applied in order: the same end state as
/// writing them one at a time, as rows for the multi-row statements.
#[derive(Default)]
pub(super) struct ComposeRows<'a> {
    /// Every identity a write touched: its join keys are replaced.
    touched: Vec<&'a str>,
    /// Deleted, or deleted and put again (then inserted anew, as one by one).
    deleted: Vec<&'a str>,
    puts: Vec<IdentityPut<'a>>,
    keys: Vec<(&'a str, &'a str, &'a str)>,
    links_deleted: Vec<(&'a str, &'a str)>,
    links_put: Vec<&'a LinkRow>,
    composed: Vec<(&'a str, &'a str, &'a i64)>,
    audits: Vec<&'a AuditEntry>,
}

type IdentityEnd<'a> = (Option<(IdentityPut<'a>, &'a [(String, String)])>, bool);

impl<'a> ComposeRows<'a> {
    pub(super) fn of(writes: &'a [ComposeWrite]) -> Self {
        let mut rows = ComposeRows::default();
        // Per identity: its last put with its keys, and whether a delete came before it.
        let mut identities: HashMap<&str, IdentityEnd<'a>> = HashMap::new();
        let mut links: HashMap<(&str, &str), Option<&LinkRow>> = HashMap::new();
        let mut link_order = Vec::new();
        for w in writes {
            match w {
                ComposeWrite::PutIdentity { identity, keys } => {
                    let end = identities.entry(&identity.id).or_insert_with(|| {
                        rows.touched.push(&identity.id);
                        (None, false)
                    });
                    let created_at_ms = match &end.0 {
                        Some((earlier, _)) => earlier.created_at_ms,
                        None => &identity.created_at_ms,
                    };
                    let put = IdentityPut {
                        row: identity,
                        created_at_ms,
                    };
                    end.0 = Some((put, keys));
                }
                ComposeWrite::DeleteIdentity { id } => {
                    let end = identities.entry(id).or_insert_with(|| {
                        rows.touched.push(id);
                        (None, false)
                    });
                    *end = (None, true);
                }
                ComposeWrite::PutLink(l) => {
                    let k = (l.connector_id.as_str(), l.anchor.as_str());
                    if links.insert(k, Some(l)).is_none() {
                        link_order.push(k);
                    }
                }
                ComposeWrite::DeleteLink {
                    connector_id,
                    anchor,
                } => {
                    let k = (connector_id.as_str(), anchor.as_str());
                    if links.insert(k, None).is_none() {
                        link_order.push(k);
                    }
                }
                ComposeWrite::Composed {
                    connector_id,
                    anchor,
                    rev,
                } => rows.composed.push((connector_id, anchor, rev)),
                ComposeWrite::Audit(e) => rows.audits.push(e),
            }
        }
        for id in &rows.touched {
            let Some((put, deleted)) = identities.remove(id) else {
                continue;
            };
            if deleted {
                rows.deleted.push(id);
            }
            if let Some((put, keys)) = put {
                let mut seen = HashSet::new();
                for (attr, value) in keys {
                    if seen.insert((attr, value)) {
                        rows.keys.push((attr, value, &put.row.id));
                    }
                }
                rows.puts.push(put);
            }
        }
        for k in link_order {
            match links.get(&k).copied().flatten() {
                Some(l) => rows.links_put.push(l),
                None => rows.links_deleted.push(k),
            }
        }
        rows
    }

    /// The statements, in the order their effects depend on: keys go before they are written
    /// again, a deleted identity before it is inserted anew.
    pub(super) fn statements(&self) -> Vec<(String, Vec<&dyn ToSql>)> {
        let mut out = chunked(&multi::DELETE_KEYS, &[], &self.touched, |id, p| p.push(id));
        out.extend(chunked(
            &multi::DELETE_IDENTITIES,
            &[],
            &self.deleted,
            |id, p| p.push(id),
        ));
        out.extend(chunked(&multi::PUT_IDENTITIES, &[], &self.puts, |i, p| {
            p.extend([
                &i.row.id as &dyn ToSql,
                &i.row.display_name,
                &i.row.attributes_json,
                i.created_at_ms,
                &i.row.updated_at_ms,
            ])
        }));
        out.extend(chunked(
            &multi::INSERT_KEYS,
            &[],
            &self.keys,
            |(a, v, id), p| p.extend([a as &dyn ToSql, v, id]),
        ));
        out.extend(chunked(
            &multi::DELETE_LINKS,
            &[],
            &self.links_deleted,
            |(c, a), p| p.extend([c as &dyn ToSql, a]),
        ));
        out.extend(chunked(&multi::PUT_LINKS, &[], &self.links_put, |l, p| {
            p.extend([
                &l.connector_id as &dyn ToSql,
                &l.anchor,
                &l.identity_id,
                &l.precedence,
                &l.contribution_json,
            ])
        }));
        out.extend(chunked(
            &multi::COMPOSED,
            &[],
            &self.composed,
            |(c, a, rev), p| p.extend([c as &dyn ToSql, a, *rev]),
        ));
        out.extend(chunked(&multi::INSERT_AUDITS, &[], &self.audits, |e, p| {
            p.extend([
                &e.at_ms as &dyn ToSql,
                &e.actor,
                &e.action,
                &e.target,
                &e.detail,
            ])
        }));
        out
    }
}

pub(super) fn link_row(r: &Row) -> Result<LinkRow, StoreError> {
    Ok(LinkRow {
        connector_id: text(r, 0)?,
        anchor: text(r, 1)?,
        identity_id: text(r, 2)?,
        precedence: col::<i32>(r, 3)?.into(),
        contribution_json: text(r, 4)?,
    })
}

fn identity_row(r: &Row) -> Result<IdentityRow, StoreError> {
    Ok(IdentityRow {
        id: text(r, 0)?,
        display_name: text(r, 1)?,
        attributes_json: text(r, 2)?,
        created_at_ms: col(r, 3)?,
        updated_at_ms: col(r, 4)?,
    })
}

/// `commit_compose` inside its transaction: the fence check, the end state of the writes
/// in a few multi-row statements, then the journal entry.
pub(super) async fn compose_chunk(
    w: &mut dyn Wire,
    token: &FenceToken,
    writes: &[ComposeWrite],
    now_ms: i64,
) -> Result<(), StoreError> {
    fence::check(w, token).await?;
    for (q, p) in ComposeRows::of(writes).statements() {
        exec(w, &q, &p).await?;
    }
    fence::journal_insert(w, "compose", token.epoch, &token.instance, now_ms).await
}

pub(super) async fn links_for_on(
    w: &mut dyn Wire,
    connector: &str,
    anchors: &[String],
) -> Result<Vec<LinkRow>, StoreError> {
    let mut out = Vec::new();
    let shared: [&dyn ToSql; 1] = [&connector];
    for (q, p) in chunked(&multi::LINKS_FOR, &shared, anchors, |a, p| p.push(a)) {
        for r in rows(w, &q, &p).await? {
            out.push(link_row(&r)?);
        }
    }
    Ok(out)
}

pub(super) async fn identities_by_keys_on(
    w: &mut dyn Wire,
    keys: &[(String, String)],
) -> Result<Vec<(String, String, String)>, StoreError> {
    let mut out = Vec::new();
    for (q, p) in chunked(&multi::IDENTITIES_BY_KEYS, &[], keys, |(a, v), p| {
        p.extend([a as &dyn ToSql, v])
    }) {
        for r in rows(w, &q, &p).await? {
            out.push((text(&r, 0)?, text(&r, 1)?, text(&r, 2)?));
        }
    }
    Ok(out)
}

pub(super) async fn identities_with_links_on(
    w: &mut dyn Wire,
    ids: &[String],
) -> Result<(Vec<IdentityRow>, Vec<LinkRow>), StoreError> {
    let (mut rows, mut links) = (Vec::new(), Vec::new());
    for (q, p) in chunked(&multi::IDENTITIES_WITH_LINKS, &[], ids, |id, p| p.push(id)) {
        let mut sets = w.fetch(&q, &p).await?.into_iter();
        for r in sets.next().unwrap_or_default() {
            rows.push(identity_row(&r)?);
        }
        for r in sets.next().unwrap_or_default() {
            links.push(link_row(&r)?);
        }
    }
    Ok((rows, links))
}

pub(super) async fn dirty_objects(
    store: &MssqlStore,
    connector: &str,
    limit: i64,
) -> Result<Vec<DirtyObject>, StoreError> {
    store
        .read(sql::DIRTY_OBJECTS, &[&connector, &limit], |r| {
            Ok(DirtyObject {
                anchor: text(r, 0)?,
                object_type: text(r, 1)?,
                attributes_json: text(r, 2)?,
                deleted: col(r, 3)?,
                rev: col(r, 4)?,
            })
        })
        .await
}

pub(super) async fn mark_for_recompose(
    store: &MssqlStore,
    token: &FenceToken,
    connector: &str,
    ruled_types: &[String],
) -> Result<u64, StoreError> {
    let ruled = json_list(ruled_types);
    let mut conn = store.begin().await?;
    let r = async {
        fence::check(&mut conn, token).await?;
        let n = exec(
            &mut conn,
            sql::MARK_FOR_RECOMPOSE,
            &[&connector, &ruled.as_str()],
        )
        .await?;
        fence::journal_insert(&mut conn, "compose", token.epoch, &token.instance, now_ms()).await?;
        Ok(n)
    }
    .await;
    store.finish(conn, r).await
}

pub(super) async fn settle_unruled(
    store: &MssqlStore,
    token: &FenceToken,
    connector: &str,
    ruled_types: &[String],
    limit: i64,
) -> Result<u64, StoreError> {
    let ruled = json_list(ruled_types);
    let mut conn = store.begin().await?;
    let r = async {
        fence::check(&mut conn, token).await?;
        // As `Composed` does: a deleted object goes, any other loses its mark.
        let params: [&dyn ToSql; 3] = [&connector, &ruled.as_str(), &limit];
        let mut n = exec(&mut conn, sql::DROP_UNRULED_TOMBSTONES, &params).await?;
        n += exec(&mut conn, sql::SETTLE_UNRULED, &params).await?;
        fence::journal_insert(&mut conn, "compose", token.epoch, &token.instance, now_ms()).await?;
        Ok(n)
    }
    .await;
    store.finish(conn, r).await
}

pub(super) async fn link(
    store: &MssqlStore,
    connector: &str,
    anchor: &str,
) -> Result<Option<LinkRow>, StoreError> {
    Ok(store
        .read(sql::LINK, &[&connector, &anchor], link_row)
        .await?
        .into_iter()
        .next())
}

pub(super) async fn links_of_identity(
    store: &MssqlStore,
    identity_id: &str,
) -> Result<Vec<LinkRow>, StoreError> {
    store
        .read(sql::LINKS_OF_IDENTITY, &[&identity_id], link_row)
        .await
}

pub(super) async fn identities_by_key(
    store: &MssqlStore,
    attr: &str,
    value: &str,
) -> Result<Vec<String>, StoreError> {
    store
        .read(sql::IDENTITIES_BY_KEY, &[&attr, &value], |r| text(r, 0))
        .await
}

pub(super) async fn identity(
    store: &MssqlStore,
    id: &str,
) -> Result<Option<IdentityRow>, StoreError> {
    Ok(store
        .read(sql::IDENTITY, &[&id], identity_row)
        .await?
        .into_iter()
        .next())
}

pub(super) async fn links_for(
    store: &MssqlStore,
    connector: &str,
    anchors: &[String],
) -> Result<Vec<LinkRow>, StoreError> {
    if anchors.is_empty() {
        return Ok(Vec::new());
    }
    let mut conn = store.take().await?;
    let r = links_for_on(&mut conn, connector, anchors).await;
    store.kept(conn, r)
}

pub(super) async fn identities_by_keys(
    store: &MssqlStore,
    keys: &[(String, String)],
) -> Result<Vec<(String, String, String)>, StoreError> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let mut conn = store.take().await?;
    let r = identities_by_keys_on(&mut conn, keys).await;
    store.kept(conn, r)
}

pub(super) async fn identities_with_links(
    store: &MssqlStore,
    ids: &[String],
) -> Result<(Vec<IdentityRow>, Vec<LinkRow>), StoreError> {
    if ids.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let mut conn = store.take().await?;
    let r = identities_with_links_on(&mut conn, ids).await;
    store.kept(conn, r)
}

pub(super) async fn identities(
    store: &MssqlStore,
    search: Option<&str>,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<IdentityRow>, StoreError> {
    let pattern = search.map(like_pattern);
    store
        .read(
            sql::IDENTITIES,
            &[&pattern.as_deref(), &search, &after, &limit],
            identity_row,
        )
        .await
}

pub(super) async fn count_identities(store: &MssqlStore) -> Result<i64, StoreError> {
    let v = store
        .read(sql::COUNT_IDENTITIES, &[], |r| col(r, 0))
        .await?;
    Ok(v.into_iter().next().unwrap_or(0))
}

pub(super) async fn commit_compose(
    store: &MssqlStore,
    token: &FenceToken,
    writes: &[ComposeWrite],
    now_ms: i64,
) -> Result<(), StoreError> {
    let mut conn = store.begin().await?;
    let r = compose_chunk(&mut conn, token, writes, now_ms).await;
    store.finish(conn, r).await
}

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::*;

    /// One write at a time, such a chunk cost 10 round trips an object (an identity upsert of
    /// two, its keys' delete and one insert a key, a link upsert of two, two for the composed
    /// mark, one for the audit entry) plus BEGIN, fence, journal and COMMIT: 104 for 10
    /// objects, 5,004 for 500. Now it is a few statements a table.
    #[test]
    fn a_compose_chunk_costs_a_few_round_trips_a_table() {
        let mut trips = Vec::new();
        for n in [10, 300, 500, 1000] {
            let writes = compose_chunk_of(n);
            let mut w = Recorder::new(fence_only);
            block_on(compose_chunk(&mut w, &token(), &writes, 1)).unwrap();
            assert_eq!(w.sent.first().map(String::as_str), Some(sql::FENCE_LOCKED));
            assert_eq!(w.sent.last().map(String::as_str), Some(sql::JOURNAL));
            trips.push(TX_FRAME + w.sent.len());
        }
        // BEGIN, fence, keys deleted, identities, keys, links, composed, audit, journal,
        // COMMIT, up to 347 objects with two keys each; past that one more request for every
        // 418 rows of a five-column statement and 695 keys.
        assert_eq!(trips, vec![10, 10, 14, 19]);
    }

    /// The composer's reads for a chunk: one request each up to a statement's worth of input
    /// (one a link, two an identity one by one).
    #[test]
    fn prefetch_reads_cost_one_round_trip_a_statement() {
        for (n, per_read) in [(10, 1), (500, 1), (1000, 1), (1200, 2)] {
            let strings: Vec<String> = (0..n).map(|i| format!("s{i}")).collect();
            let pairs: Vec<(String, String)> =
                strings.iter().map(|s| ("mail".into(), s.clone())).collect();
            let mut w = Recorder::new(|_: &str, _: &[tiberius::ColumnData<'_>]| Vec::new());
            block_on(async {
                links_for_on(&mut w, "corp", &strings).await.unwrap();
                identities_by_keys_on(&mut w, &pairs).await.unwrap();
                identities_with_links_on(&mut w, &strings).await.unwrap();
            });
            assert_eq!(w.sent.len(), 3 * per_read, "{n}");
        }
    }

    #[test]
    fn compose_rows_are_the_end_state_of_the_writes_in_order() {
        let put =
            |id: &str, name: &str, at: i64, keys: &[(&str, &str)]| ComposeWrite::PutIdentity {
                identity: IdentityRow {
                    id: id.into(),
                    display_name: name.into(),
                    attributes_json: "{}".into(),
                    created_at_ms: at,
                    updated_at_ms: at,
                },
                keys: keys
                    .iter()
                    .map(|(a, v)| (a.to_string(), v.to_string()))
                    .collect(),
            };
        let delete = |id: &str| ComposeWrite::DeleteIdentity { id: id.into() };
        let link = |anchor: &str, id: &str| {
            ComposeWrite::PutLink(LinkRow {
                connector_id: "corp".into(),
                anchor: anchor.into(),
                identity_id: id.into(),
                precedence: 1,
                contribution_json: "{}".into(),
            })
        };
        let unlink = |anchor: &str| ComposeWrite::DeleteLink {
            connector_id: "corp".into(),
            anchor: anchor.into(),
        };
        let writes = vec![
            // Put twice: the last values, the first put's creation time (it inserted the row).
            put("a", "A1", 1, &[("mail", "a1")]),
            put("a", "A2", 2, &[("mail", "a2"), ("mail", "a2")]),
            // Deleted, then put again: a new row with the later put's creation time.
            delete("b"),
            put("b", "B", 3, &[("uid", "b")]),
            // Put, then deleted: gone, and so are its keys.
            put("c", "C", 4, &[("uid", "c")]),
            delete("c"),
            link("x", "a"),
            unlink("x"),
            unlink("y"),
            link("y", "b"),
            link("z", "a"),
            link("z", "b"),
        ];
        let rows = ComposeRows::of(&writes);
        assert_eq!(rows.touched, vec!["a", "b", "c"]);
        assert_eq!(rows.deleted, vec!["b", "c"]);
        let puts: Vec<(&str, &str, i64, i64)> = rows
            .puts
            .iter()
            .map(|p| {
                (
                    p.row.id.as_str(),
                    p.row.display_name.as_str(),
                    *p.created_at_ms,
                    p.row.updated_at_ms,
                )
            })
            .collect();
        assert_eq!(puts, vec![("a", "A2", 1, 2), ("b", "B", 3, 3)]);
        assert_eq!(rows.keys, vec![("mail", "a2", "a"), ("uid", "b", "b")]);
        assert_eq!(rows.links_deleted, vec![("corp", "x")]);
        let links: Vec<(&str, &str)> = rows
            .links_put
            .iter()
            .map(|l| (l.anchor.as_str(), l.identity_id.as_str()))
            .collect();
        assert_eq!(links, vec![("y", "b"), ("z", "b")]);
        // Keys are deleted before they are written again, a deleted identity before it is
        // inserted anew.
        let order: Vec<String> = rows
            .statements()
            .into_iter()
            .map(|(q, _)| q.split(" FROM").next().unwrap_or_default().to_string())
            .collect();
        assert_eq!(
            order,
            vec![
                "DELETE k",
                "DELETE i",
                "MERGE identities AS t USING (VALUES (@P1, @P2, @P3, @P4, @P5), (@P6, @P7, @P8, @P9, @P10)) AS v(id, display_name, attributes_json, created_at, updated_at) ON t.id = v.id WHEN MATCHED THEN UPDATE SET display_name = v.display_name, attributes_json = v.attributes_json, updated_at = v.updated_at WHEN NOT MATCHED THEN INSERT (id, display_name, attributes_json, created_at, updated_at) VALUES (v.id, v.display_name, v.attributes_json, v.created_at, v.updated_at);",
                "INSERT INTO identity_keys (attr, value, identity_id) SELECT DISTINCT v.attr, v.value, v.identity_id",
                "DELETE l",
                "MERGE identity_links AS t USING (VALUES (@P1, @P2, @P3, @P4, @P5), (@P6, @P7, @P8, @P9, @P10)) AS v(connector_id, anchor, identity_id, precedence, contribution_json) ON t.connector_id = v.connector_id AND t.anchor = v.anchor WHEN MATCHED THEN UPDATE SET identity_id = v.identity_id, precedence = v.precedence, contribution_json = v.contribution_json WHEN NOT MATCHED THEN INSERT (connector_id, anchor, identity_id, precedence, contribution_json) VALUES (v.connector_id, v.anchor, v.identity_id, v.precedence, v.contribution_json);",
            ]
        );
    }
}
