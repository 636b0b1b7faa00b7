//! The fault campaign (Jepsen-style): a seeded fault schedule, a recorded history, the checker
//! over it, the end-of-run report, the changing directory and the injectors the cluster harness
//! lacked.
//!
//! - [`schedule`]: fault kinds and a deterministic schedule generator (seed, count, length,
//!   kinds) with overlap and heal constraints, rendered one line per event.
//! - [`history`]: typed, timestamped events appended from many tasks through a [`Recorder`],
//!   written and read as JSON lines.
//! - [`checker`]: fencing, acknowledged writes (deletes included), convergence (after the final
//!   delta and full imports), single ready endpoint, single active per epoch, faults healed,
//!   recovery bound; recovery p50/p99/max per kind.
//! - [`report`]: the report and the failure text (seed, schedule, excerpts) for `--seed` replay.
//! - [`directory`]: the background writer that adds, modifies, renames and deletes people in
//!   slapd (recording each change) and the reader of the directory's final state.
//! - [`relay`]: the relay agent as a process killed by pid and started again (relay kill).
//! - [`db_stall`]: a process holding SQLite's write lock (`BEGIN IMMEDIATE`) for a while.
//! - [`disk_full`]: a small tmpfs mounted by the test, filled to ENOSPC and freed.
//!
//! The campaign itself, which runs these against the operator, two server pods, a relay and
//! slapd on the harness, is `tests/tests/chaos_campaign.rs` (slapd restarts use the
//! connectors' test fixture, `Slapd::restart`). Not in it yet: the disk-full fault, whose mount
//! must be the server pod's data directory and visible in the pod's mount namespace (mounted
//! before the pod starts, or with shared propagation).
//!
//! [`Recorder`]: history::Recorder

pub mod checker;
pub mod db_stall;
pub mod directory;
pub use crate::disk_full;
pub mod history;
pub mod relay;
pub mod report;
pub mod schedule;

/// A directory under the temp dir, removed with its contents on drop (for the tests here).
#[cfg(test)]
pub(crate) struct ScratchDir(std::path::PathBuf);

#[cfg(test)]
impl ScratchDir {
    pub(crate) fn path(&self) -> &std::path::Path {
        &self.0
    }
}

#[cfg(test)]
impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
pub(crate) fn scratch_dir(name: &str) -> std::io::Result<ScratchDir> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "im-chaos-{name}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(ScratchDir(dir))
}
