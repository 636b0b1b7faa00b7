//! Process wiring for both modes: open the store, load TLS and the licence, set up auth, start
//! the engine and the listeners, and drain on SIGTERM / Ctrl-C.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::{self, AppState};
use crate::auth::{self, Authenticator};
use crate::config::Config;
use crate::engine::Engine;
use crate::serve::{serve, Transport};
use crate::store::{self, Backend, Role, Store, StoreError};
use crate::tls::{self, TlsState};
use crate::{fsutil, licence, logging};
use identitymesh_connectors::roots::DropRoots;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One host, static active role, embedded SQLite by default.
    Standalone,
    /// A pod: standby until the operator promotes it.
    Managed,
}

const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
const TLS_POLL: Duration = Duration::from_secs(2);

/// Runs until `stop` completes (a signal, or a Windows service stop request), then drains.
pub async fn run(
    mode: Mode,
    cfg: Config,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("cannot create data_dir {}", cfg.data_dir.display()))?;
    logging::init(&cfg.data_dir.join("logs"))
        .with_context(|| format!("cannot write logs under {}", cfg.data_dir.display()))?;
    let instance = cfg.instance_name();
    let version = cfg.version();
    tracing::info!(?mode, %instance, %version, data_dir = %cfg.data_dir.display(), "starting identitymesh-server");

    let backend = backend(mode, &cfg)?;
    let store = open_store(
        &backend,
        Duration::from_millis(cfg.database.connect_timeout_ms),
    )
    .await?;

    let transport = transport(mode, &cfg)?;
    let licence_file = licence_file(mode, &cfg)?;
    let bootstrap_hash = bootstrap_token(mode, &cfg, store.as_ref()).await?;
    let auth = Authenticator::new(bootstrap_hash, cfg.auth.oidc.clone())
        .await
        .context("auth.oidc")?;

    let engine = Engine::new(
        store.clone(),
        instance.clone(),
        crate::config::host_name(),
        version,
        cfg.engine.clone(),
    );
    if mode == Mode::Standalone {
        // A standalone install is the only instance: it takes the next epoch for itself.
        let next = store.fence().await?.epoch + 1;
        engine.promote(next, "standalone").await?;
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let engine_task = tokio::spawn(engine.clone().run(stop_rx.clone()));

    let hub_config = identitymesh_signalr::hub::HubConfig {
        keep_alive_interval: Duration::from_millis(cfg.hub.keep_alive_ms),
        client_timeout: Duration::from_millis(cfg.hub.client_timeout_ms),
        handshake_timeout: Duration::from_millis(cfg.hub.handshake_timeout_ms),
        ..Default::default()
    };
    let (hub_routes, hub, hub_task) =
        crate::hub::start(engine.clone(), hub_config, stop_rx.clone());
    let ring = load_keyring(mode, &cfg)?;
    let sessions = sessions(mode, &cfg, &ring)?;
    let secrets = crate::secrets::Secrets::new(store.clone(), ring);
    let csv_roots = csv_roots(mode, &cfg)?;
    tracing::info!(roots = %csv_roots.describe(), "CSV drop roots");
    let sync =
        crate::sync::runner::SyncEngine::new(engine.clone(), secrets, Some(hub.clone()), csv_roots);
    let retention_task = tokio::spawn(crate::sync::retention::run_loop(
        engine.clone(),
        cfg.retention.clone(),
        engine.subscribe(),
        stop_rx.clone(),
    ));
    let schedule_task = tokio::spawn(crate::sync::schedule::run_loop(
        sync.clone(),
        engine.subscribe(),
        stop_rx.clone(),
    ));
    let state = AppState {
        engine: engine.clone(),
        auth,
        licence_file,
        hub: Some(hub),
        sync: Some(sync),
        sessions: Some(sessions),
    };
    let mut public_routes = api::router(state.clone()).merge(hub_routes);
    if let Some(fw) = forwarder(mode, &cfg, &engine)? {
        public_routes = public_routes.layer(axum::middleware::from_fn_with_state(
            fw,
            crate::forward::layer,
        ));
    }
    let public = bind(cfg.listen).await?;
    tracing::info!(addr = %public.local_addr()?, tls = !matches!(transport, Transport::Plain), "Admin API listening");
    let mut servers = vec![tokio::spawn(serve(
        public,
        transport.clone(),
        public_routes,
        stop_rx.clone(),
        SHUTDOWN_GRACE,
        cfg.http.clone(),
    ))];
    if let Some(addr) = internal_addr(mode, &cfg) {
        let Transport::Tls(tls) = &transport else {
            bail!("the internal API needs TLS: configure tls.cert_file and tls.key_file");
        };
        if tls.internal().is_none() {
            bail!(
                "the internal API needs tls.client_ca_file (IM_TLS__CLIENT_CA_FILE): the cluster CA \
                 that signs the operator's client certificate"
            );
        }
        let l = bind(addr).await?;
        tracing::info!(addr = %l.local_addr()?, "internal API listening (mTLS)");
        servers.push(tokio::spawn(serve(
            l,
            Transport::MutualTls(tls.clone()),
            api::internal_router(state.clone()),
            stop_rx.clone(),
            SHUTDOWN_GRACE,
            cfg.http.clone(),
        )));
    }

    stop.await;
    tracing::info!("shutdown requested; draining");
    if engine.status().role == Role::Active {
        let out = engine.demote("shutdown", "process stopping").await;
        tracing::info!(drained = out.drained, "engine stopped");
    }
    let _ = stop_tx.send(true);
    for s in servers {
        let _ = s.await;
    }
    let _ = hub_task.await;
    let _ = engine_task.await;
    let _ = schedule_task.await;
    let _ = retention_task.await;
    tracing::info!("shutdown complete");
    Ok(())
}

