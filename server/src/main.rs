use std::path::PathBuf;

use clap::{Parser, Subcommand};
use identitymesh_server::app::{self, Mode};
use identitymesh_server::config::{self, FlagOverrides};

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
    /// Windows only: run standalone under the Service Control Manager (`sc create … binPath=
    /// "identitymesh-server.exe service --config C:\\…\\server.toml"`).
    #[cfg(windows)]
    Service {
        #[arg(long)]
        config: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let (mode, file, flags) = match cli.command {
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
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
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
