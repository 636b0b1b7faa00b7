//! The fault schedule: which faults a campaign injects, when, and for how long.
//!
//! Generated from a seed so a failing run can be replayed exactly (`--seed`). Determinism is per
//! build: `StdRng` may change its algorithm between `rand` versions, so a seed replays on the
//! same `Cargo.lock`.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Every fault the campaign knows. Node faults name a role, resolved to a node when injected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// kill -9 of the active server pod's process.
    KillActive,
    /// kill -9 of the standby server pod's process.
    KillStandby,
    /// kill -9 of the operator's process.
    KillOperator,
    /// The node stops heartbeating (NotReady after the grace period), then resumes.
    HeartbeatStop,
    /// The node's link is cut (pods unreachable, heartbeat continues), then restored.
    LinkCut,
    /// Link cut and heartbeat stopped together, then healed.
    Partition,
    /// A planned switchover request to the operator, at any moment (even mid-cutover).
    Switchover,
    /// kill -9 of the relay agent by its pid; started again (same config) at the heal.
    RelayKill,
    /// kill -9 of slapd by its pid; started again on the same ports and data at the heal.
    SlapdRestart,
    /// Another process holds the SQLite write lock (`BEGIN IMMEDIATE`), then releases it.
    DbStall,
    /// The data directory's filesystem fills up, then is freed.
    DiskFull,
}

/// What a timed fault occupies while it lasts; two faults on one resource never overlap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resource {
    /// Both nodes count as one: two node faults at once could leave no node to fail over to,
    /// and a heal of one could undo the other on the same node (the role resolves at run time).
    Nodes,
    Database,
    DataDir,
    Relay,
    Directory,
}

impl FaultKind {
    pub const ALL: [FaultKind; 11] = [
        FaultKind::KillActive,
        FaultKind::KillStandby,
        FaultKind::KillOperator,
        FaultKind::HeartbeatStop,
        FaultKind::LinkCut,
        FaultKind::Partition,
        FaultKind::Switchover,
        FaultKind::RelayKill,
        FaultKind::SlapdRestart,
        FaultKind::DbStall,
        FaultKind::DiskFull,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::KillActive => "kill-active",
            FaultKind::KillStandby => "kill-standby",
            FaultKind::KillOperator => "kill-operator",
            FaultKind::HeartbeatStop => "heartbeat-stop",
            FaultKind::LinkCut => "link-cut",
            FaultKind::Partition => "partition",
            FaultKind::Switchover => "switchover",
            FaultKind::RelayKill => "relay-kill",
            FaultKind::SlapdRestart => "slapd-restart",
            FaultKind::DbStall => "db-stall",
            FaultKind::DiskFull => "disk-full",
        }
    }

    /// Faults that last a while and end with a heal event; the others are instantaneous.
    pub fn is_timed(self) -> bool {
        self.resource().is_some()
    }

    /// Faults aimed at a node, whose target role is drawn with the schedule.
    pub fn targets_node(self) -> bool {
        matches!(self.resource(), Some(Resource::Nodes))
    }

    fn resource(self) -> Option<Resource> {
        match self {
            FaultKind::HeartbeatStop | FaultKind::LinkCut | FaultKind::Partition => {
                Some(Resource::Nodes)
            }
            FaultKind::DbStall => Some(Resource::Database),
            FaultKind::DiskFull => Some(Resource::DataDir),
            FaultKind::RelayKill => Some(Resource::Relay),
            FaultKind::SlapdRestart => Some(Resource::Directory),
            _ => None,
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FaultKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        FaultKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = FaultKind::ALL.iter().map(|k| k.name()).collect();
                Error::Other(format!(
                    "unknown fault kind {s:?}: expected one of {}",
                    names.join(", ")
                ))
            })
    }
}

/// The node a node fault aims at, by the role its server pod has when the fault is injected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeRole {
    Active,
    Standby,
}