/// Forwarding to the active instance (managed mode, when enabled). A standalone server is
/// always the active one, so there is nobody to forward to.
fn forwarder(
    mode: Mode,
    cfg: &Config,
    engine: &Arc<Engine>,
) -> anyhow::Result<Option<Arc<crate::forward::Forwarder>>> {
    if !cfg.forwarding.enabled {
        return Ok(None);
    }
    if mode == Mode::Standalone {
        bail!(
            "forwarding.enabled is for managed mode: a standalone server is always the active \
             instance and has no peer to forward to; remove the [forwarding] section \
             (IM_FORWARDING__ENABLED)"
        );
    }
    let ca = cfg
        .forwarding_ca_file()
        .context("forwarding.ca_file is required with forwarding.enabled")?;
    let fw =
        crate::forward::Forwarder::new(engine.clone(), &cfg.forwarding, ca, cfg.tls.insecure_http)?;
    tracing::info!(
        template = cfg
            .forwarding
            .peer_url_template
            .as_deref()
            .unwrap_or_default(),
        hold_ms = cfg.forwarding.hold_ms,
        "forwarding requests that reach this instance while it is not active"
    );
    Ok(Some(fw))
}

/// The configured database; a standalone install defaults to SQLite in its data directory.
fn backend(mode: Mode, cfg: &Config) -> anyhow::Result<Backend> {
    Ok(match &cfg.database.connection_string {
        Some(cs) if !cs.trim().is_empty() => {
            let b = store::parse_connection_string(cs)
                .context("database.connection_string (IM_DATABASE__CONNECTION_STRING)")?;
            if mode == Mode::Managed
                && matches!(b, Backend::Sqlite(_))
                && !cfg.database.sqlite_single_host
            {
                bail!(
                    "database.connection_string is a sqlite:// database, which managed mode refuses: pods on \
                     different nodes cannot share a SQLite file safely (its locks do not cross hosts), so \
                     two instances could both write. Use SQL Server, or for development with every \
                     instance on one host set database.sqlite_single_host = true \
                     (IM_DATABASE__SQLITE_SINGLE_HOST=true)"
                );
            }
            b
        }
        _ if mode == Mode::Managed => bail!(
            "database.connection_string is required in managed mode; both pods must share one database \
             (set IM_DATABASE__CONNECTION_STRING from the database Secret)"
        ),
        _ => Backend::Sqlite(cfg.data_dir.join("identitymesh.db")),
    })
}

/// Where CSV connectors may read: the configured roots, else `DATA_DIR/drop` (created) for a
/// standalone install and none in managed mode (the operator mounts drop volumes and lists them).
fn csv_roots(mode: Mode, cfg: &Config) -> anyhow::Result<DropRoots> {
    let roots = match (&cfg.connectors.csv_roots, mode) {
        (Some(r), _) => r.clone(),
        (None, Mode::Standalone) => {
            let drop = cfg.data_dir.join("drop");
            std::fs::create_dir_all(&drop)
                .with_context(|| format!("cannot create the CSV drop folder {}", drop.display()))?;
            vec![drop]
        }
        (None, Mode::Managed) => Vec::new(),
    };
    Ok(DropRoots::new(&roots))
}

