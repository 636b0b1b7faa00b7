//! Relay configuration: a TOML file written by `enroll`, overridable by flags.

use crate::backoff::RetryPolicy;
use crate::endpoint::{Endpoint, ResolveOverride};
use crate::tls::Trust;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What `enroll` stores and `run` reads.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Server base URL, e.g. `https://identitymesh.example.com` (the hub path is added).
    pub server: String,
    /// The relay credential issued by the Admin API. Keep this file private.
    pub token: String,
    /// PEM file with the cluster CA. Relative paths are relative to the config file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Trust publicly trusted certificates instead of a cluster CA.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub public_roots: bool,
    /// curl-style `name:port:address` overrides (tests, split-horizon DNS).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resolve: Vec<String>,
    /// Allow `http://` / `ws://` (benchmarks on loopback only; never in production).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_insecure_http: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryFile>,
    /// Folders relay-bound CSV connectors may read (absolute paths): a connector's folder and
    /// every file it reads must resolve, symlinks followed, inside one of them. Empty (the
    /// default): this relay refuses CSV connectors. There is no default folder: the relay has
    /// no data directory of its own, the folder beside this file holds the relay credential,
    /// and which of the host's folders may be exposed is the host owner's decision.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub csv_roots: Vec<PathBuf>,
}

/// Optional retry tuning, in milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct RetryFile {
    pub base_ms: Option<u64>,
    pub cap_ms: Option<u64>,
    pub quick_max_ms: Option<u64>,
    pub auth_failure_min_ms: Option<u64>,
    pub auth_failure_cap_ms: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source} (run `identitymesh-relay enroll` first, or pass --config)")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path} is invalid: {reason}")]
    Parse { path: String, reason: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsSetupError),
}

/// Ready-to-use settings.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    pub endpoint: Endpoint,
    pub token: String,
    pub trust: Trust,
    pub resolve: Vec<ResolveOverride>,
    pub retry: RetryPolicy,
    pub keep_alive: Duration,
    pub server_timeout: Duration,
    pub connect_timeout: Duration,
}

/// Where the config lives when `--config` is not given.
pub fn default_config_path() -> PathBuf {
    if let Ok(p) = std::env::var("IDENTITYMESH_RELAY_CONFIG") {
        return PathBuf::from(p);
    }
    if cfg!(windows) {
        PathBuf::from(r"C:\ProgramData\IdentityMesh\Relay\relay.toml")
    } else {
        PathBuf::from("/var/lib/identitymesh-relay/relay.toml")
    }
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.display().to_string(),
            reason: e.to_string(),
        })
    }

    /// Writes the file readable by its owner only: it holds the credential.
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        let text = toml::to_string_pretty(self).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        write_private(path, text.as_bytes())
    }

    /// The CSV drop roots, checked: each must be an absolute path.
    pub fn drop_roots(&self) -> Result<identitymesh_connectors::roots::DropRoots, ConfigError> {
        if let Some(p) = self.csv_roots.iter().find(|p| !p.is_absolute()) {
            return Err(ConfigError::Invalid(format!(
                "csv_roots: `{}` is not an absolute path; list the folders CSV connectors may \
                 read as absolute paths",
                p.display()
            )));
        }
        Ok(crate::directory::csv_roots(&self.csv_roots))
    }

    /// Validates and resolves paths relative to `base_dir` (the config file's folder).
    pub fn settings(&self, base_dir: &Path) -> Result<RelaySettings, ConfigError> {
        self.drop_roots()?;
        let endpoint = Endpoint::parse(&self.server, self.allow_insecure_http)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if self.token.trim().is_empty() {
            return Err(ConfigError::Invalid(
                "no relay token configured: enroll with --token".into(),
            ));
        }
        let trust = match (&self.ca_file, self.public_roots) {
            (Some(ca), _) => {
                let p = if ca.is_absolute() { ca.clone() } else { base_dir.join(ca) };
                Trust::Ca(crate::tls::read_ca_file(&p)?)
            }
            (None, true) => Trust::PublicRoots,
            (None, false) if !endpoint.tls => Trust::PublicRoots,
            (None, false) => {
                return Err(ConfigError::Invalid(
                    "no CA configured: pass --ca-file with the cluster CA (or --public-roots if the server certificate is publicly trusted)".into(),
                ))
            }
        };
        let resolve = self
            .resolve
            .iter()
            .map(|s| ResolveOverride::parse(s).map_err(ConfigError::Invalid))
            .collect::<Result<_, _>>()?;
        let mut retry = RetryPolicy::default();
        if let Some(r) = &self.retry {
            let ms = Duration::from_millis;
            if let Some(v) = r.base_ms {
                retry.base = ms(v);
            }
            if let Some(v) = r.cap_ms {
                retry.cap = ms(v);
            }
            if let Some(v) = r.quick_max_ms {
                retry.quick_max = ms(v);
            }
            if let Some(v) = r.auth_failure_min_ms {
                retry.auth_failure_min = ms(v);
            }
            if let Some(v) = r.auth_failure_cap_ms {
                retry.auth_failure_cap = ms(v);
            }
        }
        Ok(RelaySettings {
            endpoint,
            token: self.token.trim().to_owned(),
            trust,
            resolve,
            retry,
            keep_alive: Duration::from_secs(15),
            server_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
        })
    }
}

