//! `identitymesh-relay`: enroll once, then run (as a plain process or a Windows service).

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use identitymesh_relay::agent::Agent;
use identitymesh_relay::config::{default_config_path, ConfigFile, RetryFile};
use identitymesh_relay::connect::Connector;
use identitymesh_relay::handlers::HandlerRegistry;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::watch;

#[derive(Parser)]
#[command(
    name = "identitymesh-relay",
    version,
    about = "IdentityMesh relay agent"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Store the server URL, the relay credential and the CA to trust.
    Enroll(EnrollArgs),
    /// Connect to the hub and serve directory reads until stopped.
    Run(RunArgs),
    /// Run under the Windows service control manager (used by the service definition).
    #[cfg(windows)]
    Service(RunArgs),
}

#[derive(Args)]
struct EnrollArgs {
    /// Server URL, e.g. https://identitymesh.example.com
    #[arg(long)]
    server: String,
    /// Relay credential issued by the Admin API (relays.manage).
    #[arg(long, env = "IDENTITYMESH_RELAY_TOKEN", hide_env_values = true)]
    token: String,
    /// PEM file with the cluster CA; it is copied next to the config file.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Trust publicly trusted server certificates instead of a cluster CA.
    #[arg(long, conflicts_with = "ca_file")]
    public_roots: bool,
    /// Config file to write.
    #[arg(long)]
    config: Option<PathBuf>,
    /// name:port:address override, like curl (repeatable).
    #[arg(long)]
    resolve: Vec<String>,
    /// Do not contact the server to check the certificate and credential.
    #[arg(long)]
    no_verify: bool,
    /// A folder relay-bound CSV connectors may read (absolute; repeatable; stored as
    /// csv_roots). Without one, this relay refuses CSV connectors.
    #[arg(long = "csv-root")]
    csv_roots: Vec<PathBuf>,
}

#[derive(Args, Clone)]
struct RunArgs {
    /// Config file written by `enroll`.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override the server URL from the config file.
    #[arg(long)]
    server: Option<String>,
    /// Override the CA file from the config file.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// name:port:address override, like curl (repeatable; replaces the config's list).
    #[arg(long)]
    resolve: Vec<String>,
    /// Backoff base in milliseconds.
    #[arg(long)]
    retry_base_ms: Option<u64>,
    /// Backoff cap in milliseconds.
    #[arg(long)]
    retry_cap_ms: Option<u64>,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Enroll(a) => runtime().and_then(|rt| rt.block_on(enroll(a))),
        Command::Run(a) => {
            runtime().and_then(|rt| rt.block_on(async { run(a, shutdown_on_signals()).await }))
        }
        #[cfg(windows)]
        Command::Service(a) => service::start(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn config_dir(path: &Path) -> PathBuf {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

async fn enroll(a: EnrollArgs) -> anyhow::Result<()> {
    let path = a.config.unwrap_or_else(default_config_path);
    let dir = config_dir(&path);
    let mut file = ConfigFile {
        server: a.server,
        token: a.token,
        public_roots: a.public_roots,
        resolve: a.resolve,
        csv_roots: a.csv_roots,
        ..Default::default()
    };
    let ca_pem = match &a.ca_file {
        Some(ca) => {
            let pem = std::fs::read(ca)
                .with_context(|| format!("cannot read CA file {}", ca.display()))?;
            identitymesh_relay::tls::parse_ca_pem(&pem, &ca.display().to_string())?;
            Some(pem)
        }
        None => None,
    };
    // Validate everything before writing anything; the CA is checked from its original path.
    let mut check = file.clone();
    check.ca_file = a.ca_file.clone();
    let settings = check.settings(Path::new("."))?;
    if !a.no_verify {
        let connector = Connector::new(Arc::new(settings))?;
        let addr = connector
            .check()
            .await
            .context("enrollment check failed (use --no-verify to skip)")?;
        tracing::info!(%addr, "server certificate and relay credential accepted");
    }
    if let Some(pem) = ca_pem {
        let ca_path = dir.join("ca.pem");
        identitymesh_relay::config::write_private(&ca_path, &pem)?;
        file.ca_file = Some(PathBuf::from("ca.pem"));
    }
    file.save(&path)?;
    println!("enrolled: configuration written to {}", path.display());
    Ok(())
}

async fn run(a: RunArgs, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let path = a.config.clone().unwrap_or_else(default_config_path);
    let mut file = ConfigFile::load(&path)?;
    if let Some(s) = a.server {
        file.server = s;
    }
    if let Some(ca) = a.ca_file {
        file.ca_file = Some(std::path::absolute(&ca).unwrap_or(ca));
    }
    if !a.resolve.is_empty() {
        file.resolve = a.resolve;
    }
    if a.retry_base_ms.is_some() || a.retry_cap_ms.is_some() {
        let r = file.retry.get_or_insert_with(RetryFile::default);
        r.base_ms = a.retry_base_ms.or(r.base_ms);
        r.cap_ms = a.retry_cap_ms.or(r.cap_ms);
    }
    let settings = file.settings(&config_dir(&path))?;
    tracing::info!(server = %file.server, version = env!("CARGO_PKG_VERSION"), "relay starting");
    let csv_roots = file.drop_roots()?;
    tracing::info!(roots = %csv_roots.describe(), "CSV drop roots");
    let mut handlers = HandlerRegistry::with_diagnostics();
    identitymesh_relay::directory::register(&mut handlers, csv_roots);
    let agent = Agent::new(settings, handlers)?;
    agent.run(shutdown).await;
    tracing::info!("relay stopped");
    Ok(())
}

/// SIGTERM / SIGINT (Ctrl-C) flip the shutdown flag; the agent closes its session cleanly.
fn shutdown_on_signals() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = term.recv() => tracing::info!("SIGTERM received, stopping"),
                        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received, stopping"),
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
            tracing::info!("interrupt received, stopping");
        }
        let _ = tx.send(true);
    });
    rx
}

