//! Server configuration: a TOML file, overridden by `IM_*` environment variables, overridden by
//! command-line flags. Everything is merged into one TOML tree first and deserialized once, so an
//! unknown key or a bad value is reported the same way whatever its source, naming the key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

/// Environment variables with this prefix are configuration; anything unknown is refused.
pub const ENV_PREFIX: &str = "IM_";
/// `IM_TEST_*` variables belong to the test suites, not to the server.
const ENV_IGNORED_PREFIX: &str = "IM_TEST_";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}. Check the path passed to --config.")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config key `{key}`{origin}: {message}")]
    Key {
        key: String,
        origin: String,
        message: String,
    },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Name of this instance in the engine registry (a pod name on Kubernetes).
    #[serde(default)]
    pub instance_name: Option<String>,
    pub data_dir: PathBuf,
    #[serde(default = "default_listen", deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
    #[serde(default, deserialize_with = "opt_socket_addr")]
    pub internal_listen: Option<SocketAddr>,
    #[serde(default)]
    pub version_label: Option<String>,
    #[serde(default)]
    pub database: DatabaseConfig,
    #[serde(default)]
    pub tls: TlsConfig,
    #[serde(default)]
    pub licence: LicenceConfig,
    #[serde(default)]
    pub keyring: KeyringConfig,
    #[serde(default)]
    pub secret_provider: SecretProviderConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub engine: EngineConfig,
    #[serde(default)]
    pub hub: HubTimings,
    #[serde(default)]
    pub connectors: ConnectorsConfig,
    #[serde(default)]
    pub http: HttpLimits,
    #[serde(default)]
    pub retention: RetentionConfig,
    #[serde(default)]
    pub forwarding: ForwardingConfig,
}

/// Requests that reach an instance which is not active (a demoted or standby pod the Service
/// proxy still sends clients to) are forwarded to the fence holder, so a planned switchover
/// fails no request. Managed mode only; off unless enabled.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ForwardingConfig {
    #[serde(default, deserialize_with = "flexible_bool")]
    pub enabled: bool,
    /// The active's public URL with `{instance}` for its instance name, e.g.
    /// `https://{instance}.im-pods.prod.svc:8443` (its per-pod name through the headless Service).
    #[serde(default)]
    pub peer_url_template: Option<String>,
    /// PEM CA certificates the peer's serving certificate must chain to (on Kubernetes the
    /// cluster CA). Unset: tls.client_ca_file.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// How long a request waits for a new fence holder between a demotion and the promotion
    /// that follows it, then is answered 503 with Retry-After.
    #[serde(default = "default_hold", deserialize_with = "flexible_u64")]
    pub hold_ms: u64,
}

impl Default for ForwardingConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            peer_url_template: None,
            ca_file: None,
            hold_ms: default_hold(),
        }
    }
}

fn default_hold() -> u64 {
    5_000
}

/// How long the active keeps rows of the tables that grow with use, in days (0: for ever).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Finished runs (their counts and per-object errors).
    #[serde(default = "default_runs_days", deserialize_with = "flexible_u64")]
    pub runs_days: u64,
    /// The audit log: who changed what, identity changes with before and after. A bit over a
    /// year by default, as access reviews and audits usually look back a year.
    #[serde(default = "default_audit_days", deserialize_with = "flexible_u64")]
    pub audit_days: u64,
    /// One row per committed import page; only diagnostics read it.
    #[serde(default = "default_batches_days", deserialize_with = "flexible_u64")]
    pub import_batches_days: u64,
    /// One row per fenced commit; the fencing tests and incident analysis read it.
    #[serde(default = "default_journal_days", deserialize_with = "flexible_u64")]
    pub fence_journal_days: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            runs_days: default_runs_days(),
            audit_days: default_audit_days(),
            import_batches_days: default_batches_days(),
            fence_journal_days: default_journal_days(),
        }
    }
}

fn default_runs_days() -> u64 {
    90
}
fn default_audit_days() -> u64 {
    400
}
fn default_batches_days() -> u64 {
    30
}
fn default_journal_days() -> u64 {
    7
}

