//! The checks over a recorded [`History`]. Each is a pure function of the history: verdicts
//! follow from what was recorded and in what order (database sequence, event index), never from
//! how long something took, except the recovery bound, which is the one timed property and is
//! stated as such.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::time::Duration;

use serde::Serialize;

use super::history::{DirectoryOp, Entry, Event, FenceRow, History, Role, DELETED, FENCE_PROMOTE};
use super::schedule::FaultKind;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    /// No commit under an epoch after a greater epoch was stored.
    Fencing,
    /// Every acknowledged write present afterwards (or superseded), none twice; an
    /// acknowledged delete stays deleted.
    Writes,
    /// After the final import the connector space equals the directory (nothing lost, nothing
    /// resurrected); one identity per person, none left over.
    Convergence,
    /// Never two ready endpoints behind the client Service.
    SingleEndpoint,
    /// Never two instances reporting active at the same epoch.
    SingleActive,
    /// Every timed fault injected was healed.
    FaultsHealed,
    /// Every fault followed by a ready active (with the relays on it) within the bound for its
    /// kind.
    Recovery,
}

impl Check {
    pub const ALL: [Check; 7] = [
        Check::Fencing,
        Check::Writes,
        Check::Convergence,
        Check::SingleEndpoint,
        Check::SingleActive,
        Check::FaultsHealed,
        Check::Recovery,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Check::Fencing => "fencing",
            Check::Writes => "acknowledged writes",
            Check::Convergence => "convergence",
            Check::SingleEndpoint => "single ready endpoint",
            Check::SingleActive => "single active per epoch",
            Check::FaultsHealed => "faults healed",
            Check::Recovery => "recovery bound",
        }
    }
}

/// A failed property, at the history entry that shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Violation {
    pub check: Check,
    pub index: usize,
    pub message: String,
    /// The entries around `index`, the offending one marked `>`.
    pub excerpt: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "[{}] at #{}: {}",
            self.check.name(),
            self.index,
            self.message
        )?;
        f.write_str(&self.excerpt)
    }
}

#[derive(Clone, Debug)]
pub struct CheckerConfig {
    /// From a fault's clear time (see [`Recovery::clear`]) to a ready active.
    pub recovery_bound: Duration,
    /// Per-kind bounds overriding `recovery_bound`.
    pub bounds: BTreeMap<FaultKind, Duration>,
    /// Entries shown either side of a violation.
    pub excerpt_radius: usize,
}

impl Default for CheckerConfig {
    fn default() -> Self {
        CheckerConfig {
            recovery_bound: Duration::from_secs(30),
            bounds: BTreeMap::new(),
            excerpt_radius: 5,
        }
    }
}

impl CheckerConfig {
    pub fn bound(&self, kind: FaultKind) -> Duration {
        self.bounds
            .get(&kind)
            .copied()
            .unwrap_or(self.recovery_bound)
    }
}

struct Ctx<'a> {
    history: &'a History,
    check: Check,
    radius: usize,
    out: Vec<Violation>,
}

impl Ctx<'_> {
    fn new(history: &History, check: Check, radius: usize) -> Ctx<'_> {
        Ctx {
            history,
            check,
            radius,
            out: Vec::new(),
        }
    }
    fn violation(&mut self, index: usize, message: String) {
        self.out.push(Violation {
            check: self.check,
            index,
            message,
            excerpt: self.history.excerpt(index, self.radius),
        });
    }
    /// Where a check with no specific entry points: the end of the history.
    fn last_index(&self) -> usize {
        self.history.entries.len().saturating_sub(1)
    }
}

/// Fence journal rows ordered by their database sequence (a row read twice counts once), each
/// with the index of the entry that first recorded it.
fn fence_rows(h: &History) -> Vec<(usize, &FenceRow)> {
    let mut by_seq: BTreeMap<i64, (usize, &FenceRow)> = BTreeMap::new();
    for e in &h.entries {
        if let Event::Fence(row) = &e.event {
            by_seq.entry(row.seq).or_insert((e.index, row));
        }
    }
    by_seq.into_values().collect()
}

