//! `identitymesh-operator run` as a local process.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::*;

/// `identitymesh-operator run` as a local process, stopped by pid.
pub struct Operator {
    child: Child,
    pub log: PathBuf,
}

impl Operator {
    /// `watch`: `--namespace` (None watches all, as the chart's default); the leader Lease
    /// lives in `lease_ns`.
    pub fn start(kubeconfig: &Path, watch: Option<&str>, lease_ns: &str, log: &Path) -> Operator {
        use std::os::unix::process::CommandExt;
        let bin = workspace_bin("identitymesh-operator");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("operator log file");
        let err = out.try_clone().expect("clone log handle");
        let mut cmd = Command::new(bin);
        cmd.args([
            "run",
            "--leader-election",
            "true",
            "--lease-namespace",
            lease_ns,
        ]);
        if let Some(ns) = watch {
            cmd.args(["--namespace", ns]);
        }
        cmd.arg("--metrics-addr")
            .arg(format!("127.0.0.1:{}", free_port()))
            .env("KUBECONFIG", kubeconfig)
            .env(
                "RUST_LOG",
                std::env::var("IM_TEST_OPERATOR_LOG").unwrap_or_else(|_| "info,kube=warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        // SAFETY: prctl is async-signal-safe. The operator dies with the test process even when
        // the test is killed before its Drop runs.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start identitymesh-operator");
        Operator {
            child,
            log: log.to_path_buf(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL by pid and reap.
    pub fn stop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.stop();
    }
}