#[cfg(windows)]
mod service {
    //! Thin Windows service wrapper: SCM Stop/Shutdown flip the same shutdown flag.
    use super::{run, runtime, RunArgs};
    use std::ffi::OsString;
    use std::sync::OnceLock;
    use std::time::Duration;
    use windows_service::service::{
        ServiceControl, ServiceControlAccept, ServiceExitCode, ServiceState, ServiceStatus,
        ServiceType,
    };
    use windows_service::service_control_handler::{self, ServiceControlHandlerResult};

    const NAME: &str = "IdentityMeshRelay";
    static ARGS: OnceLock<RunArgs> = OnceLock::new();

    windows_service::define_windows_service!(ffi_service_main, service_main);

    pub fn start(args: RunArgs) -> anyhow::Result<()> {
        let _ = ARGS.set(args);
        windows_service::service_dispatcher::start(NAME, ffi_service_main)?;
        Ok(())
    }

    fn status(state: ServiceState, accept: ServiceControlAccept) -> ServiceStatus {
        ServiceStatus {
            service_type: ServiceType::OWN_PROCESS,
            current_state: state,
            controls_accepted: accept,
            exit_code: ServiceExitCode::Win32(0),
            checkpoint: 0,
            wait_hint: Duration::from_secs(10),
            process_id: None,
        }
    }

    fn service_main(_arguments: Vec<OsString>) {
        let Some(args) = ARGS.get().cloned() else {
            return;
        };
        let (tx, rx) = tokio::sync::watch::channel(false);
        let handler = move |control| match control {
            ServiceControl::Stop | ServiceControl::Shutdown => {
                let _ = tx.send(true);
                ServiceControlHandlerResult::NoError
            }
            ServiceControl::Interrogate => ServiceControlHandlerResult::NoError,
            _ => ServiceControlHandlerResult::NotImplemented,
        };
        let Ok(handle) = service_control_handler::register(NAME, handler) else {
            return;
        };
        let _ = handle.set_service_status(status(
            ServiceState::Running,
            ServiceControlAccept::STOP | ServiceControlAccept::SHUTDOWN,
        ));
        let result = runtime().and_then(|rt| rt.block_on(run(args, rx)));
        if let Err(e) = &result {
            tracing::error!(error = %format!("{e:#}"), "relay service failed");
        }
        let _ =
            handle.set_service_status(status(ServiceState::Stopped, ServiceControlAccept::empty()));
    }
}