/// Browser sessions, sealed with the key ring's cookie keys. The cookie's `Secure` attribute may
/// be off only for a standalone server on plain HTTP and loopback (the config check covers the
/// rest).
fn sessions(
    mode: Mode,
    cfg: &Config,
    ring: &identitymesh_keyring::KeyRing,
) -> anyhow::Result<Arc<crate::session::Sessions>> {
    let sc = &cfg.auth.session;
    if !sc.cookie_secure && mode != Mode::Standalone {
        bail!("auth.session.cookie_secure = false is for a standalone server on loopback only");
    }
    let s = crate::session::Sessions::new(
        ring,
        (sc.idle_timeout_ms / 1000) as i64,
        (sc.absolute_timeout_ms / 1000) as i64,
        sc.cookie_secure,
    )?;
    Ok(Arc::new(s))
}

/// The database and key ring, for the `secrets` command (no listeners, no engine).
pub async fn open_secrets(mode: Mode, cfg: &Config) -> anyhow::Result<crate::secrets::Secrets> {
    let backend = backend(mode, cfg)?;
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("cannot create data_dir {}", cfg.data_dir.display()))?;
    let store = open_store(
        &backend,
        Duration::from_millis(cfg.database.connect_timeout_ms),
    )
    .await?;
    Ok(crate::secrets::Secrets::new(
        store,
        load_keyring(mode, cfg)?,
    ))
}

/// The key ring that seals connector secrets: the mounted file, or for a standalone install
/// `keyring.json` in the data directory (created on first start).
pub fn load_keyring(mode: Mode, cfg: &Config) -> anyhow::Result<identitymesh_keyring::KeyRing> {
    let standalone = mode == Mode::Standalone;
    match crate::secrets::keyring_path(cfg.keyring.file.as_deref(), &cfg.data_dir, standalone) {
        Some(path) => crate::secrets::load_keyring(&path, standalone && cfg.keyring.file.is_none()),
        None => bail!(
            "keyring.file is required in managed mode (IM_KEYRING__FILE): the keyring.json both pods mount \
             from the key ring Secret"
        ),
    }
}

async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on {addr}; is another process using it? Pick another with --listen / IM_LISTEN")
    })
}

pub async fn open_store(backend: &Backend, patience: Duration) -> anyhow::Result<Arc<dyn Store>> {
    let what = match backend {
        Backend::Sqlite(p) => format!("SQLite at {}", p.display()),
        // Never log the connection string: it carries the password.
        Backend::SqlServer(_) => "SQL Server".to_string(),
    };
    let mut delay = Duration::from_millis(250);
    let deadline = tokio::time::Instant::now() + patience;
    for attempt in 1.. {
        match store::open(backend).await {
            Ok(s) => {
                let applied = s.migrate().await.context("applying schema migrations")?;
                tracing::info!(store = %what, ?applied, "database ready");
                return Ok(s);
            }
            Err(e @ StoreError::Unavailable(_))
                if tokio::time::Instant::now() + delay < deadline =>
            {
                tracing::warn!(store = %what, attempt, error = %e, "database not reachable yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            Err(e) => return Err(e).with_context(|| format!("cannot open {what}")),
        }
    }
    unreachable!("the loop returns")
}

fn transport(mode: Mode, cfg: &Config) -> anyhow::Result<Transport> {
    if cfg.tls.insecure_http {
        tracing::warn!("tls.insecure_http is set: serving plain HTTP (development only)");
        return Ok(Transport::Plain);
    }
    let (cert, key) = match (&cfg.tls.cert_file, &cfg.tls.key_file) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        _ if mode == Mode::Standalone => {
            let names = vec![
                "localhost".to_string(),
                "127.0.0.1".to_string(),
                crate::config::host_name(),
            ];
            let (c, k) = tls::ensure_dev_cert(&cfg.data_dir.join("tls"), &names)?;
            tracing::warn!(cert = %c.display(), "no certificate configured; using a self-signed development certificate");
            (c, k)
        }
        _ => bail!(
            "managed mode needs tls.cert_file and tls.key_file (IM_TLS__CERT_FILE, IM_TLS__KEY_FILE)"
        ),
    };
    let state = TlsState::load(&cert, &key, cfg.tls.client_ca_file.as_deref())?;
    state.spawn_watcher(TLS_POLL);
    Ok(Transport::Tls(state))
}

fn internal_addr(mode: Mode, cfg: &Config) -> Option<SocketAddr> {
    cfg.internal_listen.or(match mode {
        Mode::Managed => Some(SocketAddr::from(([0, 0, 0, 0], 9443))),
        Mode::Standalone => None,
    })
}

fn licence_file(mode: Mode, cfg: &Config) -> anyhow::Result<Option<PathBuf>> {
    if let Some(f) = &cfg.licence.file {
        return Ok(Some(f.clone()));
    }
    if mode == Mode::Managed {
        tracing::warn!("no licence.file configured: the instance will report not ready");
        return Ok(None);
    }
    let f = cfg.data_dir.join("licence.json");
    if !f.exists() {
        let l = licence::evaluation(chrono::Utc::now());
        std::fs::write(&f, serde_json::to_vec_pretty(&l)?)
            .with_context(|| format!("cannot write {}", f.display()))?;
        tracing::warn!(file = %f.display(), expires = %l.expires, "no licence configured; wrote a 90-day evaluation licence");
    }
    Ok(Some(f))
}

/// Loads (or, in standalone mode, creates) the bootstrap admin token and stores its hash.
async fn bootstrap_token(
    mode: Mode,
    cfg: &Config,
    store: &dyn Store,
) -> anyhow::Result<Option<String>> {
    let path = match (&cfg.auth.bootstrap_token_file, mode) {
        (Some(p), _) => p.clone(),
        (None, Mode::Standalone) => cfg.data_dir.join("admin.token"),
        (None, Mode::Managed) => return Ok(None),
    };
    let token = match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
        Ok(_) | Err(_) if mode == Mode::Standalone => {
            let t = auth::new_bootstrap_token();
            fsutil::write_private(&path, format!("{t}\n").as_bytes())
                .with_context(|| format!("cannot write {}", path.display()))?;
            t
        }
        Ok(_) => bail!("bootstrap token file {} is empty", path.display()),
        Err(e) => bail!("cannot read bootstrap token file {}: {e}", path.display()),
    };
    let hash = auth::hash_token(&token);
    store
        .set_token_hash(auth::BOOTSTRAP_TOKEN_NAME, &hash, store::now_ms())
        .await?;
    print_token_path(&path);
    Ok(Some(hash))
}

