//! Where the control-plane tools built by `cargo xtask tools` live.
//!
//! Missing tools are an error that says to run `cargo xtask tools`; the harness never silently
//! skips.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

const VERSIONS: &str = include_str!("../controlplane/versions.env");

/// Reads `NAME=value` from controlplane/versions.env (the one source of the versions).
pub fn version(name: &str) -> &'static str {
    VERSIONS
        .lines()
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == name)
        .map(|(_, v)| v.trim())
        .unwrap_or_else(|| panic!("controlplane/versions.env has no {name}"))
}

pub fn kubernetes_version() -> &'static str {
    version("KUBERNETES")
}

/// Environment variable that overrides the tools directory (`cargo xtask test` sets it).
pub const BIN_DIR_ENV: &str = "IDENTITYMESH_K8S_BIN";

/// `~/.cache/identitymesh/k8s/<version>`: the cache root of one Kubernetes version.
pub fn cache_dir() -> PathBuf {
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home)
        .join(".cache/identitymesh/k8s")
        .join(kubernetes_version())
}

pub fn bin_dir() -> PathBuf {
    match std::env::var_os(BIN_DIR_ENV) {
        Some(dir) => PathBuf::from(dir),
        None => cache_dir().join("bin"),
    }
}

/// Paths of the tools, each checked to exist.
#[derive(Debug, Clone)]
pub struct Tools {
    pub etcd: PathBuf,
    pub kube_apiserver: PathBuf,
    pub kube_controller_manager: PathBuf,
    pub kube_scheduler: PathBuf,
    pub kubectl: PathBuf,
    pub helm: PathBuf,
}

fn tool(dir: &Path, name: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::ToolMissing {
            tool: name.to_string(),
            path,
        })
    }
}

impl Tools {
    pub fn locate() -> Result<Tools> {
        let dir = bin_dir();
        Ok(Tools {
            etcd: tool(&dir, "etcd")?,
            kube_apiserver: tool(&dir, "kube-apiserver")?,
            kube_controller_manager: tool(&dir, "kube-controller-manager")?,
            kube_scheduler: tool(&dir, "kube-scheduler")?,
            kubectl: tool(&dir, "kubectl")?,
            helm: tool(&dir, "helm")?,
        })
    }
}

/// Absolute path of `ip` (iproute2); `cargo xtask test` installs it when missing.
pub fn ip_command() -> Result<PathBuf> {
    for candidate in ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"] {
        if Path::new(candidate).is_file() {
            return Ok(PathBuf::from(candidate));
        }
    }
    Err(Error::Other(
        "`ip` (iproute2) not found: install it (`cargo xtask test` runs `apt-get install -y iproute2`)"
            .into(),
    ))
}