/// In the journal's own order: a commit under an epoch lower than one already stored, a commit
/// at the stored epoch by an instance other than the one it was stored for, or a stored epoch
/// going backwards.
pub fn check_fencing(h: &History, radius: usize) -> Vec<Violation> {
    let mut cx = Ctx::new(h, Check::Fencing, radius);
    let mut stored: Option<(i64, &str)> = None;
    for (index, row) in fence_rows(h) {
        if row.kind == FENCE_PROMOTE {
            if let Some((epoch, _)) = stored.filter(|(e, _)| row.epoch < *e) {
                cx.violation(
                    index,
                    format!(
                        "journal seq {}: epoch {} stored for {} after epoch {epoch}",
                        row.seq, row.epoch, row.instance
                    ),
                );
                continue;
            }
            stored = Some((row.epoch, &row.instance));
            continue;
        }
        match stored {
            Some((epoch, _)) if row.epoch < epoch => cx.violation(
                index,
                format!(
                    "journal seq {}: {} commit by {} under epoch {} after epoch {epoch} was stored",
                    row.seq, row.kind, row.instance, row.epoch
                ),
            ),
            Some((epoch, holder)) if row.epoch == epoch && row.instance != holder => cx.violation(
                index,
                format!(
                    "journal seq {}: {} commit by {} under epoch {epoch}, which is {holder}'s",
                    row.seq, row.kind, row.instance
                ),
            ),
            _ => {}
        }
    }
    cx.out
}

/// What happened to one write.
struct Write<'a> {
    op: u64,
    value: &'a str,
    acked: Option<usize>,
}

/// The writes per key in the order they were sent (the client keeps one in flight per key).
fn writes_by_key(h: &History) -> BTreeMap<&str, Vec<Write<'_>>> {
    let mut by_key: BTreeMap<&str, Vec<Write<'_>>> = BTreeMap::new();
    let mut where_op: HashMap<u64, (&str, usize)> = HashMap::new();
    for e in &h.entries {
        match &e.event {
            Event::WriteSent { op, key, value } => {
                let list = by_key.entry(key).or_default();
                where_op.insert(*op, (key, list.len()));
                list.push(Write {
                    op: *op,
                    value,
                    acked: None,
                });
            }
            Event::WriteAcked { op, .. } => {
                if let Some((key, i)) = where_op.get(op) {
                    if let Some(w) = by_key.get_mut(key).and_then(|l| l.get_mut(*i)) {
                        w.acked.get_or_insert(e.index);
                    }
                }
            }
            _ => {}
        }
    }
    by_key
}

/// Against the last read-back: for each key, the value read must come from the last
/// acknowledged write, a later one, or an earlier one that was never acknowledged (a write that
/// failed may have been applied, even after later writes: its outcome is unknown, so it is
/// concurrent with them), and appear once. A write of [`DELETED`] removes its key: after an
/// acknowledged one the key must be absent (or hold a later write's value), and the key may be
/// absent only when such a delete is the last acknowledged write or follows it. A value no
/// write sent is a phantom.
pub fn check_writes(h: &History, radius: usize) -> Vec<Violation> {
    let mut cx = Ctx::new(h, Check::Writes, radius);
    let writes = writes_by_key(h);
    let read_back = h.entries.iter().rev().find_map(|e| match &e.event {
        Event::ReadBack { records } => Some((e.index, records)),
        _ => None,
    });
    let Some((rb_index, records)) = read_back else {
        if writes.values().flatten().any(|w| w.acked.is_some()) {
            let at = cx.last_index();
            cx.violation(
                at,
                "acknowledged writes but no read-back was recorded".into(),
            );
        }
        return cx.out;
    };
    let mut read: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for r in records {
        read.entry(&r.key).or_default().push(&r.value);
    }
    for (key, values) in &read {
        if values.len() > 1 {
            cx.violation(
                rb_index,
                format!("key {key} read back {} times: {values:?}", values.len()),
            );
        }
        let known = writes.get(key);
        for v in values {
            let sent = *v != DELETED && known.is_some_and(|ws| ws.iter().any(|w| w.value == *v));
            if !sent {
                cx.violation(
                    rb_index,
                    format!("key {key} has {v:?}, which no write sent"),
                );
            }
        }
    }
    for (key, ws) in &writes {
        let Some(last_acked) = ws.iter().rposition(|w| w.acked.is_some()) else {
            continue;
        };
        let lost = &ws[last_acked];
        let ack_index = lost.acked.unwrap_or(rb_index);
        let may_be_absent = ws[last_acked..].iter().any(|w| w.value == DELETED);
        let Some(values) = read.get(key) else {
            if !may_be_absent {
                cx.violation(
                    ack_index,
                    format!(
                        "acknowledged write op {} ({key} = {:?}) lost: key absent",
                        lost.op, lost.value
                    ),
                );
            }
            continue;
        };
        for v in values {
            let Some(pos) = ws.iter().position(|w| w.value == *v) else {
                continue;
            };
            // An earlier write that never got its answer is concurrent with every later one
            // (a timed-out request may still commit), so its value is no loss.
            if pos >= last_acked || ws[pos].acked.is_none() {
                continue;
            }
            let message = if lost.value == DELETED {
                format!(
                    "acknowledged delete op {} of {key} undone: read back {v:?} of earlier op {}",
                    lost.op, ws[pos].op
                )
            } else {
                format!(
                    "acknowledged write op {} ({key} = {:?}) lost: read back {v:?} of earlier op {}",
                    lost.op, lost.value, ws[pos].op
                )
            };
            cx.violation(ack_index, message);
        }
    }
    cx.out
}

