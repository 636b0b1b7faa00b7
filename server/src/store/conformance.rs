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
                s.promote(&a, e + 1).await.unwrap(),
                PromoteOutcome::Promoted
            );
            assert_eq!(
                s.promote(&a, e + 1).await.unwrap(),
                PromoteOutcome::AlreadyHeld
            );
            // Same epoch by another instance, or a smaller one: refused.
            assert!(matches!(
                s.promote(&b, e + 1).await,
                Err(StoreError::StaleEpoch { stored, .. }) if stored == e + 1
            ));
            assert!(matches!(
                s.promote(&b, e).await,
                Err(StoreError::StaleEpoch { .. })
            ));
            assert_eq!(
                s.promote(&b, e + 2).await.unwrap(),
                PromoteOutcome::Promoted
            );
            let f = s.fence().await.unwrap();
            assert_eq!((f.epoch, f.holder), (e + 2, b));
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
            s.promote(&a, e + 1).await.unwrap();
            let ta = FenceToken {
                instance: a.clone(),
                epoch: e + 1,
            };
            s.engine_tick(&ta, 1).await.unwrap();
            s.commit_import_batch(&ta, &batch(&conn, 3, 0, "w1"), 1)
                .await
                .unwrap();
            s.promote(&b, e + 2).await.unwrap();
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
            let tb = FenceToken {
                instance: b,
                epoch: e + 2,
            };
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
            s.promote(&a, e + 1).await.unwrap();
            let t = FenceToken {
                instance: a,
                epoch: e + 1,
            };
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
                host: "host".into(),
                role,
                epoch,
                version: "1".into(),
                started_at_ms: 0,
                now_ms: now,
            };
            let t0 = now_ms();
            s.promote(&a, e + 1).await.unwrap();
            s.heartbeat(&hb(&a, Role::Active, e + 1, t0)).await.unwrap();
            s.heartbeat(&hb(&b, Role::Standby, 0, t0)).await.unwrap();
            s.promote(&b, e + 2).await.unwrap();
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
                .audit(50)
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
            s.promote(&a, e + 1).await.unwrap();
            let ta = FenceToken {
                instance: a,
                epoch: e + 1,
            };
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
            s.promote(&b, e + 2).await.unwrap();
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
    assert_eq!(rx, vec![1], "each version applied exactly once");
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
