//! Schedules: when a connector runs next (pure), and the loop that starts due runs on the
//! active instance. Times are UTC.

use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use tokio::sync::watch;

use super::runner::{RunError, RunMode, SyncEngine};
use crate::store::{now_ms, Role, ScheduleRow};

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
/// yet and need one computed.
pub fn due(schedules: &[ScheduleRow], now_ms: i64) -> (Vec<&ScheduleRow>, Vec<&ScheduleRow>) {
    let due = schedules
        .iter()
        .filter(|s| s.enabled && s.next_run_ms.is_some_and(|n| n <= now_ms))
        .collect();
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

async fn tick(sync: &Arc<SyncEngine>) -> Result<(), crate::store::StoreError> {
    let store = sync.store().clone();
    let schedules = store.schedules().await?;
    let now = now_ms();
    let (due, unset) = due(&schedules, now);
    for s in unset {
        if let Ok(spec) = parse(&s.kind, &s.spec) {
            if let Some(n) = next_after(&spec, now) {
                store.set_schedule_next_run(&s.id, n).await?;
            }
        }
    }
    if due.is_empty() || sync.paused().await? {
        return Ok(());
    }
    for s in due {
        let mode = RunMode::parse(&s.mode).unwrap_or(RunMode::Delta);
        match sync.start(&s.connector_id, mode, "schedule").await {
            Ok((run, _task)) => {
                tracing::info!(schedule = %s.id, run = %run.id, "scheduled run started")
            }
            Err(RunError::AlreadyRunning(m)) => {
                tracing::info!(schedule = %s.id, "skipped: {m}")
            }
            Err(e) => tracing::warn!(schedule = %s.id, error = %e, "scheduled run not started"),
        }
        if let Ok(spec) = parse(&s.kind, &s.spec) {
            if let Some(n) = next_after(&spec, now) {
                store.set_schedule_next_run(&s.id, n).await?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
