//! Fetching and caching the Keycloak distribution.

use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{io, KeycloakError, DEFAULT_JAVA_HOME, VERSION};

const GROUP_ARTIFACT: &str = "org.keycloak:keycloak-quarkus-dist";
/// Pinned so that `mvn` needs no project and resolves the same plugin everywhere.
const DEPENDENCY_PLUGIN: &str = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy";
/// Build-time options baked into the cached distribution by `kc.sh build`; instances then start
/// with `--optimized` and never rewrite the shared `lib/` folder.
const BUILD_OPTIONS: &[&str] = &["--db=dev-file"];

/// An unpacked, pre-built Keycloak distribution in the cache.
#[derive(Debug, Clone)]
pub struct Distribution {
    home: PathBuf,
    java_home: PathBuf,
}

impl Distribution {
    /// The cached distribution under `~/.cache/identitymesh/keycloak/<version>/`, fetched and
    /// built first if the cache has none, run on [`DEFAULT_JAVA_HOME`].
    pub fn ensure() -> Result<Self, KeycloakError> {
        let home = std::env::var_os("HOME")
            .ok_or_else(|| KeycloakError::Fetch("HOME is not set".into()))?;
        let root = Path::new(&home)
            .join(".cache/identitymesh/keycloak")
            .join(VERSION);
        Self::ensure_in(&root, Path::new(DEFAULT_JAVA_HOME))
    }

    /// Same, with the cache at `root` and the given JDK.
    pub fn ensure_in(root: &Path, java_home: &Path) -> Result<Self, KeycloakError> {
        if !java_home.join("bin/java").is_file() {
            return Err(KeycloakError::Fetch(format!(
                "no JDK at {} (Keycloak {VERSION} needs Java 21 or later)",
                java_home.display()
            )));
        }
        std::fs::create_dir_all(root).map_err(io(format!("creating {}", root.display())))?;
        // Tests and benches may start at once; one fetches, the others wait and reuse it.
        let _lock = lock(&root.join(".lock"))?;
        let dist = Distribution {
            home: root.join("dist"),
            java_home: java_home.to_path_buf(),
        };
        let stamp = root.join("stamp");
        let want = stamp_text();
        if std::fs::read_to_string(&stamp).ok().as_deref() == Some(want.as_str())
            && dist.kc_sh().is_file()
        {
            return Ok(dist);
        }
        let _ = std::fs::remove_file(&stamp);
        fetch_and_build(root, &dist)?;
        std::fs::write(&stamp, want).map_err(io("writing the cache stamp"))?;
        Ok(dist)
    }

    /// The unpacked distribution (`bin/`, `lib/`, `conf/`, …).
    pub fn home(&self) -> &Path {
        &self.home
    }

    pub fn java_home(&self) -> &Path {
        &self.java_home
    }

    pub(crate) fn kc_sh(&self) -> PathBuf {
        self.home.join("bin/kc.sh")
    }
}

fn stamp_text() -> String {
    format!(
        "{GROUP_ARTIFACT}:{VERSION}:zip\nbuild {}\n",
        BUILD_OPTIONS.join(" ")
    )
}

/// An exclusive `flock` on `path`, released when the file is dropped.
fn lock(path: &Path) -> Result<std::fs::File, KeycloakError> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io(format!("opening {}", path.display())))?;
    // SAFETY: flock(2) on a descriptor we own for the lifetime of `f`.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io(format!("locking {}", path.display()))(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(f)
}

fn run(mut cmd: Command, what: &str) -> Result<(), KeycloakError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| KeycloakError::Fetch(format!("{what}: cannot run: {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    let tail = |b: &[u8]| {
        let s = String::from_utf8_lossy(b);
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    };
    Err(KeycloakError::Fetch(format!(
        "{what}: {}\nstdout (tail):\n{}\nstderr (tail):\n{}",
        out.status,
        tail(&out.stdout),
        tail(&out.stderr)
    )))
}

fn fetch_and_build(root: &Path, dist: &Distribution) -> Result<(), KeycloakError> {
    let download = root.join("download");
    let staging = root.join("staging");
    for d in [&download, &staging, &dist.home] {
        if d.exists() {
            std::fs::remove_dir_all(d).map_err(io(format!("removing {}", d.display())))?;
        }
    }
    // Maven Central through its own client (and its ~/.m2 cache).
    let mut mvn = Command::new("mvn");
    mvn.current_dir(root)
        .args(["-B", "-q", DEPENDENCY_PLUGIN])
        .arg(format!("-Dartifact={GROUP_ARTIFACT}:{VERSION}:zip"))
        .arg(format!("-DoutputDirectory={}", download.display()));
    run(mvn, "fetching Keycloak with mvn (is maven installed?)")?;
    let zip = download.join(format!("keycloak-quarkus-dist-{VERSION}.zip"));

    let mut unzip = Command::new("unzip");
    unzip.arg("-q").arg(&zip).arg("-d").arg(&staging);
    run(unzip, "unpacking Keycloak (is unzip installed?)")?;
    let unpacked = staging.join(format!("keycloak-{VERSION}"));

    let mut build = Command::new(unpacked.join("bin/kc.sh"));
    build
        .arg("build")
        .args(BUILD_OPTIONS)
        .env("JAVA_HOME", &dist.java_home)
        .env_remove("JAVA_OPTS")
        .env_remove("JAVA");
    run(build, "kc.sh build")?;

    std::fs::rename(&unpacked, &dist.home).map_err(io("moving the built distribution"))?;
    let _ = std::fs::remove_dir_all(&staging);
    let _ = std::fs::remove_dir_all(&download);
    Ok(())
}