/// Limits of each HTTPS listener (the Admin API and hub, and the internal API), so slow or
/// idle clients cannot hold the server's connections.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpLimits {
    /// A client must send a request's headers within this time, and an idle HTTP/1 keep-alive
    /// connection waiting for its next request is closed after it.
    #[serde(
        default = "default_header_read_timeout",
        deserialize_with = "flexible_u64"
    )]
    pub header_read_timeout_ms: u64,
    /// The server answers a request (its response head) within this time, or answers 503.
    #[serde(default = "default_request_timeout", deserialize_with = "flexible_u64")]
    pub request_timeout_ms: u64,
    /// A connection that moves no byte either way for this long is closed (upgraded
    /// WebSockets are left to the hub's own keep-alive and timeout).
    #[serde(default = "default_idle_timeout", deserialize_with = "flexible_u64")]
    pub idle_timeout_ms: u64,
    /// Connections served at once per listener; more wait in the kernel's accept queue.
    #[serde(default = "default_max_connections", deserialize_with = "flexible_u64")]
    pub max_connections: u64,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_read_timeout_ms: default_header_read_timeout(),
            request_timeout_ms: default_request_timeout(),
            idle_timeout_ms: default_idle_timeout(),
            max_connections: default_max_connections(),
        }
    }
}

fn default_header_read_timeout() -> u64 {
    10_000
}
fn default_request_timeout() -> u64 {
    120_000
}
fn default_idle_timeout() -> u64 {
    300_000
}
fn default_max_connections() -> u64 {
    // Above 10,000 relays' WebSockets with room for the Admin API.
    16_384
}

/// Limits on what connectors running in this process may reach.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectorsConfig {
    /// The folders CSV connectors may read (a connector's folder must resolve inside one).
    /// Unset: `DATA_DIR/drop` for a standalone install (created on start), none in managed
    /// mode (where the operator mounts the drop volumes). From the environment, a list in the
    /// platform's PATH form (`/a:/b`, on Windows `C:\a;D:\b`).
    #[serde(default, deserialize_with = "opt_path_list")]
    pub csv_roots: Option<Vec<PathBuf>>,
}

/// Relay hub timings (SignalR keep-alive, client timeout, handshake timeout).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubTimings {
    #[serde(default = "default_keep_alive", deserialize_with = "flexible_u64")]
    pub keep_alive_ms: u64,
    #[serde(default = "default_client_timeout", deserialize_with = "flexible_u64")]
    pub client_timeout_ms: u64,
    #[serde(
        default = "default_handshake_timeout",
        deserialize_with = "flexible_u64"
    )]
    pub handshake_timeout_ms: u64,
}

impl Default for HubTimings {
    fn default() -> Self {
        Self {
            keep_alive_ms: default_keep_alive(),
            client_timeout_ms: default_client_timeout(),
            handshake_timeout_ms: default_handshake_timeout(),
        }
    }
}

fn default_keep_alive() -> u64 {
    15_000
}
fn default_client_timeout() -> u64 {
    30_000
}
fn default_handshake_timeout() -> u64 {
    15_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `sqlite://PATH` or an ADO.NET SQL Server connection string. Empty: SQLite under data_dir.
    #[serde(default)]
    pub connection_string: Option<String>,
    /// How long to keep retrying an unreachable database at start before giving up.
    #[serde(default = "default_connect_timeout", deserialize_with = "flexible_u64")]
    pub connect_timeout_ms: u64,
    /// Development only: lets managed mode use a `sqlite://` database, asserting that every
    /// instance runs on this one host. SQLite's WAL locks do not cross hosts, so two pods on
    /// two nodes sharing the file would both write.
    #[serde(default, deserialize_with = "flexible_bool")]
    pub sqlite_single_host: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Cluster CA: client certificates on the internal listener must chain to it.
    pub client_ca_file: Option<PathBuf>,
    /// Development only: serve plain HTTP on `listen`.
    #[serde(default, deserialize_with = "flexible_bool")]
    pub insecure_http: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LicenceConfig {
    pub file: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyringConfig {
    pub file: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SecretProviderKind {
    #[default]
    KubernetesKeyring,
    AzureKeyVault,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretProviderConfig {
    #[serde(default)]
    pub kind: SecretProviderKind,
    pub vault_url: Option<String>,
    pub tenant_id: Option<String>,
    pub client_id: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    pub bootstrap_token_file: Option<PathBuf>,
    pub oidc: Option<OidcConfig>,
    #[serde(default)]
    pub session: SessionConfig,
}

/// Browser sessions (the sealed session cookie).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SessionConfig {
    /// A session unused for this long ends (each use moves it on).
    #[serde(default = "default_session_idle", deserialize_with = "flexible_u64")]
    pub idle_timeout_ms: u64,
    /// A session ends this long after sign-in, however much it is used.
    #[serde(
        default = "default_session_absolute",
        deserialize_with = "flexible_u64"
    )]
    pub absolute_timeout_ms: u64,
    /// The cookie's `Secure` attribute. Only a standalone server serving plain HTTP
    /// (`tls.insecure_http`) on a loopback address may turn it off.
    #[serde(default = "default_true", deserialize_with = "flexible_bool")]
    pub cookie_secure: bool,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            idle_timeout_ms: default_session_idle(),
            absolute_timeout_ms: default_session_absolute(),
            cookie_secure: true,
        }
    }
}

