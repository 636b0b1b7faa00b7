//! One conformance suite over the store trait. It runs on SQLite always and on SQL Server when
//! `IM_TEST_MSSQL` holds an ADO.NET connection string. Tests read the current epoch and work
//! relative to it, so they can share one SQL Server database.

use std::sync::Arc;

use super::*;

type Suite = fn(Arc<dyn Store>) -> futures::future::BoxFuture<'static, ()>;

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

async fn sqlite() -> (tempfile::TempDir, Arc<dyn Store>) {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite::SqliteStore::open(&dir.path().join("im.db"))
        .await
        .unwrap();
    store.migrate().await.unwrap();
    (dir, Arc::new(store))
}

/// Runs one suite on every configured backend.
async fn run(suite: Suite) {
    let (_dir, store) = sqlite().await;
    suite(store).await;
    if let Ok(cs) = std::env::var("IM_TEST_MSSQL") {
        let store = mssql::MssqlStore::connect(&cs)
            .await
            .expect("IM_TEST_MSSQL is set but the server cannot be reached");
        store.migrate().await.unwrap();
        suite(Arc::new(store)).await;
    }
}

/// The token of the process `instance` names (one incarnation per name in these tests).
fn tok(instance: &str, epoch: i64) -> FenceToken {
    FenceToken {
        instance: instance.into(),
        incarnation: format!("{instance}/1"),
        epoch,
    }
}

fn batch(connector: &str, n: usize, start: usize, watermark: &str) -> ImportBatch {
    ImportBatch {
        connector: connector.into(),
        object_type: "person".into(),
        objects: (start..start + n)
            .map(|i| CsObject {
                anchor: format!("uid={i},ou=people"),
                object_type: "person".into(),
                attributes_json: format!("{{\"cn\":[\"Person {i}\"]}}"),
            })
            .collect(),
        watermark: Some(watermark.into()),
        seen_in_run: None,
        compose: true,
        composed: None,
    }
}

#[tokio::test]
async fn migrations_are_idempotent() {
    run(|s| {
        Box::pin(async move {
            // The first migrate ran in `run`; another one applies nothing.
            assert!(s.migrate().await.unwrap().is_empty());
            s.ping().await.unwrap();
        })
    })
    .await;
}

#[tokio::test]
async fn promote_requires_a_greater_epoch_and_is_idempotent() {
    run(|s| {
        Box::pin(async move {
            let (a, b) = (unique("a"), unique("b"));
            let e = s.fence().await.unwrap().epoch;
            assert_eq!(
                s.promote(&tok(&a, e + 1)).await.unwrap(),
                PromoteOutcome::Promoted
            );
            assert_eq!(
                s.promote(&tok(&a, e + 1)).await.unwrap(),
                PromoteOutcome::AlreadyHeld
            );
            // Same epoch by another instance, or a smaller one: refused.
            assert!(matches!(
                s.promote(&tok(&b, e + 1)).await,
                Err(StoreError::StaleEpoch { stored, .. }) if stored == e + 1
            ));
            assert!(matches!(
                s.promote(&tok(&b, e)).await,
                Err(StoreError::StaleEpoch { .. })
            ));
            assert_eq!(
                s.promote(&tok(&b, e + 2)).await.unwrap(),
                PromoteOutcome::Promoted
            );
            let f = s.fence().await.unwrap();
            assert_eq!((f.epoch, f.holder), (e + 2, b));
        })
    })
    .await;
}

#[tokio::test]
async fn an_epoch_belongs_to_one_incarnation_of_a_name() {
    run(|s| {
        Box::pin(async move {
            let (name, conn) = (unique("im-b"), unique("conn"));
            let e = s.fence().await.unwrap().epoch;
            let old = FenceToken {
                incarnation: "old".into(),
                ..tok(&name, e + 1)
            };
            let new = FenceToken {
                incarnation: "new".into(),
                ..old.clone()
            };
            assert_eq!(s.promote(&old).await.unwrap(), PromoteOutcome::Promoted);
            // A retry of the same epoch reaching the recreated process is refused.
            assert!(matches!(
                s.promote(&new).await,
                Err(StoreError::StaleEpoch { stored, .. }) if stored == e + 1
            ));
            let f = s.fence().await.unwrap();
            assert_eq!(
                (f.holder.as_str(), f.holder_incarnation.as_str()),
                (name.as_str(), "old")
            );
            let mut committed = 0;
            for t in [&old, &new] {
                if s.commit_import_batch(t, &batch(&conn, 1, 0, "w"), 1)
                    .await
                    .is_ok()
                {
                    committed += 1;
                }
            }
            assert_eq!(
                committed,
                1,
                "exactly one process commits at epoch {}",
                e + 1
            );
            let newer = FenceToken {
                epoch: e + 2,
                ..new.clone()
            };
            assert_eq!(s.promote(&newer).await.unwrap(), PromoteOutcome::Promoted);
            assert!(matches!(
                s.engine_tick(&old, 2).await,
                Err(StoreError::Fenced { .. })
            ));
            s.engine_tick(&newer, 2).await.unwrap();
        })
    })
    .await;
}

#[tokio::test]
async fn a_connector_with_a_current_run_is_not_deleted_and_a_deleted_one_does_not_run() {
    run(|s| {
        Box::pin(async move {
            let t = promoted(&s).await;
            let id = unique("c");
            s.put_connector(&connector(&id, &unique("name")))
                .await
                .unwrap();
            let r = new_run(&unique("run"), &id, 1);
            s.start_run(&t, &r, None).await.unwrap();
            let err = s.delete_connector(&id).await.unwrap_err();
            assert!(
                matches!(&err, StoreError::Conflict(m) if m.contains(&r.id)),
                "{err}"
            );
            // A run left running by an older epoch does not block it: its writes are fenced.
            let t2 = promoted(&s).await;
            assert!(s.delete_connector(&id).await.unwrap());
            let err = s
                .start_run(&t2, &new_run(&unique("run"), &id, 2), None)
                .await
                .unwrap_err();
            assert!(
                matches!(&err, StoreError::Conflict(m) if m.contains("deleted")),
                "{err}"
            );
        })
    })
    .await;
}

#[tokio::test]
async fn object_types_of_lists_every_type_with_objects() {
    run(|s| {
        Box::pin(async move {
            let t = promoted(&s).await;
            let conn = unique("conn");
            assert!(s.object_types_of(&conn).await.unwrap().is_empty());
            s.commit_import_batch(&t, &batch(&conn, 2, 0, "w"), 1)
                .await
                .unwrap();
            let mut groups = batch(&conn, 1, 10, "w");
            groups.object_type = "group".into();
            for o in &mut groups.objects {
                o.object_type = "group".into();
            }
            s.commit_import_batch(&t, &groups, 2).await.unwrap();
            assert_eq!(
                s.object_types_of(&conn).await.unwrap(),
                vec!["group".to_string(), "person".to_string()]
            );
        })
    })
    .await;
}

#[tokio::test]
async fn stale_writers_are_fenced_and_nothing_commits() {
    run(|s| {
        Box::pin(async move {
            let (a, b, conn) = (unique("a"), unique("b"), unique("conn"));
            let e = s.fence().await.unwrap().epoch;
            s.promote(&tok(&a, e + 1)).await.unwrap();
            let ta = tok(&a, e + 1);
            s.engine_tick(&ta, 1).await.unwrap();
            s.commit_import_batch(&ta, &batch(&conn, 3, 0, "w1"), 1)
                .await
                .unwrap();
            s.promote(&tok(&b, e + 2)).await.unwrap();
            assert!(matches!(
                s.engine_tick(&ta, 2).await,
                Err(StoreError::Fenced { .. })
            ));
            let err = s
                .commit_import_batch(&ta, &batch(&conn, 5, 100, "w2"), 2)
                .await
                .unwrap_err();
            assert!(
                matches!(err, StoreError::Fenced { stored, .. } if stored == e + 2),
                "{err}"
            );
            // Nothing of the refused batch is visible.
            assert_eq!(s.count_objects(&conn).await.unwrap(), 3);
            assert_eq!(s.count_batches(&conn).await.unwrap(), 1);
            assert_eq!(
                s.watermark(&conn, "person").await.unwrap().as_deref(),
                Some("w1")
            );
            let tb = tok(&b, e + 2);
            s.commit_import_batch(&tb, &batch(&conn, 5, 100, "w2"), 3)
                .await
                .unwrap();
            assert_eq!(s.count_objects(&conn).await.unwrap(), 8);
        })
    })
    .await;
}

#[tokio::test]
async fn batches_upsert_objects_by_anchor() {
    run(|s| {
        Box::pin(async move {
            let (a, conn) = (unique("a"), unique("conn"));
            let e = s.fence().await.unwrap().epoch;
            s.promote(&tok(&a, e + 1)).await.unwrap();
            let t = tok(&a, e + 1);
            s.commit_import_batch(&t, &batch(&conn, 10, 0, "1"), 1)
                .await
                .unwrap();
            s.commit_import_batch(&t, &batch(&conn, 10, 5, "2"), 2)
                .await
                .unwrap();
            assert_eq!(s.count_objects(&conn).await.unwrap(), 15);
            assert_eq!(
                s.watermark(&conn, "person").await.unwrap().as_deref(),
                Some("2")
            );
            assert_eq!(s.watermark(&conn, "group").await.unwrap(), None);
        })
    })
    .await;
}

#[tokio::test]
async fn registry_never_shows_two_actives() {
    run(|s| {
        Box::pin(async move {
            let (a, b) = (unique("a"), unique("b"));
            let e = s.fence().await.unwrap().epoch;
            let hb = |instance: &str, role, epoch, now| Heartbeat {
                instance: instance.into(),
                incarnation: tok(instance, epoch).incarnation,
                host: "host".into(),
                role,
                epoch,
                version: "1".into(),
                started_at_ms: 0,
                now_ms: now,
            };
            let t0 = now_ms();
            s.promote(&tok(&a, e + 1)).await.unwrap();
            s.heartbeat(&hb(&a, Role::Active, e + 1, t0)).await.unwrap();
            s.heartbeat(&hb(&b, Role::Standby, 0, t0)).await.unwrap();
            s.promote(&tok(&b, e + 2)).await.unwrap();
            s.heartbeat(&hb(&b, Role::Active, e + 2, t0 + 1))
                .await
                .unwrap();
            let mine = |rows: Vec<InstanceRow>| {
                rows.into_iter()
                    .filter(|r| r.instance == a || r.instance == b)
                    .collect::<Vec<_>>()
            };
            let rows = mine(s.instances(t0).await.unwrap());
            let actives: Vec<_> = rows.iter().filter(|r| r.role == Role::Active).collect();
            assert_eq!(actives.len(), 1, "{rows:?}");
            assert_eq!(actives[0].instance, b);
            // The stale active's own heartbeat is recorded as fenced and reported to it.
            assert!(matches!(
                s.heartbeat(&hb(&a, Role::Active, e + 1, t0 + 2)).await,
                Err(StoreError::Fenced { .. })
            ));
            let rows = mine(s.instances(t0).await.unwrap());
            assert_eq!(rows.iter().filter(|r| r.role == Role::Active).count(), 1);
            assert!(rows
                .iter()
                .any(|r| r.instance == a && r.role == Role::Fenced));
            // Rows older than the cut-off are not alive.
            assert!(mine(s.instances(t0 + 3).await.unwrap()).is_empty());
        })
    })
    .await;
}

