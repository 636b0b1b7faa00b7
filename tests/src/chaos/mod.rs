//! Foundations of the fault campaign (Jepsen-style): a seeded fault schedule, a recorded
//! history, the checker over it, the end-of-run report, and two fault injectors the cluster
//! harness lacked.
//!
//! Built and unit-tested here:
//! - [`schedule`]: fault kinds and a deterministic schedule generator (seed, count, length,
//!   kinds) with overlap and heal constraints, rendered one line per event.
//! - [`history`]: typed, timestamped events appended from many tasks through a [`Recorder`],
//!   written and read as JSON lines.
//! - [`checker`]: fencing, acknowledged writes, convergence, single ready endpoint, single
//!   active per epoch, faults healed, recovery bound; recovery p50/p99/max per kind.
//! - [`report`]: the report and the failure text (seed, schedule, excerpts) for `--seed` replay.
//! - [`db_stall`]: a process holding SQLite's write lock (`BEGIN IMMEDIATE`) for a while.
//! - [`disk_full`]: a small tmpfs mounted by the test, filled to ENOSPC and freed.
//!
//! Nothing here starts a cluster or runs faults. A first, small campaign (operator and two
//! server pods; no relay or slapd, so no convergence check) is `tests/tests/chaos_campaign.rs`.
//! Still to build: the full campaign that wires these into the harness: a runner that
//! executes [`Schedule::events`] against a [`crate::Cluster`] running the operator, a two-pod server, a relay and slapd (resolving
//! node roles at injection time and recording `FaultInjected`/`FaultHealed`/`FaultFailed`),
//! plus recording tasks — an Admin API writer through the Service, an EndpointSlice watch, a
//! role poller of each instance, a fence-journal reader — then heal, settle, final import,
//! read-back and final snapshot, and [`checker::check_all`] into a [`report::Report`]. The
//! disk-full mount must be the server pod's data directory and visible in the pod's mount
//! namespace (mounted before the pod starts, or with shared propagation).
//!
//! [`Recorder`]: history::Recorder
//! [`Schedule::events`]: schedule::Schedule::events

pub mod checker;
pub mod db_stall;
pub mod disk_full;
pub mod history;
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
