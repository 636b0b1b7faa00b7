//! The import side: runs, import batches and watermarks, and the connector space they write
//! (cs objects, as stored and as listed).

use std::collections::HashMap;

use super::identities::ComposeRows;
use super::*;

/// The counters are INT columns, read as i32.
fn run_row(r: &Row) -> Result<RunRow, StoreError> {
    Ok(RunRow {
        id: text(r, 0)?,
        connector_id: text(r, 1)?,
        instance: text(r, 2)?,
        epoch: col(r, 3)?,
        mode: text(r, 4)?,
        trigger: text(r, 5)?,
        status: text(r, 6)?,
        started_at_ms: col(r, 7)?,
        finished_at_ms: opt(r, 8)?,
        added: col::<i32>(r, 9)?.into(),
        updated: col::<i32>(r, 10)?.into(),
        unchanged: col::<i32>(r, 11)?.into(),
        deleted: col::<i32>(r, 12)?.into(),
        failed: col::<i32>(r, 13)?.into(),
        error: opt::<&str>(r, 14)?.map(str::to_string),
        errors_json: opt::<&str>(r, 15)?.map(str::to_string),
    })
}

/// The page's objects in rounds of distinct anchors, in page order: an anchor the page holds
/// twice is written again in the next round, as writing one object at a time did (a MERGE may
/// touch a row only once). Anchors that differ only in case count as one, as they do under
/// SQL Server's default, case-insensitive collation.
fn rounds(objects: &[CsObject]) -> Vec<Vec<&CsObject>> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut rounds: Vec<Vec<&CsObject>> = Vec::new();
    for o in objects {
        let n = seen.entry(o.anchor.to_lowercase()).or_insert(0);
        if rounds.len() == *n {
            rounds.push(Vec::new());
        }
        rounds[*n].push(o);
        *n += 1;
    }
    rounds
}

/// `commit_import_batch` inside its transaction: the fence check, the stored state of the
/// page's objects, the new and changed ones in one MERGE per statement's worth, the
/// unchanged ones a full import saw, then the batch record and the journal entry.
pub(super) async fn import_page(
    w: &mut dyn Wire,
    token: &FenceToken,
    batch: &ImportBatch,
    now_ms: i64,
) -> Result<BatchOutcome, StoreError> {
    fence::check(w, token).await?;
    let mut out = BatchOutcome::default();
    for round in rounds(&batch.objects) {
        // A later round compares with what the earlier ones wrote.
        let anchors: Vec<&String> = round.iter().map(|o| &o.anchor).collect();
        let stored = stored_objects_on(w, &batch.connector, &anchors).await?;
        let (mut writes, mut unchanged) = (Vec::new(), Vec::new());
        for o in round {
            let s = stored.get(&o.anchor);
            // Seen by this run already: in an earlier batch, or in an earlier round of
            // this one, whose writes the read above sees (see `BatchOutcome::duplicates`).
            if StoredObject::seen_by(s, batch.seen_in_run.as_ref()) {
                out.duplicates.push(o.anchor.clone());
                continue;
            }
            if !StoredObject::changed_by(s, o) {
                out.unchanged += 1;
                unchanged.push(o);
                continue;
            }
            if s.is_some() {
                out.updated += 1;
            } else {
                out.added += 1;
            }
            writes.push(o);
        }
        write_round(w, batch, &writes, &unchanged, now_ms).await?;
    }
    if let Some(page) = &batch.composed {
        for (q, p) in ComposeRows::of(&page.writes).statements() {
            exec(w, &q, &p).await?;
        }
    }
    let count = batch.objects.len() as i32;
    let rows = rows(
        w,
        sql::IMPORT_TAIL,
        &[
            &batch.connector.as_str(),
            &batch.object_type.as_str(),
            &count,
            &batch.watermark.as_deref(),
            &token.epoch,
            &token.instance.as_str(),
            &now_ms,
        ],
    )
    .await?;
    let seq: i64 = col(
        rows.first()
            .ok_or_else(|| StoreError::Backend("no batch sequence returned".into()))?,
        0,
    )?;
    out.seq = seq as u64;
    Ok(out)
}