/// The values compared of one object: its attributes, `dn` included.
type Attrs = BTreeMap<String, Vec<String>>;

/// How an object is named in a message: its anchor and, when it has one, its DN.
fn label(id: &str, attrs: Option<&Attrs>) -> String {
    match attrs.and_then(|a| a.get("dn")).and_then(|d| d.first()) {
        Some(dn) => format!("{id} ({dn})"),
        None => id.to_string(),
    }
}

/// The directory changes recorded per anchor: (entry index, op) in order.
fn changes_by_anchor(h: &History) -> HashMap<&str, Vec<(usize, DirectoryOp)>> {
    let mut out: HashMap<&str, Vec<(usize, DirectoryOp)>> = HashMap::new();
    for e in &h.entries {
        if let Event::DirectoryChange {
            op,
            anchor: Some(anchor),
            error: None,
            ..
        } = &e.event
        {
            out.entry(anchor.as_str()).or_default().push((e.index, *op));
        }
    }
    out
}

/// The last final state: the final import succeeded; every directory entry in the connector
/// space with equal attributes, nothing else there, nothing twice; the same already after the
/// final delta import, deletions aside (when taken); every person with exactly one identity and
/// no identity left over. A violation about one entry points at the last
/// recorded change of it (the history around it shows what the directory writer and the faults
/// were doing), and says whether an entry found only in the connector space was deleted.
pub fn check_convergence(h: &History, radius: usize) -> Vec<Violation> {
    let mut cx = Ctx::new(h, Check::Convergence, radius);
    let Some((index, state)) = h.entries.iter().rev().find_map(|e| match &e.event {
        Event::FinalState(s) => Some((e.index, s)),
        _ => None,
    }) else {
        let at = cx.last_index();
        cx.violation(at, "no final state was recorded".into());
        return cx.out;
    };
    let changes = changes_by_anchor(h);
    let last_change = |id: &str| -> (usize, String) {
        match changes.get(id).and_then(|c| c.last()) {
            Some((i, op)) => (*i, format!("; its last recorded change: #{i} {op:?}")),
            None => (index, String::new()),
        }
    };
    if let Some(run) = &state.final_import {
        if run.status != "succeeded" {
            cx.violation(
                index,
                format!(
                    "the final {} import (run {}) ended {}: {}",
                    run.mode, run.run, run.status, run.detail
                ),
            );
        }
    }
    let mut space: BTreeMap<&str, &Attrs> = BTreeMap::new();
    for o in &state.connector_space {
        if space.insert(o.id.as_str(), &o.attributes).is_some() {
            let (at, note) = last_change(&o.id);
            cx.violation(
                at,
                format!(
                    "{} is in the connector space twice{note}",
                    label(&o.id, Some(&o.attributes))
                ),
            );
        }
    }
    let mut seen = BTreeSet::new();
    for d in &state.directory {
        seen.insert(d.id.as_str());
        let (at, note) = last_change(&d.id);
        match space.get(d.id.as_str()) {
            None => cx.violation(
                at,
                format!(
                    "{} is missing from the connector space (lost){note}",
                    label(&d.id, Some(&d.attributes))
                ),
            ),
            Some(attrs) if **attrs != d.attributes => {
                let differing: Vec<String> = d
                    .attributes
                    .keys()
                    .chain(attrs.keys())
                    .filter(|a| d.attributes.get(*a) != attrs.get(*a))
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .map(|a| {
                        format!(
                            "{a}: directory {:?}, connector space {:?}",
                            d.attributes.get(a).cloned().unwrap_or_default(),
                            attrs.get(a).cloned().unwrap_or_default()
                        )
                    })
                    .collect();
                cx.violation(
                    at,
                    format!(
                        "{} differs from the directory in {}{note}",
                        label(&d.id, Some(&d.attributes)),
                        differing.join("; ")
                    ),
                );
            }
            Some(_) => {}
        }
    }
    for (id, attrs) in space.iter().filter(|(id, _)| !seen.contains(*id)) {
        let deleted = changes
            .get(id)
            .and_then(|c| c.iter().rev().find(|(_, op)| *op == DirectoryOp::Delete));
        let (at, note) = match deleted {
            Some((i, _)) => (
                *i,
                format!(" (resurrected: deleted from the directory at #{i})"),
            ),
            None => last_change(id),
        };
        cx.violation(
            at,
            format!(
                "{} is in the connector space, not the directory{note}",
                label(id, Some(attrs))
            ),
        );
    }
    if let Some(delta) = &state.after_delta {
        if delta.import.status != "succeeded" {
            cx.violation(
                index,
                format!(
                    "the final delta import (run {}) ended {}: {}",
                    delta.import.run, delta.import.status, delta.import.detail
                ),
            );
        }
        let after: BTreeMap<&str, &Attrs> = delta
            .connector_space
            .iter()
            .map(|o| (o.id.as_str(), &o.attributes))
            .collect();
        for d in &state.directory {
            let (at, note) = last_change(&d.id);
            let what = match after.get(d.id.as_str()) {
                None => "missing",
                Some(attrs) if **attrs != d.attributes => "stale",
                Some(_) => continue,
            };
            cx.violation(
                at,
                format!(
                    "after the final delta import, {} is {what} in the connector space (a delta \
                     lost a change){note}",
                    label(&d.id, Some(&d.attributes))
                ),
            );
        }
    }
    for (person, n) in &state.identities_per_person {
        if *n != 1 {
            let (at, note) = last_change(person);
            cx.violation(at, format!("person {person} has {n} identities{note}"));
        }
    }
    for id in &state.orphan_identities {
        cx.violation(
            index,
            format!("identity {id} is linked to no directory entry (left behind)"),
        );
    }
    cx.out
}

