//! Schedules: when a connector runs next (pure), and the loop that starts due runs on the
//! active instance. Times are UTC.

use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use tokio::sync::watch;

use super::runner::{RunError, RunMode, SyncEngine};
use crate::store::{now_ms, Role, ScheduleAdvance, ScheduleRow};

/// Shortest interval a schedule may have: a run every few seconds is a loop, not a schedule.
pub const MIN_INTERVAL_MS: i64 = 10_000;
const TICK: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spec {
    Interval { ms: i64 },
    Cron(Box<croner::Cron>),
}

/// Parses `interval` specs (`90s`, `15m`, `2h`, `1d`) and five-field `cron` specs.
pub fn parse(kind: &str, spec: &str) -> Result<Spec, String> {
    match kind {
        "interval" => {
            let s = spec.trim();
            let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(|| {
                format!("interval {spec:?} has no unit; use s, m, h or d, e.g. 15m")
            })?;
            let (n, unit) = s.split_at(split);
            let n: i64 = n.parse().map_err(|_| {
                format!("interval {spec:?} must start with a whole number, e.g. 15m")
            })?;
            let unit_ms = match unit {
                "s" => 1_000,
                "m" => 60_000,
                "h" => 3_600_000,
                "d" => 86_400_000,
                other => {
                    return Err(format!(
                        "interval unit {other:?} is unknown; use s, m, h or d"
                    ))
                }
            };
            let ms = n.saturating_mul(unit_ms);
            if ms < MIN_INTERVAL_MS {
                return Err(format!(
                    "interval {spec:?} is shorter than the minimum of {} s",
                    MIN_INTERVAL_MS / 1000
                ));
            }
            Ok(Spec::Interval { ms })
        }
        "cron" => {
            if spec.split_whitespace().count() != 5 {
                return Err(format!(
                    "cron spec {spec:?} must have five fields (minute hour day-of-month month day-of-week), e.g. \"*/15 * * * *\""
                ));
            }
            spec.parse::<croner::Cron>()
                .map(|c| Spec::Cron(Box::new(c)))
                .map_err(|e| format!("cron spec {spec:?}: {e}"))
        }
        other => Err(format!(
            "schedule kind {other:?} is unknown; use \"interval\" or \"cron\""
        )),
    }
}

/// The first run time strictly after `after_ms`.
pub fn next_after(spec: &Spec, after_ms: i64) -> Option<i64> {
    match spec {
        Spec::Interval { ms } => Some(after_ms.saturating_add(*ms)),
        Spec::Cron(c) => {
            let t = Utc.timestamp_millis_opt(after_ms).single()?;
            c.find_next_occurrence(&t, false)
                .ok()
                .map(|n| n.timestamp_millis())
        }
    }
}

/// Which schedules are due at `now_ms` (enabled, next run reached), and which have no next run
/// yet and need one computed. Full runs come first: one reads everything a delta would, so when
/// a connector's full and delta schedules are due in the same tick the full starts and the
/// delta, refused because the connector is running, moves on. In the other order the full was
/// the one refused, for a whole interval, and schedules aligned on the same times (a delta every
/// 15 minutes, a full on the hour) never ran their full at all.
pub fn due(schedules: &[ScheduleRow], now_ms: i64) -> (Vec<&ScheduleRow>, Vec<&ScheduleRow>) {
    let mut due: Vec<&ScheduleRow> = schedules
        .iter()
        .filter(|s| s.enabled && s.next_run_ms.is_some_and(|n| n <= now_ms))
        .collect();
    // Stable: otherwise in the store's order (creation).
    due.sort_by_key(|s| RunMode::parse(&s.mode) != Some(RunMode::Full));
    let unset = schedules
        .iter()
        .filter(|s| s.enabled && s.next_run_ms.is_none())
        .collect();
    (due, unset)
}

/// Starts due runs while this instance is active and the engine is not paused. A run that
/// cannot start now (already running, paused) is skipped and the schedule moves to its next time.
pub async fn run_loop(
    sync: Arc<SyncEngine>,
    role: watch::Receiver<crate::engine::RoleStatus>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = stop.changed() => return,
        }
        if role.borrow().role != Role::Active {
            continue;
        }
        if let Err(e) = tick(&sync).await {
            tracing::warn!(error = %e, "schedule check failed");
        }
    }
}