/// Writes a round's new and changed objects, and records the unchanged ones as seen by a
/// full import.
async fn write_round(
    w: &mut dyn Wire,
    batch: &ImportBatch,
    writes: &[&CsObject],
    unchanged: &[&CsObject],
    now_ms: i64,
) -> Result<(), StoreError> {
    // Objects the batch composes itself, and the rest: the two differ only in the mark.
    let (composed, marked): (Vec<&CsObject>, Vec<&CsObject>) = writes
        .iter()
        .partition(|o| PageCompose::covers(&batch.composed, &o.anchor));
    for (group, composed) in [(marked, false), (composed, true)] {
        let shared: [&dyn ToSql; 5] = [
            &batch.connector,
            &now_ms,
            &batch.seen_in_run,
            &batch.compose,
            &composed,
        ];
        for (q, p) in chunked(&multi::WRITE_OBJECTS, &shared, &group, |o, p| {
            p.extend([&o.anchor as &dyn ToSql, &o.object_type, &o.attributes_json])
        }) {
            exec(w, &q, &p).await?;
        }
    }
    if let Some(run) = &batch.seen_in_run {
        let shared: [&dyn ToSql; 2] = [&batch.connector, run];
        for (q, p) in chunked(&multi::SEEN_OBJECTS, &shared, unchanged, |o, p| {
            p.push(&o.anchor)
        }) {
            exec(w, &q, &p).await?;
        }
    }
    Ok(())
}

/// The stored state of those of the objects that exist, by their anchor as the page spells
/// it (the match is the server's collation's, as one object at a time).
pub(super) async fn stored_objects_on(
    w: &mut dyn Wire,
    connector: &str,
    anchors: &[&String],
) -> Result<HashMap<String, StoredObject>, StoreError> {
    let mut stored = HashMap::new();
    let shared: [&dyn ToSql; 1] = [&connector];
    for (q, p) in chunked(&multi::STORED_OBJECTS, &shared, anchors, |a, p| p.push(*a)) {
        for r in rows(w, &q, &p).await? {
            let s = StoredObject {
                object_type: text(&r, 1)?,
                attributes_json: text(&r, 2)?,
                deleted: col(&r, 3)?,
                seen_run: opt::<&str>(&r, 4)?.map(str::to_string),
            };
            stored.insert(text(&r, 0)?, s);
        }
    }
    Ok(stored)
}

pub(super) async fn commit_import_batch(
    store: &MssqlStore,
    token: &FenceToken,
    batch: &ImportBatch,
    now_ms: i64,
) -> Result<BatchOutcome, StoreError> {
    let mut conn = store.begin().await?;
    let r = import_page(&mut conn, token, batch, now_ms).await;
    store.finish(conn, r).await
}

pub(super) async fn finish_full_import(
    store: &MssqlStore,
    token: &FenceToken,
    connector: &str,
    object_type: &str,
    run_id: &str,
    now_ms: i64,
) -> Result<u64, StoreError> {
    let mut conn = store.begin().await?;
    let r = async {
        fence::check(&mut conn, token).await?;
        let n = exec(
            &mut conn,
            sql::MARK_UNSEEN_DELETED,
            &[&now_ms, &connector, &object_type, &run_id],
        )
        .await?;
        fence::journal_insert(
            &mut conn,
            "full_import_end",
            token.epoch,
            &token.instance,
            now_ms,
        )
        .await?;
        Ok(n)
    }
    .await;
    store.finish(conn, r).await
}

pub(super) async fn watermark(
    store: &MssqlStore,
    connector: &str,
    object_type: &str,
) -> Result<Option<String>, StoreError> {
    Ok(store
        .read(sql::WATERMARK, &[&connector, &object_type], |r| text(r, 0))
        .await?
        .into_iter()
        .next())
}