#[tokio::test]
async fn tokens_and_audit_round_trip() {
    run(|s| {
        Box::pin(async move {
            let name = unique("tok");
            assert_eq!(s.token_hash(&name).await.unwrap(), None);
            s.set_token_hash(&name, "abc", 1).await.unwrap();
            s.set_token_hash(&name, "def", 2).await.unwrap();
            assert_eq!(s.token_hash(&name).await.unwrap().as_deref(), Some("def"));
            let target = unique("target");
            s.append_audit(&AuditEntry {
                at_ms: 5,
                actor: "operator".into(),
                action: "promote".into(),
                target: target.clone(),
                detail: "{}".into(),
            })
            .await
            .unwrap();
            assert!(s
                .audit(&AuditFilter::latest(50))
                .await
                .unwrap()
                .iter()
                .any(|e| e.target == target));
        })
    })
    .await;
}

/// A slow batch of the old epoch interleaved with a promotion: the batch commits entirely before
/// the promotion or not at all, never after it (the journal records commit order).
#[tokio::test]
async fn a_promotion_never_lands_inside_a_fenced_commit() {
    run(|s| {
        Box::pin(async move {
            let (a, b, conn) = (unique("a"), unique("b"), unique("conn"));
            let e = s.fence().await.unwrap().epoch;
            s.promote(&tok(&a, e + 1)).await.unwrap();
            let ta = tok(&a, e + 1);
            let writer = {
                let s = s.clone();
                let conn = conn.clone();
                tokio::spawn(async move {
                    let mut outcomes = Vec::new();
                    for i in 0..500 {
                        let r = s
                            .commit_import_batch(
                                &ta,
                                &batch(&conn, 2000, i * 2000, &i.to_string()),
                                1,
                            )
                            .await;
                        outcomes.push(r.is_ok());
                        if r.is_err() {
                            break;
                        }
                    }
                    outcomes
                })
            };
            tokio::time::sleep(std::time::Duration::from_millis(150)).await;
            s.promote(&tok(&b, e + 2)).await.unwrap();
            let outcomes = writer.await.unwrap();
            assert_eq!(
                outcomes.last(),
                Some(&false),
                "the old epoch was never fenced"
            );
            let ok = outcomes.iter().filter(|o| **o).count() as i64;
            assert_eq!(s.count_batches(&conn).await.unwrap(), ok);
            assert_eq!(s.count_objects(&conn).await.unwrap(), ok * 2000);
            // In commit order, no batch of epoch e+1 follows the promotion to e+2.
            let journal = s.journal().await.unwrap();
            let promo = journal
                .iter()
                .position(|(k, ep)| k == "promote" && *ep == e + 2)
                .unwrap();
            assert!(journal[promo..]
                .iter()
                .all(|(k, ep)| !(k == "batch" && *ep == e + 1)));
        })
    })
    .await;
}

/// Two stores opening one new file at once both open and migrate without error (repeated:
/// the race on the first switch to WAL does not show every time).
#[tokio::test]
async fn concurrent_migrations_on_sqlite() {
    for _ in 0..20 {
        concurrent_start_once().await;
    }
}

async fn concurrent_start_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("im.db");
    let (x, y) = tokio::join!(
        sqlite::SqliteStore::open(&path),
        sqlite::SqliteStore::open(&path)
    );
    let (x, y) = (x.unwrap(), y.unwrap());
    let (rx, ry) = tokio::join!(x.migrate(), y.migrate());
    let (mut rx, ry) = (rx.unwrap(), ry.unwrap());
    rx.extend(ry);
    rx.sort_unstable();
    let all: Vec<u32> = migrations::SQLITE.iter().map(|m| m.version).collect();
    assert_eq!(rx, all, "each version applied exactly once");
}

#[tokio::test]
async fn relays_register_connect_and_revoke() {
    run(|s| {
        Box::pin(async move {
            let (id, name, hash) = (unique("r"), unique("relay"), unique("hash"));
            s.create_relay(&id, &name, &hash, 1).await.unwrap();
            let dup = s.create_relay(&unique("r"), &name, &unique("h"), 1).await;
            assert!(matches!(dup, Err(StoreError::Conflict(_))), "{dup:?}");
            let r = s.relay_by_token_hash(&hash).await.unwrap().unwrap();
            assert_eq!((r.id.as_str(), r.revoked_at_ms), (id.as_str(), None));
            assert_eq!(s.relay_by_token_hash("nope").await.unwrap(), None);

            s.relay_connected(&id, "pod-a", "0.1.0", 10).await.unwrap();
            s.relay_seen(&id, 20).await.unwrap();
            let r = s
                .relays()
                .await
                .unwrap()
                .into_iter()
                .find(|r| r.id == id)
                .unwrap();
            assert_eq!(r.connected_instance.as_deref(), Some("pod-a"));
            assert_eq!((r.connected_since_ms, r.last_seen_ms), (Some(10), Some(20)));
            // The relay moved to pod-b before pod-a noticed it left: pod-a must not clear it.
            s.relay_connected(&id, "pod-b", "0.1.0", 30).await.unwrap();
            s.relay_disconnected(&id, "pod-a", 31).await.unwrap();
            let r = s.relay_by_token_hash(&hash).await.unwrap().unwrap();
            assert_eq!(r.connected_instance.as_deref(), Some("pod-b"));
            s.relay_disconnected(&id, "pod-b", 32).await.unwrap();
            let r = s.relay_by_token_hash(&hash).await.unwrap().unwrap();
            assert_eq!(r.connected_instance, None);

            assert!(s.revoke_relay(&id, 40).await.unwrap());
            assert!(!s.revoke_relay("missing", 40).await.unwrap());
            let r = s.relay_by_token_hash(&hash).await.unwrap().unwrap();
            assert_eq!(r.revoked_at_ms, Some(40));
        })
    })
    .await;
}

/// Promotes a new instance to the epoch after the stored one and returns its token.
async fn promoted(s: &Arc<dyn Store>) -> FenceToken {
    let instance = unique("inst");
    let epoch = s.fence().await.unwrap().epoch + 1;
    let t = tok(&instance, epoch);
    s.promote(&t).await.unwrap();
    t
}

fn connector(id: &str, name: &str) -> ConnectorRow {
    ConnectorRow {
        id: id.into(),
        name: name.into(),
        kind: "ldap".into(),
        config_json: r#"{"host":"dc1"}"#.into(),
        rules_json: "{}".into(),
        relay_id: None,
        is_canary: false,
        created_at_ms: 1,
        updated_at_ms: 1,
    }
}

fn schedule(id: &str, connector_id: &str, created_at_ms: i64) -> ScheduleRow {
    ScheduleRow {
        id: id.into(),
        connector_id: connector_id.into(),
        kind: "interval".into(),
        spec: "15m".into(),
        mode: "delta".into(),
        enabled: true,
        next_run_ms: None,
        created_at_ms,
    }
}

fn new_run(id: &str, connector_id: &str, started_at_ms: i64) -> RunRow {
    RunRow {
        id: id.into(),
        connector_id: connector_id.into(),
        instance: String::new(),
        epoch: 0,
        mode: "full".into(),
        trigger: "manual".into(),
        status: "running".into(),
        started_at_ms,
        finished_at_ms: None,
        added: 0,
        updated: 0,
        unchanged: 0,
        deleted: 0,
        failed: 0,
        error: None,
        errors_json: None,
    }
}