fn default_session_idle() -> u64 {
    30 * 60 * 1000
}
fn default_session_absolute() -> u64 {
    12 * 60 * 60 * 1000
}
fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    pub issuer: String,
    pub audience: String,
    /// The provider's keys from a file or URL; neither: from the discovery document
    /// (`{issuer}/.well-known/openid-configuration`), refreshed in the background.
    pub jwks_file: Option<PathBuf>,
    pub jwks_url: Option<String>,
    /// The Admin UI's client at the provider: set, browsers sign in there (code flow, PKCE).
    pub client_id: Option<String>,
    /// A file holding the client secret of a confidential client (none: a public client).
    pub client_secret_file: Option<PathBuf>,
    /// This server's `/auth/callback` as the provider knows it (required with `client_id`).
    pub redirect_url: Option<String>,
    /// PEM certificates to trust for the issuer (discovery, keys, token endpoint) besides the
    /// public roots: a corporate provider's private CA.
    pub ca_file: Option<PathBuf>,
    #[serde(default = "default_permissions_claim")]
    pub permissions_claim: String,
    #[serde(default = "default_roles_claim")]
    pub roles_claim: String,
    #[serde(default)]
    pub role_permissions: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    #[serde(default = "default_heartbeat", deserialize_with = "flexible_u64")]
    pub heartbeat_interval_ms: u64,
    #[serde(default = "default_ttl", deserialize_with = "flexible_u64")]
    pub instance_ttl_ms: u64,
    #[serde(default = "default_drain", deserialize_with = "flexible_u64")]
    pub drain_timeout_ms: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: default_heartbeat(),
            instance_ttl_ms: default_ttl(),
            drain_timeout_ms: default_drain(),
        }
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            connection_string: None,
            connect_timeout_ms: default_connect_timeout(),
            sqlite_single_host: false,
        }
    }
}

fn default_connect_timeout() -> u64 {
    60_000
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8443))
}
fn default_heartbeat() -> u64 {
    1000
}
fn default_ttl() -> u64 {
    5000
}
fn default_drain() -> u64 {
    10_000
}
fn default_permissions_claim() -> String {
    "permissions".into()
}
fn default_roles_claim() -> String {
    "roles".into()
}

fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(|_| {
        serde::de::Error::custom(format!(
            "`{s}` is not a socket address; expected HOST:PORT with an IP host, e.g. 0.0.0.0:8443"
        ))
    })
}

fn opt_socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    socket_addr(d).map(Some)
}

/// Numbers may come from TOML (integers) or from the environment (strings).
fn flexible_u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum N {
        I(u64),
        S(String),
    }
    match N::deserialize(d).map_err(|_| {
        serde::de::Error::custom("expected a non-negative integer number of milliseconds")
    })? {
        N::I(v) => Ok(v),
        N::S(s) => s.trim().parse().map_err(|_| {
            serde::de::Error::custom(format!(
                "`{s}` is not a non-negative integer; expected milliseconds, e.g. 1000"
            ))
        }),
    }
}

/// A TOML array of paths, or a string in the platform's PATH-list form (the environment).
fn opt_path_list<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<PathBuf>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum L {
        List(Vec<PathBuf>),
        S(String),
    }
    let list = match L::deserialize(d).map_err(|_| {
        serde::de::Error::custom("expected a list of folder paths, e.g. [\"/srv/drop\"]")
    })? {
        L::List(v) => v,
        L::S(s) if s.trim().is_empty() => Vec::new(),
        L::S(s) => std::env::split_paths(&s).collect(),
    };
    if let Some(p) = list.iter().find(|p| !p.is_absolute()) {
        return Err(serde::de::Error::custom(format!(
            "`{}` is not an absolute path; list the drop roots as absolute folders",
            p.display()
        )));
    }
    Ok(Some(list))
}

