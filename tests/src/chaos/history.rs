//! The campaign's recorded history: what was done and what was observed, as typed events.
//!
//! Every task of a run (fault runner, Admin API writer, EndpointSlice watch, role poller, fence
//! journal reader, final snapshot) appends to one [`Recorder`]. The checker reads only this
//! history, so a run's verdict can be recomputed from its JSON-lines artefact.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::schedule::FaultKind;
use crate::error::{Error, IoContext, Result};

/// The fence journal's kind for a stored epoch (`promote`); every other kind is a commit made
/// under its epoch (the server writes `batch`).
pub const FENCE_PROMOTE: &str = "promote";

/// The value a write records when it deletes its key: after it the key is absent, unless a
/// later write set it again. No real value looks like this.
pub const DELETED: &str = "<deleted>";

/// One row of the server's `fence_journal` table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceRow {
    /// The table's sequence: the database's own order of the rows.
    pub seq: i64,
    pub kind: String,
    pub epoch: i64,
    pub instance: String,
    /// The writer's clock (ms since the epoch): informational only, never used to order.
    pub at: i64,
}

/// A ready endpoint of the client Service, as its EndpointSlice shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub address: String,
    /// The targetRef's pod name, which is the server's instance name.
    pub instance: Option<String>,
}

/// A server instance's role as its status endpoint reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Active,
    Standby,
    Fenced,
    #[serde(other)]
    Unknown,
}

/// A directory entry or connector-space object: an id (the DN) and its attribute values.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Object {
    pub id: String,
    pub attributes: BTreeMap<String, Vec<String>>,
}

/// A sync run the final state was read after.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportRun {
    pub run: String,
    pub mode: String,
    /// The run's final status; "succeeded" when it imported everything without an error.
    pub status: String,
    /// Counts or the error, for readers.
    pub detail: String,
}

/// The state compared after the final full import. Objects are keyed by the directory's
/// anchor (entryUUID); their attributes include `dn`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalState {
    pub directory: Vec<Object>,
    pub connector_space: Vec<Object>,
    /// Every person of the directory, with the number of identities joined to it (0 included).
    pub identities_per_person: BTreeMap<String, u32>,
    /// Identities no directory entry links to: left behind by an entry that is gone.
    #[serde(default)]
    pub orphan_identities: Vec<String>,
    /// The full import the state was read after (None: not stated).
    #[serde(default)]
    pub final_import: Option<ImportRun>,
    /// The connector space after a delta import run once the directory stopped changing and
    /// before the final full import: a delta resumes from the last committed watermark, so it
    /// must hold every directory entry as it is (a delta cannot see deletions, so objects of
    /// deleted entries may remain). None: not taken.
    #[serde(default)]
    pub after_delta: Option<DeltaState>,
}

/// See [`FinalState::after_delta`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaState {
    pub import: ImportRun,
    pub connector_space: Vec<Object>,
}

/// A change the directory writer made to slapd.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DirectoryOp {
    Add,
    Modify,
    /// modrdn: a new RDN, the old one deleted.
    Rename,
    Delete,
}

/// A record read back through the Admin API after the run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub key: String,
    pub value: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A step of the run ("schedule_start", "healed", "settled", ...), for readers of excerpts.
    Phase {
        name: String,
    },
    /// `fault` is the id in the schedule; `detail` the resolved target (node, pod, pid).
    FaultInjected {
        fault: usize,
        kind: FaultKind,
        detail: String,
    },
    FaultHealed {
        fault: usize,
        kind: FaultKind,
        detail: String,
    },
    /// The injection could not be done (e.g. no standby to kill); nothing was changed.
    FaultFailed {
        fault: usize,
        kind: FaultKind,
        error: String,
    },
    /// An Admin API write. `op` is unique per write; each key has one write in flight at a time
    /// and every value is unique, so a value read back names the write that made it.
    WriteSent {
        op: u64,
        key: String,
        value: String,
    },
    WriteAcked {
        op: u64,
        key: String,
        value: String,
    },
    /// The outcome is unknown: the write may or may not have been applied.
    WriteFailed {
        op: u64,
        key: String,
        value: String,
        error: String,
    },
    Fence(FenceRow),
    /// The client Service's ready endpoints, each time they change.
    Endpoints {
        ready: Vec<Endpoint>,
    },
    RoleReport {
        instance: String,
        role: Role,
        epoch: i64,
        /// Changes when the process restarts, when the server reports one.
        incarnation: Option<String>,
    },
    /// Every record of the written kind, read back after the system settled.
    ReadBack {
        records: Vec<Record>,
    },
    /// Boxed: the other events are small.
    FinalState(Box<FinalState>),
    /// A change made to the directory, recorded when slapd answered (or the request failed).
    DirectoryChange {
        op: DirectoryOp,
        /// The entry's DN before the change (an add's new DN).
        dn: String,
        /// A rename's new DN.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        new_dn: Option<String>,
        /// The entry's entryUUID, when known (an add whose answer was lost has none).
        anchor: Option<String>,
        /// None when slapd acknowledged the change; the error otherwise (outcome unknown).
        error: Option<String>,
    },
    /// The instance a relay is connected to (None: disconnected), as the Admin API reports it
    /// through the client Service.
    RelayReport {
        relay: String,
        instance: Option<String>,
    },
}