fn identity(id: &str, display_name: &str, at: i64) -> IdentityRow {
    IdentityRow {
        id: id.into(),
        display_name: display_name.into(),
        attributes_json: format!(r#"{{"displayName":"{display_name}"}}"#),
        created_at_ms: at,
        updated_at_ms: at,
    }
}

fn audit_entry(target: &str) -> AuditEntry {
    AuditEntry {
        at_ms: 7,
        actor: "composer".into(),
        action: "identity.put".into(),
        target: target.into(),
        detail: "{}".into(),
    }
}

/// Marks every object of the connector's connector space gone (a full import that saw none of
/// them) and composes the tombstones, which drops them.
async fn empty_connector_space(s: &Arc<dyn Store>, t: &FenceToken, conn: &str) {
    s.finish_full_import(t, conn, "person", &unique("run"), 5)
        .await
        .unwrap();
    compose_all(s, t, conn).await;
    assert_eq!(s.count_objects(conn).await.unwrap(), 0);
}

#[tokio::test]
async fn connectors_round_trip_and_deletion_waits_for_an_empty_connector_space() {
    run(|s| {
        Box::pin(async move {
            let (id, other) = (unique("conn"), unique("conn"));
            let (name, other_name) = (unique("a-name"), unique("b-name"));
            assert_eq!(s.connector(&id).await.unwrap(), None);
            let mut c = connector(&id, &name);
            c.relay_id = Some(unique("relay"));
            c.is_canary = true;
            s.put_connector(&c).await.unwrap();
            assert_eq!(s.connector(&id).await.unwrap().as_ref(), Some(&c));

            // Replacing by id updates everything but the creation time.
            let mut c2 = c.clone();
            c2.kind = "csv".into();
            c2.config_json = r#"{"path":"/x.csv"}"#.into();
            c2.rules_json = r#"{"join":["mail"]}"#.into();
            c2.relay_id = None;
            c2.is_canary = false;
            c2.created_at_ms = 50;
            c2.updated_at_ms = 60;
            s.put_connector(&c2).await.unwrap();
            let got = s.connector(&id).await.unwrap().unwrap();
            assert_eq!(
                got,
                ConnectorRow {
                    created_at_ms: 1,
                    ..c2.clone()
                }
            );

            let o = connector(&other, &other_name);
            s.put_connector(&o).await.unwrap();
            let mine: Vec<String> = s
                .connectors()
                .await
                .unwrap()
                .into_iter()
                .filter(|r| r.id == id || r.id == other)
                .map(|r| r.id)
                .collect();
            assert_eq!(mine, vec![id.clone(), other.clone()], "ordered by name");

            // A name used by another connector: a new one, or a rename, is a Conflict.
            let dup = s.put_connector(&connector(&unique("conn"), &name)).await;
            assert!(
                matches!(&dup, Err(StoreError::Conflict(m)) if m.contains(&name)),
                "{dup:?}"
            );
            let rename = s.put_connector(&connector(&other, &name)).await;
            assert!(matches!(rename, Err(StoreError::Conflict(_))), "{rename:?}");
            assert_eq!(s.connector(&other).await.unwrap(), Some(o));
            // Renaming to a free name is fine.
            let renamed = connector(&other, &unique("c-name"));
            s.put_connector(&renamed).await.unwrap();
            assert_eq!(s.connector(&other).await.unwrap(), Some(renamed));

            // Objects in the connector space: deletion refused, nothing deleted.
            let t = promoted(&s).await;
            let sched = unique("sched");
            s.put_schedule(&schedule(&sched, &id, 1)).await.unwrap();
            s.commit_import_batch(&t, &batch(&id, 2, 0, "w1"), 1)
                .await
                .unwrap();
            let refused = s.delete_connector(&id).await;
            assert!(
                matches!(&refused, Err(StoreError::Conflict(m)) if m.contains("2 objects")),
                "{refused:?}"
            );
            assert!(s.connector(&id).await.unwrap().is_some());
            assert!(s.schedules().await.unwrap().iter().any(|x| x.id == sched));
            assert!(s.watermark(&id, "person").await.unwrap().is_some());

            // Once the objects are gone the connector goes, with its schedules and watermarks.
            empty_connector_space(&s, &t, &id).await;
            assert!(s.delete_connector(&id).await.unwrap());
            assert_eq!(s.connector(&id).await.unwrap(), None);
            assert!(!s.schedules().await.unwrap().iter().any(|x| x.id == sched));
            assert_eq!(s.watermark(&id, "person").await.unwrap(), None);
            assert!(!s.delete_connector(&id).await.unwrap());
            // The name is free again.
            s.put_connector(&connector(&unique("conn"), &name))
                .await
                .unwrap();
        })
    })
    .await;
}

#[tokio::test]
async fn schedules_round_trip() {
    run(|s| {
        Box::pin(async move {
            let conn = unique("conn");
            let (a, b) = (unique("sched"), unique("sched"));
            let mine = |rows: Vec<ScheduleRow>| {
                rows.into_iter()
                    .filter(|r| r.connector_id == conn)
                    .collect::<Vec<_>>()
            };
            let sa = schedule(&a, &conn, 20);
            let mut sb = schedule(&b, &conn, 10);
            sb.kind = "cron".into();
            sb.spec = "*/5 * * * *".into();
            sb.mode = "full".into();
            sb.next_run_ms = Some(1_000);
            s.put_schedule(&sa).await.unwrap();
            s.put_schedule(&sb).await.unwrap();
            // Oldest first.
            assert_eq!(
                mine(s.schedules().await.unwrap()),
                vec![sb.clone(), sa.clone()]
            );

            // Replacing by id keeps the creation time.
            let mut sa2 = sa.clone();
            sa2.spec = "1h".into();
            sa2.mode = "full".into();
            sa2.enabled = false;
            sa2.next_run_ms = Some(5);
            sa2.created_at_ms = 99;
            s.put_schedule(&sa2).await.unwrap();
            let t = promoted(&s).await;
            s.set_schedule_next_run(&t, &b, 2_000).await.unwrap();
            // A stale token moves nothing.
            let stale = promoted(&s).await;
            let err = s.set_schedule_next_run(&t, &b, 9_000).await.unwrap_err();
            assert!(matches!(err, StoreError::Fenced { .. }), "{err}");
            let t = stale;
            let rows = mine(s.schedules().await.unwrap());
            assert_eq!(
                rows,
                vec![
                    ScheduleRow {
                        next_run_ms: Some(2_000),
                        ..sb.clone()
                    },
                    ScheduleRow {
                        created_at_ms: 20,
                        ..sa2.clone()
                    },
                ]
            );

            assert!(s.delete_schedule(&a).await.unwrap());
            assert!(!s.delete_schedule(&a).await.unwrap());
            let rows = mine(s.schedules().await.unwrap());
            assert_eq!(rows.len(), 1);
            assert_eq!(rows[0].id, b);
            // A missing schedule's next run: nothing happens.
            s.set_schedule_next_run(&t, &a, 1).await.unwrap();
            assert_eq!(mine(s.schedules().await.unwrap()).len(), 1);
        })
    })
    .await;
}

#[tokio::test]
async fn settings_round_trip() {
    run(|s| {
        Box::pin(async move {
            let name = unique("setting");
            assert_eq!(s.setting(&name).await.unwrap(), None);
            s.set_setting(&name, "one").await.unwrap();
            assert_eq!(s.setting(&name).await.unwrap().as_deref(), Some("one"));
            s.set_setting(&name, "").await.unwrap();
            assert_eq!(s.setting(&name).await.unwrap().as_deref(), Some(""));
            s.set_setting(&name, "two").await.unwrap();
            assert_eq!(s.setting(&name).await.unwrap().as_deref(), Some("two"));
        })
    })
    .await;
}

#[tokio::test]
async fn prune_takes_old_finished_rows_oldest_first_and_is_fenced() {
    run(|s| {
        Box::pin(async move {
            let conn = unique("conn");
            s.put_connector(&connector(&conn, &unique("name")))
                .await
                .unwrap();
            let t = promoted(&s).await;
            // Runs far in the past (so rows of other tests sharing a database stay).
            let (old, running) = (unique("run"), unique("run"));
            s.start_run(&t, &new_run(&old, &conn, 10), None)
                .await
                .unwrap();
            s.finish_run(&RunRow {
                status: "succeeded".into(),
                finished_at_ms: Some(20),
                ..new_run(&old, &conn, 10)
            })
            .await
            .unwrap();
            let other = unique("conn");
            s.put_connector(&connector(&other, &unique("name")))
                .await
                .unwrap();
            s.start_run(&t, &new_run(&running, &other, 15), None)
                .await
                .unwrap();
            let stale = promoted(&s).await;
            let err = s
                .prune(&t, RetainedTable::Runs, 1_000, 10)
                .await
                .unwrap_err();
            assert!(matches!(err, StoreError::Fenced { .. }), "{err}");
            assert!(
                s.prune(&stale, RetainedTable::Runs, 1_000, 10)
                    .await
                    .unwrap()
                    >= 1
            );
            assert!(
                s.run(&old).await.unwrap().is_none(),
                "the finished run went"
            );
            assert!(
                s.run(&running).await.unwrap().is_some(),
                "a running run stays"
            );
            // Bounded: at most `limit` rows per call.
            for at in [1, 2, 3] {
                s.append_audit(&AuditEntry {
                    at_ms: at,
                    actor: "t".into(),
                    action: unique("a"),
                    target: "t".into(),
                    detail: "{}".into(),
                })
                .await
                .unwrap();
            }
            assert_eq!(
                s.prune(&stale, RetainedTable::AuditLog, 3, 1)
                    .await
                    .unwrap(),
                1
            );
            assert_eq!(
                s.prune(&stale, RetainedTable::AuditLog, 3, 10)
                    .await
                    .unwrap(),
                1
            );
            assert_eq!(
                s.prune(&stale, RetainedTable::AuditLog, 3, 10)
                    .await
                    .unwrap(),
                0
            );
        })
    })
    .await;
}

#[tokio::test]
async fn engine_settings_are_fenced() {
    run(|s| {
        Box::pin(async move {
            let name = unique("sync.composed_rules");
            let old = promoted(&s).await;
            s.set_engine_setting(&old, &name, "r1").await.unwrap();
            let new = promoted(&s).await;
            let err = s.set_engine_setting(&old, &name, "r2").await.unwrap_err();
            assert!(matches!(err, StoreError::Fenced { .. }), "{err}");
            assert_eq!(s.setting(&name).await.unwrap().as_deref(), Some("r1"));
            s.set_engine_setting(&new, &name, "r3").await.unwrap();
            assert_eq!(s.setting(&name).await.unwrap().as_deref(), Some("r3"));
        })
    })
    .await;
}

#[tokio::test]
async fn secrets_round_trip_and_the_listing_has_no_values() {
    run(|s| {
        Box::pin(async move {
            let (a, b) = (unique("secret-a"), unique("secret-b"));
            assert_eq!(s.secret(&a).await.unwrap(), None);
            let sa = SecretRow {
                name: a.clone(),
                key_id: "k1".into(),
                nonce: (0u8..12).collect(),
                ciphertext: vec![0, 255, 1, 254, 0, 0],
                updated_at_ms: 10,
            };
            s.put_secret(&sa).await.unwrap();
            assert_eq!(s.secret(&a).await.unwrap().as_ref(), Some(&sa));
            // Replaced whole, under a new key.
            let sa2 = SecretRow {
                key_id: "k2".into(),
                nonce: vec![9; 12],
                ciphertext: vec![7; 300],
                updated_at_ms: 20,
                ..sa.clone()
            };
            s.put_secret(&sa2).await.unwrap();
            assert_eq!(s.secret(&a).await.unwrap().as_ref(), Some(&sa2));
            let sb = SecretRow {
                name: b.clone(),
                key_id: "k2".into(),
                nonce: vec![1; 12],
                ciphertext: vec![2; 16],
                updated_at_ms: 30,
            };
            s.put_secret(&sb).await.unwrap();

            let listed: Vec<SecretRow> = s
                .secrets()
                .await
                .unwrap()
                .into_iter()
                .filter(|r| r.name == a || r.name == b)
                .collect();
            let expect = |r: &SecretRow| SecretRow {
                nonce: Vec::new(),
                ciphertext: Vec::new(),
                ..r.clone()
            };
            assert_eq!(
                listed,
                vec![expect(&sa2), expect(&sb)],
                "by name, no values"
            );

            assert!(s.delete_secret(&a).await.unwrap());
            assert!(!s.delete_secret(&a).await.unwrap());
            assert_eq!(s.secret(&a).await.unwrap(), None);
            assert_eq!(s.secret(&b).await.unwrap().as_ref(), Some(&sb));
        })
    })
    .await;
}

#[tokio::test]
async fn runs_start_once_per_connector_and_are_fenced() {
    run(|s| {
        Box::pin(async move {
            let (conn, other) = (unique("conn"), unique("conn"));
            for c in [&conn, &other] {
                s.put_connector(&connector(c, &unique("name")))
                    .await
                    .unwrap();
            }
            let ta = promoted(&s).await;
            let r1 = new_run(&unique("run"), &conn, 100);
            s.start_run(&ta, &r1, None).await.unwrap();
            let got = s.run(&r1.id).await.unwrap().unwrap();
            assert_eq!(
                got,
                RunRow {
                    instance: ta.instance.clone(),
                    epoch: ta.epoch,
                    ..r1.clone()
                }
            );
            assert_eq!(s.run("missing").await.unwrap(), None);

            // Same connector, same epoch, still running: refused, nothing recorded.
            let r2 = new_run(&unique("run"), &conn, 150);
            let dup = s.start_run(&ta, &r2, None).await;
            assert!(
                matches!(&dup, Err(StoreError::Conflict(m)) if m.contains(&r1.id)),
                "{dup:?}"
            );
            assert_eq!(s.run(&r2.id).await.unwrap(), None);
            // Another connector runs independently.
            let ro = new_run(&unique("run"), &other, 160);
            s.start_run(&ta, &ro, None).await.unwrap();

            // A newer promotion fences the old token's start.
            let tb = promoted(&s).await;
            let r3 = new_run(&unique("run"), &conn, 200);
            let fenced = s.start_run(&ta, &r3, None).await;
            assert!(
                matches!(fenced, Err(StoreError::Fenced { .. })),
                "{fenced:?}"
            );
            assert_eq!(s.run(&r3.id).await.unwrap(), None);
            assert_eq!(s.run(&r1.id).await.unwrap().unwrap().status, "running");

            // The new epoch's start abandons the older epoch's running run.
            s.start_run(&tb, &r3, None).await.unwrap();
            let old = s.run(&r1.id).await.unwrap().unwrap();
            assert_eq!(old.status, "abandoned");
            assert_eq!(old.finished_at_ms, Some(200));
            assert!(old.error.is_some());
            // Only this connector's runs were touched.
            assert_eq!(s.run(&ro.id).await.unwrap().unwrap().status, "running");

            // finish_run only while running.
            let late = RunRow {
                status: "succeeded".into(),
                finished_at_ms: Some(210),
                ..r1.clone()
            };
            s.finish_run(&late).await.unwrap();
            assert_eq!(s.run(&r1.id).await.unwrap().unwrap(), old);
            let done = RunRow {
                instance: tb.instance.clone(),
                epoch: tb.epoch,
                status: "completed_with_errors".into(),
                finished_at_ms: Some(300),
                added: 5,
                updated: 4,
                unchanged: 3,
                deleted: 2,
                failed: 1,
                error: Some("one object failed".into()),
                errors_json: Some(r#"[{"location":"uid=1","reason":"bad"}]"#.into()),
                ..r3.clone()
            };
            s.finish_run(&done).await.unwrap();
            assert_eq!(s.run(&r3.id).await.unwrap().as_ref(), Some(&done));
            s.finish_run(&RunRow {
                status: "failed".into(),
                ..done.clone()
            })
            .await
            .unwrap();
            assert_eq!(s.run(&r3.id).await.unwrap().as_ref(), Some(&done));

            // Newest first, filtered by connector, limited.
            let ids = |rows: Vec<RunRow>| rows.into_iter().map(|r| r.id).collect::<Vec<_>>();
            assert_eq!(
                ids(s.runs(Some(&conn), 10).await.unwrap()),
                vec![r3.id.clone(), r1.id.clone()]
            );
            assert_eq!(
                ids(s.runs(Some(&conn), 1).await.unwrap()),
                vec![r3.id.clone()]
            );
            assert_eq!(ids(s.runs(Some(&other), 10).await.unwrap()), vec![ro.id]);
            let all = s.runs(None, 1000).await.unwrap();
            assert!(all.iter().any(|r| r.id == r3.id));
            assert!(all
                .windows(2)
                .all(|w| w[0].started_at_ms >= w[1].started_at_ms));
            // The finished run no longer blocks a new one.
            s.start_run(&tb, &new_run(&unique("run"), &conn, 400), None)
                .await
                .unwrap();
        })
    })
    .await;
}

#[tokio::test]
async fn import_batches_count_changes_and_mark_them_dirty() {
    run(|s| {
        Box::pin(async move {
            let conn = unique("conn");
            let t = promoted(&s).await;
            let out = s
                .commit_import_batch(&t, &batch(&conn, 3, 0, "1"), 10)
                .await
                .unwrap();
            assert_eq!(
                (out.added, out.updated, out.unchanged),
                (3, 0, 0),
                "{out:?}"
            );
            let dirty = s.dirty_objects(&conn, 100).await.unwrap();
            assert_eq!(dirty.len(), 3);
            assert!(dirty.iter().all(|o| o.rev == 1 && !o.deleted));
            assert_eq!(
                dirty[0],
                DirtyObject {
                    anchor: "uid=0,ou=people".into(),
                    object_type: "person".into(),
                    attributes_json: r#"{"cn":["Person 0"]}"#.into(),
                    deleted: false,
                    rev: 1,
                }
            );
            assert_eq!(s.dirty_objects(&conn, 2).await.unwrap().len(), 2);
            let composed: Vec<ComposeWrite> = dirty
                .iter()
                .map(|o| ComposeWrite::Composed {
                    connector_id: conn.clone(),
                    anchor: o.anchor.clone(),
                    rev: o.rev,
                })
                .collect();
            s.commit_compose(&t, &composed, 11).await.unwrap();
            assert!(s.dirty_objects(&conn, 100).await.unwrap().is_empty());

            // The same objects again: unchanged, nothing to compose.
            let out = s
                .commit_import_batch(&t, &batch(&conn, 3, 0, "2"), 12)
                .await
                .unwrap();
            assert_eq!((out.added, out.updated, out.unchanged), (0, 0, 3));
            assert!(s.dirty_objects(&conn, 100).await.unwrap().is_empty());
            assert!(out.seq > 0);

            // One changed (attributes), one new: updated and added, both dirty.
            let mut b = batch(&conn, 4, 0, "3");
            b.objects[1].attributes_json = r#"{"cn":["Renamed"]}"#.into();
            let out = s.commit_import_batch(&t, &b, 13).await.unwrap();
            assert_eq!((out.added, out.updated, out.unchanged), (1, 1, 2));
            let dirty = s.dirty_objects(&conn, 100).await.unwrap();
            assert_eq!(dirty.len(), 2, "{dirty:?}");
            let changed = dirty
                .iter()
                .find(|o| o.anchor == "uid=1,ou=people")
                .unwrap();
            assert_eq!(
                (changed.attributes_json.as_str(), changed.rev),
                (r#"{"cn":["Renamed"]}"#, 2)
            );
            assert!(dirty
                .iter()
                .any(|o| o.anchor == "uid=3,ou=people" && o.rev == 1));
            // A changed object type is a change too.
            let mut b = batch(&conn, 1, 0, "4");
            b.objects[0].object_type = "contact".into();
            let out = s.commit_import_batch(&t, &b, 14).await.unwrap();
            assert_eq!((out.added, out.updated, out.unchanged), (0, 1, 0));
            assert_eq!(s.count_objects(&conn).await.unwrap(), 4);
            assert_eq!(s.count_batches(&conn).await.unwrap(), 4);
            assert_eq!(
                s.watermark(&conn, "person").await.unwrap().as_deref(),
                Some("4")
            );
        })
    })
    .await;
}

/// A source streams its pages, so the store is what knows every anchor a full import's run
/// has imported: one seen again (in a later page, or twice in one) is a duplicate, neither
/// written nor counted, and the first one stands. Another run, or a delta, is not affected.
#[tokio::test]
async fn a_full_import_refuses_an_anchor_its_run_already_imported() {
    run(|s| {
        Box::pin(async move {
            let conn = unique("conn");
            let t = promoted(&s).await;
            let (run1, run2) = (unique("run"), unique("run"));
            let changed = |o: &mut CsObject| {
                o.attributes_json = format!(r#"{{"cn":["Changed {}"]}}"#, o.anchor);
            };
            let mut first = batch(&conn, 3, 0, "1");
            first.seen_in_run = Some(run1.clone());
            let out = s.commit_import_batch(&t, &first, 1).await.unwrap();
            assert_eq!((out.added, out.updated, out.unchanged), (3, 0, 0));
            assert!(out.duplicates.is_empty(), "{out:?}");

            // Persons 1 (changed) and 2 again, 3 new and then again (changed).
            let mut second = batch(&conn, 3, 1, "2");
            changed(&mut second.objects[0]);
            let mut again = second.objects[2].clone();
            changed(&mut again);
            second.objects.push(again);
            second.seen_in_run = Some(run1.clone());
            let out = s.commit_import_batch(&t, &second, 2).await.unwrap();
            assert_eq!((out.added, out.updated, out.unchanged), (1, 0, 0));
            let mut dups = out.duplicates.clone();
            dups.sort();
            assert_eq!(
                dups,
                ["uid=1,ou=people", "uid=2,ou=people", "uid=3,ou=people"]
            );
            let stored = s.dirty_objects(&conn, 100).await.unwrap();
            let attrs = |anchor: &str| {
                stored
                    .iter()
                    .find(|o| o.anchor == anchor)
                    .map(|o| o.attributes_json.clone())
            };
            assert_eq!(
                attrs("uid=1,ou=people").as_deref(),
                Some(r#"{"cn":["Person 1"]}"#)
            );
            assert_eq!(
                attrs("uid=3,ou=people").as_deref(),
                Some(r#"{"cn":["Person 3"]}"#)
            );
            assert_eq!(s.count_objects(&conn).await.unwrap(), 4);
            // Every object was seen by the run: nothing is swept.
            assert_eq!(
                s.finish_full_import(&t, &conn, "person", &run1, 3)
                    .await
                    .unwrap(),
                0
            );

            // The next run imports each of them again.
            let mut next = batch(&conn, 4, 0, "3");
            next.seen_in_run = Some(run2.clone());
            let out = s.commit_import_batch(&t, &next, 4).await.unwrap();
            assert_eq!((out.added, out.updated, out.unchanged), (0, 0, 4));
            assert!(out.duplicates.is_empty(), "{out:?}");

            // Without a run (a delta) an anchor is written as often as it comes, in order.
            let mut delta = batch(&conn, 1, 0, "4");
            let mut later = delta.objects[0].clone();
            changed(&mut later);
            delta.objects.push(later);
            let out = s.commit_import_batch(&t, &delta, 5).await.unwrap();
            assert_eq!((out.added, out.updated, out.unchanged), (0, 1, 1));
            assert!(out.duplicates.is_empty(), "{out:?}");
            let o = s
                .dirty_objects(&conn, 100)
                .await
                .unwrap()
                .into_iter()
                .find(|o| o.anchor == "uid=0,ou=people")
                .unwrap();
            assert_eq!(o.attributes_json, r#"{"cn":["Changed uid=0,ou=people"]}"#);
        })
    })
    .await;
}

#[tokio::test]
async fn a_full_import_marks_unseen_objects_of_its_type_deleted() {
    run(|s| {
        Box::pin(async move {
            let conn = unique("conn");
            let t = promoted(&s).await;
            let (run1, run2) = (unique("run"), unique("run"));
            let mut people = batch(&conn, 3, 0, "p1");
            people.seen_in_run = Some(run1.clone());
            s.commit_import_batch(&t, &people, 1).await.unwrap();
            let groups = ImportBatch {
                connector: conn.clone(),
                object_type: "group".into(),
                objects: vec![CsObject {
                    anchor: "cn=admins".into(),
                    object_type: "group".into(),
                    attributes_json: "{}".into(),
                }],
                watermark: None,
                seen_in_run: Some(run1.clone()),
                compose: true,
                composed: None,
            };
            s.commit_import_batch(&t, &groups, 1).await.unwrap();
            assert_eq!(
                s.finish_full_import(&t, &conn, "person", &run1, 2)
                    .await
                    .unwrap(),
                0
            );
            let all: Vec<ComposeWrite> = s
                .dirty_objects(&conn, 100)
                .await
                .unwrap()
                .into_iter()
                .map(|o| ComposeWrite::Composed {
                    connector_id: conn.clone(),
                    anchor: o.anchor,
                    rev: o.rev,
                })
                .collect();
            s.commit_compose(&t, &all, 3).await.unwrap();

            // The second full import sees persons 0 and 1 (unchanged) and a new person 5.
            let mut seen = batch(&conn, 2, 0, "p2");
            seen.seen_in_run = Some(run2.clone());
            let out = s.commit_import_batch(&t, &seen, 4).await.unwrap();
            assert_eq!((out.added, out.updated, out.unchanged), (0, 0, 2));
            let mut new = batch(&conn, 1, 5, "p2");
            new.seen_in_run = Some(run2.clone());
            s.commit_import_batch(&t, &new, 4).await.unwrap();
            assert_eq!(
                s.finish_full_import(&t, &conn, "person", &run2, 5)
                    .await
                    .unwrap(),
                1
            );
            let dirty = s.dirty_objects(&conn, 100).await.unwrap();
            let gone: Vec<_> = dirty.iter().filter(|o| o.deleted).collect();
            assert_eq!(gone.len(), 1, "{dirty:?}");
            assert_eq!(
                (gone[0].anchor.as_str(), gone[0].rev),
                ("uid=2,ou=people", 2)
            );
            // The group was not seen by run2 either, but it is of another type.
            assert!(!dirty.iter().any(|o| o.anchor == "cn=admins"));
            // Already deleted: not marked again.
            assert_eq!(
                s.finish_full_import(&t, &conn, "person", &run2, 6)
                    .await
                    .unwrap(),
                0
            );
            assert_eq!(s.count_objects(&conn).await.unwrap(), 5);

            // Seen again with the same attributes: it is back (a change), no longer deleted.
            let back = batch(&conn, 1, 2, "p3");
            let out = s.commit_import_batch(&t, &back, 7).await.unwrap();
            assert_eq!((out.added, out.updated, out.unchanged), (0, 1, 0));
            let o = s
                .dirty_objects(&conn, 100)
                .await
                .unwrap()
                .into_iter()
                .find(|o| o.anchor == "uid=2,ou=people")
                .unwrap();
            assert_eq!((o.deleted, o.rev), (false, 3));

            // Fenced like every engine write.
            promoted(&s).await;
            assert!(matches!(
                s.finish_full_import(&t, &conn, "group", &run2, 8).await,
                Err(StoreError::Fenced { .. })
            ));
            assert!(!s
                .dirty_objects(&conn, 100)
                .await
                .unwrap()
                .iter()
                .any(|o| o.anchor == "cn=admins"));
        })
    })
    .await;
}

#[tokio::test]
async fn compose_writes_identities_links_and_clears_marks() {
    run(|s| {
        Box::pin(async move {
            let conn = unique("conn");
            let (id1, id2) = (unique("idn"), unique("idn"));
            let (mail, target) = (format!("{}@example.org", unique("ann")), unique("target"));
            let t = promoted(&s).await;
            s.commit_import_batch(&t, &batch(&conn, 2, 0, "1"), 1)
                .await
                .unwrap();
            let i1 = identity(&id1, "Ann", 10);
            let link = LinkRow {
                connector_id: conn.clone(),
                anchor: "uid=0,ou=people".into(),
                identity_id: id1.clone(),
                precedence: 2,
                contribution_json: r#"{"mail":"ann"}"#.into(),
            };
            let link2 = LinkRow {
                anchor: "uid=1,ou=people".into(),
                precedence: 1,
                ..link.clone()
            };
            s.commit_compose(
                &t,
                &[
                    ComposeWrite::PutIdentity {
                        identity: i1.clone(),
                        keys: vec![
                            ("mail".into(), mail.clone()),
                            ("mail".into(), mail.clone()),
                            ("employeeid".into(), id1.clone()),
                        ],
                    },
                    ComposeWrite::PutLink(link.clone()),
                    ComposeWrite::PutLink(link2.clone()),
                    ComposeWrite::Audit(audit_entry(&target)),
                ],
                2,
            )
            .await
            .unwrap();
            assert_eq!(s.identity(&id1).await.unwrap().as_ref(), Some(&i1));
            assert_eq!(
                s.identities_by_key("mail", &mail).await.unwrap(),
                vec![id1.clone()]
            );
            assert_eq!(
                s.identities_by_key("employeeid", &id1).await.unwrap(),
                vec![id1.clone()]
            );
            assert!(s.identities_by_key("uid", &mail).await.unwrap().is_empty());
            assert_eq!(
                s.link(&conn, "uid=0,ou=people").await.unwrap().as_ref(),
                Some(&link)
            );
            assert_eq!(s.link(&conn, "uid=9,ou=people").await.unwrap(), None);
            assert_eq!(
                s.links_of_identity(&id1).await.unwrap(),
                vec![link2.clone(), link.clone()],
                "by precedence"
            );
            assert!(s
                .audit(&AuditFilter::latest(1000))
                .await
                .unwrap()
                .iter()
                .any(|e| e.target == target));

            // Replacing an identity keeps its creation time and replaces its keys; a link moves.
            let i1b = IdentityRow {
                display_name: "Ann B".into(),
                created_at_ms: 99,
                updated_at_ms: 20,
                ..i1.clone()
            };
            let i2 = identity(&id2, "Bob", 20);
            let moved = LinkRow {
                identity_id: id2.clone(),
                precedence: 5,
                ..link2.clone()
            };
            s.commit_compose(
                &t,
                &[
                    ComposeWrite::PutIdentity {
                        identity: i1b.clone(),
                        keys: vec![("mail".into(), mail.clone())],
                    },
                    ComposeWrite::PutIdentity {
                        identity: i2.clone(),
                        keys: vec![("mail".into(), mail.clone())],
                    },
                    ComposeWrite::PutLink(moved.clone()),
                    ComposeWrite::DeleteLink {
                        connector_id: conn.clone(),
                        anchor: "uid=0,ou=people".into(),
                    },
                ],
                3,
            )
            .await
            .unwrap();
            assert_eq!(
                s.identity(&id1).await.unwrap(),
                Some(IdentityRow {
                    created_at_ms: 10,
                    ..i1b.clone()
                })
            );
            let mut both = vec![id1.clone(), id2.clone()];
            both.sort();
            let mut found = s.identities_by_key("mail", &mail).await.unwrap();
            found.sort();
            assert_eq!(found, both);
            assert!(s
                .identities_by_key("employeeid", &id1)
                .await
                .unwrap()
                .is_empty());
            assert_eq!(s.link(&conn, "uid=0,ou=people").await.unwrap(), None);
            assert!(s.links_of_identity(&id1).await.unwrap().is_empty());
            assert_eq!(s.links_of_identity(&id2).await.unwrap(), vec![moved]);

            // Deleting an identity removes its keys.
            s.commit_compose(&t, &[ComposeWrite::DeleteIdentity { id: id1.clone() }], 4)
                .await
                .unwrap();
            assert_eq!(s.identity(&id1).await.unwrap(), None);
            assert_eq!(
                s.identities_by_key("mail", &mail).await.unwrap(),
                vec![id2.clone()]
            );

            // Composed clears the mark only at the revision the composer read.
            let stale = s.dirty_objects(&conn, 100).await.unwrap();
            assert_eq!(stale.len(), 2);
            let mut changed = batch(&conn, 1, 0, "2");
            changed.objects[0].attributes_json = r#"{"cn":["Changed"]}"#.into();
            s.commit_import_batch(&t, &changed, 5).await.unwrap();
            let composed: Vec<ComposeWrite> = stale
                .iter()
                .map(|o| ComposeWrite::Composed {
                    connector_id: conn.clone(),
                    anchor: o.anchor.clone(),
                    rev: o.rev,
                })
                .collect();
            s.commit_compose(&t, &composed, 6).await.unwrap();
            let left = s.dirty_objects(&conn, 100).await.unwrap();
            assert_eq!(left.len(), 1, "{left:?}");
            assert_eq!(
                (left[0].anchor.as_str(), left[0].rev),
                ("uid=0,ou=people", 2)
            );

            // A deleted object's tombstone is dropped when composed at its revision only.
            s.finish_full_import(&t, &conn, "person", &unique("run"), 7)
                .await
                .unwrap();
            let gone = s.dirty_objects(&conn, 100).await.unwrap();
            assert_eq!(gone.len(), 2);
            assert!(gone.iter().all(|o| o.deleted));
            let at = |o: &DirtyObject, rev| ComposeWrite::Composed {
                connector_id: conn.clone(),
                anchor: o.anchor.clone(),
                rev,
            };
            s.commit_compose(&t, &[at(&gone[0], gone[0].rev - 1)], 8)
                .await
                .unwrap();
            assert_eq!(s.count_objects(&conn).await.unwrap(), 2);
            s.commit_compose(
                &t,
                &[at(&gone[0], gone[0].rev), at(&gone[1], gone[1].rev)],
                9,
            )
            .await
            .unwrap();
            assert_eq!(s.count_objects(&conn).await.unwrap(), 0);
            assert!(s.dirty_objects(&conn, 100).await.unwrap().is_empty());

            // A fenced compose fails and writes nothing of the batch.
            let composes = |j: &[(String, i64)]| j.iter().filter(|(k, _)| k == "compose").count();
            let before = composes(&s.journal().await.unwrap());
            promoted(&s).await;
            let id3 = unique("idn");
            let late_target = unique("target");
            let r = s
                .commit_compose(
                    &t,
                    &[
                        ComposeWrite::PutIdentity {
                            identity: identity(&id3, "Late", 30),
                            keys: vec![("mail".into(), mail.clone())],
                        },
                        ComposeWrite::DeleteIdentity { id: id2.clone() },
                        ComposeWrite::Audit(audit_entry(&late_target)),
                    ],
                    10,
                )
                .await;
            assert!(matches!(r, Err(StoreError::Fenced { .. })), "{r:?}");
            assert_eq!(s.identity(&id3).await.unwrap(), None);
            assert!(s.identity(&id2).await.unwrap().is_some());
            assert_eq!(s.identities_by_key("mail", &mail).await.unwrap(), vec![id2]);
            assert!(!s
                .audit(&AuditFilter::latest(1000))
                .await
                .unwrap()
                .iter()
                .any(|e| e.target == late_target));
            assert_eq!(composes(&s.journal().await.unwrap()), before);
        })
    })
    .await;
}

#[tokio::test]
async fn a_page_commits_its_own_compose_and_only_what_it_composed_goes_unmarked() {
    run(|s| {
        Box::pin(async move {
            let conn = unique("conn");
            let t = promoted(&s).await;
            // Nothing stored yet; then the page's three objects, as an import compares them.
            let anchors: Vec<String> = (0..3).map(|i| format!("uid={i},ou=people")).collect();
            assert!(s.stored_objects(&conn, &anchors).await.unwrap().is_empty());
            s.commit_import_batch(&t, &batch(&conn, 1, 0, "1"), 10)
                .await
                .unwrap();
            let stored = s.stored_objects(&conn, &anchors).await.unwrap();
            assert_eq!(stored.len(), 1);
            let first = &stored["uid=0,ou=people"];
            assert_eq!(
                (first.object_type.as_str(), first.deleted),
                ("person", false)
            );
            assert_eq!(first.attributes_json, r#"{"cn":["Person 0"]}"#);
            let same = &batch(&conn, 1, 0, "1").objects[0];
            assert!(!StoredObject::changed_by(Some(first), same));
            assert!(StoredObject::changed_by(None, same));
            assert!(StoredObject::changed_by(
                Some(&StoredObject {
                    deleted: true,
                    ..first.clone()
                }),
                same
            ));

            // A page of three (uid=0 unchanged and still marked, two new): the page composes
            // uid=1 itself; uid=2 is left to the composer.
            let id = unique("idn");
            let link = LinkRow {
                connector_id: conn.clone(),
                anchor: "uid=1,ou=people".into(),
                identity_id: id.clone(),
                precedence: 1,
                contribution_json: "{}".into(),
            };
            let mut page = batch(&conn, 3, 0, "2");
            page.composed = Some(PageCompose {
                anchors: ["uid=1,ou=people".to_string()].into_iter().collect(),
                writes: vec![
                    ComposeWrite::PutIdentity {
                        identity: identity(&id, "Page", 11),
                        keys: vec![("uid".into(), id.clone())],
                    },
                    ComposeWrite::PutLink(link.clone()),
                ],
            });
            let out = s.commit_import_batch(&t, &page, 11).await.unwrap();
            assert_eq!((out.added, out.updated, out.unchanged), (2, 0, 1));
            assert_eq!(s.identity(&id).await.unwrap().unwrap().display_name, "Page");
            assert_eq!(
                s.identities_by_key("uid", &id).await.unwrap(),
                vec![id.clone()]
            );
            assert_eq!(
                s.link(&conn, "uid=1,ou=people").await.unwrap().as_ref(),
                Some(&link)
            );
            let mut marked: Vec<String> = s
                .dirty_objects(&conn, 100)
                .await
                .unwrap()
                .into_iter()
                .map(|o| o.anchor)
                .collect();
            marked.sort();
            assert_eq!(marked, vec!["uid=0,ou=people", "uid=2,ou=people"]);

            // Composed by its page even though linked: a linked object changed by an import is
            // otherwise marked whatever the batch's `compose` says (and unlinked ones of an
            // unruled batch are not).
            let mut again = batch(&conn, 3, 0, "3");
            again.compose = false;
            for o in &mut again.objects {
                o.attributes_json = r#"{"cn":["changed"]}"#.into();
            }
            again.composed = Some(PageCompose {
                anchors: ["uid=1,ou=people".to_string()].into_iter().collect(),
                writes: Vec::new(),
            });
            let out = s.commit_import_batch(&t, &again, 12).await.unwrap();
            assert_eq!((out.added, out.updated), (0, 3));
            assert!(s.dirty_objects(&conn, 100).await.unwrap().is_empty());

            // Fenced as a whole: a stale writer's page commits neither objects nor writes.
            promoted(&s).await;
            let gone = unique("idn");
            let mut stale = batch(&conn, 1, 7, "4");
            stale.composed = Some(PageCompose {
                anchors: ["uid=7,ou=people".to_string()].into_iter().collect(),
                writes: vec![ComposeWrite::PutIdentity {
                    identity: identity(&gone, "Stale", 13),
                    keys: Vec::new(),
                }],
            });
            let r = s.commit_import_batch(&t, &stale, 13).await;
            assert!(matches!(r, Err(StoreError::Fenced { .. })), "{r:?}");
            assert_eq!(s.identity(&gone).await.unwrap(), None);
            let seven = ["uid=7,ou=people".to_string()];
            assert!(s.stored_objects(&conn, &seven).await.unwrap().is_empty());
        })
    })
    .await;
}

#[tokio::test]
async fn unruled_imports_mark_only_linked_objects_and_new_rules_mark_all() {
    run(|s| {
        Box::pin(async move {
            let conn = unique("conn");
            let t = promoted(&s).await;
            let unruled = |n, tag: &str| {
                let mut b = batch(&conn, n, 0, "1");
                b.compose = false;
                for o in &mut b.objects {
                    o.attributes_json = format!(r#"{{"cn":["{tag}"]}}"#);
                }
                b
            };
            let out = s
                .commit_import_batch(&t, &unruled(3, "a"), 10)
                .await
                .unwrap();
            assert_eq!((out.added, out.updated), (3, 0));
            assert!(s.dirty_objects(&conn, 100).await.unwrap().is_empty());

            let id = unique("idn");
            s.commit_compose(
                &t,
                &[
                    ComposeWrite::PutIdentity {
                        identity: identity(&id, "Linked", 10),
                        keys: Vec::new(),
                    },
                    ComposeWrite::PutLink(LinkRow {
                        connector_id: conn.clone(),
                        anchor: "uid=1,ou=people".into(),
                        identity_id: id.clone(),
                        precedence: 1,
                        contribution_json: "{}".into(),
                    }),
                ],
                11,
            )
            .await
            .unwrap();
            // All three change; only the linked one has a contribution to take back.
            let out = s
                .commit_import_batch(&t, &unruled(3, "b"), 12)
                .await
                .unwrap();
            assert_eq!((out.added, out.updated), (0, 3));
            let dirty = s.dirty_objects(&conn, 100).await.unwrap();
            assert_eq!(
                dirty.iter().map(|o| o.anchor.as_str()).collect::<Vec<_>>(),
                vec!["uid=1,ou=people"]
            );
            s.commit_compose(
                &t,
                &[ComposeWrite::Composed {
                    connector_id: conn.clone(),
                    anchor: dirty[0].anchor.clone(),
                    rev: dirty[0].rev,
                }],
                13,
            )
            .await
            .unwrap();

            // Changed rules: linked objects, and every object of a ruled type, are marked.
            assert_eq!(s.mark_for_recompose(&t, &conn, &[]).await.unwrap(), 1);
            assert_eq!(s.mark_for_recompose(&t, &conn, &[]).await.unwrap(), 0);
            let person = vec!["person".to_string()];
            assert_eq!(s.mark_for_recompose(&t, &conn, &person).await.unwrap(), 2);
            assert_eq!(s.dirty_objects(&conn, 100).await.unwrap().len(), 3);

            promoted(&s).await;
            let r = s.mark_for_recompose(&t, &conn, &person).await;
            assert!(matches!(r, Err(StoreError::Fenced { .. })), "{r:?}");
        })
    })
    .await;
}

#[tokio::test]
async fn objects_without_rules_or_links_are_settled_in_bulk() {
    run(|s| {
        Box::pin(async move {
            let conn = unique("conn");
            let t = promoted(&s).await;
            s.commit_import_batch(&t, &batch(&conn, 5, 0, "1"), 10)
                .await
                .unwrap();
            let linked = "uid=4,ou=people";
            let id = unique("idn");
            s.commit_compose(
                &t,
                &[
                    ComposeWrite::PutIdentity {
                        identity: identity(&id, "Linked", 10),
                        keys: Vec::new(),
                    },
                    ComposeWrite::PutLink(LinkRow {
                        connector_id: conn.clone(),
                        anchor: linked.into(),
                        identity_id: id.clone(),
                        precedence: 1,
                        contribution_json: "{}".into(),
                    }),
                ],
                11,
            )
            .await
            .unwrap();
            let person = vec!["person".to_string()];
            // A ruled type is the composer's: nothing settled.
            assert_eq!(s.settle_unruled(&t, &conn, &person, 100).await.unwrap(), 0);
            assert_eq!(s.dirty_objects(&conn, 100).await.unwrap().len(), 5);
            // Unruled: at most `limit` per call, and never the linked object.
            assert_eq!(s.settle_unruled(&t, &conn, &[], 3).await.unwrap(), 3);
            assert_eq!(s.settle_unruled(&t, &conn, &[], 3).await.unwrap(), 1);
            assert_eq!(s.settle_unruled(&t, &conn, &[], 3).await.unwrap(), 0);
            let left = s.dirty_objects(&conn, 100).await.unwrap();
            assert_eq!(
                left.iter().map(|o| o.anchor.as_str()).collect::<Vec<_>>(),
                vec![linked]
            );

            // Tombstones of unlinked objects go; the linked one waits for the composer.
            s.finish_full_import(&t, &conn, "person", &unique("run"), 12)
                .await
                .unwrap();
            assert_eq!(s.settle_unruled(&t, &conn, &[], 100).await.unwrap(), 4);
            assert_eq!(s.count_objects(&conn).await.unwrap(), 1);
            let left = s.dirty_objects(&conn, 100).await.unwrap();
            assert_eq!(left.len(), 1);
            assert!(left[0].deleted && left[0].anchor == linked);

            // Fenced: a stale token settles nothing.
            s.commit_import_batch(&t, &batch(&conn, 2, 10, "2"), 13)
                .await
                .unwrap();
            promoted(&s).await;
            let r = s.settle_unruled(&t, &conn, &[], 100).await;
            assert!(matches!(r, Err(StoreError::Fenced { .. })), "{r:?}");
            assert_eq!(s.dirty_objects(&conn, 100).await.unwrap().len(), 3);
        })
    })
    .await;
}

#[tokio::test]
async fn identities_search_and_page_by_id() {
    run(|s| {
        Box::pin(async move {
            let p = unique("idx");
            let t = promoted(&s).await;
            let names = [
                "Ann Smith",
                "Bob Jones",
                "100% sure",
                "under_score",
                "[br]acket",
                "back\\slash",
            ];
            let writes: Vec<ComposeWrite> = names
                .iter()
                .enumerate()
                .map(|(i, n)| ComposeWrite::PutIdentity {
                    identity: identity(&format!("{p}{i}"), &format!("{p} {n}"), 1),
                    keys: Vec::new(),
                })
                .collect();
            s.commit_compose(&t, &writes, 1).await.unwrap();
            assert!(s.count_identities().await.unwrap() >= names.len() as i64);
            let ids = |rows: Vec<IdentityRow>| rows.into_iter().map(|r| r.id).collect::<Vec<_>>();
            let search = |q: String| {
                let s = s.clone();
                async move { ids(s.identities(Some(&q), None, 100).await.unwrap()) }
            };
            let id = |i: usize| format!("{p}{i}");

            // Substring of the display name, case-insensitive.
            assert_eq!(search(p.clone()).await, (0..6).map(id).collect::<Vec<_>>());
            assert_eq!(search(p.to_uppercase()).await.len(), 6);
            assert_eq!(search(format!("{p} bob j")).await, vec![id(1)]);
            // The id exactly (not a substring of any display name).
            assert_eq!(search(id(2)).await, vec![id(2)]);
            assert!(search(format!("{p}9")).await.is_empty());
            // Wildcards in the query are literal characters.
            assert!(search(format!("{p} B_b")).await.is_empty());
            assert!(search(format!("{p} %")).await.is_empty());
            assert!(search(format!("{p} A%h")).await.is_empty());
            assert_eq!(search(format!("{p} 100%")).await, vec![id(2)]);
            assert_eq!(search(format!("{p} under_s")).await, vec![id(3)]);
            assert_eq!(search(format!("{p} [br]a")).await, vec![id(4)]);
            assert!(search(format!("{p} [ab]ob")).await.is_empty());
            assert_eq!(search(format!("{p} back\\s")).await, vec![id(5)]);
            assert!(search(format!("{p} back\\\\s")).await.is_empty());

            // Keyset paging by id.
            let page = |after: Option<String>, limit| {
                let (s, p) = (s.clone(), p.clone());
                async move {
                    ids(s
                        .identities(Some(&p), after.as_deref(), limit)
                        .await
                        .unwrap())
                }
            };
            assert_eq!(page(None, 2).await, vec![id(0), id(1)]);
            assert_eq!(page(Some(id(1)), 2).await, vec![id(2), id(3)]);
            assert_eq!(page(Some(id(3)), 2).await, vec![id(4), id(5)]);
            assert!(page(Some(id(5)), 2).await.is_empty());
            // Without a search: ids after the cursor, in order.
            let after: Vec<String> = ids(s.identities(None, Some(&id(3)), 50).await.unwrap())
                .into_iter()
                .filter(|i| i.starts_with(&p))
                .collect();
            assert_eq!(after, vec![id(4), id(5)]);
            assert_eq!(
                s.identity(&id(0)).await.unwrap().map(|r| r.display_name),
                Some(format!("{p} Ann Smith"))
            );
        })
    })
    .await;
}

/// An object in the connectors' stored form (`{"dn"?, "attributes"}`).
fn space_object(anchor: &str, dn: Option<&str>, attributes: serde_json::Value) -> CsObject {
    let mut stored = serde_json::json!({ "attributes": attributes });
    if let Some(dn) = dn {
        stored["dn"] = dn.into();
    }
    CsObject {
        anchor: anchor.into(),
        object_type: "person".into(),
        attributes_json: stored.to_string(),
    }
}

#[tokio::test]
async fn connector_space_pages_by_anchor_searches_and_shows_links() {
    run(|s| {
        Box::pin(async move {
            let (conn, other) = (unique("conn"), unique("conn"));
            let (idn, run1) = (unique("idn"), unique("run"));
            let t = promoted(&s).await;
            let doe = r"cn=Doe\, John/Ops,ou=people,dc=x";
            let objects = vec![
                space_object(
                    doe,
                    Some(doe),
                    serde_json::json!({"cn": ["John Doe"], "objectGUID": [{"base64": "AJ//Cg=="}]}),
                ),
                space_object(
                    "uid=ann,ou=people",
                    Some("uid=ann,ou=people"),
                    serde_json::json!({"mail": ["Ann@Example.org"]}),
                ),
                space_object(
                    "uid=bob,ou=people",
                    None,
                    serde_json::json!({"title": ["100% sure"]}),
                ),
                space_object(
                    "uid=zed,ou=people",
                    None,
                    serde_json::json!({"title": ["gone"]}),
                ),
            ];
            let mut b = ImportBatch {
                connector: conn.clone(),
                object_type: "person".into(),
                objects: objects.clone(),
                watermark: None,
                seen_in_run: None,
                compose: true,
                composed: None,
            };
            s.commit_import_batch(&t, &b, 1).await.unwrap();
            // A full import that sees all but zed: zed is marked deleted, the others seen by it.
            b.objects.truncate(3);
            b.seen_in_run = Some(run1.clone());
            s.commit_import_batch(&t, &b, 2).await.unwrap();
            assert_eq!(
                s.finish_full_import(&t, &conn, "person", &run1, 3)
                    .await
                    .unwrap(),
                1
            );
            s.commit_compose(
                &t,
                &[
                    ComposeWrite::PutIdentity {
                        identity: identity(&idn, "Ann", 4),
                        keys: Vec::new(),
                    },
                    ComposeWrite::PutLink(LinkRow {
                        connector_id: conn.clone(),
                        anchor: "uid=ann,ou=people".into(),
                        identity_id: idn.clone(),
                        precedence: 1,
                        contribution_json: "{}".into(),
                    }),
                ],
                4,
            )
            .await
            .unwrap();
            // Another connector's objects never show.
            s.commit_import_batch(&t, &batch(&other, 2, 0, "1"), 5)
                .await
                .unwrap();

            let page = |search: Option<&'static str>, after: Option<String>, limit: i64| {
                let (s, conn) = (s.clone(), conn.clone());
                async move {
                    s.connector_space(&conn, search, after.as_deref(), limit)
                        .await
                        .unwrap()
                }
            };
            let anchors =
                |rows: Vec<SpaceObjectRow>| rows.into_iter().map(|r| r.anchor).collect::<Vec<_>>();
            let all = page(None, None, 100).await;
            assert_eq!(
                all,
                vec![
                    SpaceObjectRow {
                        anchor: doe.into(),
                        object_type: "person".into(),
                        dn: Some(doe.into()),
                        deleted: false,
                        identity_id: None,
                    },
                    SpaceObjectRow {
                        anchor: "uid=ann,ou=people".into(),
                        object_type: "person".into(),
                        dn: Some("uid=ann,ou=people".into()),
                        deleted: false,
                        identity_id: Some(idn.clone()),
                    },
                    SpaceObjectRow {
                        anchor: "uid=bob,ou=people".into(),
                        object_type: "person".into(),
                        dn: None,
                        deleted: false,
                        identity_id: None,
                    },
                    SpaceObjectRow {
                        anchor: "uid=zed,ou=people".into(),
                        object_type: "person".into(),
                        dn: None,
                        deleted: true,
                        identity_id: None,
                    },
                ],
                "ordered by anchor, deleted ones included, links joined"
            );
            // Keyset paging.
            assert_eq!(
                anchors(page(None, None, 2).await),
                vec![doe.to_string(), "uid=ann,ou=people".into()]
            );
            assert_eq!(
                anchors(page(None, Some("uid=ann,ou=people".into()), 2).await),
                vec!["uid=bob,ou=people".to_string(), "uid=zed,ou=people".into()]
            );
            assert!(page(None, Some("uid=zed,ou=people".into()), 2)
                .await
                .is_empty());

            // Search: the anchor or the attributes JSON, substring, ignoring case.
            let found = |q: &'static str| {
                let page = &page;
                async move { anchors(page(Some(q), None, 100).await) }
            };
            assert_eq!(
                found("john doe").await,
                vec![doe.to_string()],
                "a text value"
            );
            assert_eq!(
                found(r"DOE\, JOHN/ops").await,
                vec![doe.to_string()],
                "the DN, backslash and all"
            );
            assert_eq!(
                found("ann@EXAMPLE").await,
                vec!["uid=ann,ou=people".to_string()]
            );
            assert_eq!(
                found("uid=b").await,
                vec!["uid=bob,ou=people".to_string()],
                "the anchor"
            );
            assert_eq!(
                found("AJ//Cg==").await,
                vec![doe.to_string()],
                "bytes by their base64"
            );
            assert_eq!(
                found("objectguid").await,
                vec![doe.to_string()],
                "attribute names"
            );
            // Wildcards are literal.
            assert_eq!(found("100%").await, vec!["uid=bob,ou=people".to_string()]);
            assert_eq!(found("%").await, vec!["uid=bob,ou=people".to_string()]);
            assert!(found("_").await.is_empty());
            assert!(found("j_hn").await.is_empty());
            assert!(found("nobody-here").await.is_empty());
            // Search and cursor together.
            assert_eq!(
                anchors(page(Some("ou=people"), Some(doe.into()), 1).await),
                vec!["uid=ann,ou=people".to_string()]
            );

            // One object, with everything stored about it.
            let one = s.connector_object(&conn, doe).await.unwrap().unwrap();
            assert_eq!(
                (
                    one.anchor.as_str(),
                    one.object_type.as_str(),
                    one.attributes_json.as_str()
                ),
                (doe, "person", objects[0].attributes_json.as_str())
            );
            assert_eq!(
                (
                    one.deleted,
                    one.seen_run.as_deref(),
                    one.identity_id.as_deref()
                ),
                (false, Some(run1.as_str()), None)
            );
            assert_eq!(
                one.updated_at_ms, 1,
                "written once: the full import found it unchanged"
            );
            let ann = s
                .connector_object(&conn, "uid=ann,ou=people")
                .await
                .unwrap()
                .unwrap();
            assert_eq!(ann.identity_id.as_deref(), Some(idn.as_str()));
            let zed = s
                .connector_object(&conn, "uid=zed,ou=people")
                .await
                .unwrap()
                .unwrap();
            assert!(
                zed.deleted && zed.pending && zed.seen_run.is_none(),
                "{zed:?}"
            );
            assert_eq!(s.connector_object(&conn, "uid=nobody").await.unwrap(), None);
            assert_eq!(s.connector_object(&other, doe).await.unwrap(), None);
        })
    })
    .await;
}

#[tokio::test]
async fn audit_filters_by_actor_action_and_time() {
    run(|s| {
        Box::pin(async move {
            let (alice, bob, p) = (unique("alice"), unique("bob"), unique("act"));
            let entries = [
                (1_000, &alice, format!("{p}.create")),
                (2_000, &bob, format!("{p}.create")),
                (3_000, &alice, format!("{p}.delete")),
                (4_000, &alice, format!("{p}x.create")),
            ];
            for (at, actor, action) in &entries {
                s.append_audit(&AuditEntry {
                    at_ms: *at,
                    actor: actor.to_string(),
                    action: action.clone(),
                    target: format!("t{at}"),
                    detail: "{}".into(),
                })
                .await
                .unwrap();
            }
            let got = |f: AuditFilter| {
                let s = s.clone();
                async move {
                    s.audit(&f)
                        .await
                        .unwrap()
                        .into_iter()
                        .map(|e| e.at_ms)
                        .collect::<Vec<_>>()
                }
            };
            let by = |actor: &str| AuditFilter {
                actor: Some(actor.into()),
                ..AuditFilter::latest(100)
            };
            assert_eq!(
                got(by(&alice)).await,
                vec![4_000, 3_000, 1_000],
                "newest first"
            );
            assert_eq!(got(by(&bob)).await, vec![2_000]);
            let action = |a: String| AuditFilter {
                action: Some(a),
                ..AuditFilter::latest(100)
            };
            assert_eq!(
                got(action(format!("{p}.create"))).await,
                vec![2_000, 1_000],
                "exact"
            );
            assert!(
                got(action(format!("{p}.cre"))).await.is_empty(),
                "no prefix without the dot"
            );
            assert_eq!(
                got(action(format!("{p}."))).await,
                vec![3_000, 2_000, 1_000],
                "a prefix ending with a dot"
            );
            assert!(
                got(action("%.".into())).await.is_empty(),
                "wildcards are literal"
            );
            let window = AuditFilter {
                since_ms: Some(2_000),
                until_ms: Some(4_000),
                ..by(&alice)
            };
            assert_eq!(
                got(window).await,
                vec![3_000],
                "since inclusive, until exclusive"
            );
            let since = AuditFilter {
                since_ms: Some(3_000),
                ..by(&alice)
            };
            assert_eq!(got(since).await, vec![4_000, 3_000]);
            let until = AuditFilter {
                until_ms: Some(1_001),
                ..action(format!("{p}."))
            };
            assert_eq!(got(until).await, vec![1_000]);
            assert_eq!(
                got(AuditFilter {
                    limit: 1,
                    ..by(&alice)
                })
                .await,
                vec![4_000]
            );
            let both = AuditFilter {
                action: Some(format!("{p}.create")),
                ..by(&alice)
            };
            assert_eq!(got(both).await, vec![1_000], "every filter holds");
        })
    })
    .await;
}

/// More objects than one statement of either backend holds (SQLite's 500 rows, SQL Server's
/// 695 for objects), so the batched paths split pages and lists across statements.
const MANY: usize = 1200;

fn index_of(anchor: &str) -> usize {
    anchor
        .strip_prefix("uid=")
        .and_then(|rest| rest.split_once(','))
        .and_then(|(i, _)| i.parse().ok())
        .unwrap()
}

/// Composes every marked object of the connector: clears its mark (or drops its tombstone).
async fn compose_all(s: &Arc<dyn Store>, t: &FenceToken, conn: &str) {
    let writes: Vec<ComposeWrite> = s
        .dirty_objects(conn, 10 * MANY as i64)
        .await
        .unwrap()
        .into_iter()
        .map(|o| ComposeWrite::Composed {
            connector_id: conn.into(),
            anchor: o.anchor,
            rev: o.rev,
        })
        .collect();
    s.commit_compose(t, &writes, 9).await.unwrap();
    assert!(s.dirty_objects(conn, 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn import_pages_larger_than_a_statement_count_and_mark_every_object() {
    run(|s| {
        Box::pin(async move {
            let conn = unique("conn");
            let t = promoted(&s).await;
            let (run1, run2) = (unique("run"), unique("run"));
            let mut first = batch(&conn, 800, 0, "1");
            first.seen_in_run = Some(run1);
            let out = s.commit_import_batch(&t, &first, 10).await.unwrap();
            assert_eq!((out.added, out.updated, out.unchanged), (800, 0, 0));
            compose_all(&s, &t, &conn).await;

            // 0..400 as stored, 400..800 changed, 800..1,200 new, in one page.
            let changed = |o: &mut CsObject| {
                o.attributes_json = format!(r#"{{"cn":["Changed {}"]}}"#, o.anchor);
            };
            let mut page = batch(&conn, MANY, 0, "2");
            page.seen_in_run = Some(run2.clone());
            page.objects[400..800].iter_mut().for_each(changed);
            let out = s.commit_import_batch(&t, &page, 11).await.unwrap();
            assert_eq!((out.added, out.updated, out.unchanged), (400, 400, 400));
            assert_eq!(s.count_objects(&conn).await.unwrap(), MANY as i64);
            let dirty = s.dirty_objects(&conn, 10 * MANY as i64).await.unwrap();
            assert_eq!(dirty.len(), 800);
            for o in &dirty {
                let i = index_of(&o.anchor);
                assert!(i >= 400, "unchanged {} is marked", o.anchor);
                let expected = &page.objects[i];
                assert_eq!(o.attributes_json, expected.attributes_json);
                assert_eq!((o.rev, o.deleted), (if i < 800 { 2 } else { 1 }, false));
            }
            // The unchanged ones were recorded as seen by the run too: nothing is unseen.
            assert_eq!(
                s.finish_full_import(&t, &conn, "person", &run2, 12)
                    .await
                    .unwrap(),
                0
            );
            compose_all(&s, &t, &conn).await;

            // Without rules every object changes, but only the linked ones are marked.
            let linked = [5, 1000];
            let id = unique("idn");
            let mut writes = vec![ComposeWrite::PutIdentity {
                identity: identity(&id, "Linked", 10),
                keys: Vec::new(),
            }];
            writes.extend(linked.iter().map(|i| {
                ComposeWrite::PutLink(LinkRow {
                    connector_id: conn.clone(),
                    anchor: format!("uid={i},ou=people"),
                    identity_id: id.clone(),
                    precedence: 1,
                    contribution_json: "{}".into(),
                })
            }));
            s.commit_compose(&t, &writes, 13).await.unwrap();
            let mut unruled = batch(&conn, MANY, 0, "3");
            unruled.compose = false;
            unruled.objects.iter_mut().for_each(|o| {
                o.attributes_json = format!(r#"{{"cn":["Unruled {}"]}}"#, o.anchor);
            });
            let out = s.commit_import_batch(&t, &unruled, 14).await.unwrap();
            assert_eq!((out.added, out.updated, out.unchanged), (0, MANY as u64, 0));
            let mut marked: Vec<usize> = s
                .dirty_objects(&conn, 10 * MANY as i64)
                .await
                .unwrap()
                .iter()
                .map(|o| index_of(&o.anchor))
                .collect();
            marked.sort();
            assert_eq!(marked, linked);
            compose_all(&s, &t, &conn).await;

            // Deleted objects seen again with the same attributes are back: changes, marked.
            assert_eq!(
                s.finish_full_import(&t, &conn, "person", &unique("run"), 15)
                    .await
                    .unwrap(),
                MANY as u64
            );
            let mut ruled = unruled;
            ruled.compose = true;
            let out = s.commit_import_batch(&t, &ruled, 16).await.unwrap();
            assert_eq!((out.added, out.updated, out.unchanged), (0, MANY as u64, 0));
            let back = s.dirty_objects(&conn, 10 * MANY as i64).await.unwrap();
            assert_eq!(back.len(), MANY);
            assert!(back.iter().all(|o| !o.deleted));
        })
    })
    .await;
}

#[tokio::test]
async fn compose_commits_and_prefetch_reads_larger_than_a_statement() {
    run(|s| {
        Box::pin(async move {
            let conn = unique("conn");
            let p = unique("idn");
            let t = promoted(&s).await;
            s.commit_import_batch(&t, &batch(&conn, MANY, 0, "1"), 1)
                .await
                .unwrap();
            let id = |i: usize| format!("{p}-{i:04}");
            let anchor = |i: usize| format!("uid={i},ou=people");
            let mail = |i: usize| format!("{p}-{i}@example.org");
            let link = |i: usize, precedence| LinkRow {
                connector_id: conn.clone(),
                anchor: anchor(i),
                identity_id: id(i),
                precedence,
                contribution_json: format!(r#"{{"n":{i}}}"#),
            };
            let mut writes = Vec::new();
            for i in 0..MANY {
                writes.push(ComposeWrite::PutIdentity {
                    identity: identity(&id(i), &format!("Person {i}"), 10),
                    keys: vec![("mail".into(), mail(i)), ("employeeid".into(), id(i))],
                });
                writes.push(ComposeWrite::PutLink(link(i, 1)));
                writes.push(ComposeWrite::Audit(audit_entry(&id(i))));
            }
            let dirty = s.dirty_objects(&conn, 10 * MANY as i64).await.unwrap();
            assert_eq!(dirty.len(), MANY);
            writes.extend(dirty.into_iter().map(|o| ComposeWrite::Composed {
                connector_id: conn.clone(),
                anchor: o.anchor,
                rev: o.rev,
            }));
            s.commit_compose(&t, &writes, 2).await.unwrap();
            assert!(s.dirty_objects(&conn, 10).await.unwrap().is_empty());
            let audited = s
                .audit(&AuditFilter::latest(100_000))
                .await
                .unwrap()
                .into_iter()
                .filter(|e| e.target.starts_with(&p))
                .count();
            assert_eq!(audited, MANY);

            // The composer's prefetch reads, each over more than a statement's worth, with
            // inputs that find nothing among them.
            let anchors: Vec<String> = (0..MANY + 10).map(anchor).collect();
            let keys: Vec<(String, String)> = (0..MANY)
                .flat_map(|i| [("mail".to_string(), mail(i)), ("employeeid".into(), id(i))])
                .chain([("mail".to_string(), unique("nobody"))])
                .collect();
            let ids: Vec<String> = (0..MANY).map(id).chain([unique("missing")]).collect();
            let sorted_links = |mut l: Vec<LinkRow>| {
                l.sort_by(|a, b| a.anchor.cmp(&b.anchor));
                l
            };
            let mut expected: Vec<LinkRow> = (0..MANY).map(|i| link(i, 1)).collect();
            expected.sort_by(|a, b| a.anchor.cmp(&b.anchor));
            let links = s.links_for(&conn, &anchors).await.unwrap();
            assert_eq!(sorted_links(links), expected);
            let mut found = s.identities_by_keys(&keys).await.unwrap();
            found.sort();
            let mut want: Vec<(String, String, String)> = keys[..2 * MANY]
                .iter()
                .enumerate()
                .map(|(n, (a, v))| (a.clone(), v.clone(), id(n / 2)))
                .collect();
            want.sort();
            assert_eq!(found, want);
            let (mut rows, links) = s.identities_with_links(&ids).await.unwrap();
            rows.sort_by(|a, b| a.id.cmp(&b.id));
            let all: Vec<IdentityRow> = (0..MANY)
                .map(|i| identity(&id(i), &format!("Person {i}"), 10))
                .collect();
            assert_eq!(rows, all);
            assert_eq!(sorted_links(links), expected);

            // The first half goes (identities, keys and links); the second half is replaced
            // (keeping its creation time, with one key left) and its links move.
            let half = MANY / 2;
            let mut writes = Vec::new();
            for i in 0..half {
                writes.push(ComposeWrite::DeleteLink {
                    connector_id: conn.clone(),
                    anchor: anchor(i),
                });
                writes.push(ComposeWrite::DeleteIdentity { id: id(i) });
            }
            let renamed = |i: usize| IdentityRow {
                display_name: format!("Renamed {i}"),
                created_at_ms: 99,
                updated_at_ms: 20,
                ..identity(&id(i), "", 10)
            };
            for i in half..MANY {
                writes.push(ComposeWrite::PutIdentity {
                    identity: renamed(i),
                    keys: vec![("mail".into(), mail(i))],
                });
                writes.push(ComposeWrite::PutLink(link(i, 2)));
            }
            s.commit_compose(&t, &writes, 3).await.unwrap();
            let (mut rows, links) = s.identities_with_links(&ids).await.unwrap();
            rows.sort_by(|a, b| a.id.cmp(&b.id));
            let kept: Vec<IdentityRow> = (half..MANY)
                .map(|i| IdentityRow {
                    created_at_ms: 10,
                    ..renamed(i)
                })
                .collect();
            assert_eq!(rows, kept);
            let moved: Vec<LinkRow> = (half..MANY).map(|i| link(i, 2)).collect();
            assert_eq!(sorted_links(links), sorted_links(moved.clone()));
            assert_eq!(
                sorted_links(s.links_for(&conn, &anchors).await.unwrap()),
                sorted_links(moved)
            );
            let mut found = s.identities_by_keys(&keys).await.unwrap();
            found.sort();
            let mut want: Vec<(String, String, String)> = (half..MANY)
                .map(|i| ("mail".to_string(), mail(i), id(i)))
                .collect();
            want.sort();
            assert_eq!(found, want);
        })
    })
    .await;
}