/// The inputs of [`Schedule::generate`].
#[derive(Clone, Debug)]
pub struct ScheduleConfig {
    pub seed: u64,
    pub faults: usize,
    /// Every fault starts, and every timed fault heals, within this length.
    pub length: Duration,
    pub kinds: BTreeSet<FaultKind>,
    /// Between two fault starts.
    pub min_gap: Duration,
    /// Timed faults in force at once (each on its own resource, so at most 5 are possible).
    pub max_concurrent: usize,
    pub min_duration: Duration,
    pub max_duration: Duration,
}

impl ScheduleConfig {
    /// Every kind, 2 s minimum gap, up to 2 timed faults at once lasting 2–10 s.
    pub fn new(seed: u64, faults: usize, length: Duration) -> Self {
        ScheduleConfig {
            seed,
            faults,
            length,
            kinds: FaultKind::ALL.into_iter().collect(),
            min_gap: Duration::from_secs(2),
            max_concurrent: 2,
            min_duration: Duration::from_secs(2),
            max_duration: Duration::from_secs(10),
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::Other(format!("fault schedule: {what}")));
        if self.kinds.is_empty() {
            return bad("no fault kinds enabled".into());
        }
        if self.min_gap.is_zero() {
            return bad("min_gap must be positive so faults are ordered".into());
        }
        if self.kinds.iter().any(|k| k.is_timed()) {
            if self.max_concurrent == 0 {
                return bad("timed faults enabled but max_concurrent is 0".into());
            }
            if self.min_duration.is_zero() || self.min_duration > self.max_duration {
                return bad(format!(
                    "durations must satisfy 0 < min ({:?}) <= max ({:?})",
                    self.min_duration, self.max_duration
                ));
            }
            if self.min_duration >= self.length {
                return bad("min_duration must be shorter than the campaign".into());
            }
        }
        let span = self
            .min_gap
            .saturating_mul(self.faults.saturating_sub(1) as u32);
        if self.faults > 0 && span >= self.start_window() {
            return bad(format!(
                "{} faults {:?} apart do not fit in {:?}: lengthen the campaign or lower the gap",
                self.faults,
                self.min_gap,
                self.start_window()
            ));
        }
        Ok(())
    }

    /// Where starts are drawn: early enough that a timed fault can still heal in time.
    fn start_window(&self) -> Duration {
        if self.kinds.iter().any(|k| k.is_timed()) {
            self.length.saturating_sub(self.min_duration)
        } else {
            self.length
        }
    }
}

/// One fault of a schedule. `id` is its index in [`Schedule::faults`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    pub id: usize,
    pub kind: FaultKind,
    /// Set for node faults only.
    pub target: Option<NodeRole>,
    /// From the campaign's start.
    pub start: Duration,
    /// Set for timed faults only; the heal event is at `start + duration`.
    pub duration: Option<Duration>,
}

impl Fault {
    pub fn heal_at(&self) -> Option<Duration> {
        self.duration.map(|d| self.start + d)
    }

