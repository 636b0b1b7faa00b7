//! Reading the shared SQLite file as an auditor would: the commit log and the fence journal.
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::*;

/// Runs `sql` on the shared database with the sqlite3 CLI (waits up to 5 s for the servers'
/// write lock); `|`-separated rows.
pub fn sqlite(db: &Path, sql: &str, read_only: bool) -> Result<String, String> {
    let bin = need_tool("sqlite3");
    let mut cmd = Command::new(bin);
    if read_only {
        cmd.arg("-readonly");
    }
    let out = cmd
        .args(["-cmd", ".timeout 5000", "-batch", "-noheader"])
        .arg(db)
        .arg(sql)
        .output()
        .map_err(|e| format!("run sqlite3: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "sqlite3 {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Test-only instrumentation of the shared database: triggers log every committed fence change,
/// engine tick and registry heartbeat into one table, in commit order (a trigger runs inside the
/// writing transaction, so a write that is refused or rolled back logs nothing). The server's own
/// fence_journal only records promotions and import batches, and no import runs in these tests.
pub fn install_commit_log(db: &Path) {
    let sql = "
        CREATE TABLE IF NOT EXISTS e2e_commit_log (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, what TEXT NOT NULL, instance TEXT,
            role TEXT, epoch INTEGER);
        CREATE TRIGGER IF NOT EXISTS e2e_fence AFTER UPDATE ON fence BEGIN
            INSERT INTO e2e_commit_log (what, instance, epoch) VALUES ('promote', NEW.holder, NEW.epoch); END;
        CREATE TRIGGER IF NOT EXISTS e2e_tick_i AFTER INSERT ON engine_state BEGIN
            INSERT INTO e2e_commit_log (what, instance, epoch) VALUES ('tick', NEW.holder, NEW.epoch); END;
        CREATE TRIGGER IF NOT EXISTS e2e_tick_u AFTER UPDATE ON engine_state BEGIN
            INSERT INTO e2e_commit_log (what, instance, epoch) VALUES ('tick', NEW.holder, NEW.epoch); END;
        CREATE TRIGGER IF NOT EXISTS e2e_hb_i AFTER INSERT ON engine_instances BEGIN
            INSERT INTO e2e_commit_log (what, instance, role, epoch) VALUES ('heartbeat', NEW.instance, NEW.role, NEW.epoch); END;
        CREATE TRIGGER IF NOT EXISTS e2e_hb_u AFTER UPDATE ON engine_instances BEGIN
            INSERT INTO e2e_commit_log (what, instance, role, epoch) VALUES ('heartbeat', NEW.instance, NEW.role, NEW.epoch); END;
    ";
    sqlite(db, sql, false).expect("install the commit-log triggers");
}

#[derive(Debug, Clone, PartialEq)]
pub struct Commit {
    pub seq: i64,
    pub what: String,
    pub instance: String,
    pub role: String,
    pub epoch: i64,
}

pub fn commit_log(db: &Path) -> Vec<Commit> {
    let out = sqlite(
        db,
        "SELECT seq, what, ifnull(instance,''), ifnull(role,''), ifnull(epoch,-1) FROM e2e_commit_log ORDER BY seq",
        true,
    )
    .expect("read the commit log");
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('|').collect();
            Some(Commit {
                seq: f.first()?.parse().ok()?,
                what: f.get(1)?.to_string(),
                instance: f.get(2)?.to_string(),
                role: f.get(3)?.to_string(),
                epoch: f.get(4)?.parse().ok()?,
            })
        })
        .collect()
}

/// The server's fence_journal (kind, epoch), in commit order.
pub fn fence_journal(db: &Path) -> Vec<(String, i64)> {
    sqlite(
        db,
        "SELECT kind, epoch FROM fence_journal ORDER BY seq",
        true,
    )
    .expect("read fence_journal")
    .lines()
    .filter_map(|l| {
        let (k, e) = l.split_once('|')?;
        Some((k.to_string(), e.parse().ok()?))
    })
    .collect()
}

/// Fencing, from the database's point of view: once epoch `new` is committed, no engine write
/// (tick, import batch) with an older epoch commits, and `old_instance` never again registers
/// as active with an older epoch. Returns how many writes the old holder committed before.
pub fn assert_fenced_after(db: &Path, new: i64, old_instance: &str) -> usize {
    // The new active ticks once per heartbeat interval: give it a few to show up.
    let started = Instant::now();
    let log = loop {
        let log = commit_log(db);
        let promoted = log
            .iter()
            .find(|c| c.what == "promote" && c.epoch == new)
            .map(|c| c.seq);
        let ticked = promoted.is_some_and(|p| {
            log.iter()
                .any(|c| c.seq > p && c.what == "tick" && c.epoch == new)
        });
        if ticked || started.elapsed() > Duration::from_secs(15) {
            break log;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let promote = log
        .iter()
        .find(|c| c.what == "promote" && c.epoch == new)
        .unwrap_or_else(|| panic!("no promotion to epoch {new} in the commit log: {log:?}"));
    let before = log
        .iter()
        .filter(|c| c.seq < promote.seq && c.what == "tick" && c.instance == old_instance)
        .count();
    let stale: Vec<&Commit> = log
        .iter()
        .filter(|c| c.seq > promote.seq)
        .filter(|c| {
            (c.what == "tick" && c.epoch < new)
                || (c.what == "heartbeat" && c.role == "active" && c.epoch < new)
        })
        .collect();
    assert!(
        stale.is_empty(),
        "writes with an epoch below {new} committed after the promotion (seq {}): {stale:?}",
        promote.seq
    );
    let after_new = log
        .iter()
        .filter(|c| c.seq > promote.seq && c.what == "tick" && c.epoch == new)
        .count();
    assert!(
        after_new > 0,
        "the new active committed no engine tick with epoch {new} after its promotion"
    );
    // The server's journal agrees: promotions strictly increase, and no batch of an older
    // epoch follows a promotion.
    let journal = fence_journal(db);
    let mut highest = 0;
    for (kind, epoch) in &journal {
        match kind.as_str() {
            "promote" => {
                assert!(*epoch > highest, "fence_journal promotions not increasing: {journal:?}");
                highest = *epoch;
            }
            _ => assert!(
                *epoch >= highest,
                "fence_journal: {kind} with epoch {epoch} committed after promotion to {highest}: {journal:?}"
            ),
        }
    }
    before
}
