//! One Keycloak server process on loopback.
//!
//! Each instance gets a home folder of its own (`<dir>/home`): a copy of `bin/kc.sh` and links
//! to the cached distribution's `lib/`, `conf/`, `themes/` and `providers/`. Keycloak derives
//! its data folder (H2 database, transaction log, generated truststore) from the home, so
//! instances share nothing they write.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{io, Admin, Distribution, KeycloakError};

const JAVA_OPTS_APPEND: &str = "--add-opens=java.base/java.lang=ALL-UNNAMED";

/// How a Keycloak instance is started.
#[derive(Debug, Clone)]
pub struct Options {
    /// The bootstrap admin of the master realm.
    pub admin_username: String,
    pub admin_password: String,
    /// `JAVA_OPTS_KC_HEAP`; the default is kc.sh's own default outside a container.
    pub heap: String,
    /// PEM or PKCS12 files (or folders of them) Keycloak trusts for outgoing TLS, e.g. a test
    /// directory's CA for LDAPS (`--truststore-paths`).
    pub trusted_ca_files: Vec<PathBuf>,
    pub start_timeout: Duration,
    /// More `kc.sh start` options.
    pub extra_args: Vec<String>,
    /// Serve HTTPS too, on 127.0.0.1 and a free port of its own, with this certificate; the
    /// HTTP port stays (the admin client and the readiness check use it).
    pub https: Option<Https>,
}

/// A serving certificate for Keycloak's HTTPS listener (`--https-certificate-file`,
/// `--https-certificate-key-file`): PEM files, e.g. a test CA's certificate for 127.0.0.1.
#[derive(Debug, Clone)]
pub struct Https {
    pub certificate_file: PathBuf,
    pub key_file: PathBuf,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            admin_username: "admin".into(),
            admin_password: "identitymesh-test-admin".into(),
            heap: "-Xms64m -Xmx512m".into(),
            trusted_ca_files: Vec::new(),
            start_timeout: Duration::from_secs(300),
            extra_args: Vec::new(),
            https: None,
        }
    }
}

/// A running Keycloak. Stopped (its whole process group) on [`Keycloak::stop`] and on drop.
#[derive(Debug)]
pub struct Keycloak {
    child: Option<Child>,
    dir: PathBuf,
    port: u16,
    /// With [`Options::https`]: the HTTPS port.
    https_port: Option<u16>,
    options: Options,
}

fn free_port() -> Result<u16, KeycloakError> {
    crate::net::try_free_port().map_err(io("finding a free port"))
}

/// The per-instance home: kc.sh resolves the home from its own location, so it is copied, and
/// the read-only parts are links.
fn make_home(dist: &Distribution, home: &Path) -> Result<(), KeycloakError> {
    let bin = home.join("bin");
    std::fs::create_dir_all(&bin).map_err(io(format!("creating {}", bin.display())))?;
    std::fs::copy(dist.kc_sh(), bin.join("kc.sh")).map_err(io("copying kc.sh"))?;
    for part in ["lib", "conf", "themes", "providers"] {
        let link = home.join(part);
        if !link.exists() {
            std::os::unix::fs::symlink(dist.home().join(part), &link)
                .map_err(io(format!("linking {}", link.display())))?;
        }
    }
    Ok(())
}

impl Keycloak {
    /// Starts Keycloak with its home and log under `dir` (which the caller owns) and waits
    /// until the master realm answers. Retries with another port if the first was taken.
    pub async fn start(
        dist: &Distribution,
        dir: &Path,
        options: Options,
    ) -> Result<Keycloak, KeycloakError> {
        let home = dir.join("home");
        make_home(dist, &home)?;
        let tmp = dir.join("tmp");
        std::fs::create_dir_all(&tmp).map_err(io("creating the instance's tmp folder"))?;
        let mut last = String::new();
        for _attempt in 0..3 {
            let mut kc = Keycloak {
                child: None,
                dir: dir.to_path_buf(),
                port: free_port()?,
                https_port: match options.https {
                    Some(_) => Some(free_port()?),
                    None => None,
                },
                options: options.clone(),
            };
            kc.spawn(dist, &home, &tmp)?;
            match kc.wait_ready().await {
                Ok(()) => return Ok(kc),
                Err(e) => {
                    last = e.to_string();
                    kc.stop();
                    if !kc.log_tail(200).contains("Address already in use") {
                        break;
                    }
                }
            }
        }
        Err(KeycloakError::Start(last))
    }