fn print_token_path(path: &Path) {
    // Printed (not only logged) so the first-run user sees where the token is; never the token.
    println!("admin token: {}", path.display());
    tracing::info!(file = %path.display(), "bootstrap admin token file");
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = tokio::signal::ctrl_c() => {},
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load, FlagOverrides};

    fn cfg(env: &[(&str, &str)]) -> Config {
        let env: Vec<(String, String)> = [("IM_DATA_DIR", "/var/lib/im")]
            .iter()
            .chain(env)
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        load(None, env, &FlagOverrides::default()).unwrap()
    }

    #[tokio::test]
    async fn forwarding_is_refused_standalone_and_checks_its_ca_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("im.db");
        let store = crate::store::open(&Backend::Sqlite(db)).await.unwrap();
        store.migrate().await.unwrap();
        let engine = Engine::new(
            store,
            "im-a".into(),
            "h".into(),
            "v".into(),
            Default::default(),
        );
        let ca = dir.path().join("ca.crt");
        let ca_s = ca.display().to_string();
        let on = [
            ("IM_FORWARDING__ENABLED", "true"),
            (
                "IM_FORWARDING__PEER_URL_TEMPLATE",
                "https://{instance}.im-pods.prod.svc:8443",
            ),
            ("IM_FORWARDING__CA_FILE", ca_s.as_str()),
        ];
        assert!(forwarder(Mode::Managed, &cfg(&[]), &engine)
            .unwrap()
            .is_none());
        let e = forwarder(Mode::Standalone, &cfg(&on), &engine)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("managed mode"), "{e}");
        let e = forwarder(Mode::Managed, &cfg(&on), &engine)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("forwarding.ca_file"), "{e}");
        let test_ca = identitymesh_test_support::pki::TestCa::new("ca").unwrap();
        std::fs::write(&ca, test_ca.cert_pem()).unwrap();
        assert!(forwarder(Mode::Managed, &cfg(&on), &engine)
            .unwrap()
            .is_some());
    }

    #[test]
    fn managed_mode_refuses_sqlite_unless_every_instance_is_on_one_host() {
        let cs = (
            "IM_DATABASE__CONNECTION_STRING",
            "sqlite:///var/lib/im/im.db",
        );
        let e = backend(Mode::Managed, &cfg(&[cs])).unwrap_err().to_string();
        assert!(
            e.contains("sqlite_single_host") && e.contains("SQL Server"),
            "{e}"
        );
        let ok = backend(
            Mode::Managed,
            &cfg(&[cs, ("IM_DATABASE__SQLITE_SINGLE_HOST", "true")]),
        )
        .unwrap();
        assert!(matches!(ok, Backend::Sqlite(_)));
        // Standalone is one host by definition.
        assert!(matches!(
            backend(Mode::Standalone, &cfg(&[cs])).unwrap(),
            Backend::Sqlite(_)
        ));
        let mssql = (
            "IM_DATABASE__CONNECTION_STRING",
            "Server=tcp:db,1433;Database=im;User Id=im;Password=x",
        );
        assert!(backend(Mode::Managed, &cfg(&[mssql])).is_ok());
    }
}