    fn label(&self) -> String {
        match self.target {
            Some(NodeRole::Active) => format!("#{} {} (active's node)", self.id, self.kind),
            Some(NodeRole::Standby) => format!("#{} {} (standby's node)", self.id, self.kind),
            None => format!("#{} {}", self.id, self.kind),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Inject,
    Heal,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduledEvent {
    pub at: Duration,
    pub fault: usize,
    pub action: Action,
}

/// Faults plus the inject/heal events the runner executes in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    pub seed: u64,
    pub length: Duration,
    pub faults: Vec<Fault>,
    /// Sorted by time; at equal times heals come first, so a freed resource can be reused.
    pub events: Vec<ScheduledEvent>,
}

impl Schedule {
    /// Draws a schedule. Starts are spread uniformly over the campaign, at least `min_gap`
    /// apart. At each start a kind is drawn among those admissible there (a timed fault needs
    /// its resource free, fewer than `max_concurrent` timed faults in force and room to heal
    /// before the end); when none is, the start moves to the next heal. Errors when the
    /// configuration cannot be met, saying what to change.
    pub fn generate(config: &ScheduleConfig) -> Result<Schedule> {
        config.validate()?;
        let mut rng = StdRng::seed_from_u64(config.seed);
        let kinds: Vec<FaultKind> = config.kinds.iter().copied().collect();
        let starts = draw_starts(&mut rng, config);

        let mut faults: Vec<Fault> = Vec::with_capacity(config.faults);
        let mut floor = Duration::ZERO;
        for (id, drawn) in starts.into_iter().enumerate() {
            let mut start = drawn.max(floor);
            if start >= config.length {
                return Err(Error::Other(format!(
                    "fault schedule (seed {}): fault {id} would start at {start:?}, after the \
                     campaign's end: fewer faults, a longer campaign or shorter durations",
                    config.seed
                )));
            }
            let admissible = loop {
                let ok: Vec<FaultKind> = kinds
                    .iter()
                    .copied()
                    .filter(|k| admissible(*k, start, &faults, config))
                    .collect();
                if !ok.is_empty() {
                    break ok;
                }
                // Only timed kinds are enabled and none fits: wait for the next heal.
                match next_heal_after(start, &faults) {
                    Some(t) if t < config.length => start = t,
                    _ => {
                        return Err(Error::Other(format!(
                            "fault schedule (seed {}): fault {id} at {start:?} cannot be placed: \
                             fewer faults, a longer campaign, shorter durations or more kinds",
                            config.seed
                        )))
                    }
                }
            };
            let kind = admissible[rng.gen_range(0..admissible.len())];
            let target = kind.targets_node().then(|| {
                if rng.gen_bool(0.5) {
                    NodeRole::Active
                } else {
                    NodeRole::Standby
                }
            });
            let duration = kind.is_timed().then(|| {
                let max = config.max_duration.min(config.length - start);
                rng.gen_range(config.min_duration..=max)
            });
            faults.push(Fault {
                id,
                kind,
                target,
                start,
                duration,
            });
            floor = start + config.min_gap;
        }

        let mut events: Vec<ScheduledEvent> = Vec::new();
        for f in &faults {
            events.push(ScheduledEvent {
                at: f.start,
                fault: f.id,
                action: Action::Inject,
            });
            if let Some(at) = f.heal_at() {
                events.push(ScheduledEvent {
                    at,
                    fault: f.id,
                    action: Action::Heal,
                });
            }
        }
        events.sort_by_key(|e| (e.at, e.action == Action::Inject, e.fault));
        Ok(Schedule {
            seed: config.seed,
            length: config.length,
            faults,
            events,
        })
    }

    /// One line per event, for failure messages and logs.
    pub fn render(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "schedule: seed {}, {} faults over {:.1}s (replay with --seed {})",
            self.seed,
            self.faults.len(),
            self.length.as_secs_f64(),
            self.seed
        )?;
        for e in &self.events {
            let Some(fault) = self.faults.get(e.fault) else {
                writeln!(
                    f,
                    "  {:>9.3}s  ? unknown fault #{}",
                    e.at.as_secs_f64(),
                    e.fault
                )?;
                continue;
            };
            match (e.action, fault.duration) {
                (Action::Inject, Some(d)) => writeln!(
                    f,
                    "  {:>9.3}s  inject {} for {:.3}s",
                    e.at.as_secs_f64(),
                    fault.label(),
                    d.as_secs_f64()
                )?,
                (Action::Inject, None) => writeln!(
                    f,
                    "  {:>9.3}s  inject {}",
                    e.at.as_secs_f64(),
                    fault.label()
                )?,
                (Action::Heal, _) => writeln!(
                    f,
                    "  {:>9.3}s  heal   {}",
                    e.at.as_secs_f64(),
                    fault.label()
                )?,
            }
        }
        Ok(())
    }
}

/// `n` sorted starts in `[0, start_window)`, consecutive ones at least `min_gap` apart: uniform draws
/// over the slack, sorted, then the i-th shifted by `i * min_gap`.
fn draw_starts(rng: &mut StdRng, config: &ScheduleConfig) -> Vec<Duration> {
    let n = config.faults;
    let span = config.min_gap.saturating_mul(n.saturating_sub(1) as u32);
    let slack_ms = config.start_window().saturating_sub(span).as_millis() as u64;
    let mut offsets: Vec<u64> = (0..n).map(|_| rng.gen_range(0..slack_ms.max(1))).collect();
    offsets.sort_unstable();
    offsets
        .into_iter()
        .enumerate()
        .map(|(i, ms)| Duration::from_millis(ms) + config.min_gap.saturating_mul(i as u32))
        .collect()
}

/// Timed faults still in force at `t` (a fault healing exactly at `t` no longer is).
fn in_force(t: Duration, faults: &[Fault]) -> impl Iterator<Item = &Fault> {
    faults
        .iter()
        .filter(move |f| f.start <= t && f.heal_at().is_some_and(|h| h > t))
}

fn admissible(kind: FaultKind, t: Duration, faults: &[Fault], config: &ScheduleConfig) -> bool {
    let Some(resource) = kind.resource() else {
        return true;
    };
    if t + config.min_duration > config.length {
        return false;
    }
    let mut count = 0;
    for f in in_force(t, faults) {
        count += 1;
        if f.kind.resource() == Some(resource) {
            return false;
        }
    }
    count < config.max_concurrent
}

fn next_heal_after(t: Duration, faults: &[Fault]) -> Option<Duration> {
    in_force(t, faults).filter_map(|f| f.heal_at()).min()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(seed: u64) -> ScheduleConfig {
        ScheduleConfig::new(seed, 100, Duration::from_secs(600))
    }

    #[test]
    fn same_seed_same_schedule() {
        let a = Schedule::generate(&config(7)).unwrap();
        let b = Schedule::generate(&config(7)).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.render(), b.render());
    }