/// Distinct ready addresses in an observation.
fn ready_count(ready: &[super::history::Endpoint]) -> usize {
    ready
        .iter()
        .map(|e| e.address.as_str())
        .collect::<BTreeSet<_>>()
        .len()
}

pub fn check_single_endpoint(h: &History, radius: usize) -> Vec<Violation> {
    let mut cx = Ctx::new(h, Check::SingleEndpoint, radius);
    for e in &h.entries {
        if let Event::Endpoints { ready } = &e.event {
            if ready_count(ready) > 1 {
                let addrs: Vec<&str> = ready.iter().map(|r| r.address.as_str()).collect();
                cx.violation(
                    e.index,
                    format!("{} ready endpoints: {addrs:?}", ready_count(ready)),
                );
            }
        }
    }
    cx.out
}

/// Two instances that ever reported active at one epoch, whenever they did.
pub fn check_single_active(h: &History, radius: usize) -> Vec<Violation> {
    let mut cx = Ctx::new(h, Check::SingleActive, radius);
    let mut first: BTreeMap<i64, &str> = BTreeMap::new();
    let mut reported: BTreeSet<(i64, &str)> = BTreeSet::new();
    for e in &h.entries {
        if let Event::RoleReport {
            instance,
            role: Role::Active,
            epoch,
            ..
        } = &e.event
        {
            let holder = *first.entry(*epoch).or_insert(instance);
            // One violation per extra instance, not one per report.
            if holder != instance && reported.insert((*epoch, instance)) {
                cx.violation(
                    e.index,
                    format!("{instance} reports active at epoch {epoch}, as {holder} did"),
                );
            }
        }
    }
    cx.out
}

pub fn check_faults_healed(h: &History, radius: usize) -> Vec<Violation> {
    let mut cx = Ctx::new(h, Check::FaultsHealed, radius);
    let healed: BTreeSet<usize> = h
        .entries
        .iter()
        .filter_map(|e| match e.event {
            Event::FaultHealed { fault, .. } => Some(fault),
            _ => None,
        })
        .collect();
    for e in &h.entries {
        if let Event::FaultInjected { fault, kind, .. } = e.event {
            if kind.is_timed() && !healed.contains(&fault) {
                cx.violation(e.index, format!("fault #{fault} ({kind}) was never healed"));
            }
        }
    }
    cx.out
}