async fn tick(sync: &Arc<SyncEngine>) -> Result<(), RunError> {
    let schedules = sync.store().schedules().await?;
    let now = now_ms();
    let (due, unset) = due(&schedules, now);
    for s in unset {
        if let Some(a) = advance(s, now) {
            sync.advance_schedule(&a).await?;
        }
    }
    if due.is_empty() || sync.paused().await? {
        return Ok(());
    }
    for s in due {
        let mode = RunMode::parse(&s.mode).unwrap_or(RunMode::Delta);
        let advance = advance(s, now);
        match sync
            .start_with(&s.connector_id, mode, "schedule", advance.clone())
            .await
        {
            Ok((run, _task)) => {
                tracing::info!(schedule = %s.id, run = %run.id, "scheduled run started")
            }
            Err(e) if skipped_on_purpose(&e) => {
                tracing::info!(schedule = %s.id, "skipped: {e}");
                if let Some(a) = &advance {
                    sync.advance_schedule(a).await?;
                }
            }
            // Not active any more, fenced, or the database failed: the run stays due, for this
            // instance's next tick or for the new active.
            Err(e) => {
                tracing::warn!(schedule = %s.id, error = %e, "scheduled run not started; still due")
            }
        }
    }
    Ok(())
}

/// The schedule's next due time after `now`.
fn advance(s: &ScheduleRow, now: i64) -> Option<ScheduleAdvance> {
    let spec = parse(&s.kind, &s.spec).ok()?;
    next_after(&spec, now).map(|next_run_ms| ScheduleAdvance {
        schedule_id: s.id.clone(),
        next_run_ms,
    })
}