    #[test]
    fn different_seeds_differ() {
        let a = Schedule::generate(&config(1)).unwrap();
        let b = Schedule::generate(&config(2)).unwrap();
        assert_ne!(a.faults, b.faults);
    }

    /// Checks every constraint the generator promises.
    fn assert_constraints(s: &Schedule, c: &ScheduleConfig) {
        assert_eq!(s.faults.len(), c.faults, "seed {}", c.seed);
        for (i, f) in s.faults.iter().enumerate() {
            assert_eq!(f.id, i);
            assert!(c.kinds.contains(&f.kind), "seed {}: {f:?}", c.seed);
            assert!(f.start < c.length, "seed {}: {f:?}", c.seed);
            assert_eq!(f.target.is_some(), f.kind.targets_node());
            assert_eq!(f.duration.is_some(), f.kind.is_timed());
            if let Some(d) = f.duration {
                assert!(
                    d >= c.min_duration && d <= c.max_duration,
                    "seed {}",
                    c.seed
                );
                assert!(f.start + d <= c.length, "seed {}: heals late {f:?}", c.seed);
            }
            if i > 0 {
                let gap = f.start - s.faults[i - 1].start;
                assert!(gap >= c.min_gap, "seed {}: gap {gap:?} before #{i}", c.seed);
            }
            // At its start, the faults in force respect the cap and use other resources.
            if f.kind.is_timed() {
                let others: Vec<&Fault> = in_force(f.start, &s.faults[..i]).collect();
                assert!(others.len() < c.max_concurrent, "seed {}: #{i}", c.seed);
                assert!(
                    others
                        .iter()
                        .all(|o| o.kind.resource() != f.kind.resource()),
                    "seed {}: #{i} shares a resource with {others:?}",
                    c.seed
                );
            }
        }
        // One inject per fault, one heal per timed fault, in time order with heals first.
        let injects = s.events.iter().filter(|e| e.action == Action::Inject);
        assert_eq!(injects.count(), c.faults);
        let timed = s.faults.iter().filter(|f| f.kind.is_timed()).count();
        let heals: Vec<_> = s
            .events
            .iter()
            .filter(|e| e.action == Action::Heal)
            .collect();
        assert_eq!(heals.len(), timed);
        for h in heals {
            assert_eq!(Some(h.at), s.faults[h.fault].heal_at());
        }
        for w in s.events.windows(2) {
            let key = |e: &ScheduledEvent| (e.at, e.action == Action::Inject);
            assert!(key(&w[0]) <= key(&w[1]), "seed {}: {w:?}", c.seed);
        }
        // Replaying the events never has more than max_concurrent timed faults in force.
        let mut open = 0usize;
        for e in &s.events {
            if s.faults[e.fault].kind.is_timed() {
                match e.action {
                    Action::Inject => open += 1,
                    Action::Heal => open -= 1,
                }
            }
            assert!(open <= c.max_concurrent, "seed {}", c.seed);
        }
        assert_eq!(open, 0);
    }