pub(super) async fn count_objects(store: &MssqlStore, connector: &str) -> Result<i64, StoreError> {
    let v = store
        .read(sql::COUNT_OBJECTS, &[&connector], |r| col(r, 0))
        .await?;
    Ok(v.into_iter().next().unwrap_or(0))
}

pub(super) async fn count_batches(store: &MssqlStore, connector: &str) -> Result<i64, StoreError> {
    let v = store
        .read(sql::COUNT_BATCHES, &[&connector], |r| col(r, 0))
        .await?;
    Ok(v.into_iter().next().unwrap_or(0))
}

pub(super) async fn start_run(
    store: &MssqlStore,
    token: &FenceToken,
    run: &RunRow,
    advance: Option<&ScheduleAdvance>,
) -> Result<(), StoreError> {
    let mut conn = store.begin().await?;
    let r = async {
        fence::check(&mut conn, token).await?;
        exec(
            &mut conn,
            sql::ABANDON_OLD_RUNS,
            &[&run.started_at_ms, &run.connector_id.as_str(), &token.epoch],
        )
        .await?;
        let running = rows(&mut conn, sql::RUNNING_RUN, &[&run.connector_id.as_str()])
            .await?
            .first()
            .map(|r| text(r, 0))
            .transpose()?;
        if let Some(other) = running {
            return Err(conflicts::already_running(&run.connector_id, &other));
        }
        let connector = run.connector_id.as_str();
        if rows(&mut conn, sql::CONNECTOR_EXISTS, &[&connector])
            .await?
            .is_empty()
        {
            return Err(conflicts::connector_deleted(connector));
        }
        exec(
            &mut conn,
            sql::INSERT_RUN,
            &[
                &run.id.as_str(),
                &run.connector_id.as_str(),
                &token.instance.as_str(),
                &token.epoch,
                &run.started_at_ms,
                &run.mode.as_str(),
                &run.trigger.as_str(),
            ],
        )
        .await?;
        if let Some(a) = advance {
            let id = a.schedule_id.as_str();
            exec(
                &mut conn,
                sql::SET_SCHEDULE_NEXT_RUN,
                &[&id, &a.next_run_ms],
            )
            .await?;
        }
        Ok(())
    }
    .await;
    store.finish(conn, r).await
}

pub(super) async fn finish_run(store: &MssqlStore, run: &RunRow) -> Result<(), StoreError> {
    let mut conn = store.take().await?;
    exec(
        &mut conn,
        sql::FINISH_RUN,
        &[
            &run.id.as_str(),
            &run.status.as_str(),
            &run.finished_at_ms,
            &run.added,
            &run.updated,
            &run.unchanged,
            &run.deleted,
            &run.failed,
            &run.error.as_deref(),
            &run.errors_json.as_deref(),
        ],
    )
    .await?;
    store.give(conn);
    Ok(())
}

pub(super) async fn run(store: &MssqlStore, id: &str) -> Result<Option<RunRow>, StoreError> {
    Ok(store
        .read(sql::RUN, &[&id], run_row)
        .await?
        .into_iter()
        .next())
}

pub(super) async fn runs(
    store: &MssqlStore,
    connector: Option<&str>,
    limit: i64,
) -> Result<Vec<RunRow>, StoreError> {
    store.read(sql::RUNS, &[&connector, &limit], run_row).await
}

pub(super) async fn stored_objects(
    store: &MssqlStore,
    connector: &str,
    anchors: &[String],
) -> Result<HashMap<String, StoredObject>, StoreError> {
    if anchors.is_empty() {
        return Ok(HashMap::new());
    }
    let anchors: Vec<&String> = anchors.iter().collect();
    let mut conn = store.take().await?;
    let r = stored_objects_on(&mut conn, connector, &anchors).await;
    store.kept(conn, r)
}

