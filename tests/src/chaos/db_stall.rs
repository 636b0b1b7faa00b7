//! The database-stall fault: another process holds the SQLite write lock.
//!
//! A `sqlite3` CLI child (installed by the xtask APT list) runs `BEGIN IMMEDIATE` on the
//! database file and then waits on its stdin. It is a separate process, as a stuck writer
//! would be, so the server sees real `SQLITE_BUSY`. Closing its stdin ends the CLI, which rolls
//! the open transaction back; if it does not exit, it is SIGKILLed by pid (the OS drops the
//! lock with the process).

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::{Error, IoContext, Result};
use crate::process;

/// Printed by the CLI once the lock is held.
const LOCKED: &str = "im-chaos-db-stall-locked";

/// Holds the write lock until `duration` passes or the handle is released or dropped.
#[derive(Debug)]
pub struct DbStall {
    pid: u32,
    /// Dropping the sender wakes the timer thread early.
    release: Option<mpsc::Sender<()>>,
    timer: Option<JoinHandle<()>>,
}

impl DbStall {
    /// Returns once the lock is held; errors (with the CLI's stderr) when it cannot be taken
    /// within `acquire_timeout` (e.g. another writer holds it).
    pub fn start(db: &Path, duration: Duration, acquire_timeout: Duration) -> Result<DbStall> {
        let mut child = Command::new("sqlite3")
            .arg(db)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .ctx(|| "starting sqlite3 (installed by the xtask APT list)".into())?;
        let pid = child.id();
        match Self::lock(&mut child, acquire_timeout) {
            Ok(stdin) => {
                let (tx, rx) = mpsc::channel::<()>();
                let timer = std::thread::spawn(move || {
                    // Either the duration passes or the sender is dropped (early release).
                    let _ = rx.recv_timeout(duration);
                    finish(child, stdin);
                });
                Ok(DbStall {
                    pid,
                    release: Some(tx),
                    timer: Some(timer),
                })
            }
            Err(e) => {
                process::signal(pid, libc::SIGKILL);
                let _ = child.wait();
                Err(Error::Other(format!(
                    "database stall on {}: {e}",
                    db.display()
                )))
            }
        }
    }

    fn lock(
        child: &mut Child,
        acquire_timeout: Duration,
    ) -> std::result::Result<ChildStdin, String> {
        let mut stdin = child.stdin.take().ok_or("sqlite3 has no stdin")?;
        let script = format!(
            ".bail on\n.timeout {}\nBEGIN IMMEDIATE;\nSELECT '{LOCKED}';\n",
            acquire_timeout.as_millis()
        );
        stdin
            .write_all(script.as_bytes())
            .and_then(|_| stdin.flush())
            .map_err(|e| format!("writing to sqlite3: {e}"))?;
        let stdout = child.stdout.take().ok_or("sqlite3 has no stdout")?;
        let mut line = String::new();
        // With `.bail on` a failed BEGIN ends the CLI, so this read returns (EOF) either way.
        BufReader::new(stdout)
            .read_line(&mut line)
            .map_err(|e| format!("reading from sqlite3: {e}"))?;
        if line.trim() == LOCKED {
            return Ok(stdin);
        }
        let mut stderr = String::new();
        if let Some(mut err) = child.stderr.take() {
            let _ = err.read_to_string(&mut stderr);
        }
        Err(format!(
            "could not take the write lock: {}",
            stderr.trim().lines().next().unwrap_or("sqlite3 exited")
        ))
    }

    /// The pid of the process holding the lock.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Releases now and waits until the lock is gone.
    pub fn release(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        drop(self.release.take());
        if let Some(t) = self.timer.take() {
            let _ = t.join();
        }
    }
}

impl Drop for DbStall {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Ends the CLI by closing its stdin (it rolls back and exits); SIGKILL if it lingers.
fn finish(mut child: Child, stdin: ChildStdin) {
    drop(stdin);
    if !process::wait_dead(child.id(), Duration::from_secs(5)) {
        process::signal(child.id(), libc::SIGKILL);
    }
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::scratch_dir;

    /// Runs SQL in a fresh sqlite3 with a short busy timeout; Err carries its stderr.
    fn sql(db: &Path, statements: &str) -> std::result::Result<String, String> {
        let out = Command::new("sqlite3")
            .arg("-cmd")
            .arg(".timeout 100")
            .arg(db)
            .arg(statements)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    fn setup() -> (crate::chaos::ScratchDir, std::path::PathBuf) {
        let dir = scratch_dir("db-stall").unwrap();
        let db = dir.path().join("store.db");
        sql(&db, "PRAGMA journal_mode=WAL").unwrap();
        sql(&db, "CREATE TABLE t (x INTEGER)").unwrap();
        (dir, db)
    }

    #[test]
    fn writes_fail_while_stalled_and_succeed_after_release() {
        let (_dir, db) = setup();
        let stall = DbStall::start(&db, Duration::from_secs(600), Duration::from_secs(5)).unwrap();
        let err = sql(&db, "INSERT INTO t VALUES (1)").unwrap_err();
        assert!(err.contains("database is locked"), "{err}");
        // Readers are not blocked in WAL mode: the stall is of writes only.
        assert_eq!(sql(&db, "SELECT count(*) FROM t").unwrap(), "0");
        let pid = stall.pid();
        stall.release();
        assert!(
            !process::pid_alive(pid),
            "the lock holder is gone after release"
        );
        sql(&db, "INSERT INTO t VALUES (2)").unwrap();
        assert_eq!(sql(&db, "SELECT x FROM t").unwrap(), "2");
    }

    #[test]
    fn drop_releases_early() {
        let (_dir, db) = setup();
        let stall = DbStall::start(&db, Duration::from_secs(600), Duration::from_secs(5)).unwrap();
        assert!(sql(&db, "INSERT INTO t VALUES (1)").is_err());
        drop(stall);
        sql(&db, "INSERT INTO t VALUES (1)").unwrap();
    }

    #[test]
    fn the_stall_ends_by_itself_after_its_duration() {
        let (_dir, db) = setup();
        let stall =
            DbStall::start(&db, Duration::from_millis(200), Duration::from_secs(5)).unwrap();
        // Not timed: wait for the holder to exit, however long that takes.
        let pid = stall.pid();
        while process::pid_alive(pid) {
            std::thread::sleep(Duration::from_millis(20));
        }
        sql(&db, "INSERT INTO t VALUES (1)").unwrap();
        drop(stall);
    }

    #[test]
    fn a_second_stall_cannot_take_a_held_lock() {
        let (_dir, db) = setup();
        let _held = DbStall::start(&db, Duration::from_secs(600), Duration::from_secs(5)).unwrap();
        let err = DbStall::start(&db, Duration::from_secs(1), Duration::from_millis(100))
            .unwrap_err()
            .to_string();
        assert!(err.contains("database is locked"), "{err}");
    }
}