    fn spawn(&mut self, dist: &Distribution, home: &Path, tmp: &Path) -> Result<(), KeycloakError> {
        let log = std::fs::File::create(self.log_path()).map_err(io("creating keycloak.log"))?;
        let log2 = log.try_clone().map_err(io("keycloak.log"))?;
        let mut cmd = Command::new(home.join("bin/kc.sh"));
        cmd.arg("start")
            .arg("--optimized")
            .arg("--http-enabled=true")
            .arg("--http-host=127.0.0.1")
            .arg(format!("--http-port={}", self.port))
            .arg("--hostname-strict=false")
            // No clustering: nothing listens beyond loopback or looks for peers.
            .arg("--cache=local");
        if let (Some(https), Some(port)) = (&self.options.https, self.https_port) {
            // --http-host binds the HTTPS listener too.
            cmd.arg(format!("--https-port={port}"))
                .arg(format!(
                    "--https-certificate-file={}",
                    https.certificate_file.display()
                ))
                .arg(format!(
                    "--https-certificate-key-file={}",
                    https.key_file.display()
                ));
        }
        if !self.options.trusted_ca_files.is_empty() {
            let paths: Vec<String> = self
                .options
                .trusted_ca_files
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            cmd.arg(format!("--truststore-paths={}", paths.join(",")));
        }
        cmd.args(&self.options.extra_args)
            .arg(format!("-Djava.io.tmpdir={}", tmp.display()));
        // Only what is set here: a stray KC_* or JAVA_OPTS from the shell must not change it.
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy().into_owned();
            if k.starts_with("KC_") || k.starts_with("JAVA_OPTS") || k == "JAVA" {
                cmd.env_remove(k);
            }
        }
        cmd.env("JAVA_HOME", dist.java_home())
            .env("JAVA_OPTS_KC_HEAP", &self.options.heap)
            // kc.sh does not open java.lang, which JBoss Threads' thread-local reset needs on
            // Java 24+: without it executor threads die with IllegalAccessError (Java 25 here).
            .env("JAVA_OPTS_APPEND", JAVA_OPTS_APPEND)
            .env("KC_BOOTSTRAP_ADMIN_USERNAME", &self.options.admin_username)
            .env("KC_BOOTSTRAP_ADMIN_PASSWORD", &self.options.admin_password)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        // Its own process group, so stopping it reaches the java child of kc.sh.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd
            .spawn()
            .map_err(|e| KeycloakError::Start(format!("running kc.sh: {e}")))?;
        self.child = Some(child);
        Ok(())
    }

    async fn wait_ready(&mut self) -> Result<(), KeycloakError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| KeycloakError::Start(format!("HTTP client: {e}")))?;
        let url = format!("{}/realms/master", self.base_url());
        let deadline = Instant::now() + self.options.start_timeout;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(st)) = child.try_wait() {
                    return Err(KeycloakError::Start(format!(
                        "kc.sh exited during start ({st}); log (tail):\n{}",
                        self.log_tail(40)
                    )));
                }
            }
            if let Ok(r) = http.get(&url).send().await {
                // Both listeners open together; a connect shows the HTTPS one is there too.
                let https_up = self.https_port.is_none_or(|p| {
                    std::net::TcpStream::connect_timeout(
                        &std::net::SocketAddr::from(([127, 0, 0, 1], p)),
                        Duration::from_secs(2),
                    )
                    .is_ok()
                });
                if r.status().is_success() && https_up {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(KeycloakError::Start(format!(
                    "no answer from {url} within {:?}; log (tail):\n{}",
                    self.options.start_timeout,
                    self.log_tail(40)
                )));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `https://127.0.0.1:PORT` when started with [`Options::https`].
    pub fn https_base_url(&self) -> Option<String> {
        self.https_port.map(|p| format!("https://127.0.0.1:{p}"))
    }

    /// The HTTPS port, when started with [`Options::https`].
    pub fn https_port(&self) -> Option<u16> {
        self.https_port
    }

    pub fn options(&self) -> &Options {
        &self.options
    }

    /// An admin client logged in as the bootstrap admin.
    pub fn admin(&self) -> Result<Admin, KeycloakError> {
        Admin::new(
            self.base_url(),
            &self.options.admin_username,
            &self.options.admin_password,
        )
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("keycloak.log")
    }

    /// The last `lines` lines of Keycloak's console output.
    pub fn log_tail(&self, lines: usize) -> String {
        let s = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = s.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The pid of kc.sh (also the process group id).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The java process: kc.sh's child (or kc.sh itself after it exec'ed java).
    pub fn java_pid(&self) -> Option<u32> {
        let sh = self.pid()?;
        if crate::procfs::comm(sh).as_deref() == Some("java") {
            return Some(sh);
        }
        let children = std::fs::read_to_string(format!("/proc/{sh}/task/{sh}/children")).ok()?;
        children
            .split_whitespace()
            .filter_map(|c| c.parse().ok())
            .find(|&c| crate::procfs::comm(c).as_deref() == Some("java"))
    }

    /// Peak resident memory of the java process in KiB (VmHWM), since start or since the last
    /// [`Keycloak::reset_peak_rss`].
    pub fn peak_rss_kib(&self) -> Option<u64> {
        crate::procfs::status_kib(self.java_pid()?, "VmHWM:")
    }

    pub fn rss_kib(&self) -> Option<u64> {
        crate::procfs::status_kib(self.java_pid()?, "VmRSS:")
    }

    /// Resets the java process's VmHWM to its current RSS (`clear_refs` 5), so the next
    /// [`Keycloak::peak_rss_kib`] covers only what follows.
    pub fn reset_peak_rss(&self) -> Result<(), KeycloakError> {
        let pid = self
            .java_pid()
            .ok_or_else(|| KeycloakError::Start("no java process".into()))?;
        std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
            .map_err(io(format!("resetting the peak RSS of pid {pid}")))
    }

    /// SIGTERM to the process group, SIGKILL after 30 s. Idempotent; returns whether it
    /// stopped on SIGTERM.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let Ok(pgid) = i32::try_from(child.id()) else {
            let _ = child.kill();
            let _ = child.wait();
            return false;
        };
        // SAFETY: kill(2) on the process group we created for our own child (not yet reaped,
        // so the group id cannot have been reused).
        unsafe {
            libc::kill(-pgid, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut clean = false;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                clean = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // kc.sh waits for java, but java may outlive a killed kc.sh: while any member of the
        // group lives its id stays reserved, so signalling the group reaches only our processes.
        // SAFETY: as above; kill(-pgid, 0) only probes.
        if unsafe { libc::kill(-pgid, 0) } == 0 {
            clean = false;
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        clean
    }
}

impl Drop for Keycloak {
    fn drop(&mut self) {
        self.stop();
    }
}