/// Whether a scheduled start that failed this way moves the schedule on: yes when this run
/// cannot happen now anywhere (one is already running, the connector is invalid or gone); no
/// when another instance, or this one a moment later, could start it.
fn skipped_on_purpose(e: &RunError) -> bool {
    match e {
        RunError::AlreadyRunning(_) | RunError::Invalid { .. } | RunError::NotFound(_) => true,
        RunError::NotActive | RunError::Paused | RunError::Store(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreError;

    #[test]
    fn only_a_start_that_cannot_happen_anywhere_moves_the_schedule_on() {
        let cases = [
            (RunError::AlreadyRunning("x".into()), true),
            (
                RunError::Invalid {
                    id: "c".into(),
                    reason: "r".into(),
                },
                true,
            ),
            (RunError::NotFound("c".into()), true),
            (RunError::NotActive, false),
            (RunError::Paused, false),
            (
                RunError::Store(StoreError::Fenced {
                    stored: 2,
                    holder: "b".into(),
                    own: 1,
                }),
                false,
            ),
            (
                RunError::Store(StoreError::Unavailable("down".into())),
                false,
            ),
        ];
        for (e, moves) in cases {
            assert_eq!(skipped_on_purpose(&e), moves, "{e}");
        }
    }

    fn ms(s: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(s)
            .unwrap()
            .timestamp_millis()
    }

    #[test]
    fn intervals() {
        assert_eq!(
            parse("interval", "15m").unwrap(),
            Spec::Interval { ms: 900_000 }
        );
        assert_eq!(
            parse("interval", "2h").unwrap(),
            Spec::Interval { ms: 7_200_000 }
        );
        assert_eq!(
            next_after(&parse("interval", "90s").unwrap(), 1_000),
            Some(91_000)
        );
        for (bad, want) in [
            ("15", "no unit"),
            ("m", "whole number"),
            ("5x", "unknown"),
            ("5s", "minimum"),
            ("99999999999999999999m", "whole number"),
        ] {
            let e = parse("interval", bad).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn cron_specs() {
        let every_15 = parse("cron", "*/15 * * * *").unwrap();
        assert_eq!(
            next_after(&every_15, ms("2026-11-26T10:07:30Z")),
            Some(ms("2026-11-26T10:15:00Z"))
        );
        // Strictly after: a run at 10:15 schedules the next one at 10:30.
        assert_eq!(
            next_after(&every_15, ms("2026-11-26T10:15:00Z")),
            Some(ms("2026-11-26T10:30:00Z"))
        );
        let nightly = parse("cron", "30 2 * * 1-5").unwrap();
        // 2026-11-28 is a Saturday: the next weekday run is Monday the 30th.
        assert_eq!(
            next_after(&nightly, ms("2026-11-27T03:00:00Z")),
            Some(ms("2026-11-30T02:30:00Z"))
        );
        assert!(parse("cron", "* * * *")
            .unwrap_err()
            .contains("five fields"));
        assert!(parse("cron", "61 * * * *").is_err());
        assert!(parse("weekly", "x").unwrap_err().contains("unknown"));
    }

    #[test]
    fn due_schedules() {
        let row = |id: &str, enabled: bool, next: Option<i64>| ScheduleRow {
            id: id.into(),
            connector_id: "c".into(),
            kind: "interval".into(),
            spec: "1m".into(),
            mode: "delta".into(),
            enabled,
            next_run_ms: next,
            created_at_ms: 0,
        };
        let rows = vec![
            row("a", true, Some(100)),
            row("b", true, Some(200)),
            row("c", false, Some(50)),
            row("d", true, None),
        ];
        let (due, unset) = due(&rows, 150);
        assert_eq!(due.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), ["a"]);
        assert_eq!(
            unset.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
            ["d"]
        );
    }

    /// Regression (fault campaign, seed 1502): a delta every 10 s created before a full every
    /// 30 s; every third tick both were due, the delta started first and the full was refused
    /// and moved on, so no scheduled full ever ran.
    #[test]
    fn due_full_runs_come_before_due_deltas() {
        let row = |id: &str, mode: &str| ScheduleRow {
            id: id.into(),
            connector_id: "c".into(),
            kind: "interval".into(),
            spec: "10s".into(),
            mode: mode.into(),
            enabled: true,
            next_run_ms: Some(100),
            created_at_ms: 0,
        };
        let rows = vec![
            row("d1", "delta"),
            row("f1", "full"),
            row("d2", "delta"),
            row("f2", "full"),
        ];
        let (due, _) = due(&rows, 150);
        assert_eq!(
            due.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
            ["f1", "f2", "d1", "d2"]
        );
    }

    mod cutover {
        use super::super::*;
        use crate::config::EngineConfig;
        use crate::engine::Engine;
        use crate::store::{sqlite::SqliteStore, ConnectorRow, Store};

        /// The CSV connector `c1` reading `drop`, as both schedule tests run it.
        fn csv_connector(drop: &std::path::Path) -> ConnectorRow {
            ConnectorRow {
                id: "c1".into(),
                name: "csv".into(),
                kind: "csv".into(),
                config_json:
                    serde_json::json!({"folder": drop, "object_type": "row", "anchor_column": "id"})
                        .to_string(),
                rules_json: r#"{"precedence":1}"#.into(),
                relay_id: None,
                is_canary: false,
                created_at_ms: 1,
                updated_at_ms: 1,
            }
        }

        async fn instance(
            path: &std::path::Path,
            name: &str,
            drop: &std::path::Path,
        ) -> Arc<SyncEngine> {
            let store: Arc<dyn Store> = Arc::new(SqliteStore::open(path).await.unwrap());
            store.migrate().await.unwrap();
            let engine = Engine::new(
                store.clone(),
                name.into(),
                "host".into(),
                "1".into(),
                EngineConfig {
                    heartbeat_interval_ms: 50,
                    instance_ttl_ms: 500,
                    drain_timeout_ms: 200,
                },
            );
            let secrets =
                crate::secrets::Secrets::new(store, identitymesh_keyring::KeyRing::generate());
            let roots = identitymesh_connectors::roots::DropRoots::new(&[drop.to_path_buf()]);
            SyncEngine::new(engine, secrets, None, roots)
        }

        /// A schedule due while the active is being replaced: the stale active's tick (it does
        /// not know yet that it was fenced) neither runs it nor moves it on; the new active's
        /// tick runs it, once.
        #[tokio::test]
        async fn a_run_due_during_a_cutover_happens_once_on_the_new_active() {
            let dir = tempfile::tempdir().unwrap();
            let drop = dir.path().join("drop");
            std::fs::create_dir_all(&drop).unwrap();
            std::fs::write(drop.join("a.csv"), "id,name\n1,One\n").unwrap();
            let db = dir.path().join("im.db");
            let (a, b) = (
                instance(&db, "a", &drop).await,
                instance(&db, "b", &drop).await,
            );
            let store = a.store().clone();
            store.put_connector(&csv_connector(&drop)).await.unwrap();
            let due_at = now_ms() - 1;
            store
                .put_schedule(&ScheduleRow {
                    id: "s1".into(),
                    connector_id: "c1".into(),
                    kind: "interval".into(),
                    spec: "1h".into(),
                    mode: "full".into(),
                    enabled: true,
                    next_run_ms: Some(due_at),
                    created_at_ms: 1,
                })
                .await
                .unwrap();
            a.engine().promote(1, "test").await.unwrap();
            b.engine().promote(2, "test").await.unwrap();
            assert_eq!(
                a.engine().status().role,
                Role::Active,
                "a does not know yet"
            );

            tick(&a).await.unwrap();
            let next = |s: Vec<ScheduleRow>| s[0].next_run_ms;
            assert_eq!(next(store.schedules().await.unwrap()), Some(due_at));
            assert!(store.runs(Some("c1"), 10).await.unwrap().is_empty());
            assert_eq!(a.engine().status().role, Role::Standby, "the fence told it");

            tick(&b).await.unwrap();
            let runs = store.runs(Some("c1"), 10).await.unwrap();
            assert_eq!(runs.len(), 1, "{runs:?}");
            assert_eq!((runs[0].instance.as_str(), runs[0].epoch), ("b", 2));
            let moved = next(store.schedules().await.unwrap()).unwrap();
            assert!(moved > now_ms() + 3_000_000, "moved an hour on: {moved}");
            // Due no more: another tick starts nothing.
            tick(&b).await.unwrap();
            assert_eq!(store.runs(Some("c1"), 10).await.unwrap().len(), 1);
        }

        /// A connector's delta schedule (created first) and full schedule due in one tick: the
        /// full runs, the delta is skipped, and both move on (fault campaign, seed 1502: the
        /// full was the one skipped, every time).
        #[tokio::test]
        async fn a_full_and_a_delta_due_together_run_the_full() {
            let dir = tempfile::tempdir().unwrap();
            let drop = dir.path().join("drop");
            std::fs::create_dir_all(&drop).unwrap();
            std::fs::write(drop.join("a.csv"), "id,name\n1,One\n").unwrap();
            let a = instance(&dir.path().join("im.db"), "a", &drop).await;
            let store = a.store().clone();
            store.put_connector(&csv_connector(&drop)).await.unwrap();
            let due_at = now_ms() - 1;
            for (id, mode, spec, created) in
                [("s-delta", "delta", "10s", 1), ("s-full", "full", "30s", 2)]
            {
                store
                    .put_schedule(&ScheduleRow {
                        id: id.into(),
                        connector_id: "c1".into(),
                        kind: "interval".into(),
                        spec: spec.into(),
                        mode: mode.into(),
                        enabled: true,
                        next_run_ms: Some(due_at),
                        created_at_ms: created,
                    })
                    .await
                    .unwrap();
            }
            a.engine().promote(1, "test").await.unwrap();
            tick(&a).await.unwrap();
            let runs = store.runs(Some("c1"), 10).await.unwrap();
            assert_eq!(runs.len(), 1, "{runs:?}");
            assert_eq!(
                (runs[0].mode.as_str(), runs[0].trigger.as_str()),
                ("full", "schedule")
            );
            for s in store.schedules().await.unwrap() {
                assert!(s.next_run_ms.unwrap() > now_ms() + 5_000, "{s:?} moved on");
            }
        }
    }
}