fn flexible_bool<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum B {
        B(bool),
        S(String),
    }
    match B::deserialize(d).map_err(|_| serde::de::Error::custom("expected true or false"))? {
        B::B(v) => Ok(v),
        B::S(s) => match s.trim() {
            "true" | "1" => Ok(true),
            "false" | "0" => Ok(false),
            other => Err(serde::de::Error::custom(format!(
                "`{other}` is not a boolean; expected true or false"
            ))),
        },
    }
}

/// Overrides from the command line, applied last.
#[derive(Debug, Default, Clone)]
pub struct FlagOverrides {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<String>,
    pub instance_name: Option<String>,
}

/// Loads configuration from the optional file, the environment and the flags.
pub fn load(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
    flags: &FlagOverrides,
) -> Result<Config, ConfigError> {
    let mut tree = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            text.parse::<toml::Table>()
                .map_err(|e| ConfigError::Syntax {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                })?
        }
        None => toml::Table::new(),
    };
    // Remember where each overridden key came from, so errors can name the variable.
    let mut origins: BTreeMap<String, String> = BTreeMap::new();
    let mut env: Vec<(String, String)> = env.into_iter().collect();
    env.sort();
    for (var, value) in env {
        let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if var.starts_with(ENV_IGNORED_PREFIX) {
            continue;
        }
        let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
        if path.iter().any(|p| p.is_empty()) {
            return Err(ConfigError::Env {
                var,
                message: "empty key segment; use IM_SECTION__KEY, e.g. IM_TLS__CERT_FILE".into(),
            });
        }
        origins.insert(
            path.join("."),
            format!(" (from environment variable {var})"),
        );
        set_path(&mut tree, &path, toml::Value::String(value)).map_err(|message| {
            ConfigError::Env {
                var: var.clone(),
                message,
            }
        })?;
    }
    let mut set_flag = |key: &str, flag: &str, value: String| -> Result<(), ConfigError> {
        origins.insert(key.to_string(), format!(" (from flag {flag})"));
        set_path(&mut tree, &[key.to_string()], toml::Value::String(value)).map_err(|message| {
            ConfigError::Key {
                key: key.into(),
                origin: String::new(),
                message,
            }
        })
    };
    if let Some(d) = &flags.data_dir {
        set_flag("data_dir", "--data-dir", d.display().to_string())?;
    }
    if let Some(l) = &flags.listen {
        set_flag("listen", "--listen", l.clone())?;
    }
    if let Some(n) = &flags.instance_name {
        set_flag("instance_name", "--instance-name", n.clone())?;
    }
    let de = toml::Value::Table(tree);
    let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        // An unknown section is reported at the section; name the variable that created it.
        let origin = origins
            .get(&key)
            .or_else(|| {
                origins
                    .iter()
                    .find(|(k, _)| k.starts_with(&format!("{key}.")))
                    .map(|(_, v)| v)
            })
            .cloned()
            .unwrap_or_default();
        ConfigError::Key {
            key: if key == "." {
                "(top level)".into()
            } else {
                key
            },
            origin,
            message: e.into_inner().to_string(),
        }
    })?;
    config.validate()?;
    Ok(config)
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("empty key")?;
    let mut cur = table;
    for p in parents {
        let entry = cur
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{p}` is a value, not a section"))?;
    }
    cur.insert(last.clone(), value);
    Ok(())
}

impl Config {
    fn validate(&self) -> Result<(), ConfigError> {
        let key_err = |key: &str, message: &str| ConfigError::Key {
            key: key.into(),
            origin: String::new(),
            message: message.into(),
        };
        if self.engine.heartbeat_interval_ms == 0 {
            return Err(key_err(
                "engine.heartbeat_interval_ms",
                "must be at least 1 (milliseconds)",
            ));
        }
        if self.engine.instance_ttl_ms <= self.engine.heartbeat_interval_ms {
            return Err(key_err(
                "engine.instance_ttl_ms",
                "must be longer than engine.heartbeat_interval_ms, or live instances vanish",
            ));
        }
        if self.hub.client_timeout_ms <= self.hub.keep_alive_ms {
            return Err(key_err(
                "hub.client_timeout_ms",
                "must be longer than hub.keep_alive_ms (clients time out otherwise); SignalR uses 2x",
            ));
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return Err(key_err(
                "tls.cert_file",
                "tls.cert_file and tls.key_file must be set together",
            ));
        }
        if let Some(oidc) = &self.auth.oidc {
            if oidc.jwks_file.is_some() && oidc.jwks_url.is_some() {
                return Err(key_err(
                    "auth.oidc.jwks_file",
                    "set at most one of auth.oidc.jwks_file and auth.oidc.jwks_url \
                     (neither: the keys come from the issuer's discovery document)",
                ));
            }
            if oidc.client_id.is_some() {
                match oidc.redirect_url.as_deref() {
                    None | Some("") => {
                        return Err(key_err(
                            "auth.oidc.redirect_url",
                            "required with auth.oidc.client_id: this server's /auth/callback URL \
                             as registered at the provider, e.g. https://im.contoso.local/auth/callback",
                        ))
                    }
                    Some(u) if !(u.starts_with("https://") || u.starts_with("http://")) => {
                        return Err(key_err(
                            "auth.oidc.redirect_url",
                            "must be an absolute http(s) URL ending in /auth/callback",
                        ))
                    }
                    Some(_) => {}
                }
            } else if oidc.client_secret_file.is_some() || oidc.redirect_url.is_some() {
                return Err(key_err(
                    "auth.oidc.client_id",
                    "auth.oidc.client_secret_file and redirect_url belong to the UI client: set client_id too",
                ));
            }
        }
        let sc = &self.auth.session;
        if sc.idle_timeout_ms < 60_000 {
            return Err(key_err(
                "auth.session.idle_timeout_ms",
                "must be at least 60000 (one minute)",
            ));
        }
        if sc.absolute_timeout_ms < sc.idle_timeout_ms {
            return Err(key_err(
                "auth.session.absolute_timeout_ms",
                "must be at least auth.session.idle_timeout_ms",
            ));
        }
        let plain_loopback = self.tls.insecure_http && self.listen.ip().is_loopback();
        if !sc.cookie_secure && !plain_loopback {
            return Err(key_err(
                "auth.session.cookie_secure",
                "may be false only with tls.insecure_http = true on a loopback listen address \
                 (browsers send a Secure cookie only over HTTPS, except to localhost)",
            ));
        }
        let r = &self.retention;
        for (key, v) in [
            ("retention.runs_days", r.runs_days),
            ("retention.audit_days", r.audit_days),
            ("retention.import_batches_days", r.import_batches_days),
            ("retention.fence_journal_days", r.fence_journal_days),
        ] {
            if v > 36_500 {
                return Err(key_err(
                    key,
                    "must be at most 36500 days (0 keeps rows for ever)",
                ));
            }
        }
        let h = &self.http;
        for (key, v) in [
            ("http.header_read_timeout_ms", h.header_read_timeout_ms),
            ("http.request_timeout_ms", h.request_timeout_ms),
            ("http.idle_timeout_ms", h.idle_timeout_ms),
        ] {
            if v < 100 {
                return Err(key_err(key, "must be at least 100 (milliseconds)"));
            }
        }
        if h.max_connections == 0 {
            return Err(key_err("http.max_connections", "must be at least 1"));
        }
        if h.request_timeout_ms <= self.engine.drain_timeout_ms {
            return Err(key_err(
                "http.request_timeout_ms",
                "must be longer than engine.drain_timeout_ms: a demotion request waits for the drain",
            ));
        }
        self.validate_forwarding()?;
        if self.secret_provider.kind == SecretProviderKind::AzureKeyVault
            && self.secret_provider.vault_url.is_none()
        {
            return Err(key_err(
                "secret_provider.vault_url",
                "required when secret_provider.kind = \"azure_key_vault\"",
            ));
        }
        Ok(())
    }

    fn validate_forwarding(&self) -> Result<(), ConfigError> {
        let key_err = |key: &str, message: String| ConfigError::Key {
            key: key.into(),
            origin: String::new(),
            message,
        };
        let f = &self.forwarding;
        // Unused while forwarding is off, so checked only then.
        if !f.enabled {
            return Ok(());
        }
        if f.hold_ms >= self.http.request_timeout_ms {
            return Err(key_err(
                "forwarding.hold_ms",
                format!(
                    "must be shorter than http.request_timeout_ms ({} ms): a held request is \
                     still answered within the request bound",
                    self.http.request_timeout_ms
                ),
            ));
        }
        let Some(template) = f
            .peer_url_template
            .as_deref()
            .filter(|t| !t.trim().is_empty())
        else {
            return Err(key_err(
                "forwarding.peer_url_template",
                "required with forwarding.enabled: the active's URL with {instance} for its name, \
                 e.g. https://{instance}.im-pods.prod.svc:8443"
                    .into(),
            ));
        };
        if let Err(m) = crate::forward::target::check_template(template) {
            return Err(key_err("forwarding.peer_url_template", m));
        }
        if f.ca_file.is_none() && self.tls.client_ca_file.is_none() {
            return Err(key_err(
                "forwarding.ca_file",
                "required with forwarding.enabled (or tls.client_ca_file): the CA that signs the \
                 peer's serving certificate, on Kubernetes the cluster CA"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The CA that verifies the peer a request is forwarded to.
    pub fn forwarding_ca_file(&self) -> Option<&Path> {
        self.forwarding
            .ca_file
            .as_deref()
            .or(self.tls.client_ca_file.as_deref())
    }

    /// The registry name of this instance: configured, else the pod or host name.
    pub fn instance_name(&self) -> String {
        self.instance_name
            .clone()
            .or_else(|| std::env::var("POD_NAME").ok())
            .unwrap_or_else(host_name)
    }

    pub fn version(&self) -> String {
        self.version_label
            .clone()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_string())
    }
}

pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn write(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    #[test]
    fn retention_has_defaults_and_a_bound() {
        let base = ("IM_DATA_DIR", "/d");
        let c = load(None, env(&[base]), &FlagOverrides::default()).unwrap();
        assert_eq!(c.retention, RetentionConfig::default());
        assert_eq!(c.retention.audit_days, 400);
        let c = load(
            None,
            env(&[base, ("IM_RETENTION__AUDIT_DAYS", "0")]),
            &FlagOverrides::default(),
        )
        .unwrap();
        assert_eq!(c.retention.audit_days, 0);
        let e = load(
            None,
            env(&[base, ("IM_RETENTION__RUNS_DAYS", "99999")]),
            &FlagOverrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("retention.runs_days"), "{e}");
    }

    #[test]
    fn http_limits_have_defaults_and_refuse_nonsense() {
        let base = [("IM_DATA_DIR", "/d")];
        let c = load(None, env(&base), &FlagOverrides::default()).unwrap();
        assert_eq!(c.http.header_read_timeout_ms, 10_000);
        assert_eq!(c.http.max_connections, 16_384);
        for (k, v, key) in [
            (
                "IM_HTTP__HEADER_READ_TIMEOUT_MS",
                "0",
                "http.header_read_timeout_ms",
            ),
            ("IM_HTTP__MAX_CONNECTIONS", "0", "http.max_connections"),
            (
                "IM_HTTP__REQUEST_TIMEOUT_MS",
                "100",
                "http.request_timeout_ms",
            ),
        ] {
            let e = load(None, env(&[base[0], (k, v)]), &FlagOverrides::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{k}={v}: {e}");
        }
    }

    #[test]
    fn flags_override_env_override_file() {
        let f = write(
            "data_dir = \"/file\"\nlisten = \"127.0.0.1:1\"\n[engine]\ndrain_timeout_ms = 5\n",
        );
        let c = load(Some(f.path()), env(&[]), &FlagOverrides::default()).unwrap();
        assert_eq!(c.listen.port(), 1);
        assert_eq!(c.engine.drain_timeout_ms, 5);
        let c = load(
            Some(f.path()),
            env(&[
                ("IM_LISTEN", "127.0.0.1:2"),
                ("IM_ENGINE__DRAIN_TIMEOUT_MS", "7"),
            ]),
            &FlagOverrides::default(),
        )
        .unwrap();
        assert_eq!(c.listen.port(), 2);
        assert_eq!(c.engine.drain_timeout_ms, 7);
        let flags = FlagOverrides {
            listen: Some("127.0.0.1:3".into()),
            ..Default::default()
        };
        let c = load(Some(f.path()), env(&[("IM_LISTEN", "127.0.0.1:2")]), &flags).unwrap();
        assert_eq!(c.listen.port(), 3);
        assert_eq!(c.data_dir, PathBuf::from("/file"));
    }

    #[test]
    fn unknown_file_key_is_named() {
        let f = write("data_dir = \"/d\"\n[engine]\nheartbeat_ms = 5\n");
        let e = load(Some(f.path()), env(&[]), &FlagOverrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("engine"), "{e}");
        assert!(e.contains("heartbeat_ms"), "{e}");
    }

    #[test]
    fn unknown_env_var_is_named() {
        let e = load(
            None,
            env(&[("IM_DATA_DIR", "/d"), ("IM_TSL__CERT_FILE", "/x")]),
            &FlagOverrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("tsl"), "{e}");
        assert!(e.contains("IM_TSL__CERT_FILE"), "{e}");
    }

    #[test]
    fn bad_values_name_key_and_form() {
        let e = load(
            None,
            env(&[
                ("IM_DATA_DIR", "/d"),
                ("IM_ENGINE__DRAIN_TIMEOUT_MS", "ten"),
            ]),
            &FlagOverrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("engine.drain_timeout_ms"), "{e}");
        assert!(e.contains("milliseconds"), "{e}");
        let e = load(
            None,
            env(&[("IM_DATA_DIR", "/d")]),
            &FlagOverrides {
                listen: Some("localhost".into()),
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("listen") && e.contains("HOST:PORT") && e.contains("--listen"),
            "{e}"
        );
        let e = load(None, env(&[]), &FlagOverrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("data_dir"), "{e}");
    }

    #[test]
    fn test_variables_are_not_config() {
        let c = load(
            None,
            env(&[("IM_DATA_DIR", "/d"), ("IM_TEST_MSSQL", "Server=x")]),
            &FlagOverrides::default(),
        )
        .unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/d"));
    }

    #[test]
    fn cross_field_rules() {
        let e = load(
            None,
            env(&[("IM_DATA_DIR", "/d"), ("IM_TLS__CERT_FILE", "/c")]),
            &FlagOverrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("key_file"), "{e}");
        let e = load(
            None,
            env(&[
                ("IM_DATA_DIR", "/d"),
                ("IM_ENGINE__HEARTBEAT_INTERVAL_MS", "1000"),
                ("IM_ENGINE__INSTANCE_TTL_MS", "500"),
            ]),
            &FlagOverrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("instance_ttl_ms"), "{e}");
    }

    #[test]
    fn session_lifetimes_and_secure_cookie_rule() {
        let base = ("IM_DATA_DIR", "/d");
        let c = load(None, env(&[base]), &FlagOverrides::default()).unwrap();
        assert_eq!(c.auth.session, SessionConfig::default());
        assert_eq!(c.auth.session.idle_timeout_ms, 1_800_000);
        assert_eq!(c.auth.session.absolute_timeout_ms, 43_200_000);
        assert!(c.auth.session.cookie_secure);
        let err = |pairs: &[(&str, &str)]| {
            load(None, env(pairs), &FlagOverrides::default())
                .unwrap_err()
                .to_string()
        };
        let e = err(&[base, ("IM_AUTH__SESSION__IDLE_TIMEOUT_MS", "10")]);
        assert!(e.contains("auth.session.idle_timeout_ms"), "{e}");
        let e = err(&[
            base,
            ("IM_AUTH__SESSION__IDLE_TIMEOUT_MS", "7200000"),
            ("IM_AUTH__SESSION__ABSOLUTE_TIMEOUT_MS", "3600000"),
        ]);
        assert!(e.contains("absolute_timeout_ms"), "{e}");
        let off = ("IM_AUTH__SESSION__COOKIE_SECURE", "false");
        let e = err(&[base, off]);
        assert!(e.contains("insecure_http"), "{e}");
        let e = err(&[base, off, ("IM_TLS__INSECURE_HTTP", "true")]);
        assert!(e.contains("loopback"), "{e}");
        let c = load(
            None,
            env(&[
                base,
                off,
                ("IM_TLS__INSECURE_HTTP", "true"),
                ("IM_LISTEN", "127.0.0.1:8080"),
            ]),
            &FlagOverrides::default(),
        )
        .unwrap();
        assert!(!c.auth.session.cookie_secure);
    }

    #[test]
    fn oidc_sign_in_settings() {
        let base = [
            ("IM_DATA_DIR", "/d"),
            ("IM_AUTH__OIDC__ISSUER", "https://login.test/realms/x"),
            ("IM_AUTH__OIDC__AUDIENCE", "identitymesh"),
        ];
        let ok = |extra: &[(&str, &str)]| {
            let all: Vec<_> = base.iter().chain(extra).copied().collect();
            load(None, env(&all), &FlagOverrides::default())
        };
        // Neither jwks_file nor jwks_url: the keys come from discovery.
        let c = ok(&[]).unwrap();
        assert!(c.auth.oidc.unwrap().jwks_url.is_none());
        let e = ok(&[
            ("IM_AUTH__OIDC__JWKS_FILE", "/j"),
            ("IM_AUTH__OIDC__JWKS_URL", "https://x/j"),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("at most one"), "{e}");
        let e = ok(&[("IM_AUTH__OIDC__CLIENT_ID", "im-ui")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("auth.oidc.redirect_url") && e.contains("/auth/callback"),
            "{e}"
        );
        let e = ok(&[
            ("IM_AUTH__OIDC__CLIENT_ID", "im-ui"),
            ("IM_AUTH__OIDC__REDIRECT_URL", "im.test/auth/callback"),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("absolute"), "{e}");
        let e = ok(&[("IM_AUTH__OIDC__CLIENT_SECRET_FILE", "/s")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("auth.oidc.client_id"), "{e}");
        let c = ok(&[
            ("IM_AUTH__OIDC__CLIENT_ID", "im-ui"),
            ("IM_AUTH__OIDC__CLIENT_SECRET_FILE", "/run/secrets/oidc"),
            (
                "IM_AUTH__OIDC__REDIRECT_URL",
                "https://im.test/auth/callback",
            ),
        ])
        .unwrap();
        assert_eq!(c.auth.oidc.unwrap().client_id.as_deref(), Some("im-ui"));
    }

    #[test]
    fn forwarding_is_off_by_default_and_every_key_is_checked() {
        let base = ("IM_DATA_DIR", "/d");
        let c = load(None, env(&[base]), &FlagOverrides::default()).unwrap();
        assert_eq!(c.forwarding, ForwardingConfig::default());
        assert!(!c.forwarding.enabled);
        assert_eq!(c.forwarding.hold_ms, 5_000);
        let on = ("IM_FORWARDING__ENABLED", "true");
        let tmpl = (
            "IM_FORWARDING__PEER_URL_TEMPLATE",
            "https://{instance}.im-pods.prod.svc:8443",
        );
        let err = |pairs: &[(&str, &str)]| {
            load(None, env(pairs), &FlagOverrides::default())
                .unwrap_err()
                .to_string()
        };
        let e = err(&[base, on]);
        assert!(
            e.contains("forwarding.peer_url_template") && e.contains("{instance}"),
            "{e}"
        );
        let e = err(&[
            base,
            on,
            ("IM_FORWARDING__PEER_URL_TEMPLATE", "https://im:8443"),
        ]);
        assert!(e.contains("exactly once"), "{e}");
        let e = err(&[base, on, tmpl]);
        assert!(
            e.contains("forwarding.ca_file") && e.contains("cluster CA"),
            "{e}"
        );
        let ca = ("IM_FORWARDING__CA_FILE", "/ca/ca.crt");
        let e = err(&[base, on, tmpl, ca, ("IM_FORWARDING__HOLD_MS", "200000")]);
        assert!(
            e.contains("forwarding.hold_ms") && e.contains("request_timeout_ms"),
            "{e}"
        );
        // Off, the hold is not used, so a short request bound elsewhere is no conflict.
        load(
            None,
            env(&[
                base,
                ("IM_HTTP__REQUEST_TIMEOUT_MS", "700"),
                ("IM_ENGINE__DRAIN_TIMEOUT_MS", "200"),
            ]),
            &FlagOverrides::default(),
        )
        .unwrap();
        let e = err(&[base, ("IM_FORWARDING__HOLD_MS", "soon")]);
        assert!(
            e.contains("forwarding.hold_ms") && e.contains("milliseconds"),
            "{e}"
        );
        let e = err(&[base, ("IM_FORWARDING__PEERS", "x")]);
        assert!(e.contains("peers"), "{e}");
        // The CA defaults to the cluster CA the internal listener already trusts.
        let c = load(
            None,
            env(&[base, on, tmpl, ("IM_TLS__CLIENT_CA_FILE", "/ca/ca.crt")]),
            &FlagOverrides::default(),
        )
        .unwrap();
        assert_eq!(c.forwarding_ca_file(), Some(Path::new("/ca/ca.crt")));
        let c = load(
            None,
            env(&[
                base,
                on,
                tmpl,
                ("IM_TLS__CLIENT_CA_FILE", "/ca/ca.crt"),
                ("IM_FORWARDING__CA_FILE", "/peer/ca.crt"),
                ("IM_FORWARDING__HOLD_MS", "0"),
            ]),
            &FlagOverrides::default(),
        )
        .unwrap();
        assert_eq!(c.forwarding_ca_file(), Some(Path::new("/peer/ca.crt")));
        assert_eq!(c.forwarding.hold_ms, 0);
        assert!(c.forwarding.enabled);
    }

    #[test]
    fn syntax_error_names_file() {
        let f = write("data_dir = \n");
        let e = load(Some(f.path()), env(&[]), &FlagOverrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("not valid TOML"), "{e}");
    }
}