pub fn write_private(path: &Path, data: &[u8]) -> Result<(), ConfigError> {
    let err = |source| ConfigError::Write {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    // Write to a temp file and rename so a crash never leaves a half-written credential.
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write as _;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp).map_err(err)?;
        f.write_all(data).map_err(err)?;
        f.sync_all().map_err(err)?;
    }
    std::fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_validation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.toml");
        let cfg = ConfigFile {
            server: "https://hub.example:8443".into(),
            token: "t0k".into(),
            public_roots: true,
            resolve: vec!["hub.example:8443:127.0.0.1".into()],
            ..Default::default()
        };
        cfg.save(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let back = ConfigFile::load(&path).unwrap();
        assert_eq!(back, cfg);
        let s = back.settings(dir.path()).unwrap();
        assert_eq!(s.endpoint.host, "hub.example");
        assert_eq!(s.endpoint.port, 8443);
        assert_eq!(s.resolve.len(), 1);

        let no_ca = ConfigFile {
            public_roots: false,
            ..cfg.clone()
        };
        let e = no_ca.settings(dir.path()).unwrap_err().to_string();
        assert!(e.contains("--ca-file"), "{e}");
        let bad_url = ConfigFile {
            server: "ftp://x".into(),
            ..cfg.clone()
        };
        assert!(bad_url.settings(dir.path()).is_err());
        let missing_ca = ConfigFile {
            ca_file: Some("nope.pem".into()),
            ..cfg
        };
        let e = missing_ca.settings(dir.path()).unwrap_err().to_string();
        assert!(e.contains("nope.pem"), "{e}");
    }

    #[test]
    fn csv_roots_are_absolute_and_default_to_none() {
        let dir = tempfile::tempdir().unwrap();
        let base = ConfigFile {
            server: "https://hub.example:8443".into(),
            token: "t0k".into(),
            public_roots: true,
            ..Default::default()
        };
        let text = toml::to_string_pretty(&base).unwrap();
        assert!(!text.contains("csv_roots"), "{text}");
        let roots = base.drop_roots().unwrap();
        assert!(roots.is_empty());
        assert!(roots.describe().contains("disabled on this relay"));

        let drop = dir.path().join("drop");
        let path = dir.path().join("relay.toml");
        std::fs::write(
            &path,
            format!(
                "server = \"https://hub.example:8443\"\ntoken = \"t0k\"\npublic_roots = true\n\
                 csv_roots = [{:?}]\n",
                drop.display().to_string()
            ),
        )
        .unwrap();
        let cfg = ConfigFile::load(&path).unwrap();
        assert_eq!(cfg.csv_roots, vec![drop.clone()]);
        assert!(cfg.settings(dir.path()).is_ok());
        std::fs::create_dir_all(drop.join("hr")).unwrap();
        assert!(cfg.drop_roots().unwrap().resolve(&drop.join("hr")).is_ok());

        let relative = ConfigFile {
            csv_roots: vec!["drop".into()],
            ..base
        };
        let e = relative.settings(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("csv_roots") && e.contains("not an absolute path"),
            "{e}"
        );
    }
}