pub(super) async fn connector_space(
    store: &MssqlStore,
    connector: &str,
    search: Option<&str>,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<SpaceObjectRow>, StoreError> {
    let anchor_pattern = search.map(like_pattern);
    let json_pattern = search.map(|q| like_pattern(&json_escaped(q)));
    let mut params: Vec<&dyn ToSql> = vec![&connector, &anchor_pattern, &json_pattern, &limit];
    let q = match &after {
        Some(a) => {
            params.push(a);
            sql::CONNECTOR_SPACE_AFTER
        }
        None => sql::CONNECTOR_SPACE,
    };
    store
        .read(q, &params, |r| {
            Ok(SpaceObjectRow {
                anchor: text(r, 0)?,
                object_type: text(r, 1)?,
                dn: opt::<&str>(r, 2)?.map(str::to_string),
                deleted: col(r, 3)?,
                identity_id: opt::<&str>(r, 4)?.map(str::to_string),
            })
        })
        .await
}

pub(super) async fn connector_object(
    store: &MssqlStore,
    connector: &str,
    anchor: &str,
) -> Result<Option<SpaceObject>, StoreError> {
    Ok(store
        .read(sql::CONNECTOR_OBJECT, &[&connector, &anchor], |r| {
            Ok(SpaceObject {
                anchor: text(r, 0)?,
                object_type: text(r, 1)?,
                attributes_json: text(r, 2)?,
                deleted: col(r, 3)?,
                pending: col(r, 4)?,
                seen_run: opt::<&str>(r, 5)?.map(str::to_string),
                updated_at_ms: col(r, 6)?,
                identity_id: opt::<&str>(r, 7)?.map(str::to_string),
            })
        })
        .await?
        .into_iter()
        .next())
}

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::*;

    /// Answers the fence read with `token`'s fence, the batch record with a sequence number,
    /// and the stored-objects read from `stored` (anchor → type, attributes, deleted), which
    /// the MERGE of new and changed objects writes to.
    fn import_answers(
        mut stored: HashMap<String, (String, String, bool)>,
    ) -> impl FnMut(&str, &[tiberius::ColumnData<'_>]) -> Vec<Vec<Row>> + Send {
        // The run that last saw each anchor, as the MERGE and the seen update record it.
        let mut seen: HashMap<String, String> = HashMap::new();
        move |q, values| {
            let shared = multi::WRITE_OBJECTS.shared;
            if q.starts_with("MERGE cs_objects")
                && q == multi::WRITE_OBJECTS.sql((values.len() - shared) / 3)
            {
                for o in values[shared..].chunks(3) {
                    let state = (text_of(&o[1]), text_of(&o[2]), false);
                    stored.insert(text_of(&o[0]), state);
                    if let tiberius::ColumnData::String(Some(run)) = &values[2] {
                        seen.insert(text_of(&o[0]), run.to_string());
                    }
                }
            }
            let seen_shared = multi::SEEN_OBJECTS.shared;
            if values.len() > seen_shared
                && q == multi::SEEN_OBJECTS.sql(values.len() - seen_shared)
            {
                for a in &values[seen_shared..] {
                    seen.insert(text_of(a), text_of(&values[1]));
                }
            }
            if q == sql::FENCE_LOCKED {
                return vec![vec![fence_row()]];
            }
            if q == sql::IMPORT_TAIL {
                return vec![vec![row(vec![tiberius::ColumnData::I64(Some(42))])]];
            }
            if q == multi::STORED_OBJECTS.sql(values.len() - 1) {
                let found = values[1..]
                    .iter()
                    .filter_map(|v| match v {
                        tiberius::ColumnData::String(Some(a)) => stored.get_key_value(a.as_ref()),
                        _ => None,
                    })
                    .map(|(a, (t, attrs, deleted))| {
                        row(vec![
                            string(a),
                            string(t),
                            string(attrs),
                            tiberius::ColumnData::Bit(Some(*deleted)),
                            tiberius::ColumnData::String(seen.get(a).map(|r| r.clone().into())),
                        ])
                    })
                    .collect();
                return vec![found];
            }
            Vec::new()
        }
    }

    fn object(i: usize, attrs: &str) -> CsObject {
        CsObject {
            anchor: format!("uid={i},ou=people"),
            object_type: "person".into(),
            attributes_json: attrs.into(),
        }
    }

    /// A full import's page of `n` objects: a third stored as they are, a third stored with
    /// other attributes, a third new.
    fn mixed_page(n: usize) -> (ImportBatch, HashMap<String, (String, String, bool)>) {
        let objects: Vec<CsObject> = (0..n)
            .map(|i| object(i, &format!("{{\"n\":{i}}}")))
            .collect();
        let stored = objects
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 3 != 2)
            .map(|(i, o)| {
                let attrs = if i % 3 == 0 {
                    o.attributes_json.clone()
                } else {
                    "{}".into()
                };
                (o.anchor.clone(), (o.object_type.clone(), attrs, false))
            })
            .collect();
        let batch = ImportBatch {
            connector: "corp".into(),
            object_type: "person".into(),
            objects,
            watermark: None,
            seen_in_run: Some("run-1".into()),
            compose: true,
            composed: None,
        };
        (batch, stored)
    }

    /// What `commit_import_batch` sends for the page, and what it counted.
    fn import(
        batch: &ImportBatch,
        stored: &HashMap<String, (String, String, bool)>,
    ) -> (Vec<String>, BatchOutcome) {
        let mut w = Recorder::new(import_answers(stored.clone()));
        let out = block_on(import_page(&mut w, &token(), batch, 1)).unwrap();
        (w.sent, out)
    }

    /// One object at a time, a page cost BEGIN, the fence read, two requests an object (read
    /// it, then write it or record it seen), the batch record, the journal entry and COMMIT:
    /// 25 round trips for 10 objects, 1,005 for 500. Now the count does not grow with the page
    /// until a statement is full.
    #[test]
    fn an_import_page_costs_the_same_round_trips_at_any_size() {
        let mut trips = Vec::new();
        for n in [10, 500, 1000, 1200] {
            let (batch, stored) = mixed_page(n);
            let (sent, out) = import(&batch, &stored);
            let third = |r: usize| ((n + 2 - r) / 3) as u64;
            assert_eq!(
                (out.added, out.updated, out.unchanged),
                (third(2), third(1), third(0))
            );
            assert_eq!(out.seq, 42);
            // The fence check comes first; the batch record and the journal entry last.
            assert_eq!(sent.first().map(String::as_str), Some(sql::FENCE_LOCKED));
            assert_eq!(sent.last().map(String::as_str), Some(sql::IMPORT_TAIL));
            trips.push(TX_FRAME + sent.len());
        }
        // BEGIN, fence, stored state, MERGE, seen, tail, COMMIT; at 1,200 objects the read and
        // the MERGE take two statements each.
        assert_eq!(trips, vec![7, 7, 7, 9]);

        // Without deletion detection the unchanged need no write; an empty page (the end of a
        // read, with its watermark) is the fence, the tail and the frame.
        let (mut batch, stored) = mixed_page(500);
        batch.seen_in_run = None;
        assert_eq!(TX_FRAME + import(&batch, &stored).0.len(), 6);
        batch.objects.clear();
        batch.watermark = Some("w".into());
        assert_eq!(TX_FRAME + import(&batch, &stored).0.len(), 4);
    }

    /// A page carrying its own compose adds the compose statements and, when it holds both
    /// composed and marked objects, one MERGE; still no more as the page grows.
    #[test]
    fn a_page_with_its_compose_costs_a_constant_number_of_round_trips() {
        let mut trips = Vec::new();
        for n in [10, 300] {
            let (mut batch, stored) = mixed_page(n);
            let plain = import(&batch, &stored).0.len();
            // Every other object composed by the page.
            batch.composed = Some(PageCompose {
                anchors: batch
                    .objects
                    .iter()
                    .step_by(2)
                    .map(|o| o.anchor.clone())
                    .collect(),
                writes: compose_chunk_of(n)
                    .into_iter()
                    .filter(|w| !matches!(w, ComposeWrite::Composed { .. }))
                    .collect(),
            });
            let (sent, out) = import(&batch, &stored);
            assert_eq!(out.added + out.updated + out.unchanged, n as u64);
            assert_eq!(sent.last().map(String::as_str), Some(sql::IMPORT_TAIL));
            let composed_merges = sent.iter().filter(|q| q.contains("@P5 = 1")).count();
            assert_eq!(composed_merges, 2, "{sent:#?}");
            trips.push((plain, sent.len()));
        }
        // The plain page as above; with its compose: one more MERGE, then keys deleted,
        // identities, keys, links and audit (the page clears no marks).
        assert_eq!(trips, vec![(5, 11), (5, 11)]);
    }

    /// An anchor the page holds twice is compared with what the page wrote before it, read
    /// back in a second round.
    #[test]
    fn a_page_holding_an_anchor_twice_writes_it_in_page_order() {
        let page = |objects| ImportBatch {
            connector: "corp".into(),
            object_type: "person".into(),
            objects,
            watermark: None,
            seen_in_run: None,
            compose: true,
            composed: None,
        };
        let none = HashMap::new();
        let (sent, out) = import(
            &page(vec![object(1, "a"), object(2, "a"), object(1, "b")]),
            &none,
        );
        assert_eq!((out.added, out.updated, out.unchanged), (2, 1, 0));
        assert_eq!(
            object_merges(&sent),
            vec![&multi::WRITE_OBJECTS.sql(2), &multi::WRITE_OBJECTS.sql(1)]
        );
        let stored_reads = sent
            .iter()
            .filter(|q| q.starts_with("SELECT v.anchor"))
            .count();
        assert_eq!(stored_reads, 2);
        let (_, out) = import(&page(vec![object(1, "a"), object(1, "a")]), &none);
        assert_eq!((out.added, out.updated, out.unchanged), (1, 0, 1));
        // Anchors that differ in case only may be one row to the server: never in one MERGE.
        let mut upper = object(1, "b");
        upper.anchor = upper.anchor.to_uppercase();
        let (sent, _) = import(&page(vec![object(1, "a"), upper]), &none);
        assert_eq!(
            object_merges(&sent),
            vec![&multi::WRITE_OBJECTS.sql(1), &multi::WRITE_OBJECTS.sql(1)]
        );
    }

    /// With deletion detection a run imports each anchor once: one an earlier round of the
    /// page wrote (read back with the run that saw it) is a duplicate, neither written again
    /// nor counted; so is one the stored state says this run saw.
    #[test]
    fn a_full_import_refuses_an_anchor_the_run_already_imported() {
        let page = |objects| ImportBatch {
            connector: "corp".into(),
            object_type: "person".into(),
            objects,
            watermark: None,
            seen_in_run: Some("run-1".into()),
            compose: true,
            composed: None,
        };
        let none = HashMap::new();
        let (sent, out) = import(
            &page(vec![object(1, "a"), object(2, "a"), object(1, "b")]),
            &none,
        );
        assert_eq!((out.added, out.updated, out.unchanged), (2, 0, 0));
        assert_eq!(out.duplicates, vec![object(1, "b").anchor]);
        assert_eq!(object_merges(&sent), vec![&multi::WRITE_OBJECTS.sql(2)]);

        // Unchanged ones are recorded as seen, and then refused too.
        let stored: HashMap<_, _> = [(object(1, "a").anchor, ("person".into(), "a".into(), false))]
            .into_iter()
            .collect();
        let (sent, out) = import(&page(vec![object(1, "a"), object(1, "a")]), &stored);
        assert_eq!((out.added, out.updated, out.unchanged), (0, 0, 1));
        assert_eq!(out.duplicates.len(), 1);
        assert!(object_merges(&sent).is_empty());
    }

    /// The connector-space MERGEs among the statements sent.
    fn object_merges(sent: &[String]) -> Vec<&String> {
        sent.iter()
            .filter(|q| q.starts_with("MERGE cs_objects"))
            .collect()
    }
}
