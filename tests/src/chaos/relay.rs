//! The relay-kill fault: the campaign's relay agent (`identitymesh-relay run`) as a local
//! process that can be killed with SIGKILL by its pid and started again with the same command
//! line, as a service manager would after a crash.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::error::{Error, IoContext, Result};
use crate::process;

/// A relay agent process; killed by pid on drop.
#[derive(Debug)]
pub struct RelayProcess {
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
}

impl RelayProcess {
    /// Starts `program args` with `env` added, output appended to `log`.
    pub fn start(
        program: &Path,
        args: &[String],
        env: &[(String, String)],
        log: &Path,
    ) -> Result<RelayProcess> {
        let mut r = RelayProcess {
            program: program.to_path_buf(),
            args: args.to_vec(),
            env: env.to_vec(),
            log: log.to_path_buf(),
            child: None,
        };
        r.spawn()?;
        Ok(r)
    }

    fn spawn(&mut self) -> Result<u32> {
        let out = process::log_file(&self.log)?;
        let err = out
            .try_clone()
            .ctx(|| "clone the relay log handle".into())?;
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        // SAFETY: prctl is async-signal-safe. The relay dies with the test process even when
        // the test is killed before its Drop runs.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .ctx(|| format!("start {}", self.program.display()))?;
        let pid = child.id();
        self.child = Some(child);
        Ok(pid)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// True while the process runs (not yet exited).
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL by pid, then reaps; returns the pid killed.
    pub fn kill(&mut self) -> Result<u32> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| Error::Other("the relay is not running".into()))?;
        let pid = child.id();
        process::signal(pid, libc::SIGKILL);
        let _ = child.wait();
        process::wait_dead(pid, Duration::from_secs(5));
        Ok(pid)
    }

    /// Starts it again with the same command line (after [`RelayProcess::kill`]); returns the
    /// new pid.
    pub fn restart(&mut self) -> Result<u32> {
        if self.running() {
            return Err(Error::Other("the relay is still running".into()));
        }
        // Exited by itself: reap it first.
        if let Some(mut old) = self.child.take() {
            let _ = old.wait();
        }
        self.spawn()
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.kill();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn killed_by_pid_and_restarted_with_the_same_command() {
        let dir = crate::chaos::scratch_dir("relay").unwrap();
        let log = dir.path().join("out.log");
        let args: Vec<String> = ["-c", "echo started $MARK; exec sleep 30"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let env = [("MARK".to_string(), "m1".to_string())];
        let mut p = RelayProcess::start(Path::new("/bin/sh"), &args, &env, &log).unwrap();
        let first = p.pid().unwrap();
        assert!(p.running());
        let started = |n: usize| {
            for _ in 0..100 {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                if text.matches("started m1").count() >= n {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            panic!("the process did not start {n} times");
        };
        started(1);
        assert_eq!(p.kill().unwrap(), first);
        assert!(!process::pid_alive(first));
        assert!(p.kill().is_err(), "nothing left to kill");
        let second = p.restart().unwrap();
        assert_ne!(first, second);
        assert!(p.restart().is_err(), "already running");
        started(2);
        drop(p);
        assert!(!process::pid_alive(second), "dropped means killed");
    }
}