/// How long the system took to have a ready active again after one fault.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Recovery {
    pub fault: usize,
    pub kind: FaultKind,
    /// The heal of a timed fault, the injection of an instantaneous one.
    pub from_index: usize,
    pub from: Duration,
    /// When the bound starts: `from`, or later if other faults were in force at `from` (their
    /// last heal). None when one of them was never healed.
    pub clear: Option<Duration>,
    /// The first entry after `from_index` at which exactly one endpoint was ready, its
    /// instance's latest role report since `from_index` said active and every relay the
    /// history reports on was connected to it.
    pub recovered_index: Option<usize>,
    pub recovered_at: Option<Duration>,
}

impl Recovery {
    /// From `from` to the recovery.
    pub fn time(&self) -> Option<Duration> {
        self.recovered_at.map(|t| t.saturating_sub(self.from))
    }
}

struct Span {
    fault: usize,
    kind: FaultKind,
    inject: usize,
    heal: Option<(usize, Duration)>,
}

fn fault_spans(h: &History) -> Vec<Span> {
    let mut spans: Vec<Span> = Vec::new();
    for e in &h.entries {
        match e.event {
            Event::FaultInjected { fault, kind, .. } => spans.push(Span {
                fault,
                kind,
                inject: e.index,
                heal: None,
            }),
            Event::FaultHealed { fault, .. } => {
                if let Some(s) = spans
                    .iter_mut()
                    .rev()
                    .find(|s| s.fault == fault && s.heal.is_none())
                {
                    s.heal = Some((e.index, e.at()));
                }
            }
            _ => {}
        }
    }
    spans
}

/// The first entry after `from_index` at which one endpoint is ready, its instance's latest
/// role report since `from_index` says active and, when the history has relay reports, every
/// relay's latest report since `from_index` says it is connected to that instance.
fn ready_active_at(entries: &[Entry], from_index: usize) -> Option<(usize, Duration)> {
    let mut ready = entries
        .get(..=from_index)
        .unwrap_or_default()
        .iter()
        .rev()
        .find_map(|e| match &e.event {
            Event::Endpoints { ready } => Some(ready),
            _ => None,
        });
    let relays: BTreeSet<&str> = entries
        .iter()
        .filter_map(|e| match &e.event {
            Event::RelayReport { relay, .. } => Some(relay.as_str()),
            _ => None,
        })
        .collect();
    // Only reports made after the fault count: an instance's earlier "active" says nothing now.
    let mut roles: HashMap<&str, Role> = HashMap::new();
    let mut relay_on: HashMap<&str, Option<&str>> = HashMap::new();
    for e in entries.get(from_index + 1..).unwrap_or_default() {
        match &e.event {
            Event::Endpoints { ready: r } => ready = Some(r),
            Event::RoleReport { instance, role, .. } => {
                roles.insert(instance, *role);
            }
            Event::RelayReport { relay, instance } => {
                relay_on.insert(relay, instance.as_deref());
            }
            _ => continue,
        }
        let Some(r) = ready else { continue };
        if ready_count(r) != 1 {
            continue;
        }
        let active = r.iter().all(|ep| {
            ep.instance.as_deref().is_some_and(|i| {
                roles.get(i) == Some(&Role::Active)
                    && relays
                        .iter()
                        .all(|relay| relay_on.get(relay) == Some(&Some(i)))
            })
        });
        if active {
            return Some((e.index, e.at()));
        }
    }
    None
}

/// One recovery per fault injected (timed faults never healed have none: see
/// [`check_faults_healed`]).
pub fn recoveries(h: &History) -> Vec<Recovery> {
    let spans = fault_spans(h);
    let mut out = Vec::new();
    for s in &spans {
        let (from_index, from) = if s.kind.is_timed() {
            match s.heal {
                Some(heal) => heal,
                None => continue,
            }
        } else {
            match h.entries.get(s.inject) {
                Some(e) => (s.inject, e.at()),
                None => continue,
            }
        };
        // Other timed faults in force at `from` delay when recovery can be expected.
        let mut clear = Some(from);
        for o in spans
            .iter()
            .filter(|o| o.kind.is_timed() && o.inject < from_index)
        {
            match o.heal {
                Some((i, t)) if i > from_index => clear = clear.map(|c| c.max(t)),
                Some(_) => {}
                None => clear = None,
            }
        }
        let found = ready_active_at(&h.entries, from_index);
        out.push(Recovery {
            fault: s.fault,
            kind: s.kind,
            from_index,
            from,
            clear,
            recovered_index: found.map(|f| f.0),
            recovered_at: found.map(|f| f.1),
        });
    }
    out
}