/// One event and when it was recorded, relative to the recorder's start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub index: usize,
    pub at_us: u64,
    #[serde(flatten)]
    pub event: Event,
}

impl Entry {
    pub fn at(&self) -> Duration {
        Duration::from_micros(self.at_us)
    }
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The event's JSON is compact, complete and unambiguous in one line; a final state
        // (the whole directory) is summarised, the artefact has it in full.
        let json = match &self.event {
            Event::FinalState(s) => serde_json::json!({
                "event": "final_state",
                "directory": s.directory.len(),
                "connector_space": s.connector_space.len(),
                "people": s.identities_per_person.len(),
                "orphan_identities": s.orphan_identities.len(),
                "final_import": s.final_import,
                "after_delta": s.after_delta.as_ref().map(|d| serde_json::json!({
                    "import": d.import,
                    "connector_space": d.connector_space.len(),
                })),
            })
            .to_string(),
            e => serde_json::to_string(e).map_err(|_| fmt::Error)?,
        };
        write!(f, "#{} +{:.3}s {json}", self.index, self.at().as_secs_f64())
    }
}

/// A cheap, cloneable, thread-safe appender: one lock around a Vec, held only to push.
#[derive(Clone, Debug)]
pub struct Recorder {
    start: Instant,
    entries: Arc<Mutex<Vec<Entry>>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new()
    }
}

impl Recorder {
    pub fn new() -> Self {
        Recorder {
            start: Instant::now(),
            entries: Arc::default(),
        }
    }

    /// Appends and returns the event's index. The time is read under the lock, so indexes and
    /// times increase together.
    pub fn record(&self, event: Event) -> usize {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let index = entries.len();
        let at_us = self.start.elapsed().as_micros() as u64;
        entries.push(Entry {
            index,
            at_us,
            event,
        });
        index
    }

