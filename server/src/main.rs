use std::path::PathBuf;

use clap::{Parser, Subcommand};
use identitymesh_server::app::{self, Mode};
use identitymesh_server::config::{self, FlagOverrides};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "identitymesh-server",
    version,
    about = "IdentityMesh server: Admin API, Sync Engine, Relay Hub"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One host: embedded SQLite under DIR, static active role, development certificate.
    Standalone {
        #[arg(long)]
        data_dir: PathBuf,
        /// HOST:PORT for the Admin API (default 0.0.0.0:8443).
        #[arg(long)]
        listen: Option<String>,
        /// Optional TOML file; IM_* variables and flags override it.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Managed mode (Kubernetes pods): standby until promoted by the operator.
    Run {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        listen: Option<String>,
    },
    /// Connector secrets, sealed with the key ring: `secrets set NAME` reads the value from stdin.
    Secrets {
        #[command(subcommand)]
        action: SecretsAction,
        /// The server's TOML config (database and key ring); IM_* variables override it.
        #[arg(long, global = true)]
        config: Option<PathBuf>,
        /// A standalone install's data directory (its SQLite database and keyring.json).
        #[arg(long, global = true)]
        data_dir: Option<PathBuf>,
    },
    /// Windows only: run standalone under the Service Control Manager (`sc create … binPath=
    /// "identitymesh-server.exe service --config C:\\…\\server.toml"`).
    #[cfg(windows)]
    Service {
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum SecretsAction {
    /// Stores (or replaces) NAME with the value read from stdin (one trailing newline dropped).
    Set { name: String },
    /// Lists names, key ids and times; never values.
    List,
    /// Deletes NAME.
    Delete { name: String },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let (mode, file, flags) = match cli.command {
        Command::Secrets {
            action,
            config,
            data_dir,
        } => return secrets(action, config, data_dir),
        #[cfg(windows)]
        Command::Service { config } => return identitymesh_server::winsvc::run(config),
        Command::Standalone {
            data_dir,
            listen,
            config,
        } => (
            Mode::Standalone,
            config,
            FlagOverrides {
                data_dir: Some(data_dir),
                listen,
                ..Default::default()
            },
        ),
        Command::Run { config, listen } => (
            Mode::Managed,
            Some(config),
            FlagOverrides {
                listen,
                ..Default::default()
            },
        ),
    };
    let cfg = match config::load(file.as_deref(), std::env::vars(), &flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let Some(rt) = runtime() else {
        return std::process::ExitCode::FAILURE;
    };
    match rt.block_on(app::run(mode, cfg, app::wait_for_signal())) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn secrets(
    action: SecretsAction,
    file: Option<PathBuf>,
    data_dir: Option<PathBuf>,
) -> std::process::ExitCode {
    // Without a config file this is a standalone install: its data dir holds the database and
    // the key ring.
    let mode = if file.is_some() && data_dir.is_none() {
        Mode::Managed
    } else {
        Mode::Standalone
    };
    let flags = FlagOverrides {
        data_dir,
        ..Default::default()
    };
    let cfg = match config::load(file.as_deref(), std::env::vars(), &flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let value = match &action {
        SecretsAction::Set { .. } => {
            use std::io::Read;
            let mut v = String::new();
            if let Err(e) = std::io::stdin().read_to_string(&mut v) {
                eprintln!("error: cannot read the secret from stdin: {e}");
                return std::process::ExitCode::from(2);
            }
            let v = v.strip_suffix('\n').unwrap_or(&v);
            Some(v.strip_suffix('\r').unwrap_or(v).to_string())
        }
        _ => None,
    };
    let Some(rt) = runtime() else {
        return std::process::ExitCode::FAILURE;
    };
    let r = rt.block_on(async {
        let secrets = app::open_secrets(mode, &cfg).await?;
        let actor = format!("cli:{}", config::host_name());
        match action {
            SecretsAction::Set { name } => {
                secrets
                    .set(&name, value.as_deref().unwrap_or_default(), &actor)
                    .await?;
                println!("secret {name} stored");
            }
            SecretsAction::List => {
                for s in secrets.list().await? {
                    println!("{}\tkey {}\tupdated {}", s.name, s.key_id, s.updated_at_ms);
                }
            }
            SecretsAction::Delete { name } => {
                if !secrets.delete(&name, &actor).await? {
                    anyhow::bail!("no secret named {name:?}");
                }
                println!("secret {name} deleted");
            }
        }
        anyhow::Ok(())
    });
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn runtime() -> Option<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new()
        .map_err(|e| eprintln!("error: cannot start the async runtime: {e}"))
        .ok()
}