pub fn check_recovery(
    h: &History,
    recoveries: &[Recovery],
    config: &CheckerConfig,
) -> Vec<Violation> {
    let mut cx = Ctx::new(h, Check::Recovery, config.excerpt_radius);
    for r in recoveries {
        let bound = config.bound(r.kind);
        match (r.recovered_at, r.clear) {
            (None, _) => cx.violation(
                r.from_index,
                format!(
                    "fault #{} ({}): no ready active afterwards",
                    r.fault, r.kind
                ),
            ),
            (Some(at), Some(clear)) if at.saturating_sub(clear) > bound => cx.violation(
                r.recovered_index.unwrap_or(r.from_index),
                format!(
                    "fault #{} ({}): ready active {:.3}s after it cleared, bound {:.3}s",
                    r.fault,
                    r.kind,
                    at.saturating_sub(clear).as_secs_f64(),
                    bound.as_secs_f64()
                ),
            ),
            _ => {}
        }
    }
    cx.out
}

/// Recovery figures of one fault kind, over the faults that recovered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RecoveryStats {
    pub kind: FaultKind,
    pub faults: usize,
    pub recovered: usize,
    pub p50: Option<Duration>,
    pub p99: Option<Duration>,
    pub max: Option<Duration>,
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

pub fn recovery_stats(recoveries: &[Recovery]) -> Vec<RecoveryStats> {
    let mut by_kind: BTreeMap<FaultKind, (usize, Vec<Duration>)> = BTreeMap::new();
    for r in recoveries {
        let slot = by_kind.entry(r.kind).or_default();
        slot.0 += 1;
        slot.1.extend(r.time());
    }
    by_kind
        .into_iter()
        .map(|(kind, (faults, mut times))| {
            times.sort_unstable();
            RecoveryStats {
                kind,
                faults,
                recovered: times.len(),
                p50: percentile(&times, 0.50),
                p99: percentile(&times, 0.99),
                max: times.last().copied(),
            }
        })
        .collect()
}

/// Every check's violations, the recoveries and the counts the report shows.
#[derive(Clone, Debug)]
pub struct Verdict {
    pub checks: Vec<(Check, Vec<Violation>)>,
    pub recoveries: Vec<Recovery>,
    pub stats: Vec<RecoveryStats>,
    pub acknowledged_writes: usize,
    /// Directory entries compared with the connector space in the final state.
    pub objects_compared: usize,
}

impl Verdict {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|(_, v)| v.is_empty())
    }
    pub fn violations(&self) -> impl Iterator<Item = &Violation> {
        self.checks.iter().flat_map(|(_, v)| v)
    }
}

pub fn check_all(h: &History, config: &CheckerConfig) -> Verdict {
    let r = config.excerpt_radius;
    let recoveries = recoveries(h);
    let checks = Check::ALL
        .into_iter()
        .map(|c| {
            let v = match c {
                Check::Fencing => check_fencing(h, r),
                Check::Writes => check_writes(h, r),
                Check::Convergence => check_convergence(h, r),
                Check::SingleEndpoint => check_single_endpoint(h, r),
                Check::SingleActive => check_single_active(h, r),
                Check::FaultsHealed => check_faults_healed(h, r),
                Check::Recovery => check_recovery(h, &recoveries, config),
            };
            (c, v)
        })
        .collect();
    let acknowledged_writes = h
        .entries
        .iter()
        .filter(|e| matches!(e.event, Event::WriteAcked { .. }))
        .count();
    let objects_compared = h
        .entries
        .iter()
        .rev()
        .find_map(|e| match &e.event {
            Event::FinalState(s) => Some(s.directory.len()),
            _ => None,
        })
        .unwrap_or(0);
    Verdict {
        checks,
        stats: recovery_stats(&recoveries),
        recoveries,
        acknowledged_writes,
        objects_compared,
    }
}

#[cfg(test)]
#[path = "checker_tests.rs"]
mod tests;
