//! Spawning and stopping local processes by process id.
//!
//! Every process the harness starts is recorded in a [`ProcessTable`] so that teardown can kill
//! exactly those pids (never by name). Children also get `PR_SET_PDEATHSIG` so they die with the
//! harness even if it crashes before teardown.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use crate::error::{IoContext, Result};

/// The pids the harness started and has not yet seen exit.
#[derive(Clone, Default, Debug)]
pub struct ProcessTable(Arc<Mutex<HashSet<u32>>>);

impl ProcessTable {
    pub fn insert(&self, pid: u32) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(pid);
    }
    pub fn remove(&self, pid: u32) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&pid);
    }
    pub fn pids(&self) -> Vec<u32> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect()
    }
    /// SIGKILLs every recorded pid and waits (bounded) until each is dead.
    pub fn kill_all(&self) {
        let pids = self.pids();
        for pid in &pids {
            signal(*pid, libc::SIGKILL);
        }
        for pid in pids {
            wait_dead(pid, Duration::from_secs(5));
            self.remove(pid);
        }
    }
}

/// Sends `sig` to `pid`; false when there is no such process.
pub fn signal(pid: u32, sig: i32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        // 0 and negatives address process groups: never wanted here.
        return false;
    }
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid, sig) == 0 }
}

/// True while `pid` exists and is not a zombie (a zombie has already exited).
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state letter follows the parenthesised command name, which may contain spaces.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next());
            !matches!(state, Some('Z') | Some('X') | None)
        }
        Err(_) => false,
    }
}

/// Polls until `pid` is dead or `timeout` passes; returns whether it died.
pub fn wait_dead(pid: u32, timeout: Duration) -> bool {
    let start = Instant::now();
    while pid_alive(pid) {
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Resident set size of a process in KiB (VmRSS from /proc/<pid>/status).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Opens `path` for appending; used for per-process logs that survive restarts.
pub fn log_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .ctx(|| format!("open log {}", path.display()))
}

/// What to start.
pub struct Spec<'a> {
    pub program: &'a Path,
    pub args: &'a [String],
    /// `None` inherits the harness environment; `Some` replaces it completely.
    pub env: Option<&'a [(String, String)]>,
    pub cwd: Option<&'a Path>,
    pub log: &'a Path,
    /// Network namespace file (e.g. /var/run/netns/NAME) to enter before exec.
    pub netns: Option<&'a Path>,
    /// A mount and UTS namespace of its own, set up before exec (a pod's container).
    pub sandbox: Option<&'a Sandbox>,
}

/// What a container sees that the host does not: its hostname and its bind mounts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sandbox {
    pub hostname: String,
    /// Applied in order, so a mount under another one comes after it.
    pub binds: Vec<Bind>,
}

/// `source` (a host path) appears at `target` inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub source: std::path::PathBuf,
    pub target: std::path::PathBuf,
    pub read_only: bool,
}

impl Sandbox {
    /// Creates each missing mount point on the host (a directory for a directory source, an
    /// empty file for a file): a bind mount needs an existing target of the same kind. Empty
    /// mount points are all a sandbox leaves on the host.
    pub fn prepare(&self) -> Result<()> {
        for b in &self.binds {
            if b.target.exists() {
                continue;
            }
            if b.source.is_dir() {
                std::fs::create_dir_all(&b.target)
                    .ctx(|| format!("create mount point {}", b.target.display()))?;
            } else {
                if let Some(parent) = b.target.parent() {
                    std::fs::create_dir_all(parent)
                        .ctx(|| format!("create {}", parent.display()))?;
                }
                OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&b.target)
                    .ctx(|| format!("create mount point {}", b.target.display()))?;
            }
        }
        Ok(())
    }
}

/// The sandbox as C strings, made before fork: the child may only make syscalls.
struct SandboxC {
    hostname: std::ffi::CString,
    binds: Vec<(std::ffi::CString, std::ffi::CString, bool)>,
}

fn c_path(p: &Path) -> Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| {
        crate::error::Error::Other(format!("path {} contains a NUL byte", p.display()))
    })
}

impl SandboxC {
    fn new(s: &Sandbox) -> Result<SandboxC> {
        let hostname = std::ffi::CString::new(s.hostname.as_bytes()).map_err(|_| {
            crate::error::Error::Other(format!("hostname {:?} contains a NUL byte", s.hostname))
        })?;
        let binds = s
            .binds
            .iter()
            .map(|b| Ok((c_path(&b.source)?, c_path(&b.target)?, b.read_only)))
            .collect::<Result<_>>()?;
        Ok(SandboxC { hostname, binds })
    }

    /// In the child, between fork and exec: new mount and UTS namespaces, nothing propagated
    /// back to the host, then the hostname and the bind mounts.
    ///
    /// # Safety
    /// Only syscalls on memory prepared before fork.
    unsafe fn enter(&self) -> std::io::Result<()> {
        let err = std::io::Error::last_os_error;
        if libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWUTS) != 0 {
            return Err(err());
        }
        let root = c"/";
        if libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(err());
        }
        let name = self.hostname.as_bytes();
        if libc::sethostname(self.hostname.as_ptr(), name.len()) != 0 {
            return Err(err());
        }
        for (source, target, read_only) in &self.binds {
            if libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ) != 0
            {
                return Err(err());
            }
            if *read_only
                && libc::mount(
                    std::ptr::null(),
                    target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                    std::ptr::null(),
                ) != 0
            {
                return Err(err());
            }
        }
        Ok(())
    }
}

/// Starts a process, records its pid and returns the child (reaped by tokio).
pub fn spawn(table: &ProcessTable, spec: Spec<'_>) -> Result<(u32, Child)> {
    let log = log_file(spec.log)?;
    let log2 = log.try_clone().ctx(|| "clone log handle".into())?;
    let mut cmd = Command::new(spec.program);
    cmd.args(spec.args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2))
        // Own process group: a terminal's Ctrl-C reaches only the harness, which then stops
        // its children by pid.
        .process_group(0)
        .kill_on_drop(true);
    if let Some(env) = spec.env {
        cmd.env_clear();
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
    }
    if let Some(cwd) = spec.cwd {
        cmd.current_dir(cwd);
    }
    let netns = match spec.netns {
        Some(path) => Some(File::open(path).ctx(|| format!("open netns {}", path.display()))?),
        None => None,
    };
    let netns_fd = netns.as_ref().map(|f| f.as_raw_fd());
    let sandbox = match spec.sandbox {
        Some(s) => {
            s.prepare()?;
            Some(SandboxC::new(s)?)
        }
        None => None,
    };
    // SAFETY: the closure only makes async-signal-safe syscalls (prctl, setns, unshare, mount,
    // sethostname) on memory prepared before fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(fd) = netns_fd {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(s) = &sandbox {
                s.enter()?;
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .ctx(|| format!("start {}", spec.program.display()))?;
    drop(netns);
    let pid = child.id().unwrap_or(0);
    table.insert(pid);
    Ok((pid, child))
}
