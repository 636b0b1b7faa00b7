//! Retention: the active prunes the tables that grow with use (finished runs, the audit log,
//! import batches, the fence journal) by age, in bounded fenced batches, so a large backlog
//! never becomes one long transaction that would hold the fence lock.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::RetentionConfig;
use crate::engine::Engine;
use crate::store::{now_ms, RetainedTable, Role, StoreError};

/// Rows deleted per transaction.
pub const BATCH: i64 = 5_000;
/// Batches per table per pass; the rest waits for the next pass.
const MAX_BATCHES: usize = 20;
const EVERY: Duration = Duration::from_secs(600);
const DAY_MS: i64 = 86_400_000;

/// Each table with a retention and the time before which its rows go.
pub fn cutoffs(cfg: &RetentionConfig, now_ms: i64) -> Vec<(RetainedTable, i64)> {
    RetainedTable::ALL
        .into_iter()
        .filter_map(|t| {
            let days = match t {
                RetainedTable::Runs => cfg.runs_days,
                RetainedTable::AuditLog => cfg.audit_days,
                RetainedTable::ImportBatches => cfg.import_batches_days,
                RetainedTable::FenceJournal => cfg.fence_journal_days,
            };
            (days > 0).then(|| (t, now_ms - days as i64 * DAY_MS))
        })
        .collect()
}

/// One pass over every table; returns the rows deleted per table. Stops at the first store
/// error (a fence error demotes the engine through `commit`).
pub async fn prune_once(
    engine: &Engine,
    cfg: &RetentionConfig,
    now_ms: i64,
) -> Result<Vec<(RetainedTable, u64)>, StoreError> {
    let mut out = Vec::new();
    for (table, before) in cutoffs(cfg, now_ms) {
        let mut total = 0;
        for _ in 0..MAX_BATCHES {
            let store = engine.store();
            let pruned = engine
                .write(|t| async move { store.prune(&t, table, before, BATCH).await })
                .await;
            let Some(n) = pruned else {
                return Ok(out);
            };
            let n = n?;
            total += n;
            if (n as i64) < BATCH {
                break;
            }
        }
        out.push((table, total));
    }
    Ok(out)
}

/// Prunes every ten minutes while this instance is active, until `stop`.
pub async fn run_loop(
    engine: Arc<Engine>,
    cfg: RetentionConfig,
    role: watch::Receiver<crate::engine::RoleStatus>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = stop.changed() => return,
        }
        if role.borrow().role != Role::Active {
            continue;
        }
        match prune_once(&engine, &cfg, now_ms()).await {
            Ok(done) => {
                for (table, n) in done.into_iter().filter(|(_, n)| *n > 0) {
                    tracing::info!(table = table.name(), rows = n, "retention: pruned");
                }
            }
            Err(e) => tracing::warn!(error = %e, "retention pass failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::store::AuditEntry;

    #[test]
    fn zero_days_keeps_a_table_for_ever() {
        let cfg = RetentionConfig {
            runs_days: 1,
            audit_days: 0,
            import_batches_days: 2,
            fence_journal_days: 0,
        };
        let now = 10 * DAY_MS;
        assert_eq!(
            cutoffs(&cfg, now),
            vec![
                (RetainedTable::Runs, 9 * DAY_MS),
                (RetainedTable::ImportBatches, 8 * DAY_MS)
            ]
        );
    }

    #[tokio::test]
    async fn a_pass_deletes_old_rows_in_batches_and_only_on_the_active() {
        let crate::testing::Parts {
            dir: _dir,
            store,
            engine,
        } = crate::testing::parts("a").await;
        let now = 1_000 * DAY_MS;
        let old = BATCH as usize + 7;
        for i in 0..old {
            let at = now - 500 * DAY_MS + i as i64;
            store
                .append_audit(&AuditEntry {
                    at_ms: at,
                    actor: "t".into(),
                    action: "x".into(),
                    target: "t".into(),
                    detail: "{}".into(),
                })
                .await
                .unwrap();
        }
        store
            .append_audit(&AuditEntry {
                at_ms: now - DAY_MS,
                actor: "t".into(),
                action: "recent".into(),
                target: "t".into(),
                detail: "{}".into(),
            })
            .await
            .unwrap();
        let cfg = RetentionConfig::default();
        // A standby prunes nothing.
        assert!(prune_once(&engine, &cfg, now).await.unwrap().is_empty());
        engine.promote(1, "test").await.unwrap();
        let done = prune_once(&engine, &cfg, now).await.unwrap();
        let audit = done
            .iter()
            .find(|(t, _)| *t == RetainedTable::AuditLog)
            .unwrap()
            .1;
        assert_eq!(audit, old as u64, "in two batches of at most {BATCH}");
        let left = store
            .audit(&crate::store::AuditFilter::latest(10_000))
            .await
            .unwrap();
        assert!(left.iter().any(|a| a.action == "recent"));
        assert!(
            left.iter().all(|a| a.at_ms >= now - 400 * DAY_MS),
            "{}",
            left.len()
        );
    }
}
