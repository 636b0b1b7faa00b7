//! The end-of-run report, and the failure text that makes a run replayable.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use super::checker::{Check, RecoveryStats, Verdict, Violation};
use super::schedule::{FaultKind, Schedule};

#[derive(Clone, Debug)]
pub struct Report {
    pub seed: u64,
    pub faults_by_kind: BTreeMap<FaultKind, usize>,
    pub recovery: Vec<RecoveryStats>,
    /// Each check with its number of violations.
    pub checks: Vec<(Check, usize)>,
    pub violations: Vec<Violation>,
    pub acknowledged_writes: usize,
    pub objects_compared: usize,
}

impl Report {
    pub fn new(schedule: &Schedule, verdict: &Verdict) -> Report {
        let mut faults_by_kind = BTreeMap::new();
        for f in &schedule.faults {
            *faults_by_kind.entry(f.kind).or_insert(0) += 1;
        }
        Report {
            seed: schedule.seed,
            faults_by_kind,
            recovery: verdict.stats.clone(),
            checks: verdict.checks.iter().map(|(c, v)| (*c, v.len())).collect(),
            violations: verdict.violations().cloned().collect(),
            acknowledged_writes: verdict.acknowledged_writes,
            objects_compared: verdict.objects_compared,
        }
    }

    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    /// What a failing run prints: the seed, the schedule and every violation with its excerpt.
    pub fn failure_text(&self, schedule: &Schedule) -> String {
        let mut out = format!(
            "fault campaign failed (seed {}; replay with --seed {})\n{schedule}",
            self.seed, self.seed
        );
        for v in &self.violations {
            out.push_str(&v.to_string());
        }
        out
    }
}

fn secs(d: Option<Duration>) -> String {
    d.map_or_else(|| "-".into(), |d| format!("{:.3}s", d.as_secs_f64()))
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total: usize = self.faults_by_kind.values().sum();
        writeln!(f, "fault campaign, seed {}: {total} faults", self.seed)?;
        for (kind, n) in &self.faults_by_kind {
            writeln!(f, "  {:<15} {n:>4}", kind.name())?;
        }
        writeln!(
            f,
            "recovery (heal or injection to a single ready active, the relays on it):\n  {:<15} {:>6} {:>9} {:>9} {:>9} {:>9}",
            "kind", "faults", "recovered", "p50", "p99", "max"
        )?;
        for s in &self.recovery {
            writeln!(
                f,
                "  {:<15} {:>6} {:>9} {:>9} {:>9} {:>9}",
                s.kind.name(),
                s.faults,
                s.recovered,
                secs(s.p50),
                secs(s.p99),
                secs(s.max)
            )?;
        }
        let passed = self.checks.iter().filter(|(_, n)| *n == 0).count();
        writeln!(f, "checks: {passed} of {} passed", self.checks.len())?;
        for (check, n) in &self.checks {
            let verdict = if *n == 0 {
                "ok".to_string()
            } else {
                format!("{n} violation(s)")
            };
            writeln!(f, "  {:<24} {verdict}", check.name())?;
        }
        writeln!(f, "violations: {}", self.violations.len())?;
        writeln!(f, "acknowledged writes: {}", self.acknowledged_writes)?;
        write!(f, "objects compared: {}", self.objects_compared)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::checker::{check_all, CheckerConfig};
    use crate::chaos::history::{Endpoint, Event, History, Role};
    use crate::chaos::schedule::ScheduleConfig;

    fn run(extra_endpoint: bool) -> (Schedule, Report) {
        let schedule =
            Schedule::generate(&ScheduleConfig::new(11, 5, Duration::from_secs(60))).unwrap();
        let mut h = History::default();
        let ep = |addrs: &[&str]| Event::Endpoints {
            ready: addrs
                .iter()
                .map(|a| Endpoint {
                    address: (*a).into(),
                    instance: Some(format!("server-{a}")),
                })
                .collect(),
        };
        h.push(Duration::ZERO, ep(&["1"]));
        h.push(
            Duration::from_secs(1),
            Event::FaultInjected {
                fault: 0,
                kind: FaultKind::KillStandby,
                detail: "server-2".into(),
            },
        );
        h.push(
            Duration::from_millis(1500),
            Event::RoleReport {
                instance: "server-1".into(),
                role: Role::Active,
                epoch: 1,
                incarnation: None,
            },
        );
        if extra_endpoint {
            h.push(Duration::from_secs(2), ep(&["1", "2"]));
        }
        let verdict = check_all(&h, &CheckerConfig::default());
        (schedule.clone(), Report::new(&schedule, &verdict))
    }

    #[test]
    fn report_renders_every_section() {
        let (schedule, report) = run(false);
        let text = report.to_string();
        assert!(
            text.starts_with("fault campaign, seed 11: 5 faults\n"),
            "{text}"
        );
        for f in &schedule.faults {
            assert!(text.contains(f.kind.name()), "{text}");
        }
        assert!(
            text.contains("  kill-standby         1         1    0.500s    0.500s    0.500s"),
            "{text}"
        );
        // No final state: convergence fails; no write was acknowledged, so writes pass.
        assert!(text.contains("checks: 6 of 7 passed"), "{text}");
        assert!(text.contains("  acknowledged writes      ok"), "{text}");
        assert!(
            text.contains("  convergence              1 violation(s)"),
            "{text}"
        );
        assert!(text.contains("  single ready endpoint    ok"), "{text}");
        assert!(
            text.ends_with("acknowledged writes: 0\nobjects compared: 0"),
            "{text}"
        );
    }

    #[test]
    fn failure_text_has_seed_schedule_and_excerpts() {
        let (schedule, report) = run(true);
        assert!(!report.passed());
        let text = report.failure_text(&schedule);
        assert!(text.starts_with("fault campaign failed (seed 11; replay with --seed 11)\n"));
        assert!(text.contains(&schedule.render()));
        assert!(
            text.contains("[single ready endpoint] at #3: 2 ready endpoints"),
            "{text}"
        );
        assert!(text.contains("> #3 +2.000s"), "{text}");
    }
}