    #[test]
    fn constraints_hold_over_many_seeds() {
        for seed in 0..300 {
            let c = config(seed);
            let s = Schedule::generate(&c).unwrap();
            assert_constraints(&s, &c);
        }
    }

    #[test]
    fn only_timed_kinds_overlap_and_still_fit() {
        let mut overlaps = 0;
        for seed in 0..300 {
            let mut c = ScheduleConfig::new(seed, 20, Duration::from_secs(120));
            c.kinds = [
                FaultKind::Partition,
                FaultKind::DbStall,
                FaultKind::DiskFull,
                FaultKind::RelayKill,
                FaultKind::SlapdRestart,
            ]
            .into();
            c.max_concurrent = 5;
            let s = Schedule::generate(&c).unwrap();
            assert_constraints(&s, &c);
            overlaps += s
                .faults
                .iter()
                .filter(|f| in_force(f.start, &s.faults[..f.id]).count() > 0)
                .count();
        }
        assert!(overlaps > 0, "overlapping faults must be possible");
    }

    #[test]
    fn impossible_configurations_are_errors() {
        let mut c = ScheduleConfig::new(1, 100, Duration::from_secs(60));
        assert!(
            Schedule::generate(&c).is_err(),
            "100 faults 2 s apart in 60 s"
        );
        c.faults = 10;
        c.kinds.clear();
        assert!(Schedule::generate(&c).is_err());
        // One resource, long faults: there is no room for 10 of them in 60 s.
        c.kinds = [FaultKind::DiskFull].into();
        c.min_duration = Duration::from_secs(10);
        c.max_duration = Duration::from_secs(10);
        let err = Schedule::generate(&c).unwrap_err().to_string();
        assert!(err.contains("cannot be placed"), "{err}");
    }

    #[test]
    fn rendering_is_one_line_per_event() {
        let s = Schedule::generate(&ScheduleConfig::new(3, 12, Duration::from_secs(60))).unwrap();
        let text = s.render();
        assert_eq!(text.lines().count(), 1 + s.events.len());
        assert!(text.starts_with("schedule: seed 3, 12 faults over 60.0s"));
        let timed = s.faults.iter().find(|f| f.kind.is_timed()).unwrap();
        assert!(
            text.contains(&format!("heal   #{} {}", timed.id, timed.kind)),
            "{text}"
        );
    }

    #[test]
    fn relay_and_slapd_faults_are_timed_and_healed() {
        for kind in [FaultKind::RelayKill, FaultKind::SlapdRestart] {
            assert!(kind.is_timed(), "{kind}");
            assert!(!kind.targets_node(), "{kind}");
        }
        let mut c = ScheduleConfig::new(5, 6, Duration::from_secs(60));
        c.kinds = [FaultKind::RelayKill, FaultKind::SlapdRestart].into();
        let s = Schedule::generate(&c).unwrap();
        assert_constraints(&s, &c);
        assert_eq!(
            s.events.iter().filter(|e| e.action == Action::Heal).count(),
            6,
            "{s}"
        );
        // Each on its own resource: a relay kill may overlap a slapd restart, never another
        // relay kill.
        for f in &s.faults {
            assert!(in_force(f.start, &s.faults[..f.id]).all(|o| o.kind != f.kind));
        }
    }

    #[test]
    fn kinds_parse_by_name() {
        for k in FaultKind::ALL {
            assert_eq!(k.name().parse::<FaultKind>().unwrap(), k);
        }
        assert!("kill-everything".parse::<FaultKind>().is_err());
    }
}