    /// A copy of everything recorded so far.
    pub fn history(&self) -> History {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        History {
            entries: entries.clone(),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct History {
    pub entries: Vec<Entry>,
}

impl History {
    /// Appends at a given time (for hand-built histories); times must not go backwards.
    pub fn push(&mut self, at: Duration, event: Event) -> usize {
        let index = self.entries.len();
        let last = self.entries.last().map_or(0, |e| e.at_us);
        self.entries.push(Entry {
            index,
            at_us: (at.as_micros() as u64).max(last),
            event,
        });
        index
    }

    pub fn to_json_lines(&self) -> Result<String> {
        let mut out = String::new();
        for e in &self.entries {
            let line = serde_json::to_string(e)
                .map_err(|err| Error::Other(format!("history entry #{}: {err}", e.index)))?;
            out.push_str(&line);
            out.push('\n');
        }
        Ok(out)
    }

    /// Parses an artefact written by [`History::to_json_lines`]; indexes must be 0, 1, 2, ...
    pub fn from_json_lines(text: &str) -> Result<History> {
        let mut entries: Vec<Entry> = Vec::new();
        for (n, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let entry: Entry = serde_json::from_str(line)
                .map_err(|err| Error::Other(format!("history line {}: {err}", n + 1)))?;
            if entry.index != entries.len() {
                return Err(Error::Other(format!(
                    "history line {}: index {} where {} was expected",
                    n + 1,
                    entry.index,
                    entries.len()
                )));
            }
            entries.push(entry);
        }
        Ok(History { entries })
    }

    pub fn write_json_lines(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.to_json_lines()?)
            .ctx(|| format!("writing the history to {}", path.display()))
    }

    /// The entries within `radius` of `index`, one per line, the centre marked with `>`.
    pub fn excerpt(&self, index: usize, radius: usize) -> String {
        let from = index.saturating_sub(radius);
        let to = index.saturating_add(radius + 1).min(self.entries.len());
        let mut out = String::new();
        for e in self.entries.get(from..to).unwrap_or_default() {
            let mark = if e.index == index { '>' } else { ' ' };
            out.push_str(&format!("{mark} {e}\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Event> {
        vec![
            Event::Phase {
                name: "schedule_start".into(),
            },
            Event::FaultInjected {
                fault: 0,
                kind: FaultKind::Partition,
                detail: "win-1".into(),
            },
            Event::WriteSent {
                op: 1,
                key: "k1".into(),
                value: "v1".into(),
            },
            Event::WriteFailed {
                op: 1,
                key: "k1".into(),
                value: "v1".into(),
                error: "503".into(),
            },
            Event::Fence(FenceRow {
                seq: 4,
                kind: FENCE_PROMOTE.into(),
                epoch: 2,
                instance: "server-1".into(),
                at: 1_700_000_000_000,
            }),
            Event::Endpoints {
                ready: vec![Endpoint {
                    address: "10.201.0.2".into(),
                    instance: Some("server-1".into()),
                }],
            },
            Event::RoleReport {
                instance: "server-1".into(),
                role: Role::Active,
                epoch: 2,
                incarnation: None,
            },
            Event::ReadBack {
                records: vec![Record {
                    key: "k1".into(),
                    value: "v1".into(),
                }],
            },
            Event::FinalState(Box::new(FinalState {
                directory: vec![Object {
                    id: "uid=a,dc=x".into(),
                    attributes: [("cn".to_string(), vec!["A".to_string()])].into(),
                }],
                connector_space: vec![],
                identities_per_person: [("uid=a,dc=x".to_string(), 1)].into(),
                orphan_identities: vec!["id-9".into()],
                final_import: Some(ImportRun {
                    run: "r1".into(),
                    mode: "full".into(),
                    status: "succeeded".into(),
                    detail: "added 1".into(),
                }),
                after_delta: None,
            })),
            Event::DirectoryChange {
                op: DirectoryOp::Rename,
                dn: "uid=a,dc=x".into(),
                new_dn: Some("uid=b,dc=x".into()),
                anchor: Some("0f7c".into()),
                error: None,
            },
            Event::RelayReport {
                relay: "r".into(),
                instance: Some("server-1".into()),
            },
        ]
    }

    #[test]
    fn json_lines_round_trip() {
        let rec = Recorder::new();
        for e in sample() {
            rec.record(e);
        }
        let h = rec.history();
        let text = h.to_json_lines().unwrap();
        assert_eq!(text.lines().count(), h.entries.len());
        assert!(text.lines().next().unwrap().contains(r#""event":"phase""#));
        assert_eq!(History::from_json_lines(&text).unwrap(), h);
        // A gap in the indexes is refused rather than silently renumbered.
        let skipped: String = text.lines().skip(1).map(|l| format!("{l}\n")).collect();
        assert!(History::from_json_lines(&skipped).is_err());
    }

    #[test]
    fn unknown_roles_parse_as_unknown() {
        let e: Event = serde_json::from_str(
            r#"{"event":"role_report","instance":"s","role":"draining","epoch":1,"incarnation":null}"#,
        )
        .unwrap();
        assert!(matches!(
            e,
            Event::RoleReport {
                role: Role::Unknown,
                ..
            }
        ));
    }

    #[test]
    fn recorder_appends_from_many_threads_in_order() {
        let rec = Recorder::new();
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let rec = rec.clone();
                std::thread::spawn(move || {
                    for i in 0..250 {
                        rec.record(Event::WriteSent {
                            op: t * 1000 + i,
                            key: format!("k{t}"),
                            value: format!("v{i}"),
                        });
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let h = rec.history();
        assert_eq!(h.entries.len(), 1000);
        for (i, w) in h.entries.windows(2).enumerate() {
            assert_eq!(w[0].index, i);
            assert!(w[0].at_us <= w[1].at_us);
        }
        // Each thread's own events stay in its order.
        for t in 0..4u64 {
            let ops: Vec<u64> = h
                .entries
                .iter()
                .filter_map(|e| match &e.event {
                    Event::WriteSent { op, .. } if op / 1000 == t => Some(*op),
                    _ => None,
                })
                .collect();
            assert_eq!(ops, (t * 1000..t * 1000 + 250).collect::<Vec<_>>());
        }
    }

    #[test]
    fn excerpt_marks_the_centre_and_clips_at_the_edges() {
        let mut h = History::default();
        for (i, e) in sample().into_iter().enumerate() {
            h.push(Duration::from_millis(100 * i as u64), e);
        }
        let ex = h.excerpt(1, 2);
        let lines: Vec<&str> = ex.lines().collect();
        assert_eq!(lines.len(), 4, "{ex}");
        assert!(lines[0].starts_with("  #0 +0.000s"));
        assert!(lines[1].starts_with("> #1 +0.100s"), "{ex}");
        assert!(lines[1].contains("partition"));
        assert_eq!(h.excerpt(10, 3).lines().count(), 4);
        // The final state is summarised in excerpts.
        let fin = h.excerpt(8, 0);
        assert!(
            fin.contains(r#""event":"final_state""#) && fin.contains(r#""directory":1"#),
            "{fin}"
        );
        assert_eq!(h.excerpt(100, 1), "");
        assert!(h.excerpt(9, 0).contains(r#""op":"rename""#));
    }
}
